"""A seeded synthetic surveillance benchmark in the IJB layout.

What it models (what the fusion papers are about): a gallery template is a few good stills; a
probe is a track of N video frames, N long-tailed, most of them poor. Frames come in shots
(bursts of near-duplicates that share their noise, so a long shot counts once, not N times),
shots in videos (media), a few good frames in a short glimpse decide the match, and a minority
of shots show someone else (tracker switches) or no face at all, with moderate norms.

Per frame, with quality q in [0, 1]:
    direction = normalize(c(q) * identity + sqrt(1 - c(q)^2) * noise),  c rising with q
    norm      = lerp(norm, q) * lognormal jitter     (margin-trained backbones: norm ~ quality)
    style     = per-channel spatial [mean, std]; darkness lowers the mean, blur lowers the std,
                and the two degradations share 1 - q, so the style statistics reveal q.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from fusedset.data.ijb import IJBMeta

# Frame kinds (SynthBenchmark.kind).
FACE, OTHER_IDENTITY, NON_FACE = 0, 1, 2

Split = Literal["eval", "train"]
SPLITS: tuple[Split, ...] = ("eval", "train")
_TRAIN_STREAM = 1  # the train split's random stream is default_rng([seed, _TRAIN_STREAM])


@dataclass(frozen=True)
class SynthConfig:
    """Parameters of the synthetic benchmark. Ranges ``(lo, hi)`` are uniform unless noted.

    Protocol:
        enrolled: identities with a gallery template (split alternately into galleries G1, G2)
            and one probe template each.
        unenrolled: identities with a probe only: 1:N open-set probes, 1:1 impostors (at
            least 100 so that FPIR 1% admits one false alarm).
        dim: embedding dimension. style_channels: channels of the style statistics.
    Gallery:
        gallery_images: images per gallery template (inclusive range), each its own media.
        gallery_quality: quality of gallery images.
    Probe size and structure:
        frames_median, frames_sigma: N ~ lognormal(log(median), sigma), clipped to
            frames_range; raise frames_range[1] to tens of thousands for large probes.
        shot_length_mean: shots (bursts) have geometric lengths with this mean.
        shots_per_video_mean: each shot starts a new video (media id) with probability
            1 / shots_per_video_mean.
        noise_shares: how a frame's noise variance splits into a part shared by the whole
            template (scene, camera, pose: averaging cannot remove it), a part shared by its
            shot (near-duplicate frames) and its own part; sums to 1.
    Quality:
        shot_quality_beta: quality of ordinary shots ~ Beta(a, b); the default mean is 0.26.
        frame_quality_jitter: std of a frame's quality around its shot's (stills included).
        glimpse_prob, glimpse_length, glimpse_quality: with this probability a probe contains
            one short shot (frames, inclusive range) of good quality.
        identity_cos: cosine of a frame to its identity at q = 0 and q = 1 (linear between).
        norm: embedding norm at q = 0 and q = 1 (linear between), times lognormal(0, norm_noise).
    Distractors (per shot):
        other_identity_rate, non_face_rate: probability that a probe shot shows another
            (random) identity, or a non-face (near one direction shared by all non-faces).
        distractor_quality: the quality that sets their cosine to their target and their norm.
    Style statistics:
        dark_strength, blur_strength: the fraction of the channel mean (std) lost at full
            darkness (blur); a shot's 1 - q splits between darkness and blur at random.
        style_noise: relative per-frame noise of the statistics.
    """

    enrolled: int = 300
    unenrolled: int = 100
    dim: int = 512
    style_channels: int = 384
    gallery_images: tuple[int, int] = (1, 5)
    gallery_quality: tuple[float, float] = (0.6, 1.0)
    frames_median: float = 30.0
    frames_sigma: float = 1.0
    frames_range: tuple[int, int] = (4, 2000)
    shot_length_mean: float = 8.0
    shots_per_video_mean: float = 4.0
    noise_shares: tuple[float, float, float] = (0.3, 0.6, 0.1)
    shot_quality_beta: tuple[float, float] = (1.2, 3.5)
    frame_quality_jitter: float = 0.05
    glimpse_prob: float = 0.7
    glimpse_length: tuple[int, int] = (1, 4)
    glimpse_quality: tuple[float, float] = (0.65, 0.95)
    identity_cos: tuple[float, float] = (0.0, 0.7)
    norm: tuple[float, float] = (4.0, 30.0)
    norm_noise: float = 0.1
    other_identity_rate: float = 0.08
    non_face_rate: float = 0.06
    distractor_quality: tuple[float, float] = (0.3, 0.6)
    dark_strength: float = 0.6
    blur_strength: float = 0.7
    style_noise: float = 0.05


@dataclass
class SynthBenchmark:
    """A generated benchmark: the protocol plus per-image arrays in feature-row order.

    Attributes:
        meta: the IJB-layout protocol (prefix ``synth``).
        features: (n, dim) float32 raw embeddings (norm included).
        style: (n, style_channels, 2) float32 spatial [mean, std].
        quality: (n,) float32 true quality in [0, 1].
        kind: (n,) int8, FACE, OTHER_IDENTITY or NON_FACE.
    """

    meta: IJBMeta
    features: np.ndarray
    style: np.ndarray
    quality: np.ndarray
    kind: np.ndarray


class _Shots:
    """Shot-level columns, appended template by template."""

    def __init__(self) -> None:
        self.columns: dict[str, list[np.ndarray]] = {
            k: [] for k in ("template", "media", "length", "quality", "target", "kind")
        }

    def add(self, **values: np.ndarray) -> None:
        for key, column in self.columns.items():
            column.append(np.asarray(values[key]))

    def arrays(self) -> dict[str, np.ndarray]:
        return {k: np.concatenate(v) for k, v in self.columns.items()}


def _shot_lengths(rng: np.random.Generator, frames: int, mean: float) -> np.ndarray:
    """Geometric shot lengths of the given mean, the last one cut so they sum to ``frames``."""
    lengths = rng.geometric(1.0 / mean, size=int(2 * frames / mean) + 4)
    while lengths.sum() < frames:
        lengths = np.concatenate([lengths, rng.geometric(1.0 / mean, size=len(lengths))])
    ends = np.cumsum(lengths)
    count = int(np.searchsorted(ends, frames)) + 1
    lengths = lengths[:count].copy()
    lengths[-1] -= ends[count - 1] - frames
    return lengths


def _add_probe(
    shots: _Shots,
    rng: np.random.Generator,
    cfg: SynthConfig,
    template: int,
    identity: int,
    identities: int,
    first_media: int,
) -> int:
    """Append one probe's shots; returns the next free media id."""
    frames = int(
        np.clip(
            round(rng.lognormal(np.log(cfg.frames_median), cfg.frames_sigma)), *cfg.frames_range
        )
    )
    glimpse = 0
    if rng.random() < cfg.glimpse_prob:
        glimpse = min(int(rng.integers(cfg.glimpse_length[0], cfg.glimpse_length[1] + 1)), frames)
    lengths = np.zeros(0, dtype=np.int64)
    if frames > glimpse:
        lengths = _shot_lengths(rng, frames - glimpse, cfg.shot_length_mean)
    n = len(lengths)
    # With a single identity there is nobody else to switch to.
    rates = [cfg.other_identity_rate if identities > 1 else 0.0, cfg.non_face_rate]
    kind = rng.choice(3, size=n, p=[1 - sum(rates), *rates])
    quality = np.where(
        kind == FACE,
        rng.beta(*cfg.shot_quality_beta, size=n),
        rng.uniform(*cfg.distractor_quality, size=n),
    )
    target = np.full(n, identity)
    switched = kind == OTHER_IDENTITY
    if switched.any():
        target[switched] = (
            identity + rng.integers(1, identities, size=switched.sum())
        ) % identities
    target[kind == NON_FACE] = -1
    if glimpse:
        at = int(rng.integers(0, n + 1))
        lengths = np.insert(lengths, at, glimpse)
        kind = np.insert(kind, at, FACE)
        quality = np.insert(quality, at, rng.uniform(*cfg.glimpse_quality))
        target = np.insert(target, at, identity)
    new_video = rng.random(len(lengths)) < 1.0 / cfg.shots_per_video_mean
    new_video[0] = True
    media = first_media + np.cumsum(new_video) - 1
    shots.add(
        template=np.full(len(lengths), template),
        media=media,
        length=lengths,
        quality=quality,
        target=target,
        kind=kind,
    )
    return int(media[-1]) + 1


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def generate(
    config: SynthConfig | None = None, seed: int = 0, split: Split = "eval"
) -> SynthBenchmark:
    """Generate the benchmark of ``config`` (defaults: ~20k images, a few seconds) for ``seed``.

    The same config, seed and split give bitwise the same benchmark. ``split="train"`` is the
    training set that goes with the ``"eval"`` benchmark of the same config and seed: it shares
    what a real backbone fixes (the direction non-faces fall near, the style statistics of a
    sharp, well-lit image) but draws its own identities, probes and noise from another random
    stream, so no evaluation identity is ever trained on.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    cfg = config or SynthConfig()
    rng = np.random.default_rng(seed)
    identities = cfg.enrolled + cfg.unenrolled
    centers = _unit(rng.standard_normal((identities, cfg.dim)))
    non_face_center = _unit(rng.standard_normal(cfg.dim))
    # Per channel, the spatial [mean, std] of a sharp, well-lit image.
    clean_style = np.stack(
        [rng.uniform(0.2, 1.0, cfg.style_channels), rng.uniform(0.5, 1.5, cfg.style_channels)],
        axis=-1,
    ).astype(np.float32)
    if split == "train":
        rng = np.random.default_rng([seed, _TRAIN_STREAM])
        centers = _unit(rng.standard_normal((identities, cfg.dim)))

    shots = _Shots()
    media = 1
    gallery_templates = np.arange(1, cfg.enrolled + 1)
    for identity, template in enumerate(gallery_templates):
        count = int(rng.integers(cfg.gallery_images[0], cfg.gallery_images[1] + 1))
        shots.add(
            template=np.full(count, template),
            media=np.arange(media, media + count),
            length=np.ones(count, dtype=np.int64),
            quality=rng.uniform(*cfg.gallery_quality, size=count),
            target=np.full(count, identity),
            kind=np.full(count, FACE),
        )
        media += count
    probe_templates = np.arange(cfg.enrolled + 1, cfg.enrolled + identities + 1)
    for identity, template in enumerate(probe_templates):
        media = _add_probe(shots, rng, cfg, int(template), identity, identities, media)

    s = shots.arrays()
    shot_of = np.repeat(np.arange(len(s["length"])), s["length"])
    n = len(shot_of)
    quality = np.clip(
        s["quality"][shot_of] + cfg.frame_quality_jitter * rng.standard_normal(n), 0.0, 1.0
    )
    target = s["target"][shot_of]
    anchor = np.where((target >= 0)[:, None], centers[np.maximum(target, 0)], non_face_center)
    templates = s["template"][shot_of]
    template_share, shot_share, frame_share = np.sqrt(cfg.noise_shares)
    noise = (
        template_share
        * rng.standard_normal((templates.max() + 1, cfg.dim), dtype=np.float32)[templates]
    )
    noise += (
        shot_share * rng.standard_normal((len(s["length"]), cfg.dim), dtype=np.float32)[shot_of]
    )
    noise += frame_share * rng.standard_normal((n, cfg.dim), dtype=np.float32)
    cos = cfg.identity_cos[0] + (cfg.identity_cos[1] - cfg.identity_cos[0]) * quality
    direction = _unit(cos[:, None] * anchor + np.sqrt(1 - cos**2)[:, None] * _unit(noise))
    norm = cfg.norm[0] + (cfg.norm[1] - cfg.norm[0]) * quality
    norm *= np.exp(cfg.norm_noise * rng.standard_normal(n))
    features = (direction * norm[:, None]).astype(np.float32)

    blur_share = rng.uniform(size=len(s["length"]))[shot_of]
    loss = (
        np.stack([cfg.dark_strength * (1 - blur_share), cfg.blur_strength * blur_share], axis=-1)
        * (1 - quality)[:, None]
    )
    jitter = rng.standard_normal((n, cfg.style_channels, 2), dtype=np.float32)
    style = clean_style * (1 - loss[:, None, :].astype(np.float32)) * (1 + cfg.style_noise * jitter)

    # Subject ids are identity + 1 (gallery template ids happen to coincide with them).
    gallery = np.stack([gallery_templates, gallery_templates], axis=1)
    probes = np.stack([probe_templates, np.arange(1, identities + 1)], axis=1)
    pair_probe, pair_gallery = np.meshgrid(probes[:, 0], gallery[:, 0], indexing="ij")
    same = probes[:, 1, None] == gallery[None, :, 1]
    pairs = np.stack([pair_probe.ravel(), pair_gallery.ravel(), same.ravel()], axis=1)
    meta = IJBMeta(
        prefix="synth",
        image_names=np.array([f"{i}.jpg" for i in range(n)]),
        templates=templates.astype(np.int64),
        medias=s["media"][shot_of].astype(np.int64),
        pairs=pairs.astype(np.int64),
        galleries={"G1": gallery[0::2], "G2": gallery[1::2]},
        probes=probes,
    )
    return SynthBenchmark(
        meta=meta,
        features=features,
        style=style,
        quality=quality.astype(np.float32),
        kind=s["kind"][shot_of].astype(np.int8),
    )
