"""Training the fusion modules on frozen features (``fusedset train``).

The data are the templates of an IJB-layout benchmark whose 1:N lists name each template's
subject. The target of a template is its subject's center, estimated from the same frozen
features: the average over the subject's templates of each template's norm-weighted mean
direction (a template counts once however many frames it has; the norm, a margin-trained
backbone's quality signal, lets good frames dominate). No label beyond the subject id is used.

Losses, as in the papers:

- CAFace: the cosine distance of the fused feature to the center, plus the consistency of the
  chunked (memory mode) fusion of the same frames with the one-shot fusion, so that a probe
  streamed in chunks lands where the whole set would.
- FaceCoresetNet: the cosine distance of the fused descriptor to the center, with the
  training-mode (Gumbel straight-through) core selection.

Both run the fast modules of ``fusedset.nn`` in train mode, so the fused kernels carry the
forward and backward passes. AdamW with a step decay of the learning rate; a batch holds
templates of similar size, each cut to a random subset of at most ``max_frames`` frames.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fusedset.data.ijb import IJBMeta, MetaFileError, template_groups
from fusedset.methods.registry import canonical_name
from fusedset.nn.checkpoints import CHECKPOINT_KEY

LearnedMethod = Literal["caface", "coreset"]
METHODS: tuple[LearnedMethod, ...] = ("caface", "coreset")


@dataclass(frozen=True)
class TrainConfig:
    """How a fusion module is trained.

    Attributes:
        epochs: passes over the training templates.
        batch_size: templates per step.
        max_frames: frames drawn (without replacement) from a template per step; a batch takes
            as many from each of its templates as its smallest one has, up to this.
        lr: AdamW learning rate at the start.
        weight_decay: AdamW weight decay.
        lr_milestones: fractions of the epochs after which the learning rate drops by
            ``lr_decay``.
        lr_decay: the factor of each drop.
        consistency_weight: CAFace: weight of the chunked-vs-one-shot consistency loss.
        chunks: CAFace: the chunked pass splits each set into a number of chunks drawn from
            this inclusive range.
        coreset_size: FaceCoresetNet: K, the core template size.
        initial_gamma: FaceCoresetNet: the quality exponent of the selection at the start
            (see ``build_model``).
        seed: seeds the model initialization, the batches and the frame subsets.
    """

    epochs: int = 12
    batch_size: int = 32
    max_frames: int = 64
    lr: float = 3e-4
    weight_decay: float = 0.05
    lr_milestones: tuple[float, ...] = (0.6, 0.85)
    lr_decay: float = 0.1
    consistency_weight: float = 1.0
    chunks: tuple[int, int] = (2, 4)
    coreset_size: int = 3
    initial_gamma: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "max_frames", "coreset_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.weight_decay < 0 or not 0 < self.lr_decay <= 1:
            raise ValueError(
                "lr must be positive, weight_decay non-negative and lr_decay in (0, 1]"
            )
        if not 2 <= self.chunks[0] <= self.chunks[1]:
            raise ValueError(f"chunks must be a range (lo, hi), 2 <= lo <= hi, got {self.chunks}")


@dataclass
class TrainingSet:
    """Templates with a subject, as tensors.

    Attributes:
        features: per template, (n, D) float32 raw embeddings.
        style: per template, (n, C, 2) float32 style statistics; None without style.
        targets: (T, D) unit center of each template's subject.
    """

    features: list[torch.Tensor]
    style: list[torch.Tensor] | None
    targets: torch.Tensor

    @property
    def sizes(self) -> np.ndarray:
        return np.array([len(f) for f in self.features])


def subjects_of(meta: IJBMeta) -> dict[int, int]:
    """Template id -> subject id, from the 1:N gallery and probe lists."""
    if meta.probes is None:
        raise MetaFileError(
            f"training needs subject ids, from the 1:N lists ({meta.prefix}_1N_gallery_*.csv, "
            f"{meta.prefix}_1N_probe_mixed.csv), which the meta directory lacks"
        )
    rows = np.concatenate([*meta.galleries.values(), meta.probes])
    return dict(zip(rows[:, 0].tolist(), rows[:, 1].tolist(), strict=True))


def training_set(meta: IJBMeta, features: np.ndarray, style: np.ndarray | None) -> TrainingSet:
    """The templates of ``meta`` that have a subject, with their subjects' centers."""
    if len(features) != len(meta.templates):
        raise MetaFileError(
            f"the features have {len(features)} rows but {meta.prefix}_face_tid_mid.txt lists "
            f"{len(meta.templates)} images"
        )
    subject_of = subjects_of(meta)
    ids, groups = template_groups(meta.templates)
    kept = [
        (subject_of[t], rows)
        for t, rows in zip(ids.tolist(), groups, strict=True)
        if t in subject_of
    ]
    if not kept:
        raise MetaFileError("no template of face_tid_mid.txt has a subject in the 1:N lists")
    template_features = [torch.from_numpy(features[rows]) for _, rows in kept]
    template_style = None if style is None else [torch.from_numpy(style[rows]) for _, rows in kept]
    subjects, subject_index = np.unique([s for s, _ in kept], return_inverse=True)
    directions = torch.stack([F.normalize(f.double().sum(0), dim=0) for f in template_features])
    centers = directions.new_zeros(len(subjects), directions.shape[1])
    centers.index_add_(0, torch.from_numpy(subject_index), directions)
    targets = F.normalize(centers, dim=1)[torch.from_numpy(subject_index)].float()
    return TrainingSet(template_features, template_style, targets)


def batches(sizes: np.ndarray, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """One epoch of template batches: shuffled, then sorted by size within runs of eight
    batches so that a batch's templates are alike in size and lose few frames to the smallest."""
    order = rng.permutation(len(sizes))
    run = 8 * batch_size
    for start in range(0, len(order), run):
        part = order[start : start + run]
        order[start : start + run] = part[np.argsort(sizes[part], kind="stable")]
    epoch = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    return [epoch[i] for i in rng.permutation(len(epoch))]


def draw_frames(
    data: TrainingSet, batch: np.ndarray, max_frames: int, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B, n, D) features and (B, n, C, 2) style: n random frames of each template of the
    batch, n = min(max_frames, smallest template of the batch), frames in template order."""
    n = min(max_frames, int(data.sizes[batch].min()))
    picks = [np.sort(rng.choice(len(data.features[t]), n, replace=False)) for t in batch]
    features = torch.stack([data.features[t][p] for t, p in zip(batch, picks, strict=True)])
    if data.style is None:
        return features, None
    style = torch.stack([data.style[t][p] for t, p in zip(batch, picks, strict=True)])
    return features, style


def cosine_distance(fused: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return 1 - F.cosine_similarity(fused, target, dim=-1).mean()


def build_model(method: LearnedMethod, data: TrainingSet, config: TrainConfig) -> nn.Module:
    """A freshly initialized fast module for the width (and style channels) of the data.

    FaceCoresetNet starts at gamma = ``config.initial_gamma``: at the released initial 0.01
    the training-mode selection logits q^gamma (1 - cos) / 2 stay below the Gumbel noise, the
    picks are random, gamma gets no useful gradient, and the evaluation's argmax picks the
    frames farthest from the rest (distractors) instead of the good ones."""
    from fusedset.nn import CAFace, FaceCoresetNet
    from fusedset.reference.caface import CAFaceConfig

    width = data.features[0].shape[1]
    if method == "caface":
        if data.style is None:
            raise ValueError("CAFace trains on style statistics, and the training set has none")
        channels = data.style[0].shape[1]
        return CAFace(CAFaceConfig(confidence_dim=width, style_channels=channels))
    model = FaceCoresetNet(width, coreset_size=config.coreset_size)
    with torch.no_grad():
        model.gamma.fill_(config.initial_gamma)
    return model


def caface_loss(
    model: nn.Module,
    features: torch.Tensor,
    style: torch.Tensor,
    target: torch.Tensor,
    chunk_count: int,
    consistency_weight: float,
) -> torch.Tensor:
    """Cosine distance of the one-shot fusion to the target, plus ``consistency_weight`` times
    the cosine distance of the chunked fusion (``chunk_count`` chunks, the released memory
    mode) to the one-shot fusion."""
    one_shot = model(features, style)
    loss = cosine_distance(one_shot, target)
    n = features.shape[1]
    if consistency_weight and n >= chunk_count:
        stream = model.stream(len(features), "official", chunk_size=math.ceil(n / chunk_count))
        chunked = stream.update(features, style).result()
        loss = loss + consistency_weight * cosine_distance(chunked, one_shot)
    return loss


def coreset_loss(model: nn.Module, features: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cosine distance of the descriptor (training-mode selection) to the target."""
    descriptor, _ = model.forward_features(features)
    return cosine_distance(descriptor, target)


@dataclass
class TrainResult:
    model: nn.Module  # in eval mode
    epoch_losses: list[float] = field(default_factory=list)  # mean training loss per epoch


def train(
    method: LearnedMethod,
    data: TrainingSet,
    config: TrainConfig | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train a fresh ``method`` module on ``data``. With one torch thread, the same data and
    config give bitwise the same weights. The global torch generator, which the initialization,
    dropout and the selection's Gumbel noise draw from, is seeded from ``config.seed`` for the
    run and restored afterwards. ``method`` may also be an alias (``facecoresetnet``)."""
    method = canonical_name(method)
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    config = config or TrainConfig()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        return _train(method, data, config, progress)


def _train(
    method: LearnedMethod, data: TrainingSet, config: TrainConfig, progress: bool
) -> TrainResult:
    from tqdm import tqdm

    rng = np.random.default_rng(config.seed)
    model = build_model(method, data, config).train()
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.lr, weight_decay=config.weight_decay
    )
    milestones = sorted({max(1, round(f * config.epochs)) for f in config.lr_milestones})
    schedule = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, config.lr_decay)
    result = TrainResult(model)
    bar = tqdm(range(config.epochs), desc=f"train {method}", unit="epoch", disable=not progress)
    for _ in bar:
        total, steps = 0.0, 0
        for batch in batches(data.sizes, config.batch_size, rng):
            features, style = draw_frames(data, batch, config.max_frames, rng)
            target = data.targets[batch]
            if method == "caface":
                chunk_count = int(rng.integers(config.chunks[0], config.chunks[1] + 1))
                loss = caface_loss(
                    model, features, style, target, chunk_count, config.consistency_weight
                )
            else:
                loss = coreset_loss(model, features, target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item()
            steps += 1
        result.epoch_losses.append(total / steps)
        bar.set_postfix(loss=f"{total / steps:.4f}", lr=f"{schedule.get_last_lr()[0]:.1e}")
        schedule.step()
    model.eval()
    return result


def save_checkpoint(
    path: str | Path, method: LearnedMethod, result: TrainResult, config: TrainConfig, **info: Any
) -> Path:
    """A checkpoint that ``CAFace.from_official`` / ``FaceCoresetNet.from_official`` read (the
    weights under ``state_dict``, as in a Lightning checkpoint), with what trained it under
    ``fusedset``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "method": canonical_name(method),
        "config": asdict(config),
        "epoch_losses": result.epoch_losses,
    }
    torch.save({"state_dict": result.model.state_dict(), CHECKPOINT_KEY: meta | info}, path)
    return path
