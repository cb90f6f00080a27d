"""Mixture-of-experts generation steps beyond ``tests/test_moe.py``: GraniteMoE's step (its experts in
``block_sparse_moe``, Granite's multipliers), a quantized Mixtral step through lowbit's save/load, ONNX Runtime and
the Triton backend, and checkpoints whose experts are part float, part quantized. Tiny random models of
``test_moe``'s shape (2 layers, hidden 64, 4 experts, top-2, vocabulary 128)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

import lowbit
from lowbit.checkpoint import CheckpointError

from test_moe import (
    _COMMON,
    EXPERT_LINEAR,
    GEN_PROMPTS,
    KV8,
    N_EXPERTS,
    N_LAYERS,
    _dequantized_weights,
    _ids,
    _sharp_tiny,
    _tiny,
)

transformers = pytest.importorskip("transformers")
from conftest import needs_fused_experts  # noqa: E402

pytestmark = needs_fused_experts()

W4A16 = "quantize(w=int4,group=32)"
GRANITE_MULTIPLIERS: dict[str, float] = dict(embedding_multiplier=12.0, residual_multiplier=0.22,
                                             attention_multiplier=0.0625, logits_scaling=8.0)
"""Granite 3's sizes of its multipliers (as ``test_architectures``' dense Granite): GraniteMoE's config defaults are
all 1.0, which a step that ignored them would pass."""


@pytest.fixture(autouse=True)
def _one_export_per_model(reuse_captures: object) -> None:
    """Every capture here goes through the session's capture cache (conftest's ``reuse_captures``)."""


def _spec() -> Any:
    from lowbit.generate import GenerationSpec

    return GenerationSpec(max_length=32, max_batch=2)


def _sharp_granitemoe() -> Any:
    """A tiny GraniteMoE with Granite 3's multipliers, its weights x4 and no EOS id (``test_moe._sharp_tiny``)."""
    torch.manual_seed(0)
    config = transformers.GraniteMoeConfig(num_local_experts=N_EXPERTS, **GRANITE_MULTIPLIERS, **_COMMON)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4)
    model.generation_config.eos_token_id = None
    return model


def test_granitemoe_step_generates_as_transformers():
    """GraniteMoE's layer keeps its router and experts in ``block_sparse_moe``, not ``mlp``: its step was refused by
    model type. The step calls the layer's feed-forward block wherever it sits (``_MLP``) and takes Granite's
    multipliers (embedding x12, attention scaling 1/16, residual x0.22, logits /8) as the dense Granite step does.
    Two left-padded prompts' 12 greedy tokens equal transformers' ``generate`` with the float cache and with the
    packed int8 cache, every expert projection is its own linear in the step graph (24), and a decode step over the
    cache equals the prefill's last row, which equals transformers' forward to 1e-5 of its size (a multiplier left
    out moves it far more: the embedding's x12 is most of the hidden state's scale)."""
    from lowbit.models import StepLayout

    from test_architectures import _assert_decode_step_is_the_prefills_last_row, _assert_greedy_as_transformers

    hf = _sharp_granitemoe()
    layout = StepLayout.of(hf)
    assert (layout.embedding_multiplier, layout.residual_multiplier, layout.logits_divisor) == (12.0, 0.22, 8.0)
    assert hf.model.layers[0].self_attn.scaling == 0.0625  # the step's SDPA scale
    compiled = lowbit.compile_model(hf, generation=_spec())
    experts = {n.module for n in compiled.graph.nodes if n.op == "linear" and EXPERT_LINEAR.match(n.module)}
    assert len(experts) == N_LAYERS * N_EXPERTS * 3
    assert all(".block_sparse_moe.experts.expert_" in m for m in experts)
    assert [type(m).__name__ for n, m in hf.named_modules() if n.endswith(".experts")] == ["GraniteMoeExperts"] * 2
    _assert_greedy_as_transformers(hf, GEN_PROMPTS, compiled.generate(GEN_PROMPTS, 12, stop_tokens=()).tokens, 12,
                                   "granitemoe")
    _assert_decode_step_is_the_prefills_last_row(hf, compiled, GEN_PROMPTS[1])
    packed = lowbit.compile_model(hf, pipeline=KV8, generation=_spec())
    _assert_greedy_as_transformers(hf, GEN_PROMPTS, packed.generate(GEN_PROMPTS, 12, stop_tokens=()).tokens, 12,
                                   "granitemoe, int8 cache")


def _w4a16_mixtral_step(dtype: torch.dtype = torch.float32, new_tokens: int = 12) -> tuple[Any, Any, list[list[int]]]:
    """(the sharp tiny Mixtral in ``dtype``, its W4A16 step compiled on the torch reference, that step's
    ``new_tokens`` greedy tokens for the two prompts)."""
    hf = _sharp_tiny("mixtral").to(dtype)
    step = lowbit.compile_model(hf, pipeline=W4A16, generation=_spec())
    return hf, step, step.generate(GEN_PROMPTS, new_tokens, stop_tokens=()).tokens


def test_w4a16_mixtral_step_saves_and_reloads_generating_the_same_tokens(tmp_path):
    """A W4A16 Mixtral step graph saved in the lowbit format reloads with its generation meta, every expert
    projection's dequantized weight equal to the saved graph's (24 of them), and generates the same 12 greedy
    tokens for two left-padded prompts."""
    _, step, tokens = _w4a16_mixtral_step()
    back = lowbit.load(lowbit.save(step, tmp_path / "step", format="lowbit"))
    assert back.graph.meta["generation"] == step.graph.meta["generation"]
    saved, loaded = _dequantized_weights(step.graph), _dequantized_weights(back.graph)
    experts = {m for m in saved if EXPERT_LINEAR.match(m)}
    assert len(experts) == N_LAYERS * N_EXPERTS * 3 and experts <= set(loaded)
    for module in experts:
        torch.testing.assert_close(loaded[module], saved[module], atol=0, rtol=0)
    assert back.generate(GEN_PROMPTS, 12, stop_tokens=()).tokens == tokens


def test_w4a16_mixtral_step_generates_in_onnxruntime_as_the_torch_reference(tmp_path):
    """The W4A16 Mixtral step exports to ONNX (past_key_values in, present out; the router's top-k as TopK) and ONNX
    Runtime's greedy tokens for two left-padded prompts equal the torch reference's, with the int4 weights as QDQ and
    as MatMulNBits (32: each layer's 4 attention and 12 expert projections; the routers and the head stay float);
    the exported file carries the generation meta, so ``lowbit.export.load`` generates them alone."""
    from lowbit.backends.onnxruntime_backend import OrtCompiled
    from lowbit.generate import Generator

    _, step, tokens = _w4a16_mixtral_step()
    for weight_format, nbits in (("qdq", 0), ("matmulnbits", N_LAYERS * (4 + 3 * N_EXPERTS))):
        runner = OrtCompiled(step.graph, device="cpu", weight_format=weight_format)
        assert [i.name for i in runner.session.get_inputs()][:3] == ["input_ids", "positions", "past_key_values_0_key"]
        assert [o.name for o in runner.session.get_outputs()][:2] == ["logits", "present_0_key"]
        ops = [n.op_type for n in runner.onnx_model.graph]
        assert ops.count("TopK") == N_LAYERS and ops.count("MatMulNBits") == nbits
        got = Generator(runner, step.graph.meta["generation"], "cpu").generate(GEN_PROMPTS, 12, stop_tokens=())
        assert got.tokens == tokens, weight_format
    loaded = lowbit.export.load(lowbit.export(step, tmp_path / "step.onnx"))
    assert loaded.generate(GEN_PROMPTS, 12, stop_tokens=()).tokens == tokens


@pytest.mark.skipif(not (os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()),
                    reason="needs CUDA or the Triton interpreter")
# 4 tokens (the prefill and 3 decode steps: every kernel the dense step runs, ~1/3 of the 12 tokens' interpreter time)
# by default; the 12 tokens, where a later step's router pick could still part from the reference's, with LOWBIT_SLOW=1
@pytest.mark.parametrize("new_tokens", [4, pytest.param(12, marks=pytest.mark.slow)])
def test_w4a16_mixtral_step_runs_on_triton_kernels_generating_the_reference_tokens(new_tokens):
    """On backend='triton' (the interpreter on CPU) a float16 W4A16 Mixtral step lowered densely
    (``routed_experts=False``; routed: ``tests/test_moe_routed_triton.py``) runs every linear on a kernel, none
    on the reference: each layer's 4 experts' gate and up projections (the same input) merge into one wide w4a16
    GEMM, the routers take the float GEMV; its greedy tokens (12 measured) for two left-padded prompts equal the torch
    reference's in float16 (measured: teacher-forced last-row logits within 0.3% of their size). In bfloat16 they
    part at the second prompt's 3rd token: the kernels' bf16 rounding (2-4% of the logits under the interpreter, as
    with the experts all made equal) flips a router's top-2 pick, or a near tie of the logits (0.008 of their size)."""
    pytest.importorskip("triton")
    hf, step, tokens = _w4a16_mixtral_step(torch.float16, new_tokens)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    tri = lowbit.compile_model(hf, pipeline=W4A16, backend="triton", generation=_spec(), device=dev,
                               backend_options={"compile": False, "routed_experts": False})
    report = tri.runner.report
    assert not report["fallback"], report["fallback"]
    forms = list(report["kernels"].values())
    assert forms.count("float-gemv") == N_LAYERS + 1  # the routers and the head
    merged_experts = [m for m in report["merged"].values() if ".experts." in m]
    assert sorted(len(m.split(", ")) for m in merged_experts) == [2 * N_EXPERTS] * N_LAYERS
    assert all(report["kernels"][n] == "w4a16" for n, m in report["merged"].items() if ".experts." in m)
    assert tri.generate(GEN_PROMPTS, new_tokens, stop_tokens=()).tokens == tokens


def _as_third_party_mixed_checkpoint(directory: Path, float_weights: dict[str, torch.Tensor]) -> None:
    """Rewrite a lowbit compressed-tensors save of a quantized Mixtral as llm-compressor writes one whose
    ``ignore`` lists some experts' projections (``float_weights``: checkpoint module -> its float weight): those
    modules' packed codes replaced by a float ``.weight`` and named in ``ignore``; no lowbit manifest."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(directory / "model.safetensors")
    config = json.loads((directory / "config.json").read_text())
    for module, weight in float_weights.items():
        for suffix in ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point"):
            tensors.pop(f"{module}.{suffix}", None)
        tensors[f"{module}.weight"] = weight.contiguous()
        config["quantization_config"]["ignore"].append(module)
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(config))
    (directory / "lowbit-manifest.json").unlink()


def test_experts_part_float_part_quantized_save_only_as_lowbit_and_such_a_checkpoint_loads(tmp_path):
    """One expert kept float (``keep=[*.experts.expert_1.*]``), the others int4: lowbit saves it in its own format
    (reloads to the same logits exactly) and refuses every HF format by name before writing: compressed-tensors
    (naming Mixtral's ``block_sparse_moe.experts.1.w1``: transformers dequantizes every expert of a layer in one
    scheme), GPTQ (no ``nn.Linear`` per expert) and hf (float weights only). transformers 5.25 indeed cannot load
    such a checkpoint as a third party writes it (experts.1 in ``ignore``, float ``.weight``): it merges the 3
    quantized experts' weights into a 3-expert fused tensor and stops on the size mismatch. lowbit reads it
    (``ExpertNames.fused_state``: expert 1's float rows in the fused tensors, the others' codes after capture) to the
    kept-float graph's logits exactly: a float row put in another expert's place, or left zero, changes them."""
    model, ids = _tiny("mixtral"), _ids()
    mixed = lowbit.compile_model(model, pipeline="quantize(w=int4,group=32,keep=[*.experts.expert_1.*])")
    quantized = set(_dequantized_weights(mixed.graph))
    assert len({m for m in quantized if EXPERT_LINEAR.match(m)}) == N_LAYERS * (N_EXPERTS - 1) * 3  # not expert 1
    reference = mixed(ids)
    for fmt, why in (("compressed-tensors", r"expert projection 'model\.layers\.0\.block_sparse_moe\.experts\.1\.w1' "
                                            r"\(and 5 more\) is float \(kept float, or not quantized\)"),
                     ("gptq", r"format 'gptq' cannot hold this mixture-of-experts graph"),
                     ("hf", rf"format='hf' writes float weights, but the graph has {len(quantized)} quantized")):
        with pytest.raises(CheckpointError, match=why):
            lowbit.save(mixed, tmp_path / fmt, format=fmt)
        assert not (tmp_path / fmt).exists()
    own = lowbit.load(lowbit.save(mixed, tmp_path / "lowbit", format="lowbit"))
    assert (own(ids) - reference).abs().max().item() == 0.0

    out = lowbit.save(lowbit.compile_model(model, pipeline=W4A16), tmp_path / "ct", format="compressed-tensors")
    inner = _COMMON["intermediate_size"]
    fused = {"w1": (0, slice(0, inner)), "w3": (0, slice(inner, 2 * inner)), "w2": (1, None)}  # gate_up / down rows
    with torch.no_grad():
        float_weights = {
            f"model.layers.{layer}.block_sparse_moe.experts.1.{name}":
                (experts.gate_up_proj[1, rows] if which == 0 else experts.down_proj[1]).detach().clone()
            for layer in range(N_LAYERS) for experts in [model.model.layers[layer].mlp.experts]
            for name, (which, rows) in fused.items()}
    _as_third_party_mixed_checkpoint(out, float_weights)
    with pytest.raises(RuntimeError, match=r"ignore_mismatched_sizes"):
        transformers.AutoModelForCausalLM.from_pretrained(out)
    loaded = lowbit.load(out)
    assert sum(n.op == "dequantize" for n in loaded.graph.nodes) == sum(n.op == "dequantize" for n in mixed.graph.nodes)
    assert (loaded(ids) - reference).abs().max().item() == 0.0
