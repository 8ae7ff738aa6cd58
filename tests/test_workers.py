"""fusedset.nn._workers: independent work items on single-threaded workers, and the thread
count of fusedset's kernels in threads that chose their own."""

from __future__ import annotations

import threading

import pytest
import torch

from fusedset._dispatch import extension_loaded, init_thread_count
from fusedset.nn._workers import map_single_threaded
from fusedset.ops import cluster_accumulate

from .helpers import torch_threads


@pytest.fixture
def two_threads():
    with torch_threads(2):
        yield


_WEIGHT = torch.ones(1, requires_grad=True)


def _where(item: int) -> tuple[int, int, int, bool]:
    """The item, the thread that ran it, its thread count, and whether it recorded autograd."""
    return item, threading.get_ident(), torch.get_num_threads(), (_WEIGHT * 2).requires_grad


def _new_thread_count() -> int:
    counts = []
    thread = threading.Thread(target=lambda: counts.append(torch.get_num_threads()))
    thread.start()
    thread.join()
    return counts[0]


def test_items_run_in_order_on_single_threaded_workers(two_threads):
    example = torch.zeros(1)
    with torch.no_grad():
        results = map_single_threaded(_where, list(range(12)), example)
    assert [r[0] for r in results] == list(range(12))
    assert threading.get_ident() not in {r[1] for r in results}
    assert {r[2] for r in results} == {1}
    assert not any(r[3] for r in results)
    # The caller and threads started later keep the caller's count.
    assert torch.get_num_threads() == 2
    assert _new_thread_count() == 2


@pytest.mark.parametrize("case", ["grad enabled", "one item", "one thread"])
def test_runs_inline_when_workers_would_change_the_result(case, two_threads):
    example = torch.zeros(1)
    items = [0] if case == "one item" else [0, 1]
    if case == "one thread":
        torch.set_num_threads(1)
    with torch.set_grad_enabled(case == "grad enabled"):
        results = map_single_threaded(_where, items, example)
    assert {r[1] for r in results} == {threading.get_ident()}


@pytest.mark.skipif(not extension_loaded(), reason="fusedset._C is not built")
def test_a_threads_own_count_holds_in_fusedset_kernels(two_threads):
    """A thread's first fusedset kernel used to reset the thread to torch's default count."""
    chosen, changed = threading.Event(), threading.Event()
    counts = []

    def worker():
        init_thread_count()
        torch.set_num_threads(1)
        chosen.set()
        changed.wait()
        cluster_accumulate(torch.randn(1, 300, 8), torch.randn(1, 4, 8), torch.randn(1, 300, 16))
        counts.append(torch.get_num_threads())

    thread = threading.Thread(target=worker)
    thread.start()
    chosen.wait()
    torch.set_num_threads(2)  # torch's default count, which the worker's first kernel would take
    changed.set()
    thread.join()
    assert counts == [1]
