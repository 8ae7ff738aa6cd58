"""Small randomly initialized CAFace and FaceCoresetNet checkpoints in every layout the learned
fusion methods read: the released ones (bare state dict; the Lightning checkpoint with the
weights under a prefix, next to other modules' keys) and the one ``fusedset train`` writes."""

from __future__ import annotations

from pathlib import Path

import torch

from fusedset.nn import CAFace, FaceCoresetNet
from fusedset.reference.caface import CAFaceConfig
from fusedset.training import TrainConfig, TrainResult, save_checkpoint

LAYOUTS = ("bare", "lightning", "trained")
_PREFIX = {"caface": "aggregator.", "coreset": "aggregate_model."}


def random_modules(width: int, style_channels: int, seed: int = 0) -> dict[str, torch.nn.Module]:
    """caface and coreset modules in eval mode, their weights drawn from ``seed`` (the global
    generator's state is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        caface = CAFace(CAFaceConfig(confidence_dim=width, style_channels=style_channels))
        coreset = FaceCoresetNet(width)
    with torch.no_grad():
        # Fresh BatchNorms would standardize the norms by (0, 1); sets of norms around 10 need
        # statistics of that scale for the norm embedding to tell frames apart.
        caface.norm_emb.norm_bn.running_mean.fill_(10.0)
        caface.norm_emb.norm_bn.running_var.fill_(9.0)
        coreset.gamma.fill_(1.0)
    return {"caface": caface.eval(), "coreset": coreset.eval()}


def write_checkpoint(path: Path, method: str, model: torch.nn.Module, layout: str) -> Path:
    state = model.state_dict()
    if layout == "bare":
        torch.save(state, path)
    elif layout == "lightning":
        wrapped = {_PREFIX[method] + key: value for key, value in state.items()}
        wrapped["model.backbone.weight"] = torch.zeros(2, 2)  # another module's keys, ignored
        torch.save({"state_dict": wrapped, "epoch": 3}, path)
    else:
        save_checkpoint(path, method, TrainResult(model, [0.5, 0.4]), TrainConfig())
    return path
