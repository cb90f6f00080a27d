"""Calibrating a user's own model: its directory's tokenizer is used, a tokenizer of another vocabulary is refused
by name, and token ids can be given directly (a tensor or a .safetensors file). Tiny random Llamas."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM

import lowbit
from lowbit.passes.manager import PipelineError

GPTQ = "gptq(w=int4,group=32,calib_n=2,calib_len=16,progress=false)"


def tiny_llama(vocab: int) -> torch.nn.Module:
    cfg = AutoConfig.for_model("llama", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                               num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab,
                               max_position_embeddings=64)
    return AutoModelForCausalLM.from_config(cfg).eval()


def test_tokenizer_comes_from_the_model_directory(tmp_path, minilm):
    tok = minilm[1]
    tiny_llama(len(tok)).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True)
    compiled = lowbit.compile_model(model, pipeline=GPTQ)
    assert compiled.tokenizer is not None and compiled.tokenizer.name_or_path == str(tmp_path)
    assert compiled.report.pipeline.records[0].stats["weights_quantized"] == 7


def test_a_model_without_its_tokenizer_is_refused_before_calibrating():
    with pytest.raises(Exception) as info:
        lowbit.compile_model(tiny_llama(128), pipeline=GPTQ)
    assert "no tokenizer for this model (its embedding has 128 rows" in str(info.value)


def test_a_model_whose_ids_are_reshaped_before_the_embedding_is_refused_like_the_others():
    """GPT-2 reshapes ``input_ids`` to ``[-1, T]`` before ``wte``: the vocabulary check looked only for an embedding
    reading the input itself, so a tiny GPT-2 (128 rows) calibrated on SmolLM2's ids and failed inside the embedding
    ("IndexError: index out of range in self"). The reshape is followed: the same refusal as every other model."""
    from conftest import tiny_outside_family

    from lowbit.calibration.data import vocabulary_size
    from lowbit.ir.capture import capture
    from lowbit.models import CausalLMLogits

    model = tiny_outside_family("gpt2", 1)
    ids = torch.randint(3, 128, (2, 12))
    assert vocabulary_size(capture(CausalLMLogits(model).eval(), (ids,))) == 128
    with pytest.raises(PipelineError, match=r"no tokenizer for this model \(its embedding has 128 rows"):
        lowbit.compile_model(model, pipeline="quantize(w=int8,a=int8,a_static=true,a_gran=per_tensor,calib_n=2,"
                                             "calib_len=16)")


def test_a_tokenizer_of_another_vocabulary_is_refused_by_name():
    with pytest.raises(Exception) as info:
        lowbit.compile_model(tiny_llama(128), pipeline=GPTQ.replace("progress", "tokenizer=minilm,progress"))
    msg = str(info.value)
    assert "outside the model's vocabulary of 128" in msg and "tokenizer" in msg


def test_a_pass_tokenizer_of_another_vocabulary_than_the_models_own_is_refused():
    """gptq(tokenizer=minilm) on SmolLM2 calibrated on WordPiece ids: all below SmolLM2's 49152 rows, so the range
    check let through text the model reads as other tokens. A pass' tokenizer whose vocabulary is not the size of
    the model's own tokenizer is refused before capture; one of the same vocabulary is taken."""
    from lowbit.passes.base import PassError

    pipeline = "gptq(w=int4,group=64,calib_n=1,calib_len=8,progress=false,tokenizer={})"
    with pytest.raises(PassError, match=r"pass gptq: option tokenizer='minilm': tokenizer 'minilm' has 30522 tokens, "
                                        r"but the model's own tokenizer .* has 49152"):
        lowbit.compile_model("smollm2:1", pipeline=pipeline.format("minilm"))
    from lowbit.calibration.data import load_tokenizer
    from lowbit.passes.gptq import GPTQ

    own = load_tokenizer("smollm2")
    GPTQ(calib_n=1, calib_len=8, tokenizer="smollm2").options.check_text_length(own, "gptq")  # same vocabulary
    with pytest.raises(PassError, match=r"option tokenizer='minilm': tokenizer 'minilm' has 30522 tokens"):
        GPTQ(calib_n=1, calib_len=8, tokenizer="minilm").options.check_text_length(own, "gptq")


def test_calibration_token_ids_from_a_tensor_or_a_safetensors_file(tmp_path):
    model = tiny_llama(128)
    ids = torch.randint(0, 128, (2, 16))
    compiled = lowbit.compile_model(model, pipeline=GPTQ, calib=ids)
    stats = compiled.report.pipeline.records[0].stats
    assert stats["calib_tokens"] == 32 and stats["weights_quantized"] == 7
    assert "calib=<tensor [2, 16] int64>" in compiled.report.pipeline.records[0].spec

    save_file({"input_ids": torch.randint(0, 128, (500,))}, str(tmp_path / "ids.safetensors"))
    spec = GPTQ.replace("progress", f"calib={tmp_path / 'ids.safetensors'},progress")
    assert lowbit.compile_model(model, pipeline=spec).report.pipeline.records[0].stats["calib_tokens"] == 32

    with pytest.raises(Exception, match="the given token ids produces id 300, outside the model's vocabulary of 128"):
        lowbit.compile_model(model, pipeline=GPTQ, calib=torch.full((2, 16), 300))
    # a negative id is no tokenizer's: it was blamed on "tokenized for another model"
    with pytest.raises(Exception, match=r"the given token ids holds id -1: token ids are 0..127 \(a negative id is a "
                                        r"pad or sentinel"):
        lowbit.compile_model(model, pipeline=GPTQ, calib=torch.full((2, 16), -1))
    with pytest.raises(PipelineError, match=r"must be integers, got torch.float32 \(float inputs calibrate a model "
                                            r"whose input is float; this graph's input %input_ids is i64"):
        lowbit.compile_model(model, pipeline=GPTQ, calib=torch.rand(2, 16))


def test_a_padded_tokenizer_batch_saved_with_its_mask_is_refused(tmp_path):
    """tokenizer(texts, padding=True) saved as is ({input_ids, attention_mask}): the mask was dropped and the pad ids
    calibrated as if they were text. Padding is refused naming the file; an all-ones mask is a plain batch."""
    from lowbit.calibration.data import calibration_tensor
    from lowbit.errors import CorruptFileError

    ids = torch.randint(1, 128, (2, 16))
    mask = torch.ones(2, 16, dtype=torch.long)
    save_file({"input_ids": ids, "attention_mask": mask}, str(tmp_path / "full.safetensors"))
    assert torch.equal(calibration_tensor(str(tmp_path / "full.safetensors")), ids)
    mask[1, 10:] = 0
    save_file({"input_ids": ids, "attention_mask": mask}, str(tmp_path / "padded.safetensors"))
    with pytest.raises(CorruptFileError, match=r"padded.safetensors' holds an attention_mask with 6 padded positions"):
        calibration_tensor(str(tmp_path / "padded.safetensors"))


def test_calibration_batches_that_do_not_fit_a_fixed_shape_capture_name_the_input():
    """Explicit example inputs fix the captured sizes; a calibration set of another length failed inside an
    expand node ('the expanded size of the tensor (2) must match the existing size (4)')."""
    import pytest
    import torch
    from conftest import tiny_llama

    from lowbit.api import compile_model
    from lowbit.errors import LowbitError

    torch.manual_seed(0)
    model = tiny_llama(hidden=64, inter=128, heads=4, kv_heads=2, layers=1, vocab=256)
    x = torch.randint(0, 256, (2, 16))
    with pytest.raises(LowbitError, match=r"calibration input %input_ids is \[2, 32\], but the graph takes "
                                          r"\[2, 16\].*declare them \(compile_model\(\.\.\., dynamic_shapes="
                                          r"\{'input_ids': \{1: torch\.export\.Dim\.DYNAMIC\}"):
        compile_model(model, (x,), pipeline="gptq(w=int4,group=32,calib_n=4,calib_len=32)",
                      calib=torch.randint(0, 256, (4, 32)))


def test_distillation_batches_that_do_not_fit_a_fixed_shape_capture_name_the_input():
    """tune-qparams on a graph captured at batch 2: its held-out window (holdout=1) failed inside attention with
    only 'The size of tensor a (2) must match the size of tensor b (4)'; the failure now says which input and
    shape, and that the capture fixed them (as the block-by-block engine's does)."""
    import pytest
    import torch
    from conftest import tiny_llama

    from lowbit.api import compile_model
    from lowbit.errors import LowbitError

    torch.manual_seed(0)
    model = tiny_llama(hidden=64, inter=128, heads=4, kv_heads=2, layers=1, vocab=256)
    x = torch.randint(0, 256, (2, 16))
    with pytest.raises(LowbitError, match=r"held-out windows 0..0: .*calibration input %input_ids is \[1, 16\], but "
                                          r"the graph takes \[2, 16\].*declare them \(compile_model\(\.\.\., "
                                          r"dynamic_shapes=\{'input_ids': \{0: torch\.export\.Dim\.DYNAMIC\}"):
        compile_model(model, (x,), pipeline="quantize(w=int4,group=32),tune-qparams(tokens=64,holdout=1,"
                      "progress=false)", calib=torch.randint(0, 256, (4, 16)))


def test_tokenizer_given_by_name_or_directory_and_bad_ones_refused():
    """tokenizer='smollm2' (the form the CLI and the passes' option take) failed inside the first calibrating pass
    with "'str' object has no attribute 'get_vocab'"; a name or directory is loaded, anything else refused."""
    import pytest
    from conftest import tiny_llama

    import lowbit
    from lowbit.passes.base import PassError

    model = tiny_llama(vocab=49152)
    compiled = lowbit.compile_model(model, pipeline=GPTQ, tokenizer="smollm2")
    assert callable(compiled.tokenizer.get_vocab) and compiled.report.pipeline.records[0].changed
    with pytest.raises(PassError, match="tokenizer='/nonexistent/tok'.*local tokenizer directory"):
        lowbit.compile_model(model, pipeline=GPTQ, tokenizer="/nonexistent/tok")
    with pytest.raises(PassError, match="tokenizer= takes a Hugging Face tokenizer.*got int"):
        lowbit.compile_model(model, pipeline=GPTQ, tokenizer=123)


def test_a_tokenizer_directory_without_tokenizer_files_is_refused_naming_the_option(tmp_path):
    """gptq(tokenizer=DIR) on a directory with no tokenizer files was a raw traceback from the pre-capture text
    check (transformers' "Couldn't instantiate the backend tokenizer ... install sentencepiece"), and
    compile_model(tokenizer=DIR) quoted that; both name the directory and the files a tokenizer has."""
    from lowbit.passes.base import PassError, PassFileError

    (tmp_path / "config.json").write_text("{}")  # a model directory saved without its tokenizer
    model = tiny_llama(49152)
    with pytest.raises(PassFileError, match=r"pass gptq: option tokenizer='.*': tokenizer '.*' has no tokenizer "
                                            r"files \(one of tokenizer.json, "):
        lowbit.compile_model(model, pipeline=GPTQ.replace("progress", f"tokenizer={tmp_path},progress"))
    with pytest.raises(PassError, match=r"tokenizer='.*': tokenizer '.*' has no tokenizer files"):
        lowbit.compile_model(model, pipeline=GPTQ, tokenizer=str(tmp_path))


def test_calib_that_no_pass_reads_is_refused():
    """compile_model(calib=...) with no pass that calibrates (or quantize without static scales, a fixed rotation)
    silently ignored it, a missing file included."""
    import re

    import pytest
    import torch
    from conftest import tiny_llama

    import lowbit
    from lowbit.passes.base import PassError

    model = tiny_llama(vocab=256)
    for pipeline in ("fold-norms", "fold-norms,rotate", "quantize(w=int4,group=32)"):
        with pytest.raises(PassError, match=f"calib= is read by calibrating passes.*the pipeline "
                                            f"'{re.escape(pipeline)}' has none"):
            lowbit.compile_model(model, pipeline=pipeline, calib="/nonexistent/calib.txt")
    ids = torch.randint(0, 256, (2, 16))
    compiled = lowbit.compile_model(model, pipeline="quantize(w=int8,a=int8,a_static=true,a_gran=per_tensor,"
                                    "progress=false)", calib=ids)
    assert compiled.report.pipeline.records[0].stats["calibration"]


def test_calib_does_not_change_the_callers_pass_objects():
    """compile_model(pipeline=[pass], calib=ids) set the ids on the caller's pass: a later compile with the same
    pass and no calib= silently calibrated on them again."""
    import torch
    from conftest import tiny_llama

    import lowbit
    from lowbit.data import TEXTS
    from lowbit.passes.gptq import GPTQ

    gptq = GPTQ(w="int4", group=32, calib_n=2, calib_len=16, progress=False)
    ids = torch.randint(0, 256, (2, 16))
    compiled = lowbit.compile_model(tiny_llama(vocab=256), pipeline=[gptq], calib=ids)
    assert "calib=<tensor [2, 16] int64>" in compiled.report.pipeline.records[0].spec
    assert gptq.options.calib in TEXTS and "calib" not in gptq.options.model_fields_set


def test_an_empty_stream_of_calibration_ids_says_so():
    """An empty 1-D tensor of ids was refused with 'calibration token ids calib has 0 tokens: ... but n=1 were asked
    (2 tokens)', numbers the user never gave."""
    import pytest
    import torch
    from conftest import tiny_llama

    import lowbit
    from lowbit.passes.base import PassError

    for ids in (torch.zeros(0, dtype=torch.long), torch.tensor([7])):
        with pytest.raises(PassError, match=f"pass gptq: calib: a 1-D stream of calibration token ids needs at "
                                            f"least 2 ids, got {ids.numel()}$"):
            lowbit.compile_model(tiny_llama(vocab=256), pipeline=GPTQ, calib=ids)


def test_static_activation_scales_from_non_finite_calibration_inputs_are_refused_naming_the_input():
    """A NaN in the float calibration inputs of a static activation scale made the scale NaN, and the compiled
    model returned NaN for every input without an error; it is a CalibrationError naming the value and its
    reader."""
    net = torch.nn.Sequential(torch.nn.LayerNorm(16), torch.nn.Linear(16, 8)).eval()
    x = torch.randn(4, 5, 16)
    bad = torch.randn(8, 5, 16)
    bad[3, 2, 1] = float("nan")
    pipeline = "quantize(w=int8,a=int8,a_static=true,a_gran=per_tensor,progress=false)"
    with pytest.raises(PipelineError, match=r"static activation scale of %layer_norm \(the input of 1\): the "
                       "calibration activations there are not finite"):
        lowbit.compile_model(net, example_inputs=(x,), pipeline=pipeline, calib=bad)
    ok = lowbit.compile_model(net, example_inputs=(x,), pipeline=pipeline, calib=torch.randn(8, 5, 16))
    assert torch.isfinite(ok(x)).all()


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_calibration_windows_longer_than_the_models_positions_are_refused(family):
    """A model of 64 positions calibrated on 512-token windows (the default calib_len): a rotary model was
    calibrated without a word on positions it never saw, one with learned positions (OPT) failed inside the
    embedding ('IndexError: index out of range in self'); both name the limit and the option."""
    torch.manual_seed(0)
    cfg = AutoConfig.for_model(family, hidden_size=32, intermediate_size=64, ffn_dim=64, num_hidden_layers=1,
                               num_attention_heads=4, num_key_value_heads=2, word_embed_proj_dim=32, vocab_size=128,
                               max_position_embeddings=64)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    pipeline = "gptq(w=int4,group=32,calib_n=2,progress=false)"
    with pytest.raises(PipelineError, match=r"calibration windows of 512 tokens are longer than the graph takes: "
                       r"%input_ids dim 1 \(s1\) is at most 64 tokens .* give calib_len=64 or less"):
        lowbit.compile_model(model, pipeline=pipeline, calib=torch.randint(0, 128, (2048,)))
    compiled = lowbit.compile_model(model, pipeline=pipeline.replace("calib_n=2", "calib_n=2,calib_len=64"),
                                    calib=torch.randint(0, 128, (2048,)))
    assert compiled.report.pipeline.records[0].stats["weights_quantized"] > 0


def test_generation_step_calibration_windows_longer_than_the_models_positions_are_refused():
    """The same 512-token windows on a 64-position model's generation step graph (compile_model(...,
    generation=...)) calibrated without a word: the step takes positions as an input, so the logits graph's bound
    on the sequence dim was not there. They are refused with the limit and the option; windows that fit still run."""
    from lowbit.calibration.engine import CalibrationError
    from lowbit.passes.gptq import GPTQ

    torch.manual_seed(0)
    step = lowbit.compile_model(tiny_llama(128), pipeline=[], generation=lowbit.GenerationSpec(max_length=32,
                                                                                             max_batch=2)).graph
    stream = torch.randint(0, 128, (2048,))
    with pytest.raises(CalibrationError, match=r"calibration windows of 512 tokens are longer than the model's "
                       r"max_position_embeddings=64 .*give calib_len=64 or less"):
        GPTQ(w="int4", group=32, calib_n=2, calib=stream, progress=False).run(step.clone())
    stats = GPTQ(w="int4", group=32, calib_n=2, calib_len=64, calib=stream, progress=False).run(step.clone()).stats
    assert stats["calib_tokens"] == 128 and stats["weights_quantized"] > 0


def test_calib_takes_a_pathlib_path_like_its_string(tmp_path):
    """compile_model(calib=Path(...)) was refused with pydantic's 'Input should be a valid string' although calib is
    documented as 'a text name or path'; a Path now calibrates exactly as its string, and another type is named."""
    from pathlib import Path

    from lowbit.passes.base import PassError

    text = tmp_path / "calib.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    torch.manual_seed(0)
    model = tiny_llama(49152)
    runs = [lowbit.compile_model(model, pipeline=GPTQ, calib=c, tokenizer="smollm2") for c in (Path(text), str(text))]
    a, b = (r.graph.params for r in runs)
    assert a.keys() == b.keys() and all(torch.equal(a[k].data, b[k].data) for k in a)
    with pytest.raises(PassError, match="calib takes a text name or file path, .* got int"):
        lowbit.compile_model(model, pipeline=GPTQ, calib=123)


def test_calib_n_and_calib_len_given_with_token_id_windows_are_not_ignored():
    """calib=[16, 32] windows with gptq(calib_n=4) calibrated on all 16 (and calib_len=16 on 32-token windows)
    without a word; an explicit calib_n now takes the first windows, a calib_len that is not L is refused, and
    unset options keep the documented 'used as they are'."""
    torch.manual_seed(0)
    model = tiny_llama(128)
    ids = torch.randint(0, 128, (16, 32))

    def tokens(pipeline: str) -> int:
        compiled = lowbit.compile_model(model, pipeline=pipeline, calib=ids)
        return compiled.report.pipeline.records[0].stats["calib_tokens"]

    assert tokens("gptq(w=int4,group=32,progress=false)") == 16 * 32
    assert tokens("gptq(w=int4,group=32,calib_n=4,progress=false)") == 4 * 32
    with pytest.raises(PipelineError, match="the given windows are 32 tokens long, but calib_len=16 was asked"):
        tokens("gptq(w=int4,group=32,calib_len=16,progress=false)")


def test_calib_n_above_the_given_windows_or_samples_is_refused():
    """gptq(calib_n=16) with calib=[4, 32] windows calibrated on the 4 without a word (a 1-D stream or a text too
    short for calib_n is refused), and so did float samples; both are refused naming calib_n and what was given.
    Unset, calib_n leaves the given data whole; at or below its size it takes the first ones."""
    from lowbit.passes.base import PassError
    from lowbit.passes.gptq import GPTQ

    torch.manual_seed(0)
    graph = lowbit.compile_model(tiny_llama(128), pipeline=[]).graph
    ids = torch.randint(0, 128, (4, 32))
    with pytest.raises(PassError, match=r"pass gptq: option calib=.*calib_n=16 was asked, but the given data holds "
                                        r"4 windows: give calib_n=4 or less"):
        GPTQ(calib=ids, calib_n=16).options.token_ids(graph, "gptq")
    assert GPTQ(calib=ids, calib_n=4).options.token_ids(graph, "gptq").shape == (4, 32)
    assert GPTQ(calib=ids).options.token_ids(graph, "gptq").shape == (4, 32)
    net = torch.nn.Sequential(torch.nn.LayerNorm(16), torch.nn.Linear(16, 8)).eval()
    floats = lowbit.compile_model(net, example_inputs=(torch.randn(4, 5, 16),), pipeline=[]).graph
    with pytest.raises(PassError, match=r"calib_n=9 was asked, but the given data holds 8 samples"):
        GPTQ(calib=torch.randn(8, 5, 16), calib_n=9).options.token_ids(floats, "gptq")
    assert GPTQ(calib=torch.randn(8, 5, 16), calib_n=3).options.token_ids(floats, "gptq").shape == (3, 5, 16)


def test_compile_model_takes_a_path_and_names_a_wrong_type(tmp_path):
    """compile_model(Path(dir)) is documented ('a name or path') but a Path was taken for a module: 'no example
    inputs given for PosixPath'; None said the same for NoneType. A Path is its string; another type a TypeError."""
    from pathlib import Path

    from lowbit.data.model_files import load_tokenizer

    torch.manual_seed(0)
    tiny_llama(49152).save_pretrained(tmp_path)
    load_tokenizer("smollm2").save_pretrained(tmp_path)
    compiled = lowbit.compile_model(Path(tmp_path), pipeline="dce")
    assert compiled.graph.find("linear")
    with pytest.raises(TypeError, match="model must be an nn.Module .* or a name or path .* got NoneType"):
        lowbit.compile_model(None, pipeline="dce")


def test_a_pass_tokenizer_of_the_same_base_with_added_tokens_is_taken_and_one_of_other_ids_refused(tmp_path):
    """check_tokenizer_matches compared len(tokenizer): SmolLM2's tokenizer saved with two added tokens was refused
    ('49154 tokens, but ... 49152'), though its ids mean the same tokens, and a tokenizer of the same size whose ids
    mean other tokens was taken. It compares the base vocabularies and the token of every id both have."""
    import copy

    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    from lowbit.calibration.data import check_tokenizer_matches, load_tokenizer
    from lowbit.passes.gptq import GPTQ

    own = load_tokenizer("smollm2")
    added = copy.deepcopy(own)
    added.add_tokens(["<tool_a>", "<tool_b>"])
    added.save_pretrained(tmp_path / "added")
    GPTQ(calib_n=1, calib_len=8, tokenizer=str(tmp_path / "added")).options.check_text_length(own, "gptq")
    check_tokenizer_matches(own, added, "smollm2")  # and the model's own having the added ones
    vocab = {f"w{i}": i for i in range(own.vocab_size)}
    other = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="w0")))
    assert len(other) == len(own)
    with pytest.raises(ValueError, match=r"tokenizer 'words'.s id 0 is 'w0', but in the model's own tokenizer "
                                         r"\(.*\) it is .*: its ids stand for other tokens"):
        check_tokenizer_matches(other, own, "words")


def test_a_calib_len_past_the_models_positions_is_refused_before_capture(monkeypatch, tmp_path):
    """A calib_len past the model's max_position_embeddings was refused by the pass after the capture (and every
    pass before it), exit 4 in the CLI; it is refused before the capture, naming the option and the limit (exit 2)."""
    from typer.testing import CliRunner

    from lowbit.calibration.data import load_tokenizer
    from lowbit.cli.main import app
    from lowbit.passes.base import PassError

    torch.manual_seed(0)
    model = tiny_llama(49152)
    monkeypatch.setattr("lowbit.api.capture", lambda *a, **k: pytest.fail("captured"))
    with pytest.raises(PassError, match=r"pass gptq: option calib_len=80: the model takes at most 64 positions "
                                        r"\(max_position_embeddings in its config\).*give calib_len=64 or less"):
        lowbit.compile_model(model, pipeline="gptq(w=int4,group=32,calib_n=2,calib_len=80)", tokenizer="smollm2")
    model.save_pretrained(tmp_path)
    load_tokenizer("smollm2").save_pretrained(tmp_path)
    monkeypatch.setattr("lowbit.cli.common.capture_model", lambda *a, **k: pytest.fail("captured"))
    res = CliRunner().invoke(app, ["compile", str(tmp_path), "--pipeline", "gptq(calib_n=2,calib_len=80)"])
    out = " ".join(res.output.split())
    assert res.exit_code == 2 and "option calib_len=80: the model takes at most 64 positions" in out, out


@pytest.fixture(autouse=True)
def _one_export_per_model(reuse_captures: object) -> None:
    """Every test here captures through the session's capture cache (conftest's ``reuse_captures``): the tiny models
    these tests compile again and again, unchanged, are exported once (torch.export takes seconds a capture)."""
