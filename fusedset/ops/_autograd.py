"""The ops' registered backward functions are first order: their kernels have no derivative of
their own. Without a guard, a second derivative through them (``create_graph=True``) would come
back as zeros with only a UserWarning from torch; ``first_order`` makes it a clear error."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch


class _SecondDerivativeError(torch.autograd.Function):
    """Runs an op's backward as its forward, so the gradients it returns hang off this node, whose
    own backward (reached only when something differentiates those gradients) raises."""

    @staticmethod
    def forward(ctx, op: str, backward: Callable, op_ctx: Any, n_grads: int, *tensors):
        ctx.op = op
        return backward(op_ctx, *tensors[:n_grads])

    @staticmethod
    def backward(ctx, *_):
        raise RuntimeError(
            f"fusedset.ops.{ctx.op}: second derivatives are not supported (its backward is a "
            "fused kernel without a derivative of its own); for a gradient of a gradient, run "
            "the eager reference inside fusedset.force_reference()"
        )


def first_order(op: str | Callable[[Any], str]) -> Callable[[Callable], Callable]:
    """Decorates the backward registered with torch.library.register_autograd for the public op
    ``op`` (or ``op(ctx)``, for a registered op behind two public ones).

    The engine runs a backward with grad mode on only under ``create_graph=True``; then, if an
    output gradient or a saved tensor is part of a graph, the gradients returned carry a node
    that raises when differentiated. Gradients used only as values (a first-order step taken
    under create_graph) are unaffected, and so is every backward without create_graph.
    """

    def decorate(backward: Callable) -> Callable:
        @functools.wraps(backward)
        def guarded(ctx, *grads):
            if torch.is_grad_enabled():
                tensors = (*grads, *ctx.saved_tensors)
                if any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors):
                    name = op if isinstance(op, str) else op(ctx)
                    return _SecondDerivativeError.apply(name, backward, ctx, len(grads), *tensors)
            return backward(ctx, *grads)

        return guarded

    return decorate
