"""Template fusion methods: the baselines, and the registry that learned methods join.

A method turns one template (the raw embeddings of its images, their media ids and style
statistics) into one descriptor; evaluation compares descriptors by cosine. A method is
registered under a name with a ``build(checkpoint)`` function that returns its fuser, so a
learned module (``caface``, ``coreset``, see ``fusedset.eval.learned``) loads its weights once
and is then called per template. A fuser that can also take a template in parts (a
``StreamingFuser``, such as CAFace's) lets ``fusedset fuse`` read a long template chunk by chunk.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from fusedset.eval import selection


@dataclass(frozen=True)
class Template:
    """One template's images.

    Attributes:
        features: (N, D) float32 raw embeddings, norms included, N >= 1.
        media: (N,) int64 media id of each image (a still, or the video a frame belongs to).
        style: (N, C, 2) float32 spatial [mean, std] style statistics, or None when the
            benchmark has none.
    """

    features: torch.Tensor
    media: torch.Tensor
    style: torch.Tensor | None


Fuser = Callable[[Template], torch.Tensor]
"""Template -> (D,) descriptor (any norm: evaluation normalizes)."""


class TemplateStream(Protocol):
    """One template fused part by part. Parts whose lengths are multiples of ``chunk_size``
    give the descriptor of the whole template at once."""

    chunk_size: int

    def update(self, part: Template) -> TemplateStream: ...

    def result(self) -> torch.Tensor: ...


@runtime_checkable
class StreamingFuser(Protocol):
    """A fuser that also fuses a template given in parts, in memory bounded by a part."""

    def __call__(self, template: Template) -> torch.Tensor: ...

    def stream(self, chunk_size: int | None = None) -> TemplateStream:
        """A new stream; ``chunk_size`` overrides the fuser's own."""
        ...


@dataclass(frozen=True)
class Method:
    """A registered fusion method.

    Attributes:
        name: the name ``fusedset eval --method`` takes.
        build: checkpoint path (None when not given) -> fuser; called once per evaluation.
        description: one line for help and reports.
        needs_checkpoint: evaluation refuses to run it without ``--checkpoint``.
        needs_style: evaluation refuses to run it on a benchmark without style statistics.
    """

    name: str
    build: Callable[[str | None], Fuser]
    description: str
    needs_checkpoint: bool = False
    needs_style: bool = False


_METHODS: dict[str, Method] = {}


def register_method(method: Method) -> None:
    """Add ``method`` to the registry; a name can be registered once."""
    if method.name in _METHODS:
        raise ValueError(f"fusion method {method.name!r} is already registered")
    _METHODS[method.name] = method


def get_method(name: str) -> Method:
    """The method registered as ``name``; KeyError naming the known ones otherwise."""
    if name not in _METHODS:
        raise KeyError(f"unknown fusion method {name!r}; known: {', '.join(method_names())}")
    return _METHODS[name]


def method_names() -> list[str]:
    """Registered names, in registration order (baselines first)."""
    return list(_METHODS)


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


def core_mean(template: Template, k: int = 3, gamma: float = 1.0) -> torch.Tensor:
    """Selection-only FaceCoresetNet: the plain average of the unit embeddings of the core
    that quality-aware farthest point selection picks (see ``selection.quality_fps``)."""
    core = selection.quality_fps(template.features, k=k, gamma=gamma)
    return _unit(template.features[core]).mean(dim=0)


def _register_baseline(name: str, fuser: Fuser, description: str) -> None:
    # Baselines have no weights: their build ignores the checkpoint.
    register_method(Method(name, build=lambda checkpoint: fuser, description=description))


_register_baseline("mean", mean, "plain average of unit embeddings")
_register_baseline("media-mean", media_mean, "average within each media, then across media")
_register_baseline("norm-mean", norm_mean, "norm-weighted average (mean of raw embeddings)")
_register_baseline("core-mean", core_mean, "average of a quality-aware FPS core of 3 images")


def _build_caface(checkpoint: str | None) -> Fuser:
    # Imported when built: the learned modules load the compiled extension and their weights.
    from fusedset.eval.learned import caface_fuser

    return caface_fuser(checkpoint)


def _build_coreset(checkpoint: str | None) -> Fuser:
    from fusedset.eval.learned import coreset_fuser

    return coreset_fuser(checkpoint)


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
