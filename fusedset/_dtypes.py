"""The dtype every op and reference accumulates in, and the dtypes a Triton kernel takes."""

from __future__ import annotations

from collections.abc import Mapping

import torch


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 inputs (gradcheck's dtype), float32 for every other input dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def triton_label(op: str, labels: Mapping[torch.dtype, str], dtype: torch.dtype) -> str:
    """``labels[dtype]``, Triton's name of a dtype that ``op``'s kernels take ("fp32", ...), or a
    TypeError naming the dtypes they take."""
    if dtype not in labels:
        taken = ", ".join(str(d).removeprefix("torch.") for d in labels)
        raise TypeError(f"{op}: the Triton kernels take {taken} inputs, got {dtype}")
    return labels[dtype]
