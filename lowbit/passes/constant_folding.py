"""Constant folding: evaluate nodes whose operands are all parameters or literals, store the result."""

from __future__ import annotations

from lowbit.ir.fold import NONDETERMINISTIC, fold_constants
from lowbit.ir.graph import Graph
from lowbit.passes.base import Pass, PassOptions, PassResult, register_pass

__all__ = ["ConstantFolding", "ConstantFoldingOptions", "NONDETERMINISTIC"]


class ConstantFoldingOptions(PassOptions):
    max_elements: int = 1 << 22
    """Largest result stored as a new parameter; a fold that would blow up the weights is left alone."""


@register_pass
class ConstantFolding(Pass):
    """Evaluate nodes that read only parameters and literals, and replace them with a stored result."""

    name = "constant-fold"
    Options = ConstantFoldingOptions
    exact = True

    def run(self, graph: Graph) -> PassResult:
        folded = fold_constants(graph, self.options.max_elements)
        if folded:
            from lowbit.passes.dce import eliminate_dead_code

            eliminate_dead_code(graph)
        return PassResult(bool(folded), {"folded": len(folded)})
