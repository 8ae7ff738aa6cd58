"""The public ops. Each checks its arguments, then runs the kernel for the tensors' device or
the eager reference (see fusedset._dispatch)."""

from fusedset.ops.quality_fps import quality_fps, quality_fps_select
from fusedset.ops.style_pool import style_pool

__all__ = ["quality_fps", "quality_fps_select", "style_pool"]
