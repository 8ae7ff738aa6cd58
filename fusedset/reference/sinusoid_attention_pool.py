"""sinusoid_attention_pool in eager PyTorch: every row's code and score in memory at once.

Row i of template b is the value ``v_i = row_scale_i x_i`` and, with the LayerNorm'd (no affine)
sinusoidal code ``e_i`` of its position, enters the scores of the R queries as
``s_ir = v_i . queries_r + e_i . position_queries_r``. The softmax over the rows of each
template (the first lengths[b]) weighs the values: ``pooled_r = sum_i softmax_i(s_ir) v_i``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fusedset._dtypes import accumulation_dtype
from fusedset.reference._sinusoid import encode_angles, frequency_divisors


def zero_padding(
    valid: torch.Tensor, x: torch.Tensor, positions: torch.Tensor, row_scale: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """x, positions and row_scale of n rows with the rows where valid (B, n) is False zeroed:
    padding may hold anything, NaN included, and must reach no sum (nor its gradient)."""
    x = torch.where(valid[..., None], x, 0)
    positions = torch.where(valid, positions, 0)
    return x, positions, None if row_scale is None else torch.where(valid, row_scale, 0)


def code_angles(
    positions: torch.Tensor, position_scale: float, divisors: torch.Tensor
) -> torch.Tensor:
    """(B, n) positions -> (B, n, D/2) angles ``positions * position_scale / divisors[k]`` in
    the positions' dtype, as torch forms them in the released code."""
    return (positions * position_scale)[..., None] / divisors.to(positions.dtype)


def attention_scores(
    x: torch.Tensor,
    queries: torch.Tensor,
    position_queries: torch.Tensor,
    angles: torch.Tensor,
    row_scale: torch.Tensor | None,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(values (B, n, C), scores (B, n, R)) of n rows in the accumulation dtype; channel pair k
    of the codes is sin, cos of ``angles[..., k]``."""
    acc = accumulation_dtype(x.dtype)
    values = x.to(acc)
    if row_scale is not None:
        values = values * row_scale.to(acc)[..., None]
    width = position_queries.shape[-1]
    code = F.layer_norm(encode_angles(angles.to(acc)), (width,), eps=eps)
    scores = values @ queries.to(acc).transpose(1, 2)
    return values, scores + code @ position_queries.to(acc).transpose(1, 2)


def softmax_pool(
    values: torch.Tensor, scores: torch.Tensor, lengths: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(pooled (B, R, C), logsumexp (B, R)) of values (B, N, C) under the softmax over the
    first lengths[b] rows of scores (B, N, R)."""
    if lengths is not None:
        valid = torch.arange(scores.shape[1], device=scores.device) < lengths[:, None]
        scores = scores.masked_fill(~valid[..., None], float("-inf"))
    weights = torch.softmax(scores, dim=1)
    return weights.transpose(1, 2) @ values, torch.logsumexp(scores, dim=1)


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
    divisors = frequency_divisors(
        position_queries.shape[-1], temperature, accumulation_dtype(x.dtype), x.device
    )
    return pool(x, queries, position_queries, positions, divisors, position_scale, eps,
                row_scale, lengths)  # fmt: skip


def pool(
    x: torch.Tensor,
    queries: torch.Tensor,
    position_queries: torch.Tensor,
    positions: torch.Tensor,
    divisors: torch.Tensor,
    position_scale: float,
    eps: float,
    row_scale: torch.Tensor | None = None,
    lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """sinusoid_attention_pool with the arguments of torch.ops.fusedset.sinusoid_attention_pool
    (the frequency divisors given)."""
    if lengths is not None:
        lengths = lengths.to(x.device)
        valid = torch.arange(x.shape[1], device=x.device) < lengths[:, None]
        x, positions, row_scale = zero_padding(valid, x, positions, row_scale)
    angles = code_angles(positions.to(accumulation_dtype(x.dtype)), position_scale, divisors)
    values, scores = attention_scores(x, queries, position_queries, angles, row_scale, eps)
    return softmax_pool(values, scores, lengths)
