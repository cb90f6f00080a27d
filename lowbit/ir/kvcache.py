"""The packed KV cache of a generating model and ``cache_attention``, its op (docs/design.md, "Program form").

The cache is the real form of the ``quantize(kv=...)`` accuracy model (``insert_kv_qdq``), per layer and per
(sequence, kv head), eight tensors:

* ``k_codes`` ``[B, H, S, D*bits/8]`` uint8 and ``k_scale`` / ``k_zero`` ``[B, H, S/k_block, D]``: keys per
  channel over blocks of ``k_block`` tokens (KIVI), blocks aligned at position 0 as the accuracy model's;
* ``v_codes`` ``[B, H, S, D*bits/8]`` uint8 and ``v_scale`` / ``v_zero`` ``[B, H, S, D/v_group]``: values per
  token over groups of ``v_group`` channels;
* ``k_float`` / ``v_float`` ``[B, H, sink + window, D]``: the attention sink (slots ``0..sink-1``, positions
  ``0..sink-1``) and a ring of the ``window`` most recent tokens (slot ``sink + position % window``).

Codes are stored unsigned (``code - qmin``), ``8/bits`` per byte along ``D``, the lowest channel in the lowest
bits; ``*_zero`` is ``zero_point - qmin`` as uint8 (an integer in ``[0, 2**bits)``), ``*_scale`` float32 by
default, so ``(stored - zero) * scale`` is exactly the accuracy model's ``dequantize``.

A query at position ``t`` reads token ``j`` quantized when ``sink <= j <= t - window`` and float otherwise, the
split the accuracy model's mask makes. A key block is final once its last token is written; it is read
quantized only by queries at least ``window`` later, so ``window >= k_block`` makes every block read quantized
final, and the cache equals the accuracy model's QDQ token for token. The block holding the newest token is
re-quantized at every step from the float ring (its earlier, partial versions are never read).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from lowbit.ir.ops import register_op
from lowbit.ir.quant import asymmetric_qparams

__all__ = ["layer_kv_heads", "host_checked_positions", "host_positions", "pack_codes", "unpack_codes", "quantize_keys",
           "quantize_values", "dequantize_keys", "dequantize_values", "cache_layout", "empty_cache", "cache_update",
           "cache_attention", "cache_attention_into"]


class _HostPositions(NamedTuple):
    last: int
    per_step: dict[tuple, Any]
    padded: bool = False


_HOST_POSITIONS: ContextVar[_HostPositions | None] = ContextVar("lowbit_kv_host_positions", default=None)


@contextmanager
def host_checked_positions(last: int, *, padded: bool = False) -> Iterator[None]:
    """One step call (every layer of it) runs inside, with positions its caller built on the host and vouches for:
    each sequence's tokens at consecutive positions, the largest ``last`` (inside the cache). Why: a prefill's
    ``cache_update`` checked its positions and ``_quantized_extent`` read their largest on the device, host syncs
    in every layer, so a GPU prefill waited for each layer's work before launching the next's (3 syncs a layer, 90
    for SmolLM2's 30); ``lowbit.generate`` knows both from the prompts' lengths. The index tensors and masks made
    from the positions alone are made once for the step's layers (``_per_step``). A decode step must not run
    inside (its positions pass ``last``). ``L`` tokens a sequence with ``last == L - 1`` are a prefill from position
    0 in every sequence, which ``cache_attention`` writes and attends in fewer ops (``_prefill_attention``).

    ``padded``: instead, every row is ``lowbit.generate.bucketed``'s left-padded prompt of ``last + 1`` columns, a
    permutation of positions ``0..last`` (pad columns first, at the positions past the prompt's), each row's prompt
    its own length (``_padded_prefill_attention``: a captured prefill, replayed for any prompt up to its bucket)."""
    token = _HOST_POSITIONS.set(_HostPositions(int(last), {}, padded))
    try:
        yield
    finally:
        _HOST_POSITIONS.reset(token)


def host_positions() -> tuple[int, bool] | None:
    """``(last, padded)`` of the ``host_checked_positions`` the current step runs inside, None outside one: what a
    float cache's prefill attention reads to attend causally over the cache's first ``last + 1`` slots
    (``lowbit.kernels.decode_step.causal_prefill_attention``)."""
    host = _HOST_POSITIONS.get()
    return None if host is None else (host.last, host.padded)


def _per_step(key: tuple, build: Callable[[], Any]) -> Any:
    """``build()``, once per step inside ``host_checked_positions`` (``key``: what it reads besides the step's
    positions, which every layer of a step shares: the kv-cache pass hands each ``cache_attention`` the graph's
    positions input). Why: a prefill layer made ~60 small index and mask tensors from
    the positions alone, each a kernel launch on a GPU, the same in all of its layers."""
    host = _HOST_POSITIONS.get()
    if host is None:
        return build()
    if key not in host.per_step:
        host.per_step[key] = build()
    return host.per_step[key]


def layer_kv_heads(gen: dict[str, Any]) -> list[int]:
    """Each layer's kv heads from a step graph's ``meta["generation"]``: one int for all layers, or a list when
    head pruning left layers with different counts."""
    kv = gen["kv_heads"]
    return [int(h) for h in kv] if isinstance(kv, (list, tuple)) else [int(kv)] * int(gen["n_layers"])


def _qrange(bits: int) -> tuple[int, int]:
    if bits not in (2, 4, 8):
        raise ValueError(f"bits={bits}: the quantized cache stores 8, 4 or 2-bit codes")
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Signed codes ``[..., D]`` -> uint8 ``[..., D * bits / 8]`` (stored as ``code - qmin``, low bits first)."""
    qmin, _ = _qrange(bits)
    _check_per_byte(codes.shape[-1], bits)
    return _stored_packed(codes.to(torch.int32) - qmin, bits)


def _check_per_byte(d: int, bits: int) -> None:
    if d % (8 // bits):
        raise ValueError(f"head_dim {d} is not a multiple of {8 // bits} ({bits}-bit codes, {8 // bits} per byte)")


def _stored_packed(stored: torch.Tensor, bits: int) -> torch.Tensor:
    """Stored codes (``0..2**bits-1``, float or int; a multiple of ``8/bits`` along the last dim) -> uint8 bytes,
    ``8/bits`` codes a byte, the lowest channel in the lowest bits: in uint8 throughout (the fields of a byte are
    disjoint, their sum is their or). The one packer of every cache write: ``pack_codes``, ``quantize_keys`` /
    ``quantize_values`` and a prefill's ``_prefill_update``."""
    per = 8 // bits
    codes = stored.to(torch.uint8)
    if per == 1:
        return codes
    shifts = _per_step(("shifts", bits, str(codes.device)),
                       lambda: torch.arange(0, 8, bits, device=codes.device, dtype=torch.uint8))
    return (codes.reshape(*codes.shape[:-1], codes.shape[-1] // per, per) << shifts).sum(-1, dtype=torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 ``[..., D * bits / 8]`` -> stored (unsigned) codes ``[..., D]`` as int32."""
    _qrange(bits)
    per = 8 // bits
    shifts = torch.arange(per, device=packed.device, dtype=torch.int32) * bits
    u = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return u.reshape(*packed.shape[:-1], packed.shape[-1] * per)


def _qparams(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric scale and zero point (float32) of ``bits``-wide codes: the accuracy model's own
    (``asymmetric_qparams``, which ``qparams_from_range`` calls)."""
    return asymmetric_qparams(lo, hi, *_qrange(bits))


def _stored_codes(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """``x``'s codes as the cache stores them, float: ``clamp(round(x / scale) + zero, 0, 2**bits - 1)`` with the
    stored zero ``zero = zp - qmin`` (the signed code ``clamp(round(x / scale) + zp, qmin, qmax)`` minus ``qmin``:
    the same integers, all exact in float32)."""
    return torch.clamp(torch.round(x / scale) + zero, 0, (1 << bits) - 1)


def quantize_keys(k: torch.Tensor, bits: int, block: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keys ``[B, H, S, D]`` (S a multiple of ``block``) -> packed codes, scale, uint8 zero ``[B, H, S/block, D]``."""
    b, h, s, d = k.shape
    if s % block:
        raise ValueError(f"{s} key tokens: only whole blocks of {block} tokens are quantized (the rest stays in "
                         "the float window)")
    _check_per_byte(d, bits)
    kb = k.float().reshape(b, h, s // block, block, d)
    scale, zp = _qparams(kb.amin(3), kb.amax(3), bits)
    zero = zp - _qrange(bits)[0]
    stored = _stored_codes(kb, scale.unsqueeze(3), zero.unsqueeze(3), bits).reshape(b, h, s, d)
    return _stored_packed(stored, bits), scale, zero.to(torch.uint8)


def quantize_values(v: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Values ``[B, H, S, D]`` -> packed codes, scale and uint8 zero ``[B, H, S, D/group]`` (per token groups)."""
    b, h, s, d = v.shape
    if d % group:
        raise ValueError(f"v_group={group} does not divide head_dim {d}")
    _check_per_byte(d, bits)
    vg = v.float().reshape(b, h, s, d // group, group)
    scale, zp = _qparams(vg.amin(-1), vg.amax(-1), bits)
    zero = zp - _qrange(bits)[0]
    stored = _stored_codes(vg, scale.unsqueeze(-1), zero.unsqueeze(-1), bits).reshape(b, h, s, d)
    return _stored_packed(stored, bits), scale, zero.to(torch.uint8)


def dequantize_keys(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    block = packed.shape[2] // scale.shape[2]
    u = unpack_codes(packed, bits).float()
    return (u - zero.float().repeat_interleave(block, 2)) * scale.float().repeat_interleave(block, 2)


def dequantize_values(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    u = unpack_codes(packed, bits).float()
    group = u.shape[-1] // scale.shape[-1]
    return (u - zero.float().repeat_interleave(group, -1)) * scale.float().repeat_interleave(group, -1)


CACHE_PARTS = ("k_codes", "k_scale", "k_zero", "v_codes", "v_scale", "v_zero", "k_float", "v_float")


def cache_layout(batch: int, kv_heads: int, slots: int, head_dim: int, *, bits: int, k_block: int, v_group: int,
                 window: int, sink: int, scale_dtype: torch.dtype = torch.float32,
                 float_dtype: torch.dtype = torch.float32) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """(part, shape, dtype) of one layer's eight cache tensors for ``slots`` positions (a multiple of k_block)."""
    if slots % k_block:
        raise ValueError(f"a packed cache of {slots} slots: must be a multiple of k_block={k_block}")
    db = head_dim * bits // 8
    b, h = batch, kv_heads
    return [("k_codes", (b, h, slots, db), torch.uint8), ("k_scale", (b, h, slots // k_block, head_dim), scale_dtype),
            ("k_zero", (b, h, slots // k_block, head_dim), torch.uint8), ("v_codes", (b, h, slots, db), torch.uint8),
            ("v_scale", (b, h, slots, head_dim // v_group), scale_dtype),
            ("v_zero", (b, h, slots, head_dim // v_group), torch.uint8),
            ("k_float", (b, h, sink + window, head_dim), float_dtype),
            ("v_float", (b, h, sink + window, head_dim), float_dtype)]


def empty_cache(layout: list[tuple[str, tuple[int, ...], torch.dtype]],
                device: torch.device | str | None = None) -> list[torch.Tensor]:
    return [torch.zeros(shape, dtype=dtype, device=device) for _, shape, dtype in layout]


def _check_positions(positions: torch.Tensor, slots: int, k_block: int) -> None:
    """Each sequence's tokens sit at consecutive positions (a prefill from 0, a decode step, a chunk)."""
    if slots % k_block:
        raise ValueError(f"cache_attention: the packed cache has {slots} slots, not a multiple of k_block={k_block}")
    if positions.shape[1] > 1:
        steps = positions[:, 1:] - positions[:, :-1]
        if not bool((steps == 1).all()):
            raise ValueError(f"cache_attention: positions {tuple(positions.shape)} are not consecutive per sequence; "
                             "the packed cache writes each sequence's tokens in order (prefill each prompt at "
                             "positions 0..len-1, as lowbit.generate does)")
    if not bool((positions[:, -1] < slots).all()):
        raise ValueError(f"cache_attention: position {int(positions.max())} is past the cache's {slots} slots")


class _ChunkIndex(NamedTuple):
    """Where ``cache_update`` reads and writes a chunk's (several tokens per sequence) keys: from its positions
    alone, so the same in every layer of a step."""
    n_blocks: int
    ring_at: torch.Tensor  # [B, T] the ring slot of each position of the key blocks the chunk touches (span)
    older: torch.Tensor  # [B, T] the span positions before the chunk (their keys come from the ring)
    from_new: torch.Tensor  # [B, T] the span positions in the chunk
    new_at: torch.Tensor  # [B, T] their column of the chunk's keys (clamped where not)
    at: torch.Tensor  # [B, T] the slot the span position's code goes to (past the cache where no block to write)
    blocks: torch.Tensor  # [B, n_blocks] the block each re-quantized block's scale/zero go to (idem)
    ring_slots: torch.Tensor  # [B, min(L, window)] the ring slots of the chunk's last tokens
    sink_at: torch.Tensor | None  # [B, sink] the chunk's column of each sink position (clamped where not in it)
    sink_hit: torch.Tensor | None  # [B, sink] the sink positions in the chunk


def _chunk_index(pos: torch.Tensor, slots: int, *, k_block: int, window: int, sink: int) -> _ChunkIndex:
    n = pos.shape[1]
    p0 = pos[:, :1]
    # the most blocks n consecutive tokens touch, known from the shape; the exact count read the positions, a host
    # sync in every layer of a prefill. The blocks past a sequence's last token (the bound counts one more than a
    # prefill from a block's start touches, and a shorter sequence's fewer than another's) hold no token of this
    # chunk: their codes and scales go to a padded copy's padding, one index each, cut off, so the slots past the
    # tokens stay as they were
    n_blocks = -(-(n - 1) // k_block) + 1
    offsets = torch.arange(n_blocks * k_block, device=pos.device)
    span = (p0 // k_block) * k_block + offsets  # [B, T] the positions of the blocks the chunk touches
    past_last = span // k_block > pos[:, -1:] // k_block
    at = torch.where(past_last, slots + offsets, span)
    blocks = torch.where(past_last[:, ::k_block], slots // k_block + offsets[:n_blocks], span[:, ::k_block] // k_block)
    sink_at = sink_hit = None
    if sink:
        sp = torch.arange(sink, device=pos.device)[None]
        sink_hit = (sp >= p0) & (sp - p0 < n)
        sink_at = (sp - p0).clamp(0, n - 1)
    return _ChunkIndex(n_blocks, sink + span.remainder(window), span < p0, (span >= p0) & (span - p0 < n),
                       (span - p0).clamp(0, n - 1), at, blocks, sink + pos[:, n - min(n, window):].remainder(window),
                       sink_at, sink_hit)


def cache_update(k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, cache: list[torch.Tensor], *,
                 bits: int, k_block: int, v_group: int, window: int, sink: int,
                 check: bool = True, inplace: bool = False) -> list[torch.Tensor]:
    """Write the new keys/values ``[B, H, L, D]`` at ``positions [B, L]``: values quantized per token, keys into
    the float ring and every key block they touch re-quantized (its older tokens from the ring), the sink kept.
    Returns the new eight tensors (the inputs are not modified).

    ``inplace`` (a decode step, ``L == 1``, on a cache its caller hands over): the eight tensors are written in
    place and returned, so a step touches one key block, one value row and one ring slot per sequence instead of
    copying every cache tensor (out of place, a decode step over a packed cache copied the whole cache once per
    layer, and the step's caller copied it back again). Prefill chunks are always written out of place."""
    kc, ks, kz, vc, vs, vz, kf, vf = cache
    b, h, n, d = k.shape
    slots = kc.shape[2]
    pos = positions.to(torch.long)
    if check and n > 1 and host_positions() is None:  # (a decode step is checked by its driver)
        _check_positions(pos, slots, k_block)
    elif slots % k_block:
        raise ValueError(f"cache_attention: the packed cache has {slots} slots, not a multiple of k_block={k_block}")
    ring = window
    p0 = pos[:, :1]  # [B, 1]
    # values: per token, quantized as they arrive
    inplace = inplace and n == 1
    scatter = torch.Tensor.scatter_ if inplace else torch.Tensor.scatter
    vcode, vscale, vzero = quantize_values(v, bits, v_group)
    idx = pos[:, None, :, None]
    vc = scatter(vc, 2, idx.expand(b, h, n, vcode.shape[-1]), vcode)
    vs = scatter(vs, 2, idx.expand(b, h, n, vscale.shape[-1]), vscale.to(vs.dtype))
    vz = scatter(vz, 2, idx.expand(b, h, n, vzero.shape[-1]), vzero)
    # keys: the blocks from p0's to the last token's, from the old ring (tokens before p0) and the new keys
    if n == 1:  # a decode step touches one block (no host sync: the step can run under a CUDA graph)
        n_blocks, first_block = 1, p0 // k_block
        span = first_block * k_block + torch.arange(k_block, device=k.device)  # [B, k_block] their positions
        ring_at, older_at, at, blk = sink + span.remainder(ring), span < p0, span, first_block
    else:
        ix = _per_step(("chunk", tuple(pos.shape), slots, k_block, window, sink, str(pos.device)),
                       lambda: _chunk_index(pos, slots, k_block=k_block, window=window, sink=sink))
        n_blocks, ring_at, older_at, at, blk = ix.n_blocks, ix.ring_at, ix.older, ix.at, ix.blocks
    tt = ring_at.shape[1]
    ko = kf.gather(2, ring_at[:, None, :, None].expand(b, h, tt, d)).float()
    # zeros stand for tokens not written yet: the range always holds 0, so they change no scale
    older = torch.where(older_at[:, None, :, None], ko, 0.0)
    if n == 1:  # the one new key broadcasts over its block: no index arithmetic and gather for it
        kblk = torch.where((span == p0)[:, None, :, None], k.float(), older)
    else:
        kn = k.gather(2, ix.new_at[:, None, :, None].expand(b, h, tt, d)).float()
        kblk = torch.where(ix.from_new[:, None, :, None], kn, older)
    kcode, kscale, kzero = quantize_keys(kblk, bits, k_block)
    pad = n_blocks * k_block

    def put(t: torch.Tensor, index: torch.Tensor, src: torch.Tensor, extra: int) -> torch.Tensor:
        if inplace:  # one token: its block lies inside the cache (slots are whole blocks, the position < slots)
            return t.scatter_(2, index[:, None, :, None].expand(b, h, index.shape[1], t.shape[3]), src)
        padded = torch.cat([t, t.new_zeros(*t.shape[:2], extra, t.shape[3])], 2)
        out = padded.scatter(2, index[:, None, :, None].expand(b, h, index.shape[1], t.shape[3]), src)
        return out[:, :, : t.shape[2]]

    kc = put(kc, at, kcode, pad)
    ks = put(ks, blk, kscale.to(ks.dtype), n_blocks)
    kz = put(kz, blk, kzero, n_blocks)
    # float ring: the last `ring` new tokens (a longer chunk's earlier ones would be overwritten anyway)
    last = min(n, ring)
    pl = pos[:, n - last:]
    slot = sink + pl.remainder(ring) if n == 1 else ix.ring_slots
    kn, vn = k[:, :, n - last:], v[:, :, n - last:]
    if sink and n == 1:
        # a token below position `sink` is also its sink slot's: one scatter writes both, and any other token its
        # ring slot twice (the same value), in place of the sink's where/gather/copy below
        slot = torch.cat([slot, torch.where(pl < sink, pl, slot)], 1)
        kn, vn = kn.expand(b, h, 2, d), vn.expand(b, h, 2, d)
    ridx = slot[:, None, :, None].expand(b, h, slot.shape[1], d)
    kf = scatter(kf, 2, ridx, kn.to(kf.dtype))
    vf = scatter(vf, 2, ridx, vn.to(vf.dtype))
    if sink and n > 1:  # the sink slots keep positions 0..sink-1
        si = ix.sink_at[:, None, :, None].expand(b, h, sink, d)
        m = ix.sink_hit[:, None, :, None]
        k_sink = torch.where(m, k.gather(2, si).to(kf.dtype), kf[:, :, :sink])
        v_sink = torch.where(m, v.gather(2, si).to(vf.dtype), vf[:, :, :sink])
        if inplace:
            kf[:, :, :sink].copy_(k_sink)
            vf[:, :, :sink].copy_(v_sink)
        else:
            kf = torch.cat([k_sink, kf[:, :, sink:]], 2)
            vf = torch.cat([v_sink, vf[:, :, sink:]], 2)
    return [kc, ks, kz, vc, vs, vz, kf, vf]


def candidate_positions(positions: torch.Tensor, *, window: int, sink: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The positions ``[B, F]`` of a step's float candidates (the sink slots, the ring slots as they were before
    the step, the new tokens, in ``float_candidates``' order) and whether each holds a token written before the
    step or by it (a ring slot of a position below 0 or inside the sink does not)."""
    pos = positions.to(torch.long)
    p0 = pos[:, :1]
    sp = torch.arange(sink, device=pos.device)[None].expand(pos.shape[0], sink)
    r = torch.arange(window, device=pos.device)
    rp = (p0 - 1) - (p0 - 1 - r[None]).remainder(window)  # the position ring slot r holds before this step
    cand = torch.cat([sp, rp, pos], 1)
    held = torch.cat([sp < p0, (rp >= sink) & (rp >= 0), torch.ones_like(pos, dtype=torch.bool)], 1)
    return cand, held


def float_candidates(k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, k_float: torch.Tensor,
                     v_float: torch.Tensor, *, window: int, sink: int, sliding: int | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The float tokens a step's queries may read: the OLD sink and ring slots (tokens before this step) and
    the new tokens: keys/values ``[B, H, F, D]`` and a mask ``[B, L, F]`` (query at t reads float token j when
    ``j <= t`` and ``j < sink`` or ``j > t - window``; and ``j > t - sliding`` in a sliding-window layer, the sink
    too)."""
    mask = _candidate_mask(positions.to(torch.long), window=window, sink=sink, sliding=sliding)
    kk = torch.cat([k_float.to(k.dtype), k], 2)
    vv = torch.cat([v_float.to(v.dtype), v], 2)
    return kk, vv, mask


def _candidate_mask(pos: torch.Tensor, *, window: int, sink: int, sliding: int | None) -> torch.Tensor:
    """``float_candidates``' mask ``[B, L, F]``."""
    cand, older = candidate_positions(pos, window=window, sink=sink)
    t = pos[:, :, None]
    j = cand[:, None, :]
    mask = older[:, None, :] & (j <= t) & ((j < sink) | (j > t - window))
    if sliding is not None:
        mask = mask & (j > t - sliding)
    return mask


def _quantized_slot_mask(pos: torch.Tensor, read: int, *, window: int, sink: int,
                         sliding: int | None) -> torch.Tensor:
    """``[B, L, read]``: a query at t reads quantized slot j when ``sink <= j <= t - window`` (and ``j > t -
    sliding``)."""
    slots = torch.arange(read, device=pos.device)[None, None]
    t = pos[:, :, None]
    qmask = (slots >= sink) & (slots <= t - window)
    return qmask & (slots > t - sliding) if sliding is not None else qmask


def _attend_mask(pos: torch.Tensor, read: int, *, window: int, sink: int, sliding: int | None) -> torch.Tensor:
    """``_attend``'s mask ``[B, 1, L, read + F]``: the quantized slots (``_quantized_slot_mask``), then the float
    candidates as ``float_candidates`` masks them."""
    return torch.cat([_quantized_slot_mask(pos, read, window=window, sink=sink, sliding=sliding),
                      _candidate_mask(pos, window=window, sink=sink, sliding=sliding)], 2)[:, None]


def _quantized_extent(positions: torch.Tensor, slots: int, *, window: int, k_block: int) -> int:
    """Cache slots ``cache_attention`` dequantizes: the whole key blocks up to the last token any query reads
    quantized (``t - window`` for the latest position t), at least one. Why: dequantizing every slot made a CPU
    decode step's cost grow with ``max_length``, not with the tokens written (28 ms per SmolLM2 layer at 2048 slots,
    7 at 128, 40 tokens in). The slots past it are masked, so the answer is the same. All of them on a GPU (reading
    the positions there is a host sync per layer and step, and a CUDA graph is replayed at other positions) unless
    the caller gave the largest position from the host (``host_checked_positions``: a prefill), and while
    ``torch.compile`` traces."""
    if torch.compiler.is_compiling():
        return slots
    host = host_positions()
    host_last = None if host is None else host[0]
    if host_last is None and positions.device.type != "cpu":
        return slots
    last = (host_last if host_last is not None else int(positions.max())) - window  # the latest quantized token read
    return min(slots, max(k_block, (last // k_block + 1) * k_block))


@register_op("cache_attention", num_outputs=9)
def cache_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                    k_codes: torch.Tensor, k_scale: torch.Tensor, k_zero: torch.Tensor, v_codes: torch.Tensor,
                    v_scale: torch.Tensor, v_zero: torch.Tensor, k_float: torch.Tensor, v_float: torch.Tensor, *,
                    bits: int, k_block: int, v_group: int, window: int, sink: int,
                    scale: float | None = None, sliding: int | None = None,
                    bias: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """Attention of a step's queries over a packed quantized KV cache after writing the step's keys/values.

    ``sliding``: the layer's sliding window (a query at t reads positions after ``t - sliding`` only, the sink
    too), as the float step masks it (Mistral, Gemma 3, Ministral, OLMo 3); None for full attention. ``bias``: the
    float step's additive mask ``[B|1, H|1, L|1, slots]`` over key positions (Bloom's ALiBi: a slope per head times
    the position where a key is read, -inf elsewhere), added to each key's score by its position."""
    cache = [k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_float, v_float]
    if q.device.type == "meta":
        return (torch.empty_like(q), *[c.clone() for c in cache])
    kw = dict(bits=bits, k_block=k_block, v_group=v_group, window=window, sink=sink)
    host = _HOST_POSITIONS.get()
    if host is not None and host.padded:
        if k.shape[2] != host.last + 1:
            raise ValueError(f"cache_attention: a padded prefill of {host.last + 1} columns "
                             f"(host_checked_positions(padded=True)) got keys {tuple(k.shape)}")
        return _padded_prefill_attention(q, k, v, positions, cache, scale=scale, sliding=sliding, bias=bias, **kw)
    if k.shape[2] > 1 and host is not None and host.last == k.shape[2] - 1:  # a prefill from position 0
        return _prefill_attention(q, k, v, positions, cache, scale=scale, sliding=sliding, bias=bias, **kw)
    new = cache_update(k, v, positions, cache, **kw)
    return _attend(q, k, v, positions, k_float, v_float, new, scale=scale, sliding=sliding, bias=bias, **kw)


def cache_attention_into(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                         *cache: torch.Tensor, bits: int, k_block: int, v_group: int, window: int, sink: int,
                         scale: float | None = None, sliding: int | None = None,
                         bias: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """``cache_attention`` whose decode step writes into the cache tensors it is given and returns them: the torch
    backend's step graph, whose caller hands its cache over (``donated``). Why: out of place, every decode step
    copied each layer's eight cache tensors whole (a 2-layer toy at max_length 4096: 2.6 tokens/s, in place 11.6);
    the float cache's writes are in place the same way (``scatter_into``). Prefill chunks, meta tensors:
    ``cache_attention``."""
    if k.shape[2] != 1 or q.device.type == "meta":
        return cache_attention(q, k, v, positions, *cache, bits=bits, k_block=k_block, v_group=v_group,
                               window=window, sink=sink, scale=scale, sliding=sliding, bias=bias)
    kw = dict(bits=bits, k_block=k_block, v_group=v_group, window=window, sink=sink)
    # the float candidates read the ring and sink as they were before this step's write
    old_float = cache[6].clone(), cache[7].clone()
    new = cache_update(k, v, positions, list(cache), inplace=True, **kw)
    return _attend(q, k, v, positions, *old_float, new, scale=scale, sliding=sliding, bias=bias, **kw)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, k_float: torch.Tensor,
            v_float: torch.Tensor, new: list[torch.Tensor], *, bits: int, k_block: int, v_group: int, window: int,
            sink: int, scale: float | None, sliding: int | None,
            bias: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """The queries over the written cache ``new``: its quantized tokens and the float candidates of the ring and
    sink ``k_float`` / ``v_float`` as they were before the step, with the step's own keys/values; ``bias`` (over
    key positions) added to each key's score, read at the slot of a quantized token and at a candidate's position."""
    b, hq, n, d = q.shape
    pos = positions.to(torch.long)
    # quantized tokens: sink <= j <= t - window, in the blocks that hold them
    read = _quantized_extent(pos, new[0].shape[2], window=window, k_block=k_block)
    kq = dequantize_keys(new[0][:, :, :read], new[1][:, :, :read // k_block], new[2][:, :, :read // k_block], bits)
    vq = dequantize_values(new[3][:, :, :read], new[4][:, :, :read], new[5][:, :, :read], bits)
    # then the float candidates (float_candidates' keys/values, in one cat each); the mask is made once per step
    # where the step's positions are the host's (the same in every layer)
    kf32, vf32 = k.float(), v.float()
    keys = torch.cat([kq, k_float.to(kf32.dtype), kf32], 2)
    values = torch.cat([vq, v_float.to(vf32.dtype), vf32], 2)
    mask = _per_step(("attend", tuple(pos.shape), read, window, sink, sliding, str(pos.device)),
                     lambda: _attend_mask(pos, read, window=window, sink=sink, sliding=sliding))  # [B, 1, L, S + F]
    if bias is not None:
        mask = torch.where(mask, _bias_at_keys(bias.float(), pos, read, window=window, sink=sink), float("-inf"))
    out = F.scaled_dot_product_attention(q.float(), keys, values, attn_mask=mask,
                                         scale=scale if scale is not None else 1 / math.sqrt(d),
                                         enable_gqa=hq != keys.shape[1])
    return (out.to(q.dtype), *new)


def _bias_at_keys(bias: torch.Tensor, positions: torch.Tensor, read: int, *, window: int, sink: int) -> torch.Tensor:
    """An additive mask over key positions ``[B|1, H|1, L|1, slots]`` read at ``_attend``'s keys: the quantized
    slots ``0..read-1`` (a slot holds its position) and the float candidates' positions; ``[B, H|1, L|1, read + F]``.
    A candidate slot that holds no token (a position below 0) reads position 0: the mask leaves it out anyway."""
    b = positions.shape[0]
    bias = bias.expand(b, *bias.shape[1:])
    cand, _ = candidate_positions(positions, window=window, sink=sink)
    index = cand.clamp(0, bias.shape[-1] - 1)[:, None, None, :].expand(*bias.shape[:3], cand.shape[1])
    return torch.cat([bias[..., :read], bias.gather(3, index)], 3)


class _PrefillCodes(NamedTuple):
    """A prefill's keys and values as ``_prefill_update`` quantized them, before packing: what ``_prefill_attention``
    dequantizes, with the cache's arithmetic (``(stored - zero) * scale``, the scale as stored)."""
    k_codes: torch.Tensor  # [B, H, blocks, k_block, D] stored codes (0..2**bits-1) as float32
    k_zero: torch.Tensor  # [B, H, blocks, D] stored zero as float32
    k_scale: torch.Tensor  # [B, H, blocks, D] the stored scale as float32
    v_codes: torch.Tensor  # [B, H, L, D/v_group, v_group]
    v_zero: torch.Tensor  # [B, H, L, D/v_group]
    v_scale: torch.Tensor  # [B, H, L, D/v_group]


def _prefill_update(k: torch.Tensor, v: torch.Tensor, cache: list[torch.Tensor], *, bits: int, k_block: int,
                    v_group: int, window: int, sink: int,
                    last: torch.Tensor | None = None) -> tuple[list[torch.Tensor], _PrefillCodes]:
    """``cache_update`` of a prefill: every sequence's tokens at positions ``0..L-1`` (``host_checked_positions``
    vouches). The same eight tensors bit for bit, in fewer ops (ATen ops a layer, each a kernel launch on a GPU,
    where the chunk's general path gathered keys from the ring, scattered into padded copies and quantized keys
    and values apart): no token is older than the chunk, so its key blocks are its keys (zero past the last) and
    every write is one cat of the new rows and the slots past them; keys' and values' ranges go through one
    ``_qparams`` and their codes through one pack; the float ring and sink are one cat of the keys' rows.
    ``last`` ``[B, 1]`` (a padded prefill): each row's prompt ends there, its pads after it; the float sink and ring
    take the prompt's tokens only (``_padded_float``)."""
    kc, ks, kz, vc, vs, vz, kf, vf = cache
    b, h, n, d = k.shape
    if kc.shape[2] % k_block:
        raise ValueError(f"cache_attention: the packed cache has {kc.shape[2]} slots, not a multiple of "
                         f"k_block={k_block}")
    if d % v_group:
        raise ValueError(f"v_group={v_group} does not divide head_dim {d}")
    _check_per_byte(d, bits)
    qmin, _ = _qrange(bits)
    blocks = -(-n // k_block)
    span = blocks * k_block
    keys = k.float()
    if span > n:  # the last block's slots past the prompt quantize zeros, as the chunk's path did
        pad = _per_step(("zeros", b, h, span - n, d, str(k.device)),
                        lambda: torch.zeros(b, h, span - n, d, dtype=torch.float32, device=k.device))
        keys = torch.cat([keys, pad], 2)
    keys = keys.reshape(b, h, blocks, k_block, d)
    values = v.float().reshape(b, h, n, d // v_group, v_group)
    k_lo, k_hi = torch.aminmax(keys, dim=3)
    v_lo, v_hi = torch.aminmax(values, dim=-1)
    split = k_lo.numel()
    scale, zp = _qparams(torch.cat([k_lo.flatten(), v_lo.flatten()]), torch.cat([k_hi.flatten(), v_hi.flatten()]),
                         bits)
    zero = zp - qmin
    k_scale, v_scale = scale[:split].view(k_lo.shape), scale[split:].view(v_lo.shape)
    k_zero, v_zero = zero[:split].view(k_lo.shape), zero[split:].view(v_lo.shape)
    k_codes = _stored_codes(keys, k_scale[:, :, :, None], k_zero[:, :, :, None], bits)
    v_codes = _stored_codes(values, v_scale[..., None], v_zero[..., None], bits)
    packed = _stored_packed(torch.cat([k_codes.flatten(), v_codes.flatten()]), bits)
    zero_u8 = zero.to(torch.uint8)
    k_bytes = b * h * span * d * bits // 8
    k_scale_stored, v_scale_stored = k_scale.to(ks.dtype), v_scale.to(vs.dtype)
    new = [torch.cat([packed[:k_bytes].view(b, h, span, -1), kc[:, :, span:]], 2),
           torch.cat([k_scale_stored, ks[:, :, blocks:]], 2),
           torch.cat([zero_u8[:split].view(k_lo.shape), kz[:, :, blocks:]], 2),
           torch.cat([packed[k_bytes:].view(b, h, n, -1), vc[:, :, n:]], 2),
           torch.cat([v_scale_stored, vs[:, :, n:]], 2),
           torch.cat([zero_u8[split:].view(v_lo.shape), vz[:, :, n:]], 2),
           *(_prefill_float(x, old, window=window, sink=sink) if last is None
             else _padded_float(x, old, last, window=window, sink=sink) for x, old in ((k, kf), (v, vf)))]
    codes = _PrefillCodes(k_codes, k_zero, k_scale_stored.float(), v_codes, v_zero, v_scale_stored.float())
    return new, codes


def _prefill_float(x: torch.Tensor, old: torch.Tensor, *, window: int, sink: int) -> torch.Tensor:
    """The float sink and ring after a prefill of ``x`` ``[B, H, L, D]`` at positions ``0..L-1``: sink slot j holds
    position j, ring slot ``sink + p % window`` the latest position p; slots no position reaches keep ``old``."""
    n = x.shape[2]
    parts = [x[:, :, :min(sink, n)], old[:, :, min(sink, n):sink]]
    if n >= window:
        turn = n % window  # ring slots 0..turn-1 hold the last `turn` positions, the rest the `window - turn` before
        parts += [x[:, :, n - turn:], x[:, :, n - window:n - turn]]
    else:
        parts += [x[:, :, :n], old[:, :, sink + n:]]
    return torch.cat([p for p in parts if p.shape[2]], 2).to(old.dtype)


def _padded_float(x: torch.Tensor, old: torch.Tensor, last: torch.Tensor, *, window: int, sink: int) -> torch.Tensor:
    """``_prefill_float`` of ``x`` ``[B, H, L, D]`` in position order whose prompt ends at ``last`` ``[B, 1]`` (on
    the device: a replayed graph's prompts differ), its pads after: sink slot j holds position j and ring slot
    ``sink + r`` the latest prompt position ``p`` with ``p % window == r``; slots no prompt position reaches keep
    ``old``. Why: written as ``_prefill_float`` writes ``L`` tokens, the pads' ring slots would overwrite the prompt's
    last tokens, the float ones its first decode steps read."""
    b, h, n, d = x.shape

    def index() -> tuple[torch.Tensor, torch.Tensor]:
        ring = last - (last - torch.arange(window, device=last.device)[None]).remainder(window)  # [B, window]
        sp = torch.arange(sink, device=last.device)[None].expand(b, sink)
        return torch.cat([sp, ring], 1).clamp(0, n - 1), torch.cat([sp <= last, ring >= 0], 1)

    at, held = _per_step(("padded float", b, n, window, sink, str(last.device)), index)
    src = x.gather(2, at[:, None, :, None].expand(b, h, at.shape[1], d)).to(old.dtype)
    return torch.where(held[:, None, :, None], src, old)


def _dequantized_prefix(codes: _PrefillCodes, read: int, k_block: int,
                        shape: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The keys and values of slots ``0..read-1`` ``[B, H, read, D]`` (``shape``: B, H, D) from a prefill's codes
    before packing (no unpack, no zero/scale repeated per slot), ``_attend``'s dequantized slots bit for bit."""
    b, h, d = shape
    rb = read // k_block
    keys = ((codes.k_codes[:, :, :rb] - codes.k_zero[:, :, :rb, None]) * codes.k_scale[:, :, :rb, None])
    values = ((codes.v_codes[:, :, :read] - codes.v_zero[:, :, :read, :, None])
              * codes.v_scale[:, :, :read, :, None])
    return keys.reshape(b, h, read, d), values.reshape(b, h, read, d)


def _prefill_read(n: int, *, window: int, sink: int, k_block: int) -> int:
    """The quantized slots a prefill of ``n`` tokens from position 0 reads (``_quantized_extent``'s blocks up to
    the last slot read, ``n - 1 - window``: all written), 0 when no query reads one."""
    return ((n - 1 - window) // k_block + 1) * k_block if n - 1 - window >= sink else 0


def _padded_prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                              cache: list[torch.Tensor], *, bits: int, k_block: int, v_group: int, window: int,
                              sink: int, scale: float | None, sliding: int | None,
                              bias: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """``_prefill_attention`` of ``bucketed`` rows (``host_checked_positions(L - 1, padded=True)``): a row's
    columns hold positions ``0..L-1``, its prompt's ``0..n-1`` in the last ``n`` columns and its pads' ``n..L-1``
    before them, ``n`` its own and known on the device only (a captured prefill replays for every prompt up to its
    bucket, rows of different lengths together).

    The keys/values are written in position order (gathered by the inverse permutation), so the prompt lands in
    slots ``0..n-1`` as the unpadded prefill writes it, the pads in ``n..L-1``, past every prompt token: the decode
    steps overwrite a value slot before reading it and re-quantize a key block from the float ring at its first
    token read (the block holding ``n - 1``, whose scale saw pads, at the first decode step). The float sink and
    ring take the prompt's tokens only (``_padded_float``). A query at ``t`` reads the quantized slots ``sink..t -
    window`` (``window >= k_block``: never the block holding pads) and the step's keys at positions ``<= t`` as the
    unpadded prefill masks them; the old float slots hold no token before position 0, so they are left out. The
    cache equals the unpadded prefill's wherever decoding reads it; a prompt token's output equals its own to fp32
    rounding (SDPA over more, masked keys). A pad query reads at least its own key, so nothing turns NaN."""
    kw = dict(bits=bits, k_block=k_block, v_group=v_group, window=window, sink=sink)
    b, hq, n, d = q.shape
    h = k.shape[1]
    pos = positions.to(torch.long)
    columns = _per_step(("padded order", b, n, str(pos.device)),  # the column of each position, per row
                        lambda: torch.empty_like(pos).scatter_(1, pos, torch.arange(n, device=pos.device).expand(b, n)))
    by_position = columns[:, None, :, None].expand(b, h, n, d)
    new, codes = _prefill_update(k.gather(2, by_position), v.gather(2, by_position), cache, last=pos[:, -1:], **kw)
    read = _prefill_read(n, window=window, sink=sink, k_block=k_block)
    keys, values = [k.float()], [v.float()]
    if read:
        kq, vq = _dequantized_prefix(codes, read, k_block, (b, h, d))
        keys.insert(0, kq)
        values.insert(0, vq)

    def allowed() -> torch.Tensor:
        """``[B, 1, L, read + L]``: ``_attend_mask``'s rule over the quantized slots, then the step's keys."""
        t, j = pos[:, :, None], pos[:, None, :]
        mask = (j <= t) & ((j < sink) | (j > t - window))
        if sliding is not None:
            mask = mask & (j > t - sliding)
        quantized = _quantized_slot_mask(pos, read, window=window, sink=sink, sliding=sliding)
        return torch.cat([quantized, mask], 2)[:, None]

    mask = _per_step(("padded prefill", b, n, read, window, sink, sliding, str(pos.device)), allowed)
    if bias is None:
        additive = _per_step(("padded additive", b, n, read, window, sink, sliding, str(pos.device)),
                             lambda: torch.where(mask, 0.0, float("-inf")).float())
    else:  # the bias over key positions, read at the quantized slots and at the step's keys' positions
        bias = bias.float().expand(b, *bias.shape[1:])
        at_keys = bias.gather(3, pos[:, None, None, :].expand(*bias.shape[:3], n))
        additive = torch.where(mask, torch.cat([bias[..., :read], at_keys], 3), float("-inf"))
    out = F.scaled_dot_product_attention(q.float(), torch.cat(keys, 2), torch.cat(values, 2), attn_mask=additive,
                                         scale=scale if scale is not None else 1 / math.sqrt(d),
                                         enable_gqa=hq != h)
    return (out.to(q.dtype), *new)


def _prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                       cache: list[torch.Tensor], *, bits: int, k_block: int, v_group: int, window: int, sink: int,
                       scale: float | None, sliding: int | None,
                       bias: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """``cache_attention`` of a prefill from position 0 (``host_checked_positions(L - 1)``): ``_prefill_update``'s
    write, then ``_attend``'s attention bit for bit, where a query at t reads quantized slots ``sink..t - window``:
    none when ``L - 1 - window < sink`` (the quantized part is neither dequantized nor attended), else the slots
    it wrote, dequantized from its codes before packing (no unpack, no zero/scale repeated per slot); the mask,
    made once a step, is the additive one SDPA makes of the boolean (``where(mask, 0, -inf)``)."""
    kw = dict(bits=bits, k_block=k_block, v_group=v_group, window=window, sink=sink)
    new, codes = _prefill_update(k, v, cache, **kw)
    if bias is not None:
        return _attend(q, k, v, positions, cache[6], cache[7], new, scale=scale, sliding=sliding, bias=bias, **kw)
    b, hq, n, d = q.shape
    pos = positions.to(torch.long)
    keys, values = [cache[6].float(), k.float()], [cache[7].float(), v.float()]
    read = _prefill_read(n, window=window, sink=sink, k_block=k_block)
    if read:
        kq, vq = _dequantized_prefix(codes, read, k_block, (b, k.shape[1], d))
        keys.insert(0, kq)
        values.insert(0, vq)

    def additive_mask() -> torch.Tensor:
        if read:
            mask = _attend_mask(pos, read, window=window, sink=sink, sliding=sliding)
        else:
            mask = _candidate_mask(pos, window=window, sink=sink, sliding=sliding)[:, None]
        return torch.where(mask, 0.0, float("-inf")).float()  # (float32 as the queries, whatever the default)

    mask = _per_step(("prefill", tuple(pos.shape), read, window, sink, sliding, str(pos.device)), additive_mask)
    out = F.scaled_dot_product_attention(q.float(), torch.cat(keys, 2), torch.cat(values, 2), attn_mask=mask,
                                         scale=scale if scale is not None else 1 / math.sqrt(d),
                                         enable_gqa=hq != k.shape[1])
    return (out.to(q.dtype), *new)
