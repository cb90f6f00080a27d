"""QDQ semantics (lowbit.ir.quant): packing, ONNX Q/DQ numerics, dynamic qparams, schemes. No model needed."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.calibration.observers import fake_quant
from lowbit.ir.qscheme import KVCacheScheme, QScheme, QuantConfig, module_matches
from lowbit.ir.quant import (
    QDTYPES,
    SCALE_EPS,
    Layout,
    dequantize,
    dynamic_layout,
    dynamic_qparams,
    get_qdtype,
    group_view,
    pack_int4,
    quantize,
    scale_shape,
    unpack_int4,
)

PACKED = [q for q in QDTYPES.values() if q.packed]


# ---- packing ------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(PACKED), st.integers(1, 5), st.integers(1, 24), st.integers(0, 2**31 - 1))
def test_pack_unpack_round_trip_is_exact(qd, rows, half, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(int(qd.qmin), int(qd.qmax) + 1, (rows, 2 * half), generator=g).to(qd.container)
    packed = pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (rows, half)
    back = unpack_int4(packed, signed=qd.signed)
    assert back.dtype == qd.container and torch.equal(back, q)


def test_pack_layout_low_nibble_is_the_even_index():
    q = torch.tensor([[1, 2, -1, 7, -8, 0]], dtype=torch.int8)
    assert pack_int4(q).tolist() == [[0x21, 0x7F, 0x08]]  # -1 -> 0xF, -8 -> 0x8 (two's complement nibbles)
    assert pack_int4(torch.tensor([15, 0], dtype=torch.uint8)).tolist() == [0x0F]


def test_pack_rejects_odd_length_and_wrong_dtype():
    with pytest.raises(ValueError, match="even last dimension"):
        pack_int4(torch.zeros(3, 5, dtype=torch.int8))
    with pytest.raises(TypeError, match="int8 or uint8"):
        pack_int4(torch.zeros(4, dtype=torch.int32))
    with pytest.raises(TypeError, match="packed uint8"):
        unpack_int4(torch.zeros(4, dtype=torch.int8), signed=True)


# ---- quantize / dequantize against a plain reference and ONNX -------------------------------------


def _reference_q(x: np.ndarray, s: np.ndarray, z: np.ndarray | None, qmin: int, qmax: int) -> np.ndarray:
    """ONNX QuantizeLinear written out element by element (numpy's rint is round-half-to-even)."""
    q = np.rint(x / s)
    if z is not None:
        q = q + z
    return np.clip(q, qmin, qmax)


def test_round_half_to_even_and_saturation():
    s = torch.tensor(1.0)
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, 126.5, 200.0, -300.0])
    q = quantize(x, s, None, qdtype="int8")
    assert q.tolist() == [0, 2, 2, 0, -2, 126, 127, -128]
    z = torch.tensor(3, dtype=torch.int8)
    assert quantize(torch.tensor([4.5, -200.0]), s, z, qdtype="int8").tolist() == [7, -128]


@pytest.mark.parametrize("qdtype", ["int8", "uint8", "int4", "uint4", "int3", "int2"])
@pytest.mark.parametrize("layout", [Layout(None, None), Layout(0, None), Layout(1, 8), Layout(1, 6)])
def test_quantize_matches_elementwise_reference(qdtype, layout):
    qd = get_qdtype(qdtype)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 24, generator=g) * 3
    scale = torch.rand(scale_shape(x.shape, layout), generator=g) * 0.5 + 0.05
    zp = None
    if not qd.signed:
        zp = torch.randint(int(qd.qmin), int(qd.qmax) + 1, scale.shape, generator=g).to(qd.container)
    q = quantize(x, scale, zp, qdtype=qdtype, axis=layout.axis, block_size=layout.block_size)
    if qd.packed:
        q = unpack_int4(q, signed=qd.signed)
    # broadcast the scale by hand
    if layout.axis is None:
        s_full = scale.expand_as(x)
    elif layout.block_size is None:
        s_full = scale[:, None].expand_as(x)
    else:
        s_full = torch.stack([scale[:, j // layout.block_size] for j in range(24)], 1)
    z_full = None if zp is None else (zp.float().expand_as(x) if layout.axis is None else
                                      zp.float()[:, None].expand_as(x) if layout.block_size is None else
                                      torch.stack([zp.float()[:, j // layout.block_size] for j in range(24)], 1))
    want = _reference_q(x.numpy(), s_full.numpy(), None if z_full is None else z_full.numpy(), qd.qmin, qd.qmax)
    assert np.array_equal(q.numpy().astype(np.float64), want)
    xq = dequantize(pack_int4(q) if qd.packed else q, scale, zp, qdtype=qdtype, axis=layout.axis,
                    block_size=layout.block_size)
    deq = (want - (0 if z_full is None else z_full.numpy())) * s_full.numpy()
    np.testing.assert_allclose(xq.numpy(), deq, rtol=0, atol=1e-6)


def _onnx_qdq(x: np.ndarray, s: np.ndarray, z: np.ndarray, elem: int, **attrs: int) -> tuple[np.ndarray, np.ndarray]:
    from onnx import TensorProto, helper
    from onnx.reference import ReferenceEvaluator

    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], **attrs),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], **attrs)]
    zt = helper.make_tensor("z", elem, list(z.shape), z.flatten().tolist())
    graph = helper.make_graph(
        nodes, "qdq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape)),
         helper.make_tensor_value_info("s", TensorProto.FLOAT, list(s.shape))],
        [helper.make_tensor_value_info("q", elem, list(x.shape)),
         helper.make_tensor_value_info("y", TensorProto.FLOAT, list(x.shape))],
        initializer=[zt])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    q, y = ReferenceEvaluator(model).run(None, {"x": x, "s": s})
    return q.astype(np.int32), y


def test_int8_per_channel_matches_onnx_reference_evaluator():
    from onnx import TensorProto

    g = torch.Generator().manual_seed(1)
    w = torch.randn(16, 40, generator=g)
    scale, zp = dynamic_qparams(w.T, qdtype="int8", granularity="per_channel", symmetric=False, axis=-1)
    # dynamic_qparams on w.T per last-axis channel = one scale per row of w (axis 0)
    q = quantize(w, scale, zp, qdtype="int8", axis=0)
    y = dequantize(q, scale, zp, qdtype="int8", axis=0)
    oq, oy = _onnx_qdq(w.numpy(), scale.numpy(), zp.numpy(), TensorProto.INT8, axis=0)
    assert np.array_equal(q.numpy().astype(np.int32), oq)
    np.testing.assert_array_equal(y.numpy(), oy)


def test_int4_blockwise_matches_onnx_reference_evaluator():
    from onnx import TensorProto

    g = torch.Generator().manual_seed(2)
    w = torch.randn(8, 64, generator=g)
    layout = Layout(1, 32)
    scale = w.abs().reshape(8, 2, 32).amax(-1) / 7
    zp = torch.randint(-2, 3, (8, 2), generator=g).to(torch.int8)
    q = quantize(w, scale, zp, qdtype="int4", axis=1, block_size=32)
    y = dequantize(q, scale, zp, qdtype="int4", axis=1, block_size=32)
    oq, oy = _onnx_qdq(w.numpy(), scale.numpy(), zp.numpy(), TensorProto.INT4, axis=1, block_size=32)
    assert np.array_equal(unpack_int4(q, signed=True).numpy().astype(np.int32), oq)
    np.testing.assert_array_equal(y.numpy(), oy)
    assert group_view(w, layout).shape == (16, 32)


def test_fp8_saturates_and_rounds_like_a_cast():
    s = torch.tensor(0.5)
    x = torch.tensor([1000.0, -1000.0, 0.3, 1.0])
    q = quantize(x, s, None, qdtype="fp8e4m3")
    assert q.dtype == torch.float8_e4m3fn
    assert q.float().tolist()[:2] == [448.0, -448.0]  # saturated, not NaN
    assert torch.equal(q.float()[2:], (x[2:] / s).to(torch.float8_e4m3fn).float())
    assert dequantize(q, s, None, qdtype="fp8e4m3").tolist()[:2] == [224.0, -224.0]
    with pytest.raises(ValueError, match="no zero point"):
        quantize(x, s, torch.tensor(0, dtype=torch.int8), qdtype="fp8e4m3")


# ---- dynamic qparams ----------------------------------------------------------------------------


@pytest.mark.parametrize("qdtype", ["int8", "int4", "int2", "uint8", "fp8e4m3"])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("gran,axis,block", [("per_tensor", None, None), ("per_token", -1, None),
                                             ("per_token", -1, 8), ("per_channel", -1, None),
                                             ("per_block", 1, 4)])
def test_scales_are_never_zero_or_nan_on_zero_and_constant_data(qdtype, symmetric, gran, axis, block):
    if get_qdtype(qdtype).is_float and not symmetric:
        with pytest.raises(ValueError, match="symmetric only"):
            dynamic_qparams(torch.zeros(2, 4, 16), qdtype=qdtype, granularity=gran, symmetric=False, axis=axis,
                            block_size=block)
        return
    if symmetric and get_qdtype(qdtype).qmin == 0:  # an unsigned grid has no negative codes to be symmetric with
        with pytest.raises(ValueError, match="no negative codes"):
            dynamic_qparams(torch.zeros(2, 4, 16), qdtype=qdtype, granularity=gran, symmetric=True, axis=axis,
                            block_size=block)
        return
    x = torch.zeros(2, 6, 16)
    x[1] = 3.25  # one batch all zeros, one constant
    x[0, 2] = -0.5  # one token constant negative
    s, z = dynamic_qparams(x, qdtype=qdtype, granularity=gran, symmetric=symmetric, axis=axis, block_size=block)
    assert torch.isfinite(s).all() and (s >= SCALE_EPS).all()
    layout = dynamic_layout(x.shape, gran, axis, block)
    assert list(s.shape) == scale_shape(x.shape, layout) and s.shape == z.shape
    zp = None if symmetric or get_qdtype(qdtype).is_float else z
    q = quantize(x, s, zp, qdtype=qdtype, axis=layout.axis, block_size=layout.block_size)
    y = dequantize(q, s, zp, qdtype=qdtype, axis=layout.axis, block_size=layout.block_size)
    assert torch.isfinite(y).all()
    assert torch.equal(y[0, 0], torch.zeros(16))  # an all-zero group comes back exactly zero
    if gran in ("per_token", "per_block") and not get_qdtype(qdtype).is_float:
        # a constant group's value is on the grid (it is the range's end): it comes back to float precision
        torch.testing.assert_close(y[1], x[1], rtol=1e-6, atol=1e-6)


def test_per_block_handles_a_ragged_last_block():
    x = torch.arange(2 * 17, dtype=torch.float32).reshape(1, 1, 17, 2)
    s, z = dynamic_qparams(x, qdtype="int8", granularity="per_block", symmetric=True, axis=2, block_size=8)
    assert s.shape == (1, 1, 3, 2)
    assert s[0, 0, 2, 1] == x[0, 0, 16, 1] / 127  # the last block holds one token
    q = quantize(x, s, None, qdtype="int8", axis=2, block_size=8)
    assert q.shape == x.shape


def test_weight_tiles_are_one_scale_per_128x128_block_with_partial_edge_tiles():
    """``axis=[0, 1], block_size=[128, 128]`` (fp8-block128): a [200, 320] weight has 2 x 3 tiles, the last row of
    tiles 72 rows and the last column 64 wide. Each tile's scale is its own amax / 448 and every element is
    quantized and dequantized with its tile's scale (checked against a per-tile loop); a scale of another shape is
    refused naming the shape it must have, so the verifier (which runs the ops on meta tensors) refuses it too."""
    from lowbit.ir.qscheme import QScheme
    from lowbit.passes.insert_qdq import quantize_weight

    w = torch.randn(200, 320) * torch.logspace(-2, 1, 320)
    q, s, zp, layout = quantize_weight(w, QScheme(qdtype="fp8e4m3", granularity="per_block", group_size=128))
    assert zp is None and layout.kwargs() == {"axis": [0, 1], "block_size": [128, 128]} and s.shape == (2, 3)
    y = dequantize(q, s, None, qdtype="fp8e4m3", axis=[0, 1], block_size=[128, 128])
    for i, rows in enumerate((slice(0, 128), slice(128, 200))):
        for j, cols in enumerate((slice(0, 128), slice(128, 256), slice(256, 320))):
            tile = w[rows, cols]
            assert s[i, j] == tile.abs().max() / 448
            assert torch.equal(q[rows, cols], (tile / s[i, j]).to(torch.float8_e4m3fn))
            assert torch.equal(y[rows, cols], q[rows, cols].float() * s[i, j])
    meta = dequantize(q.to("meta"), s.to("meta"), None, qdtype="fp8e4m3", axis=[0, 1], block_size=[128, 128])
    assert meta.shape == (200, 320)
    with pytest.raises(ValueError, match=r"tiled scale for x \(200, 320\), axis \[0, 1\], block_size \[128, "
                                         r"128\] must have shape \(2, 3\), got \(2, 2\)"):
        dequantize(q, s[:, :2], None, qdtype="fp8e4m3", axis=[0, 1], block_size=[128, 128])
    with pytest.raises(ValueError, match=r"block_size \[128, 128\] needs axis to list one axis per block"):
        quantize(w, s, None, qdtype="fp8e4m3", axis=1, block_size=[128, 128])


def test_ops_run_on_meta_tensors_for_the_verifier():
    x = torch.empty(1, 5, 64, device="meta")
    s, z = dynamic_qparams(x, qdtype="int4", granularity="per_token", symmetric=False, block_size=32)
    q = quantize(x, s, z, qdtype="int4", axis=-1, block_size=32)
    assert q.shape == (1, 5, 32) and q.dtype == torch.uint8
    y = dequantize(q, s, z, qdtype="int4", axis=-1, block_size=32, out_dtype=torch.bfloat16)
    assert y.shape == x.shape and y.dtype == torch.bfloat16


def test_bad_qdq_operands_raise_clear_errors():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="unknown qdtype 'int5'"):
        quantize(x, torch.tensor(1.0), None, qdtype="int5")
    with pytest.raises(ValueError, match=r"per-axis scale must be 1-d of length 4"):
        quantize(x, torch.ones(8), None, qdtype="int8", axis=0)
    with pytest.raises(ValueError, match=r"must have shape \(4, 2\)"):
        quantize(x, torch.ones(4, 3), None, qdtype="int8", axis=1, block_size=4)
    with pytest.raises(TypeError, match="expects torch.uint8 data"):
        dequantize(torch.zeros(4, 8, dtype=torch.int8), torch.tensor(1.0), None, qdtype="int4")


# ---- schemes and configs ------------------------------------------------------------------------


def test_qscheme_validation_and_fake_quant():
    assert QScheme(qdtype=4, granularity="per_group", group_size=64).qdtype == "int4"
    with pytest.raises(ValueError, match="per_group needs group_size"):
        QScheme(qdtype="int4", granularity="per_group")
    with pytest.raises(ValueError, match="symmetric only"):
        QScheme(qdtype="fp8e4m3", symmetric=False)
    with pytest.raises(ValueError, match="unknown qdtype 'int5'"):
        QScheme(qdtype="int5")
    with pytest.raises(ValueError, match="not per_group"):
        KVCacheScheme(key=QScheme(granularity="per_group", group_size=4), value=QScheme())
    w = torch.randn(8, 64)
    wq = fake_quant(w, QScheme(qdtype="int4", granularity="per_group", group_size=32, symmetric=False))
    assert wq.shape == w.shape and (wq - w).abs().max() < (w.abs().max() / 7)
    assert QScheme(qdtype="int4", granularity="per_group", group_size=64, symmetric=False).short() == "int4-asym-g64"


def test_quant_config_rules_override_in_order_and_keep_float():
    w4 = QScheme(qdtype="int4", granularity="per_group", group_size=64)
    w8 = QScheme(qdtype="int8")
    cfg = QuantConfig.model_validate({
        "weight": w4.model_dump(), "input": {"qdtype": "int8", "granularity": "per_token", "dynamic": True},
        "rules": [{"pattern": "*.down_proj", "weight": w8.model_dump()},
                  {"pattern": "model.layers.0.*", "input": "float"}],
    })
    assert cfg.resolve("model.layers.3.mlp.up_proj")[0] == w4
    assert cfg.resolve("model.layers.3.mlp.down_proj")[0] == w8
    assert cfg.resolve("model.layers.0.mlp.down_proj") == (w8, None)
    assert cfg.resolve("lm_head") == (None, None)  # default keep_float
    assert module_matches("model.lm_head", "lm_head") and not module_matches("model.lm_headx", "lm_head")
    assert cfg.user_patterns() == [("rules[0].pattern", "*.down_proj"), ("rules[1].pattern", "model.layers.0.*")]


def test_pack_and_unpack_agree_with_the_nibble_layout_on_every_byte_and_view():
    """The in-place pack and shift-based unpack (8x faster on SmolLM2's weights) give what the nibble layout says for
    all 256 bytes, signed and unsigned, on batched, transposed (non-contiguous) and sliced inputs."""
    every_byte = torch.arange(256, dtype=torch.int32)
    lo, hi = every_byte & 0xF, every_byte >> 4
    for signed in (False, True):
        want_lo, want_hi = (lo - 16 * (lo >= 8), hi - 16 * (hi >= 8)) if signed else (lo, hi)
        want = torch.stack([want_lo, want_hi], dim=-1).flatten()
        got = unpack_int4(every_byte.to(torch.uint8), signed=signed)
        assert got.dtype == (torch.int8 if signed else torch.uint8) and got.tolist() == want.tolist(), signed
        codes = want.to(got.dtype).reshape(4, 8, 16)
        assert pack_int4(codes).tolist() == every_byte.reshape(4, 8, 8).tolist()
        wide = want.to(got.dtype).reshape(32, 16)
        for view in (wide.t(), wide[:, 2:10], wide[::2]):  # strided views pack what their contiguous copies pack
            assert torch.equal(pack_int4(view), pack_int4(view.contiguous()))
            assert torch.equal(unpack_int4(pack_int4(view), signed=signed), view)
        packed = pack_int4(wide)
        assert torch.equal(unpack_int4(packed.t(), signed=signed), unpack_int4(packed.t().contiguous(), signed=signed))


def test_a_pattern_without_glob_characters_matches_as_a_string(monkeypatch):
    """``lowbit.load`` resolves one exact rule per quantized linear, and each ran fnmatch against every linear's every
    dotted suffix (quadratic in the linears: ~0.3 CPU-s of a SmolLM2 load). A pattern without ``*?[`` is compared as
    a string, with the same answers as the glob match on the path and its suffixes, and fnmatch never runs for it."""
    from fnmatch import fnmatchcase

    import lowbit.ir.qscheme as qscheme

    paths = ["model.layers.0.self_attn.q_proj", "model.layers.10.self_attn.q_proj", "lm_head", "model.lm_head",
             "model.layers.0.mlp.down_proj", "encoder.layer.1.attention.self.query"]
    patterns = ["model.layers.0.self_attn.q_proj", "self_attn.q_proj", "q_proj", "layers.0.self_attn.q_proj",
                "lm_head", "proj", "0.mlp.down_proj", "self.query", "layer.1.attention.self.query", "layers.1"]

    def globbed(path: str, pattern: str) -> bool:
        parts = path.split(".")
        return any(fnmatchcase(".".join(parts[i:]), pattern) for i in range(len(parts)))

    expected = {(p, q): globbed(p, q) for p in paths for q in patterns}
    monkeypatch.setattr(qscheme, "fnmatchcase", lambda *a: pytest.fail("fnmatch ran for a pattern with no glob"))
    assert {(p, q): qscheme.module_matches(p, q) for p in paths for q in patterns} == expected
    assert sum(expected.values()) >= 10  # the cases match as well as miss
