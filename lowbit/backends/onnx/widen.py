"""bfloat16 -> float32 on an ONNX model, for runtimes without bfloat16 kernels.

ONNX Runtime's CPU provider implements almost no bfloat16 kernels (``Mul``, ``MatMul``, ``Add``: NOT_IMPLEMENTED
when the session is created), while HF checkpoints are often bfloat16. ``widen_bfloat16`` rewrites every
bfloat16 tensor of a model — values, initializers, ``Constant``/``ConstantOfShape`` payloads and the ``to`` of
``Cast`` — to float32, so the session computes what the bfloat16 graph computes with float32 rounding (each
bfloat16 weight is exact in float32). The ONNX Runtime backend applies it when CPU is its only provider and casts
the outputs back to bfloat16 (``lowbit.backends.onnxruntime_backend``).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

__all__ = ["has_bfloat16", "widen_bfloat16"]

_BF16 = ir.DataType.BFLOAT16
_F32 = ir.DataType.FLOAT
_TYPE_ATTRS = ("to", "dtype", "output_dtype")
"""Integer attributes that name an element type (Cast's ``to``; ``dtype`` of the generators; ``output_dtype``)."""


def _graphs(model: ir.Model):
    yield model.graph
    for fn in model.functions.values():
        yield fn
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        for attr in node.attributes.values():
            if attr.type == ir.AttributeType.GRAPH:
                yield attr.value
            elif attr.type == ir.AttributeType.GRAPHS:
                yield from attr.value


def _nodes(model: ir.Model):
    yield from ir.traversal.RecursiveGraphIterator(model.graph)
    for fn in model.functions.values():
        yield from ir.traversal.RecursiveGraphIterator(fn)


def _values(model: ir.Model):
    """Every value of ``model``: graph and function inputs and outputs, initializers, node inputs and outputs (a
    value can come more than once)."""
    for g in _graphs(model):
        yield from g.inputs
        yield from g.outputs
        if isinstance(g, ir.Graph):
            yield from g.initializers.values()
    for node in _nodes(model):
        yield from (v for v in node.inputs if v is not None)
        yield from node.outputs


def _widened(t: ir.TensorProtocol, name: str | None) -> ir.Tensor:
    return ir.tensor(np.asarray(t.numpy(), dtype=np.float32), name=name)


def has_bfloat16(model: ir.Model) -> bool:
    """Whether any value or initializer of ``model`` is bfloat16 (what ``widen_bfloat16`` would change)."""
    return any(v.dtype == _BF16 for v in _values(model))


def widen_bfloat16(model: ir.Model) -> int:
    """Rewrite every bfloat16 tensor of ``model`` (in place) as float32; return how many values, initializers and
    attributes changed."""
    changed = 0
    for v in _values(model):  # a value met again is float32 by then: counted once
        if v.dtype == _BF16:
            v.dtype = _F32
            changed += 1
        if v.const_value is not None and v.const_value.dtype == _BF16:
            v.const_value = _widened(v.const_value, v.name)
            changed += 1
    for node in _nodes(model):
        for name, attr in list(node.attributes.items()):
            if name in _TYPE_ATTRS and attr.type == ir.AttributeType.INT and attr.value == int(_BF16):
                node.attributes[name] = ir.AttrInt64(name, int(_F32))
                changed += 1
            elif attr.type == ir.AttributeType.TENSOR and attr.value.dtype == _BF16:
                node.attributes[name] = ir.AttrTensor(name, _widened(attr.value, attr.value.name))
                changed += 1
    return changed
