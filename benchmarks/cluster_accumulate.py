"""cluster_accumulate against the eager composition (matmul, softmax, matmul, sum) at CAFace's
shape: M = 4 centers, D = 128, C = 512, one probe of N images. Forward and forward+backward."""

from __future__ import annotations

import torch

from fusedset import reference
from fusedset.bench.common import Case, Measurement, h100_roofline_s
from fusedset.ops import cluster_accumulate

EXPECTED_SECONDS = {"smoke": 3, "quick": 30, "full": 240}
M, D, C = 4, 128, 512
TARGET_SPEEDUP = 3.0
TARGET_MIN_N = 4096


def image_bytes(pass_: str, element_size: int = 4) -> int:
    """The floor per image: forward reads a key and a value row; backward reads them again and
    writes their gradients."""
    row = (D + C) * element_size
    return row if pass_ == "forward" else 3 * row


def _case(n: int) -> Case:
    # Two input sets rotate so that no call finds its inputs in cache; one at N = 2^20 (2.7 GB).
    copies = 1 if n > 100_000 else 2
    return Case(
        op="cluster_accumulate",
        label=f"N={n}",
        size=n,
        make_inputs=lambda device: [
            (
                torch.randn(1, n, D, device=device),
                torch.randn(1, M, D, device=device),
                torch.randn(1, n, C, device=device),
            )
            for _ in range(copies)
        ],
        impls={"fusedset": cluster_accumulate, "eager": reference.cluster_accumulate},
        bytes_moved={p: n * image_bytes(p) for p in ("forward", "forward+backward")},
        repeats=3 if n > 100_000 else 7,
    )


def cases(mode: str) -> list[Case]:
    sizes = {"smoke": [4096], "quick": [65536], "full": [256, 4096, 65536, 1048576]}
    return [_case(n) for n in sizes[mode]]


def summary(rows: list[Measurement]) -> list[str]:
    times = {(r.case, r.pass_, r.impl): r.median_s for r in rows}
    ratios = {
        (r.size, r.pass_): times[(r.case, r.pass_, "eager")] / r.median_s
        for r in rows
        if r.impl == "fusedset" and r.size >= TARGET_MIN_N
    }
    lines = []
    if ratios:
        lowest = min(ratios.values())
        status = "met" if lowest >= TARGET_SPEEDUP else "MISSED"
        lines.append(
            f"target: >= {TARGET_SPEEDUP:.0f}x faster than eager for N >= {TARGET_MIN_N}, forward "
            f"and forward+backward: lowest {lowest:.2f}x, {status}"
        )
    for pass_ in ("forward", "forward+backward"):
        for element_size, dtype in ((4, "fp32"), (2, "fp16/bf16")):
            per_image = image_bytes(pass_, element_size)
            lines.append(
                f"roofline {pass_} {dtype}: {per_image} bytes per image; on an H100 (3.35 TB/s) "
                f"N = 2^20 takes {h100_roofline_s(per_image * 2**20) * 1e3:.3f} ms "
                f"(estimate, not measured)"
            )
    return lines
