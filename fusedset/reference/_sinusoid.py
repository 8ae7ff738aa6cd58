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
    return encode_angles(sinusoid_angles(positions, dim, temperature))


def encode_angles(angles: torch.Tensor) -> torch.Tensor:
    """(..., dim // 2) angles -> (..., dim): channels 2k and 2k+1 are sin and cos of angle k."""
    return torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(-2)


def sinusoid_angles(
    positions: torch.Tensor, dim: int, temperature: float = 10000.0
) -> torch.Tensor:
    """positions (...) -> (..., dim // 2): the angle p / T^(2k / dim) of channel pair k."""
    dtype = torch.promote_types(positions.dtype, torch.float32)
    divisors = frequency_divisors(dim, temperature, dtype, positions.device)
    return positions.to(dtype)[..., None] / divisors


def frequency_divisors(
    dim: int, temperature: float, dtype: torch.dtype, device: torch.device | None = None
) -> torch.Tensor:
    """(dim // 2,): T^(2k / dim), the divisor of the positions in channel pair k."""
    pair = torch.arange(dim // 2, dtype=dtype, device=device)
    return temperature ** (2 * pair / dim)
