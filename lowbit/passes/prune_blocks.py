"""The ``prune-blocks`` pass: remove whole decoder blocks, making the model shallower.

    prune-blocks(n=2)               the 2 blocks that change the residual stream least (ShortGPT's Block Influence)
    prune-blocks(blocks=[model.layers.5])   these blocks

Why: a pre-norm block adds updates to the residual stream (``residual_add(stream, update)``); removing the
block makes every such add a pass-through, so the model equals the dense one with the block's output
projections zeroed (``stream + 0``) exactly. Importance is ``1 - cos(block input, block output)`` averaged over
the calibration tokens (ShortGPT): blocks that barely turn the stream go first. Removing every block, or a
block with no ``residual_add``, is an error naming it.
"""

from __future__ import annotations

import re
import time

from pydantic import Field

from lowbit.calibration.engine import split_stages
from lowbit.ir.graph import Graph
from lowbit.passes.base import NO_QLINEAR, CalibrationOptions, Pass, PassError, PassResult, ScopedOptions, register_pass
from lowbit.passes.prune_mlp import collect_input_stats, reinfer
from lowbit.passes.pruning_sites import block_residuals

__all__ = ["PruneBlocks", "PruneBlocksOptions"]


class PruneBlocksOptions(CalibrationOptions, ScopedOptions):
    n: int = Field(default=1, ge=0)
    """How many blocks to remove (the least important by Block Influence; at most as many as ``modules``
    matches); ignored when ``blocks`` is given."""
    blocks: list[str] = []
    """Module paths of the blocks to remove (``model.layers.5``), instead of choosing by importance."""
    calib_n: int = Field(default=16, ge=1)
    modules: str = ""
    """Regex searched in block paths: only matching blocks are candidates (empty: all). The debugging tools
    restrict the pass to some layers through it."""


@register_pass
class PruneBlocks(Pass):
    """Remove whole decoder blocks (their residual updates), chosen by Block Influence or by name."""

    name = "prune-blocks"
    Options = PruneBlocksOptions
    requires = (NO_QLINEAR,)

    def run(self, graph: Graph) -> PassResult:
        o: PruneBlocksOptions = self.options  # type: ignore[assignment]
        t0 = time.perf_counter()
        names = [s.name for s in split_stages(graph) if s.kind == "block"]
        residuals = {b: block_residuals(graph, b) for b in names}
        influence: dict[str, float] = {}
        if o.blocks:
            unknown = [b for b in o.blocks if b not in residuals]
            if unknown:
                raise PassError(f"pass {self.name}: option blocks: {unknown} are not blocks of this graph "
                                f"({len(names)} blocks: {names[0]} ... {names[-1]})")
            chosen = list(o.blocks)
        else:
            if o.n >= len(names):
                raise PassError(f"pass {self.name}: option n={o.n} would remove every one of the {len(names)} blocks")
            chosen = []
            if o.n:
                marks = {}
                rx = re.compile(o.modules) if o.modules else None
                for b, rs in residuals.items():
                    if rx is not None and not rx.search(b):
                        continue
                    for i, r in enumerate(rs):
                        marks[id(r)] = (b, i == len(rs) - 1)
                col = collect_input_stats(graph, [], o, self.name, marks)
                influence = {b: sum(v) / len(v) for b, v in col.block_change.items()}
                chosen = sorted(influence, key=lambda b: influence[b])[:o.n]
        if len(set(chosen)) >= len(names):
            raise PassError(f"pass {self.name}: removing {len(set(chosen))} blocks would leave none of {len(names)}")
        params_before = sum(v.data.numel() for v in graph.params.values())
        for b in chosen:
            rs = residuals[b]
            if not rs:
                raise PassError(f"pass {self.name}: block {b} has no residual_add: it cannot be bypassed")
            for r in reversed(rs):
                graph.replace_all_uses(r.output, r.args[0])
        from lowbit.passes.dce import eliminate_dead_code

        eliminate_dead_code(graph)
        stats = reinfer(graph, self.name)
        kept = [b for b in names if b not in chosen]
        graph.meta["pruned"] = {**graph.meta.get("pruned", {}), "layers_kept": kept}
        params_after = sum(v.data.numel() for v in graph.params.values())
        stats.update(blocks_removed=sorted(chosen), influence={k: round(v, 5) for k, v in influence.items()},
                     params_removed=params_before - params_after, params_before=params_before,
                     seconds=round(time.perf_counter() - t0, 2))
        return PassResult(bool(chosen), stats)
