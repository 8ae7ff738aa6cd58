"""quality_fps on CUDA: the selection of fusedset.ops.quality_fps in Triton.

Two paths, both one read of X per selection step:
- on chip (N <= SMALL_N, most IJB templates): one program per template runs every step with the
  running distances in registers; one launch for the whole batch.
- global (any N, up to 1e6 and beyond): per step, a sweep over row blocks updates the distances
  in global memory (N floats, small next to X) and writes one (max, index) partial per block;
  a pick kernel reduces the partials of a template in block order, so the argmax, lowest index
  on ties, is the same on every run.

State encoding (as in the C++ kernel): d >= 0 a candidate, -1 a zero-norm row (picked only when
nothing else remains), -inf padding or already picked.
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

SMALL_N = 256
SWEEP_BLOCK_N = 64
SWEEP_BLOCK_C = 32
PICK_BLOCK = 1024
# Memory-bound sweeps: occupancy hides latency, software pipelining only costs registers. A
# 64 x 32 tile over 4 warps is 16 values a thread, 115-150 registers (ptxas, sm_80/sm_90):
# 3-4 blocks per SM; a 64 x 64 tile needs 240+ and spills for 16-bit inputs.
SWEEP_OPTIONS = {"num_warps": 4, "num_stages": 1}
# Zero-norm rows score below every candidate and above "nothing left".
ZERO_ROW_SCORE = tl.constexpr(-3.4028234663852886e38)

# (x's type, accumulation type). float64 inputs (the training form's gradcheck dtype) are
# compiled only in the recording mode of quality_fps_select.
_INPUTS = [("fp32", "fp32"), ("fp16", "fp32"), ("bf16", "fp32"), ("fp64", "fp64")]
_ACC = {"fp32": tl.float32, "fp64": tl.float64}


def _modes(acc: str) -> tuple[tuple[bool, bool], ...]:
    """(record, row-scaled) pairs: the recording mode (quality_fps_select, noise and logits)
    takes no row scale; the plain one (quality_fps) takes one or not."""
    return ((True, False),) if acc == "fp64" else ((False, False), (False, True), (True, False))


def _mode_tag(record: bool, scaled: bool) -> str:
    return "record" if record else "scaled" if scaled else "plain"


def _selection_arguments(label: str, acc: str) -> dict[str, str]:
    """The leading arguments of both selection kernels, in order: x of type `label`."""
    return {
        "x_ptr": f"*{label}",
        "row_scale_ptr": f"*{acc}",
        "gamma_ptr": "*fp64",
        "lengths_ptr": "*i64",
        "noise_ptr": f"*{acc}",
        "idx_ptr": "*i64",
        "logits_ptr": f"*{acc}",
        "source_ptr": "*i32",
        "bad_ptr": "*i64",
    }


def _small_variants() -> list[CompileVariant]:
    variants = []
    for label, acc in _INPUTS:
        for block_n in (16, SMALL_N):
            for record, scaled in _modes(acc):
                signature = {
                    **_selection_arguments(label, acc),
                    "N": "i32",
                    "C": "i32",
                    "steps": "i32",
                    "scale": "fp32",
                }
                constexprs = {
                    "HAS_NOISE": record,
                    "RECORD": record,
                    "HAS_ROW_SCALE": scaled,
                    "ACC": _ACC[acc],
                    "BLOCK_N": block_n,
                    "BLOCK_C": _small_block_c(block_n),
                }
                tag = f"{label},N{block_n},{_mode_tag(record, scaled)}"
                options = {"num_warps": _small_warps(block_n), "num_stages": 1}
                variants.append(CompileVariant(tag, signature, constexprs, options))
    return variants


def _small_warps(block_n: int) -> int:
    return 8 if block_n > 128 else 4


def _small_block_c(block_n: int) -> int:
    """Channels per tile: about 16 tile values per thread, whatever the template size."""
    return max(16, min(32, 2048 // block_n))


@compile_checked_helper
@triton.jit
def _row_scale(ptr, rows, mask, HAS_ROW_SCALE: tl.constexpr, ACC: tl.constexpr):
    """The rows' scales (1 without a row scale). The selection of the rows s_i x_i needs only
    these: ||s_i x_i|| = |s_i| ||x_i|| and (s_i x_i) . (s_p x_p) = s_i s_p (x_i . x_p), so the
    scaled rows are never built."""
    if HAS_ROW_SCALE:
        return tl.load(ptr + rows, mask=mask, other=0.0).to(ACC)
    else:
        return tl.full(rows.shape, 1.0, ACC)


@compile_checked(*_small_variants())
@triton.jit
def _qfps_on_chip_kernel(
    x_ptr,
    row_scale_ptr,
    gamma_ptr,
    lengths_ptr,
    noise_ptr,
    idx_ptr,
    logits_ptr,
    source_ptr,
    bad_ptr,
    N,
    C,
    steps,
    scale,
    HAS_NOISE: tl.constexpr,
    RECORD: tl.constexpr,
    HAS_ROW_SCALE: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    rows = tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_C)
    valid = rows < tl.load(lengths_ptr + b)
    base = x_ptr + b * N * C
    gamma = tl.load(gamma_ptr).to(ACC)
    row_scale = _row_scale(row_scale_ptr + b * N, rows, valid, HAS_ROW_SCALE, ACC)

    sum_sq = tl.zeros([BLOCK_N], dtype=ACC)
    for c0 in range(0, C, BLOCK_C):
        mask = valid[:, None] & ((c0 + cols) < C)[None, :]
        v = tl.load(base + rows[:, None] * C + (c0 + cols)[None, :], mask=mask, other=0.0)
        v = v.to(ACC)
        sum_sq += tl.sum(v * v, axis=1)
    q = tl.sqrt(sum_sq) * tl.abs(row_scale)
    tl.store(bad_ptr + b, tl.min(tl.where(valid & ((q - q) != 0), rows, N), axis=0).to(tl.int64))
    nonzero = q > 0
    q_safe = tl.where(nonzero, q, 1.0)
    half_qg = tl.where(nonzero, tl.exp2(gamma * tl.log2(q_safe)) * 0.5, 0.0)
    inv_q = tl.where(nonzero, 1.0 / q_safe, 0.0)
    d = tl.where(valid, tl.where(nonzero, q, -1.0), float("-inf"))
    src = tl.full([BLOCK_N], -1, tl.int32)
    pick = -1
    for t in range(0, steps):
        if t > 0:
            inv_qs = tl.sum(tl.where(rows == pick, inv_q * row_scale, 0.0), axis=0)
            dot = tl.zeros([BLOCK_N], dtype=ACC)
            live = d >= 0
            for c0 in range(0, C, BLOCK_C):
                in_c = (c0 + cols) < C
                u = tl.load(base + pick * C + c0 + cols, mask=in_c & (pick >= 0), other=0.0)
                mask = live[:, None] & in_c[None, :]
                v = tl.load(base + rows[:, None] * C + (c0 + cols)[None, :], mask=mask, other=0.0)
                dot += tl.sum(v.to(ACC) * (u.to(ACC) * inv_qs)[None, :], axis=1)
            dot *= row_scale
            dist = half_qg * tl.maximum(1.0 - inv_q * dot, 0.0)
            update = live & ((t == 1) | (dist < d))
            d = tl.where(update, dist, d)
            src = tl.where(update, t - 1, src)
        if HAS_NOISE:
            g = tl.load(noise_ptr + (b * steps + t) * N + rows, mask=rows < N, other=0.0)
            score = d * scale + g.to(ACC)
        else:
            score = d
        score = tl.where(d >= 0, score, tl.where(d == -1.0, ZERO_ROW_SCORE, float("-inf")))
        best = tl.max(score, axis=0)
        pick = tl.min(tl.where(score == best, rows, BLOCK_N), axis=0)
        pick = tl.where(best > float("-inf"), pick, -1)
        tl.store(idx_ptr + b * steps + t, pick.to(tl.int64))
        if RECORD:
            out = (b * steps + t) * N + rows
            tl.store(logits_ptr + out, tl.where(d >= 0, d, float("-inf")), mask=rows < N)
            tl.store(source_ptr + out, tl.where(d >= 0, src, -1), mask=rows < N)
        d = tl.where(rows == pick, float("-inf"), d)


def _sweep_variants() -> list[CompileVariant]:
    variants = []
    for label, acc in _INPUTS:
        for first in (True, False):
            for record, scaled in _modes(acc):
                signature = {
                    **_selection_arguments(label, acc),
                    "d_ptr": f"*{acc}",
                    "half_qg_ptr": f"*{acc}",
                    "inv_q_ptr": f"*{acc}",
                    "src_ptr": "*i32",
                    "part_score_ptr": f"*{acc}",
                    "part_idx_ptr": "*i32",
                    "N": "i32",
                    "C": "i32",
                    "steps": "i32",
                    "t": "i32",
                    "scale": "fp32",
                }
                constexprs = {
                    "FIRST": first,
                    "HAS_NOISE": record,
                    "RECORD": record,
                    "HAS_ROW_SCALE": scaled,
                    "ACC": _ACC[acc],
                    "BLOCK_N": SWEEP_BLOCK_N,
                    "BLOCK_C": SWEEP_BLOCK_C,
                }
                tag = f"{label},{'norms' if first else 'step'},{_mode_tag(record, scaled)}"
                variants.append(CompileVariant(tag, signature, constexprs, SWEEP_OPTIONS))
    return variants


@compile_checked(*_sweep_variants())
@triton.jit
def _qfps_sweep_kernel(
    x_ptr,
    row_scale_ptr,
    gamma_ptr,
    lengths_ptr,
    noise_ptr,
    idx_ptr,
    logits_ptr,
    source_ptr,
    bad_ptr,
    d_ptr,
    half_qg_ptr,
    inv_q_ptr,
    src_ptr,
    part_score_ptr,
    part_idx_ptr,
    N,
    C,
    steps,
    t,
    scale,
    FIRST: tl.constexpr,
    HAS_NOISE: tl.constexpr,
    RECORD: tl.constexpr,
    HAS_ROW_SCALE: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    block = tl.program_id(1)
    rows = block * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_C)
    in_n = rows < N
    base = x_ptr + b * N * C
    # Row offsets in int64: N * C passes 2^31 for large templates.
    row_offsets = rows.to(tl.int64)[:, None] * C
    state = b * N + rows
    valid = rows < tl.load(lengths_ptr + b)
    row_scale = _row_scale(row_scale_ptr + b * N, rows, valid, HAS_ROW_SCALE, ACC)
    if FIRST:
        sum_sq = tl.zeros([BLOCK_N], dtype=ACC)
        for c0 in range(0, C, BLOCK_C):
            mask = valid[:, None] & ((c0 + cols) < C)[None, :]
            v = tl.load(base + row_offsets + (c0 + cols)[None, :], mask=mask, other=0.0)
            v = v.to(ACC)
            sum_sq += tl.sum(v * v, axis=1)
        q = tl.sqrt(sum_sq) * tl.abs(row_scale)
        bad = tl.min(tl.where(valid & ((q - q) != 0), rows, N), axis=0).to(tl.int64)
        tl.store(bad_ptr + b * tl.num_programs(1) + block, bad)
        nonzero = q > 0
        q_safe = tl.where(nonzero, q, 1.0)
        gamma = tl.load(gamma_ptr).to(ACC)
        half_qg = tl.where(nonzero, tl.exp2(gamma * tl.log2(q_safe)) * 0.5, 0.0)
        tl.store(half_qg_ptr + state, half_qg, mask=in_n)
        tl.store(inv_q_ptr + state, tl.where(nonzero, 1.0 / q_safe, 0.0), mask=in_n)
        d = tl.where(valid, tl.where(nonzero, q, -1.0), float("-inf"))
        src = tl.full([BLOCK_N], -1, tl.int32)
    else:
        d = tl.load(d_ptr + state, mask=in_n, other=float("-inf"))
        src = tl.load(src_ptr + state, mask=in_n, other=-1)
        pick = tl.load(idx_ptr + b * steps + t - 1)
        inv_qs = tl.load(inv_q_ptr + b * N + tl.maximum(pick, 0))
        if HAS_ROW_SCALE:
            inv_qs *= tl.load(row_scale_ptr + b * N + tl.maximum(pick, 0)).to(ACC)
        live = d >= 0
        dot = tl.zeros([BLOCK_N], dtype=ACC)
        for c0 in range(0, C, BLOCK_C):
            in_c = (c0 + cols) < C
            u = tl.load(base + pick * C + c0 + cols, mask=in_c & (pick >= 0), other=0.0)
            mask = live[:, None] & in_c[None, :]
            v = tl.load(base + row_offsets + (c0 + cols)[None, :], mask=mask, other=0.0)
            dot += tl.sum(v.to(ACC) * (u.to(ACC) * inv_qs)[None, :], axis=1)
        dot *= row_scale
        half_qg = tl.load(half_qg_ptr + state, mask=in_n, other=0.0)
        inv_q = tl.load(inv_q_ptr + state, mask=in_n, other=0.0)
        dist = half_qg * tl.maximum(1.0 - inv_q * dot, 0.0)
        update = live & ((t == 1) | (dist < d))
        d = tl.where(update, dist, d)
        src = tl.where(update, t - 1, src)
    tl.store(d_ptr + state, d, mask=in_n)
    tl.store(src_ptr + state, src, mask=in_n)
    if HAS_NOISE:
        g = tl.load(noise_ptr + (b * steps + t) * N + rows, mask=in_n, other=0.0)
        score = d * scale + g.to(ACC)
    else:
        score = d
    score = tl.where(d >= 0, score, tl.where(d == -1.0, ZERO_ROW_SCORE, float("-inf")))
    best = tl.max(score, axis=0)
    first = tl.min(tl.where(score == best, rows, N), axis=0)
    part = b * tl.num_programs(1) + block
    tl.store(part_score_ptr + part, best)
    tl.store(part_idx_ptr + part, tl.where(best > float("-inf"), first, -1))
    if RECORD:
        out = (b * steps + t) * N + rows
        tl.store(logits_ptr + out, tl.where(d >= 0, d, float("-inf")), mask=in_n)
        tl.store(source_ptr + out, tl.where(d >= 0, src, -1), mask=in_n)


@compile_checked(
    *(
        CompileVariant(
            acc,
            {
                "part_score_ptr": f"*{acc}",
                "part_idx_ptr": "*i32",
                "idx_ptr": "*i64",
                "d_ptr": f"*{acc}",
                "N": "i32",
                "blocks": "i32",
                "steps": "i32",
                "t": "i32",
            },
            {"BLOCK": PICK_BLOCK},
            {"num_warps": 4},
        )
        for acc in _ACC
    )
)
@triton.jit
def _qfps_pick_kernel(
    part_score_ptr, part_idx_ptr, idx_ptr, d_ptr, N, blocks, steps, t, BLOCK: tl.constexpr
):
    b = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    best = tl.load(part_score_ptr + b * blocks)
    pick = tl.load(part_idx_ptr + b * blocks)
    # Partials come in row order: a later block replaces the best only when strictly larger.
    for start in range(0, blocks, BLOCK):
        in_range = start + offs < blocks
        score = tl.load(part_score_ptr + b * blocks + start + offs, mask=in_range, other=0.0)
        score = tl.where(in_range, score, float("-inf"))
        index = tl.load(part_idx_ptr + b * blocks + start + offs, mask=in_range, other=-1)
        chunk_best = tl.max(score, axis=0)
        chunk_first = tl.min(tl.where(score == chunk_best, start + offs, blocks), axis=0)
        chunk_pick = tl.sum(tl.where(start + offs == chunk_first, index, 0), axis=0)
        replace = chunk_best > best
        pick = tl.where(replace, chunk_pick, pick)
        best = tl.where(replace, chunk_best, best)
    tl.store(idx_ptr + b * steps + t, pick.to(tl.int64))
    if pick >= 0:
        tl.store(d_ptr + b * N + pick, float("-inf"))


def select(
    x: torch.Tensor,
    gamma: torch.Tensor,
    k: int,
    lengths: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    scale: float = 1.0,
    record: bool = False,
    on_chip: bool | None = None,
    row_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(indices, logits, source) as the C++ op computes them; logits and source only when
    ``record``; the selection of the rows ``row_scale[..., None] * x`` when given (plain mode
    only). ``on_chip`` forces a path (default: on chip when N <= SMALL_N)."""
    batch, n, channels = x.shape
    steps = min(k, n)
    device = x.device
    acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    acc = tl.float64 if x.dtype == torch.float64 else tl.float32
    x = x.contiguous()
    gamma = gamma.to(device=device, dtype=torch.float64).reshape(1)
    if lengths is None:
        lengths = torch.full((batch,), n, dtype=torch.int64, device=device)
    lengths = lengths.to(device=device, dtype=torch.int64)
    indices = torch.empty(batch, steps, dtype=torch.int64, device=device)
    logits = source = None
    if record:
        logits = torch.empty(batch, steps, n, dtype=acc_dtype, device=device)
        source = torch.empty(batch, steps, n, dtype=torch.int32, device=device)
    if indices.numel() == 0:
        return indices, logits, source
    if noise is not None:
        noise = noise.to(acc_dtype).contiguous()
    if row_scale is not None:
        row_scale = row_scale.to(acc_dtype).contiguous()
    # Pointers the kernel never reads when HAS_NOISE / RECORD / HAS_ROW_SCALE is off.
    noise_arg = noise if noise is not None else indices
    logits_arg = logits if record else indices
    source_arg = source if record else indices
    row_scale_arg = row_scale if row_scale is not None else indices
    flags = {
        "HAS_NOISE": noise is not None,
        "RECORD": record,
        "HAS_ROW_SCALE": row_scale is not None,
        "ACC": acc,
    }
    if on_chip is None:
        on_chip = n <= SMALL_N
    if on_chip:
        block_n = max(16, triton.next_power_of_2(n))
        bad = torch.empty(batch, dtype=torch.int64, device=device)
        _qfps_on_chip_kernel[(batch,)](
            x, row_scale_arg, gamma, lengths, noise_arg, indices, logits_arg, source_arg, bad,
            n, channels, steps, scale, **flags, BLOCK_N=block_n, BLOCK_C=_small_block_c(block_n),
            num_warps=_small_warps(block_n), num_stages=1,
        )  # fmt: skip
    else:
        blocks = triton.cdiv(n, SWEEP_BLOCK_N)
        bad = torch.empty(batch, blocks, dtype=torch.int64, device=device)
        d = torch.empty(batch, n, dtype=acc_dtype, device=device)
        half_qg, inv_q = torch.empty_like(d), torch.empty_like(d)
        src = torch.empty(batch, n, dtype=torch.int32, device=device)
        part_score = torch.empty(batch, blocks, dtype=acc_dtype, device=device)
        part_idx = torch.empty(batch, blocks, dtype=torch.int32, device=device)
        for t in range(steps):
            _qfps_sweep_kernel[(batch, blocks)](
                x, row_scale_arg, gamma, lengths, noise_arg, indices, logits_arg, source_arg, bad,
                d, half_qg, inv_q, src, part_score, part_idx,
                n, channels, steps, t, scale, FIRST=t == 0, **flags,
                BLOCK_N=SWEEP_BLOCK_N, BLOCK_C=SWEEP_BLOCK_C, **SWEEP_OPTIONS,
            )  # fmt: skip
            _qfps_pick_kernel[(batch,)](
                part_score, part_idx, indices, d, n, blocks, steps, t, BLOCK=PICK_BLOCK,
                num_warps=4,
            )  # fmt: skip
        bad = bad.amin(dim=1)
    bad_rows = (bad < n).nonzero()
    if bad_rows.numel():
        row = int(bad_rows[0, 0])
        raise ValueError(
            f"quality_fps: x[{row}, {int(bad[row])}] is not finite (NaN or inf in a valid row)"
        )
    return indices, logits, source
