"""The ``prune-mlp`` pass: remove MLP intermediate channels, making every MLP narrower (a smaller dense model).

    prune-mlp(ratio=0.25)                              25% of each MLP's channels, Wanda-style scores
    prune-mlp(ratio=0.25,allocation=global)            25% of all channels, more where scores are low
    prune-mlp(ratio=0.2,score=fluctuation,compensate=true)   FLAP's metric + bias compensation
    prune-mlp(ratio=0.25,score=obs,sequential=true,calib_n=117)   whole-column OBS + refit, block by block

Why: a narrower MLP is a dense model every runtime serves at full speed, unlike 2:4 or unstructured sparsity.
Channel j of a SwiGLU MLP is row j of ``gate_proj`` and ``up_proj`` and column j of ``down_proj`` (of a fused
``gate_up_proj`` chunked in two, as Phi-3's, rows j and I + j); removing it equals zeroing those (the masked dense
model) exactly, which the tests check in float64.

Importance of channel j, from one calibration run over the float model (``lowbit.calibration.engine``):
``wanda`` ``||X_j||₂·||W_down[:,j]||₂`` (what the channel adds to the output, activation-aware),
``fluctuation`` ``Var(X_j)·||W_down[:,j]||₂²`` (FLAP: the part a constant bias cannot replace), or
``magnitude`` ``||W_down[:,j]||₂``. ``compensate`` adds ``W_down[:,pruned]·E[X_pruned]`` to the down
projection's bias, so the mean of what was removed stays (FLAP's bias compensation).

Repair by least squares (SlimGPT; SparseGPT's update for whole columns): ``score=obs`` removes channels greedily,
each time the one whose loss is least when the other columns of ``down_proj`` and its bias are refit to the
layer's calibration output (``lowbit.calibration.structured_obs``; one inverse of ``[x, 1]``'s second moment per
layer, updated after each removal), and writes that refit; ``update=true`` refits after a score's choice.
``sequential=true`` calibrates block by block on the already-pruned prefix (as GPTQ runs), applying each layer's
cut as zeros in flight and slicing at the end; ``target=model`` refits toward the unpruned stream instead of the
layer's own output. A refit needs many tokens per channel: use (nearly) every shipped window (``calib_n=117`` of
123). Measured on 4 real blocks (16 x 256 calibration tokens, held-out logits error): FLAP 0.124, OBS sequential
0.100, OBS ``target=model`` 0.110.

Allocation under the budget ``ratio`` (simple, stated): ``uniform`` removes the same fraction of every layer;
``global`` divides each layer's scores by the layer's mean score and removes the lowest channels of the whole
model (each layer losing at most ``max_layer_ratio``, and with ``spread`` within ``ratio ± spread``). On SmolLM2
at 18.75% (x8) uniform measured 1.786x, bounded global (±5%) 1.852x and the unbounded ranking worse still: keep
the per-layer share even; ``modules`` then adds a little more to chosen (middle) blocks. Counts per layer are rounded to
``multiple`` (default 64: a pruned width still splits into group-64 quantization groups and tensor-core tiles), halves
up (``prune-heads`` too: 0.5 of 3 groups is 2, of 5 is 3); a nonzero ratio that rounds to nothing everywhere is an
error naming the layer, its width and the multiple, not a silent no-op.
After the cut, ``lowbit.ir.shapes.reinfer_shapes`` re-derives every declared type.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from lowbit.calibration.data import calib_size
from lowbit.calibration.engine import BlockRun, batches_from_ids, run
from lowbit.calibration.structured_obs import augmented_hessian, remove_columns_obs
from lowbit.ir.graph import Graph, Node
from lowbit.ir.shapes import ShapeError, reinfer_shapes
from lowbit.passes.base import (NO_DEQUANTIZE, NO_QLINEAR, CalibrationOptions, Pass, PassError, PassResult,
                                ScopedOptions, register_pass)
from lowbit.passes.pruning_sites import (DOWN_PROJECTIONS, find_mlp_sites, refuse_nonfinite_weights,
                                         sites_in_modules, slice_linear_cols, slice_unit_rows, unit_columns)

__all__ = ["PruneMLP", "PruneMLPOptions", "StructuredOptions", "InputStats", "collect_input_stats",
           "channel_scores", "allocate", "add_bias", "refit_columns", "reinfer", "Cut", "choose_cut",
           "model_targets", "refit_to_target", "check_target", "cut_sites"]


class StructuredOptions(CalibrationOptions, ScopedOptions):
    ratio: float = Field(default=0.2, ge=0.0, lt=1.0)
    """Fraction of the prunable units removed (channels for prune-mlp, GQA groups for prune-heads)."""
    score: Literal["wanda", "fluctuation", "magnitude", "obs"] = "wanda"
    """Importance: activation-aware norm (Wanda), FLAP's fluctuation, weight norm only (no calibration), or
    ``obs``: remove greedily the unit whose loss, with the output projection's other columns and bias refit by
    least squares, is least (whole-column OBS, ``lowbit.calibration.structured_obs``; implies the refit)."""
    allocation: Literal["uniform", "global"] = "uniform"
    """Same fraction per layer, or one global ranking of per-layer-normalised scores."""
    compensate: bool = False
    """Add the removed units' mean contribution to the output projection's bias (FLAP)."""
    update: bool = False
    """Refit the output projection's kept columns and a bias by least squares on the calibration inputs
    (``W' = W·H[:,keep]·H[keep,keep]⁻¹`` over ``[x, 1]``): what the removed channels carried is rebuilt from the
    kept ones as far as they are correlated (the OBS/SparseGPT update, for whole channels). Implies ``compensate``."""
    damp: float = Field(default=0.01, gt=0.0, lt=1.0)
    """``update``/``obs``: diagonal damping relative to the mean diagonal of ``XᵀX``."""
    obs_step: int = Field(default=1, ge=1)
    """``obs``: units removed per update (1: the exact greedy search; more: fewer updates of the inverse Hessian,
    each taking the units of least loss scored alone, for CPU runs: 384 single updates of a 1537-wide inverse per
    SmolLM2 layer take seconds on a CPU, milliseconds on a GPU)."""
    target: Literal["layer", "model"] = "layer"
    """What the refit (``obs``/``update``) reconstructs: ``layer``, the projection's own output on the inputs it
    sees; ``model``, the residual stream after its residual add as the unpruned model (the model as the pass
    received it) computes it, so that with ``sequential`` each refit also absorbs the error the earlier pruned
    layers left in the stream (the selection stays the layer's own). Needs ``sequential`` and a refit."""
    sequential: bool = False
    """Calibrate block by block: block i's statistics come from the model whose blocks before i are already
    pruned (and refit), as GPTQ and SparseGPT run, so each refit also absorbs the earlier blocks' errors.
    Otherwise one run of the unpruned model scores every layer."""
    max_layer_ratio: float = Field(default=0.8, ge=0.0, lt=1.0)
    """Global allocation: the most any one layer loses (prune-mlp; prune-heads keeps one group per layer)."""
    spread: float | None = Field(default=None, gt=0.0, lt=1.0)
    """Global allocation: every layer loses ``ratio ± spread`` (OWL/ECoFLaP-style bounded deviation from the
    uniform budget; unset: only ``max_layer_ratio`` bounds it). An unbounded ranking of per-layer-normalised
    scores moves too much of the cut into a few layers on SmolLM2 (2.34x at 20% against 1.79x uniform)."""
    calib_n: int = Field(default=32, ge=1)
    modules: str = ""
    """Regex searched in module paths: only layers whose output projection (``down_proj``/``o_proj``) matches are
    pruned (empty: all). The debugging tools restrict the pass to some layers through it."""

    def reads_calibration(self) -> bool:
        """``score=magnitude`` ranks by the weights alone: only a repair (``compensate``/``update``) reads data."""
        return self.score != "magnitude" or self.compensate or self.update

    @model_validator(mode="after")
    def _global_options_need_global(self) -> StructuredOptions:
        if self.sequential and not self.reads_calibration():
            raise ValueError("option sequential=true calibrates block by block, but score=magnitude without "
                             "compensate or update calibrates nothing: it would be silently ignored")
        refit = self.update or self.score == "obs"
        self.refuse_unread({**{k: None if self.allocation == "global" else "allocation=global"
                               for k in ("max_layer_ratio", "spread")},
                            "damp": None if refit else "a least-squares refit (update=true or score=obs)",
                            "obs_step": None if self.score == "obs" else "score=obs",
                            **self.data_needs("score=wanda, fluctuation or obs, or compensate=true or update=true "
                                              "(score=magnitude ranks by the weights alone)")})
        return self


class PruneMLPOptions(StructuredOptions):
    multiple: int = Field(default=64, ge=1)
    """Channels removed per layer are a multiple of this (the kept width stays a multiple if the width is)."""

    @model_validator(mode="after")
    def _ratio_within_the_layer_cap(self) -> PruneMLPOptions:
        if self.allocation == "global" and self.ratio > self.max_layer_ratio:
            raise ValueError(f"ratio={self.ratio} with allocation=global: no layer loses more than "
                             f"max_layer_ratio={self.max_layer_ratio}, so at most that fraction of the channels can "
                             "go; raise max_layer_ratio or lower ratio")
        return self


@dataclass
class InputStats:
    """Per-channel sums of a linear's input over the calibration tokens."""

    sum: torch.Tensor
    sq: torch.Tensor
    rows: int = 0
    xtx: torch.Tensor | None = None
    """``Σ xᵀx`` (float64) when the pass refits weights (``update``)."""
    cross: torch.Tensor | None = None
    """``target=model``: ``Σ y·[x, 1]ᵀ`` (float64 ``[N, K+1]``), ``y`` what the unpruned model's residual stream
    needs from this projection (its stream after the residual add minus the pruned model's stream before it)."""

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / max(self.rows, 1)

    @property
    def norm(self) -> torch.Tensor:
        return self.sq.sqrt()

    @property
    def var(self) -> torch.Tensor:
        return (self.sq / max(self.rows, 1) - self.mean.pow(2)).clamp(min=0)


@dataclass
class _Collected:
    inputs: dict[int, InputStats] = field(default_factory=dict)
    block_change: dict[str, list[float]] = field(default_factory=dict)
    size: dict[str, int] = field(default_factory=dict)
    """``calib_size`` of the calibration inputs (empty: none ran)."""
    seconds: float = 0.0


def cut_sites(graph: Graph, sites: list[Any], out_linear: Callable[[Any], Node], counts: list[int],
              unit: Callable[[Any], int], rows: Callable[[Any], list[tuple[Node, int, int]]],
              users: dict[int, list[Node]],
              col: _Collected, o: Any, pass_name: str, calibrated: bool, second: bool) -> dict[int, Cut]:
    """Cut ``counts[i]`` units of ``unit(site)`` input columns of each site's ``out_linear(site)`` (``choose_cut``)
    and zero them with the producers' rows (``rows(site)``: ``(producer, rows per unit, first row)``,
    ``apply_cut_masked``);
    returns the cuts by ``id(out_linear(site))``. With ``o.sequential`` in one block-by-block calibration run, each
    block cut as soon as its statistics are in (the next block then reads the pruned model; ``o.target ==
    "model"`` refits toward the unpruned model), else from ``col``, the statistics of one run of the unpruned
    model. Shared by prune-mlp and prune-heads."""
    n_of = {id(out_linear(s)): n for s, n in zip(sites, counts)}
    cuts: dict[int, Cut] = {}

    def cut_site(s: Any, st: InputStats | None) -> None:
        out = out_linear(s)
        if n_of[id(out)] == 0:
            return
        cuts[id(out)] = cut = choose_cut(out.args[1].data, st, n_of[id(out)], unit(s), o, _bias(out))
        apply_cut_masked(graph, out, cut, unit(s), users, rows(s))

    if not o.sequential:
        for s in sites:
            cut_site(s, col.inputs.get(id(out_linear(s))))
        return cuts

    def on_block(ctx: BlockRun, got: _Collected) -> bool:
        mine = [s for s in sites if id(out_linear(s)) in got.inputs]
        for s in mine:
            cut_site(s, got.inputs.pop(id(out_linear(s))))
        return bool(mine)

    linears = [out_linear(s) for s in sites]
    targets = model_targets(graph, linears, o, pass_name) if o.target == "model" else None
    collect_input_stats(graph, linears if calibrated else [], o, pass_name, second_moment=second, on_block=on_block,
                        targets=targets)
    if not calibrated:
        for s in sites:
            cut_site(s, None)
    return cuts


def collect_input_stats(graph: Graph, linears: list[Node], o: CalibrationOptions, pass_name: str,
                        residual_blocks: dict[int, tuple[str, bool]] | None = None,
                        second_moment: bool = False,
                        on_block: Callable[[BlockRun, _Collected], bool] | None = None,
                        targets: dict[int, tuple[Node, list[torch.Tensor]]] | None = None) -> _Collected:
    """One calibration run of the model: input channel statistics of ``linears``, and, for ``residual_blocks``
    (``id(residual_add)`` -> (block, is_last)), the block's mean ``1 - cos(in, out)``. ``on_block(ctx, stats)``
    may change the block once its statistics are in (its result is then what the next block reads).
    ``targets`` (``id(residual_add)`` -> (the linear it adds, that add's output per batch in the unpruned model,
    ``model_targets``)) accumulates ``InputStats.cross`` for those linears (``second_moment`` needed)."""
    want = {id(n) for n in linears}
    out = _Collected()
    pending: dict[str, torch.Tensor] = {}
    last_x: dict[int, torch.Tensor] = {}
    seen: dict[int, int] = {}
    with_target = {id(lin) for lin, _ in (targets or {}).values()}

    def on_node(node: Node, args: tuple[Any, ...], kwargs: dict[str, Any], outs: list[Any]) -> None:
        if id(node) in want:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            st = out.inputs.get(id(node))
            if st is None:
                st = out.inputs[id(node)] = InputStats(torch.zeros(x.shape[1], dtype=torch.float64, device=x.device),
                                                       torch.zeros(x.shape[1], dtype=torch.float64, device=x.device))
            st.sum += x.sum(0)
            st.sq += x.pow(2).sum(0)
            st.rows += x.shape[0]
            if second_moment:
                xf = x.float()
                xtx = (xf.t() @ xf).double()
                st.xtx = xtx if st.xtx is None else st.xtx + xtx
            if id(node) in with_target:
                last_x[id(node)] = x
        if targets and id(node) in targets:
            lin, dense = targets[id(node)]
            b = seen[id(node)] = seen.get(id(node), -1) + 1
            st = out.inputs[id(lin)]
            x = last_x.pop(id(lin))
            y = (dense[b].to(args[0].device).double() - args[0].detach().double()).reshape(x.shape[0], -1)
            cross = torch.cat([y.t() @ x, y.sum(0)[:, None]], 1)
            st.cross = cross if st.cross is None else st.cross + cross
        if residual_blocks and id(node) in residual_blocks:
            block, last = residual_blocks[id(node)]
            if block not in pending:
                pending[block] = args[0].detach()
            if last:
                a = pending.pop(block).reshape(-1, args[0].shape[-1]).double()
                b = outs[0].detach().reshape(-1, args[0].shape[-1]).double()
                cos = torch.nn.functional.cosine_similarity(a, b, dim=1)
                out.block_change.setdefault(block, []).append(float((1 - cos).mean()))

    if not linears and not residual_blocks:
        return out
    ids = o.token_ids(graph, pass_name)
    hook = (lambda ctx: on_block(ctx, out)) if on_block is not None else (lambda ctx: False)
    rep = run(graph, batches_from_ids(graph, ids, o.batch_size_for(graph)), on_node=on_node,
              on_block=hook, progress=o.progress, device=o.torch_device(pass_name))
    out.size, out.seconds = calib_size(ids), rep.seconds
    return out


def model_targets(graph: Graph, linears: list[Node], o: CalibrationOptions, pass_name: str
                  ) -> dict[int, tuple[Node, list[torch.Tensor]]]:
    """For each of ``linears`` the ``residual_add`` that adds its output to the stream, and that add's output per
    calibration batch in the model as it is now (float32, on the calibration device): ``target=model``'s goal."""
    users = graph.users()
    adds: dict[int, tuple[Node, list[torch.Tensor]]] = {}
    for lin in linears:
        add = [u for u in users.get(id(lin.output), []) if u.op == "residual_add" and u.args[1] is lin.output]
        if len(add) != 1:
            raise PassError(f"pass {pass_name}: target=model: %{lin.name} ({lin.module}) is not added to the "
                            "residual stream by one residual_add")
        adds[id(add[0])] = (lin, [])

    def on_node(node: Node, args: tuple[Any, ...], kwargs: dict[str, Any], outs: list[Any]) -> None:
        if id(node) in adds:
            adds[id(node)][1].append(outs[0].detach().float())

    ids = o.token_ids(graph, pass_name)
    run(graph, batches_from_ids(graph, ids, o.batch_size_for(graph)), on_node=on_node, on_block=lambda ctx: False,
        progress=o.progress, device=o.torch_device(pass_name))
    return adds


def refit_to_target(st: InputStats, cols: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares ``(W', b)`` over ``[x[cols], 1]`` toward ``st.cross``'s target (float64)."""
    assert st.xtx is not None and st.cross is not None
    h = augmented_hessian(st.xtx, st.sum.to(st.xtx.device), st.rows)
    k = st.xtx.shape[0]
    idx = torch.cat([cols.to(h.device), torch.tensor([k], device=h.device)])
    hkk = h[idx][:, idx]
    hkk += damp * torch.diagonal(hkk)[:-1].mean() * torch.eye(len(idx), dtype=h.dtype, device=h.device)
    sol = torch.linalg.solve(hkk, st.cross.to(h.device)[:, idx].t()).t()
    return sol[:, :-1], sol[:, -1]


def channel_scores(w_out: torch.Tensor, st: InputStats | None, score: str) -> torch.Tensor:
    """Importance of each input column of an output projection ``w_out [N, K]`` (float64, [K])."""
    col = w_out.double().pow(2).sum(0)
    if score == "magnitude" or st is None:
        return col.sqrt()
    if score == "wanda":
        return st.norm.to(col.device) * col.sqrt()
    return st.var.to(col.device) * col


def round_half_up(x: float) -> int:
    """``x`` rounded to the nearest integer, halves up (Python's ``round`` goes to the even one: 2.5 -> 2 but
    1.5 -> 2, so the same ratio cut 2 of 3 groups and 2 of 5); the tolerance keeps 0.15 * 10 a half."""
    return math.floor(x + 0.5 + 1e-9)


def ratio_zero(sites: int, skipped: list[str], removed: str, t0: float) -> PassResult:
    """The result of ``ratio=0``: nothing removed, and nothing calibrated (ranking and repair would change nothing;
    the calibration run took as long as for a real cut), said in the stats."""
    return PassResult(False, {"layers": sites, removed: 0, "skipped": skipped, "calib_tokens": 0,
                              "not_pruned": "ratio=0 removes nothing: no calibration ran, the weights are unchanged",
                              "seconds": round(time.perf_counter() - t0, 2)})


def nothing_removed(pass_name: str, ratio: float, block: str, units: int, what: str, multiple: int = 1) -> PassError:
    """A nonzero ``ratio`` whose rounding removes nothing: the error names the layer, the count, the multiple and the
    smallest ratio that removes one step (a silent no-op would look like a pruned model)."""
    least = multiple / 2 / units
    rounding = f"rounded to a multiple of {multiple} (option multiple)" if multiple > 1 else "rounded to a whole unit"
    fix = f"raise ratio to at least {least:.4g}" + (" or lower multiple" if multiple > 1 else "")
    if least >= 1:  # ratio must stay below 1: no ratio removes one multiple of this layer
        fix = f"no ratio below 1 removes one multiple of {multiple}: lower multiple below {units}"
    return PassError(f"pass {pass_name}: ratio={ratio} removes no {what}: layer {block} has {units} {what}s and "
                     f"{ratio} x {units} = {ratio * units:.4g} {rounding} is 0; {fix}")


def allocate(scores: list[torch.Tensor], ratio: float, allocation: str, multiple: int, max_layer_ratio: float,
             unit: int = 1, spread: float | None = None, layer_caps: list[int] | None = None) -> list[int]:
    """Units removed per layer. ``scores[i]`` has one entry per unit of layer i (lower = removed first).

    ``global``: one ranking of the per-layer-normalised scores; each layer loses at most ``max_layer_ratio`` (and
    at most ``layer_caps[i]`` units: prune-heads keeps a group per layer), and with ``spread`` between ``ratio -
    spread`` and ``ratio + spread`` (counts in multiples of ``multiple``). A capped layer's share goes to the next
    units of the ranking, so the total is the budget's whenever the caps allow it."""
    sizes = [len(s) for s in scores]
    if allocation == "uniform":
        return [min(n, round_half_up(ratio * n / multiple) * multiple) for n in sizes]
    total = round_half_up(ratio * sum(sizes))
    normed = [s / s.mean().clamp(min=1e-30) for s in scores]
    flat = torch.cat([torch.stack([v, torch.full_like(v, i)], 1) for i, v in enumerate(normed)])
    order = torch.argsort(flat[:, 0], stable=True)
    hi = max_layer_ratio if spread is None else min(max_layer_ratio, ratio + spread)
    caps = [int(hi * n) // multiple * multiple for n in sizes]
    if layer_caps is not None:
        caps = [min(c, cap // multiple * multiple) for c, cap in zip(caps, layer_caps)]
    floors = [0] * len(sizes) if spread is None else \
        [min(caps[i], int(max(0.0, ratio - spread) * n) // multiple * multiple) for i, n in enumerate(sizes)]
    if spread is not None:
        # the floors are taken first (each layer's lowest units), the rest of the budget by the global ranking
        taken = [torch.argsort(v, stable=True)[:f] for v, f in zip(normed, floors)]
        skip = set()
        offset = 0
        for i, t in enumerate(taken):
            skip.update((offset + t).tolist())
            offset += sizes[i]
        order = torch.tensor([j for j in order.tolist() if j not in skip], dtype=torch.long)
    counts = list(floors)
    removed = sum(floors)
    for idx in order.tolist():
        if removed >= total:
            break
        layer = int(flat[idx, 1])
        if counts[layer] < caps[layer]:
            counts[layer] += 1
            removed += 1
    return [min(caps[i], round_half_up(c / multiple) * multiple) for i, c in enumerate(counts)]


def refit_columns(w: torch.Tensor, st: InputStats, keep: torch.Tensor, damp: float) -> tuple[torch.Tensor,
                                                                                              torch.Tensor]:
    """Least-squares ``(W', b)`` with ``W'·x[keep] + b ≈ W·x`` over the calibration inputs (float64)."""
    assert st.xtx is not None
    k = st.xtx.shape[0]
    h = torch.zeros(k + 1, k + 1, dtype=torch.float64, device=st.xtx.device)
    h[:k, :k] = st.xtx
    h[:k, k] = st.sum
    h[k, :k] = st.sum
    h[k, k] = st.rows
    idx = torch.cat([keep.to(h.device), torch.tensor([k], device=h.device)])
    hkk = h[idx][:, idx]
    hkk = hkk + damp * torch.diagonal(hkk).mean() * torch.eye(len(idx), dtype=h.dtype, device=h.device)
    rhs = w.double().to(h.device) @ h[:k, idx]  # [N, |keep|+1]
    sol = torch.linalg.solve(hkk, rhs.t()).t()
    return sol[:, :-1].to(w.device), sol[:, -1].to(w.device)


@dataclass
class Cut:
    """One layer's cut: the units of the output projection's columns that stay, and its repair."""

    keep: torch.Tensor
    """Kept unit indices, ascending (units of ``unit`` consecutive columns: channels, or GQA groups of heads)."""
    weight: torch.Tensor | None = None
    """The output projection's new weight at full width (removed columns zero; float64), or None: unchanged."""
    bias: torch.Tensor | None = None
    """What the repair adds to the output projection's bias (float64), or None."""


def choose_cut(w_out: torch.Tensor, st: InputStats | None, n_rm: int, unit: int, o: StructuredOptions,
               bias: torch.Tensor | None = None) -> Cut:
    """Which ``n_rm`` units of ``w_out [N, K]``'s input columns go, by ``o.score``, and the repair ``o`` asks for
    (``obs``/``update``: least-squares refit of the rest and the bias; ``compensate``: the removed mean to the
    bias). With ``st.cross`` (``target=model``) the kept columns and the bias (``bias``: the current one) are
    then refit toward the unpruned model's stream."""
    cut = _choose_cut(w_out, st, n_rm, unit, o)
    if st is None or st.cross is None:
        return cut
    cols = unit_columns(cut.keep, unit)
    wk, b = refit_to_target(st, cols, o.damp)
    full = torch.zeros(w_out.shape, dtype=torch.float64, device=wk.device)
    full[:, cols.to(wk.device)] = wk
    return Cut(cut.keep, full, b - (bias.to(b.device).double() if bias is not None else 0))


def _choose_cut(w_out: torch.Tensor, st: InputStats | None, n_rm: int, unit: int, o: StructuredOptions) -> Cut:
    k = w_out.shape[1]
    if o.score == "obs":
        assert st is not None and st.xtx is not None
        r = remove_columns_obs(w_out, augmented_hessian(st.xtx, st.sum.to(st.xtx.device), st.rows), unit, n_rm,
                               o.damp, step=o.obs_step)
        gone = set(r.removed)
        return Cut(torch.tensor([u for u in range(k // unit) if u not in gone], dtype=torch.long),
                   r.weight, r.bias_delta)
    sc = channel_scores(w_out, st, o.score).reshape(-1, unit).sum(1).cpu()
    order = torch.argsort(sc, stable=True)
    keep = torch.sort(order[n_rm:]).values
    if o.update:
        assert st is not None
        cols = unit_columns(keep, unit)
        wk, b = refit_columns(w_out, st, cols, o.damp)
        full = torch.zeros(w_out.shape, dtype=torch.float64, device=wk.device)
        full[:, cols.to(wk.device)] = wk.double()
        return Cut(keep, full, b.double())
    if o.compensate:
        assert st is not None
        drop = unit_columns(torch.sort(order[:n_rm]).values, unit).to(w_out.device)
        return Cut(keep, None, w_out.double()[:, drop] @ st.mean.to(w_out.device)[drop])
    return Cut(keep)


def apply_cut_masked(graph: Graph, out_proj: Node, cut: Cut, unit: int, users: dict[int, list[Node]],
                     rows: list[tuple[Node, int]]) -> None:
    """Apply ``cut`` as zeros, shapes unchanged (the masked dense model, which the slicing then equals): the
    removed units' rows of each ``(producer, rows per unit, first row)`` in ``rows`` and columns of ``out_proj`` are
    zeroed, the repair written. Block-by-block calibration runs the next block on this."""
    from lowbit.ir.rewrite import private_weight

    k = out_proj.args[1].data.shape[1]
    gone = torch.ones(k // unit, dtype=torch.bool)
    gone[cut.keep] = False
    units = gone.nonzero().flatten()
    for p, per, first in rows:
        for idx in (1, 2) if len(p.args) > 2 and p.args[2] is not None else (1,):
            v = private_weight(graph, p, idx, users, p.args[idx].name)
            d = v.data.clone()
            d[(first + unit_columns(units, per)).to(d.device)] = 0
            graph.set_param(v.name, d)
    wv = private_weight(graph, out_proj, 1, users, out_proj.args[1].name)
    if cut.weight is not None:
        new = cut.weight.to(wv.data.device, wv.data.dtype)
    else:
        new = wv.data.clone()
        new[:, unit_columns(units, unit).to(new.device)] = 0
    graph.set_param(wv.name, new)
    if cut.bias is not None:
        add_bias(graph, out_proj, cut.bias)


def check_target(o: StructuredOptions, pass_name: str) -> None:
    if o.target == "model" and not (o.sequential and (o.update or o.score == "obs")):
        raise PassError(f"pass {pass_name}: target=model refits toward the unpruned model block by block: it needs "
                        f"sequential=true and a refit (score=obs or update=true); got sequential={o.sequential}, "
                        f"score={o.score}, update={o.update}")


def _bias(lin: Node) -> torch.Tensor | None:
    b = lin.args[2] if len(lin.args) > 2 else None
    return b.data if b is not None else None


def add_bias(graph: Graph, lin: Node, delta: torch.Tensor) -> None:
    """``lin``'s bias += ``delta`` (a new bias param if it had none)."""
    from lowbit.passes.fold_norms import private_weight

    w = lin.args[1].data
    b = lin.args[2] if len(lin.args) > 2 else None
    if b is not None:
        bv = private_weight(graph, lin, 2, graph.users(), f"{lin.module}.bias")
        graph.set_param(bv.name, (bv.data.double() + delta.to(bv.data.device)).to(bv.data.dtype))
    else:
        nb = graph.add_param(graph.fresh_param_name(f"{lin.module}.bias"), delta.to(w.device, w.dtype))
        lin.args = (lin.args[0], lin.args[1], nb)


def reinfer(graph: Graph, pass_name: str) -> dict[str, int]:
    try:
        rep = reinfer_shapes(graph)
    except ShapeError as exc:
        raise PassError(f"pass {pass_name}: {exc}") from None
    return {"values_retyped": len(rep.retyped), "literals_rewritten": len(rep.literals)}


def record_widths(graph: Graph) -> None:
    """``meta["pruned"]["intermediate_size"]``: every block's MLP width after the cut, the blocks this pass left
    (``modules``) too, so a checkpoint sees layers of different widths instead of one width for all."""
    old = graph.meta.get("pruned", {})
    widths = {**old.get("intermediate_size", {}), **{s.block: s.width for s in find_mlp_sites(graph)[0]}}
    graph.meta["pruned"] = {**old, "intermediate_size": widths}


@register_pass
class PruneMLP(Pass):
    """Remove MLP intermediate channels (gate/up rows, down columns) by calibrated importance."""

    name = "prune-mlp"
    scope_unit = "mlp"
    Options = PruneMLPOptions
    requires = (NO_QLINEAR, NO_DEQUANTIZE)

    def run(self, graph: Graph) -> PassResult:
        o: PruneMLPOptions = self.options  # type: ignore[assignment]
        t0 = time.perf_counter()
        sites, skipped = find_mlp_sites(graph)
        sites = sites_in_modules(sites, o.modules, self.name, lambda s: s.down.module, "MLPs' down projections")
        if not sites:
            why = "; ".join(skipped[:3]) or f"no linear whose module ends with one of {', '.join(DOWN_PROJECTIONS)}"
            raise PassError(f"pass {self.name}: no prunable MLP found ({why})")
        refuse_nonfinite_weights(self.name, [n for s in sites for n in (*s.producers, s.down)])
        if o.ratio == 0:
            return ratio_zero(len(sites), skipped, "channels_removed", t0)
        calibrated = o.reads_calibration()
        second = o.update or o.score == "obs"
        check_target(o, self.name)
        counts: list[int] | None = None
        col = _Collected()
        if o.allocation == "global" or not o.sequential:
            # the counts (global: one ranking; obs ranks by fluctuation here) from one run of the unpruned model
            col = collect_input_stats(graph, [s.down for s in sites] if calibrated else [], o, self.name,
                                      second_moment=second and not o.sequential)
            rank = "fluctuation" if o.score == "obs" else o.score
            scores = [channel_scores(s.down.args[1].data, col.inputs.get(id(s.down)), rank) for s in sites]
            counts = allocate(scores, o.ratio, o.allocation, o.multiple, o.max_layer_ratio, spread=o.spread)
        else:
            counts = allocate([torch.zeros(s.width) for s in sites], o.ratio, "uniform", o.multiple, 1.0)
        if o.ratio > 0 and not any(counts):
            raise nothing_removed(self.name, o.ratio, sites[0].block, sites[0].width, "channel", o.multiple)
        for site, n_rm in zip(sites, counts):
            if n_rm >= site.width:
                raise PassError(f"pass {self.name}: layer {site.block}: removing {n_rm} of {site.width} channels "
                                "would leave the MLP empty")
        users = graph.users()
        params_before = sum(v.data.numel() for v in graph.params.values())
        cuts = cut_sites(graph, sites, lambda s: s.down, counts, lambda s: 1, lambda s: s.row_groups(),
                         users, col, o, self.name, calibrated, second)
        widths = {}
        for site in sites:
            cut = cuts.get(id(site.down))
            if cut is None:
                continue
            gone = torch.ones(site.width, dtype=torch.bool)
            gone[cut.keep] = False
            slice_unit_rows(graph, site.row_groups(), gone.nonzero().flatten(), users)
            slice_linear_cols(graph, site.down, cut.keep, users)
            widths[site.block] = int(cut.keep.numel())
        from lowbit.passes.dce import eliminate_dead_code

        eliminate_dead_code(graph)
        stats = reinfer(graph, self.name)
        params_after = sum(v.data.numel() for v in graph.params.values())
        record_widths(graph)
        stats.update(layers=len(sites), channels_removed=sum(counts), widths=widths, skipped=skipped,
                     params_removed=params_before - params_after, params_before=params_before,
                     **(col.size or {"calib_tokens": 0}), seconds=round(time.perf_counter() - t0, 2))
        return PassResult(sum(counts) > 0, stats)
