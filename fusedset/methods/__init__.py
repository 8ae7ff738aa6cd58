"""Template fusion methods by name: the registry, the baselines, and the learned methods.

Both ``fusedset.fuse`` (writing descriptors) and ``fusedset.eval`` (scoring them) find their
methods here, so neither depends on the other.
"""

import torch

from fusedset.methods.baselines import core_mean, mean, media_mean, norm_mean
from fusedset.methods.registry import (
    ALIASES,
    Fuser,
    Method,
    StreamingFuser,
    Template,
    TemplateStream,
    canonical_name,
    get_method,
    method_names,
    register_method,
)


def _register_baseline(name: str, fuser: Fuser, description: str) -> None:
    # Baselines have no weights: their build ignores the checkpoint, and they run where the
    # template is.
    register_method(Method(name, build=lambda checkpoint, device=None: fuser,
                           description=description))  # fmt: skip


def _build_caface(checkpoint: str | None, device: torch.device | None = None) -> Fuser:
    # Imported when built: the learned modules load their weights.
    from fusedset.methods.learned import caface_fuser

    return caface_fuser(checkpoint, device)


def _build_coreset(checkpoint: str | None, device: torch.device | None = None) -> Fuser:
    from fusedset.methods.learned import coreset_fuser

    return coreset_fuser(checkpoint, device)


_register_baseline("mean", mean, "plain average of unit embeddings")
_register_baseline("media-mean", media_mean, "average within each media, then across media")
_register_baseline("norm-mean", norm_mean, "norm-weighted average (mean of raw embeddings)")
_register_baseline("core-mean", core_mean, "average of a quality-aware FPS core of 3 images")
register_method(
    Method(
        "caface",
        build=_build_caface,
        description="CAFace, each template streamed in chunks of 256 frames",
        needs_checkpoint=True,
        needs_style=True,
    )
)
register_method(
    Method(
        "coreset",
        build=_build_coreset,
        description="FaceCoresetNet: a core of 3 by selection, attending over the template",
        needs_checkpoint=True,
    )
)

__all__ = [
    "ALIASES",
    "Fuser",
    "Method",
    "StreamingFuser",
    "Template",
    "TemplateStream",
    "canonical_name",
    "core_mean",
    "get_method",
    "mean",
    "media_mean",
    "method_names",
    "norm_mean",
    "register_method",
]
