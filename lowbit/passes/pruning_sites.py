"""Where structured pruning can cut, found in the IR (analysis only; the ``prune-*`` passes transform).

- ``MLPSite``: a ``down_proj`` linear whose input is an elementwise product/activation of ``gate``/``up``
  linears (SwiGLU) or one linear through an activation (GELU MLP). Removing intermediate channel j removes row
  j of every producer linear (and its bias) and column j of ``down``; the elementwise ops in between act per
  channel, so the result equals the dense graph with those rows zeroed and those columns zeroed. A fused gate/up
  linear split into equal parts along its last dim (Phi-3's ``gate_up_proj``) loses row j of each part.
- ``AttentionSite``: an ``attention`` node with the q/k/v linears that feed it (through reshape, transpose,
  rotary, and the unsqueeze/expand/reshape of grouped-query attention) and the ``o_proj`` that reads it.
  The unit of removal is a GQA group: one kv head and the ``q_heads / kv_heads`` query heads that share it.
  A fused q/k/v linear sliced along its last dim (Phi-3's ``qkv_proj``) loses the group's rows of each of its three
  parts, and the slices' bounds move with them; one split into three equal parts (GPT-2's ``c_attn``) likewise (the
  split re-derived), and one viewed per head and chunked (GPT-NeoX's) loses the head's ``3·head_dim`` rows.
  In a generation step graph the keys and values reach the attention through ``scatter`` into the layer's KV
  cache (a graph input ``[B, kv_heads, S, head_dim]``); the site records the two scatters, whose caches and
  index then shrink with the kv heads.
- ``block_residuals``: the ``residual_add`` nodes of a block (or its block-level ``add(stream, update)`` nodes where
  its updates are normalised or scaled first); removing the block makes each a pass-through.

A structure that does not match (an op in the chain the walk does not know) is reported, never guessed.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TypeVar

import torch

from lowbit.calibration.engine import BLOCK_PATTERN, split_stages
from lowbit.ir.graph import Graph, Node, TensorType, Value
from lowbit.passes.base import PassError, nonfinite_problem

__all__ = ["DOWN_PROJECTIONS", "MLPSite", "AttentionSite", "find_mlp_sites", "find_attention_sites", "block_of",
           "slice_linear_rows", "slice_linear_cols", "block_residuals", "stream_first", "bypass_problem",
           "linear_params", "refuse_nonfinite_weights", "sites_in_modules", "unit_columns", "kept_rows",
           "slice_unit_rows"]

_ELEMENTWISE = {"mul", "silu", "gelu", "aten.mul.Tensor", "aten.silu.default", "aten.gelu.default",
                "aten.relu.default", "relu", "add", "aten.add.Tensor", "aten.tanh.default", "aten.pow.Tensor_Scalar",
                "aten.sigmoid.default"}
"""Ops an MLP's intermediate channels pass through one by one, so cutting channel j of the producers cuts it of the
output: the activations, and the scalar arithmetic of an activation written out (GPT-2's tanh GELU
``0.5·x·(1 + tanh(0.798·(x + 0.0447·x³)))``)."""
_PASS_THROUGH = {"reshape", "transpose", "aten.unsqueeze.default", "aten.expand.default", "aten.clone.default",
                 "aten.contiguous.default", "aten.view.default", "aten.reshape.default", "aten._unsafe_view.default",
                 "permute"}


DOWN_PROJECTIONS = ("down_proj", "fc2", "output.dense", "mlp.c_proj", "dense_4h_to_h", "mlp.fc_out", "ffn.lin2")
"""Module names of an MLP's output projection: Llama-style, OPT/Phi, BERT; StarCoder2/GPT-2 (``mlp.c_proj``, not
the attention's ``attn.c_proj``), GPT-NeoX/Falcon/Bloom, GPT-J, DistilBERT."""


def block_of(module: str) -> str | None:
    m = re.match(BLOCK_PATTERN, module)
    return m.group(1) if m else None


@dataclass
class MLPSite:
    block: str
    down: Node
    producers: list[Node]
    """Linears whose output rows are the intermediate channels (gate, up)."""
    rows: list[tuple[Node, int]] = field(default_factory=list)
    """Each part of the producers' rows that is one copy of the channels: ``(producer, its first row)``. A separate
    gate or up linear is one part at row 0; a fused one (Phi-3's ``gate_up_proj``, split into equal halves) is one
    part per piece of the split. Empty: one part at row 0 per producer."""

    def __post_init__(self) -> None:
        if not self.rows:
            self.rows = [(p, 0) for p in self.producers]

    @property
    def width(self) -> int:
        return int(self.down.args[1].data.shape[1])

    def row_groups(self) -> list[tuple[Node, int, int]]:
        """``(producer, rows per channel, first row)`` of each part: what removing a channel removes."""
        return [(p, 1, first) for p, first in self.rows]


@dataclass
class AttentionSite:
    block: str
    attention: Node
    q: Node
    k: Node
    v: Node
    o: Node
    q_heads: int
    kv_heads: int
    head_dim: int
    cache_writes: tuple[Node, ...] = ()
    """Step graphs: the ``scatter`` nodes writing the new keys and values into the cache inputs (k, v)."""
    offsets: tuple[int, int, int] = (0, 0, 0)
    """The first row of q's, k's and v's part of their linears (nonzero where q, k and v are one fused linear)."""
    slices: tuple[Node, Node, Node] | None = None
    """A fused q/k/v linear (Phi-3's ``qkv_proj``): the last-dim slices that take q, k and v out of its output, whose
    bounds follow the cut."""
    interleaved: bool = False
    """A fused q/k/v linear whose rows hold each head's q, k and v together (GPT-NeoX's ``query_key_value``, viewed
    as ``[.., heads, 3·head_dim]`` and chunked): a head is ``3·head_dim`` consecutive rows; with groups (Falcon's
    grouped ``query_key_value``), a kv group is ``(group_size + 2)·head_dim``: its query heads, key and value."""
    group_view: Node | None = None
    """Falcon's grouped layout: the reshape viewing the fused output ``[.., kv_heads, group_size + 2, head_dim]``,
    whose kv-group literal the cut rewrites (its ``-1`` is the group's width, which stays: shape re-inference alone
    would keep the group count and halve each group)."""

    @property
    def group_size(self) -> int:
        return self.q_heads // self.kv_heads

    def row_groups(self) -> list[tuple[Node, int, int]]:
        """``(linear, rows per kv-head group, first row)`` of q, k and v: what removing a group removes."""
        if self.interleaved:
            return [(self.q, (self.group_size + 2) * self.head_dim, 0)]
        return [(self.q, self.group_size * self.head_dim, self.offsets[0]), (self.k, self.head_dim, self.offsets[1]),
                (self.v, self.head_dim, self.offsets[2])]


def _stored_linear(n: Node | None) -> bool:
    return n is not None and n.op == "linear" and isinstance(n.args[1], Value) and n.args[1].is_param and (
        len(n.args) < 3 or n.args[2] is None or n.args[2].is_param)


def _keeps_last_dim(n: Node) -> bool:
    """A layout op whose output's last dim is its input's, unmoved (a reshape that only merges or splits the leading
    dims): channel j stays channel j."""
    if n.op in ("transpose", "permute", "aten.expand.default", "aten.unsqueeze.default"):
        return False
    src, out = n.args[0], n.outputs[0]
    if not isinstance(src, Value):
        return False
    a, b = src.tensor_type.shape, out.tensor_type.shape
    return bool(a) and bool(b) and isinstance(a[-1], int) and a[-1] == b[-1]


_SPLIT_OPS = ("aten.split.Tensor", "aten.split_with_sizes.default", "split", "aten.chunk.default",
              "aten.unbind.int")


def _fused_projection(stop: Node) -> Node | None:
    """The stored linear a split the head walk stopped at divides (through layout ops): q, k and v computed by one
    fused projection, or None."""
    if stop.op not in _SPLIT_OPS or not isinstance(stop.args[0], Value):
        return None
    v = stop.args[0]
    while v.producer is not None and v.producer.op in _PASS_THROUGH and isinstance(v.producer.args[0], Value):
        v = v.producer.args[0]
    return v.producer if _stored_linear(v.producer) else None


def _grouped_qkv(stop: Node) -> tuple[Node, Value] | None:
    """Falcon's grouped ``query_key_value``: one stored linear's output viewed ``[B, S, kv_heads, q_per_kv + 2,
    head_dim]`` (each kv group's query heads, then its key and its value) and cut along the group's dim by the
    node the head walk stopped at (a slice for q, a select for k and v): that linear and the 5-D view, or None."""
    src = stop.args[0] if stop.args else None
    if stop.op not in ("aten.slice.Tensor", "aten.select.int") or not isinstance(src, Value) or \
            src.tensor_type.rank != 5 or len(stop.args) < 2 or not isinstance(stop.args[1], int) or \
            stop.args[1] % 5 != 3:
        return None
    v = src
    while v.producer is not None and v.producer.op in _PASS_THROUGH and isinstance(v.producer.args[0], Value):
        v = v.producer.args[0]
    return (v.producer, src) if _stored_linear(v.producer) else None


def _equal_split_of_linear(split: Node, width: int) -> tuple[Node, list[Node]] | None:
    """``split`` cuts one stored linear's output (through layout ops that keep the last dim) along its last dim into
    equal parts of ``width`` channels (Phi-3's ``gate_up_proj(x).chunk(2, -1)``): that linear and the layout ops
    between, else None."""
    src = split.args[0] if split.args else None
    if split.op not in _SPLIT_OPS or not isinstance(src, Value) or \
            not _last_dim(src, split.arg(2, "dim", 0)):
        return None
    if any(not isinstance(o.tensor_type.shape[-1], int) or o.tensor_type.shape[-1] != width for o in split.outputs):
        return None
    between: list[Node] = []
    while src.producer is not None and src.producer.op in _PASS_THROUGH and _keeps_last_dim(src.producer):
        between.append(src.producer)
        src = src.producer.args[0]
    lin = src.producer
    if not _stored_linear(lin) or int(lin.args[1].data.shape[0]) != width * len(split.outputs):
        return None
    return lin, between


def find_mlp_sites(graph: Graph, advise: bool = True) -> tuple[list[MLPSite], list[str]]:
    """Every prunable MLP, and why other candidate down projections are not (``advise``: with the prune passes that
    do take the model where a fused gate/up projection is refused)."""
    users = graph.users()
    sites, skipped = [], []
    instead = _advice(graph, "prune-mlp", advise)
    for down in graph.nodes:
        if not _stored_linear(down) or not down.module.endswith(DOWN_PROJECTIONS):
            continue
        block = block_of(down.module)
        width = int(down.args[1].data.shape[1])
        producers: list[Node] = []
        rows: list[tuple[Node, int]] = []
        stack, ok, seen = [down.args[0]], True, set()
        inner: list[Node] = []
        stop: Node | None = None
        while stack and ok:
            v = stack.pop()
            if id(v) in seen:
                continue
            seen.add(id(v))
            n = v.producer if isinstance(v, Value) else None
            if n is None:
                ok = False
            elif n.op == "linear":
                ok = _stored_linear(n)
                producers.append(n)
                rows.append((n, 0))
            elif n.op in _SPLIT_OPS and (fused_split := _equal_split_of_linear(n, width)) is not None:
                if all(m is not n for m in inner):  # Phi-3's gate_up_proj: channel j is row j of each equal part
                    lin, between = fused_split
                    inner += [n, *between]
                    producers.append(lin)
                    rows += [(lin, i * width) for i in range(len(n.outputs))]
            elif n.op in _ELEMENTWISE:
                inner.append(n)
                ok = all(a.data is None or a.data.numel() == 1 for a in n.inputs() if a.is_param)  # no per-channel
                stack.extend(a for a in n.inputs() if not a.is_param)
            elif n.op in _PASS_THROUGH and _keeps_last_dim(n):  # GPT-2's Conv1D: rows flattened around each linear
                inner.append(n)
                stack.append(n.args[0])
            else:
                ok, stop = False, n
        if ok and producers:
            ok = all(int(p.args[1].data.shape[0]) == width * sum(q is p for q, _ in rows) for p in producers)
        # every intermediate value must be read only inside the MLP (else a column cut would change other readers)
        inside = {id(n) for n in inner + producers}
        inside.add(id(down))
        for n in inner + producers:
            for v in n.outputs:
                if any(id(u) not in inside for u in users.get(id(v), [])):
                    ok = False
        fused = _fused_projection(stop) if stop is not None else None
        if ok and producers and block is not None:
            sites.append(MLPSite(block, down, sorted(producers, key=graph.index), rows))
        elif fused is not None:  # a fused gate/up split unevenly, or not along its last dim
            assert stop is not None
            skipped.append(f"{down.module}: its input comes from one fused linear %{fused.name} (module "
                           f"{fused.module!r}, {fused.outputs[0].tensor_type}) split by %{stop.name} ({stop.op}) "
                           f"into other than equal parts of the MLP's width {width} along its last dim: prune-mlp "
                           f"removes channel j as row j of each part{instead()}")
        else:
            skipped.append(f"{down.module}: its input is not an elementwise function of linears read only by it")
    return sites, skipped


CACHE_WRITE = "aten.scatter.src"
"""How a step graph writes new keys/values into its cache: ``scatter(cache, 2, index, new)``."""


def _walk_to_linear(v: Value, writes: list[Node] | None = None, stops: list[Node] | None = None) -> Node | None:
    """From an attention operand back through layout ops, rotary and (step graphs) the cache write to the linear
    that made it; the cache writes passed are appended to ``writes``, and the node the walk cannot pass (when it
    finds no linear) to ``stops``."""
    while isinstance(v, Value) and v.producer is not None:
        n = v.producer
        if n.op == "linear" and _stored_linear(n):
            return n
        if n.op in _PASS_THROUGH or n.op == "rotary" or _per_head_norm(n) or _last_dim_slice(n):
            v = n.args[0]
            continue
        scaled = _scalar_scaled(n)
        if scaled is not None:  # OPT's q_proj(x) * scaling: every channel alike, so heads pass as they are
            v = scaled
            continue
        if _last_dim_cat(n):  # a partial rotary: cat([rotary(x[..., :r]), x[..., r:]], -1) of one linear's heads
            found = {id(m): m for m in (_walk_to_linear(p, None, stops) for p in n.args[0])}
            if len(found) == 1 and None not in found:
                return next(iter(found.values()))
        elif (parts := _per_head_operands(n) or _interleaved_pairs(n)) is not None:
            # a rotary written out (GPT-J's interleaved one): x·cos + rotate_every_two(x)·sin on one linear's heads
            found = {id(m): m for m in (_walk_to_linear(p, None, stops) for p in parts[0])}
            lin = next(iter(found.values())) if len(found) == 1 and None not in found else None
            if lin is not None and not any(_reaches(b, lin.output, lin.output) for b in parts[1]):
                return lin
        elif n.op == CACHE_WRITE and writes is not None and isinstance(n.args[0], Value) and \
                n.args[0].kind == "input" and n.args[1] in (2, -2):
            writes.append(n)
            v = n.args[3]
            continue
        if stops is not None:
            stops.append(n)
        return None
    return None


_HEAD_ARITHMETIC = {"add", "aten.add.Tensor", "mul", "aten.mul.Tensor", "sub", "aten.sub.Tensor", "aten.neg.default"}
"""Elementwise ops a rotary written out in ATen applies to each head's vector (``x·cos + rotate(x)·sin``)."""


def _per_head_operands(n: Node) -> tuple[list[Value], list[Value]] | None:
    """(operands carrying heads, operands broadcast over them) of an elementwise op on head vectors ``[B, S, H, D]``:
    each head's vector is combined with tables that are the same for every head (a rotary's ``cos``/``sin``, ``[1,
    S, 1, D]``), so heads pass it one by one. None where ``n`` is not such an op."""
    out = n.outputs[0].tensor_type if n.outputs else None
    if n.op not in _HEAD_ARITHMETIC or out is None or out.rank != 4 or not isinstance(out.shape[2], int) or \
            out.shape[2] < 2:
        return None
    heads: list[Value] = []
    shared: list[Value] = []
    for a in n.args:
        if isinstance(a, (int, float)):
            continue
        t = a.tensor_type if isinstance(a, Value) else None
        if t is None:
            return None
        if t.rank == 4 and t.shape[2] == out.shape[2]:
            heads.append(a)
        elif t.rank < 2 or t.shape[-2] == 1:
            shared.append(a)
        else:
            return None
    return (heads, shared) if heads else None


def _interleaved_pairs(n: Node) -> tuple[list[Value], list[Value]] | None:
    """(the parts, nothing) of ``flatten(stack(parts, -1), -2)`` on head vectors: GPT-J's ``rotate_every_two``
    interleaves two halves of each head's vector, which stays within the head."""
    if n.op != "aten.flatten.using_ints" or not isinstance(n.args[0], Value) or n.args[0].tensor_type.rank != 5:
        return None
    start, end = n.arg(1, "start_dim", 0), n.arg(2, "end_dim", -1)
    st = n.args[0].producer
    if start not in (-2, 3) or end not in (-1, 4) or st is None or st.op != "aten.stack.default" or \
            st.arg(1, "dim", 0) not in (-1, 4):
        return None
    parts = list(st.args[0])
    if not parts or not all(isinstance(p, Value) and p.tensor_type.rank == 4 for p in parts):
        return None
    return parts, []


def _scalar_scaled(n: Node) -> Value | None:
    """The tensor operand of ``x * c`` where ``c`` is a number or a one-element param (OPT scales its queries by
    ``head_dim ** -0.5`` right after ``q_proj``): it acts on every channel alike, so a head walk passes it."""
    if n.op not in ("aten.mul.Tensor", "mul") or len(n.args) != 2:
        return None
    tensors = [a for a in n.args if isinstance(a, Value) and not (a.is_param and a.data is not None
                                                                   and a.data.numel() == 1)]
    scalars = [a for a in n.args if isinstance(a, (int, float)) or (isinstance(a, Value) and a.is_param
                                                                     and a.data is not None and a.data.numel() == 1)]
    return tensors[0] if len(tensors) == 1 and len(scalars) == 1 else None


def _last_dim(v: object, dim: object) -> bool:
    """Whether ``dim`` is the last dimension of ``v`` (a head vector's, in the attention's operands)."""
    rank = v.tensor_type.rank if isinstance(v, Value) else None
    return isinstance(dim, int) and isinstance(rank, int) and rank > 0 and dim % rank == rank - 1


def _per_head_norm(n: Node) -> bool:
    """A q/k norm over each head's vector (Qwen3's ``q_norm`` on ``[B, S, H, D]``, Phi's ``q_layernorm`` LayerNorm
    with ``qk_layernorm``): it reads one head at a time, so heads leave it as they leave a reshape. A norm over all
    heads' width (OLMo 2's, on ``[B, S, H·D]``) mixes heads and is not one."""
    if n.op not in ("rms_norm", "layer_norm") or not isinstance(n.args[0], Value) or \
            n.args[0].tensor_type.rank != 4:
        return False
    d = n.args[0].tensor_type.shape[-1]
    if n.op == "layer_norm" and list(n.kwargs.get("normalized_shape", [])) != [d]:
        return False
    gains = n.args[1:3] if n.op == "layer_norm" else n.args[1:2]  # a LayerNorm's weight and bias
    return all(w is None or (isinstance(w, Value) and w.is_param and w.data.dim() == 1 and w.data.shape[0] == d)
               for w in gains)


def _last_dim_slice(n: Node) -> bool:
    """``x[..., a:b]`` of a head vector (the halves of a partial rotary): per head."""
    return n.op == "aten.slice.Tensor" and len(n.args) > 1 and _last_dim(n.args[0], n.args[1])


def _last_dim_cat(n: Node) -> bool:
    if n.op not in ("aten.cat.default", "cat") or not n.args or not isinstance(n.args[0], (list, tuple)):
        return False
    dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0)
    return len(n.args[0]) > 0 and all(_last_dim(p, dim) for p in n.args[0])


def _advice(graph: Graph, refused: str, advise: bool) -> Callable[[], str]:
    """``"; <_prunes_instead>"`` closing a fused-projection refusal (empty without ``advise``), worked out on first
    use and once per ``find_*_sites`` call: it analyses the whole graph, and a fused model refuses every layer."""
    return functools.cache(lambda: f"; {_prunes_instead(graph, refused)}" if advise else "")


def _prunes_instead(graph: Graph, refused: str) -> str:
    """The advice closing a fused-projection refusal: which other structured prune passes take this model."""
    others = ["prune-mlp"] if refused != "prune-mlp" and find_mlp_sites(graph, advise=False)[0] else []
    if refused != "prune-heads" and find_attention_sites(graph, advise=False)[0]:
        others.append("prune-heads")
    blocks = [s.name for s in split_stages(graph) if s.kind == "block"]
    adds = {b: block_residuals(graph, b) for b in blocks}
    if any(rs and bypass_problem(b, rs) is None for b, rs in adds.items()):
        others.append("prune-blocks")
    if not others:  # GPT-NeoX: fused q/k/v and parallel residuals
        return "no other structured prune pass takes this model either (sparsify zeroes weights in place)"
    return f"{' and '.join(others)} {'prune' if len(others) > 1 else 'prunes'} this model"


def _reaches(start: Value, target: Value, stop: Value) -> bool:
    """Whether ``target`` is among the values ``start`` is computed from, not looking past ``stop``."""
    stack, seen = [start], set()
    while stack:
        v = stack.pop()
        if v is target:
            return True
        if id(v) in seen or v is stop or v.producer is None:
            continue
        seen.add(id(v))
        stack.extend(v.producer.inputs())
    return False


MULTI_QUERY = "it is multi-query attention"
"""How ``_split_qkv_parts`` begins its refusal of a layer with one kv head (no group to remove, whatever its layout)."""


def _split_qkv_parts(att: Node, split: Node, lin: Node, out_t: TensorType
                     ) -> tuple[tuple[int, int, int], bool, int, int] | str | None:
    """q, k and v as the three outputs of one split of fused linear ``lin``'s output, in that order: GPT-2's
    ``c_attn(x).split(H·D, -1)`` (three equal parts: their first rows, not interleaved) or GPT-NeoX's
    ``query_key_value(x).view(.., H, 3·D).transpose(1, 2).chunk(3, -1)`` (each head's rows hold its q, k and v:
    interleaved). Returns (first rows of q, k, v; interleaved; heads; head_dim), or why not (a string)."""
    if out_t.rank != 4 or not all(isinstance(d, int) for d in out_t.shape[1::2]):
        return "the attention's output is not [B, heads, S, head_dim]"
    hq, hd = int(out_t.shape[1]), int(out_t.shape[3])
    rows = int(lin.args[1].data.shape[0])
    src = split.args[0] if split.args else None
    if split.op == "aten.unbind.int":  # Falcon without multi_query: [.., heads, 3, head_dim] unbound along the 3
        st = src.tensor_type if isinstance(src, Value) else None
        if st is None or st.rank != 5 or split.arg(1, "dim", 0) not in (-2, 3) or len(split.outputs) != 3 or \
                list(st.shape[2:]) != [hq, 3, hd] or rows != 3 * hq * hd:
            return f"not an unbind of a [.., {hq} heads, 3, {hd}] view along its dim -2 ({rows} rows)"
        for operand, part in zip(att.args[:3], split.outputs):
            if not _reaches(operand, part, src):
                return f"attention operand %{operand.name} does not come from %{part.name}"
        return (0, 0, 0), True, hq, hd  # a head's q, k and v are its 3·head_dim consecutive rows, as GPT-NeoX's
    sizes = split.args[1] if split.op == "aten.split_with_sizes.default" and len(split.args) > 1 else None
    if isinstance(sizes, (list, tuple)) and list(sizes) in ([hq * hd, hd, hd], [hq, 1, 1]) and hq > 1:
        # multi-query (Falcon's default): was "not three equal parts", as if another split would do
        return (f"{MULTI_QUERY} (one kv head of {hd} rows shared by all {hq} query heads), and "
                "prune-heads removes whole kv-head groups (a kv head with the query heads reading it): the layer's "
                "only group cannot go")
    if split.op not in ("aten.chunk.default", "aten.split.Tensor") or len(split.outputs) != 3 or \
            not isinstance(src, Value) or not _last_dim(src, split.arg(2, "dim", 0)) or rows != 3 * hq * hd:
        return f"not three equal parts of {3 * hq * hd} rows ({hq} heads of {hd}) along its last dim"
    for operand, part in zip(att.args[:3], split.outputs):
        if not _reaches(operand, part, src):
            return f"attention operand %{operand.name} does not come from %{part.name}"
    last = src.tensor_type.shape[-1]
    if last == rows:  # the parts are q, k and v whole: a head of q is hd rows at 0, of k at H·D, of v at 2·H·D
        return (0, hq * hd, 2 * hq * hd), False, hq, hd
    if last == 3 * hd and src.tensor_type.rank == 4:  # the parts are each head's thirds
        return (0, 0, 0), True, hq, hd
    return f"its parts are {last} wide, neither q/k/v whole ({rows}) nor a head's ({3 * hd})"


def _fused_qkv_parts(att: Node, lin: Node, users: dict[int, list[Node]]
                     ) -> tuple[tuple[Node, Node, Node], tuple[int, int, int], list[int]] | str:
    """Phi-3's ``qkv_proj``: the three last-dim slices of ``lin``'s output that ``att``'s q, k and v come from, their
    first rows and their lengths; or why they are not (a string)."""
    rows = int(lin.args[1].data.shape[0])
    readers = users.get(id(lin.output), [])
    slices = [r for r in readers if r.op == "aten.slice.Tensor" and r.args[0] is lin.output and _last_dim_slice(r)
              and isinstance(r.arg(2), int) and isinstance(r.arg(3), int) and r.arg(4, "step", 1) == 1]
    if len(slices) != len(readers) or len(slices) != 3:
        return f"its output is read by {', '.join(f'%{r.name} ({r.op})' for r in readers)}, not three last-dim slices"
    found = []
    for operand in att.args[:3]:
        mine = [sl for sl in slices if _reaches(operand, sl.output, lin.output)]
        if len(mine) != 1:
            return f"attention operand %{operand.name} comes from {len(mine)} of its slices, not one"
        found.append(mine[0])
    if len({id(sl) for sl in found}) != 3:
        return "two of q, k and v come from one slice"
    offsets = [int(sl.args[2]) for sl in found]
    lengths = [min(int(sl.args[3]), rows) - int(sl.args[2]) for sl in found]
    spans = sorted(zip(offsets, lengths))
    if any(a + n != b for (a, n), (b, _) in zip(spans, spans[1:])) or spans[0][0] != 0 or sum(lengths) != rows:
        return f"its slices {[(a, a + n) for a, n in spans]} do not tile its {rows} rows"
    return (found[0], found[1], found[2]), (offsets[0], offsets[1], offsets[2]), lengths


def _grouped_site(att: Node, lin: Node, view: Value, stops: list[Node], o: Node | None, block: str | None,
                  writes: list[Node], out_t: TensorType) -> AttentionSite | str:
    """Falcon's grouped ``query_key_value`` (``_grouped_qkv``) as a site whose unit is a kv group's
    ``(q_per_kv + 2)·head_dim`` consecutive rows, or why it is not one (a string): q is the view's ``[..., :-2, :]``,
    k and v its ``[..., -2, :]`` and ``[..., -1, :]``, reshaped from a literal group count."""
    shape = view.tensor_type.shape
    reshape = view.producer
    if o is None or block is None or out_t.rank != 4 or not all(isinstance(d, int) for d in shape[2:]) or \
            not isinstance(out_t.shape[1], int):
        return "its output projection or head counts were not found"
    kv, per, hd = (int(d) for d in shape[2:])
    hq, r = int(out_t.shape[1]), per - 2
    if reshape is None or reshape.op not in ("reshape", "aten.view.default", "aten.reshape.default") or \
            not isinstance(reshape.args[1], (list, tuple)) or reshape.args[1][2] != kv:
        return f"the view's group count is not a literal {kv} of its reshape"
    if r < 1 or hq != kv * r or int(out_t.shape[3]) != hd or int(lin.args[1].data.shape[0]) != kv * per * hd or \
            int(o.args[1].data.shape[1]) != hq * hd:
        return f"its sizes do not make {kv} groups of {r} query heads, a key and a value of {hd}"
    want = [("aten.slice.Tensor", (0, -2)), ("aten.select.int", (-2,)), ("aten.select.int", (-1,))]
    alt = [("aten.slice.Tensor", (0, r)), ("aten.select.int", (r,)), ("aten.select.int", (r + 1,))]
    got = [(n.op, tuple(n.args[2:4 if n.op == "aten.slice.Tensor" else 3])) for n in stops[:3]]
    if len(stops) != 3 or any(n.args[0] is not view for n in stops) or \
            any(g != w and g != a for g, w, a in zip(got, want, alt)) or \
            any(n.op == "aten.slice.Tensor" and n.arg(4, "step", 1) != 1 for n in stops):
        return "q, k and v are not its groups' query heads, key and value"
    if writes and len(writes) != 2:
        return "only one of keys and values goes through a cache write"
    return AttentionSite(block, att, lin, lin, lin, o, hq, kv, hd, tuple(writes), (0, 0, 0), None, True, reshape)


def find_attention_sites(graph: Graph, advise: bool = True) -> tuple[list[AttentionSite], list[str]]:
    """Every attention whose heads prune-heads can cut, and why the others are not (``advise``: with the prune passes
    that do take the model where a fused q/k/v projection is refused)."""
    users = graph.users()
    sites, skipped = [], []
    instead = _advice(graph, "prune-heads", advise)
    for att in graph.find("attention"):
        writes: list[Node] = []
        stops: list[Node] = []
        q = _walk_to_linear(att.args[0], None, stops)
        k, v = (_walk_to_linear(a, writes, stops) for a in att.args[1:3])
        o = None
        cur = att.output
        for _ in range(6):
            readers = users.get(id(cur), [])
            if len(readers) != 1:
                break
            r = readers[0]
            if r.op == "linear":
                o = r if _stored_linear(r) and r.args[0] is cur else None
                break
            if r.op not in _PASS_THROUGH:
                break
            cur = r.output
        # a step graph's attention is the step function's own call (no module path): its o_proj says the block
        block = block_of(att.module) or (block_of(o.module) if o is not None else None)
        out_t = att.output.tensor_type
        if None in (q, k, v, o) or block is None or out_t.rank != 4 or not isinstance(out_t.shape[1], int):
            why = ""
            fused = _fused_projection(stops[0]) if stops else None
            split = _split_qkv_parts(att, stops[0], fused, out_t) if fused is not None else None
            if fused is not None and o is not None and block is not None and not isinstance(split, str):
                assert split is not None  # GPT-2's c_attn (three equal parts), GPT-NeoX's query_key_value (per head)
                (offsets, interleaved, hq, hd) = split
                if writes and len(writes) != 2:
                    skipped.append(f"{block}: only one of keys and values goes through a cache write")
                elif int(o.args[1].data.shape[1]) != hq * hd:
                    skipped.append(f"{att.module}: head layout not understood (q heads {hq}, head_dim {hd})")
                else:
                    sites.append(AttentionSite(block, att, fused, fused, fused, o, hq, hq, hd, tuple(writes),
                                               offsets, None, interleaved))
                continue
            if fused is not None:  # Falcon's query_key_value (GQA: q, k and v of unequal sizes)
                # a multi-query layer is refused for its one group, not its layout: the layout rule after it was
                # beside the point (its split is Falcon's own, which the rule then seemed to call wrong)
                rule = "" if isinstance(split, str) and split.startswith(MULTI_QUERY) else \
                    ": prune-heads cuts a fused q/k/v linear split into three equal parts or into heads only"
                skipped.append(f"{att.module or att.name}: q, k and v are one fused linear %{fused.name} (module "
                               f"{fused.module!r}, {fused.outputs[0].tensor_type}) split by %{stops[0].name} "
                               f"({stops[0].op}){f', but {split}' if split else ''}{rule}{instead()}")
                continue
            grouped = _grouped_qkv(stops[0]) if stops else None
            if grouped is not None:
                lin, view = grouped
                site = _grouped_site(att, lin, view, stops, o, block, writes, out_t)
                if isinstance(site, AttentionSite):
                    sites.append(site)
                    continue
                skipped.append(f"{att.module or att.name}: q, k and v come from one fused linear %{lin.name} (module "
                               f"{lin.module!r}) viewed per kv-head group as {view.tensor_type} and cut along its "
                               f"dim 3 by %{stops[0].name} ({stops[0].op}) (Falcon's grouped query_key_value), but "
                               f"{site}: prune-heads cuts that layout only as each group's query heads, then its key "
                               f"and its value{instead()}")
                continue
            if stops:
                s0 = stops[0]
                why = (f" (%{s0.name} = {s0.op}{f' of {s0.module}' if s0.module else ''} on "
                       f"{s0.args[0].tensor_type if isinstance(s0.args[0], Value) else '?'} "
                       f"{'mixes heads' if s0.op == 'rms_norm' else 'is not a per-head op the walk knows'})")
            skipped.append(f"{att.module or att.name}: q/k/v/o linears not found through layout ops{why}")
            continue
        assert q is not None and k is not None and v is not None and o is not None
        offsets, slices, lengths = (0, 0, 0), None, [int(n.args[1].data.shape[0]) for n in (q, k, v)]
        if len({id(q), id(k), id(v)}) < 3:  # Phi-3's qkv_proj, sliced along its last dim into q, k and v
            fused = q if q is k or q is v else k
            parts = _fused_qkv_parts(att, fused, users) if q is k is v else \
                "q, k and v are not three parts of it"
            if isinstance(parts, str):
                skipped.append(f"{att.module or att.name}: q, k and v are slices of one fused linear %{fused.name} "
                               f"(module {fused.module!r}, {fused.outputs[0].tensor_type}), but {parts}: prune-heads "
                               f"cuts a fused q/k/v linear only as three last-dim slices of its rows{instead()}")
                continue
            slices, offsets, lengths = parts
        hq, hd = int(out_t.shape[1]), int(out_t.shape[3])
        kv = lengths[1] // hd
        if hq * hd != lengths[0] or kv < 1 or hq % kv or lengths[2] != kv * hd or \
                int(o.args[1].data.shape[1]) != hq * hd:
            skipped.append(f"{att.module}: head layout not understood (q heads {hq}, head_dim {hd})")
            continue
        if writes and len(writes) != 2:
            skipped.append(f"{block}: only one of keys and values goes through a cache write")
            continue
        sites.append(AttentionSite(block, att, q, k, v, o, hq, kv, hd, tuple(writes), offsets, slices))
    return sites, skipped


SiteT = TypeVar("SiteT")


def sites_in_modules(sites: list[SiteT], modules: str, pass_name: str, module_of: Callable[[SiteT], str],
                     described: str) -> list[SiteT]:
    """The ``sites`` whose ``module_of`` module the ``modules`` option (a regex; empty: all) searches into. A regex
    that leaves none of the sites found is a ``PassError`` naming the first and last (``described``: what those
    modules are), since cutting nothing would pass for success."""
    if not modules:
        return sites
    rx = re.compile(modules)
    chosen = [s for s in sites if rx.search(module_of(s))]
    if sites and not chosen:
        raise PassError(f"pass {pass_name}: modules={modules!r} matches none of the {len(sites)} {described} "
                        f"({module_of(sites[0])} ... {module_of(sites[-1])})")
    return chosen


def refuse_nonfinite_weights(pass_name: str, linears: Iterable[Node]) -> None:
    """A NaN/inf weight or bias among ``linears``: ``PassError`` naming it, before anything is pruned. Scores
    over it are NaN, so which units go would be arbitrary, and a removed NaN row would vanish without a word (the
    quantizers refuse such weights the same way)."""
    for n in linears:
        for v in n.args[1:3]:
            if isinstance(v, Value) and v.data is not None and v.data.is_floating_point():
                problem = nonfinite_problem(v.data)
                if problem:
                    raise PassError(f"pass {pass_name}: parameter {v.name} of linear %{n.name} ({n.module}) holds "
                                    f"{problem}; pruning scores over it are meaningless, so nothing was pruned: "
                                    "fix the weights (reload the checkpoint)")


def linear_params(n: Node) -> tuple[Value, Value | None]:
    b = n.args[2] if len(n.args) > 2 else None
    return n.args[1], b


def _private(graph: Graph, node: Node, index: int, users: dict[int, list[Node]]) -> Value:
    from lowbit.passes.fold_norms import private_weight

    return private_weight(graph, node, index, users, node.args[index].name)


def slice_linear_rows(graph: Graph, n: Node, keep: torch.Tensor, users: dict[int, list[Node]]) -> None:
    """Keep only output rows ``keep`` of linear ``n`` (weight and bias)."""
    w = _private(graph, n, 1, users)
    graph.set_param(w.name, w.data.index_select(0, keep.to(w.data.device)).contiguous())
    if len(n.args) > 2 and n.args[2] is not None:
        b = _private(graph, n, 2, users)
        graph.set_param(b.name, b.data.index_select(0, keep.to(b.data.device)).contiguous())


def unit_columns(units: torch.Tensor | list[int], unit: int) -> torch.Tensor:
    """The column (or row) indices of ``units`` of ``unit`` consecutive columns each."""
    u = torch.as_tensor(units, dtype=torch.long).reshape(-1, 1)
    return (u * unit + torch.arange(unit)).reshape(-1)


def kept_rows(groups: list[tuple[Node, int, int]], gone: torch.Tensor) -> dict[int, tuple[Node, torch.Tensor]]:
    """Per linear (by id), the rows that stay when units ``gone`` leave every ``(linear, rows per unit, first row)``
    group: a fused linear (Phi-3's ``qkv_proj``, ``gate_up_proj``) loses the units' rows of each of its parts."""
    drop: dict[int, tuple[Node, torch.Tensor]] = {}
    for lin, per, first in groups:
        if id(lin) not in drop:
            drop[id(lin)] = (lin, torch.zeros(int(lin.args[1].data.shape[0]), dtype=torch.bool))
        drop[id(lin)][1][first + unit_columns(gone, per)] = True
    return {k: (lin, (~mask).nonzero().flatten()) for k, (lin, mask) in drop.items()}


def slice_unit_rows(graph: Graph, groups: list[tuple[Node, int, int]], gone: torch.Tensor,
                    users: dict[int, list[Node]]) -> None:
    """Remove units ``gone`` from each ``(linear, rows per unit, first row)`` group (``kept_rows``)."""
    for lin, keep in kept_rows(groups, gone).values():
        slice_linear_rows(graph, lin, keep, users)


def slice_linear_cols(graph: Graph, n: Node, keep: torch.Tensor, users: dict[int, list[Node]]) -> None:
    """Keep only input columns ``keep`` of linear ``n``."""
    w = _private(graph, n, 1, users)
    graph.set_param(w.name, w.data.index_select(1, keep.to(w.data.device)).contiguous())


def residual_block(node: Node) -> str | None:
    """The block a ``residual_add(stream, update)`` closes: its own module's, else the update's producer's (a
    generation step graph's adds carry no module; the update is the block's ``o_proj``/``down_proj``)."""
    b = block_of(node.module)
    if b is None and len(node.args) > 1 and isinstance(node.args[1], Value) and node.args[1].producer is not None:
        b = block_of(node.args[1].producer.module)
    return b


def block_residuals(graph: Graph, block: str) -> list[Node]:
    """The adds that put ``block``'s updates on the residual stream, in graph order: its ``residual_add`` nodes, or
    where it has none its block-level ``add(stream, update)`` nodes whose update the block computes but does not
    write straight from a linear (Gemma 2's and OLMo 2's normalised updates ``x + norm(o_proj(...))``, Granite's
    scaled ``x + 0.22·o_proj(...)``, which raising leaves plain adds)."""
    found = [n for n in graph.nodes if n.op == "residual_add" and residual_block(n) == block]
    return found or _plain_stream_adds(graph, block)


def _inside(value: object, block: str) -> bool:
    """``value`` is computed by a node of ``block`` (its own module or one below it)."""
    p = getattr(value, "producer", None)
    m = (p.module or "") if p is not None else ""
    return p is not None and (m == block or m.startswith(block + "."))


def _plain_stream_adds(graph: Graph, block: str) -> list[Node]:
    """``block``'s ``add(stream, update)`` nodes written at the block's own level (not inside its attention or MLP,
    whose adds are masks and biases): the stream comes from outside the block or from the block's previous such add,
    the update from inside it, both of one type."""
    adds: list[Node] = []
    for n in graph.nodes:
        if n.op not in ("add", "aten.add.Tensor") or n.module != block or len(n.args) != 2 or n.kwargs:
            continue
        for stream, update in (n.args, n.args[::-1]):  # GPT-2 adds the attention's update first
            if not (isinstance(stream, Value) and isinstance(update, Value)) or stream.type != update.type:
                continue
            if _inside(update, block) and (not _inside(stream, block) or (adds and stream is adds[-1].output)):
                adds.append(n)
                break
    return adds


def stream_first(adds: list[Node], block: str) -> None:
    """Put the residual stream first in each of ``block``'s plain stream adds (``block_residuals``' fallback), as a
    ``residual_add`` has it: what bypassing an add and Block Influence read as the stream. Exact: ``a + b`` is
    ``b + a`` bit for bit."""
    for n in adds:
        if n.op != "residual_add" and _inside(n.args[0], block) and not any(n.args[0] is a.output for a in adds):
            n.args = (n.args[1], n.args[0])


def _stream_of(add: Node, adds: list[Node], block: str) -> Value:
    """The residual stream operand of one of ``block``'s stream adds, as ``stream_first`` puts it (not moving it)."""
    a, b = add.args[0], add.args[1]
    if add.op != "residual_add" and _inside(a, block) and not any(a is x.output for x in adds):
        return b
    return a


def bypass_problem(block: str, adds: list[Node]) -> str | None:
    """Why replacing each of ``block``'s stream adds (``block_residuals``) by its stream would not remove the block:
    a stream computed inside the block by anything but an earlier stream add of it (a parallel-residual block adds
    its two updates first; its add of the stream is a plain ``add``), or None."""
    own = {id(r) for r in adds}
    for r in adds:
        stream = _stream_of(r, adds, block)
        update = r.args[1] if stream is r.args[0] else r.args[0]
        p = stream.producer if isinstance(stream, Value) else None
        if p is not None and id(p) not in own and block_of(p.module or "") == block:
            return (f"block {block}: its residual_add %{r.name} adds %{update.name} to %{stream.name}, which "
                    f"the block computes itself ({p.op} in {p.module!r}), not to the residual stream entering it: "
                    "a parallel-residual (GPT-NeoX) or post-norm (BERT) block, which bypassing its residual_adds "
                    "would leave partly in the model")
    return None


def model_sizes(graph: Graph) -> dict[str, object]:
    """The sizes a model config records, read from the IR itself (so they survive save and reload): blocks, the
    residual stream's width, and per block the MLP width and the query/kv head counts. A per-layer list where
    layers differ (a Hugging Face config holds one number; a pruned model with uneven layers needs a per-layer
    config), else one int."""
    mlps, _ = find_mlp_sites(graph)
    atts, _ = find_attention_sites(graph)
    layers = sorted({s.block for s in mlps} | {s.block for s in atts}, key=lambda b: [int(x) if x.isdigit() else x
                                                                                       for x in re.split(r"(\d+)", b)])

    def one_or_list(values: list[int]) -> int | list[int]:
        return values[0] if values and all(v == values[0] for v in values) else values

    return {
        "num_hidden_layers": len(layers),
        "layers": layers,
        # the residual stream's width (slice-residual narrows it): what each block's output projections write
        "hidden_size": one_or_list([int(n.outputs[0].tensor_type.shape[-1]) for n in
                                    [s.down for s in mlps] + [s.o for s in atts]]),
        "intermediate_size": one_or_list([s.width for s in mlps]),
        "num_attention_heads": one_or_list([s.q_heads for s in atts]),
        "num_key_value_heads": one_or_list([s.kv_heads for s in atts]),
        "head_dim": one_or_list([s.head_dim for s in atts]),
    }
