"""The reference backend on CUDA (skipped without a GPU): same graph, same numbers as on the CPU."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu


def _random_smollm2_shaped(n_layers: int = 2) -> torch.nn.Module:
    """SmolLM2-135M's architecture with random weights (the device has no model files)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lowbit.models import CausalLMLogits

    cfg = LlamaConfig(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                      num_hidden_layers=n_layers, vocab_size=49152, rms_norm_eps=1e-5, rope_theta=100000.0,
                      tie_word_embeddings=True, max_position_embeddings=8192)
    torch.manual_seed(0)
    return CausalLMLogits(LlamaForCausalLM(cfg)).eval()


def test_lowered_graph_runs_on_cuda_like_eager():
    import lowbit

    model = _random_smollm2_shaped()
    ids = torch.randint(0, 49152, (1, 300))
    with torch.no_grad():
        ref = model.cuda()(ids.cuda())
    model.cpu()
    compiled = lowbit.compile_model(model, pipeline="constant-fold,fold-norms,dce", device="cuda")
    out = compiled(ids)
    assert out.device.type == "cuda"
    assert (out - ref).abs().max().item() <= 1e-3 * ref.abs().max().item()
