"""Mixture-of-experts layers run routed on the torch backend: each expert only on the tokens its router picked.

A captured MoE layer (``lowbit.models.DenseExperts``) runs every expert on every token and keeps an expert's output
only where the router picked it: ``where(picked[:, e, None], y_e * dense[:, e, None], 0.0)``, the terms summed in
expert order. That is E/k times the routed experts' FLOPs (Qwen3-MoE's 128 experts top-8: 16x). This module finds
that chain in the lowered graph by its module names (``<p>.experts.expert_<e>.gate_proj/up_proj/down_proj``) and
replaces it with ``RoutedExperts``: for expert e, rows = nonzero(picked[:, e]); the expert's own lowered nodes (its
linears, quantized or not, and its activation QDQ) run on ``hidden[rows]``, scaled by ``dense[rows, e]`` with the
graph's own ``mul`` (and cast), and added into the output in expert order. Each token's sum has the dense form's
terms in its order (a non-picked expert added an exact 0.0 there), so only a matmul over fewer rows may round
differently. A chain that is not exactly this shape (a pass merged the experts' linears, an op that mixes rows such
as a per-tensor activation scale) stays dense and ``find_routed_experts`` says why.

The Triton backend merges linears that read one input (``lowbit.ir.merge``): every expert's gate and up projections
into one wide GEMM, which no expert can run apart. ``separate_experts`` splits such merges back and merges each
expert's own gate and up (one ``split_with_sizes`` along features: row-wise), so its chain is this shape again and its
expert modules take its kernels (``triton_backend``).
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx

from lowbit.ir.graph import Graph, Node, TensorType, Value, map_operands
from lowbit.ir.merge import SPLIT_OP, merge_horizontal, unmerge_horizontal
from lowbit.ir.ops import resolve

EXPERT_OUTPUT = re.compile(r"^(.*\.experts)\.expert_(\d+)\.down_proj$")
"""The module of an expert's last linear, as ``DenseExperts`` names it: experts module, expert index."""
ROW_WISE_OPS = frozenset({"linear", "qlinear", "qlinear_q", "silu", "gelu", "relu", "mul", "add", "quantize",
                          "dequantize", "dynamic_qparams", "aten.mul.Tensor", "aten.silu.default",
                          "aten.gelu.default", SPLIT_OP})
"""Ops an expert's nodes may have for it to run on a subset of rows: each output row reads only its input row
(``dynamic_qparams`` only per token or per group: a per-tensor scale reads every row; a split only along
features, as a merged gate/up's)."""
CAST_OPS = frozenset({"aten._to_copy.default", "aten.to.dtype", "to", "cast"})
"""The ``.to(hidden dtype)`` ``DenseExperts`` writes after each term (absent where the dtypes agree)."""
ZEROS_OPS = frozenset({"aten.new_zeros.default", "aten.zeros.default"})
"""The zeros ``DenseExperts`` scatters the router's top-k weights into (``_most_picks``)."""


@dataclass
class ExpertTerm:
    """One expert's part of the chain: its own nodes (``body``, in graph order), its output scaled (``scale``:
    ``mul(y, unsqueeze(select(dense, 1, e), 1))``), the ``where`` and optional cast, and the weight column value."""

    body: list[Node]
    scale: Node
    weight_column: Value
    where: Node
    cast: Node | None


@dataclass
class ExpertsMatch:
    """One MoE layer's dense chain: the router's dense weights and picks, the experts' shared inputs (rows of
    tokens), each expert's term, and every node the routed form replaces (``covered``), ending at ``output``."""

    prefix: str
    dense: Value
    picked: Value
    hidden: list[Value]
    terms: list[ExpertTerm]
    covered: list[Node] = field(default_factory=list)
    output: Node | None = None
    most_picks: int | None = None


def _single_user(users: dict[int, list[Node]], v: Value) -> Node | None:
    readers = users.get(id(v), [])
    return readers[0] if len(readers) == 1 else None


def _column_of(v: Any, source: Value | None, e: int, producers: dict[int, Node]) -> tuple[Value | None, list[Node]]:
    """``v`` = ``unsqueeze(select(x, 1, e), 1)``: (x, the two nodes), else (None, [])."""
    unsq = producers.get(id(v)) if isinstance(v, Value) else None
    if unsq is None or unsq.op != "aten.unsqueeze.default" or list(unsq.args[1:]) != [1]:
        return None, []
    sel = producers.get(id(unsq.args[0]))
    if sel is None or sel.op != "aten.select.int" or list(sel.args[1:]) != [1, e]:
        return None, []
    if source is not None and sel.args[0] is not source:
        return None, []
    return sel.args[0], [sel, unsq]


def _body(output: Node, users: dict[int, list[Node]], producers: dict[int, Node],
          order: dict[int, int]) -> tuple[list[Node], list[Value]]:
    """The nodes only ``output`` needs (walking back while every reader of a node is already taken) and the values
    they read from outside (parameters aside), in graph order."""
    taken = {id(output): output}
    stack = [output]
    while stack:
        node = stack.pop()
        for arg in map_values(node):
            prod = producers.get(id(arg))
            if prod is None or id(prod) in taken:
                continue
            if all(id(r) in taken for r in users.get(id(arg), [])) and all(
                    all(id(r) in taken for r in users.get(id(o), [])) for o in prod.outputs):
                taken[id(prod)] = prod
                stack.append(prod)
    body = sorted(taken.values(), key=lambda n: order[id(n)])
    produced = {id(o) for n in body for o in n.outputs}
    outside: dict[int, Value] = {}
    for node in body:
        for arg in map_values(node):
            if id(arg) not in produced and arg.kind != "param":
                outside.setdefault(id(arg), arg)
    return body, list(outside.values())


def map_values(node: Node) -> list[Value]:
    found: list[Value] = []
    map_operands(lambda x: found.append(x) if isinstance(x, Value) else None, (node.args, node.kwargs))
    return found


def _row_wise(node: Node) -> bool:
    if node.op not in ROW_WISE_OPS:
        return False
    if node.op == SPLIT_OP:
        return len(node.args) == 3 and node.args[2] in (-1, 1) and not node.kwargs
    return node.op != "dynamic_qparams" or node.kwargs.get("granularity") in ("per_token", "per_group")


EXPERT_MODULE = re.compile(r"^(.*\.experts)\.expert_(\d+)(?:\.|$)")
"""A module inside one expert (``<p>.experts.expert_<e>.up_proj``, or the expert itself for its merged gate/up)."""


def expert_of(module: str | None) -> tuple[str, int] | None:
    """(experts module, expert index) of a module inside one expert, else None."""
    found = EXPERT_MODULE.match(module or "")
    return (found[1], int(found[2])) if found else None


def _merges_experts(node: Node) -> bool:
    """Whether a merged linear holds linears of two experts (or an expert's and another module's)."""
    return len({expert_of(m) for m in node.meta.get("merged", ())}) > 1


def expert_partition(node: Node) -> tuple[str, int] | None:
    """``merge_horizontal``'s ``partition`` that keeps each expert's linears apart from every other's."""
    return expert_of(node.module)


def separate_experts(graph: Graph) -> int:
    """Split every merged linear that spans experts back into its members and merge them again by expert (an
    expert's gate and up; the others as they were), in place: each expert then has its own nodes, as
    ``find_routed_experts`` needs. Returns how many merged linears were split back. Dead members are left for
    DCE."""
    members = {m for n in graph.nodes if _merges_experts(n) for m in n.meta["merged"]}
    split = unmerge_horizontal(graph, accept=_merges_experts)
    if split:
        merge_horizontal(graph, accept=lambda n: n.module in members, partition=expert_partition)
    return split


def _match_layer(prefix: str, downs: dict[int, Node], users: dict[int, list[Node]], producers: dict[int, Node],
                 order: dict[int, int]) -> ExpertsMatch | str:
    """The chain of one experts module, or why it is not the dense form exactly."""
    n_experts = len(downs)
    if sorted(downs) != list(range(n_experts)) or n_experts < 2:
        return f"experts {sorted(downs)} are not 0..E-1 (E >= 2)"
    dense = picked = None
    hidden: list[Value] | None = None
    terms: list[ExpertTerm] = []
    covered: list[Node] = []
    for e in range(n_experts):
        down = downs[e]
        scale = _single_user(users, down.outputs[0])
        if scale is None or scale.op != "aten.mul.Tensor" or scale.args[0] is not down.outputs[0]:
            return f"expert {e}'s down_proj output is not read by one mul by its router weight"
        dense, dense_nodes = _column_of(scale.args[1], dense, e, producers)
        where = _single_user(users, scale.outputs[0])
        if dense is None or where is None or where.op != "aten.where.ScalarOther" or tuple(where.args[1:]) != (
                scale.outputs[0], 0.0):
            return f"expert {e}'s scaled output is not where(picked[:, {e}], y * dense[:, {e}], 0.0)"
        picked, picked_nodes = _column_of(where.args[0], picked, e, producers)
        picked_by = producers.get(id(picked)) if picked is not None else None
        if picked_by is None or picked_by.op != "aten.ne.Scalar" or tuple(picked_by.args) != (dense, 0):
            return f"expert {e}'s pick is not dense != 0"
        cast = _single_user(users, where.outputs[0])
        if cast is not None and cast.op in CAST_OPS:
            term_out = cast.outputs[0]
        else:
            cast, term_out = None, where.outputs[0]
        body, outside = _body(down, users, producers, order)
        refused = [n for n in body if not _row_wise(n)]
        if refused:
            n = refused[0]
            return f"expert {e}'s node %{n.outputs[0].name} ({n.op}) may mix rows"
        if any(not isinstance(v.type, TensorType) or len(v.type.shape) != 2 for v in outside):
            return f"expert {e} reads a value that is not [tokens, features]"
        if hidden is None:
            hidden = outside
        elif [id(v) for v in outside] != [id(v) for v in hidden]:
            return (f"expert {e} reads {[v.name for v in outside]}, expert 0 {[v.name for v in hidden]} (a node "
                    "shared by experts, as linears merged across experts)")
        terms.append(ExpertTerm(body, scale, scale.args[1], where, cast))
        covered += body + [scale, where] + ([cast] if cast else []) + dense_nodes + picked_nodes
        if e == 0:
            acc = term_out
            continue
        add = _single_user(users, acc)
        if add is None or add.op != "add" or tuple(add.args) != (acc, term_out) or add.kwargs:
            return f"the sum of experts 0..{e - 1} is not added to expert {e}'s term alone"
        covered.append(add)
        acc = add.outputs[0]
    assert dense is not None and picked is not None and hidden is not None
    inside = {id(n) for n in covered}
    for node in covered[:-1]:  # every value the chain makes is read only inside it, but the sum
        if any(id(r) not in inside for o in node.outputs for r in users.get(id(o), [])):
            return f"node %{node.outputs[0].name} ({node.op}) of the chain is read outside it"
    tokens = dense.type.shape[0] if isinstance(dense.type, TensorType) else None
    if tokens is None or any(v.type.shape[0] != tokens for v in hidden):
        return "the experts' inputs do not have the router's rows"
    return ExpertsMatch(prefix, dense, picked, hidden, terms, covered, producers[id(acc)],
                        _most_picks(dense, producers))


def _most_picks(dense: Value, producers: dict[int, Node]) -> int | None:
    """The most experts a token picks, where the graph shows it: ``DenseExperts`` scatters the router's ``[T, k]``
    top-k weights into zeros, so a row of ``dense`` holds at most k nonzeros (fewer where a weight is 0); None for
    another producer."""
    scatter = producers.get(id(dense))
    if scatter is None or scatter.op != "aten.scatter.src" or len(scatter.args) != 4 or scatter.args[1] not in (1, -1):
        return None
    base, index = producers.get(id(scatter.args[0])), scatter.args[2]
    if base is None or base.op not in ZEROS_OPS or not isinstance(index, Value):
        return None
    shape = index.type.shape if isinstance(index.type, TensorType) else ()
    return shape[1] if len(shape) == 2 and isinstance(shape[1], int) else None


def find_routed_experts(graph: Graph) -> tuple[list[ExpertsMatch], dict[str, str]]:
    """Each MoE layer in ``graph`` that can run routed, and the experts modules that cannot with the reason."""
    downs: dict[str, dict[int, Node]] = {}
    duplicated: set[str] = set()
    for node in graph.nodes:
        found = EXPERT_OUTPUT.match(node.module or "") if node.op in ("linear", "qlinear", "qlinear_q") else None
        if found:
            if int(found[2]) in downs.setdefault(found[1], {}):
                duplicated.add(found[1])
            downs[found[1]][int(found[2])] = node
    users = graph.users()
    producers = {id(o): n for n in graph.nodes for o in n.outputs}
    order = {id(n): i for i, n in enumerate(graph.nodes)}
    matches, refused = [], {}
    graph_outputs = {id(v) for v in graph.outputs}
    for prefix, by_index in downs.items():
        result = ("an expert has two down_proj linears" if prefix in duplicated
                  else _match_layer(prefix, by_index, users, producers, order))
        if not isinstance(result, str) and any(id(o) in graph_outputs for n in result.covered[:-1]
                                                  for o in n.outputs):
            result = "a value inside the chain is a graph output"
        if isinstance(result, str):
            refused[prefix] = result
        else:
            matches.append(result)
    # a node two layers both claim (impossible for the dense form) would be lowered twice: keep both dense
    claimed: dict[int, str] = {}
    for m in list(matches):
        if any(claimed.setdefault(id(n), m.prefix) != m.prefix for n in m.covered):
            matches.remove(m)
            refused[m.prefix] = "its nodes overlap another experts module's"
    return matches, refused


class RoutedExperts(torch.nn.Module):
    """One MoE layer's experts, each run on the rows its router picked (``forward(dense, picked, *hidden)``).

    ``experts[e]`` is a GraphModule of expert e's lowered nodes: ``(*hidden rows, weight column) -> its scaled
    term``. ``rows_seen`` counts the rows each expert ran on since the last reset (what the dense form runs on
    every token). ``grouped``: where a backend set it (the Triton backend's ``grouped_experts``), the module that
    runs the layer without ``nonzero`` (``forward(dense, picked, hidden) -> [T, H]``) on the calls its ``takes``
    accepts: decode-sized ones, under a capture or on the GPU, and with ``blocked_experts`` any larger one on the
    GPU. ``most_picks``: the router's top-k where the graph shows it (``_most_picks``), else None."""

    def __init__(self, experts: list[torch.fx.GraphModule], out_features: int, out_dtype: torch.dtype,
                 prefix: str = "", most_picks: int | None = None) -> None:
        super().__init__()
        self.experts = torch.nn.ModuleList(experts)
        self.out_features = out_features
        self.out_dtype = out_dtype
        self.prefix = prefix
        self.most_picks = most_picks
        self.rows_seen = [0] * len(experts)
        self.grouped: torch.nn.Module | None = None

    @staticmethod
    def runs_dense(x: torch.Tensor) -> bool:
        """Whether a call must not wait for the device: while a CUDA graph captures (the generator's decode steps),
        as ``nonzero`` does and a capture forbids. Such a call runs ``grouped`` where set, else the dense form."""
        return x.is_cuda and torch.cuda.is_current_stream_capturing()

    def forward(self, dense: torch.Tensor, picked: torch.Tensor, *hidden: torch.Tensor) -> torch.Tensor:
        capturing = self.runs_dense(hidden[0])
        if self.grouped is not None and len(hidden) == 1 and self.grouped.takes(hidden[0], capturing):
            return self.grouped(dense, picked, hidden[0])
        if capturing:
            # the dense chain: every expert on every row, its term kept where picked (the cast of a selected 0.0 is
            # 0.0, so selecting after the cast is the same), summed in expert order
            total = None
            for e, expert in enumerate(self.experts):
                term = torch.where(picked[:, e, None], expert(*hidden, dense[:, e, None]), 0.0)
                total = term if total is None else total + term
            return total
        out = hidden[0].new_zeros(dense.shape[0], self.out_features, dtype=self.out_dtype)
        # every expert's rows from one nonzero over [experts, tokens] (expert-major, rows ascending) and one read of
        # the counts: two waits for the device per layer, not one per expert (128 on Qwen3-MoE)
        counts = picked.sum(0).tolist()
        rows_of = picked.t().nonzero()[:, 1].split(counts)
        for e, (expert, rows) in enumerate(zip(self.experts, rows_of, strict=True)):
            if counts[e] == 0:
                continue
            self.rows_seen[e] += counts[e]
            weight = dense.index_select(0, rows)[:, e].unsqueeze(1)
            term = expert(*(h.index_select(0, rows) for h in hidden), weight)
            out.index_add_(0, rows, term)
        return out


def build_routed(match: ExpertsMatch, buffer: Any) -> RoutedExperts:
    """The module running ``match``'s experts routed; ``buffer(value)`` is the tensor of a parameter value."""
    experts = []
    for term in match.terms:
        root = torch.nn.Module()
        fxg = torch.fx.Graph()
        env: dict[int, Any] = {id(v): fxg.placeholder(f"hidden_{i}") for i, v in enumerate(match.hidden)}
        env[id(term.weight_column)] = fxg.placeholder("weight")
        env[id(term.where.outputs[0])] = None  # set to the scaled output below: rows not picked are not here
        for node in term.body + [term.scale] + ([term.cast] if term.cast else []):
            for arg in map_values(node):
                if arg.kind == "param" and id(arg) not in env:
                    attr = f"p{len(env)}"
                    root.register_buffer(attr, buffer(arg))
                    env[id(arg)] = fxg.get_attr(attr)
            args, kwargs = map_operands(lambda x: env[id(x)] if isinstance(x, Value) else x, (node.args, node.kwargs))
            # named as the lowered graph's values, so a backend's report on these nodes names them as on the others
            out = fxg.create_node("call_function", resolve(node.op), tuple(args), kwargs, name=node.outputs[0].name)
            if len(node.outputs) == 1:
                env[id(node.outputs[0])] = out
            else:
                for i, v in enumerate(node.outputs):
                    env[id(v)] = fxg.create_node("call_function", operator.getitem, (out, i), name=v.name)
            if node is term.scale:
                env[id(term.where.outputs[0])] = out
        last = term.cast if term.cast else term.where
        fxg.output(env[id(last.outputs[0])])
        experts.append(torch.fx.GraphModule(root, fxg, class_name="LowbitExpert"))
    out_type = match.output.outputs[0].type
    assert isinstance(out_type, TensorType)
    return RoutedExperts(experts, int(out_type.shape[-1]), out_type.dtype, match.prefix, match.most_picks)
