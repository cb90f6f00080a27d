"""What a compiled graph holds, in Hugging Face terms: each linear's weight (float or QDQ codes), its input
activation scheme, and every other tensor under the HF parameter name the model's ``state_dict`` uses.

The IR keeps every node's HF module path (``model.layers.3.mlp.down_proj``), so a linear's weight is
``<module>.weight`` whatever name a pass gave the param (a tied ``lm_head`` copied by ``fold-norms`` reads
``lm_head.weight``; the quantize pass stores codes as ``<w>.qdata``). A norm whose gain a pass folded away has
weight None: HF needs a gain, and ones are exact (``1·y == y``). Anything the HF model cannot express — a param
under a name the HF model does not have (a rotation matrix, a bias added to a bias-free linear), a quantized
tensor that is not a linear weight — is refused with the node and param named.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from lowbit.checkpoint.files import CheckpointError
from lowbit.ir.graph import Graph, Node, Value
from lowbit.ir.quant import get_qdtype, unpack_int4
from lowbit.ir.rewrite import gain_weight
from lowbit.ir.rotation_regions import is_rotary_output, qk_sources

__all__ = ["ActScheme", "QuantWeight", "HFView", "hf_view", "quantizes_kv"]

QDQ_OPS = {"quantize", "dequantize", "dynamic_qparams"}
NO_HF_FIELD = {
    "hadamard": "an online Hadamard rotation ({site}, rotate's {option}=true) has no field in the HF formats lowbit "
                "writes; rotate({option}=false) leaves it out and keeps the rotations that fold into the weights",
}
"""Ops a pass adds that change a model's outputs and that no HF checkpoint field expresses, with what to do
(``{site}`` / ``{option}``: where the node sits and the option that put it there, ``_no_field_advice``)."""


def _no_field_advice(graph: Graph, node: Node) -> str:
    """``NO_HF_FIELD``'s advice for ``node``, naming the rotate option that made it: the advice named
    ``qk=false`` for a Hadamard before down_proj, where only ``online=false`` applies."""
    if node.op != "hadamard":
        return NO_HF_FIELD[node.op]
    src = node.args[0].producer if isinstance(node.args[0], Value) else None
    if src is not None and is_rotary_output(src):
        site, option = ("on a query or key after rotary, whose pair does not cancel in q·kᵀ here (one of them "
                        "has another reader, such as a KV-cache quantizer)", "qk")
    elif _reads_attention(node):
        site, option = f"on the attention output before {node.module!r}", "online_o"
    else:
        site, option = f"before {node.module!r}", "online"
    return NO_HF_FIELD[node.op].format(site=site, option=option)


def _reads_attention(node: Node, depth: int = 8) -> bool:
    """Whether ``node`` reads an attention's output through views (the head merge before o_proj), not through a
    linear or anything else that computes."""
    v = node.args[0]
    for _ in range(depth):
        p = v.producer if isinstance(v, Value) else None
        if p is None or p.op in ("linear", "qlinear", "hadamard", "rms_norm", "layer_norm"):
            return False
        if p.op in ("attention", "cache_attention"):
            return True
        v = p.args[0] if p.args else None
    return False


@dataclass(frozen=True)
class ActScheme:
    """A linear input's quantization: dynamic (scales computed per call) or static (a stored scale)."""

    qdtype: str
    symmetric: bool
    strategy: str  # "token", "group", "tensor"
    group_size: int | None = None
    dynamic: bool = True


@dataclass
class QuantWeight:
    """One linear's stored weight: codes in lowbit's qdtype, scales ``[N]`` or ``[N, K/g]``, or with ``tile``
    ``(rows, cols)`` one scale per tile, ``[ceil(N/rows), ceil(K/cols)]`` (``group`` None then).

    ``stored`` is the graph's tensor as it is (``packed``: int4 two codes a byte); ``codes`` unpacks it to
    ``[N, K]`` on each read. Why not once, here: a view holds every linear of the model at once, and unpacked int4
    codes are twice the packed bytes, so a save held the whole model's codes at a byte each on top of the model
    (0.34 GiB for a 1.1 GB model); unpacked on read, only the linear being written is.
    """

    module: str
    qdtype: str
    stored: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor | None
    group: int | None
    out_dtype: torch.dtype
    act: ActScheme | None = None
    act_scale: torch.Tensor | None = None
    packed: bool = False
    tile: tuple[int, int] | None = None

    @property
    def codes(self) -> torch.Tensor:
        """The codes as ``[N, K]`` integers (or fp8 values) in the qdtype's container."""
        return unpack_int4(self.stored, signed=get_qdtype(self.qdtype).signed) if self.packed else self.stored

    @property
    def shape(self) -> tuple[int, int]:
        """``(N, K)`` of the weight, without unpacking it."""
        n, k = self.stored.shape
        return (int(n), int(k) * 2 if self.packed else int(k))

    @property
    def symmetric(self) -> bool:
        return self.zero_point is None

    def signed_codes(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Codes and zero point as signed ints centred on 0 (compressed-tensors' convention): uint4 ``q`` is
        ``q - 8``, its zero point ``zp - 8``; ``(q - zp)`` and so the dequantized weight are unchanged."""
        qd = get_qdtype(self.qdtype)
        if qd.is_float:
            return self.codes, None
        off = 0 if qd.signed else 1 << (qd.bits - 1)
        q = (self.codes.to(torch.int16) - off).to(torch.int8)
        zp = None if self.zero_point is None else (self.zero_point.to(torch.int16) - off).to(torch.int8)
        return q, zp


@dataclass
class HFView:
    """Float tensors by HF name, quantized linears by module, and what no HF name covers."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    quantized: dict[str, QuantWeight] = field(default_factory=dict)
    float_linears: list[str] = field(default_factory=list)
    kv: list[Node] = field(default_factory=list)
    tied_lm_head: bool = False
    zero_heads: dict[str, Any] = field(default_factory=dict)
    """Head-pruned blocks written at the config's head counts with zero heads (``lowbit.checkpoint.zero_heads``):
    the counts written and each block's kept heads, for the save's record."""
    sparsity: dict[str, str] = field(default_factory=dict)
    """Linear module -> the pattern ``sparsify`` pruned it to (``node.meta["sparsity"]``: ``2:4``,
    ``unstructured-0.5``): a compressed-tensors checkpoint declares it, so runtimes can pick 2:4 kernels."""
    conv1d: list[str] = field(default_factory=list)
    """Quantized linears that are ``Conv1D`` in the HF model (GPT-2's, weight stored ``[in, out]``): their codes are
    in the linear's ``[N, K]`` as every other's, which GPTQ's layout is for them too; a format whose layout follows the
    module's weight (compressed-tensors) refuses them."""
    experts: list[str] = field(default_factory=list)
    """The linears that are mixture-of-experts projections (``lowbit.models.DenseExperts``' slices), under their
    checkpoint names: transformers has no module for them and merges their dequantized weights at load."""


def _param(v: Any, node: Node, what: str) -> torch.Tensor:
    if not isinstance(v, Value) or not v.is_param or v.data is None:
        raise CheckpointError(f"node %{node.name} ({node.op}, module {node.module!r}): its {what} is computed "
                              f"in the graph ({v!r}), not stored; an HF checkpoint can only hold stored tensors")
    return v.data


def _weight(node: Node) -> tuple[torch.Tensor | None, QuantWeight | None]:
    """The linear's float weight, or its QDQ codes."""
    w = node.args[1]
    if isinstance(w, Value) and w.is_param:
        return w.data, None
    dq = w.producer if isinstance(w, Value) else None
    if dq is None or dq.op != "dequantize":
        raise CheckpointError(f"linear %{node.name} (module {node.module!r}) reads a computed weight "
                              f"(%{getattr(w, 'name', w)} from {dq.op if dq else '?'}): not expressible as an HF "
                              "checkpoint")
    qv, sv, zv = (list(dq.args) + [None, None])[:3]
    q = _param(qv, dq, "quantized weight")
    scale = _param(sv, dq, "weight scale")
    zp = _param(zv, dq, "weight zero point") if zv is not None else None
    qdtype = dq.kwargs["qdtype"]
    qd = get_qdtype(qdtype)
    axis, block = dq.kwargs.get("axis"), dq.kwargs.get("block_size")
    n, k = q.shape[0], q.shape[1] * 2 if qd.packed else q.shape[1]
    tile = None
    if isinstance(block, (list, tuple)) and list(axis or []) in ([0, 1], [-2, -1]) and len(block) == 2 \
            and scale.shape == (-(-n // block[0]), -(-k // block[1])):
        group, tile = None, (int(block[0]), int(block[1]))
    elif block is None and axis in (0, -2) and scale.shape == (n,):
        group = None
    elif block is not None and axis in (1, -1) and scale.shape == (n, -(-k // block)):
        if k % block:
            raise CheckpointError(f"linear %{node.name} (module {node.module!r}): group {block} does not divide "
                                  f"K={k}; HF formats need whole groups")
        group = int(block)
    else:
        raise CheckpointError(f"linear %{node.name} (module {node.module!r}): weight scale {tuple(scale.shape)} "
                              f"with axis={axis}, block_size={block} is neither per channel, per group nor in "
                              f"[N, K] tiles (per-tensor weight scales are not written to HF formats)")
    return None, QuantWeight(node.module, qdtype, q, scale, zp, group, dq.kwargs.get("out_dtype", torch.float32),
                             packed=qd.packed, tile=tile)


def _act(node: Node, k: int) -> tuple[ActScheme | None, torch.Tensor | None]:
    """The scheme of a dynamic/static QDQ in front of the linear's input, if any."""
    x = node.args[0]
    dq = x.producer if isinstance(x, Value) else None
    if dq is None or dq.op != "dequantize":
        return None, None
    q = dq.args[0].producer if isinstance(dq.args[0], Value) else None
    if q is None or q.op != "quantize":
        return None, None
    qdtype = dq.kwargs["qdtype"]
    scale = dq.args[1]
    zp = dq.arg(2, "zero_point")
    if isinstance(scale, Value) and scale.producer is not None and scale.producer.op == "dynamic_qparams":
        qp = scale.producer
        gran, block = qp.kwargs.get("granularity"), qp.kwargs.get("block_size")
        if qp.kwargs.get("clip_ratio", 1.0) != 1.0:
            raise CheckpointError(f"linear %{node.name} (module {node.module!r}): dynamic input scales clipped to "
                                  f"{qp.kwargs['clip_ratio']} of the range (quantize a_clip) have no HF-format field")
        sym = bool(qp.kwargs.get("symmetric", True))
        if gran == "per_tensor":
            return ActScheme(qdtype, sym, "tensor"), None
        if gran == "per_token":
            if block in (None, k):
                return ActScheme(qdtype, sym, "token"), None
            return ActScheme(qdtype, sym, "group", int(block)), None
        raise CheckpointError(f"linear %{node.name} (module {node.module!r}): dynamic {gran} input quantization "
                              "has no HF-format equivalent (per_token, per-token groups and per_tensor do)")
    s = _param(scale, dq, "input scale")
    if s.numel() != 1:
        raise CheckpointError(f"linear %{node.name} (module {node.module!r}): static input scale of shape "
                              f"{tuple(s.shape)}; HF formats store static input scales per tensor only")
    if zp is not None and isinstance(zp, Value) and zp.is_param and bool((zp.data != 0).any()):
        raise CheckpointError(f"linear %{node.name} (module {node.module!r}): static asymmetric input scales are "
                              "not written to HF formats")
    return ActScheme(qdtype, True, "tensor", dynamic=False), s.reshape(1)


def _put(view: HFView, key: str, t: torch.Tensor, node: Node) -> None:
    old = view.tensors.get(key)
    if old is not None and old is not t and not (old.shape == t.shape and old.dtype == t.dtype
                                                 and torch.equal(old, t)):
        raise CheckpointError(f"HF parameter {key!r} gets two different tensors (the second from node "
                              f"%{node.name}, {node.op}); the checkpoint cannot hold both")
    view.tensors[key] = t


def _qk_rotations(graph: Graph) -> set[int]:
    """The online Hadamards on rotary outputs (rotate's R3) of the attentions whose query and key both get one:
    ``(qH)(kH)^T = q k^T``, so without them the float model is the same (a quantized KV cache, where they matter,
    is refused by the HF writers on its own). Paired through each attention's operands, not by module path: a
    generation step graph's rotaries have none, and there every layer's R3 was refused."""
    users = graph.users()
    exact: set[int] = set()
    for att in graph.nodes:
        if att.op != "attention":
            continue
        hads = [v.producer for v in qk_sources(att)]
        if len(hads) == 2 and all(
                h is not None and h.op == "hadamard" and len(users.get(id(h.output), [])) == 1
                and isinstance(h.args[0], Value) and h.args[0].producer is not None
                and is_rotary_output(h.args[0].producer) for h in hads):
            exact.update(id(h) for h in hads)
    return exact


def quantizes_kv(dq: Node, users: dict[int, list[Node]], depth: int = 8) -> bool:
    """Whether ``dq`` dequantizes an activation that reaches an attention before any linear: the KV cache's QDQ.
    Found by structure as well as by ``meta["kv"]``, which the IR text does not keep: a lowbit checkpoint of a
    KV-quantized graph reloaded without it, and its compressed-tensors save dropped the KV quantization."""
    if dq.meta.get("kv"):
        return True
    if not isinstance(dq.args[0], Value) or dq.args[0].is_param:  # a weight's codes
        return False
    frontier, seen = [dq.output], set()
    for _ in range(depth):  # the view chain (GQA's repeat, a float window's cat) between the QDQ and attention
        nxt = []
        for v in frontier:
            for u in users.get(id(v), []):
                if "attention" in u.op:
                    return True
                if u.op != "linear" and id(u) not in seen:
                    seen.add(id(u))
                    nxt.extend(u.outputs)
        frontier = nxt
    return False


def hf_view(graph: Graph, hf_keys: dict[str, tuple[int, ...]], derived: set[str] = frozenset(),
            conv1d: frozenset[str] = frozenset()) -> HFView:
    """Map ``graph`` onto the HF parameter names ``hf_keys`` (name → shape) of the model it was captured from.

    ``derived`` are the model's non-persistent buffers (rotary ``inv_freq``): HF recomputes them from the config,
    so they are not written. ``conv1d``: module paths that are ``Conv1D`` in the HF model (GPT-2), whose weight is
    stored ``[in, out]``: a float linear's weight is written transposed back; a quantized one is listed in
    ``view.conv1d`` (its codes stay ``[N, K]``)."""
    view = HFView()
    used: set[str] = set(derived)
    exact_qk = _qk_rotations(graph)
    for node in graph.nodes:
        if node.op == "linear":
            w, qw = _weight(node)
            key = f"{node.module}.weight"
            if node.meta.get("sparsity"):
                view.sparsity[node.module] = node.meta["sparsity"]
            if key not in hf_keys:
                raise CheckpointError(f"linear %{node.name} has module path {node.module!r}, but the HF model has no "
                                      f"parameter {key!r}; cannot name its weight in an HF checkpoint")
            if qw is None and node.module in conv1d:
                w = w.t().contiguous()
            if qw is not None:
                if node.module in conv1d:
                    view.conv1d.append(node.module)
                if qw.shape != tuple(hf_keys[key])[::1 if node.module not in conv1d else -1]:
                    raise CheckpointError(f"linear %{node.name} (module {node.module!r}): its quantized weight is "
                                          f"{qw.shape}, but the model's config makes {key!r} "
                                          f"{tuple(hf_keys[key])}; the checkpoint would not load")
                qw.act, qw.act_scale = _act(node, qw.shape[1])
                view.quantized[node.module] = qw
                used.update(v.name for v in node.args[1].producer.inputs())
                if qw.act_scale is not None:  # a static input scale (and zero zero point): written as input_scale
                    used.update(v.name for v in node.args[0].producer.inputs() if v.is_param)
            else:
                _put(view, key, w, node)
                view.float_linears.append(node.module)
                used.add(node.args[1].name)
                act, _ = _act(node, w.shape[1])
                if act is not None:
                    raise CheckpointError(f"linear %{node.name} (module {node.module!r}) has a quantized input but a "
                                          "float weight; HF formats quantize inputs only with the weight")
            b = node.arg(2, "bias")
            if b is not None:
                bkey = f"{node.module}.bias"
                if bkey not in hf_keys:
                    raise CheckpointError(f"linear %{node.name} (module {node.module!r}) has a bias "
                                          f"(@{getattr(b, 'name', b)}) but the HF model has no {bkey!r} "
                                          "(a pass added it: prune-mlp/prune-heads compensation, the OBS refit, "
                                          "fold-norms on a LayerNorm), and this architecture's config has no switch "
                                          "that gives it one (Llama-style configs' mlp_bias / attention_bias); "
                                          "save with format='lowbit'")
                _put(view, bkey, _param(b, node, "bias"), node)
                used.add(b.name)
            continue
        if node.op in ("rms_norm", "layer_norm"):
            for idx, name, fill in ((1, "weight", torch.ones), (2, "bias", torch.zeros)):
                if name == "bias" and node.op == "rms_norm":
                    continue
                key = f"{node.module}.{name}"
                v = node.arg(idx, name)
                if v is None:
                    if key in hf_keys:  # folded away: the HF norm needs an identity gain / zero bias
                        t = fill(hf_keys[key], dtype=torch.float32)
                        if name == "weight":  # in the norm's stored form (Gemma's 1 + w: an identity gain is 0)
                            t = gain_weight(node, t, torch.float32)
                        _put(view, key, t, node)
                    continue
                if key not in hf_keys:
                    raise CheckpointError(f"{node.op} %{node.name} (module {node.module!r}) has a {name} but the HF "
                                          f"model has no parameter {key!r}")
                _put(view, key, _param(v, node, name), node)
                used.add(v.name)
            continue
        if node.op in QDQ_OPS:
            continue
        if node.op == "hadamard" and id(node) in exact_qk:
            continue
        if node.op in NO_HF_FIELD:
            raise CheckpointError(f"node %{node.name} ({node.op}, module {node.module!r}): "
                                  f"{_no_field_advice(graph, node)}; "
                                  "an HF checkpoint would be read without it (a different model). Save it with "
                                  "format='lowbit', which keeps the whole graph")
        if node.op in ("embedding", "aten.embedding.default") and f"{node.module}.weight" in hf_keys:
            table = node.args[0]  # named by module: a tied table may carry the head's name (lm_head.weight)
            if isinstance(table, Value) and table.is_param:
                _put(view, f"{node.module}.weight", table.data, node)
                used.add(table.name)
        for v in node.inputs():
            if v.is_param and v.name not in used:
                if v.name not in hf_keys:
                    raise CheckpointError(f"param @{v.name} (read by %{node.name}, {node.op}, module "
                                          f"{node.module!r}) is not a parameter of the HF model; a pass added it "
                                          "(e.g. a rotation) and HF formats cannot express it")
                _put(view, v.name, v.data, node)
                used.add(v.name)
    users = graph.users()
    for node in graph.nodes:
        if (node.op == "dequantize" and quantizes_kv(node, users)) or node.op == "cache_attention":
            view.kv.append(node)  # QDQ of the accuracy model, or the generation step's packed cache (kv-cache)
    read = {id(v) for n in graph.nodes for v in n.inputs() if v.is_param}
    for name, v in graph.params.items():
        if name not in used and name not in view.tensors and id(v) in read:
            raise CheckpointError(f"param @{name} is read by a quantize/dequantize node that is not a linear's "
                                  "weight; HF formats cannot express it")
    for key, t in view.tensors.items():
        shape = hf_keys.get(key)
        if shape is not None and tuple(t.shape) != tuple(shape):
            raise CheckpointError(f"HF parameter {key!r} has shape {tuple(shape)} in the model's config, but the "
                                  f"graph holds {tuple(t.shape)}")
    return view
