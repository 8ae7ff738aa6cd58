"""Argument checks shared by the ops: each error names the op, the argument, what it got and
what it expected."""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _dtype_names(dtypes: Sequence[torch.dtype]) -> str:
    return ", ".join(str(d).removeprefix("torch.") for d in dtypes)


def check_tensor(
    op: str,
    name: str,
    value: object,
    *,
    dims: str,
    dtypes: Sequence[torch.dtype] = FLOAT_DTYPES,
) -> torch.Tensor:
    """``value`` must be a tensor of rank ``len(dims.split(','))`` with a dtype in ``dtypes``.

    ``dims`` names the expected axes, e.g. "B, C, H, W", and appears in the error.
    """
    if not isinstance(value, torch.Tensor):
        raise TypeError(
            f"{op}: {name} must be a torch.Tensor of shape ({dims}), got {type(value).__name__}"
        )
    rank = len(dims.split(","))
    if value.dim() != rank:
        raise ValueError(
            f"{op}: {name} must have {rank} dimensions ({dims}), got shape {tuple(value.shape)}"
        )
    if value.dtype not in dtypes:
        raise TypeError(f"{op}: {name} must have dtype {_dtype_names(dtypes)}, got {value.dtype}")
    return value


def check_shape(op: str, name: str, value: torch.Tensor, ok: bool, expected: str) -> None:
    """Raise unless ``ok``: ``value``'s shape must be ``expected``, e.g. "(B, N >= 1, C)"."""
    if not ok:
        raise ValueError(f"{op}: {name} must have shape {expected}, got shape {tuple(value.shape)}")


def check_device(op: str, name: str, value: torch.Tensor, first: str, ref: torch.Tensor) -> None:
    """``value`` must be on ``ref``'s device: a kernel reads every tensor with ``ref``'s device
    code, so a tensor elsewhere (another GPU, the CPU, meta) would be read as garbage."""
    if value.device != ref.device:
        raise ValueError(f"{op}: {name} is on {value.device}, {first} on {ref.device}")


def check_real(op: str, name: str, value: object, *, positive: bool = False) -> float:
    """``value`` must be a finite real number (a Python or NumPy int or float, not a bool or a
    string), and > 0 when ``positive``; returns it as a float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{op}: {name} must be a real number, got {type(value).__name__}")
    value = float(value)
    # x - x is 0 exactly when x is finite (NaN otherwise). Unlike math.isfinite it also traces
    # under torch.compile, where a float argument can arrive as a SymFloat.
    if value - value != 0:
        raise ValueError(f"{op}: {name} must be finite, got {value}")
    if positive and not value > 0:
        raise ValueError(f"{op}: {name} must be positive, got {value}")
    return value


def all_finite(value: torch.Tensor) -> bool:
    """True when no element of ``value`` is NaN or Inf.

    A NaN or Inf element makes the fp32 sum non-finite, so a finite sum proves the tensor clean
    in one read; only a non-finite sum (a bad element, or an overflow of large finite values)
    pays for the elementwise test, which allocates a mask as large as the input.
    """
    if value.numel() == 0:
        return True
    if bool(torch.isfinite(value.sum(dtype=torch.float32))):
        return True
    return bool(torch.isfinite(value).all())
