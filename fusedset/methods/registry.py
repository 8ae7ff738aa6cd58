"""The fusion method registry: what a method is and how it is found by name.

A method turns one template (the raw embeddings of its images, their media ids and style
statistics) into one descriptor; evaluation compares descriptors by cosine. A method is
registered under a name with a ``build(checkpoint, device=None)`` function that returns its
fuser, so a learned module (``caface``, ``coreset``, see ``fusedset.methods.learned``) loads its
weights once and is then called per template. A fuser that can also take a template in parts (a
``StreamingFuser``, such as CAFace's) lets ``fusedset fuse`` read a long template chunk by chunk.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch


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
        build: (checkpoint path or None when not given, device or None for the CPU) -> fuser,
            which takes templates on that device; called once per evaluation.
        description: one line for help and reports.
        needs_checkpoint: evaluation refuses to run it without ``--checkpoint``.
        needs_style: evaluation refuses to run it on a benchmark without style statistics.
    """

    name: str
    build: Callable[[str | None, torch.device | None], Fuser]
    description: str
    needs_checkpoint: bool = False
    needs_style: bool = False


_METHODS: dict[str, Method] = {}
# Other names a method answers to: the module's name for the method the CLI calls ``coreset``.
ALIASES = {"facecoresetnet": "coreset"}


def register_method(method: Method) -> None:
    """Add ``method`` to the registry; a name can be registered once."""
    if method.name in _METHODS:
        raise ValueError(f"fusion method {method.name!r} is already registered")
    _METHODS[method.name] = method


def get_method(name: str) -> Method:
    """The method registered as ``name`` or one of its ``ALIASES``; KeyError naming the known
    ones otherwise."""
    method = _METHODS.get(ALIASES.get(name, name))
    if method is None:
        raise KeyError(f"unknown fusion method {name!r}; known: {', '.join(method_names())}")
    return method


def method_names() -> list[str]:
    """Registered names, in registration order (baselines first)."""
    return list(_METHODS)


def canonical_name(name: str) -> str:
    """``name`` with an alias replaced by the registered name it stands for."""
    return ALIASES.get(name, name)
