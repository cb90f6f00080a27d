"""Read the text form written by ``lowbit.ir.printer`` back into a ``Graph``.

The parser is strict: any line it cannot read raises ``IRParseError`` with the line number and the
column, so golden-IR fixtures fail loudly rather than parse into something else.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from lowbit.errors import LowbitError
from lowbit.ir.graph import DTYPES_BY_NAME, Graph, Node, SymType, Symbol, TensorType, Value, ValueType
from lowbit.ir.ops import check_op
from lowbit.ir.printer import ENUM_LITERALS, IR_VERSION, VERSION_LINE
from lowbit.ir.symexpr import DimParseError, parse_dim, parse_sym_value
from lowbit.ir.verifier import WRITES_OPERAND, device_problem
from lowbit.version import __version__

ENUMS_BY_NAME = {v: k for k, v in ENUM_LITERALS.items()}
MAX_SIZE = 2**63 - 1
"""The largest size or symbol bound a file may give: torch sizes are 64-bit."""

SPARSITY_MARK = re.compile(r"\d{1,4}:\d{1,4}|unstructured-[0-9.e+-]{1,24}")
"""What ``| sparsity`` may say: the pattern ``sparsify`` recorded (``SparsityPattern.__str__``)."""
_QSCHEME_KV = re.compile(r"k:[\w.-]{1,64} v:[\w.-]{1,64} window:\d{1,9} sink:\d{1,9}")
"""What ``| qscheme_kv`` may say: the KV scheme ``quantize(kv=...)`` recorded on an attention node."""


class IRParseError(LowbitError, ValueError):
    """IR text that is not lowbit IR, or asks for an op or an expression lowbit does not run from a file."""

    def __init__(self, msg: str, line_no: int, line: str, col: int = 0) -> None:
        self.line_no, self.col = line_no, col
        super().__init__(f"line {line_no}, col {col + 1}: {msg}\n  {line}\n  {' ' * col}^")


_TOKEN = re.compile(
    r"""
    (?P<ws>\s+)
  | (?P<comment>\#.*)
  | (?P<string>"(?:[^"\\]|\\.)*")
  | (?P<value>%(?:[A-Za-z0-9_]+|"(?:[^"\\]|\\.)*"))
  | (?P<param>@(?:[A-Za-z0-9_.\-/]+|"(?:[^"\\]|\\.)*"))
  | (?P<number>-?(?:\d+\.\d*(?:[eE][+-]?\d+)?|\d+[eE][+-]?\d+|\.\d+(?:[eE][+-]?\d+)?|\d+))
  | (?P<name>-?[A-Za-z_][A-Za-z0-9_.]*)
  | (?P<punct>[()\[\],=:{}*+/?-])
""",
    re.VERBOSE,
)


@dataclass
class Tok:
    kind: str
    text: str
    col: int

    @property
    def name(self) -> str:
        """A ``%value`` or ``@param`` token's name: as written, or a JSON string's text (``@"d.my layer.weight"``,
        how the printer writes a name its plain form would not read back)."""
        bare = self.text[1:]
        return json.loads(bare) if bare.startswith('"') else bare


class IRVersionError(IRParseError):
    """IR text written by a newer lowbit, in a version of the text form this one does not read."""


def tokenize(line: str, line_no: int) -> tuple[list[Tok], str | None]:
    toks: list[Tok] = []
    comment = None
    pos = 0
    while pos < len(line):
        m = _TOKEN.match(line, pos)
        if not m:
            raise IRParseError(f"unexpected character {line[pos]!r}", line_no, line, pos)
        kind = m.lastgroup or ""
        if kind == "comment":
            comment = m.group()[1:].strip()
        elif kind != "ws":
            toks.append(Tok(kind, m.group(), pos))
        pos = m.end()
    return toks, comment


class _Line:
    """A cursor over one line's tokens."""

    def __init__(self, toks: list[Tok], line_no: int, line: str) -> None:
        self.toks, self.i, self.line_no, self.line = toks, 0, line_no, line

    def error(self, msg: str) -> IRParseError:
        col = self.toks[self.i].col if self.i < len(self.toks) else len(self.line)
        return IRParseError(msg, self.line_no, self.line, col)

    def peek(self, offset: int = 0) -> Tok | None:
        j = self.i + offset
        return self.toks[j] if j < len(self.toks) else None

    def next(self) -> Tok:
        t = self.peek()
        if t is None:
            raise self.error("unexpected end of line")
        self.i += 1
        return t

    def expect(self, text: str) -> Tok:
        t = self.peek()
        if t is None or t.text != text:
            raise self.error(f"expected {text!r}, found {t.text if t else 'end of line'!r}")
        self.i += 1
        return t

    def accept(self, text: str) -> bool:
        t = self.peek()
        if t is not None and t.text == text:
            self.i += 1
            return True
        return False

    def done(self) -> None:
        if self.i != len(self.toks):
            raise self.error(f"unexpected {self.toks[self.i].text!r}")


def _dim(text: str) -> int | str:
    """A static size or a symbolic dimension; the latter must be in ``symexpr``'s grammar (never eval'd)."""
    if re.fullmatch(r"-?\d+", text):
        if int(text) < 0:
            raise DimParseError(text, 0, "a size cannot be negative")
        if int(text) > MAX_SIZE:
            raise DimParseError(text, 0, f"a size must fit 64 bits (at most {MAX_SIZE})")
        return int(text)
    parse_dim(text)
    return text


class Parser:
    def __init__(self, params: Mapping[str, torch.Tensor] | None) -> None:
        self.weights = params or {}
        self.graph: Graph | None = None
        self.values: dict[str, Value] = {}

    # ---- types --------------------------------------------------------------------------------
    def parse_type(self, c: _Line) -> ValueType:
        t = c.next()
        if t.text == "?":
            return None
        if t.text == "sym":
            if c.accept("("):
                start = c.peek()
                expr = self._until(c, ")")
                try:
                    parse_sym_value(expr)
                except DimParseError as exc:
                    raise IRParseError(str(exc).splitlines()[0], c.line_no, c.line,
                                       (start.col if start else 0) + exc.pos) from None
                return SymType(expr)
            return SymType()
        if t.text not in DTYPES_BY_NAME:
            raise c.error(f"unknown dtype {t.text!r} (known: {', '.join(DTYPES_BY_NAME)})")
        c.expect("[")
        dims: list[int | str] = []
        if not c.accept("]"):
            while True:
                start = c.peek()
                text = self._until(c, ",", "]", keep=True)
                try:
                    dims.append(_dim(text))
                except DimParseError as exc:
                    raise IRParseError(str(exc).splitlines()[0], c.line_no, c.line,
                                       (start.col if start else 0) + exc.pos) from None
                if c.accept("]"):
                    break
                c.expect(",")
        return TensorType(DTYPES_BY_NAME[t.text], tuple(dims))

    def _until(self, c: _Line, *stops: str, keep: bool = False) -> str:
        """Join raw tokens up to a stop token at depth 0 (dimension expressions)."""
        parts, depth = [], 0
        while True:
            t = c.peek()
            if t is None:
                raise c.error(f"expected one of {stops}")
            if depth == 0 and t.text in stops:
                if not keep:
                    c.next()
                return "".join(parts)
            depth += t.text == "("
            depth -= t.text == ")"
            parts.append(c.next().text)

    # ---- literals and operands ----------------------------------------------------------------
    def parse_operand(self, c: _Line) -> Any:
        t = c.next()
        if t.kind == "value":
            name = t.name
            if name not in self.values:
                raise IRParseError(f"use of undefined value %{name}", c.line_no, c.line, t.col)
            return self.values[name]
        if t.kind == "param":
            name = t.name
            assert self.graph is not None
            if name not in self.graph.params:
                raise IRParseError(f"use of undeclared parameter @{name}", c.line_no, c.line, t.col)
            return self.graph.params[name]
        if t.kind == "number":
            return float(t.text) if re.search(r"[.eE]", t.text) else int(t.text)
        if t.kind == "string":
            return json.loads(t.text)
        if t.text == "[":
            items = []
            if not c.accept("]"):
                while True:
                    items.append(self.parse_operand(c))
                    if c.accept("]"):
                        break
                    c.expect(",")
            return items
        if t.kind == "name":
            fixed = {"True": True, "False": False, "None": None, "inf": float("inf"), "-inf": float("-inf"),
                     "nan": float("nan")}
            if t.text in fixed:
                return fixed[t.text]
            if t.text in DTYPES_BY_NAME:
                return DTYPES_BY_NAME[t.text]
            if t.text in ENUMS_BY_NAME:
                return ENUMS_BY_NAME[t.text]
            if t.text == "device":
                c.expect("(")
                s = c.next()
                c.expect(")")
                dev = torch.device(json.loads(s.text))
                problem = device_problem(dev)
                if problem is not None:
                    raise IRParseError(problem, c.line_no, c.line, s.col)
                return dev
        raise IRParseError(f"expected an operand, found {t.text!r}", c.line_no, c.line, t.col)

    # ---- statements ---------------------------------------------------------------------------
    def parse(self, text: str) -> Graph:
        lines = text.splitlines()
        state = "header"
        for no, raw in enumerate(lines, 1):
            toks, comment = tokenize(raw, no)
            if not toks:
                if state == "header" and raw.startswith(VERSION_LINE):
                    self._version(raw, no)
                continue
            c = _Line(toks, no, raw)
            try:
                state = self._statement(c, toks, state, comment)
            except IRParseError:
                raise
            except (ValueError, TypeError, KeyError, IndexError, RuntimeError, OverflowError) as exc:
                # a literal Python or torch refuses (int('x'), a bad escape, device("nope")): still a parse error
                col = c.toks[min(c.i, len(c.toks)) - 1].col if c.i else 0
                raise IRParseError(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                                   no, raw, col) from None
        if state != "closed":
            raise IRParseError("graph not closed with 'return ...' and '}'", len(lines), lines[-1] if lines else "")
        assert self.graph is not None
        return self.graph

    @staticmethod
    def _version(line: str, line_no: int) -> None:
        """The ``# lowbit IR version N`` line of a saved file: a newer N is refused by name, not misread."""
        text = line[len(VERSION_LINE):].strip()
        if not re.fullmatch(r"\d{1,9}", text):
            raise IRParseError(f"the IR version must be an integer, found {text!r}", line_no, line, len(VERSION_LINE))
        if int(text) > IR_VERSION:
            raise IRVersionError(f"this is lowbit IR version {int(text)}, written by a newer lowbit; this lowbit "
                                 f"({__version__}) reads versions up to {IR_VERSION}: upgrade lowbit to read it",
                                 line_no, line, len(VERSION_LINE))

    def _statement(self, c: _Line, toks: list[Tok], state: str, comment: str | None) -> str:
        """Parse one line in ``state``; returns the next state."""
        head = toks[0].text
        if state == "header":
            if head != "graph":
                raise c.error("expected 'graph NAME(...) {'")
            self._header(c)
            state = "body"
        elif state == "body":
            if head == "symbol":
                self._symbol(c)
            elif head == "param":
                self._param(c)
            elif head == "return":
                self._return(c)
                state = "end"
            elif toks[0].kind == "value":
                self._node(c, comment or "")
            else:
                raise c.error("expected a node, 'symbol', 'param' or 'return'")
        elif state == "end":
            c.expect("}")
            c.done()
            state = "closed"
        else:
            raise c.error("text after the end of the graph")
        return state

    def _header(self, c: _Line) -> None:
        c.expect("graph")
        t = c.next()
        if t.kind not in ("name", "string"):  # the printer writes no other (graph_ref)
            raise IRParseError(f"expected the graph's name (a name, or a JSON string), found {t.text!r}", c.line_no,
                               c.line, t.col)
        self.graph = Graph(json.loads(t.text) if t.kind == "string" else t.text)
        c.expect("(")
        if not c.accept(")"):
            while True:
                t = c.next()
                if t.kind != "value":
                    raise c.error("expected an input %name")
                c.expect(":")
                v = self.graph.add_input(t.name, self.parse_type(c))
                self.values[v.name] = v
                if c.accept(")"):
                    break
                c.expect(",")
        c.expect("{")
        c.done()

    def _symbol(self, c: _Line) -> None:
        assert self.graph is not None
        c.expect("symbol")
        name = c.next().text
        if name in self.graph.symbols:  # a second line silently replaced the first range
            raise c.error(f"symbol {name} is declared twice")
        sym = Symbol(name)
        if c.accept("in"):
            c.expect("[")
            sym.min = self._bound(c)
            c.expect(",")
            sym.max = self._bound(c)
            c.expect("]")
            if sym.min is not None and sym.max is not None and sym.max < sym.min:
                raise c.error(f"symbol {name} has an empty range [{sym.min}, {sym.max}]")
        if c.accept("hint"):
            sym.hint = self._bound(c, unknown=False)
        c.done()
        self.graph.symbols[name] = sym

    @staticmethod
    def _bound(c: _Line, unknown: bool = True) -> int | None:
        """A symbol's bound or hint: a size (an integer >= 0), or ``?`` (unbounded) where ``unknown``."""
        t = c.peek()
        if t is not None and unknown and t.text == "?":
            c.next()
            return None
        if t is None or t.kind != "number" or not t.text.isdigit():
            found = t.text if t else "end of line"
            raise c.error(f"expected a size (an integer >= 0){' or ?' if unknown else ''}, found {found!r}")
        if int(t.text) > MAX_SIZE:
            raise c.error(f"a size must fit 64 bits (at most {MAX_SIZE}), found {t.text}")
        return int(c.next().text)

    def _param(self, c: _Line) -> None:
        assert self.graph is not None
        c.expect("param")
        t = c.next()
        if t.kind != "param":
            raise c.error("expected @name")
        c.expect(":")
        typ = self.parse_type(c)
        c.done()
        name = t.name
        data = self.weights.get(name)
        v = self.graph.add_param(name, data, typ)
        if data is not None and v.type != typ:
            raise c.error(f"parameter @{name} is declared {typ} but the given tensor is {v.type}")

    @staticmethod
    def _merged_members(c: _Line, text: str) -> tuple[str, ...]:
        """The ``| merged [...]`` comment: the module paths a horizontal merge joined (a JSON list of strings)."""
        try:
            members = json.loads(text)
        except (ValueError, RecursionError):
            members = None
        if not (isinstance(members, list) and len(members) >= 2 and all(isinstance(m, str) for m in members)):
            raise c.error("'| merged' must be followed by a JSON list of two or more module paths")
        return tuple(members)

    def _node(self, c: _Line, comment: str) -> None:
        assert self.graph is not None
        if comment.startswith('"'):  # a module path the printer quoted (printer.format_module)
            module, end = json.JSONDecoder().raw_decode(comment)
            if not isinstance(module, str):
                raise c.error("a quoted module path must be a JSON string")
            tail, _, qscheme_kv = comment[end:].partition("| qscheme_kv ")
            tail, _, sparsity = tail.partition("| sparsity ")
            tail, _, merged = tail.partition("| merged ")
            _, _, fused = tail.partition("| fused ")
        else:  # a plain module path has no '|' (the printer quotes one that has)
            comment, _, qscheme_kv = comment.partition("| qscheme_kv ")
            comment, _, sparsity = comment.partition("| sparsity ")
            comment, _, merged = comment.partition("| merged ")
            module, _, fused = comment.partition("| fused ")
            module = module.strip()
        members = self._merged_members(c, merged) if merged else None
        sparsity = sparsity.strip()
        if sparsity and not SPARSITY_MARK.fullmatch(sparsity):
            raise c.error(f"'| sparsity' must be followed by a pattern like 2:4 or unstructured-0.5, got {sparsity!r}")
        qscheme_kv = qscheme_kv.strip()
        if qscheme_kv and not _QSCHEME_KV.fullmatch(qscheme_kv):
            raise c.error("'| qscheme_kv' must be followed by 'k:SCHEME v:SCHEME window:N sink:N', got "
                          f"{qscheme_kv!r}")
        outs: list[tuple[str, ValueType]] = []
        while True:
            t = c.next()
            if t.kind != "value":
                raise c.error("expected %name")
            c.expect(":")
            outs.append((t.name, self.parse_type(c)))
            if c.accept("="):
                break
            c.expect(",")
        op = c.next()
        if op.kind != "name":
            raise c.error("expected an op name")
        refused = check_op(op.text)
        if refused is not None:
            raise IRParseError(refused, c.line_no, c.line, op.col)
        c.expect("(")
        args: list[Any] = []
        kwargs: dict[str, Any] = {}
        if not c.accept(")"):
            while True:
                t, t2 = c.peek(), c.peek(1)
                if t is not None and t.kind == "name" and t2 is not None and t2.text == "=":
                    if t.text in WRITES_OPERAND:
                        raise IRParseError(f"op {op.text}: keyword {t.text}= writes into an operand; lowbit IR is SSA "
                                           "(every node makes new values), so no node takes it", c.line_no, c.line,
                                           t.col)
                    if t.text in kwargs:
                        raise IRParseError(f"op {op.text}: keyword {t.text}= is given twice", c.line_no, c.line,
                                           t.col)
                    c.next()
                    c.next()
                    kwargs[t.text] = self.parse_operand(c)
                else:
                    if kwargs:
                        raise c.error("positional operand after a keyword operand")
                    args.append(self.parse_operand(c))
                if c.accept(")"):
                    break
                c.expect(",")
        c.done()
        node = Node(op.text, tuple(args), kwargs, module=module)
        if fused:
            node.meta["fused"] = fused.strip()
        if members is not None:
            node.meta["merged"] = members
        if sparsity:
            node.meta["sparsity"] = sparsity
        if qscheme_kv:
            node.meta["qscheme_kv"] = qscheme_kv
        for name, typ in outs:
            if name in self.values:
                raise c.error(f"%{name} is defined twice")
            v = node.add_output(Value(name, typ))
            self.values[name] = v
        self.graph.append(node)

    def _return(self, c: _Line) -> None:
        assert self.graph is not None
        c.expect("return")
        outs = []
        while c.peek() is not None:
            v = self.parse_operand(c)
            if not isinstance(v, Value):
                raise c.error("return takes values")
            outs.append(v)
            if not c.accept(","):
                break
        c.done()
        self.graph.outputs = outs


def parse_graph(text: str, params: Mapping[str, torch.Tensor] | None = None) -> Graph:
    """Parse IR text; ``params`` supplies tensors for the declared parameters (by name)."""
    return Parser(params).parse(text)
