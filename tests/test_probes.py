"""The probes of issue 16 as a table: each bad input, the exit code ``lowbit --help`` documents for it, and a
fragment of the message. Rows marked ``before_load`` must fail before any model is loaded (loading raises
here), so a typo never costs a load, a capture or a GPTQ run.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import typer
from typer.testing import CliRunner

from lowbit.cli import common
from lowbit.cli.common import Exit
from lowbit.cli.main import app


@pytest.fixture
def no_model_load(monkeypatch):
    """Any model load fails the test: the probe must be refused before."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was found")

    monkeypatch.setattr(common, "_MODELS", {})
    monkeypatch.setattr("lowbit.models.load_model", refuse)


def run(args: list[object]) -> tuple[int, str]:
    res = CliRunner().invoke(app, [str(a) for a in args])
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        raise res.exception
    return res.exit_code, " ".join(res.output.split())


def _files(tmp: Path) -> dict[str, Path]:
    (tmp / "a_file").write_text("x")
    (tmp / "empty.json").write_text(json.dumps({"keep_float": ["no.such.module*"]}))
    (tmp / "binary.json").write_bytes(b"\xff\xfe\x00 not text")
    (tmp / "list.json").write_text("[1, 2]")
    return {"FILE": tmp / "a_file", "UNDER_FILE": tmp / "a_file" / "out", "OVERRIDES": tmp / "empty.json",
            "TMP": tmp, "BINARY_JSON": tmp / "binary.json", "LIST_JSON": tmp / "list.json", "NEW_DIR": tmp / "new",
            "NEW_SUBDIR": tmp / "new" / "repro"}


BEFORE_LOAD = [
    # semantic option checks: exit 2 (options)
    (["compile", "smollm2:2", "-p", "quantize(w=int5)"], Exit.USAGE, "unknown qdtype 'int5'"),
    (["compile", "smollm2:2", "-p", "gptq(damp=0)"], Exit.USAGE, "option damp: Input should be greater than 0"),
    (["compile", "smollm2:2", "-p", "gptq(block_size=0)"], Exit.USAGE, "option block_size"),
    (["compile", "smollm2:2", "-p", "smooth-quant(alpha=1.5)"], Exit.USAGE, "option alpha"),
    (["compile", "smollm2:2", "-p", "awq(sites=[norm;nope])"], Exit.USAGE, "unknown site(s) ['nope']"),
    (["compile", "smollm2:2", "-p", "quantize(w=fp8e4m3,sym=false)"], Exit.USAGE, "symmetric only"),
    # an unsigned grid asked to be symmetric (the default) would clamp every negative weight/activation to 0
    (["compile", "smollm2:2", "-p", "quantize(w=uint4,group=32)"], Exit.USAGE,
     "qdtype uint4 has no negative codes, so a symmetric scheme"),
    (["compile", "smollm2:2", "-p", "quantize(w=int8,a=uint8)"], Exit.USAGE, "sym / a_sym / kv_sym=false"),
    (["compile", "smollm2:2", "-p", "gptq(w=uint4,sym=true)"], Exit.USAGE, "qdtype uint4 has no negative codes"),
    (["compile", "smollm2:2", "-p", "sparsify(pattern=5:4)"], Exit.USAGE, "pattern '5:4': need 0 < N < M"),
    (["compile", "smollm2:2", "-p", "dce", "-b", "onnxruntime", "--backend-option", "weight_format=foo"], Exit.USAGE,
     "option weight_format: Input should be 'qdq' or 'matmulnbits'"),
    # options that would silently do nothing or the opposite of what they say
    (["compile", "smollm2:2", "-p", "fold-norms,dce", "--print-ir-after", "quantize"], Exit.USAGE,
     "the pipeline has no quantize pass (it runs fold-norms, dce)"),
    (["compile", "smollm2:2", "-p", "dce", "--filter", "mlp"], Exit.USAGE,  # it was ignored: no IR printed
     "--filter 'mlp' selects the nodes of printed IR, and nothing is printed"),
    (["debug", "bisect", "smollm2:2", "-p", "quantize(w=int8)", "--max-increase", "-5%"], Exit.USAGE,
     "--max-increase -5%: must be above 0"),
    (["debug", "bisect", "smollm2:2", "-p", "quantize(w=int8)", "--max-increase", "nan"], Exit.USAGE,
     "--max-increase 'nan': give a percentage like 5%"),
    (["debug", "bisect", "smollm2:2", "-p", "quantize(w=int8)", "--max-increase", "inf%"], Exit.USAGE,
     "--max-increase 'inf%': give a percentage like 5%"),
    (["debug", "sensitivity", "smollm2:2", "--scheme", "w4", "--group", "0"], Exit.USAGE, "--group 0: a weight group"),
    # they failed after the model load naming internal names ("max_windows must be at least 1", "n must be ...")
    (["debug", "compare", "smollm2:2", "-p", "dce", "--windows", "0"], Exit.USAGE, "--windows 0: give at least 1"),
    (["debug", "bisect", "smollm2:2", "-p", "dce", "--seq-len", "1"], Exit.USAGE, "--seq-len 1: give at least 2"),
    (["debug", "sensitivity", "minilm", "--sentences", "0"], Exit.USAGE, "--sentences 0: give at least 1"),
    (["debug", "sensitivity", "smollm2:2", "--scheme", "w4", "--keep-top", "-1"], Exit.USAGE, "--keep-top -1"),
    (["debug", "sensitivity", "smollm2:2", "--scheme", "w=int4,group=32", "--group", "64"], Exit.USAGE,
     "--group 64 applies to wNaM schemes"),
    # one linear at a time, the KV cache stayed float in every run: each linear ranked at +0 damage
    (["debug", "sensitivity", "smollm2:2", "--scheme", "quantize(kv=int2)", "--granularity", "linear"], Exit.USAGE,
     "--scheme quantize(kv=int2) quantizes the KV cache (kv=int2), which belongs to each block's attention"),
    (["debug", "sensitivity", "smollm2:2", "--scheme", "w=int4,kv=int4", "--granularity", "linear"], Exit.USAGE,
     "rank it per block (--granularity block)"),
    (["generate", "smollm2:2", "--prompt", "Hi", "--top-k", "50", "--temperature", "0.7"], Exit.USAGE,
     "--temperature, --top-k only apply when sampling: add --sample"),
    (["compile", "smollm2:2", "-p", "quantize(w=int4,w=int8)"], Exit.USAGE, "option 'w' is given twice"),
    (["compile", "smollm2:2", "-p", "dce", "--backend-option", "keep_packed=true", "--backend-option",
      "keep_packed=false"], Exit.USAGE, "--backend-option keep_packed is given twice"),  # the last silently won
    (["compile", "smollm2:2", "-p", "DCE"], Exit.USAGE, "unknown pass 'DCE'; did you mean 'dce'?"),
    (["compile", "smollm2:2", "-p", "quantize(w=int4 group=64)"], Exit.USAGE, "options are separated by commas"),
    (["compile", "smollm2:2", "-p", "kv-cache(bits=5)"], Exit.USAGE,
     "pass kv-cache: bits=5: the packed cache stores 8, 4 or 2-bit codes"),
    (["compile", "smollm2:2", "-p", "quantize(w=int4,nonfinite=maybe)"], Exit.USAGE, "option nonfinite"),
    # missing files named by pass options: exit 3 (files), every pass of the pipeline checked
    (["compile", "smollm2:2", "-p", "fold-norms,gptq(calib=/no/such/text.txt)"], Exit.NOT_FOUND,
     "pass gptq: option calib='/no/such/text.txt': no such file"),
    (["compile", "smollm2:2", "-p", "gptq(w=int4),quantize(config=/no/cfg.json)"], Exit.NOT_FOUND,
     "option config='/no/cfg.json': no such file"),
    (["compile", "smollm2:2", "-p", "smooth-quant(tokenizer=/no/tok),quantize(w=int8,a=int8)"], Exit.NOT_FOUND,
     "option tokenizer='/no/tok'"),
    # output paths: a file where a directory goes is a bad argument, an unwritable place a file problem
    (["compile", "smollm2:2", "-p", "dce", "--out", "FILE"], Exit.USAGE, "exists and is not a directory"),
    (["compile", "smollm2:2", "-p", "dce", "--out", "UNDER_FILE"], Exit.NOT_FOUND, "is not a directory"),
    (["compile", "smollm2:2", "-p", "dce", "--out", "/proc/lowbit-out"], Exit.NOT_FOUND, "cannot be written"),
    (["compile", "smollm2:2", "-p", "dce", "--reproducer", "FILE"], Exit.USAGE, "--reproducer"),
    # a failing run wrote its reproducer over an earlier output (OUT is replaced only when the run succeeds)
    (["compile", "smollm2:2", "-p", "dce", "-o", "NEW_DIR", "--reproducer", "NEW_DIR"], Exit.USAGE, "overlap"),
    (["compile", "smollm2:2", "-p", "dce", "-o", "NEW_DIR", "--reproducer", "NEW_SUBDIR"], Exit.USAGE, "overlap"),
    (["debug", "compare", "smollm2:2", "-p", "dce", "--json", "TMP"], Exit.USAGE, "is a directory"),
    (["debug", "compare", "smollm2:2", "-p", "dce", "--json", "FILE", "--html", "FILE"], Exit.USAGE,
     "--json and --html both name"),  # the HTML report silently replaced the JSON numbers
    (["debug", "bisect", "smollm2:2", "-p", "dce", "--json", "UNDER_FILE"], Exit.NOT_FOUND, "cannot be written"),
    (["debug", "sensitivity", "smollm2:2", "--out", "/proc/x.json"], Exit.NOT_FOUND, "cannot be written"),
    (["graph", "/no/such.lowbit", "--out", "/proc/x.html"], Exit.NOT_FOUND, "cannot be written"),
    # an override file that cannot be read as one: exit 3 as any unreadable input (binary: a traceback; not JSON: 2)
    (["compile", "smollm2:2", "-p", "quantize(w=int8)", "--overrides", "BINARY_JSON"], Exit.NOT_FOUND, "is not JSON"),
    (["compile", "smollm2:2", "-p", "quantize(w=int8)", "--overrides", "FILE"], Exit.NOT_FOUND, "is not JSON"),
    (["compile", "smollm2:2", "-p", "quantize(w=int8)", "--overrides", "LIST_JSON"], Exit.NOT_FOUND,
     "needs a 'keep_float' list"),
    (["compile", "smollm2:2", "-p", "quantize(w=int8)", "--overrides", "TMP"], Exit.NOT_FOUND, "is a directory"),
]


@pytest.mark.parametrize("args, code, fragment", BEFORE_LOAD, ids=[" ".join(a[:4]) for a, _, _ in BEFORE_LOAD])
def test_probe_refused_before_loading_the_model(tmp_path, no_model_load, args, code, fragment):
    files = _files(tmp_path)
    got, out = run([files.get(a, a) if isinstance(a, str) else a for a in args])
    assert got == int(code), out
    assert fragment in out, out


def test_a_model_lowbit_cannot_capture_is_an_error_line_not_a_traceback(tmp_path, monkeypatch):
    """A dynamic-RoPE model (refused when wrapped) and one whose forward writes a buffer (refused at capture) ended
    `lowbit compile` and `debug compare` in a CaptureError traceback (exit 1); they are one error line, exit 4, as
    `python -m lowbit` reports them."""
    from conftest import tiny_llama

    from lowbit.data.model_files import load_tokenizer

    monkeypatch.setattr(common, "_MODELS", {})
    monkeypatch.setattr(common, "_GRAPHS", {})
    tok = load_tokenizer("smollm2")
    torch.manual_seed(0)
    tiny_llama(vocab=49152, rope_scaling={"rope_type": "dynamic", "factor": 2.0}).save_pretrained(tmp_path / "dyn")
    tok.save_pretrained(tmp_path / "dyn")

    class Counter(torch.nn.Module):  # a buffer written in forward, which capture refuses
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("calls", torch.zeros(1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.calls.add_(1)
            return x * 2

    for args, fragment in [(["compile", tmp_path / "dyn", "-p", "dce"], "rope_type 'dynamic' (dynamic NTK scaling)"),
                           (["debug", "compare", tmp_path / "dyn", "-p", "dce"], "rope_type 'dynamic'")]:
        got, out = run(args)
        assert got == int(Exit.PIPELINE) and fragment in out, out
    monkeypatch.setattr(common, "_MODELS", {"counter": common.LoadedModel("counter", Counter(), None, "other")})
    monkeypatch.setattr("lowbit.api._default_example", lambda m, t: ((torch.ones(2, 3),), None))
    with pytest.raises(typer.Exit) as info:
        common.capture_model(common.load("counter"))
    assert info.value.exit_code == int(Exit.PIPELINE)


# ---- python -m lowbit ---------------------------------------------------------------------------

MAIN_PROBES = [
    (["--seq-len", "1"], Exit.USAGE, "--seq-len 1"),
    (["--windows", "-1"], Exit.USAGE, "--windows -1"),
    (["--text", "/no/such/text.txt"], Exit.NOT_FOUND, "no such file"),
    (["--recipe", "nope"], Exit.USAGE, "unknown recipe 'nope'"),
    (["--recipe", "w4a16-gptq", "--pipeline", "dce"], Exit.USAGE, "not allowed with argument"),
    (["--pipeline", "quantize(w=int5)"], Exit.USAGE, "unknown qdtype 'int5'"),
    (["--pipeline", "gptq(calib=/no/calib.txt)"], Exit.NOT_FOUND, "option calib='/no/calib.txt'"),
    (["--model", "/no/such/model", "--pipeline", "dce"], Exit.NOT_FOUND, "no such file or directory"),
    (["--model", "smollm2:0", "--pipeline", "dce"], Exit.USAGE, "at least 1"),
    (["--model", "minilm", "--pipeline", "dce"], Exit.USAGE, "Measure an encoder with `lowbit debug compare minilm"),
]


@pytest.mark.parametrize("argv, code, fragment", MAIN_PROBES, ids=[" ".join(a) for a, _, _ in MAIN_PROBES])
def test_main_job_probes_exit_with_documented_codes_before_any_float_run(capsys, monkeypatch, argv, code, fragment):
    from lowbit.__main__ import main

    monkeypatch.setattr("lowbit.eval.perplexity", lambda *a, **k: pytest.fail("perplexity ran"))
    if not {"/no/such/model", "smollm2:0", "minilm"} & set(argv):  # these are found loading (minilm: its kind)
        monkeypatch.setattr("lowbit.models.load_model", lambda *a, **k: pytest.fail("model loaded"))
    try:
        got = main(argv)
    except SystemExit as exc:  # argparse's own errors
        got = exc.code
    err = " ".join(capsys.readouterr().err.split())
    assert got == int(code), err
    assert fragment in err, err


def test_main_job_binary_text_exits_3_before_the_model_loads(capsys, monkeypatch, tmp_path):
    """A binary --text exited 2 (a bad flag) after loading the model, quoting the codec's "can't decode byte"."""
    from lowbit.__main__ import main

    monkeypatch.setattr("lowbit.models.load_model", lambda *a, **k: pytest.fail("model loaded"))
    binary = tmp_path / "weights.bin"
    binary.write_bytes(b"\xbb\xff" * 64)
    assert main(["--text", str(binary), "--pipeline", "dce"]) == int(Exit.NOT_FOUND)
    err = " ".join(capsys.readouterr().err.split())
    assert "weights.bin' is not UTF-8 text (byte 0xbb at offset 0)" in err, err


@pytest.mark.parametrize("content, fragment", [(b"", "is empty"), (b"\xff\xfe text", "is not UTF-8 text"),
                                               (b"abc", "cannot be read as token ids")],
                         ids=["empty", "binary", "bad-safetensors"])
def test_main_job_unreadable_calibration_file_exits_3_before_the_model_loads(capsys, monkeypatch, tmp_path, content,
                                                                             fragment):
    """An empty or binary calib= file was found only inside the pass: after the model load and the float
    perplexity run, as a pass failure (exit 4); it is a file problem (exit 3) before the model is loaded."""
    from lowbit.__main__ import main

    monkeypatch.setattr("lowbit.models.load_model", lambda *a, **k: pytest.fail("model loaded"))
    calib = tmp_path / ("calib.safetensors" if fragment.startswith("cannot") else "calib.txt")
    calib.write_bytes(content)
    assert main(["--pipeline", f"gptq(calib={calib})", "--save", ""]) == int(Exit.NOT_FOUND)
    err = " ".join(capsys.readouterr().err.split())
    assert f"option calib='{calib}'" in err and fragment in err, err


def test_main_job_fits_seq_len_and_the_checkpoint_check_to_the_models_positions(capsys, monkeypatch, tmp_path):
    """A model of 32 positions: --seq-len 64 ran the float perplexity and the compile, then failed as a pipeline
    error (exit 4) on the graph's input range; it is exit 2 before the float run. With --seq-len 16 the checkpoint
    check cut a 128-token window the graph cannot take, and exited 4 after saving; it checks 16 tokens."""
    from conftest import tiny_llama

    from lowbit.__main__ import main
    from lowbit.data.model_files import load_tokenizer

    torch.manual_seed(0)
    tiny_llama(vocab=49152, max_positions=32).save_pretrained(tmp_path / "tiny")
    load_tokenizer("smollm2").save_pretrained(tmp_path / "tiny")
    argv = ["--model", str(tmp_path / "tiny"), "--pipeline", "quantize(w=int4,group=16)", "--windows", "1"]
    with monkeypatch.context() as m:
        m.setattr("lowbit.eval.perplexity", lambda *a, **k: pytest.fail("perplexity ran"))
        assert main([*argv, "--seq-len", "64", "--save", ""]) == int(Exit.USAGE)
    err = " ".join(capsys.readouterr().err.split())
    assert "--seq-len 64: " in err and "takes at most 32 tokens (max_position_embeddings" in err, err
    assert main([*argv, "--seq-len", "16", "--save", str(tmp_path / "ckpt")]) == 0
    out = capsys.readouterr().out
    assert "max |logit diff| vs lowbit 0 on 16 tokens" in out, out


def test_main_job_runs_on_a_slice(capsys, tmp_path):
    """``--model smollm2:2`` (a slice, as the CLI takes it) runs end to end, prints both perplexities, saves a
    compressed-tensors checkpoint and reports transformers' logits on it."""
    from lowbit.__main__ import main

    save = tmp_path / "ckpt"
    assert main(["--model", "smollm2:2", "--recipe", "w4a16-g64", "--windows", "1", "--seq-len", "32",
                 "--save", str(save)]) == 0
    out = capsys.readouterr().out
    assert "smollm2:2 with recipe w4a16-g64: perplexity" in out
    assert (save / "config.json").is_file() and (save / "lowbit-manifest.json").is_file()
    line = next(ln for ln in out.splitlines() if "transformers.AutoModelForCausalLM loads it" in ln)
    diff = float(line.split("max |logit diff| vs lowbit ")[1].split()[0])
    assert diff < 1e-3, line


def test_main_job_saves_lowbit_format_when_compressed_tensors_cannot_express_the_graph(capsys, tmp_path):
    """An online Hadamard (w4a4kv4-rtn) has no compressed-tensors field: the main job said so and saved nothing,
    pointing at a format option it does not have; it now saves lowbit's own format and checks the reload."""
    from lowbit.__main__ import main

    save = tmp_path / "ckpt"
    assert main(["--model", "smollm2:2", "--recipe", "w4a4kv4-rtn", "--windows", "1", "--seq-len", "32",
                 "--save", str(save)]) == 0
    out = capsys.readouterr().out
    assert "not expressible as compressed-tensors" in out and "online Hadamard" in out, out
    assert (save / "model.lowbit").is_file() and (save / "lowbit-manifest.json").is_file()
    line = next(ln for ln in out.splitlines() if "lowbit.load reloads it" in ln)
    assert float(line.split("max |logit diff| vs lowbit ")[1].split()[0]) == 0.0, line


def test_main_job_saves_a_float_pruned_model_for_transformers_and_checks_it(capsys, monkeypatch, tmp_path):
    """A pruning pipeline leaves a float graph: compressed-tensors has nothing to describe, and the main job saved
    lowbit's own format and checked only lowbit's reload, though the refusal itself pointed at format='hf' (a
    plain transformers directory with the pruned sizes). It saves that and runs it in transformers."""
    from conftest import tiny_llama

    from lowbit.__main__ import main
    from lowbit.data.model_files import load_tokenizer

    torch.manual_seed(0)
    tiny_llama(inter=128, vocab=49152, max_positions=32).save_pretrained(tmp_path / "tiny")
    load_tokenizer("smollm2").save_pretrained(tmp_path / "tiny")
    save = tmp_path / "ckpt"
    assert main(["--model", str(tmp_path / "tiny"), "--pipeline", "prune-mlp(ratio=0.5,score=magnitude,multiple=16)",
                 "--windows", "1", "--seq-len", "16", "--save", str(save)]) == 0
    out = capsys.readouterr().out
    assert json.loads((save / "config.json").read_text())["intermediate_size"] == 64
    assert not (save / "model.lowbit").exists()
    line = next(ln for ln in out.splitlines() if "transformers.AutoModelForCausalLM loads it" in ln)
    assert "(hf)" in line and float(line.split("max |logit diff| vs lowbit ")[1].split()[0]) < 1e-5, line


def test_main_job_checks_the_saved_checkpoint_on_a_text_shorter_than_128_tokens(capsys, tmp_path):
    """The checkpoint check cut one 128-token window from --text: a text long enough for --seq-len but shorter
    than 128 tokens ended the whole run in a ValueError traceback (exit 1) after the compile; it is checked on
    the whole text."""
    from lowbit.__main__ import main

    text = tmp_path / "short.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 8)
    save = tmp_path / "ckpt"
    assert main(["--model", "smollm2:1", "--recipe", "w4a16-g64", "--windows", "2", "--seq-len", "16",
                 "--text", str(text), "--save", str(save)]) == 0
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if "transformers.AutoModelForCausalLM loads it" in ln)
    assert " on 16 tokens," in line, line


# ---- probes that need the model (they are about the model) ------------------------------------------

AFTER_LOAD = [
    (["compile", "smollm2:2", "-p", "quantize(w=int4,group=64)", "--overrides", "OVERRIDES"], Exit.USAGE,
     "keep_float glob 'no.such.module*' matches no linear module"),
    (["compile", "smollm2:2", "-p", "quantize(w=int4,keep=[no.such.*])"], Exit.PIPELINE,
     "option keep[0] 'no.such.*' matches no linear module"),
]


def test_debug_windows_that_cannot_fit_in_memory_are_refused(monkeypatch):
    """debug compare/bisect/sensitivity hold every window's logits: a request past the machine's memory was an
    allocator traceback (or swapped the machine at 22.8 GB); it is refused with the window count that fits."""
    from lowbit.cli import probes

    monkeypatch.setattr(probes, "_available_bytes", lambda: 4 * 2**30)
    got, out = run(["debug", "compare", "smollm2:2", "-p", "quantize(w=int4)", "--windows", "16", "--seq-len", "512"])
    assert got == int(Exit.USAGE), out
    assert "--windows 16 x --seq-len 512 needs ~21.0 GiB" in out and "use --windows 2 or fewer" in out, out


@pytest.mark.parametrize("args, code, fragment", AFTER_LOAD, ids=[" ".join(a[:5]) for a, _, _ in AFTER_LOAD])
def test_probe_silent_no_ops_are_errors(tmp_path, args, code, fragment):
    files = _files(tmp_path)
    got, out = run([files.get(a, a) if isinstance(a, str) else a for a in args])
    assert got == int(code), out
    assert fragment in out, out


def _main_help(capsys) -> str:
    from lowbit.__main__ import main

    with pytest.raises(SystemExit):
        main(["--help"])
    return " ".join(capsys.readouterr().out.split())


def test_every_probe_code_is_one_lowbit_help_documents(capsys):
    """``lowbit --help`` is the one source of truth: ``python -m lowbit --help`` prints the same descriptions (of the
    codes it returns), and every code the probe tables expect is in the help of the program that returned it."""
    from lowbit.cli.common import EXIT_CODES_HELP

    main_help = _main_help(capsys)
    for part in main_help.split("Exit codes: ")[1].rstrip(".").split("; "):
        if part[:1].isdigit():
            assert part in " ".join(EXIT_CODES_HELP.split()), part
    for _, code, _ in BEFORE_LOAD + AFTER_LOAD:
        assert f"{int(code)} " in EXIT_CODES_HELP
    for _, code, _ in MAIN_PROBES:
        assert f"; {int(code)} " in main_help


def _exit_codes_in(path: Path) -> tuple[set[str], list[str]]:
    """The ``Exit`` members a CLI module names (outside ``class Exit`` and the docs table), and every exit call
    (``typer.Exit``, ``sys.exit``, ``SystemExit``) whose code is an int literal, as ``file:line code``."""
    import ast

    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == "Exit" or \
                isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "_EXIT_DOCS" for t in node.targets):
            skip.update(id(n) for n in ast.walk(node))
    named = {n.attr for n in ast.walk(tree) if id(n) not in skip and isinstance(n, ast.Attribute)
             and isinstance(n.value, ast.Name) and n.value.id == "Exit"}
    literal = []
    for n in ast.walk(tree):
        if isinstance(n, ast.Call) and n.args and isinstance(n.args[0], ast.Constant) and (
                isinstance(n.func, ast.Attribute) and n.func.attr in ("Exit", "exit") or
                isinstance(n.func, ast.Name) and n.func.id in ("SystemExit", "Exit")):
            literal.append(f"{path.name}:{n.lineno} {n.args[0].value}")
    return named, literal


def test_every_documented_exit_code_is_used_and_every_used_one_documented(capsys):
    """``python -m lowbit --help`` listed 6 (debug bisect's, which it has no command for) and pointed code 4 at a
    --reproducer flag it does not take. Walking the CLI's code: every code a program's help lists is one it
    names (0 and 1 are Python's: a normal end and an uncaught exception), no exit call passes a bare number, and
    ``python -m lowbit``'s help lists exactly the codes its own module names."""
    import lowbit

    root = Path(lowbit.__file__).parent
    named: set[str] = set()
    literal: list[str] = []
    for path in sorted((root / "cli").glob("*.py")) + [root / "__main__.py"]:
        n, lit = _exit_codes_in(path)
        named |= n
        literal += lit
    assert not literal, f"exit with a bare number instead of an Exit member: {literal}"
    implicit = {"OK", "INTERNAL"}
    assert {e.name for e in Exit} - implicit <= named, {e.name for e in Exit} - implicit - named
    assert named <= {e.name for e in Exit}
    main_named, _ = _exit_codes_in(root / "__main__.py")
    listed = {int(c) for c in re.findall(r"(?:^|; )(\d) ", _main_help(capsys).split("Exit codes: ")[1])}
    assert listed == {int(Exit[name]) for name in main_named | implicit}, listed


def test_bisect_and_sensitivity_point_at_the_compile_that_saves_a_reproducer():
    """They have no --reproducer flag; a failing pass told the user to rerun with one ("No such option")."""
    for args in (["debug", "bisect", "smollm2:2", "--windows", "1", "--seq-len", "32", "-p",
                  "fold-norms,quantize(w=int4,group=100)"],
                 ["debug", "sensitivity", "smollm2:2", "--windows", "1", "--seq-len", "32", "--scheme",
                  "w=int4,group=100"]):
        got, out = run(args)
        out = " ".join(out.split())
        assert got == int(Exit.PIPELINE), out
        assert "rerun with --reproducer" not in out, out
        assert "`lowbit compile smollm2:2 --pipeline" in out and "--reproducer DIR` saves the IR" in out, out


def test_a_perplexity_past_the_float_range_is_inf_not_an_overflow_traceback():
    """Logits a pass blew up (mean loss > 709 nats) made math.exp raise OverflowError: debug compare, bisect and
    sensitivity ended in a traceback (exit 1) instead of reporting the pass as infinitely bad."""
    import math

    from lowbit.cli.bisect import exceeds
    from lowbit.cli.probes import EvalInputs, end_metric, fmt_metric

    ids = torch.arange(8)[None, :] % 4
    logits = torch.zeros(1, 8, 4)
    logits[..., 0] = 1e5  # every prediction is token 0 with certainty; most targets are not
    ppl = end_metric("ppl", EvalInputs("causal-lm", (ids,), "x"), logits, None)
    assert ppl == math.inf and fmt_metric("ppl", ppl) == "inf" and exceeds(ppl, 40.0)


def test_debug_perplexity_sums_the_loss_in_float64_on_a_long_text():
    """debug compare / bisect / sensitivity summed the cross-entropy in float32 (reduction='sum'): over 16k tokens of
    WikiText-2 the perplexity drifted ~5e-7 from the exact value. Now it matches an independent float64 log-softmax
    to float32 rounding of each token's loss, and lowbit.eval.perplexity's sum on the same logits."""
    import math

    from lowbit.cli.probes import EvalInputs, end_metric
    from lowbit.eval.perplexity import nll_sum, token_ids, windows
    from lowbit.models import load_smollm2_tokenizer

    vocab = 1000
    ids = windows(token_ids("wikitext2-test", load_smollm2_tokenizer()), 2048, 8) % vocab
    logits = torch.randn(*ids.shape, vocab) * 3
    ppl = end_metric("ppl", EvalInputs("causal-lm", (ids,), "wt2"), logits, None)
    logp = torch.log_softmax(logits[:, :-1].double(), dim=-1).gather(-1, ids[:, 1:, None])
    exact = math.exp(-logp.sum().item() / ids[:, 1:].numel())
    assert abs(ppl / exact - 1) < 5e-8, (ppl, exact)
    assert ppl == math.exp(nll_sum(logits[:, :-1], ids[:, 1:]) / ids[:, 1:].numel())


TOO_LONG = "smooth-quant(calib_n=500,calib_len=512)"


@pytest.mark.parametrize("args", [
    ["compile", "smollm2:2", "-p", TOO_LONG],
    ["debug", "compare", "smollm2:2", "-p", TOO_LONG],
    ["debug", "bisect", "smollm2:2", "-p", TOO_LONG],
    ["debug", "sensitivity", "smollm2:2", "-p", TOO_LONG, "--scheme", "w8"],
], ids=["compile", "compare", "bisect", "sensitivity"])
def test_every_command_checks_the_calibration_length_before_the_capture(monkeypatch, args):
    """`compile` refused a calibration text too short for calib_n x calib_len before capturing the model; the debug
    commands captured it, ran the float reference (and bisect its baseline) and failed only when the pass ran. All
    four now refuse it with exit 2 before the capture."""
    def refuse(*a, **k):
        raise AssertionError("the model was captured before the short calibration text was found")

    import sys

    monkeypatch.setattr(common, "_GRAPHS", {})
    monkeypatch.setattr(sys.modules["lowbit.ir.capture"], "capture", refuse)
    got, out = run(args)
    assert got == int(Exit.USAGE), out
    assert "pass smooth-quant: option calib='wikitext2-valid-calib'" in out and "but n=500" in out, out


def test_main_save_help_names_the_lowbit_format_it_falls_back_to(capsys):
    """``python -m lowbit --save`` writes lowbit's own format and reloads it with lowbit.load when neither
    compressed-tensors nor a plain transformers directory holds the graph (``_save_and_check``); its help said only
    that it writes a compressed-tensors or transformers checkpoint and runs it in transformers."""
    text = _main_help(capsys)
    assert "lowbit's own format" in text and "lowbit.load" in text, text


@pytest.fixture(autouse=True)
def _one_export_per_model(reuse_captures: object) -> None:
    """Every test here captures through the session's capture cache (conftest's ``reuse_captures``): the main job's
    tests each load and compile the same ``smollm2:2`` slice afresh, which was exported again for each."""
