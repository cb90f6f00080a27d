"""Fusion in the IR: the unfused QDQ form of a quantized linear becomes one ``qlinear`` node, and back.

The ``quantize``/``gptq``/``awq``/``autoround`` passes write a quantized linear as its reference subgraph
(design.md "Quantize–dequantize form")::

    %w   = dequantize(@w.qdata, @w.scale, @w.zero_point?, qdtype=W, axis=.., block_size=.., out_dtype=..)
    %s, %zp = dynamic_qparams(%x, qdtype=A, granularity=G, symmetric=S, axis=.., block_size=B)   # dynamic A
    %xq  = quantize(%x, %s, %zp?, qdtype=A, axis=.., block_size=B)                              # (or a
    %xdq = dequantize(%xq, %s, %zp?, qdtype=A, axis=.., block_size=B, out_dtype=x's dtype)     # stored %s)
    %y   = linear(%xdq | %x, %w, %bias?)

``QLINEAR_RULES`` is the table that recognises it, one row per form (weight-only int4/int8/fp8; W8A8, FP8,
W4A8 and other activation formats, dynamic or static scales; with and without bias), and ``fuse_qlinear``
runs it to a fixed point. A row's pattern says which nodes it reads; its rewrite checks that the kwargs are
exactly what ``qlinear``'s reference recomputes (the activation's ``axis`` follows from its granularity, the
zero point is passed iff asymmetric, the activation dequantize keeps ``x``'s dtype) and declines anything
else, so a fused graph computes the same bits as the graph it came from. ``expand_qlinear`` writes a
``qlinear`` back as that subgraph (the reference, op by op), which is how backends without a fused kernel
lower it.

The nodes a fusion read stay in the graph until dead-code elimination removes them (another reader may still
need a shared activation chain, q/k/v's say).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from lowbit.ir.graph import Graph, Node, TensorType, Value
from lowbit.ir.pattern import (
    Bindings,
    P,
    PatternMatcher,
    RewriteStats,
    Rule,
    X,
    graph_rewrite,
)
from lowbit.ir.quant import activation_axis, ceil_div_dim, get_qdtype

__all__ = [
    "QLINEAR_KWARGS",
    "QLINEAR_MATCHER",
    "QLINEAR_RULES",
    "ActivationQuant",
    "activation_quant",
    "expand_qlinear",
    "fuse_qlinear",
    "qlinear_form",
    "unfuse_qlinear",
]

QLINEAR_KWARGS = ("w_qdtype", "w_axis", "w_block_size", "a_qdtype", "a_granularity", "a_symmetric",
                  "a_block_size", "out_dtype")


def _param(x: Any) -> bool:
    return isinstance(x, Value) and x.is_param


def _param_or_none(x: Any) -> bool:
    return x is None or _param(x)


def _weight_dq() -> P:
    return P("dequantize", X("qweight", _param), X("w_scale", _param), X("w_zero_point", _param_or_none),
             name="wdq")


def _act_dq() -> P:
    """``dequantize(quantize(x, s, zp), s, zp)``: the same scale and zero point on both (X binds them once)."""
    return P("dequantize", P("quantize", X("x"), X("a_scale"), X("a_zp"), name="aq"), X("a_scale"), X("a_zp"),
             name="adq")


def _w_class(qdtype: str) -> str:
    qd = get_qdtype(qdtype)
    return "fp8" if qd.is_float else ("w4" if qd.packed else f"w{qd.bits}")


def _a_class(qdtype: str | None) -> str:
    if qdtype is None:
        return "a16"
    qd = get_qdtype(qdtype)
    return "afp8" if qd.is_float else f"a{4 if qd.packed else qd.bits}"


def qlinear_form(kwargs: dict[str, Any]) -> str:
    """A qlinear's form as the rule tables and reports name it: ``w4a16``, ``w8a8``, ``fp8`` (W and A), ..."""
    w, a = _w_class(kwargs["w_qdtype"]), _a_class(kwargs.get("a_qdtype"))
    if w == "fp8" and a == "afp8":
        return "fp8"
    return f"{w}{a}"


@dataclass(frozen=True)
class ActivationQuant:
    """The activation part of a qlinear read off the unfused graph: kwargs, and stored scales if static."""

    kwargs: dict[str, Any]
    scale: Value | None
    zero_point: Value | None


def activation_quant(x: Value, aq: Node, adq: Node, scale: Any, zp: Any) -> ActivationQuant | None:
    """The qlinear ``a_*`` kwargs that recompute ``adq(aq(x))`` exactly, or None if it is not that form."""
    if not isinstance(x, Value) or not isinstance(x.type, TensorType) or not isinstance(scale, Value):
        return None
    qdtype = aq.kwargs.get("qdtype")
    axis, block = aq.kwargs.get("axis", -1), aq.kwargs.get("block_size")
    if (adq.kwargs.get("qdtype") != qdtype or adq.kwargs.get("axis", -1) != axis
            or adq.kwargs.get("block_size") != block or adq.kwargs.get("out_dtype", torch.float32) != x.type.dtype):
        return None
    qd = get_qdtype(qdtype)
    producer = scale.producer
    if producer is not None and producer.op == "dynamic_qparams":
        pk = producer.kwargs
        granularity, symmetric = pk.get("granularity", "per_token"), bool(pk.get("symmetric", True))
        if (producer.args[0] is not x or producer.outputs[0] is not scale or pk.get("qdtype") != qdtype
                or pk.get("block_size") != block or pk.get("axis", -1) != axis
                or granularity not in ("per_tensor", "per_token", "per_channel")
                or activation_axis(granularity) != axis
                or pk.get("clip_ratio", 1.0) != 1.0):  # qlinear has no clip kwarg: stays the unfused QDQ
            return None
        # the reference passes the computed zero point iff the scheme has one (asymmetric integers)
        want_zp = None if (symmetric or qd.is_float) else producer.outputs[1]
        if zp is not want_zp:
            return None
        return ActivationQuant({"a_qdtype": qdtype, "a_granularity": granularity, "a_symmetric": symmetric,
                                "a_block_size": block}, None, None)
    if not _param(scale) or not _param_or_none(zp) or block is not None:
        return None
    # stored scales (static calibration): per tensor (0-d or one element) or one per channel of the last axis
    if axis is None:
        granularity = "per_tensor"
    elif axis == -1 and scale.tensor_type.rank == 1:
        granularity = "per_channel"
    else:
        return None
    return ActivationQuant({"a_qdtype": qdtype, "a_granularity": granularity, "a_symmetric": zp is None,
                            "a_block_size": None}, scale, zp)


Accept = Callable[[dict[str, Any]], bool]


def _fuse(accept: Accept, activation: bool) -> Callable[[Graph, Node, Bindings], Node | None]:
    """The rewrite of one row: build the qlinear if the bound subgraph is exactly its reference and the form
    is the row's (``accept``)."""

    def rewrite(graph: Graph, linear: Node, b: Bindings) -> Node | None:
        wdq: Node = b["wdq"]
        if linear.args[1] is not wdq.output or len(linear.args) > 3 or set(linear.kwargs) - {"bias"}:
            return None
        bias = linear.arg(2, "bias")
        if bias is not None and not isinstance(bias, Value):
            return None
        if wdq.output.tensor_type.rank != 2 or set(wdq.kwargs) - {"qdtype", "axis", "block_size", "out_dtype"}:
            return None
        kwargs: dict[str, Any] = {
            "w_qdtype": wdq.kwargs["qdtype"], "w_axis": wdq.kwargs.get("axis", -1),
            "w_block_size": wdq.kwargs.get("block_size"),
            "a_qdtype": None, "a_granularity": "per_token", "a_symmetric": True, "a_block_size": None,
            "out_dtype": wdq.kwargs.get("out_dtype", torch.float32)}
        a_scale = a_zp = None
        x = linear.args[0]
        if activation:
            act = activation_quant(b["x"], b["aq"], b["adq"], b["a_scale"], b["a_zp"])
            if act is None:
                return None
            kwargs.update(act.kwargs)
            a_scale, a_zp = act.scale, act.zero_point
            x = b["x"]
        if not accept(kwargs):
            return None
        args: list[Any] = [x, b["qweight"], b["w_scale"], b["w_zero_point"], bias]
        if a_scale is not None:
            args += [a_scale, a_zp]
        fused = Node("qlinear", tuple(args), kwargs, module=linear.module)
        replaced = [wdq.op]
        if activation:
            replaced = ([] if a_scale is not None else ["dynamic_qparams"]) + ["quantize", "dequantize"] + replaced
        fused.meta["fused"] = "+".join([*replaced, linear.op])
        for key in ("qscheme_weight", "sparsity"):  # (the 2:4 pattern: the backends' sparsity report reads it)
            if key in linear.meta:
                fused.meta[key] = linear.meta[key]
        return fused

    return rewrite


def _form(w: str, a: str) -> Accept:
    return lambda kw: (_w_class(kw["w_qdtype"]), _a_class(kw["a_qdtype"])) == (w, a)


# (row name, weight class, activation class): the forms lowbit's recipes produce, each its own row so the
# statistics say which fired; the catch-all rows take any other combination the reference covers (W4A4, W8A4,
# int3/int2 weights, ...). Rows that read an activation QDQ come first: the first row that accepts wins, and a
# weight-only row would also accept a quantized input (as a plain operand), fusing less.
_FORMS: list[tuple[str, bool, Accept]] = [
    ("w8a8", True, _form("w8", "a8")),
    ("fp8", True, _form("fp8", "afp8")),
    ("w4a8", True, _form("w4", "a8")),
    ("other-act", True, lambda kw: True),
    ("w4a16", False, _form("w4", "a16")),
    ("w8a16", False, _form("w8", "a16")),
    ("fp8a16", False, _form("fp8", "a16")),
    ("other-weight-only", False, lambda kw: True),
]


def _rows() -> list[Rule]:
    rows = []
    for name, activation, accept in _FORMS:
        x = _act_dq() if activation else X("x")
        for bias in (False, True):
            operands = (x, _weight_dq()) + ((X("bias"),) if bias else ())
            rows.append(Rule(f"{name}{'+bias' if bias else ''}", P("linear", *operands), _fuse(accept, activation)))
    return rows


QLINEAR_RULES: list[Rule] = _rows()
"""The fusion table: ``linear`` over a weight ``dequantize`` of packed params (and an activation QDQ) → qlinear."""

QLINEAR_MATCHER = PatternMatcher(QLINEAR_RULES)


def fuse_qlinear(graph: Graph) -> RewriteStats:
    """Fuse every quantized linear of ``graph`` into a ``qlinear`` (in place; dead QDQ nodes are left for DCE)."""
    return graph_rewrite(graph, QLINEAR_MATCHER)


# ---- the reference subgraph of a qlinear ------------------------------------------------------------


def _dynamic_types(x: TensorType, qdtype: str, granularity: str, block: int | None
                   ) -> tuple[TensorType, TensorType, TensorType]:
    """(scale, zero point, codes) types of a linear input's dynamic QDQ (the ``quantize`` pass's shapes)."""
    qd = get_qdtype(qdtype)
    if granularity == "per_tensor":
        sshape: tuple[Any, ...] = ()
    elif granularity == "per_channel":
        sshape = (x.shape[-1],)
    else:
        sshape = tuple(x.shape[:-1]) + (ceil_div_dim(x.shape[-1], block) if block else 1,)
    return (TensorType(torch.float32, sshape), TensorType(qd.container, sshape), _codes_type(x, qd.name))


def _codes_type(x: TensorType, qdtype: str) -> TensorType:
    qd = get_qdtype(qdtype)
    shape = list(x.shape)
    if qd.packed:
        shape[-1] = int(shape[-1]) // 2
    return TensorType(qd.storage_dtype, tuple(shape))


def expand_qlinear(graph: Graph, node: Node) -> list[Node]:
    """The unfused reference subgraph of ``node`` (a qlinear), op by op, as new nodes not inserted in ``graph``.

    Every node but the last has fresh outputs named in ``graph``; the last is the ``linear``, built without an
    output (``unfuse_qlinear`` hands it the qlinear's). Weight-only forms have no activation chain.
    """
    x, qweight, w_scale = node.args[0], node.args[1], node.args[2]
    w_zp, bias = node.arg(3, "w_zero_point"), node.arg(4, "bias")
    a_scale, a_zp = node.arg(5, "a_scale"), node.arg(6, "a_zero_point")
    kw = {k: node.kwargs.get(k) for k in QLINEAR_KWARGS if k in node.kwargs}
    w_qdtype = kw["w_qdtype"]
    out_dtype = kw.get("out_dtype", torch.float32)
    n, k = node.output.tensor_type.shape[-1], x.tensor_type.shape[-1]
    base, mod = node.output.name, node.module
    nodes: list[Node] = []
    wdq = graph.make_node("dequantize", [qweight, w_scale, w_zp],
                          {"qdtype": w_qdtype, "axis": kw.get("w_axis", 0), "block_size": kw.get("w_block_size"),
                           "out_dtype": out_dtype}, name=f"{base}_wdq", type=TensorType(out_dtype, (n, k)),
                          module=mod)
    nodes.append(wdq)
    xin: Value = x
    a_qdtype = kw.get("a_qdtype")
    if a_qdtype is not None:
        gran, sym, block = kw.get("a_granularity", "per_token"), kw.get("a_symmetric", True), kw.get("a_block_size")
        axis = activation_axis(gran)
        qk = {"qdtype": a_qdtype, "axis": axis, "block_size": block}
        if a_scale is None:
            st, zt, qt = _dynamic_types(x.tensor_type, a_qdtype, gran, block)
            qp = graph.make_node("dynamic_qparams", [x], {"qdtype": a_qdtype, "granularity": gran, "symmetric": sym,
                                                          "axis": axis, "block_size": block},
                                 name=f"{base}_xscale", types=[st, zt], module=mod)
            nodes.append(qp)
            a_scale = qp.outputs[0]
            a_zp = None if (sym or get_qdtype(a_qdtype).is_float) else qp.outputs[1]
        else:
            qt = _codes_type(x.tensor_type, a_qdtype)
        q = graph.make_node("quantize", [x, a_scale, a_zp], dict(qk), name=f"{base}_xq", type=qt, module=mod)
        dq = graph.make_node("dequantize", [q.output, a_scale, a_zp], {**qk, "out_dtype": x.tensor_type.dtype},
                             name=f"{base}_xdq", type=x.type, module=mod)
        nodes += [q, dq]
        xin = dq.output
    nodes.append(Node("linear", (xin, wdq.output, bias) if bias is not None else (xin, wdq.output), {},
                      module=mod, meta={k: v for k, v in node.meta.items() if k != "fused"}))
    return nodes


def unfuse_qlinear(graph: Graph) -> int:
    """Replace every ``qlinear`` by its reference subgraph (in place); returns how many were expanded."""
    count = 0
    i = 0
    while i < len(graph.nodes):
        node = graph.nodes[i]
        if node.op != "qlinear":
            i += 1
            continue
        nodes = expand_qlinear(graph, node)
        linear = nodes[-1]
        out = node.output
        node.outputs = []
        linear.add_output(out)
        graph.nodes[i:i + 1] = nodes
        for n in nodes[:-1]:
            graph._register_outputs(n)
        i += len(nodes)
        count += 1
    return count
