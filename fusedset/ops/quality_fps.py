"""quality_fps: FaceCoresetNet's core-template selection, quality-aware farthest-point sampling.

Contract shared by the kernels and the reference (fusedset.reference.quality_fps):

- ``q_i = ||x_i||``. Step 0 picks the largest q; step t >= 1 picks the largest
  ``d_i = min over picks s of q_i^gamma * max(0, 1 - cos(x_i, x_s)) / 2``; ties go to the lowest
  index. A row is picked at most once.
- Ragged templates: a padded batch (B, N, C) and ``lengths`` (B,); rows at or past
  ``lengths[b]`` are never read for selection nor picked. Past ``min(k, lengths[b])`` steps the
  index is -1 and the selected row is zeros.
- Zero-norm rows have no direction: they are picked only once every other row of the template
  is, in index order, and take no part in any distance (nothing is divided by their norm).
- A NaN or inf in a valid row raises ValueError naming the row.
"""

from __future__ import annotations

import torch

from fusedset import _dispatch, reference
from fusedset._dtypes import accumulation_dtype
from fusedset.ops._autograd import first_order
from fusedset.ops._checks import check_device, check_real, check_tensor


def _check_args(
    op: str,
    x: torch.Tensor,
    k: int,
    gamma: float | torch.Tensor,
    lengths: torch.Tensor | None,
) -> torch.Tensor:
    """Checks the shared arguments; returns gamma as a 0-d tensor on x's device."""
    check_tensor(op, "x", x, dims="B, N, C")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"{op}: k must be a positive int, got {k!r}")
    if isinstance(gamma, torch.Tensor):
        if gamma.numel() != 1 or not gamma.is_floating_point():
            raise TypeError(
                f"{op}: gamma must be a float or a one-element float tensor, got "
                f"{gamma.dtype} of shape {tuple(gamma.shape)}"
            )
        check_device(op, "gamma", gamma, "x", x)
        gamma_t = gamma.reshape(())
    elif isinstance(gamma, (int, float)) and not isinstance(gamma, bool):
        gamma_t = torch.tensor(check_real(op, "gamma", gamma), dtype=torch.float64)
    else:
        raise TypeError(f"{op}: gamma must be a float or a 0-d tensor, got {type(gamma).__name__}")
    if lengths is not None:
        check_tensor(
            op, "lengths", lengths, dims="B", dtypes=(torch.int32, torch.int64, torch.int16)
        )
        if lengths.shape[0] != x.shape[0]:
            raise ValueError(
                f"{op}: lengths must have shape ({x.shape[0]},), got {tuple(lengths.shape)}"
            )
        check_device(op, "lengths", lengths, "x", x)
    return gamma_t.to(x.device)


def quality_fps(
    x: torch.Tensor,
    k: int,
    gamma: float | torch.Tensor,
    lengths: torch.Tensor | None = None,
    row_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Indices of FaceCoresetNet's core template, in selection order.

    Args:
        x: (B, N, C) unnormalized features (the norm is the image quality), float16, bfloat16,
            float32 or float64; distances are computed in float32 (float64 for float64).
        k: core template size; ``min(k, N)`` indices are returned per template.
        gamma: exponent of the quality in the distance (0 gives plain cosine FPS).
        lengths: optional (B,) integer tensor, the number of valid rows of each padded template.
        row_scale: optional (B, N) float tensor: the selection runs on the rows
            ``row_scale[b, i] * x[b, i]`` (their norm is the quality) without building them; a
            template given as unit directions and norms needs no (B, N, C) product.

    Returns:
        (B, min(k, N)) int64, -1 past a template's valid rows. See the module docstring.
    """
    gamma_t = _check_args("quality_fps", x, k, gamma, lengths)
    if row_scale is not None:
        check_tensor("quality_fps", "row_scale", row_scale, dims="B, N")
        if row_scale.shape != x.shape[:2]:
            raise ValueError(
                f"quality_fps: row_scale must have shape {tuple(x.shape[:2])} to match x, got "
                f"{tuple(row_scale.shape)}"
            )
        check_device("quality_fps", "row_scale", row_scale, "x", x)
    if _dispatch.use_reference("quality_fps", x.device):
        return reference.quality_fps(x, k, gamma_t, lengths, row_scale)
    return torch.ops.fusedset.quality_fps.default(x, k, gamma_t, lengths, row_scale)


def gumbel_noise(
    shape: tuple[int, ...],
    dtype: torch.dtype,
    device: torch.device,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Standard Gumbel samples, as torch.nn.functional.gumbel_softmax draws them."""
    return -torch.empty(shape, dtype=dtype, device=device).exponential_(generator=generator).log()


def quality_fps_select(
    x: torch.Tensor,
    k: int,
    gamma: float | torch.Tensor,
    tau: float = 1.0,
    scale: float = 1.0,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    """The differentiable (training) form of quality_fps: the selected rows themselves.

    Step t draws a hard one-hot from ``softmax((d_t * scale + g_t) / tau)`` over the available
    rows, with ``d_0 = q`` and ``d_t`` the distances of quality_fps, and back-propagates into
    ``x`` and ``gamma`` straight through the soft weights, as
    ``torch.nn.functional.gumbel_softmax(hard=True)`` does. As in FaceCoresetNet's training
    code, the next distances are measured from the straight-through row ``x^T y_t`` (so their
    gradient also reaches the soft weights of step t), and a row picked earlier stays in the
    soft weights of later steps at distance 0, though it is never picked again. Zero-norm rows
    never enter a soft distribution; a step that can only pick one has no soft path.

    Args:
        x, k, gamma, lengths: as in quality_fps (gamma may be a tensor that requires grad).
        tau: softmax temperature, > 0 (FaceCoresetNet: 1 in training, 1e-10 in eval).
        scale: multiplies the distances before the noise (FaceCoresetNet: 1, 1e4 in eval).
        noise: (B, min(k, N), N) Gumbel noise g; drawn from ``generator`` when None.

    Returns:
        (B, min(k, N), C) in x's dtype; zero rows past a template's valid rows.
    """
    gamma_t = _check_args("quality_fps_select", x, k, gamma, lengths)
    tau = check_real("quality_fps_select", "tau", tau, positive=True)
    scale = check_real("quality_fps_select", "scale", scale)
    steps = min(k, x.shape[1])
    acc = accumulation_dtype(x.dtype)
    if noise is None:
        noise = gumbel_noise((x.shape[0], steps, x.shape[1]), acc, x.device, generator)
    else:
        check_tensor("quality_fps_select", "noise", noise, dims="B, steps, N")
        if noise.shape != (x.shape[0], steps, x.shape[1]):
            raise ValueError(
                f"quality_fps_select: noise must have shape "
                f"({x.shape[0]}, {steps}, {x.shape[1]}), got {tuple(noise.shape)}"
            )
        check_device("quality_fps_select", "noise", noise, "x", x)
    if _dispatch.use_reference("quality_fps_select", x.device):
        return reference.quality_fps_select(x, k, gamma_t, tau, scale, noise, lengths)
    rows, _, _, _ = torch.ops.fusedset.quality_fps_select.default(
        x, k, gamma_t, tau, scale, noise, lengths
    )
    return rows


def gather_rows(x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """x[b, indices[b, t]] as (B, T, C), zeros where the index is -1."""
    picked = indices.clamp_min(0).unsqueeze(-1).expand(-1, -1, x.shape[2])
    return x.gather(1, picked).masked_fill((indices < 0).unsqueeze(-1), 0)


def select_backward(
    grad_rows: torch.Tensor,
    x: torch.Tensor,
    gamma: torch.Tensor,
    noise: torch.Tensor,
    indices: torch.Tensor,
    logits: torch.Tensor,
    source: torch.Tensor,
    scale: float,
    tau: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, dgamma) of quality_fps_select, from what its forward recorded.

    Per step the soft weights are recomputed from the recorded ``d_t`` and the noise (a row
    picked earlier enters them at distance 0, as in the reference); ``source`` says which pick's
    distance each ``d_t`` is, so the gradient of the running minimum goes to the pick the kernel
    kept. The row r_t of step t is straight-through, ``x^T y_t``, and the later distances are
    measured from it: its total gradient, the output gradient plus the distance-path gradient
    ``G_t = sum_i w[i, t] d dist(i, t) / d r_t``, reaches both the picked row and the soft
    weights of step t. G_t needs the distance gradients of every later step, so the steps are
    processed last to first, each step t < K - 1 sweeping X twice (``beta_t^T x`` for G_t, then
    ``x G_t``); with the sweep for the dot products with the output gradients and the picks
    (quality_fps_backward_dots) and the one writing dx (quality_fps_backward_spread), X is read
    2 K times in all; everything else is O(N K).
    """
    acc = logits.dtype
    batch, n, channels = x.shape
    steps = indices.shape[1]
    if steps == 0:  # no rows (N = 0): nothing was selected
        return torch.zeros_like(x), torch.zeros_like(gamma)
    g_rows = grad_rows.to(acc)
    picked = indices.clamp_min(0)
    has_pick = indices >= 0
    x_picked = gather_rows(x, indices).to(acc)

    projections, q = torch.ops.fusedset.quality_fps_backward_dots.default(
        x, torch.cat([g_rows, x_picked], dim=1)
    )
    # Rows with a direction inside their template (finite d_0 = q). Padding may hold anything,
    # NaN included: where() keeps it out of every sum below.
    live = (logits > float("-inf")).any(dim=1)
    projections = torch.where(live.unsqueeze(-1), projections, 0)
    q = torch.where(live, q, 0)
    h_out, dots = projections[..., :steps], projections[..., steps:]

    nonzero = q > 0
    q_safe = torch.where(nonzero, q, 1)
    inv_q = torch.where(nonzero, 1 / q_safe, 0)
    half_qg = torch.where(nonzero, q_safe ** gamma.to(acc), 0) / 2
    q_picked = q.gather(1, picked)
    inv_q_picked = torch.where(q_picked > 0, 1 / torch.where(q_picked > 0, q_picked, 1), 0)
    cos = dots * inv_q.unsqueeze(-1) * inv_q_picked.unsqueeze(1)
    # clamp_min(0)'s gradient passes at the boundary (1 - cos == 0), as autograd's does.
    active = (cos <= 1) & nonzero.unsqueeze(-1)
    dist = half_qg.unsqueeze(-1) * (1 - cos).clamp_min(0)

    # Rows picked at an earlier step: in the soft weights at distance 0, a constant.
    pick_mask = torch.zeros(batch, steps, n, dtype=torch.int32, device=x.device)
    pick_mask.scatter_(2, picked.unsqueeze(-1), has_pick.int().unsqueeze(-1))
    taken = ((pick_mask.cumsum(1) - pick_mask) > 0) & nonzero.unsqueeze(1)
    available = logits > float("-inf")
    z = (torch.where(taken, 0, logits) * scale + noise.to(acc)) / tau
    soft_step = available.any(dim=-1, keepdim=True)
    y_soft = torch.softmax(torch.where(soft_step, z, 0), dim=-1) * soft_step

    # X in the accumulation dtype with the rows outside every template zeroed (one copy), for
    # the per-step sweeps, batched mat-vecs.
    xm = torch.where(live.unsqueeze(-1), x.to(acc), 0) if steps > 1 else None

    # w[b, i, j]: gradient of the loss with respect to the distance from row i to pick j;
    # column j is complete once every step after j is processed.
    w = torch.zeros(batch, n, steps, dtype=acc, device=x.device)
    grad_r = g_rows * has_pick.unsqueeze(-1)  # the total gradient of each row r_t
    dd = torch.zeros(batch, steps, n, dtype=acc, device=x.device)
    src = source.clamp_min(0).long()
    for t in reversed(range(steps)):
        h = h_out[..., t]
        if t + 1 < steps:
            wa_t = w[..., t] * half_qg * active[..., t]
            beta_t = -wa_t * inv_q * inv_q_picked[:, t, None]
            along_t = (wa_t * cos[..., t]).sum(1) * inv_q_picked[:, t].square()
            g_t = torch.bmm(beta_t.unsqueeze(1), xm).squeeze(1)
            g_t = g_t + along_t.unsqueeze(-1) * x_picked[:, t]
            grad_r[:, t] += g_t
            h = h + torch.bmm(xm, g_t.unsqueeze(-1)).squeeze(-1)
        y = y_soft[:, t]
        dd_t = y * (h - (y * h).sum(-1, keepdim=True)) * (scale / tau)
        dd[:, t] = dd_t
        if t > 0:
            w.scatter_add_(
                2, src[:, t].unsqueeze(-1), torch.where(available[:, t], dd_t, 0).unsqueeze(-1)
            )

    wa = w * half_qg.unsqueeze(-1) * active
    coef = (w * dist * gamma.to(acc) + wa * cos).sum(-1) * inv_q.square() + dd[:, 0] * inv_q
    beta = -wa * inv_q.unsqueeze(-1) * inv_q_picked.unsqueeze(1)
    dx, _ = torch.ops.fusedset.quality_fps_backward_spread.default(x, coef, beta, x_picked)
    # The picked rows' share is added in the accumulation dtype (a no-op cast for float32).
    dx = dx.to(acc).scatter_add_(1, picked.unsqueeze(-1).expand(batch, steps, channels), grad_r)
    log_q = torch.where(nonzero, q_safe.log(), 0)
    dgamma = (w * dist * log_q.unsqueeze(-1)).sum()
    return dx.to(x.dtype), dgamma.to(gamma.dtype).reshape(gamma.shape)


if _dispatch.extension_loaded():

    @torch.library.register_fake("fusedset::quality_fps")
    def _quality_fps_fake(x, k, gamma, lengths=None, row_scale=None):
        return x.new_empty((x.shape[0], min(k, x.shape[1])), dtype=torch.long)

    @torch.library.register_fake("fusedset::quality_fps_select")
    def _quality_fps_select_fake(x, k, gamma, tau, scale, noise, lengths=None):
        batch, n, channels = x.shape
        steps = min(k, n)
        acc = accumulation_dtype(x.dtype)
        return (
            x.new_empty((batch, steps, channels)),
            x.new_empty((batch, steps), dtype=torch.long),
            x.new_empty((batch, steps, n), dtype=acc),
            x.new_empty((batch, steps, n), dtype=torch.int32),
        )

    def _setup_context(ctx, inputs, output) -> None:
        x, _, gamma, tau, scale, noise, _ = inputs
        _, indices, logits, source = output
        ctx.mark_non_differentiable(indices, logits, source)
        ctx.save_for_backward(x, gamma, noise, indices, logits, source)
        ctx.scale, ctx.tau = scale, tau

    @first_order("quality_fps_select")
    def _backward(ctx, grad_rows, *_):
        x, gamma, noise, indices, logits, source = ctx.saved_tensors
        dx, dgamma = select_backward(
            grad_rows, x, gamma, noise, indices, logits, source, ctx.scale, ctx.tau
        )
        return dx, None, dgamma, None, None, None, None

    torch.library.register_autograd(
        "fusedset::quality_fps_select", _backward, setup_context=_setup_context
    )

    @torch.library.register_fake("fusedset::quality_fps_backward_dots")
    def _backward_dots_fake(x, m):
        return x.new_empty((*x.shape[:2], m.shape[1]), dtype=m.dtype), x.new_empty(
            x.shape[:2], dtype=m.dtype
        )

    @torch.library.register_fake("fusedset::quality_fps_backward_spread")
    def _backward_spread_fake(x, coef, beta, x_picked):
        return torch.empty_like(x, memory_format=torch.contiguous_format), x.new_empty(
            (x.shape[0], beta.shape[2], x.shape[2]), dtype=coef.dtype
        )
