"""The verifier catches broken graphs and names the node, op and module."""

from __future__ import annotations

import pytest

from lowbit.ir.parser import parse_graph
from lowbit.ir.verifier import VerificationError, verify


def test_captured_models_verify(smollm2_graph, minilm_graph):
    for graph in (smollm2_graph, minilm_graph):
        report = verify(graph)
        assert report.type_checked == len(graph.nodes), report.unchecked


def _broken(graph):
    return graph.clone()


def test_use_before_definition(smollm2_graph):
    g = _broken(smollm2_graph)
    i = next(i for i, n in enumerate(g.nodes) if n.op == "linear")
    g.nodes.insert(0, g.nodes.pop(i))  # a linear moved above the norm it reads
    with pytest.raises(VerificationError, match=r"linear\(\.\.\.\) in model\.layers\.0\.self_attn\.q_proj reads %\w+, "
                                                r"which is not defined before use"):
        verify(g, types=False)


def test_shape_mismatch_is_named(smollm2_graph):
    g = _broken(smollm2_graph)
    o_proj = next(g.find("linear", r"layers\.0\.self_attn\.o_proj"))
    o_proj.args = (o_proj.args[0], g.params["model.layers.0.mlp.down_proj.weight"])
    with pytest.raises(VerificationError, match=r"in model\.layers\.0\.self_attn\.o_proj: the op rejects its operands"):
        verify(g)


def test_wrong_declared_type(smollm2_graph):
    from lowbit.ir.graph import TensorType

    g = _broken(smollm2_graph)
    node = next(g.find("silu", r"layers\.4\."))
    node.outputs[0].type = TensorType(node.outputs[0].type.dtype, (1, "s0", 1535))
    with pytest.raises(VerificationError, match=r"declared f32\[1,s0,1535\].*produces f32\[1,32,1536\]"):
        verify(g)


def test_missing_parameter_tensor_and_missing_param():
    text = """\
graph g(%x: f32[2,4]) {
  param @w: f32[3,4]
  %y: f32[2,3] = linear(%x, @w)  # proj
  return %y
}
"""
    with pytest.raises(VerificationError, match="parameter @w has no tensor"):
        verify(parse_graph(text))
    g = parse_graph(text)
    del g.params["w"]
    with pytest.raises(VerificationError, match="a parameter missing from the graph's table"):
        verify(g, require_data=False)


def test_duplicate_definition_and_undefined_output(smollm2_graph):
    g = _broken(smollm2_graph)
    a, b = list(g.find("silu"))[:2]
    b.outputs[0].name = a.outputs[0].name
    with pytest.raises(VerificationError, match="is used by both"):
        verify(g, types=False)
    g = _broken(smollm2_graph)
    g.remove(g.outputs[0].producer)
    with pytest.raises(VerificationError, match="graph output .* is not defined"):
        verify(g, types=False)


def test_topological_sort_repairs_order_and_dominators(smollm2_slice_f64):
    from lowbit.ir.analysis import dominators, topological_sort

    g = smollm2_slice_f64[1].clone()
    i = next(i for i, n in enumerate(g.nodes) if n.op == "linear")
    g.nodes.insert(0, g.nodes.pop(i))
    with pytest.raises(VerificationError):
        verify(g, types=False)
    assert topological_sort(g)
    verify(g)
    idom = dominators(g)
    # each block's second residual add is dominated by its first: the residual stream runs through it
    adds = list(g.find("residual_add"))
    node = adds[1]
    chain = []
    while node in idom:
        node = idom[node]
        chain.append(node)
    assert adds[0] in chain
