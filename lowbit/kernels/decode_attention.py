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

``decode_attention_reference`` is plain torch; ``decode_attention`` is flash-decoding in two Triton kernels:

1. ``_split_kernel``, grid ``(B * Hq, splits)``: one program per (sequence, query head, chunk of ``split`` tokens),
   ``block_n`` tokens per step, written for a memory-bound decode (issue 18): tiles are ``[block_n, D / CW, CW]``
   with ``CW`` (``chunk``) channels per thread, packed code rows load as contiguous bytes and their
   fields are interleaved in registers (``tl.interleave``), the query and key scales are loaded in the codes'
   layout, value scales/zeros once per (token, chunk); codes become floats by the exact 2**23 bias trick; each
   token row of the tile runs its own online softmax (base 2), merged once after the loop, so the loop's only
   cross-thread traffic is the ``q.k`` sum; a key block's scale row is folded into the query once for all its
   steps. GQA heads sharing a kv head are adjacent programs (their reads of the same cache hit L2). It writes
   each chunk's max, sum and un-normalised output.
2. ``_reduce_kernel``, grid ``(B, Hq)``: attends to the small float buffer (sink + recent window) and merges it
   with every chunk by log-sum-exp.

The kernel it replaces kept the GQA heads as a tensor axis (``[heads, tokens, bytes]`` broadcasts per code field).
Compiled offline for sm_90 (ptxas 0 spills, 128 registers, int4, 4 warps, 32-token steps), its loop converted
whole tiles between layouts through shared memory every step: 26 ``convert_layout`` in TTGIR, per step 38
barriers, 56 STS.128, 222 shuffles, 1317 SASS instructions for 32 codes per thread (~41 per code), plus one-byte
and two-byte scale gathers; this kernel's loop has no barrier or shared memory and ~11-13 instructions per code
(``DEFAULT_CONFIG``: 611 per 64 codes). No ``tl.dot``: decode is one query row per
head, so a tensor-core tile would be mostly padding.
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
           "dequantize_values", "decode_attention_reference", "decode_attention", "cache_attention_decode"]

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


def decode_attention_reference(q: torch.Tensor, k_codes: torch.Tensor, k_scale: torch.Tensor, k_zero: torch.Tensor,
                               v_codes: torch.Tensor, v_scale: torch.Tensor, v_zero: torch.Tensor, *, bits: int,
                               lo: torch.Tensor, hi: torch.Tensor, k_float: torch.Tensor | None = None,
                               v_float: torch.Tensor | None = None, float_valid: torch.Tensor | None = None,
                               sm_scale: float | None = None) -> torch.Tensor:
    """``q [B, Hq, D]`` over quantized tokens ``[lo[b], hi[b])`` plus the valid float tokens -> ``[B, Hq, D]`` f32."""
    b, hq, d = q.shape
    sm_scale = sm_scale if sm_scale is not None else 1 / math.sqrt(d)
    groups = hq // k_codes.shape[1]
    k = dequantize_keys(k_codes, k_scale, k_zero, bits).repeat_interleave(groups, 1)
    v = dequantize_values(v_codes, v_scale, v_zero, bits).repeat_interleave(groups, 1)
    s = torch.einsum("bhd,bhsd->bhs", q.float(), k) * sm_scale
    slots = torch.arange(k.shape[2], device=q.device)
    keep = (slots[None, :] >= lo[:, None]) & (slots[None, :] < hi[:, None])
    s = s.masked_fill(~keep[:, None, :], float("-inf"))
    fp = _float_part(q, k_float, v_float, float_valid, sm_scale)
    if fp is not None:
        s = torch.cat([s, fp[0]], -1)
        v = torch.cat([v, fp[1]], 2)
    return torch.einsum("bhs,bhsd->bhd", s.softmax(-1), v)


if triton is not None:

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
    def _reduce_kernel(
        Q, ACC, M, L, KF, VF, FV, OUT,
        s_qb, s_qh, s_ab, s_ah, s_as, s_mb, s_mh, s_fb, s_fh, s_fs, s_vb, s_vh, s_vs, s_valid, s_ob, s_oh,
        qk_scale, n_split, n_float,
        GROUPS: tl.constexpr, D: tl.constexpr, NS: tl.constexpr, F: tl.constexpr, HAS_FLOAT: tl.constexpr,
    ):
        """One (sequence, query head): the float tokens' softmax and every chunk's, merged by log-sum-exp."""
        b = tl.program_id(0)
        h = tl.program_id(1)
        offs_d = tl.arange(0, D)
        offs_s = tl.arange(0, NS)
        sm = offs_s < n_split
        m = tl.load(M + b * s_mb + h * s_mh + offs_s, mask=sm, other=-float("inf"))
        den = tl.load(L + b * s_mb + h * s_mh + offs_s, mask=sm, other=0.0)
        acc = tl.load(ACC + b * s_ab + h * s_ah + offs_s[:, None] * s_as + offs_d[None, :], mask=sm[:, None],
                      other=0.0)
        top = tl.max(m, 0)
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
            sf = tl.where(ok, tl.sum(kf * q[None, :], 1), -float("inf"))
            top = tl.maximum(top, tl.max(sf, 0))
        top = tl.where(top == -float("inf"), 0.0, top)
        w = tl.exp2(m - top)
        num = tl.sum(acc * w[:, None], 0)
        total = tl.sum(den * w, 0)
        if HAS_FLOAT:
            pf = tl.exp2(sf - top)
            num += tl.sum(pf[:, None] * vf, 0)
            total += tl.sum(pf, 0)
        tl.store(OUT + b * s_ob + h * s_oh + offs_d, num / total)


LOG2E = 1.4426950408889634


DEFAULT_CONFIG = {"num_warps": 4, "split": 2048, "block_n": 16, "num_stages": None, "chunk": 8}
"""``decode_attention``'s launch when the caller gives none (the Triton backend's decode step): 4 warps, 16-token
steps (two unrolled steps per 32-token key block; two token rows per thread at head dim 128, one at 64), 8
channels per thread chunk, chunks of 2048 tokens (batch 16 x 32 heads x 32K context -> 8192 programs). Compiled
offline for sm_90 (int4/int2, fp16 or fp32 scales): 80 registers, no spills, no shared memory or barrier in the
loop, ~9.5 SASS instructions per code. ``chunk=16`` needs ~10% fewer instructions per code but ~109 registers
(fewer programs per SM); the benchmark sweeps both. ``split`` shrinks for short contexts (``_default_split``)."""


def _default_split(s: int, programs: int, block_n: int) -> int:
    """Chunk length: DEFAULT_CONFIG's, halved while the grid has fewer than ~8 programs per SM (132 on an H200)."""
    split = DEFAULT_CONFIG["split"]
    while split > block_n and programs * triton.cdiv(s, split) < 8 * 132:
        split //= 2
    return split


def decode_attention(q: torch.Tensor, k_codes: torch.Tensor, k_scale: torch.Tensor, k_zero: torch.Tensor,
                     v_codes: torch.Tensor, v_scale: torch.Tensor, v_zero: torch.Tensor, *, bits: int,
                     lo: torch.Tensor, hi: torch.Tensor, k_float: torch.Tensor | None = None,
                     v_float: torch.Tensor | None = None, float_valid: torch.Tensor | None = None,
                     sm_scale: float | None = None, split: int | None = None, block_n: int | None = None,
                     num_warps: int | None = None, num_stages: int | None = None,
                     chunk: int | None = None) -> torch.Tensor:
    """``decode_attention_reference`` as flash-decoding (see the module docstring): ``split`` tokens per program
    (rounded up to whole ``block_n``-token steps), ``block_n`` tokens per inner step (a power of two; a divisor
    of ``k_block`` reads one key-scale row per step, a multiple reads one per token row). Defaults:
    ``DEFAULT_CONFIG``."""
    if triton is None:
        raise RuntimeError("decode_attention needs triton; use decode_attention_reference")
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
    groups = hq // hkv
    sm_scale = sm_scale if sm_scale is not None else 1 / math.sqrt(d)
    block_n = block_n or DEFAULT_CONFIG["block_n"]
    if block_n & (block_n - 1) or block_n < 1:
        raise ValueError(f"block_n={block_n} must be a power of two")
    num_warps = num_warps or DEFAULT_CONFIG["num_warps"]
    chunk = max(8 // bits, min(chunk or DEFAULT_CONFIG["chunk"], v_group, d))
    if chunk & (chunk - 1):
        raise ValueError(f"chunk={chunk} must be a power of two")
    num_stages = num_stages if num_stages is not None else DEFAULT_CONFIG["num_stages"]
    if split is None:
        split = _default_split(s, b * hq, block_n)
    step = max(block_n, k_block)  # the kernel's iteration: one key block, or one step of several
    split = max(step, triton.cdiv(split, step) * step)
    n_split = triton.cdiv(s, split)
    acc = torch.empty(b, hq, n_split, d, device=q.device, dtype=torch.float32)
    m = torch.empty(b, hq, n_split, device=q.device, dtype=torch.float32)
    den = torch.empty_like(m)
    q = q.contiguous()
    lo32, hi32 = lo.to(torch.int32).contiguous(), hi.clamp(max=s).to(torch.int32).contiguous()  # never past the cache
    qk_scale = sm_scale * LOG2E
    extra = {} if num_stages is None else {"num_stages": num_stages}
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
    out = torch.empty(b, hq, d, device=q.device, dtype=torch.float32)
    has_float = k_float is not None
    if has_float:
        n_float = k_float.shape[2]
        valid = float_valid.to(torch.int8).contiguous()
        kf, vf = k_float, v_float
    else:
        n_float, valid, kf, vf = 0, m, m, m  # unused pointers
    fstr = (kf.stride(0), kf.stride(1), kf.stride(2), vf.stride(0), vf.stride(1), vf.stride(2), valid.stride(0)) \
        if has_float else (0,) * 7
    _reduce_kernel[(b, hq)](
        q, acc, m, den, kf, vf, valid, out,
        q.stride(0), q.stride(1), acc.stride(0), acc.stride(1), acc.stride(2), m.stride(0), m.stride(1),
        *fstr, out.stride(0), out.stride(1), qk_scale, n_split, n_float,
        GROUPS=groups, D=d, NS=max(2, triton.next_power_of_2(n_split)),
        F=max(2, triton.next_power_of_2(max(n_float, 1))), HAS_FLOAT=has_float, num_warps=4,
    )
    return out


def _kernel_device(x: torch.Tensor) -> bool:
    return triton is not None and (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")


def cache_attention_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                           *cache: torch.Tensor, bits: int, k_block: int, v_group: int, window: int, sink: int,
                           scale: float | None = None, split: int | None = None) -> tuple[torch.Tensor, ...]:
    """``cache_attention`` (lowbit.ir.kvcache) with a decode step's attention on the Triton kernel: the cache is
    written as the reference writes it, then ``decode_attention`` reads the quantized tokens ``[sink, t - window]``
    and the float candidates (old sink/ring slots and the new token). Prefill (several tokens per sequence) and
    inputs the kernel cannot read (CPU tensors without ``TRITON_INTERPRET=1``) take the reference."""
    from lowbit.ir.kvcache import cache_attention, cache_update, float_candidates

    kw = dict(bits=bits, k_block=k_block, v_group=v_group, window=window, sink=sink)
    if q.shape[2] != 1 or not _kernel_device(q):
        return cache_attention(q, k, v, positions, *cache, scale=scale, **kw)
    new = cache_update(k, v, positions, list(cache), **kw)
    kf, vf, fmask = float_candidates(k.float(), v.float(), positions, cache[6], cache[7], window=window, sink=sink)
    pos = positions[:, 0].to(torch.int32)
    lo = torch.full_like(pos, sink)
    hi = torch.clamp(pos - window + 1, min=sink)
    out = decode_attention(q[:, :, 0], *new[:6], bits=bits, lo=lo, hi=hi, k_float=kf, v_float=vf,
                           float_valid=fmask[:, 0], sm_scale=scale, split=split)
    return (out[:, :, None].to(q.dtype), *new)
