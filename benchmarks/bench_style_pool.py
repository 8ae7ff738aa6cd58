"""style_pool against eager PyTorch: the mean + std pair CAFace's backbone calls, and
torch.std_mean. Forward and forward+backward at IResNet-101 block shapes.

    python benchmarks/bench_style_pool.py [--quick] [--device cpu|cuda] [--out DIR]
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

import fusedset  # noqa: F401  (registers torch.ops.fusedset)
from fusedset import reference

TARGET_CASE = "256x128x28x28 contiguous"
TARGET_SPEEDUP = 6.0


def _std_mean(x: torch.Tensor) -> torch.Tensor:
    std, mean = torch.std_mean(x, dim=(2, 3))
    return torch.stack([mean, std], dim=-1)


IMPLS = {
    "fusedset": torch.ops.fusedset.style_pool.default,
    "eager mean+std": reference.style_pool,
    "torch.std_mean": _std_mean,
}


def cases(quick: bool) -> list[tuple[tuple[int, int, int, int], str]]:
    if quick:
        return [((256, 128, 28, 28), "contiguous"), ((256, 128, 28, 28), "channels_last")]
    shapes = [(256, 64, 56, 56), (256, 128, 28, 28), (256, 256, 14, 14), (256, 512, 7, 7)]
    return [(s, layout) for s in shapes for layout in ("contiguous", "channels_last")]


def run(device: str, quick: bool) -> list[Measurement]:
    rows = []
    for shape, layout in cases(quick):
        fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
        inputs = [(torch.randn(shape, device=device).to(memory_format=fmt),) for _ in range(2)]
        name = "x".join(map(str, shape)) + " " + layout
        x_bytes = inputs[0][0].numel() * inputs[0][0].element_size()
        for impl, fn in IMPLS.items():
            rows.append(
                Measurement(
                    "style_pool", name, impl, "forward", time_fn(fn, inputs, device), x_bytes
                )
            )
        grad_inputs = [(x.requires_grad_(),) for (x,) in inputs]
        for impl, fn in IMPLS.items():
            seconds = time_fn(forward_backward(fn), grad_inputs, device, repeats=5)
            # Forward reads x; backward reads x and writes dx.
            rows.append(
                Measurement("style_pool", name, impl, "forward+backward", seconds, 3 * x_bytes)
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the target case only")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("style_pool benchmark: no CUDA device, skipped")
        return 0

    rows = run(args.device, args.quick)
    baselines = ["eager mean+std", "torch.std_mean"]
    print(f"\nstyle_pool, {args.device}, fp32 (speedups = baseline time / impl time, same run)")
    print(format_table(rows, baselines))
    target = speedups(rows, "fusedset", "eager mean+std")[(TARGET_CASE, "forward")]
    x_bytes = 256 * 128 * 28 * 28 * 4
    status = "met" if target >= TARGET_SPEEDUP else "MISSED"
    print(
        f"target: forward {target:.1f}x faster than eager mean+std at {TARGET_CASE} "
        f"(goal >= {TARGET_SPEEDUP:.0f}x): {status}"
    )
    print(
        f"roofline: one read of x is {x_bytes / 1e6:.0f} MB; on an H100 (3.35 TB/s) that is "
        f"{h100_roofline_ms(x_bytes):.3f} ms forward, {h100_roofline_ms(3 * x_bytes):.3f} ms "
        f"forward+backward (estimate, not a measurement)"
    )
    path = args.out / "style_pool.json"
    write_json(
        path, "style_pool", args.device, rows, {"target_speedup": target, "goal": TARGET_SPEEDUP}
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
