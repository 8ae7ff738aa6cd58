"""The public ops. Each checks its arguments, then runs the kernel for the tensors' device or
the eager reference (see fusedset._dispatch)."""

from fusedset.ops.cluster_accumulate import cluster_accumulate, cluster_accumulate_caface
from fusedset.ops.quality_fps import quality_fps, quality_fps_select
from fusedset.ops.sinusoid_attention_pool import sinusoid_attention_pool
from fusedset.ops.style_pool import style_pool

__all__ = [
    "cluster_accumulate",
    "cluster_accumulate_caface",
    "quality_fps",
    "quality_fps_select",
    "sinusoid_attention_pool",
    "style_pool",
]
