"""The reference backend: lower a Graph to a torch.fx GraphModule that runs on CPU or CUDA.

Each node becomes one ``call_function`` of its op's callable (``lowbit.ir.ops.resolve``), parameters
become buffers, and device literals baked in at capture (``arange(..., device=cpu)``) are retargeted to the
device asked for. This is the numerics every other backend must reproduce.

With ``semi_structured=True`` a float linear whose weight has the 2:4 pattern keeps it as a semi-structured sparse
tensor (cuSPARSELt, or CUTLASS on compute capability 8.x) on a CUDA device in fp16/bf16
(``lowbit.backends.semi_structured``); ``sparse_report`` names every 2:4 linear kept dense and why. Off by default:
on the H200 cuSPARSELt ran at 0.26-0.48x dense bf16 at M=2048 (bench/results/sparse24.json).
"""

from __future__ import annotations

import operator
import re
from typing import Any

import torch
import torch.fx

from lowbit.backends.routed_experts import ExpertsMatch, build_routed, find_routed_experts, map_values
from lowbit.backends.semi_structured import apply_semi_structured, report_lines
from lowbit.errors import LowbitError
from lowbit.ir.fold import drop_unused_params, fold_constants
from lowbit.ir.fusion import unfuse_qlinear
from lowbit.ir.graph import Graph, Value, map_operands, params_device
from lowbit.ir.kvcache import cache_attention_into
from lowbit.ir.ops import resolve
from lowbit.ir.signature import InputChecker, ordered_inputs


class LoweringError(LowbitError, RuntimeError):
    """A node could not be lowered; the message names the node, op and module."""


def _attr_name(name: str, taken: set[str]) -> str:
    base = re.sub(r"[^A-Za-z0-9_]", "_", name)
    if not base or base[0].isdigit():
        base = "p_" + base
    attr, i = base, 1
    while attr in taken:
        attr, i = f"{base}_{i}", i + 1
    taken.add(attr)
    return attr


@torch.library.custom_op("lowbit::scatter_into", mutates_args=("dst",))
def scatter_into(dst: torch.Tensor, dim: int, index: torch.Tensor, src: torch.Tensor) -> None:
    """``dst.scatter_(dim, index, src)`` as an opaque mutating op. Why not ``aten.scatter_``: under
    ``torch.compile`` functionalization turns an in-place scatter into a graph input into a scatter into a fresh
    buffer plus a ``copy_`` of the whole buffer back (two passes over each KV cache per step: 8 whole-cache copies
    per decode step on a 4-layer model, measured on the H200); a custom op's declared mutation is kept in place.
    On CUDA a decode step's row write (positions broadcast over heads and head_dim) is one Triton launch
    (``lowbit.kernels.decode_step``: 4.2 µs per aten scatter inside the H200 decode step)."""
    if dst.is_cuda:
        from lowbit.kernels.decode_step import cache_rows_index, write_cache_rows

        if cache_rows_index(index, dim, src) and dst.dtype == src.dtype:
            write_cache_rows(dst, index, src, checked=True)
            return
    dst.scatter_(dim, index, src)


@torch.library.custom_op("lowbit::index_copy_into", mutates_args=("dst",))
def index_copy_into(dst: torch.Tensor, dim: int, index: torch.Tensor, src: torch.Tensor) -> None:
    """``dst.index_copy_(dim, index, src)``, kept in place under ``torch.compile`` (see ``scatter_into``)."""
    dst.index_copy_(dim, index, src)


@scatter_into.register_fake
def _(dst: torch.Tensor, dim: int, index: torch.Tensor, src: torch.Tensor) -> None:
    return None


@index_copy_into.register_fake
def _(dst: torch.Tensor, dim: int, index: torch.Tensor, src: torch.Tensor) -> None:
    return None


_INPLACE = {"aten.scatter.src": torch.ops.lowbit.scatter_into.default,
            "aten.index_copy.default": torch.ops.lowbit.index_copy_into.default}
"""Out-of-place ops that may write into a donated input instead (the KV cache of a step graph): each becomes a
mutating op that returns nothing, and the node's output is the donated input itself."""
_SHAPE_ONLY = frozenset({"aten.sym_size.int", "aten.sym_numel.default", "aten.sym_stride.int",
                         "aten.sym_storage_offset.default"})
"""Ops that read only a tensor's metadata: an in-place write leaves what they see unchanged (the step graph reads
the cache's length for the attention mask)."""


def _donated_writes(graph: Graph, donated: set[str]) -> set[int]:
    """Nodes (by id) that may run in place: an ``_INPLACE`` op whose first operand is a donated graph input
    whose data no other node reads (the caller gives the buffer up, so overwriting it is invisible; shape reads
    do not count)."""
    if not donated:
        return set()
    unknown = donated - {v.name for v in graph.inputs}
    if unknown:
        raise LoweringError(f"donated inputs {sorted(unknown)} are not inputs of graph {graph.name}")
    users = graph.users()
    writes = set()
    for v in graph.inputs:
        if v.name not in donated:
            continue
        readers = [r for r in users.get(id(v), []) if r.op not in _SHAPE_ONLY]
        if len(readers) == 1 and readers[0].op in _INPLACE and readers[0].args and readers[0].args[0] is v:
            writes.add(id(readers[0]))
    return writes


def _donated_packed_caches(graph: Graph, donated: set[str]) -> set[int]:
    """``cache_attention`` nodes (by id) whose eight packed-cache operands are donated inputs that no other node
    reads (shape reads aside): their decode steps write into those tensors (``cache_attention_into``)."""
    users = graph.users()
    names = {v.name for v in graph.inputs if v.name in donated}
    writes = set()
    for node in graph.nodes:
        cache = node.args[4:12] if node.op == "cache_attention" else ()
        if len(cache) == 8 and all(isinstance(c, Value) and c.name in names and [
                r for r in users.get(id(c), []) if r.op not in _SHAPE_ONLY] == [node] for c in cache):
            writes.add(id(node))
    return writes


def lower_to_fx(graph: Graph, device: str | torch.device | None = None,
                donated: set[str] | frozenset[str] = frozenset(),
                routed: list[ExpertsMatch] | tuple[()] = ()) -> torch.fx.GraphModule:
    """Build a GraphModule computing ``graph``; parameters are moved to ``device`` if given.

    ``donated`` names inputs whose buffers the caller hands over: a ``scatter``/``index_copy`` that is their
    only reader writes into them in place (the step graph's KV cache: no copy of the whole cache per step),
    so the matching output aliases the input. ``routed``: MoE layers (``find_routed_experts``) whose dense expert
    chain becomes one ``RoutedExperts`` module call, each expert on its routed rows."""
    dev = torch.device(device) if device is not None else None
    covered = {id(n) for m in routed for n in m.covered}
    routed_at = {id(m.output): m for m in routed}
    read_outside = {id(v) for n in graph.nodes if id(n) not in covered for v in map_values(n)}
    only_routed = {id(v) for m in routed for n in m.covered for v in map_values(n)} - read_outside
    inplace = _donated_writes(graph, set(donated))
    packed_inplace = _donated_packed_caches(graph, set(donated)) if donated else set()
    root = torch.nn.Module()
    fxg = torch.fx.Graph()
    env: dict[int, torch.fx.Node] = {}
    taken: set[str] = set()
    for v in graph.inputs:
        env[id(v)] = fxg.placeholder(v.name)
    for name, v in graph.params.items():
        if v.data is None:
            raise LoweringError(f"parameter @{name} has no tensor (IR parsed without weights?)")
        if id(v) in only_routed:  # held by its expert's module
            continue
        attr = _attr_name(name, taken)
        root.register_buffer(attr, v.data.to(dev) if dev is not None else v.data)
        env[id(v)] = fxg.get_attr(attr)

    def operand(x: Any) -> Any:
        if isinstance(x, Value):
            return env[id(x)]
        if isinstance(x, torch.device) and dev is not None:
            return dev
        return x

    for node in graph.nodes:
        if id(node) in routed_at:
            match = routed_at[id(node)]
            module = build_routed(match, lambda v: v.data.to(dev) if dev is not None else v.data)
            attr = _attr_name(match.prefix + ".routed", taken)
            root.add_module(attr, module)
            env[id(node.outputs[0])] = fxg.create_node(
                "call_module", attr, tuple(env[id(v)] for v in (match.dense, match.picked, *match.hidden)), {},
                name=node.outputs[0].name)
            continue
        if id(node) in covered:
            continue
        try:
            fn = (_INPLACE[node.op] if id(node) in inplace else cache_attention_into if id(node) in packed_inplace
                  else resolve(node.op))
        except KeyError as exc:
            raise LoweringError(f"node %{node.name} ({node.op}) in module {node.module!r}: {exc}") from exc
        args, kwargs = map_operands(operand, (node.args, node.kwargs))
        out = fxg.create_node("call_function", fn, tuple(args), kwargs, name=node.outputs[0].name)
        if id(node) in inplace:  # the write returns nothing: readers of its result read the donated input
            out = args[0]
        if len(node.outputs) == 1:
            env[id(node.outputs[0])] = out
        else:
            for i, v in enumerate(node.outputs):
                env[id(v)] = fxg.create_node("call_function", operator.getitem, (out, i), name=v.name)
    outs = [env[id(v)] for v in graph.outputs]
    fxg.output(outs[0] if len(outs) == 1 else tuple(outs))
    gm = torch.fx.GraphModule(root, fxg, class_name="LowbitModule")
    gm.eval()
    return gm


def materialize_weights(graph: Graph, *, keep_packed: bool = False) -> Graph:
    """The graph this backend lowers: a copy with every parameter-only computation evaluated once.

    Default: packed weights are dequantized here (``qlinear`` nodes are first written back as their reference
    subgraph, so their weight ``dequantize`` folds too): a call runs float linears, and memory holds float
    weights. ``keep_packed=True`` leaves every ``dequantize`` (and ``qlinear``) in place: the packed weights
    are what the device holds, dequantized on each call. The numbers are the same either way.
    """
    lowered = graph.clone()
    # a node nothing reads is not folded (skip_dead): a dead weight dequantize was unpacked into a float copy (work
    # and memory for nothing). It is not removed either: the lowering still checks every op the graph names
    if keep_packed:
        fold_constants(lowered, max_elements=1 << 62, skip_ops=frozenset({"dequantize"}), skip_dead=True)
    else:
        unfuse_qlinear(lowered)
        fold_constants(lowered, max_elements=1 << 62, skip_dead=True)
    drop_unused_params(lowered)
    return lowered


def linear_labels(graph: Graph) -> dict[str, str]:
    """What a report calls each linear (by its output's name, the FX node's): its module path, the members' paths of
    a merged one (``model.layers.0.self_attn.q_proj+k_proj+v_proj``), the node where it has no module."""
    labels = {}
    for n in graph.nodes:
        if n.op not in ("linear", "qlinear", "qlinear_q") or not n.outputs:
            continue
        merged = n.meta.get("merged")
        if merged and n.module:
            label = n.module + "." + "+".join(m.removeprefix(n.module + ".") for m in merged)
        else:
            label = n.module or f"%{n.outputs[0].name}"
        labels[n.outputs[0].name] = label
    seen: dict[str, int] = {}
    for label in labels.values():
        seen[label] = seen.get(label, 0) + 1
    # two linears of one module (a parallel branch): the node tells them apart
    return {name: label if seen[label] == 1 else f"{label} (%{name})" for name, label in labels.items()}


class TorchCompiled(torch.nn.Module):
    """A lowered graph as a callable module; ``graph`` is kept so the debugging tools can inspect it."""

    def __init__(self, graph: Graph, device: str | torch.device | None = None, *,
                 precompute_constants: bool = True, keep_packed: bool = False,
                 donated: set[str] | frozenset[str] = frozenset(), semi_structured: bool = False,
                 sparse_library: str = "auto", routed_experts: bool = True) -> None:
        """``precompute_constants`` evaluates once, at lowering, every node that reads only parameters
        (``materialize_weights``), so a call does not unpack all weights again; the numbers are the same and
        ``graph`` keeps the packed form. ``keep_packed=True`` keeps the packed weights on the device instead
        and dequantizes them per call (less memory, more work per call). ``donated``: see ``lower_to_fx``.
        ``semi_structured``: 2:4 linear weights become semi-structured sparse tensors where the device, dtype and
        shape allow (``sparse_library``: ``auto``, ``cusparselt`` or ``cutlass``); ``sparse_report`` says which.
        ``routed_experts``: each MoE layer's experts run only on the tokens routed to them
        (``lowbit.backends.routed_experts``); ``routed_report`` names each layer and why one stays dense."""
        super().__init__()
        self.graph = graph
        self.device = torch.device(device) if device is not None else None
        self.keep_packed = keep_packed
        lowered = materialize_weights(graph, keep_packed=keep_packed) if precompute_constants else graph
        matches, refused = find_routed_experts(lowered) if routed_experts else ([], {})
        self.routed_report = {m.prefix: f"routed ({len(m.terms)} experts)" for m in matches}
        self.routed_report.update({prefix: f"kept dense: {why}" for prefix, why in refused.items()})
        self.gm = lower_to_fx(lowered, device, donated, matches)
        marked = frozenset(n.outputs[0].name for n in lowered.nodes
                           if n.op in ("linear", "qlinear") and n.meta.get("sparsity") == "2:4")
        dev = self.device if self.device is not None else params_device(lowered)
        self.sparse_report = apply_semi_structured(self.gm, dev, enabled=semi_structured, library=sparse_library,
                                                   marked=marked, labels=linear_labels(lowered))
        self.check_inputs = InputChecker(graph)
        self.buffer_bytes = buffer_bytes(self.gm)
        """Bytes of the tensors the lowered module holds (each storage once): what running it keeps in memory."""
        self.dequantized_weights = 0 if keep_packed or not precompute_constants else packed_weight_reads(graph)

    def report_text(self) -> str:
        """What the lowering did beyond the reference (the 2:4 weights, quantized weights made float), one line per
        decision; may be empty."""
        lines = report_lines(self.sparse_report)
        routed = [p for p, what in self.routed_report.items() if what.startswith("routed")]
        if routed:
            lines.append(f"torch: {len(routed)} MoE layers run each expert on its routed tokens only "
                         f"({', '.join(routed)}); routed_experts=false runs them densely")
        lines += [f"torch: {p} {what}" for p, what in self.routed_report.items() if not what.startswith("routed")]
        if self.dequantized_weights:
            # the compile summary's "params A -> B MiB" is the graph's stored form: the module runs on float copies
            mib = 2**20
            lines.append(f"torch: {self.dequantized_weights} quantized weights dequantized at lowering: the module "
                         f"holds {self.buffer_bytes / mib:.1f} MiB (the graph's stored form: "
                         f"{self.graph.param_bytes() / mib:.1f} MiB); keep_packed=true runs on the stored form")
        return "\n".join(lines)

    def bind_inputs(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
        """One call's inputs in the graph's order, checked against its declared inputs (``InputChecker``) and on
        the module's device. Every runner built on this one calls it, so all refuse the same calls by name."""
        args = ordered_inputs([v.name for v in self.graph.inputs], args, kwargs)
        args = self.check_inputs(args)
        if self.device is not None:
            args = tuple(a.to(self.device) if isinstance(a, torch.Tensor) else a for a in args)
        return args

    @torch.no_grad()
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.gm(*self.bind_inputs(args, kwargs))


def buffer_bytes(module: torch.nn.Module) -> int:
    """Bytes of ``module``'s buffers, each storage counted once (a semi-structured sparse weight: its parts)."""
    seen: dict[int, int] = {}
    for t in module.buffers():
        parts = ([p for p in (getattr(t, a, None) for a in t.__slots__) if isinstance(p, torch.Tensor)]
                 if isinstance(t, torch.sparse.SparseSemiStructuredTensor) else [t])
        for p in parts:
            seen[p.untyped_storage().data_ptr()] = p.untyped_storage().nbytes()
    return sum(seen.values())


def packed_weight_reads(graph: Graph) -> int:
    """How many ``dequantize``/``qlinear`` nodes read a stored (quantized) weight parameter directly."""
    params = {id(v) for v in graph.params.values()}
    slot = {"dequantize": 0, "qlinear": 1}
    return sum(1 for n in graph.nodes
               if n.op in slot and len(n.args) > slot[n.op] and id(n.args[slot[n.op]]) in params)


def lower(graph: Graph, device: str | None = None, *, keep_packed: bool = False, semi_structured: bool = False,
          sparse_library: str = "auto", routed_experts: bool = True) -> TorchCompiled:
    """The backend registry's entry point (``lowbit.backends.registry``). A step graph's cache inputs
    (``graph.meta["generation"]``) are handed over by the generator: written in place, not copied."""
    donated = set(graph.meta.get("generation", {}).get("cache_inputs", ()))
    return TorchCompiled(graph, device, keep_packed=keep_packed, donated=donated, semi_structured=semi_structured,
                         sparse_library=sparse_library, routed_experts=routed_experts)
