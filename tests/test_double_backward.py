"""Second derivatives (issue 14, item 6): the fused backward kernels have no derivative of their
own, so differentiating a gradient through an op raises an error naming the op, where it used
to come back as zeros. The eager references are twice differentiable, and nonzero there."""

import pytest
import torch

import fusedset
from fusedset.ops import (
    cluster_accumulate,
    cluster_accumulate_caface,
    quality_fps_select,
    sinusoid_attention_pool,
    style_pool,
)


def _generator():
    return torch.Generator().manual_seed(0)


def _style_pool(x):
    return style_pool(x).square().sum()


def _cluster_accumulate(x):
    g = _generator()
    queries, values = torch.randn(2, 3, 4, generator=g), torch.randn(2, 7, 5, generator=g)
    num, den = cluster_accumulate(x, queries.double(), values.double())
    return num.square().sum() + den.square().sum()


def _cluster_accumulate_caface(x):
    g = _generator()
    features, centers = torch.randn(2, 7, 5, generator=g), torch.randn(3, 4, generator=g)
    bias = torch.randn(3, generator=g)
    outputs = cluster_accumulate_caface(x, features.double(), centers.double(), bias.double(), 0.5)
    return sum(out.square().sum() for out in outputs)


def _quality_fps_select(x):
    noise = torch.rand(2, 3, 7, generator=_generator(), dtype=torch.float64)
    return quality_fps_select(x, 3, 1.0, tau=0.5, noise=noise).square().sum()


def _sinusoid_attention_pool(x):
    g = _generator()
    queries, code_queries = torch.randn(2, 3, 4, generator=g), torch.randn(2, 3, 6, generator=g)
    positions = torch.rand(2, 7, generator=g) * 10
    pooled, logsumexp = sinusoid_attention_pool(
        x, queries.double(), code_queries.double(), positions.double()
    )
    return pooled.square().sum() + logsumexp.sum()


# (op, a scalar of its outputs with x as its first tensor, x's shape)
CASES = [
    ("style_pool", _style_pool, (2, 3, 4, 5)),
    ("cluster_accumulate", _cluster_accumulate, (2, 7, 4)),
    ("cluster_accumulate_caface", _cluster_accumulate_caface, (2, 7, 4)),
    ("quality_fps_select", _quality_fps_select, (2, 7, 4)),
    ("sinusoid_attention_pool", _sinusoid_attention_pool, (2, 7, 4)),
]
IDS = [case[0] for case in CASES]


def _input(shape):
    return torch.randn(shape, generator=_generator(), dtype=torch.float64).requires_grad_()


def _second_derivative(loss, x):
    (grad,) = torch.autograd.grad(loss(x), x, create_graph=True)
    (second,) = torch.autograd.grad(grad.square().sum(), x)
    return second


@pytest.mark.parametrize(("op", "loss", "shape"), CASES, ids=IDS)
def test_second_derivative_is_an_error_naming_the_op(op, loss, shape):
    x = _input(shape)
    with fusedset.force_reference():
        assert _second_derivative(loss, x).abs().max() > 1e-3  # what a silent zero would hide
    with pytest.raises(RuntimeError, match=rf"^fusedset\.ops\.{op}: second derivatives are not"):
        _second_derivative(loss, x)


@pytest.mark.parametrize(("op", "loss", "shape"), CASES, ids=IDS)
def test_second_derivative_of_a_linear_loss_is_an_error_too(op, loss, shape):
    """Through a linear head the output gradient is a constant: the gradient still depends on x
    through the saved inputs, and differentiating it must not give zeros either."""
    x = _input(shape)
    head = torch.randn(shape, dtype=torch.float64, generator=_generator())
    (grad,) = torch.autograd.grad(loss(x), x, create_graph=True)
    with pytest.raises(RuntimeError, match=rf"^fusedset\.ops\.{op}: second derivatives"):
        torch.autograd.grad((grad * head).sum(), x)


@pytest.mark.parametrize(("op", "loss", "shape"), CASES, ids=IDS)
def test_first_derivative_under_create_graph_is_unchanged(op, loss, shape):
    """A gradient taken with create_graph=True and used only as a value (a first-order step
    written that way) is the plain gradient, bit for bit."""
    x = _input(shape)
    (plain,) = torch.autograd.grad(loss(x), x)
    (graphed,) = torch.autograd.grad(loss(x), x, create_graph=True)
    assert graphed.requires_grad
    assert torch.equal(graphed.detach(), plain)
