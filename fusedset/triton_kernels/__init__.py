"""Triton kernels, one module per op, each registered with the compile check.

Importing this package does not import triton: the kernel modules do, and only the CUDA
dispatch path, the interpreter tests and ``python -m fusedset.tools.compile_check`` load them.
"""

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
