"""The ``last-logits`` pass: a causal LM's head reads only the last position of the sequence.

Why: generation needs one row of logits per prompt, but a captured ``(ids, ...) -> logits`` computes the final norm
and the ``[hidden, vocab]`` head for every position. At a 2048-token prefill of a Llama-7B shape that is a
0.54-TFLOP GEMM and a 2048 x 32000 logits tensor; for SmolLM2 (576 x 49152 head) the head is a fifth of the
prefill's multiply-adds. The pass puts ``aten.slice(h, 1, -1)`` on the residual stream where the final norm reads
it, so everything after (norm, activation quantization, head) runs on one row per sequence, and re-derives the
downstream shapes (``logits [B, L, V] -> [B, 1, V]``). ``compile_model(..., generation=GenerationSpec())`` appends
it to the pipeline (``GenerationSpec(logits="all")`` leaves it out, for perplexity through the step graph);
``Generator`` left-pads a batch so that every prompt ends in the last column.

It runs after every pass that calibrates or rewrites the head (their calibration sees every position) and after
the fusions; the rows it keeps equal the last rows of the unsliced graph to float64 rounding (the one-row GEMMs
sum in another order: 9e-14 of logits up to 75 on a float64 SmolLM2 slice, tests/test_generate.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.utils._pytree as pytree

from lowbit.ir.graph import Graph, Node, TensorType, Value
from lowbit.ir.shapes import ShapeError, reinfer_shapes
from lowbit.passes.base import WEIGHT_PASSES, Pass, PassError, PassResult, register_pass

__all__ = ["LastLogits", "NormSite", "final_norm"]

NORM_OPS = ("rms_norm", "layer_norm", "rms_norm_quant")
"""Ops that read the residual stream at the head (``rms_norm_quant``: a norm fused with its activation quant)."""

ROW_OPS = ("linear", "qlinear", "qlinear_q", "dequantize", "quantize", "hadamard", "aten._to_copy.default",
           "aten.to.dtype")
"""Row-wise ops a walk from the logits back to the final norm may pass: the head in each of its forms (float,
QDQ, fused) and what quantizes or casts its input (OLMo's LayerNorm in half precision casts its float32 output
back after the raised ``layer_norm``)."""

SCALAR_OPS = ("aten.mul.Tensor", "aten.div.Tensor", "aten.tanh.default")
"""Element-wise ops the walk may pass when every operand but the first is a number: Granite's logits divisor and
Gemma 2's soft-capping ``tanh(logits / cap) * cap`` after the head."""

UNRAISED_NORM_OPS = ("aten.pow.Tensor_Scalar", "aten.mean.dim", "aten.add.Tensor", "aten.sub.Tensor",
                     "aten.rsqrt.default",
                     "aten.mul.Tensor", "aten.div.Tensor", "aten.type_as.default", "aten.to.dtype",
                     "aten._to_copy.default")
"""Ops a norm module capture did not raise may hold (an RMSNorm written another way than Llama's or Gemma's: pow,
mean, add, rsqrt, mul, type_as; casts in half precision): element-wise, and ``mean`` over the last dim only, so
slicing rows before them is exact."""

MAX_WALK = 8


@dataclass
class NormSite:
    """Where the final norm reads the residual stream: ``stream``, the norm's nodes that read it, and its name."""

    stream: Value
    readers: list[Node]
    name: str


def _row_wise(node: Node) -> bool:
    if node.op in ROW_OPS:
        return True
    return node.op in SCALAR_OPS and all(isinstance(a, (int, float)) for a in node.args[1:]) and not node.kwargs


def _module_norm(graph: Graph, node: Node) -> NormSite | None:
    """A norm capture did not raise to one op (a variant the raising table lacks): the nodes of ``node``'s module,
    if all are row-wise (``UNRAISED_NORM_OPS``), they read exactly one activation from outside the module (the
    stream; parameters aside) and only ``node``'s output leaves it."""
    if not node.module:
        return None
    members = [n for n in graph.nodes if n.module == node.module]
    if any(n.op not in UNRAISED_NORM_OPS or (n.op == "aten.mean.dim" and list(n.args[1]) not in ([-1], [2]))
           for n in members):  # an op that could mix positions: slicing before it would change its rows
        return None
    inside = {id(v) for n in members for v in n.outputs}
    outside = {id(v): v for n in members for v in n.inputs() if id(v) not in inside and not v.is_param}
    if len(outside) != 1:
        return None
    users = graph.users()
    leaving = {id(v) for n in members for v in n.outputs
               if any(u.module != node.module for u in users.get(id(v), []))
               or any(v is o for o in graph.outputs)}
    if leaving != {id(node.output)}:
        return None
    stream = next(iter(outside.values()))
    return NormSite(stream, [n for n in members if any(v is stream for v in n.inputs())], node.module)


def final_norm(graph: Graph) -> NormSite:
    """The norm whose output the head reads: a walk back from the first graph output along each node's first
    argument, through at most ``MAX_WALK`` row-wise ops, to a norm op or an unraised norm module. Raises
    ``PassError`` naming what it found instead."""
    if not graph.outputs:
        raise PassError("last-logits: the graph has no outputs")
    v = graph.outputs[0]
    seen: list[str] = []
    walked: list[Node] = []
    for _ in range(MAX_WALK):
        node = v.producer
        if node is None:
            break
        seen.append(f"{node.op} ({node.module or '-'})")
        walked.append(node)
        if node.op in NORM_OPS:
            return NormSite(node.args[0], [node], node.module or node.op)
        if not _row_wise(node) or not node.args or not hasattr(node.args[0], "producer"):
            # an unraised norm module, left at this node or at a row-wise one of it the walk passed (OLMo 2's
            # RMSNorm in half precision ends with a cast); a norm only behind the head
            for exit_node in reversed(walked[1:]):
                if exit_node.module != node.module:
                    break
                site = _module_norm(graph, exit_node)
                if site is not None:
                    return site
            break
        v = node.args[0]
    raise PassError(f"last-logits: found no final norm behind the graph's first output %{graph.outputs[0].name} "
                    f"(walked {' <- '.join(seen) or 'nothing'}); the pass needs a causal LM's 'norm -> head' ending")


@register_pass
class LastLogits(Pass):
    """Compute the final norm and the LM head for the last position only (logits [B, 1, V])."""

    name = "last-logits"
    after = (*WEIGHT_PASSES, "fuse-qlinear", "merge-linears", "fuse-norm-quant", "kv-cache")

    def run(self, graph: Graph) -> PassResult:
        site = final_norm(graph)
        stream = site.stream
        shape = stream.tensor_type.shape if isinstance(stream.type, TensorType) else ()
        if len(shape) != 3:
            raise PassError(f"last-logits: the final norm {site.name} reads %{stream.name} of shape "
                            f"{list(shape)}; expected [batch, positions, hidden]")
        if shape[1] == 1:  # one position already (a decode-only graph, or this pass ran before)
            return PassResult(False, {"reason": "one position already"})
        cut = graph.make_node("aten.slice.Tensor", (stream, 1, -1, 9223372036854775807), name="last_position",
                              type=TensorType(stream.tensor_type.dtype, (shape[0], 1, shape[2])),
                              module=site.readers[0].module)
        graph.insert_before(site.readers[0], cut)
        for reader in site.readers:
            reader.args, reader.kwargs = pytree.tree_map(lambda a: cut.output if a is stream else a,
                                                         (reader.args, reader.kwargs))
        try:
            report = reinfer_shapes(graph)
        except ShapeError as exc:
            raise PassError(f"last-logits: {exc}") from None
        return PassResult(True, {"norm": site.name, "retyped": len(report.retyped)})
