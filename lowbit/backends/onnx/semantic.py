"""ONNX lowerings of lowbit's semantic ops (``lowbit.ir.ops``).

Each lowering computes what the op's torch reference computes, in the same dtypes; where the ONNX
form rounds differently (x/√v instead of x·rsqrt(v), a fused Attention kernel) the difference is
float rounding only, and the parity tests state the tolerance measured.

Linear weights are pre-transposed to ``[in, out]`` so each linear is a plain ``MatMul(x, Wᵀ)``: the
form ONNX Runtime's QDQ fusions and TensorRT's explicit-quantization GEMM recognise (a
``DequantizeLinear → Transpose → MatMul`` chain is not). How a weight is transposed depends on what
produces it: a float parameter becomes a transposed initializer, a ``dequantize`` of packed weights
becomes a DequantizeLinear on transposed quantized initializers (``quant.py`` registers that in
``TRANSPOSED_WEIGHT``), anything else gets a Transpose node. Quantized linears with a fused kernel are
``qlinear`` nodes (``quant.py``), formed in the IR by ``fuse-qlinear``, not rediscovered here.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import onnx_ir as ir
import torch

from lowbit.backends.onnx.context import LoweringContext, NotLowerable, to_onnx_dtype
from lowbit.backends.onnx.registry import lowering
from lowbit.ir.graph import Node, Value

_INT64_MAX = 2**63 - 1

TransposedWeightFn = Callable[[LoweringContext, Node], "ir.Value | None"]
TRANSPOSED_WEIGHT: dict[str, TransposedWeightFn] = {}
"""Producer op → function giving the ``[in, out]`` weight for a linear reading that producer's output."""

def _only_linear_weight_reads(ctx: LoweringContext, v: Value) -> bool:
    return all(u.op == "linear" and u.args[1] is v and all(a is not v for a in u.args[:1] + u.args[2:])
               for u in ctx.users(v)) and id(v) not in ctx.graph.output_ids()


def transposed_weight(ctx: LoweringContext, w: Value) -> ir.Value:
    """The ``[in, out]`` form of a linear's ``[out, in]`` weight operand."""
    if w.is_param and _only_linear_weight_reads(ctx, w):
        return ctx.derived(("wT", id(w)), lambda: ctx.const_tensor(w.name + ".T", w.data.t().contiguous()))
    producer = w.producer
    if producer is not None and producer.op in TRANSPOSED_WEIGHT:
        out = ctx.derived(("wT-producer", id(w)), lambda: _as_node(ctx, producer, TRANSPOSED_WEIGHT[producer.op]))
        if out is not None:
            return out
    # shared with another reader (a tied embedding): one Transpose, which ORT folds or fuses into MatMul
    return ctx.derived(("wT", id(w)), lambda: ctx.op("Transpose", [ctx.v(w)], {"perm": [1, 0]}))


def _as_node(ctx: LoweringContext, node: Node, fn: TransposedWeightFn) -> ir.Value | None:
    """Run ``fn`` with ``node`` as the current node, so what it emits is named after it (and its module)."""
    outer, ctx.current = ctx.current, node
    try:
        return fn(ctx, node)
    finally:
        ctx.current = outer


@lowering("linear")
def _linear(ctx: LoweringContext, node: Node) -> ir.Value:
    x, w = node.args[0], node.args[1]
    bias = node.arg(2, "bias")
    if ctx.rank(w) != 2:
        raise NotLowerable(f"linear weight of rank {ctx.rank(w)}")
    # a quantized linear's kernel (MatMulNBits, integer GEMM) is chosen for ``qlinear`` (quant.py), which
    # fuse-qlinear forms in the IR; a linear is a MatMul on its transposed weight, whatever computes that weight
    out = ctx.op("MatMul", [ctx.v(x), transposed_weight(ctx, w)])
    if bias is not None:
        out = ctx.op("Add", [out, ctx.v(bias)])
    return out


@lowering("matmul")
def _matmul(ctx: LoweringContext, node: Node) -> ir.Value:
    return ctx.op("MatMul", [ctx.v(node.args[0]), ctx.v(node.args[1])])


@lowering("embedding")
def _embedding(ctx: LoweringContext, node: Node) -> ir.Value:
    weight, ids = node.args[0], node.args[1]
    return ctx.op("Gather", [ctx.v(weight), ctx.tensor(ids, torch.int64)], {"axis": 0})


@lowering("rms_norm")
def _rms_norm(ctx: LoweringContext, node: Node) -> ir.Value:
    x = node.args[0]
    weight = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
    eps = float(node.kwargs["eps"])
    offset = float(node.kwargs.get("offset", 0.0))
    in_dtype = ctx.dtype(x)
    compute = node.kwargs.get("compute_dtype") or in_dtype

    def gain(dtype: torch.dtype) -> ir.Value:  # offset + weight (Gemma stores its gain around 0)
        g = ctx.tensor(weight, dtype)
        return ctx.op("Add", [g, ctx.const(offset, dtype)]) if offset else g

    if ctx.options.opset >= 23 and compute == in_dtype:
        hidden = x.tensor_type.shape[-1]
        if weight is None and not isinstance(hidden, int):
            raise NotLowerable("rms_norm without a weight needs a static hidden size")
        scale = gain(in_dtype) if weight is not None else ctx.const(np.ones(hidden), in_dtype)
        return ctx.op("RMSNormalization", [ctx.v(x), scale],
                      {"axis": -1, "epsilon": eps, "stash_type": to_onnx_dtype(compute).value})
    # The reference: statistics in compute dtype, cast back, then the gain in the input dtype (Gemma's form,
    # ``gain_in_compute``: the gain before the cast).
    # Pow→ReduceMean→Add→Sqrt→Div is the chain ORT fuses into SimplifiedLayerNormalization.
    xc = ctx.tensor(x, compute)
    var = ctx.op("ReduceMean", [ctx.op("Pow", [xc, ctx.const(2.0, compute)]), ctx.axes([-1])], {"keepdims": 1})
    y = ctx.op("Div", [xc, ctx.op("Sqrt", [ctx.op("Add", [var, ctx.const(eps, compute)])])])
    if weight is not None and node.kwargs.get("gain_in_compute"):
        return ctx.cast(ctx.op("Mul", [y, gain(compute)]), compute, in_dtype)
    y = ctx.cast(y, compute, in_dtype)
    if weight is None:
        return y
    return ctx.op("Mul", [gain(in_dtype), y])


@lowering("layer_norm")
def _layer_norm(ctx: LoweringContext, node: Node) -> ir.Value:
    x = node.args[0]
    weight = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
    bias = node.arg(2, "bias")
    shape = list(node.kwargs["normalized_shape"])
    dtype = ctx.dtype(x)
    scale = ctx.v(weight) if weight is not None else ctx.const(np.ones(shape), dtype)
    inputs = [ctx.v(x), scale] + ([ctx.v(bias)] if bias is not None else [])
    return ctx.op("LayerNormalization", inputs, {"axis": -len(shape), "epsilon": float(node.kwargs["eps"])})


def _shape_slice(ctx: LoweringContext, v: ir.Value, start: int, end: int) -> ir.Value:
    return ctx.op("Shape", [v], {"start": start, "end": end})


@lowering("attention")
def _attention(ctx: LoweringContext, node: Node) -> ir.Value:
    q, k, v = node.args[:3]
    mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("mask")
    scale = node.kwargs.get("scale")
    is_causal = bool(node.kwargs.get("is_causal", False))
    enable_gqa = bool(node.kwargs.get("enable_gqa", False))
    dtype = ctx.dtype(q)
    head_dim = q.tensor_type.shape[-1]
    if scale is None:
        if not isinstance(head_dim, int):
            raise NotLowerable("attention without an explicit scale needs a static head dim")
        scale = 1.0 / math.sqrt(head_dim)
    if is_causal and mask is not None:
        raise NotLowerable("attention with both a mask and is_causal (torch rejects it too)")
    qv, kv, vv = ctx.v(q), ctx.v(k), ctx.v(v)
    if ctx.options.attention == "onnx":
        inputs = [qv, kv, vv] + ([ctx.v(mask)] if mask is not None else [])
        return ctx.op("Attention", inputs, {"scale": float(scale), "is_causal": int(is_causal)})
    rank = ctx.rank(q)
    hq, hkv = q.tensor_type.shape[-3], k.tensor_type.shape[-3]
    if enable_gqa and hq != hkv:
        if not (isinstance(hq, int) and isinstance(hkv, int)) or hq % hkv:
            raise NotLowerable(f"grouped-query attention with {hq} query heads and {hkv} key/value heads")
        kv, vv = (_repeat_heads(ctx, t, hq // hkv, rank) for t in (kv, vv))
    perm = list(range(rank - 2)) + [rank - 1, rank - 2]
    scores = ctx.op("MatMul", [qv, ctx.op("Transpose", [kv], {"perm": perm})])
    scores = ctx.op("Mul", [scores, ctx.const(scale, dtype)])
    if is_causal:
        l_s = ctx.op("Concat", [_shape_slice(ctx, qv, -2, -1), _shape_slice(ctx, kv, -2, -1)], {"axis": 0})
        ones = ctx.op("ConstantOfShape", [l_s], {"value": ir.tensor(np.array([True]))})
        mask_v = ctx.op("Trilu", [ones], {"upper": 0})
        scores = ctx.op("Where", [mask_v, scores, ctx.const(-np.inf, dtype)])
    elif mask is not None:
        if ctx.dtype(mask) == torch.bool:
            # once per mask (every layer reads the same one): 0 where attended, -inf elsewhere, then an Add,
            # which is Where(mask, s, -inf) exactly (s + 0 = s) and much cheaper per layer than Where in ORT
            additive = ctx.derived(("additive-mask", id(mask), dtype), lambda: ctx.op(
                "Where", [ctx.v(mask), ctx.const(0.0, dtype), ctx.const(-np.inf, dtype)]))
            scores = ctx.op("Add", [scores, additive])
        else:
            scores = ctx.op("Add", [scores, ctx.tensor(mask, dtype)])
    probs = ctx.op("Softmax", [scores], {"axis": -1})
    return ctx.op("MatMul", [probs, vv])


def _repeat_heads(ctx: LoweringContext, t: ir.Value, rep: int, rank: int) -> ir.Value:
    """[..., H, S, D] → [..., H·rep, S, D], each head repeated ``rep`` times in place (repeat_interleave)."""
    head_axis = rank - 3
    shape = ctx.op("Shape", [t])
    lead = _shape_slice(ctx, t, 0, head_axis + 1)
    tail = _shape_slice(ctx, t, head_axis + 1, rank)
    expanded = ctx.op("Expand", [ctx.op("Unsqueeze", [t, ctx.axes([head_axis + 1])]),
                                 ctx.op("Concat", [lead, ctx.ints([rep]), tail], {"axis": 0})])
    heads = ctx.op("Mul", [ctx.op("Gather", [shape, ctx.ints([head_axis])], {"axis": 0}), ctx.ints([rep])])
    new_shape = ctx.op("Concat", [_shape_slice(ctx, t, 0, head_axis), heads, tail], {"axis": 0})
    return ctx.op("Reshape", [expanded, new_shape])


_HALF_PRESERVING = {"aten.cos.default", "aten.sin.default", "aten.to.dtype", "aten.unsqueeze.default",
                    "aten.mul.Tensor"}
"""Ops through which a table whose last axis repeats its first half still does (elementwise, or a new leading
axis; ``mul`` only by a Python scalar)."""


def _repeats_half(v: Value) -> bool:
    """Whether ``v``'s last axis is ``cat([t, t], -1)`` by construction (HF's cos/sin tables), traced back through
    ``_HALF_PRESERVING`` ops to that ``cat``."""
    for _ in range(8):
        node = v.producer
        if node is None:
            return False
        if node.op == "aten.cat.default":
            parts, dim = node.args[0], node.arg(1, "dim", 0)
            rank = len(v.tensor_type.shape)
            return (len(parts) == 2 and parts[0] is parts[1] and isinstance(dim, int)
                    and dim in (-1, rank - 1))
        if node.op not in _HALF_PRESERVING:
            return False
        if node.op == "aten.mul.Tensor" and not isinstance(node.args[1], (int, float)):
            return False
        if node.op == "aten.unsqueeze.default" and node.args[1] in (-1, len(v.tensor_type.shape) - 1):
            return False
        v = node.args[0]
    return False


def _rotary_embedding(ctx: LoweringContext, x: Value, cos: Value, sin: Value, half: int,
                      out: torch.dtype) -> ir.Value | None:
    """The opset-23 ``RotaryEmbedding`` (non-interleaved = rotate-half) on ``x [B, H, L, D]`` with ``[B or 1, 1, L,
    D]`` tables that repeat their first half: its 3-D ``[B, L, D/2]`` tables are made once per table (and dtype)."""
    if ctx.options.rotary != "onnx" or ctx.rank(x) != 4:
        return None
    for t in (cos, sin):
        shape = t.tensor_type.shape
        if len(shape) != 4 or shape[1] != 1 or not _repeats_half(t):
            return None

    def table(t: Value) -> ir.Value:
        squeezed = ctx.op("Squeeze", [ctx.tensor(t, out), ctx.axes([1])])
        halved = ctx.op("Slice", [squeezed, ctx.ints([0]), ctx.ints([half]), ctx.ints([-1])])
        # ORT wants the 3-D tables at x's batch, not broadcast from 1 (a prefill over several sequences that share
        # positions has [1, L, D] tables)
        batch = _shape_slice(ctx, ctx.v(x), 0, 1)
        return ctx.op("Expand", [halved, ctx.op("Concat", [batch, ctx.ints([1, 1])], {"axis": 0})])

    c = ctx.derived(("rotary-half", id(cos), out), lambda: table(cos))
    s = ctx.derived(("rotary-half", id(sin), out), lambda: table(sin))
    return ctx.op("RotaryEmbedding", [ctx.tensor(x, out), c, s])


@lowering("rotary")
def _rotary(ctx: LoweringContext, node: Node) -> ir.Value:
    """Operands of other dtypes compute in the output's, as the reference's mul promotes them: OLMo 2's float32
    tables on float16 queries made a Mul (or RotaryEmbedding) whose inputs ONNX Runtime refused to bind."""
    x, cos, sin = node.args[:3]
    head_dim = x.tensor_type.shape[-1]
    if not isinstance(head_dim, int) or head_dim % 2:
        raise NotLowerable(f"rotary needs a static even head dim, got {head_dim}")
    half = head_dim // 2
    out = ctx.out_dtype(node)
    fused = _rotary_embedding(ctx, x, cos, sin, half, out)
    if fused is not None:
        return fused
    xv = ctx.tensor(x, out)
    x1 = ctx.op("Slice", [xv, ctx.ints([0]), ctx.ints([half]), ctx.ints([-1])])
    x2 = ctx.op("Slice", [xv, ctx.ints([half]), ctx.ints([_INT64_MAX]), ctx.ints([-1])])
    rotated = ctx.op("Concat", [ctx.op("Neg", [x2]), x1], {"axis": -1})
    return ctx.op("Add", [ctx.op("Mul", [xv, ctx.tensor(cos, out)]), ctx.op("Mul", [rotated, ctx.tensor(sin, out)])])


@lowering("hadamard")
def _hadamard(ctx: LoweringContext, node: Node) -> ir.Value:
    """An online rotation as a MatMul by the constant H/√n (one initializer per size and dtype)."""
    from lowbit.ir.hadamard import HadamardError, hadamard

    x = node.args[0]
    n = x.tensor_type.shape[-1]
    if not isinstance(n, int):
        raise NotLowerable(f"hadamard needs a static last dim, got {n}")
    dtype = ctx.dtype(x)
    try:
        h = hadamard(n, torch.float64).to(dtype)
    except HadamardError as exc:
        raise NotLowerable(str(exc)) from None
    hv = ctx.derived(("hadamard", n, dtype), lambda: ctx.const_tensor(f"hadamard{n}", h))
    return ctx.op("MatMul", [ctx.v(x), hv])


@lowering("softmax")
def _softmax(ctx: LoweringContext, node: Node) -> ir.Value:
    return ctx.op("Softmax", [ctx.v(node.args[0])], {"axis": int(node.kwargs["dim"])})


@lowering("silu")
def _silu(ctx: LoweringContext, node: Node) -> ir.Value:
    xv = ctx.v(node.args[0])
    return ctx.op("Mul", [xv, ctx.op("Sigmoid", [xv])])


@lowering("gelu")
def _gelu(ctx: LoweringContext, node: Node) -> ir.Value:
    return ctx.op("Gelu", [ctx.v(node.args[0])], {"approximate": node.kwargs.get("approximate", "none")})


@lowering("add", "residual_add")
def _add(ctx: LoweringContext, node: Node) -> ir.Value:
    return ctx.op("Add", [ctx.v(node.args[0]), ctx.v(node.args[1])])


@lowering("mul")
def _mul(ctx: LoweringContext, node: Node) -> ir.Value:
    return ctx.op("Mul", [ctx.v(node.args[0]), ctx.v(node.args[1])])


# reshape: aten.py's view lowering serves it (the op is aten.reshape by definition, lowbit.ir.ops)


@lowering("transpose")
def _transpose(ctx: LoweringContext, node: Node) -> ir.Value:
    x, d0, d1 = node.args[:3]
    rank = ctx.rank(x)
    perm = list(range(rank))
    a, b = d0 % rank, d1 % rank
    perm[a], perm[b] = perm[b], perm[a]
    return ctx.op("Transpose", [ctx.v(x)], {"perm": perm})


@lowering("permute")
def _permute(ctx: LoweringContext, node: Node) -> ir.Value:
    x, dims = node.args[:2]
    rank = ctx.rank(x)
    return ctx.op("Transpose", [ctx.v(x)], {"perm": [d % rank for d in dims]})
