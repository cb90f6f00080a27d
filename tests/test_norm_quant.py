"""RMSNorm → activation-quantize fusion (``lowbit.ir.normquant``, the ``fuse-norm-quant`` pass) and its Triton
kernel (``lowbit.kernels.norm_quant``, run by the interpreter on CPU).

The IR rewrite is exact (both new ops' references are the replaced ops in order): checked bit for bit on a real
SmolLM2 slice for W8A8, FP8 (64-blocks) and W4A8. The kernel against its reference: with fp32 statistics (HF
Llama's ``compute_dtype=f32``) the codes may differ only where the row's sum of squares, reduced in another
order, moves a normed value across a rounding boundary: |Δcode| ≤ 1 on at most 1% of entries and scales within
2⁻⁸ relative (one bf16 ulp of the row absmax); with statistics in bf16/fp16 (every op rounded) the dequantized
values agree to 3% relative norm.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.backends.torch_backend import TorchCompiled
from lowbit.ir.normquant import NORM_QUANT_RULES, fuse_norm_quant
from lowbit.ir.parser import parse_graph
from lowbit.ir.printer import print_graph
from lowbit.passes.manager import PassManager

triton = pytest.importorskip("triton", reason="lowbit's kernels need triton")
INTERP = os.environ.get("TRITON_INTERPRET") == "1"
needs_kernels = pytest.mark.skipif(not (INTERP or torch.cuda.is_available()), reason="needs CUDA or the interpreter")
DEV = "cuda" if torch.cuda.is_available() and not INTERP else "cpu"
"""Where the kernel tests' tensors live: the GPU where there is one (Triton cannot read host memory there)."""


@pytest.fixture(scope="module")
def slice2(smollm2):
    from conftest import sequence_slice

    return sequence_slice(smollm2, 2, 40)


@pytest.mark.parametrize("pipeline, rule", [
    ("quantize(w=int8,a=int8)", "rms_norm+int8"),
    ("quantize(w=fp8e4m3,group=64,a=fp8e4m3,a_group=64)", "rms_norm+fp8"),
    ("quantize(w=int4,group=64,a=int8)", "rms_norm+int8"),
], ids=["w8a8", "fp8-block", "w4a8"])
def test_norm_quant_is_bit_identical_on_a_real_slice(slice2, pipeline, rule):
    graph, ids = slice2
    g = graph.clone()
    PassManager(pipeline + ",fuse-qlinear").run(g)
    ref = TorchCompiled(g)(ids)
    # without the merge: q, k, v (and gate, up) read one norm's codes
    unmerged = g.clone()
    st_ = PassManager("fuse-norm-quant").run(unmerged).records[0].stats
    assert st_["by_rule"] == {rule: 4} and st_["readers"] == {rule: 10} and not st_["declined"]
    assert torch.equal(TorchCompiled(unmerged)(ids), ref)
    # after the merge (the triton backend's order): one reader per norm
    st_ = PassManager("merge-linears,fuse-norm-quant").run(g).records[1].stats
    assert st_["by_rule"] == {rule: 4} and st_["readers"] == {rule: 4}
    assert g.op_counts()["rms_norm_quant"] == 4 and g.op_counts()["qlinear_q"] == 4
    assert g.op_counts()["rms_norm"] == 1  # the final norm feeds the float lm_head
    assert torch.equal(TorchCompiled(g)(ids), ref)
    text = print_graph(g)
    assert "# model.layers.0.input_layernorm | fused rms_norm+dynamic_qparams+quantize" in text
    assert "| fused quantized input: q_proj, k_proj, v_proj: " in text
    again = parse_graph(text, {k: v.data for k, v in g.params.items()})
    assert print_graph(again) == text and torch.equal(TorchCompiled(again)(ids), ref)


def test_norm_quant_declines_weight_only_and_mixed_readers(slice2):
    graph, _ = slice2
    g = graph.clone()
    PassManager("quantize(w=int4,group=64),fuse-qlinear").run(g)
    assert fuse_norm_quant(g).total == 0  # weight-only readers: nothing to quantize
    g = graph.clone()  # layer 0's q_proj quantizes its input per tensor: that norm keeps its form, and says why
    PassManager(r"quantize(w=int8,a=int8,a_gran=per_tensor,modules=layers\.0\.self_attn\.q_proj),"
                r"quantize(w=int8,a=int8,modules=^(?!.*layers\.0\.self_attn\.q_proj)),fuse-qlinear").run(g)
    st_ = fuse_norm_quant(g)
    assert st_.total == 3 and list(st_.declined) == ["rms_norm"] and "per_tensor" in st_.declined["rms_norm"]


def test_norm_quant_table_rows():
    assert [(r.name, r.norm, r.fused, r.a_qdtypes) for r in NORM_QUANT_RULES] == [
        ("rms_norm+int8", "rms_norm", "rms_norm_quant", ("int8",)),
        ("rms_norm+fp8", "rms_norm", "rms_norm_quant", ("fp8e4m3",))]


# ---- the kernel against its reference ------------------------------------------------------------

@needs_kernels
@settings(max_examples=30, deadline=None)
@given(st.sampled_from([torch.bfloat16, torch.float16, torch.float32]), st.sampled_from(["int8", "fp8e4m3"]),
       st.sampled_from([0, 32, 64]), st.booleans(), st.booleans(), st.integers(1, 6),
       st.sampled_from([64, 192, 320]), st.integers(0, 2**16))
def test_rms_norm_quant_kernel_matches_its_reference(dtype, qdtype, group, compute_f32, weight, m, k, seed):
    from lowbit.kernels.norm_quant import rms_norm_quant_ref

    gen = torch.Generator().manual_seed(seed)
    dev = "cuda" if torch.cuda.is_available() and not INTERP else "cpu"
    x = (torch.randn(2, m, k, generator=gen) * 3).to(dtype).to(dev)
    w = (torch.rand(k, generator=gen) + 0.5).to(dtype).to(dev) if weight else None
    q, s = torch.ops.lowbit.rms_norm_quant(x, w, 1e-5, compute_f32, qdtype, group)
    qr, sr = rms_norm_quant_ref(x, w, 1e-5, compute_f32, qdtype, group)
    assert q.dtype == qr.dtype and q.shape == qr.shape and s.shape == sr.shape and s.dtype == torch.float32
    deq, deq_r = _deq(q, s, group), _deq(qr, sr, group)
    if compute_f32 or dtype == torch.float32:
        assert ((s - sr).abs() <= sr * 2**-8).all()
        if qdtype == "int8":
            d = (q.int() - qr.int()).abs()
            assert d.max().item() <= 1 and (d > 0).float().mean().item() <= 0.01
        else:
            assert (q.float() != qr.float()).float().mean().item() <= 0.01
    assert ((deq - deq_r).norm() / deq_r.norm()).item() <= 3e-2


@needs_kernels
@settings(max_examples=20, deadline=None)
@given(st.sampled_from([torch.bfloat16, torch.float16]), st.integers(1, 5), st.integers(1, 9),
       st.sampled_from([64, 576, 1000]), st.integers(0, 2**16))
def test_norm_from_parts_kernel_matches_its_reference(dtype, m, nq, k, seed):
    """``norm_from_parts`` (a prefill's split RMSNorm second half, one launch) against ``norm_from_parts_ref``:
    ``nq`` partial sums of squares a row, ragged widths, rows of both dtypes; at most one dtype step apart (the
    device's rsqrt against torch's), and bit for bit on nearly every element; an fp32 row is refused by name."""
    from lowbit.kernels._common import norm_from_parts_ref, norm_parts_ref
    from lowbit.kernels.norm_quant import norm_from_parts

    gen = torch.Generator().manual_seed(seed)
    dev = "cuda" if torch.cuda.is_available() and not INTERP else "cpu"
    stream = (torch.randn(2, m, k, generator=gen) * 3).to(dtype).to(dev)
    gain = (torch.rand(k, generator=gen) + 0.5).to(dtype).to(dev)
    gained, sumsq = norm_parts_ref(stream, gain)
    parts = sumsq * torch.rand(2, m, nq, generator=gen).to(dev).softmax(-1)  # the sum split into nq partials
    got, ref = norm_from_parts(gained, parts, 1e-5), norm_from_parts_ref(gained, parts, 1e-5)
    assert got.dtype == ref.dtype and got.shape == ref.shape
    step = torch.finfo(dtype).eps * ref.float().abs()
    assert ((got.float() - ref.float()).abs() <= step).all()
    assert (got != ref).float().mean().item() <= 0.01
    with pytest.raises(ValueError, match="norm_from_parts"):
        norm_from_parts(gained.float(), parts, 1e-5)


_AOT_PREFILL_NORM = """
import json
import torch
from lowbit.kernels import norm_quant
from sm90_ptx import ptx_ops, record_launches

seen = record_launches([norm_quant])
x = torch.randn(5, 576).to(torch.bfloat16)
norm_quant.add_norm_parts(x, x, torch.ones(576).to(torch.bfloat16))
norm_quant.norm_from_parts(x.half(), torch.ones(5, 3), 1e-5)
print(json.dumps([ptx_ops(*launch)["kernel"] for launch in seen]))
"""


def test_prefill_norm_kernels_compile_for_sm90():
    """The prefill's split-norm kernels (``add_norm_parts``, ``norm_from_parts``: bf16 / fp16 rows of SmolLM2's
    576, three partial sums) build for sm_90 through Triton's bundled ptxas, no device (``sm90_ptx``): the
    interpreter takes constructs the GPU compiler refuses."""
    import sm90_ptx

    assert sm90_ptx.run(_AOT_PREFILL_NORM) == ["_add_norm_parts_kernel", "_norm_from_parts_kernel"]


def _deq(q: torch.Tensor, s: torch.Tensor, group: int) -> torch.Tensor:
    k = q.shape[-1]
    return (q.float().reshape(*q.shape[:-1], -1, group or k) * s.unsqueeze(-1)).reshape(q.shape)


@needs_kernels
@pytest.mark.parametrize("w_qdtype, a_qdtype, w_group, a_group", [("int8", "int8", 0, 0), ("int4", "int8", 64, 0),
                                                                  ("fp8e4m3", "fp8e4m3", 64, 64)])
def test_a8_linear_q_on_codes_equals_a8_linear(w_qdtype, a_qdtype, w_group, a_group):
    """The GEMM half on pre-quantized codes is the very GEMM ``a8_linear`` runs after its own quantization."""
    from lowbit.ir.quant import dynamic_qparams, quantize
    from lowbit.kernels.act_quant import quantize_activation

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 128, generator=gen).to(torch.bfloat16).to(DEV)
    w = torch.randn(48, 128, generator=gen).to(DEV)
    bs = w_group or 128
    sw, zw = dynamic_qparams(w, qdtype=w_qdtype, granularity="per_token", symmetric=True, axis=-1, block_size=bs)
    qw = quantize(w, sw, None, qdtype=w_qdtype, axis=-1, block_size=bs)
    sw = sw if w_group else sw.reshape(-1)
    bias = torch.randn(48, generator=gen).to(torch.bfloat16).to(DEV)
    y = torch.ops.lowbit.a8_linear(x, qw, sw, None, bias, w_qdtype, w_group, a_qdtype, a_group)
    xq, xs = quantize_activation(x, a_qdtype, a_group)
    yq = torch.ops.lowbit.a8_linear_q(xq.reshape(5, 128), xs, qw, sw, None, bias, w_qdtype, w_group, a_group,
                                      torch.bfloat16)
    assert yq.dtype == torch.bfloat16 and torch.equal(y, yq)


@needs_kernels
def test_triton_backend_runs_the_fused_norm_like_the_torch_backend(smollm2, a8_quantizes_in_gemv):
    """W8A8 through ``backend="triton"`` under the interpreter: merged q/k/v and gate/up, each norm fused with the
    quantization (the gate/up's ``a8_linear_q`` with the gated MLP's silu*up in its store), o_proj and down_proj
    with the residual add in theirs (``+add``; 6 rows: on the one-launch ``a8_gemv``), the block's second norm split
    around the GEMVs (o_proj writes its first half, ``+add+norm``; gate/up norms and quantizes, ``+norm``:
    ``_fuse_norm_quant_a8``), logits equal the torch backend's on the same quantized graph within
    test_triton_backend's tolerance (2e-2 relative; every argmax)."""
    from conftest import sequence_slice

    from lowbit.api import compile_graph, plan_compile
    from lowbit.passes.manager import parse_pipeline

    g, ids = sequence_slice(smollm2, 1, 6, torch.bfloat16)
    PassManager("quantize(w=int8,a=int8)").run(g)
    ref = TorchCompiled(g)(ids).float()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    runner, report = compile_graph(g, plan_compile(parse_pipeline("dce"), "triton", {"compile": False}), device=dev)
    assert [r.name for r in report.pipeline.records] == ["dce", "fuse-qlinear", "merge-linears", "fuse-norm-quant"]
    assert len(runner.report["norm_quant"]) == 2 and len(runner.report["merged"]) == 2
    forms = sorted(runner.report["kernels"].values())  # the merged gate/up reads the fused norm, its silu*up fused
    assert forms == ["w8a8", "w8a8+add", "w8a8+add+norm", "w8a8+silu*up+norm"]
    assert not runner.report["fallback"]
    assert "rms_norm + activation quantize fused: 2 norms" in runner.report_text()
    y = runner(ids).float().cpu()
    assert ((y - ref).norm() / ref.norm()).item() <= 2e-2 and torch.equal(y.argmax(-1), ref.argmax(-1))


NORM_LINEAR = """graph g(%x: {dt}[2,3,96]) {{
  param @ln.weight: {dt}[96]
  param @fc.weight: {dt}[40,96]
  %n: {dt}[2,3,96] = rms_norm(%x, @ln.weight, eps=1e-06, compute_dtype=f32)  # ln
  %y: {dt}[2,3,40] = linear(%n, @fc.weight)  # fc
  return %y
}}"""


@needs_kernels
@pytest.mark.parametrize("dt, a_group, why", [
    ("bf16", 32, None),
    ("bf16", 48, "activation group 48 (needs a power of two)"),
    ("f32", 32, "input torch.float32: the kernel takes bf16/fp16"),
])
def test_triton_report_lists_a_fused_norm_the_kernel_does_not_take_as_a_fallback(dt, a_group, why):
    """An ``rms_norm_quant`` the kernel cannot run (a group that is not a power of two, float32 activations) keeps
    its reference op and the report lists it with the reason; it was counted under "rms_norm + activation quantize
    fused" and then ran the reference at every call. The norm reads a graph input here (its row length comes from
    the input's type)."""
    from lowbit.backends.triton_backend import lower

    dtype = {"bf16": torch.bfloat16, "f32": torch.float32}[dt]
    g = parse_graph(NORM_LINEAR.format(dt=dt), {"ln.weight": (torch.rand(96) + 0.5).to(dtype),
                                                "fc.weight": torch.randn(40, 96).to(dtype)})
    PassManager(f"quantize(w=int8,a=int8,a_group={a_group})").run(g)
    m = lower(g, DEV, compile=False)
    text = m.report_text()
    if why is None:  # (the kernel's numbers: test_triton_backend_runs_the_fused_norm_like_the_torch_backend)
        assert list(m.report["norm_quant"]) == ["n_q"] and not m.report["fallback"]
        assert "rms_norm + activation quantize fused: 1 norms" in text
        return
    assert not m.report["norm_quant"] and m.report["fallback"]["n_q"] == f"rms-norm-quant: {why}"
    assert "fused" not in text and f"reference: %n_q: rms-norm-quant: {why}" in text
    x = torch.randn(2, 3, 96).to(dtype).to(DEV)
    ref = TorchCompiled(g)(x.cpu()).float()
    assert ((m(x).float().cpu() - ref).norm() / ref.norm()).item() <= 2e-2
