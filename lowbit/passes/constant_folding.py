"""Constant folding: evaluate nodes whose operands are all parameters or literals, store the result."""

from __future__ import annotations

import torch

from lowbit.ir.graph import Graph, Node, TensorType, Value
from lowbit.ir.ops import resolve
from lowbit.passes.base import Pass, PassOptions, PassResult, register_pass

NONDETERMINISTIC = ("rand", "normal", "bernoulli", "dropout", "empty", "uniform", "multinomial")


class ConstantFoldingOptions(PassOptions):
    max_elements: int = 1 << 22
    """Largest result stored as a new parameter; a fold that would blow up the weights is left alone."""


def _foldable(node: Node, max_elements: int) -> bool:
    if len(node.outputs) != 1 or any(k in node.op for k in NONDETERMINISTIC):
        return False
    t = node.outputs[0].type
    if not isinstance(t, TensorType) or not t.is_static() or t.numel() > max_elements:
        return False
    return all(v.is_param and v.data is not None for v in node.inputs())


@register_pass
class ConstantFolding(Pass):
    """Evaluate nodes that read only parameters and literals, and replace them with a stored result."""

    name = "constant-fold"
    Options = ConstantFoldingOptions
    exact = True

    def run(self, graph: Graph) -> PassResult:
        folded: list[str] = []
        subst: dict[int, Value] = {}
        keep: list[Node] = []
        for node in graph.nodes:
            if subst:
                node.map_values(lambda v: subst.get(id(v), v))
            if not _foldable(node, self.options.max_elements):
                keep.append(node)
                continue
            args, kwargs = node.args, node.kwargs
            from torch.utils import _pytree as pytree

            args, kwargs = pytree.tree_map(lambda x: x.data if isinstance(x, Value) else x, (args, kwargs))
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
        if folded:
            from lowbit.passes.dce import eliminate_dead_code

            eliminate_dead_code(graph)
        return PassResult(bool(folded), {"folded": len(folded)})
