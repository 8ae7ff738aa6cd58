"""sinusoid_attention_pool: softmax attention of a few queries over a long set whose keys carry a
LayerNorm'd sinusoidal code of a per-row position, in one pass over the set.

This is FaceCoresetNet's cross-attention from the core template to the whole template with the
key and value projections folded into the queries (fusedset.nn.folded_attention) and the norm
encoding of the keys scored from the norms themselves: the kernels never form the (N, D) codes,
the (N, C) keys nor the (N, R) scores, so the extra memory does not grow with N. Rows are split
across threads/programs and the partial softmax states are merged in a fixed order: the same
inputs give bitwise the same outputs.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from fusedset import _dispatch, reference
from fusedset._dtypes import accumulation_dtype
from fusedset.ops._autograd import first_order
from fusedset.ops._checks import check_device, check_real, check_shape, check_tensor
from fusedset.reference._sinusoid import frequency_divisors
from fusedset.reference.sinusoid_attention_pool import (
    attention_scores,
    code_angles,
    zero_padding,
)

_OP = "sinusoid_attention_pool"
# Rows per step of the backward's recomputation: bounds its extra memory whatever N is.
BACKWARD_CHUNK = 4096


def sinusoid_attention_pool(
    x: torch.Tensor,
    queries: torch.Tensor,
    position_queries: torch.Tensor,
    positions: torch.Tensor,
    *,
    row_scale: torch.Tensor | None = None,
    lengths: torch.Tensor | None = None,
    position_scale: float = 1.0,
    temperature: float = 10000.0,
    eps: float = 1e-5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of R queries over the rows of each template, pooled.

    Row i of template b is the value ``v_i = row_scale_i x_i``; its key score for query r is
    ``s_ir = v_i . queries_r + e_i . position_queries_r`` with ``e_i`` the LayerNorm (no affine,
    variance epsilon ``eps``) of the sinusoidal code of ``positions_i * position_scale``
    (channels 2k, 2k+1: sin, cos of it over ``temperature ** (2k / D)``, as
    fusedset.reference._sinusoid.sinusoidal_encoding).

    Args:
        x: (B, N, C) rows, N >= 1; float16, bfloat16, float32 or float64.
        queries: (B, R, C) queries for the rows, R >= 1.
        position_queries: (B, R, D) queries for the codes, D even.
        positions: (B, N) one position per row.
        row_scale: optional (B, N) factor of each row (1 when omitted).
        lengths: optional (B,) integer tensor in [1, N]: rows at or past lengths[b] are padding,
            never read.
        The small tensors may have any floating dtype; all share x's device.

    Returns:
        ``pooled`` (B, R, C) = ``sum_i softmax_i(s_ir) v_i`` and ``logsumexp`` (B, R) of the
        scores, float32 (float64 for float64 x). Differentiable in x, queries, position_queries,
        positions and row_scale.
    """
    check_tensor(_OP, "x", x, dims="B, N, C")
    check_tensor(_OP, "queries", queries, dims="B, R, C")
    check_tensor(_OP, "position_queries", position_queries, dims="B, R, D")
    check_tensor(_OP, "positions", positions, dims="B, N")
    batch, n, width = x.shape
    check_shape(_OP, "x", x, n >= 1, "(B, N >= 1, C)")
    check_shape(
        _OP,
        "queries",
        queries,
        queries.shape[0] == batch and queries.shape[1] >= 1 and queries.shape[2] == width,
        f"({batch}, R >= 1, {width}) to match x {tuple(x.shape)}",
    )
    code_width = position_queries.shape[2]
    check_shape(
        _OP,
        "position_queries",
        position_queries,
        position_queries.shape[:2] == queries.shape[:2] and code_width >= 2 and code_width % 2 == 0,
        f"({batch}, {queries.shape[1]}, D) with D even and >= 2 to match queries",
    )
    check_shape(_OP, "positions", positions, positions.shape == (batch, n), f"({batch}, {n})")
    tensors = {"queries": queries, "position_queries": position_queries, "positions": positions}
    if row_scale is not None:
        check_tensor(_OP, "row_scale", row_scale, dims="B, N")
        check_shape(_OP, "row_scale", row_scale, row_scale.shape == (batch, n), f"({batch}, {n})")
        tensors["row_scale"] = row_scale
    if lengths is not None:
        check_tensor(
            _OP, "lengths", lengths, dims="B", dtypes=(torch.int16, torch.int32, torch.int64)
        )
        check_shape(_OP, "lengths", lengths, lengths.shape == (batch,), f"({batch},)")
        tensors["lengths"] = lengths
    for name, value in tensors.items():
        check_device(_OP, name, value, "x", x)
    if lengths is not None and bool(((lengths < 1) | (lengths > n)).any()):
        raise ValueError(
            f"{_OP}: lengths must lie in [1, N = {n}] (a softmax needs at least one row), got "
            f"{lengths.tolist()}"
        )
    position_scale = check_real(_OP, "position_scale", position_scale)
    temperature = check_real(_OP, "temperature", temperature, positive=True)
    eps = check_real(_OP, "eps", eps, positive=True)
    if _dispatch.use_reference(_OP, x.device):
        return reference.sinusoid_attention_pool(
            x, queries, position_queries, positions, row_scale, lengths, position_scale,
            temperature, eps,
        )  # fmt: skip
    divisors = frequency_divisors(code_width, temperature, accumulation_dtype(x.dtype), x.device)
    # A call autograd records keeps every sine as torch forms it: the backward recomputes the
    # scores that way, and a training step must match the reference's to 1e-4 (the series'
    # float-rounding-level difference moved gamma's gradient by 1e-4 in the module test).
    differentiable = (x, queries, position_queries, positions, row_scale)
    recorded = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in differentiable
    )
    return torch.ops.fusedset.sinusoid_attention_pool.default(
        x, queries, position_queries, positions, divisors, position_scale, eps,
        row_scale, lengths, not recorded,
    )  # fmt: skip


class PoolInputs(NamedTuple):
    """The arguments of torch.ops.fusedset.sinusoid_attention_pool, in schema order."""

    x: torch.Tensor
    queries: torch.Tensor
    position_queries: torch.Tensor
    positions: torch.Tensor
    divisors: torch.Tensor
    position_scale: float
    eps: float
    row_scale: torch.Tensor | None
    lengths: torch.Tensor | None
    series: bool


# The inputs with a gradient; the rest get None.
DIFFERENTIABLE = ("x", "queries", "position_queries", "positions", "row_scale")
# Inputs every row reads whole (their gradient sums over the rows); the others are per row.
_SHARED = ("queries", "position_queries")


def _wanted(inputs: PoolInputs, needs_input_grad: tuple[bool, ...]) -> list[str]:
    """The differentiable inputs whose gradient autograd asks for."""
    # Arguments left at their defaults were not passed through autograd: no flag, no gradient.
    needed = dict.fromkeys(PoolInputs._fields, False)
    needed.update(zip(PoolInputs._fields, needs_input_grad, strict=False))
    return [k for k in DIFFERENTIABLE if needed[k] and getattr(inputs, k) is not None]


def _output_grads(
    grad_pooled: torch.Tensor | None,
    grad_logsumexp: torch.Tensor | None,
    pooled: torch.Tensor,
    logsumexp: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradients of pooled and logsumexp in their dtype, zeros for an unused output."""
    g = torch.zeros_like(pooled) if grad_pooled is None else grad_pooled.to(pooled.dtype)
    g_lse = torch.zeros_like(logsumexp) if grad_logsumexp is None else grad_logsumexp
    return g, g_lse.to(logsumexp.dtype)


def kernel_backward(
    grad_pooled: torch.Tensor | None,
    grad_logsumexp: torch.Tensor | None,
    inputs: PoolInputs,
    pooled: torch.Tensor,
    logsumexp: torch.Tensor,
    needs_input_grad: tuple[bool, ...],
) -> tuple[torch.Tensor | None, ...]:
    """The gradients through torch.ops.fusedset.sinusoid_attention_pool_backward: on CPU one
    pass of the C++ kernel (the scores recomputed as the forward kernel forms them, the shared
    gradients merged in a fixed order, no extra memory growing with N); on CUDA pool_backward."""
    wanted = _wanted(inputs, needs_input_grad)
    if not wanted:
        return (None,) * len(PoolInputs._fields)
    g, g_lse = _output_grads(grad_pooled, grad_logsumexp, pooled, logsumexp)
    mask = [k in wanted for k in DIFFERENTIABLE]
    grads = torch.ops.fusedset.sinusoid_attention_pool_backward.default(
        g, g_lse, pooled, logsumexp, *inputs, mask
    )
    by_name = dict(zip(DIFFERENTIABLE, grads, strict=True))
    return tuple(by_name[k] if k in wanted else None for k in PoolInputs._fields)


def pool_backward(
    grad_pooled: torch.Tensor | None,
    grad_logsumexp: torch.Tensor | None,
    inputs: PoolInputs,
    pooled: torch.Tensor,
    logsumexp: torch.Tensor,
    needs_input_grad: tuple[bool, ...],
) -> tuple[torch.Tensor | None, ...]:
    """The gradients of sinusoid_attention_pool for its inputs, in schema order, in eager
    PyTorch (the CUDA kernel of sinusoid_attention_pool_backward; the CPU kernel is C++).

    With a_ir = e^(s_ir - logsumexp_r) the softmax weights, ``dL/dv_i = sum_r a_ir g_r`` and
    ``dL/ds_ir = a_ir (g_r . (v_i - pooled_r) + glse_r)``. The scores and values of a chunk of
    rows are recomputed with autograd-visible math (fusedset.reference) and differentiated with
    these output gradients, so the extra memory is that of one chunk whatever N is.
    """
    wanted = _wanted(inputs, needs_input_grad)
    grads = {k: torch.zeros_like(getattr(inputs, k), dtype=pooled.dtype) for k in wanted}
    x, lengths = inputs.x, inputs.lengths
    g, g_lse = _output_grads(grad_pooled, grad_logsumexp, pooled, logsumexp)
    offset = g_lse.to(pooled.dtype) - (g * pooled).sum(-1)  # glse_r - g_r . pooled_r
    for start in range(0, x.shape[1] if wanted else 0, BACKWARD_CHUNK):
        stop = min(x.shape[1], start + BACKWARD_CHUNK)
        leaves = {}
        for k in DIFFERENTIABLE:
            value = getattr(inputs, k)
            if value is not None:
                value = value if k in _SHARED else value[:, start:stop]
                leaves[k] = value.detach().requires_grad_(k in wanted)
        with torch.enable_grad():
            rows = leaves["x"], leaves["positions"], leaves.get("row_scale")
            if lengths is not None:
                valid = torch.arange(start, stop, device=x.device) < lengths[:, None]
                rows = zero_padding(valid, *rows)
            positions = rows[1].to(pooled.dtype)
            angles = code_angles(positions, inputs.position_scale, inputs.divisors)
            values, scores = attention_scores(
                rows[0], leaves["queries"], leaves["position_queries"], angles, rows[2], inputs.eps
            )
        weights = torch.exp(scores.detach() - logsumexp[:, None, :])
        if lengths is not None:
            weights = weights * valid[..., None]
        d_scores = weights * (values.detach() @ g.transpose(1, 2) + offset[:, None, :])
        outputs = [(scores, d_scores), (values, weights @ g)]
        outputs = [pair for pair in outputs if pair[0].requires_grad]
        chunk_grads = torch.autograd.grad(
            [out for out, _ in outputs],
            [leaves[k] for k in wanted],
            [grad for _, grad in outputs],
            allow_unused=True,
        )
        for k, grad in zip(wanted, chunk_grads, strict=True):
            if grad is not None:
                target = grads[k] if k in _SHARED else grads[k][:, start:stop]
                target += grad
    return tuple(
        grads[k].to(getattr(inputs, k).dtype) if k in grads else None for k in PoolInputs._fields
    )


if _dispatch.extension_loaded():

    @torch.library.register_fake("fusedset::sinusoid_attention_pool")
    def _fake(x, queries, position_queries, positions, divisors, position_scale, eps,
              row_scale=None, lengths=None, series=True):  # fmt: skip
        acc = accumulation_dtype(x.dtype)
        batch, r = queries.shape[:2]
        return x.new_empty((batch, r, x.shape[2]), dtype=acc), x.new_empty((batch, r), dtype=acc)

    def _setup_context(ctx, inputs, output) -> None:
        ctx.is_tensor = [isinstance(t, torch.Tensor) for t in inputs]
        ctx.save_for_backward(*[t for t in inputs if isinstance(t, torch.Tensor)], *output)
        ctx.others = [t for t in inputs if not isinstance(t, torch.Tensor)]

    @first_order(_OP)
    def _backward(ctx, grad_pooled, grad_logsumexp):
        *tensors, pooled, logsumexp = ctx.saved_tensors
        tensors, others = iter(tensors), iter(ctx.others)
        inputs = PoolInputs(*(next(tensors) if t else next(others) for t in ctx.is_tensor))
        return kernel_backward(
            grad_pooled, grad_logsumexp, inputs, pooled, logsumexp, ctx.needs_input_grad
        )

    @torch.library.register_fake("fusedset::sinusoid_attention_pool_backward")
    def _fake_backward(grad_pooled, grad_logsumexp, pooled, logsumexp, x, queries,
                       position_queries, positions, divisors, position_scale, eps, row_scale,
                       lengths, series, output_mask):  # fmt: skip
        inputs = (x, queries, position_queries, positions, row_scale)
        return tuple(
            t.new_empty(t.shape) if want and t is not None else (x if t is None else t).new_empty(0)
            for t, want in zip(inputs, output_mask, strict=True)
        )

    torch.library.register_autograd(
        "fusedset::sinusoid_attention_pool", _backward, setup_context=_setup_context
    )
