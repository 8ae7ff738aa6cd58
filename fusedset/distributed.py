"""One probe whose frames live on several ranks, fused exactly (torch.distributed).

``fuse(module, *inputs)`` runs on every rank of a process group with that rank's shard of the
frames (the frame axis split across ranks in rank order; shards may be uneven or empty) and
returns on every rank the descriptor of all the frames, without moving the frames:

- CAFace: each rank streams its shard into a ``ClusterState``; the states' sums are added
  across ranks (one all-reduce of B x M x (2 C + 2 D + 1) float64 numbers).
- FaceCoresetNet: quality_fps runs step by step across ranks (per step an all-gather of each
  rank's best (distance, global index) per probe and an all-reduce of the picked row from its
  owner), then every rank pools its shard with ``fusedset.ops.sinusoid_attention_pool`` and the
  (pooled, logsumexp) partials are merged in rank order.

Before any of that, the ranks exchange a small header (shapes, dtype, whether the shard was
valid): a bad input on one rank makes every rank raise, the faulty rank its own error and the
others a RuntimeError naming it. A rank that dies or never calls in is caught by the process
group's timeout (``init_process_group(timeout=...)``), as for any collective.

Gradients flow through both forms when every rank computes the same loss from the result and
calls backward: each rank gets the gradient of its own frames, and every rank the whole
gradient of the module's parameters. The module must be in eval mode: training mode's Gumbel
selection, attention dropout and BatchNorm batch statistics have no distributed form here.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from fusedset.cluster_state import Normalization
from fusedset.nn.caface import CAFace
from fusedset.nn.facecoresetnet import FaceCoresetNet
from fusedset.nn.folded_attention import fold_queries, project_pooled
from fusedset.ops import sinusoid_attention_pool
from fusedset.ops._checks import FLOAT_DTYPES, all_finite

_WHERE = "fusedset.distributed.fuse"
_DTYPES_BY_NAME = {str(d).removeprefix("torch."): d for d in FLOAT_DTYPES}


# Gradients: every rank computes the same loss from the same (replicated) result, so a value
# summed across ranks passes its gradient through unchanged, a gathered value hands each rank
# the gradient of its own part, and a replicated value read by every rank's shard sums the
# shards' gradients. The only collective of a backward is that sum: every rank must call
# backward.
class _SumAcrossRanks(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: object) -> torch.Tensor:
        out = x.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


class _GatherAcrossRanks(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: object) -> torch.Tensor:
        ctx.rank = dist.get_rank(group)
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad[ctx.rank], None


class _SharedAcrossRanks(torch.autograd.Function):
    @staticmethod
    def forward(ctx, group: object, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ctx.group = group
        return tuple(x.view_as(x) for x in xs)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        flat = torch.cat([g.flatten() for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=ctx.group)
        return (
            None,
            *(
                part.view_as(g)
                for part, g in zip(flat.split([g.numel() for g in grads]), grads, strict=True)
            ),
        )


def fuse(
    module: CAFace | FaceCoresetNet,
    *inputs: torch.Tensor,
    group: object = None,
    normalization: Normalization = "official",
    chunk_size: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The descriptor of the frames of every rank of ``group`` (the default group when None).

    Every rank calls this with the same module weights and its own shard:

    - ``CAFace``: ``(features (B, n, C), style_stats (B, n, 384, 2))``; returns what one
      process's ``module.stream(B, normalization, chunk_size)`` returns after an update with
      each rank's shard, ranks in order. Both normalizations are sums over chunks of terms of
      that chunk alone (the released "official" mode clips each chunk's weight by its own
      assignment mass), so the result depends on how each shard is cut into chunks, not on
      which rank holds a chunk nor in which order the chunks are added. (A single
      ``module(...)`` call clusters all its frames as one chunk.)
    - ``FaceCoresetNet``: ``(embeddings (B, n, C), norms (B, n, 1))`` as ``module.forward``
      takes them (no ``lengths``); returns ``module(...)`` of the shards concatenated in rank
      order: the same core indices, the descriptor equal to float rounding. The selection runs
      as small torch ops on each shard (a mat-vec per step), not the quality_fps kernels; the
      pooling runs the sinusoid_attention_pool kernels on each shard. ``normalization`` and
      ``chunk_size`` do not apply.

    Numbers each rank contributes per call, whatever n is (besides a header of 5 int64):
    FaceCoresetNet ``B k (2 + C + 1) + B R (C + 1)``, the per-step (distance, index) pairs in
    float64, picked rows and the (pooled, logsumexp) partials in float32, with k = min(K, N)
    and R = K x heads folded queries, and ``2 B R C`` float32 in a backward; CAFace
    ``B M (2 C + 2 D + 1) + 1`` float64 sums (M centers, D token width), and in a backward the
    gradients of the module's parameters (as many as it has).
    """
    if not isinstance(module, CAFace | FaceCoresetNet):
        raise TypeError(
            f"{_WHERE}: module must be a fusedset.nn.CAFace or FaceCoresetNet, got "
            f"{type(module).__name__}"
        )
    if module.training:
        raise ValueError(
            f"{_WHERE}: module must be in eval mode (module.eval()); training mode's random "
            "selection, dropout and batch statistics have no distributed form"
        )
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    if isinstance(module, CAFace):
        return _fuse_caface(module, inputs, group, rank, world, normalization, chunk_size)
    return _fuse_coreset(module, inputs, group, rank, world)


def _check_shard(
    inputs: tuple[torch.Tensor, ...], names: tuple[str, str], width: int | None, tail: tuple
) -> tuple[int, int, int]:
    """The (B, n, C) of a shard (first, second) with second of shape (B, n, *tail); n may be 0."""
    if len(inputs) != 2:
        raise TypeError(f"{_WHERE}: expected 2 inputs ({', '.join(names)}), got {len(inputs)}")
    first, second = inputs
    for name, value in zip(names, inputs, strict=True):
        if not isinstance(value, torch.Tensor) or value.dtype not in FLOAT_DTYPES:
            got = value.dtype if isinstance(value, torch.Tensor) else type(value).__name__
            raise TypeError(f"{_WHERE}: {name} must be a floating-point tensor, got {got}")
    if first.dim() != 3 or first.shape[0] == 0 or (width is not None and first.shape[2] != width):
        raise ValueError(
            f"{_WHERE}: {names[0]} must have shape (B >= 1, n, {width or 'C'}), got "
            f"{tuple(first.shape)}"
        )
    if second.shape != (*first.shape[:2], *tail):
        raise ValueError(
            f"{_WHERE}: {names[1]} must have shape {(*first.shape[:2], *tail)} to match "
            f"{names[0]}, got {tuple(second.shape)}"
        )
    for name, value in zip(names, inputs, strict=True):
        if not all_finite(value):
            raise ValueError(f"{_WHERE}: {name} holds NaN or Inf")
    return first.shape[0], first.shape[1], first.shape[2]


def _agree(
    error: Exception | None,
    shape: tuple[int, int, int],
    dtype: torch.dtype | None,
    group: object,
    rank: int,
    world: int,
) -> torch.Tensor:
    """Exchanges the headers; raises on every rank if any rank failed or the shards disagree.
    Returns the headers (world, 5): failed, B, n, C, dtype code."""
    code = -1 if dtype is None else FLOAT_DTYPES.index(dtype)
    header = torch.tensor([int(error is not None), *shape, code], dtype=torch.int64)
    headers = [torch.empty_like(header) for _ in range(world)]
    dist.all_gather(headers, header, group=group)
    table = torch.stack(headers)
    if error is not None:
        raise error
    failed = table[:, 0].nonzero().flatten().tolist()
    if failed:
        raise RuntimeError(f"{_WHERE}: rank(s) {failed} failed on their inputs (see their errors)")
    for column, what in ((1, "B (probes)"), (3, "C (channels)")):
        if bool((table[:, column] != table[0, column]).any()):
            raise ValueError(
                f"{_WHERE}: every rank must pass the same {what}, got {table[:, column].tolist()}"
            )
    codes = table[:, 4][table[:, 4] >= 0]
    if bool((codes != codes[:1]).any()):
        names = [str(FLOAT_DTYPES[c]) if c >= 0 else "-" for c in table[:, 4].tolist()]
        raise TypeError(f"{_WHERE}: every rank must pass the same dtype, got {names}")
    if int(table[:, 2].sum()) == 0:
        raise ValueError(f"{_WHERE}: every rank's shard is empty; a probe needs a frame")
    return table


# -- CAFace ----------------------------------------------------------------------------------


class _ShardStream(torch.nn.Module):
    """Streams a shard through ``model``, a submodule so that functional_call can run it on
    the parameters' shared copies: the shards' parameter gradients are then summed across
    ranks, those of the aggregation after the sum are whole on every rank already."""

    def __init__(self, model: CAFace) -> None:
        super().__init__()
        self.model = model

    def forward(self, stream, features: torch.Tensor, style_stats: torch.Tensor) -> dict:
        return stream.update(features, style_stats).state.state_dict()


def _fuse_caface(
    module: CAFace,
    inputs: tuple[torch.Tensor, ...],
    group: object,
    rank: int,
    world: int,
    normalization: Normalization,
    chunk_size: int | None,
) -> torch.Tensor:
    error, shape, dtype, stream, sums = None, (0, 0, 0), None, None, {}
    parameters = dict(module.named_parameters())
    shared = _SharedAcrossRanks.apply(group, *parameters.values())
    try:
        tail = (module.config.style_channels, 2)
        shape = _check_shard(inputs, ("features", "style_stats"), None, tail)
        stream = module.stream(shape[0], normalization, chunk_size)
        if shape[1]:
            sums = torch.func.functional_call(
                _ShardStream(module),
                {f"model.{name}": p for name, p in zip(parameters, shared, strict=True)},
                (stream, *inputs),
            )
            dtype = _DTYPES_BY_NAME[sums["dtype"]]
    except (TypeError, ValueError, RuntimeError) as exc:
        error = exc
    table = _agree(error, shape, dtype, group, rank, world)
    batch, _, width = shape
    centers, dim = module.config.num_centers, module.config.dim
    shapes = {
        "clipped_num": (batch, centers, width),
        "clipped_token_num": (batch, centers, dim),
        "den": (batch, centers),
        "num": (batch, centers, width),
        "token_num": (batch, centers, dim),
    }
    flat = torch.cat(
        [
            sums[k].flatten() if sums else torch.zeros(math.prod(s), dtype=torch.float64)
            for k, s in shapes.items()
        ]
        + [torch.tensor([float(sums.get("chunks", 0))], dtype=torch.float64)]
    )
    if shared and not sums:
        # Zeros that depend on the shared parameters: this rank's backward joins their sum.
        flat = flat + 0 * shared[0].flatten()[0]
    flat = _SumAcrossRanks.apply(flat, group)
    state: dict[str, object] = {}
    offset = 0
    for k, s in shapes.items():
        state[k] = flat[offset : offset + math.prod(s)].view(s)
        offset += math.prod(s)
    state["chunks"] = int(flat[offset].item())
    codes = table[:, 4]
    state["dtype"] = str(FLOAT_DTYPES[int(codes[codes >= 0][0])]).removeprefix("torch.")
    stream.state.load_state_dict(state)
    return stream.result()


# -- FaceCoresetNet ----------------------------------------------------------------------------


def _fuse_coreset(
    module: FaceCoresetNet,
    inputs: tuple[torch.Tensor, ...],
    group: object,
    rank: int,
    world: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    error, shape = None, (0, 0, 0)
    try:
        shape = _check_shard(inputs, ("embeddings", "norms"), module.embedding_size, (1,))
    except (TypeError, ValueError) as exc:
        error = exc
    dtype = inputs[0].dtype if error is None and shape[1] else None
    table = _agree(error, shape, dtype, group, rank, world)
    counts = table[:, 2].tolist()
    start = sum(counts[:rank])
    embeddings, norms = (module._compute_dtype(x) for x in inputs)
    norms = norms.squeeze(-1)
    _, core = distributed_core(
        embeddings, norms, module.coreset_size, module.gamma, start, sum(counts), group, rank, world
    )
    layer = module.decoder_layer1
    attention = layer.multihead_attn1
    folded = fold_queries(module._decoder_query(core, None), attention)
    folded, code_queries = _SharedAcrossRanks.apply(
        group, folded, folded * module.pos_trans_norm.weight
    )
    if embeddings.shape[1]:
        pooled, logsumexp = sinusoid_attention_pool(
            embeddings,
            folded,
            code_queries,
            norms,
            row_scale=norms,
            position_scale=2 * math.pi,
            eps=module.pos_trans_norm.eps,
        )
    else:
        # Zeros that depend on the shared queries: this rank's backward joins their sum.
        pooled = folded * 0
        logsumexp = folded.new_full(folded.shape[:2], float("-inf"))
    partial = torch.cat([pooled, logsumexp[..., None]], dim=-1).to(folded.dtype)
    attended = project_pooled(_merge_partials(_GatherAcrossRanks.apply(partial, group)), attention)
    refined = core + layer.norm2(core + layer.dropout2(attended))
    aggregated = refined.mean(dim=1)
    norm = torch.linalg.vector_norm(aggregated, dim=-1, keepdim=True)
    return aggregated / norm, norm


def _merge_partials(partials: torch.Tensor) -> torch.Tensor:
    """Per-rank (pooled | logsumexp) (world, B, R, C + 1) -> the pooled softmax over all rows,
    merged in rank order (every rank gets the same bits). An empty shard's logsumexp is -inf:
    its weight is 0."""
    top = partials[..., -1].amax(dim=0)
    total = weighted = None
    for p in partials:
        weight = torch.exp(p[..., -1] - top)
        term = weight[..., None] * p[..., :-1]
        total = weight if total is None else total + weight
        weighted = term if weighted is None else weighted + term
    return weighted / total[..., None]


def distributed_core(
    embeddings: torch.Tensor,
    norms: torch.Tensor,
    k: int,
    gamma: torch.Tensor,
    start: int,
    total: int,
    group: object,
    rank: int,
    world: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """fusedset.ops.quality_fps over the rows embeddings * norms of every rank (this rank's
    start at global index ``start``, ``total`` rows in all) -> the global indices (B, min(k,
    total)) and the core rows (B, min(k, total), C), the same on every rank.

    Each step every rank proposes its best available row per probe as (score, global index);
    the highest score wins, the lowest global index on ties (ranks hold increasing indices and
    argmax takes the first maximum). Zero-norm rows score the lowest finite value, so they come
    only once nothing else is left, in index order. The owner contributes the picked row (and
    its norm) to an all-reduce the other ranks feed zeros: the sum is the row, bit for bit."""
    # The rows embeddings * norms are formed only for the picks: at N = 1e6 and C = 512 the
    # product would be another 2 GB.
    directions, scales = embeddings.detach(), norms.detach()
    batch, n, width = directions.shape
    q = scales.abs() * torch.linalg.vector_norm(directions, dim=-1)
    nonzero = q > 0
    inv_q = torch.where(nonzero, 1 / torch.where(nonzero, q, 1), 0)
    half_qg = torch.where(nonzero, torch.where(nonzero, q, 1) ** gamma.detach(), 0) / 2
    lowest = torch.finfo(q.dtype).min
    available = torch.ones_like(nonzero)
    probes = torch.arange(batch)
    d = q
    core, picks = [], []
    for step in range(min(k, total)):
        proposal = torch.full((batch, 2), float("-inf"), dtype=torch.float64)
        if n:
            score = torch.where(available & nonzero, d, float("-inf"))
            score = torch.where(available & ~nonzero, lowest, score)
            best = score.argmax(dim=1)
            proposal[:, 0] = score[probes, best].double()
            proposal[:, 1] = (best + start).double()
        proposals = [torch.empty_like(proposal) for _ in range(world)]
        dist.all_gather(proposals, proposal, group=group)
        table = torch.stack(proposals)  # (world, B, 2)
        owner = table[..., 0].argmax(dim=0)
        picked = table[owner, probes, 1].long()
        mine = probes[owner == rank]
        local = picked[mine] - start
        row = q.new_zeros(batch, width + 1)
        if len(mine):
            # The picked rows carry their gradient back to this rank's frames.
            row[mine, :width] = embeddings[mine, local] * norms[mine, local, None]
            row[mine, width] = q[mine, local]
            available[mine, local] = False
        row = _SumAcrossRanks.apply(row, group)
        core.append(row[:, :width])
        picks.append(picked)
        if step + 1 == min(k, total) or not n:
            continue
        picked_row, picked_norm = row[:, :width].detach(), row[:, width].detach()
        inv_r = torch.where(picked_norm > 0, 1 / torch.where(picked_norm > 0, picked_norm, 1), 0)
        dots = (directions @ (picked_row * inv_r[:, None])[..., None]).squeeze(-1)
        cos = dots * scales * inv_q
        dist_new = half_qg * (1 - cos).clamp_min(0)
        d = dist_new if step == 0 else torch.where(dist_new < d, dist_new, d)
    return torch.stack(picks, dim=1), torch.stack(core, dim=1)
