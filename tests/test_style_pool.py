import subprocess
import sys

import pytest
import torch

import fusedset
from fusedset import reference
from fusedset.ops import style_pool

from .helpers import DEVICES, RTOL, assert_rel_close, cuda_only, max_rel_error

IRESNET_SHAPES = [(2, 64, 56, 56), (2, 128, 28, 28), (2, 256, 14, 14), (2, 512, 7, 7)]
ODD_SHAPES = [(3, 5, 1, 1), (3, 5, 1, 2), (2, 7, 3, 1), (2, 9, 7, 7), (1, 6, 97, 1), (5, 65, 3, 3)]
# Rows longer than the CUDA kernels' on-chip chunk (1024 positions): split across blocks when
# the batch is small (forward: partials merged by a second kernel), walked chunk by chunk in one
# unit otherwise; channel-tile tails.
LONG_SHAPES = [(1, 3, 224, 224), (2, 5, 33, 33), (1, 70, 40, 40), (3, 2, 1, 1025)]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
LAYOUTS = ["contiguous", "channels_last"]


def kernel(x: torch.Tensor) -> torch.Tensor:
    """The compiled kernel itself: never the reference, whatever the dispatch would pick."""
    out, _ = torch.ops.fusedset.style_pool.default(x)
    return out


def accumulation_type(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def feature_maps(shape, dtype, layout, device="cpu") -> torch.Tensor:
    """Per-channel offsets and scales, so means are O(1) and relative errors mean something."""
    c = shape[1]
    offset = torch.empty(1, c, 1, 1).uniform_(-2, 2)
    scale = torch.empty(1, c, 1, 1).uniform_(0.5, 2)
    x = (torch.randn(shape) * scale + offset).to(device=device, dtype=dtype)
    return x.to(memory_format=torch.channels_last) if layout == "channels_last" else x


def truth(x: torch.Tensor) -> torch.Tensor:
    return reference.style_pool(x.double())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", IRESNET_SHAPES + ODD_SHAPES + LONG_SHAPES)
@pytest.mark.usefixtures("poisoned_outputs")
def test_forward_matches_reference(shape, dtype, layout, device):
    x = feature_maps(shape, dtype, layout, device)
    out = kernel(x)
    assert out.shape == (shape[0], shape[1], 2)
    assert out.dtype == dtype
    assert out.is_contiguous()
    expected = truth(x)
    if shape[2] * shape[3] == 1:
        assert out[..., 1].isnan().all()
    assert_rel_close(out, expected, RTOL[dtype])
    # Same-dtype eager torch, what CAFace's backbone computes, agrees within the dtype tolerance.
    assert_rel_close(out, reference.style_pool(x), RTOL[dtype] if dtype != torch.float64 else 1e-12)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 128, 28, 28), (2, 512, 7, 7), *ODD_SHAPES, *LONG_SHAPES])
@pytest.mark.usefixtures("poisoned_outputs")
def test_stats_are_the_row_statistics_in_the_accumulation_type(shape, dtype, layout, device):
    """stats[..., 0] is the mean less the row's first value, stats[..., 1] the std, both to the
    accumulation type's precision whatever x's dtype."""
    x = feature_maps(shape, dtype, layout, device)
    _, stats = torch.ops.fusedset.style_pool.default(x)
    acc = accumulation_type(dtype)
    assert stats.shape == (shape[0], shape[1], 2)
    assert stats.dtype == acc
    assert stats.is_contiguous()
    expected = truth(x)
    mean = stats[..., 0].double() + x[:, :, 0, 0].double()
    assert_rel_close(torch.stack([mean, stats[..., 1].double()], dim=-1), expected, RTOL[acc])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 128, 28, 28), (2, 512, 7, 7), *ODD_SHAPES, *LONG_SHAPES])
@pytest.mark.usefixtures("poisoned_outputs")
def test_backward_matches_reference(shape, dtype, layout, device):
    x = feature_maps(shape, dtype, layout, device).requires_grad_()
    grad = torch.randn(shape[0], shape[1], 2, device=device, dtype=dtype)
    (dx,) = torch.autograd.grad(kernel(x), x, grad)
    x64 = x.detach().double().requires_grad_()
    (expected,) = torch.autograd.grad(reference.style_pool(x64), x64, grad.double())
    assert dx.dtype == dtype
    assert dx.stride() == x.stride()
    assert_rel_close(dx, expected, RTOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (1, 70, 2, 3), (2, 2, 1, 2)])
def test_gradcheck_float64(shape, layout, device):
    x = feature_maps(shape, torch.float64, layout, device).requires_grad_()
    assert torch.autograd.gradcheck(kernel, (x,))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_constant_rows_get_torchs_gradient(device, layout):
    """torch masks the std term where std == 0; an unused std (zero grad) adds nothing."""
    x = feature_maps((2, 3, 4, 4), torch.float32, layout, device)
    x[1, 2] = 7.0
    x.requires_grad_()
    grad = torch.randn(2, 3, 2, device=device)
    (dx,) = torch.autograd.grad(kernel(x), x, grad)
    x64 = x.detach().double().requires_grad_()
    (expected,) = torch.autograd.grad(reference.style_pool(x64), x64, grad.double())
    assert torch.isfinite(dx).all()
    assert_rel_close(dx, expected, 1e-5)
    (dx_mean_only,) = torch.autograd.grad(kernel(x)[..., 0].sum(), x)
    torch.testing.assert_close(dx_mean_only, torch.full_like(x, 1 / 16))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.usefixtures("poisoned_outputs")
def test_std_term_dropped_per_channel_among_others(device, layout, dtype):
    """Channels without a std term (zero std, zero g_std) next to channels with one, in the same
    channels_last pixel block and in the tail block of 70 channels: each gets its own gradient.
    An unused std adds nothing even where it is NaN (an inf in the row), where a multiply by the
    zero g_std would give NaN."""
    x = feature_maps((2, 70, 5, 5), dtype, layout, device)
    x[0, 3] = 7.0
    x[1, 66] = -2.0
    x[1, 5, 2, 1] = float("inf")
    x.requires_grad_()
    grad = torch.randn(2, 70, 2, device=device, dtype=dtype)
    grad[:, ::4, 1] = 0.0
    grad[1, 5, 1] = 0.0
    (dx,) = torch.autograd.grad(kernel(x), x, grad)
    mean_only = (grad[1, 5, 0].double() / 25).expand(5, 5)
    torch.testing.assert_close(dx[1, 5].double(), mean_only, rtol=RTOL[dtype], atol=0)
    x64 = x.detach().double().requires_grad_()
    (expected,) = torch.autograd.grad(reference.style_pool(x64), x64, grad.double())
    assert expected[1, 5].isnan().all()
    expected[1, 5] = mean_only
    assert_rel_close(dx, expected, RTOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_stable_where_sum_of_squares_cancels(device, layout):
    x = feature_maps((4, 64, 28, 28), torch.float32, "contiguous") * 0 + 1e4
    x = (x + torch.randn_like(x)).to(device)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    expected = truth(x)
    out = kernel(x)
    std_err = ((out[..., 1].double() - expected[..., 1]).abs() / expected[..., 1]).max().item()
    assert std_err < 1e-5
    # The one-pass formula this guards against is far off on the same data.
    n = 28 * 28
    s, s2 = x.sum((2, 3)), (x * x).sum((2, 3))
    naive_std = ((s2 - s * s / n) / (n - 1)).clamp_min(0).sqrt()
    assert ((naive_std.double() - expected[..., 1]).abs() / expected[..., 1]).max() > 1e-2


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", [(4, 64, 28, 28), (1, 4, 224, 224)])
def test_backward_exact_where_mean_dominates(device, layout, shape):
    """|mean| = 1e4 >> std = 1: the saved mean, relative to the row's first value, keeps the bits
    of the deviations, so dx stays exact where a float32 mean (rounded by up to 5e-4, shifting
    every deviation) would put it 1e-4 off."""
    x = (1e4 + torch.randn(shape)).to(device)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    expected = truth(x)
    _, stats = torch.ops.fusedset.style_pool.default(x)
    assert_rel_close(stats[..., 0].double(), expected[..., 0] - x[:, :, 0, 0].double(), 1e-5)
    grad = torch.randn(shape[0], shape[1], 2, device=device)
    dx = torch.ops.fusedset.style_pool_backward.default(grad, x, stats)
    x64 = x.double().requires_grad_()
    (dx64,) = torch.autograd.grad(reference.style_pool(x64), x64, grad.double())
    assert_rel_close(dx, dx64, RTOL[torch.float32])


@cuda_only
@pytest.mark.parametrize(
    ("shape", "layout"),
    # Enough rows (contiguous) or channel tiles (channels_last) that long rows are not split.
    [((8, 1024, 33, 33), "contiguous"), ((512, 64, 33, 33), "channels_last")],
)
@pytest.mark.usefixtures("poisoned_outputs")
def test_cuda_long_rows_of_large_batches_match_reference(shape, layout):
    x = feature_maps(shape, torch.float32, layout, "cuda")
    assert_rel_close(kernel(x), truth(x), RTOL[torch.float32])


@cuda_only
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", [(4, 64, 28, 28), (1, 4, 224, 224)])
def test_cuda_exact_where_sum_of_squares_cancels_and_deterministic(shape, layout):
    """Split rows too: partials merged across blocks stay exact, and every run gives the same
    bits (no float atomics; the merge order is fixed)."""
    x = 1e4 + torch.randn(shape, device="cuda")
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    expected = truth(x)
    out, stats = torch.ops.fusedset.style_pool.default(x)
    assert_rel_close(out[..., 0], expected[..., 0], 1e-6)
    std_err = ((out[..., 1].double() - expected[..., 1]).abs() / expected[..., 1]).max().item()
    assert std_err < 1e-5
    # dx's accuracy here: test_backward_exact_where_mean_dominates.
    grad = torch.randn(shape[0], shape[1], 2, device="cuda")
    dx = torch.ops.fusedset.style_pool_backward.default(grad, x, stats)
    for _ in range(3):
        again, again_stats = torch.ops.fusedset.style_pool.default(x)
        assert torch.equal(again, out)
        assert torch.equal(again_stats, stats)
        assert torch.equal(torch.ops.fusedset.style_pool_backward.default(grad, x, stats), dx)


@cuda_only
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", [(70000, 2, 1, 2), (2, 3, 0, 5), (2, 3, 1, 1)])
@pytest.mark.usefixtures("poisoned_outputs")
def test_cuda_many_rows_and_tiny_rows_follow_torch(shape, layout):
    """A batch past gridDim.y's 65535 (one flat grid axis); H*W = 0 gives NaN mean and std,
    H*W = 1 a NaN std, as torch and the CPU kernel do."""
    x = feature_maps(shape, torch.float32, layout, "cuda").requires_grad_()
    out = kernel(x)
    expected = reference.style_pool(x.detach().double())
    assert torch.equal(out.isnan(), expected.isnan())
    assert_rel_close(out, expected, RTOL[torch.float32])
    grad = torch.randn_like(out)
    (dx,) = torch.autograd.grad(out, x, grad)
    x64 = x.detach().double().requires_grad_()
    (dx64,) = torch.autograd.grad(reference.style_pool(x64), x64, grad.double())
    assert torch.equal(dx.isnan(), dx64.isnan())


@cuda_only
@pytest.mark.parametrize("layout", LAYOUTS)
def test_cuda_offsets_past_two_to_the_31(layout):
    """2^31 + 65536 fp16 values: the last channel's offsets need 64 bits."""
    shape = (1, 2, 32768, 32769)
    if torch.cuda.get_device_properties(0).total_memory < 24 * 2**30:
        pytest.skip("needs 24 GiB of device memory")
    x = torch.randn(shape, device="cuda", dtype=torch.float16)
    x[0, 1] += 3
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    out = kernel(x)
    for c in range(2):
        std, mean = torch.std_mean(x[0, c].float())
        assert_rel_close(out[0, c].float(), torch.stack([mean, std]), RTOL[torch.float16])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_nan_stays_in_its_channel(device, layout):
    x = feature_maps((2, 70, 5, 5), torch.float32, layout, device)
    x[1, 33, 2, 4] = float("nan")
    out = kernel(x)
    nan = out.isnan()
    assert nan[1, 33].all()
    assert nan.sum() == 2


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(0, 3, 4, 4), (2, 0, 4, 4), (2, 3, 0, 4)])
def test_empty_inputs_follow_torch(shape, device):
    x = torch.randn(shape, device=device, requires_grad=True)
    out = kernel(x)
    expected = reference.style_pool(x.detach())
    assert out.shape == expected.shape
    assert torch.equal(out.isnan(), expected.isnan())
    out.sum().backward()
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("device", DEVICES)
def test_other_strides_are_read_correctly(device):
    base = feature_maps((3, 8, 10, 12), torch.float32, "contiguous", device)
    for x in (base.transpose(2, 3), base[:, ::2], base.permute(1, 0, 2, 3)):
        x = x.detach().requires_grad_()
        out = kernel(x)
        assert_rel_close(out, truth(x), 1e-5)
        grad = torch.randn_like(out)
        (dx,) = torch.autograd.grad(out, x, grad)
        x64 = x.detach().double().requires_grad_()
        (expected,) = torch.autograd.grad(reference.style_pool(x64), x64, grad.double())
        assert_rel_close(dx, expected, 1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_opcheck(device, layout, dtype):
    x = feature_maps((2, 5, 3, 4), dtype, layout, device).requires_grad_()
    torch.library.opcheck(torch.ops.fusedset.style_pool.default, (x,))
    _, stats = torch.ops.fusedset.style_pool.default(x.detach())
    grad = torch.randn(2, 5, 2, device=device, dtype=dtype)
    torch.library.opcheck(torch.ops.fusedset.style_pool_backward.default, (grad, x.detach(), stats))


def test_stats_are_not_differentiable():
    x = feature_maps((2, 5, 3, 4), torch.float32, "contiguous").requires_grad_()
    out, stats = torch.ops.fusedset.style_pool.default(x)
    assert out.requires_grad
    assert not stats.requires_grad


def _row_tensors(device):
    x = feature_maps((2, 3, 4, 4), torch.float16, "contiguous", device)
    _, stats = torch.ops.fusedset.style_pool.default(x)
    return x, torch.randn(2, 3, 2, device=device, dtype=torch.float16), stats


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    ("argument", "bad", "pattern"),
    [
        ("stats", lambda t: t[:, :2], r"stats must have shape \(2, 3, 2\), got \[2, 2, 2\]"),
        ("stats", lambda t: t[..., :1], r"stats must have shape \(2, 3, 2\), got \[2, 3, 1\]"),
        ("stats", lambda t: t.flatten(1), r"stats must have shape \(2, 3, 2\), got \[2, 6\]"),
        (
            "stats",
            lambda t: t.half(),
            r"stats must have dtype Float \(x is Half\), got Half",
        ),
        ("stats", lambda t: t.double(), r"stats must have dtype Float \(x is Half\), got Double"),
        ("grad", lambda t: t[:1], r"grad must have shape \(2, 3, 2\), got \[1, 3, 2\]"),
        ("grad", lambda t: t.float(), r"grad must have dtype Half \(x is Half\), got Float"),
    ],
)
def test_bad_backward_arguments_are_named(device, argument, bad, pattern):
    x, grad, stats = _row_tensors(device)
    args = {"grad": grad, "stats": stats}
    args[argument] = bad(args[argument])
    with pytest.raises(RuntimeError, match="style_pool_backward: " + pattern):
        torch.ops.fusedset.style_pool_backward.default(args["grad"], x, args["stats"])


@cuda_only
@pytest.mark.parametrize("argument", ["grad", "stats"])
def test_backward_arguments_on_another_device_are_named(argument):
    x, grad, stats = _row_tensors("cuda")
    args = {"grad": grad, "stats": stats}
    args[argument] = args[argument].cpu()
    with pytest.raises(RuntimeError, match=f"{argument} must be on x's device cuda:0, got cpu"):
        torch.ops.fusedset.style_pool_backward.default(args["grad"], x, args["stats"])


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    def pooled_energy(x):
        return style_pool(torch.relu(x)).square().sum()

    compiled = torch.compile(pooled_energy, fullgraph=True, backend="aot_eager")
    x = feature_maps((2, 16, 7, 7), torch.float32, "contiguous", device).requires_grad_()
    value = compiled(x)
    (dx,) = torch.autograd.grad(value, x)
    x_ref = x.detach().requires_grad_()
    expected = reference.style_pool(torch.relu(x_ref)).square().sum()
    (dx_ref,) = torch.autograd.grad(expected, x_ref)
    assert_rel_close(value.detach(), expected.detach(), 1e-5)
    assert_rel_close(dx, dx_ref, 1e-5)


def test_public_op_runs_the_kernel_and_the_switch_runs_the_reference(monkeypatch):
    calls = []
    monkeypatch.setattr(reference, "style_pool", lambda x: calls.append(x) or torch.zeros(1))
    x = torch.randn(2, 3, 4, 4)
    assert style_pool(x).shape == (2, 3, 2)
    assert calls == []
    with fusedset.force_reference():
        style_pool(x)
    assert len(calls) == 1


@pytest.mark.parametrize(
    ("value", "error", "pattern"),
    [
        (
            torch.randn(3, 4, 5),
            ValueError,
            r"style_pool: x must have 4 dimensions \(B, C, H, W\), got shape \(3, 4, 5\)",
        ),
        (
            torch.randn(1, 2, 3, 4, 5),
            ValueError,
            r"x must have 4 dimensions.*got shape \(1, 2, 3, 4, 5\)",
        ),
        (
            torch.ones(2, 3, 4, 4, dtype=torch.int64),
            TypeError,
            r"style_pool: x must have dtype float16, bfloat16, float32, float64, got torch.int64",
        ),
        (
            torch.ones(2, 3, 4, 4, dtype=torch.bool),
            TypeError,
            r"x must have dtype .* got torch.bool",
        ),
        (
            torch.randn(2, 3, 4, 4, dtype=torch.complex64, requires_grad=True),
            TypeError,
            r"x must have dtype .* got torch.complex64",
        ),
        (
            [[1.0]],
            TypeError,
            r"style_pool: x must be a torch.Tensor of shape \(B, C, H, W\), got list",
        ),
    ],
)
def test_bad_inputs_name_the_argument(value, error, pattern):
    with pytest.raises(error, match=pattern):
        style_pool(value)


def test_reference_fallback_when_extension_is_missing():
    code = """
import sys, warnings
sys.modules["fusedset._C"] = None  # what a never-built source checkout looks like
import torch, fusedset
from fusedset import reference
assert fusedset.backends()["cpp_cpu"] is False
x = torch.randn(2, 3, 4, 4)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    a = fusedset.ops.style_pool(x)
    b = fusedset.ops.style_pool(x)
messages = [str(w.message) for w in caught]
assert len(messages) == 1, messages
assert "pip install --no-build-isolation" in messages[0], messages
assert torch.equal(a, reference.style_pool(x)) and torch.equal(a, b)
print("ok")
"""
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_max_rel_error_sees_a_wrong_answer():
    expected = torch.tensor([1.0, 2.0, 4.0])
    assert max_rel_error(expected * (1 + 1e-3), expected) > RTOL[torch.float32]
