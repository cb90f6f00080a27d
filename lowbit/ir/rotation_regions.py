"""Where an orthogonal rotation folds exactly into a model's weights, and where one must run online.

An analysis, separate from the ``rotate`` pass that uses it (pruning's channel regions need the same walk):

* **Residual stream** (QuaRot's R1): the values that ``embedding`` writes and ``residual_add`` carries. If the
  stream is multiplied by an orthogonal Q everywhere (``x → x·Q``) the model is unchanged when the embedding
  table becomes ``E·Q``, each linear *writing* the stream (``o_proj``, ``down_proj``) becomes ``Qᵀ·W`` (bias
  ``b·Q``), and each linear *reading* a norm of it (q/k/v, gate/up, lm_head) becomes ``W·Q``: unit-gain RMSNorm
  is rotation invariant (``‖x·Q‖ = ‖x‖``), which is why norm gains must be folded first. LayerNorm subtracts
  the mean — ``mean(x·Q) ≠ mean(x)·Q`` — so a stream normalised by LayerNorm is refused with that reason.
  A product of the stream with a number (Granite's embedding and residual multipliers, Gemma's ``sqrt(hidden)``)
  commutes with Q and is passed; a linear reading the stream with no norm between is a reader like the others. A
  norm between a writer and its add (Gemma's sandwich norms, OLMo 2's post-norms) is refused: its gain cannot fold
  into the writer, and with a gain it does not commute with Q. Anything else that reads the stream (a graph
  output, an elementwise op) is refused, naming the node.
* **Per-head V/O** (R2): the values read by ``attention`` are a per-head linear map of ``v_proj``'s output and
  ``o_proj`` reads the heads concatenated, so a ``head_dim`` rotation R folds as ``v_proj`` rows ``Rᵀ·W_h``
  and ``o_proj`` columns ``W·(I ⊗ R)``, when the view ops between keep ``head_dim`` as the last axis.
* **Online sites**: a writer whose input no fold reaches (``down_proj`` reads ``silu(gate)·up``, a product)
  needs ``x → x·H`` computed at run time, folded as ``W·H`` (R4); queries and keys after rotary need ``q·H``
  and ``k·H`` (``q·kᵀ`` is unchanged) so the KV cache stores rotated keys (R3).

In a generation step graph the keys and values reach ``attention`` through the write of the new tokens into the
layer's cache (``scatter(cache, 2, index, new)``, the cache a graph input). Both walks step through that write to
``new``: the rotation then applies to every token as it is written, so the cache holds rotated keys and per-head
rotated values in prefill and decode alike, and what attention reads is rotated consistently. The write is
stepped over only when it cannot mix the rotated (last) axis: it scatters along the sequence axis, its index is
broadcast along the last axis, and the cache is a graph input.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lowbit.ir.graph import Graph, Node, Value

__all__ = ["HeadRegion", "OnlineSite", "ResidualRegion", "RotationRegions", "find_rotation_regions", "is_rotary_output",
           "no_attention_reason", "qk_sources"]

_VIEW_OPS = {"reshape", "transpose", "permute", "aten.reshape.default", "aten.view.default",
             "aten.expand.default", "aten.unsqueeze.default", "aten.clone.default", "aten.contiguous.default",
             "aten.transpose.int", "aten.permute.default"}


_ADD_OPS = ("residual_add", "add", "aten.add.Tensor")
"""Sums that carry the stream (an encoder's word + position embeddings is an ``add``)."""

_SCALE_OPS = ("mul", "aten.mul.Tensor", "aten.div.Tensor")
"""Products with a number, which commute with a rotation (``(x·c)·Q = (x·Q)·c``): Granite's embedding and residual
multipliers, Gemma's ``sqrt(hidden)`` on the embedding."""


def _is_number(x: object) -> bool:
    """A plain number, or a tensor of one element (Gemma's ``sqrt(hidden)`` is a 0-d constant)."""
    if isinstance(x, Value):
        shape = x.tensor_type.shape if x.tensor_type is not None else None
        return shape is not None and all(d == 1 for d in shape)
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _scaled(u: Node, v: Value) -> bool:
    """Whether ``u`` multiplies (or divides) ``v`` by a number and nothing else."""
    if u.op not in _SCALE_OPS or len(u.args) != 2 or u.kwargs:
        return False
    a, b = u.args
    if u.op == "aten.div.Tensor":
        return a is v and _is_number(b)
    return (a is v and _is_number(b)) or (b is v and _is_number(a))


def _writer_through_scales(other: Value, users: dict[int, list[Node]]) -> tuple[Node | None, list[Node]]:
    """The node that makes ``other`` once the products with numbers between it and the add are stepped over, and
    those products; None when a value on the way (the node's output included) has another reader."""
    scales: list[Node] = []
    while True:
        if len(users.get(id(other), [])) != 1:
            return None, scales
        p = other.producer
        tensor_in = next((a for a in p.args if isinstance(a, Value) and not _is_number(a)), None) if p else None
        if tensor_in is None or tensor_in.producer is None or not _scaled(p, tensor_in):
            return p, scales
        scales.append(p)
        other = tensor_in


@dataclass
class ResidualRegion:
    """The residual stream of width ``dim`` and the nodes a rotation of it touches."""

    dim: int
    embeddings: list[Node] = field(default_factory=list)
    readers: list[Node] = field(default_factory=list)
    """Linears reading ``norm(stream)``: rotate their weight's input side (W·Q)."""
    writers: list[Node] = field(default_factory=list)
    """Linears whose output is added to the stream: rotate their output side (Qᵀ·W, b·Q)."""
    norms: list[Node] = field(default_factory=list)
    adds: list[Node] = field(default_factory=list)
    scales: list[Node] = field(default_factory=list)
    """Products of the stream (or of a writer's output) with a number: a rotation passes them unchanged."""


@dataclass
class HeadRegion:
    """A v_proj → attention → o_proj path that a per-head rotation of size ``head_dim`` folds into."""

    v_proj: Node
    o_proj: Node
    attention: Node
    head_dim: int


@dataclass
class OnlineSite:
    """Where a rotation must run at inference: ``before`` a linear's input, or ``after`` a rotary output."""

    kind: str
    """"linear_input" (down_proj: fold H into the weight, run x·H) or "rotary_output" (q/k for the KV cache)."""
    node: Node
    dim: int


@dataclass
class RotationRegions:
    residual: ResidualRegion | None
    heads: list[HeadRegion]
    online: list[OnlineSite]
    refused: list[str]
    """Why a region is missing: each line names the node, op and module."""
    tied: list[str]
    """Params read by the embedding and by another node (a tied lm_head): the rotation must untie them."""

    def summary(self) -> dict[str, object]:
        r = self.residual
        return {
            "residual_dim": r.dim if r else None,
            "readers": len(r.readers) if r else 0,
            "writers": len(r.writers) if r else 0,
            "head_regions": len(self.heads),
            "online": [f"{s.kind}:{s.node.module or s.node.name}[{s.dim}]" for s in self.online],
            "refused": list(self.refused),
            "tied": list(self.tied),
        }


def _where(n: Node) -> str:
    return f"%{n.name} ({n.op}, module {n.module or '?'})"


def _last_dim(v: Value) -> int | None:
    shape = v.tensor_type.shape
    return shape[-1] if shape and isinstance(shape[-1], int) else None


def _residual(graph: Graph, users: dict[int, list[Node]], refused: list[str]) -> tuple[ResidualRegion | None, bool]:
    """The stream's region and whether a rotation folds into all of it; the region is returned even when it does
    not (a LayerNorm), since its writers still take an online Hadamard, which needs no fold through the norms."""
    embeddings = [n for n in graph.nodes if n.op == "embedding"]
    if not embeddings:
        refused.append("residual stream: no embedding node starts one")
        return None, False
    dim = _last_dim(embeddings[0].output)
    region = ResidualRegion(dim=dim or 0, embeddings=embeddings)
    outputs = graph.output_ids()
    stream: list[Value] = [e.output for e in embeddings]
    seen: set[int] = set()
    ok = True
    while stream:
        v = stream.pop()
        if id(v) in seen:
            continue
        seen.add(id(v))
        if _last_dim(v) != dim:
            refused.append(f"residual stream: %{v.name} has width {_last_dim(v)}, not {dim}")
            ok = False
        if id(v) in outputs:
            refused.append(f"residual stream: %{v.name} is a graph output (a rotation there is not undone)")
            ok = False
        for u in users.get(id(v), []):
            if u.op in _ADD_OPS:
                if u not in region.adds:
                    region.adds.append(u)
                stream.append(u.output)
                for other in u.args[:2]:
                    if other is v or id(other) in seen or other.producer is None:
                        continue
                    if other.producer.op in _ADD_OPS or other.producer.op == "embedding":
                        continue
                    p, scales = _writer_through_scales(other, users)
                    if p is not None and p.op == "rms_norm":
                        refused.append(f"residual stream: {_where(u)} adds {_where(p)}, a norm of a block's output "
                                       "(a sandwich / post-norm): its gain cannot fold into the linear before it, and "
                                       "with a gain it does not commute with a rotation")
                        ok = False
                    elif p is None or p.op != "linear":
                        refused.append(f"residual stream: {_where(u)} adds {_where(other.producer)}, which is not a "
                                       "linear read only by this add (or by a product with a number before it)")
                        ok = False
                    else:
                        if p not in region.writers:
                            region.writers.append(p)
                        region.scales.extend(n for n in scales if n not in region.scales)
            elif u.op == "rms_norm" and u.args[0] is v:
                region.norms.append(u)
                for r in users.get(id(u.output), []):
                    if r.op != "linear" or r.args[0] is not u.output:
                        refused.append(f"residual stream: {_where(u)} is read by {_where(r)}, not a linear's input")
                        ok = False
                    elif r not in region.readers:
                        region.readers.append(r)
            elif u.op == "linear" and u.args[0] is v and all(a is not v for a in u.args[1:]):
                if u not in region.readers:  # a linear reading the stream itself (no norm between): W·Q as well
                    region.readers.append(u)
            elif _scaled(u, v):
                if u not in region.scales:
                    region.scales.append(u)
                stream.append(u.output)
            elif u.op == "layer_norm":
                refused.append(f"residual stream: {_where(u)} is a LayerNorm: it subtracts the mean, and "
                               "mean(x·Q) != mean(x)·Q, so no rotation folds through it exactly")
                ok = False
            elif u.module and any(w.op == "aten.mean.dim" and w.module == u.module for w in users.get(id(v), [])):
                # a norm capture left as ATen that takes the stream's own mean (Cohere's LayerNorm without a bias):
                # its mean, sub and var each read the stream, and were refused three times as bare ATen readers
                if not any(f"module {u.module!r} takes the mean" in r for r in refused):
                    refused.append(f"residual stream: module {u.module!r} takes the mean of %{v.name} "
                                   f"({_where(u)}): a LayerNorm-type norm (it subtracts the mean; not raised to "
                                   "layer_norm), and mean(x·Q) != mean(x)·Q, so no rotation folds through it exactly")
                ok = False
            else:
                refused.append(f"residual stream: %{v.name} is read by {_where(u)}, through which a rotation does "
                               "not fold")
                ok = False
    return region, ok


CACHE_WRITE = "aten.scatter.src"
"""How a generation step graph writes the new keys/values into a layer's cache: ``scatter(cache, 2, index, new)``."""


def cache_write_source(v: Value) -> Value | None:
    """``new`` when ``v`` is a step graph's cache write ``scatter(cache, dim, index, new)`` that a rotation of the
    last axis commutes with: ``cache`` a graph input, ``dim`` not the last axis and ``index`` an expand of a
    tensor whose last axis has size 1 (the same slot for every channel); else None."""
    n = v.producer
    if n is None or n.op != CACHE_WRITE or len(n.args) != 4 or n.kwargs:
        return None
    cache, dim, index, new = n.args
    if not isinstance(cache, Value) or cache.kind != "input" or not isinstance(dim, int) or \
            not isinstance(index, Value) or not isinstance(new, Value):
        return None
    shape = cache.tensor_type.shape if cache.tensor_type is not None else None
    if not shape or dim % len(shape) == len(shape) - 1:
        return None
    src = index.producer
    if src is None or src.op != "aten.expand.default" or not isinstance(src.args[0], Value) or \
            _last_dim(src.args[0]) != 1:
        return None
    return new


def _view_source(v: Value, users: dict[int, list[Node]], hd: int) -> tuple[Value, bool]:
    """Walk back through view ops (and a step graph's cache write) keeping ``hd`` last; (source, whether every
    step kept it)."""
    kept = True
    while v.producer is not None and (v.producer.op in _VIEW_OPS or cache_write_source(v) is not None):
        p = v.producer
        if p.op == CACHE_WRITE:
            v = cache_write_source(v)
            kept = kept and _last_dim(v) == hd
            continue
        src = p.args[0]
        if _last_dim(src) != hd:
            # the split of [.., H·hd] into [.., H, hd] is the first step after the linear, and only that one
            kept = kept and p.op in ("reshape", "aten.reshape.default", "aten.view.default") and \
                src.producer is not None and src.producer.op == "linear" and (_last_dim(src) or 0) % hd == 0
        if p.op in ("transpose", "aten.transpose.int"):
            rank = len(p.output.tensor_type.shape)
            kept = kept and all(d % rank != rank - 1 for d in p.args[1:3])
        if p.op in ("permute", "aten.permute.default"):
            dims = p.args[1]
            kept = kept and dims[-1] % len(dims) == len(dims) - 1
        v = src
    return v, kept


def no_attention_reason(graph: Graph) -> str:
    """Why ``graph`` has no ``attention`` node to work on, naming the softmax of an attention written out by hand
    (DeBERTa; Gemma 2's soft-capped logits), which lowbit does not raise."""
    written_out = [n for n in graph.nodes if n.op in ("softmax", "aten.softmax.int", "aten._softmax.default")]
    return "the graph has no attention op" + (
        f" (its attention is written out: {written_out[0].op} in {written_out[0].module or '?'}; lowbit raises "
        "scaled-dot-product attention only)" if written_out else "")


def _heads(graph: Graph, users: dict[int, list[Node]], refused: list[str]) -> list[HeadRegion]:
    found = []
    if not any(n.op == "attention" for n in graph.nodes):
        # said, not silent: rotate(residual=false) on DeBERTa reported 'no change' naming only the residual stream
        refused.append("per-head V/O: " + no_attention_reason(graph))
    for att in (n for n in graph.nodes if n.op == "attention"):
        v_in = att.args[2]
        hd = _last_dim(v_in)
        src, kept = _view_source(v_in, users, hd)
        v_proj = src.producer
        if v_proj is None or v_proj.op != "linear" or not kept or not v_proj.args[1].is_param:
            refused.append(f"per-head V/O: the values of {_where(att)} are not a stored-weight linear reshaped "
                           "to [.., heads, head_dim]")
            continue
        if len(users.get(id(v_proj.output), [])) != 1:
            refused.append(f"per-head V/O: {_where(v_proj)} is read by more than the attention")
            continue
        # forward from attention to o_proj through views that merge [.., H, hd] into [.., H·hd] last
        cur, ok = att.output, True
        while True:
            us = users.get(id(cur), [])
            if len(us) != 1:
                ok = False
                break
            u = us[0]
            if u.op == "linear" and u.args[0] is cur:
                break
            if u.op not in _VIEW_OPS:
                ok = False
                break
            out_last = _last_dim(u.output)
            if u.op in ("transpose", "aten.transpose.int"):
                rank = len(u.output.tensor_type.shape)
                ok = ok and all(d % rank != rank - 1 for d in u.args[1:3])
            elif out_last != hd:
                ok = ok and _last_dim(cur) == hd and out_last is not None and out_last % hd == 0
            cur = u.output
        o_proj = users[id(cur)][0] if ok else None
        if o_proj is None or not o_proj.args[1].is_param:
            refused.append(f"per-head V/O: the output of {_where(att)} does not reach a stored-weight linear through "
                           "head-merging views")
            continue
        found.append(HeadRegion(v_proj=v_proj, o_proj=o_proj, attention=att, head_dim=hd))
    return found


def qk_sources(att: Node) -> list[Value]:
    """The values the query and key of attention ``att`` are views of: each operand walked back through view ops
    and a step graph's cache write (where rotate puts R3's online Hadamard, and where a checkpoint writer finds it
    again). Found from the attention, not by module path: a step graph's rotary has none."""
    out = []
    for operand in att.args[:2]:
        v = operand
        while isinstance(v, Value) and v.producer is not None:
            if v.producer.op in _VIEW_OPS:
                v = v.producer.args[0]
            elif (new := cache_write_source(v)) is not None:  # a step graph's key: rotate it before the cache
                v = new
            else:
                break
        if isinstance(v, Value):
            out.append(v)
    return out


def _rotary_sources(att: Node, users: dict[int, list[Node]]) -> list[Node]:
    """The rotary nodes making the query and key ``att`` reads (through views and a step graph's cache write)."""
    return [v.producer for v in qk_sources(att) if v.producer is not None and is_rotary_output(v.producer)]


def is_rotary_output(node: Node) -> bool:
    """``node`` is a rotary or a partial rotary's concatenation: its output is a whole head vector after rotary."""
    return node.op == "rotary" or _partial_rotary(node)


def _partial_rotary(node: Node) -> bool:
    """A partial rotary's ``cat([rotary(x[..., :r]), x[..., r:]], -1)`` (StableLM, GPT-NeoX, Phi): the whole head
    vector after its rotary, where a Hadamard on both query and key leaves q·kᵀ exact as after a full rotary."""
    if node.op not in ("aten.cat.default", "cat") or not node.args or not isinstance(node.args[0], (list, tuple)):
        return False
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    shape = node.output.tensor_type.shape
    if not isinstance(dim, int) or not shape or dim % len(shape) != len(shape) - 1:
        return False
    return any(isinstance(p, Value) and p.producer is not None and p.producer.op == "rotary" for p in node.args[0])


def find_rotation_regions(graph: Graph) -> RotationRegions:
    """Every place a rotation folds exactly, every place one must run online, and what is refused and why."""
    users = graph.users()
    refused: list[str] = []
    stream, foldable = _residual(graph, users, refused)
    residual = stream if foldable else None
    heads = _heads(graph, users, refused)
    online: list[OnlineSite] = []
    o_projs = {id(h.o_proj) for h in heads}
    if stream is not None:  # x·H before a writer, W·H in it: exact whatever normalises the stream
        for w in stream.writers:
            if id(w) not in o_projs:
                online.append(OnlineSite("linear_input", w, _last_dim(w.args[0]) or 0))
    for att in (n for n in graph.nodes if n.op == "attention"):
        rotaries = _rotary_sources(att, users)
        if len(rotaries) != 2:  # q·H with k unrotated (or the reverse) would change q·kᵀ: both or neither
            done = [v.producer for v in qk_sources(att) if v.producer is not None and v.producer.op == "hadamard"
                    and isinstance(v.producer.args[0], Value) and v.producer.args[0].producer is not None
                    and is_rotary_output(v.producer.args[0].producer)]
            if len(done) == 2:  # a rotated graph: the reason is not a missing rotary
                refused.append(f"q/k after rotary: the query and key of {_where(att)} already are online Hadamards "
                               f"of its rotary outputs (%{done[0].output.name}, %{done[1].output.name}: the graph "
                               "was rotated before), and another would undo them (x·H·H = x)")
            elif any(n.op == "rotary" for n in graph.nodes):
                refused.append(f"q/k after rotary: the query and key of {_where(att)} do not both come from a "
                               "rotary (or a partial rotary's concatenation) through views and a cache write, so "
                               "neither gets the online Hadamard")
            continue
        for rot in rotaries:
            if all(s.node is not rot for s in online):
                online.append(OnlineSite("rotary_output", rot, _last_dim(rot.output) or 0))
    tied = []
    if residual is not None:
        for e in residual.embeddings:
            w = e.args[0]
            if w.is_param and any(u is not e for u in users.get(id(w), [])):
                tied.append(w.name)
    return RotationRegions(residual, heads, online, refused, tied)
