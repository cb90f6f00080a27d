"""``fuse-qlinear``: each quantized linear's QDQ subgraph becomes one ``qlinear`` node.

Why: a backend with a fused kernel (ONNX Runtime's MatMulNBits / MatMulIntegerToFloat, the Triton W4A16 GEMM)
should read one node that says "this is a quantized linear of this form", not rediscover the form by
pattern-matching Q/DQ chains in its lowering. The fusion rules are a table in ``lowbit.ir.fusion`` (one row
per form); ``qlinear``'s reference is exactly the subgraph it replaces, so the pass is exact. Linears whose QDQ
is not a form the reference recomputes bit for bit stay unfused, counted in ``unfused_quantized_linears``.
"""

from __future__ import annotations

from lowbit.ir.fusion import QLINEAR_MATCHER
from lowbit.ir.graph import Graph, Node
from lowbit.ir.pattern import graph_rewrite
from lowbit.passes.base import WEIGHT_PASSES, Condition, Pass, PassResult, ScopedOptions, register_pass
from lowbit.passes.dce import eliminate_dead_code


def _computed_qlinear_operands(graph: Graph) -> list[str]:
    return [f"%{n.name} (qlinear) in module {n.module!r}" for n in graph.nodes if n.op == "qlinear"
            and not all(getattr(a, "is_param", False) for a in n.args[1:3])]


STORED_QLINEAR_WEIGHTS = Condition("every qlinear reads stored packed weights and scales",
                                   _computed_qlinear_operands)


@register_pass
class FuseQLinear(Pass):
    """Fuse dequantize(+activation QDQ)+linear into qlinear nodes (rules: lowbit.ir.fusion.QLINEAR_RULES)."""

    name = "fuse-qlinear"
    Options = ScopedOptions
    exact = True
    after = WEIGHT_PASSES
    creates = ("qlinear",)
    ensures = (STORED_QLINEAR_WEIGHTS,)

    def run(self, graph: Graph) -> PassResult:
        scope = self.options.in_scope  # type: ignore[attr-defined]
        rw = graph_rewrite(graph, QLINEAR_MATCHER, accept=lambda node: scope(node.module))
        nodes, params = eliminate_dead_code(graph) if rw.rewritten else (0, 0)
        left = sum(1 for n in graph.nodes if n.op == "linear" and _reads_dequantize(n))
        stats = {"fused": rw.rewritten, "by_form": rw.counts(), "declined": {
            k: r.declined for k, r in rw.rules.items() if r.declined}, "unfused_quantized_linears": left,
            "nodes_removed": nodes}
        return PassResult(bool(rw.rewritten), stats)


def _reads_dequantize(n: Node) -> bool:
    w = n.args[1] if len(n.args) > 1 else None
    return w is not None and getattr(w, "producer", None) is not None and w.producer.op == "dequantize"
