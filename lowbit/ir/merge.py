"""Horizontal fusion: linears that read the same input with the same scheme become one wider linear and a split.

q/k/v projections read one normed activation, and so do gate/up: three (two) GEMMs that each read the input,
and for W8A8/FP8 each quantize it per token again. Merged, one GEMM reads the input once (quantizes it once)
and writes ``[..., N1 + N2 + N3]``; an ``aten.split_with_sizes`` hands each old reader its slice::

    %qkv = qlinear(%h, @..q_proj_k_proj_v_proj.weight.qdata, @...scale, ..., w_qdtype="int4", ...)
                                            # model.layers.0.self_attn | fused q_proj, k_proj, v_proj
    %q, %k, %v = aten.split_with_sizes.default(%qkv, [576, 192, 192], -1)

``MERGE_RULES`` is the table, one row per mergeable op: which operands must be the very same value in every
member (the input; stored activation scales), which are parameters concatenated along N (dim 0: the weight,
its scales and zero points, the bias), and that every kwarg is equal (the whole scheme: weight qdtype, axis,
group, symmetry via the zero point's presence, the activation scheme and ``out_dtype``). The concatenated
constants are new parameters (``Graph.add_param``; the old ones become dead and DCE drops them).

Exact in real arithmetic: a linear's output column n is the dot product of the input with weight row n
(dequantized by row n's own scales), and a per-token activation quantization depends on the input alone, so
the merged GEMM computes the members' columns from the same operands. In floating point the GEMM library may
order the K reduction differently for another N (its tile tails): on CPU torch the merged SmolLM2 graph is
bit-identical in float32 for W4A16/W8A8/FP8 (tests/test_merge_linears.py), while tiny or odd widths (N = 4, 8)
and float64 differ in the last bit — the ``exact`` pass contract (relative change <= 1e-12 in float64) holds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from lowbit.ir.graph import Graph, Node, TensorType, Value

__all__ = ["MERGE_RULES", "SPLIT_OP", "MergeRule", "MergeStats", "merge_horizontal", "unmerge_horizontal"]

SPLIT_OP = "aten.split_with_sizes.default"


@dataclass(frozen=True)
class MergeRule:
    """One row: nodes of ``op`` whose ``shared`` operands are the same values and whose kwargs are equal merge;
    the ``concat`` operands (parameters, or None in every member) are concatenated along dim 0."""

    name: str
    op: str
    shared: tuple[int, ...]
    concat: tuple[int, ...]


MERGE_RULES: tuple[MergeRule, ...] = (
    # qlinear(x, qweight, w_scale, w_zero_point, bias, a_scale, a_zero_point; scheme kwargs)
    MergeRule("qlinear", "qlinear", shared=(0, 5, 6), concat=(1, 2, 3, 4)),
    # linear(x, weight, bias): float linears (unquantized projections) merge the same way
    MergeRule("linear", "linear", shared=(0,), concat=(1, 2)),
)
"""The horizontal-merge table (``merge_horizontal`` runs every row)."""


@dataclass
class MergeStats:
    """Per-row counts: groups merged, nodes they replaced; declined groups with the reason."""

    merged: dict[str, int]
    nodes: dict[str, int]
    declined: dict[str, str]

    @property
    def total(self) -> int:
        return sum(self.merged.values())


def _key(node: Node, rule: MergeRule) -> tuple[Any, ...] | None:
    """Group key: the shared operands' identities and the kwargs; None if the node cannot merge."""
    if len(node.outputs) != 1:
        return None
    out = node.output.type
    if not isinstance(out, TensorType) or out.rank < 1 or not isinstance(out.shape[-1], int):
        return None
    for i in rule.concat:
        a = node.arg(i)
        if a is not None and not (isinstance(a, Value) and a.is_param and isinstance(a.type, TensorType)
                                  and a.type.rank >= 1 and isinstance(a.type.shape[0], int)):
            return None
    if any(k in node.kwargs for k in ("x", "weight", "bias", "qweight", "w_scale", "w_zero_point", "a_scale",
                                       "a_zero_point")):
        return None  # operands passed by keyword: not the positional form the table describes
    shared = tuple(id(node.arg(i)) if isinstance(node.arg(i), Value) else repr(node.arg(i))
                   for i in rule.shared)
    kw = tuple(sorted((k, repr(v)) for k, v in node.kwargs.items()))
    present = tuple(node.arg(i) is not None for i in rule.concat)
    trailing = tuple(tuple(node.arg(i).type.shape[1:]) if node.arg(i) is not None else None
                     for i in rule.concat)
    return (shared, kw, present, trailing, out.dtype, tuple(out.shape[:-1]), len(node.args))


def _splits_a_tile(members: list[Node]) -> str | None:
    """Why 2-D weight-scale tiles (``w_block_size=[rows, cols]``, fp8-block128) cannot be stacked along N: a
    member before the last whose N is not a multiple of the tile's rows ends in a partial tile row, and the next
    member's rows would fall under its scales (SmolLM2's k_proj, N = 192 = 1.5 x 128)."""
    block = members[0].kwargs.get("w_block_size")
    if not isinstance(block, (list, tuple)):
        return None
    widths = [int(m.output.tensor_type.shape[-1]) for m in members]
    if all(n % int(block[0]) == 0 for n in widths[:-1]):
        return None
    return (f"weight scale tiles of {block[0]} rows: members' N {widths} are not multiples of {block[0]} before the "
            "last, so the stacked scales would not be the merged weight's tiles")


def _common_prefix(names: list[str]) -> tuple[list[str], list[str], list[str]]:
    """Dotted names split into (common prefix parts, the differing middles, common suffix parts)."""
    parts = [n.split(".") for n in names]
    pre = 0
    while all(len(p) > pre for p in parts) and len({p[pre] for p in parts}) == 1:
        pre += 1
    suf = 0
    while (all(len(p) - suf > pre for p in parts) and len({p[len(p) - 1 - suf] for p in parts}) == 1):
        suf += 1
    mids = [".".join(p[pre:len(p) - suf]) for p in parts]
    return parts[0][:pre], mids, parts[0][len(parts[0]) - suf:] if suf else []


def _merged_name(names: list[str]) -> str:
    pre, mids, suf = _common_prefix(names)
    return ".".join([*pre, "_".join(m.replace(".", "_") for m in mids if m) or "merged", *suf])


def _concat_param(graph: Graph, values: list[Value]) -> Value:
    name = graph.fresh_param_name(_merged_name([v.name for v in values]))
    datas = [v.data for v in values]
    if all(d is not None for d in datas):
        return graph.add_param(name, torch.cat(datas, 0))
    t0 = values[0].tensor_type
    rows = sum(int(v.tensor_type.shape[0]) for v in values)
    return graph.add_param(name, None, TensorType(t0.dtype, (rows, *t0.shape[1:])))


def _merge_group(graph: Graph, rule: MergeRule, members: list[Node]) -> Node:
    first = members[0]
    args = list(first.args)
    for i in rule.concat:
        if first.arg(i) is not None:
            args[i] = _concat_param(graph, [m.args[i] for m in members])
    sizes = [int(m.output.tensor_type.shape[-1]) for m in members]
    out0 = first.output.tensor_type
    modules = [m.module for m in members]
    pre, mids, _ = _common_prefix(modules)
    module = ".".join(pre)
    merged = graph.make_node(rule.op, args, dict(first.kwargs), name=f"{first.output.name}_merged",
                             type=TensorType(out0.dtype, (*out0.shape[:-1], sum(sizes))), module=module)
    inner = first.meta.get("fused")
    merged.meta["fused"] = ", ".join(mids) + (f": {inner}" if inner else "")
    merged.meta["merged"] = tuple(modules)
    patterns = {m.meta.get("sparsity") for m in members}
    if len(patterns) == 1 and None not in patterns:  # rows stacked: each member's N:M pattern along K holds
        merged.meta["sparsity"] = patterns.pop()
    split = graph.make_node(SPLIT_OP, [merged.output, sizes, -1], {}, name=f"{first.output.name}_split",
                            types=[TensorType(out0.dtype, (*out0.shape[:-1], n)) for n in sizes], module=module)
    graph.insert_before(first, merged)
    graph.insert_after(merged, split)
    for m, v in zip(members, split.outputs, strict=True):
        graph.replace_all_uses(m.output, v, after=split)
    return merged


def merge_horizontal(graph: Graph, rules: tuple[MergeRule, ...] = MERGE_RULES,
                     accept: Any = None, partition: Any = None) -> MergeStats:
    """Merge every group of two or more same-scheme nodes reading the same input (in place; the members are
    left dead for DCE). ``accept(node)`` restricts which nodes may take part (a pass's module scope);
    ``partition(node)`` (hashable) keeps nodes of different parts apart (a routed MoE layer's experts: each expert
    merges its own gate and up, never another expert's, which must run on other rows)."""
    stats = MergeStats({}, {}, {})
    for rule in rules:
        groups: dict[tuple[Any, ...], list[Node]] = {}
        for node in graph.nodes:
            if node.op != rule.op or (accept is not None and not accept(node)):
                continue
            key = _key(node, rule)
            if key is None:
                continue
            groups.setdefault(key if partition is None else (*key, partition(node)), []).append(node)
        for members in groups.values():
            if len(members) < 2:
                continue
            why = _splits_a_tile(members)
            if why is not None:
                stats.declined[members[0].name] = why
                continue
            _merge_group(graph, rule, members)
            stats.merged[rule.name] = stats.merged.get(rule.name, 0) + 1
            stats.nodes[rule.name] = stats.nodes.get(rule.name, 0) + len(members)
    return stats


def unmerge_horizontal(graph: Graph, rules: tuple[MergeRule, ...] = MERGE_RULES, accept: Any = None) -> int:
    """The inverse of ``merge_horizontal`` (in place): each merged node (``meta["merged"]``, read by its split)
    becomes its members again, each under its own module with its rows of the concatenated parameters, and each
    split output is a member's output. For writers that name tensors by module (the HF checkpoint formats, whose
    q_proj/k_proj/v_proj are separate), and for a backend that runs some members apart (``accept(merged node)``
    picks which merged nodes; default all); returns how many merged nodes were split back."""
    by_op = {r.op: r for r in rules}
    users = graph.users()
    count = 0
    for merged in [n for n in graph.nodes if n.meta.get("merged") and n.op in by_op
                   and (accept is None or accept(n))]:
        rule = by_op[merged.op]
        readers = users.get(id(merged.output), [])
        if len(readers) != 1 or readers[0].op != SPLIT_OP:
            continue
        split = readers[0]
        sizes = [int(v.tensor_type.shape[-1]) for v in split.outputs]
        modules = list(merged.meta["merged"])
        start = 0
        members = []
        for module, n, out in zip(modules, sizes, split.outputs, strict=True):
            args = list(merged.args)
            for i in rule.concat:
                a = merged.arg(i)
                if a is not None:
                    name = graph.fresh_param_name(f"{module}.{a.name.rsplit('.', 1)[-1]}")
                    args[i] = graph.add_param(name, a.data[start:start + n].clone())
            meta = {k: v for k, v in merged.meta.items() if k not in ("merged", "fused")}
            member = Node(merged.op, tuple(args), dict(merged.kwargs), module=module, meta=meta)
            split.outputs = [v for v in split.outputs if v is not out]
            member.add_output(out)
            members.append(member)
            start += n
        for member in members:
            graph.insert_before(merged, member)
        graph.remove(merged)
        graph.remove(split)
        count += 1
    return count
