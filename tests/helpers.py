"""Shared test helpers."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence

import pytest
import torch

import fusedset

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]
# Where tests run the Triton launchers: compiled on a CUDA device when there is one, else in
# Triton's interpreter on CPU tensors (tests/conftest.py sets TRITON_INTERPRET=1 then).
TRITON_DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET", "0") == "1" else "cuda"


@contextlib.contextmanager
def torch_threads(count: int | None = None) -> Iterator[None]:
    """torch's intra-op thread count set to ``count`` (left as it is when None) and restored on
    exit: the setting is process-wide."""
    previous = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


# Relative error allowed for a kernel against the float64 truth, by input dtype.
RTOL = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.float16: 1e-2,
    torch.bfloat16: 1e-2,
}


def max_rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest |actual - expected| relative to the largest |expected| (NaNs must coincide)."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    a = actual.double()
    e = expected.double()
    nan_a, nan_e = a.isnan(), e.isnan()
    assert torch.equal(nan_a, nan_e), (
        f"NaN at {nan_a.nonzero()[:5].tolist()} vs {nan_e.nonzero()[:5].tolist()}"
    )
    a, e = a[~nan_e], e[~nan_e]
    if e.numel() == 0:
        return 0.0
    return ((a - e).abs().max() / e.abs().max().clamp_min(1e-300)).item()


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float) -> None:
    err = max_rel_error(actual, expected)
    assert err <= rtol, f"relative error {err:.3e} > {rtol:.1e}"


def assert_compiled_matches_reference(
    fn: Callable[..., torch.Tensor],
    inputs: Sequence[torch.Tensor],
    grad_rtol: float,
) -> None:
    """fn (a scalar of fusedset ops) under torch.compile(fullgraph, aot_eager) against fn on the
    eager references: the value to 1e-5 and its gradients in every input to grad_rtol."""
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    value = compiled(*inputs)
    got = torch.autograd.grad(value, inputs)
    with fusedset.force_reference():
        expected_value = fn(*inputs)
        expected = torch.autograd.grad(expected_value, inputs)
    assert_rel_close(value.detach(), expected_value.detach(), 1e-5)
    for g, e in zip(got, expected, strict=True):
        assert_rel_close(g, e, grad_rtol)
