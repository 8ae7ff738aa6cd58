"""The public ops. Each checks its arguments, then runs the kernel for the tensors' device or
the eager reference (see fusedset._dispatch)."""

from fusedset.ops.style_pool import style_pool

__all__ = ["style_pool"]
