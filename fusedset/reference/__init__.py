"""Eager PyTorch implementations of every op: simple, slow, and the oracle for kernel tests."""

from fusedset.reference.caface import CAFaceConfig, CAFaceReference
from fusedset.reference.cluster_accumulate import cluster_accumulate, cluster_accumulate_caface
from fusedset.reference.facecoresetnet import FaceCoresetNetReference
from fusedset.reference.style_pool import style_pool

__all__ = [
    "CAFaceConfig",
    "CAFaceReference",
    "FaceCoresetNetReference",
    "cluster_accumulate",
    "cluster_accumulate_caface",
    "style_pool",
]
