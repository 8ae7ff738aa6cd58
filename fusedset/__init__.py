"""fusedset: fast, exact kernels for set-based face-recognition fusion (CAFace, FaceCoresetNet)."""

from fusedset import ops
from fusedset._dispatch import backends, force_reference, reference_forced
from fusedset.cluster_state import ClusterState

__version__ = "0.1.0"
__all__ = ["ClusterState", "backends", "force_reference", "ops", "reference_forced"]
