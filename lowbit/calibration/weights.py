"""The weight-calibration driver that GPTQ, AWQ and AutoRound share: statistics, rounding, QDQ, block by block.

The calibration engine (``lowbit.calibration.engine``) runs the graph block by block; while a block runs, the
input of every target linear feeds a ``HessianAccumulator`` (one per input value: q/k/v share one). When the
block is done (or, single pass, the moment a group's input is complete), its linears are rounded as
``Rounding`` says — GPTQ (optionally on AWQ's scales and clipping grid) or AWQ's scaled RTN, optionally
followed by AutoRound-style block tuning — and each linear's weight becomes a ``dequantize`` of packed codes,
written by the one per-node writer the ``quantize`` pass uses (``lowbit.ir.qdq.write_weight_qdq``). The
engine then re-runs the block, so the next block calibrates on what the quantized block really produces.

Which linears are targets, with which scheme and group, is the caller's annotation (``WeightPlan``s, as the
``quantize`` pass's ``plan`` resolves them); the token ids, the device and the batch size are the caller's
too. The passes (``gptq``, ``awq``, ``autoround``) are thin: options in, ``calibrate_weights`` out.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from lowbit.calibration.awq import awq_search_clip, awq_search_scale, scaled_hessian
from lowbit.calibration.block_tuning import FloatTargetStream, TuneOptions, TuneStats, tune_block
from lowbit.calibration.data import calib_size
from lowbit.calibration.engine import BlockRun, batches_from_ids, home_device, run, split_stages, static_batch
from lowbit.calibration.gptq import HessianAccumulator, gptq_quantize, quantize_with, weight_qparams
from lowbit.calibration.scale_migration import SITE_KINDS, MigrationSite, apply_scale, find_sites, tied_reader
from lowbit.ir.graph import Graph, Node
from lowbit.ir.qdq import WeightPlan, write_weight_qdq
from lowbit.ir.qscheme import QScheme
from lowbit.ir.quant import get_qdtype, stored_codes
from lowbit.ir.rewrite import private_weight

__all__ = ["SITE_KINDS", "Rounding", "WeightCalibrationError", "calibrate_weights"]


class WeightCalibrationError(ValueError):
    """Calibration could not quantize what it was asked to; the message names the caller and the linears."""


@dataclass(frozen=True)
class Rounding:
    """How a block's weights are rounded: GPTQ (optionally on AWQ's grid) or AWQ's scaled RTN. Immutable: one
    value describes one run, and nothing the driver learns (a static batch, say) is written back into it."""

    method: Literal["gptq", "awq"]
    scale_search: bool
    """Search AWQ scales per input group and fold them into the preceding op (a migration site)."""
    clip: bool
    """Search each group's clipping range by output error (AWQ's auto-clip)."""
    n_grid: int = 20
    scales: Literal["x", "xw", "both"] = "x"
    max_shrink: float = 0.5
    act_order: bool = True
    static_groups: bool = True
    damp: float = 0.01
    block_size: int = 128
    sites: tuple[str, ...] = SITE_KINDS
    single_pass: bool = False
    """Round each group the moment all sequences' input is here (one run per block, all sequences as one batch)."""
    tune: TuneOptions | None = None
    """AutoRound-style block tuning after rounding."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "sites", tuple(self.sites))
        bad = sorted(set(self.sites) - set(SITE_KINDS))
        if bad:
            raise ValueError(f"option sites: unknown {bad}; known: {', '.join(SITE_KINDS)}")

    @property
    def needs_hessian(self) -> bool:
        """GPTQ, AWQ's scale search and its clip search read ``XᵀX``; a plain RTN start does not."""
        return self.method == "gptq" or self.scale_search or self.clip


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


def _emit(graph: Graph, results: list[_Result]) -> tuple[int, int]:
    """Write each linear's codes and qparams as its QDQ weight (the ``quantize`` pass's writer), in graph order."""
    users = graph.users()
    before = after = 0
    for wp, q, scale, zp, _ in sorted(results, key=lambda res: graph.index(res[0].node)):
        b, a = write_weight_qdq(graph, wp.node, wp.scheme, wp.group, stored_codes(q, get_qdtype(wp.scheme.qdtype)),
                                scale.float(), zp, users)
        before, after = before + b, after + a
    return before, after


def _check_finite_inputs(g: _Group, acc: HessianAccumulator, caller: str) -> None:
    """A NaN/inf calibration input poisons every statistic: GPTQ's Cholesky failed on it, but AWQ's searches kept the
    unscaled grid (every candidate's error NaN) and block tuning's NaN loss never beat its start, so awq and autoround
    returned plain RTN without a word. Refused for every method, naming the linears."""
    if bool(torch.isfinite(acc.abs_sum).all()) and bool(torch.isfinite(acc.abs_max).all()):
        return
    names = ", ".join(f"{wp.node.module or wp.node.name} (@{wp.node.args[1].name})" for wp in g.plans)
    bad = int((~torch.isfinite(acc.abs_max)).sum())
    raise WeightCalibrationError(f"{caller}: linear(s) {names}: the calibration inputs are not finite (NaN/inf in "
                                 f"{bad} of {acc.features} input channels); give finite calibration data")


def _round_group(graph: Graph, g: _Group, r: Rounding, h: torch.Tensor | None, device: torch.device, st: _Stats,
                 unrounded: dict[int, torch.Tensor] | None = None, caller: str = "weight calibration",
                 h_owned: bool = False) -> list[_Result]:
    """Quantize the (already scaled) weights of one group; (plan, codes, scale, zero point, dequantized) each.

    ``h`` is ``None`` exactly when ``r`` does not need it (a plain RTN start). The rounding runs on ``device``
    (the calibration device); the results go back to each weight's device.
    ``unrounded`` receives, per linear node id, the weights the rounding rounded (GPTQ's error-compensated ones),
    on the calibration device: block tuning starts from them. ``h_owned``: nobody else holds ``h``, so the last GPTQ
    call may spend it (one ``K × K`` float64 matrix less at the peak: 0.9 GiB at a 7B model's down_proj)."""
    t0 = time.perf_counter()
    out = []
    # Linears with one scheme and group share a GPTQ call on their stacked rows (identical to separate calls).
    buckets: dict[tuple[QScheme, int | None], list[WeightPlan]] = {}
    for wp in g.plans:
        buckets.setdefault((wp.scheme, wp.group), []).append(wp)
    for b, ((scheme, group), wps) in enumerate(buckets.items()):
        ws = [wp.node.args[1].data for wp in wps]
        w = torch.cat(ws, 0).to(device=device, dtype=torch.float32)
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
            zero_mask = torch.cat([(x == 0) if s else torch.zeros_like(x, dtype=torch.bool)
                                   for x, s in zip(ws, sparse)], 0).to(device) if any(sparse) else None
            try:
                res = gptq_quantize(w, h, scheme.qdtype, group, scheme.symmetric, act_order=r.act_order,
                                    static_groups=r.static_groups, damp=r.damp, block_size=r.block_size,
                                    qparams=qparams, zero_mask=zero_mask,
                                    consume_h=h_owned and b == len(buckets) - 1, unrounded=unrounded is not None)
            except ValueError as exc:  # a non-finite Hessian: name the linears, not "the calibration inputs"
                names = ", ".join(f"{wp.node.module or wp.node.name} (@{wp.node.args[1].name})" for wp in wps)
                raise WeightCalibrationError(f"{caller}: linear(s) {names}: {exc}") from None
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


def _assign_sites(graph: Graph, groups: list[_Group], sites: list[MigrationSite], skipped: dict[str, str]) -> None:
    """Each group's migration site: the one whose readers this pass quantizes are the group's linears. Its other
    readers, linears the pass keeps float (a mixture-of-experts router reading the norm before its experts'
    gate/up, lm_head, ``keep=``), absorb the scale in their input columns, which is exact, and have no say in
    choosing it; one whose weight another node shares (tied) refuses the site, as scaling its columns would change
    that node too. A group had a site only when the two sets were equal, so the norm before the experts (the
    float router beside them) got none. Every site passed over goes to ``skipped`` with its reason, as smooth-quant
    lists its own."""
    group_of = {id(wp.node): g for g in groups for wp in g.plans}
    users = graph.users()
    for site in sites:
        quantized = [c for c in site.consumers if id(c) in group_of]
        owners = {id(group_of[id(c)]): group_of[id(c)] for c in quantized}
        floats = [c for c in site.consumers if id(c) not in group_of]
        tied = tied_reader(graph, floats, users)
        if not quantized:
            skipped[site.name] = "every reader is a linear this pass keeps float (lm_head, keep=, out of modules=)"
        elif len(owners) > 1:
            skipped[site.name] = (f"its readers this pass quantizes read it as {len(owners)} different values (through "
                                  "different reshapes), each calibrated as its own group")
        elif tied is not None:
            skipped[site.name] = (f"its reader linear %{tied.name} (module {tied.module!r}) is kept float and shares "
                                  "its weight with another node (tied): scaling its columns would change that node too")
        else:
            group = next(iter(owners.values()))
            if len(group.plans) == len(quantized):  # the group's value is the site's (or a row reshape of it)
                group.site = site
            else:
                skipped[site.name] = (f"{len(group.plans) - len(quantized)} linear(s) reading the same value as its "
                                      "readers are not among them")


def calibrate_weights(graph: Graph, targets: Sequence[WeightPlan], ids: torch.Tensor, r: Rounding, *,
                      batch_size: int, device: torch.device | None = None, progress: bool = False,
                      caller: str = "weight calibration") -> dict[str, Any]:
    """Run the calibration engine over ``graph`` on ``ids`` (``[N, L]`` token ids) and quantize every target
    linear, block by block, in place; returns the statistics a pass reports.

    ``batch_size``: sequences per engine batch when a block runs twice (single pass runs all ``N`` at once;
    a graph captured with another static batch falls back to two runs per block). ``device``: where the engine
    and the rounding run (params stay where they are). ``caller`` prefixes error messages (``pass gptq``).
    """
    t_start = time.perf_counter()
    if not targets:
        raise WeightCalibrationError(f"{caller}: no linear to quantize (every linear is kept float)")
    single_pass = r.single_pass

    groups: dict[int, _Group] = {}
    for wp in targets:
        key = id(wp.node.args[0])
        groups.setdefault(key, _Group(key, [])).plans.append(wp)
    sites_skipped: dict[str, str] = {}  # site -> why no group's scale folds there, for the stats
    for g in groups.values():
        g.first = id(min((wp.node for wp in g.plans), key=graph.index))
    if r.scale_search:
        _assign_sites(graph, list(groups.values()), find_sites(graph, r.sites, sites_skipped), sites_skipped)
    by_first = {g.first: g for g in groups.values()}
    by_input = {g.key: g for g in groups.values()}
    st = _Stats(linears=len(targets), groups=len(groups))
    users = graph.users()
    tune_stats = TuneStats()
    float_stream = FloatTargetStream(chained=r.tune is not None and r.tune.target == "float")

    def round_in_flight(g: _Group, x: torch.Tensor) -> None:
        """All sequences' input of the group is here and its linears have not run: quantize them now."""
        acc = HessianAccumulator(int(x.shape[-1]), device=x.device, second_moment=r.needs_hessian)
        acc.add(x)
        _check_finite_inputs(g, acc, caller)
        g.pending = _round_group(graph, g, r, acc.take_hessian() if r.needs_hessian else None, acc.device, st,
                                 caller=caller, h_owned=True)
        for wp, *_, deq in g.pending:  # the block's run continues with the quantized weights
            wv = private_weight(graph, wp.node, 1, users, f"{wp.node.module}.weight")
            graph.set_param(wv.name, deq)
        g.done = True
        st.in_flight += 1

    def on_node(node: Node, args: tuple[Any, ...], kwargs: dict[str, Any], outs: list[Any]) -> None:
        if single_pass:
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
        flown = [g for g in groups.values() if g.pending]
        ready = [g for g in groups.values() if g.acc is not None and not g.done]
        targets = None
        if r.tune is not None and ctx.stage.kind != "prefix":  # before any rounding: the block is still float
            if ctx.stage.kind == "suffix" and not ctx.exports:
                # no later stage reads the suffix (a ViT's pooler, a quantized head): its tuning target is what the
                # graph returns; with no exports, its tuning failed ('the block exports no float tensor to match')
                made = {id(v) for n in ctx.stage.nodes for v in n.outputs}
                ctx.exports, ctx.reference = [v for v in graph.outputs if id(v) in made], []
            targets = float_stream.next(ctx)
        if not ready and not flown:
            return False
        hessians: dict[int, torch.Tensor | None] = {}
        t0 = time.perf_counter()
        for g in ready:  # all scales of the block first: v→o and up→down change weights of other groups
            assert g.acc is not None
            _check_finite_inputs(g, g.acc, caller)
            # each Hessian is taken from its accumulator (scaled in place), never copied: the block's groups all
            # hold theirs until the rounding below, and GPTQ then spends each one
            if r.scale_search and g.site is not None:
                found = awq_search_scale(
                    g.acc.sum, g.acc.abs_mean, [wp.node.args[1].data for wp in g.plans], g.plans[0].scheme.qdtype,
                    g.plans[0].group, g.plans[0].scheme.symmetric, n_grid=r.n_grid,
                    duo={"x": False, "xw": True, "both": None}[r.scales], expand=g.site.expand)
                apply_scale(graph, g.site, found.scale)
                full = found.scale if g.site.expand is None else found.scale[g.site.expand.to(found.scale.device)]
                h = scaled_hessian(g.acc.take_hessian(), full) if r.needs_hessian else None
                st.scaled_groups += 1
                st.alphas.append(found.alpha)
                st.awq_gain.append(found.error_unscaled / max(found.error, 1e-30))
            else:
                h = g.acc.take_hessian() if r.needs_hessian else None
                if r.scale_search:
                    st.unscaled.append(g.plans[0].node.module)
            hessians[g.key] = h
        st.seconds_search += time.perf_counter() - t0
        results = [res for g in flown for res in g.pending]
        for g in flown:
            g.pending = []
        bases: dict[int, torch.Tensor] | None = {} if r.tune is not None else None
        for g in ready:
            assert g.acc is not None
            results += _round_group(graph, g, r, hessians.pop(g.key), g.acc.device, st, bases, caller=caller,
                                    h_owned=True)
            g.done, g.acc = True, None
        b, a = _emit(graph, results)
        st.bytes_before += b
        st.bytes_after += a
        if r.tune is not None and targets is not None:
            dqs = [(wp.node.args[1].producer, (bases or {}).get(id(wp.node))) for wp, *_ in results]
            tune_block(ctx, [(n, b) for n, b in dqs if n is not None], targets, r.tune, tune_stats, graph)
        # Rounded in flight, the block already ran with its quantized weights: its outputs stand.
        return bool(ready)

    suffix = [s for s in split_stages(graph) if s.kind == "suffix"]
    in_suffix = {id(n) for n in suffix[0].nodes} if suffix else set()
    # single pass: every sequence in one batch, so a linear's input is complete before the linear runs; a graph
    # captured with a static batch cannot take that batch, and runs each block twice instead
    if single_pass and static_batch(graph) not in (None, ids.shape[0]):
        single_pass = False
        by_input.clear()
    engine_batch = int(ids.shape[0]) if single_pass else batch_size
    report = run(graph, batches_from_ids(graph, ids, engine_batch), on_node=on_node, on_block=on_block,
                 run_suffix=any(id(wp.node) in in_suffix for wp in targets), progress=progress, device=device)
    missing = [g.plans[0].node for g in groups.values() if not g.done]
    if missing:
        names = ", ".join(f"%{n.name} ({n.module})" for n in missing[:5])
        raise WeightCalibrationError(f"{caller}: calibration never reached linear(s) {names}")
    stats: dict[str, Any] = {
        "weights_quantized": st.linears,
        "input_groups": st.groups,
        **calib_size(ids),
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
                     single_pass=single_pass, groups_in_flight=st.in_flight)
    if r.tune is not None:
        stats.update(tuned_blocks=tune_stats.blocks, tuned_blocks_kept=tune_stats.kept,
                     tune_loss_before=round(tune_stats.loss_before, 6), tune_loss_after=round(tune_stats.loss_after, 6),
                     tune_codes_changed=round(tune_stats.codes_changed / max(tune_stats.codes_total, 1), 5),
                     seconds_tuning=round(tune_stats.seconds, 2))
    if r.scale_search:
        stats.update(scaled_groups=st.scaled_groups, unscaled_groups=st.unscaled, sites_skipped=sites_skipped,
                     seconds_scale_search=round(st.seconds_search, 2),
                     mean_alpha=round(sum(st.alphas) / max(len(st.alphas), 1), 3),
                     mean_error_gain=round(sum(st.awq_gain) / max(len(st.awq_gain), 1), 3))
    return stats
