"""The fusion methods without weights: averages of a template's embeddings."""

from __future__ import annotations

import torch

from fusedset import ops
from fusedset.methods.registry import Template


def _unit(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x, dim=-1)


def mean(template: Template) -> torch.Tensor:
    """Plain average of the unit embeddings: every image counts the same."""
    return _unit(template.features).mean(dim=0)


def media_mean(template: Template) -> torch.Tensor:
    """Average of unit embeddings within each media, then across media (the IJB protocol's
    media pooling): a 500-frame video weighs as much as one still."""
    ids, inverse = torch.unique(template.media, return_inverse=True)
    sums = template.features.new_zeros(len(ids), template.features.shape[1])
    sums.index_add_(0, inverse, _unit(template.features))
    counts = torch.bincount(inverse, minlength=len(ids)).to(sums.dtype)
    return (sums / counts[:, None]).mean(dim=0)


def norm_mean(template: Template) -> torch.Tensor:
    """Average of the raw embeddings: each image weighs by its norm, i.e. its quality."""
    return template.features.mean(dim=0)


def core_indices(features: torch.Tensor, k: int = 3, gamma: float = 1.0) -> torch.Tensor:
    """(min(k, N),) indices into one template's (N, D) raw embeddings: the core that
    ``fusedset.ops.quality_fps`` selects, in selection order."""
    return ops.quality_fps(features[None], k=k, gamma=gamma)[0]


def core_mean(template: Template, k: int = 3, gamma: float = 1.0) -> torch.Tensor:
    """Selection-only FaceCoresetNet: the plain average of the unit embeddings of the core
    that quality-aware farthest point selection picks (``core_indices``)."""
    return _unit(template.features[core_indices(template.features, k, gamma)]).mean(dim=0)
