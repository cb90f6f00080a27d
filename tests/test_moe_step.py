"""Mixture-of-experts generation steps beyond ``tests/test_moe.py``: GraniteMoE's step (its experts in
``block_sparse_moe``, Granite's multipliers), a quantized Mixtral step through lowbit's save/load, ONNX Runtime and
the Triton backend, and checkpoints whose experts are part float, part quantized. Tiny random models of
``test_moe``'s shape (2 layers, hidden 64, 4 experts, top-2, vocabulary 128)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import lowbit

from test_moe import (
    _COMMON,
    EXPERT_LINEAR,
    GEN_PROMPTS,
    KV8,
    N_EXPERTS,
    N_LAYERS,
    _sharp_tiny,
)

transformers = pytest.importorskip("transformers")

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
