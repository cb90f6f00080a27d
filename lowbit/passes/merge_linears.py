"""``merge-linears``: linears reading the same input with the same scheme become one wider GEMM and a split.

Why: q/k/v and gate/up read one normed activation; as separate GEMMs each reads it again (and, for W8A8/FP8,
quantizes it per token again) and each pays a launch. One GEMM over the concatenated weights does the work
once; ``aten.split_with_sizes`` hands each old reader its columns. The rows (``lowbit.ir.merge.MERGE_RULES``)
merge ``qlinear`` nodes of one scheme and float ``linear`` nodes over parameters; the concatenated weights,
scales, zero points and biases are new parameters and the old ones are dropped. Exact (each output column is
computed from its own weight row and scale, as before).
"""

from __future__ import annotations

from lowbit.ir.graph import Graph
from lowbit.ir.merge import MERGE_RULES, merge_horizontal
from lowbit.passes.base import WEIGHT_PASSES, Pass, PassResult, ScopedOptions, register_pass
from lowbit.passes.dce import eliminate_dead_code


@register_pass
class MergeLinears(Pass):
    """Merge same-input, same-scheme (q)linears into one wider (q)linear + split (rules: lowbit.ir.merge)."""

    name = "merge-linears"
    Options = ScopedOptions
    exact = True
    # per-linear calibration and rewriting passes see the model's own linears; merging comes last
    after = (*WEIGHT_PASSES, "fuse-qlinear", "kv-cache")
    creates = tuple(sorted({r.op for r in MERGE_RULES} | {"aten.split_with_sizes.default"}))

    def run(self, graph: Graph) -> PassResult:
        scope = self.options.in_scope  # type: ignore[attr-defined]
        st = merge_horizontal(graph, accept=lambda node: scope(node.module))
        nodes, params = eliminate_dead_code(graph) if st.total else (0, 0)
        stats = {"merged": st.total, "by_rule": st.merged, "nodes_merged": st.nodes, "nodes_removed": nodes,
                 "params_removed": params}
        if st.declined:  # groups that could not stack (weight-scale tiles split by a member's N), by first member
            stats["declined"] = st.declined
        return PassResult(bool(st.total), stats)
