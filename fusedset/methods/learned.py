"""The learned fusion methods, ``caface`` and ``coreset``: a fast module of ``fusedset.nn``
loaded from a checkpoint, called per template.

A checkpoint is a released one (``CAFace.from_official`` / ``FaceCoresetNet.from_official``
layouts) or one written by ``fusedset train``, which stores the weights under ``state_dict``
and what trained them under ``fusedset``. Anything else (a missing file, a file torch cannot
read, the other method's weights) is a ``CheckpointError`` whose one-line message names the
file and the problem.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch

from fusedset.methods.registry import Template, canonical_name
from fusedset.nn import CAFace, CheckpointKeyError, FaceCoresetNet
from fusedset.nn.checkpoints import (
    CAFACE_PREFIX,
    CHECKPOINT_KEY,
    FACECORESETNET_PREFIX,
    CheckpointError,
    read_checkpoint,
    read_state_dict,
)

DEFAULT_CHUNK_SIZE = 256  # CAFace frames per chunk (the released memory mode's unit)

# A key only each method's state dict has, to name the kind of a checkpoint given to the other.
_SIGNATURE_KEYS = {"caface": "style_maker.linear.weight", "coreset": "pos_trans_norm.weight"}
_PREFIXES = {"caface": CAFACE_PREFIX, "coreset": FACECORESETNET_PREFIX}
_MODEL_NAMES = {"caface": "CAFace", "coreset": "FaceCoresetNet"}


def checkpoint_kind(stored: Mapping[str, Any]) -> str | None:
    """``caface``, ``coreset`` or None: what a checkpoint holds, by its metadata when
    ``fusedset train`` wrote it, else by its keys."""
    info = stored.get(CHECKPOINT_KEY)
    method = info.get("method") if isinstance(info, Mapping) else None
    if isinstance(method, str) and canonical_name(method) in _MODEL_NAMES:
        return canonical_name(method)
    try:
        keys = read_state_dict(stored).keys()
    except TypeError:
        return None
    for kind, key in _SIGNATURE_KEYS.items():
        if key in keys or _PREFIXES[kind] + key in keys:
            return kind
    return None


def _key_problem(exc: CheckpointKeyError) -> str:
    parts = []
    if exc.missing:
        parts.append(f"{len(exc.missing)} missing keys such as {exc.missing[0]!r}")
    if exc.unexpected:
        parts.append(f"{len(exc.unexpected)} unexpected keys such as {exc.unexpected[0]!r}")
    return ", ".join(parts)


def load_module(path: str | os.PathLike[str], method: str) -> CAFace | FaceCoresetNet:
    """The fast module of ``method`` (``caface`` or ``coreset``) in eval mode, from a released
    or ``fusedset train`` checkpoint at ``path``."""
    method = canonical_name(method)
    if method not in _MODEL_NAMES:
        raise ValueError(f"method must be one of {', '.join(_MODEL_NAMES)}, got {method!r}")
    stored = read_checkpoint(path)
    kind = checkpoint_kind(stored)
    if kind is not None and kind != method:
        raise CheckpointError(
            f"{path}: holds {_MODEL_NAMES[kind]} weights ({kind}), not {_MODEL_NAMES[method]} "
            f"weights ({method})"
        )
    info = stored.get(CHECKPOINT_KEY)
    trained = info if isinstance(info, Mapping) else {}
    try:
        if method == "caface":
            return CAFace.from_official(stored)
        coreset_size = trained.get("config", {}).get("coreset_size", 3)
        return FaceCoresetNet.from_official(stored, coreset_size=coreset_size)
    except CheckpointKeyError as exc:
        problem = _key_problem(exc)
    except (ValueError, TypeError, RuntimeError) as exc:
        problem = str(exc).splitlines()[0]
    raise CheckpointError(f"{path}: not a {_MODEL_NAMES[method]} checkpoint ({problem})")


class CAFaceFuser:
    """CAFace as a fusion method: each template streamed in chunks of ``chunk_size`` frames
    (the released memory mode), so memory is bounded by the chunk, not the template."""

    def __init__(self, model: CAFace, chunk_size: int = DEFAULT_CHUNK_SIZE) -> None:
        self.model = model
        self.chunk_size = chunk_size

    def stream(self, chunk_size: int | None = None) -> CAFaceTemplateStream:
        return CAFaceTemplateStream(self.model, chunk_size or self.chunk_size)

    def __call__(self, template: Template) -> torch.Tensor:
        return self.stream().update(template).result()


class CAFaceTemplateStream:
    """One template fed in consecutive parts. Parts whose lengths are multiples of the chunk
    size give exactly the result of the whole template at once."""

    def __init__(self, model: CAFace, chunk_size: int) -> None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
        self.chunk_size = chunk_size
        self._stream = model.stream(1, "official", chunk_size)

    def update(self, part: Template) -> CAFaceTemplateStream:
        if part.style is None:
            raise ValueError("CAFace needs style statistics")
        self._stream.update(part.features[None], part.style[None])
        return self

    def result(self) -> torch.Tensor:
        return self._stream.result()[0]


class CoresetFuser:
    """FaceCoresetNet as a fusion method: its core selection over the whole template, then the
    core's attention over it (chunked inside the module)."""

    def __init__(self, model: FaceCoresetNet) -> None:
        self.model = model

    def __call__(self, template: Template) -> torch.Tensor:
        descriptor, _ = self.model.forward_features(template.features[None])
        return descriptor[0]


def caface_fuser(checkpoint: str | None, device: torch.device | None = None) -> CAFaceFuser:
    if checkpoint is None:
        raise ValueError("method 'caface' needs a checkpoint")
    return CAFaceFuser(load_module(checkpoint, "caface").to(device))


def coreset_fuser(checkpoint: str | None, device: torch.device | None = None) -> CoresetFuser:
    if checkpoint is None:
        raise ValueError("method 'coreset' needs a checkpoint")
    return CoresetFuser(load_module(checkpoint, "coreset").to(device))
