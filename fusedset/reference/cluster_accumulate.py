from __future__ import annotations

import torch

from fusedset._dtypes import accumulation_dtype

NORM_EPS = 1e-5


def default_scale(d: int) -> float:
    """``d ** -0.5``, and 1 for d = 0: there every logit is an empty dot product, 0 whatever the
    scale, so any finite value gives the same (even) assignment."""
    return d**-0.5 if d > 0 else 1.0


def cluster_accumulate(
    keys: torch.Tensor,
    queries: torch.Tensor,
    values: torch.Tensor,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """num = softmax_M(Q K^T * scale) V (B, M, C) and den = its row sums (B, M), as the eager
    composition (matmul, softmax, matmul, sum) in float32 (float64 for float64 inputs)."""
    acc = accumulation_dtype(keys.dtype)
    if scale is None:
        scale = default_scale(keys.shape[-1])
    logits = queries.to(acc) @ keys.to(acc).transpose(1, 2) * scale
    assignment = logits.softmax(dim=1)
    return assignment @ values.to(acc), assignment.sum(-1)


def cluster_accumulate_caface(
    tokens: torch.Tensor,
    features: torch.Tensor,
    centers: torch.Tensor,
    center_bias: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CAFace's form through the plain one: the bias is one more key dimension whose key is 1,
    and the two value streams (normalized features, tokens) are one concatenated stream."""
    acc = accumulation_dtype(tokens.dtype)
    ones = tokens.new_ones(*tokens.shape[:-1], 1)
    keys = torch.cat([tokens, ones], -1)
    queries = torch.cat([centers, center_bias.unsqueeze(-1)], -1)
    if queries.dim() == 2:
        queries = queries.unsqueeze(0)
    f = features.to(acc)
    unit = f / (torch.linalg.vector_norm(f, dim=-1, keepdim=True) + NORM_EPS)
    num, den = cluster_accumulate(keys, queries, torch.cat([unit, tokens.to(acc)], -1), scale)
    c = features.shape[-1]
    return num[..., :c], num[..., c:], den
