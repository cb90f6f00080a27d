"""The decode-size A8 GEMV (``lowbit/kernels/a8_gemv.py``) against the quantize + GEMM it replaces and its reference.

int8: bit for bit (the same codes and scales, exact int32 sums, the same epilogue order), at M = 1 and 3, K and
N not multiples of the tile, with bias and epilogues, on random weights and on SmolLM2's real down_proj with its
real activations from WikiText-2. fp8: the fp32 sums in the dot's order, stated bound. Reference comparisons use
fp32 outputs, and int8's bf16 outputs too: the interpreter's bf16 casts round to nearest even as the GPU's
(tests/conftest.py; Triton's own truncate).
"""

from __future__ import annotations

import importlib
import os

import pytest
import torch
from conftest import quantized_weight

pytest.importorskip("triton", reason="lowbit's kernels need triton (pip install -e '.[dev]' brings it)")

import lowbit.kernels  # noqa: F401 - registers torch.ops.lowbit.a8_linear
from lowbit.kernels.a8_gemv import a8_gemv, a8_gemv_ref, a8_gemv_unsupported
from lowbit.kernels.a8_linear import a8_gemm, a8_linear_ref
from lowbit.kernels._common import norm_from_parts_ref, norm_parts_ref
from lowbit.kernels.act_quant import quantize_activation

INTERP = os.environ.get("TRITON_INTERPRET") == "1"
DEVICES = [pytest.param("cpu", marks=pytest.mark.skipif(not INTERP, reason="CPU runs need TRITON_INTERPRET=1")),
           pytest.param("cuda", marks=pytest.mark.gpu)]

INT8_FORMS = [  # weight group, activation group, K: 200 is no multiple of the 64-wide step, 320 is 5 groups
    (0, 0, 200),     # w8a8
    (0, 64, 320),    # w8a8-g64
    (64, 64, 320),   # int8 groups on both sides
]
FP8_FORMS = [(0, 0, 200), (64, 64, 320)]  # fp8 rowwise, recipe fp8 (groups of 64 on both sides)
FP8_BOUND = 1e-5
"""fp8: |gemv - reference| <= FP8_BOUND * max |reference| of the row: the fp32 sums of exact fp8 products differ
from the float64 reference's by their rounding only (~K * 2**-24 of the row's magnitude)."""


def _old_path(x, q, s, bias, w_qdtype, w_group, a_qdtype, a_group, out_dtype, epilogue=""):
    """What ``a8_linear`` ran before the GEMV: ``quantize_activation``, then ``a8_gemm``."""
    xq, xs = quantize_activation(x, a_qdtype, a_group)
    return a8_gemm(xq, xs, q, s, None, bias, w_qdtype, w_group, a_group, out_dtype, epilogue)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("w_group,a_group,k", INT8_FORMS)
@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize("epilogue", ["", "silu", "silu*up"])
def test_int8_gemv_is_the_quantize_and_gemm_bit_for_bit(device, w_group, a_group, k, m, epilogue):
    n = 40  # 2.5 tiles of 16 (gated: 20 outputs)
    q, s, _ = quantized_weight(n, k, "int8", w_group, True, device)
    x = torch.randn(m, k, device=device).to(torch.bfloat16)
    bias = torch.randn(n, device=device).to(torch.bfloat16)
    y = a8_gemv(x, None, q, s, bias, "int8", w_group, "int8", a_group, torch.bfloat16, epilogue)
    assert y.shape == (m, n // 2 if epilogue.endswith("*up") else n)
    assert torch.equal(y, _old_path(x, q, s, bias, "int8", w_group, "int8", a_group, torch.bfloat16, epilogue))
    # codes handed in (a8_linear_q after rms_norm_quant): the same result
    xq, xs = quantize_activation(x, "int8", a_group)
    assert torch.equal(y, a8_gemv(xq, xs, q, s, bias, "int8", w_group, "int8", a_group, torch.bfloat16, epilogue))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("w_qdtype,w_group,a_group,k", [("int8", *f) for f in INT8_FORMS]
                         + [("fp8e4m3", *f) for f in FP8_FORMS])
@pytest.mark.parametrize("m", [1, 3])
def test_gemv_matches_its_reference(device, w_qdtype, w_group, a_group, k, m):
    """fp32 outputs: int8 equal to ``a8_gemv_ref``, fp8 within ``FP8_BOUND``; the reference itself within bf16
    rounding of the qlinear reference (``a8_linear_ref``)."""
    n = 40
    q, s, _ = quantized_weight(n, k, w_qdtype, w_group, True, device)
    x = torch.randn(m, k, device=device).to(torch.bfloat16)
    bias = torch.randn(n, device=device).to(torch.bfloat16)
    y = a8_gemv(x, None, q, s, bias, w_qdtype, w_group, w_qdtype, a_group, torch.float32)
    ref = a8_gemv_ref(x.cpu(), None, q.cpu(), s.cpu(), bias.cpu(), w_qdtype, w_group, w_qdtype, a_group,
                      torch.float32)
    if w_qdtype == "int8" and device == "cpu":
        assert torch.equal(y, ref)
        y16 = a8_gemv(x, None, q, s, bias, w_qdtype, w_group, w_qdtype, a_group, torch.bfloat16)
        assert torch.equal(y16, ref.to(torch.bfloat16))
    elif w_qdtype == "int8":  # the compiled epilogue contracts its scale multiply and bias add into FMAs: fp32 ulps
        assert ((y.cpu() - ref).abs() <= 1e-6 * ref.abs().amax(1, keepdim=True)).all()
    else:
        assert ((y.cpu() - ref).abs() <= FP8_BOUND * ref.abs().amax(1, keepdim=True)).all()
    qlinear = a8_linear_ref(x.cpu(), q.cpu(), s.cpu(), None, bias.cpu(), w_qdtype, w_group, w_qdtype, a_group)
    assert ((ref - qlinear.float()).norm() / qlinear.float().norm()).item() < 1e-2


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("w_group,a_group,k", FP8_FORMS)
@pytest.mark.parametrize("epilogue", ["", "gelu_tanh*up"])
def test_fp8_gemv_is_the_gemm_to_fp32_rounding(device, w_group, a_group, k, epilogue):
    """bf16 outputs of the fp8 GEMV and the Triton GEMM path within one bf16 step of each other (their fp32 sums
    differ in order only; the interpreter's dot sums alike, so there they are equal). Gated, the gate's fp32
    difference passes through the activation and the product with up before the one rounding: on an H100 an
    output of 15.5 differed by 2 bf16 steps, so there the bound is 2^-7 of the row's largest output more."""
    torch.manual_seed(0)
    m, n = 3, 40
    q, s, _ = quantized_weight(n, k, "fp8e4m3", w_group, True, device)
    x = torch.randn(m, k, device=device).to(torch.bfloat16)
    y = a8_gemv(x, None, q, s, None, "fp8e4m3", w_group, "fp8e4m3", a_group, torch.bfloat16, epilogue).float()
    old = _old_path(x, q, s, None, "fp8e4m3", w_group, "fp8e4m3", a_group, torch.bfloat16, epilogue).float()
    slack = old.abs().amax(1, keepdim=True) * 2.0 ** -7 if epilogue else 1e-6
    assert ((y - old).abs() <= old.abs() * 2.0 ** -7 + slack).all()
    if INTERP:
        assert torch.equal(y, old)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("w_qdtype,w_group,a_group,k", [("int8", *INT8_FORMS[0]), ("int8", *INT8_FORMS[2]),
                                                         ("fp8e4m3", *FP8_FORMS[1])])
@pytest.mark.parametrize("m", [1, 3, 17])
def test_a8_linear_adds_the_residual_as_the_residual_add_does(device, w_qdtype, w_group, a_group, k, m):
    """``residual=``: the GEMV's store (M <= 16) and the quantize + GEMM path (17) return what ``residual_add``
    returns after the plain op, bit for bit (one bf16 rounding of the product, one of the sum)."""
    n = 40
    q, s, _ = quantized_weight(n, k, w_qdtype, w_group, True, device)
    x = torch.randn(m, k, device=device).to(torch.bfloat16)
    bias = torch.randn(n, device=device).to(torch.bfloat16)
    stream = (torch.randn(m, n, device=device) * 4).to(torch.bfloat16)
    plain = torch.ops.lowbit.a8_linear(x, q, s, None, bias, w_qdtype, w_group, w_qdtype, a_group)
    fused = torch.ops.lowbit.a8_linear(x, q, s, None, bias, w_qdtype, w_group, w_qdtype, a_group, residual=stream)
    assert torch.equal(fused, stream + plain)
    xq, xs = quantize_activation(x, w_qdtype, a_group)
    from_codes = torch.ops.lowbit.a8_linear_q(xq, xs, q, s, None, bias, w_qdtype, w_group, a_group, torch.bfloat16,
                                              residual=stream)
    assert torch.equal(from_codes, fused)
    if m <= 16 and w_qdtype == "int8":  # the reference's arithmetic (the interpreter's bf16 casts round to nearest
        # even as the GPU's and torch's: tests/conftest.py)
        ref = a8_gemv_ref(x.cpu(), None, q.cpu(), s.cpu(), bias.cpu(), "int8", w_group, "int8", a_group,
                          torch.float32).to(torch.bfloat16)
        assert torch.equal(fused.cpu(), stream.cpu() + ref)


def _smollm2_down_proj(smollm2, wikitext_ids, rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(bf16 inputs of block 0's down_proj for the first ``rows`` WikiText-2 tokens, its int8 per-channel codes,
    their scales): the real [576, 1536] weight and the real activations it multiplies."""
    from lowbit.calibration.gptq import weight_qparams
    from lowbit.ir.quant import get_qdtype, quantize

    model = smollm2[0]
    down = model.model.layers[0].mlp.down_proj
    seen: list[torch.Tensor] = []
    handle = down.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].detach()))
    try:
        with torch.no_grad():
            model.model.layers[0](model.model.embed_tokens(wikitext_ids[:, :rows]),
                                  position_embeddings=model.model.rotary_emb(
                                      model.model.embed_tokens(wikitext_ids[:, :rows]),
                                      torch.arange(rows)[None]))
    finally:
        handle.remove()
    w = down.weight.detach()
    scale, _ = weight_qparams(w, get_qdtype("int8"), True, None)
    return seen[0][0].to(torch.bfloat16), quantize(w, scale, None, qdtype="int8", axis=0), scale


@pytest.mark.skipif(not INTERP and not torch.cuda.is_available(), reason="kernels need a GPU or TRITON_INTERPRET=1")
def test_a8_linear_takes_the_gemv_on_smollm2_decode_rows(smollm2, wikitext_ids, monkeypatch,
                                                         a8_quantizes_in_gemv):
    """``lowbit::a8_linear`` on SmolLM2's block-0 down_proj (K = 1536, N = 576) and its WikiText-2 activations:
    up to 16 rows one launch, the GEMV quantizing its rows (K <= ``A8_GEMV_QUANTIZE_MAX_K``), the old quantize +
    GEMM result bit for bit; with the limit below K, the quantize then the GEMV on its codes, the same bits; from
    17 rows the quantize + GEMM."""
    a8mod = importlib.import_module("lowbit.kernels.a8_linear")  # the module (the package re-exports the op)

    dev = "cuda" if torch.cuda.is_available() and not INTERP else "cpu"
    x, q, s = (t.to(dev) for t in _smollm2_down_proj(smollm2, wikitext_ids, 17))
    assert x.shape[-1] <= a8_quantizes_in_gemv
    quantized: list[int] = []
    gemv_scales: list[bool] = []
    real_quantize, real_gemv = a8mod.quantize_activation, a8mod.a8_gemv
    monkeypatch.setattr(a8mod, "quantize_activation",
                        lambda v, *a: quantized.append(v.shape[0]) or real_quantize(v, *a))
    monkeypatch.setattr(a8mod, "a8_gemv", lambda v, sv, *a, **kw: gemv_scales.append(sv is not None)
                        or real_gemv(v, sv, *a, **kw))
    in_kernel = {}
    for m in (1, 3):
        in_kernel[m] = torch.ops.lowbit.a8_linear(x[:m], q, s, None, None, "int8", 0, "int8", 0)
        assert torch.equal(in_kernel[m], _old_path(x[:m], q, s, None, "int8", 0, "int8", 0, torch.bfloat16))
        ref = a8_linear_ref(x[:m], q, s, None, None, "int8", 0, "int8", 0)
        assert ((in_kernel[m].float() - ref.float()).norm() / ref.float().norm()).item() < 1e-2
    assert quantized == [] and gemv_scales == [False, False]
    # K past the limit (a8_linear reads it from a8_gemv per call): the codes path
    monkeypatch.setattr(importlib.import_module("lowbit.kernels.a8_gemv"), "A8_GEMV_QUANTIZE_MAX_K", x.shape[-1] - 1)
    for m in (1, 3):
        assert torch.equal(torch.ops.lowbit.a8_linear(x[:m], q, s, None, None, "int8", 0, "int8", 0), in_kernel[m])
    assert quantized == [1, 3] and gemv_scales == [False, False, True, True]
    torch.ops.lowbit.a8_linear(x, q, s, None, None, "int8", 0, "int8", 0)
    assert quantized == [1, 3, 17] and len(gemv_scales) == 4


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("w_qdtype,w_group,a_group,k", [("int8", *f) for f in INT8_FORMS]
                         + [("fp8e4m3", *f) for f in FP8_FORMS])
@pytest.mark.parametrize("epilogue,residual", [("", False), ("silu*up", False), ("", True)])
def test_a8_linear_quantizing_in_the_gemv_is_the_codes_path(device, w_qdtype, w_group, a_group, k, epilogue,
                                                            residual, monkeypatch, a8_quantizes_in_gemv):
    """The op's one-launch form (the GEMV quantizes its rows, K <= ``A8_GEMV_QUANTIZE_MAX_K``) returns the two-launch
    form's bits (``quantize_activation``, then the GEMV on its codes), int8 and fp8, per token and per 64-group, with
    an epilogue and with the residual added in the store; a 3-D ``[1, 2, K]`` input as a decode step's."""
    gemv_module = importlib.import_module("lowbit.kernels.a8_gemv")  # where a8_linear reads the limit per call
    n = 40
    q, s, _ = quantized_weight(n, k, w_qdtype, w_group, True, device)
    x = torch.randn(1, 2, k, device=device).to(torch.bfloat16)
    bias = torch.randn(n, device=device).to(torch.bfloat16)
    stream = (torch.randn(1, 2, n, device=device) * 4).to(torch.bfloat16) if residual else None
    args = (x, q, s, None, bias, w_qdtype, w_group, w_qdtype, a_group, False, epilogue)
    assert k <= a8_quantizes_in_gemv  # the GEMV quantizes (the default limit, 0, would compare the codes path twice)
    one = torch.ops.lowbit.a8_linear(*args, residual=stream)
    monkeypatch.setattr(gemv_module, "A8_GEMV_QUANTIZE_MAX_K", 0)
    two = torch.ops.lowbit.a8_linear(*args, residual=stream)
    assert one.shape == two.shape == (1, 2, n // 2 if epilogue else n)
    assert torch.equal(one, two)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("w_qdtype,w_group,a_group,k", [("int8", *f) for f in INT8_FORMS]
                         + [("fp8e4m3", *f) for f in FP8_FORMS])
@pytest.mark.parametrize("m", [1, 3, 17])
def test_a8_linear_add_norm_writes_the_next_norms_halves(device, w_qdtype, w_group, a_group, k, m):
    """``a8_linear_add_norm``: the stream is ``a8_linear(residual=)``'s bit for bit, ``gain * stream`` is torch's
    (one bf16 rounding of an exact product), and the partial sums of squares (one per GEMV program and row at M <=
    16, one per row from ``add_norm_parts`` at 17) add up to the row's within fp32 rounding of another order."""
    n = 40
    q, s, _ = quantized_weight(n, k, w_qdtype, w_group, True, device)
    x = torch.randn(m, k, device=device).to(torch.bfloat16)
    bias = torch.randn(n, device=device).to(torch.bfloat16)
    stream = (torch.randn(m, n, device=device) * 4).to(torch.bfloat16)
    gain = (torch.rand(n, device=device) + 0.5).to(torch.bfloat16)
    new, gained, sumsq = torch.ops.lowbit.a8_linear_add_norm(x, q, s, None, bias, w_qdtype, w_group, w_qdtype,
                                                             a_group, stream, gain)
    assert torch.equal(new, torch.ops.lowbit.a8_linear(x, q, s, None, bias, w_qdtype, w_group, w_qdtype, a_group,
                                                       residual=stream))
    want_gained, want_sumsq = norm_parts_ref(new, gain)
    assert torch.equal(gained, want_gained)
    assert sumsq.shape == (m, 3 if m <= 16 else 1)  # 40 outputs: 3 programs of 16
    assert torch.allclose(sumsq.sum(-1, keepdim=True), want_sumsq, rtol=1e-6, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("w_qdtype,w_group,a_group,k", [("int8", *f) for f in INT8_FORMS]
                         + [("fp8e4m3", *f) for f in FP8_FORMS])
@pytest.mark.parametrize("m", [1, 3, 17])
@pytest.mark.parametrize("epilogue", ["", "silu*up"])
def test_a8_linear_norms_its_rows_as_norm_from_parts_ref(device, w_qdtype, w_group, a_group, k, m, epilogue):
    """``a8_linear(gain * stream, norm_sumsq=partials)`` (the GEMV norms and quantizes the rows, M <= 16; torch ops
    norm them in the quantize before the GEMM at 17) against ``norm_from_parts_ref`` then ``a8_linear``: bit for bit
    under the interpreter; on a GPU the kernel's ``rsqrt`` and its sum of the partials may differ from torch's by
    an ulp, which moves a normed bf16 value by at most one step and its code by one where it crosses a boundary
    (the bound: 1% of the output's norm, and most outputs equal)."""
    n = 40
    q, s, _ = quantized_weight(n, k, w_qdtype, w_group, True, device)
    stream = (torch.randn(m, k, device=device) * 4).to(torch.bfloat16)
    gain = (torch.rand(k, device=device) + 0.5).to(torch.bfloat16)
    gained = gain * stream
    partials = torch.stack([stream[:, i::7].float().pow(2).sum(-1) for i in range(7)], -1)  # 7 programs' sums
    y = torch.ops.lowbit.a8_linear(gained, q, s, None, None, w_qdtype, w_group, w_qdtype, a_group,
                                   epilogue=epilogue, norm_sumsq=partials, norm_eps=1e-5)
    normed = norm_from_parts_ref(gained, partials, 1e-5)
    want = torch.ops.lowbit.a8_linear(normed, q, s, None, None, w_qdtype, w_group, w_qdtype, a_group,
                                      epilogue=epilogue)
    assert y.shape == want.shape == (m, n // 2 if epilogue else n)
    if INTERP or m > 16:
        assert torch.equal(y, want)
    else:
        assert ((y.float() - want.float()).norm() / want.float().norm()).item() < 1e-2
        assert (y == want).float().mean().item() > 0.9
    # the normed rows are what quantize: far from the unnormed gained rows' product
    raw = torch.ops.lowbit.a8_linear(gained, q, s, None, None, w_qdtype, w_group, w_qdtype, a_group,
                                     epilogue=epilogue)
    assert ((raw.float() - want.float()).norm() / want.float().norm()).item() > 0.5


def test_gemv_names_what_it_does_not_take():
    assert "M=17" in a8_gemv_unsupported(17, "int8", 0, 0, None, 0)
    assert "int4" in a8_gemv_unsupported(1, "int4", 64, 0, None, 0)
    assert "tiles" in a8_gemv_unsupported(1, "fp8e4m3", 128, 128, None, 128)
    assert "groups of 32 inside" in a8_gemv_unsupported(1, "int8", 32, 64, None, 0)
    assert a8_gemv_unsupported(16, "fp8e4m3", 64, 64, None, 0) is None


_AOT_PDL = """
import importlib
import json
import torch
import lowbit.kernels  # noqa: F401
from lowbit.kernels import a8_gemv, act_quant, norm_quant
from conftest import quantized_weight
from sm90_ptx import ptx_ops, record_launches

# the module (lowbit.kernels re-exports its op under the same name: patching that would record nothing)
a8_linear = importlib.import_module("lowbit.kernels.a8_linear")
seen = record_launches([a8_gemv, a8_linear, act_quant, norm_quant])
out = {}
for w_qdtype, a_qdtype in (("int8", "int8"), ("fp8e4m3", "fp8e4m3")):
    k, n = 576, 1536
    q, s, _ = quantized_weight(n, k, w_qdtype, 0, True)
    x, stream = torch.randn(1, k).to(torch.bfloat16), torch.randn(1, n).to(torch.bfloat16)
    seen.clear()
    torch.ops.lowbit.rms_norm_quant_pdl(x, torch.ones(k).to(torch.bfloat16), 1e-5, True, a_qdtype, 0)
    codes = torch.zeros(1, k, dtype=torch.float8_e4m3fn if a_qdtype == "fp8e4m3" else torch.int8)
    torch.ops.lowbit.a8_linear_q_pdl(codes, torch.ones(1, 1), q, s, None, None, w_qdtype, 0, 0, torch.bfloat16,
                                     False, "silu")
    torch.ops.lowbit.a8_linear_pdl(torch.randn(1, n).to(torch.bfloat16), q.t().contiguous(), s[:k], None, None,
                                   w_qdtype, 0, a_qdtype, 0, False, "", 0, x)
    for i, launch in enumerate(seen):
        built = ptx_ops(*launch)
        out[f"{w_qdtype}-{i}-{built['kernel']}"] = built
print(json.dumps(out))
"""


def test_a8_pdl_kernels_compile_for_sm90_and_wait_before_reading_activations():
    """The GPU compiler (not the interpreter, which accepted constructs sm_90 refused in session 49) takes the A8
    decode step's kernels as the ``*_pdl`` ops launch them (``PDL=True`` and ``launch_pdl``, recorded from the ops
    with ``pdl_on`` as on Hopper): an ahead-of-time sm_90 compile through Triton's bundled ptxas, no device
    (``sm90_ptx``). In the PTX each lets its dependents launch first, and waits (``griddepcontrol.wait``) before
    every store and before every load but the norm's gain (a weight): ``_rms_norm_quant_kernel``'s loads before the
    wait are its gain's alone (as many as its row's after it), the GEMV's and the quantize's none."""
    import sm90_ptx

    kernels = sm90_ptx.run(_AOT_PDL)
    names = [name.split("-", 2)[2] for name in kernels]
    assert names == ["_rms_norm_quant_kernel", "_a8_gemv_kernel", "_act_quant_kernel", "_a8_gemv_kernel"] * 2, names
    for name, launch in kernels.items():
        ops = launch["ops"]
        assert launch["launch_pdl"] is True and launch["PDL"] is True, (name, launch)
        assert ops[0] == "griddepcontrol.launch_dependents" and ops.count("griddepcontrol.wait") == 1, (name, ops)
        before = ops[1:ops.index("griddepcontrol.wait")]
        assert "st.global" not in before, (name, ops)
        if name.endswith("_rms_norm_quant_kernel"):
            after = ops[ops.index("griddepcontrol.wait"):]
            assert 0 < len(before) == after.count("ld.global"), (name, ops)
        else:
            assert not before, (name, ops)
