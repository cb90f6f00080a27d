"""Fold norm gains into the linears that read the norm: the first step of rotation.

RMSNorm(x)·g feeding ``y = W·(...)`` equals ``(W·diag(g))·RMSNorm₁(x)`` with a unit-gain norm; a LayerNorm's
bias β moves into the linear's bias as ``b + W·β``. The gain is the norm's (``norm_gain``: Gemma's ``1 + w``);
the folded norm keeps its ``offset`` (the form a checkpoint writes its unit gain in). Once every norm has unit
gain, an orthogonal rotation
can pass through it (QuaRot/SpinQuant). A norm whose output also feeds anything but a linear's input
(MiniLM's post-attention LayerNorm feeds the residual stream) cannot be folded: it is listed in the stats
with the reason, never skipped silently.
"""

from __future__ import annotations

import re
import warnings

import torch

from lowbit.ir.graph import Graph, Node
from lowbit.ir.rewrite import eliminate_dead_code, matvec_float64, norm_gain, private_weight, scaled_columns
from lowbit.passes.base import NO_QLINEAR, Pass, PassResult, ScopedOptions, register_pass

NORM_OPS = ("rms_norm", "layer_norm")


class UntiedWeightWarning(UserWarning):
    """fold-norms gave a tied weight's reader its own copy (the tie cannot be kept: the final norm's gain folds into
    the head's columns, which the embedding's rows must not take); the message names the tensors and the size."""


class FoldNormsOptions(ScopedOptions):
    modules: str = ""
    """Regex on the norm's module path; empty folds every norm that can be folded."""


def _cannot_fold(norm: Node, readers: list[Node]) -> str | None:
    if not readers:
        return "its output is unused"
    for r in readers:
        if r.op != "linear":
            return f"its output is read by {r.op} (%{r.name})"
        if r.args[0] is not norm.output:
            return f"linear %{r.name} reads it as a weight"
        if not r.args[1].is_param or (len(r.args) > 2 and r.args[2] is not None and not r.args[2].is_param):
            return f"linear %{r.name} has a computed (not stored) weight or bias"
    return None


@register_pass
class FoldNorms(Pass):
    """Fold RMSNorm/LayerNorm gains and biases into the following linears, leaving unit-gain norms."""

    name = "fold-norms"
    Options = FoldNormsOptions
    exact = True
    requires = (NO_QLINEAR,)

    def run(self, graph: Graph) -> PassResult:
        rx = re.compile(self.options.modules) if self.options.modules else None
        users = graph.users()
        folded, skipped, untied = [], [], []
        for norm in graph.nodes:
            if norm.op not in NORM_OPS or (rx is not None and not rx.search(norm.module)):
                continue
            gain = norm.arg(1, "weight")
            beta = norm.arg(2, "bias") if norm.op == "layer_norm" else None
            if gain is None and beta is None:
                continue
            readers = users.get(id(norm.output), [])
            reason = _cannot_fold(norm, readers)
            if reason is not None:
                skipped.append(f"{norm.module or norm.name}: {reason}")
                continue
            g = norm_gain(norm)
            for r in readers:
                shared = r.args[1]
                w = private_weight(graph, r, 1, users, f"{r.module}.weight")
                if w is not shared:  # a tied weight (the head of a tied embedding) gets its own copy to fold into
                    mib = shared.data.numel() * shared.data.element_size() / 2**20
                    others = sorted({n.module or n.name for n in users.get(id(shared), []) if n is not r})
                    untied.append(f"{r.module}: own copy of @{shared.name}, shared with {', '.join(others)} "
                                  f"(+{mib:.1f} MiB)")
                if beta is not None:
                    shift = matvec_float64(w.data, beta.data)
                    b = r.args[2] if len(r.args) > 2 else None
                    if b is not None:
                        b = private_weight(graph, r, 2, users, f"{r.module}.bias")
                        graph.set_param(b.name, (b.data.to(torch.float64) + shift).to(b.data.dtype))
                    else:
                        nb = graph.add_param(graph.fresh_param_name(f"{r.module}.bias"), shift.to(w.data.dtype))
                        r.args = (r.args[0], r.args[1], nb)
                if g is not None:
                    graph.set_param(w.name, scaled_columns(w.data, g))
            args = list(norm.args)
            args[1] = None
            if norm.op == "layer_norm":
                args[2] = None
            norm.args = tuple(args)
            folded.append(norm.module or norm.name)
        if folded:
            eliminate_dead_code(graph)
        stats: dict = {"folded": len(folded), "not_folded": skipped}
        if untied:
            stats["untied"] = untied
            # the params grow by a whole table (+108 MiB on SmolLM2), which a caller reading only sizes never saw
            warnings.warn(f"fold-norms untied {len(untied)} shared weight(s): {'; '.join(untied)}",
                          UntiedWeightWarning, stacklevel=2)
        return PassResult(bool(folded), stats)
