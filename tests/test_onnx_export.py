"""``lowbit.export`` and loading exported files: formats, golden lowerings of tiny IR graphs, clear errors for
unknown formats and for missing, truncated or corrupted ONNX files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import lowbit
from lowbit.backends.onnx import OnnxFileError, OnnxLoweringError, load_onnx, lowered_op_types, to_onnx
from lowbit.backends.onnxruntime_backend import OrtCompiled, ProviderFallbackWarning
from lowbit.backends.torch_backend import TorchCompiled
from lowbit.export import load
from lowbit.ir.parser import parse_graph
from lowbit.ir.quant import pack_int4

FLOAT_IR = """graph main(%x: f32[1,s0,8]) {
  symbol s0 in [2, 64] hint 4
  param @g: f32[8]
  param @w: f32[4,8]
  %n: f32[1,s0,8] = rms_norm(%x, @g, eps=1e-06, compute_dtype=None)  # norm
  %y: f32[1,s0,4] = linear(%n, @w)  # proj
  return %y
}
"""

QUANT_IR = """graph main(%x: f32[1,s0,8]) {
  symbol s0 in [2, 64] hint 4
  param @w.qdata: u8[4,4]
  param @w.scale: f32[4,2]
  %s: f32[1,s0,1], %zp: i8[1,s0,1] = dynamic_qparams(%x, qdtype="int8", granularity="per_token", symmetric=True, axis=-1, block_size=None)
  %q: i8[1,s0,8] = quantize(%x, %s, None, qdtype="int8", axis=-1, block_size=8)
  %xq: f32[1,s0,8] = dequantize(%q, %s, None, qdtype="int8", axis=-1, block_size=8, out_dtype=f32)
  %w: f32[4,8] = dequantize(@w.qdata, @w.scale, None, qdtype="int4", axis=1, block_size=4, out_dtype=f32)
  %y: f32[1,s0,4] = linear(%xq, %w)  # proj
  return %y
}
"""


def _listing(model) -> list[str]:
    return [f"{', '.join(o.name for o in n.outputs)} = {n.op_type}({', '.join(i.name for i in n.inputs if i)})"
            for n in model.graph]


def _quant_params() -> dict[str, torch.Tensor]:
    codes = torch.tensor([[-8, -3, 0, 1, 7, 2, -1, 5]] * 4, dtype=torch.int8)
    return {"w.qdata": pack_int4(codes), "w.scale": torch.full((4, 2), 0.05)}


def test_golden_float_lowering():
    g = parse_graph(FLOAT_IR, {"g": torch.ones(8), "w": torch.randn(4, 8)})
    assert _listing(to_onnx(g)) == [
        "n.Pow1 = Pow(x, const)",
        "n.ReduceMean2 = ReduceMean(n.Pow1, const_1)",
        "n.Add3 = Add(n.ReduceMean2, const_2)",
        "n.Sqrt4 = Sqrt(n.Add3)",
        "n.Div5 = Div(x, n.Sqrt4)",
        "n = Mul(g, n.Div5)",
        "y = MatMul(n, w.T)",  # the [out, in] weight is stored transposed: MatMul reads it directly
    ]


def test_golden_qdq_lowering():
    g = parse_graph(QUANT_IR, _quant_params())
    listing = _listing(to_onnx(g))
    assert listing == [
        # symmetric per-token scale: max|x| in one reduction (not ReduceMin + ReduceMax), no zero point
        "s.Abs1 = Abs(x)",
        "s.ReduceMax2 = ReduceMax(s.Abs1, const)",
        "s.Div3 = Div(s.ReduceMax2, const_2)",
        "s = Max(s.Div3, const_1)",
        "q = QuantizeLinear(x, s)",
        "xq = DequantizeLinear(q, s)",
        "w.DequantizeLinear10 = DequantizeLinear(w.qdata.T, w.scale.T)",  # int4 [K, N], blocks along K
        "y = MatMul(xq, w.DequantizeLinear10)",
    ], listing
    model = to_onnx(g)
    dq = next(n for n in model.graph if n.op_type == "DequantizeLinear" and n.inputs[0].name == "w.qdata.T")
    assert dq.attributes["axis"].as_int() == 0 and dq.attributes["block_size"].as_int() == 4
    x = torch.randn(1, 5, 8)
    torch.testing.assert_close(OrtCompiled(g)(x), TorchCompiled(g)(x), rtol=1e-5, atol=1e-5)


class _DeviceTensor(torch.Tensor):
    """A CPU tensor that refuses ``numpy()`` without ``force=True`` as a CUDA tensor does (no GPU on the test
    machine): what a graph compiled with ``device="cuda"`` hands the ONNX writer."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.numpy and not kwargs.get("force", False):
            raise TypeError("can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() to copy the tensor "
                            "to host memory first.")
        return super().__torch_function__(func, types, args, kwargs)


@pytest.mark.parametrize("device", ["simulated", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a GPU"))])
def test_packed_weights_off_the_cpu_export(tmp_path, device):
    """The packed 4-bit writers (INT4 initializers) called ``numpy()`` without ``force=True``: a packed weight on a GPU
    (a model compiled with device="cuda") failed in the save with "can't convert cuda:0 device type tensor to
    numpy"."""
    g = parse_graph(QUANT_IR, _quant_params())
    for v in g.params.values():
        v.data = v.data.as_subclass(_DeviceTensor) if device == "simulated" else v.data.to(device)
    out = lowbit.export(g, tmp_path / "m.onnx")
    assert out.read_bytes() == lowbit.export(parse_graph(QUANT_IR, _quant_params()), tmp_path / "ref.onnx").read_bytes()


@pytest.mark.parametrize("exact_cpu", [True, False])
def test_metadata_records_the_int8_weight_codes_written(monkeypatch, exact_cpu):
    """``lowbit.options`` recorded ``int8_weights: "auto"``, which the exporting CPU resolves (u8 without VNNI): a
    file read elsewhere could not tell which weight codes its integer GEMMs take. It records what was written."""
    import json

    import onnx_ir as ir

    from lowbit.passes.manager import PassManager

    monkeypatch.setattr("lowbit.backends.onnx.context.int8_gemm_exact", lambda: exact_cpu)
    g = parse_graph(FLOAT_IR, {"g": torch.ones(8), "w": torch.randn(4, 8)})
    PassManager("quantize(w=int8,a=int8)").run(g)
    model = to_onnx(g, integer_matmul=True)
    (gemm,) = [n for n in model.graph if n.op_type == "MatMulIntegerToFloat"]
    written = "u8" if gemm.inputs[1].dtype == ir.DataType.UINT8 else "s8"
    assert written == ("s8" if exact_cpu else "u8")
    assert json.loads(model.metadata_props["lowbit.options"])["int8_weights"] == written


def test_an_interrupted_external_data_save_leaves_the_earlier_export_whole(tmp_path, monkeypatch):
    """An external-data save wrote the .onnx and its .data in place: one that failed part way (disk full, killed)
    left a valid-looking .onnx over a half-written side file. Both are written beside and renamed into place."""
    import onnx_ir

    from lowbit.backends.onnx import save_onnx

    text = "graph main(%x: f32[2,64]) {\n  param @w: f32[64,64]\n  %y: f32[2,64] = linear(%x, @w)\n  return %y\n}\n"
    first, second = (parse_graph(text, {"w": torch.randn(64, 64)}) for _ in range(2))
    path = save_onnx(to_onnx(first), tmp_path / "m.onnx", external_data=True)  # 16 KiB weight: in m.onnx.data
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert set(before) == {"m.onnx", "m.onnx.data"}
    real_save = onnx_ir.save

    def disk_full(model, where, **kw):
        real_save(model, where, **kw)
        data = Path(where).with_name(kw["external_data"])
        data.write_bytes(data.read_bytes()[:1000])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(onnx_ir, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        save_onnx(to_onnx(second), path, external_data=True)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # and no temporaries left
    x = torch.randn(2, 64)
    torch.testing.assert_close(load(path)(x), TorchCompiled(first)(x), rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(onnx_ir, "save", real_save)
    save_onnx(to_onnx(second), path, external_data=True)
    torch.testing.assert_close(load(path)(x), TorchCompiled(second)(x), rtol=1e-5, atol=1e-5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]


def test_a_non_finite_quantization_scale_is_refused_by_name(tmp_path):
    """A NaN scale was exported, checked and loaded without a word, and every output of the file was NaN (lowbit.load
    refuses the same scale in a checkpoint)."""
    params = _quant_params()
    params["w.scale"][2, 1] = float("nan")
    g = parse_graph(QUANT_IR, params)
    with pytest.raises(OnnxLoweringError, match="parameter @w.scale \\(scale of %w = dequantize\\(...\\)\\) holds 1 "
                                                "NaN "
                                                "value\\(s\\): the exported model would compute NaN"):
        lowbit.export(g, tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_export_formats(tmp_path):
    g = parse_graph(QUANT_IR, _quant_params())
    qdq = lowbit.export(g, tmp_path / "m.onnx")
    nbits = lowbit.export(TorchCompiled(g), tmp_path / "m-nbits.onnx", format="onnx-matmulnbits")
    assert "com.microsoft::MatMulNBits" not in lowered_op_types(load_onnx(qdq))
    x = torch.randn(1, 6, 8)
    ref = TorchCompiled(g)(x)
    for path in (qdq, nbits):
        torch.testing.assert_close(load(path)(x), ref, rtol=1e-5, atol=1e-5)


WEIGHT_ONLY_IR = """graph main(%x: f32[1,s0,32]) {
  symbol s0 in [2, 64] hint 4
  param @w.qdata: u8[6,16]
  param @w.scale: f32[6,BLOCKS]
  %w: f32[6,32] = dequantize(@w.qdata, @w.scale, None, qdtype="int4", axis=1, block_size=BLOCK, out_dtype=f32)
  %y: f32[1,s0,6] = linear(%x, %w)  # proj
  return %y
}
"""


@pytest.mark.parametrize("block, nbits", [(16, True), (8, False)])
def test_matmulnbits_export_of_weight_only_linear(tmp_path, block, nbits):
    """MatMulNBits takes power-of-two blocks of 16 or more; other blocks stay QDQ (same numbers)."""
    text = WEIGHT_ONLY_IR.replace("BLOCKS", str(32 // block)).replace("BLOCK", str(block))
    codes = torch.randint(-8, 8, (6, 32), dtype=torch.int8, generator=torch.Generator().manual_seed(0))
    g = parse_graph(text, {"w.qdata": pack_int4(codes), "w.scale": torch.rand(6, 32 // block) + 0.01})
    path = lowbit.export(g, tmp_path / "m.onnx", format="onnx-matmulnbits")
    ops = lowered_op_types(load_onnx(path))
    assert ("com.microsoft::MatMulNBits" in ops) == nbits and ("DequantizeLinear" in ops) != nbits
    x = torch.randn(1, 5, 32)
    # float32 sums in another order: compare relative to the output's size, not absolutely
    torch.testing.assert_close(load(path)(x), TorchCompiled(g)(x), rtol=1e-5, atol=1e-5)


def test_export_argument_refusals_are_lowbit_errors(tmp_path):
    """README: every deliberate refusal is a ``lowbit.errors.LowbitError``; an unknown format, a directory as the
    path and a bad ``external_data`` were bare ValueErrors (still ValueErrors, as ``ExportError``)."""
    from lowbit.errors import LowbitError

    g = parse_graph(FLOAT_IR, {"g": torch.ones(8), "w": torch.randn(4, 8)})
    for kwargs in ({"format": "onnx-matmulbits"}, {"external_data": "false"}):
        with pytest.raises(LowbitError):
            lowbit.export(g, tmp_path / "m.onnx", **kwargs)
    with pytest.raises(LowbitError, match="is a directory"):
        lowbit.export(g, tmp_path)
    # an option export does not take was a bare TypeError: named with the options it takes, still a TypeError
    for fmt, kind in (("onnx", "ONNX export"), ("tensorrt", "TensorRT build")):
        with pytest.raises(LowbitError, match=f"unknown {kind} option 'unknown'; options are: ") as exc:
            lowbit.export(g, tmp_path / "m.out", format=fmt, unknown=1)
        assert isinstance(exc.value, TypeError)
    path = lowbit.export(g, tmp_path / "m.onnx")
    with pytest.raises(LowbitError, match="unknown option 'thread' .*for a model run from an ONNX file"):
        load(path, thread=2)


@pytest.mark.parametrize("options, match", [
    ({"opset": 19}, "opset 19 is too old"),
    ({"opset": "21"}, "opset must be an integer"),
    ({"accuracy_level": 9}, "accuracy_level must be an integer from 0 to 4"),
    ({"attention": "onnx"}, "attention='onnx' needs opset 23"),
    ({"integer_matmul": "yes"}, "integer_matmul must be True or False"),
])
def test_export_option_values_the_lowering_refuses_are_lowbit_errors(tmp_path, options, match):
    """README: every deliberate refusal is a ``LowbitError``; an option value the ONNX lowering refuses was a bare
    ValueError from ``LoweringOptions`` (callers catching ``LowbitError`` took it for a bug). Still a ValueError, and
    the directories the export created for the file are gone again."""
    from lowbit.errors import LowbitError

    g = parse_graph(FLOAT_IR, {"g": torch.ones(8), "w": torch.randn(4, 8)})
    with pytest.raises(LowbitError, match=match) as exc:
        lowbit.export(g, tmp_path / "new" / "m.onnx", **options)
    assert isinstance(exc.value, ValueError)
    assert not (tmp_path / "new").exists()


def test_unknown_format_and_input_are_clear(tmp_path):
    g = parse_graph(FLOAT_IR, {"g": torch.ones(8), "w": torch.randn(4, 8)})
    with pytest.raises(ValueError, match="unknown export format 'onnx-matmulbits' \\(did you mean 'onnx-matmulnbits'"):
        lowbit.export(g, tmp_path / "m.onnx", format="onnx-matmulbits")
    with pytest.raises(TypeError, match="a lowbit Graph or a compiled model with a .graph, got Linear"):
        lowbit.export(torch.nn.Linear(2, 2), tmp_path / "m.onnx")
    # a misspelt option was LoweringOptions' bare "unexpected keyword argument"; a directory an IsADirectoryError
    with pytest.raises(TypeError, match="unknown ONNX export option 'opsett' \\(did you mean 'opset'.*accuracy_level"):
        lowbit.export(g, tmp_path / "m.onnx", opsett=21)
    with pytest.raises(ValueError, match="is a directory: give a file path such as .*model.onnx"):
        lowbit.export(g, tmp_path)
    # an engine path that is a directory was found only when the built plan was renamed onto it
    with pytest.raises(ValueError, match="is a directory: give a file path such as .*model.engine"):
        lowbit.export(g, tmp_path, format="tensorrt")
    # a TypeError from difflib, one from '<' between str and int, a FileExistsError after the lowering
    with pytest.raises(ValueError, match="external_data takes True, False or None .*got 'false'"):
        lowbit.export(g, tmp_path / "m.onnx", external_data="false")
    assert not (tmp_path / "m.onnx").exists()
    with pytest.raises(ValueError, match="unknown export format None; known: onnx"):
        lowbit.export(g, tmp_path / "m.onnx", format=None)
    with pytest.raises(ValueError, match="opset must be an integer, got '21'"):
        lowbit.export(g, tmp_path / "m.onnx", opset="21")
    (tmp_path / "file").write_text("x")
    with pytest.raises(OSError, match="cannot write export path .*: '.*file' is a file, not a"):
        lowbit.export(g, tmp_path / "file" / "sub" / "m.onnx")


def test_home_relative_paths_are_expanded(tmp_path, monkeypatch):
    """'~/m.onnx' is the home directory's file, as lowbit.save takes it (it was written under ./~/)."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    g = parse_graph(FLOAT_IR, {"g": torch.ones(8), "w": torch.randn(4, 8)})
    out = lowbit.export(g, "~/sub/m.onnx", external_data=True)
    assert out == tmp_path / "home" / "sub" / "m.onnx" and out.is_file() and not (tmp_path / "~").exists()
    x = torch.randn(1, 5, 8)
    torch.testing.assert_close(load("~/sub/m.onnx")(x), TorchCompiled(g)(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(OrtCompiled.load("~/sub/m.onnx")(x), TorchCompiled(g)(x), rtol=1e-5, atol=1e-5)


def test_an_onnx_file_under_another_name_loads_as_onnx(tmp_path):
    """export() writes ONNX at any path, but load() sent every name not ending '.onnx' to TensorRT ('needs the
    tensorrt package'); ONNX content or an upper-case suffix now load in ONNX Runtime, engine files still go to
    TensorRT."""
    from lowbit.backends.tensorrt import EngineFileError, TensorRTUnavailable

    g = parse_graph(FLOAT_IR, {"g": torch.ones(8), "w": torch.randn(4, 8)})
    x = torch.randn(1, 5, 8)
    for name in ("model", "model.ONNX", "model.bin"):
        path = lowbit.export(g, tmp_path / name)
        torch.testing.assert_close(load(path)(x), TorchCompiled(g)(x), rtol=1e-5, atol=1e-5)
    (tmp_path / "m.engine").write_bytes(b"LOWBIT-TRT" + bytes(40))
    with pytest.raises((EngineFileError, TensorRTUnavailable)):
        load(tmp_path / "m.engine")


def test_unwritable_export_paths_fail_before_the_lowering(tmp_path, monkeypatch):
    """A parent that is a file was FileExistsError 'File exists: .../m.onnx' (the parent's name, after the whole
    lowering); now ExportPathError names the export path before to_onnx runs."""
    import lowbit.backends.onnx as onnx_backend
    from lowbit.export import ExportPathError

    g = parse_graph(FLOAT_IR, {"g": torch.ones(8), "w": torch.randn(4, 8)})
    (tmp_path / "file").write_text("x")
    lowered = []
    monkeypatch.setattr(onnx_backend, "to_onnx", lambda *a, **k: lowered.append(a) or to_onnx(*a, **k))
    for path in (tmp_path / "file" / "m.onnx", tmp_path / "file" / "sub" / "m.onnx"):
        with pytest.raises(ExportPathError, match=f"cannot write export path '{path}': '{tmp_path / 'file'}' is a "
                                                  "file, not a directory"):
            lowbit.export(g, path)
    assert not lowered
    assert lowbit.export(g, tmp_path / "new" / "dir" / "m.onnx").is_file() and len(lowered) == 1


@pytest.mark.parametrize("fmt, name", [("onnx", "model.onnx"), ("tensorrt", "model.engine")])
def test_a_path_ending_in_a_slash_is_a_directory_even_before_it_exists(tmp_path, fmt, name):
    """``lowbit.export(model, "out/")`` wrote a file named ``out``: Path drops the slash. It is refused as a
    directory that exists is, before anything is written."""
    g = parse_graph(FLOAT_IR, {"g": torch.ones(8), "w": torch.randn(4, 8)})
    with pytest.raises(ValueError, match=f"export path '{tmp_path / 'out'}' is a directory: give a file path such as "
                                         f"'{tmp_path / 'out' / name}'"):
        lowbit.export(g, f"{tmp_path}/out/", format=fmt)
    assert not (tmp_path / "out").exists()


def test_a_failed_rewrite_leaves_the_earlier_export_whole(tmp_path, monkeypatch):
    """Exporting again to the same path wrote over the file in place: a save that failed part way (disk full,
    interrupted) left a truncated model instead of the earlier one."""
    import onnx_ir as ir

    g = parse_graph(FLOAT_IR, {"g": torch.ones(8), "w": torch.randn(4, 8)})
    path = lowbit.export(g, tmp_path / "m.onnx")
    before = path.read_bytes()

    def failing_save(model, target, **kw):
        open(target, "wb").write(b"\x08\x0a partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ir, "save", failing_save)
    with pytest.raises(OSError, match="No space left"):
        lowbit.export(g, path)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_session_options_of_a_file_are_checked_by_name(exported):
    """load(path, thread=2) was 'lowering options ['thread'] apply only when lowering a Graph' and threads='2'
    pybind11's 'incompatible function arguments'; compile_model(backend_options={'threads': -1}) failed after
    capture."""
    from lowbit.backends.registry import BackendError

    with pytest.raises(TypeError, match="unknown option 'thread' \\(did you mean 'threads'\\?\\) for a model run "
                                        "from an ONNX file; options are: device, optimization, providers"):
        load(exported, thread=2)
    with pytest.raises(TypeError, match="lowering options \\['opset'\\] apply only when lowering a Graph"):
        load(exported, opset=23)
    for bad in ("2", -1, 1.5):
        with pytest.raises(ValueError, match=f"threads must be an integer >= 0 .*got {bad!r}"):
            load(exported, threads=bad)
    with pytest.raises(BackendError, match="option threads: Input should be greater than or equal to 0"):
        lowbit.compile_model("no-such-model", backend="onnxruntime", backend_options={"threads": -1})
    assert load(exported, threads=1)(torch.randn(1, 3, 8)).shape == (1, 3, 4)
    # spinning='false' is truthy: idle workers spun on a shared CPU, the opposite of what was asked
    with pytest.raises(ValueError, match="spinning must be True, False or None .*got 'false'"):
        load(exported, spinning="false")
    assert load(exported, spinning=False)(torch.randn(1, 3, 8)).shape == (1, 3, 4)


@pytest.mark.parametrize("options, match", [({"threads": -1}, "threads must be an integer >= 0"),
                                            ({"spinning": "false"}, "spinning must be True, False or None"),
                                            ({"optimization": "max"}, "optimization must be one of disable")])
def test_session_option_values_a_file_refuses_are_lowbit_errors(exported, options, match):
    """README: every deliberate refusal is a ``LowbitError``; a session option value ONNX Runtime cannot take was a
    bare ValueError from ``session_options`` (still a ValueError)."""
    from lowbit.errors import LowbitError

    with pytest.raises(LowbitError, match=match) as exc:
        load(exported, **options)
    assert isinstance(exc.value, ValueError)


@pytest.fixture
def exported(tmp_path):
    g = parse_graph(FLOAT_IR, {"g": torch.ones(8), "w": torch.randn(4, 8)})
    return lowbit.export(g, tmp_path / "m.onnx")


def test_providers_take_one_name_as_a_string_and_ort_option_pairs(exported):
    """providers='CUDAExecutionProvider' was iterated letter by letter: providers 'C', 'U', 'D', ... "not
    available", and the session fell back to the CPU with nothing asked for by name."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load(exported, providers="CPUExecutionProvider").providers == ["CPUExecutionProvider"]
        assert load(exported, providers=[("CPUExecutionProvider", {})]).providers == ["CPUExecutionProvider"]
    with pytest.warns(ProviderFallbackWarning, match=r"provider\(s\) NoSuchExecutionProvider not available"):
        load(exported, providers="NoSuchExecutionProvider")
    with pytest.raises(TypeError, match=r"providers\[0\] is \{'CPUExecutionProvider': 1\}: give an execution provider"):
        load(exported, providers=[{"CPUExecutionProvider": 1}])


def test_the_device_picks_the_gpu_and_other_devices_are_refused(exported, monkeypatch):
    """device='cuda:1' asked ORT for its CUDA provider with no device_id (GPU 0 ran it), and device='mps' got a CPU
    session without a word."""
    import onnxruntime

    from lowbit.backends.onnxruntime_backend import choose_providers
    from lowbit.errors import DeviceError

    monkeypatch.setattr(onnxruntime, "get_available_providers",
                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert choose_providers(None, "cuda:1") == [("CUDAExecutionProvider", {"device_id": "1"}), "CPUExecutionProvider"]
    assert choose_providers(None, "cuda") == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.undo()
    for bad, match in (("mps", "onnxruntime runs on 'cpu' or 'cuda' \\(cuda:N\\), not on 'mps'"),
                       ("gpu", "'gpu' is not a device")):
        with pytest.raises(DeviceError, match=match):
            load(exported, device=bad)


def test_a_loaded_file_cannot_be_exported_again_and_says_so(exported, tmp_path):
    with pytest.raises(TypeError, match="this OrtCompiled runs a file \\(lowbit.export.load\\) and holds no lowbit "
                                        "graph"):
        lowbit.export(load(exported), tmp_path / "again.onnx")


def test_a_loaded_files_repr_names_the_file_providers_and_inputs(exported):
    """print(lowbit.export.load(path)) was "OrtCompiled()": not which file, nor on which providers."""
    runner = load(exported)
    assert repr(runner) == (f"OrtCompiled(file={str(exported)!r}, providers={runner.providers}, "
                            f"inputs={runner.input_names}, outputs={runner.output_names})")
    assert runner.input_names == ["x"] and "CPUExecutionProvider" in runner.providers


def test_generate_on_a_file_without_a_step_graph_says_what_file_generates(exported):
    """lowbit.export.load(file).generate(...) was "AttributeError: 'OrtCompiled' object has no attribute 'generate'"
    for a file exported from a logits compile; it now says the file has no generation metadata and what to export."""
    with pytest.raises(TypeError, match=r"no 'lowbit.generation' metadata. To generate from a file, export a model "
                                        r"compiled with compile_model\(..., generation=GenerationSpec\(...\)\)"):
        load(exported).generate([[1, 2, 3]], 4)


def test_a_file_that_is_neither_onnx_nor_an_engine_is_named_as_such(tmp_path):
    """export.load("notes.txt") said "the TensorRT backend needs the 'tensorrt' Python package" (any file that is
    not ONNX was read as an engine); without TensorRT installed it now says the file is neither format."""
    import importlib.util

    from lowbit.backends.tensorrt import EngineFileError

    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("with TensorRT installed the file is tried as a raw plan, and TensorRT's error names it")
    path = tmp_path / "notes.txt"
    path.write_text("not a model")
    with pytest.raises(EngineFileError, match=r"notes.txt is neither an ONNX model nor a lowbit TensorRT engine "
                                              r"\(it starts with b'not a mode'\)"):
        load(path)


REPORTED_LINEAR_IR = """graph main(%x: f32[1,s0,32]) {{
  symbol s0 in [2, 64] hint 4
  param @w.qdata: {container}[4,{stored}]
  param @w.scale: f32[{scale}]
  %w: f32[4,32] = dequantize(@w.qdata, @w.scale, None, qdtype="{qdtype}", axis={axis}, block_size={block}, out_dtype=f32)  # proj
  %y: f32[1,s0,4] = linear(%x, %w)  # proj
  return %y
}}
"""


def test_the_report_names_linears_that_weight_format_matmulnbits_left_in_another_form():
    """An int8 weight at accuracy level 0 has no MatMulNBits form: the backend kept QDQ and its report said only
    which provider ran."""
    w8 = parse_graph(REPORTED_LINEAR_IR.format(container="i8", stored=32, scale="4", qdtype="int8", axis=0,
                                               block="None"),
                     {"w.qdata": torch.randint(-127, 128, (4, 32), dtype=torch.int8),
                      "w.scale": torch.full((4,), 0.01)})
    text = OrtCompiled(w8, weight_format="matmulnbits").report_text()
    assert "weight_format=matmulnbits: 0 of 1 quantized linears run as MatMulNBits; 1 keep the QDQ or integer-GEMM " \
           "form (MatMulNBits takes weight-only 4-bit weights, 8-bit ones at accuracy_level=4): proj" in text
    assert "matmulnbits" not in OrtCompiled(w8, weight_format="matmulnbits", accuracy_level=4).report_text()
    w4 = parse_graph(REPORTED_LINEAR_IR.format(container="u8", stored=16, scale="4,2", qdtype="int4", axis=1, block=16),
                     {"w.qdata": pack_int4(torch.randint(-8, 8, (4, 32), dtype=torch.int8)),
                      "w.scale": torch.full((4, 2), 0.01)})
    assert "matmulnbits" not in OrtCompiled(w4, weight_format="matmulnbits").report_text()


def test_an_onnx_matmulnbits_export_warns_about_linears_it_left_in_qdq_form(tmp_path):
    """``format="onnx-matmulnbits"`` of an int8-weight graph wrote DequantizeLinear + MatMul without a word; it warns
    with the file and the linears now, and stays silent where every linear became MatMulNBits."""
    import warnings

    w8 = parse_graph(REPORTED_LINEAR_IR.format(container="i8", stored=32, scale="4", qdtype="int8", axis=0,
                                               block="None"),
                     {"w.qdata": torch.randint(-127, 128, (4, 32), dtype=torch.int8),
                      "w.scale": torch.full((4,), 0.01)})
    path = tmp_path / "w8.onnx"
    with pytest.warns(UserWarning, match=r"w8.onnx: weight_format=matmulnbits: 0 of 1 quantized linears run as "
                                         r"MatMulNBits; 1 keep the QDQ .*: proj") as caught:
        lowbit.export(w8, path, format="onnx-matmulnbits")
    assert [type(w.message).__name__ for w in caught] == ["ExportFormWarning"]
    assert "com.microsoft::MatMulNBits" not in lowered_op_types(load_onnx(path))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        lowbit.export(w8, path, format="onnx-matmulnbits", accuracy_level=4)  # 8-bit MatMulNBits at level 4
        lowbit.export(w8, path, format="onnx")  # QDQ asked for
    assert lowered_op_types(load_onnx(path)).get("DequantizeLinear") == 1


@pytest.mark.parametrize("external_data", [False, True])
def test_saving_a_session_model_onto_a_directory_is_refused(tmp_path, external_data):
    """OrtCompiled.save(dir) raised a bare IsADirectoryError from the rename, and with external data left an empty
    <dir>.data beside the directory."""
    model = OrtCompiled(parse_graph(FLOAT_IR, {"g": torch.ones(8), "w": torch.randn(4, 8)}))
    target = tmp_path / "out"
    with pytest.raises(OnnxFileError, match="out: it is a directory; give a file path such as .*out/model.onnx"):
        model.save(f"{target}/", external_data=external_data)  # not there yet: it wrote a file named 'out'
    assert not target.exists()
    target.mkdir()
    with pytest.raises(OnnxFileError, match="out: it is a directory; give a file path such as .*out/model.onnx"):
        model.save(target, external_data=external_data)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_the_onnxruntime_backend_takes_providers_as_an_option():
    """compile_model(backend='onnxruntime') could not be told which providers to use (backend_options had none: a GPU
    build always put the TensorRT EP first); the CLI gives them as one comma-separated value."""
    from lowbit.api import lower
    from lowbit.backends.registry import get_backend

    assert get_backend("onnxruntime").parse_options({"providers": "NoSuchExecutionProvider, CPUExecutionProvider"}
                                                    ).providers == ("NoSuchExecutionProvider", "CPUExecutionProvider")
    g = parse_graph(FLOAT_IR, {"g": torch.ones(8), "w": torch.randn(4, 8)})
    with pytest.warns(ProviderFallbackWarning, match=r"provider\(s\) NoSuchExecutionProvider not available"):
        model = lower(g, "onnxruntime", options={"providers": ["NoSuchExecutionProvider", "CPUExecutionProvider"]})
    assert model.providers == ["CPUExecutionProvider"]


def test_a_tokenizer_for_a_file_that_does_not_generate_is_refused(exported):
    with pytest.raises(TypeError, match="tokenizer= is for a step graph exported from "
                                        "compile_model\\(generation=...\\).*"
                                        "no 'lowbit.generation' metadata"):
        load(exported, tokenizer=object())


def test_options_for_an_engine_file_are_refused_not_dropped(tmp_path):
    """load('m.engine', threads=2) dropped the option (and a tokenizer) and went on to load the engine."""
    from lowbit.backends.tensorrt import EngineHeader, write_engine

    path = write_engine(tmp_path / "m.engine", b"plan", EngineHeader(0, "", "10.0", inputs=["x"], outputs=["y"]))
    with pytest.raises(TypeError, match="m.engine is read as a TensorRT engine .*which takes no options: got "
                                        "providers, "
                                        "threads"):
        load(path, threads=2, providers=["CPUExecutionProvider"])


def test_an_input_of_unknown_shape_still_has_its_dtype_checked(tmp_path):
    """A file that gives an input's dtype but not its shape had no checker entry: floats fed to its int64 input were
    truncated by the cast to the declared dtype."""
    import onnx
    from onnx import TensorProto, helper

    from lowbit.ir.signature import InputError

    graph = helper.make_graph([helper.make_node("Identity", ["ids"], ["out"])], "g",
                              [helper.make_tensor_value_info("ids", TensorProto.INT64, None)],
                              [helper.make_tensor_value_info("out", TensorProto.INT64, None)])
    path = tmp_path / "foreign.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), path)
    model = load(path)
    with pytest.raises(InputError, match="input 'ids' \\(declared torch.int64, shape not given by the file\\): "
                                         "expected dtype torch.int64, got torch.float32"):
        model(torch.tensor([[1.7, 2.2]]))
    assert model(torch.tensor([[1, 2]], dtype=torch.int32)).tolist() == [[1, 2]]  # integers widen as before


def test_truncated_onnx_is_reported(exported):
    data = exported.read_bytes()
    exported.write_bytes(data[: len(data) // 2])
    with pytest.raises(OnnxFileError, match="truncated or corrupted"):
        load(exported)
    with pytest.raises(OnnxFileError, match="truncated or corrupted"):
        OrtCompiled.load(exported)


def test_session_from_a_file_reads_its_protobuf_once(exported, monkeypatch):
    """``OrtCompiled.load`` reads the file once for its checks and metadata (a large ONNX file took two reads)."""
    import lowbit.backends.onnxruntime_backend as backend

    reads = []
    monkeypatch.setattr(backend, "load_onnx", lambda *a, **k: reads.append(a) or load_onnx(*a, **k))
    compiled = OrtCompiled.load(exported)
    assert len(reads) == 1 and compiled.session is not None


def test_garbage_and_missing_files_are_reported(exported, tmp_path):
    exported.write_bytes(b"\x00\xff" * 50 + b"not an onnx model")
    with pytest.raises(OnnxFileError, match="truncated or corrupted"):
        load_onnx(exported)
    with pytest.raises(OnnxFileError, match="no ONNX file at"):
        load(tmp_path / "missing.onnx")
    (tmp_path / "empty.onnx").write_bytes(b"")
    with pytest.raises(OnnxFileError, match="empty"):
        load(tmp_path / "empty.onnx")
    (tmp_path / "out").mkdir()
    exported.rename(tmp_path / "out" / "model.onnx")
    with pytest.raises(OnnxFileError, match=r"out is a directory: .*lowbit.load .*out/model.onnx is the ONNX file"):
        load(tmp_path / "out")  # was 'no TensorRT engine file at .../out'


def test_missing_or_truncated_external_data_is_reported(tmp_path):
    text = FLOAT_IR.replace("f32[4,8]", "f32[64,8]").replace("f32[1,s0,4]", "f32[1,s0,64]")
    g = parse_graph(text, {"g": torch.ones(8), "w": torch.randn(64, 8)})  # 2 KB: above the inline threshold
    path = lowbit.export(g, tmp_path / "ext.onnx", external_data=True)
    side = tmp_path / "ext.onnx.data"
    data = side.read_bytes()
    side.write_bytes(data[:-16])
    with pytest.raises(OnnxFileError, match="external data .* is truncated"):
        load(path)
    side.unlink()
    with pytest.raises(OnnxFileError, match="which is missing: copy the .data file"):
        load(path)


KV_IR = """graph main(%k: f32[1,2,s0,8]) {
  symbol s0 in [2, 64] hint 10
  %s: f32[1,2,ceiling(s0/4),8], %zp: QZP[1,2,ceiling(s0/4),8] = dynamic_qparams(%k, qdtype=QDT, granularity="per_block", symmetric=SYM, axis=2, block_size=4)
  %q: QSTORE = quantize(%k, %s, ZPARG, qdtype=QDT, axis=2, block_size=4)
  %kq: f32[1,2,s0,8] = dequantize(%q, %s, ZPARG, qdtype=QDT, axis=2, block_size=4, out_dtype=f32)
  return %kq
}
"""


@pytest.mark.parametrize("qdtype, symmetric", [("uint4", False), ("int8", True), ("int8", False)])
def test_kv_style_blocks_along_a_dynamic_axis(qdtype, symmetric):
    """KIVI keys: one scale per 4 tokens along the (dynamic) sequence, ragged last block, in-graph qparams."""
    container = {"uint4": "u8", "int8": "i8"}[qdtype]
    store = "u8[1,2,s0,4]" if qdtype == "uint4" else "i8[1,2,s0,8]"
    text = (KV_IR.replace("QZP", container).replace("QDT", f'"{qdtype}"').replace("SYM", str(symmetric))
            .replace("QSTORE", store).replace("ZPARG", "None" if symmetric else "%zp"))
    g = parse_graph(text)
    k = torch.randn(1, 2, 10, 8) * torch.linspace(0.5, 3, 8)  # 10 tokens: blocks of 4, 4 and 2
    ref = TorchCompiled(g)(k)
    for form in ({"opset": 21}, {}):
        torch.testing.assert_close(OrtCompiled(g, **form)(k), ref, rtol=1e-5, atol=1e-5, msg=lambda m: f"{form}: {m}")


HALF_NORM_IR = """graph main(%x: f16[2,s0,16]) {
  symbol s0 in [2, 64] hint 3
  param @g: f16[16]
  %n: f16[2,s0,16] = rms_norm(%x, @g, eps=1e-05, compute_dtype=f32)  # norm
  return %n
}
"""


@pytest.mark.parametrize("opset", [21, 23])
def test_rms_norm_keeps_the_reference_compute_dtype(opset):
    """Statistics in float32, cast back, gain applied in float16 — as HF Llama and the reference do."""
    g = parse_graph(HALF_NORM_IR, {"g": (torch.rand(16) + 0.5).half()})
    model = to_onnx(g, opset=opset)
    ops = lowered_op_types(model)
    assert "RMSNormalization" not in ops and ops["Cast"] == 2  # the casts, not the fused op, keep the order
    x = (torch.randn(2, 7, 16) * 30).half()
    out, ref = OrtCompiled(g, opset=opset)(x), TorchCompiled(g)(x)
    assert out.dtype == torch.float16
    # x/√v (ONNX) vs x·rsqrt(v) (torch) differ in the last float32 bit, which moves a few halves by one ulp
    torch.testing.assert_close(out, ref, rtol=2**-10, atol=1e-4)


ROTARY_IR = """graph main(%x: f32[1,2,s0,8], %pos: f32[1,s0,1]) {
  symbol s0 in [2, 64] hint 4
  param @inv: f32[4]
  param @other: f32[4]
  %f: f32[1,s0,4] = aten.mul.Tensor(%pos, @inv)
  %g: f32[1,s0,4] = aten.mul.Tensor(%pos, @other)
  %cat: f32[1,s0,8] = aten.cat.default([%f, %F2], -1)
  %cos: f32[1,s0,8] = aten.cos.default(%cat)
  %cos2: f32[1,s0,8] = aten.mul.Tensor(%cos, 1.0)
  %sin: f32[1,s0,8] = aten.sin.default(%cat)
  %c: f32[1,1,s0,8] = aten.unsqueeze.default(%cos2, 1)
  %s: f32[1,1,s0,8] = aten.unsqueeze.default(%sin, 1)
  %y: f32[1,2,s0,8] = rotary(%x, %c, %s)
  return %y
}
"""


@pytest.mark.parametrize("second_half, fused", [("f", True), ("g", False)])
def test_rotary_lowers_to_rotary_embedding_only_when_the_tables_repeat_their_half(second_half, fused):
    """rotary="onnx": HF's ``cat(freqs, freqs)`` tables make one opset-23 RotaryEmbedding (tables halved once);
    tables whose halves differ keep the rotate-half decomposition. Both equal the reference."""
    params = {"inv": torch.rand(4), "other": torch.rand(4)}
    g = parse_graph(ROTARY_IR.replace("%F2", "%" + second_half), params)
    model = to_onnx(g, opset=23, rotary="onnx")
    ops = lowered_op_types(model)
    assert (ops.get("RotaryEmbedding") == 1) is fused and ("Neg" in ops) is not fused
    assert "RotaryEmbedding" not in lowered_op_types(to_onnx(g, opset=23))  # "decompose" is the default
    x, pos = torch.randn(1, 2, 5, 8), torch.arange(5.0).view(1, 5, 1)
    out = OrtCompiled(g, opset=23, rotary="onnx")(x, pos)
    torch.testing.assert_close(out, TorchCompiled(g)(x, pos), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="rotary='onnx' needs opset 23"):
        to_onnx(g, opset=21, rotary="onnx")


@pytest.mark.parametrize("rotary", ["decompose", "onnx"])
def test_rotary_of_float16_queries_by_float32_tables_computes_in_float32(rotary):
    """OLMo 2's rotary hands float32 tables to a float16 model, so its ``rotary`` reads f16 queries and f32 tables
    (the reference's mul promotes to f32). The lowering fed both to one Mul / RotaryEmbedding, which ONNX Runtime
    refused at session creation ("Type parameter (T) ... bound to different types"); the operands are cast to the
    output's dtype first, and ONNX Runtime gives the reference's output."""
    g = parse_graph(ROTARY_IR.replace("%x: f32[1,2,s0,8]", "%x: f16[1,2,s0,8]").replace("%F2", "%f"),
                    {"inv": torch.rand(4), "other": torch.rand(4)})
    assert g.outputs[0].tensor_type.dtype == torch.float32
    x, pos = torch.randn(1, 2, 5, 8, dtype=torch.float16), torch.arange(5.0).view(1, 5, 1)
    out = OrtCompiled(g, opset=23, rotary=rotary)(x, pos)
    torch.testing.assert_close(out, TorchCompiled(g)(x, pos), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("recipe", [None, "w4a16-g64"])
def test_bfloat16_model_runs_on_the_cpu_provider_in_float32(smollm2, recipe, tmp_path):
    """ORT's CPU provider has no bfloat16 kernels (session creation failed with NOT_IMPLEMENTED on ``Mul``); the
    backend widens the bfloat16 ONNX model to float32, says so in the compile report and returns bfloat16. A real
    1-layer SmolLM2 in bfloat16 (every op kind of the model; its 49152-token head and embedding): its ORT logits
    equal those of the ORT compile of its float32 copy (the same weights) bit for bit and the bfloat16 torch run's
    to bfloat16 rounding; the exported bfloat16 file, loaded for the CPU, runs the same way (to one bfloat16 step:
    the file is the portable opset-21 form)."""
    from conftest import smollm2_slice

    from lowbit.backends.onnx.widen import has_bfloat16

    wrapper = smollm2_slice(smollm2[0], 1, torch.bfloat16)
    ids = smollm2[1]("The tower is 324 metres tall, about the same height as", return_tensors="pt").input_ids
    cm = lowbit.compile_model(wrapper, recipe=recipe, backend="onnxruntime", device="cpu", example_inputs=(ids,))
    assert cm.runner.providers == ["CPUExecutionProvider"] and not has_bfloat16(cm.runner.onnx_model)
    assert any("bfloat16 runs as float32" in line for line in cm.report.lowering), cm.report.lowering
    got = cm(ids)
    assert got.dtype == torch.bfloat16
    wide = lowbit.compile_model(smollm2_slice(smollm2[0], 1, torch.bfloat16).float(), recipe=recipe,
                                backend="onnxruntime", device="cpu", example_inputs=(ids,))
    assert not any("bfloat16" in line for line in wide.report.lowering)
    torch.testing.assert_close(got, wide(ids).to(torch.bfloat16), rtol=0, atol=0)
    # the bfloat16 torch run of the same compiled graph (a torch-backend compile captured the model a third time)
    with torch.inference_mode():
        ref = TorchCompiled(cm.graph)(ids)
    assert ref.dtype == torch.bfloat16
    assert (got.float() - ref.float()).abs().max() < 0.05 * ref.float().abs().max()
    path = lowbit.export(cm, tmp_path / "m.onnx", format="onnx")
    assert has_bfloat16(load_onnx(path))  # the file keeps the graph's dtypes
    loaded = load(path, device="cpu")
    assert any("bfloat16 runs as float32" in line for line in loaded.report_text().splitlines())
    # the file is the portable opset-21 form (attention and rotary decomposed): float32 rounding apart, so one
    # bfloat16 step at most
    torch.testing.assert_close(loaded(ids).float(), got.float(), rtol=2**-7, atol=2**-7)


def test_widen_bfloat16_rewrites_initializers_constants_and_casts():
    """Every way a bfloat16 tensor enters a graph — an input, an initializer, a ``Constant``, a
    ``ConstantOfShape`` fill, a ``Cast`` target — becomes float32, and ORT's CPU provider runs the result (it
    refuses the original: no bfloat16 ``Mul``)."""
    import ml_dtypes
    import numpy as np
    import onnx
    import onnx_ir as ir
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from lowbit.backends.onnx.widen import has_bfloat16, widen_bfloat16

    w = np.array([1.5, -2.25, 0.0078125], dtype=ml_dtypes.bfloat16)
    c = np.array([0.5, 3.0, -1.0], dtype=ml_dtypes.bfloat16)
    bf16 = lambda name, a: helper.make_tensor(name, TensorProto.BFLOAT16, a.shape,  # noqa: E731
                                              a.astype(np.float32).tolist())  # exact: the values are bfloat16
    nodes = [helper.make_node("Cast", ["x"], ["xb"], to=TensorProto.BFLOAT16),
             helper.make_node("Mul", ["xb", "w"], ["m"]),
             helper.make_node("Constant", [], ["c"], value=bf16("cv", c)),
             helper.make_node("Add", ["m", "c"], ["a"]),
             helper.make_node("ConstantOfShape", ["shape"], ["f"], value=bf16("fv", np.array([0.25], dtype=c.dtype))),
             helper.make_node("Add", ["a", "f"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.BFLOAT16, [2, 3])],
                              [bf16("w", w), numpy_helper.from_array(np.array([2, 3], dtype=np.int64), "shape")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    with pytest.raises(Exception, match="NOT_IMPLEMENTED"):
        ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    model = ir.serde.deserialize_model(proto)
    assert has_bfloat16(model)
    assert widen_bfloat16(model) >= 5 and not has_bfloat16(model)
    wide = ir.serde.serialize_model(model)
    onnx.checker.check_model(wide)
    x = np.array([[1.0, 2.0, 3.0], [-0.5, 0.25, 100.0]], dtype=np.float32)
    (y,) = ort.InferenceSession(wide.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    assert y.dtype == np.float32
    np.testing.assert_array_equal(y, x * w.astype(np.float32) + c.astype(np.float32) + np.float32(0.25))


def test_export_load_works_in_a_fresh_process():
    """``lowbit.export.load`` (README) raised AttributeError until ``lowbit.export(...)`` had run once in the
    process: the package's ``export`` was a function that the submodule replaced only when first imported."""
    import subprocess
    import sys

    code = "import lowbit; assert callable(lowbit.export); print(lowbit.export.load.__module__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0 and out.stdout.strip() == "lowbit.export", out.stderr[-2000:]


def test_an_exported_file_checks_its_inputs_as_the_compiled_model_does(tmp_path):
    """A session run from a file had no input checks: float ids were truncated to int64, id -1 read the last row
    of the embedding (ONNX Gather wraps negative indices) and lengths past the captured range ran; the file's
    declared inputs and recorded symbol ranges now refuse what the compiled model refuses, with the same message."""
    import re

    import numpy as np
    from conftest import tiny_llama

    from lowbit.ir.signature import InputError

    compiled = lowbit.compile_model(tiny_llama(max_positions=24), pipeline="dce")
    path = lowbit.export(compiled, tmp_path / "m.onnx")
    ort_file = load(path)
    ids = torch.randint(0, 61, (3, 7))
    torch.testing.assert_close(ort_file(ids), compiled(ids), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ort_file(ids.to(torch.int32)), ort_file(ids.numpy()), rtol=0, atol=0)
    for bad, needle in [(ids.float(), "expected dtype torch.int64, got torch.float32"),
                        (ids.clone().fill_(-1), "id -1 at position (0, 0) is outside the vocabulary"),
                        (torch.zeros(1, 25, dtype=torch.long), "dim 1 (s1) is 25, outside the range [1, 24]"),
                        (ids[0], "expected 2 dims, got 1")]:
        with pytest.raises(InputError, match=f"input %input_ids.*{re.escape(needle)}"):
            compiled(bad)
        # the file names its dims for what they are (s1 is exported as 'sequence'), the message is otherwise the same
        with pytest.raises(InputError, match=f"input %input_ids.*{re.escape(needle.replace('(s1)', '(sequence)'))}"):
            ort_file(bad)
    # a file from another producer: its dtypes and ranks are checked, its dim names promise nothing
    model = load_onnx(path)
    model.metadata_props.clear()
    foreign = OrtCompiled(model=model)
    assert foreign(torch.zeros(1, 25, dtype=torch.long)).shape == (1, 25, 61)
    with pytest.raises(InputError, match="expected dtype torch.int64, got torch.float32"):
        foreign(ids.float())
    assert np.isfinite(foreign(ids).numpy()).all()


NARROW_ACT_IR = """graph main(%x: f32[1,s0,32]) {
  symbol s0 in [2, 64] hint 4
  param @s: f32[]
  param @z: i8[]
  %s1: f32[1,s0,1], %z1: i8[1,s0,1] = dynamic_qparams(%x, qdtype="QD", granularity="per_token", symmetric=False, axis=-1, block_size=32)
  %q1: u8[1,s0,PACKED] = quantize(%x, %s1, %z1, qdtype="QD", axis=-1, block_size=32)
  %y1: f32[1,s0,32] = dequantize(%q1, %s1, %z1, qdtype="QD", axis=-1, block_size=32, out_dtype=f32)
  %s2: f32[], %z2: i8[] = dynamic_qparams(%x, qdtype="QD", granularity="per_tensor", symmetric=False, axis=None, block_size=None)
  %q2: u8[1,s0,PACKED] = quantize(%x, %s2, %z2, qdtype="QD", axis=None, block_size=None)
  %y2: f32[1,s0,32] = dequantize(%q2, %s2, %z2, qdtype="QD", axis=None, block_size=None, out_dtype=f32)
  %q3: u8[1,s0,PACKED] = quantize(%x, @s, @z, qdtype="QD", axis=None, block_size=None)
  %y3: f32[1,s0,32] = dequantize(%q3, @s, @z, qdtype="QD", axis=None, block_size=None, out_dtype=f32)
  return %y1, %y2, %y3
}
"""


@pytest.mark.parametrize("qdtype, packed, zp", [("int2", 8, -2), ("int3", 16, 3)])
def test_asymmetric_int3_int2_activations_keep_their_zero_point(qdtype, packed, zp):
    """int3/int2 have no ONNX type: x is clamped to the codes' range before an INT4 QuantizeLinear. The clamp
    ignored the zero point (s·qmin..s·qmax), so asymmetric activations were cut: 30-70% error on a tiny Llama's
    logits, written without a word."""
    text = NARROW_ACT_IR.replace("QD", qdtype).replace("PACKED", str(packed))
    g = parse_graph(text, {"s": torch.tensor(0.4), "z": torch.tensor(zp, dtype=torch.int8)})
    x = torch.randn(1, 7, 32) + 0.7  # off-centre, as post-norm activations often are: the zero point is far from 0
    ref = TorchCompiled(g)(x)
    out = OrtCompiled(g)(x)
    for r, o in zip(ref, out):
        torch.testing.assert_close(o, r, rtol=1e-6, atol=1e-6)


CLIPPED_ACT_IR = """graph main(%x: f32[1,s0,32]) {
  symbol s0 in [2, 64] hint 4
  %s: f32[1,s0,1], %z: QC[1,s0,1] = dynamic_qparams(%x, qdtype="QD", granularity="per_token", symmetric=SYM, axis=-1, block_size=32, clip_ratio=0.8)
  %q: QS = quantize(%x, %s, ZP, qdtype="QD", axis=-1, block_size=32)
  %y: f32[1,s0,32] = dequantize(%q, %s, ZP, qdtype="QD", axis=-1, block_size=32, out_dtype=f32)
  %s2: f32[], %z2: QC[] = dynamic_qparams(%x, qdtype="QD", granularity="per_tensor", symmetric=SYM, axis=None, block_size=None, clip_ratio=0.9)
  %q2: QS = quantize(%x, %s2, ZP2, qdtype="QD", axis=None, block_size=None)
  %y2: f32[1,s0,32] = dequantize(%q2, %s2, ZP2, qdtype="QD", axis=None, block_size=None, out_dtype=f32)
  return %y, %y2
}
"""


@pytest.mark.parametrize("qdtype, container, stored, symmetric", [
    ("int8", "i8", "i8[1,s0,32]", True), ("int4", "i8", "u8[1,s0,16]", True), ("int4", "i8", "u8[1,s0,16]", False),
    ("int3", "i8", "u8[1,s0,16]", False), ("fp8e4m3", "f8e4m3", "f8e4m3[1,s0,32]", True)])
def test_clipped_activation_ranges_lower_to_onnx(qdtype, container, stored, symmetric):
    """dynamic_qparams(clip_ratio<1) (quantize(a_clip=, kv_clip=), the w4a4kv4-best recipe) had no ONNX lowering:
    export and the onnxruntime backend refused it. The range is scaled before the scale is taken and what lies
    beyond saturates, as the reference's quantize clamps it: the same numbers."""
    zp, zp2 = ("None", "None") if symmetric else ("%z", "%z2")
    text = (CLIPPED_ACT_IR.replace("QD", qdtype).replace("QC", container).replace("QS", stored)
            .replace("SYM", str(symmetric)).replace("ZP2", zp2).replace("ZP", zp))
    g = parse_graph(text, {})
    x = torch.randn(1, 9, 32) + 0.3
    x[0, 3, 5] = 9.0  # an outlier the clip cuts
    for r, o in zip(TorchCompiled(g)(x), OrtCompiled(g)(x)):
        torch.testing.assert_close(o, r, rtol=1e-6, atol=1e-6)


def test_text_prompts_to_an_exported_step_graph_say_where_the_tokenizer_goes(tmp_path):
    """A step graph loaded from its file without tokenizer= answered a text prompt with 'this model has no tokenizer:
    pass token ids', not saying that load takes one."""
    from conftest import tiny_llama

    from lowbit.models import GenerationError

    gen = lowbit.compile_model(tiny_llama(), pipeline="dce", generation=lowbit.GenerationSpec(max_length=16,
                                                                                             max_batch=1))
    loaded = load(lowbit.export(gen, tmp_path / "step.onnx"))
    for prompt in ("hello", ["hello"]):
        with pytest.raises(GenerationError, match=r"lowbit.export.load\(path, tokenizer=...\) or pass token ids"):
            loaded.generate(prompt, 2)
    assert loaded.generate([[1, 2]], 3).tokens == gen.generate([[1, 2]], 3).tokens


def test_an_exported_step_graph_loads_with_a_tokenizer_named_as_compile_model_takes_it(tmp_path):
    """``load(path, tokenizer="smollm2")`` kept the string and generate() failed with "'str' object is not
    callable"; a name or directory is loaded as compile_model's tokenizer= is, and a wrong one is named."""
    from conftest import tiny_llama

    from lowbit.data.model_files import load_tokenizer

    torch.manual_seed(0)
    gen = lowbit.compile_model(tiny_llama(vocab=49152), pipeline="dce",
                               generation=lowbit.GenerationSpec(max_length=16, max_batch=1))
    path = lowbit.export(gen, tmp_path / "step.onnx")
    ids = load_tokenizer("smollm2")("The capital of France is").input_ids
    out = load(path, tokenizer="smollm2").generate("The capital of France is", 3)
    assert out.tokens == load(path).generate([ids], 3).tokens and isinstance(out.texts[0], str)
    with pytest.raises(ValueError, match="tokenizer='/no/such/dir': .*give 'smollm2', 'minilm' or a local tokenizer"):
        load(path, tokenizer="/no/such/dir")
    with pytest.raises(TypeError, match="tokenizer= takes a Hugging Face tokenizer, .* got int"):
        load(path, tokenizer=3)


def test_a_gather_along_another_axis_is_not_taken_for_an_embedding():
    """The file's id check reads Gather tables on an input as embeddings (rows on axis 0); a Gather along axis 1
    of a [2, 10] table takes ids up to 9."""
    import numpy as np
    import onnx
    import onnx_ir as ir
    from onnx import TensorProto, helper

    table = helper.make_tensor("table", TensorProto.FLOAT, [2, 10], np.arange(20, dtype=np.float32).tolist())
    graph = helper.make_graph([helper.make_node("Gather", ["table", "idx"], ["y"], axis=1)], "g",
                              [helper.make_tensor_value_info("idx", TensorProto.INT64, [3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])], [table])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    proto.ir_version = 10
    helper.set_model_props(proto, {"lowbit.symbols": "{}"})
    onnx.checker.check_model(proto)
    model = OrtCompiled(model=ir.serde.deserialize_model(proto))
    assert model(torch.tensor([0, 9, 4])).tolist() == [[0.0, 9.0, 4.0], [10.0, 19.0, 14.0]]


@pytest.mark.parametrize("pipeline", ["quantize(kv=int2,kv_group=8)", "quantize(kv=int3,kv_group=8,kv_sym=true)",
                                      "quantize(w=int8,a=int2,a_group=8,a_sym=false)"])
def test_int3_int2_blocks_shorter_than_their_axis_lower_to_onnx(pipeline):
    """int2/int3 with block-wise scales shorter than the axis (KIVI's keys per channel over token blocks: the kv2
    recipe) were refused ('int2 activations with block-wise scales smaller than the axis'); the codes' clamp now
    reaches each block through DequantizeLinear's block broadcast. Ragged last blocks included (20 tokens)."""
    from conftest import tiny_llama

    compiled = lowbit.compile_model(tiny_llama(max_positions=32), pipeline=pipeline)
    ids = torch.randint(0, 61, (2, 20))
    torch.testing.assert_close(OrtCompiled(compiled.graph)(ids), compiled(ids), rtol=1e-4, atol=1e-5)


def test_exported_models_name_their_outputs_for_what_they_are(minilm_graph):
    """MiniLM's sentence embedding was exported as output 'div_1' and a causal LM's logits as 'linear_<n>' (the last
    node's name): a runtime had to guess. The captured graph and its ONNX model name them 'sentence_embedding' and
    'logits' (the generation step's name), beside the inputs 'input_ids' / 'attention_mask'."""
    from lowbit.ir.capture import capture
    from lowbit.models import CausalLMLogits
    from conftest import tiny_llama

    model = to_onnx(minilm_graph)
    assert [v.name for v in model.graph.inputs] == ["input_ids", "attention_mask"]
    assert [v.name for v in model.graph.outputs] == ["sentence_embedding"]
    lm = capture(CausalLMLogits(tiny_llama()).eval(), (torch.ones(1, 4, dtype=torch.long),))
    assert [v.name for v in to_onnx(lm).graph.outputs] == ["logits"]
    assert "return %logits" in str(lm)


def test_an_hf_models_outputs_are_named_by_its_output_fields(tmp_path):
    """A BertModel or ViTModel compiled from Python exported its outputs as the last nodes' names ('layer_norm_2',
    'tanh'); they are its ModelOutput's fields, as transformers and a runtime name them."""
    import onnx
    import transformers as tf

    torch.manual_seed(0)
    vit = tf.ViTModel(tf.ViTConfig(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=1,
                                   image_size=16, patch_size=8)).eval()
    x = torch.randn(2, 3, 16, 16)
    compiled = lowbit.compile_model(vit, (x,), pipeline="quantize(w=int8)")
    path = lowbit.export(compiled, tmp_path / "vit.onnx")
    assert [o.name for o in onnx.load(path).graph.output] == ["last_hidden_state", "pooler_output"]
    outputs = lowbit.export.load(path)(x)
    torch.testing.assert_close(torch.as_tensor(outputs[1]), vit(x).pooler_output, rtol=0.05, atol=0.02)
    head = tf.BertForSequenceClassification(tf.BertConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                                          num_attention_heads=2, num_hidden_layers=1)).eval()
    assert "return %logits" in str(lowbit.compile_model(head, (torch.ones(2, 5, dtype=torch.long),)).graph)


def test_a_failed_export_removes_the_directories_it_created(tmp_path, monkeypatch):
    """``check_writable`` creates the export's parent directories before the lowering; a lowering that failed left
    them behind, empty. They are removed now (only those it made, and only while empty)."""
    import lowbit.backends.onnx as onnx_backend

    g = parse_graph(FLOAT_IR, {"g": torch.ones(8), "w": torch.randn(4, 8)})
    (tmp_path / "kept").mkdir()

    def fail(*a, **k):
        raise RuntimeError("lowering failed")

    monkeypatch.setattr(onnx_backend, "to_onnx", fail)
    with pytest.raises(RuntimeError, match="lowering failed"):
        lowbit.export(g, tmp_path / "kept" / "new" / "dir" / "m.onnx")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["kept"]
    monkeypatch.undo()
    assert lowbit.export(g, tmp_path / "kept" / "new" / "m.onnx").is_file()


def test_integer_matmul_names_the_linears_it_left_in_qdq_form(tmp_path):
    """``integer_matmul=True`` (the onnxruntime backend's default) takes int8 weights with int8 activations per tensor
    or per token; int4 weights with int8 activations (W4A8) were written as DequantizeLinear + MatMul without a word
    in the export or the compile report. Now the export warns and the report says which linears, as for
    MatMulNBits; a W8A8 linear that became MatMulIntegerToFloat says nothing."""
    import warnings

    from lowbit.export import ExportFormWarning
    from lowbit.ir.capture import capture
    from lowbit.passes.manager import PassManager, parse_pipeline

    torch.manual_seed(0)
    graph = capture(torch.nn.Sequential(torch.nn.Linear(64, 32)).eval(), (torch.randn(2, 5, 64),))

    def quantized(pipeline: str):
        g = graph.clone()
        PassManager(parse_pipeline(pipeline)).run(g)
        return g

    w4a8 = quantized("quantize(w=int4,group=32,a=int8)")
    with pytest.warns(ExportFormWarning, match=r"w4a8.onnx: integer_matmul: 0 of 1 linears with quantized activations "
                                               r"run as MatMulIntegerToFloat; 1 keep the QDQ form .*: 0$"):
        lowbit.export(w4a8, tmp_path / "w4a8.onnx", integer_matmul=True)
    assert "com.microsoft::MatMulIntegerToFloat" not in lowered_op_types(load_onnx(tmp_path / "w4a8.onnx"))
    assert "integer_matmul: 0 of 1 linears" in OrtCompiled(w4a8).report_text()
    w8a8 = quantized("quantize(w=int8,a=int8)")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        lowbit.export(w8a8, tmp_path / "w8a8.onnx", integer_matmul=True)
        lowbit.export(w4a8, tmp_path / "w4a8.onnx")  # the portable QDQ form asked for: nothing to say
    assert lowered_op_types(load_onnx(tmp_path / "w8a8.onnx"))["com.microsoft::MatMulIntegerToFloat"] == 1
    assert "integer_matmul" not in OrtCompiled(w8a8).report_text()


def test_w4a4kv4_best_recipe_runs_on_onnxruntime_as_its_doc_says(tmp_path):
    """``w4a4kv4-best``'s description said "ONNX refuses it" long after ONNX learned to lower clipped activation
    ranges (``clip_ratio``): the recipe compiles to ONNX Runtime and matches the torch reference of the same graph;
    what does refuse it is the HF checkpoint writer, and the description says so."""
    from conftest import tiny_llama

    from lowbit.checkpoint import CheckpointError
    from lowbit.recipes import RECIPES

    torch.manual_seed(0)
    model = tiny_llama(hidden=64, inter=128, heads=4, kv_heads=2, vocab=97, max_positions=64)
    c = lowbit.compile_model(model, recipe="w4a4kv4-best", backend="onnxruntime", calib=torch.randint(0, 97, (200,)),
                             overrides={"calib_n": 2, "calib_len": 16, "progress": False,
                                        "rotate.steps": 10, "tokens": 16})
    clipped = [n for n in c.graph.find("dynamic_qparams") if n.kwargs.get("clip_ratio", 1.0) < 1]
    assert clipped, "the recipe's A4 chains are clipped (a_clip=0.9, then clip-activations)"
    ids = torch.randint(0, 97, (1, 12))
    torch.testing.assert_close(c(ids), TorchCompiled(c.graph)(ids), atol=1e-4, rtol=1e-4)
    doc = RECIPES["w4a4kv4-best"].doc
    assert "ONNX refuses" not in doc and "ONNX scales the clipped range" in doc and "format=lowbit" in doc
    with pytest.raises(CheckpointError, match="clipped"):
        lowbit.save(c, tmp_path / "ct", format="compressed-tensors")


@pytest.mark.parametrize("pipeline", ["quantize(w=int8,a=uint8,a_sym=false)",
                                      "quantize(w=int8,a=uint8,a_sym=false,a_group=32)"])
def test_asymmetric_per_token_activations_run_in_onnx_runtime(tmp_path, pipeline):
    """uint8 activations with a zero point per token (or per 32-channel group): ONNX Runtime's QDQ fusion made each
    DequantizeLinear -> MatMul a MatMulIntegerToFloat, whose kernel takes one zero point, and every call of the
    exported file failed with ONNX Runtime's "input a zero point must be a scalar" (q/k/v sharing their input). The
    export now computes ``(q - zp) · s`` itself: the reference's outputs, at other batch and sequence sizes too (but
    for a dynamic code at a rounding tie, which float reordering can flip: test_onnx_quantized's note)."""
    from conftest import tiny_llama

    torch.manual_seed(0)
    compiled = lowbit.compile_model(tiny_llama(hidden=64, inter=128, heads=4, kv_heads=2, vocab=128),
                                    pipeline=pipeline)
    loaded = load(lowbit.export(compiled, tmp_path / "m.onnx"))
    for shape in ((2, 9), (1, 20)):
        ids = torch.randint(0, 128, shape)
        ref = compiled(ids)
        diff = (loaded(ids) - ref).abs()
        assert diff.median().item() < 1e-6 and diff.max().item() <= 1e-2 * ref.abs().max().item()


@pytest.fixture(autouse=True)
def _one_export_per_model(reuse_captures: object) -> None:
    """Every test here captures through the session's capture cache (conftest's ``reuse_captures``): the same tiny
    model compiled or reloaded again is not exported again."""
