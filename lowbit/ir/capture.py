"""Capture: ``torch.export`` a model and turn the exported ATen graph into lowbit's IR.

torch.export is the capture path (``torch.fx.symbolic_trace`` fails on HF models); an FX GraphModule or an
``ExportedProgram`` a user already has is accepted too. Export runs under ``torch.no_grad`` so grad-mode
wrappers (HF's rotary embedding) do not appear as higher-order ops. When export fails, the error names
the innermost module that was running and says what the user can do.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import operator
import re
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
import torch.fx
import torch.fx.config
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind, OutputKind
from torch.utils import _pytree as pytree

from lowbit.errors import LowbitError
from lowbit.ir.graph import Graph, Node, SymType, Symbol, TensorType, Value, ValueType
from lowbit.ir.rewrite import eliminate_dead_code
from lowbit.ir.symexpr import DimParseError, parse_dim

if TYPE_CHECKING:  # imported where used: ~0.35 CPU-s of `import lowbit` and `lowbit --help`
    import sympy


def _finite_int(bound: Any) -> int | None:
    """A range bound as an int, or None where it is unbounded (sympy ``oo`` or torch's ``int_oo``)."""
    try:
        return int(bound)
    except (OverflowError, TypeError, ValueError, AttributeError):
        return None


_ROTARY_SCRATCH = re.compile(r"(^|\.)rotary_emb\.(\w+_)?inv_freq$")
"""Buffers an HF rotary embedding writes in forward and reads back at once: longrope (Phi-3 128k, Phi-3.5) copies
``where(length > original_max, long_inv_freq, original_inv_freq)`` into ``inv_freq`` on every call
(``transformers.modeling_rope_utils.dynamic_rope_update``), so the write is scratch, not state carried between calls,
and the graph keeps the value it computed. Any other buffer a forward writes is refused."""


class CaptureError(LowbitError, RuntimeError):
    """The model could not be captured; the message says where and what to try."""


_HINTS = [
    (r"DynamicCache|past_key_values|Cache", "the model returns a KV cache object: call it with use_cache=False "
     "and return plain tensors (wrap an HF causal LM with lowbit.models.CausalLMLogits)"),
    (r"data.dependent|GuardOnDataDependentSymNode|Could not guard on data-dependent",
     "a Python branch depends on tensor values: make it static, or use torch.cond"),
    # before the next row: its advice (the model fixes the dim) is wrong here, where the example's own size did
    (r"0/1 specialized due to hint of (\d) for dimension (\S+?)\.?$",
     "the example input has size {0} in {1}, which you marked dynamic: torch.export specializes sizes 0 and 1, "
     "so give an example of size 2 or more there (e.g. two images or sentences)"),
    (r"Constraints violated|specialized|not in range",
     "a dimension you marked dynamic is fixed by the model's code: mark it static or widen its range"),
    (r"Unsupported|unsupported", "an operation torch.export does not support: see the message above"),
]


def _trunc(x: sympy.Expr) -> sympy.Expr | None:
    import sympy

    return sympy.floor(x) if x.is_nonnegative else sympy.ceiling(x) if x.is_nonpositive else None


@functools.cache
def _dim_forms() -> dict[str, Any]:
    """torch's sympy functions (``torch.utils._sympy.functions``) that a dimension may use, as the plain sympy the
    IR's dimension grammar prints: ``math.ceil(n / 3)`` in a model is ``CeilToInt(IntTrueDiv(s0, 3))`` to torch.export
    and ``ceiling(s0/3)`` in the IR. A form that is None for its arguments (a truncation of unknown sign) stays as it
    is and is refused by name."""
    import sympy

    return {
        "CeilToInt": sympy.ceiling,
        "FloorToInt": sympy.floor,
        "TruncToInt": _trunc,
        "IntTrueDiv": lambda a, b: a / b,
        "FloatTrueDiv": lambda a, b: a / b,
        "ToFloat": lambda x: x,
        "Identity": lambda x: x,
        "PythonMod": sympy.Mod,
        "CleanDiv": lambda a, b: sympy.floor(a / b),
        "ModularIndexing": lambda base, div, mod: sympy.Mod(sympy.floor(base / div), mod),
    }


def _plain_dim(expr: sympy.Expr) -> sympy.Expr:
    """``expr`` with torch's integer functions rewritten as ``_dim_forms`` says (innermost first)."""
    def rewrite(e: sympy.Expr) -> sympy.Expr:
        if not e.args:
            return e
        args = [rewrite(a) for a in e.args]
        form = _dim_forms().get(type(e).__name__)
        out = form(*args) if form is not None else None
        return out if out is not None else (e.func(*args) if args != list(e.args) else e)
    return rewrite(expr)


def _advice(message: str, dynamic_advice: str | None = None) -> str:
    """What to try for torch.export's ``message``; ``dynamic_advice``: a wrapper's own (``capture_dynamic_advice``)
    for a dim it marks dynamic itself, where "a dimension you marked dynamic" told the caller of a dim they never
    marked."""
    if dynamic_advice and re.search(r"Constraints violated", message):
        return dynamic_advice
    for pattern, advice in _HINTS:
        m = re.search(pattern, message, re.MULTILINE)
        if m:
            return advice.format(*m.groups()) if m.groups() else advice
    return "see torch.export's message above; capture a smaller submodule to narrow it down"


def _violated_guards(message: str, keep: int = 3) -> str:
    """The guards a "Constraints violated" error lists and the dims torch suggests, as indented lines. The capture
    error kept only the message's first line, which says to rerun with TORCH_LOGS="+dynamic" for what the guard
    was, though the message itself named it."""
    lines = [line.strip() for line in message.splitlines()]
    start = lines.index("Suggested fixes:") + 1 if "Suggested fixes:" in lines else len(lines)
    # each violated constraint is a "- " line ("Not all values of ...", "The values of ...", "You marked s as
    # dynamic but your code specialized it to be a constant (2)")
    guards = [line for line in lines[:start] if line.startswith("- ")]
    if not guards:
        return ""
    more = [f"(and {len(guards) - keep} more)"] if len(guards) > keep else []
    fixes = list(itertools.takewhile(bool, lines[start:]))
    suggested = ["torch suggests: " + "; ".join(fixes)] if fixes else []
    return "".join("\n  " + line for line in guards[:keep] + more + suggested)


def _export(model: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
            dynamic_shapes: Any, strict: bool) -> ExportedProgram:
    """Run torch.export while tracking which module is executing, to name it if export fails."""
    stack: list[str] = []
    finished: list[bool] = []  # the root's forward returned: a failure after it is export's own checks
    names = {id(m): n for n, m in model.named_modules()}
    hooks = []

    def pre(mod: torch.nn.Module, *_: Any) -> None:
        stack.append(names.get(id(mod), type(mod).__name__))

    def post(mod: torch.nn.Module, *_: Any) -> None:
        if stack:
            stack.pop()
        if mod is model:
            finished.append(True)

    for m in model.modules():
        hooks.append(m.register_forward_pre_hook(pre))
        hooks.append(m.register_forward_hook(post))
    # attributes a forward caches on its module the first time (longrope's long_inv_freq) are made while tracing:
    # left in place they hold what the trace computed, and the caller's model then returned other logits
    before = {id(m): set(vars(m)) for m in model.modules()}
    # the IR keeps no FX stack trace (a node's module path is its nn_module_stack): extracting and symbolizing one
    # for every traced op was ~8% of an export (torch's own switch; the graph is the same)
    emitted = getattr(torch.fx.config, "do_not_emit_stack_traces", None)  # torch >= 2.12 has the switch
    if emitted is not None:
        torch.fx.config.do_not_emit_stack_traces = True
    try:
        with torch.no_grad():
            return torch.export.export(model, args, kwargs, dynamic_shapes=dynamic_shapes, strict=strict)
    except Exception as exc:  # noqa: BLE001 - re-raised with context
        where = stack[-1] if stack else "(top level)"
        mod = dict(model.named_modules()).get(where)
        cls = type(mod).__name__ if mod is not None else type(model).__name__
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        # a dynamic-shape constraint fails after the forward ran to its end: no module is to blame
        inside = ("after the whole forward was traced (export's checks of the traced graph, not a module)"
                  if finished and not stack else f"inside module '{where or '(root)'}' ({cls})")
        raise CaptureError(
            f"torch.export could not capture {type(model).__name__}: it failed {inside}: "
            f"{type(exc).__name__}: {first}{_violated_guards(str(exc))}\n"
            f"What you can do: {_advice(str(exc), getattr(model, 'capture_dynamic_advice', None))}."
        ) from exc
    finally:
        if emitted is not None:
            torch.fx.config.do_not_emit_stack_traces = emitted
        for m in model.modules():
            for name in set(vars(m)) - before.get(id(m), set(vars(m))):
                delattr(m, name)
        for h in hooks:
            h.remove()


class _Converter:
    """ExportedProgram -> Graph, one FX node at a time."""

    def __init__(self, ep: ExportedProgram, prefix: str, example: list[torch.Tensor | Any]) -> None:
        self.ep = ep
        self.prefix = prefix
        self.example = example
        self.graph = Graph("main")
        self.env: dict[torch.fx.Node, Any] = {}
        self.sym_names: dict[sympy.Symbol, sympy.Symbol] = {}

    def strip(self, name: str) -> str:
        return name[len(self.prefix):] if self.prefix and name.startswith(self.prefix) else name

    # ---- symbols and types ----------------------------------------------------------------------
    def _collect_symbols(self) -> None:
        import sympy

        user_phs = [n for n, spec in zip(self._placeholders(), self.ep.graph_signature.input_specs)
                    if spec.kind == InputKind.USER_INPUT]
        order: list[sympy.Symbol] = []
        hints: dict[sympy.Symbol, int] = {}
        for ph, ex in zip(user_phs, self.example):
            val = ph.meta.get("val")
            if not isinstance(val, torch.Tensor):
                continue
            for i, d in enumerate(val.shape):
                if isinstance(d, torch.SymInt):
                    expr = d.node.expr
                    for s in sorted(expr.free_symbols, key=str):
                        if s not in order:
                            order.append(s)
                    if isinstance(expr, sympy.Symbol) and isinstance(ex, torch.Tensor):
                        hints[expr] = int(ex.shape[i])
        for s in self.ep.range_constraints:
            for fs in sorted(getattr(s, "free_symbols", {s}), key=str):
                if fs not in order:
                    order.append(fs)
        for i, s in enumerate(order):
            new = sympy.Symbol(f"s{i}", integer=True, positive=True)
            self.sym_names[s] = new
            rng = self.ep.range_constraints.get(s)
            lo = _finite_int(rng.lower) if rng is not None else None
            hi = _finite_int(rng.upper) if rng is not None else None
            self.graph.symbols[str(new)] = Symbol(str(new), lo, hi, hints.get(s))

    def dim(self, d: Any) -> int | str:
        if isinstance(d, torch.SymInt):
            expr = d.node.expr
            if expr.is_number:
                return int(expr)
            text = str(_plain_dim(expr.xreplace(self.sym_names))).replace(" ", "")
            try:
                parse_dim(text)
            except DimParseError as exc:  # a torch function the IR's grammar has no form for
                raise CaptureError(f"torch.export expressed a dimension as {text!r}, which lowbit's IR cannot "
                                   f"write ({str(exc).splitlines()[0]}): mark that dimension static") from None
            return text
        return int(d)

    def vtype(self, val: Any) -> ValueType:
        if isinstance(val, torch.Tensor):
            return TensorType(val.dtype, tuple(self.dim(d) for d in val.shape))
        if isinstance(val, torch.SymInt):
            return SymType(str(self.dim(val)))
        if isinstance(val, (int, float, bool)):
            return SymType(str(val))
        return None

    def _placeholders(self) -> list[torch.fx.Node]:
        return [n for n in self.ep.graph.nodes if n.op == "placeholder"]

    # ---- conversion -----------------------------------------------------------------------------
    def module_path(self, fx_node: torch.fx.Node) -> str:
        stack = fx_node.meta.get("nn_module_stack") or {}
        if not stack:
            return ""
        path = list(stack.values())[-1][0]
        if path.startswith("_empty") or path.startswith("L['"):
            return ""
        return self.strip(path)

    def convert(self) -> Graph:
        g = self.graph
        self._collect_symbols()
        sig = self.ep.graph_signature
        for ph, spec in zip(self._placeholders(), sig.input_specs):
            if spec.kind == InputKind.USER_INPUT:
                self.env[ph] = g.add_input(g.fresh_name(ph.name), self.vtype(ph.meta.get("val")))
                continue
            target = spec.target
            if spec.kind == InputKind.PARAMETER or (spec.kind == InputKind.BUFFER and spec.persistent):
                data = self.ep.state_dict[target]
            elif target in self.ep.constants:
                data = self.ep.constants[target]
            else:
                data = self.ep.state_dict[target]
            if not isinstance(data, torch.Tensor):
                raise CaptureError(f"input {target!r} of kind {spec.kind.name} is not a tensor ({type(data).__name__})")
            name = self.strip(target)
            self.env[ph] = g.params[name] if name in g.params else g.add_param(name, data)
        user_outputs = []
        for spec in sig.output_specs:
            if spec.kind == OutputKind.BUFFER_MUTATION and _ROTARY_SCRATCH.search(self.strip(str(spec.target))):
                user_outputs.append(False)  # rewritten from the positions before each read: nothing carries over
                continue
            if spec.kind not in (OutputKind.USER_OUTPUT,):
                raise CaptureError(f"the model mutates state during forward ({spec.kind.name} of {spec.target!r}); "
                                   "lowbit captures pure inference graphs: disable caches and in-place buffer updates")
            user_outputs.append(True)
        for fx_node in self.ep.graph.nodes:
            if fx_node.op == "call_function":
                self._call(fx_node)
            elif fx_node.op == "output":
                outs = pytree.tree_leaves(fx_node.args[0])
                g.outputs = [self.env[o] for o, keep in zip(outs, user_outputs)
                             if keep and isinstance(o, torch.fx.Node)]
            elif fx_node.op == "get_attr":
                raise CaptureError(f"unexpected get_attr {fx_node.target!r} at {self.module_path(fx_node)!r}: "
                                   "a higher-order op (cond/map/while) is not supported by lowbit's capture yet")
        return g

    def _op_name(self, fx_node: torch.fx.Node) -> str:
        target = fx_node.target
        if isinstance(target, torch._ops.OpOverload):
            return str(target)
        if isinstance(target, torch._ops.HigherOrderOperator):
            raise CaptureError(
                f"higher-order op {target.name()} in module {self.module_path(fx_node)!r} is not supported: "
                "capture under torch.no_grad() and without torch.cond/map, or split the model there")
        module = getattr(target, "__module__", None) or ""
        module = {"_operator": "operator"}.get(module, module)
        name = getattr(target, "__name__", str(target))
        if module in {"operator", "math", "torch"}:
            return f"{module}.{name}"
        raise CaptureError(f"node {fx_node.name} calls {module}.{name}, which lowbit cannot run: "
                           f"module {self.module_path(fx_node)!r}")

    def _call(self, fx_node: torch.fx.Node) -> None:
        g = self.graph
        if fx_node.target is operator.getitem and isinstance(fx_node.args[0], torch.fx.Node):
            src = self.env[fx_node.args[0]]
            if isinstance(src, list):
                self.env[fx_node] = src[fx_node.args[1]]
                return
        op = self._op_name(fx_node)

        def arg(x: Any) -> Any:
            if isinstance(x, torch.fx.Node):
                v = self.env[x]
                if isinstance(v, list):
                    raise CaptureError(f"node {fx_node.name} reads a multi-output value whole")
                return v
            if isinstance(x, tuple):
                return list(x)
            return x

        args, kwargs = pytree.tree_map(arg, (tuple(fx_node.args), dict(fx_node.kwargs)))
        val = fx_node.meta.get("val")
        node = Node(op, tuple(args), kwargs, module=self.module_path(fx_node))
        try:
            types = [self.vtype(item) for item in val] if isinstance(val, (list, tuple)) else self.vtype(val)
        except CaptureError as exc:
            where = node.module or "(top level)"
            raise CaptureError(f"node {fx_node.name} ({op}) in module {where!r}: {exc}") from None
        if isinstance(types, list):
            for i, vt in enumerate(types):
                node.add_output(Value(g.fresh_name(f"{fx_node.name}_{i}"), vt))
                g._names.add(node.outputs[-1].name)
            self.env[fx_node] = list(node.outputs)
        else:
            node.add_output(Value(g.fresh_name(fx_node.name), types))
            g._names.add(node.outputs[-1].name)
            self.env[fx_node] = node.outputs[0]
        g.append(node)


class _GuardArg:
    """An input as a guard reads it (``L['x'].size()[1]``), at chosen sizes."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.shape = shape

    def size(self, dim: int | None = None) -> Any:
        return self.shape if dim is None else self.shape[dim]


def _narrowing_guards(ep: ExportedProgram) -> list[str]:
    """Equality guards torch.export assumed that do not hold over the dimensions' declared ranges.

    ``Dim.DYNAMIC`` lets export specialise silently: ``int(n / 2)`` in the model becomes the constant of the example
    and a guard ``math.trunc(n / 2) == 3`` that only the ExportedProgram's own module checks; the IR keeps the ranges,
    not the guards, so at other lengths it computed a wrong result without an error. Each guard is evaluated (it is
    torch's text for the model in this process, not a file's) at a few sizes per symbol: the range's ends, the hint
    and its neighbours; one that is False at any of them is returned. A guard it cannot evaluate is left out."""
    import math

    import sympy

    # equalities only: they pin a size to the example's; '!= 1' / '>= 3' are export's 0/1 and range assumptions,
    # which the symbols' ranges and the ops' own checks cover
    guards = [g for g in getattr(ep, "_guards_code", None) or [] if isinstance(g, str) and " == " in g]
    if not guards:
        return []
    user = [ph for ph, spec in zip((n for n in ep.graph.nodes if n.op == "placeholder"), ep.graph_signature.input_specs)
            if spec.kind == InputKind.USER_INPUT and isinstance(ph.meta.get("val"), torch.Tensor)]
    hints: dict[sympy.Symbol, int] = {}
    for ph in user:
        for d in ph.meta["val"].shape:
            if isinstance(d, torch.SymInt) and isinstance(d.node.expr, sympy.Symbol) and d.node.hint is not None:
                hints[d.node.expr] = int(d.node.hint)
    if not hints:
        return []

    def samples(sym: sympy.Symbol) -> set[int]:
        rng = ep.range_constraints.get(sym)
        lo = _finite_int(rng.lower) if rng is not None else None
        hi = _finite_int(rng.upper) if rng is not None else None
        lo = 0 if lo is None else lo
        hint = hints[sym]
        values = {lo, lo + 1, hint - 1, hint + 1, 2 * hint + 1} | ({hi} if hi is not None else set())
        return {v for v in values if v >= lo and (hi is None or v <= hi)}

    bad = []
    for guard in guards:
        for sym in hints:
            for value in samples(sym):
                at = {**hints, sym: value}
                env = {ph.name: _GuardArg(tuple(int(d.node.expr.xreplace(at)) if isinstance(d, torch.SymInt) else int(d)
                                                for d in ph.meta["val"].shape)) for ph in user}
                try:
                    ok = bool(eval(guard, {"__builtins__": {}, "math": math, "L": env}))  # noqa: S307 - torch's text
                except Exception:  # noqa: BLE001 - a guard on something else (strides, globals): not ours to judge
                    ok = True
                if not ok:
                    bad.append(guard)
                    break
            if bad and bad[-1] == guard:
                break
    return bad


def _mutates(ep: ExportedProgram) -> bool:
    """Whether the exported graph holds an in-place ATen op (``aten.add_``): torch.export keeps them, and the IR
    runs pure functions only."""
    return any(n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload) and n.target._schema.is_mutable
               for n in ep.graph.nodes)


FUNCTIONALIZE_IN_PLACE = True
"""Functionalize an exported graph's in-place ops on fresh tensors node by node (``_functionalize_in_place``); False:
always by ``run_decompositions({})`` (its retrace was two thirds of a tiny Mixtral's capture: 6.5 of 10 s)."""


KEPT_COMPOSITES = frozenset({
    "aten.linear.default", "aten.matmul.default", "aten.layer_norm.default",
    "aten.scaled_dot_product_attention.default", "aten.softmax.int", "aten.where.ScalarOther", "aten.sym_size.int",
    "aten.reshape.default", "aten.to.dtype", "aten.to.device", "aten.to.dtype_layout", "aten.dropout.default",
    "aten.numpy_T.default", "aten.__and__.Tensor"})
"""Composite ATen ops a graph functionalized node by node may keep: each is in graphs export gives without
functionalizing (Llama's), and raises to the IR the retrace's decomposition gives (the casts as ``aten.to.*``, not
``aten._to_copy``: the readers of a cast take both). Checked on the tiny MoE families and Falcon (same ops after
raising, the same logits bit for bit)."""


def _fresh_tensor(node: torch.fx.Node) -> bool:
    """Whether ``node`` computes a tensor of its own (not an input, a view or another op's alias): an in-place op
    on it then changes no other value of the graph."""
    if node.op != "call_function" or not isinstance(node.meta.get("val"), torch.Tensor):
        return False
    if node.target is operator.getitem:  # one output of a multi-output op (topk's values)
        source = node.args[0]
        return (isinstance(source, torch.fx.Node) and isinstance(source.target, torch._ops.OpOverload)
                and not _aliases(source.target))
    return isinstance(node.target, torch._ops.OpOverload) and not _aliases(node.target)


def _aliases(op: torch._ops.OpOverload) -> bool:
    """Whether ``op`` writes an argument or returns a view of one."""
    schema = op._schema
    return schema.is_mutable or any(r.alias_info is not None for r in schema.returns)


def _functional_variant(node: torch.fx.Node) -> torch._ops.OpOverload | None:
    """The out-of-place ``aten.div.Tensor`` of an in-place ``aten.div_.Tensor`` node, where the two compute the
    same tensor: only its first argument written, a fresh tensor that no view reads, every tensor argument of its
    dtype and broadcasting to its shape (``a += b`` keeps ``a``'s dtype and shape, ``a + b`` may promote or
    broadcast). None otherwise."""
    op = node.target
    if not isinstance(op, torch._ops.OpOverload) or op.namespace != "aten":
        return None
    schema = op._schema
    name = schema.name.split("::")[-1]
    written = [a for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write]
    if not name.endswith("_") or name.endswith("__") or len(written) != 1 or written[0] is not schema.arguments[0]:
        return None
    packet = getattr(torch.ops.aten, name[:-1], None)
    functional = getattr(packet, op._overloadname, None) if packet is not None else None
    if functional is None or _aliases(functional):
        return None
    target = node.args[0]
    if not isinstance(target, torch.fx.Node) or not _fresh_tensor(target):
        return None
    if any(u is not node and (not isinstance(u.target, torch._ops.OpOverload) or _aliases(u.target))
           for u in target.users):
        return None
    val = target.meta["val"]
    for a in (*node.args[1:], *node.kwargs.values()):
        other = a.meta.get("val") if isinstance(a, torch.fx.Node) else a
        if isinstance(other, torch.Tensor):
            if other.dtype != val.dtype or torch.broadcast_shapes(other.shape, val.shape) != val.shape:
                return None
        elif isinstance(a, torch.fx.Node) or not (isinstance(a, (int, float, bool)) and val.is_floating_point()):
            return None
    return functional


def _functionalize_in_place(ep: ExportedProgram) -> bool:
    """Replace each in-place ATen op by its out-of-place form, the later readers of the tensor it wrote reading the
    new value: what ``run_decompositions({})`` does for a Mixtral router's ``/=`` or Falcon's ``a += b``, without
    tracing the whole program again (two thirds of a Mixtral capture's time). False where the caller must still
    retrace: an in-place op writes anything but a fresh tensor of its own dtype and shape (an input, a buffer, a
    view's base), or the graph holds a composite op outside ``KEPT_COMPOSITES``, which the retrace would decompose
    (a non-multi-query Falcon's ``aten.flatten``: prune-heads' walk reads its ``view``). The ops replaced before
    stay replaced: the retrace computes the same from them."""
    graph = ep.graph
    order = {n: i for i, n in enumerate(graph.nodes)}
    replaced_all = True
    for node in [n for n in graph.nodes if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload)
                 and n.target._schema.is_mutable]:
        functional = _functional_variant(node)  # (after the ops before it: ``y /= s; y += x`` writes div_'s output)
        if functional is None:
            replaced_all = False
            break
        written = node.args[0]
        with graph.inserting_before(node):
            pure = graph.call_function(functional, node.args, node.kwargs)
        pure.meta = dict(node.meta)
        order[pure] = order[node]
        for reader in [u for u in written.users if u not in (node, pure) and order[u] > order[node]]:
            reader.replace_input_with(written, pure)
        node.replace_all_uses_with(pure)
        graph.erase_node(node)
    graph.lint()
    ep.graph_module.recompile()
    return replaced_all and all(
        str(n.target) in KEPT_COMPOSITES or not torch._C._dispatch_has_kernel_for_dispatch_key(
            n.target.name(), "CompositeImplicitAutograd")
        for n in graph.nodes if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload))


def _wrapper_prefix(model: torch.nn.Module) -> str:
    """A wrapper holding one HF model (``CausalLMLogits.model``) is transparent in module paths."""
    children = list(model.named_children())
    if len(children) == 1 and type(children[0][1]).__module__.startswith("transformers."):
        return children[0][0] + "."
    return ""


def from_exported(ep: ExportedProgram, *, prefix: str = "", example_inputs: list[Any] | None = None,
                  raise_ops: bool = True) -> Graph:
    """Convert an ExportedProgram; ``prefix`` is stripped from module paths and parameter names."""
    graph = _Converter(ep, prefix, example_inputs or []).convert()
    if raise_ops:
        from lowbit.ir.raising import raise_graph

        graph.meta["raise_stats"] = raise_graph(graph)
    eliminate_dead_code(graph)
    return graph


UNRUNNABLE_CAUSES: dict[str, str] = {
    op: ("a resize of the position embeddings, which a vision transformer computes when called with "
         "interpolate_pos_encoding=True (ViT, DeiT: images of another size than config.image_size); the model "
         "itself is supported: capture it at config.image_size without interpolate_pos_encoding (resize the images "
         "to image_size)")
    for op in ("aten.upsample_bicubic2d.vec", "aten.upsample_bicubic2d.default")
}
"""What puts an op outside the allowlist into a graph of a supported family, by op: the option that causes it and
how to capture without it (ViT with interpolate_pos_encoding=True was refused as 'this architecture is not
supported')."""


def refuse_unrunnable(graph: Graph, model: object = None) -> None:
    """Refuse a captured graph holding ops lowbit cannot run (ATen overloads outside its allowlist, e.g.
    ``aten.flip``), naming the model class, each op and where it sits. Without this the
    first pass reported 'the input IR is invalid before any pass ran', which reads as a lowbit bug. Not part of
    ``capture`` itself: ``tools/aten_allowlist.py`` captures such graphs to list what is missing."""
    from lowbit.ir.ops import check_op

    found: dict[str, list[str]] = {}
    for node in graph.nodes:
        if check_op(node.op) is not None:
            found.setdefault(node.op, []).append(node.module or f"%{node.name}")
    if found:
        ops = "; ".join(f"{op} x{len(mods)} ({', '.join(list(dict.fromkeys(mods))[:2])}"
                        f"{', ...' if len(set(mods)) > 2 else ''})" for op, mods in found.items())
        inner = getattr(model, "model", model)  # the HF model inside lowbit's wrappers names the architecture
        name = type(inner).__name__ if inner is not None else graph.meta.get("model_class", "the model")
        causes = [f"{op} is {UNRUNNABLE_CAUSES[op]}" for op in found if op in UNRUNNABLE_CAUSES]
        if len(causes) == len(found):
            raise CaptureError(f"{name}: capture produced ops lowbit cannot run: {ops}; " + "; ".join(causes))
        raise CaptureError(f"{name}: capture produced ops lowbit cannot run: "
                           f"{ops}; this architecture is not supported (lowbit.ir.allowlist lists the ATen ops it "
                           "runs; README 'Any architecture' the families checked)" +
                           "".join(f"; {c}" for c in causes))


def _name_outputs(graph: Graph, names: Any) -> None:
    """The graph's outputs renamed to ``names`` in order (a computed value only: an input or a parameter passed
    through keeps its own name)."""
    for value, name in zip(graph.outputs, names or ()):
        if value.producer is not None and value.name != name:
            graph.rename(value, name)


def _output_fields(ep: ExportedProgram) -> list[str] | None:
    """The field names of what the model returns, when it returns one tensor per field (a transformers
    ``ModelOutput``, a dict): a BertModel's or ViTModel's ONNX export named its outputs after the last nodes
    (``layer_norm_4``, ``tanh``), where a runtime looks for ``last_hidden_state`` and ``pooler_output``."""
    spec = ep.call_spec.out_spec
    fields = getattr(spec, "context", None)
    if not isinstance(fields, list) or not all(isinstance(f, str) for f in fields):
        return None
    return fields if spec.num_leaves == len(fields) else None  # a nested field (a tuple of tensors) is left as is


def _in_signature_order(model: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` in the order ``model.forward`` declares them (names it does not declare, which go to its
    ``**kwargs``, after them as given). torch.export makes the graph's inputs in the dict's order, and a compiled
    model takes positional arguments in the graph's: captured from a tokenizer's output (``input_ids,
    token_type_ids, attention_mask``), BertModel's own positional call ``(ids, mask, token_type_ids)`` fed the mask
    to the token types without an error (both are 0/1 int64) and returned other embeddings."""
    import inspect

    if isinstance(model, ExportedProgram) or not isinstance(model, torch.nn.Module):
        return kwargs
    try:
        params = list(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):  # a forward without a readable signature: keep the caller's order
        return kwargs
    ordered = {k: kwargs[k] for k in params if k in kwargs}
    ordered.update((k, v) for k, v in kwargs.items() if k not in ordered)
    return ordered


def capture(
    model: torch.nn.Module | torch.fx.GraphModule | ExportedProgram,
    example_inputs: tuple[Any, ...] | Mapping[str, Any] | torch.Tensor,
    dynamic_shapes: Any = None,
    *,
    strict: bool = False,
    raise_ops: bool = True,
) -> Graph:
    """Capture ``model`` called on ``example_inputs`` (a tuple of positional args, a dict of kwargs, or one tensor).
    The graph takes a dict's inputs in the order ``model.forward`` declares them, whatever the dict's order.

    ``dynamic_shapes`` follows torch.export (e.g. ``{"input_ids": {1: Dim("seq", min=2, max=8192)}}``).
    Wrappers may set ``capture_prefix`` (e.g. ``"model."``) so module paths read as in the wrapped model, and
    ``capture_outputs`` (e.g. ``("logits",)``) to name the graph's outputs: the names an ONNX export and the IR text
    show, which were the last node's (``div_1``, ``linear_14``), and ``capture_dynamic_advice``: what to try when a
    dim the wrapper itself marks dynamic is constrained by the code it runs, and ``capture_context()``: a context
    manager torch.export runs under (module swaps restored after it).
    """
    t0 = time.perf_counter()
    if isinstance(example_inputs, Mapping):
        args, kwargs = (), _in_signature_order(model, dict(example_inputs))
    elif isinstance(example_inputs, torch.Tensor):  # the one argument: tuple() would split its rows into arguments
        args, kwargs = (example_inputs,), {}
    else:
        args, kwargs = tuple(example_inputs), {}
    if isinstance(model, ExportedProgram):
        ep, prefix = model, ""
    else:
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"capture expects an nn.Module, an fx.GraphModule or an ExportedProgram, "
                            f"got {type(model).__name__}")
        training = [n for n, m in model.named_modules()
                    if m.training and isinstance(m, (torch.nn.Dropout, torch.nn.modules.batchnorm._BatchNorm))]
        if training:
            raise CaptureError(f"{type(model).__name__} has modules in training mode ({', '.join(training[:3])}): "
                               "call .eval() first, or dropout and batch-norm updates would be captured")
        # a model whose weights were never loaded failed as 'device 'meta': a device operand of lowbit IR is cpu or
        # cuda' on its arange nodes, naming neither the weights nor why
        empty = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
        if empty:
            raise CaptureError(f"{type(model).__name__} has {len(empty)} parameter(s) or buffer(s) on the meta device, "
                               f"which hold no data ({', '.join(empty[:3])}{', ...' if len(empty) > 3 else ''}): its "
                               "weights were never loaded (built under torch.device('meta') or init_empty_weights, or "
                               "offloaded by a device_map); load them (from_pretrained without offloading, or "
                               "to_empty() and load_state_dict) before compiling")
        # a wrapper's module swaps for the trace (lowbit.models.CausalLMLogits: a mixture of experts run densely)
        with getattr(model, "capture_context", contextlib.nullcontext)():
            ep = _export(model, args, kwargs, dynamic_shapes, strict)
        narrowing = _narrowing_guards(ep)
        if narrowing:
            raise CaptureError(f"torch.export captured {type(model).__name__} for some input sizes only: its guard "
                               f"{narrowing[0]!r} fails at sizes inside the dynamic range (the model's code computes "
                               "a size from a dynamic dimension, e.g. int(n / 2)); the graph would silently compute "
                               "for the example's sizes. Mark that dimension static (dynamic_shapes) or compute the "
                               "size with tensor ops")
        if _mutates(ep) and not (FUNCTIONALIZE_IN_PLACE and _functionalize_in_place(ep)):
            ep = ep.run_decompositions({})  # functionalize only: `a += b` (Falcon's MLP) becomes aten.add
        prefix = getattr(model, "capture_prefix", None)
        if prefix is None:
            prefix = _wrapper_prefix(model)
    flat_examples = list(args) + list(kwargs.values())
    t1 = time.perf_counter()
    graph = from_exported(ep, prefix=prefix, example_inputs=flat_examples, raise_ops=raise_ops)
    _name_outputs(graph, getattr(model, "capture_outputs", None) or _output_fields(ep))
    graph.meta.update(
        export_seconds=round(t1 - t0, 3),
        convert_seconds=round(time.perf_counter() - t1, 3),
        aten_nodes=sum(1 for n in ep.graph.nodes if n.op == "call_function"),
        model_class=type(model).__name__,
    )
    return graph
