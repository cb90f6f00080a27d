"""Norm + activation quantize fusion: an RMSNorm whose readers all quantize its output per token computes the
codes once, and those readers take the codes.

A W8A8/FP8/W4A8 ``qlinear`` quantizes its input itself (``dynamic_qparams → quantize → dequantize``): after
``merge-linears`` one qlinear reads each norm, but the norm still writes the activation in bf16 and the GEMM's
prologue reads it back to find each row's absmax, then again to quantize it. Fused, one kernel reads the
residual stream once and writes int8/fp8 codes and per-token scales::

    %xq, %xs = rms_norm_quant(%h, @norm.weight, eps=1e-05, compute_dtype=f32, a_qdtype="int8", a_block_size=None)
    %y = qlinear_q(%xq, %xs, @w.qdata, @w.scale, None, None, w_qdtype="int8", ..., x_dtype=bf16, out_dtype=bf16)

Both ops' references are the ops they replace, in the same order, so the rewrite is exact:
``rms_norm_quant`` = ``rms_norm`` then ``dynamic_qparams(per_token, symmetric)`` then ``quantize``; ``qlinear_q``
= ``dequantize`` of the codes (to the norm's dtype ``x_dtype``) and the weight, then ``linear`` — what ``qlinear``
computes after its own quantize. ``NORM_QUANT_RULES`` is the table (norm op × activation format); a norm with
any reader that is not such a qlinear of one scheme is declined (stats say why): computing the norm twice
would cost what the fusion saves.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from lowbit.ir.graph import Graph, Node, TensorType, Value
from lowbit.ir.ops import llama_gain_form, register_op, rms_norm
from lowbit.ir.quant import ceil_div_dim, dequantize, dynamic_qparams, get_qdtype, quantize

__all__ = ["NORM_QUANT_RULES", "NormQuantRule", "NormQuantStats", "fuse_norm_quant", "qlinear_q",
           "rms_norm_quant", "unfuse_norm_quant"]


@register_op("rms_norm_quant", num_outputs=2)
def rms_norm_quant(
    x: torch.Tensor,
    weight: torch.Tensor | None = None,
    *,
    eps: float,
    compute_dtype: torch.dtype | None = None,
    a_qdtype: str,
    a_block_size: int | None = None,
    offset: float = 0.0,
    gain_in_compute: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm then symmetric per-token dynamic quantization: (codes, fp32 scales), exactly the unfused ops."""
    h = rms_norm(x, weight, eps=eps, compute_dtype=compute_dtype, offset=offset, gain_in_compute=gain_in_compute)
    scale, _ = dynamic_qparams(h, qdtype=a_qdtype, granularity="per_token", symmetric=True, axis=-1,
                               block_size=a_block_size)
    return quantize(h, scale, None, qdtype=a_qdtype, axis=-1, block_size=a_block_size), scale


@register_op("qlinear_q")
def qlinear_q(
    xq: torch.Tensor,
    x_scale: torch.Tensor,
    qweight: torch.Tensor,
    w_scale: torch.Tensor,
    w_zero_point: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    *,
    w_qdtype: str,
    w_axis: int | None = 0,
    w_block_size: int | None = None,
    a_qdtype: str,
    a_block_size: int | None = None,
    x_dtype: torch.dtype = torch.float32,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """A qlinear whose input arrives quantized (codes + per-token scales): dequantize both, then linear."""
    w = dequantize(qweight, w_scale, w_zero_point, qdtype=w_qdtype, axis=w_axis, block_size=w_block_size,
                   out_dtype=out_dtype)
    x = dequantize(xq, x_scale, None, qdtype=a_qdtype, axis=-1, block_size=a_block_size, out_dtype=x_dtype)
    return torch.ops.aten.linear.default(x, w, bias)


@dataclass(frozen=True)
class NormQuantRule:
    """One row: a norm op whose readers are all qlinears with dynamic symmetric per-token ``a_qdtypes``."""

    name: str
    norm: str
    fused: str
    a_qdtypes: tuple[str, ...]


NORM_QUANT_RULES: tuple[NormQuantRule, ...] = (
    NormQuantRule("rms_norm+int8", "rms_norm", "rms_norm_quant", ("int8",)),
    NormQuantRule("rms_norm+fp8", "rms_norm", "rms_norm_quant", ("fp8e4m3",)),
)
"""The norm → activation-quantize table (``fuse_norm_quant`` runs every row)."""


@dataclass
class NormQuantStats:
    fused: dict[str, int]
    readers: dict[str, int]
    declined: dict[str, str]

    @property
    def total(self) -> int:
        return sum(self.fused.values())


_A_SCHEME = ("a_qdtype", "a_block_size")


def _reader_scheme(node: Node, x: Value) -> tuple[Any, ...] | str:
    """The activation scheme a qlinear reader quantizes ``x`` with, or why it cannot take codes."""
    if node.op != "qlinear":
        return f"read by {node.op} %{node.name}"
    kw = node.kwargs
    if node.args[0] is not x or any(a is x for a in node.args[1:]) or set(node.kwargs) & {"x", "a_scale"}:
        return f"%{node.name} reads it as another operand"
    if kw.get("a_qdtype") is None:
        return f"%{node.name} is weight-only"
    if (kw.get("a_granularity", "per_token") != "per_token" or not kw.get("a_symmetric", True)
            or node.arg(5, "a_scale") is not None):
        return f"%{node.name} quantizes it {kw.get('a_granularity')} symmetric={kw.get('a_symmetric')} (static?)"
    return tuple(kw.get(k) for k in _A_SCHEME)


def fuse_norm_quant(graph: Graph, rules: tuple[NormQuantRule, ...] = NORM_QUANT_RULES,
                    accept: Any = None) -> NormQuantStats:
    """Rewrite every norm whose readers all quantize its output the same way (in place; the norm node is left
    dead for DCE). ``accept(node)`` restricts which norms may fuse (a pass's module scope)."""
    stats = NormQuantStats({}, {}, {})
    users = graph.users()
    outputs = graph.output_ids()
    by_norm = {r.norm for r in rules}
    for norm in list(graph.nodes):
        if norm.op not in by_norm or len(norm.outputs) != 1 or (accept is not None and not accept(norm)):
            continue
        h = norm.output
        readers = users.get(id(h), [])
        if not readers or id(h) in outputs:
            continue
        if not llama_gain_form(norm.kwargs, norm.arg(1, "weight") is not None):
            stats.declined[norm.name] = "its gain applies before the cast back (Gemma's form): no fused kernel"
            continue
        schemes = {_reader_scheme(r, h) for r in readers}
        if any(isinstance(s, str) for s in schemes) or len(schemes) != 1:
            if any(r.op == "qlinear" and r.kwargs.get("a_qdtype") for r in readers):  # only report near misses
                why = next((s for s in schemes if isinstance(s, str)), "readers quantize it differently")
                stats.declined[norm.name] = why
            continue
        a_qdtype, a_block = next(iter(schemes))
        rule = next((r for r in rules if r.norm == norm.op and a_qdtype in r.a_qdtypes), None)
        if rule is None or not isinstance(h.type, TensorType):
            stats.declined[norm.name] = f"no row for {norm.op} with activations {a_qdtype}"
            continue
        qd = get_qdtype(a_qdtype)
        if qd.packed:
            stats.declined[norm.name] = f"packed activation codes {a_qdtype}"
            continue
        shape = tuple(h.type.shape)
        sshape = (*shape[:-1], ceil_div_dim(shape[-1], a_block) if a_block else 1)
        fused = graph.make_node(rule.fused, norm.args, {**norm.kwargs, "a_qdtype": a_qdtype,
                                                        "a_block_size": a_block},
                                name=f"{norm.output.name}_q",
                                types=[TensorType(qd.storage_dtype, shape), TensorType(torch.float32, sshape)],
                                module=norm.module)
        fused.meta["fused"] = f"{norm.op}+dynamic_qparams+quantize"
        graph.insert_after(norm, fused)
        xq, xs = fused.outputs
        for r in readers:
            kw = {k: r.kwargs[k] for k in ("w_qdtype", "w_axis", "w_block_size") if k in r.kwargs}
            kw.update(a_qdtype=a_qdtype, a_block_size=a_block, x_dtype=h.type.dtype,
                      out_dtype=r.kwargs.get("out_dtype", torch.float32))
            args = (xq, xs, r.args[1], r.args[2], r.arg(3, "w_zero_point"), r.arg(4, "bias"))
            q = Node("qlinear_q", args, kw, module=r.module, meta=dict(r.meta))
            q.meta["fused"] = "quantized input: " + r.meta.get("fused", "qlinear")
            out = r.output
            r.outputs = []
            q.add_output(out)
            graph.nodes[graph.index(r)] = q
        stats.fused[rule.name] = stats.fused.get(rule.name, 0) + 1
        stats.readers[rule.name] = stats.readers.get(rule.name, 0) + len(readers)
    return stats


def unfuse_norm_quant(graph: Graph) -> int:
    """The inverse of ``fuse_norm_quant`` (in place): each fused norm is the plain norm again and each ``qlinear_q``
    the ``qlinear`` it was, quantizing that output itself (the same ops, so outputs are unchanged). For writers
    that store the unfused form (the HF checkpoint formats); returns how many norms were unfused."""
    count = 0
    for fused in [n for n in graph.nodes if n.op in {r.fused: r for r in NORM_QUANT_RULES}]:
        rule = next(r for r in NORM_QUANT_RULES if r.fused == fused.op)
        xq, xs = fused.outputs
        kw = {k: v for k, v in fused.kwargs.items() if k not in ("a_qdtype", "a_block_size")}
        readers = [n for n in graph.nodes if n.op == "qlinear_q" and n.args[0] is xq]
        dtype = readers[0].kwargs.get("x_dtype", torch.float32) if readers else torch.float32
        norm = graph.make_node(rule.norm, fused.args, kw, name=f"{fused.name}_norm",
                               type=TensorType(dtype, tuple(xq.tensor_type.shape)), module=fused.module)
        graph.insert_before(fused, norm)
        for r in readers:
            kw_r = {k: r.kwargs[k] for k in ("w_qdtype", "w_axis", "w_block_size") if k in r.kwargs}
            kw_r.update(a_qdtype=r.kwargs["a_qdtype"], a_granularity="per_token", a_symmetric=True,
                        a_block_size=r.kwargs.get("a_block_size"), out_dtype=r.kwargs.get("out_dtype", torch.float32))
            q = Node("qlinear", (norm.output, *r.args[2:6]), kw_r, module=r.module, meta=dict(r.meta))
            out = r.output
            r.outputs = []
            q.add_output(out)
            graph.nodes[graph.index(r)] = q
        graph.remove(fused)
        count += 1
    return count
