"""AWQ: activation-aware per-input-channel scales (and optional clipping) for low-bit weights.

Lin et al. (2023) observe that the few input channels carrying large activations matter most: scaling those
columns of ``W`` up by ``s`` before rounding (and the input down by ``s``, folded into the op that produces
it) shrinks their relative rounding error. The scale is searched on a grid ``s = mean|x|^α`` (or, with
``duo``, ``mean|x|^α / mean|ŵ|^(1−α)`` as AutoAWQ does), ``α ∈ [0, 1)``, normalised so
``max(s)·min(s) = 1``, keeping the α whose quantized layer output is closest to the float one.

The output error of a candidate is measured exactly through the input's second moment
``H = XᵀX``: ``Σ_tokens ‖x·(W − Ŵ)ᵀ‖² = Σ_rows ΔW_r · H · ΔW_rᵀ``. That is the same number AWQ computes by
running the calibration tokens through the layer, but costs ``N·K²`` per candidate instead of
``tokens·N·K``, so every calibration token counts (65,536 of them here) and the search is cheap on a CPU.
GPTQ needs the same ``H``, so one statistics pass (``HessianAccumulator``) serves both.

The clipping search (AWQ's ``auto_clip``) then shrinks each group's range by a factor in
``(1 − max_shrink, 1]``, per output row and group, keeping the factor with the smallest output error of that
group (its block of ``H``; cross-group terms are ignored, as AWQ ignores them).

Everything here returns numbers; folding ``s`` into the previous op is ``lowbit.calibration.scale_migration``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from lowbit.calibration.gptq import _check_group, fake_quantize, qdtype_of, single_thread, weight_qparams

__all__ = ["AWQScale", "awq_search_scale", "awq_search_clip", "scaled_hessian", "weighted_error"]


def weighted_error(delta: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Per row ``ΔW_r·H·ΔW_rᵀ``: the summed squared output error of row r over the tokens ``H`` was built from.

    float32 is enough: candidates are ranked by this, and their errors differ far above float32 rounding.
    """
    d = delta.float()
    return ((d @ h.float()) * d).sum(1)


def scaled_hessian(h: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``H`` of the input after it is divided by ``s`` (``diag(1/s)·H·diag(1/s)``)."""
    inv = 1.0 / s.double()
    return h.double() * inv[:, None] * inv[None, :]


@dataclass
class AWQScale:
    """The chosen scale (multiply the consumers' input columns by it, divide the producer by it) and the search."""

    scale: torch.Tensor
    alpha: float
    error: float
    """Summed output error of all the linears at the chosen scale."""
    error_unscaled: float
    """The same at s = 1 (plain RTN): the search never returns a worse scale than this."""
    seconds: float
    grid: list[tuple[float, float]] = field(default_factory=list)

    def stats(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "error": self.error, "error_rtn": self.error_unscaled,
                "gain": self.error_unscaled / self.error if self.error > 0 else float("inf")}


def _weight_mean(w: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """AutoAWQ's weight statistic: |w| normalised by its group's max, averaged over output rows."""
    n, k = w.shape
    g = group_size or k
    a = w.abs().float().reshape(n, k // g, g)
    a = a / a.amax(-1, keepdim=True).clamp(min=1e-12)
    return a.reshape(n, k).mean(0)


def awq_search_scale(
    h: torch.Tensor,
    x_abs_mean: torch.Tensor,
    weights: Sequence[torch.Tensor],
    bits: int | str = 4,
    group_size: int | None = None,
    symmetric: bool = False,
    n_grid: int = 20,
    duo: bool | None = False,
    loss_fn: Callable[[torch.Tensor], float] | None = None,
    expand: torch.Tensor | None = None,
) -> AWQScale:
    """Grid-search the per-input-channel scale of the linears in ``weights`` (all reading the same input).

    ``h`` is ``XᵀX`` of that input (any positive multiple works: only the ranking of candidates matters) and
    ``x_abs_mean`` its mean absolute value per channel. ``duo`` picks the candidate family: activation only (the
    paper's, default) or AutoAWQ's activation/weight ratio; None tries both (twice the time; on SmolLM2 layer 3
    the two families end within 2% of each other).
    ``expand`` ties input columns to the producer channels they come from (GQA ``v→o``: column j is channel
    ``expand[j]``): ``s`` then has the producer's length and the consumers use ``s[expand]``. ``loss_fn(s)``
    replaces the layer-output error with a caller's measure (a block's output error, say).
    The search runs on ``h``'s device (the weights are moved there); the scale is returned there.
    """
    t0 = time.perf_counter()
    k = int(x_abs_mean.numel())
    if h.shape != (k, k):
        raise ValueError(f"AWQ: second moment {tuple(h.shape)} does not match the input size {k}")
    for w in weights:
        if w.dim() != 2 or w.shape[1] != k:
            raise ValueError(f"AWQ: weight of shape {tuple(w.shape)} does not read an input of size {k}")
        _check_group(k, group_size)
    if n_grid < 1:
        raise ValueError(f"AWQ: n_grid must be positive, got {n_grid}")
    qd = qdtype_of(bits, symmetric)
    dev = h.device
    w_cat = torch.cat([w.float().to(dev) for w in weights], 0)
    x_mean = x_abs_mean.float().to(dev).clamp(min=0)
    w_mean = _weight_mean(w_cat, group_size)
    if expand is not None:  # pool the tied columns' statistics onto their producer channel
        expand = expand.to(dev)
        n_ch = int(expand.max()) + 1
        counts = torch.zeros(n_ch, device=dev).index_add_(0, expand, torch.ones(k, device=dev))
        x_mean = torch.zeros(n_ch, device=dev).index_add_(0, expand, x_mean) / counts
        w_mean = torch.zeros(n_ch, device=dev).index_add_(0, expand, w_mean) / counts
    h32 = h.float()

    def layer_error(s: torch.Tensor) -> float:
        if loss_fn is not None:
            return float(loss_fn(s))
        full = s if expand is None else s[expand]
        scaled = w_cat * full
        scale, zp = weight_qparams(scaled, qd, symmetric, group_size)
        deq = fake_quantize(scaled, scale, zp, qd, group_size)
        return float(weighted_error(w_cat - deq / full, h32).sum())

    with single_thread():
        return _grid(x_mean, w_mean, layer_error, n_grid, duo, t0)


def _grid(x_mean: torch.Tensor, w_mean: torch.Tensor, layer_error: Callable[[torch.Tensor], float], n_grid: int,
          duo: bool | None, t0: float) -> AWQScale:
    ones = torch.ones_like(x_mean)
    base = layer_error(ones)
    best_err, best_alpha, best_s = base, 0.0, ones
    grid = []
    for use_w in ([False, True] if duo is None else [duo]):
        for i in range(n_grid):
            alpha = i / n_grid
            s = x_mean.pow(alpha) / (w_mean.pow(1 - alpha) + 1e-4) if use_w else x_mean.pow(alpha)
            s = s.clamp(min=1e-4)
            s = s / (s.max() * s.min()).sqrt()
            s[~torch.isfinite(s)] = 1.0
            err = layer_error(s)
            grid.append((alpha, err))
            if err < best_err:
                best_err, best_alpha, best_s = err, alpha, s
    return AWQScale(best_s, best_alpha, best_err, base, time.perf_counter() - t0, grid)


def awq_search_clip(
    w: torch.Tensor,
    h: torch.Tensor,
    bits: int | str = 4,
    group_size: int | None = None,
    symmetric: bool = False,
    n_grid: int = 20,
    max_shrink: float = 0.5,
    rows_per_chunk: int = 512,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Per (row, group) range-shrink factor minimising that group's output error under ``h``.

    Returns ``shrink`` shaped like the weight's scale (``[N]`` per channel, ``[N, K/g]`` per group), for
    ``weight_qparams(w, ..., shrink=shrink)``; factor 1 (plain min-max) is always a candidate. Runs on ``h``'s
    device and returns ``shrink`` there.
    """
    t0 = time.perf_counter()
    n, k = w.shape
    _check_group(k, group_size)
    if not 0 <= max_shrink < 1:
        raise ValueError(f"AWQ clip: max_shrink must be in [0, 1), got {max_shrink}")
    qd = qdtype_of(bits, symmetric)
    g = group_size or k
    ng = k // g
    h32 = h.float()
    blocks = torch.stack([h32[j * g:(j + 1) * g, j * g:(j + 1) * g] for j in range(ng)])  # [G, g, g]
    dev = h.device
    wf = w.float().to(dev)
    best = torch.full((n, ng), float("inf"), device=dev)
    best_f = torch.ones(n, ng, device=dev)
    base = None
    with single_thread():
        for i in range(max(1, int(round(max_shrink * n_grid)))):
            f = 1.0 - i / n_grid
            scale, zp = weight_qparams(wf, qd, symmetric, group_size, torch.full((n, ng), f, device=dev))
            delta = (wf - fake_quantize(wf, scale, zp, qd, group_size)).reshape(n, ng, g)
            err = torch.empty(n, ng, device=dev)
            for r0 in range(0, n, rows_per_chunk):
                d = delta[r0:r0 + rows_per_chunk]  # [rows, G, g]
                err[r0:r0 + rows_per_chunk] = torch.einsum("rgi,gij,rgj->rg", d, blocks, d)
            if base is None:
                base = float(err.sum())
            better = err < best
            best = torch.where(better, err, best)
            best_f = torch.where(better, torch.full_like(best_f, f), best_f)
    shrink_out = best_f.reshape(n) if group_size is None else best_f
    stats = {"clip_error": float(best.sum()), "clip_error_minmax": base, "mean_shrink": float(best_f.mean()),
             "seconds": time.perf_counter() - t0}
    return shrink_out, stats
