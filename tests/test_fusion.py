"""The op-indexed rewriter (``lowbit.ir.pattern``), the ``qlinear`` op and the ``fuse-qlinear`` pass.

``qlinear``'s reference is the unfused QDQ subgraph op by op, so fusing must leave every output bit as it
was: checked on a real 2-layer SmolLM2 slice for each quantized form lowbit's recipes produce, and on tiny
hand-written graphs whose fused IR text is the golden.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lowbit.backends.torch_backend import TorchCompiled
from lowbit.ir.fusion import QLINEAR_RULES, fuse_qlinear, unfuse_qlinear
from lowbit.ir.graph import Graph, Node
from lowbit.ir.parser import parse_graph
from lowbit.ir.pattern import (
    P,
    PatternMatcher,
    RewriteLoopError,
    Rule,
    X,
    graph_rewrite,
)
from lowbit.ir.quant import qlinear
from lowbit.ir.verifier import verify
from lowbit.passes.insert_qdq import InsertQDQ
from lowbit.passes.manager import PassManager

# ---- golden IR ---------------------------------------------------------------------------------

TINY = """graph main(%x: f32[1,s0,8]) {
  symbol s0 in [2, 64] hint 4
  param @fc.weight: f32[4,8]
  param @fc.bias: f32[4]
  %y: f32[1,s0,4] = linear(%x, @fc.weight, @fc.bias)  # fc
  return %y
}
"""

TINY_W4G4_A8_FUSED = """graph main(%x: f32[1,s0,8]) {
  symbol s0 in [2, 64] hint 4
  param @fc.bias: f32[4]
  param @fc.weight.qdata: u8[4,4]
  param @fc.weight.scale: f32[4,2]
  param @fc.weight.zero_point: i8[4,2]
  %qlinear: f32[1,s0,4] = qlinear(%x, @fc.weight.qdata, @fc.weight.scale, @fc.weight.zero_point, @fc.bias, w_qdtype="int4", w_axis=1, w_block_size=4, a_qdtype="int8", a_granularity="per_token", a_symmetric=True, a_block_size=8, out_dtype=f32)  # fc | fused dynamic_qparams+quantize+dequantize+dequantize+linear
  return %qlinear
}
"""

TINY_W8_FUSED = """graph main(%x: f32[1,s0,8]) {
  symbol s0 in [2, 64] hint 4
  param @fc.bias: f32[4]
  param @fc.weight.qdata: i8[4,8]
  param @fc.weight.scale: f32[4]
  %qlinear: f32[1,s0,4] = qlinear(%x, @fc.weight.qdata, @fc.weight.scale, None, @fc.bias, w_qdtype="int8", w_axis=0, w_block_size=None, a_qdtype=None, a_granularity="per_token", a_symmetric=True, a_block_size=None, out_dtype=f32)  # fc | fused dequantize+linear
  return %qlinear
}
"""


def _tiny() -> Graph:
    w = torch.linspace(-1.0, 2.0, 32).reshape(4, 8)
    return parse_graph(TINY, {"fc.weight": w, "fc.bias": torch.tensor([0.5, -0.25, 0.0, 1.0])})


@pytest.mark.parametrize("options, golden, form", [
    ({"w": "int4", "group": 4, "sym": False, "a": "int8"}, TINY_W4G4_A8_FUSED, "w4a8+bias"),
    ({"w": "int8"}, TINY_W8_FUSED, "w8a16+bias"),
], ids=["w4g4a8", "w8"])
def test_fuse_qlinear_golden_round_trip_and_exact(options, golden, form):
    g = _tiny()
    InsertQDQ(**options).run(g)
    x = torch.randn(1, 5, 8)
    ref = TorchCompiled(g)(x)
    report = PassManager("fuse-qlinear").run(g)  # verifies the fused IR
    assert str(g) == golden
    assert report.records[0].stats["by_form"] == {form: 1}
    assert torch.equal(TorchCompiled(g)(x), ref)
    again = parse_graph(golden, {k: v.data for k, v in g.params.items()})
    assert str(again) == golden and again.nodes[0].meta["fused"] == g.nodes[0].meta["fused"]
    unfuse_qlinear(again)  # and back: the reference subgraph, op by op
    verify(again)
    assert [n.op for n in again.nodes][-1] == "linear" and torch.equal(TorchCompiled(again)(x), ref)


def test_fusion_declines_what_the_reference_would_not_recompute():
    """An activation dequantize that casts to another dtype than its input's, or a scale from elsewhere, is not
    qlinear's reference: left unfused and counted as declined."""
    text = """graph main(%x: f32[1,s0,8]) {
  symbol s0 in [2, 64] hint 4
  param @w.qdata: i8[4,8]
  param @w.scale: f32[4]
  param @s: f32[]
  %s2: f32[1,s0,1], %zp: i8[1,s0,1] = dynamic_qparams(%x, qdtype="int8", granularity="per_token", symmetric=True, axis=-1, block_size=8)
  %q: i8[1,s0,8] = quantize(%x, %s2, None, qdtype="int8", axis=-1, block_size=8)
  %xq: f32[1,s0,8] = dequantize(%q, @s, None, qdtype="int8", axis=-1, block_size=8, out_dtype=f32)
  %w: f32[4,8] = dequantize(@w.qdata, @w.scale, None, qdtype="int8", axis=0, block_size=None, out_dtype=f32)
  %y: f32[1,s0,4] = linear(%xq, %w)  # proj
  return %y
}
"""
    g = parse_graph(text, {"w.qdata": torch.ones(4, 8, dtype=torch.int8), "w.scale": torch.ones(4),
                           "s": torch.tensor(0.1)})
    stats = fuse_qlinear(g)
    # the activation chain reads two different scales: no activation row accepts; the weight-only row fuses the
    # weight and keeps the activation QDQ as qlinear's float input
    assert stats.counts() == {"w8a16": 1}
    q = next(n for n in g.nodes if n.op == "qlinear")
    assert q.args[0].name == "xq" and q.kwargs["a_qdtype"] is None


# ---- the rewriter ------------------------------------------------------------------------------

def _chain() -> Graph:
    return parse_graph("""graph main(%x: f32[4]) {
  %a: f32[4] = aten.neg.default(%x)
  %b: f32[4] = aten.neg.default(%a)
  %c: f32[4] = aten.relu.default(%b)
  return %c
}
""")


def test_rewriter_indexes_rules_by_root_op_and_counts_per_rule():
    g = _chain()
    rules = [Rule("double-neg", P("aten.neg.default", P("aten.neg.default", X("x"))),
                  lambda gr, n, b: Node("aten.clone.default", (b["x"],))),
             Rule("relu", P("aten.relu.default", X("x")), lambda gr, n, b: None)]
    pm = PatternMatcher(rules)
    assert [r.name for r in pm.candidates("aten.relu.default")] == ["relu"]
    assert pm.candidates("aten.add.Tensor") == []
    stats = graph_rewrite(g, pm)
    assert stats.counts() == {"double-neg": 1}
    # sweep 1 tries both negs (the outer one matches), sweep 2 the one left: three tries, one match
    assert stats.rules["double-neg"].tried == 3 and stats.rules["double-neg"].matched == 1
    # the declining rule is asked once per sweep; the second sweep rewrites nothing: the fixed point
    assert stats.rules["relu"].declined == 2 and stats.sweeps == 2
    x = torch.randn(4)
    assert torch.equal(TorchCompiled(g)(x), torch.relu(x))


def test_rewriter_loop_guard_names_the_rules_that_keep_firing():
    g = _chain()
    flip = [Rule("neg-to-abs", P("aten.neg.default", X("x")), lambda gr, n, b: Node("aten.abs.default", (b["x"],))),
            Rule("abs-to-neg", P("aten.abs.default", X("x")), lambda gr, n, b: Node("aten.neg.default", (b["x"],)))]
    with pytest.raises(RewriteLoopError, match="fixed point in 5 sweeps.*abs-to-neg, neg-to-abs"):
        graph_rewrite(g, flip, max_sweeps=5)


def test_qlinear_rule_table_has_a_row_per_form_with_and_without_bias():
    names = {r.name for r in QLINEAR_RULES}
    for form in ("w4a16", "w8a16", "fp8a16", "w8a8", "fp8", "w4a8"):
        assert {form, form + "+bias"} <= names


# ---- the reference is the unfused subgraph, on random operands -------------------------------------

@given(st.sampled_from(["int4", "uint4", "int8", "fp8e4m3"]), st.sampled_from([None, 4]),
       st.sampled_from([None, "int8", "uint8", "fp8e4m3"]), st.sampled_from(["per_token", "per_tensor"]),
       st.booleans(), st.integers(0, 2**16))
def test_qlinear_equals_its_unfused_subgraph(w_qdtype, group, a_qdtype, a_gran, bias, seed):
    g = _tiny()
    if not bias:
        g.nodes[0].args = g.nodes[0].args[:2]
    sym = w_qdtype in ("int8", "fp8e4m3", "int4")
    a_sym = a_qdtype != "uint8"
    act = {"a": a_qdtype, "a_gran": a_gran, "a_sym": a_sym} if a_qdtype else {}  # a_* without a= is refused
    InsertQDQ(w=w_qdtype, group=group, sym=sym, **act).run(g)
    x = torch.randn(1, 5, 8, generator=torch.Generator().manual_seed(seed)) * 3
    ref = TorchCompiled(g, precompute_constants=False)(x)
    assert fuse_qlinear(g).rewritten == 1
    q = next(n for n in g.nodes if n.op == "qlinear")
    args = [a.data if hasattr(a, "data") and a is not q.args[0] else a for a in q.args]
    assert torch.equal(qlinear(x, *args[1:], **q.kwargs), ref)


# ---- real model: fusing changes no bit ----------------------------------------------------------

@pytest.fixture(scope="module")
def slice2(smollm2):
    from conftest import sequence_slice

    return sequence_slice(smollm2, 2, 64)


@pytest.mark.parametrize("pipeline, form", [
    ("quantize(w=int4,group=64,sym=false)", "w4a16"),                        # w4a16-g64
    ("quantize(w=int8,a=int8)", "w8a8"),                                    # w8a8's quantize step
    ("quantize(w=fp8e4m3,group=64,a=fp8e4m3,a_group=64)", "fp8"),          # fp8-block
    ("quantize(w=int4,group=64,a=int8)", "w4a8"),                          # w4a8's weights and activations
    # gptq writes its codes through quantize's QDQ writer
    ("gptq(w=int4,group=64,sym=false,calib_n=2,calib_len=32,progress=false)", "w4a16"),
])
def test_fuse_qlinear_is_bit_identical_on_a_real_slice(slice2, pipeline, form):
    graph, ids = slice2
    g = graph.clone()
    PassManager(pipeline).run(g)
    ref = TorchCompiled(g)(ids)
    stats = PassManager("fuse-qlinear").run(g).records[0].stats
    assert stats["by_form"] == {form: 14} and stats["unfused_quantized_linears"] == 0  # 7 linears × 2 layers
    assert not any(n.op in ("dynamic_qparams", "quantize") for n in g.nodes)  # the activation chains are gone
    assert torch.equal(TorchCompiled(g)(ids), ref)


# ---- lowering qlinear: torch reference and ONNX ------------------------------------------------------

LINEAR_32 = """graph main(%x: f32[1,s0,32]) {
  symbol s0 in [2, 64] hint 4
  param @fc.weight: f32[6,32]
  param @fc.bias: f32[6]
  %y: f32[1,s0,6] = linear(%x, @fc.weight, @fc.bias)  # fc
  return %y
}
"""


@pytest.mark.parametrize("pipeline, form, fused_ops", [
    ("quantize(w=int4,group=16,sym=false)", "matmulnbits", {"com.microsoft::MatMulNBits"}),
    ("quantize(w=int8,a=int8)", "ort-default", {"com.microsoft::MatMulIntegerToFloat"}),
    ("quantize(w=int8,a=uint8,a_gran=per_tensor,a_sym=false)", "ort-default",
     {"DynamicQuantizeLinear", "com.microsoft::MatMulIntegerToFloat"}),
    ("quantize(w=fp8e4m3,a=fp8e4m3)", "ort-default", {"QuantizeLinear", "DequantizeLinear", "MatMul"}),
    ("quantize(w=int4,group=16,a=int8)", "matmulnbits", {"QuantizeLinear", "DequantizeLinear", "MatMul"}),
])
def test_qlinear_lowers_to_onnx_kernels_or_its_qdq_reference(pipeline, form, fused_ops):
    """A fused graph lowers qlinear to MatMulNBits / MatMulIntegerToFloat where the options and the form allow,
    else to the QDQ reference; the portable export of a fused graph is standard QDQ, like the unfused one's."""
    from lowbit.backends.onnx import lowered_op_types, to_onnx
    from lowbit.backends.onnxruntime_backend import OrtCompiled

    w = torch.randn(6, 32, generator=torch.Generator().manual_seed(1))
    g = parse_graph(LINEAR_32, {"fc.weight": w, "fc.bias": torch.randn(6)})
    PassManager(pipeline).run(g)
    unfused = g.clone()
    PassManager("fuse-qlinear").run(g)
    assert [n.op for n in g.nodes] == ["qlinear"]
    options = {"ort-default": {}, "matmulnbits": {"weight_format": "matmulnbits"}}[form]
    x = torch.randn(1, 7, 32)
    ref = TorchCompiled(g)(x)
    assert torch.equal(ref, TorchCompiled(unfused)(x))  # the torch backend runs qlinear's reference
    ort = OrtCompiled(g, **options)
    assert fused_ops <= set(lowered_op_types(ort.onnx_model)), lowered_op_types(ort.onnx_model)
    # the same kernels whether the graph came fused or the lowering fused a copy of it
    assert lowered_op_types(OrtCompiled(unfused, **options).onnx_model) == lowered_op_types(ort.onnx_model)
    torch.testing.assert_close(ort(x), ref, rtol=1e-5, atol=1e-4)
    portable = lowered_op_types(to_onnx(g))
    assert not any("::" in op or "Integer" in op for op in portable)
    assert portable == lowered_op_types(to_onnx(unfused))
