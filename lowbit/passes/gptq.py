"""The ``gptq`` pass: GPTQ int or fp8 weights from block-by-block calibration, emitted as QDQ weights.

    gptq(w=int4,group=64,sym=false)                 GPTQ, act-order, static groups
    gptq(w=int4,sym=false,awq=true,clip=true)       AWQ scales + output-aware clipping, then GPTQ on that grid
    gptq(w=fp8e4m3,group=64)                        GPTQ onto the fp8 grid (symmetric: fp8 has no zero point)

The calibration engine (``lowbit.calibration.engine``) runs the graph block by block; while a block runs,
the input of every target linear feeds a ``HessianAccumulator`` (one per input value: q/k/v share one). When
the block is done, its linears are quantized (rows of linears sharing an input go through GPTQ together),
their weights become ``dequantize`` of packed codes exactly as the ``quantize`` pass writes them, and the
engine re-runs the block so the next block calibrates on what the quantized block really produces.

Which linears are quantized, and with what scheme, is the ``quantize`` pass's annotation
(``QuantConfig`` + ``plan``: ``lm_head`` and embeddings stay float, ``keep=`` adds globs, ``group_fallback``
handles SmolLM2's 576 inputs with group 128). The QDQ nodes and packed params are written by the ``quantize``
pass's own code (``quantize_graph`` on the block's linears); this pass then replaces the codes, scales and
zero points with GPTQ's, so names, layout, metadata and the size report are the same as for RTN.

The shared driver (``calibrate_weights``) also serves the ``awq`` pass: both need the same statistics, the
same emission and the same scale migration, and differ only in how a block's weights are rounded.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from pydantic import Field

from lowbit.calibration.awq import awq_search_clip, awq_search_scale, scaled_hessian
from lowbit.calibration.block_tuning import TuneOptions, TuneStats, float_targets, tune_block
from lowbit.calibration.engine import BlockRun, batches_from_ids, home_device, run, split_stages, static_batch
from lowbit.calibration.gptq import HessianAccumulator, gptq_quantize, quantize_with, weight_qparams
from lowbit.calibration.scale_migration import MigrationSite, apply_scale, find_sites, site_for
from lowbit.ir.graph import Graph, Node
from lowbit.ir.qscheme import DEFAULT_KEEP_FLOAT, ModuleRule, QScheme, QuantConfig
from lowbit.ir.quant import get_qdtype, stored_codes
from lowbit.passes.base import CalibrationOptions, Pass, PassError, PassResult, register_pass
from lowbit.passes.fold_norms import private_weight
from lowbit.passes.insert_qdq import WeightPlan, plan, quantize_graph

__all__ = ["WeightCalibrationOptions", "GPTQOptions", "GPTQ", "calibrate_weights", "SITE_KINDS"]

SITE_KINDS = ("norm", "gated", "attention-v")


class WeightCalibrationOptions(CalibrationOptions):
    """What to quantize (as the ``quantize`` pass's weight options) and the calibration data."""

    w: str = "int4"
    """Weight qdtype: int8, int4, uint4, int3, int2, or fp8e4m3/fp8e5m2 (rounded as ``quantize`` casts fp8)."""
    group: int | None = Field(default=None, gt=0)
    """Weight group size along the input dim; unset: one scale per output channel."""
    group_fallback: int | None = Field(default=None, gt=0)
    """Group size for linears whose input size ``group`` does not divide (SmolLM2's 576 with group=128)."""
    sym: bool = False
    """Symmetric weights (no zero point). Asymmetric is the default for integer weights: it tracks SmolLM2's Q4_1
    weights better. fp8 weights are always symmetric (no zero point): left unset, sym means true for them; an
    explicit sym=false with fp8 is an error."""
    keep: list[str] = []
    """Extra module globs kept float (added to the default lm_head and embeddings)."""
    calib_n: int = Field(default=64, ge=1)
    """Calibration sequences (the shipped text has 117 windows of 512; give a longer file for more)."""


class GPTQOptions(WeightCalibrationOptions):
    act_order: bool = True
    """Quantize columns in order of decreasing Hessian diagonal."""
    static_groups: bool = True
    """With act_order and groups: each group's grid from the original weights (keeps groups contiguous)."""
    damp: float = 0.01
    """Diagonal damping, relative to the Hessian's mean diagonal."""
    block_size: int = 128
    """Columns per lazy-batch update."""
    awq: bool = False
    """Search AWQ scales first and fold them into the preceding ops (norms, up_proj, v_proj)."""
    clip: bool = False
    """Search each group's clipping range by output error (AWQ's auto-clip) and run GPTQ on that grid."""
    n_grid: int = 20
    """AWQ: grid points for the scale exponent and for the clipping factor."""
    sites: list[str] = list(SITE_KINDS)
    """AWQ: where scales may be folded (norm, gated, attention-v)."""
    single_pass: bool = True
    """Quantize each group of linears the moment its input has been computed for all calibration sequences,
    so every block runs once (on all sequences as one batch) instead of twice; later linears of the block
    then see the quantized earlier ones (true-sequential GPTQ). Off (or with awq=true): two runs per block,
    ``batch_size`` sequences at a time."""


@dataclass
class _Group:
    """Target linears reading one input value, quantized together."""

    key: int
    plans: list[WeightPlan]
    site: MigrationSite | None = None
    acc: HessianAccumulator | None = None
    first: int = 0
    """id() of the node whose input feeds the accumulator (the group's first reader in graph order)."""
    done: bool = False
    pending: list[tuple[WeightPlan, torch.Tensor, torch.Tensor, torch.Tensor | None]] = field(default_factory=list)
    """Single pass: rounded in flight, waiting for the block's end to be written as QDQ."""


@dataclass
class _Rounding:
    """How a block's weights are rounded: GPTQ (optionally on AWQ's grid) or AWQ's scaled RTN."""

    method: Literal["gptq", "awq"]
    scale_search: bool
    clip: bool
    n_grid: int = 20
    scales: Literal["x", "xw", "both"] = "x"
    max_shrink: float = 0.5
    act_order: bool = True
    static_groups: bool = True
    damp: float = 0.01
    block_size: int = 128
    sites: Sequence[str] = SITE_KINDS
    single_pass: bool = False
    tune: TuneOptions | None = None

    @property
    def needs_hessian(self) -> bool:
        """GPTQ, AWQ's scale search and its clip search read ``XᵀX``; a plain RTN start does not."""
        return self.method == "gptq" or self.scale_search or self.clip


@dataclass
class _Stats:
    linears: int = 0
    groups: int = 0
    scaled_groups: int = 0
    seconds_search: float = 0.0
    seconds_round: float = 0.0
    gptq_loss: float = 0.0
    damp_raised: int = 0
    dead_columns: int = 0
    alphas: list[float] = field(default_factory=list)
    awq_gain: list[float] = field(default_factory=list)
    unscaled: list[str] = field(default_factory=list)
    in_flight: int = 0
    bytes_before: int = 0
    bytes_after: int = 0


_Result = tuple[WeightPlan, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]
"""(plan, codes, scale, zero point, dequantized weight) of one quantized linear."""


def _config(o: WeightCalibrationOptions, pass_name: str) -> tuple[QuantConfig, QScheme]:
    """The quantize pass's annotation for our options. fp8 is symmetric whatever ``sym``'s default says: the
    default (false) is chosen for int4, and an fp8 user who never wrote ``sym`` asked for nothing asymmetric."""
    try:
        symmetric = o.sym
        if get_qdtype(o.w).is_float:
            if "sym" in o.model_fields_set and not o.sym:
                raise PassError(f"pass {pass_name}: option sym=false: w={o.w} is a float format with no zero point "
                                "(symmetric only); drop sym or set sym=true")
            symmetric = True
        scheme = QScheme(qdtype=o.w, symmetric=symmetric, granularity="per_group" if o.group else "per_channel",
                         group_size=o.group)
    except ValueError as exc:
        if isinstance(exc, PassError):
            raise
        raise PassError(f"pass {pass_name}: option w={o.w!r}: {exc}") from None
    cfg = QuantConfig(weight=scheme)
    if o.keep:  # model_copy: the defaults must not count as patterns the user wrote (each must match)
        cfg = cfg.model_copy(update={"keep_float": list(DEFAULT_KEEP_FLOAT) + list(o.keep)})
    return cfg, scheme


def _emit(graph: Graph, results: list[_Result], pass_name: str) -> tuple[int, int]:
    """Write the block's weights as the ``quantize`` pass does, then put our codes and qparams in its params."""
    rules = []
    for wp, *_ in results:
        scheme = wp.scheme if wp.group in (None, wp.scheme.group_size) else \
            wp.scheme.model_copy(update={"group_size": wp.group})
        rules.append(ModuleRule(pattern=wp.node.module, weight=scheme))
    stats = quantize_graph(graph, QuantConfig(rules=rules, keep_float=[]))
    if stats["weights_quantized"] != len(results):
        raise PassError(f"pass {pass_name}: quantizing {len(results)} linears by module path touched "
                        f"{stats['weights_quantized']}: several linears share a module path in this block")
    for wp, q, scale, zp, _ in results:
        dq = wp.node.args[1].producer
        if dq is None or dq.op != "dequantize":
            raise PassError(f"pass {pass_name}: linear %{wp.node.name} ({wp.node.module}) got no weight dequantize")
        qv, sv, zv = dq.args[0], dq.args[1], dq.args[2]
        qd = get_qdtype(dq.kwargs["qdtype"])
        packed = stored_codes(q, qd)
        for v, t in ((qv, packed), (sv, scale.float()), (zv, zp)):
            if (v is None) != (t is None) or (v is not None and tuple(v.data.shape) != tuple(t.shape)):
                raise PassError(f"pass {pass_name}: {wp.node.module}: layout mismatch between the quantize pass's "
                                f"params and the computed ones ({None if v is None else tuple(v.data.shape)} vs "
                                f"{None if t is None else tuple(t.shape)})")
            if v is not None:
                graph.set_param(v.name, t)
    return stats["quantized_weight_bytes_before"], stats["quantized_weight_bytes_after"]


def _round_group(graph: Graph, g: _Group, r: _Rounding, h: torch.Tensor | None, device: torch.device, st: _Stats,
                 unrounded: dict[int, torch.Tensor] | None = None) -> list[_Result]:
    """Quantize the (already scaled) weights of one group; (plan, codes, scale, zero point, dequantized) each.

    ``h`` is ``None`` exactly when ``r`` does not need it (a plain RTN start). The rounding runs on ``device``
    (the calibration device); the results go back to each weight's device.
    ``unrounded`` receives, per linear node id, the weights the rounding rounded (GPTQ's error-compensated ones),
    on the calibration device: block tuning starts from them."""
    t0 = time.perf_counter()
    out = []
    # Linears with one scheme and group share a GPTQ call on their stacked rows (identical to separate calls).
    buckets: dict[tuple[QScheme, int | None], list[WeightPlan]] = {}
    for wp in g.plans:
        buckets.setdefault((wp.scheme, wp.group), []).append(wp)
    for (scheme, group), wps in buckets.items():
        ws = [wp.node.args[1].data for wp in wps]
        w = torch.cat([x.float() for x in ws], 0).to(device)
        qd = get_qdtype(scheme.qdtype)
        qparams = None
        if r.clip:
            assert h is not None, "clip search needs the Hessian (r.needs_hessian)"
            shrink, _ = awq_search_clip(w, h, scheme.qdtype, group, scheme.symmetric, r.n_grid, r.max_shrink)
            qparams = weight_qparams(w, qd, scheme.symmetric, group, shrink)
        if r.method == "gptq":
            assert h is not None, "GPTQ needs the Hessian (r.needs_hessian)"
            # a sparsified linear (``sparsify`` marks it) keeps its zeros: error feedback must not fill them in
            sparse = [bool(wp.node.meta.get("sparsity")) for wp in wps]
            zero_mask = torch.cat([(x == 0) if s else torch.zeros_like(x, dtype=torch.bool) for x, s in zip(ws, sparse)],
                                  0).to(device) if any(sparse) else None
            res = gptq_quantize(w, h, scheme.qdtype, group, scheme.symmetric, act_order=r.act_order,
                                static_groups=r.static_groups, damp=r.damp, block_size=r.block_size,
                                qparams=qparams, zero_mask=zero_mask)
            q, scale, zp, deq = res.qdata, res.scale, res.zero_point, res.weight
            pre = res.unrounded
            st.gptq_loss += res.stats["loss"]
            st.damp_raised += int(res.stats["damp"] > r.damp)
            st.dead_columns += res.stats["dead_columns"]
        else:
            scale, zp = qparams if qparams is not None else weight_qparams(w, qd, scheme.symmetric, group)
            q, deq = quantize_with(w, scale, zp, qd, group)
            pre = w
        home = ws[0].device
        q, scale, deq = q.to(home), scale.to(home), deq.to(home)
        zp = None if zp is None else zp.to(home)
        row = 0
        for wp, x in zip(wps, ws):
            n = x.shape[0]
            out.append((wp, q[row:row + n], scale[row:row + n], None if zp is None else zp[row:row + n],
                        deq[row:row + n].to(x.dtype)))
            if unrounded is not None and pre is not None:
                unrounded[id(wp.node)] = pre[row:row + n]
            row += n
    st.seconds_round += time.perf_counter() - t0
    return out


def calibrate_weights(graph: Graph, o: WeightCalibrationOptions, r: _Rounding, pass_name: str) -> dict[str, Any]:
    """Run the calibration engine over ``graph`` and quantize every target linear, block by block."""
    t_start = time.perf_counter()
    device = o.torch_device(pass_name)
    cfg, _ = _config(o, pass_name)
    extra = [(f"option keep[{i}]", pat) for i, pat in enumerate(o.keep)]
    try:
        p = plan(graph, cfg, o.group_fallback, extra)
    except PassError as exc:
        raise PassError(str(exc).replace("pass quantize:", f"pass {pass_name}:", 1)) from None
    if not p.weights:
        raise PassError(f"pass {pass_name}: no linear to quantize (every linear is kept float)")
    bad_sites = sorted(set(r.sites) - set(SITE_KINDS))
    if bad_sites:
        raise PassError(f"pass {pass_name}: option sites: unknown {bad_sites}; known: {', '.join(SITE_KINDS)}")

    groups: dict[int, _Group] = {}
    for wp in p.weights:
        key = id(wp.node.args[0])
        groups.setdefault(key, _Group(key, [])).plans.append(wp)
    sites = find_sites(graph, r.sites) if r.scale_search else []
    for g in groups.values():
        g.first = id(min((wp.node for wp in g.plans), key=graph.index))
        if r.scale_search:
            g.site = site_for(graph, [wp.node for wp in g.plans], sites)
    by_first = {g.first: g for g in groups.values()}
    by_input = {g.key: g for g in groups.values()}
    st = _Stats(linears=len(p.weights), groups=len(groups))
    users = graph.users()
    tune_stats = TuneStats()
    float_stream: list[dict[Any, Any]] | None = None
    """Block tuning toward the float model: the float block outputs of the previous block, per batch."""

    def round_in_flight(g: _Group, x: torch.Tensor) -> None:
        """All sequences' input of the group is here and its linears have not run: quantize them now."""
        acc = HessianAccumulator(int(x.shape[-1]), device=x.device, second_moment=r.needs_hessian)
        acc.add(x)
        g.pending = _round_group(graph, g, r, acc.hessian if r.needs_hessian else None, acc.device, st)
        for wp, *_, deq in g.pending:  # the block's run continues with the quantized weights
            wv = private_weight(graph, wp.node, 1, users, f"{wp.node.module}.weight")
            graph.set_param(wv.name, deq)
        g.done = True
        st.in_flight += 1

    def on_node(node: Node, args: tuple[Any, ...], kwargs: dict[str, Any], outs: list[Any]) -> None:
        if r.single_pass:
            for v, x in zip(node.outputs, outs):
                g = by_input.get(id(v))
                if g is not None and not g.done:
                    round_in_flight(g, x)
        g = by_first.get(id(node))
        if g is None or g.done:
            return
        x = args[0]  # two-pass (or an input from an earlier stage): statistics now, rounding at the block's end
        if g.acc is None:
            g.acc = HessianAccumulator(int(x.shape[-1]), device=x.device, second_moment=r.needs_hessian)
        g.acc.add(x)

    def on_block(ctx: BlockRun) -> bool:
        nonlocal float_stream
        flown = [g for g in groups.values() if g.pending]
        ready = [g for g in groups.values() if g.acc is not None and not g.done]
        targets = None
        if r.tune is not None and ctx.stage.kind != "prefix":  # before any rounding: the block is still float
            targets = float_targets(ctx, float_stream if r.tune.target == "float" else None)
            float_stream = targets if r.tune.target == "float" else None
        if not ready and not flown:
            return False
        hessians: dict[int, torch.Tensor | None] = {}
        t0 = time.perf_counter()
        for g in ready:  # all scales of the block first: v→o and up→down change weights of other groups
            assert g.acc is not None
            h = g.acc.hessian if r.needs_hessian else None
            if r.scale_search and g.site is not None:
                found = awq_search_scale(
                    g.acc.sum, g.acc.abs_mean, [wp.node.args[1].data for wp in g.plans], g.plans[0].scheme.qdtype,
                    g.plans[0].group, g.plans[0].scheme.symmetric, n_grid=r.n_grid,
                    duo={"x": False, "xw": True, "both": None}[r.scales], expand=g.site.expand)
                apply_scale(graph, g.site, found.scale)
                full = found.scale if g.site.expand is None else found.scale[g.site.expand.to(found.scale.device)]
                h = scaled_hessian(h, full)
                st.scaled_groups += 1
                st.alphas.append(found.alpha)
                st.awq_gain.append(found.error_unscaled / max(found.error, 1e-30))
            elif r.scale_search:
                st.unscaled.append(g.plans[0].node.module)
            hessians[g.key] = h
        st.seconds_search += time.perf_counter() - t0
        results = [res for g in flown for res in g.pending]
        for g in flown:
            g.pending = []
        bases: dict[int, torch.Tensor] | None = {} if r.tune is not None else None
        for g in ready:
            assert g.acc is not None
            results += _round_group(graph, g, r, hessians[g.key], g.acc.device, st, bases)
            g.done, g.acc = True, None
        b, a = _emit(graph, results, pass_name)
        st.bytes_before += b
        st.bytes_after += a
        if r.tune is not None and targets is not None:
            dqs = [(wp.node.args[1].producer, (bases or {}).get(id(wp.node))) for wp, *_ in results]
            tune_block(ctx, [(n, b) for n, b in dqs if n is not None], targets, r.tune, tune_stats, graph)
        # Rounded in flight, the block already ran with its quantized weights: its outputs stand.
        return bool(ready)

    ids = o.token_ids(graph, pass_name)
    suffix = [s for s in split_stages(graph) if s.kind == "suffix"]
    in_suffix = {id(n) for n in suffix[0].nodes} if suffix else set()
    # single pass: every sequence in one batch, so a linear's input is complete before the linear runs; a graph
    # captured with a static batch cannot take that batch, and runs each block twice instead
    if r.single_pass and static_batch(graph) not in (None, ids.shape[0]):
        r.single_pass = False
        by_input.clear()
    batch_size = int(ids.shape[0]) if r.single_pass else o.batch_size_for(graph)
    report = run(graph, batches_from_ids(graph, ids, batch_size), on_node=on_node, on_block=on_block,
                 run_suffix=any(id(wp.node) in in_suffix for wp in p.weights), progress=o.progress, device=device)
    missing = [g.plans[0].node for g in groups.values() if not g.done]
    if missing:
        names = ", ".join(f"%{n.name} ({n.module})" for n in missing[:5])
        raise PassError(f"pass {pass_name}: calibration never reached linear(s) {names}")
    stats: dict[str, Any] = {
        "weights_quantized": st.linears,
        "input_groups": st.groups,
        "calib_tokens": int(ids.numel()),
        "seconds": round(time.perf_counter() - t_start, 2),
        "seconds_calibration_engine": round(report.seconds, 2),
        "seconds_rounding": round(st.seconds_round, 2),
        "quantized_weight_bytes_before": st.bytes_before,
        "quantized_weight_bytes_after": st.bytes_after,
        "peak_cached_mb": round(report.peak_cached_bytes / 2**20, 1),
        "device": str(device or home_device(graph)),
    }
    if r.method == "gptq":
        stats.update(gptq_loss=round(st.gptq_loss, 4), damp_raised=st.damp_raised, dead_columns=st.dead_columns,
                     single_pass=r.single_pass, groups_in_flight=st.in_flight)
    if r.tune is not None:
        stats.update(tuned_blocks=tune_stats.blocks, tuned_blocks_kept=tune_stats.kept,
                     tune_loss_before=round(tune_stats.loss_before, 6), tune_loss_after=round(tune_stats.loss_after, 6),
                     tune_codes_changed=round(tune_stats.codes_changed / max(tune_stats.codes_total, 1), 5),
                     seconds_tuning=round(tune_stats.seconds, 2))
    if r.scale_search:
        stats.update(scaled_groups=st.scaled_groups, unscaled_groups=st.unscaled,
                     seconds_scale_search=round(st.seconds_search, 2),
                     mean_alpha=round(sum(st.alphas) / max(len(st.alphas), 1), 3),
                     mean_error_gain=round(sum(st.awq_gain) / max(len(st.awq_gain), 1), 3))
    return stats


@register_pass
class GPTQ(Pass):
    """GPTQ integer weights (act-order, static groups, lazy batches) from block-by-block calibration."""

    name = "gptq"
    Options = GPTQOptions

    def run(self, graph: Graph) -> PassResult:
        o: GPTQOptions = self.options  # type: ignore[assignment]
        if not 0 < o.damp < 1:
            raise PassError(f"pass gptq: option damp={o.damp} must be in (0, 1)")
        r = _Rounding("gptq", scale_search=o.awq, clip=o.clip, n_grid=o.n_grid, act_order=o.act_order,
                      static_groups=o.static_groups, damp=o.damp, block_size=o.block_size, sites=o.sites,
                      single_pass=o.single_pass and not o.awq)
        if o.act_order and o.group and not o.static_groups and not o.clip:
            raise PassError("pass gptq: act_order=true with group needs static_groups=true (lowbit stores contiguous "
                            "groups along the input dim)")
        stats = calibrate_weights(graph, o, r, self.name)
        return PassResult(True, stats)
