"""Core passes (dce, constant-fold, fold-norms), the pipeline parser and the pass manager."""

from __future__ import annotations

import io
import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lowbit.backends.torch_backend import TorchCompiled
from lowbit.instruments import NumericCheck
from lowbit.ir.graph import Graph
from lowbit.ir.parser import parse_graph
from lowbit.ir.printer import print_graph
from lowbit.passes.base import Pass, PassError, PassResult, register_pass
from lowbit.passes.manager import PassManager, PipelineError, PrintIR, parse_pipeline

# ---- golden IR: input text, pass, expected text --------------------------------------------------

FOLD_IN = """\
graph g(%x: f64[1,3,4]) {
  param @ln.weight: f64[4]
  param @ln.bias: f64[4]
  param @q.weight: f64[2,4]
  param @k.weight: f64[2,4]
  param @k.bias: f64[2]
  %n: f64[1,3,4] = layer_norm(%x, @ln.weight, @ln.bias, normalized_shape=[4], eps=1e-05)  # ln
  %q: f64[1,3,2] = linear(%n, @q.weight)  # q
  %k: f64[1,3,2] = linear(%n, @k.weight, @k.bias)  # k
  %o: f64[1,3,2] = add(%q, %k)
  return %o
}
"""


def _weights(text: str) -> dict[str, torch.Tensor]:
    g = parse_graph(text)
    gen = torch.Generator().manual_seed(0)
    return {k: torch.randn(v.type.shape, generator=gen, dtype=v.type.dtype) for k, v in g.params.items()}


def test_fold_norms_golden_and_exact():
    g = parse_graph(FOLD_IN, _weights(FOLD_IN))
    x = torch.randn(1, 3, 4, dtype=torch.float64)
    before = TorchCompiled(g)(x)
    result = PassManager("fold-norms").run(g)
    assert result.records[0].changed
    # the IR it leaves: tests/golden/fold_norms.lbir (every line pinned, CHECK-NEXT)
    assert torch.allclose(TorchCompiled(g)(x), before, rtol=0, atol=1e-13)


DCE_IN = """\
graph g(%x: f32[4]) {
  param @unused: f32[4]
  %a: f32[4] = aten.relu.default(%x)
  %b: f32[4] = aten.neg.default(%a)
  %c: f32[4] = aten.exp.default(%x)
  return %c
}
"""


def test_dce_golden():
    g = parse_graph(DCE_IN, {"unused": torch.zeros(4)})
    rec = PassManager("dce").run(g).records[0]
    assert rec.stats == {"nodes_removed": 2, "params_removed": 1}
    # the IR it leaves: tests/golden/dce.lbir (every line pinned, CHECK-NEXT)


CF_IN = """\
graph g(%x: f32[2,3]) {
  param @w: f32[3,2]
  %wt: f32[2,3] = aten.t.default(@w)  # proj
  %y: f32[2,3] = add(%x, %wt)
  return %y
}
"""


def test_constant_fold_golden():
    w = torch.randn(3, 2)
    g = parse_graph(CF_IN, {"w": w})
    PassManager("constant-fold").run(g)
    assert print_graph(g) == ("graph g(%x: f32[2,3]) {\n  param @const.proj.wt: f32[2,3]\n"
                              "  %y: f32[2,3] = add(%x, @const.proj.wt)\n  return %y\n}\n")
    assert torch.equal(g.params["const.proj.wt"].data, w.t())


# ---- real models ---------------------------------------------------------------------------------

def test_fold_norms_scales_a_weight_in_pieces_with_the_same_bits(monkeypatch):
    """fold-norms multiplied each reader's weight by the gain whole in float64: 4x a bf16 weight for its input and as
    much again for the product (SmolLM2's 57 MiB head: 450 MiB at once, the peak of every rotation pipeline once
    rotate worked in pieces). It now scales FLOAT64_PIECE_BYTES of rows at a time, each element the same product.
    Here a bf16 Llama with a 4096-row head, in 1 MiB pieces."""
    from conftest import pieces_match_whole, tiny_llama

    from lowbit.ir.capture import capture
    from lowbit.models import CausalLMLogits

    torch.manual_seed(0)
    model = CausalLMLogits(tiny_llama(hidden=512, inter=512, heads=8, kv_heads=2, vocab=4096).to(torch.bfloat16))
    graph = capture(model, (torch.ones(1, 8, dtype=torch.long),))
    with torch.no_grad():
        for v in graph.params.values():  # gains away from 1, so the fold changes every weight it touches
            if v.data.dim() == 1:
                v.data = torch.rand_like(v.data) + 0.5
    head = graph.params["lm_head.weight"].data
    largest = pieces_match_whole(monkeypatch, graph, "fold-norms")
    assert not torch.equal(graph.params[next(g for g in graph.params if g.startswith("lm_head"))].data, head)
    assert largest < head.numel() * 8 / 4, largest


def test_fold_norms_moves_a_layernorm_bias_in_pieces_with_the_same_bits(monkeypatch):
    """fold-norms moved a LayerNorm's bias into each reader's bias as ``W·β`` with the whole weight in float64 at once
    (4x a bf16 weight), after the gain's scaling had learned to work in pieces. It now takes FLOAT64_PIECE_BYTES of
    rows at a time (``rewrite.matvec_float64``), to the same bits. Here a bf16 GPT-NeoX (LayerNorms with biases, a
    fused 1536-row query_key_value), in 1 MiB pieces."""
    import transformers
    from conftest import pieces_match_whole

    from lowbit.ir.capture import capture
    from lowbit.models import CausalLMLogits

    torch.manual_seed(0)
    config = transformers.GPTNeoXConfig(hidden_size=512, intermediate_size=512, num_attention_heads=8,
                                        num_hidden_layers=1, vocab_size=256, max_position_embeddings=64)
    model = CausalLMLogits(transformers.GPTNeoXForCausalLM(config).eval().to(torch.bfloat16))
    graph = capture(model, (torch.ones(1, 8, dtype=torch.long),))
    with torch.no_grad():
        for name, v in graph.params.items():  # biases away from 0, so the fold moves each into its readers
            if name.endswith("layernorm.bias"):
                v.data = torch.rand_like(v.data) - 0.5
    qkv = graph.params["gpt_neox.layers.0.attention.query_key_value.bias"].data
    largest = pieces_match_whole(monkeypatch, graph, "fold-norms")
    assert not torch.equal(graph.params["gpt_neox.layers.0.attention.query_key_value.bias"].data, qkv)
    weight = graph.params["gpt_neox.layers.0.attention.query_key_value.weight"].data
    assert largest < weight.numel() * 8 / 4, largest


def test_fold_norms_exact_in_float64_on_smollm2(smollm2_slice_f64, wikitext_ids):
    wrapper, graph = smollm2_slice_f64
    g = graph.clone()
    ids = wikitext_ids[:, 2000:2256]
    with torch.no_grad():
        ref = wrapper(ids)
    emb_before = g.params["lm_head.weight"].data
    rec = PassManager("fold-norms,dce").run(g).records[0]
    assert rec.stats["folded"] == 2 * 2 + 1 and rec.stats["not_folded"] == []
    assert all(n.args[1] is None for n in g.find("rms_norm"))
    # the tied embedding keeps its weight; lm_head got its own folded copy
    emb = next(g.find("embedding"))
    assert emb.args[0].data is emb_before
    lm_head = next(g.find("linear", "^lm_head$"))
    assert lm_head.args[1].name != "lm_head.weight"
    out = TorchCompiled(g)(ids)
    assert (out - ref).abs().max().item() <= 1e-12 * ref.abs().max().item()


def test_fold_norms_on_minilm_lists_what_it_cannot_fold(minilm_graph):
    g = minilm_graph.clone()
    rec = PassManager("fold-norms").run(g).records[0]
    n_norms = len(list(g.find("layer_norm")))
    # every LayerNorm feeds the residual stream too: none folds, and each one is reported with why
    assert rec.stats["folded"] + len(rec.stats["not_folded"]) == n_norms
    assert all("read by" in reason for reason in rec.stats["not_folded"])


def test_pipeline_with_instruments_on_smollm2(smollm2_slice_f64, wikitext_ids):
    wrapper, graph = smollm2_slice_f64
    g = graph.clone()
    ids = wikitext_ids[:, :64]
    with torch.no_grad():
        ref = wrapper(ids)
    buf = io.StringIO()
    report = PassManager("constant-fold,fold-norms,dce",
                         instruments=[PrintIR(after_change=True, stream=buf), NumericCheck([ids], ref)]).run(g)
    text = buf.getvalue()
    assert "// ----- IR after fold-norms -----" in text and "IR after dce" not in text
    for rec in report.records:
        assert rec.numeric["max_abs"] <= 1e-10, rec


# ---- pipeline parsing and manager behaviour ------------------------------------------------------

@pytest.mark.parametrize("spec,message", [
    ("fold-norm", "unknown pass 'fold-norm'; did you mean 'fold-norms'"),
    ("fold-norms(modulez=x)", "has no option 'modulez'; did you mean 'modules'"),
    ("dce,,dce", "empty pass name"),
    ("fold-norms(", "unclosed parenthesis"),
    ("dce)", "unbalanced ')'"),
    ("constant-fold(max_elements=abc)", "option max_elements: Input should be a valid integer"),
    ("constant-fold(max_elements)", "needs a value"),
    ("quantize(w=int4,keep=lm_head)", "write a list in brackets: keep=[lm_head] (keep=[a;b] for several)"),
    ("", "empty pipeline"),
    # a missing comma between passes, or a stray one at an end, was 'expected NAME' / 'two commas in a row?'
    ("fold-norms dce", "passes are separated by commas: 'fold-norms,dce'"),
    ("fold-norms;quantize(w=int4)", "passes are separated by commas: 'fold-norms,quantize(w=int4)'"),
    ("dce,", "(a trailing comma?)"),
    ("fold-norms(modules=a)(b)", "unbalanced ')' at column 21 in 'fold-norms(modules=a)(b)'"),  # was column 10
])
def test_bad_pipeline_specs(spec, message):
    with pytest.raises(PassError, match=re.escape(message)):
        parse_pipeline(spec)


@pytest.mark.parametrize("spec,message", [
    ("quantize(w=int4", "unclosed parenthesis '(' opened at column 9 in 'quantize(w=int4': add ')'"),
    ("fold-norms,quantize(w=int4,group=64", "'(' opened at column 20"),
    ("quantize(w=int4)(", "'(' opened at column 17"),
    ("gptq(w=int4))", "unbalanced ')' at column 13 in 'gptq(w=int4))': no '(' before it"),
    ("quantize(w=int4,keep=[a;b)", "mismatched ')' at column 26 in 'quantize(w=int4,keep=[a;b)': it closes the '[' "
                                   "opened at column 22, which needs ']'"),
    ("quantize(w=int4,keep=[lm_head]]", "mismatched ']' at column 31"),
    ('quantize(w=int4,modules="^(a|b)', "unclosed quote '\"' opened at column 25"),
])
def test_a_bracket_error_names_the_bracket_and_its_column(spec, message):
    """Mismatched brackets said 'unclosed parenthesis' (which one, where?) and a ')' closing a '[' counted as
    balanced; the error now names the bracket and the column it was opened at."""
    with pytest.raises(PassError, match=re.escape(message)):
        parse_pipeline(spec)


@pytest.mark.parametrize("spec,message", [
    (r"quantize(w=int4,modules=layers\.1",
     r"unclosed parenthesis '(' opened at column 9 in 'quantize(w=int4,modules=layers\.1'"),
    (r"quantize(w=int8),prune-mlp(ratio=0.5,modules=layer\.[34]\b)",
     r"move prune-mlp before quantize in 'quantize(w=int8),prune-mlp(ratio=0.5,modules=layer\.[34]\b)'"),
    (r"fold-norms,rotate,fold-norms(modules=layers\.1)",
     r"drop the later one in 'fold-norms,rotate,fold-norms(modules=layers\.1)'"),
    (r"dce,,quantize(w=int4,modules=a\.b)", r"empty pass name in pipeline 'dce,,quantize(w=int4,modules=a\.b)'"),
])
def test_a_pipeline_quoted_in_an_error_shows_its_regexes_as_written(spec, message):
    """Errors quoted the pipeline with repr: each backslash of a modules= regex was shown doubled, so the pipeline
    pasted back from the message was another regex, and a column count pointed past where it was shown."""
    with pytest.raises(PassError, match=re.escape(message)):
        parse_pipeline(spec)


def test_a_directory_given_for_a_file_option_is_refused_when_parsed(tmp_path):
    """``quantize(config=DIR)`` passed the up-front file check and failed after the model load (exit 4)."""
    from lowbit.passes.base import PassFileError

    with pytest.raises(PassFileError, match=r"pass quantize: option config=.*: is a directory; give a file"):
        parse_pipeline(f"quantize(config={tmp_path})")


@pytest.mark.parametrize("name, own", [("gptq", "damp=0.1"), ("awq", "n_grid=5"), ("autoround", "iters=9"),
                                       ("smooth-quant", "alpha=0.3"),
                                       ("quantize", "a=int8,a_gran=per_tensor,a_static=true")])
def test_calibrating_passes_share_one_calibration_option_set(name, own):
    """Every pass that reads calibration text takes the same options with the same checks, and prints what it
    does before the data it read."""
    from lowbit.passes.base import CalibrationOptions, get_pass

    assert issubclass(get_pass(name).Options, CalibrationOptions)
    for bad in ("calib_n=0", "calib_len=1", "batch_size=0"):
        with pytest.raises(PassError, match=f"{name}.*option {bad.split('=')[0]}: Input should be greater"):
            parse_pipeline(f"{name}({bad})")
    (p,) = parse_pipeline(f"{name}(calib_n=7,{own})")
    assert p.spec() == f"{name}({own},calib_n=7)"


def test_pipeline_spec_round_trips():
    passes = parse_pipeline("constant-fold(max_elements=10),fold-norms(modules=\"layers\\.1\"),dce")
    assert [p.spec() for p in passes] == ["constant-fold(max_elements=10)", "fold-norms(modules=layers\\.1)", "dce"]


@pytest.mark.parametrize("text", ['fold-norms(modules="layers\\.\\d{1,2}\\.")', "fold-norms(modules='[(]')",
                                  'fold-norms(modules="[01]")', "fold-norms(modules=\"it's\")",
                                  'fold-norms(modules=" x")', "quantize(w=int4,keep=['a;b';c.*])"])
def test_pipeline_spec_quotes_what_would_not_parse_back(text):
    """spec() wrote string options bare: a regex with a comma ('\\d{1,2}'), an unbalanced bracket, a quote or edge
    spaces printed as pipeline text that failed to parse or parsed as something else, and that text is what
    reproducers, bisect's reproduce command and reports replay. A list element holding ';' split at it."""
    (p,) = parse_pipeline(text)
    (q,) = parse_pipeline(p.spec())
    assert q.options == p.options, (p.spec(), q.options)
    if "keep" in text:
        assert p.options.keep == ["a;b", "c.*"]


@register_pass
class _CorruptForTest(Pass):
    """Test-only pass that breaks the IR (drops the producer of the first linear's input)."""

    name = "test-corrupt"

    def run(self, graph: Graph) -> PassResult:
        lin = next(graph.find("linear"))
        graph.remove(lin.args[0].producer)
        return PassResult(True)


def test_verify_each_names_the_pass_that_broke_the_ir(smollm2_slice_f64):
    g = smollm2_slice_f64[1].clone()
    with pytest.raises(PipelineError, match=r"pass test-corrupt \(#1\) left invalid IR") as info:
        PassManager("dce,test-corrupt,dce", keep_before_failure=True).run(g)
    assert info.value.record.name == "test-corrupt"
    assert info.value.graph_before is not None and len(info.value.graph_before.nodes) == len(g.nodes) + 1


@register_pass
class _NaNScaleForTest(Pass):
    """Test-only pass standing in for a quantizer whose scales diverged: one weight scale becomes NaN."""

    name = "test-nan-scale"

    def run(self, graph: Graph) -> PassResult:
        dq = next(n for n in graph.nodes if n.op.startswith("dequantize") and n.args[1].is_param)
        dq.args[1].data.view(-1)[3] = float("nan")
        return PassResult(True)


def test_verify_each_names_the_pass_that_left_a_nan_scale(smollm2_slice_f64):
    """A NaN quantization scale a pass computed was caught only when the saved model was loaded again; the
    verifier after each pass names the pass, the parameter and the node."""
    g = smollm2_slice_f64[1].clone()
    with pytest.raises(PipelineError, match=r"pass test-nan-scale \(#1\) left invalid IR:\n(?s:.*)parameter @\S+ "
                                            r"\(scale of .*\) holds 1 NaN value"):
        PassManager("quantize(w=int4,group=32),test-nan-scale,dce").run(g)


def test_limit_skips_later_passes(smollm2_slice_f64):
    g = smollm2_slice_f64[1].clone()
    report = PassManager("fold-norms,dce", limit=0).run(g)
    assert [r.skipped for r in report.records] == [True, True]
    assert all(n.args[1] is not None for n in g.find("rms_norm"))


def test_a_calibration_text_too_short_is_refused_before_the_capture(tmp_path, monkeypatch):
    """A text with fewer tokens than calib_n x calib_len was found by the pass, after the capture and every pass
    before it; compile_model now tokenizes it (cached, so the pass does not again) as soon as the tokenizer is known."""
    import lowbit.api
    from conftest import tiny_llama

    text = tmp_path / "short.txt"
    text.write_text("a short text, only a few words in it.\n")
    monkeypatch.setattr(lowbit.api, "capture", lambda *a, **k: pytest.fail("captured before the check"))
    with pytest.raises(PassError, match=r"pass gptq: option calib=.*short.txt.*has \d+ tokens: 0 non-overlapping "
                                        r"windows "
                                        r"of 32, but n=2 were asked \(64 tokens\)"):
        lowbit.api.compile_model(tiny_llama(), tokenizer="smollm2",
                                 pipeline=f"fold-norms,gptq(w=int4,calib={text},calib_n=2,calib_len=32)")
    long_enough = f"gptq(w=int4,calib={text},calib_n=1,calib_len=4)"
    with pytest.raises(BaseException, match="captured before the check"):  # enough text: on to the capture
        lowbit.api.compile_model(tiny_llama(), tokenizer="smollm2", pipeline=long_enough)


SPEC_VALUES = ["none", "0", "1", "3", "16", "64", "-1", "0.5", "1e-05", "1.0", "inf", "true", "false", "int4", "int8",
               "uint4", "fp8e4m3", "[]", "[a;b]", "[0.5;0.9]", "'a,b'", "\"x'y\"", "2:4", "per_token", "float16",
               "cpu", "[scales]", "[norms;biases]", "hadamard", "norm", "[norm;gated]", "'[x]'", "''", "' x'",
               "layers\\.\\d{1,2}", "magnitude", "wanda", "block"]


def _registered_option_specs():
    """(pass name, option) of every registered pass's every option but the file-reading ones."""
    from lowbit.passes.base import all_passes

    return [(name, key) for name, cls in sorted(all_passes().items()) if not name.startswith("test-")
            for key in cls.Options.model_fields if key not in ("calib", "tokenizer", "config")]


@settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(st.sampled_from(_registered_option_specs()), st.sampled_from(SPEC_VALUES))
def test_every_registered_pass_and_option_spec_is_a_fixed_point(name_key, value):
    """Whatever a pipeline text sets an option of any registered pass to, if it parses, ``spec()`` prints text that
    parses to the same options and prints the same again: reproducers, reports and bisect replay that text."""
    from lowbit.errors import LowbitError

    name, key = name_key
    own = "train=[scales]," if name == "tune-qparams" and key != "train" else ""  # its one required option
    try:
        (p,) = parse_pipeline(f"{name}({own}{key}={value})")
    except LowbitError:
        return
    (q,) = parse_pipeline(p.spec())
    assert q.spec() == p.spec()
    assert {k: v for k, v in q.options.model_dump().items() if k != "progress"} == \
        {k: v for k, v in p.options.model_dump().items() if k != "progress"}, p.spec()


def test_fold_norms_scales_the_smollm2_head_in_cache_sized_pieces_to_the_same_bits(smollm2):
    """fold-norms scaled SmolLM2's 49152×576 head by the final norm's gain in 32 MiB float64 pieces: widen, scale and
    narrow each read and wrote memory that no cache held (0.51 s on one thread; 0.27-0.33 s in 1 MiB pieces). Each
    piece of the real head's scaling now stays within 1 MiB (``ELEMENTWISE_PIECE_BYTES``, L2-sized), and the weight
    is the same bits as the product taken whole in float64."""
    from conftest import LargestFloat64

    from lowbit.ir.rewrite import scaled_columns

    head = smollm2[0].lm_head.weight.detach()
    gain = smollm2[0].model.norm.weight.detach().to(torch.float64)
    largest = LargestFloat64()
    with largest:
        got = scaled_columns(head, gain)
    assert largest.largest <= 2**20 < head.numel() * 8, largest.largest
    assert torch.equal(got, (head.to(torch.float64) * gain[None, :]).to(head.dtype))
