"""The backend contract (``lowbit.backends.registry``) and the one compile driver (``lowbit.api.compile_graph``).

A backend declares the ops it lowers and the passes it needs before lowering; the driver checks the pipeline
against it before capture, runs the backend's passes after the user's, and lowers. The torch reference keeps
today's behaviour (packed weights dequantized once at lowering) unless ``keep_packed=True``, which keeps the
packed weights as the module's buffers and dequantizes per call — the same numbers.
"""

from __future__ import annotations

import re

import pytest
import torch
from typer.testing import CliRunner

import lowbit
from lowbit.api import compile_graph, compile_model, plan_compile
from lowbit.backends import registry
from lowbit.backends.registry import BackendError, get_backend, register_backend
from lowbit.backends.torch_backend import TorchCompiled
from lowbit.ir.parser import parse_graph
from lowbit.passes.manager import PassManager, PipelineError, parse_pipeline

LINEAR = """graph main(%x: f32[1,s0,64]) {
  symbol s0 in [2, 64] hint 4
  param @fc.weight: f32[8,64]
  %y: f32[1,s0,8] = linear(%x, @fc.weight)  # fc
  return %y
}
"""


def _linear_graph():
    return parse_graph(LINEAR, {"fc.weight": torch.randn(8, 64, generator=torch.Generator().manual_seed(0))})


def test_a_backend_that_cannot_run_fails_before_the_model_is_read(monkeypatch):
    # not built: declared with lower=None; its error says what to use instead
    monkeypatch.setattr(registry, "BACKENDS", dict(registry.BACKENDS))
    register_backend("future", None, not_built="use backend='torch' or 'onnxruntime' for now")
    assert not get_backend("future").built
    with pytest.raises(BackendError, match="not built yet.*backend='torch'.*'onnxruntime'"):
        compile_model("no-such-model", pipeline="dce", backend="future")
    # triton without CUDA (and without the interpreter the kernel tests use): checked before the model is loaded
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert get_backend("triton").built and get_backend("triton").passes == "fuse-qlinear,merge-linears,fuse-norm-quant"
    with pytest.raises(BackendError, match="cannot run here: .*CUDA GPU.*backend='torch'.*'onnxruntime'"):
        compile_model("no-such-model", pipeline="dce", backend="triton")
    # a GPU but device='cpu' (`lowbit generate -b triton` without --device cuda): was a RuntimeError from the
    # lowering, after capture and calibration (exit 1 with a traceback); now before the model is read, as for no GPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for device in ("cpu", "cpu:0"):
        with pytest.raises(BackendError, match=f"cannot run here: .*run on CUDA, not on device='{device}': give "
                                               "device='cuda' \\(CLI: --device cuda\\)"):
            compile_model("no-such-model", pipeline="dce", backend="triton", device=device)
    with pytest.raises(BackendError, match="run on CUDA, not on device='cpu'"):
        lowbit.load("no-such-dir", backend="triton", device="cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(BackendError, match="unknown backend 'onnxrt' \\(did you mean 'onnxruntime'\\?\\); known: "
                                           "torch, onnxruntime, tensorrt, triton"):
        compile_model("no-such-model", backend="onnxrt")
    with pytest.raises(BackendError, match="backend torch: option keep_packd: Extra inputs.*options are: keep_packed"):
        compile_model("no-such-model", backend="torch", backend_options={"keep_packd": True})
    with pytest.raises(BackendError, match="backend triton: option cuda_graph:.*options are: .*compile, cuda_graphs"):
        compile_model("no-such-model", backend="triton", backend_options={"cuda_graph": True})
    # an option that only another option turns on was silently ignored (cuda_graphs without torch.compile ran eagerly)
    with pytest.raises(BackendError, match="backend triton: option cuda_graphs=true applies only with compile=true, "
                                           "and compile is false"):
        compile_model("no-such-model", backend="triton", backend_options={"compile": False, "cuda_graphs": True})
    with pytest.raises(BackendError, match="option sparse_library=cutlass applies only with semi_structured=true"):
        compile_model("no-such-model", backend="torch", backend_options={"sparse_library": "cutlass"})
    for backend in ("torch", "triton"):  # the defaults said out loud are fine
        get_backend(backend).parse_options({"sparse_library": "auto", "semi_structured": False})
    get_backend("triton").parse_options({"compile": False, "cuda_graphs": False})
    # ONNX lowering options ORT would refuse at session creation, after capture and calibration: refused up front
    with pytest.raises(BackendError, match="backend onnxruntime: accuracy_level must be an integer from 0 to 4 .*, got "
                                           "9"
                                           "; options are: accuracy_level"):
        compile_model("no-such-model", backend="onnxruntime", backend_options={"accuracy_level": 9})
    with pytest.raises(BackendError, match="backend onnxruntime: opset 99 is newer"):
        compile_model("no-such-model", backend="onnxruntime", backend_options={"opset": 99})
    with pytest.raises(BackendError, match="attention='onnx' needs opset 23"):
        compile_model("no-such-model", backend="onnxruntime", backend_options={"opset": 21, "attention": "onnx"})


def test_each_backend_declares_what_it_lowers_and_runs_first():
    ort, torch_b = get_backend("onnxruntime"), get_backend("torch")
    assert ort.passes == "fuse-qlinear" and torch_b.passes == ""
    assert ort.lowers("qlinear") and ort.lowers("rms_norm") and not ort.lowers("aten.not_an_op.default")
    assert torch_b.lowers("qlinear") and torch_b.lowers("aten.mul.Tensor") and not torch_b.lowers("no_such_op")


def test_registering_a_backend_is_one_call_and_the_driver_runs_its_passes(monkeypatch):
    monkeypatch.setattr(registry, "BACKENDS", dict(registry.BACKENDS))
    register_backend("fused-torch", "lowbit.backends.torch_backend:lower", passes="fuse-qlinear",
                     options=registry.TorchBackendOptions,
                     summary="a test backend: torch reference over fused qlinear nodes")
    g = _linear_graph()
    plan = plan_compile(parse_pipeline("quantize(w=int4,group=32)"), "fused-torch", {"keep_packed": True})
    runner, report = compile_graph(g, plan)
    assert [r.name for r in report.pipeline.records] == ["quantize", "fuse-qlinear"]  # the backend's pass last
    assert report.backend == "fused-torch" and [n.op for n in g.nodes] == ["qlinear"]
    assert isinstance(runner, TorchCompiled) and runner.keep_packed
    x = torch.randn(1, 5, 64)
    unfused = _linear_graph()
    PassManager("quantize(w=int4,group=32)").run(unfused)
    assert torch.equal(runner(x), TorchCompiled(unfused)(x))


def test_keep_packed_keeps_packed_weights_on_the_device_with_the_same_numbers():
    g = _linear_graph()
    PassManager("quantize(w=int4,group=32,sym=false)").run(g)
    x = torch.randn(1, 6, 64)
    default, packed = TorchCompiled(g), TorchCompiled(g, keep_packed=True)
    assert {b.dtype for b in default.gm.buffers()} == {torch.float32}  # today's behaviour: weights unpacked once
    assert torch.uint8 in {b.dtype for b in packed.gm.buffers()}  # the packed codes are what the module holds
    held = {name: sum(b.numel() * b.element_size() for b in m.gm.buffers()) for name, m in
            (("default", default), ("packed", packed))}
    assert held["packed"] < held["default"] / 3, held  # 4-bit codes + scales vs float32 weights
    assert torch.equal(default(x), packed(x))
    PassManager("fuse-qlinear").run(g)  # a fused graph: materialization unfuses, keep_packed runs qlinear
    assert torch.equal(TorchCompiled(g)(x), packed(x)) and torch.equal(TorchCompiled(g, keep_packed=True)(x),
                                                                       packed(x))


def test_the_compile_report_says_the_torch_module_holds_float_weights():
    """The summary's "params A -> B MiB" is the graph's stored form; by default the torch module runs on float copies
    of the quantized weights (the size of the float model), which no line of the report said."""
    g = _linear_graph()
    PassManager("quantize(w=int4,group=32,sym=false)").run(g)
    runner, report = compile_graph(g, plan_compile([], "torch"))
    assert runner.buffer_bytes == 8 * 64 * 4  # the float32 weight; the codes stay in the graph
    assert report.lowering == [f"torch: 1 quantized weights dequantized at lowering: the module holds 0.0 MiB (the "
                               f"graph's stored form: 0.0 MiB); keep_packed=true runs on the stored form"]
    assert report.lowering[0] in report.summary()
    packed, report = compile_graph(g, plan_compile([], "torch", {"keep_packed": True}))
    assert report.lowering == [] and packed.buffer_bytes == g.param_bytes()
    assert compile_graph(_linear_graph(), plan_compile([], "torch"))[1].lowering == []  # a float graph: nothing


def test_cli_compile_takes_backend_options_through_the_same_driver(monkeypatch):
    from lowbit.cli.main import app

    bad = CliRunner().invoke(app, ["compile", "smollm2:1", "-p", "dce", "--backend-option", "keep_packd=true"])
    assert bad.exit_code != 0 and "option keep_packd" in bad.output
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    triton = CliRunner().invoke(app, ["compile", "smollm2:1", "-p", "dce", "-b", "triton"])
    assert triton.exit_code == 2 and "use -b torch" in triton.output  # the command's flag, not backend='torch'


def test_compile_model_takes_a_list_of_passes_and_pipeline_texts_and_refuses_other_types():
    """pipeline=["quantize(w=int4)"] raised AttributeError "'str' object has no attribute 'name'" and pipeline=123
    a TypeError from list(): a list may mix Pass objects and texts; anything else is a PassError naming it."""
    from conftest import tiny_llama

    from lowbit.api import resolve_pipeline
    from lowbit.passes.base import PassError
    from lowbit.passes.dce import DeadCodeElimination

    passes = resolve_pipeline(["fold-norms", "quantize(w=int4,group=32)", DeadCodeElimination()], None)
    assert [p.spec() for p in passes] == ["fold-norms", "quantize(w=int4,group=32)", "dce"]
    with pytest.raises(PassError, match="pipeline= takes pipeline text or a list of passes, got int"):
        resolve_pipeline(123, None)  # type: ignore[arg-type]
    with pytest.raises(PassError, match=r"pipeline\[1\] is int 7: give Pass objects or pipeline text"):
        resolve_pipeline(["dce", 7], None)  # type: ignore[list-item]
    with pytest.raises(PassError, match="must come after"):  # order checked across the list's items
        resolve_pipeline(["fuse-qlinear", "quantize(w=int8)"], None)
    model = tiny_llama(vocab=49152)
    ids = torch.randint(0, 100, (2, 8))
    compiled = compile_model(model, (ids,), pipeline=["quantize(w=int4,group=32)"])
    assert compiled.report.pipeline.records[0].stats["weights_quantized"] == 7


def test_a_recipe_that_is_not_a_name_is_refused_naming_its_type():
    """recipe=3 raised AttributeError "'int' object has no attribute 'lower'" from the closest-name search, and
    recipe=["w4a16-g64"] a TypeError (unhashable list)."""
    from lowbit.api import resolve_pipeline
    from lowbit.passes.base import PassError

    for bad, shown in ((3, "int 3"), (["w4a16-g64"], "list ['w4a16-g64']")):
        with pytest.raises(PassError, match=rf"recipe= takes a recipe name such as 'w4a16-g64' .*got "
                                            rf"{re.escape(shown)}"):
            resolve_pipeline(None, bad)  # type: ignore[arg-type]
    assert [p.name for p in resolve_pipeline(None, "w4a16-g64")] == ["quantize"]


def test_a_device_lowbit_cannot_run_on_is_refused_before_capture():
    """device='meta' failed in lowering with torch's 'Tensor.item() cannot be called on meta tensors'."""
    from conftest import tiny_llama

    from lowbit.errors import DeviceError

    with pytest.raises(DeviceError, match="device='meta': lowbit runs models on 'cpu' or 'cuda'"):
        compile_model(tiny_llama(), pipeline="quantize(w=int4,group=32)", device="meta")
    with pytest.raises(PipelineError, match="option device='meta'.*calibration runs on cpu or cuda"):
        PassManager("gptq(w=int4,group=32,calib_n=1,calib_len=8,progress=false,device=meta)").run(_linear_graph())


def test_compile_model_leaves_the_callers_training_flags_as_they_were():
    """The causal-LM wrappers capture in eval mode, and .eval() on them switched the caller's model (every
    submodule) to eval for good; the flags are put back, mixed ones included, in logits and generation mode."""
    from conftest import tiny_llama

    from lowbit.generate import GenerationSpec

    for generation in (None, GenerationSpec(max_length=16, max_batch=1)):
        model = tiny_llama().train()
        model.model.layers[0].mlp.eval()
        compile_model(model, pipeline="quantize(w=int8)", generation=generation)
        assert model.training and model.model.layers[0].self_attn.training
        assert not model.model.layers[0].mlp.training


def test_a_lone_example_tensor_is_the_one_positional_input():
    """compile_model(model, ids) split the [2, 8] tensor into two positional arguments (tuple(ids)) and capture
    failed with 'too many positional arguments'."""
    from conftest import tiny_llama

    model = tiny_llama(vocab=61)
    ids = torch.randint(0, 61, (2, 8))
    compiled = compile_model(model, ids, pipeline="quantize(w=int8)")
    assert torch.equal(compiled(ids), compile_model(model, (ids,), pipeline="quantize(w=int8)")(ids))


def test_compile_model_refuses_a_non_bool_verify_and_objects_that_are_not_instruments():
    """verify="no" verified (a truthy string) and instruments=[1] failed in the first pass with "'int' object has no
    attribute 'before_pass'"; both are refused before the model is read."""
    with pytest.raises(TypeError, match="verify= takes True or False, got str 'no'"):
        compile_model("no-such-model", pipeline="dce", verify="no")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"instruments\[0\] is int, not an Instrument"):
        compile_model("no-such-model", pipeline="dce", instruments=[1])  # type: ignore[list-item]


def test_compile_model_takes_instruments_none_and_names_a_lone_instrument():
    """instruments=None (no instruments) and instruments=PrintIR() (one, not in a list) both failed with "object is
    not iterable"; None is now the default's empty list, and a lone instrument is named with the list to pass."""
    from conftest import tiny_llama

    from lowbit.passes.manager import PrintIR

    with pytest.raises(TypeError, match=r"instruments= takes a list of Instrument objects, got PrintIR: "
                                        r"pass \[PrintIR\(...\)\]"):
        compile_model("no-such-model", pipeline="dce", instruments=PrintIR())  # type: ignore[arg-type]
    model = tiny_llama(vocab=61)
    compiled = compile_model(model, pipeline="dce", instruments=None)  # type: ignore[arg-type]
    assert [r.spec for r in compiled.report.pipeline.records] == ["dce"]


def test_onnxruntime_without_a_kernel_for_the_opset_says_which_opset_to_use(tmp_path):
    """onnx defines opset 28, but ONNX Runtime 1.32 has no opset-28 QuantizeLinear kernel: compiling or loading
    such a model was ORT's raw NOT_IMPLEMENTED; it now names the op, the opset and the option that fixes it."""
    import lowbit
    from lowbit.backends.onnx.io import OnnxFileError
    from lowbit.export import load as load_file

    from conftest import tiny_llama

    model = tiny_llama(hidden=64, inter=128, heads=4, kv_heads=2).eval()
    ids = torch.randint(0, 60, (1, 16), generator=torch.Generator().manual_seed(0))
    try:
        compiled = compile_model(model, (ids,), pipeline="quantize(w=int8,a=int8)", backend="onnxruntime",
                                 backend_options={"opset": 28})
    except OnnxFileError as exc:
        message = str(exc)
    else:
        compiled(ids)
        pytest.skip("this onnxruntime runs opset-28 Q/DQ")
    assert "no QuantizeLinear kernel at opset 28" in message and "opset=23" in message
    torch_model = compile_model(model, (ids,), pipeline="quantize(w=int8,a=int8)")
    path = lowbit.export(torch_model, tmp_path / "m.onnx", opset=28)
    with pytest.raises(OnnxFileError, match=r"m\.onnx: this onnxruntime .* no QuantizeLinear kernel at opset 28"):
        load_file(path)


def test_onnxruntime_takes_the_large_weights_from_memory_not_the_serialized_model(monkeypatch):
    """The session was built from the whole model serialized, every weight copied into the protobuf, its bytes and
    ORT's parse of them (SmolLM2 2 layers, float: +640 MiB peak RSS over a 135 MiB model). The large weights now
    reach ORT through add_external_initializers: the bytes ORT parses name them as external data, the outputs are
    bit-identical to the serialized route, and the lowered model keeps its own tensors."""
    import onnx
    import onnx_ir as ir

    from conftest import tiny_llama
    from lowbit.backends import onnxruntime_backend as orb

    parsed: list[onnx.ModelProto] = []
    session = orb.ort.InferenceSession

    def recording(source, *args, **kwargs):  # type: ignore[no-untyped-def]
        if isinstance(source, bytes):
            parsed.append(onnx.load_from_string(source))
        return session(source, *args, **kwargs)

    monkeypatch.setattr(orb.ort, "InferenceSession", recording)
    model = tiny_llama(hidden=64, inter=128, heads=4, kv_heads=2, vocab=97).eval()
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(0))
    captured = compile_model(model, pipeline="dce").graph
    for pipeline in ("dce", "quantize(w=int4,group=32,modules=mlp),quantize(w=int8,a=int8,modules=attn)"):
        graph = captured.clone()
        PassManager(pipeline).run(graph)
        shared = orb.OrtCompiled(graph)
        monkeypatch.setattr(orb, "SHARED_MIN_BYTES", 2**62)  # every weight inside the serialized model, as before
        inline = orb.OrtCompiled(graph)
        monkeypatch.setattr(orb, "SHARED_MIN_BYTES", 1024)
        assert torch.equal(shared(ids), inline(ids)), pipeline
        external = {t.name for t in parsed[-2].graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL}
        kept = shared.onnx_model.graph.initializers
        large = {n for n, v in kept.items() if v.const_value.nbytes >= 1024 and v.const_value.dtype in
                 (ir.DataType.FLOAT, ir.DataType.INT8, ir.DataType.UINT8)}
        assert large and external == large, (pipeline, large ^ external)
        assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in parsed[-1].graph.initializer)
        assert not any(isinstance(v.const_value, ir.ExternalTensor) for v in kept.values())


def test_a_compiled_models_repr_says_what_was_compiled(tmp_path):
    """print(compiled) showed only the runner's module tree, "(gm): LowbitModule()": nothing of the backend, the
    pipeline, the inputs or the size; a reload says where it came from instead of a pipeline."""
    from conftest import tiny_llama

    model = tiny_llama(vocab=97)
    compiled = compile_model(model, pipeline="quantize(w=int4,group=32)")
    head = repr(compiled).splitlines()[1].strip()
    assert head == (f"backend='torch', pipeline='quantize(w=int4,group=32)', inputs=(input_ids: i64[s0,s1]), "
                    f"nodes={len(compiled.graph.nodes)}, params={compiled.graph.param_bytes() / 2**20:.1f} MiB")
    reloaded = lowbit.load(lowbit.save(compiled, tmp_path / "c", format="lowbit"))
    assert f"backend='torch', loaded='{tmp_path / 'c'}', inputs=(input_ids: i64[s0,s1])" in repr(reloaded)


def test_an_exported_program_compiles_on_the_inputs_it_was_exported_with():
    """compile_model takes an ExportedProgram, but without example_inputs it said "no example inputs given for
    ExportedProgram": the program records the inputs export ran on (and its dynamic dims), which are now used."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 3)).eval()
    x = torch.randn(2, 4)
    ep = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch", max=64)},))
    compiled = compile_model(ep, pipeline="quantize(w=int8)")
    assert compiled.report.pipeline.records[0].stats["weights_quantized"] == 2
    assert str(compiled.graph.inputs[0].type) == "f32[s0,4]"  # the program's dynamic batch, kept
    y = torch.randn(5, 4)
    torch.testing.assert_close(compiled(y), model(y), atol=0.05, rtol=0)  # int8 weights


def test_a_model_without_example_inputs_is_a_lowbit_error_naming_its_forward_inputs():
    """compile_model(module) for a module lowbit builds no inputs for raised a plain ValueError ending in
    'example_inputs=(...)': a caller could not tell the refusal from a bug, nor which inputs to give. It is a
    LowbitError naming the inputs forward requires, in order (defaulted ones left out), and that call compiles."""
    from lowbit.errors import LowbitError

    class Scaled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(4, 4)

        def forward(self, x: torch.Tensor, scale: torch.Tensor, shift: float = 0.0) -> torch.Tensor:
            return self.fc(x) * scale + shift

    model = Scaled().eval()
    with pytest.raises(LowbitError, match=r"no example inputs given for Scaled: .* pass example_inputs=\(x, scale\), "
                                          r"an example of each input Scaled\.forward requires"):
        compile_model(model)
    x, scale = torch.randn(2, 4), torch.randn(2, 4)
    torch.testing.assert_close(compile_model(model, (x, scale))(x, scale), model(x, scale))


def test_pass_and_backend_options_share_one_unread_check():
    """The backends' 'applies only with' refusal and the passes' 'is read only with' one were two copies of the same
    test (an option set away from its default that nothing reads); both go through lowbit.errors.unread_options, which
    compares by value (a default said out loud is no mistake) and lists every unread option in order."""
    from lowbit.backends.registry import TritonBackendOptions
    from lowbit.errors import unread_options
    from lowbit.passes.gptq import GPTQ

    triton = TritonBackendOptions.model_construct(compile=False, cuda_graphs=True, sparse_library="auto")
    assert unread_options(triton, {"cuda_graphs": "compile=true", "sparse_library": "semi_structured=true"}) == [
        ("cuda_graphs", "compile=true")]
    assert unread_options(triton, {"cuda_graphs": None}) == []
    gptq = GPTQ.Options.model_construct(n_grid=40, group_fallback=64)
    assert unread_options(gptq, {"n_grid": "awq=true", "group_fallback": "group=", "damp": "x"}) == [
        ("n_grid", "awq=true"), ("group_fallback", "group=")]


def test_lowering_does_not_fold_dead_nodes(monkeypatch):
    """``materialize_weights`` evaluated every parameter-only node, read or not: a dead weight ``dequantize`` (left
    by a rewrite before its dce) was unpacked into a float copy the module never reads. Dead nodes are not folded
    (nor removed: the lowering still checks their ops); the live ones fold as before."""
    import lowbit.backends.torch_backend as tb
    from lowbit.backends.torch_backend import materialize_weights

    g = _linear_graph()
    PassManager("quantize(w=int8)").run(g)
    dq = next(n for n in g.nodes if n.op == "dequantize")
    dead = g.make_node("dequantize", list(dq.args), dict(dq.kwargs), name="dead_dq", type=dq.output.type,
                       module="unused")
    g.insert_after(dq, dead)
    folded = []
    real = tb.fold_constants
    monkeypatch.setattr(tb, "fold_constants", lambda graph, **kw: folded.extend(real(graph, **kw)) or folded)
    lowered = materialize_weights(g)
    assert folded == ["dequantize"] and [n.op for n in lowered.nodes if n.name == "dead_dq"] == ["dequantize"]
    assert [name for name in lowered.params if name.startswith("const.unused")] == []
    x = torch.randn(1, 4, 64)
    torch.testing.assert_close(TorchCompiled(g)(x), TorchCompiled(g, keep_packed=True)(x), rtol=0, atol=0)


def test_cli_backend_refusals_give_flags_not_keyword_arguments(monkeypatch):
    """``lowbit compile -b triton`` without CUDA advised "use backend='torch' (... keep_packed=True ...)": Python
    keyword arguments the command does not take. The command says -b torch / --device cuda; the API keeps its
    words."""
    from typer.testing import CliRunner

    from lowbit.cli.main import app

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for cmd in (["compile", "no-such-model", "--pipeline", "dce", "-b", "triton"],
                ["generate", "no-such-model", "--prompt", "hi", "-b", "triton"]):
        res = CliRunner().invoke(app, cmd)
        out = " ".join(res.output.split())
        assert res.exit_code == 2 and "use -b torch (the CPU/CUDA reference) or -b onnxruntime" in out, res.output
        assert "backend=" not in out and "keep_packed" not in out, res.output
    with pytest.raises(BackendError, match="use backend='torch' .*keep_packed=True.* or backend='onnxruntime'"):
        compile_model("no-such-model", pipeline="dce", backend="triton")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    res = CliRunner().invoke(app, ["generate", "no-such-model", "--prompt", "hi", "-b", "triton", "--device", "cpu"])
    out = " ".join(res.output.split())
    assert res.exit_code == 2 and "not on --device cpu: give --device cuda, or use -b torch on the CPU" in out, out


@pytest.mark.parametrize("backend, given, meant", [("torch", "keep_packd", "keep_packed"),
                                                   ("onnxruntime", "thread", "threads"),
                                                   ("tensorrt", "workspace", "workspace_bytes"),
                                                   ("triton", "cuda_graph", "cuda_graphs")])
def test_a_misspelt_backend_option_is_refused_with_the_option_it_resembles(backend, given, meant):
    """A misspelt --backend-option was refused with the whole list of options and no pointer at the one meant (as
    pipeline options, export options and backend names have: ``did you mean``)."""
    from lowbit.backends.registry import BackendError

    with pytest.raises(BackendError, match=f"option {given}: Extra inputs are not permitted \\(did you mean "
                                           f"'{meant}'\\?\\)"):
        get_backend(backend).parse_options({given: "1"})


@pytest.fixture(autouse=True)
def _one_export_per_model(reuse_captures: object) -> None:
    """Every test here captures through the session's capture cache (conftest's ``reuse_captures``): the same tiny
    model compiled or reloaded again is not exported again."""
