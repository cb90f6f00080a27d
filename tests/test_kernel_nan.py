"""A NaN in what a kernel quantizes stays NaN, as in the plain-torch reference beside it.

``torch.amax``/``amin`` keep a NaN, so the reference's scale of a row, group or key block holding one is NaN and so
is everything dequantized from it; Triton's ``tl.max``/``tl.maximum`` return the other operand (PTX ``max.f32``,
the interpreter's ``np.fmax``), so the kernels gave such a row a finite scale and finite codes: a model whose
activations or keys broke generated plausible tokens from garbage instead of NaN logits (the decode step's argmax
kernel reports NaN). ``_common.max_nan``/``min_nan`` keep them. CPU under ``TRITON_INTERPRET=1``, and the GPU."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import quantized_weight

pytest.importorskip("triton", reason="lowbit's kernels need triton (pip install -e '.[dev]' brings it)")

from lowbit.ir import kvcache as kv
from lowbit.kernels import quantize_activation, quantize_activation_ref
from lowbit.kernels import hadamard as H
from lowbit.kernels.a8_gemv import a8_gemv, a8_gemv_ref
from lowbit.kernels.packed_kv_write import write_packed_kv

INTERP = os.environ.get("TRITON_INTERPRET") == "1"
DEVICES = [pytest.param("cpu", marks=pytest.mark.skipif(not INTERP, reason="CPU runs need TRITON_INTERPRET=1")),
           pytest.param("cuda", marks=pytest.mark.gpu)]


def _same_nans(got: torch.Tensor, want: torch.Tensor) -> None:
    """NaN exactly where the reference has it (at least one), equal elsewhere."""
    got, want = got.float().cpu(), want.float().cpu()
    assert torch.isnan(want).any()
    assert torch.equal(torch.isnan(got), torch.isnan(want)), (torch.isnan(got).sum(), torch.isnan(want).sum())
    keep = ~torch.isnan(want)
    assert torch.equal(got[keep], want[keep])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("qdtype", ["int8", "fp8e4m3"])
@pytest.mark.parametrize("group,k", [(0, 192), (64, 192), (0, 4352)], ids=["row", "group64", "row-chunked"])
def test_activation_quantization_keeps_a_nan_rows_scale_nan(device, qdtype, group, k):
    x = torch.randn(3, k, device=device).to(torch.bfloat16)
    x[1, 70] = float("nan")
    _, s = quantize_activation(x, qdtype, group)
    _, s_ref = quantize_activation_ref(x, qdtype, group)  # on the device: CUDA's scales divide by a reciprocal
    _same_nans(s, s_ref)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("a_group", [0, 64])
def test_a8_gemv_quantizing_a_nan_row_gives_nan_outputs(device, a_group):
    """The GEMV quantizes its rows in registers: a NaN row's outputs are NaN as the reference's, the others equal."""
    n, k = 32, 128
    q, s, _ = quantized_weight(n, k, "int8", 0, True, device)
    x = torch.randn(3, k, device=device).to(torch.bfloat16)
    x[2, 5] = float("nan")
    y = a8_gemv(x, None, q, s, None, "int8", 0, "int8", a_group, torch.float32)
    ref = a8_gemv_ref(x.cpu(), None, q.cpu(), s.cpu(), None, "int8", 0, "int8", a_group, torch.float32)
    assert torch.isnan(y[2]).all() and not torch.isnan(y[:2]).any()
    if device == "cpu":
        _same_nans(y, ref)


@pytest.mark.parametrize("device", DEVICES)
def test_fused_hadamard_quantize_keeps_a_nan_rows_scale_nan(device):
    n = 64
    if H.unsupported_fused(n):
        pytest.skip(H.unsupported_fused(n))
    x = torch.randn(4, n, device=device).to(torch.bfloat16)
    x[3, 9] = float("nan")
    _, s = H.hadamard_quantize(x, "int8")
    _, s_ref = H.hadamard_quantize_ref(x.cpu(), "int8")
    _same_nans(s, s_ref)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits", [8, 4, 2])
def test_packed_cache_write_keeps_a_nan_keys_block_and_values_token_nan(device, bits):
    """A NaN key leaves its key block's scales NaN and a NaN value its token's group scale, as ``cache_update``
    does; every other scale, code and zero point written equals the reference's."""
    d, n, layout = 32, 16, dict(bits=bits, k_block=8, v_group=8, window=8, sink=1)
    g = torch.Generator().manual_seed(bits)
    k = torch.randn(1, 2, n, d, generator=g).to(torch.bfloat16).to(device)
    v = torch.randn(1, 2, n, d, generator=g).to(torch.bfloat16).to(device)
    k[0, 0, 3, 5] = float("nan")
    v[0, 1, 9, 2] = float("nan")
    empty = kv.empty_cache(kv.cache_layout(1, 2, 2 * n, d, float_dtype=torch.bfloat16, **layout), device)
    kernel, reference = [c.clone() for c in empty], [c.clone() for c in empty]
    for t in range(n):
        kt, vt, pos = k[:, :, t:t + 1], v[:, :, t:t + 1], torch.tensor([[t]], device=device)
        write_packed_kv(kt, kt, vt, None, None, pos, *kernel, checked=True, **layout)
        kv.cache_update(kt, vt, pos, reference, inplace=True, **layout)
    parts = dict(zip(kv.CACHE_PARTS, kernel))
    want = dict(zip(kv.CACHE_PARTS, reference))
    for name in ("k_scale", "v_scale"):
        _same_nans(parts[name], want[name])
    nan_block = torch.isnan(want["k_scale"]).any(-1)  # codes and zero points of NaN scales are undefined casts
    assert torch.equal(parts["k_zero"][~nan_block].cpu(), want["k_zero"][~nan_block].cpu())
