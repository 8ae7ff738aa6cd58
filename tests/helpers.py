"""Shared test helpers."""

from __future__ import annotations

import contextlib
import importlib
import os
import socket
from collections.abc import Callable, Iterator, Sequence
from types import ModuleType

import pytest
import torch

import fusedset

# `cuda` selects what scripts/gpu-check.sh runs (pytest -m cuda); without a device they skip.
CUDA_MARKS = (
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
)
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA_MARKS)]


def cuda_only(test: Callable) -> Callable:
    """A test of a CUDA path alone: marked `cuda`, skipped without a device."""
    for mark in CUDA_MARKS:
        test = mark(test)
    return test


# Where tests run the Triton launchers: compiled on a CUDA device when there is one, else in
# Triton's interpreter on CPU tensors (tests/conftest.py sets TRITON_INTERPRET=1 then).
TRITON_DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET", "0") == "1" else "cuda"


def interpreter_only(reason: str) -> pytest.MarkDecorator:
    """For a Triton test that cannot run compiled (it wraps the interpreter's internals, or
    expects a failed device check to raise where CUDA would end the process's context)."""
    return pytest.mark.skipif(TRITON_DEVICE != "cpu", reason=reason)


def moved(value: object, device: str | torch.device) -> object:
    """value with every tensor in it (in tuples and lists too) on device."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(moved(v, device) for v in value)
    return value


def run_on(device: str, fn: Callable, *args: object, **kwargs: object) -> object:
    """fn run with its tensor arguments on device, its tensor outputs back where the first tensor
    argument was: a Triton launcher on TRITON_DEVICE, or a C++ CPU kernel, beside expected values
    computed elsewhere. Without a move (all on device already) it is fn itself."""
    home = next((a.device for a in args if isinstance(a, torch.Tensor)), None)
    out = fn(*moved(args, device), **{k: moved(v, device) for k, v in kwargs.items()})
    return out if home is None else moved(out, home)


def triton_kernels_or_none(op: str) -> ModuleType | None:
    """``fusedset.triton_kernels.<op>``, or None without triton (a CPU-only torch): importing
    it at the top of a test module must not skip the module's other tests. Its test_triton_*
    tests skip then (tests/conftest.py)."""
    try:
        return importlib.import_module(f"fusedset.triton_kernels.{op}")
    except ImportError:
        if triton_available():
            raise
        return None


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


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


def _paired(actual: torch.Tensor, expected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """actual and expected in float64, their NaNs (which must coincide) made zeros."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    a = actual.double()
    e = expected.double()
    nan_a, nan_e = a.isnan(), e.isnan()
    assert torch.equal(nan_a, nan_e), (
        f"NaN at {nan_a.nonzero()[:5].tolist()} vs {nan_e.nonzero()[:5].tolist()}"
    )
    return a.masked_fill(nan_e, 0), e.masked_fill(nan_e, 0)


def max_rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest |actual - expected| relative to the largest |expected| (NaNs must coincide)."""
    a, e = _paired(actual, expected)
    if e.numel() == 0:
        return 0.0
    return ((a - e).abs().max() / e.abs().max().clamp_min(1e-300)).item()


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float) -> None:
    err = max_rel_error(actual, expected)
    assert err <= rtol, f"relative error {err:.3e} > {rtol:.1e}"


def assert_close_elementwise(
    actual: torch.Tensor, expected: torch.Tensor, rtol: float, atol: float = 0.0
) -> None:
    """Every element within ``atol + rtol * |expected|`` of its own expected value (NaNs must
    coincide). For values spanning orders of magnitude, where ``assert_rel_close`` measures
    every error against the largest value and lets the small ones be wrong unseen; ``atol``
    is the scale below which values are noise (underflow, cancellation)."""
    a, e = _paired(actual, expected)
    error = torch.where(a == e, 0.0, (a - e).abs())  # equal infinities are exact
    outside = (error > atol + rtol * e.abs()) | (e.isinf() & (a != e))
    if bool(outside.any()):
        flat = torch.argmax(error / (atol + rtol * e.abs()).clamp_min(1e-300))
        worst = tuple(int(i) for i in torch.unravel_index(flat, e.shape))
        raise AssertionError(
            f"{int(outside.sum())} of {e.numel()} elements outside {atol:.1e} + {rtol:.1e} * "
            f"|expected|; the worst, at {worst}: {a[worst].item():.6e} against "
            f"{e[worst].item():.6e}"
        )


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


def free_port() -> int:
    """A TCP port of 127.0.0.1 free now, for a process group's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
