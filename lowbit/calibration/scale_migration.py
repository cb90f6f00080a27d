"""Move a per-channel scale from a linear's input into the op that produces it: ``x·Wᵀ = (x/s)·(W·diag(s))ᵀ``.

AWQ and SmoothQuant both choose a scale ``s`` per input channel of a group of linears that read the same
value, multiply those linears' input columns by ``s`` and divide the producer's output channels by ``s``, so
the float model computes exactly the same function (exact up to float rounding: in float64 the outputs agree
to ~1e-12). This module is the one place that does it, so both algorithms fold scales the same way.

Where a scale can go is *analysis* (``find_sites``, a table of patterns); changing the weights is
*transformation* (``apply_scale``). The patterns, each exact because the path between producer and consumers
acts on every channel independently:

* ``norm``: RMSNorm / LayerNorm → linears (q/k/v, gate/up), directly or through reshapes that keep the channel
  dim last (GPT-2's ``[B·S, C]`` rows; a mixture-of-experts block's ``[B·T, H]`` tokens, read by its router and
  every expert's gate/up). Gain (and LayerNorm bias) divided by ``s``. A norm without a gain (after
  ``fold-norms``) gets one, ``1/s``. Its output may be read only by: linears (as their input, weight a param),
  reshapes/views whose output keeps the last dim at the channel count (they only regroup the leading, token
  dims, so row r of the output is a row of the input and ``s`` passes through; their output read by the same
  kinds of node), and ops that read only its shape/dtype (``new_zeros``, ``sym_size``). Anything else (a
  residual add, a transpose, a graph output) refuses the site; ``find_sites(refusals=...)`` says which reader.
* ``gated``: linear ``up`` → ``mul(act(gate), up)`` → linears (down). ``up``'s output rows (and bias) are
  divided by ``s``; the elementwise product carries the factor through.
* ``attention-v``: linear ``v`` → head reshape / GQA repeat → ``attention`` (as the value) → head merge →
  linears (o). Attention mixes tokens, never channels, so ``v``'s channel ``c`` reaches ``o``'s input columns
  ``j`` with ``expand[j] = c`` (with GQA, one value channel feeds ``n_heads / n_kv_heads`` columns, which then
  share its scale).

The tensor functions (``divide_norm``, ``divide_rows``, ``multiply_columns``) work on plain tensors and are
what the HF-module tests and the graph code both call. Arithmetic is float64, cast back to each param's dtype.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from lowbit.errors import LowbitError
from lowbit.ir.graph import Graph, Node, Value
from lowbit.ir.rewrite import gain_weight, norm_gain, private_weight

__all__ = ["SITE_KINDS", "divide_norm", "divide_rows", "multiply_columns", "gqa_expand_index", "MigrationSite",
           "find_sites", "site_for", "apply_scale", "MigrationError", "VIEW_OPS", "tied_reader"]


class MigrationError(LowbitError, ValueError):
    """A scale cannot be moved where it was asked to go; the message names the node and why."""


# ---- tensors ----------------------------------------------------------------------------------------------


def _check_scale(s: torch.Tensor, n: int, what: str) -> torch.Tensor:
    if s.dim() != 1 or s.numel() != n:
        raise MigrationError(f"{what}: scale must be 1-d of length {n}, got shape {tuple(s.shape)}")
    s64 = s.double()
    if not torch.isfinite(s64).all() or (s64 <= 0).any():
        raise MigrationError(f"{what}: scales must be finite and positive (min {float(s64.min()):g})")
    return s64


def divide_norm(gain: torch.Tensor | None, bias: torch.Tensor | None, s: torch.Tensor, like: torch.dtype
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A norm's (gain / s, bias / s); a missing gain becomes ``1/s`` in dtype ``like``."""
    s64 = _check_scale(s, s.numel(), "norm")
    g = (gain.double() / s64).to(gain.dtype) if gain is not None else (1.0 / s64).to(like)
    b = (bias.double() / s64).to(bias.dtype) if bias is not None else None
    return g, b


def divide_rows(w: torch.Tensor, b: torch.Tensor | None, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A producing linear's output rows (and bias) divided by ``s``: its output channel c becomes ``y_c / s_c``."""
    s64 = _check_scale(s, w.shape[0], "producer rows")
    return (w.double() / s64[:, None]).to(w.dtype), (None if b is None else (b.double() / s64).to(b.dtype))


def multiply_columns(w: torch.Tensor, s: torch.Tensor, expand: torch.Tensor | None = None) -> torch.Tensor:
    """A consuming linear's input columns times ``s`` (``s[expand]`` when one channel feeds several columns)."""
    full = s if expand is None else s[expand]
    s64 = _check_scale(full, w.shape[1], "consumer columns")
    return (w.double() * s64[None, :]).to(w.dtype)


def gqa_expand_index(kv_channels: int, in_features: int, head_dim: int) -> torch.Tensor:
    """Index ``j → c`` from ``o``'s input column to ``v``'s output channel under grouped-query attention.

    Query head ``h`` reads KV head ``h // n_rep`` (HF's ``repeat_kv`` order), so column ``h·d + i`` reads
    value channel ``(h // n_rep)·d + i``.
    """
    if kv_channels % head_dim or in_features % head_dim:
        raise MigrationError(f"head_dim {head_dim} does not divide v's {kv_channels} channels or o's {in_features}")
    n_kv, n_h = kv_channels // head_dim, in_features // head_dim
    if n_h % n_kv:
        raise MigrationError(f"{n_h} query heads are not a multiple of {n_kv} KV heads")
    j = torch.arange(in_features)
    return (j // head_dim // (n_h // n_kv)) * head_dim + j % head_dim


# ---- analysis ---------------------------------------------------------------------------------------------

VIEW_OPS = frozenset({
    "reshape", "transpose", "permute", "aten.reshape.default", "aten.view.default", "aten.transpose.int",
    "aten.permute.default", "aten.unsqueeze.default", "aten.expand.default", "aten.clone.default",
    "aten.contiguous.default", "aten.slice.Tensor",
})
"""Ops that move channels around without mixing them (a full ``slice`` is what export leaves of ``x[:, :]``)."""

NORM_OPS = ("rms_norm", "layer_norm")

SITE_KINDS = ("norm", "gated", "attention-v")
"""Where a per-channel scale folds (``MigrationSite.kind``): after a norm (into its gain), into up_proj (gated MLP),
into v_proj (attention). The one list smooth-quant's and gptq/awq/autoround's ``sites`` options are checked against."""


@dataclass
class MigrationSite:
    """One place a per-channel scale can be folded: ``producer`` → ``consumers`` (linears)."""

    kind: str
    """``norm``, ``gated`` or ``attention-v``."""
    producer: Node
    consumers: list[Node]
    channels: int
    """Length of ``s`` (the producer's output channels)."""
    expand: torch.Tensor | None = None
    """Consumer column j takes ``s[expand[j]]``; None when columns and channels coincide."""

    @property
    def name(self) -> str:
        return f"{self.kind}:{self.producer.module or self.producer.name}"

    def input_value(self) -> Value:
        """The value the consumers read (whose statistics choose ``s``)."""
        return self.consumers[0].args[0]


def tied_reader(graph: Graph, readers: Iterable[Node], users: dict[int, list[Node]] | None = None) -> Node | None:
    """The first of a site's kept-float ``readers`` whose weight another node also reads (a tied ``lm_head``):
    scaling its input columns would change that node too, so such a reader refuses the site (smooth-quant and
    AWQ's scale search both ask)."""
    users = graph.users() if users is None else users
    return next((c for c in readers if any(u is not c for u in users.get(id(c.args[1]), []))), None)


def _is_linear_with_param_weight(n: Node) -> bool:
    return n.op == "linear" and isinstance(n.args[1], Value) and n.args[1].is_param


def _readers(users: dict[int, list[Node]], v: Value) -> list[Node]:
    return users.get(id(v), [])


def _linear_readers(users: dict[int, list[Node]], v: Value, outputs: set[int]) -> list[Node] | None:
    """The linears reading ``v`` as their input, or None if anything else reads it (or it is a graph output)."""
    rs = _readers(users, v)
    if not rs or id(v) in outputs:
        return None
    if all(_is_linear_with_param_weight(r) and r.args[0] is v and r.args[1] is not v for r in rs):
        return rs
    return None


def _rows_kept(users: dict[int, list[Node]], v: Value, channels: int, outputs: set[int]) -> Value:
    """From ``v`` along single-reader reshapes that keep the last dim at ``channels`` (``[B, S, C] -> [B·S, C]``,
    what a raised ``addmm`` reads: GPT-2's Conv1D projections): row-major, each output row is an input row, so a
    per-channel scale passes through. The value the linears read."""
    while True:
        rs = _readers(users, v)
        if len(rs) != 1 or id(v) in outputs:
            return v
        r = rs[0]
        shape = getattr(r.output.type, "shape", None) if r.outputs else None
        if r.op not in _RESHAPES or r.args[0] is not v or not shape or shape[-1] != channels:
            return v
        v = r.output


_RESHAPES = frozenset({"reshape", "aten.reshape.default", "aten.view.default"})


def _follow_views(users: dict[int, list[Node]], v: Value, outputs: set[int]) -> tuple[Value, list[Node]] | None:
    """From ``v`` along a chain of single-reader view ops; returns the last value and the chain."""
    chain = []
    while True:
        rs = _readers(users, v)
        if len(rs) != 1 or id(v) in outputs:
            return (v, chain) if rs else None
        r = rs[0]
        if r.op not in VIEW_OPS or r.args[0] is not v:
            return v, chain
        if r.op == "aten.slice.Tensor" and not _full_slice(r):
            return None
        chain.append(r)
        v = r.output


def _full_slice(n: Node) -> bool:
    start = n.args[2] if len(n.args) > 2 else 0
    end = n.args[3] if len(n.args) > 3 else None
    step = n.args[4] if len(n.args) > 4 else 1
    return start in (0, None) and (end is None or (isinstance(end, int) and end >= 2**62)) and step == 1


def _head_dim(chain: list[Node], channels: int) -> int | None:
    """The head size of the first reshape that splits ``channels`` into heads (``[..., heads, d]``).

    One KV head (multi-query attention: Gemma-2B, Falcon) splits into ``[..., 1, channels]``: its head size is
    every channel, and each query head reads it."""
    for n in chain:
        if n.op in ("reshape", "aten.reshape.default", "aten.view.default"):
            t = n.output.type
            shape = getattr(t, "shape", None)
            if shape and isinstance(shape[-1], int) and shape[-1] < channels and channels % shape[-1] == 0:
                return int(shape[-1])
            if shape and len(shape) >= 2 and shape[-2] == 1 and shape[-1] == channels:
                return channels
    return None


_SHAPE_READERS = frozenset({
    "aten.new_zeros.default", "aten.new_empty.default", "aten.new_ones.default", "aten.new_full.default",
    "aten.sym_size.int",
})
"""Ops that read only a tensor's shape, dtype and device (a MoE block's ``new_zeros`` accumulator), never its
values: a scale on the tensor does not reach them."""


def _channel_readers(users: dict[int, list[Node]], v: Value, channels: int, outputs: set[int]) -> list[Node] | str:
    """The linears that read ``v``'s channels, directly or through reshapes that keep the last dim at ``channels``
    (they merge or split only the leading, token dims: row-major, each output row is an input row, so a
    per-channel scale passes through); readers of the shape alone are passed over. Otherwise why not: the first
    reader that would see the scale unfolded."""
    found: list[Node] = []
    pending = [v]
    while pending:
        cur = pending.pop(0)
        if id(cur) in outputs:
            return f"%{cur.name} is a graph output"
        readers = _readers(users, cur)
        if not readers:
            return f"%{cur.name} has no reader"
        for r in readers:
            if _is_linear_with_param_weight(r) and r.args[0] is cur and r.args[1] is not cur:
                found.append(r)
                continue
            if r.op in _SHAPE_READERS and r.args[0] is cur and all(a is not cur for a in r.args[1:]):
                continue
            shape = getattr(r.output.type, "shape", None) if r.outputs else None
            if r.op in _RESHAPES and r.args[0] is cur and shape and shape[-1] == channels:
                pending.append(r.output)
                continue
            return f"it reaches {r.op} %{r.name} (module {r.module!r}), which is not a linear or a row reshape"
    return found


def find_sites(graph: Graph, kinds: Iterable[str] = SITE_KINDS, refusals: dict[str, str] | None = None
               ) -> list[MigrationSite]:
    """Every place in ``graph`` where a scale on a group of linears' input can be folded, in graph order.

    ``refusals``, when given, is filled with why each norm is not a site (``norm:<module>`` -> reason): a norm is
    the one candidate every model has, so a norm passed over is said, not silently skipped."""
    want = set(kinds)
    users = graph.users()
    outputs = graph.output_ids()
    sites: list[MigrationSite] = []
    order = {id(n): i for i, n in enumerate(graph.nodes)}
    for n in graph.nodes:
        if n.op in NORM_OPS and "norm" in want:
            channels = int(n.output.tensor_type.shape[-1])
            cons = _channel_readers(users, n.output, channels, outputs)
            gain = n.arg(1, "weight")
            if isinstance(cons, str):
                why = cons
            elif gain is not None and not (isinstance(gain, Value) and gain.is_param):
                why = "its gain is not a param"
            else:
                sites.append(MigrationSite("norm", n, sorted(cons, key=lambda c: order[id(c)]), channels))
                continue
            if refusals is not None:
                refusals[f"norm:{n.module or n.name}"] = why
        elif n.op in ("mul", "aten.mul.Tensor") and "gated" in want:
            site = _gated_site(n, users, outputs)
            if site is not None:
                sites.append(site)
        elif n.op == "attention" and "attention-v" in want:
            site = _attention_v_site(n, users, outputs)
            if site is not None:
                sites.append(site)
    return sites


def _gated_site(mul: Node, users: dict[int, list[Node]], outputs: set[int]) -> MigrationSite | None:
    a, b = mul.args[0], mul.args[1]
    if not (isinstance(a, Value) and isinstance(b, Value)) or a.type != b.type:
        return None
    shape = getattr(mul.output.type, "shape", None)
    cons = _linear_readers(users, _rows_kept(users, mul.output, shape[-1], outputs) if shape else mul.output, outputs)
    if not cons:
        return None
    for operand in (b, a):  # HF writes act(gate) * up: try the right operand first
        p = operand.producer
        if p is not None and _is_linear_with_param_weight(p) and _readers(users, operand) == [mul] \
                and id(operand) not in outputs:
            return MigrationSite("gated", p, cons, int(p.args[1].tensor_type.shape[0]))
    return None


def _cache_write(n: Node) -> bool:
    """A generation step's value-cache write: ``scatter(past_cache, dim, slots, v)`` into a graph input, along the
    slot axis. The cache then holds only what this v projection wrote (now or at an earlier step, both scaled
    alike), so the scale passes through it as through a view."""
    if n.op != "aten.scatter.src" or len(n.args) < 4 or not isinstance(n.args[0], Value):
        return False
    past, dim, rank = n.args[0], n.args[1], getattr(n.output.type, "rank", None)
    return (past.producer is None and not past.is_param and isinstance(dim, int) and isinstance(rank, int)
            and dim % rank != rank - 1)


def _attention_v_site(att: Node, users: dict[int, list[Node]], outputs: set[int]) -> MigrationSite | None:
    v_in = att.arg(2, "v")
    if not isinstance(v_in, Value):
        return None
    # walk back from attention's value operand to the linear that produced it, through views (and a step graph's
    # cache write) only
    chain_back: list[Node] = []
    cur = v_in
    write: Node | None = None
    while cur.producer is not None and (cur.producer.op in VIEW_OPS or (write is None and _cache_write(cur.producer))):
        p = cur.producer
        if p.op == "aten.slice.Tensor" and not _full_slice(p):
            return None
        if p.op in VIEW_OPS:
            chain_back.append(p)
            cur = p.args[0]
        else:
            write, cur = p, p.args[3]
    v_lin = cur.producer
    if v_lin is None or not _is_linear_with_param_weight(v_lin):
        return None
    forward = _follow_views(users, v_lin.output, outputs)
    if write is not None:  # v → views → the cache write (its only reader) → the new cache (a step output) → views
        if forward is None or forward[0] is not write.args[3] or _readers(users, write.args[3]) != [write]:
            return None
        after_write = _follow_views(users, write.output, outputs - {id(write.output)})
        if after_write is None or after_write[0] is not v_in:
            return None
        forward = (v_in, forward[1] + after_write[1])
    if forward is None or forward[0] is not v_in:
        return None  # v's output is read by something else on the way (a KV cache output, say)
    if any(r is not att for r in _readers(users, v_in)):
        return None
    after = _follow_views(users, att.output, outputs)
    if after is None:
        return None
    cons = _linear_readers(users, after[0], outputs)
    if not cons:
        return None
    channels = int(v_lin.args[1].tensor_type.shape[0])
    in_features = int(cons[0].args[1].tensor_type.shape[1])
    head_dim = _head_dim(forward[1], channels)
    if head_dim is None:
        return None
    expand = None if in_features == channels else gqa_expand_index(channels, in_features, head_dim)
    return MigrationSite("attention-v", v_lin, cons, channels, expand)


def site_for(graph: Graph, consumers: list[Node], sites: list[MigrationSite] | None = None) -> MigrationSite | None:
    """The site whose consumers are exactly ``consumers`` (a group of linears sharing one input), if any."""
    ids = {id(c) for c in consumers}
    for s in sites if sites is not None else find_sites(graph):
        if {id(c) for c in s.consumers} == ids:
            return s
    return None


# ---- transformation ---------------------------------------------------------------------------------------


def apply_scale(graph: Graph, site: MigrationSite, s: torch.Tensor) -> None:
    """Divide the site's producer by ``s`` and multiply its consumers' input columns by ``s`` (in place).

    ``s`` may live on another device (a scale found on the GPU): the params keep their own device.
    """
    if s.dim() != 1 or s.numel() != site.channels:
        raise MigrationError(f"{site.name}: scale has {s.numel()} entries, the producer has {site.channels} channels")
    s = s.to(site.consumers[0].args[1].data.device)
    users = graph.users()
    p = site.producer
    if site.kind == "norm":
        gain = p.arg(1, "weight")
        bias = p.arg(2, "bias") if p.op == "layer_norm" else None
        dtype = p.output.tensor_type.dtype
        g_old = norm_gain(p)  # float64: the new gain is rounded once, into the weight's stored form
        if g_old is None:
            g_old = torch.ones(site.channels, dtype=torch.float64, device=s.device)
        g_new, b_new = divide_norm(g_old, bias.data if bias is not None else None, s, dtype)
        if gain is not None:
            gv = private_weight(graph, p, 1, users, f"{p.module}.weight")
            graph.set_param(gv.name, gain_weight(p, g_new, gain.data.dtype))
        else:
            args = list(p.args) + [None] * max(0, 2 - len(p.args))
            args[1] = graph.add_param(graph.fresh_param_name(f"{p.module or p.name}.weight"),
                                      gain_weight(p, g_new, dtype))
            p.args = tuple(args)
        if bias is not None and b_new is not None:
            bv = private_weight(graph, p, 2, users, f"{p.module}.bias")
            graph.set_param(bv.name, b_new)
    else:
        w = private_weight(graph, p, 1, users, f"{p.module}.weight")
        b = p.args[2] if len(p.args) > 2 else None
        w_new, b_new = divide_rows(w.data, b.data if isinstance(b, Value) else None, s)
        graph.set_param(w.name, w_new)
        if isinstance(b, Value) and b_new is not None:
            bv = private_weight(graph, p, 2, users, f"{p.module}.bias")
            graph.set_param(bv.name, b_new)
        elif b is not None and not isinstance(b, Value):
            raise MigrationError(f"{site.name}: producer %{p.name} has a non-param bias")
    for c in site.consumers:
        w = private_weight(graph, c, 1, users, f"{c.module}.weight")
        graph.set_param(w.name, multiply_columns(w.data, s.to(torch.float64), site.expand))
