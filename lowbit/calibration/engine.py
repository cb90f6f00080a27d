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

``device`` runs all of this elsewhere (a GPU) while the graph's params stay where they are: the batches are
moved there once, a stage reads device copies of its params (made on first read, remade when ``on_block``
replaced a param with ``graph.set_param``, dropped when the stage ends, so one block's weights are on the
device at a time), and ``torch.device`` literals baked into node kwargs at capture (``arange(...,
device=cpu)``) are retargeted as ``TorchCompiled`` does. Hooks therefore see device tensors; whatever they
write back into the graph must go to the param's own device (``home_device``).

Nodes outside any block that sit between blocks run with the next block. A node that reads a value of a
later stage is an error naming it (the graph would not be block-sequential).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

from lowbit.errors import LowbitError
from lowbit.ir.graph import BLOCK_PATTERN, Graph, Node, Value, blocks, map_operands, params_device
from lowbit.ir.ops import resolve

__all__ = ["BLOCK_PATTERN", "Stage", "BlockRun", "CalibrationReport", "NodeHook", "BlockHook", "Replacement",
           "split_stages", "run", "batches_from_ids", "static_batch", "CalibrationError", "resolve_device",
           "home_device"]


NodeHook = Callable[[Node, tuple[Any, ...], dict[str, Any], list[Any]], None]
"""``on_node(node, args, kwargs, outputs)``: operands and results as tensors, after the node ran."""

Replacement = Callable[[tuple[Any, ...], dict[str, Any]], Any]
"""Computes a node's result from its operands instead of the op's reference implementation (a weight
``dequantize`` made differentiable for block tuning, a fake-quant with a straight-through gradient)."""


class CalibrationError(LowbitError, RuntimeError):
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
    for n in graph.nodes:
        # a generation step graph's residual adds carry no module: the one closing block i (its update from block i's
        # down_proj) belongs to block i, as on the logits graph, not to the next stage (whose hooks then saw block i's
        # output projection's add after block i was done: prune-mlp's target=model lost it)
        if n.op == "residual_add" and not n.module and id(n) not in block_of and len(n.args) > 1 and \
                isinstance(n.args[1], Value) and n.args[1].producer is not None and id(n.args[1].producer) in block_of:
            block_of[id(n)] = block_of[id(n.args[1].producer)]
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


def resolve_device(device: str | torch.device | None) -> torch.device | None:
    """``device`` as a ``torch.device`` (None stays None: calibrate where the params are); errors say why."""
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise CalibrationError(f"device {device!r} is not a torch device (cpu, cuda, cuda:1, ...): {exc}") from None
    if dev.type not in ("cpu", "cuda"):
        raise CalibrationError(f"device {device!r}: calibration runs on cpu or cuda (cuda:1, ...), not {dev.type!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CalibrationError(f"device {device!r}: CUDA is not available on this machine")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise CalibrationError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev


home_device = params_device
"""Where calibration results go back to: the graph's params' device (``lowbit.ir.graph.params_device``)."""


class _DeviceParams:
    """A stage's params as read during calibration: the graph's own tensors, or copies on ``device``.

    A copy is made on first read and remade when ``graph.set_param`` replaced the tensor since (an
    ``on_block`` that quantizes weights in flight), so what runs is always the graph's current param.
    """

    def __init__(self, device: torch.device | None) -> None:
        self.device = device
        self._copies: dict[int, tuple[Value, torch.Tensor, torch.Tensor]] = {}

    def get(self, v: Value) -> Any:
        data = v.data
        if self.device is None or not isinstance(data, torch.Tensor) or data.device == self.device:
            return data
        hit = self._copies.get(id(v))
        if hit is not None and hit[1] is data:
            return hit[2]
        copy = data.to(self.device)
        self._copies[id(v)] = (v, data, copy)
        return copy

    def operand(self, x: Any) -> Any:
        """A non-Value operand: device literals follow the calibration device."""
        if self.device is not None and isinstance(x, torch.device):
            return self.device
        return x


def _execute(nodes: Sequence[Node], env: dict[Value, Any], on_node: NodeHook | None, keep: set[Value],
             params: _DeviceParams | None = None, replace: dict[int, Replacement] | None = None) -> None:
    """Run ``nodes`` in order on ``env`` (value -> tensor), freeing each intermediate after its last reader.

    ``replace`` maps ``id(node)`` to what computes that node instead of its op."""
    last_use: dict[int, int] = {}
    for i, n in enumerate(nodes):
        for v in n.inputs():
            last_use[id(v)] = i
    keep_ids = {id(v) for v in keep}
    params = params or _DeviceParams(None)

    def lookup(x: Any) -> Any:
        if not isinstance(x, Value):
            return params.operand(x)
        if x.is_param:
            return params.get(x)
        try:
            return env[x]
        except KeyError:
            raise CalibrationError(f"value %{x.name} is needed but was not computed or cached") from None

    for i, n in enumerate(nodes):
        args, kwargs = map_operands(lookup, (n.args, n.kwargs))
        fn = replace.get(id(n)) if replace else None
        try:
            out = fn(args, kwargs) if fn is not None else resolve(n.op)(*args, **kwargs)
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
    params: _DeviceParams = field(default_factory=lambda: _DeviceParams(None))
    """The stage's params as it reads them (device copies when calibrating on another device)."""

    @property
    def device(self) -> torch.device | None:
        """Where the stage runs (None: where the params are)."""
        return self.params.device

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
            batches: Sequence[int] | None = None, inputs: Sequence[dict[Value, Any]] | None = None,
            replace: dict[int, Replacement] | None = None) -> list[dict[Value, Any]]:
        """Execute the stage's current nodes on the cached inputs (or ``inputs``, per batch); returns ``outputs``
        (default: exports) per batch. ``replace`` computes some nodes differently (see ``Replacement``)."""
        want = list(outputs) if outputs is not None else self.exports
        nodes = self.nodes()
        source = self.inputs if inputs is None else inputs
        results = []
        for b in (range(len(source)) if batches is None else batches):
            env: dict[Value, Any] = dict(source[b])
            _execute(nodes, env, on_node, set(want), self.params, replace)
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


def static_batch(graph: Graph) -> int | None:
    """The batch size ``graph`` was captured with, when its first input's batch dim is static (it can take no
    other); None when the batch is dynamic."""
    if not graph.inputs:
        return None
    b = graph.inputs[0].tensor_type.shape[0]
    return b if isinstance(b, int) else None


def batches_from_ids(graph: Graph, ids: torch.Tensor, batch_size: int | None = None) -> list[tuple[torch.Tensor]]:
    """Split ``[N, L]`` ids into batches the graph accepts (one sequence at a time if it was captured at batch 1).

    A graph of ``(input_ids, attention_mask)`` (an encoder such as MiniLM) gets an all-ones mask: calibration
    windows are full-length token runs, with no padding to hide.
    """
    step = graph.meta.get("generation")
    if step is not None:
        return _step_batches(graph, step, ids, batch_size)
    names = [v.name for v in graph.inputs]
    with_mask = len(names) == 2 and "mask" in names[1]
    if len(names) != 1 and not with_mask:
        raise CalibrationError(f"the graph takes {len(graph.inputs)} inputs ({', '.join(names)}); calibration "
                               "from token ids feeds (input_ids) or (input_ids, attention_mask): build the batches "
                               "yourself")
    _check_length(graph, ids)
    static_b = static_batch(graph)
    if batch_size is None:
        batch_size = static_b or 8
    if static_b is not None and batch_size != static_b:
        raise CalibrationError(f"the graph was captured with a static batch of {static_b}; batch_size={batch_size}")
    if static_b is not None and len(ids) % static_b:
        # the last, smaller batch failed deep inside ('Sizes of tensors must match ... Expected size 3 but got size 1'
        # at a ViT's class-token cat), and the advice then given, compile_model(model), cannot capture a pixel model
        raise CalibrationError(f"the graph was captured with a static batch of {static_b} (%{names[0]} "
                               f"{graph.inputs[0].tensor_type}: the example inputs' batch), which {len(ids)} "
                               f"calibration samples do not fill (a last batch of {len(ids) % static_b}): give "
                               f"calib_n as a multiple of {static_b}, or capture with a dynamic batch "
                               "(compile_model(..., dynamic_shapes="
                               f"{{{names[0]!r}: {{0: torch.export.Dim.DYNAMIC}}}}))")
    if with_mask:
        mask_dtype = graph.inputs[1].tensor_type.dtype
        return [(chunk, torch.ones(chunk.shape, dtype=mask_dtype)) for chunk in ids.split(batch_size)]
    return [(chunk,) for chunk in ids.split(batch_size)]


def _check_length(graph: Graph, ids: torch.Tensor) -> None:
    """Refuse windows longer than the graph's sequence dim may be: the engine runs nodes directly, past the input
    check a compiled model makes, so a model of 128 positions calibrated on 512 without a word (on positions it never
    saw; an IndexError deep in the embedding where positions are learned)."""
    first = graph.inputs[0].tensor_type
    dim = first.shape[1] if first is not None and len(first.shape) > 1 else None
    symbol = graph.symbols.get(dim) if isinstance(dim, str) else None
    if symbol is not None and symbol.max is not None and ids.shape[1] > symbol.max:
        raise CalibrationError(f"calibration windows of {ids.shape[1]} tokens are longer than the graph takes: "
                               f"%{graph.inputs[0].name} dim 1 ({dim}) is at most {symbol.max} tokens (the model's "
                               f"positions at capture); give calib_len={symbol.max} or less, or token-id windows "
                               "that long")


def _step_batches(graph: Graph, step: dict[str, Any], ids: torch.Tensor,
                  batch_size: int | None) -> list[tuple[torch.Tensor, ...]]:
    """Batches for a generation step graph (docs/design.md "Program form"): ``(ids, positions 0..L-1, zero
    caches of L slots)``, so the step computes exactly the prefill of the window, which is what passes
    calibrate on."""
    limit = int(step["max_batch"])
    batch_size = min(batch_size or 8, limit)
    length = ids.shape[1]  # may exceed max_length: that limit is the decode cache's, not the graph's
    positions = step.get("max_positions")
    if isinstance(positions, int) and length > positions:
        # the logits graph refuses these through its sequence symbol (_check_length); the step graph takes positions
        # as an input with no such bound, so it calibrated on positions the model never saw, without a word
        raise CalibrationError(f"calibration windows of {length} tokens are longer than the model's "
                               f"max_position_embeddings={positions} (generation step graph %{graph.inputs[0].name}): "
                               f"give calib_len={positions} or less, or token-id windows that long")
    dtype = graph.inputs[2].tensor_type.dtype
    out = []
    for chunk in ids.split(batch_size):
        b = chunk.shape[0]
        positions = torch.arange(length).expand(b, length).contiguous()
        # each cache input's own head count (head pruning can leave layers with different counts)
        cache = [torch.zeros(b, int(v.tensor_type.shape[1]), length, int(step["head_dim"]), dtype=dtype)
                 for v in graph.inputs[2:]]
        out.append((chunk, positions, *cache))
    return out


def static_misfit(graph: Graph, batch: Sequence[Any]) -> str | None:
    """Why ``batch`` may not fit a graph captured from explicit example inputs (their sizes baked in), said when
    calibration fails: the failure itself is deep inside ('the expanded size (2) must match (4)'). Not an error on
    its own: many graphs run at other sizes than the ones they were captured with."""
    for v, t in zip(graph.inputs, batch):
        if not isinstance(t, torch.Tensor) or v.tensor_type is None:
            continue
        shape = v.tensor_type.shape
        if len(shape) == t.dim() and all(not isinstance(d, int) or d == n for d, n in zip(shape, t.shape)):
            continue
        # "capture without them (compile_model(model) ...)" was the advice, which an HF BertModel or a ViT given as
        # is cannot follow: compile_model finds example inputs only for the models lowbit wraps
        dims = ", ".join(f"{i}: torch.export.Dim.DYNAMIC" for i, (d, n) in enumerate(zip(shape, t.shape))
                         if isinstance(d, int) and d != n) if len(shape) == t.dim() else ""
        declare = (f"compile_model(..., dynamic_shapes={{{v.name!r}: {{{dims}}}, ...}}) with the inputs that share "
                   "those dims") if dims else "compile_model(..., dynamic_shapes=...)"
        return (f"calibration input %{v.name} is {list(t.shape)}, but the graph takes {list(shape)}: a graph "
                "captured from explicit example inputs has their sizes fixed unless declared dynamic; declare them "
                f"({declare}; compile_model(model) alone does so for the models lowbit wraps: a name or directory, "
                "a causal LM, a SentenceEmbedder) or calibrate with batches of that shape (calib_n, calib_len)")
    return None


def run(
    graph: Graph,
    batches: Sequence[Sequence[torch.Tensor]],
    *,
    on_node: NodeHook | None = None,
    on_block: BlockHook | None = None,
    run_suffix: bool = False,
    pattern: str = BLOCK_PATTERN,
    progress: bool = True,
    device: str | torch.device | None = None,
) -> CalibrationReport:
    """Calibrate ``graph`` block by block on ``batches`` (each a tuple matching ``graph.inputs``).

    ``on_node`` and ``on_block`` are called for every stage, prefix and suffix included (``ctx.stage.kind``
    says which); the suffix runs only with ``run_suffix`` (its output, the logits, is the largest tensor of
    all and calibration rarely needs it). ``device`` (default: where the params are) is where the stages run
    and the hooks' tensors live; the graph's params are not moved.
    """
    dev = resolve_device(device)
    if not batches:
        raise CalibrationError("calibration got no batches (empty calibration set)")
    for b in batches:
        if len(b) != len(graph.inputs):
            raise CalibrationError(f"a batch has {len(b)} tensors but the graph takes {len(graph.inputs)} inputs")
    misfit = next((m for b in batches if (m := static_misfit(graph, b))), None)
    try:
        return _run(graph, batches, on_node=on_node, on_block=on_block, run_suffix=run_suffix, pattern=pattern,
                    progress=progress, dev=dev)
    except CalibrationError as exc:
        if misfit is None:
            raise
        raise CalibrationError(f"{exc}; {misfit}") from exc


def _run(graph: Graph, batches: Sequence[Sequence[torch.Tensor]], *, on_node: NodeHook | None,
         on_block: BlockHook | None, run_suffix: bool, pattern: str, progress: bool,
         dev: torch.device | None) -> CalibrationReport:
    t0 = time.perf_counter()
    stages = split_stages(graph, pattern)
    store: list[dict[Value, Any]] = [
        dict(zip(graph.inputs, (t.to(dev) if dev is not None and isinstance(t, torch.Tensor) else t for t in b)))
        for b in batches]
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
        ctx = BlockRun(graph, stage, inputs, _exports(graph, stages, stage), params=_DeviceParams(dev))
        outs = ctx.run(on_node=on_node)
        if on_block is not None:
            ctx.reference = outs
            changed = on_block(ctx)
            ctx.reference = []
            # re-split even when this stage is unchanged: the hook may have edited later stages (a linear of
            # block i+1 rounded while block i computed its input, as in a post-norm encoder)
            stages = split_stages(graph, pattern)
            stage = _find(stages, planned)
            if changed is not False:
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
