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
    offs_m, offs_d, q, bias = _centers(
        queries_ptr, bias_ptr, b, d, m, shared_queries, BLOCK_M, BLOCK_D
    )
    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=ACC)
    den = tl.zeros((BLOCK_M,), dtype=ACC)
    start = split * split_size
    stop = tl.minimum(start + split_size, n)
    for n0 in range(start, stop, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        valid_n = offs_n < stop
        _, a = _assign(keys_ptr + b * n * d, q, bias, offs_n, valid_n, offs_d, offs_m, d, m,
                       scale, PRECISION, ACC)  # fmt: skip
        den += tl.sum(a, axis=1)
        rows = stream + offs_n[:, None] * stream_cols
        weight = a
        # Nested: NORMALIZE is resolved at compile time, is_key_block per program.
        if NORMALIZE:  # noqa: SIM102
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


def _backward_variants() -> list[CompileVariant]:
    variants = []
    for v in _forward_variants():
        signature = {
            **{k: t for k, t in v.signature.items() if k != "part_ptr"},
            "grad_num_ptr": "*fp32",
            "grad_den_ptr": "*fp32",
            "grad_key_num_ptr": "*fp32",
            "grad_keys_ptr": v.signature["keys_ptr"],
            "grad_values_ptr": v.signature["keys_ptr"],
            "part_ptr": "*fp32",
        }
        variants.append(CompileVariant(v.label, signature, constexprs=v.constexprs))
    return variants


@compile_checked(*_backward_variants())
@triton.autotune(
    configs=[
        triton.Config({"BLOCK_N": 32, "BLOCK_C": 64}, num_warps=4),
        triton.Config({"BLOCK_N": 32, "BLOCK_C": 128}, num_warps=8),
    ],
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
    splits = tl.num_programs(0)
    offs_m, offs_d, q, bias = _centers(
        queries_ptr, bias_ptr, b, d, m, shared_queries, BLOCK_M, BLOCK_D
    )
    valid_m = offs_m < m
    g_den = tl.load(grad_den_ptr + b * m + offs_m, mask=valid_m, other=0.0)
    g_key = tl.load(
        grad_key_num_ptr + b * m * kd + offs_m[:, None] * kd + offs_d[None, :],
        mask=valid_m[:, None] & (offs_d[None, :] < kd),
        other=0.0,
    )
    g_num = grad_num_ptr + b * m * c + offs_m[:, None] * c
    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=ACC)
    db = tl.zeros((BLOCK_M,), dtype=ACC)
    start = split * split_size
    stop = tl.minimum(start + split_size, n)
    for n0 in range(start, stop, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        valid_n = offs_n < stop
        k, a = _assign(keys_ptr + b * n * d, q, bias, offs_n, valid_n, offs_d, offs_m, d, m,
                       scale, PRECISION, ACC)  # fmt: skip
        rows = values_ptr + b * n * c + offs_n[:, None] * c
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
        da = gv * r[None, :] + tl.dot(g_key, tl.trans(k), input_precision=PRECISION)
        da += g_den[:, None]
        dl = a * (da - tl.sum(a * da, axis=0)[None, :]) * scale
        dk = tl.dot(tl.trans(dl), q, input_precision=PRECISION)
        dk += tl.dot(tl.trans(a), g_key, input_precision=PRECISION)
        tl.store(
            grad_keys_ptr + b * n * d + offs_n[:, None] * d + offs_d[None, :],
            dk,
            mask=valid_n[:, None] & (offs_d[None, :] < d),
        )
        dq += tl.dot(dl, k, input_precision=PRECISION)
        db += tl.sum(dl, axis=1)
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
                dv = tl.dot(tl.trans(a), g, input_precision=PRECISION)
                radial += tl.sum(v * dv, axis=1)
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
                grad_values_ptr + b * n * c + offs_n[:, None] * c + cols[None, :],
                dv * r[:, None] - radial[:, None] * v,
                mask=mask,
            )
    out = part_ptr + (b * splits + split) * m * (d + 1)
    tl.store(
        out + offs_m[:, None] * (d + 1) + offs_d[None, :],
        dq,
        mask=valid_m[:, None] & (offs_d[None, :] < d),
    )
    tl.store(out + offs_m * (d + 1) + d, db, mask=valid_m)


def _next_power_of_2(x: int, floor: int) -> int:
    return max(floor, triton.next_power_of_2(x))


def _splits(n: int) -> tuple[int, int]:
    """(count, size) of the splits of N images: a function of N only, so the order in which
    partials are added (and hence the bits of the result) depends on the shapes alone."""
    count = min(max(1, triton.cdiv(n, MIN_SPLIT)), MAX_SPLITS)
    size = triton.cdiv(max(n, 1), count)
    size = triton.cdiv(size, 64) * 64  # whole tiles for every BLOCK_N
    return triton.cdiv(max(n, 1), size), size


def _prepare(keys, queries, values, query_bias):
    if queries.shape[1] > MAX_CENTERS or keys.shape[2] > MAX_KEY_DIM:
        raise ValueError(
            f"cluster_accumulate: the Triton kernels take M <= {MAX_CENTERS} centers and "
            f"D <= {MAX_KEY_DIM}, got M = {queries.shape[1]}, D = {keys.shape[2]}"
        )
    acc = torch.float64 if keys.dtype == torch.float64 else torch.float32
    q = queries.to(acc).contiguous()
    bias = (
        torch.zeros(q.shape[:2], dtype=acc, device=q.device)
        if query_bias is None
        else query_bias.to(acc).contiguous()
    )
    meta = {
        "BLOCK_M": _next_power_of_2(queries.shape[1], 16),
        "BLOCK_D": _next_power_of_2(keys.shape[2], 16),
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
        return (
            max(1, triton.cdiv(c, meta["BLOCK_C"]) + triton.cdiv(kd, meta["BLOCK_C"])),
            count,
            b,
        )

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
    part = torch.empty((b, count, m, d + 1), dtype=acc, device=keys.device)
    args = (
        keys_c, q, bias, values_c,
        grad_num.to(acc).contiguous(), grad_den.to(acc).contiguous(),
        grad_key_num.to(acc).contiguous(), grad_keys, grad_values, part,
        n, d, c, m, kd, size, int(q.shape[0] == 1), scale,
    )  # fmt: skip
    _launch(
        cluster_backward_kernel,
        (count, b),
        args,
        {**meta, "NORMALIZE": normalize_values},
        config,
    )
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
