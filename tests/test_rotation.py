"""Rotations: Hadamard constructions, rotation regions, the rotate pass and the online hadamard op."""

from __future__ import annotations

import pytest
import torch

from conftest import float64_norm_stats
from lowbit.ir.hadamard import (
    BASE_ORDERS,
    HadamardError,
    hadamard,
    hadamard_matrix,
    hadamard_order_split,
    paley1,
    paley2,
    random_hadamard,
    sylvester,
    williamson,
)

# ---- Hadamard constructions -----------------------------------------------------------------------

BUILT = [m for m in BASE_ORDERS if m != 172]


def _is_hadamard(h: torch.Tensor, rows: int | None = None) -> bool:
    """±1 entries and H·Hᵀ = n·I (on the first ``rows`` rows when given; exact in float32 for n < 2^24)."""
    n = h.shape[0]
    top = h if rows is None else h[:rows]
    return bool(((h == 1) | (h == -1)).all()) and torch.equal(
        top.float() @ h.float().T, n * torch.eye(n)[: top.shape[0]])


@pytest.mark.parametrize("m", BUILT)
def test_every_named_order_is_hadamard(m):
    assert hadamard_order_split(m) in ((m, 1), (m // 2, 2))
    assert _is_hadamard(hadamard_matrix(m))


def test_constructions_by_name():
    assert _is_hadamard(sylvester(64))
    assert _is_hadamard(paley1(27)) and _is_hadamard(paley1(343))     # GF(3^3), GF(7^3)
    assert _is_hadamard(paley2(25)) and _is_hadamard(paley2(17))      # GF(5^2)
    a, b, c, d = williamson(13)
    assert all(torch.equal(x, x.T) for x in (a, b, c, d))
    assert torch.equal(a @ a + b @ b + c @ c + d @ d, 52 * torch.eye(13, dtype=torch.int64))
    with pytest.raises(HadamardError, match="q ≡ 3"):
        paley1(13)


@pytest.mark.parametrize("n,split", [(576, (36, 16)), (1536, (12, 128)), (4864, (76, 64)), (896, (28, 32)),
                                     (8960, (140, 64)), (11008, (344, 32)), (192, (12, 16)), (2048, (1, 2048))])
def test_model_widths(n, split):
    # SmolLM2 (576, 1536), Qwen2-0.5B (896, 4864), Qwen2-1.5B (8960), LLaMA-2-7B (11008 via Paley I on GF(343))
    assert hadamard_order_split(n) == split
    assert _is_hadamard(hadamard_matrix(n, torch.float32), rows=None if n <= 2048 else 128)


def test_unknown_dimension_names_it():
    with pytest.raises(HadamardError, match="dimension 172 = 43·2\\^2"):
        hadamard_matrix(172)
    with pytest.raises(HadamardError, match="dimension 188 = 47"):
        hadamard(188)


def test_randomised_hadamard_is_orthogonal():
    for n in (576, 1536, 156):
        q = random_hadamard(n, seed=3)
        assert (q @ q.T - torch.eye(n, dtype=torch.float64)).abs().max() < 1e-12
        assert not torch.equal(q, hadamard(n))
        assert torch.equal(q, random_hadamard(n, seed=3))


# ---- the rotate pass: golden IR, refusals ---------------------------------------------------------

from lowbit.backends.torch_backend import TorchCompiled  # noqa: E402
from lowbit.ir.parser import parse_graph  # noqa: E402
from lowbit.ir.printer import print_graph  # noqa: E402
from lowbit.ir.rotation_regions import find_rotation_regions  # noqa: E402
from lowbit.passes.manager import PassManager, PipelineError  # noqa: E402

TINY = """\
graph g(%ids: i64[1,3]) {
  param @emb: f64[10,4]
  param @up: f64[8,4]
  param @down: f64[4,8]
  %e: f64[1,3,4] = embedding(@emb, %ids)  # embed
  %n: f64[1,3,4] = rms_norm(%e, None, eps=1e-06)  # norm
  %u: f64[1,3,8] = linear(%n, @up)  # up
  %s: f64[1,3,8] = silu(%u)  # act
  %d: f64[1,3,4] = linear(%s, @down)  # down
  %r: f64[1,3,4] = residual_add(%e, %d)  # block
  %m: f64[1,3,4] = rms_norm(%r, None, eps=1e-06)  # final_norm
  %o: f64[1,3,10] = linear(%m, @emb)  # lm_head
  return %o
}
"""

TINY_ROTATED = """\
graph g(%ids: i64[1,3]) {
  param @emb: f64[10,4]
  param @up: f64[8,4]
  param @down: f64[4,8]
  param @embed.weight: f64[10,4]
  %e: f64[1,3,4] = embedding(@embed.weight, %ids)  # embed
  %n: f64[1,3,4] = rms_norm(%e, None, eps=1e-06)  # norm
  %u: f64[1,3,8] = linear(%n, @up)  # up
  %s: f64[1,3,8] = silu(%u)  # act
  %d_had: f64[1,3,8] = hadamard(%s)  # down
  %d: f64[1,3,4] = linear(%d_had, @down)  # down
  %r: f64[1,3,4] = residual_add(%e, %d)  # block
  %m: f64[1,3,4] = rms_norm(%r, None, eps=1e-06)  # final_norm
  %o: f64[1,3,10] = linear(%m, @emb)  # lm_head
  return %o
}
"""


def _random_weights(text: str) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {k: torch.randn(v.type.shape, generator=gen, dtype=v.type.dtype) for k, v in parse_graph(text).params.items()}


def test_rotate_golden_unties_and_is_exact():
    g = parse_graph(TINY, _random_weights(TINY))
    ids = torch.tensor([[1, 5, 7]])
    before = TorchCompiled(g)(ids)
    stats = PassManager("rotate").run(g).records[0].stats
    assert print_graph(g) == TINY_ROTATED
    assert stats["untied"] == ["emb"] and stats["readers"] == 2 and stats["writers"] == 1
    assert stats["online_hadamards"] == 1
    assert (TorchCompiled(g)(ids) - before).abs().max() < 1e-13 * before.abs().max()
    # the embedding and the (tied) lm_head now hold different matrices: E·Q and E·Q, each its own copy
    assert not torch.equal(g.params["emb"].data, parse_graph(TINY, _random_weights(TINY)).params["emb"].data)


def test_rotate_refuses_before_fold_norms_and_on_layernorm():
    gained = TINY.replace("param @down: f64[4,8]", "param @down: f64[4,8]\n  param @g: f64[4]").replace(
        "rms_norm(%e, None, eps=1e-06)", "rms_norm(%e, @g, eps=1e-06)")
    with pytest.raises(PipelineError, match=r"needs fold-norms first: rms_norm %n \(module 'norm'\) still has a gain"):
        PassManager("rotate").run(parse_graph(gained, _random_weights(gained)))
    ln = TINY.replace("rms_norm(%r, None, eps=1e-06)", "layer_norm(%r, None, None, normalized_shape=[4], eps=1e-06)")
    with pytest.raises(PipelineError, match=r"%m \(layer_norm, module final_norm\) is a LayerNorm: it subtracts the mean"):
        PassManager("rotate").run(parse_graph(ln, _random_weights(ln)))
    quantized = parse_graph(TINY, _random_weights(TINY))
    PassManager("quantize(w=int4)").run(quantized)
    with pytest.raises(PipelineError, match=r"rotate must run before quantization: linear %u \(module 'up'\)"):
        PassManager("rotate").run(quantized)
    odd = TINY.replace("f64[10,4]", "f64[10,188]").replace("f64[8,4]", "f64[8,188]").replace(
        "f64[4,8]", "f64[188,8]").replace("f64[1,3,4]", "f64[1,3,188]")
    with pytest.raises(PipelineError, match="residual stream of width 188: no Hadamard construction known for dimension 188"):
        PassManager("rotate").run(parse_graph(odd, _random_weights(odd)))


def test_rotate_refuses_minilm_with_the_layernorm_reason(minilm_graph):
    regions = find_rotation_regions(minilm_graph)
    assert regions.residual is None
    assert any("is a LayerNorm: it subtracts the mean" in r for r in regions.refused)
    with pytest.raises(PipelineError, match="LayerNorm"):
        PassManager("fold-norms,rotate").run(minilm_graph.clone())


def test_hadamard_op_reference():
    from lowbit.ir.ops import OPS

    x = torch.randn(2, 5, 576, dtype=torch.float64)
    y = OPS["hadamard"].fn(x)
    assert torch.allclose(y, x @ hadamard(576), rtol=0, atol=1e-12)
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-12, atol=0)  # orthogonal
    assert OPS["hadamard"].fn(x.float()).dtype == torch.float32


# ---- on SmolLM2 ----------------------------------------------------------------------------------

def test_rotate_exact_in_float64_on_smollm2(smollm2_slice_f64, wikitext_ids, kind="hadamard"):
    _, graph = smollm2_slice_f64
    g = float64_norm_stats(graph.clone())
    ids = wikitext_ids[:, 2000:2256]
    ref = TorchCompiled(g)(ids)
    report = PassManager(f"fold-norms,rotate(kind={kind})").run(g)
    stats = report.records[-1].stats
    assert stats["readers"] == 2 * 5 + 1 and stats["writers"] == 2 * 2 and stats["head_regions"] == 2
    assert stats["online_hadamards"] == 2 + 2 * 2  # down_proj inputs; q and k after rotary
    assert sum(1 for _ in g.find("hadamard")) == 6
    out = TorchCompiled(g)(ids)
    assert (out - ref).abs().max().item() <= 1e-9 * ref.abs().max().item()


@pytest.fixture(scope="module")
def rotated_f32(smollm2):
    """(real 1-layer float32 SmolLM2 slice rotated by fold-norms,rotate; a WikiText-2 window; float logits)."""
    from conftest import held_out_slice

    graph, ids, ref = held_out_slice(smollm2, 1, 1)
    regions = find_rotation_regions(graph)
    g = graph.clone()
    PassManager("fold-norms,rotate").run(g)
    return regions, g, ids, ref


def test_rotate_float32_and_regions_on_smollm2(rotated_f32):
    regions, g, ids, ref = rotated_f32
    assert regions.tied == ["lm_head.weight"] and regions.refused == []
    assert [s.dim for s in regions.online] == [1536, 64, 64]
    out = TorchCompiled(g)(ids)
    assert (out - ref).abs().max().item() <= 1e-4 * ref.abs().max().item()


def test_hadamard_lowers_to_onnx(rotated_f32, wikitext_ids):
    from lowbit.backends.onnx import lowered_op_types, to_onnx
    from lowbit.backends.onnxruntime_backend import OrtCompiled

    g = rotated_f32[1]
    assert "MatMul" in lowered_op_types(to_onnx(g))
    ids = wikitext_ids[:, 500:561]
    ref = TorchCompiled(g)(ids)
    diff = (OrtCompiled(g)(ids) - ref).abs().max().item()
    assert diff < 2e-4 * max(1.0, ref.abs().max().item())


# ---- hypothesis: small random Llama shapes ---------------------------------------------------------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=4, deadline=None)
@given(hidden=st.sampled_from([12, 16, 20, 24]), head_dim=st.sampled_from([4, 8]),
       inter=st.sampled_from([12, 20, 28, 32]), layers=st.integers(1, 2), kv_div=st.sampled_from([1, 2]),
       kind=st.sampled_from(["hadamard", "random"]), tied=st.booleans(), seed=st.integers(0, 3))
def test_rotate_exact_on_random_llamas(hidden, head_dim, inter, layers, kv_div, kind, tied, seed):
    from transformers import LlamaConfig, LlamaForCausalLM

    from lowbit.ir.capture import capture
    from lowbit.models import CausalLMLogits

    heads = max(1, hidden // head_dim)
    if heads * head_dim != hidden or heads % kv_div:
        heads, head_dim = hidden // 4, 4
        kv_div = 1
    cfg = LlamaConfig(vocab_size=40, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=heads // kv_div, head_dim=head_dim,
                      tie_word_embeddings=tied, max_position_embeddings=64)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).to(torch.float64).eval()
    with torch.no_grad():  # non-trivial gains, so fold-norms has something to fold
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.5 * torch.randn_like(p))
    wrapper = CausalLMLogits(model).eval()
    g = capture(wrapper, (torch.ones(1, 6, dtype=torch.long),), {"input_ids": {1: torch.export.Dim.DYNAMIC(min=2, max=64)}})
    float64_norm_stats(g)
    ids = torch.randint(0, 40, (1, 9))
    ref = TorchCompiled(g)(ids)
    stats = PassManager(f"fold-norms,rotate(kind={kind},seed={seed})").run(g).records[-1].stats
    assert stats["head_regions"] == layers and stats["writers"] == 2 * layers
    out = TorchCompiled(g)(ids)
    assert (out - ref).abs().max().item() <= 1e-9 * ref.abs().max().item()


# ---- the w4a4kv4 recipe ---------------------------------------------------------------------------

def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out - ref).norm() / ref.norm()).item()


def test_w4a4kv4_rotation_beats_no_rotation_on_smollm2(smollm2):
    from conftest import held_out_slice

    from lowbit.recipes import get_recipe

    graph, ids, ref = held_out_slice(smollm2, 2, 1)
    rotated = graph.clone()
    PassManager(get_recipe("w4a4kv4-rtn")).run(rotated)
    kv_src = [n for n in rotated.find("quantize") if n.args[0].producer is not None
              and n.args[0].producer.op == "hadamard" and n.args[0].producer.args[0].producer.op == "rotary"]
    assert len(kv_src) == 2  # the KV cache quantizes the rotated keys (one per layer)
    plain = graph.clone()
    PassManager(get_recipe("w4a4kv4-rtn").replace("fold-norms,rotate,", "")).run(plain)
    err_rot, err_plain = _rel_err(TorchCompiled(rotated)(ids), ref), _rel_err(TorchCompiled(plain)(ids), ref)
    assert err_rot < 0.5 * err_plain, (err_rot, err_plain)
    assert "gptq" in get_recipe("w4a4kv4") and "rotate" in get_recipe("w4a4kv4")
