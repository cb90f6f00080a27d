"""The ``prune-blocks`` pass: remove whole decoder blocks, making the model shallower.

    prune-blocks(n=2)               the 2 blocks that change the residual stream least (ShortGPT's Block Influence)
    prune-blocks(blocks=[model.layers.5])   these blocks

Why: a pre-norm block adds updates to the residual stream (``residual_add(stream, update)``); removing the
block makes every such add a pass-through, so the model equals the dense one with the block's output
projections zeroed (``stream + 0``) exactly. Importance is ``1 - cos(block input, block output)`` averaged over
the calibration tokens (ShortGPT): blocks that barely turn the stream go first. Removing every block, or a
block with no ``residual_add``, is an error naming it, as is a graph with no block to remove (never a no-op). So is a
block whose ``residual_add`` adds to something the block computed, not to the stream entering it: parallel residual
(GPT-NeoX: ``x + (mlp(ln2(x)) + attn(ln1(x)))``, bypassing would drop the attention and keep the MLP) or post-norm
(BERT: ``ln2(ln1(x + attn) + mlp)``, the norms would stay).

On a generation step graph (``compile_model(..., generation=...)``) a removed block's KV cache goes with it: its
cache inputs and outputs leave the graph, the others are renumbered (``past_key_values_<i>_key``: layer i of the
pruned model), and ``meta["generation"]`` (``n_layers``, ``kv_heads``, ``windows``, ``cache_inputs``) follows, so
``generate`` allocates one cache slot per kept block.
"""

from __future__ import annotations

import re
import time
from typing import Any

from pydantic import Field, model_validator

from lowbit.calibration.engine import split_stages
from lowbit.ir.graph import Graph, Node, Value
from lowbit.passes.base import NO_QLINEAR, CalibrationOptions, Pass, PassError, PassResult, ScopedOptions, register_pass
from lowbit.passes.prune_mlp import collect_input_stats, reinfer
from lowbit.passes.pruning_sites import (block_of, block_residuals, bypass_problem, refuse_nonfinite_weights,
                                         stream_first)

__all__ = ["PruneBlocks", "PruneBlocksOptions"]


class PruneBlocksOptions(CalibrationOptions, ScopedOptions):
    n: int = Field(default=1, ge=0)
    """How many blocks to remove (the least important by Block Influence; at most as many as ``modules``
    matches); not read when ``blocks`` is given (refused unless left at 1)."""
    blocks: list[str] = []
    """Module paths of the blocks to remove (``model.layers.5``), instead of choosing by importance."""
    calib_n: int = Field(default=16, ge=1)
    modules: str = ""
    """Regex searched in block paths: only matching blocks are candidates (empty: all), of ``blocks`` too. The
    debugging tools restrict the pass to some layers through it."""

    def reads_calibration(self) -> bool:
        """The calibration data ranks blocks by influence: named ``blocks=`` (or ``n=0``) read none."""
        return not self.blocks and self.n > 0

    @model_validator(mode="after")
    def _n_or_blocks(self) -> PruneBlocksOptions:
        # with blocks= the calibration options were accepted and ignored (compile_model(calib=) hands its data only
        # to the passes whose reads_calibration() says they read it)
        self.refuse_unread({"n": "no blocks= (the listed blocks are removed): give n or blocks" if self.blocks
                            else None,
                            **self.data_needs("n >= 1 and no blocks= (the blocks are then ranked on calibration "
                                              "data)")})
        return self


@register_pass
class PruneBlocks(Pass):
    """Remove whole decoder blocks (their residual updates), chosen by Block Influence or by name."""

    name = "prune-blocks"
    scope_unit = "block"
    Options = PruneBlocksOptions
    requires = (NO_QLINEAR,)

    def run(self, graph: Graph) -> PassResult:
        o: PruneBlocksOptions = self.options  # type: ignore[assignment]
        t0 = time.perf_counter()
        names = [s.name for s in split_stages(graph) if s.kind == "block"]
        residuals = {b: block_residuals(graph, b) for b in names}
        for b, rs in residuals.items():
            stream_first(rs, b)
        if not any(residuals.values()):
            raise PassError(f"pass {self.name}: no decoder block adds its updates to a residual stream in this graph "
                            f"(a residual_add, or an add at the block's own level of the stream entering it and an "
                            f"update the block computes; {len(names)} blocks found: {', '.join(names[:3]) or 'none'}): "
                            "nothing can be removed")
        influence: dict[str, float] = {}
        size: dict[str, int] = {"calib_tokens": 0}  # what Block Influence ran on (nothing when blocks= are named)
        rx = re.compile(o.modules) if o.modules else None
        listed = [b for b in dict.fromkeys(o.blocks) if rx is None or rx.search(b)]  # modules scopes blocks too
        for b, rs in residuals.items():  # the candidates, before the calibration that would rank them
            problem = bypass_problem(b, rs) if (b in listed if o.blocks else o.n and (
                rx is None or rx.search(b))) else None
            if problem:
                raise PassError(f"pass {self.name}: {problem}")
        candidates = set(listed) if o.blocks else {b for b in residuals if rx is None or rx.search(b)}
        refuse_nonfinite_weights(self.name, [n for n in graph.nodes if n.op == "linear" and
                                             block_of(n.module or "") in candidates])
        if o.blocks:
            unknown = [b for b in o.blocks if b not in residuals]
            if unknown:
                raise PassError(f"pass {self.name}: option blocks: {unknown} are not blocks of this graph "
                                f"({len(names)} blocks: {names[0]} ... {names[-1]})")
            chosen = listed
        else:
            if o.n >= len(names):
                raise PassError(f"pass {self.name}: option n={o.n} would remove every one of the {len(names)} blocks")
            chosen = []
            if o.n:
                marks = {}
                for b, rs in residuals.items():
                    if rx is not None and not rx.search(b):
                        continue
                    for i, r in enumerate(rs):
                        marks[id(r)] = (b, i == len(rs) - 1)
                col = collect_input_stats(graph, [], o, self.name, marks)
                influence = {b: sum(v) / len(v) for b, v in col.block_change.items()}
                size = col.size or size
                chosen = sorted(influence, key=lambda b: influence[b])[:o.n]
                if not chosen:
                    raise PassError(f"pass {self.name}: option modules={o.modules!r} matches none of the "
                                    f"{len(names)} blocks ({names[0]} ... {names[-1]}): nothing to remove")
        if len(set(chosen)) >= len(names):
            raise PassError(f"pass {self.name}: removing {len(set(chosen))} blocks would leave none of {len(names)}")
        params_before = sum(v.data.numel() for v in graph.params.values())
        for b in chosen:
            rs = residuals[b]
            if not rs:
                raise PassError(f"pass {self.name}: block {b} has no residual_add: it cannot be bypassed")
            for r in reversed(rs):
                graph.replace_all_uses(r.output, r.args[0])
        gen = graph.meta.get("generation")
        gone: list[Value] = []
        if gen and chosen:
            gone = _drop_cache_slots(graph, gen, [names.index(b) for b in chosen], self.name)
        from lowbit.passes.dce import eliminate_dead_code

        eliminate_dead_code(graph)
        if gen and chosen:
            _drop_cache_inputs(graph, gone, self.name)
        stats = reinfer(graph, self.name)
        kept = [b for b in names if b not in chosen]
        graph.meta["pruned"] = {**graph.meta.get("pruned", {}), "layers_kept": kept}
        params_after = sum(v.data.numel() for v in graph.params.values())
        stats.update(blocks_removed=sorted(chosen), influence={k: round(v, 5) for k, v in influence.items()},
                     params_removed=params_before - params_after, params_before=params_before, **size,
                     seconds=round(time.perf_counter() - t0, 2))
        return PassResult(bool(chosen), stats)


def _drop_cache_slots(graph: Graph, gen: dict[str, Any], layers: list[int], pass_name: str) -> list[Value]:
    """A step graph without the blocks ``layers`` (indices in block order, which is the cache's layer order): their
    present outputs leave the graph (dead code then takes their cache writes), the cache inputs left are renamed
    as ``record_step_graph`` names them, and ``meta["generation"]`` is rebuilt for the kept layers."""
    n_layers = int(gen["n_layers"])
    caches = list(gen["cache_inputs"])
    if len(caches) != 2 * n_layers or len(graph.inputs) != 2 + len(caches) or len(graph.outputs) != 1 + len(caches):
        raise PassError(f"pass {pass_name}: the step graph has {len(graph.inputs) - 2} cache inputs and "
                        f"{len(graph.outputs) - 1} cache outputs for {n_layers} layers (a key and a value each, "
                        "expected): cannot tell which cache slot a block owns")
    drop = {2 * i for i in layers} | {2 * i + 1 for i in layers}
    keep = [j for j in range(len(caches)) if j not in drop]
    gone = [graph.inputs[2 + j] for j in sorted(drop)]
    graph.outputs = [graph.outputs[0], *(graph.outputs[1 + j] for j in keep)]
    kv = gen.get("kv_heads")
    kv_list = [int(h) for h in kv] if isinstance(kv, (list, tuple)) else None
    windows = gen.get("windows")
    kept_layers = [i for i in range(n_layers) if i not in set(layers)]
    kv_new: Any = kv if kv_list is None else [kv_list[i] for i in kept_layers]
    if isinstance(kv_new, list) and len(set(kv_new)) == 1:
        kv_new = kv_new[0]
    new = {**gen, "n_layers": len(kept_layers), "kv_heads": kv_new}  # a new dict: a clone shares the old one
    if isinstance(windows, (list, tuple)) and len(windows) == n_layers:
        new["windows"] = [windows[i] for i in kept_layers]
    graph.meta["generation"] = new
    return gone


def _drop_cache_inputs(graph: Graph, gone: list[Value], pass_name: str) -> None:
    """After dead code is gone: the removed blocks' cache inputs (nothing reads them now) leave the graph and the
    cache values are renumbered in layer order. A size read off a removed cache (the capture reads the batch
    size from layer 0's value cache) is read off a kept cache of the same dimension instead."""
    kept = [v for v in graph.inputs[2:] if all(v is not g for g in gone)]
    for n in graph.nodes:
        if n.op != "aten.sym_size.int" or not any(n.args[0] is g for g in gone):
            continue
        d = int(n.args[1])
        same = [v for v in kept if v.tensor_type.shape[d] == n.args[0].tensor_type.shape[d]]
        if same:
            n.args = (same[0], *n.args[1:])
    for v in gone:
        try:
            graph.remove_input(v)
        except ValueError as exc:
            raise PassError(f"pass {pass_name}: a removed block's cache: {exc}") from None
    for i, v in enumerate(graph.inputs[2:]):
        graph.rename(v, f"past_key_values_{i // 2}_{'value' if i % 2 else 'key'}")
    for i, v in enumerate(graph.outputs[1:]):
        graph.rename(v, f"present_{i // 2}_{'value' if i % 2 else 'key'}")
    graph.meta["generation"] = {**graph.meta["generation"], "cache_inputs": [v.name for v in graph.inputs[2:]]}
