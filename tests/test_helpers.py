"""The test suite's own machinery: seeded inputs, the element-wise bound, and Triton tests that
skip alone when triton is missing."""

from __future__ import annotations

import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from .conftest import seed_everything, seed_of
from .helpers import assert_close_elementwise, assert_rel_close


def draws():
    return torch.rand(3), np.random.rand(3), random.random()  # noqa: NPY002


@pytest.mark.parametrize("case", ["a", "b"])
def test_every_test_starts_from_its_own_seed(request, case):
    got = draws()
    seed_everything(seed_of(request.node.nodeid))
    want = draws()
    assert torch.equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    assert got[2] == want[2]
    # Parametrizations draw different inputs.
    other = request.node.nodeid.replace(f"[{case}]", "[b]" if case == "a" else "[a]")
    assert seed_of(other) != seed_of(request.node.nodeid)


def test_elementwise_bound_sees_a_small_value_the_max_norm_hides():
    expected = torch.tensor([[1e4, 3.0], [1e-3, -2e-6]])
    wrong = expected.clone()
    wrong[1, 0] = 2e-3  # 100% off, 1e-7 of the largest value
    assert_rel_close(wrong, expected, 1e-5)
    with pytest.raises(AssertionError, match=r"^1 of 4 elements .* the worst, at \(1, 0\): 2\.0"):
        assert_close_elementwise(wrong, expected, 1e-5)
    assert_close_elementwise(expected * (1 + 1e-6), expected, 1e-5)
    # Below atol values are noise: an underflow to 0 passes, a sign flip above it does not.
    tiny = expected.clone()
    tiny[1, 1] = 0.0
    assert_close_elementwise(tiny, expected, 1e-5, atol=1e-5)
    tiny[1, 1] = 2e-6
    with pytest.raises(AssertionError, match=r"^1 of 4 .* at \(1, 1\): 2\.0+e-06 against -2\.0"):
        assert_close_elementwise(tiny, expected, 1e-5, atol=1e-7)


def test_elementwise_bound_nan_and_inf():
    expected = torch.tensor([float("nan"), float("inf"), 1.0])
    assert_close_elementwise(expected.clone(), expected, 0.0)
    with pytest.raises(AssertionError, match="NaN at"):
        assert_close_elementwise(torch.tensor([0.0, float("inf"), 1.0]), expected, 1e-5)
    with pytest.raises(AssertionError, match="elements outside"):
        assert_close_elementwise(torch.tensor([float("nan"), 1e30, 1.0]), expected, 1e-5)


WITHOUT_TRITON = """
import sys

sys.modules["triton"] = None  # import triton raises ImportError, as in a CPU-only torch
import pytest

sys.exit(pytest.main(sys.argv[1:]))
"""


def test_without_triton_only_the_triton_tests_skip():
    """The kernel test modules import their Triton launchers at the top; without triton that
    once skipped every C++, ClusterState and gradcheck test in them."""
    tests = Path(__file__).parent
    files = [
        str(tests / f"test_{op}.py") for op in ("cluster_accumulate", "sinusoid_attention_pool")
    ]
    result = subprocess.run(
        [sys.executable, "-c", WITHOUT_TRITON, *files, "-v", "-k", "triton or bad_inputs"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        cwd=tests.parent,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    outcome = re.compile(r"^\S+?::(test_\w+).* (PASSED|SKIPPED|FAILED|ERROR) ")
    outcomes = [m.groups() for line in result.stdout.splitlines() if (m := outcome.match(line))]
    skipped = [name for name, status in outcomes if status == "SKIPPED"]
    passed = [name for name, status in outcomes if status == "PASSED"]
    assert len(skipped) + len(passed) == len(outcomes), result.stdout[-3000:]
    assert skipped, result.stdout[-3000:]
    assert all(name.startswith("test_triton") for name in skipped), skipped
    assert passed, result.stdout[-3000:]
    assert not any(name.startswith("test_triton") for name in passed), passed
