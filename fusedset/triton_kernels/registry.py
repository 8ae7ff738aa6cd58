"""The list of Triton kernels that ``python -m fusedset.tools.compile_check`` compiles.

Every ``@triton.jit`` kernel in the package is decorated with ``@compile_checked(...)`` (placed
outermost, above ``@triton.autotune``), naming the argument types and constexpr values it is
compiled for; the check compiles each variant with every autotune config. The check also
fails on any kernel in ``fusedset.triton_kernels`` that was not registered, so none is forgotten.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar


@dataclass(frozen=True)
class CompileVariant:
    """One specialization to compile: Triton types of the runtime arguments
    (``{"x_ptr": "*fp16", "n": "i32"}``), values of constexprs not set by autotune configs, and
    launch options (``num_warps``, ``num_stages``) for kernels without autotune."""

    label: str
    signature: Mapping[str, str]
    constexprs: Mapping[str, Any] = field(default_factory=dict)
    options: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class RegisteredKernel:
    name: str
    kernel: Any  # a JITFunction, or an Autotuner/Heuristics wrapping one
    variants: tuple[CompileVariant, ...]


REGISTRY: list[RegisteredKernel] = []
# @triton.jit device functions that only registered kernels call: they are compiled, and so
# checked, inside every variant of those kernels.
HELPERS: list[Any] = []

K = TypeVar("K")


def compile_checked(*variants: CompileVariant) -> Callable[[K], K]:
    if not variants:
        raise ValueError("compile_checked needs at least one CompileVariant")

    def register(kernel: K) -> K:
        name = getattr(kernel, "__name__", None) or kernel.fn.__name__
        REGISTRY.append(RegisteredKernel(name=name, kernel=kernel, variants=tuple(variants)))
        return kernel

    return register


def compile_checked_helper(fn: K) -> K:
    """Marks a @triton.jit device function (not a kernel) as checked through its callers."""
    HELPERS.append(fn)
    return fn


@dataclass(frozen=True)
class Launch:
    """One kernel launch of a launcher, as its plan function states it before running it: what
    ``python -m fusedset.tools.gpu_model`` reads at any size without running a program. The
    launcher launches exactly its plan (the model checks that where it counts in the
    interpreter)."""

    kernel: str  # a registered kernel's name (RegisteredKernel.name)
    variant: str  # the label of the CompileVariant it runs as (its constexprs and options)
    grid: tuple[int, ...]
