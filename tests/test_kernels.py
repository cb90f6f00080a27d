"""lowbit's Triton kernels against their plain-torch references.

On a machine without CUDA the kernels run through Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1); with CUDA the same tests run on the GPU (``cuda`` parameters, marked gpu). Integer paths
(activation codes and scales, int32 accumulation, the dequantized weight) are checked bit-exactly; float
accumulation against a stated relative tolerance ‖y − ref‖ / ‖ref‖: bf16 outputs 6e-3 (the reference rounds its
dequantized operands and output to bf16; under the interpreter at most 3.8e-3, 1.02e-2 where two outputs' errors
meet in one product, against 2 x 6e-3: 1e-2 held while Triton's interpreter truncated its bf16 casts, which
tests/conftest.py now rounds to nearest even as the GPU does), fp16 3e-3.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from typing import Any

import pytest
import torch
from conftest import quantized_weight
from hypothesis import given, settings
from hypothesis import strategies as st

triton = pytest.importorskip("triton", reason="lowbit's kernels need triton (pip install -e '.[dev]' brings it)")
tl = pytest.importorskip("triton.language")

from lowbit.ir.quant import dequantize, quantize
from lowbit.kernels import (
    a8_gemm,
    a8_linear,
    a8_linear_ref,
    dequantize_weight,
    quantize_activation,
    quantize_activation_ref,
    weight_only_linear,
    weight_only_linear_add_norm,
    weight_only_linear_ref,
)
from lowbit.kernels._common import norm_from_parts_ref, norm_parts_ref
from lowbit.kernels.norm_quant import add_norm_parts
from lowbit.kernels.weight_only import R_RULE

INTERP = os.environ.get("TRITON_INTERPRET") == "1"
DEVICES = [pytest.param("cpu", marks=pytest.mark.skipif(not INTERP, reason="CPU runs need TRITON_INTERPRET=1")),
           pytest.param("cuda", marks=pytest.mark.gpu)]
TOL = {torch.bfloat16: 6e-3 if INTERP else 1e-2, torch.float16: 3e-3}
"""bf16 6e-3 measured under the rounding interpreter (session 52); the GPU keeps 1e-2 until a GPU run measures it."""


def _rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(y).all()
    return ((y.double() - ref.double()).norm() / ref.double().norm()).item()


WO_CASES = [  # qdtype, group, symmetric, activation dtype, M, path
    ("int4", 128, True, torch.bfloat16, 1, "gemv"),
    ("int4", 64, False, torch.bfloat16, 5, "gemv"),
    ("int4", 32, True, torch.float16, 16, "gemv"),
    ("uint4", 0, False, torch.bfloat16, 1, "gemv"),
    ("int4", 128, False, torch.bfloat16, 20, "gemm"),
    ("int4", 0, True, torch.float16, 33, "gemm"),
    ("int3", 32, True, torch.bfloat16, 2, "gemv"),
    ("int8", 0, True, torch.bfloat16, 1, "gemv"),
    ("uint8", 64, False, torch.float16, 18, "gemm"),
    ("int4", 64, False, torch.bfloat16, 40, "dequant"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("qdtype,group,symmetric,dtype,m,path", WO_CASES)
def test_weight_only_linear_matches_reference(device, qdtype, group, symmetric, dtype, m, path):
    n, k = 48, 256
    q, s, z = quantized_weight(n, k, qdtype, group, symmetric, device)
    x = torch.randn(m, k, device=device).to(dtype)
    bias = torch.randn(n, device=device).to(dtype)
    y = weight_only_linear(x, q, s, z, bias, qdtype, group, path)
    ref = weight_only_linear_ref(x, q, s, z, bias, qdtype, group)
    assert y.shape == (m, n) and y.dtype == dtype
    assert _rel(y, ref) <= TOL[dtype], (qdtype, group, path)


@pytest.mark.parametrize("device", DEVICES)
def test_weight_only_linear_keeps_leading_dims_and_no_bias(device):
    q, s, z = quantized_weight(40, 128, "int4", 64, False, device)
    x = torch.randn(2, 3, 128, device=device).to(torch.bfloat16)
    y = weight_only_linear(x, q, s, z, None, "int4", 64)
    assert y.shape == (2, 3, 40)
    assert _rel(y, weight_only_linear_ref(x, q, s, z, None, "int4", 64)) <= TOL[torch.bfloat16]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("qdtype,group,symmetric", [("int4", 32, False), ("int4", 0, True), ("uint8", 128, False)])
def test_dequantize_weight_is_bit_exact(device, qdtype, group, symmetric):
    # fp16 output: the interpreter's fp32 -> fp16 cast rounds to nearest even like the GPU's (its bf16 cast does not)
    q, s, z = quantized_weight(40, 256, qdtype, group, symmetric, device)
    w = dequantize_weight(q, s, z, qdtype, group, 256, torch.float16)
    ref = dequantize(q, s, z, qdtype=qdtype, axis=1 if group else 0, block_size=group or None, out_dtype=torch.float16)
    assert torch.equal(w, ref)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("qdtype", ["int8", "fp8e4m3"])
@pytest.mark.parametrize("group", [0, 32, 64, 128])
@pytest.mark.parametrize("k", [192, 4352, 4416])
def test_activation_quantization_is_bit_exact(device, qdtype, group, k):
    """K = 4352 (> ``ACT_QUANT_WHOLE_ROW`` after rounding up): the chunked kernel, its last chunk partly past K.
    Group 128 with K = 192 or 4416 (fp8-block128 on a K no tile divides): the last group is partial, its scale the
    amax of the channels it has."""
    x = (torch.randn(6, k, device=device) * 4).to(torch.bfloat16)
    x[1] = 0  # an all-zero token: scale 1e-12, codes 0
    x[2, :64] *= 100  # one loud group
    x[3, :8] = -0.0  # fp8 keeps the sign of a zero quotient (code 0x80)
    q, s = quantize_activation(x, qdtype, group)
    q_ref, s_ref = quantize_activation_ref(x, qdtype, group)
    assert q.dtype == q_ref.dtype and torch.equal(s, s_ref)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("qdtype", ["int8", "fp8e4m3"])
@pytest.mark.parametrize("group", [0, 64])
@pytest.mark.parametrize("k,dtype", [(576, torch.bfloat16), (576, torch.float16), (4352, torch.bfloat16)])
def test_activation_quantization_norms_a_split_rmsnorm(device, qdtype, group, k, dtype):
    """``quantize_activation(gain * stream, norm_sumsq=partials)`` (a split RMSNorm's reader above decode sizes,
    one launch where ``rms_norm_quant`` was one) against ``norm_from_parts_ref`` then ``quantize_activation``:
    codes and scales bit for bit under the interpreter, whole rows (SmolLM2's 576) and chunked (4352); on a GPU
    the kernel's ``rsqrt`` and sum of the partials may differ from torch's by an ulp, which moves a normed value by
    a step of its dtype and its code by one where that crosses a boundary (bound: codes within one step on under
    2% of entries, scales within 1e-2 relative)."""
    g = torch.Generator().manual_seed(3)
    stream = (torch.randn(33, k, generator=g) * 4).to(dtype).to(device)
    stream[4] = 0  # a zero row: rsqrt(eps), scale 1e-12, codes 0
    gain = (torch.rand(k, generator=g) + 0.5).to(dtype).to(device)
    gained = gain * stream
    partials = torch.stack([stream[:, i::5].float().pow(2).sum(-1) for i in range(5)], -1)  # 5 programs' sums
    q, s = quantize_activation(gained, qdtype, group, partials, 1e-5)
    q_ref, s_ref = quantize_activation(norm_from_parts_ref(gained, partials, 1e-5), qdtype, group)
    assert q.dtype == q_ref.dtype and s.shape == s_ref.shape == (33, k // group if group else 1)
    # normed: the rows' scales are those of rms-1 rows, not of the gained ones
    assert not torch.allclose(s, quantize_activation(gained, qdtype, group)[1], rtol=0.5)
    if INTERP:
        assert torch.equal(s, s_ref) and torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))
    else:
        assert torch.allclose(s, s_ref, rtol=1e-2, atol=0)
        assert (q.float() != q_ref.float()).float().mean().item() < 0.02
        if qdtype == "int8":
            assert (q.int() - q_ref.int()).abs().max().item() <= 1


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_add_norm_parts_is_the_add_then_norm_parts_ref(device, dtype):
    """``add_norm_parts`` (a split RMSNorm's writer above decode sizes, one launch): the stream and ``gain *
    stream`` are torch's add and mul bit for bit (each one rounding of an exact fp32 value), the sum of squares
    torch's within fp32 rounding of another order."""
    g = torch.Generator().manual_seed(4)
    residual = (torch.randn(2, 20, 576, generator=g) * 4).to(dtype).to(device)
    y = torch.randn(2, 20, 576, generator=g).to(dtype).to(device)
    gain = (torch.rand(576, generator=g) + 0.5).to(dtype).to(device)
    stream, gained, sumsq = add_norm_parts(residual, y, gain)
    want_gained, want_sumsq = norm_parts_ref(residual + y, gain)
    assert torch.equal(stream, residual + y) and torch.equal(gained, want_gained)
    assert sumsq.shape == want_sumsq.shape == (2, 20, 1)
    assert torch.allclose(sumsq, want_sumsq, rtol=1e-5, atol=0)
    with pytest.raises(ValueError, match="add_norm_parts"):
        add_norm_parts(residual, y[:, :3], gain)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("qdtype", ["int8", "fp8e4m3"])
def test_activation_quantization_divides_exactly_over_wide_exponents(device, qdtype):
    """On the GPU the quantize divides by a reciprocal and two FMA corrections (``act_quant.divide_exact``), not
    an IEEE division per element: codes and scales must still be torch's, for values of every magnitude (tiny
    quotients, subnormal fp8 codes, exact ties) and for whole and chunked rows."""
    g = torch.Generator().manual_seed(1)
    for k in (1024, 4352):
        mant = torch.rand(48, k, generator=g) + 1.0
        exp = torch.randint(-30, 12, (48, k), generator=g).float()
        sign = torch.randint(0, 2, (48, k), generator=g).float() * 2 - 1
        x = (sign * mant * torch.exp2(exp)).to(torch.bfloat16)
        x[:4, :k // 512 * 256] = torch.arange(-128, 128, dtype=torch.float32).mul(0.5).repeat(k // 512)
        x[:4, -1] = 127.0  # scale 1 (or its neighbour): the halves above are exact ties
        x = x.to(device)
        q, s = quantize_activation(x, qdtype, 0)
        q_ref, s_ref = quantize_activation_ref(x, qdtype, 0)
        assert torch.equal(s, s_ref)
        assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8)), (qdtype, k)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("w_qdtype,w_group,zero_point", [("int8", 0, False), ("int4", 0, False), ("int4", 64, True),
                                                         ("fp8e4m3", 0, False)])
@pytest.mark.parametrize("m,n,k", [(20, 40, 256), (40, 72, 192)])
def test_a8_gemm_accumulates_exactly(device, w_qdtype, w_group, zero_point, m, n, k):
    """Unit scales and an fp32 output: the kernel's result is the integer dot product itself. (40, 72, 192): under
    the interpreter 3 row tiles in bands of 2 (``_grouped_tile``'s short last band) by 3 column tiles, and with
    groups an odd number of them (3) in steps of 2 (``SUBK``: the last step's second group is past K)."""
    if w_qdtype == "fp8e4m3":  # small integers are exact in e4m3 and their products and sums in fp32
        xq = torch.randint(-8, 9, (m, k)).float().to(torch.float8_e4m3fn)
        wq = torch.randint(-8, 9, (n, k)).float().to(torch.float8_e4m3fn)
        w_int, zp = wq.float(), None
    elif w_qdtype == "int8":
        xq = torch.randint(-128, 128, (m, k), dtype=torch.int8)
        wq = torch.randint(-128, 128, (n, k), dtype=torch.int8)
        w_int, zp = wq.float(), None
    else:
        xq = torch.randint(-128, 128, (m, k), dtype=torch.int8)
        codes = torch.randint(-8, 8, (n, k), dtype=torch.int8)
        wq = quantize(codes.float(), torch.ones(()), None, qdtype="int4", axis=None)
        zp = torch.randint(-8, 8, (n, k // w_group), dtype=torch.int8) if zero_point else None
        w_int = codes.float() - (zp.float().repeat_interleave(w_group, 1) if zp is not None else 0)
    ws = torch.ones(n, k // w_group) if w_group else torch.ones(n)
    xs = torch.ones(m, 1)
    y = a8_gemm(xq.to(device), xs.to(device), wq.to(device), ws.to(device), None if zp is None else zp.to(device),
                None, w_qdtype, w_group, 0, torch.float32)
    assert torch.equal(y.cpu(), (xq.double() @ w_int.double().T).float())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("m,n,k", [(20, 200, 320), (3, 128, 256)])
def test_a8_gemm_weight_tiles_scale_each_step_exactly(device, m, n, k):
    """fp8 weights in 128 x 128 tiles (``w_block_n``), activations in groups of 128: small-integer codes and
    power-of-two scales make every scaled partial and sum exact in fp32, so the kernel equals
    ``sum_g dot_g * sa[m, g] * sw[n // 128, g]`` in float64 to the bit. (20, 200, 320): a partial row of tiles
    (200 = 1.56 x 128) and a partial last K group (320 = 2.5 x 128), under the interpreter two 64-wide steps
    sharing each group's scales and 32-column programs sharing a tile's."""
    from lowbit.kernels.a8_linear import a8_static_config

    g = torch.Generator().manual_seed(3)
    xq = torch.randint(-8, 9, (m, k), generator=g).float().to(torch.float8_e4m3fn)
    wq = torch.randint(-8, 9, (n, k), generator=g).float().to(torch.float8_e4m3fn)
    groups, tiles_n = -(-k // 128), -(-n // 128)
    xs = torch.exp2(torch.randint(-1, 3, (m, groups), generator=g).float())
    ws = torch.exp2(torch.randint(-1, 3, (tiles_n, groups), generator=g).float())
    xd = xq.double() * xs.double().repeat_interleave(128, 1)[:, :k]
    wd = wq.double() * ws.double().repeat_interleave(128, 0)[:n].repeat_interleave(128, 1)[:, :k]
    for config in (None, a8_static_config(128)):  # the op's own tile, and the one it takes from M = 1024
        y = a8_gemm(xq.to(device), xs.to(device), wq.to(device), ws.to(device), None, None, "fp8e4m3", 128, 128,
                    torch.float32, config=config, w_block_n=128)
        assert torch.equal(y.cpu(), (xd @ wd.T).float()), config


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("w_qdtype,w_group,a_group,w_block_n", [("int8", 0, 0, 0), ("int4", 64, 0, 0),
                                                                 ("fp8e4m3", 0, 0, 0), ("fp8e4m3", 64, 64, 64)])
def test_a8_gemm_adds_the_residual_in_its_store_as_torch_adds_it(device, dtype, w_qdtype, w_group, a_group,
                                                                 w_block_n):
    """A prefill's A8 linear with a block's residual (``a8_linear(residual=)`` past the GEMV's rows) adds it in the
    GEMM's store (``HAS_RES``), where ``residual + y`` was its own kernel after the GEMM: bit for bit the GEMM's
    output rounded to the dtype, then torch's add (under the interpreter; on the GPU the same two roundings of the
    same fp32 product), on ragged tiles; through the op, its torch-add form. A residual with an epilogue, of
    another dtype or shape is refused by name."""
    g = torch.Generator().manual_seed(w_group + w_block_n)
    m, n, k = 37, 192 if w_block_n else 200, 256
    x = torch.randn(m, k, generator=g).to(dtype).to(device)
    w = torch.randn(n, k, generator=g) / 16
    if w_qdtype == "int4":
        sw = w.abs().reshape(n, -1, w_group).amax(-1) / 7
        wq = quantize(w, sw, None, qdtype="int4", axis=1, block_size=w_group)
    elif w_block_n:
        sw = w.abs().reshape(n // w_block_n, w_block_n, k // w_group, w_group).amax((1, 3)) / 448
        wq = (w / sw.repeat_interleave(w_block_n, 0).repeat_interleave(w_group, 1)).to(torch.float8_e4m3fn)
    else:
        sw = w.abs().amax(-1) / (448 if w_qdtype == "fp8e4m3" else 127)
        wq = quantize(w, sw, None, qdtype=w_qdtype, axis=0)
    wq, sw = wq.to(device), sw.to(device)
    residual = (torch.randn(m, n, generator=g) * 4).to(dtype).to(device)
    xq, xs = quantize_activation(x, "fp8e4m3" if w_qdtype == "fp8e4m3" else "int8", a_group)
    xq = xq.reshape(m, k)
    plain = a8_gemm(xq, xs, wq, sw, None, None, w_qdtype, w_group, a_group, dtype, w_block_n=w_block_n)
    added = a8_gemm(xq, xs, wq, sw, None, None, w_qdtype, w_group, a_group, dtype, w_block_n=w_block_n,
                    residual=residual)
    if device == "cpu":
        assert torch.equal(added, residual + plain)
    else:
        torch.testing.assert_close(added.float(), (residual + plain).float(), rtol=2 ** -7, atol=1e-3)
    a_qdtype = "fp8e4m3" if w_qdtype == "fp8e4m3" else "int8"
    op = a8_linear(x, wq, sw, None, None, w_qdtype, w_group, a_qdtype, a_group, w_block_n=w_block_n,
                   residual=residual)
    assert torch.equal(op, residual + a8_linear(x, wq, sw, None, None, w_qdtype, w_group, a_qdtype, a_group,
                                                 w_block_n=w_block_n))
    for bad, epilogue in ((residual, "silu"), (residual.float(), ""), (residual[:, :64], "")):
        with pytest.raises(ValueError, match="a8_linear: a residual added in the store"):
            a8_gemm(xq, xs, wq, sw, None, None, w_qdtype, w_group, a_group, dtype, epilogue, w_block_n=w_block_n,
                    residual=bad)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("m,n,k", [(17, 200, 320), (2, 64, 576)])
def test_a8_linear_weight_tiles_match_reference(device, m, n, k):
    """``fp8-block128``'s op (activation quantize per 128 channels + the tiled GEMM) against ``a8_linear_ref``
    (dequantize both, bf16 ``linear``) within bf16's tolerance (1e-2), on ragged N and K (576: SmolLM2's hidden
    size, 4.5 groups) and with a bias."""
    from lowbit.ir.qscheme import QScheme
    from lowbit.passes.insert_qdq import quantize_weight

    q, s, _, layout = quantize_weight(torch.randn(n, k), QScheme(qdtype="fp8e4m3", granularity="per_block",
                                                                 group_size=128))
    assert layout.block_size == (128, 128) and s.shape == (-(-n // 128), -(-k // 128))
    q, s = q.to(device), s.to(device)
    x = torch.randn(m, k, device=device).to(torch.bfloat16)
    bias = torch.randn(n, device=device).to(torch.bfloat16)
    ref = a8_linear_ref(x, q, s, None, bias, "fp8e4m3", 128, "fp8e4m3", 128, w_block_n=128)
    y = a8_linear(x, q, s, None, bias, "fp8e4m3", 128, "fp8e4m3", 128, w_block_n=128)
    assert y.shape == (m, n) and _rel(y, ref) <= TOL[torch.bfloat16]
    with pytest.raises(ValueError, match=r"a8_linear: weight tile scales .* are \[2, 3\], got"):
        a8_gemm(*quantize_activation(torch.randn(4, 320, device=device).to(torch.bfloat16), "fp8e4m3", 128),
                torch.zeros(200, 320, device=device).to(torch.float8_e4m3fn), torch.ones(2, 2, device=device), None,
                None, "fp8e4m3", 128, 128, torch.bfloat16, w_block_n=128)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("w_qdtype", ["int8", "fp8e4m3"])
@pytest.mark.parametrize("width", [4096, 11008, 22016])
def test_a8_measured_tiles_accumulate_exactly(device, w_qdtype, width):
    """The tiles the op takes without the autotuner at M = 65..256 (``a8_mid_config``, one per width class) launch
    through ``config=`` as on the GPU: 100 rows (a partial row tile), 72 columns (a partial column tile), the
    integer dot product exactly."""
    from lowbit.kernels.a8_linear import a8_mid_config

    m, n, k = 100, 72, 256
    dt = torch.float8_e4m3fn if w_qdtype == "fp8e4m3" else torch.int8
    xq = torch.randint(-8, 9, (m, k)).float().to(dt)
    wq = torch.randint(-8, 9, (n, k)).float().to(dt)
    y = a8_gemm(xq.to(device), torch.ones(m, 1, device=device), wq.to(device), torch.ones(n, device=device), None,
                None, w_qdtype, 0, 0, torch.float32, config=a8_mid_config(width))
    assert torch.equal(y.cpu(), (xq.double() @ wq.double().T).float())


A8_CASES = [  # weight qdtype, weight group, symmetric, activation qdtype, activation group, M
    ("int8", 0, True, "int8", 0, 3),       # w8a8
    ("int8", 0, True, "int8", 64, 17),     # w8a8-g64
    ("int4", 64, False, "int8", 0, 2),     # w4a8 (asymmetric int4 g64)
    ("int4", 0, True, "int8", 0, 20),
    ("fp8e4m3", 0, True, "fp8e4m3", 0, 4),    # fp8 rowwise
    ("fp8e4m3", 64, True, "fp8e4m3", 64, 18),  # fp8 block-scaled (recipe fp8)
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("w_qdtype,w_group,symmetric,a_qdtype,a_group,m", A8_CASES)
def test_a8_linear_matches_reference(device, w_qdtype, w_group, symmetric, a_qdtype, a_group, m):
    n, k = 48, 256
    q, s, z = quantized_weight(n, k, w_qdtype, w_group, symmetric, device)
    x = torch.randn(m, k, device=device).to(torch.bfloat16)
    bias = torch.randn(n, device=device).to(torch.bfloat16)
    ref = a8_linear_ref(x, q, s, z, bias, w_qdtype, w_group, a_qdtype, a_group)
    for scaled_mm in ([False, True] if device == "cuda" and w_qdtype == "fp8e4m3" else [False]):
        y = a8_linear(x, q, s, z, bias, w_qdtype, w_group, a_qdtype, a_group, scaled_mm)
        assert y.shape == (m, n)
        assert _rel(y, ref) <= TOL[torch.bfloat16], (w_qdtype, a_group, scaled_mm)


@pytest.mark.parametrize("device", DEVICES)
def test_kernels_refuse_shapes_they_do_not_take(device):
    q, s, z = quantized_weight(16, 96, "int4", 32, True, device)
    x = torch.randn(1, 96, device=device).to(torch.bfloat16)
    with pytest.raises(ValueError, match="weight_only_linear.*group 48"):
        weight_only_linear(x, q, s.repeat_interleave(2, 1)[:, :2], z, None, "int4", 48)
    with pytest.raises(ValueError, match="a8_linear"):
        a8_linear(x, q, s, z, None, "int4", 32, "fp8e4m3", 0)


@pytest.mark.gpu
def test_ops_compose_with_torch_compile_and_cuda_graphs():
    q, s, z = quantized_weight(256, 512, "int4", 128, False, "cuda")
    q8, s8, _ = quantized_weight(256, 512, "int8", 0, True, "cuda")
    x = torch.randn(4, 512, device="cuda").to(torch.bfloat16)
    from lowbit.kernels.weight_only import pack_words

    wn = pack_words(q, s, z, "int4", 128, n_major=True)  # the N-major decode GEMVs compose too

    rows = torch.randn(32, 512, device="cuda").to(torch.bfloat16)  # past the GEMVs' rows (session 59's paths)
    wf = (torch.randn(512, 512, device="cuda") / 16).to(torch.bfloat16)

    def f(x):
        h = torch.ops.lowbit.weight_only_linear(x, q, s, z, None, "int4", 128)
        h = h + torch.ops.lowbit.weight_only_linear(x, *wn, None, "int4", 128)
        h = h + torch.ops.lowbit.weight_only_linear(x[:1], *wn, None, "int4", 128)
        # (4 rows: a8_gemv, which adds the residual in its store)
        y = torch.ops.lowbit.a8_linear(h[:, :512] if h.shape[1] >= 512 else torch.cat([h, h], 1), q8, s8, None,
                                       None, "int8", 0, "int8", 0, residual=h)
        gated = torch.ops.lowbit.float_linear(rows, wf, None, "silu*up")  # cuBLAS, then apply_epilogue's launch
        # 32 rows: a8_gemm, the residual added in its store (HAS_RES)
        return y, gated, torch.ops.lowbit.a8_linear(rows, q8, s8, None, None, "int8", 0, "int8", 0, residual=gated)

    eager = f(x)
    # Inductor fuses the bf16 adds between the ops (one rounding instead of three), so compare to bf16 rounding;
    # the ops themselves run the same kernels (an exact test of each op is above)
    compiled = torch.compile(f, fullgraph=True)
    for got, want in zip(compiled(x), eager):
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2 * want.abs().max().item())
    graphed = torch.compile(f, fullgraph=True, mode="reduce-overhead")
    for _ in range(3):
        out = graphed(x)
    for got, want in zip(out, eager):
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2 * want.abs().max().item())


@pytest.mark.parametrize("device", DEVICES)
def test_quant_linear_module_calls_the_ops(device):
    from lowbit.kernels.modules import QuantLinear

    q, s, z = quantized_weight(32, 128, "int4", 64, False, device)
    x = torch.randn(3, 128, device=device).to(torch.bfloat16)
    mod = QuantLinear(q, s, z, None, "int4", 64)
    assert mod.qweight.dtype == torch.int32 and mod.qweight.numel() * 4 == q.numel()  # the decode layout
    assert _rel(mod(x), weight_only_linear_ref(x, q, s, z, None, "int4", 64)) <= TOL[torch.bfloat16]
    q8, s8, _ = quantized_weight(32, 128, "int8", 0, True, device)
    mod8 = QuantLinear(q8, s8, None, None, "int8", 0, "int8", 0)
    assert _rel(mod8(x), a8_linear_ref(x, q8, s8, None, None, "int8", 0, "int8", 0)) <= TOL[torch.bfloat16]
    assert "w=int4/g64" in repr(mod) and "a=int8" in repr(mod8)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("qdtype,group", [("int4", 64), ("int8", 0)])
def test_gemv_with_deferred_reduction_matches_reference(device, qdtype, group):
    from lowbit.kernels import weight_only as wo

    q, s, z = quantized_weight(48, 512, qdtype, group, False, device)
    x = torch.randn(1, 512, device=device).to(torch.bfloat16)
    out = torch.empty(1, 48, device=device, dtype=torch.bfloat16)
    cfg = {"BLOCK_M": 1, "BLOCK_N": 16, "BLOCK_K": 128, "num_warps": 4, "num_stages": 3, "DEFER": True, "SPLIT_K": 2}
    wo._launch_gemv(x, q, s, z, None, out, qdtype in wo.PACKED_QDTYPES, True, group, cfg)
    assert _rel(out, weight_only_linear_ref(x, q, s, z, None, qdtype, group)) <= TOL[torch.bfloat16]


WORDS_CASES = [  # qdtype, group, symmetric, activation dtype, M, K: CUDA-core (M <= 4) and tensor-core (5..16) GEMVs
    ("int4", 128, True, torch.bfloat16, 1, 512),
    ("uint4", 64, False, torch.bfloat16, 3, 768),
    ("int4", 32, True, torch.float16, 16, 256),
    ("int4", 0, False, torch.bfloat16, 5, 512),
    ("int3", 16, True, torch.bfloat16, 2, 256),
    ("int8", 0, True, torch.bfloat16, 1, 256),
    ("uint8", 64, False, torch.float16, 9, 256),
    ("int4", 64, False, torch.bfloat16, 20, 512),  # M > 16: dequantize + matmul
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("qdtype,group,symmetric,dtype,m,k", WORDS_CASES)
def test_word_layout_gemv_matches_reference(device, qdtype, group, symmetric, dtype, m, k):
    """The decode layout (``pack_words``, made once at lowering): round-trips to the stored form bit-exactly, its
    dequantize kernel is bit-exact, and the GEMVs agree with the reference on the stored form."""
    from lowbit.kernels.weight_only import pack_words, unpack_words

    n = 48
    q, s, z = quantized_weight(n, k, qdtype, group, symmetric, device)
    words, s2, z2 = pack_words(q, s, z, qdtype, group)
    assert words.dtype == torch.int32 and words.numel() * 4 == q.numel()  # same bytes
    assert torch.equal(unpack_words(words, qdtype, k, group).view(torch.uint8), q.view(torch.uint8))
    ref_w = dequantize(q, s, z, qdtype=qdtype, axis=1 if group else 0, block_size=group or None,
                       out_dtype=torch.float16)
    assert torch.equal(dequantize_weight(words, s2, z2, qdtype, group, k, torch.float16), ref_w)
    x = torch.randn(m, k, device=device).to(dtype)
    bias = torch.randn(n, device=device).to(dtype)
    y = weight_only_linear(x, words, s2, z2, bias, qdtype, group)
    ref = weight_only_linear_ref(x, q, s, z, bias, qdtype, group)
    assert y.shape == (m, n) and y.dtype == dtype
    assert _rel(y, ref) <= TOL[dtype], (qdtype, group, m)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cfg", [{"TC": False, "BLOCK_M": 1, "BLOCK_N": 16, "U": 2, "SPLIT_K": 2},
                                 {"TC": True, "BLOCK_M": 16, "BLOCK_N": 16, "SWAP": True, "SPLIT_K": 2},
                                 {"TC": True, "BLOCK_M": 16, "BLOCK_N": 32, "SWAP": False, "SPLIT_K": 1},
                                 {"TC": False, "BLOCK_M": 1, "BLOCK_N": 16, "U": 2, "SPLIT_K": 1, "PREFETCH": 2},
                                 {"TC": True, "BLOCK_M": 16, "BLOCK_N": 16, "SWAP": True, "SPLIT_K": 2,
                                  "PREFETCH": 1}])
def test_word_layout_gemv_configs_match_reference(device, cfg):
    """Split-K partials, a chunk step past the last chunk (3 chunks, U = 2), both dot orientations, prefetching."""
    from lowbit.kernels import weight_only as wo

    q, s, z = quantized_weight(40, 768, "int4", 128, False, device)
    words, s2, z2 = wo.pack_words(q, s, z, "int4", 128, n_major=False)
    x = torch.randn(1, 768, device=device).to(torch.bfloat16)
    out = torch.empty(1, 40, device=device, dtype=torch.bfloat16)
    wo._launch_words(x, words, s2, z2, None, out, "int4", 128, dict(cfg, num_warps=4, num_stages=2))
    assert _rel(out, weight_only_linear_ref(x, q, s, z, None, "int4", 128)) <= TOL[torch.bfloat16]


N_MAJOR_CASES = [  # qdtype, group, symmetric, M, launch config: both N-major kernels, split-K, prefetch, masks
    ("int4", 128, False, 1, {"TC": False, "BLOCK_M": 1, "BLOCK_N": 16, "U": 2, "SPLIT_K": 2}),
    ("uint4", 0, False, 1, {"TC": False, "BLOCK_M": 1, "BLOCK_N": 32, "U": 1, "SPLIT_K": 1, "PREFETCH": 2}),
    ("int4", 64, True, 1, {"TC": False, "BLOCK_M": 1, "BLOCK_N": 32, "U": 2, "SPLIT_K": 2, "RED": True}),
    ("int4", 0, True, 1, {"TC": False, "BLOCK_M": 1, "BLOCK_N": 16, "U": 1, "SPLIT_K": 1, "RED": True}),
    # _gemv_r (ROWS): g128 asym split over steps of one chunk, per channel, g32 (8 groups per step), symmetric g64
    ("int4", 128, False, 1, {"TC": False, "BLOCK_M": 1, "BLOCK_N": 16, "ROWS": 8, "SPLIT_K": 3}),
    ("int4", 128, True, 1, {"TC": False, "BLOCK_M": 1, "BLOCK_N": 16, "ROWS": 8, "SPLIT_K": 5, "PREFETCH": 1}),
    ("uint4", 0, False, 1, {"TC": False, "BLOCK_M": 1, "BLOCK_N": 32, "ROWS": 4, "SPLIT_K": 1}),
    ("int4", 32, False, 1, {"TC": False, "BLOCK_M": 1, "BLOCK_N": 16, "ROWS": 16, "SPLIT_K": 2}),
    ("int4", 64, True, 1, {"TC": False, "BLOCK_M": 1, "BLOCK_N": 64, "ROWS": 32, "SPLIT_K": 1}),
    ("int4", 128, False, 1, {"TC": False, "BLOCK_M": 1, **R_RULE}),  # the rule off _R_TABLE
    ("int8", 64, True, 3, {"TC": True, "BLOCK_M": 16, "BLOCK_N": 16, "SWAP": True, "SPLIT_K": 2}),
    ("int4", 32, False, 16, {"TC": True, "BLOCK_M": 16, "BLOCK_N": 32, "SWAP": False, "SPLIT_K": 1, "PREFETCH": 1}),
    ("int4", 128, False, 5, {"TC": True, "BLOCK_M": 16, "BLOCK_N": 16, "SWAP": True, "SPLIT_K": 2, "PAIRS": True}),
    ("uint4", 0, False, 16, {"TC": True, "BLOCK_M": 16, "BLOCK_N": 32, "SWAP": False, "SPLIT_K": 1, "PAIRS": True}),
    # prefill M (16 < M <= 256): 32- and 64-row tiles, a partial last row tile, split-K
    ("int4", 128, False, 40, {"TC": True, "BLOCK_M": 32, "BLOCK_N": 16, "SWAP": False, "SPLIT_K": 2}),
    ("int4", 64, True, 70, {"TC": True, "BLOCK_M": 64, "BLOCK_N": 32, "SWAP": False, "SPLIT_K": 1, "PREFETCH": 1}),
    # _tc_chunk (PS positions per dot): g128 asym split-K, per channel, g32 symmetric, uint4
    ("int4", 128, False, 40, {"TC": True, "BLOCK_M": 32, "BLOCK_N": 16, "PS": 4, "SPLIT_K": 2}),
    ("int4", 0, False, 20, {"TC": True, "BLOCK_M": 16, "BLOCK_N": 32, "PS": 8, "SPLIT_K": 1}),
    ("int4", 32, True, 3, {"TC": True, "BLOCK_M": 16, "BLOCK_N": 16, "PS": 2, "SPLIT_K": 3}),
    ("uint4", 64, False, 17, {"TC": True, "BLOCK_M": 32, "BLOCK_N": 16, "PS": 4, "SPLIT_K": 1}),
    # _tc_chunk with SWAP (the weights as the dot's first operand): g128 asym split-K, per channel
    ("int4", 128, False, 40, {"TC": True, "BLOCK_M": 32, "BLOCK_N": 16, "PS": 4, "SPLIT_K": 2, "SWAP": True}),
    ("int4", 0, True, 20, {"TC": True, "BLOCK_M": 16, "BLOCK_N": 32, "PS": 8, "SPLIT_K": 1, "SWAP": True}),
]


def _interleaved(n: int, k: int, qdtype: str, group: int, symmetric: bool, device: str):
    """A weight (rows 0..n/2-1 the gate, then the up rows), its bias, and the same with rows interleaved
    (``interleave_rows``): what a gated epilogue reads."""
    from lowbit.kernels.weight_only import interleave_rows

    q, s, z = quantized_weight(n, k, qdtype, group, symmetric, device)
    b = torch.randn(n, device=device).to(torch.bfloat16)
    return (q, s, z, b), tuple(interleave_rows(t) for t in (q, s, z, b))


def _near_epilogue(got: torch.Tensor, unfused: torch.Tensor, epilogue: str) -> bool:
    """The fused epilogue against the same product with the epilogue's torch ops after it. The two pre-activations
    differ: the unfused ops read the product rounded to bf16 (one step, relative 2^-8) and the kernels may sum and
    scale in another order (an error relative to the row's largest outputs, not to a small output cancelled out of
    large terms). Measured on the H200's fp8 rows: GELU at x = -3 (slope -0.012) and at x = 0.028 (a 7e-4
    difference of a row whose outputs reach ~40). Bound: two bf16 steps of the result, plus the change of the
    epilogue over ``du = 2^-8 |u| + 2^-12 max_row |u|`` either way, plus 1e-5 absolute for GELU's ``1 + erf``
    cancellation far below zero. A wrong activation misses it by O(1)."""
    from lowbit.kernels._common import epilogue_ref

    u = unfused.float()
    ref = epilogue_ref(unfused, epilogue).float()
    du = u.abs() * 2 ** -8 + u.abs().amax(-1, keepdim=True) * 2 ** -12
    slope = torch.maximum((epilogue_ref(u + du, epilogue) - ref).abs(), (epilogue_ref(u - du, epilogue) - ref).abs())
    excess = (got.float() - ref).abs() - (ref.abs() * 2 ** -6 + slope + 1e-5)
    if bool((excess <= 0).all()):
        return True
    i = int(excess.flatten().nan_to_num(float("inf")).argmax())
    pre = u.unflatten(-1, (-1, 2)).flatten(0, -2)[i].tolist() if "*" in epilogue else u.flatten()[i].item()
    raise AssertionError(f"epilogue {epilogue}: fused {got.flatten()[i].item()!r} vs unfused "
                         f"{ref.flatten()[i].item()!r} at pre-activation {pre!r} "
                         f"(over the bound by {excess.flatten()[i].item():.3g}; {int((excess > 0).sum())} elements)")


WO_EPILOGUE_CASES = [  # epilogue, M, N-major words, the word-layout config forced (None: the op's choice)
    ("silu*up", 1, True, {"TC": False, "BLOCK_M": 1, "BLOCK_N": 16, "ROWS": 8, "SPLIT_K": 3}),  # _gemv_r
    ("gelu*up", 1, True, {"TC": False, "BLOCK_M": 1, "BLOCK_N": 16, "ROWS": 8, "SPLIT_K": 1}),  # one split: reduced
    ("silu*up", 1, True, {"TC": False, "BLOCK_M": 1, "BLOCK_N": 16, "U": 1, "SPLIT_K": 2}),  # _gemv_t
    ("gelu_tanh*up", 5, True, {"TC": True, "BLOCK_M": 16, "BLOCK_N": 16, "SWAP": True, "SPLIT_K": 2}),  # _tc_t
    ("silu*up", 1, False, {"TC": False, "BLOCK_M": 1, "BLOCK_N": 16, "U": 2, "SPLIT_K": 2}),  # K-major _gemv_words
    ("silu*up", 40, True, None),  # M > 16: dequantize + F.linear, the epilogue's ops after it
    ("gelu", 1, True, {"TC": False, "BLOCK_M": 1, "BLOCK_N": 16, "ROWS": 8, "SPLIT_K": 1}),
    ("gelu_tanh", 3, True, None),  # the op's own config at M = 3
    ("silu", 5, True, {"TC": True, "BLOCK_M": 16, "BLOCK_N": 16, "SWAP": True, "SPLIT_K": 1}),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("epilogue,m,n_major,cfg", WO_EPILOGUE_CASES)
def test_weight_only_epilogue_is_the_unfused_activation(device, epilogue, m, n_major, cfg, monkeypatch):
    """``epilogue``: an activation on the output, or on a merged gate/up weight with its rows interleaved
    ``act(gate) * up`` of the plain layout's split, half as wide; on every word path (in the split-K reduce) and
    with a bias. The reference (``weight_only_linear_ref(epilogue=...)``) is the unfused ops."""
    from lowbit.kernels import weight_only as wo
    from lowbit.kernels._common import activation_ref

    n, k = 48, 768
    act, _, up = epilogue.partition("*")
    (q, s, z, b), inter = _interleaved(n, k, "int4", 128, False, device)
    x = torch.randn(m, k, device=device).to(torch.bfloat16)
    plain = weight_only_linear_ref(x, q, s, z, b, "int4", 128)
    if up:
        q, s, z, b = inter
        want = activation_ref(plain[:, : n // 2], act) * plain[:, n // 2:]
    else:
        want = activation_ref(plain, act)
    assert torch.equal(weight_only_linear_ref(x, q, s, z, b, "int4", 128, epilogue), want)
    words, s2, z2 = wo.pack_words(q, s, z, "int4", 128, n_major=n_major)
    if cfg is not None:
        monkeypatch.setattr(wo, "words_config", lambda *a, **kw: dict(cfg, num_warps=4, num_stages=2))
    got = weight_only_linear(x, words, s2, z2, b, "int4", 128, "auto", epilogue)
    assert got.shape == (m, n // 2 if up else n) and got.dtype == torch.bfloat16
    assert _near_epilogue(got, weight_only_linear(x, words, s2, z2, b, "int4", 128), epilogue)
    assert _rel(got, want) <= 2 * TOL[torch.bfloat16]  # two bf16 GEMV outputs' errors in one product
    if up:
        with pytest.raises(ValueError, match="even N"):
            weight_only_linear(x, words[:47], s2[:47], z2[:47], None, "int4", 128, "auto", epilogue)


NORM_RESIDUAL_CASES = [  # qdtype, group, symmetric, M, bias, the word config forced (None: the op's own)
    ("int4", 128, False, 1, True, {"TC": False, "BLOCK_M": 1, "BLOCK_N": 16, "ROWS": 8, "SPLIT_K": 3}),  # _gemv_r
    ("uint4", 0, False, 1, False, {"TC": False, "BLOCK_M": 1, "BLOCK_N": 32, "ROWS": 4, "SPLIT_K": 1}),  # one split
    ("int4", 128, False, 1, True, {"TC": False, "BLOCK_M": 1, "BLOCK_N": 16, "U": 1, "SPLIT_K": 2}),  # _gemv_t
    ("int4", 64, True, 5, False, {"TC": True, "BLOCK_M": 16, "BLOCK_N": 16, "SWAP": True, "SPLIT_K": 2}),  # _tc_t
    ("int4", 128, False, 40, True, None),  # M > 16: dequantize + F.linear
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("qdtype,group,symmetric,m,bias,cfg", NORM_RESIDUAL_CASES)
def test_block_add_and_norm_split_around_weight_only_linears(device, qdtype, group, symmetric, m, bias, cfg,
                                                             monkeypatch):
    """A block's ``stream = residual + linear(x)`` then ``linear2(rms_norm(stream))`` as
    ``weight_only_linear_add_norm`` (the stream, gain * stream and partial sums of its squares) and
    ``weight_only_linear(gained, norm_sumsq=...)``: the unfused ops on every path (the split-K reduces at M = 1,
    torch ops elsewhere) to bf16 rounding — the split rounds ``gain * stream`` where the IR's norm rounds the
    normalised row. The stream's RMS (~7) and a gain far from 1 make a norm left out or doubled miss by O(1)."""
    from lowbit.ir import ops as ir_ops
    from lowbit.kernels import weight_only as wo
    from lowbit.kernels._common import norm_from_parts_ref, norm_parts_ref

    n, k, eps = 256, 384, 1e-5  # n = the stream's width = linear2's K; K: 3 groups of 128, 6 steps of _gemv_r
    q, s, z = quantized_weight(n, k, qdtype, group, symmetric, device)
    q2, s2_, z2_ = quantized_weight(40, n, qdtype, min(group, 64), symmetric, device)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(m, k, generator=gen).to(torch.bfloat16).to(device)
    g = (0.5 + torch.rand(n, generator=gen)).to(torch.bfloat16).to(device)
    r = (7 * torch.randn(m, n, generator=gen)).to(torch.bfloat16).to(device)
    b = torch.randn(n, generator=gen).to(torch.bfloat16).to(device) if bias else None
    stream = r + weight_only_linear_ref(x, q, s, z, b, qdtype, group)
    normed = ir_ops.rms_norm(stream, g, eps=eps, compute_dtype=torch.float32)
    assert _rel(norm_from_parts_ref(*norm_parts_ref(stream, g), eps), normed) <= 2 ** -7
    want = weight_only_linear_ref(normed, q2, s2_, z2_, None, qdtype, min(group, 64))
    words, ws, wz = wo.pack_words(q, s, z, qdtype, group, n_major=True)
    words2, ws2, wz2 = wo.pack_words(q2, s2_, z2_, qdtype, min(group, 64), n_major=True)
    if cfg is not None:
        monkeypatch.setattr(wo, "words_config", lambda *a, **kw: dict(cfg, num_warps=4, num_stages=2))
    for w, sc, zp in ((words, ws, wz), (q, s, z)):  # the decode layout, then the stored one (torch ops)
        got_stream, gained, sumsq = weight_only_linear_add_norm(x, w, sc, zp, b, qdtype, group, r, g)
        assert got_stream.shape == (m, n) and gained.shape == (m, n) and sumsq.shape[0] == m
        assert _rel(got_stream, stream) <= TOL[torch.bfloat16]
        assert _rel(gained, g * got_stream) <= 2 ** -7
        assert _rel(sumsq.sum(-1), got_stream.float().pow(2).sum(-1)) <= 2 ** -7  # of the stream it returns
        got = weight_only_linear(gained, words2, ws2, wz2, None, qdtype, min(group, 64), norm_sumsq=sumsq,
                                 norm_eps=eps)
        assert _rel(got, want) <= 2 * TOL[torch.bfloat16]
        assert _rel(weight_only_linear(gained, words2, ws2, wz2, None, qdtype, min(group, 64)), want) > 0.5


@pytest.mark.parametrize("device", DEVICES)
# (1, 256, 512, 128) under the slow mark (6 s): one row at group 128 is (1, 192, 576, 64)'s path, three rows' shape
@pytest.mark.parametrize("m,n,k,group", [pytest.param(1, 256, 512, 128, marks=pytest.mark.slow), (3, 256, 512, 128),
                                         (1, 192, 576, 64)])
def test_pdl_ops_match_their_fake_impls_and_the_plain_ops(device, m, n, k, group):
    """The opaque PDL ops (the default weight-only path on Hopper): ``torch.library.opcheck`` (schema, fake impl
    shapes and dtypes, against the real op's) and the same outputs as the plain ops, at M = 1 on the decode layout
    (the GEMV and its reduce: ``_gemv_t`` with the reduce folded in where the op has a fusion, split + reduce
    where it has none; SmolLM2's k_proj shape at groups of 64) and M = 3 (torch ops after the product)."""
    from lowbit.kernels import weight_only as wo

    q, s, z = quantized_weight(n, k, "int4", group, False, device)
    words, ws, wz = wo.pack_words(q, s, z, "int4", group, n_major=True)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(m, k, generator=gen).to(torch.bfloat16).to(device)
    r = torch.randn(m, n, generator=gen).to(torch.bfloat16).to(device)
    g = (0.5 + torch.rand(n, generator=gen)).to(torch.bfloat16).to(device)
    sumsq = torch.rand(m, 2, generator=gen).to(device)
    plain = (x, words, ws, wz, None, "int4", group)
    cases = ((torch.ops.lowbit.weight_only_linear_pdl, (*plain, "", sumsq, 1e-5),
              lambda: weight_only_linear(*plain, "auto", "", sumsq, 1e-5)),
             (torch.ops.lowbit.weight_only_linear_pdl, plain, lambda: weight_only_linear(*plain)),
             (torch.ops.lowbit.weight_only_linear_add_norm_pdl, (*plain, r, g),
              lambda: weight_only_linear_add_norm(*plain, r, g)))
    for op, args, ref in cases:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))
        got, want = op(*args), ref()
        for a, b in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
            assert a.shape == b.shape and torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("m", [1, 20])
@pytest.mark.parametrize("w_qdtype,w_group,a_group", [("int8", 0, 0), ("fp8e4m3", 64, 64)])
def test_a8_pdl_ops_match_their_fake_impls_and_the_plain_ops(device, m, w_qdtype, w_group, a_group):
    """The opaque A8 PDL ops of a W8A8 / FP8 decode step (``a8_linear_pdl``, ``a8_linear_q_pdl``,
    ``a8_linear_add_norm_pdl``, ``rms_norm_quant_pdl``): ``torch.library.opcheck`` (schema and fake impl against the
    real op: the add+norm's partial count, one per GEMV program at M = 1, one per row from the GEMM's
    ``add_norm_parts`` at M = 20) and the plain ops' outputs bit for bit (the same kernels; PDL changes only the
    launch on a GPU). fp8: the fake impl only (the schema check compares inputs before and after with
    ``torch.allclose``, which torch implements for fp8 on neither the CPU nor CUDA: "mul_cuda not implemented for
    'Float8_e4m3fn'", H100, torch 2.11, session 53); the int8 cases check the same schemas."""
    a_qdtype = "fp8e4m3" if w_qdtype == "fp8e4m3" else "int8"
    n, k = 128, 256
    q, s, _ = quantized_weight(n, k, w_qdtype, w_group, True, device)
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(m, k, generator=gen).to(torch.bfloat16).to(device)
    stream = torch.randn(m, n, generator=gen).to(torch.bfloat16).to(device)
    gain = (0.5 + torch.rand(n, generator=gen)).to(torch.bfloat16).to(device)
    norm_gain = (0.5 + torch.rand(k, generator=gen)).to(torch.bfloat16).to(device)
    xq, xs = quantize_activation(x, a_qdtype, a_group)
    lin = (x, q, s, None, None, w_qdtype, w_group, a_qdtype, a_group, False)
    cases = {"a8_linear": (*lin, "", 0, stream), "a8_linear_q": (xq, xs, q, s, None, None, w_qdtype, w_group,
                                                                   a_group, torch.bfloat16, False, "silu*up"),
             "a8_linear_add_norm": (*lin[:9], stream, gain, False),
             "rms_norm_quant": (x, norm_gain, 1e-6, True, a_qdtype, a_group)}
    checks = ("test_schema", "test_faketensor") if a_qdtype == "int8" else ("test_faketensor",)
    for name, args in cases.items():
        pdl_op, plain = getattr(torch.ops.lowbit, name + "_pdl"), getattr(torch.ops.lowbit, name)
        torch.library.opcheck(pdl_op, args, test_utils=checks)
        got, want = pdl_op(*args), plain(*args)
        for a, b in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
            assert a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


@pytest.mark.parametrize("device", DEVICES)
def test_weight_only_epilogue_names_a_bad_one(device):
    q, s, z = quantized_weight(16, 128, "int4", 64, True, device)
    x = torch.randn(1, 128, device=device).to(torch.bfloat16)
    for bad in ("relu", "*up", "silu*down", "up"):
        with pytest.raises(ValueError, match=re.escape(f"epilogue {bad!r}")):
            weight_only_linear(x, q, s, z, None, "int4", 64, "auto", bad)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("epilogue", ["gelu", "gelu_tanh", "silu*up", "gelu_tanh*up"])
@pytest.mark.parametrize("w_qdtype,w_group,symmetric,a_qdtype,a_group,m",
                         [A8_CASES[0], A8_CASES[2], A8_CASES[5]])
def test_a8_linear_epilogue_is_the_unfused_activation(device, epilogue, w_qdtype, w_group, symmetric, a_qdtype,
                                                      a_group, m):
    """The A8 GEMM's store applies the epilogue (gated: interleaved rows of the weight, its scales and zero points,
    the bias) as the unfused ops would after it: W8A8, W4A8 with zero points, block-scaled FP8."""
    n, k = 48, 256
    up = epilogue.endswith("*up")
    plain, inter = _interleaved(n, k, w_qdtype, w_group, symmetric, device)
    q, s, z, b = inter if up else plain
    x = torch.randn(m, k, device=device).to(torch.bfloat16)
    ref = a8_linear_ref(x, q, s, z, b, w_qdtype, w_group, a_qdtype, a_group, epilogue)
    for scaled_mm in ([False, True] if device == "cuda" and w_qdtype == "fp8e4m3" else [False]):
        y = a8_linear(x, q, s, z, b, w_qdtype, w_group, a_qdtype, a_group, scaled_mm, epilogue)
        assert y.shape == (m, n // 2 if up else n)
        unfused = a8_linear(x, q, s, z, b, w_qdtype, w_group, a_qdtype, a_group, scaled_mm)
        assert _near_epilogue(y, unfused, epilogue), (epilogue, w_qdtype, scaled_mm)
        assert _rel(y, ref) <= 2 * TOL[torch.bfloat16], (epilogue, w_qdtype, scaled_mm)


@pytest.mark.parametrize("device", DEVICES)
def test_prefill_m_takes_the_tensor_core_words_only_where_swept(device, monkeypatch):
    """16 < M <= 256 runs ``_tc_t`` at (M bucket, N, K) in ``_PREFILL_TC_TABLE`` and dequantize + cuBLAS
    elsewhere; both agree with the reference."""
    from lowbit.kernels import weight_only as wo

    n, k = 48, 512
    q, s, z = quantized_weight(n, k, "int4", 128, False, device)
    words, s2, z2 = wo.pack_words(q, s, z, "int4", 128, n_major=True)
    x = torch.randn(50, k, device=device).to(torch.bfloat16)
    ref = weight_only_linear_ref(x, q, s, z, None, "int4", 128)
    launched = []
    real = wo._launch_words
    monkeypatch.setattr(wo, "_launch_words", lambda *a, **kw: launched.append(a[8]) or real(*a, **kw))
    assert wo.prefill_tc_config(50, n, k) is None
    assert _rel(weight_only_linear(x, words, s2, z2, None, "int4", 128), ref) <= TOL[torch.bfloat16]
    assert launched == []  # not swept: dequantize + F.linear
    cfg = {"BLOCK_M": 64, "BLOCK_N": 16, "SWAP": False, "num_warps": 4, "num_stages": 2, "SPLIT_K": 2}
    monkeypatch.setitem(wo._PREFILL_TC_TABLE, (64, n, k), cfg)
    assert wo.prefill_bucket(50) == 64 and wo.prefill_tc_config(300, n, k) is None
    assert _rel(weight_only_linear(x, words, s2, z2, None, "int4", 128), ref) <= TOL[torch.bfloat16]
    assert launched == [dict(cfg, TC=True)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("qdtype,group,m", [("int4", 128, 1), ("uint8", 64, 9)])
def test_k_major_words_through_the_op(device, qdtype, group, m):
    """The K-major decode layout (``n_major=False``) still runs through the op (its own config table and rule)."""
    from lowbit.kernels import weight_only as wo

    q, s, z = quantized_weight(48, 512, qdtype, group, False, device)
    words, s2, z2 = wo.pack_words(q, s, z, qdtype, group, n_major=False)
    assert not wo.is_n_major(words) and words.is_contiguous()
    x = torch.randn(m, 512, device=device).to(torch.bfloat16)
    ref = weight_only_linear_ref(x, q, s, z, None, qdtype, group)
    assert _rel(weight_only_linear(x, words, s2, z2, None, qdtype, group), ref) <= TOL[torch.bfloat16]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("qdtype,group,symmetric,m,cfg", N_MAJOR_CASES)
def test_n_major_words_match_reference(device, qdtype, group, symmetric, m, cfg):
    """The N-major decode layout (``pack_words(..., n_major=True)``: the same words, strides ``(1, N)``): exact round
    trip and dequantize, and its GEMVs (``_gemv_t``, ``_gemv_r``, ``_tc_t``, ``_tc_pairs``, ``_tc_chunk``) agree
    with the reference."""
    from lowbit.kernels import weight_only as wo

    n, k = 40, 768
    q, s, z = quantized_weight(n, k, qdtype, group, symmetric, device)
    words, s2, z2 = wo.pack_words(q, s, z, qdtype, group, n_major=True)
    assert wo.is_n_major(words) and words.shape == (n, k * (4 if qdtype.endswith("4") else 8) // 32)
    assert torch.equal(wo.unpack_words(words, qdtype, k, group).view(torch.uint8), q.view(torch.uint8))
    ref_w = dequantize(q, s, z, qdtype=qdtype, axis=1 if group else 0, block_size=group or None,
                       out_dtype=torch.float16)
    assert torch.equal(dequantize_weight(words, s2, z2, qdtype, group, k, torch.float16), ref_w)
    x = torch.randn(m, k, device=device).to(torch.bfloat16)
    out = torch.empty(m, n, device=device, dtype=torch.bfloat16)
    wo._launch_words(x, words, s2, z2, None, out, qdtype, group, dict(cfg, num_warps=4, num_stages=2))
    assert _rel(out, weight_only_linear_ref(x, q, s, z, None, qdtype, group)) <= TOL[torch.bfloat16]


def test_gemv_r_serves_large_int4_shapes_off_its_table():
    """M = 1 int4 on N-major words: ``_R_TABLE``'s shapes get their sweep config, other weights of 12M or more
    ``R_RULE`` (run S11: 1.20-1.35x the ``_t_rule`` config at the pruned Llama-7B widths; the two where it measured
    a faster config are table entries now), small ones, int8 and M > 1 ``_gemv_t`` / tensor cores."""
    from lowbit.kernels import weight_only as wo

    table = wo.words_config(1, 11008, 4096, 4, 16, n_major=True)
    assert table["ROWS"] == 16 and table["BLOCK_N"] == 128  # (11008, 4096) in _R_TABLE
    for n, k in ((9984, 4096), (4096, 3328)):  # pruned widths where S11 measured a config faster than R_RULE
        assert wo.words_config(1, n, k, 4, 16, n_major=True) == dict(wo._R_TABLE[(n, k)], BLOCK_M=1, TC=False)
    for n, k in ((17408, 4096), (4096, 8704), (14336, 4096)):
        assert wo.words_config(1, n, k, 4, 16, n_major=True) == dict(wo.R_RULE, BLOCK_M=1, TC=False)
    assert "ROWS" not in wo.words_config(1, 1536, 576, 4, 16, n_major=True)  # SmolLM2's MLP: _gemv_t
    assert "ROWS" not in wo.words_config(1, 9984, 4096, 8, 16, n_major=True)  # int8 codes
    assert "ROWS" not in wo.words_config(4, 9984, 4096, 4, 16, n_major=True)  # tensor cores


def _launched_configs(wo, monkeypatch) -> list[dict]:
    """The configs ``_launch_words`` runs with from now on (empty where the op took dequantize + ``F.linear``)."""
    launched: list[dict] = []
    real = wo._launch_words
    monkeypatch.setattr(wo, "_launch_words", lambda *a, **kw: launched.append(a[8]) or real(*a, **kw))
    return launched


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k", [576, 1216])  # SmolLM2's hidden (9 * 64) and the pruned MLP width (19 * 64)
@pytest.mark.parametrize("group,symmetric", [(64, False), (64, True), (32, False), (0, True)])
@pytest.mark.parametrize("m", [1, 4, 16])
def test_eight_word_chunks_run_the_word_kernels_like_the_reference(device, k, group, symmetric, m, monkeypatch):
    """int4 K a multiple of 64 but not 128 takes the decode layout in 8-word chunks (``CW = 8``): exact round trip
    and dequantize, and the op's own config runs a word kernel (``_gemv_t`` at M = 1, ``_tc_chunk`` from M = 2: the
    per-position dots need CW >= 16) within the word paths' tolerance of the reference."""
    from lowbit.kernels import weight_only as wo

    n = 40
    q, s, z = quantized_weight(n, k, "int4", group, symmetric, device)
    assert wo.chunk_words(k, group, 4) == 8 and wo.chunk_words(k, group, 8) == 16  # int8: 4 codes a word
    words, s2, z2 = wo.pack_words(q, s, z, "int4", group, n_major=True)  # K-major by default at 576+
    assert words.dtype == torch.int32 and wo.is_n_major(words) and words.shape == (n, k // 8)
    assert torch.equal(wo.unpack_words(words, "int4", k, group), q)
    ref_w = dequantize(q, s, z, qdtype="int4", axis=1 if group else 0, block_size=group or None,
                       out_dtype=torch.float16)
    assert torch.equal(dequantize_weight(words, s2, z2, "int4", group, k, torch.float16), ref_w)
    launched = _launched_configs(wo, monkeypatch)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(k + m)).to(torch.bfloat16).to(device)
    got = weight_only_linear(x, words, s2, z2, None, "int4", group)
    assert _rel(got, weight_only_linear_ref(x, q, s, z, None, "int4", group)) <= TOL[torch.bfloat16]
    assert len(launched) == 1 and ("PS" in launched[0]) == (m > 1) and "ROWS" not in launched[0], launched


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("m", [1, 4])
def test_eight_word_chunks_fuse_the_gated_epilogue_and_the_block_norm(device, m, monkeypatch):
    """SmolLM2's shapes on ``CW = 8`` words take the fusions the byte layout lacks: gate/up's ``silu*up`` in the
    split-K reduce, the residual add + next norm's halves (M = 1 in the reduce, M = 4 as torch ops) and the norm's
    scaling of o_proj-like input, each within the fused paths' tolerance of the unfused reference."""
    from lowbit.ir import ops as ir_ops
    from lowbit.kernels import weight_only as wo
    from lowbit.kernels._common import activation_ref

    k, g, eps = 576, 64, 1e-5
    gen = torch.Generator().manual_seed(11 + m)
    (q, s, z, b), (qi, si, zi, bi) = _interleaved(64, k, "int4", g, False, device)
    x = torch.randn(m, k, generator=gen).to(torch.bfloat16).to(device)
    plain = weight_only_linear_ref(x, q, s, z, b, "int4", g)
    want = activation_ref(plain[:, :32], "silu") * plain[:, 32:]
    words, ws, wz = wo.pack_words(qi, si, zi, "int4", g)
    launched = _launched_configs(wo, monkeypatch)
    got = weight_only_linear(x, words, ws, wz, bi, "int4", g, "auto", "silu*up")
    assert got.shape == (m, 32) and len(launched) == 1 and ("PS" in launched[0]) == (m > 1), launched
    assert _near_epilogue(got, weight_only_linear(x, words, ws, wz, bi, "int4", g), "silu*up")
    assert _rel(got, want) <= 2 * TOL[torch.bfloat16]
    # the block: stream = r + linear(x) (N = K = 576), then linear2(rms_norm(stream)) with linear2's K = 576 too
    q1, s1, z1 = quantized_weight(k, k, "int4", g, True, device)
    q2, s2, z2 = quantized_weight(40, k, "int4", g, False, device)
    gain = (0.5 + torch.rand(k, generator=gen)).to(torch.bfloat16).to(device)
    r = (7 * torch.randn(m, k, generator=gen)).to(torch.bfloat16).to(device)
    stream = r + weight_only_linear_ref(x, q1, s1, z1, None, "int4", g)
    normed = ir_ops.rms_norm(stream, gain, eps=eps, compute_dtype=torch.float32)
    want2 = weight_only_linear_ref(normed, q2, s2, z2, None, "int4", g)
    w1, ws1, wz1 = wo.pack_words(q1, s1, z1, "int4", g)
    w2, ws2, wz2 = wo.pack_words(q2, s2, z2, "int4", g)
    assert w1.dtype == w2.dtype == torch.int32
    got_stream, gained, sumsq = weight_only_linear_add_norm(x, w1, ws1, wz1, None, "int4", g, r, gain)
    assert sumsq.shape[-1] == wo.add_norm_partials(x, w1, "int4", g)
    assert _rel(got_stream, stream) <= TOL[torch.bfloat16]
    assert _rel(gained, gain * got_stream) <= 2 ** -7
    got2 = weight_only_linear(gained, w2, ws2, wz2, None, "int4", g, norm_sumsq=sumsq, norm_eps=eps)
    assert _rel(got2, want2) <= 2 * TOL[torch.bfloat16]
    assert _rel(weight_only_linear(gained, w2, ws2, wz2, None, "int4", g), want2) > 0.5  # the norm did run


def _launched_kernels(wo, monkeypatch) -> list[str]:
    """The Triton kernels the weight-only op launches from now on, by name, in order."""
    names: list[str] = []
    real = wo.launcher

    def recording(t, kernel):
        names.append(getattr(kernel, "__name__", None) or kernel.fn.__name__)
        return real(t, kernel)

    monkeypatch.setattr(wo, "launcher", recording)
    return names


FOLD_CASES = [  # activation dtype, symmetric, group (K: 576 -> 8-word chunks, 384 -> 16), bias, epilogue, the norm
    # partials of the input (0: no norm), residual add + next norm's halves, columns a program (FOLD_T's 16 or
    # FOLD_ONE_STEP's 8)
    (torch.bfloat16, False, 64, True, "silu*up", 3, False, 16),  # gate/up: its input's norm, then act(gate) * up
    (torch.float16, True, 128, False, "gelu_tanh*up", 0, False, 16),
    (torch.bfloat16, True, 64, False, "", 0, True, 16),  # o_proj / down_proj
    (torch.float16, False, 128, True, "", 0, True, 16),
    (torch.bfloat16, False, 128, False, "", 3, False, 16),  # q/k/v: 3 partials, loaded and summed in order
    (torch.float16, True, 64, True, "gelu", 70, False, 16),  # past MANY_PARTIALS: one vector load
    (torch.bfloat16, False, 64, True, "silu*up", 3, False, 8),  # 8 columns: 4 (gate, up) pairs a program
    (torch.bfloat16, True, 64, False, "", 0, True, 8),  # 8 partials of the next norm
]


def _fold_case(q, s, z, group: int, nq: int, epilogue: str, bias: bool, dtype: torch.dtype, device: str,
               gen: torch.Generator, eps: float) -> tuple:
    """A folded GEMV case's operands for an ``[N, K]`` int4 weight: ``(x, bias, the input norm's nq partial sums of
    squares or None, residual, next norm's gain, the reference output)``. Mean squares 2-3: the norm divides by
    1.4-1.7, which a norm left out misses by far more than rounding."""
    from lowbit.kernels._common import norm_from_parts_ref

    n, k = q.shape[0], 2 * q.shape[1]  # int4 codes two to a byte
    x = torch.randn(1, k, generator=gen).to(dtype).to(device)
    b = torch.randn(n, generator=gen).to(dtype).to(device) if bias else None
    sumsq = (k * (2 + torch.rand(1, nq, generator=gen)) / nq).to(device) if nq else None
    r = (7 * torch.randn(1, n, generator=gen)).to(dtype).to(device)
    gain = (0.5 + torch.rand(n, generator=gen)).to(dtype).to(device)
    xn = x if sumsq is None else norm_from_parts_ref(x, sumsq, eps)
    return x, b, sumsq, r, gain, weight_only_linear_ref(xn, q, s, z, b, "int4", group, epilogue)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,symmetric,group,bias,epilogue,nq,residual,columns", FOLD_CASES)
def test_folded_gemv_is_the_split_reduce_in_one_launch(device, dtype, symmetric, group, bias, epilogue, nq, residual,
                                                       columns, monkeypatch):
    """``_gemv_t`` with ``FOLD`` (one split, M = 1): the epilogue and the block fusions run in the GEMV's programs,
    one launch where one split + ``_splitk_reduce`` took two, with the same bits as that pair (the same fp32 sums,
    norm and roundings), within the fused paths' tolerance of the torch reference, and with the next norm's partial
    sums one per program (the count ``add_norm_partials`` reports, each its 16 or 8 columns' sum of squares)."""
    from lowbit.kernels import weight_only as wo

    n, k, eps = 64, 576 if group == 64 else 384, 1e-5
    gen = torch.Generator().manual_seed(group + nq + len(epilogue))
    q, s, z = quantized_weight(n, k, "int4", group, symmetric, device)
    words, ws, wz = wo.pack_words(q, s, z, "int4", group, n_major=True)  # K = 576: K-major by default
    assert wo.is_n_major(words) and wo.chunk_words(k, group, 4) == (8 if k == 576 else 16)
    x, b, sumsq, r, gain, want = _fold_case(q, s, z, group, nq, epilogue, bias, dtype, device, gen, eps)
    names = _launched_kernels(wo, monkeypatch)

    def run(fold: bool):
        cfg = dict(wo.FOLD_T, U=4, BLOCK_M=1, TC=False, FOLD=fold)  # U = 4: several steps over K
        if columns == 8:
            cfg.update(wo.FOLD_ONE_STEP)
        monkeypatch.setattr(wo, "words_config", lambda *a, **kw: cfg)
        names.clear()
        if residual:
            out = weight_only_linear_add_norm(x, words, ws, wz, b, "int4", group, r, gain)
            assert out[2].shape[-1] == wo.add_norm_partials(x, words, "int4", group)
        else:
            out = (weight_only_linear(x, words, ws, wz, b, "int4", group, "auto", epilogue, sumsq, eps),)
        return out, list(names)

    (folded, *halves), one = run(True)
    (split, *split_halves), two = run(False)
    assert one == ["_gemv_t"] and two == ["_gemv_t", "_splitk_reduce"], (one, two)
    assert torch.equal(folded, split)
    if residual:
        assert torch.equal(halves[0], split_halves[0])  # gain * stream
        assert halves[1].shape == (1, n // columns) and split_halves[1].shape == (1, 1)
        tiles = folded.float().pow(2).reshape(1, n // columns, columns).sum(-1)
        assert torch.allclose(halves[1], tiles, rtol=1e-5), (halves[1], tiles)
        assert _rel(folded, r + want) <= TOL[dtype]
        assert _rel(halves[0], gain * folded) <= 2 ** -7
        return
    assert folded.shape == want.shape
    assert _rel(folded, want) <= 2 * TOL[dtype]
    if epilogue:
        unfused = weight_only_linear(x, words, ws, wz, b, "int4", group, "auto", "", sumsq, eps)
        assert _near_epilogue(folded, unfused, epilogue)
    if sumsq is not None:  # the norm did run
        assert _rel(weight_only_linear(x, words, ws, wz, b, "int4", group, "auto", epilogue), want) > 0.2


def test_fold_config_takes_one_split_at_smollm2s_shapes_and_keeps_split_k_at_7b():
    """``words_config(fused=True)`` at M = 1: SmolLM2's q/k/v, o_proj, merged gate/up and down_proj (K = 576 or 1536,
    group 64) fold the reduce into one ``_gemv_t`` launch walking K in one step of 8-column programs
    (``FOLD_ONE_STEP``) or three of 16 columns; the 7B shapes keep ``_gemv_r``'s split-K, and without an epilogue or
    fusion the split-K config is unchanged."""
    from lowbit.kernels import weight_only as wo

    for n, k, steps, columns in ((960, 576, 1, 8), (576, 576, 1, 8), (3072, 576, 1, 8), (576, 1536, 3, 16),
                                 (576, 1216, 3, 16)):
        cw = wo.chunk_words(k, 64, 4)
        cfg = wo.words_config(1, n, k, 4, cw, n_major=True, group=64, fused=True)
        nch = k // (8 * cw)
        assert cfg["FOLD"] and wo._chunk_split(nch, cfg)[1] == 1 and cdiv_(nch, cfg["U"]) == steps, (n, k, cfg)
        assert cfg["BLOCK_N"] == columns and cfg["num_warps"] == (2 if columns == 8 else 4), (n, k, cfg)
        assert cfg["U"] * cw * cfg["BLOCK_N"] <= (wo.FOLD_ONE_STEP_WORDS if steps == 1 else wo.FOLD_TILE_WORDS)
        assert "FOLD" not in wo.words_config(1, n, k, 4, cw, n_major=True, group=64)
        assert "FOLD" not in wo.words_config(4, n, k, 4, cw, n_major=True, group=64, fused=True)  # tensor cores
    for n, k in ((11008, 4096), (4096, 11008), (4096, 4096), (12288, 4096), (22016, 4096)):
        cfg = wo.words_config(1, n, k, 4, 32, n_major=True, group=128, fused=True)
        assert "ROWS" in cfg and "FOLD" not in cfg and cfg["SPLIT_K"] > 1
    assert wo.fold_config(576, 24, 8)["U"] == 8 and wo.fold_config(576, 48, 8) is None  # K = 1536 / 3072


def cdiv_(a: int, b: int) -> int:
    return -(-a // b)


K_FOLD_CASES = [  # FOLD_CASES' columns on K-major words (``_gemv_words``), per channel too: activation dtype,
    # symmetric, group (K: 576 -> 8-word chunks, 384 -> 16), bias, epilogue, norm partials, residual + next norm, rows
    (torch.bfloat16, False, 64, True, "silu*up", 3, False, 2),  # gate/up: one (gate, up) pair a program (FOLD_K)
    (torch.float16, True, 0, False, "gelu_tanh*up", 0, False, 2),
    (torch.bfloat16, True, 64, False, "", 0, True, 2),  # o_proj / down_proj: a partial per 2 rows
    (torch.float16, False, 0, True, "", 0, True, 4),
    (torch.bfloat16, False, 0, False, "", 3, False, 2),  # q/k/v
    (torch.float16, True, 64, True, "gelu", 70, False, 2),  # past MANY_PARTIALS: one vector load
    (torch.bfloat16, False, 128, True, "silu*up", 3, False, 4),  # 16-word chunks, two pairs a program
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,symmetric,group,bias,epilogue,nq,residual,rows", K_FOLD_CASES)
def test_k_major_fold_is_the_split_reduce_and_the_n_major_fold(device, dtype, symmetric, group, bias, epilogue, nq,
                                                               residual, rows, monkeypatch):
    """``_gemv_words`` with ``FOLD`` (the K-major words of ``K_MAJOR_MAX_K``): one launch with the bits of its own
    one split + ``_splitk_reduce`` (the same fp32 row, ``_norm_den`` and ``_reduced_row``), the next norm's partials
    one per program of ``rows`` rows, and the N-major fold's output (``_gemv_t``, ``FOLD_ONE_STEP``) within the
    bounds the N-major fold test holds both to: the two kernels sum K in another order, so they may differ by the
    output's rounding, not bit for bit."""
    from lowbit.kernels import weight_only as wo

    n, k, eps = 16, 576 if group != 128 else 384, 1e-5
    gen = torch.Generator().manual_seed(group + nq + len(epilogue) + rows)
    q, s, z = quantized_weight(n, k, "int4", group, symmetric, device)
    kmaj = wo.pack_words(q, s, z, "int4", group, n_major=False)
    nmaj = wo.pack_words(q, s, z, "int4", group, n_major=True)
    assert not wo.is_n_major(kmaj[0]) and wo.is_n_major(nmaj[0])
    x, b, sumsq, r, gain, want = _fold_case(q, s, z, group, nq, epilogue, bias, dtype, device, gen, eps)
    names = _launched_kernels(wo, monkeypatch)
    nch = k // (8 * wo.chunk_words(k, group, 4))

    def run(words, cfg):
        monkeypatch.setattr(wo, "words_config", lambda *a, **kw: dict(cfg, BLOCK_M=1, TC=False))
        names.clear()
        if residual:
            out = weight_only_linear_add_norm(x, *words, b, "int4", group, r, gain)
            assert out[2].shape[-1] == wo.add_norm_partials(x, words[0], "int4", group)
        else:
            out = (weight_only_linear(x, *words, b, "int4", group, "auto", epilogue, sumsq, eps),)
        return out, list(names)

    fold_k = dict(wo.FOLD_K, BLOCK_N=rows, U=wo.fold_chunks(nch, wo.chunk_words(k, group, 4), rows,
                                                            wo.FOLD_K_TILE_WORDS))
    (folded, *halves), one = run(kmaj, fold_k)
    (split, *split_halves), two = run(kmaj, dict(fold_k, FOLD=False))
    (n_fold, *n_halves), n_one = run(nmaj, dict(wo.FOLD_T, **wo.FOLD_ONE_STEP, U=4))
    assert one == ["_gemv_words"] and two == ["_gemv_words", "_splitk_reduce"] and n_one == ["_gemv_t"]
    assert torch.equal(folded, split)
    assert folded.shape == n_fold.shape == want.shape
    if residual:
        assert torch.equal(halves[0], split_halves[0])
        tiles = folded.float().pow(2).reshape(1, n // rows, rows).sum(-1)
        assert halves[1].shape == (1, n // rows) and torch.allclose(halves[1], tiles, rtol=1e-5)
        for got in (folded, n_fold):
            assert _rel(got, r + want) <= TOL[dtype]
        assert _rel(halves[0], gain * folded) <= 2 ** -7
        return
    for got in (folded, n_fold):
        assert _rel(got, want) <= 2 * TOL[dtype]
    assert _rel(folded, n_fold) <= 2 * TOL[dtype]
    if epilogue:
        unfused = weight_only_linear(x, *kmaj, b, "int4", group, "auto", "", sumsq, eps)
        assert _near_epilogue(folded, unfused, epilogue)
    if sumsq is not None:  # the norm did run
        assert _rel(weight_only_linear(x, *kmaj, b, "int4", group, "auto", epilogue), want) > 0.2


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k,group,symmetric,m,ps,split", [(576, 64, False, 3, 8, 1), (576, 0, True, 16, 4, 3),
                                                          (768, 128, False, 5, 2, 2)])
def test_tc_chunk_reads_k_major_words_as_n_major_ones(device, k, group, symmetric, m, ps, split):
    """``_tc_chunk`` on the K-major words (strides ``(1, K/8)``) gives the N-major words' output bit for bit (the
    same codes, dots and sums; only the addresses differ), at ``CW = 8`` (SmolLM2's K = 576, where no other
    tensor-core kernel takes K-major words) and 32, split-K, per channel, within the reference's tolerance."""
    from lowbit.kernels import weight_only as wo

    n = 48
    q, s, z = quantized_weight(n, k, "int4", group, symmetric, device)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m + k)).to(torch.bfloat16).to(device)
    cfg = {"TC": True, "BLOCK_M": 16, "BLOCK_N": 16, "PS": ps, "SPLIT_K": split, "num_warps": 4, "num_stages": 2}
    outs = []
    for n_major in (False, True):
        words, s2, z2 = wo.pack_words(q, s, z, "int4", group, n_major=n_major)
        out = torch.empty(m, n, device=device, dtype=torch.bfloat16)
        wo._launch_words(x, words, s2, z2, None, out, "int4", group, cfg)
        outs.append(out)
    assert torch.equal(outs[0], outs[1])
    assert _rel(outs[0], weight_only_linear_ref(x, q, s, z, None, "int4", group)) <= TOL[torch.bfloat16]


def test_k_major_rule_packs_narrow_int4_k_major_and_picks_its_configs(monkeypatch):
    """``K_MAJOR_MIN_K`` <= K <= ``K_MAJOR_MAX_K`` (576 and 1536 by default): int4 words of those K are K-major, others
    N-major (0: the rule off); at SmolLM2's shapes (group 64)
    M = 1 takes ``K_MAJOR_CC`` unfused and ``FOLD_K`` in one step (one split) with an epilogue or fusion, whose next
    norm's partials are one per 2-row program; M = 4 / 16 ``_tc_chunk`` (``CW8_TC``, ``K_MAJOR_TC`` at wider chunks);
    int8 and wider K keep N-major."""
    from lowbit.kernels import weight_only as wo

    q, s, z = quantized_weight(64, 576, "int4", 64, False)
    assert (wo.K_MAJOR_MIN_K, wo.K_MAJOR_MAX_K) == (576, 1536)
    narrow = quantized_weight(64, 512, "int4", 64, False)
    assert wo.is_n_major(wo.pack_words(*narrow, "int4", 64)[0])  # under K_MAJOR_MIN_K
    monkeypatch.setattr(wo, "K_MAJOR_MAX_K", 0)
    assert wo.is_n_major(wo.pack_words(q, s, z, "int4", 64)[0])
    monkeypatch.setattr(wo, "K_MAJOR_MAX_K", 1536)
    words = wo.pack_words(q, s, z, "int4", 64)[0]
    assert not wo.is_n_major(words) and words.is_contiguous()
    assert wo.words_n_major(576, 2048) and wo.words_n_major(576, 576, bits=8)
    for n, k in ((960, 576), (576, 576), (3072, 576), (576, 1536), (576, 1216)):
        cw = wo.chunk_words(k, 64, 4)
        nch = k // (8 * cw)
        assert wo.words_config(1, n, k, 4, cw, False, 64) == dict(wo.K_MAJOR_CC, BLOCK_M=1, TC=False)
        cfg = wo.words_config(1, n, k, 4, cw, False, 64, fused=True)
        assert cfg["FOLD"] and cfg["BLOCK_N"] == 2 and cdiv_(nch, cfg["U"]) == 1 and wo._chunk_split(nch, cfg)[1] == 1
        assert cfg["U"] * cw * cfg["BLOCK_N"] <= wo.FOLD_K_TILE_WORDS
        tc = wo.words_config(16, n, k, 4, cw, False, 64)
        assert tc["TC"] and "PS" in tc, tc  # _tc_chunk at every chunk width (K_MAJOR_TC past CW = 8)
        assert tc == (dict(wo.CW8_TC, BLOCK_M=16, TC=True, SPLIT_K=tc["SPLIT_K"]) if cw == 8 else
                      dict(wo.K_MAJOR_TC, BLOCK_M=16, TC=True, SPLIT_K=min(4, nch)))
    x = torch.randn(1, 576).to(torch.bfloat16)
    assert wo.add_norm_partials(x, words, "int4", 64) == 32


def test_eight_word_chunks_avoid_the_short_dots(monkeypatch):
    """``CW = 8`` is narrower than a ``tl.dot``'s K (16): the configs never send such words to ``_tc_t`` /
    ``_tc_words`` / ``_tc_pairs``; at 2 <= M <= 16 both memory orders run ``_tc_chunk`` (64-wide dots)."""
    from lowbit.kernels import weight_only as wo

    assert wo.words_config(4, 1536, 576, 4, 8, n_major=True, group=64)["PS"] == 8  # _tc_chunk
    assert "PS" not in wo.words_config(1, 1536, 576, 4, 8, n_major=True, group=64)  # _gemv_t
    assert not wo.pairs_ok(4, 64, 8) and wo.pairs_ok(4, 64, 16)
    assert wo.chunk_words(576, 64, 8) == 16 and wo.chunk_words(608, 32, 8) == 0  # int8 stops at 16 words
    assert wo.words_config(4, 48, 576, 4, 8, n_major=False, group=64)["PS"] == 8
    q, s, z = quantized_weight(48, 576, "int4", 64, False)
    words, s2, z2 = wo.pack_words(q, s, z, "int4", 64, n_major=False)
    launched = _launched_configs(wo, monkeypatch)
    x = torch.randn(4, 576, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    if INTERP:
        got = weight_only_linear(x, words, s2, z2, None, "int4", 64)
        assert [c.get("PS") for c in launched] == [8]
        assert _rel(got, weight_only_linear_ref(x, q, s, z, None, "int4", 64)) <= TOL[torch.bfloat16]


def test_kernels_refuse_a_tensor_they_cannot_read_naming_the_kernel(monkeypatch):
    """A CPU tensor outside the interpreter: a ``DeviceError`` naming the kernel, the operand and what to do, not
    Triton's "0 active drivers ([]). There should only be one." (no GPU) or "Pointer argument cannot be accessed
    from Triton (cpu tensor?)" (a GPU, the tensor on CPU). The check reads TRITON_INTERPRET per launch, so
    dropping it here is what a process started without it sees."""
    from lowbit.errors import DeviceError

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, s, z = quantized_weight(16, 64, "int4", 32, False)
    x = torch.randn(1, 64).to(torch.bfloat16)
    for call, kernel in ((lambda: weight_only_linear(x, q, s, z, None, "int4", 32), "_wo_kernel"),
                         (lambda: quantize_activation(x, "int8", 0), "_act_quant_kernel")):
        with pytest.raises(DeviceError) as err:
            call()
        msg = str(err.value)
        assert f"lowbit kernel {kernel}: its operand (1, 64) torch.bfloat16 is on cpu" in msg, msg
        assert "TRITON_INTERPRET=1" in msg and "_ref" in msg and "backend='torch'" in msg, msg


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(["int4", "uint4", "int3", "int2", "int8", "uint8"]), st.integers(1, 9),
       st.sampled_from([64, 128, 256, 384, 512, 1024]), st.sampled_from([0, 16, 32, 64, 128, 256]), st.booleans(),
       st.integers(0, 2**31 - 1))
def test_word_layout_round_trips_every_shape_it_takes(qdtype, n, k, group, n_major, seed):
    """``pack_words`` -> ``unpack_words`` gives back the stored bytes for every (qdtype, N, K, group, memory order)
    it packs (the rest it returns unchanged, the byte kernels' layout), scales keep their values; unpacking for a K
    the words do not hold is refused naming both Ks (it was a ZeroDivisionError or a reshape error)."""
    from lowbit.kernels.weight_only import PACKED_QDTYPES, chunk_words, pack_words, unpack_words

    if group and k % group:
        return
    gen = torch.Generator().manual_seed(seed)
    packed = qdtype in PACKED_QDTYPES
    q = torch.randint(0, 256, (n, k // 2 if packed else k), generator=gen, dtype=torch.int32).to(torch.uint8)
    q = q.view(torch.int8) if qdtype == "int8" else q
    s = torch.rand(n, k // group, generator=gen) if group else torch.rand(n, generator=gen)
    words, s2, _ = pack_words(q, s, None, qdtype, group, n_major)
    if chunk_words(k, group, 4 if packed else 8) == 0:
        assert words is q and s2 is s
        return
    assert words.dtype == torch.int32 and torch.equal(s2, s)
    assert torch.equal(unpack_words(words, qdtype, k, group).view(torch.uint8), q.view(torch.uint8))
    with pytest.raises(ValueError, match=rf"does not fit K={k + 32}, .*its words hold K={k}"):
        unpack_words(words, qdtype, k + 32, group)


_AOT_GEMV_T = """
import json
import torch
import lowbit.kernels  # noqa: F401
from lowbit.kernels import float_gemv, weight_only as wo
from conftest import quantized_weight
from sm90_ptx import ptx_ops, record_launches

seen = record_launches([wo, float_gemv])
out = {}
n, k, group = 1536, 576, 64
q, s, z = quantized_weight(n, k, "int4", group, False)
words, ws, wz = wo.pack_words(q, s, z, "int4", group, n_major=True)
x, r, g = (torch.randn(1, k).to(torch.bfloat16), torch.randn(1, n).to(torch.bfloat16),
           torch.ones(n).to(torch.bfloat16))
plain = (x, words, ws, wz, None, "int4", group)
down = wo.pack_words(*quantized_weight(k, n, "int4", group, False), "int4", group, n_major=True)  # [576, 1536]
calls = {"folded": lambda: torch.ops.lowbit.weight_only_linear_pdl(*plain, "silu", torch.rand(1, 36), 1e-5),
         "split": lambda: torch.ops.lowbit.weight_only_linear_pdl(*plain),
         "add_norm": lambda: torch.ops.lowbit.weight_only_linear_add_norm_pdl(
             torch.randn(1, n).to(torch.bfloat16), *down, None, "int4", group, x, torch.ones(k).to(torch.bfloat16)),
         # (K = 192: float_gemv_config's interpreter tiles - see sm90_ptx - fold below K = 256)
         "float": lambda: torch.ops.lowbit.float_linear_pdl(torch.randn(1, 192).to(torch.bfloat16),
                                                            torch.randn(n, 192).to(torch.bfloat16), None, "silu",
                                                            torch.rand(1, 36), 1e-5)}
for name, call in calls.items():
    seen.clear()
    call()
    out[name] = [ptx_ops(*launch) for launch in seen]
print(json.dumps(out))
"""


def test_gemv_t_pdl_launches_compile_for_sm90_and_wait_before_reading_activations():
    """SmolLM2's int4 decode GEMV as the ``weight_only_linear*_pdl`` ops launch it at M = 1 (``PDL=True`` and
    ``launch_pdl``, ``pdl_on`` as on Hopper) builds for sm_90 (``sm90_ptx``: Triton's bundled ptxas, no device):
    folded (a norm and ``silu`` in the GEMV's programs, and the add + next norm's halves of o_proj / down_proj) one
    ``_gemv_t`` launch, unfused ``_gemv_t`` + ``_splitk_reduce`` - and the float GEMV's fold (``_gemv_f``: both end
    in ``_folded_row``). In each kernel's PTX the dependents launch first, one
    ``griddepcontrol.wait`` comes before every store, and the folded int4 GEMV (no prefetch) loads nothing before it:
    x, the norm's partials and the residual are the previous kernel's."""
    import sm90_ptx

    launches = sm90_ptx.run(_AOT_GEMV_T)
    assert {name: [k["kernel"] for k in ks] for name, ks in launches.items()} == {
        "folded": ["_gemv_t"], "split": ["_gemv_t", "_splitk_reduce"], "add_norm": ["_gemv_t"],
        "float": ["_gemv_f"]}, launches
    for name, kernels in launches.items():
        for launch in kernels:
            ops = launch["ops"]
            assert launch["launch_pdl"] is True and launch["PDL"] is True, (name, launch)
            assert ops[0] == "griddepcontrol.launch_dependents" and ops.count("griddepcontrol.wait") == 1, (name, ops)
            before = ops[1:ops.index("griddepcontrol.wait")]
            assert "st.global" not in before, (name, ops)
            if name not in ("split", "float"):  # (their weight tiles may load before the wait)
                assert not before, (name, ops)


_AOT_A8_WAITS = """
import importlib
import json
import torch
import lowbit.kernels  # noqa: F401
from sm90_ptx import dot_waits, record_launches

a8 = importlib.import_module("lowbit.kernels.a8_linear")  # (the package re-exports the op under this name)
seen = record_launches([a8])
a8.interpreting = lambda: False  # the GPU's tiles (a8_static_config from M = 1024)
m, k, n = 2048, 4096, 4096
out = {}
for name, (wg, bn, res) in {"fp8-rowwise": (0, 0, False), "fp8-block128": (128, 128, False),
                            "fp8-rowwise-residual": (0, 0, True)}.items():
    seen.clear()
    x_scale = torch.ones(m, k // wg if wg else 1)
    w_scale = torch.ones(n // bn, k // wg) if bn else torch.ones(n)
    codes = torch.zeros(m, k, dtype=torch.float8_e4m3fn)
    a8.a8_gemm(codes, x_scale, torch.zeros(n, k, dtype=torch.float8_e4m3fn), w_scale, None, None, "fp8e4m3", wg, wg,
               torch.bfloat16, w_block_n=bn, residual=torch.zeros(m, n).to(torch.bfloat16) if res else None)
    out[name] = dot_waits(*seen[0])
print(json.dumps(out))
"""


def test_fp8_gemm_keeps_its_next_wgmma_in_flight_except_block_scaled():
    """The FP8 GEMM's sm_90 build at M = 2048 (``a8_static_config``), as a GPU launch specializes it
    (``sm90_ptx.dot_waits``): per token x per channel one accumulator is chained through the dots and the loop
    waits with ``pendings = 1``, the next step's wgmma issued before the last one's result is read, its loads copied
    asynchronously; in 128 x 128 tiles each step's fresh partial is scaled, so every dot is waited for at once
    (``pendings = 0``) and the tensor cores idle while the scaling runs: the README's reason the block form stays
    short of issue 17's 1.6x. If a Triton or a kernel change keeps the block form's dots in flight, this fails and
    that paragraph must change. (The int8 per-channel build waits with 0 too, with no other work in its loop.) A
    block's residual added in the store (``HAS_RES``, session 59) leaves the loop as it was."""
    import sm90_ptx

    built = sm90_ptx.run(_AOT_A8_WAITS)
    rowwise = built["fp8-rowwise"]
    assert 1 in rowwise["waits"] and rowwise["async_copies"] > 0, rowwise
    assert built["fp8-rowwise-residual"] == rowwise
    block = built["fp8-block128"]
    assert block["waits"] and set(block["waits"]) == {0} and block["async_copies"] > 0, block


@triton.jit
def _store_as(src_ptr, dst_ptr, n, BLOCK: tl.constexpr):
    """``dst[i] = src[i]``: the store casts to ``dst``'s dtype (Triton's fp trunc / fp ext / int-float casts)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(dst_ptr + offs, tl.load(src_ptr + offs, mask=offs < n), mask=offs < n)


@triton.jit
def _gated(x, g):
    """A device function (a helper a kernel calls) of builtins from ``tl``, ``tl.tensor`` and ``tl.math``."""
    return tl.where(x > 0, x * tl.sigmoid(g), tl.math.exp(x) - 1.0)


@triton.jit
def _gated_kernel(x_ptr, g_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x, g = tl.load(x_ptr + offs, mask=offs < n, other=0.0), tl.load(g_ptr + offs, mask=offs < n, other=0.0)
    tl.store(out_ptr + offs, _gated(x, g) + tl.sum(_gated(g, x), axis=0), mask=offs < n)


def test_an_interpreted_helper_is_not_repatched_inside_a_launch_and_computes_the_same(monkeypatch):
    """conftest's ``patch_interpreted_helpers_once`` (installed once): a ``@triton.jit`` helper called inside a launch
    runs without Triton patching ``triton.language`` again (the launch did: once per launch, not per helper call),
    and outside a launch it is patched as Triton patches it. Its kernel's output is Triton's own device call's bit for
    bit, and the launch leaves ``tl`` as it found it."""
    if not INTERP:
        pytest.skip("the patch is for Triton's interpreter (TRITON_INTERPRET=1)")
    from conftest import patch_interpreted_helpers_once
    from triton.runtime import interpreter

    call = interpreter.InterpretedFunction.__call__
    assert getattr(call, "skips_repatching_in_a_launch", False)
    patch_interpreted_helpers_once()
    assert interpreter.InterpretedFunction.__call__ is call
    x, g = torch.randn(3000), torch.randn(3000)
    patches = []
    launch_patch = interpreter._patch_lang
    monkeypatch.setattr(interpreter, "_patch_lang", lambda fn: patches.append(fn.__name__) or launch_patch(fn))
    sigmoid = tl.sigmoid
    outputs = []
    for device_call in (call, call.original):
        monkeypatch.setattr(interpreter.InterpretedFunction, "__call__", device_call)
        patches.clear()
        out = torch.empty_like(x)
        _gated_kernel[(3,)](x, g, out, x.numel(), BLOCK=1024)
        outputs.append((out, list(patches)))
        assert tl.sigmoid is sigmoid
    (ours, our_patches), (triton_s, triton_patches) = outputs
    # Triton's: the launch, then every device call of its 3 programs (_gated twice, the tl.sigmoid and tl.sum in them:
    # tl.core's jit functions); ours: the launch (tl), then the first device function that sees tl.core, once
    assert triton_patches == ["_gated_kernel"] + ["_gated", "sigmoid", "_gated", "sigmoid", "sum"] * 3, triton_patches
    assert our_patches == ["_gated_kernel", "sigmoid"], our_patches
    assert torch.equal(ours, triton_s)

    def gated(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.where(a > 0, a * torch.sigmoid(b), torch.exp(a) - 1)

    block_sums = torch.nn.functional.pad(gated(g, x), (0, 72)).reshape(3, 1024).sum(1)  # (0 past n: gated(0, 0))
    torch.testing.assert_close(ours, gated(x, g) + block_sums.repeat_interleave(1024)[:3000])


@triton.jit
def _scaled_ints_kernel(x_ptr, out_ptr, n, scale, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=offs < n, other=0) * scale - 3, mask=offs < n)


def test_interpreted_integer_ops_skip_only_the_overflow_checks_nothing_reads(monkeypatch):
    """conftest's ``skip_discarded_overflow_checks`` (installed once): without ``debug`` an int32 ``*`` / ``-`` in a
    kernel (offsets, and values that wrap) no longer computes Triton's int64 overflow check, whose ``device_assert``
    dropped it, and the output is Triton's own bit for bit; with ``debug`` on it checks as Triton does (an overflow
    raises)."""
    if not INTERP:
        pytest.skip("the patch is for Triton's interpreter (TRITON_INTERPRET=1)")
    import dataclasses

    from conftest import skip_discarded_overflow_checks
    from triton.language.semantic import TritonSemantic
    from triton.runtime import interpreter

    sanitize = TritonSemantic.binary_op_sanitize_overflow_impl
    assert getattr(sanitize, "skips_without_debug", False)
    skip_discarded_overflow_checks()
    assert TritonSemantic.binary_op_sanitize_overflow_impl is sanitize
    x = torch.randint(-(1 << 30), 1 << 30, (3000,), dtype=torch.int32)
    checks: list[str] = []
    outputs = []
    real_assert = TritonSemantic.device_assert
    monkeypatch.setattr(TritonSemantic, "device_assert",
                        lambda self, cond, msg, mask: checks.append(msg) or real_assert(self, cond, msg, mask))
    for check in (sanitize, sanitize.original):
        monkeypatch.setattr(TritonSemantic, "binary_op_sanitize_overflow_impl", check)
        checks.clear()
        out = torch.empty_like(x)
        _scaled_ints_kernel[(3,)](x, out, x.numel(), 5, BLOCK=1024)
        outputs.append((out, len(checks)))
    (ours, our_checks), (tritons, triton_checks) = outputs
    assert our_checks == 0 and triton_checks >= 3 * 3  # per program: the offsets' * and +, the values' * and -
    assert torch.equal(ours, tritons) and torch.equal(ours, x * 5 - 3)  # (int32 wraps in both)
    monkeypatch.setattr(TritonSemantic, "binary_op_sanitize_overflow_impl", sanitize)
    options = interpreter.interpreter_builder.options
    monkeypatch.setattr(interpreter.interpreter_builder, "options", dataclasses.replace(options, debug=True))
    with pytest.raises(Exception, match="int32 overflow detected for operation mul"):
        _scaled_ints_kernel[(3,)](x, torch.empty_like(x), x.numel(), 5, BLOCK=1024)


def test_interpreted_types_are_reused_and_kernels_compute_the_same(monkeypatch):
    """conftest's ``reuse_interpreted_types`` (installed once): the interpreter hands out one block type per
    (element type, shape), equal to the one Triton builds; numpy dtypes are Triton's for scalar, block and pointer
    types; and two kernels (floats through a jit helper with a reduction and a broadcast; int32 offsets and values
    that wrap) store Triton's own bits with the originals put back."""
    if not INTERP:
        pytest.skip("the patch is for Triton's interpreter (TRITON_INTERPRET=1)")
    from conftest import reuse_interpreted_types
    from triton.runtime import interpreter

    builder, get_np_dtype = interpreter.InterpreterBuilder, interpreter._get_np_dtype
    assert getattr(get_np_dtype, "reuses_types", False)
    reuse_interpreted_types()
    assert interpreter._get_np_dtype is get_np_dtype
    block = builder.get_block_ty(None, tl.float32, [16, 4])
    assert block is builder.get_block_ty(None, tl.float32, [tl.constexpr(16), 4]) == tl.block_type(tl.float32, [16, 4])
    assert block.with_element_ty(tl.int8) is builder.get_block_ty(None, tl.int8, [16, 4])
    assert builder.get_block_ty(None, tl.int8, [4, 16]) is not builder.get_block_ty(None, tl.int8, [16, 4])
    pointers = [tl.pointer_type(tl.float16), tl.pointer_type(tl.float16, const=True)]
    assert builder.get_block_ty(None, pointers[0], [8]) is not builder.get_block_ty(None, pointers[1], [8])
    for ty in [tl.int1, tl.int8, tl.uint16, tl.int32, tl.int64, tl.float16, tl.bfloat16, tl.float32, tl.float8e4nv,
               *pointers, tl.block_type(tl.bfloat16, [2, 8]), tl.block_type(pointers[0], [8])]:
        assert get_np_dtype(ty) == get_np_dtype.original(ty), ty
    x, g = torch.randn(3000), torch.randn(3000)
    ints = torch.randint(-(1 << 30), 1 << 30, (3000,), dtype=torch.int32)
    outputs = []
    for original in (False, True):
        if original:
            monkeypatch.setattr(builder, "get_block_ty", builder.get_block_ty.original)
            monkeypatch.setattr(tl.block_type, "with_element_ty", tl.block_type.with_element_ty.original)
            monkeypatch.setattr(interpreter, "_get_np_dtype", get_np_dtype.original)
            monkeypatch.setattr(tl.tensor, "__init__", tl.tensor.__init__.original)
        floats, wrapped = torch.empty_like(x), torch.empty_like(ints)
        _gated_kernel[(3,)](x, g, floats, x.numel(), BLOCK=1024)
        _scaled_ints_kernel[(3,)](ints, wrapped, ints.numel(), 5, BLOCK=1024)
        outputs.append((floats, wrapped))
    (ours, our_ints), (tritons, triton_ints) = outputs
    assert torch.equal(ours, tritons) and torch.equal(our_ints, triton_ints) and torch.equal(our_ints, ints * 5 - 3)


def _stored_as(src: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    dst = torch.empty(src.shape, dtype=dtype, device=src.device)
    _store_as[(triton.cdiv(src.numel(), 1024),)](src, dst, src.numel(), BLOCK=1024)
    return dst


def _bf16_cast_inputs(smollm2) -> torch.Tensor:
    """SmolLM2's down_proj weights of layer 0 at 2**-60 .. 2**60 (normal, subnormal and overflowing bf16 values),
    exact ties with an even and an odd kept bit, and the specials (signed zeros, infinities, NaN)."""
    w = smollm2[0].model.layers[0].mlp.down_proj.weight.detach().flatten()[:1 << 16].float()
    scaled = w * torch.exp2(torch.linspace(-60, 60, w.numel())).float()
    top = torch.randint(-(1 << 15), 1 << 15, (4096,), dtype=torch.int32) << 16
    ties = (top | 0x8000).view(torch.float32)  # half-way: the kept bit decides (even stays, odd rounds away)
    specials = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 3.39e38, -3.39e38, 1e-45])
    return torch.cat([scaled, ties[torch.isfinite(ties)], specials])


@pytest.mark.parametrize("device", DEVICES)
def test_kernel_casts_to_and_from_bf16_match_torch_bit_for_bit(device, smollm2):
    """A kernel's fp32, fp64 and int32 -> bf16 stores round to nearest even as torch does, and bf16 -> fp32, fp64 and
    int32 stores are exact. Triton 3.8's interpreter truncated fp32 -> bf16 (34,885 of these 69,640 values one ulp
    short) and cast fp64 / int32 to the bf16's storage integers; tests/conftest.py's round_interpreted_bf16_casts
    patches it, and on the GPU the compiled casts meet the same bits. fp16, which the interpreter rounds through
    numpy, is checked alongside."""
    x = _bf16_cast_inputs(smollm2).to(device)
    finite = torch.isfinite(x)
    ints = torch.arange(-70_000, 70_000, 7, dtype=torch.int32, device=device)
    for src, dst in [(x, torch.bfloat16), (x.double(), torch.bfloat16), (ints, torch.bfloat16),
                     (x, torch.float16), (x.double(), torch.float16)]:
        got, want = _stored_as(src, dst), src.to(dst)
        nan = torch.isnan(want)
        assert torch.equal(torch.isnan(got), nan), (src.dtype, dst)
        wrong = (got.view(torch.int16) != want.view(torch.int16)) & ~nan
        assert not wrong.any(), (src.dtype, dst, int(wrong.sum()), src[wrong][:4].tolist(), got[wrong][:4].tolist())
    h = x.to(torch.bfloat16)
    for dst in (torch.float32, torch.float64):
        assert torch.equal(_stored_as(h, dst)[finite], h[finite].to(dst)), dst
    whole = (x[finite] * 2**-40).clamp(-1e9, 1e9).to(torch.bfloat16)
    assert torch.equal(_stored_as(whole, torch.int32), whole.to(torch.int32))


def _installed_once(hook: str, marker: str, install: Callable[[], None]) -> Any:
    """The conftest's wrapper of ``InterpreterBuilder.<hook>`` (it carries ``marker``), installed once: another
    ``install()`` keeps it. Skips where Triton is not interpreting, as the patches are for its interpreter."""
    if not INTERP:
        pytest.skip("the patch is for Triton's interpreter (TRITON_INTERPRET=1)")
    from triton.runtime import interpreter

    patched = getattr(interpreter.InterpreterBuilder, hook)
    assert getattr(patched, marker, False)
    install()
    assert getattr(interpreter.InterpreterBuilder, hook) is patched
    return patched


def test_the_bf16_cast_patch_is_on_under_the_interpreter_and_fails_loudly_without_its_hooks(monkeypatch):
    """Under TRITON_INTERPRET=1 the conftest has wrapped the interpreter's ``cast_impl`` once (a second call keeps
    it); a Triton without the hooks it wraps raises naming them, instead of leaving the casts truncating."""
    from conftest import round_interpreted_bf16_casts
    from triton.runtime import interpreter

    _installed_once("cast_impl", "rounds_bf16_to_nearest_even", round_interpreted_bf16_casts)
    monkeypatch.delattr(interpreter.InterpreterBuilder, "cast_impl")
    with pytest.raises(RuntimeError, match="InterpreterBuilder.cast_impl.*round_interpreted_bf16_casts"):
        round_interpreted_bf16_casts()
    monkeypatch.undo()
    monkeypatch.delattr(interpreter.InterpreterBuilder, "create_fp_trunc")
    with pytest.raises(RuntimeError, match=r"found \['create_fp_ext'"):
        round_interpreted_bf16_casts()


def _fp8_cast_inputs() -> torch.Tensor:
    """Every fp16 value (as fp32), every tie between neighbouring float8_e4m3fn values (normal and subnormal) and
    one fp32 ulp either side of it, and the saturation's edges: 448 (the largest), 464 (the tie above it: to 448),
    past it, 480 (torch's NaN), inf, NaN."""
    every = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(torch.float16).float()
    grid = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float()
    grid = grid[torch.isfinite(grid)].unique()  # sorted, -448 .. 448
    ties = (grid[1:] + grid[:-1]) / 2  # exact in fp32
    inf = torch.tensor(float("inf"))
    edges = torch.tensor([448.0, 464.0, 464.03125, 479.9, 480.0, 1e30, float("inf"), float("nan")])
    return torch.cat([every, ties, torch.nextafter(ties, inf), torch.nextafter(ties, -inf), edges, -edges])


def _gpu_e4m3(x: torch.Tensor) -> torch.Tensor:
    """float8_e4m3fn as the GPU's ``cvt.rn.satfinite.e4m3x2`` (what Triton compiles ``.to(tl.float8e4nv)`` to)
    converts: torch's ``.to`` (round to nearest even) of ``x`` saturated to +-448; torch's own cast turns
    ``|x| > 464`` into NaN (checked beside)."""
    return torch.where(x.isnan(), x, x.clamp(-448, 448)).to(torch.float8_e4m3fn)


def _fp8_mismatches(got: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    """Where two float8_e4m3fn tensors differ in their bits (any NaN equal to any NaN)."""
    nan = want.float().isnan()
    return (got.view(torch.uint8) != want.view(torch.uint8)) & ~nan | (got.float().isnan() != nan)


@pytest.mark.parametrize("device", DEVICES)
def test_kernel_casts_to_and_from_fp8_e4m3_match_the_gpus_bit_for_bit(device):
    """A kernel's fp32, fp16 and bf16 -> float8_e4m3fn casts round to nearest even as torch's ``.to`` does (bit for
    bit wherever torch's is finite) and saturate to +-448 past it as the GPU's ``satfinite`` cast does; e4m3 ->
    fp32, fp16 and bf16 are exact (NaN codes to NaN). Triton 3.8's interpreter rounded half-up on the first dropped
    bit, lost the subnormals' rounding and carried mantissa overflows into the wrong exponent (thousands of these
    values off, counted in ``test_the_fp8_cast_patch_...``); tests/conftest.py's round_interpreted_fp8_casts patches
    it, and on the GPU the compiled casts meet the same bits."""
    x = _fp8_cast_inputs().to(device)
    small = x.abs() <= 464
    assert not _fp8_mismatches(_gpu_e4m3(x)[small], x[small].to(torch.float8_e4m3fn)).any()  # torch's, where finite
    for src in (x, x.half(), x.bfloat16()):
        got, want = _stored_as(src, torch.float8_e4m3fn), _gpu_e4m3(src.float())
        wrong = _fp8_mismatches(got, want)
        assert not wrong.any(), (src.dtype, int(wrong.sum()), src[wrong][:4].tolist(), got[wrong][:4].float().tolist())
    codes = torch.arange(256, dtype=torch.int32, device=device).to(torch.uint8).view(torch.float8_e4m3fn)
    for dst in (torch.float32, torch.float16, torch.bfloat16):
        got, want = _stored_as(codes, dst).float(), codes.float()
        assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got[~want.isnan()], want[~want.isnan()]), dst


def test_the_fp8_cast_patch_is_on_under_the_interpreter_and_the_original_casts_are_off(monkeypatch):
    """Under TRITON_INTERPRET=1 the conftest has wrapped the interpreter's ``create_fp_to_fp`` once (a second call
    keeps it); the original it wraps casts thousands of ``_fp8_cast_inputs`` off the GPU's e4m3 (ties and
    subnormals among them) and reads the NaN codes as 480, so without the patch the test above fails."""
    from conftest import round_interpreted_fp8_casts
    from triton.runtime import interpreter

    patched = _installed_once("create_fp_to_fp", "rounds_fp8_to_nearest_even", round_interpreted_fp8_casts)
    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_fp_to_fp", patched.original)
    x = _fp8_cast_inputs()
    ties = torch.tensor([1.0625, 12.5, 2.75 * 2**-9])  # ties to 1 and 12 (not 1.125, 13); 3 subnormal steps (not 2)
    for src in (x, x.half(), x.bfloat16()):
        assert int(_fp8_mismatches(_stored_as(src, torch.float8_e4m3fn), _gpu_e4m3(src.float())).sum()) > 1000
    assert _fp8_mismatches(_stored_as(ties, torch.float8_e4m3fn), _gpu_e4m3(ties)).all()
    nan_codes = torch.tensor([0x7F, 0xFF], dtype=torch.uint8).view(torch.float8_e4m3fn)
    assert _stored_as(nan_codes, torch.float32).abs().tolist() == [480.0, 480.0]
    monkeypatch.undo()
    monkeypatch.delattr(interpreter.InterpreterBuilder, "create_fp_to_fp")
    with pytest.raises(RuntimeError, match="InterpreterBuilder.create_fp_to_fp.*round_interpreted_fp8_casts"):
        round_interpreted_fp8_casts()


def test_a_fresh_interpreter_from_run_interpreted_rounds_its_bf16_casts():
    """``run_interpreted`` (a fresh Python under TRITON_INTERPRET=1, for code that must import Triton there) imports
    the conftest before its code, so code that never imports it (test_generate's step positions) still gets the
    rounding casts: the interpreter's fp32 -> bf16 cast of 1 + 2^-8 + 2^-9 is 1 + 2^-7 (0x3F81; truncated: 0x3F80),
    and its fp32 -> e4m3 cast of the tie 1.0625 is 1.0 (0x38; the original's half-up: 1.125, 0x39)."""
    from conftest import run_interpreted

    run_interpreted("import numpy as np\nimport triton.language as tl\nfrom triton.runtime import interpreter\n"
                    "x = interpreter.TensorHandle(np.array([1 + 2**-8 + 2**-9], np.float32), tl.float32)\n"
                    "bits = interpreter.InterpreterBuilder.cast_impl(None, x, tl.bfloat16).data\n"
                    "assert bits.tolist() == [0x3F81], bits\n"
                    "x = interpreter.TensorHandle(np.array([1.0625], np.float32), tl.float32)\n"
                    "bits = interpreter.InterpreterBuilder.create_fp_to_fp(None, x, tl.float8e4nv, None).data\n"
                    "assert bits.tolist() == [0x38], bits\nprint('ok')")
