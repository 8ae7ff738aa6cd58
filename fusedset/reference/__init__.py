"""Eager PyTorch implementations of every op: simple, slow, and the oracle for kernel tests."""

from fusedset.reference.style_pool import style_pool

__all__ = ["style_pool"]
