"""The dtype every op and reference accumulates in."""

from __future__ import annotations

import torch


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 inputs (gradcheck's dtype), float32 for every other input dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32
