"""``fuse-qlinear``: each quantized linear's QDQ subgraph becomes one ``qlinear`` node.

Why: a backend with a fused kernel (ONNX Runtime's MatMulNBits / MatMulIntegerToFloat, the Triton W4A16 GEMM)
should read one node that says "this is a quantized linear of this form", not rediscover the form by
pattern-matching Q/DQ chains in its lowering. The fusion rules are a table in ``lowbit.ir.fusion`` (one row
per form); ``qlinear``'s reference is exactly the subgraph it replaces, so the pass is exact. Linears whose QDQ
is not a form the reference recomputes bit for bit stay unfused, counted in ``unfused_quantized_linears``.
"""

from __future__ import annotations

from lowbit.ir.fusion import fuse_qlinear
from lowbit.ir.graph import Graph
from lowbit.passes.base import Pass, PassResult, register_pass
from lowbit.passes.dce import eliminate_dead_code


@register_pass
class FuseQLinear(Pass):
    """Fuse dequantize(+activation QDQ)+linear into qlinear nodes (rules: lowbit.ir.fusion.QLINEAR_RULES)."""

    name = "fuse-qlinear"
    exact = True

    def run(self, graph: Graph) -> PassResult:
        rw = fuse_qlinear(graph)
        nodes, params = eliminate_dead_code(graph) if rw.rewritten else (0, 0)
        left = sum(1 for n in graph.nodes if n.op == "linear" and _reads_dequantize(n))
        stats = {"fused": rw.rewritten, "by_form": rw.counts(), "declined": {
            k: r.declined for k, r in rw.rules.items() if r.declined}, "unfused_quantized_linears": left,
            "nodes_removed": nodes}
        return PassResult(bool(rw.rewritten), stats)


def _reads_dequantize(n) -> bool:
    w = n.args[1] if len(n.args) > 1 else None
    return w is not None and getattr(w, "producer", None) is not None and w.producer.op == "dequantize"
