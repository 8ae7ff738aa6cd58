import os

import torch

# Without a CUDA device the Triton kernels run in Triton's interpreter on CPU tensors; with one
# they run compiled, on CUDA tensors (helpers.TRITON_DEVICE). Triton reads the variable when a
# @triton.jit decorator runs, i.e. when a kernel module is imported: it must be set before
# fusedset (or anything importing it) is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from pathlib import Path

import pytest

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"


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
