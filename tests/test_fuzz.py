"""Property-based tests (hypothesis) of every public op on its CPU C++ kernel against the eager
reference: random shapes (0 and 1 wherever the op allows them), dtypes, layouts (strided,
transposed, expanded), lengths, k, gamma and scales; and bad inputs, which must raise a
ValueError or TypeError naming the op and the argument.

Hypothesis runs derandomized (the examples are a fixed function of the test) with
FUSEDSET_FUZZ_EXAMPLES examples per property (default 25); the module prints how many it
tried. The tensors of an example come from a torch.Generator seeded by a drawn integer.
"""

from __future__ import annotations

import collections
import math
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fusedset import reference
from fusedset.ops import (
    cluster_accumulate,
    cluster_accumulate_caface,
    quality_fps,
    quality_fps_select,
    sinusoid_attention_pool,
    style_pool,
)
from fusedset.ops.quality_fps import gather_rows
from fusedset.reference._sinusoid import frequency_divisors
from fusedset.reference.quality_fps import selection_weights
from fusedset.reference.sinusoid_attention_pool import (
    attention_scores,
    code_angles,
    softmax_pool,
    zero_padding,
)

from .helpers import RTOL

EXAMPLES = int(os.environ.get("FUSEDSET_FUZZ_EXAMPLES", "25"))
FUZZ = settings(
    max_examples=EXAMPLES,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
# The kernels accumulate in float32 (float64 for float64) from the inputs as given: against the
# float64 truth on the same inputs only the accumulation's rounding is left.
OUT_RTOL = {**RTOL, torch.float16: 1e-3, torch.bfloat16: 1e-3}
LAYOUTS = ("contiguous", "sliced", "transposed", "expanded_batch", "expanded_rows")

TRIED: collections.Counter[str] = collections.Counter()


@pytest.fixture(scope="module", autouse=True)
def _report_examples(request):
    yield
    plugins = request.config.pluginmanager
    reporter, capture = plugins.get_plugin("terminalreporter"), plugins.get_plugin("capturemanager")
    if reporter is not None and capture is not None and TRIED:
        counts = ", ".join(f"{name} {count}" for name, count in sorted(TRIED.items()))
        with capture.global_and_fixture_disabled():
            reporter.write_line(
                f"fuzz (FUSEDSET_FUZZ_EXAMPLES={EXAMPLES}) examples tried: {counts}"
            )


def make(generator, shape, dtype, layout="contiguous", scale=1.0, offset=0.0):
    """A ``dtype`` tensor of ``shape`` (normal values times ``scale`` plus ``offset``, which
    broadcast against the shape), laid out as ``layout`` says: last axis of stride 2, every axis
    reversed in memory, or axis 0 or 1 expanded from one slice (stride 0)."""
    shape = tuple(shape)
    base = list(shape)
    if layout == "expanded_batch":
        base[0] = min(base[0], 1)
    elif layout == "expanded_rows" and len(shape) > 1:
        base[1] = min(base[1], 1)
    elif layout == "sliced":
        base[-1] *= 2
    elif layout == "transposed":
        base = base[::-1]
    values = torch.randn(base, generator=generator, dtype=torch.float64)
    order = list(range(len(shape)))[::-1]
    if layout == "transposed":
        values = values.permute(order)
    values = (values * scale + offset).to(dtype)
    if layout == "transposed":
        return values.permute(order).contiguous().permute(order)
    if layout == "sliced":
        return values[..., ::2]
    if layout in ("expanded_batch", "expanded_rows"):
        return values.expand(shape)
    return values


def assert_close(actual, expected, rtol, floor=0.0):
    """Largest |actual - expected| within rtol of max(|expected|.max(), floor); NaNs coincide.
    The floor is the inputs' own scale, for outputs whose truth is (near) zero everywhere."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    a, e = actual.double(), expected.double()
    assert torch.equal(a.isnan(), e.isnan()), "NaNs differ"
    a, e = a[~e.isnan()], e[~e.isnan()]
    if e.numel() == 0:
        return
    err = (a - e).abs().max().item()
    bound = rtol * max(e.abs().max().item(), floor)
    assert err <= bound, f"error {err:.3e} > {bound:.3e}"


seeds = st.integers(0, 2**31 - 1)
dtypes = st.sampled_from(DTYPES)
layouts = st.sampled_from(LAYOUTS)


# ---------------------------------------------------------------- style_pool


@FUZZ
@given(
    shape=st.tuples(*(st.integers(0, 4),) * 2, st.integers(0, 9), st.integers(0, 9)),
    dtype=dtypes,
    layout=st.sampled_from((*LAYOUTS, "channels_last")),
    seed=seeds,
)
@pytest.mark.usefixtures("poisoned_outputs")
def test_style_pool(shape, dtype, layout, seed):
    TRIED["style_pool"] += 1
    g = torch.Generator().manual_seed(seed)
    offset = torch.empty(1, shape[1], 1, 1).uniform_(-2, 2, generator=g)
    x = make(g, shape, dtype, "contiguous" if layout == "channels_last" else layout, 1.5, offset)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_()
    out = style_pool(x)
    assert out.shape == (shape[0], shape[1], 2)
    assert out.dtype == dtype
    x64 = x.detach().double().requires_grad_()
    expected = reference.style_pool(x64)
    assert_close(out, expected, RTOL[dtype], floor=1.0)  # rounded to x's dtype
    if shape[2] * shape[3] > 1:  # a NaN std has a NaN gradient everywhere
        grad = torch.randn(out.shape, generator=g).to(dtype)
        (dx,) = torch.autograd.grad(out, x, grad)
        (ex,) = torch.autograd.grad(expected, x64, grad.double())
        assert dx.dtype == dtype
        assert_close(dx, ex, RTOL[dtype], floor=1.0)


# ---------------------------------------------------------------- cluster_accumulate


scales = st.one_of(st.none(), st.floats(-3, 3, allow_nan=False))


@FUZZ
@given(
    sizes=st.tuples(st.integers(0, 3), st.integers(0, 40), st.integers(0, 9), st.integers(1, 5)),
    width=st.integers(0, 7),
    shared=st.booleans(),
    dtype=dtypes,
    layouts=st.tuples(layouts, layouts, layouts),
    scale=scales,
    seed=seeds,
)
@pytest.mark.usefixtures("poisoned_outputs")
def test_cluster_accumulate(sizes, width, shared, dtype, layouts, scale, seed):
    TRIED["cluster_accumulate"] += 1
    b, n, d, m = sizes
    g = torch.Generator().manual_seed(seed)
    keys = make(g, (b, n, d), dtype, layouts[0])
    queries = make(g, (1 if shared else b, m, d), dtype, layouts[1])
    values = make(g, (b, n, width), dtype, layouts[2], offset=0.5)
    inputs = [t.requires_grad_() for t in (keys, queries, values)]
    num, den = cluster_accumulate(*inputs, scale)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert num.shape == (b, m, width)
    assert den.shape == (b, m)
    assert num.dtype == den.dtype == acc
    inputs64 = [t.detach().double().requires_grad_() for t in inputs]
    expected = reference.cluster_accumulate(*inputs64, scale)
    for got, want in zip((num, den), expected, strict=True):
        assert_close(got, want, OUT_RTOL[dtype], floor=1.0)
    weights = [torch.randn(t.shape, generator=g, dtype=acc) for t in (num, den)]
    grads = torch.autograd.grad((num, den), inputs, weights)
    truth = torch.autograd.grad(expected, inputs64, [w.double() for w in weights])
    for got, want in zip(grads, truth, strict=True):
        assert got.dtype == dtype
        assert_close(got, want, OUT_RTOL[dtype] * 10, floor=1.0)


@FUZZ
@given(
    sizes=st.tuples(st.integers(0, 3), st.integers(0, 40), st.integers(0, 9), st.integers(1, 5)),
    width=st.integers(0, 7),
    per_probe=st.booleans(),
    dtype=dtypes,
    layouts=st.tuples(layouts, layouts),
    scale=st.floats(-3, 3, allow_nan=False),
    seed=seeds,
)
@pytest.mark.usefixtures("poisoned_outputs")
def test_cluster_accumulate_caface(sizes, width, per_probe, dtype, layouts, scale, seed):
    TRIED["cluster_accumulate_caface"] += 1
    b, n, d, m = sizes
    g = torch.Generator().manual_seed(seed)
    tokens = make(g, (b, n, d), dtype, layouts[0])
    features = make(g, (b, n, width), dtype, layouts[1], scale=5.0)
    centers = make(g, (b, m, d) if per_probe else (m, d), dtype)
    bias = make(g, centers.shape[:-1], dtype)
    inputs = [t.requires_grad_() for t in (tokens, features, centers, bias)]
    outputs = cluster_accumulate_caface(*inputs, scale)
    inputs64 = [t.detach().double().requires_grad_() for t in inputs]
    expected = reference.cluster_accumulate_caface(*inputs64, scale)
    for got, want in zip(outputs, expected, strict=True):
        assert_close(got, want, OUT_RTOL[dtype], floor=1.0)
    weights = [torch.randn(t.shape, generator=g, dtype=t.dtype) for t in outputs]
    grads = torch.autograd.grad(outputs, inputs, weights)
    truth = torch.autograd.grad(expected, inputs64, [w.double() for w in weights])
    for got, want in zip(grads, truth, strict=True):
        assert got.dtype == dtype
        assert_close(got, want, OUT_RTOL[dtype] * 10, floor=1.0)


# ---------------------------------------------------------------- quality_fps


def assert_valid_selection(x, k, gamma, picks, lengths=None, row_scale=None, noise=None, scale=1.0):
    """The picks are what the contract allows (fusedset.ops.quality_fps), checked in float64
    with the kernel's own earlier picks: each step takes an available valid row whose score
    ``d_t * scale + g_t`` is the largest up to the kernel's rounding (a near-tie may go either
    way), zero-norm rows only after every other row in index order, -1 past the valid rows."""
    rows_all = x.double()
    if row_scale is not None:
        rows_all = rows_all * row_scale.double()[..., None]
    batch, n, _ = x.shape
    steps = min(k, n)
    assert picks.shape == (batch, steps)
    assert picks.dtype == torch.long
    for b in range(batch):
        valid = n if lengths is None else int(lengths[b])
        rows = rows_all[b, :valid]
        q = rows.norm(dim=-1)
        nonzero = q > 0
        half_qg = torch.where(nonzero, torch.where(nonzero, q, 1) ** gamma, 0) / 2
        unit = rows / torch.where(nonzero, q, 1)[:, None]
        g = torch.zeros(steps, valid, dtype=torch.float64)
        if noise is not None:
            g = noise[b, :, :valid].double()
        tol = 1e-4 * (abs(scale) * max(q.max().item(), half_qg.max().item()) + 1) if valid else 0
        d, available = q, torch.ones(valid, dtype=torch.bool)
        for t in range(steps):
            pick = int(picks[b, t])
            if t >= valid:
                assert pick == -1, (b, t, pick)
                continue
            assert 0 <= pick < valid, (b, t, pick)
            assert available[pick], (b, t, pick)
            live = available & nonzero
            if live.any():
                score = d * scale + g[t]
                assert live[pick], (b, t, pick)
                assert score[pick] >= score[live].max() - tol, (b, t, pick)
            else:
                assert pick == int(available.nonzero()[0]), (b, t, pick)
            available[pick] = False
            if nonzero[pick]:
                dist = half_qg * (1 - unit @ unit[pick]).clamp_min(0)
                d = dist if t == 0 else torch.minimum(d, dist)


def template(g, draw_sizes, dtype, layout, zero_rows, ragged):
    """(x, lengths): rows of norms in [0.5, 3] with some rows zeroed, and random valid
    lengths (0 to N) when ragged; padding holds NaN, which must never be read."""
    b, n, c = draw_sizes
    x = make(g, (b, n, c), dtype, layout)
    norms = torch.empty(b, n, 1).uniform_(0.5, 3, generator=g)
    x = (x.double() * norms / x.double().norm(dim=-1, keepdim=True).clamp_min(1e-6)).to(dtype)
    x = x.clone() if layout.startswith("expanded") else x
    x[torch.rand(b, n, generator=g) < zero_rows] = 0
    lengths = None
    if ragged:
        lengths = torch.randint(0, n + 1, (b,), generator=g)
        x[torch.arange(n) >= lengths[:, None]] = float("nan")
    return x, lengths


@FUZZ
@given(
    sizes=st.tuples(st.integers(0, 3), st.integers(0, 24), st.integers(0, 8)),
    k=st.integers(1, 6),
    gamma=st.floats(0, 2),
    dtype=dtypes,
    layout=layouts,
    zero_rows=st.sampled_from((0.0, 0.2)),
    ragged=st.booleans(),
    scaled=st.booleans(),
    seed=seeds,
)
@pytest.mark.usefixtures("poisoned_outputs")
def test_quality_fps(sizes, k, gamma, dtype, layout, zero_rows, ragged, scaled, seed):
    TRIED["quality_fps"] += 1
    g = torch.Generator().manual_seed(seed)
    x, lengths = template(g, sizes, dtype, layout, zero_rows, ragged)
    row_scale = None
    if scaled:
        row_scale = torch.empty(sizes[:2]).uniform_(0.2, 2, generator=g).to(dtype)
    picks = quality_fps(x, k, gamma, lengths, row_scale)
    assert_valid_selection(x, k, gamma, picks, lengths, row_scale)


@FUZZ
@given(
    sizes=st.tuples(st.integers(0, 3), st.integers(0, 16), st.integers(0, 6)),
    k=st.integers(1, 5),
    gamma=st.floats(0, 2),
    tau=st.floats(0.2, 2),
    scale=st.floats(0.1, 10),
    dtype=dtypes,
    layout=layouts,
    zero_rows=st.sampled_from((0.0, 0.2)),
    ragged=st.booleans(),
    seed=seeds,
)
@pytest.mark.usefixtures("poisoned_outputs")
def test_quality_fps_select(sizes, k, gamma, tau, scale, dtype, layout, zero_rows, ragged, seed):
    TRIED["quality_fps_select"] += 1
    g = torch.Generator().manual_seed(seed)
    x, lengths = template(g, sizes, dtype, layout, zero_rows, ragged)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    steps = min(k, sizes[1])
    noise = -torch.empty(sizes[0], steps, sizes[1], dtype=acc).exponential_(generator=g).log()
    gamma_t = torch.tensor(gamma, dtype=acc, requires_grad=True)
    x.requires_grad_()
    rows = quality_fps_select(x, k, gamma_t, tau, scale, noise, lengths=lengths)
    _, picks, _, _ = torch.ops.fusedset.quality_fps_select.default(
        x.detach(), k, gamma_t.detach(), tau, scale, noise, lengths
    )
    gamma = gamma_t.item()
    assert_valid_selection(x.detach(), k, gamma, picks, lengths, noise=noise, scale=scale)
    assert rows.dtype == dtype
    assert torch.equal(rows, gather_rows(x.detach(), picks))
    # The gradients follow the picks: compared where the reference picks the same rows.
    x64 = x.detach().double().requires_grad_()
    g64 = gamma_t.detach().double().requires_grad_()
    hard, _ = selection_weights(x64.detach(), k, gamma, tau, scale, noise.double(), lengths)
    if steps == 0 or sizes[0] == 0:
        return
    reference_picks = torch.where(hard.sum(-1) > 0, hard.argmax(-1), -1)
    if not torch.equal(reference_picks, picks):
        return
    grad = torch.randn(rows.shape, generator=g).to(dtype)
    dx, dgamma = torch.autograd.grad(rows, (x, gamma_t), grad, allow_unused=True)
    expected_rows = reference.quality_fps_select(x64, k, g64, tau, scale, noise.double(), lengths)
    ex, egamma = torch.autograd.grad(expected_rows, (x64, g64), grad.double(), allow_unused=True)
    assert_close(dx, ex, OUT_RTOL[dtype] * 10, floor=1.0)
    if egamma is not None:
        assert_close(dgamma, egamma, OUT_RTOL[dtype] * 10, floor=1.0)


# ---------------------------------------------------------------- sinusoid_attention_pool


def sinusoid_truth(x, queries, position_queries, positions, row_scale, lengths, options):
    """The reference in float64 on the same inputs, from the angles the kernels form (in x's
    accumulation dtype, as torch does in the released code)."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    divisors = frequency_divisors(position_queries.shape[-1], options["temperature"], acc)
    if lengths is not None:
        valid = torch.arange(x.shape[1]) < lengths[:, None]
        x, positions, row_scale = zero_padding(valid, x, positions, row_scale)
    angles = code_angles(positions.to(acc), options["position_scale"], divisors).double()
    values, scores = attention_scores(
        x.double(), queries.double(), position_queries.double(), angles,
        None if row_scale is None else row_scale.double(), options["eps"],
    )  # fmt: skip
    return softmax_pool(values, scores, lengths)


@FUZZ
@given(
    sizes=st.tuples(st.integers(0, 3), st.integers(1, 30), st.integers(0, 8), st.integers(1, 4)),
    # Codes narrower than 8 are left out: their mean can near sqrt(1/2) (every sin = cos), where
    # the C++ kernel's LayerNorm variance, 1/2 - mean^2 in float32, cancels (a known defect).
    half_code=st.integers(4, 8),
    dtype=dtypes,
    layouts=st.tuples(layouts, layouts),
    scaled=st.booleans(),
    ragged=st.booleans(),
    options=st.fixed_dictionaries(
        {
            "position_scale": st.sampled_from((1.0, 2 * math.pi, -0.5)),
            "temperature": st.sampled_from((10000.0, 100.0)),
            "eps": st.sampled_from((1e-5, 1e-3)),
        }
    ),
    seed=seeds,
)
@pytest.mark.usefixtures("poisoned_outputs")
def test_sinusoid_attention_pool(sizes, half_code, dtype, layouts, scaled, ragged, options, seed):
    TRIED["sinusoid_attention_pool"] += 1
    b, n, c, r = sizes
    g = torch.Generator().manual_seed(seed)
    x = make(g, (b, n, c), dtype, layouts[0])
    queries = make(g, (b, r, c), torch.float32, layouts[1], scale=2 / math.sqrt(max(c, 1)))
    position_queries = make(g, (b, r, 2 * half_code), torch.float32, scale=1.0)
    positions = torch.rand(b, n, generator=g, dtype=torch.float64).mul(40).to(dtype)
    row_scale = torch.rand(b, n, generator=g).add(0.5) if scaled else None
    lengths = torch.randint(1, n + 1, (b,), generator=g) if ragged else None
    inputs = [x, queries, position_queries, positions, row_scale]
    for t in inputs:
        if t is not None:
            t.requires_grad_()
    pooled, logsumexp = sinusoid_attention_pool(
        x, queries, position_queries, positions, row_scale=row_scale, lengths=lengths, **options
    )
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert pooled.shape == (b, r, c)
    assert logsumexp.shape == (b, r)
    assert pooled.dtype == logsumexp.dtype == acc
    inputs64 = [None if t is None else t.detach().double().requires_grad_() for t in inputs]
    expected = sinusoid_truth(*inputs64, lengths, options)
    assert_close(pooled, expected[0], OUT_RTOL[dtype], floor=1.0)
    assert_close(logsumexp, expected[1], OUT_RTOL[dtype], floor=1.0)
    wanted = [i for i, t in enumerate(inputs) if t is not None and t.requires_grad]
    weights = [torch.randn(t.shape, generator=g, dtype=acc) for t in (pooled, logsumexp)]
    grads = torch.autograd.grad((pooled, logsumexp), [inputs[i] for i in wanted], weights)
    truth = torch.autograd.grad(
        expected, [inputs64[i] for i in wanted], [w.double() for w in weights]
    )
    for got, want in zip(grads, truth, strict=True):
        # a float32 argument of float64 x has its gradient rounded to float32
        assert_close(got, want, max(OUT_RTOL[dtype], OUT_RTOL[got.dtype]) * 10, floor=1.0)


# ---------------------------------------------------------------- bad inputs


def valid_call(op, g, b, n, c, dtype):
    """Arguments of a small valid call of ``op``, by keyword, the tensor that sets the device
    first."""
    rows = make(g, (b, n, c), dtype)
    if op == "style_pool":
        return {"x": make(g, (b, c, n, 2), dtype)}
    if op == "cluster_accumulate":
        return {"keys": rows, "queries": make(g, (b, 3, c), dtype),
                "values": make(g, (b, n, 2), dtype), "scale": 0.5}  # fmt: skip
    if op == "cluster_accumulate_caface":
        return {"tokens": rows, "features": make(g, (b, n, 2), dtype),
                "centers": make(g, (3, c), dtype), "center_bias": make(g, (3,), dtype),
                "scale": 0.5}  # fmt: skip
    lengths = torch.full((b,), n)
    if op == "quality_fps":
        return {"x": rows, "k": 2, "gamma": 1.0, "lengths": lengths,
                "row_scale": torch.ones(b, n, dtype=dtype)}  # fmt: skip
    if op == "quality_fps_select":
        return {"x": rows, "k": 2, "gamma": 1.0, "tau": 1.0, "scale": 1.0,
                "noise": torch.zeros(b, min(2, n), n), "lengths": lengths}  # fmt: skip
    return {"x": rows, "queries": make(g, (b, 2, c), dtype),
            "position_queries": make(g, (b, 2, 4), dtype), "positions": torch.rand(b, n),
            "row_scale": torch.ones(b, n), "lengths": lengths, "position_scale": 1.0,
            "temperature": 100.0, "eps": 1e-5}  # fmt: skip


OPS = {
    "style_pool": style_pool,
    "cluster_accumulate": cluster_accumulate,
    "cluster_accumulate_caface": cluster_accumulate_caface,
    "quality_fps": quality_fps,
    "quality_fps_select": quality_fps_select,
    "sinusoid_attention_pool": sinusoid_attention_pool,
}
# The axis of each tensor argument whose size must match another argument's.
MATCHED_AXIS = {
    ("cluster_accumulate", "queries"): 2,
    ("cluster_accumulate", "values"): 1,
    ("cluster_accumulate_caface", "features"): 1,
    ("cluster_accumulate_caface", "centers"): 1,
    ("cluster_accumulate_caface", "center_bias"): 0,
    ("quality_fps", "lengths"): 0,
    ("quality_fps", "row_scale"): 1,
    ("quality_fps_select", "noise"): 2,
    ("quality_fps_select", "lengths"): 0,
    ("sinusoid_attention_pool", "queries"): 2,
    ("sinusoid_attention_pool", "position_queries"): 1,
    ("sinusoid_attention_pool", "positions"): 1,
    ("sinusoid_attention_pool", "row_scale"): 1,
    ("sinusoid_attention_pool", "lengths"): 0,
}
NOT_A_NUMBER = (float("nan"), float("inf"), "0.5", True, None, [1.0], torch.tensor(0.5))
# Bad values of the number arguments.
BAD_NUMBERS = {
    "scale": NOT_A_NUMBER,
    "k": (0, -1, 2.0, "2", True, None),
    "gamma": (float("nan"), -float("inf"), "1", None, [1.0], torch.ones(2), torch.ones(1).long()),
    "tau": (0.0, -1.0, *NOT_A_NUMBER),
    "position_scale": NOT_A_NUMBER,
    "temperature": (0.0, -1.0, *NOT_A_NUMBER),
    "eps": (0.0, -1e-5, *NOT_A_NUMBER),
}


def tensor_corruptions(op, name, value, n, first):
    """(what is wrong, bad value) pairs for the tensor argument ``name`` of ``op``; ``first``
    names the argument that sets the device."""
    integer = not value.is_floating_point()
    yield "a list", value.tolist()
    yield "a string", "x"
    yield "two more axes", value[None, None]
    yield "a wrong dtype", value.float() if integer else value.long()
    yield "a bool dtype", value.bool()
    if name != first:
        yield "on meta", value.to("meta")
    axis = MATCHED_AXIS.get((op, name))
    if axis is not None:
        shape = list(value.shape)
        shape[axis] += 1
        yield "a mismatched size", value.new_ones(shape)
    if name == "lengths":
        low = 1 if op == "sinusoid_attention_pool" else 0
        yield "a length past N", torch.full_like(value, n + 1)
        yield "a length below the minimum", torch.full_like(value, low - 1)
    if op == "quality_fps" and name == "x":
        bad = value.clone()
        bad[-1, -1, -1] = float("nan")
        yield "a NaN in a valid row", bad


@FUZZ
@given(
    op=st.sampled_from(sorted(OPS)),
    sizes=st.tuples(st.integers(1, 3), st.integers(1, 6), st.integers(1, 4)),
    dtype=dtypes,
    data=st.data(),
)
def test_bad_inputs_raise_naming_the_argument(op, sizes, dtype, data):
    TRIED["bad inputs"] += 1
    b, n, c = sizes
    kwargs = valid_call(op, torch.Generator().manual_seed(0), b, n, c, dtype)
    OPS[op](**kwargs)  # valid before one argument is spoiled
    first = next(iter(kwargs))
    cases = []
    for name, value in kwargs.items():
        if isinstance(value, torch.Tensor):
            corruptions = tensor_corruptions(op, name, value, n, first)
            cases += [(name, label, bad) for label, bad in corruptions]
        else:
            optional = op == "cluster_accumulate" and name == "scale"  # None: the default
            bads = [bad for bad in BAD_NUMBERS[name] if not (optional and bad is None)]
            cases += [(name, repr(bad), bad) for bad in bads]
    name, _, bad = data.draw(st.sampled_from(cases), label="argument, what is wrong, value")
    with pytest.raises((ValueError, TypeError)) as info:
        OPS[op](**{**kwargs, name: bad})
    message = str(info.value)
    assert message.startswith(f"{op}: "), message
    assert name in message.split(":", 1)[1], message


# ---------------------------------------------------------------- issue 14, items 9 and 11


def device_cases():
    """(op, argument) for every tensor argument but the one that sets the device, and gamma."""
    for op in sorted(OPS):
        kwargs = valid_call(op, torch.Generator().manual_seed(0), 2, 5, 3, torch.float32)
        tensors = [name for name, value in kwargs.items() if isinstance(value, torch.Tensor)]
        yield from ((op, name) for name in tensors[1:])
        if "gamma" in kwargs:
            yield op, "gamma"


@pytest.mark.parametrize(("op", "name"), list(device_cases()))
def test_every_tensor_argument_on_another_device_is_named(op, name):
    kwargs = valid_call(op, torch.Generator().manual_seed(0), 2, 5, 3, torch.float32)
    value = torch.tensor(1.0) if name == "gamma" else kwargs[name]
    first = next(iter(kwargs))
    with pytest.raises(ValueError, match=" is on ") as info:
        OPS[op](**{**kwargs, name: value.to("meta")})
    assert str(info.value) == f"{op}: {name} is on meta, {first} on cpu"


@pytest.mark.parametrize("op", ["cluster_accumulate", "cluster_accumulate_caface"])
@pytest.mark.parametrize(
    ("scale", "error", "message"),
    [
        (float("nan"), ValueError, "scale must be finite, got nan"),
        (float("inf"), ValueError, "scale must be finite, got inf"),
        (-float("inf"), ValueError, "scale must be finite, got -inf"),
        ("0.5", TypeError, "scale must be a real number, got str"),
        (True, TypeError, "scale must be a real number, got bool"),
        (torch.tensor(0.5), TypeError, "scale must be a real number, got Tensor"),
    ],
)
def test_cluster_scale_must_be_a_finite_number(op, scale, error, message):
    kwargs = valid_call(op, torch.Generator().manual_seed(0), 2, 5, 3, torch.float32)
    with pytest.raises(error) as info:
        OPS[op](**{**kwargs, "scale": scale})
    assert str(info.value) == f"{op}: {message}"


@pytest.mark.usefixtures("poisoned_outputs")
def test_cluster_default_scale_at_zero_width_is_an_even_assignment():
    """D = 0: every logit is an empty dot product, 0 whatever the scale; the default scale is
    then 1 (not 0 ** -0.5), and each image spreads its unit of weight evenly over the centers."""
    g = torch.Generator().manual_seed(0)
    keys, queries = torch.empty(2, 7, 0), torch.empty(1, 3, 0)
    values = make(g, (2, 7, 4), torch.float32)
    num, den = cluster_accumulate(keys, queries, values)
    torch.testing.assert_close(den, torch.full((2, 3), 7 / 3))
    torch.testing.assert_close(num, values.sum(1, keepdim=True).expand(2, 3, 4) / 3)
    assert reference.default_scale(0) == 1.0
    expected = reference.cluster_accumulate(keys, queries, values)
    for got, want in zip((num, den), expected, strict=True):
        torch.testing.assert_close(got, want)
