"""The ``awq`` pass: activation-aware scales folded into the preceding ops, output-aware clipping, packed weights.

    awq(w=int4,group=64,sym=false)          scales at every foldable site, clipping search, RTN on that grid

Block by block (``lowbit.calibration.engine``), each group of linears sharing an input gets the per-channel
scale that minimises its quantized output error (``lowbit.calibration.awq``); the scale is folded exactly into
the op that produces the input (RMSNorm gain, ``up_proj`` rows for ``down_proj``, ``v_proj`` rows for
``o_proj``; ``lowbit.calibration.scale_migration``), then each weight group's clipping range is searched and
the weights are rounded to nearest on it. Linears whose input has no foldable producer keep scale 1 and only
get the clipping search (the stats list them). The QDQ form is the ``quantize`` pass's, written by its code.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from lowbit.ir.graph import Graph
from lowbit.passes.base import PassResult, register_pass
from lowbit.passes.gptq import (
    SITE_KINDS,
    WeightCalibrationOptions,
    WeightCalibrationPass,
    check_clip_grid,
    check_scale_grid,
    rounding,
    run_weight_calibration,
)

__all__ = ["AWQ", "AWQOptions"]


class AWQOptions(WeightCalibrationOptions):
    n_grid: int = Field(default=20, ge=1)
    """Grid points for the scale exponent α in [0, 1) and for the clipping factor."""
    scales: Literal["x", "xw", "both"] = "x"
    """Scale candidates: mean|x|^α (the paper), AutoAWQ's mean|x|^α / mean|ŵ|^(1-α), or the better of both."""
    clip: bool = True
    """Search each group's clipping range by output error (AWQ's auto-clip)."""
    max_shrink: float = Field(default=0.5, ge=0, lt=1)
    """Clipping: the ranges tried are 1 - i/n_grid of min-max for i < round(max_shrink·n_grid) (AutoAWQ's grid: 1
    down to 0.55 at the defaults)."""
    sites: list[str] = list(SITE_KINDS)
    """Where scales may be folded: norm (RMSNorm/LayerNorm → linears), gated (up_proj → down_proj),
    attention-v (v_proj → o_proj)."""

    @model_validator(mode="after")
    def _clip_reads_max_shrink(self) -> AWQOptions:
        self.refuse_unread({"max_shrink": None if self.clip else "clip=true"})
        check_clip_grid(self.clip, self.n_grid, self.max_shrink, f", max_shrink={self.max_shrink}")
        check_scale_grid(True, self.n_grid, self.scales, "scales=xw (AutoAWQ's candidates)")
        return self


@register_pass
class AWQ(WeightCalibrationPass):
    """AWQ: activation-aware per-channel scales (folded into the preceding op) + clipping search, int or fp8 weights."""

    name = "awq"
    Options = AWQOptions

    def run(self, graph: Graph) -> PassResult:
        o: AWQOptions = self.options  # type: ignore[assignment]
        r = rounding("awq", self.name, scale_search=True, clip=o.clip, n_grid=o.n_grid, scales=o.scales,
                     max_shrink=o.max_shrink, sites=o.sites)
        return PassResult(True, run_weight_calibration(graph, o, r, self.name))
