import torch


def style_pool(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, 2): [mean, unbiased std] over H*W, as CAFace's backbone computes."""
    return torch.stack([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], dim=-1)
