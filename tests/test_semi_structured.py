"""2:4 lowering: detection of the pattern on real SmolLM2 weights, the reasons a 2:4 weight stays dense (never
silent), the CPU compile's report, and on CUDA the semi-structured sparse path against the dense result."""

from __future__ import annotations

import pytest
import torch
from conftest import smollm2_slice

from lowbit.backends.semi_structured import check_2to4, is_2to4, plan_weight
from lowbit.backends.torch_backend import TorchCompiled
from lowbit.calibration.sparsity import parse_pattern, prune_mask
from lowbit.ir.capture import capture
from lowbit.passes.manager import PassManager

BLOCK_LINEARS = 7  # q, k, v, o, gate, up, down per SmolLM2 block


@pytest.fixture(scope="module")
def q_weight(smollm2) -> torch.Tensor:
    return smollm2[0].model.layers[0].self_attn.q_proj.weight.detach().clone()  # [576, 576]


def _pruned(w: torch.Tensor) -> torch.Tensor:
    w = w.clone()
    w[prune_mask(w.abs(), parse_pattern("2:4", 0.5))] = 0
    return w


def test_detection_on_real_weights(q_weight):
    assert not is_2to4(q_weight)
    why = check_2to4(q_weight)
    assert why is not None and "groups of 4 along K hold more than 2 nonzeros (up to 4)" in why
    sparse = _pruned(q_weight)
    assert is_2to4(sparse) and is_2to4(sparse.bfloat16())
    assert is_2to4(torch.zeros(8, 16))  # fewer than 2 nonzeros per group is still 2:4
    # one extra nonzero in one group breaks it, and the reason counts that group
    broken = sparse.clone()
    row = broken[3, 40:44]
    row[row == 0] = 1.0
    assert check_2to4(broken) == f"1 of {576 * 144} groups of 4 along K hold more than 2 nonzeros (up to 4)"
    # K not a multiple of 4 (odd K), and a weight that is not a matrix
    assert check_2to4(sparse[:, :575]) == "K=575 is not a multiple of 4"
    assert check_2to4(sparse[0]) == "weight is 1-D, not [N, K]"


def test_plan_names_device_dtype_and_shape(q_weight):
    w = _pruned(q_weight)
    if not torch.cuda.is_available():
        assert plan_weight(w.bfloat16(), "cpu") == (None, "no CUDA")
    # device, dtype and shape are checked without touching a GPU
    assert plan_weight(w, "cuda") == (None, "dtype float32 (semi-structured takes fp16/bf16)")
    assert plan_weight(w.half(), "cuda", library="cutlass") == ("cutlass", "")
    assert plan_weight(w[:48, :72].bfloat16().contiguous(), "cuda", library="cutlass") == (
        None, "shape [N=48, K=72] (cutlass needs N a multiple of 32 and K of 64)")
    lib, why = plan_weight(w[:48, :80].bfloat16().contiguous(), "cuda", library="cutlass")
    assert lib is None and "N=48" in why


@pytest.fixture(scope="module")
def sparse_slice(smollm2):
    """A 2-layer real SmolLM2 slice with magnitude 2:4 on its block linears, and WikiText-2-free input ids."""
    g = capture(smollm2_slice(smollm2[0], 2), (torch.ones(1, 16, dtype=torch.long),),
                {"input_ids": {1: torch.export.Dim.DYNAMIC(min=2, max=512)}})
    dense = g.clone()
    PassManager("sparsify(method=magnitude,pattern=2:4)").run(g)
    return dense, g


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU report")
def test_cpu_compile_reports_dense_no_cuda(sparse_slice):
    dense, g = sparse_slice
    ids = torch.randint(0, 49152, (1, 24))
    runner = TorchCompiled(g, semi_structured=True)
    rep = runner.sparse_report
    assert rep["semi_structured"] == {}
    assert len(rep["dense"]) == 2 * BLOCK_LINEARS and set(rep["dense"].values()) == {"no CUDA"}
    text = runner.report_text()
    assert text.startswith("2:4 linears: 0 semi-structured sparse, 14 kept dense") and "no CUDA" in text
    # each named by its module path (it was the FX node, "%linear_12", which told a user nothing)
    assert sorted(rep["dense"]) == sorted(f"model.layers.{i}.{m}" for i in range(2) for m in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
        "mlp.down_proj"))
    assert "  dense: model.layers.1.mlp.down_proj: no CUDA" in text.splitlines()
    # the float graph has no 2:4 weight: nothing to report; turning the option off is named as the reason
    assert TorchCompiled(dense, semi_structured=True).sparse_report == {"semi_structured": {}, "dense": {}}
    off = TorchCompiled(g)  # the default: off (slower than dense on the H200)
    assert set(off.sparse_report["dense"].values()) == {"semi_structured=false"}
    torch.testing.assert_close(runner(ids), off(ids), rtol=0, atol=0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU report")
def test_compile_graph_report_and_triton_interpreter_name_the_dense_2to4_nodes(sparse_slice, monkeypatch):
    from lowbit.api import compile_graph, plan_compile
    from lowbit.backends.triton_backend import lower as triton_lower

    _, g = sparse_slice
    _, report = compile_graph(g.clone(), plan_compile([], "torch", {"semi_structured": True}), verify=False)
    assert report.lowering[0] == "2:4 linears: 0 semi-structured sparse, 14 kept dense"
    assert sum("no CUDA" in line for line in report.lowering) == 14 and "no CUDA" in report.summary()
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    tr = triton_lower(g, "cpu", compile=False, semi_structured=True)
    # the triton backend merges q/k/v and gate/up first (merge-linears): 14 linears become 8, all named
    dense = tr.sparse_report["dense"]
    assert set(dense.values()) == {"no CUDA"} and len(dense) == 14 - 6
    assert f"{len(dense)} kept dense" in tr.report_text()
    # a merged linear is named by its members' module paths
    assert {"model.layers.0.self_attn.q_proj+k_proj+v_proj", "model.layers.0.mlp.gate_proj+up_proj",
            "model.layers.0.mlp.down_proj"} <= set(dense), dense


@pytest.mark.gpu
@pytest.mark.parametrize("library", ["auto", pytest.param("cutlass", marks=pytest.mark.skipif(
    torch.cuda.is_available() and torch.cuda.get_device_capability()[0] != 8, reason="CUTLASS 2:4 needs sm_8x"))])
def test_semi_structured_equals_dense_on_cuda_bf16(smollm2, library):
    g = capture(smollm2_slice(smollm2[0], 2, torch.bfloat16), (torch.ones(1, 16, dtype=torch.long),),
                {"input_ids": {1: torch.export.Dim.DYNAMIC(min=2, max=512)}})
    PassManager("sparsify(method=magnitude,pattern=2:4)").run(g)
    ids = torch.randint(0, 49152, (1, 128), device="cuda")  # the capture's batch is static (1)
    sparse = TorchCompiled(g, "cuda", semi_structured=True, sparse_library=library)
    assert len(sparse.sparse_report["semi_structured"]) == 2 * BLOCK_LINEARS, sparse.report_text()
    dense = TorchCompiled(g, "cuda", semi_structured=False)
    a, b = sparse(ids).float(), dense(ids).float()
    assert float((a - b).pow(2).mean() / b.pow(2).mean()) < 1e-3
    assert float((a.argmax(-1) == b.argmax(-1)).float().mean()) > 0.9


@pytest.mark.gpu
def test_triton_backend_runs_2to4_semi_structured_under_compile(smollm2):
    from lowbit.backends.triton_backend import lower as triton_lower

    g = capture(smollm2_slice(smollm2[0], 2, torch.bfloat16), (torch.ones(1, 16, dtype=torch.long),),
                {"input_ids": {1: torch.export.Dim.DYNAMIC(min=2, max=512)}})
    PassManager("sparsify(method=magnitude,pattern=2:4)").run(g)
    ids = torch.randint(0, 49152, (1, 64), device="cuda")
    runner = triton_lower(g, "cuda", semi_structured=True)  # torch.compile over the semi-structured buffers
    # merge-linears first: per block q/k/v -> 1 and gate/up -> 1, so 7 linears become 4
    assert len(runner.sparse_report["semi_structured"]) == 2 * (BLOCK_LINEARS - 3), runner.report_text()
    a = runner(ids).float()
    b = TorchCompiled(g, "cuda", semi_structured=False)(ids).float()
    assert float((a - b).pow(2).mean() / b.pow(2).mean()) < 1e-3


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU report")
def test_a_quantized_2to4_model_keeps_its_sparsity_report(sparse_slice, monkeypatch):
    """sparsify(2:4) then quantize: fuse-qlinear (and merge-linears) dropped ``meta["sparsity"]``, so the triton
    backend's report said nothing of the 14 pruned linears; each is now named with why it stays dense."""
    from lowbit.backends.triton_backend import lower as triton_lower

    _, g = sparse_slice
    q = g.clone()
    PassManager("quantize(w=int8),fuse-qlinear").run(q)
    assert sum(n.meta.get("sparsity") == "2:4" for n in q.nodes if n.op == "qlinear") == 2 * BLOCK_LINEARS
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    tr = triton_lower(q, "cpu", compile=False, semi_structured=True)
    dense = tr.sparse_report["dense"]
    # q/k/v and gate/up merged (merge-linears): 14 linears are 8 nodes, every one still marked 2:4
    assert len(dense) == 14 - 6 and all(why.startswith("weight is quantized") for why in dense.values()), dense
    assert "2:4 linears: 0 semi-structured sparse, 8 kept dense" in tr.report_text()
    # the torch backend on the packed form says why too (it said only "weight is not a stored parameter")
    packed = TorchCompiled(q, semi_structured=True, keep_packed=True).sparse_report["dense"]
    assert len(packed) == 2 * BLOCK_LINEARS and all("quantized" in why for why in packed.values()), packed
