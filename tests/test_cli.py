"""The ``lowbit`` command on real models: MiniLM and a 2-layer SmolLM2 slice (``smollm2:2``).

Commands run in-process through typer's CliRunner (models are loaded and captured once per process by
``lowbit.cli.common``), one runs as a real subprocess through the installed console script, and the HTML
report is rendered by headless Chromium when it is installed. Evaluations use 2 windows × 32 tokens so the
whole file stays well under two minutes on 2 cores.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import tiny_llama
from typer.testing import CliRunner

from lowbit.cli.main import app
from lowbit.passes.base import Pass, PassError, PassOptions, PassResult, register_pass

SMALL = ["--windows", "2", "--seq-len", "32"]
QUANT = "fold-norms,dce,quantize(w=int4,group=64,a=int8)"


# ---- test-only passes: a planted bug and a pass that crashes ---------------------------------------

class PlantOptions(PassOptions):
    modules: str = ""
    """Regex on module paths: the common handle bisect restricts passes with."""
    layer: int = 1
    """The block whose down_proj the planted bug wrecks."""


@register_pass
class PlantBad(Pass):
    """Test only: scales every matched down_proj by 1+1e-6, but block ``layer``'s by -20 (the planted bug)."""

    name = "test-plant-bad"
    Options = PlantOptions

    def run(self, graph):
        rx = re.compile(self.options.modules) if self.options.modules else None
        touched = 0
        for node in graph.nodes:
            if node.op == "linear" and node.module.endswith("mlp.down_proj") and (rx is None or rx.search(node.module)):
                w = node.args[1]
                bad = node.module.startswith(f"model.layers.{self.options.layer}.")
                graph.set_param(w.name, w.data * (-20.0 if bad else 1.0 + 1e-6))
                touched += 1
        return PassResult(touched > 0, {"touched": touched})


@register_pass
class PlantNaN(Pass):
    """Test only: block ``layer``'s down_proj weight becomes NaN (a pass that poisons the output)."""

    name = "test-plant-nan"
    Options = PlantOptions

    def run(self, graph):
        rx = re.compile(self.options.modules) if self.options.modules else None
        for node in graph.nodes:
            if (node.op == "linear" and node.module == f"model.layers.{self.options.layer}.mlp.down_proj"
                    and (rx is None or rx.search(node.module))):
                graph.set_param(node.args[1].name, torch.full_like(node.args[1].data, float("nan")))
        return PassResult(True)


def _wreck_down_projections(graph):
    """Every MLP down_proj weight times -20: damage the metric shows in every layer (Flaky's and ScaleAll's)."""
    for node in graph.nodes:
        if node.op == "linear" and node.module.endswith("mlp.down_proj"):
            graph.set_param(node.args[1].name, node.args[1].data * -20.0)


@register_pass
class Flaky(Pass):
    """Test only: wrecks every down_proj on its odd-numbered runs and does nothing on the others (unseeded)."""

    name = "test-flaky"
    runs = 0

    def run(self, graph):
        Flaky.runs += 1
        if Flaky.runs % 2 == 0:
            return PassResult(False)
        _wreck_down_projections(graph)
        return PassResult(True)


@register_pass
class ScaleAll(Pass):
    """Test only: a damaging pass with no option to restrict it to some layers."""

    name = "test-scale-all"

    def run(self, graph):
        _wreck_down_projections(graph)
        return PassResult(True)


@register_pass
class Explode(Pass):
    """Test only: always fails, to exercise reproducers."""

    name = "test-explode"

    def run(self, graph):
        raise PassError("pass test-explode: planted failure on purpose")


@register_pass
class ShrinkEmbedding(Pass):
    """Test only: keeps the first 8 rows of the token embedding. The graph verifies (the verifier runs nodes on meta
    tensors, where an index is never checked) and fails on real ids: a pass that leaves a graph that does not run."""

    name = "test-shrink-embedding"

    def run(self, graph):
        for node in graph.nodes:
            if node.op == "embedding":  # a copy of its own: the tied lm_head keeps the whole table
                w = graph.add_param(graph.fresh_param_name("shrunk"), node.args[0].data[:8].clone())
                node.args = (w, *node.args[1:])
        return PassResult(True)


def invoke(*args: str, code: int = 0):
    res = CliRunner().invoke(app, [str(a) for a in args])
    if res.exit_code != code:
        if res.exception is not None and not isinstance(res.exception, SystemExit):
            raise res.exception
        raise AssertionError(f"exit {res.exit_code} (wanted {code}) for {args}:\n{res.output}")
    return res


# ---- listing and bad input ----------------------------------------------------------------------

def test_passes_lists_options_and_docs():
    out = invoke("passes").output
    for name in ("fold-norms", "dce", "constant-fold"):
        assert name in out
    assert "modules: str = ''" in out
    detail = invoke("passes", "fold-norms").output
    assert "Regex on the norm's module path" in detail  # option docstrings are shown for one pass
    assert "did you mean 'fold-norms'" in invoke("passes", "fold-norm", code=2).output


def test_docs_count_the_shipped_calibration_windows_there_are():
    """`lowbit passes gptq` (and every calibrating pass' docs) said the shipped text has 117 windows of 512; it has
    123 (63,336 SmolLM2 tokens), so calib_n=117, 'every window', left six out. Each count of them lowbit's sources
    give is the one calibration finds."""
    from lowbit.calibration.data import DEFAULT_CALIBRATION_TEXT, load_tokenizer
    from lowbit.data.tokens import token_ids

    there = token_ids(DEFAULT_CALIBRATION_TEXT, load_tokenizer("smollm2")).numel() // 512
    sources = sorted((Path(__file__).resolve().parents[1] / "lowbit").rglob("*.py"))
    said = {f"{path.name}: {m.group(0)}": int(m.group(1)) for path in sources
            for m in re.finditer(r"(?:shipped (?:text|excerpt) has|excerpt,|tokens,) (\d+) (?:windows )?of 512",
                                 path.read_text())}
    assert len(said) >= 5 and all(n == there for n in said.values()), (there, said)


def test_recipes_listing_or_clear_absence():
    out = invoke("recipes").output
    assert "recipe" in out.lower()


def test_recipes_listing_shows_the_pipeline_generate_runs(monkeypatch):
    """kv4 generates with kv-cache(bits=4), not its quantize(kv=...) accuracy model; the listing showed only the
    latter, so `lowbit generate --recipe kv4` ran a pipeline no listing named."""
    monkeypatch.setenv("COLUMNS", "400")
    out = invoke("recipes").output
    rows = {m: next(line for line in out.splitlines() if f"│ {m} " in line) for m in ("kv4", "kv2", "w8a8-rtn")}
    assert "quantize(kv=int4" in rows["kv4"] and "(generate: kv-cache(bits=4))" in " ".join(out.split())
    assert "(generate: kv-cache(bits=2))" in " ".join(out.split()) and "generate:" not in rows["w8a8-rtn"]


@pytest.mark.parametrize("args, code, needle", [
    (["compile", "minilm", "--pipeline", "fold-norm"], 2, "did you mean 'fold-norms'"),
    (["compile", "minilm", "--pipeline", "fold-norms(module=x)"], 2, "did you mean 'modules'"),
    (["compile", "minilm", "--pipeline", "dce", "--backend", "onnxrt"], 2, "did you mean 'onnxruntime'"),
    (["compile", "/no/such/model", "-p", "dce", "-b", "onnxruntime", "--backend-option", "opset=99"], 2,
     "opset 99 is newer"),  # was exit 5 with ORT's "Opset 99 is under development", after capture
    (["compile", "minilm", "--recipe", "no-such-recipe"], 2, "recipe"),
    (["compile", "minilm"], 2, "--pipeline"),
    (["compile", "/no/such/model", "--pipeline", "dce"], 3, "no such file"),
    (["compile", "/no/such/[model]", "--pipeline", "dce"], 3, "'/no/such/[model]': no such file"),  # not markup
    (["compile", "smollm2:0", "--pipeline", "dce"], 2, "at least 1"),
    (["compile", "minilm", "--pipeline", "dce", "--print-ir-after", "fold-norm"], 2, "did you mean"),
    (["inspect", "/no/such/file.lowbit"], 3, "no such file"),
    (["inspect", "/no/such/file.lowbit", "--top", "-1"], 2, "--top -1"),
    (["debug", "bisect", "minilm", "--pipeline", "dce", "--metric", "pll"], 2, "did you mean 'ppl'"),
    (["debug", "bisect", "minilm", "--pipeline", "dce"], 2, "absolute amount"),
    (["debug", "sensitivity", "minilm", "--scheme", "w4x4"], 2, "give wNaM"),
    (["debug", "sensitivity", "minilm", "--scheme", "quantize(w=int4),dce"], 2, "is 2 passes"),  # was a traceback
    (["debug", "compare", "smollm2:1", "-p", "dce", "--windows", "1", "--seq-len", "9000"], 2,
     "max_position_embeddings=8192"),
    (["debug", "bisect", "smollm2:1", "-p", "last-logits", "--windows", "1", "--seq-len", "16"], 2,
     "perplexity needs the logits of every position, and the graph gives 1 of the window's 16"),  # a traceback
    # the other kind's size flags were silently ignored (an encoder embeds sentences, a causal LM reads windows)
    (["debug", "compare", "minilm", "-p", "dce", "--windows", "2", "--seq-len", "64"], 2,
     "--windows and --seq-len do not apply to 'minilm', an encoder: it is measured on --sentences N"),
    (["debug", "sensitivity", "smollm2:1", "--sentences", "4"], 2,
     "--sentences does not apply to 'smollm2:1', a causal LM: it is measured on --windows N and --seq-len L"),
])
def test_bad_input_exit_codes(args, code, needle):
    assert needle in invoke(*args, code=code).output


@pytest.mark.parametrize("fmt", ["compressed-tensors", "gptq"])
def test_quantized_checkpoint_as_model_is_refused_by_name(tmp_path, fmt):
    """lowbit.save's own output given back as MODEL: compile exits 2 naming the quantization_config and lowbit.load
    (torch.export failed on compressed-tensors' linears, transformers asked for optimum: exit 1 with a traceback);
    generate loads it as the generation step instead (it was refused the same way)."""

    import lowbit
    from lowbit.models import load_smollm2_tokenizer

    compiled = lowbit.compile_model(tiny_llama(vocab=49152), pipeline="quantize(w=int4,group=32)",
                                    tokenizer=load_smollm2_tokenizer())
    out = lowbit.save(compiled, tmp_path / "ck", format=fmt)
    res = invoke("compile", out, "-p", "dce", "-o", tmp_path / "o", code=2).output
    assert f"quantization_config: {fmt}" in res and "lowbit.load" in res, res
    res = invoke("generate", out, "--prompt", "hi", "-n", "2", "--max-length", "16").output
    assert "loaded from the checkpoint" in res and "decode 1 step," in res, res


def test_out_that_holds_other_files_is_not_replaced(tmp_path, monkeypatch):
    """-o naming the model's own directory (or any directory of files lowbit did not write) replaced it whole,
    deleting the model; -o . crashed with a traceback renaming the working directory. Both exit 2 before loading
    anything, and lowbit.save refuses the same; an empty directory or an earlier output is still replaced."""
    import lowbit
    from lowbit.checkpoint import CheckpointError

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    res = invoke("compile", "minilm", "-p", "dce", "-o", model, code=2).output
    assert "holds files lowbit did not write (config.json" in res and (model / "config.json").is_file()

    compiled = lowbit.compile_model(tiny_llama(), pipeline="dce")
    with pytest.raises(CheckpointError, match="config.json"):
        lowbit.save(compiled, model, format="lowbit")
    assert (model / "config.json").is_file()
    (tmp_path / "out").mkdir()
    for _ in range(2):  # empty, then its own earlier output
        lowbit.save(compiled, tmp_path / "out", format="lowbit")
    monkeypatch.chdir(model)
    assert "working directory" in invoke("compile", "minilm", "-p", "dce", "-o", ".", code=2).output


def test_inspect_and_graph_read_a_compressed_tensors_checkpoint(tmp_path):
    """lowbit.save's default format (and compile -f compressed-tensors) is inspectable: inspect and graph said
    "has no model.lowbit or model.onnx" (exit 3) although lowbit.load reads it."""

    import lowbit

    compiled = lowbit.compile_model(tiny_llama(), pipeline="quantize(w=int4,group=32)")
    out = lowbit.save(compiled, tmp_path / "ck", format="compressed-tensors")
    assert "int4 weight ×7" in invoke("inspect", out).output
    invoke("graph", out, "--format", "html", "-o", tmp_path / "g.html")
    assert "self_attn.q_proj" in (tmp_path / "g.html").read_text()
    (tmp_path / "empty").mkdir()
    assert "config.json" in invoke("inspect", tmp_path / "empty", code=3).output


def test_unreadable_calibration_file_exits_3(tmp_path):
    """A binary calib= file is a file that cannot be read (exit 3, as a missing one), not a failed pass (exit 4 with a
    reproducer hint and the codec's 'can't decode byte 0xbb')."""
    garbage = tmp_path / "calib.bin"
    garbage.write_bytes(b"\xbb\xff" * 100)
    out = invoke("compile", "smollm2:1", "-p", f"gptq(w=int4,calib_n=1,calib_len=8,progress=false,calib={garbage})",
                 "-o", tmp_path / "out", "--quiet", code=3).output
    assert "option calib=" in out and "is not UTF-8 text" in out and "--reproducer" not in out


def test_quiet_compile_turns_the_calibration_progress_bars_off(tmp_path):
    """--quiet left every calibrating pass's tqdm bar on ('calibrate: 100%|...'); a pipeline's own progress=true
    keeps its bar."""
    from transformers.utils import logging as hf_logging

    hf_logging.enable_progress_bar()  # transformers' "Loading weights" bar stayed on under --quiet
    gptq = "gptq(w=int4,calib_n=1,calib_len=8{})"
    out = invoke("compile", "smollm2:1", "-p", gptq.format(""), "-o", tmp_path / "a", "--quiet").output
    assert "calibrate:" not in out and "Loading weights" not in out
    # a display option: -q must not write progress=false into the recorded pass specs (report.json, reproducers)
    report = (tmp_path / "a" / "report.json").read_text()
    assert "gptq(w=int4,calib_n=1,calib_len=8)" in report and "progress" not in report
    out = invoke("compile", "smollm2:1", "-p", gptq.format(",progress=true"), "-o", tmp_path / "b", "--quiet").output
    assert "calibrate:" in out


def test_help_documents_exit_codes():
    out = " ".join(invoke("--help").output.replace("│", " ").split())
    assert "Exit codes" in out and "4 a pass failed" in out and "6 debug bisect" in out


def test_recipe_to_onnxruntime_then_inspect_in_subprocess(tmp_path):
    """A recipe compiled for onnxruntime writes model.onnx; the installed console script inspects it."""
    out = tmp_path / "ort"
    invoke("compile", "minilm", "--recipe", "w8a8", "--backend", "onnxruntime", "-o", out, "--quiet")
    assert (out / "model.onnx").is_file()
    exe = shutil.which("lowbit")
    cmd = [exe] if exe else [sys.executable, "-m", "lowbit.cli.main"]
    res = subprocess.run(cmd + ["inspect", str(out / "model.onnx")], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "COLUMNS": "200"})
    assert res.returncode == 0, res.stderr
    assert "QuantizeLinear" in res.stdout and "INT8" in res.stdout
    # the error path in-process (a second console-script process cost ~3 s of imports): code 3, on stderr alone
    bad = CliRunner().invoke(app, ["inspect", str(tmp_path / "missing.onnx")])
    assert bad.exit_code == 3 and "no such file" in bad.stderr and not bad.stdout


def test_onnxruntime_backend_options_shape_the_written_model_onnx(tmp_path):
    """--backend-option weight_format=matmulnbits / accuracy_level apply to out/model.onnx too: it was always the
    opset-21 QDQ form with accuracy level 0, whatever the session ran."""
    from lowbit.backends.onnx import load_onnx, lowered_op_types
    from lowbit.backends.onnxruntime_backend import accuracy_from_metadata

    out = tmp_path / "ort"
    invoke("compile", "minilm", "-p", "quantize(w=int4,group=32)", "-b", "onnxruntime", "--backend-option",
           "weight_format=matmulnbits", "--backend-option", "accuracy_level=4", "-o", out, "--quiet")
    model = load_onnx(out / "model.onnx")
    assert "com.microsoft::MatMulNBits" in lowered_op_types(model) and accuracy_from_metadata(model) == 4
    invoke("compile", "minilm", "-p", "quantize(w=int4,group=32)", "-b", "onnxruntime", "-o", out, "--quiet")
    model = load_onnx(out / "model.onnx")  # no options: the portable QDQ form, as before
    assert "DequantizeLinear" in lowered_op_types(model) and model.opset_imports[""] == 21


def test_int8_weights_is_an_onnxruntime_backend_option_and_reaches_model_onnx(tmp_path):
    """``int8_weights`` (the integer GEMM's weight codes) was a lowering option neither the backend nor the CLI
    took: --backend-option int8_weights=u8 was refused as unknown, and model.onnx could not be written with uint8
    codes on a CPU with VNNI (to run exactly on one without)."""
    import json

    import onnx_ir as ir

    from lowbit.backends.onnx import load_onnx
    from lowbit.data.model_files import load_tokenizer

    out = tmp_path / "ort"
    tiny_llama().save_pretrained(tmp_path / "tiny")
    load_tokenizer("smollm2").save_pretrained(tmp_path / "tiny")
    invoke("compile", tmp_path / "tiny", "-p", "quantize(w=int8,a=int8)", "-b", "onnxruntime", "--backend-option",
           "integer_matmul=true", "--backend-option", "int8_weights=u8", "-o", out, "--quiet")
    model = load_onnx(out / "model.onnx")
    gemms = [n for n in model.graph if n.op_type == "MatMulIntegerToFloat"]
    assert gemms and all(n.inputs[1].dtype == ir.DataType.UINT8 for n in gemms)
    assert json.loads(model.metadata_props["lowbit.options"])["int8_weights"] == "u8"


def test_a_pipeline_the_model_refuses_before_any_pass_gives_no_reproducer_hint(capsys):
    """A pass's precheck (quantize's KV window on MiniLM) refuses the model before any pass runs; the CLI then said
    '(rerun with --reproducer DIR to save the IR before this pass and replay it)', though no pass ran and the fix is
    the pipeline. A failing pass keeps the hint."""
    import typer

    from lowbit.cli.pipeline import run_pipeline
    from lowbit.ir.parser import parse_graph
    from lowbit.passes.base import Pass, PassError, PassResult

    class Refuses(Pass):
        name = "refuses"

        def precheck(self, graph):
            raise PassError("pass refuses: not this model")

        def run(self, graph):  # pragma: no cover - never reached
            return PassResult(False, {})

    class Fails(Refuses):
        def precheck(self, graph):
            pass

        def run(self, graph):
            raise PassError("pass refuses: failed while running")

    text = "graph main(%x: f32[2,8]) {\n  param @w: f32[4,8]\n  %y: f32[2,4] = linear(%x, @w)\n  return %y\n}\n"
    for p, said, hint in ((Refuses(), "refuses this model, so no pass ran", False), (Fails(), "failed", True)):
        with pytest.raises(typer.Exit) as exc:
            run_pipeline(parse_graph(text, {"w": torch.randn(4, 8)}), [p])
        err = " ".join(capsys.readouterr().err.split())
        assert exc.value.exit_code == 4 and said in err and ("--reproducer" in err) == hint, err


def test_a_modules_scope_matching_no_module_gives_no_reproducer_hint(capsys):
    """``quantize(modules=...)`` naming no module of the graph (a typo) ended '(rerun with --reproducer DIR to save the
    IR before this pass and replay it)': the replay says the same refusal again, and the fix is the pipeline text."""
    import typer

    from lowbit.cli.pipeline import run_pipeline
    from lowbit.ir.parser import parse_graph
    from lowbit.passes.manager import parse_pipeline

    text = ("graph main(%x: f32[2,8]) {\n  param @w: f32[4,8]\n  %y: f32[2,4] = linear(%x, @w)  # proj\n"
            "  return %y\n}\n")
    for modules, said in (("proj", None), ("prj", "modules=prj matches no module of the graph")):
        passes = parse_pipeline(f"quantize(w=int8,modules={modules})")
        if said is None:
            run_pipeline(parse_graph(text, {"w": torch.randn(4, 8)}), passes)
            continue
        with pytest.raises(typer.Exit) as exc:
            run_pipeline(parse_graph(text, {"w": torch.randn(4, 8)}), passes)
        err = " ".join(capsys.readouterr().err.split())
        assert exc.value.exit_code == 4 and said in err and "--reproducer" not in err, err


def test_generate_writes_a_reproducer_of_a_pass_failing_on_the_step_graph(tmp_path):
    """A pass failing under ``lowbit generate`` said '(rerun `lowbit compile MODEL --pipeline ... --reproducer DIR`
    ...)': compile captures the logits graph, where kv-cache (a step-graph pass) is refused for another reason, so the
    advice could not reproduce the failure. generate takes --reproducer itself: the step graph before the pass, which
    `lowbit replay` fails on again; a compiled model (no pass runs) refuses the flag."""
    from lowbit.data.model_files import load_tokenizer

    torch.manual_seed(0)
    tiny_llama(hidden=48, inter=64, heads=2, kv_heads=1).save_pretrained(tmp_path / "tiny")  # head_dim 24
    load_tokenizer("smollm2").save_pretrained(tmp_path / "tiny")
    repro = tmp_path / "repro"
    out = " ".join(invoke("generate", tmp_path / "tiny", "-p", "kv-cache(v_group=16)", "--prompt", "!", "-n", "2",
                          "--max-length", "16", "--reproducer", repro, code=4).output.split())
    assert "v_group=16 must divide head_dim 24" in out and f"reproducer written to {repro}" in out, out
    assert "lowbit compile" not in out
    replayed = " ".join(invoke("replay", repro, code=4).output.split())
    assert "reproduced" in replayed and "must divide head_dim 24" in replayed, replayed
    (tmp_path / "compiled").mkdir()
    (tmp_path / "compiled" / "model.lowbit").write_text("")  # refused before it is read
    out = " ".join(invoke("generate", tmp_path / "compiled", "--prompt", "!", "--reproducer", tmp_path / "r2",
                          code=2).output.split())
    assert "--reproducer: model" in out and "already compiled, so no pass runs here" in out, out


def test_inspect_counts_the_weights_of_fused_qlinears(tmp_path):
    """After fuse-qlinear (and the onnxruntime/triton backends' own fusions) the codes sit in qlinear nodes: inspect
    counted dequantize nodes only and said 'no quantized weights' for an int4 model."""
    import lowbit

    compiled = lowbit.compile_model(tiny_llama(), pipeline="quantize(w=int4,group=32,a=int8),fuse-qlinear")
    out = lowbit.save(compiled, tmp_path / "fused", format="lowbit")
    text = " ".join(invoke("inspect", out).output.split())
    assert "no quantized weights" not in text and "int4 weight ×7" in text and "int8 activation ×7" in text, text
    assert "f32[64,32] (qlinear)" in text, text  # the float weight's shape, not the packed codes'


def test_inspect_counts_a_kv_caches_qdq_apart_from_the_activations(tmp_path):
    """kv=int8 beside a=int8 read 'int8 activation ×5' (the two KV QDQ among the three linears' inputs): a user
    checking that the cache is quantized found no word of it."""
    import lowbit

    compiled = lowbit.compile_model(tiny_llama(), pipeline="quantize(w=int8,a=int8,kv=int8,kv_group=16)")
    out = lowbit.save(compiled, tmp_path / "kv", format="lowbit")
    text = " ".join(invoke("inspect", out).output.split())
    # a=int8: q/k/v share one input QDQ, then o_proj, gate/up, down_proj: 4; the keys' and values': 2
    assert "int8 activation ×4" in text and "int8 kv ×2" in text, text


def test_inspect_names_the_packed_kv_cache(tmp_path):
    """A step graph through kv-cache(bits=4) holds its KV quantization in cache_attention nodes, not dequantize
    ones: inspect said 'int4 weight ×7' and no word of the 4-bit cache."""
    import lowbit

    model = tiny_llama(hidden=64, inter=128, heads=2, kv_heads=1, vocab=97, max_positions=128)
    compiled = lowbit.compile_model(model, pipeline="quantize(w=int4,group=16),kv-cache(bits=4)",
                                    generation=lowbit.GenerationSpec(max_length=64, max_batch=2))
    text = " ".join(invoke("inspect", lowbit.save(compiled, tmp_path / "kv", format="lowbit")).output.split())
    said = ("packed KV cache (kv-cache pass) in 1 layer(s): 4-bit codes, keys per channel over 32-token blocks, "
            "values in groups of 32; the first 1 (sink) and last 32 tokens kept float")
    assert "int4 weight ×7" in text and said in text, text


def test_inspect_of_an_onnx_file_without_its_external_data_exits_3(tmp_path):
    """inspect printed a normal summary (exit 0) of a model whose .data side file was missing or cut short."""
    import lowbit
    from lowbit.ir.parser import parse_graph

    text = "graph main(%x: f32[2,64]) {\n  param @w: f32[64,64]\n  %y: f32[2,64] = linear(%x, @w)\n  return %y\n}\n"
    g = parse_graph(text, {"w": torch.randn(64, 64)})  # over save_onnx's 1 KiB: stored in m.onnx.data
    path = lowbit.export(g, tmp_path / "m.onnx", external_data=True)
    assert "1 initializers" in " ".join(invoke("inspect", path).output.split())
    upper = lowbit.export(g, tmp_path / "M.ONNX")  # was exit 2: 'expected ... an .onnx file'
    assert "1 initializers" in " ".join(invoke("inspect", upper).output.split())
    bare = lowbit.export(g, tmp_path / "model")  # ONNX under no suffix: exit 2 too, though export.load reads it
    assert "1 initializers" in " ".join(invoke("inspect", bare).output.split())
    data = tmp_path / "m.onnx.data"
    data.write_bytes(data.read_bytes()[:40])
    assert "is truncated" in invoke("inspect", path, code=3).output
    data.unlink()
    assert "which is missing" in invoke("inspect", path, code=3).output


def test_inspect_of_an_onnx_file_says_how_many_rows_top_left_out(tmp_path):
    """--top cut the ONNX tables (ops, quantized initializers) without a word, where the IR's tables end with
    '... N more': a model with 7 quantized weights listed 2 under --top 2 as if that were all."""
    import lowbit

    compiled = lowbit.compile_model(tiny_llama(hidden=64, inter=128), pipeline="quantize(w=int8)")
    path = lowbit.export(compiled, tmp_path / "m.onnx")
    full = " ".join(invoke("inspect", path, "--top", "100").output.split())
    assert "more" not in full and full.count("│ INT8 │ [") == 7, full
    text = " ".join(invoke("inspect", path, "--top", "2").output.split())
    assert text.count("│ INT8 │ [") == 2 and "... 5 more" in text, text
    import onnx

    ops = len({(n.domain, n.op_type) for n in onnx.load(str(path), load_external_data=False).graph.node})
    assert f"... {ops - 2} more" in text, text


# ---- compile ------------------------------------------------------------------------------------

def test_compile_format_compressed_tensors_loads_in_transformers(compiled_slice, tmp_path):
    """--format compressed-tensors writes an HF directory; transformers runs the same W4A8 slice (its int8
    activation scale is range/128 where lowbit's is range/127, hence cosine, not equality)."""
    from transformers import AutoModelForCausalLM

    import lowbit

    out = tmp_path / "ct"
    invoke("compile", "smollm2:2", "--pipeline", QUANT, "-o", out, "--format", "compressed-tensors", "-q")
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qcfg["format"] == "pack-quantized" and qcfg["config_groups"]["group_0"]["input_activations"]["dynamic"]
    assert json.loads((out / "lowbit-manifest.json").read_text())["format"] == "compressed-tensors"
    ids = torch.arange(1, 33)[None, :]
    ref = lowbit.load(compiled_slice)(ids)  # the lowbit-format output of the same pipeline
    hf = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True).eval()
    with torch.no_grad():
        got = hf(ids).logits
    assert torch.nn.functional.cosine_similarity(got.flatten(), ref.flatten(), dim=0) > 0.999
    # refused before the model is loaded (exit 2) since ca1ae0f: it was the writer's exit 5 after the compile
    res = invoke("compile", "smollm2:2", "--pipeline", QUANT, "-o", tmp_path / "g", "--format", "gptq", code=2)
    assert "quantizes input activations (a=int8)" in res.output and not (tmp_path / "g").exists()
    res = invoke("compile", "smollm2:2", "--pipeline", QUANT, "-o", tmp_path / "x", "--format", "compresed", code=2)
    assert "compressed-tensors" in res.output

@pytest.fixture(scope="module")
def compiled_slice(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "slice"
    res = invoke("compile", "smollm2:2", "--pipeline", QUANT, "-o", out, "--timing",
                 "--print-ir-after", "quantize", "--filter", r"layers\.1\.mlp\.down_proj")
    assert "pass timing" in res.output and "RSS peak" in res.output
    assert "// ----- IR after quantize" in res.output
    printed = res.output.split("// ----- IR after quantize")[1]
    assert "model.layers.1.mlp.down_proj" in printed and "model.layers.0.mlp" not in printed  # --filter
    return out


def test_compile_writes_complete_artefact(compiled_slice):
    from lowbit.backends.torch_backend import TorchCompiled
    from lowbit.cli.artifacts import load_graph
    from lowbit.cli.common import load

    assert sorted(p.name for p in compiled_slice.iterdir()) == [
        "chat_template.jinja", "config.json", "lowbit-manifest.json", "model.lowbit", "params.safetensors",
        "report.json", "tokenizer.json", "tokenizer_config.json"]
    report = json.loads((compiled_slice / "report.json").read_text())
    assert report["files"] == sorted(p.name for p in compiled_slice.iterdir())
    assert report["model"] == "smollm2:2" and report["backend"] == "torch"
    assert [p["name"] for p in report["pipeline"]["passes"]] == ["fold-norms", "dce", "quantize"]
    assert not list(compiled_slice.parent.glob(".slice.*"))  # no temp dirs left beside OUT
    graph, has_weights = load_graph(compiled_slice)
    assert has_weights and graph.op_counts()["dequantize"] >= 14
    # the artefact computes what a fresh compile of the same slice computes
    ids = torch.arange(1, 17)[None, :]
    ref_model = load("smollm2:2").module
    with torch.no_grad():
        float_logits = ref_model(ids)
    out = TorchCompiled(graph)(ids)
    cos = torch.nn.functional.cosine_similarity(out.flatten(), float_logits.flatten(), dim=0)
    assert 0.98 < cos < 1.0  # quantized (not identical), but close to the float slice


def test_compile_minilm_diff_and_failure_leaves_out_untouched(tmp_path):
    res = invoke("compile", "minilm", "--pipeline", "dce,quantize(w=int8)", "--print-ir-diff", "--filter",
                 r"encoder\.layer\.0\.attention\.self\.query", "--print-ir-after-change")
    assert "// ----- IR after quantize(w=int8)" in res.output and "IR after dce" not in res.output
    assert "// dce: no change" in res.output
    # a pass that changed what the filter hides says so (it printed "no change" beside --timing's "yes")
    hidden = invoke("compile", "minilm", "--pipeline", r"quantize(w=int8,modules=layer\.1\.)",
                    "--print-ir-diff", "--filter", r"encoder\.layer\.0\.attention\.self\.query").output
    assert "changed, but not in the lines --filter keeps" in hidden, hidden
    assert "--- before quantize(w=int8)" in res.output and "+++ after quantize(w=int8)" in res.output
    assert re.search(r"^\+.*dequantize\(@encoder\.layer\.0\.attention\.self\.query", res.output, re.M)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    (out / "lowbit-manifest.json").write_text('{"files": {"keep.txt": {}}}')  # an earlier output lowbit may replace
    repro = tmp_path / "repro"
    res = invoke("compile", "minilm", "--pipeline", "fold-norms,test-explode,dce", "-o", out,
                 "--reproducer", repro, "--print-ir-after-all", "--filter", r"^pooler", "--no-verify-each", code=4)
    assert "// ----- IR after fold-norms" in res.output
    assert "test-explode" in res.output and "lowbit replay" in res.output
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt", "lowbit-manifest.json"]  # untouched by the failure
    manifest = json.loads((repro / "reproducer.json").read_text())
    assert manifest["failing_pass"] == "test-explode" and manifest["replay_pipeline"] == "test-explode,dce"
    assert {"before.lowbit", "before.safetensors", "inputs.pt", "error.txt", "pipeline.txt"} <= \
        {p.name for p in repro.iterdir()}
    assert "torch" in manifest["versions"]
    replayed = invoke("replay", repro, code=4)
    assert "reproduced" in replayed.output and "planted failure" in replayed.output
    # the saved IR is the IR after fold-norms (the pass before the failing one ran)
    assert "layer_norm" in (repro / "before.lowbit").read_text()


def test_print_ir_after_a_pass_the_backend_adds():
    """-b onnxruntime runs fuse-qlinear after the pipeline (with the same instruments), but --print-ir-after
    fuse-qlinear was refused: 'the pipeline has no fuse-qlinear pass (it runs quantize)'."""
    res = invoke("compile", "minilm", "-p", "quantize(w=int8)", "-b", "onnxruntime", "--print-ir-after",
                 "fuse-qlinear", "--filter", r"encoder\.layer\.0\.attention\.self\.query", "-q")
    printed = res.output.split("// ----- IR after fuse-qlinear")[1]
    assert "qlinear(" in printed, res.output


def test_inspect_and_graph(compiled_slice, tmp_path):
    res = invoke("inspect", compiled_slice)
    assert "quantized tensors" in res.output and "int4" in res.output and "int8 activation" in res.output
    html_file, dot_file = tmp_path / "g.html", tmp_path / "g.dot"
    invoke("graph", compiled_slice, "--format", "html", "-o", html_file)
    invoke("graph", compiled_slice / "model.lowbit", "--format", "dot", "-o", dot_file)
    page = html_file.read_text()
    assert "<details" in page and "model.layers.1.mlp" in page and "<script" not in page
    dot = dot_file.read_text()
    assert dot.startswith("digraph") and 'subgraph "cluster_model.layers.0"' in dot
    assert "did you mean 'dot'" in invoke("graph", compiled_slice, "--format", "dott", code=2).output


def test_graph_of_an_output_directory_writes_beside_it(compiled_slice):
    """lowbit graph OUT wrote OUT/model.html, a file lowbit's manifest does not list, so the next
    `lowbit compile ... -o OUT` refused to replace OUT (exit 2): README's compile / inspect / graph loop broke."""
    before = sorted(p.name for p in compiled_slice.iterdir())
    res = invoke("graph", compiled_slice, "--format", "dot")
    target = compiled_slice.parent / f"{compiled_slice.name}.dot"
    assert target.read_text().startswith("digraph") and str(target) in " ".join(res.output.split())
    assert sorted(p.name for p in compiled_slice.iterdir()) == before
    from lowbit.checkpoint.files import not_replaceable

    assert not_replaceable(compiled_slice) is None


# ---- debug compare / bisect / sensitivity --------------------------------------------------------

def test_debug_compare_smollm2_slice(tmp_path):
    js, page = tmp_path / "cmp.json", tmp_path / "cmp.html"
    res = invoke("debug", "compare", "smollm2:2", "--pipeline", QUANT, *SMALL, "--json", js, "--html", page)
    assert "per-layer SQNR" in res.output
    data = json.loads(js.read_text())
    stages = {s["spec"]: s for s in data["stages"]}
    assert list(stages["float"]["layers"]) == ["model.layers.0", "model.layers.1"]
    assert stages["fold-norms"]["layers"]["model.layers.1"]["sqnr_db"] > 80  # exact pass: float rounding only
    q = stages["quantize(w=int4,group=64,a=int8)"]
    assert 5 < q["layers"]["model.layers.1"]["sqnr_db"] < 40 and q["metric"] > stages["float"]["metric"]
    html_text = page.read_text()
    assert html_text.count("<svg") == 2 and "http" not in html_text.replace("http://www.w3.org/2000/svg", "")


def test_python_api_takes_the_cli_slice_spec():
    """``NAME:N`` works in lowbit.compile_model as in every CLI command (it was 'no such file or directory')."""
    import lowbit

    compiled = lowbit.compile_model("smollm2:2", pipeline="quantize(w=int8)")
    assert sorted({n.module.split(".")[2] for n in compiled.graph.nodes if n.op == "linear" and
                   n.module.startswith("model.layers.")}) == ["0", "1"]
    with pytest.raises(ValueError, match=r"'smollm2:99': the model has only 30 layers"):
        lowbit.compile_model("smollm2:99")


def test_compile_of_a_compiled_output_says_so(compiled_slice):
    """A `lowbit compile -o` directory given as the model: it is already compiled (it said 'has a config.json but
    no weights')."""
    res = invoke("compile", compiled_slice, "-p", "dce", code=2)
    assert "is a compiled lowbit model (model.lowbit), not a float model to compile" in res.output


def test_debug_compare_marks_removed_blocks_not_comparable():
    """A block a pass removed has no output to compare: its cell reads n/a, not inf (which means exact)."""
    res = invoke("debug", "compare", "smollm2:2", "--pipeline", "prune-blocks(blocks=[model.layers.1])", *SMALL)
    row = next(line for line in res.output.splitlines() if line.lstrip("│ ").startswith("model.layers.1"))
    assert "n/a" in row and "inf" not in row, res.output
    row0 = next(line for line in res.output.splitlines() if line.lstrip("│ ").startswith("model.layers.0") and
                "│" in line and "prune" not in line)
    assert "inf" in row0  # the block before it is untouched: exact


def test_debug_compare_turns_a_rotated_residual_stream_back_for_its_per_layer_errors(tmp_path):
    """After an exact rotate the block outputs are the float ones in another basis (x Q): compared as they are they
    read -3 dB (every layer the 'worst'), and were then shown n/a for every later pass, so a rotated pipeline had no
    per-layer errors at all. They are turned back with the Q rotate records: exact after rotate, and after a
    quantize the same numbers as the hand computation (x Q Q^T against the float block output)."""
    from lowbit.cli.common import capture_model, load
    from lowbit.cli.probes import make_inputs, run_probe
    from lowbit.instruments import compare_outputs
    from lowbit.passes.manager import PassManager

    res = invoke("debug", "compare", "smollm2:2", "--pipeline", "fold-norms,rotate,quantize(w=int4,group=64)", *SMALL,
                 "--json", js := tmp_path / "c.json", "--html", tmp_path / "c.html")
    page = (tmp_path / "c.html").read_text()
    assert "residual stream rotated" not in page and "rotate: n/a dB" not in page  # the legend and the cells agree
    stages = json.loads(js.read_text())["stages"]
    assert stages[2]["spec"] == "rotate" and stages[2]["layers"]
    assert all(v["sqnr_db"] is None or v["sqnr_db"] > 100 for v in stages[2]["layers"].values())
    row = next(line for line in res.output.splitlines() if line.lstrip("│ ").startswith("model.layers.0"))
    assert "n/a" not in row and "-3." not in row, res.output
    model = load("smollm2:2")
    inputs = make_inputs(model, windows=2, seq_len=32)
    graph = capture_model(model)
    ref = run_probe(graph, inputs)
    PassManager("fold-norms,rotate,quantize(w=int4,group=64)").run(graph)
    q = graph.meta["residual_rotation"].double()
    out = run_probe(graph, inputs).layers["model.layers.1"].double() @ q.T
    want = compare_outputs(ref.layers["model.layers.1"], out)
    assert stages[3]["layers"]["model.layers.1"]["sqnr_db"] == pytest.approx(want["sqnr_db"], abs=1e-6)
    assert 10 < want["sqnr_db"] < 40  # int4 weights: a real error, not the -3 dB of a basis mismatch


def test_dtype_option_loads_the_model_in_that_dtype(tmp_path):
    """The CLI had no --dtype: every model was compiled in float32, so the triton backend (16-bit kernels) ran every
    op on its reference path. --dtype bfloat16 loads (and captures) the model in bfloat16; a dtype it does not take
    is refused before any model is read, and an already compiled model refuses it by name."""
    from lowbit.cli.artifacts import load_graph
    from lowbit.data.model_files import load_tokenizer

    torch.manual_seed(0)
    tiny_llama(vocab=49152).save_pretrained(tmp_path / "tiny")
    load_tokenizer("smollm2").save_pretrained(tmp_path / "tiny")
    out = tmp_path / "bf16"
    invoke("compile", tmp_path / "tiny", "-p", "dce", "--dtype", "bfloat16", "-o", out, "-q")
    graph, _ = load_graph(out)
    assert graph.inputs[0].type.dtype == torch.int64
    assert {v.type.dtype for k, v in graph.params.items() if k.endswith(".weight")} == {torch.bfloat16}
    assert "bf16[" in (out / "model.lowbit").read_text()
    for cmd in (["compile", "smollm2:1"], ["generate", "smollm2:1", "--prompt", "hi"],
                ["debug", "compare", "smollm2:1"], ["debug", "bisect", "smollm2:1"],
                ["debug", "sensitivity", "smollm2:1"]):
        res = invoke(*cmd, "--dtype", "float64", code=2)
        assert "--dtype 'float64': give one of float32, bfloat16, float16" in res.output, res.output
    res = invoke("generate", out, "--prompt", "hi", "--dtype", "float16", code=2)
    assert "is already compiled, in the dtype it was compiled in" in res.output, res.output


@pytest.mark.slow  # ~12 s on two loaded cores (tokenizer save, capture); the note's text: the test below
@pytest.mark.skipif(not (os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()),
                    reason="the triton backend needs CUDA or the interpreter")
def test_generate_on_triton_names_the_nodes_on_the_reference_path(tmp_path):
    """``lowbit generate -b triton`` printed no lowering report: an attention the decode kernel cannot take (head_dim
    24 here; 80 on Phi-2) ran torch's SDPA at every step without a word. It now notes those nodes on stderr, by
    reason, as ``lowbit compile`` lists them."""
    from lowbit.data.model_files import load_tokenizer

    torch.manual_seed(0)
    tiny_llama(hidden=48, inter=64, heads=2, kv_heads=1).save_pretrained(tmp_path / "tiny")  # vocab 61: '!' is 17
    load_tokenizer("smollm2").save_pretrained(tmp_path / "tiny")
    device = ["--device", "cuda"] if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else []
    res = invoke("generate", tmp_path / "tiny", "-b", "triton", "--dtype", "bfloat16", "-p", "dce", "--prompt", "!",
                 "-n", "2", "--max-length", "16", *device)
    assert ("note: 1 node runs its reference path on this backend:\n"
            "  1x decode-sdpa: head_dim 24 (a power of two <= 256, contiguous)") in res.output, res.output


@pytest.mark.skipif(not (os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()),
                    reason="the triton backend needs CUDA or the interpreter")
def test_generate_notes_a_triton_lowerings_reference_nodes_by_reason(monkeypatch):
    """What ``generate`` prints of a triton lowering (``_note_reference_nodes``): the reference nodes counted by
    reason; nothing for a lowering with none, or a runner without a report (torch, onnxruntime)."""
    import io

    from rich.console import Console

    import lowbit.cli.main as cli_main
    from lowbit.backends.triton_backend import lower
    from lowbit.ir.parser import parse_graph

    out = io.StringIO()
    monkeypatch.setattr(cli_main, "err_console", Console(file=out, width=200))
    text = """graph g(%q: bf16[1,2,1,{d}], %k: bf16[1,1,9,{d}], %v: bf16[1,1,9,{d}], %m: bool[1,1,1,9]) {{
  %a: bf16[1,2,1,{d}] = attention(%q, %k, %v, %m, enable_gqa=True)  # attn
  %b: bf16[1,2,1,{d}] = attention(%a, %k, %v, %m, enable_gqa=True)  # attn2
  return %b
}}"""
    dev = "cuda" if torch.cuda.is_available() else "cpu"

    def step_graph(d: int):  # only generation step graphs send attention to decode-sdpa (6c1d14e)
        g = parse_graph(text.format(d=d), {})
        g.meta["generation"] = {"logits": "last"}
        return g

    cli_main._note_reference_nodes(lower(step_graph(24), dev, compile=False))
    assert out.getvalue() == ("note: 2 nodes run their reference path on this backend:\n"
                              "  2x decode-sdpa: head_dim 24 (a power of two <= 256, contiguous)\n")
    out.truncate(0)
    cli_main._note_reference_nodes(lower(step_graph(32), dev, compile=False))
    cli_main._note_reference_nodes(object())
    assert out.getvalue() == ""


@pytest.mark.parametrize("fmt, pipeline, message", [
    ("hf", "prune-mlp(ratio=0.25),quantize(w=int4,group=32)",
     "format 'hf' writes float weights, but pass quantize(w=int4,group=32) quantizes the model"),
    ("hf", "gptq(w=int8)", "but pass gptq(w=int8) quantizes the model"),
    ("compressed-tensors", "fold-norms,dce", "format 'compressed-tensors' describes quantized linears, and the "
                                             "pipeline (fold-norms, dce) quantizes none"),
    ("gptq", "prune-mlp(ratio=0.25)", "format 'gptq' describes quantized linears"),
    ("compressed-tensors", "fold-norms,rotate,quantize(w=int4,group=64)",
     "pass rotate inserts online Hadamard rotations (online=true before down_proj), which format "
     "'compressed-tensors' has no field for"),
    ("gptq", "fold-norms,rotate(online=false,online_o=true),gptq(w=int4,sym=true)",
     "online_o=true before o_proj), which format 'gptq' has no field for"),
    ("hf", "fold-norms,rotate(kind=random)", "use rotate(online=false,online_o=false), whose rotations fold into "
                                             "the weights, or write --format lowbit"),
    ("compressed-tensors", "fold-norms,rotate(online=false),quantize(w=int4,group=64,kv=int4,kv_group=64)",
     "pass quantize(w=int4,group=64,kv=int4,kv_group=64) quantizes the KV cache, which format 'compressed-tensors' "
     "cannot hold"),
    ("gptq", "gptq(w=int4,group=64)", "pass gptq(group=64) quantizes weights asymmetrically (sym=false, its "
                                      "default), and format 'gptq' holds symmetric weights only: add sym=true"),
    ("gptq", "quantize(w=int8,a=int8)", "pass quantize(w=int8,a=int8) quantizes input activations (a=int8), and "
                                        "format 'gptq' is weight-only"),
    ("gptq", "fold-norms,rotate(online=false),awq(w=fp8e4m3)", "format 'gptq' holds int4/int8 weights only"),
    ("gptq", "gptq(w=int4,sym=true),quantize(kv=int8)", "pass quantize(kv=int8) quantizes the KV cache, which "
                                                        "format 'gptq' cannot hold"),
    ("compressed-tensors", "quantize(w=int4,group=64,a=int8,a_clip=0.9)", "pass quantize(w=int4,group=64,a=int8,"
     "a_clip=0.9) clips the dynamic input scales to 0.9 of the range, which format 'compressed-tensors' has no field "
     "for: drop a_clip, or write --format lowbit"),
    ("hf", "prune-mlp(ratio=0.25,allocation=global)", "pass prune-mlp(ratio=0.25,allocation=global) prunes each "
     "layer by its own amount (allocation=global), and format 'hf' writes one MLP width for all layers in "
     "config.json: use allocation=uniform, or write --format lowbit"),
])
def test_hf_format_refusals_the_pipeline_shows_come_before_the_compile(tmp_path, monkeypatch, fmt, pipeline, message):
    """`lowbit compile -f hf` with a quantizing pipeline (or -f compressed-tensors/gptq with none or with a quantized KV
    cache or clipped input scales, or -f gptq with asymmetric, non-int4/int8 or activation quantization, or any HF
    format after a rotate that leaves online Hadamards) loaded the model, captured, calibrated and compiled, then the
    checkpoint writer refused. What the pipeline already shows is refused
    first (exit 2), before any model is read."""
    monkeypatch.setattr("lowbit.models.load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    res = invoke("compile", "smollm2:1", "-p", pipeline, "-f", fmt, "-o", tmp_path / "out", code=2)
    out = " ".join(res.output.split())
    assert f"cannot write --format {fmt}: " in out and message in out, res.output
    assert not (tmp_path / "out").exists()


def test_generate_max_length_help_says_its_default_follows_the_model():
    """--max-length's help said 'default: 512'; a model with fewer positions gets its own length (and a longer
    --max-length is refused)."""
    res = CliRunner().invoke(app, ["generate", "--help"], env={"COLUMNS": "240"})
    out = " ".join(res.output.replace("│", " ").split())
    assert ("at most the model's max_position_embeddings (default: 512, or that when smaller; the longest prompt + "
            "-n where that is more)") in out, out


def test_nan_and_infinite_errors_rank_worst_in_every_debug_ranking():
    """'NaN ranks worst' was written three ways: compare's table let an infinite error (SQNR -inf) tie with a NaN
    (the first listed won) and named a 'worst layer' (SQNR inf) for a stage that changed no layer, where the HTML
    report said '-'; sensitivity let a +inf damage tie with a NaN. One rule now: NaN, then infinite, then finite
    worst to best, and an unchanged stage has no worst layer, in the terminal table, the HTML and sensitivity."""
    from rich.console import Console

    from lowbit.cli.compare import CompareResult, Stage, summary_table
    from lowbit.cli.report_html import render_report
    from lowbit.cli.sensitivity import ranked

    nan, inf = float("nan"), float("inf")

    def layers(*sqnr):
        return {f"model.layers.{i}": {"sqnr_db": v, "cosine": 1.0, "max_abs": 0.0} for i, v in enumerate(sqnr)}

    out = {"sqnr_db": 20.0, "cosine": 0.9, "max_abs": 1.0}
    stages = [Stage(-1, "float", False, 0.0, 10.0, out, layers(inf, inf, inf)),
              Stage(0, "p-ninf", True, 0.0, 11.0, out, layers(30.0, -inf, nan)),
              Stage(1, "p-fin", True, 0.0, 11.0, out, layers(inf, 12.0, 3.0))]
    res = CompareResult("m", "p", "in", "ppl", stages, 0.0)
    console = Console(width=400, record=True)
    console.print(summary_table(res))
    rows = {line.split("│")[2].strip(): [c.strip() for c in line.split("│")]
            for line in console.export_text().splitlines() if line.count("│") > 8}
    assert rows["float"][6] == "-" and rows["p-ninf"][6] == "model.layers.2" and rows["p-fin"][6] == "model.layers.2"
    stages[1].layers = layers(30.0, 40.0, nan)
    html = render_report(res.to_dict(finite=False)).split("<h2>")[1]
    cells = {r.split("<code>")[1].split("</code>")[0]: r for r in html.split("<tr>") if "<code>" in r}
    assert "<td>-</td>" in cells["float"] and "model.layers.2" in cells["p-ninf"] and "model.layers.2" in cells["p-fin"]
    damage = [{"module": "a", "damage": 0.5}, {"module": "b", "damage": inf}, {"module": "c", "damage": nan},
              {"module": "d", "damage": 2.0}, {"module": "e", "damage": -inf}]
    assert [r["module"] for r in ranked(damage)] == ["c", "b", "d", "a", "e"]


def test_compare_html_report_draws_a_layer_whose_output_overflowed():
    """A layer output that overflowed to inf has SQNR -inf dB: the HTML report raised OverflowError (the line chart's
    axis floor), and the heat map's colour scale, floored at -inf, painted every finite cell full green."""
    from lowbit.cli.compare import CompareResult, Stage
    from lowbit.cli.report_html import render_report

    def layers(*sqnr):
        return {f"model.layers.{i}": {"sqnr_db": v, "cosine": 1.0, "max_abs": 0.0} for i, v in enumerate(sqnr)}

    out = {"sqnr_db": 20.0, "cosine": 0.9, "max_abs": 1.0}
    stages = [Stage(-1, "float", False, 0.0, 10.0, out, layers(float("inf"), float("inf"))),
              Stage(0, "overflowing", True, 0.0, 11.0, out, layers(10.0, float("-inf"))),
              Stage(1, "fine", True, 0.0, 11.0, out, layers(40.0, 60.0))]
    page = render_report(CompareResult("m", "p", "in", "ppl", stages, 0.0).to_dict(finite=False))
    assert "-∞ dB</b> block outputs after #0 <code>overflowing</code>" in page
    cells = {title: fill for fill, title in re.findall(r'fill="([^"]+)"><title>([^<]+)</title>',
                                                       page.split('aria-label="heat map')[1])}
    red, green = "rgb(215,48,80)", "rgb(65,198,80)"  # the scale's ends: 10 dB (the lowest finite) and 60 dB
    assert cells["model.layers.1 after overflowing: -∞ dB"] == red
    assert cells["model.layers.0 after overflowing: 10.0 dB"] == red
    assert cells["model.layers.1 after fine: 60.0 dB"] == green
    assert cells["model.layers.0 after fine: 40.0 dB"] not in (red, green)


def test_debug_compare_shows_a_nan_output_as_nan(tmp_path):
    """A pass that made block 1's output NaN read 'n/a' in the terminal (the caption: 'not comparable ... removed the
    block') and, in the HTML report, '∞' everywhere (NaN and inf were both null there): identical to float."""
    page = tmp_path / "r.html"
    res = invoke("debug", "compare", "smollm2:2", "--pipeline", "test-plant-nan", *SMALL, "--html", page)
    row = next(line for line in res.output.splitlines() if line.lstrip("│ ").startswith("model.layers.1"))
    assert "nan" in row and "n/a" not in row and "not comparable" not in res.output, res.output
    worst = next(line for line in res.output.splitlines() if "test-plant-nan" in line and "│ 0" in line)
    assert "model.layers.1" in worst, res.output  # the NaN layer is the worst one
    text = page.read_text()
    per_pass = text.split("<h2>Per pass</h2>")[1].split("</table>")[0]
    nan_row = next(r for r in per_pass.split("<tr>") if "test-plant-nan" in r)
    assert "∞" not in nan_row and "NaN" in nan_row, nan_row
    assert "NaN / NaN" in text.split("<h2>Per-layer numbers")[1] and "#000000" in text


def test_debug_tools_refuse_a_tokenizer_that_does_not_fit_the_model(tmp_path):
    """A model directory whose tokenizer is another model's (ids past its config.vocab_size) ended debug compare and
    bisect in the torch backend's InputError traceback (exit 1) on the float reference run."""
    from lowbit.models import load_smollm2_tokenizer

    tiny_llama(layers=2).save_pretrained(tmp_path / "tiny")  # vocab 61
    load_smollm2_tokenizer().save_pretrained(tmp_path / "tiny")
    for cmd in ("compare", "bisect"):
        res = invoke("debug", cmd, tmp_path / "tiny", "-p", "quantize(w=int4,group=32)", "--windows", "1",
                     "--seq-len", "16", code=3)
        assert "outside the model's vocabulary of 61" in res.output, res.output


def test_debug_bisect_hint_quotes_a_model_path_with_a_space(tmp_path):
    """The 'lowbit compile MODEL --pipeline ... --reproducer DIR' hint of a pass failing under bisect wrote the model
    path bare: a directory with a space in its name split into two arguments when pasted."""
    import shlex

    from lowbit.models import load_smollm2_tokenizer

    model = tmp_path / "my model"
    tiny_llama(vocab=49152).save_pretrained(model)
    load_smollm2_tokenizer().save_pretrained(model)
    res = invoke("debug", "bisect", model, "-p", "quantize(w=int4,group=100)", "--windows", "1", "--seq-len", "16",
                 code=4)
    hint = " ".join(res.output.split()).split("(`", 1)[1].split("`", 1)[0]
    words = shlex.split(hint)
    assert words[:3] == ["lowbit", "compile", str(model)], hint


def test_debug_sensitivity_of_an_encoder_shows_no_percentage_of_a_zero_baseline(tmp_path):
    """The encoders' metric (1 - cosine) is 0 for the float model up to rounding, and each damage was also printed
    relative to it: '+0.0292 (-6575409664623125.0%)'."""
    res = invoke("debug", "sensitivity", "minilm", "--scheme", "w4a8", "--sentences", "4", "-o", tmp_path / "s.json")
    rows = [line for line in res.output.splitlines() if "encoder.layer." in line]
    assert len(rows) == 6 and not any("%" in row for row in rows), res.output
    # the values are 1 - cosine: labelled "cos", the title read "float cos 0.00000, all quantized 0.00926"
    assert "float 1 - cos 0.00000" in " ".join(res.output.split()) and "1 - cos" in res.output.split("rank")[1]


def test_debug_bisect_of_an_encoder_labels_its_metric_one_minus_cosine():
    """bisect logged 'float baseline cos 0.00000' and each probe 'cos 0.08311 BAD': a cosine of 0 for the float
    model; the values are 1 - cosine, and say so."""
    res = invoke("debug", "bisect", "minilm:1", "--pipeline", "quantize(a=int4)", "--sentences", "2",
                 "--max-increase", "0.001")
    out = " ".join(res.output.split())
    assert "float baseline 1 - cos 0.00000; threshold 0.00100" in out and "(1 - cos, threshold 0.00100)" in out
    assert re.search(r"all 1 passes 1 - cos 0\.\d+ BAD", out), res.output


def test_debug_compare_minilm():
    res = invoke("debug", "compare", "minilm", "--pipeline", "quantize(w=int8,a=int8)", "--sentences", "4")
    assert "encoder.layer.5" in res.output and "1 - emb. cosine" in res.output


def test_debug_compare_of_an_encoder_measures_its_blocks_on_real_tokens_not_padding(tmp_path):
    """A block's error in the JSON is the hand computation over the sentences' real tokens: int4 RTN of block 0's
    weights (scale amax/7 per output channel) put into the HF model, its hidden_states[1] against the float one's
    at the tokens the attention mask keeps. Padding (the shorter sentences' rows) is no part of the embedding."""
    from lowbit.cli.common import load
    from lowbit.cli.probes import make_inputs

    js = tmp_path / "c.json"
    invoke("debug", "compare", "minilm:1", "-p", r"quantize(w=int4,modules=^encoder\.layer\.0\.)", "--sentences",
           "4", "-q", "--json", js)
    got = json.loads(js.read_text())["stages"][-1]["layers"]["encoder.layer.0"]
    model = load("minilm:1")
    ids, mask = make_inputs(model, n_sentences=4).args
    assert not mask.all()  # padded: what this test is about
    bert = model.module.encoder
    with torch.no_grad():
        ref = bert(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[1]
        saved = {}
        for name, lin in bert.encoder.layer[0].named_modules():
            if isinstance(lin, torch.nn.Linear):
                w = saved[name] = lin.weight.detach().clone()
                scale = w.abs().amax(dim=1, keepdim=True) / 7
                lin.weight.copy_(torch.round(w / scale).clamp(-8, 7) * scale)
        try:
            out = bert(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[1]
        finally:
            for name, lin in bert.encoder.layer[0].named_modules():
                if name in saved:
                    lin.weight.copy_(saved[name])
    real = mask.bool()
    r, o = ref[real].double(), out[real].double()
    sqnr = 10 * torch.log10(r.pow(2).mean() / (o - r).pow(2).mean()).item()
    assert got["sqnr_db"] == pytest.approx(sqnr, abs=0.01)
    assert got["max_abs"] == pytest.approx((o - r).abs().max().item(), rel=1e-3)


def test_debug_tools_find_gpt2_blocks_as_calibration_does():
    """GPT-2's blocks are transformer.h.N: debug compare printed an empty per-layer table, bisect said there were no
    blocks to bisect over and sensitivity refused the model, while GPTQ calibrated the same blocks one by one. The
    block outputs the tools compare are the residual stream HF reports between blocks."""
    from conftest import tiny_outside_family

    from lowbit.calibration.engine import split_stages
    from lowbit.cli.probes import EvalInputs, run_probe
    from lowbit.cli.restrict import block_units
    from lowbit.ir.capture import capture
    from lowbit.models import CausalLMLogits

    model = tiny_outside_family("gpt2", layers=3)
    ids = torch.randint(0, 128, (1, 16))
    graph = capture(CausalLMLogits(model).eval(), (ids,))
    names = [f"transformer.h.{i}" for i in range(3)]
    assert [u.name for u in block_units(graph)] == names
    assert [s.name for s in split_stages(graph) if s.kind == "block"] == names
    probe = run_probe(graph, EvalInputs("causal-lm", (ids,), "random ids"))
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states
    assert list(probe.layers) == names
    for i in range(2):  # HF's last hidden state has ln_f applied; the block's output does not
        torch.testing.assert_close(probe.layers[names[i]], hidden[i + 1])


def test_debug_bisect_names_planted_pass_and_layer(tmp_path):
    js = tmp_path / "bisect.json"
    res = invoke("debug", "bisect", "smollm2:2", "--pipeline", "fold-norms,test-plant-bad,dce", *SMALL,
                 "--max-increase", "5%", "--json", js)
    data = json.loads(js.read_text())
    assert data["culprit_pass"] == "test-plant-bad" and data["culprit_index"] == 1
    assert data["culprit_layers"] == ["model.layers.1"]
    assert "reproduce with" in res.output and "test-plant-bad(modules=" in data["reproduce"]
    # the printed command really reproduces the damage
    repro_pipeline = re.search(r"--pipeline '([^']+)'", data["reproduce"]).group(1)
    rerun = tmp_path / "rerun.json"
    invoke("debug", "compare", "smollm2:2", "--pipeline", repro_pipeline, *SMALL, "--json", rerun)
    final = json.loads(rerun.read_text())["stages"][-1]["metric"]
    assert final > data["threshold"]


def test_debug_bisect_takes_a_nan_metric_as_past_the_threshold(tmp_path):
    """A pass that makes the output NaN read 'ppl nan ok' (NaN > threshold is False): bisect exited 6, 'the whole
    pipeline stays within the threshold'. NaN is now bad, so the pass and the block are found."""
    js = tmp_path / "b.json"
    res = invoke("debug", "bisect", "smollm2:2", "--pipeline", "dce,test-plant-nan,dce", *SMALL, "--json", js)
    data = json.loads(js.read_text())
    assert data["culprit_pass"] == "test-plant-nan" and data["culprit_layers"] == ["model.layers.1"], res.output
    assert "ppl nan BAD" in res.output


def test_debug_bisect_refuses_to_name_a_culprit_when_a_pass_is_not_deterministic():
    """A pass that wrecked the model on one run and not the next made the full pipeline bad and every prefix fine,
    so bisect named the innocent last pass ('culprit pass #2 dce', exit 0). The verdict is now re-checked and a
    flipped one exits 4 naming the pipeline."""
    Flaky.runs = 0
    res = invoke("debug", "bisect", "smollm2:2", "--pipeline", "dce,test-flaky,dce", *SMALL, code=4)
    out = " ".join(res.output.split())
    # the kept prefixes come from the run where test-flaky wrecked the model, so the pipeline named ends at it
    assert "is not deterministic" in out and "'dce,test-flaky'" in out and "culprit pass" not in out, out


def test_debug_bisect_pass_without_module_option_reports_pass_only():
    res = invoke("debug", "bisect", "smollm2:2", "--pipeline", "fold-norms,test-scale-all", *SMALL)
    assert "#1 test-scale-all" in res.output and "no 'modules'" in res.output
    assert "culprit layers" not in res.output


def test_debug_bisect_within_threshold_exits_6():
    res = invoke("debug", "bisect", "smollm2:2", "--pipeline", "fold-norms,dce", *SMALL, code=6)
    assert "nothing to bisect" in res.output


def test_debug_sensitivity_and_compile_overrides(tmp_path):
    overrides = tmp_path / "sens.json"
    invoke("debug", "sensitivity", "smollm2:2", "--scheme", "w4a8", "--group", "64", *SMALL, "-o", overrides)
    data = json.loads(overrides.read_text())
    assert data["format"] == "lowbit-overrides/1" and len(data["ranking"]) == 2
    assert data["ranking"][0]["damage"] >= data["ranking"][1]["damage"]
    kept = data["keep_float"]
    assert kept == [data["ranking"][0]["glob"]]
    out = tmp_path / "mixed"
    invoke("compile", "smollm2:2", "--pipeline", "quantize(w=int4,group=64,a=int8)", "--overrides", overrides,
           "-o", out)
    report = json.loads((out / "report.json").read_text())
    stats = report["pipeline"]["passes"][0]["stats"]
    assert stats["weights_quantized"] == 7  # one of the two blocks (7 linears each) kept float
    text = (out / "model.lowbit").read_text()
    kept_block = kept[0].rstrip(".*")
    assert not re.search(rf"dequantize\(@{re.escape(kept_block)}\.", text)


def test_debug_sensitivity_of_a_pruning_scheme_feeds_compile_overrides(tmp_path):
    """The follow-up command ``debug sensitivity`` prints for a pruning scheme works: sparsify takes ``keep``
    (the damaged layers stay dense); it was refused with 'no pass in the pipeline can keep modules float'."""
    overrides = tmp_path / "sens.json"
    res = invoke("debug", "sensitivity", "smollm2:2", "--scheme", "sparsify(method=magnitude,pattern=2:4)", *SMALL,
                 "-o", overrides)
    follow = re.search(r"lowbit compile smollm2:2 --pipeline '([^']+)' --overrides", res.output)
    assert follow is not None, res.output
    kept = json.loads(overrides.read_text())["keep_float"]
    out = tmp_path / "sparse"
    invoke("compile", "smollm2:2", "--pipeline", follow.group(1), "--overrides", overrides, "-o", out)
    stats = json.loads((out / "report.json").read_text())["pipeline"]["passes"][0]["stats"]
    from lowbit.cli.artifacts import load_graph

    graph, _ = load_graph(out)
    kept_block = kept[0].rstrip(".*")
    for node in (n for n in graph.nodes if n.op == "linear" and n.module.startswith("model.layers.")):
        w = node.args[1].data
        assert (w == 0).float().mean().item() < 0.1 if node.module.startswith(kept_block + ".") else \
            (w.reshape(-1, 4) == 0).sum(1).ge(2).all(), (node.module, stats)
    bad = CliRunner().invoke(app, ["compile", "smollm2:2", "--pipeline",  # a keep glob matching nothing: an error
                                   "sparsify(method=magnitude,pattern=2:4,keep=[nope.*])", "-o", str(tmp_path / "bad")])
    assert bad.exit_code != 0 and "option keep: 'nope.*' matches no linear this pass would prune" in bad.output


def test_debug_sensitivity_prints_a_command_the_shell_reads_back(tmp_path):
    """The follow-up command was written as --pipeline '{pipe}' --overrides {out}: a quoted option value holding a
    double quote (spec() then quotes with ') or an output path with a space split into other words."""
    import shlex

    out = tmp_path / "my dir" / "s.json"
    res = invoke("debug", "sensitivity", "smollm2:2", "--scheme", "w4", "--pipeline", "fold-norms(modules='layers|\"')",
                 *SMALL, "-o", out)
    line = next(ln for ln in res.output.splitlines() if "lowbit compile" in ln)
    words = shlex.split(line)
    assert words[words.index("--overrides") + 1] == str(out), line
    pipe = words[words.index("--pipeline") + 1]
    assert pipe == "fold-norms(modules='layers|\"'),quantize(w=int4)", line


def test_debug_sensitivity_warns_when_keep_top_keeps_every_unit(tmp_path, monkeypatch):
    """--keep-top 5 on a 2-block model wrote an override keeping both blocks float and printed the compile command
    as if it quantized something: that compile quantizes no block at all."""
    from lowbit.cli import sensitivity

    rows = [{"module": f"model.layers.{i}", "glob": f"model.layers.{i}.*", "metric": 40.0 - i, "damage": 2.0 - i}
            for i in range(2)]
    monkeypatch.setattr(sensitivity, "sensitivity", lambda *a, **k: {
        "format": sensitivity.OVERRIDES_FORMAT, "model": "smollm2:2", "scheme": "w4", "quantize": "quantize(w=int4)",
        "prefix": "", "granularity": "block", "metric": "ppl", "inputs": "-", "baseline": 38.0,
        "all_quantized": 42.0, "ranking": rows, "seconds": 0.0})
    out = " ".join(invoke("debug", "sensitivity", "smollm2:2", "--scheme", "w4", "--keep-top", "5", "-o",
                          tmp_path / "s.json").output.split())
    assert "warning: --keep-top 5 keeps all 2 blocks float" in out and "give --keep-top 1 or less" in out, out
    assert json.loads((tmp_path / "s.json").read_text())["keep_float"] == ["model.layers.0.*", "model.layers.1.*"]
    out = invoke("debug", "sensitivity", "smollm2:2", "--scheme", "w4", "--keep-top", "1", "-o",
                 tmp_path / "s.json").output
    assert "warning" not in out, out


def test_debug_tools_restrict_a_scoped_pass_to_the_blocks_its_scope_reaches(tmp_path):
    """A pass given modules=layers\\.1\\. restricted to block 0 had a scope matching no module, which the
    PassManager refuses: sensitivity stopped at the first block with exit 4, and bisect's halving did too."""
    pipeline = r"quantize(w=int2,modules=layers\.1\.)"
    out = tmp_path / "s.json"
    invoke("debug", "sensitivity", "smollm2:2", "--scheme", pipeline, *SMALL, "-o", out)
    assert [r["module"] for r in json.loads(out.read_text())["ranking"]] == ["model.layers.1"]
    js = tmp_path / "b.json"
    invoke("debug", "bisect", "smollm2:2", "--pipeline", f"dce,{pipeline}", *SMALL, "--max-increase", "0.1%",
           "--json", js)
    data = json.loads(js.read_text())
    assert data["culprit_index"] == 1 and data["culprit_layers"] == ["model.layers.1"], data


def test_debug_sensitivity_ranks_a_unit_that_turns_the_output_nan_first(tmp_path):
    """A NaN damage was sorted as NaN: the block that poisons the output kept its place (here last) instead of
    heading the ranking the override file's keep_float is cut from."""
    out = tmp_path / "s.json"
    invoke("debug", "sensitivity", "smollm2:2", "--scheme", "test-plant-nan(layer=1)", *SMALL, "-o", out)
    assert [r["module"] for r in json.loads(out.read_text())["ranking"]] == ["model.layers.1", "model.layers.0"]


def test_debug_sensitivity_of_a_structured_cut_prints_no_overrides_command(tmp_path):
    """prune-mlp has no keep option: compile --overrides would refuse the file ('no pass in the pipeline can keep
    modules'), so sensitivity ranks the layers, labels them as pruned, and prints no follow-up command."""
    out = tmp_path / "s.json"
    res = invoke("debug", "sensitivity", "smollm2:2", "--scheme", "prune-mlp(ratio=0.25,score=magnitude)", *SMALL,
                 "-o", out)
    text = " ".join(res.output.split())
    assert "lowbit compile" not in text and "keep float" not in text and "all quantized" not in text
    assert "all pruned" in text and "prune-mlp has no keep option" in text and "modules=" in text
    data = json.loads(out.read_text())
    assert data["keep_float"] == [] and len(data["ranking"]) == 2


# ---- the HTML report in a real browser ----------------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install -y chromium)")
def test_html_report_renders_in_headless_chromium(tmp_path):
    from lowbit.cli.report_html import render_report

    stages = [{"index": -1, "spec": "float", "changed": False, "seconds": 0.0, "metric": 10.0,
               "output": {"sqnr_db": None, "cosine": 1.0, "max_abs": 0.0, "mean_abs": 0.0},
               "layers": {f"model.layers.{i}": {"sqnr_db": None, "cosine": 1.0, "max_abs": 0, "mean_abs": 0}
                          for i in range(4)}}]
    for k, base in enumerate((30.0, 12.0)):
        stages.append({"index": k, "spec": f"pass{k}", "changed": True, "seconds": 0.1, "metric": 11.0 + k,
                       "output": {"sqnr_db": base, "cosine": 0.99, "max_abs": 1.0, "mean_abs": 0.1},
                       "layers": {f"model.layers.{i}": {"sqnr_db": base - 2 * i, "cosine": 0.99, "max_abs": 1.0,
                                                        "mean_abs": 0.1} for i in range(4)}})
    page = tmp_path / "report.html"
    page.write_text(render_report({"model": "m", "pipeline": "pass0,pass1", "inputs": "x", "metric": "ppl",
                                   "seconds": 1.0, "stages": stages}))
    shot = tmp_path / "shot.png"
    subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                    "--disable-component-update", "--no-first-run", f"--screenshot={shot}",
                    "--window-size=1200,900", page.as_uri()], capture_output=True, timeout=90)
    assert shot.is_file()
    png = shot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert (int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")) == (1200, 900)
    # a blank or text-only page compresses to a few kB; tables, lines and heat-map cells do not
    assert len(png) > 30_000


def test_reports_write_non_finite_numbers_as_null():
    """report.json, compare/bisect/sensitivity JSON: a NaN loss (a learned rotation with check_windows=0) was
    written as the bare token NaN, which strict JSON parsers refuse."""
    from lowbit import jsonio

    text = jsonio.dumps({"check": {"loss": float("nan"), "sqnr": [float("inf"), 1.5]}, "p": Path("x")},
                        default=str)
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}")) == \
        {"check": {"loss": None, "sqnr": [None, 1.5]}, "p": "x"}


def test_compile_sets_recipe_options_and_refuses_bad_keys_before_loading(monkeypatch):
    """`--set OPTION=VALUE` overrides a recipe's options (there was no way but copying its pipeline text): the run
    reports the changed pass; a key no pass of the recipe has, a bad value or --set with --pipeline exit 2 before
    the model is loaded."""
    out = invoke("compile", "smollm2:2", "--recipe", "w4a16-g64", "--set", "group=32").output
    assert "quantize(w=int4,group=32,sym=false)" in " ".join(out.split())

    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the bad --set was found")

    monkeypatch.setattr("lowbit.models.load_model", refuse)
    monkeypatch.setattr("lowbit.cli.common._MODELS", {})
    for args, fragment in ((["--recipe", "w4a16-gptq", "--set", "grup=32"], "did you mean 'group'?"),
                           (["--recipe", "w4a16-gptq", "--set", "group=0"], "option group"),
                           (["--recipe", "w4a16-gptq", "--set", "group"], "give OPTION=VALUE"),
                           (["-p", "dce", "--set", "group=32"], "--set changes a recipe's options")):
        res = invoke("compile", "smollm2:2", *args, code=2)
        assert fragment in " ".join(res.output.split()), res.output


def test_debug_tables_print_pass_options_in_brackets_as_written():
    """A pass spec such as ``quantize(w=int8,keep=[lm_head])`` printed in compare's tables read
    ``quantize(w=int8,keep=)``: rich took ``[lm_head]`` for a style tag, so the text table disagreed with the JSON."""
    from lowbit.cli.common import console
    from lowbit.cli.compare import CompareResult, Stage, layer_table, summary_table

    spec = "quantize(w=int8,keep=[model.layers.1.*])"
    out = {"max_abs": 0.1, "mean_abs": 0.01, "sqnr_db": 30.0, "cosine": 0.999}
    stages = [Stage(-1, "float", False, 0.0, 10.0, out, {"model.layers.1": out}),
              Stage(0, spec, True, 0.5, 11.0, out, {"model.layers.1": out})]
    res = CompareResult("m", spec, "2 windows", "ppl", stages, 1.0)
    with console.capture() as cap:
        console.print(summary_table(res))
        console.print(layer_table(res))
    text = re.sub(r"[│┃\s]+", "", cap.get())  # a column may wrap the spec: compare without the frame
    assert text.count(re.sub(r"\s", "", spec)) == 2, cap.get()


def test_printed_ir_is_the_ir_text_with_no_line_broken(monkeypatch):
    """``--print-ir-after`` piped to a file broke every node line longer than the console's 160 columns (a
    dequantize with its kwargs), so the dump did not parse as IR and diffed against the printer's text."""
    from lowbit.ir.parser import parse_graph

    res = invoke("compile", "minilm", "-p", "quantize(w=int4,group=32)", "--print-ir-after", "quantize", "-q")
    printed = res.output.split("// ----- IR after quantize")[1].split("\n", 1)[1]
    text = printed[:printed.index("\n}\n") + 3]
    assert max(len(line) for line in text.splitlines()) > 160  # the case: lines longer than the console
    graph = parse_graph(text)  # types only: the printed IR is the text form
    assert graph.op_counts()["dequantize"] == 36


@pytest.mark.parametrize("metric, values", [("cos", [-4.4e-16, 3e-5, 0.19]), ("ppl", [44.963, 45.012, 6.777e7])])
def test_compare_html_report_writes_the_end_metric_as_the_terminal_table(metric, values):
    """The HTML report wrote the end metric with 4 decimals: a cosine distance of 0.00003 read 0.0000 (as exact as
    float) where the terminal said 0.00003, and the float model's -4e-16 read -0.0000."""
    from lowbit.cli.common import console
    from lowbit.cli.compare import CompareResult, Stage, summary_table
    from lowbit.cli.report_html import render_report

    out = {"max_abs": 0.1, "mean_abs": 0.01, "sqnr_db": 30.0, "cosine": 0.999}
    stages = [Stage(i - 1, name, i > 0, 0.0, v, out, {}) for i, (name, v) in enumerate(zip(["float", "p0", "p1"],
                                                                                           values))]
    res = CompareResult("m", "p0,p1", "in", metric, stages, 0.0)
    with console.capture() as cap:
        console.print(summary_table(res))
    text = {c[2]: c[3] for c in ([x.strip() for x in line.split("│")] for line in cap.get().splitlines())
            if len(c) > 8}
    page = render_report(res.to_dict(finite=False)).split("<h2>Per pass</h2>")[1].split("</table>")[0]
    html = {re.search(r"<code>(.*?)</code>", r).group(1): re.findall(r"<td>(.*?)</td>", r)[3]
            for r in page.split("<tr>") if "<code>" in r}
    assert html == text and len(set(text.values())) == 3, (html, text)


@pytest.mark.parametrize("scheme, unit", [("prune-mlp(ratio=0.3)", "mlp"), ("prune-heads(ratio=0.5)", "attention"),
                                          ("prune-blocks(n=1)", "block")])
def test_debug_sensitivity_per_linear_refuses_a_pass_that_rewrites_whole_mlps_heads_or_blocks(scheme, unit):
    """``--granularity linear`` restricted prune-mlp to the first linear, a q_proj, which is none of its MLPs: the
    run failed with exit 4 (a pass failure, with a reproducer hint) after the float model's evaluation."""
    res = invoke("debug", "sensitivity", "smollm2:2", "--scheme", scheme, "--granularity", "linear", *SMALL, code=2)
    assert f"rewrites each {unit} as a whole" in res.output and "--granularity block" in res.output, res.output


def test_a_warning_reaches_the_user_as_one_line():
    """fold-norms on a tied lm_head warns (UntiedWeightWarning); the CLI printed Python's form, two lines naming
    lowbit's source ('.../passes/manager.py:371: UntiedWeightWarning: ...' over 'result = p.run(graph)'). It is one
    'warning: ...' line on stderr, naming the category; stdout has none of it."""
    res = invoke("compile", "smollm2:1", "-p", "fold-norms", "-q")
    lines = [line for line in res.stderr.splitlines() if "untied" in line]
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("warning: fold-norms untied 1 shared weight(s): lm_head") and \
        lines[0].endswith("(UntiedWeightWarning)"), res.stderr
    assert ".py:" not in res.stderr and "p.run(graph)" not in res.stderr, res.stderr
    assert "untied" not in res.stdout
    # a warning from outside lowbit says where it came from, still on one line
    from lowbit.cli.common import warning_line

    assert warning_line("a\n  b", FutureWarning, "/x/torch/y.py", 3) == \
        "warning: a b (FutureWarning from /x/torch/y.py:3)"


def test_text_lines_piped_are_not_broken_at_the_console_width():
    """Piped, rich's console is 160 columns wide and it broke every longer text line there: compile's summary line
    of a pass's statistics ended mid-dict ("'kv_qdq_chains': " / "0, ..."), so grep found half of it. Plain text prints
    whole; only tables follow the width."""
    res = invoke("compile", "smollm2:1", "-p", "quantize(w=int4,group=64)")
    line = next(line for line in res.stdout.splitlines() if "'weights_quantized'" in line)
    assert len(line) > 160 and line.rstrip().endswith("}"), res.stdout
    assert "'quantized_weight_bytes_after': " in line, res.stdout


@pytest.mark.parametrize("flags, message", [
    (["-n", "0"], "-n/--max-new-tokens 0: give at least 1"),
    (["--max-length", "1"], "--max-length 1: give at least 2"),
    (["--max-batch", "1", "--prompt", "b"], "--max-batch 1: the step graph must take the 2 prompt(s) given"),
    (["--sample", "--temperature", "0"], "--temperature 0.0: give a finite number above 0 (or leave out --sample"),
    (["--sample", "--top-k", "0"], "--top-k 0: give at least 1"),
    (["--sample", "--top-p", "1.5"], "--top-p 1.5: give a number above 0 and at most 1"),
])
def test_generate_refuses_its_numbers_by_flag_before_reading_the_model(tmp_path, flags, message):
    """The refusals came from the Python API after the model loaded, in its words: 'max_new_tokens=0', 'top_p=1.5',
    'GenerationSpec.max_length=1', 'use do_sample=False for greedy'. They name the flag, before MODEL is read (a
    missing model would exit 3)."""
    res = invoke("generate", tmp_path / "no-such-model", "--prompt", "a", *flags, code=2)
    assert message in res.stderr and "=" not in res.stderr.split("error:")[1], res.stderr


def test_generate_sampling_flag_without_sample_reads_as_english(tmp_path):
    """'--seed only apply when sampling': one flag applies, several apply."""
    res = invoke("generate", tmp_path / "m", "--prompt", "a", "--seed", "1", code=2)
    assert "--seed only applies when sampling: add --sample" in res.stderr, res.stderr
    res = invoke("generate", tmp_path / "m", "--prompt", "a", "--seed", "1", "--top-k", "3", code=2)
    assert "--top-k, --seed only apply when sampling" in res.stderr, res.stderr


@pytest.mark.parametrize("command", [["debug", "bisect", "-p", "dce"], ["debug", "sensitivity"]])
def test_debug_metric_is_checked_before_the_model_is_read(tmp_path, command):
    """--metric foo was refused after the model loaded (a missing model said so first, exit 3), listing 'ppl, cos'
    without auto, the default."""
    res = invoke(*command[:2], tmp_path / "no-such-model", *command[2:], "--metric", "cso", code=2)
    assert "--metric 'cso': give ppl, kl, cos or auto; did you mean 'cos'?" in res.stderr, res.stderr


def test_debug_json_dash_writes_the_json_alone_to_stdout(tmp_path, monkeypatch):
    """--json - wrote a file named '-' (and said 'wrote -'); it is the standard output, holding the JSON alone, the
    tables going to stderr, for `lowbit debug compare ... --json - | jq`."""
    monkeypatch.chdir(tmp_path)
    small = ["--windows", "1", "--seq-len", "16"]
    res = invoke("debug", "compare", "smollm2:1", "-p", "dce", *small, "--json", "-")
    data = json.loads(res.stdout)
    assert [s["spec"] for s in data["stages"]] == ["float", "dce"]
    assert "per-layer SQNR" in res.stderr and not (tmp_path / "-").exists()
    res = invoke("debug", "bisect", "smollm2:1", "-p", "dce", *small, "--json", "-", code=6)
    assert json.loads(res.stdout)["note"].startswith("the whole pipeline stays within the threshold")
    assert "float baseline" in res.stderr and not (tmp_path / "-").exists()


def test_inspect_and_graph_read_a_float_hf_directory(tmp_path):
    """`lowbit compile -f hf` (a pruned model as plain transformers weights) writes a directory inspect and graph
    refused: "no quantization_config (a float HF model: load it with lowbit.compile_model instead)", exit 3. They
    show its IR as compile captures it."""
    import lowbit
    from lowbit.data.model_files import load_tokenizer

    compiled = lowbit.compile_model(tiny_llama(vocab=49152), pipeline="dce", tokenizer=load_tokenizer("smollm2"))
    out = lowbit.save(compiled, tmp_path / "hf", format="hf")
    res = invoke("inspect", out)
    assert "graph main, 1 inputs (input_ids" in res.stdout and "no quantized weights" in res.stdout, res.output
    assert re.search(r"│ linear\s+│\s+8 │", res.stdout), res.stdout  # 7 in the block, lm_head
    invoke("graph", out, "-o", tmp_path / "g.html")
    assert "mlp.down_proj" in (tmp_path / "g.html").read_text()


def test_generate_on_a_compile_output_names_the_command_that_generates(compiled_slice):
    """`lowbit compile -o` writes the logits graph, no decode step, and generate on it said 'was compiled without
    generation=GenerationSpec(...)', an argument of the Python API the CLI user never saw. It gives the generate
    command on the model and pipeline the directory's report.json names."""
    res = invoke("generate", compiled_slice, "--prompt", "hi", code=2)
    assert f"lowbit generate smollm2:2 --pipeline '{QUANT}' --prompt ..." in res.stderr, res.stderr
    assert "GenerationSpec" not in res.stderr, res.stderr


def test_debug_sentences_beyond_the_text_names_the_flag_and_the_most_it_takes():
    """--sentences above what WikiText-2 holds said "text 'wikitext2-test' has N usable sentences, fewer than
    n=1000000", the API's argument; it names --sentences and the largest value that works."""
    from lowbit.eval.embedding import load_sentences

    res = invoke("debug", "compare", "minilm", "-p", "dce", "--sentences", "1000000", code=2)
    found = re.search(r"--sentences 1000000: the WikiText-2 test text has (\d+) sentences .*; give --sentences (\d+) "
                      "or fewer", res.stderr)
    assert found and found.group(1) == found.group(2) and "n=" not in res.stderr, res.stderr
    most = int(found.group(1))
    assert len(load_sentences(most)) == most
    with pytest.raises(ValueError):
        load_sentences(most + 1)


def test_generate_max_length_past_the_models_positions_names_the_flag():
    """--max-length above max_position_embeddings was refused as 'GenerationSpec.max_length=9000 ...; give max_length
    <= 8192': the flag and its bound."""
    res = invoke("generate", "smollm2:1", "--prompt", "hi", "--max-length", "9000", code=2)
    assert "--max-length 9000: model 'smollm2:1' takes at most 8192 positions" in res.stderr, res.stderr
    assert "give --max-length 8192 or less" in res.stderr and "GenerationSpec" not in res.stderr, res.stderr


def test_debug_compare_html_dash_writes_the_page_alone_to_stdout(tmp_path, monkeypatch):
    """As --json -: --html - wrote a file named '-'; it is the standard output, holding the page alone."""
    monkeypatch.chdir(tmp_path)
    res = invoke("debug", "compare", "smollm2:1", "-p", "dce", "--windows", "1", "--seq-len", "16", "--html", "-")
    assert res.stdout.lstrip().startswith("<!DOCTYPE html>") and res.stdout.rstrip().endswith("</html>"), res.stdout
    assert "per-layer SQNR" in res.stderr and not (tmp_path / "-").exists()


@pytest.mark.parametrize("value", ["[lm_head", "lm_head]"])
def test_set_of_a_half_bracketed_list_suggests_one_pair_of_brackets(value):
    """--set gptq.keep=[lm_head was told to 'write a list in brackets: keep=[[lm_head]', which fails again."""
    res = invoke("compile", "smollm2:1", "-r", "w4a16-gptq", "--set", f"gptq.keep={value}", code=2)
    assert "write a list in brackets: keep=[lm_head] (keep=[a;b] for several)" in res.stderr, res.stderr


def test_help_texts_show_no_rst_markup():
    """`lowbit --help` listed replay as 'Re-run ... on the IR saved by ``--reproducer``': the command docstrings are
    the help, shown as written."""
    for args in (["--help"], ["debug", "--help"], ["replay", "--help"]):
        res = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
        assert res.exit_code == 0 and "``" not in res.output, res.output


def test_output_cut_short_by_its_reader_exits_quietly(tmp_path):
    """``lowbit recipes | head -1``: a reader that stops taking the output made rich (and click, for a plain write)
    exit 1, which --help lists as a bug in lowbit; it exits 0 without a word."""
    proc = subprocess.Popen([sys.executable, "-m", "lowbit.cli", "recipes"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before the first write
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and not err, err.decode()

    import typer as typer_

    from lowbit.cli.common import LowbitGroup

    plain = typer_.Typer(cls=LowbitGroup)

    @plain.command()
    def cut() -> None:
        raise BrokenPipeError(32, "Broken pipe")

    @plain.command()
    def other() -> None:
        pass

    res = CliRunner().invoke(plain, ["cut"])
    assert res.exit_code == 0 and res.exception is None, res.output


def test_every_option_of_every_command_has_help_text():
    """--temperature, --top-k, --top-p, replay's and debug compare's --verify-each and debug sensitivity's
    --windows/--seq-len/--sentences showed a bare type in --help."""
    from typer.main import get_command

    def commands(cmd: Any, path: list[str]) -> Any:
        subs = getattr(cmd, "commands", None)
        if subs:
            for name, sub in subs.items():
                yield from commands(sub, [*path, name])
        else:
            yield " ".join(path), cmd

    bare = [f"{where} {p.opts[0]}" for where, cmd in commands(get_command(app), [])
            for p in cmd.params if getattr(p, "help", "x") in (None, "") and p.name != "help"]
    assert not bare, bare
    out = " ".join(invoke("generate", "--help").output.replace("│", " ").split())
    assert "--top-p" in out and "nucleus" in out


@pytest.mark.parametrize("command", ["compare", "bisect"])
def test_debug_commands_quiet_draw_no_progress_bars(command):
    """debug compare/bisect/sensitivity had no -q: the calibrating passes' bars ('calibrate: ...' with \\r updates)
    went to the output with the tables. -q leaves the tables and results only."""
    from transformers.utils import logging as hf_logging

    extra = ["--max-increase", "50%"] if command == "bisect" else []
    args = ["debug", command, "smollm2:1", "--pipeline", "smooth-quant(calib_n=1,calib_len=8),quantize(w=int8,a=int8)",
            "--windows", "1", "--seq-len", "16", *extra]
    enabled = hf_logging.is_progress_bar_enabled()
    try:
        quiet = CliRunner().invoke(app, [*args, "-q"])
    finally:
        (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()
    assert quiet.exit_code == (0 if command == "compare" else 6), quiet.output  # bisect: nothing to bisect
    assert "\r" not in quiet.output and "calibrate" not in quiet.output, quiet.output
    assert ("smooth-quant" if command == "compare" else "all 2 passes") in quiet.output  # the results still print
    assert "-q" in " ".join(invoke("debug", "sensitivity", "--help").output.split())


@pytest.mark.parametrize("recipe, message", [
    ("w4a4kv4-rtn", "KV-cache quantization is modelled for prefill only"),
    ("w4a16-e2e", "trains toward the teacher's logits"),
])
def test_generate_refuses_a_recipe_it_cannot_serve_before_loading_the_model(monkeypatch, recipe, message):
    """`lowbit generate smollm2 --recipe w4a4kv4-rtn` (or an *-e2e recipe) loaded the model, then compile_model
    refused the pass: the refusal comes from the pipeline alone, so it now comes first (exit 2), as the API's does.
    (kv4 generates: its generation pipeline is kv-cache(bits=4).)"""
    monkeypatch.setattr("lowbit.models.load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    res = invoke("generate", "smollm2:2", "--recipe", recipe, "--prompt", "Hi", "-n", "2", code=2)
    assert message in " ".join(res.output.split()), res.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_pass_device_this_machine_lacks_is_refused_before_loading_the_model(monkeypatch, tmp_path):
    """The GPU recipes say "add device=cuda"; `--set device=cuda` (or overrides=) on a machine without CUDA loaded and
    captured the model, then the pass failed. plan_compile now checks each pass's own device first: exit 2 from the
    CLI, a DeviceError naming the pass from the API."""
    import lowbit
    from lowbit.errors import DeviceError

    monkeypatch.setattr("lowbit.models.load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    res = invoke("compile", "smollm2:2", "--recipe", "w4a16-gptq", "--set", "device=cuda", "-o", tmp_path / "o", code=2)
    assert "pass gptq(" in res.output and "option device='cuda'" in " ".join(res.output.split()), res.output
    with pytest.raises(DeviceError, match=r"pass autoround\(.*device=cuda.*\): option device='cuda'"):
        lowbit.compile_model("smollm2:2", recipe="w4a16-autoround", overrides={"device": "cuda"})


@pytest.mark.parametrize("damage", ["config", "format"])
def test_inspect_and_graph_of_a_float_hf_directory_check_its_manifest_as_load_does(tmp_path, damage):
    """A float HF directory lowbit.save wrote was captured without its manifest being read: an edited config.json
    (size and SHA-256 no longer the manifest's), or a manifest saying another format, was shown and drawn, exit 0,
    while lowbit.load refused it. Both now refuse it with load's message, exit 3."""
    import lowbit
    from lowbit.checkpoint import CheckpointError
    from lowbit.data.model_files import load_tokenizer

    compiled = lowbit.compile_model(tiny_llama(vocab=49152), pipeline="dce", tokenizer=load_tokenizer("smollm2"))
    out = lowbit.save(compiled, tmp_path / "hf", format="hf")
    if damage == "config":
        (out / "config.json").write_text((out / "config.json").read_text() + " ")
    else:
        manifest = json.loads((out / "lowbit-manifest.json").read_text())
        (out / "lowbit-manifest.json").write_text(json.dumps({**manifest, "format": "compressed-tensors"}))
    with pytest.raises(CheckpointError) as err:
        lowbit.load(out)
    for command in ("inspect", "graph"):
        res = invoke(command, out, *(["-o", tmp_path / "g.html"] if command == "graph" else []), code=3)
        assert str(err.value) in " ".join(res.output.split()), res.output
    assert not (tmp_path / "g.html").exists()


def test_every_command_that_reads_a_model_takes_quiet(tmp_path):
    """lowbit graph, inspect and replay had no -q (compile, generate and the debug commands do): graph and inspect of
    an HF directory load it through transformers, whose 'Loading weights' bar went to stderr with the results, and
    replay's calibrating passes drew theirs. -q turns them off; the result line still prints."""
    import lowbit
    from lowbit.data.model_files import load_tokenizer
    from transformers.utils import logging as hf_logging

    for command in (["compile"], ["generate"], ["graph"], ["inspect"], ["replay"], ["debug", "compare"],
                    ["debug", "bisect"], ["debug", "sensitivity"]):
        assert "--quiet" in invoke(*command, "--help").output, command
    compiled = lowbit.compile_model(tiny_llama(vocab=49152), pipeline="dce", tokenizer=load_tokenizer("smollm2"))
    out = lowbit.save(compiled, tmp_path / "hf", format="hf")
    enabled = hf_logging.is_progress_bar_enabled()
    try:
        hf_logging.enable_progress_bar()
        loud = invoke("graph", out, "-o", tmp_path / "a.html").output
        quiet = invoke("graph", out, "-o", tmp_path / "b.html", "-q").output
        hf_logging.enable_progress_bar()
        quiet_inspect = invoke("inspect", out, "-q").output
    finally:
        (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()
    assert "Loading weights" in loud  # what -q is for
    assert "Loading weights" not in quiet and "wrote" in quiet, quiet
    assert "Loading weights" not in quiet_inspect and "graph main" in quiet_inspect, quiet_inspect


def test_compare_of_a_graph_that_verifies_but_does_not_run_writes_a_reproducer(tmp_path):
    """debug compare on a pass whose graph verified but failed on the inputs said which pass, and nothing else: no
    '--reproducer' advice, and --reproducer wrote nothing. It now advises it, and writes the IR before the pass with
    the inputs the graph failed on, which lowbit replay runs the graph on (exit 5, as compare)."""
    args = ["debug", "compare", "smollm2:1", "-p", "dce,test-shrink-embedding", "--windows", "1", "--seq-len", "16",
            "-q"]
    res = invoke(*args, code=5)
    assert "after pass test-shrink-embedding (#1) the graph does not run on the inputs" in res.stderr, res.stderr
    assert "rerun with --reproducer DIR" in res.stderr
    repro = tmp_path / "repro"
    res = invoke(*args, "--reproducer", repro, code=5)
    assert f"reproducer written to {repro}" in res.stderr, res.stderr
    manifest = json.loads((repro / "reproducer.json").read_text())
    assert manifest["replay_pipeline"] == "test-shrink-embedding" and manifest["failing_index"] == 1
    res = invoke("replay", repro, code=5)
    assert "reproduced: after test-shrink-embedding the graph does not run on the saved inputs ([1, 16])" \
        in res.stderr, res.stderr


def test_debug_bisect_measures_a_slice_by_kl_from_the_float_slice(tmp_path):
    """bisect and sensitivity on a slice (smollm2:2) could only use its perplexity, which is not a language model's
    (thousands for the float cut; damage may even lower it), and said nothing of it. --metric kl measures every run
    against the float slice's own next-token distributions (0 for float), and a ppl run on a slice says so."""
    js = tmp_path / "bisect.json"
    res = invoke("debug", "bisect", "smollm2:2", "--pipeline", "fold-norms,test-plant-bad,dce", *SMALL,
                 "--metric", "kl", "--max-increase", "0.05", "--json", js)
    data = json.loads(js.read_text())
    assert data["metric"] == "kl" and data["baseline"] == pytest.approx(0, abs=1e-6), data
    assert data["threshold"] == pytest.approx(0.05, abs=1e-6) and data["full"] > 0.05
    assert data["culprit_pass"] == "test-plant-bad" and data["culprit_layers"] == ["model.layers.1"]
    assert "float baseline KL 0.00000" in res.output and "note:" not in res.output, res.output
    assert data["reproduce"].endswith(" --windows 2 --seq-len 32"), data["reproduce"]  # a causal LM's flags
    res = invoke("debug", "bisect", "smollm2:2", "-p", "dce", *SMALL, "--metric", "kl", code=2)
    assert "--metric kl starts at 0 for the float model" in res.output, res.output
    res = invoke("debug", "bisect", "smollm2:2", "-p", "dce", *SMALL, "-q", code=6)
    assert "smollm2:2 keeps only the first 2 block(s)" in res.output and "--metric kl" in res.output, res.output


def _option_help(*command: str, option: str) -> str:
    """The help text of ``option`` of the ``lowbit`` subcommand ``command`` (as ``--help`` shows it)."""
    from typer.main import get_command

    cmd: Any = get_command(app)
    for name in command:
        cmd = cmd.commands[name]
    return next(p.help for p in cmd.params if option in p.opts)


def test_dtype_help_says_what_dtype_does_in_each_command():
    """`lowbit debug compare --help` described --dtype with compile's text: the triton backend's kernels (debug runs the
    torch reference) and 'a model larger than RAM compiles and saves' (debug saves nothing; nor does generate). Each
    command's --dtype says what it does there."""
    assert "saves" in _option_help("compile", option="--dtype")
    generate = _option_help("generate", option="--dtype")
    assert "saves" not in generate and "generates in" in generate
    for command in ("compare", "bisect", "sensitivity"):
        text = _option_help("debug", command, option="--dtype")
        assert "triton" not in text and "saves" not in text and "evaluated in" in text, (command, text)


def test_generate_help_names_only_models_it_generates_with():
    """`lowbit generate --help` listed minilm among its models (compile's text); generate refuses it as a text encoder
    with no causal-LM head. Its MODEL help names causal LMs only; compile's still names minilm."""
    from typer.main import get_command

    model = next(p for p in get_command(app).commands["generate"].params if p.name == "model")
    assert "minilm" not in model.help and "causal LM" in model.help, model.help
    assert "minilm" in next(p for p in get_command(app).commands["compile"].params if p.name == "model").help


@pytest.mark.parametrize("fmt, says", [
    ("onnx", "an ONNX file is written by -b onnxruntime -o DIR (DIR/model.onnx"),
    ("onnx-matmulnbits", "an ONNX file is written by -b onnxruntime -o DIR"),
    ("tensorrt", "a TensorRT engine is written by -b tensorrt -o DIR (DIR/model.engine)"),
    ("engine", "a TensorRT engine is written by -b tensorrt -o DIR"),
])
def test_compile_format_onnx_or_tensorrt_says_which_backend_writes_it(tmp_path, fmt, says):
    """``lowbit compile --format onnx`` (lowbit.export's format name) was refused with the four checkpoint formats
    only, and nothing said how the command writes ONNX or an engine; refused before the model loads."""
    out = " ".join(invoke("compile", "no/such/model", "-p", "dce", "--format", fmt, "-o", tmp_path / "o",
                          code=2).output.split())
    assert f"unknown --format '{fmt}'" in out and "compressed-tensors, gptq, hf, lowbit (checkpoint formats)" in out
    assert says in out


def test_debug_sensitivity_ranks_a_slice_by_kl(tmp_path):
    """sensitivity --metric kl ranks a slice's blocks by the KL of each run's next-token distributions from the float
    slice's (0 for float); measured by perplexity, a slice's ranking gets a note that names --metric kl, and not
    bisect's --max-increase, which sensitivity does not take."""
    out = tmp_path / "s.json"
    invoke("debug", "sensitivity", "smollm2:2", "--scheme", "test-plant-bad", "--metric", "kl", *SMALL, "-o", out, "-q")
    data = json.loads(out.read_text())
    assert data["metric"] == "kl" and data["baseline"] == pytest.approx(0, abs=1e-6)
    assert [r["module"] for r in data["ranking"]] == ["model.layers.1", "model.layers.0"], data["ranking"]
    assert data["ranking"][0]["damage"] > 10 * max(data["ranking"][1]["damage"], 1e-9)
    res = invoke("debug", "sensitivity", "smollm2:2", "--scheme", "w4", *SMALL, "-o", tmp_path / "p.json", "-q")
    assert "a ranking by it says little: --metric kl ranks" in res.stderr and "--max-increase" not in res.stderr


def test_debug_bisect_says_when_later_passes_do_most_of_the_damage(tmp_path):
    """A fault injected late in a pipeline whose weight quantizer is already past the threshold: bisect names the
    first pass past it, as it should, and said nothing of the later pass that took the metric many times further. It
    now says so, with the --max-increase past the culprit's damage; bisecting again with it finds the later pass."""
    pipeline = "quantize(w=int4,group=64),quantize(a=int2)"
    js = tmp_path / "b.json"
    invoke("debug", "bisect", "smollm2:1", "-p", pipeline, *SMALL, "--metric", "kl", "--max-increase", "0.02",
           "--json", js, "-q")
    data = json.loads(js.read_text())
    assert data["culprit_index"] == 0 and "the passes after it (#1 on) do most of the damage" in data["note"], data
    again = re.search(r"--max-increase (\S+)", data["note"]).group(1)
    invoke("debug", "bisect", "smollm2:1", "-p", pipeline, *SMALL, "--metric", "kl", "--max-increase", again,
           "--json", js, "-q")
    data = json.loads(js.read_text())
    assert data["culprit_pass"] == "quantize(a=int2)" and "do most of the damage" not in data["note"], data


def test_sensitivity_pipeline_help_names_the_scheme_pass_not_quantize():
    """`lowbit debug sensitivity --help` said --pipeline runs 'before quantize'; with a pruning --scheme
    ('prune-mlp(ratio=0.3)', which its help offers) no quantize runs: the passes run before the --scheme pass."""
    text = _option_help("debug", "sensitivity", option="--pipeline")
    assert "quantize" not in text and "--scheme" in text, text


def test_compare_table_shows_a_long_pass_spec_whole():
    """debug compare's summary cut a long pass spec with an ellipsis at the terminal's width: the w4a16-gptq recipe
    with --set calib_n/calib_len on full SmolLM2 read 'gptq(group=64,damp=0.001,awq=true,clip=true,n_grid=40,
    calib_n=2,calib…', so two passes that differ in their last options could not be told apart. It folds now."""
    from rich.console import Console

    from lowbit.cli.compare import CompareResult, Stage, summary_table

    out = {"sqnr_db": 20.0, "cosine": 0.9, "max_abs": 1.0}
    spec = "gptq(group=64,damp=0.001,awq=true,clip=true,n_grid=40,calib_n=2,calib_len=64,batch_size=4,seed=7)"
    layers = {"model.layers.0": {"sqnr_db": 20.0, "cosine": 1.0, "max_abs": 0.0}}
    res = CompareResult("m", spec, "in", "ppl", [Stage(-1, "float", False, 0.0, 10.0, out, layers),
                                                 Stage(0, spec, True, 1.0, 11.0, out, layers)], 1.0)
    console = Console(width=100, record=True)
    console.print(summary_table(res))
    cells = [line.split("│")[2].strip() for line in console.export_text().splitlines() if line.count("│") > 8]
    assert "".join(cells[1:]) == spec, cells


def test_compare_html_report_names_a_long_pass_whole():
    """The HTML report's legend and heat map cut a pass spec at 38 and 30 characters without a mark: the full
    SmolLM2 w4a16-gptq report's legend read '#0 gptq(group=64,damp=0.001,awq=true,clip', and a recipe's two
    'quantize(a=int4,kv=int4,k_gran=...' passes read the same. A cut label ends in an ellipsis and carries the whole
    spec as its tooltip (an SVG title, no JavaScript)."""
    from lowbit.cli.compare import CompareResult, Stage
    from lowbit.cli.report_html import render_report

    out = {"sqnr_db": 20.0, "cosine": 0.9, "max_abs": 1.0}
    layers = {f"model.layers.{i}": {"sqnr_db": 20.0 - i, "cosine": 1.0, "max_abs": 0.1} for i in range(2)}
    long_spec = "quantize(a=int4,kv=int4,k_gran=per_token,v_gran=per_token,kv_group=None)"
    res = CompareResult("m", f"dce,{long_spec}", "in", "ppl", [
        Stage(-1, "float", False, 0.0, 10.0, out, layers), Stage(0, "dce", True, 0.0, 10.0, out, layers),
        Stage(1, long_spec, True, 1.0, 11.0, out, layers)], 1.0)
    html = render_report(res.to_dict(finite=False))
    svgs = html.split("<svg")[1:]
    assert len(svgs) == 2
    for svg in svgs:  # the line chart's legend, the heat map's rows
        assert f"<title>{long_spec}</title>#1 quantize(a=int4" in svg, svg
        assert "…</text>" in svg and ">#0 dce</text>" in svg  # a short spec is whole and has no tooltip


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, OSError])
def test_an_interrupted_output_write_leaves_no_temporary_file(tmp_path, monkeypatch, interrupt):
    """The debug commands' --json/--html/-o files are written through a temporary sibling renamed into place; Ctrl-C
    or a full disk during the write left '.sens.json.XXXX.tmp' beside the output. The sibling is removed, the error
    goes on, and an existing output is untouched."""
    from lowbit.cli import common

    target = tmp_path / "sens.json"
    target.write_text("old\n")

    def stop(*args, **kwargs):
        raise interrupt("interrupted")

    monkeypatch.setattr(common.os, "replace", stop)
    with pytest.raises(interrupt):
        common.atomic_write_text(target, "new\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sens.json"] and target.read_text() == "old\n"


def test_sensitivity_keep_top_help_says_what_a_pruning_scheme_keeps():
    """--keep-top said the override file keeps the worst units 'float'; with a sparsify --scheme it keeps them dense
    (the table says 'keep dense'), and for the structured prune passes, which have no keep option, it keeps nothing
    (the command says it writes the ranking only)."""
    text = _option_help("debug", "sensitivity", option="--keep-top")
    assert "dense" in text and "ranking only" in text, text


def test_debug_bisect_prints_a_restricted_metric_of_zero(monkeypatch):
    """The summary's 'pass on those layers only' row printed '?' for a restricted pass measured at exactly 0.0 (a KL):
    the value was tested for truthiness, not for being absent."""
    from lowbit.cli import bisect as bisect_module

    def measured(*args, **kwargs):
        return bisect_module.BisectResult("smollm2:2", "quantize(w=int4)", "kl", 0.0, -0.5, 1.0, culprit_index=0,
                                          culprit_pass="quantize(w=int4)", culprit_layers=["model.layers.1"],
                                          restricted_spec="quantize(w=int4,modules=x)", restricted_metric=0.0)

    monkeypatch.setattr(bisect_module, "bisect", measured)
    res = invoke("debug", "bisect", "smollm2:2", "-p", "quantize(w=int4)", "--metric", "kl", "--max-increase", "0.1")
    assert "quantize(w=int4,modules=x) → 0.00000" in res.output and "→ ?" not in res.output, res.output


def test_debug_compare_measures_by_kl_as_the_bisect_it_reproduces(tmp_path):
    """debug bisect --metric kl printed a reproduce command for debug compare, which had no --metric: it measured
    perplexity, not the KL bisect found past the threshold. compare takes --metric (its table and JSON say which),
    and bisect's command asks for kl."""
    js = tmp_path / "bisect.json"
    invoke("debug", "bisect", "smollm2:2", "--pipeline", "fold-norms,test-plant-bad,dce", *SMALL, "--metric", "kl",
           "--max-increase", "0.05", "--json", js, "-q")
    data = json.loads(js.read_text())
    assert " --metric kl " in data["reproduce"], data["reproduce"]
    repro_pipeline = re.search(r"--pipeline '([^']+)'", data["reproduce"]).group(1)
    rerun = tmp_path / "rerun.json"
    res = invoke("debug", "compare", "smollm2:2", "--pipeline", repro_pipeline, *SMALL, "--metric", "kl", "--json",
                 rerun, "-q")
    stages = json.loads(rerun.read_text())
    assert stages["metric"] == "kl" and stages["stages"][0]["metric"] == pytest.approx(0, abs=1e-6)
    assert stages["stages"][-1]["metric"] == pytest.approx(data["restricted_metric"], rel=1e-5)
    assert "KL from float" in res.output and "perplexity" not in res.output, res.output
    assert "lowest-SQNR layer" in res.output  # what the layer column ranks by, whatever the end metric
    res = invoke("debug", "compare", "smollm2:2", "-p", "dce", "--metric", "kll", code=2)
    assert "--metric 'kll'" in res.output and "kl" in res.output


@register_pass
class CountRuns(Pass):
    """Test only: changes nothing and counts how many times it ran."""

    name = "test-count-runs"
    runs = 0

    def run(self, graph):
        CountRuns.runs += 1
        return PassResult(False)


def test_debug_bisect_runs_the_pipeline_once_for_its_prefixes(tmp_path, monkeypatch):
    """Stage 1 ran the pipeline again from the float graph for every prefix it probed: the first pass of six ran five
    times (the whole run, probes of 3, 4 and 5 passes, the re-check of the 4 before the culprit). The whole run keeps
    each prefix's IR, so it runs twice (the whole run, the re-check); a prefix past the memory budget runs again, and
    every number is the same either way."""
    from lowbit.cli import bisect as bisect_module

    def bisected(name: str) -> dict:
        CountRuns.runs = 0
        js = tmp_path / f"{name}.json"
        pipeline = "test-count-runs,fold-norms,dce,dce,test-plant-bad,dce"
        res = invoke("debug", "bisect", "smollm2:2", "--pipeline", pipeline, *SMALL, "--json", js, "-q")
        return {"runs": CountRuns.runs, "output": res.output, **json.loads(js.read_text())}

    kept = bisected("kept")
    assert kept["culprit_pass"] == "test-plant-bad" and kept["culprit_layers"] == ["model.layers.1"]
    assert [p["what"] for p in kept["probes"][:4]] == ["all 6 passes", "first 3 passes", "first 4 passes",
                                                       "first 5 passes"]
    assert kept["runs"] == 2 and "run again" not in kept["output"], kept["runs"]
    original = bisect_module.PrefixGraphs.__init__
    monkeypatch.setattr(bisect_module.PrefixGraphs, "__init__",
                        lambda self, start, keep, budget: original(self, start, keep, 0))
    rerun = bisected("rerun")
    assert rerun["runs"] == 5 and "longer prefixes run again" in rerun["output"], rerun["runs"]
    assert rerun["probes"] == kept["probes"] and rerun["culprit_layers"] == kept["culprit_layers"]


def test_debug_sensitivity_verifies_each_restricted_run_s_output_only(monkeypatch, tmp_path):
    """Every restricted run verified its input, a clone of the graph the verifier had just passed, and then its
    output: two whole-graph checks a block (~0.8 s each on the whole SmolLM2). The input is checked once; each pass's
    output still is, and the ranking is the one a run checking everything gives."""
    import lowbit.passes.manager as manager

    checked = []
    verify = manager.verify
    monkeypatch.setattr(manager, "verify", lambda graph, **kw: (checked.append(len(graph.nodes)), verify(graph, **kw)))
    out = tmp_path / "sens.json"
    invoke("debug", "sensitivity", "smollm2:2", "--scheme", "w4a8", "--group", "64", "-p", "fold-norms", *SMALL,
           "-o", out, "-q")
    # fold-norms' input and output, then each block's restricted quantize and the whole quantize: outputs only
    assert len(checked) == 2 + 2 + 1, checked
    ranking = json.loads(out.read_text())["ranking"]
    original = manager.PassManager.__init__
    monkeypatch.setattr(manager.PassManager, "__init__",
                        lambda self, *args, verify_input=True, **kw: original(self, *args, verify_input=True, **kw))
    checked.clear()
    invoke("debug", "sensitivity", "smollm2:2", "--scheme", "w4a8", "--group", "64", "-p", "fold-norms", *SMALL,
           "-o", out, "-q")
    assert len(checked) == 2 + 2 * 2 + 2 and json.loads(out.read_text())["ranking"] == ranking, checked

def test_compile_writes_a_float_2_4_model_as_compressed_tensors():
    """`lowbit compile -f compressed-tensors` refused a sparsify-only pipeline up front ('quantizes none') although
    lowbit.save writes such a model as a sparse-only compressed-tensors checkpoint (its sparsity_config); GPTQ, which
    has no sparsity field, still refuses it."""
    import lowbit.cli.main as cli_main
    from lowbit.cli.common import parse

    passes = parse("sparsify(method=magnitude,pattern=2:4)")
    assert cli_main.hf_format_refusal("compressed-tensors", passes) is None
    assert "quantizes none" in cli_main.hf_format_refusal("gptq", passes)
    assert "(or, for compressed-tensors, a sparsify pass)" in cli_main.hf_format_refusal("compressed-tensors",
                                                                                        parse("fold-norms"))


def test_compile_lets_heads_pruned_by_a_global_allocation_through_to_the_hf_formats(tmp_path):
    """`lowbit compile -f compressed-tensors|gptq|hf` refused prune-heads(allocation=global) up front ('writes one
    head count for all layers') although the writers hold per-layer head counts as zero heads: it compiles and
    writes a checkpoint transformers loads to the compiled logits (a global MLP width is still refused)."""
    import lowbit.cli.main as cli_main
    from conftest import tiny_llama

    from lowbit.checkpoint.hf_check import transformers_logits
    from lowbit.cli.common import parse

    pipeline = "prune-heads(ratio=0.5,score=magnitude,allocation=global),quantize(w=int4,group=16)"
    for fmt in ("compressed-tensors", "gptq", "hf"):
        assert "allocation=global" not in (cli_main.hf_format_refusal(fmt, parse(pipeline)) or "")
    assert "writes one MLP width" in cli_main.hf_format_refusal("hf", parse("prune-mlp(allocation=global)"))
    torch.manual_seed(0)
    tiny_llama(hidden=64, inter=128, heads=8, kv_heads=4, layers=3, vocab=97, max_positions=64).save_pretrained(
        tmp_path / "m")
    invoke("compile", tmp_path / "m", "-p", pipeline, "-f", "compressed-tensors", "-o", tmp_path / "out")
    kept = json.loads((tmp_path / "out" / "lowbit-manifest.json").read_text())["lowbit"]["zero_heads"]["kept_heads"]
    assert len({tuple(v) for v in kept.values()}) > 1  # the layers keep different counts
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(1))
    import lowbit

    torch.testing.assert_close(transformers_logits(tmp_path / "out", ids), lowbit.load(tmp_path / "out")(ids),
                               rtol=0, atol=1e-5)


def test_a_model_directory_rewritten_between_two_loads_in_one_process_is_loaded_again(tmp_path):
    """The CLI's model cache was keyed by the path string: a directory saved again (another model, the same path)
    between two commands in one process (a notebook, a test run) gave the first model back, and its captured graph.
    The files' sizes and times are part of the key now; an unchanged directory is still loaded once."""
    from conftest import tiny_llama

    from lowbit.cli.common import capture_model, load

    directory = tmp_path / "model"
    torch.manual_seed(0)
    tiny_llama(layers=1).save_pretrained(directory)
    first = load(str(directory))
    assert load(str(directory)) is first
    one_layer = len(capture_model(first).nodes)
    torch.manual_seed(1)
    tiny_llama(layers=2).save_pretrained(directory)
    second = load(str(directory))
    assert second is not first and second.module.model.config.num_hidden_layers == 2
    assert not torch.equal(second.module.model.model.embed_tokens.weight, first.module.model.model.embed_tokens.weight)
    assert len(capture_model(second).nodes) > one_layer
    assert load(f"{directory}:1").module.model.config.num_hidden_layers == 1  # a slice of the new model


@register_pass
class PlantBadAndHead(PlantBad):
    """Test only: test-plant-bad that also scales lm_head by 1+1e-6 (a change outside the blocks)."""

    name = "test-plant-bad-and-head"

    def run(self, graph):
        result = super().run(graph)
        head = next(n for n in graph.nodes if n.op == "linear" and n.module == "lm_head")
        graph.set_param(head.args[1].name, head.args[1].data * (1.0 + 1e-6))
        return result


def test_debug_bisect_stage_2_reuses_the_culprit_s_own_run_for_all_of_its_blocks(tmp_path, monkeypatch):
    """Stage 2 began by running the culprit again restricted to every block, right after it had run on that very IR
    unrestricted: the same run, the costliest of stage 2 (a GPTQ of the whole model), where the pass changed nothing
    outside the blocks. It is measured once now; a pass that also changed lm_head still runs restricted to all blocks
    (that differs), and the layers found are the same."""
    runs = []
    original = PlantBad.run
    monkeypatch.setattr(PlantBad, "run", lambda self, graph: runs.append(self.options.modules) or original(self, graph))

    def bisected(culprit: str) -> dict:
        runs.clear()
        js = tmp_path / f"{culprit}.json"
        invoke("debug", "bisect", "smollm2:2", "--pipeline", f"fold-norms,{culprit},dce", *SMALL, "--json", js, "-q")
        return json.loads(js.read_text())

    blocks_only = bisected("test-plant-bad")
    probes = [p["what"] for p in blocks_only["probes"]]
    assert blocks_only["culprit_layers"] == ["model.layers.1"]
    assert not any("on blocks [0,1]" in what for what in probes), probes
    assert len(runs) == 4 and sum(bool(m) for m in runs) == 2, runs  # whole run, re-check, blocks [0] and [1]
    with_head = bisected("test-plant-bad-and-head")
    assert with_head["culprit_layers"] == ["model.layers.1"]
    assert any("on blocks [0,1]" in p["what"] for p in with_head["probes"]), with_head["probes"]
    assert len(runs) == 5, runs


def test_a_gpt2_compiled_for_compressed_tensors_is_refused_before_any_pass(tmp_path, monkeypatch):
    """GPT-2's projections are Conv1D, which compressed-tensors cannot describe: `lowbit compile -f
    compressed-tensors` ran the whole pipeline (GPTQ's calibration included) and only then did the writer refuse.
    It is refused before any pass, naming the pass, a Conv1D linear, the format and the ways out (GPTQ where it
    holds the scheme, else lowbit with GPTQ's reason); the lowbit format takes the same pipeline."""
    from conftest import tiny_outside_family

    import lowbit.cli.main as cli_main

    tiny_outside_family("gpt2", layers=2).save_pretrained(tmp_path / "gpt2")
    ran = []
    real = cli_main.run_pipeline
    monkeypatch.setattr(cli_main, "run_pipeline", lambda *a, **k: ran.append(1) or real(*a, **k))
    int4_way = "or write --format gptq (symmetric int4/int8 weight-only; its loaders take Conv1D) or --format lowbit"
    w8a8_way = ("or write --format lowbit (gptq, whose loaders take Conv1D, cannot hold it either: pass "
                "quantize(w=int8,a=int8) quantizes input activations (a=int8), and format 'gptq' is weight-only)")
    for pipeline, where in [("quantize(w=int4,group=32,sym=true)", int4_way), ("quantize(w=int8,a=int8)", w8a8_way)]:
        res = invoke("compile", tmp_path / "gpt2", "-p", pipeline, "-f", "compressed-tensors", "-o",
                     tmp_path / "out", code=2)
        out = " ".join(res.output.split())
        assert (f"cannot write --format compressed-tensors: pass {pipeline.replace(',sym=true', '')} quantizes "
                "linear 'transformer.h.0.attn.c_attn' (and 7 more), a Conv1D in the HF model") in out, out
        assert f"keep those linears float (keep= or modules=), {where}" in out, out
        assert not ran and not (tmp_path / "out").exists()
    invoke("compile", tmp_path / "gpt2", "-p", "quantize(w=int4,group=32,sym=true)", "-o", tmp_path / "lowbit")
    assert ran


def _lowbit_import_subprocess(code: str) -> list[str]:
    """Run ``code`` in a fresh interpreter that imports this checkout's lowbit; its stdout lines."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                         os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout.splitlines()


def test_import_lowbit_and_the_cli_leave_transformers_and_sympy_unimported():
    """``import lowbit`` and the CLI's module imported transformers (~1 s of every command, ``lowbit --help`` too,
    and of every subprocess test) through the calibration texts' tokenizer type hints and ``AutoTokenizer``, and
    sympy (~0.35 CPU-s) through capture's and the dimension grammar's top-level imports: each is imported where it
    is used (a model or tokenizer loaded; an expression built). ``--help`` still lists the commands, and a dimension
    still parses and evaluates as before once one is read."""
    code = ("import sys, lowbit, lowbit.cli.main, lowbit.checkpoint, lowbit.eval.perplexity, lowbit.eval.embedding\n"
            "import lowbit.passes.manager, lowbit.ir.verifier\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('transformers', 'sympy')))\n"
            "from typer.testing import CliRunner\n"
            "res = CliRunner().invoke(lowbit.cli.main.app, ['--help'])\n"
            "print(res.exit_code, 'compile' in res.output, 'transformers' in sys.modules, 'sympy' in sys.modules)\n"
            "from lowbit.ir.symexpr import eval_dim, parse_dim\n"
            "print(parse_dim('ceiling(s0/64) + FloorDiv(s1, 2)'), eval_dim('ceiling(s0/64)', {'s0': 129}))\n")
    assert _lowbit_import_subprocess(code) == ["[]", "0 True False False", "ceiling(s0/64) + floor(s1/2) 3"]


def test_debug_sensitivity_runs_the_float_model_once(tmp_path, monkeypatch):
    """`lowbit debug sensitivity` without --pipeline ran the float graph whole twice: once as the reference, once
    more for the baseline (the same graph, the same inputs, the same output). It runs once; the baseline is the
    float metric all the same, each unit's damage measured from it (a --pipeline graph still gets its own reference
    run)."""
    from lowbit.cli.reuse import ReusedRuns

    whole: list[int] = []
    real = ReusedRuns._run_reference
    monkeypatch.setattr(ReusedRuns, "_run_reference", lambda self, g: whole.append(len(g.nodes)) or real(self, g))
    out = tmp_path / "sens.json"
    invoke("debug", "sensitivity", "smollm2:2", "--scheme", "w8a8", *SMALL, "-o", out)
    assert len(whole) == 1, whole
    data = json.loads(out.read_text())
    assert 1 < data["baseline"] < float("inf")
    assert all(r["damage"] == pytest.approx(r["metric"] - data["baseline"]) for r in data["ranking"])
    whole.clear()
    invoke("debug", "sensitivity", "smollm2:2", "--scheme", "w8a8", "--pipeline", "fold-norms", *SMALL, "-o", out)
    assert len(whole) == 2, whole


@pytest.fixture(autouse=True)
def _one_export_per_model(reuse_captures: object) -> None:
    """Every test here captures through the session's capture cache (conftest's ``reuse_captures``): a tiny model a
    test compiled before, or a checkpoint of the same content loaded again, is not exported again (torch.export
    takes seconds even on a tiny model); the CLI's own per-process cache of ``smollm2:2`` is untouched."""
