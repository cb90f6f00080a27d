"""IR invariants under hypothesis, on graphs captured from random small modules (the ops lowbit captures: linears,
HF-style and torch RMSNorms, LayerNorm, activations, softmax, residual adds, reshapes, scalar ops; f32 or f64;
a dynamic sequence length or a static one):

- the text form is a fixed point: print -> parse -> print gives the same text, and the parsed graph computes the same,
  captured and after quantization (packed params, dynamic activation qparams, fused qlinear);
- the verifier accepts every captured graph, and rejects a dangling operand or a wrong declared shape naming the node;
- the exact rewrites (``dce``, ``constant-fold``, ``fold-norms``) keep the outputs in float64, and ``dce`` removes
  exactly the dead nodes added to a graph.

Each example captures a module through torch.export (about a second), so ``max_examples`` stays small.
"""

from __future__ import annotations

import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from lowbit.backends.torch_backend import TorchCompiled
from lowbit.ir.capture import capture, refuse_unrunnable
from lowbit.ir.graph import Graph, TensorType, Value
from lowbit.ir.parser import parse_graph
from lowbit.ir.printer import print_graph
from lowbit.ir.verifier import VerificationError, verify
from lowbit.passes.manager import PassManager

STEPS = ("linear", "linear_nobias", "hf_rms_norm", "torch_rms_norm", "layer_norm", "silu", "gelu", "relu", "softmax",
         "residual", "gate", "split_heads", "scale", "mean_shift", "attention", "glu", "cat_slice", "matmul", "tanh")


class HFRMSNorm(nn.Module):
    """Llama's RMSNorm as HF writes it (statistics in float32, gain in the input dtype): the raising pattern."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.rand(d) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        return self.weight * h.to(x.dtype)


class Random(nn.Module):
    """A chain of ``steps`` over ``[B, S, D]`` activations; each step's modules named after it (``s3_linear``)."""

    def __init__(self, steps: list[tuple[str, int]], d: int) -> None:
        super().__init__()
        self.steps = steps
        for i, (kind, out) in enumerate(steps):
            name = f"s{i}"
            if kind in ("linear", "linear_nobias"):
                setattr(self, name, nn.Linear(d, out, bias=kind == "linear"))
                d = out
            elif kind == "residual":
                setattr(self, name, nn.Linear(d, d))
            elif kind == "hf_rms_norm":
                setattr(self, name, HFRMSNorm(d))
            elif kind == "torch_rms_norm":
                setattr(self, name, nn.RMSNorm(d, eps=1e-6))
                with torch.no_grad():
                    getattr(self, name).weight.uniform_(0.5, 1.5)
            elif kind == "layer_norm":
                setattr(self, name, nn.LayerNorm(d))
        self.d_out = d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for i, (kind, _) in enumerate(self.steps):
            m = getattr(self, f"s{i}", None)
            if kind in ("linear", "linear_nobias", "hf_rms_norm", "torch_rms_norm", "layer_norm"):
                h = m(h)
            elif kind == "residual":
                h = h + m(h)
            elif kind in ("silu", "gelu", "relu"):
                h = getattr(nn.functional, kind)(h)
            elif kind == "softmax":
                h = h.softmax(-1)
            elif kind == "gate":
                h = h * torch.sigmoid(h)
            elif kind == "split_heads" and h.shape[-1] % 2 == 0:
                h = h.reshape(h.shape[0], h.shape[1], 2, -1).transpose(1, 2).transpose(1, 2).reshape(
                    h.shape[0], h.shape[1], -1)
            elif kind == "scale":
                h = h * 0.5 + 1.0
            elif kind == "mean_shift":
                h = h - h.mean(-1, keepdim=True)
            elif kind == "attention" and h.shape[-1] % 2 == 0:
                q = h.reshape(h.shape[0], h.shape[1], 2, -1).transpose(1, 2)
                h = nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True).transpose(1, 2).reshape(
                    h.shape[0], h.shape[1], -1)
            elif kind == "glu" and h.shape[-1] % 2 == 0:
                a, b = h.chunk(2, -1)
                h = torch.cat([nn.functional.silu(a) * b, a], -1)
            elif kind == "cat_slice":
                h = torch.cat([h, -h], -1)[..., 1:h.shape[-1] + 1]
            elif kind == "matmul":
                h = (h @ h.transpose(-1, -2)) @ h / (h.shape[-1] * h.shape[1])
            elif kind == "tanh":
                h = torch.tanh(h)
        return h


@st.composite
def programs(draw: st.DrawFn) -> tuple[list[tuple[str, int]], int, torch.dtype, bool]:
    steps = draw(st.lists(st.tuples(st.sampled_from(STEPS), st.sampled_from([4, 6, 8])), min_size=1, max_size=6))
    d = draw(st.sampled_from([4, 6, 8]))
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
    dynamic = draw(st.booleans())
    return steps, d, dtype, dynamic


def captured(program: tuple[list[tuple[str, int]], int, torch.dtype, bool]) -> tuple[Graph, nn.Module, torch.Tensor]:
    steps, d, dtype, dynamic = program
    torch.manual_seed(0)
    model = Random(steps, d).to(dtype).eval()
    x = torch.randn(2, 5, d, dtype=dtype)
    dyn = {"x": {1: torch.export.Dim("seq", min=2, max=64)}} if dynamic else None
    graph = capture(model, (x,), dyn)
    refuse_unrunnable(graph, model)  # every op of the menu is one lowbit runs
    return graph, model, x


def _weights(graph: Graph) -> dict[str, torch.Tensor]:
    return {k: v.data for k, v in graph.params.items()}


def _assert_text_round_trips(graph: Graph, x: torch.Tensor) -> None:
    """``graph``'s text parses (with its weights) to a graph that verifies, prints the same text and computes the
    same output on ``x`` bit for bit."""
    text = print_graph(graph)
    parsed = parse_graph(text, _weights(graph))
    assert print_graph(parsed) == text
    verify(parsed)
    assert torch.equal(TorchCompiled(parsed)(x), TorchCompiled(graph)(x))


SETTINGS = settings(max_examples=10, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


@SETTINGS
@given(programs())
def test_text_form_is_a_fixed_point_and_the_parsed_graph_computes_the_same(program):
    graph, model, x = captured(program)
    _assert_text_round_trips(graph, x)
    tol = 2e-2 if x.dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(TorchCompiled(graph)(x), model(x), rtol=tol, atol=tol)


def _corruptible(graph: Graph):
    """The nodes that read an activation (a value another node made, or the input)."""
    return [n for n in graph.nodes if any(not v.is_param for v in n.inputs())]


@SETTINGS
@given(programs(), st.integers(min_value=0, max_value=99))
def test_verifier_accepts_captured_graphs_and_names_the_node_of_a_corruption(program, pick):
    graph, _, _ = captured(program)
    verify(graph)
    nodes = _corruptible(graph)
    if not nodes:
        return
    # a dangling operand: the node reads a value nothing defines
    node = nodes[pick % len(nodes)]
    bad = graph.clone()
    target = next(n for n in bad.nodes if n.name == node.name)
    read = next(v for v in target.inputs() if not v.is_param)
    ghost = Value("ghost", read.type)
    target.map_values(lambda v: ghost if v is read else v)
    with pytest.raises(VerificationError, match=rf"%{target.name} = {target.op}\(\.\.\.\).*reads %ghost, which is "
                                                r"not defined before use"):
        verify(bad)
    # a wrong declared shape: the node's output claims one more element on its last dim
    bad = graph.clone()
    target = next(n for n in bad.nodes if n.name == node.name)
    out = target.outputs[0]
    if not isinstance(out.type, TensorType) or not out.type.shape:
        return
    shape = list(out.type.shape)
    shape[-1] = shape[-1] + 1 if isinstance(shape[-1], int) else f"{shape[-1]}+1"
    out.type = TensorType(out.type.dtype, tuple(shape))
    with pytest.raises(VerificationError, match=rf"%{target.name}\b"):
        verify(bad)


@SETTINGS
@given(programs())
def test_exact_rewrites_keep_outputs_in_float64(program):
    steps, d, _, dynamic = program
    graph, _, x = captured((steps, d, torch.float64, dynamic))
    ref = TorchCompiled(graph)(x)
    for pipeline in ("dce", "constant-fold", "fold-norms", "fold-norms,dce,constant-fold"):
        g = graph.clone()
        PassManager(pipeline, verify_each=True).run(g)
        out = TorchCompiled(g)(x)
        assert (out - ref).abs().max() <= 1e-12 * max(1.0, ref.abs().max().item()), pipeline


@SETTINGS
@given(programs(), st.integers(min_value=1, max_value=3))
def test_dce_removes_exactly_the_dead_nodes_added(program, n_dead):
    graph, _, x = captured(program)
    text = print_graph(graph)
    g = graph.clone()
    live = list(g.nodes)
    for i in range(n_dead):  # a copy of a node whose output nothing reads
        src = live[(i * 7) % len(live)]
        dead = g.make_node(src.op, src.args, dict(src.kwargs), name=f"dead{i}", types=[v.type for v in src.outputs],
                           module=src.module)
        g.append(dead)
    verify(g)
    assert len(g.nodes) == len(graph.nodes) + n_dead
    PassManager("dce").run(g)
    assert print_graph(g) == text
    assert torch.equal(TorchCompiled(g)(x), TorchCompiled(graph)(x))


@SETTINGS
@given(programs(), st.sampled_from(["quantize(w=int8)", "quantize(w=int4,group=2,sym=false)",
                                    "quantize(w=int8,a=int8),fuse-qlinear", "fold-norms,quantize(w=fp8e4m3,a=fp8e4m3)",
                                    "quantize(w=int4,group=2,a=int8,a_gran=per_tensor,a_sym=false),fuse-qlinear"]))
def test_quantized_graphs_keep_the_text_fixed_point(program, pipeline):
    """The QDQ form (packed int4 params, dynamic activation qparams, fused qlinear and what it replaced) prints and
    parses back to the same text and computes the same."""
    steps, d, dtype, dynamic = program
    graph, _, x = captured((steps, d, torch.float32 if dtype == torch.float64 else dtype, dynamic))
    PassManager(pipeline).run(graph)
    _assert_text_round_trips(graph, x)


def _state(graph: Graph) -> tuple[str, str, str, dict[str, int]]:
    """What a clone must never change in its original: text, graph and node metadata, each param's tensor."""
    return (print_graph(graph), repr(graph.meta), repr([n.meta for n in graph.nodes]),
            {k: id(v.data) for k, v in graph.params.items()})


CLONE_EDITS = ("meta_nested", "meta_list", "node_meta", "kwarg", "list_operand", "symbol", "type", "set_param",
               "rename", "remove", "output", "kv_cache_record")


@settings(max_examples=40, deadline=None, derandomize=True)
@given(st.lists(st.sampled_from(CLONE_EDITS), min_size=1, max_size=5))
def test_editing_a_clone_never_changes_the_original(edits):
    """``Graph.clone`` is deep for everything a pass may edit: nodes, operands, types, symbols, params, and the
    graph's and nodes' metadata. ``meta`` was copied one level deep, so ``kv-cache`` recording its layout in a
    clone's ``meta["generation"]`` rewrote the original's, which then claimed a packed cache its inputs lacked."""
    from conftest import TINY_IR

    graph = parse_graph(TINY_IR, {"norm.weight": torch.ones(8), "proj.weight": torch.randn(16, 8)})
    graph.meta["generation"] = {"cache_inputs": ["k0", "v0"], "windows": [None], "max_length": 32}
    graph.meta["pruned"] = {"heads": {"0": [1, 2]}}
    graph.nodes[1].meta["merged"] = ("a", "b")
    graph.nodes[1].meta["notes"] = {"seen": [1]}
    before = _state(graph)
    g = graph.clone()
    assert _state(g) == before
    for edit in edits:
        if edit == "meta_nested":
            g.meta["pruned"]["heads"]["0"].append(3)
        elif edit == "meta_list":
            g.meta["generation"]["cache_inputs"][0] = "k_codes"
        elif edit == "kv_cache_record":  # what kv-cache's run does to the step graph's record
            gen = g.meta["generation"]
            gen["kv_cache"] = {"bits": 4}
            gen["cache_inputs"] = ["k_codes"]
        elif edit == "node_meta":
            g.nodes[1].meta["notes"]["seen"].append(2)
            g.nodes[1].meta["sparsity"] = "2:4"
        elif edit == "kwarg":
            g.nodes[0].kwargs["eps"] = 0.5
        elif edit == "list_operand":
            reshape = next(n for n in g.nodes if n.op == "reshape")
            reshape.args[1][0] = 3
        elif edit == "symbol":
            g.symbols["s0"].hint = 9
        elif edit == "type":
            g.inputs[0].type = TensorType(torch.float64, (2, "s0", 8))
        elif edit == "set_param":
            g.set_param("proj.weight", torch.zeros(16, 8))
        elif edit == "rename":
            g.rename(g.nodes[0].outputs[0], "renamed")
        elif edit == "remove" and len(g.nodes) > 3:
            g.remove(g.nodes[2])
        elif edit == "output":
            g.outputs.append(g.inputs[0])
    assert _state(graph) == before, edits


@settings(max_examples=60, deadline=None, derandomize=True)
@given(st.text(min_size=1, max_size=12), st.text(min_size=1, max_size=12), st.text(max_size=12))
def test_any_input_and_parameter_name_prints_and_parses_back(input_name, param_name, module):
    """Names come from the model (forward's arguments, ``ModuleDict`` keys: ``"my layer"``, ``"a:b"``, ``"café"``);
    the text wrote them bare after ``%``/``@``, so a name outside the parser's plain set printed as text that did
    not parse back. Every name round-trips, and the parsed graph holds the same tensor under it."""
    graph = Graph()
    x = graph.add_input(input_name, TensorType(torch.float32, (2, 4)))
    weight = torch.randn(3, 4)
    w = graph.add_param(param_name, weight)
    node = graph.append(graph.make_node("linear", (x, w), type=TensorType(torch.float32, (2, 3)), module=module))
    graph.outputs = [node.output]
    verify(graph)
    text = print_graph(graph)
    parsed = parse_graph(text, {param_name: weight})
    assert print_graph(parsed) == text
    assert [v.name for v in parsed.inputs] == [input_name] and list(parsed.params) == [param_name]
    assert parsed.params[param_name].data.data_ptr() == weight.data_ptr() and parsed.nodes[0].module == module


@settings(max_examples=60, deadline=None, derandomize=True)
@given(st.text(max_size=12))
def test_any_graph_name_prints_and_parses_back(name):
    """``Graph("my model")`` printed ``graph my model() {``, a header the parser refused ("expected '('"): every
    name round-trips, written bare when the parser reads it as one name and as a JSON string otherwise."""
    graph = Graph(name)
    x = graph.add_input("x", TensorType(torch.float32, (2, 4)))
    graph.outputs = [x]
    text = print_graph(graph)
    parsed = parse_graph(text)
    assert parsed.name == name and print_graph(parsed) == text


QDQ_IR = """graph main(%x: f32[1,s0,{k}]) {{
  symbol s0 in [2, 64] hint 4
  param @fc.weight.qdata: u8[{n},{kp}]
  param @fc.weight.scale: {sdt}[{sc}]
  param @fc.weight.zero_point: {zdt}[{zp}]
  %y_wdq: f32[{n},{k}] = dequantize(@fc.weight.qdata, @fc.weight.scale, @fc.weight.zero_point, qdtype="{q}", \
axis=1, block_size={bs}, out_dtype=f32)  # fc
  %y: f32[1,s0,{n}] = linear(%x, %y_wdq)  # fc
  return %y
}}
"""


@settings(max_examples=40, deadline=None, derandomize=True)
@given(st.sampled_from([2, 4, 6]), st.sampled_from([8, 16]), st.sampled_from([2, 4, 8]),
       st.sampled_from(["int4", "uint4"]),
       st.sampled_from(["none", "scale_rows", "scale_groups", "zp_groups", "zp_one", "zp_dtype", "scale_dtype",
                        "block_size"]))
def test_verifier_names_the_dequantize_whose_scale_or_zero_point_does_not_fit_its_groups(n, k, group, qdtype, damage):
    """A block-wise weight dequantize's scale and zero point are ``[N, K/group]``, the zero point in the qdtype's
    container: a scale or zero point of another shape, another dtype or a block_size they do not fit is refused by
    the verifier naming the node. dequantize let a ``[N, 1]`` zero point broadcast (one per row: other numbers, no
    error) and took a float or wrong-signed zero point and an integer scale as given."""
    zdt = {"int4": "i8", "uint4": "u8"}[qdtype]
    fields = {"n": n, "k": k, "kp": k // 2, "q": qdtype, "bs": group, "sdt": "f32", "zdt": zdt,
              "sc": f"{n},{k // group}", "zp": f"{n},{k // group}"}
    other_group = {"scale_rows": ("sc", f"{n + 1},{k // group}"), "scale_groups": ("sc", f"{n},{k // group + 1}"),
                   "zp_groups": ("zp", f"{n},1" if k // group > 1 else f"{n},2"), "zp_one": ("zp", "1"),
                   "zp_dtype": ("zdt", "f32" if zdt == "i8" else "i8"), "scale_dtype": ("sdt", "i32"),
                   "block_size": ("bs", group * 2 if group * 2 <= k else 3)}
    if damage != "none":
        key, value = other_group[damage]
        fields[key] = value
    graph = parse_graph(QDQ_IR.format(**fields))
    if damage == "none":
        verify(graph, require_data=False)
        return
    with pytest.raises(VerificationError, match=r"%y_wdq = dequantize\(\.\.\.\) in fc: the op rejects its operands: "
                                                r"\w+Error: dequantize\(qdtype=u?int4\): "):
        verify(graph, require_data=False)


def _operand_trees():  # type: ignore[no-untyped-def]
    """Nested node operands as captured graphs hold them: values, literals, None, devices, dtypes, shapes in tuples,
    lists, dicts, ``torch.Size`` and namedtuples."""
    from collections import namedtuple

    pair = namedtuple("pair", "a b")
    values = [Value(f"v{i}", TensorType(torch.float32, (2,))) for i in range(3)]
    leaves = st.sampled_from([*values, 1, 2.5, None, True, "mean", torch.float16, torch.device("cpu"), slice(0, 2)])
    return st.recursive(leaves, lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.lists(inner, max_size=3).map(tuple),
        st.dictionaries(st.sampled_from(["dim", "eps", "x", "scale"]), inner, max_size=3),
        st.tuples(inner, inner).map(lambda t: pair(*t)),
        st.lists(st.integers(1, 4), max_size=3).map(torch.Size)), max_leaves=12)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(_operand_trees())
def test_operand_walks_match_torch_pytree(tree):
    """``map_operands`` and ``operand_leaves`` (what ``Node.inputs``/``map_values``, the verifier, constant folding and
    the calibration engine walk operands with, in place of torch's pytree) give torch's pytree results: the same
    leaves in the same order, the same containers rebuilt."""
    from torch.utils import _pytree as pytree

    from lowbit.ir.graph import map_operands, operand_leaves

    leaves = pytree.tree_leaves(tree)
    assert operand_leaves(tree) == leaves
    assert operand_leaves(tree, Value) == [x for x in leaves if isinstance(x, Value)]
    assert operand_leaves(tree, torch.device) == [x for x in leaves if isinstance(x, torch.device)]

    def tag(x):  # type: ignore[no-untyped-def]
        return ("seen", x.name) if isinstance(x, Value) else ("seen", repr(x))

    ours, theirs = map_operands(tag, tree), pytree.tree_map(tag, tree)
    assert ours == theirs and type(ours) is type(theirs)


def test_passes_and_calibration_walk_operands_without_torch_pytree(monkeypatch):
    """Every pass, each verification between passes and every calibration batch walks every node's operands; torch's
    generic pytree took ~60 µs a node on this machine where a plain walk of the tuples, lists and dicts IR operands
    are takes ~10 (a dce pipeline on the 30-block SmolLM2 graph: 1.92 -> 1.66 s; quantize(w=int8): 3.17 -> 2.46 s).
    A pipeline with a calibrated pass and the torch backend on a captured model never calls it."""
    from torch.utils import _pytree as pytree

    from lowbit.calibration.engine import run as calibrate

    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8)).eval()
    graph = capture(model, (torch.randn(2, 8),))
    calls = []

    def counted(real):  # type: ignore[no-untyped-def]
        def call(*args, **kwargs):  # type: ignore[no-untyped-def]
            caller = sys._getframe(1).f_code
            if "/lowbit/" in caller.co_filename:  # torch's own ops flatten their arguments too: not ours to count
                calls.append(f"{caller.co_filename}:{caller.co_name}")
            return real(*args, **kwargs)
        return call

    for name in ("tree_map", "tree_leaves", "tree_flatten"):
        monkeypatch.setattr(pytree, name, counted(getattr(pytree, name)))
    PassManager("dce,fold-norms,quantize(w=int8)").run(graph)
    report = calibrate(graph, [(torch.randn(2, 8),), (torch.randn(2, 8),)], run_suffix=True, progress=False)
    TorchCompiled(graph)(torch.randn(2, 8))
    assert calls == [] and report is not None
