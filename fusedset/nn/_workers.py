"""Independent CPU work items on single-threaded workers, one worker per intra-op thread.

Small work items (CAFace's transformer over a few chunks of 256 frames) scale poorly over
intra-op threads: each op is a fork-join region, and some (the CPU flash attention at head width
16) barely gain from a second thread. Run whole items side by side instead, each on one thread.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

from fusedset._dispatch import init_thread_count

Item = TypeVar("Item")
Result = TypeVar("Result")

_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_pool_size = 0


def _forget_pool() -> None:
    # A forked child has none of the parent's threads: it starts its own pool.
    global _lock, _pool, _pool_size
    _lock, _pool, _pool_size = threading.Lock(), None, 0


os.register_at_fork(after_in_child=_forget_pool)


def _single_thread() -> None:
    init_thread_count()
    torch.set_num_threads(1)


def _workers(size: int) -> ThreadPoolExecutor:
    global _pool, _pool_size
    with _lock:
        if _pool is None or _pool_size != size:
            if _pool is not None:
                _pool.shutdown(wait=True)
            pool = ThreadPoolExecutor(
                size, thread_name_prefix="fusedset-worker", initializer=_single_thread
            )
            # Start every worker now, then undo a side effect: torch.set_num_threads(1) in a
            # worker also sets the count that threads started later begin with.
            barrier = threading.Barrier(size)
            list(pool.map(lambda _: barrier.wait(), range(size)))
            torch.set_num_threads(size)
            _pool, _pool_size = pool, size
        return _pool


def _parallel_safe(example: torch.Tensor) -> bool:
    """Plain CPU inference only: grad mode, autocast and tracing state are per thread and would
    not follow the work into the workers."""
    return (
        type(example) is torch.Tensor
        and example.device.type == "cpu"
        and not torch.is_grad_enabled()
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()
    )


def map_single_threaded(
    fn: Callable[[Item], Result], items: Sequence[Item], example: torch.Tensor
) -> list[Result]:
    """[fn(item) for item in items], in order. With several items, several intra-op threads and
    plain CPU inference on tensors like `example`, the items run side by side on
    single-threaded workers, one per intra-op thread of the caller, who waits."""
    threads = torch.get_num_threads()
    if len(items) < 2 or threads < 2 or not _parallel_safe(example):
        return [fn(item) for item in items]

    def run(item: Item) -> Result:
        with torch.no_grad():
            return fn(item)

    return list(_workers(threads).map(run, items))
