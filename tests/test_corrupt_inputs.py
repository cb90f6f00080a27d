"""Corrupt inputs exit 3 naming the file (never a traceback, never exit 1), and corrupt cache entries are rebuilt.

Every fixture is small and made in tmp_path: a truncated copy of the first bytes of the shipped GGUF, JSON
garbage, a tiny random Llama, a cut-off safetensors file.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from lowbit.cli.artifacts import save_graph
from lowbit.cli.main import app
from lowbit.errors import CorruptFileError
from lowbit.ir.parser import parse_graph

SAFE = """\
graph tiny(%x: f32[2,s0,8]) {
  symbol s0 in [1, 64] hint 4
  param @proj.weight: f32[16,8]
  %y: f32[2,s0,16] = linear(%x, @proj.weight)  # proj
  return %y
}
"""


def invoke(*args: object, code: int):
    res = CliRunner().invoke(app, [str(a) for a in args])
    assert res.exit_code == code, (res.exit_code, res.output, res.exception)
    return " ".join(res.output.split())


def _gguf_prefix(n: int) -> bytes:
    from lowbit.models import smollm2_gguf_path

    with open(smollm2_gguf_path(), "rb") as fh:
        return fh.read(n)


@pytest.mark.parametrize("name, make, fragment", [
    ("truncated.gguf", lambda: _gguf_prefix(200_000), "truncated or corrupt GGUF"),
    ("header.gguf", lambda: _gguf_prefix(4) + b"\xff" * 60 + _gguf_prefix(4096)[64:], "truncated or corrupt GGUF"),
    ("tiny.gguf", lambda: b"GGUF", "truncated or corrupt GGUF"),
    ("text.gguf", lambda: b'{"model_type": "llama"}', "is not a GGUF file"),
])
def test_corrupt_gguf_exits_3_naming_the_file(tmp_path, monkeypatch, name, make, fragment):
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    path = tmp_path / name
    path.write_bytes(make())
    out = invoke("compile", path, "--pipeline", "dce", code=3)
    assert name in out and fragment in out
    assert not list((tmp_path / "cache").glob("gguf-*"))  # no half-built cache entry


def _tiny_llama_dir(directory: Path) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("llama", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                               num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                               max_position_embeddings=64)
    cfg.architectures = ["LlamaForCausalLM"]
    AutoModelForCausalLM.from_config(cfg).save_pretrained(directory)
    return directory


@pytest.mark.parametrize("case, fragment", [
    ("garbage", "config.json' is not valid JSON"),
    ("not-a-config", "has no 'model_type'"),
    ("weightless", "no weights"),
    ("truncated-weights", "model.safetensors' is not a readable safetensors file"),
    ("no-tokenizer", "has no tokenizer files"),
])
def test_corrupt_model_directory_exits_3_naming_the_file(tmp_path, case, fragment):
    d = _tiny_llama_dir(tmp_path / "model")
    if case == "garbage":
        (d / "config.json").write_bytes(b"\x00\xffnot json{")
    elif case == "not-a-config":
        (d / "config.json").write_text("[1, 2, 3]")
    elif case == "weightless":
        (d / "model.safetensors").unlink()
    elif case == "no-tokenizer":  # as saved by model.save_pretrained alone: an empty tokenizer, "prompt 0 is empty"
        out = invoke("generate", d, "--prompt", "hi there", "-n", "2", code=3)
        assert fragment in out and str(d) in " ".join(out.split()), out
        return  # compile runs on token ids: test_a_causal_lm_directory_without_a_tokenizer_compiles
    else:
        data = (d / "model.safetensors").read_bytes()
        (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    out = invoke("compile", d, "--pipeline", "dce", code=3)
    assert fragment in out


def test_encoder_directory_without_tokenizer_exits_3(tmp_path):
    """A BERT directory as model.save_pretrained alone leaves it: transformers built a 5-token BertTokenizer for it
    (every word [UNK]), which compile calibrated with and wrote beside the model; refused as for a causal LM."""
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                         num_hidden_layers=1)).save_pretrained(tmp_path / "bert")
    out = invoke("compile", tmp_path / "bert", "--pipeline", "dce", "-o", tmp_path / "out", code=3)
    assert "has no tokenizer files" in out and "bert" in out
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", ["encoder"])
def test_a_directory_without_tokenizer_files_says_so_not_that_transformers_cannot_load_it(tmp_path, kind):
    """load_model worded a model directory without tokenizer files as a CorruptFileError, "cannot be loaded by
    transformers: FileNotFoundError: ...", of a model transformers loads fine; it says the tokenizer files are
    missing, naming them (a MissingTokenizerError: a LowbitError and a FileNotFoundError). An encoder only: its
    capture builds example inputs with the tokenizer, while a causal LM loads without one (it runs on token ids)."""
    from transformers import BertConfig, BertModel

    from lowbit.errors import CorruptFileError, LowbitError
    from lowbit.models import load_model

    d = tmp_path / kind
    if kind == "encoder":
        BertModel(BertConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                             num_hidden_layers=1)).save_pretrained(d)
    else:
        _tiny_llama_dir(d)
    with pytest.raises(LowbitError, match=r"has no tokenizer files \(none of tokenizer.json, tokenizer.model, "
                                         r"vocab.json, vocab.txt") as exc:
        load_model(str(d))
    assert str(d) in str(exc.value) and "transformers" not in str(exc.value)
    assert isinstance(exc.value, FileNotFoundError) and not isinstance(exc.value, CorruptFileError)
    assert type(exc.value).__name__ == "MissingTokenizerError"


@pytest.mark.parametrize("command", ["inspect", "graph", "replay"])
@pytest.mark.parametrize("damage", ["truncated", "garbage", "not-utf8-ir"])
def test_corrupt_artifacts_exit_3_in_inspect_graph_replay(tmp_path, command, damage):
    d = tmp_path / "art"
    d.mkdir()
    g = parse_graph(SAFE, {"proj.weight": torch.randn(16, 8)})
    if command == "replay":
        save_graph(g, d, "before.lowbit", "before.safetensors")
        (d / "reproducer.json").write_text(json.dumps({"ir": "before.lowbit", "params": "before.safetensors",
                                                       "replay_pipeline": "dce"}))
        params, ir = d / "before.safetensors", d / "before.lowbit"
    else:
        save_graph(g, d)
        params, ir = d / "params.safetensors", d / "model.lowbit"
    if damage == "truncated":
        params.write_bytes(params.read_bytes()[:-100])
    elif damage == "garbage":
        params.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{bad json")
    else:
        ir.write_bytes(b"\xff\xfe\x00graph")
    out = invoke(command, d, code=3)
    assert (params.name if damage != "not-utf8-ir" else ir.name) in out
    assert "safetensors" in out or "UTF-8" in out


def test_corrupt_reproducer_manifest_exits_3(tmp_path):
    (tmp_path / "reproducer.json").write_text("{not json")
    assert "not valid JSON" in invoke("replay", tmp_path, code=3)
    (tmp_path / "reproducer.json").write_text('{"ir": 3}')
    assert "'ir'" in invoke("replay", tmp_path, code=3)


def test_corrupt_token_cache_entry_is_rebuilt_with_a_warning(tmp_path, monkeypatch, minilm):
    from lowbit.eval.perplexity import token_ids

    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    text = tmp_path / "text.txt"
    text.write_text("lowbit refuses corrupt files and rebuilds its cache. " * 20)
    tok = minilm[1]
    ids = token_ids(text, tok)
    for entry in (tmp_path / "cache" / "tokens").glob("*.pt"):
        entry.write_bytes(entry.read_bytes()[:20])
    with pytest.warns(UserWarning, match="corrupt.*rebuilding"):
        again = token_ids(text, tok)
    assert torch.equal(ids, again)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(token_ids(text, tok), ids)  # the rebuilt entry is trusted again


def test_corrupt_model_cache_entry_is_rebuilt_with_a_warning(tmp_path, monkeypatch, minilm):
    """The float cache built from a GGUF: a damaged model.safetensors is removed and rebuilt, not fatal."""
    from lowbit import models

    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    builds = []

    def build(gguf: Path, tmp: Path) -> None:  # stands in for the 25 s GGUF dequantization
        builds.append(gguf)
        _tiny_llama_dir(tmp)
        minilm[1].save_pretrained(tmp)

    monkeypatch.setattr(models, "_build_float_cache", build)
    monkeypatch.setattr(models, "check_gguf", lambda path: None)
    gguf = tmp_path / "m.gguf"
    model, _ = models._load_cached_causal_lm(gguf, "entry", torch.float32)
    weights = tmp_path / "cache" / "entry" / "model.safetensors"
    size = weights.stat().st_size
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.warns(UserWarning, match="entry.*corrupt.*rebuilding"):
        again, _ = models._load_cached_causal_lm(gguf, "entry", torch.float32)
    assert len(builds) == 2 and weights.stat().st_size == size
    ids = torch.tensor([[1, 2, 3]])
    assert again(ids).logits.shape == (1, 3, 128)


def test_corrupt_file_error_names_the_file():
    err = CorruptFileError("/x/params.safetensors", "is truncated")
    assert "/x/params.safetensors" in str(err) and isinstance(err, ValueError)


def test_replay_without_its_weights_file_says_it_is_missing(tmp_path):
    """before.safetensors deleted: replay exited 4 claiming "reproduced: the input IR is invalid before any pass
    ran"."""
    save_graph(parse_graph(SAFE, {"proj.weight": torch.randn(16, 8)}), tmp_path, "before.lowbit", "before.safetensors")
    (tmp_path / "reproducer.json").write_text(json.dumps({"ir": "before.lowbit", "params": "before.safetensors",
                                                          "replay_pipeline": "dce"}))
    (tmp_path / "before.safetensors").unlink()
    out = invoke("replay", tmp_path, code=3)
    assert "before.safetensors" in out and "missing" in out and "reproduced" not in out


@pytest.mark.parametrize("damage", ["empty", "truncated", "random"])
def test_inspect_of_a_damaged_onnx_file_exits_3(tmp_path, damage):
    """A truncated or random .onnx exited 2 (a usage error); a 0-byte one was shown as a valid model, exit 0."""
    import onnx
    from onnx import TensorProto, helper

    node = helper.make_node("Relu", ["x"], ["y"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    f = tmp_path / "model.onnx"
    onnx.save(helper.make_model(graph), str(f))
    invoke("inspect", f, code=0)
    data = f.read_bytes()
    f.write_bytes({"empty": b"", "truncated": data[: len(data) // 2], "random": bytes(range(7, 250, 3)) * 9}[damage])
    assert "model.onnx" in invoke("inspect", f, code=3)


def test_a_causal_lm_directory_without_a_tokenizer_compiles(tmp_path):
    """A causal LM saved by model.save_pretrained alone (no tokenizer files) was refused by `lowbit compile` and
    lowbit.compile_model(DIR) ('has no tokenizer files'), although compiling and RTN-quantizing run on token ids.
    It compiles and saves (its logits those of transformers' model); what reads text still says the files are
    missing: generate's prompts, the debug commands' evaluation, and a calibrating pass's text."""
    import lowbit
    from lowbit.models import load_model

    d = _tiny_llama_dir(tmp_path / "model")
    module, tokenizer, kind = load_model(str(d))
    assert tokenizer is None and kind == "causal-lm"
    compiled = lowbit.compile_model(str(d), pipeline="quantize(w=int8)")
    ids = torch.randint(0, 128, (1, 12))
    with torch.no_grad():
        ref = module(ids)
    assert ((compiled(ids) - ref).norm() / ref.norm()).item() < 0.05
    invoke("compile", d, "--pipeline", "quantize(w=int4,group=32)", "-o", tmp_path / "out", code=0)
    assert (tmp_path / "out" / "model.lowbit").is_file()
    out = invoke("debug", "compare", d, "--pipeline", "quantize(w=int4)", "--seq-len", "32", code=3)
    assert "has no tokenizer files" in out and "evaluate on WikiText-2 text" in out
    out = invoke("compile", d, "--pipeline", "gptq(w=int4,group=32,calib_len=32)", "-o", tmp_path / "g", code=3)
    assert "has no tokenizer files" in out and "pass gptq calibrates on the text 'wikitext2-valid-calib'" in out


@pytest.fixture(autouse=True)
def _one_export_per_model(reuse_captures: object) -> None:
    """Every test here captures through the session's capture cache (conftest's ``reuse_captures``): a model
    directory compiled again by another command of the same test is not exported again."""
