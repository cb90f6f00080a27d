"""The ``prune-heads`` pass: remove attention heads in whole GQA groups (a kv head and the query heads sharing it).

    prune-heads(ratio=0.34)                       one of SmolLM2's 3 kv groups per layer (3 of 9 query heads)
    prune-heads(ratio=0.2,allocation=global)      20% of all groups, from the layers where they matter least

Why whole groups: with grouped-query attention a kv head serves ``q_heads / kv_heads`` query heads; removing
query heads alone would leave the kv projections as they are and break the even sharing that the
``expand``/``reshape`` of the captured graph encode. Removing group g removes rows ``[g·r·d, (g+1)·r·d)`` of
``q_proj`` (r query heads of size d), rows ``[g·d, (g+1)·d)`` of ``k_proj`` and ``v_proj``, and the matching
columns of ``o_proj``; the head counts baked into reshape/expand literals are re-derived by
``lowbit.ir.shapes.reinfer_shapes``. A fused q/k/v linear (Phi-3's ``qkv_proj``, sliced along its last dim) loses
the same rows of each of its three parts, and its slices' bounds are moved here (only the pass knows which part
shrank by how much). The result equals the dense model with those rows and columns zeroed
(a zero value head contributes nothing through ``o_proj``), checked exactly in float64.

On a generation step graph (``compile_model(..., generation=...)``) the removed kv heads leave the KV cache too:
each pruned layer's cache inputs become ``[B, kept, S, head_dim]``, the scatter index that writes the new keys
and values gets a copy expanded over the kept count (the captured one is shared by every layer), and
``meta["generation"]["kv_heads"]`` records the count per layer (one int while all layers agree), which
``lowbit.generate`` allocates. Prefill and decode then equal the dense step with those heads zeroed.
An attention mask with a head axis (Bloom's ALiBi: a slope per query head, built once for every head and shared by
the layers) is read by each cut layer through slices of its kept query heads, so a kept head keeps its own slope.

Group importance sums the group's ``o_proj`` input-column scores (``wanda``: ``||X_c||·||W_o[:,c]||``,
``fluctuation``, ``magnitude``; see ``prune-mlp``). A budget that would remove every group of a layer is an
error naming the layer and the number.
"""

from __future__ import annotations

import time

import torch
from pydantic import model_validator

from lowbit.errors import counted
from lowbit.ir.graph import Graph, TensorType, Value
from lowbit.ir.rotation_regions import no_attention_reason
from lowbit.ir.shapes import EXPAND_OPS
from lowbit.passes.base import NO_DEQUANTIZE, NO_QLINEAR, Pass, PassError, PassResult, register_pass
from lowbit.passes.prune_mlp import (StructuredOptions, _Collected, allocate, channel_scores, check_target,
                                     collect_input_stats, cut_sites, nothing_removed, ratio_zero, reinfer,
                                     round_half_up)
from lowbit.passes.pruning_sites import (AttentionSite, find_attention_sites, kept_rows, refuse_nonfinite_weights,
                                         sites_in_modules, slice_linear_cols, slice_unit_rows)

__all__ = ["PruneHeads", "PruneHeadsOptions"]


class PruneHeadsOptions(StructuredOptions):
    @model_validator(mode="after")
    def _no_layer_cap(self) -> PruneHeadsOptions:
        if self.max_layer_ratio != type(self).model_fields["max_layer_ratio"].default:
            raise ValueError(f"option max_layer_ratio={self.max_layer_ratio} is not read by prune-heads: its global "
                             "allocation keeps one kv-head group per layer (spread= bounds each layer's share)")
        return self


def _shrink_cache(graph: Graph, s: AttentionSite, kept: int, made: dict[tuple[int, int], Value]) -> None:
    """A step graph's layer keeps ``kept`` kv heads: its cache inputs and the index of its cache writes follow."""
    for w in s.cache_writes:
        cache, idx = w.args[0], w.args[2]
        t = cache.tensor_type
        if t.rank != 4 or t.shape[1] != s.kv_heads:
            raise PassError(f"pass prune-heads: cache %{cache.name} of {s.block} is {t}, not [B, {s.kv_heads}, S, D]")
        cache.type = TensorType(t.dtype, (t.shape[0], kept, *t.shape[2:]))
        it = idx.tensor_type if isinstance(idx, Value) else None
        if it is None or it.shape[1] == kept:
            continue
        new = made.get((id(idx), kept))
        if new is None:
            prod = idx.producer
            if prod is None or prod.op not in EXPAND_OPS or not isinstance(prod.args[1], (list, tuple)) or \
                    prod.args[1][1] != it.shape[1]:
                raise PassError(f"pass prune-heads: the cache write %{w.name} of {s.block} takes index %{idx.name} "
                                "which is not an expand over the kv heads; cannot shrink it")
            target = list(prod.args[1])
            target[1] = kept
            node = graph.make_node(prod.op, [prod.args[0], target, *prod.args[2:]], dict(prod.kwargs),
                                   name=f"{idx.name}_kv{kept}", module=prod.module,
                                   types=[TensorType(it.dtype, (it.shape[0], kept, *it.shape[2:]))])
            graph.insert_after(prod, node)
            new = made[(id(idx), kept)] = node.output
        w.args = (w.args[0], w.args[1], new, *w.args[3:])


def _select_mask_heads(graph: Graph, s: AttentionSite, kept_q_heads: list[int],
                       made: dict[tuple[int, tuple[int, ...]], Value]) -> None:
    """The cut attention reads its per-head mask at ``kept_q_heads`` only: one slice per run of consecutive kept
    heads, concatenated along the head axis (layers keeping the same heads share them). A mask broadcast over heads
    (``[B, 1, L, S]``) stays; one with a head axis of another size is refused naming the attention: shape
    re-inference would otherwise fail on it, or broadcast a bias meant for one head onto another."""
    att = s.attention
    index = 3 if len(att.args) > 3 else None
    mask = att.args[3] if index is not None else att.kwargs.get("mask")
    if not isinstance(mask, Value):
        return
    t = mask.tensor_type
    if t.rank != 4 or t.shape[1] == 1:
        return
    if t.shape[1] != s.q_heads:
        raise PassError(f"pass prune-heads: %{att.name} (attention) of {s.block} adds mask %{mask.name} {t} whose "
                        f"head axis is not its {s.q_heads} query heads; cannot select the kept heads' part of it")
    key = (id(mask), tuple(kept_q_heads))
    selected = made.get(key)
    if selected is None:
        runs: list[list[int]] = []
        for h in kept_q_heads:
            if runs and runs[-1][1] == h:
                runs[-1][1] = h + 1
            else:
                runs.append([h, h + 1])
        parts = []
        for start, end in runs:
            node = graph.make_node("aten.slice.Tensor", (mask, 1, start, end), name=f"{mask.name}_heads",
                                   module=att.module, types=[TensorType(t.dtype, (t.shape[0], end - start,
                                                                                  *t.shape[2:]))])
            graph.insert_before(att, node)
            parts.append(node.output)
        if len(parts) > 1:
            node = graph.make_node("aten.cat.default", (parts, 1), name=f"{mask.name}_heads", module=att.module,
                                   types=[TensorType(t.dtype, (t.shape[0], len(kept_q_heads), *t.shape[2:]))])
            graph.insert_before(att, node)
            parts = [node.output]
        selected = made[key] = parts[0]
    if index is not None:
        att.args = (*att.args[:3], selected, *att.args[4:])
    else:
        att.kwargs = {**att.kwargs, "mask": selected}


def _move_slices(s: AttentionSite, gone: torch.Tensor) -> None:
    """A fused q/k/v linear loses the rows of groups ``gone`` from each of its q, k and v parts: each slice that
    takes a part out of its output gets the bounds of that part among the rows that stay (an end past the last row
    stays as captured)."""
    assert s.slices is not None
    rows = int(s.q.args[1].data.shape[0])
    (_, keep), = kept_rows(s.row_groups(), gone).values()
    before = torch.zeros(rows + 1, dtype=torch.long)
    before[keep + 1] = 1
    before = before.cumsum(0)  # before[i]: kept rows among the first i
    for sl in s.slices:
        start, end = sl.args[2], sl.args[3]
        sl.args = (sl.args[0], sl.args[1], int(before[start]), end if end >= rows else int(before[end]),
                   *sl.args[4:])


def _rows(groups: list[int], width: int) -> torch.Tensor:
    return torch.cat([torch.arange(g * width, (g + 1) * width) for g in groups]) if groups else \
        torch.zeros(0, dtype=torch.long)


@register_pass
class PruneHeads(Pass):
    """Remove attention heads by whole GQA groups (q heads with their shared k/v head) by calibrated importance."""

    name = "prune-heads"
    scope_unit = "attention"
    Options = PruneHeadsOptions
    requires = (NO_QLINEAR, NO_DEQUANTIZE)

    def run(self, graph: Graph) -> PassResult:
        o: PruneHeadsOptions = self.options  # type: ignore[assignment]
        t0 = time.perf_counter()
        sites, skipped = find_attention_sites(graph)
        sites = sites_in_modules(sites, o.modules, self.name, lambda s: s.o.module, "attention output projections")
        if not sites and skipped:  # attentions were found, each refused: "no attention ... found" was untrue
            more = f"; and {len(skipped) - 2} more" if len(skipped) > 3 else ""
            raise PassError(f"pass {self.name}: none of the graph's {counted(len(skipped), 'attention')} has heads it "
                            f"can cut ({'; '.join(skipped[:2] if more else skipped)}{more})")
        if not sites:
            raise PassError(f"pass {self.name}: no attention with q/k/v/o linears found "
                            f"({no_attention_reason(graph)})")
        refuse_nonfinite_weights(self.name, [n for s in sites for n in (s.q, s.k, s.v, s.o)])
        if o.ratio == 0:
            return ratio_zero(len(sites), skipped, "groups_removed", t0)
        calibrated = o.reads_calibration()
        second = o.update or o.score == "obs"
        check_target(o, self.name)
        col = _Collected()
        if o.allocation == "global" or not o.sequential:
            col = collect_input_stats(graph, [s.o for s in sites] if calibrated else [], o, self.name,
                                      second_moment=second and not o.sequential)
        if o.allocation == "uniform":
            counts = [round_half_up(o.ratio * s.kv_heads) for s in sites]
        else:
            rank = "fluctuation" if o.score == "obs" else o.score
            scores = [channel_scores(s.o.args[1].data, col.inputs.get(id(s.o)), rank)
                      .reshape(s.kv_heads, s.group_size * s.head_dim).sum(1) for s in sites]
            # global allocation keeps one group per layer, as it says; a layer held at that cap passes its share of
            # the budget on to the next groups of the ranking (it used to be dropped: fewer groups than asked)
            counts = allocate(scores, o.ratio, "global", 1, 1.0, spread=o.spread,
                              layer_caps=[s.kv_heads - 1 for s in sites])
        if o.ratio > 0 and not any(counts):
            raise nothing_removed(self.name, o.ratio, sites[0].block, sites[0].kv_heads, "kv-head group")
        for s, n_rm in zip(sites, counts):
            if n_rm >= s.kv_heads:
                raise PassError(f"pass {self.name}: layer {s.block}: ratio={o.ratio} would remove {n_rm} of its "
                                f"{s.kv_heads} kv-head groups ({s.q_heads} query heads), leaving no attention head; "
                                "lower the ratio (or use allocation=global, which keeps one group per layer)")
        users = graph.users()
        params_before = sum(v.data.numel() for v in graph.params.values())
        cuts = cut_sites(graph, sites, lambda s: s.o, counts, lambda s: s.group_size * s.head_dim,
                         lambda s: s.row_groups(), users, col, o, self.name, calibrated, second)
        heads: dict[str, list[int]] = {}
        made: dict[tuple[int, int], Value] = {}
        masks: dict[tuple[int, tuple[int, ...]], Value] = {}
        for s in sites:
            cut = cuts.get(id(s.o))
            if cut is None:
                heads[s.block] = [s.q_heads, s.kv_heads]
                continue
            keep = cut.keep.tolist()
            qw = s.group_size * s.head_dim
            gone = torch.tensor(sorted(set(range(s.kv_heads)) - set(keep)), dtype=torch.long)
            if s.slices is not None:
                _move_slices(s, gone)
            if s.group_view is not None:  # Falcon's grouped view: its literal group count (its -1 is a group's width)
                target = list(s.group_view.args[1])
                target[2] = len(keep)
                s.group_view.args = (s.group_view.args[0], target, *s.group_view.args[2:])
            slice_unit_rows(graph, s.row_groups(), gone, users)
            slice_linear_cols(graph, s.o, _rows(keep, qw), users)
            heads[s.block] = [len(keep) * s.group_size, len(keep)]
            if s.cache_writes:
                _shrink_cache(graph, s, len(keep), made)
            _select_mask_heads(graph, s, [g * s.group_size + j for g in sorted(keep) for j in range(s.group_size)],
                               masks)
        gen = graph.meta.get("generation")
        if gen and any(s.cache_writes for s in sites):
            by_name = {v.name: v for v in graph.inputs}
            kv = [int(by_name[n].tensor_type.shape[1]) for n in gen["cache_inputs"][::2]]
            # a new dict: a clone of the graph shares the old one
            graph.meta["generation"] = {**gen, "kv_heads": kv[0] if len(set(kv)) == 1 else kv}
        from lowbit.passes.dce import eliminate_dead_code

        eliminate_dead_code(graph)
        stats = reinfer(graph, self.name)
        params_after = sum(v.data.numel() for v in graph.params.values())
        old = graph.meta.get("pruned", {})  # every block's counts, those this pass left (``modules``) too
        every = {s.block: [s.q_heads, s.kv_heads] for s in find_attention_sites(graph)[0]}
        graph.meta["pruned"] = {**old, "heads": {**old.get("heads", {}), **every}}
        stats.update(layers=len(sites), groups_removed=sum(counts), heads=heads, skipped=skipped,
                     params_removed=params_before - params_after, params_before=params_before,
                     **(col.size or {"calib_tokens": 0}), seconds=round(time.perf_counter() - t0, 2))
        return PassResult(sum(counts) > 0, stats)
