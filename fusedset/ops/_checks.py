"""Argument checks shared by the ops: each error names the op, the argument, what it got and
what it expected."""

from __future__ import annotations

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
