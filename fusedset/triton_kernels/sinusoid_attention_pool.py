"""Triton kernel of sinusoid_attention_pool (the CUDA path).

Program (split, template) walks its split of the rows in tiles of BLOCK_N. Per tile it forms the
BLOCK_N x R scores: the row scores (the width in slices of BLOCK_C) and the codes' scores (sin
and cos of the tile's angles in slices of BLOCK_H channel pairs, the LayerNorm's mean from the
same slices), updates its running max and sum, and folds the tile's weighted rows into its
partial pooled rows (R x C, rescaled by the change of the max), kept in its own slice of a
partial buffer. The partials of a template are merged in split order afterwards: no atomics, the
same inputs give the same bits. The (N, D) codes and (N, R) scores never touch memory; the
partials take O(B * R * C) whatever N is.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fusedset.triton_kernels.registry import CompileVariant, compile_checked

MAX_QUERIES = 64
# A split covers at least this many rows; a template has at most MAX_SPLITS of them.
MIN_SPLIT = 512
MAX_SPLITS = 128
# Fixed, not tuned: the partial sums are taken per tile, and the tiling must not change with the
# configuration for the result to keep its bits. The ieee (fp32) dots run on FMA units and hold
# a whole reduction slice per thread: 16-wide slices of the width and of the channel pairs, the
# widest that compile without spills at R <= 64 on sm_80 and sm_90 (32-wide ones spilled
# 100-2000 bytes). Without a register cap ptxas sometimes stopped at 128 and spilled.
BLOCK_N = 32
BLOCK_C = 16
BLOCK_H = 16
LAUNCH = {"num_warps": 8, "num_stages": 1, "maxnreg": 255}


def _variants() -> list[CompileVariant]:
    variants = []
    for dtype in ("fp32", "fp16", "bf16"):
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
                variants.append(CompileVariant(label, signature, constexprs, LAUNCH))
    return variants


@compile_checked(*_variants())
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
    position_scale,
    eps,
    HAS_SCALE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    split = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    splits = tl.num_programs(0)
    x_ptr += b * n * c
    queries_ptr += b * r * c
    code_queries_ptr += b * r * 2 * half
    positions_ptr += b * n
    scale_ptr += b * n
    part_ptr += (b * splits + split) * BLOCK_R * c
    offs_r = tl.arange(0, BLOCK_R)
    valid_r = offs_r < r
    totals = tl.load(totals_ptr + b * r + offs_r, mask=valid_r, other=0.0)

    running_max = tl.full((BLOCK_R,), float("-inf"), dtype=tl.float32)
    running_sum = tl.zeros((BLOCK_R,), dtype=tl.float32)
    start = split * split_size
    stop = tl.minimum(start + split_size, tl.load(lengths_ptr + b).to(tl.int32))
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
            pooled = tl.load(part, mask=cols[None, :] < c, other=0.0) * rescale[:, None]
            pooled += tl.dot(tl.trans(weights), x, input_precision="ieee")
            tl.store(part, pooled, mask=cols[None, :] < c)

    stats = stats_ptr + ((b * splits + split) * 2) * BLOCK_R + offs_r
    tl.store(stats, running_max)
    tl.store(stats + BLOCK_R, running_sum)


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
    if r > MAX_QUERIES:
        raise ValueError(f"sinusoid_attention_pool: the Triton kernel takes R <= {MAX_QUERIES}, "
                         f"got R = {r}")  # fmt: skip
    half = divisors.shape[0]
    device = x.device
    f32 = {"dtype": torch.float32, "device": device}
    code_queries = position_queries.to(**f32)
    totals = code_queries.sum(-1).contiguous()
    # Channels [sines | cosines], as the kernel reads them.
    code_queries = torch.cat([code_queries[..., 0::2], code_queries[..., 1::2]], -1).contiguous()
    if lengths is None:
        lengths = torch.full((batch,), n, dtype=torch.int64, device=device)
    splits = max(1, min(MAX_SPLITS, triton.cdiv(n, MIN_SPLIT)))
    split_size = triton.cdiv(triton.cdiv(n, splits), BLOCK_N) * BLOCK_N
    splits = triton.cdiv(n, split_size)
    block_r = max(16, triton.next_power_of_2(r))
    part = torch.zeros(batch, splits, block_r, c, **f32)
    stats = torch.empty(batch, splits, 2, block_r, **f32)
    scale = row_scale.to(**f32).contiguous() if row_scale is not None else totals
    sinusoid_pool_kernel[(splits, batch)](
        x.contiguous(), queries.to(**f32).contiguous(), code_queries, totals,
        positions.to(**f32).contiguous(), divisors.to(**f32).contiguous(), scale,
        lengths.to(device=device, dtype=torch.int64).contiguous(), part, stats,
        n, c, r, half, split_size, position_scale, eps,
        HAS_SCALE=row_scale is not None, BLOCK_R=block_r, BLOCK_N=BLOCK_N, BLOCK_C=BLOCK_C,
        BLOCK_H=BLOCK_H, **LAUNCH,
    )  # fmt: skip
    split_max, split_sum = stats[:, :, 0, :r], stats[:, :, 1, :r]
    top = split_max.amax(dim=1)
    # Splits wholly in the padding have max -inf and sum 0: weight 0.
    weight = torch.exp(split_max - top[:, None])
    total = (weight * split_sum).sum(dim=1)
    pooled = (weight[..., None] * part[:, :, :r]).sum(dim=1) / total[..., None]
    return pooled, top + total.log()
