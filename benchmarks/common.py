"""Timing, memory and machine facts shared by the benchmarks.

Every ratio is measured side by side in one run: a case times all its implementations on the
same inputs, one after another, so machine noise hits them alike. Timed tests are not used.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

H100_HBM_BYTES_PER_S = 3.35e12
MODES = ("smoke", "quick", "full")  # smoke: seconds, for CI; quick: the README's command


@dataclass
class Case:
    """One size of one op: its implementations are timed on the same rotated inputs.

    ``impls`` maps a name to a callable; the first is fusedset's, the others are baselines.
    ``bytes_moved`` is the floor per pass: bytes a perfect kernel must read and write.
    """

    op: str
    label: str
    size: int  # the x axis of the plots: images N, or elements for per-element ops
    make_inputs: Callable[[str], list[tuple]]  # device -> input tuples to rotate through
    impls: dict[str, Callable]
    bytes_moved: dict[str, float] = field(default_factory=dict)
    backward: bool = True  # also time forward+backward
    forward_only: tuple[str, ...] = ()  # impls without a backward (e.g. integer outputs)
    repeats: int = 7
    series: str = ""  # cases of one op that form separate lines in the plot (e.g. a layout)


@dataclass
class Measurement:
    op: str
    case: str
    size: int
    impl: str
    pass_: str  # "forward" or "forward+backward"
    median_s: float
    peak_extra_bytes: int | None
    bytes_moved: float | None = None
    series: str = ""

    @property
    def gb_per_s(self) -> float | None:
        return None if self.bytes_moved is None else self.bytes_moved / self.median_s / 1e9


def _status_kib(field_name: str) -> int:
    status = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field_name}:\s+(\d+) kB", status).group(1))


def peak_extra_memory(fn: Callable[[], object], device: str) -> int | None:
    """Bytes the call needs beyond what was allocated before it: on CUDA the allocator's peak;
    on a Linux CPU the growth of the process's peak resident set (reset through
    /proc/self/clear_refs), which does not count memory the allocator reuses from earlier calls."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    try:
        Path("/proc/self/clear_refs").write_text("5")
        before = _status_kib("VmRSS")
        fn()
        return max(0, _status_kib("VmHWM") - before) * 1024
    except OSError:
        return None


def fresh_process(module: str, *args: object) -> list[float]:
    """The numbers ``python -m <module> *args`` prints, measured in a new process: in the suite's
    process, memory freed by earlier calls is reused (a peak would show as 0) and glibc's
    allocator is no longer in its default state (see ``freed_memory_kept``)."""
    command = [sys.executable, "-m", module, *map(str, args)]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return [float(word) for word in out.split()]


def fresh_process_peak_mib(module: str, n: int) -> float:
    """The peak extra memory (MiB) at size ``n`` that ``python -m <module> n`` prints."""
    return fresh_process(module, n)[0]


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
_GLIBC_MMAP_THRESHOLD = 128 * 1024
FREED_MEMORY_KEPT = "glibc keeps freed memory during timing (mallopt), as jemalloc/tcmalloc do"


def _glibc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    return ctypes.CDLL(ctypes.util.find_library("c"))


@contextmanager
def freed_memory_kept() -> Iterator[bool]:
    """Inside, glibc's malloc keeps freed memory for reuse instead of returning it to the OS;
    yields whether it could (glibc only). With glibc's defaults every allocation above its mmap
    threshold (128 KiB, rising to at most 32 MiB) is a fresh mmap that the OS zeroes page by
    page on first touch, on every call: at N = 65536
    that was 75 of cluster_accumulate's 115 ms forward+backward (its 168 MB of input gradients),
    and eager pays it as well. Timings then measure page zeroing, not the ops; jemalloc or
    tcmalloc (which PyTorch's CPU tuning guide recommends) and the CUDA caching allocator keep
    freed memory like this. On exit the default thresholds are set again (fixed from then on,
    no longer adjusted by glibc) and the kept memory is released, so peak-memory measurements
    after it see fresh allocations again."""
    libc = _glibc()
    if libc is None:
        yield False
        return
    libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30)
    libc.mallopt(_M_TRIM_THRESHOLD, (1 << 31) - 1)
    try:
        yield True
    finally:
        libc.mallopt(_M_MMAP_THRESHOLD, _GLIBC_MMAP_THRESHOLD)
        libc.mallopt(_M_TRIM_THRESHOLD, 2 * _GLIBC_MMAP_THRESHOLD)
        libc.malloc_trim(0)


def time_cpu(
    calls: Mapping[str, Callable],
    inputs: Sequence[tuple],
    warmup: int = 1,
    repeats: int = 7,
    keep_freed_memory: bool = True,
) -> dict[str, float]:
    """Median seconds of each ``call(*args)``, the calls taking turns so that a shared machine's
    drift during the measurement reaches every one alike (timed one block after another, a
    drift between the blocks goes into the ratio). Consecutive calls take consecutive inputs
    (with more than one), so that no call finds its input already in cache from the call
    before; freed memory is kept for reuse (see ``freed_memory_kept``) unless
    ``keep_freed_memory`` is False, which times the calls as a fresh process has them."""
    names = list(calls)
    times: dict[str, list[float]] = {name: [] for name in names}
    with freed_memory_kept() if keep_freed_memory else contextlib.nullcontext():
        for turn in range((warmup + repeats) * len(names)):
            name = names[turn % len(names)]
            args = inputs[turn % len(inputs)]
            start = time.perf_counter()
            calls[name](*args)
            if turn >= warmup * len(names):
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(seconds) for name, seconds in times.items()}


def time_cuda(fn: Callable, inputs: Sequence[tuple]) -> float:
    """Median seconds from CUDA events (triton.testing.do_bench: warm-up, cache flush)."""
    from triton.testing import do_bench

    counter = iter(range(1 << 62))
    ms = do_bench(lambda: fn(*inputs[next(counter) % len(inputs)]), return_mode="median")
    return ms / 1e3


def forward_backward(fn: Callable) -> Callable:
    """fn(*args) followed by a backward pass of sum(outputs) into the inputs that need grad."""

    def run(*args):
        out = fn(*args)
        outs = out if isinstance(out, tuple) else (out,)
        torch.autograd.backward([o.sum() for o in outs if o.requires_grad])
        for a in args:
            if isinstance(a, torch.Tensor):
                a.grad = None

    return run


def h100_roofline_s(bytes_moved: float) -> float:
    return bytes_moved / H100_HBM_BYTES_PER_S


def git_revision() -> str | None:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).parent,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def _cpu_name() -> str:
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    match = re.search(r"model name\s*:\s*(.+)", cpuinfo)
    return match.group(1).strip() if match else platform.machine()


def machine_info(device: str) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device": torch.cuda.get_device_name() if device == "cuda" else _cpu_name(),
        "device_type": device,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": triton_version,
        "git_revision": git_revision(),
        "cpu_allocator": FREED_MEMORY_KEPT
        if device == "cpu" and _glibc() is not None
        else "the platform's default",
    }
