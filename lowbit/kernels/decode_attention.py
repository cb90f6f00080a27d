"""Decode attention over a quantized KV cache: one query token per sequence reads packed int8/int4/int2 keys and
values and dequantizes them in its inner loop (a leaf module: torch and triton only).

The cache is the real form of the ``quantize(kv=...)`` accuracy model (docs/design.md, "Program form"):

* **keys** per channel over blocks of ``k_block`` tokens (KIVI): ``k_scale``/``k_zero`` are
  ``[B, Hkv, S / k_block, D]``; **values** per token over groups of ``v_group`` channels: ``v_scale``/``v_zero``
  are ``[B, Hkv, S, D / v_group]``. Asymmetric min/max qparams, as ``lowbit.ir.quant.qparams_from_range``.
* codes are stored unsigned (``code - qmin``), ``8 / bits`` per byte along ``D``, the lowest index in the
  lowest bits: ``[B, Hkv, S, D * bits / 8]`` uint8. ``*_zero`` holds ``zero_point - qmin`` as float, so a value is
  ``(stored - zero) * scale`` — the same float32 arithmetic as ``dequantize``'s ``(q - zero_point) * scale``.
* a query at ``position`` reads the quantized copy of tokens ``[lo, hi)`` (``lo`` = the attention sink, ``hi`` =
  ``position - window + 1``: older than the float window) and a small float buffer for the rest (the sink and
  the recent window, ``k_float``/``v_float`` with a validity mask), exactly the split the accuracy model's mask
  makes.

``decode_attention_reference`` is plain torch; ``decode_attention`` runs the quantized part as a Triton kernel
split over the sequence (``split`` tokens per program, for long contexts and small batches), merges the
partial softmaxes (and the float part) by log-sum-exp.
"""

from __future__ import annotations

import math

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - torch-only installs use the reference
    triton = None
    tl = None

__all__ = ["quantize_keys", "quantize_values", "pack_codes", "unpack_codes", "dequantize_keys",
           "dequantize_values", "decode_attention_reference", "decode_attention"]

SCALE_EPS = 1e-12  # as lowbit.ir.quant.SCALE_EPS (this leaf module does not import the IR)


def _qrange(bits: int) -> tuple[int, int]:
    if bits not in (2, 4, 8):
        raise ValueError(f"bits={bits}: the quantized cache stores 8, 4 or 2-bit codes")
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Signed codes ``[..., D]`` -> uint8 ``[..., D * bits / 8]`` (stored as ``code - qmin``, low bits first)."""
    qmin, _ = _qrange(bits)
    per = 8 // bits
    d = codes.shape[-1]
    if d % per:
        raise ValueError(f"head_dim {d} is not a multiple of {per} ({bits}-bit codes, {per} per byte)")
    u = (codes.to(torch.int32) - qmin).reshape(*codes.shape[:-1], d // per, per)
    shifts = torch.arange(per, device=codes.device, dtype=torch.int32) * bits
    return (u << shifts).sum(-1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 ``[..., D * bits / 8]`` -> stored (unsigned) codes ``[..., D]`` as int32."""
    _qrange(bits)
    per = 8 // bits
    shifts = torch.arange(per, device=packed.device, dtype=torch.int32) * bits
    u = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return u.reshape(*packed.shape[:-1], packed.shape[-1] * per)


def _qparams(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric scale and (offset) zero as float, as ``qparams_from_range`` computes them."""
    qmin, qmax = _qrange(bits)
    lo = torch.minimum(lo.float(), torch.zeros_like(lo, dtype=torch.float32))
    hi = torch.maximum(hi.float(), torch.zeros_like(hi, dtype=torch.float32))
    scale = ((hi - lo) / (qmax - qmin)).clamp(min=SCALE_EPS)
    zp = torch.round(qmin - lo / scale).clamp(qmin, qmax)
    return scale, zp


def _codes(x: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, bits: int) -> torch.Tensor:
    qmin, qmax = _qrange(bits)
    return torch.clamp(torch.round(x.float() / scale) + zp, qmin, qmax)


def quantize_keys(k: torch.Tensor, bits: int, block: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keys ``[B, H, S, D]`` (S a multiple of ``block``) -> packed codes, scale and offset zero ``[B, H, S/block, D]``."""
    b, h, s, d = k.shape
    if s % block:
        raise ValueError(f"{s} key tokens: only whole blocks of {block} tokens are quantized (the rest stays in "
                         "the float window)")
    kb = k.float().reshape(b, h, s // block, block, d)
    scale, zp = _qparams(kb.amin(3), kb.amax(3), bits)
    codes = _codes(kb, scale.unsqueeze(3), zp.unsqueeze(3), bits).reshape(b, h, s, d)
    return pack_codes(codes, bits), scale, zp - _qrange(bits)[0]


def quantize_values(v: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Values ``[B, H, S, D]`` -> packed codes, scale and offset zero ``[B, H, S, D/group]`` (per token groups)."""
    b, h, s, d = v.shape
    if d % group:
        raise ValueError(f"v_group={group} does not divide head_dim {d}")
    vg = v.float().reshape(b, h, s, d // group, group)
    scale, zp = _qparams(vg.amin(-1), vg.amax(-1), bits)
    codes = _codes(vg, scale.unsqueeze(-1), zp.unsqueeze(-1), bits).reshape(b, h, s, d)
    return pack_codes(codes, bits), scale, zp - _qrange(bits)[0]


def dequantize_keys(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    block = packed.shape[2] // scale.shape[2]
    u = unpack_codes(packed, bits).float()
    return (u - zero.float().repeat_interleave(block, 2)) * scale.float().repeat_interleave(block, 2)


def dequantize_values(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    u = unpack_codes(packed, bits).float()
    group = u.shape[-1] // scale.shape[-1]
    return (u - zero.float().repeat_interleave(group, -1)) * scale.float().repeat_interleave(group, -1)


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
    def _unpack(packed, BITS: tl.constexpr, ROWS: tl.constexpr, D: tl.constexpr):
        """uint8 ``[ROWS, D * BITS / 8]`` -> stored codes ``[ROWS, D]`` float32, lowest bits = lowest index
        (each byte is read once; ``join`` interleaves the fields back into channel order)."""
        x = packed.to(tl.int32)
        if BITS == 8:
            out = x
        elif BITS == 4:
            out = tl.reshape(tl.join(x & 15, x >> 4), (ROWS, D))
        else:
            out = tl.reshape(tl.join(tl.join(x & 3, (x >> 4) & 3), tl.join((x >> 2) & 3, x >> 6)), (ROWS, D))
        return out.to(tl.float32)

    @triton.jit
    def _quantized_split_kernel(
        Q, KC, KS, KZ, VC, VS, VZ, LO, HI, ACC, M, L,
        s_qb, s_qh, s_kcb, s_kch, s_kcs, s_ksb, s_ksh, s_kss, s_vcb, s_vch, s_vcs, s_vsb, s_vsh, s_vss,
        s_ab, s_ah, s_as, s_mb, s_mh, sm_scale, split,
        GROUPS: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr, K_BLOCK: tl.constexpr, V_GROUP: tl.constexpr,
    ):
        """One (sequence, query head, split): online softmax over the split's quantized tokens, one key-scale block
        (``K_BLOCK`` tokens) per inner step, so the key scales are one row per step."""
        pid_b = tl.program_id(0)
        pid_h = tl.program_id(1)
        pid_s = tl.program_id(2)
        kvh = pid_h // GROUPS
        PER: tl.constexpr = 8 // BITS
        DB: tl.constexpr = D // PER
        NG: tl.constexpr = D // V_GROUP
        offs_d = tl.arange(0, D)
        offs_b = tl.arange(0, DB)
        offs_g = tl.arange(0, NG)
        q = tl.load(Q + pid_b * s_qb + pid_h * s_qh + offs_d).to(tl.float32) * sm_scale
        lo = tl.load(LO + pid_b)
        hi = tl.load(HI + pid_b)
        start = tl.maximum(pid_s * split, (lo // K_BLOCK) * K_BLOCK)
        end = tl.minimum((pid_s + 1) * split, hi)
        m_i = -float("inf")
        l_i = 0.0
        acc = tl.zeros([D], dtype=tl.float32)
        kc_base = KC + pid_b * s_kcb + kvh * s_kch
        vc_base = VC + pid_b * s_vcb + kvh * s_vch
        ks_base = KS + pid_b * s_ksb + kvh * s_ksh
        kz_base = KZ + pid_b * s_ksb + kvh * s_ksh
        vs_base = VS + pid_b * s_vsb + kvh * s_vsh
        vz_base = VZ + pid_b * s_vsb + kvh * s_vsh
        for n0 in range(start, end, K_BLOCK):
            offs_n = n0 + tl.arange(0, K_BLOCK)
            valid = (offs_n >= lo) & (offs_n < hi)
            kb = tl.load(kc_base + offs_n[:, None] * s_kcs + offs_b[None, :], mask=valid[:, None], other=0)
            blk = n0 // K_BLOCK
            ks = tl.load(ks_base + blk * s_kss + offs_d).to(tl.float32)
            kz = tl.load(kz_base + blk * s_kss + offs_d).to(tl.float32)
            # (u - z) * s . q  =  u . (s q) - z . (s q): the scale folds into the query once per block
            qs = q * ks
            s = tl.sum(_unpack(kb, BITS, K_BLOCK, D) * qs[None, :], 1) - tl.sum(kz * qs, 0)
            s = tl.where(valid, s, -float("inf"))
            m_new = tl.maximum(m_i, tl.max(s, 0))
            m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
            alpha = tl.exp(m_i - m_safe)
            p = tl.exp(s - m_safe)
            vb = tl.load(vc_base + offs_n[:, None] * s_vcs + offs_b[None, :], mask=valid[:, None], other=0)
            g_ptr = offs_n[:, None] * s_vss + offs_g[None, :]
            vs = tl.load(vs_base + g_ptr, mask=valid[:, None], other=0.0).to(tl.float32)
            vz = tl.load(vz_base + g_ptr, mask=valid[:, None], other=0.0).to(tl.float32)
            vu = tl.reshape(_unpack(vb, BITS, K_BLOCK, D), (K_BLOCK, NG, V_GROUP))
            v = tl.reshape((vu - vz[:, :, None]) * vs[:, :, None], (K_BLOCK, D))
            acc = acc * alpha + tl.sum(p[:, None] * v, 0)
            l_i = l_i * alpha + tl.sum(p, 0)
            m_i = m_new
        tl.store(ACC + pid_b * s_ab + pid_h * s_ah + pid_s * s_as + offs_d, acc)
        tl.store(M + pid_b * s_mb + pid_h * s_mh + pid_s, m_i)
        tl.store(L + pid_b * s_mb + pid_h * s_mh + pid_s, l_i)


def decode_attention(q: torch.Tensor, k_codes: torch.Tensor, k_scale: torch.Tensor, k_zero: torch.Tensor,
                     v_codes: torch.Tensor, v_scale: torch.Tensor, v_zero: torch.Tensor, *, bits: int,
                     lo: torch.Tensor, hi: torch.Tensor, k_float: torch.Tensor | None = None,
                     v_float: torch.Tensor | None = None, float_valid: torch.Tensor | None = None,
                     sm_scale: float | None = None, split: int | None = None, num_warps: int = 4) -> torch.Tensor:
    """``decode_attention_reference`` with the quantized part in a Triton kernel split over the sequence:
    ``split`` tokens per program (rounded to whole key-scale blocks)."""
    if triton is None:
        raise RuntimeError("decode_attention needs triton; use decode_attention_reference")
    b, hq, d = q.shape
    hkv, s = k_codes.shape[1], k_codes.shape[2]
    k_block = s // k_scale.shape[2]
    v_group = d // v_scale.shape[-1]
    if d & (d - 1) or k_block & (k_block - 1) or v_group & (v_group - 1):
        raise ValueError(f"head_dim {d}, k_block {k_block} and v_group {v_group} must be powers of two for the "
                         "Triton kernel")
    sm_scale = sm_scale if sm_scale is not None else 1 / math.sqrt(d)
    if split is None:  # enough programs to fill the machine when batch x heads is small
        want = max(1, 4 * 132 // max(b * hq, 1))
        split = triton.next_power_of_2(triton.cdiv(s, want))
    split = max(k_block, (split // k_block) * k_block)
    n_split = triton.cdiv(s, split)
    acc = torch.empty(b, hq, n_split, d, device=q.device, dtype=torch.float32)
    m = torch.empty(b, hq, n_split, device=q.device, dtype=torch.float32)
    den = torch.empty_like(m)
    q = q.contiguous()
    lo32, hi32 = lo.to(torch.int32).contiguous(), hi.to(torch.int32).contiguous()
    _quantized_split_kernel[(b, hq, n_split)](
        q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, lo32, hi32, acc, m, den,
        q.stride(0), q.stride(1), k_codes.stride(0), k_codes.stride(1), k_codes.stride(2),
        k_scale.stride(0), k_scale.stride(1), k_scale.stride(2),
        v_codes.stride(0), v_codes.stride(1), v_codes.stride(2),
        v_scale.stride(0), v_scale.stride(1), v_scale.stride(2),
        acc.stride(0), acc.stride(1), acc.stride(2), m.stride(0), m.stride(1), sm_scale, split,
        GROUPS=hq // hkv, D=d, BITS=bits, K_BLOCK=k_block, V_GROUP=v_group, num_warps=num_warps,
    )
    fp = _float_part(q, k_float, v_float, float_valid, sm_scale)
    if fp is not None:  # the float tokens are one more "split" of the merge
        fs, fv = fp
        fm = fs.amax(-1, keepdim=True)
        fm_safe = torch.where(torch.isinf(fm), torch.zeros_like(fm), fm)
        fpw = torch.exp(fs - fm_safe)
        acc = torch.cat([acc, torch.einsum("bhf,bhfd->bhd", fpw, fv).unsqueeze(2)], 2)
        m = torch.cat([m, fm], 2)
        den = torch.cat([den, fpw.sum(-1, keepdim=True)], 2)
    top = m.amax(-1, keepdim=True)
    w = torch.exp(m - top)  # splits with no tokens have m = -inf -> weight 0
    return (acc * w.unsqueeze(-1)).sum(2) / (den * w).sum(-1, keepdim=True)
