"""The ``prune-heads`` pass: remove attention heads in whole GQA groups (a kv head and the query heads sharing it).

    prune-heads(ratio=0.34)                       one of SmolLM2's 3 kv groups per layer (3 of 9 query heads)
    prune-heads(ratio=0.2,allocation=global)      20% of all groups, from the layers where they matter least

Why whole groups: with grouped-query attention a kv head serves ``q_heads / kv_heads`` query heads; removing
query heads alone would leave the kv projections as they are and break the even sharing that the
``expand``/``reshape`` of the captured graph encode. Removing group g removes rows ``[g·r·d, (g+1)·r·d)`` of
``q_proj`` (r query heads of size d), rows ``[g·d, (g+1)·d)`` of ``k_proj`` and ``v_proj``, and the matching
columns of ``o_proj``; the head counts baked into reshape/expand literals are re-derived by
``lowbit.ir.shapes.reinfer_shapes``. The result equals the dense model with those rows and columns zeroed
(a zero value head contributes nothing through ``o_proj``), checked exactly in float64.

Group importance sums the group's ``o_proj`` input-column scores (``wanda``: ``||X_c||·||W_o[:,c]||``,
``fluctuation``, ``magnitude``; see ``prune-mlp``). A budget that would remove every group of a layer is an
error naming the layer and the number.
"""

from __future__ import annotations

import re
import time

import torch

from lowbit.ir.graph import Graph
from lowbit.passes.base import NO_QLINEAR, Pass, PassError, PassResult, register_pass
from lowbit.passes.prune_mlp import (StructuredOptions, add_bias, allocate, channel_scores, collect_input_stats,
                                     refit_columns, reinfer)
from lowbit.passes.pruning_sites import find_attention_sites, slice_linear_cols, slice_linear_rows

__all__ = ["PruneHeads", "PruneHeadsOptions"]


class PruneHeadsOptions(StructuredOptions):
    pass


def _rows(groups: list[int], width: int) -> torch.Tensor:
    return torch.cat([torch.arange(g * width, (g + 1) * width) for g in groups]) if groups else \
        torch.zeros(0, dtype=torch.long)


@register_pass
class PruneHeads(Pass):
    """Remove attention heads by whole GQA groups (q heads with their shared k/v head) by calibrated importance."""

    name = "prune-heads"
    Options = PruneHeadsOptions
    requires = (NO_QLINEAR,)

    def run(self, graph: Graph) -> PassResult:
        o: PruneHeadsOptions = self.options  # type: ignore[assignment]
        t0 = time.perf_counter()
        sites, skipped = find_attention_sites(graph)
        if o.modules:
            rx = re.compile(o.modules)
            sites = [s for s in sites if rx.search(s.o.module)]
        if not sites:
            raise PassError(f"pass {self.name}: no attention with q/k/v/o linears found "
                            f"({'; '.join(skipped[:3]) or 'no attention op'})")
        calibrated = o.score != "magnitude" or o.compensate or o.update
        col = collect_input_stats(graph, [s.o for s in sites] if calibrated else [], o, self.name,
                                  second_moment=o.update)
        scores = []
        for s in sites:
            c = channel_scores(s.o.args[1].data, col.inputs.get(id(s.o)), o.score)
            scores.append(c.reshape(s.kv_heads, s.group_size * s.head_dim).sum(1))
        if o.allocation == "uniform":
            counts = [int(round(o.ratio * s.kv_heads)) for s in sites]
        else:
            counts = allocate(scores, o.ratio, "global", 1, 1.0)
        for s, n_rm in zip(sites, counts):
            if n_rm >= s.kv_heads:
                raise PassError(f"pass {self.name}: layer {s.block}: ratio={o.ratio} would remove {n_rm} of its "
                                f"{s.kv_heads} kv-head groups ({s.q_heads} query heads), leaving no attention head; "
                                "lower the ratio (or use allocation=global, which keeps one group per layer)")
        if o.allocation == "global":
            counts = [min(c, s.kv_heads - 1) for s, c in zip(sites, counts)]
        users = graph.users()
        params_before = sum(v.data.numel() for v in graph.params.values())
        heads: dict[str, list[int]] = {}
        for s, sc, n_rm in zip(sites, scores, counts):
            if n_rm == 0:
                heads[s.block] = [s.q_heads, s.kv_heads]
                continue
            order = torch.argsort(sc, stable=True)
            drop = sorted(order[:n_rm].tolist())
            keep = sorted(order[n_rm:].tolist())
            qw = s.group_size * s.head_dim
            refit = None
            if o.update:
                refit = refit_columns(s.o.args[1].data, col.inputs[id(s.o)], _rows(keep, qw), o.damp)
                add_bias(graph, s.o, refit[1])
            elif o.compensate:
                st = col.inputs[id(s.o)]
                cols = _rows(drop, qw)
                w = s.o.args[1].data.double()
                add_bias(graph, s.o, w[:, cols.to(w.device)] @ st.mean.to(w.device)[cols.to(w.device)])
            slice_linear_rows(graph, s.q, _rows(keep, qw), users)
            slice_linear_rows(graph, s.k, _rows(keep, s.head_dim), users)
            slice_linear_rows(graph, s.v, _rows(keep, s.head_dim), users)
            slice_linear_cols(graph, s.o, _rows(keep, qw), users)
            if refit is not None:
                graph.set_param(s.o.args[1].name, refit[0].to(s.o.args[1].data.dtype))
            heads[s.block] = [len(keep) * s.group_size, len(keep)]
        from lowbit.passes.dce import eliminate_dead_code

        eliminate_dead_code(graph)
        stats = reinfer(graph, self.name)
        params_after = sum(v.data.numel() for v in graph.params.values())
        graph.meta["pruned"] = {**graph.meta.get("pruned", {}), "heads": heads}
        stats.update(layers=len(sites), groups_removed=sum(counts), heads=heads, skipped=skipped,
                     params_removed=params_before - params_after, params_before=params_before,
                     calib_tokens=col.tokens, seconds=round(time.perf_counter() - t0, 2))
        return PassResult(sum(counts) > 0, stats)
