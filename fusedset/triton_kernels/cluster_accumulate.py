"""Triton kernels of cluster_accumulate (the CUDA path).

Forward: program (column block, split, probe) walks its split of the images in tiles of
BLOCK_N. For each tile it forms the BLOCK_M x BLOCK_N logits (the key dimension in chunks of
BLOCK_D), the column softmax, and adds the weighted rows of one BLOCK_C slice of the output
columns, which are [values | keys] when the keys are a second value stream. Programs of one
tile differ only in the column block, the fastest grid axis, so they run together and the
repeated key reads hit L2. Each program writes its partial sums; the partials are added in
split order afterwards: no atomics, the same inputs give the same bits.

Backward: program (split, probe) recomputes the assignment of each tile of BACKWARD_BLOCK_N
images, writes the key and value gradients of the tile and the tile's share of the query and
bias gradients; those are added in tile order afterwards.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fusedset.triton_kernels.registry import (
    CompileVariant,
    compile_checked,
    compile_checked_helper,
)

NORM_EPS = tl.constexpr(1e-5)  # a jit function reads only constexpr globals
MAX_CENTERS = 64
# A split covers at least this many images; a probe has at most MAX_SPLITS of them, so the
# forward partials take O(B * M * C) memory whatever N is.
MIN_SPLIT = 512
MAX_SPLITS = 128
# Fixed (not tuned): the query gradient is summed per tile of this many images, and the tiling
# must not depend on the tuning for the sum to give the same bits.
BACKWARD_BLOCK_N = 32

_POINTER_TYPES = {"fp32": "*fp32", "fp16": "*fp16", "bf16": "*bf16"}
_SCALARS = {
    "n": "i32",
    "d": "i32",
    "c": "i32",
    "m": "i32",
    "kd": "i32",
    "split_size": "i32",
    "shared_queries": "i32",
    "scale": "fp32",
}


def _variants(pointers: dict[str, str], **constexprs: object) -> list[CompileVariant]:
    """Each input dtype at the two center blocks (M <= 16, M <= 64), CAFace's fused form."""
    variants = []
    for dtype, ptr in _POINTER_TYPES.items():
        signature = {
            "keys_ptr": ptr,
            "queries_ptr": "*fp32",
            "bias_ptr": "*fp32",
            "values_ptr": ptr,
            **{name: ptr if kind == "input" else kind for name, kind in pointers.items()},
            **_SCALARS,
        }
        for block_m in (16, 64):
            fixed = {
                **constexprs,
                "BLOCK_M": block_m,
                "NORMALIZE": True,
                "PRECISION": "ieee" if dtype == "fp32" else "tf32",
                "ACC": tl.float32,
            }
            variants.append(CompileVariant(f"{dtype} M<={block_m}", signature, fixed))
    return variants


@compile_checked_helper
@triton.jit
def _assign(keys_ptr, queries_ptr, bias_ptr, offs_n, valid_n, d, m, scale,
            BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
            ACC: tl.constexpr):  # fmt: skip
    """The assignment of one tile (BLOCK_M, BLOCK_N): the softmax of the logits over the
    centers, zero in the columns of images past the end."""
    offs_m = tl.arange(0, BLOCK_M)
    logits = tl.zeros((BLOCK_M, offs_n.shape[0]), dtype=ACC)
    for d0 in range(0, d, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        q = tl.load(
            queries_ptr + offs_m[:, None] * d + cols[None, :],
            mask=(offs_m[:, None] < m) & (cols[None, :] < d),
            other=0.0,
        )
        k = tl.load(
            keys_ptr + offs_n[:, None] * d + cols[None, :],
            mask=valid_n[:, None] & (cols[None, :] < d),
            other=0.0,
        ).to(ACC)
        logits += tl.dot(q, tl.trans(k), input_precision=PRECISION)
    bias = tl.load(bias_ptr + offs_m, mask=offs_m < m, other=0.0)
    logits = (logits + bias[:, None]) * scale
    logits = tl.where(offs_m[:, None] < m, logits, float("-inf"))
    e = tl.exp(logits - tl.max(logits, axis=0)[None, :])
    a = e / tl.sum(e, axis=0)[None, :]
    return tl.where(valid_n[None, :], a, 0.0)


@compile_checked_helper
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


@compile_checked(*_variants({"part_ptr": "*fp32"}))
@triton.autotune(
    # Kept to what compiles without spills at M <= 64 on sm_80 and sm_90. The ieee (fp32) dots
    # run on FMA units and hold a whole reduction slice per thread: narrow slices (BLOCK_D,
    # BLOCK_N), one pipeline stage.
    configs=[
        triton.Config({"BLOCK_N": 32, "BLOCK_C": 64, "BLOCK_D": 32}, num_warps=4, num_stages=1),
        triton.Config({"BLOCK_N": 32, "BLOCK_C": 64, "BLOCK_D": 32}, num_warps=8, num_stages=1),
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
    qb = tl.where(shared_queries != 0, 0, b)
    queries_ptr += qb * m * d
    bias_ptr += qb * m
    keys_ptr += b * n * d
    width = c + kd + 1  # a partial row: [values | keys | den]
    value_blocks = tl.cdiv(c, BLOCK_C)
    is_key_block = cb >= value_blocks
    col0 = tl.where(is_key_block, (cb - value_blocks) * BLOCK_C, cb * BLOCK_C)
    stream_cols = tl.where(is_key_block, kd, c)
    stream = tl.where(is_key_block, keys_ptr, values_ptr + b * n * c)

    offs_m = tl.arange(0, BLOCK_M)
    offs_c = col0 + tl.arange(0, BLOCK_C)
    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=ACC)
    den = tl.zeros((BLOCK_M,), dtype=ACC)
    start = split * split_size
    stop = tl.minimum(start + split_size, n)
    for n0 in range(start, stop, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        valid_n = offs_n < stop
        a = _assign(keys_ptr, queries_ptr, bias_ptr, offs_n, valid_n, d, m, scale, BLOCK_M,
                    BLOCK_D, PRECISION, ACC)  # fmt: skip
        den += tl.sum(a, axis=1)
        rows = stream + offs_n[:, None] * stream_cols
        weight = a
        # Nested: NORMALIZE is resolved at compile time, is_key_block per program.
        if NORMALIZE:  # noqa: SIM102
            if not is_key_block:
                weight = a * _inverse_norms(rows, valid_n, c, ACC, BLOCK_N, BLOCK_C)[None, :]
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


@compile_checked(
    *_variants(
        {
            "grad_num_ptr": "*fp32",
            "grad_den_ptr": "*fp32",
            "grad_key_num_ptr": "*fp32",
            "grad_keys_ptr": "input",
            "grad_values_ptr": "input",
            "part_ptr": "*fp32",
        },
        BLOCK_N=BACKWARD_BLOCK_N,
    )
)
@triton.autotune(
    # The only config found spill-free at M <= 64 on sm_80: wider slices or 4 warps spill.
    configs=[triton.Config({"BLOCK_C": 16, "BLOCK_D": 16}, num_warps=8, num_stages=1)],
    key=["n", "d", "c", "m", "kd"],
)
@triton.jit
def cluster_backward_kernel(
    keys_ptr,
    queries_ptr,
    bias_ptr,
    values_ptr,
    grad_num_ptr,
    grad_den_ptr,
    grad_key_num_ptr,
    grad_keys_ptr,
    grad_values_ptr,
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
    split = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    qb = tl.where(shared_queries != 0, 0, b)
    queries_ptr += qb * m * d
    bias_ptr += qb * m
    keys_ptr += b * n * d
    grad_keys_ptr += b * n * d
    values_ptr += b * n * c
    grad_values_ptr += b * n * c
    grad_num_ptr += b * m * c
    grad_key_num_ptr += b * m * kd
    offs_m = tl.arange(0, BLOCK_M)
    valid_m = offs_m < m
    g_den = tl.load(grad_den_ptr + b * m + offs_m, mask=valid_m, other=0.0)
    g_num = grad_num_ptr + offs_m[:, None] * c
    tiles = tl.cdiv(n, BLOCK_N)
    start = split * split_size
    stop = tl.minimum(start + split_size, n)
    for n0 in range(start, stop, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        valid_n = offs_n < stop
        a = _assign(keys_ptr, queries_ptr, bias_ptr, offs_n, valid_n, d, m, scale, BLOCK_M,
                    BLOCK_D, PRECISION, ACC)  # fmt: skip
        rows = values_ptr + offs_n[:, None] * c
        # dA = dnum v_hat^T + dkey_num k^T + dden; dL = A * (dA - sum_M A dA) * scale.
        gv = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
        for c0 in range(0, c, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            v = tl.load(
                rows + cols[None, :], mask=valid_n[:, None] & (cols[None, :] < c), other=0.0
            ).to(ACC)
            g = tl.load(g_num + cols[None, :], mask=valid_m[:, None] & (cols[None, :] < c),
                        other=0.0)  # fmt: skip
            gv += tl.dot(g, tl.trans(v), input_precision=PRECISION)
        r = tl.full((BLOCK_N,), 1.0, ACC)
        if NORMALIZE:
            r = _inverse_norms(rows, valid_n, c, ACC, BLOCK_N, BLOCK_C)
        da = gv * r[None, :] + g_den[:, None]
        for d0 in range(0, kd, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            k = tl.load(
                keys_ptr + offs_n[:, None] * d + cols[None, :],
                mask=valid_n[:, None] & (cols[None, :] < d),
                other=0.0,
            ).to(ACC)
            gk = tl.load(
                grad_key_num_ptr + offs_m[:, None] * kd + cols[None, :],
                mask=valid_m[:, None] & (cols[None, :] < kd),
                other=0.0,
            )
            da += tl.dot(gk, tl.trans(k), input_precision=PRECISION)
        dl = a * (da - tl.sum(a * da, axis=0)[None, :]) * scale
        # This tile's share of the query and bias gradients: [dq (M x D) | dbias] per center.
        share = part_ptr + ((b * tiles + n0 // BLOCK_N) * m + offs_m[:, None]) * (d + 1)
        tl.store(share + d, tl.sum(dl, axis=1)[:, None], mask=valid_m[:, None])
        for d0 in range(0, d, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            in_d = cols[None, :] < d
            k = tl.load(
                keys_ptr + offs_n[:, None] * d + cols[None, :],
                mask=valid_n[:, None] & in_d,
                other=0.0,
            ).to(ACC)
            q = tl.load(
                queries_ptr + offs_m[:, None] * d + cols[None, :],
                mask=valid_m[:, None] & in_d,
                other=0.0,
            )
            gk = tl.load(
                grad_key_num_ptr + offs_m[:, None] * kd + cols[None, :],
                mask=valid_m[:, None] & (cols[None, :] < kd),
                other=0.0,
            )
            dk = tl.dot(tl.trans(dl), q, input_precision=PRECISION)
            dk += tl.dot(tl.trans(a), gk, input_precision=PRECISION)
            tl.store(
                grad_keys_ptr + offs_n[:, None] * d + cols[None, :],
                dk,
                mask=valid_n[:, None] & in_d,
            )
            tl.store(
                share + cols[None, :],
                tl.dot(dl, k, input_precision=PRECISION),
                mask=valid_m[:, None] & in_d,
            )
        # d(v / (|v| + eps)) = r dv - v (v . dv) r^2 / |v|: a first sweep for v . dv.
        radial = tl.zeros((BLOCK_N,), dtype=ACC)
        if NORMALIZE:
            for c0 in range(0, c, BLOCK_C):
                cols = c0 + tl.arange(0, BLOCK_C)
                v = tl.load(
                    rows + cols[None, :], mask=valid_n[:, None] & (cols[None, :] < c), other=0.0
                ).to(ACC)
                g = tl.load(g_num + cols[None, :], mask=valid_m[:, None] & (cols[None, :] < c),
                            other=0.0)  # fmt: skip
                radial += tl.sum(v * tl.dot(tl.trans(a), g, input_precision=PRECISION), axis=1)
            norm = 1.0 / r - NORM_EPS
            radial = tl.where(norm > 0, radial * r * r / tl.where(norm > 0, norm, 1.0), 0.0)
        for c0 in range(0, c, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            mask = valid_n[:, None] & (cols[None, :] < c)
            v = tl.load(rows + cols[None, :], mask=mask, other=0.0).to(ACC)
            g = tl.load(g_num + cols[None, :], mask=valid_m[:, None] & (cols[None, :] < c),
                        other=0.0)  # fmt: skip
            dv = tl.dot(tl.trans(a), g, input_precision=PRECISION)
            tl.store(
                grad_values_ptr + offs_n[:, None] * c + cols[None, :],
                dv * r[:, None] - radial[:, None] * v,
                mask=mask,
            )


def _splits(n: int) -> tuple[int, int]:
    """(count, size) of the splits of N images: a function of N only, so the order in which
    partials are added (and hence the bits of the result) depends on the shapes alone."""
    count = min(max(1, triton.cdiv(n, MIN_SPLIT)), MAX_SPLITS)
    size = triton.cdiv(max(n, 1), count)
    size = triton.cdiv(size, 64) * 64  # whole tiles for every BLOCK_N
    return triton.cdiv(max(n, 1), size), size


def _prepare(keys, queries, values, query_bias):
    if queries.shape[1] > MAX_CENTERS:
        raise ValueError(
            f"cluster_accumulate: the Triton kernels take M <= {MAX_CENTERS} centers, "
            f"got M = {queries.shape[1]}"
        )
    acc = torch.float64 if keys.dtype == torch.float64 else torch.float32
    q = queries.to(acc).contiguous()
    bias = (
        torch.zeros(q.shape[:2], dtype=acc, device=q.device)
        if query_bias is None
        else query_bias.to(acc).contiguous()
    )
    meta = {
        "BLOCK_M": max(16, triton.next_power_of_2(queries.shape[1])),
        "PRECISION": "ieee" if keys.dtype in (torch.float32, torch.float64) else "tf32",
        "ACC": tl.float64 if acc == torch.float64 else tl.float32,
    }
    return keys.contiguous(), q, bias, values.contiguous(), acc, meta


def _launch(kernel, grid, args, meta, config):
    """Autotuned on a GPU; under TRITON_INTERPRET=1 (CPU tensors, tests) timings mean nothing,
    so a given config (default: the first) runs as is."""
    if config is None and not triton.knobs.runtime.interpret:
        kernel[grid](*args, **meta)
        return
    config = config or kernel.configs[0]
    kernel.fn[grid](
        *args, **meta, **config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages
    )


def forward(
    keys: torch.Tensor,
    queries: torch.Tensor,
    values: torch.Tensor,
    scale: float,
    query_bias: torch.Tensor | None = None,
    normalize_values: bool = False,
    keys_as_values: bool = False,
    config: triton.Config | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fusedset::cluster_accumulate on CUDA tensors (or CPU tensors under the interpreter)."""
    keys, q, bias, values, acc, meta = _prepare(keys, queries, values, query_bias)
    b, n, d = keys.shape
    m, c = q.shape[1], values.shape[2]
    kd = d if keys_as_values else 0
    count, size = _splits(n)
    part = torch.empty((b, count, m, c + kd + 1), dtype=acc, device=keys.device)

    def grid(meta):
        blocks = triton.cdiv(c, meta["BLOCK_C"]) + triton.cdiv(kd, meta["BLOCK_C"])
        return (max(1, blocks), count, b)

    args = (keys, q, bias, values, part, n, d, c, m, kd, size, int(q.shape[0] == 1), scale)
    _launch(cluster_forward_kernel, grid, args, {**meta, "NORMALIZE": normalize_values}, config)
    total = part.sum(1)
    return (
        total[..., :c].contiguous(),
        total[..., c + kd].contiguous(),
        total[..., c : c + kd].contiguous(),
    )


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
    config: triton.Config | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """fusedset::cluster_accumulate_backward on CUDA tensors (or CPU tensors, interpreted)."""
    keys_c, q, bias, values_c, acc, meta = _prepare(keys, queries, values, query_bias)
    b, n, d = keys_c.shape
    m, c = q.shape[1], values_c.shape[2]
    kd = d if keys_as_values else 0
    count, size = _splits(n)
    grad_keys = torch.empty_like(keys_c)
    grad_values = torch.empty_like(values_c)
    part = torch.empty(
        (b, triton.cdiv(n, BACKWARD_BLOCK_N), m, d + 1), dtype=acc, device=keys.device
    )
    args = (
        keys_c, q, bias, values_c,
        grad_num.to(acc).contiguous(), grad_den.to(acc).contiguous(),
        grad_key_num.to(acc).contiguous(), grad_keys, grad_values, part,
        n, d, c, m, kd, size, int(q.shape[0] == 1), scale,
    )  # fmt: skip
    meta = {**meta, "NORMALIZE": normalize_values, "BLOCK_N": BACKWARD_BLOCK_N}
    _launch(cluster_backward_kernel, (count, b), args, meta, config)
    total = part.sum(1)
    if q.shape[0] == 1:
        total = total.sum(0, keepdim=True)
    grad_queries = total[..., :d].to(queries.dtype).contiguous()
    grad_bias = (
        torch.empty((0,), dtype=queries.dtype, device=queries.device)
        if query_bias is None
        else total[..., d].to(queries.dtype).contiguous()
    )
    return grad_keys, grad_queries, grad_values, grad_bias
