"""Check an ONNX model against TensorRT's documented explicit-quantization rules, without TensorRT.

TensorRT builds an explicitly quantized engine from the QuantizeLinear/DequantizeLinear (Q/DQ) nodes of an
ONNX model and rejects, or silently runs in high precision, Q/DQ it cannot honour. This checker encodes
the rules of NVIDIA's documentation as a table (``RULES``), each row citing the section it comes from,
so an export can be validated on a machine with no GPU. Severity ``error``: the TensorRT build fails or
the engine cannot compute what the model says. ``warning``: it builds, but the Q/DQ will not fuse into
a low-precision kernel (no speed-up) — TensorRT's Q/DQ placement recommendations.

Documentation cited (TensorRT 10, docs.nvidia.com/deeplearning/tensorrt/latest/):
- [EQ] inference-library/quantized-types-explicit-quantization.html — "Explicit Quantization":
  "Quantized Weights", "ONNX Support", "Q/DQ Layer-Placement Recommendations".
- [WQT] inference-library/work-quantized-types.html — "Working with Quantized Types": supported types
  (INT8, INT4 weight-only, FP8E4M3, FP4E2M1), "Quantization Schemes" (per-tensor, per-channel, block).
- [QL] _static/operators/Quantize.html and Dequantize.html, and the IQuantizeLayer/IDequantizeLayer API
  reference: scale is a build-time constant with strictly positive values; zero point optional and all
  zeros; scale is a scalar (per-tensor), 1-D (per-channel) or of the input's rank (block, blocked along the
  last or second-to-last dimension; INT4 only).
- [QLA] the IQuantizeLayer / IDequantizeLayer class reference (api/c_api/classnvinfer1_1_1_i_dequantize_layer.html):
  "scale and zeroPt should have identical dimensions, and a rank that is lower or equal to 2".
- [QS] inference-library/quantized-types-schemes.html — "Quantization Schemes": "INT4 quantization requires
  per-block scales. The supported block sizes are {64, 128}."
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx
import onnx_ir as ir

from lowbit.ir.qscheme import QScheme, QuantConfig
from lowbit.ir.quant import get_qdtype

Severity = Literal["error", "warning"]

DOC_BASE = "https://docs.nvidia.com/deeplearning/tensorrt/latest/"
DOC_EQ = DOC_BASE + "inference-library/quantized-types-explicit-quantization.html"
DOC_WQT = DOC_BASE + "inference-library/work-quantized-types.html"
DOC_QL = DOC_BASE + "_static/operators/Quantize.html"
DOC_DQL = DOC_BASE + "_static/operators/Dequantize.html"
DOC_QS = DOC_BASE + "inference-library/quantized-types-schemes.html"
DOC_QLA = "https://docs.nvidia.com/deeplearning/tensorrt/api/c_api/classnvinfer1_1_1_i_dequantize_layer.html"

WEIGHTED_OPS = {"MatMul", "Gemm", "Conv", "ConvTranspose"}
TRT_QTYPES = {ir.DataType.INT8, ir.DataType.INT4, ir.DataType.FLOAT8E4M3FN, ir.DataType.FLOAT4E2M1}
UNSUPPORTED_QUANT_OPS = {"QLinearMatMul", "QLinearConv", "MatMulInteger", "ConvInteger", "DynamicQuantizeLinear",
                         "QGemm", "QLinearAdd", "QLinearMul"}
INT4_BLOCK_SIZES = (64, 128)


@dataclass(frozen=True)
class Violation:
    """One broken rule at one node: ``rule`` names the table row, ``doc`` the documentation section."""

    rule: str
    severity: Severity
    node: str
    message: str
    doc: str

    def __str__(self) -> str:
        return f"[{self.severity}] {self.rule} at {self.node}: {self.message} (see {self.doc})"


class QDQView:
    """The model facts the rules read: consumers, constants, Q/DQ types and attributes."""

    def __init__(self, model: ir.Model) -> None:
        self.model = model
        self.graph = model.graph
        self.nodes = list(ir.traversal.RecursiveGraphIterator(model.graph))
        self.opset = model.opset_imports.get("", 0)

    def consumers(self, v: ir.Value) -> list[ir.Node]:
        return [use.node for use in v.uses()]

    def const(self, v: ir.Value | None) -> np.ndarray | None:
        """The value of a build-time constant (initializer, Constant, or Identity/Cast/Reshape of one)."""
        while v is not None:
            if v.const_value is not None:
                return v.const_value.numpy()
            p = v.producer()
            if p is None:
                return None
            if p.op_type == "Constant":
                return _constant_value(p)
            if p.op_type in ("Identity", "Cast", "Reshape", "Squeeze", "Unsqueeze"):
                v = p.inputs[0]
                continue
            return None
        return None

    def is_const(self, v: ir.Value | None) -> bool:
        """Whether ``v`` is a build-time constant (without reading a weight's bytes)."""
        while v is not None:
            if v.const_value is not None:
                return True
            p = v.producer()
            if p is None:
                return False
            if p.op_type == "Constant":
                return True
            if p.op_type not in ("Identity", "Cast", "Reshape", "Squeeze", "Unsqueeze"):
                return False
            v = p.inputs[0]
        return False

    @staticmethod
    def qtype(node: ir.Node) -> ir.DataType | None:
        """The quantized type of a Q (its output) or DQ (its input)."""
        if node.op_type == "QuantizeLinear":
            if len(node.inputs) > 2 and node.inputs[2] is not None and node.inputs[2].dtype is not None:
                return node.inputs[2].dtype
            attr = node.attributes.get("output_dtype")
            if attr is not None and attr.as_int():
                return ir.DataType(attr.as_int())
            return node.outputs[0].dtype or ir.DataType.UINT8
        return node.inputs[0].dtype if node.inputs[0] is not None else None

    @staticmethod
    def axis(node: ir.Node, rank: int) -> int:
        attr = node.attributes.get("axis")
        a = attr.as_int() if attr is not None else 1
        return a % rank if rank else a

    @staticmethod
    def block_size(node: ir.Node) -> int:
        attr = node.attributes.get("block_size")
        return attr.as_int() if attr is not None else 0

    def dims(self, v: ir.Value | None) -> tuple[int | None, ...] | None:
        """``v``'s shape, None for each symbolic dim (None when the rank is unknown)."""
        if v is None:
            return None
        if v.const_value is not None:
            return tuple(v.const_value.shape)
        if v.shape is not None:
            return tuple(d if isinstance(d, int) else None for d in v.shape.dims)
        c = self.const(v)
        return tuple(c.shape) if c is not None else None

    def rank(self, v: ir.Value | None) -> int | None:
        if v is None:
            return None
        if v.shape is not None:
            return len(v.shape)
        if v.const_value is not None:
            return len(v.const_value.shape)
        c = self.const(v)
        return c.ndim if c is not None else None

    def qdq_nodes(self) -> Iterable[ir.Node]:
        return (n for n in self.nodes if n.op_type in ("QuantizeLinear", "DequantizeLinear"))

    def weight_dq(self, node: ir.Node) -> bool:
        """A DQ of a pre-quantized constant weight, or of a Q of a constant float weight."""
        if node.op_type != "DequantizeLinear":
            return False
        src = node.inputs[0]
        if self.is_const(src):
            return True
        p = src.producer() if src is not None else None
        return p is not None and p.op_type == "QuantizeLinear" and self.is_const(p.inputs[0])

    def where(self, node: ir.Node) -> str:
        module = node.metadata_props.get("lowbit.module")
        return f"{node.op_type} {node.name!r}" + (f" (module {module})" if module else "")


_CONSTANT_DTYPES = {"value_float": np.float32, "value_floats": np.float32, "value_int": np.int64,
                    "value_ints": np.int64}


def _constant_value(node: ir.Node) -> np.ndarray | None:
    """A ``Constant`` node's value, whichever attribute holds it: a scale written ``value_float=0.05`` (as
    hand-made and some exporters' graphs do) was taken for one computed at run time and refused."""
    if "value" in node.attributes:
        return node.attributes["value"].as_tensor().numpy()
    for key, dtype in _CONSTANT_DTYPES.items():
        if key in node.attributes:
            return np.asarray(node.attributes[key].value, dtype=dtype)
    return None  # sparse_value, value_string(s): never a Q/DQ scale or zero point


def _v(view: QDQView, node: ir.Node, rule: str, severity: Severity, message: str, doc: str) -> Violation:
    return Violation(rule, severity, view.where(node), message, doc)


# ---- the rules -----------------------------------------------------------------------------------

def _supported_types(view: QDQView) -> Iterable[Violation]:
    for n in view.qdq_nodes():
        t = view.qtype(n)
        if t is not None and t not in TRT_QTYPES:
            yield _v(view, n, "supported-qtype", "error",
                     f"quantized type {t.name} is not one TensorRT quantizes to (INT8, INT4, FP8E4M3FN, FP4E2M1); "
                     "unsigned and FP8E5M2 formats are rejected — use symmetric signed types",
                     DOC_WQT + " (Supported Data Types); " + DOC_QL + " (Data Types: T3)")


def _zero_points(view: QDQView) -> Iterable[Violation]:
    for n in view.qdq_nodes():
        zp = n.inputs[2] if len(n.inputs) > 2 else None
        if zp is None:
            continue
        values = view.const(zp)
        if values is None:
            yield _v(view, n, "zero-point-zero", "error", "the zero point is computed at run time; TensorRT "
                     "needs a build-time constant of zeros (symmetric quantization only)", DOC_DQL + " (zero_point)")
        elif np.any(values.astype(np.float32) != 0):
            yield _v(view, n, "zero-point-zero", "error",
                     "zero point has non-zero entries "
                     f"(e.g. {values.reshape(-1)[np.flatnonzero(values.reshape(-1))[0]]}): "
                     "TensorRT supports symmetric quantization only (zeroPt must contain only zeros)",
                     DOC_DQL + " (zero_point); " + DOC_WQT + " (Introduction: symmetric scheme)")


def _scale_rank(view: QDQView) -> Iterable[Violation]:
    for n in view.qdq_nodes():
        s_rank = view.rank(n.inputs[1])
        if s_rank is not None and s_rank > 2:
            yield _v(view, n, "scale-rank", "error",
                     f"the scale {list(view.dims(n.inputs[1]) or ())} has rank {s_rank}: TensorRT's Q/DQ scale (and "
                     "zero point) is at most rank 2 — quantize a 2-D weight, or reshape the input to 2-D first",
                     DOC_QLA + " (scale and zeroPt: rank lower or equal to 2)")


BLOCK_QTYPES = {ir.DataType.INT4, ir.DataType.FLOAT4E2M1}


def _block_types(view: QDQView) -> Iterable[Violation]:
    """A weight quantized in blocks (a ``block_size`` attribute) as INT8 or FP8: TensorRT's Q/DQ layers take a
    block scale for INT4 (and FP4) only, so an int8 or fp8 weight in groups (``quantize(w=fp8e4m3,group=64)``) passed
    every rule here and failed in the TensorRT build. Activations in blocks (per token) are activation-per-tensor's,
    types TensorRT lacks supported-qtype's."""
    for n in view.nodes:
        t = view.qtype(n) if view.weight_dq(n) else None
        if view.block_size(n) and t in TRT_QTYPES and t not in BLOCK_QTYPES:
            yield _v(view, n, "block-quantization-type", "error",
                     f"{t.name} quantized in blocks of {view.block_size(n)}: TensorRT's block quantization is for INT4 "
                     "(and FP4) only — quantize INT8/FP8 per tensor or per channel (no group) for TensorRT",
                     DOC_DQL + " (scale: block quantization supported for DataType::kINT4 only); " + DOC_QL)


def _zero_point_shape(view: QDQView) -> Iterable[Violation]:
    for n in view.qdq_nodes():
        zp = n.inputs[2] if len(n.inputs) > 2 else None
        if zp is None:
            continue
        s_dims, z_dims = view.dims(n.inputs[1]), view.dims(zp)
        if s_dims is None or z_dims is None:
            continue
        if len(s_dims) != len(z_dims) or any(a is not None and b is not None and a != b
                                             for a, b in zip(s_dims, z_dims)):
            shown = [["?" if d is None else d for d in dims] for dims in (z_dims, s_dims)]
            yield _v(view, n, "zero-point-shape", "error",
                     f"zero point of shape {shown[0]} and scale of shape {shown[1]}: TensorRT needs the zero point "
                     "to have the scale's dimensions (or drop it: TensorRT's zero point is all zeros)",
                     DOC_QLA + " (scale and zeroPt should have identical dimensions); " + DOC_DQL + " (zero_point)")


def _scales(view: QDQView) -> Iterable[Violation]:
    for n in view.qdq_nodes():
        scale = n.inputs[1]
        values = view.const(scale)
        if values is None:
            yield _v(view, n, "scale-constant-positive", "error",
                     "the scale is computed at run time (dynamic quantization); TensorRT's Q/DQ scale must be a "
                     "build-time constant — use static (calibrated) activation scales for TensorRT",
                     DOC_QL + " (scale: must be a build-time constant)")
            continue
        if not np.all(np.isfinite(values)) or np.any(values <= 0):
            yield _v(view, n, "scale-constant-positive", "error",
                     f"scale has non-positive or non-finite entries (min {np.nanmin(values):.3g}); TensorRT requires "
                     "strictly positive scale coefficients", DOC_DQL + " (IDequantizeLayer: scale > 0)")


def _scale_shapes(view: QDQView) -> Iterable[Violation]:
    for n in view.qdq_nodes():
        data_rank = view.rank(n.inputs[0])
        s_rank = view.rank(n.inputs[1])
        if data_rank is None or s_rank is None or s_rank == 0:
            continue
        yield from _scale_extents(view, n, data_rank, s_rank)
        if s_rank == 1:
            continue
        if s_rank != data_rank:
            yield _v(view, n, "scale-shape", "error",
                     f"a rank-{s_rank} scale for a rank-{data_rank} input: TensorRT takes a scalar (per-tensor), a 1-D "
                     "(per-channel) or a same-rank (block) scale", DOC_DQL + " (scale shape)")
            continue
        axis = view.axis(n, data_rank)
        if axis not in (data_rank - 1, data_rank - 2):
            yield _v(view, n, "scale-shape", "error",
                     f"block quantization along axis {axis} of a rank-{data_rank} tensor: TensorRT blocks only the "
                     "last or second-to-last dimension", DOC_DQL + " (block quantization)")


def _scale_extents(view: QDQView, n: ir.Node, data_rank: int, s_rank: int) -> Iterable[Violation]:
    """A per-channel scale as long as the quantized axis, a block scale the input's shape with the blocked axis
    divided (rounded up) by the block size: a per-channel scale of the weight's other dimension passed every rule
    and failed only in the TensorRT build (ONNX Runtime refuses it at session creation too)."""
    data, scale = view.dims(n.inputs[0]), view.dims(n.inputs[1])
    if data is None or scale is None or (s_rank == 1 and scale[0] == 1) or (s_rank != 1 and s_rank != data_rank):
        return
    axis = view.axis(n, data_rank)
    block = view.block_size(n)
    if s_rank == 1:
        want: tuple[int | None, ...] = (data[axis],)
    elif not block:
        yield _v(view, n, "scale-shape", "error",
                 f"a rank-{s_rank} scale {list(scale)} without a block_size attribute: a same-rank scale is block "
                 "quantization, which names its block size", DOC_DQL + " (block quantization)")
        return
    else:
        want = tuple(-(-d // block) if i == axis and d is not None else d for i, d in enumerate(data))
    if any(w is not None and s is not None and w != s for w, s in zip(want, scale)):
        shown = ["?" if d is None else d for d in data]
        what = f"axis {axis} of the input {shown}" if s_rank == 1 else \
            f"the input {shown} in blocks of {block} along axis {axis}"
        yield _v(view, n, "scale-shape", "error",
                 f"scale of shape {list(scale)} does not match {what}: it needs "
                 f"{['?' if w is None else w for w in want]}", DOC_DQL + " (scale shape)")


def _is_per_tensor(view: QDQView, scale: ir.Value) -> bool:
    """One scale for the whole tensor (an unknown-shape computed scale counts: other rules flag it)."""
    values = view.const(scale)
    if values is not None:
        return values.size == 1
    return view.rank(scale) in (0, None)


def _activations_per_tensor(view: QDQView) -> Iterable[Violation]:
    for n in view.nodes:
        if n.op_type != "QuantizeLinear" or view.is_const(n.inputs[0]):
            continue
        if not _is_per_tensor(view, n.inputs[1]):
            yield _v(view, n, "activation-per-tensor", "error",
                     "activation quantized per-channel/per-token/block-wise: TensorRT quantizes activations "
                     "per-tensor (one scalar scale) for INT8/FP8", DOC_WQT + " (Quantization Schemes: per-tensor for "
                     "activations, per-channel for weights)")


def _q_feeds_dq(view: QDQView) -> Iterable[Violation]:
    outputs = set(id(v) for v in view.graph.outputs)
    for n in view.nodes:
        if n.op_type != "QuantizeLinear":
            continue
        out = n.outputs[0]
        bad = [c.op_type for c in view.consumers(out) if c.op_type != "DequantizeLinear"]
        if bad or id(out) in outputs:
            what = ", ".join(sorted(set(bad))) or "a graph output"
            yield _v(view, n, "q-feeds-dq", "error",
                     f"the quantized tensor is read by {what}: in explicit quantization every QuantizeLinear is "
                     "followed by DequantizeLinear (Q/DQ pairs); TensorRT has no quantized kernels for other readers",
                     DOC_EQ + " (ONNX Support; TensorRT Processing of Q/DQ Networks)")


def _output_channel_axis(consumer: ir.Node, weight_rank: int) -> int | None:
    """The output-channel axis of the weight input of a weighted op."""
    if consumer.op_type == "MatMul":
        return weight_rank - 1
    if consumer.op_type == "Gemm":
        trans_b = consumer.attributes.get("transB")
        return 0 if trans_b is not None and trans_b.as_int() else 1
    if consumer.op_type == "Conv":
        return 0
    if consumer.op_type == "ConvTranspose":
        return 1
    return None


def _weight_placement(view: QDQView) -> Iterable[Violation]:
    for n in view.nodes:
        if not view.weight_dq(n):
            continue
        for c in view.consumers(n.outputs[0]):
            if c.op_type in WEIGHTED_OPS and len(c.inputs) > 1 and c.inputs[1] is n.outputs[0]:
                continue
            if c.op_type in WEIGHTED_OPS:
                yield _v(view, n, "weight-dq-placement", "warning",
                         f"the dequantized weight is the data input of {view.where(c)}, not its weight input",
                         DOC_EQ + " (Quantized Weights)")
            else:
                yield _v(view, n, "weight-dq-placement", "warning",
                         f"the dequantized weight is read by {view.where(c)}: TensorRT fuses a weight DQ only into the "
                         "GEMM/convolution it feeds directly; anything in between dequantizes the whole weight as a "
                         "separate layer", DOC_EQ + " (Quantized Weights: an IDequantizeLayer between the weights and "
                         "the linear operator)")


def _per_channel_axis(view: QDQView) -> Iterable[Violation]:
    for n in view.nodes:
        if not view.weight_dq(n):
            continue
        w_rank = view.rank(n.inputs[0])
        s_rank = view.rank(n.inputs[1])
        if w_rank is None or s_rank != 1 or _is_per_tensor(view, n.inputs[1]):
            continue
        axis = view.axis(n, w_rank)
        for c in view.consumers(n.outputs[0]):
            if c.op_type not in WEIGHTED_OPS or len(c.inputs) < 2 or c.inputs[1] is not n.outputs[0]:
                continue
            want = _output_channel_axis(c, w_rank)
            if want is not None and axis != want:
                yield _v(view, n, "per-channel-axis", "error",
                         f"per-channel weight scale along axis {axis}, but the output-channel axis of the weight of "
                         f"{view.where(c)} is {want}: TensorRT quantizes weights per output channel",
                         DOC_WQT + " (Quantization Schemes: per-channel along the output channel)")


def _int4_weight_only(view: QDQView) -> Iterable[Violation]:
    for n in view.qdq_nodes():
        if view.qtype(n) != ir.DataType.INT4:
            continue
        if n.op_type == "QuantizeLinear" and not view.is_const(n.inputs[0]):
            yield _v(view, n, "int4-weight-only", "error",
                     "INT4 quantization of an activation: TensorRT supports INT4 only as weight-only quantization",
                     DOC_WQT + " (INT4: weight-only quantization)")
            continue
        if n.op_type != "DequantizeLinear" or not view.weight_dq(n):
            continue
        w_rank = view.rank(n.inputs[0]) or 0
        axis = view.axis(n, w_rank)
        for c in view.consumers(n.outputs[0]):
            if c.op_type not in ("MatMul", "Gemm") or len(c.inputs) < 2 or c.inputs[1] is not n.outputs[0]:
                yield _v(view, n, "int4-weight-only", "error",
                         f"INT4 weight read by {view.where(c)}: INT4 weight-only quantization is for GEMM weights",
                         DOC_WQT + " (INT4 weight-only quantization (WoQ): GEMM layers)")
                continue
            out_axis = _output_channel_axis(c, w_rank)
            if out_axis is not None and axis == out_axis:
                yield _v(view, n, "int4-weight-only", "error",
                         f"INT4 blocks along axis {axis}, the output-channel axis of {view.where(c)}: blocks must run "
                         "along the input-channel (reduction) axis", DOC_WQT + " (Block Quantization)")
            other = c.inputs[0].producer() if c.inputs[0] is not None else None
            if other is not None and other.op_type == "DequantizeLinear":
                yield _v(view, n, "int4-weight-only", "warning",
                         f"INT4 weights with a quantized activation input to {view.where(c)}: TensorRT's INT4 path is "
                         "weight-only (activations and compute stay high precision)",
                         DOC_WQT + " (Weight-Only Quantization)")


def int4_group_fix(option: str, input_sizes: Iterable[int] = ()) -> str:
    """The fix of an INT4 block refusal: ``option`` (``group``, ``group_fallback``) at TensorRT's block sizes that
    divide the linears' input sizes, where they are known. Both sizes were named whatever the sizes, and a block that
    does not divide one is refused by the quantize pass (group=) or left to the fallback, which then refused it."""
    sizes = sorted(set(input_sizes))
    fits = [b for b in INT4_BLOCK_SIZES if all(k % b == 0 for k in sizes)]
    shown = ", ".join(map(str, sizes))
    if not fits:
        return (f"neither {' nor '.join(map(str, INT4_BLOCK_SIZES))} divides input size {shown}: keep these linears "
                "float (keep=) or run them on another backend")
    rest = [b for b in INT4_BLOCK_SIZES if b not in fits]
    why = f" ({' and '.join(map(str, rest))} {'does' if len(rest) == 1 else 'do'} not divide input size {shown})" \
        if rest else ""
    return " or ".join(f"{option}={b}" for b in fits) + why


def _int4_block_size(view: QDQView) -> Iterable[Violation]:
    """An INT4 weight per channel, per tensor or in blocks other than 64 or 128: NVIDIA's Quantization Schemes say
    "INT4 quantization requires per-block scales. The supported block sizes are {64, 128}". These were warnings,
    and the export went on to a TensorRT build that refuses them."""
    for n in view.nodes:
        if not view.weight_dq(n) or view.qtype(n) != ir.DataType.INT4:
            continue
        block = view.block_size(n)
        if block in INT4_BLOCK_SIZES:
            continue
        got = (f"INT4 weights in blocks of {block}" if block else
               "INT4 weights with one scale per channel (no block_size)" if not _is_per_tensor(view, n.inputs[1]) else
               "INT4 weights with one scale for the whole tensor (no block_size)")
        sizes = " or ".join(map(str, INT4_BLOCK_SIZES))
        dims = view.dims(n.inputs[0])
        k = dims[view.axis(n, len(dims))] if dims else None
        fix = int4_group_fix("group", [k] if k else ())
        yield _v(view, n, "int4-block-size", "error",
                 f"{got}: TensorRT's INT4 quantization requires block-wise scales with a block size of {sizes} along "
                 f"the input channels — quantize with {fix} for TensorRT",
                 DOC_QS + " (INT4: 'The supported block sizes are {64, 128}')")


def _weighted_inputs_quantized(view: QDQView) -> Iterable[Violation]:
    for c in view.nodes:
        if c.op_type not in WEIGHTED_OPS or len(c.inputs) < 2:
            continue
        producers = [v.producer() if v is not None else None for v in c.inputs[:2]]
        dq = [p is not None and p.op_type == "DequantizeLinear" for p in producers]
        if dq[1] and not dq[0]:
            t = view.qtype(producers[1])  # type: ignore[arg-type]
            if t in (ir.DataType.INT4, ir.DataType.UINT4):
                continue  # 4-bit weights are weight-only by design (UINT4 is flagged by supported-qtype)
            yield _v(view, c, "quantize-all-weighted-inputs", "warning",
                     f"{t.name if t else 'quantized'} weights with a high-precision activation input: TensorRT runs "
                     "this GEMM in high precision (weight-only is INT4-only); quantize the activation input too",
                     DOC_EQ + " (Q/DQ Layer-Placement Recommendations: quantize all inputs of weighted operations)")


def _unsupported_ops(view: QDQView) -> Iterable[Violation]:
    for n in view.nodes:
        if n.op_type in UNSUPPORTED_QUANT_OPS:
            yield _v(view, n, "unsupported-quantized-op", "error",
                     f"{n.op_type} is a QOperator-format op: TensorRT takes QDQ form only (QLinear*/ *Integer ops "
                     "are not supported)", DOC_EQ + " (ONNX Support)")
        elif n.domain not in ("", "ai.onnx"):
            yield _v(view, n, "unsupported-quantized-op", "error",
                     f"{n.domain}::{n.op_type} is a runtime-specific op (ONNX Runtime contrib) that TensorRT's ONNX "
                     "parser does not know; export the standard QDQ form (format='onnx') for TensorRT",
                     DOC_EQ + " (ONNX Support)")


def _opset(view: QDQView) -> Iterable[Violation]:
    need = 0
    why = ""
    for n in view.qdq_nodes():
        t = view.qtype(n)
        if t in (ir.DataType.INT4, ir.DataType.UINT4) or view.block_size(n):
            need, why = max(need, 21), "INT4 and block quantization"
        elif t in (ir.DataType.FLOAT8E4M3FN, ir.DataType.FLOAT8E5M2) and need < 19:
            need, why = 19, "FP8"
        elif (view.rank(n.inputs[1]) or 0) >= 1 and need < 13:
            need, why = 13, "per-channel quantization"
    if need and view.opset < need:
        yield Violation("opset", "error", "model", f"{why} needs ONNX opset {need}+, the model is opset {view.opset}",
                        DOC_EQ + " (ONNX Support)")


@dataclass(frozen=True)
class QDQRule:
    name: str
    check: Callable[[QDQView], Iterable[Violation]]


RULES: list[QDQRule] = [
    QDQRule("opset", _opset),
    QDQRule("unsupported-quantized-op", _unsupported_ops),
    QDQRule("supported-qtype", _supported_types),
    QDQRule("zero-point-zero", _zero_points),
    QDQRule("scale-constant-positive", _scales),
    QDQRule("scale-shape", _scale_shapes),
    QDQRule("scale-rank", _scale_rank),
    QDQRule("block-quantization-type", _block_types),
    QDQRule("zero-point-shape", _zero_point_shape),
    QDQRule("activation-per-tensor", _activations_per_tensor),
    QDQRule("q-feeds-dq", _q_feeds_dq),
    QDQRule("weight-dq-placement", _weight_placement),
    QDQRule("per-channel-axis", _per_channel_axis),
    QDQRule("int4-weight-only", _int4_weight_only),
    QDQRule("int4-block-size", _int4_block_size),
    QDQRule("quantize-all-weighted-inputs", _weighted_inputs_quantized),
]


def check_tensorrt_qdq(model: ir.Model | onnx.ModelProto | str | os.PathLike[str],
                       rules: Iterable[QDQRule] = RULES) -> list[Violation]:
    """Every TensorRT explicit-quantization rule ``model`` breaks (empty: TensorRT can build it as quantized)."""
    if isinstance(model, (str, os.PathLike)):
        from lowbit.backends.onnx.io import load_onnx

        model = load_onnx(model, check=False)
    elif isinstance(model, onnx.ModelProto):
        model = ir.serde.deserialize_model(model)
    view = QDQView(model)
    return [v for rule in rules for v in rule.check(view)]


def errors(violations: Iterable[Violation]) -> list[Violation]:
    return [v for v in violations if v.severity == "error"]


# ---- the same rules on the schemes a pipeline writes, before it runs -----------------------------------------

SchemeRole = Literal["weight", "activation", "KV cache"]


def _scheme_qtype(role: SchemeRole, s: QScheme, input_sizes: Sequence[int] = ()) -> str | None:
    qd = get_qdtype(s.qdtype)
    if qd.signed and s.qdtype != "fp8e5m2":
        return None
    return (f"{s.qdtype} is not a type TensorRT quantizes to (INT8, INT4, FP8E4M3; unsigned and FP8E5M2 formats are "
            "rejected): use int8, int4 or fp8e4m3")


def _scheme_zero_point(role: SchemeRole, s: QScheme, input_sizes: Sequence[int] = ()) -> str | None:
    if s.symmetric:
        return None
    option = {"weight": "sym", "activation": "a_sym", "KV cache": "kv_sym"}[role]
    return f"asymmetric (a zero point): TensorRT quantizes symmetrically only: {option}=true"


def _scheme_static(role: SchemeRole, s: QScheme, input_sizes: Sequence[int] = ()) -> str | None:
    if role == "weight" or not s.dynamic:
        return None
    if role == "KV cache":
        return ("its scales are computed at run time from each key/value: TensorRT's Q/DQ scales are build-time "
                "constants; drop kv= for TensorRT")
    return ("dynamic scales (computed at run time from each input): TensorRT's Q/DQ scales are build-time constants: "
            f"a_static=true,a_gran=per_tensor (calibrated){_without_a_group(s)}")


def _without_a_group(s: QScheme) -> str:
    """The rest of an activation fix where the scheme has per-token groups: ``a_group`` is read with per-token scales
    only, and the fix ``a_gran=per_tensor`` alone was refused by the quantize pass for the ``a_group=64`` left over."""
    return f", dropping a_group={s.group_size}" if s.group_size else ""


def _scheme_activation_per_tensor(role: SchemeRole, s: QScheme, input_sizes: Sequence[int] = ()) -> str | None:
    if role != "activation" or s.granularity == "per_tensor":
        return None
    what = f"{s.granularity} (in groups of {s.group_size} channels)" if s.group_size else s.granularity
    return (f"{what} activation scales: TensorRT quantizes activations per tensor: a_gran=per_tensor"
            f"{_without_a_group(s)}")


def _scheme_int4_weight_only(role: SchemeRole, s: QScheme, input_sizes: Sequence[int] = ()) -> str | None:
    qd = get_qdtype(s.qdtype)
    if role != "activation" or qd.is_float or qd.bits > 4:
        return None
    # named the types, not the option: "quantize activations to int8 or fp8e4m3"
    return (f"{s.qdtype} activations: TensorRT's INT4 is weight-only quantization: a=int8 or a=fp8e4m3 (with "
            "a_static=true,a_gran=per_tensor), or drop a= for weight-only int4")


def _scheme_int4_block(role: SchemeRole, s: QScheme, input_sizes: Sequence[int] = ()) -> str | None:
    qd = get_qdtype(s.qdtype)
    if role != "weight" or qd.is_float or qd.bits > 4 or s.group_size in INT4_BLOCK_SIZES:
        return None
    got = f"groups of {s.group_size}" if s.group_size else f"one scale per {s.granularity.removeprefix('per_')}"
    return (f"{got}: TensorRT's INT4 weights need block-wise scales of {' or '.join(map(str, INT4_BLOCK_SIZES))} "
            f"along the input channels: {int4_group_fix('group', input_sizes)}")


def _scheme_block_type(role: SchemeRole, s: QScheme, input_sizes: Sequence[int] = ()) -> str | None:
    qd = get_qdtype(s.qdtype)
    if role != "weight" or qd.bits <= 4 or s.group_size is None:
        return None
    return (f"in groups of {s.group_size}: TensorRT's block quantization is for INT4 only: quantize {s.qdtype} "
            "weights per channel (no group)")


SCHEME_RULES: list[tuple[str, Callable[[SchemeRole, QScheme, Sequence[int]], str | None]]] = [
    ("supported-qtype", _scheme_qtype),
    ("zero-point-zero", _scheme_zero_point),
    ("scale-constant-positive", _scheme_static),
    ("activation-per-tensor", _scheme_activation_per_tensor),
    ("int4-weight-only", _scheme_int4_weight_only),
    ("int4-block-size", _scheme_int4_block),
    ("block-quantization-type", _scheme_block_type),
]
"""``RULES``' errors that a scheme alone decides (rule name, check): ``pipeline_violations`` reads them off a
pass's ``QuantConfig`` before the pipeline runs, so a pipeline the TensorRT build would refuse is refused before
capture and calibration. Each names the rule ``check_tensorrt_qdq`` reports on the exported model; the input sizes of
the linears the scheme is for, where known (a ``group_fallback``'s), narrow the fix it names."""


def pipeline_violations(config: QuantConfig, input_sizes: Sequence[int] = ()) -> list[str]:
    """What TensorRT's explicit-quantization rules refuse in the schemes ``config`` writes, one line each, naming
    the role (weights, activations, KV cache; a module rule's pattern), the scheme and the rule. ``input_sizes``: of
    the linears ``config`` is for, where the caller knows them."""
    roles: list[tuple[str, SchemeRole, QScheme | None]] = [("weights", "weight", config.weight),
                                                           ("activations", "activation", config.input)]
    for r in config.rules:
        roles += [(f"weights of {r.pattern!r}", "weight", r.weight if isinstance(r.weight, QScheme) else None),
                  (f"activations of {r.pattern!r}", "activation", r.input if isinstance(r.input, QScheme) else None)]
    if config.kv is not None:
        roles += [("KV cache keys", "KV cache", config.kv.key), ("KV cache values", "KV cache", config.kv.value)]
    out = []
    for where, role, scheme in roles:
        if scheme is None:
            continue
        for rule, check in SCHEME_RULES:
            why = check(role, scheme, input_sizes)
            if why:
                out.append(f"{where} {scheme.short()}: {why} (rule {rule})")
    return out
