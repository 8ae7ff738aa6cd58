import math

import pytest
import torch

import fusedset
from fusedset import reference
from fusedset.ops import sinusoid_attention_pool
from fusedset.reference._sinusoid import frequency_divisors
from fusedset.reference.sinusoid_attention_pool import (
    attention_scores,
    code_angles,
    softmax_pool,
    zero_padding,
)
from fusedset.reference.sinusoid_attention_pool import pool as reference_pool

from .helpers import (
    DEVICES,
    RTOL,
    TRITON_DEVICE,
    assert_compiled_matches_reference,
    assert_rel_close,
    interpreter_only,
    max_rel_error,
    run_on,
    torch_threads,
    triton_kernels_or_none,
)

# None without triton: then only the test_triton_* tests skip.
triton_kernels = triton_kernels_or_none("sinusoid_attention_pool")

TWO_PI = 2 * math.pi
# Half-precision rows are rounded before the kernels see them; against the float64 truth on the
# same rounded rows the float32 accumulation stays far inside 1e-3.
OUT_RTOL = {**RTOL, torch.float16: 1e-3, torch.bfloat16: 1e-3}


def cpp(*args):
    """The C++ kernel itself, never the reference (nor, for CUDA tensors, the Triton kernel)."""
    return run_on("cpu", torch.ops.fusedset.sinusoid_attention_pool.default, *args)


def problem(b, n, c, r, d, dtype=torch.float32, device="cpu", seed=0, positions=(5.0, 40.0)):
    """Rows, queries, code queries, positions (as FaceCoresetNet's norms) and row scales, with
    scores spread over several units so that the softmax is neither flat nor one-hot."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(b, n, c, generator=generator)
    queries = torch.randn(b, r, c, generator=generator) * (2 / math.sqrt(c))
    code_queries = torch.randn(b, r, d, generator=generator) * (2 / math.sqrt(d))
    low, high = positions
    pos = torch.rand(b, n, generator=generator) * (high - low) + low
    scale = torch.rand(b, n, generator=generator) + 0.5
    tensors = [x.to(dtype), queries, code_queries, pos, scale]
    return [t.to(device) for t in tensors]


def divisors_for(d, dtype=torch.float32, device="cpu"):
    return frequency_divisors(d, 10000.0, dtype, device)


def truth(x, queries, code_queries, positions, row_scale=None, lengths=None):
    """The reference in float64 on the same (rounded) inputs, from the float32 angles the
    float32 kernels form (as torch does in the released code)."""
    divisors = divisors_for(code_queries.shape[-1], device=x.device)
    if lengths is not None:
        valid = torch.arange(x.shape[1]) < lengths[:, None]
        x, positions, row_scale = zero_padding(valid, x, positions, row_scale)
    angles = code_angles(positions.float(), TWO_PI, divisors).double()
    values, scores = attention_scores(
        x.double(), queries.double(), code_queries.double(), angles,
        None if row_scale is None else row_scale.double(), 1e-5,
    )  # fmt: skip
    return softmax_pool(values, scores, lengths)


def check(out, x, queries, code_queries, positions, row_scale=None, lengths=None):
    pooled, logsumexp = out
    expected_pooled, expected_lse = truth(x, queries, code_queries, positions, row_scale, lengths)
    assert pooled.dtype == logsumexp.dtype == torch.float32
    assert_rel_close(pooled, expected_pooled, OUT_RTOL[x.dtype])
    assert_rel_close(logsumexp, expected_lse, OUT_RTOL[x.dtype])


def run_cpp(x, queries, code_queries, positions, row_scale=None, lengths=None, series=True):
    d = code_queries.shape[-1]
    return cpp(x, queries, code_queries, positions, divisors_for(d), TWO_PI, 1e-5, row_scale,
               lengths, series)  # fmt: skip


# ---------------------------------------------------------------- C++ forward


@pytest.mark.parametrize("scaled", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
# N = 1; a block's tail (128 rows); several tasks (1024 rows or more) with a tail.
@pytest.mark.parametrize("n", [1, 2, 127, 129, 2049, 5003])
@pytest.mark.usefixtures("poisoned_outputs")
def test_cpp_matches_reference(n, dtype, scaled):
    x, q, g, pos, scale = problem(2, n, 48, 24, 64, dtype)
    scale = scale if scaled else None
    check(run_cpp(x, q, g, pos, scale), x, q, g, pos, scale)


# R off the 8-wide panels and over one 32-wide panel; C off the 16-wide tiles; D = 2 to 1024.
@pytest.mark.parametrize(("c", "r", "d"), [(1, 1, 2), (7, 5, 6), (33, 9, 1024), (512, 24, 512),
                                           (100, 33, 40), (64, 70, 18)])  # fmt: skip
@pytest.mark.usefixtures("poisoned_outputs")
def test_cpp_shapes(c, r, d):
    x, q, g, pos, scale = problem(3, 300, c, r, d, seed=c)
    check(run_cpp(x, q, g, pos, scale), x, q, g, pos, scale)


@pytest.mark.usefixtures("poisoned_outputs")
def test_cpp_ragged_never_reads_padding():
    x, q, g, pos, scale = problem(3, 2500, 40, 8, 32)
    lengths = torch.tensor([2500, 1, 1030])
    padded = torch.arange(2500) >= lengths[:, None]
    expected = truth(x, q, g, pos, scale, lengths)
    x[padded], pos[padded], scale[padded] = float("nan"), float("nan"), float("inf")
    got = run_cpp(x, q, g, pos, scale, lengths)
    for actual, want in zip(got, expected, strict=True):
        assert_rel_close(actual, want, RTOL[torch.float32])


# Positions whose largest angle leaves every pair to the power series (pairs summed as one
# polynomial per query), the FaceCoresetNet range (half of them), none of them, and all zero.
@pytest.mark.parametrize("positions", [(0.0, 0.3), (5.0, 40.0), (100.0, 5000.0), (0.0, 0.0)])
@pytest.mark.usefixtures("poisoned_outputs")
def test_cpp_series_and_exact_pairs(positions):
    x, q, g, pos, scale = problem(2, 700, 32, 24, 512, positions=positions)
    for series in (True, False):
        check(run_cpp(x, q, g, pos, scale, series=series), x, q, g, pos, scale)


def test_recorded_calls_take_every_sine_as_torch():
    """Under autograd the kernel forms every code as torch does (the backward recomputes them
    so): its output is the exact path's, bit for bit."""
    x, q, g, pos, scale = problem(1, 300, 16, 8, 512)
    exact = run_cpp(x, q, g, pos, scale, series=False)
    recorded = sinusoid_attention_pool(x, q.requires_grad_(), g, pos, row_scale=scale,
                                       position_scale=TWO_PI)  # fmt: skip
    for a, b in zip(recorded, exact, strict=True):
        assert torch.equal(a.detach(), b)
    with torch.no_grad():
        fast = sinusoid_attention_pool(x, q, g, pos, row_scale=scale, position_scale=TWO_PI)
    for a, b in zip(fast, run_cpp(x, q, g, pos, scale), strict=True):
        assert torch.equal(a, b)


def test_cpp_large_angles_take_the_exact_path():
    """Angles past 2^20 radians are reduced by libm, not by the vectorized sincos."""
    x, q, g, pos, scale = problem(1, 200, 16, 4, 8, positions=(1e6, 3e6))
    check(run_cpp(x, q, g, pos, scale), x, q, g, pos, scale)


def test_cpp_float64():
    x, q, g, pos, scale = (t.double() for t in problem(2, 1500, 20, 6, 10))
    d = divisors_for(10, torch.float64)
    got = cpp(x, q, g, pos, d, TWO_PI, 1e-5, scale, None)
    expected = reference_pool(x, q, g, pos, d, TWO_PI, 1e-5, scale)
    assert got[0].dtype == torch.float64
    for actual, want in zip(got, expected, strict=True):
        assert_rel_close(actual, want, RTOL[torch.float64])


def test_cpp_100k_rows_face_width():
    x, q, g, pos, scale = problem(1, 100_000, 512, 24, 512)
    check(run_cpp(x, q, g, pos, scale), x, q, g, pos, scale)


def test_cpp_is_bitwise_deterministic_across_thread_counts():
    args = problem(2, 9000, 32, 12, 16)
    with torch_threads(1):
        one = run_cpp(*args)
    with torch_threads(2):
        two = run_cpp(*args)
    for a, b in zip(one, two, strict=True):
        assert torch.equal(a, b)


def test_cpp_nan_row_poisons_the_output():
    x, q, g, pos, scale = problem(1, 300, 16, 4, 8)
    x[0, 123, 5] = float("nan")
    assert run_cpp(x, q, g, pos, scale)[0].isnan().all()


# ---------------------------------------------------------------- Triton (interpreted on CPU)


def run_triton(x, queries, code_queries, positions, row_scale=None, lengths=None):
    d = code_queries.shape[-1]
    return run_on(TRITON_DEVICE, triton_kernels.forward, x, queries, code_queries, positions,
                  divisors_for(d), TWO_PI, 1e-5, row_scale, lengths)  # fmt: skip


# The resident kernel: N = 1 and R = 1; split tails; R = 24 (a 32-query block) at its full width
# (C = D = 512); R = 64 (two query blocks) with odd C and D. The tiled kernel: rows or codes wider
# than the resident kernel holds.
@pytest.mark.parametrize(
    ("n", "c", "r", "d", "dtype", "scaled"),
    [
        (1, 7, 1, 6, torch.float32, False),
        (37, 40, 24, 70, torch.float32, True),
        (29, 512, 24, 512, torch.bfloat16, True),
        (41, 33, 64, 18, torch.float16, False),
        (45, 600, 5, 10, torch.float32, True),
        (40, 9, 17, 1026, torch.float16, False),
    ],
)
@pytest.mark.usefixtures("poisoned_outputs")
@pytest.mark.cuda
def test_triton_matches_reference(n, c, r, d, dtype, scaled):
    x, q, g, pos, scale = problem(2, n, c, r, d, dtype)
    scale = scale if scaled else None
    lengths = torch.tensor([n, max(1, n // 3)])
    check(run_triton(x, q, g, pos, scale, lengths), x, q, g, pos, scale, lengths)


@pytest.mark.parametrize("c", [40, 600])
@pytest.mark.usefixtures("poisoned_outputs")
@pytest.mark.cuda
def test_triton_ragged_never_reads_padding(c):
    x, q, g, pos, scale = problem(3, 50, c, 8, 32)
    lengths = torch.tensor([50, 1, 23])
    padded = torch.arange(50) >= lengths[:, None]
    expected = truth(x, q, g, pos, scale, lengths)
    x[padded], pos[padded], scale[padded] = float("nan"), float("nan"), float("inf")
    for actual, want in zip(run_triton(x, q, g, pos, scale, lengths), expected, strict=True):
        assert_rel_close(actual, want, RTOL[torch.float32])


def launched(monkeypatch):
    """The (kernel, grid) of every Triton launch from now on, as the interpreter runs them."""
    from triton.runtime.interpreter import GridExecutor

    calls = []
    original = GridExecutor.__call__

    def record(self, *args, **kwargs):
        calls.append((self.fn.__name__, tuple(self.grid)))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(GridExecutor, "__call__", record)
    return calls


# The resident kernel over its full splits; over a few splits of several rows each, the merge over
# several blocks of splits; the tiled kernel.
@pytest.mark.parametrize(
    ("c", "d", "constants"),
    [
        (40, 70, {}),
        (40, 70, {"SPLITS": 4, "MIN_SPLIT_ROWS": 2, "MERGE_BLOCK_S": 4}),
        (600, 10, {}),
    ],
)
@pytest.mark.usefixtures("poisoned_outputs")
@pytest.mark.cuda
@interpreter_only("records the interpreter's launches")
def test_triton_launches_its_plan(monkeypatch, c, d, constants):
    for name, value in constants.items():
        monkeypatch.setattr(triton_kernels, name, value)
    x, q, g, pos, scale = problem(2, 40, c, 24, d, torch.float16)
    lengths = torch.tensor([40, 17])
    calls = launched(monkeypatch)
    got = run_triton(x, q, g, pos, scale, lengths)
    plan = triton_kernels.forward_plan(2, 40, c, 24, d // 2, torch.float16, True)
    assert calls == [(p.kernel, p.grid) for p in plan]
    check(got, x, q, g, pos, scale, lengths)


@pytest.mark.cuda
def test_triton_plan_at_scale():
    """FaceCoresetNet's shapes: every SM busy from N = 16384 at B = 1, one launch and a fixed
    number of splits whatever N, one grid axis whatever B, and variants the compile check
    builds."""
    from fusedset.triton_kernels.registry import REGISTRY

    variants = {(k.name, v.label) for k in REGISTRY for v in k.variants}
    for b, n in [(1, 16384), (1, 65536), (1, 1 << 20), (32, 65536), (70000, 8)]:
        plan = triton_kernels.forward_plan(b, n, 512, 24, 256, torch.float32, True)
        main, merge = plan
        assert all((p.kernel, p.variant) in variants for p in plan)
        assert all(len(p.grid) == 1 for p in plan)
        assert main.kernel == "sinusoid_pool_resident_kernel"
        assert merge.grid == (b * 24 * 8,)
        splits = min(triton_kernels.SPLITS, -(-n // triton_kernels.MIN_SPLIT_ROWS))
        assert main.grid == (b * splits,)
        if n >= 16384:
            assert main.grid[0] >= 132 * b
    wide = triton_kernels.forward_plan(2, 5000, 1024, 64, 256, torch.bfloat16, False)
    assert (wide[0].kernel, wide[0].variant) == ("sinusoid_pool_kernel", "bf16 R<=64")
    assert all((p.kernel, p.variant) in variants for p in wide)


@pytest.mark.cuda
def test_triton_is_bitwise_deterministic_and_matches_cpp():
    args = problem(1, 300, 24, 8, 16)
    call = (*args[:4], divisors_for(16), TWO_PI, 1e-5, args[4], None)
    first, second = (run_on(TRITON_DEVICE, triton_kernels.forward, *call) for _ in range(2))
    for a, b, c in zip(first, second, cpp(*call), strict=True):
        assert torch.equal(a, b)
        assert_rel_close(a, c, 1e-5)


@pytest.mark.cuda
def test_triton_rejects_float64():
    x, q, g, pos, _ = problem(1, 4, 8, 2, 4)
    with pytest.raises(TypeError, match=r"float32, float16, bfloat16 inputs, got torch.float64"):
        run_on(TRITON_DEVICE, triton_kernels.forward, x.double(), q, g, pos, divisors_for(4),
               TWO_PI, 1e-5)  # fmt: skip


@pytest.mark.cuda
def test_triton_rejects_too_many_queries():
    x, q, g, pos, _ = problem(1, 4, 8, 65, 4)
    with pytest.raises(ValueError, match=r"R <= 64, got R = 65"):
        run_on(TRITON_DEVICE, triton_kernels.forward, x, q, g, pos, divisors_for(4), TWO_PI, 1e-5)


# ---------------------------------------------------------------- C++ backward

# Relative error of the backward kernel's gradients against the float64 truth: the half-precision
# row gradients are rounded to their dtype.
GRAD_RTOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
GRAD_NAMES = ("x", "queries", "position_queries", "positions", "row_scale")


def cpp_backward(inputs, lengths=None, series=False, mask=(True,) * 5, seed=1):
    """The backward kernel itself for output gradients drawn from seed, after the C++ forward;
    also returns those output gradients."""
    x, q, g, pos, scale = inputs
    divisors = divisors_for(g.shape[-1], torch.float64 if x.dtype == torch.float64 else None)
    args = (x, q, g, pos, divisors, TWO_PI, 1e-5, scale, lengths, series)
    pooled, lse = cpp(*args)
    generator = torch.Generator().manual_seed(seed)
    grad_pooled = torch.randn(pooled.shape, generator=generator, dtype=pooled.dtype)
    grad_lse = torch.randn(lse.shape, generator=generator, dtype=lse.dtype)
    grads = torch.ops.fusedset.sinusoid_attention_pool_backward.default(
        grad_pooled, grad_lse, pooled, lse, *args, list(mask)
    )
    return grads, (grad_pooled, grad_lse)


def truth_grads(inputs, output_grads, lengths=None):
    """The reference's autograd gradients in float64 on the same (rounded) inputs, its angles
    valued from the float32 positions as the float32 kernels form them (derivative exact)."""
    leaves = [None if t is None else t.detach().double().requires_grad_() for t in inputs]
    x, q, g, pos, scale = leaves
    divisors = divisors_for(g.shape[-1], torch.float64)
    rows = x, pos, scale
    if lengths is not None:
        rows = zero_padding(torch.arange(x.shape[1]) < lengths[:, None], *rows)
    angles = code_angles(rows[1], TWO_PI, divisors)
    rounded = code_angles(rows[1].float(), TWO_PI, divisors.float()).double()
    angles = angles + (rounded - angles).detach()
    values, scores = attention_scores(rows[0], q, g, angles, rows[2], 1e-5)
    outputs = softmax_pool(values, scores, lengths)
    used = [t for t in leaves if t is not None]
    grads = iter(torch.autograd.grad(outputs, used, [t.double() for t in output_grads]))
    return [None if t is None else next(grads) for t in leaves]


def check_grads(grads, expected, dtypes, rtol):
    for name, got, want, dtype in zip(GRAD_NAMES, grads, expected, dtypes, strict=True):
        assert got.dtype == dtype, name
        assert max_rel_error(got, want) <= rtol, (name, max_rel_error(got, want))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
# N = 1; a block's tail; several tasks with a tail, the second template's end inside a task.
@pytest.mark.parametrize("n", [1, 129, 2049])
@pytest.mark.usefixtures("poisoned_outputs")
def test_cpp_backward_matches_reference(n, dtype):
    inputs = problem(2, n, 40, 24, 64, dtype)
    lengths = torch.tensor([n, min(n, n // 3 + 5)])
    grads, output_grads = cpp_backward(inputs, lengths)
    expected = truth_grads(inputs, output_grads, lengths)
    check_grads(grads, expected, [t.dtype for t in inputs], GRAD_RTOL[dtype])


# R off the panels, C off the strips, two channel pairs; the FaceCoresetNet widths without row
# scales.
@pytest.mark.parametrize(
    ("c", "r", "d", "scaled"), [(7, 5, 4, True), (33, 1, 6, True), (512, 24, 512, False)]
)
@pytest.mark.usefixtures("poisoned_outputs")
def test_cpp_backward_shapes(c, r, d, scaled):
    x, q, g, pos, scale = problem(2, 300, c, r, d, seed=c)
    inputs = [x, q, g, pos, scale if scaled else None]
    grads, output_grads = cpp_backward(inputs)
    expected = truth_grads(inputs, output_grads)
    for name, got, want in zip(GRAD_NAMES, grads, expected, strict=True):
        if want is not None:
            assert_rel_close(got, want, GRAD_RTOL[torch.float32])
        else:
            assert got.shape == (0,), name


# The power series of the forward (most pairs of these angles) in the backward too, and every
# pair exact.
@pytest.mark.parametrize("series", [False, True])
@pytest.mark.usefixtures("poisoned_outputs")
def test_cpp_backward_series(series):
    inputs = problem(1, 700, 16, 8, 512, positions=(0.0, 3.0))
    grads, output_grads = cpp_backward(inputs, series=series)
    check_grads(grads, truth_grads(inputs, output_grads), [torch.float32] * 5, 2e-5)


def test_cpp_backward_float64_gradcheck():
    """The C++ op's gradients (its backward kernel) against finite differences of its forward."""
    inputs = [t.double().requires_grad_() for t in problem(2, 7, 5, 3, 6, positions=(0.5, 3.0))]
    lengths = torch.tensor([7, 3])

    def op(x, q, g, pos, scale):
        return cpp(x, q, g, pos, divisors_for(6, torch.float64), TWO_PI, 1e-5, scale, lengths)

    assert torch.autograd.gradcheck(op, inputs)


@pytest.mark.usefixtures("poisoned_outputs")
def test_cpp_backward_padding_is_never_read():
    """NaN and Inf in the padding change no bit, and the padding rows' gradients are zeros."""
    inputs = problem(3, 2500, 24, 8, 32)
    lengths = torch.tensor([2500, 1, 1030])
    grads, _ = cpp_backward(inputs, lengths)
    x, _, _, pos, scale = inputs
    padded = torch.arange(2500) >= lengths[:, None]
    x[padded], pos[padded], scale[padded] = float("nan"), float("nan"), float("inf")
    poisoned, _ = cpp_backward(inputs, lengths)
    for a, b in zip(grads, poisoned, strict=True):
        assert torch.equal(a, b)
    for k in (0, 3, 4):
        assert not poisoned[k][padded].any()


def test_cpp_backward_mask_and_determinism():
    """Each gradient alone is the bits of all of them together, and the bits do not depend on
    the thread count."""
    inputs = problem(2, 9000, 32, 12, 16)
    with torch_threads(1):
        one, _ = cpp_backward(inputs, series=True)
    with torch_threads(2):
        two, _ = cpp_backward(inputs, series=True)
        for k in range(5):
            mask = [j == k for j in range(5)]
            alone, _ = cpp_backward(inputs, series=True, mask=mask)
            assert torch.equal(alone[k], two[k])
            assert all(alone[j].shape == (0,) for j in range(5) if j != k)
    for a, b in zip(one, two, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("ragged", [False, True])
def test_backward_opcheck(ragged):
    x, q, g, pos, scale = problem(2, 9, 5, 3, 4)
    lengths = torch.tensor([9, 2]) if ragged else None
    args = (x, q, g, pos, divisors_for(4), TWO_PI, 1e-5, scale if ragged else None, lengths, False)
    pooled, lse = cpp(*args)
    mask = [True, False, True, True, ragged]
    full = (torch.randn_like(pooled), torch.randn_like(lse), pooled, lse, *args, mask)
    torch.library.opcheck(torch.ops.fusedset.sinusoid_attention_pool_backward.default, full)


def test_cpp_backward_checks_its_arguments():
    args = (X, Q, G, P, divisors_for(6), 1.0, 1e-5, None, None, False)
    pooled, lse = cpp(*args)
    with pytest.raises(ValueError, match=r"sinusoid_attention_pool_backward: grad_pooled must "
                                         r"have shape \[2, 3, 8\], got \[2, 3, 7\]"):  # fmt: skip
        torch.ops.fusedset.sinusoid_attention_pool_backward.default(
            pooled[..., :7], lse, pooled, lse, *args, [True] * 5
        )
    with pytest.raises(RuntimeError, match=r"sinusoid_attention_pool_backward: logsumexp must "):
        torch.ops.fusedset.sinusoid_attention_pool_backward.default(
            pooled, lse, pooled, lse.long(), *args, [True] * 5
        )


# ---------------------------------------------------------------- autograd and torch integration


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_float64(device):
    x, q, g, pos, scale = (
        t.to(device=device, dtype=torch.float64).requires_grad_()
        for t in problem(2, 11, 6, 3, 6, positions=(0.5, 3.0))
    )
    lengths = torch.tensor([11, 4], device=device)

    def fn(*inputs):
        return sinusoid_attention_pool(*inputs[:4], row_scale=inputs[4], lengths=lengths,
                                       position_scale=TWO_PI)  # fmt: skip

    assert torch.autograd.gradcheck(fn, (x, q, g, pos, scale))


@pytest.mark.parametrize("needs", ["all", "queries only", "rows only"])
def test_backward_matches_reference_float32(needs):
    base = problem(2, 5000, 32, 8, 16)
    lengths = torch.tensor([5000, 4321])
    want = {
        "all": (True,) * 5,
        "queries only": (False, True, True, False, False),
        "rows only": (True, False, False, True, True),
    }[needs]
    grads = []
    for run in (sinusoid_attention_pool, reference.sinusoid_attention_pool):
        inputs = [t.clone().requires_grad_(w) for t, w in zip(base, want, strict=True)]
        if run is sinusoid_attention_pool:
            pooled, lse = run(*inputs[:4], row_scale=inputs[4], lengths=lengths,
                              position_scale=TWO_PI)  # fmt: skip
        else:
            pooled, lse = run(*inputs[:4], inputs[4], lengths, TWO_PI)
        weight = torch.randn(pooled.shape, generator=torch.Generator().manual_seed(3))
        loss = (pooled * weight).sum() + lse.square().sum()
        grads.append(torch.autograd.grad(loss, [t for t in inputs if t.requires_grad]))
    for got, expected in zip(*grads, strict=True):
        assert_rel_close(got, expected, 1e-4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("ragged", [False, True])
def test_opcheck(device, ragged):
    x, q, g, pos, scale = (t.to(device).requires_grad_() for t in problem(2, 9, 5, 3, 4))
    lengths = torch.tensor([9, 2], device=device) if ragged else None
    args = (x, q, g, pos, divisors_for(4, device=device), TWO_PI, 1e-5, scale, lengths, False)
    torch.library.opcheck(torch.ops.fusedset.sinusoid_attention_pool.default, args)


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    def fused(x, queries, code_queries, positions):
        pooled, lse = sinusoid_attention_pool(torch.tanh(x), queries, code_queries, positions,
                                              position_scale=TWO_PI)  # fmt: skip
        return pooled.square().sum() + lse.sum()

    inputs = [t.to(device).requires_grad_() for t in problem(2, 30, 8, 4, 6)[:4]]
    assert_compiled_matches_reference(fused, inputs, grad_rtol=1e-4)


def test_public_op_runs_the_kernel_and_the_switch_runs_the_reference(monkeypatch):
    calls = []
    monkeypatch.setattr(
        reference, "sinusoid_attention_pool", lambda *a: calls.append(a) or (torch.zeros(1),) * 2
    )
    x, q, g, pos, _ = problem(2, 5, 4, 3, 6)
    assert sinusoid_attention_pool(x, q, g, pos)[0].shape == (2, 3, 4)
    assert calls == []
    with fusedset.force_reference():
        sinusoid_attention_pool(x, q, g, pos, position_scale=2.0, temperature=100.0, eps=1e-3)
    assert len(calls) == 1
    assert calls[0][6:] == (2.0, 100.0, 1e-3)


X, Q, G, P = torch.randn(2, 5, 8), torch.randn(2, 3, 8), torch.randn(2, 3, 6), torch.rand(2, 5)


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "message"),
    [
        ((X[0], Q, G, P), {}, ValueError, "x must have 3 dimensions (B, N, C), got shape (5, 8)"),
        ((X.long(), Q, G, P), {}, TypeError,
         "x must have dtype float16, bfloat16, float32, float64, got torch.int64"),
        ((X[:, :0], Q, G, P[:, :0]), {}, ValueError,
         "x must have shape (B, N >= 1, C), got shape (2, 0, 8)"),
        ((X, Q[..., :7], G, P), {}, ValueError,
         "queries must have shape (2, R >= 1, 8) to match x (2, 5, 8), got shape (2, 3, 7)"),
        ((X, Q, G[..., :5], P), {}, ValueError,
         "position_queries must have shape (2, 3, D) with D even and >= 2 to match queries, "
         "got shape (2, 3, 5)"),
        ((X, Q, G, P[:, :4]), {}, ValueError, "positions must have shape (2, 5), got shape (2, 4)"),
        ((X, Q, G, [1.0]), {}, TypeError,
         "positions must be a torch.Tensor of shape (B, N), got list"),
        ((X, Q, G, P), {"row_scale": P[:1]}, ValueError,
         "row_scale must have shape (2, 5), got shape (1, 5)"),
        ((X, Q, G, P), {"lengths": torch.tensor([5, 0])}, ValueError,
         "lengths must lie in [1, N = 5] (a softmax needs at least one row), got [5, 0]"),
        ((X, Q, G, P), {"lengths": torch.tensor([5.0, 1.0])}, TypeError,
         "lengths must have dtype int16, int32, int64, got torch.float32"),
        ((X, Q, G, P.to("meta")), {}, ValueError, "positions is on meta, x on cpu"),
        ((X, Q, G, P), {"temperature": 0.0}, ValueError, "temperature must be positive, got 0.0"),
        ((X, Q, G, P), {"eps": -1.0}, ValueError, "eps must be positive, got -1.0"),
        ((X, Q, G, P), {"position_scale": math.inf}, ValueError,
         "position_scale must be finite, got inf"),
    ],
)  # fmt: skip
def test_bad_inputs_name_the_argument(args, kwargs, error, message):
    with pytest.raises(error) as info:
        sinusoid_attention_pool(*args, **kwargs)
    assert str(info.value) == f"sinusoid_attention_pool: {message}"


def test_cpp_checks_its_arguments_too():
    with pytest.raises(RuntimeError, match=r"sinusoid_attention_pool: positions must have shape"):
        cpp(X, Q, G, P[:, :4], divisors_for(6), 1.0, 1e-5, None, None)
    with pytest.raises(ValueError, match=r"lengths must lie in \[1, N = 5\]"):
        cpp(X, Q, G, P, divisors_for(6), 1.0, 1e-5, None, torch.tensor([5, 6]))


@pytest.mark.parametrize("mask", [(True,) * 5, (False, True, False, True, False)])
@pytest.mark.parametrize("ragged", [False, True])
def test_triton_folder_backward_kernel_matches_the_cpp_kernel(mask, ragged):
    """The CUDA kernel of sinusoid_attention_pool_backward (the eager chunked backward behind
    the op's schema, registered from the Triton folder), run on CPU tensors, against the C++
    kernel: same gradients, and the same empty tensors for the gradients not asked for."""
    sinusoid_attention_pool_backward = triton_kernels.sinusoid_attention_pool_backward

    x, q, g, pos, scale = problem(2, 37, 6, 5, 8)
    lengths = torch.tensor([37, 11]) if ragged else None
    args = (x, q, g, pos, divisors_for(8), TWO_PI, 1e-5, scale, lengths, False)
    pooled, lse = cpp(*args)
    generator = torch.Generator().manual_seed(3)
    grad_pooled = torch.randn(pooled.shape, generator=generator)
    grad_lse = torch.randn(lse.shape, generator=generator)
    expected = torch.ops.fusedset.sinusoid_attention_pool_backward.default(
        grad_pooled, grad_lse, pooled, lse, *args, list(mask)
    )
    got = sinusoid_attention_pool_backward(grad_pooled, grad_lse, pooled, lse, *args, list(mask))
    for name, a, e in zip(GRAD_NAMES, got, expected, strict=True):
        assert a.shape == e.shape, name
        if e.numel():
            assert_rel_close(a, e, 1e-4)
