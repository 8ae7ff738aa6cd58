import pytest
import torch

import fusedset
from fusedset import reference
from fusedset.ops import cluster_accumulate, cluster_accumulate_caface

from .helpers import (
    DEVICES,
    RTOL,
    TRITON_DEVICE,
    assert_compiled_matches_reference,
    assert_rel_close,
    run_on,
    torch_threads,
    triton_kernels_or_none,
)

# None without triton: then only the test_triton_* tests skip.
triton_kernels = triton_kernels_or_none("cluster_accumulate")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# The kernels accumulate in float32 from inputs rounded to the dtype: against the float64
# truth on the same rounded inputs they stay far inside the 1e-2.
OUT_RTOL = {**RTOL, torch.float16: 1e-3, torch.bfloat16: 1e-3}


def cpp(*args):
    """The C++ kernel itself, never the reference (nor, for CUDA tensors, the Triton kernel)."""
    return run_on("cpu", torch.ops.fusedset.cluster_accumulate.default, *args)


def cpp_backward(*args):
    return run_on("cpu", torch.ops.fusedset.cluster_accumulate_backward.default, *args)


def problem(b, n, d, m, c, dtype=torch.float32, shared=False, device="cpu", sharp=1.0):
    keys = (torch.randn(b, n, d) * sharp).to(device=device, dtype=dtype)
    queries = torch.randn(1 if shared else b, m, d).to(device=device, dtype=dtype)
    values = (torch.randn(b, n, c) + 0.5).to(device=device, dtype=dtype)
    return keys, queries, values


def truth(keys, queries, values, scale):
    return reference.cluster_accumulate(keys.double(), queries.double(), values.double(), scale)


def check_forward(out, keys, queries, values, scale, dtype):
    num, den, key_num = out
    expected_num, expected_den = truth(keys, queries, values, scale)
    assert num.dtype == den.dtype == torch.float32
    assert key_num.shape == (*den.shape, 0)
    assert_rel_close(num, expected_num, OUT_RTOL[dtype])
    assert_rel_close(den, expected_den, OUT_RTOL[dtype])


# ---------------------------------------------------------------- C++ forward


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 4, 8, 64])
@pytest.mark.parametrize("n", [1, 2, 255, 256, 257, 4097])
@pytest.mark.usefixtures("poisoned_outputs")
def test_cpp_forward_matches_reference(n, m, dtype, shared):
    keys, queries, values = problem(2, n, 24, m, 40, dtype, shared)
    scale = 24**-0.5
    check_forward(cpp(keys, queries, values, scale), keys, queries, values, scale, dtype)


@pytest.mark.usefixtures("poisoned_outputs")
def test_cpp_forward_100k_images():
    keys, queries, values = problem(1, 100_000, 32, 4, 64, sharp=3.0)
    check_forward(cpp(keys, queries, values, 0.2), keys, queries, values, 0.2, torch.float32)


@pytest.mark.parametrize("d", [1, 128, 256])
@pytest.mark.parametrize("c", [1, 512, 1024])
def test_cpp_forward_wide(d, c):
    keys, queries, values = problem(2, 70, d, 4, c)
    check_forward(
        cpp(keys, queries, values, d**-0.5), keys, queries, values, d**-0.5, torch.float32
    )


def test_cpp_is_bitwise_deterministic_across_thread_counts():
    keys, queries, values = problem(2, 9000, 32, 4, 48)
    with torch_threads(1):
        one = cpp(keys, queries, values, 0.3)
    with torch_threads(max(2, torch.get_num_threads())):
        many = cpp(keys, queries, values, 0.3)
    for a, b in zip(one, many, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("shape", [(0, 5, 4, 3, 6), (2, 0, 4, 3, 6)])
def test_empty_inputs(shape):
    b, n, d, m, c = shape
    keys, queries, values = problem(b, n, d, m, c)
    queries = queries[:1] if b == 0 else queries
    num, den = cluster_accumulate(keys.requires_grad_(), queries, values)
    assert num.shape == (b, m, c)
    assert den.shape == (b, m)
    assert not num.any()
    assert not den.any()
    (num.sum() + den.sum()).backward()
    assert keys.grad.shape == keys.shape


def test_noncontiguous_inputs():
    keys, queries, values = problem(3, 50, 8, 4, 12)
    keys_t = keys.transpose(0, 1).contiguous().transpose(0, 1)
    values_s = torch.randn(3, 50, 24)[..., ::2]
    queries_e = queries[:1].expand(3, -1, -1)
    assert not keys_t.is_contiguous()
    assert not values_s.is_contiguous()
    for k, q, v in [(keys_t, queries, values), (keys, queries_e, values_s)]:
        check_forward(cpp(k, q, v, 0.5), k, q, v, 0.5, torch.float32)
        num, den = cluster_accumulate(k.requires_grad_(), q, v.requires_grad_(), 0.5)
        (num.square().sum() + den.sum()).backward()
        k64, v64 = k.detach().double().requires_grad_(), v.detach().double().requires_grad_()
        n64, d64 = reference.cluster_accumulate(k64, q.double(), v64, 0.5)
        (n64.square().sum() + d64.sum()).backward()
        assert_rel_close(k.grad, k64.grad, 1e-5)
        assert_rel_close(v.grad, v64.grad, 1e-5)


# ---------------------------------------------------------------- backward


def grads_of(fn, tensors, weights):
    outs = fn(*tensors)
    loss = sum((o * w).sum() for o, w in zip(outs, weights, strict=True))
    return torch.autograd.grad(loss, tensors, allow_unused=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shared", [False, True])
def test_gradcheck_float64(shared, device):
    tensors = [t.requires_grad_() for t in problem(2, 7, 3, 3, 5, torch.float64, shared, device)]
    assert torch.autograd.gradcheck(lambda k, q, v: cluster_accumulate(k, q, v, 0.7), tensors)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("per_probe_centers", [False, True])
def test_gradcheck_float64_caface_form(per_probe_centers, device):
    tokens, centers, features = problem(2, 6, 4, 3, 5, torch.float64, False, device)
    if not per_probe_centers:
        centers = centers[0]
    bias = torch.randn(centers.shape[:-1], dtype=torch.float64, device=device)
    tensors = [t.requires_grad_() for t in (tokens, features, centers, bias)]
    assert torch.autograd.gradcheck(lambda *a: cluster_accumulate_caface(*a, 0.6), tensors)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shared", [False, True])
def test_backward_matches_eager_on_large_shapes(shared, dtype):
    keys, queries, values = problem(2, 4097, 64, 4, 96, dtype, shared)
    weights = (torch.randn(2, 4, 96), torch.randn(2, 4))
    tensors = [t.requires_grad_() for t in (keys, queries, values)]
    got = grads_of(lambda *a: cluster_accumulate(*a, 0.1), tensors, weights)
    t64 = [t.detach().double().requires_grad_() for t in tensors]
    expected = grads_of(
        lambda *a: reference.cluster_accumulate(*a, 0.1), t64, [w.double() for w in weights]
    )
    for g, e in zip(got, expected, strict=True):
        assert g.dtype == dtype
        assert_rel_close(g, e, 1e-5 if dtype == torch.float32 else 1e-2)


# ---------------------------------------------------------------- the CAFace form


def caface_problem(b, n, d, m, c, dtype=torch.float32, per_probe=False):
    tokens = torch.randn(b, n, d).to(dtype)
    features = (torch.randn(b, n, c) * torch.rand(b, n, 1) * 20).to(dtype)
    centers = torch.randn(b if per_probe else 1, m, d).to(dtype)
    bias = torch.randn(centers.shape[:2]).to(dtype)
    return tokens, features, centers, bias


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 257, 4097])
@pytest.mark.usefixtures("poisoned_outputs")
def test_caface_form_equals_plain_form(n, dtype):
    """One pass with normalized features, tokens as a second stream and folded bias equals the
    plain op on [tokens, 1] keys, [centers, bias] queries and [F_hat, tokens] values."""
    tokens, features, centers, bias = caface_problem(2, n, 16, 4, 40, dtype)
    scale = 128**-0.5
    num, den, token_num = cpp(tokens, centers, features, scale, bias, True, True)
    keys = torch.cat([tokens.double(), torch.ones(2, n, 1, dtype=torch.float64)], -1)
    queries = torch.cat([centers.double(), bias.double().unsqueeze(-1)], -1)
    f = features.double()
    unit = f / (f.norm(dim=-1, keepdim=True) + 1e-5)
    e_num, e_den = truth(keys, queries, torch.cat([unit, tokens.double()], -1), scale)
    assert_rel_close(num, e_num[..., :40], OUT_RTOL[dtype])
    assert_rel_close(token_num, e_num[..., 40:], OUT_RTOL[dtype])
    assert_rel_close(den, e_den, OUT_RTOL[dtype])


def test_caface_public_op_shapes_and_reference():
    tokens, features, centers, bias = caface_problem(3, 20, 8, 4, 12)
    got = cluster_accumulate_caface(tokens, features, centers[0], bias[0], 0.3)
    expected = reference.cluster_accumulate_caface(tokens, features, centers[0], bias[0], 0.3)
    assert [t.shape for t in got] == [(3, 4, 12), (3, 4, 8), (3, 4)]
    for g, e in zip(got, expected, strict=True):
        assert_rel_close(g, e, 1e-5)


# ---------------------------------------------------------------- Triton (interpreted on CPU)

# The Triton dots run in ieee fp32 on the upcast inputs: the fp32 outputs of fp16 and bf16
# inputs meet the float64 truth on the same rounded inputs as closely as fp32 ones do (a tf32
# dot would be off by about 1e-3). Gradients come back in the input dtype, off by its rounding.
TRITON_RTOL = {torch.float32: 1e-5, torch.float16: 1e-5, torch.bfloat16: 1e-5}
TRITON_GRAD_RTOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def triton_problem(b, n, d, m, c, dtype, shared, seed=0):
    """Keys, queries, values with row norms spread over two orders of magnitude, and a bias."""
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(b, n, d, generator=g)
    queries = torch.randn(1 if shared else b, m, d, generator=g)
    values = torch.randn(b, n, c, generator=g) * (torch.rand(b, n, 1, generator=g) * 20 + 0.2)
    bias = torch.randn(queries.shape[:2], generator=g)
    return [t.to(device=TRITON_DEVICE, dtype=dtype) for t in (keys, queries, values, bias)]


def reference_outputs(keys, queries, values, bias, scale, caface):
    """(num, den, key_num) of the eager reference, as the Triton launcher returns them."""
    if caface:
        num, key_num, den = reference.cluster_accumulate_caface(keys, values, queries, bias, scale)
        return num, den, key_num
    num, den = reference.cluster_accumulate(keys, queries, values, scale)
    return num, den, num.new_zeros((*den.shape, 0))


def reference_gradients(grads, keys, queries, values, bias, scale, caface):
    """Gradients of sum(output * grad) in (keys, queries, values, bias), in float64."""
    inputs = [t.detach().double().requires_grad_() for t in (keys, queries, values, bias)]
    outputs = reference_outputs(*inputs, scale, caface)
    loss = sum((o * g.double()).sum() for o, g in zip(outputs, grads, strict=True))
    return torch.autograd.grad(loss, inputs, allow_unused=True)


def run_both_passes(b, n, d, m, c, dtype, shared, caface, scale=0.3):
    """Inputs (the bias too, used by the CAFace form only), outputs, output gradients and
    input gradients of the launchers."""
    keys, queries, values, bias = triton_problem(b, n, d, m, c, dtype, shared)
    used = bias if caface else None
    out = triton_kernels.forward(keys, queries, values, scale, used, caface, caface)
    g = torch.Generator().manual_seed(1)
    grads = [torch.randn(o.shape, generator=g).to(o) for o in out]
    back = triton_kernels.backward(*grads, keys, queries, values, scale, used, caface, caface)
    return (keys, queries, values, bias), out, grads, back


@pytest.mark.parametrize("caface", [False, True], ids=["plain", "caface"])
@pytest.mark.parametrize(
    ("b", "n", "d", "m", "c", "dtype", "shared"),
    [
        (2, 1, 24, 1, 40, torch.float32, False),  # N = 1, M = 1
        (2, 130, 33, 4, 41, torch.float16, True),  # two splits with tails, odd D and C
        (1, 17, 128, 16, 512, torch.bfloat16, False),  # the full-width path at its limits
        (1, 150, 17, 17, 23, torch.float32, True),  # M = 17: column blocks
        (1, 12, 136, 5, 520, torch.float32, False),  # D > 128, C > 512: column blocks
        (1, 20, 40, 64, 72, torch.float16, False),  # M = 64
    ],
)
@pytest.mark.usefixtures("poisoned_outputs")
@pytest.mark.cuda
def test_triton_matches_reference(b, n, d, m, c, dtype, shared, caface):
    """Forward and backward of both forms against the float64 reference on the same inputs."""
    inputs, out, grads, back = run_both_passes(b, n, d, m, c, dtype, shared, caface)
    expected = reference_outputs(*(t.double() for t in inputs), 0.3, caface)
    for got, want in zip(out, expected, strict=True):
        assert got.dtype == torch.float32
        assert got.shape == want.shape
        assert_rel_close(got, want, TRITON_RTOL[dtype])
    expected_grads = reference_gradients(grads, *inputs, 0.3, caface)
    for got, want, t in zip(back[:3], expected_grads[:3], inputs[:3], strict=True):
        assert got.dtype == t.dtype
        assert got.shape == t.shape
        assert_rel_close(got, want, TRITON_GRAD_RTOL[dtype])
    if caface:
        assert_rel_close(back[3], expected_grads[3], TRITON_GRAD_RTOL[dtype])
    else:
        assert back[3].numel() == 0


@pytest.mark.parametrize("caface", [False, True], ids=["plain", "caface"])
@pytest.mark.usefixtures("poisoned_outputs")
@pytest.mark.cuda
def test_triton_float64_matches_cpp(caface):
    keys, queries, values, bias = triton_problem(2, 130, 16, 4, 72, torch.float64, caface)
    bias = bias if caface else None
    args = (keys, queries, values, 0.3, bias, caface, caface)
    out = triton_kernels.forward(*args)
    for got, want in zip(out, cpp(*args), strict=True):
        assert_rel_close(got, want, 1e-12)
    grads = [torch.randn(o.shape, dtype=torch.float64).to(o) for o in out]
    for got, want in zip(triton_kernels.backward(*grads, *args), cpp_backward(*grads, *args),
                         strict=True):  # fmt: skip
        assert got.shape == want.shape
        if want.numel():
            assert_rel_close(got, want, 1e-12)


@pytest.mark.usefixtures("poisoned_outputs")
@pytest.mark.cuda
def test_triton_widest_shapes():
    """M = 64, D = 256, C = 1024, the issue's limits, forward (the backward's column blocks are
    the same loops, run by the cases above)."""
    keys, queries, values, _ = triton_problem(1, 9, 256, 64, 1024, torch.float32, True)
    out = triton_kernels.forward(keys, queries, values, 0.06)
    for got, want in zip(out, cpp(keys, queries, values, 0.06), strict=True):
        assert_rel_close(got, want, 1e-5)


@pytest.mark.usefixtures("poisoned_outputs")
@pytest.mark.cuda
def test_triton_is_bitwise_deterministic():
    """Several splits per probe and queries shared by three probes: the partials are added in
    the same order on every run."""
    first = run_both_passes(3, 250, 8, 4, 12, torch.float32, True, True)
    second = run_both_passes(3, 250, 8, 4, 12, torch.float32, True, True)
    for a, b in zip((*first[1], *first[3]), (*second[1], *second[3]), strict=True):
        assert torch.equal(a, b)


@pytest.mark.cuda
def test_triton_rejects_too_many_centers():
    keys, queries, values, _ = triton_problem(1, 4, 8, 65, 4, torch.float32, False)
    with pytest.raises(ValueError, match=r"M <= 64 centers, got M = 65"):
        triton_kernels.forward(keys, queries, values, 0.3)
    with pytest.raises(ValueError, match=r"M <= 64 centers, got M = 65"):
        triton_kernels.forward_plan(1, 4, 8, 4, 65, 0, torch.float32, False)


def recorded_launches(thunk):
    """(kernel name, grid, keyword arguments) of every Triton launch thunk makes."""
    from triton.runtime import interpreter

    launches = []
    original = interpreter.GridExecutor.__call__

    def record(self, *args, **kwargs):
        grid = tuple(self.grid) + (1,) * (3 - len(self.grid))
        launches.append((self.fn.__name__, grid, kwargs))
        return original(self, *args, **kwargs)

    interpreter.GridExecutor.__call__ = record
    try:
        thunk()
    finally:
        interpreter.GridExecutor.__call__ = original
    return launches


def registered_variant(kernel, label):
    from fusedset.triton_kernels import REGISTRY

    entry = next(k for k in REGISTRY if k.name == kernel)
    return next(v for v in entry.variants if v.label == label)


@pytest.mark.skipif(TRITON_DEVICE != "cpu", reason="records the interpreter's launches")
@pytest.mark.parametrize(
    ("b", "n", "d", "m", "c", "dtype", "shared", "caface"),
    [
        (1, 1, 24, 4, 40, torch.float32, True, False),
        (3, 130, 33, 16, 41, torch.bfloat16, True, True),
        (2, 130, 16, 4, 72, torch.float16, False, True),
        (2, 90, 17, 17, 23, torch.float32, False, False),
        (1, 60, 8, 4, 12, torch.float64, True, True),
    ],
)
@pytest.mark.cuda
def test_triton_launchers_launch_their_plans(b, n, d, m, c, dtype, shared, caface):
    """The grids, kernels and constexprs the launchers run are the plan's, launch by launch."""
    kd = d if caface else 0
    inputs = {}

    def both():
        inputs["run"] = run_both_passes(b, n, d, m, c, dtype, shared, caface)

    launches = recorded_launches(both)
    planned = triton_kernels.forward_plan(b, n, d, c, m, kd, dtype, caface)
    planned += triton_kernels.backward_plan(b, n, d, c, m, kd, dtype, caface)
    assert [(name, grid) for name, grid, _ in launches] == [
        (p.kernel, p.grid + (1,) * (3 - len(p.grid))) for p in planned
    ]
    for (_, _, kwargs), p in zip(launches, planned, strict=True):
        variant = registered_variant(p.kernel, p.variant)
        assert {k: kwargs[k] for k in variant.constexprs} == dict(variant.constexprs)
        assert {k: kwargs[k] for k in variant.options} == dict(variant.options)


@pytest.mark.cuda
def test_triton_plans_fill_the_gpu_and_name_registered_variants():
    """Pure plans: every launch a registered kernel and variant with a one-dimensional grid
    (probes folded into axis 0, so B past 65535 launches); from N = 16384 at B = 1 at least one
    program per H100 SM in both passes and forms."""
    plans = (triton_kernels.forward_plan, triton_kernels.backward_plan)
    for b, n, d, c, m, dtype in [
        (1, 16384, 128, 512, 4, torch.float32),
        (1, 65536, 128, 512, 16, torch.float16),
        (1, 1_048_576, 128, 512, 4, torch.bfloat16),
        (32, 65536, 128, 512, 4, torch.float32),
        (70_000, 3, 128, 512, 4, torch.float32),
        (1, 5_000_000, 256, 1024, 64, torch.float32),
        (2, 16384, 64, 48, 17, torch.float64),
    ]:
        for caface in (False, True):
            kd = d if caface else 0
            for plan in plans:
                launches = plan(b, n, d, c, m, kd, dtype, caface)
                for launch in launches:
                    registered_variant(launch.kernel, launch.variant)
                    assert len(launch.grid) == 1
                if b == 1 and n >= 16384:
                    assert launches[0].grid[0] >= 132
    assert triton_kernels.forward_plan(0, 10, 8, 8, 4, 0, torch.float32, False) == []


# ---------------------------------------------------------------- torch integration


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("caface", [False, True])
def test_opcheck(caface, device):
    keys, queries, values = (
        t.requires_grad_() for t in problem(2, 9, 4, 3, 5, torch.float32, caface, device)
    )
    bias = torch.randn(queries.shape[:2], device=device) if caface else None
    args = (keys, queries, values, 0.4, bias, caface, caface)
    torch.library.opcheck(torch.ops.fusedset.cluster_accumulate.default, args)
    grads = (
        torch.randn(2, 3, 5, device=device),
        torch.randn(2, 3, device=device),
        torch.randn(2, 3, 4 if caface else 0, device=device),
    )
    detached = tuple(t.detach() for t in (keys, queries, values))
    torch.library.opcheck(
        torch.ops.fusedset.cluster_accumulate_backward.default,
        (*grads, *detached, 0.4, bias, caface, caface),
    )


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    def fused(keys, queries, values, tokens, features, centers, bias):
        num, den = cluster_accumulate(torch.tanh(keys), queries, values)
        f_num, t_num, t_den = cluster_accumulate_caface(tokens, features, centers, bias, 0.25)
        return (
            (num / den.unsqueeze(-1)).square().sum()
            + (f_num / t_den.unsqueeze(-1)).sum()
            + (t_num.sum())
        )

    def make():
        return [
            *problem(2, 30, 8, 4, 6, device=device),
            *caface_problem(2, 30, 8, 4, 12),
        ]

    inputs = [t.to(device).requires_grad_() for t in make()]
    inputs[5] = inputs[5].detach()[0].requires_grad_()
    inputs[6] = inputs[6].detach()[0].requires_grad_()
    assert_compiled_matches_reference(fused, inputs, grad_rtol=1e-4)


def test_public_op_runs_the_kernel_and_the_switch_runs_the_reference(monkeypatch):
    calls = []
    monkeypatch.setattr(
        reference, "cluster_accumulate", lambda *a: calls.append(a) or (torch.zeros(1),) * 2
    )
    keys, queries, values = problem(2, 5, 4, 3, 6)
    assert cluster_accumulate(keys, queries, values)[0].shape == (2, 3, 6)
    assert calls == []
    with fusedset.force_reference():
        cluster_accumulate(keys, queries, values)
    assert len(calls) == 1
    assert calls[0][3] == 4**-0.5


K, Q, V = torch.randn(2, 5, 8), torch.randn(2, 3, 8), torch.randn(2, 5, 6)
QUERIES = "queries must have shape (1 or 2, M >= 1, 8) to match keys (2, 5, 8), got shape"
FLOATS = "float16, bfloat16, float32, float64"


@pytest.mark.parametrize(
    ("args", "error", "message"),
    [
        ((K[0], Q, V), ValueError, "keys must have 3 dimensions (B, N, D), got shape (5, 8)"),
        ((K, [1.0], V), TypeError, "queries must be a torch.Tensor of shape (B, M, D), got list"),
        ((K.long(), Q, V), TypeError, f"keys must have dtype {FLOATS}, got torch.int64"),
        ((K, Q[..., :7], V), ValueError, f"{QUERIES} (2, 3, 7)"),
        ((K, torch.randn(3, 3, 8), V), ValueError, f"{QUERIES} (3, 3, 8)"),
        ((K, Q[:, :0], V), ValueError, f"{QUERIES} (2, 0, 8)"),
        (
            (K, Q, V[:, :4]),
            ValueError,
            "values must have shape (2, 5, C) to match keys (2, 5, 8), got shape (2, 4, 6)",
        ),
        ((K, Q.half(), V), TypeError, "queries has dtype torch.float16, keys has torch.float32"),
        ((K, Q, V.double()), TypeError, "values has dtype torch.float64, keys has torch.float32"),
        ((K, Q, V.to("meta")), ValueError, "values is on meta, keys on cpu"),
    ],
)
def test_bad_inputs_name_the_argument(args, error, message):
    with pytest.raises(error) as info:
        cluster_accumulate(*args)
    assert str(info.value) == f"cluster_accumulate: {message}"


T, F, C, BIAS = torch.randn(2, 5, 8), torch.randn(2, 5, 6), torch.randn(3, 8), torch.randn(3)


@pytest.mark.parametrize(
    ("args", "error", "message"),
    [
        (
            (T, F[:, :4], C, BIAS),
            ValueError,
            "features must have shape (2, 5, C) to match tokens (2, 5, 8), got shape (2, 4, 6)",
        ),
        (
            (T, F, C[:, :7], BIAS),
            ValueError,
            "centers must have shape (M, 8) or (2, M, 8) to match tokens (2, 5, 8), "
            "got shape (3, 7)",
        ),
        (
            (T, F, C, BIAS[:2]),
            ValueError,
            "center_bias must have shape (3,) to match centers (3, 8), got shape (2,)",
        ),
        ((T, F, C, 1.0), TypeError, "center_bias must be a torch.Tensor of shape (M), got float"),
        (
            (T, F, C.double(), BIAS),
            TypeError,
            "centers has dtype torch.float64, tokens has torch.float32",
        ),
    ],
)
def test_caface_bad_inputs_name_the_argument(args, error, message):
    with pytest.raises(error) as info:
        cluster_accumulate_caface(*args, 0.1)
    assert str(info.value) == f"cluster_accumulate_caface: {message}"


def test_cpp_checks_its_arguments_too():
    with pytest.raises(
        RuntimeError, match=r"cluster_accumulate: values must have shape \(2, 5, C\)"
    ):
        cpp(K, Q, V[:, :4], 0.1)
