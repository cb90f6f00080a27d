"""The ``autoround`` pass: round each block's weights, then learn the rounding so the *block's* output matches.

    autoround(w=int4,group=64)                        RTN start, 200 signed-gradient steps per block
    autoround(w=int4,group=64,awq=true,clip=true)     start from AWQ's scales and clipping instead

Block by block (``lowbit.calibration.engine``), the target linears are rounded to nearest (optionally on
AWQ's folded scales and searched clipping, as the ``awq`` pass does), written as the ``quantize`` pass's QDQ
form, and then tuned (``lowbit.calibration.block_tuning``, after AutoRound, Cheng et al. 2023): a per-weight
offset in [−½, ½] before rounding and a per-scale multiplier are learned by signed gradient descent so the
quantized block's output matches the float model's. The engine then runs the tuned block, so the next block
learns on what this one really produces. A block whose tuned loss is not lower than its starting loss keeps
its starting rounding (``tuned_blocks_kept`` in the stats says how many improved).

It needs gradients through the block, so it is a GPU pass in practice (``device=cuda``): 200 steps per block
on a CPU take minutes per block. Starting from GPTQ's rounding does not work this way (measured on SmolLM2:
GPTQ's codes are coupled through its error feedback, and straight-through steps that flip them raise the block
loss from the first step), so GPTQ is a separate pass rather than a starting point.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from lowbit.calibration.block_tuning import TuneOptions
from lowbit.ir.graph import Graph
from lowbit.passes.base import PassError, PassResult, register_pass
from lowbit.passes.gptq import (
    SITE_KINDS,
    WeightCalibrationOptions,
    WeightCalibrationPass,
    check_awq_options,
    rounding,
    run_weight_calibration,
)

__all__ = ["AutoRound", "AutoRoundOptions"]


class AutoRoundOptions(WeightCalibrationOptions):
    iters: int = Field(default=200, ge=1)
    """Signed-gradient steps per block, one calibration batch (``batch_size`` sequences) per step."""
    lr: float | None = Field(default=None, gt=0)
    """First step size, decaying linearly to 0 (code steps for the offsets, log-units for the scales); unset:
    1/iters."""
    scales: bool = True
    """Also learn one multiplier per weight scale, within [1/max_scale, max_scale]."""
    max_scale: float = Field(default=1.5, ge=1)
    """Bound of the learned scale multipliers (``scales=true``): each stays within [1/max_scale, max_scale]."""
    target: Literal["float", "quantized-input"] = "float"
    """``float``: match the float model's block output on the float model's own input, so a block also learns
    to correct what earlier blocks got wrong; ``quantized-input``: the float block on the quantized input."""
    awq: bool = False
    """Start from AWQ's activation-aware scales (folded into the preceding ops) instead of plain RTN."""
    clip: bool = False
    """Start from each group's clipping range searched by output error (AWQ's auto-clip)."""
    n_grid: int = Field(default=20, ge=1)
    """AWQ and clip search: grid points."""
    sites: list[str] = list(SITE_KINDS)
    """AWQ: where scales may be folded (norm, gated, attention-v)."""
    seed: int = 0
    """Order in which calibration batches are visited; read only when there are several (``calib_n`` above
    ``batch_size``): one batch is visited every step whatever the seed, so a seed set then is refused."""

    @model_validator(mode="after")
    def _searches_read(self) -> AutoRoundOptions:
        check_awq_options(self)
        self.refuse_unread({"max_scale": None if self.scales else "scales=true"})
        return self


@register_pass
class AutoRound(WeightCalibrationPass):
    """AutoRound-style block tuning: learned rounding offsets and scales per block, from RTN or AWQ's start."""

    name = "autoround"
    Options = AutoRoundOptions

    def run(self, graph: Graph) -> PassResult:
        o: AutoRoundOptions = self.options  # type: ignore[assignment]
        batch = o.batch_size_for(graph)
        if "seed" in o.model_fields_set and o.seed != 0 and o.calib_n <= batch:
            # one batch is visited in one order: the seed changed nothing, and two seeds gave the same model
            raise PassError(f"pass {self.name}: option seed={o.seed} orders the calibration batches the steps visit, "
                            f"but calib_n={o.calib_n} sequences make one batch of batch_size={batch}, visited every "
                            f"step whatever the seed: it would be silently ignored; give calib_n above {batch} (or a "
                            "smaller batch_size), or drop seed")
        tune = TuneOptions(iters=o.iters, lr=o.lr, scales=o.scales, max_scale=o.max_scale, target=o.target,
                           seed=o.seed)
        r = rounding("awq", self.name, scale_search=o.awq, clip=o.clip, n_grid=o.n_grid, sites=o.sites, tune=tune)
        return PassResult(True, run_weight_calibration(graph, o, r, self.name))
