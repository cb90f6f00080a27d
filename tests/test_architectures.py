"""Any architecture: every step of a lowbit compile on tiny random-initialised Hugging Face models of the common
families, each cell of the README's family × step matrix one test.

A cell either works (with a numeric check: capture reproduces the HF model; fold-norms is exact in float64;
quantized models stay close to float; ONNX Runtime matches the torch reference; transformers loads the
compressed-tensors checkpoint with the same outputs and lowbit reloads it bit-exactly; greedy generation through
the KV-cache step graph gives transformers' tokens) or is refused with a
named reason that ``EXPECTED`` states. Any other exception fails the test. ``tools/arch_matrix.py`` runs these
tests with ``LOWBIT_ARCH_MATRIX=FILE`` (each outcome is appended there) and writes the README table.

Shapes: GQA ratios 8 (Llama, Qwen3, Granite, Phi-3) and 7 (Mistral, Qwen2), q/k/v biases (Qwen2), q/k norms
(Qwen3, OLMo 2), sandwich norms and soft-capping (Gemma 2/3), Granite 3's multipliers (embedding 12, residual
0.22, attention 1/64, logits / 8), tied (Qwen2, Gemma) and untied embeddings; the slow ``qwen2-896`` row has
Qwen2-0.5B's 896/4864 sizes. Decoders use SmolLM2's 49152-token vocabulary so the
shipped calibration text tokenizes for them.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import pytest
import torch

import lowbit
from lowbit.api import describe_source
from lowbit.backends.torch_backend import TorchCompiled
from lowbit.ir.capture import capture
from lowbit.models import CausalLMLogits, SentenceEmbedder
from lowbit.passes.manager import PassManager, build_pass, parse_pipeline

VOCAB = 49152
DEC = dict(vocab_size=VOCAB, num_hidden_layers=1, max_position_embeddings=256)


def _decoders() -> dict[str, Any]:
    import transformers as t

    return {
        "llama": lambda: t.LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=8,
                                       num_key_value_heads=1, tie_word_embeddings=False, **DEC),
        "mistral": lambda: t.MistralConfig(hidden_size=112, intermediate_size=224, num_attention_heads=7,
                                           num_key_value_heads=1, head_dim=16, sliding_window=None, **DEC),
        "qwen2": lambda: t.Qwen2Config(hidden_size=112, intermediate_size=224, num_attention_heads=7,
                                       num_key_value_heads=1, tie_word_embeddings=True, **DEC),
        "qwen3": lambda: t.Qwen3Config(hidden_size=64, intermediate_size=128, num_attention_heads=8,
                                       num_key_value_heads=1, head_dim=16, tie_word_embeddings=False, **DEC),
        "gemma": lambda: t.GemmaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                       num_key_value_heads=2, head_dim=16, **DEC),
        "gemma2": lambda: t.Gemma2Config(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                         num_key_value_heads=2, head_dim=16, **DEC),
        "gemma3": lambda: t.Gemma3TextConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                             num_key_value_heads=2, head_dim=16, **DEC),
        "phi3": lambda: t.Phi3Config(hidden_size=64, intermediate_size=128, num_attention_heads=8,
                                     num_key_value_heads=1, pad_token_id=0, **DEC),
        "olmo2": lambda: t.Olmo2Config(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                       num_key_value_heads=4, **DEC),
        "gpt-neox": lambda: t.GPTNeoXConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                            **DEC),
        "stablelm": lambda: t.StableLmConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                             num_key_value_heads=4, **DEC),
        "granite": lambda: t.GraniteConfig(hidden_size=64, intermediate_size=128, num_attention_heads=8,
                                           num_key_value_heads=1, embedding_multiplier=12.0, residual_multiplier=0.22,
                                           attention_multiplier=0.015625, logits_scaling=8.0, **DEC),
        "qwen2-896": lambda: t.Qwen2Config(hidden_size=896, intermediate_size=4864, num_attention_heads=14,
                                           num_key_value_heads=2, tie_word_embeddings=True, **DEC),
    }


def _encoders() -> dict[str, Any]:
    import transformers as t

    enc = dict(vocab_size=30522, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=1)
    return {
        "bert": lambda: t.BertConfig(**enc),
        "roberta": lambda: t.RobertaConfig(**enc),
        "distilbert": lambda: t.DistilBertConfig(vocab_size=30522, dim=64, hidden_dim=128, n_heads=4, n_layers=1),
        "vit": lambda: t.ViTConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                   num_hidden_layers=1, image_size=32, patch_size=8),
    }


FAMILIES = [*_decoders(), *_encoders()]
STEPS = ["capture", "fold-norms", "rotate", "smooth-quant", "quantize", "gptq", "onnx", "compressed-tensors",
         "generate"]
SLOW_FAMILIES = {"qwen2-896"}

_POST_NORM = "post-norm encoder: the norm's output feeds the residual stream"
EXPECTED: dict[tuple[str, str], str] = {
    # (family, step) -> regex of the refusal; cells not listed must work
    **{(f, "fold-norms"): _POST_NORM for f in ("bert", "roberta", "distilbert")},
    **{(f, "rotate"): "sandwich / post-norm" for f in ("gemma2", "gemma3", "olmo2")},
    **{(f, "rotate"): "is a LayerNorm" for f in ("gpt-neox", "stablelm", "bert", "roberta", "distilbert")},
    ("vit", "rotate"): "no embedding node",
    **{(f, "smooth-quant"): "no place to fold scales" for f in ("bert", "roberta", "distilbert")},
    ("vit", "compressed-tensors"): "pixel",
    **{(f, "generate"): "no causal-LM head" for f in ("bert", "roberta", "distilbert", "vit")},
}


class Refused(Exception):
    """A step lowbit declines on this architecture, with the reason it gives."""


# ---- building and capturing ---------------------------------------------------------------------

_CACHE: dict[tuple[str, str], Any] = {}


class ViTEmbedder(torch.nn.Module):
    """pixel_values -> last hidden state of a ViT (lowbit has no shipped wrapper for vision models)."""

    def __init__(self, vit: torch.nn.Module) -> None:
        super().__init__()
        self.vit = vit

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.vit(pixel_values=pixel_values).last_hidden_state


def _minilm_tokenizer() -> Any:
    from lowbit.models import load_minilm

    if "tok" not in _CACHE:
        _CACHE["tok"] = load_minilm()[1]
    return _CACHE["tok"]


def _smollm2_tokenizer() -> Any:
    from lowbit.models import load_smollm2_tokenizer

    if "stok" not in _CACHE:
        _CACHE["stok"] = load_smollm2_tokenizer()
    return _CACHE["stok"]


def build(family: str, dtype: torch.dtype = torch.float32) -> tuple[torch.nn.Module, Any, tuple, Any, Any]:
    """(wrapper module, tokenizer, example inputs, dynamic shapes, captured graph) of a tiny random model."""
    key = (family, str(dtype))
    if key in _CACHE:
        return _CACHE[key]
    from transformers import AutoModel, AutoModelForCausalLM

    from lowbit.api import _default_example

    torch.manual_seed(0)
    decoders = _decoders()
    if family in decoders:
        cfg = decoders[family]()
        model = CausalLMLogits(AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()).eval()
        tok = _smollm2_tokenizer()
        example, dyn = _default_example(model, tok)
    elif family == "vit":
        cfg = _encoders()[family]()
        model = ViTEmbedder(AutoModel.from_config(cfg, dtype=dtype).eval()).eval()
        tok = None
        example = (torch.randn(2, 3, 32, 32, dtype=dtype),)
        dyn = {"pixel_values": {0: torch.export.Dim.DYNAMIC(min=1, max=64)}}
    else:
        cfg = _encoders()[family]()
        model = SentenceEmbedder(AutoModel.from_config(cfg, dtype=dtype).eval()).eval()
        tok = _minilm_tokenizer()
        example, dyn = _default_example(model, tok)
    graph = capture(model, example, dyn)
    graph.meta["source"] = describe_source(model, graph)  # as compile_model records it
    if tok is not None:
        graph.meta["tokenizer"] = tok
    _CACHE[key] = (model, tok, example, dyn, graph)
    return _CACHE[key]


def _inputs(family: str, model: torch.nn.Module, tok: Any) -> tuple:
    """Real text where there is a tokenizer (WikiText-2 for decoders), else a fixed random image batch."""
    if family == "vit":
        g = torch.Generator().manual_seed(1)
        return (torch.randn(3, 3, 32, 32, generator=g),)
    if isinstance(model, CausalLMLogits):
        from lowbit.eval.perplexity import token_ids, windows

        return (windows(token_ids("wikitext2-test", tok), 48, 2),)
    enc = tok(["The tower is 324 metres tall.", "It was the first structure to reach a height of 300 metres."],
              padding=True, return_tensors="pt")
    return (enc["input_ids"], enc["attention_mask"])


def _close(a: torch.Tensor, b: torch.Tensor, rel: float) -> float:
    err = (a.double() - b.double()).abs().max().item() / max(b.double().abs().max().item(), 1e-12)
    assert err <= rel, f"relative error {err:.3g} > {rel}"
    return err


CALIB = "calib_n=4,calib_len=32,batch_size=4,progress=false"


def _quantized(graph: Any, pipeline: str = "quantize(w=int4,group=16)", calib: Any = None) -> Any:
    """``graph`` through ``pipeline``; ``calib``: the calibrating passes' data instead of their text (a pixel
    model's float inputs)."""
    g = graph.clone()
    passes = parse_pipeline(pipeline)
    if calib is not None:
        # the passes that read data (as compile_model(calib=) picks them): quantize with dynamic scales reads none
        passes = [build_pass(type(p), {**p.options.model_dump(), "calib": calib})
                  if "calib" in p.Options.model_fields and p.options.reads_calibration() else p for p in passes]
    PassManager(passes).run(g)
    return g


def _pixels(x: tuple[Any, ...]) -> Any:
    """Calibration inputs for a pixel model: float images shaped like its example input (a text cannot be)."""
    return torch.randn(4, *x[0].shape[1:], generator=torch.Generator().manual_seed(1), dtype=x[0].dtype)


# ---- the steps ----------------------------------------------------------------------------------


def step_capture(family: str) -> None:
    model, tok, _, _, graph = build(family)
    x = _inputs(family, model, tok)
    with torch.no_grad():
        ref = model(*x)
    _close(TorchCompiled(graph)(*x), ref, 1e-5)


def step_fold_norms(family: str) -> None:
    model, tok, example, dyn, _ = build(family, torch.float64)
    graph = build(family, torch.float64)[4].clone()
    x = _inputs(family, model, tok)
    x = tuple(t.double() if t.is_floating_point() else t for t in x)
    result = PassManager(parse_pipeline("fold-norms")).run(graph)
    stats = result.records[0].stats
    if not stats.get("folded"):
        reasons = "; ".join(stats.get("not_folded", [])) or "no norm the pass recognises (rms_norm/layer_norm)"
        if any("residual" in r or "read by" in r for r in stats.get("not_folded", [])):
            raise Refused(f"{_POST_NORM} ({reasons})")
        raise Refused(reasons)
    with torch.no_grad():
        ref = model(*x)
    _close(TorchCompiled(graph)(*x), ref, 1e-12)


def step_rotate(family: str) -> None:
    """fold-norms + the Hadamard rotation (residual stream, per-head V/O, online down_proj and keys) leave the
    float64 graph's outputs unchanged to 1e-9, with float64 norm statistics (HF's RMSNorm takes them in float32
    even in a float64 model, a 1e-7 rounding of a rotated stream)."""
    from conftest import float64_norm_stats

    model, tok, _, _, graph = build(family, torch.float64)
    base = float64_norm_stats(graph.clone())
    rotated = base.clone()
    PassManager(parse_pipeline("fold-norms,rotate(kind=hadamard)")).run(rotated)
    x = _inputs(family, model, tok)
    x = tuple(t.double() if t.is_floating_point() else t for t in x)
    _close(TorchCompiled(rotated)(*x), TorchCompiled(base)(*x), 1e-9)


def step_smooth_quant(family: str) -> None:
    model, tok, _, _, graph = build(family)
    x = _inputs(family, model, tok)
    g = _quantized(graph, f"smooth-quant({CALIB}),quantize(w=int8,a=int8)", _pixels(x) if tok is None else None)
    with torch.no_grad():
        ref = model(*x)
    cos = torch.nn.functional.cosine_similarity(TorchCompiled(g)(*x).flatten(), ref.flatten(), dim=0).item()
    assert cos > 0.99, cos


def step_quantize(family: str) -> None:
    model, tok, _, _, graph = build(family)
    g = _quantized(graph, "quantize(w=int8,a=int8)")
    x = _inputs(family, model, tok)
    with torch.no_grad():
        ref = model(*x)
    cos = torch.nn.functional.cosine_similarity(TorchCompiled(g)(*x).flatten(), ref.flatten(), dim=0).item()
    assert cos > 0.99, cos
    assert sum(1 for n in g.nodes if n.op == "dequantize") >= 4


def step_gptq(family: str) -> None:
    model, tok, _, _, graph = build(family)
    x = _inputs(family, model, tok)
    g = _quantized(graph, f"gptq(w=int4,group=16,sym=true,{CALIB})", _pixels(x) if tok is None else None)
    assert torch.isfinite(TorchCompiled(g)(*x)).all()


def step_onnx(family: str, tmp_path: Any) -> None:
    from lowbit.backends.onnxruntime_backend import OrtCompiled

    model, tok, _, _, graph = build(family)
    g = _quantized(graph)
    x = _inputs(family, model, tok)
    path = lowbit.export(g, tmp_path / "m.onnx")
    _close(OrtCompiled.load(path)(*x), TorchCompiled(g)(*x), 1e-4)


def step_compressed_tensors(family: str, tmp_path: Any) -> None:
    from transformers import AutoModel, AutoModelForCausalLM

    model, tok, _, _, graph = build(family)
    if tok is None:
        raise Refused("lowbit records no HF wrapper for a pixel-input model (save needs config= and kind=)")
    g = _quantized(graph)
    out = lowbit.save(g, tmp_path / "ct", format="compressed-tensors")
    x = _inputs(family, model, tok)
    ref = TorchCompiled(g)(*x)
    if isinstance(model, CausalLMLogits):
        hf = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True).eval()
        with torch.no_grad():
            got = hf(*x).logits
    else:
        hf = SentenceEmbedder(AutoModel.from_pretrained(str(out), local_files_only=True).eval()).eval()
        with torch.no_grad():
            got = hf(*x)
    _close(got, ref, 1e-5)
    loaded = lowbit.load(out)
    assert torch.equal(loaded(*x), ref)


GEN_PROMPTS = ["The capital of France is", "Once upon a time, in a small village,"]


def _sharp_step_model(cfg: Any, prepare: Any = None) -> tuple[Any, Any, Any]:
    """A random HF causal LM of ``cfg`` with its weights x4 (sharper logits than the init's: greedy ties would not
    test anything), SmolLM2's tokenizer and the model compiled for generation (max_length 32, batch 2).
    ``prepare(hf)``, if given, changes the model's weights further before the compile."""
    import transformers as t

    from lowbit.generate import GenerationSpec

    torch.manual_seed(0)
    hf = t.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.mul_(4)
        if prepare is not None:
            prepare(hf)
    tok = _smollm2_tokenizer()
    return hf, tok, lowbit.compile_model(hf, tokenizer=tok, generation=GenerationSpec(max_length=32, max_batch=2))


def _assert_greedy_as_uncached_forward(hf: Any, prompts: list[list[int]], got: list[list[int]], n: int,
                                       family: str) -> None:
    """Each prompt's ``n`` greedy tokens equal the model's forward over the whole sequence without a cache (where
    transformers' own ``generate`` is not the reference: it leaves that forward on some sliding layers)."""
    for p, tokens in zip(prompts, got):
        seq = list(p)
        with torch.no_grad():
            for _ in range(n):
                seq.append(int(hf(torch.tensor([seq]), use_cache=False).logits[0, -1].argmax()))
        assert tokens == seq[len(p):], f"{family}: {tokens} != transformers' forward {seq[len(p):]}"


def _assert_greedy_as_transformers(hf: Any, prompts: list[list[int]], got: list[list[int]], new: int,
                                   family: str = "") -> None:
    """Each prompt's tokens from lowbit equal transformers' greedy ``generate`` of ``new`` tokens on it alone."""
    for p, tokens in zip(prompts, got):
        ids = torch.tensor([p])
        with torch.no_grad():
            ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                              do_sample=False)
        assert tokens == ref[0, len(p):].tolist(), f"{family}: {tokens} != transformers' {ref[0, len(p):].tolist()}"


def step_generate(family: str) -> None:
    """Greedy tokens of a two-prompt batch (different lengths: left padding) through the compiled step graph with
    its KV cache, on the torch reference in float32, equal transformers' ``generate`` prompt by prompt."""
    from lowbit.generate import GenerationSpec

    model, tok, _, _, _ = build(family)
    if not isinstance(model, CausalLMLogits):  # the wrapper has no lm_head: lowbit's own refusal, before capture
        lowbit.compile_model(model, generation=GenerationSpec(max_length=32, max_batch=2))
        raise AssertionError(f"{family}: generation compiled an encoder")
    hf = model.model
    cm = lowbit.compile_model(hf, tokenizer=tok, generation=GenerationSpec(max_length=32, max_batch=2))
    assert cm.graph.outputs[0].tensor_type.shape[1] == 1  # last-logits found the final norm
    prompts = [tok(p).input_ids for p in GEN_PROMPTS]
    _assert_greedy_as_transformers(hf, prompts, cm.generate(prompts, 8, stop_tokens=()).tokens, 8, family)


@pytest.mark.parametrize("family", ["olmo", "starcoder2", "phi", "smollm3", "ministral"])
def test_generate_matches_transformers_beyond_the_matrix(family):
    """OLMo (non-parametric LayerNorm), StarCoder2 (LayerNorm with biases, a c_fc/c_proj GELU MLP, biased
    projections), Phi 1/2 (parallel attention and mlp on one norm, partial rotary, final_layernorm), SmolLM3 (NoPE
    layers: ``no_rope_layers`` leaves rotary out of some layers' attention) and Ministral (a 4-token sliding window
    on some layers, by ``layer_types``, shorter than the prompts; against transformers' forward) step as
    transformers' generate does token for token, so ``STEP_MODEL_TYPES`` takes them; only their generate cell is
    checked (the matrix's other steps would add ~30 s a family to the default suite)."""
    import transformers as t

    cfg = {"olmo": lambda: t.OlmoConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                        num_key_value_heads=4, pad_token_id=0, **DEC),
           "starcoder2": lambda: t.Starcoder2Config(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                                    num_key_value_heads=2, **DEC),
           # Phi 1/2: parallel attention and gelu fc1/fc2 mlp on one LayerNorm, partial rotary, final_layernorm,
           # biased lm_head; qk_layernorm on
           "phi": lambda: t.PhiConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                      partial_rotary_factor=0.5, qk_layernorm=True, **DEC),
           # SmolLM3: a rotary layer and a NoPE one (its default makes every 4th layer NoPE)
           "smollm3": lambda: t.SmolLM3Config(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                              num_key_value_heads=2, pad_token_id=0,
                                              **{**DEC, "num_hidden_layers": 2}, no_rope_layers=[1, 0]),
           "ministral": lambda: t.MinistralConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                                  num_key_value_heads=2, head_dim=16, sliding_window=4,
                                                  layer_types=["sliding_attention", "full_attention"],
                                                  **{**DEC, "num_hidden_layers": 2})}[family]()
    hf, tok, cm = _sharp_step_model(cfg)
    prompts = [tok(p).input_ids for p in GEN_PROMPTS]
    got = cm.generate(prompts, 8, stop_tokens=()).tokens
    if family != "ministral":
        _assert_greedy_as_transformers(hf, prompts, got, 8, family)
        return
    # transformers' own generate leaves its forward on Ministral's sliding layers once a 5-token prompt passes the
    # window (its 3rd new token differs from the full forward's argmax, measured with transformers 5.25): the
    # reference is the model's forward over the whole sequence, without a cache
    _assert_greedy_as_uncached_forward(hf, prompts, got, 8, family)


def run_step(family: str, step: str, tmp_path: Any) -> str:
    """'works', or 'refused: <reason>' for a named refusal (Refused, PassError, CheckpointError, CaptureError,
    GenerationError)."""
    from lowbit.checkpoint import CheckpointError
    from lowbit.ir.capture import CaptureError
    from lowbit.models import GenerationError
    from lowbit.passes.base import PassError
    from lowbit.passes.manager import PipelineError

    fn = {"capture": step_capture, "fold-norms": step_fold_norms, "rotate": step_rotate,
          "smooth-quant": step_smooth_quant,
          "quantize": step_quantize, "gptq": step_gptq, "onnx": step_onnx,
          "compressed-tensors": step_compressed_tensors, "generate": step_generate}[step]
    try:
        fn(family, tmp_path) if step in ("onnx", "compressed-tensors") else fn(family)
    except (Refused, PassError, CheckpointError, CaptureError, PipelineError, GenerationError) as exc:
        return f"refused: {str(exc).splitlines()[0]}"
    return "works"


def _cells() -> list[Any]:
    """Every (family, step) cell; the families in ``SLOW_FAMILIES`` (real-size widths) only with LOWBIT_SLOW=1. The
    rest of the matrix runs in the default suite: 87 cells took 72 s on 2 cores with two workers (qwen2-896's six
    alone ~33 s), once triton 3.8's interpreter had halved the suite. The generate column and the window tests added
    54 s of the file's 396 s summed test time (14%, measured on a CPU another run was loading: ~3 s a decoder cell,
    most of it capturing the step graph)."""
    return [pytest.param(family, step, marks=pytest.mark.slow) if family in SLOW_FAMILIES else (family, step)
            for family in FAMILIES for step in STEPS]


@pytest.mark.parametrize("family,step", _cells())
def test_architecture_step(family, step, tmp_path):
    outcome = run_step(family, step, tmp_path)
    sink = os.environ.get("LOWBIT_ARCH_MATRIX")
    if sink:
        with open(sink, "a") as f:
            f.write(json.dumps({"family": family, "step": step, "outcome": outcome}) + "\n")
    want = EXPECTED.get((family, step))
    if want is None:
        assert outcome == "works", f"{family} / {step}: {outcome}"
    else:
        assert outcome.startswith("refused: ") and re.search(want, outcome), f"{family} / {step}: {outcome}"


def test_pixel_model_calibrates_on_float_inputs_not_text():
    """A text cannot calibrate a model that reads pixels: the error says what to give (it was a dtype error from
    deep inside the patch convolution); float inputs of the right rank calibrate it."""
    from lowbit.passes.manager import PipelineError

    model, tok, _, _, graph = build("vit")
    with pytest.raises(PipelineError, match=r"input %pixel_values is f32\[.*\], not token ids, so a text cannot "
                                            r"calibrate it: give calib= float model inputs \[n, 3, "):
        _quantized(graph, f"gptq(w=int4,group=16,{CALIB})")
    x = _inputs("vit", model, tok)
    with pytest.raises(PipelineError, match=r"calibration inputs \(4, 3\) do not fit the graph's input"):
        _quantized(graph, f"gptq(w=int4,group=16,{CALIB})", torch.randn(4, 3))
    assert torch.isfinite(TorchCompiled(_quantized(graph, f"gptq(w=int4,group=16,{CALIB})", _pixels(x)))(*x)).all()


@pytest.mark.parametrize("family", ["mistral", "gemma3"])
def test_generate_with_a_sliding_window_shorter_than_the_text(family):
    """A 4-token sliding window (every Mistral layer; Gemma 3's sliding layer type, with its own rotary base) over
    prompts and generations longer than it: the step's windowed mask gives transformers' greedy tokens, and so does
    the packed KV cache (int8; every token a window of 4 reads sits in its float ring), whose attention masks the
    window by ``sliding``."""
    from transformers import AutoModelForCausalLM

    from lowbit.generate import GenerationSpec

    config = _decoders()[family]()
    config.sliding_window = 4
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    spec = GenerationSpec(max_length=32, max_batch=2)
    cm = lowbit.compile_model(hf, generation=spec)
    assert cm.graph.meta["generation"]["windows"] == [4]
    prompts = [[1, 450, 7483, 310, 3444, 338], [5, 6, 7]]
    _assert_greedy_as_transformers(hf, prompts, cm.generate(prompts, 10, stop_tokens=()).tokens, 10, family)
    packed = lowbit.compile_model(hf, pipeline="kv-cache(bits=8,v_group=16)", generation=spec)
    _assert_greedy_as_transformers(hf, prompts, packed.generate(prompts, 10, stop_tokens=()).tokens, 10, family)


def test_generation_refuses_a_family_its_step_was_not_checked_on():
    """GLM's layer has Llama's module names (q/k/v/o_proj, input/post_attention_layernorm, mlp, rotary_emb) but
    rotates interleaved channel pairs of a partial rotary: stepped by those names it made other tokens than
    transformers' (measured: the 7th of 8 differed, logits off by 4e-3 of 0.6) without an error, so a model_type
    outside ``STEP_MODEL_TYPES`` is refused by name before capture (and the rotary probe would refuse it too)."""
    from transformers import GlmConfig, GlmForCausalLM

    from lowbit.models import GenerationError, _rotary_form

    glm = GlmForCausalLM(GlmConfig(vocab_size=128, hidden_size=64, intermediate_size=64, num_attention_heads=4,
                                   num_key_value_heads=2, head_dim=16, num_hidden_layers=1, pad_token_id=0,
                                   eos_token_id=1, bos_token_id=2)).eval()
    with pytest.raises(GenerationError, match=r"GlmForCausalLM \(model_type 'glm'\).*not been checked against "
                                              r"transformers' generate"):
        lowbit.compile_model(glm, generation=True)
    # the rotary probe refuses it on its own: tables laid out for half-split pairs, a rotate function of adjacent ones
    with pytest.raises(GenerationError, match=r"GlmForCausalLM: its rotary tables repeat each angle for half-split "
                                              r"pairs but its rotate function turns adjacent pairs"):
        _rotary_form(glm, glm.model.layers[0].self_attn)


def test_static_batch_graph_refuses_calibration_samples_that_do_not_fill_it():
    """A ViT compiled from a 3-image example has a static batch of 3: calib_n=4 made a last batch of 1 that failed
    inside the class-token cat ('Expected size 3 but got size 1'), with advice (compile_model(model)) that cannot
    capture a pixel model. Refused before calibration runs, naming the batch and what to give; 6 samples work."""
    import transformers as t

    from lowbit.api import compile_model
    from lowbit.passes.manager import PipelineError

    torch.manual_seed(0)
    vit = t.ViTModel(t.ViTConfig(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=1,
                                 image_size=16, patch_size=8)).eval()
    x = torch.randn(3, 3, 16, 16)
    pipeline = "smooth-quant(calib_n={n},progress=false),quantize(w=int8,a=int8)"
    with pytest.raises(PipelineError, match=r"static batch of 3 \(%pixel_values f32\[3,3,16,16\].*4 calibration "
                                            r"samples do not fill \(a last batch of 1\): give calib_n as a multiple "
                                            r"of 3.*dynamic_shapes="):
        compile_model(vit, (x,), pipeline=pipeline.format(n=4), calib=torch.randn(4, 3, 16, 16))
    c = compile_model(vit, (x,), pipeline=pipeline.format(n=6), calib=torch.randn(6, 3, 16, 16))
    torch.testing.assert_close(c(x)[0], vit(x)[0], rtol=0.05, atol=0.05)


def test_a_batch_size_other_than_a_static_batch_is_refused_naming_both():
    """A ViT captured from 3 images calibrates 3 at a time whatever batch_size says: batch_size=2 was replaced by 3
    without a word. It is refused naming both values; batch_size=3 (or none) runs."""
    import transformers as t

    from lowbit.api import compile_model
    from lowbit.passes.manager import PipelineError

    torch.manual_seed(0)
    vit = t.ViTModel(t.ViTConfig(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=1,
                                 image_size=16, patch_size=8)).eval()
    x, calib = torch.randn(3, 3, 16, 16), torch.randn(3, 3, 16, 16)
    pipeline = "smooth-quant(calib_n=3,progress=false{}),quantize(w=int8,a=int8)"
    with pytest.raises(PipelineError, match=r"pass smooth-quant\(.*\) \(#0\) failed: option batch_size=2: the graph "
                                            r"was captured with a static batch of 3 \(%pixel_values f32\[3,3,16,16\]"
                                            r".*give batch_size=3 or drop it"):
        compile_model(vit, (x,), pipeline=pipeline.format(",batch_size=2"), calib=calib)
    for given in (",batch_size=3", ""):
        compile_model(vit, (x,), pipeline=pipeline.format(given), calib=calib)


def test_pixel_model_calibration_counts_images_not_pixels():
    """A ViT's calibration stats counted every pixel as a token (calib_tokens=4*3*16*16=3072 for 4 images): they
    count the images now, under a name that says so, in the weight calibration (gptq) and the activation passes."""
    import transformers as t

    from lowbit.api import compile_model

    vit = t.ViTModel(t.ViTConfig(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=1,
                                 image_size=16, patch_size=8)).eval()
    x = torch.randn(2, 3, 16, 16)
    pipeline = "smooth-quant(progress=false),gptq(w=int8,progress=false)"
    c = compile_model(vit, (x,), pipeline=pipeline, calib=torch.randn(4, 3, 16, 16),
                      dynamic_shapes={"pixel_values": {0: torch.export.Dim.DYNAMIC}})
    for rec in c.report.pipeline.records:
        assert rec.stats["calib_images"] == 4 and "calib_tokens" not in rec.stats, (rec.spec, rec.stats)


def test_autoround_tunes_a_vits_pooler_against_the_graphs_output():
    """autoround on a ViT failed with 'block tuning: the block exports no float tensor to match': its pooler sits
    after the last block, in a stage no later stage reads, so it had no target. The suffix is tuned against the
    graph's outputs, and both stages are counted."""
    import transformers as t

    from lowbit.api import compile_model

    vit = t.ViTModel(t.ViTConfig(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=1,
                                 image_size=16, patch_size=8)).eval()
    x = torch.randn(2, 3, 16, 16)
    c = compile_model(vit, (x,), pipeline="autoround(w=int4,group=16,iters=2,progress=false)",
                      calib=torch.randn(4, 3, 16, 16), dynamic_shapes={"pixel_values": {0: torch.export.Dim.DYNAMIC}})
    stats = c.report.pipeline.records[0].stats
    assert stats["tuned_blocks"] == 2 and stats["weights_quantized"] == 7, stats
    assert "pooler.dense" in {n.module for n in c.graph.nodes if n.op == "dequantize"}


def test_static_activation_calibration_counts_images_not_channels():
    """quantize(a_static=true)'s calibration stats on a ViT said ``sequences: 4, seq_len: 3``: the channels of the
    ``[4, 3, 16, 16]`` images taken for a window length. They count the images, as the weight passes do."""
    import transformers as t

    from lowbit.api import compile_model

    vit = t.ViTModel(t.ViTConfig(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=1,
                                 image_size=16, patch_size=8)).eval()
    x = torch.randn(2, 3, 16, 16)
    c = compile_model(vit, (x,), pipeline="quantize(w=int8,a=int8,a_static=true,a_gran=per_tensor,progress=false)",
                      calib=torch.randn(4, 3, 16, 16), dynamic_shapes={"pixel_values": {0: torch.export.Dim.DYNAMIC}})
    calibration = c.report.pipeline.records[0].stats["calibration"]
    assert calibration["calib_images"] == 4 and calibration["static_inputs"] > 0, calibration
    assert "seq_len" not in calibration and "calib_tokens" not in calibration, calibration


def test_uint8_images_as_calibration_are_told_to_be_the_models_float_inputs():
    """Raw uint8 images [n, 3, H, W] given as a ViT's calib= were refused as 'calibration token ids must be [n, L]
    windows ... got shape (4, 3, 16, 16)': token ids the user never meant. The refusal says they are not token ids
    and that the model takes float pixel values, preprocessed; those calibrate it."""
    import transformers as t

    from lowbit.api import compile_model
    from lowbit.passes.base import PassError

    vit = t.ViTModel(t.ViTConfig(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=1,
                                 image_size=16, patch_size=8)).eval()
    x = torch.randn(2, 3, 16, 16)
    images = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    with pytest.raises(PassError, match=r"torch.uint8 tensor of shape \(4, 3, 16, 16\) is not token ids .*float, "
                                        r"preprocessed as its processor does \(an image processor's pixel_values\)"):
        compile_model(vit, (x,), pipeline="gptq(w=int8,progress=false)", calib=images)
    c = compile_model(vit, (x,), pipeline="gptq(w=int8,progress=false)", calib=(images.float() / 127.5 - 1))
    assert c.report.pipeline.records[0].stats["calib_images"] == 4


def test_vit_with_interpolate_pos_encoding_is_refused_naming_the_op_and_the_option():
    """ViT called with interpolate_pos_encoding=True resizes its position embeddings with a bicubic upsample, an op
    lowbit does not run: the refusal said 'this architecture is not supported', of a family the matrix supports. It
    names the op, the option that puts it there and how to capture without it; captured so, the model compiles."""
    import transformers as t

    from lowbit.api import compile_model
    from lowbit.ir.capture import CaptureError

    vit = t.ViTModel(t.ViTConfig(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=1,
                                 image_size=16, patch_size=8)).eval()
    with pytest.raises(CaptureError, match=r"ViTModel: capture produced ops lowbit cannot run: "
                                           r"aten\.upsample_bicubic2d\.\w+ x1 \(embeddings\); .* "
                                           r"interpolate_pos_encoding=True .* capture it at config\.image_size "
                                           r"without interpolate_pos_encoding") as e:
        compile_model(vit, {"pixel_values": torch.randn(2, 3, 24, 24), "interpolate_pos_encoding": True})
    assert "architecture is not supported" not in str(e.value)
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(compile_model(vit, (x,))(x)[0], vit(x).last_hidden_state)


def test_a_vision_model_without_example_inputs_is_told_the_pixel_values_it_reads():
    """compile_model(vit) said 'no example inputs given for ViTModel: pass example_inputs=(...)', with no word on
    the input a vision model reads or its size. The refusal gives pixel_values' shape from the config (a
    rectangular image here) and the dynamic batch; that call compiles."""
    import transformers as t

    from lowbit.api import compile_model

    vit = t.ViTModel(t.ViTConfig(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=1,
                                 image_size=(16, 24), patch_size=8)).eval()
    with pytest.raises(ValueError, match=r"no example inputs given for ViTModel: .* pass example_inputs="
                                         r"\(torch\.randn\(2, 3, 16, 24\),\) \(pixel_values, .*dynamic_shapes="
                                         r"\{'pixel_values': \{0: torch\.export\.Dim\.AUTO\}\}"):
        compile_model(vit)
    c = compile_model(vit, (torch.randn(2, 3, 16, 24),), dynamic_shapes={"pixel_values": {0: torch.export.Dim.AUTO}})
    x = torch.randn(3, 3, 16, 24)
    torch.testing.assert_close(c(x)[0], vit(x).last_hidden_state)


@pytest.mark.parametrize("family", ["olmo3", "seed_oss"])
def test_olmo3_and_seed_oss_generate_as_transformers_forward(family):
    """OLMo 3 (OLMo 2's post-norms and q/k norms, sliding layers by ``layer_types`` with their own rotary) and
    Seed-OSS (Llama with biased q/k/v and o projections) were refused by model_type although the step runs them as
    transformers does; their greedy tokens of a two-prompt batch, 12 each (past OLMo 3's 4-token window, over a full
    layer too), equal the model's forward over the whole sequence without a cache (EXAONE 4: its own test)."""
    import transformers as t

    cfg = {"olmo3": lambda: t.Olmo3Config(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                          num_key_value_heads=4, sliding_window=4, **{**DEC, "num_hidden_layers": 4}),
           "seed_oss": lambda: t.SeedOssConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                               num_key_value_heads=2, head_dim=16, **DEC)}[family]()
    hf, tok, cm = _sharp_step_model(cfg)
    if family == "olmo3":
        assert cm.graph.meta["generation"]["windows"] == [4, 4, 4, None]
    prompts = [tok(p).input_ids for p in GEN_PROMPTS]
    _assert_greedy_as_uncached_forward(hf, prompts, cm.generate(prompts, 12, stop_tokens=()).tokens, 12, family)


def test_exaone4_generates_as_transformers_forward_with_either_cache():
    """EXAONE 4 was refused by model_type: its attention modules carry the sliding window on full layers too (the
    step read a window on every layer), and in a model with sliding layers its full layers take no rotary ("global
    NoPE", in its attention's code, no module name). The step reads the window from ``is_sliding`` and leaves the
    rotary off those layers: a two-prompt batch's 12 greedy tokens (past the 4-token window, through the full
    layer) equal the model's forward over the whole sequence, with the float cache and with the packed int8 cache
    (``kv-cache``, whose cache_attention masks the same windows)."""
    import transformers as t

    from lowbit.generate import GenerationSpec

    cfg = t.Exaone4Config(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                          head_dim=16, sliding_window=4, sliding_window_pattern=4, **{**DEC, "num_hidden_layers": 4})
    hf, tok, cm = _sharp_step_model(cfg)
    assert cm.graph.meta["generation"]["windows"] == [4, 4, 4, None]
    prompts = [tok(p).input_ids for p in GEN_PROMPTS]
    _assert_greedy_as_uncached_forward(hf, prompts, cm.generate(prompts, 12, stop_tokens=()).tokens, 12, "exaone4")
    packed = lowbit.compile_model(hf, tokenizer=tok, pipeline="kv-cache(bits=8,k_block=4,window=4,v_group=16)",
                                  generation=GenerationSpec(max_length=32, max_batch=2))
    assert [n.kwargs.get("sliding") for n in packed.graph.nodes if n.op == "cache_attention"] == [4, 4, 4, None]
    _assert_greedy_as_uncached_forward(hf, prompts, packed.generate(prompts, 12, stop_tokens=()).tokens, 12,
                                       "exaone4 kv-cache(bits=8)")


def _newer_step_family(family: str) -> Any:
    """A tiny random GPT-J, Cohere, Bloom, GPT-2 or Falcon of two layers with sharp logits (greedy ties would test
    nothing), the models the step's adjacent-pair rotary, Cohere's per-head q/k gains, Bloom's ALiBi, GPT-2's learned
    positions and Falcon's grouped query_key_value are tested on. GPT-J's rotary covers 8 of its 16 head channels;
    Cohere's q/k norm gains are random per head (HF's ones would not show a gain applied to the wrong head); Bloom's
    q/k/v keep their init so the scores stay mild enough for ALiBi to decide tokens (its other weights x16, its norms
    and embeddings x4); GPT-2 scales each layer's scores by 1/(layer + 1) as well; ``falcon`` is the new decoder
    architecture with 2 KV heads of 4 (ln_attn/ln_mlp), ``falcon-multi-query`` the old one with one KV head;
    ``falcon-alibi`` is Falcon-RW's form (config.alibi, no rotary; 4 KV heads interleaved, biased linears, attention
    then mlp in sequence), ``falcon-alibi-multi-query`` and ``falcon-alibi-new`` the two above with ALiBi."""
    import transformers as t

    if family == "bloom":
        torch.manual_seed(1)
        hf = t.AutoModelForCausalLM.from_config(t.BloomConfig(hidden_size=64, n_head=4, n_layer=2, vocab_size=VOCAB,
                                                              pad_token_id=0)).eval()
        with torch.no_grad():
            for name, p in hf.named_parameters():
                p.mul_(1 if "query_key_value" in name else 4 if re.search(r"layernorm|ln_f|word_emb", name) else 16)
        return hf
    two = {**DEC, "num_hidden_layers": 2}
    falcon = dict(hidden_size=64, num_attention_heads=4, num_hidden_layers=2, vocab_size=VOCAB,
                  max_position_embeddings=256)
    cfg = {"gptj": lambda: t.GPTJConfig(n_embd=64, n_head=4, n_layer=2, rotary_dim=8, n_positions=256,
                                        vocab_size=VOCAB),
           "cohere": lambda: t.CohereConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                            num_key_value_heads=2, use_qk_norm=True, pad_token_id=0, **two),
           "gpt2": lambda: t.GPT2Config(n_embd=64, n_head=4, n_layer=2, n_positions=64, vocab_size=VOCAB,
                                        scale_attn_by_inverse_layer_idx=True, bos_token_id=1, eos_token_id=2),
           "falcon": lambda: t.FalconConfig(new_decoder_architecture=True, num_kv_heads=2, **falcon),
           "falcon-multi-query": lambda: t.FalconConfig(new_decoder_architecture=False, multi_query=True,
                                                        **falcon),
           "falcon-alibi": lambda: t.FalconConfig(alibi=True, new_decoder_architecture=False, multi_query=False,
                                                  parallel_attn=False, bias=True, **falcon),
           "falcon-alibi-multi-query": lambda: t.FalconConfig(alibi=True, new_decoder_architecture=False,
                                                              multi_query=True, **falcon),
           "falcon-alibi-new": lambda: t.FalconConfig(alibi=True, new_decoder_architecture=True, num_kv_heads=2,
                                                      **falcon)}[family]()
    # seeds whose greedy steps have no near-tie the packed int8 cache could flip (top-2 gap >= 0.5% of the largest
    # logit); Falcon's multi-query seed 0 has one of 4e-4 at a prompt's 11th token, which int8 keys do flip. The
    # ALiBi Falcons' seeds are ones whose tokens the bias decides, with the widest such gap of seeds 0-35 (RW's 0.63%,
    # multi-query's 0.23%: seed 0's RW gap of 0.05% flipped under int8 keys)
    torch.manual_seed({"gpt2": 1, "falcon-multi-query": 8, "falcon-alibi": 9, "falcon-alibi-multi-query": 33
                       }.get(family, 0))
    hf = t.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.mul_(1 if family.startswith("falcon-alibi") and "query_key_value" in name else 4)
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                p.copy_(torch.rand(p.shape, generator=torch.Generator().manual_seed(len(name))) * 2 + 0.5)
    return hf


def _assert_decode_step_is_the_prefills_last_row(hf: Any, cm: Any, prompt: list[int]) -> None:
    """The compiled step's prefill of ``prompt`` ends in transformers' forward's last row, and a decode step of its
    last token over the cache its other tokens' prefill wrote gives that row (fp32 rounding only: 32 slots
    against n)."""
    from lowbit.models import CausalLMStep

    ids = torch.tensor([prompt])
    n = ids.shape[1]
    step, run = CausalLMStep(hf), cm.runner
    full = run(ids, torch.arange(n)[None], *step.empty_cache(1, n))[0][0, -1]
    with torch.no_grad():
        want = hf(ids).logits[0, -1]
    assert (full - want).abs().max() <= 1e-5 * want.abs().max()
    cache = step.empty_cache(1, 32)
    prefix = run(ids[:, :-1], torch.arange(n - 1)[None], *[c[:, :, : n - 1].clone() for c in cache])
    for c, part in zip(cache, prefix[1:]):
        c[:, :, : n - 1] = part
    last = run(ids[:, -1:], torch.tensor([[n - 1]]), *cache)[0][0, -1]
    assert (last - full).abs().max() <= 1e-5 * full.abs().max()


@pytest.mark.parametrize("family", ["gptj", "cohere"])
def test_interleaved_rotary_families_generate_as_transformers(family):
    """GPT-J (a partial rotary over 8 of 16 channels turning adjacent pairs, its tables one angle per pair and
    returned as (sin, cos); attention and mlp in parallel on ln_1) and Cohere (adjacent pairs, q/k LayerNorms with a
    gain per head, logit_scale, attention and mlp in parallel on a LayerNorm without bias) were refused by name: the
    step's rotary turned half-split pairs only. ``StepLayout`` probes the rotary's form (not the class name); a
    two-prompt batch's greedy tokens equal transformers' generate, 8 with the float cache and 12 with the packed
    int8 cache (``kv-cache``), and the step's decode logits equal the last row of its prefill, which equals
    transformers' forward."""
    from lowbit.generate import GenerationSpec
    from lowbit.models import StepLayout

    hf = _newer_step_family(family)
    tok = _smollm2_tokenizer()
    cm = lowbit.compile_model(hf, tokenizer=tok, generation=GenerationSpec(max_length=32, max_batch=2))
    lay = StepLayout.of(hf)
    want = (("adjacent", True, True, "none", 1.0, False, True) if family == "gptj" else
            ("adjacent", False, False, "head-gains", hf.config.logit_scale, True, False))
    assert (lay.rotary_pairs, lay.rotary_sin_first, lay.rotary_angle_per_pair, lay.qk_norm,
            lay.logits_multiplier, lay.rotary_in_float32, lay.residual_last) == want
    prompts = [tok(p).input_ids for p in GEN_PROMPTS]
    _assert_greedy_as_transformers(hf, prompts, cm.generate(prompts, 8, stop_tokens=()).tokens, 8, family)
    packed = lowbit.compile_model(hf, tokenizer=tok, pipeline="kv-cache(bits=8,k_block=4,window=4,v_group=16)",
                                  generation=GenerationSpec(max_length=32, max_batch=2))
    _assert_greedy_as_transformers(hf, prompts, packed.generate(prompts, 12, stop_tokens=()).tokens, 12,
                                   f"{family} kv-cache(bits=8)")
    _assert_decode_step_is_the_prefills_last_row(hf, cm, prompts[1])


def _assert_prefill_is_transformers_bit_for_bit(hf: Any, cm: Any, prompt: list[int], family: str) -> None:
    """The step's prefill of ``prompt`` equals transformers' forward bit for bit: eagerly (``CausalLMStep``, every
    row) and compiled (its last row, which ``last-logits`` keeps: against ``logits_to_keep=1``, the head's matmul
    over the same one row); a failure gives max|diff|."""
    from lowbit.models import CausalLMStep

    ids = torch.tensor([prompt])
    positions = torch.arange(ids.shape[1])[None]
    step = CausalLMStep(hf)
    with torch.no_grad():
        want = hf(ids).logits
        eager = step(ids, positions, step.empty_cache(1, ids.shape[1]))[0]
        last = hf(ids, logits_to_keep=1).logits
    compiled = cm.runner(ids, positions, *step.empty_cache(1, ids.shape[1]))[0]
    assert compiled.shape[1] == 1  # last-logits found the final norm
    for got, ref, what in ((eager, want, "eager step"), (compiled, last, "compiled step")):
        assert got.dtype == ref.dtype and torch.equal(got, ref), \
            f"{family} {what}: max|diff| {(got.float() - ref.float()).abs().max().item():.3g} from transformers'"


def _upcasting_half_precision_model(family: str) -> Any:
    """``_newer_step_family``'s Cohere, or its GPT-2 with ``reorder_and_upcast_attn`` under eager attention (the
    implementation that reads it), in bfloat16."""
    import transformers as t

    if family == "cohere":
        return _newer_step_family("cohere").to(torch.bfloat16)
    cfg = t.GPT2Config(n_embd=64, n_head=4, n_layer=2, n_positions=64, vocab_size=VOCAB, bos_token_id=1,
                       eos_token_id=2, scale_attn_by_inverse_layer_idx=True, reorder_and_upcast_attn=True)
    torch.manual_seed(1)
    hf = t.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.mul_(4)
    return hf.to(torch.bfloat16)


@pytest.mark.parametrize("family", ["cohere", "gpt2"])
def test_half_precision_steps_compute_in_float32_where_transformers_does(family):
    """In a bfloat16 model, transformers' Cohere rotates queries and keys in float32 (``q.float()`` in its
    ``apply_rotary_pos_emb``, cast back after), and GPT-2 with ``reorder_and_upcast_attn`` under eager attention takes
    its scores, mask and softmax in float32; the step computed both in bfloat16, its prefill logits 0.0137 (Cohere's,
    at logits ~0.7) and 0.156 (GPT-2's, at ~11) off transformers' forward. Now the prefill equals that forward bit for
    bit, eagerly and compiled, and a two-prompt batch's 8 greedy tokens equal transformers' generate. The same GPT-2
    under SDPA, which ignores the flag in transformers, keeps the step's SDPA."""
    from lowbit.generate import GenerationSpec
    from lowbit.models import StepLayout

    hf = _upcasting_half_precision_model(family)
    lay = StepLayout.of(hf)
    assert (lay.rotary_in_float32, lay.attn_upcast) == ((True, False) if family == "cohere" else (False, True))
    tok = _smollm2_tokenizer()
    cm = lowbit.compile_model(hf, tokenizer=tok, generation=GenerationSpec(max_length=32, max_batch=2))
    prompts = [tok(p).input_ids for p in GEN_PROMPTS]
    for prompt in prompts:
        _assert_prefill_is_transformers_bit_for_bit(hf, cm, prompt, family)
    _assert_greedy_as_transformers(hf, prompts, cm.generate(prompts, 8, stop_tokens=()).tokens, 8, family)
    if family == "gpt2":
        hf.set_attn_implementation("sdpa")
        assert not StepLayout.of(hf).attn_upcast


@pytest.mark.parametrize("family", ["gptj", "phi", "falcon-multi-query", "stablelm"])
def test_parallel_blocks_add_the_residual_in_transformers_order(family):
    """A parallel block's three terms were summed ``residual + attention + mlp`` for every family; GPT-J and Phi sum
    ``attention + mlp + residual`` and Falcon ``residual + (mlp + attention)``, and float addition does not
    associate: their float32 prefill logits were up to 5.7e-6 off transformers' forward. ``StepLayout.residual_last``
    sums them in their order (StableLM's, with use_parallel_residual, stays residual first) and the prefill equals
    transformers' forward bit for bit, eagerly (every row) and compiled (the last row)."""
    import transformers as t

    from lowbit.generate import GenerationSpec
    from lowbit.models import StepLayout

    if family == "phi":
        hf, tok, cm = _sharp_step_model(t.PhiConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                                    partial_rotary_factor=0.5, qk_layernorm=True, **DEC))
    elif family == "stablelm":
        hf, tok, cm = _sharp_step_model(t.StableLmConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                                         num_key_value_heads=4, use_parallel_residual=True,
                                                         **{**DEC, "num_hidden_layers": 2}))
    else:
        hf, tok = _newer_step_family(family), _smollm2_tokenizer()
        cm = lowbit.compile_model(hf, tokenizer=tok, generation=GenerationSpec(max_length=32, max_batch=2))
    lay = StepLayout.of(hf)
    assert (lay.residual, lay.residual_last) == ("parallel", family != "stablelm")
    for prompt in (tok(p).input_ids for p in GEN_PROMPTS):
        _assert_prefill_is_transformers_bit_for_bit(hf, cm, prompt, family)


def test_bloom_generates_as_transformers_with_either_cache(monkeypatch):
    """Bloom was refused by name: it has no rotary, its scores take an ALiBi bias (a slope per head times the key's
    position), its embeddings a LayerNorm and its mlp ``(x, residual)``. The step adds the model's own
    ``build_alibi_tensor`` over the cache slots through a float attention mask, which ``kv-cache`` hands
    ``cache_attention`` as its ``bias``: a two-prompt batch's 12 greedy tokens (left-padded) equal transformers'
    generate with the float cache and with the packed int8 cache, where the same model without ALiBi makes others;
    the prefill's last row equals transformers' forward and a decode step's logits that row (1e-5). The residual
    wirings the step does not reproduce are refused by their config setting."""
    import transformers.models.bloom.modeling_bloom as modeling_bloom

    from lowbit.generate import GenerationError, GenerationSpec
    from lowbit.ir.graph import Value
    from lowbit.models import StepLayout

    hf = _newer_step_family("bloom")
    lay = StepLayout.of(hf)
    assert (lay.positions, lay.embedding_norm, lay.mlp_adds_residual, lay.qkv) == ("alibi", True, True, "interleaved")
    tok = _smollm2_tokenizer()
    spec = GenerationSpec(max_length=32, max_batch=2)
    prompts = [tok(p).input_ids for p in GEN_PROMPTS]
    cm = lowbit.compile_model(hf, tokenizer=tok, generation=spec)
    got = cm.generate(prompts, 12, stop_tokens=()).tokens
    _assert_greedy_as_transformers(hf, prompts, got, 12, "bloom")
    packed = lowbit.compile_model(hf, tokenizer=tok, pipeline="kv-cache(bits=8,k_block=4,window=4,v_group=16)",
                                  generation=spec)
    biases = [n.kwargs.get("bias") for n in packed.graph.nodes if n.op == "cache_attention"]
    assert len(biases) == 2 and all(isinstance(b, Value) and b.tensor_type.dtype == torch.float32 for b in biases)
    _assert_greedy_as_transformers(hf, prompts, packed.generate(prompts, 12, stop_tokens=()).tokens, 12,
                                   "bloom kv-cache(bits=8)")
    slopes = modeling_bloom._get_alibi_slopes
    with monkeypatch.context() as m:  # the bias decides tokens of this model: a step that dropped it would fail
        m.setattr(modeling_bloom, "_get_alibi_slopes", lambda heads, device: slopes(heads, device) * 0)
        with pytest.raises(AssertionError):
            _assert_greedy_as_transformers(hf, prompts, got, 12, "bloom without ALiBi")
    _assert_decode_step_is_the_prefills_last_row(hf, cm, prompts[1])
    for setting, value, why in (("apply_residual_connection_post_layernorm", True, "the normed input is the residual"),
                                ("slow_but_exact", True, "sums its linears in slices without their biases")):
        with monkeypatch.context() as m:
            m.setattr(hf.config, setting, value)
            m.setattr(hf.config, "pretraining_tp", 2)
            with pytest.raises(GenerationError, match=rf"BloomForCausalLM: config\.{setting}.*{why}"):
                StepLayout.of(hf)


@pytest.mark.parametrize("family", ["gpt2", "falcon", "falcon-multi-query"])
def test_gpt2_and_falcon_generate_as_transformers_with_either_cache(family, monkeypatch):
    """GPT-2 (learned absolute positions ``wpe`` and no rotary, Conv1D ``c_attn`` laid out [q | k | v], ``ln_1``
    then ``ln_2``, a scale per layer) and Falcon (rotary; ``query_key_value`` holding each KV group's query heads,
    key and value, with ln_attn and ln_mlp in parallel in the new decoder architecture; one KV head [q | k | v] and
    attention and mlp on one input_layernorm in the old multi_query one) were refused by model_type. ``StepLayout``
    reads the fused projection, the norms and the positions off the modules and config; a two-prompt batch's 12
    greedy tokens (left-padded: GPT-2's positions per sequence from the step's positions input, where zeroed
    position embeddings make other tokens) equal transformers' generate with the float and the packed int8 cache,
    the prefill's last row transformers' forward and a decode step that row (1e-5). A query_key_value whose width
    disagrees with the config's KV heads is refused by name. config.alibi turns the step's rotary into ALiBi
    (``test_falcon_alibi_generates_as_transformers_with_either_cache``) where the forward's mask carries it: set on
    the config of a model built without it (FalconModel reads it at init) it is refused, as it is in a model type
    not known to add it to the mask."""
    from lowbit.generate import GenerationError, GenerationSpec
    from lowbit.models import StepLayout

    hf = _newer_step_family(family)
    lay = StepLayout.of(hf)
    want = {"gpt2": ("fused", "pre", "learned", 4), "falcon": ("grouped", "parallel-neox", "rotary", 2),
            "falcon-multi-query": ("grouped", "parallel", "rotary", 1)}[family]
    tok = _smollm2_tokenizer()
    spec = GenerationSpec(max_length=32, max_batch=2)
    prompts = [tok(p).input_ids for p in GEN_PROMPTS]
    cm = lowbit.compile_model(hf, tokenizer=tok, generation=spec)
    assert (lay.qkv, lay.residual, lay.positions, cm.graph.meta["generation"]["kv_heads"]) == want
    got = cm.generate(prompts, 12, stop_tokens=()).tokens
    _assert_greedy_as_transformers(hf, prompts, got, 12, family)
    packed = lowbit.compile_model(hf, tokenizer=tok, pipeline="kv-cache(bits=8,k_block=4,window=4,v_group=16)",
                                  generation=spec)
    _assert_greedy_as_transformers(hf, prompts, packed.generate(prompts, 12, stop_tokens=()).tokens, 12,
                                   f"{family} kv-cache(bits=8)")
    _assert_decode_step_is_the_prefills_last_row(hf, cm, prompts[1])
    if family == "gpt2":  # the positions decide this model's tokens: a step that misplaced them would fail
        with monkeypatch.context() as m:
            m.setattr(hf.transformer.wpe, "weight", torch.nn.Parameter(torch.zeros_like(hf.transformer.wpe.weight)))
            with pytest.raises(AssertionError):
                _assert_greedy_as_transformers(hf, prompts, got, 12, "gpt2 without positions")
        return
    with monkeypatch.context() as m:
        m.setattr(hf.config, "num_key_value_heads", 4)
        with pytest.raises(GenerationError, match=r"FalconForCausalLM: layer 0's query_key_value has \d+ outputs, "
                                                  r"not the \(heads 4 \+ 2 x kv heads 4\)"):
            StepLayout.of(hf)
    with monkeypatch.context() as m:  # (FalconModel reads config.alibi at init, its attention at each forward)
        m.setattr(hf.config, "alibi", True)
        with pytest.raises(GenerationError, match=r"FalconForCausalLM: config\.alibi is set, but the attention mask "
                                                  r"its forward hands layer 0's attention is not build_alibi_tensor"):
            StepLayout.of(hf)
        m.setattr(hf.transformer, "use_alibi", True)
        assert (StepLayout.of(hf).positions, StepLayout.of(hf).alibi_divisor) == ("alibi", 4.0)
        m.setattr(lowbit.models, "_ALIBI_IN_THE_MASK", {})
        with pytest.raises(GenerationError, match=r"FalconForCausalLM: config\.alibi is set, so its attention takes "
                                                  r"an ALiBi bias of its own"):
            StepLayout.of(hf)


@pytest.mark.parametrize("family", ["falcon-alibi", "falcon-alibi-multi-query", "falcon-alibi-new"])
def test_falcon_alibi_generates_as_transformers_with_either_cache(family, monkeypatch):
    """Falcon with config.alibi (Falcon-RW's form: no rotary, its module-level ``build_alibi_tensor`` rounding the
    slopes and their product with the positions to bfloat16) was refused. transformers' ``FalconModel.forward``
    adds ``alibi / sqrt(head_dim)`` to the attention mask, which SDPA adds to the scaled scores (Bloom adds its table
    unscaled): the step adds the same table over its cache slots divided by ``StepLayout.alibi_divisor``. In the old
    decoder architecture with 4 KV heads in sequence, with one KV head in parallel, and in the new one with 2 KV heads,
    the float32 prefill equals transformers' forward bit for bit (eagerly every row, compiled the last), a two-prompt
    batch's 12 greedy tokens equal transformers' generate with the float and the packed int8 cache (the bias decides
    tokens: transformers with zero slopes makes others), and a decode step gives the prefill's last row (1e-5).
    ``_check_alibi`` runs the forward to layer 0's attention: a divisor other than the mask's is refused by name."""
    import transformers.models.falcon.modeling_falcon as modeling_falcon

    from lowbit.generate import GenerationError, GenerationSpec
    from lowbit.models import StepLayout

    hf = _newer_step_family(family)
    lay = StepLayout.of(hf)
    want = {"falcon-alibi": ("interleaved", "pre", 4), "falcon-alibi-multi-query": ("grouped", "parallel", 1),
            "falcon-alibi-new": ("grouped", "parallel-neox", 2)}[family]
    tok = _smollm2_tokenizer()
    spec = GenerationSpec(max_length=32, max_batch=2)
    prompts = [tok(p).input_ids for p in GEN_PROMPTS]
    cm = lowbit.compile_model(hf, tokenizer=tok, generation=spec)
    assert (lay.positions, lay.alibi_divisor) == ("alibi", 4.0)  # sqrt(head_dim 16)
    assert (lay.qkv, lay.residual, cm.graph.meta["generation"]["kv_heads"]) == want
    for prompt in prompts:
        _assert_prefill_is_transformers_bit_for_bit(hf, cm, prompt, family)
    got = cm.generate(prompts, 12, stop_tokens=()).tokens
    _assert_greedy_as_transformers(hf, prompts, got, 12, family)
    packed = lowbit.compile_model(hf, tokenizer=tok, pipeline="kv-cache(bits=8,k_block=4,window=4,v_group=16)",
                                  generation=spec)
    assert sum(n.kwargs.get("bias") is not None for n in packed.graph.nodes if n.op == "cache_attention") == 2
    _assert_greedy_as_transformers(hf, prompts, packed.generate(prompts, 12, stop_tokens=()).tokens, 12,
                                   f"{family} kv-cache(bits=8)")
    _assert_decode_step_is_the_prefills_last_row(hf, cm, prompts[1])
    table = modeling_falcon.build_alibi_tensor
    with monkeypatch.context() as m:  # the bias decides tokens of this model: a step that dropped it would fail
        m.setattr(modeling_falcon, "build_alibi_tensor", lambda mask, heads, dtype: table(mask, heads, dtype) * 0)
        with pytest.raises(AssertionError):
            _assert_greedy_as_transformers(hf, prompts, got, 12, f"{family} without ALiBi")
    with monkeypatch.context() as m:
        m.setattr(lowbit.models, "_ALIBI_IN_THE_MASK", {"falcon": lambda config: 1.0})
        with pytest.raises(GenerationError, match=r"FalconForCausalLM: config\.alibi is set, but the attention mask "
                                                  r"its forward hands layer 0's attention is not "
                                                  r"build_alibi_tensor / 1 under a causal mask"):
            StepLayout.of(hf)


@pytest.mark.parametrize("family", ["gptj", "cohere", "bloom", "gpt2", "falcon", "falcon-multi-query", "falcon-alibi"])
def test_onnxruntime_generates_the_newer_step_families_tokens(family):
    """The step graphs of GPT-J and Cohere (adjacent-pair rotary, partial in GPT-J; Cohere's per-head q/k gains and
    logit_scale), Bloom (ALiBi as the float mask of ONNX's Attention), GPT-2 (learned positions gathered at the
    positions input) and Falcon (2 or 1 KV heads sliced out of query_key_value; Falcon-RW's ALiBi, its bfloat16
    table / sqrt(head_dim) as the float mask) export to ONNX (past_key_values in, present out) and ONNX Runtime's
    greedy tokens for a left-padded two-prompt batch equal the torch reference's and transformers' generate; with
    int4 weights (w4a16-g64 as MatMulNBits) they equal the torch reference's. Every
    projection is one: Falcon's step capture keeps its ``x @ W.T`` as ``numpy_T``, which W4A16 left float."""
    from lowbit.backends.onnxruntime_backend import OrtCompiled
    from lowbit.generate import GenerationSpec, Generator

    hf, tok = _newer_step_family(family), _smollm2_tokenizer()
    prompts = [tok(p).input_ids for p in GEN_PROMPTS]
    for recipe, weight_format in ((None, "qdq"), ("w4a16-g64", "matmulnbits")):
        cm = lowbit.compile_model(hf, tokenizer=tok, recipe=recipe, generation=GenerationSpec(max_length=32,
                                                                                                max_batch=2))
        runner = OrtCompiled(cm.graph, device="cpu", weight_format=weight_format)
        lowered = [n.op_type for n in runner.onnx_model.graph]
        linears = {"gptj": 6, "cohere": 7}.get(family, 4) * 2  # a layer's projections; the head stays float
        assert lowered.count("Attention") == 2 and lowered.count("MatMulNBits") == (0 if recipe is None else linears)
        got = Generator(runner, cm.graph.meta["generation"], "cpu").generate(prompts, 12, stop_tokens=()).tokens
        assert got == cm.generate(prompts, 12, stop_tokens=()).tokens, f"{family} {recipe}"
        if recipe is None:
            _assert_greedy_as_transformers(hf, prompts, got, 12, f"{family} on ONNX Runtime")


@pytest.fixture(autouse=True)
def _one_export_per_model(reuse_captures: object) -> None:
    """Every test here captures through the session's capture cache (conftest's ``reuse_captures``): the same tiny
    model compiled again is not exported again."""
