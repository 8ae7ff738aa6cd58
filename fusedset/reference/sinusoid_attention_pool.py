"""sinusoid_attention_pool in eager PyTorch: every row's code and score in memory at once.

Row i of template b is the value ``v_i = row_scale_i x_i`` and, with the LayerNorm'd (no affine)
sinusoidal code ``e_i`` of its position, enters the scores of the R queries as
``s_ir = v_i . queries_r + e_i . position_queries_r``. The softmax over the rows of each
template (the first lengths[b]) weighs the values: ``pooled_r = sum_i softmax_i(s_ir) v_i``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fusedset.reference._sinusoid import encode_angles, frequency_divisors


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def zero_padding(
    valid: torch.Tensor, x: torch.Tensor, positions: torch.Tensor, row_scale: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """x, positions and row_scale of n rows with the rows where valid (B, n) is False zeroed:
    padding may hold anything, NaN included, and must reach no sum (nor its gradient)."""
    x = torch.where(valid[..., None], x, 0)
    positions = torch.where(valid, positions, 0)
    return x, positions, None if row_scale is None else torch.where(valid, row_scale, 0)


def attention_scores(
    x: torch.Tensor,
    queries: torch.Tensor,
    position_queries: torch.Tensor,
    positions: torch.Tensor,
    row_scale: torch.Tensor | None,
    position_scale: float,
    divisors: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(values (B, n, C), scores (B, n, R)) of n rows, in the accumulation dtype; channel pair
    k of the codes is sin, cos of ``positions * position_scale / divisors[k]``."""
    acc = accumulation_dtype(x.dtype)
    values = x.to(acc)
    if row_scale is not None:
        values = values * row_scale.to(acc)[..., None]
    angles = (positions.to(acc) * position_scale)[..., None] / divisors.to(acc)
    width = position_queries.shape[-1]
    code = F.layer_norm(encode_angles(angles), (width,), eps=eps)
    scores = values @ queries.to(acc).transpose(1, 2)
    return values, scores + code @ position_queries.to(acc).transpose(1, 2)


def sinusoid_attention_pool(
    x: torch.Tensor,
    queries: torch.Tensor,
    position_queries: torch.Tensor,
    positions: torch.Tensor,
    row_scale: torch.Tensor | None = None,
    lengths: torch.Tensor | None = None,
    position_scale: float = 1.0,
    temperature: float = 10000.0,
    eps: float = 1e-5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(pooled (B, R, C), logsumexp (B, R)); see fusedset.ops.sinusoid_attention_pool."""
    if lengths is not None:
        valid = torch.arange(x.shape[1], device=x.device) < lengths.to(x.device)[:, None]
        x, positions, row_scale = zero_padding(valid, x, positions, row_scale)
    divisors = frequency_divisors(
        position_queries.shape[-1], temperature, accumulation_dtype(x.dtype), x.device
    )
    values, scores = attention_scores(
        x, queries, position_queries, positions, row_scale, position_scale, divisors, eps
    )
    if lengths is not None:
        scores = scores.masked_fill(~valid[..., None], float("-inf"))
    weights = torch.softmax(scores, dim=1)
    return weights.transpose(1, 2) @ values, torch.logsumexp(scores, dim=1)
