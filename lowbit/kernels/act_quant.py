"""Dynamic symmetric activation quantization (int8 or fp8 e4m3), per token or per group of channels, one pass.

Numerics = ``dynamic_qparams(granularity="per_token", symmetric=True, block_size=g)`` then ``quantize``:
``scale = max(amax / qmax, 1e-12)``, int8 ``q = clamp(round_half_even(x / scale), -128, 127)``, fp8
``q = cast_rtne(clamp(x / scale, -448, 448))``. ``x / scale`` is an IEEE division (``div_rn``); ``amax / qmax``
follows torch on the tensor's device: IEEE on CPU, ``amax * fp32(1 / qmax)`` on CUDA (PyTorch's CUDA division by a
scalar multiplies by the reciprocal). Codes and scales are so bit-identical to the reference on either device. One
program reads one row once and writes codes and scales: the separate-ops version (amax, divide, round, cast) reads the
activation three times.
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl
from torch.library import triton_op

from lowbit.kernels._common import (
    check,
    launcher,
    max_nan,
    next_pow2,
    pdl_launch_options,
    pdl_prologue,
    round_half_even,
    round_like,
    round_to_e4m3,
)

__all__ = ["QMAX", "cuda_reciprocal", "divide_exact", "quantize_activation", "quantize_activation_ref",
           "quantize_codes", "quantize_store_row", "row_quant_setup", "row_scale"]

QMAX = {"int8": 127.0, "fp8e4m3": 448.0}
ACT_QUANT_WHOLE_ROW = 4096
"""Rows up to this wide (after rounding K up to a power of two) are quantized whole, one row per program; wider
ones in ``ACT_QUANT_CHUNK``-wide chunks. Session 18 on the H200 (``tools/bench_a8.py``: the W8A8 op minus its GEMM
in one run, 2048 tokens, estimates within ~10 µs): 11008-wide rows whole (16384 lanes, 64 per thread at 8 warps)
~67 µs, in 2048-wide chunks ~41, in 4096-wide chunks ~46; 4096-wide rows whole ~11 µs, in 2048-wide chunks ~22."""
ACT_QUANT_CHUNK = 2048
"""The chunk width of rows wider than ``ACT_QUANT_WHOLE_ROW``."""
ACT_QUANT_CHUNK_WARPS = 8
"""Warps of the chunked launch. Session 21 on the H200 (``tools/bench_act_quant.py``, run 2026-12-03-S21-aq2 of
bench/results/a8_gemm.json, 2048 x 11008 bf16, with ``divide_exact``): 2048-wide chunks on 8 warps 31.8 µs int8 /
42.1 fp8 against 35.7 / 47.8 on 4 (4096-wide chunks on 8: 30.8 / 42.2). At 45-50% of the copy bandwidth either
way: the two passes over each row (amax, then codes) bound it, and the whole A8 op at 11008 x 4096 stays ~1.4x
cuBLAS bf16 with it (the GEMM alone 1.78x)."""
_STORAGE = {"int8": torch.int8, "fp8e4m3": torch.float8_e4m3fn}


def quantize_activation_ref(x: torch.Tensor, qdtype: str, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain torch (lowbit's ops): codes ``[M, K]`` and fp32 scales ``[M, K/g]`` (``[M, 1]`` per token)."""
    from lowbit.ir.quant import dynamic_qparams, quantize

    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    bs = group_size or k
    scale, _ = dynamic_qparams(x2, qdtype=qdtype, granularity="per_token", symmetric=True, axis=-1, block_size=bs)
    q = quantize(x2, scale, None, qdtype=qdtype, axis=-1, block_size=bs)
    return q, scale


def cuda_reciprocal(qmax: float) -> float:
    """fp32(1 / qmax), as PyTorch's CUDA ``tensor / python_scalar`` computes it before multiplying. numpy, not
    torch: the ops call this while torch.compile traces them under fake tensors."""
    return float(np.float32(1.0) / np.float32(qmax))


@triton.jit
def quantize_store_row(x, q_ptr, s_ptr, offs, ok, K, QMAX: tl.constexpr, RCP: tl.constexpr, IS_FP8: tl.constexpr,
                       GROUP: tl.constexpr, BLOCK_K: tl.constexpr):
    """Quantize one row ``x`` (fp32 ``[BLOCK_K]``, 0 past K) and store its codes at ``q_ptr + offs`` and its
    scale(s) at ``s_ptr`` (one, or one per ``GROUP`` channels): shared by this kernel and the fused
    RMSNorm+quantize (``norm_quant.py``)."""
    if GROUP == 0:
        s = row_scale(max_nan(tl.abs(x), 0), QMAX, RCP)
        tl.store(s_ptr, s)
        y = divide_exact(x, s, RCP)
    else:
        NG: tl.constexpr = BLOCK_K // GROUP
        x3 = tl.reshape(x, (NG, GROUP))
        s = row_scale(max_nan(tl.abs(x3), 1), QMAX, RCP)
        offs_g = tl.arange(0, NG)
        tl.store(s_ptr + offs_g, s, mask=offs_g * GROUP < K)
        y = tl.reshape(divide_exact(x3, s[:, None], RCP), (BLOCK_K,))
    _store_codes(y, q_ptr + offs, ok, QMAX, IS_FP8)


@triton.jit
def divide_exact(x, s, RCP: tl.constexpr):
    """``x / s`` (``s`` broadcast to ``x``) with the IEEE quotient's bits, as torch divides. On the GPU (``RCP``
    nonzero): ``s``'s correctly rounded reciprocal ``r`` (one division per scale, not per element), ``q = x r``,
    then twice ``q += fma(-q, s, x) r`` (the remainder is exact in an FMA; Markstein's correction) — H200,
    ``tools/probe_div.py``: 0 of 2**30 random quotients differ from ``div_rn``, and the 2048 x 11008 per-token
    int8 quantize took 32.8 µs against 38.8 with ``div_rn`` per element. A zero quotient keeps ``x r``'s sign
    (the corrections add +0). The interpreter's fma rounds twice, so there (``RCP`` 0): ``div_rn``."""
    if RCP != 0.0:
        r = tl.broadcast_to(tl.math.div_rn(tl.zeros_like(s) + 1.0, s), x.shape)
        sb = tl.broadcast_to(s, x.shape)
        q = x * r
        q = tl.fma(tl.fma(-q, sb, x), r, q)
        q = tl.fma(tl.fma(-q, sb, x), r, q)
        return tl.where(q == 0.0, x * r, q)
    return tl.math.div_rn(x, tl.zeros_like(x) + s)


@triton.jit
def row_scale(amax, QMAX: tl.constexpr, RCP: tl.constexpr):
    """``max(amax / qmax, 1e-12)`` as the reference computes it on the device (``RCP``: CUDA's reciprocal)."""
    if RCP != 0.0:
        return tl.maximum(amax * RCP, 1e-12, propagate_nan=tl.PropagateNan.ALL)
    return tl.maximum(tl.math.div_rn(amax, tl.zeros_like(amax) + QMAX), 1e-12, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def quantize_codes(y, QMAX: tl.constexpr, IS_FP8: tl.constexpr):
    """``y = x / scale`` rounded to the code (int8: half to even, clamped; fp8: clamped, RTNE cast): shared with
    the A8 GEMV, which quantizes its activation rows in registers (``a8_gemv.py``)."""
    # one return after a constexpr if/else: a return in each arm compiles as two return types (int8 and fp8) and
    # Triton's compiler refuses it ("Inconsistent return types"), which the CPU interpreter does not check
    if IS_FP8:
        q = round_to_e4m3(tl.clamp(y, -QMAX, QMAX)).to(tl.float8e4nv)
    else:
        q = tl.clamp(round_half_even(y), -128.0, 127.0).to(tl.int8)
    return q


@triton.jit
def _store_codes(y, ptrs, ok, QMAX: tl.constexpr, IS_FP8: tl.constexpr):
    """``y``'s codes (``quantize_codes``) stored."""
    tl.store(ptrs, quantize_codes(y, QMAX, IS_FP8), mask=ok)


@triton.jit
def _load_row(ptrs, ok, rstd, NQ: tl.constexpr, IS_BF16: tl.constexpr):
    """A row (or chunk) as fp32, 0 past K; with ``NQ`` partials it is ``gain * stream`` times the row's ``rstd``,
    rounded to its dtype as ``norm_from_parts_ref`` rounds it (bf16 half to even by its bits: the interpreter's
    cast truncates)."""
    xin = tl.load(ptrs, mask=ok, other=0.0)
    x = xin.to(tl.float32)
    if NQ > 0:
        x = round_like(x * rstd, xin, IS_BF16)
    return x


@triton.jit  # eps is a constexpr as in norm_quant.py: a run-time float turned fp64 under Inductor
def _act_quant_kernel(x_ptr, q_ptr, s_ptr, n_ptr, K, sxm, sqm, ssm,
                      QMAX: tl.constexpr, RCP: tl.constexpr, IS_FP8: tl.constexpr, GROUP: tl.constexpr,
                      BLOCK_K: tl.constexpr, CHUNKED: tl.constexpr, eps: tl.constexpr, NQ: tl.constexpr,
                      NQP: tl.constexpr, IS_BF16: tl.constexpr, PDL: tl.constexpr):
    """One row per program. ``CHUNKED``: the row in ``BLOCK_K``-wide chunks — per group, each chunk quantized
    on its own (its groups lie inside it); per token, a first pass for the row's amax and a second (the row again,
    from L2) for the codes. ``NQ > 0``: ``x`` is a split RMSNorm's ``gain * stream`` and ``n`` (``[M, NQ]`` fp32)
    the stream's partial sums of squares; every load is normed (``_load_row``), as ``a8_gemv`` norms its rows.
    ``PDL``: let the next kernel launch, then wait: every input is another kernel's output."""
    pdl_prologue(PDL)
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK_K)
    rstd = 1.0
    if NQ > 0:  # a8_gemv's statistics: the partials' sum, / K, + eps, rsqrt
        parts = tl.arange(0, NQP)
        rstd = tl.rsqrt(tl.sum(tl.load(n_ptr + row * NQ + parts, mask=parts < NQ, other=0.0), axis=0) / K + eps)
    if not CHUNKED:
        ok = offs < K
        x = _load_row(x_ptr + row * sxm + offs, ok, rstd, NQ, IS_BF16)
        quantize_store_row(x, q_ptr + row * sqm, s_ptr + row * ssm, offs, ok, K, QMAX, RCP, IS_FP8, GROUP, BLOCK_K)
    elif GROUP > 0:
        for c in range(0, K, BLOCK_K):
            ok = offs < K - c
            x = _load_row(x_ptr + row * sxm + c + offs, ok, rstd, NQ, IS_BF16)
            quantize_store_row(x, q_ptr + row * sqm + c, s_ptr + row * ssm + c // GROUP, offs, ok, K - c, QMAX, RCP,
                               IS_FP8, GROUP, BLOCK_K)
    else:
        amax = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for c in range(0, K, BLOCK_K):
            x = _load_row(x_ptr + row * sxm + c + offs, offs < K - c, rstd, NQ, IS_BF16)
            amax = tl.maximum(amax, tl.abs(x), propagate_nan=tl.PropagateNan.ALL)
        s = row_scale(max_nan(amax, 0), QMAX, RCP)
        tl.store(s_ptr + row * ssm, s)
        for c in range(0, K, BLOCK_K):
            ok = offs < K - c
            x = _load_row(x_ptr + row * sxm + c + offs, ok, rstd, NQ, IS_BF16)
            _store_codes(divide_exact(x, s, RCP), q_ptr + row * sqm + c + offs, ok, QMAX, IS_FP8)


def row_quant_setup(x: torch.Tensor, qdtype: str, group_size: int, op: str
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    """What a kernel quantizing one row per program (``quantize_store_row``) needs: ``x`` as contiguous rows
    ``[M, K]``, the code ``[M, K]`` and scale ``[M, K/g or 1]`` buffers, and the launch's constexprs and warps
    (shared by ``quantize_activation`` and ``norm_quant.rms_norm_quant``)."""
    check(qdtype in QMAX, op, f"qdtype {qdtype!r} is not int8 or fp8e4m3")
    k = x.shape[-1]
    # a K that is not a multiple of the group ends in a partial group (fp8-block128 on K = 576): the zeros past K
    # in the padded row leave its amax as it is
    check(group_size >= 0, op, f"group_size {group_size} is negative")
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    q = torch.empty((m, k), device=x.device, dtype=_STORAGE[qdtype])
    s = torch.empty((m, -(-k // group_size) if group_size else 1), device=x.device, dtype=torch.float32)
    block = max(next_pow2(k), group_size)
    meta = {"QMAX": QMAX[qdtype], "RCP": cuda_reciprocal(QMAX[qdtype]) if x.is_cuda else 0.0,
            "IS_FP8": qdtype == "fp8e4m3",
            "GROUP": group_size, "BLOCK_K": block, "num_warps": 4 if block <= 4096 else 8}
    return x2, q, s, meta


@triton_op("lowbit::quantize_activation", mutates_args=())
def quantize_activation(x: torch.Tensor, qdtype: str, group_size: int, norm_sumsq: torch.Tensor | None = None,
                        norm_eps: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes ``[M, K]`` (int8 / float8_e4m3fn) and fp32 scales ``[M, ceil(K/g)]`` (``[M, 1]`` when ``group_size`` is
    0; a last partial group where ``g`` does not divide K). ``norm_sumsq`` (``[..., P]`` fp32): ``x`` is a split
    RMSNorm's ``gain * stream`` and these the stream's partial sums of squares; the rows are normed as they load
    (``norm_from_parts_ref``, ``norm_eps``), so a split norm's reader above decode sizes (``a8_linear``) is this
    one launch, as ``rms_norm_quant`` was, where torch ops + this launch had replaced it."""
    x2, q, s, meta = row_quant_setup(x, qdtype, group_size, "quantize_activation")
    m, k = x2.shape
    nq = 0
    if norm_sumsq is not None:
        nq = norm_sumsq.shape[-1]
        check(norm_sumsq.dtype == torch.float32 and norm_sumsq.numel() == m * nq, "quantize_activation",
              f"norm partials {norm_sumsq.dtype} {tuple(norm_sumsq.shape)}: fp32 [..., P] of the {m} rows of x "
              f"{tuple(x.shape)}")
        norm_sumsq = norm_sumsq.reshape(m, nq).contiguous()
    # every constexpr passed, defaults too: torch.compile's launch of a traced Triton kernel needs them all
    meta = dict(meta, CHUNKED=False, eps=float(norm_eps), NQ=nq, NQP=next_pow2(max(nq, 1)),
                IS_BF16=x.dtype == torch.bfloat16)
    if meta["BLOCK_K"] > ACT_QUANT_WHOLE_ROW:
        meta.update(BLOCK_K=max(ACT_QUANT_CHUNK, group_size), CHUNKED=True, num_warps=ACT_QUANT_CHUNK_WARPS)
    launcher(x2, _act_quant_kernel)[(m,)](x2, q, s, norm_sumsq if nq else s, k, x2.stride(0), q.stride(0),
                                          s.stride(0), **meta, **pdl_launch_options())
    return q, s
