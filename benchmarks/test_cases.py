"""One pytest-benchmark per implementation and pass of each case of the suite (see conftest.py)."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import NamedTuple

import pytest
import torch

from fusedset.bench.common import Case, freed_memory_kept
from fusedset.bench.suite import benchmark_modules, pass_inputs, timed_calls


class Timing(NamedTuple):
    case: Case
    pass_: str
    impl: str
    call: Callable

    @property
    def group(self) -> str:
        return f"{self.case.op}: {self.case.label}, {self.pass_}"


def suite_timings(mode: str) -> list[Timing]:
    return [
        Timing(case, pass_, impl, call)
        for module in benchmark_modules().values()
        for case in module.cases(mode)
        for pass_, calls in timed_calls(case).items()
        for impl, call in calls.items()
    ]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "timing" in metafunc.fixturenames:
        timings = suite_timings(metafunc.config.getoption("--bench-mode"))
        ids = [f"{t.group}, {t.impl}" for t in timings]
        metafunc.parametrize("timing", timings, ids=ids)


_last_inputs: dict[tuple[str, str, str], list[tuple]] = {}


def case_inputs(timing: Timing, device: str) -> list[tuple]:
    """The inputs of the timing's case and pass, made once for all its implementations (they are
    collected one after another); only the last case's are kept, the largest take GBs."""
    key = (timing.case.op, timing.case.label, timing.pass_)
    if key not in _last_inputs:
        _last_inputs.clear()
        _last_inputs[key] = pass_inputs(timing.case.make_inputs(device), timing.pass_)
    return _last_inputs[key]


def test_case(benchmark, request: pytest.FixtureRequest, timing: Timing) -> None:
    device = request.config.getoption("--bench-device")
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("--bench-device cuda but no CUDA device is available")
    inputs = case_inputs(timing, device)
    # consecutive rounds take consecutive inputs, as in fusedset bench: none finds its input in
    # cache from the round before
    rotation = itertools.cycle(inputs)

    def call() -> None:
        timing.call(*next(rotation))
        if device == "cuda":
            torch.cuda.synchronize()

    benchmark.group = timing.group
    benchmark.extra_info.update(size=timing.case.size, bytes_moved=timing.case.bytes_moved)
    with freed_memory_kept():
        benchmark.pedantic(call, rounds=timing.case.repeats, warmup_rounds=1)
