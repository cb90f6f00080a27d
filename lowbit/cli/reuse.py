"""Evaluations that share work: the many graphs ``debug bisect`` and ``debug sensitivity`` measure.

Both evaluate graphs that differ from one reference graph (the IR the pass under study saw) in a few blocks: a pass
restricted to blocks 11-12 leaves blocks 0-10 as they were, and the weights it quantizes are the same bytes each
time. Every run used to lower the whole graph, dequantize every packed weight and run every block again (on the full
SmolLM2, 55 of a bisect's 67 s went to dequantizing). ``ReusedRuns`` keeps two things, and the answers stay the same
bit for bit (the same ops run on the same tensors):

* the values live at each block boundary of the reference run (the residual stream entering block i, the rotary
  tables, the mask): a later graph computes only what depends on a node that is not the reference's own (same
  name, op, options, operands and parameter tensors, checked node by node from the inputs), and reads the rest from
  the latest boundary it still shares;
* every weight ``dequantize`` of parameters, keyed by the bytes of its operands: a pass run again makes new tensors
  with the same content, which are unpacked once (up to a memory budget, oldest dropped first).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Any

import torch
from torch.utils import _pytree as pytree

from lowbit.backends.torch_backend import lower_to_fx, materialize_weights
from lowbit.cli.probes import EvalInputs, input_chunks
from lowbit.ir.fusion import unfuse_qlinear
from lowbit.ir.graph import Graph, Node, TensorType, Value, blocks
from lowbit.ir.ops import resolve
from lowbit.ir.signature import InputChecker

MIN_WEIGHT_BUDGET = 1 << 30
"""Bytes of dequantized weights kept at least (the budget is the reference graph's parameter bytes if larger)."""


def tensor_digest(t: torch.Tensor) -> str:
    """A digest of a tensor's dtype, shape and bytes (what makes two packed weights the same weight)."""
    flat = t.detach().cpu().contiguous().reshape(-1)
    h = hashlib.blake2b(f"{t.dtype}{tuple(t.shape)}".encode(), digest_size=20)
    if flat.numel():
        h.update(memoryview(flat.view(torch.uint8).numpy()))
    return h.hexdigest()


class DequantizedWeights:
    """Results of parameter-only ``dequantize`` nodes by the content of their operands, least recently used dropped
    past ``budget`` bytes. ``hits``/``misses`` count lookups (the tests read them)."""

    def __init__(self, budget: int) -> None:
        self.budget, self.held = budget, 0
        self.saved: OrderedDict[tuple[Any, ...], torch.Tensor] = OrderedDict()
        self.hits = self.misses = 0

    def key(self, node: Node) -> tuple[Any, ...]:
        leaves, spec = pytree.tree_flatten((node.args, node.kwargs))
        return (node.op, str(spec), *(tensor_digest(x.data) if isinstance(x, Value) else repr(x) for x in leaves))

    def result(self, node: Node) -> torch.Tensor | None:
        """The node's result (computed once per content), or None where it is not a tensor of the node's dtype (the
        backend's folding keeps such a node too)."""
        key = self.key(node)
        if key in self.saved:
            self.hits += 1
            self.saved.move_to_end(key)
            return self.saved[key]
        self.misses += 1
        args, kwargs = pytree.tree_map(lambda x: x.data if isinstance(x, Value) else x, (node.args, node.kwargs))
        with torch.no_grad():
            out = resolve(node.op)(*args, **kwargs)
        if not isinstance(out, torch.Tensor) or out.dtype != node.outputs[0].type.dtype:
            return None
        out = out.contiguous()  # as fold_constants stores it
        self.saved[key] = out
        self.held += out.numel() * out.element_size()
        while self.held > self.budget and len(self.saved) > 1:
            _, old = self.saved.popitem(last=False)
            self.held -= old.numel() * old.element_size()
        return out

    def fold(self, graph: Graph) -> None:
        """Replace each weight ``dequantize`` (operands all parameters) of ``graph`` by its saved result, in place."""
        unfuse_qlinear(graph)  # a qlinear's weight dequantize is folded as the backend folds it
        subst: dict[int, Value] = {}
        keep = []
        for node in graph.nodes:
            if subst:
                node.map_values(lambda v: subst.get(id(v), v))
            operands = node.inputs()
            if node.op != "dequantize" or len(node.outputs) != 1 or not operands or \
                    not all(v.is_param and v.data is not None for v in operands):
                keep.append(node)
                continue
            out = self.result(node)
            if out is None:
                keep.append(node)
                continue
            name = graph.fresh_param_name(f"const.{node.module + '.' if node.module else ''}{node.outputs[0].name}")
            subst[id(node.outputs[0])] = graph.add_param(name, out)
        graph.nodes = keep
        graph.outputs = [subst.get(id(v), v) for v in graph.outputs]


def same_literal(a: Any, b: Any) -> bool:
    if a is b:
        return True
    if type(a) is not type(b) or isinstance(a, torch.Tensor):
        return False
    try:
        return bool(a == b)
    except Exception:  # an operand without a plain equality: not known to be the same
        return False


def _same_operand(a: Any, b: Any, shared: set[str]) -> bool:
    """Whether value operand ``a`` of a graph holds what ``b`` of the reference does."""
    if not (isinstance(a, Value) and isinstance(b, Value)) or a.kind != b.kind or a.name != b.name:
        return False
    if a.kind == "param":
        return a.data is b.data
    if a.kind == "input":  # a pass that retyped an input (int32 ids) is fed differently
        return a.type == b.type
    return a.name in shared


def shared_values(graph: Graph, reference: Graph) -> set[str]:
    """Names of the values ``graph`` computes exactly as ``reference`` does: from a node of the same name, op and
    literal operands, whose value operands are the same inputs, the same parameter tensors (by identity: clones share
    them, a pass that rewrites one sets a new tensor) or values shared in turn."""
    ref_nodes = {v.name: n for n in reference.nodes for v in n.outputs}
    shared: set[str] = set()
    for node in graph.nodes:  # topological: operands first
        ref = ref_nodes.get(node.name)
        if ref is None or ref.op != node.op or [v.name for v in ref.outputs] != [v.name for v in node.outputs]:
            continue
        leaves, spec = pytree.tree_flatten((node.args, node.kwargs))
        ref_leaves, ref_spec = pytree.tree_flatten((ref.args, ref.kwargs))
        if spec != ref_spec:
            continue
        same = True
        for a, b in zip(leaves, ref_leaves):
            same = _same_operand(a, b, shared) if isinstance(a, Value) or isinstance(b, Value) else same_literal(a, b)
            if not same:
                break
        if same:
            shared.update(v.name for v in node.outputs)
    return shared


def boundary_values(graph: Graph) -> list[Value]:
    """Tensor values a node computes before a block starts (or after the last block ends) and a node after that point
    (or the graph's output) reads: what a run needs to resume there."""
    regions = blocks(graph)
    if not regions:
        return []
    position = {id(n): i for i, n in enumerate(graph.nodes)}
    cuts = sorted({position[id(r.nodes[0])] for r in regions} | {max(position[id(r.nodes[-1])] for r in regions) + 1})
    defined: dict[int, int] = {}
    last_read: dict[int, int] = {}
    for i, node in enumerate(graph.nodes):
        for v in node.inputs():
            last_read[id(v)] = i
        for v in node.outputs:
            defined[id(v)] = i
    for v in graph.outputs:
        last_read[id(v)] = len(graph.nodes)
    values = {id(v): v for n in graph.nodes for v in n.outputs if isinstance(v.type, TensorType)}
    return [values[k] for k in values if any(defined[k] < cut <= last_read.get(k, -1) for cut in cuts)]


def cut_at(graph: Graph, available: set[str]) -> tuple[Graph, list[str]]:
    """A copy of ``graph`` that computes its outputs from its inputs and the ``available`` values, which become
    inputs after the graph's own (their names are returned in that order); nodes only they need are left out."""
    g = graph.clone()
    needed = {id(v) for v in g.outputs}
    fed: list[Value] = []
    kept: list[Node] = []
    for node in reversed(g.nodes):
        wanted = [v for v in node.outputs if id(v) in needed]
        if not wanted:
            continue
        if all(v.name in available for v in wanted):
            fed += wanted
            continue
        kept.append(node)
        needed.update(id(v) for v in node.inputs())
    g.nodes = kept[::-1]
    for v in fed:
        v.kind, v.producer = "input", None
    g.inputs = list(g.inputs) + fed
    read = {id(v) for n in g.nodes for v in n.inputs()} | {id(v) for v in g.outputs}
    for name in [name for name, v in g.params.items() if id(v) not in read]:
        g.remove_param(name)
    return g, [v.name for v in fed]


class ReusedRuns:
    """The end output of graphs on fixed inputs, computed from what a reference run saved (module docstring).

    ``run(graph, reference=True)`` makes ``graph`` the reference: it runs whole and saves its boundary values.
    ``nodes_run`` is how many nodes the last run computed (the tests read it)."""

    def __init__(self, inputs: EvalInputs) -> None:
        self.inputs = inputs
        self.reference: Graph | None = None
        self.saved: list[dict[str, torch.Tensor]] = []
        self.weights: DequantizedWeights | None = None
        self.nodes_run = 0

    def run(self, graph: Graph, *, reference: bool = False) -> torch.Tensor:
        if reference or self.reference is None:
            return self._run_reference(graph)
        shared = shared_values(graph, self.reference)
        available = {name for name in self.saved[0] if name in shared} if self.saved else set()
        sub, fed = cut_at(graph, available)
        return self._run(sub, graph, lambda i: tuple(self.saved[i][name] for name in fed))

    def _run_reference(self, graph: Graph) -> torch.Tensor:
        self.reference = graph.clone()  # its tensors are shared; later passes edit clones of it, never it
        budget = max(graph.param_bytes(), MIN_WEIGHT_BUDGET)
        if self.weights is None:
            self.weights = DequantizedWeights(budget)
        else:  # kept across references: bisect's stage 1 quantized the very weights its stage 2 quantizes again
            self.weights.budget = max(self.weights.budget, budget)
        keep = boundary_values(self.reference)
        g = graph.clone()
        n_out = len(g.outputs)
        kept = [g.value(v.name) for v in keep]
        g.outputs = list(g.outputs) + kept
        self.saved = []
        parts = self._run(g, graph, lambda i: (), all_outputs=True)
        for outputs in parts:
            self.saved.append({v.name: t for v, t in zip(kept, outputs[n_out:])})
        return torch.cat([p[0] for p in parts]) if len(parts) > 1 else parts[0][0]

    def _run(self, g: Graph, whole: Graph, extra: Any, all_outputs: bool = False) -> Any:
        """Run ``g`` (cut from ``whole``) on each chunk of the inputs, checked as ``whole`` checks them (``extra(i)``:
        chunk i's saved values, after its inputs); the first output, or every chunk's outputs with ``all_outputs``."""
        assert self.weights is not None
        self.weights.fold(g)
        gm = lower_to_fx(materialize_weights(g))
        self.nodes_run = len(g.nodes)
        check = InputChecker(whole)
        parts = []
        with torch.inference_mode():
            for i, chunk in enumerate(input_chunks(whole, self.inputs)):
                out = gm(*check(chunk), *extra(i))
                parts.append(tuple(out) if isinstance(out, (tuple, list)) else (out,))
        if all_outputs:
            return parts
        return (torch.cat([p[0] for p in parts]) if len(parts) > 1 else parts[0][0]).detach()
