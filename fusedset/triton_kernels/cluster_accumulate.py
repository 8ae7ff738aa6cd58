"""Triton kernels of cluster_accumulate (the CUDA path).

Two paths, each a pure plan function (``forward_plan``, ``backward_plan``) that its launcher runs:

- full width (M <= WIDE_M, D <= WIDE_D, C <= WIDE_C: the shapes CAFace uses): program (probe,
  split) walks its split of the images in tiles of BLOCK_N rows. Each tile's key rows and value
  rows are loaded once, full width, and everything is computed from those registers: the
  logits, the softmax over the centers, the feature norms, and the sums of every output column
  (forward) or the key and value gradients of the tile (backward). Inputs are read once and the
  gradients written once.
- column blocks (any C and D, M <= MAX_CENTERS): program (probe, split, column block) forms the
  assignment of each tile with the key dimension in chunks and accumulates one BLOCK_C slice of
  the output columns; norms and the backward's value gradients re-read rows by chunks. Correct
  everywhere, slower: it re-reads keys once per column block.

Each program writes one partial (its sums, or its share of the query and bias gradients); a
reduce kernel adds the partials of a probe (of every probe for the query gradient of shared
queries) in a fixed order and writes the outputs. No atomics: the same inputs give the same
bits. The number of splits is a function of (B, N) only.

Every dot runs in ieee fp32 on the inputs upcast to fp32 (fp64 for fp64), so fp16 and bf16
inputs are accumulated exactly as their fp32 upcast would be, never through tf32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fusedset._dtypes import accumulation_dtype, triton_label
from fusedset.triton_kernels.registry import (
    CompileVariant,
    Launch,
    compile_checked,
    compile_checked_helper,
)

NORM_EPS = tl.constexpr(1e-5)  # a jit function reads only constexpr globals
MAX_CENTERS = 64
# The full-width path holds a tile of BLOCK_N rows of keys and values and the (BLOCK_M, C)
# sums in registers: these bounds keep it spill-free on sm_80 and sm_90.
WIDE_M = 16
WIDE_D = 128
WIDE_C = 512
# Programs per call at large N: one full wave of the full-width kernels on an H100 (132 SMs at
# the residency the compile check reports), so that no SM idles in a last partial wave. Below
# that, a split keeps at least MIN_ROWS images: its partial (written once, read once by the
# reduce) stays small next to the rows it sums, at any N, and N = 16384 still fills 132 SMs.
SMS = 132
FORWARD_PROGRAMS = 2 * SMS
BACKWARD_PROGRAMS = SMS
MIN_ROWS = 120
# The reduce's column block: narrow, for many programs on a short partial row (the partials of
# few centers), wide once the row alone fills the SMs.
REDUCE_BLOCKS = (32, 256)
REDUCE_PARTS = 32

_LABELS = {
    torch.float32: "fp32",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.float64: "fp64",
}
_ACC = {"fp32": tl.float32, "fp16": tl.float32, "bf16": tl.float32, "fp64": tl.float64}
_ACC_LABEL = {"fp32": "fp32", "fp16": "fp32", "bf16": "fp32", "fp64": "fp64"}

# Launch configurations, fixed (no autotune): the compile check covers exactly what runs. The
# ieee (fp32) dots run on FMA units and hold a whole reduction slice per thread, so tiles stay
# narrow where they reduce, and one pipeline stage: the memory-bound loops gain nothing from
# more. The full-width backward holds twice the forward's tiles (gradients beside inputs): 8
# rows a tile, as 16 spill.
_WIDE_FORWARD = {"BLOCK_N": 16, "BLOCK_D": WIDE_D, "BLOCK_C": WIDE_C, "num_warps": 8}
_WIDE_BACKWARD = {"BLOCK_N": 8, "BLOCK_D": WIDE_D, "BLOCK_C": WIDE_C, "num_warps": 8}
_BLOCKED_FORWARD = {"BLOCK_N": 32, "BLOCK_D": 32, "BLOCK_C": 64, "num_warps": 8}
_BLOCKED_BACKWARD = {"BLOCK_N": 32, "BLOCK_D": 16, "BLOCK_C": 16, "num_warps": 8}
_REDUCE_OPTIONS = {"num_warps": 4, "num_stages": 1}

_SCALARS = {
    "n": "i32",
    "d": "i32",
    "c": "i32",
    "m": "i32",
    "kd": "i32",
    "splits": "i32",
    "split_size": "i32",
    "shared_queries": "i32",
    "has_bias": "i32",
    "normalize": "i32",
    "scale": "fp32",
}


def _signature(label: str, backward: bool) -> dict[str, str]:
    ptr, acc = f"*{label}", f"*{_ACC_LABEL[label]}"
    grads = (
        {
            "grad_num_ptr": acc,
            "grad_den_ptr": acc,
            "grad_key_num_ptr": acc,
            "grad_keys_ptr": ptr,
            "grad_values_ptr": ptr,
        }
        if backward
        else {}
    )
    return {
        "keys_ptr": ptr,
        "queries_ptr": ptr,
        "bias_ptr": ptr,
        "values_ptr": ptr,
        **grads,
        "part_ptr": acc,
        **_SCALARS,
    }


def _block_m(m: int, blocks: tuple[int, int]) -> int:
    """The smaller center block when M fits it. On the full-width path it is 8, not less: an
    fp32 dot reduces over at least 8 (the backward's reduce over the centers)."""
    return blocks[0] if m <= blocks[0] else blocks[1]


def _main_variant(label: str, block_m: int, config: dict, backward: bool) -> CompileVariant:
    tiles = {k: v for k, v in config.items() if k.startswith("BLOCK_")}
    constexprs = {"BLOCK_M": block_m, **tiles, "ACC": _ACC[label]}
    options = {"num_warps": config["num_warps"], "num_stages": 1}
    return CompileVariant(f"{label} M<={block_m}", _signature(label, backward), constexprs, options)


def _reduce_variant(part: str, out: str, block: int) -> CompileVariant:
    signature = {
        "part_ptr": f"*{part}",
        "first_ptr": f"*{out}",
        "second_ptr": f"*{out}",
        "third_ptr": f"*{out}",
        "groups": "i32",
        "parts": "i32",
        "width": "i32",
        "row_len": "i32",
        "first_cols": "i32",
        "second_end": "i32",
    }
    constexprs = {"BLOCK": block, "BLOCK_PARTS": REDUCE_PARTS}
    return CompileVariant(f"{part} to {out}, {block}", signature, constexprs, _REDUCE_OPTIONS)


# float64 (the gradcheck dtype) takes the column-block path only.
_WIDE_LABELS = ("fp32", "fp16", "bf16")
_WIDE_BLOCK_M = (8, WIDE_M)
_BLOCKED_BLOCK_M = (16, MAX_CENTERS)
_FORWARD_WIDE = [
    _main_variant(lb, bm, _WIDE_FORWARD, False) for lb in _WIDE_LABELS for bm in _WIDE_BLOCK_M
]
_BACKWARD_WIDE = [
    _main_variant(lb, bm, _WIDE_BACKWARD, True) for lb in _WIDE_LABELS for bm in _WIDE_BLOCK_M
]
_FORWARD_BLOCKED = [
    _main_variant(lb, bm, _BLOCKED_FORWARD, False)
    for lb in (*_WIDE_LABELS, "fp64")
    for bm in _BLOCKED_BLOCK_M
]
_BACKWARD_BLOCKED = [
    _main_variant(lb, bm, _BLOCKED_BACKWARD, True)
    for lb in (*_WIDE_LABELS, "fp64")
    for bm in _BLOCKED_BLOCK_M
]
_REDUCE = [
    _reduce_variant(part, out, block)
    for part, out in (("fp32", "fp32"), ("fp32", "fp16"), ("fp32", "bf16"), ("fp64", "fp64"))
    for block in REDUCE_BLOCKS
]


# ---------------------------------------------------------------- shared device pieces


@compile_checked_helper
@triton.jit
def _center_softmax(logits, bias, valid_m, valid_n, scale):
    """The assignment of a tile (BLOCK_M, BLOCK_N) from its logits: the softmax over the
    centers, zero in the columns of images past the end."""
    logits = (logits + bias[:, None]) * scale
    logits = tl.where(valid_m[:, None], logits, float("-inf"))
    e = tl.exp(logits - tl.max(logits, axis=0)[None, :])
    a = e / tl.sum(e, axis=0)[None, :]
    return tl.where(valid_n[None, :], a, 0.0)


@compile_checked_helper
@triton.jit
def _inverse_norms(squares, normalize):
    """1 / (||v|| + eps) from the row sums of squares, or ones when values are not normalized."""
    return tl.where(normalize != 0, 1.0 / (tl.sqrt(squares) + NORM_EPS), 1.0)


@compile_checked_helper
@triton.jit
def _radial(v_dot_u, r, normalize):
    """Per row, the coefficient of v in d(v / (|v| + eps)) u = r u - v (v . u) r^2 / |v|: zero
    for rows of norm zero and when values are not normalized."""
    norm = 1.0 / r - NORM_EPS
    keep = (normalize != 0) & (norm > 0)
    return tl.where(keep, v_dot_u * r * r / tl.where(keep, norm, 1.0), 0.0)


@compile_checked_helper
@triton.jit
def _program(pid, splits, split_size, n, m, d, shared_queries, queries_ptr, bias_ptr):
    """(probe as int64, first row, end row, this probe's queries and bias) of program pid."""
    b = (pid // splits).to(tl.int64)
    split = pid % splits
    qb = tl.where(shared_queries != 0, 0, b)
    start = split * split_size
    return b, start, tl.minimum(start + split_size, n), queries_ptr + qb * m * d, bias_ptr + qb * m


@compile_checked_helper
@triton.jit
def _load_bias(bias_ptr, offs_m, valid_m, has_bias, ACC: tl.constexpr):
    return tl.load(bias_ptr + offs_m, mask=valid_m & (has_bias != 0), other=0.0).to(ACC)


@compile_checked_helper
@triton.jit
def _load_rows(ptr, row0, rows, cols, valid_n, width, ACC: tl.constexpr):
    """Rows row0 + rows (int64 base, so N * width may pass 2^31) at columns cols < width."""
    tile = ptr + tl.cast(row0, tl.int64) * width
    mask = valid_n[:, None] & (cols[None, :] < width)
    return tl.load(tile + rows[:, None] * width + cols[None, :], mask=mask, other=0.0).to(ACC)


@compile_checked_helper
@triton.jit
def _store_rows(ptr, row0, rows, cols, valid_n, width, value):
    tile = ptr + tl.cast(row0, tl.int64) * width
    mask = valid_n[:, None] & (cols[None, :] < width)
    tl.store(tile + rows[:, None] * width + cols[None, :], value, mask=mask)


# ---------------------------------------------------------------- full-width path


@compile_checked(*_FORWARD_WIDE)
@triton.jit
def cluster_forward_kernel(
    keys_ptr, queries_ptr, bias_ptr, values_ptr, part_ptr,
    n, d, c, m, kd, splits, split_size, shared_queries, has_bias, normalize, scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_C: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    b, start, stop, queries_ptr, bias_ptr = _program(
        pid, splits, split_size, n, m, d, shared_queries, queries_ptr, bias_ptr
    )
    keys_ptr += b * n * d
    values_ptr += b * n * c
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_c = tl.arange(0, BLOCK_C)
    rows = tl.arange(0, BLOCK_N)
    valid_m = offs_m < m
    q = tl.load(
        queries_ptr + offs_m[:, None] * d + offs_d[None, :],
        mask=valid_m[:, None] & (offs_d[None, :] < d),
        other=0.0,
    ).to(ACC)
    bias = _load_bias(bias_ptr, offs_m, valid_m, has_bias, ACC)
    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=ACC)
    key_acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=ACC)
    den = tl.zeros((BLOCK_M,), dtype=ACC)
    for n0 in range(start, stop, BLOCK_N):
        valid_n = n0 + rows < stop
        k = _load_rows(keys_ptr, n0, rows, offs_d, valid_n, d, ACC)
        logits = tl.dot(q, tl.trans(k), input_precision="ieee")
        a = _center_softmax(logits, bias, valid_m, valid_n, scale)
        den += tl.sum(a, axis=1)
        v = _load_rows(values_ptr, n0, rows, offs_c, valid_n, c, ACC)
        r = _inverse_norms(tl.sum(v * v, axis=1), normalize)
        acc += tl.dot(a * r[None, :], v, input_precision="ieee")
        if kd > 0:
            key_acc += tl.dot(a, k, input_precision="ieee")

    # The partial row of a center: [values (c) | keys (kd) | den].
    width = c + kd + 1
    out = part_ptr + pid.to(tl.int64) * m * width + offs_m[:, None] * width
    tl.store(out + offs_c[None, :], acc, mask=valid_m[:, None] & (offs_c[None, :] < c))
    tl.store(out + c + offs_d[None, :], key_acc, mask=valid_m[:, None] & (offs_d[None, :] < kd))
    tl.store(part_ptr + pid.to(tl.int64) * m * width + offs_m * width + c + kd, den, mask=valid_m)


@compile_checked(*_BACKWARD_WIDE)
@triton.jit
def cluster_backward_kernel(
    keys_ptr, queries_ptr, bias_ptr, values_ptr,
    grad_num_ptr, grad_den_ptr, grad_key_num_ptr, grad_keys_ptr, grad_values_ptr, part_ptr,
    n, d, c, m, kd, splits, split_size, shared_queries, has_bias, normalize, scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_C: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    b, start, stop, queries_ptr, bias_ptr = _program(
        pid, splits, split_size, n, m, d, shared_queries, queries_ptr, bias_ptr
    )
    keys_ptr += b * n * d
    grad_keys_ptr += b * n * d
    values_ptr += b * n * c
    grad_values_ptr += b * n * c
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_c = tl.arange(0, BLOCK_C)
    rows = tl.arange(0, BLOCK_N)
    valid_m = offs_m < m
    in_d = valid_m[:, None] & (offs_d[None, :] < d)
    q = tl.load(queries_ptr + offs_m[:, None] * d + offs_d[None, :], mask=in_d, other=0.0).to(ACC)
    bias = _load_bias(bias_ptr, offs_m, valid_m, has_bias, ACC)
    g_num = tl.load(
        grad_num_ptr + b * m * c + offs_m[:, None] * c + offs_c[None, :],
        mask=valid_m[:, None] & (offs_c[None, :] < c),
        other=0.0,
    )
    g_den = tl.load(grad_den_ptr + b * m + offs_m, mask=valid_m, other=0.0)
    g_key = tl.load(
        grad_key_num_ptr + b * m * kd + offs_m[:, None] * kd + offs_d[None, :],
        mask=valid_m[:, None] & (offs_d[None, :] < kd),
        other=0.0,
    )
    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=ACC)
    dbias = tl.zeros((BLOCK_M,), dtype=ACC)
    for n0 in range(start, stop, BLOCK_N):
        valid_n = n0 + rows < stop
        k = _load_rows(keys_ptr, n0, rows, offs_d, valid_n, d, ACC)
        v = _load_rows(values_ptr, n0, rows, offs_c, valid_n, c, ACC)
        a = _center_softmax(
            tl.dot(q, tl.trans(k), input_precision="ieee"), bias, valid_m, valid_n, scale
        )
        r = _inverse_norms(tl.sum(v * v, axis=1), normalize)
        # dA = dnum v_hat^T + dkey_num k^T + dden; dL = A * (dA - sum_M A dA) * scale.
        da = tl.dot(g_num, tl.trans(v), input_precision="ieee") * r[None, :] + g_den[:, None]
        if kd > 0:
            da += tl.dot(g_key, tl.trans(k), input_precision="ieee")
        dl = a * (da - tl.sum(a * da, axis=0)[None, :]) * scale
        dq += tl.dot(dl, k, input_precision="ieee")
        dbias += tl.sum(dl, axis=1)
        dk = tl.dot(tl.trans(dl), q, input_precision="ieee")
        if kd > 0:
            dk += tl.dot(tl.trans(a), g_key, input_precision="ieee")
        _store_rows(grad_keys_ptr, n0, rows, offs_d, valid_n, d, dk)
        u = tl.dot(tl.trans(a), g_num, input_precision="ieee")
        radial = _radial(tl.sum(v * u, axis=1), r, normalize)
        _store_rows(grad_values_ptr, n0, rows, offs_c, valid_n, c,
                    u * r[:, None] - radial[:, None] * v)  # fmt: skip

    # This program's share of the query and bias gradients: [dq (d) | dbias] per center.
    out = part_ptr + pid.to(tl.int64) * m * (d + 1) + offs_m * (d + 1)
    tl.store(out[:, None] + offs_d[None, :], dq, mask=in_d)
    tl.store(out + d, dbias, mask=valid_m)


# ---------------------------------------------------------------- column-block path


@compile_checked_helper
@triton.jit
def _assign_chunked(keys_ptr, q_ptr, bias, row0, rows, valid_m, valid_n, d, m, scale,
                    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr):  # fmt: skip
    """The assignment of one tile with the key dimension in chunks of BLOCK_D."""
    offs_m = tl.arange(0, BLOCK_M)
    logits = tl.zeros((BLOCK_M, rows.shape[0]), dtype=ACC)
    for d0 in range(0, d, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        q = tl.load(
            q_ptr + offs_m[:, None] * d + cols[None, :],
            mask=valid_m[:, None] & (cols[None, :] < d),
            other=0.0,
        ).to(ACC)
        k = _load_rows(keys_ptr, row0, rows, cols, valid_n, d, ACC)
        logits += tl.dot(q, tl.trans(k), input_precision="ieee")
    return _center_softmax(logits, bias, valid_m, valid_n, scale)


@compile_checked_helper
@triton.jit
def _chunked_squares(values_ptr, row0, rows, valid_n, c, ACC: tl.constexpr,
                     BLOCK_C: tl.constexpr):  # fmt: skip
    sq = tl.zeros((rows.shape[0],), dtype=ACC)
    for c0 in range(0, c, BLOCK_C):
        v = _load_rows(values_ptr, row0, rows, c0 + tl.arange(0, BLOCK_C), valid_n, c, ACC)
        sq += tl.sum(v * v, axis=1)
    return sq


@compile_checked(*_FORWARD_BLOCKED)
@triton.jit
def cluster_forward_blocked_kernel(
    keys_ptr, queries_ptr, bias_ptr, values_ptr, part_ptr,
    n, d, c, m, kd, splits, split_size, shared_queries, has_bias, normalize, scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_C: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    value_blocks = tl.cdiv(c, BLOCK_C)
    # One program even with no columns at all (C = 0, no key stream): it still owes den.
    blocks = tl.maximum(value_blocks + tl.cdiv(kd, BLOCK_C), 1)
    pid = tl.program_id(0)
    part = pid // blocks
    cb = pid % blocks
    b, start, stop, queries_ptr, bias_ptr = _program(
        part, splits, split_size, n, m, d, shared_queries, queries_ptr, bias_ptr
    )
    keys_ptr += b * n * d
    is_key_block = cb >= value_blocks
    col0 = tl.where(is_key_block, (cb - value_blocks) * BLOCK_C, cb * BLOCK_C)
    stream_cols = tl.where(is_key_block, kd, c)
    stream = tl.where(is_key_block, keys_ptr, values_ptr + b * n * c)
    offs_m = tl.arange(0, BLOCK_M)
    offs_c = col0 + tl.arange(0, BLOCK_C)
    rows = tl.arange(0, BLOCK_N)
    valid_m = offs_m < m
    bias = _load_bias(bias_ptr, offs_m, valid_m, has_bias, ACC)
    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=ACC)
    den = tl.zeros((BLOCK_M,), dtype=ACC)
    for n0 in range(start, stop, BLOCK_N):
        valid_n = n0 + rows < stop
        a = _assign_chunked(keys_ptr, queries_ptr, bias, n0, rows, valid_m, valid_n, d, m,
                            scale, BLOCK_M, BLOCK_D, ACC)  # fmt: skip
        den += tl.sum(a, axis=1)
        weight = a
        if (normalize != 0) & (cb < value_blocks):
            squares = _chunked_squares(stream, n0, rows, valid_n, c, ACC, BLOCK_C)
            weight = a * _inverse_norms(squares, normalize)[None, :]
        v = _load_rows(stream, n0, rows, offs_c, valid_n, stream_cols, ACC)
        acc += tl.dot(weight, v, input_precision="ieee")

    width = c + kd + 1
    out = part_ptr + part.to(tl.int64) * m * width + offs_m * width
    out_col = tl.where(is_key_block, c + offs_c, offs_c)
    tl.store(out[:, None] + out_col[None, :], acc,
             mask=valid_m[:, None] & (offs_c[None, :] < stream_cols))  # fmt: skip
    tl.store(out + c + kd, den, mask=valid_m & (cb == 0))


@compile_checked(*_BACKWARD_BLOCKED)
@triton.jit
def cluster_backward_blocked_kernel(
    keys_ptr, queries_ptr, bias_ptr, values_ptr,
    grad_num_ptr, grad_den_ptr, grad_key_num_ptr, grad_keys_ptr, grad_values_ptr, part_ptr,
    n, d, c, m, kd, splits, split_size, shared_queries, has_bias, normalize, scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_C: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    b, start, stop, queries_ptr, bias_ptr = _program(
        pid, splits, split_size, n, m, d, shared_queries, queries_ptr, bias_ptr
    )
    keys_ptr += b * n * d
    grad_keys_ptr += b * n * d
    values_ptr += b * n * c
    grad_values_ptr += b * n * c
    grad_num_ptr += b * m * c
    grad_key_num_ptr += b * m * kd
    offs_m = tl.arange(0, BLOCK_M)
    rows = tl.arange(0, BLOCK_N)
    valid_m = offs_m < m
    bias = _load_bias(bias_ptr, offs_m, valid_m, has_bias, ACC)
    g_den = tl.load(grad_den_ptr + b * m + offs_m, mask=valid_m, other=0.0)
    g_num = grad_num_ptr + offs_m[:, None] * c
    # This program's share of [dq (d) | dbias] per center, accumulated in place tile by tile:
    # each element is read back only by the thread that wrote it.
    share = part_ptr + pid.to(tl.int64) * m * (d + 1) + offs_m[:, None] * (d + 1)
    for d0 in range(0, d + 1, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        tl.store(share + cols[None, :], tl.zeros((BLOCK_M, BLOCK_D), dtype=ACC),
                 mask=valid_m[:, None] & (cols[None, :] <= d))  # fmt: skip
    for n0 in range(start, stop, BLOCK_N):
        valid_n = n0 + rows < stop
        a = _assign_chunked(keys_ptr, queries_ptr, bias, n0, rows, valid_m, valid_n, d, m,
                            scale, BLOCK_M, BLOCK_D, ACC)  # fmt: skip
        gv = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
        for c0 in range(0, c, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            v = _load_rows(values_ptr, n0, rows, cols, valid_n, c, ACC)
            g = tl.load(g_num + cols[None, :], mask=valid_m[:, None] & (cols[None, :] < c),
                        other=0.0)  # fmt: skip
            gv += tl.dot(g, tl.trans(v), input_precision="ieee")
        r = _inverse_norms(_chunked_squares(values_ptr, n0, rows, valid_n, c, ACC, BLOCK_C),
                           normalize)  # fmt: skip
        da = gv * r[None, :] + g_den[:, None]
        for d0 in range(0, kd, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            k = _load_rows(keys_ptr, n0, rows, cols, valid_n, d, ACC)
            gk = tl.load(
                grad_key_num_ptr + offs_m[:, None] * kd + cols[None, :],
                mask=valid_m[:, None] & (cols[None, :] < kd),
                other=0.0,
            )
            da += tl.dot(gk, tl.trans(k), input_precision="ieee")
        dl = a * (da - tl.sum(a * da, axis=0)[None, :]) * scale
        db = tl.sum(dl, axis=1)[:, None]
        db += tl.load(share + d, mask=valid_m[:, None], other=0.0)
        tl.store(share + d, db, mask=valid_m[:, None])
        for d0 in range(0, d, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            in_d = valid_m[:, None] & (cols[None, :] < d)
            k = _load_rows(keys_ptr, n0, rows, cols, valid_n, d, ACC)
            q = tl.load(queries_ptr + offs_m[:, None] * d + cols[None, :], mask=in_d,
                        other=0.0).to(ACC)  # fmt: skip
            gk = tl.load(
                grad_key_num_ptr + offs_m[:, None] * kd + cols[None, :],
                mask=valid_m[:, None] & (cols[None, :] < kd),
                other=0.0,
            )
            dk = tl.dot(tl.trans(dl), q, input_precision="ieee")
            dk += tl.dot(tl.trans(a), gk, input_precision="ieee")
            _store_rows(grad_keys_ptr, n0, rows, cols, valid_n, d, dk)
            dq = tl.dot(dl, k, input_precision="ieee")
            dq += tl.load(share + cols[None, :], mask=in_d, other=0.0)
            tl.store(share + cols[None, :], dq, mask=in_d)
        # d(v / (|v| + eps)): a first sweep for v . u, u = A^T dnum.
        v_dot_u = tl.zeros((BLOCK_N,), dtype=ACC)
        if normalize != 0:
            for c0 in range(0, c, BLOCK_C):
                cols = c0 + tl.arange(0, BLOCK_C)
                v = _load_rows(values_ptr, n0, rows, cols, valid_n, c, ACC)
                g = tl.load(g_num + cols[None, :], mask=valid_m[:, None] & (cols[None, :] < c),
                            other=0.0)  # fmt: skip
                v_dot_u += tl.sum(v * tl.dot(tl.trans(a), g, input_precision="ieee"), axis=1)
        radial = _radial(v_dot_u, r, normalize)
        for c0 in range(0, c, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            v = _load_rows(values_ptr, n0, rows, cols, valid_n, c, ACC)
            g = tl.load(g_num + cols[None, :], mask=valid_m[:, None] & (cols[None, :] < c),
                        other=0.0)  # fmt: skip
            u = tl.dot(tl.trans(a), g, input_precision="ieee")
            _store_rows(grad_values_ptr, n0, rows, cols, valid_n, c,
                        u * r[:, None] - radial[:, None] * v)  # fmt: skip


# ---------------------------------------------------------------- partials


@compile_checked(*_REDUCE)
@triton.jit
def cluster_reduce_kernel(
    part_ptr, first_ptr, second_ptr, third_ptr,
    groups, parts, width, row_len, first_cols, second_end,
    BLOCK: tl.constexpr, BLOCK_PARTS: tl.constexpr,
):  # fmt: skip
    """Adds the `parts` partials of group g (rows of `width` per center) in a fixed order and
    writes columns [0, first_cols) to first, [first_cols, second_end) to second, the rest to
    third. Narrow column blocks give the small reduction many programs; BLOCK_PARTS partials
    are loaded at once. The grid has the programs of every probe whatever the groups: with
    queries shared by the probes, one group holds all partials and the other programs idle."""
    blocks = tl.cdiv(row_len, BLOCK)
    pid = tl.program_id(0)
    g = (pid // blocks).to(tl.int64)
    offs = (pid % blocks) * BLOCK + tl.arange(0, BLOCK)
    valid = (offs < row_len) & (g < groups)
    src = part_ptr + g * parts * row_len + offs
    acc = tl.zeros((BLOCK,), dtype=part_ptr.dtype.element_ty)
    for s0 in range(0, parts, BLOCK_PARTS):
        s = s0 + tl.arange(0, BLOCK_PARTS)
        tile = tl.load(
            src[None, :] + s[:, None].to(tl.int64) * row_len,
            mask=(s[:, None] < parts) & valid[None, :],
            other=0.0,
        )
        acc += tl.sum(tile, axis=0)
    center = offs // width
    col = offs % width
    rows_before = g * (row_len // width) + center
    second_cols = second_end - first_cols
    third_cols = width - second_end
    tl.store(first_ptr + rows_before * first_cols + col, acc, mask=valid & (col < first_cols))
    tl.store(
        second_ptr + rows_before * second_cols + col - first_cols,
        acc,
        mask=valid & (col >= first_cols) & (col < second_end),
    )
    tl.store(
        third_ptr + rows_before * third_cols + col - second_end,
        acc,
        mask=valid & (col >= second_end),
    )


# ---------------------------------------------------------------- plans and launchers


def _splits(b: int, n: int, programs: int) -> tuple[int, int]:
    """(count, size) of the splits of each probe's N images: about `programs` programs in all,
    each split at least MIN_ROWS images. A function of the shapes alone, so the order in which
    partials are added (hence the bits of the result) is too."""
    per_probe = max(1, programs // max(b, 1))
    count = max(1, min(per_probe, triton.cdiv(n, MIN_ROWS)))
    size = triton.cdiv(max(n, 1), count)
    return triton.cdiv(max(n, 1), size), size


def _label(dtype: torch.dtype) -> str:
    return triton_label("cluster_accumulate", _LABELS, dtype)


def _is_wide(d: int, c: int, m: int, label: str) -> bool:
    return label in _WIDE_LABELS and m <= WIDE_M and d <= WIDE_D and c <= WIDE_C


def _main_launch(b, n, d, c, m, kd, dtype, backward: bool) -> tuple[Launch, int, int]:
    """The main kernel's launch and its (splits, split size)."""
    if m > MAX_CENTERS:
        raise ValueError(
            f"cluster_accumulate: the Triton kernels take M <= {MAX_CENTERS} centers, got M = {m}"
        )
    label = _label(dtype)
    count, size = _splits(b, n, BACKWARD_PROGRAMS if backward else FORWARD_PROGRAMS)
    name = "cluster_backward" if backward else "cluster_forward"
    if _is_wide(d, c, m, label):
        name, block_m, programs = f"{name}_kernel", _block_m(m, _WIDE_BLOCK_M), b * count
    else:
        block_c = _BLOCKED_FORWARD["BLOCK_C"]
        blocks = 1 if backward else max(1, triton.cdiv(c, block_c) + triton.cdiv(kd, block_c))
        name, block_m = f"{name}_blocked_kernel", _block_m(m, _BLOCKED_BLOCK_M)
        programs = b * count * blocks
    return Launch(name, f"{label} M<={block_m}", (programs,)), count, size


def _reduce_launch(b: int, row_len: int, part: str, out: str) -> Launch:
    narrow, wide = REDUCE_BLOCKS
    block = wide if row_len >= wide * SMS else narrow
    return Launch(
        "cluster_reduce_kernel", f"{part} to {out}, {block}", (b * triton.cdiv(row_len, block),)
    )


def forward_plan(
    b: int, n: int, d: int, c: int, m: int, kd: int, dtype: torch.dtype, normalize: bool
) -> list[Launch]:
    """The Triton launches of ``forward`` for these sizes, in order, without tensors."""
    if b == 0:
        return []
    main, _, _ = _main_launch(b, n, d, c, m, kd, dtype, backward=False)
    acc = _ACC_LABEL[_label(dtype)]
    return [main, _reduce_launch(b, m * (c + kd + 1), acc, acc)]


def backward_plan(
    b: int, n: int, d: int, c: int, m: int, kd: int, dtype: torch.dtype, normalize: bool
) -> list[Launch]:
    """The Triton launches of ``backward`` for these sizes, in order, without tensors."""
    if b == 0:
        return []
    main, _, _ = _main_launch(b, n, d, c, m, kd, dtype, backward=True)
    label = _label(dtype)
    return [main, _reduce_launch(b, m * (d + 1), _ACC_LABEL[label], label)]


_KERNELS = {
    "cluster_forward_kernel": (cluster_forward_kernel, _FORWARD_WIDE),
    "cluster_backward_kernel": (cluster_backward_kernel, _BACKWARD_WIDE),
    "cluster_forward_blocked_kernel": (cluster_forward_blocked_kernel, _FORWARD_BLOCKED),
    "cluster_backward_blocked_kernel": (cluster_backward_blocked_kernel, _BACKWARD_BLOCKED),
    "cluster_reduce_kernel": (cluster_reduce_kernel, _REDUCE),
}


def _run(launch: Launch, *args) -> None:
    kernel, variants = _KERNELS[launch.kernel]
    variant = next(v for v in variants if v.label == launch.variant)
    kernel[launch.grid](*args, **variant.constexprs, **variant.options)


def _contiguous(keys, queries, values, query_bias):
    bias = queries if query_bias is None else query_bias.contiguous()
    return keys.contiguous(), queries.contiguous(), values.contiguous(), bias


def _scalars(keys, queries, values, kd, count, size, query_bias, normalize_values, scale):
    _, n, d = keys.shape
    return (n, d, values.shape[2], queries.shape[1], kd, count, size, int(queries.shape[0] == 1),
            int(query_bias is not None), int(normalize_values), scale)  # fmt: skip


def forward(
    keys: torch.Tensor,
    queries: torch.Tensor,
    values: torch.Tensor,
    scale: float,
    query_bias: torch.Tensor | None = None,
    normalize_values: bool = False,
    keys_as_values: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fusedset::cluster_accumulate on CUDA tensors (or CPU tensors under the interpreter):
    (num (B, M, C), den (B, M), key_num (B, M, kd)), kd = D when the keys are a value stream."""
    keys, queries, values, bias = _contiguous(keys, queries, values, query_bias)
    b, n, d = keys.shape
    m, c = queries.shape[1], values.shape[2]
    kd = d if keys_as_values else 0
    acc = accumulation_dtype(keys.dtype)
    num = torch.empty((b, m, c), dtype=acc, device=keys.device)
    den = torch.empty((b, m), dtype=acc, device=keys.device)
    key_num = torch.empty((b, m, kd), dtype=acc, device=keys.device)
    plan = forward_plan(b, n, d, c, m, kd, keys.dtype, normalize_values)
    if not plan:
        return num, den, key_num
    _, count, size = _main_launch(b, n, d, c, m, kd, keys.dtype, backward=False)
    part = torch.empty((b, count, m, c + kd + 1), dtype=acc, device=keys.device)
    main, reduce = plan
    scalars = _scalars(keys, queries, values, kd, count, size, query_bias, normalize_values, scale)
    _run(main, keys, queries, bias, values, part, *scalars)
    # With no key stream its output is empty: den stands in for a pointer never written.
    _run(reduce, part, num, key_num if kd else den, den, b, count, c + kd + 1, m * (c + kd + 1),
         c, c + kd)  # fmt: skip
    return num, den, key_num


def backward(
    grad_num: torch.Tensor,
    grad_den: torch.Tensor,
    grad_key_num: torch.Tensor,
    keys: torch.Tensor,
    queries: torch.Tensor,
    values: torch.Tensor,
    scale: float,
    query_bias: torch.Tensor | None = None,
    normalize_values: bool = False,
    keys_as_values: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """fusedset::cluster_accumulate_backward on CUDA tensors (or CPU tensors, interpreted):
    (grad_keys, grad_queries, grad_values, grad_bias; empty when there is no bias)."""
    keys, queries, values, bias = _contiguous(keys, queries, values, query_bias)
    b, n, d = keys.shape
    m, c = queries.shape[1], values.shape[2]
    kd = d if keys_as_values else 0
    shared = queries.shape[0] == 1
    acc = accumulation_dtype(keys.dtype)
    grad_keys = torch.empty_like(keys)
    grad_values = torch.empty_like(values)
    grad_queries = torch.empty_like(queries)
    grad_bias = torch.empty(queries.shape[:2], dtype=queries.dtype, device=queries.device)
    plan = backward_plan(b, n, d, c, m, kd, keys.dtype, normalize_values)
    if plan:
        _, count, size = _main_launch(b, n, d, c, m, kd, keys.dtype, backward=True)
        part = torch.empty((b, count, m, d + 1), dtype=acc, device=keys.device)
        main, reduce = plan
        grads = (t.to(acc).contiguous() for t in (grad_num, grad_den, grad_key_num))
        scalars = _scalars(keys, queries, values, kd, count, size, query_bias, normalize_values,
                           scale)  # fmt: skip
        _run(main, keys, queries, bias, values, *grads, grad_keys, grad_values, part, *scalars)
        groups, parts = (1, b * count) if shared else (b, count)
        _run(reduce, part, grad_queries, grad_bias, grad_bias, groups, parts, d + 1,
             m * (d + 1), d, d + 1)  # fmt: skip
    else:
        grad_queries.zero_()
        grad_bias.zero_()
    if query_bias is None:
        grad_bias = torch.empty((0,), dtype=queries.dtype, device=queries.device)
    return grad_keys, grad_queries, grad_values, grad_bias
