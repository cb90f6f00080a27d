"""Whole-column OBS: which input columns (channels, head groups) of a linear to remove, and the least-squares
refit of the ones that stay (SlimGPT's structured Optimal Brain Surgeon; SparseGPT's update for whole columns).

A linear ``y = W·x + b`` loses input columns ``S``. With ``z = [x, 1]`` (the bias is one more column that is
never removed) and ``H = Σ zzᵀ`` over the calibration tokens, the least-squares error of dropping ``S`` while
refitting every other column and the bias is ``ΔE(S) = tr(W_S·([H⁻¹]_SS)⁻¹·W_Sᵀ)``, and the refit is
``W ← W − W_S·([H⁻¹]_SS)⁻¹·[H⁻¹]_S,:`` (the removed columns come out zero). After each removal the inverse of
the kept block of ``H`` is the Schur complement ``H⁻¹ − [H⁻¹]_:,S·([H⁻¹]_SS)⁻¹·[H⁻¹]_S,:``, so the greedy
choice (remove the unit of least ``ΔE``, update, repeat) needs one inverse in all. The constant column makes
FLAP's bias compensation part of the refit: whatever the removed channels carried on average moves to the bias.

Units are groups of columns (a channel: one column; a GQA group of heads: ``q_per_kv · head_dim`` columns),
all of one size. Everything runs in float64 on the device the Hessian is on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.calibration.linalg import solve

__all__ = ["ObsResult", "augmented_hessian", "remove_columns_obs"]


@dataclass
class ObsResult:
    weight: torch.Tensor
    """``[N, K]`` float64: the refit weight, removed columns zero."""
    bias_delta: torch.Tensor
    """``[N]`` float64: what the refit adds to the bias."""
    removed: list[int]
    """Units removed, in the order the greedy search took them."""
    loss: float
    """Sum of the ``ΔE`` of each removal (the calibration tokens' squared output error, damping aside)."""


def augmented_hessian(xtx: torch.Tensor, xsum: torch.Tensor, rows: int) -> torch.Tensor:
    """``Σ zzᵀ`` for ``z = [x, 1]`` from ``Σ xxᵀ``, ``Σ x`` and the token count (float64, ``[K+1, K+1]``)."""
    k = xtx.shape[0]
    h = torch.empty(k + 1, k + 1, dtype=torch.float64, device=xtx.device)
    h[:k, :k] = xtx
    h[:k, k] = xsum
    h[k, :k] = xsum
    h[k, k] = rows
    return h


def remove_columns_obs(w: torch.Tensor, h: torch.Tensor, unit: int, n_remove: int, damp: float = 0.01,
                       step: int = 1) -> ObsResult:
    """Greedily remove ``n_remove`` units of ``unit`` consecutive columns of ``w [N, K]`` given the augmented
    Hessian ``h [K+1, K+1]`` (``augmented_hessian``), refitting the rest and the bias after each.

    ``damp`` adds ``damp · mean(diag H)`` to the diagonal (few tokens for a wide layer leave ``H`` singular).
    ``step`` units are removed per update (the ``step`` of least ``ΔE`` each scored alone): 1 is the exact greedy
    search; larger is faster and only approximately greedy."""
    n, k = w.shape
    if k % unit or h.shape != (k + 1, k + 1):
        raise ValueError(f"remove_columns_obs: weight [{n}, {k}] with unit {unit} and Hessian {list(h.shape)}")
    units = k // unit
    if not 0 <= n_remove < units:
        raise ValueError(f"remove_columns_obs: cannot remove {n_remove} of {units} units")
    dev = h.device
    h = h.double().clone()
    diag = torch.diagonal(h)
    dead = diag == 0  # a column never active: its removal costs nothing; keep H invertible
    diag[dead] = 1.0
    diag += damp * float(diag[:k].mean())
    # cholesky_solve against I: the same inverse as cholesky_inverse, which is ~15x slower on CPU (K = 1536)
    hinv = torch.cholesky_solve(torch.eye(k + 1, dtype=torch.float64, device=dev), torch.linalg.cholesky(h))
    # the weight is kept transposed, [K+1, N]: each column's ΔE then sums along contiguous memory (over N strided
    # columns the sum of squares took 4x as long as the rest of a removal; vector_norm is faster again)
    wt = torch.zeros(k + 1, n, dtype=torch.float64, device=dev)
    wt[:k] = w.double().to(dev).t()
    alive = torch.ones(units, dtype=torch.bool, device=dev)
    removed: list[int] = []
    loss = 0.0
    eye = torch.eye(unit, dtype=torch.float64, device=dev)
    cols = torch.arange(k, device=dev).reshape(units, unit)
    while len(removed) < n_remove:
        # ΔE of each live unit alone
        if unit == 1:
            de = torch.linalg.vector_norm(wt[:k], dim=1).square_() / torch.diagonal(hinv)[:k]
        else:
            hb = hinv[cols[:, :, None], cols[:, None, :]]  # [units, unit, unit]
            wb = wt[:k].reshape(units, unit, n)  # [units, unit, N]
            sol = solve(hb + 1e-30 * eye, wb)  # [units, unit, N]
            de = (wb * sol).sum((1, 2))
        de = torch.where(alive, de, torch.full_like(de, float("inf")))
        take = torch.argsort(de, stable=True)[:min(step, n_remove - len(removed))]
        s = cols[take].reshape(-1)
        ws = wt[s]  # [|S|, N]
        rows = hinv[s]
        hss = rows[:, s]
        # one column: a division (linalg.solve's 1x1 LU costs more than the rank-1 update itself); the updates are
        # in place (no [K+1, K+1] temporary per removal)
        if len(s) == 1:
            coef, piv = ws / hss, rows / hss
        else:
            coef, piv = solve(hss, ws), solve(hss, rows)
        loss += float((ws * coef).sum())  # coef = ([H⁻¹]_SS)⁻¹·W_Sᵀ, [|S|, N]
        wt.addmm_(rows.t(), coef, alpha=-1)
        hinv.addmm_(hinv[:, s], piv, alpha=-1)
        wt[s] = 0
        hinv[s] = 0
        hinv[:, s] = 0
        hinv[s, s] = 1.0  # a placeholder pivot: the unit is dead, its ΔE is never read again
        alive[take] = False
        removed.extend(int(t) for t in take.tolist())
    return ObsResult(wt[:k].t().contiguous(), wt[k].clone(), removed, loss)
