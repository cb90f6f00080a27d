"""Checkpoints edited or damaged after they were written, their manifest rehashed to match: each is refused with a
CheckpointError naming the file and the tensor, key or line (CLI exit 3), never loaded as garbage or crashed on.

All on a tiny random Llama saved once per module in compressed-tensors, GPTQ and lowbit format.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import rehash_manifest as _rehash, tiny_llama
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import lowbit
from lowbit.checkpoint import CheckpointError
from lowbit.cli.main import app

pytest.importorskip("compressed_tensors")

DOWN = "model.layers.0.mlp.down_proj"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """{format: directory} of one tiny Llama (hidden 64, MLP 128) quantized to int4 in groups of 32."""
    torch.manual_seed(0)
    compiled = lowbit.compile_model(tiny_llama(hidden=64, inter=128, heads=4, kv_heads=2, vocab=97),
                                    pipeline="quantize(w=int4,group=32)")
    root = tmp_path_factory.mktemp("saved")
    return {fmt: lowbit.save(compiled, root / fmt, format=fmt) for fmt in ("compressed-tensors", "gptq", "lowbit")}


def _copy(saved, fmt: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(saved[fmt], tmp_path / fmt))


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _edit_tensors(path: Path, edit) -> None:
    t = load_file(str(path))
    edit(t)
    save_file(t, str(path), metadata={"format": "pt"})


def _refused(d: Path, *match: str, cli: bool = True) -> None:
    """lowbit.load (and `lowbit inspect`, with ``cli``) refuse ``d`` with every string of ``match`` in the
    message."""
    with pytest.raises(CheckpointError) as err:
        lowbit.load(d)
    for m in match:
        assert m in str(err.value), (m, str(err.value))
    if not cli:
        return
    res = CliRunner().invoke(app, ["inspect", str(d)])
    assert res.exit_code == 3, (res.exit_code, res.output, res.exception)
    assert match[0] in res.output.replace("\n", "")


def _weights(c):
    return c["quantization_config"]["config_groups"]["group_0"]["weights"]


def test_false_num_bits_is_refused_not_unpacked_as_garbage(saved, tmp_path):
    """num_bits 4 -> 3 in config.json: the 4-bit words were unpacked as 3-bit codes and the model ran."""
    d = _copy(saved, "compressed-tensors", tmp_path)
    _edit_json(d / "config.json", lambda c: _weights(c).__setitem__("num_bits", 3))
    _rehash(d)
    _refused(d, "model.safetensors", f"{DOWN}.weight_packed", "3 bits")


@pytest.mark.parametrize("shape", [[64, 4096], [-1, 128], [128, 64]])
def test_weight_shape_that_is_not_the_linears_is_refused(saved, tmp_path, shape):
    d = _copy(saved, "compressed-tensors", tmp_path)
    _edit_tensors(d / "model.safetensors", lambda t: t.__setitem__(f"{DOWN}.weight_shape", torch.tensor(shape)))
    _rehash(d)
    _refused(d, "model.safetensors", f"{DOWN}.weight_shape", "[64, 128]")


def test_false_group_size_is_refused_naming_the_scale(saved, tmp_path):
    """group_size 32 -> 16: a raw RuntimeError from scale.reshape."""
    d = _copy(saved, "compressed-tensors", tmp_path)
    _edit_json(d / "config.json", lambda c: _weights(c).__setitem__("group_size", 16))
    _rehash(d)
    _refused(d, "model.safetensors", f"{DOWN}.weight_scale")


@pytest.mark.parametrize("damage", ["cut", "int64"])
def test_damaged_packed_weights_are_refused(saved, tmp_path, damage):
    """weight_packed cut, or stored as int64: compressed_tensors' ValueError / a reshape error."""
    d = _copy(saved, "compressed-tensors", tmp_path)
    name = f"{DOWN}.weight_packed"
    fix = {"cut": lambda t: t[:, :8].contiguous(), "int64": lambda t: t.to(torch.int64)}[damage]
    _edit_tensors(d / "model.safetensors", lambda t: t.__setitem__(name, fix(t[name])))
    _rehash(d)
    _refused(d, "model.safetensors", name)


def _gptq(c):
    return c["quantization_config"]


@pytest.mark.parametrize("edit,match", [
    # a false bits or group_size was reported as "g_idx is a permutation (desc_act GPTQ)"
    (lambda c: _gptq(c).__setitem__("bits", 8), ["model.safetensors", f"{DOWN}.qweight", "8 bits, group 32"]),
    (lambda c: _gptq(c).__setitem__("group_size", 64), ["model.safetensors", f"{DOWN}.qzeros", "group 64"]),
    # int()'s ValueError, a ZeroDivisionError
    (lambda c: _gptq(c).__setitem__("bits", "four"), ["config.json", "quantization_config.bits is 'four'"]),
    (lambda c: _gptq(c).__setitem__("group_size", 0), ["config.json", "group_size=0"]),
    (lambda c: _gptq(c).__setitem__("checkpoint_format", "marlin"), ["config.json", "checkpoint_format 'marlin'"]),
])
def test_gptq_config_disagreeing_with_its_tensors_is_refused(saved, tmp_path, edit, match):
    d = _copy(saved, "gptq", tmp_path)
    _edit_json(d / "config.json", edit)
    _rehash(d)
    _refused(d, *match)


@pytest.mark.parametrize("name,fix", [
    ("qweight", lambda t: t.float()),  # loaded: the float codes were cast and unpacked
    ("qzeros", lambda t: t[:1].contiguous()),  # loaded: only the values were checked
    ("scales", lambda t: t.to(torch.int32)),  # loaded with integer scales
    ("qweight", lambda t: t.flatten()),  # a RuntimeError from the unpacking
    ("g_idx", lambda t: t[:10].contiguous()),  # "a permutation (desc_act GPTQ)"
])
def test_damaged_gptq_tensors_are_refused(saved, tmp_path, name, fix):
    d = _copy(saved, "gptq", tmp_path)
    key = f"{DOWN}.{name}"
    _edit_tensors(d / "model.safetensors", lambda t: t.__setitem__(key, fix(t[key])))
    _rehash(d)
    _refused(d, "model.safetensors", key, "[64, 128]")


def test_gptq_v2_zeros_are_read_as_v2(saved, tmp_path):
    """checkpoint_format gptq_v2 stores the zero points themselves (v1: zero - 1): a v2 symmetric checkpoint was
    refused as "asymmetric GPTQ", and a v1 one relabelled v2 loaded as if it were v1."""
    d = _copy(saved, "gptq", tmp_path)
    ref = lowbit.load(d)
    _edit_json(d / "config.json", lambda c: _gptq(c).__setitem__("checkpoint_format", "gptq_v2"))
    _rehash(d)
    _refused(d, "qzeros are not all 8 (asymmetric GPTQ)", cli=False)
    # zero - 1 = 7 in every 4-bit field -> 8 in every field: 0x77777777 + 0x11111111
    _edit_tensors(d / "model.safetensors", lambda t: t.update(
        {k: (v.to(torch.int64) + 0x11111111).to(torch.int32) for k, v in t.items() if k.endswith(".qzeros")}))
    _rehash(d)
    ids = torch.randint(0, 97, (1, 9))
    assert torch.equal(lowbit.load(d)(ids), ref(ids))


@pytest.mark.parametrize("where", ["../outside.safetensors", "ABS", 3, "a\x00b.safetensors", "x" * 5000],
                         ids=["parent", "absolute", "not-a-string", "nul-byte", "too-long"])
def test_index_naming_a_shard_outside_the_directory_is_refused(saved, tmp_path, where):
    """model.safetensors.index.json's weight_map named files by any path: '../x' or an absolute path was read from
    outside the checkpoint (the manifest refuses such entries), a non-string entry was a raw TypeError, a name past
    the system's length limit a raw OSError ('File name too long') and one with a NUL byte 'shard ... is missing'."""
    d = _copy(saved, "compressed-tensors", tmp_path)
    outside = Path(shutil.copy(d / "model.safetensors", tmp_path / "outside.safetensors"))
    names = list(load_file(str(d / "model.safetensors")))
    where = str(outside) if where == "ABS" else where
    weight_map = {n: (where if i == 0 else "model.safetensors") for i, n in enumerate(names)}
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (d / "lowbit-manifest.json").unlink()  # another tool's checkpoint (with it, the unlisted index is refused first)
    shown = f"{where[:80]!r}..." if isinstance(where, str) and len(where) > 1000 else repr(where)
    _refused(d, "model.safetensors.index.json", f"puts tensor {names[0]!r} in {shown}, which is not a file name")


def test_config_disagreeing_with_the_weights_is_refused(saved, tmp_path):
    """hidden_size 64 -> 128: a RuntimeError from load_state_dict."""
    d = _copy(saved, "compressed-tensors", tmp_path)
    _edit_json(d / "config.json", lambda c: c.__setitem__("hidden_size", 128))
    _rehash(d)
    _refused(d, "model.safetensors", "config.json")


def test_float_tensor_of_the_wrong_shape_is_refused(saved, tmp_path):
    d = _copy(saved, "compressed-tensors", tmp_path)
    name = "model.embed_tokens.weight"
    _edit_tensors(d / "model.safetensors", lambda t: t.__setitem__(name, t[name][:50].contiguous()))
    _rehash(d)
    _refused(d, "model.safetensors", name, "[97, 64]")


def test_tokenizer_config_naming_an_unknown_class_is_refused(saved, tmp_path):
    """tokenizer_class 'EvilTokenizer' (no auto_map): transformers' ValueError escaped."""
    d = _copy(saved, "compressed-tensors", tmp_path)
    (d / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "EvilTokenizer"}))
    _refused(d, "tokenizer_config.json")


# ---- the manifest --------------------------------------------------------------------------------


@pytest.mark.parametrize(("edit", "key"), [
    (lambda m: m.__setitem__("lowbit", []), "'lowbit'"),
    (lambda m: m["files"].__setitem__("model.lowbit", "abc"), "'files.model.lowbit'"),
    (lambda m: m.__setitem__("files", []), "'files'"),
    (lambda m: m.__setitem__("versions", 5), "'versions'"),
    (lambda m: m.__setitem__("format", 7), "'format'"),
    (lambda m: m.__setitem__("format", "lowbit2"), "'format'"),  # was loaded as a float HF model and refused as one
    # a file name the OS cannot open: ValueError 'embedded null byte' / OSError 'File name too long', raw
    (lambda m: m["files"].__setitem__("a\x00b", {"sha256": "0" * 64, "bytes": 0}), "lists 'a\\x00b', which is not"),
    (lambda m: m["files"].__setitem__("x" * 5000, {"sha256": "0" * 64, "bytes": 0}), "File name too long"),
    (lambda m: m["lowbit"].__setitem__("kind", "evil"), "'lowbit.kind'"),
    (lambda m: m["lowbit"].__setitem__("residual_rotated", "yes"), "'lowbit.residual_rotated'"),
    (lambda m: m["lowbit"]["node_meta"].__setitem__("x", {"qscheme": 3}), "'lowbit.node_meta.x.qscheme'"),
    (lambda m: m["lowbit"]["node_meta"].__setitem__("x", {"code": "a"}), "'lowbit.node_meta.x.code'"),
    (lambda m: m["files"]["model.lowbit"].__setitem__("bytes", "12"), "'files.model.lowbit.bytes'"),
])
def test_manifest_of_the_wrong_structure_is_refused_naming_the_key(saved, tmp_path, edit, key):
    """``"lowbit": []`` raised AttributeError ('list' object has no attribute 'get') and `lowbit inspect` exited 0;
    ``"files": {"model.lowbit": "abc"}`` an AttributeError in verify_manifest."""
    d = _copy(saved, "lowbit", tmp_path)
    _edit_json(d / "lowbit-manifest.json", edit)
    _refused(d, "lowbit-manifest.json", key)


def test_manifest_node_meta_naming_a_node_the_ir_lacks_is_refused(saved, tmp_path):
    d = _copy(saved, "lowbit", tmp_path)
    _edit_json(d / "lowbit-manifest.json", lambda m: m["lowbit"]["node_meta"].__setitem__("nowhere", {"qscheme": "x"}))
    _refused(d, "lowbit-manifest.json: key 'lowbit.node_meta' names node %nowhere, which model.lowbit does not have",
             cli=False)  # lowbit inspect reads the IR and params only


def test_manifest_listing_a_symlink_loop_is_refused_naming_the_entry(saved, tmp_path):
    """A listed name that is a symlink to itself was a raw RuntimeError ('Symlink loop from ...') out of
    verify_manifest's own resolve(); the manifest's names are now asked what the shard index's are (unopenable)."""
    d = _copy(saved, "lowbit", tmp_path)
    (d / "loop").symlink_to("loop")
    _edit_json(d / "lowbit-manifest.json", lambda m: m["files"].__setitem__("loop", {"sha256": "0" * 64, "bytes": 0}))
    _refused(d, "lowbit-manifest.json: lists 'loop', which is not a file name this system can open (Too many levels "
                "of symbolic links)")


@pytest.mark.parametrize("fmt", ["hf", "gptq"])
def test_manifest_format_the_files_are_not_is_refused_naming_the_key(saved, tmp_path, fmt):
    """A lowbit-format directory whose manifest says 'hf' was a raw ValueError ('is a compiled lowbit model'), and
    one saying 'gptq' was refused as 'a float HF model: load it with lowbit.compile_model'."""
    d = _copy(saved, "lowbit", tmp_path)
    _edit_json(d / "lowbit-manifest.json", lambda m: m.__setitem__("format", fmt))
    _refused(d, "lowbit-manifest.json", f"key 'format' says {fmt!r}, but the directory holds model.lowbit", cli=False)


@pytest.mark.parametrize("command", ["inspect", "graph"])
def test_inspect_and_graph_refuse_the_manifest_format_load_refuses(saved, tmp_path, command):
    """A lowbit directory whose manifest says 'hf' was shown by `lowbit inspect` / drawn by `lowbit graph` (exit 0)
    while lowbit.load refused it: one check, one message, exit 3."""
    d = _copy(saved, "lowbit", tmp_path)
    _edit_json(d / "lowbit-manifest.json", lambda m: m.__setitem__("format", "hf"))
    why = "lowbit-manifest.json: key 'format' says 'hf', but the directory holds model.lowbit"
    with pytest.raises(CheckpointError, match=why):
        lowbit.load(d)
    res = CliRunner().invoke(app, [command, str(d), *(["-o", str(tmp_path / "g.html")] if command == "graph" else [])])
    assert res.exit_code == 3, (res.exit_code, res.output, res.exception)
    assert why in res.output.replace("\n", "")
    assert not (tmp_path / "g.html").exists()


@pytest.mark.parametrize("hint", ["uint4", "bogus", "fp8e4m3"])
def test_manifest_qdtype_the_config_cannot_be_is_refused(saved, tmp_path, hint):
    """lowbit_qdtypes (what lowbit wrote, so uint4 reloads as uint4) was trusted wherever the bit width matched:
    'fp8e4m3' recorded for int8 codes loaded them as fp8 (another model, no error), 'uint4' for symmetric codes was
    a pydantic ValidationError, an unknown name a ValueError."""
    if hint == "fp8e4m3":
        torch.manual_seed(0)
        compiled = lowbit.compile_model(tiny_llama(hidden=64, inter=128, heads=4, kv_heads=2, vocab=97),
                                        pipeline="quantize(w=int8)")
        d = lowbit.save(compiled, tmp_path / "w8", format="compressed-tensors")
    else:
        d = _copy(saved, "compressed-tensors", tmp_path)
    _edit_json(d / "lowbit-manifest.json",
               lambda m: m["lowbit"]["lowbit_qdtypes"].__setitem__(DOWN, hint))
    bits = 8 if hint == "fp8e4m3" else 4
    _refused(d, "lowbit-manifest.json", f"'lowbit.lowbit_qdtypes.{DOWN}': gives {hint!r}, which config.json's "
                                        f"{bits}-bit symmetric integer scheme cannot be")


@pytest.mark.parametrize("edit,why", [
    (lambda p: p.write_text(p.read_text()[:40]), "not valid JSON"),  # blamed tokenizer_config.json
    (lambda p: p.write_text("[]"), "expected a JSON object, got list"),  # blamed tokenizer_config.json
    (lambda p: _edit_json(p, lambda c: c.__setitem__("model_type", "bogus")),  # transformers' ValueError
     "transformers cannot read this config (ValueError: The checkpoint you are trying to load has model type `bogus`"),
    (lambda p: _edit_json(p, lambda c: c.__setitem__("hidden_size", "x")),  # huggingface_hub's validation error
     "transformers cannot read this config (StrictDataclassFieldValidationError"),
])
def test_damaged_config_of_a_lowbit_checkpoint_names_config_json(saved, tmp_path, edit, why):
    d = _copy(saved, "lowbit", tmp_path)
    edit(d / "config.json")
    _rehash(d)
    _refused(d, "config.json: " + why, cli=False)  # lowbit inspect reads the IR and params only


def test_validation_messages_of_a_whole_entry_have_no_stray_period(saved, tmp_path):
    d = _copy(saved, "lowbit", tmp_path)
    _edit_json(d / "lowbit-manifest.json", lambda m: m["lowbit"].__setitem__("pruned", "x"))
    with pytest.raises(CheckpointError, match=r"manifest 'lowbit\.pruned': Input should be"):
        lowbit.load(d)


# ---- model.lowbit and params.safetensors, rehashed -----------------------------------------------


def _edit_ir(d: Path, old: str, new: str) -> None:
    text = (d / "model.lowbit").read_text()
    assert old in text, old
    (d / "model.lowbit").write_text(text.replace(old, new, 1))
    _rehash(d)


def _first_line(d: Path, start: str) -> str:
    return next(line for line in (d / "model.lowbit").read_text().splitlines() if line.strip().startswith(start))


def test_ir_declaring_a_wrong_dtype_is_refused_by_the_verifier(saved, tmp_path):
    """``%embedding: f16[...]`` where f32 is computed loaded and ran: load never ran the verifier."""
    d = _copy(saved, "lowbit", tmp_path)
    line = _first_line(d, "%embedding")
    _edit_ir(d, line, line.replace(": f32[", ": f16[", 1))
    _refused(d, "model.lowbit", "does not verify", "%embedding")  # inspect shows the IR, then the errors (exit 3)


def test_ir_declaring_an_impossible_size_is_refused_by_the_verifier(saved, tmp_path):
    d = _copy(saved, "lowbit", tmp_path)
    line = _first_line(d, "%embedding")
    _edit_ir(d, line, line.replace(",64]", ",65]", 1))
    _refused(d, "model.lowbit", "does not verify")


def test_ir_declaring_a_huge_value_of_fixed_size_is_refused_before_allocating_it(saved, tmp_path):
    """A node ``aten.zeros([100000, 100000, 100])`` (nothing reads it) was folded by the torch backend at load: a
    raw allocator RuntimeError for 4 TB, the OOM killer for a size the machine overcommits. A value whose size does
    not depend on the inputs may take at most 32x the parameters' bytes (1 GiB at least)."""
    d = _copy(saved, "lowbit", tmp_path)
    line = _first_line(d, "%embedding")
    shape = "100000,100000,100"  # 4 TB: past any machine, so without the check it fails at once, never swaps
    dims = ", ".join(shape.split(","))
    _edit_ir(d, line, f'  %big: f32[{shape}] = aten.zeros.default([{dims}], device=device("cpu"), pin_memory=False)'
                      f"\n{line}")
    _refused(d, "model.lowbit", "%big", f"f32[{shape}]", "whatever the inputs")


@pytest.mark.parametrize(("new", "why"), [
    ("symbol s0 in [1, 2]", "symbol s0 is declared twice"),
    ("symbol s9 in [-5, 1024]", "expected a size"),
    ("symbol s9 in [1024, 2]", "empty range"),
])
def test_symbol_lines_that_contradict_or_are_empty_are_parse_errors(saved, tmp_path, new, why):
    """A second ``symbol s0`` line silently replaced the first; ``[-5, 1024]`` was accepted."""
    d = _copy(saved, "lowbit", tmp_path)
    line = _first_line(d, "symbol s0")
    _edit_ir(d, line, f"{line}\n  {new}")
    _refused(d, "model.lowbit", why, "line ")


@pytest.mark.parametrize(("damage", "why"), [("truncated", "not valid lowbit IR: line "), ("not-utf8", "not UTF-8")])
def test_unreadable_ir_names_the_file(saved, tmp_path, damage, why):
    """A truncated model.lowbit said "line 76, col 6: expected ':'" without the path; a non-UTF-8 one raised a raw
    UnicodeDecodeError."""
    d = _copy(saved, "lowbit", tmp_path)
    f = d / "model.lowbit"
    f.write_bytes(f.read_bytes()[:3000] if damage == "truncated" else b"\xff\xfe\x00garbage")
    _rehash(d)
    with pytest.raises(CheckpointError, match=why) as err:
        lowbit.load(d)
    assert str(f) in str(err.value)


def test_a_tensor_missing_from_params_names_params_safetensors(saved, tmp_path):
    """It said "parameter @x has no tensor (IR parsed without weights?)" from the backend, naming no file."""
    d = _copy(saved, "lowbit", tmp_path)
    _edit_tensors(d / "params.safetensors", lambda t: t.pop("model.norm.weight"))
    _rehash(d)
    _refused(d, "params.safetensors", "@model.norm.weight", "model.lowbit", cli=False)


@pytest.mark.parametrize(("edit", "why"), [
    (lambda t: t.update(extra=torch.zeros(3)), "tensor 'extra' is not a parameter the IR declares"),
    (lambda t: t[f"{DOWN}.weight.scale"].view(-1).__setitem__(5, float("nan")),
     f"@{DOWN}.weight.scale (scale of %"),
])
def test_an_undeclared_tensor_or_a_nan_scale_in_params_is_refused(saved, tmp_path, edit, why):
    """Both loaded: the extra tensor silently ignored, the NaN scale making every logit NaN."""
    d = _copy(saved, "lowbit", tmp_path)
    _edit_tensors(d / "params.safetensors", edit)
    _rehash(d)
    _refused(d, "params.safetensors", why, "model.lowbit")


@pytest.mark.parametrize("fmt", ["compressed-tensors", "gptq"])
def test_a_nan_scale_in_an_hf_format_checkpoint_is_refused(saved, tmp_path, fmt):
    """A compressed-tensors or GPTQ file whose scales hold a NaN (no manifest: another tool's checkpoint, or one
    whose manifest an editor removed) loaded, and every logit was NaN; it is refused naming the parameter."""
    d = _copy(saved, fmt, tmp_path)
    name = f"{DOWN}.weight_scale" if fmt == "compressed-tensors" else f"{DOWN}.scales"
    _edit_tensors(d / "model.safetensors", lambda t: t[name].view(-1).__setitem__(3, float("nan")))
    (d / "lowbit-manifest.json").unlink()
    with pytest.raises(CheckpointError, match=r"do not make a usable model: parameter @.*holds 1 NaN value"):
        lowbit.load(d)


def _crafted_safetensors(path: Path, header: bytes) -> None:
    path.write_bytes(len(header).to_bytes(8, "little") + header + bytes(16))


@pytest.mark.parametrize(("header", "why"), [
    (b"[1, 2]", "header is a JSON list"),
    (b'"abc"', "header is a JSON str"),
    (b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0]}}', "tensor 'w' has no 'data_offsets'"),
    (b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": {"a": 1}}}', "tensor 'w' has no 'data_offsets'"),
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
], ids=["list", "string", "short-offsets", "dict-offsets", "nested"])
@pytest.mark.parametrize("fmt", ["lowbit", "compressed-tensors"])
def test_crafted_safetensors_headers_are_refused_naming_the_file(saved, tmp_path, header, why, fmt):
    """A header that is JSON but not an object of tensors was an AttributeError, short or dict data_offsets an
    IndexError / KeyError, deeply nested brackets a RecursionError: all exit 1 with a traceback."""
    d = _copy(saved, fmt, tmp_path)
    name = "params.safetensors" if fmt == "lowbit" else "model.safetensors"
    _crafted_safetensors(d / name, header)
    _rehash(d)
    _refused(d, name, why)


def test_config_json_nested_too_deeply_is_refused(saved, tmp_path):
    """json's RecursionError escaped read_json (exit 1)."""
    d = _copy(saved, "compressed-tensors", tmp_path)
    (d / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    _rehash(d)
    _refused(d, "config.json", "nested too deeply")


_INT16_TOKENS = {"num_bits": 16, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True}
_FP4_TOKENS = {"num_bits": 4, "type": "float", "symmetric": True, "strategy": "token", "dynamic": True}


@pytest.mark.parametrize(("edit", "why"), [
    (lambda c: c["quantization_config"].__setitem__("transform_config", {"config_groups": {"R4": {
        "type": "hadamard", "apply": [{"targets": ["re:.*down_proj$"], "location": "input"}]}}}),
     "transform_config (groups R4) asks for transforms"),
    (lambda c: c["quantization_config"].__setitem__("sparsity_config", {"format": "sparse-bitmask"}),
     "sparsity_config has format 'sparse-bitmask'"),
    (lambda c: c["quantization_config"]["config_groups"]["group_0"].__setitem__("output_activations", _INT16_TOKENS
                                                                                 | {"num_bits": 8}),
     "output_activations are quantized"),
    (lambda c: c["quantization_config"]["config_groups"]["group_0"].__setitem__("input_activations", _INT16_TOKENS),
     "16-bit int input activations"),
    (lambda c: c["quantization_config"]["config_groups"]["group_0"].__setitem__("input_activations", _FP4_TOKENS),
     "4-bit float input activations"),
], ids=["transform_config", "sparse-bitmask", "output_activations", "int16-inputs", "fp4-inputs"])
def test_compressed_tensors_fields_lowbit_does_not_read_are_refused(saved, tmp_path, edit, why):
    """A transform_config (vLLM's online rotations), a compressed sparsity format and output activation quantization
    were ignored: the checkpoint loaded as another model without a word. 4-bit float activations were read as fp8,
    16-bit integer ones were a raw pydantic ValidationError (exit 1)."""
    d = _copy(saved, "compressed-tensors", tmp_path)
    _edit_json(d / "config.json", edit)
    _rehash(d)
    _refused(d, "config.json", why)


@pytest.mark.parametrize(("fmt", "name"), [("lowbit", "params.safetensors"), ("lowbit", "model.lowbit"),
                                           ("compressed-tensors", "model.safetensors"),
                                           ("compressed-tensors", "config.json")])
def test_a_file_the_manifest_does_not_list_is_not_read_unverified(saved, tmp_path, fmt, name):
    """verify_manifest checks the files it lists; a params.safetensors (or model.safetensors, config.json) replaced
    after the save and dropped from the list was read without any hash check, and loaded."""
    d = _copy(saved, fmt, tmp_path)
    if name.endswith(".safetensors"):
        _edit_tensors(d / name, lambda t: t.__setitem__(next(iter(t)), torch.zeros_like(t[next(iter(t))])))
    m = json.loads((d / "lowbit-manifest.json").read_text())
    del m["files"][name]
    (d / "lowbit-manifest.json").write_text(json.dumps(m))
    _refused(d, name, "not listed in lowbit-manifest.json")


def test_config_declaring_a_huge_model_is_refused_before_allocating_it(saved, tmp_path, monkeypatch):
    """vocab_size 97 -> 10**10 in config.json: the model was built on the CPU from config.json before its sizes were
    checked against the tensors (256 GB at 10**9: a raw RuntimeError, or the OOM killer where memory
    overcommits). It is checked on the meta device first; the CPU model is never built."""
    import lowbit.checkpoint.hf as hf

    built = []

    def skeleton(config, kind, device="meta", dtype=torch.float32):
        if device != "meta":
            built.append(device)
            raise AssertionError(f"the {config.vocab_size}-token model was allocated on {device}")
        return real(config, kind, device, dtype)

    real = hf.skeleton
    monkeypatch.setattr(hf, "skeleton", skeleton)
    d = _copy(saved, "compressed-tensors", tmp_path)
    _edit_json(d / "config.json", lambda c: c.__setitem__("vocab_size", 10**10))
    _rehash(d)
    _refused(d, "model.safetensors", "[97, 64], but LlamaForCausalLM built from config.json has [10000000000, 64]")
    assert not built


@pytest.mark.parametrize(("edit", "why"), [
    (lambda c: c.__setitem__("hidden_act", "os.system"), "cannot build the model this config describes (KeyError"),
    (lambda c: c.__setitem__("max_position_embeddings", 1), "max_position_embeddings 1; lowbit captures"),
])
def test_config_fields_transformers_or_capture_cannot_use_are_refused(saved, tmp_path, edit, why):
    """An unknown hidden_act was transformers' raw KeyError while building the model, max_position_embeddings 1
    torch.export's AssertionError (min must be <= max) in capture: both exit 1 with a traceback."""
    d = _copy(saved, "compressed-tensors", tmp_path)
    _edit_json(d / "config.json", edit)
    _rehash(d)
    _refused(d, "config.json", why)


def test_gptq_settings_in_quantize_config_json_are_named(saved, tmp_path):
    """An older AutoGPTQ directory keeps its settings in quantize_config.json: it was called "a float HF model: load
    it with lowbit.compile_model", which then found no float weights."""
    d = _copy(saved, "gptq", tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    (d / "quantize_config.json").write_text(json.dumps(cfg.pop("quantization_config")))
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "lowbit-manifest.json").unlink()
    _refused(d, "config.json", "quantize_config.json is beside it (an older AutoGPTQ layout)")


# ---- format versions -----------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["lowbit", "compressed-tensors"])
def test_a_checkpoint_of_a_newer_format_version_is_refused_naming_both_versions(saved, tmp_path, fmt):
    """``versions.lowbit`` was never read and nothing else said which layout a directory has, so a checkpoint a
    newer lowbit wrote in a changed layout would be read as this one's (or fail on whatever differed first)."""
    from lowbit.checkpoint.files import FORMAT_VERSION

    d = _copy(saved, fmt, tmp_path)
    assert json.loads((d / "lowbit-manifest.json").read_text())["format_version"] == FORMAT_VERSION
    _edit_json(d / "lowbit-manifest.json", lambda m: (m.__setitem__("format_version", FORMAT_VERSION + 1),
                                                      m["versions"].__setitem__("lowbit", "99.0")))
    _refused(d, "lowbit-manifest.json", f"format_version {FORMAT_VERSION + 1} (written by lowbit 99.0) is newer",
             f"format_version {FORMAT_VERSION} and older", lowbit.__version__)


def test_ir_text_of_a_newer_version_is_refused_naming_the_file_and_both_versions(saved, tmp_path):
    from lowbit.ir.printer import IR_VERSION

    d = _copy(saved, "lowbit", tmp_path)
    first = (d / "model.lowbit").read_text().splitlines()[0]
    assert first == f"# lowbit IR version {IR_VERSION}"
    _edit_ir(d, first, f"# lowbit IR version {IR_VERSION + 1}")
    _refused(d, str(d / "model.lowbit"), f"lowbit IR version {IR_VERSION + 1}, written by a newer lowbit",
             f"reads versions up to {IR_VERSION}")


def test_a_checkpoint_written_before_format_versions_still_loads(saved, tmp_path):
    """Old directories have neither the manifest's format_version nor the IR's version line: read as version 1."""
    d = _copy(saved, "lowbit", tmp_path)
    _edit_ir(d, (d / "model.lowbit").read_text().splitlines()[0] + "\n", "")
    _edit_json(d / "lowbit-manifest.json", lambda m: m.pop("format_version"))
    ids = torch.randint(0, 97, (1, 6))
    assert torch.equal(lowbit.load(d)(ids), lowbit.load(saved["lowbit"])(ids))


@pytest.fixture(autouse=True)
def _one_export_per_model(reuse_captures: object) -> None:
    """Every test here captures through the session's capture cache (conftest's ``reuse_captures``): the same tiny
    model compiled or reloaded again is not exported again."""
