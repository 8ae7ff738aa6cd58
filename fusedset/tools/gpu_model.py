"""A GPU speed model of every GPU kernel, measured here from the kernels themselves, no GPU.

    python -m fusedset.tools.gpu_model [--arch 90] [--json PATH] [--check] [--only OP]

Everything it prints is MODELED, not measured on a GPU. For each GPU kernel and shape:

- bytes: the Triton launcher runs on CPU tensors under TRITON_INTERPRET=1 with the
  interpreter's loads, stores and atomics instrumented (every masked-in element times its size,
  cache hits included), plus the bytes of every torch op the launcher runs beside its kernels
  (inputs and outputs of each op that launches a kernel on a GPU). Counted at two sizes
  (COUNT_SIZES, B = 1) and at B = 2, extrapolated linearly in N and B; the ratio to the floor
  is printed at both counted sizes to show that it holds. The CUDA C++ kernels (style_pool) are
  counted from their launch geometry and access pattern (method "analytic").
- floor: every input read once and every output written once (for quality_fps, k reads of x).
- programs: the grid of each launch from the kernel module's plan function, evaluated without
  running a program (and checked against the interpreter's grids where it counts).
- launches and host synchronisations per op call (.item(), bool()/int() of a tensor,
  nonzero(), ...: a TorchDispatchMode sees them outside the kernels).
- occupancy: programs resident per SM from the compiled variant's registers, shared memory and
  warps (compiled for the architecture as the compile check does), and waves over the SMs.
- modeled time = sum over launches of bytes / bandwidth / (fraction of SMs busy, averaged over
  the launch's waves) + LAUNCH_LATENCY_S per launch; modeled fraction = floor bytes / bandwidth
  / modeled time. It is a lower bound of the time, not a measurement.

``--check`` exits 1 when a row misses its target (bytes ratio, programs, modeled fraction, host
synchronisations); ``--json PATH`` writes one object per (op, pass, form, shape).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

LAUNCH_LATENCY_S = 2.5e-6
COUNT_SIZES = (4096, 16384)
SHAPES_B = (1, 32)
SHAPES_N = (4096, 65536, 1_048_576)
TARGET_N = (65536, 1_048_576)  # where the bytes ratio and the modeled fraction are targets
MIN_FRACTION = 0.70
MIN_PROGRAMS_FROM_N = 16384  # from this N up (B = 1) a kernel must fill every SM
SINGLE_PROGRAM_FROM_N = 4096  # from this N up no step may run one program per probe


@dataclass(frozen=True)
class Gpu:
    name: str
    sms: int
    bandwidth: float  # bytes / s
    shared_per_sm: int  # bytes a block's shared memory is carved from
    registers_per_sm: int = 65536
    threads_per_sm: int = 2048
    blocks_per_sm: int = 32


GPUS = {
    90: Gpu("H100 SXM (HBM3 3.35 TB/s, 132 SMs)", 132, 3.35e12, 228 * 1024),
    80: Gpu("A100 SXM (HBM2e 2.0 TB/s, 108 SMs)", 108, 2.0e12, 164 * 1024),
}


@dataclass(frozen=True)
class Resources:
    """What one program of a compiled kernel variant holds on an SM."""

    registers: int
    shared_bytes: int
    warps: int

    def resident_per_sm(self, gpu: Gpu) -> int:
        threads = 32 * self.warps
        # Registers are allocated per warp in units of 256.
        per_warp = math.ceil(max(self.registers, 1) * 32 / 256) * 256
        by_registers = gpu.registers_per_sm // (per_warp * self.warps)
        # The runtime reserves 1 KiB of shared memory per block.
        by_shared = gpu.shared_per_sm // (self.shared_bytes + 1024)
        return max(
            0, min(gpu.blocks_per_sm, gpu.threads_per_sm // threads, by_registers, by_shared)
        )


def busy_fraction(programs: int, resident: int, gpu: Gpu) -> tuple[int, float]:
    """(waves, fraction of SMs busy averaged over the waves) of a launch."""
    slots = gpu.sms * max(resident, 1)
    waves = max(1, math.ceil(programs / slots))
    busy = [
        min(gpu.sms, programs - w * slots) / gpu.sms if programs > w * slots else 0.0
        for w in range(waves)
    ]
    return waves, sum(busy) / waves


# ----------------------------------------------------------------------------- counting


# aten ops that never launch a kernel (allocation, views, metadata).
_NO_LAUNCH = {
    "empty",
    "empty_strided",
    "empty_like",
    "new_empty",
    "new_empty_strided",
    "detach",
    "alias",
    "lift_fresh",
    "set_",
    "resize_",
    "_assert_async",  # a device-side check: a launch of a few bytes, no synchronisation
    "sym_size",
    "sym_stride",
    "sym_numel",
    "sym_storage_offset",
    "is_same_size",
}
_WRITE_ONLY = {"zero_", "fill_", "zeros", "full", "ones", "arange", "scalar_tensor"}
# aten ops whose result the host must wait for.
_SYNC = {"_local_scalar_dense", "nonzero", "masked_select", "unique_dim", "_unique2", "equal"}


@dataclass
class Count:
    """What one op call did, as the interpreter and the dispatcher saw it."""

    grids: list[tuple[str, tuple[int, int, int]]] = field(default_factory=list)
    kernel_bytes: dict[str, int] = field(default_factory=dict)
    torch_ops: int = 0
    torch_bytes: int = 0
    syncs: int = 0

    @property
    def bytes(self) -> int:
        return sum(self.kernel_bytes.values()) + self.torch_bytes

    @property
    def launches(self) -> int:
        return len(self.grids) + self.torch_ops


def count(thunk: Callable[[], object]) -> Count:
    """Runs ``thunk`` (a launcher call on CPU tensors, under TRITON_INTERPRET=1) and counts."""
    import numpy as np
    import torch
    import triton.runtime.interpreter as interp
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    result = Count()
    state = {"kernel": None}

    def add(nbytes: int) -> None:
        name = state["kernel"]
        result.kernel_bytes[name] = result.kernel_bytes.get(name, 0) + int(nbytes)

    builder = interp.InterpreterBuilder
    executor = interp.GridExecutor
    originals = {
        "load": builder.create_masked_load,
        "store": builder.create_masked_store,
        "rmw": builder.create_atomic_rmw,
        "cas": builder.create_atomic_cas,
        "grid": builder.set_grid_dim,
        "call": executor.__call__,
    }

    def load(self, ptrs, mask, other, *args):
        itemsize = np.dtype(interp._get_np_dtype(ptrs.get_element_ty())).itemsize
        add(np.count_nonzero(mask.data) * itemsize)
        return originals["load"](self, ptrs, mask, other, *args)

    def store(self, ptrs, value, mask, *args):
        add(np.count_nonzero(mask.data) * value.data.dtype.itemsize)
        return originals["store"](self, ptrs, value, mask, *args)

    def rmw(self, op, ptr, val, mask, *args):
        add(2 * np.count_nonzero(mask.data) * val.data.dtype.itemsize)
        return originals["rmw"](self, op, ptr, val, mask, *args)

    def cas(self, ptr, cmp, val, *args):
        add(2 * np.size(cmp.data) * cmp.data.dtype.itemsize)
        return originals["cas"](self, ptr, cmp, val, *args)

    def grid(self, nx, ny, nz):
        result.grids.append((state["kernel"], (int(nx), int(ny), int(nz))))
        return originals["grid"](self, nx, ny, nz)

    def call(self, *args, **kwargs):
        state["kernel"] = self.fn.__name__
        try:
            return originals["call"](self, *args, **kwargs)
        finally:
            state["kernel"] = None

    class Dispatch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if state["kernel"] is not None:  # the interpreter's own copies
                return out
            name = func.overloadpacket.__name__
            if name in _SYNC:
                result.syncs += 1
            elif not (func.is_view or name in _NO_LAUNCH):
                tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
                written = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
                read = 0 if name in _WRITE_ONLY else sum(t.nbytes for t in tensors)
                result.torch_ops += 1
                result.torch_bytes += read + sum(t.nbytes for t in written)
            return out

    builder.create_masked_load = load
    builder.create_masked_store = store
    builder.create_atomic_rmw = rmw
    builder.create_atomic_cas = cas
    builder.set_grid_dim = grid
    executor.__call__ = call
    try:
        with Dispatch():
            thunk()
    finally:
        builder.create_masked_load = originals["load"]
        builder.create_masked_store = originals["store"]
        builder.create_atomic_rmw = originals["rmw"]
        builder.create_atomic_cas = originals["cas"]
        builder.set_grid_dim = originals["grid"]
        executor.__call__ = originals["call"]
    return result


# ----------------------------------------------------------------------------- workloads


@dataclass(frozen=True)
class Launch:
    """A launch as the model sees it: a Triton plan entry, or a CUDA C++ launch (analytic)."""

    kernel: str
    variant: str
    grid: tuple[int, ...]

    @property
    def programs(self) -> int:
        return math.prod(self.grid)


@dataclass(frozen=True)
class Workload:
    op: str  # the torch.ops.fusedset op
    pass_: str  # "forward" or "backward"
    form: str  # what distinguishes workloads of one op (the CAFace form, the recording mode)
    floor: Callable[[int, int], int]  # (B, N) -> bytes
    plan: Callable[[int, int], list]  # (B, N) -> the launches (registry.Launch or Launch)
    max_ratio: float
    make: Callable[[int, int], Callable[[], object]] | None = None  # Triton: inputs -> call
    analytic: Callable[[int, int], tuple[dict[str, int], int]] | None = None  # CUDA C++
    sizes: Sequence[tuple[int, int]] = ()  # (B, N) rows; default SHAPES_B x SHAPES_N
    label_n: str = "N"


def _generator():
    import torch

    return torch.Generator().manual_seed(0)


def _cluster_workloads() -> list[Workload]:
    import torch

    from fusedset.triton_kernels import cluster_accumulate as kernels

    m, d, c = 4, 128, 512
    f32 = 4

    def inputs(b, n):
        g = _generator()
        keys = torch.randn(b, n, d, generator=g)
        values = torch.randn(b, n, c, generator=g)
        queries = torch.randn(1, m, d, generator=g)
        bias = torch.randn(1, m, generator=g)
        return keys, queries, values, bias

    def forward(caface):
        def make(b, n):
            keys, queries, values, bias = inputs(b, n)
            bias = bias if caface else None
            return lambda: kernels.forward(keys, queries, values, d**-0.5, bias, caface, caface)

        return make

    def backward(caface):
        def make(b, n):
            keys, queries, values, bias = inputs(b, n)
            g = _generator()
            grad_num = torch.randn(b, m, c, generator=g)
            grad_den = torch.randn(b, m, generator=g)
            grad_key_num = torch.randn(b, m, d if caface else 0, generator=g)
            bias = bias if caface else None
            return lambda: kernels.backward(
                grad_num,
                grad_den,
                grad_key_num,
                keys,
                queries,
                values,
                d**-0.5,
                bias,
                caface,
                caface,
            )

        return make

    def floor(caface, backward):
        kd = d if caface else 0
        small = m * (d + 1) * f32  # centers and bias
        outputs = m * (c + kd + 1) * f32  # num, den (and token num) per probe

        def bytes_(b, n):
            rows = b * n * (d + c) * f32  # keys and values, read once
            if backward:  # read them, and the output gradients; write their gradients
                return 2 * rows + b * outputs + small + b * small
            return rows + b * outputs + small

        return bytes_

    def plan(fn, caface):
        kd = d if caface else 0
        return lambda b, n: fn(b, n, d, c, m, kd, torch.float32, caface)

    passes = (
        ("cluster_accumulate", "forward", kernels.forward_plan, 1.15, forward),
        ("cluster_accumulate_backward", "backward", kernels.backward_plan, 1.3, backward),
    )
    rows = []
    for caface in (False, True):
        for op, pass_, plan_fn, max_ratio, make in passes:
            rows.append(
                Workload(
                    op,
                    pass_,
                    "caface" if caface else "plain",
                    floor(caface, pass_ == "backward"),
                    plan(plan_fn, caface),
                    max_ratio,
                    make=make(caface),
                )
            )
    return rows


def _sinusoid_workloads() -> list[Workload]:
    import torch

    from fusedset.reference._sinusoid import frequency_divisors
    from fusedset.triton_kernels import sinusoid_attention_pool as kernels

    c, r, dim = 512, 24, 512
    divisors = frequency_divisors(dim, 10000.0, torch.float32)

    def make(b, n):
        g = _generator()
        x = torch.randn(b, n, c, generator=g)
        queries = torch.randn(b, r, c, generator=g)
        code_queries = torch.randn(b, r, dim, generator=g)
        norms = torch.rand(b, n, generator=g) * 30 + 5
        return lambda: kernels.forward(
            x, queries, code_queries, norms, divisors, 2 * math.pi, 1e-5, norms
        )

    def floor(b, n):  # x, positions and row scales once; queries; pooled and logsumexp out
        return 4 * (b * n * (c + 2) + b * r * (c + dim) + b * r * (c + 1) + dim // 2)

    return [
        Workload(
            "sinusoid_attention_pool",
            "forward",
            "row-scaled",
            floor,
            lambda b, n: kernels.forward_plan(b, n, c, r, dim // 2, torch.float32, True),
            1.2,
            make=make,
        )
    ]


def _quality_fps_workloads() -> list[Workload]:
    import torch

    from fusedset.triton_kernels import quality_fps as kernels

    c, k = 512, 3

    def make(record):
        def build(b, n):
            g = _generator()
            x = torch.randn(b, n, c, generator=g)
            gamma = torch.tensor(0.5, dtype=torch.float64)
            noise = torch.randn(b, k, n, generator=g) if record else None
            return lambda: kernels.select(x, gamma, k, noise=noise, record=record)

        return build

    def floor(record):
        def bytes_(b, n):  # k reads of x; the indices; with noise in, logits and source out
            out = b * k * 8
            if record:
                out += b * k * n * (4 + 4 + 4)
            return k * b * n * c * 4 + out

        return bytes_

    return [
        Workload(
            op,
            "forward",
            form,
            floor(record),
            lambda b, n, record=record: kernels.select_plan(
                b, n, c, k, torch.float32, record, False
            ),
            1.05,
            make=make(record),
        )
        for op, form, record in (
            ("quality_fps", "indices", False),
            ("quality_fps_select", "recording", True),
        )
    ]


def triton_workloads() -> list[Workload]:
    return _cluster_workloads() + _sinusoid_workloads() + _quality_fps_workloads()


# ----------------------------------------------------------------------------- the model


@dataclass
class Row:
    op: str
    pass_: str
    form: str
    kernel: str
    B: int
    N: int
    method: str
    bytes: int
    floor_bytes: int
    programs: int
    launches: int
    host_syncs: int
    resident_per_sm: int
    waves: int
    modeled_s: float
    floor_s: float
    modeled_fraction: float
    ratio_at_counted: list[float] = field(default_factory=list)
    misses: list[str] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        return self.bytes / self.floor_bytes

    def as_json(self) -> dict:
        out = asdict(self)
        out["pass"] = out.pop("pass_")
        out["ratio"] = self.ratio
        return out


def _resources(pairs: set[tuple[str, str]], arch: int) -> dict[tuple[str, str], Resources]:
    """Registers, shared memory and warps of each (kernel, variant), compiled in a process
    without TRITON_INTERPRET (an interpreted kernel cannot be compiled)."""
    if not pairs:
        return {}
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    spec = json.dumps(sorted(pairs))
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "fusedset.tools.gpu_model",
            "--resources",
            spec,
            "--arch",
            str(arch),
        ],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"gpu_model: compiling the kernels failed:\n{out.stdout}{out.stderr}")
    return {(k, v): Resources(**r) for k, v, r in json.loads(out.stdout.splitlines()[-1])}


def _compile_resources(spec: str, arch: int) -> list:
    from fusedset.tools.compile_check import _autotune_configs, check
    from fusedset.triton_kernels import REGISTRY
    from fusedset.triton_kernels.registry import RegisteredKernel

    import_kernel_modules()
    wanted = [tuple(p) for p in json.loads(spec)]
    by_name = {k.name: k for k in REGISTRY}
    results = []
    for kernel, label in wanted:
        entry = by_name[kernel]
        variant = next(v for v in entry.variants if v.label == label)
        config = _autotune_configs(entry.kernel)[0]
        warps = config.num_warps if config is not None else variant.options.get("num_warps", 4)
        (row, *_) = check([RegisteredKernel(kernel, entry.kernel, (variant,))], [arch])
        if row.error:
            raise RuntimeError(f"{kernel} [{label}]: {row.error}")
        results.append(
            (
                kernel,
                label,
                {"registers": row.registers, "shared_bytes": row.shared_bytes, "warps": warps},
            )
        )
    return results


def import_kernel_modules() -> None:
    from fusedset.tools.compile_check import _package_modules

    _package_modules()


def _plan(workload: Workload, b: int, n: int) -> list[Launch]:
    return [Launch(p.kernel, p.variant, tuple(p.grid)) for p in workload.plan(b, n)]


def _check_plan(workload: Workload, b: int, n: int, seen: Count) -> None:
    planned = [(p.kernel, tuple(p.grid) + (1,) * (3 - len(p.grid))) for p in _plan(workload, b, n)]
    if planned != seen.grids:
        raise AssertionError(
            f"{workload.op} {workload.form} at B={b}, N={n}: the launcher launched "
            f"{seen.grids}, its plan says {planned}"
        )


@dataclass
class Fit:
    """Bytes of each kernel (and of the torch ops beside them) as B * (a + s N)."""

    per_kernel: dict[str, tuple[float, float]]
    torch: tuple[float, float]
    torch_ops: int
    syncs: int
    ratios: list[float]
    b_scaling_error: float

    def bytes(self, b: int, n: int) -> dict[str, float]:
        out = {k: b * (a + s * n) for k, (a, s) in self.per_kernel.items()}
        out["(torch ops)"] = b * (self.torch[0] + self.torch[1] * n)
        return out


def fit(workload: Workload) -> Fit:
    n1, n2 = COUNT_SIZES
    counts = {}
    for b, n in ((1, n1), (1, n2), (2, n1)):
        counts[b, n] = count(workload.make(b, n))
        _check_plan(workload, b, n, counts[b, n])
    c1, c2, cb = counts[1, n1], counts[1, n2], counts[2, n1]

    def line(y1: float, y2: float) -> tuple[float, float]:
        s = (y2 - y1) / (n2 - n1)
        return y1 - s * n1, s

    per_kernel = {
        k: line(c1.kernel_bytes.get(k, 0), c2.kernel_bytes.get(k, 0))
        for k in {*c1.kernel_bytes, *c2.kernel_bytes}
    }
    result = Fit(
        per_kernel=per_kernel,
        torch=line(c1.torch_bytes, c2.torch_bytes),
        torch_ops=max(c1.torch_ops, c2.torch_ops),
        syncs=max(c1.syncs, c2.syncs, cb.syncs),
        ratios=[c1.bytes / workload.floor(1, n1), c2.bytes / workload.floor(1, n2)],
        b_scaling_error=0.0,
    )
    predicted = sum(result.bytes(2, n1).values())
    result.b_scaling_error = abs(cb.bytes - predicted) / cb.bytes
    return result


def model_row(
    workload: Workload,
    b: int,
    n: int,
    kernel_bytes: dict[str, float],
    method: str,
    torch_ops: int,
    syncs: int,
    resources: dict[tuple[str, str], Resources],
    gpu: Gpu,
    ratios: list[float],
) -> Row:
    launches = _plan(workload, b, n)
    time = 0.0
    biggest = max(launches, key=lambda p: kernel_bytes.get(p.kernel, 0))
    main = resources[biggest.kernel, biggest.variant]
    waves_main = 0
    for name, nbytes in kernel_bytes.items():
        mine = [p for p in launches if p.kernel == name]
        if not mine:  # torch ops beside the kernels: assume they fill the GPU
            time += nbytes / gpu.bandwidth
            continue
        share = nbytes / len(mine)
        for p in mine:
            waves, busy = busy_fraction(
                p.programs, resources[p.kernel, p.variant].resident_per_sm(gpu), gpu
            )
            if p is biggest:
                waves_main = waves
            time += share / gpu.bandwidth / busy
    total_launches = len(launches) + torch_ops
    time += total_launches * LAUNCH_LATENCY_S
    floor = workload.floor(b, n)
    floor_s = floor / gpu.bandwidth
    row = Row(
        op=workload.op,
        pass_=workload.pass_,
        form=workload.form,
        kernel=" + ".join(dict.fromkeys(p.kernel for p in launches)),
        B=b,
        N=n,
        method=method,
        bytes=int(sum(kernel_bytes.values())),
        floor_bytes=floor,
        programs=biggest.programs,
        launches=total_launches,
        host_syncs=syncs,
        resident_per_sm=main.resident_per_sm(gpu),
        waves=waves_main,
        modeled_s=time,
        floor_s=floor_s,
        modeled_fraction=floor_s / time,
        ratio_at_counted=[round(r, 4) for r in ratios],
    )
    # style_pool's shapes are targets as they are; the Triton kernels' at TARGET_N.
    if (n in TARGET_N or workload.analytic is not None) and row.ratio > workload.max_ratio:
        row.misses.append(f"bytes {row.ratio:.2f}x > {workload.max_ratio}x")
    if b == 1 and n >= MIN_PROGRAMS_FROM_N and row.programs < gpu.sms:
        row.misses.append(f"{row.programs} programs < {gpu.sms} SMs")
    if n in TARGET_N and row.modeled_fraction < MIN_FRACTION:
        row.misses.append(f"modeled {row.modeled_fraction:.0%} < {MIN_FRACTION:.0%}")
    if n >= SINGLE_PROGRAM_FROM_N and any(p.programs <= b for p in launches):
        row.misses.append("a launch of one program per probe on the critical path")
    if syncs:
        row.misses.append(f"{syncs} host synchronisations")
    return row


def _sizes(workload: Workload) -> list[tuple[int, int]]:
    return list(workload.sizes) or [(b, n) for b in SHAPES_B for n in SHAPES_N]


def run(workloads: Sequence[Workload], arch: int, log=print) -> list[Row]:
    gpu = GPUS[arch]
    pairs = {
        (p.kernel, p.variant)
        for w in workloads
        if w.make is not None
        for b, n in _sizes(w)
        for p in _plan(w, b, n)
    }
    resources = _resources(pairs, arch)
    resources.update(cuda_resources(workloads, arch))
    rows = []
    for w in workloads:
        if w.make is not None:
            log(f"gpu_model: counting {w.op} {w.form} in the interpreter at N = {COUNT_SIZES}")
            f = fit(w)
            if f.b_scaling_error > 0.02:
                raise AssertionError(
                    f"{w.op} {w.form}: bytes at B = 2 are {f.b_scaling_error:.1%} off twice "
                    f"those at B = 1: the linear model does not hold"
                )
        for b, n in _sizes(w):
            if w.make is not None:
                rows.append(
                    model_row(
                        w,
                        b,
                        n,
                        f.bytes(b, n),
                        "interpreter",
                        f.torch_ops,
                        f.syncs,
                        resources,
                        gpu,
                        f.ratios,
                    )
                )
            else:
                kernel_bytes, launches_beside = w.analytic(b, n)
                rows.append(
                    model_row(
                        w, b, n, kernel_bytes, "analytic", launches_beside, 0, resources, gpu, []
                    )
                )
    return rows


# ----------------------------------------------------------------------------- CUDA C++


# style_pool's launch geometry, mirrored from csrc/ops/cuda/style_pool_kernel.cu (its constants
# and its host plan): a row's H*W values are cut into chunks held in registers, and the chunks
# into splits when there are too few rows to give the GPU TARGET_WARPS warps of work. The
# backward runs on the forward's units and reads x once, with the statistics the forward saved.
STYLE_WARP_BLOCK = 256  # kWarp * kWarpsPerBlock threads: a warp per row (contiguous)
STYLE_TILE = (32, 8)  # kTileChannels x kTileRows (channels_last)
STYLE_VALUE_BYTES = 128  # kValueRegisters 32-bit registers of values a thread holds
STYLE_TARGET_WARPS = 8192
STYLE_SHAPES = ((256, 128, 28, 28), (1, 64, 224, 224))


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def style_pool_launches(shape, layout: str, backward: bool, size: int = 4):
    """[(kernel, sink, grid, threads, bytes loaded, bytes stored)] of one style_pool call on a
    tensor of ``shape`` with ``size``-byte elements, and its floor. The merge kernel's sink is
    None (it has one variant per dtype)."""
    b, c, h, w = shape
    rows, n = b * c, h * w
    x = rows * n * size
    acc = 8 if size == 8 else 4  # float64 accumulates in float64, the others in float32
    per = STYLE_VALUE_BYTES // acc
    if layout == "contiguous":
        kernel, chunk, groups, unit = "style_pool_contiguous_kernel", 32 * per, rows, 1
        threads = STYLE_WARP_BLOCK
    else:
        channels, tile_rows = STYLE_TILE
        kernel, chunk = "style_pool_channels_last_kernel", tile_rows * per
        groups, unit = b * _cdiv(c, channels), tile_rows
        threads = channels * tile_rows
    chunks = max(1, _cdiv(n, chunk))
    wanted = min(max(_cdiv(STYLE_TARGET_WARPS, groups * unit), 1), chunks)
    splits = _cdiv(chunks, _cdiv(chunks, wanted))
    grid = (
        _cdiv(rows * splits, STYLE_WARP_BLOCK // 32) if layout == "contiguous" else groups * splits
    )
    out, stats = 2 * rows * size, 2 * rows * acc
    if backward:
        # grad and stats read, x read, dx written. Each unit also reads its row's first element
        # (the shift of its values), grad row and stats row.
        floor = 2 * x + out + stats
        per_unit = size + 2 * size + 2 * acc
        return [(kernel, "GradFromStats", grid, threads, x + rows * splits * per_unit, x)], floor
    floor = x + out + stats
    if splits == 1:
        return [(kernel, "ToStats", grid, threads, x, out + stats)], floor
    # Each split also reads its row's first element, the shift of its values; the merge reads it
    # once a row.
    partials = (kernel, "ToPartials", grid, threads, x + rows * (splits - 1) * size,
                2 * rows * splits * acc)  # fmt: skip
    merge = ("style_pool_merge_kernel", None, _cdiv(rows, STYLE_WARP_BLOCK // 32),
             STYLE_WARP_BLOCK, 2 * rows * splits * acc + rows * size, out + stats)  # fmt: skip
    return [partials, merge], floor


def _style_variant(kernel: str, sink: str | None) -> str:
    return f"{kernel}<{sink}>" if sink else kernel


def cuda_workloads() -> list[Workload]:
    out = []
    for backward in (False, True):
        for shape in STYLE_SHAPES:
            for layout in ("contiguous", "channels_last"):

                def launches(b, n, shape=shape, layout=layout, backward=backward):
                    return style_pool_launches(shape, layout, backward)

                def plan(b, n, launches=launches):
                    return [
                        Launch(_style_variant(k, sink), "float32", (grid,))
                        for k, sink, grid, *_ in launches(b, n)[0]
                    ]

                def analytic(b, n, launches=launches):
                    moved = {}
                    for k, sink, _, _, loaded, stored in launches(b, n)[0]:
                        moved[_style_variant(k, sink)] = loaded + stored
                    return moved, 0

                out.append(
                    Workload(
                        "style_pool_backward" if backward else "style_pool",
                        "backward" if backward else "forward",
                        f"{layout} {'x'.join(map(str, shape))}",
                        lambda b, n, launches=launches: launches(b, n)[1],
                        plan,
                        1.05,
                        analytic=analytic,
                        sizes=[(shape[0], shape[2] * shape[3])],
                    )
                )
    return out


def cuda_resources(workloads: Sequence[Workload], arch: int) -> dict[tuple[str, str], Resources]:
    """Registers and shared memory of the CUDA C++ kernels compiled into fusedset._C (float
    variants), with their block sizes from the launch geometry."""
    wanted = [w for w in workloads if w.analytic is not None]
    if not wanted:
        return {}
    from fusedset.tools.compile_check import extension_rows

    compiled = [r for r in extension_rows([arch]) if r.variant.startswith("<float, float")]
    if not compiled:
        raise RuntimeError(
            "gpu_model: fusedset._C has no CUDA C++ kernels for the style_pool rows: build "
            "it with CUDA (FUSEDSET_BUILD_CUDA=1, see the README)"
        )
    out = {}
    for shape in STYLE_SHAPES:
        for layout in ("contiguous", "channels_last"):
            for backward in (False, True):
                launches, _ = style_pool_launches(shape, layout, backward)
                for kernel, sink, _, threads, _, _ in launches:
                    match = [
                        r for r in compiled if r.kernel == kernel and (sink or "") in r.variant
                    ]
                    if len(match) != 1:
                        raise RuntimeError(
                            f"gpu_model: no single compiled {kernel} for {sink} in fusedset._C "
                            f"(found {[r.variant for r in match]})"
                        )
                    out[_style_variant(kernel, sink), "float32"] = Resources(
                        match[0].registers, match[0].shared_bytes, threads // 32
                    )
    return out


# ----------------------------------------------------------------------------- output


_COLUMNS = ("op", "pass", "form", "B", "N", "method", "MB moved", "floor MB", "ratio",
            "programs", "res/SM", "waves", "launches", "syncs", "modeled us", "floor us",
            "of roofline", "target")  # fmt: skip


def _cells(r: Row) -> tuple[str, ...]:
    return (
        r.op, r.pass_, r.form, str(r.B), str(r.N), r.method, f"{r.bytes / 1e6:.2f}",
        f"{r.floor_bytes / 1e6:.2f}", f"{r.ratio:.3f}", str(r.programs), str(r.resident_per_sm),
        str(r.waves), str(r.launches), str(r.host_syncs), f"{r.modeled_s * 1e6:.1f}",
        f"{r.floor_s * 1e6:.1f}", f"{r.modeled_fraction:.0%}", "; ".join(r.misses) or "met",
    )  # fmt: skip


def _heading(gpu: Gpu) -> str:
    return (
        f"MODELED, not measured: {gpu.name}; time = bytes / bandwidth / (SMs busy) + "
        f"{LAUNCH_LATENCY_S * 1e6:.1f} us a launch"
    )


def format_table(rows: Sequence[Row], gpu: Gpu) -> str:
    lines = [_COLUMNS, *map(_cells, rows)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(_COLUMNS))]
    text = "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in lines
    )
    return f"{_heading(gpu)}\n{text}"


def format_markdown(rows: Sequence[Row], gpu: Gpu) -> str:
    lines = [f"| {' | '.join(line)} |" for line in (_COLUMNS, *map(_cells, rows))]
    lines.insert(1, "|" + " --- |" * len(_COLUMNS))
    return f"{_heading(gpu)}.\n\n" + "\n".join(lines)


# fusedset bench's implementations of the GPU ops -> the model's (op, form) rows they run.
_BENCH = {
    ("cluster_accumulate", "fusedset"): [("cluster_accumulate", "plain")],
    ("quality_fps", "fusedset indices"): [("quality_fps", "indices")],
    ("quality_fps", "fusedset select"): [("quality_fps_select", "recording")],
    ("sinusoid_attention_pool", "fusedset"): [("sinusoid_attention_pool", "row-scaled")],
    ("style_pool", "fusedset"): [("style_pool", None)],
}
_BACKWARD = {
    "cluster_accumulate": "cluster_accumulate_backward",
    "style_pool": "style_pool_backward",
}


def _interpolate(rows: list[dict], n: int, key: str) -> float | None:
    """The model's value at N = n from its rows at B = 1 (linear between the nearest two)."""
    points = sorted((r["N"], r[key]) for r in rows if r["B"] == 1)
    if not points:
        return None
    if len(points) == 1 or n <= points[0][0]:
        return points[0][1] * (n / points[0][0] if n < points[0][0] else 1)
    for (n0, y0), (n1, y1) in itertools.pairwise(points):
        if n <= n1:
            return y0 + (y1 - y0) * (n - n0) / (n1 - n0)
    (n0, y0), (n1, y1) = points[-2:]
    return y0 + (y1 - y0) * (n - n0) / (n1 - n0)


def compare(model_json: str, bench_json: str) -> list[dict]:
    """Each measured fusedset GPU kernel time of a bench run beside the model's prediction."""
    with open(model_json) as f:
        model = json.load(f)
    with open(bench_json) as f:
        bench = json.load(f)["results"]
    out = []
    for m in bench:
        targets = _BENCH.get((m["op"], m["impl"]))
        # A forward+backward time has a model only where the backward is a modeled kernel.
        if targets is None or (m["pass_"] != "forward" and m["op"] not in _BACKWARD):
            continue
        modeled = floor = 0.0
        for op, form in targets:
            ops = [op] + ([_BACKWARD[op]] if m["pass_"] != "forward" else [])
            for name in ops:
                rows = [r for r in model if r["op"] == name and r["form"] == form]
                if form is None:  # style_pool: the row of the case's shape and layout
                    rows = [r for r in model if r["op"] == name and r["form"] in m["case"]]
                    rows = [dict(r, N=m["size"]) for r in rows[:1]]
                t = _interpolate(rows, m["size"], "modeled_s")
                b = _interpolate(rows, m["size"], "floor_bytes")
                if t is None:
                    modeled = floor = float("nan")
                else:
                    modeled, floor = modeled + t, floor + b
        out.append(
            {
                "op": m["op"],
                "impl": m["impl"],
                "case": m["case"],
                "pass": m["pass_"],
                "N": m["size"],
                "measured_s": m["median_s"],
                "modeled_s": modeled,
                "floor_bytes": floor,
                "measured_gb_per_s": floor / m["median_s"] / 1e9,
                "modeled_gb_per_s": floor / modeled / 1e9 if modeled else float("nan"),
                "measured_over_modeled": m["median_s"] / modeled if modeled else float("nan"),
            }
        )
    return out


def compare_markdown(rows: Sequence[dict]) -> str:
    lines = [
        "| op | case | pass | measured us | modeled us | measured / modeled | "
        "measured GB/s (floor bytes) | modeled GB/s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['op']} ({r['impl']}) | {r['case']} | {r['pass']} | "
            f"{r['measured_s'] * 1e6:.1f} | {r['modeled_s'] * 1e6:.1f} | "
            f"{r['measured_over_modeled']:.2f} | {r['measured_gb_per_s']:.0f} | "
            f"{r['modeled_gb_per_s']:.0f} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--arch", type=int, default=90, choices=sorted(GPUS))
    parser.add_argument("--json", metavar="PATH", help="write the rows as a JSON list")
    parser.add_argument("--markdown", metavar="PATH", help="write the table in markdown")
    parser.add_argument("--check", action="store_true", help="exit 1 when a row misses a target")
    parser.add_argument("--only", action="append", default=[], help="only this op (repeatable)")
    parser.add_argument(
        "--compare",
        nargs=2,
        metavar=("MODEL_JSON", "BENCH_JSON"),
        help="put a `fusedset bench --device cuda` run beside the model (scripts/gpu-check.sh)",
    )
    parser.add_argument("--report", metavar="PREFIX", help="with --compare: PREFIX.json/.md")
    parser.add_argument("--resources", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.compare:
        rows = compare(*args.compare)
        text = compare_markdown(rows)
        print(text)
        if args.report:
            with open(f"{args.report}.json", "w") as f:
                json.dump(rows, f, indent=1)
            with open(f"{args.report}.md", "w") as f:
                f.write(f"# GPU check: measured against the model\n\n{text}\n")
        return 0

    if args.resources is not None:  # the compile step, in its own process
        print(json.dumps(_compile_resources(args.resources, args.arch)))
        return 0
    try:
        import triton  # noqa: F401
    except ImportError:
        print("gpu_model: triton is not installed (it comes with CUDA builds of torch)")
        return 2
    if os.environ.get("TRITON_INTERPRET") != "1":
        # Triton reads the variable when it is imported (importing torch may do that): the
        # counting runs in a process that has it from the start.
        env = {**os.environ, "TRITON_INTERPRET": "1"}
        argv = sys.argv[1:] if argv is None else list(argv)
        cmd = [sys.executable, "-m", "fusedset.tools.gpu_model", *argv]
        return subprocess.run(cmd, env=env, check=False).returncode
    workloads = [
        w for w in triton_workloads() + cuda_workloads() if not args.only or w.op in args.only
    ]
    rows = run(workloads, args.arch)
    print(format_table(rows, GPUS[args.arch]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([r.as_json() for r in rows], f, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(format_markdown(rows, GPUS[args.arch]) + "\n")
    missed = [r for r in rows if r.misses]
    print(f"gpu_model: {len(rows)} rows, {len(missed)} missing a target (MODELED, not measured)")
    return 1 if args.check and missed else 0


if __name__ == "__main__":
    sys.exit(main())
