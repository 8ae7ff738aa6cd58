"""quality_fps against the released-style eager selection loop of FaceCoresetNet (normalize,
batched mat-vec, pow, min, gumbel-softmax, one-hot mat-mul gather), C = 512, k = 3, and against
k plain reads of x: the floor of the select form, which returns every step's distances. The
indices form reads x k - 1 times on the CPU: its last step reads only the rows that can win."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fusedset.bench.common import Case, Measurement, h100_roofline_s
from fusedset.ops.quality_fps import gumbel_noise

EXPECTED_SECONDS = {"smoke": 3, "quick": 40, "full": 300}
CHANNELS = 512
K = 3
GAMMA = 0.5
TARGET_N = 100_000
TARGET_SPEEDUP = 8.0


def released_style(x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The selection as FaceCoresetNet's training code computes it, written from the paper's
    description: every step a mat-vec over the normalized template, a full-N gumbel-softmax,
    and a one-hot mat-mul to gather the pick. The eval form is the same with scale 1e4 and
    tau 1e-10."""
    norms = x.norm(dim=-1)
    u = F.normalize(x, dim=-1)
    quality = norms.pow(GAMMA)
    y = F.one_hot(norms.argmax(dim=1), x.shape[1]).to(x.dtype)
    picks = [torch.bmm(y.unsqueeze(1), x)]
    d = None
    for _ in range(1, K):
        direction = torch.bmm(y.unsqueeze(1), u)
        dist = quality * (1 - torch.bmm(u, direction.transpose(1, 2)).squeeze(-1)) / 2
        d = dist if d is None else torch.minimum(d, dist)
        y = F.gumbel_softmax(d, tau=1.0, hard=True)
        picks.append(torch.bmm(y.unsqueeze(1), x))
    return torch.cat(picks, dim=1)


def _gamma(x: torch.Tensor) -> torch.Tensor:
    return torch.tensor(GAMMA, dtype=torch.float64, device=x.device)


def fused_indices(x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return torch.ops.fusedset.quality_fps.default(x, K, _gamma(x), None)


def fused_select(x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return torch.ops.fusedset.quality_fps_select.default(x, K, _gamma(x), 1.0, 1.0, noise, None)[0]


def k_reads(x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """k passes that only read x."""
    return torch.stack([x.sum() for _ in range(K)])


def _case(n: int) -> Case:
    floor = K * n * CHANNELS * 4
    return Case(
        op="quality_fps",
        label=f"N={n:.0e} C={CHANNELS} k={K}",
        size=n,
        make_inputs=lambda device: [
            (
                torch.randn(1, n, CHANNELS, device=device),
                gumbel_noise((1, K, n), torch.float32, device),
            )
            for _ in range(2 if n <= TARGET_N else 1)
        ],
        impls={
            "fusedset select": fused_select,
            "fusedset indices": fused_indices,
            "released eager": released_style,
            "k reads of x (floor)": k_reads,
        },
        # forward: k reads of x; backward: a read of x and a write of dx on top
        bytes_moved={"forward": floor, "forward+backward": floor + 2 * floor / K},
        backward=n <= TARGET_N,
        forward_only=("fusedset indices", "k reads of x (floor)"),
        repeats=5 if n > TARGET_N else 7,
    )


def cases(mode: str) -> list[Case]:
    sizes = {"smoke": [1_000], "quick": [100_000], "full": [1_000, 10_000, 100_000, 1_000_000]}
    return [_case(n) for n in sizes[mode]]


def summary(rows: list[Measurement]) -> list[str]:
    times = {(r.case, r.impl, r.pass_): r for r in rows}
    target_case = f"N={TARGET_N:.0e} C={CHANNELS} k={K}"
    lines = []
    fused = times.get((target_case, "fusedset select", "forward"))
    if fused is not None:
        ratio = times[(target_case, "released eager", "forward")].median_s / fused.median_s
        status = "met" if ratio >= TARGET_SPEEDUP else "MISSED"
        lines.append(
            f"target: select forward {ratio:.2f}x faster than the released eager loop at "
            f"{target_case} (goal >= {TARGET_SPEEDUP:.0f}x): {status}"
        )
        floor = times[(target_case, "k reads of x (floor)", "forward")].median_s
        lines.append(
            f"floor: the fused forward takes {fused.median_s / floor:.2f}x the time of k plain "
            f"reads of x ({fused.gb_per_s:.1f} GB/s)"
        )
    floor_bytes = K * TARGET_N * CHANNELS * 4
    lines.append(
        f"roofline: k reads of x at N={TARGET_N:.0e} are {floor_bytes / 1e6:.0f} MB; on an H100 "
        f"(3.35 TB/s) {h100_roofline_s(floor_bytes) * 1e3:.3f} ms (estimate, not measured)"
    )
    return lines
