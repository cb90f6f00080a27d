"""The A8 GEMM that quantizes its activation tiles in its K loop (``a8_gemm_prologue`` on ``activation_scales``)
against the two-kernel path it replaces (``quantize_activation`` then ``a8_gemm``), which its plain-torch reference
(``quantize_activation_ref``, ``a8_linear_ref``) already checks: same scales, same codes, same accumulation, so the
outputs must be equal bit for bit, not close. Shapes: M not a multiple of the tile, K a multiple of the block.
"""

from __future__ import annotations

import os

import pytest
import torch
from conftest import quantized_weight
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("triton", reason="lowbit's kernels need triton (pip install -e '.[dev]' brings it)")

from lowbit.kernels.a8_linear import a8_gemm, a8_gemm_prologue, a8_linear_ref
from lowbit.kernels.act_quant import activation_scales, quantize_activation, quantize_activation_ref

INTERP = os.environ.get("TRITON_INTERPRET") == "1"
DEVICES = [pytest.param("cpu", marks=pytest.mark.skipif(not INTERP, reason="CPU runs need TRITON_INTERPRET=1")),
           pytest.param("cuda", marks=pytest.mark.gpu)]

CASES = [  # weight qdtype, weight group, activation qdtype, activation group
    ("int8", 0, "int8", 0),             # w8a8: per token x per channel, both scales in the epilogue
    ("int8", 0, "int8", 64),            # w8a8-g64: the tile's scale per row and K step
    ("int4", 64, "int8", 0),            # w4a8: the kernel takes it too (the op keeps it on the two-kernel path)
    ("fp8e4m3", 64, "fp8e4m3", 64),     # fp8 block-scaled: e4m3 codes from the same rounding
]


def _activation(m: int, k: int, dtype: torch.dtype, device: str, seed: int = 0) -> torch.Tensor:
    """Gaussian rows with the cases the rounding must get right: an all-zero token (scale 1e-12, codes 0), a loud
    group, exact ties at scale 1 (halves round to even) and negative zeros."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * 3
    if m > 3:
        x[1] = 0
        x[2, :64] *= 100
        x[3, :k // 256 * 256] = torch.arange(-128, 128).float().mul(0.5).repeat(k // 256)
        x[3, -1] = 127.0
        x[0, :8] = -0.0
    return x.to(dtype).to(device)


def _both_paths(x, w_qdtype, w_group, a_qdtype, a_group, bias=None, epilogue=""):
    q, s, z = quantized_weight(48, x.shape[1], w_qdtype, w_group, w_qdtype != "int4", x.device.type)
    xq, xs = quantize_activation(x, a_qdtype, a_group)
    x2, sa = activation_scales(x, a_qdtype, a_group)
    assert torch.equal(sa, xs), "activation_scales differs from quantize_activation's scales"
    two = a8_gemm(xq, xs, q, s, z, bias, w_qdtype, w_group, a_group, x.dtype, epilogue)
    one = a8_gemm_prologue(x2, sa, q, s, z, bias, w_qdtype, w_group, a_group, x.dtype, epilogue)
    return one, two, (q, s, z)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("w_qdtype,w_group,a_qdtype,a_group", CASES)
def test_prologue_gemm_is_quantize_then_gemm_bit_for_bit(device, dtype, w_qdtype, w_group, a_qdtype, a_group):
    x = _activation(37, 256, dtype, device)
    bias = torch.randn(48).to(dtype).to(device)
    one, two, (q, s, z) = _both_paths(x, w_qdtype, w_group, a_qdtype, a_group, bias)
    assert one.dtype == dtype and one.shape == (37, 48)
    assert torch.equal(one, two), (one.float() - two.float()).abs().max()
    # and both are the qlinear: a kernel that skipped the quantize would miss this by far more than bf16 rounding
    ref = a8_linear_ref(x, q, s, z, bias, w_qdtype, w_group, a_qdtype, a_group)
    assert ((one.double() - ref.double()).norm() / ref.double().norm()).item() <= 1e-2


@pytest.mark.parametrize("device", DEVICES)
def test_prologue_gemm_keeps_the_gated_epilogue(device):
    """A merged gate/up's ``silu*up`` store reads the same accumulator on both paths."""
    x = _activation(20, 128, torch.bfloat16, device, seed=3)
    one, two, _ = _both_paths(x, "int8", 0, "int8", 0, epilogue="silu*up")
    assert one.shape == (20, 24) and torch.equal(one, two)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("qdtype,group", [("int8", 0), ("int8", 64), ("fp8e4m3", 0), ("fp8e4m3", 128)])
def test_activation_scales_are_the_quantizes_whole_and_chunked(device, qdtype, group):
    """K = 4352: three 2048-wide chunks, the last mostly past K (the per-token amax runs over all of them)."""
    for k in (192, 4352):
        if group and k % group:
            continue
        x = _activation(6, k, torch.bfloat16, device, seed=k)
        _, s = activation_scales(x, qdtype, group)
        assert torch.equal(s, quantize_activation_ref(x, qdtype, group)[1])
        assert torch.equal(s, quantize_activation(x, qdtype, group)[1])


@pytest.mark.skipif(not INTERP, reason="the interpreter's shapes sweep; the GPU runs the parametrized tests above")
@settings(max_examples=12, deadline=None)
@given(st.integers(1, 70), st.sampled_from([64, 128, 192, 320]), st.integers(1, 5).map(lambda i: 16 * i),
       st.sampled_from([0, 64]), st.sampled_from([torch.bfloat16, torch.float16]), st.integers(0, 2**31 - 1))
def test_prologue_gemm_equals_the_two_kernels_on_any_shape(m, k, n, a_group, dtype, seed):
    """Any M (tiles partly past it), K a multiple of the 64-wide block (the last SUBK step partly past K when
    K / 64 is odd), N a multiple of 16 (tiles partly past it), per token or per 64 channels."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(m, k, generator=g) * torch.rand(m, 1, generator=g) * 10).to(dtype)
    q, s, _ = quantized_weight(n, k, "int8", 0, True, "cpu")
    xq, xs = quantize_activation(x, "int8", a_group)
    x2, sa = activation_scales(x, "int8", a_group)
    two = a8_gemm(xq, xs, q, s, None, None, "int8", 0, a_group, dtype)
    one = a8_gemm_prologue(x2, sa, q, s, None, None, "int8", 0, a_group, dtype)
    assert torch.equal(sa, xs) and torch.equal(one, two)
