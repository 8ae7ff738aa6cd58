"""sinusoid_attention_pool against its eager form (fusedset.reference: the (N, D) codes, their
LayerNorm and the (N, R) scores in memory), at FaceCoresetNet's shapes: C = D = 512, R = 24 (3
core queries x 8 heads), rows scaled by their norms, which are the positions (times 2 pi).

The op is compute-bound on a CPU: per row, 2 R (2 C + D) flops in three products (row scores,
code scores, weighted sum) and D/2 sines and cosines, against one read of the row. The summary
states the rate it reaches, and the forward+backward target at N = 1e4 (issue 13: the C++
backward at least 2x eager there)."""

from __future__ import annotations

import math

import torch

from fusedset.bench.common import Case, Measurement, h100_roofline_s
from fusedset.ops import sinusoid_attention_pool
from fusedset.reference import sinusoid_attention_pool as eager_pool

EXPECTED_SECONDS = {"smoke": 3, "quick": 25, "full": 240}
WIDTH = 512
QUERIES = 24
TARGET_N = 100_000
BACKWARD_TARGET_N = 10_000
BACKWARD_TARGET_SPEEDUP = 2.0
FAST, EAGER = "fusedset", "eager (reference)"


def _inputs(n: int, seed: int, device: str) -> tuple:
    generator = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.normalize(torch.randn(1, n, WIDTH, generator=generator), dim=-1)
    queries = torch.randn(1, QUERIES, WIDTH, generator=generator)
    code_queries = torch.randn(1, QUERIES, WIDTH, generator=generator) / math.sqrt(WIDTH)
    norms = torch.empty(1, n).uniform_(5, 40, generator=generator)
    return tuple(t.to(device) for t in (x, queries, code_queries, norms))


def fused(x, queries, code_queries, norms):
    return sinusoid_attention_pool(
        x, queries, code_queries, norms, row_scale=norms, position_scale=2 * math.pi
    )


def eager(x, queries, code_queries, norms):
    return eager_pool(x, queries, code_queries, norms, norms, None, 2 * math.pi)


def flops(n: int) -> float:
    return 2 * n * QUERIES * (2 * WIDTH + WIDTH)


def _label(n: int) -> str:
    return f"N={n:.0e} C={WIDTH} R={QUERIES}"


def _case(n: int, backward: bool, with_eager: bool = True) -> Case:
    impls = {FAST: fused, EAGER: eager} if with_eager else {FAST: fused}
    return Case(
        op="sinusoid_attention_pool",
        label=_label(n),
        size=n,
        make_inputs=lambda device: [_inputs(n, seed, device) for seed in range(2)],
        impls=impls,
        # forward: one read of the rows; backward: a second read and the row gradients
        bytes_moved={"forward": 4 * n * WIDTH, "forward+backward": 3 * 4 * n * WIDTH},
        backward=backward,
        repeats=3 if n >= TARGET_N else 7,
    )


def cases(mode: str) -> list[Case]:
    if mode == "smoke":
        return [_case(1_000, backward=True)]
    if mode == "quick":
        return [_case(10_000, backward=True), _case(TARGET_N, backward=False)]
    return [
        _case(1_000, backward=True),
        _case(10_000, backward=True),
        _case(TARGET_N, backward=True),
        _case(1_000_000, backward=False, with_eager=False),
    ]


def summary(rows: list[Measurement]) -> list[str]:
    lines = []
    times = {(r.case, r.impl, r.pass_): r.median_s for r in rows}
    target = _label(BACKWARD_TARGET_N)
    fused_s = times.get((target, FAST, "forward+backward"))
    eager_s = times.get((target, EAGER, "forward+backward"))
    if fused_s is not None and eager_s is not None:
        ratio = eager_s / fused_s
        status = "met" if ratio >= BACKWARD_TARGET_SPEEDUP else "MISSED"
        lines.append(
            f"target: forward+backward {ratio:.2f}x faster than eager at {target} "
            f"(goal >= {BACKWARD_TARGET_SPEEDUP:.0f}x): {status}"
        )
    for row in rows:
        if row.impl == FAST and row.pass_ == "forward" and row.size >= TARGET_N:
            lines.append(
                f"compute: {row.case} is {flops(row.size) / 1e9:.1f} GFLOP of products in the "
                f"plain form (every channel pair a sine, a cosine and two product terms); "
                f"fusedset's equivalent rate is {flops(row.size) / row.median_s / 1e9:.0f} "
                f"GFLOP/s over {torch.get_num_threads()} threads (small-angle pairs summed as "
                "power series; sines and cosines included in the time)"
            )
    x_bytes = 4 * TARGET_N * WIDTH
    lines.append(
        f"roofline: one read of the N = {TARGET_N:,} rows is {x_bytes / 1e6:.0f} MB; on an H100 "
        f"(3.35 TB/s) {h100_roofline_s(x_bytes) * 1e3:.3f} ms (estimate, not measured)"
    )
    return lines
