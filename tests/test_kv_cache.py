"""The packed quantized KV cache (``kv-cache`` pass, ``cache_attention`` op, lowbit.ir.kvcache): its reference equals
the ``quantize(kv=...)`` accuracy model token for token, the Triton decode path equals the reference, and a real
SmolLM2 slice generates through it."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import run_interpreted

from lowbit.ir import kvcache as kv
from lowbit.ir.quant import dequantize, dynamic_qparams, quantize

QDTYPE = {8: "int8", 4: "int4", 2: "int2"}


def _qdq(x: torch.Tensor, bits: int, layout: dict) -> torch.Tensor:
    scale, zp = dynamic_qparams(x, qdtype=QDTYPE[bits], symmetric=False, **layout)
    kw = {"qdtype": QDTYPE[bits], "axis": layout["axis"], "block_size": layout["block_size"]}
    return dequantize(quantize(x, scale, zp, **kw), scale, zp, out_dtype=torch.float32, **kw)


def _accuracy_model(q, k, v, bits, kb, vg, window, sink, slopes=None):
    """insert_kv_qdq's attention over a whole sequence: [QDQ ; float] keys/values, the window/sink mask; with
    ``slopes`` (one per query head), an ALiBi bias of slope times key position on both halves' scores."""
    b, h, n, d = k.shape
    pad = (-n) % kb  # the last partial block is never read quantized (window >= k_block)
    kq = _qdq(torch.cat([k, k.new_zeros(b, h, pad, d)], 2), bits,
              {"granularity": "per_block", "axis": 2, "block_size": kb})[:, :, :n]
    vq = _qdq(v, bits, {"granularity": "per_token", "axis": -1, "block_size": vg})
    i = torch.arange(n)
    dist = i[:, None] - i[None]
    old = (dist >= window) & (i[None] >= sink)
    mask = torch.cat([old, (dist >= 0) & ~old], -1)
    if slopes is not None:
        bias = slopes[:, None, None] * i.float()
        mask = torch.where(mask, torch.cat([bias, bias], -1), float("-inf"))
    return torch.nn.functional.scaled_dot_product_attention(q, torch.cat([kq, k], 2), torch.cat([vq, v], 2),
                                                            attn_mask=mask, enable_gqa=True)


CASES = [(4, 16, 8, 16, 1), (2, 16, 8, 32, 1), (8, 8, 16, 8, 0)]  # bits, k_block, v_group, window, sink


def _random_sequence(seed: int, b: int = 2, h: int = 2, hq: int = 4, d: int = 16, n: int = 100):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(b, h, n, d, generator=g) * 2
    k[:, :, 0] *= 10  # an attention-sink-like outlier token
    return torch.randn(b, hq, n, d, generator=g), k, torch.randn(b, h, n, d, generator=g)


@pytest.mark.parametrize("bits,kb,vg,window,sink", CASES)
def test_cache_attention_equals_the_accuracy_model(bits, kb, vg, window, sink):
    """Prefill, then decode token by token, and a prefill in two chunks: every query's output equals the accuracy
    model's (same QDQ, same mask) to fp32 rounding (1e-5)."""
    q, k, v = _random_sequence(bits)
    b, h, n, d = k.shape
    want = _accuracy_model(q, k, v, bits, kb, vg, window, sink)
    kw = dict(bits=bits, k_block=kb, v_group=vg, window=window, sink=sink)
    layout = kv.cache_layout(b, h, 128, d, **kw)
    split = 45
    out, *cache = kv.cache_attention(q[:, :, :split], k[:, :, :split], v[:, :, :split],
                                     torch.arange(split).repeat(b, 1), *kv.empty_cache(layout), **kw)
    outs = [out]
    for t in range(split, n):
        o, *cache = kv.cache_attention(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], torch.full((b, 1), t),
                                       *cache, **kw)
        outs.append(o)
    torch.testing.assert_close(torch.cat(outs, 2), want, rtol=1e-5, atol=1e-5)
    cache = kv.empty_cache(layout)
    outs = []
    for lo, hi in ((0, 37), (37, n)):
        o, *cache = kv.cache_attention(q[:, :, lo:hi], k[:, :, lo:hi], v[:, :, lo:hi],
                                       torch.arange(lo, hi).repeat(b, 1), *cache, **kw)
        outs.append(o)
    torch.testing.assert_close(torch.cat(outs, 2), want, rtol=1e-5, atol=1e-5)
    # the stored codes dequantize to the accuracy model's QDQ for every finished key block and every value
    vq = _qdq(v, bits, {"granularity": "per_token", "axis": -1, "block_size": vg})
    assert torch.equal(kv.dequantize_values(cache[3], cache[4], cache[5], bits)[:, :, :n], vq)
    full = (n // kb) * kb
    kq = _qdq(k[:, :, :full], bits, {"granularity": "per_block", "axis": 2, "block_size": kb})
    assert torch.equal(kv.dequantize_keys(cache[0], cache[1], cache[2], bits)[:, :, :full], kq)


@pytest.mark.parametrize("bits,kb,vg,window,sink", CASES)
def test_decode_writes_the_cache_in_place_as_the_reference_does(bits, kb, vg, window, sink):
    """A decode step's in-place write (what the Triton backend's decode runs: no copy of the cache per step) leaves
    exactly the tensors the out-of-place reference returns, step after step — through the sink, key-block
    boundaries and the float ring's wrap-around, with the two sequences at different positions — and returns the
    caller's own tensors. A prefill chunk asked to write in place is written out of place."""
    q, k, v = _random_sequence(bits + 10)
    b, h, n, d = k.shape
    kw = dict(bits=bits, k_block=kb, v_group=vg, window=window, sink=sink)
    ref = kv.empty_cache(kv.cache_layout(b, h, 128, d, **kw))
    mine = [t.clone() for t in ref]
    starts = torch.tensor([[0], [5]])  # the second sequence runs 5 positions ahead
    for t in range(70):
        pos = starts + t
        idx = pos[:, None, :, None].expand(b, h, 1, d)
        kt, vt = k.gather(2, idx), v.gather(2, idx)
        ref = kv.cache_update(kt, vt, pos, ref, **kw)
        got = kv.cache_update(kt, vt, pos, mine, inplace=True, **kw)
        assert all(g is m for g, m in zip(got, mine))
        for g, r in zip(got, ref):
            assert torch.equal(g, r), t
    before = [t.clone() for t in mine]
    chunk = kv.cache_update(k[:, :, 70:74], v[:, :, 70:74], starts + 70 + torch.arange(4), mine, inplace=True, **kw)
    assert all(torch.equal(a, m) for a, m in zip(before, mine)) and chunk[0] is not mine[0]


def _alibi_mask(slopes: torch.Tensor, positions: torch.Tensor, slots: int) -> torch.Tensor:
    """The float step's additive mask for Bloom: ``[B, H, L, slots]``, slope times slot where a query reads it
    (slot <= its position), -inf elsewhere."""
    s = torch.arange(slots)
    allowed = s[None, None, None] <= positions[:, None, :, None]
    return torch.where(allowed, slopes[None, :, None, None] * s.float(), float("-inf"))


@pytest.mark.parametrize("bits,kb,vg,window,sink", CASES)
def test_cache_attention_adds_a_bias_by_key_position(bits, kb, vg, window, sink):
    """kv-cache replaced an attention with cache_attention and dropped its mask, Bloom's ALiBi bias with it. With
    ``bias`` (the float step's additive mask over the cache's slots) a prefill chunk, then decode steps out of place
    and in place (``cache_attention_into``), give every query the accuracy model's output with the bias added to
    its quantized and float keys' scores alike (1e-5); without it, another output."""
    q, k, v = _random_sequence(bits + 20)
    b, h, n, d = k.shape
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625])
    want = _accuracy_model(q, k, v, bits, kb, vg, window, sink, slopes)
    assert not torch.allclose(want, _accuracy_model(q, k, v, bits, kb, vg, window, sink), atol=1e-2)
    kw = dict(bits=bits, k_block=kb, v_group=vg, window=window, sink=sink)
    slots = 128
    pos = torch.arange(60).repeat(b, 1)
    out, *cache = kv.cache_attention(q[:, :, :60], k[:, :, :60], v[:, :, :60], pos,
                                     *kv.empty_cache(kv.cache_layout(b, h, slots, d, **kw)), **kw,
                                     bias=_alibi_mask(slopes, pos, slots))
    outs = [out]
    for t in range(60, n):
        step, pos = [x[:, :, t:t + 1] for x in (q, k, v)], torch.full((b, 1), t)
        attend = kv.cache_attention_into if t % 2 else kv.cache_attention
        o, *cache = attend(*step, pos, *cache, **kw, bias=_alibi_mask(slopes, pos, slots)[:1])  # (broadcast batch)
        outs.append(o)
    torch.testing.assert_close(torch.cat(outs, 2), want, rtol=1e-5, atol=1e-5)


def test_kv_cache_carries_a_float_mask_over_the_slots_and_refuses_one_it_cannot_read():
    """The attention's float mask becomes cache_attention's ``bias`` when it is one bias per key position over the
    cache's slots (broadcast over the queries); a boolean one is left to cache_attention's own masks; one over
    something else, or ``is_causal``, is refused naming the node and its module, never dropped."""
    from lowbit.ir.parser import parse_graph
    from lowbit.passes.base import PassError
    from lowbit.passes.kv_cache import KVCache

    def attention(mask: str, causal: str = "") -> object:
        g = parse_graph(f"""graph g(%q: f32[2,4,3,16], %k: f32[2,4,9,16], %v: f32[2,4,9,16], %m: {mask}) {{
  %a: f32[2,4,3,16] = attention(%q, %k, %v, %m{causal})  # transformer.h.0.self_attention
  return %a
}}""", {})
        return next(n for n in g.nodes if n.op == "attention")

    for mask in ("f32[2,4,3,9]", "f32[1,4,1,9]", "f32[2,1,3,9]"):
        att = attention(mask)
        assert KVCache._bias(att, 9) == {"bias": att.args[3]}
    assert KVCache._bias(attention("bool[2,1,3,9]"), 9) == {}
    for mask in ("f32[2,4,3,7]", "f32[2,4,9]", "f32[3,4,3,9]"):
        with pytest.raises(PassError, match=r"%a \(attention\) in module 'transformer.h.0.self_attention' adds a "
                           r"float mask .* not one bias per key position over the cache's 9 slots"):
            KVCache._bias(attention(mask), 9)
    with pytest.raises(PassError, match=r"%a \(attention\) in module .* is causal by is_causal"):
        KVCache._bias(attention("bool[2,1,3,9]", ", is_causal=True"), 9)


def test_cache_attention_refuses_what_it_cannot_write():
    kw = dict(bits=4, k_block=16, v_group=8, window=16, sink=1)
    q, k, v = _random_sequence(0, n=4)
    cache = kv.empty_cache(kv.cache_layout(2, 2, 32, 16, **kw))
    with pytest.raises(ValueError, match="not consecutive"):
        kv.cache_attention(q, k, v, torch.tensor([[0, 1, 3, 4]] * 2), *cache, **kw)
    with pytest.raises(ValueError, match="past the cache"):
        kv.cache_attention(q, k, v, torch.arange(30, 34).repeat(2, 1), *cache, **kw)
    with pytest.raises(ValueError, match="multiple of k_block"):
        kv.cache_layout(2, 2, 40, 16, **kw)


def _kernel_decode_check(stride: int = 3) -> None:
    """Decode steps through cache_attention_decode (the Triton kernel) vs cache_attention (the reference), one every
    ``stride`` positions from 40 to 80 (13: 40, 53, 66, 79, still across the key blocks' (8, 16 tokens) and the
    windows' boundaries). 32 tokens per program: each step's 2-3 programs over written tokens still merge their
    partials and cross key blocks inside one program, at two thirds of 16's interpreter time (15.5 s CPU)."""
    from lowbit.kernels.decode_attention import cache_attention_decode

    for bits, kb, vg, window, sink in CASES:
        q, k, v = _random_sequence(bits + 10)
        b, h, n, d = k.shape
        kw = dict(bits=bits, k_block=kb, v_group=vg, window=window, sink=sink)
        _, *cache = kv.cache_attention(q[:, :, :40], k[:, :, :40], v[:, :, :40], torch.arange(40).repeat(b, 1),
                                       *kv.empty_cache(kv.cache_layout(b, h, 128, d, **kw)), **kw)
        for t in range(40, 80, stride):  # positions differ per sequence: the second one lags by 5
            pos = torch.tensor([[t], [t - 5]])
            step = [x[:, :, t:t + 1] for x in (q, k, v)]
            want = kv.cache_attention(*step, pos, *cache, **kw)
            got = cache_attention_decode(*step, pos, *cache, split=32, **kw)
            torch.testing.assert_close(got[0], want[0], rtol=2e-5, atol=2e-5)
            assert all(torch.equal(a, b) for a, b in zip(got[1:], want[1:]))
            cache = list(want[1:])


@pytest.mark.parametrize("stride", [pytest.param(13, id="core"), pytest.param(3, id="all", marks=pytest.mark.slow)])
def test_triton_decode_equals_the_reference(stride):
    """In process on CUDA, and on CPU where this process already runs Triton's interpreter (conftest sets
    TRITON_INTERPRET=1 before anything imports triton, as for the triton backend's tests): a fresh interpreter only
    otherwise (triton reads the variable at import), its start and imports ~10 s of the test's time. Every third
    position as ``slow``."""
    pytest.importorskip("triton")
    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        _kernel_decode_check(stride)
        return
    run_interpreted(f"import tests.test_kv_cache as t\nt._kernel_decode_check({stride})\nprint('ok')")


PROMPTS = ["The capital of France is", "Once upon a time, in a small village, there lived an old"]
NEW = 40  # decode past the window (32) and over key-block boundaries (32)


@pytest.fixture(scope="module")
def packed_slice(smollm2):
    """A 2-layer SmolLM2 step graph with the kv4 cache (kv-cache(bits=4): k_block 32, v_group 32, window 32,
    sink 1, as the kv4 recipe), on the torch backend (the reference op)."""
    from conftest import smollm2_slice

    from lowbit.api import compile_model
    from lowbit.generate import GenerationSpec

    hf = smollm2_slice(smollm2[0], 2).model
    compiled = compile_model(hf, tokenizer=smollm2[1], pipeline="kv-cache(bits=4)",
                             generation=GenerationSpec(max_length=96, max_batch=2))
    return hf, compiled


def _step_logits(compiled, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """Logits of the prefill's last row, then of each decode step fed ``tokens``: ``[len(tokens), V]``."""
    gen = compiled._generator if getattr(compiled, "_generator", None) else None
    from lowbit.generate import Generator

    gen = gen or Generator(compiled.runner, compiled.graph.meta["generation"])
    n = len(prompt)
    out = compiled.runner(torch.tensor([prompt]), torch.arange(n)[None], *gen._cache(1, gen.spec.max_length))
    rows, cache = [out[0][0, -1]], list(out[1:])
    for i, t in enumerate(tokens[:-1]):
        out = compiled.runner(torch.tensor([[t]]), torch.tensor([[n + i]]), *cache)
        rows.append(out[0][0, -1])
        cache = list(out[1:])
    return torch.stack(rows)


def test_smollm2_packed_cache_decode_matches_the_accuracy_model(smollm2, packed_slice):
    """Greedy generation through the packed cache (a batch of two prompts of different lengths), then every decode
    step's logits vs the ``quantize(kv=...)`` accuracy model (the kv4 recipe's QDQ, insert_kv_qdq) run over the same
    tokens as one prefill: they agree to fp32 rounding (max |diff| <= 1e-4 x max |logit|), so the greedy tokens
    are the accuracy model's too. The graph has one cache_attention per layer and packed uint8 cache inputs."""
    from lowbit.api import compile_model
    from lowbit.models import CausalLMLogits

    hf, compiled = packed_slice
    tok = smollm2[1]
    g = compiled.graph
    assert g.op_counts().get("cache_attention") == 2 and "attention" not in g.op_counts()
    assert g.inputs[2].tensor_type.dtype == torch.uint8 and g.inputs[2].tensor_type.shape[-1] == 32  # 64 ch, int4
    prompts = [tok(p).input_ids for p in PROMPTS]
    out = compiled.generate(prompts, NEW, stop_tokens=())
    assert [len(t) for t in out.tokens] == [NEW, NEW]
    acc = compile_model(CausalLMLogits(hf), tokenizer=tok,
                        pipeline="quantize(kv=int4,kv_group=32,kv_sink=1,kv_window=32)")
    for p, toks in zip(prompts, out.tokens):
        got = _step_logits(compiled, p, toks)
        want = acc.runner(torch.tensor([p + toks]))[0, len(p) - 1: len(p) + NEW - 1]
        assert (got - want).abs().max() <= 1e-4 * want.abs().max()
        assert got.argmax(-1).tolist() == toks == want.argmax(-1).tolist()


def _greedy_kernel_vs_reference() -> None:
    """The 2-layer slice with the kv4 cache on the torch backend (reference op) and on the triton backend (decode
    steps on the decode-attention kernel): the same greedy tokens for both prompts."""
    from conftest import smollm2_slice

    from lowbit.api import compile_model
    from lowbit.generate import GenerationSpec
    from lowbit.models import load_smollm2

    model, tok = load_smollm2()
    hf = smollm2_slice(model, 2).model
    spec = GenerationSpec(max_length=96, max_batch=2)
    dev = "cuda" if torch.cuda.is_available() else None
    ref = compile_model(hf, tokenizer=tok, pipeline="kv-cache(bits=4)", generation=spec, device=dev)
    ker = compile_model(hf, tokenizer=tok, pipeline="kv-cache(bits=4)", generation=spec, backend="triton",
                        device=dev, backend_options={"compile": False})
    assert set(ker.runner.report["kernels"].values()) == {"cache-attention"}
    prompts = [tok(p).input_ids for p in PROMPTS]
    want = ref.generate(prompts, NEW, stop_tokens=()).tokens
    got = ker.generate(prompts, NEW, stop_tokens=()).tokens
    assert got == want, (got, want)


@pytest.mark.slow
def test_smollm2_greedy_tokens_kernel_equal_reference(smollm2):
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        _greedy_kernel_vs_reference()
        return
    run_interpreted("import tests.test_kv_cache as t\nt._greedy_kernel_vs_reference()\nprint('ok')", timeout=900)


def test_onnx_refuses_the_packed_cache_before_loading(tmp_path):
    """ONNX has no lowering for cache_attention: the compile plan says so (and which backends lower it) before the
    model is loaded; a float cache still exports (tests/test_generate.py)."""
    from lowbit.api import compile_model
    from lowbit.errors import LowbitError
    from lowbit.generate import GenerationSpec

    with pytest.raises(LowbitError, match=r"cache_attention.*torch, triton"):
        compile_model("smollm2", pipeline="kv-cache(bits=4)", generation=GenerationSpec(max_length=64),
                      backend="onnxruntime")

    # lowbit.export of such a model says what to export instead ("no lowering for op" was all it said)
    import lowbit
    from conftest import tiny_llama

    cm = compile_model(tiny_llama(hidden=64, heads=2, kv_heads=1, max_positions=64), pipeline="kv-cache(bits=4)",
                       generation=GenerationSpec(max_length=64))
    with pytest.raises(LowbitError, match=r"cache_attention.*has no ONNX form: export the generation model "
                                          r"compiled without kv-cache"):
        lowbit.export(cm, tmp_path / "step.onnx")


def test_a_v_group_that_does_not_fit_head_dim_names_the_default_and_one_that_fits():
    """kv-cache(bits=4) on head_dim 16 said only 'v_group=32 must divide head_dim 16', a value the user never
    wrote: the message says it is bits=4's default and gives a group that fits."""
    from conftest import tiny_llama

    from lowbit.api import compile_model
    from lowbit.generate import GenerationSpec
    from lowbit.passes.manager import PipelineError

    torch.manual_seed(0)
    model = tiny_llama(hidden=64, inter=128, heads=4, kv_heads=2, vocab=97, max_positions=64)
    with pytest.raises(PipelineError, match=r"v_group=32 \(bits=4's default unless given\) must divide head_dim 16 "
                                            r"and be a multiple of the 2 codes per byte; give v_group=16"):
        compile_model(model, pipeline="kv-cache(bits=4,k_block=8,window=8)",
                      generation=GenerationSpec(max_length=32, max_batch=1))
    with pytest.raises(PipelineError, match=r"v_group=12 must divide head_dim 16 .*; give v_group=8"):
        compile_model(model, pipeline="kv-cache(bits=4,k_block=8,window=8,v_group=12)",
                      generation=GenerationSpec(max_length=32, max_batch=1))


def test_a_kv_cache_that_cannot_fit_head_dim_is_refused_before_the_quantizer_calibrates(monkeypatch):
    """``quantize(...),kv-cache(bits=4)`` on 8-wide heads ran (and calibrated) the quantizer, then kv-cache refused
    v_group=32; the head width is the model's, so the refusal comes from kv-cache's precheck before any pass runs."""
    from conftest import tiny_llama

    from lowbit.api import compile_model
    from lowbit.generate import GenerationSpec
    from lowbit.passes.insert_qdq import InsertQDQ
    from lowbit.passes.manager import ModelRefusedError

    ran: list[str] = []
    monkeypatch.setattr(InsertQDQ, "run", lambda self, graph: ran.append(self.name))
    torch.manual_seed(0)
    model = tiny_llama(hidden=32, inter=64, heads=4, kv_heads=2, vocab=97, max_positions=64)  # head_dim 8
    with pytest.raises(ModelRefusedError, match=r"pass kv-cache\(k_block=8,window=8\) \(#1\) refuses this "
                                                r"model, so no pass ran: .*v_group=32 .* must divide head_dim 8 .*; "
                                                r"give v_group=8"):
        compile_model(model, pipeline="quantize(w=int4,group=16),kv-cache(bits=4,k_block=8,window=8)",
                      generation=GenerationSpec(max_length=32, max_batch=1))
    assert ran == []


def test_a_written_out_attention_names_its_module_and_the_float_cache():
    """kv-cache on Gemma 2 (soft-capped attention, written out as matmuls and a softmax) said only 'the updated cache
    %present_0_key is read by %unsqueeze_3 (aten.unsqueeze.default); expected one attention', naming neither the
    layer nor what to do; it names the module, why, and that this model generates with the float cache."""
    import transformers as t

    from lowbit.api import compile_model
    from lowbit.generate import GenerationSpec
    from lowbit.passes.manager import PipelineError

    torch.manual_seed(0)
    model = t.AutoModelForCausalLM.from_config(t.Gemma2Config(
        hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
        num_hidden_layers=1, vocab_size=97, max_position_embeddings=64, pad_token_id=0, eos_token_id=0)).eval()
    with pytest.raises(PipelineError, match=r"no attention-logit soft-capping: layer 0 \(module "
                       r"'model.layers.0.self_attn'\) soft-caps .*written out .*leave kv-cache out"):
        compile_model(model, pipeline="kv-cache(bits=8,v_group=16)", generation=GenerationSpec(max_length=16,
                                                                                                max_batch=1))


def test_gpt2s_upcast_attention_is_refused_by_its_setting():
    """A bfloat16 GPT-2 with ``reorder_and_upcast_attn`` under eager attention: the step takes its scores in float32
    as transformers does, written out, so kv-cache has no attention node to replace; the refusal names the setting,
    the module and the way out (the float cache, or SDPA, under which transformers ignores the flag)."""
    import transformers as t

    from lowbit.api import compile_model
    from lowbit.generate import GenerationSpec
    from lowbit.passes.manager import PipelineError

    torch.manual_seed(0)
    config = t.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=97, n_positions=64, reorder_and_upcast_attn=True,
                          pad_token_id=0, eos_token_id=0)
    model = t.AutoModelForCausalLM.from_config(config, attn_implementation="eager").to(torch.bfloat16).eval()
    with pytest.raises(PipelineError, match=r"no float32 upcast of half-precision scores: layer 0 \(module "
                       r"'transformer.h.0.attn'\) takes .*reorder_and_upcast_attn.*leave kv-cache out"):
        compile_model(model, pipeline="kv-cache(bits=8,v_group=16)", generation=GenerationSpec(max_length=16,
                                                                                                max_batch=1))
    model.set_attn_implementation("sdpa")
    compiled = compile_model(model, pipeline="kv-cache(bits=8,v_group=16)",
                             generation=GenerationSpec(max_length=16, max_batch=1))
    assert len(compiled.generate([[1, 2, 3]], 2, stop_tokens=()).tokens[0]) == 2  # the packed cache serves SDPA's


def test_a_head_dim_no_v_group_fits_says_which_bits_do():
    """kv-cache(bits=2) on head_dim 6: the 2-bit codes of a head vector do not fill whole bytes, so no v_group fits,
    yet the refusal said only 'v_group=3 must divide head_dim 6 and be a multiple of the 4 codes per byte', and every
    v_group the user then tried was refused the same way. It says no v_group fits and which bits do. (The check reads
    the step graph's generation record only: a bare graph carrying one stands in for a capture.)"""
    from lowbit.ir.graph import Graph
    from lowbit.passes.base import PassError
    from lowbit.passes.manager import parse_pipeline

    graph = Graph()
    graph.meta["generation"] = {"cache_inputs": [], "head_dim": 6, "windows": [None], "max_length": 32}
    (kv,) = parse_pipeline("kv-cache(bits=2,k_block=8,window=8,v_group=3)")
    with pytest.raises(PassError, match=r"v_group=3 must divide head_dim 6 and be a multiple of the 4 codes per byte; "
                                        r"no v_group fits: head_dim 6 is not a multiple of 4 \(2-bit codes pack 4 per "
                                        r"byte\), so use bits=8 or bits=4$"):
        kv.run(graph)
    graph.meta["generation"]["head_dim"] = 10  # a fitting group exists: the hint names it, as before
    with pytest.raises(PassError, match=r"v_group=3 must divide head_dim 10 .*; give v_group=2$"):
        parse_pipeline("kv-cache(bits=4,k_block=8,window=8,v_group=3)")[0].run(graph)


def test_two_kv_cache_passes_are_refused_when_the_pipeline_is_read():
    """kv-cache twice was refused only when the second ran (exit 4, after the first and every pass between); the
    pipeline check names both, with their bits, and a CLI compile exits 2 before reading the model."""
    from typer.testing import CliRunner

    from lowbit.cli.main import app
    from lowbit.passes.manager import PipelineSpecError, parse_pipeline

    with pytest.raises(PipelineSpecError, match=r"pass kv-cache\(bits=8\) \(#2\) .* pass kv-cache \(#0\): .*4-bit "
                                                r"codes .*second \(bits=8\).*keep one kv-cache"):
        parse_pipeline("kv-cache(bits=4),dce,kv-cache(bits=8)")
    parse_pipeline("dce,kv-cache(bits=8)")  # one is fine
    res = CliRunner().invoke(app, ["compile", "no-such-model", "--pipeline", "kv-cache(bits=4),kv-cache(bits=8)"])
    assert res.exit_code == 2 and "kv-cache(bits=8)" in res.output and "keep one kv-cache" in res.output, res.output


def test_kv_cache_on_a_clone_leaves_the_original_step_graph_as_it_was():
    """kv-cache records its layout in ``meta["generation"]`` in place; ``Graph.clone`` shared that dict, so the
    original (a CLI snapshot, the graph a user cloned to try a pipeline) then claimed a packed cache its inputs lacked
    and a later kv-cache on it was refused as 'already has a packed KV cache'."""
    from conftest import tiny_llama

    from lowbit.api import compile_model
    from lowbit.generate import GenerationSpec
    from lowbit.passes.manager import PassManager

    torch.manual_seed(0)
    model = tiny_llama(hidden=32, inter=64, heads=2, kv_heads=1, vocab=61, max_positions=32)
    graph = compile_model(model, pipeline="dce", generation=GenerationSpec(max_length=16, max_batch=1)).graph
    before = repr(graph.meta["generation"])
    pipeline = "kv-cache(bits=4,k_block=8,window=8,v_group=8)"
    PassManager(pipeline).run(graph.clone())
    assert repr(graph.meta["generation"]) == before


@pytest.mark.parametrize("recipe", ["kv4", "kv2", "w8a8kv4", "w8a8kv2"])
def test_the_kv_recipes_generate_with_the_packed_cache_of_their_layout(recipe):
    """`lowbit generate --recipe kv4` (and compile_model(recipe="kv4", generation=...)) told a recipe user to drop
    kv=... from pipeline text they never wrote. A recipe whose KV layout the packed cache stores has a generation
    pipeline: its other passes, then kv-cache with the layout its quantize(kv=...) models (bits, key blocks, value
    groups, float window and sink)."""
    from lowbit.api import refuse_for_generation, resolve_pipeline
    from lowbit.passes.insert_qdq import config_from_options

    modelled = resolve_pipeline(None, recipe, None)
    served = resolve_pipeline(None, recipe, None, generation=True)
    refuse_for_generation(served, recipe)  # nothing a step graph cannot take
    (q,) = [p for p in modelled if p.name == "quantize"]
    kv = config_from_options(q.options).kv
    cache = served[-1].options
    assert served[-1].name == "kv-cache" and [p.name for p in served[:-1]] == [
        p.name for p in modelled if p.name != "quantize" or p.options.w]
    assert (cache.bits, cache.window, cache.sink) == (int(q.options.kv[-1]), kv.window, kv.sink)
    assert (cache.k_block, cache.v_group) == (kv.key.group_size, kv.value.group_size), (kv.key, kv.value)


def test_a_kv_recipe_without_a_packed_form_names_those_that_generate_and_the_pipeline_to_give():
    """A recipe whose KV layout the packed cache lacks (keys per token: w4a4kv4's) names the recipes that generate with
    a quantized cache and gives the whole --pipeline to run instead, which parses."""
    import re

    from lowbit.api import refuse_for_generation, resolve_pipeline
    from lowbit.models import GenerationError
    from lowbit.passes.manager import parse_pipeline

    passes = resolve_pipeline(None, "w4a4kv4-rtn", None, generation=True)
    with pytest.raises(GenerationError, match="recipe w4a4kv4-rtn's KV layout has no packed-cache form; the "
                                              "recipes that generate with a quantized cache are kv4, kv2, w8a8kv4, "
                                              "w8a8kv2") as exc:
        refuse_for_generation(passes, "w4a4kv4-rtn")
    instead = re.search(r"--pipeline '([^']+)'", str(exc.value)).group(1)
    assert [p.name for p in parse_pipeline(instead)] == ["fold-norms", "rotate", "quantize", "kv-cache"]


def test_gemma2_kv_cache_is_refused_before_any_pass_naming_what_the_packed_cache_lacks(monkeypatch):
    """``quantize(...),kv-cache(bits=4)`` on Gemma 2 refused its sliding window first (before any pass: 'compile with
    max_length <= the window'); at that max_length the quantizer ran and calibrated, then kv-cache failed on its
    soft-capped attention ('read by %unsqueeze_6'), with a --reproducer hint for what is no bug. What the packed
    cache lacks (soft-capping; the window it now masks) is named before any pass runs, at any max_length, with the
    float cache as the way; that way generates."""
    import transformers as t

    from lowbit.api import compile_model
    from lowbit.generate import GenerationSpec
    from lowbit.passes.insert_qdq import InsertQDQ
    from lowbit.passes.manager import ModelRefusedError

    torch.manual_seed(0)
    model = t.AutoModelForCausalLM.from_config(t.Gemma2Config(
        hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        num_hidden_layers=2, vocab_size=128, max_position_embeddings=128, sliding_window=8, pad_token_id=0,
        eos_token_id=1, bos_token_id=2)).eval()
    run = InsertQDQ.run
    ran: list[str] = []
    monkeypatch.setattr(InsertQDQ, "run", lambda self, graph: ran.append(self.name) or run(self, graph))
    for length in (64, 8):
        with pytest.raises(ModelRefusedError) as err:
            compile_model(model, pipeline="quantize(w=int4,group=32),kv-cache(bits=4)",
                          generation=GenerationSpec(max_length=length, max_batch=1))
        msg = str(err.value)
        assert "pass kv-cache (#1) refuses this model, so no pass ran" in msg and "no attention-logit " \
            "soft-capping: layers 0, 1 (module 'model.layers.0.self_attn' and the others) soft-cap their attention " \
            "logits" in msg and "leave kv-cache out of the pipeline" in msg and "sliding" not in msg, msg
    assert ran == []
    gen = compile_model(model, pipeline="quantize(w=int4,group=32)", generation=GenerationSpec(max_length=64,
                                                                                              max_batch=1))
    assert len(gen.generate([[2, 5, 6, 7]], 12, stop_tokens=()).tokens[0]) == 12 and ran == ["quantize"]


@pytest.mark.parametrize("family", [pytest.param("mistral", marks=pytest.mark.slow), "gemma3"])
def test_packed_cache_masks_a_sliding_window_longer_than_its_float_ring(family):
    """kv-cache refused every sliding window shorter than max_length (Mistral, Gemma 3, Ministral, OLMo 3: 'compile
    with max_length <= the window'). ``cache_attention`` now masks the layer's window (``sliding``) over its
    quantized and float tokens: with a 12-token window over an 8-token float ring, tokens 8-11 back are read
    quantized, and the int8 cache's greedy tokens (a batch of two prompts, 30 each) equal the float step's, which
    are transformers' (test_architectures), where the same model with a longer window makes other tokens. Mistral
    (every layer sliding) runs with the slow tests only: Gemma 3 masks its sliding layer the same way beside a
    full-attention one."""
    import transformers as t

    from lowbit.api import compile_model
    from lowbit.generate import GenerationSpec

    def model(window: int) -> torch.nn.Module:
        small = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                     num_hidden_layers=2, vocab_size=128, max_position_embeddings=128, sliding_window=window)
        cfg = (t.MistralConfig(**small) if family == "mistral" else
               t.Gemma3TextConfig(**small, layer_types=["sliding_attention", "full_attention"], pad_token_id=0))
        torch.manual_seed(0)
        m = t.AutoModelForCausalLM.from_config(cfg).eval()
        with torch.no_grad():  # sharper logits than the init's: greedy ties would not test anything
            for p in m.parameters():
                p.mul_(3)
        return m

    prompts = [[5, 9, 17, 33, 2, 8, 64, 3, 11, 19], [7, 40]]
    spec = GenerationSpec(max_length=48, max_batch=2)
    hf = model(12)
    want = compile_model(hf, generation=spec).generate(prompts, 30, stop_tokens=()).tokens
    assert compile_model(model(100), generation=spec).generate(prompts, 30, stop_tokens=()).tokens != want
    packed = compile_model(hf, pipeline="kv-cache(bits=8,k_block=8,window=8,v_group=16)", generation=spec)
    windows = [n.kwargs.get("sliding") for n in packed.graph.nodes if n.op == "cache_attention"]
    assert windows == ([12, 12] if family == "mistral" else [12, None])
    assert packed.generate(prompts, 30, stop_tokens=()).tokens == want


@pytest.mark.slow
def test_a_decode_step_dequantizes_the_written_blocks_not_the_whole_cache(smollm2, packed_slice, monkeypatch):
    """``cache_attention``'s reference (the torch backend's decode step) dequantized every slot of the packed cache
    at every step, so a CPU decode step's cost grew with ``max_length``, not with the tokens written (SmolLM2's
    shapes: 28 ms per layer at 2048 slots against 7 at 128, 40 tokens in). It dequantizes the key blocks up to the
    last token a query reads quantized; the 2-layer slice over a 1024-slot cache makes the 96-slot cache's greedy
    tokens."""
    from conftest import smollm2_slice

    from lowbit.api import compile_model
    from lowbit.generate import GenerationSpec
    from lowbit.ir import kvcache

    tok = smollm2[1]
    long = compile_model(smollm2_slice(smollm2[0], 2).model, tokenizer=tok, pipeline="kv-cache(bits=4)",
                         generation=GenerationSpec(max_length=1024, max_batch=2))
    prompts = [tok(p).input_ids for p in PROMPTS]
    want = packed_slice[1].generate(prompts, NEW, stop_tokens=()).tokens
    read: list[int] = []
    dequantize = kvcache.dequantize_keys
    monkeypatch.setattr(kvcache, "dequantize_keys", lambda codes, *a: read.append(codes.shape[2]) or dequantize(
        codes, *a))
    assert long.generate(prompts, NEW, stop_tokens=()).tokens == want
    last = max(len(p) for p in prompts) + NEW - 2  # the last decode step's position
    assert read and max(read) == -(-(last - 32 + 1) // 32) * 32, sorted(set(read))  # window 32, k_block 32


@pytest.mark.parametrize("bits,kb,vg,window,sink", CASES)
def test_cache_attention_over_the_written_blocks_equals_it_over_every_slot(bits, kb, vg, window, sink, monkeypatch):
    """The decode steps' answers over the written blocks only (the last step of 100 tokens reads 96 slots or fewer)
    are those over every slot of a 256-slot cache (what the reference computed before), to fp32 rounding."""
    from lowbit.ir import kvcache

    q, k, v = _random_sequence(2)
    kw = dict(bits=bits, k_block=kb, v_group=vg, window=window, sink=sink)
    read: list[int] = []
    dequantize = kvcache.dequantize_values
    monkeypatch.setattr(kvcache, "dequantize_values", lambda codes, *a: read.append(codes.shape[2]) or dequantize(
        codes, *a))
    runs = []
    for every in (False, True):
        if every:
            assert max(read) == -(-(k.shape[2] - window) // kb) * kb <= 96, sorted(set(read))
        if every:
            monkeypatch.setattr(kvcache, "_quantized_extent", lambda positions, slots, **_: slots)
        cache = kv.empty_cache(kv.cache_layout(2, 2, 256, 16, **kw))
        outs = []
        for t in range(k.shape[2]):
            out = kv.cache_attention(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1],
                                     torch.full((2, 1), t), *cache, **kw)
            outs.append(out[0])
            cache = list(out[1:])
        runs.append(torch.cat(outs, 2))
    assert torch.allclose(runs[0], runs[1], rtol=0, atol=1e-6)


def test_a_decode_step_writes_the_donated_packed_cache_in_place(packed_slice):
    """The torch backend's decode step copied each layer's eight packed-cache tensors whole (out of place: a CPU
    decode step's cost grew with max_length; a 2-layer toy at max_length 4096 made 2.6 tokens/s, 11.6 in place). The
    step graph's cache is donated, so its decode steps write into it as the float cache's scatters do: the cache it
    returns is the one it was given, equal to what the out-of-place graph returns, and the logits are the same."""
    from lowbit.backends.torch_backend import lower_to_fx
    from lowbit.generate import Generator

    compiled = packed_slice[1]
    gen = Generator(compiled.runner, compiled.graph.meta["generation"])
    prompt = list(range(100, 140))  # past the window (32) and a key block (32)
    out = compiled.runner(torch.tensor([prompt]), torch.arange(40)[None], *gen._cache(1, 96))
    cache = [c.clone() for c in out[1:]]
    step = (torch.tensor([[7]]), torch.tensor([[40]]))
    want = lower_to_fx(compiled.runner.graph)(*step, *[c.clone() for c in cache])
    got = compiled.runner(*step, *cache)
    assert all(g.data_ptr() == c.data_ptr() for g, c in zip(got[1:], cache))
    assert all(torch.equal(g, w) for g, w in zip(got[1:], want[1:]))
    assert torch.equal(got[0], want[0])


def test_a_decode_step_writes_the_packed_cache_in_few_ops_and_as_a_prefill_chunk_does(monkeypatch):
    """A decode step's ``cache_update`` (one token) ran the chunk's general index arithmetic: a gather of the new
    key over its block, the sink's gather/where/copy per tensor, zero tensors for each range: 95 compute ops per
    layer and token (150 dispatched with views), each a kernel launch on a GPU. One token broadcasts over its block
    and writes its sink slot with its ring slot in one scatter: counted in a tiny Llama's real decode steps, at most
    75 (71 now). Answers unchanged: decoding token by token leaves the float32 cache a one-chunk prefill of the
    same tokens leaves (the chunk path is the general one), through the sink (tokens below it decoded too)."""
    from conftest import CountedOps, tiny_llama
    from lowbit.api import compile_model
    from lowbit.generate import GenerationSpec

    views = {"aten.unsqueeze.default", "aten.expand.default", "aten.view.default", "aten.alias.default",
             "aten.slice.Tensor", "aten.lift_fresh.default", "aten._unsafe_view.default", "aten.reshape.default"}

    per_step: list[int] = []
    real = kv.cache_update

    def counted(k, v, positions, cache, **kw):
        if k.shape[2] > 1:
            return real(k, v, positions, cache, **kw)
        with CountedOps() as c:
            out = real(k, v, positions, cache, **kw)
        per_step.append(sum(n for op, n in c.ops.items() if op not in views))
        return out

    monkeypatch.setattr(kv, "cache_update", counted)
    torch.manual_seed(0)
    cm = compile_model(tiny_llama(hidden=64, heads=2, kv_heads=1, max_positions=64),
                       pipeline="kv-cache(bits=4,k_block=8,window=8,v_group=16,sink=4)",
                       generation=GenerationSpec(max_length=64))
    cm.generate([[3, 4]], 6, stop_tokens=())
    assert len(per_step) >= 5 and max(per_step) <= 75, per_step
    monkeypatch.undo()
    q, k, v = _random_sequence(7)
    b, h, n, d = k.shape
    for kw in (dict(bits=4, k_block=8, v_group=16, window=8, sink=4), dict(bits=2, k_block=4, v_group=8, window=16,
                                                                          sink=0)):
        layout = kv.cache_layout(b, h, 64, d, **kw)
        chunk = kv.cache_update(k[:, :, :30], v[:, :, :30], torch.arange(30).expand(b, 30), kv.empty_cache(layout),
                                **kw)
        steps = kv.cache_update(k[:, :, :2], v[:, :, :2], torch.arange(2).expand(b, 2), kv.empty_cache(layout), **kw)
        for t in range(2, 30):
            steps = kv.cache_update(k[:, :, t:t + 1], v[:, :, t:t + 1], torch.full((b, 1), t), steps,
                                    inplace=t % 2 == 0, **kw)
        for part, got, want in zip(kv.CACHE_PARTS, steps, chunk):
            assert torch.equal(got, want), (kw, part)


@pytest.fixture(autouse=True)
def _one_export_per_model(reuse_captures: object) -> None:
    """Every test here captures through the session's capture cache (conftest's ``reuse_captures``): the same tiny
    model compiled again is not exported again."""


@pytest.mark.parametrize("bits", [8, 2])
def test_prompts_of_one_length_are_prefilled_together_as_each_alone(smollm2, wikitext_ids, bits, monkeypatch):
    """The packed cache prefilled each prompt alone, a Python loop over the batch (SmolLM2 W4A16 kv4 on an H100:
    2.5 s at batch 16, 0.22 s at batch 1), with three host syncs in every layer. Prompts of one length are
    prefilled together, one step call per distinct length, the layers read no position on the host and make the
    masks of the positions once for the step (``_per_step``): three 48-token WikiText-2 windows
    (past the float window and a key block) make one call, whose last logits and eight cache tensors per layer are
    each prompt's alone (to fp32 rounding: a batched matmul rounds as it likes; here they are bit for bit); with a
    40-token one between them, two calls, rows in the batch's order. Greedy generation gives each prompt's tokens
    alone."""
    from collections import Counter

    from conftest import CountedOps, smollm2_slice

    from lowbit.api import compile_model
    from lowbit.generate import GenerationSpec, Generator, left_padded

    compiled = compile_model(smollm2_slice(smollm2[0], 2).model, tokenizer=smollm2[1],
                             pipeline=f"kv-cache(bits={bits})", generation=GenerationSpec(max_length=96, max_batch=3))
    gen = Generator(compiled.runner, compiled.graph.meta["generation"])
    calls: list[tuple[int, ...]] = []
    gen.runner = lambda ids, *rest: calls.append(tuple(ids.shape)) or compiled.runner(ids, *rest)
    text = wikitext_ids[0, :400].tolist()
    equal = [text[0:48], text[100:148], text[300:348]]
    mixed = [equal[0], text[200:240], equal[2]]

    def prefill(prompts: list[list[int]]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        return gen._prefill(*left_padded(prompts), [len(p) for p in prompts])

    alone = {tuple(p): prefill([p]) for p in equal + mixed}
    built: Counter[str] = Counter()
    for name in ("_chunk_index", "_attend_mask", "_candidate_mask"):
        monkeypatch.setattr(kv, name, lambda *a, _real=getattr(kv, name), _name=name, **k: built.update([_name])
                            or _real(*a, **k))
    reads: list[tuple[int, ...]] = []
    tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: reads.append(tuple(t.shape)) or tolist(t))
    calls.clear()
    with CountedOps() as counted:
        together = prefill(equal)
    monkeypatch.setattr(torch.Tensor, "tolist", tolist)
    assert calls == [(3, 48)]
    # the masks once for both layers; a prefill from position 0 (_prefill_attention) makes no chunk index
    assert built and set(built.values()) == {1} and "_chunk_index" not in built, built
    # one host read a step call (its input checks: the ids' and positions' ranges together); none in the layers
    assert counted.ops["aten._local_scalar_dense.default"] == 0 and reads == [(4,)], (counted.ops, reads)
    calls.clear()
    both = prefill(mixed)
    assert sorted(calls) == [(1, 40), (2, 48)]
    for prompts, (logits, cache) in ((equal, together), (mixed, both)):
        for b, p in enumerate(prompts):
            want_logits, want_cache = alone[tuple(p)]
            want_logits, want_cache = alone[tuple(p)]
            assert (logits[b] - want_logits[0]).abs().max() <= 1e-5 * want_logits.abs().max()
            assert len(cache) == len(want_cache) == 16
            for got, want in zip(cache, want_cache):
                if want.dtype == torch.uint8:  # codes: at most one step apart where fp32 rounding met a tie
                    step = (got[b].int() - want[0].int()).abs()
                    assert step.max() <= 1 and step.float().mean() <= 1e-3, (step.max(), step.float().mean())
                else:
                    assert torch.allclose(got[b], want[0], rtol=1e-5, atol=1e-6)
    compiled._generator = gen
    got = compiled.generate(mixed, 12, stop_tokens=()).tokens
    assert got == [compiled.generate([p], 12, stop_tokens=()).tokens[0] for p in mixed]


# bits=8 under the slow mark (9 s of the -n 2 suite): the prefill's path takes bits only as a number (the packing's
# codes per byte); 4 and 2 run it here, and test_prompts_of_one_length_are_prefilled_together_as_each_alone[8]
# prefills an 8-bit cache
@pytest.mark.parametrize("bits", [pytest.param(8, marks=pytest.mark.slow), 4, 2])
def test_a_prefill_from_position_0_writes_and_attends_the_cache_in_fewer_ops_bit_for_bit(smollm2, wikitext_ids,
                                                                                         bits, monkeypatch):
    """A packed-cache prefill ran the chunk's general path in every layer (99 ATen ops a SmolLM2 layer, each a
    kernel launch on a GPU: an H100's 1 x 512 kv4 prefill was host-bound at 102.6 ms): keys gathered from an empty
    ring, scattered into padded copies, keys and values quantized and packed apart, the whole written extent
    unpacked again. Inside ``host_checked_positions(L - 1)`` (every sequence at 0..L-1) ``_prefill_attention``
    takes at most 46 a layer after the step's first; its cache and every position's logits equal the general
    path's (the same step called without the host's positions) bit for bit, for prompts inside the float window +
    sink (no quantized read) and past it, windows 16/32, sink 0/1, one and two WikiText-2 prompts."""
    from conftest import CountedOps, smollm2_slice

    from lowbit.api import compile_model
    from lowbit.generate import GenerationSpec, Generator

    views = {"aten.unsqueeze.default", "aten.expand.default", "aten.view.default", "aten.alias.default",
             "aten.slice.Tensor", "aten.lift_fresh.default", "aten._unsafe_view.default", "aten.reshape.default",
             "aten.select.int", "aten.detach.default"}
    per_layer: list[int] = []
    real = kv.cache_attention

    def counted(*args, **kwargs):  # type: ignore[no-untyped-def]
        with CountedOps() as c:
            out = real(*args, **kwargs)
        per_layer.append(sum(n for op, n in c.ops.items() if op not in views))
        return out

    text = wikitext_ids[0, :800].tolist()
    model = smollm2_slice(smollm2[0], 2).model
    for window, sink in ((16, 0), (16, 1), (32, 0), (32, 1)):
        pipeline = f"kv-cache(bits={bits},window={window},k_block={min(window, 32)},sink={sink})"
        compiled = compile_model(model, tokenizer=smollm2[1], pipeline=pipeline,
                                 generation=GenerationSpec(max_length=128, max_batch=2, logits="all"))
        gen = Generator(compiled.runner, compiled.graph.meta["generation"])
        for n, batch in ((12, 1), (12, 2), (40, 2), (100, 1), (100, 2)):
            ids = torch.tensor([text[i * 400:i * 400 + n] for i in range(batch)])
            positions = torch.arange(n).expand(batch, n)
            want = compiled.runner(ids, positions, *gen._cache(batch, 128))
            per_layer.clear()
            monkeypatch.setattr(kv, "cache_attention", counted)
            with kv.host_checked_positions(n - 1):
                got = compiled.runner(ids, positions, *gen._cache(batch, 128))
            monkeypatch.setattr(kv, "cache_attention", real)
            assert len(per_layer) == 2 and per_layer[1] <= 46, (window, sink, n, per_layer)
            assert len(got) == len(want) == 17
            for part, g, w in zip(("logits", *kv.CACHE_PARTS * 2), got, want):
                assert torch.equal(g, w), (bits, window, sink, n, batch, part)


def _stale(cache: list[torch.Tensor]) -> list[torch.Tensor]:
    """Cache buffers holding another prompt's bytes, as a replayed graph's static inputs may."""
    return [torch.randint_like(c, 256) if c.dtype == torch.uint8 else torch.randn_like(c) * 100 for c in cache]


def _read_by_decoding(part: str, t: torch.Tensor, n: int, *, k_block: int, window: int, sink: int) -> torch.Tensor:
    """The slots of one sequence's cache tensor ``t`` ``[H, S, ...]`` that its decode steps read before writing them,
    after a prefill of ``n`` tokens: the whole key blocks before the one holding position ``n`` (that one is
    re-quantized from the float ring at the first step), the values of ``0..n-1``, the float slots holding a token."""
    if part == "k_codes":
        return t[:, :n // k_block * k_block]
    if part in ("k_scale", "k_zero"):
        return t[:, :n // k_block]
    if part in ("k_float", "v_float"):
        held = kv.candidate_positions(torch.tensor([[n]]), window=window, sink=sink)[1][0, :sink + window]
        return t[:, held]
    return t[:, :n]


class _ReplayedOnTheCpu:
    """``_CudaGraphStep``'s prefill side on the CPU: the captured runner over static cache buffers (here holding stale
    bytes, which the packed prefill must never read), replayed with each prefill's bucketed inputs."""

    replays = 0

    def __init__(self, runner, ids: torch.Tensor, positions: torch.Tensor, cache: list[torch.Tensor],
                 greedy: bool = False) -> None:
        self.runner, self.ids, self.cache = runner, ids.clone(), _stale(cache)

    def replay_with(self, ids: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, ...]:
        type(self).replays += 1
        return self.runner(ids, positions, *self.cache)


def _padded_prefill_family(family: str) -> torch.nn.Module:
    """A random tiny Llama (rotary, GQA), Bloom (ALiBi) or Gemma 3 (a 24-token sliding layer beside a full one)
    for 160-token generation, seeded."""
    import transformers as t
    from conftest import tiny_llama, tiny_outside_family

    torch.manual_seed(0)
    if family == "llama":
        return tiny_llama(hidden=128, inter=256, heads=4, kv_heads=2, layers=2, vocab=1000, max_positions=200)
    if family == "bloom":
        return tiny_outside_family("bloom")
    cfg = t.Gemma3TextConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                             head_dim=16, num_hidden_layers=2, vocab_size=128, max_position_embeddings=200,
                             sliding_window=24, layer_types=["sliding_attention", "full_attention"], pad_token_id=0)
    return t.AutoModelForCausalLM.from_config(cfg).eval()


class _FailsToCapture(_ReplayedOnTheCpu):
    """A capture that fails (as one whose step syncs with the host would on CUDA)."""

    def __init__(self, *args, **kwargs) -> None:
        raise RuntimeError("operation not permitted when stream is capturing")


@pytest.mark.parametrize("family", ["llama", "bloom", "gemma3", "smollm2"])
def test_a_bucketed_packed_prefill_leaves_what_decoding_reads_as_the_unpadded_one(family, request, monkeypatch):
    """A captured packed prefill takes prompts of any lengths left-padded to their 64-token bucket together
    (``_padded_runner``; the eager one prefills each length apart, unpadded). For a batch of 70, 9, 37 and 64
    tokens (past and inside the float window + sink, a whole number of key blocks) on a random Llama, Bloom (ALiBi:
    the bias read by key position) and Gemma 3 (its sliding layer's 24-token window reads quantized tokens past the
    16-token float ring), and a 2-layer SmolLM2 on WikiText-2: every prompt's last logits and the cache slots its
    decode steps read equal the unpadded prefill's (fp32 rounding: codes at most one step apart where it met a
    tie), whatever stale bytes the cache buffers held; and greedy generation through the replayed prefill (captured
    at a shape's second sighting, LRU ``prefill_graphs=1``) gives the eager prefill's tokens; a capture that fails
    is said once and the prefills run eagerly from then on, with the same tokens."""
    import lowbit.generate as generate
    from conftest import smollm2_slice

    from lowbit.api import compile_model
    from lowbit.generate import GenerationSpec, Generator, bucketed, left_padded

    spec = GenerationSpec(max_length=160, max_batch=4, prefill_graphs=1)
    torch.manual_seed(0)
    if family == "smollm2":
        model, tok = request.getfixturevalue("smollm2")
        model, pipeline = smollm2_slice(model, 2).model, "kv-cache(bits=4)"
        text = request.getfixturevalue("wikitext_ids")[0, :600].tolist()
        vocab = None
    else:
        model = _padded_prefill_family(family)
        tok, pipeline = None, "kv-cache(bits=4,window=16,k_block=16,v_group=16,sink=1)"
        vocab = model.config.vocab_size
        text = torch.randint(3, vocab, (600,), generator=torch.Generator().manual_seed(1)).tolist()
    compiled = compile_model(model, tokenizer=tok, pipeline=pipeline, generation=spec)
    gen = Generator(compiled.runner, compiled.graph.meta["generation"])
    layout = {k: gen.kv[k] for k in ("k_block", "window", "sink")}
    prompts = [text[0:70], text[100:109], text[200:237], text[300:364]]
    lengths = [len(p) for p in prompts]
    ids, positions = left_padded(prompts)
    want_logits, want_cache = gen._prefill(ids, positions, lengths)
    wide = bucketed(ids, positions, 128)
    got = gen._padded_runner(*wide, *gen._cache(4, 160))
    again = gen._padded_runner(*wide, *_stale(gen._cache(4, 160)))
    assert torch.equal(again[0], got[0])
    assert (got[0][:, -1] - want_logits).abs().max() <= 1e-5 * want_logits.abs().max()
    for i, (g, s, w) in enumerate(zip(got[1:], again[1:], want_cache)):
        part = kv.CACHE_PARTS[i % 8]
        for b, n in enumerate(lengths):
            g_b, s_b, w_b = (_read_by_decoding(part, t[b], n, **layout) for t in (g, s, w))
            assert torch.equal(s_b, g_b), (family, part, n)  # the stale bytes are never read
            if not w_b.numel():  # no whole key block before the one holding position n
                continue
            if w.dtype == torch.uint8:
                step = (g_b.int() - w_b.int()).abs()
                assert step.max() <= 1 and step.float().mean() <= 1e-3, (family, part, n)
            else:
                assert (g_b - w_b).abs().max() <= 1e-5 * w_b.abs().max() + 1e-6, (family, part, n)
    eager = compiled.generate(prompts, 12, stop_tokens=()).tokens
    monkeypatch.setattr(generate, "_CudaGraphStep", _ReplayedOnTheCpu)
    monkeypatch.setattr(_ReplayedOnTheCpu, "replays", 0)
    monkeypatch.setattr(gen, "_captures_prefills", lambda: True)
    compiled._generator = gen
    for n in range(3):  # eager at the first sighting, captured at the second, replayed at the third
        assert compiled.generate(prompts, 12, stop_tokens=()).tokens == eager, (family, n)
        assert list(gen._prefill_graphs) == [(4, 128)][:n] and _ReplayedOnTheCpu.replays == n, (family, n)
    fewer = [prompts[1], prompts[3]]
    want_fewer = Generator(compiled.runner, compiled.graph.meta["generation"]).generate(fewer, 8,
                                                                                       stop_tokens=()).tokens
    for _ in range(2):
        assert compiled.generate(fewer, 8, stop_tokens=()).tokens == want_fewer, family
    assert list(gen._prefill_graphs) == [(2, 64)]  # past prefill_graphs=1 the older graph is dropped
    monkeypatch.setattr(generate, "_CudaGraphStep", _FailsToCapture)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)  # (the failure waits for the device)
    other = [prompts[0], prompts[2]]
    want = Generator(compiled.runner, compiled.graph.meta["generation"]).generate(other, 8, stop_tokens=()).tokens
    assert compiled.generate(other, 8, stop_tokens=()).tokens == want
    with pytest.warns(RuntimeWarning, match="capturing the 2 x 128 prefill failed .*prefills run eagerly"):
        assert compiled.generate(other, 8, stop_tokens=()).tokens == want
    assert gen.prefill_graph_error.startswith("RuntimeError") and _ReplayedOnTheCpu.replays == 3
    assert compiled.generate(fewer, 8, stop_tokens=()).tokens == want_fewer  # eager from then on, no replay
    assert _ReplayedOnTheCpu.replays == 3
    assert vocab is None or all(t < vocab for seq in eager for t in seq)
