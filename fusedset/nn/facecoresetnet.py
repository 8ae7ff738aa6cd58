"""FaceCoresetNet, the drop-in fast version of the released `TemplateAggregateModel`.

Same parameters, state dict and outputs as `fusedset.reference.FaceCoresetNetReference`. The
cross-attention of the core template over the whole template runs with the key and value
projections folded into the queries (O(N C) instead of O(N C^2)), and its keys
`template + enc(norms)` are never built: `fusedset.ops.sinusoid_attention_pool` scores the norm
encoding (a LayerNorm of a sinusoid) from the norms, in one pass over the template and bounded
memory. With attention dropout (train mode, dropout > 0) the chunked torch form
(`folded_cross_attention`, the encoding scored by `_norm_encoding_scorer`) draws it instead.

Selection goes through `_select_core`: the fused quality_fps ops. Given unit directions and
norms (the released convention), neither the selection nor the attention builds their product,
the (N, C) template.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch

from fusedset.nn.checkpoints import CheckpointSource, facecoresetnet_state_dict, load_checked
from fusedset.nn.folded_attention import (
    DEFAULT_CHUNK_SIZE,
    fold_queries,
    folded_cross_attention,
    project_pooled,
)
from fusedset.ops import quality_fps, quality_fps_select, sinusoid_attention_pool
from fusedset.reference._sinusoid import sinusoid_angles
from fusedset.reference.facecoresetnet import FaceCoresetNetReference, infer_embedding_size

# Core rows (B x K) up to which the decoder's small steps run on one thread.
SMALL_WORK_ROWS = 64


@contextlib.contextmanager
def _small_work_threads(core: torch.Tensor) -> Iterator[None]:
    """The decoder's steps on the core alone (LayerNorms, the self-attention, the projections:
    K rows per template) on one thread when the core is small. Several of them run a two-thread
    region however small their input; on cores shared with other jobs each region waits for the
    second thread to be scheduled, which made these N-independent steps' slow tail far longer
    on two threads than on one."""
    threads = torch.get_num_threads()
    if core.device.type != "cpu" or threads == 1 or core.shape[0] * core.shape[1] > SMALL_WORK_ROWS:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class CoresetFusion(NamedTuple):
    descriptor: torch.Tensor  # (B, C), unit norm
    norm: torch.Tensor  # (B, 1)
    core_template: torch.Tensor  # (B, min(K, N), C); rows past min(K, lengths[b]) are zeros


def _select_core(
    x: torch.Tensor,
    k: int,
    gamma: torch.Tensor | float,
    *,
    training: bool,
    noise: torch.Tensor | None = None,
    lengths: torch.Tensor | None = None,
    row_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """The core template: min(k, N) rows of the template (B, N, C) by quality-aware farthest
    point selection with quality ||x_i|| -> (B, min(k, N), C), rows past min(k, lengths[b])
    zero. The template is x * row_scale[..., None] (x when row_scale is None), built only in
    training. Eval: the argmax picks (fusedset.ops.quality_fps); training: Gumbel
    straight-through with the standard Gumbel samples `noise` (k, B, N), the reference's layout
    (fusedset.ops.quality_fps_select)."""
    if training:
        steps = min(k, x.shape[1])
        op_noise = None if noise is None else noise[:steps].permute(1, 0, 2)
        template = x if row_scale is None else x * row_scale[..., None]
        return quality_fps_select(template, k, gamma, noise=op_noise, lengths=lengths)
    picks = quality_fps(x, k, gamma, lengths=lengths, row_scale=row_scale)
    index = picks.clamp_min(0)  # -1 past a template's valid rows
    rows = x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))
    if row_scale is not None:
        rows = rows * row_scale.gather(1, index)[..., None]
    return rows.masked_fill(picks[..., None] < 0, 0)


class FaceCoresetNet(FaceCoresetNetReference):
    """The released FaceCoresetNet, fast at any N. `chunk_size`: keys per step of the online
    softmax of the cross-attention's torch form, which runs only with attention dropout (bounds
    its extra memory; the fused op bounds its own). See `forward`."""

    def __init__(
        self,
        embedding_size: int = 512,
        num_heads: int = 8,
        coreset_size: int = 3,
        dropout: float = 0.1,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ) -> None:
        super().__init__(embedding_size, num_heads, coreset_size, dropout)
        self.chunk_size = chunk_size

    @classmethod
    def from_official(
        cls,
        source: CheckpointSource,
        coreset_size: int = 3,
        num_heads: int = 8,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ) -> FaceCoresetNet:
        """The released `TemplateAggregateModel` state dict, bare or under `aggregate_model.`
        (a path or a mapping, possibly inside a Lightning checkpoint's `state_dict`), in eval
        mode. Raises CheckpointKeyError naming every missing and unexpected key. K is not stored
        in the checkpoint (released default: 3), nor the number of heads (8)."""
        state_dict = facecoresetnet_state_dict(source)
        model = cls(
            infer_embedding_size(state_dict),
            num_heads=num_heads,
            coreset_size=coreset_size,
            chunk_size=chunk_size,
        )
        load_checked(model, state_dict, "released FaceCoresetNet")
        return model.eval()

    def forward(
        self,
        embeddings: torch.Tensor,
        norms: torch.Tensor,
        lengths: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Released convention: unit directions `embeddings` (B, N, C) and `norms` (B, N, 1) ->
        (descriptor (B, C) L2-normalized, its norm (B, 1)). `lengths` (B,): template b is its
        first lengths[b] images; padded rows are never selected nor attended to. `noise`
        (K, B, N): Gumbel samples for the training-mode selection (drawn when omitted)."""
        result = self.aggregate(embeddings, norms, lengths, noise)
        return result.descriptor, result.norm

    def forward_features(
        self,
        features: torch.Tensor,
        lengths: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw backbone features (B, N, C) (direction times norm) -> (descriptor, norm)."""
        result = self.aggregate_features(features, lengths, noise)
        return result.descriptor, result.norm

    def aggregate(
        self,
        embeddings: torch.Tensor,
        norms: torch.Tensor,
        lengths: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
    ) -> CoresetFusion:
        """`forward` with the core template too."""
        self._check_set("embeddings", embeddings, lengths)
        if not isinstance(norms, torch.Tensor) or norms.shape != (*embeddings.shape[:2], 1):
            got = tuple(norms.shape) if isinstance(norms, torch.Tensor) else type(norms).__name__
            raise ValueError(
                f"norms must have shape (B, N, 1) = {(*embeddings.shape[:2], 1)} to match "
                f"embeddings, got {got}"
            )
        embeddings, norms = self._compute_dtype(embeddings), self._compute_dtype(norms)
        with torch.autocast(embeddings.device.type, enabled=False):
            norms = norms.squeeze(-1)
            # The template embeddings * norms is never built in eval: a fresh (N, C) product
            # costs more than the selection itself, mostly in page faults.
            return self._fuse_checked(
                embeddings, norms, norms, lengths, noise, embeddings=embeddings, norms=norms
            )

    def aggregate_features(
        self,
        features: torch.Tensor,
        lengths: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
    ) -> CoresetFusion:
        """`forward_features` with the core template too."""
        self._check_set("features", features, lengths)
        features = self._compute_dtype(features)
        with torch.autocast(features.device.type, enabled=False):
            norms = torch.linalg.vector_norm(features, dim=-1)
            return self._fuse_checked(features, None, norms, lengths, noise, features=features)

    def refine(
        self,
        core: torch.Tensor,
        template: torch.Tensor,
        template_norms: torch.Tensor,
        lengths: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The released decoder (see FaceCoresetNetReference.refine) with the folded cross-attention
        in one pass over the template. With `lengths`, core slots past min(K, lengths[b]) are
        padding too."""
        return self._refine(core, template, None, template_norms, lengths)

    def _refine(
        self,
        core: torch.Tensor,
        rows: torch.Tensor,
        row_scale: torch.Tensor | None,
        template_norms: torch.Tensor,
        lengths: torch.Tensor | None,
    ) -> torch.Tensor:
        """`refine` of the template rows * row_scale (rows when None), which is never built."""
        layer = self.decoder_layer1
        attention = layer.multihead_attn1
        if attention.training and attention.dropout > 0:
            # Dropout on the attention weights: the chunked torch form, which draws it.
            def key_offset(folded: torch.Tensor) -> Callable[[int, int], torch.Tensor]:
                return self._norm_encoding_scorer(folded, template_norms)

            template = rows if row_scale is None else rows * row_scale[..., None]
            query = self._decoder_query(core, lengths)
            attended = folded_cross_attention(
                query, template, template, attention, lengths, self.chunk_size, key_offset
            )
            return core + layer.norm2(core + layer.dropout2(attended))
        with _small_work_threads(core):
            folded = fold_queries(self._decoder_query(core, lengths), attention)
            # The keys are template + LayerNorm(sinusoid(2 pi norms)): the LayerNorm's weight
            # folds into the code's queries, its bias adds the same score to every key.
            code_queries = folded * self.pos_trans_norm.weight
        pooled, _ = sinusoid_attention_pool(
            rows,
            folded,
            code_queries,
            template_norms,
            row_scale=row_scale,
            lengths=lengths,
            position_scale=2 * math.pi,
            eps=self.pos_trans_norm.eps,
        )
        with _small_work_threads(core):
            attended = project_pooled(pooled, attention)
            return core + layer.norm2(core + layer.dropout2(attended))

    def _decoder_query(self, core: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
        """The decoder's queries for the cross-attention: the core with its norm encoding, after
        the self-attention and norm1. With `lengths`, core slots past min(K, lengths[b]) are
        padding."""
        layer = self.decoder_layer1
        core_padding = None
        if lengths is not None:
            core_slots = torch.arange(core.shape[1], device=core.device)
            core_padding = core_slots >= lengths[:, None]
        query = core + self.norm_encoding(torch.linalg.vector_norm(core, dim=-1))
        attended = layer.self_attn1(
            query, query, query, key_padding_mask=core_padding, need_weights=False
        )[0]
        return layer.norm1(query + layer.dropout1(attended))

    def _norm_encoding_scorer(
        self, folded: torch.Tensor, norms: torch.Tensor
    ) -> Callable[[int, int], torch.Tensor]:
        """folded (B, R, C), norms (B, N) -> a function (start, stop) -> (B, stop - start, R):
        folded . norm_encoding(norms[:, start:stop]) less folded . bias of the LayerNorm (the
        same for every key), without building the (B, n, C) encoding.

        The encoding is LayerNorm(s) of s = (sin a_k, cos a_k) over channel pairs k, so
        u . LN(s) = rstd (sum_k (ug)_2k sin a_k + (ug)_2k+1 cos a_k - mean(s) sum_c (ug)_c) + u . b
        with g, b the LayerNorm's weight and bias, and var(s) = 1/2 - mean(s)^2 since each pair
        has sin^2 + cos^2 = 1: one matmul over the angles' sines and cosines instead of a
        LayerNorm over N x C."""
        width = self.embedding_size
        scaled = folded * self.pos_trans_norm.weight
        # A last row of 1/C turns the same matmul into the mean of s.
        rows = torch.cat([scaled, scaled.new_full((scaled.shape[0], 1, width), 1 / width)], 1)
        weights = torch.cat([rows[..., 0::2], rows[..., 1::2]], dim=-1).transpose(1, 2)
        totals = scaled.sum(dim=-1)[:, None]
        eps = self.pos_trans_norm.eps

        def scores(start: int, stop: int) -> torch.Tensor:
            angles = sinusoid_angles(norms[:, start:stop] * (2 * math.pi), width)
            sums = torch.cat([angles.sin(), angles.cos()], dim=-1) @ weights
            dot, mean = sums[..., :-1], sums[..., -1:]
            return (dot - mean * totals) * torch.rsqrt(0.5 - mean.square() + eps)

        return scores

    def _fuse(
        self,
        rows: torch.Tensor,
        row_scale: torch.Tensor | None,
        norms: torch.Tensor,
        lengths: torch.Tensor | None,
        noise: torch.Tensor | None,
    ) -> CoresetFusion:
        """The fusion of the template rows * row_scale[..., None] (rows when None) with the
        given norms."""
        core = _select_core(
            rows,
            self.coreset_size,
            self.gamma,
            training=self.training,
            noise=noise,
            lengths=lengths,
            row_scale=row_scale,
        )
        refined = self._refine(core, rows, row_scale, norms, lengths)
        if lengths is None:
            aggregated = refined.mean(dim=1)
        else:
            core_counts = lengths.clamp(max=core.shape[1])
            valid = torch.arange(core.shape[1], device=core.device) < core_counts[:, None]
            aggregated = (refined * valid[..., None]).sum(dim=1) / core_counts[:, None]
        norm = torch.linalg.vector_norm(aggregated, dim=-1, keepdim=True)
        return CoresetFusion(aggregated / norm, norm, core)

    def _compute_dtype(self, x: torch.Tensor) -> torch.Tensor:
        # fp16/bf16 inputs (and autocast) run in the parameters' dtype: the softmax over N and
        # the weighted sums of up to millions of rows need fp32 accumulation.
        return x.to(self.gamma.dtype)

    def _check_set(self, name: str, x: torch.Tensor, lengths: torch.Tensor | None) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
        if x.dim() != 3 or x.shape[-1] != self.embedding_size:
            raise ValueError(
                f"{name} must have shape (B, N, {self.embedding_size}), got {tuple(x.shape)}"
            )
        if x.shape[0] == 0 or x.shape[1] == 0:
            raise ValueError(
                f"{name} is an empty set (shape {tuple(x.shape)}): every template needs at least "
                "one image"
            )
        if lengths is None:
            return
        if not isinstance(lengths, torch.Tensor) or lengths.shape != x.shape[:1]:
            raise ValueError(f"lengths must be a tensor of shape (B,) = ({x.shape[0]},)")
        if lengths.is_floating_point() or lengths.is_complex() or lengths.dtype == torch.bool:
            raise TypeError(f"lengths must be an integer tensor, got {lengths.dtype}")
        if lengths.device != x.device:
            raise ValueError(f"lengths is on {lengths.device}, {name} on {x.device}")
        if bool((lengths < 1).any()) or bool((lengths > x.shape[1]).any()):
            raise ValueError(
                f"lengths must lie in [1, N = {x.shape[1]}] (an empty template has no "
                f"descriptor), got {lengths.tolist()}"
            )

    def _fuse_checked(
        self,
        rows: torch.Tensor,
        row_scale: torch.Tensor | None,
        norms: torch.Tensor,
        lengths: torch.Tensor | None,
        noise: torch.Tensor | None,
        /,
        **inputs: torch.Tensor,
    ) -> CoresetFusion:
        """`_fuse`, with a NaN or Inf in the caller's `inputs` reported by their names. A
        non-finite row stops the selection (quality_fps refuses it) or reaches the descriptor,
        so only then do the inputs cost a look."""
        try:
            result = self._fuse(rows, row_scale, norms, lengths, noise)
        except ValueError:
            self._name_non_finite(lengths, **inputs)
            raise
        if not bool(result.descriptor.isfinite().all()):
            self._name_non_finite(lengths, **inputs)
        return result

    @staticmethod
    def _name_non_finite(lengths: torch.Tensor | None, **inputs: torch.Tensor) -> None:
        for name, x in inputs.items():
            bad = ~x.isfinite()
            if bad.dim() == 3:
                bad = bad.any(dim=-1)
            if lengths is not None:
                bad &= torch.arange(x.shape[1], device=x.device) < lengths[:, None]
            templates = bad.any(dim=-1).nonzero().flatten().tolist()
            if templates:
                raise ValueError(f"{name} contain NaN or Inf (templates {templates})")
