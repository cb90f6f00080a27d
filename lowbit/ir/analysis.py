"""Graph analyses on top of networkx: dependency graph, topological re-sorting, dominance.

Passes that insert nodes out of order can call ``topological_sort`` instead of computing positions; the
debugging tools use ``dominators`` to find where a block's outputs are all computed.
"""

from __future__ import annotations

import networkx as nx

from lowbit.ir.graph import Graph, Node


def to_networkx(graph: Graph) -> nx.DiGraph:
    """A DiGraph over node indices (edges producer -> reader), with ``op``/``module`` attributes."""
    index = {id(n): i for i, n in enumerate(graph.nodes)}
    g = nx.DiGraph()
    for i, n in enumerate(graph.nodes):
        g.add_node(i, op=n.op, module=n.module, name=n.name)
    for i, n in enumerate(graph.nodes):
        for v in n.inputs():
            if v.producer is not None and id(v.producer) in index:
                g.add_edge(index[id(v.producer)], i)
    return g


def topological_sort(graph: Graph) -> bool:
    """Reorder ``graph.nodes`` so every value is defined before use, keeping the current order where it
    already is (stable: lexicographic by original position). Returns whether anything moved."""
    g = to_networkx(graph)
    try:
        order = list(nx.lexicographical_topological_sort(g))
    except nx.NetworkXUnfeasible as exc:
        cycle = nx.find_cycle(g)
        names = " -> ".join(graph.nodes[a].name for a, _ in cycle)
        raise ValueError(f"the graph has a cycle: {names}") from exc
    moved = order != list(range(len(graph.nodes)))
    graph.nodes = [graph.nodes[i] for i in order]
    return moved


def dominators(graph: Graph) -> dict[Node, Node]:
    """Immediate dominator of each node reachable from the graph inputs (a virtual root feeds every node
    with no node-produced operands)."""
    g = to_networkx(graph)
    root = -1
    g.add_node(root)
    for i in list(g.nodes):
        if i != root and g.in_degree(i) == 0:
            g.add_edge(root, i)
    idom = nx.immediate_dominators(g, root)
    return {graph.nodes[k]: graph.nodes[v] for k, v in idom.items() if k != root and v != root}
