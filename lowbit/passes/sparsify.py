"""The ``sparsify`` pass: zero weights of every block linear, unstructured or N:M (2:4), by magnitude, Wanda,
SparseGPT or a learned mask.

    sparsify(method=wanda,pattern=2:4)                  keep 2 of every 4 weights along K, by |W|·||X||
    sparsify(method=sparsegpt,sparsity=0.5)             50% per row, the rest updated through H⁻¹
    sparsify(method=sparsegpt,selection=layer,allocation=owl)   50% on average: per matrix, more in blocks
                                                        with fewer outlier weights (OWL)
    sparsify(method=magnitude,pattern=2:4)              no calibration
    sparsify(method=learned,pattern=2:4)                mask and kept weights learned per linear against the
                                                        input Hessian, ProxSparse's 2:4 regulariser (ADMM)
    sparsify(method=sparsegpt,pattern=2:4,refit=block)  then each block's kept weights trained toward the float
                                                        block's output (masks fixed)

Why: 2:4 weights run on sparse tensor cores (TensorRT, cuSPARSELt), and unstructured sparsity composes with
quantization for smaller checkpoints. The shape of the graph does not change: weights get exact zeros, and
each pruned linear records its pattern in ``node.meta["sparsity"]`` so that a later ``gptq`` keeps those
zeros (GPTQ's error feedback would otherwise fill them in). ``quantize`` keeps them by construction: its
symmetric grids map 0 to code 0, and its asymmetric ranges always include 0, so 0 maps to the zero point and
dequantizes to exactly 0 (tested).

Wanda, SparseGPT and the learned mask calibrate block by block (``lowbit.calibration.engine``): block i is
pruned, re-run, and block i+1 is calibrated on what the pruned block i produces (as both papers do). Linears outside the
repeated blocks (``lm_head``) and modules not matching ``modules`` stay dense.

``allocation=owl`` (Yin et al. 2024, "Outlier Weighed Layerwise sparsity") gives each block its own unstructured
sparsity: blocks holding more outlier weights (Wanda scores above ``owl_threshold`` × the block's mean) stay
denser, within ``sparsity ± owl_lambda``, and the parameter-weighted average is exactly ``sparsity``. The outlier
counts come from one extra calibration run of the unpruned model (the allocation needs every block's count before
the first is pruned).

``method=learned`` (``lowbit.calibration.learned_mask``) gathers the same Hessian as SparseGPT and, per linear input,
learns the mask and the kept weights together: ADMM on the layer's output error plus ProxSparse's 2:4 regulariser
(unstructured: an exact-count projection), then an exact mask and a conjugate-gradient refit of the kept weights.
It costs ``2·learn_steps + learn_refit`` ``[N, K]·[K, K]`` GEMMs per linear input: on one loaded CPU core about
12 s per SmolLM2 block against SparseGPT's ~2 s; its layer-wise output error is ~0.65x SparseGPT's on the same
Hessians (2:4, blocks 0/5/15/28).

``refit=block`` (``lowbit.calibration.block_refit``; EBFT, Guo et al. 2024) adds a block-level step to any calibrated
method: once a block's linears are pruned, their kept weights are trained with Adam (masks fixed, zeros exact) so
that the block's output matches the float model's on the calibration batches, before the engine hands the refitted
block's output to the next block. Every method above minimises each linear's own output error; attention, the MLP's
gate and the residual sum mix those errors, and only the block's output shows what the next block will read. It is
still one-shot calibration, one block at a time against that block's float output: the ``distill`` pass is the
end-to-end recovery against the float logits.
"""

from __future__ import annotations

import re
import time
from typing import Any, Literal

import torch
from pydantic import Field, field_validator, model_validator
from tqdm.auto import tqdm

from lowbit.calibration.block_refit import RefitOptions, refit_block
from lowbit.calibration.block_tuning import BlockFitStats, FloatTargetStream
from lowbit.calibration.data import calib_size
from lowbit.calibration.engine import BLOCK_PATTERN, BlockRun, batches_from_ids, run
from lowbit.calibration.gptq import HessianAccumulator
from lowbit.calibration.learned_mask import learn_mask
from lowbit.calibration.sparsity import (Selection, SparsityPattern, check_pattern, parse_pattern, prune_mask,
                                         sparsegpt_prune)
from lowbit.ir.graph import Graph, Node
from lowbit.ir.qscheme import module_matches
from lowbit.passes.base import (NO_DEQUANTIZE, NO_QLINEAR, CalibrationOptions, Pass, PassError, PassResult,
                                ScopedOptions, register_pass)
from lowbit.passes.fold_norms import private_weight
from lowbit.passes.pruning_sites import refuse_nonfinite_weights

__all__ = ["Sparsify", "SparsifyOptions", "sparse_linears"]


class SparsifyOptions(CalibrationOptions, ScopedOptions):
    method: Literal["magnitude", "wanda", "sparsegpt", "learned"] = "wanda"
    """How weights are chosen (and, for sparsegpt and learned, how the rest is updated)."""
    sparsity: float = Field(default=0.5, ge=0.0, lt=1.0)
    """Fraction of each row zeroed (unstructured); an N:M pattern sets its own (refused with one)."""
    pattern: str = "unstructured"
    """``unstructured`` or ``N:M`` (``2:4``: keep 2 of every 4 consecutive weights along the input dim)."""
    modules: str = ""
    """Regex searched in module paths: only block linears matching it are pruned (empty: all of them). The
    debugging tools restrict the pass to some layers through it (``debug bisect``/``sensitivity``)."""
    keep: list[str] = []
    """Module globs left dense (as ``quantize``'s ``keep``): the layers ``debug sensitivity`` found most damaged,
    applied with ``lowbit compile --overrides``; each must match a linear the pass would prune."""
    damp: float = Field(default=0.01, gt=0.0, lt=1.0)
    """SparseGPT and learned: diagonal damping, relative to the Hessian's mean diagonal."""
    learn_steps: int = Field(default=16, ge=1, le=10000)
    """learned: ADMM iterations per linear input (each two ``[N, K]·[K, K]`` GEMMs)."""
    learn_lambda: float = Field(default=1.0, ge=0.0)
    """learned, 2:4: ProxSparse regulariser strength, as the prox threshold λ/ρ on row-normalised Wanda-scaled
    weights (ramped up over the first quarter of the steps); 0: plain projection onto 2:4 (ALPS-style ADMM)."""
    learn_rho: float = Field(default=0.05, gt=0.0)
    """learned: ADMM penalty at the first step (the step that trades the output error against the mask)."""
    learn_rho_growth: float = Field(default=1.4, ge=1.0, le=10.0)
    """learned: the penalty's factor per step (W and Z must meet by the end: ρ·growth^steps ≫ 1)."""
    learn_refit: int = Field(default=25, ge=0, le=10000)
    """learned: conjugate-gradient iterations refitting the kept weights on the final mask."""

    block_size: int = Field(default=128, ge=1)
    """SparseGPT: columns per lazy-batch update (and per mask selection)."""
    selection: Selection = "row"
    """Unstructured: compare scores within each output row (every row equally sparse, Wanda's choice) or over the
    whole matrix (``layer``: rows that matter keep more weights; SparseGPT's reference choice)."""
    allocation: Literal["uniform", "owl"] = "uniform"
    """Unstructured: every block at ``sparsity``, or OWL's outlier-weighted sparsity per block (average kept)."""
    owl_threshold: float = Field(default=5.0, gt=0.0)
    """OWL: a weight is an outlier when its Wanda score exceeds this many times its block's mean score."""
    owl_lambda: float = Field(default=0.08, ge=0.0, lt=0.5)
    """OWL: block sparsities span ``sparsity ± owl_lambda`` (least outliers: sparsest)."""
    true_sequential: bool = False
    """Within a block too, each linear is calibrated on what the block's already-pruned linears produce (GPTQ's
    ``--true-sequential``): ``o_proj`` sees pruned q/k/v, the MLP a pruned attention. Costs one more run of the
    block per linear input after the first."""
    refit: Literal["none", "block"] = "none"
    """``block``: after a block's linears are pruned, train its kept weights (masks fixed, zeros exact) with Adam so
    the pruned block's output matches the float block's on the calibration batches (EBFT-style block
    reconstruction). Every method above fits each linear against its own output error; the block's output mixes
    those errors through attention, the MLP's gate and the residual, and only a block-level fit sees that. The
    next block calibrates on the refitted block's output. Kept per block only if it lowers the block's loss over
    the whole calibration set. Needs calibration (not ``method=magnitude``)."""
    refit_iters: int = Field(default=200, ge=1, le=100000)
    """refit: Adam steps per block, one calibration batch (``batch_size`` windows) per step."""
    refit_lr: float = Field(default=1e-3, gt=0.0, le=0.1)
    """refit: Adam's first step size in weight units (SmolLM2's block weights have an RMS of ~0.02-0.05), decaying
    linearly to 0. Measured on 2 SmolLM2 blocks after SparseGPT 2:4 (16 x 128 calibration tokens, 40 steps): the
    held-out error falls more at 1e-3 than at 1e-4 or 3e-4 (3e-3 no better), and keeps falling up to 160 steps."""
    refit_target: Literal["float", "pruned-input"] = "float"
    """refit: match the float model's block output on the float model's own input (``float``: a block also learns
    to undo what earlier pruned blocks got wrong), or the float block on the pruned model's input."""

    @field_validator("pattern")
    @classmethod
    def _pattern(cls, v: str) -> str:
        """``unstructured`` or ``N:M`` with 0 < N < M, checked when the pipeline is parsed (not after capture)."""
        parse_pattern(v, 0.5)
        return v

    @model_validator(mode="after")
    def _refit_needs_calibration(self) -> SparsifyOptions:
        if self.refit == "block" and self.method == "magnitude":
            raise ValueError("refit=block trains on calibration batches; method=magnitude calibrates nothing "
                             "(use wanda, sparsegpt or learned)")
        fields = type(self).model_fields
        p = parse_pattern(self.pattern, 0.5)
        # refused here, when the pipeline is parsed: the run found them after the model was loaded and captured
        if self.allocation == "owl" and (p.is_nm or self.method == "magnitude"):
            raise ValueError(f"allocation=owl needs unstructured sparsity and calibration: it sets each block's "
                             f"sparsity from calibrated outlier counts (got method={self.method}, "
                             f"pattern={self.pattern})")
        if self.method == "learned" and not p.is_nm and self.selection == "layer":
            raise ValueError("method=learned chooses unstructured masks per row; selection=layer is not supported "
                             "with it (use method=sparsegpt for a per-matrix mask)")
        self.refuse_unread({
            **{k: "refit=block" if self.refit == "none" else None for k in fields if k.startswith("refit_")},
            **{k: f"an unstructured pattern (pattern={self.pattern} keeps {p.n} of every {p.m} weights along K "
                  "in every row)" if p.is_nm else None for k in ("sparsity", "selection")},
            **{k: None if self.method == "learned" else "method=learned" for k in fields if k.startswith("learn_")},
            "true_sequential": "a calibrating method (method=magnitude calibrates nothing)"
            if self.method == "magnitude" else None,
            "damp": None if self.method in ("sparsegpt", "learned") else "method=sparsegpt or method=learned (the "
                                                                       "methods that invert the input Hessian)",
            "block_size": None if self.method == "sparsegpt" else "method=sparsegpt",
            **{k: None if self.allocation == "owl" else "allocation=owl" for k in ("owl_threshold", "owl_lambda")},
            **self.data_needs("a calibrating method (method=wanda, sparsegpt or learned; magnitude reads only the "
                              "weights)")})
        return self

    def reads_calibration(self) -> bool:
        return self.method != "magnitude"


def _add_squares(sq: dict[int, torch.Tensor], key: int, x: torch.Tensor) -> None:
    """Accumulate the per-channel sum of squares of ``x [..., K]`` under ``key`` (Wanda's ``||X_j||^2``)."""
    s = x.reshape(-1, x.shape[-1]).float().pow(2).sum(0).double()
    sq[key] = sq[key] + s if key in sq else s


def sparse_linears(graph: Graph, modules: str = "") -> list[Node]:
    """Linears with a stored weight inside the repeated blocks whose module path matches ``modules``."""
    rx_block = re.compile(BLOCK_PATTERN)
    rx_mod = re.compile(modules) if modules else None
    out = []
    for n in graph.nodes:
        if n.op != "linear" or not rx_block.match(n.module):
            continue
        if rx_mod is not None and not rx_mod.search(n.module):
            continue
        if not n.args[1].is_param:
            continue
        out.append(n)
    return out


@register_pass
class Sparsify(Pass):
    """Unstructured or N:M (2:4) weight sparsity by magnitude, Wanda or SparseGPT (block-by-block calibration)."""

    name = "sparsify"
    Options = SparsifyOptions
    requires = (NO_QLINEAR, NO_DEQUANTIZE)
    after = ("rotate", "prune-mlp", "prune-heads", "slice-residual")
    """Passes that would break the masks, run later: a rotation makes every weight nonzero, cutting MLP channels
    shifts the N:M groups along K (down_proj), and the head and MLP refits (``score=obs``) rewrite kept columns.
    ``prune-blocks`` (whole blocks go, the others keep their masks) and ``distill`` (masks fixed) may follow."""

    def run(self, graph: Graph) -> PassResult:
        o: SparsifyOptions = self.options  # type: ignore[assignment]
        t0 = time.perf_counter()
        try:
            p = parse_pattern(o.pattern, o.sparsity)
        except ValueError as exc:
            raise PassError(f"pass sparsify: option pattern/sparsity: {exc}") from None
        every = sparse_linears(graph)
        if not every:
            raise PassError("pass sparsify: no linear inside a repeated block to sparsify")
        targets = sparse_linears(graph, o.modules)
        if not targets:  # the scope check passed: it matches modules, but only outside the blocks (lm_head)
            raise PassError(f"pass sparsify: modules={o.modules!r} matches none of the {len(every)} linears inside "
                            f"the repeated blocks ({every[0].module} ... {every[-1].module}); linears outside them "
                            "(lm_head) stay dense")
        for glob in o.keep:
            if not any(module_matches(n.module, glob) for n in targets):
                raise PassError(f"pass sparsify: option keep: {glob!r} matches no linear this pass would prune "
                                f"({', '.join(n.module for n in targets[:3])}, ...)")
        kept = len(targets)
        targets = [n for n in targets if not any(module_matches(n.module, g) for g in o.keep)]
        if not targets:
            raise PassError(f"pass sparsify: option keep={o.keep} keeps every one of the {kept} linears it would "
                            "prune dense: nothing is left to sparsify")
        refuse_nonfinite_weights(self.name, targets)
        for n in targets:
            try:
                check_pattern(int(n.args[1].data.shape[1]), p, f"pass sparsify: linear %{n.name} ({n.module})")
            except ValueError as exc:
                raise PassError(str(exc)) from None
        if not p.is_nm and p.sparsity == 0 and o.refit == "none":  # a sweep's baseline: nothing to zero or repair
            return PassResult(False, {"pattern": str(p), "method": o.method, "linears": len(targets),
                                      "weights_zeroed": 0, "calib_tokens": 0,
                                      "not_pruned": "sparsity=0 zeroes nothing: no calibration ran, the weights are "
                                                    "unchanged", "seconds": round(time.perf_counter() - t0, 2)})
        users = graph.users()
        zeroed = total = 0
        changed = False

        def apply(node: Node, new_w: torch.Tensor, mask: torch.Tensor, p: SparsityPattern = p) -> None:
            nonlocal zeroed, total, changed
            read = node.args[1]
            wv = private_weight(graph, node, 1, users, f"{node.module}.weight")
            home = wv.data.device
            new_w = new_w.to(home)
            new_w[mask.to(home)] = 0
            new_w = new_w.to(wv.data.dtype)
            zeroed += int(mask.sum())
            total += mask.numel()
            # a second sparsify at the same pattern zeroes zeros: it reported changed=True on an IR it left equal
            if wv is read and node.meta.get("sparsity") == str(p) and torch.equal(new_w, wv.data):
                return
            changed = True
            graph.set_param(wv.name, new_w)
            node.meta["sparsity"] = str(p)

        stats: dict[str, Any] = {"pattern": str(p), "method": o.method, "linears": len(targets)}
        if o.method == "magnitude":
            for n in targets:
                w = n.args[1].data
                apply(n, w.clone(), prune_mask(w.float().abs(), p, o.selection))
        else:
            stats.update(self._calibrated(graph, targets, p, apply))
        stats.update(weights_zeroed=zeroed, weights_in_pruned_linears=total,
                     sparsity_measured=round(zeroed / max(total, 1), 6), seconds=round(time.perf_counter() - t0, 2))
        return PassResult(changed or stats.get("refit_blocks_kept", 0) > 0, stats)

    def _calibrated(self, graph: Graph, targets: list[Node], p: SparsityPattern, apply: Any) -> dict[str, Any]:
        o: SparsifyOptions = self.options  # type: ignore[assignment]
        want = {id(n) for n in targets}
        accs: dict[int, HessianAccumulator] = {}   # per input value (q/k/v share one)
        sq: dict[int, torch.Tensor] = {}
        readers: dict[int, list[Node]] = {}
        for n in targets:
            readers.setdefault(id(n.args[0]), []).append(n)
        sgpt_loss = 0.0
        ids = o.token_ids(graph, self.name)
        batches = batches_from_ids(graph, ids, o.batch_size_for(graph))
        out: dict[str, Any] = calib_size(ids)
        block_p: dict[str, SparsityPattern] = {}
        if o.allocation == "owl":
            sparsities, outliers, seconds = self._owl_allocation(graph, readers, p, batches)
            block_p = {name: SparsityPattern(s) for name, s in sparsities.items()}
            out.update(block_sparsity=sparsities, block_outlier_share=outliers, seconds_owl=seconds)

        # true_sequential: only each block's first input is collected in the engine's run; the others after the
        # linears before them are pruned
        rx_block = re.compile(BLOCK_PATTERN)
        first_keys: dict[str, int] = {}
        for n in targets:
            first_keys.setdefault(rx_block.match(n.module).group(1), id(n.args[0]))  # type: ignore[union-attr]
        early = set(first_keys.values()) if o.true_sequential else set(readers)

        refit = RefitOptions(iters=o.refit_iters, lr=o.refit_lr, target=o.refit_target) if o.refit == "block" else None
        refit_stats = BlockFitStats()
        float_stream = FloatTargetStream(chained=refit is not None and refit.target == "float")
        refit_bar = tqdm(total=len(first_keys), desc="block refit", unit="block",
                         disable=not (o.progress and refit is not None))

        hessian = o.method in ("sparsegpt", "learned")
        learned_loss = learned_wanda = 0.0
        bar = tqdm(total=len(readers), desc="learn mask", unit="input", disable=not (o.progress and
                                                                                      o.method == "learned"))

        def add(key: int, x: torch.Tensor) -> None:
            if hessian:
                acc = accs.get(key)
                if acc is None:
                    acc = accs[key] = HessianAccumulator(int(x.shape[-1]), device=x.device)
                acc.add(x)
            else:
                _add_squares(sq, key, x)

        def on_node(node: Node, args: tuple[Any, ...], kwargs: dict[str, Any], outs: list[Any]) -> None:
            if id(node) not in want:
                return
            key = id(node.args[0])
            if readers[key][0] is node and key in early:
                add(key, args[0].detach())

        def recollect(ctx: BlockRun, key: int) -> None:
            first = readers[key][0]

            def hook(node: Node, args: tuple[Any, ...], kwargs: dict[str, Any], outs: list[Any]) -> None:
                if node is first:
                    add(key, args[0].detach())

            ctx.run(on_node=hook, outputs=[])

        def apply_stacked(nodes: list[Node], ws: list[torch.Tensor], stacked: torch.Tensor, masks: torch.Tensor,
                          bp: SparsityPattern) -> None:
            """Hand each linear its rows of a solve over the stacked weights of the linears sharing one input."""
            row = 0
            for n, w in zip(nodes, ws):
                apply(n, stacked[row:row + w.shape[0]].clone(), masks[row:row + w.shape[0]], bp)
                row += w.shape[0]

        def on_block(ctx: BlockRun) -> bool:
            nonlocal sgpt_loss, learned_loss, learned_wanda
            block_targets = None
            if refit is not None and ctx.stage.kind != "prefix":  # before pruning: the block is still float
                block_targets = float_stream.next(ctx)
            keys = list(dict.fromkeys(id(n.args[0]) for n in ctx.nodes() if id(n) in want))
            if not keys:
                return False
            bp = block_p.get(ctx.name, p)
            for key in keys:
                if key not in early:
                    recollect(ctx, key)
                nodes = readers[key]
                if o.method == "learned":
                    # rows are independent given H (and per-row masks), so linears sharing an input learn together
                    ws = [n.args[1].data for n in nodes]
                    bar.set_postfix_str(nodes[0].module)
                    where = ", ".join(f"%{n.name} ({n.module})" for n in nodes)
                    try:
                        stacked, masks, st = learn_mask(
                            torch.cat(ws, 0), accs.pop(key).take_hessian(), bp, steps=o.learn_steps, lam=o.learn_lambda,
                            rho=o.learn_rho, rho_growth=o.learn_rho_growth, refit_iters=o.learn_refit, damp=o.damp)
                    except ValueError as exc:
                        raise PassError(f"pass sparsify: method=learned on linear {where}: {exc}") from None
                    learned_loss += st["loss"]
                    learned_wanda += st["loss_wanda_mask"]
                    apply_stacked(nodes, ws, stacked, masks, bp)
                    bar.update(1)
                    continue
                if o.method == "sparsegpt":
                    # linears reading one input share its Hessian: one call on their stacked rows (each row's mask
                    # and update depend only on that row and H, so this equals separate calls, at one factorisation)
                    ws = [n.args[1].data for n in nodes]
                    try:
                        stacked, masks, st = sparsegpt_prune(torch.cat(ws, 0), accs.pop(key).take_hessian(), bp,
                                                             damp=o.damp, block_size=o.block_size,
                                                             selection=o.selection,
                                                             groups=[int(w.shape[0]) for w in ws], consume_h=True)
                    except ValueError as exc:  # a non-finite Hessian: name the linears that read it
                        where = ", ".join(f"%{n.name} ({n.module})" for n in nodes)
                        raise PassError(f"pass sparsify: method=sparsegpt on linear {where}: {exc}") from None
                    sgpt_loss += st["loss"]
                    apply_stacked(nodes, ws, stacked, masks, bp)
                    continue
                norm = sq.pop(key).sqrt().float()
                for n in nodes:
                    w = n.args[1].data
                    apply(n, w.clone(), prune_mask(w.float().abs() * norm.to(w.device)[None, :], bp, o.selection), bp)
            if refit is not None and block_targets is not None:
                refit_bar.set_postfix_str(ctx.name)
                refit_block(ctx, [n for n in ctx.nodes() if id(n) in want], block_targets, refit, refit_stats, graph)
                refit_bar.update(1)
            return True

        try:
            report = run(graph, batches, on_node=on_node, on_block=on_block, progress=o.progress,
                         device=o.torch_device(self.name))
        finally:
            bar.close()
            refit_bar.close()
        missing = [n for n in targets if "sparsity" not in n.meta]
        if missing:
            raise PassError(f"pass sparsify: calibration never reached linear(s) "
                            f"{', '.join(f'%{n.name} ({n.module})' for n in missing[:5])}")
        out["seconds_calibration"] = round(report.seconds, 2)
        if o.method == "sparsegpt":
            out["sparsegpt_loss"] = round(sgpt_loss, 4)
        if o.method == "learned":  # normalised output error (row-RMS units) summed over the inputs; and Wanda's
            out.update(learned_loss=round(learned_loss, 4), wanda_mask_loss=round(learned_wanda, 4))
        if refit is not None:  # block output MSE against the target, summed over the blocks
            out.update(refit_blocks=refit_stats.blocks, refit_blocks_kept=refit_stats.kept,
                       refit_loss_before=round(refit_stats.loss_before, 6),
                       refit_loss_after=round(refit_stats.loss_after, 6), seconds_refit=round(refit_stats.seconds, 2),
                       refit_per_block=[{k: round(v, 6) if isinstance(v, float) else v for k, v in b.items()}
                                        for b in refit_stats.per_block])
        return out

    def _owl_allocation(self, graph: Graph, readers: dict[int, list[Node]], p: SparsityPattern,
                        batches: list[Any]) -> tuple[dict[str, float], dict[str, float], float]:
        """OWL: each block's sparsity from its share of outlier Wanda scores on the unpruned model (block name ->
        sparsity), those shares, and the seconds the extra calibration run took. ``readers``: the target linears by
        the id of the input they read."""
        o: SparsifyOptions = self.options  # type: ignore[assignment]
        want = {id(n) for nodes in readers.values() for n in nodes}
        sq: dict[int, torch.Tensor] = {}
        ratio: dict[str, float] = {}
        size: dict[str, int] = {}

        def on_node(node: Node, args: tuple[Any, ...], kwargs: dict[str, Any], outs: list[Any]) -> None:
            if id(node) in want and readers[id(node.args[0])][0] is node:
                _add_squares(sq, id(node.args[0]), args[0].detach())

        def on_block(ctx: BlockRun) -> bool:
            keys = [k for k in list(sq) if readers[k][0] in ctx.nodes()]
            scores = [(n.args[1].data.float().abs() * sq[k].sqrt().float().to(n.args[1].data.device)[None, :])
                      .flatten() for k in keys for n in readers[k]]
            for k in keys:
                sq.pop(k)
            if scores:
                flat = torch.cat(scores)
                ratio[ctx.name] = float((flat > o.owl_threshold * flat.mean()).double().mean())
                size[ctx.name] = int(flat.numel())
            return False  # nothing changed: the next block reads this one's unpruned output

        report = run(graph, batches, on_node=on_node, on_block=on_block, progress=o.progress,
                     device=o.torch_device(self.name))
        names = list(ratio)
        r = torch.tensor([ratio[k] for k in names], dtype=torch.float64)
        w = torch.tensor([size[k] for k in names], dtype=torch.float64)
        span = float(r.max() - r.min())
        # density linear in the outlier share over [0, 2λ], shifted so the size-weighted mean density is 1 - s
        dens = (r - r.min()) / span * 2 * o.owl_lambda if span > 0 else torch.zeros_like(r)
        dens = dens - float((dens * w).sum() / w.sum()) + (1 - p.sparsity)
        out = {k: 1 - float(d) for k, d in zip(names, dens)}
        bad = {k: v for k, v in out.items() if not 0 <= v < 1}
        if bad:
            k, v = next(iter(bad.items()))
            raise PassError(f"pass sparsify: allocation=owl gives block {k} sparsity {v:.4f}, outside [0, 1) "
                            f"(sparsity={p.sparsity}, owl_lambda={o.owl_lambda})")
        return out, ratio, round(report.seconds, 2)
