"""Pattern matching and rewriting over the IR: rewrite rules are rows in a table (tinygrad's PatternMatcher).

    P("aten.add.Tensor", P("aten.mul.Tensor", X("x"), X("cos")), ..., name="root")

matches a node whose op is ``aten.add.Tensor`` and whose operands match the sub-patterns; ``X`` binds any
operand, a plain Python literal must be equal, ``Alt`` tries alternatives, ``Opt`` lets a single-input
node (a cast, say) be present or absent.

A ``PatternMatcher`` indexes a table of ``Rule(name, pattern, rewrite)`` rows by the op of each pattern's
root, and ``graph_rewrite`` applies it to a fixed point with a loop guard, keeping per-rule statistics
(tried / matched / declined / rewritten, time): raising (``raising.py``) and fusion (``fusion.py``) are such
tables.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
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
    matched node's output value, so every reader follows without a use-list walk. ``rewrite`` may return
    None to decline (a pattern says what a rule looks at, the rewrite what it accepts).
    """

    name: str
    pattern: Pattern
    rewrite: Rewrite


def root_ops(pattern: Pattern) -> tuple[str, ...] | None:
    """Ops a pattern's root node can have (the matcher's index key); None: any op (a bare ``X`` or an
    ``Alt`` with such a branch)."""
    if isinstance(pattern, P):
        return (pattern.op,) if isinstance(pattern.op, str) else tuple(pattern.op)
    if isinstance(pattern, Alt):
        ops: list[str] = []
        for opt in pattern.options:
            sub = root_ops(opt) if isinstance(opt, Pattern) else None
            if sub is None:
                return None
            ops.extend(sub)
        return tuple(dict.fromkeys(ops))
    return None


@dataclass
class RuleStats:
    """What one rule did in a rewrite: root nodes it was tried on, pattern matches, declines, rewrites."""

    tried: int = 0
    matched: int = 0
    declined: int = 0
    rewritten: int = 0
    seconds: float = 0.0


@dataclass
class RewriteStats:
    """Per-rule statistics of a ``graph_rewrite`` run and the number of sweeps it took to reach a fixed point."""

    rules: dict[str, RuleStats] = field(default_factory=dict)
    sweeps: int = 0

    @property
    def rewritten(self) -> int:
        return sum(r.rewritten for r in self.rules.values())

    def counts(self) -> dict[str, int]:
        """Rewrites per rule, only the rules that fired (what passes put in their stats)."""
        return {name: r.rewritten for name, r in self.rules.items() if r.rewritten}


class RewriteLoopError(RuntimeError):
    """A rule table did not reach a fixed point: some rules keep rewriting what others (or they) produced."""


class PatternMatcher:
    """A table of rules indexed by the op of each pattern's root, so a node is only tried against rules that
    can match it (tinygrad's ``PatternMatcher``). Rules keep their table order: at a node the first rule that
    matches and does not decline wins. ``a + b`` concatenates two tables."""

    def __init__(self, rules: Sequence[Rule]) -> None:
        self.rules = list(rules)
        names = [r.name for r in self.rules]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"rule names must be unique in a table (statistics are kept by name): {dup}")
        self._by_op: dict[str, list[tuple[int, Rule]]] = {}
        self._any: list[tuple[int, Rule]] = []
        for i, rule in enumerate(self.rules):
            ops = root_ops(rule.pattern)
            if ops is None:
                self._any.append((i, rule))
            else:
                for op in ops:
                    self._by_op.setdefault(op, []).append((i, rule))

    def __add__(self, other: PatternMatcher) -> PatternMatcher:
        return PatternMatcher(self.rules + other.rules)

    def candidates(self, op: str) -> list[Rule]:
        """Rules whose pattern can match a node of ``op``, in table order."""
        indexed = self._by_op.get(op, [])
        if not self._any:
            return [r for _, r in indexed]
        return [r for _, r in sorted(indexed + self._any, key=lambda ir: ir[0])]

    def sweep(self, graph: Graph, stats: RewriteStats | None = None) -> int:
        """One forward pass over the nodes; returns the number of rewrites."""
        stats = stats if stats is not None else RewriteStats()
        done = 0
        for i in range(len(graph.nodes)):
            node = graph.nodes[i]
            if len(node.outputs) != 1:
                continue
            for rule in self.candidates(node.op):
                rs = stats.rules.setdefault(rule.name, RuleStats())
                rs.tried += 1
                t0 = time.perf_counter()
                b: Bindings = {}
                try:
                    if not rule.pattern.match(node.output, b):
                        continue
                    rs.matched += 1
                    new = rule.rewrite(graph, node, b)
                finally:
                    rs.seconds += time.perf_counter() - t0
                if new is None:
                    rs.declined += 1
                    continue
                _replace(graph, i, node, new, rule)
                rs.rewritten += 1
                done += 1
                break
        return done


def _replace(graph: Graph, index: int, node: Node, new: Node, rule: Rule) -> None:
    if new.outputs:
        raise ValueError(f"rule {rule.name} must build its node without outputs (it takes over %{node.name})")
    out = node.output
    node.outputs = []
    new.add_output(out)
    if not new.module:
        new.module = node.module
    new.meta.setdefault("raised_from", node.op)
    graph.nodes[index] = new
    graph.rename(out, new.op)


def graph_rewrite(graph: Graph, matcher: PatternMatcher | Sequence[Rule], *, max_sweeps: int = 32) -> RewriteStats:
    """Apply ``matcher``'s rules until a whole sweep rewrites nothing (a fixed point), in place.

    Each sweep walks the nodes in order, so a rewrite's result is seen by later nodes in the same sweep and by
    every node in the next. A table that is still rewriting after ``max_sweeps`` sweeps loops (a rule
    re-creating what another removes): that is an error naming the rules that fired last, not a hang.
    Interior nodes of a matched pattern stay until dead-code elimination removes them, so a rewrite never has
    to know whether they have other readers.
    """
    pm = matcher if isinstance(matcher, PatternMatcher) else PatternMatcher(matcher)
    stats = RewriteStats()
    history: list[dict[str, int]] = []
    while True:
        history.append({n: r.rewritten for n, r in stats.rules.items()})
        done = pm.sweep(graph, stats)
        stats.sweeps += 1
        if not done:
            return stats
        if stats.sweeps >= max_sweeps:
            # a cycle may alternate rules between sweeps: name every rule that fired in the last two
            since = history[-2] if len(history) > 1 else history[-1]
            fired = sorted(n for n, r in stats.rules.items() if r.rewritten > since.get(n, 0))
            raise RewriteLoopError(f"rewrite did not reach a fixed point in {max_sweeps} sweeps of graph "
                                   f"{graph.name}: rules still firing: {', '.join(fired)}")


def apply_rules(graph: Graph, rules: list[Rule]) -> dict[str, int]:
    """One forward sweep: at each node try the rules in order and swap in the first replacement (raising's
    tables, whose results never match again); returns rewrites per rule."""
    stats = RewriteStats()
    PatternMatcher(rules).sweep(graph, stats)
    return stats.counts()
