"""Eager PyTorch implementations of every op: simple, slow, and the oracle for kernel tests."""

from fusedset.reference.caface import CAFaceConfig, CAFaceReference
from fusedset.reference.cluster_accumulate import (
    cluster_accumulate,
    cluster_accumulate_caface,
    default_scale,
)
from fusedset.reference.facecoresetnet import FaceCoresetNetReference
from fusedset.reference.quality_fps import quality_fps, quality_fps_select
from fusedset.reference.sinusoid_attention_pool import sinusoid_attention_pool
from fusedset.reference.style_pool import style_pool

__all__ = [
    "CAFaceConfig",
    "CAFaceReference",
    "FaceCoresetNetReference",
    "cluster_accumulate",
    "cluster_accumulate_caface",
    "default_scale",
    "quality_fps",
    "quality_fps_select",
    "sinusoid_attention_pool",
    "style_pool",
]
