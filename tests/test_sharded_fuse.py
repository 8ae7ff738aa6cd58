"""``fusedset fuse`` over several ranks (torchrun, or its environment set by hand): the output
is the one a single process writes, and a failure on any rank ends every rank with one line and
exit code 2, leaving no output."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest

from fusedset.cli import main
from fusedset.sharded_fuse import shares

from .checkpoints import random_modules, write_checkpoint
from .helpers import free_port, torch_threads

WORLD = 3
# Seconds for a whole launch: three processes start torch on two cores.
LAUNCH_TIMEOUT = 180
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """g.npz: 40 templates of 1 to 400 frames, their images not adjacent; two.npy with
    two_tid.npy: 2 templates; many.npz: 60000 templates of 4 frames (a run that
    lasts long enough to be stopped);
    bad.npz: g.npz with a NaN in template 61; checkpoints of both learned methods."""
    directory = tmp_path_factory.mktemp("sharded")
    rng = np.random.default_rng(0)
    templates = np.repeat(np.arange(40) * 3 + 1, rng.integers(1, 400, size=40))
    rng.shuffle(templates)
    features = (rng.normal(size=(len(templates), 16)) * 5).astype(np.float32)
    bundle = {
        "features": features,
        "templates": templates,
        "media": templates * 10 + rng.integers(0, 3, len(templates)),
        "style": rng.normal(size=(len(templates), 6, 2)).astype(np.float32),
    }
    np.savez(directory / "g.npz", **bundle)
    bad = features.copy()
    bad[np.flatnonzero(templates == 61)[2], 5] = np.nan
    np.savez(directory / "bad.npz", **{**bundle, "features": bad})
    many = np.repeat(np.arange(60000), 4)
    np.save(directory / "two.npy", features[:9])
    np.save(directory / "two_tid.npy", np.stack([templates[:9] % 2, bundle["media"][:9]], 1))
    np.savez(
        directory / "many.npz",
        features=rng.normal(size=(len(many), 16)).astype(np.float32),
        templates=many,
    )
    for method, module in random_modules(16, 6, seed=7).items():
        write_checkpoint(directory / f"{method}.pt", method, module, "trained")
    return directory


def env(**extra: str) -> dict[str, str]:
    # torchrun's default: one thread a rank. A single-process run with the same threads
    # writes the same bits.
    return {**os.environ, "OMP_NUM_THREADS": "1", **extra}


def fuse_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "fusedset", "fuse", *args]


def run_alone(directory: Path, *args: str) -> dict[str, np.ndarray]:
    """What one process writes, with one thread as each rank has."""
    out = directory / "alone.npz"
    paths = [str(directory / a) if (directory / a).is_file() else a for a in args]
    with torch_threads(1):
        assert main(["fuse", *paths, "--no-progress", "--out", str(out)]) == 0
    return read(out)


def read(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


def assert_same_file(path: Path, expected: dict[str, np.ndarray]) -> None:
    found = read(path)
    assert set(found) == set(expected) == {"templates", "descriptors"}
    for key in expected:
        assert found[key].dtype == expected[key].dtype
        np.testing.assert_array_equal(found[key], expected[key], strict=True)


def spawn_ranks(directory: Path, world: int, *args: str) -> list[subprocess.Popen]:
    """Ranks started by hand as torchrun would start them (no agent, rank 0 holds the store)."""
    port = str(free_port())
    procs = []
    for r in range(world):
        rank = {"RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(world)}
        procs.append(
            subprocess.Popen(
                fuse_command(*args),
                cwd=directory,
                env=env(**rank, MASTER_ADDR="127.0.0.1", MASTER_PORT=port),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    return procs


def finish(procs: list[subprocess.Popen]) -> list[tuple[int, str, str]]:
    results = []
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=LAUNCH_TIMEOUT)
        finally:
            proc.kill()
        results.append((proc.returncode, out, err))
    return results


def last_line(text: str) -> str:
    return text.strip().splitlines()[-1] if text.strip() else ""


def wait_for_first_beat(pid: int, gone: Callable[[], bool]) -> None:
    """Until the rank in process ``pid`` has joined the others and its watch has beaten once
    (read from the store, as the ranks do); fails once ``gone()`` says the run ended."""
    import torch.distributed as dist

    environ = rank_environ(pid)
    run = f"{environ.get('TORCHELASTIC_RUN_ID', 'none')}/"
    run += environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    key = f"fusedset-fuse/{run}/beat/{environ['RANK']}"
    address, port = environ["MASTER_ADDR"], int(environ["MASTER_PORT"])
    deadline = time.monotonic() + 120
    store = None
    while not gone() and time.monotonic() < deadline:
        try:
            if store is None:
                store = dist.TCPStore(address, port, is_master=False, timeout=timedelta(seconds=5))
            if store.check([key]) and store.add(key, 0) > 0:
                return
        except dist.DistError:  # the store is not up yet
            pass
        time.sleep(0.05)
    raise AssertionError(f"rank {environ['RANK']} never beat")


def rank_environ(pid: int) -> dict[str, str]:
    entries = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(e.decode().split("=", 1) for e in entries if b"=" in e)


def test_shares_balance_frames():
    frames = [50, 1, 1, 30, 30, 2, 7, 7, 100]
    owned = shares(frames, 3)
    assert sorted(np.concatenate(owned).tolist()) == list(range(len(frames)))
    assert [o.tolist() for o in owned] == [[8], [0, 6, 7], [1, 2, 3, 4, 5]]
    loads = [sum(frames[i] for i in o) for o in owned]
    assert loads == [100, 64, 64]
    assert [o.tolist() for o in shares([4, 4], 3)] == [[0], [1], []]


def test_a_launch_without_torchrun_variables_is_refused(inputs, monkeypatch, capsys):
    for name in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_PORT", "29500")
    out = inputs / "never.npz"
    assert main(["fuse", "--method", "mean", "--features", str(inputs / "g.npz"),
                 "--out", str(out)]) == 2  # fmt: skip
    assert capsys.readouterr().err == (
        "fusedset fuse: WORLD_SIZE=2 but RANK, MASTER_ADDR not set: launch with torchrun\n"
    )
    assert not out.exists()


def test_torchrun_writes_what_one_process_writes(inputs):
    args = ["--method", "coreset", "--checkpoint", "coreset.pt", "--features", "g.npz"]
    expected = run_alone(inputs, *args)
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone",
         f"--nproc-per-node={WORLD}", "-m", "fusedset", "fuse", *args, "--out", "ranks.npz"],
        cwd=inputs, env=env(), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_file(inputs / "ranks.npz", expected)
    # One line from rank 0 only, and its bar counts every rank's templates.
    assert result.stdout.count("wrote 40 descriptors of width 16 to ranks.npz") == 1
    assert "40/40" in result.stderr


@pytest.mark.parametrize(
    ("world", "args"),
    [
        (WORLD, ["--method", "caface", "--checkpoint", "caface.pt", "--chunk", "64",
                 "--features", "g.npz"]),
        # Two templates: a rank has nothing to fuse.
        (WORLD, ["--method", "media-mean", "--features", "two.npy", "--templates", "two_tid.npy"]),
    ],
    ids=["caface-chunks", "npy-empty-share"],
)  # fmt: skip
def test_ranks_write_what_one_process_writes(inputs, world, args):
    expected = run_alone(inputs, *args)
    results = finish(spawn_ranks(inputs, world, *args, "--no-progress", "--out", "ranks.npz"))
    assert [code for code, _, _ in results] == [0] * world, [err[-2000:] for _, _, err in results]
    assert [out.count("wrote") for _, out, _ in results] == [1] + [0] * (world - 1)
    assert_same_file(inputs / "ranks.npz", expected)


def test_bad_input_on_one_rank_ends_every_rank_with_its_line(inputs):
    frames = np.load(inputs / "bad.npz")["templates"]
    ids, counts = np.unique(frames, return_counts=True)
    owner = next(r for r, s in enumerate(shares(counts.tolist(), WORLD)) if 20 in s)
    assert ids[20] == 61
    results = finish(spawn_ranks(inputs, WORLD, "--method", "mean", "--features", "bad.npz",
                                 "--out", "bad_out.npz"))  # fmt: skip
    line = f"fusedset fuse: rank {owner}: bad.npz: template 61 has NaN or Inf features"
    assert [(code, last_line(err)) for code, _, err in results] == [(2, line)] * WORLD
    assert not (inputs / "bad_out.npz").exists()


def test_a_rank_that_stops_ends_every_rank(inputs):
    args = ["--method", "core-mean", "--features", "many.npz", "--no-progress", "--rank-timeout",
            "3", "--out", "stopped.npz"]  # fmt: skip
    procs = spawn_ranks(inputs, WORLD, *args)
    try:
        try:
            wait_for_first_beat(procs[1].pid, lambda: any(p.poll() is not None for p in procs))
        except AssertionError as exc:
            ended = [(code, err[-1500:]) for code, _, err in finish(procs)]
            raise AssertionError(f"exit codes and errors of the ranks: {ended}") from exc
        os.kill(procs[1].pid, signal.SIGSTOP)  # hung: alive, silent
        results = finish([procs[0], procs[2]])
    finally:
        procs[1].kill()
        procs[1].wait()
    lines = {last_line(err) for _, _, err in results}
    assert [code for code, _, _ in results] == [2, 2]
    assert len(lines) == 1, lines
    (line,) = lines
    assert line.startswith("fusedset fuse: rank 1: no sign of life for 3 s, killed or hung")
    assert not (inputs / "stopped.npz").exists()


def test_torchrun_stops_every_rank_when_one_is_killed(inputs):
    launcher = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone",
         f"--nproc-per-node={WORLD}", "-m", "fusedset", "fuse", "--method", "core-mean",
         "--features", "many.npz", "--no-progress", "--out", "killed.npz"],
        cwd=inputs, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        rank1 = rank_process(launcher, 1)
        wait_for_first_beat(rank1, lambda: launcher.poll() is not None)
        os.kill(rank1, signal.SIGKILL)
        _, err = launcher.communicate(timeout=LAUNCH_TIMEOUT)
    finally:
        launcher.kill()
    assert launcher.returncode != 0
    stopped = "stopped by the launcher (another rank failed)"
    assert sorted(line for line in err.splitlines() if line.startswith("fusedset fuse:")) == [
        f"fusedset fuse: rank 0: {stopped}",
        f"fusedset fuse: rank 2: {stopped}",
    ]
    assert not (inputs / "killed.npz").exists()


def rank_process(launcher: subprocess.Popen, rank: int) -> int:
    """The pid of torchrun's child ``rank``."""
    deadline = time.monotonic() + 120
    while launcher.poll() is None and time.monotonic() < deadline:
        for pid in children(launcher.pid):
            try:
                if rank_environ(pid).get("RANK") == str(rank):
                    return pid
            except OSError:  # gone
                continue
        time.sleep(0.05)
    raise AssertionError(f"torchrun never started rank {rank}")


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            # pid (comm) state ppid ...: comm may hold spaces and parentheses
            stat = (entry / "stat").read_text()
        except OSError:  # gone
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry.name))
    return found
