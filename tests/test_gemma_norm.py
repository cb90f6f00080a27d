"""Gemma's RMSNorm — ``(normed(x.float()) * (1 + w.float())).type_as(x)``, the gain stored around 0 and applied in
float32 before the cast back — raised to ``rms_norm(offset=1.0, gain_in_compute=True)``, on tiny random Gemma 2 / 3
models whose norm weights are drawn away from 0 (HF initialises them to 0, where every gain is 1 and a wrong
offset would go unseen): capture bit-exact in float32, bfloat16 and float64; fold-norms and SmoothQuant's scale
folding through the offset; the ONNX lowering; a checkpoint that stores the HF form (a folded norm's identity
gain written as 0)."""

from __future__ import annotations

import functools
import re

import pytest
import torch

import lowbit
from lowbit.api import _default_example, describe_source
from lowbit.backends.torch_backend import TorchCompiled
from lowbit.calibration.scale_migration import apply_scale, find_sites
from lowbit.models import CausalLMLogits
from lowbit.passes.manager import PassManager, parse_pipeline
from test_architectures import _decoders, _inputs, _smollm2_tokenizer

FAMILIES = ["gemma2", "gemma3"]


@functools.cache
def _gemma(family: str, dtype: torch.dtype = torch.float32):
    """(model, tokenizer, captured graph, norm count), built once per (family, dtype): tests clone the graph
    before they change it."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_decoders()[family](), dtype=dtype).eval()
    g = torch.Generator().manual_seed(3)
    norms = 0
    with torch.no_grad():
        for m in model.modules():
            if type(m).__name__.endswith("RMSNorm"):
                m.weight.copy_((torch.randn(m.weight.shape, generator=g) * 0.3).to(dtype))
                norms += 1
    wrapped = CausalLMLogits(model).eval()
    tok = _smollm2_tokenizer()
    example, dyn = _default_example(wrapped, tok)
    graph = lowbit.ir.capture(wrapped, example, dyn)  # looked up here: through reuse_captures' cache in a test
    graph.meta["source"] = describe_source(wrapped)
    graph.meta["tokenizer"] = tok
    return wrapped, tok, graph, norms


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_gemma_norms_raise_bit_exactly(family, dtype):
    model, tok, graph, norms = _gemma(family, dtype)
    raised = [n for n in graph.nodes if n.op == "rms_norm"]
    assert len(raised) == norms, "every Gemma RMSNorm (block, q/k and final norms) raised"
    assert all(n.kwargs["offset"] == 1.0 and n.kwargs["gain_in_compute"] for n in raised)
    x = _inputs(family, model, tok)
    with torch.no_grad():
        assert torch.equal(TorchCompiled(graph)(*x), model(*x))


@pytest.mark.parametrize("family", FAMILIES)
def test_fold_norms_folds_gemmas_one_plus_w(family):
    """The pre-norms (attention and MLP inputs, the final norm) fold their ``1 + w`` into the linears; the sandwich
    post-norms (their output is added to the residual) stay, named. Float64 model, but Gemma's norm computes in float32
    even then (HF's ``x.float()``), so the folded product differs from the unfolded one by float32 rounding: <= 1e-6."""
    model, tok, graph, _ = _gemma(family, torch.float64)
    g = graph.clone()
    stats = PassManager(parse_pipeline("fold-norms")).run(g).records[0].stats
    pre = [n for n in graph.nodes if n.op == "rms_norm" and re.search(r"(input_layernorm|pre_feedforward_layernorm|"
                                                                       r"\bnorm)$", n.module)]
    assert stats["folded"] == len(pre) > 0
    assert any("post_attention_layernorm" in r for r in stats["not_folded"])
    folded = [n for n in g.nodes if n.op == "rms_norm" and n.arg(1, "weight") is None]
    assert len(folded) == len(pre) and all(n.kwargs["offset"] == 1.0 for n in folded)
    x = _inputs(family, model, tok)
    with torch.no_grad():
        assert _rel(TorchCompiled(g)(*x), model(*x)) <= 1e-6


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("fold_first", [False, True])
def test_scale_migration_through_a_gemma_norm_is_exact(family, fold_first):
    """Dividing a Gemma norm's gain by ``s`` and multiplying its linears' columns by ``s`` keeps the function,
    on a gained norm (the new weight stores ``(1 + w)/s - 1``) and on a folded one (``1/s - 1``)."""
    model, tok, graph, _ = _gemma(family, torch.float64)
    g = graph.clone()
    if fold_first:
        PassManager(parse_pipeline("fold-norms")).run(g)
    sites = [s for s in find_sites(g, ("norm",)) if s.producer.kwargs.get("offset") == 1.0]
    assert sites
    gen = torch.Generator().manual_seed(5)
    for site in sites:
        apply_scale(g, site, torch.rand(site.channels, generator=gen, dtype=torch.float64) * 3 + 0.25)
    x = _inputs(family, model, tok)
    with torch.no_grad():
        assert _rel(TorchCompiled(g)(*x), model(*x)) <= 1e-6


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gemma_norms_lower_to_onnx(family, dtype, tmp_path):
    """float32: RMSNormalization with the ``1 + w`` scale; float64 (statistics in float32, as Gemma computes
    them): the decomposed chain, the gain applied before the cast back. (ONNX Runtime's CPU kernels have no bf16
    Mul for the embedding's scaling.)"""
    from lowbit.backends.onnxruntime_backend import OrtCompiled

    model, tok, graph, _ = _gemma(family, dtype)
    x = _inputs(family, model, tok)
    path = lowbit.export(graph.clone(), tmp_path / "m.onnx")
    ref = TorchCompiled(graph)(*x)
    assert _rel(OrtCompiled.load(path)(*x), ref) <= 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_folded_gemma_checkpoint_loads_in_transformers(family, tmp_path):
    """fold-norms then W4 (weight-only: transformers runs the same function): the checkpoint keeps Gemma's stored form,
    so transformers rebuilds the graph's function (folded norms written as weight 0, gain 1; the post-norms' own
    ``w``)."""
    from transformers import AutoModelForCausalLM

    model, tok, graph, _ = _gemma(family)
    g = graph.clone()
    PassManager(parse_pipeline("fold-norms,quantize(w=int4,group=16)")).run(g)
    out = lowbit.save(g, tmp_path / "ct", format="compressed-tensors")
    x = _inputs(family, model, tok)
    ref = TorchCompiled(g)(*x)
    hf = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True).eval()
    with torch.no_grad():
        got = hf(*x).logits
    assert _rel(got, ref) <= 1e-5
    folded = [n.module for n in g.nodes if n.op == "rms_norm" and n.arg(1, "weight") is None]
    sd = hf.state_dict()
    assert folded and all(torch.equal(sd[f"{m}.weight"], torch.zeros_like(sd[f"{m}.weight"])) for m in folded)


def test_norm_quant_fusion_declines_gemmas_norm_and_keeps_its_function():
    """``fuse-norm-quant``'s kernel applies the gain Llama's way (after the cast): a Gemma norm read by W8A8
    linears is declined with the reason, and the graph still computes the quantized model."""
    model, tok, graph, _ = _gemma("gemma2")
    g = graph.clone()
    PassManager(parse_pipeline("quantize(w=int8,a=int8),fuse-qlinear")).run(g)
    x = _inputs("gemma2", model, tok)
    before = TorchCompiled(g)(*x)
    stats = PassManager(parse_pipeline("fuse-norm-quant")).run(g).records[0].stats
    assert not any(n.op == "rms_norm_quant" for n in g.nodes)
    assert stats["declined"] and all("Gemma" in why for why in stats["declined"].values())
    assert torch.equal(TorchCompiled(g)(*x), before)


def test_norm_quant_fusion_takes_folded_gemma_norms_with_their_form():
    """After fold-norms a Gemma norm has no weight (gain 1 in either form): it fuses, the fused node keeps the
    norm's ``offset`` / ``gain_in_compute`` (the IR stays valid) and the function is unchanged."""
    model, tok, graph, _ = _gemma("gemma2")
    g = graph.clone()
    PassManager(parse_pipeline("fold-norms,quantize(w=int8,a=int8),fuse-qlinear")).run(g)
    x = _inputs("gemma2", model, tok)
    before = TorchCompiled(g)(*x)
    PassManager(parse_pipeline("fuse-norm-quant")).run(g)
    fused = [n for n in g.nodes if n.op == "rms_norm_quant"]
    assert fused and all(n.kwargs["offset"] == 1.0 and n.arg(1, "weight") is None for n in fused)
    assert torch.equal(TorchCompiled(g)(*x), before)


@pytest.fixture(autouse=True)
def _one_export_per_model(reuse_captures: object) -> None:
    """Every test here captures through the session's capture cache (conftest's ``reuse_captures``): the checkpoint
    tests compile the same random Gemma 2 and 3 the raising tests captured, which were exported again."""
