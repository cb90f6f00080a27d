"""Untrusted artefacts never run code: planted ops, dimension expressions and reproducer paths are refused
before anything executes, through the API and through every CLI command that reads a file.

Each attack writes a marker file if it runs; every test asserts the marker never appears.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from lowbit.cli.artifacts import save_graph
from lowbit.cli.main import app
from lowbit.errors import LowbitError, UntrustedInputError
from lowbit.ir.graph import TensorType
from lowbit.ir.ops import UnknownOpError, check_op, resolve
from lowbit.ir.parser import IRParseError, parse_graph
from lowbit.ir.symexpr import DimParseError, eval_dim, parse_dim
from lowbit.ir.verifier import VerificationError, verify

SAFE = """\
graph tiny(%x: f32[2,s0,8]) {
  symbol s0 in [1, 64] hint 4
  param @proj.weight: f32[16,8]
  %y: f32[2,s0,16] = linear(%x, @proj.weight)  # proj
  return %y
}
"""
WEIGHTS = {"proj.weight": torch.randn(16, 8)}


def planted_ops(marker: Path) -> dict[str, str]:
    """IR texts whose one extra node would create ``marker`` (or read a file) if lowbit ran it."""
    cmd = json.dumps(f"touch {marker}")
    node = "  %z: ? = {op}({arg})\n  return %y\n"
    cases = {
        "torch.os.system": cmd,
        "builtins.eval": json.dumps(f"__import__('os').system('touch {marker}')"),
        "os.system": cmd,
        "torch._C._get_tracing_state": "",
        "operator.methodcaller": json.dumps("system"),
        "math.os.system": cmd,
        "aten.from_file.default": json.dumps(str(marker)),  # a real ATen op that reads files: not allowlisted
        "torch.ops.aten.add.Tensor": "%x, %x",
    }
    return {op: SAFE.replace("  return %y\n", node.format(op=op, arg=arg)) for op, arg in cases.items()}


def planted_dims(marker: Path) -> list[str]:
    """IR texts whose dimension strings would run code under ``sympy.sympify``."""
    payload = json.dumps(f"import os; os.system('touch {marker}')")
    return [
        SAFE.replace("%y: f32[2,s0,16]", f"%y: f32[2,exec({payload}),16]"),
        SAFE.replace("%x: f32[2,s0,8]", '%x: f32[2,__import__("os"),8]'),
        SAFE.replace("%x: f32[2,s0,8]", f"%x: f32[2,__import__('os').system('touch {marker}'),8]"),
        SAFE.replace("  return %y\n", f"  %s: sym(exec({payload})) = aten.sym_size.int(%x, 1)\n  return %y\n"),
    ]


def test_safe_ir_parses_verifies_and_runs():
    from lowbit.backends.torch_backend import TorchCompiled

    g = parse_graph(SAFE, WEIGHTS)
    verify(g)
    x = torch.randn(2, 3, 8)
    assert torch.equal(TorchCompiled(g)(x), torch.nn.functional.linear(x, WEIGHTS["proj.weight"]))


@pytest.mark.parametrize("op", list(planted_ops(Path("m"))))
def test_parser_refuses_planted_ops_with_line_and_caret(tmp_path, op):
    marker = tmp_path / "marker"
    text = planted_ops(marker)[op]
    with pytest.raises(IRParseError) as info:
        parse_graph(text, WEIGHTS)
    msg = str(info.value)
    assert "line 5" in msg and op in msg and "^" in msg
    caret_line, src_line = msg.splitlines()[-1], msg.splitlines()[-2]
    assert src_line[caret_line.index("^"):].startswith(op)  # the caret points at the op name
    assert isinstance(info.value, LowbitError)
    assert not marker.exists()


@pytest.mark.parametrize("op", ["torch.os.system", "builtins.eval", "aten.from_file.default", "torch.load",
                                "operator.attrgetter", "math.__loader__", "prims.device_put.default"])
def test_resolve_and_verifier_refuse_planted_ops_built_through_the_api(tmp_path, op):
    """A Graph built in Python (not parsed) is checked again where ops are looked up: resolve, verify, lower."""
    from lowbit.backends.torch_backend import LoweringError, TorchCompiled

    marker = tmp_path / "marker"
    assert check_op(op) is not None
    with pytest.raises(UnknownOpError, match="allowlist|unknown op"):
        resolve(op)
    g = parse_graph(SAFE, WEIGHTS)
    node = g.make_node(op, [f"touch {marker}"], type=None)
    g.insert_after(g.nodes[-1], node)
    with pytest.raises(VerificationError, match="unknown op|allowlist"):
        verify(g)
    with pytest.raises(LoweringError):
        TorchCompiled(g)
    assert not marker.exists()


def test_registered_and_allowlisted_ops_resolve():
    assert resolve("linear") is not None and resolve("quantize") is not None
    assert resolve("aten.add.Tensor") is torch.ops.aten.add.Tensor
    assert resolve("operator.floordiv")(7, 2) == 3
    with pytest.raises(TypeError, match="takes numbers"):
        resolve("operator.mul")("x" * 8, 10**12)  # a file cannot make lowbit build a huge string
    assert check_op("aten.add.Tensor") is None and check_op("rms_norm") is None


@pytest.mark.parametrize("index", range(4))
def test_parser_refuses_code_in_dimension_strings(tmp_path, index):
    marker = tmp_path / "marker"
    text = planted_dims(marker)[index]
    with pytest.raises(IRParseError, match="line \\d+"):
        parse_graph(text, WEIGHTS)
    assert not marker.exists()


@pytest.mark.parametrize("dim", ["__import__('os').system('touch {m}')", "exec('1')", "s0.__class__", "s0; 1",
                                 "lambda: 1", "s0 ** 2", "1e9", "s0 // 0", "", "(((s0)", "s0[0]",
                                 "Max(s0)", "getattr(s0, 'x')"])
def test_dimension_grammar_refuses_everything_but_arithmetic(tmp_path, dim):
    marker = tmp_path / "marker"
    with pytest.raises(DimParseError):
        parse_dim(dim.format(m=marker))
    assert not marker.exists()


@pytest.mark.parametrize("dim, value", [("s0", 5), ("2*s0", 10), ("(s1//2)", 3), ("s0+s1-1", 11),
                                        ("s1 % 4", 3), ("ceiling(s0/2)", 3), ("Max(1, s0-7)", 1),
                                        ("-s0 + 8", 3), ("FloorDiv(s1, 4)", 1)])
def test_dimension_grammar_reads_what_capture_prints(dim, value):
    assert eval_dim(dim, {"s0": 5, "s1": 7}) == value
    assert eval_dim(dim, {}) is None


def test_verifier_and_quantize_probe_refuse_code_in_api_built_dims(tmp_path):
    """Dims set in Python bypass the parser; the verifier's evaluator is the same grammar."""
    marker = tmp_path / "marker"
    g = parse_graph(SAFE, WEIGHTS)
    g.inputs[0].type = TensorType(torch.float32, (2, f"__import__('os').system('touch {marker}')", 8))
    with pytest.raises(DimParseError):
        verify(g)
    assert not marker.exists()


# ---- reproducer paths ---------------------------------------------------------------------------

def _reproducer(tmp_path: Path, ir_text: str = SAFE, **manifest: str) -> Path:
    d = tmp_path / "repro"
    d.mkdir(parents=True)
    (d / "before.lowbit").write_text(ir_text)
    from safetensors.torch import save_file

    save_file(WEIGHTS, str(d / "before.safetensors"))
    data = {"ir": "before.lowbit", "params": "before.safetensors", "replay_pipeline": "dce",
            "versions": {"lowbit": "0.1.0"}}
    data.update(manifest)
    (d / "reproducer.json").write_text(json.dumps(data))
    return d


def invoke(*args: str, code: int):
    res = CliRunner().invoke(app, [str(a) for a in args])
    assert res.exit_code == code, (res.exit_code, res.output, res.exception)
    return res


def test_clean_reproducer_replays(tmp_path):
    assert "no longer reproduces" in invoke("replay", _reproducer(tmp_path), code=0).output


@pytest.mark.parametrize("key", ["ir", "params"])
@pytest.mark.parametrize("path", ["../../etc/passwd", "/etc/passwd", "sub/../../outside.lowbit"])
def test_reproducer_paths_are_confined(tmp_path, key, path):
    from lowbit.cli.reproducer import confined

    d = _reproducer(tmp_path, **{key: path})
    with pytest.raises(UntrustedInputError, match="leaves the reproducer directory"):
        confined(d, path, key)
    out = invoke("replay", d, code=3).output
    assert "leaves the reproducer directory" in out and key in out


@pytest.mark.parametrize("key", ["ir", "params"])
def test_reproducer_path_the_system_cannot_open_is_refused(tmp_path, key):
    """A 5000-character name made replay's is_file() raise OSError 'File name too long': a traceback, exit 1."""
    out = invoke("replay", _reproducer(tmp_path, **{key: "x" * 5000}), code=3).output
    assert "is not a file name this system can open" in out and key in out


@pytest.mark.parametrize("key", ["ir", "params"])
def test_reproducer_entry_that_is_a_symlink_loop_is_refused(tmp_path, key):
    """A listed file that is a symlink to itself: replay's resolve() raised RuntimeError ('Symlink loop from ...'),
    a traceback, exit 1; it is asked what every listed name is (checkpoint.files.unopenable), exit 3."""
    d = _reproducer(tmp_path, **{key: "loop"})
    (d / "loop").symlink_to("loop")
    out = " ".join(invoke("replay", d, code=3).output.split())
    assert f"{key} entry 'loop' is not a file name this system can open (Too many levels of symbolic links)" in out


def test_an_artifact_file_without_a_manifest_that_is_a_symlink_loop_is_refused(tmp_path, name="params.safetensors"):
    """check_inside resolved a link to itself: RuntimeError ('Symlink loop from ...'), a traceback from inspect."""
    from safetensors.torch import save_file

    art = tmp_path / "art"
    art.mkdir()
    (art / "model.lowbit").write_text(SAFE)
    save_file(WEIGHTS, str(art / "params.safetensors"))
    (art / name).unlink()
    (art / name).symlink_to(name)
    out = " ".join(invoke("inspect", art, code=3).output.split())
    assert f"{name}: is a symlink this system cannot follow (Too many levels of symbolic links)" in out, out


@pytest.mark.parametrize("make, why", [
    (lambda p: p.symlink_to(p.name), "Too many levels of symbolic links"),
    (lambda p: p.symlink_to("gone.lowbit"), "a symlink to 'gone.lowbit', which does not exist"),
    (lambda p: p.mkdir(), "a directory, not a file"),
])
def test_a_model_lowbit_that_cannot_be_read_is_named_with_the_reason(tmp_path, make, why):
    """A directory whose model.lowbit was a symlink loop (or a dangling link, or a directory) read as one without
    it: inspect said 'has no model.lowbit, model.onnx or config.json', lowbit.load 'not a checkpoint lowbit reads'."""
    import lowbit
    from lowbit.checkpoint import CheckpointError

    art = tmp_path / "art"
    art.mkdir()
    make(art / "model.lowbit")
    for command in ("inspect", "graph"):
        out = " ".join(invoke(command, art, code=3).output.split())
        assert f"{art / 'model.lowbit'}' cannot be read: {why}" in out, out
    with pytest.raises(CheckpointError, match=f"model.lowbit: cannot be read: {why}"):
        lowbit.load(art)


def test_generate_from_a_directory_whose_model_lowbit_is_a_symlink_loop_names_it(tmp_path):
    """``lowbit generate DIR`` read such a directory as a model without config.json ('accepted: "smollm2", ...')."""
    (tmp_path / "model.lowbit").symlink_to("model.lowbit")
    out = " ".join(invoke("generate", tmp_path, "--prompt", "hi", code=3).output.split())
    assert "model.lowbit' cannot be read: Too many levels of symbolic links" in out, out


def test_inspect_of_a_file_that_is_a_symlink_loop_names_it(tmp_path):
    """``lowbit inspect loop.lowbit`` on a link to itself said 'no such file or directory'."""
    (tmp_path / "loop.lowbit").symlink_to("loop.lowbit")
    out = " ".join(invoke("inspect", tmp_path / "loop.lowbit", code=3).output.split())
    assert "loop.lowbit' cannot be read: Too many levels of symbolic links" in out, out


@pytest.mark.parametrize("option", ["config", "calib", "tokenizer"])
def test_replay_refuses_pipeline_options_that_read_files(tmp_path, option):
    """``replay_pipeline`` is text from the reproducer's author: ``quantize(config=/path/secret.json)`` read the file
    and printed it in pydantic's error, ``calib=``/``tokenizer=`` read files outside the directory."""
    secret = tmp_path / "secret.json"
    secret.write_text(json.dumps({"api_token": "SECRET-abc123"}))
    tok = tmp_path / "tok"
    tok.mkdir()
    value = {"config": secret, "calib": secret, "tokenizer": tok}[option]
    pipeline = {"config": f"quantize(config={value})",
                "calib": f"quantize(w=int8,a=int8,a_static=true,a_gran=per_tensor,calib={value})",
                "tokenizer": f"quantize(w=int8,a=int8,a_static=true,a_gran=per_tensor,tokenizer={value})"}[option]
    out = invoke("replay", _reproducer(tmp_path, replay_pipeline=pipeline), code=3).output
    assert f"option {option}=" in out and "only reads its own files" in out and "SECRET" not in out
    from lowbit.passes.manager import parse_pipeline

    parse_pipeline("quantize(w=int8,a=int8,a_static=true,a_gran=per_tensor,calib=wikitext2-valid,tokenizer=smollm2)",
                   read_files=False)  # shipped data: fine


def test_quant_config_errors_do_not_quote_the_file(tmp_path):
    from lowbit.ir.qscheme import QuantConfig

    f = tmp_path / "q.json"
    f.write_text(json.dumps({"api_token": "SECRET-abc123", "rules": [{"match": "SECRET2"}]}))
    with pytest.raises(ValueError, match="api_token: Extra inputs") as err:
        QuantConfig.from_file(f)
    assert "SECRET" not in str(err.value)


def test_reproducer_symlink_out_of_its_directory_is_refused(tmp_path):
    outside = tmp_path / "secret.lowbit"
    outside.write_text(SAFE)
    d = _reproducer(tmp_path, ir="link.lowbit")
    os.symlink(outside, d / "link.lowbit")
    assert "outside the reproducer directory" in invoke("replay", d, code=3).output


def test_replay_refuses_planted_op_before_running_anything(tmp_path):
    marker = tmp_path / "marker"
    d = _reproducer(tmp_path, planted_ops(marker)["torch.os.system"])
    out = invoke("replay", d, code=3).output
    assert "torch.os.system" in out and "line 5" in out
    assert not marker.exists()


def test_replay_refuses_planted_dimension(tmp_path):
    marker = tmp_path / "marker"
    d = _reproducer(tmp_path, planted_dims(marker)[0])
    assert "dimension" in invoke("replay", d, code=3).output
    assert not marker.exists()


@pytest.mark.parametrize("attack", ["op", "dim"])
@pytest.mark.parametrize("command", ["inspect", "graph"])
def test_inspect_and_graph_refuse_planted_model_lowbit(tmp_path, attack, command):
    marker = tmp_path / "marker"
    out_dir = tmp_path / "compiled"
    out_dir.mkdir()
    save_graph(parse_graph(SAFE, WEIGHTS), out_dir)
    text = planted_ops(marker)["torch.os.system"] if attack == "op" else planted_dims(marker)[0]
    (out_dir / "model.lowbit").write_text(text)
    out = invoke(command, out_dir, code=3).output
    assert "model.lowbit" in out and "not valid lowbit IR" in out
    assert not marker.exists() and not (out_dir / "model.html").exists()


def test_loading_a_planted_model_lowbit_to_run_it_is_refused(tmp_path):
    """The path a user takes to run a saved graph: load_graph, then lower to a backend."""
    from lowbit.cli.artifacts import load_graph

    marker = tmp_path / "marker"
    save_graph(parse_graph(SAFE, WEIGHTS), tmp_path)
    (tmp_path / "model.lowbit").write_text(planted_ops(marker)["builtins.eval"])
    with pytest.raises(IRParseError, match="builtins.eval"):
        load_graph(tmp_path)
    assert not marker.exists()


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_allowlist_covers_what_capture_emits_on_tiny_random_models(arch, minilm):
    """The allowlist is a survey (tools/aten_allowlist.py); this re-checks two architectures on every run so a
    torch upgrade that changes what capture emits fails here, not in a user's `lowbit inspect`."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    from lowbit.api import _default_example
    from lowbit.ir.capture import capture
    from lowbit.models import CausalLMLogits, SentenceEmbedder

    tok = None
    if arch == "llama":
        cfg = AutoConfig.for_model("llama", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                   max_position_embeddings=64)
        model = CausalLMLogits(AutoModelForCausalLM.from_config(cfg)).eval()
    else:
        tok = minilm[1]
        cfg = AutoConfig.for_model("bert", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, vocab_size=tok.vocab_size, max_position_embeddings=128)
        model = SentenceEmbedder(AutoModel.from_config(cfg)).eval()
    example, dynamic = _default_example(model, tok)
    for raise_ops in (True, False):
        ops = {n.op for n in capture(model, example, dynamic, raise_ops=raise_ops).nodes}
        assert {op: check_op(op) for op in ops if check_op(op) is not None} == {}


# ---- a model or checkpoint directory's own Python code ------------------------------------------

EVIL = 'open({marker!r}, "w").write("ran")\n' \
       'from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast\n' \
       'class EvilConfig(LlamaConfig):\n    model_type = "evilllama"\nclass EvilModel(LlamaForCausalLM):\n' \
       '    config_class = EvilConfig\nclass Tok(PreTrainedTokenizerFast):\n    pass\n'


def _plant_code(d: Path, marker: Path) -> None:
    (d / "evil.py").write_text(EVIL.format(marker=str(marker)))


def _refuses_without_asking(monkeypatch) -> None:
    """transformers asks on stdin before running a directory's code when trust_remote_code is unset."""
    def no_prompt(*a, **k):
        raise AssertionError("stdin was read")
    monkeypatch.setattr("builtins.input", no_prompt)


def test_model_dir_with_its_own_model_class_is_refused_without_running_it(tmp_path, monkeypatch):
    """config.json with an unknown model_type and an auto_map: `echo y | lowbit compile DIR` ran evil_model.py."""
    from conftest import tiny_llama

    from lowbit.errors import RemoteCodeError
    from lowbit.models import load_model

    d, marker = tmp_path / "m", tmp_path / "PWNED"
    tiny_llama(hidden=32, vocab=97).save_pretrained(d)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(model_type="evilllama", auto_map={"AutoConfig": "evil.EvilConfig",
                                                  "AutoModelForCausalLM": "evil.EvilModel"})
    (d / "config.json").write_text(json.dumps(cfg))
    _plant_code(d, marker)
    _refuses_without_asking(monkeypatch)
    with pytest.raises(RemoteCodeError, match="lowbit never runs a checkpoint's code"):
        load_model(d)
    res = CliRunner().invoke(app, ["compile", str(d), "-p", "dce"], input="y\n")
    assert res.exit_code == 3 and str(d) in res.output and "never runs" in res.output, res.output
    assert not marker.exists()


def test_checkpoint_with_its_own_tokenizer_class_is_refused_without_running_it(tmp_path, monkeypatch):
    """tokenizer_config.json's auto_map in a compressed-tensors directory: `echo y | lowbit inspect DIR` and
    lowbit.load ran evil.py after transformers' trust_remote_code prompt."""
    pytest.importorskip("compressed_tensors")
    from conftest import tiny_llama

    import lowbit
    from lowbit.errors import RemoteCodeError

    d, marker = tmp_path / "ck", tmp_path / "PWNED"
    compiled = lowbit.compile_model(tiny_llama(hidden=64, inter=128, heads=4, kv_heads=2, vocab=97),
                                    pipeline="quantize(w=int4,group=32)")
    lowbit.save(compiled, d, format="compressed-tensors")
    (d / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "EvilTokenizer",
                                                         "auto_map": {"AutoTokenizer": ["evil.Tok", None]}}))
    _plant_code(d, marker)
    _refuses_without_asking(monkeypatch)
    with pytest.raises(RemoteCodeError, match=str(d)):
        lowbit.load(d)
    res = CliRunner().invoke(app, ["inspect", str(d)], input="y\n")
    assert res.exit_code == 3 and "never runs a checkpoint's code" in res.output, res.output
    assert not marker.exists()


def test_reproducer_carries_the_calibration_file_it_replays_with(tmp_path, monkeypatch):
    """A pipeline with ``calib=PATH`` wrote a reproducer whose replay refused that path (exit 3): the reproducer
    now holds a copy under files/ and replays from any directory; a path out of files/ is still refused."""
    from lowbit.cli.reproducer import write_reproducer
    from lowbit.passes.manager import parse_pipeline

    calib = tmp_path / "my text.txt"
    calib.write_text("some calibration text\n" * 50)
    passes = parse_pipeline(f"dce,gptq(w=int4,group=16,calib={calib},calib_n=2,calib_len=8,progress=false)")
    d = tmp_path / "repro"
    write_reproducer(d, parse_graph(SAFE, WEIGHTS), passes, 1, "error", "tiny")
    replay_pipeline = json.loads((d / "reproducer.json").read_text())["replay_pipeline"]
    assert str(calib) not in replay_pipeline and "calib=files/" in replay_pipeline
    calib.unlink()  # replay reads the copy
    monkeypatch.chdir(tmp_path.parent)
    out = invoke("replay", d, code=4).output
    assert "reproduced" in out and "does not divide the input size 8" in out
    escape = replay_pipeline.replace("calib=files/", "calib=files/../../")
    out = invoke("replay", _reproducer(tmp_path / "b", replay_pipeline=escape), code=3).output
    assert "option calib=" in out and "only reads its own files" in out


DEVICE_IR = """\
graph tiny(%x: f32[2,8]) {
  %z: f32[2,8] = aten.zeros.default([2, 8], dtype=f32, device=device("cpu"), pin_memory=False)
  %y: f32[2,8] = aten.add.Tensor(%x, %z)
  return %y
}
"""


@pytest.mark.parametrize("old, new, needle", [
    ('device("cpu")', 'device("meta")', "device 'meta'"),  # ran, then torch's bare 'Tensor on device meta'
    ("(%x, %z)", "(%x, %z, out=%x)", "keyword out= writes into an operand"),
    ("pin_memory=False", "pin_memory=False, dtype=f16", "keyword dtype= is given twice"),  # the last silently won
])
def test_parser_refuses_meta_devices_out_keywords_and_repeated_keywords(old, new, needle):
    from lowbit.backends.torch_backend import TorchCompiled

    assert TorchCompiled(parse_graph(DEVICE_IR))(torch.ones(2, 8)).sum() == 16
    with pytest.raises(IRParseError, match=needle) as err:
        parse_graph(DEVICE_IR.replace(old, new))
    assert "line 2" in str(err.value) or "line 3" in str(err.value)


def test_verifier_refuses_meta_devices_and_out_keywords_built_through_the_api():
    g = parse_graph(DEVICE_IR)
    zeros, add = g.nodes
    zeros.kwargs["device"] = torch.device("meta")
    add.kwargs["out"] = g.inputs[0]
    with pytest.raises(VerificationError) as err:
        verify(g)
    assert f"%{zeros.name} = aten.zeros.default" in str(err.value) and "device 'meta'" in str(err.value)
    assert f"%{add.name} = aten.add.Tensor" in str(err.value) and "keyword out=" in str(err.value)


@pytest.mark.parametrize("command", ["inspect", "graph"])
@pytest.mark.parametrize("weights", [True, False])
def test_inspect_and_graph_show_the_verifiers_errors(tmp_path, command, weights):
    """A model.lowbit declaring a size its op does not produce was shown as if valid (exit 0): the output ends
    with the verifier's problems, naming the node, and exits 3."""
    save_graph(parse_graph(SAFE, WEIGHTS), tmp_path)
    (tmp_path / "model.lowbit").write_text(SAFE.replace("%y: f32[2,s0,16]", "%y: f32[2,s0,17]"))
    if not weights:
        (tmp_path / "params.safetensors").unlink()
    out = invoke(command, tmp_path, code=3).output
    assert "does not verify" in out and "%y = linear(...) in proj" in out and "f32[2,4,16]" in out
    save_graph(parse_graph(SAFE, WEIGHTS), tmp_path)
    assert "does not verify" not in invoke(command, tmp_path, code=0).output


def test_replay_of_an_ir_that_does_not_verify_is_a_bad_reproducer_unless_that_was_the_failure(tmp_path):
    """It exited 4 'reproduced: the input IR is invalid' for any edited before.lowbit; --reproducer saves the IR
    before the failing pass, which verified, unless the recorded failure was the input's own."""
    bad = SAFE.replace("%y: f32[2,s0,16]", "%y: f32[2,s0,17]")
    out = invoke("replay", _reproducer(tmp_path / "a", bad), code=3).output
    assert "before.lowbit" in out and "does not verify" in out and "%y = linear(...) in proj" in out
    recorded = _reproducer(tmp_path / "b", bad, error="the input IR is invalid before any pass ran:\n...")
    assert "reproduced: the input IR is invalid" in invoke("replay", recorded, code=4).output


def test_graph_dot_quotes_a_path_with_a_quote():
    """``lowbit graph 'q"dir' -f dot`` wrote ``digraph "q"dir/model.lowbit" {``, which Graphviz cannot read."""
    from lowbit.cli.inspect import to_dot

    assert to_dot(parse_graph(SAFE, WEIGHTS), 'q"dir/model.lowbit').startswith('digraph "q\\"dir/model.lowbit" {\n')


def test_a_symlink_out_of_an_artifact_directory_without_a_manifest_is_refused(tmp_path):
    """A directory without lowbit-manifest.json was read through its symlinks: model.lowbit -> a private file outside
    it was parsed, and the parse error quoted that file's first line. The link is refused, named, before reading."""
    from typer.testing import CliRunner

    from lowbit.cli.main import app

    secret = tmp_path / "private.txt"
    secret.write_text("api-key-0123456789 do not print me\n")
    art = tmp_path / "downloaded"
    art.mkdir()
    (art / "model.lowbit").symlink_to(secret)
    for cmd in (["inspect", str(art)], ["graph", str(art), "-o", str(tmp_path / "g.html")]):
        res = CliRunner().invoke(app, cmd)
        assert res.exit_code == 3, res.output
        out = " ".join(res.output.split())
        assert "model.lowbit: is a symlink to" in out and "outside the directory" in out, res.output
        assert "api-key" not in res.output


@pytest.mark.parametrize("fmt", ["html", "dot"])
def test_graph_of_a_module_path_thousands_of_levels_deep_is_drawn(tmp_path, fmt):
    """A node whose module comment had 5000 segments ended ``lowbit graph`` in a RecursionError traceback (exit 1):
    the drawers recursed once per level. Levels past 32 are drawn as one, named by the rest of the path."""
    deep = ".".join(f"m{i}" for i in range(5000))
    f = tmp_path / "deep.lowbit"
    f.write_text(SAFE.replace("@proj.weight)  # proj", f"@proj.weight)  # {deep}"))
    res = CliRunner().invoke(app, ["graph", str(f), "-f", fmt, "-o", str(tmp_path / f"g.{fmt}")])
    assert res.exit_code == 0, (res.output, res.exception)
    drawn = (tmp_path / f"g.{fmt}").read_text()
    assert ".".join(f"m{i}" for i in range(31, 5000)) in drawn  # the rest of the path, one level
    assert "linear" in drawn


def test_a_reproducer_holding_copies_of_its_files_can_be_written_again(tmp_path):
    """A reproducer whose pass read calib=PATH holds a copy under files/; the next failing run with the same
    --reproducer DIR was refused: 'holds files lowbit did not write there (files/1-calib-text.txt)'."""
    from lowbit.checkpoint.files import not_replaceable
    from lowbit.cli.reproducer import write_reproducer
    from lowbit.passes.manager import parse_pipeline

    calib = tmp_path / "text.txt"
    calib.write_text("some calibration text\n" * 50)
    passes = parse_pipeline(f"dce,gptq(w=int4,group=16,calib={calib},calib_n=2,calib_len=8,progress=false)")
    d = tmp_path / "repro"
    write_reproducer(d, parse_graph(SAFE, WEIGHTS), passes, 1, "error", "tiny")
    assert any(p.is_file() for p in (d / "files").iterdir())
    assert not_replaceable(d) is None
    (d / "notes.txt").write_text("mine")  # a file of the user's own is still kept
    assert "notes.txt" in not_replaceable(d)


def test_a_reproducer_of_a_calibrating_pass_replays_with_the_models_tokenizer(tmp_path, minilm):
    """The CLI calibrates with the model's own tokenizer (graph.meta), which the reproducer did not keep: replaying
    GPTQ on any model but SmolLM2 failed with 'no tokenizer for this model' and replay called that 'reproduced'.
    It is saved under files/tokenizer and read back as a checkpoint's is (no code from the directory)."""
    import lowbit
    from conftest import tiny_llama
    from lowbit.cli.reproducer import write_reproducer
    from lowbit.passes.manager import parse_pipeline

    tokenizer = minilm[1]
    torch.manual_seed(0)
    graph = lowbit.compile_model(tiny_llama(vocab=tokenizer.vocab_size), pipeline="dce", tokenizer=tokenizer).graph
    passes = parse_pipeline("gptq(w=int4,group=16,calib_n=2,calib_len=8,progress=false)")
    d = tmp_path / "repro"
    write_reproducer(d, graph, passes, 0, "error", "tiny")
    assert json.loads((d / "reproducer.json").read_text())["tokenizer"] == "files/tokenizer"
    assert "no longer reproduces" in invoke("replay", d, code=0).output
    link = d / "files" / "tokenizer" / "tokenizer.json"
    outside = tmp_path / "elsewhere.json"
    link.rename(outside)
    link.symlink_to(outside)  # a file of the tokenizer leading out of the reproducer
    assert "outside the reproducer directory" in " ".join(invoke("replay", d, code=3).output.split())


def test_a_reproducer_keeps_the_tokenizer_only_for_a_pass_that_calibrates(tmp_path):
    """3d09471 saved the model's tokenizer for every pass with a tokenizer option: a weight-only quantize, which
    calibrates nothing, got a files/tokenizer README's reproducer listing does not show."""
    from lowbit.cli.reproducer import write_reproducer
    from lowbit.passes.manager import parse_pipeline

    class Tokenizer:
        def save_pretrained(self, where: str) -> None:
            Path(where).mkdir(parents=True)
            (Path(where) / "tokenizer.json").write_text("{}")

    graph = parse_graph(SAFE, WEIGHTS)
    graph.meta["tokenizer"] = Tokenizer()
    for pipeline, kept in [("quantize(w=int4,group=4)", False), ("gptq(w=int4,group=4,calib_n=2,calib_len=8)", True)]:
        d = tmp_path / pipeline.split("(")[0]
        write_reproducer(d, graph, parse_pipeline(pipeline), 0, "error", "tiny")
        assert (d / "files" / "tokenizer").is_dir() == kept, pipeline
        assert ("tokenizer" in json.loads((d / "reproducer.json").read_text())) == kept


def test_replay_says_reproduced_only_for_the_recorded_failure(tmp_path):
    """Replay exited 4 'reproduced: ...' for any failure of the pipeline, so one failing for another reason (a
    tokenizer the reproducer lacked) passed for the recorded one. Another message is shown beside the recorded one."""
    pipeline = "quantize(w=int4,group=3)"
    first = invoke("replay", _reproducer(tmp_path / "a", replay_pipeline=pipeline, error="x"), code=4).output
    now = first.split("error: reproduced: ", 1)[1].strip()  # a recorded error of another form: not compared
    assert now.startswith("pass quantize(w=int4,group=3) (#0) failed: ")
    recorded = now.replace("(#0)", "(#2)")  # as --reproducer records it, at the pass's index in the whole pipeline
    same = invoke("replay", _reproducer(tmp_path / "b", replay_pipeline=pipeline, error=recorded), code=4).output
    assert "error: reproduced: " in same
    other = recorded.split(" failed: ")[0] + " failed: pass quantize: no tokenizer for this model"
    out = invoke("replay", _reproducer(tmp_path / "c", replay_pipeline=pipeline, error=other), code=4).output
    assert "error: reproduced" not in out and "fails again, but not as recorded" in out and "no tokenizer" in out, out


def test_a_reproducer_restores_the_graph_meta_its_replay_needs(tmp_path):
    """A reproducer kept only the tokenizer of ``graph.meta``: a kv-cache failure on a step graph replayed as
    "requires a step graph" ("fails again, but not as recorded"); the step's generation meta travels in the
    manifest now and the recorded failure reproduces. A tampered entry is refused by field (exit 3)."""
    from conftest import tiny_llama

    import lowbit
    from lowbit.cli.reproducer import write_reproducer
    from lowbit.passes.manager import PassManager, PipelineError, parse_pipeline

    torch.manual_seed(0)
    step = lowbit.compile_model(tiny_llama(hidden=64, heads=2, kv_heads=1, max_positions=64),
                                generation=lowbit.GenerationSpec(max_length=64)).graph
    passes = parse_pipeline("kv-cache(bits=4,k_block=8,window=8,v_group=12)")
    with pytest.raises(PipelineError) as failed:
        PassManager(passes).run(step.clone())
    d = tmp_path / "repro"
    write_reproducer(d, step, passes, 0, str(failed.value), "tiny")
    out = invoke("replay", d, code=4).output
    assert "reproduced:" in out and "v_group" in out and "not as recorded" not in out
    manifest = json.loads((d / "reproducer.json").read_text())
    manifest["meta"]["generation"]["max_batch"] = "eight"
    (d / "reproducer.json").write_text(json.dumps(manifest))
    out = invoke("replay", d, code=3).output
    assert "'meta.generation.max_batch'" in out


@pytest.fixture(autouse=True)
def _one_export_per_model(reuse_captures: object) -> None:
    """Every test here captures through the session's capture cache (conftest's ``reuse_captures``): the same tiny
    model compiled or reloaded again is not exported again."""
