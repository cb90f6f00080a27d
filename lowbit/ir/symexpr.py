"""Symbolic dimension expressions (``s0``, ``2*s1``, ``(s1//2)``, ``ceiling(s0/64)``) read by a small grammar.

IR text comes from files other people wrote, so a dimension string is never handed to ``sympy.sympify``
(which is ``eval``): it is tokenised and parsed here, and the sympy expression is built from the parse tree.
The grammar is exactly what capture and lowbit's passes print::

    expr   := term (('+' | '-') term)*
    term   := unary (('*' | '//' | '/' | '%') unary)*
    unary  := '-' unary | atom
    atom   := INT | NAME | FUNC '(' expr (',' expr)* ')' | '(' expr ')'

NAME is an identifier that is not a function (``s0``, ``seq``); FUNC is one of ``FUNCTIONS``. Anything else
is a ``DimParseError`` that shows the text with a caret under the offending character.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from lowbit.errors import UntrustedInputError

if TYPE_CHECKING:  # imported where an expression is built: ~0.35 CPU-s of `import lowbit`
    import sympy

FUNCTIONS: dict[str, int] = {"ceiling": 1, "floor": 1, "Max": 2, "Min": 2, "Mod": 2, "FloorDiv": 2, "CeilDiv": 2}
"""The functions a dimension may call, with their arity (sympy's and torch's printed names)."""


@functools.cache
def _function(name: str) -> Callable[..., sympy.Expr]:
    """The sympy builder of ``FUNCTIONS[name]``."""
    import sympy

    return {"ceiling": sympy.ceiling, "floor": sympy.floor, "Max": sympy.Max, "Min": sympy.Min, "Mod": sympy.Mod,
            "FloorDiv": lambda a, b: sympy.floor(a / b), "CeilDiv": lambda a, b: sympy.ceiling(a / b)}[name]


MAX_LENGTH = 512
_TOKEN = re.compile(r"\s*(?:(?P<int>\d+)|(?P<name>[A-Za-z_][A-Za-z0-9_]*)|(?P<op>//|[-+*/%(),]))")


class DimParseError(UntrustedInputError):
    """A dimension string outside the grammar; the message shows where."""

    def __init__(self, text: str, pos: int, msg: str) -> None:
        self.text, self.pos = text, pos
        super().__init__(f"dimension {text!r}: {msg} at column {pos + 1}\n  {text}\n  {' ' * pos}^")


def symbol(name: str) -> sympy.Symbol:
    """The one sympy symbol a dimension name stands for (integer, positive, as capture declares them)."""
    import sympy

    return sympy.Symbol(name, integer=True, positive=True)


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.toks: list[tuple[str, str, int]] = []
        pos = 0
        while pos < len(text):
            if text[pos:].strip() == "":
                break
            m = _TOKEN.match(text, pos)
            if not m:
                bad = pos + len(text[pos:]) - len(text[pos:].lstrip())
                raise DimParseError(text, bad, f"unexpected character {text[bad]!r}")
            kind = m.lastgroup or ""
            self.toks.append((kind, m.group(kind), m.start(kind)))
            pos = m.end()
        self.i = 0

    def peek(self) -> tuple[str, str, int] | None:
        return self.toks[self.i] if self.i < len(self.toks) else None

    def error(self, msg: str) -> DimParseError:
        t = self.peek()
        return DimParseError(self.text, t[2] if t else len(self.text), msg)

    def take(self, text: str) -> bool:
        t = self.peek()
        if t is not None and t[0] == "op" and t[1] == text:
            self.i += 1
            return True
        return False

    def parse(self) -> sympy.Expr:
        if not self.toks:
            raise DimParseError(self.text, 0, "empty dimension")
        e = self.expr(0)
        if self.peek() is not None:
            raise self.error(f"unexpected {self.peek()[1]!r}")  # type: ignore[index]
        return e

    def expr(self, depth: int) -> sympy.Expr:
        if depth > 64:
            raise self.error("nested too deeply")
        e = self.term(depth)
        while True:
            if self.take("+"):
                e = e + self.term(depth)
            elif self.take("-"):
                e = e - self.term(depth)
            else:
                return e

    def term(self, depth: int) -> sympy.Expr:
        import sympy

        e = self.unary(depth)
        while True:
            if self.take("*"):
                e = e * self.unary(depth)
            elif self.take("//"):
                e = sympy.floor(e / self._nonzero(self.unary(depth)))
            elif self.take("/"):
                e = e / self._nonzero(self.unary(depth))
            elif self.take("%"):
                e = sympy.Mod(e, self._nonzero(self.unary(depth)))
            else:
                return e

    def _nonzero(self, e: sympy.Expr) -> sympy.Expr:
        if e == 0:
            raise DimParseError(self.text, self.toks[self.i - 1][2], "division by zero")
        return e

    def unary(self, depth: int) -> sympy.Expr:
        if self.take("-"):
            return -self.unary(depth + 1)
        return self.atom(depth)

    def atom(self, depth: int) -> sympy.Expr:
        import sympy

        t = self.peek()
        if t is None:
            raise self.error("unexpected end")
        kind, text, _ = t
        if kind == "int":
            self.i += 1
            return sympy.Integer(int(text))
        if kind == "name":
            self.i += 1
            if text in FUNCTIONS:
                fn, arity = _function(text), FUNCTIONS[text]
                if not self.take("("):
                    raise self.error(f"{text} needs '('")
                args = [self.expr(depth + 1)]
                while self.take(","):
                    args.append(self.expr(depth + 1))
                if not self.take(")"):
                    raise self.error("expected ')'")
                if len(args) != arity:
                    raise DimParseError(self.text, t[2], f"{text} takes {arity} argument(s), got {len(args)}")
                return fn(*args)
            if self.peek() is not None and self.peek()[1] == "(":  # type: ignore[index]
                raise DimParseError(self.text, t[2], f"{text!r} is not a dimension function "
                                    f"(known: {', '.join(FUNCTIONS)})")
            return symbol(text)
        if self.take("("):
            e = self.expr(depth + 1)
            if not self.take(")"):
                raise self.error("expected ')'")
            return e
        raise self.error(f"unexpected {text!r}")


@functools.lru_cache(maxsize=4096)
def parse_dim(text: str) -> sympy.Expr:
    """The sympy expression of a dimension string; ``DimParseError`` if it is not in the grammar."""
    if not isinstance(text, str):
        raise DimParseError(repr(text), 0, f"expected text, got {type(text).__name__}")
    if len(text) > MAX_LENGTH:
        raise DimParseError(text[:40] + "...", 0, f"longer than {MAX_LENGTH} characters")
    return _Parser(text).parse()


def eval_dim(d: int | str, values: Mapping[str, int]) -> int | None:
    """``d`` with each symbol replaced by ``values[name]``; None if a symbol is unbound or the result is not an
    integer."""
    if isinstance(d, int):
        return d
    import sympy

    expr = parse_dim(d)
    val = expr.xreplace({s: sympy.Integer(values[s.name]) for s in expr.free_symbols if s.name in values})
    if not val.is_number:
        return None
    try:
        as_int = int(val)
    except (TypeError, ValueError):
        return None
    return as_int if val == as_int else None


_NUMBER = re.compile(r"-?(?:\d+\.\d*(?:[eE][+-]?\d+)?|\d+[eE][+-]?\d+|\.\d+(?:[eE][+-]?\d+)?|inf|nan)")


def parse_sym_value(text: str) -> int | float | bool | sympy.Expr:
    """A ``sym(...)`` annotation: a Python scalar literal capture recorded (``True``, ``1e-05``, ``-3``) or a
    dimension expression (checked by ``parse_dim``)."""
    if text in ("True", "False"):
        return text == "True"
    if _NUMBER.fullmatch(text):
        return float(text)
    if re.fullmatch(r"-?\d+", text):
        return int(text)
    return parse_dim(text)
