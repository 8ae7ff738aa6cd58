"""The public ops. Each checks its arguments, then runs the kernel for the tensors' device or
the eager reference (see fusedset._dispatch). The CUDA kernels of the Triton ops register
from their folder, fusedset.triton_kernels."""

from fusedset import _dispatch
from fusedset.ops.cluster_accumulate import cluster_accumulate, cluster_accumulate_caface
from fusedset.ops.quality_fps import quality_fps, quality_fps_select
from fusedset.ops.sinusoid_attention_pool import sinusoid_attention_pool
from fusedset.ops.style_pool import style_pool

if _dispatch.extension_loaded() and _dispatch.triton_importable():
    from fusedset.triton_kernels import register_cuda_kernels

    register_cuda_kernels()

__all__ = [
    "cluster_accumulate",
    "cluster_accumulate_caface",
    "quality_fps",
    "quality_fps_select",
    "sinusoid_attention_pool",
    "style_pool",
]
