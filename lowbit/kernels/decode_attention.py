"""Decode attention over a quantized KV cache: one query token per sequence reads packed int8/int4/int2 keys and
values and dequantizes them in its inner loop (torch and triton; the cache format is lowbit.ir.kvcache's).

The cache is the real form of the ``quantize(kv=...)`` accuracy model (docs/design.md, "Program form"):

* **keys** per channel over blocks of ``k_block`` tokens (KIVI): ``k_scale``/``k_zero`` are
  ``[B, Hkv, S / k_block, D]``; **values** per token over groups of ``v_group`` channels: ``v_scale``/``v_zero``
  are ``[B, Hkv, S, D / v_group]``. Asymmetric min/max qparams, as ``lowbit.ir.quant.qparams_from_range``; scales
  float32 (exact against the accuracy model; the kernel also reads float16/bfloat16 scales, a smaller cache).
* codes are stored unsigned (``code - qmin``), ``8 / bits`` per byte along ``D``, the lowest index in the
  lowest bits: ``[B, Hkv, S, D * bits / 8]`` uint8. ``*_zero`` holds ``zero_point - qmin`` as uint8 (an integer
  in ``[0, 2**bits)``: exact in one byte), so a value is ``(stored - zero) * scale`` — the same float32 arithmetic
  as ``dequantize``'s ``(q - zero_point) * scale``.
* a query at ``position`` reads the quantized copy of tokens ``[lo, hi)`` (``lo`` = the attention sink, ``hi`` =
  ``position - window + 1``: older than the float window) and a small float buffer for the rest (the sink and
  the recent window, ``k_float``/``v_float`` with a validity mask), exactly the split the accuracy model's mask
  makes.

ALiBi (Bloom): with ``alibi_slopes`` every score takes ``slope[h] * key position`` (float32, rounded to the bias
dtype the step's float mask has: ``alibi_bias``); slot n holds position n and the float tokens' positions are given
(v3/v4 and the merge; the Triton lowering reads the slopes off the graph's bias and checks them against it).

``decode_attention_reference`` is plain torch; ``decode_attention`` is flash-decoding in two Triton kernels, a
split kernel (one program per sequence, query heads, chunk of the context) writing each chunk's max, sum and
un-normalised output, and ``_reduce_kernel`` (grid ``(B, Hq)``), which attends to the small float buffer (sink +
recent window) and merges it with every chunk by log-sum-exp.

Decode attention over a packed cache is bound by instruction issue, not bytes (issue 18): batch 16 x 32 heads x 32K
tokens at int4 is 4.3G codes, 2.5 GB; the H200 issues ~3.3e13 thread-instructions/s, so every instruction per code
costs ~0.13 ms while the bytes cost ~0.6 ms; registers (warps per SM) set how much of the issue rate a kernel
gets (``DEFAULT_CONFIG``'s note). Three split kernels (a fourth, v2p — v2 with the next key block prefetched into
registers — ran 0.56-0.84x v2 on the H200 in every configuration measured, bench/results/attention.json, and was
removed in session 14):

* ``_split_kernel_v2`` (``variant="v2"``): grid ``(B * Hq / heads, chunks)``, one warp per program,
  one 32-token key block per iteration. Tiles ``[heads, rows, token threads, channel lanes, channels]``: a thread
  owns 16 channels (one 8-byte load per token row at int4) of 8 token rows. Codes are read as int32 words and each
  field is masked where it lies with the float bits of 2**23 (one LOP3: ``2**23 + u * 2**e`` exactly; the fields
  above bit 22 share one shift), so a code costs one LOP3, one FADD (removing 2**23 and, for keys, the zero point
  ``2**23 + z * 2**e`` prepared once per key block) and one FFMA (the query, pre-scaled by the block's key scales
  and ``2**-e``; for values, the row's probability times its scale). The q.k sum is an explicit FFMA chain over
  each word's fields (``_fma_fields``), the value rows an FFMA chain per channel (``_rows``): ``tl.sum`` reduces
  in-thread values as a tree of FMUL/FADD. Rows are in-thread, so the online softmax never leaves the thread; only
  the q.k sums cross the 8 channel lanes. GQA: ``heads`` query heads of one kv head share a program, so each code
  is unpacked once for all of them. Compiled offline for sm_90 (ptxas of Triton 3.8): ~4.8 SASS instructions per
  code (MHA int4 and int2, 106 registers, no shared memory or barrier in the loop; Triton 3.6: 5.2 and 164),
  ~2.5 per code and head with 4 GQA heads per program (3.6: 2.9), against 3 for the LOP3/FADD/FFMA floor.
* ``_split_kernel_v3`` (``variant="v3"``): v2's arithmetic and grid on ``[channel lanes, token threads, heads,
  channels]`` tiles, a step's token rows loaded and scored one row tile at a time (their scores a tuple). Why:
  Triton 3.6 (the H200's) lays v2's ``[heads, rows, token threads, ...]`` code load out with the lanes on the rows
  (a whole 128-channel row per thread), so under 3.6 v2 holds every scaled query channel per thread and moves them
  through shared memory each key block. Offline sm_90 with Triton 3.6 (``tools/sass_attention.py``), v2 -> v3:
  MHA int4 164 -> 124 registers, 5.17 -> 4.79 instructions per code, no shared memory in the loop (66 LDS);
  int2 168 -> 110, 5.75 -> 4.77 (v2: 144 SHFL, 33 BAR); int8 254 -> 128, 5.57 -> 5.29; 4 GQA heads per program
  (per code and head) int4 2.92 with 992 spilled bytes -> 2.45 with 64, int2 2.73 / 320 -> 2.36 / 0, int8
  3.26 / 1360 -> 2.60 / 16. Under Triton 3.8 the two are alike (MHA int4 4.86, 101 registers) but for int2, where
  v3's code lanes and query lanes are ordered differently (5.59 per code: 193 SHFL).
* ``variant="v4"`` (the default: ``DEFAULT_CONFIG``): v3 with each code read as the subnormal float
  ``u * 2**(e - 149)`` its masked bits make (``_split_kernel_v3``'s ``DEN``): no FADD per code to remove a bias or a
  zero point, so a code costs one LOP3 and one FFMA (v2/v3: LOP3, FADD, FFMA); the key zero points become one dot per
  key block. Triton 3.6 offline:
  MHA int4 3.96 per code at 96 registers, int2 3.86 / 88, int8 4.49 / 101; 4 GQA heads per program 2.33 per
  code and head at int4 (255 registers, 48 spilled bytes), 2 heads 2.80 (164, none). Error against the reference
  as v2's (float32 rounding: ~1e-6 relative, ~3e-5 with 30x queries).
  Session 24 (``interior``, the default but for int2 with several heads per program: ``V4_INT2_GQA_INTERIOR``):
  the key blocks wholly inside a program's tokens run in a loop of their own without token masks (``_v3_block``
  with ``MASKED`` = False), and the pointer tiles move once per block so a row's load is an immediate offset:
  MHA int4 3.31 per code in that loop (128 registers; the masked first / last block 3.69), int2 3.23. H200: batch
  16 x 32 heads x 32K int4 708.9 us = 2.69x SDPA (797.4 before, same call).
  Session 48 (int2's 4x goal): int2 ran on 2 warps from 4 key blocks a chunk (``V4_INT2_MHA_WARPS``; from 32
  blocks on one again since session 51: ``V4_INT2_MHA_ONE_WARP_BLOCKS``), whose
  interior loop was 3.75 per code: the warps split each key block, so the per-block work (key scales into the
  query, the zero-point dot: ~100 instructions a thread) covered 4 rows a thread instead of 8. ``warp_blocks``
  (an option, ``V4_WARP_BLOCKS``) gives each warp key blocks of its own: 3.24; ``raw_scores`` (an option,
  ``V4_RAW_SCORES``) moves the zero-point dot and the scores' 2**49 to once per block: 3.15 (int4 3.25). Below
  that the loop is at its floor for exact float32 arithmetic: a code is one LOP3 (its field as a float) and one
  FFMA, 2 of int2's 3.15, and the rest (~0.9 a code: row sums across 8 lanes, the online softmax, value scales,
  acc rescales, the per-block work) scales with rows and blocks as 1/channels and 1/rows per thread, which trade
  off 1:1 at 32 tokens x 128 channels a warp. int2 at 4x SDPA (~60% of int4's time) needs ~2 instructions per
  code, i.e. two codes per instruction: packed half-precision math (HFMA2: 2^-11 relative error per product,
  against the tests' 2e-5) or tensor cores (tried twice, 9-12 instructions per code in layout moves: below).
* ``_split_kernel`` (``variant="v1"``): the previous session's kernel:
  ``[BLOCK_N, D / CW, CW]`` tiles, one program per query head and 4 warps, ~9.5 SASS instructions per code (a
  per-code zero subtraction, an FMUL+FADD tree for q.k and a per-code rescale of per-row accumulators).

No ``tl.dot``: decode is one query row per head, and a Triton-level tensor-core form (codes made bf16 pairs with
a magic exponent, then a dot against the split query) compiled to ~3.6 instructions per code for the key side
alone (register moves and a shared-memory round trip to reach the MMA operand layout). Session 22 tried it again
for grouped heads only (a kv head's query heads as the dot's rows, the key scales folded into the query, codes as
exact float16 integers): 656.6 us against v4's 567.8 at batch 16 x 32/8 heads x 32K int4 on the H200, 9-12 SASS
instructions per code offline, most of them layout moves (README, decode attention; removed).
"""

from __future__ import annotations

import math
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - torch-only installs use the reference
    triton = None
    tl = None

__all__ = ["quantize_keys", "quantize_values", "pack_codes", "unpack_codes", "dequantize_keys",
           "dequantize_values", "alibi_bias", "decode_attention_reference", "decode_attention",
           "cache_attention_decode", "cache_attention_unsupported"]

# the cache format is the IR's (lowbit.ir.kvcache: the cache_attention op's reference writes it)
from lowbit.ir.kvcache import (  # noqa: E402
    dequantize_keys,
    dequantize_values,
    pack_codes,
    quantize_keys,
    quantize_values,
    unpack_codes,
)


def _float_part(q: torch.Tensor, k_float: torch.Tensor | None, v_float: torch.Tensor | None,
                float_valid: torch.Tensor | None, sm_scale: float) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Scores ``[B, Hq, F]`` (invalid = -inf) and values ``[B, Hq, F, D]`` of the float buffer."""
    if k_float is None:
        return None
    groups = q.shape[1] // k_float.shape[1]
    kf = k_float.float().repeat_interleave(groups, 1)
    vf = v_float.float().repeat_interleave(groups, 1)
    s = torch.einsum("bhd,bhfd->bhf", q.float(), kf) * sm_scale
    s = s.masked_fill(~float_valid[:, None, :], float("-inf"))
    return s, vf


def alibi_bias(slopes: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """ALiBi's bias ``[B, H, N]`` of keys at ``positions [B, N]``: ``slope * position`` in float32, as transformers'
    ``build_alibi_tensor`` computes it (absolute key positions: its cumsum of an all-ones mask minus one is the slot),
    rounded to ``dtype`` as a half-precision step's float mask holds it, back in float32."""
    bias = slopes.float()[None, :, None] * positions.float()[:, None, :]
    return bias.to(dtype).float()


def decode_attention_reference(q: torch.Tensor, k_codes: torch.Tensor, k_scale: torch.Tensor, k_zero: torch.Tensor,
                               v_codes: torch.Tensor, v_scale: torch.Tensor, v_zero: torch.Tensor, *, bits: int,
                               lo: torch.Tensor, hi: torch.Tensor, k_float: torch.Tensor | None = None,
                               v_float: torch.Tensor | None = None, float_valid: torch.Tensor | None = None,
                               sm_scale: float | None = None, alibi_slopes: torch.Tensor | None = None,
                               float_positions: torch.Tensor | None = None,
                               bias_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``q [B, Hq, D]`` over quantized tokens ``[lo[b], hi[b])`` plus the valid float tokens -> ``[B, Hq, D]`` f32.
    ``alibi_slopes`` (float32 ``[Hq]``): each score takes ``slope[h] * position`` in float32 rounded to
    ``bias_dtype`` (Bloom's ALiBi as its step's float mask holds it); slot n holds position n, the float tokens'
    positions are ``float_positions [B, F]``."""
    b, hq, d = q.shape
    sm_scale = sm_scale if sm_scale is not None else 1 / math.sqrt(d)
    groups = hq // k_codes.shape[1]
    k = dequantize_keys(k_codes, k_scale, k_zero, bits).repeat_interleave(groups, 1)
    v = dequantize_values(v_codes, v_scale, v_zero, bits).repeat_interleave(groups, 1)
    s = torch.einsum("bhd,bhsd->bhs", q.float(), k) * sm_scale
    slots = torch.arange(k.shape[2], device=q.device)
    keep = (slots[None, :] >= lo[:, None]) & (slots[None, :] < hi[:, None])
    if alibi_slopes is not None:
        s = s + alibi_bias(alibi_slopes, slots[None].expand(b, -1), bias_dtype)
    s = s.masked_fill(~keep[:, None, :], float("-inf"))
    fp = _float_part(q, k_float, v_float, float_valid, sm_scale)
    if fp is not None:
        fs = fp[0] if alibi_slopes is None else fp[0] + alibi_bias(alibi_slopes, float_positions, bias_dtype)
        s = torch.cat([s, fs.masked_fill(~float_valid[:, None, :], float("-inf"))], -1)
        v = torch.cat([v, fp[1]], 2)
    return torch.einsum("bhs,bhsd->bhd", s.softmax(-1), v)


if triton is not None:
    from lowbit.kernels._common import pdl_launch_options, pdl_prologue, round_to_bf16

    @triton.jit
    def _biased(x):
        """Integers ``x`` in ``[0, 2**23)`` -> ``2**23 + x`` as float32, exactly: ``x | 2**23`` read as a float (one
        integer op instead of a quarter-rate int->float conversion). Differences of two biased codes are exact."""
        return (x.to(tl.int32) | 0x4B000000).to(tl.float32, bitcast=True)

    @triton.jit
    def _codes_biased(x, BITS: tl.constexpr):
        """Packed uint8 bytes ``[..., CB]`` -> ``2**23 +`` their codes ``[..., CB * 8 / BITS]`` (float32), in channel
        order (field ``f`` of byte ``j`` is channel ``PER * j + f``): the fields are interleaved in registers (a
        thread's bytes are its own channels, so no data moves between threads)."""
        x = x.to(tl.int32)
        if BITS == 8:
            u = x
        elif BITS == 4:
            u = tl.interleave(x & 15, x >> 4)
        else:
            u = tl.interleave(tl.interleave(x & 3, (x >> 4) & 3), tl.interleave((x >> 2) & 3, x >> 6))
        return _biased(u)

    # the partial-result strides depend on the number of chunks: not specialised on, so one compile serves every
    # context length (and the benchmark's 4K-token check and its 32K-token run)
    @triton.jit(do_not_specialize=["s_ab", "s_ah", "s_as", "s_mb", "s_mh"])
    def _split_kernel(
        Q, KC, KS, KZ, VC, VS, VZ, LO, HI, ACC, M, L,
        s_qb, s_qh, s_kcb, s_kch, s_kcs, s_ksb, s_ksh, s_kss, s_vcb, s_vch, s_vcs, s_vsb, s_vsh, s_vss,
        s_ab, s_ah, s_as, s_mb, s_mh, qk_scale, split,
        HQ: tl.constexpr, GROUPS: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr, K_BLOCK: tl.constexpr,
        V_GROUP: tl.constexpr, BLOCK_N: tl.constexpr, CW: tl.constexpr,
    ):
        """One (sequence, query head, chunk): online softmax (base 2) of the head's query over the chunk's quantized
        tokens in ``[lo, hi)``, ``BLOCK_N`` tokens per step.

        Tiles are ``[BLOCK_N, D / CW, CW]`` (token, channel chunk, channel): a thread owns whole chunks of ``CW``
        channels (``CW * BITS / 8`` packed bytes, one vector load), a chunk never straddles a value group, so a
        value scale/zero is one ``[BLOCK_N, D / CW, 1]`` element per chunk; the query and the key scales/zeros are
        loaded as whole tiles with the codes' layout (row stride 0): every broadcast is register-local. Codes are
        biased by 2**23 (``_biased``) and zero points subtracted in that form, exactly. Each token row ``n`` of the
        tile keeps its own running max/sum (a separate online softmax per row), so the loop reduces across threads
        only for the ``q.k`` sums; the rows merge once, after the loop.

        When ``BLOCK_N <= K_BLOCK`` an iteration covers one key block: its scale/zero row is loaded and folded into
        the query once, then ``K_BLOCK / BLOCK_N`` unrolled steps read the block's tokens (their loads are
        independent, so they are all in flight together). Longer steps read each token row's scale row."""
        pid_h = tl.program_id(0)
        pid_s = tl.program_id(1)
        b = pid_h // HQ
        h = pid_h % HQ
        kvh = h // GROUPS
        PER: tl.constexpr = 8 // BITS
        X: tl.constexpr = D // CW
        CB: tl.constexpr = CW // PER  # packed bytes of one chunk
        STEP: tl.constexpr = K_BLOCK if BLOCK_N <= K_BLOCK else BLOCK_N
        SUB: tl.constexpr = STEP // BLOCK_N
        offs_n = tl.arange(0, BLOCK_N)[:, None, None]
        offs_x = tl.arange(0, X)[None, :, None]
        byte = offs_x * CB + tl.arange(0, CB)[None, None, :]  # [1, X, CB]
        chan = offs_x * CW + tl.arange(0, CW)[None, None, :]  # [1, X, CW]
        bcast = chan + 0 * offs_n  # [BLOCK_N, X, CW]: a [1, X, CW] load would be spread over all threads
        vgrp = (offs_x * CW) // V_GROUP  # [1, X, 1] value group of each chunk
        lo = tl.load(LO + b)
        hi = tl.load(HI + b)
        start = (tl.maximum(pid_s * split, lo) // STEP) * STEP
        end = tl.minimum(pid_s * split + split, hi)
        kc_base = KC + b * s_kcb + kvh * s_kch
        vc_base = VC + b * s_vcb + kvh * s_vch
        ks_base = KS + b * s_ksb + kvh * s_ksh
        kz_base = KZ + b * s_ksb + kvh * s_ksh
        vs_base = VS + b * s_vsb + kvh * s_vsh
        vz_base = VZ + b * s_vsb + kvh * s_vsh
        q = tl.load(Q + b * s_qb + h * s_qh + bcast).to(tl.float32) * qk_scale  # [BLOCK_N, X, CW]
        m_i = tl.full([BLOCK_N, 1, 1], -float("inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_N, 1, 1], dtype=tl.float32)
        acc = tl.zeros([BLOCK_N, X, CW], dtype=tl.float32)  # per row: sum_t p_t s_t (u_t - z_t)
        for n0 in range(start, end, STEP):
            if BLOCK_N <= K_BLOCK:  # one key block: its row, folded into the query once
                kb = (n0 // K_BLOCK) * s_kss + bcast
                qs = q * tl.load(ks_base + kb).to(tl.float32)
                kzb = _biased(tl.load(kz_base + kb))
            for j in tl.static_range(SUB):
                tok = n0 + j * BLOCK_N + offs_n  # [BLOCK_N, 1, 1]
                valid = (tok >= lo) & (tok < end)
                kx = tl.load(kc_base + tok * s_kcs + byte, mask=valid, other=0)
                vx = tl.load(vc_base + tok * s_vcs + byte, mask=valid, other=0)
                vs = tl.load(vs_base + tok * s_vss + vgrp, mask=valid, other=0.0).to(tl.float32)
                vzb = _biased(tl.load(vz_base + tok * s_vss + vgrp, mask=valid, other=0))
                if BLOCK_N > K_BLOCK:  # several key blocks per step: every row reads its block's row
                    kb = (tok // K_BLOCK) * s_kss + chan
                    qs = q * tl.load(ks_base + kb, mask=valid, other=0.0).to(tl.float32)
                    kzb = _biased(tl.load(kz_base + kb, mask=valid, other=0))
                # keys: sum_c (u - z) s q, with u and z both biased by 2**23
                s = tl.sum(tl.sum((_codes_biased(kx, BITS) - kzb) * qs, 2, keep_dims=True), 1, keep_dims=True)
                s = tl.where(valid, s, -float("inf"))  # [BLOCK_N, 1, 1]
                m_new = tl.maximum(m_i, s)
                m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
                alpha = tl.exp2(m_i - m_safe)
                p = tl.exp2(s - m_safe)
                l_i = l_i * alpha + p
                m_i = m_new
                acc = acc * alpha + (p * vs) * (_codes_biased(vx, BITS) - vzb)
        # merge the rows' softmaxes
        m_top = tl.max(m_i, 0, keep_dims=True)
        m_top = tl.where(m_top == -float("inf"), 0.0, m_top)
        c = tl.exp2(m_i - m_top)  # [BLOCK_N, 1, 1]
        out = tl.sum(acc * c, 0)  # [X, CW]
        a_ptr = ACC + b * s_ab + h * s_ah + pid_s * s_as
        tl.store(a_ptr + tl.arange(0, X)[:, None] * CW + tl.arange(0, CW)[None, :], out)
        tl.store(M + b * s_mb + h * s_mh + pid_s, tl.max(tl.max(tl.max(m_i, 2), 1), 0))
        tl.store(L + b * s_mb + h * s_mh + pid_s, tl.sum(tl.sum(tl.sum(l_i * c, 2), 1), 0))

    @triton.jit
    def _alibi_bias(slope, pos, ROUND: tl.constexpr):
        """ALiBi's bias of a key at ``pos`` in the kernels' base-2 scores: ``slope * pos`` in float32 (the product
        transformers' ``build_alibi_tensor`` makes), rounded to the bias' dtype as the step's float mask holds it
        (``ROUND``: 0 float32, 1 float16, 2 bfloat16), then times log2(e)."""
        bias = slope * pos.to(tl.float32)
        if ROUND == 1:
            bias = bias.to(tl.float16, fp_downcast_rounding="rtne").to(tl.float32)
        elif ROUND == 2:  # to nearest even on the bits: the interpreter's bfloat16 cast truncates
            bits = bias.to(tl.int32, bitcast=True)
            bias = ((bits + 0x7FFF + ((bits >> 16) & 1)) & -65536).to(tl.float32, bitcast=True)
        return bias * 1.4426950408889634

    @triton.jit
    def _reduce_kernel(
        Q, ACC, M, L, KF, VF, FV, OUT, SLOPES, FPOS,
        s_qb, s_qh, s_ab, s_ah, s_as, s_mb, s_mh, s_fb, s_fh, s_fs, s_vb, s_vh, s_vs, s_valid, s_ob, s_oh,
        qk_scale, n_split, n_float,
        GROUPS: tl.constexpr, D: tl.constexpr, NS: tl.constexpr, F: tl.constexpr, HAS_FLOAT: tl.constexpr,
        ALIBI: tl.constexpr, ROUND: tl.constexpr, PDL: tl.constexpr = False, OUT_BF16: tl.constexpr = False,
        OUT_FP16: tl.constexpr = False,
    ):
        """One (sequence, query head): ``_merge_head``. ``PDL`` (``pdl_launches``): the next GEMV may launch now;
        this one waits for the partials of the split kernel and the q and float candidates of the packed write
        before it loads anything."""
        pdl_prologue(PDL)
        _merge_head(tl.program_id(0), tl.program_id(1), Q, ACC, M, L, KF, VF, FV, OUT, SLOPES, FPOS,
                    s_qb, s_qh, s_ab, s_ah, s_as, s_mb, s_mh, s_fb, s_fh, s_fs, s_vb, s_vh, s_vs, s_valid, s_ob, s_oh,
                    qk_scale, n_split, n_float, GROUPS, D, NS, F, HAS_FLOAT, ALIBI, ROUND, OUT_BF16, OUT_FP16)

    @triton.jit
    def _merge_head(b, h, Q, ACC, M, L, KF, VF, FV, OUT, SLOPES, FPOS,
                    s_qb, s_qh, s_ab, s_ah, s_as, s_mb, s_mh, s_fb, s_fh, s_fs, s_vb, s_vh, s_vs, s_valid, s_ob, s_oh,
                    qk_scale, n_split, n_float, GROUPS: tl.constexpr, D: tl.constexpr, NS: tl.constexpr,
                    F: tl.constexpr, HAS_FLOAT: tl.constexpr, ALIBI: tl.constexpr, ROUND: tl.constexpr,
                    OUT_BF16: tl.constexpr, OUT_FP16: tl.constexpr):
        """Query head ``h`` of sequence ``b``: the float tokens' softmax and every chunk's, merged by log-sum-exp,
        ``NS`` chunks at a time (a running maximum rescales what is merged so far): short chunks for a small grid
        (batch 1, grouped heads: hundreds of chunks per head) then cost no more registers than a few. The
        partials are read past L1 (``.cg``): in the split kernel's own merge (``MERGE``) other programs wrote
        them. ``OUT_BF16`` / ``OUT_FP16``: the output rounded to nearest even onto that grid, as torch's cast of the
        fp32 result rounds it (bf16 by its bits: the interpreter's cast truncates)."""
        offs_d = tl.arange(0, D)
        offs_s = tl.arange(0, NS)
        top = -float("inf")
        num = tl.zeros([D], dtype=tl.float32)
        total = 0.0
        if HAS_FLOAT:
            offs_f = tl.arange(0, F)
            kvh = h // GROUPS
            fm = offs_f < n_float
            ok = tl.load(FV + b * s_valid + offs_f, mask=fm, other=0) != 0
            q = tl.load(Q + b * s_qb + h * s_qh + offs_d).to(tl.float32) * qk_scale
            kf = tl.load(KF + b * s_fb + kvh * s_fh + offs_f[:, None] * s_fs + offs_d[None, :], mask=fm[:, None],
                         other=0.0).to(tl.float32)
            vf = tl.load(VF + b * s_vb + kvh * s_vh + offs_f[:, None] * s_vs + offs_d[None, :], mask=fm[:, None],
                         other=0.0).to(tl.float32)
            sf = tl.sum(kf * q[None, :], 1)
            if ALIBI:  # each float token's ALiBi bias at its position (FPOS: the candidates' positions)
                fpos = tl.load(FPOS + b * s_valid + offs_f, mask=fm, other=0)
                sf += _alibi_bias(tl.load(SLOPES + h), fpos, ROUND)
            sf = tl.where(ok, sf, -float("inf"))
            top = tl.max(sf, 0)
            pf = tl.exp2(sf - tl.where(top == -float("inf"), 0.0, top))
            num = tl.sum(pf[:, None] * vf, 0)
            total = tl.sum(pf, 0)
        for s0 in range(0, n_split, NS):
            sm = s0 + offs_s < n_split
            m = tl.load(M + b * s_mb + h * s_mh + s0 + offs_s, mask=sm, other=-float("inf"), cache_modifier=".cg")
            den = tl.load(L + b * s_mb + h * s_mh + s0 + offs_s, mask=sm, other=0.0, cache_modifier=".cg")
            acc = tl.load(ACC + b * s_ab + h * s_ah + (s0 + offs_s)[:, None] * s_as + offs_d[None, :],
                          mask=sm[:, None], other=0.0, cache_modifier=".cg")
            new_top = tl.maximum(top, tl.max(m, 0))
            safe = tl.where(new_top == -float("inf"), 0.0, new_top)
            c = tl.exp2(top - safe)  # what is merged so far, moved to the new maximum (0 while nothing is)
            w = tl.exp2(m - safe)
            num = num * c + tl.sum(acc * w[:, None], 0)
            total = total * c + tl.sum(den * w, 0)
            top = new_top
        res = num / total
        if OUT_BF16:
            res = round_to_bf16(res)
        elif OUT_FP16:
            res = res.to(tl.float16).to(tl.float32)
        tl.store(OUT + b * s_ob + h * s_oh + offs_d, res.to(OUT.dtype.element_ty))

    @triton.jit
    def _fields_biased(w, EXP, BITS: tl.constexpr):
        """int32 words ``[..., CWW]`` of packed codes -> float32 ``[..., CWW * 32 / BITS]`` in channel order, each
        ``2**23 + u * 2**e`` exactly: a field is masked where it lies (one LOP3 with the exponent's bits), so only
        the fields above bit 22 need one shared shift; ``e`` is ``_field_exponent``'s (a power of two the caller
        folds into the query / the output). ``EXP`` = 0 (v4): the subnormal ``u * 2**(e - 149)``, one AND."""
        if BITS == 8:
            f0 = (w & 0xFF) | EXP
            f1 = (w & 0xFF00) | EXP
            f2 = ((w >> 8) & 0xFF00) | EXP
            f3 = ((w >> 16) & 0xFF00) | EXP
            u = tl.interleave(tl.interleave(f0, f2), tl.interleave(f1, f3))
        elif BITS == 4:
            h = w >> 12
            f0 = (w & 0xF) | EXP
            f1 = (w & 0xF0) | EXP
            f2 = (w & 0xF00) | EXP
            f3 = (w & 0xF000) | EXP
            f4 = (w & 0xF0000) | EXP
            f5 = (h & 0xF00) | EXP
            f6 = (h & 0xF000) | EXP
            f7 = (h & 0xF0000) | EXP
            u = tl.interleave(tl.interleave(tl.interleave(f0, f4), tl.interleave(f2, f6)),
                              tl.interleave(tl.interleave(f1, f5), tl.interleave(f3, f7)))
        else:
            h = w >> 12
            f0 = (w & 0x3) | EXP
            f1 = (w & 0xC) | EXP
            f2 = (w & 0x30) | EXP
            f3 = (w & 0xC0) | EXP
            f4 = (w & 0x300) | EXP
            f5 = (w & 0xC00) | EXP
            f6 = (w & 0x3000) | EXP
            f7 = (w & 0xC000) | EXP
            f8 = (w & 0x30000) | EXP
            f9 = (w & 0xC0000) | EXP
            f10 = (w & 0x300000) | EXP
            f11 = (h & 0xC00) | EXP
            f12 = (h & 0x3000) | EXP
            f13 = (h & 0xC000) | EXP
            f14 = (h & 0x30000) | EXP
            f15 = (h & 0xC0000) | EXP
            u = tl.interleave(
                tl.interleave(tl.interleave(tl.interleave(f0, f8), tl.interleave(f4, f12)),
                              tl.interleave(tl.interleave(f2, f10), tl.interleave(f6, f14))),
                tl.interleave(tl.interleave(tl.interleave(f1, f9), tl.interleave(f5, f13)),
                              tl.interleave(tl.interleave(f3, f11), tl.interleave(f7, f15))))
        return u.to(tl.float32, bitcast=True)

    @triton.jit
    def _unzip(t):
        """``[..., 2n]`` -> its even and odd elements along the last dim (in-thread: a register split)."""
        return tl.split(tl.reshape(t, t.shape[:-1] + [t.shape[-1] // 2, 2]))

    @triton.jit
    def _fma_fields(kx, qs, zb, acc, EXP, BITS: tl.constexpr):
        """``acc + sum_k (field_k(kx) - zb_k) qs_k`` over the ``32 / BITS`` fields of each int32 word, as one FFMA
        chain per word (``tl.sum`` of a product would reduce as a tree of FMUL/FADD). ``qs``/``zb`` are in channel
        order ``[..., CWW * 32 / BITS]``; their fields are split off in registers (``_parts``)."""
        PERW: tl.constexpr = 32 // BITS
        qk = _parts(qs, PERW)
        zk = _parts(zb, PERW)
        for k in tl.static_range(PERW):
            acc = tl.fma(_field(kx, EXP, k, BITS) - zk[k], qk[k], acc)
        return acc

    @triton.jit
    def _rows(p, N0: tl.constexpr):
        """``[GH, N0, TT]`` -> a tuple of its ``N0`` rows ``[GH, TT]`` (in-thread: register splits), row ``r`` at
        index ``r``."""
        t = tl.permute(p, (0, 2, 1))
        if N0 == 1:
            return (tl.reshape(t, [t.shape[0], t.shape[1]]),)
        elif N0 == 2:
            r0, r1 = tl.split(t)
            return (r0, r1)
        elif N0 == 4:
            a, b = _unzip(t)
            r0, r2 = tl.split(a)
            r1, r3 = tl.split(b)
            return (r0, r1, r2, r3)
        else:
            a, b = _unzip(t)
            aa, ab = _unzip(a)
            ba, bb = _unzip(b)
            r0, r4 = tl.split(aa)
            r2, r6 = tl.split(ab)
            r1, r5 = tl.split(ba)
            r3, r7 = tl.split(bb)
            return (r0, r1, r2, r3, r4, r5, r6, r7)

    @triton.jit
    def _parts(t, PERW: tl.constexpr):
        """Channel-ordered ``[..., CWW * PERW]`` -> the tuple of its ``PERW`` field tiles ``[..., CWW]`` (part ``k``:
        channels ``k mod PERW``, the ``k``-th field of each word), by register splits."""
        e, o = _unzip(t)
        ee, eo = _unzip(e)
        oe, oo = _unzip(o)
        if PERW == 4:
            return (ee, oe, eo, oo)
        elif PERW == 8:
            p0, p4 = _unzip(ee)
            p2, p6 = _unzip(eo)
            p1, p5 = _unzip(oe)
            p3, p7 = _unzip(oo)
            return (p0, p1, p2, p3, p4, p5, p6, p7)
        else:
            eee, eeo = _unzip(ee)
            eoe, eoo = _unzip(eo)
            oee, oeo = _unzip(oe)
            ooe, ooo = _unzip(oo)
            p0, p8 = _unzip(eee)
            p4, p12 = _unzip(eeo)
            p2, p10 = _unzip(eoe)
            p6, p14 = _unzip(eoo)
            p1, p9 = _unzip(oee)
            p5, p13 = _unzip(oeo)
            p3, p11 = _unzip(ooe)
            p7, p15 = _unzip(ooo)
            return (p0, p1, p2, p3, p4, p5, p6, p7, p8, p9, p10, p11, p12, p13, p14, p15)

    @triton.jit
    def _field(w, EXP, K: tl.constexpr, BITS: tl.constexpr):
        """Field ``K`` of int32 words as ``_fields_biased`` makes it: ``2**23 + u * 2**e`` (float32; ``EXP`` = 0:
        ``u * 2**(e - 149)``), one LOP3 (the fields above bit 22 after one shared shift)."""
        if BITS == 8:
            if K == 0:
                x = w & 0xFF
            elif K == 1:
                x = w & 0xFF00
            else:
                x = (w >> (8 * K - 8)) & 0xFF00
        elif K * BITS + BITS <= 23:
            x = w & (((1 << BITS) - 1) << (K * BITS))
        else:
            x = (w >> 12) & (((1 << BITS) - 1) << (K * BITS - 12))
        return (x | EXP).to(tl.float32, bitcast=True)

    @triton.jit
    def _dot_fields(kx, qs, zb, EXP, BITS: tl.constexpr, DEN: tl.constexpr):
        """``sum_k (field_k(kx) - zb_k) qs_k`` over the fields of each int32 word (``_fma_fields`` without an
        accumulator argument): the chain starts with a product, so it keeps the fields' register layout (Triton
        3.6 moves a ``tl.zeros`` accumulator's layout through shared memory, ~0.25 instructions per code).
        ``DEN``: the fields are read as subnormal floats ``u * 2**(e - 149)`` (``EXP`` = 0, one AND) and the zero
        points are left to the caller (``zb`` unused): one LOP3 and one FFMA per code."""
        PERW: tl.constexpr = 32 // BITS
        qk = _parts(qs, PERW)
        if DEN:
            acc = _field(kx, 0, 0, BITS) * qk[0]
            for k in tl.static_range(1, PERW):
                acc = tl.fma(_field(kx, 0, k, BITS), qk[k], acc)
        else:
            zk = _parts(zb, PERW)
            acc = (_field(kx, EXP, 0, BITS) - zk[0]) * qk[0]
            for k in tl.static_range(1, PERW):
                acc = tl.fma(_field(kx, EXP, k, BITS) - zk[k], qk[k], acc)
        return acc

    @triton.jit
    def _field_exponent(chan, BITS: tl.constexpr):
        """``e`` of channel ``chan``'s field in ``_fields_biased`` (int32)."""
        PERW: tl.constexpr = 32 // BITS
        k = chan % PERW
        if BITS == 8:  # fields 2 and 3 shifted down to bits 8..15 (a field at bit 0 would become a bitfield extract)
            e = tl.where(k < 2, k * 8, 8)
        elif BITS == 4:  # fields 0..4 in place, 5..7 shifted by 12 to bits 8..19
            e = tl.where(k < 5, k * 4, k * 4 - 12)
        else:  # fields 0..10 in place, 11..15 shifted by 12 to bits 10..19
            e = tl.where(k < 11, k * 2, k * 2 - 12)
        return e

    @triton.jit(do_not_specialize=["s_ab", "s_ah", "s_as", "s_mb", "s_mh", "exp_bits"])
    def _split_kernel_v2(
        Q, KW, KS, KZ, VW, VS, VZ, LO, HI, ACC, M, L,
        s_qb, s_qh, s_kcb, s_kch, s_ksb, s_ksh, s_vcb, s_vch, s_vsb, s_vsh,
        s_ab, s_ah, s_as, s_mb, s_mh, qk_scale, split, exp_bits,
        HQ: tl.constexpr, GROUPS: tl.constexpr, GH: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr,
        K_BLOCK: tl.constexpr, V_GROUP: tl.constexpr, N0: tl.constexpr, TT: tl.constexpr, CWW: tl.constexpr,
        CV: tl.constexpr, ROWS: tl.constexpr, PDL: tl.constexpr = False,
    ):
        """One (sequence, ``GH`` query heads of one kv head, chunk): see ``decode_attention``'s docstring ("v2").

        Tiles are ``[GH, N0, TT, X, C]`` (head, token row, token thread, channel chunk, channel): a thread owns
        ``C = CWW * 32 / BITS`` channels (``CWW`` int32 words, one vector load per token row) of ``N0`` token rows
        per step; threads along ``TT`` (lanes and warps) take other tokens; ``X`` lanes split the channels. Rows
        and heads are in-thread, so the softmax and the value accumulation of a step never leave the thread;
        only the ``q.k`` sums cross the ``X`` lanes. Per code: one LOP3 (``_fields_biased``), one FADD that
        removes the 2**23 bias and (keys) the zero point, one FFMA. Per key block, once: the query times the
        block's scales and the biased zeros. ``PDL``: as ``_split_kernel_v3``'s."""
        pdl_prologue(PDL)
        pid_h = tl.program_id(0)
        pid_s = tl.program_id(1)
        NHB: tl.constexpr = HQ // GH
        b = pid_h // NHB
        h0 = (pid_h % NHB) * GH
        kvh = h0 // GROUPS
        PERW: tl.constexpr = 32 // BITS
        C: tl.constexpr = CWW * PERW
        DW: tl.constexpr = D // PERW  # int32 words of one token row
        X: tl.constexpr = DW // CWW
        STEP: tl.constexpr = N0 * TT
        SUB: tl.constexpr = K_BLOCK // STEP
        g_i = tl.arange(0, GH)[:, None, None, None, None]
        n_i = tl.arange(0, N0)[None, :, None, None, None]
        t_i = tl.arange(0, TT)[None, None, :, None, None]
        x_i = tl.arange(0, X)[None, None, None, :, None]
        chan = x_i * C + tl.arange(0, C)[None, None, None, None, :]  # [1, 1, 1, X, C]
        chan_t = chan + 0 * t_i  # [1, 1, TT, X, C]: loaded per thread in the codes' layout
        word = x_i * CWW + tl.arange(0, CWW)[None, None, None, None, :]  # [1, 1, 1, X, CWW]
        if CV == 1:  # a chunk lies in one value group: one scale/zero per (token, chunk)
            vgrp = (x_i * C) // V_GROUP + 0 * t_i  # [1, 1, TT, X, 1]
        else:  # groups narrower than a chunk (tiny head dims): one per channel
            vgrp = chan_t // V_GROUP
        NG: tl.constexpr = D // V_GROUP  # value groups per token row
        k_off = (n_i * TT + t_i) * DW + word  # [1, N0, TT, X, CWW]: a step's code words
        kr_off = t_i * DW + word  # [1, 1, TT, X, CWW]: one row's
        g_off = (n_i * TT + t_i) * NG + vgrp  # a step's value scales / zeros
        gr_off = t_i * NG + vgrp
        e = _field_exponent(chan_t, BITS)
        inv_e = ((127 - e) << 23).to(tl.float32, bitcast=True)  # 2**-e
        lo = tl.load(LO + b)
        hi = tl.load(HI + b)
        start = (tl.maximum(pid_s * split, lo) // K_BLOCK) * K_BLOCK
        end = tl.minimum(pid_s * split + split, hi)
        kw_base = KW + b * s_kcb + kvh * s_kch
        vw_base = VW + b * s_vcb + kvh * s_vch
        ks_base = KS + b * s_ksb + kvh * s_ksh
        kz_base = KZ + b * s_ksb + kvh * s_ksh
        vs_base = VS + b * s_vsb + kvh * s_vsh
        vz_base = VZ + b * s_vsb + kvh * s_vsh
        # [GH, 1, TT, X, C]: the heads' queries, pre-divided by each field's 2**e
        q = tl.load(Q + b * s_qb + (h0 + g_i) * s_qh + chan_t).to(tl.float32) * (qk_scale * inv_e)
        m_i = tl.full([GH, 1, TT, 1, 1], -float("inf"), dtype=tl.float32)
        l_i = tl.zeros([GH, 1, TT, 1, 1], dtype=tl.float32)
        acc = tl.zeros([GH, 1, TT, X, C], dtype=tl.float32)  # sum_t p_t s_t u_t 2**e
        accz = tl.zeros([GH, 1, TT, X, CV], dtype=tl.float32)  # sum_t p_t s_t z_t
        for n0 in range(start, end, K_BLOCK):
            kb = (n0 // K_BLOCK) * D + chan_t
            qs = q * tl.load(ks_base + kb).to(tl.float32)  # [GH, 1, TT, X, C]
            zb = ((tl.load(kz_base + kb).to(tl.int32) << e) | 0x4B000000).to(tl.float32, bitcast=True)
            for j in tl.static_range(SUB):
                tok = n0 + j * STEP + n_i * TT + t_i  # [1, N0, TT, 1, 1]
                valid = (tok >= lo) & (tok < end)
                t0 = n0 + j * STEP  # the step's first token: a scalar offset of loop-invariant tiles
                kx = tl.load(kw_base + t0 * DW + k_off, mask=valid, other=0)
                if not ROWS:
                    vx = tl.load(vw_base + t0 * DW + k_off, mask=valid, other=0)
                    vs = tl.load(vs_base + t0 * NG + g_off, mask=valid, other=0.0).to(tl.float32)
                    vz = tl.load(vz_base + t0 * NG + g_off, mask=valid, other=0).to(tl.float32)
                # [GH, N0, TT, X, CWW]: sum over each word's fields of (u - z) 2**e qs, then over words and lanes
                ks_part = _fma_fields(kx, qs, zb, tl.zeros([GH, N0, TT, X, CWW], dtype=tl.float32), exp_bits, BITS)
                s = tl.sum(tl.sum(ks_part, 4, keep_dims=True), 3, keep_dims=True)  # [GH, N0, TT, 1, 1]
                s = tl.where(valid, s, -float("inf"))
                m_new = tl.maximum(m_i, tl.max(s, 1, keep_dims=True))
                m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
                alpha = tl.exp2(m_i - m_safe)
                p = tl.exp2(s - m_safe)  # [GH, N0, TT, 1, 1]
                l_i = l_i * alpha + tl.sum(p, 1, keep_dims=True)
                m_i = m_new
                if ROWS:  # one FFMA chain per channel over the rows (tl.sum would reduce them as a tree)
                    acc = acc * alpha
                    accz = accz * alpha
                    ps = _rows(tl.reshape(p, [GH, N0, TT]), N0)
                    for r in tl.static_range(N0):
                        rt = n0 + j * STEP + r * TT + t_i  # [1, 1, TT, 1, 1]
                        rv = (rt >= lo) & (rt < end)
                        tr = t0 + r * TT
                        vx_r = tl.load(vw_base + tr * DW + kr_off, mask=rv, other=0)
                        vs_r = tl.load(vs_base + tr * NG + gr_off, mask=rv, other=0.0).to(tl.float32)
                        vz_r = tl.load(vz_base + tr * NG + gr_off, mask=rv, other=0).to(tl.float32)
                        pv_r = tl.reshape(ps[r], [GH, 1, TT, 1, 1]) * vs_r  # [GH, 1, TT, X, 1]
                        acc = tl.fma(pv_r, _fields_biased(vx_r, exp_bits, BITS) - 8388608.0, acc)
                        accz = tl.fma(pv_r, vz_r, accz)
                else:
                    pv = p * vs  # [GH, N0, TT, X, 1]
                    vf = _fields_biased(vx, exp_bits, BITS) - 8388608.0  # u 2**e
                    acc = acc * alpha + tl.sum(pv * vf, 1, keep_dims=True)
                    accz = accz * alpha + tl.sum(pv * vz, 1, keep_dims=True)
        # the rows' own softmaxes (one per token thread) merged; the fields' 2**e and the zero points applied
        m_top = tl.max(m_i, 2, keep_dims=True)  # [GH, 1, 1, 1, 1]
        m_top = tl.where(m_top == -float("inf"), 0.0, m_top)
        c = tl.exp2(m_i - m_top)
        out = tl.sum(tl.reshape((acc * inv_e - accz) * c, [GH, TT, X, C]), 1)  # [GH, X, C]
        den = tl.sum(tl.reshape(l_i * c, [GH, TT]), 1)  # [GH]
        mx = tl.max(tl.reshape(m_i, [GH, TT]), 1)
        hh = h0 + tl.arange(0, GH)
        a_ptr = ACC + b * s_ab + pid_s * s_as + hh[:, None, None] * s_ah \
            + tl.arange(0, X)[None, :, None] * C + tl.arange(0, C)[None, None, :]
        tl.store(a_ptr, out)
        tl.store(M + b * s_mb + hh * s_mh + pid_s, mx)
        tl.store(L + b * s_mb + hh * s_mh + pid_s, den)

    @triton.jit
    def _v3_block(n0, lo, end, q, m_i, l_i, acc, accz, kw_rows, vw_rows, ks_chan, kz_chan, vs_rows, vz_rows,
                  t_i, e, exp_bits, slope, D: tl.constexpr, BITS: tl.constexpr, K_BLOCK: tl.constexpr,
                  DW: tl.constexpr, NG: tl.constexpr, N0: tl.constexpr, TT: tl.constexpr, DEN: tl.constexpr,
                  MASKED: tl.constexpr, ALIBI: tl.constexpr, ROUND: tl.constexpr, RAW: tl.constexpr = False,
                  WB: tl.constexpr = 1):
        """One key block of ``_split_kernel_v3``: the running ``(m_i, l_i, acc, accz)`` after its tokens.
        ``MASKED`` = False for a block wholly inside ``[lo, end)`` (every block of a chunk but its first and last):
        no token masks and no ``-inf`` scores. The pointer tiles (``*_rows``: token 0's codes / value scales of
        each thread, ``*_chan``: block 0's key scales) move once per block; each row is a constant offset from
        there (an immediate in the load, not a 64-bit address computed per row).

        ``RAW`` (``DEN`` without ALiBi; ``raw_scores``): a row's score stays in the codes' units (``q s u 2**-49``,
        zero points not taken off) through the block's maximum, and the zero-point dot and the 2**49 enter once per
        block, through the exponent's offset (``p = exp2(raw * 2**49 - off)``): one FFMA per row where the scaled
        form takes an FADD, an FMUL and an FFMA. The value zero points are read as the subnormals ``z * 2**-149``
        their bytes make (no int-to-float conversion per row; ``accz`` then holds ``p s z 2**-49``).

        ``WB`` > 1 (``warp_blocks``): a step of ``WB`` key blocks, each warp's token threads on a block of their own
        (``t_i``: each thread's first token in the step; ``*_chan`` point at the thread's block), so a thread's
        per-block work (scaled query, zero-point dot) covers ``K_BLOCK / (TT / WB)`` rows, as on one warp. A masked
        step's key scales are read only by threads with a token before ``end`` (the last block may lie past the
        cache)."""
        TPL: tl.constexpr = TT // WB  # token threads on one key block
        STEP: tl.constexpr = N0 * TPL
        SUB: tl.constexpr = K_BLOCK // STEP
        kb = (n0 // K_BLOCK) * D
        if WB > 1 and MASKED:
            blk_ok = n0 + t_i < end  # [1, TT, 1, 1]: the thread's rows are all at or after its first token
            qs = q * tl.load(ks_chan + kb, mask=blk_ok, other=0.0).to(tl.float32)
        else:
            qs = q * tl.load(ks_chan + kb).to(tl.float32)
        kw_blk = kw_rows + n0 * DW
        vw_blk = vw_rows + n0 * DW
        vs_blk = vs_rows + n0 * NG
        vz_blk = vz_rows + n0 * NG
        if DEN:  # the block's zero points, sum_c q s z 2**-49, taken off every row's score
            if WB > 1 and MASKED:
                zd = (tl.load(kz_chan + kb, mask=blk_ok, other=0).to(tl.int32) << e).to(tl.float32, bitcast=True)
            else:
                zd = (tl.load(kz_chan + kb).to(tl.int32) << e).to(tl.float32, bitcast=True)
            zdot = tl.sum(tl.sum(qs * zd, 3, keep_dims=True), 0, keep_dims=True)  # [1, TT, GH, 1]
            zb = zd  # not read by _dot_fields under DEN
        else:
            zb = ((tl.load(kz_chan + kb).to(tl.int32) << e) | 0x4B000000).to(tl.float32, bitcast=True)
        for j in tl.static_range(SUB):
            t0 = n0 + j * STEP
            ok = ()
            sc = ()
            for r in tl.static_range(N0):
                if MASKED:
                    tok = t0 + r * TPL + t_i  # [1, TT, 1, 1]
                    valid = (tok >= lo) & (tok < end)
                    kx = tl.load(kw_blk + (j * STEP + r * TPL) * DW, mask=valid, other=0)
                else:
                    kx = tl.load(kw_blk + (j * STEP + r * TPL) * DW)
                part = _dot_fields(kx, qs, zb, exp_bits, BITS, DEN)  # [X, TT, GH, CWW]
                s_r = tl.sum(tl.sum(part, 3, keep_dims=True), 0, keep_dims=True)  # [1, TT, GH, 1]
                if DEN and not RAW:
                    s_r = (s_r - zdot) * 562949953421312.0  # 2**49
                if ALIBI:  # slot n holds position n
                    s_r += _alibi_bias(slope, t0 + r * TPL + t_i, ROUND)
                if MASKED:
                    ok = ok + (valid,)
                    sc = sc + (tl.where(valid, s_r, -float("inf")),)
                else:
                    sc = sc + (s_r,)
            m_blk = sc[0]
            for r in tl.static_range(1, N0):
                m_blk = tl.maximum(m_blk, sc[r])
            if RAW:  # the raw maximum in the scores' units (a block of masked tokens: -inf stays -inf)
                m_blk = (m_blk - zdot) * 562949953421312.0
            m_new = tl.maximum(m_i, m_blk)
            if MASKED:  # a block of masked tokens only leaves the maximum at -inf
                m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
            else:
                m_safe = m_new
            alpha = tl.exp2(m_i - m_safe)
            acc = acc * alpha
            accz = accz * alpha
            l_i = l_i * alpha
            m_i = m_new
            if RAW:
                off = zdot * 562949953421312.0 + m_safe  # [1, TT, GH, 1]: exp2's offset of a raw score
            for r in tl.static_range(N0):
                if RAW:
                    p = tl.exp2(tl.fma(sc[r], 562949953421312.0, -off))
                else:
                    p = tl.exp2(sc[r] - m_safe)  # [1, TT, GH, 1]
                l_i += p
                if MASKED:
                    vx = tl.load(vw_blk + (j * STEP + r * TPL) * DW, mask=ok[r], other=0)
                    vs = tl.load(vs_blk + (j * STEP + r * TPL) * NG, mask=ok[r], other=0.0).to(tl.float32)
                    vz = tl.load(vz_blk + (j * STEP + r * TPL) * NG, mask=ok[r], other=0)
                else:
                    vx = tl.load(vw_blk + (j * STEP + r * TPL) * DW)
                    vs = tl.load(vs_blk + (j * STEP + r * TPL) * NG).to(tl.float32)
                    vz = tl.load(vz_blk + (j * STEP + r * TPL) * NG)
                if RAW:  # z * 2**-149, exact
                    vz = vz.to(tl.int32).to(tl.float32, bitcast=True)
                else:
                    vz = vz.to(tl.float32)
                if DEN:
                    pv = p * (vs * 1.2676506002282294e30)  # 2**100
                    acc = tl.fma(pv, _fields_biased(vx, 0, BITS), acc)
                else:
                    pv = p * vs  # [X, TT, GH, 1]
                    acc = tl.fma(pv, _fields_biased(vx, exp_bits, BITS) - 8388608.0, acc)
                accz = tl.fma(pv, vz, accz)
        return m_i, l_i, acc, accz

    @triton.jit(do_not_specialize=["s_ab", "s_ah", "s_as", "s_mb", "s_mh", "exp_bits"])
    def _split_kernel_v3(
        Q, KW, KS, KZ, VW, VS, VZ, LO, HI, ACC, M, L,
        s_qb, s_qh, s_kcb, s_kch, s_ksb, s_ksh, s_vcb, s_vch, s_vsb, s_vsh,
        s_ab, s_ah, s_as, s_mb, s_mh, qk_scale, split, exp_bits,
        HQ: tl.constexpr, GROUPS: tl.constexpr, GH: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr,
        K_BLOCK: tl.constexpr, V_GROUP: tl.constexpr, N0: tl.constexpr, TT: tl.constexpr, CWW: tl.constexpr,
        CV: tl.constexpr, DEN: tl.constexpr, INTERIOR: tl.constexpr, SLOPES, ALIBI: tl.constexpr,
        ROUND: tl.constexpr, RAW: tl.constexpr, WB: tl.constexpr,
        CNT, OUT, KF, VF, FV, FPOS, s_fb, s_fh, s_fs, s_vb, s_vh, s_vs, s_valid, s_ob, s_oh, n_float,
        MERGE: tl.constexpr, NS: tl.constexpr, F: tl.constexpr, HAS_FLOAT: tl.constexpr,
        FLOAT_ALIBI: tl.constexpr, OUT_BF16: tl.constexpr, OUT_FP16: tl.constexpr, PDL: tl.constexpr = False,
    ):
        """``_split_kernel_v2``'s arithmetic on ``[X, TT, GH, C]`` tiles (channel chunk, token thread, head,
        channel) without a token-row dim: each of a step's ``N0`` rows is loaded and scored as its own tile (the
        rows' scores are a tuple), so Triton's layouts keep the lanes on (channel chunk, token thread) and the
        heads and channels in-thread.

        Why: Triton 3.6 (the H200's) lays v2's ``[GH, N0, TT, X, CWW]`` code load out with the lanes on the rows
        (a whole token row per thread), so v2 holds all 128 scaled query channels per thread (164 registers at
        int4) and moves them through shared memory every key block (66 LDS per step). The ``q.k`` chain starts
        with a product (``_dot_fields``), so there is no zero tile whose layout must be converted.

        ``DEN`` (variant v4): a field masked in place and read as a float is the subnormal ``u * 2**(e - 149)``,
        exact, and FFMA takes subnormal operands at full rate (Triton emits ``fma.rn.f32``, no ``.ftz``). So a
        code costs one LOP3 and one FFMA: keys against the query scaled by ``2**(100 - e)`` (products
        ``q s u 2**-49``, normal for ``|q s|`` in ~[1e-20, 1e8]), the zero points as one per-block dot
        ``sum_c q s z`` subtracted from each row's score; values times ``p * scale * 2**100`` (products
        ``p s u 2**(e - 49)``), the 2**-e, 2**49 and 2**100 removed after the loop.

        ``PDL`` (``pdl_launches``): let the merge (``_reduce_kernel``) launch, then wait before any load: q, the
        bounds and the cache rows (the step's new key block and value row) are the step's earlier kernels'.

        ``MERGE`` (``merge_in_split``): no ``_reduce_kernel`` launch. Each program, its partials stored, counts itself
        done on its (sequence, head group)'s counter ``CNT[pid_h]``; the last of the chunks runs ``_merge_head`` for
        the group's ``GH`` heads (the float tokens ``KF``/``VF``/``FV`` at ``FPOS``, ``FLOAT_ALIBI``, ``OUT_BF16`` /
        ``OUT_FP16``: ``_reduce_kernel``'s arguments) and sets the counter back to zero, so the next launch (a CUDA
        graph's replay) needs no memset."""
        tl.static_assert(not RAW or (DEN and not ALIBI), "raw scores are v4's (DEN) without ALiBi")
        pdl_prologue(PDL)
        pid_h = tl.program_id(0)
        pid_s = tl.program_id(1)
        NHB: tl.constexpr = HQ // GH
        b = pid_h // NHB
        h0 = (pid_h % NHB) * GH
        kvh = h0 // GROUPS
        PERW: tl.constexpr = 32 // BITS
        C: tl.constexpr = CWW * PERW
        DW: tl.constexpr = D // PERW
        X: tl.constexpr = DW // CWW
        NG: tl.constexpr = D // V_GROUP
        x_i = tl.arange(0, X)[:, None, None, None]
        t_i = tl.arange(0, TT)[None, :, None, None]
        g_i = tl.arange(0, GH)[None, None, :, None]
        chan_t = x_i * C + tl.arange(0, C)[None, None, None, :] + 0 * t_i  # [X, TT, 1, C]
        if WB > 1:  # warp_blocks: token thread t reads key block t // TPL of a step, rows t % TPL + TPL * r
            TPL: tl.constexpr = TT // WB
            t_i = (t_i // TPL) * K_BLOCK + t_i % TPL  # [1, TT, 1, 1]: each thread's first token in a step
            blk_chan = chan_t + (t_i // K_BLOCK) * D  # the key-scale row of the thread's block
        else:
            blk_chan = chan_t
        r_off = t_i * DW + x_i * CWW + tl.arange(0, CWW)[None, None, None, :]  # [X, TT, 1, CWW]: a row's words
        if CV == 1:  # a chunk lies in one value group: one scale/zero per (token, chunk)
            g_off = t_i * NG + (x_i * C) // V_GROUP  # [X, TT, 1, 1]
        else:
            g_off = t_i * NG + chan_t // V_GROUP
        e = _field_exponent(chan_t, BITS)
        if DEN:
            q_e = ((227 - e) << 23).to(tl.float32, bitcast=True)  # 2**(100 - e)
            out_e = ((176 - e) << 23).to(tl.float32, bitcast=True)  # 2**(49 - e)
        else:
            q_e = ((127 - e) << 23).to(tl.float32, bitcast=True)  # 2**-e
            out_e = q_e
        lo = tl.load(LO + b)
        hi = tl.load(HI + b)
        start = (tl.maximum(pid_s * split, lo) // K_BLOCK) * K_BLOCK
        end = tl.minimum(pid_s * split + split, hi)
        kw_base = KW + b * s_kcb + kvh * s_kch
        vw_base = VW + b * s_vcb + kvh * s_vch
        ks_base = KS + b * s_ksb + kvh * s_ksh
        kz_base = KZ + b * s_ksb + kvh * s_ksh
        vs_base = VS + b * s_vsb + kvh * s_vsh
        vz_base = VZ + b * s_vsb + kvh * s_vsh
        kw_rows = kw_base + r_off  # [X, TT, 1, CWW]: token 0's words of each thread
        vw_rows = vw_base + r_off
        ks_chan = ks_base + blk_chan
        kz_chan = kz_base + blk_chan
        vs_rows = vs_base + g_off
        vz_rows = vz_base + g_off
        q = tl.load(Q + b * s_qb + (h0 + g_i) * s_qh + chan_t).to(tl.float32) * (qk_scale * q_e)  # [X, TT, GH, C]
        if ALIBI:
            slope = tl.load(SLOPES + h0 + g_i)  # [1, 1, GH, 1]
        else:
            slope = 0.0
        m_i = tl.full([1, TT, GH, 1], -float("inf"), dtype=tl.float32)
        l_i = tl.zeros([1, TT, GH, 1], dtype=tl.float32)
        acc = tl.zeros([X, TT, GH, C], dtype=tl.float32)  # sum_t p_t s_t u_t 2**e (DEN: 2**(e - 49))
        accz = tl.zeros([X, TT, GH, CV], dtype=tl.float32)  # sum_t p_t s_t z_t (DEN: times 2**100)
        if INTERIOR:  # the steps wholly inside [lo, end) in a loop of their own, without token masks
            if WB > 1:  # steps of WB key blocks from start (a multiple of K_BLOCK only)
                mid0 = tl.minimum(start + tl.cdiv(tl.maximum(lo - start, 0), WB * K_BLOCK) * WB * K_BLOCK, end)
                mid1 = tl.maximum(mid0, mid0 + ((end - mid0) // (WB * K_BLOCK)) * WB * K_BLOCK)
            else:
                mid0 = tl.minimum(tl.maximum(start, tl.cdiv(lo, K_BLOCK) * K_BLOCK), end)
                mid1 = tl.maximum(mid0, (end // K_BLOCK) * K_BLOCK)
            for n0 in range(start, mid0, WB * K_BLOCK):
                m_i, l_i, acc, accz = _v3_block(
                    n0, lo, end, q, m_i, l_i, acc, accz, kw_rows, vw_rows, ks_chan, kz_chan, vs_rows, vz_rows,
                    t_i, e, exp_bits, slope, D=D, BITS=BITS, K_BLOCK=K_BLOCK, DW=DW, NG=NG, N0=N0, TT=TT,
                    DEN=DEN, MASKED=True, ALIBI=ALIBI, ROUND=ROUND, RAW=RAW, WB=WB)
            for n0 in range(mid0, mid1, WB * K_BLOCK):
                m_i, l_i, acc, accz = _v3_block(
                    n0, lo, end, q, m_i, l_i, acc, accz, kw_rows, vw_rows, ks_chan, kz_chan, vs_rows, vz_rows,
                    t_i, e, exp_bits, slope, D=D, BITS=BITS, K_BLOCK=K_BLOCK, DW=DW, NG=NG, N0=N0, TT=TT,
                    DEN=DEN, MASKED=False, ALIBI=ALIBI, ROUND=ROUND, RAW=RAW, WB=WB)
            for n0 in range(mid1, end, WB * K_BLOCK):
                m_i, l_i, acc, accz = _v3_block(
                    n0, lo, end, q, m_i, l_i, acc, accz, kw_rows, vw_rows, ks_chan, kz_chan, vs_rows, vz_rows,
                    t_i, e, exp_bits, slope, D=D, BITS=BITS, K_BLOCK=K_BLOCK, DW=DW, NG=NG, N0=N0, TT=TT,
                    DEN=DEN, MASKED=True, ALIBI=ALIBI, ROUND=ROUND, RAW=RAW, WB=WB)
        else:
            for n0 in range(start, end, WB * K_BLOCK):
                m_i, l_i, acc, accz = _v3_block(
                    n0, lo, end, q, m_i, l_i, acc, accz, kw_rows, vw_rows, ks_chan, kz_chan, vs_rows, vz_rows,
                    t_i, e, exp_bits, slope, D=D, BITS=BITS, K_BLOCK=K_BLOCK, DW=DW, NG=NG, N0=N0, TT=TT,
                    DEN=DEN, MASKED=True, ALIBI=ALIBI, ROUND=ROUND, RAW=RAW, WB=WB)
        # the token threads' softmaxes merged; the fields' 2**e and the zero points applied
        m_top = tl.max(m_i, 1, keep_dims=True)  # [1, 1, GH, 1]
        m_top = tl.where(m_top == -float("inf"), 0.0, m_top)
        c = tl.exp2(m_i - m_top)
        if RAW:
            out = tl.sum((acc * out_e - accz * 562949953421312.0) * c, 1)  # [X, GH, C]; 2**49
        elif DEN:
            out = tl.sum((acc * out_e - accz * 7.888609052210118e-31) * c, 1)  # [X, GH, C]; 2**-100
        else:
            out = tl.sum((acc * out_e - accz) * c, 1)  # [X, GH, C]
        den = tl.sum(tl.reshape(l_i * c, [TT, GH]), 0)  # [GH]
        mx = tl.max(tl.reshape(m_i, [TT, GH]), 0)
        hh = h0 + tl.arange(0, GH)
        a_ptr = ACC + b * s_ab + pid_s * s_as + hh[None, :, None] * s_ah \
            + tl.arange(0, X)[:, None, None] * C + tl.arange(0, C)[None, None, :]
        tl.store(a_ptr, out)
        tl.store(M + b * s_mb + hh * s_mh + pid_s, mx)
        tl.store(L + b * s_mb + hh * s_mh + pid_s, den)
        if MERGE:
            tl.debug_barrier()  # every thread's partials stored before the count (acq_rel: visible GPU-wide with it)
            if tl.atomic_add(CNT + pid_h, 1, sem="acq_rel") == tl.num_programs(1) - 1:
                for g in tl.static_range(GH):
                    _merge_head(b, h0 + g, Q, ACC, M, L, KF, VF, FV, OUT, SLOPES, FPOS, s_qb, s_qh, s_ab, s_ah, s_as,
                                s_mb, s_mh, s_fb, s_fh, s_fs, s_vb, s_vh, s_vs, s_valid, s_ob, s_oh, qk_scale,
                                tl.num_programs(1), n_float, GROUPS, D, NS, F, HAS_FLOAT, FLOAT_ALIBI, ROUND,
                                OUT_BF16, OUT_FP16)
                tl.atomic_xchg(CNT + pid_h, 0)


LOG2E = 1.4426950408889634


VARIANT_CONFIGS = {
    "v1": {"num_warps": 4, "split": None, "block_n": 32, "num_stages": None, "chunk": 16},
    "v2": {"num_warps": 1, "split": None, "block_n": 32, "num_stages": None, "chunk": 16, "heads": None,
           "vchain": True},
    "v3": {"num_warps": 1, "split": None, "block_n": 32, "num_stages": None, "chunk": 16, "heads": None,
           "interior": True},
    "v4": {"num_warps": 1, "split": None, "block_n": 32, "num_stages": None, "chunk": 16, "heads": None,
           "interior": True},
}
"""Each variant's launch when the caller names the variant but not the option. v1: 4 warps, 32-token steps, 16
channels per thread chunk (the previous session's fastest on the H200 for int4 and int2 with float16 scales:
1804 / 1770 us against 1970 for 16-token steps of 8 channels). v2: one warp per program, a whole 32-token key
block per step (8 rows per thread at head dim 128 int4), 16 channels per thread, all the query heads of a kv head
in one program up to 4 (``heads``). v3, v4: v2's launch."""

DEFAULT_CONFIG = {"variant": "v4", **VARIANT_CONFIGS["v4"]}
"""``decode_attention``'s launch when the caller gives none (the Triton backend's decode step): v4 with unmasked
interior blocks (session 24, ``V4_INT2_GQA_INTERIOR``'s note), from the H200 run of session 14
(``tools/bench_attention.py --sweep s14``, batch 16, 32K tokens, float16 scales, bench/results/attention.json): MHA
(32/32 heads) int4 828.8 us = 2.25x bf16 SDPA's 1862.7 (v2: 1136.4, 1.64x), int2 1098.6 (v2 1364.0; on 2 warps,
``V4_INT2_MHA_WARPS``, 869.3 = 2.14x); GQA (32/8) int4 572.7 (v2 1413.8; SDPA 525.3), int2 575.3 (v3 537.9, v2
783.8). Max error against the reference 7e-8 (the subnormal codes are not flushed on the H200). v2, before it: why v2
was chosen then, from the H200 round (bench/results/attention_round1.json, batch 16 x 32 heads x 32K tokens, Triton
3.6) and offline sm_90 compiles with Triton 3.6 (the GPU's) of each kernel: v1 as measured then (16-token steps,
8-channel chunks) compiles to 12.2 SASS instructions per code and ran 1977 us at int4 (1804 us last session with
32-token steps and 16-channel chunks: 10.1 per code); v2 as measured then compiled to 9.1 per code with 255 registers
under Triton 3.6 (5.2 under 3.8) and ran 2477 us, and its 4-head GQA form to ~49 per code (24 ms). This v2 compiles
under 3.6 to 5.2 per code with 164 registers (MHA int4; int2 5.8, int8 5.6) and, with 4 GQA heads per program, to 2.9
per code and head; at round 1's issue rates (2.5-3.2 instructions per SM-cycle for v1, 1.9 for v2 at 255 registers)
that is ~0.9-1.4 ms at int4. The final sweep times v1 beside it.

Session 5 (``tools/sass_attention.py``, Triton 3.6): that 4-head GQA form holds 255 registers and spills in its
loop, 992 bytes per thread at int4 (320 at int2, 1360 at int8: the order of the measured 32 q / 8 kv times,
1411 / 783 / 2489 us). A tensor-core kernel for grouped heads (whole GQA group per program, no spills offline at
4.3 instructions per code) was written in session 5 and removed in session 6: on the H200 it returned NaN for
every launch of 4 key blocks per step, with or without its inline PTX, at 4 or 8 warps, while the interpreter
agreed with the reference; its source is in the git history (commit 0b1f8ca, lowbit/kernels/decode_attention_tc.py)."""

V4_INT2_MHA_WARPS = 2
"""v4's warps for an int2 cache without GQA (one query head per kv head) when a program reads at least
``V4_INT2_MHA_MIN_BLOCKS`` and fewer than ``V4_INT2_MHA_ONE_WARP_BLOCKS`` key blocks. Session 14's reason, since
overturned at its own shape by the later kernels: 869.3 us against 1098.6 on one warp (H200, batch 16 x 32 heads x
32K); int4 and GQA int2 stay on one warp (828.8 vs 837.6; GQA int2 575.3 vs 614.8)."""

V4_INT2_MHA_MIN_BLOCKS = 4
"""Below this many key blocks per program (short contexts at small batch: the split then makes one-block chunks)
int2 without GQA runs on one warp. Session 23, H200, CUDA graphs (``--sweep s23w``): 1 x 32 heads x 4K (1 block a
program) 18.4 us on one warp against 27.1 on two; 1 x 32K (8 blocks) 87.6 against 74.1; 16 x 4K (16 blocks) 166.6
against 131.0."""

V4_INT2_MHA_ONE_WARP_BLOCKS = 32
"""From this many key blocks per program int2 without GQA is back on one warp (the long chunks of a big grid, batch
16 x 32K: 32 blocks): with today's v4 kernel one warp's fewer instructions per code beat two warps there on both
GPUs - H100, session 48 (``--sweep s48``): 666.9 us against 760.7; H200, session 51: 593.8 against 704.2 (2.71x ->
3.21x bf16 SDPA's 1905.7; with ``raw_scores`` 578.6, 3.29x). The 4-31 block chunks keep ``V4_INT2_MHA_WARPS``
(session 23's batch-1 32K and 16 x 4K rows, before the session-24 and -48 kernels; not re-timed)."""

V4_INT2_GQA_INTERIOR = False
"""v4's ``interior`` for an int2 cache with several query heads per program: every key block through the masked path.
Session 24, H200 (``tools/bench_attention.py --sweep s24``, one run): batch 16 x 32 q / 8 kv heads x 32K, 469.4 us
against 526.9 with interior blocks unmasked (CUDA graphs at batch 1: 37.2 against 39.9 us); int4 GQA and every MHA
cache gain from them (16 x 32 heads x 32K int4 708.9 against 742.0 masked and 797.4 for session 23's kernel; int2
704.3 against 761.3 and 839.5; 16 x 32/8 int4 510.1 against 533.4 and 568.0)."""

V4_RAW_SCORES = False
"""v4's ``raw_scores`` when the launch names none (``_v3_block``'s ``RAW``; never under ALiBi, whose bias is in the
scores' real units). Session 48, offline sm_90 (Triton 3.6, ``tools/sass_attention.py``, interior loop, SASS
instructions per code): MHA int4 3.31 -> 3.25 (128 -> 101 registers), int2 3.23 -> 3.16, int2 on 2 warps with
``warp_blocks`` 3.24 -> 3.15; off until a GPU run (``tools/bench_attention.py --sweep s48``) times it: the int4 and
int8 launches compile as before."""

V4_WARP_BLOCKS = False
"""v4's ``warp_blocks`` when the launch names none; it changes only launches on several warps (int2 without GQA
once a chunk holds ``V4_INT2_MHA_MIN_BLOCKS`` key blocks: ``V4_INT2_MHA_WARPS``). On 2 warps each warp's 4 token
lanes took 4 rows of every 32-token block, so the per-block work (key scales times the query, the zero-point dot)
was done by twice the threads, each for half the rows: offline sm_90 (Triton 3.6), int2 interior loop 3.75 SASS
instructions per code -> 3.24 with each warp on a block of its own (1 warp: 3.23). Off until a GPU times it
(``tools/bench_attention.py --sweep s48`` puts it beside the default): on the H200, 2 warps beat 1 warp's fewer
instructions (sessions 14 and 23), so the count alone does not decide the launch; on an H100 (session 48, batch 16
x 32 heads x 32K int2) 1 warp took 666.9 us against 2 warps' 760.7, with raw scores 659.1 (4.21x SDPA)."""

PROGRAMS_PER_SM = 16
"""``_default_split``'s target: the grid has at least this many programs per SM (of 132 on an H200) when the
context allows."""


SPLIT_START = 1024
"""``_default_split``'s longest chunk. Session 19, H200 (``tools/bench_attention.py --sweep s19``, batch 16 x 32 heads
x 32K, v4, float16 scales, one run): 1024-token chunks 795.0 us int4 / 852.3 int2 against 828.6 / 869.7 at 2048
(the default until then), 4096 and 8192 slower, 512 796.8 / 869.1, 256 807.5 / 916.1. Grids with fewer programs
(batch 1, GQA) were already halved to 1024 or below by the target."""


REDUCE_CHUNKS = 128
"""Chunks ``_reduce_kernel`` merges per step (a ``[128, head_dim]`` float32 tile), and the most chunks per head
``_default_split`` makes (so one step merges them all). Session 23, H200, CUDA graphs of 20 calls, int4 cache,
float16 scales (``tools/bench_attention.py --graph --sweep s23``, bench/results/attention.json): the merge loaded
every chunk at once before, and at batch 1 x 32 q / 8 kv heads x 32K the split made 512 chunks of 64 tokens a head:
104.6 us against bf16 SDPA's 37.7, most of it the ``[512, 128]`` merge; merging 128 chunks a step took it to 56.9,
and 256-token chunks (128 a head) to 45.8 (1 x 32/32 heads x 32K: 67.5, unchanged; 1 x 32/8 x 4K and 8K, 16 x 32/8
x 4K: within 5%). Steps of 32 or 64 chunks, or 8 warps, were slower at every shape tried."""

REDUCE_WARPS = 4
"""``_reduce_kernel``'s warps (8 was 1-7% slower at the session-23 shapes)."""

MERGE_STEP_FLOATS = 64
"""The split kernel's own merge (``merge_in_split``) takes ``_merge_head``'s chunks a step so that the step's
``[chunks, head_dim]`` float32 tile is at most this many registers a thread on the split's one or two warps
(``REDUCE_CHUNKS``' 128 x 128 on one warp would be 512, spilled); SmolLM2's 64-dim heads merge 32 chunks a step,
its ~19 a head at a 512-token context in one, as ``_reduce_kernel`` does."""


def _merge_chunks(d: int, num_warps: int) -> int:
    """Chunks a step of the split kernel's own merge (``MERGE_STEP_FLOATS``), a power of two in [2, REDUCE_CHUNKS]."""
    return max(2, min(REDUCE_CHUNKS, triton.next_power_of_2(MERGE_STEP_FLOATS * 32 * num_warps // d + 1) // 2))


def _default_split(s: int, programs: int, block: int, target: int | None = None) -> int:
    """Chunk length of the split over the sequence: ``SPLIT_START`` tokens, halved while the grid has fewer than
    ``target`` programs (default ``PROGRAMS_PER_SM * 132``), never below one ``block`` nor so short that a head has
    more than ``REDUCE_CHUNKS`` chunks to merge."""
    target = target or PROGRAMS_PER_SM * 132
    floor = max(block, triton.next_power_of_2(triton.cdiv(s, REDUCE_CHUNKS)))
    split = SPLIT_START
    while split > floor and programs * triton.cdiv(s, split) < target:
        split //= 2
    return max(split, floor)


def int2_mha_warps(chunk_len: int, k_block: int) -> int:
    """v4's warps for an int2 cache without GQA whose programs read ``chunk_len`` tokens: ``V4_INT2_MHA_WARPS`` from
    ``V4_INT2_MHA_MIN_BLOCKS`` to below ``V4_INT2_MHA_ONE_WARP_BLOCKS`` key blocks, one elsewhere."""
    two = V4_INT2_MHA_MIN_BLOCKS * k_block <= chunk_len < V4_INT2_MHA_ONE_WARP_BLOCKS * k_block
    return V4_INT2_MHA_WARPS if two else 1


def _check_inputs(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, bits):
    b, hq, d = q.shape
    hkv, s = k_codes.shape[1], k_codes.shape[2]
    k_block = triton.cdiv(s, k_scale.shape[2])
    if k_scale.shape[2] * k_block < s or (k_scale.shape[2] - 1) * k_block >= s:
        raise ValueError(f"k_scale {tuple(k_scale.shape)}: {k_scale.shape[2]} key blocks do not tile {s} tokens")
    v_group = d // v_scale.shape[-1]
    if d & (d - 1) or k_block & (k_block - 1) or v_group & (v_group - 1):
        raise ValueError(f"head_dim {d}, k_block {k_block} and v_group {v_group} must be powers of two for the "
                         "Triton kernel")
    if v_group % (8 // bits):
        raise ValueError(f"v_group {v_group} must be a multiple of the {8 // bits} codes per byte ({bits}-bit)")
    if hq % hkv:
        raise ValueError(f"{hq} query heads are not a multiple of {hkv} kv heads")
    for name, t in (("k_codes", k_codes), ("v_codes", v_codes), ("v_scale", v_scale), ("v_zero", v_zero),
                    ("k_scale", k_scale), ("k_zero", k_zero)):
        if t.stride(-1) != 1:
            raise ValueError(f"decode_attention: {name} {tuple(t.shape)} must be contiguous in its last dim")
    if v_zero.stride() != v_scale.stride() or k_zero.stride() != k_scale.stride():
        raise ValueError("decode_attention: the zero points must have their scales' strides")
    return b, hq, d, hkv, s, k_block, v_group


def decode_attention(q: torch.Tensor, k_codes: torch.Tensor, k_scale: torch.Tensor, k_zero: torch.Tensor,
                     v_codes: torch.Tensor, v_scale: torch.Tensor, v_zero: torch.Tensor, *, bits: int,
                     lo: torch.Tensor, hi: torch.Tensor, k_float: torch.Tensor | None = None,
                     v_float: torch.Tensor | None = None, float_valid: torch.Tensor | None = None,
                     sm_scale: float | None = None, split: int | None = None, block_n: int | None = None,
                     num_warps: int | None = None, num_stages: int | None = None,
                     chunk: int | None = None, variant: str | None = None, heads: int | None = None,
                     vchain: bool | None = None, interior: bool | None = None, maxnreg: int | None = None,
                     reduce_chunks: int | None = None, reduce_warps: int | None = None,
                     alibi_slopes: torch.Tensor | None = None, float_positions: torch.Tensor | None = None,
                     bias_dtype: torch.dtype = torch.float32, raw_scores: bool | None = None,
                     warp_blocks: bool | None = None, bounds_ready: bool = False,
                     out_dtype: torch.dtype = torch.float32, merge_in_split: bool = False) -> torch.Tensor:
    """``decode_attention_reference`` as flash-decoding (see the module docstring). Launch options default to
    ``DEFAULT_CONFIG`` (another ``variant``: ``VARIANT_CONFIGS``'s). ``split``: tokens per program (rounded up to whole
    key blocks / steps); ``block_n``: tokens per inner step (v2-v4: clamped to one key block, at least one row per
    token thread); ``chunk``: channels per thread; ``heads`` (v2-v4): query heads per program (a divisor of the GQA
    group: each code is unpacked once for all of them); ``vchain`` (v2 only): value rows as FFMA chains;
    ``interior`` (v3/v4): key blocks wholly inside a program's tokens read without masks (False: all masked);
    ``maxnreg``: the split kernel's register cap per thread (ptxas; fewer registers, more resident warps);
    ``reduce_chunks`` / ``reduce_warps``: the merge's chunks per step and warps (``REDUCE_CHUNKS``,
    ``REDUCE_WARPS``); ``alibi_slopes`` / ``float_positions`` / ``bias_dtype``: the reference's ALiBi bias (v3/v4);
    ``raw_scores`` (v4 without ALiBi; ``V4_RAW_SCORES``): the zero-point dot and the scores' scale applied once per
    key block (``_v3_block``'s ``RAW``); ``warp_blocks`` (v3/v4 on several warps; ``V4_WARP_BLOCKS``): each warp
    reads key blocks of its own. Inside ``pdl_launches`` (the triton backend's ``pdl``, ``_cache_attention``) the
    v2-v4 split kernel and the merge launch with programmatic dependent launch (v1's split plainly).
    ``bounds_ready``: ``lo`` and ``hi`` are contiguous int32 with ``hi`` at most the cache's slots
    (``write_packed_kv``'s ``bounds``), read as they are: no conversion or clamp launches. ``out_dtype`` (float32,
    or bf16 / fp16: the decode step's activations): the merge writes its result in it, rounded as ``.to`` rounds
    the float32 result (no cast launch after it). ``merge_in_split`` (v3/v4; the decode step's, ``MERGE``): no
    ``_reduce_kernel`` launch: the split's last program per (sequence, head group) merges, through the same
    ``_merge_head``, so the output is the two-launch form's bit for bit at the same merge chunks and warps (the
    interpreter; on the GPU a ``reduce_warps`` other than the split's orders the reductions otherwise: float32
    rounding apart); one launch fewer a layer; False: the A/B's two-launch form. Its counters are kept per device
    (``split_counters``): one stream's launches at a time."""
    if triton is None:
        raise RuntimeError("decode_attention needs triton; use decode_attention_reference")
    b, hq, d, hkv, s, k_block, v_group = _check_inputs(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, bits)
    groups = hq // hkv
    sm_scale = sm_scale if sm_scale is not None else 1 / math.sqrt(d)
    qk_scale = sm_scale * LOG2E
    variant = variant or DEFAULT_CONFIG["variant"]
    if variant not in VARIANT_CONFIGS:
        raise ValueError(f"decode_attention: variant={variant!r} (one of {sorted(VARIANT_CONFIGS)})")
    base = DEFAULT_CONFIG if variant == DEFAULT_CONFIG["variant"] else VARIANT_CONFIGS[variant]
    if alibi_slopes is not None and variant not in ("v3", "v4"):
        raise ValueError(f"decode_attention: ALiBi slopes are read by v3/v4 only (variant={variant!r})")
    if alibi_slopes is not None and (alibi_slopes.shape != (hq,) or alibi_slopes.dtype != torch.float32):
        raise ValueError(f"decode_attention: alibi_slopes {alibi_slopes.dtype} {tuple(alibi_slopes.shape)}: one "
                         f"float32 slope per query head ({hq})")
    if out_dtype not in _ROUND:
        raise ValueError(f"decode_attention: out_dtype {out_dtype} (float32, float16 or bfloat16)")
    if bias_dtype not in _ROUND:
        raise ValueError(f"decode_attention: bias_dtype {bias_dtype} (float32, float16 or bfloat16)")
    alibi = {"slopes": None if alibi_slopes is None else alibi_slopes.contiguous(), "round": _ROUND[bias_dtype]}
    if interior is not None and variant not in ("v3", "v4"):
        raise ValueError(f"decode_attention: interior is a v3/v4 option (variant={variant!r})")
    if warp_blocks is not None and variant not in ("v3", "v4"):
        raise ValueError(f"decode_attention: warp_blocks is a v3/v4 option (variant={variant!r})")
    if raw_scores and (variant != "v4" or alibi_slopes is not None):
        raise ValueError(f"decode_attention: raw_scores is v4's without ALiBi slopes (variant={variant!r}, "
                         f"alibi_slopes {'given' if alibi_slopes is not None else 'none'})")
    if raw_scores is None:
        raw_scores = V4_RAW_SCORES and variant == "v4" and alibi_slopes is None
    if merge_in_split and variant not in ("v3", "v4"):
        raise ValueError(f"decode_attention: merge_in_split is a v3/v4 option (variant={variant!r})")
    q = q.contiguous()
    if bounds_ready:
        if lo.dtype != torch.int32 or hi.dtype != torch.int32 or not (lo.is_contiguous() and hi.is_contiguous()):
            raise ValueError(f"decode_attention: bounds_ready needs contiguous int32 lo / hi, got {lo.dtype} "
                             f"{tuple(lo.shape)} and {hi.dtype} {tuple(hi.shape)}")
        lo32, hi32 = lo, hi
    else:  # never past the cache
        lo32, hi32 = lo.to(torch.int32).contiguous(), hi.clamp(max=s).to(torch.int32).contiguous()
    block_n = block_n or base["block_n"]
    if num_warps is None and variant == "v4" and bits == 2 and groups == 1:
        chunk_len = split if split is not None else _default_split(s, b * hq, k_block)
        num_warps = int2_mha_warps(chunk_len, k_block)
    num_warps = num_warps or base["num_warps"]
    if warp_blocks is None:
        warp_blocks = V4_WARP_BLOCKS and variant == "v4"
    if interior is None and variant == "v4" and bits == 2 and (heads or _default_heads(groups)) > 1:
        interior = V4_INT2_GQA_INTERIOR
    if block_n & (block_n - 1) or block_n < 1 or num_warps & (num_warps - 1):
        raise ValueError(f"block_n={block_n} and num_warps={num_warps} must be powers of two")
    chunk = chunk or base["chunk"]
    if chunk & (chunk - 1):
        raise ValueError(f"chunk={chunk} must be a power of two")
    num_stages = num_stages if num_stages is not None else base["num_stages"]
    extra = {} if num_stages is None else {"num_stages": num_stages}
    maxnreg = maxnreg if maxnreg is not None else base.get("maxnreg")
    if maxnreg is not None:
        extra["maxnreg"] = maxnreg
    if variant == "v1":
        chunk = max(8 // bits, min(chunk, v_group, d))
        step = max(block_n, k_block)  # the kernel's iteration: one key block, or one step of several
        if split is None:
            split = _default_split(s, b * hq, step, target=8 * 132)
        split = max(step, triton.cdiv(split, step) * step)
        n_split = triton.cdiv(s, split)
        acc = torch.empty(b, hq, n_split, d, device=q.device, dtype=torch.float32)
        m = torch.empty(b, hq, n_split, device=q.device, dtype=torch.float32)
        den = torch.empty_like(m)
        _split_kernel[(b * hq, n_split)](
            q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, lo32, hi32, acc, m, den,
            q.stride(0), q.stride(1), k_codes.stride(0), k_codes.stride(1), k_codes.stride(2),
            k_scale.stride(0), k_scale.stride(1), k_scale.stride(2),
            v_codes.stride(0), v_codes.stride(1), v_codes.stride(2),
            v_scale.stride(0), v_scale.stride(1), v_scale.stride(2),
            acc.stride(0), acc.stride(1), acc.stride(2), m.stride(0), m.stride(1), qk_scale, split,
            HQ=hq, GROUPS=groups, D=d, BITS=bits, K_BLOCK=k_block, V_GROUP=v_group, BLOCK_N=block_n, CW=chunk,
            num_warps=num_warps, **extra,
        )
    else:
        merge = dict(k_float=k_float, v_float=v_float, float_valid=float_valid, float_positions=float_positions,
                     out_dtype=out_dtype, chunks=reduce_chunks or _merge_chunks(d, num_warps)) if merge_in_split \
            else None
        acc, m, den, n_split, out = _launch_v2(
            q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, lo32, hi32, bits=bits, k_block=k_block,
            v_group=v_group, groups=groups, qk_scale=qk_scale, split=split, block_n=block_n, num_warps=num_warps,
            chunk=chunk, heads=heads, vchain=vchain, extra=extra, variant=variant,
            interior=base.get("interior", True) if interior is None else interior, alibi=alibi,
            raw_scores=raw_scores, warp_blocks=warp_blocks, merge=merge)
        if out is not None:
            return out
    return _reduce(q, acc, m, den, n_split, groups, k_float, v_float, float_valid, qk_scale,
                   chunks=reduce_chunks or REDUCE_CHUNKS, num_warps=reduce_warps or REDUCE_WARPS, alibi=alibi,
                   float_positions=float_positions, out_dtype=out_dtype)


_ROUND = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
"""The kernels' ``ROUND`` code of an ALiBi bias dtype (``_alibi_bias``)."""


def _default_heads(groups: int) -> int:
    """Query heads per v2-v4 program when the launch names none: the largest power of two up to 4 that divides the
    GQA group (SmolLM2's 3 -> 1)."""
    return next(h for h in (4, 2, 1) if groups % h == 0)


def v2_geometry(d: int, bits: int, k_block: int, v_group: int, groups: int, *, block_n: int, num_warps: int,
                chunk: int, heads: int | None, vchain: bool = True, warp_blocks: bool = False) -> dict:
    """The v2 kernel's tile for a launch: channels per thread ``C`` (``CWW`` words), channel lanes ``X``, token
    threads ``TT`` (lanes x warps), rows per thread ``N0``, heads per program ``GH``. ``warp_blocks`` (v3/v4):
    each warp's token lanes read a key block of their own (``WB`` = ``num_warps`` blocks a step), so a thread's
    rows per block are those of one warp."""
    perw = 32 // bits
    if d * bits < 32:
        raise ValueError(f"head_dim {d} at {bits} bits is less than one 32-bit word per token row")
    dw = d // perw
    c = max(perw, min(chunk, d, v_group))  # a chunk inside one value group when the packing allows
    cww = c // perw
    x = dw // cww
    wb = num_warps if warp_blocks else 1
    tl_ = max(1, min(32 // x, k_block * wb // num_warps))
    if k_block < num_warps:
        raise ValueError(f"num_warps={num_warps} is more than k_block={k_block} token rows")
    tt = tl_ * num_warps
    n0 = max(1, min(block_n, k_block) * wb // tt)
    heads = heads or _default_heads(groups)
    gh = max(1, min(heads, groups))
    if groups % gh or gh & (gh - 1):
        raise ValueError(f"heads={heads}: must be a power of two dividing the {groups} query heads per kv head")
    rows = bool(vchain) and n0 <= 8
    return {"C": c, "CWW": cww, "X": x, "TT": tt, "N0": n0, "GH": gh, "CV": 1 if c <= v_group else c, "ROWS": rows,
            "WB": wb}


EXP_BITS = 0x4B000000
"""2**23's float32 bits, passed to the v2 kernel as an argument rather than a constant: ptxas then merges a field's
mask and this OR into one LOP3 (with two immediates it emits two)."""


def _launch_v2(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, lo32, hi32, *, bits, k_block, v_group, groups,
               qk_scale, split, block_n, num_warps, chunk, heads, vchain, extra, variant, interior, alibi=None,
               raw_scores=False, warp_blocks=False, merge: dict | None = None):
    """The v2-v4 split kernel's launch -> ``(acc, m, den, n_split, out)``. ``merge`` (v3/v4: ``_merge_operands``'
    float tokens, ALiBi positions, output dtype and merge chunks): the split's last program per (sequence, head group)
    merges into ``out`` (``MERGE``, counters from ``split_counters``); ``out`` None: ``_reduce`` is still to run (no
    ``merge``, or a CUDA graph capture before the counters exist)."""
    b, hq, d = q.shape
    s = k_codes.shape[2]
    for name, t, row in (("k_codes", k_codes, d * bits // 8), ("v_codes", v_codes, d * bits // 8),
                         ("k_scale", k_scale, d), ("v_scale", v_scale, d // v_group)):
        if t.stride(-2) != row:
            raise ValueError(f"decode_attention: {name} {tuple(t.shape)} stride {t.stride()}: rows must be packed")
    if vchain is not None and variant != "v2":
        raise ValueError(f"decode_attention: vchain is a v2 option (variant={variant!r})")
    g = v2_geometry(d, bits, k_block, v_group, groups, block_n=block_n, num_warps=num_warps, chunk=chunk,
                    heads=heads, vchain=VARIANT_CONFIGS["v2"]["vchain"] if vchain is None else vchain,
                    warp_blocks=warp_blocks)
    if split is None:
        split = _default_split(s, b * hq // g["GH"], k_block)
    split = max(k_block, triton.cdiv(split, k_block) * k_block)
    n_split = triton.cdiv(s, split)
    acc = torch.empty(b, hq, n_split, d, device=q.device, dtype=torch.float32)
    m = torch.empty(b, hq, n_split, device=q.device, dtype=torch.float32)
    den = torch.empty_like(m)
    kw, vw = k_codes.view(torch.int32), v_codes.view(torch.int32)
    args = (q, kw, k_scale, k_zero, vw, v_scale, v_zero, lo32, hi32, acc, m, den,
            q.stride(0), q.stride(1), kw.stride(0), kw.stride(1), k_scale.stride(0), k_scale.stride(1),
            vw.stride(0), vw.stride(1), v_scale.stride(0), v_scale.stride(1),
            acc.stride(0), acc.stride(1), acc.stride(2), m.stride(0), m.stride(1), qk_scale, split, EXP_BITS)
    const = dict(HQ=hq, GROUPS=groups, GH=g["GH"], D=d, BITS=bits, K_BLOCK=k_block, V_GROUP=v_group, N0=g["N0"],
                 TT=g["TT"], CWW=g["CWW"], CV=g["CV"], num_warps=num_warps, **extra)
    grid = (b * hq // g["GH"], n_split)
    const |= pdl_launch_options()
    out = None
    if variant in ("v3", "v4"):
        slopes = (alibi or {}).get("slopes")
        counters = None
        if merge is not None:
            from lowbit.kernels.decode_step import split_counters

            counters = split_counters(q.device, grid[0])
        if counters is not None:
            out, operands, merge_const = _merge_operands(q, m, n_split, groups, alibi=alibi, **merge)
            merged = {"CNT": counters, "OUT": out, **operands, "MERGE": True, **merge_const}
        else:
            merged = {"CNT": m, "OUT": m, "KF": m, "VF": m, "FV": m, "FPOS": m, "n_float": 0, "MERGE": False,
                      "NS": 2, "F": 2, "HAS_FLOAT": False, "FLOAT_ALIBI": False, "OUT_BF16": False, "OUT_FP16": False,
                      **dict.fromkeys(("s_fb", "s_fh", "s_fs", "s_vb", "s_vh", "s_vs", "s_valid", "s_ob", "s_oh"), 0)}
        _split_kernel_v3[grid](*args, DEN=variant == "v4", INTERIOR=bool(interior),
                               SLOPES=slopes if slopes is not None else m, ALIBI=slopes is not None,
                               ROUND=(alibi or {}).get("round", 0), RAW=bool(raw_scores), WB=g["WB"], **merged,
                               **const)
    else:
        _split_kernel_v2[grid](*args, ROWS=g["ROWS"], **const)
    return acc, m, den, n_split, out


def _merge_operands(q: torch.Tensor, m: torch.Tensor, n_split: int, groups: int, *, k_float: torch.Tensor | None,
                    v_float: torch.Tensor | None, float_valid: torch.Tensor | None, alibi: dict | None,
                    float_positions: torch.Tensor | None, out_dtype: torch.dtype,
                    chunks: int) -> tuple[torch.Tensor, dict, dict]:
    """``_merge_head``'s output ``[B, Hq, D]`` of ``out_dtype``, its tensor / stride arguments and its constexprs, as
    ``_reduce_kernel`` and the split kernel's ``MERGE`` take them (one place, so the two merges read alike); ``m`` is
    the placeholder of the pointers a launch without float tokens or ALiBi does not read."""
    b, hq, d = q.shape
    out = torch.empty(b, hq, d, device=q.device, dtype=out_dtype)
    has_float = k_float is not None
    if has_float:
        n_float = k_float.shape[2]
        valid = float_valid.to(torch.int8).contiguous()
        kf, vf = k_float, v_float
    else:
        n_float, valid, kf, vf = 0, m, m, m  # unused pointers
    fstr = (kf.stride(0), kf.stride(1), kf.stride(2), vf.stride(0), vf.stride(1), vf.stride(2), valid.stride(0)) \
        if has_float else (0,) * 7
    slopes = (alibi or {}).get("slopes")
    if slopes is not None and has_float:
        if float_positions is None or float_positions.shape != float_valid.shape:
            raise ValueError("decode_attention: ALiBi over float tokens needs their positions, float_positions "
                             f"{tuple(float_valid.shape)}")
        fpos = float_positions.to(torch.int32).contiguous()
        if fpos.stride() != valid.stride():
            raise ValueError("decode_attention: float_positions must have float_valid's layout")
    else:
        fpos = m
    operands = {"KF": kf, "VF": vf, "FV": valid, "FPOS": fpos,
                **dict(zip(("s_fb", "s_fh", "s_fs", "s_vb", "s_vh", "s_vs", "s_valid"), fstr)),
                "s_ob": out.stride(0), "s_oh": out.stride(1), "n_float": n_float}
    const = {"NS": min(triton.next_power_of_2(chunks), max(2, triton.next_power_of_2(n_split))),
             "F": max(2, triton.next_power_of_2(max(n_float, 1))), "HAS_FLOAT": has_float,
             "FLOAT_ALIBI": slopes is not None and has_float, "OUT_BF16": out_dtype == torch.bfloat16,
             "OUT_FP16": out_dtype == torch.float16}
    return out, operands, const


def _reduce(q, acc, m, den, n_split, groups, k_float, v_float, float_valid, qk_scale, *, chunks: int,
            num_warps: int, alibi: dict | None = None, float_positions: torch.Tensor | None = None,
            out_dtype: torch.dtype = torch.float32):
    out, operands, const = _merge_operands(q, m, n_split, groups, k_float=k_float, v_float=v_float,
                                           float_valid=float_valid, alibi=alibi, float_positions=float_positions,
                                           out_dtype=out_dtype, chunks=chunks)
    slopes = (alibi or {}).get("slopes")
    _reduce_kernel[(q.shape[0], q.shape[1])](
        q, acc, m, den, OUT=out, SLOPES=slopes if slopes is not None else m, s_qb=q.stride(0), s_qh=q.stride(1),
        s_ab=acc.stride(0), s_ah=acc.stride(1), s_as=acc.stride(2), s_mb=m.stride(0), s_mh=m.stride(1),
        qk_scale=qk_scale, n_split=n_split, **operands, GROUPS=groups, D=q.shape[2], NS=const["NS"], F=const["F"],
        HAS_FLOAT=const["HAS_FLOAT"], ALIBI=const["FLOAT_ALIBI"], ROUND=(alibi or {}).get("round", 0),
        OUT_BF16=const["OUT_BF16"], OUT_FP16=const["OUT_FP16"], num_warps=num_warps, **pdl_launch_options(),
    )
    return out


def cache_attention_unsupported(head_dim: int, k_block: int, v_group: int, bits: int, q_heads: int,
                                kv_heads: int) -> str | None:
    """Why ``decode_attention`` does not take a packed cache of this layout (None: it does): the checks of
    ``_check_inputs`` that a lowering can make from the graph, so a head_dim of 80 or 48 keeps the reference op (and
    the compile report says so) instead of failing at the first decode step, after the prefill."""
    odd = [f"{name} {n}" for name, n in (("head_dim", head_dim), ("k_block", k_block), ("v_group", v_group))
           if n & (n - 1)]
    if odd:
        return f"{', '.join(odd)}: the kernel takes powers of two"
    if v_group % (8 // bits):
        return f"v_group {v_group} is not a multiple of the {8 // bits} codes per byte ({bits}-bit)"
    if q_heads % kv_heads:
        return f"{q_heads} query heads are not a multiple of {kv_heads} kv heads"
    return None


def _kernel_device(x: torch.Tensor) -> bool:
    return triton is not None and (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")


def cache_attention_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                           *cache: torch.Tensor, bits: int, k_block: int, v_group: int, window: int, sink: int,
                           scale: float | None = None, split: int | None = None,
                           sliding: int | None = None, bias: torch.Tensor | None = None,
                           alibi_slopes: torch.Tensor | None = None,
                           bias_dtype: torch.dtype = torch.float32, cos: torch.Tensor | None = None,
                           sin: torch.Tensor | None = None, rotary_dim: int | None = None,
                           fused_write: bool = True, merge_in_split: bool = False) -> tuple[torch.Tensor, ...]:
    """``cache_attention`` (lowbit.ir.kvcache) with a decode step's attention on the Triton kernel: the cache is
    written as the reference writes it (in place: the step's caller hands its cache over), then ``decode_attention``
    reads the quantized tokens ``[sink, t - window]`` and the float candidates (old sink/ring slots and the new token).
    Prefill (several tokens per sequence), inputs the kernel cannot read (CPU tensors without ``TRITON_INTERPRET=1``)
    and a layout it does not take (``cache_attention_unsupported``: the triton backend keeps such a node on the
    reference and reports it) take the reference, as does a sliding-window layer (the kernel reads every quantized
    slot from the sink on) and an additive ``bias`` the lowering did not read as ALiBi. ``alibi_slopes``: the slopes
    (float32, one per query head) the Triton lowering derived from ``bias`` and checked it is (``alibi_slopes_of``:
    slope times the key position where a key is causal, -inf elsewhere, in ``bias_dtype``): the kernel adds them.

    ``fused_write`` (the triton backend's ``rotary_cache``): a decode step's write is ``write_packed_kv``'s one
    launch (``cache_update``'s ops where it names a reason, or with ``fused_write`` off). ``cos`` / ``sin``
    (``rotary_dim``): ``q`` and ``k`` are the step's heads before their rotary, which the write kernel applies (the
    reference: the IR's ``rotary``) - the triton backend folds a layer's two ``rotary`` nodes in here. The same
    launch copies the attention's float candidates (``float_candidates``' ring and sink before the write, the new
    token, the mask; ``candidates``), so the attention reads what it read before, bit for bit, and the bounds of the
    quantized tokens it reads (``bounds``: seven torch ops, each a launch, before). ``merge_in_split`` (the triton
    backend's, off by default as there: slower where measured): the attention is one launch, its split kernel
    merging (``decode_attention``'s); False: the split and ``_reduce_kernel`` (the same merge code: float32 rounding
    apart on the GPU, whose 4-warp merge sums in another order)."""
    from lowbit.ir.kvcache import cache_attention, cache_update, candidate_positions, float_candidates
    from lowbit.kernels.packed_kv_write import rotary_heads_ref, write_packed_kv, write_packed_kv_unsupported

    kw = dict(bits=bits, k_block=k_block, v_group=v_group, window=window, sink=sink)
    layout_why = cache_attention_unsupported(q.shape[-1], k_block, v_group, bits, q.shape[1], k.shape[1])
    decode = not (q.shape[2] != 1 or not _kernel_device(q) or sliding is not None
                  or (bias is not None and alibi_slopes is None) or layout_why is not None)
    written = decode and fused_write and write_packed_kv_unsupported(
        q, k, v, cos, sin, positions, list(cache), rotary_dim=rotary_dim, **kw) is None
    if written:  # one launch: the rotary of q and k (where given), the float candidates, the bounds and the write
        bounds = torch.empty((2, q.shape[0]), dtype=torch.int32, device=q.device)
        q, k, kf, vf, fvalid = write_packed_kv(q, k, v, cos, sin, positions, *cache, rotary_dim=rotary_dim,
                                               checked=True, candidates=True, bounds=bounds, **kw)
        new = list(cache)
        lo, hi = bounds[0], bounds[1]
    elif cos is not None:
        q, k = rotary_heads_ref(q, cos, sin, rotary_dim), rotary_heads_ref(k, cos, sin, rotary_dim)
    if not decode:
        return cache_attention(q, k, v, positions, *cache, scale=scale, sliding=sliding, bias=bias, **kw)
    if not written:  # the float candidates read the ring/sink as they were BEFORE this step's write (in place)
        kf, vf, fmask = float_candidates(k.float(), v.float(), positions, cache[6], cache[7], window=window,
                                         sink=sink)
        fvalid = fmask[:, 0]
        new = cache_update(k, v, positions, list(cache), inplace=True, **kw)
        pos = positions[:, 0].to(torch.int32)
        lo = torch.full_like(pos, sink)
        hi = torch.clamp(pos - window + 1, min=sink)
    alibi = {}
    if bias is not None:  # the float candidates' positions: float_candidates' order
        alibi = {"alibi_slopes": alibi_slopes.to(q.device), "bias_dtype": bias_dtype,
                 "float_positions": candidate_positions(positions.to(torch.long), window=window, sink=sink)[0]}
    out = decode_attention(q[:, :, 0], *new[:6], bits=bits, lo=lo, hi=hi, k_float=kf, v_float=vf,
                           float_valid=fvalid, sm_scale=scale, split=split, bounds_ready=written,
                           out_dtype=q.dtype if q.dtype in _ROUND else torch.float32, merge_in_split=merge_in_split,
                           **alibi)
    return (out[:, :, None].to(q.dtype), *new)
