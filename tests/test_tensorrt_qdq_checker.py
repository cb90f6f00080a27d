"""TensorRT explicit-quantization rules (``check_tensorrt_qdq``) on small hand-built ONNX graphs: the right
placement passes, each deliberately wrong one is rejected by the rule that names it. lowbit's own
exports are checked in ``test_onnx_quantized.py`` (W4A16 and static W8A8 pass; dynamic ones are flagged).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_ir as ir
import pytest
from onnx_ir.tape import Tape

from lowbit.backends.tensorrt import check_tensorrt_qdq, errors

K, N = 64, 32
F32, I8, U8, I4 = ir.DataType.FLOAT, ir.DataType.INT8, ir.DataType.UINT8, ir.DataType.INT4


def _const(t: Tape, name: str, arr: np.ndarray, dtype: ir.DataType | None = None) -> ir.Value:
    return t.initializer(ir.tensor(arr, dtype=dtype, name=name))


def _model(build: Callable[[Tape, ir.Value], ir.Value], opset: int = 21,
           domains: dict[str, int] | None = None) -> ir.Model:
    t = Tape()
    x = ir.val("x", dtype=F32, shape=["batch", "seq", K])
    y = build(t, x)
    y.name = "y"
    graph = ir.Graph([x], [y], nodes=t.nodes, initializers=t.initializers,
                     opset_imports={"": opset, **(domains or {})}, name="g")
    return ir.Model(graph, ir_version=10)


def _q_dq_act(t: Tape, x: ir.Value, scale: np.ndarray | ir.Value = np.array(0.05, np.float32),
              qtype: ir.DataType = I8, attrs: dict | None = None, zp: ir.Value | None = None) -> ir.Value:
    s = scale if isinstance(scale, ir.Value) else _const(t, f"s{len(t.nodes)}", scale)
    inputs = [x, s] + ([zp] if zp is not None else [])
    q_attrs = {**(attrs or {}), **({} if zp is not None else {"output_dtype": qtype.value})}
    q = t.op("QuantizeLinear", inputs, q_attrs)
    return t.op("DequantizeLinear", [q, s] + ([zp] if zp is not None else []), attrs or {})


def _weight_dq(t: Tape, qtype: ir.DataType = I8, shape: tuple[int, int] = (K, N), scale: np.ndarray | None = None,
               attrs: dict | None = None, zp: np.ndarray | None = None) -> ir.Value:
    rng = np.random.default_rng(0)
    if qtype == I4:
        import ml_dtypes

        w = _const(t, "w", rng.integers(-8, 8, shape).astype(ml_dtypes.int4), I4)
    else:
        w = _const(t, "w", rng.integers(-127, 127, shape).astype(np.int8))
    s = _const(t, "ws", scale if scale is not None else np.full(shape[1], 0.01, np.float32))
    inputs = [w, s] + ([_const(t, "wzp", zp, qtype)] if zp is not None else [])
    return t.op("DequantizeLinear", inputs, attrs if attrs is not None else {"axis": 1})


def _rules(model: ir.Model, severity: str | None = None) -> set[str]:
    found = check_tensorrt_qdq(model)
    return {v.rule for v in found if severity is None or v.severity == severity}


def test_int8_gemm_with_per_tensor_activation_and_per_channel_weights_passes():
    model = _model(lambda t, x: t.op("MatMul", [_q_dq_act(t, x), _weight_dq(t)]))
    assert check_tensorrt_qdq(model) == []


def test_int4_block_weight_only_passes():
    def build(t: Tape, x: ir.Value) -> ir.Value:
        w = _weight_dq(t, I4, scale=np.full((K // 64, N), 0.01, np.float32), attrs={"axis": 0, "block_size": 64})
        return t.op("MatMul", [x, w])

    assert check_tensorrt_qdq(_model(build)) == []


def test_per_channel_scale_on_the_input_channel_axis_is_rejected():
    model = _model(lambda t, x: t.op("MatMul", [_q_dq_act(t, x), _weight_dq(
        t, scale=np.full(K, 0.01, np.float32), attrs={"axis": 0})]))
    found = check_tensorrt_qdq(model)
    assert [v.rule for v in found] == ["per-channel-axis"]
    assert "output-channel axis" in found[0].message and "work-quantized-types" in found[0].doc


def test_int4_blocks_along_the_output_axis_are_rejected():
    def build(t: Tape, x: ir.Value) -> ir.Value:
        w = _weight_dq(t, I4, scale=np.full((K, N // 16), 0.01, np.float32), attrs={"axis": 1, "block_size": 16})
        return t.op("MatMul", [x, w])

    assert "int4-weight-only" in _rules(_model(build), "error")


@pytest.mark.parametrize("attrs, scale_shape, got", [
    ({"axis": 0, "block_size": 32}, (K // 32, N), "in blocks of 32"),
    ({"axis": 1}, (N,), "one scale per channel"),
])
def test_int4_weights_outside_block_sizes_64_and_128_are_refused(attrs, scale_shape, got):
    """NVIDIA's Quantization Schemes: "INT4 quantization requires per-block scales. The supported block sizes are
    {64, 128}" — group 32 and per-channel INT4 were warnings, and the export went on to a build TensorRT refuses."""
    def build(t: Tape, x: ir.Value) -> ir.Value:
        return t.op("MatMul", [x, _weight_dq(t, I4, scale=np.full(scale_shape, 0.01, np.float32), attrs=attrs)])

    found = [v for v in errors(check_tensorrt_qdq(_model(build))) if v.rule == "int4-block-size"]
    assert len(found) == 1, check_tensorrt_qdq(_model(build))
    text = str(found[0])
    assert "DequantizeLinear" in text and got in text and "64 or 128" in text and "quantized-types-schemes" in text


def test_int4_activations_are_rejected():
    model = _model(lambda t, x: t.op("MatMul", [_q_dq_act(t, x, qtype=I4), _weight_dq(t)]))
    assert "int4-weight-only" in _rules(model, "error")


def test_quantized_tensor_read_by_something_else_than_dequantize_is_rejected():
    def build(t: Tape, x: ir.Value) -> ir.Value:
        q = t.op("QuantizeLinear", [x, _const(t, "s", np.array(0.05, np.float32))], {"output_dtype": I8.value})
        return t.op("Cast", [q], {"to": F32})

    assert _rules(_model(build), "error") == {"q-feeds-dq"}


def test_runtime_computed_scale_is_rejected():
    def build(t: Tape, x: ir.Value) -> ir.Value:
        amax = t.op("ReduceMax", [t.op("Abs", [x])], {"keepdims": 0})
        scale = t.op("Div", [amax, _const(t, "c127", np.array(127, np.float32))])
        return t.op("MatMul", [_q_dq_act(t, x, scale=scale), _weight_dq(t)])

    assert _rules(_model(build), "error") == {"scale-constant-positive"}


def test_non_positive_scale_is_rejected():
    scale = np.full(N, 0.01, np.float32)
    scale[3] = 0.0
    model = _model(lambda t, x: t.op("MatMul", [_q_dq_act(t, x), _weight_dq(t, scale=scale)]))
    assert _rules(model, "error") == {"scale-constant-positive"}


def test_asymmetric_uint8_activations_are_rejected():
    def build(t: Tape, x: ir.Value) -> ir.Value:
        zp = _const(t, "zp", np.array(128, np.uint8))
        return t.op("MatMul", [_q_dq_act(t, x, zp=zp), _weight_dq(t)])

    assert _rules(_model(build), "error") == {"supported-qtype", "zero-point-zero"}


def test_per_token_activation_scales_are_rejected():
    def build(t: Tape, x: ir.Value) -> ir.Value:
        scale = _const(t, "s", np.full(K, 0.05, np.float32))
        return t.op("MatMul", [_q_dq_act(t, x, scale=scale, attrs={"axis": 2}), _weight_dq(t)])

    assert _rules(_model(build), "error") == {"activation-per-tensor"}


def test_qoperator_and_contrib_ops_are_rejected():
    def qlinear(t: Tape, x: ir.Value) -> ir.Value:
        s = _const(t, "s", np.array(0.05, np.float32))
        zp = _const(t, "zp", np.array(0, np.int8))
        q = t.op("QuantizeLinear", [x, s, zp])
        w = _const(t, "w", np.ones((K, N), np.int8))
        y = t.op("QLinearMatMul", [q, s, zp, w, s, zp, s, zp])
        return t.op("DequantizeLinear", [y, s, zp])

    assert "unsupported-quantized-op" in _rules(_model(qlinear), "error")

    def nbits(t: Tape, x: ir.Value) -> ir.Value:
        blob = _const(t, "b", np.zeros((N, 1, 32), np.uint8))
        scales = _const(t, "sc", np.ones(N, np.float32))
        return t.op("MatMulNBits", [x, blob, scales], {"K": K, "N": N, "bits": 4, "block_size": 64},
                    domain="com.microsoft")

    assert _rules(_model(nbits, domains={"com.microsoft": 1}), "error") == {"unsupported-quantized-op"}


def test_weight_dequantize_feeding_a_transpose_is_a_placement_warning():
    model = _model(lambda t, x: t.op("MatMul", [_q_dq_act(t, x), t.op("Transpose", [_weight_dq(
        t, shape=(N, K), scale=np.full(N, 0.01, np.float32), attrs={"axis": 0})], {"perm": [1, 0]})]))
    found = check_tensorrt_qdq(model)
    assert errors(found) == []
    assert {v.rule for v in found} == {"weight-dq-placement"}


def test_int8_weights_with_float_activations_are_a_warning():
    model = _model(lambda t, x: t.op("MatMul", [x, _weight_dq(t)]))
    found = check_tensorrt_qdq(model)
    assert errors(found) == [] and {v.rule for v in found} == {"quantize-all-weighted-inputs"}
    assert "Layer-Placement Recommendations" in found[0].doc


def test_block_quantization_on_a_leading_axis_is_rejected():
    def build(t: Tape, x: ir.Value) -> ir.Value:
        w = _const(t, "w", np.ones((4, K, N), np.int8))
        s = _const(t, "ws", np.full((2, K, N), 0.01, np.float32))
        dq = t.op("DequantizeLinear", [w, s], {"axis": 0, "block_size": 2})
        return t.op("MatMul", [x, dq])

    assert "scale-shape" in _rules(_model(build), "error")


def test_opset_too_old_for_int4_is_reported():
    def build(t: Tape, x: ir.Value) -> ir.Value:
        w = _weight_dq(t, I4, scale=np.full((K // 64, N), 0.01, np.float32), attrs={"axis": 0, "block_size": 64})
        return t.op("MatMul", [x, w])

    assert "opset" in _rules(_model(build, opset=19), "error")


@pytest.mark.parametrize("violation_str", ["[error] per-channel-axis at DequantizeLinear"])
def test_violations_read_well(violation_str):
    model = _model(lambda t, x: t.op("MatMul", [_q_dq_act(t, x), _weight_dq(
        t, scale=np.full(K, 0.01, np.float32), attrs={"axis": 0})]))
    text = str(check_tensorrt_qdq(model)[0])
    assert text.startswith(violation_str) and "docs.nvidia.com" in text


@pytest.mark.parametrize("attr, value", [("value_float", 0.05), ("value_floats", [0.05])])
def test_scales_from_constant_nodes_of_any_attribute_are_build_time_constants(attr, value):
    def build(t: Tape, x: ir.Value) -> ir.Value:
        scale = t.op("Constant", [], {attr: value})
        return t.op("MatMul", [_q_dq_act(t, x, scale=scale), _weight_dq(t)])

    assert check_tensorrt_qdq(_model(build)) == []


def test_a_constant_node_of_a_non_positive_scale_is_still_rejected():
    def build(t: Tape, x: ir.Value) -> ir.Value:
        scale = t.op("Constant", [], {"value_float": -0.05})
        return t.op("MatMul", [_q_dq_act(t, x, scale=scale), _weight_dq(t)])

    found = [v for v in check_tensorrt_qdq(_model(build)) if v.rule == "scale-constant-positive"]
    assert found and all("non-positive" in v.message for v in found)


def test_a_per_channel_scale_of_the_wrong_length_is_rejected():
    # axis 1 (the output channels, N of them) with K scales: every other rule passed it
    model = _model(lambda t, x: t.op("MatMul", [_q_dq_act(t, x), _weight_dq(t, scale=np.full(K, 0.01, np.float32))]))
    found = check_tensorrt_qdq(model)
    assert [v.rule for v in found] == ["scale-shape"]
    assert f"[{K}] does not match axis 1 of the input [{K}, {N}]: it needs [{N}]" in found[0].message


@pytest.mark.parametrize("scale_shape, attrs, match", [
    ((K // 32, N), {"axis": 0, "block_size": 64}, f"needs [{K // 64}, {N}]"),
    ((K // 64, N), {"axis": 0}, "without a block_size attribute"),
])
def test_a_block_scale_of_the_wrong_shape_is_rejected(scale_shape, attrs, match):
    def build(t: Tape, x: ir.Value) -> ir.Value:
        return t.op("MatMul", [x, _weight_dq(t, I4, scale=np.full(scale_shape, 0.01, np.float32), attrs=attrs)])

    found = [v for v in check_tensorrt_qdq(_model(build)) if v.rule == "scale-shape"]
    assert len(found) == 1 and match in found[0].message


def test_a_scale_of_rank_above_two_is_rejected():
    """TensorRT's Q/DQ scale (and zero point) has rank <= 2 (IDequantizeLayer); a block-quantized rank-3
    activation with a same-rank scale passed every rule of the checker and failed only in the build."""
    scale = np.full((1, 1, K // 32), 0.05, np.float32)  # [batch, seq, K] blocked by 32 along K
    model = _model(lambda t, x: t.op("MatMul", [_q_dq_act(t, x, scale=scale, attrs={"axis": 2, "block_size": 32}),
                                                _weight_dq(t)]))
    found = [v for v in check_tensorrt_qdq(model) if v.rule == "scale-rank"]
    assert len(found) == 2 and {v.node.split()[0] for v in found} == {"QuantizeLinear", "DequantizeLinear"}
    assert all(v.severity == "error" and "has rank 3" in v.message and "[1, 1, 2]" in v.message for v in found)
    # the rank-2 block scale of a 2-D int4 weight is fine
    assert "scale-rank" not in _rules(_model(lambda t, x: t.op("MatMul", [x, _weight_dq(
        t, I4, scale=np.full((K // 64, N), 0.01, np.float32), attrs={"axis": 0, "block_size": 64})])))


def test_a_zero_point_not_shaped_like_its_scale_is_rejected():
    """A zero point (all zeros, so the zero-point rule passed it) of another shape than its scale: TensorRT needs
    identical dimensions."""
    bad = _model(lambda t, x: t.op("MatMul", [_q_dq_act(t, x), _weight_dq(
        t, scale=np.full(N, 0.01, np.float32), zp=np.zeros((1, N), np.int8))]))
    found = [v for v in check_tensorrt_qdq(bad) if v.rule == "zero-point-shape"]
    assert len(found) == 1 and found[0].severity == "error"
    assert f"zero point of shape [1, {N}] and scale of shape [{N}]" in found[0].message
    good = _model(lambda t, x: t.op("MatMul", [_q_dq_act(t, x), _weight_dq(
        t, scale=np.full(N, 0.01, np.float32), zp=np.zeros(N, np.int8))]))
    assert "zero-point-shape" not in _rules(good)


@pytest.mark.parametrize("qtype", [I8, ir.DataType.FLOAT8E4M3FN])
def test_block_quantization_of_8_bit_types_is_rejected(qtype):
    """TensorRT's Q/DQ layers take a block scale for INT4 only: an int8 or fp8 weight in groups of 32 along K passed
    every rule (and would fail in the TensorRT build); the same weight per channel still passes."""
    def build(blocked: bool) -> Callable[[Tape, ir.Value], ir.Value]:
        def weight(t: Tape) -> ir.Value:
            codes = np.random.default_rng(0).integers(-100, 100, (K, N)).astype(np.float32)
            w = _const(t, "w", codes.astype(qtype.numpy()), qtype)
            if blocked:
                return t.op("DequantizeLinear", [w, _const(t, "ws", np.full((K // 32, N), 0.01, np.float32))],
                            {"axis": 0, "block_size": 32})
            return t.op("DequantizeLinear", [w, _const(t, "ws", np.full(N, 0.01, np.float32))], {"axis": 1})

        return lambda t, x: t.op("MatMul", [_q_dq_act(t, x, qtype=qtype), weight(t)])

    found = errors(check_tensorrt_qdq(_model(build(blocked=True))))
    assert [v.rule for v in found] == ["block-quantization-type"]
    assert f"{qtype.name} quantized in blocks of 32" in str(found[0]) and "INT4" in str(found[0])
    assert check_tensorrt_qdq(_model(build(blocked=False))) == []


def test_a_lowbit_export_of_grouped_int8_weights_is_rejected_for_tensorrt():
    """End to end: ``quantize(w=int8,group=32)`` with static per-tensor activations exported to ONNX (what
    ``format='tensorrt'`` builds from) is flagged; per-channel int8 weights are not."""
    import torch

    from lowbit.api import compile_model
    from lowbit.backends.onnx import to_onnx

    torch.manual_seed(0)
    lin = torch.nn.Sequential(torch.nn.Linear(64, 32)).eval()
    x = torch.randn(4, 64)
    static = "a=int8,a_gran=per_tensor,a_static=true,calib_n=4,progress=false"
    grouped = compile_model(lin, (x,), pipeline=f"quantize(w=int8,group=32,{static})", calib=x)
    per_channel = compile_model(lin, (x,), pipeline=f"quantize(w=int8,{static})", calib=x)
    assert {v.rule for v in errors(check_tensorrt_qdq(to_onnx(grouped.graph)))} == {"block-quantization-type"}
    assert check_tensorrt_qdq(to_onnx(per_channel.graph)) == []
