"""The verifier catches broken graphs and names the node, op and module."""

from __future__ import annotations

import pytest
import torch
from conftest import CountedOps

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


def test_memoized_type_checks_tell_apart_what_ops_on_meta_can_see(smollm2_graph):
    """check_types memoizes each op's result on meta tensors (SmolLM2's verify 0.45 -> 0.08 s): the memo must still
    tell apart what changes an op's result, so every node's verdict is the one a fresh run gives. A literal 2 and 2.0
    (i64 vs f32), a view of a transposed tensor (rejected) and of a contiguous one of the same shape (accepted), and
    a wrong declared type on a node whose twin was checked before: each is still told."""
    from lowbit.ir.graph import TensorType

    text = """\
graph g(%x: i64[4,6]) {
  %a: i64[4,6] = aten.mul.Tensor(%x, 2)
  %b: f32[4,6] = aten.mul.Tensor(%x, 2.0)
  %c: i64[4,6] = aten.mul.Tensor(%x, 2)
  %t: i64[6,4] = aten.transpose.int(%x, 0, 1)
  %u: i64[6,4] = aten.contiguous.default(%t)
  %v: i64[24] = aten.view.default(%u, [24])
  %w: i64[24] = aten.view.default(%t, [24])
  return %a, %b, %c, %v, %w
}
"""
    for _ in range(2):  # the second time every result comes from the memo
        with pytest.raises(VerificationError) as info:
            verify(parse_graph(text), require_data=False)
        assert info.value.problems == [info.value.problems[0]], info.value.problems
        assert "%w = aten.view.default(...): the op rejects its operands" in info.value.problems[0]
    good_text = text.replace("  %w: i64[24] = aten.view.default(%t, [24])\n", "").replace(", %w\n", "\n")
    assert verify(parse_graph(good_text), require_data=False).type_checked == 6
    wrong = parse_graph(good_text.replace("%c: i64[4,6]", "%c: f32[4,6]"))
    with pytest.raises(VerificationError, match=r"%c is declared f32\[4,6\] .* but the op produces i64\[4,6\]"):
        verify(wrong, require_data=False)
    # a real model: each block's nodes run on meta once (30 silu nodes, one silu op), and a wrong type planted in
    # the last block, whose twin was checked first, is still found
    g = smollm2_graph.clone()
    with CountedOps() as counted:
        verify(g)
    assert len(list(g.find("silu"))) == 30 and counted.ops.get("aten.silu.default", 0) <= 1, counted.ops
    node = list(g.find("silu"))[-1]
    node.outputs[0].type = TensorType(node.outputs[0].type.dtype, (1, "s0", 1535))
    with pytest.raises(VerificationError, match=r"declared f32\[1,s0,1535\].*produces f32\[1,32,1536\]"):
        verify(g)


def test_a_second_verify_of_a_captured_graph_runs_no_op_again(smollm2_graph):
    """A captured graph's list operands are FX's ``immutable_list`` (expand's and reshape's sizes): the verifier's memo
    took only plain lists and tuples, so those nodes (108 of a tiny Llama's 478 checks in a three-pass pipeline) ran
    on meta after every pass. Verified again unchanged, the graph runs no op but the ones that build results."""
    verify(smollm2_graph)
    with CountedOps() as counted:
        report = verify(smollm2_graph)
    assert report.type_checked == len(smollm2_graph.nodes)
    assert set(counted.ops) <= {"aten.empty.memory_format", "aten.as_strided.default"}, counted.ops


def test_verify_reads_each_ops_signature_once(smollm2_graph, monkeypatch):
    """check_qparams (every verify, every pass) built ``inspect.signature`` of a semantic op's function for every node
    it bound (SmolLM2: 813 a verify), ~60% of its time: each op's is read once; the parameter names and so the
    scales and zero points it checks are the same, and a NaN scale is still named."""
    import inspect

    from lowbit.ir.ops import OPS

    verify(smollm2_graph)
    built = []
    real = inspect.signature
    monkeypatch.setattr(inspect, "signature", lambda fn, *a, **k: built.append(fn) or real(fn, *a, **k))
    verify(smollm2_graph)
    assert len(built) <= len({n.op for n in smollm2_graph.nodes if n.op in OPS}), len(built)
    g = parse_graph("""\
graph g(%x: f32[2,8]) {
  param @s: f32[]
  %q: i8[2,8] = quantize(%x, @s, qdtype="int8", axis=None)
  %y: f32[2,8] = dequantize(%q, @s, qdtype="int8", axis=None)
  return %y
}
""")
    g.set_param("s", torch.tensor(float("nan")))
    with pytest.raises(VerificationError, match=r"parameter @s \(scale of %q = quantize\(\.\.\.\)\) holds 1 NaN"):
        verify(g)
