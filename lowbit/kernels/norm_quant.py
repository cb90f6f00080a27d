"""RMSNorm fused with dynamic symmetric per-token (or per-group) int8 / fp8 e4m3 activation quantization.

One program reads one row of the residual stream once and writes the codes and the scale(s): the unfused path
writes the normed row in bf16, then ``quantize_activation`` reads it back (absmax, divide, round). Numerics
follow the reference ``lowbit.ir.normquant.rms_norm_quant`` (= ``rms_norm`` then ``dynamic_qparams`` and
``quantize``): statistics in fp32 when ``compute_f32`` (HF Llama's ``compute_dtype=f32``), else each step
rounded to the input dtype as torch does; the normed row is rounded to the input dtype before and after the
gain (``weight * y.to(in_dtype)``), then quantized by ``act_quant.quantize_store_row`` (the same code as
``quantize_activation``). Not bit-identical: the row's sum of squares is reduced in another order and
``rsqrt`` may differ by an ulp, so a normed value can move by one bf16 ulp and its code by one step where it sits
on a rounding boundary (the tests state the bound: int8 codes within ±1 on under 2% of entries, scales within a
bf16 ulp).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from lowbit.kernels._common import (
    KERNEL_DTYPES,
    check,
    launcher,
    next_pow2,
    pdl_launch_options,
    pdl_launches,
    round_like,
)
from lowbit.kernels.act_quant import quantize_store_row, row_quant_setup

__all__ = ["add_norm_parts", "add_norm_parts_takes", "norm_from_parts", "norm_from_parts_takes", "rms_norm_quant",
           "rms_norm_quant_pdl", "rms_norm_quant_ref"]


def rms_norm_quant_ref(x: torch.Tensor, weight: torch.Tensor | None, eps: float, compute_f32: bool, qdtype: str,
                       group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain torch (lowbit's ops): codes shaped like ``x`` and fp32 scales ``[..., K/g]`` (``[..., 1]``)."""
    from lowbit.ir.normquant import rms_norm_quant as ref

    return ref(x, weight, eps=eps, compute_dtype=torch.float32 if compute_f32 else None, a_qdtype=qdtype,
               a_block_size=group_size or x.shape[-1])


@triton.jit
def _round_bf16(y):
    """fp32 ``y`` (finite) rounded half-to-even onto the bfloat16 grid, still fp32: the cast that follows is then
    exact whatever its rounding mode (the interpreter's fp32 -> bf16 cast truncates). Integer arithmetic on
    the bits: add 0x7FFF plus the kept LSB, clear the low 16 bits (no int32 overflow for finite values)."""
    bits = y.to(tl.int32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _rnd(y, like, IS_BF16: tl.constexpr):
    """``y.to(like.dtype).to(fp32)`` with round-to-nearest-even on every backend."""
    if IS_BF16:
        return _round_bf16(y)
    else:
        return y.to(like.dtype).to(tl.float32)


@triton.jit  # eps is a constexpr: a run-time Python float is fp32 to Triton but fp64 under Inductor (torch.compile),
# which turned the statistics fp64 and broke the bf16 rounding's bitcast (measured: compile error on the H200)
def _rms_norm_quant_kernel(x_ptr, w_ptr, q_ptr, s_ptr, K, sxm, sqm, ssm, eps: tl.constexpr,
                           HAS_W: tl.constexpr, COMPUTE_F32: tl.constexpr, IS_BF16: tl.constexpr,
                           QMAX: tl.constexpr, RCP: tl.constexpr, IS_FP8: tl.constexpr, GROUP: tl.constexpr,
                           BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    """One row per program. ``PDL`` (``pdl_launches``): the next kernel may launch now; the gain (a weight) loads
    before the wait for the previous kernels, the row (the residual stream they wrote) after it."""
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK_K)
    ok = offs < K
    if PDL:
        gdc_launch_dependents()
    gain = tl.zeros((BLOCK_K,), dtype=tl.float32) + 1.0  # (assigned before the if: a8_gemv's rstd does the same)
    if HAS_W:
        gain = tl.load(w_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    if PDL:
        gdc_wait()
    xin = tl.load(x_ptr + row * sxm + offs, mask=ok, other=0.0)
    x = xin.to(tl.float32)
    if COMPUTE_F32:
        var = tl.sum(x * x, axis=0) / K
        y = _rnd(x * tl.rsqrt(var + eps), xin, IS_BF16)
    else:  # statistics in the input dtype: torch rounds every op's result to it
        sq = _rnd(x * x, xin, IS_BF16)
        var = _rnd(tl.sum(sq, axis=0) / K, xin, IS_BF16)
        r = _rnd(tl.rsqrt(_rnd(var + eps, xin, IS_BF16)), xin, IS_BF16)
        y = _rnd(x * r, xin, IS_BF16)
    if HAS_W:
        y = _rnd(gain * y, xin, IS_BF16)
    quantize_store_row(y, q_ptr + row * sqm, s_ptr + row * ssm, offs, ok, K, QMAX, RCP, IS_FP8, GROUP, BLOCK_K)


@triton_op("lowbit::rms_norm_quant", mutates_args=())
def rms_norm_quant(x: torch.Tensor, weight: torch.Tensor | None, eps: float, compute_f32: bool, qdtype: str,
                   group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes shaped like ``x`` (int8 / float8_e4m3fn) and fp32 scales ``[..., K/g]`` (``[..., 1]`` when
    ``group_size`` is 0) of ``rms_norm(x, weight)``; ``weight`` (if any) has ``x``'s dtype."""
    x2, q, s, meta = row_quant_setup(x, qdtype, group_size, "rms_norm_quant")
    k = x2.shape[1]
    check(weight is None or (weight.dtype == x.dtype and weight.shape == (k,)), "rms_norm_quant",
          f"weight {None if weight is None else (weight.dtype, tuple(weight.shape))} must be {x.dtype} [{k}]")
    w = weight if weight is not None else x2
    launcher(x2, _rms_norm_quant_kernel)[(x2.shape[0],)](
        x2, w, q, s, k, x2.stride(0), q.stride(0), s.stride(0), eps, HAS_W=weight is not None,
        COMPUTE_F32=compute_f32 or x.dtype == torch.float32, IS_BF16=x.dtype == torch.bfloat16, **meta,
        **pdl_launch_options())
    return q.reshape(x.shape), s.reshape(*x.shape[:-1], s.shape[-1])


@torch.library.custom_op("lowbit::rms_norm_quant_pdl", mutates_args=())
def rms_norm_quant_pdl(x: torch.Tensor, weight: torch.Tensor | None, eps: float, compute_f32: bool, qdtype: str,
                       group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``rms_norm_quant`` as an opaque op launching with PDL (``pdl_launches``): opaque because Inductor launches a
    ``triton_op``'s kernels itself, without the launch attribute (``weight_only_linear_pdl``)."""
    with pdl_launches():
        return rms_norm_quant(x, weight, eps, compute_f32, qdtype, group_size)


@rms_norm_quant_pdl.register_fake
def _(x, weight, eps, compute_f32, qdtype, group_size):
    k = x.shape[-1]
    codes = x.new_empty(x.shape, dtype=torch.float8_e4m3fn if qdtype == "fp8e4m3" else torch.int8)
    return codes, x.new_empty((*x.shape[:-1], -(-k // group_size) if group_size else 1), dtype=torch.float32)


@triton.jit
def _add_norm_parts_kernel(r_ptr, y_ptr, w_ptr, o_ptr, g_ptr, ss_ptr, K, srm, sym, som,
                           IS_BF16: tl.constexpr, BLOCK_K: tl.constexpr):
    """One row per program: ``o = r + y`` and ``g = w * o``, each rounded once to the dtype as torch's add and mul
    round (bf16 half to even by its bits: the interpreter's cast truncates), and ``ss`` = the row's sum of
    ``o**2`` in fp32."""
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK_K)
    ok = offs < K
    res = tl.load(r_ptr + row * srm + offs, mask=ok, other=0.0)
    o = round_like(res.to(tl.float32) + tl.load(y_ptr + row * sym + offs, mask=ok, other=0.0).to(tl.float32), res,
                   IS_BF16)
    g = round_like(tl.load(w_ptr + offs, mask=ok, other=0.0).to(tl.float32) * o, res, IS_BF16)
    tl.store(o_ptr + row * som + offs, o.to(res.dtype), mask=ok)
    tl.store(g_ptr + row * som + offs, g.to(res.dtype), mask=ok)
    tl.store(ss_ptr + row, tl.sum(o * o, axis=0))


def add_norm_parts_takes(residual: torch.Tensor, y: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``add_norm_parts`` takes these operands (its callers fall back to torch ops where not): a residual of
    the product's shape, one dtype for all three, a gain as wide as a row."""
    return (residual.shape == y.shape and residual.dtype == y.dtype == weight.dtype
            and tuple(weight.shape) == (y.shape[-1],))


def add_norm_parts(residual: torch.Tensor, y: torch.Tensor,
                   weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``stream = residual + y`` and an RMSNorm's first half of it, ``(stream, weight * stream, sum of stream**2
    [..., 1] fp32)`` (``norm_parts_ref`` after the add), in one launch: the split norm's writer
    (``a8_linear_add_norm``) above decode sizes, where the GEMM (or ``torch._scaled_mm``, which has no epilogue to
    put it in) leaves the add to a kernel anyway; the add and the norm's half were three torch kernels."""
    k = y.shape[-1]
    check(add_norm_parts_takes(residual, y, weight), "add_norm_parts",
          f"residual {residual.dtype} {tuple(residual.shape)} + y {y.dtype} {tuple(y.shape)}, gain {weight.dtype} "
          f"{tuple(weight.shape)}: the same shape and dtype, a gain [{k}]")
    r2, y2 = residual.reshape(-1, k), y.reshape(-1, k)
    r2 = r2 if r2.stride(-1) == 1 else r2.contiguous()
    y2 = y2 if y2.stride(-1) == 1 else y2.contiguous()
    m = y2.shape[0]
    stream, gained = torch.empty_like(y2), torch.empty_like(y2)
    sumsq = torch.empty((m, 1), device=y.device, dtype=torch.float32)
    block = next_pow2(k)
    launcher(y2, _add_norm_parts_kernel)[(m,)](r2, y2, weight.contiguous(), stream, gained, sumsq, k, r2.stride(0),
                                               y2.stride(0), stream.stride(0), IS_BF16=y.dtype == torch.bfloat16,
                                               BLOCK_K=block, num_warps=4 if block <= 4096 else 8)
    lead = tuple(y.shape[:-1])
    return stream.reshape(*lead, k), gained.reshape(*lead, k), sumsq.reshape(*lead, 1)


@triton.jit  # (eps a constexpr, as _rms_norm_quant_kernel's: Inductor would pass a run-time float as fp64)
def _norm_from_parts_kernel(g_ptr, ss_ptr, o_ptr, K, NQ, sgm, ssm, som, eps: tl.constexpr, IS_BF16: tl.constexpr,
                            BLOCK_K: tl.constexpr, BLOCK_Q: tl.constexpr):
    """One row per program: ``o = gained * rsqrt(sum of its NQ partial sums of squares / K + eps)``, the product
    in fp32 rounded once to the dtype (``norm_from_parts_ref``'s arithmetic)."""
    row = tl.program_id(0)
    q = tl.arange(0, BLOCK_Q)
    ss = tl.sum(tl.load(ss_ptr + row * ssm + q, mask=q < NQ, other=0.0), axis=0)
    r = tl.math.rsqrt(ss / K + eps)
    offs = tl.arange(0, BLOCK_K)
    ok = offs < K
    g = tl.load(g_ptr + row * sgm + offs, mask=ok, other=0.0)
    tl.store(o_ptr + row * som + offs, round_like(g.to(tl.float32) * r, g, IS_BF16).to(g.dtype), mask=ok)


def norm_from_parts_takes(gained: torch.Tensor, sumsq: torch.Tensor) -> bool:
    """Whether ``norm_from_parts`` takes these operands (its callers fall back to ``norm_from_parts_ref`` where not):
    bf16/fp16 rows and fp32 partial sums, one set a row."""
    return (gained.dtype in KERNEL_DTYPES and sumsq.dtype == torch.float32
            and tuple(sumsq.shape[:-1]) == tuple(gained.shape[:-1]))


def norm_from_parts(gained: torch.Tensor, sumsq: torch.Tensor, eps: float) -> torch.Tensor:
    """An RMSNorm's second half, ``gained * rsqrt(mean of squares + eps)`` from the first half's gained row and its
    partial sums of squares ``[..., NQ]`` fp32 (``norm_from_parts_ref``), in one launch: what a linear above decode
    sizes does before its product where the GEMV would have folded it in (seven torch kernels a norm before:
    ~0.9 ms of SmolLM2's 1x2048 prefill on an H100, session 58). bf16/fp16 rows; the reference's arithmetic, its
    rsqrt the device's (one step apart at most where the two round differently)."""
    k = gained.shape[-1]
    check(norm_from_parts_takes(gained, sumsq), "norm_from_parts",
          f"gained {gained.dtype} {tuple(gained.shape)}, sums of squares {sumsq.dtype} {tuple(sumsq.shape)}: bf16/fp16 "
          "rows and fp32 partial sums per row")
    g2, ss2 = gained.reshape(-1, k), sumsq.reshape(-1, sumsq.shape[-1])
    g2 = g2 if g2.stride(-1) == 1 else g2.contiguous()
    ss2 = ss2 if ss2.stride(-1) == 1 else ss2.contiguous()
    out = torch.empty_like(g2)
    block = next_pow2(k)
    launcher(g2, _norm_from_parts_kernel)[(g2.shape[0],)](
        g2, ss2, out, k, ss2.shape[1], g2.stride(0), ss2.stride(0), out.stride(0), eps=float(eps),
        IS_BF16=gained.dtype == torch.bfloat16, BLOCK_K=block, BLOCK_Q=next_pow2(ss2.shape[1]),
        num_warps=4 if block <= 4096 else 8)
    return out.reshape(gained.shape)
