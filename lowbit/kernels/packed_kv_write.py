"""The write of a decode step's keys and values into a packed int8/int4/int2 KV cache (``lowbit.ir.kvcache``'s
layout) in one launch: ``write_packed_kv``, with the step's rotary of q and k when the layer has one and the float
candidates its attention reads (``candidates``).

Why: ``cache_update`` (the reference) writes one token as ~74 aten ops per layer (quantize the value row, gather
the key block from the float ring, re-quantize it, pack, seven scatters), each a kernel launch on the GPU,
``float_candidates`` ~25 and a rotated layer's two IR ``rotary`` ops ~10 more, where a decode step is
launch-bound: on the H200 (7B-shaped 4-layer stack, batch 1, ``bench/results/generate.json`` of 2026-12-01)
w4a16-g128 decoded at 0.78 ms/step with the float cache and 1.98 with the kv4 packed cache, in one run (how much of
that these ops were is not yet profiled).

One program per (sequence, head) of ``Hq + Hkv``: a query head ``h < Hq`` (rotated layers only) turns its row into
the rotated-q output; a kv head does what ``cache_update(..., inplace=True)`` does for one token at position ``p``:

* the value row quantized per token in ``v_group``-channel groups, its codes packed into ``v_codes[p]``, its scale
  and zero point into ``v_scale[p]`` / ``v_zero[p]``;
* the key block holding ``p`` (tokens ``p - p % k_block ...``): the older tokens read from the float ring (slot
  ``sink + t % window``), the new key at ``p``, zeros after it (they change no range: it always holds 0),
  quantized per channel over the block, all ``k_block`` rows of codes and the block's scale / zero point written;
* the new key and value into the ring slot ``sink + p % window`` (and sink slot ``p`` when ``p < sink``), after
  the ring rows of the block were read (``tl.debug_barrier``: a ring shorter than the block reuses a slot it read).

Bit for bit the reference's arithmetic: IEEE divisions (``div_rn``), ``round_half_even`` as ``torch.round``, the
qparams of ``lowbit.ir.quant.asymmetric_qparams`` (the range clamped to hold 0, the scale at least ``SCALE_EPS``:
the accuracy model's, which the reference calls), scales rounded to the cache's scale dtype after the codes used
them in fp32, and the IR ``rotary``'s roundings (``decode_step._rotated``: each product and the sum on the
activation dtype's grid, no FMA). A position past the cache's slots writes no quantized row (the reference's
scatter would fail; the generator checks before the step).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lowbit.kernels._common import (
    is_pow2,
    launcher,
    max_nan,
    min_nan,
    on_kernel_device,
    pdl_launch_options,
    pdl_prologue,
    round_half_even,
)
from lowbit.kernels.act_quant import cuda_reciprocal
from lowbit.kernels.decode_step import ROTARY_DTYPES, _rotated, _round_to, _rows

__all__ = ["PACKED_SCALE_DTYPES", "rotary_heads_ref", "write_packed_kv", "write_packed_kv_ref",
           "write_packed_kv_unsupported"]

PACKED_SCALE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
"""Scale dtypes of a packed cache the kernel writes (``kv-cache``'s ``scale_dtype``)."""

MAX_BLOCK_ELEMENTS = 32768
"""Most ``k_block x head_dim`` values one program re-quantizes in registers (a 256 x 128 block; the kv recipes'
are 32 x head_dim)."""


def rotary_heads_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int | None) -> torch.Tensor:
    """The IR's ``rotary`` of heads ``x``, of each head's first ``rotary_dim`` channels (None: all) with the rest
    unchanged, as a partial rotary's ``cat(rotary(x[..., :r]), x[..., r:])`` computes it."""
    from lowbit.ir.ops import rotary

    if rotary_dim is None or rotary_dim == x.shape[-1]:
        return rotary(x, cos, sin)
    return torch.cat((rotary(x[..., :rotary_dim], cos, sin), x[..., rotary_dim:]), -1)


def write_packed_kv_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor | None,
                        sin: torch.Tensor | None, positions: torch.Tensor, cache: list[torch.Tensor], *, bits: int,
                        k_block: int, v_group: int, window: int, sink: int,
                        rotary_dim: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The ops the kernel replaces: the IR ``rotary`` of q and k (``cos`` None: none), then ``cache_update`` of
    the (rotated) keys and the values into ``cache`` (in place; a chunk of several tokens, which ``cache_update``
    writes out of place, copied in); returns the (rotated) q and k."""
    from lowbit.ir.kvcache import cache_update

    if cos is not None:
        q, k = rotary_heads_ref(q, cos, sin, rotary_dim), rotary_heads_ref(k, cos, sin, rotary_dim)
    new = cache_update(k, v, positions, cache, bits=bits, k_block=k_block, v_group=v_group, window=window,
                       sink=sink, inplace=True)
    for part, written in zip(cache, new):
        if written is not part:
            part.copy_(written)
    return q, k


def write_packed_kv_unsupported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor | None,
                                sin: torch.Tensor | None, positions: torch.Tensor, cache: list[torch.Tensor], *,
                                bits: int, k_block: int, v_group: int, window: int, sink: int,
                                rotary_dim: int | None = None) -> str | None:
    """Why the kernel does not take these operands (None: it does; ``write_packed_kv`` then runs the reference):
    one token per sequence, ``[B, H, 1, D]`` heads of a dtype of ``ROTARY_DTYPES`` (q, k, cos and sin one dtype),
    ``D``, ``k_block`` and ``v_group`` powers of two (``v_group`` whole bytes of codes), the eight cache tensors of
    ``cache_layout``'s shapes and dtypes, ``[B, 1]`` integer positions, unit last strides, the kernel device."""
    if k.dim() != 4 or k.shape[2] != 1 or v.shape != k.shape or q.dim() != 4 or q.shape[0] != k.shape[0] \
            or q.shape[2:] != k.shape[2:]:
        return f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} are not one token per sequence"
    b, hkv, _, d = k.shape
    if bits not in (2, 4, 8) or not all(is_pow2(n) for n in (d, k_block, v_group)) or v_group % (8 // bits) \
            or v_group > d or window < 1 or sink < 0 or k_block * d > MAX_BLOCK_ELEMENTS:
        return (f"bits {bits}, head_dim {d}, k_block {k_block}, v_group {v_group}, window {window}, sink {sink}: the "
                f"kernel takes powers of two, whole bytes of codes per value group, blocks of at most "
                f"{MAX_BLOCK_ELEMENTS} values")
    heads = (q, k, cos, sin) if cos is not None else (k,)
    if len({t.dtype for t in heads}) != 1 or k.dtype not in ROTARY_DTYPES or v.dtype not in ROTARY_DTYPES:
        return f"dtypes {sorted(str(t.dtype) for t in (*heads, v))} (q, k, cos, sin one of bf16/fp16/fp32)"
    kc, ks, kz, vc, vs, vz, kf, vf = cache
    slots = kc.shape[2] if kc.dim() == 4 else -1
    layout = [(b, hkv, slots, d * bits // 8), (b, hkv, slots // k_block, d), (b, hkv, slots // k_block, d),
              (b, hkv, slots, d * bits // 8), (b, hkv, slots, d // v_group), (b, hkv, slots, d // v_group)]
    if (slots % k_block or [tuple(t.shape) for t in cache[:6]] != layout or kf.shape != vf.shape or kf.dim() != 4
            or tuple(kf.shape[:2]) != (b, hkv) or kf.shape[2] != sink + window or kf.shape[3] != d):
        return f"cache {[tuple(t.shape) for t in cache]} for keys {tuple(k.shape)}"
    if any(t.dtype != torch.uint8 for t in (kc, kz, vc, vz)) or ks.dtype not in PACKED_SCALE_DTYPES \
            or vs.dtype not in PACKED_SCALE_DTYPES or kf.dtype not in ROTARY_DTYPES or vf.dtype not in ROTARY_DTYPES:
        return f"cache dtypes {[str(t.dtype) for t in cache]}"
    if positions.dim() != 2 or tuple(positions.shape) != (b, 1) or positions.dtype not in (torch.int64, torch.int32):
        return f"positions {tuple(positions.shape)} {positions.dtype} are not [B, 1] integers"
    if cos is not None:
        width = d if rotary_dim is None else rotary_dim
        if not (0 < width <= d and width % 2 == 0):
            return f"rotary_dim {rotary_dim} of head_dim {d}"
        if _rows(cos, b, 1, width) is None or _rows(sin, b, 1, width) is None:
            return f"cos {tuple(cos.shape)}, sin {tuple(sin.shape)} do not broadcast to [B, 1, 1, {width}]"
    tensors = [q, k, v, *cache] + ([cos, sin] if cos is not None else [])
    if any(t.stride(-1) != 1 for t in tensors) or ks.stride() != kz.stride() or vs.stride() != vz.stride():
        return "a last dimension that is not contiguous, or zero points strided unlike their scales"
    if not all(on_kernel_device(t) for t in (*tensors, positions)):
        return "not on the kernel device"
    return None


def scale_reciprocal(bits: int, x: torch.Tensor) -> float:
    """The kernel's ``RCP`` for ``bits``-wide codes of ``x``: on CUDA, the fp32 reciprocal by which torch's
    ``(hi - lo) / (qmax - qmin)`` multiplies there (``_qparams``); 0.0 (an IEEE division) elsewhere."""
    return cuda_reciprocal((1 << bits) - 1) if x.is_cuda else 0.0


@triton.jit
def _pack(u, R: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr):
    """Stored codes ``[R, D]`` (int32 in ``[0, 2**BITS)``) -> ``[R, D * BITS / 8]`` bytes (int32), ``8 / BITS``
    codes per byte, the lowest channel in the lowest bits (``lowbit.ir.kvcache.pack_codes``)."""
    if BITS == 8:
        return u
    else:
        per: tl.constexpr = 8 // BITS
        parts = tl.reshape(u, (R, D // per, per))
        shifts = tl.arange(0, per) * BITS
        return tl.sum(parts << shifts[None, None, :], axis=2)


@triton.jit
def _clamp(x, QMIN: tl.constexpr, QMAX: tl.constexpr):
    """``torch.clamp(x, qmin, qmax)`` of fp32 ``x`` by the integer code range."""
    return tl.minimum(tl.maximum(x, QMIN + 0.0), QMAX + 0.0)


@triton.jit
def _qparams(lo, hi, QMIN: tl.constexpr, QMAX: tl.constexpr, RCP: tl.constexpr):
    """Asymmetric scale and zero point of a range as ``lowbit.ir.quant.asymmetric_qparams`` computes them on the
    cache's device (the range holds 0): its ``(hi - lo) / (qmax - qmin)`` is an IEEE division on the CPU and, on
    CUDA, ``(hi - lo) * RCP`` with ``RCP = fp32(1 / (qmax - qmin))`` (PyTorch's CUDA division by a Python scalar,
    ``act_quant.cuda_reciprocal``; ``RCP`` 0: the division)."""
    lo = tl.minimum(lo, 0.0, propagate_nan=tl.PropagateNan.ALL)
    hi = tl.maximum(hi, 0.0, propagate_nan=tl.PropagateNan.ALL)
    if RCP != 0.0:
        scale = tl.maximum((hi - lo) * RCP, 1e-12, propagate_nan=tl.PropagateNan.ALL)
    else:
        scale = tl.maximum(tl.math.div_rn(hi - lo, tl.zeros_like(lo) + (QMAX - QMIN)), 1e-12,
                           propagate_nan=tl.PropagateNan.ALL)
    zp = _clamp(round_half_even(QMIN - tl.math.div_rn(lo, scale)), QMIN, QMAX)
    return scale, zp


@triton.jit
def _codes(x, scale, zp, QMIN: tl.constexpr, QMAX: tl.constexpr):
    """Stored (unsigned) codes ``clamp(round(x / scale) + zp) - qmin`` as int32 (``kvcache._codes``)."""
    return (_clamp(round_half_even(tl.math.div_rn(x, scale)) + zp, QMIN, QMAX) - QMIN).to(tl.int32)


@triton.jit
def _rotated_row(src, c_ptr, s_ptr, ds, HALF: tl.constexpr, IS_BF16: tl.constexpr, IS_FP16: tl.constexpr):
    """Row ``src[0:D]`` (fp32, on the activation grid) with the rotate-half of its first ``2 HALF`` channels
    (``HALF`` 0: none), each product and sum rounded as the IR's ``rotary`` rounds them."""
    x = tl.load(src + ds).to(tl.float32)
    if HALF > 0:
        turned = ds < 2 * HALF
        first = ds < HALF
        partner = tl.load(src + tl.where(first, ds + HALF, ds - HALF), mask=turned, other=0.0).to(tl.float32)
        cs = tl.load(c_ptr + ds, mask=turned, other=0.0).to(tl.float32)
        sn = tl.load(s_ptr + ds, mask=turned, other=0.0).to(tl.float32)
        x = tl.where(turned, _rotated(x, partner, cs, sn, tl.where(first, -1.0, 1.0), IS_BF16, IS_FP16), x)
    return x


@triton.jit
def _float_candidates(kf, vf, sfs, sgs, fk, fv, fm, key, value, pos, WITH_MASK, ds, D: tl.constexpr,
                      SINK: tl.constexpr, RING: tl.constexpr, CAND_ROWS: tl.constexpr, MASK_BLOCK: tl.constexpr):
    """One (sequence, kv head)'s float candidates (``_write_packed_kv``'s ``CANDIDATES``): the old sink and ring
    rows, then the new token's; with ``WITH_MASK`` the mask of ``kvcache.float_candidates`` at query position
    ``pos``: a sink slot s holds position s (read when ``s < pos``), ring slot r the position
    ``(pos - 1) - ((pos - 1 - r) mod RING)`` (read when it is at least ``SINK`` and after ``pos - RING``), the new
    token ``pos`` (read)."""
    for r0 in range(0, SINK + RING, CAND_ROWS):
        rows = r0 + tl.arange(0, CAND_ROWS)
        ok = (rows < SINK + RING)[:, None]
        tl.store(fk + rows[:, None] * D + ds[None, :],
                 tl.load(kf + rows[:, None] * sfs + ds[None, :], mask=ok, other=0.0).to(tl.float32), mask=ok)
        tl.store(fv + rows[:, None] * D + ds[None, :],
                 tl.load(vf + rows[:, None] * sgs + ds[None, :], mask=ok, other=0.0).to(tl.float32), mask=ok)
    tl.store(fk + (SINK + RING) * D + ds, key)
    tl.store(fv + (SINK + RING) * D + ds, value)
    if WITH_MASK:
        r = tl.arange(0, MASK_BLOCK)
        back = (pos - 1 - (r - SINK)) % RING
        back = tl.where(back < 0, back + RING, back)  # (a C remainder of a negative number: Python's mod)
        ring_pos = (pos - 1) - back
        cand = tl.where(r < SINK, r, tl.where(r < SINK + RING, ring_pos, pos))
        held = tl.where(r < SINK, r < pos, tl.where(r < SINK + RING, (ring_pos >= SINK) & (ring_pos >= 0), True))
        read = held & (cand <= pos) & ((cand < SINK) | (cand > pos - RING))
        tl.store(fm + r, read.to(tl.int8), mask=r < SINK + RING + 1)


@triton.jit
def _write_packed_kv(q_ptr, k_ptr, v_ptr, c_ptr, s_ptr, p_ptr, kc_ptr, ks_ptr, kz_ptr, vc_ptr, vs_ptr, vz_ptr,
                     kf_ptr, vf_ptr, qo_ptr, ko_ptr, fk_ptr, fv_ptr, fm_ptr, bd_ptr, HQ, S,
                     sqb, sqh, skb, skh, svb, svh, scb, ssb, spb,
                     skcb, skch, skcs, sksb, sksh, skss, svcb, svch, svcs, svsb, svsh, svss,
                     sfb, sfh, sfs, sgb, sgh, sgs, sqob, sqoh, skob, skoh, scandb, scandh, sfmb, sbd,
                     BITS: tl.constexpr, KB: tl.constexpr, VG: tl.constexpr, RING: tl.constexpr,
                     SINK: tl.constexpr, D: tl.constexpr, HALF: tl.constexpr,
                     IS_BF16: tl.constexpr, IS_FP16: tl.constexpr, KS_BF16: tl.constexpr, KS_FP16: tl.constexpr,
                     VS_BF16: tl.constexpr, VS_FP16: tl.constexpr, KF_BF16: tl.constexpr, KF_FP16: tl.constexpr,
                     VF_BF16: tl.constexpr, VF_FP16: tl.constexpr, CANDIDATES: tl.constexpr = False,
                     CAND_ROWS: tl.constexpr = 16, MASK_BLOCK: tl.constexpr = 2, PDL: tl.constexpr = False,
                     BOUNDS: tl.constexpr = False, RCP: tl.constexpr = 0.0):
    """Program ``(b, h)``: query head ``h < HQ`` rotated into ``qo``; else kv head ``h - HQ``'s token written
    (the module docstring). The zero-point and scale tensors of keys and values share their codes' head and batch
    strides' roles (``sks*``, ``svs*``); ``sf*`` / ``sg*`` are the float ring's of keys and values.

    ``CANDIDATES`` (``write_packed_kv``'s ``candidates``): before the ring is written, also the attention's float
    candidates as ``kvcache.float_candidates`` makes them: the ring and sink as they were (``SINK + RING`` rows, fp32,
    ``CAND_ROWS`` at a time) then the new key and value, into ``fk`` / ``fv`` ``[B, Hkv, SINK + RING + 1, D]`` (one
    row stride ``D``: contiguous), and (kv head 0's program) which of them the query reads into ``fm`` (int8
    ``[B, SINK + RING + 1]``, ``MASK_BLOCK`` lanes).

    ``BOUNDS`` (``write_packed_kv``'s ``bounds``): kv head 0's program also writes the quantized tokens the query
    reads, ``[SINK, min(max(pos - RING + 1, SINK), S))``, as int32 into ``bd[0, b]`` / ``bd[sbd + b]``, the
    ``lo`` / ``hi`` of ``decode_attention``.

    ``RCP`` (``_qparams``): nonzero on CUDA, where the reference's scale divides by its reciprocal.

    ``PDL`` (``pdl_launches``): let the attention's split kernel launch, then wait for the kernels that wrote q, k,
    v and the positions (the step's projections) before any load or store: every operand is another kernel's."""
    pdl_prologue(PDL)
    b = tl.program_id(0).to(tl.int64)  # (batch x a kv8 32K cache's bytes pass 2**31)
    h = tl.program_id(1)
    ds = tl.arange(0, D)
    QMIN: tl.constexpr = -(1 << (BITS - 1))
    QMAX: tl.constexpr = (1 << (BITS - 1)) - 1
    DB: tl.constexpr = D * BITS // 8
    if h < HQ:
        y = _rotated_row(q_ptr + b * sqb + h * sqh, c_ptr + b * scb, s_ptr + b * ssb, ds, HALF, IS_BF16,
                         IS_FP16)
        tl.store(qo_ptr + b * sqob + h * sqoh + ds, y.to(qo_ptr.dtype.element_ty))
    else:
        j = (h - HQ).to(tl.int64)
        pos = tl.load(p_ptr + b * spb).to(tl.int64)
        inside = pos < S
        key = _rotated_row(k_ptr + b * skb + j * skh, c_ptr + b * scb, s_ptr + b * ssb, ds, HALF, IS_BF16,
                           IS_FP16)
        if HALF > 0:
            tl.store(ko_ptr + b * skob + j * skoh + ds, key.to(ko_ptr.dtype.element_ty))
        # the key block: older tokens from the ring as it was before this step, the new key, zeros after it
        ts = (pos // KB) * KB + tl.arange(0, KB)
        ring_k = kf_ptr + b * sfb + j * sfh
        older = tl.load(ring_k + (SINK + ts % RING)[:, None] * sfs + ds[None, :], mask=(ts < pos)[:, None],
                        other=0.0).to(tl.float32)
        block = tl.where((ts == pos)[:, None], key[None, :], older)
        k_scale, k_zp = _qparams(min_nan(block, 0), max_nan(block, 0), QMIN, QMAX, RCP)
        k_bytes = _pack(_codes(block, k_scale[None, :], k_zp[None, :], QMIN, QMAX), KB, D, BITS)
        # the value row, per token in VG-channel groups
        value = tl.load(v_ptr + b * svb + j * svh + ds).to(tl.float32)
        groups = tl.reshape(value, (D // VG, VG))
        v_scale, v_zp = _qparams(min_nan(groups, 1), max_nan(groups, 1), QMIN, QMAX, RCP)
        v_codes = tl.reshape(_codes(groups, v_scale[:, None], v_zp[:, None], QMIN, QMAX), (1, D))
        v_bytes = _pack(v_codes, 1, D, BITS)
        if CANDIDATES:
            _float_candidates(kf_ptr + b * sfb + j * sfh, vf_ptr + b * sgb + j * sgh, sfs, sgs,
                              fk_ptr + b * scandb + j * scandh, fv_ptr + b * scandb + j * scandh, fm_ptr + b * sfmb,
                              key, value, pos, j == 0, ds, D, SINK, RING, CAND_ROWS, MASK_BLOCK)
        if BOUNDS:
            first = j == 0
            tl.store(bd_ptr + b, (pos * 0 + SINK).to(tl.int32), mask=first)
            tl.store(bd_ptr + sbd + b, tl.minimum(tl.maximum(pos - RING + 1, SINK), S).to(tl.int32), mask=first)
        tl.debug_barrier()  # every ring row of the block read before the new key's slot is written
        bs = tl.arange(0, DB)
        tl.store(kc_ptr + b * skcb + j * skch + ts[:, None] * skcs + bs[None, :], k_bytes.to(tl.uint8), mask=inside)
        blk = pos // KB
        tl.store(ks_ptr + b * sksb + j * sksh + blk * skss + ds,
                 _round_to(k_scale, KS_BF16, KS_FP16).to(ks_ptr.dtype.element_ty), mask=inside)
        tl.store(kz_ptr + b * sksb + j * sksh + blk * skss + ds, (k_zp - QMIN).to(tl.uint8), mask=inside)
        tl.store(vc_ptr + b * svcb + j * svch + pos * svcs + bs[None, :], v_bytes.to(tl.uint8), mask=inside)
        gs = tl.arange(0, D // VG)
        tl.store(vs_ptr + b * svsb + j * svsh + pos * svss + gs,
                 _round_to(v_scale, VS_BF16, VS_FP16).to(vs_ptr.dtype.element_ty), mask=inside)
        tl.store(vz_ptr + b * svsb + j * svsh + pos * svss + gs, (v_zp - QMIN).to(tl.uint8), mask=inside)
        # the float ring (and the sink slot of a position below the sink)
        k_row = _round_to(key, KF_BF16, KF_FP16).to(kf_ptr.dtype.element_ty)
        v_row = _round_to(value, VF_BF16, VF_FP16).to(vf_ptr.dtype.element_ty)
        slot = SINK + pos % RING
        tl.store(ring_k + slot * sfs + ds, k_row)
        tl.store(vf_ptr + b * sgb + j * sgh + slot * sgs + ds, v_row)
        if SINK > 0:
            in_sink = pos < SINK
            tl.store(ring_k + pos * sfs + ds, k_row, mask=in_sink)
            tl.store(vf_ptr + b * sgb + j * sgh + pos * sgs + ds, v_row, mask=in_sink)


def write_packed_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor | None,
                    sin: torch.Tensor | None, positions: torch.Tensor, *cache: torch.Tensor, bits: int, k_block: int,
                    v_group: int, window: int, sink: int, rotary_dim: int | None = None,
                    checked: bool = False, candidates: bool = False,
                    bounds: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """A decode step's ``q [B, Hq, 1, D]``, ``k`` / ``v [B, Hkv, 1, D]`` at ``positions [B, 1]``: the IR's rotary
    of q and k with ``cos`` / ``sin`` (broadcast to ``[B, 1, 1, rotary_dim or D]``; None: the layer has none), the
    (rotated) keys and the values written into the packed cache's eight tensors in place, as
    ``write_packed_kv_ref`` does, in one launch (grid ``(B, Hq + Hkv)``, ``Hq`` 0 without rotary). Returns the
    (rotated) q and k the attention reads. The reference where ``write_packed_kv_unsupported`` names a reason.

    A plain function, not a custom op: ``cache_attention_decode`` calls it (the triton backend runs that outside
    ``torch.compile``), and a CUDA graph replays its launch: it reads the positions on the device. ``checked``: the
    caller has just asked ``write_packed_kv_unsupported`` itself (the decode step does, to choose this path), so its
    checks are not run twice per layer and step. ``candidates``: also return the attention's float candidates
    ``kvcache.float_candidates(k.float(), v.float(), positions, k_float, v_float)`` makes from the ring before the
    write (keys and values fp32 ``[B, Hkv, sink + window + 1, D]``, and the mask as int8 ``[B, sink + window + 1]``),
    written by the same launch (the reference: those ops). ``bounds`` (int32 ``[2, B]``, contiguous): filled with
    each sequence's quantized tokens to read, ``[sink, clamp(position - window + 1, sink, slots))`` (rows ``lo``,
    ``hi``), by the same launch: ``decode_attention``'s bounds without the torch ops that made them (seven launches
    a layer and step on the GPU, none with PDL). Inside ``pdl_launches`` the launch uses programmatic
    dependent launch (the triton backend's ``pdl``: ``cache_attention_decode``'s)."""
    layout = dict(bits=bits, k_block=k_block, v_group=v_group, window=window, sink=sink, rotary_dim=rotary_dim)
    parts = list(cache)
    if not checked and write_packed_kv_unsupported(q, k, v, cos, sin, positions, parts, **layout) is not None:
        if bounds is not None:
            bounds[0] = sink
            bounds[1] = torch.clamp(positions[:, 0] - window + 1, min=sink, max=parts[0].shape[2])
        if not candidates:
            return write_packed_kv_ref(q, k, v, cos, sin, positions, parts, **layout)
        from lowbit.ir.kvcache import float_candidates

        old = parts[6].clone(), parts[7].clone()
        q, k = write_packed_kv_ref(q, k, v, cos, sin, positions, parts, **layout)
        kk, vv, mask = float_candidates(k.float(), v.float(), positions, *old, window=window, sink=sink)
        return q, k, kk, vv, mask[:, 0].to(torch.int8)
    b, hkv, _, d = k.shape
    kc, ks, kz, vc, vs, vz, kf, vf = parts
    rotary = cos is not None
    width = d if rotary_dim is None else rotary_dim
    if rotary:
        c, s = _rows(cos, b, 1, width), _rows(sin, b, 1, width)
        q_out, k_out = torch.empty_like(q, memory_format=torch.contiguous_format), torch.empty_like(k)
    else:  # cos, sin and the outputs are never read (HALF 0, no query heads): k stands in for their pointers
        c = s = q_out = k_out = k
    hq = q.shape[1] if rotary else 0
    n_float = sink + window + 1
    if candidates:
        fk = torch.empty((b, hkv, n_float, d), dtype=torch.float32, device=k.device)
        fv, fm = torch.empty_like(fk), torch.empty((b, n_float), dtype=torch.int8, device=k.device)
    else:  # never written (CANDIDATES off)
        fk = fv = fm = k
    if bounds is not None and (bounds.shape != (2, b) or bounds.dtype != torch.int32 or not bounds.is_contiguous()):
        raise ValueError(f"write_packed_kv: bounds {bounds.dtype} {tuple(bounds.shape)} must be contiguous int32 "
                         f"[2, {b}]")

    def flags(t: torch.Tensor) -> tuple[bool, bool]:
        return t.dtype == torch.bfloat16, t.dtype == torch.float16

    launcher(k, _write_packed_kv)[(b, hq + hkv)](
        q, k, v, c, s, positions, kc, ks, kz, vc, vs, vz, kf, vf, q_out, k_out, fk, fv, fm,
        positions if bounds is None else bounds, hq, kc.shape[2],
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), c.stride(0) if rotary else 0,
        s.stride(0) if rotary else 0, positions.stride(0),
        kc.stride(0), kc.stride(1), kc.stride(2), ks.stride(0), ks.stride(1), ks.stride(2),
        vc.stride(0), vc.stride(1), vc.stride(2), vs.stride(0), vs.stride(1), vs.stride(2),
        kf.stride(0), kf.stride(1), kf.stride(2), vf.stride(0), vf.stride(1), vf.stride(2),
        q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1), fk.stride(0) if candidates else 0,
        fk.stride(1) if candidates else 0, fm.stride(0) if candidates else 0, b,
        BITS=bits, KB=k_block, VG=v_group, RING=window, SINK=sink, D=d, HALF=width // 2 if rotary else 0,
        IS_BF16=k.dtype == torch.bfloat16,
        IS_FP16=k.dtype == torch.float16, KS_BF16=flags(ks)[0], KS_FP16=flags(ks)[1], VS_BF16=flags(vs)[0],
        VS_FP16=flags(vs)[1], KF_BF16=flags(kf)[0], KF_FP16=flags(kf)[1], VF_BF16=flags(vf)[0],
        VF_FP16=flags(vf)[1], CANDIDATES=candidates, MASK_BLOCK=triton.next_power_of_2(n_float),
        BOUNDS=bounds is not None, RCP=scale_reciprocal(bits, k), num_warps=4,
        enable_fp_fusion=False, **pdl_launch_options())
    heads = (q_out, k_out) if rotary else (q, k)
    return (*heads, fk, fv, fm) if candidates else heads
