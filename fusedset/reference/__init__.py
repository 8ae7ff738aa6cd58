"""Eager PyTorch implementations of every op: simple, slow, and the oracle for kernel tests."""

from fusedset.reference.caface import CAFaceConfig, CAFaceReference
from fusedset.reference.facecoresetnet import FaceCoresetNetReference
from fusedset.reference.quality_fps import quality_fps, quality_fps_select
from fusedset.reference.style_pool import style_pool

__all__ = [
    "CAFaceConfig",
    "CAFaceReference",
    "FaceCoresetNetReference",
    "quality_fps",
    "quality_fps_select",
    "style_pool",
]
