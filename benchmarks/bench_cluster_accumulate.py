"""cluster_accumulate against the eager composition (matmul, softmax, matmul, sum) at CAFace's
shape: M = 4 centers, D = 128, C = 512, one probe of N images. Forward and forward+backward.

    python benchmarks/bench_cluster_accumulate.py [--quick] [--device cpu|cuda] [--out DIR]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import (
    Measurement,
    format_table,
    forward_backward,
    h100_roofline_ms,
    speedups,
    time_fn,
    write_json,
)

from fusedset import reference
from fusedset.ops import cluster_accumulate

M, D, C = 4, 128, 512
TARGET_SPEEDUP = 3.0
TARGET_MIN_N = 4096

IMPLS = {"fusedset": cluster_accumulate, "eager": reference.cluster_accumulate}


def image_bytes(pass_: str, element_size: int = 4) -> int:
    """The floor per image: forward reads a key and a value row; backward reads them again and
    writes their gradients."""
    row = (D + C) * element_size
    return row if pass_ == "forward" else 3 * row


def sizes(quick: bool) -> list[int]:
    return [4096, 65536] if quick else [256, 4096, 65536, 1048576]


def run(device: str, quick: bool) -> list[Measurement]:
    rows = []
    for n in sizes(quick):
        # Two input sets rotate so no call finds its inputs in cache; one at N = 2^20 (2.7 GB).
        copies = 1 if n > 100_000 else 2
        repeats = 3 if n > 100_000 else 9
        inputs = [
            (
                torch.randn(1, n, D, device=device),
                torch.randn(1, M, D, device=device),
                torch.randn(1, n, C, device=device),
            )
            for _ in range(copies)
        ]
        case = f"N={n}"
        for pass_ in ("forward", "forward+backward"):
            if pass_ == "forward+backward":
                inputs = [tuple(t.requires_grad_() for t in args) for args in inputs]
            for impl, fn in IMPLS.items():
                timed = fn if pass_ == "forward" else forward_backward(fn)
                seconds = time_fn(timed, inputs, device, repeats=repeats)
                rows.append(
                    Measurement(
                        "cluster_accumulate", case, impl, pass_, seconds, n * image_bytes(pass_)
                    )
                )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="N = 4096 and 65536 only")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("cluster_accumulate benchmark: no CUDA device, skipped")
        return 0

    rows = run(args.device, args.quick)
    print(
        f"\ncluster_accumulate, {args.device}, fp32, M={M} D={D} C={C} "
        f"(speedups = eager time / impl time, same run)"
    )
    print(format_table(rows, ["eager"]))
    ratios = speedups(rows, "fusedset", "eager")
    targets = {f"{case} {pass_}": r for (case, pass_), r in ratios.items()}
    gated = [r for (case, _), r in ratios.items() if int(case[2:]) >= TARGET_MIN_N]
    status = "met" if min(gated) >= TARGET_SPEEDUP else "MISSED"
    print(
        f"target: >= {TARGET_SPEEDUP:.0f}x faster than eager for N >= {TARGET_MIN_N}, forward "
        f"and forward+backward: lowest {min(gated):.2f}x, {status}"
    )
    for pass_ in ("forward", "forward+backward"):
        for element_size, dtype in ((4, "fp32"), (2, "fp16/bf16")):
            per_image = image_bytes(pass_, element_size)
            print(
                f"roofline {pass_} {dtype}: {per_image} bytes per image; on an H100 (3.35 TB/s) "
                f"N = 2^20 takes {h100_roofline_ms(per_image * 2**20):.3f} ms "
                f"(estimate, not a measurement)"
            )
    path = args.out / "cluster_accumulate.json"
    write_json(
        path,
        "cluster_accumulate",
        args.device,
        rows,
        {"speedups": targets, "goal": TARGET_SPEEDUP, "goal_min_n": TARGET_MIN_N},
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
