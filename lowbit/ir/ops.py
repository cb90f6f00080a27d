"""lowbit's semantic ops and their reference implementations.

A semantic op names what a group of ATen calls means (``rms_norm`` instead of seven ATen nodes), so
passes can find what they rewrite and backends can map it to one kernel. Each op has a plain-torch
reference here that computes *exactly* what the ATen calls it replaces computed (same calls, same
order), so raising never changes a single bit of the model's output. Any op string that is not
registered here is an ATen overload (``aten.mul.Tensor``) or a Python operator on symbolic ints, and
is run as such.

IR text is read from files other people wrote, and the verifier runs every node (on meta tensors) before any
pass, so an op name must never reach an arbitrary callable: ``resolve`` answers only for the ops registered
here (``register_op``, the way to add an op), the ATen overloads in ``allowlist.ATEN_OPS`` (what capture
and raising emit, see ``tools/aten_allowlist.py``) and the Python functions on symbolic ints in
``allowlist.PY_FUNCTIONS``. The parser refuses any other name (``check_op``) before a graph exists.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from lowbit.errors import UntrustedInputError
from lowbit.ir.allowlist import ATEN_OPS, PY_FUNCTIONS

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
    offset: float = 0.0,
    gain_in_compute: bool = False,
) -> torch.Tensor:
    """RMSNorm as HF Llama computes it: statistics in ``compute_dtype``, gain applied in the input dtype.

    ``offset``, ``gain_in_compute``: Gemma's form, whose gain is ``offset + weight`` (``1 + w``, weights stored
    around 0) applied in the compute dtype before the cast back (HF's ``(x * (1 + w.float())).type_as(x)``).
    ``offset`` is how the architecture stores the gain, kept when a pass removes or rewrites the weight (a norm
    without a weight has gain 1, whatever its offset): passes read and write the gain through ``norm_gain`` /
    ``gain_weight``, checkpoints write the weight as stored."""
    in_dtype = x.dtype
    xc = x.to(compute_dtype) if compute_dtype is not None and compute_dtype != in_dtype else x
    var = aten.mean.dim(aten.pow.Tensor_Scalar(xc, 2), [-1], True)
    y = aten.mul.Tensor(xc, aten.rsqrt.default(aten.add.Tensor(var, eps)))
    gain = None
    if weight is not None:
        w = weight.to(y.dtype) if gain_in_compute and weight.dtype != y.dtype else weight
        gain = aten.add.Tensor(w, offset) if offset else w
        if gain_in_compute:
            y, gain = aten.mul.Tensor(y, gain), None
    if y.dtype != in_dtype:
        y = y.to(in_dtype)
    return y if gain is None else aten.mul.Tensor(gain, y)


def llama_gain_form(kwargs: dict, has_weight: bool) -> bool:
    """Whether an ``rms_norm``'s gain is applied as Llama's — the weight as stored, after the cast back, which is
    what the fused norm kernels compute — rather than Gemma's (``offset + w`` before the cast). A norm without a
    weight has gain 1 in either form."""
    return not has_weight or not (kwargs.get("offset") or kwargs.get("gain_in_compute"))


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

    # made outside inference mode whatever the caller's: a matrix first cached under torch.inference_mode (a
    # perplexity or debug compare of a rotated model) cannot be saved for backward by a learned rotation later
    with torch.inference_mode(False):
        return orthogonal_hadamard(n, torch.float64).to(device=device, dtype=dtype)


@register_op("hadamard")
def hadamard(x: torch.Tensor) -> torch.Tensor:
    """x·H/sqrt(n) along the last axis (n = its size, H from lowbit.ir.hadamard): an online rotation."""
    from lowbit.ir.hadamard import hadamard_order_split

    n = x.shape[-1]
    # checked on meta tensors too, so the verifier names the node: an integer x would be multiplied by H/sqrt(n)
    # rounded to integers (zeros), and a size with no construction ran until the first real input
    if not x.is_floating_point():
        raise TypeError(f"hadamard rotates floating-point values, got {x.dtype}")
    hadamard_order_split(int(n))
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


class UnknownOpError(UntrustedInputError, KeyError):
    """An op name that is neither registered nor allowlisted (a ``KeyError`` for older callers)."""

    def __str__(self) -> str:  # KeyError's str() would quote the message
        return str(self.args[0]) if self.args else ""


def check_op(op: str) -> str | None:
    """Why ``op`` may not run, or None when it is a registered op, an allowlisted ATen overload or an
    allowlisted Python function."""
    if op in OPS or op in ATEN_OPS or op in PY_FUNCTIONS:
        return None
    if op.startswith("aten.") or op.startswith("torch.ops."):
        return (f"op {op!r} is not in lowbit's ATen allowlist (the overloads capture emits; "
                "lowbit.ir.allowlist.ATEN_OPS); register a semantic op with register_op to add one")
    if op.split(".")[0] in ("operator", "math", "torch"):
        return f"op {op!r} is not one of the Python functions on symbolic ints lowbit runs (allowlist.PY_FUNCTIONS)"
    return f"unknown op {op!r}: not a lowbit op ({', '.join(sorted(OPS))}), nor an allowlisted ATen overload"


def resolve(op: str) -> Callable[..., Any]:
    """The callable that runs ``op``: a registered semantic op, an allowlisted ATen overload or an allowlisted
    Python function on symbolic ints; anything else raises ``UnknownOpError`` and nothing is looked up."""
    if op in OPS:
        return OPS[op].fn
    if op in PY_FUNCTIONS:
        return PY_FUNCTIONS[op]
    if op in ATEN_OPS:
        _, name, overload = op.split(".")
        try:
            return getattr(getattr(aten, name), overload)
        except (AttributeError, RuntimeError) as exc:
            raise UnknownOpError(f"op {op!r} is allowlisted but this torch has no such overload") from exc
    raise UnknownOpError(check_op(op))


def is_semantic(op: str) -> bool:
    return op in OPS

