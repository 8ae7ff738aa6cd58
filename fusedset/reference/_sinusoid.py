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
    angles = sinusoid_angles(positions, dim, temperature)
    return torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(-2)


def sinusoid_angles(
    positions: torch.Tensor, dim: int, temperature: float = 10000.0
) -> torch.Tensor:
    """positions (...) -> (..., dim // 2): the angle p / T^(2k / dim) of channel pair k."""
    dtype = torch.promote_types(positions.dtype, torch.float32)
    pair = torch.arange(dim // 2, dtype=dtype, device=positions.device)
    frequency_divisor = temperature ** (2 * pair / dim)
    return positions.to(dtype)[..., None] / frequency_divisor
