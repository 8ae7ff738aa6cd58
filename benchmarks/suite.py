"""Run the benchmark suite and write its report.

    fusedset bench [--quick | --smoke] [--device cpu|cuda] [--only NAME ...] [--out DIR]

Writes DIR/results.json (machine facts and every measurement), DIR/report.md (the tables),
DIR/<op>.png (time against size, log-log, every implementation) and DIR/speedups.png.
"""

from __future__ import annotations

import argparse
import importlib
import json
import pkgutil
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from types import ModuleType

import torch

import fusedset  # noqa: F401  (registers torch.ops.fusedset)
from fusedset.bench.common import (
    MODES,
    Case,
    Measurement,
    forward_backward,
    h100_roofline_s,
    machine_info,
    peak_extra_memory,
    time_cpu,
    time_cuda,
)

# conftest and test_* are the pytest-benchmark glue over these modules' cases
_NOT_BENCHMARKS = {"common", "suite", "run", "conftest"}
PASSES = ("forward", "forward+backward")


def benchmark_modules() -> dict[str, ModuleType]:
    import fusedset.bench as package

    return {
        info.name: importlib.import_module(f"{package.__name__}.{info.name}")
        for info in pkgutil.iter_modules(package.__path__)
        if info.name not in _NOT_BENCHMARKS and not info.name.startswith("test_")
    }


def _with_grad(inputs: list[tuple]) -> list[tuple]:
    return [
        tuple(
            a.detach().requires_grad_()
            if isinstance(a, torch.Tensor) and a.is_floating_point()
            else a
            for a in args
        )
        for args in inputs
    ]


def pass_inputs(inputs: list[tuple], pass_: str) -> list[tuple]:
    """The case's inputs as a pass takes them: leaves that require grad for a backward."""
    return inputs if pass_ == "forward" else _with_grad(inputs)


def timed_calls(case: Case) -> dict[str, dict[str, Callable]]:
    """The calls a case times in each pass, by implementation (forward+backward leaves out the
    forward-only ones)."""
    return {
        pass_: {
            impl: fn if pass_ == "forward" else forward_backward(fn)
            for impl, fn in case.impls.items()
            if pass_ == "forward" or impl not in case.forward_only
        }
        for pass_ in (PASSES if case.backward else PASSES[:1])
    }


def measure(case: Case, device: str, progress) -> list[Measurement]:
    inputs = case.make_inputs(device)
    rows = []
    for pass_, calls in timed_calls(case).items():
        args = pass_inputs(inputs, pass_)
        progress.set_postfix_str(f"{case.op} {case.label} {pass_}", refresh=True)
        if device == "cuda":
            seconds = {impl: time_cuda(call, args) for impl, call in calls.items()}
        else:
            seconds = time_cpu(calls, args, repeats=case.repeats)
        for impl, call in calls.items():
            with torch.no_grad() if pass_ == "forward" else torch.enable_grad():
                peak = peak_extra_memory(lambda c=call, a=args[0]: c(*a), device)
            rows.append(
                Measurement(
                    op=case.op,
                    case=case.label,
                    size=case.size,
                    impl=impl,
                    pass_=pass_,
                    median_s=seconds[impl],
                    peak_extra_bytes=peak,
                    bytes_moved=case.bytes_moved.get(pass_),
                    series=case.series,
                )
            )
            progress.update(1)
    return rows


def table(rows: Sequence[Measurement], device: str) -> str:
    """Markdown: median, GB/s, peak extra memory, and for fusedset's row of each case (its first
    implementation) the speedup over each baseline measured in the same case and pass; on CUDA
    the fraction of the H100-class roofline."""
    header = ["case", "pass", "impl", "median ms", "GB/s", "peak extra MB", "speedup"]
    if device == "cuda":
        header.append("roofline fraction")
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for r in rows:
        cells = [r.case, r.pass_, r.impl, f"{r.median_s * 1e3:.3f}"]
        cells.append("-" if r.gb_per_s is None else f"{r.gb_per_s:.1f}")
        cells.append("-" if r.peak_extra_bytes is None else f"{r.peak_extra_bytes / 1e6:.1f}")
        cells.append(", ".join(f"{x:.2f}x vs {b}" for b, x in _speedups(r, rows).items()))
        if device == "cuda":
            fraction = h100_roofline_s(r.bytes_moved) / r.median_s if r.bytes_moved else None
            cells.append("-" if fraction is None else f"{fraction:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(op: str, rows: Sequence[Measurement], out: Path) -> Path:
    """Time against size, log-log: a color per implementation, a line style per pass, a marker
    per series."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {impl: f"C{i}" for i, impl in enumerate(dict.fromkeys(r.impl for r in rows))}
    markers = {s: "osD^v<>"[i % 7] for i, s in enumerate(dict.fromkeys(r.series for r in rows))}
    fig, ax = plt.subplots(figsize=(10, 4.6))
    for impl, pass_, series in dict.fromkeys((r.impl, r.pass_, r.series) for r in rows):
        line = [r for r in rows if (r.impl, r.pass_, r.series) == (impl, pass_, series)]
        line.sort(key=lambda r: r.size)
        ax.plot(
            [r.size for r in line],
            [r.median_s * 1e3 for r in line],
            color=colors[impl],
            linestyle="-" if pass_ == "forward" else "--",
            marker=markers[series],
            label=" ".join(filter(None, [impl, series, f"({pass_})"])),
        )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("size (images N, or elements)")
    ax.set_ylabel("median time (ms)")
    ax.set_title(f"{op}: time against size")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="x-small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    path = out / f"{op}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_speedups(rows: Sequence[Measurement], out: Path) -> Path:
    """Forward speedup of fusedset over each baseline at each op's largest case."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, values = [], []
    for op in dict.fromkeys(r.op for r in rows):
        forward = [r for r in rows if r.op == op and r.pass_ == "forward"]
        largest = max(r.size for r in forward)
        at_size = {r.impl: r for r in forward if r.size == largest}
        ours = next(iter(at_size))
        for impl, r in at_size.items():
            if impl != ours:
                labels.append(f"{op}\nvs {impl}")
                values.append(r.median_s / at_size[ours].median_s)
    fig, ax = plt.subplots(figsize=(max(6.4, 1.2 * len(labels)), 4.2))
    ax.bar(range(len(values)), values, color="tab:blue")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(range(len(labels)), labels, fontsize="small")
    ax.set_ylabel("speedup (baseline time / fusedset time)")
    ax.set_title("fusedset forward speedup at each op's largest case")
    for i, v in enumerate(values):
        ax.text(i, v, f"{v:.1f}x", ha="center", va="bottom", fontsize="small")
    path = out / "speedups.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run(names: Sequence[str], device: str, mode: str, out: Path) -> dict:
    from tqdm import tqdm

    modules = benchmark_modules()
    selected = {name: modules[name] for name in names}
    cases = {name: module.cases(mode) for name, module in selected.items()}
    expected = sum(module.EXPECTED_SECONDS[mode] for module in selected.values())
    print(
        f"fusedset bench: {mode} run of {', '.join(selected)} on {device}; expect about "
        f"{expected / 60:.1f} min on a 2-core CPU",
        flush=True,
    )
    total = sum(
        len(calls)
        for case_list in cases.values()
        for case in case_list
        for calls in timed_calls(case).values()
    )
    rows: list[Measurement] = []
    with tqdm(total=total, unit="timing", file=sys.stderr, dynamic_ncols=True) as progress:
        for case_list in cases.values():
            for case in case_list:
                rows += measure(case, device, progress)
    # Modules whose numbers come from processes of their own (e.g. several ranks).
    for module in selected.values():
        if hasattr(module, "measurements"):
            rows += module.measurements(mode, device)

    out.mkdir(parents=True, exist_ok=True)
    info = machine_info(device)
    report = [
        f"# fusedset benchmark ({mode}, {device})",
        "",
        "```",
        json.dumps(info, indent=1),
        "```",
    ]
    summaries = {}
    for name, module in selected.items():
        op_rows = [r for r in rows if r.op == name]
        summaries[name] = module.summary(op_rows)
        report += ["", f"## {name}", "", table(op_rows, device), ""]
        report += [f"- {line}" for line in summaries[name]]
        plot(name, op_rows, out)
    plot_speedups(rows, out)
    payload = {
        "mode": mode,
        "machine": info,
        "summaries": summaries,
        "results": [
            {**asdict(r), "gb_per_s": r.gb_per_s, "speedups": _speedups(r, rows)} for r in rows
        ],
    }
    (out / "results.json").write_text(json.dumps(payload, indent=2))
    (out / "report.md").write_text("\n".join(report) + "\n")
    print("\n".join(report))
    print(f"\nwrote {out / 'results.json'}, {out / 'report.md'} and plots in {out}/")
    return payload


def _speedups(row: Measurement, rows: Sequence[Measurement]) -> dict[str, float]:
    """For fusedset's rows: baseline time / fusedset time for every baseline of the case."""
    same = [r for r in rows if (r.op, r.case, r.pass_) == (row.op, row.case, row.pass_)]
    if row.impl != same[0].impl:
        return {}
    return {r.impl: r.median_s / row.median_s for r in same[1:]}


def measured_table(payloads: Sequence[dict]) -> str:
    """The README's Measured table from one or more results.json of the same cases: each case's
    fusedset time and every speedup as the median over the runs, with their range."""
    runs: dict[tuple, list[dict]] = {}
    for payload in payloads:
        for r in payload["results"]:
            if r["speedups"]:
                runs.setdefault((r["op"], r["case"], r["pass_"], r["impl"]), []).append(r)
    lines = [
        f"| op | case | pass | fusedset ({len(payloads)} runs) | speedup, median (range) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for (op, case, pass_, impl), rows in runs.items():
        time = statistics.median(r["median_s"] for r in rows)
        ratios = []
        for baseline in rows[0]["speedups"]:
            values = [r["speedups"][baseline] for r in rows if baseline in r["speedups"]]
            spread = f" ({min(values):.2f}x to {max(values):.2f}x)" if len(values) > 1 else ""
            ratios.append(f"{statistics.median(values):.2f}x vs {baseline}{spread}")
        lines.append(
            f"| {op} | {case} | {pass_} | {impl} {time * 1e3:.3g} ms | {'; '.join(ratios)} |"
        )
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    size = parser.add_mutually_exclusive_group()
    size.add_argument(
        "--quick",
        action="store_const",
        const="quick",
        dest="mode",
        help="the README's run: every op and module, a few sizes (< 3 min on 2 cores)",
    )
    size.add_argument(
        "--smoke",
        action="store_const",
        const="smoke",
        dest="mode",
        help="tiny sizes, seconds: checks the suite itself (CI)",
    )
    parser.set_defaults(mode="full")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="ops or modules to run")
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    parser.add_argument(
        "--table",
        nargs="+",
        type=Path,
        metavar="RESULTS_JSON",
        help="print the README's Measured table from these runs' results.json and exit",
    )


def main_with(args: argparse.Namespace) -> int:
    if args.table:
        print(measured_table([json.loads(path.read_text()) for path in args.table]))
        return 0
    available = sorted(benchmark_modules())
    names = args.only or available
    unknown = sorted(set(names) - set(available))
    if unknown:
        print(f"fusedset bench: unknown benchmark {unknown}; have {available}", file=sys.stderr)
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print("fusedset bench: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    assert args.mode in MODES
    run(names, args.device, args.mode, args.out)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fusedset bench", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return main_with(parser.parse_args(argv))
