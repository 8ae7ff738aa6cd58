import functools

import pytest
import torch

import fusedset
from fusedset import reference
from fusedset.ops import quality_fps, quality_fps_select
from fusedset.ops.quality_fps import gumbel_noise
from fusedset.reference.facecoresetnet import select_core_template
from fusedset.reference.quality_fps import backward_dots, backward_spread, selection_weights

from .helpers import (
    DEVICES,
    TRITON_DEVICE,
    assert_compiled_matches_reference,
    assert_rel_close,
    interpreter_only,
    run_on,
)

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# (B, N, C, k): N = 1, N < k, k = N, a tail over the CPU kernel's 1024-row chunks.
SHAPES = [(2, 1, 8, 3), (3, 2, 16, 3), (2, 5, 7, 5), (4, 40, 512, 3), (1, 2100, 33, 6)]


def kernel(x, k, gamma, lengths=None, row_scale=None):
    """The compiled kernel itself: never the reference, whatever the dispatch would pick."""
    return torch.ops.fusedset.quality_fps.default(x, k, _gamma(gamma, x), lengths, row_scale)


def select_kernel(x, k, gamma, noise, tau=1.0, scale=1.0, lengths=None):
    return torch.ops.fusedset.quality_fps_select.default(
        x, k, _gamma(gamma, x), tau, scale, noise, lengths
    )


def _gamma(gamma, x):
    if isinstance(gamma, torch.Tensor):
        return gamma
    return torch.tensor(gamma, dtype=torch.float64, device=x.device)


def features(shape, dtype=torch.float32, device="cpu", generator=None):
    """Directions times qualities spread over [0.5, 3], as backbone embeddings are."""
    b, n, c = shape
    u = torch.nn.functional.normalize(torch.randn(b, n, c, generator=generator), dim=-1)
    q = torch.empty(b, n, 1).uniform_(0.5, 3, generator=generator)
    return (u * q).to(device=device, dtype=dtype)


def noise_for(x, k):
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    return gumbel_noise((x.shape[0], min(k, x.shape[1]), x.shape[1]), acc, x.device)


# ---------------------------------------------------------------- released FaceCoresetNet outputs


def test_matches_released_facecoresetnet(fixtures_dir):
    data = torch.load(fixtures_dir / "facecoresetnet_official.pt", weights_only=True)
    for case in data["cases"]:
        x = case["embeddings"] * case["norms"]
        k, gamma = case["coreset_size"], case["gamma"]
        assert torch.equal(kernel(x, k, gamma), case["selected_indices"])
        assert torch.equal(reference.quality_fps(x, k, gamma), case["selected_indices"])
        # The released eval form: Gumbel noise, logits scaled by 1e4, temperature 1e-10.
        rows, idx, _, _ = select_kernel(x, k, gamma, noise_for(x, k), tau=1e-10, scale=1e4)
        assert torch.equal(idx, case["selected_indices"])
        assert torch.equal(rows, case["core_template"])
        assert_rel_close(rows.mean(dim=1), case["fps_only_mean"], 1e-5)


# ---------------------------------------------------------------- forward against the reference


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.usefixtures("poisoned_outputs")
def test_indices_match_reference(shape, dtype, device):
    b, n, c, k = shape
    x = features((b, n, c), dtype, device)
    for gamma in (0.0, 0.7, 2.0):
        out = kernel(x, k, gamma)
        assert out.dtype == torch.int64
        assert out.shape == (b, min(k, n))
        assert torch.equal(out, reference.quality_fps(x, k, gamma))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.usefixtures("poisoned_outputs")
def test_select_forward_matches_reference(dtype, device):
    x = features((3, 50, 24), dtype, device)
    noise = noise_for(x, 4)
    lengths = torch.tensor([50, 3, 20], device=device)
    rows, idx, logits, source = select_kernel(x, 4, 0.5, noise, lengths=lengths)
    expected = reference.quality_fps_select(x, 4, 0.5, 1.0, 1.0, noise, lengths)
    assert rows.dtype == dtype
    assert torch.equal(rows, expected)
    gathered = x.gather(1, idx.clamp_min(0)[..., None].expand(-1, -1, 24))
    assert torch.equal(rows, gathered * (idx[..., None] >= 0))
    assert (idx[1, 3:] == -1).all()
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert logits.dtype == acc
    assert source.dtype == torch.int32
    assert (source[:, 0] == -1).all()
    assert torch.isneginf(logits[1, :, 3:]).all()


def test_permutation_equivariance():
    x = features((2, 300, 64))
    perm = torch.randperm(300)
    idx = kernel(x, 7, 1.3)
    assert torch.equal(kernel(x[:, perm], 7, 1.3), perm.argsort()[idx])


def test_select_and_its_gradient_are_permutation_equivariant():
    x = features((2, 80, 16), torch.float64)
    noise = noise_for(x, 4)
    perm = torch.randperm(80)
    grad = torch.randn(2, 4, 16, dtype=torch.float64)
    outputs = []
    for xp, gp in ((x, noise), (x[:, perm], noise[:, :, perm])):
        xp = xp.clone().requires_grad_()
        rows = quality_fps_select(xp, 4, 0.9, noise=gp)
        (dx,) = torch.autograd.grad(rows, xp, grad)
        outputs.append((rows, dx))
    torch.testing.assert_close(outputs[1][0], outputs[0][0])
    torch.testing.assert_close(outputs[1][1], outputs[0][1][:, perm])


def test_lengths_match_separate_templates():
    x = features((3, 30, 16))
    lengths = torch.tensor([30, 4, 0])
    out = kernel(x, 6, 0.5, lengths)
    assert torch.equal(out[0], kernel(x[:1], 6, 0.5)[0])
    assert torch.equal(out[1, :4], kernel(x[1:2, :4], 6, 0.5)[0])
    assert (out[1, 4:] == -1).all()
    assert (out[2] == -1).all()
    x_padded = x.clone()
    x_padded[1, 4:] = 1e3  # padding is never read for selection: large rows change nothing
    x_padded[1, 5] = float("nan")
    assert torch.equal(kernel(x_padded, 6, 0.5, lengths), out)
    assert torch.equal(reference.quality_fps(x_padded, 6, 0.5, lengths), out)


def directions_and_scales(b, n, c, seed):
    """Unit directions (B, N, C) and row scales (B, N) in the range of face-feature norms, with a
    zero scale (a zero row) and a negative one (a flipped direction) when N > 3."""
    generator = torch.Generator().manual_seed(seed)
    directions = torch.nn.functional.normalize(torch.randn(b, n, c, generator=generator), dim=-1)
    scale = torch.empty(b, n).uniform_(0.5, 40, generator=generator)
    if n > 3:
        scale[:, 1] = 0
        scale[:, 2] = -scale[:, 2]
    return directions, scale


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.usefixtures("poisoned_outputs")
def test_row_scale_selects_as_the_scaled_rows(shape, dtype):
    """Unit directions and norms select as their product, which is never built; zero and
    negative scales included (a zero row, a flipped direction)."""
    b, n, c, k = shape
    directions, scale = directions_and_scales(b, n, c, seed=n)
    directions = directions.to(dtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    product = directions.to(acc) * scale[..., None].to(acc)
    lengths = torch.tensor([n, max(0, n - 2)] + [n] * (b - 2))[:b]
    for gamma in (0.0, 0.7):
        got = kernel(directions, k, gamma, lengths, scale)
        assert torch.equal(got, kernel(product, k, gamma, lengths))
        assert torch.equal(got, reference.quality_fps(directions, k, gamma, lengths, scale))
        assert torch.equal(got, quality_fps(directions, k, gamma, lengths, scale))


def test_row_scale_first_pick_guess_right_wrong_or_directionless():
    """The kernel guesses the first pick from the largest |row_scale| and reuses its first
    sweep when right: the picks are those of the product however the guess turns out."""
    generator = torch.Generator().manual_seed(5)
    x = features((3, 2100, 24), generator=generator)
    scale = torch.empty(3, 2100).uniform_(1, 2, generator=generator)
    scale[0, 17] = 10  # template 0: the guess is right (its row has the largest product)
    x[0, 17] = x[0, 17] / x[0, 17].norm() * 3
    scale[1, 5] = 2.5  # template 1: the guess is wrong (a short row)
    x[1, 5] = x[1, 5] / x[1, 5].norm() * 0.01
    scale[2, 8] = 50  # template 2: the guess has no direction
    x[2, 8] = 0
    first = kernel(x, 1, 0.7, None, scale)[:, 0].tolist()
    assert first[0] == 17
    assert first[1] != 5
    assert first[2] != 8
    for k in (1, 2, 5):
        got = kernel(x, k, 0.7, None, scale)
        assert torch.equal(got, kernel(x * scale[..., None], k, 0.7))


def test_row_scale_padding_is_never_read_and_a_bad_valid_scale_is_named():
    x = features((2, 30, 16))
    scale = torch.rand(2, 30) + 1
    lengths = torch.tensor([30, 7])
    expected = kernel(x, 5, 0.5, lengths, scale)
    scale[1, 7:] = float("nan")
    assert torch.equal(kernel(x, 5, 0.5, lengths, scale), expected)
    scale[0, 4] = float("inf")
    with pytest.raises(ValueError, match=r"quality_fps: x\[0, 4\] is not finite"):
        kernel(x, 5, 0.5, lengths, scale)


@pytest.mark.parametrize("dtype", DTYPES)
def test_ties_go_to_the_lowest_index_and_rows_are_picked_once(dtype):
    """Exact ties, in every dtype: random inputs (seeded per test) are compared index for index
    with the reference, so a tie must be made on purpose to be tested."""
    x = features((1, 6, 8), dtype)
    x[0, 1] *= 10 / x[0, 1].norm()  # the largest norm, duplicated at 4 and 5
    x[0, 4:] = x[0, 1]
    out = kernel(x, 6, 1.0)
    assert out[0, 0] == 1
    assert sorted(out[0].tolist()) == list(range(6))
    # 4 and 5 are at distance 0 from 1: picked last, the lower index first.
    assert out[0, -2:].tolist() == [4, 5]
    assert torch.equal(out, reference.quality_fps(x, 6, 1.0))


def _large_template(layout, generator):
    """Two templates of 6000 rows (enough candidates for the CPU kernel's last step to update
    only the rows of largest d): directions by `layout`, norms over [5, 40]."""
    b, n, c = 2, 6000, 32
    norms = torch.empty(b, n, 1).uniform_(5, 40, generator=generator)
    if layout == "spread":
        u = torch.randn(b, n, c, generator=generator)
    elif layout == "clustered":
        centers = torch.randn(b, 12, c, generator=generator)
        member = torch.randint(0, 12, (b, n, 1), generator=generator)
        u = centers.gather(1, member.expand(-1, -1, c))
        u = u + 0.3 * torch.randn(b, n, c, generator=generator)
    elif layout == "duplicates":  # 40 rows, 150 copies each, with the same norm: ties
        member = torch.randint(0, 40, (b, n, 1), generator=generator)
        u = torch.randn(b, 40, c, generator=generator).gather(1, member.expand(-1, -1, c))
        norms = torch.linspace(5, 40, 40)[member]
    else:  # "opposite": every row far from one of the first two picks, near the other
        side = torch.randint(0, 2, (b, n, 1), generator=generator) * 2 - 1
        u = side * torch.ones(c) + 0.05 * torch.randn(b, n, c, generator=generator)
    return torch.nn.functional.normalize(u, dim=-1), norms


@pytest.mark.parametrize("layout", ["spread", "clustered", "duplicates", "opposite"])
def test_last_step_picks_as_the_reference_on_large_templates(layout):
    """The CPU kernel's last eval step updates only the rows of largest d when that settles the
    argmax, and sweeps otherwise ("opposite": half the rows qualify): the picks of the
    reference, ties to the lowest index, with and without row_scale and lengths."""
    directions, norms = _large_template(layout, torch.Generator().manual_seed(len(layout)))
    lengths = torch.tensor([6000, 4999])
    for k in (3, 5):
        for gamma in (0.01, 1.0):
            want = reference.quality_fps(directions * norms, k, gamma)
            assert torch.equal(kernel(directions * norms, k, gamma), want)
            assert torch.equal(kernel(directions, k, gamma, None, norms[..., 0]), want)
            want = reference.quality_fps(directions * norms, k, gamma, lengths)
            assert torch.equal(kernel(directions, k, gamma, lengths, norms[..., 0]), want)


def test_gamma_zero_is_plain_cosine_fps():
    x = features((2, 60, 32))
    out = kernel(x, 5, 0.0)
    u = torch.nn.functional.normalize(x, dim=-1)
    for b in range(2):
        picks = [int(x[b].norm(dim=-1).argmax())]
        d = torch.full((60,), float("inf"))
        for _ in range(4):
            d = torch.minimum(d, (1 - u[b] @ u[b, picks[-1]]) / 2)
            d[picks] = -1
            picks.append(int(d.argmax()))
        assert out[b].tolist() == picks


def test_zero_norm_rows_come_last_without_nans():
    x = features((1, 7, 8))
    x[0, [1, 4]] = 0
    out = kernel(x, 7, 0.8)
    assert out[0, -2:].tolist() == [1, 4]
    assert torch.equal(out, reference.quality_fps(x, 7, 0.8))
    noise = noise_for(x, 7)
    x.requires_grad_()
    rows, _, logits, _ = select_kernel(x, 7, 0.8, noise)
    assert torch.isfinite(rows).all()
    assert torch.isneginf(logits[0, :, [1, 4]]).all()
    rows.sum().backward()
    assert torch.isfinite(x.grad).all()
    only_zeros = torch.zeros(1, 3, 8)
    assert kernel(only_zeros, 2, 1.0).tolist() == [[0, 1]]


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_rows_are_a_clear_error(bad):
    x = features((2, 9, 8))
    x[1, 6, 3] = bad
    with pytest.raises(ValueError, match=r"quality_fps: x\[1, 6\] is not finite"):
        kernel(x, 3, 1.0)
    with pytest.raises(ValueError, match=r"x\[1, 6\] is not finite"):
        quality_fps(x, 3, 1.0)
    with fusedset.force_reference(), pytest.raises(ValueError, match=r"x\[1, 6\] is not finite"):
        quality_fps(x, 3, 1.0)


def test_empty_inputs():
    assert kernel(torch.randn(0, 5, 4), 3, 1.0).shape == (0, 3)
    assert kernel(torch.randn(2, 0, 4), 3, 1.0).shape == (2, 0)
    x = torch.randn(2, 0, 4, requires_grad=True)
    rows = quality_fps_select(x, 3, 1.0)
    assert rows.shape == (2, 0, 4)
    rows.sum().backward()
    assert x.grad.shape == (2, 0, 4)


# ---------------------------------------------------------------- gradients


def _reference_grads(x, gamma, noise, k, tau, scale, lengths, grad):
    x64 = x.detach().double().requires_grad_()
    g64 = torch.tensor(float(gamma), dtype=torch.float64, requires_grad=True)
    out = reference.quality_fps_select(x64, k, g64, tau, scale, noise.double(), lengths)
    return torch.autograd.grad(out, (x64, g64), grad.double())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("tau", "scale"), [(1.0, 1.0), (0.5, 3.0)])
def test_straight_through_gradients_match_eager(dtype, tau, scale, device):
    x = features((3, 30, 16), dtype, device)
    x[0, 7] = 0
    x[1, 2:] = float("nan")  # padding: reaches no value and no gradient
    lengths = torch.tensor([30, 2, 17], device=device)
    noise = noise_for(x, 4)
    gamma_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    gamma = torch.tensor(0.6, dtype=gamma_dtype, device=device, requires_grad=True)
    x.requires_grad_()
    out = quality_fps_select(x, 4, gamma, tau, scale, noise=noise, lengths=lengths)
    grad = torch.randn_like(out)
    dx, dgamma = torch.autograd.grad(out, (x, gamma), grad)
    ex, egamma = _reference_grads(x, gamma.item(), noise, 4, tau, scale, lengths, grad)
    rtol = {torch.float64: 1e-10, torch.float32: 1e-5}.get(dtype, 1e-2)
    assert dx.dtype == dtype
    assert_rel_close(dx, ex, rtol)
    assert_rel_close(dgamma, egamma, rtol if dtype == torch.float64 else 1e-4)


def _held_surrogate(x, gamma, tau, scale, noise, picks, soft0):
    """The selection with the picks held and each straight-through ``y_t`` replaced by
    ``y_hard + y_soft(x, gamma) - soft0`` (soft0: the soft weights at the base point). At the
    base point its value is that of quality_fps_select, and its derivative there is the
    straight-through gradient, the next distances measured from the row ``x^T y_t``. No
    padding, no zero rows; rows picked earlier stay in the soft weights at distance 0."""
    q = x.norm(dim=-1)
    half_qg = q**gamma / 2
    d, taken, rows = q, torch.zeros_like(q, dtype=torch.bool), []
    for t in range(picks.shape[1]):
        y_soft = torch.softmax((torch.where(taken, 0, d) * scale + noise[:, t]) / tau, dim=-1)
        y_hard = torch.nn.functional.one_hot(picks[:, t], x.shape[1]).to(x.dtype)
        row = torch.einsum("bn,bnc->bc", y_hard + y_soft - soft0[:, t], x)
        rows.append(row)
        taken = taken | y_hard.bool()
        cos = torch.einsum("bnc,bc->bn", x, row) / (q * row.norm(dim=-1, keepdim=True))
        dist = half_qg * (1 - cos).clamp_min(0)
        d = dist if t == 0 else torch.minimum(d, dist)
    return torch.stack(rows, dim=1)


@pytest.mark.parametrize("shape", [(2, 6, 5, 3), (1, 4, 3, 4), (2, 1, 3, 2)])
def test_gradcheck_float64(shape):
    """The straight-through gradient is the exact derivative of _held_surrogate at the base
    point x0 (the picks held fixed), whose value gradcheck differentiates numerically while the
    op supplies the analytical side."""
    b, n, c, k = shape
    x = features((b, n, c), torch.float64)
    x[0, -1] *= 2  # distinct norms: the first pick does not flip under the finite differences
    gamma = torch.tensor(0.8, dtype=torch.float64, requires_grad=True)
    noise = noise_for(x, k)
    picks = select_kernel(x, k, gamma.detach(), noise, tau=0.7, scale=2.0)[1]
    _, soft0 = selection_weights(x, k, gamma.detach(), 0.7, 2.0, noise)
    assert_rel_close(
        _held_surrogate(x, gamma.detach(), 0.7, 2.0, noise, picks, soft0),
        x.gather(1, picks[..., None].expand(-1, -1, c)),
        1e-15,
    )
    x.requires_grad_()

    def fn(x, gamma):
        rows = select_kernel(x, k, gamma, noise, tau=0.7, scale=2.0)[0]
        surrogate = _held_surrogate(x, gamma, 0.7, 2.0, noise, picks, soft0)
        return rows - rows.detach() + surrogate.detach()

    assert torch.autograd.gradcheck(fn, (x, gamma))


@pytest.mark.parametrize("n", [20, 33, 50])
def test_gradients_match_released_training_selection(n):
    """Released FaceCoresetNet semantics (select_core_template, training=True): the next
    distances are measured from the straight-through row, so their gradient reaches the soft
    weights of the step that picked it. Equal values and float64 gradients on random cases
    without re-picks (which the released loop allows and the op does not)."""
    generator = torch.Generator().manual_seed(n)
    x0 = features((3, n, 16), torch.float64, generator=generator)
    noise = -torch.empty(3, 3, n, dtype=torch.float64).exponential_(generator=generator).log()
    grad = torch.randn(3, 3, 16, dtype=torch.float64, generator=generator)

    def grads(select):
        x = x0.clone().requires_grad_()
        gamma = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
        out = select(x, gamma)
        return (out, *torch.autograd.grad(out, (x, gamma), grad))

    released = grads(
        lambda x, gamma: (
            select_core_template(x, x.norm(dim=-1), 3, gamma, training=True, noise=noise).features
        )
    )
    for force in (False, True):
        with fusedset.force_reference(force):
            ours = grads(
                lambda x, gamma: quality_fps_select(x, 3, gamma, noise=noise.permute(1, 0, 2))
            )
        torch.testing.assert_close(ours[0], released[0], rtol=0, atol=0)
        assert_rel_close(ours[1], released[1], 1e-10)
        assert_rel_close(ours[2], released[2], 1e-10)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 5, 7, 3), (1, 2100, 33, 2), (2, 0, 4, 1)])
@pytest.mark.usefixtures("poisoned_outputs")
def test_backward_sweeps_match_torch(shape, dtype, device):
    b, n, c, k = shape
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    x = features((b, n, c), dtype, device)
    m = torch.randn(b, 2 * k, c, dtype=acc, device=device)
    coef = torch.randn(b, n, dtype=acc, device=device)
    beta = torch.randn(b, n, k, dtype=acc, device=device)
    x_picked = torch.randn(b, k, c, dtype=acc, device=device)
    if n > 1:  # an untouched row is not read: NaN there changes nothing
        x[:, 1] = float("nan")
        coef[:, 1] = 0
        beta[:, 1] = 0
    rtol = 1e-10 if dtype == torch.float64 else 1e-5
    dots, q = torch.ops.fusedset.quality_fps_backward_dots.default(x, m)
    e_dots, e_q = backward_dots(x.double(), m.double())
    assert dots.isnan().any() == (n > 1)  # dots do read every row
    assert dots.dtype == acc
    assert_rel_close(dots, e_dots, rtol)
    assert_rel_close(q, e_q, rtol)
    dx, into = torch.ops.fusedset.quality_fps_backward_spread.default(x, coef, beta, x_picked)
    e_dx, e_into = backward_spread(x.double(), coef.double(), beta.double(), x_picked.double())
    assert dx.dtype == dtype
    assert not dx.isnan().any()
    assert not into.isnan().any()
    assert_rel_close(dx, e_dx, rtol if dtype in (torch.float32, torch.float64) else 1e-2)
    assert_rel_close(into, e_into, rtol)
    x = x.nan_to_num()  # opcheck compares outputs with ==
    torch.library.opcheck(torch.ops.fusedset.quality_fps_backward_dots.default, (x, m))
    torch.library.opcheck(
        torch.ops.fusedset.quality_fps_backward_spread.default, (x, coef, beta, x_picked)
    )


# ---------------------------------------------------------------- torch.library integration


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    x = features((2, 10, 6), device=device).requires_grad_()
    gamma = torch.tensor(0.5, device=device, dtype=torch.float64)
    torch.library.opcheck(torch.ops.fusedset.quality_fps.default, (x.detach(), 3, gamma, None))
    lengths = torch.tensor([10, 4], device=device)
    torch.library.opcheck(torch.ops.fusedset.quality_fps.default, (x.detach(), 3, gamma, lengths))
    scale = torch.rand(2, 10, device=device) + 0.5
    torch.library.opcheck(
        torch.ops.fusedset.quality_fps.default, (x.detach(), 3, gamma, lengths, scale)
    )
    gamma_g = torch.tensor(0.5, device=device, requires_grad=True)
    torch.library.opcheck(
        torch.ops.fusedset.quality_fps_select.default,
        (x, 3, gamma_g, 1.0, 1.0, noise_for(x, 3), lengths),
    )


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    noise = torch.zeros(2, 3, 12, device=device)

    def energy(x, gamma):
        return quality_fps_select(torch.relu(x), 3, gamma, noise=noise).square().sum()

    x = features((2, 12, 8), device=device).requires_grad_()
    gamma = torch.tensor(0.5, device=device, requires_grad=True)
    assert_compiled_matches_reference(energy, (x, gamma), grad_rtol=1e-5)
    indices = torch.compile(lambda x: quality_fps(x, 3, 0.5), fullgraph=True)(x.detach())
    assert torch.equal(indices, reference.quality_fps(x.detach(), 3, 0.5))


def test_public_ops_run_the_kernel_and_the_switch_runs_the_reference(monkeypatch):
    calls = []
    monkeypatch.setattr(reference, "quality_fps", lambda *a: calls.append(a) or None)
    x = features((2, 9, 4))
    assert quality_fps(x, 3, 1.0).shape == (2, 3)
    assert calls == []
    with fusedset.force_reference():
        quality_fps(x, 3, 1.0)
    assert len(calls) == 1


def test_generator_makes_the_draw_reproducible():
    x = features((2, 50, 8))
    a = quality_fps_select(x, 4, 1.0, generator=torch.Generator().manual_seed(3))
    b = quality_fps_select(x, 4, 1.0, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


@pytest.mark.parametrize(
    ("call", "error", "pattern"),
    [
        (lambda x: quality_fps(x[0], 3, 1.0), ValueError, r"quality_fps: x must have 3 dimensions"),
        (lambda x: quality_fps(x.long(), 3, 1.0), TypeError, r"x must have dtype"),
        (lambda x: quality_fps(x, 0, 1.0), ValueError, r"k must be a positive int, got 0"),
        (lambda x: quality_fps(x, 2.0, 1.0), ValueError, r"k must be a positive int"),
        (lambda x: quality_fps(x, 3, "1"), TypeError, r"gamma must be a float"),
        (
            lambda x: quality_fps(x, 3, torch.ones(2)),
            TypeError,
            r"gamma must be a float or a one-element float tensor",
        ),
        (
            lambda x: quality_fps(x, 3, 1.0, torch.tensor([1.0, 2.0])),
            TypeError,
            r"lengths must have dtype",
        ),
        (
            lambda x: quality_fps(x, 3, 1.0, torch.tensor([1, 2, 3])),
            ValueError,
            r"lengths must have shape \(2,\)",
        ),
        (
            lambda x: quality_fps(x, 3, 1.0, torch.tensor([1, 6])),
            ValueError,
            r"lengths must lie in \[0, N = 5\]",
        ),
        (
            lambda x: quality_fps(x, 3, 1.0, row_scale=torch.ones(2, 4)),
            ValueError,
            r"quality_fps: row_scale must have shape \(2, 5\) to match x, got \(2, 4\)",
        ),
        (
            lambda x: quality_fps(x, 3, 1.0, row_scale=torch.ones(2, 5, dtype=torch.int64)),
            TypeError,
            r"quality_fps: row_scale must have dtype",
        ),
        (
            lambda x: quality_fps(x, 3, 1.0, row_scale=torch.ones(2, 5, device="meta")),
            ValueError,
            r"quality_fps: row_scale is on meta, x on cpu",
        ),
        (
            lambda x: quality_fps_select(x, 3, 1.0, tau=0.0),
            ValueError,
            r"quality_fps_select: tau must be positive",
        ),
        (
            lambda x: quality_fps_select(x, 3, 1.0, noise=torch.zeros(2, 2, 5)),
            ValueError,
            r"noise must have shape \(2, 3, 5\)",
        ),
    ],
)
def test_bad_inputs_name_the_argument(call, error, pattern):
    with pytest.raises(error, match=pattern):
        call(torch.randn(2, 5, 4))


# ---------------------------------------------------------------- Triton, under TRITON_INTERPRET=1


@pytest.fixture
def triton_select():
    pytest.importorskip("triton")
    from fusedset.triton_kernels.quality_fps import select

    return functools.partial(run_on, TRITON_DEVICE, select)


@pytest.fixture
def triton_kernels():
    pytest.importorskip("triton")
    from fusedset.triton_kernels import quality_fps

    return quality_fps


# The launcher's checks are torch._assert_async: a RuntimeError under the interpreter; on CUDA a
# device-side assert, after which the process's CUDA context is unusable.
CHECKS_RAISE = TRITON_DEVICE == "cpu"
TRITON_SHAPES = [(2, 1, 8, 3), (3, 5, 7, 5), (2, 40, 33, 3), (1, 150, 16, 4)]
PATHS = pytest.mark.parametrize("on_chip", [True, False], ids=["on_chip", "global"])


@PATHS
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", TRITON_SHAPES)
@pytest.mark.usefixtures("poisoned_outputs")
@pytest.mark.cuda
def test_triton_matches_cpp_kernel(triton_select, shape, dtype, on_chip):
    b, n, c, k = shape
    x = features((b, n, c), dtype)
    x[0, n // 2] = 0
    lengths = torch.tensor([n] + [max(0, n - 3)] * (b - 1))
    gamma = torch.tensor(0.7, dtype=torch.float64)
    noise = noise_for(x, k)
    idx, logits, source = triton_select(
        x, gamma, k, lengths, noise=noise, scale=2.0, record=True, on_chip=on_chip
    )
    _, e_idx, e_logits, e_source = select_kernel(x, k, gamma, noise, scale=2.0, lengths=lengths)
    assert torch.equal(idx, e_idx)
    assert torch.equal(source, e_source)
    assert logits.dtype == e_logits.dtype
    assert torch.equal(logits.isneginf(), e_logits.isneginf())
    finite = ~e_logits.isneginf()
    assert_rel_close(logits[finite], e_logits[finite], 1e-5 if dtype != torch.float64 else 1e-12)
    plain, none_logits, none_source = triton_select(x, gamma, k, lengths, on_chip=on_chip)
    assert none_logits is None
    assert none_source is None
    assert torch.equal(plain, reference.quality_fps(x, k, gamma, lengths))


# numpy, under the interpreter, warns on the arithmetic of the non-finite row before the kernel
# flags it.
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@PATHS
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", TRITON_SHAPES)
@pytest.mark.cuda
def test_triton_row_scale_selects_as_the_scaled_rows(triton_select, shape, dtype, on_chip):
    """Zero and negative scales included; a NaN scale past a template's length changes nothing,
    a non-finite one in a valid row fails the call."""
    b, n, c, k = shape
    directions, scale = directions_and_scales(b, n, c, seed=n + c)
    directions = directions.to(dtype)
    lengths = torch.tensor([n] + [max(1, n - 3)] * (b - 1))
    scale[1:, n - 1] = float("nan") if n > 4 else scale[1:, n - 1]
    for gamma in (0.0, 0.7):
        gamma = torch.tensor(gamma, dtype=torch.float64)
        got, _, _ = triton_select(directions, gamma, k, lengths, on_chip=on_chip, row_scale=scale)
        assert torch.equal(got, kernel(directions, k, gamma, lengths, scale))
    if CHECKS_RAISE:
        scale[0, n // 2] = float("inf")
        with pytest.raises(RuntimeError, match=NOT_FINITE):
            triton_select(directions, gamma, k, lengths, on_chip=on_chip, row_scale=scale)


@PATHS
@pytest.mark.cuda
def test_triton_matches_released_facecoresetnet(triton_select, fixtures_dir, on_chip):
    data = torch.load(fixtures_dir / "facecoresetnet_official.pt", weights_only=True)
    for case in data["cases"]:
        x = case["embeddings"] * case["norms"]
        gamma = torch.tensor(case["gamma"], dtype=torch.float64)
        idx, _, _ = triton_select(x, gamma, case["coreset_size"], on_chip=on_chip)
        assert torch.equal(idx, case["selected_indices"])


NOT_FINITE = r"quality_fps: x has a row that is not finite \(NaN or inf in a valid row\)"


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@PATHS
@pytest.mark.cuda
def test_triton_ties_zero_rows_and_nan(triton_select, on_chip):
    gamma = torch.tensor(1.0, dtype=torch.float64)
    x = features((1, 7, 8))
    x[0, 1] *= 10 / x[0, 1].norm()
    x[0, 5:] = x[0, 1]
    x[0, 3] = 0
    idx, _, _ = triton_select(x, gamma, 7, on_chip=on_chip)
    assert idx[0, 0] == 1
    assert idx[0, -3:].tolist() == [5, 6, 3]
    assert torch.equal(idx, reference.quality_fps(x, 7, gamma))
    if not CHECKS_RAISE:
        return
    x[0, 4, 2] = float("nan")
    with pytest.raises(RuntimeError, match=NOT_FINITE):
        triton_select(x, gamma, 3, on_chip=on_chip)
    noise = noise_for(x, 3)
    with pytest.raises(RuntimeError, match=NOT_FINITE.replace("quality_fps", "quality_fps_select")):
        triton_select(x, gamma, 3, noise=noise, record=True, on_chip=on_chip)


@pytest.fixture
def reversed_programs(monkeypatch):
    """Programs of a launch run last to first in the interpreter, so the program that arrives
    last at a template's counter is the first one of its rows."""
    from triton.runtime import interpreter

    grid = {}
    builder = interpreter.InterpreterBuilder
    set_dim, set_idx = builder.set_grid_dim, builder.set_grid_idx

    def record_dim(self, nx, ny, nz):
        grid["dims"] = (nx, ny, nz)
        return set_dim(self, nx, ny, nz)

    def reverse_idx(self, x, y, z):
        nx, ny, nz = grid["dims"]
        return set_idx(self, nx - 1 - x, ny - 1 - y, nz - 1 - z)

    monkeypatch.setattr(builder, "set_grid_dim", record_dim)
    monkeypatch.setattr(builder, "set_grid_idx", reverse_idx)


@pytest.mark.parametrize(
    "order",
    [
        "forward",
        pytest.param("reversed", marks=interpreter_only("reorders the interpreter's programs")),
    ],
)
@pytest.mark.cuda
def test_triton_ties_across_programs(triton_kernels, monkeypatch, request, order):
    """Equal scores in different programs of a template, the partials of more programs than one
    chunk of the reduction holds (shrunk to 4), templates folded into one grid axis, and the
    programs run in either order: the lowest index wins, as in one sequential scan, with the
    same bits."""
    from dataclasses import replace

    if order == "reversed":
        request.getfixturevalue("reversed_programs")
    variant = triton_kernels._variant
    monkeypatch.setattr(
        triton_kernels,
        "_variant",
        lambda launch: replace(variant(launch), constexprs={**variant(launch).constexprs,
                                                            "PICK_BLOCK": 4}),
    )  # fmt: skip
    block = triton_kernels.SWEEP_BLOCK_N
    n = 10 * block - 3
    assert triton_kernels._sweep_split(2, n)[0] == 10
    generator = torch.Generator().manual_seed(5)
    x = features((2, n, 4), generator=generator)
    v = x[0, 0] / x[0, 0].norm()
    for b in range(2):
        x[b, [5 + b, 2 * block, n - 10]] = 10 * v
        x[b, [block + 1, n - block]] = -5 * v
    gamma = torch.tensor(1.0, dtype=torch.float64)
    expected = reference.quality_fps(x, 3, gamma)
    assert expected[:, :2].tolist() == [[5, block + 1], [6, block + 1]]
    noise = torch.zeros(2, 3, n)
    select = functools.partial(run_on, TRITON_DEVICE, triton_kernels.select)
    idx, logits, source = select(x, gamma, 3, noise=noise, record=True)
    assert torch.equal(idx, expected)
    again = select(x, gamma, 3, noise=noise, record=True)
    for first, second in zip((idx, logits, source), again, strict=True):
        assert torch.equal(first, second)  # deterministic: bit for bit


@PATHS
@pytest.mark.usefixtures("poisoned_outputs")
@pytest.mark.cuda
def test_triton_lengths_strided_zero_and_clamped(triton_select, on_chip):
    """A strided lengths view is read with its stride (not as the rows of the next template);
    a template of length 0 selects nothing."""
    x = features((3, 40, 12))
    gamma = torch.tensor(0.5, dtype=torch.float64)
    lengths = torch.tensor([40, 99, 0, 99, 17, 99], device=TRITON_DEVICE)[::2]
    assert not lengths.is_contiguous()
    idx, _, _ = triton_select(x, gamma, 4, lengths, on_chip=on_chip)
    assert torch.equal(idx, reference.quality_fps(x, 4, gamma, lengths.cpu()))
    assert (idx[1] == -1).all()
    assert (idx[2] >= 0).all()
    assert (idx[2] < 17).all()
    int32, _, _ = triton_select(x, gamma, 4, lengths.int(), on_chip=on_chip)
    assert torch.equal(int32, idx)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@PATHS
@pytest.mark.parametrize(
    ("lengths", "gamma", "message"),
    [
        ([5, 6], 1.0, r"quality_fps: lengths must lie in \[0, N = 5\]"),
        ([-1, 5], 1.0, r"quality_fps: lengths must lie in \[0, N = 5\]"),
        ([5, 5], float("nan"), r"quality_fps: gamma must be finite"),
        (None, float("inf"), r"quality_fps: gamma must be finite"),
    ],
)
@pytest.mark.cuda
@interpreter_only("a failed check is a device-side assert on CUDA (see CHECKS_RAISE)")
def test_triton_bad_lengths_and_gamma_fail_without_a_sync(
    triton_select, on_chip, lengths, gamma, message
):
    x = features((2, 5, 4))
    lengths = None if lengths is None else torch.tensor(lengths)
    with pytest.raises(RuntimeError, match=message):
        triton_select(x, torch.tensor(gamma, dtype=torch.float64), 3, lengths, on_chip=on_chip)


@pytest.mark.cuda
def test_triton_checks_without_rows(triton_select):
    x = torch.zeros(2, 0, 4)
    gamma = torch.tensor(1.0, dtype=torch.float64)
    idx, _, _ = triton_select(x, gamma, 3, torch.tensor([0, 0]))
    assert idx.shape == (2, 0)
    if not CHECKS_RAISE:
        return
    with pytest.raises(RuntimeError, match=r"lengths must lie in \[0, N = 0\]"):
        triton_select(x, gamma, 3, torch.tensor([0, 1]))
    with pytest.raises(RuntimeError, match=r"gamma must be finite"):
        triton_select(x, torch.tensor(float("nan"), dtype=torch.float64), 3)


def _launches(kernels, call):
    """The (kernel, grid, constexprs and options) of every Triton launch ``call`` makes."""
    from triton.runtime import interpreter

    seen = []
    original = interpreter.GridExecutor.__call__

    def record(self, *args, **kwargs):
        seen.append((self.fn.__name__, tuple(self.grid), kwargs))
        return original(self, *args, **kwargs)

    interpreter.GridExecutor.__call__ = record
    try:
        call()
    finally:
        interpreter.GridExecutor.__call__ = original
    return seen


@pytest.mark.parametrize(
    ("b", "n", "k", "dtype", "record", "scaled"),
    [
        (2, 1, 3, torch.float32, False, False),
        (3, 40, 5, torch.float16, True, False),
        (1, 256, 2, torch.bfloat16, False, True),
        (2, 257, 3, torch.float64, False, False),
        (1, 700, 3, torch.float32, True, False),
        (2, 300, 1, torch.float32, False, True),
    ],
)
@pytest.mark.cuda
@interpreter_only("records the interpreter's launches")
def test_triton_launches_exactly_its_plan(triton_kernels, b, n, k, dtype, record, scaled):
    x = features((b, n, 6), dtype)
    gamma = torch.tensor(0.5, dtype=torch.float64)
    noise = noise_for(x, k) if record else None
    row_scale = torch.rand(b, n) + 0.5 if scaled else None
    seen = _launches(
        triton_kernels,
        lambda: triton_kernels.select(x, gamma, k, noise=noise, record=record, row_scale=row_scale),
    )
    plan = triton_kernels.select_plan(b, n, 6, k, dtype, record, scaled)
    assert [(name, grid) for name, grid, _ in seen] == [(p.kernel, p.grid) for p in plan]
    for launch, (_, _, kwargs) in zip(plan, seen, strict=True):
        variant = triton_kernels._variant(launch)
        expected = {**variant.constexprs, **variant.options}
        assert {key: kwargs[key] for key in expected} == expected
        assert set(kwargs) == set(expected)


@pytest.mark.parametrize("b", [1, 32])
@pytest.mark.cuda
def test_triton_plan_fills_the_gpu_in_one_wave_and_folds_the_grid(triton_kernels, b):
    for n in (16384, 65536, 1_048_576, 5_000_000):
        (first, *rest) = triton_kernels.select_plan(b, n, 512, 3, torch.float32, False, False)
        assert len(rest) == 2
        assert [launch.grid for launch in rest] == [first.grid] * 2
        (programs,) = first.grid
        assert programs >= 132 or b > 1
        assert programs <= triton_kernels.SWEEP_SLOTS
    (launch,) = triton_kernels.select_plan(70000, 200, 512, 3, torch.float32, False, False)
    assert launch.grid == (70000,)
    (launch, *_) = triton_kernels.select_plan(70000, 5000, 512, 3, torch.float32, False, False)
    assert launch.grid == (70000,)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@PATHS
@pytest.mark.parametrize("record", [False, True], ids=["indices", "recording"])
@pytest.mark.cuda
@interpreter_only("wraps the interpreter's launches")
def test_triton_never_waits_for_the_device(triton_select, on_chip, record):
    """No .item(), nonzero(), .tolist() or .cpu() outside the kernels (the interpreter's own
    copies in and out of a launch aside): the launcher can be captured in a CUDA graph."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from triton.runtime import interpreter

    syncs = {"_local_scalar_dense", "nonzero", "masked_select", "equal", "_unique2"}
    inside = []
    original = interpreter.GridExecutor.__call__

    def launch(self, *args, **kwargs):
        inside.append(True)
        try:
            return original(self, *args, **kwargs)
        finally:
            inside.pop()

    class NoSync(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            assert inside or name not in syncs, f"{name} outside the kernels"
            return func(*args, **(kwargs or {}))

    x = features((2, 200, 8))
    gamma = torch.tensor(0.5, dtype=torch.float64)
    noise = noise_for(x, 3) if record else None
    lengths = torch.tensor([200, 17])
    interpreter.GridExecutor.__call__ = launch
    try:
        with NoSync():
            triton_select(x, gamma, 3, lengths, noise=noise, record=record, on_chip=on_chip)
        x[1, 3] = float("nan")
        with NoSync(), pytest.raises(RuntimeError, match="is not finite"):
            triton_select(x, gamma, 3, lengths, noise=noise, record=record, on_chip=on_chip)
    finally:
        interpreter.GridExecutor.__call__ = original


@pytest.mark.cuda
def test_triton_select_rejects_a_mode_without_its_inputs(triton_select):
    x = features((1, 5, 4))
    gamma = torch.tensor(0.5, dtype=torch.float64)
    with pytest.raises(ValueError, match="the recording mode takes noise"):
        triton_select(x, gamma, 3, record=True)
    with pytest.raises(ValueError, match="row_scale is for the plain mode only"):
        triton_select(x, gamma, 3, noise=noise_for(x, 3), record=True, row_scale=torch.ones(1, 5))
    with pytest.raises(ValueError, match="the on-chip path holds at most 256 rows, got 257"):
        triton_select(torch.ones(1, 257, 4), gamma, 3, on_chip=True)
