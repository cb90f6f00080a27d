"""ONNX lowerings of the QDQ ops (``lowbit.ir.quant``): QuantizeLinear / DequantizeLinear / in-graph qparams.

The IR's ops are ONNX's QuantizeLinear/DequantizeLinear by construction (design.md), so the mapping is
direct; what differs is storage:

* 4-bit tensors are packed bytes in the IR (``uint8 [N, K/2]``) but typed ``INT4``/``UINT4`` in ONNX,
  packed two per byte in flat order, low nibble first: for a weight ``[N, K]`` that is the IR's bytes as
  they are, for its transpose the nibbles are re-paired along N; a Q→DQ pair on activations never
  materialises the IR's packed form at all (ONNX Runtime keeps INT4 tensors natively).
* ``int3``/``int2`` values fit a signed nibble, so they are INT4 in ONNX; a quantize to them clips
  ``x`` to the narrower range first (``round(clip(x, qmin·s, qmax·s) / s)`` equals the IR's
  ``clip(round(x / s), qmin, qmax)``).
* Zero points are unpacked containers in the IR; ONNX wants the quantized type itself.
* Scales are float32 in ONNX whatever the IR stored, because the reference computes in float32, and a
  one-element per-tensor scale becomes a scalar (ONNX reads a 1-D scale as per-axis).

A linear's weight ``dequantize`` is emitted on a transposed copy of its quantized initializers
(``[K, N]``: per-channel axis 1, blocks along axis 0), the ``DQ → MatMul`` form ORT fuses and TensorRT's
explicit-quantization GEMM expects. With ``weight_format="matmulnbits"`` a 4-bit weight-only linear becomes
one ``com.microsoft::MatMulNBits`` instead.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import onnx_ir as ir
import torch

from lowbit.backends.onnx.context import LoweringContext, NotLowerable, to_onnx_dtype
from lowbit.backends.onnx.registry import lowering
from lowbit.backends.onnx.semantic import TRANSPOSED_WEIGHT, _only_linear_weight_reads
from lowbit.ir.graph import Node, TensorType, Value
from lowbit.ir.quant import SCALE_EPS, QDType, dynamic_layout, get_qdtype, unpack_int4

ONNX_QTYPE: dict[str, ir.DataType] = {
    "int8": ir.DataType.INT8,
    "uint8": ir.DataType.UINT8,
    "int4": ir.DataType.INT4,
    "uint4": ir.DataType.UINT4,
    "int3": ir.DataType.INT4,
    "int2": ir.DataType.INT4,
    "fp8e4m3": ir.DataType.FLOAT8E4M3FN,
    "fp8e5m2": ir.DataType.FLOAT8E5M2,
}
def _qdtype(node: Node) -> QDType:
    return get_qdtype(node.kwargs["qdtype"])


def _granularity(node: Node, x: Value, scale: Value) -> str:
    """"tensor", "axis" or "block", as ``lowbit.ir.quant._granularity`` decides it (from declared shapes)."""
    st = scale.tensor_type
    block = node.kwargs.get("block_size")
    if st.rank == 0 or (block is None and st.rank <= 1 and st.shape and st.shape[0] == 1):
        return "tensor"
    return "axis" if block is None else "block"


def _axis(node: Node, rank: int) -> int:
    axis = node.kwargs.get("axis", -1)
    if axis is None:
        raise NotLowerable("a per-axis or block-wise scale needs an axis")
    return axis % rank


def _qdq_attrs(node: Node, kind: str, rank: int) -> dict[str, Any]:
    if kind == "tensor":
        return {}
    attrs: dict[str, Any] = {"axis": _axis(node, rank)}
    if kind == "block":
        attrs["block_size"] = int(node.kwargs["block_size"])
    return attrs


def _scale(ctx: LoweringContext, scale: Value, kind: str) -> ir.Value:
    """The float32 scale operand; per-tensor scales become 0-d."""
    if scale.is_param:
        data = scale.data.float()
        if kind == "tensor":
            data = data.reshape(())
        return ctx.derived(("scale", id(scale), kind), lambda: ctx.const_tensor(scale.name, data))
    v = ctx.tensor(scale, torch.float32)
    if kind == "tensor" and scale.tensor_type.rank != 0:
        v = ctx.op("Reshape", [v, ctx.ints([])])
    return v


def _q_tensor(name: str, values: torch.Tensor, onnx_type: ir.DataType) -> ir.TensorProtocol:
    """Unpacked quantized values (int8/uint8/fp8 containers) as an ONNX tensor of ``onnx_type``.

    4-bit types are packed here, two per byte in flat (row-major) order, low nibble first — ONNX's layout
    for INT4/UINT4 initializers — with torch ops rather than element-wise ml_dtypes conversion.
    """
    from onnx_ir.tensor_adapters import TorchTensor

    if onnx_type in (ir.DataType.INT4, ir.DataType.UINT4):
        flat = values.contiguous().reshape(-1).to(torch.uint8) & 0xF
        if flat.numel() % 2:
            flat = torch.cat([flat, flat.new_zeros(1)])
        packed = flat[0::2] | (flat[1::2] << 4)
        return ir.PackedTensor(packed.numpy(force=True), onnx_type, shape=list(values.shape), name=name)  # flat bytes
    if onnx_type not in (ir.DataType.FLOAT8E4M3FN, ir.DataType.FLOAT8E5M2, ir.DataType.INT8, ir.DataType.UINT8):
        raise NotLowerable(f"no ONNX storage for quantized type {onnx_type.name}")
    return TorchTensor(values.contiguous(), name=name)  # the IR's containers are ONNX's types


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    """The 4-bit codes of IR-packed bytes (``[..., K/2]`` → uint8 ``[..., K]``), two's complement kept as is."""
    return torch.stack([packed & 0xF, packed >> 4], dim=-1).flatten(-2)


def _weight_values(q: Value, qd: QDType) -> torch.Tensor:
    """A quantized parameter's values, unpacked (int8/uint8 for ≤4 bits)."""
    if qd.packed:
        return unpack_int4(q.data, signed=qd.signed)
    return q.data


def _weight_tensor(name: str, q: Value, qd: QDType, onnx_type: ir.DataType, transpose: bool) -> ir.TensorProtocol:
    """The ONNX initializer of a quantized weight (optionally transposed), without a float detour.

    ONNX packs INT4/UINT4 two per byte in flat order, low nibble first: for the IR's ``[N, K]`` (packed
    along K, K even) those are the IR's bytes as they are; for the transpose ``[K, N]`` the pairs run along
    N, i.e. rows 2j and 2j+1 of the codes.
    """
    if not qd.packed:
        data = q.data.t() if transpose else q.data
        return _q_tensor(name, data, onnx_type)
    n, half_k = q.data.shape[-2], q.data.shape[-1]
    if not transpose:
        return ir.PackedTensor(q.data.contiguous().reshape(-1).numpy(force=True), onnx_type,
                               shape=[*q.data.shape[:-1], 2 * half_k], name=name)
    if n % 2:  # pairs of an odd-width [K, N] straddle rows: pack the flat codes instead
        return _q_tensor(name, _weight_values(q, qd).t(), onnx_type)
    codes = _nibbles(q.data)
    packed_t = (codes[0::2] | (codes[1::2] << 4)).t().contiguous()  # [K, N/2]
    return ir.PackedTensor(packed_t.reshape(-1).numpy(force=True), onnx_type, shape=[2 * half_k, n], name=name)


def _is_zero_by_construction(zp: Value) -> bool:
    """A zero point that a dynamic_qparams computes as zeros (symmetric or fp8): omit it in ONNX."""
    p = zp.producer
    if p is None or p.op != "dynamic_qparams" or p.outputs[1] is not zp:
        return False
    return bool(p.kwargs.get("symmetric", True)) or get_qdtype(p.kwargs["qdtype"]).is_float


def _zero_point(ctx: LoweringContext, zp: Any, qd: QDType, kind: str, transpose: bool = False) -> ir.Value | None:
    if zp is None:
        return None
    if not isinstance(zp, Value):
        raise NotLowerable(f"zero point {zp!r} is not a tensor")
    onnx_type = ONNX_QTYPE[qd.name]
    if zp.is_param:
        data = zp.data
        if qd.is_float:
            if torch.any(data.float() != 0):
                raise NotLowerable("fp8 zero points must be zero")
            return None
        if kind == "tensor":
            data = data.reshape(())
        if transpose:
            data = data.t()
        return ctx.derived(("zp", id(zp), kind, transpose),
                           lambda: ctx.initializer(zp.name, _q_tensor(zp.name, data, onnx_type)))
    if _is_zero_by_construction(zp):
        return None
    v = ctx.cast(ctx.v(zp), ctx.dtype(zp), qd.container)
    if kind == "tensor" and zp.tensor_type.rank != 0:
        v = ctx.op("Reshape", [v, ctx.ints([])])
    if onnx_type in (ir.DataType.INT4, ir.DataType.UINT4):
        v = ctx.op("Cast", [v], {"to": onnx_type})
    return v


# ---- quantize / dequantize ------------------------------------------------------------------------

@lowering("quantize")
def _quantize(ctx: LoweringContext, node: Node) -> ir.Value:
    x, scale = node.args[0], node.args[1]
    zp = node.arg(2, "zero_point")
    qd = _qdtype(node)
    onnx_type = ONNX_QTYPE[qd.name]
    kind = _granularity(node, x, scale)
    rank = ctx.rank(x)
    out = node.outputs[0]
    if qd.packed:
        for user in ctx.users(out):
            if user.op != "dequantize" or user.args[0] is not out:
                raise NotLowerable(f"the packed {qd.name} output is read by {user.op} (%{user.name}); "
                                   "only a dequantize can read a packed quantized tensor in ONNX")
    s = _scale(ctx, scale, kind)
    xv = ctx.tensor(x, torch.float32)  # the reference divides in float32
    if qd.name in ("int3", "int2"):
        spread = kind == "block" and (not isinstance(x.tensor_type.shape[_axis(node, rank)], int)
                                      or x.tensor_type.shape[_axis(node, rank)] != node.kwargs["block_size"])
        # no ONNX type this narrow: clamp x to the codes' range first, x / s in [qmin - zp, qmax - zp] (with a zero
        # point the range moves: clamping at s·qmin..s·qmax cut asymmetric int3/int2 activations, 30-70% error)
        lo_code, hi_code = ctx.const(qd.qmin, torch.float32), ctx.const(qd.qmax, torch.float32)
        if zp is not None and not _is_zero_by_construction(zp):
            z = ctx.tensor(zp, torch.float32)
            if kind == "tensor" and zp.tensor_type.rank != 0:
                z = ctx.op("Reshape", [z, ctx.ints([])])
            lo_code, hi_code = ctx.op("Sub", [lo_code, z]), ctx.op("Sub", [hi_code, z])
        hi_x, lo_x = ctx.op("Mul", [s, hi_code]), ctx.op("Mul", [s, lo_code])
        if kind == "axis":
            shape = ctx.ints([-1] + [1] * (rank - 1 - _axis(node, rank)))
            hi_x, lo_x = ctx.op("Reshape", [hi_x, shape]), ctx.op("Reshape", [lo_x, shape])
        elif spread:
            # blocks shorter than the axis (KIVI's int2 keys and values): each block's bound reaches its elements
            # through DequantizeLinear's own block broadcast, codes of 1 times the bound's magnitude (exact)
            ones = ctx.op("ConstantOfShape", [ctx.op("Shape", [xv])], {"value": ir.tensor(np.ones(1, np.int8))})
            block = _qdq_attrs(node, kind, rank)
            hi_x = ctx.op("DequantizeLinear", [ones, hi_x], block)
            lo_x = ctx.op("Neg", [ctx.op("DequantizeLinear", [ones, ctx.op("Neg", [lo_x])], block)])
        xv = ctx.op("Max", [ctx.op("Min", [xv, hi_x]), lo_x])
    zpv = _zero_point(ctx, zp, qd, kind)
    attrs = _qdq_attrs(node, kind, rank)
    if zpv is None and scale.is_param:
        # a zero point of zeros names the type in the form every ONNX consumer (TensorRT's parser too) reads
        zpv = ctx.derived(("zp0", id(scale), kind), lambda: ctx.initializer(
            scale.name + ".zero_point", _q_tensor(scale.name + ".zero_point", torch.zeros(
                scale.data.reshape(()).shape if kind == "tensor" else scale.data.shape, dtype=qd.container),
                onnx_type)))
    elif zpv is None:
        attrs["output_dtype"] = onnx_type  # computed scales: the zero point would need computing too
    q = ctx.op("QuantizeLinear", [xv, s] + ([zpv] if zpv is not None else []), attrs)
    q.dtype = onnx_type
    if isinstance(x.type, TensorType):
        q.shape = ir.Shape([d if isinstance(d, int) else ir.SymbolicDim(d) for d in x.type.shape])
    return q


def _rows_of_tiles(node: Node, scale: Value, n: int) -> tuple[Node, torch.Tensor]:
    """A weight's 2-D tile scales (``block_size=[rows, cols]``, fp8-block128) as ONNX's 1-D blocking reads them:
    each tile row's scales repeated over its ``rows`` output channels, ``[N, ceil(K/cols)]`` blocked along K
    (the same numbers: every element keeps its tile's scale), and a stand-in node with that layout's kwargs."""
    axis, block = node.kwargs.get("axis"), node.kwargs["block_size"]
    if list(axis or []) not in ([0, 1], [-2, -1]) or len(block) != 2:
        raise NotLowerable(f"weight scale tiles axis={axis}, block_size={block} (ONNX blocks one axis; lowbit "
                           "expands [N, K] tiles along N)")
    if node.arg(2, "zero_point") is not None:
        raise NotLowerable("tiled weight scales with a zero point")
    rows, cols = int(block[0]), int(block[1])
    stand_in = Node(node.op, node.args, {**node.kwargs, "axis": 1, "block_size": cols}, module=node.module)
    return stand_in, scale.data.float().repeat_interleave(rows, 0)[:n]


def _dequantize_param(ctx: LoweringContext, node: Node, *, transpose: bool) -> ir.Value:
    """DequantizeLinear of a quantized parameter, optionally on its transpose (``[N, K]`` → ``[K, N]``). 2-D
    tiles are expanded to blocks along K (``_rows_of_tiles``)."""
    q, scale = node.args[0], node.args[1]
    zp = node.arg(2, "zero_point")
    qd = _qdtype(node)
    onnx_type = ONNX_QTYPE[qd.name]
    shape = list(_logical_shape(q, qd))
    s_data = scale.data.float()
    if isinstance(node.kwargs.get("block_size"), (list, tuple)):
        node, s_data = _rows_of_tiles(node, scale, shape[0])
    kind = _granularity(node, q, scale)
    attrs: dict[str, Any] = {}
    if transpose:
        if len(shape) != 2:
            raise NotLowerable(f"a transposed dequantize needs a 2-d weight, got {len(shape)}-d")
        if kind != "tensor":
            attrs["axis"] = 1 - _axis(node, 2)
            if kind == "block":
                attrs["block_size"] = int(node.kwargs["block_size"])
        s_data = s_data.reshape(()) if kind == "tensor" else (s_data.t() if kind == "block" else s_data)
        s = ctx.const_tensor(scale.name + (".T" if kind == "block" else ""), s_data.contiguous())
        zpv = _zero_point(ctx, zp, qd, kind, transpose=(kind == "block"))
        shape = shape[::-1]
    elif s_data.shape != scale.data.shape:  # expanded tiles: a scale of its own
        attrs = _qdq_attrs(node, kind, len(shape))
        s = ctx.const_tensor(scale.name + ".rows", s_data.contiguous())
        zpv = None
    else:
        attrs = _qdq_attrs(node, kind, len(shape))
        s = _scale(ctx, scale, kind)
        zpv = _zero_point(ctx, zp, qd, kind)
    name = q.name + (".T" if transpose else "")
    lazy = ir.LazyTensor(lambda: _weight_tensor(name, q, qd, onnx_type, transpose), dtype=onnx_type,
                         shape=ir.Shape(shape), name=name)
    qv = ctx.initializer(name, lazy)
    return ctx.op("DequantizeLinear", [qv, s] + ([zpv] if zpv is not None else []), attrs)


def _params(node: Node) -> bool:
    zp = node.arg(2, "zero_point")
    return all(isinstance(a, Value) and a.is_param for a in (node.args[0], node.args[1])) and (
        zp is None or (isinstance(zp, Value) and zp.is_param))


@lowering("dequantize")
def _dequantize(ctx: LoweringContext, node: Node) -> ir.Value:
    q, scale = node.args[0], node.args[1]
    zp = node.arg(2, "zero_point")
    qd = _qdtype(node)
    out_dtype = node.kwargs.get("out_dtype", torch.float32)
    if _params(node):
        y = _dequantize_param(ctx, node, transpose=False)
    else:
        if q.is_param:
            raise NotLowerable("a quantized parameter with computed scales")
        kind = _granularity(node, q, scale)
        rank = ctx.rank(q) if not qd.packed else len(_logical_shape(q, qd))
        s = _scale(ctx, scale, kind)
        zpv = _zero_point(ctx, zp, qd, kind)
        attrs = _qdq_attrs(node, kind, rank)
        if zpv is not None and kind != "tensor" and qd.name in ("int8", "uint8") and not zp.is_param:
            y = _dequantize_with_computed_zero_points(ctx, ctx.v(q), s, zpv, attrs)
        else:
            y = ctx.op("DequantizeLinear", [ctx.v(q), s] + ([zpv] if zpv is not None else []), attrs)
    return ctx.cast(y, torch.float32, out_dtype)


def _dequantize_with_computed_zero_points(ctx: LoweringContext, q: ir.Value, s: ir.Value, zp: ir.Value,
                                          attrs: dict[str, Any]) -> ir.Value:
    """``(q - zp) · s`` for 8-bit codes with a zero point per token or block computed in the graph (asymmetric
    dynamic activations): ONNX Runtime's QDQ fusion turned ``DequantizeLinear -> MatMul`` of such uint8 codes into
    ``MatMulIntegerToFloat``, whose kernel takes one zero point only, and every run failed ("input a zero point must
    be a scalar or 1D tensor of size 1"). The scale and zero point reach each element through DequantizeLinear's own
    axis/block broadcast of codes of 1 (``1 · v`` is exact), so the result is DequantizeLinear's to the bit."""
    ones = ctx.op("ConstantOfShape", [ctx.op("Shape", [q])], {"value": ir.tensor(np.ones(1, np.int8))})
    s_full = ctx.op("DequantizeLinear", [ones, s], attrs)
    zp_full = ctx.op("DequantizeLinear", [ones, ctx.op("Cast", [zp], {"to": ir.DataType.FLOAT})], attrs)
    codes = ctx.op("Cast", [q], {"to": ir.DataType.FLOAT})
    return ctx.op("Mul", [ctx.op("Sub", [codes, zp_full]), s_full])


def _logical_shape(q: Value, qd: QDType) -> tuple[Any, ...]:
    shape = q.tensor_type.shape
    if not qd.packed:
        return shape
    last = shape[-1]
    return shape[:-1] + ((last * 2) if isinstance(last, int) else f"2*{last}",)


def _transposed_dequantize(ctx: LoweringContext, node: Node) -> ir.Value | None:
    if not _params(node) or not _only_linear_weight_reads(ctx, node.outputs[0]):
        return None
    y = _dequantize_param(ctx, node, transpose=True)
    return ctx.cast(y, torch.float32, node.kwargs.get("out_dtype", torch.float32))


TRANSPOSED_WEIGHT["dequantize"] = _transposed_dequantize


# ---- qlinear: MatMulNBits, integer GEMM, or its QDQ reference ------------------------------------------
#
# Which linears are quantized, and in which form, is decided in the IR (``fuse-qlinear``, lowbit.ir.fusion):
# this lowering only maps a ``qlinear`` to the best ONNX kernel its options allow. ``to_onnx`` fuses a graph
# first when those options name a fused kernel (``weight_format="matmulnbits"``, ``integer_matmul``); the
# portable QDQ form needs no fusion, and a qlinear there lowers as its reference subgraph.

QLinearFormFn = Callable[[LoweringContext, Node, "_QLinearParts"], "ir.Value | None"]
QLINEAR_FORMS: list[QLinearFormFn] = []
"""Fused lowerings of a qlinear (MatMulNBits, integer GEMM), tried in order; None declines (the QDQ reference
is the fallback). Each returns the product without the bias."""


class _QLinearParts:
    """A qlinear's reference subgraph (``lowbit.ir.fusion.expand_qlinear``) as nodes a lowering can read: the
    weight ``dequantize`` and, if the input is quantized, its ``dynamic_qparams`` (or None: stored scales),
    ``quantize`` and ``dequantize``. These nodes are not in the graph; their values are bound in ``ctx.env`` as
    they are lowered, once per input and activation scheme (q/k/v share one chain, as in the unfused graph)."""

    def __init__(self, node: Node) -> None:
        from lowbit.ir.fusion import expand_qlinear
        from lowbit.ir.graph import Graph

        scratch = Graph(f"{node.name}.reference")  # fresh names only; never lowered as a graph
        nodes = expand_qlinear(scratch, node)
        self.node = node
        self.wdq = nodes[0]
        self.qparams = next((n for n in nodes if n.op == "dynamic_qparams"), None)
        acts = [n for n in nodes[1:-1] if n.op in ("quantize", "dequantize")]
        self.aq, self.adq = (acts[0], acts[1]) if acts else (None, None)
        kw = node.kwargs
        self.act_key = (id(node.args[0]), kw.get("a_qdtype"), kw.get("a_granularity"), kw.get("a_symmetric"),
                        kw.get("a_block_size"), id(node.arg(5, "a_scale")), id(node.arg(6, "a_zero_point")))

    def lower(self, ctx: LoweringContext, n: Node) -> list[ir.Value]:
        """Lower one reference node with the op's own lowering and bind its outputs (named after the qlinear)."""
        from lowbit.backends.onnx.registry import LOWERINGS

        outer, ctx.current = ctx.current, self.node
        try:
            result = LOWERINGS[n.op](ctx, n)
        finally:
            ctx.current = outer
        outs = [result] if isinstance(result, ir.Value) else list(result)
        for v, irv in zip(outs, n.outputs):
            ctx.env[id(irv)] = v
            if v.type is None and isinstance(irv.type, TensorType):
                v.dtype = to_onnx_dtype(irv.type.dtype)
        return outs

    def act_scale(self, ctx: LoweringContext) -> Value:
        """The activation scale value (a stored param, or the reference's dynamic_qparams output, lowered once
        per input and scheme and bound for this qlinear's reference nodes)."""
        assert self.aq is not None
        if self.qparams is not None:
            qp = self.qparams
            scale = ctx.derived(("qlinear-qparams",) + self.act_key, lambda: self.lower(ctx, qp)[0])
            zp = ctx.derived(("qlinear-qparams-zp",) + self.act_key, lambda: ctx.env[id(qp.outputs[1])])
            ctx.env[id(qp.outputs[0])], ctx.env[id(qp.outputs[1])] = scale, zp
        return self.aq.args[1]

    def input(self, ctx: LoweringContext) -> ir.Value:
        """The product's input: ``x``, or its quantize → dequantize (once per input and scheme)."""
        if self.adq is None:
            return ctx.v(self.node.args[0])

        def chain() -> ir.Value:
            self.act_scale(ctx)
            self.lower(ctx, self.aq)
            return self.lower(ctx, self.adq)[0]

        return ctx.derived(("qlinear-act",) + self.act_key, chain)


def _qdq_qlinear(ctx: LoweringContext, node: Node, parts: _QLinearParts) -> ir.Value:
    """The reference: DequantizeLinear on the transposed quantized weight (``[K, N]``), the input's Q/DQ, MatMul."""
    wdq = parts.wdq
    if not _params(wdq):
        raise NotLowerable("a qlinear whose weight, scale or zero point is computed, not stored")
    out_dtype = wdq.kwargs.get("out_dtype", torch.float32)

    def weight() -> ir.Value:
        outer, ctx.current = ctx.current, node
        try:
            return ctx.cast(_dequantize_param(ctx, wdq, transpose=True), torch.float32, out_dtype)
        finally:
            ctx.current = outer

    w_t = ctx.derived(("qlinear-wT", id(wdq.args[0]), id(wdq.args[1]), id(wdq.arg(2, "zero_point")),
                       wdq.kwargs.get("qdtype"), repr(wdq.kwargs.get("axis")), repr(wdq.kwargs.get("block_size")),
                       out_dtype),  # repr: tiles' axis and block_size are lists
                      weight)
    return ctx.op("MatMul", [parts.input(ctx), w_t])


@lowering("qlinear")
def _qlinear(ctx: LoweringContext, node: Node) -> ir.Value:
    if ctx.rank(node.args[0]) < 2:
        raise NotLowerable("a qlinear input of rank < 2")
    parts = _QLinearParts(node)
    out = None
    for form in QLINEAR_FORMS:
        out = form(ctx, node, parts)
        if out is not None:
            break
    if out is None:
        out = _qdq_qlinear(ctx, node, parts)
    bias = node.arg(4, "bias")
    if bias is not None:
        out = ctx.op("Add", [out, ctx.v(bias)])
    return out


# ---- MatMulNBits ----------------------------------------------------------------------------------

def _matmulnbits_block(k: int, kind: str, block_size: int | None) -> int | None:
    """MatMulNBits' block size for this weight: the IR block, or for per-channel scales a power-of-two
    block dividing K (every block of a row then carries the row's scale: the same numbers)."""
    if kind == "block":
        b = int(block_size)  # type: ignore[arg-type]
        return b if b >= 16 and b & (b - 1) == 0 else None
    if kind == "axis":
        b = 16
        while k % (b * 2) == 0 and b * 2 <= 256:
            b *= 2
        return b if k % b == 0 else None
    return None


def _pack_nibbles(u: torch.Tensor) -> torch.Tensor:
    """uint8 values in [0, 15], last axis even → bytes, low nibble first."""
    return (u[..., 0::2] | (u[..., 1::2] << 4)).to(torch.uint8)


MATMULNBITS_8BIT_MIN_ACCURACY = 4
"""8-bit MatMulNBits only at this accuracy level (int8 activations): ORT 1.32's CPU kernel for 8-bit weights with
float activations (level 0) took 74 ms for SmolLM2's 49152 x 576 head against 2.2 ms for the float MatMul, so at
lower levels an int8 weight keeps the QDQ form."""


def _matmulnbits_qlinear(ctx: LoweringContext, node: Node, parts: _QLinearParts) -> ir.Value | None:
    """A weight-only 4-bit (int4/uint4 and narrower, stored as nibbles) or 8-bit qlinear as
    ``com.microsoft::MatMulNBits`` (ORT's n-bit GEMM): unsigned codes in ``[N, blocks, block * bits / 8]`` bytes,
    one float scale and one unsigned zero point per block (``q + 2^(bits-1)`` for signed codes)."""
    dq = parts.wdq
    if ctx.options.weight_format != "matmulnbits" or parts.adq is not None or not _params(dq):
        return None
    qd = _qdtype(dq)
    if qd.packed:
        bits = 4
    elif qd.name in ("int8", "uint8") and ctx.options.accuracy_level >= MATMULNBITS_8BIT_MIN_ACCURACY:
        bits = 8
    else:
        return None
    if ctx.dtype(node.args[0]) != torch.float32 or dq.kwargs.get("out_dtype", torch.float32) != torch.float32:
        return None
    q, scale = dq.args[0], dq.args[1]
    zp = dq.arg(2, "zero_point")
    if q.data.dim() != 2:
        return None
    # two's complement codes kept as they are: code ^ 2^(bits-1) = q + 2^(bits-1)
    codes = _nibbles(q.data) if bits == 4 else q.data.view(torch.uint8)
    n, k = codes.shape
    kind = _granularity(dq, q, scale)
    if kind == "block" and _axis(dq, 2) != 1:
        return None
    if kind == "axis" and _axis(dq, 2) != 0:
        return None
    block = _matmulnbits_block(k, kind, dq.kwargs.get("block_size"))
    if block is None:
        return None
    n_blocks = -(-k // block)
    s = scale.data.float()
    s = s.reshape(n, 1).expand(n, n_blocks) if kind == "axis" else s.reshape(n, n_blocks)
    offset = 1 << (bits - 1) if qd.signed else 0  # MatMulNBits stores unsigned codes: q_u = q + 2^(bits-1)
    u = codes ^ offset
    padded = torch.zeros(n, n_blocks * block, dtype=torch.uint8)
    padded[:, :k] = u
    blob = (_pack_nibbles(padded) if bits == 4 else padded).reshape(n, n_blocks, block * bits // 8)
    inputs = [ctx.v(node.args[0]), ctx.const_tensor(q.name + ".nbits", blob),
              ctx.const_tensor(scale.name + ".nbits", s.contiguous().reshape(-1))]
    zp_u: torch.Tensor | None = None
    if zp is not None:
        z = zp.data.to(torch.int16)
        z = z.reshape(n, 1).expand(n, n_blocks) if kind == "axis" else z.reshape(n, n_blocks)
        zp_u = (z + offset).to(torch.uint8)
    elif not qd.signed:
        zp_u = torch.zeros(n, n_blocks, dtype=torch.uint8)  # MatMulNBits' default zero point is 2^(bits-1), ours 0
    if zp_u is not None:
        if bits == 4:
            if n_blocks % 2:
                zp_u = torch.cat([zp_u, torch.zeros(n, 1, dtype=torch.uint8)], dim=1)
            zp_u = _pack_nibbles(zp_u)
        inputs.append(ctx.const_tensor((zp.name if zp is not None else q.name + ".zp") + ".nbits",
                                       zp_u.contiguous().reshape(-1)))
    attrs = {"K": k, "N": n, "bits": bits, "block_size": block}
    if ctx.options.accuracy_level:
        attrs["accuracy_level"] = ctx.options.accuracy_level
    return ctx.op("MatMulNBits", inputs, attrs, domain="com.microsoft")


QLINEAR_FORMS.append(_matmulnbits_qlinear)


# ---- integer GEMM ---------------------------------------------------------------------------------

_U8_OFFSET = 128


def _zero_free(zp: Any) -> bool:
    """No zero point, a dynamic one that is zeros by construction, or a parameter of zeros."""
    if zp is None:
        return True
    if not isinstance(zp, Value):
        return False
    if zp.is_param:
        return bool(torch.all(zp.data == 0))
    return _is_zero_by_construction(zp)


def _integer_qlinear(ctx: LoweringContext, node: Node, parts: _QLinearParts) -> ir.Value | None:
    """An int8 qlinear with int8 (or per-tensor asymmetric uint8) activations as an integer GEMM + the scales
    (see ``LoweringOptions.integer_matmul``)."""
    if not ctx.options.integer_matmul or parts.aq is None:
        return None
    qx, dqx, dqw = parts.aq, parts.adq, parts.wdq
    x0 = node.args[0]
    if not _params(dqw) or ctx.dtype(x0) != torch.float32 or _qdtype(dqw).name != "int8":
        return None
    if dqw.kwargs.get("out_dtype", torch.float32) != torch.float32:
        return None
    if _qdtype(qx).name == "uint8":
        return _dynamic_u8_qlinear(ctx, node, parts)
    if _qdtype(qx).name != "int8":
        return None
    zx = qx.arg(2, "zero_point")
    zw = dqw.arg(2, "zero_point")
    if not (_zero_free(zx) and _zero_free(zw)):
        return None
    sx = qx.args[1]
    kind_x = _granularity(qx, x0, sx)
    k = x0.tensor_type.shape[-1]
    if kind_x == "axis" or (kind_x == "block" and (_axis(qx, ctx.rank(x0)) != ctx.rank(x0) - 1
                                                   or qx.kwargs.get("block_size") != k)):
        return None  # per-channel or grouped activation scales do not factor out of the sum over K
    kind_w = _granularity(dqw, dqw.args[0], dqw.args[1])
    if kind_w == "block" or (kind_w == "axis" and _axis(dqw, 2) != 0):
        return None
    parts.act_scale(ctx)

    def codes() -> ir.Value:
        # QuantizeLinear to uint8 with zero point 128 gives exactly the int8 codes + 128: ORT's fast GEMM is u8·s8
        s = _scale(ctx, sx, kind_x)
        zp = ctx.const(np.uint8(_U8_OFFSET), ir.DataType.UINT8)
        if kind_x == "block":
            zp = ctx.op("Expand", [zp, ctx.op("Shape", [s])])
        return ctx.op("QuantizeLinear", [ctx.tensor(x0, torch.float32), s, zp], _qdq_attrs(qx, kind_x, ctx.rank(x0)))

    q_u8 = ctx.derived(("u8-codes",) + parts.act_key, codes)
    # ORT's MatMulIntegerToFloat applies the weight scales (per column) in the GEMM's epilogue and a per-row
    # activation scale ([.., S, 1], per token) to its output inside the same kernel — (acc · s_w) · s_x, the
    # rounding order of the reference's DQ·DQ product; a per-tensor activation scale joins the epilogue
    u8_zero = ctx.const(np.uint8(_U8_OFFSET), ir.DataType.UINT8)
    return ctx.op("MatMulIntegerToFloat", [q_u8, *_int8_weight_t(ctx, dqw.args[0], _scale(ctx, dqx.args[1], kind_x),
                                                                 _scale(ctx, dqw.args[1], kind_w), u8_zero)],
                  domain="com.microsoft")


def _int8_weight_t(ctx: LoweringContext, wq: Value, a_scale: ir.Value, b_scale: ir.Value,
                   a_zero_point: ir.Value) -> list[ir.Value]:
    """MatMulIntegerToFloat's inputs from B on: the transposed ``[K, N]`` initializer of an int8 weight (one per
    weight, shared by its readers), the scales, A's zero point, and with uint8 weights (``int8_weights``) B's zero
    point 128 — the codes + 128, the same products."""
    n_k = list(_logical_shape(wq, get_qdtype("int8")))
    u8 = ctx.options.u8_weights
    name, dtype = (wq.name + ".T.u8", ir.DataType.UINT8) if u8 else (wq.name + ".T", ir.DataType.INT8)

    def tensor() -> ir.TensorProtocol:
        if u8:
            return _q_tensor(name, (wq.data.t().to(torch.int16) + _U8_OFFSET).to(torch.uint8), dtype)
        return _weight_tensor(name, wq, get_qdtype("int8"), dtype, True)

    b = ctx.derived((name, id(wq)), lambda: ctx.initializer(name, ir.LazyTensor(tensor, dtype=dtype,
                                                                                shape=ir.Shape(n_k[::-1]), name=name)))
    b_zero_point = [ctx.const(np.uint8(_U8_OFFSET), ir.DataType.UINT8)] if u8 else []
    return [b, a_scale, b_scale, a_zero_point, *b_zero_point]


def _dynamic_u8_qlinear(ctx: LoweringContext, node: Node, parts: _QLinearParts) -> ir.Value | None:
    """A qlinear with per-tensor dynamic asymmetric uint8 activations (``a_qdtype="uint8"``,
    ``a_granularity="per_tensor"``, ``a_symmetric=False``) and int8 weights: ONNX's ``DynamicQuantizeLinear(x)``
    + ``com.microsoft::MatMulIntegerToFloat`` with its scale and zero point.

    DynamicQuantizeLinear is exactly that quantizer: scale = (max(0, max x) - min(0, min x)) / 255,
    zp = saturate(round(-min(0, min x) / scale)), y = saturate(round(x / scale) + zp), both rounds half to even
    — ``lowbit.ir.quant.qparams_from_range`` for uint8 asymmetric (``qmin - lo / scale`` with ``qmin = 0``),
    except for an all-zero tensor, where lowbit's scale is ``SCALE_EPS`` (every code is zp = 0 either way).
    It is ONNX Runtime's ``quantize_dynamic`` scheme: ORT fuses a DynamicQuantizeLinear read by one GEMM
    into ``DynamicQuantizeMatMul`` and shares one read by several (q/k/v) among MatMulIntegerToFloats.
    """
    kw = node.kwargs
    x0 = node.args[0]
    if (parts.qparams is None or kw.get("a_granularity") != "per_tensor" or bool(kw.get("a_symmetric", True))
            or ctx.dtype(x0) != torch.float32):
        return None
    dqw = parts.wdq
    zw = dqw.arg(2, "zero_point")
    kind_w = _granularity(dqw, dqw.args[0], dqw.args[1])
    if not _zero_free(zw) or kind_w == "block" or (kind_w == "axis" and _axis(dqw, 2) != 0):
        return None
    y = ctx.derived(("dql",) + parts.act_key,
                    lambda: ctx.op("DynamicQuantizeLinear", [ctx.v(x0)], num_outputs=3)[0])
    _, s, zp = y.producer().outputs
    return ctx.op("MatMulIntegerToFloat", [y, *_int8_weight_t(ctx, dqw.args[0], s, _scale(ctx, dqw.args[1], kind_w),
                                                              zp)], domain="com.microsoft")


QLINEAR_FORMS.append(_integer_qlinear)


# ---- dynamic qparams -------------------------------------------------------------------------------

def _blocked_minmax(ctx: LoweringContext, x: ir.Value, rank: int, axis: int, block: int,
                    length: Any) -> tuple[ir.Value, ir.Value]:
    """Min and max over blocks of ``block`` along ``axis`` (ragged last block), shaped like the scale."""
    perm = None
    if axis != rank - 1:
        perm = [d for d in range(rank) if d != axis] + [axis]
        x = ctx.op("Transpose", [x], {"perm": perm})
    if not (isinstance(length, int) and length % block == 0):
        # edge-pad the ragged tail: repeating the last element changes no min or max
        n = ctx.op("Shape", [x], {"start": -1})
        b = ctx.ints([block])
        pad = ctx.op("Mod", [ctx.op("Sub", [b, ctx.op("Mod", [n, b])]), b])
        pads = ctx.op("Concat", [ctx.ints([0] * (2 * rank - 1)), pad], {"axis": 0})
        x = ctx.op("Pad", [x, pads], {"mode": "edge"})
    lead = ctx.op("Shape", [x], {"end": -1})
    grouped = ctx.op("Reshape", [x, ctx.op("Concat", [lead, ctx.ints([-1, block])], {"axis": 0})])
    lo = ctx.op("ReduceMin", [grouped, ctx.ints([-1])], {"keepdims": 0})
    hi = ctx.op("ReduceMax", [grouped, ctx.ints([-1])], {"keepdims": 0})
    if perm is not None:
        inverse = [perm.index(d) for d in range(rank)]
        lo, hi = (ctx.op("Transpose", [t], {"perm": inverse}) for t in (lo, hi))
    return lo, hi


@lowering("dynamic_qparams")
def _dynamic_qparams(ctx: LoweringContext, node: Node) -> list[ir.Value]:
    x = node.args[0]
    clip = node.kwargs.get("clip_ratio", 1.0)
    qd = _qdtype(node)
    symmetric = bool(node.kwargs.get("symmetric", True))
    shape = x.tensor_type.shape
    rank = len(shape)
    granularity = node.kwargs.get("granularity", "per_token")
    block_size = node.kwargs.get("block_size")
    layout = dynamic_layout([d if isinstance(d, int) else -1 for d in shape], granularity,
                            node.kwargs.get("axis", -1), block_size)
    xv = ctx.tensor(x, torch.float32)
    absmax: ir.Value | None = None
    if layout.axis is None:
        lo = ctx.op("ReduceMin", [xv], {"keepdims": 0})
        hi = ctx.op("ReduceMax", [xv], {"keepdims": 0})
    elif layout.block_size is None or (granularity == "per_token" and layout.block_size in (-1, shape[-1])):
        axis = layout.axis % rank
        if layout.block_size is None:  # per-channel: reduce every other dim
            axes = [d for d in range(rank) if d != axis]
            lo = ctx.op("ReduceMin", [xv, ctx.ints(axes)], {"keepdims": 0}) if axes else xv
            hi = ctx.op("ReduceMax", [xv, ctx.ints(axes)], {"keepdims": 0}) if axes else xv
        elif symmetric or qd.is_float:  # per-token, symmetric: max|x| is max(|min|, |max|), in one reduction
            absmax = ctx.op("ReduceMax", [ctx.op("Abs", [xv]), ctx.ints([-1])], {"keepdims": 1})
        else:  # per-token over the whole row: one block along the last axis
            lo = ctx.op("ReduceMin", [xv, ctx.ints([-1])], {"keepdims": 1})
            hi = ctx.op("ReduceMax", [xv, ctx.ints([-1])], {"keepdims": 1})
    else:
        axis = layout.axis % rank
        lo, hi = _blocked_minmax(ctx, xv, rank, axis, int(layout.block_size), shape[axis])
    f32 = torch.float32
    if clip != 1.0:
        # the range shrunk to clip_ratio·[min, max] as the reference does (float32 products, so the same scales);
        # what lies beyond saturates in QuantizeLinear (or the int3/int2 clamp) as the reference's quantize clamps it
        r = ctx.const(float(clip), f32)
        if absmax is not None:
            absmax = ctx.op("Mul", [absmax, r])
        else:
            lo, hi = ctx.op("Mul", [lo, r]), ctx.op("Mul", [hi, r])
    eps = ctx.const(SCALE_EPS, f32)
    if symmetric or qd.is_float:
        if qd.is_float and not symmetric:
            raise NotLowerable(f"{qd.name} is symmetric only")
        amax = ctx.op("Max", [ctx.op("Abs", [lo]), ctx.op("Abs", [hi])]) if absmax is None else absmax
        scale = ctx.op("Max", [ctx.op("Div", [amax, ctx.const(qd.qmax, f32)]), eps])
        zp = ctx.op("ConstantOfShape", [ctx.op("Shape", [scale])],
                    {"value": ir.tensor(np.zeros(1, dtype=np.float32).astype(to_onnx_dtype(qd.container).numpy()))})
        return [scale, zp]
    zero = ctx.const(0.0, f32)
    lo = ctx.op("Min", [lo, zero])
    hi = ctx.op("Max", [hi, zero])
    scale = ctx.op("Max", [ctx.op("Div", [ctx.op("Sub", [hi, lo]), ctx.const(qd.qmax - qd.qmin, f32)]), eps])
    zp = ctx.op("Round", [ctx.op("Sub", [ctx.const(qd.qmin, f32), ctx.op("Div", [lo, scale])])])
    zp = ctx.op("Max", [ctx.op("Min", [zp, ctx.const(qd.qmax, f32)]), ctx.const(qd.qmin, f32)])
    return [scale, ctx.op("Cast", [zp], {"to": to_onnx_dtype(qd.container)})]
