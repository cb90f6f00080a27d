"""Per-site clipping ratios of dynamic activation quantizers, searched on calibration data by output error.

A dynamic per-token quantizer takes its scale from ``clip_ratio·`` each token's range (``dynamic_qparams``):
1 keeps every value on the grid but makes the grid coarse; below 1 the largest values are clamped and the rest
get a finer grid. QuaRot uses one ratio (0.9) for every A4 input; the best ratio depends on how heavy the tails
of that input are, which differs per layer (the residual-stream inputs of q/k/v and gate/up, the head outputs
of o_proj, the gated MLP product of down_proj).

For one site — a ``dynamic_qparams → quantize → dequantize`` chain feeding linears with weights ``W`` (the
readers', concatenated along their outputs) — the search picks, over a grid of ratios, the one minimising

    Σ_tokens ‖(x̂(c) − x)·Wᵀ‖²  =  Σ_tokens (x̂(c) − x)·G·(x̂(c) − x)ᵀ,   G = WᵀW,

the error the quantized input adds to the readers' outputs (with their weights as the graph holds them: already
quantized when a weight quantizer ran first). ``x̂(c)`` runs the chain's own ops with the chain's own kwargs, so
the error searched is the graph's. The grid is coarse then refined once around the best point. The error is
summed in float32 through whichever is smaller, ``W`` ([out, C]) or ``G`` ([C, C]): down_proj's readers have
fewer outputs than inputs, q/k/v and gate/up more; the ratios compared differ far above float32 rounding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lowbit.ir.graph import Node
from lowbit.ir.ops import resolve

__all__ = ["ClipSite", "fake_quant", "output_error", "search_clip"]


@dataclass
class ClipSite:
    """A dynamic activation quantizer chain and the linears that read its output."""

    qparams: Node
    quantize: Node
    dequantize: Node
    readers: list[Node]


def fake_quant(site: ClipSite, x: torch.Tensor, clip: float) -> torch.Tensor:
    """``x`` through the site's chain with ``clip_ratio=clip`` (the chain's other kwargs as they are)."""
    kw = {**site.qparams.kwargs, "clip_ratio": clip}
    scale, zp = resolve("dynamic_qparams")(x, **kw)
    zp_arg = zp if site.quantize.args[2] is not None else None
    q = resolve("quantize")(x, scale, zp_arg, **site.quantize.kwargs)
    return resolve("dequantize")(q, scale, zp_arg, **site.dequantize.kwargs)


def output_error(site: ClipSite, x: torch.Tensor, w: torch.Tensor, clip: float) -> float:
    """Σ over the tokens of ``x`` ([N, C]) of ‖(x̂ − x)·Wᵀ‖²; ``w`` is ``W`` ([out, C]) or ``G`` = WᵀW ([C, C],
    symmetric: told apart by shape only when out ≠ C, and for out = C both give the same sum)."""
    d = fake_quant(site, x, clip).float() - x.float()
    if w.shape[0] == w.shape[1]:
        return float(((d @ w) * d).sum(dtype=torch.float64))
    return float((d @ w.T).pow(2).sum(dtype=torch.float64))


def search_clip(site: ClipSite, x: torch.Tensor, weights: Sequence[torch.Tensor], grid: Sequence[float],
                refine: float) -> tuple[float, float, float]:
    """The ratio of ``grid`` (then ± ``refine`` around the best, kept in (0, 1]) with the lowest output error
    on ``x``; returns (ratio, its error, the error at ratio 1)."""
    w = torch.cat([t.float() for t in weights], 0)
    gram = w if w.shape[0] < w.shape[1] else (w.T.double() @ w.double()).float()
    errors = {c: output_error(site, x, gram, c) for c in grid}
    best = min(errors, key=errors.__getitem__)
    for c in (best - refine, best + refine):
        c = round(c, 6)
        if 0 < c <= 1 and c not in errors:
            errors[c] = output_error(site, x, gram, c)
    best = min(errors, key=errors.__getitem__)
    at_one = errors[1.0] if 1.0 in errors else output_error(site, x, gram, 1.0)
    return best, errors[best], at_one
