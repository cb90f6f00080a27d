"""The IR's text form: golden text, round trips on real models, literals (hypothesis), parse errors."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.backends.torch_backend import TorchCompiled
from lowbit.ir.graph import Graph, TensorType
from lowbit.ir.parser import IRParseError, parse_graph
from lowbit.ir.printer import format_literal, print_graph

from conftest import TINY_IR as GOLDEN  # noqa: E402


def test_golden_text_round_trips_exactly():
    assert print_graph(parse_graph(GOLDEN)) == GOLDEN


def test_golden_graph_runs_with_weights():
    w = {"norm.weight": torch.rand(8) + 0.5, "proj.weight": torch.randn(16, 8)}
    g = parse_graph(GOLDEN, w)
    x = torch.randn(2, 5, 8)
    n = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w["norm.weight"]
    ref = torch.nn.functional.linear(n, w["proj.weight"]).reshape(2, 5, 4, 4)
    assert torch.allclose(TorchCompiled(g)(x), ref, atol=1e-6)


def test_smollm2_round_trip_is_textually_stable_and_runs(smollm2_graph, wikitext_ids):
    text = print_graph(smollm2_graph)
    reparsed = parse_graph(text, {k: v.data for k, v in smollm2_graph.params.items()})
    assert print_graph(reparsed) == text
    ids = wikitext_ids[:, :64]
    assert torch.equal(TorchCompiled(reparsed)(ids), TorchCompiled(smollm2_graph)(ids))


def test_minilm_round_trip(minilm_graph):
    text = print_graph(minilm_graph)
    assert print_graph(parse_graph(text)) == text


literals = st.recursive(
    st.one_of(
        st.integers(min_value=-(2**63), max_value=2**63 - 1),
        st.floats(allow_nan=False),
        st.booleans(),
        st.none(),
        st.text(max_size=12),
        st.sampled_from([torch.float32, torch.int64, torch.bfloat16, torch.bool, torch.float8_e4m3fn]),
    ),
    lambda inner: st.lists(inner, max_size=4),
    max_leaves=10,
)


@settings(max_examples=200, deadline=None)
@given(literals)
def test_literals_round_trip(value):
    g = Graph("lit")
    x = g.add_input("x", TensorType(torch.float32, (2,)))
    node = g.make_node("aten.add.Tensor", [x, x], {"attr": value}, type=TensorType(torch.float32, (2,)))
    g.append(node)
    g.outputs = [node.output]
    back = parse_graph(print_graph(g)).nodes[0].kwargs["attr"]
    assert format_literal(back) == format_literal(value)
    if isinstance(value, float) and not math.isinf(value):
        assert back == value


@pytest.mark.parametrize("text,fragment", [
    (GOLDEN.replace("%n: f32[2,s0,8] =", "%n: q32[2,s0,8] ="), "unknown dtype 'q32'"),
    (GOLDEN.replace("linear(%n,", "linear(%m,"), "use of undefined value %m"),
    (GOLDEN.replace("@proj.weight)", "@nope.weight)"), "undeclared parameter @nope.weight"),
    (GOLDEN.replace("  return %r\n", ""), "expected"),
    (GOLDEN.replace("%y: f32[2,s0,16] =", "%n: f32[2,s0,16] ="), "defined twice"),
])
def test_parse_errors_name_line_and_problem(text, fragment):
    with pytest.raises(IRParseError, match="line \\d+") as info:
        parse_graph(text)
    assert fragment in str(info.value)
