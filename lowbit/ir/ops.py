"""lowbit's semantic ops and their reference implementations.

A semantic op names what a group of ATen calls means (``rms_norm`` instead of seven ATen nodes), so
passes can find what they rewrite and backends can map it to one kernel. Each op has a plain-torch
reference here that computes *exactly* what the ATen calls it replaces computed (same calls, same
order), so raising never changes a single bit of the model's output. Any op string that is not
registered here is an ATen overload (``aten.mul.Tensor``) or a Python operator on symbolic ints, and
is run as such.
"""

from __future__ import annotations

import functools
import importlib
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

aten = torch.ops.aten


@dataclass(frozen=True)
class OpDef:
    name: str
    fn: Callable[..., Any]
    doc: str
    num_outputs: int = 1


OPS: dict[str, OpDef] = {}


def register_op(name: str, num_outputs: int = 1) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a semantic op; its docstring's first line is what `lowbit passes`-style listings show."""

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        if name in OPS:
            raise ValueError(f"op {name!r} registered twice")
        OPS[name] = OpDef(name, fn, (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else "", num_outputs)
        return fn

    return deco


@register_op("linear")
def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x·Wᵀ + b, W is [out, in]."""
    return aten.linear.default(x, weight, bias)


@register_op("matmul")
def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Batched matrix product of two activations."""
    return aten.matmul.default(a, b)


@register_op("embedding")
def embedding(weight: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Row lookup of ``ids`` in ``weight``."""
    return aten.embedding.default(weight, ids)


@register_op("rms_norm")
def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None = None,
    *,
    eps: float,
    compute_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """RMSNorm as HF Llama computes it: statistics in ``compute_dtype``, gain applied in the input dtype."""
    in_dtype = x.dtype
    xc = x.to(compute_dtype) if compute_dtype is not None and compute_dtype != in_dtype else x
    var = aten.mean.dim(aten.pow.Tensor_Scalar(xc, 2), [-1], True)
    y = aten.mul.Tensor(xc, aten.rsqrt.default(aten.add.Tensor(var, eps)))
    if y.dtype != in_dtype:
        y = y.to(in_dtype)
    return y if weight is None else aten.mul.Tensor(weight, y)


@register_op("layer_norm")
def layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    *,
    normalized_shape: list[int],
    eps: float,
) -> torch.Tensor:
    """LayerNorm over the trailing ``normalized_shape`` dims."""
    return aten.layer_norm.default(x, normalized_shape, weight, bias, eps)


@register_op("attention")
def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    is_causal: bool = False,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """Scaled dot-product attention, q/k/v are [batch, heads, seq, head_dim]."""
    return aten.scaled_dot_product_attention.default(
        q, k, v, mask, 0.0, is_causal, scale=scale, enable_gqa=enable_gqa
    )


@register_op("rotary")
def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding, rotate-half form: x·cos + rotate_half(x)·sin."""
    half = x.shape[-1] // 2
    rotated = aten.cat.default([aten.neg.default(x[..., half:]), x[..., :half]], -1)
    return aten.add.Tensor(aten.mul.Tensor(x, cos), aten.mul.Tensor(rotated, sin))


@functools.lru_cache(maxsize=64)
def _hadamard_const(n: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    from lowbit.ir.hadamard import hadamard as orthogonal_hadamard

    return orthogonal_hadamard(n, torch.float64).to(device=device, dtype=dtype)


@register_op("hadamard")
def hadamard(x: torch.Tensor) -> torch.Tensor:
    """x·H/sqrt(n) along the last axis (n = its size, H from lowbit.ir.hadamard): an online rotation."""
    n = x.shape[-1]
    if x.device.type == "meta":
        return aten.matmul.default(x, torch.empty(n, n, dtype=x.dtype, device="meta"))
    return aten.matmul.default(x, _hadamard_const(int(n), x.dtype, str(x.device)))


@register_op("softmax")
def softmax(x: torch.Tensor, *, dim: int) -> torch.Tensor:
    """Softmax along ``dim``."""
    return aten._softmax.default(x, dim, False)


@register_op("silu")
def silu(x: torch.Tensor) -> torch.Tensor:
    """x·sigmoid(x)."""
    return aten.silu.default(x)


@register_op("gelu")
def gelu(x: torch.Tensor, *, approximate: str = "none") -> torch.Tensor:
    """GELU, exact or tanh-approximated."""
    return aten.gelu.default(x, approximate=approximate)


@register_op("add")
def add(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise sum of two tensors."""
    return aten.add.Tensor(a, b)


@register_op("residual_add")
def residual_add(stream: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
    """The residual stream plus a block's output (the place rotations must stay consistent across)."""
    return aten.add.Tensor(stream, update)


@register_op("mul")
def mul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise product of two tensors."""
    return aten.mul.Tensor(a, b)


@register_op("reshape")
def reshape(x: torch.Tensor, shape: list[Any]) -> torch.Tensor:
    """Reshape (view semantics are irrelevant without mutation)."""
    return aten.reshape.default(x, shape)


@register_op("transpose")
def transpose(x: torch.Tensor, dim0: int, dim1: int) -> torch.Tensor:
    """Swap two dims."""
    return aten.transpose.int(x, dim0, dim1)


@register_op("permute")
def permute(x: torch.Tensor, dims: list[int]) -> torch.Tensor:
    """Reorder dims."""
    return aten.permute.default(x, dims)


_PY_NAMESPACES = {"operator": operator, "math": importlib.import_module("math"), "torch": torch}


def resolve(op: str) -> Callable[..., Any]:
    """The callable that runs ``op``: a semantic op, an ATen/other torch.ops overload, or a Python operator."""
    if op in OPS:
        return OPS[op].fn
    parts = op.split(".")
    head = parts[0]
    if head in _PY_NAMESPACES:
        obj: Any = _PY_NAMESPACES[head]
        for p in parts[1:]:
            obj = getattr(obj, p, None)
            if obj is None:
                break
        if obj is not None:
            return obj
    elif len(parts) == 3:
        ns, name, overload = parts
        try:
            return getattr(getattr(getattr(torch.ops, ns), name), overload)
        except (AttributeError, RuntimeError):
            pass
    raise KeyError(
        f"unknown op {op!r}: not a lowbit op ({', '.join(sorted(OPS))}), "
        "nor a torch.ops overload 'ns.name.overload', nor an operator.* function"
    )


def is_semantic(op: str) -> bool:
    return op in OPS


from lowbit.ir import quant as _quant  # noqa: E402,F401 registers the QDQ ops
