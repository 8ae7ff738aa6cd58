"""Verification and identification metrics, in the insightface IJB conventions.

ROC points come from ``sklearn.metrics.roc_curve`` with every threshold kept
(``drop_intermediate=False``): dropping collinear points could drop the operating point itself.
TAR at a FAR is the largest TPR over the thresholds whose FPR is at most that FAR.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from sklearn.metrics import roc_curve

FARS: tuple[float, ...] = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


def roc(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr), both non-decreasing, one point per distinct score plus (0, 0).

    Args:
        labels: (P,) 1 for genuine (same subject) pairs, 0 for impostors; both must occur.
        scores: (P,) similarity, higher meaning more alike.
    """
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    return fpr, tpr


def tar_at_far(
    labels: np.ndarray, scores: np.ndarray, fars: Sequence[float] = FARS
) -> dict[float, float]:
    """TAR at each FAR: the largest TPR among thresholds with FPR <= FAR."""
    return tar_from_roc(*roc(labels, scores), fars)


def tar_from_roc(
    fpr: np.ndarray, tpr: np.ndarray, fars: Sequence[float] = FARS
) -> dict[float, float]:
    """``tar_at_far`` of an ROC already computed by ``roc``."""
    # fpr starts at 0 and tpr is non-decreasing, so the last point with fpr <= far is the answer.
    last = np.searchsorted(fpr, np.asarray(fars, dtype=np.float64), side="right") - 1
    return {far: float(tpr[i]) for far, i in zip(fars, last, strict=True)}


@dataclass
class Identification:
    """1:N results over the probes.

    Attributes:
        ranks: rank r -> fraction of mated probes (subject enrolled) whose subject is among
            the r best-scoring gallery subjects.
        tpir: TPIR at FPIR = ``fpir`` (fraction of mated probes identified at rank 1 with a
            score above the threshold that at most that fraction of non-mated probes reach);
            None without non-mated (open-set) probes.
        fpir: the FPIR of ``tpir``.
        mated, non_mated: probe counts.
    """

    ranks: dict[int, float]
    tpir: float | None
    fpir: float
    mated: int
    non_mated: int


def identification(
    probes: np.ndarray,
    probe_subjects: np.ndarray,
    gallery: np.ndarray,
    gallery_subjects: np.ndarray,
    ranks: Sequence[int] = (1, 5),
    fpir: float = 0.01,
    chunk: int = 2048,
) -> Identification:
    """Closed-set ranks and open-set TPIR at FPIR.

    A subject's score is its best gallery template's; ties rank in the probe's favour.

    Args:
        probes: (Q, D) unit descriptors. probe_subjects: (Q,) their subject ids.
        gallery: (G, D) unit descriptors. gallery_subjects: (G,) their subject ids.
        chunk: probes scored at a time (bounds memory).
    """
    subjects, column = np.unique(gallery_subjects, return_inverse=True)
    mated = np.isin(probe_subjects, subjects)
    if not mated.any():
        raise ValueError("no probe subject is enrolled in the gallery")
    # Non-mated probes get some column too; their rank is discarded.
    true_column = np.searchsorted(subjects, probe_subjects).clip(max=len(subjects) - 1)
    rank = np.empty(len(probes), dtype=np.int64)
    top = np.empty(len(probes))
    # Probes in chunks: IJB-C's 19.5k x 3.5k score matrix, twice, would take over 1 GB.
    for start in range(0, len(probes), chunk):
        end = min(start + chunk, len(probes))
        similarity = probes[start:end] @ gallery.T
        by_subject = np.full((end - start, len(subjects)), -np.inf)
        np.maximum.at(by_subject, (slice(None), column), similarity)
        true_score = by_subject[np.arange(end - start), true_column[start:end]]
        rank[start:end] = 1 + (by_subject > true_score[:, None]).sum(axis=1)
        top[start:end] = by_subject.max(axis=1)
    rank = rank[mated]
    tpir = None
    if (~mated).any():
        hit = rank == 1
        if hit.any():
            labels = np.concatenate([np.ones(hit.sum()), np.zeros((~mated).sum())])
            scores = np.concatenate([top[mated][hit], top[~mated]])
            # Probes missed at rank 1 are misses at every threshold: scale the hit-only TPR.
            tpir = tar_at_far(labels, scores, [fpir])[fpir] * hit.mean()
        else:
            tpir = 0.0
    return Identification(
        ranks={r: float((rank <= r).mean()) for r in ranks},
        tpir=tpir,
        fpir=fpir,
        mated=int(mated.sum()),
        non_mated=int((~mated).sum()),
    )
