"""Dead-code elimination: drop nodes nothing reads and parameters no node reads."""

from __future__ import annotations

from lowbit.ir.graph import Graph
from lowbit.passes.base import NO_DEAD_NODES, Pass, PassResult, register_pass


def eliminate_dead_code(graph: Graph) -> tuple[int, int]:
    """One backward sweep (nodes are in topological order); returns (nodes removed, params removed)."""
    live: set[int] = {id(v) for v in graph.outputs}
    dead: set[int] = set()
    for node in reversed(graph.nodes):
        if any(id(v) in live for v in node.outputs):
            live.update(id(v) for v in node.inputs())
        else:
            dead.add(id(node))
    if dead:
        graph.remove_nodes(dead)
    unused = [name for name, v in graph.params.items() if id(v) not in live]
    for name in unused:
        graph.remove_param(name)
    return len(dead), len(unused)


@register_pass
class DeadCodeElimination(Pass):
    """Remove nodes whose results are never used, and parameters nothing reads."""

    name = "dce"
    exact = True
    ensures = (NO_DEAD_NODES,)

    def run(self, graph: Graph) -> PassResult:
        nodes, params = eliminate_dead_code(graph)
        return PassResult(bool(nodes or params), {"nodes_removed": nodes, "params_removed": params})
