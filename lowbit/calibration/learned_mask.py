"""A learned sparsity mask: weights and mask found together by regularised optimisation (ProxSparse-style).

ProxSparse (Liu et al. 2025, arXiv 2502.00258) learns a 2:4 mask instead of choosing it in one shot: a
regulariser that is zero exactly when a group of 4 holds at most 2 nonzeros,

    R(w) = Σ_{i<j<k} |w_i·w_j·w_k|      (over each group of 4 consecutive weights along K),

is added to the training loss, and after each optimiser step the weights go through R's proximal operator, so
small entries reach exact zeros gradually while the others adapt. At the end the 2 largest of each group are
kept.

lowbit's variant works layer by layer on what the calibration engine already gathers (each linear's input
Hessian ``H = XᵀX``), not end to end: per linear it minimises SparseGPT's objective, the output error
``½‖X(W − W₀)ᵀ‖²``, plus ``λ·R``, by ADMM (the splitting ALPS, Meng et al. 2024, uses for layer-wise pruning),
which handles an ill-conditioned ``H`` far better than gradient steps:

    W ← argmin_W ½‖X(W − W₀)ᵀ‖² + ρ/2‖W − Z + U‖²     (exact: one eigendecomposition of H, two GEMMs a step)
    Z ← prox_{(λ/ρ)·R}(W + U)                          (ProxSparse's regulariser; unstructured: exact-count
                                                         projection, there is no such regulariser for it)
    U ← U + W − Z,    ρ grows geometrically so that W and Z meet.

Everything runs in Wanda's coordinates ``V = W·√diag(H)`` (per-column scaling, each row normalised to unit RMS),
so the regulariser compares weights by how much output they carry and ``λ`` means the same on every layer. The
prox has no closed form; ``R`` is linear in each coordinate, so exact coordinate minimisation
(``|z_i| = max(0, |a_i| − t·e₂(z_{−i}))``, smallest first) sweeps it down monotonically — this replaces the
paper's solver. The mask is then exact (the ``n`` largest ``|Z|`` of each group, or the exact per-row count for
unstructured) and the kept weights are refitted to the same objective by conjugate gradients: weights and mask
are both learned, and the stored weights are the refitted ones, not the original ones the paper keeps.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from lowbit.calibration.gptq import check_weight_hessian, single_thread
from lowbit.calibration.sparsity import SparsityPattern, check_pattern, prune_mask

__all__ = ["learn_mask", "prox_nm", "nm_regulariser"]


def nm_regulariser(w: torch.Tensor, m: int = 4) -> torch.Tensor:
    """ProxSparse's ``Σ_{i<j<k}|w_i w_j w_k|`` summed over the groups of ``m`` along the last dim (0 iff every
    group holds at most 2 nonzeros)."""
    a = w.abs().reshape(-1, m)
    e1 = a.sum(1)
    p2 = a.pow(2).sum(1)
    p3 = a.pow(3).sum(1)
    # e3 from power sums (Newton's identities)
    return ((e1.pow(3) - 3 * e1 * p2 + 2 * p3) / 6).sum()


_OTHERS = ((1, 2, 3), (0, 2, 3), (0, 1, 3), (0, 1, 2))


def prox_nm(a: torch.Tensor, t: float | torch.Tensor, sweeps: int = 1) -> torch.Tensor:
    """``argmin_z ½‖z − a‖² + t·R(z)`` for groups of 4 (rows of ``a [G, 4]``), by exact coordinate minimisation.

    Signs never flip (``|z_i| ≤ |a_i|``); each coordinate's update is exact because ``R`` is linear in it, so the
    objective never increases. Coordinates are visited smallest first: a small weight is zeroed against its
    large neighbours, after which the large ones no longer pay for it."""
    srt, order = a.abs().sort(dim=1)
    target = srt.t().contiguous()  # [4, G]: each coordinate a contiguous row
    y = target.clone()
    for _ in range(sweeps):
        for i, (j, k, m) in enumerate(_OTHERS):
            e2 = y[j] * y[k] + y[j] * y[m] + y[k] * y[m]  # of the other three (direct: no cancellation)
            y[i] = torch.clamp_min(target[i] - t * e2, 0)
    return torch.empty_like(srt).scatter_(1, order, y.t()) * a.sign()


def _project(v: torch.Tensor, p: SparsityPattern) -> torch.Tensor:
    """``v`` with its exact-pattern mask applied (the ``n`` largest of each group / per-row count kept)."""
    return v.masked_fill(prune_mask(v.abs(), p), 0.0)


def _refit(v0c: torch.Tensor, c: torch.Tensor, v: torch.Tensor, keep: torch.Tensor, iters: int) -> torch.Tensor:
    """Minimise ``½(v − v₀)C(v − v₀)ᵀ`` per row over the kept entries, by conjugate gradients started at ``v``
    (all rows at once: one ``[N, K]·[K, K]`` GEMM per iteration). ``v0c`` is ``v₀C``."""
    keep = keep.to(v.dtype)
    x = v * keep
    r = (v0c - x @ c) * keep
    d = r.clone()
    rr = (r * r).sum(1, keepdim=True)
    for _ in range(iters):
        cd = (d @ c) * keep
        alpha = rr / (d * cd).sum(1, keepdim=True).clamp_min(1e-30)
        x = x + alpha * d
        r = r - alpha * cd
        rr_new = (r * r).sum(1, keepdim=True)
        d = r + (rr_new / rr.clamp_min(1e-30)) * d
        rr = rr_new
    return x


def learn_mask(w: torch.Tensor, h: torch.Tensor, p: SparsityPattern, *, steps: int = 16, lam: float = 1.0,
               rho: float = 0.05, rho_growth: float = 1.4, refit_iters: int = 25, damp: float = 0.01,
               ) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Learn the mask and the kept weights of ``w [N, K]`` against the input Hessian ``h [K, K]`` (``XᵀX`` up to
    scale): minimise ``½‖X(W − W₀)ᵀ‖²`` over weights with the pattern ``p``.

    Returns (pruned weight in ``w``'s dtype, bool mask True where zeroed, stats). ``steps`` ADMM iterations with
    ``ρ = rho·rho_growth^k``; ``lam`` is the prox threshold ``λ/ρ`` (2:4: how hard a weight small against its 3
    neighbours is pushed to 0; ramped up over the first quarter); ``refit_iters`` conjugate-gradient steps on the
    final mask. Runs on ``h``'s device in float32 (the eigendecomposition in float64), on one CPU thread (as
    SparseGPT: measured 4x faster on this shared 2-core machine than two threads)."""
    with single_thread():
        return _learn_mask(w, h, p, steps, lam, rho, rho_growth, refit_iters, damp)


def _learn_mask(w: torch.Tensor, h: torch.Tensor, p: SparsityPattern, steps: int, lam: float, rho: float,
                rho_growth: float, refit_iters: int, damp: float) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    t0 = time.perf_counter()
    n, k = check_weight_hessian(w, h, "learned mask")
    check_pattern(k, p, "learned mask")
    if not bool(torch.isfinite(h).all()) or not bool(torch.isfinite(w).all()):
        raise ValueError("the weight or its input Hessian holds non-finite values")
    dev = h.device
    hd = h.to(torch.float64)
    diag = torch.diagonal(hd).clone()
    dead = diag <= 0
    diag[dead] = 1.0
    mean = float(diag[~dead].mean()) if bool((~dead).any()) else 1.0
    scale = (diag + damp * mean).sqrt()
    c = hd / scale[:, None] / scale[None, :]
    c[dead, :] = 0.0
    c[:, dead] = 0.0
    c.diagonal().fill_(1.0)  # H + damp·mean·I scaled to a unit diagonal; a dead input keeps only its own 1
    evals, q = torch.linalg.eigh(c)
    evals = evals.clamp_min(0).float()
    q = q.float()
    del hd
    c = c.float()
    scale = scale.float()
    w32 = w.detach().float().to(dev)
    v0 = w32 * scale[None, :]
    row_rms = v0.pow(2).mean(1, keepdim=True).sqrt().clamp_min(1e-12)
    v0 = v0 / row_rms
    v0c = v0 @ c  # the objective's linear term W₀H, in these coordinates

    def loss(v: torch.Tensor) -> float:
        """The objective ``½(v − v₀)C(v − v₀)ᵀ`` summed over rows, in normalised units."""
        return float(((v - v0) @ c * (v - v0)).sum()) / 2

    z = v0.clone()
    u = torch.zeros_like(v0)
    v = v0.clone()
    warm = max(1, steps // 4)
    for step in range(steps):
        r = rho * rho_growth ** step
        v = ((v0c + r * (z - u)) @ q / (evals + r)[None, :]) @ q.t()
        a = v + u
        if p.is_nm and p.m == 4 and p.n == 2 and lam > 0:
            z = prox_nm(a.reshape(-1, 4), lam * min(1.0, (step + 1) / warm)).reshape(n, k)
        else:
            z = _project(a, p)
        u = u + v - z
    mask = prune_mask(z.abs(), p)
    groups_left = int((((z.reshape(-1, p.m) != 0).sum(1) > p.n)).sum()) if p.is_nm else 0  # type: ignore[arg-type]
    fit = _refit(v0c, c, v, ~mask, refit_iters)
    out = fit * row_rms / scale[None, :]
    out[mask] = 0.0
    magnitude = _project(v0, p)  # the Wanda mask on the original weights, for the stats
    stats = {"loss": loss(fit), "loss_wanda_mask": loss(magnitude),
             "groups_not_nm_before_mask": groups_left, "seconds": time.perf_counter() - t0}
    return out.to(w.dtype), mask, stats
