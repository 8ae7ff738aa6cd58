"""Two kernels that prove the compile check: one compiles clean, one spills on purpose.

Not a test module (no test_ prefix): tests/test_compile_check.py hands this file to
``python -m fusedset.tools.compile_check --module``.
"""

import triton
import triton.language as tl

from fusedset.triton_kernels import CompileVariant, compile_checked

SIGNATURE = {"x_ptr": "*fp32", "y_ptr": "*fp32", "n": "i32"}


@compile_checked(CompileVariant("fp32", SIGNATURE))
@triton.autotune(
    configs=[
        triton.Config({"BLOCK": 256}, num_warps=4),
        triton.Config({"BLOCK": 1024}, num_warps=8),
    ],
    key=["n"],
)
@triton.jit
def scale_clean(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=mask) * 2.0, mask=mask)


# 16384 fp32 values held live across a reduction by a single warp: 512 per thread, more than
# the 255 registers a thread can have, so ptxas must spill.
@compile_checked(
    CompileVariant("fp32", SIGNATURE, constexprs={"BLOCK": 16384}, options={"num_warps": 1})
)
@triton.jit
def spill_on_purpose(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask)
    total = tl.sum(x * x, axis=0)
    tl.store(y_ptr + offs, x / total, mask=mask)
