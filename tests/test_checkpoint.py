"""Checkpoints: transformers loads lowbit's compressed-tensors output with the same logits on real WikiText-2
tokens, every format reloads bit-exactly, the GPTQ layout matches its documentation, and bad files fail by name.

All on a real 2-layer SmolLM2 slice (captured once per module) and the shipped WikiText-2 test text.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import warnings
from pathlib import Path

import pytest
import torch
from conftest import saveable_slice, smollm2_slice, tiny_llama, tiny_llama_config
from hypothesis import given
from hypothesis import strategies as st

import lowbit
from lowbit.backends.torch_backend import TorchCompiled
from lowbit.checkpoint import CheckpointError
from lowbit.passes.manager import PassManager, parse_pipeline

pytest.importorskip("compressed_tensors")


@pytest.fixture(scope="module")
def float_slice(smollm2):
    """(float graph of a 2-layer SmolLM2 with its HF source recorded, 2 WikiText-2 windows of 128, tokenizer)."""
    return (*saveable_slice(smollm2), smollm2[1])


def _compiled(float_slice, pipeline: str):
    graph = float_slice[0].clone()
    PassManager(parse_pipeline(pipeline)).run(graph)
    return graph


def _hf_logits(directory: Path, ids: torch.Tensor, **kwargs) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(directory), local_files_only=True, **kwargs).eval()
    with torch.no_grad():
        return model(ids).logits


# scheme -> (pipeline, expected compressed-tensors format, tolerance on max |logit diff| / max |logit|)

SCHEMES = {
    "w4a16-g64-sym": ("quantize(w=int4,group=64)", "pack-quantized", 0.0),
    "w4a16-g128-fallback64": ("quantize(w=int4,group=128,group_fallback=64)", "pack-quantized", 0.0),
    "w4a16-channel-sym": ("quantize(w=int4)", "pack-quantized", 0.0),
    "w8a16-channel-sym": ("quantize(w=int8)", "pack-quantized", 0.0),
    "fp8-w-a-per-token": ("quantize(w=fp8e4m3,a=fp8e4m3)", "float-quantized", 0.0),
    # compressed-tensors' own CPU fake-quant divides a symmetric int8 activation range by 128 (its qmin is -128);
    # lowbit (and vLLM's int8 kernels) by 127: the weights are bit-identical, the activations' scales differ by
    # 127/128, which moves logits by up to ~3% of their range
    "w8a8": ("quantize(w=int8,a=int8)", "int-quantized", 0.05),
    "fp8-fused-qlinear": ("quantize(w=fp8e4m3,a=fp8e4m3),fuse-qlinear", "float-quantized", 0.0),
}


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_transformers_loads_compressed_tensors(float_slice, tmp_path, scheme):
    pipeline, fmt, tol = SCHEMES[scheme]
    graph = _compiled(float_slice, pipeline)
    ids = float_slice[1]
    ref = TorchCompiled(graph)(ids)
    out = lowbit.save(graph, tmp_path / "ct", format="compressed-tensors")
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qcfg["quant_method"] == "compressed-tensors"
    assert qcfg["format"] == fmt or (qcfg["format"] == "mixed-precision" and "fallback" in scheme)
    assert qcfg["ignore"] == ["lm_head"]
    logits = _hf_logits(out, ids)
    err = (logits - ref).abs().max().item() / ref.abs().max().item()
    assert err <= tol, f"{scheme}: transformers' logits differ from lowbit's by {err:.3g} of their range"
    if tol:
        cos = torch.nn.functional.cosine_similarity(logits.flatten(), ref.flatten(), dim=0).item()
        assert cos > 0.999


def test_fp8_block128_saves_as_compressed_tensors_block_strategy_and_loads_both_ways(float_slice, tmp_path):
    """``fp8-block128`` is compressed-tensors' FP8_BLOCK: weights ``strategy: block``, ``block_structure:
    [128, 128]``, scales ``[ceil(N/128), ceil(K/128)]``; activations dynamic in groups of 128. A Llama with hidden
    256, MLP 640 and one 64-wide KV head (k/v_proj N = 64: one partial tile row) saves so that
    transformers loads it to lowbit's logits and ``lowbit.load`` back to the same tensors. SmolLM2's K = 576 ends
    its activation groups in a partial one, which compressed-tensors' group quantization cannot run: refused by
    name."""
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES

    from lowbit.recipes import get_recipe

    torch.manual_seed(0)
    model = tiny_llama(hidden=256, inter=640, heads=4, kv_heads=1, vocab=300, max_positions=64)
    cm = lowbit.compile_model(model, pipeline=get_recipe("fp8-block128"))
    out = lowbit.save(cm, tmp_path / "ct", format="compressed-tensors")
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    (group,) = qcfg["config_groups"].values()
    assert qcfg["format"] == "float-quantized" and group["targets"] == ["Linear"]
    preset = PRESET_SCHEMES["FP8_BLOCK"]
    for ours, theirs in ((group["weights"], preset["weights"]), (group["input_activations"],
                                                               preset["input_activations"])):
        assert QuantizationArgs.model_validate(ours) == theirs
    from safetensors.torch import load_file

    tensors = load_file(str(out / "model.safetensors"))
    assert tensors["model.layers.0.self_attn.k_proj.weight_scale"].shape == (1, 2)
    assert tensors["model.layers.0.mlp.down_proj.weight_scale"].shape == (2, 5)
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    ref = cm(ids)
    assert torch.equal(_hf_logits(out, ids), ref)
    loaded = lowbit.load(out)
    _assert_same_graph(cm.graph, loaded.graph)
    assert torch.equal(loaded(ids), ref)
    smol = _compiled(float_slice, get_recipe("fp8-block128"))
    with pytest.raises(CheckpointError, match=r"'model.layers.0.self_attn.q_proj': input activations in groups of "
                                              r"128 over K=576 end in a partial group"):
        lowbit.save(smol, tmp_path / "smol", format="compressed-tensors")
    again = lowbit.load(lowbit.save(smol, tmp_path / "smol-lowbit", format="lowbit"))  # what the refusal advises
    _assert_same_graph(smol, again.graph)
    smol_ids = float_slice[1][:1, :64]
    assert torch.equal(again(smol_ids), TorchCompiled(smol)(smol_ids))


def test_fold_norms_reports_the_head_it_unties(float_slice):
    """Folding the final norm into a tied head copies the shared table (+108 MiB on SmolLM2): the pass's stats say
    so, with the size, instead of the params growing unexplained, and an UntiedWeightWarning names the tensors to a
    caller who reads only the sizes (the tie cannot be kept: the gain scales the head's columns, not the table)."""
    from lowbit.passes.fold_norms import UntiedWeightWarning

    graph = float_slice[0].clone()
    with pytest.warns(UntiedWeightWarning, match=r"fold-norms untied 1 shared weight\(s\): lm_head: own copy of "
                                                 r"@lm_head\.weight, shared with model\.embed_tokens \(\+108\.0 MiB\)"):
        rec = PassManager(parse_pipeline("fold-norms")).run(graph).records[0]
    assert rec.stats["untied"] == ["lm_head: own copy of @lm_head.weight, shared with model.embed_tokens (+108.0 MiB)"]


@pytest.mark.parametrize("fmt", ["compressed-tensors", "lowbit"])
def test_quantized_head_of_a_tied_model_unties_and_loads(float_slice, tmp_path, fmt):
    """SmolLM2 ties its head to the embedding; quantizing the head alone (head=int8) must untie them in the
    checkpoint: the embedding stays float, the head is stored quantized and not ignored. (The tie check looked
    the head up under its parameter name where quantized linears are keyed by module, kept the tie and dropped
    the float table: every reload's logits were garbage, transformers did not load.)"""
    graph = _compiled(float_slice, "quantize(w=int4,group=64,head=int8)")
    ids = float_slice[1][:1, :64]
    ref = TorchCompiled(graph)(ids)
    out = lowbit.save(graph, tmp_path / "ct", format=fmt)
    assert (lowbit.load(out)(ids) - ref).abs().max().item() == 0.0
    if fmt == "compressed-tensors":
        cfg = json.loads((out / "config.json").read_text())
        assert cfg["tie_word_embeddings"] is False and "lm_head" not in cfg["quantization_config"]["ignore"]
        assert (_hf_logits(out, ids) - ref).abs().max().item() == 0.0


@pytest.mark.parametrize("pipeline", ["quantize(w=int4,group=64,sym=false)",
                                      "quantize(w=uint4,sym=false)"])
def test_transformers_loads_asymmetric_compressed_tensors(float_slice, tmp_path, pipeline):
    """Asymmetric int4 (zero points packed along N, as compressed-tensors' compressor writes them) loads exactly
    through transformers' dequantize-at-load route. Its default route does not load asymmetric pack-quantized
    checkpoints with compressed-tensors 0.20 (the meta-device layout has unpacked zero points;
    vllm-project/llm-compressor#1618), whoever wrote them."""
    from lowbit.checkpoint.hf_check import transformers_logits  # what `python -m lowbit` runs after saving

    graph = _compiled(float_slice, pipeline)
    ids = float_slice[1]
    out = lowbit.save(graph, tmp_path / "ct", format="compressed-tensors")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert torch.equal(transformers_logits(out, ids), TorchCompiled(graph)(ids))
    # the dequantize-at-load config is the route: transformers' warning about it was noise in python -m lowbit
    assert not [w for w in caught if "quantization_config" in str(w.message)]


def test_transformers_check_loads_a_falcon_compressed_tensors_checkpoint(tmp_path):
    """Falcon's projections are ``FalconLinear`` (an ``nn.Linear`` subclass): transformers' default compressed-
    tensors route fails inside ``from_pretrained`` ('FalconLinear' object has no attribute 'weight', from Falcon's
    ``_init_weights``), so the check ``python -m lowbit --save`` runs after saving raised that AttributeError. It
    loads such a checkpoint through the dequantize-at-load route, to lowbit's logits."""
    import transformers as t

    from lowbit.checkpoint.hf_check import transformers_logits

    torch.manual_seed(0)
    model = t.AutoModelForCausalLM.from_config(t.FalconConfig(hidden_size=64, num_attention_heads=4, vocab_size=256,
                                                              num_hidden_layers=1)).eval()
    cm = lowbit.compile_model(model, pipeline="quantize(w=int4,group=16)")
    out = lowbit.save(cm, tmp_path / "ct", format="compressed-tensors")
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(transformers_logits(out, ids), cm(ids), rtol=0, atol=1e-5)


def _assert_same_graph(a, b) -> None:
    assert set(a.params) == set(b.params)
    for name, v in a.params.items():
        w = b.params[name].data
        assert v.data.dtype == w.dtype and torch.equal(v.data, w), name


@pytest.mark.parametrize("fmt,pipeline", [
    ("lowbit", "quantize(w=uint4,group=64,sym=false,a=int8,kv=int4),fuse-qlinear"),
    ("compressed-tensors", "quantize(w=uint4,group=64,sym=false)"),
    ("compressed-tensors", "quantize(w=int8,a=int8)"),
])
def test_round_trip_bit_exact(float_slice, tmp_path, fmt, pipeline):
    graph = _compiled(float_slice, pipeline)
    ids = float_slice[1]
    out = lowbit.save(graph, tmp_path / "ck", format=fmt)
    manifest = json.loads((out / "lowbit-manifest.json").read_text())
    assert manifest["format"] == fmt and all(len(f["sha256"]) == 64 for f in manifest["files"].values())
    loaded = lowbit.load(out)
    _assert_same_graph(graph, loaded.graph)
    assert torch.equal(loaded(ids), TorchCompiled(graph)(ids))
    assert loaded.tokenizer is not None


@pytest.mark.parametrize("pipeline", ["quantize(w=int4,group=64)", "quantize(w=int8,a=int8)"])
def test_graph_after_the_triton_backends_fusions_saves_as_the_unfused_one(float_slice, tmp_path, pipeline):
    """compile_model(..., backend="triton") runs fuse-qlinear, merge-linears and fuse-norm-quant on the graph it
    returns; saving that to an HF format was refused ("no parameter 'model.layers.0.self_attn.weight'", "param
    ...q_proj_k_proj_v_proj.weight.qdata ... a pass added it (e.g. a rotation)"). The writers undo the three
    rewrites (each exact): the checkpoint holds the very tensors the unfused graph's does."""
    from safetensors.torch import load_file

    plain = _compiled(float_slice, pipeline)
    fused = _compiled(float_slice, pipeline + ",fuse-qlinear,merge-linears,fuse-norm-quant")
    assert any(n.meta.get("merged") for n in fused.nodes)
    assert ("rms_norm_quant" in fused.op_counts()) == ("a=" in pipeline)
    for fmt in ("compressed-tensors", "gptq") if "a=" not in pipeline else ("compressed-tensors",):
        a = load_file(str(lowbit.save(plain, tmp_path / f"plain-{fmt}", format=fmt) / "model.safetensors"))
        b = load_file(str(lowbit.save(fused, tmp_path / f"fused-{fmt}", format=fmt) / "model.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        assert (json.loads((tmp_path / f"plain-{fmt}" / "config.json").read_text())
                == json.loads((tmp_path / f"fused-{fmt}" / "config.json").read_text()))
    ids = float_slice[1][:1, :64]
    assert torch.equal(lowbit.load(tmp_path / "fused-compressed-tensors")(ids), TorchCompiled(plain)(ids))


@pytest.mark.parametrize("w,a", [("int8", "int8"), ("fp8e4m3", "fp8e4m3")])
def test_static_per_tensor_input_scales_save_and_load(float_slice, tmp_path, w, a):
    """Static per-tensor activation scales (a_static, compressed-tensors' static W8A8/FP8) are written as
    ``input_scale`` and read back: the save refused them ("read by a quantize/dequantize node that is not a linear's
    weight") although the writer had their field, and the loader said "not read back yet". transformers' logits and
    lowbit's reload are lowbit's, bit for bit; per-channel static scales stay refused by name."""
    calib = "calib_n=2,calib_len=32,batch_size=2,progress=false"
    graph = _compiled(float_slice, f"quantize(w={w},a={a},a_static=true,a_gran=per_tensor,{calib})")
    ids = float_slice[1][:1, :64]
    ref = TorchCompiled(graph)(ids)
    out = lowbit.save(graph, tmp_path / "ct", format="compressed-tensors")
    group = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"]
    assert group["input_activations"]["dynamic"] is False and group["input_activations"]["strategy"] == "tensor"
    assert torch.equal(_hf_logits(out, ids), ref)
    loaded = lowbit.load(out)
    _assert_same_graph(graph, loaded.graph)
    assert sum(n.op == "quantize" for n in loaded.graph.nodes) == sum(n.op == "quantize" for n in graph.nodes)
    assert torch.equal(loaded(ids), ref)
    per_channel = _compiled(float_slice, f"quantize(w={w},a={a},a_static=true,a_gran=per_channel,{calib})")
    with pytest.raises(CheckpointError, match=r"static input scale of shape \(576,\); HF formats store static "
                                              "input scales per tensor only"):
        lowbit.save(per_channel, tmp_path / "pc", format="compressed-tensors")


@pytest.mark.parametrize("fmt", ["compressed-tensors", "gptq"])
def test_bfloat16_model_round_trips_in_bfloat16(tmp_path, fmt):
    """A bf16 model's checkpoint says dtype bfloat16 (it said float32, so transformers and vLLM loaded it in
    float32 and lowbit.load rebuilt a float32 graph whose logits differed), and reloads bit-exactly in bf16."""
    from transformers import AutoModelForCausalLM

    cfg = tiny_llama_config(hidden=64, inter=128, heads=4, kv_heads=2, vocab=97, max_positions=64)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()  # as from_pretrained builds it
    compiled = lowbit.compile_model(model, pipeline="quantize(w=int4,group=32)")
    out = lowbit.save(compiled, tmp_path / "ck", format=fmt)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    loaded = lowbit.load(out)
    _assert_same_graph(compiled.graph, loaded.graph)
    ids = torch.randint(0, 97, (2, 12))
    assert loaded(ids).dtype == torch.bfloat16 and torch.equal(loaded(ids), compiled(ids))


@pytest.mark.parametrize("fmt", ["compressed-tensors", "gptq"])
def test_config_names_the_architecture_of_a_model_built_from_a_config(tmp_path, fmt):
    """A model built in code (``LlamaForCausalLM(config)``) has no ``architectures``; config.json said null, which
    vLLM refuses, and lowbit.load without the manifest (the directory as another tool sees it) took the causal LM for
    an encoder ("tensor 'layers.0...weight_scale' is missing"). It now names the class the tensors belong to."""
    model = tiny_llama(hidden=64, inter=128, heads=4, kv_heads=2, vocab=97, max_positions=64)
    assert model.config.architectures is None
    compiled = lowbit.compile_model(model, pipeline="quantize(w=int4,group=32)")
    out = lowbit.save(compiled, tmp_path / "ck", format=fmt)
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    (out / "lowbit-manifest.json").unlink()
    ids = torch.randint(0, 97, (2, 12))
    assert torch.equal(lowbit.load(out)(ids), compiled(ids))


@pytest.mark.parametrize("pipeline", ["quantize(w=int4,group=32,sym=false)", "quantize(w=uint4,group=16,sym=false)"])
def test_asymmetric_linear_with_eight_outputs_reloads(tmp_path, pipeline):
    """A 4-bit linear with 8 output channels (k_proj of 8 query heads over 1 kv head of 8) packs its zero points
    into one int32 row; compressed_tensors' unpack_from_int32(packed_dim=0) cannot view that row's transpose as
    bytes, so every lowbit.load of such a checkpoint was a RuntimeError."""
    model = tiny_llama(hidden=64, inter=128, heads=8, kv_heads=1, vocab=97, max_positions=64)
    compiled = lowbit.compile_model(model, pipeline=pipeline)
    out = lowbit.save(compiled, tmp_path / "ck", format="compressed-tensors")
    from safetensors.torch import load_file

    assert load_file(str(out / "model.safetensors"))["model.layers.0.self_attn.k_proj.weight_zero_point"].shape[0] == 1
    loaded = lowbit.load(out)
    _assert_same_graph(compiled.graph, loaded.graph)
    ids = torch.randint(0, 97, (2, 12))
    assert torch.equal(loaded(ids), compiled(ids))


def test_gptq_names_the_block_linears_it_quantizes(tmp_path):
    """GPTQ loaders (transformers + optimum) quantize every linear of the decoder blocks and nothing else, unless
    modules_in_block_to_quantize says which: float MLPs (keep=) were written with that field null, so such loaders
    expected qweights the checkpoint does not have; a quantized head (head=int8) was written although they load
    lm_head as a float linear whose weight the checkpoint lacks. Now the field lists the quantized ones, and what
    it cannot say (a quantized head, blocks that differ) is refused by name."""
    model = tiny_llama(hidden=64, inter=128, heads=4, kv_heads=2, layers=2, vocab=128, max_positions=64)
    compiled = lowbit.compile_model(model, pipeline="quantize(w=int4,group=32,keep=[*mlp*])")
    out = lowbit.save(compiled, tmp_path / "ck", format="gptq")
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qcfg["modules_in_block_to_quantize"] == [["self_attn.k_proj", "self_attn.o_proj", "self_attn.q_proj",
                                                     "self_attn.v_proj"]]
    ids = torch.randint(0, 128, (2, 12))
    assert torch.equal(lowbit.load(out)(ids), compiled(ids))
    full = lowbit.save(lowbit.compile_model(model, pipeline="quantize(w=int4,group=32)"), tmp_path / "f",
                       format="gptq")
    assert json.loads((full / "config.json").read_text())["quantization_config"]["modules_in_block_to_quantize"] is None
    with pytest.raises(CheckpointError, match="linear 'lm_head' is quantized but is not in a decoder block"):
        lowbit.save(lowbit.compile_model(model, pipeline="quantize(w=int8,head=int8)"), tmp_path / "h", format="gptq")
    one = lowbit.compile_model(model, pipeline="quantize(w=int4,group=32,keep=[model.layers.0.mlp.down_proj])")
    with pytest.raises(CheckpointError, match="the blocks quantize different linears .*model.layers.0.mlp.down_proj"):
        lowbit.save(one, tmp_path / "o", format="gptq")


def test_generation_model_saves_as_compressed_tensors(tmp_path):
    """A model compiled with generation= (its step graph) saves in the HF formats: it raised "no
    graph.meta['source']: compile it with lowbit.compile_model" although it was compiled so. The checkpoint holds
    the same codes as the logits model's, and transformers' greedy tokens are lowbit's."""
    from transformers import AutoModelForCausalLM

    from lowbit.generate import GenerationSpec

    model = tiny_llama(hidden=64, inter=128, heads=4, kv_heads=2, vocab=97, max_positions=64)
    pipeline = "quantize(w=int4,group=32)"
    gen = lowbit.compile_model(model, pipeline=pipeline, generation=GenerationSpec(max_length=16, max_batch=1))
    out = lowbit.save(gen, tmp_path / "ck", format="compressed-tensors")
    ids = torch.tensor([[5, 17, 30, 42]])
    assert torch.equal(lowbit.load(out)(ids), lowbit.compile_model(model, pipeline=pipeline)(ids))
    hf = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True).eval()
    ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
    assert gen.generate(ids, 6, stop_tokens=()).tokens[0] == ref[0, 4:].tolist()


def test_generation_model_with_qk_rotations_saves_as_compressed_tensors(tmp_path):
    """rotate's R3 (online Hadamards on q and k after rotary) is exact for a float cache, so the HF writers leave the
    pair out: on the logits graph they did, but a generation step graph's rotaries have no module path, the pairs
    were looked up by module, and every layer's R3 was refused as 'node %rotary_had (hadamard, module '')'. Found
    through each attention's query and key now: the step graph saves, and transformers' greedy tokens are lowbit's."""
    from transformers import AutoModelForCausalLM

    from lowbit.generate import GenerationSpec

    model = tiny_llama(hidden=64, inter=128, heads=4, kv_heads=2, layers=2, vocab=97, max_positions=64)
    gen = lowbit.compile_model(model, pipeline="fold-norms,rotate(online=false),quantize(w=int8)",
                               generation=GenerationSpec(max_length=16, max_batch=1))
    assert sum(n.op == "hadamard" for n in gen.graph.nodes) == 4  # q and k of both layers
    out = lowbit.save(gen, tmp_path / "ck", format="compressed-tensors")
    ids = torch.tensor([[5, 17, 30, 42]])
    hf = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True).eval()
    ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
    assert gen.generate(ids, 6, stop_tokens=()).tokens[0] == ref[0, 4:].tolist()


def _gptq_reference_dequant(qweight, qzeros, scales, g_idx, bits):
    """Written from the GPTQ (AutoGPTQ v1) format description, one bit field at a time: ``qweight[i, n]`` holds
    input rows ``i·(32/b) + j`` at bits ``j·b``; ``qzeros[g, c]`` holds output columns ``c·(32/b) + j`` as
    ``zero - 1``; ``W[n, k] = scales[g_idx[k], n] · (q[k, n] - zero[g_idx[k], n])``."""
    per, mask = 32 // bits, (1 << bits) - 1
    qw = qweight.to(torch.int64) & 0xFFFFFFFF
    qz = qzeros.to(torch.int64) & 0xFFFFFFFF
    k, n = qw.shape[0] * per, qw.shape[1]
    q = torch.empty(k, n, dtype=torch.int64)
    for j in range(per):
        q[j::per] = (qw >> (bits * j)) & mask
    zeros = torch.empty(qz.shape[0], qz.shape[1] * per, dtype=torch.int64)
    for j in range(per):
        zeros[:, j::per] = ((qz >> (bits * j)) & mask) + 1
    gi = g_idx.to(torch.int64)
    return ((q - zeros[gi]) * scales.float()[gi]).t()


@pytest.mark.parametrize("pipeline,bits", [("quantize(w=int4,group=64)", 4),
                                           ("quantize(w=int8)", 8)])
def test_gptq_layout_and_round_trip(float_slice, tmp_path, pipeline, bits):
    """GPTQModel needs a minutes-long source build (README; slow test below), so the layout is checked against a
    reference dequantizer written from the format's description: every weight equals lowbit's dequantized weight;
    and lowbit's own reload is bit-exact."""
    from safetensors.torch import load_file

    from lowbit.ir.quant import dequantize

    graph = _compiled(float_slice, pipeline)
    out = lowbit.save(graph, tmp_path / "gptq", format="gptq")
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "gptq" and cfg["bits"] == bits and cfg["sym"] and not cfg["desc_act"]
    assert cfg["group_size"] == (64 if "group" in pipeline else -1)
    tensors = load_file(str(out / "model.safetensors"))
    checked = 0
    for node in graph.nodes:
        if node.op != "linear" or node.args[1].producer is None:
            continue
        dq = node.args[1].producer
        want = dequantize(*[a.data if a is not None else None for a in dq.args], **dq.kwargs)
        m = node.module
        got = _gptq_reference_dequant(tensors[f"{m}.qweight"], tensors[f"{m}.qzeros"], tensors[f"{m}.scales"],
                                      tensors[f"{m}.g_idx"], bits)
        assert torch.equal(got, want), m
        checked += 1
    assert checked == 14
    loaded = lowbit.load(out)
    _assert_same_graph(graph, loaded.graph)
    ids = float_slice[1]
    assert torch.equal(loaded(ids), TorchCompiled(graph)(ids))


# ---- bad input ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_w4(float_slice, tmp_path_factory):
    graph = _compiled(float_slice, "quantize(w=int4,group=64)")
    root = tmp_path_factory.mktemp("saved")
    return graph, lowbit.save(graph, root / "ct", format="compressed-tensors"), \
        lowbit.save(graph, root / "lb", format="lowbit")


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_flipped_weight_byte_is_caught_by_the_manifest(saved_w4, tmp_path):
    for which in (1, 2):
        d = _copy(saved_w4[which], tmp_path / f"c{which}")
        f = d / ("model.safetensors" if which == 1 else "params.safetensors")
        data = bytearray(f.read_bytes())
        data[-100] ^= 0xFF
        f.write_bytes(bytes(data))
        with pytest.raises(CheckpointError, match=rf"{f.name}: SHA-256 .* does not match"):
            lowbit.load(d)


def test_cli_refuses_a_corrupted_lowbit_directory(saved_w4, tmp_path):
    """`lowbit inspect` on a saved directory whose params were modified: exit 3 naming the file, before parsing."""
    from typer.testing import CliRunner

    from lowbit.cli.main import app

    d = _copy(saved_w4[2], tmp_path / "c")
    f = d / "params.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0x01
    f.write_bytes(bytes(data))
    res = CliRunner().invoke(app, ["inspect", str(d)])
    assert res.exit_code == 3 and "params.safetensors" in res.output and "SHA-256" in res.output


def test_truncated_safetensors_names_file_and_tensor(saved_w4, tmp_path):
    from lowbit.checkpoint.files import read_safetensors

    d = _copy(saved_w4[1], tmp_path / "c")
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-4096])
    with pytest.raises(CheckpointError, match="does not match|bytes, but"):
        lowbit.load(d)  # the manifest sees it first
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor '.*' ends at byte \d+ .* truncated"):
        read_safetensors(f)  # without a manifest (another tool's checkpoint), the reader names the tensor
    f.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    with pytest.raises(CheckpointError, match="header is not valid JSON"):
        read_safetensors(f)


def test_unknown_quantization_config_and_missing_shard(saved_w4, tmp_path, monkeypatch):
    d = _copy(saved_w4[1], tmp_path / "c")
    (d / "lowbit-manifest.json").unlink()  # as another tool would have written it
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"config\.json: quantization_config\.quant_method 'bitsandbytes'"):
        lowbit.load(d)
    import lowbit.checkpoint.hf as hf

    monkeypatch.setattr(hf, "SHARD_BYTES", 2**20)  # force several shards
    sharded = lowbit.save(saved_w4[0], tmp_path / "sharded", format="compressed-tensors")
    shards = sorted(sharded.glob("model-*.safetensors"))
    assert len(shards) > 2 and (sharded / "model.safetensors.index.json").is_file()
    (sharded / "lowbit-manifest.json").unlink()
    shards[1].unlink()
    with pytest.raises(CheckpointError, match=rf"shard '{shards[1].name}' is missing .* e\.g\. 'model\."):
        lowbit.load(sharded)


@pytest.fixture(scope="module")
def rotated_slices(float_slice) -> tuple:
    """(the slice rotated with rotate's online Hadamard, then int4; rotated with the folding rotations only, then
    int4): both formats' tests read them, neither changes them (each compile rotates a 49152-token head)."""
    return (_compiled(float_slice, "fold-norms,rotate,quantize(w=int4,group=64)"),
            _compiled(float_slice, "fold-norms,rotate(online=false,qk=false),quantize(w=int4,group=64)"))


@pytest.mark.parametrize("fmt", ["compressed-tensors", "gptq"])
def test_online_hadamard_is_refused_and_folded_rotations_round_trip(float_slice, rotated_slices, tmp_path, fmt):
    """An online Hadamard (rotate's default R4 before down_proj) has no HF-format field: saving it would drop it
    and the checkpoint would be another model (logits off by more than their range). It is refused, naming the
    node and the way out; with only the rotations that fold into weights the checkpoint loads in transformers to
    the compiled model's logits."""
    online, graph = rotated_slices
    with pytest.raises(CheckpointError, match=r"\(hadamard, module 'model\.layers\.0\.mlp\.down_proj'\).*online "
                                              r"Hadamard.*rotate's online=true.*rotate\(online=false\) leaves.*"
                                              r"format='lowbit'"):
        lowbit.save(online, tmp_path / "online", format=fmt)
    assert not (tmp_path / "online").exists()
    assert not any(n.op == "hadamard" for n in graph.nodes)
    lowbit.save(graph, tmp_path / "folded", format=fmt)
    ids = float_slice[1][:1, :32]
    ref = TorchCompiled(graph)(ids)
    got = lowbit.load(tmp_path / "folded")(ids)
    assert (got - ref).abs().max().item() <= 1e-4 * ref.abs().max().item()
    if fmt == "compressed-tensors":
        hf = _hf_logits(tmp_path / "folded", ids)
        assert (hf - ref).abs().max().item() <= 1e-3 * ref.abs().max().item()


@pytest.mark.parametrize("pipeline, option, module", [
    ("fold-norms,rotate(online=false,online_o=true),quantize(w=int4,group=32)", "online_o", r"self_attn\.o_proj"),
    ("fold-norms,rotate(online=false),quantize(w=int4,group=32,kv=int4,kv_group=16)", "qk", r"self_attn"),
])
def test_online_hadamard_refusal_names_the_option_that_made_it(tmp_path, pipeline, option, module):
    """The refusal's advice was always ``rotate(online=false,qk=false)``: for an o_proj Hadamard (online_o) that
    left the node in place, and for a Hadamard before down_proj qk=false was beside the point. It names the option
    that put the node there."""
    from conftest import tiny_llama

    torch.manual_seed(0)
    compiled = lowbit.compile_model(tiny_llama(hidden=64, heads=4, kv_heads=2, inter=128), pipeline=pipeline)
    with pytest.raises(CheckpointError, match=rf"module 'model\.layers\.0\.{module}'.*rotate's {option}=true.*"
                                              rf"rotate\({option}=false\) leaves it out") as err:
        lowbit.save(compiled, tmp_path / "out", format="compressed-tensors")
    assert option == "qk" or "qk=false" not in str(err.value)


@pytest.mark.parametrize("pipeline,field,value", [
    ("prune-mlp(ratio=0.25,score=magnitude),quantize(w=int4,group=64)", "intermediate_size", 1152),
    ("prune-heads(ratio=0.34,score=magnitude),quantize(w=int4,group=64)", "num_attention_heads", 6),
    ("prune-blocks(blocks=[model.layers.0]),quantize(w=int8)", "num_hidden_layers", 1),
])
def test_pruned_model_saves_with_its_smaller_config(float_slice, tmp_path, pipeline, field, value):
    """A structurally pruned model is a smaller dense one: its compressed-tensors checkpoint carries the pruned
    sizes in config.json (kept blocks renumbered from 0) and transformers loads it to the compiled logits. The
    lowbit format keeps the prune record, so its reload saves to compressed-tensors too."""
    import json

    graph = _compiled(float_slice, pipeline)
    ids = float_slice[1][:1, :32]
    ref = TorchCompiled(graph)(ids)
    lowbit.save(graph, tmp_path / "ct", format="compressed-tensors")
    assert json.loads((tmp_path / "ct" / "config.json").read_text())[field] == value
    assert (_hf_logits(tmp_path / "ct", ids) - ref).abs().max().item() <= 1e-4 * ref.abs().max().item()
    lowbit.save(graph, tmp_path / "lb", format="lowbit")
    lowbit.save(lowbit.load(tmp_path / "lb"), tmp_path / "ct2", format="compressed-tensors")
    # the reload's checkpoint is the first one, tensor for tensor (reloading it, a capture of the slice, added
    # seconds to check logits these equal tensors give)
    from safetensors.torch import load_file

    first, again = load_file(tmp_path / "ct" / "model.safetensors"), load_file(tmp_path / "ct2" / "model.safetensors")
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first), \
        [k for k in first if k not in again or not torch.equal(first[k], again[k])]
    assert json.loads((tmp_path / "ct2" / "config.json").read_text())[field] == value


def test_a_pruned_opt_saves_its_mlp_width_as_ffn_dim(tmp_path):
    """OPT keeps its MLP width in ``ffn_dim``: the save wrote the pruned width into ``intermediate_size``, a field
    OPT never reads, and then refused its own checkpoint ('fc1 ... quantized weight is (64, 64), but the model's
    config makes (128, 64)'). It writes the family's field, and transformers loads it to lowbit's logits."""
    import transformers as t

    from lowbit.api import compile_model
    from lowbit.checkpoint.hf_check import transformers_logits

    torch.manual_seed(0)
    model = t.AutoModelForCausalLM.from_config(t.OPTConfig(hidden_size=64, ffn_dim=128, num_attention_heads=4,
                                                           word_embed_proj_dim=64, num_hidden_layers=2,
                                                           vocab_size=256)).eval()
    cm = compile_model(model, pipeline="prune-mlp(ratio=0.5),quantize(w=int8)", calib=torch.randint(0, 256, (4, 16)))
    out = lowbit.save(cm, tmp_path / "ct", format="compressed-tensors")
    config = json.loads((out / "config.json").read_text())
    assert config["ffn_dim"] == 64 and "intermediate_size" not in config
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(transformers_logits(out, ids), cm(ids), rtol=0, atol=1e-5)


def test_pruned_widths_an_hf_config_cannot_hold_are_refused(float_slice, tmp_path):
    """Per-layer MLP widths (global allocation) or a sliced stream transformers' config rejects: a clear error,
    never a checkpoint whose config.json disagrees with its weights."""
    graph = _compiled(float_slice, "quantize(w=int4,group=64)")
    graph.meta["pruned"] = {"intermediate_size": {"model.layers.0": 1152, "model.layers.1": 1536}}
    with pytest.raises(CheckpointError, match=r"different MLP widths: per-layer intermediate_size \[1152, 1536\] "
                                              r".*format='lowbit'.*allocation=uniform"):
        lowbit.save(graph, tmp_path / "ct", format="compressed-tensors")
    graph.meta["pruned"] = {"hidden_size": 512}
    with pytest.raises(CheckpointError, match=r"not one transformers accepts .*hidden size \(512\) is not a multiple"):
        lowbit.save(graph, tmp_path / "ct", format="gptq")
    assert list(tmp_path.iterdir()) == []


def _tiny3() -> torch.nn.Module:
    from conftest import tiny_llama

    torch.manual_seed(0)
    return tiny_llama(hidden=64, inter=256, heads=4, kv_heads=2, layers=3, vocab=256, max_positions=64)


@pytest.mark.parametrize("prune, message", [
    (r"prune-mlp(ratio=0.25,score=magnitude,modules=layers\.0\.)", r"per-layer intermediate_size \[192, 256, 256\]")])
def test_layers_pruned_to_different_sizes_are_refused_listing_them(tmp_path, prune, message):
    """One layer pruned (modules=): the refusal lists every layer's size, not an unpruned layer's weight against a
    config made from the pruned one (the prune passes record every block's size, not only those they cut)."""
    c = lowbit.compile_model(_tiny3(), pipeline=f"{prune},quantize(w=int4,group=32)")
    with pytest.raises(CheckpointError, match=message + r".*one number for all layers.*format='lowbit'"):
        lowbit.save(c, tmp_path / "ct", format="compressed-tensors")
    lowbit.save(c, tmp_path / "lb", format="lowbit")  # the lowbit format holds them; no config.json with wrong sizes
    assert not (tmp_path / "lb" / "config.json").exists()
    ids = torch.randint(0, 256, (1, 8))
    again = lowbit.load(tmp_path / "lb")
    assert torch.equal(again(ids), c(ids))
    # its reload has no source config (there is no config.json): the sizes are still the reason given, not
    # "compile it with lowbit.compile_model or pass config="
    with pytest.raises(CheckpointError, match=message + r".*one number for all layers"):
        lowbit.save(again, tmp_path / "ct", format="compressed-tensors")


def test_lowbit_format_writes_the_pruned_config(tmp_path):
    """config.json of a structurally pruned model in the lowbit format has the pruned sizes (what AutoConfig reads),
    and the reloaded checkpoint still saves to compressed-tensors with them."""
    from transformers import AutoConfig

    c = lowbit.compile_model(_tiny3(), pipeline="prune-mlp(ratio=0.25,score=magnitude),"
                             "prune-blocks(blocks=[model.layers.1]),quantize(w=int8)")
    lowbit.save(c, tmp_path / "lb", format="lowbit")
    cfg = AutoConfig.from_pretrained(tmp_path / "lb")
    assert (cfg.intermediate_size, cfg.num_hidden_layers) == (192, 2)
    lowbit.save(lowbit.load(tmp_path / "lb"), tmp_path / "ct", format="compressed-tensors")
    cfg = AutoConfig.from_pretrained(tmp_path / "ct")
    assert (cfg.intermediate_size, cfg.num_hidden_layers) == (192, 2)


def test_save_and_load_arguments_are_checked_and_honoured(tmp_path):
    """format=None was an AttributeError from the name suggester; kind='bogus' built a bare AutoModel and blamed
    the embedding ("not a parameter of the HF model; a pass added it"); load(device='gpu') was torch's RuntimeError
    after the whole capture; and format='lowbit' ignored config=/kind=, so a graph captured by hand and saved with
    them reloaded without a source and could not be saved to an HF format."""
    from lowbit.backends.registry import BackendError
    from lowbit.errors import DeviceError
    from lowbit.ir.capture import capture
    from lowbit.models import CausalLMLogits

    model = tiny_llama(hidden=64, inter=128, heads=4, kv_heads=2, vocab=97, max_positions=64)
    ids = torch.randint(0, 97, (2, 12))
    graph = capture(CausalLMLogits(model).eval(), (ids,))  # no graph.meta["source"]
    PassManager(parse_pipeline("quantize(w=int4,group=32)")).run(graph)
    with pytest.raises(ValueError, match="unknown checkpoint format None; known: compressed-tensors"):
        lowbit.save(graph, tmp_path / "a", format=None)
    with pytest.raises(ValueError, match="unknown kind 'bogus': 'causal-lm' or 'encoder'"):
        lowbit.save(graph, tmp_path / "a", kind="bogus", config=model.config)
    # written as compressed-tensors' actorder "group": loaders then permute by a weight_g_idx that is not there
    with pytest.raises(ValueError, match="actorder='group': lowbit keeps act-order groups contiguous"):
        lowbit.save(graph, tmp_path / "a", actorder="group", config=model.config)
    for fmt in ("lowbit", "gptq"):  # accepted and written nowhere
        with pytest.raises(CheckpointError, match=f"actorder='static' .* format '{fmt}' has none"):
            lowbit.save(graph, tmp_path / "a", format=fmt, actorder="static", config=model.config)
        assert not (tmp_path / "a").exists()
    out = lowbit.save(graph, tmp_path / "lb", format="lowbit", config=model.config, kind="causal-lm")
    assert json.loads((out / "lowbit-manifest.json").read_text())["lowbit"]["kind"] == "causal-lm"
    with pytest.raises(DeviceError, match="device='gpu' is not a torch device"):
        lowbit.load(out, device="gpu")
    with pytest.raises(BackendError, match="unknown backend 'trch' \\(did you mean 'torch'"):
        lowbit.load(tmp_path / "no-such-dir", backend="trch")
    ct = lowbit.save(lowbit.load(out), tmp_path / "ct", format="compressed-tensors")
    assert torch.equal(lowbit.load(ct)(ids), TorchCompiled(graph)(ids))


def test_a_reload_reports_what_its_lowering_decided(tmp_path):
    """``lowbit.load`` lowers the graph afresh, but its report had no ``lowering`` lines: a reload on triton did not
    say which nodes fell back to the reference, on torch that the weights were dequantized into float copies. And it
    took no backend options."""
    from lowbit.backends.registry import BackendError
    from lowbit.ir.capture import capture
    from lowbit.models import CausalLMLogits

    model = tiny_llama(hidden=64, inter=128, heads=4, kv_heads=2, vocab=97, max_positions=64)
    graph = capture(CausalLMLogits(model).eval(), (torch.randint(0, 97, (2, 12)),))
    PassManager(parse_pipeline("quantize(w=int4,group=32)")).run(graph)
    out = lowbit.save(graph, tmp_path / "lb", format="lowbit", config=model.config, kind="causal-lm")
    loaded = lowbit.load(out)
    assert loaded.report.lowering == loaded.runner.report_text().splitlines()
    assert "7 quantized weights dequantized at lowering" in loaded.report.summary()
    # no capture ran: its first line was "captured None in None s: None ATen nodes -> 87 IR nodes"
    first = loaded.report.summary().splitlines()[0]
    # (and, the manifest keeping the capture's figures, what the saved graph was captured from)
    assert first == (f"loaded lowbit checkpoint {out}: {len(loaded.graph.nodes)} IR nodes (captured from "
                     f"CausalLMLogits: {graph.meta['aten_nodes']} ATen nodes)") and "None" not in first
    # load took no backend options: a reload could not keep the stored codes (keep_packed) and always held floats
    packed = lowbit.load(out, backend_options={"keep_packed": True})
    assert packed.report.lowering == [] and packed.runner.buffer_bytes < loaded.runner.buffer_bytes / 2
    ids = torch.randint(0, 97, (2, 12))
    assert torch.equal(packed(ids), loaded(ids))
    with pytest.raises(BackendError, match="backend torch: option keep_packd: Extra inputs"):
        lowbit.load(tmp_path / "no-such-dir", backend_options={"keep_packd": True})  # before anything is read
    if os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available():
        on_triton = lowbit.load(out, backend="triton")  # a float32 graph: every qlinear on the reference, named
        # (4 qlinears after merge-linears; the attention of a logits graph is torch's SDPA, not a decode-sdpa call)
        assert on_triton.report.lowering[0].startswith("triton: 0 nodes on kernels, 4 on the reference")
        assert "out_dtype torch.float32: the kernels take bf16/fp16" in on_triton.report.summary()


@pytest.mark.parametrize("fmt", ["lowbit", "compressed-tensors"])
def test_save_refuses_a_config_that_is_not_a_pretrained_config(tmp_path, fmt):
    """config={...} was an AttributeError ('dict' object has no attribute 'to_dict') in the lowbit format and
    transformers' "Unrecognized configuration class" with every config class listed in the HF ones."""
    graph = _compiled_tiny("quantize(w=int4,group=32)")
    with pytest.raises(TypeError, match="config= takes a transformers PretrainedConfig .*got dict"):
        lowbit.save(graph, tmp_path / "out", format=fmt, config={"model_type": "llama"})
    assert not (tmp_path / "out").exists()


def test_hf_model_compiled_as_is_is_told_to_pass_config_and_kind(tmp_path):
    """A BertModel / ViTModel given to compile_model as is records no source (compile_model wraps only causal LMs and
    SentenceEmbedder), and saving it to an HF format said 'compile it with lowbit.compile_model', which it was. The
    refusal names the class it was captured from and config= / kind=; a pixel model is told lowbit.load has no
    wrapper for it. With config= and kind= the encoder saves."""
    import transformers as tf

    torch.manual_seed(0)
    bert = tf.BertModel(tf.BertConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                                      num_hidden_layers=1)).eval()
    ids = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(1))
    c = lowbit.compile_model(bert, (ids,), pipeline="quantize(w=int8)")
    with pytest.raises(CheckpointError, match=r"captured from BertModel\): pass config=model\.config and "
                                              r"kind='causal-lm' or 'encoder'"):
        lowbit.save(c, tmp_path / "bert", format="compressed-tensors")
    lowbit.save(c, tmp_path / "bert", format="compressed-tensors", config=bert.config, kind="encoder")
    vit = tf.ViTModel(tf.ViTConfig(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=1,
                                   image_size=16, patch_size=8)).eval()
    c = lowbit.compile_model(vit, (torch.randn(2, 3, 16, 16),), pipeline="quantize(w=int8)")
    with pytest.raises(CheckpointError, match=r"float input %pixel_values \(f32\[2,3,16,16\].*"
                                              r"format='lowbit'"):
        lowbit.save(c, tmp_path / "vit", format="gptq")


def test_lowbit_checkpoint_of_merged_linears_still_saves_to_hf_formats(tmp_path):
    """merge-linears' member modules (node.meta["merged"]) were not in the IR text: a triton-style graph saved with
    format='lowbit' reloaded exactly but then refused every HF format ("the HF model has no parameter
    'model.layers.0.self_attn.weight'"), while the graph before the save was written unmerged."""
    graph = _compiled_tiny("quantize(w=int4,group=32),fuse-qlinear,merge-linears").graph
    ids = torch.randint(0, 97, (1, 12))
    reloaded = lowbit.load(lowbit.save(graph, tmp_path / "lb", format="lowbit"))
    for fmt in ("compressed-tensors", "gptq"):
        out = lowbit.save(reloaded, tmp_path / fmt, format=fmt)
        assert torch.equal(lowbit.load(out)(ids), TorchCompiled(graph)(ids))


def test_lowbit_checkpoint_keeps_the_sparsity_marks(tmp_path):
    """sparsify's per-linear pattern (node.meta["sparsity"]) was not in the IR text: a lowbit-format reload lost it,
    so a later gptq refilled the pruned zeros (tests/test_pruning.py checks that through the text) and the 2:4
    kernels lost their marks. The reloaded graph carries the marks of the saved one."""
    graph = _compiled_tiny("sparsify(method=magnitude,pattern=2:4)").graph
    marked = {n.module for n in graph.nodes if n.meta.get("sparsity") == "2:4"}
    assert len(marked) == 7  # q/k/v/o and gate/up/down of its block
    reloaded = lowbit.load(lowbit.save(graph, tmp_path / "lb", format="lowbit")).graph
    assert {n.module for n in reloaded.nodes if n.meta.get("sparsity") == "2:4"} == marked


def test_lowbit_checkpoint_keeps_the_meta_reports_read(tmp_path):
    """graph.meta['residual_rotated'] (debug compare's 'block outputs not comparable', the report's capture) and the
    node meta the IR text does not print (qscheme, qscheme_weight, raised_from) were dropped by a lowbit-format save:
    the reloaded model's report and graph said less than the saved one's."""
    compiled = _compiled_tiny("rotate,quantize(w=int4,group=32)")
    keys = ("qscheme", "qscheme_weight", "raised_from")
    saved = {n.name: {k: n.meta[k] for k in keys if k in n.meta} for n in compiled.graph.nodes}
    assert all(any(k in m for m in saved.values()) for k in keys)
    reloaded = lowbit.load(lowbit.save(compiled, tmp_path / "lb", format="lowbit"))
    assert reloaded.graph.meta.get("residual_rotated") is True
    assert reloaded.report.capture["residual_rotated"] == compiled.report.capture["residual_rotated"] is True
    assert {n.name: {k: n.meta[k] for k in keys if k in n.meta} for n in reloaded.graph.nodes} == saved


def test_lowbit_checkpoint_keeps_the_capture_figures_of_the_report(tmp_path):
    """A lowbit-format reload's report dropped what the compile was captured from (model class, ATen nodes, the
    raising rules' counts, export/convert seconds): report.capture held only where it was loaded from. They go
    through the manifest (checked fields, no pickle) and survive a second save."""
    from lowbit.checkpoint.files import CAPTURE_META

    compiled = _compiled_tiny("quantize(w=int4,group=32)")
    figures = {k: compiled.report.capture[k] for k in CAPTURE_META}
    assert figures["model_class"] and figures["aten_nodes"] > 0 and figures["raise_stats"]
    reloaded = lowbit.load(lowbit.save(compiled, tmp_path / "lb", format="lowbit"))
    assert {k: reloaded.report.capture[k] for k in CAPTURE_META} == figures
    assert f"(captured from {figures['model_class']}: {figures['aten_nodes']} ATen nodes)" in \
        reloaded.report.summary().splitlines()[0]
    again = lowbit.load(lowbit.save(reloaded, tmp_path / "lb2", format="lowbit"))
    assert {k: again.report.capture[k] for k in CAPTURE_META} == figures


def test_gptq_act_order_is_recorded_by_every_route_to_compressed_tensors(tmp_path):
    """lowbit.save(compiled) wrote compressed-tensors' ``actorder: static`` after GPTQ with act-order, read off the
    compile report; `lowbit compile -f compressed-tensors` (write_checkpoint_files, no report) and a lowbit-format
    reload (no pipeline records) wrote none for the same weights. The gptq pass records it in the graph, which the
    lowbit format keeps."""
    from lowbit.checkpoint import write_checkpoint_files

    def actorder(d):
        config = json.loads((d / "config.json").read_text())["quantization_config"]
        return config["config_groups"]["group_0"]["weights"].get("actorder")

    model = tiny_llama(hidden=32, inter=64, heads=2, kv_heads=1, vocab=49152)
    compiled = lowbit.compile_model(model, pipeline="gptq(w=int4,group=16,calib_n=2,calib_len=32,progress=false)",
                                    tokenizer="smollm2")
    assert actorder(lowbit.save(compiled, tmp_path / "api")) == "static"
    (tmp_path / "cli").mkdir()
    write_checkpoint_files(compiled.graph, tmp_path / "cli", "compressed-tensors")  # what `lowbit compile -o` calls
    assert actorder(tmp_path / "cli") == "static"
    reloaded = lowbit.load(lowbit.save(compiled, tmp_path / "lb", format="lowbit"))
    assert actorder(lowbit.save(reloaded, tmp_path / "re")) == "static"


def test_lowbit_checkpoint_refuses_capture_figures_of_the_wrong_type(tmp_path):
    """The manifest's capture table is data, checked field by field before anything is read."""
    import json

    from lowbit.checkpoint.files import MANIFEST

    out = lowbit.save(_compiled_tiny("quantize(w=int4,group=32)"), tmp_path / "lb", format="lowbit")
    manifest = json.loads((out / MANIFEST).read_text())
    manifest["lowbit"]["capture"]["aten_nodes"] = "many"
    (out / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"lowbit\.capture\.aten_nodes"):
        lowbit.load(out)


@pytest.mark.parametrize("kv", ["kv=int4,kv_group=16", "kv=int4,kv_group=16,kv_window=4,kv_sink=1"])
def test_kv_quantized_graph_reloaded_from_lowbit_format_is_still_refused_by_hf_formats(tmp_path, kv):
    """The HF writers found KV quantizers by node.meta['kv'], which the IR text does not keep: the same graph was
    refused before a lowbit save and, after reload, written as compressed-tensors / GPTQ without its KV
    quantization (transformers then ran another model, logits 2.6% of their range away)."""
    graph = _compiled_tiny(f"quantize(w=int4,group=32,{kv})").graph
    reloaded = lowbit.load(lowbit.save(graph, tmp_path / "lb", format="lowbit"))
    for fmt in ("compressed-tensors", "gptq"):
        with pytest.raises(CheckpointError, match="quantizes the KV cache"):
            lowbit.save(reloaded, tmp_path / fmt, format=fmt)
        assert not (tmp_path / fmt).exists()


def test_lowbit_save_of_a_graph_without_weights_is_refused_before_writing(tmp_path):
    """A graph parsed from IR text without its params was written with an empty params.safetensors and a valid
    manifest: a checkpoint that no load could ever read ("has no tensor for parameter ...")."""
    from lowbit.ir.parser import parse_graph
    from lowbit.ir.printer import print_graph

    graph = parse_graph(print_graph(_compiled_tiny("quantize(w=int4,group=32)").graph))  # types only
    with pytest.raises(CheckpointError, match=r"parameter @\S+ \(and \d+ more\) has no tensor"):
        lowbit.save(graph, tmp_path / "lb", format="lowbit")
    assert not (tmp_path / "lb").exists()


@pytest.mark.parametrize("fmt", ["lowbit", "compressed-tensors", "gptq"])
def test_save_refuses_a_nan_scale_that_load_would_refuse(tmp_path, fmt):
    """A graph with a NaN weight scale saved without a word, and lowbit.load then refused the directory: a
    checkpoint nothing could load. save refuses it, naming the parameter, before anything is written."""
    graph = _compiled_tiny("quantize(w=int4,group=16)").graph
    name = next(k for k in graph.params if k.endswith(".scale"))
    scale = graph.params[name].data.clone()
    scale[0, 0] = float("nan")
    graph.set_param(name, scale)
    with pytest.raises(CheckpointError, match=rf"quantization parameters are not finite.*{re.escape(name)}"):
        lowbit.save(graph, tmp_path / "out", format=fmt)
    assert not (tmp_path / "out").exists()


def _compiled_tiny(pipeline: str):
    return lowbit.compile_model(tiny_llama(hidden=64, inter=128, heads=4, kv_heads=2, vocab=97), pipeline=pipeline)


def test_saving_through_a_symlink_replaces_its_target(float_slice, tmp_path):
    """A save to a symlink to a checkpoint directory renamed the link itself aside: the link became a plain directory,
    its target kept the old checkpoint, and a stale '.link.*.old' link was left beside it."""
    graph = _compiled(float_slice, "quantize(w=int8)")
    real = lowbit.save(graph, tmp_path / "real", format="lowbit")
    (tmp_path / "link").symlink_to(real, target_is_directory=True)
    lowbit.save(graph, tmp_path / "link", format="compressed-tensors")
    assert (tmp_path / "link").is_symlink() and (real / "config.json").is_file()
    assert not (real / "model.lowbit").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]


def test_save_where_no_directory_can_be_made_is_a_checkpoint_error(float_slice, tmp_path):
    """A place where the checkpoint (or its temporary sibling) cannot be created: a CheckpointError naming the path
    asked for, not an OSError naming lowbit's hidden temporary."""
    blocker = tmp_path / "file"
    blocker.write_text("x")
    graph = _compiled(float_slice, "quantize(w=int8)")
    with pytest.raises(CheckpointError, match=r"cannot save to '.*file/sub/out': .*\(creating it or a temporary"):
        lowbit.save(graph, blocker / "sub" / "out", format="lowbit")


def test_saving_over_a_lowbit_output_keeps_files_the_user_added(float_slice, tmp_path):
    """A directory lowbit wrote is replaced whole by the next save: a file the user put there (notes, a graph
    drawing) was deleted without a word. Now only what the manifest lists may go; anything else refuses the save."""
    graph = _compiled(float_slice, "quantize(w=int8)")
    out = lowbit.save(graph, tmp_path / "out", format="lowbit")
    (out / "NOTES.txt").write_text("mine")
    with pytest.raises(CheckpointError, match=r"also holds files lowbit did not write there \(NOTES\.txt\)"):
        lowbit.save(graph, out, format="lowbit")
    assert (out / "NOTES.txt").read_text() == "mine"
    (out / "NOTES.txt").unlink()
    lowbit.save(graph, out, format="compressed-tensors")  # only its own files: replaced


@pytest.mark.parametrize("fmt", ["compressed-tensors", "gptq"])
def test_hf_checkpoint_loads_for_generation(tmp_path, fmt):
    """lowbit.load(dir, generation=...) captures the generation step with the stored codes: its greedy tokens are
    those of the compile that wrote the checkpoint. generate() on a plain load says how (it pointed at
    compile_model(generation=), which refuses quantized checkpoints and points back at lowbit.load: a loop)."""
    from lowbit.generate import GenerationError, GenerationSpec

    model = tiny_llama(hidden=64, inter=128, heads=4, kv_heads=2, vocab=97, max_positions=64)
    spec = GenerationSpec(max_length=16, max_batch=1)
    gen = lowbit.compile_model(model, pipeline="quantize(w=int4,group=32)", generation=spec)
    out = lowbit.save(gen, tmp_path / "ck", format=fmt)
    ids = torch.tensor([[5, 17, 30, 42]])
    loaded = lowbit.load(out, generation=spec)
    assert loaded.generate(ids, 6, stop_tokens=()).tokens == gen.generate(ids, 6, stop_tokens=()).tokens
    with pytest.raises(GenerationError, match=rf"loaded from a {fmt} checkpoint as input_ids -> logits .*"
                                              r"lowbit\.load\(directory, generation=GenerationSpec"):
        lowbit.load(out).generate(ids, 4)
    # a lowbit-format directory keeps its step graph: the spec it was saved with is accepted, another refused by field
    lb = lowbit.save(gen, tmp_path / "lb", format="lowbit")
    assert lowbit.load(lb, generation=spec).generate(ids, 6, stop_tokens=()).tokens == \
        gen.generate(ids, 6, stop_tokens=()).tokens
    with pytest.raises(CheckpointError, match=r"max_length=32 \(saved with 16\)"):
        lowbit.load(lb, generation=GenerationSpec(max_length=32, max_batch=1))
    with pytest.raises(CheckpointError, match="compiled without generation="):
        lowbit.load(lowbit.save(lowbit.compile_model(model), tmp_path / "plain", format="lowbit"), generation=spec)


def test_cli_generates_from_a_quantized_checkpoint(float_slice, tmp_path):
    """`lowbit generate DIR` on a compressed-tensors checkpoint loads it as the generation step (it was refused as
    'a quantized checkpoint' with advice to use lowbit.load); a pipeline for it is refused, it is compiled already."""
    from typer.testing import CliRunner

    from lowbit.cli.main import app

    out = lowbit.save(_compiled(float_slice, "quantize(w=int4,group=64)"), tmp_path / "ct", format="compressed-tensors")
    res = CliRunner().invoke(app, ["generate", str(out), "--prompt", "The capital of France is", "-n", "3",
                                   "--max-length", "32"])
    assert res.exit_code == 0, res.output
    assert "loaded from the checkpoint" in res.output and "decode 2 steps" in res.output
    res = CliRunner().invoke(app, ["generate", str(out), "-p", "dce", "--prompt", "hi"])
    assert res.exit_code == 2 and "already compiled" in res.output


def test_failed_save_leaves_nothing_and_stale_temporaries_are_cleaned(float_slice, tmp_path):
    graph = _compiled(float_slice, "quantize(w=int8,a=int8,kv=int8)")
    with pytest.raises(CheckpointError, match=r"quantizes the KV cache .* kv_cache_scheme"):
        lowbit.save(graph, tmp_path / "out", format="compressed-tensors")
    asym = _compiled(float_slice, "quantize(w=int4,group=64,sym=false)")
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.self_attn\.q_proj.*asymmetric weights"):
        lowbit.save(asym, tmp_path / "out", format="gptq")
    assert list(tmp_path.iterdir()) == []  # no directory, no temporary
    stale = tmp_path / ".out.abc123.tmp"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    old = time.time() - 7200
    os.utime(stale, (old, old))
    lowbit.save(asym, tmp_path / "out", format="lowbit")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.slow
def test_gptqmodel_loads_gptq(float_slice, tmp_path):
    """transformers + optimum + GPTQModel (its CPU torch kernel) load lowbit's GPTQ checkpoint. GPTQModel ships as
    an sdist that compiles for minutes and pulls torchao/pandas, so it is not a dependency: measured once with
    GPTQModel 7.7.0 (README), skipped where it is not installed. Its kernel computes in reduced precision."""
    pytest.importorskip("gptqmodel")
    pytest.importorskip("optimum")
    graph = _compiled(float_slice, "quantize(w=int4,group=64)")
    ids = float_slice[1]
    ref = TorchCompiled(graph)(ids)
    out = lowbit.save(graph, tmp_path / "gptq", format="gptq")
    logits = _hf_logits(out, ids, device_map="cpu").float()
    assert (logits - ref).abs().max().item() / ref.abs().max().item() < 1e-3


# ---- packing invariants -------------------------------------------------------------------------


@given(st.sampled_from(["int4", "uint4", "int8", "uint8", "int2", "int3"]), st.integers(1, 6), st.integers(1, 5),
       st.booleans(), st.integers(0, 2**31 - 1))
def test_codes_survive_compressed_tensors_and_gptq_packing(qdtype, rows8, cols8, asym, seed):
    """lowbit codes → compressed-tensors' signed codes, packed with its pack_to_int32 → unpacked → lowbit codes is
    the identity, and so is GPTQ's row packing; (q - zp) is unchanged by the signed shift."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    from lowbit.checkpoint.graph_view import QuantWeight
    from lowbit.checkpoint.hf import _ct_tensors, _from_signed, _pack_rows, _unpack_rows
    from lowbit.ir.quant import get_qdtype

    qd = get_qdtype(qdtype)
    g = torch.Generator().manual_seed(seed)
    n, k = 8 * rows8, 8 * cols8
    codes = torch.randint(int(qd.qmin), int(qd.qmax) + 1, (n, k), generator=g).to(qd.container)
    zp = torch.randint(int(qd.qmin), int(qd.qmax) + 1, (n, 1), generator=g).to(qd.container) if asym else None
    qw = QuantWeight("m", qdtype, codes, torch.rand(n, generator=g) + 0.1, zp, None, torch.float32)
    t = _ct_tensors(qw, "pack-quantized")
    q = unpack_from_int32(t["weight_packed"], qd.bits, torch.Size([n, k]))
    z = unpack_from_int32(t["weight_zero_point"], qd.bits, torch.Size([n, 1]), packed_dim=0) if asym else None
    back, zback = _from_signed(q, z, qdtype)
    assert torch.equal(back, codes) and (zp is None or torch.equal(zback, zp))
    if zp is not None:
        assert torch.equal(q.int() - z.int(), codes.int() - zp.int())
    if qd.bits in (4, 8):
        u = (codes.to(torch.int16) - int(qd.qmin)).t().contiguous()
        assert torch.equal(_unpack_rows(_pack_rows(u, qd.bits), qd.bits), u.to(torch.int64))


def test_generation_step_graph_saves_and_generates_after_load(smollm2, tmp_path):
    """A generation-compiled SmolLM2 slice (W4A16, the packed int4 KV cache; max_length 48, not a whole number of
    32-slot key blocks) saved in the lowbit format reloads with its generation meta and generates the same greedy
    tokens; a crafted manifest whose generation meta has a
    bad field, or cache inputs the graph does not have, fails by name."""
    from lowbit.api import compile_model
    from lowbit.generate import GenerationSpec

    model, tok = smollm2
    sliced = smollm2_slice(model, 2).model
    cm = compile_model(sliced, tokenizer=tok, pipeline="quantize(w=int4,group=64),kv-cache(bits=4)",
                       generation=GenerationSpec(max_length=48, max_batch=2))
    lowbit.save(cm, tmp_path / "gen", format="lowbit")
    # the HF formats have no field for the packed cache: refused by name (it was saved without it, silently)
    for fmt in ("compressed-tensors", "gptq"):
        with pytest.raises(CheckpointError, match=r"quantizes the KV cache .*\(cache_attention\)"):
            lowbit.save(cm, tmp_path / fmt, format=fmt)
    back = lowbit.load(tmp_path / "gen")
    assert back.graph.meta["generation"] == cm.graph.meta["generation"]
    prompts = [tok(p).input_ids for p in ("The capital of France is", "Once upon a time")]
    assert back.generate(prompts, 6, stop_tokens=()).tokens == cm.generate(prompts, 6, stop_tokens=()).tokens
    # the CLI generates from it too (it refused: "a compiled lowbit model, not a float model to compile")
    from typer.testing import CliRunner

    from lowbit.cli.main import app

    res = CliRunner().invoke(app, ["generate", str(tmp_path / "gen"), "--prompt", "The capital of France is",
                                   "-n", "4"])
    assert res.exit_code == 0, res.output
    expected = tok.decode(cm.generate([prompts[0]], 4, stop_tokens=()).tokens[0], skip_special_tokens=True)
    assert "The capital of France is" + expected in res.output and "loaded from the lowbit directory" in res.output
    res = CliRunner().invoke(app, ["generate", str(tmp_path / "gen"), "--prompt", "hi", "-n", "60"])
    assert res.exit_code == 2 and "max_length=48" in res.output, res.output
    # the step graph's limits are fixed: other --max-length/--max-batch values were silently ignored
    res = CliRunner().invoke(app, ["generate", str(tmp_path / "gen"), "--prompt", "hi", "-n", "60", "--max-length",
                                   "96", "--max-batch", "1"])
    assert res.exit_code == 2 and "--max-length 96, --max-batch 1 cannot change it" in res.output, res.output
    res = CliRunner().invoke(app, ["generate", str(tmp_path / "gen"), "--prompt", "hi", "-n", "2", "--max-length",
                                   "48", "--max-batch", "2"])
    assert res.exit_code == 0, res.output
    odd = cm.graph.clone()
    odd.meta["generation"] = {**cm.graph.meta["generation"], "beam_width": 4}
    with pytest.raises(CheckpointError, match=r"graph.meta\['generation'\].beam_width: Extra inputs"):
        lowbit.save(odd, tmp_path / "odd", format="lowbit")
    manifest = tmp_path / "gen" / "lowbit-manifest.json"
    good = json.loads(manifest.read_text())
    for field, value, match in (("cache_dtype", "os.system", r"lowbit\.generation\.cache_dtype"),
                                ("max_length", -1, r"lowbit\.generation\.max_length"),
                                ("cache_inputs", ["x"], r"cache_inputs' \['x'\] are not the graph's")):
        bad = json.loads(json.dumps(good))
        bad["lowbit"]["generation"][field] = value
        manifest.write_text(json.dumps(bad))
        with pytest.raises(CheckpointError, match=match):
            lowbit.load(tmp_path / "gen")


@pytest.mark.parametrize("prune", ["prune-mlp(ratio=0.25,score=fluctuation,compensate=true)",
                                   "prune-heads(ratio=0.5,score=obs)"])
def test_pruning_compensation_biases_save_with_the_configs_bias_switch(prune, tmp_path):
    """FLAP compensation and the OBS refit give down_proj / o_proj a bias a Llama config has off: the save
    refused ("a pass such as fold-norms on a LayerNorm added it"); it now turns on mlp_bias / attention_bias and
    writes zeros for the linears the switch gives a bias the graph lacks. transformers loads it to lowbit's
    logits."""
    from conftest import tiny_llama

    from lowbit.api import compile_model
    from lowbit.checkpoint.hf_check import transformers_logits

    torch.manual_seed(0)
    model = tiny_llama(hidden=64, inter=256, heads=4, kv_heads=2, layers=2, vocab=256)
    cm = compile_model(model, pipeline=f"{prune},quantize(w=int4,group=32)", calib=torch.randint(0, 256, (8, 32)))
    out = lowbit.save(cm, tmp_path / "ct", format="compressed-tensors")
    config = json.loads((out / "config.json").read_text())
    assert config["mlp_bias" if "mlp" in prune else "attention_bias"] is True
    ids = torch.randint(0, 256, (1, 16))
    torch.testing.assert_close(transformers_logits(out, ids), cm(ids), rtol=0, atol=1e-5)


@pytest.mark.parametrize("fmt", ["compressed-tensors", "hf"])
def test_bias_switch_zeros_keep_a_bf16_checkpoints_dtype(fmt, tmp_path):
    """The zero biases the mlp_bias switch adds (gate/up, beside compensation's down_proj bias) were written in
    float32 into a bfloat16 model: the checkpoint then held two float dtypes, config.json said dtype float32, and
    transformers loaded the bf16 model in float32. They are written in the model's dtype."""
    from conftest import tiny_llama
    from safetensors import safe_open

    from lowbit.api import compile_model

    torch.manual_seed(0)
    model = tiny_llama(hidden=64, inter=256, heads=4, kv_heads=2, layers=1, vocab=256).to(torch.bfloat16)
    quant = ",quantize(w=int4,group=32)" if fmt != "hf" else ""
    cm = compile_model(model, pipeline=f"prune-mlp(ratio=0.25,score=magnitude,compensate=true){quant}",
                       calib=torch.randint(0, 256, (4, 32)))
    out = lowbit.save(cm, tmp_path / "ckpt", format=fmt)
    config = json.loads((out / "config.json").read_text())
    assert config["mlp_bias"] is True and config["dtype"] == "bfloat16"
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        biases = {k: f.get_slice(k).get_dtype() for k in f.keys() if k.endswith(".bias")}
    assert {"model.layers.0.mlp.gate_proj.bias", "model.layers.0.mlp.down_proj.bias"} <= set(biases)
    assert set(biases.values()) == {"BF16"}, biases


def test_sliced_gemma_is_refused_by_the_hf_formats(tmp_path):
    """Gemma scales its embedding by sqrt(hidden_size), a buffer transformers recomputes from config.json: after
    slice-residual the checkpoint's config says 48 and transformers ran the model with sqrt(48) for the graph's
    sqrt(64) (logits off by 1.3% of their range, no error)."""
    from transformers import GemmaConfig, GemmaForCausalLM

    torch.manual_seed(0)
    m = GemmaForCausalLM(GemmaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                     num_key_value_heads=2, head_dim=16, num_hidden_layers=2, vocab_size=256,
                                     max_position_embeddings=64)).eval()
    c = lowbit.compile_model(m, pipeline="fold-norms,slice-residual(ratio=0.25,calib_n=4,calib_len=32,progress=false),"
                             "quantize(w=int8)", calib=torch.randint(0, 256, (4, 32)))
    for fmt in ("compressed-tensors", "gptq"):
        with pytest.raises(CheckpointError, match=r"sliced to hidden_size=48, but the HF model recomputes "
                                                  r"model\.embed_tokens\.embed_scale .*format='lowbit'"):
            lowbit.save(c, tmp_path / fmt, format=fmt)
    lowbit.save(c, tmp_path / "lb", format="lowbit")
    ids = torch.randint(0, 256, (1, 8))
    assert torch.equal(lowbit.load(tmp_path / "lb")(ids), c(ids))


@pytest.mark.parametrize("fmt", ["compressed-tensors", "gptq"])
def test_a_pruned_float_model_is_not_sent_to_save_pretrained(tmp_path, fmt):
    """A float graph is refused by the HF formats; the advice was transformers' save_pretrained, which for a
    structurally pruned model writes the unpruned module it was captured from."""
    c = lowbit.compile_model(_tiny3(), pipeline="prune-mlp(ratio=0.25,score=magnitude,multiple=8)")
    with pytest.raises(CheckpointError, match=r"no quantized linear.*save a float model with format='hf' \(a plain "
                                              r"transformers directory\) or format='lowbit'") as info:
        lowbit.save(c, tmp_path / "x", format=fmt)
    assert "save_pretrained" not in str(info.value)


def test_a_pruned_float_model_saves_as_a_plain_transformers_directory(tmp_path):
    """A structurally pruned (and folded) float model had no form transformers loads (the HF formats describe
    quantized linears only, lowbit's format is lowbit's): format='hf' writes its float weights under the HF names
    with the pruned sizes in config.json and no quantization_config, and transformers runs the compiled model.
    A quantized graph is refused, pointing to the quantized formats, before any file is written."""
    import transformers

    c = lowbit.compile_model(_tiny3(), pipeline="fold-norms,prune-mlp(ratio=0.25,score=magnitude),"
                                                "prune-heads(ratio=0.5,score=magnitude)")
    out = lowbit.save(c, tmp_path / "hf", format="hf")
    raw = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in raw and raw["intermediate_size"] < _tiny3().config.intermediate_size
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, c(ids), rtol=1e-5, atol=1e-5)
    q = lowbit.compile_model(_tiny3(), pipeline="quantize(w=int8)")
    with pytest.raises(CheckpointError, match=r"format='hf' writes float weights, but the graph has \d+ quantized "
                                              r"linears .*format='compressed-tensors' or 'gptq'"):
        lowbit.save(q, tmp_path / "q", format="hf")
    assert not (tmp_path / "q").exists()


def test_lowbit_load_reads_the_float_hf_format_save_writes(minilm, tmp_path):
    """lowbit.load takes 'any format save wrote', but a format='hf' directory (a pruned float encoder) was refused:
    'no quantization_config (a float HF model: load it with lowbit.compile_model instead)'. It loads now, as the
    plain transformers model it is, and runs as the model that was saved."""
    import transformers

    from lowbit.models import SentenceEmbedder

    tok = minilm[1]
    torch.manual_seed(0)
    bert = transformers.BertModel(transformers.BertConfig(vocab_size=tok.vocab_size, hidden_size=32,
                                                          intermediate_size=64, num_attention_heads=2,
                                                          num_hidden_layers=1, max_position_embeddings=64))
    c = lowbit.compile_model(SentenceEmbedder(bert).eval(), tokenizer=tok,
                             pipeline="prune-mlp(ratio=0.25,score=magnitude,multiple=8)")
    out = lowbit.save(c, tmp_path / "hf", format="hf")
    enc = tok(["the cat sat on the mat", "hi"], padding=True, return_tensors="pt")
    loaded = lowbit.load(out)
    torch.testing.assert_close(loaded(**enc), c(**enc))
    assert loaded.report.summary().startswith(f"loaded hf checkpoint {out}")
    # the capture this load ran, named as every format's reload names it (the hf route dropped it)
    assert f"(captured from SentenceEmbedder: {loaded.report.capture['aten_nodes']} ATen nodes)" in \
        loaded.report.summary().splitlines()[0]


def test_save_argument_refusals_are_lowbit_errors(tmp_path):
    """README: every deliberate refusal is a ``lowbit.errors.LowbitError``; ``save``'s unknown format (a typo of
    one), kind and actorder were bare ValueErrors (still ValueErrors, as ``CheckpointError``). Checked before the
    graph is read, so no model is needed."""
    from lowbit.errors import LowbitError

    for kwargs in ({"format": "compresed-tensors"}, {"kind": "lm"}, {"actorder": "group"}):
        with pytest.raises(LowbitError):
            lowbit.save(None, tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_load_of_an_exported_onnx_file_points_to_export_load(tmp_path):
    """lowbit.load on the .onnx file lowbit.export wrote (a rotated model, whose online Hadamards only the lowbit and
    ONNX forms keep) said '<file>: no such checkpoint directory', as if the file did not exist; it says it is a
    file and which loader reads it, and that loader runs it as the compiled model."""
    import lowbit.export
    from lowbit.ir.capture import capture
    from lowbit.models import CausalLMLogits

    torch.manual_seed(0)
    ids = torch.randint(0, 97, (1, 12))
    graph = capture(CausalLMLogits(tiny_llama(hidden=64, inter=128, heads=4, kv_heads=2, vocab=97)).eval(), (ids,))
    PassManager(parse_pipeline("fold-norms,rotate")).run(graph)
    path = lowbit.export(graph, tmp_path / "rotated.onnx")
    with pytest.raises(CheckpointError, match=r"rotated\.onnx is a file, not a checkpoint directory: .*"
                                              r"lowbit\.export\.load"):
        lowbit.load(path)
    ref = TorchCompiled(graph)(ids)
    assert (lowbit.export.load(path)(ids) - ref).abs().max().item() < 1e-4 * ref.abs().max().item()


@pytest.mark.parametrize("fmt", ["lowbit", "compressed-tensors"])
def test_a_saved_config_does_not_carry_the_local_path_the_model_was_read_from(minilm, tmp_path, fmt):
    """Every config.json lowbit wrote kept the source config's _name_or_path: all-MiniLM-L6-v2's site-packages
    directory, SmolLM2's ~/.cache path, in a checkpoint meant to be shared (transformers' save_pretrained leaves it
    out). It is left out; the checkpoint still loads in lowbit and transformers."""
    import transformers

    from lowbit.models import SentenceEmbedder

    tok = minilm[1]
    cfg = transformers.BertConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                                  num_attention_heads=2, num_hidden_layers=1, max_position_embeddings=64)
    source = tmp_path / "source model"
    transformers.BertModel(cfg).save_pretrained(source)
    bert = transformers.BertModel.from_pretrained(source).eval()
    assert bert.config.name_or_path == str(source)
    c = lowbit.compile_model(SentenceEmbedder(bert), tokenizer=tok, pipeline="quantize(w=int8)")
    out = lowbit.save(c, tmp_path / "out", format=fmt)
    text = (out / "config.json").read_text()
    assert "_name_or_path" not in json.loads(text) and str(source) not in text
    enc = tok(["the cat sat on the mat", "hi"], padding=True, return_tensors="pt")
    torch.testing.assert_close(lowbit.load(out)(**enc), c(**enc))
    if fmt == "compressed-tensors":
        transformers.AutoModel.from_pretrained(out)


def test_lowbit_format_reloads_a_model_whose_parameter_names_have_spaces_colons_and_accents(tmp_path):
    """A ``ModuleDict`` key is any string: ``"my layer"``, ``"a:b"``, ``"café"`` made parameters the IR text wrote
    bare (``param @d.my layer.weight``), so save(format="lowbit") wrote a model.lowbit that load refused ("expected
    ':', found 'layer.weight'"). Such names are written as JSON strings (``@"d.my layer.weight"``)."""

    class Keyed(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.d = torch.nn.ModuleDict({k: torch.nn.Linear(8, 8) for k in ("my layer", "café", "a:b")})

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for m in self.d.values():
                x = m(x)
            return x

    torch.manual_seed(0)
    x = torch.randn(2, 8)
    compiled = lowbit.compile_model(Keyed().eval(), example_inputs=(x,), pipeline="quantize(w=int8)")
    reloaded = lowbit.load(lowbit.save(compiled, tmp_path / "lb", format="lowbit"))
    assert sorted(reloaded.graph.params) == sorted(compiled.graph.params)
    assert "d.my layer.weight.qdata" in reloaded.graph.params
    assert torch.equal(reloaded(x), compiled(x))


@pytest.fixture(scope="module")
def tiny_step_dir(tmp_path_factory):
    """A tiny Llama's W8 step graph (max_length 32, max_batch 2) saved in the lowbit format."""
    from lowbit.generate import GenerationSpec

    torch.manual_seed(0)
    cm = lowbit.compile_model(tiny_llama(hidden=32, inter=64, heads=2, kv_heads=1, vocab=61, max_positions=64),
                              pipeline="quantize(w=int8)", generation=GenerationSpec(max_length=32, max_batch=2))
    return lowbit.save(cm, tmp_path_factory.mktemp("step") / "lb", format="lowbit")


@pytest.mark.parametrize(("field", "value", "match"), [
    ("max_length", 10**9, r"sizes cache input %past_key_values_0_key as f32\[2, 1, 1000000000, 16\], which the "
                          r"graph's declared f32\[s0,1,s2,16\] \(s0 in \[1, 3\], s2 in \[1, 32\]\) does not take"),
    ("max_batch", 10**6, r"sizes cache input %past_key_values_0_key as f32\[1000000, 1, 32, 16\]"),
    ("head_dim", 4096, r"head_dim=4096.*as f32\[2, 1, 32, 4096\]"),
    ("kv_heads", 8, r"kv_heads=8.*as f32\[2, 8, 32, 16\]"),
    ("n_layers", 7, r"makes 14 cache tensors, but the graph has 2 cache inputs"),
    ("cache_dtype", "bfloat16", r"as bf16\[2, 1, 32, 16\]"),
])
def test_generation_meta_that_does_not_fit_the_graphs_cache_inputs_is_refused_at_load(tiny_step_dir, tmp_path, field,
                                                                                       value, match):
    """The manifest's generation fields size the KV cache generate allocates; they were checked for type only, so a
    crafted max_length=10**9 loaded and a three-token prompt then tried to allocate 64 GB, n_layers=7 was a raw
    TypeError ('the model takes 4 inputs ... got 16'), head_dim or kv_heads an InputError blaming the caller's
    input. Each is refused by load, naming the manifest, the field values and the cache input they do not fit."""
    d = Path(shutil.copytree(tiny_step_dir, tmp_path / "lb"))
    manifest = d / "lowbit-manifest.json"
    data = json.loads(manifest.read_text())
    data["lowbit"]["generation"][field] = value
    manifest.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(d))}: manifest 'lowbit.generation' .*{match}"):
        lowbit.load(d)


def test_a_kv_cache_larger_than_the_model_allows_is_refused_even_when_ir_and_manifest_agree(tiny_step_dir, tmp_path):
    """model.lowbit's slot symbol and the manifest's max_length both set to 10**9 (rehashed: they agree, so the
    shape checks pass) made generate allocate 64 GB for a three-token prompt. The cache generate allocates at
    max_batch x max_length is held to the bound the verifier puts on a stored graph's fixed-size values."""
    from conftest import rehash_manifest

    d = Path(shutil.copytree(tiny_step_dir, tmp_path / "lb"))
    ir = d / "model.lowbit"
    assert "symbol s2 in [1, 32]" in ir.read_text()
    ir.write_text(ir.read_text().replace("symbol s2 in [1, 32]", "symbol s2 in [1, 1000000000]"))
    rehash_manifest(d)
    manifest = d / "lowbit-manifest.json"
    data = json.loads(manifest.read_text())
    data["lowbit"]["generation"]["max_length"] = 10**9
    manifest.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=r"manifest 'lowbit.generation' .*max_length=1000000000.* makes a KV "
                                              r"cache of 238 GiB at max_batch sequences, more than 32x"):
        lowbit.load(d)


def test_a_phi3_longrope_model_saves_as_compressed_tensors(tmp_path):
    """Phi-3 longrope (the 128k models) computes its long rotary frequencies from the config in its first forward;
    torch.export lifts them as a constant (``model.rotary_emb.lifted_tensor_0``), which the HF writer refused as
    'not a parameter of the HF model; a pass added it', so no longrope model saved to an HF format. The table is
    recomputed from config.json like the rotary's buffers: transformers loads the checkpoint with the compiled
    model's logits past original_max_position_embeddings, and lowbit reloads it as a generation step that
    knows where the rotary switches."""
    import transformers as t
    from conftest import tiny_phi3_longrope

    from lowbit.generate import GenerationSpec

    compiled = lowbit.compile_model(tiny_phi3_longrope(), pipeline="quantize(w=int8)")
    assert any(n.endswith("lifted_tensor_0") for n in compiled.graph.params)
    out = lowbit.save(compiled, tmp_path / "ct", format="compressed-tensors")
    ids = torch.randint(0, 256, (1, 24))
    hf = t.AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, compiled(ids), rtol=0, atol=1e-5)
    step = lowbit.load(out, generation=GenerationSpec(max_length=32, max_batch=1))
    assert step.graph.meta["generation"]["rope_switch"] == 16


def _without_manifest_entries(directory: Path, *, generation_key: str | None = None, file: str | None = None) -> None:
    """A checkpoint as an older lowbit wrote it: a generation field or a file left out of its manifest."""
    manifest = json.loads((directory / "lowbit-manifest.json").read_text())
    if generation_key is not None:
        del manifest["lowbit"]["generation"][generation_key]
    if file is not None:
        del manifest["files"][file]
        (directory / file).unlink()
    (directory / "lowbit-manifest.json").write_text(json.dumps(manifest))


def test_a_longrope_step_saved_before_rope_switch_generates_past_the_switch(tmp_path):
    """A Phi-3 longrope step graph saved in the lowbit format before ``rope_switch`` was recorded loaded without it:
    its decode steps crossed the switch with keys rotated by the short frequencies, and the tokens after it were
    others than the compile's, without a word. The switch is recomputed from the saved config.json; with no
    config.json to read it from, the load is refused, naming the rotary's node and what to do."""
    from conftest import tiny_phi3_longrope

    from lowbit.generate import GenerationSpec

    hf = tiny_phi3_longrope()
    with torch.no_grad():  # sharper logits than the init's: greedy ties would not test anything
        for p in hf.parameters():
            p.mul_(4)
    compiled = lowbit.compile_model(hf, generation=GenerationSpec(max_length=32, max_batch=2))
    prompts = [list(range(1, 10)), [5, 6, 7]]  # the first crosses position 16 at its 8th new token
    want = compiled.generate(prompts, 10, stop_tokens=()).tokens
    old = lowbit.save(compiled, tmp_path / "old", format="lowbit")
    _without_manifest_entries(old, generation_key="rope_switch")
    step = lowbit.load(old)
    assert step.graph.meta["generation"]["rope_switch"] == 16
    assert step.generate(prompts, 10, stop_tokens=()).tokens == want
    _without_manifest_entries(old, file="config.json")
    with pytest.raises(CheckpointError, match=r"%max_1 \(model.rotary_emb\) takes the largest position.*no 'rope_"
                       "switch'.*no config.json.*save the model again"):
        lowbit.load(old)


def test_compressed_tensors_declares_the_2_4_sparsity(float_slice, tmp_path):
    """A 2:4-sparse compressed-tensors checkpoint said nothing of its sparsity (no ``sparsity_config``), so vLLM and
    other compressed-tensors readers could not tell the weights are 2:4. It is written as compressed-tensors defines
    it (dense format, structure 2:4, every Linear but the unpruned head), parsed by the package's own class, and
    transformers still loads the model to lowbit's logits; its global_sparsity is the share of zero parameters
    transformers reads."""
    from compressed_tensors.config import SparsityCompressionConfig
    from transformers import AutoModelForCausalLM

    graph = _compiled(float_slice, "sparsify(method=magnitude,pattern=2:4),quantize(w=int4,group=64)")
    ids = float_slice[1][:1, :64]
    ref = TorchCompiled(graph)(ids)
    out = lowbit.save(graph, tmp_path / "ct", format="compressed-tensors")
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    sparsity = SparsityCompressionConfig.load_from_registry(qcfg["sparsity_config"]["format"],
                                                           **qcfg["sparsity_config"])
    assert (sparsity.format, sparsity.sparsity_structure) == ("dense", "2:4")
    assert (sparsity.targets, sparsity.ignore) == (["Linear"], ["lm_head"])
    model = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True).eval()
    with torch.no_grad():
        assert (model(ids).logits - ref).abs().max().item() == 0.0
    params = [p for n, p in model.named_parameters() if not n.endswith(("_scale", "_zero_point"))]  # the model's own
    zeros = sum(int((p == 0).sum()) for p in params)
    assert sparsity.global_sparsity == pytest.approx(zeros / sum(p.numel() for p in params), abs=1e-6)
    linears = {n: m.weight for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    for name, w in linears.items():  # the 2:4 pattern is in the weights transformers reads
        if name != "lm_head":
            assert ((w.reshape(-1, 4) != 0).sum(1) <= 2).all(), name
    assert torch.equal(lowbit.load(out)(ids), ref)


@pytest.mark.parametrize("pipeline", ["quantize(w=int4,group=32,sym=false)", "quantize(w=uint4,group=16,sym=false)"])
def test_transformers_check_loads_an_asymmetric_linear_with_eight_outputs(tmp_path, pipeline):
    """compressed-tensors 0.20's unpack_from_int32(packed_dim=0) raises on the one-word zero-point row of a 4-bit
    linear with 8 outputs and several groups (k_proj/v_proj of one 8-wide kv head): the transformers check that
    `python -m lowbit --save` runs after saving ended in 'self.stride(-1) must be 1 to view Int as Byte'. It unpacks
    those zero points as lowbit.load does, and transformers' logits are lowbit's."""
    from lowbit.checkpoint.hf_check import transformers_logits

    model = tiny_llama(hidden=64, inter=128, heads=8, kv_heads=1, vocab=97, max_positions=64)
    compiled = lowbit.compile_model(model, pipeline=pipeline)
    out = lowbit.save(compiled, tmp_path / "ck", format="compressed-tensors")
    ids = torch.randint(0, 97, (2, 12))
    assert torch.equal(transformers_logits(out, ids), compiled(ids))


def test_layers_pruned_to_different_head_counts_save_with_zero_heads(tmp_path):
    """One layer's heads pruned (modules=): an HF config holds one head count for all layers, so the HF formats
    refused it. The checkpoint keeps the config's counts, the layer's removed heads written as zero heads: transformers
    loads it to the compiled logits, the manifest records each layer's kept heads, and lowbit.load runs it. The
    lowbit format still keeps the smaller graph, and its reload (no config.json: per-layer counts) is refused by name
    for the HF formats."""
    import transformers

    c = lowbit.compile_model(_tiny3(), pipeline=r"prune-heads(ratio=0.5,score=magnitude,modules=layers\.0\.),"
                                                "quantize(w=int4,group=16)")
    out = lowbit.save(c, tmp_path / "ct", format="compressed-tensors")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert (hf.config.num_attention_heads, hf.config.num_key_value_heads) == (4, 2)
    ids = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        assert (hf(ids).logits - c(ids)).abs().max().item() == 0.0
    info = json.loads((out / "lowbit-manifest.json").read_text())["lowbit"]["zero_heads"]
    assert info == {"written_heads": [4, 2], "kept_heads": {"model.layers.0": [2, 1], "model.layers.1": [4, 2],
                                                            "model.layers.2": [4, 2]}}
    assert torch.equal(lowbit.load(out)(ids), c(ids))
    again = lowbit.load(lowbit.save(c, tmp_path / "lb", format="lowbit"))
    with pytest.raises(CheckpointError, match=r"per-layer \[num_attention_heads, num_key_value_heads\] "
                                              r"\[\[2, 1\], \[4, 2\], \[4, 2\]\].*one number for all layers"):
        lowbit.save(again, tmp_path / "ct2", format="compressed-tensors")


def test_zero_heads_refuse_an_output_projection_whose_groups_cross_heads(tmp_path):
    """A GPT-NeoX (head_dim derived from hidden_size) whose heads were pruned and whose output projection is
    quantized in groups wider than a head: the removed heads' columns are not whole groups, so they cannot be
    written as zero heads without requantizing; refused naming the linear, the group and the columns."""
    import transformers

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(transformers.GPTNeoXConfig(
        hidden_size=96, intermediate_size=128, num_attention_heads=6, num_hidden_layers=1, vocab_size=128,
        max_position_embeddings=64)).eval()
    # 4 heads of 16 kept: the output projection's 64 inputs are one group of 64, the 2 removed heads 32 columns
    c = lowbit.compile_model(model, pipeline="prune-heads(ratio=0.34,score=magnitude),"
                             "quantize(w=int4,group=64,group_fallback=32)")
    with pytest.raises(CheckpointError, match=r"'gpt_neox\.layers\.0\.attention\.dense\.weight' is quantized in "
                                              r"groups of 64 input channels, and the removed heads' 32 columns"):
        lowbit.save(c, tmp_path / "ct", format="compressed-tensors")


def test_a_reloaded_2_4_compressed_tensors_checkpoint_keeps_its_sparsity(tmp_path):
    """lowbit.load of a 2:4 compressed-tensors checkpoint dropped the pattern its sparsity_config declares: the
    reloaded graph's linears were unmarked (no '| sparsity 2:4' in its IR text), so saving it again declared no
    sparsity and the 2:4 backends did not know it. The targeted linears carry the mark again, and a second save
    writes the same sparsity_config."""
    compiled = _compiled_tiny("sparsify(method=magnitude,pattern=2:4),quantize(w=int4,group=32)")
    marked = {n.module for n in compiled.graph.nodes if n.meta.get("sparsity") == "2:4"}
    out = lowbit.save(compiled, tmp_path / "ct", format="compressed-tensors")
    reloaded = lowbit.load(out)
    assert {n.module for n in reloaded.graph.nodes if n.meta.get("sparsity") == "2:4"} == marked
    again = lowbit.save(reloaded, tmp_path / "again", format="compressed-tensors")
    first, second = (json.loads((d / "config.json").read_text())["quantization_config"]["sparsity_config"]
                     for d in (out, again))
    assert second == first and first["sparsity_structure"] == "2:4"


def test_a_float_hf_checkpoint_without_a_tokenizer_reloads(tmp_path):
    """A pruned causal LM compiled from a module (no tokenizer) saved as format='hf' holds no tokenizer files, and
    lowbit.load refused it ('has no tokenizer files ... save it there') although it runs on token ids, as its
    compressed-tensors reload does. It reloads to the compiled logits, with no tokenizer."""
    c = lowbit.compile_model(_tiny3(), pipeline="prune-mlp(ratio=0.25,score=magnitude),"
                                                "prune-heads(ratio=0.5,score=magnitude)")
    out = lowbit.save(c, tmp_path / "hf", format="hf")
    loaded = lowbit.load(out)
    ids = torch.randint(0, 256, (2, 9))
    assert loaded.tokenizer is None
    torch.testing.assert_close(loaded(ids), c(ids), rtol=0, atol=0)


@pytest.mark.parametrize("fmt, pipeline", [("hf", "prune-heads(ratio=0.5,score=magnitude)"),
                                           ("compressed-tensors", "prune-heads(ratio=0.5,score=magnitude),"
                                                                  "quantize(w=int8)")])
def test_head_pruned_minilm_loads_in_transformers_with_zero_heads(minilm, tmp_path, fmt, pipeline):
    """The real all-MiniLM-L6-v2 (BERT: head_dim is hidden_size / heads) with half its heads pruned: its HF
    checkpoint keeps 12 heads per layer, 6 of them zero, and transformers' BertModel embeds real sentences as the
    compiled model does; lowbit.load too."""
    from transformers import AutoModel

    from lowbit.models import SentenceEmbedder

    embedder, tok = minilm
    c = lowbit.compile_model(embedder, tokenizer=tok, pipeline=pipeline)
    assert set(map(tuple, c.graph.meta["pruned"]["heads"].values())) == {(6, 6)}
    out = lowbit.save(c, tmp_path / fmt, format=fmt)
    enc = tok(["the cat sat on the mat", "lowbit writes zero heads where a config has no field"], padding=True,
              return_tensors="pt")
    ref = c(**enc)
    hf = SentenceEmbedder(AutoModel.from_pretrained(out)).eval()
    assert hf.encoder.config.num_attention_heads == 12
    assert json.loads((out / "lowbit-manifest.json").read_text())["lowbit"]["zero_heads"]["written_heads"] == [12, 12]
    with torch.no_grad():
        torch.testing.assert_close(hf(enc["input_ids"], enc["attention_mask"]), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lowbit.load(out)(**enc), ref, rtol=1e-5, atol=1e-5)


POOLER = ["pooler.dense.bias", "pooler.dense.weight"]


def _pooler_tensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: t for k, t in load_file(directory / "model.safetensors").items() if k.startswith("pooler.")}


@pytest.mark.parametrize("fmt, pipeline", [("hf", None), ("compressed-tensors", "quantize(w=int8)"),
                                           ("compressed-tensors", "quantize(w=int4,group=32)")])
def test_a_saved_minilm_keeps_the_pooler_its_sentence_embedding_never_reads(minilm, tmp_path, fmt, pipeline):
    """The sentence embedder never runs BERT's pooler, so its weights were not in the graph and no HF save wrote
    them: transformers loaded the directory with a random pooler (pooler_output noise, said only by a missing-keys
    warning). They are written as the source model has them (float, in a quantized save too), the manifest lists
    them as copied_from_source, transformers loads every tensor, and lowbit.load, and a save of its reload, keep
    them."""
    from transformers import AutoModel

    from lowbit.checkpoint.hf import MissingTensorsWarning
    from lowbit.models import SentenceEmbedder

    embedder, tok = minilm
    source = embedder.encoder
    c = lowbit.compile_model(embedder, tokenizer=tok, pipeline=pipeline)
    assert not set(POOLER) & set(c.graph.params)  # the captured forward never reads them
    with warnings.catch_warnings():
        warnings.simplefilter("error", MissingTensorsWarning)
        out = lowbit.save(c, tmp_path / fmt, format=fmt)
    lb = json.loads((out / "lowbit-manifest.json").read_text())["lowbit"]
    assert (lb["copied_from_source"], lb["not_in_graph"]) == (POOLER, [])
    hf, info = AutoModel.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"]
    enc = tok(["the cat sat on the mat", "the pooler reads the first token of a longer sentence"], padding=True,
              return_tensors="pt")
    with torch.no_grad():
        got, ref = hf.eval()(**enc), source(**enc)
        # the source's pooler, bit for bit: on the source's hidden states it gives the source's pooler_output
        assert torch.equal(hf.pooler(ref.last_hidden_state), ref.pooler_output)
        assert torch.equal(got.pooler_output, source.pooler(got.last_hidden_state))
        if pipeline is None:
            assert torch.equal(got.last_hidden_state, ref.last_hidden_state)
            assert torch.equal(got.pooler_output, ref.pooler_output)
        torch.testing.assert_close(SentenceEmbedder(hf).eval()(enc["input_ids"], enc["attention_mask"]), c(**enc),
                                   rtol=1e-5, atol=1e-5)
    reloaded = lowbit.load(out)
    assert torch.equal(reloaded(**enc), c(**enc))
    with warnings.catch_warnings():
        warnings.simplefilter("error", MissingTensorsWarning)
        again = lowbit.save(reloaded, tmp_path / "again", format=fmt)
    stored = _pooler_tensors(again)
    assert sorted(stored) == POOLER
    assert all(torch.equal(t, source.state_dict()[k]) for k, t in stored.items())


@pytest.mark.parametrize("fmt, pipeline", [("hf", None), ("compressed-tensors", "quantize(w=int8)")])
def test_a_lowbit_checkpoint_keeps_the_source_pooler_for_a_later_hf_save(minilm, tmp_path, fmt, pipeline):
    """The lowbit format stored the graph's tensors only, so an HF save of its reload had no pooler to write and
    transformers loaded a random one (a warning said so). It stores them beside the graph's (source-unread.safetensors,
    listed as copied_from_source), so the reload's HF save writes the source's pooler bit for bit, without a
    warning; a file that does not hold what the manifest lists is refused by name."""
    from lowbit.checkpoint.hf import MissingTensorsWarning

    embedder, tok = minilm
    source = embedder.encoder
    c = lowbit.compile_model(embedder, tokenizer=tok, pipeline=pipeline)
    saved = lowbit.save(c, tmp_path / "lowbit", format="lowbit")
    assert json.loads((saved / "lowbit-manifest.json").read_text())["lowbit"]["copied_from_source"] == POOLER
    reloaded = lowbit.load(saved)
    with warnings.catch_warnings():
        warnings.simplefilter("error", MissingTensorsWarning)
        out = lowbit.save(reloaded, tmp_path / fmt, format=fmt)
    lb = json.loads((out / "lowbit-manifest.json").read_text())["lowbit"]
    assert (lb["copied_from_source"], lb["not_in_graph"]) == (POOLER, [])
    stored = _pooler_tensors(out)
    assert sorted(stored) == POOLER and all(torch.equal(t, source.state_dict()[k]) for k, t in stored.items())
    enc = tok(["the cat sat on the mat", "hi"], padding=True, return_tensors="pt")
    assert torch.equal(lowbit.load(out)(**enc), c(**enc))
    # the manifest listing a tensor the file does not hold: refused, naming the file
    manifest = json.loads((saved / "lowbit-manifest.json").read_text())
    manifest["lowbit"]["copied_from_source"] = POOLER[:1]
    (saved / "lowbit-manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"source-unread\.safetensors: holds .*copied_from_source"):
        lowbit.load(saved)


@pytest.mark.parametrize("fmt, pipeline", [("hf", None), ("compressed-tensors", "quantize(w=int8)")])
def test_a_save_with_no_source_pooler_warns_that_transformers_randomises_it(minilm, tmp_path, fmt, pipeline):
    """A graph with no record of the source's unread tensors (here dropped, as a graph captured by hand or a lowbit
    checkpoint written before they were stored has none) has no pooler to write: the HF save warns, naming the
    tensors and that transformers initialises them at random, and lists them as not_in_graph. Reloading that
    checkpoint makes a pooler up (compressed-tensors: zeros; hf: transformers' random one), which a further save
    must not write as the source's: it warns again."""
    from lowbit.api import UNREAD_TENSORS
    from lowbit.checkpoint.hf import MissingTensorsWarning

    embedder, tok = minilm
    c = lowbit.compile_model(embedder, tokenizer=tok, pipeline=pipeline)
    c.graph.meta["source"].pop(UNREAD_TENSORS)
    reloaded = lowbit.load(lowbit.save(c, tmp_path / "lowbit", format="lowbit"))
    with pytest.warns(MissingTensorsWarning, match=r"has no pooler\.dense\.bias, pooler\.dense\.weight, .*"
                                                   r"lowbit-format checkpoint.*initialise them at random"):
        out = lowbit.save(reloaded, tmp_path / fmt, format=fmt)
    lb = json.loads((out / "lowbit-manifest.json").read_text())["lowbit"]
    assert (lb["not_in_graph"], "copied_from_source" in lb) == (POOLER, False)
    assert _pooler_tensors(out) == {}
    enc = tok(["the cat sat on the mat", "hi"], padding=True, return_tensors="pt")
    again = lowbit.load(out)
    assert torch.equal(again(**enc), c(**enc))
    with pytest.warns(MissingTensorsWarning, match=r"had none to copy \(a checkpoint reloaded without it"):
        twice = lowbit.save(again, tmp_path / "twice", format=fmt)
    assert _pooler_tensors(twice) == {}


def test_a_float_2_4_model_saves_as_a_sparse_only_compressed_tensors_checkpoint(float_slice, tmp_path):
    """A float 2:4-sparse SmolLM2 (sparsify, no quantizer) was refused by compressed-tensors ('the graph has no
    quantized linear'), so the one HF format that declares 2:4 had no way to hold the model vLLM's 2:4 kernels
    serve. It is written as llm-compressor writes a sparse-only model: float weights, no config_groups, ignoring no
    linear, and the sparsity_config; transformers loads it to the compiled logits and lowbit.load reloads it (float
    weights, the 2:4 marks back)."""
    graph = _compiled(float_slice, "sparsify(method=magnitude,pattern=2:4)")
    ids = float_slice[1][:1, :64]
    ref = TorchCompiled(graph)(ids)
    out = lowbit.save(graph, tmp_path / "ct", format="compressed-tensors")
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (qcfg["config_groups"], qcfg["format"], qcfg["ignore"]) == ({}, "dense", [])
    assert (qcfg["sparsity_config"]["sparsity_structure"], qcfg["sparsity_config"]["ignore"]) == ("2:4", ["lm_head"])
    assert (_hf_logits(out, ids) - ref).abs().max().item() == 0.0
    reloaded = lowbit.load(out)
    assert torch.equal(reloaded(ids), ref)
    marked = {n.module for n in graph.nodes if n.meta.get("sparsity") == "2:4"}
    assert len(marked) == 14 and {n.module for n in reloaded.graph.nodes if n.meta.get("sparsity")} == marked


def test_a_2_4_model_saved_as_hf_reloads_with_its_sparsity(float_slice, tmp_path):
    """format='hf' has no config field for a sparsify pattern, and lowbit.load of such a directory was unmarked: its
    save to compressed-tensors was then refused ('no quantized linear') and said nothing of the 2:4 its weights
    keep. The manifest records each pruned linear's pattern; the reload carries the marks, and its compressed-tensors
    save declares the 2:4."""
    graph = _compiled(float_slice, "sparsify(method=magnitude,pattern=2:4)")
    marked = {n.module for n in graph.nodes if n.meta.get("sparsity") == "2:4"}
    out = lowbit.save(graph, tmp_path / "hf", format="hf")
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    reloaded = lowbit.load(out)
    assert {n.module for n in reloaded.graph.nodes if n.meta.get("sparsity") == "2:4"} == marked
    again = lowbit.save(reloaded, tmp_path / "ct", format="compressed-tensors")
    assert json.loads((again / "config.json").read_text())["quantization_config"]["sparsity_config"][
        "sparsity_structure"] == "2:4"


def test_a_sliced_model_with_heads_pruned_in_one_layer_saves_with_zero_heads(float_slice, tmp_path):
    """A sliced SmolLM2 (slice-residual) whose heads were pruned in one layer only was refused by the HF formats (the
    zero-head fallback for per-layer head counts excluded sliced models), although the sliced config holds the
    unpruned head counts. It is written at the config's 9/3 heads with layer 1's removed heads as zero heads and
    the sliced hidden_size; transformers loads it to the compiled logits."""
    graph = _compiled(float_slice, r"fold-norms,slice-residual(ratio=0.25,calib_n=4),"
                                   r"prune-heads(ratio=0.34,score=magnitude,modules=layers\.1\.)")
    assert graph.meta["pruned"]["heads"] == {"model.layers.0": [9, 3], "model.layers.1": [6, 2]}
    ids = float_slice[1][:1, :32]
    ref = TorchCompiled(graph)(ids)
    out = lowbit.save(graph, tmp_path / "hf", format="hf")
    config = json.loads((out / "config.json").read_text())
    assert (config["hidden_size"], config["num_attention_heads"], config["head_dim"]) == (432, 9, 64)
    manifest = json.loads((out / "lowbit-manifest.json").read_text())["lowbit"]
    assert manifest["zero_heads"]["kept_heads"]["model.layers.1"] == [6, 2]
    assert (_hf_logits(out, ids) - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()


def test_a_sliced_width_that_holds_no_head_count_names_the_pruned_heads(float_slice, tmp_path):
    """SmolLM2 sliced to 448 channels with 6 of its 9 heads kept: transformers takes neither 6 heads (448 / 6) nor,
    for zero heads, 9. The refusal named the 9 heads of the zero-head fallback, which the user never asked for;
    it names the 6 heads they pruned to and the sliced width."""
    graph = _compiled(float_slice, "fold-norms,slice-residual(ratio=0.2,calib_n=4),"
                                   "prune-heads(ratio=0.34,score=magnitude)")
    with pytest.raises(CheckpointError, match=r"hidden size \(448\) is not a multiple of the number of attention heads "
                                              r"\(6\).*format='lowbit'"):
        lowbit.save(graph, tmp_path / "hf", format="hf")


def _gpt2_from_gptq(out: Path) -> torch.nn.Module:
    """transformers' own GPT-2 built from a GPTQ directory's config, each Conv1D weight ([in, out]) the GPTQ
    reference dequantizer's (optimum and GPTQModel are not installed here)."""
    import transformers as t
    from safetensors.torch import load_file

    stored = load_file(str(out / "model.safetensors"))
    state = {k: v for k, v in stored.items() if not k.endswith(("qweight", "qzeros", "scales", "g_idx"))}
    for m in {k.rsplit(".", 1)[0] for k in stored if k.endswith(".qweight")}:
        w = _gptq_reference_dequant(stored[f"{m}.qweight"], stored[f"{m}.qzeros"], stored[f"{m}.scales"],
                                    stored[f"{m}.g_idx"], 4)
        state[f"{m}.weight"] = w.t().contiguous()  # Conv1D: [in, out]
    hf = t.GPT2LMHeadModel(t.AutoConfig.from_pretrained(out)).eval()
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}  # tied to wte
    return hf


def test_a_quantized_gpt2_saves_as_gptq_with_its_conv1d_projections(tmp_path):
    """GPT-2's projections are Conv1D (weight stored [in, out]) and every HF quantized format refused a quantized
    GPT-2. GPTQ's layout does not depend on the module's storage (its loaders build the quantized layer with
    in = Conv1D.weight.shape[0]), so it is written: the GPTQ reference dequantizer's [in, out] weights, put in
    transformers' own GPT-2, give the compiled logits, and lowbit.load reloads it bit-exactly."""
    from conftest import tiny_outside_family
    from safetensors.torch import load_file

    from lowbit.ir.quant import dequantize

    model = tiny_outside_family("gpt2")
    compiled = lowbit.compile_model(model, pipeline="quantize(w=int4,group=32)")
    out = lowbit.save(compiled, tmp_path / "gptq", format="gptq")
    stored = load_file(str(out / "model.safetensors"))
    conv1d = [n for n in compiled.graph.nodes if n.op == "linear" and n.args[1].producer is not None]
    assert len(conv1d) == 8 and all(".h." in n.module for n in conv1d)
    for node in conv1d:
        dq = node.args[1].producer
        want = dequantize(*[a.data if a is not None else None for a in dq.args], **dq.kwargs)
        m = node.module
        got = _gptq_reference_dequant(stored[f"{m}.qweight"], stored[f"{m}.qzeros"], stored[f"{m}.scales"],
                                      stored[f"{m}.g_idx"], 4)
        assert torch.equal(got, want), m
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(_gpt2_from_gptq(out)(ids).logits, compiled(ids), rtol=0, atol=1e-5)
    assert torch.equal(lowbit.load(out)(ids), compiled(ids))


def test_a_head_pruned_quantized_gpt2_saves_as_gptq_with_zero_heads(tmp_path):
    """A head-pruned GPT-2 quantized to int4 and saved as GPTQ: the zero heads were padded along the wrong side of
    its Conv1D codes (the HF weight is [in, out], the codes [out, in]), a raw 'start (64) + length (32) exceeds
    dimension size (64)'. The padding follows the orientation: transformers' GPT-2 with the dequantized weights
    (the config's 4 heads) gives the compiled logits, and lowbit.load reloads it."""
    from conftest import tiny_outside_family

    model = tiny_outside_family("gpt2")
    compiled = lowbit.compile_model(model, pipeline="prune-heads(ratio=0.5,score=magnitude),quantize(w=int4,group=16)")
    out = lowbit.save(compiled, tmp_path / "gptq", format="gptq")
    hf = _gpt2_from_gptq(out)
    assert hf.config.n_head == 4
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, compiled(ids), rtol=0, atol=1e-5)
    torch.testing.assert_close(lowbit.load(out)(ids), compiled(ids), rtol=0, atol=1e-6)


def test_a_2_4_model_saved_as_gptq_reloads_with_its_sparsity_marks(tmp_path):
    """GPTQ's config has no sparsity field and lowbit's GPTQ save recorded none: a 2:4 model saved as GPTQ reloaded
    with no linear marked, so the 2:4 backends were not told and a compressed-tensors save of the reload declared no
    sparsity_config. The manifest keeps the pattern (as format 'hf' does) and the reload marks the same linears."""
    compiled = _compiled_tiny("sparsify(method=magnitude,pattern=2:4),quantize(w=int4,group=32,sym=true)")
    marked = {n.module for n in compiled.graph.nodes if n.meta.get("sparsity") == "2:4"}
    assert marked
    reloaded = lowbit.load(lowbit.save(compiled, tmp_path / "gptq", format="gptq"))
    assert {n.module for n in reloaded.graph.nodes if n.meta.get("sparsity") == "2:4"} == marked
    ids = torch.randint(0, 97, (1, 7))
    torch.testing.assert_close(reloaded(ids), compiled(ids), rtol=0, atol=0)
    ct = lowbit.save(reloaded, tmp_path / "ct", format="compressed-tensors")
    assert json.loads((ct / "config.json").read_text())["quantization_config"]["sparsity_config"][
        "sparsity_structure"] == "2:4"


def test_a_w8a8_gpt2_is_not_sent_between_compressed_tensors_and_gptq(tmp_path):
    """GPT-2's projections are Conv1D: compressed-tensors refused a W8A8 GPT-2 with "save with format='gptq'", and
    GPTQ refused it (weight-only) with "use format='compressed-tensors'", each sending the user to the other. Where
    GPTQ cannot hold the model either, both name format='lowbit' and why, and that save reloads to the same logits;
    a weight-only int4 GPT-2 is still sent to GPTQ."""
    from conftest import tiny_outside_family

    from lowbit.checkpoint import CheckpointError

    torch.manual_seed(0)
    model = tiny_outside_family("gpt2", layers=2)
    w8a8 = lowbit.compile_model(model, pipeline="quantize(w=int8,a=int8)")
    with pytest.raises(CheckpointError, match=r"Conv1D .*save with format='lowbit' \(GPTQ, whose loaders take Conv1D, "
                                              r"cannot hold it either: .*quantized input activations") as ct:
        lowbit.save(w8a8, tmp_path / "ct", format="compressed-tensors")
    assert "format='gptq'" not in str(ct.value)
    with pytest.raises(CheckpointError, match=r"weight-only; use format='lowbit' \(compressed-tensors quantizes "
                                              r"nn.Linear modules only, and this is a Conv1D\)") as gptq:
        lowbit.save(w8a8, tmp_path / "gptq", format="gptq")
    assert "compressed-tensors'" not in str(gptq.value)
    ids = torch.randint(0, 100, (1, 8))
    torch.testing.assert_close(lowbit.load(lowbit.save(w8a8, tmp_path / "lb", format="lowbit"))(ids), w8a8(ids),
                               rtol=0, atol=0)
    w4 = lowbit.compile_model(model, pipeline="quantize(w=int4,group=32,sym=true)")
    with pytest.raises(CheckpointError, match=r"save with format='gptq' \(symmetric int4/int8 weight-only"):
        lowbit.save(w4, tmp_path / "ct4", format="compressed-tensors")


@pytest.fixture(autouse=True)
def _one_export_per_model(reuse_captures: object) -> None:
    """Every test here captures through the session's capture cache (conftest's ``reuse_captures``): the same tiny
    model compiled or reloaded again is not exported again."""


def test_loads_of_one_architecture_capture_it_once_and_each_keeps_its_own_weights(float_slice, tmp_path,
                                                                                    monkeypatch):
    """lowbit.load of a compressed-tensors checkpoint built the HF model and exported it again every time (~90% of a
    load). The same architecture (config less its quantization settings, shapes, dtypes) is captured once per
    process; a later load gets that graph bound to its own tensors: two checkpoints of the 2-block SmolLM2 under
    other recipes and other float norms, and a reload, each give their own compile's logits on real text, bit for
    bit, and the first reload still does after the others."""
    import importlib

    from lowbit.checkpoint import reuse

    reuse.clear()
    captures = []
    module = importlib.import_module("lowbit.ir.capture")  # lowbit.ir.capture is also the function's name
    real_capture = module.capture
    monkeypatch.setattr(module, "capture", lambda *a, **k: captures.append(1) or real_capture(*a, **k))
    graph, ids, _ = float_slice
    ids = ids[:1, :96]
    other = graph.clone()
    other.set_param("model.norm.weight", other.params["model.norm.weight"].data * 1.5)
    compiled = {"int4": _compiled(float_slice, "quantize(w=int4,group=64)"),
                "int8": _compiled((other, *float_slice[1:]), "quantize(w=int8,a=int8)")}
    loaded = {}
    for name, g in [*compiled.items(), ("int4-again", compiled["int4"])]:
        loaded[name] = lowbit.load(lowbit.save(g, tmp_path / name, format="compressed-tensors"))
        _assert_same_graph(g, loaded[name].graph)
        assert torch.equal(loaded[name](ids), TorchCompiled(g)(ids)), name
    assert len(captures) == 1
    assert [bool(m.graph.meta.get("capture_reused")) for m in loaded.values()] == [False, True, True]
    assert torch.equal(loaded["int4"](ids), TorchCompiled(compiled["int4"])(ids))
    assert not torch.equal(loaded["int4"](ids), loaded["int8"](ids))


def test_a_load_writes_the_stored_codes_without_quantizing_its_placeholder_weights(float_slice, tmp_path,
                                                                                     monkeypatch):
    """lowbit.load ran the quantize pass's RTN (observers, rounding, int4 packing, a NaN scan) on every quantized
    linear's zero placeholder weight, then replaced all of it with the stored codes: ~60% of a SmolLM2 load. The
    stored codes are written as the weights' QDQ directly, checked against the shapes RTN would make (worked out
    on meta); with RTN and the scan made to fail, each format reloads to its compile's logits on real text, bit for
    bit (asymmetric int4 with zero points, int8 with dynamic int8 inputs, GPTQ)."""
    import lowbit.passes.insert_qdq as insert_qdq

    cases = [("compressed-tensors", "quantize(w=uint4,group=64,sym=false)"),
             ("compressed-tensors", "quantize(w=int8,a=int8)"), ("gptq", "quantize(w=int4,group=64)")]
    saved = []
    for i, (fmt, pipeline) in enumerate(cases):
        graph = _compiled(float_slice, pipeline)
        saved.append((graph, lowbit.save(graph, tmp_path / f"ck{i}", format=fmt)))

    def refuse(*args, **kwargs):
        raise AssertionError("a load quantized a placeholder weight")

    monkeypatch.setattr(insert_qdq, "_insert_weight_qdq", refuse)
    monkeypatch.setattr(insert_qdq, "nonfinite_problem", refuse)
    ids = float_slice[1][:1, :96]
    for graph, directory in saved:
        loaded = lowbit.load(directory)
        _assert_same_graph(graph, loaded.graph)
        assert torch.equal(loaded(ids), TorchCompiled(graph)(ids)), directory


def test_generation_loads_of_one_architecture_capture_the_step_once_and_generate_their_own_tokens(tmp_path,
                                                                                                   monkeypatch):
    """The step graph a ``generation=`` load captures is kept per architecture and spec too: two random Llamas of
    one config under other recipes, loaded in turn and the first again, capture the step once and generate the
    greedy tokens of their own compiles."""
    import importlib

    from lowbit.checkpoint import reuse

    reuse.clear()
    captures = []
    module = importlib.import_module("lowbit.ir.capture")
    real_capture = module.capture
    spec = lowbit.GenerationSpec(max_length=32, max_batch=2)
    compiled = {}
    for seed, pipeline in ((0, "quantize(w=int4,group=32)"), (1, "quantize(w=int8)")):
        torch.manual_seed(seed)
        model = tiny_llama(layers=1, hidden=64, inter=128, heads=4, kv_heads=2, vocab=97, max_positions=64)
        compiled[seed] = lowbit.compile_model(model, pipeline=pipeline, generation=spec)
        lowbit.save(compiled[seed], tmp_path / str(seed), format="compressed-tensors")
    monkeypatch.setattr(module, "capture", lambda *a, **k: captures.append(1) or real_capture(*a, **k))
    prompts = [[1, 5, 9, 12], [3, 4]]
    tokens = {}
    for seed in (0, 1, 0):
        loaded = lowbit.load(tmp_path / str(seed), generation=spec)
        tokens[seed] = loaded.generate(prompts, max_new_tokens=4).tokens
        assert tokens[seed] == compiled[seed].generate(prompts, max_new_tokens=4).tokens, seed
    assert len(captures) == 1 and tokens[0] != tokens[1]


@pytest.fixture(autouse=True)
def _fresh_load_captures() -> None:
    """Overrides conftest's (which forgets ``lowbit.checkpoint.reuse``'s kept captures before every test): here a
    load reuses the capture an earlier test's load of the same architecture made, as loads within one process do:
    ~40 loads of a handful of architectures (the 2-block SmolLM2 slice most of them) each exported it again (~13 of
    the file's ~280 CPU-s). The logits and tensors each test compares are its own checkpoint's either way; no test
    here changes what a capture runs without clearing the cache itself (test_loads_of_one_architecture_capture_it_
    once_..., test_generation_loads_of_one_architecture_...), and the first load of each architecture still
    captures afresh."""
