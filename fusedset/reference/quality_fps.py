"""FaceCoresetNet's quality-aware farthest-point sampling as a plain eager loop.

The semantics every kernel reproduces (see fusedset.ops.quality_fps for the contract):
``d_0 = q`` (the norm); step t picks the row maximizing ``d_t * scale + g_t`` among the rows
still available (valid under ``lengths``, not yet selected, norm > 0), the lowest index on ties;
zero-norm rows come only when nothing else remains, in index order; then
``d_{t+1} = min(d_t, q^gamma * max(0, 1 - cos(x_i, x_s)) / 2)`` over the new pick s, an equal
new distance keeping the older one (which decides where the gradient of the minimum goes).

The differentiable form follows FaceCoresetNet's training code: x_s is the straight-through row
of step s (see ``_trace``), so the gradient of later distances also reaches the soft weights of
step s; and a row already picked stays in the soft distributions of later steps at distance 0
(its distance to itself), though the hard pick never takes it again.
"""

from __future__ import annotations

import torch

from fusedset._dtypes import accumulation_dtype


def _valid_rows(x: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
    positions = torch.arange(x.shape[1], device=x.device)
    if lengths is None:
        return torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
    return positions < lengths.to(x.device)[:, None]


def _valid_part(x: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
    """x in the accumulation dtype with padding zeroed: whatever padding holds (NaN included)
    reaches neither the values nor the gradients."""
    valid = _valid_rows(x, lengths).unsqueeze(-1)
    return torch.where(valid, x.to(accumulation_dtype(x.dtype)), 0)


def _trace(x, k, gamma, scale, tau, noise, lengths):
    """Runs the selection with autograd-visible math. Yields per step the one-hot pick y_hard,
    the soft weights y_soft = ``softmax((d_t * scale + g_t) / tau)`` (zeros at a step with no
    non-zero row left, which has no soft path: its logits would all be -inf) and the picked
    index (-1 when nothing is left).

    The next distances are measured from the straight-through row of the step,
    ``r_t = x^T (y_hard - y_soft.detach() + y_soft)``, as FaceCoresetNet's training code does:
    its value is the picked row, and its gradient reaches the soft weights (hence the logits of
    step t, x and gamma) besides the picked row itself."""
    acc = accumulation_dtype(x.dtype)
    xf = _valid_part(x, lengths)
    batch, n, _ = x.shape
    steps = min(k, n)
    gamma = torch.as_tensor(gamma, dtype=acc, device=x.device)
    q = xf.norm(dim=-1)
    available = _valid_rows(x, lengths)
    bad = (~torch.isfinite(q) & available).nonzero()
    if bad.numel():
        b, i = bad[0].tolist()
        raise ValueError(f"quality_fps: x[{b}, {i}] is not finite (NaN or inf in a valid row)")
    nonzero = q > 0
    # Stand-ins keep 1/q and q^gamma (and their gradients) finite on zero rows; where() then
    # drops them.
    q_safe = torch.where(nonzero, q, torch.ones_like(q))
    inv_q = torch.where(nonzero, 1 / q_safe, torch.zeros_like(q))
    half_qg = torch.where(nonzero, q_safe**gamma, torch.zeros_like(q)) / 2
    lowest = torch.finfo(acc).min
    rows = torch.arange(batch, device=x.device)
    d = q
    taken = torch.zeros_like(available)
    for t in range(steps):
        base = torch.where(available & nonzero, d, float("-inf"))
        g = torch.zeros_like(q) if noise is None else noise[:, t].to(acc)
        score = torch.where(available & nonzero, base.detach() * scale + g, float("-inf"))
        score = torch.where(available & ~nonzero, lowest, score)
        best = score.argmax(dim=1)  # the first maximum: lowest index on ties
        picked = torch.where(score[rows, best] > float("-inf"), best, -1)
        has = picked >= 0
        # A row picked earlier cannot be picked again, but it stays in the soft distribution at
        # its distance to itself, 0 (a constant), as in FaceCoresetNet's training code.
        soft_base = torch.where(taken & nonzero, 0, base)
        logits = (soft_base * scale + g) / tau
        soft_step = torch.isfinite(base).any(dim=1, keepdim=True)
        y_soft = torch.softmax(torch.where(soft_step, logits, 0), dim=1)
        y_soft = torch.where(soft_step, y_soft, 0)
        y_hard = torch.zeros_like(y_soft)
        y_hard[has, picked[has]] = 1
        yield y_hard, y_soft, picked
        if t + 1 == steps:
            break
        available[rows[has], picked[has]] = False
        taken[rows[has], picked[has]] = True
        # r_t = x^T y_t, y_t straight-through: the value is exactly the picked row (zeros when
        # nothing was picked), the gradient that of x^T y_t.
        soft_part = y_soft - y_soft.detach()
        x_picked = xf[rows, picked.clamp_min(0)] * has[:, None]
        r = x_picked.detach() + torch.einsum("bn,bnc->bc", soft_part, xf.detach())
        r = r + (x_picked - x_picked.detach())
        q_r = q[rows, picked.clamp_min(0)] * has
        r_norm = r.norm(dim=-1)
        norm_r = q_r.detach() + (r_norm - r_norm.detach())
        inv_r = torch.where(q_r > 0, 1 / torch.where(q_r > 0, norm_r, 1), 0)
        u_s = r * inv_r[:, None]
        cos = torch.einsum("bnc,bc->bn", xf, u_s) * inv_q
        dist = half_qg * (1 - cos).clamp_min(0)
        d = dist if t == 0 else torch.where(dist < d, dist, d)


def quality_fps(
    x: torch.Tensor,
    k: int,
    gamma: float | torch.Tensor,
    lengths: torch.Tensor | None = None,
    row_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B, N, C) -> (B, min(k, N)) int64 indices in selection order, -1 past a template's end.
    With row_scale (B, N), the selection of the rows row_scale[b, i] * x[b, i]."""
    if row_scale is not None:
        acc = accumulation_dtype(x.dtype)
        x = x.to(acc) * row_scale.to(acc)[..., None]
    with torch.no_grad():
        picks = [p for _, _, p in _trace(x, k, gamma, 1.0, 1.0, None, lengths)]
    if not picks:
        return torch.empty(x.shape[0], 0, dtype=torch.long, device=x.device)
    return torch.stack(picks, dim=1)


def selection_weights(
    x: torch.Tensor,
    k: int,
    gamma: float | torch.Tensor,
    tau: float = 1.0,
    scale: float = 1.0,
    noise: torch.Tensor | None = None,
    lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(y_hard, y_soft), each (B, min(k, N), N): the one-hot picks and the differentiable
    ``softmax((d_t * scale + g_t) / tau)`` per step, rows picked earlier at d_t = 0 (zeros at a
    step with no non-zero row left, which has no soft path: its logits would all be -inf)."""
    hard, soft = [], []
    for y_hard, y_soft, _ in _trace(x, k, gamma, scale, tau, noise, lengths):
        hard.append(y_hard)
        soft.append(y_soft)
    if not hard:
        empty = x.new_zeros(x.shape[0], 0, x.shape[1], dtype=accumulation_dtype(x.dtype))
        return empty, empty
    return torch.stack(hard, dim=1), torch.stack(soft, dim=1)


def quality_fps_select(
    x: torch.Tensor,
    k: int,
    gamma: float | torch.Tensor,
    tau: float = 1.0,
    scale: float = 1.0,
    noise: torch.Tensor | None = None,
    lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B, N, C) -> (B, min(k, N), C) selected rows (zeros past a template's end), with
    straight-through gradients through the soft weights: the ``gumbel_softmax(hard=True)`` of
    FaceCoresetNet's training code, one step at a time."""
    y_hard, y_soft = selection_weights(x, k, gamma, tau, scale, noise, lengths)
    y = y_hard - y_soft.detach() + y_soft
    return torch.einsum("btn,bnc->btc", y, _valid_part(x, lengths)).to(x.dtype)


def backward_dots(x: torch.Tensor, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fusedset::quality_fps_backward_dots, eagerly: (x m^T, ||x_i||) in m's dtype."""
    xf = x.to(m.dtype)
    return torch.bmm(xf, m.transpose(1, 2)), xf.norm(dim=-1)


def backward_spread(
    x: torch.Tensor, coef: torch.Tensor, beta: torch.Tensor, x_picked: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """fusedset::quality_fps_backward_spread, eagerly: (coef * x + beta x_picked, beta^T x), where a
    row whose coefficients are all zero counts as zero (padding is never read as a number)."""
    touched = (coef != 0) | (beta != 0).any(dim=-1)
    xf = torch.where(touched.unsqueeze(-1), x.to(coef.dtype), 0)
    dx = (xf * coef.unsqueeze(-1)).baddbmm_(beta, x_picked)
    return dx.to(x.dtype), torch.bmm(beta.transpose(1, 2), xf)
