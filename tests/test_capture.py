"""Capture of the real models: what is raised, that nothing is lost, and that lowering is exact."""

from __future__ import annotations

import contextlib
import re

import pytest
import torch

from lowbit.backends.torch_backend import TorchCompiled
from lowbit.ir.capture import CaptureError, capture
from lowbit.ir.ops import is_semantic


def test_smollm2_raised_ops(smollm2_graph):
    counts = smollm2_graph.op_counts()
    # 30 blocks: 2 norms each + final norm; q,k,v,o,gate,up,down + lm_head; rotary on q and k.
    assert counts["rms_norm"] == 61
    assert counts["linear"] == 30 * 7 + 1
    assert counts["rotary"] == 60
    assert counts["attention"] == 30
    assert counts["residual_add"] == 60
    assert counts["embedding"] == 1
    assert not any(op.startswith("aten.linear") or op.startswith("aten.scaled_dot") for op in counts)


def test_smollm2_module_paths(smollm2_graph):
    for node in smollm2_graph.find("linear"):
        assert re.fullmatch(r"model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)|lm_head",
                            node.module), node.module
    assert {n.module for n in smollm2_graph.find("rms_norm")} >= {"model.norm", "model.layers.29.input_layernorm"}
    assert "model.layers.0.self_attn.q_proj.weight" in smollm2_graph.params


def test_smollm2_lowered_matches_eager_on_wikitext(smollm2, smollm2_graph, wikitext_ids):
    model = smollm2[0]
    compiled = TorchCompiled(smollm2_graph)
    for length in (512, 77):  # two lengths through one dynamic graph
        ids = wikitext_ids[:, 1000:1000 + length]
        with torch.no_grad():
            ref = model(input_ids=ids, use_cache=False).logits
        out = compiled(ids)
        assert out.shape == ref.shape
        assert (out - ref).abs().max().item() <= 1e-4


def test_float64_lowering_is_exact(smollm2_slice_f64, wikitext_ids):
    wrapper, graph = smollm2_slice_f64
    ids = wikitext_ids[:, :128]
    with torch.no_grad():
        ref = wrapper(ids)
    assert ref.dtype == torch.float64
    assert torch.equal(TorchCompiled(graph)(ids), ref)


def test_minilm_capture_matches_eager(minilm, minilm_graph):
    embedder, tok = minilm
    counts = minilm_graph.op_counts()
    assert counts["layer_norm"] == 13 and counts["attention"] == 6
    assert counts["linear"] == 6 * 6  # q,k,v, attention out, intermediate, output per layer; pooler is dead
    assert "aten.dropout.default" not in counts
    sentences = ["The tower is 324 metres tall.", "It was the first structure to reach that height.",
                 "Short one."]
    enc = tok(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = embedder(enc["input_ids"], enc["attention_mask"])
    out = TorchCompiled(minilm_graph)(enc["input_ids"], enc["attention_mask"])
    assert (out - ref).abs().max().item() <= 1e-5


def test_every_op_is_runnable_and_generic_ops_are_kept(smollm2_graph):
    generic = [n for n in smollm2_graph.nodes if not is_semantic(n.op)]
    assert generic, "the causal-mask construction stays as ATen: nothing is dropped"
    assert all(n.op.startswith(("aten.", "operator.")) for n in generic)


def test_fx_graph_module_is_accepted():
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4)).eval()
    gm = torch.fx.symbolic_trace(mlp)
    x = torch.randn(3, 8)
    graph = capture(gm, (x,))
    assert graph.op_counts() == {"linear": 2, "gelu": 1}
    assert torch.equal(TorchCompiled(graph)(x), mlp(x))


def test_capture_error_names_module_and_advice():
    class Branchy(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = torch.nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.proj(x)
            return y if y.sum() > 0 else -y

    class Outer(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.block = Branchy()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.block(x) * 2

    with pytest.raises(CaptureError, match=r"inside module 'block' \(Branchy\).*\n.*torch\.cond"):
        capture(Outer().eval(), (torch.randn(2, 4),))


def test_dynamic_dim_given_an_example_of_size_one_says_so():
    """A dim marked dynamic whose example has size 1 fails in torch.export's 0/1 specialization; the advice was 'a
    dimension you marked dynamic is fixed by the model's code: mark it static', and the dim itself was on a line the
    error left out. It names the input dim and asks for an example of size 2 or more (which then captures)."""
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.GELU()).eval()
    dyn = {"input": {0: torch.export.Dim.DYNAMIC}}
    with pytest.raises(CaptureError, match=r"example input has size 1 in inputs\['input'\]\.shape\[0\], which you "
                                           r"marked dynamic: .*size 2 or more"):
        capture(net, (torch.randn(1, 4),), dyn)
    assert isinstance(capture(net, (torch.randn(2, 4),), dyn).inputs[0].type.shape[0], str)


def test_raw_hf_causal_lm_gets_cache_advice(smollm2):
    from conftest import smollm2_slice

    raw = smollm2_slice(smollm2[0], 1).model  # the HF model itself, which returns a DynamicCache
    with pytest.raises(CaptureError, match="use_cache=False"):
        capture(raw, (torch.ones(1, 8, dtype=torch.long),))


def test_training_mode_is_refused():
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.5))
    with pytest.raises(CaptureError, match="training mode"):
        capture(net, (torch.randn(1, 4),))


def test_unbounded_dynamic_dims_become_symbols_without_a_maximum():
    """``Dim.DYNAMIC`` with no max has an infinite upper range in torch.export; the symbol keeps max=None."""
    from lowbit.backends.torch_backend import TorchCompiled
    from lowbit.ir.capture import capture
    from lowbit.ir.verifier import verify

    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4)).eval()
    x = torch.randn(3, 5, 8)
    g = capture(model, (x,), {"input": {0: torch.export.Dim.DYNAMIC, 1: torch.export.Dim.DYNAMIC}})
    assert g.symbols and all(s.max is None or s.max > 10**6 for s in g.symbols.values())
    verify(g)
    y = torch.randn(7, 2, 8)
    torch.testing.assert_close(TorchCompiled(g)(y), model(y), rtol=0, atol=1e-6)


def test_torch_integer_functions_in_dims_are_written_in_the_ir_grammar():
    """``math.ceil(n / 3)`` in a model is ``CeilToInt(IntTrueDiv(s0, 3))`` to torch.export: capture wrote that as
    the dimension, and verify (so every compile) and reading the IR text back raised a raw DimParseError
    ('CeilToInt' is not a dimension function). It is now ``ceiling(s0/3)``, and Python's ``%`` is ``Mod``."""
    import math

    from lowbit.ir.parser import parse_graph
    from lowbit.ir.verifier import verify

    class Thirds(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = torch.nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return self.proj(x[:, :math.ceil(x.shape[1] / 3)]), x[:, :x.shape[1] % 5 + 1]

    model = Thirds().eval()
    g = capture(model, (torch.randn(2, 7, 4),), ({1: torch.export.Dim.DYNAMIC},))
    text = str(g)
    assert "f32[2,ceiling(s0/3),4]" in text and "Mod(s0,5)" in text and "CeilToInt" not in text, text
    verify(g)
    assert str(parse_graph(text, {name: v.data for name, v in g.params.items()})) == text
    y = torch.randn(2, 11, 4)
    for got, want in zip(TorchCompiled(g)(y), model(y)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_a_dim_the_ir_grammar_cannot_write_is_refused_at_capture_naming_the_node():
    class Square(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.new_zeros(x.shape[1] ** 2)

    with pytest.raises(CaptureError, match=r"node pow_1 \(operator.pow\) .*'s0\*\*2'.*mark that dimension static"):
        capture(Square().eval(), (torch.randn(2, 7),), ({1: torch.export.Dim.DYNAMIC},))


def test_in_place_ops_are_functionalized_so_falcon_captures_and_matches_transformers():
    """torch.export keeps in-place ATen ops (Falcon's ``mlp_output += attention_output`` is ``aten.add_``), which
    the IR does not run: every compile of a Falcon failed with 'the input IR is invalid before any pass ran:
    unknown op aten.add_.Tensor'. A graph with one is functionalized at capture. (The Falcon of the next test, whose
    functionalizing capture, ~5 CPU-s, the session's capture cache makes once for both.)"""
    import transformers as t

    import lowbit

    torch.manual_seed(0)
    cfg = t.FalconConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=2, vocab_size=512,
                         new_decoder_architecture=False, multi_query=True)
    model = t.AutoModelForCausalLM.from_config(cfg).eval()
    compiled = lowbit.compile_model(model, pipeline="dce")
    assert "aten.add_.Tensor" not in compiled.graph.op_counts()
    ids = torch.randint(0, 512, (2, 37))
    with torch.no_grad():
        want = model(ids, use_cache=False).logits
    torch.testing.assert_close(compiled(ids), want, rtol=0, atol=1e-5)


class _InPlace(torch.nn.Module):
    """``x @ w`` then in-place ops on it (``how``): on the product itself (``fresh``: a Mixtral router's ``/=``, then
    Falcon's ``+=`` on what it wrote), on a tensor a view reads after the write (``aliased``), or adding a float32
    tensor to a bfloat16 one (``promote``: ``a += b`` keeps bf16, ``a + b`` would promote), each read again after
    the write."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.w = torch.nn.Parameter(torch.randn(8, 8, generator=torch.Generator().manual_seed(0)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x @ self.w
        if self.how == "fresh":
            s = y.sum(-1, keepdim=True)
            y /= s
            y += x
            return y * 2 + s
        if self.how == "aliased":
            flat = y.view(-1)
            y += 1.0
            return flat * 2
        z = y.to(torch.bfloat16) * 2  # "promote"
        z += y
        return z


@pytest.mark.parametrize("how, node_by_node", [("fresh", True), ("aliased", False), ("promote", False)])
def test_in_place_ops_on_a_fresh_tensor_are_functionalized_node_by_node(how, node_by_node, monkeypatch):
    """``_functionalize_in_place`` replaces an in-place op on a tensor an op just computed with its out-of-place form,
    the later readers reading its result, without retracing (``run_decompositions``, two thirds of a tiny
    Mixtral's capture). An in-place op on a tensor a view reads, or one whose out-of-place form would promote the
    dtype, is left to the retrace. Either way no in-place op is left and the graph computes the module's outputs."""
    import importlib

    from lowbit.backends.torch_backend import TorchCompiled

    retraced: list[bool] = []
    decompose = torch.export.ExportedProgram.run_decompositions
    monkeypatch.setattr(torch.export.ExportedProgram, "run_decompositions",
                        lambda self, *a, **kw: retraced.append(True) or decompose(self, *a, **kw))
    assert importlib.import_module("lowbit.ir.capture").FUNCTIONALIZE_IN_PLACE
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))
    g = capture(_InPlace(how).eval(), (x.clone(),))
    assert retraced == ([] if node_by_node else [True])
    assert not [op for op in g.op_counts() if op.startswith("aten.") and op.endswith("_.Tensor")], g.op_counts()
    want = _InPlace(how).eval()(x.clone())
    got = TorchCompiled(g)(x.clone())
    assert got.dtype == want.dtype and torch.equal(got, want)


def test_falcon_projections_raise_to_linear_so_they_quantize():
    """Falcon's ``FalconLinear`` computes ``x @ self.weight.T``: captured as a matmul on a permuted parameter, its
    projections were no ``linear`` nodes, so gptq on a Falcon said 'no linear to quantize (every linear is kept
    float)', smooth-quant found no site and quantize(w=...) left every block float. ``x @ W.T`` raises to
    ``linear(x, W)``, bit for bit, so the graph still equals transformers and every projection quantizes. (The float
    graph is a compile of the same model, whose capture the session's capture cache hands back: a capture of its
    own exported and functionalized the Falcon again, ~5 CPU-s.)"""
    import transformers as t

    import lowbit

    torch.manual_seed(0)
    cfg = t.FalconConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=2, vocab_size=512)
    model = t.AutoModelForCausalLM.from_config(cfg).eval()
    ids = torch.randint(0, 512, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(ids, use_cache=False).logits
    q = lowbit.compile_model(model, pipeline="quantize(w=int8)")
    quantized = sorted(n.module for n in q.graph.nodes if n.op == "linear" and n.module.startswith("transformer.h")
                       and n.args[1].producer is not None and n.args[1].producer.op == "dequantize")
    assert quantized == sorted(f"transformer.h.{i}.{m}" for i in range(2) for m in (
        "self_attention.query_key_value", "self_attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"))
    assert float((q(ids) - want).abs().max()) < 0.02 * float(want.max() - want.min())
    float_graph = lowbit.compile_model(model, pipeline="dce").graph
    torch.testing.assert_close(TorchCompiled(float_graph)(ids), want, rtol=0, atol=0)


def test_a_size_export_pinned_to_the_example_is_refused_not_computed_wrong():
    """``int(n / 2)`` under Dim.DYNAMIC: torch.export keeps the example's value (3 for n=7) behind a guard
    ``math.trunc(n / 2) == 3`` that only its own module checks; the IR kept the dynamic range, so at n=11 the
    compiled graph returned 3 columns where the model returns 5, without an error. Such a guard is refused."""
    class Half(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x[:, :int(x.shape[1] / 2)] * 2

    with pytest.raises(CaptureError, match=r"for some input sizes only: its guard \"math\.trunc\(L\['x'\]\.size\(\)"
                       r"\[1\] / 2\) == 3\" fails at sizes inside the dynamic range"):
        capture(Half().eval(), (torch.randn(2, 7, 4),), ({1: torch.export.Dim.DYNAMIC},))
    static = capture(Half().eval(), (torch.randn(2, 7, 4),))  # static shapes: the graph takes n=7 only, and says so
    torch.testing.assert_close(TorchCompiled(static)(torch.ones(2, 7, 4)), torch.full((2, 3, 4), 2.0))


def test_an_architecture_with_ops_lowbit_cannot_run_is_refused_by_name():
    """A model capturing to ATen ops outside lowbit's allowlist (here ``aten.flip``, ``aten.cumprod``): compile_model
    (and lowbit compile, exit 4) failed in the first pass with 'the input IR is invalid before any pass ran', which
    reads as a lowbit bug; capture refuses the model by name, listing each op and where it sits."""
    import lowbit

    class Odd(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = torch.nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.proj(x).flip(-1).cumprod(-1)

    with pytest.raises(CaptureError, match=r"Odd: capture produced ops lowbit cannot run: "
                       r"aten\.flip\.default x1 .*aten\.cumprod\.default x1 .*this architecture is not supported"):
        lowbit.compile_model(Odd().eval(), pipeline="dce", example_inputs=(torch.randn(2, 8),))


@pytest.mark.parametrize("family", ["bloom", "gptj", "cohere"])
def test_interleaved_rotary_and_alibi_families_capture_and_quantize(family):
    """Bloom (ALiBi scores through baddbmm, heads repeated), GPT-J and Cohere (interleaved rotary:
    repeat_interleave of cos/sin, stack of the rotated pairs) were refused at capture for those four ops. They
    run now: the float graph equals transformers exactly, the IR text round trip keeps it, and weight-only int8
    stays within 2% of the logits' range."""
    import lowbit
    from lowbit.ir.parser import parse_graph
    from lowbit.ir.printer import print_graph

    from conftest import tiny_outside_family

    model = tiny_outside_family(family)
    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(ids).logits
    c = lowbit.compile_model(model, pipeline="dce")
    torch.testing.assert_close(c(ids), want, rtol=0, atol=1e-5)
    again = parse_graph(print_graph(c.graph), {k: v.data for k, v in c.graph.params.items()})
    torch.testing.assert_close(TorchCompiled(again)(ids), want, rtol=0, atol=1e-5)
    q = lowbit.compile_model(model, pipeline="quantize(w=int8)")
    assert float((q(ids) - want).abs().max()) < 0.02 * float(want.max() - want.min())


def test_phi3_longrope_captures_both_factor_sets_and_leaves_the_callers_model_as_it_was():
    """Phi-3 longrope (the 128k models) writes ``where(length > original_max, long, short)`` into its rotary's
    inv_freq on every forward: capture refused it as state ('BUFFER_MUTATION of ...inv_freq', and before that as
    unknown ops aten.max/aten.pow.Scalar); and the trace cached a traced long_inv_freq on the caller's model, whose
    logits past original_max then changed. The write is scratch, so the graph follows transformers on both sides
    of original_max, and attributes a forward first caches while traced are removed."""
    import copy

    from conftest import tiny_phi3_longrope

    import lowbit

    model = tiny_phi3_longrope(max_positions=128, original=32)
    untouched = copy.deepcopy(model)
    compiled = lowbit.compile_model(model, pipeline="dce")
    for length in (8, 33, 80):
        ids = torch.randint(0, 256, (2, length))
        with torch.no_grad():
            want = untouched(ids, use_cache=False).logits
            torch.testing.assert_close(model(ids, use_cache=False).logits, want, rtol=0, atol=0)
        torch.testing.assert_close(compiled(ids), want, rtol=0, atol=1e-5)


def test_an_encoder_decoder_model_is_refused_by_name():
    """T5ForConditionalGeneration has an lm_head, so compile_model wrapped it as a causal LM and export failed deep
    in its decoder ('You must specify exactly one of input_ids or inputs_embeds', advice: 'capture a smaller
    submodule'); it is refused naming the class and what lowbit captures."""
    import transformers as t

    import lowbit

    model = t.T5ForConditionalGeneration(t.T5Config(d_model=32, d_ff=64, num_layers=1, num_heads=2, d_kv=16,
                                                    vocab_size=128)).eval()
    with pytest.raises(CaptureError, match="T5ForConditionalGeneration is an encoder-decoder model; lowbit captures "
                       "decoder-only causal LMs"):
        lowbit.compile_model(model, pipeline="dce")


def test_default_example_fits_a_model_with_fewer_positions_than_it():
    """A causal LM with 32 positions was captured from the default 64-token example, so its sequence symbol read
    "in [2, 32] hint 64": an example outside the range the graph declares (ONNX/TensorRT profiles take the hint)."""
    import lowbit

    from conftest import tiny_llama

    graph = lowbit.compile_model(tiny_llama(max_positions=32), pipeline="dce").graph
    seq = graph.inputs[0].tensor_type.shape[1]
    sym = graph.symbols[seq]
    assert sym.max == 32 and sym.min <= sym.hint <= sym.max, (sym.min, sym.hint, sym.max)


@pytest.mark.parametrize("dtype, affine, eps", [(torch.bfloat16, True, None), (torch.float32, False, 1e-5)])
def test_torch_rms_norm_is_raised_to_lowbit_rms_norm(dtype, affine, eps):
    """``torch.nn.RMSNorm`` is captured as one ``aten.rms_norm``, which lowbit could not run: a model using it was
    refused as 'capture produced ops lowbit cannot run', and a bare capture failed the verifier. It is raised to
    ``rms_norm`` (torch's definition: float32 statistics and gain for 16-bit inputs, eps=None that dtype's epsilon),
    bit-identical to torch, and fold-norms folds it like an HF norm."""
    from lowbit.ir.capture import refuse_unrunnable
    from lowbit.ir.verifier import verify
    from lowbit.passes.manager import PassManager

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.RMSNorm(16, eps=eps, elementwise_affine=affine),
                                torch.nn.Linear(16, 8)).to(dtype).eval()
    if affine:
        with torch.no_grad():
            model[0].weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 5, 16, dtype=dtype)
    graph = capture(model, (x,))
    refuse_unrunnable(graph, model)
    verify(graph)
    assert [n.op for n in graph.nodes] == ["rms_norm", "linear"]
    assert torch.equal(TorchCompiled(graph)(x), model(x))
    if affine:
        PassManager("fold-norms").run(graph)
        assert graph.nodes[0].arg(1) is None  # the gain went into the linear


def test_a_model_whose_weights_are_on_the_meta_device_is_refused_naming_them():
    """A model built under torch.device('meta') (weights never loaded) failed after export with "device 'meta': a
    device operand of lowbit IR is 'cpu' or 'cuda[:N]'" on its arange nodes; it is refused before the export,
    naming its empty parameters and how to load them."""
    from conftest import tiny_llama_config
    from transformers import LlamaForCausalLM

    import lowbit

    with torch.device("meta"):
        empty = LlamaForCausalLM(tiny_llama_config(vocab=128)).eval()
    with pytest.raises(CaptureError, match=r"has \d+ parameter\(s\) or buffer\(s\) on the meta device, which hold "
                                           r"no data \(\S*embed_tokens\.weight, .*weights were never loaded"):
        lowbit.compile_model(empty, pipeline="quantize(w=int4,group=16)")


def test_falcon_without_multi_query_captures_quantizes_and_exports(tmp_path):
    """A Falcon without multi_query (its fused query_key_value viewed [.., heads, 3, head_dim] and unbound into q,
    k and v) was refused at capture ('aten.unbind.int x2'). unbind runs now: the float graph equals transformers,
    its int8 compressed-tensors checkpoint loads in transformers to the compiled logits, and the ONNX export
    (Split + Squeeze) matches."""
    import transformers as t

    import lowbit
    from lowbit.checkpoint.hf_check import transformers_logits

    torch.manual_seed(0)
    model = t.AutoModelForCausalLM.from_config(t.FalconConfig(
        hidden_size=64, num_attention_heads=4, multi_query=False, num_hidden_layers=2, vocab_size=128)).eval()
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(ids).logits
    c = lowbit.compile_model(model, pipeline="dce")
    assert any(n.op == "aten.unbind.int" for n in c.graph.nodes)
    torch.testing.assert_close(c(ids), want, rtol=0, atol=1e-5)
    lowbit.export.export(c, tmp_path / "m.onnx")
    torch.testing.assert_close(lowbit.export.load(tmp_path / "m.onnx")(ids), want, rtol=0, atol=1e-4)
    q = lowbit.compile_model(model, pipeline="quantize(w=int8)")
    out = lowbit.save(q, tmp_path / "ct", format="compressed-tensors")
    torch.testing.assert_close(transformers_logits(out, ids), q(ids), rtol=0, atol=1e-5)


def test_the_sessions_capture_cache_exports_a_model_once_and_gives_each_caller_its_own_graph(reuse_captures,
                                                                                           monkeypatch):
    """conftest's ``reuse_captures``: compiling the same small model again exports nothing and gives a graph with
    its own parameter tensors, so a test that changes its graph (or its model, after the capture) leaves the next
    capture of that content as a fresh capture gives it; a changed weight or module attribute is exported again,
    and so is a model captured under a monkeypatch (a capture may read what it patched), but not once the test has
    set the attribute back to what it was, nor under a patch of a kernel module's."""
    import math
    import warnings

    import lowbit
    from conftest import tiny_llama, tiny_phi3_longrope

    def model() -> torch.nn.Module:
        torch.manual_seed(1234)  # a content no other test compiles: the counts below are this test's
        return tiny_llama(hidden=24, inter=40, heads=2, kv_heads=1, layers=1, vocab=67)

    cache, exports = reuse_captures, reuse_captures.exports
    m = model()
    ids = torch.randint(0, 67, (2, 5))
    want = m(ids).logits
    a = lowbit.compile_model(m, pipeline="dce")
    b = lowbit.compile_model(model(), pipeline="dce")
    assert cache.exports == exports + 1
    torch.testing.assert_close(b(ids), want)
    assert all(a.graph.params[k].data is not v.data for k, v in b.graph.params.items())
    with torch.no_grad():  # a test that changes what it got, and the model it captured
        for v in b.graph.params.values():
            v.data.zero_()
        m.model.layers[0].mlp.down_proj.weight.mul_(3)
    c = lowbit.compile_model(model(), pipeline="dce")
    assert cache.exports == exports + 1
    torch.testing.assert_close(c(ids), want)
    changed = lowbit.compile_model(m, pipeline="dce")  # m's weight changed in place: exported again
    assert cache.exports == exports + 2
    torch.testing.assert_close(changed(ids), m(ids).logits)
    assert not torch.allclose(changed(ids), want)
    m.model.layers[0].input_layernorm.variance_epsilon = 0.5  # an attribute the forward reads, not a weight
    eps = lowbit.compile_model(m, pipeline="dce")
    assert cache.exports == exports + 3
    torch.testing.assert_close(eps(ids), m(ids).logits)
    # the warnings a capture gives come again with the graph a later capture reuses
    heard = []
    for _ in range(2):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            lowbit.compile_model(tiny_phi3_longrope(max_positions=96, original=24), pipeline="dce")
        heard.append(sorted({str(w.message) for w in caught if "assigned during export" in str(w.message)}))
    assert cache.exports == exports + 4 and heard[0] and heard[0] == heard[1]
    tau = math.tau
    monkeypatch.setattr(math, "tau", 6.0)
    lowbit.compile_model(model(), pipeline="dce")
    assert cache.exports == exports + 5
    monkeypatch.setattr(math, "tau", tau)  # set back: the unpatched capture again
    torch.testing.assert_close(lowbit.compile_model(model(), pipeline="dce")(ids), want)
    assert cache.exports == exports + 5
    from lowbit.kernels import weight_only

    monkeypatch.setattr(weight_only, "FOLD_T", {})  # a kernel module's: no capture reads it (_UNREAD_BY_CAPTURE)
    lowbit.compile_model(model(), pipeline="dce")
    assert cache.exports == exports + 5


@pytest.fixture(autouse=True)
def _one_export_per_model(reuse_captures: object) -> None:
    """Every test here captures through the session's capture cache (conftest's ``reuse_captures``): the same tiny
    model compiled again is not exported again (this file's own ``capture`` calls, which test it, are its own)."""


def test_a_violated_dynamic_dim_names_the_guard_the_model_makes():
    """A dim marked dynamic that the model's code constrains failed with torch's first line only, 'Constraints
    violated (batch)! For more information, run with TORCH_LOGS="+dynamic"', though torch's message listed the guard
    (how Gemma 2's step on torch 2.11 reported its stride guard on the cache's slots). The error now carries the
    guards and the dims torch suggests."""
    class Halves(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.view(2, -1, x.shape[1]).sum(0)  # the batch must be even

    with pytest.raises(CaptureError) as err:
        capture(Halves().eval(), (torch.randn(4, 3),), {"x": {0: torch.export.Dim("batch", min=1, max=9)}})
    msg = str(err.value)
    assert "Constraints violated (batch)" in msg and "\n  - Not all values of batch = L['x'].size()[0] in the " \
        "specified range batch <= 9 satisfy the generated guard" in msg, msg
    assert "torch suggests: _batch = Dim('_batch', min=1, max=4); batch = 2*_batch" in msg, msg


def test_a_smollm2_slice_copies_its_own_blocks_only_and_leaves_the_model_as_it_was(smollm2, monkeypatch):
    """conftest's ``smollm2_slice`` deep-copied all 30 blocks to keep two (~400 MB copied and dropped, seconds
    on the loaded CI machine, for each of the dozens of slices the suite makes); the blocks it cuts off are no
    longer copied. The slice still owns every tensor it has, in its own dtype, and the model is unchanged."""
    from conftest import smollm2_slice

    model = smollm2[0]
    before = {name: (p.dtype, p.data_ptr()) for name, p in model.named_parameters()}
    copied = []
    deepcopy = torch.nn.Parameter.__deepcopy__

    def counting(self, memo):  # type: ignore[no-untyped-def]
        copied.append(self.numel())
        return deepcopy(self, memo)

    monkeypatch.setattr(torch.nn.Parameter, "__deepcopy__", counting)
    sliced = smollm2_slice(model, 2, torch.float64).model
    kept = dict(sliced.named_parameters())
    assert sum(copied) == sum(p.numel() for p in kept.values()), (sum(copied), len(copied))
    assert len(sliced.model.layers) == 2 and sliced.config.num_hidden_layers == 2
    assert all(p.dtype == torch.float64 for p in kept.values())
    assert not {p.data_ptr() for p in kept.values()} & {ptr for _, ptr in before.values()}
    assert {name: (p.dtype, p.data_ptr()) for name, p in model.named_parameters()} == before
    assert len(model.model.layers) == 30 and model.config.num_hidden_layers == 30


def test_the_capture_cache_exports_a_smollm2_slice_once(smollm2, reuse_captures):
    """conftest's capture cache took models up to 5M elements only, so every compile of the same SmolLM2 slice (the
    CLI's ``smollm2:2``, one fixture's slice under another recipe) exported it again: 3-5 s each under CI's load.
    Slices up to three blocks (their tied head hashed once) are exported once; the second caller gets its own
    tensors, with the first one's results."""
    import lowbit.ir
    from conftest import smollm2_slice

    cache, exports, reused = reuse_captures, reuse_captures.exports, reuse_captures.reused
    ids = torch.ones(1, 13, dtype=torch.long)  # a length no other capture uses: the counts below are this test's
    first = lowbit.ir.capture(smollm2_slice(smollm2[0], 2), (ids,))
    again = lowbit.ir.capture(smollm2_slice(smollm2[0], 2), (ids,))  # another copy of the same content
    assert (cache.exports, cache.reused) == (exports + 1, reused + 1)
    assert not {v.data.data_ptr() for v in first.params.values()} & {v.data.data_ptr() for v in again.params.values()}
    assert torch.equal(TorchCompiled(first)(ids), TorchCompiled(again)(ids))


def test_a_dim_the_code_specializes_is_blamed_on_the_traced_graph_and_named():
    """A dim marked dynamic that the model's code fixes (a reshape to a constant) fails in export's constraint check
    after the forward returned: the error said it failed "inside module '(top level)'" and left out torch's line
    naming the dim and the constant. It says the whole forward was traced and quotes that line and the fix."""

    class Fixed(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x).reshape(2, 8)

    with pytest.raises(CaptureError) as info:
        capture(Fixed().eval(), (torch.randn(2, 8),), ({0: torch.export.Dim("batch")},))
    message = str(info.value)
    assert "after the whole forward was traced" in message and "top level" not in message
    assert "batch as dynamic but your code specialized it to be a constant (2)" in message
    assert "torch suggests: batch = 2" in message


def test_capture_traces_no_packed_sequence_search_and_the_logits_are_the_same(smollm2_slice_f64, wikitext_ids,
                                                                               monkeypatch):
    """With no attention mask and no cache, transformers looks for packed sequences in the position ids; eagerly it
    finds none and skips them, but under export it cannot look, so every capture traced a diff, a cumsum and an
    index-based remap of the causal mask (~0.6 s of a 2-block SmolLM2 capture, 19 of its 113 nodes). CausalLMLogits
    passes no positions, so none are packed: the graph has none of those ops, and its float64 logits on real text
    are bit for bit the eager model's and the old graph's (the mask built with the search)."""
    import lowbit.models

    wrapper, graph = smollm2_slice_f64
    ops = graph.op_counts()
    assert not {"aten.diff.default", "aten.cumsum.default", "aten.index.Tensor"} & set(ops), ops
    ids = wikitext_ids[:, 3000:3100]
    with torch.no_grad():
        eager = wrapper(ids)
    assert torch.equal(TorchCompiled(graph)(ids), eager)
    monkeypatch.setattr(lowbit.models, "_no_packed_sequences", contextlib.nullcontext)
    searched = capture(wrapper, (torch.ones(1, 16, dtype=torch.long),),
                       {"input_ids": {1: torch.export.Dim.DYNAMIC(min=2, max=8192)}})
    assert "aten.cumsum.default" in searched.op_counts() and len(searched.nodes) > len(graph.nodes)
    assert torch.equal(TorchCompiled(searched)(ids), eager)


def test_a_sliding_window_mask_is_kept_without_the_packed_sequence_search():
    """The packed-sequence search is skipped for sliding-window masks too (transformers runs it for both): a
    Mistral whose window (4) is shorter than the input still attends within it, as its eager forward in float64."""
    from transformers import MistralConfig, MistralForCausalLM

    from lowbit.models import CausalLMLogits

    torch.manual_seed(0)
    config = MistralConfig(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1,
                           num_hidden_layers=2, vocab_size=97, max_position_embeddings=64, sliding_window=4)
    model = MistralForCausalLM(config).to(torch.float64).eval()
    wrapper = CausalLMLogits(model).eval()
    dyn = torch.export.Dim.DYNAMIC
    graph = capture(wrapper, (torch.ones(2, 8, dtype=torch.long),), {"input_ids": {0: dyn(min=1, max=8),
                                                                                  1: dyn(min=2, max=64)}})
    assert "aten.cumsum.default" not in graph.op_counts()
    ids = torch.randint(0, 97, (2, 13))
    with torch.no_grad():
        eager = wrapper(ids)
        model.config.sliding_window = None
        full = wrapper(ids)
    assert torch.equal(TorchCompiled(graph)(ids), eager)
    assert not torch.allclose(eager[:, 5:], full[:, 5:])  # the window cut something: it is not a causal mask


def test_overlapping_forwards_leave_transformers_packed_sequence_search_in_place():
    """Two CausalLMLogits forwards that overlap (two threads: one enters, the other enters, the first leaves, then
    the second) left transformers' packed-sequence search switched off for the process, since the second saved the
    stand-in as the original; every later HF model trained on packed rows would then have attended across them.
    Only the forward that swapped it restores it."""
    import transformers.masking_utils as masking

    from lowbit.models import _no_packed_sequences

    original = masking.find_packed_sequence_indices
    first, second = _no_packed_sequences(), _no_packed_sequences()
    first.__enter__()
    second.__enter__()
    assert masking.find_packed_sequence_indices is not original
    first.__exit__(None, None, None)
    second.__exit__(None, None, None)
    assert masking.find_packed_sequence_indices is original


def test_a_lowbit_forward_leaves_other_threads_packed_sequence_search_on():
    """While a CausalLMLogits forward runs in one thread (capture, calibration), transformers' packed-sequence
    search was switched off for the whole process: another thread's model fed packed rows (positions restarting
    at 0 inside a row) got one causal mask over the row and attended across its sequences. The stand-in now skips
    the search only in the forward's own thread; the module's function is back when the last forward leaves."""
    import threading

    import transformers.masking_utils as masking

    from lowbit.models import _no_packed_sequences

    original = masking.find_packed_sequence_indices
    packed = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2]])
    expected = original(packed)
    assert expected is not None  # three sequences in one row: transformers finds them
    inside, leave, seen = threading.Event(), threading.Event(), {}

    def lowbit_forward() -> None:
        with _no_packed_sequences():
            seen["own thread"] = masking.find_packed_sequence_indices(packed)
            inside.set()
            leave.wait(10)

    worker = threading.Thread(target=lowbit_forward)
    worker.start()
    try:
        assert inside.wait(10)
        other = masking.find_packed_sequence_indices(packed)
    finally:
        leave.set()
        worker.join(10)
    assert seen["own thread"] is None
    assert other is not None and torch.equal(other, expected)
    assert masking.find_packed_sequence_indices is original


def test_a_reused_capture_survives_its_entry_evicted_by_another_load(monkeypatch):
    """``lowbit.load`` keeps one capture per architecture (``lowbit.checkpoint.reuse``); a load that found its
    entry and another load (another thread) that evicted it before the first marked it recently used crashed
    the first with a KeyError. The first load now returns its rebound graph (the cache is guarded by a lock)."""
    from lowbit.checkpoint import reuse

    class Config:
        def to_dict(self) -> dict:
            return {"width": 4}

    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(4, 3)
            self.config = Config()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x)

    first, second = Tiny().eval(), Tiny().eval()
    example = (torch.randn(2, 4),)
    reuse.clear()
    reuse.capture_once(capture, first, first, example, None)
    rebind = reuse._bound

    def rebound_then_evicted(*args):  # type: ignore[no-untyped-def]
        graph = rebind(*args)
        reuse.clear()  # what another thread's load of other architectures does meanwhile
        return graph

    monkeypatch.setattr(reuse, "_bound", rebound_then_evicted)
    graph = reuse.capture_once(capture, second, second, example, None)
    assert graph.meta["capture_reused"] is True
    x = torch.randn(2, 4)
    with torch.no_grad():
        assert torch.equal(TorchCompiled(graph)(x), second(x)) and not torch.equal(second(x), first(x))
