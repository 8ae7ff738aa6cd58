"""The layers users import, and the loading of the released CAFace and FaceCoresetNet
checkpoints."""

from fusedset.nn.caface import CAFace, CAFaceStream
from fusedset.nn.checkpoints import (
    CheckpointKeyError,
    caface_state_dict,
    facecoresetnet_state_dict,
    load_caface_reference,
    load_checked,
    load_facecoresetnet_reference,
    read_state_dict,
)
from fusedset.nn.facecoresetnet import FaceCoresetNet
from fusedset.nn.folded_attention import folded_cross_attention

__all__ = [
    "CAFace",
    "CAFaceStream",
    "CheckpointKeyError",
    "FaceCoresetNet",
    "caface_state_dict",
    "facecoresetnet_state_dict",
    "folded_cross_attention",
    "load_caface_reference",
    "load_checked",
    "load_facecoresetnet_reference",
    "read_state_dict",
]
