"""lowbit's IR: a typed SSA graph of nodes over values, with parameters stored beside it by name.

Design rules that every pass relies on:
- A graph is a list of nodes in topological order. Each node produces one or more values; a value is
  defined once (SSA). Graph inputs and parameters are values without a producing node.
- A node's operands (``args``/``kwargs``) are a pytree of values and plain literals (ints, floats, lists,
  dtypes, ...), so ATen calls are kept exactly as exported and semantic ops carry their attributes as kwargs.
- Parameter tensors are immutable: a pass that changes a weight stores a new tensor with ``set_param``,
  never writes into the old one, so ``Graph.clone()`` can share tensors safely (the debugging CLI keeps a
  snapshot after every pass).
- Every node remembers the module path it came from (``model.layers.3.mlp.down_proj``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch.utils import _pytree as pytree

DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.float64: "f64",
    torch.float32: "f32",
    torch.float16: "f16",
    torch.bfloat16: "bf16",
    torch.float8_e4m3fn: "f8e4m3",
    torch.float8_e5m2: "f8e5m2",
    torch.int64: "i64",
    torch.int32: "i32",
    torch.int16: "i16",
    torch.int8: "i8",
    torch.uint8: "u8",
    torch.bool: "bool",
    torch.complex64: "c64",
}
DTYPES_BY_NAME: dict[str, torch.dtype] = {v: k for k, v in DTYPE_NAMES.items()}

Dim = int | str
"""A dimension: a concrete size, or a symbolic expression over the graph's symbols (``"s0"``, ``"2*s0"``)."""


@dataclass(frozen=True)
class TensorType:
    dtype: torch.dtype
    shape: tuple[Dim, ...]

    def __post_init__(self) -> None:
        # symbolic dims without whitespace, as the parser reads them: "s0 + 1" given through the API printed as
        # written and read back as "s0+1", so the first print/parse round trip changed the IR text
        if any(isinstance(d, str) and not d.isidentifier() for d in self.shape):
            object.__setattr__(self, "shape", tuple("".join(d.split()) if isinstance(d, str) else d
                                                    for d in self.shape))

    def __str__(self) -> str:
        return f"{DTYPE_NAMES.get(self.dtype, str(self.dtype))}[{','.join(str(d) for d in self.shape)}]"

    @property
    def rank(self) -> int:
        return len(self.shape)

    def is_static(self) -> bool:
        return all(isinstance(d, int) for d in self.shape)

    def numel(self) -> int:
        if not self.is_static():
            raise ValueError(f"numel of a dynamic type {self}")
        n = 1
        for d in self.shape:
            n *= int(d)
        return n


@dataclass(frozen=True)
class SymType:
    """A symbolic integer (``aten.sym_size``), with the expression it equals when known."""

    expr: str | None = None

    def __str__(self) -> str:
        return f"sym({self.expr})" if self.expr is not None else "sym"


ValueType = TensorType | SymType | None

_PLAIN_VALUE = re.compile(r"[A-Za-z0-9_]+")
_PLAIN_PARAM = re.compile(r"[A-Za-z0-9_.\-/]+")
"""Names the IR text writes bare after ``%`` / ``@`` (the parser's tokens); any other is written as a JSON string."""


_PLAIN_GRAPH = re.compile(r"-?[A-Za-z_][A-Za-z0-9_.]*")


def graph_ref(name: str) -> str:
    """A graph's name as the IR header writes it: as is when the parser reads it back as one name, else as a JSON
    string (``graph "my model"(...)``): a name with a space printed a header that did not parse back."""
    return name if _PLAIN_GRAPH.fullmatch(name) else json.dumps(name)


def value_ref(name: str, *, param: bool) -> str:
    """``@name`` (``param``) or ``%name`` as the IR text writes it (``Value.__repr__``, the printer's param lines)."""
    sigil, plain = ("@", _PLAIN_PARAM) if param else ("%", _PLAIN_VALUE)
    return f"{sigil}{name if plain.fullmatch(name) else json.dumps(name)}"


class Value:
    """An SSA value: a graph input, a parameter, or an output of a node."""

    __slots__ = ("name", "type", "kind", "producer", "data")

    def __init__(
        self,
        name: str,
        type: ValueType,
        kind: Literal["input", "param", "node"] = "node",
        producer: Node | None = None,
        data: torch.Tensor | None = None,
    ) -> None:
        self.name = name
        self.type = type
        self.kind = kind
        self.producer = producer
        self.data = data

    def __repr__(self) -> str:
        """``%name`` / ``@name`` as the IR text writes it: a name the parser would not read back bare (a space, a
        colon or a non-ASCII letter from a ``ModuleDict`` key) as a JSON string, ``@"d.my layer.weight"``."""
        return value_ref(self.name, param=self.kind == "param")

    @property
    def is_param(self) -> bool:
        return self.kind == "param"

    @property
    def tensor_type(self) -> TensorType:
        if not isinstance(self.type, TensorType):
            raise TypeError(f"{self!r} is not a tensor value (type {self.type})")
        return self.type


def tensor_type_of(t: torch.Tensor) -> TensorType:
    return TensorType(t.dtype, tuple(int(d) for d in t.shape))


def map_operands(fn: Callable[[Any], Any], tree: Any) -> Any:
    """``pytree.tree_map(fn, tree)`` over a node's operands, rebuilding plain tuples, lists and dicts by hand: every
    pass, verification and calibration batch walks every node's operands, and torch's generic pytree took ~6x as
    long a node (~60 µs) as this walk. Other containers (``torch.Size``, a namedtuple) go through pytree."""
    kind = type(tree)
    if kind is tuple:
        return tuple(map_operands(fn, x) for x in tree)
    if kind is list:
        return [map_operands(fn, x) for x in tree]
    if kind is dict:
        return {k: map_operands(fn, x) for k, x in tree.items()}
    if isinstance(tree, (tuple, list, dict)):
        return pytree.tree_map(fn, tree)
    return fn(tree)


def operand_leaves(tree: Any, kind: type = object, found: list[Any] | None = None) -> list[Any]:
    """The leaves of ``tree`` that are ``kind`` (a ``Value``, a ``torch.device``), in ``pytree.tree_leaves`` order
    (``map_operands``: the same walk)."""
    found = [] if found is None else found
    container = type(tree)
    if container is tuple or container is list:
        for x in tree:
            operand_leaves(x, kind, found)
    elif container is dict:
        for x in tree.values():
            operand_leaves(x, kind, found)
    elif isinstance(tree, (tuple, list, dict)):
        found.extend(x for x in pytree.tree_leaves(tree) if isinstance(x, kind))
    elif isinstance(tree, kind):
        found.append(tree)
    return found


class Node:
    """One operation: ``op`` is a semantic op name (``linear``) or an ATen overload (``aten.mul.Tensor``)."""

    __slots__ = ("op", "args", "kwargs", "outputs", "module", "meta")

    def __init__(
        self,
        op: str,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
        outputs: list[Value] | None = None,
        module: str = "",
        meta: dict[str, Any] | None = None,
    ) -> None:
        self.op = op
        self.args = tuple(args)
        self.kwargs = dict(kwargs or {})
        self.outputs: list[Value] = []
        self.module = module
        self.meta = dict(meta or {})
        for v in outputs or []:
            self.add_output(v)

    def add_output(self, v: Value) -> Value:
        v.producer = self
        v.kind = "node"
        self.outputs.append(v)
        return v

    @property
    def name(self) -> str:
        return self.outputs[0].name if self.outputs else f"<{self.op}>"

    @property
    def output(self) -> Value:
        if len(self.outputs) != 1:
            raise ValueError(f"node {self.name} ({self.op}) has {len(self.outputs)} outputs, not one")
        return self.outputs[0]

    def inputs(self) -> list[Value]:
        """Every value this node reads, in operand order (duplicates kept)."""
        return operand_leaves((self.args, self.kwargs), Value)

    def map_values(self, fn: Callable[[Value], Any]) -> None:
        self.args, self.kwargs = map_operands(lambda x: fn(x) if isinstance(x, Value) else x, (self.args, self.kwargs))

    def arg(self, index: int, key: str | None = None, default: Any = None) -> Any:
        """Operand by position, or by keyword when given that way."""
        if index < len(self.args):
            return self.args[index]
        if key is not None and key in self.kwargs:
            return self.kwargs[key]
        return default

    def __repr__(self) -> str:
        return f"Node({self.name} = {self.op})"


@dataclass
class Symbol:
    """A symbolic dimension with its range and the concrete value seen at capture (used to check shapes)."""

    name: str
    min: int | None = None
    max: int | None = None
    hint: int | None = None


OFFLOAD_MIN_BYTES = 4096
"""Smallest rewritten parameter ``Graph.set_param`` offloads: a file mapping costs a page whatever it holds."""


class Graph:
    """A lowbit program: inputs, parameters, nodes in topological order and outputs."""

    def __init__(self, name: str = "main") -> None:
        self.name = name
        self.inputs: list[Value] = []
        self.params: dict[str, Value] = {}
        self.nodes: list[Node] = []
        self.outputs: list[Value] = []
        self.symbols: dict[str, Symbol] = {}
        self.meta: dict[str, Any] = {}
        self.offload_dir: str | None = None
        """Where quantizing passes put packed weights, and ``set_param`` the float weights passes rewrite
        (``lowbit.ir.offload``): a directory on disk, so a compile's memory does not grow with the model; None keeps
        them in memory. Not part of the program: never printed or
        saved."""
        self._names: set[str] = set()
        self._next_index: dict[str, int] = {}

    # ---- construction -------------------------------------------------------------------------
    def fresh_name(self, base: str) -> str:
        base = re.sub(r"[^A-Za-z0-9_]", "_", base) or "v"
        if base[0].isdigit():
            base = "v" + base
        name = base
        while name in self._names:
            i = self._next_index.get(base, 1)
            self._next_index[base] = i + 1
            name = f"{base}_{i}"
        return name

    def rename(self, value: Value, base: str) -> None:
        """Give ``value`` a fresh name derived from ``base`` (the old name is released)."""
        self._names.discard(value.name)
        value.name = self.fresh_name(base)
        self._names.add(value.name)

    def _claim(self, name: str) -> None:
        if name in self._names:
            raise ValueError(f"value name {name!r} is already defined in graph {self.name}")
        self._names.add(name)

    def add_input(self, name: str, type: ValueType) -> Value:
        self._claim(name)
        v = Value(name, type, kind="input")
        self.inputs.append(v)
        return v

    def remove_input(self, value: Value) -> None:
        """Drop an input nothing reads any more (a pruned block's KV cache); its name is released."""
        if any(v is value for n in self.nodes for v in n.inputs()):
            raise ValueError(f"input %{value.name} of graph {self.name} is still read")
        self.inputs = [v for v in self.inputs if v is not value]
        self._names.discard(value.name)

    def add_param(self, name: str, data: torch.Tensor | None, type: ValueType = None) -> Value:
        """Register a parameter; ``data`` may be None only for IR parsed without weights."""
        if name in self.params:
            raise ValueError(f"parameter {name!r} already exists")
        if data is not None:
            data = data.detach()
            type = tensor_type_of(data)
        v = Value(name, type, kind="param", data=data)
        self.params[name] = v
        return v

    def fresh_param_name(self, base: str) -> str:
        name, i = base, 1
        while name in self.params:
            name = f"{base}.{i}"
            i += 1
        return name

    def set_param(self, name: str, data: torch.Tensor) -> None:
        """Replace a parameter's tensor (never mutate the old one: clones share tensors).

        With ``offload_dir`` set, a host tensor of a page or more goes to a file there (``lowbit.ir.offload``), as
        packed weights do: passes that rewrite float weights across the model before it is quantized (fold-norms,
        smooth-quant, rotate, AWQ's scales) otherwise held every rewritten weight in the heap at once."""
        v = self.params[name]
        data = data.detach()
        if self.offload_dir is not None and data.device.type == "cpu" and \
                data.numel() * data.element_size() >= OFFLOAD_MIN_BYTES:
            from lowbit.ir.offload import map_from_disk

            data = map_from_disk([data], self.offload_dir, stem=name)[0]
        v.data = data
        v.type = tensor_type_of(v.data)

    def make_node(
        self,
        op: str,
        args: Iterable[Any] = (),
        kwargs: dict[str, Any] | None = None,
        *,
        name: str | None = None,
        type: ValueType = None,
        module: str = "",
        num_outputs: int = 1,
        types: list[ValueType] | None = None,
    ) -> Node:
        """Create a node with fresh output values; the caller inserts it."""
        node = Node(op, tuple(args), kwargs, module=module)
        base = name or op.split(".")[-2 if op.startswith("aten.") else -1]
        out_types = types if types is not None else [type] * num_outputs
        for i, t in enumerate(out_types):
            vname = self.fresh_name(base if i == 0 else f"{base}_{i}")
            self._names.add(vname)
            node.add_output(Value(vname, t))
        return node

    def append(self, node: Node) -> Node:
        self._register_outputs(node)
        self.nodes.append(node)
        return node

    def insert_before(self, anchor: Node, node: Node) -> Node:
        self._register_outputs(node)
        self.nodes.insert(self.index(anchor), node)
        return node

    def insert_after(self, anchor: Node, node: Node) -> Node:
        self._register_outputs(node)
        self.nodes.insert(self.index(anchor) + 1, node)
        return node

    def _register_outputs(self, node: Node) -> None:
        for v in node.outputs:
            self._names.add(v.name)

    def index(self, node: Node) -> int:
        for i, n in enumerate(self.nodes):
            if n is node:
                return i
        raise ValueError(f"{node} is not in graph {self.name}")

    def remove(self, node: Node) -> None:
        self.nodes.pop(self.index(node))
        for v in node.outputs:
            self._names.discard(v.name)

    def remove_nodes(self, dead: set[int]) -> None:
        """Remove nodes by ``id`` in one sweep (keeps passes linear on 3000-node graphs)."""
        keep = []
        for n in self.nodes:
            if id(n) in dead:
                for v in n.outputs:
                    self._names.discard(v.name)
            else:
                keep.append(n)
        self.nodes = keep

    def remove_param(self, name: str) -> None:
        del self.params[name]

    # ---- queries -----------------------------------------------------------------------------
    def users(self) -> dict[int, list[Node]]:
        """Map ``id(value)`` to the nodes that read it (computed fresh: passes mutate the graph)."""
        uses: dict[int, list[Node]] = {}
        for n in self.nodes:
            for v in n.inputs():
                lst = uses.setdefault(id(v), [])
                if not lst or lst[-1] is not n:
                    lst.append(n)
        return uses

    def output_ids(self) -> set[int]:
        return {id(v) for v in self.outputs}

    def replace_all_uses(self, old: Value, new: Value, *, after: Node | None = None) -> int:
        """Point every reader of ``old`` (optionally only nodes after ``after``) at ``new``."""
        count = 0
        start = self.index(after) + 1 if after is not None else 0

        def swap(v: Value) -> Value:
            nonlocal count
            if v is old:
                count += 1
                return new
            return v

        for n in self.nodes[start:]:
            if any(v is old for v in n.inputs()):
                n.map_values(swap)
        self.outputs = [new if v is old else v for v in self.outputs]
        return count

    def find(self, op: str | None = None, module: str | None = None) -> Iterator[Node]:
        """Nodes by op and/or module-path regex (``re.search``)."""
        pat = re.compile(module) if module else None
        for n in self.nodes:
            if op is not None and n.op != op:
                continue
            if pat is not None and not pat.search(n.module):
                continue
            yield n

    def value(self, name: str) -> Value:
        for v in self.inputs:
            if v.name == name:
                return v
        for n in self.nodes:
            for v in n.outputs:
                if v.name == name:
                    return v
        if name in self.params:
            return self.params[name]
        raise KeyError(f"no value named {name!r} in graph {self.name}")

    def op_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for n in self.nodes:
            counts[n.op] = counts.get(n.op, 0) + 1
        return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))

    def param_bytes(self) -> int:
        return sum(v.data.numel() * v.data.element_size() for v in self.params.values() if v.data is not None)

    def __len__(self) -> int:
        return len(self.nodes)

    def __str__(self) -> str:
        from lowbit.ir.printer import print_graph

        return print_graph(self)

    # ---- copying -----------------------------------------------------------------------------
    def clone(self) -> Graph:
        """A structural copy; parameter tensors are shared (they are immutable by convention), and so are other
        objects in ``meta`` (a tokenizer), but its dicts, lists and sets are copied all the way down."""
        g = Graph(self.name)
        g.symbols = {k: Symbol(s.name, s.min, s.max, s.hint) for k, s in self.symbols.items()}
        g.meta = _copied(self.meta)
        g.offload_dir = self.offload_dir
        g._names = set(self._names)
        g._next_index = dict(self._next_index)
        vmap: dict[int, Value] = {}
        for v in self.inputs:
            nv = Value(v.name, v.type, kind="input")
            g.inputs.append(nv)
            vmap[id(v)] = nv
        for name, v in self.params.items():
            nv = Value(v.name, v.type, kind="param", data=v.data)
            g.params[name] = nv
            vmap[id(v)] = nv
        for n in self.nodes:
            nn_ = Node(n.op, n.args, n.kwargs, module=n.module, meta=_copied(n.meta))
            nn_.map_values(lambda x: vmap[id(x)])
            for v in n.outputs:
                nv = Value(v.name, v.type)
                nn_.add_output(nv)
                vmap[id(v)] = nv
            g.nodes.append(nn_)
        g.outputs = [vmap[id(v)] for v in self.outputs]
        return g


def _copied(x: Any) -> Any:
    """``x`` with its plain dicts, lists, sets and tuples copied all the way down, other objects shared: a pass that
    edits a clone's ``meta["generation"]`` in place (``kv-cache`` records its layout there) changed the original's
    too, which then claimed a packed cache its inputs did not have."""
    if type(x) is dict:
        return {k: _copied(v) for k, v in x.items()}
    if type(x) in (list, tuple, set):
        return type(x)(_copied(v) for v in x)
    return x


@dataclass
class Region:
    """A contiguous run of nodes sharing a module-path prefix (a transformer block, say)."""

    prefix: str
    nodes: list[Node] = field(default_factory=list)


BLOCK_PATTERN = r"^((?:[A-Za-z_]\w*\.)*?(?:layers|layer|h|blocks)\.\d+)(?=\.|$)"
"""Module-path prefix of a repeated block, with or without a wrapper prefix (``model.layers.3``,
``encoder.layer.0``, ``model.model.layers.3``, ``transformer.h.7``)."""

BLOCK_NAMES = "model.layers.N, encoder.layer.N, transformer.h.N, ..."
"""How messages name what ``BLOCK_PATTERN`` finds."""


def blocks(graph: Graph, pattern: str = BLOCK_PATTERN) -> list[Region]:
    """Group nodes into repeated blocks by module path: the unit of layer-wise calibration and bisection (the
    calibration engine and the debug tools find the same blocks: GPT-2's ``transformer.h.N`` too)."""
    rx = re.compile(pattern)
    regions: dict[str, Region] = {}
    for n in graph.nodes:
        m = rx.match(n.module)
        if m:
            regions.setdefault(m.group(1), Region(m.group(1))).nodes.append(n)
    return list(regions.values())


def params_device(graph: Graph) -> torch.device:
    """Where the graph's params live (CPU for a graph without params): where calibration writes its results back
    and where a backend puts the inputs when no device was asked for."""
    for v in graph.params.values():
        if isinstance(v.data, torch.Tensor):
            return v.data.device
    return torch.device("cpu")


def graph_of(compiled: Any) -> Graph:
    """The IR behind a compiled model (anything with ``.graph``) or the Graph itself (export and save take both)."""
    if isinstance(compiled, Graph):
        return compiled
    graph = getattr(compiled, "graph", None)
    if isinstance(graph, Graph):
        return graph
    raise TypeError(f"expected a lowbit Graph or a compiled model with a .graph, got {type(compiled).__name__}")
