"""``fusedset fuse`` under torchrun: the templates of one feature file shared among ranks.

``torchrun --nproc-per-node P -m fusedset fuse ...`` (or any launch that sets RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT) runs ``fuse_sharded`` on every rank. Each rank reads
the inputs (a memory-mapped .npy is read only where its templates are), fuses its share of the
templates (``shares``: balanced by frame count) and sends the descriptors to rank 0, which puts
them in template order and writes the one output file: the same bits as one process's run, each
template being fused by the same code with the same threads either way.

The ranks watch each other through the launcher's key-value store (the TCPStore at
MASTER_ADDR:MASTER_PORT), not through collectives, so that a rank busy with a long template
holds no other up. A thread on every rank (``Watch``) beats, adds the templates its rank has
fused to a shared count (rank 0's progress bar counts every rank's templates) and looks out for
a failure. The first rank that fails writes its one-line error to the store; every rank prints
that line and exits with code 2: the failing rank once every rank not known dead has seen it,
rank 0 (whose process may hold the store) last. A rank whose beats stop for ``rank_timeout``
seconds (killed, or hung) has failed. Under torchrun, whose agent stops every rank when one
dies, a rank stopped so says it and exits 2 at once. The one collective, the gather of the
descriptors, runs once every rank has finished its share, and rank 0 writes the output file
only after it: a failure anywhere leaves no output.
"""

from __future__ import annotations

import heapq
import math
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from fusedset.fuse import (
    FuseInputError,
    build_fuser,
    check_output,
    fuse_groups,
    input_paths,
    read_images,
    templates_of,
    write_descriptors,
)

BEAT_SECONDS = 0.25  # between a rank's beats, and between its looks at the others
GRACE_SECONDS = 10.0  # the longest a failing rank waits for the others to see its error
# The longest the ranks wait for each other to start (and for the gather of the descriptors,
# which begins once every rank has finished): start-up on a loaded machine can take minutes.
JOIN_SECONDS = 300


@dataclass(frozen=True)
class Launch:
    """Where this process stands in a torch.distributed launch."""

    rank: int
    world: int
    local_rank: int
    address: str
    port: int
    run_id: str

    @classmethod
    def from_env(cls) -> Launch | None:
        """This process's launch from torchrun's environment, or None when it runs alone (no
        WORLD_SIZE, or a world of one)."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return None
        missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise ValueError(
                f"WORLD_SIZE={world} but {', '.join(missing)} not set: launch with torchrun"
            )
        return cls(
            rank=int(os.environ["RANK"]),
            world=world,
            local_rank=int(os.environ.get("LOCAL_RANK", "0")),
            address=os.environ["MASTER_ADDR"],
            port=int(os.environ["MASTER_PORT"]),
            # Keys of one launch (and of one restart of it) never meet another's.
            run_id=f"{os.environ.get('TORCHELASTIC_RUN_ID', 'none')}/"
            f"{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}",
        )


def shares(frames: Sequence[int], world: int) -> list[np.ndarray]:
    """Template indices of each of ``world`` ranks, in increasing order: the templates by
    decreasing frame count (ties: the lower index), each to the rank with the fewest frames so
    far (ties: the lower rank). No rank ends with more frames than the least loaded one plus
    one template's."""
    loads = [(0, rank) for rank in range(world)]
    owner = np.empty(len(frames), dtype=np.int64)
    for i in sorted(range(len(frames)), key=lambda i: (-frames[i], i)):
        load, rank = heapq.heappop(loads)
        owner[i] = rank
        heapq.heappush(loads, (load + frames[i], rank))
    return [np.flatnonzero(owner == rank) for rank in range(world)]


class Watch:
    """This rank's side of the watch: its beats and fused count, and the failures of all."""

    def __init__(self, launch: Launch, rank_timeout: float) -> None:
        self.launch = launch
        self.rank_timeout = rank_timeout
        self._fused = 0
        self._published = 0
        self._lock = threading.Lock()
        self._bar = None
        self._failing = False
        self._stopped = threading.Event()
        # The thread and the main thread each keep their own connection.
        self._store = self._connect()
        self._thread = threading.Thread(target=self._watch, args=(self._connect(),), daemon=True)
        self._thread.start()

    def _connect(self) -> dist.Store:
        store = dist.TCPStore(
            self.launch.address,
            self.launch.port,
            is_master=False,
            timeout=timedelta(seconds=self.rank_timeout),
        )
        return dist.PrefixStore(f"fusedset-fuse/{self.launch.run_id}", store)

    def show_progress(self, templates: int, enabled: bool) -> None:
        from tqdm import tqdm

        self._bar = tqdm(total=templates, unit="template", disable=not enabled, dynamic_ncols=True)

    def fused(self) -> None:
        """One more template fused on this rank (main thread)."""
        self._fused += 1

    def _publish(self, store: dist.Store) -> None:
        """Adds this rank's templates fused since the last call to the shared count, and moves
        rank 0's bar to it."""
        with self._lock:
            fused = self._fused
            total = store.add("fused", fused - self._published)
            self._published = fused
        if self._bar is not None:
            self._bar.update(total - self._bar.n)

    def _watch(self, store: dist.Store) -> None:
        rank, world = self.launch.rank, self.launch.world
        beats = [-1] * world
        heard = [time.monotonic()] * world
        try:
            while not self._stopped.wait(BEAT_SECONDS):
                store.add(f"beat/{rank}", 1)
                self._publish(store)
                error = self._error(store)
                if error is not None and not self._failing:
                    self._leave(store, error)
                now = time.monotonic()
                for other in range(world):
                    beat = store.add(f"beat/{other}", 0)
                    if beat != beats[other]:
                        beats[other], heard[other] = beat, now
                    elif other != rank and now - heard[other] > self.rank_timeout:
                        store.set(f"dead/{other}", "")
                        self.fail(
                            f"rank {other}: no sign of life for {self.rank_timeout:g} s, "
                            f"killed or hung (seen by rank {rank})",
                            store,
                        )
        except Exception as exc:  # the store is gone: the launcher or rank 0's host is
            self._leave(None, f"rank {rank}: lost the launcher's store ({exc})")

    @staticmethod
    def _error(store: dist.Store) -> str | None:
        return store.get("error").decode() if store.check(["error"]) else None

    def _leave(self, store: dist.Store | None, error: str, wait: bool = True) -> None:
        """Print the first failure and exit 2, letting the others know it was seen. The failing
        rank waits until every rank not known dead has seen it, and rank 0 (whose process may
        hold the store) until every other such rank has gone, at most GRACE_SECONDS each."""
        bar, self._bar = self._bar, None
        if bar is not None:  # its last state, above the error
            bar.close()
        # One write, so that the lines of ranks sharing a terminal or a pipe do not interleave.
        sys.stderr.flush()
        os.write(sys.stderr.fileno(), f"fusedset fuse: {error}\n".encode())
        if store is not None:
            try:
                store.add(f"seen/{self.launch.rank}", 1)
                if wait and self._failing:
                    self._await(store, "seen")
                if self.launch.rank != 0:
                    store.add(f"gone/{self.launch.rank}", 1)
                elif wait:
                    self._await(store, "gone")
            except Exception:  # the store went first; nobody is left to tell
                pass
        # No interpreter exit: a process group's teardown with its peers gone can abort.
        os._exit(2)

    def _await(self, store: dist.Store, key: str) -> None:
        """Until every other rank not known dead has set ``key``, or GRACE_SECONDS."""
        deadline = time.monotonic() + GRACE_SECONDS
        others = [r for r in range(self.launch.world) if r != self.launch.rank]
        while time.monotonic() < deadline:
            if all(store.check([f"{key}/{r}"]) or store.check([f"dead/{r}"]) for r in others):
                return
            time.sleep(BEAT_SECONDS / 5)

    def fail(self, message: str, store: dist.Store | None = None) -> None:
        """A failure seen by this rank (``message`` starts with the rank it is about): the first
        failure of any rank is printed on every rank, and each exits with code 2."""
        self._failing = True
        store = store or self._store
        try:
            message = store.compare_set("error", "", message).decode()
        except Exception:  # the store is gone: this rank can only speak for itself
            store = None
        self._leave(store, message)

    def terminated(self, signum: int, frame: object) -> None:
        """SIGTERM: the launcher stops this rank because another one failed, and every other
        rank with it: no waiting for them."""
        try:
            error = self._error(self._store)
        except Exception:  # the store is gone with the launcher
            error = None
        error = error or f"rank {self.launch.rank}: stopped by the launcher (another rank failed)"
        self._leave(self._store, error, wait=False)

    def arrive(self, key: str, count: int, timeout: float = math.inf) -> None:
        """Waits until ``count`` ranks have called ``arrive(key)``, or ``timeout`` seconds (the
        watch thread, while it runs, ends the process if a rank fails meanwhile). Every template
        fused before counts on arrival."""
        self._publish(self._store)
        self._store.add(key, 1)
        deadline = time.monotonic() + timeout
        while self._store.add(key, 0) < count and time.monotonic() < deadline:
            time.sleep(BEAT_SECONDS / 5)

    def leave(self) -> None:
        """The end of a run that succeeded. Rank 0, whose process may hold the store, leaves
        last (or once the others have had rank_timeout seconds: the output is written)."""
        self._stopped.set()
        self._thread.join()
        if self._bar is not None:
            self._publish(self._store)
            self._bar.close()
        if self.launch.rank == 0:
            self.arrive("left", self.launch.world, self.rank_timeout)
            dist.destroy_process_group()
        else:
            dist.destroy_process_group()
            self._store.add("left", 1)


def fuse_sharded(
    launch: Launch,
    features: Path,
    templates: Path | None,
    style: Path | None,
    method: str,
    checkpoint: str | None,
    chunk_size: int | None,
    out: Path,
    device: str,
    progress: bool,
    rank_timeout: float,
) -> tuple[int, int, Path] | None:
    """This rank's part of ``fusedset fuse``; rank 0 -> (templates, width, path) written, the
    others None. ValueError when the rank cannot join the others; once joined, any failure ends
    the process with exit code 2 (see the module)."""
    target = torch.device("cpu")
    if device == "cuda":
        target = torch.device("cuda", launch.local_rank)
        torch.cuda.set_device(target)
    try:
        dist.init_process_group(
            "nccl" if target.type == "cuda" else "gloo",
            timeout=timedelta(seconds=max(rank_timeout, JOIN_SECONDS)),
        )
    except RuntimeError as exc:  # torch.distributed.DistError and its kind
        raise ValueError(
            f"rank {launch.rank}: could not join the ranks at {launch.address}:{launch.port} "
            f"({str(exc).splitlines()[0]})"
        ) from exc
    watch = Watch(launch, rank_timeout)
    signal.signal(signal.SIGTERM, watch.terminated)
    try:
        check_output(out, input_paths(features, templates, style, checkpoint))
        images = read_images(features, templates, style)
        fuser = build_fuser(images, method, checkpoint, chunk_size, target)
        groups = list(templates_of(images))
        if launch.rank == 0:
            watch.show_progress(len(groups), progress)
        mine = shares([len(rows) for _, rows in groups], launch.world)[launch.rank]
        result = fuse_groups(images, fuser, [groups[i] for i in mine], chunk_size, target,
                             watch.fused)  # fmt: skip
    except ValueError as exc:  # a FuseInputError, or --chunk for a method that does not stream
        watch.fail(f"rank {launch.rank}: {exc}")
    except BaseException as exc:
        traceback.print_exc()
        watch.fail(f"rank {launch.rank}: {type(exc).__name__}: {exc}")
    watch.arrive("done", launch.world)
    parts = [None] * launch.world if launch.rank == 0 else None
    dist.gather_object(result, parts, dst=0)
    written = None
    if launch.rank == 0:
        ids = np.concatenate([p[0] for p in parts])
        order = np.argsort(ids, kind="stable")
        descriptors = np.concatenate([p[1] for p in parts])[order]
        try:
            path = write_descriptors(out, ids[order], descriptors)
        except FuseInputError as exc:
            watch.fail(f"rank 0: {exc}")
        written = (len(ids), descriptors.shape[1], path)
    watch.arrive("written", launch.world)
    watch.leave()
    return written
