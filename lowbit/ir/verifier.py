"""The verifier: structural checks, then shape/dtype checks by running the graph on meta tensors.

Structure: SSA (each value defined once), every use defined earlier (topological order), outputs defined,
parameters present with tensors that match their declared types, ops resolvable.
Types: every node runs on ``meta`` tensors with each symbolic dimension bound to its capture-time hint,
and the declared output types (symbols substituted) must equal what the op produces. An op that cannot run
on meta is reported as unchecked, not silently passed.
"""

from __future__ import annotations

import functools
import inspect
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from lowbit.errors import LowbitError
from lowbit.ir.graph import Graph, Node, SymType, TensorType, Value, map_operands, operand_leaves
from lowbit.ir.ops import resolve
from lowbit.ir.symexpr import DimParseError, eval_dim, parse_sym_value


_META_UNSUPPORTED = re.compile(r"meta|data.dependent|item\(\)|nonzero", re.IGNORECASE)


WRITES_OPERAND = frozenset({"out"})
"""Keywords that make an op write into an operand instead of a new value: IR is SSA, so no node may take one (a
file's ``out=@weight`` would overwrite a parameter when the graph runs)."""


def device_problem(device: torch.device) -> str | None:
    """Why a device operand cannot appear in IR (None when it can): graphs run on the CPU or a CUDA GPU, and a
    ``device("meta")`` tensor made by one node failed in the next with torch's bare 'Tensor on device meta'."""
    if device.type in ("cpu", "cuda"):
        return None
    return f"device {str(device)!r}: a device operand of lowbit IR is 'cpu' or 'cuda[:N]'"


class VerificationError(LowbitError, ValueError):
    """The IR is malformed; the message names each offending node, op and module."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        head = f"{len(problems)} problem(s) in the IR:\n  - "
        super().__init__(head + "\n  - ".join(problems[:20]) + ("\n  ..." if len(problems) > 20 else ""))


@dataclass
class VerifyReport:
    nodes: int
    type_checked: int
    unchecked: list[str] = field(default_factory=list)


def _where(node: Node) -> str:
    return f"%{node.name} = {node.op}(...)" + (f" in {node.module}" if node.module else "")


def check_structure(graph: Graph, *, require_data: bool = True) -> list[str]:
    problems: list[str] = []
    defined: set[int] = set()
    names: dict[str, str] = {}

    def define(v: Value, what: str) -> None:
        if id(v) in defined:
            problems.append(f"{what} %{v.name} is defined twice")
        if v.name in names:
            problems.append(f"value name %{v.name} is used by both {names[v.name]} and {what}")
        defined.add(id(v))
        names[v.name] = what

    for v in graph.inputs:
        define(v, "input")
    for name, v in graph.params.items():
        if v.name != name or not v.is_param:
            problems.append(f"parameter table entry {name!r} holds a non-parameter value %{v.name}")
        defined.add(id(v))
        if v.data is None:
            if require_data:
                problems.append(f"parameter @{name} has no tensor")
        elif not isinstance(v.type, TensorType) or v.type.dtype != v.data.dtype or \
                tuple(v.type.shape) != tuple(v.data.shape):
            problems.append(f"parameter @{name} is declared {v.type} but holds {v.data.dtype} {tuple(v.data.shape)}")
    for node in graph.nodes:
        for v in node.inputs():
            if id(v) not in defined:
                where = "a parameter missing from the graph's table" if v.is_param else "not defined before use"
                problems.append(f"{_where(node)} reads {v!r}, which is {where}")
        for v in node.outputs:
            if v.producer is not node:
                problems.append(f"{_where(node)}: output %{v.name} does not point back to its node")
            define(v, f"node {node.op}")
        try:
            resolve(node.op)
        except KeyError:
            problems.append(f"{_where(node)}: unknown op {node.op!r}")
        for key in WRITES_OPERAND & set(node.kwargs):
            problems.append(f"{_where(node)}: keyword {key}= writes into an operand (IR is SSA)")
        for x in operand_leaves((node.args, node.kwargs), torch.device):
            if device_problem(x) is not None:
                problems.append(f"{_where(node)}: {device_problem(x)}")
    for v in graph.outputs:
        if id(v) not in defined:
            problems.append(f"graph output {v!r} is not defined")
    if not graph.outputs:
        problems.append("graph has no outputs")
    return problems


class _Dims:
    """Evaluates symbolic dims with each symbol bound to its hint (dims are parsed by ``symexpr``, never eval'd)."""

    def __init__(self, graph: Graph) -> None:
        self.env: dict[str, int] = {}
        for i, (name, s) in enumerate(graph.symbols.items()):
            self.env[name] = s.hint if s.hint is not None else (s.min or 2) + 3 + i
        self._cache: dict[str, int] = {}

    def __call__(self, d: int | str) -> int:
        if isinstance(d, int):
            return d
        if d not in self._cache:
            val = eval_dim(d, self.env)
            self._cache[d] = -1 if val is None else val
        return self._cache[d]

    def value(self, expr: str) -> int | float | bool | None:
        """A ``sym(...)`` value: a literal, or a dimension expression at the hints (None if unbound)."""
        val = parse_sym_value(expr)
        if isinstance(val, (int, float, bool)):
            return val
        got = self(expr)
        return None if got == -1 else got


META_RESULTS_MOST = 16384
"""How many op results on meta tensors ``_run_on_meta`` keeps (a few hundred bytes each): every distinct node of a
few dozen models. Past it the memo starts again empty."""
_META_RESULTS: dict[tuple, tuple[Any, tuple[bool, str] | None]] = {}
_PLAIN_OPERANDS = (int, float, bool, str, complex, type(None), torch.dtype, torch.device, torch.memory_format,
                   torch.layout)


def _plain_meta(t: torch.Tensor) -> bool:
    """A meta tensor its size, strides, offset and dtype describe whole (no grad, conj/neg bit or other layout)."""
    return t.is_meta and not t.requires_grad and not t.is_conj() and not t.is_neg() and t.layout == torch.strided


def _meta_key(tree: Any, seen: dict[int, int]) -> Any:
    """A hashable stand-in for a node's operands on meta tensors: a tensor by its size, strides, offset and dtype
    (all an op on meta can read; the same tensor twice is marked so), a literal by its type and value (``1`` and
    ``1.0`` give other dtypes). None for anything else: that call is not memoized."""
    kind = type(tree)
    if kind is torch.Tensor:
        if not _plain_meta(tree):
            return None
        first = seen.setdefault(id(tree), len(seen))
        return ("T", tuple(tree.shape), tree.stride(), tree.storage_offset(), tree.dtype, first)
    if isinstance(tree, (tuple, list)):  # captured graphs hold FX's immutable_list (expand's sizes)
        parts = tuple(_meta_key(x, seen) for x in tree)
        return None if None in parts else (kind, parts)
    if kind is dict:
        parts = tuple((k, _meta_key(x, seen)) for k, x in tree.items())
        return None if any(p is None for _, p in parts) else (dict, parts)
    if kind in _PLAIN_OPERANDS:
        return ("L", kind, tree)
    return None


def _meta_spec(out: Any) -> Any:
    """What ``_meta_key`` keeps of an op's result, to build an equal one again; None where that cannot be done."""
    kind = type(out)
    if kind is torch.Tensor:
        if not _plain_meta(out):
            return None
        return ("T", tuple(out.shape), out.stride(), out.storage_offset(), out.dtype)
    if kind in (tuple, list):
        parts = tuple(_meta_spec(x) for x in out)
        return None if None in parts else (kind, parts)
    if kind in (int, float, bool, type(None)):
        return ("L", out)
    return None


def _from_spec(spec: Any) -> Any:
    """A fresh result equal to the one ``spec`` describes: new meta tensors, never one another node holds."""
    if spec[0] == "T":
        _, size, stride, offset, dtype = spec
        extent = offset + 1 + sum((n - 1) * s for n, s in zip(size, stride)) if all(size) else offset
        return torch.empty(extent, dtype=dtype, device="meta").as_strided(size, stride, offset)
    if spec[0] == "L":
        return spec[1]
    return spec[0](_from_spec(x) for x in spec[1])


def _run_on_meta(fn: Any, args: Any, kwargs: Any) -> tuple[Any, tuple[bool, str] | None]:
    """``fn(*args, **kwargs)`` on meta tensors: (result, None), or (None, (cannot run on meta, message)).

    Memoized on the op and its operands' metadata: a result on meta tensors depends on nothing else, and a model
    repeats the same few dozen nodes in every block, and the pass manager verifies the whole graph after every
    pass (SmolLM2, 1035 nodes: ~0.5 s a verify, ~0.4 ms a node run on meta). The key holds the function itself,
    so a redefined op is run again, and the default dtype (``arange`` reads it)."""
    key = _meta_key((args, kwargs), {})
    if key is not None:
        key = (fn, torch.get_default_dtype(), key)
        hit = _META_RESULTS.get(key)
        if hit is not None:
            spec, failure = hit
            return (None if failure is not None else _from_spec(spec)), failure
    try:
        out, failure = fn(*args, **kwargs), None
    except Exception as exc:  # noqa: BLE001 - classified here, reported by the caller, never hidden
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        unchecked = isinstance(exc, NotImplementedError) or bool(_META_UNSUPPORTED.search(msg))
        out, failure = None, (unchecked, msg if unchecked else f"{type(exc).__name__}: {msg}")
    if key is not None:
        spec = _meta_spec(out) if failure is None else None
        if failure is not None or spec is not None:
            if len(_META_RESULTS) >= META_RESULTS_MOST:
                _META_RESULTS.clear()
            _META_RESULTS[key] = (spec, failure)
    return out, failure


def check_types(graph: Graph) -> tuple[list[str], VerifyReport]:
    problems: list[str] = []
    dims = _Dims(graph)
    env: dict[int, Any] = {}
    report = VerifyReport(len(graph.nodes), 0)

    def meta_of(v: Value) -> Any:
        t = v.type
        if isinstance(t, TensorType):
            shape = [dims(d) for d in t.shape]
            if any(d < 0 for d in shape):
                problems.append(f"%{v.name} is declared {t}: a dimension is negative or uses an undeclared symbol")
                return None
            try:
                return torch.empty(shape, dtype=t.dtype, device="meta")
            except (RuntimeError, TypeError, OverflowError):  # torch's 'Overflow when unpacking long long'
                problems.append(f"%{v.name} is declared {t} (= {shape} at the symbol hints): no tensor has that "
                                "many elements (the sizes overflow 64 bits)")
                return None
        if isinstance(t, SymType) and t.expr is not None:
            try:
                return dims.value(t.expr)
            except DimParseError:
                return None
        return None

    for v in graph.inputs:
        env[id(v)] = meta_of(v)
    for v in graph.params.values():
        env[id(v)] = meta_of(v)

    for node in graph.nodes:
        args, kwargs = map_operands(
            lambda x: env.get(id(x)) if isinstance(x, Value) else
            (torch.device("meta") if isinstance(x, torch.device) else x),
            (node.args, node.kwargs),
        )
        out, failure = _run_on_meta(resolve(node.op), args, kwargs)
        if failure is not None:
            unchecked, msg = failure
            if unchecked:
                report.unchecked.append(f"{_where(node)}: cannot run on meta tensors ({msg})")
            else:
                problems.append(f"{_where(node)}: the op rejects its operands: {msg}")
            for v in node.outputs:
                env[id(v)] = meta_of(v)
            continue
        outs = list(out) if isinstance(out, (tuple, list)) and len(node.outputs) > 1 else [out]
        if len(outs) != len(node.outputs):
            problems.append(f"{_where(node)} declares {len(node.outputs)} outputs but the op returns {len(outs)}")
            continue
        report.type_checked += 1
        for v, got in zip(node.outputs, outs):
            env[id(v)] = got
            problems.extend(_compare(node, v, got, dims))
    return problems, report


def _compare(node: Node, v: Value, got: Any, dims: _Dims) -> list[str]:
    t = v.type
    if isinstance(t, TensorType):
        if not isinstance(got, torch.Tensor):
            return [f"{_where(node)}: %{v.name} is declared {t} but the op returns {type(got).__name__}"]
        want = [dims(d) for d in t.shape]
        if got.dtype != t.dtype or list(got.shape) != want:
            from lowbit.ir.graph import DTYPE_NAMES

            def fmt(dtype: torch.dtype, shape: list[int]) -> str:
                return f"{DTYPE_NAMES.get(dtype, dtype)}[{','.join(map(str, shape))}]"

            return [f"{_where(node)}: %{v.name} is declared {t} (= {fmt(t.dtype, want)} at the symbol hints) "
                    f"but the op produces {fmt(got.dtype, list(got.shape))}"]
    elif isinstance(t, SymType) and t.expr is not None and isinstance(got, (int, float)) and not isinstance(got, bool):
        try:
            want_s = dims.value(t.expr)
        except DimParseError:
            return []
        if want_s is not None and not math.isclose(float(got), float(want_s)):
            return [f"{_where(node)}: %{v.name} is declared {t} (= {want_s}) but the op produces {got}"]
    return []


@functools.cache
def _signature(fn: Any) -> inspect.Signature:
    """``inspect.signature(fn)``, read once per op: building it took ~60% of ``check_qparams``, which every verify
    runs on every semantic node (~40% of a verify of a quantized graph once the type checks were memoized)."""
    return inspect.signature(fn)


def _operand_names(node: Node) -> dict[str, Any]:
    """A semantic op's operands by parameter name (empty for ATen ops, or operands its signature does not take)."""
    from lowbit.ir.ops import OPS

    if node.op not in OPS:
        return {}
    try:
        return dict(_signature(OPS[node.op].fn).bind(*node.args, **node.kwargs).arguments)
    except TypeError:  # the operands do not fit: the verifier's type check names the node
        return {}


def check_stored(graph: Graph, tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """What a graph read from files must meet beyond ``verify``: every tensor of the weights file is a parameter
    the IR declares (an extra one means weights for another IR, or a renamed parameter whose tensor is then
    missing), and the quantization parameters are finite (``check_qparams``). Problems name the tensor and the node."""
    return [f"tensor {name!r} is not a parameter the IR declares (no node reads it)"
            for name in sorted(set(tensors) - set(graph.params))] + check_qparams(graph)


def check_qparams(graph: Graph) -> list[str]:
    """Every quantization scale or zero point a node reads from a parameter is finite: a NaN scale made every
    output NaN, and one a pass computed (a diverged tuning step, a NaN weight) surfaced only when the saved
    model was loaded again. Problems name the parameter and the node."""
    problems = []
    seen: set[str] = set()
    for node in graph.nodes:
        for key, v in _operand_names(node).items():
            if not (key.endswith("scale") or "zero" in key) or not isinstance(v, Value) or not v.is_param:
                continue
            data = v.data
            if v.name in seen or data is None or not data.is_floating_point() or data.is_meta \
                    or bool(torch.isfinite(data).all()):
                continue
            seen.add(v.name)
            bad = data[~torch.isfinite(data)]
            what = "NaN" if bool(torch.isnan(bad).any()) else "inf"
            problems.append(f"parameter @{v.name} ({key} of {_where(node)}) holds {bad.numel()} {what} value(s)")
    return problems


FIXED_SIZE_FACTOR = 32
"""A value of a graph read from files whose shape has no symbol (its size is the same whatever the inputs) may take
at most this many times the bytes of the graph's parameters (or ``FIXED_SIZE_FLOOR``): int2 codes dequantized to
float32 are 16x their bytes, and every fixed-size value a capture or a pass writes is a weight, a view or a product
of weights, or a small table (rotary, masks). Past it, a file made the torch backend fold
``aten.zeros([100000, 100000, 100])`` at load (4 TB: a raw allocator error, or the OOM killer)."""
FIXED_SIZE_FLOOR = 1 << 30


def check_fixed_sizes(graph: Graph) -> list[str]:
    """Values whose size does not depend on the inputs (static shape) and is past ``FIXED_SIZE_FACTOR`` times the
    parameters' bytes: a graph read from a file allocates those at load (constant folding) or on every call,
    so a declared ``f32[100000,100000,100]`` is refused before anything runs. Problems name the node and size."""
    limit = max(FIXED_SIZE_FLOOR, FIXED_SIZE_FACTOR * graph.param_bytes())
    problems = []
    for node in graph.nodes:
        for v in node.outputs:
            t = v.type
            if not isinstance(t, TensorType) or not t.is_static():
                continue
            nbytes = t.numel() * t.dtype.itemsize
            if nbytes > limit:
                problems.append(f"%{v.name} ({_where(node)}) is declared {t}, {nbytes / 2**30:.3g} GiB whatever "
                                f"the inputs: more than {FIXED_SIZE_FACTOR}x the parameters' bytes (or 1 GiB), "
                                f"the most any stored graph needs ({limit / 2**30:.3g} GiB here)")
    return problems


def listed(problems: list[str], most: int = 5) -> str:
    """The first ``most`` problems joined for one message line, with how many there are in all past that."""
    return "; ".join(problems[:most]) + (f"; ... ({len(problems)} in all)" if len(problems) > most else "")


def verify(graph: Graph, *, types: bool = True, require_data: bool = True) -> VerifyReport:
    """Raise ``VerificationError`` listing every problem; return what was (and was not) type-checked."""
    problems = check_structure(graph, require_data=require_data)
    if problems:
        raise VerificationError(problems)
    problems = check_qparams(graph)
    if problems:
        raise VerificationError(problems)
    report = VerifyReport(len(graph.nodes), 0)
    if types:
        type_problems, report = check_types(graph)
        if type_problems:
            raise VerificationError(type_problems)
    return report
