"""fusedset.distributed.fuse: one probe whose frames are split over 2 gloo processes, against one
process fusing them all, for FaceCoresetNet (the whole module) and CAFace (a "paper" stream in
chunks of 256, the released memory mode's), released sizes, fp32, eval, no_grad; N = 2^20 frames
in the quick run. Each rank uses one thread and one core, the single process both cores (as
torchrun and a plain run start them): on one machine the split gains nothing, the ratio shows
what it costs. Each rank also counts the bytes it hands to collectives per probe.

Measured outside the suite's process (`python -m fusedset.bench.distributed ranks|alone METHOD
N REPEATS`): the ranks are processes of their own. The ranks' time of a call runs from a
barrier to the next barrier after it (the slowest rank's). CPU only (gloo).
"""

from __future__ import annotations

import os
import socket
import statistics
import sys
import time
from collections.abc import Callable

import torch

from fusedset.bench.common import Case, Measurement, fresh_process
from fusedset.bench.facecoresetnet import unit_template

EXPECTED_SECONDS = {"smoke": 20, "quick": 90, "full": 300}
WORLD = 2
CHUNK = 256
METHODS = ("facecoresetnet", "caface")
SIZES = {"smoke": (4096,), "quick": (2**20,), "full": (2**16, 2**20)}
REPEATS = {"smoke": 1, "quick": 3, "full": 5}
RANKS, ALONE = f"fusedset, {WORLD} processes", "fusedset, 1 process"
# Bytes each rank handed to collectives per probe, by (method, N): filled by measurements().
_SENT: dict[tuple[str, int], float] = {}


def _model(method: str) -> torch.nn.Module:
    from fusedset.nn import CAFace, FaceCoresetNet

    torch.manual_seed(0)
    return (CAFace() if method == "caface" else FaceCoresetNet(512)).eval()


def _shard(method: str, n: int, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Shard ``index`` of WORLD equal shards of a probe of n frames, drawn from its own seed: a
    rank builds its own shard only, the single process every shard."""
    size = n // WORLD
    if method == "caface":
        generator = torch.Generator().manual_seed(index)
        features = torch.randn(1, size, 512, generator=generator) * 20
        return features, torch.randn(1, size, 384, 2, generator=generator)
    return unit_template(size, index)


def _median_seconds(call: Callable, repeats: int, sync: Callable = lambda: None) -> float:
    """The median of ``repeats`` timed calls, after one untimed call."""
    times = []
    for _ in range(repeats + 1):
        sync()
        began = time.perf_counter()
        with torch.no_grad():
            call()
        sync()
        times.append(time.perf_counter() - began)
    return statistics.median(times[1:])


def _count_sent(counter: list[float]) -> None:
    """From now on, adds the bytes of every tensor this process hands to an all_reduce or an
    all_gather (the collectives of fusedset.distributed) to counter[0]."""
    import torch.distributed as dist

    for name in ("all_reduce", "all_gather"):
        collective = getattr(dist, name)

        def counted(*args, _collective=collective, _name=name, **kwargs):
            sent = args[0] if _name == "all_reduce" else args[1]
            counter[0] += sent.numel() * sent.element_size()
            return _collective(*args, **kwargs)

        setattr(dist, name, counted)


def _rank(rank: int, method: str, n: int, repeats: int, port: int) -> None:
    from datetime import timedelta

    import torch.distributed as dist

    from fusedset import distributed

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD, timeout=timedelta(minutes=10))  # fmt: skip
    model, shard = _model(method), _shard(method, n, rank)
    options = {"normalization": "paper", "chunk_size": CHUNK} if method == "caface" else {}
    sent = [0.0]
    _count_sent(sent)
    seconds = _median_seconds(lambda: distributed.fuse(model, *shard, **options), repeats,
                              dist.barrier)  # fmt: skip
    if rank == 0:
        print(seconds, sent[0] / (repeats + 1), flush=True)
    dist.barrier()
    # Out at once: a gloo group torn down at interpreter exit after its peer left can abort.
    os._exit(0)


def _ranks(method: str, n: int, repeats: int) -> None:
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank, args=(method, n, repeats, port), nprocs=WORLD)


def _alone(method: str, n: int, repeats: int) -> None:
    torch.set_num_threads(WORLD)
    model = _model(method)
    inputs = None
    for index in range(WORLD):
        shard = _shard(method, n, index)
        if inputs is None:  # the whole probe, filled a shard at a time
            inputs = [x.new_empty(x.shape[0], n, *x.shape[2:]) for x in shard]
        for whole, part in zip(inputs, shard, strict=True):
            whole[:, index * part.shape[1] : (index + 1) * part.shape[1]] = part
        del shard
    if method == "caface":
        call = lambda: model.stream(1, "paper", CHUNK).update(*inputs).result()  # noqa: E731
    else:
        call = lambda: model(*inputs)  # noqa: E731
    print(_median_seconds(call, repeats))


def cases(mode: str) -> list[Case]:
    return []  # see measurements()


def measurements(mode: str, device: str) -> list[Measurement]:
    """Both methods at each N of ``mode``: the ranks, then the single process, each in fresh
    processes."""
    if device != "cpu":
        return []
    rows = []
    for method in METHODS:
        for n in SIZES[mode]:
            seconds, sent = fresh_process(__name__, "ranks", method, n, REPEATS[mode])
            _SENT[(method, n)] = sent
            (alone,) = fresh_process(__name__, "alone", method, n, REPEATS[mode])
            for impl, median in ((RANKS, seconds), (ALONE, alone)):
                rows.append(
                    Measurement(
                        op="distributed",
                        case=f"{method} N={n}",
                        size=n,
                        impl=impl,
                        pass_="forward",
                        median_s=median,
                        peak_extra_bytes=None,
                        series=method,
                    )
                )
    return rows


def summary(rows: list[Measurement]) -> list[str]:
    if not rows:
        return ["runs on CPU only (gloo); nothing measured on this device"]
    lines = []
    for (method, n), sent in _SENT.items():
        lines.append(
            f"{method} at N = {n:,}: each rank handed {sent / 1e3:.1f} KB a probe to collectives "
            f"(the frames: {n // WORLD * 512 * 4 / 1e6:,.0f} MB a rank)"
        )
    return lines


if __name__ == "__main__":
    command, method, n, repeats = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    (_ranks if command == "ranks" else _alone)(method, n, repeats)
