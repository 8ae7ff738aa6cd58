"""cluster_accumulate: CAFace's Cluster Network assignment (Eq. 2-3, 7-8) as one streaming pass.

With ``L = queries @ keys^T * scale`` and ``A = softmax(L)`` over the centers (each image spreads a
unit of weight over the M centers), the op returns ``num = A @ values`` and ``den = A.sum(-1)``.
The kernels never form L or A in memory and split the images across threads/programs, adding
the partial sums in a fixed order: the same inputs give bitwise the same outputs.
"""

from __future__ import annotations

import torch

from fusedset import _dispatch, reference
from fusedset._dtypes import accumulation_dtype
from fusedset.ops._autograd import first_order
from fusedset.ops._checks import check_device, check_real, check_shape, check_tensor

_OP = "cluster_accumulate"
_CAFACE = "cluster_accumulate_caface"
INPUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_like(op: str, name: str, value: torch.Tensor, first: str, ref: torch.Tensor) -> None:
    if value.dtype != ref.dtype:
        raise TypeError(f"{op}: {name} has dtype {value.dtype}, {first} has {ref.dtype}")
    check_device(op, name, value, first, ref)


def cluster_accumulate(
    keys: torch.Tensor,
    queries: torch.Tensor,
    values: torch.Tensor,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Soft assignment of N images to M centers, accumulated.

    Args:
        keys: (B, N, D) per-image keys.
        queries: (B, M, D), or (1, M, D) shared across the batch; M >= 1.
        values: (B, N, C) per-image values.
        scale: finite logit scale, default ``D ** -0.5`` (1 at D = 0, where every logit is 0
            whatever the scale: each image spreads its weight evenly over the centers).
        All three share one dtype (float16, bfloat16, float32 or float64) and device; any
        strides (non-contiguous keys or values are copied once).

    Returns:
        ``num`` (B, M, C) and ``den`` (B, M), float32 (float64 for float64 inputs). N = 0 gives
        zeros. Differentiable in keys, queries and values.
    """
    check_tensor(_OP, "keys", keys, dims="B, N, D", dtypes=INPUT_DTYPES)
    check_tensor(_OP, "queries", queries, dims="B, M, D", dtypes=INPUT_DTYPES)
    check_tensor(_OP, "values", values, dims="B, N, C", dtypes=INPUT_DTYPES)
    b, n, d = keys.shape
    check_shape(
        _OP,
        "queries",
        queries,
        queries.shape[0] in (1, b) and queries.shape[1] >= 1 and queries.shape[2] == d,
        f"(1 or {b}, M >= 1, {d}) to match keys {tuple(keys.shape)}",
    )
    check_shape(
        _OP,
        "values",
        values,
        values.shape[:2] == (b, n),
        f"({b}, {n}, C) to match keys {tuple(keys.shape)}",
    )
    _check_like(_OP, "queries", queries, "keys", keys)
    _check_like(_OP, "values", values, "keys", keys)
    scale = reference.default_scale(d) if scale is None else check_real(_OP, "scale", scale)
    if _dispatch.use_reference(_OP, keys.device):
        return reference.cluster_accumulate(keys, queries, values, scale)
    num, den, _ = torch.ops.fusedset.cluster_accumulate.default(keys, queries, values, scale)
    return num, den


def cluster_accumulate_caface(
    tokens: torch.Tensor,
    features: torch.Tensor,
    centers: torch.Tensor,
    center_bias: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CAFace's assignment with the key projection folded into the centers, in one pass.

    The released model's logits are ``q_j . (W_k x_i + b_k) * scale`` with ``x_i`` the LayerNorm'd
    tokens. A module passes ``centers = q @ W_k`` (rows ``W_k^T q_j``) and
    ``center_bias = q @ b_k``, so ``W_k x`` is never formed and the tokens are read once.

    Args:
        tokens: (B, N, D) LayerNorm'd tokens x: the keys, and the second value stream (S').
        features: (B, N, C) raw identity features F: they enter as ``F / (||F|| + 1e-5)``.
        centers: (M, D) or (B, M, D) folded centers ``W_k^T q_j``.
        center_bias: (M,) or (B, M): ``q_j . b_k``.
        scale: finite logit scale (the released model uses ``128 ** -0.5``).

    Returns:
        ``feature_num`` (B, M, C) = A F_hat, ``token_num`` (B, M, D) = A x and ``den`` (B, M),
        float32 (float64 for float64 inputs). Differentiable in all four tensors.
    """
    check_tensor(_CAFACE, "tokens", tokens, dims="B, N, D", dtypes=INPUT_DTYPES)
    check_tensor(_CAFACE, "features", features, dims="B, N, C", dtypes=INPUT_DTYPES)
    for name, value, dims in (("centers", centers, "M, D"), ("center_bias", center_bias, "M")):
        if not isinstance(value, torch.Tensor):
            raise TypeError(
                f"{_CAFACE}: {name} must be a torch.Tensor of shape ({dims}), "
                f"got {type(value).__name__}"
            )
    b, n, d = tokens.shape
    check_shape(
        _CAFACE,
        "features",
        features,
        features.shape[:2] == (b, n),
        f"({b}, {n}, C) to match tokens {tuple(tokens.shape)}",
    )
    queries = centers.unsqueeze(0) if centers.dim() == 2 else centers
    check_shape(
        _CAFACE,
        "centers",
        centers,
        queries.dim() == 3
        and queries.shape[0] in (1, b)
        and queries.shape[1] >= 1
        and queries.shape[2] == d,
        f"(M, {d}) or ({b}, M, {d}) to match tokens {tuple(tokens.shape)}",
    )
    bias = center_bias.unsqueeze(0) if center_bias.dim() == 1 else center_bias
    check_shape(
        _CAFACE,
        "center_bias",
        center_bias,
        center_bias.dim() == centers.dim() - 1 and bias.shape == queries.shape[:2],
        f"{tuple(centers.shape[:-1])} to match centers {tuple(centers.shape)}",
    )
    for name, value in (("features", features), ("centers", centers), ("center_bias", center_bias)):
        _check_like(_CAFACE, name, value, "tokens", tokens)
    scale = check_real(_CAFACE, "scale", scale)
    if _dispatch.use_reference(_OP, tokens.device):
        return reference.cluster_accumulate_caface(tokens, features, centers, center_bias, scale)
    num, den, token_num = torch.ops.fusedset.cluster_accumulate.default(
        tokens, queries, features, scale, bias, True, True
    )
    return num, token_num, den


if _dispatch.extension_loaded():

    @torch.library.register_fake("fusedset::cluster_accumulate")
    def _fake(keys, queries, values, scale, query_bias=None, normalize_values=False,
              keys_as_values=False):  # fmt: skip
        acc = accumulation_dtype(keys.dtype)
        b, m = keys.shape[0], queries.shape[1]
        kd = keys.shape[2] if keys_as_values else 0
        return (
            keys.new_empty((b, m, values.shape[2]), dtype=acc),
            keys.new_empty((b, m), dtype=acc),
            keys.new_empty((b, m, kd), dtype=acc),
        )

    @torch.library.register_fake("fusedset::cluster_accumulate_backward")
    def _backward_fake(grad_num, grad_den, grad_key_num, keys, queries, values, scale,
                       query_bias=None, normalize_values=False, keys_as_values=False):  # fmt: skip
        return (
            keys.new_empty(keys.shape),
            queries.new_empty(queries.shape),
            values.new_empty(values.shape),
            queries.new_empty((0,))
            if query_bias is None
            else query_bias.new_empty(query_bias.shape),
        )

    def _setup_context(ctx, inputs, output) -> None:
        keys, queries, values, scale, query_bias, normalize_values, keys_as_values = inputs
        ctx.save_for_backward(keys, queries, values, query_bias)
        ctx.flags = (scale, normalize_values, keys_as_values)

    @first_order(lambda ctx: _CAFACE if ctx.flags[2] else _OP)
    def _backward(ctx, grad_num, grad_den, grad_key_num):
        keys, queries, values, query_bias = ctx.saved_tensors
        scale, normalize_values, keys_as_values = ctx.flags
        acc = accumulation_dtype(keys.dtype)
        b, m = keys.shape[0], queries.shape[1]
        kd = keys.shape[2] if keys_as_values else 0
        # An output that took no part in the loss comes back as None.
        if grad_num is None:
            grad_num = keys.new_zeros((b, m, values.shape[2]), dtype=acc)
        if grad_den is None:
            grad_den = keys.new_zeros((b, m), dtype=acc)
        if grad_key_num is None:
            grad_key_num = keys.new_zeros((b, m, kd), dtype=acc)
        dk, dq, dv, dbias = torch.ops.fusedset.cluster_accumulate_backward.default(
            grad_num, grad_den, grad_key_num, keys, queries, values, scale, query_bias,
            normalize_values, keys_as_values,
        )  # fmt: skip
        return dk, dq, dv, None, None if query_bias is None else dbias, None, None

    torch.library.register_autograd(
        "fusedset::cluster_accumulate", _backward, setup_context=_setup_context
    )
