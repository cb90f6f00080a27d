"""ONNX lowerings of the generic ATen ops (and Python size arithmetic) that remain in captured graphs.

Raising turns the heavy computation into semantic ops; what stays ATen is mostly mask and position
plumbing (``arange``, ``index``, ``cumsum``, ``diff``, comparisons, ``expand``) and pooling epilogues
(``sum``, ``clamp``, ``linalg_vector_norm``). Operands are bound to the op's schema by name
(``bind``) so positional and keyword spellings lower the same way.

Dtypes follow torch: every elementwise op computes in the dtype torch would (the IR's declared output
dtype, or torch's promotion for comparisons), casting operands first, so integer and boolean
plumbing keeps its exact values.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_ir as ir
import torch

from lowbit.backends.onnx.context import LoweringContext, NotLowerable, result_dtype, to_onnx_dtype
from lowbit.backends.onnx.registry import lowering
from lowbit.ir.graph import Node, TensorType, Value
from lowbit.ir.ops import resolve

_INT64_MAX = 2**63 - 1


def bind(node: Node) -> dict[str, Any]:
    """The node's operands by schema argument name, defaults filled in."""
    schema = resolve(node.op)._schema
    bound: dict[str, Any] = {}
    for i, arg in enumerate(schema.arguments):
        if i < len(node.args) and not arg.kwarg_only:
            bound[arg.name] = node.args[i]
        elif arg.name in node.kwargs:
            bound[arg.name] = node.kwargs[arg.name]
        elif arg.has_default_value():
            bound[arg.name] = arg.default_value
        else:
            bound[arg.name] = None
    return bound


def _norm_dim(dim: int, rank: int) -> int:
    return dim + rank if dim < 0 else dim


# ---- elementwise ---------------------------------------------------------------------------------

UNARY: dict[str, str] = {
    "aten.neg.default": "Neg",
    "aten.cos.default": "Cos",
    "aten.sin.default": "Sin",
    "aten.exp.default": "Exp",
    "aten.log.default": "Log",
    "aten.sqrt.default": "Sqrt",
    "aten.abs.default": "Abs",
    "aten.tanh.default": "Tanh",
    "aten.sigmoid.default": "Sigmoid",
    "aten.reciprocal.default": "Reciprocal",
    "aten.floor.default": "Floor",
    "aten.ceil.default": "Ceil",
    "aten.round.default": "Round",  # both round half to even
    "aten.erf.default": "Erf",
    "aten.relu.default": "Relu",
    "aten.sign.default": "Sign",
    "aten.logical_not.default": "Not",
    "aten.bitwise_not.default": "Not",
}


@lowering(*UNARY)
def _unary(ctx: LoweringContext, node: Node) -> ir.Value:
    out = ctx.out_dtype(node)
    op = UNARY[node.op]
    if op == "Not" and out != torch.bool:
        op = "BitwiseNot"
    return ctx.op(op, [ctx.tensor(node.args[0], out)])


@lowering("aten.rsqrt.default")
def _rsqrt(ctx: LoweringContext, node: Node) -> ir.Value:
    return ctx.op("Reciprocal", [ctx.op("Sqrt", [ctx.tensor(node.args[0], ctx.out_dtype(node))])])


ARITHMETIC: dict[str, str] = {
    "aten.add.Tensor": "Add", "aten.add.Scalar": "Add",
    "aten.sub.Tensor": "Sub", "aten.sub.Scalar": "Sub", "aten.rsub.Scalar": "Sub", "aten.rsub.Tensor": "Sub",
    "aten.mul.Tensor": "Mul", "aten.mul.Scalar": "Mul",
    "aten.div.Tensor": "Div", "aten.div.Scalar": "Div", "aten.div.Tensor_mode": "Div",
    "aten.pow.Tensor_Scalar": "Pow", "aten.pow.Tensor_Tensor": "Pow", "aten.pow.Scalar": "Pow",
    "aten.maximum.default": "Max", "aten.minimum.default": "Min",
    "aten.fmod.Tensor": "Mod", "aten.fmod.Scalar": "Mod",
}


@lowering(*ARITHMETIC)
def _arithmetic(ctx: LoweringContext, node: Node) -> ir.Value:
    out = ctx.out_dtype(node)
    b = bind(node)
    a_name, b_name = list(b)[:2]
    x, y = b[a_name], b[b_name]
    if node.op.startswith("aten.rsub"):
        x, y = y, x
    if node.op.startswith("aten.pow") and isinstance(y, (int, float)) and float(y) == 2.0 and out.is_floating_point:
        xv = ctx.tensor(x, out)
        return ctx.op("Mul", [xv, xv])  # x*x is what torch computes for pow(x, 2)
    alpha = b.get("alpha", 1)
    xv = ctx.tensor(x, out)
    yv = ctx.tensor(y, out)
    if alpha not in (None, 1):
        yv = ctx.op("Mul", [yv, ctx.const(alpha, out)])
    op = ARITHMETIC[node.op]
    attrs = {"fmod": 1} if op == "Mod" else None  # torch.fmod keeps the dividend's sign, as C
    result = ctx.op(op, [xv, yv], attrs)
    mode = b.get("rounding_mode")
    if op == "Div" and mode is not None:
        if mode == "trunc" and out.is_floating_point:
            # trunc(x) = sign(x) * floor(|x|)
            result = ctx.op("Mul", [ctx.op("Sign", [result]), ctx.op("Floor", [ctx.op("Abs", [result])])])
        elif mode == "floor" and out.is_floating_point:
            result = ctx.op("Floor", [result])
        elif mode == "floor":
            raise NotLowerable("integer floor division of possibly negative values has no exact ONNX op here")
        # integer Div truncates, which is torch's "trunc"
    return result


@lowering("aten.floor_divide.default", "aten.floor_divide.Scalar", "aten.remainder.Tensor",
          "aten.remainder.Scalar")
def _floor_div_remainder(ctx: LoweringContext, node: Node) -> ir.Value:
    """Python's floor division and remainder (sign of the divisor), exact for integers and floats."""
    out = ctx.out_dtype(node)
    a, b = ctx.tensor(node.args[0], out), ctx.tensor(node.args[1], out)
    if out.is_floating_point:
        q = ctx.op("Floor", [ctx.op("Div", [a, b])])
        return q if "floor_divide" in node.op else ctx.op("Sub", [a, ctx.op("Mul", [q, b])])
    mod = ctx.op("Mod", [a, b], {"fmod": 0})  # integer Mod with fmod=0 takes the divisor's sign, as Python
    return ctx.op("Div", [ctx.op("Sub", [a, mod]), b]) if "floor_divide" in node.op else mod


COMPARISON: dict[str, tuple[str, bool]] = {
    "aten.eq.Tensor": ("Equal", False), "aten.eq.Scalar": ("Equal", False),
    "aten.ne.Tensor": ("Equal", True), "aten.ne.Scalar": ("Equal", True),
    "aten.lt.Tensor": ("Less", False), "aten.lt.Scalar": ("Less", False),
    "aten.le.Tensor": ("LessOrEqual", False), "aten.le.Scalar": ("LessOrEqual", False),
    "aten.gt.Tensor": ("Greater", False), "aten.gt.Scalar": ("Greater", False),
    "aten.ge.Tensor": ("GreaterOrEqual", False), "aten.ge.Scalar": ("GreaterOrEqual", False),
}


@lowering(*COMPARISON)
def _comparison(ctx: LoweringContext, node: Node) -> ir.Value:
    a, b = node.args[0], node.args[1]
    dtype = result_dtype(ctx, a, b)
    op, negate = COMPARISON[node.op]
    out = ctx.op(op, [ctx.tensor(a, dtype), ctx.tensor(b, dtype)])
    return ctx.op("Not", [out]) if negate else out


LOGICAL: dict[str, tuple[str, str]] = {
    "aten.__and__.Tensor": ("And", "BitwiseAnd"), "aten.bitwise_and.Tensor": ("And", "BitwiseAnd"),
    "aten.logical_and.default": ("And", "And"),
    "aten.__or__.Tensor": ("Or", "BitwiseOr"), "aten.bitwise_or.Tensor": ("Or", "BitwiseOr"),
    "aten.logical_or.default": ("Or", "Or"),
    "aten.__xor__.Tensor": ("Xor", "BitwiseXor"), "aten.bitwise_xor.Tensor": ("Xor", "BitwiseXor"),
    "aten.logical_xor.default": ("Xor", "Xor"),
}


@lowering(*LOGICAL)
def _logical(ctx: LoweringContext, node: Node) -> ir.Value:
    a, b = node.args[0], node.args[1]
    bool_op, int_op = LOGICAL[node.op]
    if node.op.startswith("aten.logical_") or result_dtype(ctx, a, b) == torch.bool:
        return ctx.op(bool_op, [ctx.tensor(a, torch.bool), ctx.tensor(b, torch.bool)])
    dtype = result_dtype(ctx, a, b)
    return ctx.op(int_op, [ctx.tensor(a, dtype), ctx.tensor(b, dtype)])


@lowering("aten.where.self", "aten.where.ScalarOther", "aten.where.ScalarSelf", "aten.where.Scalar")
def _where(ctx: LoweringContext, node: Node) -> ir.Value:
    cond, x, y = node.args[:3]
    out = ctx.out_dtype(node)
    return ctx.op("Where", [ctx.tensor(cond, torch.bool), ctx.tensor(x, out), ctx.tensor(y, out)])


@lowering("aten.masked_fill.Scalar", "aten.masked_fill.Tensor")
def _masked_fill(ctx: LoweringContext, node: Node) -> ir.Value:
    x, mask, value = node.args[:3]
    out = ctx.out_dtype(node)
    return ctx.op("Where", [ctx.tensor(mask, torch.bool), ctx.tensor(value, out), ctx.tensor(x, out)])


@lowering("aten.clamp.default", "aten.clamp.Tensor", "aten.clamp_min.default", "aten.clamp_max.default")
def _clamp(ctx: LoweringContext, node: Node) -> ir.Value:
    b = bind(node)
    out = ctx.out_dtype(node)
    if node.op == "aten.clamp_min.default":
        lo, hi = b["min"], None
    elif node.op == "aten.clamp_max.default":
        lo, hi = None, b["max"]
    else:
        lo, hi = b["min"], b["max"]
    x = ctx.tensor(b["self"], out)
    # Max/Min rather than Clip: they broadcast tensor bounds and propagate NaN like torch.clamp.
    if lo is not None:
        x = ctx.op("Max", [x, ctx.tensor(lo, out)])
    if hi is not None:
        x = ctx.op("Min", [x, ctx.tensor(hi, out)])
    return x


@lowering("aten.to.dtype", "aten.to.device", "aten.to.dtype_layout", "aten._to_copy.default",
          "aten.type_as.default", "aten.clone.default", "aten.alias.default", "aten.detach.default",
          "aten.contiguous.default", "aten.lift_fresh_copy.default")
def _to(ctx: LoweringContext, node: Node) -> ir.Value:
    src = node.args[0]
    out = ctx.out_dtype(node)
    v = ctx.v(src)
    if ctx.dtype(src) == out:
        return ctx.op("Identity", [v])
    return ctx.op("Cast", [v], {"to": to_onnx_dtype(out)})


# ---- creation ------------------------------------------------------------------------------------

@lowering("aten.arange.default", "aten.arange.start", "aten.arange.start_step")
def _arange(ctx: LoweringContext, node: Node) -> ir.Value:
    b = bind(node)
    out = ctx.out_dtype(node)
    start, end, step = b.get("start", 0), b["end"], b.get("step", 1)
    if all(isinstance(x, (int, float)) for x in (start, end, step)):
        return ctx.const(torch.arange(start, end, step, dtype=out).numpy(), out)
    compute = out if out.is_floating_point or out == torch.int64 else torch.int64
    r = ctx.op("Range", [ctx.tensor(start, compute), ctx.tensor(end, compute), ctx.tensor(step, compute)])
    return ctx.cast(r, compute, out)


FILL_VALUES: dict[str, int] = {
    "aten.ones.default": 1, "aten.new_ones.default": 1, "aten.ones_like.default": 1,
    "aten.zeros.default": 0, "aten.new_zeros.default": 0, "aten.zeros_like.default": 0,
}
"""What the ones and zeros ops fill with; the full ops read their ``fill_value`` operand."""


@lowering("aten.ones.default", "aten.zeros.default", "aten.full.default",
          "aten.new_ones.default", "aten.new_zeros.default", "aten.new_full.default")
def _filled(ctx: LoweringContext, node: Node) -> ir.Value:
    b = bind(node)
    value, sizes = FILL_VALUES.get(node.op, b.get("fill_value")), b["size"]
    out = ctx.out_dtype(node)
    if all(isinstance(s, int) for s in sizes):
        return ctx.const(np.full(tuple(sizes), value), out)
    return ctx.op("ConstantOfShape", [ctx.shape_vector(sizes)],
                  {"value": ir.tensor(np.asarray([value]).astype(to_onnx_dtype(out).numpy()))})


@lowering("aten.ones_like.default", "aten.zeros_like.default", "aten.full_like.default")
def _filled_like(ctx: LoweringContext, node: Node) -> ir.Value:
    b = bind(node)
    value = FILL_VALUES.get(node.op, b.get("fill_value"))
    out = ctx.out_dtype(node)
    return ctx.op("ConstantOfShape", [ctx.op("Shape", [ctx.v(b["self"])])],
                  {"value": ir.tensor(np.asarray([value]).astype(to_onnx_dtype(out).numpy()))})


@lowering("aten.scalar_tensor.default")
def _scalar_tensor(ctx: LoweringContext, node: Node) -> ir.Value:
    return ctx.tensor(node.args[0], ctx.out_dtype(node))


# ---- shape manipulation --------------------------------------------------------------------------

@lowering("aten.unsqueeze.default")
def _unsqueeze(ctx: LoweringContext, node: Node) -> ir.Value:
    return ctx.op("Unsqueeze", [ctx.v(node.args[0]), ctx.axes([node.args[1]])])


@lowering("aten.squeeze.dim", "aten.squeeze.dims", "aten.squeeze.default")
def _squeeze(ctx: LoweringContext, node: Node) -> ir.Value:
    x = node.args[0]
    if node.op == "aten.squeeze.default":
        t = x.tensor_type
        dims = [i for i, d in enumerate(t.shape) if d == 1]
    else:
        dims = node.args[1] if isinstance(node.args[1], (list, tuple)) else [node.args[1]]
        t = x.tensor_type
        # torch ignores dims that are not 1; ONNX Squeeze rejects them
        dims = [d for d in dims if t.shape[_norm_dim(d, t.rank)] == 1]
    if not dims:
        return ctx.op("Identity", [ctx.v(x)])
    return ctx.op("Squeeze", [ctx.v(x), ctx.axes(dims)])


@lowering("aten.expand.default")
def _expand(ctx: LoweringContext, node: Node) -> ir.Value:
    x, sizes = node.args[0], node.args[1]
    # torch's -1 keeps a dim; ONNX Expand broadcasts, where 1 keeps it
    return ctx.op("Expand", [ctx.v(x), ctx.shape_vector(sizes, minus_one_as=1)])


@lowering("aten.expand_as.default")
def _expand_as(ctx: LoweringContext, node: Node) -> ir.Value:
    return ctx.op("Expand", [ctx.v(node.args[0]), ctx.op("Shape", [ctx.v(node.args[1])])])


# "reshape", the semantic op, is aten.reshape by definition (lowbit.ir.ops): the same two operands, one lowering
@lowering("aten.view.default", "aten.reshape.default", "aten._unsafe_view.default", "reshape")
def _view(ctx: LoweringContext, node: Node) -> ir.Value:
    sizes = node.args[1]
    if any(isinstance(s, int) and s == 0 for s in sizes):
        raise NotLowerable("a literal 0 in a reshape target means an empty dim in torch but 'copy' in ONNX")
    return ctx.op("Reshape", [ctx.v(node.args[0]), ctx.shape_vector(sizes)])


@lowering("aten.flatten.using_ints")
def _flatten(ctx: LoweringContext, node: Node) -> ir.Value:
    b = bind(node)
    t = b["self"].tensor_type
    start, end = _norm_dim(b["start_dim"], t.rank), _norm_dim(b["end_dim"], t.rank)
    shape = ctx.op("Shape", [ctx.v(b["self"])])
    parts = []
    if start > 0:
        parts.append(ctx.op("Slice", [shape, ctx.ints([0]), ctx.ints([start])]))
    parts.append(ctx.ints([-1]))
    if end < t.rank - 1:
        parts.append(ctx.op("Slice", [shape, ctx.ints([end + 1]), ctx.ints([_INT64_MAX])]))
    target = parts[0] if len(parts) == 1 else ctx.op("Concat", parts, {"axis": 0})
    return ctx.op("Reshape", [ctx.v(b["self"]), target])


@lowering("aten.t.default", "aten.numpy_T.default")
def _t(ctx: LoweringContext, node: Node) -> ir.Value:
    rank = ctx.rank(node.args[0])
    return ctx.op("Transpose", [ctx.v(node.args[0])], {"perm": list(range(rank))[::-1]})


@lowering("aten.slice.Tensor")
def _slice(ctx: LoweringContext, node: Node) -> ir.Value:
    b = bind(node)
    x = b["self"]
    start = 0 if b["start"] is None else b["start"]
    end = _INT64_MAX if b["end"] is None else b["end"]
    if isinstance(end, int) and end > _INT64_MAX:
        end = _INT64_MAX
    step = b["step"]
    return ctx.op("Slice", [ctx.v(x), ctx.vector_int(start), ctx.vector_int(end), ctx.ints([b["dim"]]),
                            ctx.vector_int(step)])


@lowering("aten.select.int")
def _select(ctx: LoweringContext, node: Node) -> ir.Value:
    b = bind(node)
    return ctx.op("Gather", [ctx.v(b["self"]), ctx.scalar_int(b["index"])], {"axis": b["dim"]})


@lowering("aten.cat.default", "aten.concat.default")
def _cat(ctx: LoweringContext, node: Node) -> ir.Value:
    b = bind(node)
    out = ctx.out_dtype(node)
    parts = [t for t in b["tensors"] if not (isinstance(t.type, TensorType) and t.type.shape == (0,))]
    return ctx.op("Concat", [ctx.tensor(t, out) for t in parts], {"axis": b["dim"]})


@lowering("aten.stack.default")
def _stack(ctx: LoweringContext, node: Node) -> ir.Value:
    """``stack`` as Concat of the operands unsqueezed at ``dim`` (GPT-J/Cohere's interleaved rotary pairs)."""
    b = bind(node)
    out = ctx.out_dtype(node)
    dim = _norm_dim(b["dim"], node.outputs[0].tensor_type.rank)
    parts = [ctx.op("Unsqueeze", [ctx.tensor(t, out), ctx.axes([dim])]) for t in b["tensors"]]
    return ctx.op("Concat", parts, {"axis": dim})


@lowering("aten.repeat.default")
def _repeat(ctx: LoweringContext, node: Node) -> ir.Value:
    """``repeat`` as Tile; repeats longer than the rank add leading dims first, as torch does."""
    b = bind(node)
    x, reps = b["self"], list(b["repeats"])
    extra = len(reps) - ctx.rank(x)
    xv = ctx.op("Unsqueeze", [ctx.v(x), ctx.axes(list(range(extra)))]) if extra > 0 else ctx.v(x)
    return ctx.op("Tile", [xv, ctx.shape_vector(reps)])


@lowering("aten.repeat_interleave.self_int")
def _repeat_interleave(ctx: LoweringContext, node: Node) -> ir.Value:
    """Each element ``r`` times along ``dim``: unsqueeze after it, expand that axis to ``r``, merge the two."""
    b = bind(node)
    x, r, dim = b["self"], b["repeats"], b["dim"]
    if dim is None or not isinstance(r, int) or isinstance(r, bool):
        raise NotLowerable("repeat_interleave without a dim (over the flattened tensor) or with symbolic repeats")
    rank = ctx.rank(x)
    d = _norm_dim(dim, rank)
    shape = ctx.op("Shape", [ctx.v(x)])
    head, at = ctx.op("Slice", [shape, ctx.ints([0]), ctx.ints([d])]), ctx.op("Slice", [shape, ctx.ints([d]),
                                                                                       ctx.ints([d + 1])])
    tail = ctx.op("Slice", [shape, ctx.ints([d + 1]), ctx.ints([_INT64_MAX])])
    grown = ctx.op("Expand", [ctx.op("Unsqueeze", [ctx.v(x), ctx.axes([d + 1])]),
                              ctx.op("Concat", [head, at, ctx.ints([r]), tail], {"axis": 0})])
    merged = ctx.op("Concat", [head, ctx.op("Mul", [at, ctx.ints([r])]), tail], {"axis": 0})
    return ctx.op("Reshape", [grown, merged])


@lowering("aten.baddbmm.default", "aten.addmm.default")
def _add_matmul(ctx: LoweringContext, node: Node) -> ir.Value:
    """``beta · self + alpha · (a @ b)``: baddbmm (Bloom's ALiBi-biased attention scores) and addmm (GPT-2's
    Conv1D, ``bias + x @ W`` with ``W [in, out]``, which raising leaves as it is: GPT-2 exports failed on it)."""
    b = bind(node)
    out = ctx.out_dtype(node)
    a, m = (b["batch1"], b["batch2"]) if node.op == "aten.baddbmm.default" else (b["mat1"], b["mat2"])
    prod = ctx.op("MatMul", [ctx.tensor(a, out), ctx.tensor(m, out)])
    if b["alpha"] != 1:
        prod = ctx.op("Mul", [prod, ctx.const(b["alpha"], out)])
    if b["beta"] == 0:  # torch ignores self then (even NaN in it)
        return prod
    base = ctx.tensor(b["self"], out)
    if b["beta"] != 1:
        base = ctx.op("Mul", [base, ctx.const(b["beta"], out)])
    return ctx.op("Add", [base, prod])


@lowering("aten.split_with_sizes.default", "aten.split.Tensor", "aten.chunk.default")
def _split(ctx: LoweringContext, node: Node) -> list[ir.Value]:
    b = bind(node)
    x = b["self"]
    n = len(node.outputs)
    if node.op == "aten.split_with_sizes.default":
        sizes = list(b["split_sizes"])
    else:
        total = x.tensor_type.shape[_norm_dim(b["dim"], x.tensor_type.rank)]
        # chunk(n) splits into pieces of ceil(total / n) (GPT-NeoX's fused qkv, Phi-3's gate_up)
        size = b["split_size"] if node.op == "aten.split.Tensor" else (
            -(-total // b["chunks"]) if isinstance(total, int) else None)
        if not isinstance(total, int) or not isinstance(size, int):
            raise NotLowerable("split of a dynamic dimension")
        sizes = [min(size, total - i * size) for i in range(n)]
    return ctx.op("Split", [ctx.v(x), ctx.shape_vector(sizes)], {"axis": b["dim"]}, num_outputs=n)


@lowering("aten.topk.default")
def _topk(ctx: LoweringContext, node: Node) -> list[ir.Value]:
    """``x.topk(k, dim, largest, sorted)`` (a mixture-of-experts router's pick): ONNX TopK, values and int64
    indices, ties to the lower index as torch's CPU kernel breaks them."""
    b = bind(node)
    x = b["self"]
    dim = _norm_dim(b["dim"], x.tensor_type.rank)
    return ctx.op("TopK", [ctx.v(x), ctx.ints([b["k"]])],
                  {"axis": dim, "largest": int(b["largest"]), "sorted": int(b["sorted"])}, num_outputs=2)


@lowering("aten.unbind.int")
def _unbind(ctx: LoweringContext, node: Node) -> list[ir.Value]:
    """``x.unbind(dim)``: one output per index of ``dim`` (classic Falcon's q, k and v of a ``[.., heads, 3, D]``
    view), as a Split into pieces of 1 and a Squeeze of each."""
    b = bind(node)
    x = b["self"]
    dim = _norm_dim(b["dim"], x.tensor_type.rank)
    n = len(node.outputs)
    parts = ctx.op("Split", [ctx.v(x), ctx.ints([1] * n)], {"axis": dim}, num_outputs=n)
    return [ctx.op("Squeeze", [p, ctx.axes([dim])]) for p in (parts if isinstance(parts, list) else [parts])]


@lowering("aten.conv2d.default")
def _conv2d(ctx: LoweringContext, node: Node) -> ir.Value:
    """2-D convolution (a ViT's patch embedding) as ONNX Conv; ``padding`` as explicit pads."""
    b = bind(node)
    pad = list(b["padding"]) if not isinstance(b["padding"], str) else None
    if pad is None:
        raise NotLowerable(f"conv2d with padding={b['padding']!r}")
    inputs = [ctx.v(b["input"]), ctx.v(b["weight"])] + ([ctx.v(b["bias"])] if b["bias"] is not None else [])
    return ctx.op("Conv", inputs, {"strides": list(b["stride"]), "pads": pad + pad, "dilations": list(b["dilation"]),
                                   "group": int(b["groups"])})


@lowering("aten.gather.default")
def _gather(ctx: LoweringContext, node: Node) -> ir.Value:
    b = bind(node)
    return ctx.op("GatherElements", [ctx.v(b["self"]), ctx.tensor(b["index"], torch.int64)], {"axis": b["dim"]})


@lowering("aten.index.Tensor")
def _index(ctx: LoweringContext, node: Node) -> ir.Value:
    """Advanced indexing with integer index tensors on consecutive dims (None = full slice before them).

    The index tensors broadcast together; GatherND reads x at the stacked indices. Where the indexed
    dims do not start at 0, they are moved to the front first and the result dims moved back to where
    torch puts them (at the first indexed dim, since the indexed dims are adjacent).
    """
    x, indices = node.args[0], list(node.args[1])
    rank = ctx.rank(x)
    while indices and indices[-1] is None:
        indices.pop()
    used = [i for i, idx in enumerate(indices) if idx is not None]
    if not used:
        return ctx.op("Identity", [ctx.v(x)])
    if used != list(range(used[0], used[-1] + 1)):
        raise NotLowerable("advanced indexing on non-adjacent dims")
    for i in used:
        if ctx.dtype(indices[i]) == torch.bool:
            raise NotLowerable("boolean-mask indexing has a data-dependent shape")
    lead = used[0]
    data = ctx.v(x)
    if len(used) == 1:  # one index tensor: Gather on its axis puts the index dims where torch does (no Transposes)
        return ctx.op("Gather", [data, ctx.tensor(indices[lead], torch.int64)], {"axis": lead})
    if lead:
        perm = used + [d for d in range(rank) if d not in used]
        data = ctx.op("Transpose", [data], {"perm": perm})
    idx_vals = [ctx.tensor(indices[i], torch.int64) for i in used]
    total = idx_vals[0]
    for v in idx_vals[1:]:
        total = ctx.op("Add", [total, v])
    shape = ctx.op("Shape", [total])
    stacked = [ctx.op("Unsqueeze", [ctx.op("Expand", [v, shape]), ctx.axes([-1])]) for v in idx_vals]
    gathered = ctx.op("GatherND", [data, ctx.op("Concat", stacked, {"axis": -1})])
    bcast_rank = max(ctx.rank(indices[i]) for i in used)
    if lead:
        # result is [bcast..., lead dims..., trailing dims...]; torch wants [lead dims..., bcast..., trailing...]
        rest = rank - len(used)
        perm = (list(range(bcast_rank, bcast_rank + lead)) + list(range(bcast_rank))
                + list(range(bcast_rank + lead, bcast_rank + rest)))
        gathered = ctx.op("Transpose", [gathered], {"perm": perm})
    return gathered


# ---- reductions and scans ------------------------------------------------------------------------

def _reduce_axes(ctx: LoweringContext, x: Value, dims: Any) -> list[int] | None:
    if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
        return None  # all dims
    return list(dims) if isinstance(dims, (list, tuple)) else [dims]


REDUCE: dict[str, str] = {
    "aten.sum.dim_IntList": "ReduceSum", "aten.sum.default": "ReduceSum",
    "aten.mean.dim": "ReduceMean", "aten.mean.default": "ReduceMean",
    "aten.amax.default": "ReduceMax", "aten.amin.default": "ReduceMin", "aten.max.default": "ReduceMax",
    "aten.prod.dim_int": "ReduceProd",
}


@lowering(*REDUCE)
def _reduce(ctx: LoweringContext, node: Node) -> ir.Value:
    b = bind(node)
    out = ctx.out_dtype(node)
    x = b["self"]
    axes = _reduce_axes(ctx, x, b.get("dim"))
    inputs = [ctx.tensor(x, out)]
    if axes is not None:
        inputs.append(ctx.axes(axes))
    return ctx.op(REDUCE[node.op], inputs, {"keepdims": int(bool(b.get("keepdim", False)))})


@lowering("aten.linalg_vector_norm.default")
def _vector_norm(ctx: LoweringContext, node: Node) -> ir.Value:
    b = bind(node)
    out = ctx.out_dtype(node)
    ord_ = float(b["ord"])
    op = {2.0: "ReduceL2", 1.0: "ReduceL1"}.get(ord_)
    x = ctx.tensor(b["self"], out)
    if ord_ == float("inf"):
        op, x = "ReduceMax", ctx.op("Abs", [x])
    if op is None:
        raise NotLowerable(f"vector norm of order {ord_}")
    axes = _reduce_axes(ctx, b["self"], b["dim"])
    inputs = [x] + ([ctx.axes(axes)] if axes is not None else [])
    return ctx.op(op, inputs, {"keepdims": int(bool(b["keepdim"]))})


@lowering("aten.cumsum.default")
def _cumsum(ctx: LoweringContext, node: Node) -> ir.Value:
    b = bind(node)
    out = ctx.out_dtype(node)
    return ctx.op("CumSum", [ctx.tensor(b["self"], out), ctx.scalar_int(b["dim"])])


@lowering("aten.diff.default")
def _diff(ctx: LoweringContext, node: Node) -> ir.Value:
    b = bind(node)
    out = ctx.out_dtype(node)
    dim = b["dim"]
    parts = [p for p in (b["prepend"], b["self"], b["append"]) if p is not None]
    x = ctx.tensor(parts[0], out) if len(parts) == 1 else ctx.op(
        "Concat", [ctx.tensor(p, out) for p in parts], {"axis": dim})
    for _ in range(b["n"]):
        hi = ctx.op("Slice", [x, ctx.ints([1]), ctx.ints([_INT64_MAX]), ctx.ints([dim])])
        lo = ctx.op("Slice", [x, ctx.ints([0]), ctx.ints([-1]), ctx.ints([dim])])
        x = ctx.op("Xor" if out == torch.bool else "Sub", [hi, lo])  # torch.diff on bool is logical xor
    return x


@lowering("aten._softmax.default", "aten.softmax.int", "aten._log_softmax.default", "aten.log_softmax.int")
def _softmax_aten(ctx: LoweringContext, node: Node) -> ir.Value:
    out = ctx.out_dtype(node)
    op = "LogSoftmax" if "log_softmax" in node.op else "Softmax"
    return ctx.op(op, [ctx.tensor(node.args[0], out)], {"axis": node.args[1]})


# ---- symbolic sizes ------------------------------------------------------------------------------

@lowering("aten.scatter.src")
def _scatter(ctx: LoweringContext, node: Node) -> ir.Value:
    """``out = self; out[..., index[i], ...] = src[i]`` along ``dim``: a step graph's KV-cache write."""
    b = bind(node)
    return ctx.op("ScatterElements", [ctx.v(b["self"]), ctx.v(b["index"]), ctx.v(b["src"])], {"axis": b["dim"]})


@lowering("aten.sym_size.int")
def _sym_size(ctx: LoweringContext, node: Node) -> ir.Value:
    x, dim = node.args[0], node.args[1]
    # Shape → Gather with a 0-d index gives the 0-d int64 every symbolic size is in the ONNX graph
    return ctx.op("Gather", [ctx.op("Shape", [ctx.v(x)]), ctx.const(np.int64(dim), ir.DataType.INT64)],
                  {"axis": 0})


@lowering("aten.sym_numel.default")
def _sym_numel(ctx: LoweringContext, node: Node) -> ir.Value:
    return ctx.op("Size", [ctx.v(node.args[0])])


SYM_ARITH: dict[str, str] = {
    "operator.add": "Add", "operator.sub": "Sub", "operator.mul": "Mul",
    # sizes are non-negative, where truncating Div equals Python's floor division
    "operator.floordiv": "Div",
}


@lowering(*SYM_ARITH)
def _sym_arith(ctx: LoweringContext, node: Node) -> ir.Value:
    a, b = node.args[:2]
    return ctx.op(SYM_ARITH[node.op], [ctx.scalar_int(a), ctx.scalar_int(b)])


@lowering("operator.neg")
def _sym_neg(ctx: LoweringContext, node: Node) -> ir.Value:
    return ctx.op("Neg", [ctx.scalar_int(node.args[0])])
