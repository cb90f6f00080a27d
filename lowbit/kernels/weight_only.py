"""W4A16 / W8A16 (and W3/W2, which share the 4-bit storage): weight-only quantized linear, on two layouts.

Stored layout (the checkpoint's, design.md "Packed weights"): 4-bit and narrower codes packed two per uint8
along K, low nibble = even index, ``[N, K/2]``; int8/uint8 ``[N, K]``; scale ``[N]`` (per channel) or
``[N, K/g]``; zero point the scale's shape or None. Every path takes it (the byte kernels below).

Decode layout (``pack_words``, made ONCE at lowering by the triton backend; same bytes, the buffers are replaced,
not copied): int32 words, K-interleaved within chunks of ``32/bits * CW`` codes (``CW`` = 32, 16 or, int4, 8 words, from
``chunk_words``): word ``c*CW + j`` holds codes ``k = c*per*CW + i*CW + j`` at bits ``[bits*i, bits*(i+1))``.
Why: a GEMV thread's 16-byte load brings 4 words = 32 codes, and for each code position ``i`` the activations
those 4 words need are contiguous (``x[c*per*CW + i*CW + j .. +4]``: one 8-byte load serves them), where the
stored layout needs the even and odd K columns apart (stride-2 activation loads) or an in-register interleave;
a scale group covers whole ``i`` columns of a chunk, so one scale per row per ``i`` (not per element). Scales
and zero points are stored transposed (``[N, K/g]`` with strides ``(1, N)``) so a row tile's scales of one group
are one contiguous load. Taken where ``chunk_words`` is non-zero (K a multiple of 256 codes, or 128, or for int4 64, and
the group a multiple of the chunk width): 4096/11008/1536/4864/896 and SmolLM2's 576 (``CW = 8``) all take it.
At ``CW = 8`` every M = 1 kernel runs as at 16; 2 <= M <= 16 runs ``_tc_chunk`` (``DOT_MIN_CW``).
The words come in two memory orders of the same ``[N, K*bits/32]`` tensor: K-major (contiguous rows) and N-major
(strides ``(1, N)``: word ``w`` of every row together, ``pack_words(..., n_major=True)``); the kernels tell them
apart by the strides (``is_n_major``). ``pack_words`` makes N-major by default (``words_n_major``: K-major only
at the shapes of ``K_MAJOR_SHAPES`` and 4-bit ``K_MAJOR_MIN_K`` <= K <= ``K_MAJOR_MAX_K``), from the H200 sweep
(``tools/bench_gemv.py``, bench/results/gemv.json).

Decode layout kernels (M <= 16). No int -> float conversion: a code is shifted into the top mantissa bits of
1.0 (``f = 1 + u/2**b``, one shift and one and-or), and ``s*(q - z)`` is algebra around the products.
- N-major words (the default): ``_gemv_r`` (M = 1 int4 at the shapes of ``_R_TABLE``, ``R_RULE`` at other shapes of
  12M weights or more: 16 word rows per thread,
  codes by one and-xor each at three exponents, split-K partials + a reduce kernel), ``_gemv_t`` (M = 1 elsewhere:
  ``[U, CW, BLOCK_N]`` tiles coalesced along N, the activation a broadcast load, split-K partials + a reduce; with
  an epilogue or a block fusion at K <= 1536 one split that does the reduce's work itself, ``FOLD``) and
  ``_tc_t`` (2 <= M <= 16: one ``[CW, BLOCK_N]`` tile per chunk, one dot per code position); ``_tc_pairs`` (opt-in
  ``PAIRS``: int4 codes unpacked two per ``lop3`` + ``sub.bf16x2`` inline asm on the GPU) is swept but not a default
  (not yet checked on a GPU). Removed after their GPU sweeps (session 57, H100, runs S57-flat / S57-wide of
  gemv.json): one chained dot per (chunk, code position) or per 64-256 K, the scale folded into the bf16 weight
  operand, which sm_90's pipeliner keeps in flight (``pendings = 1`` where ``_tc_t`` waits for each dot) but which
  took 1.5-1.8x ``_tc_t``'s time at M = 16 and 1.0-2.5x dequantize + cuBLAS's at M = 128.
- K-major words, M = 1, CUDA cores (``_gemv_words``): ``[BLOCK_N, U, CW]`` word tiles, one FMA per code into a deferred
  fp32 accumulator, the activation's running sum times ``d = 1 + (off + z)/2**b`` and the scale applied once per group,
  one reduction after the loop; grid over N only at the goal shapes (no split-K). With an epilogue or a block fusion
  at one split, ``FOLD`` as ``_gemv_t``'s (``FOLD_K``).
- 2 <= M <= 16, tensor cores (``_tc_words``): per chunk and code position one ``[16, CW] x [CW, BLOCK_N]`` dot on
  exact small integers ``q - z`` in the activation dtype (wgmma with the weights as the M side, ``SWAP``), the
  scale on the fp32 partial once per group; split-K with an fp32 partial buffer and a deterministic reduce kernel.
- 16 < M <= 256 where ``_PREFILL_TC_TABLE`` has the shape (the H200 sweep's winners, runs S8a/S8b of gemv.json):
  ``_tc_t`` with 32/64-row tiles, or ``_tc_chunk`` (one ``[BLOCK_M, PS*CW] x [PS*CW, BLOCK_N]`` dot per ``PS`` code
  positions, the weights dequantized once to the activation dtype). Measured at 4096x11008: M = 32 26.3 µs (0.97x
  cuBLAS bf16, dequantize + cuBLAS 61.9), M = 64 42.8 (0.62x; 62.4). Both are bound by the dequantize's ALU work
  and the operand's trip through shared memory, not by tensor cores (~135-160 TFLOPS at M = 64-128), so M = 128
  stays on dequantize + cuBLAS at four of the five 7B shapes.
- M > 16 elsewhere: one dequantize kernel (bit-exact ``(q - z) * s`` rounded once) and cuBLAS.
Configs: ``words_config`` (the H200 sweeps' tables at the decode shapes, ``_WORDS_T_TABLE`` / ``_WORDS_TABLE``,
a rule elsewhere). Measured (R1, CUDA-graph replay, 4096x11008 int4 g128): M = 1 18.3 µs = 1.35x cuBLAS bf16
(K-major 22.3 µs), M = 16 23.9 µs = 1.06x: both kernels are latency-bound per program (split 1 took ~40 µs at
every N), far from the ~5.5 µs byte limit.

Stored layout kernels (the fallback where the decode layout does not apply):
- M <= 16: split-K GEMV (``_wo_kernel`` with ``HALVES``), config from ``gemv_config``.
- M > 16: tiled GEMM with the dequantize in the main loop, autotuned; for M >= ``DEQUANT_CUBLAS_MIN_M`` on the
  GPU the op dequantizes once and calls cuBLAS, where that was measured faster (bench/results/kernels.json).

Numerics: the byte kernels round each dequantized weight to the activation dtype as the reference does; the word
kernels keep ``(q - z)`` exact and apply the fp32 scale to fp32 partial sums (no bf16 rounding of the weight), so
both differ from the reference by accumulation order and that rounding only (tests: relative tolerance).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.library import triton_op
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from lowbit.kernels._common import (
    activation,
    apply_epilogue,
    cdiv,
    check,
    epilogue_ref,
    interpreting,
    is_pow2,
    launcher,
    m_bucket,
    next_pow2,
    nibbles,
    norm_from_parts_ref,
    norm_parts_ref,
    on_kernel_device,
    on_kernel_rows,
    parse_epilogue,
    pdl_launch_options,
    pdl_launches,
    pdl_on,
    pdl_prologue,
    pow2_at_most,
    unpack_nibbles,
)
from lowbit.kernels.norm_quant import add_norm_parts, add_norm_parts_takes, norm_from_parts, norm_from_parts_takes

__all__ = [
    "BYTE_QDTYPES",
    "DEQUANT_CUBLAS_MIN_M",
    "PACKED_QDTYPES",
    "chunk_words",
    "dequantize_weight",
    "gemv_config",
    "interleave_rows",
    "pack_words",
    "unpack_words",
    "weight_only_linear",
    "weight_only_linear_add_norm",
    "weight_only_linear_ref",
]

PACKED_QDTYPES = {"int4": True, "uint4": False, "int3": True, "int2": True}
"""Packed qdtypes -> signed: int3/int2 are stored in signed nibbles, so the int4 kernel runs them as they are."""
BYTE_QDTYPES = {"int8": True, "uint8": False}

DEQUANT_CUBLAS_MIN_M = 17
"""From this M on, the op dequantizes the weight (one Triton kernel) and calls cuBLAS: on the H200 that beat this
module's tiled GEMM at M = 128 (0.29x vs 0.23x cuBLAS bf16) and M = 2048 (0.85x vs 0.23x), 4096x11008 g128."""

SPLIT_TARGET_PROGRAMS = {1: 1056, 16: 264}
"""Split-K aims at this many programs (M = 1: ~8 per SM of the H200's 132; M = 16 with 128-wide N tiles: ~2):
the sweep's best split at 4096x11008 (bench/results/kernels.json, ``w4a16_gemv_sweep_best``)."""


def weight_only_linear_ref(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                           zero_point: torch.Tensor | None, bias: torch.Tensor | None, qdtype: str,
                           group_size: int, epilogue: str = "") -> torch.Tensor:
    """Plain torch: ``dequantize(qweight)`` to ``x.dtype`` (lowbit's reference op), ``F.linear``, then the
    epilogue's ops (``epilogue_ref``)."""
    from lowbit.ir.quant import dequantize

    if qweight.dtype == torch.int32:  # the decode layout (``pack_words``): back to the stored form
        qweight = unpack_words(qweight, qdtype, x.shape[-1], group_size)
    w = dequantize(qweight, scale, zero_point, qdtype=qdtype, axis=1 if group_size else 0,
                   block_size=group_size or None, out_dtype=x.dtype)
    return epilogue_ref(F.linear(x, w, bias), epilogue)


@triton.jit
def _scale_cols(q, s_ptr, z_ptr, offs_n, n_ok, c0, c_hi, ssn, s_n, z_n,
                GROUP: tl.constexpr, GC: tl.constexpr, HAS_ZP: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_C: tl.constexpr):
    """fp32 ``(q - zp) * scale`` for code columns ``c0 .. c0+BLOCK_C`` of ``[BLOCK_N, BLOCK_C]``; a scale group
    spans ``GC`` columns (``GROUP`` 0 = per channel: ``s_n``/``z_n``)."""
    q = q.to(tl.float32)
    if GROUP == 0:
        if HAS_ZP:
            q = q - z_n[:, None]
        w = q * s_n[:, None]
    elif BLOCK_C <= GC:
        g = c0 // GC
        s = tl.load(s_ptr + offs_n * ssn + g, mask=n_ok, other=0).to(tl.float32)
        if HAS_ZP:
            z = tl.load(z_ptr + offs_n * ssn + g, mask=n_ok, other=0).to(tl.float32)
            q = q - z[:, None]
        w = q * s[:, None]
    else:
        NG: tl.constexpr = BLOCK_C // GC
        offs_g = c0 // GC + tl.arange(0, NG)
        g_ok = n_ok[:, None] & (offs_g * GC < c_hi)[None, :]
        s = tl.load(s_ptr + offs_n[:, None] * ssn + offs_g[None, :], mask=g_ok, other=0).to(tl.float32)
        q3 = tl.reshape(q, (BLOCK_N, NG, GC))
        if HAS_ZP:
            z = tl.load(z_ptr + offs_n[:, None] * ssn + offs_g[None, :], mask=g_ok, other=0).to(tl.float32)
            q3 = q3 - z[:, :, None]
        w = tl.reshape(q3 * s[:, :, None], (BLOCK_N, BLOCK_C))
    return w


@triton.jit
def _dequant_tile(w_ptr, s_ptr, z_ptr, offs_n, n_ok, k0, k_hi, swn, ssn, s_n, z_n,
                  PACKED: tl.constexpr, SIGNED: tl.constexpr, GROUP: tl.constexpr, HAS_ZP: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """fp32 dequantized weights ``[BLOCK_N, BLOCK_K]`` in K order for columns ``k0 .. k0+BLOCK_K`` (masked past
    ``k_hi``); packed codes are unpacked with an interleave of the two nibbles."""
    if PACKED:
        offs_b = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        b = tl.load(w_ptr + offs_n[:, None] * swn + offs_b[None, :],
                    mask=n_ok[:, None] & (offs_b * 2 < k_hi)[None, :], other=0)
        q = unpack_nibbles(b, SIGNED)
    else:
        offs_k = k0 + tl.arange(0, BLOCK_K)
        q = tl.load(w_ptr + offs_n[:, None] * swn + offs_k[None, :],
                    mask=n_ok[:, None] & (offs_k < k_hi)[None, :], other=0)
    return _scale_cols(q, s_ptr, z_ptr, offs_n, n_ok, k0, k_hi, ssn, s_n, z_n, GROUP, GROUP, HAS_ZP, BLOCK_N,
                       BLOCK_K)


@triton.jit
def _tile_mn(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The tiled kernels' grid ``(N tiles, K splits, M tiles)``: this program's K split, row and column offsets and
    their bounds masks."""
    offs_m = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    return tl.program_id(1), offs_m, offs_n, offs_m < M, offs_n < N


@triton.jit
def _tc_start(s_ptr, z_ptr, offs_n, n_ok, ssn, zero_base, GROUP: tl.constexpr, HAS_ZP: tl.constexpr,
              SWAP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The tensor-core word kernels' start ``(acc, s, cc)``: the fp32 accumulator (``[BLOCK_N, BLOCK_M]`` when
    ``SWAP``), and per channel (``GROUP`` 0) the scale and ``zero_base`` plus the zero point; with groups a zero
    scale and ``zero_base`` (each group loads its own)."""
    if SWAP:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    cc = tl.zeros((BLOCK_N,), dtype=tl.float32) + zero_base
    s = tl.zeros((BLOCK_N,), dtype=tl.float32)
    if GROUP == 0:
        s = tl.load(s_ptr + offs_n * ssn, mask=n_ok, other=0).to(tl.float32)
        if HAS_ZP:
            cc += tl.load(z_ptr + offs_n * ssn, mask=n_ok, other=0).to(tl.float32)
    return acc, s, cc


@triton.jit
def _dot_operands(v, x, SWAP: tl.constexpr):
    """A tensor-core word kernel's dot operands for codes ``v [CW, BLOCK_N]`` and activations ``x [BLOCK_M, CW]``:
    ``(x, v)``, or with ``SWAP`` ``(v.T, x.T)`` (the weights as the dot's wide M side, the product ``out.T``)."""
    if SWAP:
        a = tl.trans(v)
        b = tl.trans(x)
    else:
        a = x
        b = v
    return a, b


@triton.jit
def _word_tile(w_ptr, c, offs_j, offs_n, n_ok, swk, swn, SIGNED: tl.constexpr, XOR: tl.constexpr, CW: tl.constexpr):
    """Chunk ``c``'s ``[CW, BLOCK_N]`` word tile, signed codes moved to offset binary (``^ XOR``); word strides
    ``swk`` / ``swn`` (N-major: ``(N, 1)``, K-major: ``(1, K*bits/32)``)."""
    wv = tl.load(w_ptr + (c * CW + offs_j[:, None]) * swk + offs_n[None, :] * swn, mask=n_ok[None, :], other=0)
    if SIGNED:
        wv = wv ^ XOR
    return wv


@triton.jit
def _mac(acc, x, w, BLOCK_M: tl.constexpr, UPCAST: tl.constexpr):
    """acc += x @ w.T (fp32 accumulation); M = 1 is a CUDA-core multiply-reduce."""
    if BLOCK_M == 1:
        acc += tl.sum(x.to(tl.float32) * w.to(tl.float32), axis=1)[None, :]
    elif UPCAST:  # the interpreter's bf16 dot is wrong (Triton 3.8); fp32 operands hold bf16 values exactly
        acc = tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
    else:
        acc = tl.dot(x, tl.trans(w), acc)
    return acc


@triton.jit
def _wo_kernel(x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, o_ptr, M, N, K, K_SPLIT, M_KEY,
               sxm, swn, ssn, som, sos,
               PACKED: tl.constexpr, SIGNED: tl.constexpr, GROUP: tl.constexpr, HAS_ZP: tl.constexpr,
               HAS_BIAS: tl.constexpr, PARTIAL: tl.constexpr, UPCAST: tl.constexpr, HALVES: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DEFER: tl.constexpr = False):
    """``HALVES`` (the GEMV): packed weights are not interleaved back into K order; the even (low-nibble) and odd
    (high-nibble) K columns are two half-width products against the activation's even and odd columns. Without
    it (the tiled GEMM) the nibbles are interleaved in registers: the stride-2 activation loads that HALVES
    needs made the tensor-core GEMM ~3x slower on the H200 (bench/results/kernels.json, M = 2048).
    ``DEFER`` (M = 1): accumulate elementwise products in a ``[BLOCK_N, BLOCK_K]`` fp32 tile and reduce over K once
    after the loop instead of once per step (a sweep candidate; not yet measured)."""
    pid_k, offs_m, offs_n, m_ok, n_ok = _tile_mn(M, N, BLOCK_M, BLOCK_N)
    s_n = tl.zeros((BLOCK_N,), dtype=tl.float32)
    z_n = tl.zeros((BLOCK_N,), dtype=tl.float32)
    if GROUP == 0:
        s_n = tl.load(s_ptr + offs_n, mask=n_ok, other=0).to(tl.float32)
        if HAS_ZP:
            z_n = tl.load(z_ptr + offs_n, mask=n_ok, other=0).to(tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_h = tl.zeros((BLOCK_N, BLOCK_K // 2), dtype=tl.float32)
    acc_k = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    k_lo = pid_k * K_SPLIT
    k_hi = tl.minimum(k_lo + K_SPLIT, K)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        if PACKED and HALVES:
            BH: tl.constexpr = BLOCK_K // 2
            offs_c = k0 // 2 + tl.arange(0, BH)
            c_ok = offs_c * 2 < k_hi
            xm = m_ok[:, None] & c_ok[None, :]
            x_even = tl.load(x_ptr + offs_m[:, None] * sxm + 2 * offs_c[None, :], mask=xm, other=0.0)
            x_odd = tl.load(x_ptr + offs_m[:, None] * sxm + 2 * offs_c[None, :] + 1, mask=xm, other=0.0)
            b = tl.load(w_ptr + offs_n[:, None] * swn + offs_c[None, :], mask=n_ok[:, None] & c_ok[None, :], other=0)
            lo, hi = nibbles(b, SIGNED)
            w_lo = _scale_cols(lo, s_ptr, z_ptr, offs_n, n_ok, k0 // 2, k_hi // 2, ssn, s_n, z_n,
                               GROUP, GROUP // 2, HAS_ZP, BLOCK_N, BH).to(x_even.dtype)
            w_hi = _scale_cols(hi, s_ptr, z_ptr, offs_n, n_ok, k0 // 2, k_hi // 2, ssn, s_n, z_n,
                               GROUP, GROUP // 2, HAS_ZP, BLOCK_N, BH).to(x_even.dtype)
            if DEFER and BLOCK_M == 1:
                acc_h += x_even.to(tl.float32) * w_lo.to(tl.float32) + x_odd.to(tl.float32) * w_hi.to(tl.float32)
            else:
                acc = _mac(acc, x_even, w_lo, BLOCK_M, UPCAST)
                acc = _mac(acc, x_odd, w_hi, BLOCK_M, UPCAST)
        else:
            offs_k = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + offs_m[:, None] * sxm + offs_k[None, :],
                        mask=m_ok[:, None] & (offs_k < k_hi)[None, :], other=0.0)
            w = _dequant_tile(w_ptr, s_ptr, z_ptr, offs_n, n_ok, k0, k_hi, swn, ssn, s_n, z_n,
                              PACKED, SIGNED, GROUP, HAS_ZP, BLOCK_N, BLOCK_K).to(x.dtype)
            if DEFER and BLOCK_M == 1:
                acc_k += x.to(tl.float32) * w.to(tl.float32)
            else:
                acc = _mac(acc, x, w, BLOCK_M, UPCAST)
    if DEFER and BLOCK_M == 1:
        if PACKED and HALVES:
            acc = tl.sum(acc_h, axis=1)[None, :]
        else:
            acc = tl.sum(acc_k, axis=1)[None, :]
    _store_tile(acc, o_ptr, b_ptr, pid_k, offs_m, offs_n, m_ok, n_ok, som, sos, PARTIAL, HAS_BIAS)


@triton.jit
def _store_tile(acc, o_ptr, b_ptr, pid_k, offs_m, offs_n, m_ok, n_ok, som, sos, PARTIAL: tl.constexpr,
                HAS_BIAS: tl.constexpr):
    """A GEMV/GEMM tile's epilogue: the fp32 partial of split ``pid_k`` (reduced by ``_splitk_reduce``), or the
    output (+ bias) cast to the output dtype."""
    mask = m_ok[:, None] & n_ok[None, :]
    if PARTIAL:
        tl.store(o_ptr + pid_k * sos + offs_m[:, None] * som + offs_n[None, :], acc, mask=mask)
    else:
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0).to(tl.float32)[None, :]
        tl.store(o_ptr + offs_m[:, None] * som + offs_n[None, :], acc.to(o_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _store_row(y, o_ptr, b_ptr, pid_k, offs_n, n_ok, sos, PARTIAL: tl.constexpr, HAS_BIAS: tl.constexpr):
    """An M = 1 GEMV's epilogue (``_store_tile`` for one row): the fp32 partial of split ``pid_k``, or the output
    (+ bias) cast to the output dtype."""
    if PARTIAL:
        tl.store(o_ptr + pid_k * sos + offs_n, y, mask=n_ok)
    else:
        if HAS_BIAS:
            y += tl.load(b_ptr + offs_n, mask=n_ok, other=0).to(tl.float32)
        tl.store(o_ptr + offs_n, y.to(o_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def _col_scale(t, s, SWAP: tl.constexpr):
    """``t`` times the per-output-channel ``s``: channels run along rows when ``SWAP`` (the tensor-core word
    kernels' ``out.T`` tile), along columns otherwise."""
    if SWAP:
        r = t * s[:, None]
    else:
        r = t * s[None, :]
    return r


@triton.jit
def _store_tc_tile(acc, s, o_ptr, b_ptr, pid_k, offs_m, offs_n, m_ok, n_ok, som, sos, GROUP: tl.constexpr,
                   SWAP: tl.constexpr, PARTIAL: tl.constexpr, HAS_BIAS: tl.constexpr):
    """The tensor-core word kernels' epilogue: the per-channel scale (``GROUP`` 0; grouped scales were applied per
    group in the loop), the ``SWAP`` tile back to ``[M, N]``, then ``_store_tile``."""
    if GROUP == 0:
        acc = _col_scale(acc, s, SWAP)
    if SWAP:
        acc = tl.trans(acc)
    _store_tile(acc, o_ptr, b_ptr, pid_k, offs_m, offs_n, m_ok, n_ok, som, sos, PARTIAL, HAS_BIAS)


@triton.jit
def _splitk_reduce(p_ptr, b_ptr, o_ptr, q_ptr, r_ptr, g_ptr, gx_ptr, qo_ptr, MN, N, K, eps, SPLIT: tl.constexpr,
                   HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr, ACT: tl.constexpr = 0, GATED: tl.constexpr = False,
                   NQ: tl.constexpr = 0, NQP: tl.constexpr = 0, HAS_RES: tl.constexpr = False,
                   NORM_OUT: tl.constexpr = False, PDL: tl.constexpr = False):
    """out = sum over splits of the fp32 partials (+ bias), cast: the second half of split-K, and the op's
    epilogue (``parse_epilogue``): ``ACT`` applied to the cast output, or with ``GATED`` the columns are (gate,
    up) pairs and out is ``act(gate) * up``, half as wide (``epilogue_ref``'s roundings: each of gate, up,
    act(gate) and the product rounded to the output dtype, as the unfused ops do).

    A transformer block's RMSNorm and residual add, split around it (``ReduceFusion``): ``NQ > 0``: the input was
    the norm's gain times the residual stream, and ``q_ptr`` (``[M, NQ]``) holds partial sums of the stream's
    squares: the sum is scaled by ``rsqrt(mean + eps)`` over ``K`` (``norm_from_parts_ref``); ``NQP > 0`` (M = 1,
    more than ``MANY_PARTIALS``: one per program of a folded float GEMV) reads them as one ``NQP``-wide vector
    instead of ``NQ`` unrolled loads. ``HAS_RES``: out =
    the residual ``r_ptr`` (``[M, N]``) + the product rounded to the output dtype (``residual_add``); with
    ``NORM_OUT`` (M = 1) the next norm's first half too: ``gx = g * out`` and this program's sum of ``out**2`` at
    ``qo_ptr[program]`` (``norm_parts_ref``)."""
    pdl_prologue(PDL)  # (``pdl_launches``) the next kernel may launch now; this one waits for the GEMV's partials
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < MN
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in tl.static_range(SPLIT):
        acc += tl.load(p_ptr + s * MN + offs, mask=ok, other=0.0)
    if NQ > 0:
        acc = acc / _norm_den(q_ptr, offs // N, ok, K, eps, NQ, NQP, BLOCK)
    _reduced_row(acc, offs, ok, offs % N, tl.program_id(0), MN, o_ptr, b_ptr, r_ptr, g_ptr, gx_ptr, qo_ptr,
                 HAS_BIAS, BLOCK, ACT, GATED, HAS_RES, NORM_OUT)


@triton.jit
def _norm_den(q_ptr, row, ok, K, eps, NQ: tl.constexpr, NQP: tl.constexpr, BLOCK: tl.constexpr):
    """An RMSNorm's ``sqrt(mean + eps)`` over ``K`` from ``NQ`` partial sums of squares (``norm_from_parts_ref``),
    for ``BLOCK`` outputs of rows ``row``: one ``NQP``-wide vector load and sum (M = 1, ``NQP > 0``), else ``NQ``
    loads summed in order. One helper for the reduce and the GEMVs that fold it in, so a folded launch divides by
    the same rounded value the reduce would."""
    if NQP > 0:
        parts = tl.arange(0, NQP)
        ss = tl.sum(tl.load(q_ptr + parts, mask=parts < NQ, other=0.0), axis=0)
    else:
        ss = tl.zeros((BLOCK,), dtype=tl.float32)
        for j in tl.static_range(NQ):
            ss += tl.load(q_ptr + row * NQ + j, mask=ok, other=0.0)
    return tl.sqrt(ss / K + eps)


@triton.jit
def _reduced_row(acc, offs, ok, col, pid, total, o_ptr, b_ptr, r_ptr, g_ptr, gx_ptr, qo_ptr, HAS_BIAS: tl.constexpr,
                 BLOCK: tl.constexpr, ACT: tl.constexpr, GATED: tl.constexpr, HAS_RES: tl.constexpr,
                 NORM_OUT: tl.constexpr):
    """A reduced (and normed) fp32 block ``acc`` of ``BLOCK`` outputs at flat ``offs`` (``ok`` in range, columns
    ``col``) of program ``pid`` to the op's output: bias, epilogue, residual add and the next norm's halves, with
    the unfused ops' roundings (``_splitk_reduce``'s second half; ``float_gemv._gemv_f``'s fold runs it too).
    ``GATED``: ``acc`` holds (gate, up) pairs and program ``pid`` writes outputs ``[pid * BLOCK/2, +BLOCK/2)`` of
    ``total / 2``."""
    if HAS_BIAS:
        acc += tl.load(b_ptr + col, mask=ok, other=0).to(tl.float32)
    dt = o_ptr.dtype.element_ty
    if GATED:
        g, u = tl.split(tl.reshape(acc.to(dt).to(tl.float32), (BLOCK // 2, 2)))
        a = activation(g, ACT).to(dt).to(tl.float32)
        half = pid * (BLOCK // 2) + tl.arange(0, BLOCK // 2)
        tl.store(o_ptr + half, (a * u).to(dt), mask=half < total // 2)
    else:
        if ACT != 0:
            acc = activation(acc.to(dt).to(tl.float32), ACT)
        if HAS_RES:
            acc = acc.to(dt).to(tl.float32) + tl.load(r_ptr + offs, mask=ok, other=0).to(tl.float32)
        out = acc.to(dt)
        tl.store(o_ptr + offs, out, mask=ok)
        if NORM_OUT:
            h = tl.where(ok, out.to(tl.float32), 0.0)
            gain = tl.load(g_ptr + col, mask=ok, other=0).to(tl.float32)
            tl.store(gx_ptr + offs, (gain * h).to(dt), mask=ok)
            tl.store(qo_ptr + pid, tl.sum(h * h, axis=0))


@triton.jit
def _folded_row(y, den, offs_n, ok, pid_n, N, o_ptr, b_ptr, r_ptr, g_ptr, gx_ptr, qo_ptr, HAS_BIAS: tl.constexpr,
                BLOCK_N: tl.constexpr, ACT: tl.constexpr, GATED: tl.constexpr, HAS_RES: tl.constexpr,
                NORM_OUT: tl.constexpr, NQ: tl.constexpr):
    """The end of a ``FOLD`` GEMV program (``_gemv_t``, ``float_gemv._gemv_f``): its summed row ``y`` divided by the
    norm's ``den`` (``NQ`` partials; ``_norm_den``), then ``_reduced_row`` for its ``BLOCK_N`` columns."""
    if NQ > 0:
        y = y / den
    _reduced_row(y, offs_n, ok, offs_n, pid_n, N, o_ptr, b_ptr, r_ptr, g_ptr, gx_ptr, qo_ptr, HAS_BIAS, BLOCK_N, ACT,
                 GATED, HAS_RES, NORM_OUT)


MANY_PARTIALS = 64  # norm partials per row above which ``_splitk_reduce`` reads them as one vector (``NQP``)


@dataclass
class ReduceFusion:
    """What a split-K reduce does besides the sum (``_splitk_reduce``), for the RMSNorm and residual add around a
    weight-only linear of a decode step: ``sumsq`` (``[M, NQ]`` partial sums of squares of the stream whose
    gained row is this op's input, with ``eps``) scales the product by the norm; ``residual`` is added to it;
    ``gain`` with ``gained`` (M = 1) also writes the next norm's halves of the result: ``gained`` and
    ``sumsq_out``, which ``_direct_or_split`` allocates (one partial per reduce program)."""

    residual: torch.Tensor | None = None
    sumsq: torch.Tensor | None = None
    eps: float = 0.0
    gain: torch.Tensor | None = None
    gained: torch.Tensor | None = None
    sumsq_out: torch.Tensor | None = None

    def to_rows(self, out: torch.Tensor) -> None:
        """Before a kernel launch: the inputs as the reduce reads them (``[M, n]`` rows, contiguous) and the gained
        output beside ``out`` (``[M, n_out]``)."""
        m, n_out = out.shape
        if self.residual is not None:
            self.residual = self.residual.reshape(m, n_out).contiguous()
        if self.gain is not None:
            self.gained = torch.empty_like(out)
        if self.sumsq is not None:
            self.sumsq = self.sumsq.reshape(m, -1).contiguous()

    def from_rows(self, lead: torch.Size | tuple[int, ...]) -> None:
        """After it: the next norm's halves in the input's leading shape ``lead``."""
        if self.gain is not None:
            self.gained = self.gained.reshape(*lead, -1)
            self.sumsq_out = self.sumsq_out.reshape(*lead, -1)


def _norm_vector(nq: int) -> int:
    """``NQP`` for ``nq`` norm partials per row (``_norm_den``): one vector load past ``MANY_PARTIALS`` (M = 1),
    else 0 (``nq`` loads in order)."""
    return triton.next_power_of_2(nq) if nq > MANY_PARTIALS else 0


UNFOLDED = {"FOLD": False, "ACT": 0, "GATED": False, "NQ": 0, "NQP": 0, "HAS_RES": False, "NORM_OUT": False}
"""The ``FOLD`` constexprs of a GEMV launch that leaves the epilogue to ``_splitk_reduce`` (passed all the same:
Inductor's launcher for a user kernel miscounts a defaulted constexpr left out)."""


def _fold_operands(x2: torch.Tensor, fusion: ReduceFusion | None, act: int, gated: bool, programs: int,
                   op: str) -> tuple[tuple, dict, float]:
    """A ``FOLD`` launch's share of the reduce's work (one split, M = 1: the GEMV's programs run
    ``_reduced_row`` themselves): the fusion's tensors (sumsq, residual, gain, gained, sumsq_out; None where it
    has none: the caller passes a stand-in), the constexprs and eps. With the next norm's halves it allocates
    ``sumsq_out``: one partial sum of squares per GEMV program (``programs``)."""
    f = fusion or ReduceFusion()
    nq = 0 if f.sumsq is None else f.sumsq.shape[-1]
    if f.gain is not None:
        check(f.residual is not None and not act and not gated, op,
              "the next norm's halves come from a residual add with no epilogue")
        f.sumsq_out = torch.empty((1, programs), device=x2.device, dtype=torch.float32)
    meta = {"FOLD": True, "ACT": act, "GATED": gated, "NQ": nq, "NQP": _norm_vector(nq),
            "HAS_RES": f.residual is not None, "NORM_OUT": f.gain is not None}
    return (f.sumsq, f.residual, f.gain, f.gained, f.sumsq_out), meta, f.eps


def _direct_or_split(x2: torch.Tensor, kernel, grid: tuple, args: Callable[[torch.Tensor, int, int], tuple],
                     meta: dict, split: int, n: int, out: torch.Tensor, bias: torch.Tensor | None,
                     b: torch.Tensor, epilogue: str, block: int, fusion: ReduceFusion | None = None,
                     pdl: bool | None = None) -> torch.Tensor:
    """Launch a GEMV/GEMM kernel of this module: straight into ``out`` (+ bias) when K is not split and there is
    no epilogue or ``fusion``, else fp32 partials ``[split, M, n]`` summed by ``_splitk_reduce``, which also
    applies the epilogue (so a one-split epilogue costs the reduce launch its unfused op would have cost) and the
    fusion. ``args(target, som, sos)``: the kernel's positional arguments writing to ``target`` with row and split
    strides ``som``/``sos``; ``block``: the reduce's program width (with ``fusion.gain``: one partial sum of
    squares per program); ``pdl``: whether ``kernel`` takes a ``PDL`` constexpr and launches with it now (default:
    ``_gemv_r`` / ``_gemv_t`` inside ``pdl_launches``)."""
    act, gated = parse_epilogue(epilogue, "weight_only_linear")
    # PDL is always passed to the kernels that declare it: Inductor's launcher for a user kernel miscounts its
    # arguments when a defaulted constexpr is left out (H200, torch 2.11: "launcher() missing ... '_grid_2'")
    takes_pdl = kernel in (_gemv_r, _gemv_t, _gemv_words) or pdl is not None
    on = takes_pdl and (pdl_on() if pdl is None else pdl)
    pdl = ({"PDL": on} | ({"launch_pdl": True} if on else {})) if takes_pdl else {}
    if split == 1 and not epilogue and fusion is None:
        launcher(x2, kernel)[grid](*args(out, out.stride(0), 0), HAS_BIAS=bias is not None, PARTIAL=False, **meta,
                                   **pdl)
        return out
    m, k = x2.shape
    part = torch.empty((split, m, n), device=x2.device, dtype=torch.float32)
    launcher(x2, kernel)[grid](*args(part, n, m * n), HAS_BIAS=False, PARTIAL=True, **meta, **pdl)
    f = fusion or ReduceFusion()
    nq = 0 if f.sumsq is None else f.sumsq.shape[-1]
    check(nq <= MANY_PARTIALS or m == 1, "weight_only_linear",
          f"{nq} norm partials per row (over {MANY_PARTIALS}) come from a folded GEMV at M = 1, got M={m}")
    if f.gain is not None:  # one partial sum of squares per reduce program: programs must not straddle rows
        check(m == 1 and f.residual is not None and not epilogue, "weight_only_linear",
              f"the next norm's halves come from a residual add at M = 1, got M={m}, epilogue {epilogue!r}")
        f.sumsq_out = torch.empty((1, cdiv(n, block)), device=x2.device, dtype=torch.float32)
    launcher(x2, _splitk_reduce)[(cdiv(m * n, block),)](
        part, b, out, *(t if t is not None else part for t in (f.sumsq, f.residual, f.gain, f.gained, f.sumsq_out)),
        m * n, n, k, f.eps, SPLIT=split, HAS_BIAS=bias is not None, BLOCK=block, ACT=act, GATED=gated, NQ=nq,
        NQP=_norm_vector(nq), HAS_RES=f.residual is not None,
        NORM_OUT=f.gain is not None, PDL=on, **({"launch_pdl": True} if on else {}))
    return out


def interleave_rows(t: torch.Tensor | None) -> torch.Tensor | None:
    """Rows ``[g0..g(I-1), u0..u(I-1)]`` (a merged gate/up weight, its scales or zero points) as ``[g0, u0, g1,
    u1, ...]``: the layout a gated epilogue (``act*up``, ``epilogue_ref``) reads."""
    if t is None:
        return None
    half = t.shape[0] // 2
    return torch.stack((t[:half], t[half:]), dim=1).reshape(t.shape).contiguous()


@triton.jit
def _dequant_kernel(w_ptr, s_ptr, z_ptr, o_ptr, N, K, swn, ssn,
                    PACKED: tl.constexpr, SIGNED: tl.constexpr, GROUP: tl.constexpr, HAS_ZP: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The dense weight, K order, contiguous stores (stride-2 stores of the two halves measured ~3x slower)."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    n_ok = offs_n < N
    s_n = tl.zeros((BLOCK_N,), dtype=tl.float32)
    z_n = tl.zeros((BLOCK_N,), dtype=tl.float32)
    if GROUP == 0:
        s_n = tl.load(s_ptr + offs_n, mask=n_ok, other=0).to(tl.float32)
        if HAS_ZP:
            z_n = tl.load(z_ptr + offs_n, mask=n_ok, other=0).to(tl.float32)
    w = _dequant_tile(w_ptr, s_ptr, z_ptr, offs_n, n_ok, k0, K, swn, ssn, s_n, z_n,
                      PACKED, SIGNED, GROUP, HAS_ZP, BLOCK_N, BLOCK_K)
    offs_k = k0 + tl.arange(0, BLOCK_K)
    tl.store(o_ptr + offs_n[:, None] * K + offs_k[None, :], w.to(o_ptr.dtype.element_ty),
             mask=n_ok[:, None] & (offs_k < K)[None, :])


def _gemm_configs() -> list[triton.Config]:
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
            for bm, bn, bk, w, s in ((128, 128, 64, 8, 3), (128, 128, 64, 4, 4), (64, 128, 64, 4, 4),
                                     (128, 256, 64, 8, 3), (32, 128, 128, 4, 4))]


_wo_kernel_tuned = triton.autotune(configs=_gemm_configs(), key=["M_KEY", "N", "K", "GROUP", "PACKED", "HAS_ZP"],
                                 warmup=5, rep=20)(
    _wo_kernel)

_GEMV_TABLE: dict[tuple[int, int, int], dict] = {
    (1, 11008, 4096): {"BLOCK_M": 1, "BLOCK_N": 32, "BLOCK_K": 256, "num_warps": 4, "num_stages": 3, "SPLIT_K": 3},
    (16, 11008, 4096): {"BLOCK_M": 16, "BLOCK_N": 128, "BLOCK_K": 128, "num_warps": 4, "num_stages": 4,
                        "SPLIT_K": 3},
}
"""Best GEMV configs of the H200 sweep keyed by (M bucket, N, K); ``gemv_config`` falls back to a rule elsewhere."""


def gemv_config(m: int, n: int, k: int, group: int) -> dict:
    """Block sizes, warps, stages and split count for the M <= 16 path."""
    cfg = _GEMV_TABLE.get((1 if m == 1 else 16, n, k))
    if cfg is None:
        bm = 1 if m == 1 else 16
        cfg = {"BLOCK_M": bm, "BLOCK_N": 32 if bm == 1 else 128, "BLOCK_K": 256 if bm == 1 else 128,
               "num_warps": 4, "num_stages": 3 if bm == 1 else 4}
    cfg = dict(cfg)
    if "SPLIT_K" not in cfg:
        n_tiles = cdiv(n, cfg["BLOCK_N"])
        target = SPLIT_TARGET_PROGRAMS[cfg["BLOCK_M"]]
        cfg["SPLIT_K"] = max(1, min(target // n_tiles, k // (cfg["BLOCK_K"] * 2)))
    return cfg


def _meta(qweight: torch.Tensor, qdtype: str, k: int) -> tuple[bool, bool]:
    if qdtype in PACKED_QDTYPES:
        check(qweight.dtype == torch.uint8 and qweight.shape[1] * 2 == k, "weight_only_linear",
              f"{qdtype} weight must be packed uint8 [N, K/2] with K={k}, got {qweight.dtype} {tuple(qweight.shape)}")
        return True, PACKED_QDTYPES[qdtype]
    check(qdtype in BYTE_QDTYPES, "weight_only_linear", f"qdtype {qdtype!r} is not int8/uint8/int4/uint4/int3/int2")
    check(qweight.shape[1] == k, "weight_only_linear", f"weight {tuple(qweight.shape)} does not match K={k}")
    return False, BYTE_QDTYPES[qdtype]


def _launch_gemv(x2, qweight, scale, zero_point, bias, out, packed, signed, group, cfg):
    m, k = x2.shape
    n = qweight.shape[0]
    split = cfg["SPLIT_K"]
    k_split = cdiv(cdiv(k, split), cfg["BLOCK_K"]) * cfg["BLOCK_K"]
    split = cdiv(k, k_split)
    grid = (cdiv(n, cfg["BLOCK_N"]), split, cdiv(m, cfg["BLOCK_M"]))
    zp = zero_point if zero_point is not None else scale
    b = bias if bias is not None else scale
    ssn = scale.stride(0)
    meta = {"PACKED": packed, "SIGNED": signed, "GROUP": group, "HAS_ZP": zero_point is not None,
            "UPCAST": interpreting(),
                "HALVES": True, "DEFER": cfg.get("DEFER", False),
                "BLOCK_M": cfg["BLOCK_M"], "BLOCK_N": cfg["BLOCK_N"], "BLOCK_K": cfg["BLOCK_K"],
                "num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}
    def args(t, som, sos):
        return (x2, qweight, scale, zp, b, t, m, n, k, k_split, m, x2.stride(0), qweight.stride(0), ssn, som, sos)

    return _direct_or_split(x2, _wo_kernel, grid, args, meta, split, n, out, bias, b, "", 1024)


def dequantize_weight(qweight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, qdtype: str,
                      group_size: int, k: int, dtype: torch.dtype) -> torch.Tensor:
    """The dense ``[N, K]`` weight in ``dtype`` (Triton kernel): the large-M path's one-off dequantize."""
    if qweight.dtype == torch.int32:
        _words_meta(qweight, qdtype, group_size, k)
        return _dequantize_words(qweight, scale, zero_point, qdtype, group_size, k, dtype)
    packed, signed = _meta(qweight, qdtype, k)
    n = qweight.shape[0]
    out = torch.empty((n, k), device=qweight.device, dtype=dtype)
    bn, bk = 32, 128 if group_size == 0 else max(128, group_size)
    launcher(qweight, _dequant_kernel)[(cdiv(n, bn), cdiv(k, bk))](
        qweight, scale, zero_point if zero_point is not None else scale, out, n, k, qweight.stride(0),
        scale.stride(0), PACKED=packed, SIGNED=signed, GROUP=group_size, HAS_ZP=zero_point is not None,
        BLOCK_N=bn, BLOCK_K=bk)
    return out



# ---------------------------------------------------------------------------------------------------------------
# The decode layout: int32 words, K-interleaved within a chunk (made once at lowering by ``pack_words``).

WORD_XOR = {4: -2004318072, 8: -2139062144}
"""0x88888888 / 0x80808080 as int32: XOR with it turns two's-complement codes into offset-binary ``q + 2**(b-1)``."""


def chunk_words(k: int, group: int, bits: int) -> int:
    """Words per row in one chunk of the word layout (32, 16, or for 4-bit codes 8), or 0 where K/group do not
    allow it: a chunk holds ``32/bits * CW`` consecutive K indices and every group must cover whole ``CW``-word
    columns. ``CW = 8`` (64 K indices) lets SmolLM2's K = 576 (and the pruned 1216) take the decode kernels and
    their fusions, which the byte layout has none of; 8-bit codes stop at 16 (64 K indices already)."""
    per = 32 // bits
    for cw in (32, 16, 8) if bits == 4 else (32, 16):
        if k % (per * cw) == 0 and (group == 0 or group % cw == 0):
            return cw
    return 0


def _codes(qweight: torch.Tensor, qdtype: str) -> torch.Tensor:
    """Stored codes ``[N, K]`` as their raw bit patterns (uint8: nibbles 0..15 or bytes)."""
    if qdtype in PACKED_QDTYPES:
        lo, hi = qweight & 0xF, qweight >> 4
        return torch.stack([lo, hi], -1).reshape(qweight.shape[0], -1)
    return qweight.view(torch.uint8)


def pack_words(qweight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, qdtype: str,
               group_size: int, n_major: bool | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """lowbit's stored weight -> the decode layout ``(int32 [N, K*bits/32], scale, zero point)``; unchanged
    tensors where ``chunk_words`` is 0 (the byte-layout kernels take those).

    Word ``c*CW + j`` of a row holds codes ``k = c*per*CW + i*CW + j`` for ``i = 0..per-1`` at bits ``[bits*i,
    bits*(i+1))`` (``per = 32/bits``): one 16-byte load brings 4 words, and the activation columns code ``i`` of
    those words needs are contiguous (``x[c*per*CW + i*CW + j]``), so the GEMV reads both with wide loads, and a
    scale group covers whole columns ``i`` of a chunk (one scale per row per ``i``). Scales and zero points are
    stored transposed (``[N, K/g]`` with strides ``(1, N)``) so one load of a group's scales across a row tile is
    contiguous.

    ``n_major``: the same ``[N, K*bits/32]`` words stored with strides ``(1, N)`` (word ``w`` of every row
    together), the layout of the N-major kernels (``_gemv_t``, ``_tc_t``, ``_tc_pairs``); ``is_n_major`` tells
    them apart. None: ``words_n_major(N, K)`` (what the sweep measured faster for that shape)."""
    packed = qdtype in PACKED_QDTYPES
    bits = 4 if packed else 8
    n = qweight.shape[0]
    k = qweight.shape[1] * (2 if packed else 1)
    cw = chunk_words(k, group_size, bits)
    if cw == 0 or qweight.dtype == torch.int32:
        return qweight, scale, zero_point
    if n_major is None:
        n_major = words_n_major(n, k, bits)
    per = 32 // bits
    codes = _codes(qweight, qdtype).to(torch.int64).view(n, k // (per * cw), per, cw)
    words = torch.zeros(n, k // (per * cw), cw, dtype=torch.int64, device=qweight.device)
    for i in range(per):
        words |= codes[:, :, i, :] << (bits * i)
    words = torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32).reshape(n, -1)
    if n_major:
        words = words.t().contiguous().t()
    if group_size:
        scale = scale.t().contiguous().t()
        zero_point = zero_point.t().contiguous().t() if zero_point is not None else None
    return words, scale, zero_point


def unpack_words(words: torch.Tensor, qdtype: str, k: int, group_size: int) -> torch.Tensor:
    """The decode layout back to lowbit's stored weight (the reference reads that); ``k``: the input size the words
    were packed for (a K they do not hold is an error naming both, where it was a ZeroDivisionError or a reshape
    error)."""
    _words_meta(words, qdtype, group_size, k)
    packed = qdtype in PACKED_QDTYPES
    bits = 4 if packed else 8
    per = 32 // bits
    n = words.shape[0]
    cw = chunk_words(k, group_size, bits)
    w = words.to(torch.int64).reshape(n, k // (per * cw), 1, cw) & 0xFFFFFFFF
    codes = ((w >> (bits * torch.arange(per, device=words.device).view(1, 1, per, 1))) & (2 ** bits - 1))
    codes = codes.to(torch.uint8).reshape(n, k)
    if packed:
        return codes[:, 0::2] | (codes[:, 1::2] << 4)
    return codes.view(torch.int8) if qdtype == "int8" else codes


def is_n_major(words: torch.Tensor) -> bool:
    """True for ``pack_words(..., n_major=True)``'s words (strides ``(1, N)``), False for the K-major ones."""
    return words.dim() == 2 and words.shape[0] > 1 and words.stride(0) == 1 and words.stride(1) == words.shape[0]


@triton.jit
def _word_code(wv, i: tl.constexpr, BITS: tl.constexpr, mant, one):
    """Code ``i`` of int32 words ``wv`` (offset binary ``u``) as the fp32 ``1 + u / 2**BITS``: the code lands in the
    top of the mantissa of 1.0 (a shift and one and-or), no int -> float conversion. ``mant``/``one`` are the
    mask ``(2**BITS - 1) << (23 - BITS)`` and 1.0's bits passed as run-time values: in registers the and-or is
    one LOP3 (two immediates would take two)."""
    SH: tl.constexpr = 23 - BITS - BITS * i
    if SH >= 0:
        t = wv << SH
    else:
        t = wv >> (-SH)
    return ((t & mant) | one).to(tl.float32, bitcast=True)


@triton.jit
def _group_sd(s_ptr, z_ptr, n2, n_ok2, c2, c_hi, ssn, ssg, i0: tl.constexpr, PER: tl.constexpr, CW: tl.constexpr,
              GROUP: tl.constexpr, HAS_ZP: tl.constexpr, OFF: tl.constexpr, ONE: tl.constexpr):
    """Scale and ``d = 1 + (off + z)/2**b`` (``[BLOCK_N, U, 1]``) of the group holding code position ``i0`` of
    chunks ``c2``."""
    g = (c2 * (PER * CW) + i0 * CW) // GROUP
    gm = n_ok2 & (c2 < c_hi)
    s = tl.load(s_ptr + n2 * ssn + g * ssg, mask=gm, other=0).to(tl.float32)[:, :, None]
    if HAS_ZP:
        d = (1.0 + OFF / ONE) + tl.load(z_ptr + n2 * ssn + g * ssg, mask=gm, other=0).to(
            tl.float32)[:, :, None] * (1.0 / ONE)
    else:
        d = tl.zeros_like(s) + (1.0 + OFF / ONE)
    return s, d


@triton.jit
def _gemv_words(x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, o_ptr, M, N, NCH, CH_SPLIT, sxm, swn, ssn, ssg, som, sos, mant, one,
                q_ptr, r_ptr, g_ptr, gx_ptr, qo_ptr, K, eps,
                BITS: tl.constexpr, SIGNED: tl.constexpr, GROUP: tl.constexpr, GI: tl.constexpr,
                HAS_ZP: tl.constexpr, HAS_BIAS: tl.constexpr, PARTIAL: tl.constexpr, XOR: tl.constexpr,
                CW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, U: tl.constexpr,
                PREFETCH: tl.constexpr = 0, FOLD: tl.constexpr = False, ACT: tl.constexpr = 0,
                GATED: tl.constexpr = False, NQ: tl.constexpr = 0, NQP: tl.constexpr = 0,
                HAS_RES: tl.constexpr = False, NORM_OUT: tl.constexpr = False, PDL: tl.constexpr = False):
    """CUDA-core GEMV on the word layout for M = 1: a ``[BLOCK_N, U chunks, CW words]`` tile per step. Per code:
    shift, and-or (the code as ``f = 1 + u/2**b``) and one FMA into a deferred fp32 accumulator of the tile's
    shape; ``s * (q - z) * x = s * 2**b * (f*x - d*x)`` with ``d = 1 + (off + z)/2**b``, so the activation's
    running sum (``[1, U, CW]``, shared by the rows) times ``d`` and the scale are applied once per group (``GI``
    codes of a word) or once at the end (per channel); one reduction after the loop. The activation is loaded as
    ``[1, U, CW]`` with 4-wide contiguity so that it gets the weight tile's register layout and broadcasts over
    the rows in registers (no layout conversion in the loop). ``PREFETCH`` = 1 or 2 (not yet measured on a GPU):
    the words of 1 or 2 steps ahead are loaded in this step (ptxas sinks such a load to the end of the step, so
    only a distance of 2 overlaps a load with a whole step's arithmetic) and a group's scales before its codes, for
    the latency-bound loop the H200 sweep found (a quarter of the copy bandwidth whatever the tile).
    ``FOLD`` (one split): ``_splitk_reduce``'s work in this program, as ``_gemv_t``'s ``FOLD`` does it (the same
    ``_norm_den`` and ``_folded_row``, so the same epilogues, block fusions and roundings on K-major words: the
    narrow models' layout, ``K_MAJOR_MAX_K``); ``GATED`` needs an even ``BLOCK_N`` (whole (gate, up) pairs of
    ``interleave_rows``). ``PDL``: as ``_gemv_t``'s, the weights of ``PREFETCH`` load before ``gdc_wait``."""
    PER: tl.constexpr = 32 // BITS
    ONE: tl.constexpr = 1 << BITS
    OFF: tl.constexpr = (1 << (BITS - 1)) if SIGNED else 0
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n3 = offs_n[:, None, None]
    u3 = tl.arange(0, U)[None, :, None]
    jj = tl.arange(0, CW)
    j3 = ((jj // 4) * 4 + jj % 4)[None, None, :]  # contiguity 4: x gets the int32 tile's 4-per-thread layout
    n_ok = n3 < N
    n2 = offs_n[:, None]
    u2 = tl.arange(0, U)[None, :]
    n_ok2 = n2 < N
    d_n = tl.zeros((BLOCK_N,), dtype=tl.float32) + (1.0 + OFF / ONE)
    if GROUP == 0 and HAS_ZP:
        d_n += tl.load(z_ptr + offs_n * ssn, mask=offs_n < N, other=0).to(tl.float32) * (1.0 / ONE)
    acc = tl.zeros((BLOCK_N, U, CW), dtype=tl.float32)
    xacc = tl.zeros((1, U, CW), dtype=tl.float32)
    c_lo = pid_k * CH_SPLIT
    c_hi = tl.minimum(c_lo + CH_SPLIT, NCH)
    if PDL:
        gdc_launch_dependents()
    if PREFETCH >= 1:
        wv_n1 = tl.load(w_ptr + n3 * swn + (c_lo + u3) * CW + j3, mask=n_ok & (c_lo + u3 < c_hi), other=0)
    if PREFETCH >= 2:
        wv_n2 = tl.load(w_ptr + n3 * swn + (c_lo + U + u3) * CW + j3, mask=n_ok & (c_lo + U + u3 < c_hi), other=0)
    if PDL:  # the weights never change: x, the norm's partials and the residual wait for the previous kernel
        gdc_wait()
    den = 1.0
    if FOLD and NQ > 0:  # the norm's partials, loaded before the loop so their latency hides behind it
        den = _norm_den(q_ptr, offs_n * 0, offs_n < N, K, eps, NQ, NQP, BLOCK_N)
    for c0 in range(c_lo, c_hi, U):
        c3 = c0 + u3
        c_ok = c3 < c_hi
        if PREFETCH == 1:
            wv = wv_n1
            wv_n1 = tl.load(w_ptr + n3 * swn + (c3 + U) * CW + j3, mask=n_ok & (c3 + U < c_hi), other=0)
        elif PREFETCH == 2:
            wv = wv_n1
            wv_n1 = wv_n2
            wv_n2 = tl.load(w_ptr + n3 * swn + (c3 + 2 * U) * CW + j3, mask=n_ok & (c3 + 2 * U < c_hi), other=0)
        else:
            wv = tl.load(w_ptr + n3 * swn + c3 * CW + j3, mask=n_ok & c_ok, other=0)
        if SIGNED:
            wv = wv ^ XOR
        for i in tl.static_range(PER):
            if GROUP != 0 and PREFETCH > 0 and i % GI == 0:
                s, d = _group_sd(s_ptr, z_ptr, n2, n_ok2, c0 + u2, c_hi, ssn, ssg, i, PER, CW, GROUP, HAS_ZP,
                                 OFF, ONE)
            xi = tl.load(x_ptr + c3 * (PER * CW) + i * CW + j3, mask=c_ok, other=0.0).to(tl.float32)
            t = _word_code(wv, i, BITS, mant, one) * xi
            if GROUP == 0:
                acc += t
                xacc += xi
            else:
                if i % GI == 0:
                    a = t
                    xs = xi
                else:
                    a += t
                    xs += xi
                if i % GI == GI - 1:
                    if PREFETCH == 0:
                        s, d = _group_sd(s_ptr, z_ptr, n2, n_ok2, c0 + u2, c_hi, ssn, ssg, i - GI + 1, PER, CW,
                                         GROUP, HAS_ZP, OFF, ONE)
                    acc += s * (a - d * xs)
    y = tl.sum(tl.sum(acc, axis=2), axis=1)
    if GROUP == 0:
        y = y - d_n * tl.sum(tl.sum(xacc, axis=2), axis=1)
    y = y * ONE
    n_ok1 = offs_n < N
    if GROUP == 0:
        y = y * tl.load(s_ptr + offs_n * ssn, mask=n_ok1, other=0).to(tl.float32)
    if FOLD:
        _folded_row(y, den, offs_n, n_ok1, pid_n, N, o_ptr, b_ptr, r_ptr, g_ptr, gx_ptr, qo_ptr, HAS_BIAS, BLOCK_N, ACT,
                    GATED, HAS_RES, NORM_OUT, NQ)
    else:
        _store_row(y, o_ptr, b_ptr, pid_k, offs_n, n_ok1, sos, PARTIAL, HAS_BIAS)


@triton.jit
def _tc_words(x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, o_ptr, M, N, NCH, CH_SPLIT, sxm, swn, ssn, ssg, som, sos, mant, one,
              BITS: tl.constexpr, SIGNED: tl.constexpr, GROUP: tl.constexpr, GI: tl.constexpr,
              HAS_ZP: tl.constexpr, HAS_BIAS: tl.constexpr, PARTIAL: tl.constexpr, XOR: tl.constexpr,
              UPCAST: tl.constexpr, CW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              SWAP: tl.constexpr, PREFETCH: tl.constexpr = 0):
    """Tensor-core GEMV on the word layout for 4 < M <= 16: per chunk and code ``i`` one ``[BLOCK_M, CW] x
    [CW, BLOCK_N]`` dot of the activation columns ``i`` against the codes ``i`` of the words, as exact small
    integers ``q - z`` in the activation dtype (shift, and-or, one FMA, a cast); the scale multiplies the fp32
    partial once per group (``GI`` codes), or once at the end (per channel). ``SWAP`` computes ``out.T`` (weights
    as the dot's M side)."""
    PER: tl.constexpr = 32 // BITS
    ONE: tl.constexpr = 1 << BITS
    OFF: tl.constexpr = (1 << (BITS - 1)) if SIGNED else 0
    pid_k, offs_m, offs_n, m_ok, n_ok = _tile_mn(M, N, BLOCK_M, BLOCK_N)
    offs_j = tl.arange(0, CW)
    acc, s, cc = _tc_start(s_ptr, z_ptr, offs_n, n_ok, ssn, ONE + OFF, GROUP, HAS_ZP, SWAP, BLOCK_M, BLOCK_N)
    c_lo = pid_k * CH_SPLIT
    c_hi = tl.minimum(c_lo + CH_SPLIT, NCH)
    if PREFETCH >= 1:  # words of 1 or 2 chunks ahead load while this chunk's dots run (not yet measured on a GPU)
        wv_n1 = tl.load(w_ptr + offs_n[:, None] * swn + c_lo * CW + offs_j[None, :],
                        mask=n_ok[:, None] & (c_lo < c_hi), other=0)
    if PREFETCH >= 2:
        wv_n2 = tl.load(w_ptr + offs_n[:, None] * swn + (c_lo + 1) * CW + offs_j[None, :],
                        mask=n_ok[:, None] & (c_lo + 1 < c_hi), other=0)
    for c in range(c_lo, c_hi):
        if PREFETCH == 1:
            wv = wv_n1
            wv_n1 = tl.load(w_ptr + offs_n[:, None] * swn + (c + 1) * CW + offs_j[None, :],
                            mask=n_ok[:, None] & (c + 1 < c_hi), other=0)
        elif PREFETCH == 2:
            wv = wv_n1
            wv_n1 = wv_n2
            wv_n2 = tl.load(w_ptr + offs_n[:, None] * swn + (c + 2) * CW + offs_j[None, :],
                            mask=n_ok[:, None] & (c + 2 < c_hi), other=0)
        else:
            wv = tl.load(w_ptr + offs_n[:, None] * swn + c * CW + offs_j[None, :], mask=n_ok[:, None], other=0)
        if SIGNED:
            wv = wv ^ XOR
        for i in tl.static_range(PER):
            if GROUP != 0 and i % GI == 0:
                g = (c * (PER * CW) + i * CW) // GROUP
                s = tl.load(s_ptr + offs_n * ssn + g * ssg, mask=n_ok, other=0).to(tl.float32)
                if HAS_ZP:
                    cc = (ONE + OFF) + tl.load(z_ptr + offs_n * ssn + g * ssg, mask=n_ok, other=0).to(tl.float32)
            xi = tl.load(x_ptr + offs_m[:, None] * sxm + c * (PER * CW) + i * CW + offs_j[None, :],
                         mask=m_ok[:, None], other=0.0)
            v = _word_code(wv, i, BITS, mant, one) * ONE - cc[:, None]
            if UPCAST:
                xo = xi.to(tl.float32)
            else:
                v = v.to(xi.dtype)
                xo = xi
            if SWAP:
                a_op = v
                b_op = tl.trans(xo)
            else:
                a_op = xo
                b_op = tl.trans(v)
            if UPCAST:  # the interpreter's bf16 dot is wrong (Triton 3.8); fp32 holds these values exactly
                d = tl.dot(a_op, b_op, input_precision="ieee")
            else:
                d = tl.dot(a_op, b_op)
            if GROUP == 0:
                acc += d
            else:
                if i % GI == 0:
                    p = d
                else:
                    p += d
                if i % GI == GI - 1:
                    acc += _col_scale(p, s, SWAP)
    _store_tc_tile(acc, s, o_ptr, b_ptr, pid_k, offs_m, offs_n, m_ok, n_ok, som, sos, GROUP, SWAP, PARTIAL, HAS_BIAS)


@triton.jit
def _dequant_words(w_ptr, s_ptr, z_ptr, o_ptr, N, K, swn, swk, ssn, ssg, mant, one,
                   BITS: tl.constexpr, SIGNED: tl.constexpr, GROUP: tl.constexpr, HAS_ZP: tl.constexpr,
                   XOR: tl.constexpr, CW: tl.constexpr, BLOCK_N: tl.constexpr):
    """The dense weight ``[N, K]`` from the word layout, one chunk per program column: ``(q - z) * s`` in fp32
    (the reference's arithmetic: ``q - z`` is exact), rounded once to the output dtype."""
    PER: tl.constexpr = 32 // BITS
    ONE: tl.constexpr = 1 << BITS
    OFF: tl.constexpr = (1 << (BITS - 1)) if SIGNED else 0
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    c = tl.program_id(1)
    offs_j = tl.arange(0, CW)
    n_ok = offs_n < N
    wv = tl.load(w_ptr + offs_n[:, None] * swn + (c * CW + offs_j[None, :]) * swk, mask=n_ok[:, None], other=0)
    if SIGNED:
        wv = wv ^ XOR
    for i in tl.static_range(PER):
        if GROUP == 0:
            g = 0
        else:
            g = (c * (PER * CW) + i * CW) // GROUP
        s = tl.load(s_ptr + offs_n * ssn + g * ssg, mask=n_ok, other=0).to(tl.float32)
        cc = tl.zeros((BLOCK_N,), dtype=tl.float32) + (ONE + OFF)
        if HAS_ZP:
            cc += tl.load(z_ptr + offs_n * ssn + g * ssg, mask=n_ok, other=0).to(tl.float32)
        w = (_word_code(wv, i, BITS, mant, one) * ONE - cc[:, None]) * s[:, None]
        tl.store(o_ptr + offs_n[:, None] * K + c * (PER * CW) + i * CW + offs_j[None, :],
                 w.to(o_ptr.dtype.element_ty), mask=n_ok[:, None])


# ---------------------------------------------------------------------------------------------------------------
# The N-major decode layout: the same words stored K-major-transposed (``pack_words(..., n_major=True)``: a
# ``[N, K*bits/32]`` int32 tensor with strides ``(1, N)``), so a program's tile of ``[U chunks, CW words, BLOCK_N
# rows]`` is coalesced across threads along N (16-byte loads, 4 rows per thread), the activation a thread needs
# is the same for every lane (broadcast loads, converted once per thread for its 4 rows), and the reduction over K
# stays inside a thread until one final sum. Why: the K-major kernels above reload and convert the activation for
# every 2-4 rows and finish each program with a cross-lane reduction; at M = 1 they reached a quarter of the copy
# bandwidth on the H200.


@triton.jit
def _gemv_t(x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, o_ptr, M, N, NCH, CH_SPLIT, sxm, swk, ssn, ssg, som, sos, mant, one,
            q_ptr, r_ptr, g_ptr, gx_ptr, qo_ptr, K, eps,
            BITS: tl.constexpr, SIGNED: tl.constexpr, GROUP: tl.constexpr, GI: tl.constexpr,
            HAS_ZP: tl.constexpr, HAS_BIAS: tl.constexpr, PARTIAL: tl.constexpr, XOR: tl.constexpr,
            CW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, U: tl.constexpr,
            PREFETCH: tl.constexpr = 0, RED: tl.constexpr = False, FOLD: tl.constexpr = False,
            ACT: tl.constexpr = 0, GATED: tl.constexpr = False, NQ: tl.constexpr = 0, NQP: tl.constexpr = 0,
            HAS_RES: tl.constexpr = False, NORM_OUT: tl.constexpr = False, PDL: tl.constexpr = False):
    """CUDA-core GEMV (M = 1) on the N-major words: per step a ``[U, CW, BLOCK_N]`` word tile; per code a shift,
    an and-or (``f = 1 + u/2**b``) and one FMA into a deferred fp32 accumulator of the tile's shape; per group
    ``acc += s * (a - d * sum x)`` with ``d = 1 + (off + z)/2**b`` (the algebra of ``_gemv_words``); one sum over
    ``U, CW`` at the end. ``PREFETCH`` = 1 or 2: the words 1 or 2 steps ahead are loaded before this step's
    arithmetic.
    ``RED``: each group's (per channel: each chunk's) terms are summed over ``U, CW`` at once into a ``[BLOCK_N]``
    accumulator instead: in-thread adds where the tile's rows all sit in one thread (warps along N: ``BLOCK_N >=
    128 * num_warps``), and no tile-sized accumulator (registers for bigger tiles).
    ``FOLD`` (one split): ``_splitk_reduce``'s work in this program for its rows, one launch instead of two
    (``float_gemv._gemv_f``'s fold: the norm from ``NQ`` partials at ``q_ptr`` over ``K``, ``ACT`` / ``GATED`` on
    the interleaved (gate, up) rows of the tile, the residual add and the next norm's halves, one sum of squares per
    program at ``qo_ptr``), with the reduce's roundings: the same fp32 sum, ``_norm_den`` and ``_reduced_row``.
    ``PDL`` (``pdl_launches``): the next kernel may launch at once; the weights (and with ``PREFETCH`` the first
    tiles) load before ``gdc_wait``, everything a previous kernel writes (x, the norm's partials, the residual) and
    every store after it. H100, session 51 (SmolLM2's config, W4A16 g64, batch 1): 0.988 ms a step against 0.995
    with no PDL in the step - the step is bound by this kernel's own latency, not the launches between."""
    PER: tl.constexpr = 32 // BITS
    ONE: tl.constexpr = 1 << BITS
    OFF: tl.constexpr = (1 << (BITS - 1)) if SIGNED else 0
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n3 = offs_n[None, None, :]
    n_ok = n3 < N
    u3 = tl.arange(0, U)[:, None, None]
    j3 = tl.arange(0, CW)[None, :, None]
    n2 = offs_n[None, :]
    u2 = tl.arange(0, U)[:, None]
    j2 = tl.arange(0, CW)[None, :]
    n_ok2 = n2 < N
    acc = tl.zeros((U, CW, BLOCK_N), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_N,), dtype=tl.float32)
    xacc = tl.zeros((U, CW, 1), dtype=tl.float32)
    c_lo = pid_k * CH_SPLIT
    c_hi = tl.minimum(c_lo + CH_SPLIT, NCH)
    if PDL:
        gdc_launch_dependents()
    if PREFETCH >= 1:
        wv_n = tl.load(w_ptr + ((c_lo + u3) * CW + j3) * swk + n3, mask=n_ok & (c_lo + u3 < c_hi), other=0)
    if PREFETCH >= 2:
        wv_n2 = tl.load(w_ptr + ((c_lo + U + u3) * CW + j3) * swk + n3, mask=n_ok & (c_lo + U + u3 < c_hi), other=0)
    if PDL:  # the weights never change: x, the norm's partials and the residual wait for the previous kernel
        gdc_wait()
    den = 1.0
    if FOLD and NQ > 0:  # the norm's partials, loaded before the loop so their latency hides behind it
        den = _norm_den(q_ptr, offs_n * 0, offs_n < N, K, eps, NQ, NQP, BLOCK_N)
    for c0 in range(c_lo, c_hi, U):
        c3 = c0 + u3
        c_ok = c3 < c_hi
        if PREFETCH == 1:
            wv = wv_n
            wv_n = tl.load(w_ptr + ((c3 + U) * CW + j3) * swk + n3, mask=n_ok & (c3 + U < c_hi), other=0)
        elif PREFETCH == 2:
            wv = wv_n
            wv_n = wv_n2
            wv_n2 = tl.load(w_ptr + ((c3 + 2 * U) * CW + j3) * swk + n3, mask=n_ok & (c3 + 2 * U < c_hi), other=0)
        else:
            wv = tl.load(w_ptr + (c3 * CW + j3) * swk + n3, mask=n_ok & c_ok, other=0)
        if SIGNED:
            wv = wv ^ XOR
        for i in tl.static_range(PER):
            # loaded 2-D and broadcast over N (the weight tile's sliced layout: no conversion in the loop)
            xi = tl.load(x_ptr + (c0 + u2) * (PER * CW) + i * CW + j2, mask=c0 + u2 < c_hi, other=0.0).to(
                tl.float32)[:, :, None]
            t = _word_code(wv, i, BITS, mant, one) * xi
            if GROUP == 0:
                xacc += xi
                if RED:
                    if i == 0:
                        a = t
                    else:
                        a += t
                    if i == PER - 1:
                        acc1 += tl.sum(tl.sum(a, axis=1), axis=0)
                else:
                    acc += t
            else:
                if i % GI == 0:
                    a = t
                    xs = xi
                else:
                    a += t
                    xs += xi
                if i % GI == GI - 1:
                    c2 = c0 + u2
                    g = (c2 * (PER * CW) + (i - GI + 1) * CW) // GROUP
                    gm = n_ok2 & (c2 < c_hi)
                    s = tl.load(s_ptr + n2 * ssn + g * ssg, mask=gm, other=0).to(tl.float32)[:, None, :]
                    if HAS_ZP:
                        d = (1.0 + OFF / ONE) + tl.load(z_ptr + n2 * ssn + g * ssg, mask=gm, other=0).to(
                            tl.float32)[:, None, :] * (1.0 / ONE)
                    else:
                        d = 1.0 + OFF / ONE
                    if RED:
                        acc1 += tl.sum(tl.sum(s * (a - d * xs), axis=1), axis=0)
                    else:
                        acc += s * (a - d * xs)
    if RED:
        y = acc1
    else:
        y = tl.sum(tl.sum(acc, axis=1), axis=0)
    n_ok1 = offs_n < N
    if GROUP == 0:
        d_n = tl.zeros((BLOCK_N,), dtype=tl.float32) + (1.0 + OFF / ONE)
        if HAS_ZP:
            d_n += tl.load(z_ptr + offs_n * ssn, mask=n_ok1, other=0).to(tl.float32) * (1.0 / ONE)
        y = (y - d_n * tl.sum(tl.sum(xacc, axis=1), axis=0)) * tl.load(s_ptr + offs_n * ssn, mask=n_ok1,
                                                                        other=0).to(tl.float32)
    y = y * ONE
    if FOLD:
        _folded_row(y, den, offs_n, n_ok1, pid_n, N, o_ptr, b_ptr, r_ptr, g_ptr, gx_ptr, qo_ptr, HAS_BIAS, BLOCK_N, ACT,
                    GATED, HAS_RES, NORM_OUT, NQ)
    else:
        _store_row(y, o_ptr, b_ptr, pid_k, offs_n, n_ok1, sos, PARTIAL, HAS_BIAS)


# Where ``_gemv_r`` finds each int4 code: code ``i`` sits at bits ``[4i, 4i+4)``; four shifts of the word bring
# every code to bit 12 or 16, where one and-xor with a magic exponent makes it the fp32 ``2**(23-b) + u``: 12
# integer ops per 8 codes instead of a shift and an and-or per code. (Bit 8 would save two shifts but makes the
# constant ``2**15`` dominate the fp32 partial sums: 4e-4 relative error against 3e-5.)


def r_constants(signed: bool) -> tuple[int, int, int, int]:
    """``_gemv_r``'s run-time masks and magics (``m12, m16, k12, k16``): ``(w & m_b) ^ k_b`` is the fp32
    ``2**(23-b) + u`` with ``u`` the offset-binary code (signed codes: the xor flips their top bit too). Run-time
    values, not constexprs: in registers the and-xor is one LOP3."""
    return (0xF << 12, 0xF << 16, *[((127 + 23 - b) << 23) | ((8 << b) if signed else 0) for b in (12, 16)])


@triton.jit
def _r_code(w0, w1, w2, w3, w4, p: tl.constexpr, m12, m16, k12, k16):
    """Code ``p`` of the words as the fp32 ``2**(23-b) + u``: one and-xor. ``w0`` is the word, ``w1 = w << 8``,
    ``w2 = w >> 8``, ``w3 = w << 16``, ``w4 = w >> 16``; code 0 is at bit 16 of ``w3``, 1 and 2 at bits 12 and 16
    of ``w1``, 3 and 4 of ``w0``, 5 and 6 of ``w2``, 7 at bit 12 of ``w4`` (even codes at 16, odd at 12)."""
    if p == 0:
        src = w3
    elif p == 1 or p == 2:
        src = w1
    elif p == 5 or p == 6:
        src = w2
    elif p == 7:
        src = w4
    else:
        src = w0
    if p % 2 == 0:
        t = (src & m16) ^ k16
    else:
        t = (src & m12) ^ k12
    return t.to(tl.float32, bitcast=True)


@triton.jit
def _r_scale(s_ptr, z_ptr, offs, ok, OFF: tl.constexpr, HAS_ZP: tl.constexpr):
    """A scale group's scales and ``off + z`` at ``offs`` (fp32)."""
    s = tl.load(s_ptr + offs, mask=ok, other=0).to(tl.float32)
    if HAS_ZP:
        return s, OFF + tl.load(z_ptr + offs, mask=ok, other=0).to(tl.float32)
    return s, tl.zeros_like(s) + OFF


@triton.jit
def _gemv_r(x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, o_ptr, N, NSTEP, STEP_SPLIT, swk, ssn, ssg, sos,
            m12, m16, k12, k16,
            SIGNED: tl.constexpr, GROUP: tl.constexpr, GI: tl.constexpr, HAS_ZP: tl.constexpr,
            HAS_BIAS: tl.constexpr, PARTIAL: tl.constexpr, CW: tl.constexpr, ROWS: tl.constexpr,
            BLOCK_N: tl.constexpr, PREFETCH: tl.constexpr = False, PDL: tl.constexpr = False):
    """CUDA-core GEMV (M = 1) on N-major int4 words with a step's ``ROWS`` word rows inside one thread: per step a
    ``[ROWS, BLOCK_N]`` word tile (``BLOCK_N >= 128 * num_warps``: 16-byte loads along N, rows in-thread), so the
    activations a thread needs for one code position are ``ROWS`` contiguous values (one vector load shared by the
    thread's columns) and the sum over rows is in-thread adds. Per word: four shifts, 8 and-xors (``_r_code``: the
    code lands as ``2**c + u`` at a per-position exponent, no conversion), 8 FMAs; per step and scale group
    ``y += s * (sum f*x - C - (off + z) * X)`` with ``X = sum x`` and ``C = sum 2**c * x`` over the group's codes
    (the activation sums kept per row and summed once per group: in the broadcast layout, no shuffles).
    ``STEP_SPLIT`` steps per program (split-K partials + ``_splitk_reduce`` when a column tile has several);
    ``PREFETCH``: the next step's words are loaded before this step's arithmetic (a load always in flight)."""
    OFF: tl.constexpr = 8 if SIGNED else 0
    SPC: tl.constexpr = CW // ROWS
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    rows = tl.arange(0, ROWS)
    y = tl.zeros((BLOCK_N,), dtype=tl.float32)
    x_pc = 0.0
    s_lo = pid_k * STEP_SPLIT
    s_hi = tl.minimum(s_lo + STEP_SPLIT, NSTEP)
    if PDL:
        gdc_launch_dependents()
    if PREFETCH:  # step st's words sit at rows st * ROWS + rows: chunks are CW consecutive rows
        wv_n = tl.load(w_ptr + (s_lo * ROWS + rows)[:, None] * swk + offs_n[None, :], mask=n_ok[None, :], other=0)
    if PDL:  # (``pdl_launches``) the weights never change: only x and the outputs wait for the previous kernel
        gdc_wait()
    for st in range(s_lo, s_hi):
        c = st // SPC
        r0 = (st % SPC) * ROWS
        if PREFETCH:
            wv = wv_n
            wv_n = tl.load(w_ptr + ((st + 1) * ROWS + rows)[:, None] * swk + offs_n[None, :],
                           mask=n_ok[None, :] & (st + 1 < s_hi), other=0)
        else:
            wv = tl.load(w_ptr + (c * CW + r0 + rows)[:, None] * swk + offs_n[None, :], mask=n_ok[None, :],
                         other=0)
        w1 = wv << 8
        w2 = wv >> 8
        w3 = wv << 16
        w4 = wv >> 16
        xb = x_ptr + c * (8 * CW) + r0 + rows
        for gi in tl.static_range(8 // GI):
            for i in tl.static_range(GI):
                xi = tl.load(xb + (gi * GI + i) * CW).to(tl.float32)
                t_i = _r_code(wv, w1, w2, w3, w4, gi * GI + i, m12, m16, k12, k16) * xi[:, None]
                if i == 0:
                    t = t_i
                    xv = xi
                    cv = xi * (128.0 if (gi * GI + i) % 2 == 0 else 2048.0)
                else:
                    t += t_i
                    xv += xi
                    cv += xi * (128.0 if (gi * GI + i) % 2 == 0 else 2048.0)
            a = tl.sum(t, axis=0) - tl.sum(cv, axis=0)
            if GROUP == 0:  # per channel: the scale at the end; the constant off each step (it would dominate)
                y += a
                x_pc += tl.sum(xv, axis=0)
            else:
                s, zq = _r_scale(s_ptr, z_ptr, offs_n * ssn + ((c * (8 * CW) + gi * GI * CW) // GROUP) * ssg, n_ok,
                                 OFF, HAS_ZP)
                y += s * (a - zq * tl.sum(xv, axis=0))
    if GROUP == 0:
        s, zq = _r_scale(s_ptr, z_ptr, offs_n * ssn, n_ok, OFF, HAS_ZP)
        y = s * (y - zq * x_pc)
    _store_row(y, o_ptr, b_ptr, pid_k, offs_n, n_ok, sos, PARTIAL, HAS_BIAS)


@triton.jit
def _tc_t(x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, o_ptr, M, N, NCH, CH_SPLIT, sxm, swk, ssn, ssg, som, sos, mant, one,
          BITS: tl.constexpr, SIGNED: tl.constexpr, GROUP: tl.constexpr, GI: tl.constexpr,
          HAS_ZP: tl.constexpr, HAS_BIAS: tl.constexpr, PARTIAL: tl.constexpr, XOR: tl.constexpr,
          UPCAST: tl.constexpr, CW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
          SWAP: tl.constexpr, PREFETCH: tl.constexpr = 0):
    """Tensor-core GEMV (2 <= M <= 16) on the N-major words: per chunk a ``[CW, BLOCK_N]`` word tile (coalesced
    along N); per code ``i`` the exact integers ``q - z`` in the activation dtype and one ``[BLOCK_M, CW] x [CW,
    BLOCK_N]`` dot (``SWAP``: ``[BLOCK_N, CW] x [CW, BLOCK_M]``, the weights as the wide M side); the scale on the
    fp32 partial once per group."""
    PER: tl.constexpr = 32 // BITS
    ONE: tl.constexpr = 1 << BITS
    OFF: tl.constexpr = (1 << (BITS - 1)) if SIGNED else 0
    pid_k, offs_m, offs_n, m_ok, n_ok = _tile_mn(M, N, BLOCK_M, BLOCK_N)
    offs_j = tl.arange(0, CW)
    acc, s, cc = _tc_start(s_ptr, z_ptr, offs_n, n_ok, ssn, ONE + OFF, GROUP, HAS_ZP, SWAP, BLOCK_M, BLOCK_N)
    c_lo = pid_k * CH_SPLIT
    c_hi = tl.minimum(c_lo + CH_SPLIT, NCH)
    if PREFETCH >= 1:
        wv_n = tl.load(w_ptr + (c_lo * CW + offs_j[:, None]) * swk + offs_n[None, :],
                       mask=n_ok[None, :] & (c_lo < c_hi), other=0)
    for c in range(c_lo, c_hi):
        if PREFETCH >= 1:
            wv = wv_n
            wv_n = tl.load(w_ptr + ((c + 1) * CW + offs_j[:, None]) * swk + offs_n[None, :],
                           mask=n_ok[None, :] & (c + 1 < c_hi), other=0)
            if SIGNED:
                wv = wv ^ XOR
        else:
            wv = _word_tile(w_ptr, c, offs_j, offs_n, n_ok, swk, 1, SIGNED, XOR, CW)
        for i in tl.static_range(PER):
            if GROUP != 0 and i % GI == 0:
                g = (c * (PER * CW) + i * CW) // GROUP
                s = tl.load(s_ptr + offs_n * ssn + g * ssg, mask=n_ok, other=0).to(tl.float32)
                if HAS_ZP:
                    cc = (ONE + OFF) + tl.load(z_ptr + offs_n * ssn + g * ssg, mask=n_ok, other=0).to(tl.float32)
            xi = tl.load(x_ptr + offs_m[:, None] * sxm + c * (PER * CW) + i * CW + offs_j[None, :],
                         mask=m_ok[:, None], other=0.0)
            v = _word_code(wv, i, BITS, mant, one) * ONE - cc[None, :]  # [CW, BLOCK_N]
            if UPCAST:
                xo = xi.to(tl.float32)
            else:
                v = v.to(xi.dtype)
                xo = xi
            a_op, b_op = _dot_operands(v, xo, SWAP)
            if UPCAST:  # the interpreter's bf16 dot is wrong (Triton 3.8); fp32 holds these values exactly
                d = tl.dot(a_op, b_op, input_precision="ieee")
            else:
                d = tl.dot(a_op, b_op)
            if GROUP == 0:
                acc += d
            else:
                if i % GI == 0:
                    p = d
                else:
                    p += d
                if i % GI == GI - 1:
                    acc += _col_scale(p, s, SWAP)
    _store_tc_tile(acc, s, o_ptr, b_ptr, pid_k, offs_m, offs_n, m_ok, n_ok, som, sos, GROUP, SWAP, PARTIAL, HAS_BIAS)


@triton.jit
def _tc_chunk(x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, o_ptr, M, N, NCH, CH_SPLIT, sxm, swk, ssn, ssg, som, sos, swn,
              SIGNED: tl.constexpr, GROUP: tl.constexpr, HAS_ZP: tl.constexpr, HAS_BIAS: tl.constexpr,
              PARTIAL: tl.constexpr, XOR: tl.constexpr, UPCAST: tl.constexpr, CW: tl.constexpr, PS: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SWAP: tl.constexpr = False):
    """Tensor-core GEMM for prefill M on the int4 words: per chunk one ``[CW, BLOCK_N]`` word tile, its
    codes of ``PS`` positions at once (``[PS, CW, BLOCK_N]`` by one broadcast shift), dequantized to the activation
    dtype (``(q - z) * s`` rounded once, as the reference) and laid out as one ``[PS*CW, BLOCK_N]`` operand: one
    ``[BLOCK_M, PS*CW] x [PS*CW, BLOCK_N]`` dot per ``PS`` positions, where ``_tc_t`` issues one K = CW dot per
    position (short dots that kept it at ~160 TFLOPS at M = 128, run S8a). Positions ``i*CW + j`` of a chunk are
    consecutive K, so the activation tile is a contiguous ``PS*CW`` run of the row. ``SWAP``: the product is
    taken transposed, ``[BLOCK_N, PS*CW] x [PS*CW, BLOCK_M]``, so the dequantized weights are the dot's first
    operand, which Hopper's wgmma reads from registers (the second must sit in shared memory): the activation tile
    goes through shared memory instead of the weights (a candidate for M = 128, not yet measured).
    Either memory order of the words (strides ``swk`` / ``swn``: N-major ``(N, 1)``, K-major ``(1, K/8)``), so
    2 <= M <= 16 at ``CW = 8`` runs the same dots on the K-major words of ``K_MAJOR_MAX_K``."""
    PER: tl.constexpr = 8
    OFF: tl.constexpr = 8 if SIGNED else 0
    KS: tl.constexpr = PS * CW
    pid_k, offs_m, offs_n, m_ok, n_ok = _tile_mn(M, N, BLOCK_M, BLOCK_N)
    offs_j = tl.arange(0, CW)
    offs_p = tl.arange(0, PS)
    offs_ks = tl.arange(0, KS)
    if SWAP:
        acc_t = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if GROUP == 0:
        s_pc = tl.load(s_ptr + offs_n * ssn, mask=n_ok, other=0).to(tl.float32)[None, None, :]
        zz_pc = tl.zeros((BLOCK_N,), dtype=tl.float32)[None, None, :] + OFF
        if HAS_ZP:
            zz_pc += tl.load(z_ptr + offs_n * ssn, mask=n_ok, other=0).to(tl.float32)[None, None, :]
    c_lo = pid_k * CH_SPLIT
    c_hi = tl.minimum(c_lo + CH_SPLIT, NCH)
    for c in range(c_lo, c_hi):
        wv = _word_tile(w_ptr, c, offs_j, offs_n, n_ok, swk, swn, SIGNED, XOR, CW)
        for h in tl.static_range(PER // PS):
            pos = h * PS + offs_p  # [PS] code positions of this dot
            u = (wv[None, :, :] >> (pos * 4)[:, None, None]) & 15  # [PS, CW, BLOCK_N]
            if GROUP == 0:
                sc = s_pc
                zz = zz_pc
            else:
                g = (c * (PER * CW) + pos * CW) // GROUP
                so = offs_n[None, :] * ssn + g[:, None] * ssg  # [PS, BLOCK_N]: each position's group, per column
                sc = tl.load(s_ptr + so, mask=n_ok[None, :], other=0).to(tl.float32)[:, None, :]
                zz = tl.zeros((PS, 1, BLOCK_N), dtype=tl.float32) + OFF
                if HAS_ZP:
                    zz += tl.load(z_ptr + so, mask=n_ok[None, :], other=0).to(tl.float32)[:, None, :]
            xk = tl.load(x_ptr + offs_m[:, None] * sxm + c * (PER * CW) + h * KS + offs_ks[None, :],
                         mask=m_ok[:, None], other=0.0)
            w = (u.to(tl.float32) - zz) * sc
            if SWAP:
                wt = tl.reshape(tl.permute(w.to(xk.dtype), (2, 0, 1)), (BLOCK_N, KS))  # [n, (position, j)]
                if UPCAST:  # the interpreter's bf16 dot is wrong (Triton 3.8): the rounded weights in fp32
                    acc_t += tl.dot(wt.to(tl.float32), tl.trans(xk.to(tl.float32)), input_precision="ieee")
                else:
                    acc_t = tl.dot(wt, tl.trans(xk), acc_t)
            elif UPCAST:
                w = tl.reshape(w.to(xk.dtype).to(tl.float32), (KS, BLOCK_N))
                acc += tl.dot(xk.to(tl.float32), w, input_precision="ieee")
            else:
                acc = tl.dot(xk, tl.reshape(w.to(xk.dtype), (KS, BLOCK_N)), acc)
    if SWAP:
        acc = tl.trans(acc_t)
    _store_tile(acc, o_ptr, b_ptr, pid_k, offs_m, offs_n, m_ok, n_ok, som, sos, PARTIAL, HAS_BIAS)


@triton.jit
def _pair_codes(t, ccp, c_lo, c_hi, IS_BF16: tl.constexpr, ASM: tl.constexpr):
    """The 4-bit codes at bits ``[0, 4)`` and ``[16, 20)`` of ``t`` minus ``c_lo`` / ``c_hi`` (offset + zero point),
    as exact small integers in the activation dtype. ``ASM`` (sm_90): one ``lop3`` makes both codes a 16-bit float
    pair ``base + u`` (``base`` = 128 bf16 / 1024 fp16: the code lands in the low mantissa bits) and one packed
    ``sub`` takes ``ccp`` (the pair ``base + c``): two codes per two instructions, no int -> float conversion.
    Otherwise (the interpreter) the same values in plain Triton."""
    if ASM:
        if IS_BF16:
            lo, hi = tl.inline_asm_elementwise(
                "{ .reg .b32 t; lop3.b32 t, $2, 0x000F000F, 0x43004300, 0xEA; sub.rn.bf16x2 t, t, $3; "
                "mov.b32 {$0, $1}, t; }", "=h,=h,r,r", [t, ccp], dtype=(tl.bfloat16, tl.bfloat16), is_pure=True,
                pack=1)
        else:
            lo, hi = tl.inline_asm_elementwise(
                "{ .reg .b32 t; lop3.b32 t, $2, 0x000F000F, 0x64006400, 0xEA; sub.rn.f16x2 t, t, $3; "
                "mov.b32 {$0, $1}, t; }", "=h,=h,r,r", [t, ccp], dtype=(tl.float16, tl.float16), is_pure=True,
                pack=1)
    else:
        if IS_BF16:
            dt = tl.bfloat16
        else:
            dt = tl.float16
        lo = ((t & 0xF).to(tl.float32) - c_lo[None, :]).to(dt)
        hi = (((t >> 16) & 0xF).to(tl.float32) - c_hi[None, :]).to(dt)
    return lo, hi


@triton.jit
def _tc_pairs(x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, o_ptr, M, N, NCH, CH_SPLIT, sxm, swk, ssn, ssg, som, sos, mant, one,
              BITS: tl.constexpr, SIGNED: tl.constexpr, GROUP: tl.constexpr, GI: tl.constexpr,
              HAS_ZP: tl.constexpr, HAS_BIAS: tl.constexpr, PARTIAL: tl.constexpr, XOR: tl.constexpr,
              UPCAST: tl.constexpr, CW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              SWAP: tl.constexpr, PREFETCH: tl.constexpr = 0, IS_BF16: tl.constexpr = True,
              ASM: tl.constexpr = False):
    """``_tc_t`` for int4 with codes unpacked in pairs (code ``i`` and ``i + 4`` of a word share a 32-bit register
    after one shift: ``_pair_codes``). Takes per channel or groups of 4 or 8 code positions (``GI``: g128 at CW =
    32); codes 0-3 and 4-7 each accumulate one fp32 partial per chunk, scaled once."""
    BASE: tl.constexpr = 128.0 if IS_BF16 else 1024.0
    OFF: tl.constexpr = 8 if SIGNED else 0
    pid_k, offs_m, offs_n, m_ok, n_ok = _tile_mn(M, N, BLOCK_M, BLOCK_N)
    offs_j = tl.arange(0, CW)
    if SWAP:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    c_a = tl.zeros((BLOCK_N,), dtype=tl.float32) + OFF
    c_b = c_a
    s_a = tl.zeros((BLOCK_N,), dtype=tl.float32)
    s_b = s_a
    if GROUP == 0:
        s_a = tl.load(s_ptr + offs_n * ssn, mask=n_ok, other=0).to(tl.float32)
        if HAS_ZP:
            c_a += tl.load(z_ptr + offs_n * ssn, mask=n_ok, other=0).to(tl.float32)
        c_b = c_a
    c_lo = pid_k * CH_SPLIT
    c_hi = tl.minimum(c_lo + CH_SPLIT, NCH)
    for c in range(c_lo, c_hi):
        wv = _word_tile(w_ptr, c, offs_j, offs_n, n_ok, swk, 1, SIGNED, XOR, CW)
        if GROUP != 0:
            g_a = (c * (8 * CW)) // GROUP
            g_b = (c * (8 * CW) + 4 * CW) // GROUP
            s_a = tl.load(s_ptr + offs_n * ssn + g_a * ssg, mask=n_ok, other=0).to(tl.float32)
            s_b = tl.load(s_ptr + offs_n * ssn + g_b * ssg, mask=n_ok, other=0).to(tl.float32)
            if HAS_ZP:
                c_a = OFF + tl.load(z_ptr + offs_n * ssn + g_a * ssg, mask=n_ok, other=0).to(tl.float32)
                c_b = OFF + tl.load(z_ptr + offs_n * ssn + g_b * ssg, mask=n_ok, other=0).to(tl.float32)
        if IS_BF16:
            bits_a = (c_a + BASE).to(tl.bfloat16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
            bits_b = (c_b + BASE).to(tl.bfloat16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
        else:
            bits_a = (c_a + BASE).to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
            bits_b = (c_b + BASE).to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
        ccp = (bits_a | (bits_b << 16))[None, :] + tl.zeros_like(wv)
        if SWAP:
            p_a = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        else:
            p_a = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        p_b = tl.zeros_like(p_a)
        for i in tl.static_range(4):
            lo, hi = _pair_codes(wv >> (4 * i), ccp, c_a, c_b, IS_BF16, ASM)  # codes i, i + 4: [CW, BLOCK_N]
            x_a = tl.load(x_ptr + offs_m[:, None] * sxm + c * (8 * CW) + i * CW + offs_j[None, :],
                          mask=m_ok[:, None], other=0.0)
            x_b = tl.load(x_ptr + offs_m[:, None] * sxm + c * (8 * CW) + (i + 4) * CW + offs_j[None, :],
                          mask=m_ok[:, None], other=0.0)
            if UPCAST:  # the interpreter's bf16 dot is wrong (Triton 3.8); fp32 holds these values exactly
                lo = lo.to(tl.float32)
                hi = hi.to(tl.float32)
                x_a = x_a.to(tl.float32)
                x_b = x_b.to(tl.float32)
            if SWAP:
                if UPCAST:
                    p_a = tl.dot(tl.trans(lo), tl.trans(x_a), p_a, input_precision="ieee")
                    p_b = tl.dot(tl.trans(hi), tl.trans(x_b), p_b, input_precision="ieee")
                else:
                    p_a = tl.dot(tl.trans(lo), tl.trans(x_a), p_a)
                    p_b = tl.dot(tl.trans(hi), tl.trans(x_b), p_b)
            else:
                if UPCAST:
                    p_a = tl.dot(x_a, lo, p_a, input_precision="ieee")
                    p_b = tl.dot(x_b, hi, p_b, input_precision="ieee")
                else:
                    p_a = tl.dot(x_a, lo, p_a)
                    p_b = tl.dot(x_b, hi, p_b)
        if GROUP == 0:
            acc += p_a + p_b
        else:
            acc += _col_scale(p_a, s_a, SWAP) + _col_scale(p_b, s_b, SWAP)
    _store_tc_tile(acc, s_a, o_ptr, b_ptr, pid_k, offs_m, offs_n, m_ok, n_ok, som, sos, GROUP, SWAP, PARTIAL,
                   HAS_BIAS)


WORDS_TC_MIN_M = 2
"""From this M on (to 16) the word-layout GEMV runs on tensor cores (M padded to a 16-row dot, masked: no extra
traffic); M = 1 on CUDA cores."""

_WORDS_TABLE: dict[tuple[str, int, int, int], dict] = {
    ("cc", 1, 11008, 4096): {"BLOCK_N": 2, "U": 4, "num_warps": 1, "num_stages": 1, "SPLIT_K": 1},
    ("cc", 1, 4096, 11008): {"BLOCK_N": 4, "U": 8, "num_warps": 2, "num_stages": 3, "SPLIT_K": 1},
    ("tc", 16, 11008, 4096): {"BLOCK_N": 128, "SWAP": True, "num_warps": 4, "num_stages": 2, "SPLIT_K": 4},
    ("tc", 16, 4096, 11008): {"BLOCK_N": 64, "SWAP": True, "num_warps": 4, "num_stages": 2, "SPLIT_K": 8},
    ("cc", 1, 4096, 4096): {"BLOCK_N": 4, "U": 8, "num_warps": 2, "num_stages": 3, "SPLIT_K": 1},  # run R1, gemv.json
    ("tc", 16, 4096, 4096): {"BLOCK_N": 64, "SWAP": True, "num_warps": 4, "num_stages": 2, "SPLIT_K": 8},
}
"""Best configs keyed by (kind, M bucket, N, K) of the H200 sweep (``tools/bench_kernels.py --sweep``,
``w4a16_words_sweep`` rows of run C in bench/results/kernels.json, int4 g128 asymmetric). At M = 1 the 14 configs
tried spread only 22.5-28 µs (4096x11008) apart from the 8-warp ones: the kernel is latency-bound, not tile-bound."""


WORDS_N_MAJOR = True
"""The decode layout ``pack_words`` makes by default (at lowering) outside ``K_MAJOR_SHAPES``: N-major (kernels
``_gemv_t``/``_tc_t``). H200 sweep, run R1 of bench/results/gemv.json (int4 g128 asym, CUDA-graph replay), best
N-major vs best K-major config, µs at M = 1 / M = 16: 4096x11008 18.3 vs 22.3 / 23.9 vs 25.9; 11008x4096 21.3 vs
22.8 / 26.4 vs 26.5; 4096x12288 (merged qkv) 18.3 vs 24.3 / 24.4 vs 26.4; 4096x22016 (merged gate/up) 29.5 vs
38.4 / 39.0 vs 45.0."""

K_MAJOR_SHAPES: set[tuple[int, int]] = set()
"""(N, K) whose default decode layout stays K-major. Was {(4096, 4096)} (K-major GEMV 10.1 vs ``_gemv_t`` 11.7 µs at
M = 1, run R1); ``_gemv_r`` on N-major words took 8.86 µs there (run R9) and N-major won at M = 16 (12.9 vs 13.3)."""

_WORDS_T_TABLE: dict[tuple[str, int, int, int], dict] = {
    **{("cc", 1, n, k): {"BLOCK_N": 64, "U": 1, "num_warps": 2, "num_stages": 1, "SPLIT_K": sk}
       for n, k, sk in ((11008, 4096, 4), (4096, 11008, 16), (12288, 4096, 4), (22016, 4096, 4))},
    ("cc", 1, 4096, 4096): {"BLOCK_N": 256, "U": 1, "num_warps": 4, "num_stages": 1, "SPLIT_K": 16},
    **{("tc", 16, n, k): {"BLOCK_N": 64, "SWAP": True, "num_warps": 4, "num_stages": 2, "SPLIT_K": 4, "PREFETCH": 1}
       for n, k in ((11008, 4096), (4096, 11008), (12288, 4096), (22016, 4096), (4096, 4096))},
}
"""N-major configs keyed by (kind, M bucket, N, K): the ``best`` rows of ``tools/bench_gemv.py`` (run R1 of
bench/results/gemv.json, int4 g128 asymmetric, bf16); ``words_config`` falls back to ``_t_rule`` elsewhere."""

T_TARGET_PROGRAMS = 1100
"""The N-major M = 1 rule splits K until ~this many programs run (the sweep's winners: 688-1024 programs of 2
warps at all five shapes; fewer, longer programs were latency-bound: split 1 took ~40 µs whatever N)."""


def _t_rule(tc: bool, n: int, nch: int) -> dict:
    """N-major configs where the table has no entry, from the sweep's winners: M = 1 ``[1, CW, 64]`` tiles on 2
    warps, split-K to ~``T_TARGET_PROGRAMS`` programs (a power of two, <= 16, <= the chunks); tensor cores
    ``[CW, 64]`` tiles, weights as the dot's M side, next chunk prefetched, split 4 (the winner at every shape)."""
    if tc:
        return {"BLOCK_N": 64, "SWAP": True, "num_warps": 4, "num_stages": 2, "PREFETCH": 1,
                "SPLIT_K": max(1, min(4, nch // 2))}
    return {"BLOCK_N": 64, "U": 1, "num_warps": 2, "num_stages": 1,
            "SPLIT_K": max(1, min(16, nch, pow2_at_most(max(1, T_TARGET_PROGRAMS // cdiv(n, 64)), 16)))}


_R_TABLE: dict[tuple[int, int], dict] = {  # run R9 of bench/results/gemv.json (µs vs _gemv_t's best, R8)
    (11008, 4096): {'BLOCK_N': 128, 'ROWS': 16, 'num_warps': 1, 'num_stages': 1, 'SPLIT_K': 16},  # 14.34 vs 18.40
    (4096, 11008): {'BLOCK_N': 64, 'ROWS': 16, 'num_warps': 1, 'num_stages': 1, 'SPLIT_K': 32},  # 15.55 vs 20.58
    # 8.86 vs 10.21 (K-major)
    (4096, 4096): {'BLOCK_N': 64, 'ROWS': 16, 'num_warps': 1, 'num_stages': 1, 'SPLIT_K': 16},
    (12288, 4096): {'BLOCK_N': 128, 'ROWS': 16, 'num_warps': 1, 'num_stages': 2, 'SPLIT_K': 16},  # 14.70 vs 18.31
    (22016, 4096): {'BLOCK_N': 64, 'ROWS': 16, 'num_warps': 1, 'num_stages': 1, 'SPLIT_K': 16},  # 22.46 vs 28.58
    # run S8a: 29.9 vs cc_t 38.24
    (32000, 4096): {'BLOCK_N': 128, 'ROWS': 16, 'num_warps': 1, 'num_stages': 2, 'SPLIT_K': 16, 'PREFETCH': 0},
    # run S11 (the 20% heads + MLP pruned widths) where a config beat R_RULE: q/k/v of 26 kv heads, o_proj's K 3328
    (9984, 4096): {'BLOCK_N': 128, 'ROWS': 16, 'num_warps': 1, 'num_stages': 2, 'SPLIT_K': 16},  # 13.79 vs R_RULE 14.29
    (4096, 3328): {'BLOCK_N': 128, 'ROWS': 16, 'num_warps': 1, 'num_stages': 1, 'SPLIT_K': 32},  # 7.89 vs R_RULE 8.51
}
"""(N, K) -> ``_gemv_r`` config: the shapes where the H200 sweep measured it faster than ``_gemv_t`` at M = 1
(``tools/bench_gemv.py``, family ``cc_r``); other large shapes take ``R_RULE``, small ones ``_gemv_t``."""

R_RULE: dict = {"BLOCK_N": 64, "ROWS": 16, "num_warps": 1, "num_stages": 1, "SPLIT_K": 32}
"""``_gemv_r``'s config at an int4 M = 1 shape off ``_R_TABLE`` with at least ``R_RULE_MIN_ELEMENTS`` weights: run
S11 of bench/results/gemv.json swept the heads + MLP pruned Llama-7B widths (N x K = 9984 x 4096, 4096 x 3328,
17408 x 4096, 4096 x 8704); this config was within 8% of each shape's best ``_gemv_r`` config and 1.20-1.35x
faster than the ``_t_rule`` config the op ran there (14.29 vs 17.95, 8.51 vs 11.25, 19.69 vs 26.55, 13.19 vs
15.87 µs); the two shapes where a config beat it by 3.5-7% (9984 x 4096, 4096 x 3328) are ``_R_TABLE`` entries."""

R_RULE_MIN_ELEMENTS = 12 * 2**20
"""The smallest weight ``R_RULE`` serves: the sweep's smallest shape was 4096 x 3328 (13.6M); smaller weights
(SmolLM2's) keep ``_t_rule``, which no sweep has compared with ``_gemv_r`` there."""


_PREFILL_TC_TABLE: dict[tuple[int, int, int], dict] = {  # run S8b of bench/results/gemv.json
    (32, 4096, 4096): {'BLOCK_M': 32, 'BLOCK_N': 64, 'SWAP': False, 'num_warps': 4, 'num_stages': 3, 'SPLIT_K': 4,
                       'PREFETCH': 0},
    (32, 4096, 11008): {'BLOCK_M': 32, 'BLOCK_N': 64, 'SWAP': False, 'num_warps': 4, 'num_stages': 3, 'SPLIT_K': 4,
                        'PREFETCH': 0},
    (32, 11008, 4096): {'BLOCK_M': 32, 'BLOCK_N': 64, 'SWAP': True, 'num_warps': 4, 'num_stages': 2, 'SPLIT_K': 2,
                        'PREFETCH': 0},
    (32, 12288, 4096): {'BLOCK_M': 32, 'BLOCK_N': 64, 'SWAP': True, 'num_warps': 4, 'num_stages': 2, 'SPLIT_K': 2,
                        'PREFETCH': 0},
    (32, 22016, 4096): {'BLOCK_M': 32, 'BLOCK_N': 64, 'SWAP': True, 'num_warps': 4, 'num_stages': 2, 'SPLIT_K': 2,
                        'PREFETCH': 0},
    (64, 4096, 4096): {'BLOCK_M': 64, 'BLOCK_N': 64, 'PS': 8, 'num_warps': 4, 'num_stages': 3, 'SPLIT_K': 2},
    (64, 4096, 11008): {'BLOCK_M': 64, 'BLOCK_N': 64, 'PS': 8, 'num_warps': 4, 'num_stages': 3, 'SPLIT_K': 2},
    (64, 11008, 4096): {'BLOCK_M': 64, 'BLOCK_N': 128, 'PS': 8, 'num_warps': 8, 'num_stages': 3, 'SPLIT_K': 1},
    (64, 12288, 4096): {'BLOCK_M': 64, 'BLOCK_N': 128, 'PS': 8, 'num_warps': 8, 'num_stages': 3, 'SPLIT_K': 1},
    (64, 22016, 4096): {'BLOCK_M': 64, 'BLOCK_N': 64, 'SWAP': False, 'num_warps': 4, 'num_stages': 2, 'SPLIT_K': 1,
                        'PREFETCH': 0},
    (128, 4096, 11008): {'BLOCK_M': 128, 'BLOCK_N': 64, 'SWAP': False, 'num_warps': 4, 'num_stages': 3, 'SPLIT_K': 2,
                         'PREFETCH': 0},
}
"""(M bucket 32/64/128, N, K) -> tensor-core config for 16 < M <= 256 on the N-major words, ``_tc_t`` (family
``tc_m``) or, where the config has ``PS``, ``_tc_chunk`` (``tc_c``): the fastest of the H200 sweep
(``tools/bench_gemv.py``) at the shapes where it beat dequantize + cuBLAS by 3% or more; elsewhere those M take the
dequantize + cuBLAS path."""

PREFILL_TC_MAX_M = 256
"""The largest M ``_PREFILL_TC_TABLE`` serves (M above 128 reuses the 128 bucket's tiles on more row tiles)."""


def prefill_bucket(m: int) -> int:
    """``_PREFILL_TC_TABLE``'s M key for ``16 < m <= PREFILL_TC_MAX_M``: 32, 64 or 128."""
    return min(128, max(32, next_pow2(m)))


def prefill_tc_config(m: int, n: int, k: int) -> dict | None:
    """The tensor-core config for ``16 < m <= PREFILL_TC_MAX_M`` at a swept (N, K), else None (dequantize +
    cuBLAS)."""
    if not 16 < m <= PREFILL_TC_MAX_M:
        return None
    cfg = _PREFILL_TC_TABLE.get((prefill_bucket(m), n, k))
    return None if cfg is None else dict(cfg, TC=True)


K_MAJOR_MAX_K: int = 1536
"""4-bit words of ``K_MAJOR_MIN_K`` <= K <= this are packed K-major (``words_n_major``; 0: none), for the narrow
models' decode GEMVs (SmolLM2-135M's K = 576 and 1536): M = 1 with an epilogue or a block fusion (every linear of a
compiled decode step) runs ``FOLD_K`` (``_gemv_words`` with ``FOLD``), M = 1 without one ``K_MAJOR_CC``,
2 <= M <= 16 ``_tc_chunk`` (``CW8_TC``, ``K_MAJOR_TC``). Set it before lowering (``pack_words`` reads it).

The kernels alone (H100, session 53, gemv.json runs ``2026-12-07-smol`` / ``S53-kmajor-m1``): ``_gemv_words`` at
``K_MAJOR_CC`` 3.55 / 3.64 / 4.22 / 4.16 µs at N x K = 576x576, 960x576, 3072x576, 576x1536, the op with the norm
fusion on ``FOLD_K`` 3.58 / 3.65 / 4.58 / 4.64, against 5.12 / 5.19 / 5.82 / 6.13 for the N-major fold (``_gemv_t``,
``FOLD``) and cuBLAS bf16 3.9 / 4.1 / 5.1 / 5.5; at 16 rows ``_tc_chunk`` 6.39-7.46 against 6.30-7.08 N-major.
The step (SmolLM2's config, random weights, W4A16 g64, ``python tools/bench_generate.py --gpu --skip-attention
--only-schemes --model smollm2-random --new 96 --schemes w4a16-g64 --batches 1,16``; generate_ab.json, H100, one
machine, runs interleaved): N-major 0.832 / 0.809 ms at batch 1 and 1.917 / 1.840 at 16 (``S54-base-1/2``); K-major
with ``FOLD_K`` loading its tile after ``gdc_wait`` 0.767 / 0.765 and 1.887 / 1.866 (``S54-k1536-1/2``); as now
(``FOLD_K``'s ``PREFETCH``) **0.676 / 0.673** and 1.878 / 1.882 (``S54-k1536-foldKpf1-2/3``): -17% at batch 1, batch
16 within the runs' spread; prefill unchanged (3.93-4.02 ms at 1 x 512). Session 53 had K_MAJOR_MAX_K = 576 alone
(down_proj N-major) at 0.92 ms, one run, not understood: the rule takes both."""

K_MAJOR_MIN_K: int = 576
"""The narrowest K the rule of ``K_MAJOR_MAX_K`` packs K-major: the narrowest it was measured at (SmolLM2's 576).
Narrower int4 weights (toy and test models, MiniLM's 384) keep the N-major words their kernels were tuned on."""

K_MAJOR_CC: dict = {"BLOCK_N": 2, "U": 4, "num_warps": 1, "num_stages": 1, "SPLIT_K": 1}
"""``_gemv_words``' config at M = 1 with no epilogue or fusion on the words of ``K_MAJOR_MAX_K``: the best ``cc_k``
config of runs ``2026-12-07-smol`` / ``-fold8`` at all four SmolLM2 shapes (``K_MAJOR_MAX_K``' numbers)."""

FOLD_K: dict = {"BLOCK_N": 2, "num_warps": 1, "num_stages": 1, "SPLIT_K": 1, "FOLD": True, "PREFETCH": 1}
"""``_gemv_words`` with one split and the reduce's work in its programs (``FOLD``), at M = 1 with an epilogue or a
block fusion on the words of ``K_MAJOR_MAX_K``: ``K_MAJOR_CC``'s 2 rows on one warp (2 rows: one (gate, up) pair of
``interleave_rows`` a program for ``GATED``, which needs the pair in one program), ``U`` the row's chunks in one
step (``fold_chunks`` with ``FOLD_K_TILE_WORDS``). Offline sm_90 builds (Triton's ptxas -v, PDL on): 64 registers at
K = 576 (gated + norm, add + next norm), 148 at K = 1536, no spills. Its next norm's partials are one per program
(288 at hidden 576), which every program of the next GEMV reads as one 512-wide vector (``_norm_den``). Timed
(H100, session 53, ``python tools/bench_gemv.py --ms 1 --group 64 --only cc_kf,cc_f --shapes
576x960,576x3072,1536x576,576x576 --norm-partials 288 --k-major-max-k 1536``): ``K_MAJOR_MAX_K``' numbers.
``PREFETCH`` 1: the program's whole tile (one step) loads before ``gdc_wait``, so under PDL the weights stream in
while the previous kernel ends, as ``float_gemv._gemv_f``'s first tile: SmolLM2's W4A16 step 0.765 -> 0.674 ms at
batch 1 (H100, session 54, ``K_MAJOR_MAX_K``' runs). The N-major fold's ``FOLD_T`` with ``PREFETCH`` 1 measured no
change (0.808 / 0.810 against 0.832 / 0.809, ``S54-foldpf1-1/2``): it keeps 0."""

K_MAJOR_TC: dict = {"BLOCK_N": 32, "PS": 8, "num_warps": 4, "num_stages": 2, "SPLIT_K": 4}
"""2 <= M <= 16 on the K-major words of ``K_MAJOR_MAX_K`` wider than ``CW = 8`` (SmolLM2's down_proj, K = 1536 at
g64: ``CW = 32``): ``_tc_chunk``, not ``_tc_words``. H100, session 53: with down_proj alone K-major (``_tc_words``)
SmolLM2's config's batch-16 step took 1.98 ms against 1.85 N-major (+4 us a layer, generate_ab.json run
``S53-kmajor-F``), where ``_tc_chunk`` on those words took 7.30 us at 576x1536 (this config, gemv.json run
``S53-kmajor-m16``: the best of family ``tc_kc``) against 7.61 for the N-major default (``_tc_t``). In the step
(session 54, every word K-major): batch 16 1.866-1.888 ms against N-major's 1.840 / 1.917 (``K_MAJOR_MAX_K``)."""

FOLD_K_TILE_WORDS = 512
"""``FOLD_K``'s largest ``[BLOCK_N, U, CW]`` tile: 2 rows of 256 words (2048 codes), so a row of K <= 2048 is one step
at any ``CW`` (SmolLM2's K = 576: 16 chunks of 8 words, 9 used; K = 1536: 8 of 32, 6 used), 8 fp32 of deferred
accumulator a thread at one warp."""


def k_major_narrow(k: int, bits: int) -> bool:
    """Whether ``pack_words`` makes K-major words for this K by ``K_MAJOR_MIN_K`` / ``K_MAJOR_MAX_K`` (4-bit codes
    only: the sweep's)."""
    return bits == 4 and K_MAJOR_MIN_K <= k <= K_MAJOR_MAX_K


def words_n_major(n: int, k: int, bits: int = 4) -> bool:
    """The decode layout ``pack_words`` makes for an ``[N, K]`` weight of ``bits``-bit codes by default."""
    return WORDS_N_MAJOR and (n, k) not in K_MAJOR_SHAPES and not k_major_narrow(k, bits)


DOT_MIN_CW = 16
"""The narrowest chunk the per-position dots of ``_tc_t`` / ``_tc_words`` / ``_tc_pairs`` take: each is a K = CW
``tl.dot``, and Triton's dots need K >= 16. At ``CW = 8`` int4 words (either memory order) run ``_tc_chunk``
instead (its dots span ``PS*CW`` = 64 K indices: ``CW8_TC``; ``words_tc_ok``)."""

CW8_TC: dict = {"BLOCK_N": 64, "PS": 8, "num_warps": 4, "num_stages": 2}
"""``_tc_chunk``'s config for 2 <= M <= 16 on ``CW = 8`` words (SmolLM2's K = 576): one ``[16, 64] x [64, 64]`` dot per
chunk, the codes dequantized to the activation dtype as the reference does. Not yet timed on a GPU."""


def words_tc_ok(bits: int, cw: int) -> bool:
    """Whether a tensor-core word kernel takes these words: CW >= ``DOT_MIN_CW``, or int4 (``_tc_chunk``, which
    reads either memory order)."""
    return cw >= DOT_MIN_CW or bits == 4


FOLD_TILE_WORDS = 2048
"""The largest ``[U, CW, BLOCK_N]`` word tile (8 KB) of a ``FOLD`` config: ``_gemv_t``'s deferred accumulator has the
tile's shape, 16 fp32 a thread at 4 warps (``FOLD_T``). A row that needs several steps takes half of it
(``FOLD_STEP_WORDS``)."""

FOLD_STEP_WORDS = 1024
"""The tile of a ``FOLD`` row that does not fit one ``FOLD_TILE_WORDS`` step. H100, session 50 (``python
tools/bench_gemv.py --shapes 576x1536,1536x576,576x192,576x3072 --group 64 --ms 1 --only cc_f,cc_t``, with the
norm fusion): at K = 1536 (down_proj) 1024-word tiles in 3 steps took 6.16 us against 7.75 for 2048 in 2 (best
split + reduce 7.20); at K = 576, one 2048-word step is the fastest (5.22 / 4.83 / 5.65 us at N = 1536 / 192 /
3072 against split + reduce's best 5.32 / 4.95 / 5.68; cuBLAS bf16 4.47 / 3.78 / 5.08)."""

FOLD_MAX_STEPS = 3
"""The most loop steps (tile loads, one after the other) a ``FOLD`` program makes over its row's whole K."""

FOLD_T: dict = {"BLOCK_N": 16, "num_warps": 4, "num_stages": 1, "SPLIT_K": 1, "FOLD": True}
"""``_gemv_t`` with one split and the reduce's work in its programs (``fold_config``). Why one split is enough at
SmolLM2's shapes (K = 576 / 1536, N = 576-3072): the op is bound by latency, not bytes (0.17-0.9 MB of codes, a
fraction of a µs of HBM time), so what it costs is its chain of dependent steps: split-K + reduce is one tile load,
a kernel boundary and the reduce's load and store, the fold one to three tile loads of <= 8 KB a program
(``FOLD_MAX_STEPS``) and no boundary. 16-column tiles give the most programs (36 at N = 576, 192 at the merged
gate/up's 3072), so the launch still spreads over a quarter to all of the SMs. 4 warps: offline sm_90 builds
(``triton.compile`` + ptxas, the gated epilogue with the norm) of the 2048-word tile took 100 / 137 registers at
K = 576 / 1536 with 4 warps, 255 and spills with 2. Timed (H100, session 50, ``FOLD_STEP_WORDS``' run): the best
fold beat the best split + reduce at all four SmolLM2 shapes by 1-15%; SmolLM2's W4A16 g64 decode step (random
weights, ``--model smollm2-random``) 1.043 / 1.975 ms at batch 1 / 16 (session 49, split + reduce, real weights:
1.101 / 1.968)."""


FOLD_ONE_STEP: dict = {"BLOCK_N": 8, "num_warps": 2}
"""``FOLD_T``'s columns and warps where a row's whole K fits one ``FOLD_ONE_STEP_WORDS`` tile of 8 columns
(SmolLM2's K = 576: q/k/v, o_proj, gate/up): twice the programs (72 at N = 576), half the tile. H100, session 52
(``python tools/bench_gemv.py --ms 1 --group 64 --only cc_f --shapes 576x960,576x3072,1536x576,576x576``, run
``2026-12-07-fold8``): 4.94 / 5.39 / 4.89 us against 5.21 / 5.84 / 5.11 for 16 columns on 4 warps at N = 960 / 3072 /
576 (K = 576); at K = 1536 (two steps) 8.27 against 8.12, so the rule stops at one step. SmolLM2's config, W4A16
g64, batch 1, one machine: 0.846 ms a step against 0.897 (1 warp: 0.986); the rule against no rule in the order
off / on / off 0.863 / 0.799 / 0.864 (``bench/results/generate_ab.json`` runs ``S52-fold8``, ``S52-fold8-aba``)."""

FOLD_ONE_STEP_WORDS = 1024
"""The tile of ``FOLD_ONE_STEP``: 16 chunks of 8 words at 8 columns (K <= 1024 codes at groups of 64)."""


def fold_chunks(nch: int, cw: int, block_n: int, tile_words: int) -> int:
    """``U`` of a ``FOLD`` tile: a row's ``nch`` chunks in one step where they fit ``tile_words`` (the fewest
    dependent loads), else the largest tile that does (a power of two, at least one chunk)."""
    return min(next_pow2(nch), max(1, tile_words // (cw * block_n)))


def fold_config(n: int, nch: int, cw: int) -> dict | None:
    """``FOLD_T`` for an M = 1 ``_gemv_t`` launch with an epilogue or a block fusion (``U``: ``fold_chunks``, one
    ``FOLD_TILE_WORDS`` step or ``FOLD_STEP_WORDS`` steps; ``FOLD_ONE_STEP``'s 8 columns where the row is one
    ``FOLD_ONE_STEP_WORDS`` step), or None where its row would take over ``FOLD_MAX_STEPS`` steps (K over 1536 codes
    at groups of 64: the 7B shapes keep split-K + reduce)."""
    one = fold_chunks(nch, cw, FOLD_ONE_STEP["BLOCK_N"], FOLD_ONE_STEP_WORDS)
    if cdiv(nch, one) == 1:
        return dict(FOLD_T, **FOLD_ONE_STEP, U=one)
    u = fold_chunks(nch, cw, FOLD_T["BLOCK_N"], FOLD_TILE_WORDS)
    if cdiv(nch, u) > 1:
        u = fold_chunks(nch, cw, FOLD_T["BLOCK_N"], FOLD_STEP_WORDS)
    return dict(FOLD_T, U=u) if cdiv(nch, u) <= FOLD_MAX_STEPS else None


def words_config(m: int, n: int, k: int, bits: int, cw: int, n_major: bool = False, group: int = 128,
                 fused: bool = False) -> dict:
    """Tile sizes, warps, split for the word-layout GEMV: the sweep's table where it has the shape, else a rule
    (N-major: ``_t_rule``; K-major: ~4 programs per SM of the H200 (132), K split only when N alone cannot);
    tensor cores at ``CW = 8``: ``CW8_TC`` (``_tc_chunk``). ``fused`` (the op has an epilogue or a block fusion):
    at M = 1 on N-major words off the tables, one split with the reduce folded in where ``fold_config`` allows.
    K-major words of ``K_MAJOR_MAX_K`` at M = 1: ``FOLD_K`` when ``fused``, else ``K_MAJOR_CC``; at 2..16 rows
    ``_tc_chunk`` (``CW8_TC``, wider chunks ``K_MAJOR_TC``)."""
    tc = m >= WORDS_TC_MIN_M
    bm = 16 if tc else next_pow2(m)
    per = 32 // bits
    nch = k // (per * cw)
    check(not tc or words_tc_ok(bits, cw), "weight_only_linear",
          f"no tensor-core word kernel takes {'N' if n_major else 'K'}-major int{bits} words of {cw}-word chunks "
          f"(N={n}, K={k}, M={m}): their dots need K >= {DOT_MIN_CW}")
    if tc and cw < DOT_MIN_CW:
        return dict(CW8_TC, BLOCK_M=bm, TC=True, SPLIT_K=max(1, min(4, nch // 2)))
    if tc and not n_major and k_major_narrow(k, bits):
        return dict(K_MAJOR_TC, BLOCK_M=bm, TC=True, SPLIT_K=max(1, min(K_MAJOR_TC["SPLIT_K"], nch)))
    if n_major:
        if not tc and m == 1 and bits == 4 and (n, k) in _R_TABLE:
            return dict(_R_TABLE[(n, k)], BLOCK_M=1, TC=False)
        if not tc and m == 1 and bits == 4 and n * k >= R_RULE_MIN_ELEMENTS:
            return dict(R_RULE, BLOCK_M=1, TC=False)
        cfg = _WORDS_T_TABLE.get(("tc" if tc else "cc", bm, n, k))
        if cfg is None and fused and m == 1:
            cfg = fold_config(n, nch, cw)
        return dict(cfg or _t_rule(tc, n, nch), BLOCK_M=bm, TC=tc)
    cfg = _WORDS_TABLE.get(("tc" if tc else "cc", bm, n, k))
    if cfg is None and m == 1 and k_major_narrow(k, bits):
        cfg = dict(FOLD_K, U=fold_chunks(nch, cw, FOLD_K["BLOCK_N"], FOLD_K_TILE_WORDS)) if fused else K_MAJOR_CC
    if cfg is None:
        if tc:
            cfg = {"BLOCK_N": 64, "SWAP": True, "num_warps": 4, "num_stages": 2}
        else:
            u = min(8 if cw == 32 else 16, pow2_at_most(nch, 16))
            # x's [1, U, CW] tile must hold 4 words' worth per thread to share the weight tile's layout
            cfg = {"BLOCK_N": 4, "U": u, "num_warps": max(1, u * cw // 128), "num_stages": 1}
    cfg = dict(cfg, BLOCK_M=bm, TC=tc)
    if "SPLIT_K" not in cfg:
        tiles = cdiv(n, cfg["BLOCK_N"])
        step = cfg.get("U", 1)
        # tensor cores: ~10 programs per SM (the sweep's best splits at both goal shapes); CUDA cores: ~4
        cfg["SPLIT_K"] = max(1, min(8, 1376 // tiles, nch // 2) if tc else min(528 // tiles, nch // (2 * step)))
    return cfg


def pairs_ok(bits: int, group: int, cw: int) -> bool:
    """``_tc_pairs`` takes int4 per channel or groups spanning 4 or 8 code positions of a chunk."""
    return bits == 4 and cw >= DOT_MIN_CW and (group == 0 or group // cw in (4, 8))


def _word_masks(bits: int) -> tuple[int, int]:
    return ((1 << bits) - 1) << (23 - bits), 0x3F800000


def _launch_words(x2, words, scale, zero_point, bias, out, qdtype, group, cfg, epilogue="", fusion=None):
    m, k = x2.shape
    n = words.shape[0]
    bits = 4 if qdtype in PACKED_QDTYPES else 8
    signed = (PACKED_QDTYPES | BYTE_QDTYPES)[qdtype]
    cw = chunk_words(k, group, bits)
    per = 32 // bits
    nch = k // (per * cw)
    step = cfg.get("U", 1)
    ch_split, split = _chunk_split(nch, cfg)
    grid = (cdiv(n, cfg["BLOCK_N"]), split, cdiv(m, cfg["BLOCK_M"]))
    zp = zero_point if zero_point is not None else scale
    b = bias if bias is not None else scale
    ssn = scale.stride(0)
    ssg = scale.stride(1) if scale.dim() == 2 else 0
    meta = {"BITS": bits, "SIGNED": signed, "GROUP": group, "GI": per if group == 0 else min(per, group // cw),
            "HAS_ZP": zero_point is not None, "XOR": WORD_XOR[bits], "CW": cw, "BLOCK_M": cfg["BLOCK_M"],
            "BLOCK_N": cfg["BLOCK_N"], "num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}
    if cfg.get("maxnreg"):  # a register cap (more resident programs per SM), for the sweeps
        meta["maxnreg"] = cfg["maxnreg"]
    n_major = is_n_major(words)
    sw = words.stride(1) if n_major else words.stride(0)
    if _takes_r(cfg, n_major, bits, m):
        return _launch_r(x2, words, scale, zp, b, bias, out, nch, sw, ssn, ssg, meta, cfg, epilogue, fusion)
    mask_args = _word_masks(bits)  # the exponent-trick kernels' constants (``_tc_chunk`` converts codes directly)
    if cfg["TC"] and cfg.get("PS") and bits == 4:
        kernel = _tc_chunk
        meta = {key: meta[key] for key in ("SIGNED", "GROUP", "HAS_ZP", "XOR", "CW", "BLOCK_M", "BLOCK_N",
                                           "num_warps", "num_stages")}
        meta.update(UPCAST=interpreting(), PS=cfg["PS"], SWAP=cfg.get("SWAP", False))
        mask_args = ()
    elif cfg["TC"]:
        kernel = _tc_t if n_major else _tc_words
        meta.update(UPCAST=interpreting(), SWAP=cfg["SWAP"], PREFETCH=cfg.get("PREFETCH", 0))
        if n_major and cfg.get("PAIRS") and pairs_ok(bits, group, cw):
            kernel = _tc_pairs
            meta.update(IS_BF16=x2.dtype == torch.bfloat16, ASM=not interpreting())
    else:
        kernel = _gemv_t if n_major else _gemv_words
        meta.update(U=step, PREFETCH=cfg.get("PREFETCH", 0), **UNFOLDED)
        if n_major:
            meta.update(RED=cfg.get("RED", False))
    folding = kernel in (_gemv_t, _gemv_words)
    fold_ptrs = (scale,) * 5 + (k, 0.0) if folding else ()  # stand-ins unless the launch folds
    if kernel is _tc_chunk:  # (either memory order: ``_tc_chunk`` takes both word strides)
        sw, mask_args = words.stride(1), (words.stride(0),)

    def args(t, som, sos):
        return (x2, words, scale, zp, b, t, m, n, nch, ch_split, x2.stride(0), sw, ssn, ssg, som, sos, *mask_args,
                *fold_ptrs)

    if folding and _folds(cfg, split) and (epilogue or fusion is not None):
        act, gated = parse_epilogue(epilogue, "weight_only_linear")
        check(not gated or cfg["BLOCK_N"] % 2 == 0, "weight_only_linear",
              f"a gated epilogue folds (gate, up) pairs whole: BLOCK_N {cfg['BLOCK_N']} must be even")
        ptrs, fold, eps = _fold_operands(x2, fusion, act, gated, grid[0], "weight_only_linear")
        fold_ptrs = (*(t if t is not None else scale for t in ptrs), k, eps)
        launcher(x2, kernel)[grid](*args(out, out.stride(0), 0), HAS_BIAS=bias is not None, PARTIAL=False,
                                   **(meta | fold), **pdl_launch_options())
        return out
    return _direct_or_split(x2, kernel, grid, args, meta, split, n, out, bias, b, epilogue, 1024, fusion)


def _chunk_split(nch: int, cfg: dict) -> tuple[int, int]:
    """``(chunks per program, split)`` of a word-layout launch: ``SPLIT_K`` rounded to whole ``U``-chunk steps."""
    step = cfg.get("U", 1)
    ch_split = cdiv(cdiv(nch, cfg["SPLIT_K"]), step) * step
    return ch_split, cdiv(nch, ch_split)


def _folds(cfg: dict, split: int) -> bool:
    """Whether an M = 1 ``_gemv_t`` / ``_gemv_words`` launch with an epilogue or a fusion runs them in its own
    programs (``FOLD``): its config asks for it and K is not split."""
    return bool(cfg.get("FOLD")) and split == 1 and cfg["BLOCK_M"] == 1


def _takes_r(cfg: dict, n_major: bool, bits: int, m: int) -> bool:
    """A word-layout launch runs ``_gemv_r``: its config has ``ROWS``, int4 N-major words, M = 1."""
    return bool(cfg.get("ROWS")) and n_major and bits == 4 and not cfg["TC"] and m == 1


def _launch_r(x2, words, scale, zp, b, bias, out, nch, sw, ssn, ssg, meta, cfg, epilogue="", fusion=None):
    """``_gemv_r`` (+ ``_splitk_reduce`` when K is split): ``ROWS`` word rows per step, ``SPLIT_K`` programs per
    column tile along K; ``meta``: ``_launch_words``' constexprs for the word layout."""
    n = words.shape[0]
    cw = meta["CW"]
    rows = min(cfg["ROWS"], cw)
    nstep = nch * (cw // rows)
    per_prog = cdiv(nstep, cfg["SPLIT_K"])
    split = cdiv(nstep, per_prog)
    grid = (cdiv(n, cfg["BLOCK_N"]), split)
    rmeta = {key: meta[key] for key in ("SIGNED", "GROUP", "GI", "HAS_ZP", "CW", "BLOCK_N", "num_warps", "num_stages",
                                        "maxnreg") if key in meta}
    rmeta.update(ROWS=rows, PREFETCH=bool(cfg.get("PREFETCH")))
    consts = r_constants(meta["SIGNED"])
    def args(t, som, sos):
        return (x2, words, scale, zp, b, t, n, nstep, per_prog, sw, ssn, ssg, sos, *consts)

    # a 128-wide reduce: over 8-32 partial rows, 1024-wide programs made the op 2 µs slower at 11008x4096 (R8 vs R9)
    return _direct_or_split(x2, _gemv_r, grid, args, rmeta, split, n, out, bias, b, epilogue, 128, fusion)


def _dequantize_words(words, scale, zero_point, qdtype, group, k, dtype, out=None, block_n=32, num_warps=4):
    n = words.shape[0]
    bits = 4 if qdtype in PACKED_QDTYPES else 8
    cw = chunk_words(k, group, bits)
    out = torch.empty((n, k), device=words.device, dtype=dtype) if out is None else out
    launcher(words, _dequant_words)[(cdiv(n, block_n), k // (32 // bits * cw))](
        words, scale, zero_point if zero_point is not None else scale, out, n, k, words.stride(0), words.stride(1),
        scale.stride(0),
        scale.stride(1) if scale.dim() == 2 else 0, *_word_masks(bits), BITS=bits,
        SIGNED=(PACKED_QDTYPES | BYTE_QDTYPES)[qdtype],
        GROUP=group, HAS_ZP=zero_point is not None, XOR=WORD_XOR[bits], CW=cw, BLOCK_N=block_n,
        num_warps=num_warps)
    return out


def _words_meta(words: torch.Tensor, qdtype: str, group: int, k: int) -> int:
    check(qdtype in PACKED_QDTYPES or qdtype in BYTE_QDTYPES, "weight_only_linear",
          f"qdtype {qdtype!r} is not int8/uint8/int4/uint4/int3/int2")
    bits = 4 if qdtype in PACKED_QDTYPES else 8
    cw = chunk_words(k, group, bits)
    check(cw > 0 and words.shape[1] * 32 == k * bits, "weight_only_linear",
          f"int32 word-layout weight {tuple(words.shape)} does not fit K={k}, {qdtype}, group {group} "
          f"(its words hold K={words.shape[1] * 32 // bits}; pack_words makes it)")
    return cw


def _unfused(product: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
             fusion: ReduceFusion) -> torch.Tensor:
    """``product(x)`` with a ``ReduceFusion``'s norm and residual add around it (where its reduce does not run
    them), filling ``fusion.gained`` / ``sumsq_out`` when it asks for the next norm's halves. The add and the next
    norm's half in one launch where the kernels run (``add_norm_parts``, as the A8 linears' prefill has them; the
    same stream and gained row, the sum of squares in another order), and the input's norm in one more
    (``norm_from_parts``), else torch ops: on an H100 those were twelve kernels a norm, ~2 ms of SmolLM2's 1x2048
    prefill (session 58)."""
    if fusion.sumsq is not None and on_kernel_device(x) and norm_from_parts_takes(x, fusion.sumsq):
        x = norm_from_parts(x, fusion.sumsq, fusion.eps)
    elif fusion.sumsq is not None:
        x = norm_from_parts_ref(x, fusion.sumsq, fusion.eps)
    y = product(x)
    if fusion.residual is not None and fusion.gain is not None and _adds_norm_in_a_kernel(y, fusion):
        y, fusion.gained, fusion.sumsq_out = add_norm_parts(fusion.residual.reshape(y.shape), y, fusion.gain)
        return y
    if fusion.residual is not None:
        y = fusion.residual.reshape(y.shape) + y
    if fusion.gain is not None:
        fusion.gained, fusion.sumsq_out = norm_parts_ref(y, fusion.gain)
    return y


def _adds_norm_in_a_kernel(y: torch.Tensor, fusion: ReduceFusion) -> bool:
    """Whether ``add_norm_parts`` takes ``_unfused``'s residual add and norm half: bf16/fp16 of one dtype on a kernel
    device, a gain as wide as the row."""
    r = fusion.residual
    return on_kernel_rows(y) and r.numel() == y.numel() and add_norm_parts_takes(r.reshape(y.shape), y, fusion.gain)


def _wo_impl(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
             bias: torch.Tensor | None, qdtype: str, group_size: int, path: str, epilogue: str = "",
             fusion: ReduceFusion | None = None) -> torch.Tensor:
    k = x.shape[-1]
    n = qweight.shape[0]
    _, gated = parse_epilogue(epilogue, "weight_only_linear")
    check(not gated or n % 2 == 0, "weight_only_linear",
          f"a gated epilogue needs an even N (gate, up pairs), got N={n}")
    if qweight.dtype == torch.int32:
        return _wo_words(x, qweight, scale, zero_point, bias, qdtype, group_size, path, epilogue, fusion)
    if fusion is not None:  # the stored layout's kernels fuse none of it
        return _unfused(lambda v: _wo_impl(v, qweight, scale, zero_point, bias, qdtype, group_size, path, epilogue),
                        x, fusion)
    if epilogue:  # the stored layout's kernels have no epilogue: its ops after them
        return apply_epilogue(_wo_impl(x, qweight, scale, zero_point, bias, qdtype, group_size, path), epilogue)
    if scale.dim() == 2 and scale.stride(1) != 1:
        scale = scale.contiguous()
        zero_point = zero_point.contiguous() if zero_point is not None else None
    packed, signed = _meta(qweight, qdtype, k)
    check(group_size == 0 or (is_pow2(group_size) and group_size >= 16 and k % group_size == 0),
          "weight_only_linear", f"group {group_size} must be a power of two >= 16 dividing K={k}")
    check(k % 2 == 0 or not packed, "weight_only_linear", f"K={k} is odd")
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    out = torch.empty((m, n), device=x.device, dtype=x.dtype)
    if path == "auto":
        path = "gemv" if m <= 16 else ("dequant" if m >= DEQUANT_CUBLAS_MIN_M and not interpreting() else "gemm")
    if path == "dequant":
        w = dequantize_weight(qweight, scale, zero_point, qdtype, group_size, k, x.dtype)
        return F.linear(x, w, bias)
    if path == "gemv":
        _launch_gemv(x2, qweight, scale, zero_point, bias, out, packed, signed, group_size,
                     gemv_config(m, n, k, group_size))
    else:
        zp = zero_point if zero_point is not None else scale
        b = bias if bias is not None else scale
        args = (x2, qweight, scale, zp, b, out, m, n, k, k, m_bucket(m), x2.stride(0), qweight.stride(0),
                scale.stride(0), out.stride(0), 0)
        meta = {"PACKED": packed, "SIGNED": signed, "GROUP": group_size, "HAS_ZP": zero_point is not None,
                    "HAS_BIAS": bias is not None, "PARTIAL": False, "UPCAST": interpreting(), "HALVES": False,
                    "DEFER": False}
        if interpreting():
            cfg = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": max(32, min(64, group_size or 64))}
            grid = (cdiv(n, cfg["BLOCK_N"]), 1, cdiv(m, cfg["BLOCK_M"]))
            launcher(x2, _wo_kernel)[grid](*args, **meta, **cfg)
        else:
            def grid(meta):
                return (cdiv(n, meta["BLOCK_N"]), 1, cdiv(m, meta["BLOCK_M"]))
            launcher(x2, _wo_kernel_tuned)[grid](*args, **meta)
    return out.reshape(*x.shape[:-1], n)


def _wo_words(x, words, scale, zero_point, bias, qdtype, group_size, path, epilogue="", fusion=None):
    """The decode layout: word GEMV for M <= 16 (CUDA cores below ``WORDS_TC_MIN_M``, tensor cores from it),
    dequantize + cuBLAS above. ``fusion`` runs in the GEMVs' split-K reduce (the next norm's halves at M = 1
    only), elsewhere as torch ops (``_unfused``)."""
    k = x.shape[-1]
    n = words.shape[0]
    check(group_size == 0 or (is_pow2(group_size) and group_size >= 16 and k % group_size == 0),
          "weight_only_linear", f"group {group_size} must be a power of two >= 16 dividing K={k}")
    cw = _words_meta(words, qdtype, group_size, k)
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    bits = 4 if qdtype in PACKED_QDTYPES else 8
    cfg = None
    if path == "auto":
        if m <= 16 and (m < WORDS_TC_MIN_M or words_tc_ok(bits, cw)):
            path = "gemv"
        elif m > 16 and bits == 4 and is_n_major(words) and (cfg := prefill_tc_config(m, n, k)) is not None:
            path = "gemv"
        else:
            path = "dequant"
    if fusion is not None and (path != "gemv" or (fusion.gain is not None and m != 1)):
        return _unfused(lambda v: _wo_words(v, words, scale, zero_point, bias, qdtype, group_size, path, epilogue),
                        x, fusion)
    if path != "gemv":
        w = _dequantize_words(words, scale, zero_point, qdtype, group_size, k, x.dtype)
        return apply_epilogue(F.linear(x, w, bias), epilogue)
    n_out = n // 2 if epilogue.endswith("*up") else n
    out = torch.empty((m, n_out), device=x.device, dtype=x.dtype)
    if fusion is not None:
        fusion.to_rows(out)
    if cfg is None:
        cfg = words_config(m, n, k, bits, cw, is_n_major(words), group_size, fused=bool(epilogue) or fusion is not None)
    _launch_words(x2, words, scale, zero_point, bias, out, qdtype, group_size, cfg, epilogue, fusion)
    if fusion is not None:
        fusion.from_rows(x.shape[:-1])
    return out.reshape(*x.shape[:-1], n_out)


@triton_op("lowbit::weight_only_linear", mutates_args=())
def weight_only_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                       zero_point: torch.Tensor | None, bias: torch.Tensor | None, qdtype: str,
                       group_size: int, path: str = "auto", epilogue: str = "",
                       norm_sumsq: torch.Tensor | None = None, norm_eps: float = 0.0) -> torch.Tensor:
    """``x @ dequantize(qweight).T + bias`` with the dequantize fused; ``group_size`` 0 = per channel.

    ``path``: ``auto`` (by M), ``gemv`` (split-K), ``gemm`` (tiled), ``dequant`` (dequantize + cuBLAS).
    ``epilogue`` (``parse_epilogue``): an activation (``silu``, ``gelu``, ``gelu_tanh``) applied to the output, or
    ``<act>*up`` when the weight's rows are interleaved (gate, up) pairs (``interleave_rows``): the op returns
    ``act(gate) * up``, half as wide (``epilogue_ref``). On the decode layout's GEMVs the epilogue runs in the
    split-K reduce, so an MLP's activation costs no launch of its own; elsewhere its ops follow the product.

    ``norm_sumsq`` (``[..., P]``, with ``norm_eps``): ``x`` is an RMSNorm's gain times its input row and these
    are partial sums of that row's squares (``weight_only_linear_add_norm`` makes both): the op is the linear of
    the norm's output (``norm_from_parts_ref``), the scaling done in the GEMVs' reduce."""
    fusion = None if norm_sumsq is None else ReduceFusion(sumsq=norm_sumsq, eps=norm_eps)
    return _wo_impl(x, qweight, scale, zero_point, bias, qdtype, group_size, path, epilogue, fusion)


@triton_op("lowbit::weight_only_linear_add_norm", mutates_args=())
def weight_only_linear_add_norm(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                                zero_point: torch.Tensor | None, bias: torch.Tensor | None, qdtype: str,
                                group_size: int, residual: torch.Tensor,
                                norm_weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A block's ``residual + linear(x)`` (the new residual stream) and the first half of the RMSNorm that reads
    it: ``(stream, norm_weight * stream, partial sums of stream**2 [..., P])`` (``norm_parts_ref``), which the
    next ``weight_only_linear(..., norm_sumsq=...)`` finishes. In a decode step (M = 1, decode layout) all of it
    runs in the GEMV's split-K reduce, so the add and the norm cost no launch of their own (they were a ~3 µs
    Inductor kernel each, two per block, on the H200); elsewhere torch ops follow the product."""
    return _add_norm(x, qweight, scale, zero_point, bias, qdtype, group_size, residual, norm_weight)


def _add_norm(x, qweight, scale, zero_point, bias, qdtype, group_size, residual, norm_weight):
    fusion = ReduceFusion(residual=residual, gain=norm_weight)
    stream = _wo_impl(x, qweight, scale, zero_point, bias, qdtype, group_size, "auto", "", fusion)
    return stream, fusion.gained, fusion.sumsq_out


@torch.library.custom_op("lowbit::weight_only_linear_pdl", mutates_args=())
def weight_only_linear_pdl(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                           zero_point: torch.Tensor | None, bias: torch.Tensor | None, qdtype: str, group_size: int,
                           epilogue: str = "", norm_sumsq: torch.Tensor | None = None,
                           norm_eps: float = 0.0) -> torch.Tensor:
    """``weight_only_linear`` as an opaque op whose M = 1 GEMV (``_gemv_r``, ``_gemv_t``, folded or not) and reduce
    launch with programmatic dependent launch (``pdl_launches``). Opaque because Inductor launches a ``triton_op``'s
    kernels itself, without PDL; in a CUDA-graph decode step the op's Python runs once, at capture."""
    fusion = None if norm_sumsq is None else ReduceFusion(sumsq=norm_sumsq, eps=norm_eps)
    with pdl_launches():
        return _wo_impl(x, qweight, scale, zero_point, bias, qdtype, group_size, "auto", epilogue, fusion)


@weight_only_linear_pdl.register_fake
def _(x, qweight, scale, zero_point, bias, qdtype, group_size, epilogue="", norm_sumsq=None, norm_eps=0.0):
    n = qweight.shape[0]
    return x.new_empty((*x.shape[:-1], n // 2 if epilogue.endswith("*up") else n))


def add_norm_partials(x: torch.Tensor, qweight: torch.Tensor, qdtype: str, group_size: int) -> int:
    """How many partial sums of squares per row ``weight_only_linear_add_norm`` returns: at M = 1 on the decode
    layout's GEMVs one per ``_gemv_t`` / ``_gemv_words`` program where it folds the reduce in (``fold_config``,
    ``FOLD_K``), else one per split-K
    reduce program (128-wide on ``_gemv_r``, else 1024); one elsewhere."""
    k, n = x.shape[-1], qweight.shape[0]
    if qweight.dtype != torch.int32 or x.numel() != k:
        return 1
    bits = 4 if qdtype in PACKED_QDTYPES else 8
    cw = _words_meta(qweight, qdtype, group_size, k)
    n_major = is_n_major(qweight)
    cfg = words_config(1, n, k, bits, cw, n_major, group_size, fused=True)
    if _folds(cfg, _chunk_split(k // (32 // bits * cw), cfg)[1]):  # (_gemv_t's and _gemv_words' FOLD configs)
        return cdiv(n, cfg["BLOCK_N"])
    return cdiv(n, 128 if _takes_r(cfg, n_major, bits, 1) else 1024)


@torch.library.custom_op("lowbit::weight_only_linear_add_norm_pdl", mutates_args=())
def weight_only_linear_add_norm_pdl(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                                    zero_point: torch.Tensor | None, bias: torch.Tensor | None, qdtype: str,
                                    group_size: int, residual: torch.Tensor,
                                    norm_weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``weight_only_linear_add_norm`` with PDL launches (see ``weight_only_linear_pdl``)."""
    with pdl_launches():
        return _add_norm(x, qweight, scale, zero_point, bias, qdtype, group_size, residual, norm_weight)


@weight_only_linear_add_norm_pdl.register_fake
def _(x, qweight, scale, zero_point, bias, qdtype, group_size, residual, norm_weight):
    rows = x.shape[:-1]
    n = qweight.shape[0]
    p = add_norm_partials(x, qweight, qdtype, group_size)
    return x.new_empty((*rows, n)), x.new_empty((*rows, n)), x.new_empty((*rows, p), dtype=torch.float32)
