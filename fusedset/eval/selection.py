"""Eager quality-aware farthest point selection (FaceCoresetNet's core template selection).

This is the slot that ``fusedset.ops.quality_fps`` fills once that op exists: the core-mean
baseline calls ``quality_fps`` through this module, so swapping the implementation here
changes every caller."""

from __future__ import annotations

import torch


def quality_fps(features: torch.Tensor, k: int = 3, gamma: float = 1.0) -> torch.Tensor:
    """Indices of a core of ``min(k, N)`` images, in selection order.

    The first is the image of largest norm; each next one maximizes
    ``q^gamma * min_c (1 - cos(x, c)) / 2`` over the images not yet chosen, where c runs over
    the chosen ones and q = norm / largest norm of the template, so a core spreads over the
    template without taking poor (small-norm) images. Ties go to the lowest index.

    Args:
        features: (N, D) raw embeddings (norm included), N >= 1.
        k: core size.
        gamma: quality exponent (0: plain farthest point selection).

    Returns:
        (min(k, N),) int64 indices into ``features``.
    """
    norms = features.norm(dim=1)
    weight = (norms / norms.max()).pow(gamma)
    unit = features / norms.clamp_min(torch.finfo(features.dtype).tiny)[:, None]
    chosen = [int(norms.argmax())]
    distance = (1 - unit @ unit[chosen[0]]) / 2
    for _ in range(1, min(k, len(features))):
        score = weight * distance
        # A chosen image has distance 0, but so may exact duplicates: never pick one twice.
        score[chosen] = -1
        chosen.append(int(score.argmax()))
        distance = torch.minimum(distance, (1 - unit @ unit[chosen[-1]]) / 2)
    return torch.tensor(chosen, dtype=torch.int64)
