"""Dead-code elimination: drop nodes nothing reads and parameters no node reads."""

from __future__ import annotations

from lowbit.ir.graph import Graph
from lowbit.ir.rewrite import eliminate_dead_code
from lowbit.passes.base import NO_DEAD_NODES, Pass, PassResult, register_pass

__all__ = ["DeadCodeElimination", "eliminate_dead_code"]


@register_pass
class DeadCodeElimination(Pass):
    """Remove nodes whose results are never used, and parameters nothing reads."""

    name = "dce"
    exact = True
    ensures = (NO_DEAD_NODES,)

    def run(self, graph: Graph) -> PassResult:
        nodes, params = eliminate_dead_code(graph)
        return PassResult(bool(nodes or params), {"nodes_removed": nodes, "params_removed": params})
