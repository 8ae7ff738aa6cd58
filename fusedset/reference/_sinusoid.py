import torch


def sinusoidal_encoding(
    positions: torch.Tensor, dim: int, temperature: float = 10000.0
) -> torch.Tensor:
    """positions (...) -> (..., dim): channels 2k and 2k+1 are sin and cos of p / T^(2k / dim).

    The transformer position code both papers use: CAFace indexes a table of it with the quantized
    norm, FaceCoresetNet evaluates it at the continuous norm times 2 pi. Frequencies are computed
    in at least fp32 whatever the input dtype, as the released FaceCoresetNet does: angles reach
    hundreds of radians there, and a half-precision frequency would move every channel.
    """
    dtype = torch.promote_types(positions.dtype, torch.float32)
    channel = torch.arange(dim, dtype=dtype, device=positions.device)
    frequency_divisor = temperature ** (2 * torch.div(channel, 2, rounding_mode="floor") / dim)
    angles = positions.to(dtype)[..., None] / frequency_divisor
    return torch.stack((angles[..., 0::2].sin(), angles[..., 1::2].cos()), dim=-1).flatten(-2)
