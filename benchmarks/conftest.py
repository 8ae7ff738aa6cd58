"""pytest-benchmark over the suite's cases: ``pytest benchmarks/ --benchmark-only``.

The same ``Case`` definitions as ``fusedset bench`` (each module's ``cases(mode)``), one benchmark
per implementation and pass of a case, grouped by case and pass, so pytest-benchmark's saved runs
(``--benchmark-autosave``, ``--benchmark-compare``) track a kernel across commits. ``fusedset
bench`` stays the runner of side-by-side ratios: here each implementation is timed on its own.
"""

from __future__ import annotations

import os

import pytest

BENCH_MODES = ("smoke", "quick")


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("fusedset bench")
    group.addoption(
        "--bench-mode",
        choices=BENCH_MODES,
        default=os.environ.get("FUSEDSET_BENCH_MODE", "smoke"),
        help="the suite's sizes to time (default: $FUSEDSET_BENCH_MODE, else smoke)",
    )
    group.addoption(
        "--bench-device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="the device the inputs live on (default: cpu)",
    )


def pytest_configure(config: pytest.Config) -> None:
    mode = config.getoption("--bench-mode")
    if mode not in BENCH_MODES:
        raise pytest.UsageError(
            f"--bench-mode / FUSEDSET_BENCH_MODE: expected one of {BENCH_MODES}, got {mode!r}"
        )
