"""Shape re-inference: after a rewrite changed a weight's shape, re-derive every node's declared type and the
literals that encode sizes.

Structured pruning narrows a linear (fewer rows of ``q_proj``, fewer columns of ``down_proj``); every value
downstream then has a different shape, and some nodes carry sizes as literals recorded at capture:
``reshape(x, [1, s, 9, 64])`` (heads x head_dim), ``expand(kv, [1, 3, 3, s, 64])`` (kv heads x queries per
kv head), ``split_with_sizes(x, [576, 192, 192])``. ``reinfer_shapes`` walks the graph in order, running each
node on meta tensors as the verifier does (symbols bound to fixed values):

- a node that runs and produces what it declared is left alone;
- a node that fails, or produces another shape, and has a size literal (reshape/view, expand, split) gets the
  literal rewritten from how its input changed, then runs again. A reshape keeps every dim whose input group
  kept its size and changes the *leading* dim of a group that changed (heads change, head_dim does not); a
  ``-1`` entry stays ``-1``. An expand follows its input on every non-broadcast dim. A split of equal chunks
  stays equal; an uneven split that changed is an error (only the rewriting pass knows which part shrank);
- the node's declared output types are re-derived: a symbolic dim (``s0``, ``9*s0``) keeps its expression
  when its value did not change, and scales with the change otherwise (``9*s0`` -> ``6*s0``).

A node that still fails is a ``ShapeError`` naming the node, op, module and shapes. The verifier then checks
the result independently with the symbols at their capture hints.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import sympy
import torch

from lowbit.ir.graph import Dim, Graph, Node, SymType, TensorType, Value, map_operands
from lowbit.ir.ops import resolve

__all__ = ["ShapeError", "ShapeReport", "reinfer_shapes", "RESHAPE_OPS", "EXPAND_OPS", "SPLIT_OPS"]

RESHAPE_OPS = ("reshape", "aten.view.default", "aten.reshape.default", "aten._unsafe_view.default")
EXPAND_OPS = ("aten.expand.default",)
SPLIT_OPS = ("aten.split_with_sizes.default", "aten.split.Tensor")

# Symbols are bound to values unlikely to equal any static size of a model (so a changed static dim is never
# mistaken for the sequence length); each symbol gets its own value.
_SYMBOL_VALUES = (1031, 1039, 1049, 1051, 1061, 1063, 1069, 1087)


class ShapeError(ValueError):
    """A node's shape cannot be re-derived; the message names the node, op, module and shapes."""


@dataclass
class ShapeReport:
    retyped: list[str] = field(default_factory=list)
    """Values whose declared type changed (``%name: old -> new``)."""
    literals: list[str] = field(default_factory=list)
    """Nodes whose size literal was rewritten (``%name: old -> new``)."""
    unchecked: list[str] = field(default_factory=list)
    """Nodes that cannot run on meta tensors (types left as declared)."""


def _where(node: Node) -> str:
    return f"%{node.name} = {node.op}(...)" + (f" in {node.module}" if node.module else "")


class _Binding:
    """Each symbol bound to one value; evaluates declared dims, and turns measured dims back into expressions."""

    def __init__(self, graph: Graph) -> None:
        self.env: dict[sympy.Symbol, int] = {}
        self.locals: dict[str, sympy.Symbol] = {}
        used: set[int] = set()
        for i, (name, s) in enumerate(graph.symbols.items()):
            val = _SYMBOL_VALUES[i % len(_SYMBOL_VALUES)] + 100 * (i // len(_SYMBOL_VALUES))
            lo = s.min if s.min is not None else 2
            hi = s.max if s.max is not None else 1 << 30
            if not lo <= val <= hi:  # the largest unused prime in range: unlikely to equal a model's static size
                val = next((c for c in range(hi, lo - 1, -1) if sympy.isprime(c) and c not in used),
                           s.hint if s.hint is not None else lo)
            used.add(val)
            sym = sympy.Symbol(name, integer=True, positive=True)
            self.env[sym] = val
            self.env[sympy.Symbol(name)] = val
            self.locals[name] = sym
        self._cache: dict[str, Any] = {}

    def expr(self, d: str) -> sympy.Expr:
        if d not in self._cache:
            self._cache[d] = sympy.sympify(d, locals=self.locals)
        return self._cache[d]

    def __call__(self, d: Dim) -> int:
        if isinstance(d, int):
            return d
        val = self.expr(d).subs(self.env)
        return int(val) if val.is_number else -1

    def dim_for(self, old: Dim, new: int) -> Dim:
        """The declared form of a measured dim ``new`` where ``old`` was declared."""
        if isinstance(old, int):
            return new
        old_val = self(old)
        if old_val == new:
            return old
        if new == 1:  # a symbolic dim cut to one row (last-logits' slice): static, not s1/1031
            return 1
        if old_val > 0:
            scaled = sympy.simplify(self.expr(old) * sympy.Rational(new, old_val))
            if not scaled.free_symbols:
                return int(scaled)
            return str(scaled).replace(" ", "")
        return new


def _meta(v: Value, b: _Binding) -> Any:
    t = v.type
    if isinstance(t, TensorType):
        return torch.empty([b(d) for d in t.shape], dtype=t.dtype, device="meta")
    if isinstance(t, SymType) and t.expr is not None:
        try:
            return b(t.expr)
        except (sympy.SympifyError, TypeError):
            return None
    return None


def _run(node: Node, env: dict[int, Any]) -> Any:
    args, kwargs = map_operands(
        lambda x: env.get(id(x)) if isinstance(x, Value) else (torch.device("meta") if isinstance(x, torch.device)
                                                                  else x),
        (node.args, node.kwargs))
    return resolve(node.op)(*args, **kwargs)


def _groups(a: list[int], b: list[int]) -> list[tuple[range, range]]:
    """Align two shapes of equal numel into groups of dims with equal products (how a reshape maps them)."""
    out: list[tuple[range, range]] = []
    i = j = 0
    while i < len(a) or j < len(b):
        i0, j0 = i, j
        pa = a[i] if i < len(a) else 1
        pb = b[j] if j < len(b) else 1
        i, j = min(i + 1, len(a)), min(j + 1, len(b))
        while pa != pb:
            if pa < pb and i < len(a):
                pa *= a[i]
                i += 1
            elif j < len(b):
                pb *= b[j]
                j += 1
            else:
                raise ValueError(f"shapes {a} and {b} do not have the same number of elements")
        # size-1 dims that follow belong to no group that changes; give them their own group
        out.append((range(i0, i), range(j0, j)))
    return out


def _new_reshape_target(node: Node, target: list[Any], old_in: list[int], new_in: list[int],
                        old_out: list[int]) -> list[Any]:
    groups = _groups(old_in, old_out)
    new_target = list(target)
    for gi, go in groups:
        old_p = math.prod(old_in[k] for k in gi)
        new_p = math.prod(new_in[k] for k in gi)
        if old_p == new_p:
            continue
        entries = list(go)
        if any(isinstance(target[k], int) and target[k] == -1 for k in entries):
            continue  # the -1 absorbs the change
        fixed = [k for k in entries if isinstance(target[k], int) and old_out[k] != 1]
        if not fixed:
            raise ShapeError(f"{_where(node)}: input dims {list(gi)} changed from {old_p} to {new_p} elements but "
                             f"the target {target} has no literal size there to rewrite")
        k = fixed[0]
        rest = old_p // old_out[k]
        if new_p % rest:
            raise ShapeError(f"{_where(node)}: input dims {list(gi)} now hold {new_p} elements, which the other "
                             f"target dims ({rest} elements) do not divide (target {target})")
        new_target[k] = new_p // rest
    return new_target


def _new_expand_target(node: Node, target: list[Any], old_in: list[int], new_in: list[int]) -> list[Any]:
    off = len(target) - len(new_in)
    new_target = list(target)
    for i, (o, n) in enumerate(zip(old_in, new_in)):
        k = i + off
        if o != n and isinstance(target[k], int) and target[k] != -1:
            if o == 1:
                raise ShapeError(f"{_where(node)}: input dim {i} was broadcast (1) and is now {n}")
            new_target[k] = n
    return new_target


def _new_split(node: Node, sizes: Any, old_len: int, new_len: int) -> Any:
    if isinstance(sizes, int):  # aten.split.Tensor(x, chunk): equal chunks of a size
        n_chunks = -(-old_len // sizes)
        if new_len % n_chunks:
            raise ShapeError(f"{_where(node)}: {new_len} does not split into {n_chunks} equal chunks")
        return new_len // n_chunks
    if len(set(sizes)) == 1 and new_len % len(sizes) == 0:
        return [new_len // len(sizes)] * len(sizes)
    raise ShapeError(f"{_where(node)}: split sizes {list(sizes)} along a dim that changed from {old_len} to "
                     f"{new_len}: an uneven split cannot be re-derived; the rewriting pass must set the sizes")


def _rewrite_literal(node: Node, env: dict[int, Any], old_types: dict[int, Any], b: _Binding) -> str | None:
    """Rewrite ``node``'s size literal for its new input shape; returns a description, or None if it has none."""
    x = node.args[0] if node.args else None
    old_x = old_types.get(id(x)) if isinstance(x, Value) else None
    if not isinstance(old_x, TensorType) or not isinstance(env.get(id(x)), torch.Tensor):
        return None
    new_in = list(env[id(x)].shape)
    old_in = [b(d) for d in old_x.shape]
    if node.op in RESHAPE_OPS or node.op in EXPAND_OPS:
        target = list(node.args[1])
        if node.op in RESHAPE_OPS:
            out_t = node.outputs[0].type
            if not isinstance(out_t, TensorType):
                return None
            new = _new_reshape_target(node, target, old_in, new_in, [b(d) for d in out_t.shape])
        else:
            new = _new_expand_target(node, target, old_in, new_in)
        if new == target:
            return None
        node.args = (node.args[0], new, *node.args[2:])
        return f"%{node.name}: {target} -> {new}"
    if node.op in SPLIT_OPS:
        dim = node.arg(2, "dim", 0)
        dim = dim % len(new_in)
        sizes = node.args[1]
        new = _new_split(node, sizes, old_in[dim], new_in[dim])
        if new == sizes:
            return None
        node.args = (node.args[0], new, *node.args[2:])
        return f"%{node.name}: {sizes} -> {new}"
    return None


def reinfer_shapes(graph: Graph) -> ShapeReport:
    """Re-derive declared types (and size literals) of every node from the params' and inputs' current shapes."""
    b = _Binding(graph)
    report = ShapeReport()
    env: dict[int, Any] = {}
    old_types: dict[int, Any] = {id(v): v.type for n in graph.nodes for v in n.outputs}
    for v in graph.inputs:
        env[id(v)] = _meta(v, b)
    for v in graph.params.values():
        env[id(v)] = _meta(v, b)
    for node in graph.nodes:
        declared = [_meta(v, b) for v in node.outputs]
        inputs_changed = any(
            isinstance(old_types.get(id(v)), TensorType) and isinstance(env.get(id(v)), torch.Tensor)
            and list(env[id(v)].shape) != [b(d) for d in old_types[id(v)].shape]
            for v in node.inputs())
        if inputs_changed:
            # a size literal was recorded for the old input shape: rewrite it from the old input types first (an
            # expand whose kv-head dim became 1 would otherwise broadcast silently instead of failing)
            try:
                note = _rewrite_literal(node, env, old_types, b)
            except ValueError as exc:
                raise ShapeError(f"{_where(node)}: {exc}") from None
            if note is not None:
                report.literals.append(note)
        try:
            out = _run(node, env)
            bad: Any = None
        except Exception as exc:  # noqa: BLE001 - reported below
            out, bad = None, exc
        if bad is not None:
            msg = str(bad).splitlines()[0] if str(bad) else type(bad).__name__
            if isinstance(bad, NotImplementedError) or "meta" in msg.lower():
                report.unchecked.append(f"{_where(node)}: cannot run on meta tensors ({msg})")
                for v, d in zip(node.outputs, declared):
                    env[id(v)] = d
                continue
            shapes = ", ".join(f"%{v.name}: {list(env[id(v)].shape)}" for v in node.inputs()
                               if isinstance(env.get(id(v)), torch.Tensor))
            raise ShapeError(f"{_where(node)}: cannot re-derive its shape ({type(bad).__name__}: {msg}); "
                             f"inputs now {shapes}") from None
        outs = list(out) if isinstance(out, (tuple, list)) and len(node.outputs) > 1 else [out]
        for v, got in zip(node.outputs, outs):
            env[id(v)] = got
            if isinstance(v.type, TensorType) and isinstance(got, torch.Tensor):
                if got.dtype == v.type.dtype and list(got.shape) == [b(d) for d in v.type.shape]:
                    continue
                if len(got.shape) != len(v.type.shape):
                    new_shape = tuple(int(d) for d in got.shape)
                else:
                    new_shape = tuple(b.dim_for(o, int(n)) for o, n in zip(v.type.shape, got.shape))
                new_t = TensorType(got.dtype, new_shape)
                report.retyped.append(f"%{v.name}: {v.type} -> {new_t}")
                v.type = new_t
    return report
