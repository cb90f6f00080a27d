"""Writing the QDQ contract into a graph, one node at a time (``docs/design.md``, Quantize–dequantize form).

Every producer of quantized weights or static activation scales goes through these writers, whoever computed
the numbers: the ``quantize`` pass (RTN), the weight-calibration driver (GPTQ, AWQ, AutoRound:
``lowbit.calibration.weights``) and static activation calibration (``lowbit.calibration.static``). They take
the node to rewrite, never a module path, so two linears under one module path cannot be confused, and the
names, layout and metadata of the packed params are the same whatever algorithm chose the codes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from lowbit.ir.graph import Graph, Node, TensorType, Value
from lowbit.ir.offload import map_from_disk
from lowbit.ir.qscheme import QScheme, QuantConfig
from lowbit.ir.quant import Layout, get_qdtype, layout_for

__all__ = ["WeightPlan", "fallback_weights", "weight_scheme", "write_weight_qdq", "write_static_input_qdq"]


@dataclass
class WeightPlan:
    """One linear whose weight gets ``scheme``; ``group`` is the group size actually used (fallback applied)."""

    node: Node
    scheme: QScheme
    group: int | None


def weight_scheme(scheme: QScheme, group: int | None) -> QScheme:
    """``scheme`` with the group size actually used on one linear (a ``group_fallback`` replaces the default)."""
    return scheme if group in (None, scheme.group_size) else scheme.model_copy(update={"group_size": group})


def fallback_weights(graph: Graph, config: QuantConfig, group_fallback: int,
                     in_scope: Callable[[str], bool] = lambda module: True) -> list[tuple[Node, QScheme]]:
    """The linears of ``graph`` (those ``in_scope`` accepts) whose weight takes ``group_fallback``'s group: the group
    of their scheme in ``config`` does not divide their input size and the fallback does. Each comes with the scheme
    it gets, which ``config`` alone does not show."""
    out = []
    for node in graph.nodes:
        if node.op != "linear" or not in_scope(node.module):
            continue
        scheme = config.resolve(node.module)[0]
        w = node.args[1] if len(node.args) > 1 else None
        if scheme is None or scheme.group_size is None or not isinstance(w, Value) \
                or not isinstance(w.type, TensorType) or w.type.rank != 2:
            continue
        k = w.type.shape[-1]
        if isinstance(k, int) and k % scheme.group_size and not k % group_fallback:
            out.append((node, weight_scheme(scheme, group_fallback)))
    return out


def write_weight_qdq(graph: Graph, node: Node, scheme: QScheme, group: int | None, qdata: torch.Tensor,
                     scale: torch.Tensor, zero_point: torch.Tensor | None, users: dict[int, list[Node]]
                     ) -> tuple[int, int]:
    """Replace linear ``node``'s weight by packed params ``<w>.qdata/.scale/.zero_point`` read by a
    ``dequantize``; returns (float bytes, quantized bytes).

    ``qdata`` is the stored form (4-bit and narrower packed two per byte: ``lowbit.ir.quant.stored_codes``).
    The old weight param is never modified: a weight other nodes also read (a tied ``lm_head``) stays for them,
    and the new params take the linear's module path as their name base; otherwise the float param is removed.
    ``users`` is ``graph.users()`` from before the rewrite.
    """
    w: Value = node.args[1]
    exact = weight_scheme(scheme, group)
    layout = layout_for(exact, w.data.shape, "weight")
    base = w.name[:-len(".weight")] if w.name.endswith(".weight") else w.name
    shared = [u for u in users.get(id(w), []) if u is not node]
    if shared:  # a tied weight keeps its float tensor for its other readers; our copy gets its own names
        base = node.module or base
    if graph.offload_dir is not None:  # packed weights on disk: a compile's memory stops growing with depth
        qdata, scale, *rest = map_from_disk([t for t in (qdata, scale, zero_point) if t is not None],
                                            graph.offload_dir, stem=base)
        zero_point = rest[0] if rest else None
    qv = graph.add_param(graph.fresh_param_name(f"{base}.weight.qdata"), qdata)
    sv = graph.add_param(graph.fresh_param_name(f"{base}.weight.scale"), scale)
    zv = graph.add_param(graph.fresh_param_name(f"{base}.weight.zero_point"), zero_point) \
        if zero_point is not None else None
    dq = graph.make_node(
        "dequantize", [qv, sv, zv],
        {"qdtype": scheme.qdtype, **layout.kwargs(), "out_dtype": w.data.dtype},
        name=f"{node.name}_wdq", type=w.type, module=node.module)
    dq.meta["qscheme"] = exact.short()
    graph.insert_before(node, dq)
    args = list(node.args)
    args[1] = dq.output
    node.args = tuple(args)
    node.meta["qscheme_weight"] = dq.meta["qscheme"]
    before = w.data.numel() * w.data.element_size()
    after = sum(t.numel() * t.element_size() for t in (qdata, scale, zero_point) if t is not None)
    if not shared:
        graph.remove_param(w.name)
    return before, after


def write_static_input_qdq(graph: Graph, x: Value, readers: list[Node], scheme: QScheme, layout: Layout,
                           scale: torch.Tensor, zero_point: torch.Tensor | None) -> Node:
    """Insert ``quantize → dequantize`` of ``x`` with stored qparams before the first reader; rewire readers."""
    qd = get_qdtype(scheme.qdtype)
    first = min(readers, key=graph.index)
    base = first.module or x.name
    sv = graph.add_param(graph.fresh_param_name(f"{base}.input_scale"), scale.float())
    zv = graph.add_param(graph.fresh_param_name(f"{base}.input_zero_point"), zero_point) \
        if zero_point is not None else None
    t = x.tensor_type
    qshape = list(t.shape)
    if qd.packed:
        qshape[-1] = int(qshape[-1]) // 2
    kw = {"qdtype": scheme.qdtype, "axis": layout.axis, "block_size": layout.block_size}
    q = graph.make_node("quantize", [x, sv, zv], dict(kw), name=f"{x.name}_q",
                        type=TensorType(qd.storage_dtype, tuple(qshape)), module=first.module)
    dq = graph.make_node("dequantize", [q.output, sv, zv], {**kw, "out_dtype": t.dtype}, name=f"{x.name}_dq",
                         type=x.type, module=first.module)
    for n in (q, dq):
        n.meta["qscheme"] = scheme.short()
        graph.insert_before(first, n)
    for r in readers:
        r.args = (dq.output,) + tuple(r.args[1:])
    return dq
