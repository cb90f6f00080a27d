"""A small pattern matcher over the IR, so rewrite rules are rows in a table (tinygrad's PatternMatcher).

    P("aten.add.Tensor", P("aten.mul.Tensor", X("x"), X("cos")), ..., name="root")

matches a node whose op is ``aten.add.Tensor`` and whose operands match the sub-patterns; ``X`` binds any
operand, a plain Python literal must be equal, ``Alt`` tries alternatives, ``Opt`` lets a single-input
node (a cast, say) be present or absent.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lowbit.ir.graph import Graph, Node, Value

Bindings = dict[str, Any]


class Pattern:
    def match(self, x: Any, b: Bindings) -> bool:  # pragma: no cover - interface
        raise NotImplementedError


@dataclass
class X(Pattern):
    """Any operand, bound to ``name``; ``check`` may restrict it. The same name must bind the same thing."""

    name: str
    check: Callable[[Any], bool] | None = None

    def match(self, x: Any, b: Bindings) -> bool:
        if self.check is not None and not self.check(x):
            return False
        if self.name in b:
            return b[self.name] is x or (not isinstance(x, Value) and b[self.name] == x)
        b[self.name] = x
        return True


@dataclass
class P(Pattern):
    """A node producing the operand: op name(s), operand patterns, optional binding of the node."""

    op: str | tuple[str, ...]
    args: tuple[Any, ...] = ()
    name: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    exact_arity: bool = True

    def __init__(self, op: str | tuple[str, ...], *args: Any, name: str | None = None,
                 exact_arity: bool = True, **kwargs: Any) -> None:
        self.op, self.args, self.name, self.kwargs, self.exact_arity = op, args, name, kwargs, exact_arity

    def match(self, x: Any, b: Bindings) -> bool:
        if not isinstance(x, Value) or x.producer is None:
            return False
        node = x.producer
        ops = (self.op,) if isinstance(self.op, str) else self.op
        if node.op not in ops:
            return False
        if self.exact_arity and len(node.args) != len(self.args):
            return False
        if len(node.args) < len(self.args):
            return False
        for pat, arg in zip(self.args, node.args):
            if not match_operand(pat, arg, b):
                return False
        for key, pat in self.kwargs.items():
            if not match_operand(pat, node.kwargs.get(key), b):
                return False
        if self.name is not None:
            b[self.name] = node
        return True


@dataclass
class Alt(Pattern):
    options: tuple[Any, ...]

    def __init__(self, *options: Any) -> None:
        self.options = options

    def match(self, x: Any, b: Bindings) -> bool:
        for opt in self.options:
            trial = dict(b)
            if match_operand(opt, x, trial):
                b.clear()
                b.update(trial)
                return True
        return False


def Opt(wrapper: Callable[[Any], Pattern], inner: Any) -> Alt:
    """``inner`` with or without a single-input node around it (``wrapper(inner)``)."""
    return Alt(wrapper(inner), inner)


def match_operand(pat: Any, x: Any, b: Bindings) -> bool:
    if isinstance(pat, Pattern):
        return pat.match(x, b)
    if isinstance(pat, list):
        return isinstance(x, (list, tuple)) and len(x) == len(pat) and all(
            match_operand(p, e, b) for p, e in zip(pat, x)
        )
    return not isinstance(x, Value) and x == pat


Rewrite = Callable[[Graph, Node, Bindings], Node | None]


@dataclass
class Rule:
    """Row of a rewrite table: when ``pattern`` matches a node's output, ``rewrite`` returns its replacement.

    The replacement is built without outputs (``Node(op, args, kwargs, module=...)``); it takes over the
    matched node's output value, so every reader follows without a use-list walk.
    """

    name: str
    pattern: Pattern
    rewrite: Rewrite


def apply_rules(graph: Graph, rules: list[Rule]) -> dict[str, int]:
    """One forward sweep: at each node try the rules in order and swap in the first replacement.

    Interior nodes of a matched pattern stay until dead-code elimination removes them, so a rewrite
    never has to know whether they have other readers.
    """
    counts: dict[str, int] = {}
    for i, node in enumerate(graph.nodes):
        if len(node.outputs) != 1:
            continue
        for rule in rules:
            b: Bindings = {}
            if not rule.pattern.match(node.output, b):
                continue
            new = rule.rewrite(graph, node, b)
            if new is None:
                continue
            assert not new.outputs, f"rule {rule.name} must build its node without outputs"
            out = node.output
            node.outputs = []
            new.add_output(out)
            if not new.module:
                new.module = node.module
            new.meta.setdefault("raised_from", node.op)
            graph.nodes[i] = new
            graph.rename(out, new.op)
            counts[rule.name] = counts.get(rule.name, 0) + 1
            break
    return counts
