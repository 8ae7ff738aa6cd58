"""Timing and reporting shared by the benchmark scripts (one script per op: bench_<op>.py).

Every ratio is measured side by side in one run: a case times all its implementations on the
same inputs, one after another, so machine noise hits them alike. Timed tests are not used.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

H100_HBM_BYTES_PER_S = 3.35e12


@dataclass
class Measurement:
    op: str
    case: str
    impl: str
    pass_: str  # "forward" or "forward+backward"
    median_s: float
    bytes_moved: float | None = None  # the floor: bytes a perfect kernel must read and write
    extra: dict = field(default_factory=dict)

    @property
    def gb_per_s(self) -> float | None:
        return None if self.bytes_moved is None else self.bytes_moved / self.median_s / 1e9


def time_cpu(fn: Callable, inputs: Sequence[tuple], warmup: int = 2, repeats: int = 9) -> float:
    """Median seconds of ``fn(*args)``, rotating through ``inputs`` so that no call finds its
    input already in cache from the call before."""
    for i in range(warmup):
        fn(*inputs[i % len(inputs)])
    times = []
    for i in range(repeats):
        args = inputs[i % len(inputs)]
        start = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_cuda(fn: Callable, inputs: Sequence[tuple]) -> float:
    """Median seconds from CUDA events (triton.testing.do_bench: warm-up, cache flush)."""
    from triton.testing import do_bench

    counter = iter(range(1 << 62))
    ms = do_bench(lambda: fn(*inputs[next(counter) % len(inputs)]), return_mode="median")
    return ms / 1e3


def time_fn(fn: Callable, inputs: Sequence[tuple], device: str, repeats: int = 9) -> float:
    if device == "cuda":
        return time_cuda(fn, inputs)
    return time_cpu(fn, inputs, repeats=repeats)


def forward_backward(fn: Callable) -> Callable:
    """fn(*args) followed by a backward pass of sum(outputs) into the inputs that need grad."""

    def run(*args):
        out = fn(*args)
        outs = out if isinstance(out, tuple) else (out,)
        torch.autograd.backward([o.sum() for o in outs])
        for a in args:
            if isinstance(a, torch.Tensor):
                a.grad = None

    return run


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


def machine_info(device: str) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device": torch.cuda.get_device_name()
        if device == "cuda"
        else platform.processor() or "cpu",
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": triton_version,
        "git_revision": git_revision(),
    }


def format_table(rows: Sequence[Measurement], baselines: Sequence[str]) -> str:
    """One line per (case, pass, impl): median time, GB/s, speedup of each impl over each
    baseline measured in the same case and pass."""
    by_key = {(r.case, r.pass_, r.impl): r for r in rows}
    header = ["case", "pass", "impl", "median ms", "GB/s", *[f"x vs {b}" for b in baselines]]
    lines = [header]
    for r in rows:
        cells = [r.case, r.pass_, r.impl, f"{r.median_s * 1e3:.3f}"]
        cells.append("-" if r.gb_per_s is None else f"{r.gb_per_s:.1f}")
        for b in baselines:
            base = by_key.get((r.case, r.pass_, b))
            cells.append("-" if base is None else f"{base.median_s / r.median_s:.2f}")
        lines.append(cells)
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join(
        "  ".join(c.rjust(w) for c, w in zip(line, widths, strict=True)) for line in lines
    )


def speedups(rows: Sequence[Measurement], impl: str, baseline: str) -> dict[tuple[str, str], float]:
    by_key = {(r.case, r.pass_, r.impl): r for r in rows}
    return {
        (r.case, r.pass_): by_key[(r.case, r.pass_, baseline)].median_s / r.median_s
        for r in rows
        if r.impl == impl and (r.case, r.pass_, baseline) in by_key
    }


def write_json(path: Path, op: str, device: str, rows: Sequence[Measurement], notes: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "op": op,
        "machine": machine_info(device),
        "notes": notes,
        "results": [{**asdict(r), "gb_per_s": r.gb_per_s} for r in rows],
    }
    path.write_text(json.dumps(payload, indent=2))


def h100_roofline_ms(bytes_moved: float) -> float:
    return bytes_moved / H100_HBM_BYTES_PER_S * 1e3
