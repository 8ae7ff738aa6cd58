"""The CUDA implementations of the Triton ops: one module per op, each kernel registered with
the compile check, and here the table that registers them with torch.library.

Importing this package does not import triton: the kernel modules do, and only the first CUDA
tensor of an op, the interpreter tests and ``python -m fusedset.tools.compile_check`` load them.
"""

import functools
import importlib

import torch

from fusedset.triton_kernels.registry import (
    HELPERS,
    REGISTRY,
    CompileVariant,
    Launch,
    compile_checked,
    compile_checked_helper,
)

__all__ = [
    "HELPERS",
    "REGISTRY",
    "CompileVariant",
    "Launch",
    "compile_checked",
    "compile_checked_helper",
]

# fusedset op -> (module in this package, its function taking the op's schema arguments).
CUDA_KERNELS = {
    "cluster_accumulate": ("cluster_accumulate", "forward"),
    "cluster_accumulate_backward": ("cluster_accumulate", "backward"),
    "quality_fps": ("quality_fps", "quality_fps"),
    "quality_fps_select": ("quality_fps", "quality_fps_select"),
    "sinusoid_attention_pool": ("sinusoid_attention_pool", "sinusoid_attention_pool"),
    "sinusoid_attention_pool_backward": (
        "sinusoid_attention_pool",
        "sinusoid_attention_pool_backward",
    ),
}
# The backward sweeps of quality_fps_select are batched mat-mats, which cuBLAS runs near the
# bandwidth: on CUDA they are their eager form.
EAGER_CUDA_KERNELS = {
    "quality_fps_backward_dots": ("fusedset.reference.quality_fps", "backward_dots"),
    "quality_fps_backward_spread": ("fusedset.reference.quality_fps", "backward_spread"),
}


def _first_device(*args: object) -> torch.device:
    return next(a.device for a in args if isinstance(a, torch.Tensor))


def _guarded(module: str, name: str):
    """The kernel, imported at its first call and run under a guard of its inputs' device (a
    launch runs on the current device and stream: tensors on cuda:1 must not launch on cuda:0)."""

    @functools.cache
    def resolve():
        return getattr(importlib.import_module(module), name)

    def kernel(*args, **kwargs):
        with torch.cuda.device(_first_device(*args, *kwargs.values())):
            return resolve()(*args, **kwargs)

    return kernel


def register_cuda_kernels() -> None:
    """Registers every op's CUDA implementation (called once by fusedset.ops when the compiled
    extension, which defines the ops, and triton are both present)."""
    for op, (module, name) in CUDA_KERNELS.items():
        torch.library.register_kernel(
            f"fusedset::{op}", "cuda", _guarded(f"{__name__}.{module}", name)
        )
    for op, (module, name) in EAGER_CUDA_KERNELS.items():
        torch.library.register_kernel(f"fusedset::{op}", "cuda", _guarded(module, name))
