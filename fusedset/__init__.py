"""fusedset: fast, exact kernels for set-based face-recognition fusion (CAFace, FaceCoresetNet)."""

from fusedset import ops
from fusedset._dispatch import backends, force_reference, reference_forced

__version__ = "0.1.0"
__all__ = ["backends", "force_reference", "ops", "reference_forced"]
