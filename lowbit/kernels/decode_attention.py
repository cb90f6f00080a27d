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

1. ``_split_kernel``, grid ``(splits, B * Hkv)``: one program reads a chunk of ``split`` tokens of one (sequence,
   kv head) ONCE for all the query heads sharing it under GQA (the heads are a tensor axis), ``block_n`` tokens
   per step as whole key-scale blocks (one key scale/zero row per block). Packed codes are loaded as contiguous
   byte rows (vectorised loads, never interleaved in registers): field ``f`` of byte ``j`` is channel
   ``PER * j + f``, so the query, the key scales and the output are read/written per field. Key scales fold out
   of the inner product (``sum_c (u - z) s q = sum_c u (s q) - sum_c z s q``); values are dequantized once per
   kv head and accumulated per field. fp32 accumulation; it writes the chunk's running max, sum and
   un-normalised output (base-2 exponent).
2. ``_reduce_kernel``, grid ``(B, Hq)``: attends to the small float buffer (sink + recent window) and merges it
   with every chunk by log-sum-exp.

All products are register broadcasts and reductions (no ``tl.dot``): decode is one query row per head, so a
tensor-core tile would be mostly padding.
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
    def _field(x, F: tl.constexpr, BITS: tl.constexpr):
        """Field ``F`` (channel ``PER * j + F`` of byte ``j``) of int32-widened packed bytes, as float32."""
        if BITS == 8:
            out = x
        else:
            out = (x >> (F * BITS)) & ((1 << BITS) - 1)
        return out.to(tl.float32)

    @triton.jit
    def _split_kernel(
        Q, KC, KS, KZ, VC, VS, VZ, LO, HI, ACC, M, L,
        s_qb, s_qh, s_kcb, s_kch, s_kcs, s_ksb, s_ksh, s_kss, s_vcb, s_vch, s_vcs, s_vsb, s_vsh, s_vss,
        s_ab, s_ah, s_as, s_mb, s_mh, qk_scale, split, n_tokens,
        HKV: tl.constexpr, GROUPS: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr,
        K_BLOCK: tl.constexpr, V_GROUP: tl.constexpr, NKB: tl.constexpr,
    ):
        """One (chunk, sequence, kv head): online softmax (base 2) of all ``GROUPS`` query heads (rows, padded to
        ``GP``) over the chunk's quantized tokens in ``[lo, hi)``, ``NKB`` key blocks of ``K_BLOCK`` tokens per
        step. Codes stay in packed order: field ``f`` of byte ``j`` is channel ``PER * j + f``, so the query, key
        scales and output are read/written per field (strided) and nothing is interleaved in registers."""
        pid_s = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // HKV
        kvh = pid_bh % HKV
        PER: tl.constexpr = 8 // BITS
        DB: tl.constexpr = D // PER
        BLOCK_N: tl.constexpr = NKB * K_BLOCK
        offs_j = tl.arange(0, DB)
        offs_t = tl.arange(0, K_BLOCK)
        offs_h = tl.arange(0, GP)
        hmask = offs_h < GROUPS
        lo = tl.load(LO + b)
        hi = tl.load(HI + b)
        start = tl.maximum(pid_s * split, (lo // BLOCK_N) * BLOCK_N)
        end = tl.minimum(pid_s * split + split, hi)
        kc_base = KC + b * s_kcb + kvh * s_kch
        vc_base = VC + b * s_vcb + kvh * s_vch
        ks_base = KS + b * s_ksb + kvh * s_ksh
        kz_base = KZ + b * s_ksb + kvh * s_ksh
        vs_base = VS + b * s_vsb + kvh * s_vsh
        vz_base = VZ + b * s_vsb + kvh * s_vsh
        head0 = kvh * GROUPS
        q_ptr = Q + b * s_qb + (head0 + offs_h[:, None]) * s_qh + PER * offs_j[None, :]
        q0 = tl.load(q_ptr, mask=hmask[:, None], other=0.0).to(tl.float32) * qk_scale
        q1 = q0
        q2 = q0
        q3 = q0
        if PER >= 2:
            q1 = tl.load(q_ptr + 1, mask=hmask[:, None], other=0.0).to(tl.float32) * qk_scale
        if PER == 4:
            q2 = tl.load(q_ptr + 2, mask=hmask[:, None], other=0.0).to(tl.float32) * qk_scale
            q3 = tl.load(q_ptr + 3, mask=hmask[:, None], other=0.0).to(tl.float32) * qk_scale
        m_i = tl.full([GP], -float("inf"), dtype=tl.float32)
        l_i = tl.zeros([GP], dtype=tl.float32)
        acc0 = tl.zeros([GP, DB], dtype=tl.float32)
        acc1 = tl.zeros([GP, DB], dtype=tl.float32)
        acc2 = tl.zeros([GP, DB], dtype=tl.float32)
        acc3 = tl.zeros([GP, DB], dtype=tl.float32)
        vgrp = (PER * offs_j) // V_GROUP  # value group of byte j (every field of a byte is in the same group)
        for n00 in range(start, end, BLOCK_N):
            for kb in tl.static_range(NKB):
                n0 = n00 + kb * K_BLOCK
                offs_n = n0 + offs_t
                inside = offs_n < n_tokens
                valid = (offs_n >= lo) & (offs_n < end)
                kx = tl.load(kc_base + offs_n[:, None] * s_kcs + offs_j[None, :], mask=inside[:, None],
                             other=0).to(tl.int32)
                vx = tl.load(vc_base + offs_n[:, None] * s_vcs + offs_j[None, :], mask=inside[:, None],
                             other=0).to(tl.int32)
                vptr = offs_n[:, None] * s_vss + vgrp[None, :]
                vs = tl.load(vs_base + vptr, mask=inside[:, None], other=0.0).to(tl.float32)
                vz = tl.load(vz_base + vptr, mask=inside[:, None], other=0).to(tl.float32)
                kmask = n0 < n_tokens
                ks_ptr = (n0 // K_BLOCK) * s_kss + PER * offs_j
                # keys: sum_c (u - z) s q = sum_c u (s q) - sum_c z (s q): per field, one scale row per block
                ks = tl.load(ks_base + ks_ptr, mask=kmask, other=0.0).to(tl.float32)
                kz = tl.load(kz_base + ks_ptr, mask=kmask, other=0).to(tl.float32)
                qs = q0 * ks[None, :]
                s = tl.sum(_field(kx, 0, BITS)[None, :, :] * qs[:, None, :], 2)
                z = tl.sum(qs * kz[None, :], 1)
                if PER >= 2:
                    ks = tl.load(ks_base + ks_ptr + 1, mask=kmask, other=0.0).to(tl.float32)
                    kz = tl.load(kz_base + ks_ptr + 1, mask=kmask, other=0).to(tl.float32)
                    qs = q1 * ks[None, :]
                    s += tl.sum(_field(kx, 1, BITS)[None, :, :] * qs[:, None, :], 2)
                    z += tl.sum(qs * kz[None, :], 1)
                if PER == 4:
                    ks = tl.load(ks_base + ks_ptr + 2, mask=kmask, other=0.0).to(tl.float32)
                    kz = tl.load(kz_base + ks_ptr + 2, mask=kmask, other=0).to(tl.float32)
                    qs = q2 * ks[None, :]
                    s += tl.sum(_field(kx, 2, BITS)[None, :, :] * qs[:, None, :], 2)
                    z += tl.sum(qs * kz[None, :], 1)
                    ks = tl.load(ks_base + ks_ptr + 3, mask=kmask, other=0.0).to(tl.float32)
                    kz = tl.load(kz_base + ks_ptr + 3, mask=kmask, other=0).to(tl.float32)
                    qs = q3 * ks[None, :]
                    s += tl.sum(_field(kx, 3, BITS)[None, :, :] * qs[:, None, :], 2)
                    z += tl.sum(qs * kz[None, :], 1)
                s = tl.where(valid[None, :], s - z[:, None], -float("inf"))
                m_new = tl.maximum(m_i, tl.max(s, 1))
                m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
                alpha = tl.exp2(m_i - m_safe)
                p = tl.exp2(s - m_safe[:, None])
                l_i = l_i * alpha + tl.sum(p, 1)
                m_i = m_new
                # values: dequantized once per kv head (shared by the GQA rows), accumulated per field
                acc0 = acc0 * alpha[:, None] + tl.sum(p[:, :, None] * ((_field(vx, 0, BITS) - vz) * vs)[None, :, :], 1)
                if PER >= 2:
                    acc1 = acc1 * alpha[:, None] + tl.sum(
                        p[:, :, None] * ((_field(vx, 1, BITS) - vz) * vs)[None, :, :], 1)
                if PER == 4:
                    acc2 = acc2 * alpha[:, None] + tl.sum(
                        p[:, :, None] * ((_field(vx, 2, BITS) - vz) * vs)[None, :, :], 1)
                    acc3 = acc3 * alpha[:, None] + tl.sum(
                        p[:, :, None] * ((_field(vx, 3, BITS) - vz) * vs)[None, :, :], 1)
        heads = head0 + offs_h
        a_ptr = ACC + b * s_ab + heads[:, None] * s_ah + pid_s * s_as + PER * offs_j[None, :]
        tl.store(a_ptr, acc0, mask=hmask[:, None])
        if PER >= 2:
            tl.store(a_ptr + 1, acc1, mask=hmask[:, None])
        if PER == 4:
            tl.store(a_ptr + 2, acc2, mask=hmask[:, None])
            tl.store(a_ptr + 3, acc3, mask=hmask[:, None])
        tl.store(M + b * s_mb + heads * s_mh + pid_s, m_i, mask=hmask)
        tl.store(L + b * s_mb + heads * s_mh + pid_s, l_i, mask=hmask)

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


def decode_attention(q: torch.Tensor, k_codes: torch.Tensor, k_scale: torch.Tensor, k_zero: torch.Tensor,
                     v_codes: torch.Tensor, v_scale: torch.Tensor, v_zero: torch.Tensor, *, bits: int,
                     lo: torch.Tensor, hi: torch.Tensor, k_float: torch.Tensor | None = None,
                     v_float: torch.Tensor | None = None, float_valid: torch.Tensor | None = None,
                     sm_scale: float | None = None, split: int | None = None, block_n: int | None = None,
                     num_warps: int = 4, num_stages: int | None = None) -> torch.Tensor:
    """``decode_attention_reference`` as flash-decoding (see the module docstring): ``split`` tokens per program
    (rounded to whole ``block_n``-token steps), ``block_n`` tokens per inner step (whole key-scale blocks)."""
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
    groups = hq // hkv
    sm_scale = sm_scale if sm_scale is not None else 1 / math.sqrt(d)
    block_n = max(k_block, (block_n or 64) // k_block * k_block)
    if split is None:  # enough programs to fill the machine several times over
        want = max(1, 8 * 132 // max(b * hkv, 1))
        split = triton.next_power_of_2(triton.cdiv(s, want))
    split = max(block_n, triton.cdiv(split, block_n) * block_n)
    n_split = triton.cdiv(s, split)
    acc = torch.empty(b, hq, n_split, d, device=q.device, dtype=torch.float32)
    m = torch.empty(b, hq, n_split, device=q.device, dtype=torch.float32)
    den = torch.empty_like(m)
    q = q.contiguous()
    lo32, hi32 = lo.to(torch.int32).contiguous(), hi.to(torch.int32).contiguous()
    qk_scale = sm_scale * LOG2E
    extra = {} if num_stages is None else {"num_stages": num_stages}
    _split_kernel[(n_split, b * hkv)](
        q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, lo32, hi32, acc, m, den,
        q.stride(0), q.stride(1), k_codes.stride(0), k_codes.stride(1), k_codes.stride(2),
        k_scale.stride(0), k_scale.stride(1), k_scale.stride(2),
        v_codes.stride(0), v_codes.stride(1), v_codes.stride(2),
        v_scale.stride(0), v_scale.stride(1), v_scale.stride(2),
        acc.stride(0), acc.stride(1), acc.stride(2), m.stride(0), m.stride(1), qk_scale, split, s,
        HKV=hkv, GROUPS=groups, GP=triton.next_power_of_2(groups), D=d, BITS=bits, K_BLOCK=k_block,
        V_GROUP=v_group, NKB=block_n // k_block, num_warps=num_warps, **extra,
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
