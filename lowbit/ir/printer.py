"""Stable text form of the IR; ``lowbit.ir.parser`` reads it back (golden-IR tests compare this text).

    graph main(%ids: i64[1,s0]) {
      symbol s0 in [2, 8192] hint 16
      param @model.norm.weight: f32[576]
      %embedding: f32[1,s0,576] = embedding(@lm_head.weight, %ids)  # model.embed_tokens
      %rms_norm: f32[1,s0,576] = rms_norm(%embedding, @w, eps=1e-05, compute_dtype=f32)  # model.norm
      return %rms_norm
    }

A fused node's comment also says what it replaced: ``# model.layers.0.mlp.down_proj | fused dequantize+linear``;
a horizontally merged one also lists its members' modules: ``... | merged ["model.layers.0.self_attn.q_proj", ...]``;
a linear ``sparsify`` pruned, its pattern: ``... | sparsity 2:4``; an attention ``quantize(kv=...)`` quantized, its
KV scheme: ``... | qscheme_kv k:int4-asym-tok16-dyn v:int4-asym-tok16-dyn window:0 sink:0``.

Names: ``%x``, ``@model.norm.weight`` and the graph's as they are; one the parser would not read back bare (a space,
a colon, a non-ASCII letter: a ``ModuleDict`` key) as a JSON string, ``@"d.my layer.weight"``, ``graph "my model"(``.

A saved file (``model.lowbit``, a reproducer's ``before.lowbit``) starts with ``# lowbit IR version N``
(``IR_VERSION``): a comment, so a lowbit that predates it still reads the file, and the parser refuses a version newer
than its own; text without the line (older files, golden tests) is read as version 1.

Literals: ints, floats (``inf``, ``-inf``, ``nan``), ``True``/``False``/``None``, JSON strings, dtypes by
short name (``f32``), ``device("cpu")``, memory formats and layouts by name, lists in brackets.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

import torch

from lowbit.ir.graph import DTYPE_NAMES, Graph, Node, Value, graph_ref, value_ref

IR_VERSION = 1
"""The text form's version, written first in saved files; raise it when a change makes older lowbits misread text."""
VERSION_LINE = "# lowbit IR version "

ENUM_LITERALS: dict[Any, str] = {
    torch.strided: "strided",
    torch.sparse_coo: "sparse_coo",
    torch.contiguous_format: "contiguous_format",
    torch.preserve_format: "preserve_format",
    torch.channels_last: "channels_last",
}


def format_literal(x: Any) -> str:
    if isinstance(x, Value):
        return repr(x)
    if x is None or isinstance(x, bool):
        return repr(x)
    if isinstance(x, int):
        return str(x)
    if isinstance(x, float):
        if math.isnan(x):
            return "nan"
        if math.isinf(x):
            return "inf" if x > 0 else "-inf"
        return repr(x)
    if isinstance(x, str):
        return json.dumps(x)
    if isinstance(x, torch.dtype):
        return DTYPE_NAMES[x]
    if isinstance(x, torch.device):
        return f'device("{x}")'
    if isinstance(x, (list, tuple)):
        return "[" + ", ".join(format_literal(e) for e in x) + "]"
    for k, name in ENUM_LITERALS.items():
        if x is k:
            return name
    raise TypeError(f"cannot print literal {x!r} of type {type(x).__name__}")


def format_type(t: Any) -> str:
    """A value's type; ``?`` where it is unknown (the parser reads ``?``, not ``None``)."""
    return "?" if t is None else str(t)


_PLAIN_MODULE = re.compile(r'[^\s"|](?:[^|\n\r\x0b\x0c\x1c-\x1e\x85\u2028\u2029]*[^\s|])?')


def format_module(module: str) -> str:
    """A module path as the node's comment: as is, or as a JSON string where the plain text would not read back
    (a line break, edge spaces, a ``|`` or a leading quote in a name a model chose)."""
    return module if not module or _PLAIN_MODULE.fullmatch(module) else json.dumps(module)


def format_node(node: Node) -> str:
    lhs = ", ".join(f"{v!r}: {format_type(v.type)}" for v in node.outputs)
    operands = [format_literal(a) for a in node.args]
    operands += [f"{k}={format_literal(v)}" for k, v in node.kwargs.items()]
    text = f"{lhs} = {node.op}({', '.join(operands)})"
    if node.module or any(node.meta.get(k) for k in ("fused", "merged", "sparsity", "qscheme_kv")):
        text += f"  # {format_module(node.module)}"
    if node.meta.get("fused"):  # what a fusion replaced (lowbit.ir.fusion); the parser reads it back
        text += f" | fused {node.meta['fused']}"
    if node.meta.get("merged"):  # the member modules of a horizontal merge: what unmerging (HF saves) needs back
        text += f" | merged {json.dumps(list(node.meta['merged']))}"
    if node.meta.get("sparsity"):  # the pattern sparsify pruned to: a later gptq/distill keeps those zeros
        text += f" | sparsity {node.meta['sparsity']}"
    if node.meta.get("qscheme_kv"):  # the kv accuracy model quantize(kv=) wrote: the kv-cache pass refuses it
        text += f" | qscheme_kv {node.meta['qscheme_kv']}"
    return text


def print_graph(graph: Graph, *, filter: str | None = None, params: bool = True, version: bool = False) -> str:
    """Render ``graph`` as text; ``filter`` keeps only nodes whose module path matches the regex; ``version`` starts
    it with the ``# lowbit IR version`` line a saved file carries."""
    rx = re.compile(filter) if filter else None
    ins = ", ".join(f"{v!r}: {format_type(v.type)}" for v in graph.inputs)
    lines = [f"{VERSION_LINE}{IR_VERSION}"] if version else []
    lines.append(f"graph {graph_ref(graph.name)}({ins}) {{")
    for s in graph.symbols.values():
        rng = f" in [{s.min if s.min is not None else '?'}, {s.max if s.max is not None else '?'}]"
        hint = f" hint {s.hint}" if s.hint is not None else ""
        lines.append(f"  symbol {s.name}{rng}{hint}")
    if params:
        for name, v in graph.params.items():
            lines.append(f"  param {value_ref(name, param=True)}: {format_type(v.type)}")
    for n in graph.nodes:
        if rx is not None and not rx.search(n.module):
            continue
        lines.append("  " + format_node(n))
    lines.append("  return " + ", ".join(repr(v) for v in graph.outputs))
    lines.append("}")
    return "\n".join(lines) + "\n"
