"""Triton kernels of cluster_accumulate (the CUDA path).

Forward: program (column block, split, probe) walks its split of the images in tiles of
BLOCK_N, forms the BLOCK_M x BLOCK_N logits from the whole key row (BLOCK_D = D rounded up to a
power of two), the column softmax and the weighted sum of one BLOCK_C slice of the output
columns, which are [values | keys] when the keys are a second value stream. Programs of one
tile differ only in the column block, the fastest grid axis, so they run together and the
repeated key reads hit L2. Each program writes its partial sums; the partials are added in
split order afterwards: no atomics, the same inputs give the same bits.

Backward: program (split, probe) recomputes the assignment of each tile and writes the key
and value gradients of its images and a partial of the query gradient.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fusedset.triton_kernels.registry import CompileVariant, compile_checked

NORM_EPS = 1e-5
MAX_CENTERS = 64
MAX_KEY_DIM = 256
# A split covers at least this many images; a probe has at most MAX_SPLITS of them, so the
# partials take O(B * M * C) memory whatever N is.
MIN_SPLIT = 512
MAX_SPLITS = 128

_TYPES = {"fp32": "*fp32", "fp16": "*fp16", "bf16": "*bf16"}


def _forward_variants() -> list[CompileVariant]:
    variants = []
    for dtype, ptr in _TYPES.items():
        for block_m, block_d in ((16, 128), (64, 256)):
            signature = {
                "keys_ptr": ptr,
                "queries_ptr": "*fp32",
                "bias_ptr": "*fp32",
                "values_ptr": ptr,
                "part_ptr": "*fp32",
                "n": "i32",
                "d": "i32",
                "c": "i32",
                "m": "i32",
                "kd": "i32",
                "split_size": "i32",
                "shared_queries": "i32",
                "scale": "fp32",
            }
            variants.append(
                CompileVariant(
                    f"{dtype} M<={block_m} D<={block_d}",
                    signature,
                    constexprs={
                        "BLOCK_M": block_m,
                        "BLOCK_D": block_d,
                        "NORMALIZE": True,
                        "PRECISION": "ieee" if dtype == "fp32" else "tf32",
                        "ACC": tl.float32,
                    },
                )
            )
    return variants


@triton.jit
def _centers(queries_ptr, bias_ptr, b, d, m, shared_queries, BLOCK_M: tl.constexpr,
             BLOCK_D: tl.constexpr):  # fmt: skip
    qb = tl.where(shared_queries != 0, 0, b)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = tl.load(
        queries_ptr + qb * m * d + offs_m[:, None] * d + offs_d[None, :],
        mask=(offs_m[:, None] < m) & (offs_d[None, :] < d),
        other=0.0,
    )
    bias = tl.load(bias_ptr + qb * m + offs_m, mask=offs_m < m, other=0.0)
    return offs_m, offs_d, q, bias


@triton.jit
def _assign(keys_ptr, q, bias, offs_n, valid_n, offs_d, offs_m, d, m, scale,
            PRECISION: tl.constexpr, ACC: tl.constexpr):  # fmt: skip
    """A tile's keys (BLOCK_N, BLOCK_D) and assignment (BLOCK_M, BLOCK_N): the softmax of the
    logits over the centers, zero in the columns of images past the end."""
    k = tl.load(
        keys_ptr + offs_n[:, None] * d + offs_d[None, :],
        mask=valid_n[:, None] & (offs_d[None, :] < d),
        other=0.0,
    ).to(ACC)
    logits = (tl.dot(q, tl.trans(k), input_precision=PRECISION) + bias[:, None]) * scale
    logits = tl.where(offs_m[:, None] < m, logits, float("-inf"))
    e = tl.exp(logits - tl.max(logits, axis=0)[None, :])
    a = e / tl.sum(e, axis=0)[None, :]
    return k, tl.where(valid_n[None, :], a, 0.0)


@triton.jit
def _inverse_norms(rows, valid_n, c, ACC: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_C: tl.constexpr):  # fmt: skip
    """1 / (||v|| + eps) of a tile's value rows."""
    sq = tl.zeros((BLOCK_N,), dtype=ACC)
    for c0 in range(0, c, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        v = tl.load(
            rows + cols[None, :], mask=valid_n[:, None] & (cols[None, :] < c), other=0.0
        ).to(ACC)
        sq += tl.sum(v * v, axis=1)
    return 1.0 / (tl.sqrt(sq) + NORM_EPS)


@compile_checked(*_forward_variants())
@triton.autotune(
    configs=[
        triton.Config({"BLOCK_N": 32, "BLOCK_C": 64}, num_warps=4),
        triton.Config({"BLOCK_N": 64, "BLOCK_C": 64}, num_warps=8),
        triton.Config({"BLOCK_N": 32, "BLOCK_C": 128}, num_warps=8),
    ],
    key=["n", "d", "c", "m", "kd"],
)
@triton.jit
def cluster_forward_kernel(
    keys_ptr,
    queries_ptr,
    bias_ptr,
    values_ptr,
    part_ptr,
    n,
    d,
    c,
    m,
    kd,
    split_size,
    shared_queries,
    scale,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    NORMALIZE: tl.constexpr,
    PRECISION: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    cb = tl.program_id(0)
    split = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    splits = tl.num_programs(1)
    width = c + kd + 1  # a partial row: [values | keys | den]
    value_blocks = tl.cdiv(c, BLOCK_C)
    is_key_block = cb >= value_blocks
    col0 = tl.where(is_key_block, (cb - value_blocks) * BLOCK_C, cb * BLOCK_C)
    stream_cols = tl.where(is_key_block, kd, c)
    stream = tl.where(is_key_block, keys_ptr + b * n * d, values_ptr + b * n * c)

    offs_c = col0 + tl.arange(0, BLOCK_C)
    offs_m, offs_d, q, bias = _centers(queries_ptr, bias_ptr, b, d, m, shared_queries, BLOCK_M, BLOCK_D)
    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=ACC)
    den = tl.zeros((BLOCK_M,), dtype=ACC)
    start = split * split_size
    stop = tl.minimum(start + split_size, n)
    for n0 in range(start, stop, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        valid_n = offs_n < stop
        k, a = _assign(keys_ptr + b * n * d, q, bias, offs_n, valid_n, offs_d, offs_m, d, m,
                       scale, PRECISION, ACC)  # fmt: skip
        den += tl.sum(a, axis=1)
        rows = stream + offs_n[:, None] * stream_cols
        weight = a
        if NORMALIZE:
            if not is_key_block:
                r = _inverse_norms(rows, valid_n, c, ACC, BLOCK_N, BLOCK_C)
                weight = a * r[None, :]
        v = tl.load(
            rows + offs_c[None, :],
            mask=valid_n[:, None] & (offs_c[None, :] < stream_cols),
            other=0.0,
        ).to(ACC)
        acc += tl.dot(weight, v, input_precision=PRECISION)

    out = part_ptr + ((b * splits + split) * m) * width
    out_col = tl.where(is_key_block, c + offs_c, offs_c)
    tl.store(
        out + offs_m[:, None] * width + out_col[None, :],
        acc,
        mask=(offs_m[:, None] < m) & (offs_c[None, :] < stream_cols),
    )
    tl.store(out + offs_m * width + c + kd, den, mask=(offs_m < m) & (cb == 0))
