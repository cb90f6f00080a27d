"""An int4 QDQ export states the ONNX Runtime session config its numbers assume, and lowbit's loader applies it:
a default ORT session fuses DequantizeLinear(int4)+MatMul into MatMulNBits with int8 activations (~1% logit
drift measured on SmolLM2 slices); with the recorded entry the export matches the torch reference."""

from __future__ import annotations

import json

import onnxruntime as ort
import torch

from lowbit.backends.onnx.lowering import ORT_ACCURACY_LEVEL, ORT_SESSION_CONFIG
from lowbit.backends.onnxruntime_backend import OrtCompiled
from lowbit.backends.torch_backend import TorchCompiled
from lowbit.export import export
from lowbit.ir.capture import capture
from lowbit.passes.manager import PassManager, parse_pipeline

from conftest import smollm2_slice


def test_int4_qdq_export_records_and_loader_applies_the_session_config(smollm2, tmp_path):
    wrapper = smollm2_slice(smollm2[0], 1)
    graph = capture(wrapper, (torch.ones(2, 16, dtype=torch.long),))
    PassManager(parse_pipeline("quantize(w=int4,group=64)")).run(graph)
    path = export(graph, tmp_path / "w4.onnx", "onnx")
    ids = torch.randint(0, 49152, (2, 16))
    ref = TorchCompiled(graph)(ids).double()

    import onnx

    meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    entries = json.loads(meta[ORT_SESSION_CONFIG])
    assert entries == {ORT_ACCURACY_LEVEL: "0"}

    def rel(x: torch.Tensor) -> float:
        return float((x.double() - ref).norm() / ref.norm())

    loaded = OrtCompiled.load(path, device="cpu")
    assert rel(loaded(ids)) < 1e-5
    so = ort.SessionOptions()
    for k, v in entries.items():
        so.add_session_config_entry(k, v)
    session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    by_hand = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: ids.numpy()})[0])
    assert rel(by_hand) < 1e-5


def test_loader_reads_only_a_valid_accuracy_level_from_metadata():
    import onnx_ir as ir

    from lowbit.backends.onnxruntime_backend import accuracy_from_metadata

    model = ir.Model(ir.Graph([], [], nodes=[]), ir_version=10)
    for value, level in [({ORT_ACCURACY_LEVEL: "4"}, 4), ({ORT_ACCURACY_LEVEL: "9"}, 0),
                         ({ORT_ACCURACY_LEVEL: "0; rm -rf /"}, 0), (["x"], 0), ("{bad", 0)]:
        model.metadata_props[ORT_SESSION_CONFIG] = value if isinstance(value, str) else json.dumps(value)
        assert accuracy_from_metadata(model) == level
