"""Loading compressed-tensors checkpoints: the 4-bit and 8-bit words become lowbit's stored codes without an
unpack-repack round trip, bit-identical to that round trip on a real SmolLM2 slice, and shapes the direct path does
not take fall back to it; what lowbit cannot hold is refused by name."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import saveable_slice, tiny_llama

import lowbit
from lowbit.checkpoint import hf
from lowbit.passes.manager import PassManager, parse_pipeline

pytest.importorskip("compressed_tensors")


@pytest.fixture(scope="module")
def smollm2_slice_and_ids(smollm2):
    """(float graph of a 2-layer SmolLM2 with its HF source, 2 WikiText-2 test windows of 128 tokens)."""
    return saveable_slice(smollm2)


def _assert_same_params(a, b) -> None:
    assert set(a.params) == set(b.params)
    for name, v in a.params.items():
        w = b.params[name].data
        assert v.data.dtype == w.dtype and torch.equal(v.data, w), name


def _load_spying(directory: Path, monkeypatch) -> tuple[lowbit.CompiledModel, list[tuple[int, ...]], int]:
    """(``lowbit.load(directory)``, the shapes compressed-tensors' ``unpack_from_int32`` was asked to unpack to, how
    many linears took the direct path)."""
    from compressed_tensors.compressors.pack_quantized import helpers

    unpacked: list[tuple[int, ...]] = []
    direct = [0]
    real_unpack, real_direct = helpers.unpack_from_int32, hf.words_as_stored_codes

    def unpack(value, num_bits, shape, packed_dim=1):
        unpacked.append(tuple(shape))
        return real_unpack(value, num_bits, shape, packed_dim)

    def words_as_codes(packed, bits, k, signed):
        out = real_direct(packed, bits, k, signed)
        direct[0] += out is not None
        return out

    with monkeypatch.context() as m:
        m.setattr(helpers, "unpack_from_int32", unpack)
        m.setattr(hf, "words_as_stored_codes", words_as_codes)
        loaded = lowbit.load(directory)
    return loaded, unpacked, direct[0]


def _load_unpacking(directory: Path, monkeypatch) -> lowbit.CompiledModel:
    """``lowbit.load(directory)`` through the unpack-repack path (the direct one refused for every linear)."""
    with monkeypatch.context() as m:
        m.setattr(hf, "words_as_stored_codes", lambda packed, bits, k, signed: None)
        return lowbit.load(directory)


def _weight_shapes(directory: Path) -> list[tuple[int, ...]]:
    """The ``weight_shape`` of every packed linear in the checkpoint."""
    from safetensors.torch import load_file

    return [tuple(t.tolist()) for name, t in load_file(str(directory / "model.safetensors")).items()
            if name.endswith(".weight_shape")]


# uint4 and int8 on SmolLM2 run with LOWBIT_SLOW=1 (~10 CPU-s each): their direct paths are proved by default on
# the tiny Llama below (uint4, int8, uint8, bit-identical to the unpacking path and the compile)
@pytest.mark.parametrize("pipeline", ["quantize(w=int4,group=64)",
                                      "quantize(w=int4,group=128,group_fallback=64,sym=false)",
                                      pytest.param("quantize(w=uint4,group=64,sym=false)", marks=pytest.mark.slow),
                                      pytest.param("quantize(w=int8)", marks=pytest.mark.slow)])
def test_packed_words_load_as_lowbit_codes_bit_identical_to_unpacking(smollm2_slice_and_ids, tmp_path, monkeypatch,
                                                                      pipeline):
    """int4 (two's-complement nibbles, XOR 0x88 of compressed-tensors' offset ones), uint4 (the nibbles as they
    are) and int8 (the bytes XOR 0x80), symmetric and with zero points: the same stored codes, zero points and logits
    as unpacking the int32 words to int8 codes and packing them again, and as the compile that wrote them; no weight
    is unpacked."""
    float_graph, ids = smollm2_slice_and_ids
    graph = float_graph.clone()
    PassManager(parse_pipeline(pipeline)).run(graph)
    out = lowbit.save(graph, tmp_path / "ck", format="compressed-tensors")
    weight_shapes = _weight_shapes(out)
    direct, unpacked, n_direct = _load_spying(out, monkeypatch)
    assert n_direct == len(weight_shapes) > 0
    assert not set(weight_shapes) & set(unpacked), "a weight was unpacked to int8 codes"
    repacked = _load_unpacking(out, monkeypatch)
    _assert_same_params(repacked.graph, direct.graph)
    _assert_same_params(graph, direct.graph)
    logits = direct(ids)
    assert torch.equal(logits, repacked(ids))
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("pipeline,direct_linears", [
    ("quantize(w=int4)", 7),                  # K = 36 and 68: 4.5 and 8.5 words a row, the last word half padding
    ("quantize(w=uint4,sym=false)", 7),
    ("quantize(w=int8)", 7),                  # a byte a code: the words' bytes with the top bit flipped
    ("quantize(w=uint8,sym=false)", 7),       # the words' bytes as they are
    ("quantize(w=int3)", 0),                  # 3-bit codes straddle nibbles and words: unpacked
])
def test_rows_of_partial_words_and_other_widths_load_exactly(tmp_path, monkeypatch, pipeline, direct_linears):
    """A row whose last int32 word is part padding (K % 8 == 4) takes the direct path with the padding cut off;
    3-bit words are unpacked as before; both load to the compile's params and logits."""
    torch.manual_seed(0)
    model = tiny_llama(hidden=36, inter=68, heads=2, kv_heads=1, vocab=97, max_positions=64)
    compiled = lowbit.compile_model(model, pipeline=pipeline)
    out = lowbit.save(compiled, tmp_path / "ck", format="compressed-tensors")
    loaded, _, n_direct = _load_spying(out, monkeypatch)
    assert n_direct == direct_linears
    _assert_same_params(compiled.graph, loaded.graph)
    _assert_same_params(_load_unpacking(out, monkeypatch).graph, loaded.graph)
    ids = torch.randint(0, 97, (2, 12))
    assert torch.equal(loaded(ids), compiled(ids))


def test_inspect_and_graph_of_a_checkpoint_never_dequantize_its_weights(tmp_path, monkeypatch):
    """`lowbit inspect` and `lowbit graph` of a compressed-tensors directory read the graph lowbit.load rebuilds, but
    the load lowered it as for running it: every packed weight dequantized into a float copy (full SmolLM2 int4:
    44 s and 1.1 GB peak RSS against 34 s and 0.7 GB), which nothing they print reads."""
    from typer.testing import CliRunner

    import lowbit.ir.quant as quant
    from lowbit.cli.main import app

    torch.manual_seed(0)
    compiled = lowbit.compile_model(tiny_llama(), pipeline="quantize(w=int4,group=32)")
    out = lowbit.save(compiled, tmp_path / "ck", format="compressed-tensors")
    unpacked = []
    real_unpack = quant.unpack_int4
    monkeypatch.setattr(quant, "unpack_int4", lambda packed, signed: unpacked.append(packed.shape) or
                        real_unpack(packed, signed))
    res = CliRunner().invoke(app, ["inspect", str(out)])
    assert res.exit_code == 0, res.output
    assert "int4 weight ×7" in res.output
    res = CliRunner().invoke(app, ["graph", str(out), "--format", "html", "-o", str(tmp_path / "g.html")])
    assert res.exit_code == 0, res.output
    assert "self_attn.q_proj" in (tmp_path / "g.html").read_text()
    assert unpacked == []
    assert len(lowbit.load(out)(torch.randint(0, 61, (1, 8))).shape) == 3 and unpacked  # the spy sees a lowering


def test_a_4bit_linear_of_odd_input_size_from_another_tool_is_refused_by_name(tmp_path):
    """compressed-tensors packs 4-bit codes densely into int32 words, so another tool's checkpoint can hold a 4-bit
    linear of odd K (transformers loads it); lowbit packs two codes per byte and cannot. Its load was pack_int4's
    bare ValueError ('needs an even last dimension ... (36, 63)'), naming no linear or file."""
    import json

    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32
    from safetensors.torch import load_file, save_file

    from lowbit.checkpoint import CheckpointError

    torch.manual_seed(0)
    compiled = lowbit.compile_model(tiny_llama(hidden=36, inter=63, heads=2, kv_heads=1, vocab=97, max_positions=64),
                                    pipeline="quantize(w=int8)")  # int4 is refused at K = 63: written as 8-bit
    out = lowbit.save(compiled, tmp_path / "ck", format="compressed-tensors")
    tensors = load_file(str(out / "model.safetensors"))
    for name in [k for k in tensors if k.endswith(".weight_packed")]:  # as a tool that packs 4-bit codes would
        shape = torch.Size(tensors[name.replace("_packed", "_shape")].tolist())
        codes = unpack_from_int32(tensors[name], 8, shape)
        tensors[name] = pack_to_int32(torch.div(codes, 16, rounding_mode="floor").to(torch.int8), 4)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    for group in config["quantization_config"]["config_groups"].values():
        group["weights"]["num_bits"] = 4
    (out / "config.json").write_text(json.dumps(config))
    (out / "lowbit-manifest.json").unlink()  # another tool writes none
    with pytest.raises(CheckpointError, match=r"config\.json: linear 'model\.layers\.0\.mlp\.down_proj' \[36, 63\] "
                                              r"has 4-bit weights \(int4\) and an odd input size 63"):
        lowbit.load(out)


# int8 on SmolLM2 with LOWBIT_SLOW=1: the same byte transpose as int4, one code a byte instead of two
@pytest.mark.parametrize("pipeline", ["quantize(w=int4,group=64)",
                                      pytest.param("quantize(w=int8)", marks=pytest.mark.slow)])
def test_gptq_words_load_as_lowbit_codes_bit_identical_to_unpacking(smollm2_slice_and_ids, tmp_path, monkeypatch,
                                                                    pipeline):
    """GPTQ's qweight (codes packed along K, one column per output) becomes lowbit's stored codes by a byte
    transpose and a top-bit flip: on a real SmolLM2 slice every linear takes it, and the codes, scales and logits
    are bit-identical to unpacking the words through int64 shifts (the path before) and to the compile."""
    float_graph, ids = smollm2_slice_and_ids
    graph = float_graph.clone()
    PassManager(parse_pipeline(pipeline)).run(graph)
    out = lowbit.save(graph, tmp_path / "ck", format="gptq")
    direct = []
    real = hf.gptq_words_as_stored_codes
    with monkeypatch.context() as m:
        m.setattr(hf, "gptq_words_as_stored_codes", lambda qweight, bits: direct.append(real(qweight, bits))
                  or direct[-1])
        loaded = lowbit.load(out)
    assert len(direct) == 14 and all(d is not None for d in direct)  # 7 linears in each of 2 blocks
    with monkeypatch.context() as m:
        m.setattr(hf, "gptq_words_as_stored_codes", lambda qweight, bits: None)
        unpacked = lowbit.load(out)
    _assert_same_params(unpacked.graph, loaded.graph)
    _assert_same_params(graph, loaded.graph)
    assert torch.equal(loaded(ids), unpacked(ids))
