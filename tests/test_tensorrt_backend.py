"""The TensorRT backend: engine files (integrity checks run anywhere), optimization profiles from the IR's
symbols, and — where ``tensorrt`` imports and a GPU exists — build, save, load and run parity.

``tensorrt`` cannot be installed on lowbit's CI machines (no GPU, not in their package registries), so the
build/run tests are skipped there; everything TensorRT-independent is tested unconditionally.
"""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest
import torch

from lowbit.backends.onnx import to_onnx
from lowbit.backends.tensorrt import (
    EngineFileError,
    EngineHeader,
    TensorRTBuildError,
    TensorRTCompiled,
    TensorRTUnavailable,
    profile_from_symbols,
    read_engine,
    write_engine,
)
from lowbit.errors import LowbitError

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None
needs_tensorrt = pytest.mark.skipif(
    not (HAS_TENSORRT and torch.cuda.is_available()),
    reason="needs the 'tensorrt' package and an NVIDIA GPU: tensorrt is not installable from this machine's "
           "package registries and there is no GPU here; the engine-file and Q/DQ-rule tests still run")
SEQ = torch.export.Dim.DYNAMIC(min=2, max=8192)


def _header() -> EngineHeader:
    return EngineHeader(plan_bytes=0, plan_sha256="", tensorrt_version="10.9.0", inputs=["input_ids"],
                        outputs=["logits"], profile={"input_ids": [[1, 2], [1, 128], [1, 4096]]})


def test_engine_file_round_trip(tmp_path):
    plan = bytes(range(256)) * 64
    path = write_engine(tmp_path / "m.engine", plan, _header())
    got, header = read_engine(path)
    assert got == plan
    assert header is not None and header.plan_bytes == len(plan) and header.inputs == ["input_ids"]
    assert header.profile["input_ids"][2] == [1, 4096]


def test_truncated_engine_is_reported(tmp_path):
    path = write_engine(tmp_path / "m.engine", b"x" * 10_000, _header())
    data = path.read_bytes()
    path.write_bytes(data[:-1000])
    with pytest.raises(EngineFileError, match="truncated: the plan should be 10000 bytes, the file holds 9000"):
        read_engine(path)
    path.write_bytes(data[:30])
    with pytest.raises(EngineFileError, match="truncated"):
        read_engine(path)


def test_corrupted_engine_is_reported(tmp_path):
    path = write_engine(tmp_path / "m.engine", b"x" * 10_000, _header())
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(EngineFileError, match="corrupted: the plan's SHA-256 does not match"):
        read_engine(path)
    # the corruption is found before TensorRT is needed
    with pytest.raises(EngineFileError, match="corrupted"):
        TensorRTCompiled.load(path)


def test_missing_and_empty_engine_files(tmp_path):
    with pytest.raises(EngineFileError, match="no TensorRT engine file at"):
        read_engine(tmp_path / "nope.engine")
    (tmp_path / "empty.engine").write_bytes(b"")
    with pytest.raises(EngineFileError, match="empty"):
        read_engine(tmp_path / "empty.engine")


def test_raw_plans_from_other_tools_are_passed_through(tmp_path):
    (tmp_path / "trtexec.plan").write_bytes(b"\x01\x02plan")
    plan, header = read_engine(tmp_path / "trtexec.plan")
    assert plan == b"\x01\x02plan" and header is None


@pytest.mark.skipif(HAS_TENSORRT, reason="checks the message shown where tensorrt is missing")
def test_missing_tensorrt_says_what_to_do(minilm_graph, tmp_path):
    import lowbit

    with pytest.raises(TensorRTUnavailable, match="needs the 'tensorrt' Python package.*format='onnx'") as info:
        lowbit.export(minilm_graph, tmp_path / "m.engine", format="tensorrt")
    assert isinstance(info.value, LowbitError)  # a deliberate refusal, as README's "every deliberate refusal" says
    with pytest.raises(TensorRTUnavailable):
        TensorRTCompiled(minilm_graph)


@pytest.mark.skipif(HAS_TENSORRT, reason="checks the refusal where tensorrt is missing")
def test_missing_tensorrt_is_refused_before_capture():
    """As backend='triton' without CUDA: the plan refuses before capture and calibration, and the CLI exits as
    it does for triton (usage), not after a pipeline's work with a backend failure."""
    from typer.testing import CliRunner

    from lowbit.api import plan_compile
    from lowbit.backends.registry import BackendError
    from lowbit.cli.main import app

    with pytest.raises(BackendError, match="'tensorrt' Python package is not installed.*format='onnx'"):
        plan_compile([], "tensorrt")
    result = CliRunner().invoke(app, ["compile", "smollm2:1", "-b", "tensorrt", "--pipeline", "dce"])
    assert result.exit_code == 2, result.output
    assert "tensorrt" in result.output and "not installed" in result.output
    # generate said so only after loading the model: a missing model directory exited 3 before the backend was named
    result = CliRunner().invoke(app, ["generate", "no/such/model", "-b", "tensorrt", "--prompt", "hi"])
    assert result.exit_code == 2, result.output
    assert "tensorrt" in result.output and "not installed" in result.output


def test_optimization_profile_comes_from_the_symbols(minilm_graph):
    profile = profile_from_symbols(to_onnx(minilm_graph), max_default=512)
    # batch s0 in [1, 256], sequence s1 in [1, 512]: torch.export reports 2 as the least dynamic size, but the graph
    # runs at 1 and the other backends take 1 (a profile from 2 refused batch-1 calls); the optimum is the size seen
    # at capture; the batch stops at max_batch (8 by default)
    lo, opt, hi = profile["input_ids"]
    assert lo == [1, 1] and hi == [8, 512] and opt[0] == 2
    assert profile["attention_mask"] == profile["input_ids"]
    capped = profile_from_symbols(to_onnx(minilm_graph), max_default=128)
    assert capped["input_ids"][2] == [8, 128]
    assert profile_from_symbols(to_onnx(minilm_graph), max_batch=64)["input_ids"][2] == [64, 512]


def test_shapes_for_some_inputs_keep_the_others_from_the_symbols(minilm_graph):
    """shapes= for input_ids alone replaced the whole profile (attention_mask had none: TensorRT's build failed),
    and a misspelt input name reached TensorRT's set_shape."""
    model = to_onnx(minilm_graph)
    profile = profile_from_symbols(model, max_default=512, shapes={"input_ids": ((1, 8), (4, 64), (8, 128))})
    assert profile["input_ids"] == ([1, 8], [4, 64], [8, 128])
    assert profile["attention_mask"] == profile["input_ids"]  # the same batch and sequence: see the test at the end
    with pytest.raises(TensorRTBuildError, match="'input_id', which the model has no input called \\(did you mean "
                                                 "'input_ids'\\?\\); its inputs are: input_ids, attention_mask"):
        profile_from_symbols(model, shapes={"input_id": ((1, 8), (4, 64), (8, 128))})
    with pytest.raises(TensorRTBuildError, match="shapes\\['input_ids'\\] has rank 3; the input is rank 2"):
        profile_from_symbols(model, shapes={"input_ids": ((1, 8, 1), (4, 64, 1), (8, 128, 1))})


class _FakeRunner:
    """Stands in for TensorRTRunner where TensorRT is absent: records what the engine would be called with."""

    def __init__(self, plan: bytes, header: EngineHeader | None = None, where: str = "<memory>") -> None:
        self.inputs = list(header.inputs) if header is not None else []
        self.calls: list[tuple[torch.Tensor, ...]] = []
        self.device = torch.device("cpu")

    def __call__(self, *args: torch.Tensor) -> list[torch.Tensor]:
        self.calls.append(args)
        return [torch.zeros(1)]


def test_an_engine_built_from_a_graph_checks_its_inputs_as_the_other_backends(minilm_graph, monkeypatch):
    """TensorRTCompiled handed any tensor to the engine: float ids were cast to int64 (truncated), an id past the
    vocabulary went to TensorRT's Gather."""
    import lowbit.backends.tensorrt as trt_backend
    from lowbit.ir.signature import InputError

    monkeypatch.setattr(trt_backend, "import_tensorrt", lambda: None)
    monkeypatch.setattr(trt_backend, "build_engine", lambda path, **kw: (b"plan", EngineHeader(
        0, "", "10.0", inputs=["input_ids", "attention_mask"], outputs=["out"])))
    monkeypatch.setattr(trt_backend, "TensorRTRunner", _FakeRunner)
    model = TensorRTCompiled(minilm_graph)
    ids, mask = torch.tensor([[101, 2023, 102]]), torch.ones(1, 3, dtype=torch.long)
    model(ids, mask)
    assert len(model.runner.calls) == 1
    with pytest.raises(InputError, match="input %input_ids .*expected dtype torch.int64, got torch.float32"):
        model(ids.float(), mask)
    with pytest.raises(InputError, match="id 40000 .* outside the vocabulary"):
        model(torch.tensor([[101, 40000, 102]]), mask)
    assert len(model.runner.calls) == 1


def test_a_call_outside_the_engine_profile_names_the_input_and_the_profile():
    """set_input_shape's False was ignored: the outputs got -1 sizes and torch.empty failed on them."""
    from lowbit.backends.tensorrt.engine import TensorRTRunner
    from lowbit.ir.signature import InputError

    class Context:
        def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
            return shape[1] <= 128

    runner = TensorRTRunner.__new__(TensorRTRunner)
    runner.inputs, runner.outputs, runner.context = ["input_ids"], [], Context()
    runner.header = EngineHeader(0, "", "10.0", inputs=["input_ids"],
                                 profile={"input_ids": [[1, 1], [1, 64], [8, 128]]})
    with pytest.raises(InputError, match="input 'input_ids': shape \\(1, 300\\) is outside the engine's optimization "
                                         "profile \\(the engine was built for min \\[1, 1\\], max \\[8, 128\\]"):
        runner(torch.ones(1, 300, dtype=torch.long))


# ---- with TensorRT ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smol_w4(smollm2):
    from lowbit.ir.capture import capture
    from lowbit.models import CausalLMLogits
    from lowbit.passes.manager import PassManager, parse_pipeline

    m = copy.deepcopy(smollm2[0])
    m.model.layers = m.model.layers[:2]
    m.config.num_hidden_layers = 2
    g = capture(CausalLMLogits(m).eval(), (torch.ones(1, 16, dtype=torch.long),), {"input_ids": {1: SEQ}})
    PassManager(parse_pipeline("quantize(w=int4,group=64)")).run(g)
    return g


@needs_tensorrt
def test_tensorrt_engine_matches_reference_and_survives_save_load(smol_w4, wikitext_ids, tmp_path):
    from lowbit.backends.torch_backend import TorchCompiled

    engine = TensorRTCompiled(smol_w4, opt={"s0": 128}, max_dim=1024, timing_cache=tmp_path / "timing.cache")
    assert (tmp_path / "timing.cache").stat().st_size > 0
    ids = wikitext_ids[:, :77]
    ref = TorchCompiled(smol_w4)(ids)
    out = engine(ids.cuda()).float().cpu()
    assert (out - ref).abs().max().item() < 5e-2  # TensorRT picks its own GEMM tactics (TF32 off by default)
    path = engine.save(tmp_path / "slice.engine")
    again = TensorRTCompiled.load(path)
    assert torch.equal(again(ids.cuda()), engine(ids.cuda()))


@pytest.mark.parametrize("options, error, match", [
    ({"workspace": 1 << 30}, TypeError, "unknown TensorRT build option 'workspace'.*did you mean 'workspace_bytes'"),
    ({"max_dim": 0}, ValueError, "max_dim=0: give a positive integer"),
    ({"workspace_bytes": "4G"}, ValueError, "workspace_bytes='4G'"),
    ({"strongly_typed": "no"}, ValueError, "strongly_typed='no'"),
    ({"fp16": True}, ValueError, "fp16=True applies to a weakly typed build only"),
    ({"opt": {"seq": -3}}, ValueError, "opt=.*positive size"),
    ({"shapes": {"input_ids": ((1, 8), (1, 4), (1, 16))}}, ValueError, "min <= opt <= max"),
    ({"shapes": {"input_ids": ((1, 8), (1, 16))}}, ValueError, r"give \(min, opt, max\)"),
    # was "unknown TensorRT build option 'opset' (did you mean 'opt'?)"
    ({"opset": 23}, TypeError, "opset= is an ONNX lowering option; a TensorRT engine is built from the opset-21 QDQ"),
])
def test_build_options_are_checked_before_tensorrt_or_lowering(minilm_graph, tmp_path, options, error, match):
    """A misspelt or ill-typed build option is named as such whether or not TensorRT is installed (it was
    reported as "tensorrt is not installed", or failed inside the builder after the whole lowering). Each is a
    ``LowbitError`` (a bad value was a bare ValueError)."""
    import lowbit
    from lowbit.errors import LowbitError

    with pytest.raises(error, match=match) as exc:
        lowbit.export(minilm_graph, tmp_path / "m.engine", format="tensorrt", **options)
    assert isinstance(exc.value, LowbitError)
    with pytest.raises(error, match=match) as exc:
        TensorRTCompiled(minilm_graph, **options)
    assert isinstance(exc.value, LowbitError)
    assert not (tmp_path / "m.engine").exists()


def test_every_tensorrt_export_option_is_listed_and_an_unknown_one_is_refused_by_name(minilm_graph, tmp_path):
    """``export_engine`` takes ``onnx_dir`` besides ``build_engine``'s options, but the refusal of an unknown option
    listed only the build options: ``onnx_dri=`` got no 'did you mean', and the list hid an option that exists."""
    import inspect

    import lowbit
    from lowbit.backends.tensorrt import build_engine, export_engine
    from lowbit.errors import OptionError

    accepted = [n for n in inspect.signature(export_engine).parameters if n not in ("graph", "path", "build")]
    accepted += [n for n in inspect.signature(build_engine).parameters if n != "onnx_path"]
    with pytest.raises(OptionError, match="unknown TensorRT build option 'onnx_dri'.*did you mean 'onnx_dir'") as exc:
        lowbit.export(minilm_graph, tmp_path / "m.engine", format="tensorrt", onnx_dri=tmp_path)
    listed = str(exc.value).split("options are: ")[1]
    assert sorted(accepted) == listed.split(", "), listed
    with pytest.raises(ValueError, match="onnx_dir=3: give a directory path"):
        lowbit.export(minilm_graph, tmp_path / "m.engine", format="tensorrt", onnx_dir=3)
    assert not (tmp_path / "m.engine").exists()


@pytest.mark.parametrize("options", [{"external_data": True}, {"check": False}])
def test_onnx_file_options_are_refused_for_an_engine(minilm_graph, tmp_path, options):
    """``lowbit.export(..., "tensorrt", external_data=True)`` or ``check=False`` was accepted and dropped: an engine
    is one file, and no onnx.checker runs on it. Both are refused by name, before TensorRT is imported."""
    import lowbit
    from lowbit.errors import OptionError

    (key, value), = options.items()
    with pytest.raises(OptionError, match=f"{key}={value!r} applies to ONNX files; format='tensorrt' writes one"):
        lowbit.export(minilm_graph, tmp_path / "m.engine", format="tensorrt", **options)
    assert not any(tmp_path.iterdir())


# ---- the backend's options (compile_model(backend="tensorrt", backend_options=...), --backend-option) ------------


def test_tensorrt_backend_options_are_validated_before_tensorrt_or_capture():
    """The tensorrt backend took no options at all: ``--backend-option workspace_bytes=...`` (and every build option
    TensorRTCompiled takes) was refused as unknown. They are accepted now, parsed from the CLI's text, and a bad
    one is refused by name with the accepted list, on a machine without TensorRT too."""
    from typer.testing import CliRunner

    from lowbit.api import plan_compile
    from lowbit.backends.registry import BackendError, get_backend
    from lowbit.cli.main import app

    spec = get_backend("tensorrt")
    opts = spec.parse_options({"workspace_bytes": "1073741824", "max_dim": "512", "opt": "s0=4,s1=64",
                               "shapes": "input_ids=1x1:4x64:8x512", "strongly_typed": "false", "fp16": "true",
                               "timing_cache": "t.cache", "engine_cache": "engines"})
    assert opts.workspace_bytes == 1 << 30 and opts.max_dim == 512 and opts.opt == {"s0": 4, "s1": 64}
    assert opts.shapes == {"input_ids": ((1, 1), (4, 64), (8, 512))} and opts.fp16 and not opts.strongly_typed
    listed = ("options are: bf16, engine_cache, fp16, max_batch, max_dim, opt, shapes, strongly_typed, timing_cache, "
              "workspace_bytes")
    for bad, match in [({"workspace": "1"}, "option workspace: Extra inputs"),
                       ({"fp16": "true"}, "fp16=true applies only with strongly_typed=false"),
                       ({"max_dim": "0"}, "option max_dim: Input should be greater than 0"),
                       ({"opt": "s0"}, "give NAME=SIZE pairs"),
                       ({"shapes": "input_ids=1x8:1x4:1x16"}, "min <= opt <= max")]:
        with pytest.raises(BackendError, match=match) as exc:
            plan_compile([], "tensorrt", bad)
        assert listed in str(exc.value)
    result = CliRunner().invoke(app, ["compile", "smollm2:1", "-b", "tensorrt", "--pipeline", "dce",
                                      "--backend-option", "workspace=1"])
    assert result.exit_code == 2 and "option workspace" in result.output and "workspace_bytes" in result.output


def test_tensorrt_backend_options_reach_the_build_and_the_engine_cache(minilm_graph, monkeypatch, tmp_path):
    """Each option the backend accepts is handed to build_engine (none was), and ``engine_cache`` loads the engine a
    build with the same ONNX, options and TensorRT wrote, instead of building it again."""
    import types

    import lowbit.backends.tensorrt as trt_backend
    from lowbit.backends.registry import get_backend

    built: list[dict] = []

    def fake_build(path, **kw):
        built.append(kw)
        return b"plan%d" % len(built), EngineHeader(0, "", "10.0", inputs=["input_ids", "attention_mask"])

    monkeypatch.setattr(trt_backend, "import_tensorrt", lambda: types.SimpleNamespace(__version__="10.0"))
    monkeypatch.setattr(trt_backend, "build_engine", fake_build)
    monkeypatch.setattr(trt_backend, "TensorRTRunner", _FakeRunner)
    spec = get_backend("tensorrt")
    given = {"workspace_bytes": "1073741824", "opt": "s0=4", "strongly_typed": "false", "bf16": "true",
             "engine_cache": str(tmp_path / "engines")}
    first = trt_backend.lower(minilm_graph, None, **spec.parse_options(given).model_dump())
    assert built == [{"shapes": None, "opt": {"s0": 4}, "max_dim": 4096, "max_batch": None, "workspace_bytes": 1 << 30,
                      "timing_cache": None, "strongly_typed": False, "fp16": False, "bf16": True}]
    assert first.cached is None and len(list((tmp_path / "engines").iterdir())) == 1
    again = trt_backend.lower(minilm_graph, None, **spec.parse_options(given).model_dump())
    assert len(built) == 1 and again.cached is not None and again.plan == first.plan == b"plan1"
    other = trt_backend.lower(minilm_graph, None, **spec.parse_options({**given, "max_dim": "512"}).model_dump())
    assert len(built) == 2 and other.cached is None and other.plan == b"plan2"


def test_a_damaged_engine_cache_entry_is_said_and_built_again(minilm_graph, monkeypatch, tmp_path):
    """A cached engine whose file was truncated (a killed write) or corrupted failed the compile with
    EngineFileError though the engine could be rebuilt: it is said in a warning, built again and rewritten."""
    import types

    import lowbit.backends.tensorrt as trt_backend

    built: list[bytes] = []

    def fake_build(path, **kw):
        built.append(b"plan%d" % len(built))
        return built[-1], EngineHeader(0, "", "10.0", inputs=["input_ids", "attention_mask"])

    monkeypatch.setattr(trt_backend, "import_tensorrt", lambda: types.SimpleNamespace(__version__="10.0"))
    monkeypatch.setattr(trt_backend, "build_engine", fake_build)
    monkeypatch.setattr(trt_backend, "TensorRTRunner", _FakeRunner)
    cache = tmp_path / "engines"
    first = trt_backend.lower(minilm_graph, None, engine_cache=str(cache))
    (entry,) = cache.iterdir()
    entry.write_bytes(entry.read_bytes()[:-2])
    with pytest.warns(UserWarning, match="TensorRT engine cache: .* is truncated.*building the engine again"):
        again = trt_backend.lower(minilm_graph, None, engine_cache=str(cache))
    assert again.cached is None and again.plan == b"plan1" != first.plan
    assert read_engine(entry)[0] == b"plan1"  # rewritten: the next compile loads it
    assert trt_backend.lower(minilm_graph, None, engine_cache=str(cache)).cached == entry


def test_builder_config_sets_the_workspace_and_only_the_precision_flags_a_weakly_typed_build_reads():
    """The builder config, against a stand-in for the tensorrt module: a strongly typed build sets no precision flag
    (TensorRT refuses them there), a weakly typed one INT8 (explicit quantization on TensorRT 8) and fp16/bf16 as
    asked; a flag this TensorRT lacks is named."""
    import types

    from lowbit.backends.tensorrt import TensorRTOptionError, builder_config

    class Config:
        def __init__(self) -> None:
            self.pools: dict = {}
            self.flags: list = []

        def set_memory_pool_limit(self, pool, size) -> None:
            self.pools[pool] = size

        def set_flag(self, flag) -> None:
            self.flags.append(flag)

    def fake(**flags):
        return types.SimpleNamespace(__version__="8.6", MemoryPoolType=types.SimpleNamespace(WORKSPACE="ws"),
                                     BuilderFlag=types.SimpleNamespace(**flags))

    trt = fake(INT8="int8", FP16="fp16", BF16="bf16")
    builder = types.SimpleNamespace(create_builder_config=Config)
    cfg = builder_config(trt, builder, workspace_bytes=123, strongly_typed=True)
    assert cfg.pools == {"ws": 123} and cfg.flags == []
    assert builder_config(trt, builder, workspace_bytes=1, strongly_typed=False, fp16=True).flags == ["int8", "fp16"]
    assert builder_config(trt, builder, workspace_bytes=1, strongly_typed=False, bf16=True).flags == ["int8", "bf16"]
    with pytest.raises(TensorRTOptionError, match="fp16=True applies to a weakly typed build only"):
        builder_config(trt, builder, workspace_bytes=1, strongly_typed=True, fp16=True)
    with pytest.raises(TensorRTOptionError, match="this TensorRT \\(8.6\\) has no BuilderFlag.BF16"):
        builder_config(fake(INT8="int8", FP16="fp16"), builder, workspace_bytes=1, strongly_typed=False, bf16=True)


# ---- TensorRT's explicit-quantization rules on the pipeline, before it runs ------------------------------------


@pytest.fixture(scope="module")
def trt_llama():
    """A random Llama wide enough for TensorRT's INT4 blocks of 64 and 128, with SmolLM2's vocabulary (so the
    shipped calibration text tokenizes for it)."""
    import lowbit
    from conftest import tiny_llama

    torch.manual_seed(0)
    model = tiny_llama(hidden=128, inter=256, heads=4, kv_heads=2, vocab=49152, max_positions=64)
    return lowbit.compile_model(model, tokenizer="smollm2").graph


@pytest.fixture
def tensorrt_here(monkeypatch):
    """The tensorrt backend as if TensorRT and a GPU were here: plan_compile checks it past its availability."""
    import dataclasses

    from lowbit.backends import registry

    monkeypatch.setitem(registry.BACKENDS, "tensorrt",
                        dataclasses.replace(registry.BACKENDS["tensorrt"], unavailable=None))


CALIB_TRT = "calib_n=2,calib_len=16,batch_size=2,progress=false"


@pytest.mark.parametrize("pipeline", [
    "quantize(w=int4,group=64)",
    "quantize(w=int4,group=32)",
    "quantize(w=int4)",
    "quantize(w=int4,group=128,sym=false)",
    "quantize(w=int8,group=64)",
    "quantize(w=fp8e5m2)",
    "quantize(w=int8,a=int8)",
    f"quantize(w=int8,a=int8,a_static=true,a_gran=per_tensor,{CALIB_TRT})",
    f"quantize(w=int8,a=int8,a_static=true,a_gran=per_channel,{CALIB_TRT})",
    f"quantize(w=int4,group=64,a=int4,a_static=true,a_gran=per_tensor,{CALIB_TRT})",
    "quantize(w=int8,kv=int8)",
    "quantize(w=int4,group=64,head=int8)",
    f"gptq(w=int4,group=64,{CALIB_TRT})",
])
def test_a_pipeline_tensorrt_cannot_build_is_refused_before_it_runs(pipeline, trt_llama, tensorrt_here):
    """A pipeline whose Q/DQ TensorRT's explicit-quantization rules refuse (dynamic or per-token activations,
    asymmetric weights, INT4 outside blocks of 64/128, grouped INT8) was found out only on the exported ONNX, after
    capture and the whole pipeline's calibration. plan_compile refuses it from the pass options now, naming each
    rule; checked against the rules the export of the same pipeline breaks: the plan refuses exactly the pipelines
    whose export has errors, and names only rules the export breaks."""
    import re

    from lowbit.api import plan_compile
    from lowbit.backends.registry import BackendError
    from lowbit.backends.tensorrt import check_tensorrt_qdq, errors
    from lowbit.passes.manager import PassManager, parse_pipeline

    passes = parse_pipeline(pipeline)
    try:
        plan_compile(passes, "tensorrt")
        refused: set[str] = set()
    except BackendError as exc:
        assert f"pass {passes[-1].spec()} writes" in str(exc)
        refused = set(re.findall(r"\(rule ([\w-]+)\)", str(exc)))
    graph = trt_llama.clone()
    PassManager(passes).run(graph)
    found = {v.rule for v in errors(check_tensorrt_qdq(to_onnx(graph, opset=21, weight_format="qdq",
                                                               attention="decompose")))}
    assert bool(refused) == bool(found) and refused <= found, (refused, found)


def test_the_cli_refuses_a_pipeline_tensorrt_cannot_build_before_loading_the_model(tensorrt_here):
    from typer.testing import CliRunner

    from lowbit.cli.main import app

    result = CliRunner().invoke(app, ["compile", "no/such/model", "-b", "tensorrt", "--pipeline",
                                      "gptq(w=int4,group=64)"])
    assert result.exit_code == 2, result.output
    assert "asymmetric (a zero point): TensorRT quantizes symmetrically only: sym=true" in result.output


def test_compile_to_a_directory_with_the_tensorrt_backend_writes_the_engine_it_built(tensorrt_here, monkeypatch,
                                                                                   tmp_path):
    """``lowbit compile -b tensorrt -o OUT`` built an engine and dropped it: OUT held the IR and the report only
    (``-b onnxruntime`` writes its model.onnx). OUT/model.engine is the engine, integrity-checked on load, and
    ``lowbit.export.load(OUT)`` names it."""
    import types

    from typer.testing import CliRunner

    import lowbit.backends.tensorrt as trt_backend
    from lowbit.cli.main import app
    from lowbit.export import load

    monkeypatch.setattr(trt_backend, "import_tensorrt", lambda: types.SimpleNamespace(__version__="10.0"))
    monkeypatch.setattr(trt_backend, "build_engine", lambda path, **kw: (b"the plan", EngineHeader(
        0, "", "10.0", inputs=["input_ids"], outputs=["logits"])))
    monkeypatch.setattr(trt_backend, "TensorRTRunner", _FakeRunner)
    from conftest import tiny_llama

    from lowbit.calibration.data import load_tokenizer

    tiny_llama().save_pretrained(tmp_path / "tiny")
    load_tokenizer("smollm2").save_pretrained(tmp_path / "tiny")
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["compile", str(tmp_path / "tiny"), "-b", "tensorrt", "-p", "dce", "-o", str(out),
                                      "-q"])
    assert result.exit_code == 0, result.output
    plan, header = read_engine(out / "model.engine")
    assert plan == b"the plan" and header is not None and header.inputs == ["input_ids"]
    with pytest.raises(ValueError, match="model.engine is the TensorRT engine in it"):
        load(out)


def test_a_graph_breaking_tensorrt_rules_is_refused_one_line_per_rule(trt_llama, monkeypatch, tmp_path):
    """``lowbit.export(compiled, ..., format='tensorrt')`` of a graph every linear of which breaks the same rule listed
    one line per node (360 lines for a W8A8 SmolLM2): one line per rule now, its first node and the others counted,
    with every violation kept on the error."""
    import types

    import lowbit
    import lowbit.backends.tensorrt as trt_backend
    from lowbit.backends.tensorrt import TensorRTQDQError
    from lowbit.passes.manager import PassManager, parse_pipeline

    monkeypatch.setattr(trt_backend, "import_tensorrt", lambda: types.SimpleNamespace(__version__="10.0"))
    graph = trt_llama.clone()
    PassManager(parse_pipeline("quantize(w=int4,group=32,sym=false)")).run(graph)
    with pytest.raises(TensorRTQDQError) as exc:
        lowbit.export(graph, tmp_path / "m.engine", format="tensorrt")
    rules = {v.rule for v in exc.value.violations}
    lines = str(exc.value).splitlines()
    assert rules == {"int4-block-size", "zero-point-zero"} and len(exc.value.violations) == 14
    assert lines[0].startswith("14 TensorRT Q/DQ rule violation(s) of 2 rule(s)") and len(lines) == 3
    assert all("(and 6 more: " in line and line.endswith(", ...)") for line in lines[1:])


def test_the_engine_cache_and_checkpoint_manifests_hash_files_through_one_function(monkeypatch, tmp_path):
    """``cache_entry`` read and hashed the ONNX files with its own copy of the checkpoint's ``sha256_file`` (the
    backends may not import ``lowbit.checkpoint``). Both use ``lowbit.hashing.sha256_file`` now: the engine cache
    hashes every file beside the ONNX (its external data too) through it, and a changed weight file, not a new
    temporary directory, is what gives a new entry."""
    import hashlib

    import lowbit.checkpoint.files as checkpoint_files
    import lowbit.hashing
    from lowbit.backends.tensorrt import cache_entry

    assert checkpoint_files.sha256_file is lowbit.hashing.sha256_file
    hashed: list[str] = []
    real = lowbit.hashing.sha256_file
    monkeypatch.setattr(lowbit.hashing, "sha256_file", lambda p: hashed.append(p.name) or real(p))
    entries = []
    for run, weights in enumerate((b"w" * 3000, b"w" * 3000, b"v" * 3000)):
        d = tmp_path / f"run{run}"
        d.mkdir()
        (d / "model.onnx").write_bytes(b"graph")
        (d / "model.onnx.data").write_bytes(weights)
        entries.append(cache_entry(tmp_path / "cache", d / "model.onnx", {"max_dim": 64}, "10.0"))
    assert hashed == ["model.onnx", "model.onnx.data"] * 3
    assert entries[0] == entries[1] != entries[2]
    assert real(tmp_path / "run2" / "model.onnx.data") == hashlib.sha256(b"v" * 3000).hexdigest()


class _PassesRun:
    """An instrument that records the passes the PassManager started."""

    def __init__(self) -> None:
        self.started: list[str] = []

    def before_pass(self, record, p, graph) -> None:
        self.started.append(p.name)

    def after_pass(self, record, p, graph) -> None:
        pass


def _refused_before_any_pass(option: str, value: object, match: str):
    """``backend_options={option: value}`` on a tiny Llama is refused (``match``) by the compile driver before the
    first pass runs, and by ``TensorRTCompiled(graph, option=value)`` before it lowers; returns that float graph."""
    import lowbit
    from conftest import tiny_llama
    from lowbit.backends.registry import BackendError
    from lowbit.backends.tensorrt import TensorRTOptionError

    torch.manual_seed(0)
    passes_run = _PassesRun()
    with pytest.raises((BackendError, TensorRTOptionError), match=match):
        lowbit.compile_model(tiny_llama(), pipeline="fold-norms,dce", backend="tensorrt",
                             backend_options={option: value}, instruments=[passes_run])
    assert passes_run.started == []
    graph = lowbit.compile_model(tiny_llama()).graph
    with pytest.raises(TensorRTOptionError, match=match):
        TensorRTCompiled(graph, **{option: value})
    return graph


@pytest.mark.parametrize("shapes, match", [
    ({"input_id": ((1, 1), (1, 8), (2, 16))}, r"shapes= names 'input_id', but graph 'main' has no such input \(did "
                                              r"you mean 'input_ids'\?\); its inputs are: input_ids$"),
    ({"ids": ((1, 1), (1, 8), (2, 16))}, r"shapes= names 'ids', but graph 'main' has no such input; its inputs are: "
                                         r"input_ids$"),
    ({"input_ids": ((1,), (8,), (16,))}, r"shapes\['input_ids'\] has rank 1; input 'input_ids' is i64\[s\d+,s\d+\] "
                                         r"\(rank 2\)"),
])
def test_tensorrt_shapes_are_checked_against_the_graph_inputs_before_any_pass_runs(shapes, match, tensorrt_here):
    """``backend_options={"shapes": {"input_id": ...}}`` (a name the model has no input called) was found only when
    TensorRT's builder set the profile: after capture, the whole pipeline (its calibration) and the ONNX lowering.
    The compile driver checks it on the captured graph before the first pass now, naming the inputs there are;
    so does ``TensorRTCompiled`` before it lowers (or finds TensorRT missing)."""
    _refused_before_any_pass("shapes", shapes, match)


@pytest.mark.parametrize("pipeline", ["quantize(w=int4,group=128,group_fallback=32)",
                                      f"gptq(w=int4,group=128,group_fallback=32,sym=true,{CALIB_TRT})"])
def test_a_group_fallback_tensorrt_refuses_is_named_by_linear_before_any_pass_runs(pipeline, tensorrt_here,
                                                                                   monkeypatch):
    """``group=128,group_fallback=32`` on a model with 192-wide linears: plan_compile checks the options' group (128,
    fine), and the fallback's 32 (which TensorRT's INT4 blocks refuse) was found only in the exported ONNX, after
    the whole pipeline's calibration. The compile driver refuses it on the captured graph before the first pass,
    naming the linears (as many as the export's checker finds) and group_fallback as the option to change; a
    fallback TensorRT takes (64) still goes on to the engine build."""
    import re
    import types

    import lowbit
    import lowbit.backends.tensorrt as trt_backend
    from conftest import tiny_llama
    from lowbit.backends.registry import BackendError
    from lowbit.backends.tensorrt import check_tensorrt_qdq, errors

    def model():
        torch.manual_seed(0)
        return tiny_llama(hidden=192, inter=256, heads=4, kv_heads=2, vocab=49152, max_positions=64)

    passes_run = _PassesRun()
    with pytest.raises(BackendError) as exc:
        lowbit.compile_model(model(), pipeline=pipeline, backend="tensorrt", tokenizer="smollm2",
                             instruments=[passes_run])
    assert passes_run.started == []
    message = str(exc.value)
    assert "group_fallback=32 is the group of the linears whose input size group=128 does not divide" in message
    assert "module 'model.layers.0.self_attn.q_proj', input size 192" in message
    assert "group_fallback=64 (128 does not divide input size 192) (rule int4-block-size)" in message
    named = 2 + int(re.search(r"and (\d+) more", message).group(1))
    assert named == 6, message
    if pipeline.startswith("gptq"):  # what follows compiles the same model and pipelines whichever refused above
        return
    graph = lowbit.compile_model(model(), pipeline="quantize(w=int4,group=128,group_fallback=32)").graph
    found = errors(check_tensorrt_qdq(to_onnx(graph, opset=21, weight_format="qdq", attention="decompose")))
    assert {v.rule for v in found} == {"int4-block-size"} and len(found) == named == 6

    monkeypatch.setattr(trt_backend, "import_tensorrt", lambda: types.SimpleNamespace(__version__="10.0"))
    monkeypatch.setattr(trt_backend, "build_engine", lambda path, **kw: (b"plan", EngineHeader(
        0, "", "10.0", inputs=["input_ids"], outputs=["logits"])))
    monkeypatch.setattr(trt_backend, "TensorRTRunner", _FakeRunner)
    built = lowbit.compile_model(model(), pipeline="quantize(w=int4,group=128,group_fallback=64)",
                                 backend="tensorrt")
    assert built.report.pipeline.records[0].stats["weights_quantized"] == 7  # down_proj's 256 in groups of 128


@pytest.mark.parametrize("opt, match", [
    ({"seq": 16}, r"opt= names 'seq', but the inputs of .* have no dynamic dim called so; their dynamic dims are: "
                  r"batch, s0, sequence, s1"),
    ({"sequence": 100000}, r"opt=\{sequence: 100000\} is outside the profile of dim 'sequence'.*: \[1, 32\]"),
])
def test_tensorrt_opt_names_a_dynamic_dim_of_the_model_inside_its_range(opt, match, tensorrt_here):
    """``opt={"seq": 16}`` (the dim is ``sequence``, or ``s1``) was silently ignored: the engine was tuned for the
    capture's size, not the one asked for; ``opt={"sequence": 100000}`` on a 32-position model reached TensorRT's
    builder as an invalid profile. Both are refused naming the dims (and the range): by the compile driver before
    any pass runs, by ``TensorRTCompiled`` before it lowers, and by ``build_engine``'s profile from an ONNX file."""
    graph = _refused_before_any_pass("opt", opt, match)
    model = to_onnx(graph, opset=21, weight_format="qdq", attention="decompose")
    with pytest.raises(TensorRTBuildError, match=match):
        profile_from_symbols(model, opt)
    assert profile_from_symbols(model, {"sequence": 16, "s0": 4})["input_ids"] == ([1, 1], [4, 16], [8, 32])


def test_the_cli_refuses_a_tensorrt_option_the_model_lacks_as_a_usage_error(tensorrt_here, tmp_path):
    """``lowbit compile DIR -b tensorrt --backend-option shapes=ids=...`` (an input the model has no such name for)
    said "backend 'tensorrt' could not lower the graph: BackendError: ..." and exited 5 (a backend failure): it is
    the user's option, refused once the model is captured with exit 2 and the model's inputs named, no pass run."""
    from typer.testing import CliRunner

    from conftest import tiny_llama
    from lowbit.calibration.data import load_tokenizer
    from lowbit.cli.main import app

    tiny_llama().save_pretrained(tmp_path / "tiny")
    load_tokenizer("smollm2").save_pretrained(tmp_path / "tiny")
    result = CliRunner().invoke(app, ["compile", str(tmp_path / "tiny"), "-b", "tensorrt", "-p", "dce",
                                      "--backend-option", "shapes=ids=1x1:1x8:1x16", "--print-ir-after-all"])
    assert result.exit_code == 2, result.output
    assert "could not lower" not in result.output and "IR after" not in result.output
    assert "shapes= names 'ids', but graph 'main' has no such input; its inputs are: input_ids" in \
        " ".join(result.output.split())


def test_every_pass_tensorrt_refuses_is_named_at_once(tensorrt_here):
    """The fp8 recipe (gptq's grouped fp8 weights, then quantize's dynamic per-token fp8 activations) was refused for
    its gptq pass alone: with the weights fixed, the next compile was refused for the activations. plan_compile
    names every refused pass, each with the rules it breaks (the same lines the pass alone is refused with)."""
    from lowbit.api import plan_compile
    from lowbit.backends.registry import BackendError
    from lowbit.passes.manager import parse_pipeline
    from lowbit.recipes import RECIPES

    passes = parse_pipeline(RECIPES["fp8"].pipeline)
    with pytest.raises(BackendError) as exc:
        plan_compile(passes, "tensorrt")
    message = str(exc.value)
    refused = []
    for p in passes:
        try:
            plan_compile([p], "tensorrt")
        except BackendError as alone:
            refused.append(p)
            lines = str(alone).splitlines()
            assert lines[0] == f"backend 'tensorrt' cannot run what pass {p.spec()} writes:"
            assert all(line in message.splitlines() for line in lines[1:])
    assert [p.name for p in refused] == ["gptq", "quantize"]
    assert message.startswith("backend 'tensorrt' cannot run what 2 passes write:\n1. pass gptq(")
    assert "(rule block-quantization-type)" in message and "(rule activation-per-tensor)" in message


def test_lowbit_inspect_reads_a_tensorrt_engine_header_without_tensorrt(tmp_path):
    """``lowbit inspect OUT/model.engine`` (what ``lowbit compile -b tensorrt -o OUT`` writes) was refused as a usage
    error ("expected a .lowbit IR dump, ... or an .onnx file"). It prints the header, integrity-checked, with no
    TensorRT: the version that built it, the inputs and the optimization profile (the shapes a call may take); a
    damaged engine exits 3 saying so, a raw plan from another tool is named as one."""
    from typer.testing import CliRunner

    from lowbit.cli.main import app

    write_engine(tmp_path / "model.engine", b"plan" * 100, _header())
    result = CliRunner().invoke(app, ["inspect", str(tmp_path / "model.engine")])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "TensorRT engine built by TensorRT 10.9.0, strongly typed, plan 400 bytes (SHA-256 verified), inputs " \
           "['input_ids'], outputs ['logits']" in text
    assert "│ input_ids │ 1x2 │ 1x128 │ 1x4096 │" in text
    data = (tmp_path / "model.engine").read_bytes()
    (tmp_path / "bad.engine").write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    result = CliRunner().invoke(app, ["inspect", str(tmp_path / "bad.engine")])
    assert result.exit_code == 3 and "is corrupted: the plan's SHA-256 does not match" in result.output
    (tmp_path / "other.plan").write_bytes(b"\x00" * 64)
    result = CliRunner().invoke(app, ["inspect", str(tmp_path / "other.plan")])
    assert result.exit_code == 0 and "a raw TensorRT plan (64 bytes) without lowbit's header" in result.output


def test_where_tensorrt_is_missing_the_refusal_also_names_the_rules_the_pipeline_breaks(monkeypatch):
    """On a machine without TensorRT, ``-b tensorrt -r w4a16-g64`` said only "not installed ... -b onnxruntime
    writes the QDQ ONNX TensorRT builds from": that ONNX (asymmetric int4) is one TensorRT refuses, which the user
    learnt on the GPU machine. The refusal names the rules the pipeline breaks too, in the API's and the CLI's words;
    a pipeline TensorRT takes is refused for the missing package alone, as before."""
    import dataclasses

    from lowbit.api import plan_compile
    from lowbit.backends import registry
    from lowbit.backends.registry import BackendError
    from lowbit.passes.manager import parse_pipeline
    from lowbit.recipes import RECIPES

    monkeypatch.setitem(registry.BACKENDS, "tensorrt", dataclasses.replace(
        registry.BACKENDS["tensorrt"], unavailable=lambda device, cli: f"no TensorRT here ({'cli' if cli else 'api'})"))
    with pytest.raises(BackendError) as exc:
        plan_compile(parse_pipeline(RECIPES["w4a16-g64"].pipeline), "tensorrt")
    for text, words in ((str(exc.value), "api"), (exc.value.cli, "cli")):
        assert text.startswith(f"backend 'tensorrt' cannot run here: no TensorRT here ({words})\nwhere it runs, it "
                               "would refuse this pipeline too: it cannot run what pass quantize(w=int4,group=64,"
                               "sym=false) writes:\n  - weights int4-asym-g64: asymmetric")
        assert "(rule zero-point-zero)" in text
    with pytest.raises(BackendError) as exc:
        plan_compile(parse_pipeline("quantize(w=int4,group=64)"), "tensorrt")
    assert str(exc.value) == "backend 'tensorrt' cannot run here: no TensorRT here (api)"


def test_shapes_for_one_input_set_the_dims_it_shares_with_the_others(minilm_graph):
    """``shapes={"input_ids": ...}`` on MiniLM gave input_ids [1, 8] / [4, 64] / [8, 128] and left attention_mask
    its symbols' [1, 1] / [2, 7] / [256, 512]: at the optimum TensorRT's builder was given a batch of 4 ids with a
    mask of 2 rows, a pair no call has (and the mask's range outran the ids'). Dims the inputs share (batch,
    sequence) take the given range everywhere; two given inputs that disagree on one are refused, naming both."""
    model = to_onnx(minilm_graph)
    given = ((1, 8), (4, 64), (8, 128))
    profile = profile_from_symbols(model, max_default=512, shapes={"input_ids": given})
    assert profile["attention_mask"] == profile["input_ids"] == ([1, 8], [4, 64], [8, 128])
    profile = profile_from_symbols(model, max_default=512, shapes={"attention_mask": given})
    assert profile["input_ids"] == ([1, 8], [4, 64], [8, 128])
    with pytest.raises(TensorRTBuildError, match=r"shapes= gives dim 'sequence' \(min, opt, max\) \(8, 32, 128\) "
                                                 r"in 'attention_mask' but \(8, 64, 128\) in 'input_ids'"):
        profile_from_symbols(model, shapes={"input_ids": given, "attention_mask": ((1, 8), (4, 32), (8, 128))})


def test_shapes_that_disagree_on_a_shared_dim_are_refused_before_lowering(minilm_graph):
    """Two inputs given different ranges for a dim they share (MiniLM's sequence in input_ids and attention_mask)
    were found by the build's profile only, after the ONNX lowering (and, from compile_model, the pipeline's
    calibration); the graph's check refuses them first, naming the dim by its symbol and both inputs."""
    from lowbit.backends.tensorrt import TensorRTOptionError

    shapes = {"input_ids": ((1, 8), (4, 64), (8, 128)), "attention_mask": ((1, 8), (4, 32), (8, 128))}
    seq = minilm_graph.inputs[0].type.shape[1]
    with pytest.raises(TensorRTOptionError, match=rf"shapes= gives dim {seq} \(min, opt, max\) \(8, 32, 128\) in "
                                                  r"'attention_mask' but \(8, 64, 128\) in 'input_ids'"):
        TensorRTCompiled(minilm_graph, shapes=shapes)


def test_an_engine_header_names_its_onnx_only_where_that_file_is_kept(minilm_graph, monkeypatch, tmp_path):
    """Engines built by ``TensorRTCompiled`` or ``export_engine`` recorded the temporary ONNX they were built from
    (``/tmp/lowbit-trt-.../model.onnx``, deleted with the build), which ``lowbit inspect`` showed as "built from". The
    header names the ONNX only where ``onnx_dir=`` keeps it."""
    import os
    import types

    import lowbit.backends.tensorrt as trt_backend
    from lowbit.backends.tensorrt import export_engine

    def fake_build(path, **kw):
        return b"plan", EngineHeader(0, "", "10.0", inputs=["input_ids", "attention_mask"], outputs=["out"],
                                     source=os.fspath(path))

    monkeypatch.setattr(trt_backend, "import_tensorrt", lambda: types.SimpleNamespace(__version__="10.0"))
    monkeypatch.setattr(trt_backend, "build_engine", fake_build)
    monkeypatch.setattr(trt_backend, "TensorRTRunner", _FakeRunner)
    assert TensorRTCompiled(minilm_graph).header.source == ""
    assert read_engine(export_engine(minilm_graph, tmp_path / "a.engine"))[1].source == ""
    kept = read_engine(export_engine(minilm_graph, tmp_path / "b.engine", onnx_dir=tmp_path / "onnx"))[1].source
    assert kept == os.fspath(tmp_path / "onnx" / "model.onnx") and os.path.isfile(kept)


def _profiling_build(path, **kw):
    """A stand-in for build_engine where TensorRT is absent: the header it writes, with the optimization profile the
    real build sets (profile_from_symbols on the ONNX it is handed, with its options)."""
    from lowbit.backends.onnx import load_onnx

    capped = {"max_batch": kw["max_batch"]} if kw.get("max_batch") is not None else {}
    profile = profile_from_symbols(load_onnx(path, check=False), kw.get("opt"), kw.get("max_dim", 4096),
                                   kw.get("shapes"), **capped)
    return b"plan", EngineHeader(0, "", "10.0", inputs=list(profile), outputs=["logits"],
                                 profile={k: [list(s) for s in v] for k, v in profile.items()})


def test_the_default_profile_caps_the_batch_and_the_report_and_inspect_say_it(tensorrt_here, monkeypatch, tmp_path):
    """A causal LM is captured with batch [1, 1024] and its positions (SmolLM2: 8192): the default engine profile was
    1024 x 4096 tokens, ~800 GB of SmolLM2's logits at its max. The batch max is 8 now (``max_batch=`` changes it), the
    sequence the model's positions capped at ``max_dim``; the compile report says the profile built, and ``lowbit
    inspect`` the default one of an ONNX file before any build."""
    import types

    from typer.testing import CliRunner

    import lowbit
    import lowbit.backends.tensorrt as trt_backend
    from conftest import tiny_llama
    from lowbit.backends.onnx import save_onnx
    from lowbit.cli.main import app

    monkeypatch.setattr(trt_backend, "import_tensorrt", lambda: types.SimpleNamespace(__version__="10.0"))
    monkeypatch.setattr(trt_backend, "build_engine", _profiling_build)
    monkeypatch.setattr(trt_backend, "TensorRTRunner", _FakeRunner)
    torch.manual_seed(0)
    model = tiny_llama(max_positions=8192)
    built = lowbit.compile_model(model, backend="tensorrt")
    assert built.runner.header.profile["input_ids"] == [[1, 1], [2, 64], [8, 4096]]
    assert "  input_ids: 1x1 / 2x64 / 8x4096" in built.report.lowering
    wider = lowbit.compile_model(model, backend="tensorrt", backend_options={"max_batch": 32, "max_dim": 1024})
    assert wider.runner.header.profile["input_ids"] == [[1, 1], [2, 64], [32, 1024]]
    with pytest.raises(LowbitError, match=r"opt=\{batch: 16\} is outside the profile of dim 'batch'.*\[1, 8\]"):
        lowbit.compile_model(model, backend="tensorrt", backend_options={"opt": {"batch": 16}})
    save_onnx(to_onnx(built.graph, opset=21, weight_format="qdq", attention="decompose"), tmp_path / "model.onnx")
    shown = CliRunner().invoke(app, ["inspect", str(tmp_path / "model.onnx")], terminal_width=200)
    assert shown.exit_code == 0, shown.output
    rows = [line.split("│")[1:-1] for line in shown.output.splitlines() if line.startswith("│ batch")
            or line.startswith("│ sequence")]
    assert [[c.strip() for c in r] for r in rows] == [["batch", "s0", "[1, 1024]", "1", "2", "8"],
                                                      ["sequence", "s1", "[1, 8192]", "1", "64", "4096"]]


def test_a_generation_step_graph_profile_is_its_spec_tuned_for_decode(tensorrt_here):
    """A step graph compiled with ``GenerationSpec(max_length=128, max_batch=2)`` got an engine profile of batch max 3
    (export wants a dynamic max above 2, the capture range said 3), tuned for a 3-token call over 1 cache slot (the
    capture example's sizes): ``generate`` passes the whole cache of ``max_length`` slots every call, and one token
    per decode step. The profile is the spec's now: batch at most 2, one token over 128 slots at its optimum."""
    import lowbit
    from conftest import tiny_llama
    from lowbit.backends.tensorrt import TensorRTOptionError
    from lowbit.generate import GenerationSpec

    torch.manual_seed(0)
    graph = lowbit.compile_model(tiny_llama(heads=4, kv_heads=2, max_positions=256),
                                 generation=GenerationSpec(max_length=128, max_batch=2)).graph
    profile = profile_from_symbols(to_onnx(graph, opset=21, weight_format="qdq", attention="decompose"))
    assert profile["input_ids"] == profile["positions"] == ([1, 1], [2, 1], [2, 128])
    caches = graph.inputs[2:]
    assert caches and all(profile[c.name] == ([1, kv, 1, hd], [2, kv, 128, hd], [2, kv, 128, hd])
                          for c in caches for _, kv, _, hd in [c.type.shape])
    with pytest.raises(TensorRTOptionError, match=r"opt=\{batch: 3\} is outside the profile of dim 'batch'.*\[1, 2\]"):
        TensorRTCompiled(graph, opt={"batch": 3})


@pytest.mark.parametrize("hidden, fix", [(192, "group_fallback=64 (128 does not divide input size 192)"),
                                         (96, "neither 64 nor 128 divides input size 96: keep these linears float")])
def test_the_int4_block_fix_names_only_groups_that_divide_the_linears(hidden, fix, tensorrt_here):
    """``quantize(w=int4,group=128,group_fallback=32)`` on 192-wide linears was told "group_fallback=64 or
    group_fallback=128": 128 is the group that did not divide 192 in the first place, and the quantize pass refuses
    it as a fallback. The fix names the TensorRT block sizes that divide the linears' input sizes (none: keep them
    float), before any pass runs and in the exported ONNX's checker alike."""
    import lowbit
    from conftest import tiny_llama
    from lowbit.backends.registry import BackendError
    from lowbit.backends.tensorrt import check_tensorrt_qdq, errors

    def model():
        torch.manual_seed(0)
        return tiny_llama(hidden=hidden, inter=256, heads=4, kv_heads=2, vocab=49152, max_positions=64)

    import re

    pipeline = "quantize(w=int4,group=128,group_fallback=32)"
    with pytest.raises(BackendError, match=re.escape(fix) + r"[^\n]* \(rule int4-block-size\)"):
        lowbit.compile_model(model(), pipeline=pipeline, backend="tensorrt", tokenizer="smollm2")
    graph = lowbit.compile_model(model(), pipeline=pipeline).graph
    found = errors(check_tensorrt_qdq(to_onnx(graph, opset=21, weight_format="qdq", attention="decompose")))
    assert found and all(v.rule == "int4-block-size" and fix.replace("_fallback", "") in v.message for v in found)
    if hidden == 192:  # the fix it names builds: group=64 everywhere
        ok = lowbit.compile_model(model(), pipeline="quantize(w=int4,group=64)").graph
        assert not errors(check_tensorrt_qdq(to_onnx(ok, opset=21, weight_format="qdq", attention="decompose")))


def test_compile_to_a_directory_with_tensorrt_keeps_the_onnx_the_engine_was_built_from(tensorrt_here, monkeypatch,
                                                                                      tmp_path):
    """``lowbit compile -b tensorrt -o OUT`` wrote model.engine alone: an engine runs only on the TensorRT version and
    GPU that built it ("Engines are tied to the TensorRT version: rebuild it"), and OUT held nothing to rebuild it
    from. OUT/model.onnx is the Q/DQ-checked ONNX the engine was built from: TensorRT's rules hold on it, its default
    profile is the engine's, and ONNX Runtime runs it as the compiled graph computes."""
    import types

    from typer.testing import CliRunner

    import lowbit
    import lowbit.backends.tensorrt as trt_backend
    from conftest import tiny_llama
    from lowbit.backends.tensorrt import check_tensorrt_qdq, errors
    from lowbit.calibration.data import load_tokenizer
    from lowbit.cli.main import app
    from lowbit.export import load

    monkeypatch.setattr(trt_backend, "import_tensorrt", lambda: types.SimpleNamespace(__version__="10.0"))
    monkeypatch.setattr(trt_backend, "build_engine", _profiling_build)
    monkeypatch.setattr(trt_backend, "TensorRTRunner", _FakeRunner)
    torch.manual_seed(0)
    # not "tiny": the in-process CLI caches models by path, and pytest hands the last test's removed tmp_path out again
    model_dir = tmp_path / "tiny-128"
    tiny_llama(hidden=128, inter=256, heads=4, kv_heads=2, vocab=49152, max_positions=64).save_pretrained(model_dir)
    load_tokenizer("smollm2").save_pretrained(model_dir)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["compile", str(model_dir), "-b", "tensorrt", "-p", "quantize(w=int4,group=64)",
                                      "-o", str(out), "-q"])
    assert result.exit_code == 0, result.output
    assert (out / "model.engine").is_file() and (out / "model.onnx").is_file()
    assert not errors(check_tensorrt_qdq(out / "model.onnx"))
    from lowbit.backends.onnx import load_onnx

    header = read_engine(out / "model.engine")[1]
    assert header.profile == {k: [list(s) for s in v] for k, v in profile_from_symbols(
        load_onnx(out / "model.onnx", check=False)).items()}
    ids = torch.randint(0, 49152, (1, 9))
    torch.testing.assert_close(load(out / "model.onnx")(ids), lowbit.load(out)(ids), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="model.engine is the TensorRT engine in it, .*model.onnx is the ONNX file"):
        load(out)


def test_compile_help_says_what_out_holds_for_each_runtime_backend():
    """``lowbit compile --help`` said -o holds "model.lowbit, params.safetensors, report.json": not the model.onnx that
    -b onnxruntime writes, nor -b tensorrt's model.engine (and the ONNX it was built from), the files a deployment
    engineer runs. It names them, and --backend-option gives a TensorRT option beside torch's."""
    from typer.main import get_command

    from lowbit.cli.main import app

    params = get_command(app).commands["compile"].params  # type: ignore[attr-defined]
    out, option = (" ".join(next(p.help for p in params if flag in p.opts).split())
                   for flag in ("--out", "--backend-option"))
    assert "model.onnx with -b onnxruntime" in out and "model.engine and the model.onnx it was built from with -b " \
        "tensorrt" in out
    assert "max_batch=16 on tensorrt" in option


class _OrtPlanRunner:
    """Stands in for TensorRTRunner where TensorRT is absent: the "plan" is the ONNX the engine would be built from
    (``_onnx_plan_build``), run by ONNX Runtime, so an engine file's round trip computes what the graph does."""

    def __init__(self, plan: bytes, header: EngineHeader | None = None, where: str = "<memory>") -> None:
        import onnxruntime as ort

        self.session = ort.InferenceSession(plan, providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.device = torch.device("cpu")

    def __call__(self, *args: torch.Tensor) -> list[torch.Tensor]:
        outs = self.session.run(None, {n: a.numpy() for n, a in zip(self.inputs, args)})
        return [torch.from_numpy(o) for o in outs]


def _onnx_plan_build(path, **kw):
    header = _profiling_build(path, **kw)[1]
    return path.read_bytes(), header


def test_an_exported_step_graph_engine_loads_back_with_generate(tensorrt_here, monkeypatch, tmp_path):
    """``lowbit.export(compiled, "m.engine", format="tensorrt")`` of a ``generation=`` compile wrote an engine whose
    header kept none of the generation meta the ONNX export records: ``lowbit.export.load`` gave a module without
    ``generate()``, and refused ``tokenizer=``. The header records it now, and the loaded engine generates what the
    compiled model does (the engine run by ONNX Runtime here, from the very ONNX TensorRT would build it from)."""
    import types

    import lowbit
    import lowbit.backends.tensorrt as trt_backend
    from conftest import tiny_llama
    from lowbit.generate import GenerationSpec

    monkeypatch.setattr(trt_backend, "import_tensorrt", lambda: types.SimpleNamespace(__version__="10.0"))
    monkeypatch.setattr(trt_backend, "build_engine", _onnx_plan_build)
    monkeypatch.setattr(trt_backend, "TensorRTRunner", _OrtPlanRunner)
    torch.manual_seed(0)
    compiled = lowbit.compile_model(tiny_llama(heads=4, kv_heads=2, max_positions=64, vocab=101),
                                    pipeline="quantize(w=int8)", generation=GenerationSpec(max_length=32, max_batch=2))
    path = lowbit.export(compiled, tmp_path / "m.engine", format="tensorrt")
    assert read_engine(path)[1].extra["lowbit.generation"]["max_length"] == 32
    loaded = lowbit.export.load(path)
    want = compiled.generate([[3, 4, 5], [7, 8]], 6, stop_tokens=()).tokens
    assert loaded.generate([[3, 4, 5], [7, 8]], 6, stop_tokens=()).tokens == want
    plain = lowbit.export(lowbit.compile_model(tiny_llama(vocab=101)), tmp_path / "p.engine", format="tensorrt")
    assert not hasattr(lowbit.export.load(plain), "generate")


def test_lowbit_inspect_says_an_engine_is_a_generation_step_graph(tmp_path):
    """An exported step graph's engine records its generation meta (max_length, max_batch, ...) in its header, but
    ``lowbit inspect`` showed it as any engine: nothing said that it generates, or up to what length and batch."""
    from typer.testing import CliRunner

    from lowbit.cli.main import app

    header = _header()
    header.extra = {"lowbit.generation": {"max_length": 256, "max_batch": 4}}
    write_engine(tmp_path / "step.engine", b"plan" * 10, header)
    write_engine(tmp_path / "plain.engine", b"plan" * 10, _header())
    shown = [" ".join(CliRunner().invoke(app, ["inspect", str(tmp_path / f)]).output.split())
             for f in ("step.engine", "plain.engine")]
    assert "a generation step graph (max_length 256, max_batch 4): lowbit.export.load gives it generate()" in shown[0]
    assert "generation" not in shown[1]


def test_the_engine_runner_enqueues_without_a_host_sync_so_a_cuda_graph_can_capture_it(monkeypatch):
    """TensorRTRunner ended each call with stream.synchronize(): generate's decode step, captured into a CUDA graph on
    CUDA (``_CudaGraphStep``), called it inside the capture, where a host sync fails ("operation not permitted when
    stream is capturing"). The call now only enqueues on torch's current stream; what reads the outputs is ordered
    after it there."""
    from lowbit.backends.tensorrt.engine import TensorRTRunner

    class CapturingStream:
        cuda_stream = 1234

        def synchronize(self) -> None:
            raise RuntimeError("operation not permitted when stream is capturing")

    class Context:
        def __init__(self) -> None:
            self.addresses: dict[str, int] = {}
            self.enqueued: list[int] = []

        def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
            return True

        def get_tensor_shape(self, name: str) -> tuple[int, ...]:
            return (1, 3, 8)

        def set_tensor_address(self, name: str, address: int) -> None:
            self.addresses[name] = address

        def execute_async_v3(self, stream: int) -> bool:
            self.enqueued.append(stream)
            return True

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: CapturingStream())
    runner = TensorRTRunner.__new__(TensorRTRunner)
    runner.inputs, runner.outputs, runner.context, runner.header = ["input_ids"], ["logits"], Context(), None
    runner.device = torch.device("cpu")  # stands in for the GPU: the runner makes its tensors on its device
    runner._torch_dtype = lambda name: torch.int64 if name == "input_ids" else torch.float32
    (logits,) = runner(torch.ones(1, 3, dtype=torch.long))
    assert runner.context.enqueued == [1234] and logits.shape == (1, 3, 8)
    assert runner.context.addresses["logits"] == logits.data_ptr()


def test_a_tensorrt_model_has_the_device_its_engine_runs_on_and_generates_there(tensorrt_here, monkeypatch, tmp_path):
    """TensorRTCompiled had no ``device`` (every other compiled runner has one): ``generate`` on a TensorRT compile,
    or on an engine loaded with ``lowbit.export.load``, made its KV cache on the CPU and never replayed a CUDA graph,
    while the engine ran on the GPU."""
    import types

    import lowbit
    import lowbit.backends.tensorrt as trt_backend
    from conftest import tiny_llama
    from lowbit.generate import GenerationSpec

    class OnSecondGpu(_OrtPlanRunner):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.device = torch.device("cuda", 1)

    monkeypatch.setattr(trt_backend, "import_tensorrt", lambda: types.SimpleNamespace(__version__="10.0"))
    monkeypatch.setattr(trt_backend, "build_engine", _onnx_plan_build)
    monkeypatch.setattr(trt_backend, "TensorRTRunner", OnSecondGpu)
    model = tiny_llama(heads=4, kv_heads=2, max_positions=64, vocab=101)
    compiled = lowbit.compile_model(model, backend="tensorrt", generation=GenerationSpec(max_length=16, max_batch=1))
    assert compiled.runner.device == torch.device("cuda", 1)
    assert compiled._step_generator().device == torch.device("cuda", 1)
    monkeypatch.setattr(trt_backend, "TensorRTRunner", _OrtPlanRunner)
    path = lowbit.export(lowbit.compile_model(model, generation=GenerationSpec(max_length=16, max_batch=1)),
                         tmp_path / "m.engine", format="tensorrt")
    monkeypatch.setattr(trt_backend, "TensorRTRunner", OnSecondGpu)
    assert lowbit.export.load(path).generator.device == torch.device("cuda", 1)


def test_a_profile_cap_below_a_dim_s_least_size_is_refused_before_any_pass_runs(tensorrt_here):
    """A model captured for 32 to 64 tokens with ``max_dim=16`` got a profile of [32, 32, 32] without a word (the
    max was raised to the min): an engine that took only 32-token calls. The cap is refused, naming the dim, its
    range and the option, before the first pass (and by the build's own profile)."""
    import lowbit
    from conftest import tiny_llama
    from lowbit.backends.registry import BackendError
    from lowbit.backends.tensorrt import TensorRTOptionError
    from lowbit.models import CausalLMLogits

    torch.manual_seed(0)
    model = CausalLMLogits(tiny_llama(max_positions=64)).eval()
    example = (torch.ones(1, 40, dtype=torch.long),)
    dynamic = {"input_ids": {1: torch.export.Dim.DYNAMIC(min=32, max=64)}}
    passes_run = _PassesRun()
    match = r"profile of dim 'sequence': max_dim=16 is below its least size 32 .*\[32, 64\].*give max_dim >= 32"
    with pytest.raises((BackendError, TensorRTOptionError), match=match):
        lowbit.compile_model(model, example, dynamic_shapes=dynamic, pipeline="fold-norms,dce", backend="tensorrt",
                             backend_options={"max_dim": 16}, instruments=[passes_run])
    assert passes_run.started == []
    graph = lowbit.compile_model(model, example, dynamic_shapes=dynamic).graph
    onnx_model = to_onnx(graph, opset=21, weight_format="qdq", attention="decompose")
    with pytest.raises(TensorRTOptionError, match=match):
        profile_from_symbols(onnx_model, max_default=16)
    assert profile_from_symbols(onnx_model, max_default=48)["input_ids"] == ([1, 32], [1, 40], [1, 48])
    # shapes= for the input sets that dim itself: no default profile to cap
    from lowbit.backends.tensorrt import check_graph_options

    check_graph_options(graph, {"max_dim": 16, "shapes": {"input_ids": ((1, 32), (1, 40), (1, 64))}})


@pytest.mark.parametrize("pipeline, fix, fixed", [
    ("quantize(w=fp8e4m3,a=fp8e4m3,a_group=64)", "a_static=true,a_gran=per_tensor (calibrated), dropping a_group=64",
     f"quantize(w=fp8e4m3,a=fp8e4m3,a_static=true,a_gran=per_tensor,{CALIB_TRT})"),
    (f"quantize(w=int4,group=64,a=int4,a_static=true,a_gran=per_tensor,{CALIB_TRT})", "a=int8 or a=fp8e4m3",
     f"quantize(w=int4,group=64,a=int8,a_static=true,a_gran=per_tensor,{CALIB_TRT})"),
])
def test_each_tensorrt_refusal_names_options_that_make_the_pipeline_build(pipeline, fix, fixed, tensorrt_here):
    """The refusals said what TensorRT wants, not always how to ask for it: "a_gran=per_tensor" for per-token groups
    of 64, which the quantize pass then refused for the a_group=64 left over; "quantize activations to int8 or
    fp8e4m3" for int4 activations, naming no option. Each names the options now, and the pipeline written with them
    passes both the quantize pass and TensorRT's rules."""
    from lowbit.api import plan_compile
    from lowbit.backends.registry import BackendError
    from lowbit.passes.manager import parse_pipeline

    with pytest.raises(BackendError) as refused:
        plan_compile(parse_pipeline(pipeline), "tensorrt")
    assert fix in " ".join(str(refused.value).split())
    plan_compile(parse_pipeline(fixed), "tensorrt")


def test_a_tensorrt_refusal_names_the_recipes_tensorrt_builds_and_each_builds(trt_llama, tensorrt_here):
    """No recipe was TensorRT-ready (every one had zero points, dynamic or per-token activations or grouped FP8):
    `-b tensorrt -r w4a16-g64` was refused with the rules alone. The trt-* recipes are, and the refusal names them;
    each one's ONNX breaks none of TensorRT's rules."""
    import re

    from lowbit.api import plan_compile, resolve_pipeline
    from lowbit.backends.registry import BackendError
    from lowbit.backends.tensorrt import check_tensorrt_qdq, errors
    from lowbit.passes.manager import PassManager
    from lowbit.recipes import RECIPES

    with pytest.raises(BackendError) as refused:
        plan_compile(resolve_pipeline(None, "w4a16-g64"), "tensorrt")
    named = re.search(r"use a recipe tensorrt runs \(([^:]+): `lowbit recipes`\)", str(refused.value))
    assert named, str(refused.value)
    recipes = named.group(1).split(", ")
    assert {"trt-w4a16", "trt-w8a8", "trt-fp8"} <= set(recipes)
    for name in recipes:
        calibrates = "a_static=true" in RECIPES[name].pipeline or "smooth-quant" in RECIPES[name].pipeline
        passes = resolve_pipeline(None, name, {"calib_n": 2, "calib_len": 16} if calibrates else None)
        plan_compile(passes, "tensorrt")
        graph = trt_llama.clone()
        PassManager(passes).run(graph)
        found = errors(check_tensorrt_qdq(to_onnx(graph, opset=21, weight_format="qdq", attention="decompose")))
        assert not found, (name, found[:3])


def test_engine_header_is_read_without_the_plan(tmp_path, monkeypatch):
    """``lowbit.export.load`` asks an engine file for its generation meta before ``TensorRTCompiled.load`` reads and
    hashes the plan: the question read and hashed the whole plan too (twice the I/O of a multi-GB engine). The
    header reader reads the header alone: the same header as ``read_engine``'s, from a file whose plan is damaged
    or never read, and the same refusals of a file that has no header to give."""
    import lowbit.export as lowbit_export
    from lowbit.backends.tensorrt.engine_file import read_engine_header

    path = write_engine(tmp_path / "m.engine", b"x" * 10_000, _header())
    assert read_engine_header(path) == read_engine(path)[1]
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    monkeypatch.setattr(Path, "read_bytes", lambda self: pytest.fail(f"read the whole of {self}"))
    header = read_engine_header(path)
    assert header is not None and header.inputs == ["input_ids"] and header.plan_bytes == 10_000
    monkeypatch.undo()
    meta = {"eos_token_ids": [2], "max_length": 32, "max_batch": 2, "n_layers": 1, "kv_heads": 2, "head_dim": 16,
            "cache_inputs": ["k_0", "v_0"], "cache_dtype": "float32"}
    step = write_engine(tmp_path / "step.engine", b"y" * 1_000, EngineHeader(
        0, "", "10.9.0", inputs=["input_ids"], outputs=["logits"], extra={"lowbit.generation": meta}))
    monkeypatch.setattr(Path, "read_bytes", lambda self: pytest.fail(f"read the whole of {self}"))
    assert lowbit_export._engine_generation(step)["max_length"] == 32  # what export.load asks before the load
    monkeypatch.undo()
    (tmp_path / "trtexec.plan").write_bytes(b"\x01\x02plan")
    assert read_engine_header(tmp_path / "trtexec.plan") is None
    path.write_bytes(bytes(data[:30]))
    with pytest.raises(EngineFileError, match="truncated"):
        read_engine_header(path)
    with pytest.raises(EngineFileError, match="no TensorRT engine file at"):
        read_engine_header(tmp_path / "nope.engine")


def test_an_exported_step_engine_refuses_a_stop_token_past_its_vocabulary_before_the_prefill(
        tensorrt_here, monkeypatch, tmp_path):
    """An exported step graph's engine header held no vocabulary size, so ``generate(stop_tokens=[id past it])`` on
    ``lowbit.export.load``'s engine ran every prompt's prefill before the refusal (the ONNX file declares its logits'
    width and refused first). The header records it now, and the refusal comes before any work; an engine written
    before (no such key) still generates and refuses after its prefill, and a damaged value is named."""
    import types

    import lowbit
    import lowbit.backends.tensorrt as trt_backend
    from conftest import tiny_llama
    from lowbit.generate import GenerationError, GenerationSpec

    monkeypatch.setattr(trt_backend, "import_tensorrt", lambda: types.SimpleNamespace(__version__="10.0"))
    monkeypatch.setattr(trt_backend, "build_engine", _onnx_plan_build)
    monkeypatch.setattr(trt_backend, "TensorRTRunner", _OrtPlanRunner)
    torch.manual_seed(0)
    compiled = lowbit.compile_model(tiny_llama(heads=4, kv_heads=2, max_positions=64, vocab=101),
                                    generation=GenerationSpec(max_length=32, max_batch=2))
    path = lowbit.export(compiled, tmp_path / "m.engine", format="tensorrt")
    plan, header = read_engine(path)
    assert header.extra["lowbit.vocab_size"] == 101
    loaded = lowbit.export.load(path)
    prefills = []
    real = loaded.generator._prefill
    monkeypatch.setattr(loaded.generator, "_prefill", lambda *a: prefills.append(1) or real(*a))
    with pytest.raises(GenerationError, match=r"stop_tokens: 101 is outside the vocabulary \(101 logits"):
        loaded.generate([[3, 4, 5]], 4, stop_tokens=[101])
    assert not prefills
    want = compiled.generate([[3, 4, 5], [7, 8]], 4, stop_tokens=()).tokens
    assert loaded.generate([[3, 4, 5], [7, 8]], 4, stop_tokens=()).tokens == want
    del header.extra["lowbit.vocab_size"]  # as an engine written before the key
    old = lowbit.export.load(write_engine(tmp_path / "old.engine", plan, header))
    assert old.generate([[3, 4, 5], [7, 8]], 4, stop_tokens=()).tokens == want
    with pytest.raises(GenerationError, match=r"stop_tokens: 101 is outside the vocabulary \(101 logits"):
        old.generate([[3, 4, 5]], 4, stop_tokens=[101])
    header.extra["lowbit.vocab_size"] = "101"
    with pytest.raises(EngineFileError, match=r"engine header 'lowbit.vocab_size' is '101': expected a positive"):
        lowbit.export.load(write_engine(tmp_path / "bad.engine", plan, header))


@pytest.fixture(autouse=True)
def _one_export_per_model(reuse_captures: object) -> None:
    """Every test here captures through the session's capture cache (conftest's ``reuse_captures``): the same tiny
    model compiled or reloaded again is not exported again."""
