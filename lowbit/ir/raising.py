"""Raising: rewrite exported ATen calls into lowbit's semantic ops, as tables of (pattern, rewrite) rows.

Two phases, because a single-op rename must not eat a node that a multi-node pattern still needs:
``COMPOSITE_RULES`` (rms_norm, rotary, ``x @ W.T``) first, then ``SINGLE_OP_RULES``. Every semantic op's reference
implementation (``lowbit.ir.ops``) makes the same ATen calls in the same order as the nodes it replaces,
so raising is bit-exact; ``tests/test_capture.py`` checks that on SmolLM2 and MiniLM.

``canonicalize`` first drops what carries no computation: runtime asserts, inference-mode dropout,
aliases and casts to the dtype a tensor already has.
"""

from __future__ import annotations

from typing import Any

import torch

from lowbit.ir.graph import Graph, Node, TensorType, Value
from lowbit.ir.pattern import Alt, Bindings, Opt, P, Rule, X, apply_rules
from lowbit.ir.rewrite import eliminate_dead_code

ASSERT_OPS = {
    "aten._assert_tensor_metadata.default",
    "aten._assert_scalar.default",
    "aten.sym_constrain_range_for_size.default",
    "aten.sym_constrain_range.default",
    "aten._assert_async.msg",
}


def _identity_input(node: Node) -> Value | None:
    """The input a node merely forwards, if it computes nothing (else None)."""
    op = node.op
    if op in {"aten.alias.default", "aten.detach.default", "aten.clone.default", "aten.lift_fresh_copy.default"}:
        src = node.args[0]
    elif op == "aten.dropout.default":
        train = node.arg(2, "train", False)
        src = node.args[0] if train is False else None
    elif op in {"aten.to.dtype", "aten.to.dtype_layout", "aten._to_copy.default", "aten.to.device",
                "aten.type_as.default"}:
        src = node.args[0]
    elif op == "aten.slice.Tensor":
        # x[:, 0:MAX] keeps everything: identity when it starts at 0 with step 1 and the type is unchanged
        start, step = node.arg(2, "start", None), node.arg(4, "step", 1)
        src = node.args[0] if start in (0, None) and step == 1 else None
    else:
        return None
    if not isinstance(src, Value) or len(node.outputs) != 1:
        return None
    out = node.outputs[0]
    if src.type != out.type or not isinstance(out.type, TensorType):
        return None
    return src


def canonicalize(graph: Graph) -> dict[str, int]:
    """Drop asserts and identity ops in one forward sweep with a substitution map."""
    subst: dict[int, Value] = {}
    keep: list[Node] = []
    dropped: dict[str, int] = {}
    for node in graph.nodes:
        if subst:
            node.map_values(lambda v: subst.get(id(v), v))
        if node.op in ASSERT_OPS and all(not o.type for o in node.outputs):
            dropped[node.op] = dropped.get(node.op, 0) + 1
            continue
        src = _identity_input(node)
        if src is not None:
            subst[id(node.outputs[0])] = src
            dropped[node.op] = dropped.get(node.op, 0) + 1
            continue
        keep.append(node)
    graph.nodes = keep
    graph.outputs = [subst.get(id(v), v) for v in graph.outputs]
    return dropped


# ---- helpers for rule tables ---------------------------------------------------------------------

def _is_param(x: Any) -> bool:
    return isinstance(x, Value) and x.is_param


def _is_float(x: Any) -> bool:
    return isinstance(x, float) and not isinstance(x, bool)


def _is_tensor(x: Any) -> bool:
    return isinstance(x, Value) and isinstance(x.type, TensorType)


def _cast(inner: Any, dtype_name: str) -> Alt:
    """``inner.to(dtype)`` as export writes it: ``aten.to.dtype``, or ``aten._to_copy`` with a dtype alone once the
    program is functionalized (``run_decompositions``: a model that mutates a tensor, as a Mixtral router's in-place
    top-k renormalisation ``/=`` does), which left a float64 or bfloat16 Mixtral's RMSNorm unraised, its float32
    statistics ATen."""
    return Alt(P("aten.to.dtype", inner, X(dtype_name)),
               P("aten._to_copy.default", inner, dtype=X(dtype_name), device=None, layout=None, memory_format=None))


def _node(op: str, *args: Any, **kwargs: Any) -> Node:
    return Node(op, args, kwargs)


# ---- composite patterns --------------------------------------------------------------------------

_RMS_X = Opt(lambda i: _cast(i, "compute_dtype"), X("x", _is_tensor))
_RMS_NORMED = P(
    "aten.mul.Tensor",
    _RMS_X,
    P("aten.rsqrt.default", P("aten.add.Tensor", P("aten.mean.dim", P("aten.pow.Tensor_Scalar", _RMS_X, 2), [-1], True),
                               X("eps", _is_float))),
)
_RMS_OUT = Opt(lambda i: _cast(i, "out_dtype"), _RMS_NORMED)
RMS_NORM = Alt(P("aten.mul.Tensor", X("w", _is_param), _RMS_OUT), P("aten.mul.Tensor", _RMS_OUT, X("w", _is_param)))


def _norm_operands(node: Node, b: Bindings) -> tuple[Value, Value] | None:
    """(x, weight) of a matched RMSNorm whose output keeps x's dtype and whose weight is one gain per channel."""
    x: Value = b["x"]
    out_t = node.output.type
    if not isinstance(out_t, TensorType) or x.tensor_type.dtype != out_t.dtype or b["w"].tensor_type.rank != 1:
        return None
    return x, b["w"]


def _rewrite_rms_norm(graph: Graph, node: Node, b: Bindings) -> Node | None:
    xw = _norm_operands(node, b)
    return None if xw is None else _node("rms_norm", *xw, eps=b["eps"], compute_dtype=b.get("compute_dtype"))


_GEMMA_GAIN = P("aten.add.Tensor", Opt(lambda i: _cast(i, "w_dtype"), X("w", _is_param)), X("offset", _is_float))
_GEMMA_SCALED = Alt(P("aten.mul.Tensor", _RMS_NORMED, _GEMMA_GAIN), P("aten.mul.Tensor", _GEMMA_GAIN, _RMS_NORMED))
GEMMA_RMS_NORM = Alt(P("aten.type_as.default", _GEMMA_SCALED, X("like", _is_tensor)),
                     Opt(lambda i: _cast(i, "out_dtype"), _GEMMA_SCALED))
"""Gemma's RMSNorm: ``(normed(x.float()) * (1.0 + w.float())).type_as(x)`` — the gain stored around 0 and applied in
float32 before the cast back."""


def _rewrite_gemma_rms_norm(graph: Graph, node: Node, b: Bindings) -> Node | None:
    xw = _norm_operands(node, b)
    if xw is None or (b.get("w_dtype") or xw[1].tensor_type.dtype) != (b.get("compute_dtype")
                                                                        or xw[0].tensor_type.dtype):
        return None  # the gain must be added and applied in the statistics' dtype
    return _node("rms_norm", *xw, eps=b["eps"], compute_dtype=b.get("compute_dtype"), offset=b["offset"],
                 gain_in_compute=True)


_COMPUTE_GAIN = Opt(lambda i: _cast(i, "w_dtype"), X("w", _is_param))
COMPUTE_GAIN_RMS_NORM = Opt(lambda i: _cast(i, "out_dtype"),
                            Alt(P("aten.mul.Tensor", _COMPUTE_GAIN, _RMS_NORMED),
                                P("aten.mul.Tensor", _RMS_NORMED, _COMPUTE_GAIN)))
"""Helium's RMSNorm: ``(w.to(float32) * normed(x.to(float32))).to(x.dtype)`` — the gain applied in
float32 before the cast back, with no offset. In a float32 model every cast is dropped and the Llama rule takes it;
in float64 or bfloat16 it stayed ATen, so ``rotate`` refused the model ('read by %to_6 (aten.to.dtype, module
model.layers.0.input_layernorm)') and no pass saw its norms."""


def _rewrite_compute_gain_rms_norm(graph: Graph, node: Node, b: Bindings) -> Node | None:
    xw = _norm_operands(node, b)
    compute = b.get("compute_dtype")
    if xw is None or (b.get("w_dtype") or xw[1].tensor_type.dtype) != (compute or xw[0].tensor_type.dtype):
        return None  # the gain must be applied in the statistics' dtype
    return _node("rms_norm", *xw, eps=b["eps"], compute_dtype=compute, gain_in_compute=compute is not None)


_ROT_X = X("x", _is_tensor)
ROTARY = P(
    "aten.add.Tensor",
    P("aten.mul.Tensor", _ROT_X, X("cos", _is_tensor)),
    P(
        "aten.mul.Tensor",
        P("aten.cat.default",
          [P("aten.neg.default", P("aten.slice.Tensor", _ROT_X, X("dim"), X("half"), X("end"))),
           P("aten.slice.Tensor", _ROT_X, X("dim"), 0, X("half"))],
          -1),
        X("sin", _is_tensor),
    ),
)


def _rewrite_rotary(graph: Graph, node: Node, b: Bindings) -> Node | None:
    t = b["x"].tensor_type
    head_dim = t.shape[-1]
    if not isinstance(head_dim, int) or b["dim"] not in (-1, t.rank - 1):
        return None
    if b["half"] != head_dim // 2 or head_dim % 2 or b["end"] < head_dim:
        return None
    return _node("rotary", b["x"], b["cos"], b["sin"])


_TRANSPOSED = Alt(P("aten.permute.default", X("w"), [1, 0]), P("aten.t.default", X("w")),
                  P("aten.numpy_T.default", X("w")),
                  *(P("aten.transpose.int", X("w"), a, b) for a, b in ((0, 1), (1, 0), (-1, -2), (-2, -1))))
"""``W.T`` of a weight as export writes it (``.T``, ``.t()``, ``.transpose(0, 1)``; a generation step's capture keeps
``.T`` as ``numpy_T``, which left Falcon's step projections as matmuls every quantizer skipped)."""


def _rewrite_transposed_linear(graph: Graph, node: Node, b: Bindings) -> Node | None:
    """``x @ W.T`` with a stored ``W [out, in]`` is ``linear(x, W)``, bit for bit (``aten.linear`` without a bias is
    that matmul): Falcon's ``FalconLinear`` computes its projections so, and left as a matmul on a permuted
    parameter no quantizer, smoother or checkpoint writer saw them (gptq said 'every linear is kept float')."""
    x, w = b["x"], b["w"]
    if not _is_param(w) or w.tensor_type.rank != 2 or x.tensor_type.rank < 1:
        return None
    return _node("linear", x, w)


COMPOSITE_RULES = [
    Rule("rms_norm", RMS_NORM, _rewrite_rms_norm),
    Rule("gemma_rms_norm", GEMMA_RMS_NORM, _rewrite_gemma_rms_norm),
    Rule("compute_gain_rms_norm", COMPUTE_GAIN_RMS_NORM, _rewrite_compute_gain_rms_norm),
    Rule("rotary", ROTARY, _rewrite_rotary),
    Rule("transposed_linear", P(("aten.matmul.default", "aten.mm.default"), X("x", _is_tensor), _TRANSPOSED),
         _rewrite_transposed_linear),
]


# ---- single-op renames ---------------------------------------------------------------------------

def _rename(op: str, n_args: int | None = None, **fixed: Any):
    """A rewrite that keeps the first ``n_args`` operands and renames the op."""

    def rewrite(graph: Graph, node: Node, b: Bindings) -> Node | None:
        args = node.args if n_args is None else node.args[:n_args]
        return Node(op, args, dict(fixed))

    return rewrite


def _rewrite_linear(graph: Graph, node: Node, b: Bindings) -> Node | None:
    bias = node.arg(2, "bias")
    return _node("linear", node.args[0], node.args[1], *([bias] if bias is not None else []))


def _rewrite_layer_norm(graph: Graph, node: Node, b: Bindings) -> Node | None:
    return _node("layer_norm", node.args[0], node.arg(2, "weight"), node.arg(3, "bias"),
                 normalized_shape=list(node.args[1]), eps=node.arg(4, "eps", 1e-5))


def _rewrite_sdpa(graph: Graph, node: Node, b: Bindings) -> Node | None:
    if node.arg(4, "dropout_p", 0.0) != 0.0:
        return None
    return _node("attention", node.args[0], node.args[1], node.args[2], node.arg(3, "attn_mask"),
                 scale=node.kwargs.get("scale"), is_causal=node.arg(5, "is_causal", False),
                 enable_gqa=node.kwargs.get("enable_gqa", False))


def _rewrite_softmax(graph: Graph, node: Node, b: Bindings) -> Node | None:
    if node.op == "aten._softmax.default" and node.args[2]:
        return None
    if node.op == "aten.softmax.int" and node.arg(2, "dtype") is not None:
        return None
    return _node("softmax", node.args[0], dim=node.args[1])


def _computed_from(value: Any, source: Any, depth: int = 8) -> bool:
    """Whether ``value`` is computed from ``source`` within ``depth`` producers (params are not followed)."""
    stack, seen = [(value, 0)], set()
    while stack:
        v, d = stack.pop()
        if v is source:
            return True
        p = getattr(v, "producer", None)
        if p is None or d >= depth or id(v) in seen:
            continue
        seen.add(id(v))
        stack.extend((x, d + 1) for x in p.inputs() if not x.is_param)
    return False


def _rewrite_add(graph: Graph, node: Node, b: Bindings) -> Node | None:
    """``stream + linear(...)`` is a residual add; a sum whose other side is computed from that linear's output is
    arithmetic on it (a written-out tanh GELU's ``x + 0.044715·x³`` after GPT-J's ``fc_in``), not a stream."""
    a, c = b["a"], b["b"]
    if a.type != c.type or node.kwargs:  # broadcasting or alpha: stays an ATen add
        return None
    for stream, update in ((a, c), (c, a)):
        if update.producer is not None and update.producer.op == "linear" and not _computed_from(stream, update):
            return _node("residual_add", stream, update)
    return _node("add", a, c)


def _rewrite_gelu(graph: Graph, node: Node, b: Bindings) -> Node | None:
    return _node("gelu", node.args[0], approximate=node.kwargs.get("approximate", "none"))


_HALF = (torch.float16, torch.bfloat16)


def _rewrite_aten_rms_norm(graph: Graph, node: Node, b: Bindings) -> Node | None:
    """``torch.nn.RMSNorm`` / ``F.rms_norm`` over the last dimension: captured as one ``aten.rms_norm``, which lowbit
    could not run (the model was refused as an unsupported architecture). Its definition (torch's decomposition):
    statistics and gain in the computation dtype (float32 for 16-bit inputs), ``eps=None`` that dtype's epsilon."""
    x: Value = b["x"]
    shape, weight, eps = node.arg(1, "normalized_shape"), node.arg(2, "weight"), node.arg(3, "eps")
    t = x.tensor_type
    if not isinstance(shape, (list, tuple)) or len(shape) != 1 or shape[0] != t.shape[-1]:
        return None  # over several dims: no rms_norm form
    if weight is not None and not (_is_param(weight) and weight.tensor_type.rank == 1):
        return None
    half = t.dtype in _HALF
    compute = torch.float32 if half else None
    if eps is None:
        eps = torch.finfo(compute or t.dtype).eps
    kw: dict[str, Any] = {"eps": float(eps), "compute_dtype": compute}
    if half and weight is not None:
        kw["gain_in_compute"] = True
    return _node("rms_norm", x, *([weight] if weight is not None else []), **kw)


def _rewrite_conv1d(graph: Graph, node: Node, b: Bindings) -> Node | None:
    """``addmm(bias, x, W)`` with a stored ``W [in, out]`` (GPT-2's ``Conv1D``) is ``linear(x, Wᵀ, bias)`` over the
    transposed weight: left as an ATen product no quantizer, smoother or writer saw it (quantize refused GPT-2). The
    weight is stored transposed in place when this is its only reader (it keeps its name: the HF writers map it back
    by module, ``Conv1D`` modules transposed again), else as a new parameter. Exact up to the GEMM's summation order
    (float64: 1e-15)."""
    bias, x, w = b["bias"], b["x"], b["w"]
    if node.kwargs or len(node.args) != 3 or w.tensor_type.rank != 2 or bias.tensor_type.rank != 1 \
            or bias.tensor_type.shape[0] != w.tensor_type.shape[1] or x.tensor_type.rank != 2:
        return None  # beta/alpha, or not a Conv1D's shapes
    readers = [n for n in graph.nodes if any(v is w for v in n.inputs())]
    t = w.tensor_type
    if len(readers) == 1:
        if w.data is not None:
            graph.set_param(w.name, w.data.t().contiguous())
        else:  # IR parsed without weights: the type only
            w.type = TensorType(t.dtype, (t.shape[1], t.shape[0]))
        wt = w
    else:
        wt = graph.add_param(graph.fresh_param_name(f"{w.name}.t"), w.data.t().contiguous() if w.data is not None
                             else None, None if w.data is not None else TensorType(t.dtype, (t.shape[1], t.shape[0])))
    return _node("linear", x, wt, bias)


SINGLE_OP_RULES = [
    Rule("conv1d_linear", P("aten.addmm.default", X("bias", _is_param), X("x", _is_tensor), X("w", _is_param),
                            exact_arity=False), _rewrite_conv1d),
    Rule("aten_rms_norm", P("aten.rms_norm.default", X("x", _is_tensor), exact_arity=False), _rewrite_aten_rms_norm),
    Rule("linear", P("aten.linear.default", X("x", _is_tensor), X("w", _is_tensor), exact_arity=False),
         _rewrite_linear),
    Rule("matmul", P(("aten.matmul.default", "aten.bmm.default", "aten.mm.default"), X("a"), X("b")),
         _rename("matmul", 2)),
    Rule("embedding", P("aten.embedding.default", X("w", _is_tensor), X("ids", _is_tensor), exact_arity=False),
         _rename("embedding", 2)),
    Rule("layer_norm", P("aten.layer_norm.default", X("x", _is_tensor), exact_arity=False), _rewrite_layer_norm),
    Rule("attention", P("aten.scaled_dot_product_attention.default", X("q"), exact_arity=False), _rewrite_sdpa),
    Rule("softmax", P(("aten._softmax.default", "aten.softmax.int"), X("x"), exact_arity=False), _rewrite_softmax),
    Rule("silu", P("aten.silu.default", X("x")), _rename("silu")),
    Rule("gelu", P("aten.gelu.default", X("x")), _rewrite_gelu),
    Rule("add", P("aten.add.Tensor", X("a", _is_tensor), X("b", _is_tensor)), _rewrite_add),
    Rule("mul", P("aten.mul.Tensor", X("a", _is_tensor), X("b", _is_tensor)),
         lambda g, n, b: _node("mul", b["a"], b["b"]) if b["a"].type == b["b"].type else None),
    Rule("reshape", P(("aten.view.default", "aten.reshape.default", "aten._unsafe_view.default"), X("x"), X("s")),
         _rename("reshape", 2)),
    Rule("transpose", P("aten.transpose.int", X("x"), X("d0"), X("d1")), _rename("transpose", 3)),
    Rule("permute", P("aten.permute.default", X("x"), X("dims")), _rename("permute", 2)),
]


def raise_graph(graph: Graph) -> dict[str, int]:
    """Canonicalize, then raise composite patterns, then single ops; returns counts per rule."""
    stats = {f"dropped:{k}": v for k, v in canonicalize(graph).items()}
    stats.update(apply_rules(graph, COMPOSITE_RULES))
    eliminate_dead_code(graph)
    stats.update(apply_rules(graph, SINGLE_OP_RULES))
    return stats

