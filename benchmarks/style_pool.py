"""style_pool against eager PyTorch: the mean + std pair CAFace's backbone calls, and
torch.std_mean, at IResNet-101 block shapes, forward and forward+backward."""

from __future__ import annotations

import torch

from fusedset import reference
from fusedset.bench.common import Case, Measurement, h100_roofline_s

EXPECTED_SECONDS = {"smoke": 3, "quick": 40, "full": 240}
TARGET_CASE = "256x128x28x28 contiguous"
TARGET_SPEEDUP = 6.0


def _std_mean(x: torch.Tensor) -> torch.Tensor:
    std, mean = torch.std_mean(x, dim=(2, 3))
    return torch.stack([mean, std], dim=-1)


def _fusedset(x: torch.Tensor) -> torch.Tensor:
    out, _ = torch.ops.fusedset.style_pool.default(x)
    return out


def _case(shape: tuple[int, int, int, int], layout: str) -> Case:
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x_bytes = 4 * shape[0] * shape[1] * shape[2] * shape[3]
    return Case(
        op="style_pool",
        label="x".join(map(str, shape)) + " " + layout,
        size=shape[0] * shape[1] * shape[2] * shape[3],
        make_inputs=lambda device: [
            (torch.randn(shape, device=device).to(memory_format=fmt),) for _ in range(2)
        ],
        impls={
            "fusedset": _fusedset,
            "eager mean+std": reference.style_pool,
            "torch.std_mean": _std_mean,
        },
        # forward reads x; backward reads x again and writes dx
        bytes_moved={"forward": x_bytes, "forward+backward": 3 * x_bytes},
        series=layout,
    )


def cases(mode: str) -> list[Case]:
    if mode == "smoke":
        return [_case((8, 128, 28, 28), "contiguous"), _case((8, 128, 28, 28), "channels_last")]
    if mode == "quick":
        return [_case((256, 128, 28, 28), "contiguous"), _case((256, 128, 28, 28), "channels_last")]
    shapes = [(256, 64, 56, 56), (256, 128, 28, 28), (256, 256, 14, 14), (256, 512, 7, 7)]
    return [_case(s, layout) for s in shapes for layout in ("contiguous", "channels_last")]


def summary(rows: list[Measurement]) -> list[str]:
    times = {(r.case, r.pass_, r.impl): r.median_s for r in rows}
    lines = []
    ours = times.get((TARGET_CASE, "forward", "fusedset"))
    if ours is not None:
        ratio = times[(TARGET_CASE, "forward", "eager mean+std")] / ours
        status = "met" if ratio >= TARGET_SPEEDUP else "MISSED"
        lines.append(
            f"target: forward {ratio:.2f}x faster than eager mean+std at {TARGET_CASE} "
            f"(goal >= {TARGET_SPEEDUP:.0f}x): {status}"
        )
    x_bytes = 4 * 256 * 128 * 28 * 28
    lines.append(
        f"roofline: one read of a (256, 128, 28, 28) fp32 x is {x_bytes / 1e6:.0f} MB; on an H100 "
        f"(3.35 TB/s) {h100_roofline_s(x_bytes) * 1e3:.3f} ms forward, "
        f"{h100_roofline_s(3 * x_bytes) * 1e3:.3f} ms forward+backward (estimate, not measured)"
    )
    return lines
