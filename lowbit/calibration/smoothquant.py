"""SmoothQuant: move activation outliers into the weights before 8-bit activation quantization.

Xiao et al. (2023): a few input channels of a linear carry activations tens of times larger than the rest,
which ruins a per-token int8 scale for every other channel of that token. Dividing channel j of the input
by ``s_j = max|X_j|^α / max|W_:,j|^(1−α)`` (and multiplying the weight's column by it, which is exact) splits
the difficulty between activations and weights; α (the migration strength) = 0.5 balances them.

``smoothquant_scale`` computes ``s`` from calibration statistics (``HessianAccumulator.abs_max`` collects
``max|X_j|``); ``lowbit.calibration.scale_migration`` folds it into the producer (RMSNorm gain, ``up_proj``,
``v_proj``) and the consumers. ``search_alpha`` optionally picks α per site by the layer-output error of the
linears quantized as they will be (W8A8 by default, or the bits the pass is given) on a sample of calibration
tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["smoothquant_scale", "search_alpha", "int8_output_error", "quantized_output_error"]


def smoothquant_scale(
    act_absmax: torch.Tensor,
    weights: Sequence[torch.Tensor],
    alpha: float = 0.5,
    expand: torch.Tensor | None = None,
    min_scale: float = 1e-5,
) -> torch.Tensor:
    """Per-channel ``s = max|X|^α / max|W|^(1−α)`` over all ``weights`` (which read the same input).

    With ``expand`` (GQA ``v→o``: input column j carries producer channel ``expand[j]``), statistics of the
    columns sharing a channel are pooled by max and ``s`` has the producer's length. Channels that never fire
    or whose weights are all zero keep ``s = 1``; scales are clamped to ``≥ min_scale``, never 0 or NaN.
    ``s`` is computed on ``act_absmax``'s device (the weights are moved there).
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"SmoothQuant: alpha must be in [0, 1], got {alpha}")
    if not weights:
        raise ValueError("SmoothQuant: no weights given")
    k = act_absmax.numel()
    for w in weights:
        if w.dim() != 2 or w.shape[1] != k:
            raise ValueError(f"SmoothQuant: weight of shape {tuple(w.shape)} does not read an input of size {k}")
    a = act_absmax.double().reshape(-1)
    dev = a.device
    wmax = torch.stack([w.detach().to(dev).abs().double().amax(0) for w in weights]).amax(0)
    if expand is not None:
        expand = expand.to(dev)
        n = int(expand.max()) + 1
        a = torch.zeros(n, dtype=torch.float64, device=dev).scatter_reduce(0, expand, a, "amax", include_self=False)
        wmax = torch.zeros(n, dtype=torch.float64, device=dev).scatter_reduce(0, expand, wmax, "amax",
                                                                                include_self=False)
    s = a.pow(alpha) / wmax.pow(1.0 - alpha)
    ok = (a > 0) & (wmax > 0) & torch.isfinite(s)
    s = torch.where(ok, s, torch.ones_like(s)).clamp(min=min_scale)
    return s.float()


def _per_row(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric ``bits``-bit fake quantization with one scale per row (the last axis): per token for activations,
    per output channel for weights, as ``quantize(a=intN)`` / ``quantize(w=intN)`` do it (scale = absmax/qmax)."""
    qmax = 2 ** (bits - 1) - 1
    s = (x.abs().amax(-1, keepdim=True) / qmax).clamp(min=1e-12)
    return torch.round(x / s).clamp(-qmax - 1, qmax) * s


def _int8_per_token(x: torch.Tensor) -> torch.Tensor:
    """Symmetric int8 per-token fake quantization, as ``quantize(a=int8)`` does it (scale = absmax/127)."""
    return _per_row(x, 8)


def _int8_per_channel(w: torch.Tensor) -> torch.Tensor:
    return _per_row(w, 8)


def quantized_output_error(x: torch.Tensor, weights: Sequence[torch.Tensor], s: torch.Tensor,
                           expand: torch.Tensor | None = None, refs: Sequence[torch.Tensor] | None = None,
                           w_bits: int = 8, a_bits: int = 8) -> float:
    """Summed squared output error of the linears after smoothing with ``s``, their weights quantized per channel
    to ``w_bits`` and their input per token to ``a_bits`` (symmetric integers; 16: that side stays float).

    ``refs`` are the float outputs ``x·Wᵀ`` when the caller already has them (a search over many ``s``).
    Computed on ``x``'s device.
    """
    s = s.to(x.device)
    full = s if expand is None else s[expand.to(x.device)]
    xs = x.float() / full
    xq = xs if a_bits >= 16 else _per_row(xs, a_bits)
    err = 0.0
    for i, w in enumerate(weights):
        w = w.to(x.device)
        ref = refs[i] if refs is not None else x.float() @ w.float().t()
        ws = w.float() * full
        out = xq @ (ws if w_bits >= 16 else _per_row(ws, w_bits)).t()
        err += float((out - ref).double().pow(2).sum())
    return err


def int8_output_error(x: torch.Tensor, weights: Sequence[torch.Tensor], s: torch.Tensor,
                      expand: torch.Tensor | None = None, refs: Sequence[torch.Tensor] | None = None) -> float:
    """``quantized_output_error`` of W8A8 (per-channel W, per-token A) linears after smoothing with ``s``."""
    return quantized_output_error(x, weights, s, expand, refs)


def search_alpha(
    x_sample: torch.Tensor,
    act_absmax: torch.Tensor,
    weights: Sequence[torch.Tensor],
    alphas: Sequence[float] = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8),
    expand: torch.Tensor | None = None,
    w_bits: int = 8,
    a_bits: int = 8,
) -> tuple[float, torch.Tensor, dict[str, float]]:
    """The α (and its ``s``) with the smallest output error on ``x_sample`` of the linears quantized as they will
    be (``w_bits`` per channel, ``a_bits`` per token; W8A8 by default); α = 0 (no smoothing) competes too.

    Runs on ``x_sample``'s device; ``s`` is returned there."""
    results: dict[str, float] = {}
    weights = [w.to(x_sample.device) for w in weights]
    act_absmax = act_absmax.to(x_sample.device)
    refs = [x_sample.float() @ w.float().t() for w in weights]
    best: tuple[float, float, torch.Tensor] | None = None
    for alpha in (0.0, *alphas):
        s = smoothquant_scale(act_absmax, weights, alpha, expand) if alpha > 0 else \
            torch.ones(act_absmax.numel() if expand is None else int(expand.max()) + 1, device=x_sample.device)
        err = quantized_output_error(x_sample, weights, s, expand, refs, w_bits, a_bits)
        results[f"{alpha:g}"] = err
        if best is None or err < best[1]:
            best = (alpha, err, s)
    assert best is not None
    return best[0], best[2], results
