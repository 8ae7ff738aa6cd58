"""quality_fps on CUDA: the selection of fusedset.ops.quality_fps in Triton.

Two paths, both one read of X per selection step, no host synchronisation (so the op runs under
CUDA graph capture and torch.compile's reduce-overhead mode):
- on chip (N <= SMALL_N, most IJB templates): one program per template runs every step with the
  running distances in registers; one launch for the whole batch.
- global (any N, up to 1e6 and beyond): one sweep launch per step. A program owns a contiguous
  range of rows of one template, updates their distances in global memory (a few numbers a row,
  small next to X) and writes one (max, first index) partial; the program that arrives last at
  the template's integer counter reduces the partials (the highest score, then the lowest
  index: the same answer whichever program arrives last) and writes the pick, which every
  program of the next sweep reads. No float atomics, no single-program step between sweeps.

Bad inputs are found inside the kernels: a length outside [0, N] (clamped, so nothing is read
past a template), a non-finite gamma, a NaN or inf in a valid row. Each raises a flag word; the
last program of the call turns the flags into the words the launcher hands to
``torch._assert_async`` (an error at once on CPU tensors, a device-side assert on CUDA).

State encoding (as in the C++ kernel): d >= 0 a candidate, -1 a zero-norm row (picked only when
nothing else remains), -inf padding or already picked.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fusedset._dtypes import accumulation_dtype
from fusedset.triton_kernels.registry import (
    REGISTRY,
    CompileVariant,
    Launch,
    compile_checked,
    compile_checked_helper,
)

SMALL_N = 256
ON_CHIP_BLOCKS = (16, 64, SMALL_N)
SWEEP_BLOCK_N = 64
SWEEP_BLOCK_C = 16
# Partials a chunk of the last program's reduction holds: every template's in one chunk.
PICK_BLOCK = 1024
# Memory-bound sweeps: occupancy hides latency, software pipelining only costs registers. A
# 64 x 16 tile over 4 warps holds 8 rows of every row vector (distances, qualities, the best so
# far) in a thread, a 64 x 32 one 16, and the sweep keeps many row vectors live. At most 128
# registers keep 4 blocks on an SM, so that SWEEP_SLOTS programs are one wave on an H100 (the
# cap also keeps ptxas from the small spills it chose uncapped for some variants). float64 needs
# more registers; it is the gradcheck dtype, not what the selection runs on in practice.
SWEEP_OPTIONS = {
    "fp32": {"num_warps": 4, "num_stages": 1, "maxnreg": 128},
    "fp64": {"num_warps": 4, "num_stages": 1},
}
SWEEP_SLOTS = 132 * 4
# Zero-norm rows score below every candidate and above "nothing left".
ZERO_ROW_SCORE = tl.constexpr(-3.4028234663852886e38)

# The int32 status words of a call: a count of finished templates, an error flag per check
# (set by any program), the flags turned into "passed" words by the last program, then one
# arrival counter per template for the global path.
DONE = tl.constexpr(0)
ERRORS = tl.constexpr(1)
PASSED = tl.constexpr(4)
COUNTERS = tl.constexpr(7)
GAMMA_CHECK = tl.constexpr(0)
LENGTHS_CHECK = tl.constexpr(1)
ROWS_CHECK = tl.constexpr(2)

# (x's type, accumulation type).
_INPUTS = [("fp32", "fp32"), ("fp16", "fp32"), ("bf16", "fp32"), ("fp64", "fp64")]
_ACC = {"fp32": tl.float32, "fp64": tl.float64}
_LABELS = {
    torch.float32: "fp32",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.float64: "fp64",
}
# (record, row-scaled): the recording mode (quality_fps_select, noise in, logits and source
# out) takes no row scale; the plain one (quality_fps) takes one or not.
_MODES = ((False, False), (False, True), (True, False))


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
        "status_ptr": "*i32",
        "lengths_stride": "i32",
        "has_lengths": "i32",
        "batch": "i32",
    }


def _mode_constexprs(acc: str, record: bool, scaled: bool) -> dict:
    return {"HAS_NOISE": record, "RECORD": record, "HAS_ROW_SCALE": scaled, "ACC": _ACC[acc]}


def _small_variants() -> list[CompileVariant]:
    variants = []
    for label, acc in _INPUTS:
        for block_n in ON_CHIP_BLOCKS:
            for record, scaled in _MODES:
                signature = {
                    **_selection_arguments(label, acc),
                    "N": "i32",
                    "C": "i32",
                    "steps": "i32",
                    "scale": "fp32",
                }
                constexprs = {
                    **_mode_constexprs(acc, record, scaled),
                    "BLOCK_N": block_n,
                    "BLOCK_C": _small_block_c(block_n, acc),
                }
                tag = f"{label},N{block_n},{_mode_tag(record, scaled)}"
                options = {"num_warps": _small_warps(block_n), "num_stages": 1}
                variants.append(CompileVariant(tag, signature, constexprs, options))
    return variants


def _small_warps(block_n: int) -> int:
    return 8 if block_n > 128 else 4


def _small_block_c(block_n: int, acc: str) -> int:
    """Channels per tile: about 16 tile values per thread whatever the template size, 8 for
    float64 (twice the registers a value)."""
    if acc == "fp64":
        return max(8, min(32, 1024 // block_n))
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


@compile_checked_helper
@triton.jit
def _template_length(lengths_ptr, lengths_stride, has_lengths, b, N, status_ptr):
    """The valid rows of template b, clamped to [0, N]: a length out of range is flagged for the
    launcher's check rather than read past the template (the check raises only later on a GPU).
    lengths is read with its stride: a strided view needs no copy."""
    raw = tl.load(lengths_ptr + b * lengths_stride, mask=has_lengths != 0, other=N)
    tl.store(status_ptr + ERRORS + LENGTHS_CHECK, 1, mask=(raw < 0) | (raw > N))
    return tl.minimum(tl.maximum(raw, 0), N)


@compile_checked_helper
@triton.jit
def _gamma(gamma_ptr, status_ptr, ACC: tl.constexpr):
    gamma = tl.load(gamma_ptr)
    tl.store(status_ptr + ERRORS + GAMMA_CHECK, 1, mask=(gamma - gamma) != 0)
    return gamma.to(ACC)


@compile_checked_helper
@triton.jit
def _quality(base, row_offsets, valid, row_scale, gamma, status_ptr, C, BLOCK_C: tl.constexpr):
    """The first read of the rows: (q, q^gamma / 2, 1 / q), 0 for zero-norm rows; a NaN or inf
    in a valid row raises the rows flag."""
    cols = tl.arange(0, BLOCK_C)
    sum_sq = tl.zeros(row_scale.shape, dtype=row_scale.dtype)
    for c0 in range(0, C, BLOCK_C):
        mask = valid[:, None] & ((c0 + cols) < C)[None, :]
        v = tl.load(base + row_offsets + (c0 + cols)[None, :], mask=mask, other=0.0)
        v = v.to(row_scale.dtype)
        sum_sq += tl.sum(v * v, axis=1)
    q = tl.sqrt(sum_sq) * tl.abs(row_scale)
    bad = tl.max((valid & ((q - q) != 0)).to(tl.int32), axis=0)
    tl.store(status_ptr + ERRORS + ROWS_CHECK, 1, mask=bad != 0)
    nonzero = q > 0
    q_safe = tl.where(nonzero, q, 1.0)
    half_qg = tl.where(nonzero, tl.exp2(gamma * tl.log2(q_safe)) * 0.5, 0.0)
    inv_q = tl.where(nonzero, 1.0 / q_safe, 0.0)
    return q, half_qg, inv_q


@compile_checked_helper
@triton.jit
def _distance(
    base, row_offsets, live, pick, inv_qs, row_scale, half_qg, inv_q, C, BLOCK_C: tl.constexpr
):
    """q_i^gamma (1 - cos(x_i, x_pick)) / 2 of the live rows; inv_qs is the pick's 1 / q
    (times its row scale)."""
    cols = tl.arange(0, BLOCK_C)
    dot = tl.zeros(row_scale.shape, dtype=row_scale.dtype)
    for c0 in range(0, C, BLOCK_C):
        in_c = (c0 + cols) < C
        u = tl.load(base + pick * C + c0 + cols, mask=in_c & (pick >= 0), other=0.0)
        mask = live[:, None] & in_c[None, :]
        v = tl.load(base + row_offsets + (c0 + cols)[None, :], mask=mask, other=0.0)
        dot += tl.sum(v.to(row_scale.dtype) * (u.to(row_scale.dtype) * inv_qs)[None, :], axis=1)
    dot *= row_scale
    return half_qg * tl.maximum(1.0 - inv_q * dot, 0.0)


@compile_checked_helper
@triton.jit
def _score(d, noise_ptr, mask, scale, HAS_NOISE: tl.constexpr):
    """What a step maximizes: d (plus the scaled noise), zero-norm rows just above nothing."""
    score = d
    if HAS_NOISE:
        score = d * scale + tl.load(noise_ptr, mask=mask, other=0.0).to(d.dtype)
    return tl.where(d >= 0, score, tl.where(d == -1.0, ZERO_ROW_SCORE, float("-inf")))


@compile_checked_helper
@triton.jit
def _first_max(score, index, none):
    """(max score, lowest index holding it); `none` when no score equals the max (all NaN)."""
    best = tl.max(score, axis=0)
    return best, tl.min(tl.where(score == best, index, none), axis=0)


@compile_checked_helper
@triton.jit
def _finish(status_ptr, batch):
    """Called once per template when its selection is complete: the last of the call turns
    the error flags into the words the launcher asserts. The barrier and the acq_rel counter
    publish every program's flags before the last one reads them."""
    tl.debug_barrier()
    done = tl.atomic_add(status_ptr + DONE, 1, sem="acq_rel", scope="gpu")
    if done == batch - 1:
        for check in tl.static_range(3):
            error = tl.load(status_ptr + ERRORS + check, cache_modifier=".cg")
            tl.store(status_ptr + PASSED + check, (error == 0).to(tl.int32))


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
    status_ptr,
    lengths_stride,
    has_lengths,
    batch,
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
    length = _template_length(lengths_ptr, lengths_stride, has_lengths, b, N, status_ptr)
    valid = rows < length
    base = x_ptr + b * N * C
    row_offsets = rows.to(tl.int64)[:, None] * C
    gamma = _gamma(gamma_ptr, status_ptr, ACC)
    row_scale = _row_scale(row_scale_ptr + b * N, rows, valid, HAS_ROW_SCALE, ACC)
    q, half_qg, inv_q = _quality(base, row_offsets, valid, row_scale, gamma, status_ptr, C, BLOCK_C)
    d = tl.where(valid, tl.where(q > 0, q, -1.0), float("-inf"))
    src = tl.full([BLOCK_N], -1, tl.int32)
    pick = -1
    for t in range(0, steps):
        if t > 0:
            inv_qs = tl.sum(tl.where(rows == pick, inv_q * row_scale, 0.0), axis=0)
            live = d >= 0
            dist = _distance(
                base, row_offsets, live, pick, inv_qs, row_scale, half_qg, inv_q, C, BLOCK_C
            )
            update = live & ((t == 1) | (dist < d))
            d = tl.where(update, dist, d)
            src = tl.where(update, t - 1, src)
        out = (b * steps + t) * N + rows
        score = _score(d, noise_ptr + out, rows < N, scale, HAS_NOISE)
        best, pick = _first_max(score, rows, BLOCK_N)
        pick = tl.where((best > float("-inf")) & (pick < BLOCK_N), pick, -1)
        tl.store(idx_ptr + b * steps + t, pick.to(tl.int64))
        if RECORD:
            tl.store(logits_ptr + out, tl.where(d >= 0, d, float("-inf")), mask=rows < N)
            tl.store(source_ptr + out, tl.where(d >= 0, src, -1), mask=rows < N)
        d = tl.where(rows == pick, float("-inf"), d)
    _finish(status_ptr, batch)


def _sweep_variants() -> list[CompileVariant]:
    variants = []
    for label, acc in _INPUTS:
        for first in (True, False):
            for record, scaled in _MODES:
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
                    "programs": "i32",
                    "rows_per_program": "i32",
                }
                constexprs = {
                    "FIRST": first,
                    **_mode_constexprs(acc, record, scaled),
                    "BLOCK_N": SWEEP_BLOCK_N,
                    "BLOCK_C": SWEEP_BLOCK_C,
                    "PICK_BLOCK": PICK_BLOCK,
                }
                tag = f"{label},{'norms' if first else 'step'},{_mode_tag(record, scaled)}"
                variants.append(CompileVariant(tag, signature, constexprs, SWEEP_OPTIONS[acc]))
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
    status_ptr,
    lengths_stride,
    has_lengths,
    batch,
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
    programs,
    rows_per_program,
    FIRST: tl.constexpr,
    HAS_NOISE: tl.constexpr,
    RECORD: tl.constexpr,
    HAS_ROW_SCALE: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
    PICK_BLOCK: tl.constexpr,
):
    # Templates and their row ranges folded into axis 0: any B and N fit the grid.
    pid = tl.program_id(0).to(tl.int64)
    b = pid // programs
    part = pid % programs
    length = _template_length(lengths_ptr, lengths_stride, has_lengths, b, N, status_ptr)
    base = x_ptr + b * N * C
    lane = tl.arange(0, BLOCK_N)
    if FIRST:
        gamma = _gamma(gamma_ptr, status_ptr, ACC)
    else:
        pick = tl.load(idx_ptr + b * steps + t - 1)
        inv_qs = tl.load(inv_q_ptr + b * N + tl.maximum(pick, 0))
        if HAS_ROW_SCALE:
            inv_qs *= tl.load(row_scale_ptr + b * N + tl.maximum(pick, 0)).to(ACC)
    lane_best = tl.full([BLOCK_N], float("-inf"), ACC)
    lane_first = tl.full([BLOCK_N], N, tl.int32)
    start = (part * rows_per_program).to(tl.int32)
    for r0 in range(start, tl.minimum(start + rows_per_program, N), BLOCK_N):
        rows = r0 + lane
        in_n = rows < N
        valid = rows < length
        # Row offsets in int64: N * C passes 2^31 for large templates.
        row_offsets = rows.to(tl.int64)[:, None] * C
        state = b * N + rows
        row_scale = _row_scale(row_scale_ptr + b * N, rows, valid, HAS_ROW_SCALE, ACC)
        if FIRST:
            q, half_qg, inv_q = _quality(
                base, row_offsets, valid, row_scale, gamma, status_ptr, C, BLOCK_C
            )
            tl.store(half_qg_ptr + state, half_qg, mask=in_n & (steps > 1))
            tl.store(inv_q_ptr + state, inv_q, mask=in_n & (steps > 1))
            d = tl.where(valid, tl.where(q > 0, q, -1.0), float("-inf"))
            src = tl.full([BLOCK_N], -1, tl.int32)
        else:
            half_qg = tl.load(half_qg_ptr + state, mask=in_n, other=0.0)
            inv_q = tl.load(inv_q_ptr + state, mask=in_n, other=0.0)
            if t == 1:
                # Step 0 stored no distances: d is q wherever 1 / q is set (all replaced now).
                d = tl.where(valid, tl.where(inv_q > 0, 0.0, -1.0), float("-inf")).to(ACC)
                src = tl.full([BLOCK_N], -1, tl.int32)
            else:
                d = tl.load(d_ptr + state, mask=in_n, other=float("-inf"))
                if RECORD:
                    src = tl.load(src_ptr + state, mask=in_n, other=-1)
                else:
                    src = tl.full([BLOCK_N], -1, tl.int32)
            d = tl.where(rows == pick, float("-inf"), d)
            live = d >= 0
            dist = _distance(
                base, row_offsets, live, pick, inv_qs, row_scale, half_qg, inv_q, C, BLOCK_C
            )
            update = live & ((t == 1) | (dist < d))
            d = tl.where(update, dist, d)
            src = tl.where(update, t - 1, src)
            # The next sweep reads them; the last one has none.
            tl.store(d_ptr + state, d, mask=in_n & (t + 1 < steps))
            if RECORD:
                tl.store(src_ptr + state, src, mask=in_n & (t + 1 < steps))
        out = (b * steps + t) * N + rows
        score = _score(d, noise_ptr + out, in_n, scale, HAS_NOISE)
        # Tiles come in row order: a lane keeps its lowest row among equal scores.
        better = score > lane_best
        lane_best = tl.where(better, score, lane_best)
        lane_first = tl.where(better, rows, lane_first)
        if RECORD:
            tl.store(logits_ptr + out, tl.where(d >= 0, d, float("-inf")), mask=in_n)
            tl.store(source_ptr + out, tl.where(d >= 0, src, -1), mask=in_n)
    best, first = _first_max(lane_best, lane_first, N)
    tl.store(part_score_ptr + pid, best)
    tl.store(part_idx_ptr + pid, first)
    # The last program of the template to arrive reduces its partials. The barrier and the
    # acq_rel counter publish every program's partial before the last one reads them.
    tl.debug_barrier()
    arrived = tl.atomic_add(status_ptr + COUNTERS + b, 1, sem="acq_rel", scope="gpu")
    if arrived == programs - 1:
        offs = tl.arange(0, PICK_BLOCK)
        top = tl.full([], float("-inf"), ACC)
        pick_row = tl.full([], N, tl.int32)
        for p0 in range(0, programs, PICK_BLOCK):
            mask = p0 + offs < programs
            parts = b * programs + p0 + offs
            score = tl.load(
                part_score_ptr + parts, mask=mask, other=float("-inf"), cache_modifier=".cg"
            )
            row = tl.load(part_idx_ptr + parts, mask=mask, other=N, cache_modifier=".cg")
            chunk_best, chunk_row = _first_max(score, row, N)
            replace = (chunk_best > top) | ((chunk_best == top) & (chunk_row < pick_row))
            top = tl.where(replace, chunk_best, top)
            pick_row = tl.where(replace, chunk_row, pick_row)
        pick_row = tl.where((top > float("-inf")) & (pick_row < N), pick_row, -1)
        tl.store(idx_ptr + b * steps + t, pick_row.to(tl.int64))
        # Ready for the next sweep, which starts after this one ends.
        tl.store(status_ptr + COUNTERS + b, 0)
        if t == steps - 1:
            _finish(status_ptr, batch)


def _sweep_split(batch: int, n: int) -> tuple[int, int]:
    """(programs per template, rows per program): one wave of SWEEP_SLOTS programs over the
    batch (at least one per template), each a whole number of tiles."""
    tiles = triton.cdiv(n, SWEEP_BLOCK_N)
    per_template = max(1, min(tiles, SWEEP_SLOTS // batch))
    rows = triton.cdiv(tiles, per_template) * SWEEP_BLOCK_N
    return triton.cdiv(n, rows), rows


def _plan(
    b: int,
    n: int,
    k: int,
    dtype: torch.dtype,
    record: bool,
    row_scaled: bool,
    on_chip: bool | None,
) -> list[Launch]:
    steps = min(k, n)
    if b == 0 or steps == 0:
        return []
    mode = f"{_LABELS[dtype]},{{}},{_mode_tag(record, row_scaled)}"
    if on_chip is None:
        on_chip = n <= SMALL_N
    if on_chip:
        block_n = next(size for size in ON_CHIP_BLOCKS if size >= n)
        return [Launch(_qfps_on_chip_kernel.__name__, mode.format(f"N{block_n}"), (b,))]
    programs, _ = _sweep_split(b, n)
    return [
        Launch(_qfps_sweep_kernel.__name__, mode.format("norms" if t == 0 else "step"),
               (b * programs,))
        for t in range(steps)
    ]  # fmt: skip


def select_plan(
    b: int, n: int, c: int, k: int, dtype: torch.dtype, record: bool, row_scaled: bool
) -> list[Launch]:
    """The Triton launches of ``select`` for these sizes, in order, without tensors (the GPU
    model's input). ``c`` does not change the launches."""
    return _plan(b, n, k, dtype, record, row_scaled, None)


def _variant(launch: Launch) -> CompileVariant:
    entry = next(e for e in REGISTRY if e.name == launch.kernel)
    return next(v for v in entry.variants if v.label == launch.variant)


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
    ``record`` (which takes ``noise``); the selection of the rows ``row_scale[..., None] * x``
    when given (plain mode only). ``on_chip`` forces a path (default: on chip when
    N <= SMALL_N). Never waits for the device: a bad length, a non-finite gamma or a non-finite
    valid row fails a ``torch._assert_async`` (RuntimeError on CPU tensors, a device-side assert
    on CUDA)."""
    op = "quality_fps_select" if record else "quality_fps"
    if on_chip and x.shape[1] > SMALL_N:
        raise ValueError(f"{op}: the on-chip path holds at most {SMALL_N} rows, got {x.shape[1]}")
    if record != (noise is not None):
        raise ValueError(f"{op}: the recording mode takes noise and only it does")
    if record and row_scale is not None:
        raise ValueError(f"{op}: row_scale is for the plain mode only")
    batch, n, channels = x.shape
    steps = min(k, n)
    device = x.device
    acc_dtype = accumulation_dtype(x.dtype)
    x = x.contiguous()
    gamma = gamma.to(device=device, dtype=torch.float64).reshape(1)
    if lengths is not None:
        lengths = lengths.to(device=device, dtype=torch.int64)
    indices = torch.empty(batch, steps, dtype=torch.int64, device=device)
    logits = source = None
    if record:
        logits = torch.empty(batch, steps, n, dtype=acc_dtype, device=device)
        source = torch.empty(batch, steps, n, dtype=torch.int32, device=device)
    messages = (
        f"{op}: gamma must be finite",
        f"{op}: lengths must lie in [0, N = {n}]",
        f"{op}: x has a row that is not finite (NaN or inf in a valid row)",
    )
    plan = _plan(batch, n, k, x.dtype, record, row_scale is not None, on_chip)
    if not plan:  # nothing to select: the checks that need no row
        torch._assert_async(gamma.isfinite().all(), messages[GAMMA_CHECK.value])
        if lengths is not None and batch:
            in_range = ((lengths >= 0) & (lengths <= n)).all()
            torch._assert_async(in_range, messages[LENGTHS_CHECK.value])
        return indices, logits, source
    if noise is not None:
        noise = noise.to(acc_dtype).contiguous()
    if row_scale is not None:
        row_scale = row_scale.to(acc_dtype).contiguous()
    # Pointers the kernel never reads when HAS_NOISE / RECORD / HAS_ROW_SCALE / lengths is off.
    common = (
        x,
        row_scale if row_scale is not None else indices,
        gamma,
        lengths if lengths is not None else indices,
        noise if noise is not None else indices,
        indices,
        logits if record else indices,
        source if record else indices,
    )
    flags = (
        lengths.stride(0) if lengths is not None else 0,
        int(lengths is not None),
        batch,
    )
    sweep = plan[0].kernel == _qfps_sweep_kernel.__name__
    status = torch.zeros(COUNTERS.value + (batch if sweep else 0), dtype=torch.int32, device=device)
    if not sweep:
        (launch,) = plan
        _qfps_on_chip_kernel[launch.grid](
            *common, status, *flags, n, channels, steps, scale, **_variant(launch).constexprs,
            **_variant(launch).options,
        )  # fmt: skip
    else:
        programs, rows_per_program = _sweep_split(batch, n)
        d = torch.empty(batch, n, dtype=acc_dtype, device=device)
        half_qg, inv_q = torch.empty_like(d), torch.empty_like(d)
        src = torch.empty(batch, n, dtype=torch.int32, device=device) if record else indices
        part_score = torch.empty(batch * programs, dtype=acc_dtype, device=device)
        part_idx = torch.empty(batch * programs, dtype=torch.int32, device=device)
        for t, launch in enumerate(plan):
            variant = _variant(launch)
            _qfps_sweep_kernel[launch.grid](
                *common, status, *flags, d, half_qg, inv_q, src, part_score, part_idx,
                n, channels, steps, t, scale, programs, rows_per_program,
                **variant.constexprs, **variant.options,
            )  # fmt: skip
    for check, message in enumerate(messages):
        torch._assert_async(status[PASSED.value + check], message)
    return indices, logits, source


def quality_fps(x, k, gamma, lengths=None, row_scale=None):
    """fusedset::quality_fps on CUDA tensors."""
    return select(x, gamma, k, lengths, row_scale=row_scale)[0]


def quality_fps_select(x, k, gamma, tau, scale, noise, lengths=None):
    """fusedset::quality_fps_select on CUDA tensors: the rows of the picks (tau only shapes the
    soft weights of the backward)."""
    from fusedset.ops.quality_fps import gather_rows

    indices, logits, source = select(x, gamma, k, lengths, noise=noise, scale=scale, record=True)
    return gather_rows(x, indices), indices, logits, source
