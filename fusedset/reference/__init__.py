"""Eager PyTorch implementations of every op: simple, slow, and the oracle for kernel tests."""

from fusedset.reference.quality_fps import quality_fps, quality_fps_select
from fusedset.reference.style_pool import style_pool

__all__ = ["quality_fps", "quality_fps_select", "style_pool"]
