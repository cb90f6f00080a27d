"""Block-by-block calibration over the IR (sequential / layer-wise, as GPTQ, AdaQuant and KurTail run).

The graph is cut into stages by module path (``lowbit.ir.graph.blocks``): a *prefix* (embeddings, masks,
rotary tables), one stage per transformer block, and a *suffix* (final norm, head). The prefix runs once on
every calibration batch; then each block runs alone, node by node through the ops' reference
implementations, on the cached values it reads. So peak memory is the cached block inputs plus one block's
activations for one batch, whatever the depth, on top of the weights.

For each block the engine

1. runs the block on every batch, calling ``on_node(node, args, kwargs, outputs)`` after each node (collect
   input statistics, Hessians ``XᵀX`` of linear inputs, ...);
2. calls ``on_block(ctx)``, which may rewrite the block: change its params (``graph.set_param``), insert
   QDQ nodes (with the block's module path). ``ctx.run()`` re-executes the block on the cached inputs (with
   its own hooks), and ``ctx.reference`` holds what the block produced in step 1;
3. runs the (now quantized) block again unless ``on_block`` returned ``False``, and hands those outputs to
   the next block: block i+1 calibrates on what a quantized block i really produces.

Nodes outside any block that sit between blocks run with the next block. A node that reads a value of a
later stage is an error naming it (the graph would not be block-sequential).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch.utils import _pytree as pytree
from tqdm.auto import tqdm

from lowbit.ir.graph import Graph, Node, Value, blocks
from lowbit.ir.ops import resolve

__all__ = ["BLOCK_PATTERN", "Stage", "BlockRun", "CalibrationReport", "NodeHook", "BlockHook", "split_stages",
           "run", "batches_from_ids", "CalibrationError"]

BLOCK_PATTERN = r"^((?:[A-Za-z_]\w*\.)*?(?:layers|layer|h|blocks)\.\d+)(?=\.|$)"
"""Module-path prefix of a repeated block, with or without a wrapper prefix (``model.layers.3``,
``encoder.layer.0``, ``model.model.layers.3``, ``transformer.h.7``)."""

NodeHook = Callable[[Node, tuple[Any, ...], dict[str, Any], list[Any]], None]
"""``on_node(node, args, kwargs, outputs)``: operands and results as tensors, after the node ran."""


class CalibrationError(RuntimeError):
    """The graph cannot be calibrated block by block, or the data does not fit it."""


@dataclass
class Stage:
    """A contiguous part of the graph run as one unit."""

    index: int
    name: str
    kind: Literal["prefix", "block", "suffix"]
    nodes: list[Node]
    pattern: str = BLOCK_PATTERN

    def reads(self) -> list[Value]:
        """Values the stage reads that are produced outside it (graph inputs and earlier stages), params excluded."""
        produced = {id(v) for n in self.nodes for v in n.outputs}
        seen: set[int] = set()
        out = []
        for n in self.nodes:
            for v in n.inputs():
                if not v.is_param and id(v) not in produced and id(v) not in seen:
                    seen.add(id(v))
                    out.append(v)
        return out

    def params(self) -> list[Value]:
        seen: set[int] = set()
        out = []
        for n in self.nodes:
            for v in n.inputs():
                if v.is_param and id(v) not in seen:
                    seen.add(id(v))
                    out.append(v)
        return out


def split_stages(graph: Graph, pattern: str = BLOCK_PATTERN) -> list[Stage]:
    """Prefix, one stage per block (in graph order), suffix; empty prefix/suffix are left out."""
    regions = blocks(graph, pattern)
    block_of: dict[int, int] = {id(n): i for i, r in enumerate(regions) for n in r.nodes}
    positions = [p for p, n in enumerate(graph.nodes) if id(n) in block_of]
    if not positions:
        return [Stage(0, "graph", "prefix", list(graph.nodes))]
    first, last = positions[0], positions[-1]
    assign: list[int] = [0] * len(graph.nodes)
    nxt = len(regions) + 1
    for p in range(len(graph.nodes) - 1, -1, -1):
        n = graph.nodes[p]
        if id(n) in block_of:
            nxt = block_of[id(n)] + 1
            assign[p] = nxt
        elif p < first:
            assign[p] = 0
        elif p > last:
            assign[p] = len(regions) + 1
        else:
            assign[p] = nxt
    stages = [Stage(0, "prefix", "prefix", [])]
    stages += [Stage(i + 1, r.prefix, "block", []) for i, r in enumerate(regions)]
    stages.append(Stage(len(regions) + 1, "suffix", "suffix", []))
    where: dict[int, int] = {}
    for p, n in enumerate(graph.nodes):
        s = assign[p]
        for v in n.inputs():
            src = where.get(id(v))
            if src is not None and src > s:
                raise CalibrationError(
                    f"node %{n.name} ({n.op}, module {n.module!r}) in stage {stages[s].name} reads %{v.name} from the "
                    f"later stage {stages[src].name}: the blocks are not in sequence in the graph")
        stages[s].nodes.append(n)
        for v in n.outputs:
            where[id(v)] = s
    for st in stages:
        st.pattern = pattern
    return [s for s in stages if s.nodes or s.kind == "block"]


def _execute(nodes: Sequence[Node], env: dict[Value, Any], on_node: NodeHook | None, keep: set[Value]) -> None:
    """Run ``nodes`` in order on ``env`` (value -> tensor), freeing each intermediate after its last reader."""
    last_use: dict[int, int] = {}
    for i, n in enumerate(nodes):
        for v in n.inputs():
            last_use[id(v)] = i
    keep_ids = {id(v) for v in keep}

    def lookup(x: Any) -> Any:
        if not isinstance(x, Value):
            return x
        if x.is_param:
            return x.data
        try:
            return env[x]
        except KeyError:
            raise CalibrationError(f"value %{x.name} is needed but was not computed or cached") from None

    for i, n in enumerate(nodes):
        args, kwargs = pytree.tree_map(lookup, (n.args, n.kwargs))
        try:
            out = resolve(n.op)(*args, **kwargs)
        except CalibrationError:
            raise
        except Exception as exc:
            raise CalibrationError(f"node %{n.name} ({n.op}, module {n.module!r}) failed during calibration: "
                                   f"{type(exc).__name__}: {exc}") from exc
        outs = list(out) if len(n.outputs) > 1 else [out]
        for v, o in zip(n.outputs, outs):
            env[v] = o
        if on_node is not None:
            on_node(n, args, kwargs, outs)
        for v in n.inputs():
            if last_use.get(id(v)) == i and id(v) not in keep_ids and not v.is_param:
                env.pop(v, None)
        for v in n.outputs:
            if id(v) not in last_use and id(v) not in keep_ids:
                env.pop(v, None)


@dataclass
class BlockRun:
    """What ``on_block`` receives: the stage, its cached inputs per batch, and a way to re-run it."""

    graph: Graph
    stage: Stage
    inputs: list[dict[Value, Any]]
    """Per batch, the values the stage reads from outside (graph inputs, earlier stages' outputs)."""
    exports: list[Value]
    """Values of this stage that later stages read."""
    reference: list[dict[Value, Any]] = field(default_factory=list)
    """Per batch, the exports as the block produced them before ``on_block`` (its float/unchanged output)."""

    @property
    def index(self) -> int:
        return self.stage.index

    @property
    def name(self) -> str:
        return self.stage.name

    def nodes(self) -> list[Node]:
        """The stage's nodes as the graph holds them now (an ``on_block`` that inserts nodes changes them)."""
        return _current_nodes(self.graph, self.stage)

    def run(self, on_node: NodeHook | None = None, outputs: Sequence[Value] | None = None,
            batches: Sequence[int] | None = None) -> list[dict[Value, Any]]:
        """Execute the stage's current nodes on the cached inputs; returns ``outputs`` (default: exports) per batch."""
        want = list(outputs) if outputs is not None else self.exports
        nodes = self.nodes()
        results = []
        for b in (range(len(self.inputs)) if batches is None else batches):
            env: dict[Value, Any] = dict(self.inputs[b])
            _execute(nodes, env, on_node, set(want))
            results.append({v: env[v] for v in want})
        return results


BlockHook = Callable[[BlockRun], bool | None]
"""``on_block(ctx)``; return False when the block was not changed (its first outputs are then reused)."""


def _current_nodes(graph: Graph, stage: Stage) -> list[Node]:
    return _find(split_stages(graph, stage.pattern), stage).nodes


def _find(stages: list[Stage], stage: Stage) -> Stage:
    for s in stages:
        if s.name == stage.name and s.kind == stage.kind:
            return s
    raise CalibrationError(f"stage {stage.name} disappeared from the graph during calibration")


@dataclass
class CalibrationReport:
    batches: int
    tokens: int
    stages: list[str]
    seconds: float
    seconds_per_stage: dict[str, float]
    peak_cached_bytes: int
    """Most bytes of cached stage inputs/outputs held at once (activations only; weights excluded)."""


def _nbytes(x: Any) -> int:
    return x.numel() * x.element_size() if isinstance(x, torch.Tensor) else 0


def batches_from_ids(graph: Graph, ids: torch.Tensor, batch_size: int | None = None) -> list[tuple[torch.Tensor]]:
    """Split ``[N, L]`` ids into batches the graph accepts (one sequence at a time if it was captured at batch 1)."""
    if len(graph.inputs) != 1:
        raise CalibrationError(f"the graph takes {len(graph.inputs)} inputs "
                               f"({', '.join(v.name for v in graph.inputs)}); build the batches yourself")
    t = graph.inputs[0].tensor_type
    static_b = t.shape[0] if isinstance(t.shape[0], int) else None
    if batch_size is None:
        batch_size = static_b or 8
    if static_b is not None and batch_size != static_b:
        raise CalibrationError(f"the graph was captured with a static batch of {static_b}; batch_size={batch_size}")
    return [(chunk,) for chunk in ids.split(batch_size)]


def run(
    graph: Graph,
    batches: Sequence[Sequence[torch.Tensor]],
    *,
    on_node: NodeHook | None = None,
    on_block: BlockHook | None = None,
    run_suffix: bool = False,
    pattern: str = BLOCK_PATTERN,
    progress: bool = True,
) -> CalibrationReport:
    """Calibrate ``graph`` block by block on ``batches`` (each a tuple matching ``graph.inputs``).

    ``on_node`` and ``on_block`` are called for every stage, prefix and suffix included (``ctx.stage.kind``
    says which); the suffix runs only with ``run_suffix`` (its output, the logits, is the largest tensor of
    all and calibration rarely needs it).
    """
    if not batches:
        raise CalibrationError("calibration got no batches (empty calibration set)")
    for b in batches:
        if len(b) != len(graph.inputs):
            raise CalibrationError(f"a batch has {len(b)} tensors but the graph takes {len(graph.inputs)} inputs")
    t0 = time.perf_counter()
    stages = split_stages(graph, pattern)
    store: list[dict[Value, Any]] = [dict(zip(graph.inputs, b)) for b in batches]
    tokens = sum(int(b[0].numel()) for b in batches)
    peak = sum(_nbytes(x) for env in store for x in env.values())
    per_stage: dict[str, float] = {}
    todo = [s for s in stages if s.kind != "suffix" or run_suffix]
    bar = tqdm(todo, desc="calibrate", unit="block", disable=not progress)
    for planned in bar:
        ts = time.perf_counter()
        bar.set_postfix_str(planned.name)
        stage = _find(stages, planned)  # the current version: an earlier on_block may have edited the graph
        reads = stage.reads()
        missing = [v.name for v in reads if v not in store[0]]
        if missing:
            raise CalibrationError(f"stage {stage.name} reads {', '.join('%' + m for m in missing[:5])} which no "
                                   "earlier stage produced")
        inputs = [{v: env[v] for v in reads} for env in store]
        ctx = BlockRun(graph, stage, inputs, _exports(graph, stages, stage))
        outs = ctx.run(on_node=on_node)
        if on_block is not None:
            ctx.reference = outs
            changed = on_block(ctx)
            ctx.reference = []
            if changed is not False:
                stages = split_stages(graph, pattern)
                stage = _find(stages, planned)
                ctx.stage, ctx.exports = stage, _exports(graph, stages, stage)
                outs = ctx.run()
        cached = sum(_nbytes(x) for env in store for x in env.values())
        peak = max(peak, cached + sum(_nbytes(x) for o in outs for x in o.values()))
        del ctx, inputs
        needed: set[int] = set()  # graph outputs are not kept: calibration never returns the logits
        for s in stages:
            if s.index > stage.index:
                needed.update(id(v) for v in s.reads())
        for env, o in zip(store, outs):
            env.update(o)
            for v in [v for v in env if id(v) not in needed]:
                del env[v]
        del outs
        per_stage[stage.name] = time.perf_counter() - ts
    bar.close()
    return CalibrationReport(len(batches), tokens, [s.name for s in todo], time.perf_counter() - t0, per_stage, peak)


def _exports(graph: Graph, stages: list[Stage], stage: Stage) -> list[Value]:
    """Values produced by ``stage`` that later stages read (graph outputs are not kept)."""
    later: set[int] = set()
    for s in stages:
        if s.index > stage.index:
            later.update(id(v) for v in s.reads())
    return [v for n in stage.nodes for v in n.outputs if id(v) in later]
