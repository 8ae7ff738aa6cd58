"""Reading the released CAFace and FaceCoresetNet checkpoints.

A source is a path (read with `torch.load(..., weights_only=True)`) or an already loaded mapping.
Accepted layouts:
- CAFace: the bare `StyleBasedAggregator` state dict (`style_maker.*`, `norm_emb.*`,
  `fusion_net.*`), or the released Lightning checkpoint, where the same keys sit under
  `aggregator.` next to the backbone's `model.*` and a `center.weight`, which are ignored.
- FaceCoresetNet: the bare `TemplateAggregateModel` state dict, or the same under
  `aggregate_model.`.
Either may be wrapped in a dict with a `state_dict` entry (a Lightning checkpoint file).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeAlias

import torch
from torch import nn

from fusedset.reference.caface import CAFaceConfig, CAFaceReference
from fusedset.reference.facecoresetnet import (
    FaceCoresetNetReference,
    infer_embedding_size,
)

CheckpointSource: TypeAlias = str | os.PathLike[str] | Mapping[str, Any]

CAFACE_PREFIX = "aggregator."
FACECORESETNET_PREFIX = "aggregate_model."
CHECKPOINT_KEY = "fusedset"  # a `fusedset train` checkpoint's metadata entry, by its state_dict


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable or of the wrong kind; the message names the file."""


class CheckpointKeyError(ValueError):
    """A state dict whose keys do not match the model's; the message names every key."""

    def __init__(self, model_name: str, missing: list[str], unexpected: list[str]) -> None:
        self.missing = missing
        self.unexpected = unexpected
        lines = [f"the state dict does not match the {model_name} parameter layout"]
        if missing:
            lines.append(f"missing keys ({len(missing)}): {', '.join(missing)}")
        if unexpected:
            lines.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected)}")
        super().__init__("\n".join(lines))


def read_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The mapping stored at `path` (`torch.load(weights_only=True)`); CheckpointError naming
    the file when it is missing, unreadable or not a mapping."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        stored = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # whatever torch.load raises, the file is not a checkpoint
        raise CheckpointError(
            f"{path}: not a checkpoint that torch.load(weights_only=True) reads "
            f"({_load_failure(exc)})"
        ) from exc
    if not isinstance(stored, Mapping):
        raise CheckpointError(
            f"{path}: expected a state dict or a checkpoint dict, found {type(stored).__name__}"
        )
    return dict(stored)


def _load_failure(exc: Exception) -> str:
    """The gist of a torch.load error: its unpickler's complaint (torch wraps it in a long
    advice text), else its first line, else its type."""
    text = str(exc).split("WeightsUnpickler error:")[-1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def read_state_dict(source: CheckpointSource) -> dict[str, Any]:
    """A path or mapping -> a flat key -> tensor dict, unwrapping a `state_dict` entry."""
    if isinstance(source, str | os.PathLike):
        source = read_checkpoint(source)
    if not isinstance(source, Mapping):
        raise TypeError(f"expected a checkpoint path or a state dict, got {type(source).__name__}")
    if isinstance(source.get("state_dict"), Mapping):
        source = source["state_dict"]
    return dict(source)


def strip_prefix(state_dict: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """The entries under `prefix`, with it removed, when any key has it (a full training
    checkpoint, whose other entries belong to other modules); otherwise the state dict as is."""
    if not any(key.startswith(prefix) for key in state_dict):
        return dict(state_dict)
    return {
        key[len(prefix) :]: value for key, value in state_dict.items() if key.startswith(prefix)
    }


def check_keys(model: nn.Module, state_dict: Mapping[str, Any], model_name: str) -> None:
    """Raises CheckpointKeyError naming every missing and unexpected key."""
    expected = set(model.state_dict())
    missing = sorted(expected - set(state_dict))
    unexpected = sorted(set(state_dict) - expected)
    if missing or unexpected:
        raise CheckpointKeyError(model_name, missing, unexpected)


def check_tensors(model: nn.Module, state_dict: Mapping[str, Any], model_name: str) -> None:
    """Raises ValueError naming the first entry that is not a tensor of the model's shape, or
    that holds NaN or Inf (weights that would make every output NaN)."""
    expected = model.state_dict()
    for key, value in state_dict.items():
        shape = tuple(expected[key].shape)
        if not isinstance(value, torch.Tensor) or value.shape != shape:
            tensor = isinstance(value, torch.Tensor)
            got = f"shape {tuple(value.shape)}" if tensor else type(value).__name__
            raise ValueError(f"{key!r} has {got}, the {model_name} expects shape {shape}")
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise ValueError(f"{key!r} holds NaN or Inf")


def load_checked(model: nn.Module, state_dict: Mapping[str, Any], model_name: str) -> None:
    check_keys(model, state_dict, model_name)
    check_tensors(model, state_dict, model_name)
    model.load_state_dict(state_dict)


def caface_state_dict(source: CheckpointSource) -> dict[str, Any]:
    """The released aggregator's entries of a CAFace source, keys without `aggregator.`."""
    return strip_prefix(read_state_dict(source), CAFACE_PREFIX)


def facecoresetnet_state_dict(source: CheckpointSource) -> dict[str, Any]:
    """The TemplateAggregateModel entries of a FaceCoresetNet source, keys without prefix."""
    return strip_prefix(read_state_dict(source), FACECORESETNET_PREFIX)


def load_caface_reference(source: CheckpointSource, num_heads: int = 8) -> CAFaceReference:
    """The eager CAFace reference in eval mode, configuration inferred from the keys."""
    state_dict = caface_state_dict(source)
    model = CAFaceReference(CAFaceConfig.from_state_dict(state_dict, num_heads))
    load_checked(model, state_dict, "released CAFace aggregator")
    return model.eval()


def load_facecoresetnet_reference(
    source: CheckpointSource, coreset_size: int = 3, num_heads: int = 8
) -> FaceCoresetNetReference:
    """The eager FaceCoresetNet reference in eval mode, width inferred from the keys."""
    state_dict = facecoresetnet_state_dict(source)
    model = FaceCoresetNetReference(infer_embedding_size(state_dict), num_heads, coreset_size)
    load_checked(model, state_dict, "released FaceCoresetNet")
    return model.eval()
