"""Which implementation runs an op: the compiled kernels, or the eager reference.

CPU tensors go to the C++ kernels, CUDA tensors to the CUDA/Triton kernels. The reference runs
instead when it is forced (``force_reference()`` or ``FUSEDSET_FORCE_REFERENCE=1``), when the
compiled extension is missing (a source checkout that was never built), or when no kernel is
registered for the tensor's device; the last two warn once, saying why.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import warnings
from collections.abc import Iterator

import torch

try:
    from fusedset import _C  # importing it registers the ops with torch.library
except ImportError as exc:
    _EXTENSION_ERROR: ImportError | None = exc
else:
    _EXTENSION_ERROR = None

BUILD_HINT = "build it with `pip install --no-build-isolation -e .` from the source checkout"

_force_reference = os.environ.get("FUSEDSET_FORCE_REFERENCE", "0") == "1"
_warned: set[str] = set()


def extension_loaded() -> bool:
    return _EXTENSION_ERROR is None


# Registrations do not change while a graph runs; torch.compile may treat the answer as a constant.
@torch.compiler.assume_constant_result
def has_kernel(op: str, device_type: str) -> bool:
    """Whether ``fusedset::op`` has a compiled kernel for ``device_type`` ("cpu" or "cuda")."""
    if not extension_loaded():
        return False
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(
        f"fusedset::{op}", key
    )


def init_thread_count() -> None:
    """Settles the calling thread's intra-op thread count in torch and in fusedset's kernels:
    each takes torch's default count at its first parallel op in a thread (one flag per
    library), which undoes a ``torch.set_num_threads`` made in that thread before. Call this
    first, then ``torch.set_num_threads``."""
    torch.get_num_threads()
    if extension_loaded():
        _C.init_thread_count()


def triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def backends() -> dict[str, bool]:
    """What this installation can run: C++ CPU kernels, CUDA kernels, Triton, a CUDA device."""
    return {
        "cpp_cpu": has_kernel("style_pool", "cpu"),
        "cuda_kernels": has_kernel("style_pool", "cuda"),
        "triton": triton_importable(),
        "cuda_device": torch.cuda.is_available(),
        "reference_forced": _force_reference,
    }


@contextlib.contextmanager
def force_reference(enabled: bool = True) -> Iterator[None]:
    """Run every op on its eager reference inside the block (the oracle for kernel tests)."""
    global _force_reference
    previous = _force_reference
    _force_reference = enabled
    try:
        yield
    finally:
        _force_reference = previous


def reference_forced() -> bool:
    return _force_reference


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def use_reference(op: str, device: torch.device) -> bool:
    """True when ``op`` on ``device`` must run on the eager reference."""
    if _force_reference:
        return True
    if not extension_loaded():
        _warn_once(
            "extension",
            f"fusedset._C is not built ({_EXTENSION_ERROR}); every fusedset op runs on its slow "
            f"eager reference: {BUILD_HINT}",
        )
        return True
    if not has_kernel(op, device.type):
        _warn_once(
            f"{op}:{device.type}",
            f"fusedset.ops.{op} has no {device.type} kernel in this build; running the eager "
            f"reference (for CUDA kernels, rebuild with a CUDA torch and nvcc on the PATH)",
        )
        return True
    return False
