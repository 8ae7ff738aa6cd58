"""Eager reference of the released FaceCoresetNet (ligaripash/FaceCoresetNet,
`TemplateAggregateModel`).

Parameter names are the released keys, including the parameters the forward pass never reads, so
a released state dict round-trips with strict=True. The pieces fused code replaces:

    select_core_template  quality-aware farthest point selection (fusedset.ops.quality_fps)
    cross_attention       the core template attending over the whole template (multihead_attn1)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from fusedset.reference._sinusoid import sinusoidal_encoding
from fusedset.reference.quality_fps import quality_fps


class CoreTemplate(NamedTuple):
    features: torch.Tensor  # (B, K, C): the selected unnormalized features, in selection order
    indices: torch.Tensor  # (B, K) int64


class FaceCoresetNetOutput(NamedTuple):
    aggregated: torch.Tensor  # (B, C), unit norm
    aggregated_norm: torch.Tensor  # (B, 1)
    core_template: torch.Tensor  # (B, K, C)
    selected_indices: torch.Tensor  # (B, K)
    fps_only_mean: torch.Tensor  # (B, C): mean of the core template ("selection only")


def select_core_template(
    features: torch.Tensor,
    norms: torch.Tensor,
    k: int,
    gamma: torch.Tensor | float,
    *,
    training: bool = False,
    noise: torch.Tensor | None = None,
) -> CoreTemplate:
    """Quality-aware farthest point selection of min(k, N) of the N features (B, N, C).

    The first pick is the largest norm; each next one the largest
    d_i = min over picked s of norms_i^gamma * (1 - cos(x_i, x_s)) / 2.
    `norms` (B, N) is the quality signal (the released model passes the given norms, equal to
    ||x_i||). Eval: the picks of ``fusedset.reference.quality_fps`` on the directions scaled by
    `norms` (the released gumbel_softmax(1e4 * logits, tau=1e-10, hard=True) is that argmax
    unless two logits lie within about 1e-3 of each other; the argmax keeps the reference
    deterministic). Training: see `_training_selection`.
    """
    if training:
        return _training_selection(features, norms, k, gamma, noise)
    with torch.no_grad():
        indices = quality_fps(F.normalize(features, dim=-1), k, gamma, row_scale=norms)
    rows = features.gather(1, indices[..., None].expand(-1, -1, features.shape[-1]))
    return CoreTemplate(rows, indices)


def _training_selection(
    features: torch.Tensor,
    norms: torch.Tensor,
    k: int,
    gamma: torch.Tensor | float,
    noise: torch.Tensor | None,
) -> CoreTemplate:
    """The released training-mode loop, kept apart from ``fusedset.reference.quality_fps``
    because its semantics differ: a row picked earlier may be picked again (its distance is 0,
    but the Gumbel noise can still make it the largest), which the op never does.

    Scale 1, tau 1, hard one-hot forward with the straight-through gradient of the soft sample,
    as gumbel_softmax(hard=True). `noise` (k, B, N): standard Gumbel samples (drawn when
    omitted). A picked row is formed as x^T y from the one-hot y, as released, so that gradients
    reach the features, the norms and gamma through y.
    """
    k = min(k, features.shape[1])
    units = F.normalize(features, dim=-1)
    quality = norms.pow(gamma)
    logits = norms
    rows, indices = [], []
    for step in range(k):
        gumbel = -torch.empty_like(logits).exponential_().log() if noise is None else noise[step]
        soft = torch.softmax(logits + gumbel, dim=-1)
        hard = F.one_hot(soft.argmax(dim=-1), logits.shape[-1]).to(soft.dtype)
        one_hot = hard - soft.detach() + soft
        row = torch.einsum("bn,bnc->bc", one_hot, features)
        rows.append(row)
        indices.append(one_hot.argmax(dim=-1))
        if step + 1 < k:
            cosine = (units @ F.normalize(row, dim=-1)[..., None]).squeeze(-1)
            distance = quality * (1 - cosine) / 2
            logits = distance if step == 0 else torch.minimum(logits, distance)
    return CoreTemplate(torch.stack(rows, dim=1), torch.stack(indices, dim=1))


def infer_embedding_size(state_dict: Mapping[str, torch.Tensor]) -> int:
    """The feature width C of a released TemplateAggregateModel state dict."""
    if "pos_trans_norm.weight" not in state_dict:
        raise ValueError(
            "cannot infer the FaceCoresetNet width: the state dict has no key "
            "'pos_trans_norm.weight'"
        )
    weight = state_dict["pos_trans_norm.weight"]
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1:
        got = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(
            f"cannot infer the FaceCoresetNet width: 'pos_trans_norm.weight' must be a vector, "
            f"got {got}"
        )
    return weight.shape[0]


class DecoderLayer(nn.Module):
    """The released `TransformerDecoderLayerOrig` layout. Its forward pass uses self_attn1,
    multihead_attn1, norm1 and norm2; self_attn2, multihead_attn2/3 and norm3/4 are kept only so
    that released state dicts load strictly and round-trip."""

    def __init__(self, dim: int, num_heads: int, dropout: float = 0.1) -> None:
        super().__init__()

        def attention() -> nn.MultiheadAttention:
            return nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)

        self.self_attn1 = attention()
        self.self_attn2 = attention()
        self.multihead_attn1 = attention()
        self.multihead_attn2 = attention()
        self.multihead_attn3 = attention()
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)
        self.norm4 = nn.LayerNorm(dim)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)


class FaceCoresetNetReference(nn.Module):
    """The released TemplateAggregateModel; selection as in `select_core_template`. `dropout`
    (released: 0.1, in the attentions and after them) acts in train mode only; 0 makes training
    steps deterministic given the selection noise."""

    def __init__(
        self,
        embedding_size: int = 512,
        num_heads: int = 8,
        coreset_size: int = 3,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.embedding_size = embedding_size
        self.coreset_size = coreset_size
        self.gamma = nn.Parameter(torch.tensor(0.01))
        # tau, feature_norm_normalizer, ur_center, dist_from_ur_center_norm_size_balance and
        # quality_measure: read by no forward pass of the released model, kept for its state dict.
        self.tau = nn.Parameter(torch.tensor(0.0))
        self.feature_norm_normalizer = nn.Parameter(torch.logit(torch.tensor(1 / 20)))
        self.ur_center = nn.Parameter(torch.zeros(embedding_size))
        self.dist_from_ur_center_norm_size_balance = nn.Parameter(torch.logit(torch.tensor(0.2)))
        self.decoder_layer1 = DecoderLayer(embedding_size, num_heads, dropout)
        self.pos_trans_norm = nn.LayerNorm(embedding_size)
        self.quality_measure = nn.Linear(embedding_size, 1)

    @classmethod
    def from_state_dict(
        cls, state_dict: Mapping[str, torch.Tensor], coreset_size: int = 3, num_heads: int = 8
    ) -> FaceCoresetNetReference:
        """Released keys, width inferred, strict load, eval mode. The number of heads is not
        visible in any shape (released: 8); K is not stored (released default: 3)."""
        model = cls(infer_embedding_size(state_dict), num_heads, coreset_size)
        model.load_state_dict(state_dict)
        return model.eval()

    def select(
        self, template: torch.Tensor, norms: torch.Tensor, noise: torch.Tensor | None = None
    ) -> CoreTemplate:
        return select_core_template(
            template, norms, self.coreset_size, self.gamma, training=self.training, noise=noise
        )

    def norm_encoding(self, norms: torch.Tensor) -> torch.Tensor:
        """(...) norms -> (..., C): sinusoid of norm * 2 pi, then the learned LayerNorm."""
        return self.pos_trans_norm(sinusoidal_encoding(norms * (2 * math.pi), self.embedding_size))

    def cross_attention(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
    ) -> torch.Tensor:
        """multihead_attn1: queries (B, K, C) over the whole template, keys and values (B, N, C)."""
        return self.decoder_layer1.multihead_attn1(query, key, value, need_weights=False)[0]

    def refine(
        self, core: torch.Tensor, template: torch.Tensor, template_norms: torch.Tensor
    ) -> torch.Tensor:
        """The decoder: core template (B, K, C) -> core + delta. The core's norm encoding uses
        norms recomputed from the selected features, as released."""
        layer = self.decoder_layer1
        query = core + self.norm_encoding(torch.linalg.vector_norm(core, dim=-1))
        attended = layer.self_attn1(query, query, query, need_weights=False)[0]
        query = layer.norm1(query + layer.dropout1(attended))
        key = template + self.norm_encoding(template_norms)
        attended = layer.dropout2(self.cross_attention(query, key, template))
        return core + layer.norm2(core + attended)

    def forward(
        self, embeddings: torch.Tensor, norms: torch.Tensor, noise: torch.Tensor | None = None
    ) -> FaceCoresetNetOutput:
        """Released convention: unit directions (B, N, C) and norms (B, N, 1). `noise`: Gumbel
        samples for training-mode selection, see `select_core_template`."""
        norms = norms.squeeze(-1)
        template = embeddings * norms[..., None]
        core = self.select(template, norms, noise)
        aggregated = self.refine(core.features, template, norms).mean(dim=1)
        aggregated_norm = torch.linalg.vector_norm(aggregated, dim=-1, keepdim=True)
        return FaceCoresetNetOutput(
            aggregated / aggregated_norm,
            aggregated_norm,
            core.features,
            core.indices,
            core.features.mean(dim=1),
        )
