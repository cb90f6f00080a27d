"""The ATen overloads and Python functions an IR file may name (lowbit's own ops come from ``ops.register_op``).

IR text is untrusted input: ``ops.resolve`` looks an op up here, never by walking ``torch`` or a module by
name. The lists are explicit and reviewed, not computed:

* ``CAPTURED``: every ATen overload capture emitted (raised and unraised, static and dynamic shapes, float32 /
  bfloat16 / float16) on SmolLM2-135M, all-MiniLM-L6-v2 and tiny random Llama, Qwen2, Qwen3, Mistral, Gemma,
  Gemma2, OLMo, Granite, Phi, Phi-3, GPT-NeoX, StableLM, Starcoder2, GPT-2, OPT, BERT, RoBERTa, DistilBERT,
  ELECTRA and ViT (``aten.conv2d`` of its patch embedding), and the generation step graph of SmolLM2
  (``aten.scatter.src`` writes the KV cache), and the routers of tiny Mixtral, Qwen2/3-MoE, OLMoE and GraniteMoE
  (``aten.topk``: k is fixed; ``lowbit.models.DenseExperts`` scatters its weights)
  (torch 2.14.1, transformers 5). ``tools/aten_allowlist.py`` re-runs that survey and
  prints any op capture now emits that is missing here.
* ``LOWERED``: the further overloads lowbit's raising patterns, passes and ONNX/TensorRT lowerings name (what
  other models and torch versions capture to): pure tensor functions, none touches files, processes or
  Python objects.
* ``PY_FUNCTIONS``: functions on symbolic ints (``sym_size`` arithmetic) that capture may record as
  ``operator.*`` / ``math.*`` / ``torch.sym_*`` calls; each takes numbers only (``_numbers_only``), so a
  file cannot make one repeat a string a billion times.

To run a new op from IR text, register a semantic op (``lowbit.ir.ops.register_op``) or add the overload here
with a test; never widen ``resolve``.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from typing import Any

import torch

CAPTURED: frozenset[str] = frozenset({
    "aten.__and__.Tensor", "aten.add.Tensor", "aten.addmm.default", "aten.alias.default", "aten.arange.default",
    "aten.cat.default", "aten.chunk.default", "aten.clamp.default", "aten.clamp_min.default", "aten.contiguous.default",
    "aten.conv2d.default", "aten.cos.default", "aten.cumsum.default", "aten.diff.default", "aten.div.Tensor",
    "aten.dropout.default",
    "aten.embedding.default", "aten.eq.Tensor", "aten.expand.default", "aten.expand_as.default",
    "aten.gather.default", "aten.ge.Scalar", "aten.gelu.default", "aten.gt.Tensor", "aten.index.Tensor",
    "aten.layer_norm.default", "aten.le.Tensor", "aten.linalg_vector_norm.default", "aten.linear.default",
    "aten.matmul.default", "aten.mean.dim", "aten.mul.Tensor", "aten.ne.Scalar", "aten.neg.default",
    "aten.new_ones.default", "aten.ones.default", "aten.pow.Tensor_Scalar", "aten.relu.default",
    "aten.max.default", "aten.pow.Scalar",  # Phi-3 longrope's rotary: the longest position, base ** exponents
    # interleaved rotary (Cohere, GPT-J: repeat_interleave of cos/sin, stack of the rotated pairs), Bloom's ALiBi
    # scores (baddbmm) and its head repeat
    "aten.stack.default", "aten.repeat_interleave.self_int", "aten.baddbmm.default", "aten.repeat.default",
    "aten.unbind.int",  # Falcon without multi_query: its fused q/k/v viewed [.., heads, 3, head_dim] and unbound
    "aten.reshape.default", "aten.rsqrt.default", "aten.scaled_dot_product_attention.default", "aten.scatter.src",
    "aten.silu.default",
    "aten.sin.default", "aten.slice.Tensor", "aten.softmax.int", "aten.split.Tensor", "aten.sub.Tensor",
    "aten.sum.dim_IntList", "aten.sym_size.int", "aten.tanh.default", "aten.to.device", "aten.to.dtype",
    "aten.to.dtype_layout", "aten.topk.default", "aten.transpose.int", "aten.type_as.default", "aten.unsqueeze.default",
    "aten.view.default", "aten.where.ScalarOther", "aten.zeros.default",
})

LOWERED: frozenset[str] = frozenset({
    "aten.__or__.Tensor", "aten.__xor__.Tensor", "aten._assert_async.msg", "aten._assert_scalar.default",
    "aten._assert_tensor_metadata.default", "aten._log_softmax.default", "aten._softmax.default",
    "aten._to_copy.default", "aten._unsafe_view.default", "aten.abs.default", "aten.add.Scalar",
    "aten.amax.default", "aten.amin.default", "aten.arange.start", "aten.arange.start_step",
    "aten.bitwise_and.Tensor", "aten.bitwise_not.default", "aten.bitwise_or.Tensor", "aten.bitwise_xor.Tensor",
    "aten.bmm.default", "aten.ceil.default", "aten.clamp.Tensor", "aten.clamp_max.default", "aten.clone.default",
    "aten.concat.default", "aten.detach.default", "aten.div.Scalar", "aten.div.Tensor_mode", "aten.eq.Scalar",
    "aten.erf.default", "aten.exp.default", "aten.flatten.using_ints", "aten.floor.default",
    "aten.floor_divide.Scalar", "aten.floor_divide.default", "aten.fmod.Scalar", "aten.fmod.Tensor",
    "aten.full.default", "aten.full_like.default", "aten.ge.Tensor", "aten.gt.Scalar", "aten.le.Scalar",
    "aten.lift_fresh_copy.default", "aten.log.default", "aten.log_softmax.int", "aten.logical_and.default",
    "aten.logical_not.default", "aten.logical_or.default", "aten.logical_xor.default", "aten.lt.Scalar",
    "aten.lt.Tensor", "aten.masked_fill.Scalar", "aten.masked_fill.Tensor", "aten.maximum.default",
    "aten.mean.default", "aten.minimum.default", "aten.mm.default", "aten.mul.Scalar", "aten.ne.Tensor",
    "aten.new_full.default", "aten.new_zeros.default", "aten.numpy_T.default", "aten.ones_like.default",
    "aten.permute.default", "aten.pow.Tensor_Tensor", "aten.prod.dim_int", "aten.reciprocal.default",
    "aten.remainder.Scalar", "aten.remainder.Tensor", "aten.round.default", "aten.rsub.Scalar", "aten.rsub.Tensor",
    "aten.scalar_tensor.default", "aten.select.int", "aten.sigmoid.default", "aten.sign.default",
    "aten.split_with_sizes.default", "aten.sqrt.default", "aten.squeeze.default", "aten.squeeze.dim",
    "aten.squeeze.dims", "aten.sub.Scalar", "aten.sum.default", "aten.sym_constrain_range.default",
    "aten.sym_constrain_range_for_size.default", "aten.sym_numel.default", "aten.t.default", "aten.where.Scalar",
    "aten.where.ScalarSelf", "aten.where.self", "aten.zeros_like.default",
})

ATEN_OPS: frozenset[str] = CAPTURED | LOWERED

_NUMBERS = (int, float, bool, torch.SymInt, torch.SymFloat, torch.SymBool)


def _numbers_only(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` restricted to scalar operands (ints, floats, bools and their symbolic forms)."""

    def call(*args: Any) -> Any:
        for a in args:
            if not isinstance(a, _NUMBERS):
                raise TypeError(f"{fn.__module__}.{fn.__name__} takes numbers in lowbit IR, got {type(a).__name__}")
        return fn(*args)

    call.__name__ = call.__qualname__ = fn.__name__
    call.__doc__ = fn.__doc__
    return call


PY_FUNCTIONS: dict[str, Callable[..., Any]] = {
    name: _numbers_only(fn) for name, fn in {
        "operator.add": operator.add, "operator.sub": operator.sub, "operator.mul": operator.mul,
        "operator.floordiv": operator.floordiv, "operator.truediv": operator.truediv, "operator.mod": operator.mod,
        "operator.neg": operator.neg, "operator.pos": operator.pos, "operator.abs": operator.abs,
        "operator.eq": operator.eq, "operator.ne": operator.ne, "operator.lt": operator.lt, "operator.le": operator.le,
        "operator.gt": operator.gt, "operator.ge": operator.ge, "operator.not_": operator.not_,
        "math.ceil": math.ceil, "math.floor": math.floor, "math.trunc": math.trunc, "math.sqrt": math.sqrt,
        "torch.sym_int": torch.sym_int, "torch.sym_float": torch.sym_float, "torch.sym_max": torch.sym_max,
        "torch.sym_min": torch.sym_min, "torch.sym_not": torch.sym_not, "torch.sym_ite": torch.sym_ite,
    }.items()
}
"""Python functions capture records on symbolic ints (``_op_name``: ``operator``, ``math``, ``torch``)."""
