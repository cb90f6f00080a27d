"""``fuse-norm-quant``: an RMSNorm whose readers all quantize its output per token emits the codes itself.

Why: a W8A8/FP8 qlinear quantizes its input per token before the GEMM; the norm before it writes the activation
in bf16 only for that quantization to read it back (absmax, then divide and round). ``rms_norm_quant`` does the
norm and the quantization in one pass over the row and the readers become ``qlinear_q`` (codes + per-token
scales in). Rules: ``lowbit.ir.normquant.NORM_QUANT_RULES``. Run after ``merge-linears`` so that q/k/v (one
reader) and gate/up share the codes. Exact: both ops' references are the unfused ops in the same order.
"""

from __future__ import annotations

from lowbit.ir.graph import Graph
from lowbit.ir.normquant import fuse_norm_quant
from lowbit.passes.base import WEIGHT_PASSES, Pass, PassResult, ScopedOptions, register_pass
from lowbit.passes.dce import eliminate_dead_code


@register_pass
class FuseNormQuant(Pass):
    """Fuse rms_norm + the per-token activation quantization of its qlinear readers (rms_norm_quant, qlinear_q)."""

    name = "fuse-norm-quant"
    Options = ScopedOptions
    exact = True
    after = (*WEIGHT_PASSES, "fuse-qlinear", "merge-linears", "kv-cache")
    creates = ("qlinear_q", "rms_norm_quant")

    def run(self, graph: Graph) -> PassResult:
        scope = self.options.in_scope  # type: ignore[attr-defined]
        st = fuse_norm_quant(graph, accept=lambda node: scope(node.module))
        nodes, _ = eliminate_dead_code(graph) if st.total else (0, 0)
        return PassResult(bool(st.total), {"fused": st.total, "by_rule": st.fused, "readers": st.readers,
                                           "declined": st.declined, "nodes_removed": nodes})
