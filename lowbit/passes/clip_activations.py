"""``clip-activations``: each dynamic activation quantizer's clipping ratio, searched on calibration data.

    ...,gptq(w=int4,sym=false),quantize(a=int4,kv=int4,...),clip-activations(calib_n=16)

Why: ``quantize(a_clip=0.9)`` clips every per-token A4 scale by the same ratio, QuaRot's choice; inputs with
heavier tails (o_proj's head outputs, down_proj's gated product) want a different one than the rotated
residual stream. This pass runs calibration text block by block (``lowbit.calibration.engine``) through the
model as quantized so far, keeps up to ``tokens`` inputs of each ``dynamic_qparams`` chain feeding linears, and
sets the chain's ``clip_ratio`` to the grid point with the lowest error it adds to its readers' outputs
(``lowbit.calibration.act_clip``: ``Σ‖(x̂ − x)·Wᵀ‖²`` with the readers' weights as the graph holds them). A block
whose ratios changed is re-run, so later blocks are searched on what the clipped block really produces.

Place: after ``quantize`` (it needs the activation chains) and after the weight quantizers (the error is
measured through the quantized weights). Approximating: the stats list each site's ratio and its error
relative to no clipping (always ≤ 1: ratio 1 is on the grid). KV-cache chains (``attention`` reads them, not a
linear) are left as they are. A site whose ratio is 1 drops the kwarg, as ``quantize`` writes unclipped chains.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from pydantic import Field, field_validator

from lowbit.calibration.act_clip import ClipSite, search_clip
from lowbit.calibration.data import calib_size
from lowbit.calibration.engine import CalibrationError, batches_from_ids
from lowbit.calibration.engine import run as calibrate
from lowbit.ir.graph import Graph, Node
from lowbit.passes.base import NO_QLINEAR, CalibrationOptions, Pass, PassError, PassResult, ScopedOptions, register_pass

__all__ = ["ClipActivations", "ClipActivationsOptions", "find_clip_sites"]


class ClipActivationsOptions(CalibrationOptions, ScopedOptions):
    calib_n: int = Field(default=16, ge=1)
    """Calibration sequences (of ``calib_len`` tokens) run through the model."""
    tokens: int = Field(default=2048, ge=16, le=1_000_000)
    """Inputs kept per site (spread evenly over the batches); the search costs tokens × width² per grid point."""
    grid: list[float] = [0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 1.0]
    """Ratios tried first; then ± ``refine`` around the best."""
    refine: float = Field(default=0.025, ge=0, lt=0.5)
    """Offset of the two ratios tried beside the best of ``grid`` (kept in (0, 1]); 0 tries none."""

    @field_validator("grid")
    @classmethod
    def _in_range(cls, grid: list[float]) -> list[float]:
        if not grid or any(not 0 < c <= 1 for c in grid):
            raise ValueError("every ratio must be in (0, 1]")
        return sorted(set(grid) | {1.0})


def find_clip_sites(graph: Graph) -> list[ClipSite]:
    """Every ``dynamic_qparams → quantize → dequantize`` chain whose output only linears read (as their input)."""
    users = graph.users()
    sites = []
    for qp in graph.find("dynamic_qparams"):
        qs = [u for u in users.get(id(qp.outputs[0]), []) if u.op == "quantize"]
        if len(qs) != 1:
            continue
        dqs = [u for u in users.get(id(qs[0].output), []) if u.op == "dequantize"]
        if len(dqs) != 1:
            continue
        readers = users.get(id(dqs[0].output), [])
        if readers and all(r.op == "linear" and r.args[0] is dqs[0].output for r in readers):
            sites.append(ClipSite(qp, qs[0], dqs[0], list(readers)))
    return sites


@register_pass
class ClipActivations(Pass):
    """Search each dynamic activation quantizer's clip ratio by the error it adds to its readers' outputs."""

    name = "clip-activations"
    Options = ClipActivationsOptions
    requires = (NO_QLINEAR,)
    after = ("quantize", "gptq", "awq", "autoround")

    def run(self, graph: Graph) -> PassResult:
        o: ClipActivationsOptions = self.options  # type: ignore[assignment]
        t0 = time.perf_counter()
        found_sites = find_clip_sites(graph)
        sites = [s for s in found_sites if o.in_scope(s.qparams.module or "")]
        if found_sites and not sites:  # not 'run quantize(a=...) first': the scope left none of them
            where = ", ".join(sorted({s.qparams.module or s.qparams.name for s in found_sites})[:4])
            raise PassError(f"pass {self.name}: option modules={o.modules} matches none of the {len(found_sites)} "
                            f"dynamic activation quantizers feeding linears (at {where}, ...)")
        if not sites:
            raise PassError(f"pass {self.name}: no dynamic activation quantizer feeds a linear (run quantize(a=...) "
                            "first)")
        by_qp = {id(s.qparams): s for s in sites}
        by_reader = {id(r): s for s in sites for r in s.readers}
        ids = o.token_ids(graph, self.name)
        batches = batches_from_ids(graph, ids, o.batch_size_for(graph))
        per_batch = max(1, o.tokens // len(batches))
        kept: dict[int, list[torch.Tensor]] = {}
        weights: dict[int, torch.Tensor] = {}
        found: dict[str, dict[str, Any]] = {}

        def on_node(node: Node, args: tuple[Any, ...], kwargs: dict[str, Any], outs: list[Any]) -> None:
            if id(node) in by_qp:
                x = args[0].detach().reshape(-1, args[0].shape[-1])
                step = max(1, x.shape[0] // per_batch)
                kept.setdefault(id(node), []).append(x[::step][:per_batch].float())
            elif id(node) in by_reader and id(node) not in weights:
                weights[id(node)] = args[1].detach().float()

        def on_block(ctx) -> bool:  # type: ignore[no-untyped-def]
            changed = False
            for key in [k for k in kept if k in by_qp]:
                site = by_qp[key]
                x = torch.cat(kept.pop(key))
                if not bool(torch.isfinite(x).all()):  # every error NaN: min() kept the grid's first ratio (0.5)
                    raise PassError(f"pass {self.name}: the calibration inputs of the quantizer of "
                                    f"{site.qparams.module or site.qparams.name!r} are not finite (NaN/inf); give "
                                    "finite calibration data")
                ws = [weights.pop(id(r)) for r in site.readers if id(r) in weights]
                if len(ws) != len(site.readers):
                    continue  # a reader in a later stage: cannot happen for a block's own chains
                ratio, err, err1 = search_clip(site, x, ws, o.grid, o.refine)
                old = site.qparams.kwargs.get("clip_ratio", 1.0)
                kw = {k: v for k, v in site.qparams.kwargs.items() if k != "clip_ratio"}
                if ratio != 1.0:
                    kw["clip_ratio"] = ratio
                site.qparams.kwargs = kw
                changed |= ratio != old
                found[site.qparams.module or site.qparams.name] = {
                    "ratio": ratio, "was": old, "error_vs_unclipped": round(err / max(err1, 1e-30), 4)}
            return changed

        try:
            calibrate(graph, batches, on_node=on_node, on_block=on_block, progress=o.progress,
                      device=o.torch_device(self.name))
        except CalibrationError as exc:
            raise PassError(f"pass {self.name}: {exc}") from None
        missing = [s.qparams.module for s in sites if (s.qparams.module or s.qparams.name) not in found]
        if missing:
            raise PassError(f"pass {self.name}: calibration never reached the quantizer(s) of {missing[:3]}")
        ratios = [v["ratio"] for v in found.values()]
        return PassResult(True, {
            "sites": len(found), "ratio_min": min(ratios), "ratio_max": max(ratios),
            "ratio_mean": round(sum(ratios) / len(ratios), 4), **calib_size(ids),
            "seconds": round(time.perf_counter() - t0, 2), "ratios": found})
