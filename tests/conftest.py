import functools
import os

import torch

# Without a CUDA device the Triton kernels run in Triton's interpreter on CPU tensors; with one
# they run compiled, on CUDA tensors (helpers.TRITON_DEVICE). Triton reads the variable when a
# @triton.jit decorator runs, i.e. when a kernel module is imported: it must be set before
# fusedset (or anything importing it) is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import random
import zlib
from pathlib import Path

import numpy as np
import pytest

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"


def seed_of(nodeid: str) -> int:
    """The seed of a test: fixed by its id, so each test (and each parametrization) draws its
    own inputs, the same on every run, whatever ran before it."""
    return zlib.crc32(nodeid.encode())


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002 (the legacy global generator np.random.* draws from)
    torch.manual_seed(seed)


@pytest.fixture(autouse=True)
def seeded(request):
    """Every random input is seeded: a failure reproduces, and a passing test cannot start
    failing on a draw it never made before."""
    seed_everything(seed_of(request.node.nodeid))


def pytest_collection_modifyitems(config, items):
    """Without triton (a CPU-only torch) the Triton tests, named test_triton_*, skip; the other
    tests of their modules (C++, ClusterState, gradcheck) still run."""
    from .helpers import triton_available

    triton_tests = [item for item in items if item.name.startswith("test_triton")]
    if triton_tests and not triton_available():
        skip = pytest.mark.skip(reason="needs triton, which this torch does not have")
        for item in triton_tests:
            item.add_marker(skip)


@pytest.fixture
def poisoned_outputs():
    """Every tensor torch allocates uninitialized (kernel outputs included) starts as NaN, so an
    element a kernel forgets to write cannot pass for a right answer."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(previous)


@pytest.fixture
def fixtures_dir() -> Path:
    if not FIXTURES.is_dir():
        pytest.skip(f"reference fixtures not found at {FIXTURES}")
    return FIXTURES


@functools.cache
def _load_fixture(path: Path):
    return torch.load(path, weights_only=True)


@pytest.fixture
def caface_cases(fixtures_dir: Path) -> list[dict]:
    """The released CAFace's cases (../shared/fixtures/README.md), loaded once per session."""
    return _load_fixture(fixtures_dir / "caface_official.pt")


@pytest.fixture
def facecoresetnet_fixture(fixtures_dir: Path) -> dict:
    """The released FaceCoresetNet's state dict and cases, loaded once per session."""
    return _load_fixture(fixtures_dir / "facecoresetnet_official.pt")
