"""Triton kernels of sinusoid_attention_pool (the CUDA path).

The resident kernel (rows and codes up to WIDTH channels) reads each row once. Program
(template, block of queries, split) holds its queries, code queries and pooled rows whole in
registers and walks the rows of its split: each row's code score (sin and cos of the row's
angles, LayerNorm'd, against the code queries), its score, the online softmax update and the
weighted row added to the pooled rows. Each warp owns whole queries (a query's channels lie
along the lanes), so a query's sums stay inside a warp and its running max and sum take a
register or two per thread rather than one per query.

The tiled kernel (wider rows or codes) walks its split in tiles of BLOCK_N rows, reading each
tile twice (scores, then the weighted sum) and its partial pooled rows from memory each tile.

Either way each program writes its partial pooled rows, max and sum once, and the merge kernel
adds the splits of a template in split order: no atomics, the same inputs give the same bits.
The (N, D) codes, (N, C) keys and (N, R) scores never touch memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from fusedset._dtypes import triton_label
from fusedset.triton_kernels.registry import (
    CompileVariant,
    Launch,
    compile_checked,
    compile_checked_helper,
)

MAX_QUERIES = 64
_LABELS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}

# The resident kernel holds rows of up to WIDTH channels and codes of up to WIDTH channels and
# QUERY_BLOCK queries a program, in blocks of 16 and 8 (more queries take more programs, each
# reading the rows again): FaceCoresetNet's 24, whose queries, code queries and pooled rows
# compile without spills on sm_80 and sm_90 with 8 warps. Its blocks are (WIDTH // LANES,
# queries, LANES): channel k LANES + l of a query in lane l, the queries spread over the warps.
WIDTH = 512
LANES = 32
QUERY_BLOCKS = (16, 8)
QUERY_BLOCK = sum(QUERY_BLOCKS)
RESIDENT_LAUNCH = {"num_warps": 8, "num_stages": 1}
# A template's rows are split over SPLITS programs (one per SM of an H100, where one program of
# this size is resident at a time), at most one split per MIN_SPLIT_ROWS rows; neither depends
# on the batch, so the order of the partial sums (hence the bits) depends on N alone.
SPLITS = 132
MIN_SPLIT_ROWS = 16

# The tiled kernel. Fixed, not tuned: the partial sums are taken per tile, and the tiling must
# not change with the configuration for the result to keep its bits. The ieee (fp32) dots run
# on FMA units and hold a whole reduction slice per thread: 16-wide slices of the width and of
# the channel pairs, the widest that compile without spills at R <= 64 on sm_80 and sm_90.
# Without a register cap ptxas sometimes stopped at 128 and spilled.
TILED_MIN_SPLIT = 512
TILED_MAX_SPLITS = 128
BLOCK_N = 32
BLOCK_C = 16
BLOCK_H = 16
TILED_LAUNCH = {"num_warps": 8, "num_stages": 1, "maxnreg": 255}

MERGE_BLOCK_S = 64
MERGE_BLOCK_C = 64
MERGE_LAUNCH = {"num_warps": 4, "num_stages": 1}


def _resident_variants() -> list[CompileVariant]:
    variants = []
    for dtype in _LABELS.values():
        signature = {
            "x_ptr": f"*{dtype}",
            "queries_ptr": "*fp32",
            "code_queries_ptr": "*fp32",
            "positions_ptr": "*fp32",
            "divisors_ptr": "*fp32",
            "scale_ptr": "*fp32",
            "lengths_ptr": "*i64",
            "part_ptr": "*fp32",
            "stats_ptr": "*fp32",
            "n": "i32",
            "c": "i32",
            "r": "i32",
            "half": "i32",
            "splits": "i32",
            "query_blocks": "i32",
            "has_scale": "i32",
            "has_lengths": "i32",
            "position_scale": "fp32",
            "eps": "fp32",
        }
        constexprs = {
            "BLOCK_R": QUERY_BLOCKS[0],
            "BLOCK_R2": QUERY_BLOCKS[1],
            "WIDTH": WIDTH,
            "LANES": LANES,
            "WARPS": RESIDENT_LAUNCH["num_warps"],
        }
        variants.append(
            CompileVariant(f"{dtype} R<={QUERY_BLOCK}", signature, constexprs, RESIDENT_LAUNCH)
        )
    return variants


@compile_checked_helper
@triton.jit
def _load_block(ptr, first, offs, r, stride, channels, valid):
    """(K, block, L): rows first + offs (those < r) of a row-major float32 matrix at channels
    (K, 1, L) where valid, zero elsewhere."""
    mask = (offs < r)[None, :, None] & valid
    return tl.load(ptr + (first + offs)[None, :, None] * stride + channels, mask=mask, other=0.0)


@compile_checked_helper
@triton.jit
def _load_to_every_warp(ptr, offsets, valid, WARPS: tl.constexpr):
    """ptr[offsets] (K, 1, L) as float32 (zero where not valid), a copy in every warp as the
    query blocks use it. Loaded as (K, 1, L) it would be spread over the warps, and the compiler
    would lay the query blocks out to match (each warp holding some channels of every query,
    every per-query vector in every thread). Instead the first of WARPS slots (one a warp) loads
    it and a sum over the slots hands it to every warp. The other slots add zeros: every value
    comes out exact, a -0.0 as 0.0."""
    slot = tl.arange(0, WARPS)[None, :, None]
    values = tl.load(ptr + offsets + 0 * slot, mask=valid & (slot == 0), other=0.0)
    return tl.sum(values.to(tl.float32), axis=1, keep_dims=True)


@compile_checked_helper
@triton.jit
def _sum_channels(block):
    """(block,) sums over the channels of a (K, block, L) block: a thread's K values, then the
    lanes of its warp."""
    return tl.sum(tl.sum(block, axis=0), axis=1)


@compile_checked_helper
@triton.jit
def _per_query(block, vector):
    """block[:, r, :] . vector (K, 1, L) for each query r."""
    return _sum_channels(block * vector)


@compile_checked_helper
@triton.jit
def _per_query_broadcast(values):
    """(block,) values as (1, block, 1), the axes put back in the reverse order of
    _sum_channels's: the layout the sums left, with no conversion between them."""
    return values[:, None][None, :, :]


@compile_checked_helper
@triton.jit
def _code_scores(code_sines, code_cosines, totals, sines, cosines, mean, rstd):
    """LayerNorm(code) . g_r = rstd (code . g_r - mean sum_d g_r[d])."""
    code = _per_query(code_sines, sines) + _per_query(code_cosines, cosines)
    return rstd * (code - mean * totals)


@compile_checked_helper
@triton.jit
def _pool_row(queries, code_score, x, row_scale, running_max, running_sum, pooled):
    """The online softmax step of one row for a block of queries."""
    score = _per_query(queries, x) * row_scale + code_score
    # Every row here is valid, so the new max is finite (or NaN from a NaN input).
    new_max = tl.maximum(running_max, score)
    rescale = tl.exp(running_max - new_max)
    weight = tl.exp(score - new_max)
    running_sum = running_sum * rescale + weight
    pooled = pooled * _per_query_broadcast(rescale) + _per_query_broadcast(weight * row_scale) * x
    return new_max, running_sum, pooled


@compile_checked_helper
@triton.jit
def _store_partial(part_ptr, stats_ptr, first, offs, r, c, channels, pooled, running_max,
                   running_sum):  # fmt: skip
    valid = offs < r
    part = part_ptr + (first + offs)[None, :, None] * c + channels
    tl.store(part, pooled, mask=valid[None, :, None] & (channels < c))
    tl.store(stats_ptr + 2 * first + offs, running_max, mask=valid)
    tl.store(stats_ptr + 2 * first + r + offs, running_sum, mask=valid)


@compile_checked(*_resident_variants())
@triton.jit
def sinusoid_pool_resident_kernel(
    x_ptr,
    queries_ptr,
    code_queries_ptr,
    positions_ptr,
    divisors_ptr,
    scale_ptr,
    lengths_ptr,
    part_ptr,
    stats_ptr,
    n,
    c,
    r,
    half,
    splits,
    query_blocks,
    has_scale,
    has_lengths,
    position_scale,
    eps,
    BLOCK_R: tl.constexpr,
    BLOCK_R2: tl.constexpr,
    WIDTH: tl.constexpr,
    LANES: tl.constexpr,
    WARPS: tl.constexpr,
):
    """Queries [q0, q0 + BLOCK_R + BLOCK_R2) of a template in two blocks (a power of two each):
    queries past R would cost registers too."""
    pid = tl.program_id(0)
    split = pid % splits
    b = (pid // splits // query_blocks).to(tl.int64)
    q0 = (pid // splits % query_blocks) * (BLOCK_R + BLOCK_R2)
    offs_a = q0 + tl.arange(0, BLOCK_R)
    offs_b = q0 + BLOCK_R + tl.arange(0, BLOCK_R2)
    lanes = tl.arange(0, LANES)[None, None, :]
    channels = tl.arange(0, WIDTH // LANES)[:, None, None] * LANES + lanes
    # The code's channels 2k and 2k + 1 are the sine and cosine of pair k.
    pairs = tl.arange(0, WIDTH // 2 // LANES)[:, None, None] * LANES + lanes
    valid_h = pairs < half
    divisors = tl.where(valid_h, _load_to_every_warp(divisors_ptr, pairs, valid_h, WARPS), 1.0)
    length = tl.load(lengths_ptr + b, mask=has_lengths != 0, other=n).to(tl.int32)
    # Split s holds rows [s n / splits, (s + 1) n / splits).
    start = (split.to(tl.int64) * n // splits).to(tl.int32)
    stop = ((split + 1).to(tl.int64) * n // splits).to(tl.int32)
    stop = tl.minimum(stop, length)

    code_sines_a = _load_block(code_queries_ptr, b * r, offs_a, r, 2 * half, 2 * pairs, valid_h)
    code_cosines_a = _load_block(code_queries_ptr, b * r, offs_a, r, 2 * half, 2 * pairs + 1,
                                 valid_h)  # fmt: skip
    code_sines_b = _load_block(code_queries_ptr, b * r, offs_b, r, 2 * half, 2 * pairs, valid_h)
    code_cosines_b = _load_block(code_queries_ptr, b * r, offs_b, r, 2 * half, 2 * pairs + 1,
                                 valid_h)  # fmt: skip
    totals_a = _sum_channels(code_sines_a + code_cosines_a)
    totals_b = _sum_channels(code_sines_b + code_cosines_b)
    queries_a = _load_block(queries_ptr, b * r, offs_a, r, c, channels, channels < c)
    queries_b = _load_block(queries_ptr, b * r, offs_b, r, c, channels, channels < c)
    max_a = tl.full((BLOCK_R,), float("-inf"), dtype=tl.float32)
    max_b = tl.full((BLOCK_R2,), float("-inf"), dtype=tl.float32)
    sum_a = tl.zeros((BLOCK_R,), dtype=tl.float32)
    sum_b = tl.zeros((BLOCK_R2,), dtype=tl.float32)
    pooled_a = tl.zeros((WIDTH // LANES, BLOCK_R, LANES), dtype=tl.float32)
    pooled_b = tl.zeros((WIDTH // LANES, BLOCK_R2, LANES), dtype=tl.float32)
    for i in range(start, stop):
        row = b * n + i
        x = _load_to_every_warp(x_ptr + row * c, channels, channels < c, WARPS)
        row_scale = tl.load(scale_ptr + row, mask=has_scale != 0, other=1.0)
        # IEEE division, as the CPU kernel and torch: the angles reach hundreds of radians,
        # where an ulp of the angle is visible in the codes.
        phase = tl.load(positions_ptr + row) * position_scale
        angle = tl.math.div_rn(phase + tl.zeros_like(divisors), divisors)
        sines = tl.where(valid_h, tl.sin(angle), 0.0)
        cosines = tl.where(valid_h, tl.cos(angle), 0.0)
        # The LayerNorm's variance is 1/2 - mean^2 (sin^2 + cos^2 = 1 per pair). The mean is
        # summed in each warp: summed over the program it would pass through shared memory.
        mean = tl.sum(_sum_channels(sines + cosines), axis=0) / (2 * half)
        rstd = 1.0 / tl.sqrt_rn(0.5 - mean * mean + eps)
        code_a = _code_scores(code_sines_a, code_cosines_a, totals_a, sines, cosines, mean, rstd)
        code_b = _code_scores(code_sines_b, code_cosines_b, totals_b, sines, cosines, mean, rstd)
        max_a, sum_a, pooled_a = _pool_row(queries_a, code_a, x, row_scale, max_a, sum_a, pooled_a)
        max_b, sum_b, pooled_b = _pool_row(queries_b, code_b, x, row_scale, max_b, sum_b, pooled_b)

    first = (b * splits + split) * r
    _store_partial(part_ptr, stats_ptr, first, offs_a, r, c, channels, pooled_a, max_a, sum_a)
    _store_partial(part_ptr, stats_ptr, first, offs_b, r, c, channels, pooled_b, max_b, sum_b)


@compile_checked(
    CompileVariant(
        "merge",
        {
            "part_ptr": "*fp32",
            "stats_ptr": "*fp32",
            "pooled_ptr": "*fp32",
            "logsumexp_ptr": "*fp32",
            "splits": "i32",
            "r": "i32",
            "c": "i32",
            "col_blocks": "i32",
        },
        {"BLOCK_S": MERGE_BLOCK_S, "BLOCK_C": MERGE_BLOCK_C},
        MERGE_LAUNCH,
    )
)
@triton.jit
def sinusoid_merge_kernel(
    part_ptr,
    stats_ptr,
    pooled_ptr,
    logsumexp_ptr,
    splits,
    r,
    c,
    col_blocks,
    BLOCK_S: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Program (template, query, block of columns) adds the splits' partial pooled rows
    (B, splits, R, C) weighted by their maxima and sums (B, splits, 2, R), in split order."""
    pid = tl.program_id(0)
    col_block = pid % col_blocks
    query = (pid // col_blocks).to(tl.int64)
    b = query // r
    cols = col_block * BLOCK_C + tl.arange(0, BLOCK_C)
    valid_c = cols < c
    # Split s of template b: max and sum at stats + 2 (b splits + s) r + (0 or r) + query, pooled
    # row at part + ((b splits + s) r + query) c.
    rows = b * splits * r
    query_r = query % r
    top = tl.full((), float("-inf"), dtype=tl.float32)
    for s0 in range(0, splits, BLOCK_S):
        split = s0 + tl.arange(0, BLOCK_S)
        split_max = tl.load(
            stats_ptr + 2 * (rows + split * r) + query_r, mask=split < splits, other=float("-inf")
        )
        top = tl.maximum(top, tl.max(split_max, axis=0))
    total = tl.zeros((), dtype=tl.float32)
    pooled = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for s0 in range(0, splits, BLOCK_S):
        split = s0 + tl.arange(0, BLOCK_S)
        valid_s = split < splits
        stats = stats_ptr + 2 * (rows + split * r) + query_r
        split_max = tl.load(stats, mask=valid_s, other=float("-inf"))
        split_sum = tl.load(stats + r, mask=valid_s, other=0.0)
        # Splits wholly in the padding have max -inf and sum 0: weight 0.
        weight = tl.where(valid_s, tl.exp(split_max - top), 0.0)
        total += tl.sum(weight * split_sum, axis=0)
        part = tl.load(
            part_ptr + (rows + split * r + query_r)[:, None] * c + cols[None, :],
            mask=valid_s[:, None] & valid_c[None, :],
            other=0.0,
        )
        pooled += tl.sum(weight[:, None] * part, axis=0)
    tl.store(pooled_ptr + query * c + cols, pooled / total, mask=valid_c)
    tl.store(logsumexp_ptr + query, top + tl.log(total), mask=col_block == 0)


def _tiled_variants() -> list[CompileVariant]:
    variants = []
    for dtype in _LABELS.values():
        for block_r in (16, 32, MAX_QUERIES):
            for has_scale in (False, True):
                signature = {
                    "x_ptr": f"*{dtype}",
                    "queries_ptr": "*fp32",
                    "code_queries_ptr": "*fp32",
                    "totals_ptr": "*fp32",
                    "positions_ptr": "*fp32",
                    "divisors_ptr": "*fp32",
                    "scale_ptr": "*fp32",
                    "lengths_ptr": "*i64",
                    "part_ptr": "*fp32",
                    "stats_ptr": "*fp32",
                    "n": "i32",
                    "c": "i32",
                    "r": "i32",
                    "half": "i32",
                    "split_size": "i32",
                    "splits": "i32",
                    "has_lengths": "i32",
                    "position_scale": "fp32",
                    "eps": "fp32",
                }
                constexprs = {
                    "HAS_SCALE": has_scale,
                    "BLOCK_R": block_r,
                    "BLOCK_N": BLOCK_N,
                    "BLOCK_C": BLOCK_C,
                    "BLOCK_H": BLOCK_H,
                }
                label = f"{dtype} R<={block_r}{' scaled' if has_scale else ''}"
                variants.append(CompileVariant(label, signature, constexprs, TILED_LAUNCH))
    return variants


@compile_checked(*_tiled_variants())
@triton.jit
def sinusoid_pool_kernel(
    x_ptr,
    queries_ptr,
    code_queries_ptr,
    totals_ptr,
    positions_ptr,
    divisors_ptr,
    scale_ptr,
    lengths_ptr,
    part_ptr,
    stats_ptr,
    n,
    c,
    r,
    half,
    split_size,
    splits,
    has_lengths,
    position_scale,
    eps,
    HAS_SCALE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """The tiled kernel; part (B, splits, R, C) starts at zero."""
    pid = tl.program_id(0)
    split = pid % splits
    b = (pid // splits).to(tl.int64)
    x_ptr += b * n * c
    queries_ptr += b * r * c
    code_queries_ptr += b * r * 2 * half
    positions_ptr += b * n
    scale_ptr += b * n
    first = (b * splits + split) * r
    part_ptr += first * c
    offs_r = tl.arange(0, BLOCK_R)
    valid_r = offs_r < r
    totals = tl.load(totals_ptr + b * r + offs_r, mask=valid_r, other=0.0)

    running_max = tl.full((BLOCK_R,), float("-inf"), dtype=tl.float32)
    running_sum = tl.zeros((BLOCK_R,), dtype=tl.float32)
    start = split * split_size
    length = tl.load(lengths_ptr + b, mask=has_lengths != 0, other=n).to(tl.int32)
    stop = tl.minimum(start + split_size, length)
    for n0 in range(start, stop, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        valid_n = offs_n < stop
        rows = x_ptr + offs_n[:, None].to(tl.int64) * c
        scores = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
        for c0 in range(0, c, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            x = tl.load(rows + cols[None, :], mask=valid_n[:, None] & (cols[None, :] < c),
                        other=0.0).to(tl.float32)  # fmt: skip
            q = tl.load(queries_ptr + offs_r[:, None] * c + cols[None, :],
                        mask=valid_r[:, None] & (cols[None, :] < c), other=0.0)  # fmt: skip
            scores += tl.dot(x, tl.trans(q), input_precision="ieee")
        if HAS_SCALE:
            row_scale = tl.load(scale_ptr + offs_n, mask=valid_n, other=0.0)
            scores *= row_scale[:, None]

        # The codes' scores, code . g_r = sum_k g_r[sin k] sin a_k + g_r[cos k] cos a_k, and the
        # LayerNorm's mean; the variance is 1/2 - mean^2 (sin^2 + cos^2 = 1 per pair).
        phase = tl.load(positions_ptr + offs_n, mask=valid_n, other=0.0) * position_scale
        code_scores = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
        code_sums = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for h0 in range(0, half, BLOCK_H):
            pairs = h0 + tl.arange(0, BLOCK_H)
            valid_h = pairs < half
            divisor = tl.load(divisors_ptr + pairs, mask=valid_h, other=1.0)
            # IEEE division, as the CPU kernel and torch: the angles reach hundreds of radians,
            # where an ulp of the angle is visible in the codes.
            angle = tl.math.div_rn(phase[:, None], divisor[None, :])
            sines = tl.where(valid_h[None, :], tl.sin(angle), 0.0)
            cosines = tl.where(valid_h[None, :], tl.cos(angle), 0.0)
            code_sums += tl.sum(sines + cosines, axis=1)
            g = code_queries_ptr + offs_r[:, None] * 2 * half + pairs[None, :]
            g_mask = valid_r[:, None] & valid_h[None, :]
            g_sin = tl.load(g, mask=g_mask, other=0.0)
            g_cos = tl.load(g + half, mask=g_mask, other=0.0)
            code_scores += tl.dot(sines, tl.trans(g_sin), input_precision="ieee")
            code_scores += tl.dot(cosines, tl.trans(g_cos), input_precision="ieee")
        mean = code_sums / (2 * half)
        rstd = 1.0 / tl.sqrt_rn(0.5 - mean * mean + eps)
        scores += rstd[:, None] * (code_scores - mean[:, None] * totals[None, :])
        scores = tl.where(valid_n[:, None], scores, float("-inf"))

        # A tile has a valid row, so the new max is finite (or NaN from a NaN input).
        new_max = tl.maximum(running_max, tl.max(scores, axis=0))
        rescale = tl.exp(running_max - new_max)
        weights = tl.exp(scores - new_max[None, :])
        running_sum = running_sum * rescale + tl.sum(weights, axis=0)
        running_max = new_max
        if HAS_SCALE:
            weights *= row_scale[:, None]
        for c0 in range(0, c, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            x = tl.load(rows + cols[None, :], mask=valid_n[:, None] & (cols[None, :] < c),
                        other=0.0).to(tl.float32)  # fmt: skip
            part = part_ptr + offs_r[:, None] * c + cols[None, :]
            part_mask = valid_r[:, None] & (cols[None, :] < c)
            pooled = tl.load(part, mask=part_mask, other=0.0) * rescale[:, None]
            pooled += tl.dot(tl.trans(weights), x, input_precision="ieee")
            tl.store(part, pooled, mask=part_mask)

    stats = stats_ptr + 2 * first + offs_r
    tl.store(stats, running_max, mask=valid_r)
    tl.store(stats + r, running_sum, mask=valid_r)


# ---------------------------------------------------------------- plans and the launcher


@dataclass(frozen=True)
class _Geometry:
    """How forward splits the work, a function of the shapes alone (so the order in which the
    partial sums are added, hence the bits of the result, is too)."""

    resident: bool
    splits: int  # of a template's rows
    split_size: int  # tiled kernel: rows of a split
    block_r: int
    query_blocks: int  # programs of a split


def _geometry(n: int, c: int, r: int, half: int) -> _Geometry:
    if r > MAX_QUERIES:
        raise ValueError(f"sinusoid_attention_pool: the Triton kernel takes R <= {MAX_QUERIES}, "
                         f"got R = {r}")  # fmt: skip
    n = max(n, 1)
    if c <= WIDTH and 2 * half <= WIDTH:
        splits = max(1, min(SPLITS, triton.cdiv(n, MIN_SPLIT_ROWS)))
        return _Geometry(True, splits, 0, QUERY_BLOCK, triton.cdiv(r, QUERY_BLOCK))
    splits = max(1, min(TILED_MAX_SPLITS, triton.cdiv(n, TILED_MIN_SPLIT)))
    size = triton.cdiv(triton.cdiv(n, splits), BLOCK_N) * BLOCK_N
    splits = triton.cdiv(n, size)
    block_r = max(16, triton.next_power_of_2(r))
    return _Geometry(False, splits, size, block_r, 1)


def _label(dtype: torch.dtype) -> str:
    return triton_label("sinusoid_attention_pool", _LABELS, dtype)


def _plan(geometry: _Geometry, b: int, c: int, r: int, label: str, has_scale: bool):
    if geometry.resident:
        variant = f"{label} R<={geometry.block_r}"
        grid = (b * geometry.query_blocks * geometry.splits,)
        main = Launch("sinusoid_pool_resident_kernel", variant, grid)
    else:
        variant = f"{label} R<={geometry.block_r}{' scaled' if has_scale else ''}"
        main = Launch("sinusoid_pool_kernel", variant, (b * geometry.splits,))
    return [
        main,
        Launch("sinusoid_merge_kernel", "merge", (b * r * triton.cdiv(c, MERGE_BLOCK_C),)),
    ]


def forward_plan(
    b: int, n: int, c: int, r: int, half: int, dtype: torch.dtype, has_scale: bool
) -> list[Launch]:
    """The Triton launches of ``forward`` for these sizes, in order, without tensors."""
    geometry = _geometry(n, c, r, half)
    label = _label(dtype)
    return _plan(geometry, b, c, r, label, has_scale) if b > 0 else []


def forward(
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
    """torch.ops.fusedset.sinusoid_attention_pool for float32, float16 and bfloat16 x, R <= 64:
    (pooled (B, R, C), logsumexp (B, R)) in float32."""
    batch, n, c = x.shape
    r = queries.shape[1]
    half = divisors.shape[0]
    geometry = _geometry(n, c, r, half)
    label = _label(x.dtype)
    f32 = {"dtype": torch.float32, "device": x.device}
    pooled = torch.empty(batch, r, c, **f32)
    logsumexp = torch.empty(batch, r, **f32)
    if batch == 0:
        return pooled, logsumexp
    main, merge = _plan(geometry, batch, c, r, label, row_scale is not None)
    part_shape = (batch, geometry.splits, r, c)
    stats = torch.empty(batch, geometry.splits, 2, r, **f32)
    x = x.contiguous()
    queries = queries.to(**f32).contiguous()
    positions = positions.to(**f32).contiguous()
    divisors = divisors.to(**f32).contiguous()
    scale = positions if row_scale is None else row_scale.to(**f32).contiguous()
    has_lengths = int(lengths is not None)
    if lengths is None:  # never read
        lengths = torch.empty(1, dtype=torch.int64, device=x.device)
    else:
        lengths = lengths.to(device=x.device, dtype=torch.int64).contiguous()
    if geometry.resident:
        part = torch.empty(part_shape, **f32)
        code_queries = position_queries.to(**f32).contiguous()
        sinusoid_pool_resident_kernel[main.grid](
            x, queries, code_queries, positions, divisors, scale, lengths, part, stats, n, c, r,
            half, geometry.splits, geometry.query_blocks, int(row_scale is not None),
            has_lengths, position_scale, eps, BLOCK_R=QUERY_BLOCKS[0], BLOCK_R2=QUERY_BLOCKS[1],
            WIDTH=WIDTH, LANES=LANES, WARPS=RESIDENT_LAUNCH["num_warps"], **RESIDENT_LAUNCH,
        )  # fmt: skip
    else:
        part = torch.zeros(part_shape, **f32)
        code_queries = position_queries.to(**f32)
        totals = code_queries.sum(-1).contiguous()
        # Channels [sines | cosines], as the tiled kernel reads them.
        code_queries = torch.cat([code_queries[..., 0::2], code_queries[..., 1::2]], -1)
        sinusoid_pool_kernel[main.grid](
            x, queries, code_queries.contiguous(), totals, positions, divisors, scale, lengths,
            part, stats, n, c, r, half, geometry.split_size, geometry.splits, has_lengths,
            position_scale, eps, HAS_SCALE=row_scale is not None, BLOCK_R=geometry.block_r,
            BLOCK_N=BLOCK_N, BLOCK_C=BLOCK_C, BLOCK_H=BLOCK_H, **TILED_LAUNCH,
        )  # fmt: skip
    sinusoid_merge_kernel[merge.grid](
        part, stats, pooled, logsumexp, geometry.splits, r, c, triton.cdiv(c, MERGE_BLOCK_C),
        BLOCK_S=MERGE_BLOCK_S, BLOCK_C=MERGE_BLOCK_C, **MERGE_LAUNCH,
    )  # fmt: skip
    return pooled, logsumexp


def sinusoid_attention_pool(x, queries, position_queries, positions, divisors, position_scale,
                            eps, row_scale=None, lengths=None, series=True):  # fmt: skip
    """fusedset::sinusoid_attention_pool on CUDA tensors. The kernel takes every sine (the GPU
    has flops to spare): ``series`` is unused. float64 and R > MAX_QUERIES (beyond the kernel's
    register budget) run the eager form."""
    args = (x, queries, position_queries, positions, divisors, position_scale, eps, row_scale,
            lengths)  # fmt: skip
    if x.dtype == torch.float64 or queries.shape[1] > MAX_QUERIES:
        from fusedset.reference.sinusoid_attention_pool import pool

        return pool(*args)
    return forward(*args)


def sinusoid_attention_pool_backward(grad_pooled, grad_logsumexp, pooled, logsumexp, x, queries,
                                     position_queries, positions, divisors, position_scale, eps,
                                     row_scale, lengths, series, output_mask):  # fmt: skip
    """fusedset::sinusoid_attention_pool_backward on CUDA tensors: eager, the rows recomputed
    in chunks under autograd (fusedset.ops.sinusoid_attention_pool.pool_backward)."""
    from fusedset.ops.sinusoid_attention_pool import DIFFERENTIABLE, PoolInputs, pool_backward

    inputs = PoolInputs(x, queries, position_queries, positions, divisors, position_scale, eps,
                        row_scale, lengths, series)  # fmt: skip
    wanted = dict(zip(DIFFERENTIABLE, output_mask, strict=True))
    needs = tuple(wanted.get(name, False) for name in PoolInputs._fields)
    grads = dict(
        zip(PoolInputs._fields, pool_backward(grad_pooled, grad_logsumexp, inputs, pooled,
                                              logsumexp, needs), strict=True)
    )  # fmt: skip
    # Gradients not asked for come back empty, as the CPU kernel returns them.
    return tuple(
        grads[k]
        if grads[k] is not None
        else (x if getattr(inputs, k) is None else getattr(inputs, k)).new_empty(0)
        for k in DIFFERENTIABLE
    )
