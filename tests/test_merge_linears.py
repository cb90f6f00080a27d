"""Horizontal fusion (``lowbit.ir.merge``, the ``merge-linears`` pass): same-input, same-scheme linears become
one wider linear and a split. Exact: on a real SmolLM2 slice the merged graph's outputs equal the unmerged
graph's bit for bit on CPU (W4A16, W8A8, FP8). On random schemes at toy widths (N = 4, 8, 12) the CPU GEMM may
order a column's K reduction differently for the wider N, so there the check is to float32 rounding (1e-5 of
the output scale), and the quantized activations/weights the GEMM reads are checked identical."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.backends.torch_backend import TorchCompiled
from lowbit.ir.fusion import fuse_qlinear
from lowbit.ir.merge import MERGE_RULES, SPLIT_OP, merge_horizontal
from lowbit.ir.parser import parse_graph
from lowbit.ir.printer import print_graph
from lowbit.ir.verifier import verify
from lowbit.passes.insert_qdq import InsertQDQ
from lowbit.passes.manager import PassManager


@pytest.fixture(scope="module")
def slice2(smollm2):
    from conftest import sequence_slice

    return sequence_slice(smollm2, 2, 48)


@pytest.mark.parametrize("pipeline", ["quantize(w=int4,group=64,sym=false)", "quantize(w=int8,a=int8)",
                                      "quantize(w=fp8e4m3,group=64,a=fp8e4m3,a_group=64)"],
                         ids=["w4a16", "w8a8", "fp8"])
def test_merge_is_bit_identical_on_a_real_slice_and_round_trips_as_text(slice2, pipeline):
    graph, ids = slice2
    g = graph.clone()
    PassManager(pipeline + ",fuse-qlinear").run(g)
    ref = TorchCompiled(g)(ids)
    bytes_before = g.param_bytes()
    stats = PassManager("merge-linears").run(g).records[0].stats  # verifies the merged IR
    # per layer: q/k/v -> one qlinear [960 = 576 + 192 + 192], gate/up -> one [3072]; o and down stay
    assert stats["by_rule"] == {"qlinear": 4} and stats["nodes_merged"] == {"qlinear": 10}
    assert g.op_counts()["qlinear"] == 8 and g.op_counts()[SPLIT_OP] == 4
    assert g.param_bytes() == bytes_before  # the concatenated constants replace the old ones
    assert torch.equal(TorchCompiled(g)(ids), ref)
    text = print_graph(g)
    assert "# model.layers.0.self_attn | fused q_proj, k_proj, v_proj: " in text
    assert "# model.layers.1.mlp | fused gate_proj, up_proj: " in text
    qkv = next(n for n in g.nodes if n.meta.get("merged") and n.module.endswith("self_attn"))
    assert qkv.args[1].name == "model.layers.0.self_attn.q_proj_k_proj_v_proj.weight.qdata"
    assert qkv.args[1].is_param and qkv.output.tensor_type.shape[-1] == 960
    again = parse_graph(text, {k: v.data for k, v in g.params.items()})
    verify(again)
    assert print_graph(again) == text


def test_merge_declines_different_schemes_and_inputs(slice2):
    """Only q/k/v of layer 0 share int4 g64; layer 0's gate/up are quantized differently (int8 vs int4): they stay
    apart, as do linears reading different inputs."""
    graph, ids = slice2
    g = graph.clone()
    PassManager(r"quantize(w=int4,group=64,modules=self_attn),quantize(w=int8,modules=gate_proj),"
                r"quantize(w=int4,group=64,modules=up_proj|down_proj),fuse-qlinear").run(g)
    ref = TorchCompiled(g)(ids)
    st_ = merge_horizontal(g)
    assert st_.merged == {"qlinear": 2} and st_.nodes == {"qlinear": 6}  # q/k/v of each layer only
    assert torch.equal(TorchCompiled(g)(ids), ref)


def test_merge_table_rows():
    assert [(r.name, r.op) for r in MERGE_RULES] == [("qlinear", "qlinear"), ("linear", "linear")]


THREE = """graph main(%x: f32[1,s0,16]) {
  symbol s0 in [2, 64] hint 4
  param @a.weight: f32[8,16]
  param @a.bias: f32[8]
  param @b.weight: f32[4,16]
  param @b.bias: f32[4]
  param @c.weight: f32[12,16]
  param @c.bias: f32[12]
  %ya: f32[1,s0,8] = linear(%x, @a.weight, @a.bias)  # a
  %yb: f32[1,s0,4] = linear(%x, @b.weight, @b.bias)  # b
  %yc: f32[1,s0,12] = linear(%x, @c.weight, @c.bias)  # c
  %s: f32[1,s0,8] = aten.add.Tensor(%ya, %ya)
  return %s, %yb, %yc
}
"""


@settings(max_examples=25, deadline=None)
@given(st.sampled_from(["int4", "uint4", "int8", "fp8e4m3"]), st.sampled_from([None, 4, 8]),
       st.sampled_from([None, "int8", "fp8e4m3"]), st.sampled_from(["per_token", "per_tensor"]),
       st.integers(0, 2**16))
def test_merged_qlinear_equals_the_unmerged_ones(w_qdtype, group, a_qdtype, a_gran, seed):
    gen = torch.Generator().manual_seed(seed)
    params = {f"{m}.{p}": torch.randn(n, 16, generator=gen) if p == "weight" else torch.randn(n, generator=gen)
              for m, n in (("a", 8), ("b", 4), ("c", 12)) for p in ("weight", "bias")}
    g = parse_graph(THREE, params)
    act = {"a": a_qdtype, "a_gran": a_gran} if a_qdtype else {}  # a_gran without a= is refused
    InsertQDQ(w=w_qdtype, group=group, sym=w_qdtype != "uint4", **act).run(g)
    fuse_qlinear(g)
    x = torch.randn(1, 5, 16, generator=gen) * 3
    ref = TorchCompiled(g, precompute_constants=False)(x)
    assert merge_horizontal(g).nodes == {"qlinear": 3}
    verify(g)
    out = TorchCompiled(g, precompute_constants=False)(x)
    for a, b in zip(out, ref, strict=True):
        assert (a - b).abs().max().item() <= 1e-5 * max(1.0, b.abs().max().item())


def test_float_linears_merge_too():
    gen = torch.Generator().manual_seed(0)
    params = {f"{m}.{p}": torch.randn(n, 16, generator=gen) if p == "weight" else torch.randn(n, generator=gen)
              for m, n in (("a", 8), ("b", 4), ("c", 12)) for p in ("weight", "bias")}
    g = parse_graph(THREE, params)
    x = torch.randn(1, 5, 16, generator=gen)
    ref = TorchCompiled(g)(x)
    stats = PassManager("merge-linears").run(g).records[0].stats
    assert stats["nodes_merged"] == {"linear": 3} and stats["params_removed"] == 6
    assert "linear(%x, @a_b_c.weight, @a_b_c.bias)  #  | fused a, b, c" in print_graph(g)
    for a, b in zip(TorchCompiled(g)(x), ref, strict=True):  # toy widths: to float32 rounding (module doc)
        assert (a - b).abs().max().item() <= 1e-5 * max(1.0, b.abs().max().item())


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_pipeline_running_a_backend_pass_itself_compiles(backend):
    """The backend appends its passes (fuse-qlinear for ONNX Runtime) only where the pipeline lacks them: a user
    pipeline with fuse-qlinear then merge-linears got a second fuse-qlinear after merge-linears and was refused
    whatever the user wrote. It compiles now, with merge-linears in the report, and matches the torch reference."""
    from conftest import tiny_llama

    import lowbit

    torch.manual_seed(0)
    model = tiny_llama(hidden=64, inter=128, heads=4, kv_heads=2, vocab=97, max_positions=64)
    ids = torch.randint(0, 97, (1, 12))
    pipe = "quantize(w=int8,a=int8),fuse-qlinear,merge-linears"
    compiled = lowbit.compile_model(model, (ids,), pipeline=pipe, backend=backend)
    names = [r.name for r in compiled.report.pipeline.records]
    assert names.count("fuse-qlinear") == 1 and "merge-linears" in names
    ref = lowbit.compile_model(model, (ids,), pipeline=pipe, backend="torch")
    assert (compiled(ids) - ref(ids)).abs().max().item() <= 1e-4 * ref(ids).abs().max().item()


@pytest.fixture(autouse=True)
def _one_export_per_model(reuse_captures: object) -> None:
    """Every test here captures through the session's capture cache (conftest's ``reuse_captures``): a backend test
    compiles the same tiny Llama again as its torch reference, which was exported again."""


EXPERTS = """graph main(%x: f32[s0,16]) {
  symbol s0 in [2, 64] hint 4
  param @m.experts.expert_0.gate_proj.weight: f32[8,16]
  param @m.experts.expert_0.up_proj.weight: f32[8,16]
  param @m.experts.expert_1.gate_proj.weight: f32[8,16]
  param @m.experts.expert_1.up_proj.weight: f32[8,16]
  param @m.gate.weight: f32[2,16]
  %g0: f32[s0,8] = linear(%x, @m.experts.expert_0.gate_proj.weight)  # m.experts.expert_0.gate_proj
  %u0: f32[s0,8] = linear(%x, @m.experts.expert_0.up_proj.weight)  # m.experts.expert_0.up_proj
  %g1: f32[s0,8] = linear(%x, @m.experts.expert_1.gate_proj.weight)  # m.experts.expert_1.gate_proj
  %u1: f32[s0,8] = linear(%x, @m.experts.expert_1.up_proj.weight)  # m.experts.expert_1.up_proj
  %r: f32[s0,2] = linear(%x, @m.gate.weight)  # m.gate
  %h0: f32[s0,8] = aten.mul.Tensor(%g0, %u0)
  %h1: f32[s0,8] = aten.mul.Tensor(%g1, %u1)
  return %h0, %h1, %r
}
"""
"""Two experts' gate and up and a router, all reading one input (``DenseExperts``' shape, ``lowbit.models``)."""

PER_EXPERT = """\
  %g0_merged: f32[s0,16] = linear(%x, @m.experts.expert_0.gate_proj_up_proj.weight)  # m.experts.expert_0 | \
fused gate_proj, up_proj | merged ["m.experts.expert_0.gate_proj", "m.experts.expert_0.up_proj"]
  %g0_split: f32[s0,8], %g0_split_1: f32[s0,8] = aten.split_with_sizes.default(%g0_merged, [8, 8], -1)  # \
m.experts.expert_0
  %g1_merged: f32[s0,16] = linear(%x, @m.experts.expert_1.gate_proj_up_proj.weight)  # m.experts.expert_1 | \
fused gate_proj, up_proj | merged ["m.experts.expert_1.gate_proj", "m.experts.expert_1.up_proj"]
  %g1_split: f32[s0,8], %g1_split_1: f32[s0,8] = aten.split_with_sizes.default(%g1_merged, [8, 8], -1)  # \
m.experts.expert_1
  %r: f32[s0,2] = linear(%x, @m.gate.weight)  # m.gate
"""


def test_merge_partition_keeps_experts_apart_and_separate_experts_splits_a_merge_across_them():
    """``merge_horizontal`` merges all four expert linears and the router into one (what the Triton backend's dense
    form runs); with ``partition=expert_partition`` each expert merges only its own gate and up and the router stays
    alone (golden text), and ``separate_experts`` (``unmerge_horizontal(accept=...)`` of the merge spanning experts,
    then a partitioned merge) gives the same linears from the merged graph; the outputs stay the unmerged graph's
    (to float32 rounding at these toy widths: module doc)."""
    from lowbit.backends.routed_experts import expert_partition, separate_experts
    from lowbit.ir.rewrite import eliminate_dead_code

    gen = torch.Generator().manual_seed(0)
    params = {f"m.experts.expert_{e}.{p}_proj.weight": torch.randn(8, 16, generator=gen)
              for e in range(2) for p in ("gate", "up")}
    params["m.gate.weight"] = torch.randn(2, 16, generator=gen)
    x = torch.randn(5, 16, generator=gen)
    reference = TorchCompiled(parse_graph(EXPERTS, params))(x)

    partitioned = parse_graph(EXPERTS, params)
    assert merge_horizontal(partitioned, partition=expert_partition).nodes == {"linear": 4}
    eliminate_dead_code(partitioned)
    assert PER_EXPERT in print_graph(partitioned)

    merged = parse_graph(EXPERTS, params)
    assert merge_horizontal(merged).nodes == {"linear": 5}
    eliminate_dead_code(merged)
    assert separate_experts(merged) == 1
    eliminate_dead_code(merged)
    verify(merged)
    linears = [n for n in merged.nodes if n.op == "linear"]
    assert [(n.module, n.meta.get("merged")) for n in linears] == [
        (n.module, n.meta.get("merged")) for n in partitioned.nodes if n.op == "linear"]
    for graph in (partitioned, merged):
        for a, b in zip(TorchCompiled(graph)(x), reference, strict=True):
            assert (a - b).abs().max().item() <= 1e-5 * max(1.0, b.abs().max().item())
