"""style_pool: CAFace's Style Input Maker statistics, [mean, std] over the spatial axes."""

from __future__ import annotations

import torch

from fusedset import _dispatch, reference
from fusedset._dtypes import accumulation_dtype
from fusedset.ops._autograd import first_order
from fusedset.ops._checks import check_tensor


def style_pool(x: torch.Tensor) -> torch.Tensor:
    """Per-channel spatial mean and unbiased std of backbone feature maps.

    Args:
        x: (B, C, H, W) feature maps, float16, bfloat16, float32 or float64, contiguous or
            channels_last (both read in place; other strides are copied once).

    Returns:
        (B, C, 2) in x's dtype: ``[..., 0]`` the mean and ``[..., 1]`` the std (divisor H*W - 1,
        as ``Tensor.std``) over H*W, accumulated in float32 (float64 for float64). As in torch,
        H*W == 1 gives a NaN std. Differentiable.
    """
    check_tensor("style_pool", "x", x, dims="B, C, H, W")
    if _dispatch.use_reference("style_pool", x.device):
        return reference.style_pool(x)
    out, _ = torch.ops.fusedset.style_pool.default(x)
    return out


if _dispatch.extension_loaded():
    # The op returns (out, stats): stats are the row statistics in the accumulation type that the
    # backward takes instead of reading x again to recompute them (csrc/ops/style_pool.h).
    @torch.library.register_fake("fusedset::style_pool")
    def _style_pool_fake(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (x.shape[0], x.shape[1], 2)
        return x.new_empty(shape), x.new_empty(shape, dtype=accumulation_dtype(x.dtype))

    @torch.library.register_fake("fusedset::style_pool_backward")
    def _style_pool_backward_fake(
        grad: torch.Tensor, x: torch.Tensor, stats: torch.Tensor
    ) -> torch.Tensor:
        return torch.empty_like(x)

    def _setup_context(ctx, inputs, output) -> None:
        (x,) = inputs
        _, stats = output
        ctx.mark_non_differentiable(stats)
        ctx.save_for_backward(x, stats)

    @first_order("style_pool")
    def _backward(ctx, grad: torch.Tensor, _grad_stats: torch.Tensor | None) -> torch.Tensor:
        x, stats = ctx.saved_tensors
        return torch.ops.fusedset.style_pool_backward.default(grad, x, stats)

    torch.library.register_autograd("fusedset::style_pool", _backward, setup_context=_setup_context)
