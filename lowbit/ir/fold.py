"""Constant folding in the IR: evaluate nodes whose operands are all parameters or literals, store the result.

A function, not a pass, because two layers need it: the ``constant-fold`` pass (``lowbit.passes``) and the
torch backend's weight materialization (a backend never imports a pass). Folding a ``dequantize`` of a packed
weight is exactly what materializing that weight means: the numbers are the op's reference, computed once.
"""

from __future__ import annotations

import torch

from lowbit.ir.graph import Graph, Node, TensorType, Value, map_operands
from lowbit.ir.ops import resolve
from lowbit.ir.rewrite import dead_nodes

__all__ = ["NONDETERMINISTIC", "drop_unused_params", "fold_constants"]

NONDETERMINISTIC = ("rand", "normal", "bernoulli", "dropout", "empty", "uniform", "multinomial")


def _foldable(node: Node, max_elements: int, skip_ops: frozenset[str]) -> bool:
    if len(node.outputs) != 1 or node.op in skip_ops or any(k in node.op for k in NONDETERMINISTIC):
        return False
    t = node.outputs[0].type
    if not isinstance(t, TensorType) or not t.is_static() or t.numel() > max_elements:
        return False
    return all(v.is_param and v.data is not None for v in node.inputs())


def fold_constants(graph: Graph, max_elements: int = 1 << 22, skip_ops: frozenset[str] = frozenset(),
                   skip_dead: bool = False) -> list[str]:
    """Replace every node that reads only parameters and literals (and whose result has at most
    ``max_elements`` elements) by a new parameter holding its result, in place; returns the folded ops.
    Nodes of ``skip_ops`` are never folded (``dequantize``, to keep packed weights packed); with ``skip_dead``
    neither are nodes no output depends on (evaluating them is work and memory for nothing).

    Folding is progressive (a node reading a folded result folds too). The parameters the folded nodes read
    stay: dead-code elimination, or ``drop_unused_params``, removes them.
    """
    folded: list[str] = []
    subst: dict[int, Value] = {}
    keep: list[Node] = []
    dead = dead_nodes(graph)[0] if skip_dead else set()
    for node in graph.nodes:
        if subst:
            node.map_values(lambda v: subst.get(id(v), v))
        if id(node) in dead or not _foldable(node, max_elements, skip_ops):
            keep.append(node)
            continue
        args, kwargs = map_operands(lambda x: x.data if isinstance(x, Value) else x, (node.args, node.kwargs))
        with torch.no_grad():
            result = resolve(node.op)(*args, **kwargs)
        out = node.outputs[0]
        if not isinstance(result, torch.Tensor) or result.dtype != out.type.dtype:
            keep.append(node)
            continue
        param = graph.add_param(graph.fresh_param_name(f"const.{node.module + '.' if node.module else ''}{out.name}"),
                                result.contiguous())
        subst[id(out)] = param
        folded.append(node.op)
    graph.nodes = keep
    graph.outputs = [subst.get(id(v), v) for v in graph.outputs]
    return folded


def drop_unused_params(graph: Graph) -> int:
    """Remove parameters no node and no output reads; returns how many."""
    read = {id(v) for n in graph.nodes for v in n.inputs()} | {id(v) for v in graph.outputs}
    unused = [name for name, v in graph.params.items() if id(v) not in read]
    for name in unused:
        graph.remove_param(name)
    return len(unused)
