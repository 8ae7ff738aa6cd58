"""Cross-attention of a few queries over a long set with the key and value projections folded
into the queries (GUIDE section 1), so that the N keys and values are never projected.

Per query q and head h, with W^h the head's rows of a projection:
    score_i = (W_q^h q + b_q^h) . (W_k^h k_i + b_k^h) / sqrt(d)
            = u^{qh} . k_i + const,   u^{qh} = (W_k^h)^T (W_q^h q + b_q^h) / sqrt(d)
(the constant is the same for every i and cancels in the softmax over i), and
    sum_i a_i (W_v^h v_i + b_v^h) = W_v^h (sum_i a_i v_i) + b_v^h sum_i a_i.
That is O(N C) per query and head instead of O(N C^2) for the projections. The softmax over i
runs online over chunks of N (running max, sum and weighted sum of v), which is exact and keeps
the extra memory at O(chunk * C) whatever N is.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeAlias

import torch
import torch.nn.functional as F
from torch import nn

# For keys `key + e` whose e (a function of a few numbers per key) is cheaper to score than to
# build: given the folded queries u (B, R, C) (R = queries x heads), a function of a range of
# keys (start, stop) -> the scores u . e_i (B, stop - start, R), up to a constant per (b, r).
KeyOffset: TypeAlias = Callable[[torch.Tensor], Callable[[int, int], torch.Tensor]]

DEFAULT_CHUNK_SIZE = 1024


def check_plain(attention: nn.MultiheadAttention) -> None:
    """The folded forms need a plain nn.MultiheadAttention: one in_proj, no bias_k/bias_v, no
    add_zero_attn."""
    if not attention._qkv_same_embed_dim or attention.bias_k is not None or attention.add_zero_attn:
        raise ValueError(
            "folded_cross_attention needs a plain nn.MultiheadAttention (one in_proj, no "
            "bias_k/bias_v, no add_zero_attn)"
        )


def fold_queries(query: torch.Tensor, attention: nn.MultiheadAttention) -> torch.Tensor:
    """query (B, Q, C) -> the folded queries u (B, Q * heads, C), row q * heads + h being
    u^{qh} = (W_k^h)^T (W_q^h q + b_q^h) / sqrt(d): the score of key k_i is u^{qh} . k_i."""
    check_plain(attention)
    batch, num_queries, width = query.shape
    heads = attention.num_heads
    head_dim = width // heads
    w_q, w_k, _ = attention.in_proj_weight.chunk(3)
    b_q, _, _ = attention.in_proj_bias.chunk(3)
    projected = F.linear(query, w_q, b_q).view(batch, num_queries, heads, head_dim)
    folded = torch.einsum(
        "bqhd,hdc->bqhc", projected * head_dim**-0.5, w_k.view(heads, head_dim, width)
    )
    return folded.reshape(batch, num_queries * heads, width)


def project_pooled(
    mean_value: torch.Tensor,
    attention: nn.MultiheadAttention,
    bias_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """mean_value (B, Q * heads, C), sum_i a_i v_i per (query, head) with the attention weights
    a, -> the attention's output (B, Q, C): each head's value projection of it, then out_proj.
    bias_weight (B, Q * heads): sum_i a_i, which scales b_v (1 when omitted; with dropout the
    kept weights need not sum to 1)."""
    batch, rows, width = mean_value.shape
    heads = attention.num_heads
    num_queries, head_dim = rows // heads, width // heads
    _, _, w_v = attention.in_proj_weight.chunk(3)
    _, _, b_v = attention.in_proj_bias.chunk(3)
    heads_out = torch.einsum(
        "bqhc,hdc->bqhd",
        mean_value.view(batch, num_queries, heads, width),
        w_v.view(heads, head_dim, width),
    )
    bias = b_v.view(heads, head_dim)
    if bias_weight is not None:
        bias = bias_weight.view(batch, num_queries, heads, 1) * bias
    return attention.out_proj((heads_out + bias).reshape(batch, num_queries, width))


def folded_cross_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention: nn.MultiheadAttention,
    lengths: torch.Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    key_offset: KeyOffset | None = None,
) -> torch.Tensor:
    """`attention(query, key + e, value, need_weights=False)[0]` for a batch_first
    nn.MultiheadAttention with its in_proj/out_proj weights: query (B, Q, C), key and value
    (B, N, C) -> (B, Q, C); e is the term `key_offset` scores (none when omitted). `lengths`
    (B,): only the first lengths[b] keys and values of template b exist (each >= 1); the rest
    are never attended to, whatever they hold. Attention dropout applies when `attention` is in
    train mode, as in nn.MultiheadAttention."""
    num_keys = value.shape[1]
    dropout = attention.dropout if attention.training else 0.0
    folded = fold_queries(query, attention)
    folded_t = folded.transpose(1, 2)
    offset_scores = None if key_offset is None else key_offset(folded)

    # Scores are laid out (B, keys, R) so that a chunk's rows stay contiguous.
    running_max = running_sum = weighted = value_mass = None
    for start in range(0, num_keys, chunk_size):
        stop = min(start + chunk_size, num_keys)
        values = value[:, start:stop]
        scores = key[:, start:stop] @ folded_t
        if offset_scores is not None:
            scores = scores + offset_scores(start, stop)
        if lengths is not None:
            padded = torch.arange(start, stop, device=value.device) >= lengths[:, None]
            if bool(padded.any()):
                scores = scores.masked_fill(padded[..., None], float("-inf"))
                # 0 * NaN is NaN: padded rows must hold zeros, not merely get zero weight.
                values = values.masked_fill(padded[..., None], 0)
        chunk_max = scores.amax(dim=1, keepdim=True)
        # Padding is a suffix, so chunk 0 has a valid key in every template: the max is finite.
        new_max = chunk_max if running_max is None else torch.maximum(running_max, chunk_max)
        weights = torch.exp(scores - new_max)
        chunk_sum = weights.sum(dim=1, keepdim=True)
        if dropout > 0:
            weights = F.dropout(weights, dropout)
            chunk_mass = weights.sum(dim=1, keepdim=True)
        else:
            chunk_mass = chunk_sum
        chunk_weighted = weights.transpose(1, 2) @ values
        if running_max is None:
            running_sum, weighted, value_mass = chunk_sum, chunk_weighted, chunk_mass
        else:
            rescale = torch.exp(running_max - new_max)
            running_sum = running_sum * rescale + chunk_sum
            weighted = weighted * rescale.transpose(1, 2) + chunk_weighted
            value_mass = value_mass * rescale + chunk_mass
        running_max = new_max

    mean_value = weighted / running_sum.transpose(1, 2)
    return project_pooled(mean_value, attention, (value_mass / running_sum).squeeze(1))
