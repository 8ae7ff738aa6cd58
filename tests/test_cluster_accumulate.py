import pytest
import torch

import fusedset
from fusedset import reference
from fusedset.ops import cluster_accumulate, cluster_accumulate_caface

from .helpers import (
    DEVICES,
    RTOL,
    assert_compiled_matches_reference,
    assert_rel_close,
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
    """The C++ kernel itself, never the reference."""
    return torch.ops.fusedset.cluster_accumulate.default(*args)


def cpp_backward(*args):
    return torch.ops.fusedset.cluster_accumulate_backward.default(*args)


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


@pytest.mark.parametrize(
    ("n", "m", "dtype", "shared"),
    [
        (1, 1, torch.float32, False),
        (2, 4, torch.float32, True),
        (255, 8, torch.float16, False),
        (257, 64, torch.float32, True),
        (1100, 4, torch.bfloat16, True),
    ],
)
@pytest.mark.usefixtures("poisoned_outputs")
def test_triton_forward_matches_reference(n, m, dtype, shared):
    keys, queries, values = problem(2, n, 24, m, 40, dtype, shared)
    out = triton_kernels.forward(keys, queries, values, 0.2)
    check_forward(out, keys, queries, values, 0.2, dtype)


@pytest.mark.usefixtures("poisoned_outputs")
def test_triton_widest_shapes():
    """M = 64, D = 256, C = 1024: the issue's limits, forward and backward."""
    keys, queries, values = problem(1, 40, 256, 64, 1024, shared=True)
    check_forward(triton_kernels.forward(keys, queries, values, 0.06), keys, queries, values,
                  0.06, torch.float32)  # fmt: skip
    grads = (torch.randn(1, 64, 1024), torch.randn(1, 64), torch.randn(1, 64, 0))
    args = (*grads, keys, queries, values, 0.06, None, False, False)
    for g, e in zip(triton_kernels.backward(*args), cpp_backward(*args), strict=True):
        if e.numel():
            assert_rel_close(g, e, 1e-5)


@pytest.mark.parametrize(
    "config", triton_kernels.cluster_forward_kernel.configs if triton_kernels else [], ids=str
)
@pytest.mark.usefixtures("poisoned_outputs")
def test_triton_forward_every_config_caface_form(config):
    tokens, features, centers, bias = caface_problem(2, 300, 16, 4, 150)
    got = triton_kernels.forward(tokens, centers, features, 0.3, bias, True, True, config)
    expected = cpp(tokens, centers, features, 0.3, bias, True, True)
    for g, e in zip(got, expected, strict=True):
        assert_rel_close(g, e, 1e-5)


@pytest.mark.parametrize(
    "config", triton_kernels.cluster_backward_kernel.configs if triton_kernels else [], ids=str
)
@pytest.mark.parametrize("caface", [False, True])
@pytest.mark.usefixtures("poisoned_outputs")
def test_triton_backward_matches_cpp(caface, config):
    keys, queries, values = problem(2, 700, 16, 4, 72, torch.float64, shared=caface)
    bias = torch.randn(queries.shape[:2], dtype=torch.float64) if caface else None
    grads = (
        torch.randn(2, 4, 72, dtype=torch.float64),
        torch.randn(2, 4, dtype=torch.float64),
        torch.randn(2, 4, 16 if caface else 0, dtype=torch.float64),
    )
    args = (*grads, keys, queries, values, 0.3, bias, caface, caface)
    got = triton_kernels.backward(*args, config=config)
    expected = cpp_backward(*args)
    for g, e in zip(got, expected, strict=True):
        assert g.shape == e.shape
        if e.numel():
            assert_rel_close(g, e, 1e-12)


def test_triton_is_bitwise_deterministic():
    keys, queries, values = problem(1, 1500, 16, 4, 24)
    first = triton_kernels.forward(keys, queries, values, 0.3)
    second = triton_kernels.forward(keys, queries, values, 0.3)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


def test_triton_rejects_too_many_centers():
    keys, queries, values = problem(1, 4, 8, 65, 4)
    with pytest.raises(ValueError, match=r"M <= 64 centers, got M = 65"):
        triton_kernels.forward(keys, queries, values, 0.3)


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
