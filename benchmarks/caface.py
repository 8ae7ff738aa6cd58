"""CAFace: fusedset.nn.CAFace against the released-style eager module (the reference), fp32,
inference. Streaming: a probe of N frames fused in chunks of 256 (the released memory loop
aggregates after every chunk; fusedset batches the chunks of an update). One call: the whole set
at once, quadratic in N through the Cluster Network's attention. The stream's peak extra memory
is measured in a fresh process per N (`python -m fusedset.bench.caface N`), the frames arriving
an update at a time as from a file."""

from __future__ import annotations

import sys

import torch

from fusedset.bench.common import Case, Measurement, fresh_process_peak_mib, peak_extra_memory
from fusedset.nn import CAFace
from fusedset.reference import CAFaceReference

EXPECTED_SECONDS = {"smoke": 4, "quick": 45, "full": 420}
CHUNK = 256
UPDATE = 16384  # frames per stream update: bounds the memory, whatever N
TARGET_N = 65536
TARGET_SPEEDUP = 1.5
MEMORY_N = (UPDATE, 1_000_000)


def _models() -> tuple[CAFace, CAFaceReference]:
    torch.manual_seed(0)
    fused = CAFace().eval()
    reference = CAFaceReference(fused.config).eval()
    reference.load_state_dict(fused.state_dict())
    return fused, reference


def _inputs(n: int):
    def make(device: str) -> list[tuple]:
        features = torch.randn(1, n, 512, device=device) * 20
        return [(features, torch.randn(1, n, 384, 2, device=device))]

    return make


def cases(mode: str) -> list[Case]:
    fused, reference = _models()

    @torch.no_grad()
    def stream(features, stats):
        s = fused.stream(1, chunk_size=CHUNK)
        for start in range(0, features.shape[1], UPDATE):
            s.update(features[:, start : start + UPDATE], stats[:, start : start + UPDATE])
        return s.result()

    @torch.no_grad()
    def memory_loop(features, stats):
        sizes = [CHUNK] * (features.shape[1] // CHUNK)
        return reference.forward_chunks(features, stats, sizes).chunk_aggregated[-1]

    @torch.no_grad()
    def one_call(features, stats):
        return fused(features, stats)

    @torch.no_grad()
    def released_one_call(features, stats):
        return reference(features, stats).aggregated

    stream_sizes = {"smoke": [1024], "quick": [TARGET_N], "full": [1024, 4096, 16384, 65536]}[mode]
    call_sizes = {"smoke": [256], "quick": [1024], "full": [256, 1024, 4096]}[mode]
    out = [
        Case(
            op="caface",
            label=f"N={n} in chunks of {CHUNK}",
            size=n,
            make_inputs=_inputs(n),
            impls={"fusedset stream": stream, "released memory loop": memory_loop},
            backward=False,
            repeats=3,
            series="streaming",
        )
        for n in stream_sizes
    ]
    out += [
        Case(
            op="caface",
            label=f"N={n} one call",
            size=n,
            make_inputs=_inputs(n),
            impls={"fusedset one call": one_call, "released one call": released_one_call},
            backward=False,
            repeats=3,
            series="one call",
        )
        for n in call_sizes
    ]
    return out


def summary(rows: list[Measurement]) -> list[str]:
    lines = []
    by_key = {(r.case, r.impl): r for r in rows}
    target = f"N={TARGET_N} in chunks of {CHUNK}"
    if (target, "fusedset stream") in by_key:
        ratio = (
            by_key[(target, "released memory loop")].median_s
            / by_key[(target, "fusedset stream")].median_s
        )
        status = "met" if ratio >= TARGET_SPEEDUP else "MISSED"
        lines.append(
            f"target: streaming N={TARGET_N} {ratio:.2f}x faster than the released memory loop "
            f"(goal >= {TARGET_SPEEDUP}x): {status}"
        )
    for r in rows:
        if r.impl in ("fusedset stream", "released one call"):
            lines.append(f"{r.impl} at N={r.size}: {r.median_s / r.size * 1e6:.1f} us per frame")
    if (target, "fusedset stream") in by_key:
        peaks = {n: fresh_process_peak_mib(__name__, n) for n in MEMORY_N}
        lines.append(
            f"fusedset stream, peak extra memory in a fresh process (updates of {UPDATE} frames, "
            f"chunks of {CHUNK}): "
            + ", ".join(f"N = {n:,}: {mib:.1f} MiB" for n, mib in peaks.items())
        )
    return lines


def _stream_peak_mib(n: int) -> float:
    """Peak extra memory of fusing one probe of n frames with fusedset's stream, the frames
    arriving UPDATE at a time into one reused buffer (as read from a file)."""
    fused, _ = _models()
    features = torch.empty(1, UPDATE, 512)
    stats = torch.empty(1, UPDATE, 384, 2)
    generator = torch.Generator().manual_seed(0)

    @torch.no_grad()
    def fuse():
        stream = fused.stream(1, chunk_size=CHUNK)
        for start in range(0, n, UPDATE):
            size = min(UPDATE, n - start)
            features.normal_(generator=generator).mul_(20)
            stats.normal_(generator=generator)
            stream.update(features[:, :size], stats[:, :size])
        return stream.result()

    return peak_extra_memory(fuse, "cpu") / 2**20


if __name__ == "__main__":
    print(_stream_peak_mib(int(sys.argv[1])))
