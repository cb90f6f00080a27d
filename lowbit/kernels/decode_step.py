"""Kernels of a decode step whose aten forms cost more than their work: the greedy argmax of the logits, the write of
a step's keys/values into a float KV cache, and the step's attention over that cache (``decode_sdpa``).

Measured inside the 7B-shaped stack's CUDA-graph decode step on the H200 (``tools/profile_decode.py``, session 7):
``logits.float().argmax(-1)`` took a 3.5 µs copy plus a 10.3 µs single-block reduction over 32000 logits, and
each ``cache.scatter_(2, index, new)`` 4.2 µs (8 per step) for 8 KB of new rows. Both are launch- and
latency-bound: ``row_argmax`` reads a row in one wide tile per program (no fp32 copy), ``write_cache_rows`` copies
one ``head_dim`` row per program to the slot its position names.

- ``torch.ops.lowbit.row_argmax(x)``: ``x.argmax(-1)`` over the last dim of a 2-D ``[B, V]`` tensor, the first
  index of the maximum as torch returns it (NaNs: torch returns the first NaN; here a NaN never wins, so a row with
  NaNs can differ — a NaN logit is already a broken model). Reference: ``torch.argmax``. ``row_argmax_checked``
  adds each row's not-finite flag in the same pass (``not_finite_rows``), which a greedy step reads to refuse NaN
  logits by name.
- ``write_cache_rows(cache, positions, new)``: ``cache[b, h, positions[b, n], :] = new[b, h, n, :]``, in place:
  the form of ``cache.scatter_(2, index, new)`` whose index is the positions broadcast over heads and head_dim
  (``cache_rows_index`` recognises it, so callers keep the general scatter for any other index).
- ``torch.ops.lowbit.rotary_write_kv(q, k, v, cos, sin, k_cache, v_cache, index)``: the IR's ``rotary`` of q and
  k, the rotated keys and the values written into the float caches at a row index, in one launch (the triton
  backend's ``rotary_cache`` rewrite; measured in that step: Inductor's two rotary kernels 9.4 µs and the eight
  ``_write_rows`` 12.2 µs per 4-layer step). Reference: ``rotary_write_kv_ref`` (rotary, ``scatter_``). Its
  ``rotary_dim`` takes a partial rotary (GPT-NeoX, Phi, StableLM): the first channels turned, the rest copied.
- ``torch.ops.lowbit.write_kv(k, v, k_cache, v_cache, index)``: a layer without rotary (GPT-2, Bloom, a NoPE
  layer) writes its keys and values into the float caches in one launch of the same kernel with no rotary, where
  two ``scatter_into`` were a ``_write_rows`` launch each (the triton backend's ``cache_write`` rewrite). Reference:
  ``write_kv_ref`` (two ``scatter_``).
- ``torch.ops.lowbit.decode_sdpa(q, k, v, mask, scale, enable_gqa)``: one query row per sequence over a float
  cache, flash-decoding (chunks of ``DECODE_SDPA_CHUNK`` slots, then a log-sum-exp merge): 1.69x torch's SDPA at
  batch 1 x 32 kv heads over 768 slots on the H200 (``tools/bench_decode_sdpa.py``, session 11); where
  ``decode_sdpa_supported`` names a reason (prefill rows, more than ``DECODE_SDPA_MAX_HEADS`` pairs, fp32, ...)
  the reference runs. Reference: ``decode_sdpa_ref`` (torch's SDPA).
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from lowbit.kernels._common import (
    cdiv,
    check,
    interpreting,
    is_pow2,
    launcher,
    next_pow2,
    on_kernel_device,
    pdl_launch_options,
    pdl_launches,
    pdl_prologue,
    round_to_bf16,
)

__all__ = ["cache_rows_index", "causal_prefill_attention", "decode_sdpa", "decode_sdpa_layout_unsupported",
           "decode_sdpa_pdl", "decode_sdpa_ref", "decode_sdpa_supported",
           "rotary_decode_sdpa", "rotary_decode_sdpa_unsupported", "split_counters",
           "rotary_head_dim_unsupported", "rotary_write_kv", "rotary_write_kv_ref", "rotary_write_kv_unsupported",
           "row_argmax", "row_argmax_ref", "row_argmax_checked", "row_argmax_checked_ref", "not_finite_rows",
           "write_cache_rows", "write_cache_rows_ref", "write_kv", "write_kv_ref", "write_kv_unsupported"]

ARGMAX_TILE = 32768
"""Logits per program and loop step: a 32K vocabulary (Llama-2) is one load per row, read by 16 warps."""


def row_argmax_ref(x: torch.Tensor) -> torch.Tensor:
    return x.argmax(-1)


def not_finite_rows(x: torch.Tensor) -> torch.Tensor:
    """``[B]`` int64, 1 where a row of ``[B, V]`` logits has no finite maximum (a NaN, +inf, or every logit -inf):
    there is no token to choose."""
    return (~torch.isfinite(x.amax(-1))).long()


def row_argmax_checked_ref(x: torch.Tensor) -> torch.Tensor:
    return torch.stack((x.argmax(-1), not_finite_rows(x)))


@triton.jit
def _row_argmax(x_ptr, o_ptr, V, sxb, B, CHECK: tl.constexpr, BLOCK: tl.constexpr):
    """One row per program: the running (max, first index) over ``BLOCK``-wide tiles, ties to the left. ``CHECK``:
    also ``o[B + row] = 1`` where the row has a NaN or its maximum is infinite (``not_finite_rows``)."""
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    best = tl.full((), float("-inf"), tl.float32)
    best_i = tl.full((), 0, tl.int64)
    nan = tl.full((), 0, tl.int32)
    for start in range(0, V, BLOCK):
        ok = offs + start < V
        v = tl.load(x_ptr + row * sxb + start + offs, mask=ok, other=float("-inf")).to(tl.float32)
        if CHECK:
            nan = nan | tl.max((v != v).to(tl.int32), 0)
        v = tl.where(v != v, float("-inf"), v)  # a NaN never wins (see the module docstring)
        m = tl.max(v, 0)
        i = tl.argmax(v, 0, tie_break_left=True).to(tl.int64) + start
        take = m > best  # strictly greater: an equal maximum in a later tile keeps the first index
        best_i = tl.where(take, i, best_i)
        best = tl.where(take, m, best)
    tl.store(o_ptr + row, best_i)
    if CHECK:
        bad = (nan != 0) | (best == float("inf")) | (best == float("-inf"))
        tl.store(o_ptr + B + row, bad.to(tl.int64))


def _launch_row_argmax(x: torch.Tensor, out: torch.Tensor, check: bool) -> None:
    if x.stride(1) != 1:
        x = x.contiguous()
    b, v = x.shape
    block = min(ARGMAX_TILE, next_pow2(v))
    launcher(x, _row_argmax)[(b,)](x, out, v, x.stride(0), b, CHECK=check, BLOCK=block,
                                   num_warps=16 if block >= 8192 else 4)


@triton_op("lowbit::row_argmax", mutates_args=())
def row_argmax(x: torch.Tensor) -> torch.Tensor:
    """``x.argmax(-1)`` for a 2-D ``[B, V]`` tensor (int64 ``[B]``); torch's own argmax off the kernel device."""
    check(x.dim() == 2, "row_argmax", f"expects [B, V] logits, got shape {tuple(x.shape)}")
    if not on_kernel_device(x):
        return row_argmax_ref(x)
    out = torch.empty(x.shape[0], device=x.device, dtype=torch.int64)
    _launch_row_argmax(x, out, False)
    return out


@triton_op("lowbit::row_argmax_checked", mutates_args=())
def row_argmax_checked(x: torch.Tensor) -> torch.Tensor:
    """``[2, B]`` int64: ``row_argmax(x)`` and ``not_finite_rows(x)``, in one pass over the logits. Why one kernel: a
    greedy decode step must say when its logits broke (NaN), and aten's amax + isfinite over the vocabulary were
    four more launches and ~30 µs per step on the H200 (a 7B-shaped step is ~350 µs)."""
    check(x.dim() == 2, "row_argmax_checked", f"expects [B, V] logits, got shape {tuple(x.shape)}")
    if not on_kernel_device(x):
        return row_argmax_checked_ref(x)
    out = torch.empty(2, x.shape[0], device=x.device, dtype=torch.int64)
    _launch_row_argmax(x, out, True)
    return out


def cache_rows_index(index: torch.Tensor, dim: int, src: torch.Tensor) -> bool:
    """True when ``scatter_(dim, index, src)`` on a ``[B, H, S, D]`` cache writes whole rows at per-(b, n)
    positions: dim 2 and an index broadcast over heads and head_dim (strides 0), as a decode step's is. A dim of
    size 1 broadcasts whatever its stride (``expand`` keeps it: one kv head, MQA)."""
    return (dim == 2 and index.dim() == 4 and index.shape == src.shape
            and (index.stride(1) == 0 or index.shape[1] == 1) and (index.stride(3) == 0 or index.shape[3] == 1))


def write_cache_rows_ref(cache: torch.Tensor, index: torch.Tensor, src: torch.Tensor) -> None:
    cache.scatter_(2, index, src)


@triton.jit
def _write_rows(c_ptr, i_ptr, s_ptr, H, N, D, scb, sch, scs, sib, sin, ssb, ssh, ssn, BLOCK_D: tl.constexpr):
    """Program ``(b*H + h)*N + n`` copies ``src[b, h, n, :]`` to ``cache[b, h, index[b, 0, n, 0], :]``."""
    pid = tl.program_id(0)
    n = pid % N
    bh = pid // N
    h = bh % H
    b = bh // H
    pos = tl.load(i_ptr + b * sib + n * sin)
    offs = tl.arange(0, BLOCK_D)
    ok = offs < D
    row = tl.load(s_ptr + b * ssb + h * ssh + n * ssn + offs, mask=ok)
    tl.store(c_ptr + b * scb + h * sch + pos * scs + offs, row.to(c_ptr.dtype.element_ty), mask=ok)


def write_cache_rows(cache: torch.Tensor, index: torch.Tensor, src: torch.Tensor, *, checked: bool = False) -> None:
    """``cache.scatter_(2, index, src)`` for an index ``cache_rows_index`` accepts, one launch on the kernel device
    (the reference elsewhere). Positions must lie inside the cache (the caller's contract, as for ``scatter_``).

    ``checked=True``: the caller has just called ``cache_rows_index`` itself (``scatter_into`` does, to pick this
    path), so the check and its message are not built again on every decode step's cache write."""
    if not checked:
        check(cache_rows_index(index, 2, src), "write_cache_rows",
              f"index {tuple(index.shape)} strides {index.stride()} is not a row index for src {tuple(src.shape)}")
    if not (on_kernel_device(cache) and on_kernel_device(src)) or cache.stride(3) != 1 or src.stride(3) != 1:
        write_cache_rows_ref(cache, index, src)
        return
    b, h, n, d = src.shape
    _write_rows[(b * h * n,)](cache, index, src, h, n, d, cache.stride(0), cache.stride(1), cache.stride(2),
                              index.stride(0), index.stride(2), src.stride(0), src.stride(1), src.stride(2),
                              BLOCK_D=next_pow2(d), num_warps=1)


ROTARY_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
"""Activation (and float cache) dtypes ``rotary_write_kv``'s kernel takes: it rounds as torch rounds each of them."""


def rotary_head_dim_unsupported(d: int) -> str | None:
    """Why ``rotary_write_kv``'s kernel cannot take rows of ``d`` channels (None: it can): the op refuses them,
    the triton backend does not fuse them (``plan_rotary_cache``); each names the head_dim its own way."""
    return None if is_pow2(d) and 16 <= d <= 256 else "the kernel takes a power of two from 16 to 256"


def rotary_write_kv_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                        k_cache: torch.Tensor, v_cache: torch.Tensor, index: torch.Tensor,
                        rotary_dim: int | None = None) -> torch.Tensor:
    """The ops the kernel replaces: the IR's ``rotary`` of the keys scattered into ``k_cache``, the values into
    ``v_cache`` (``scatter_(2, index, ·)``, in place), the IR's ``rotary`` of the queries returned. ``rotary_dim``
    (None: the whole head): a partial rotary's width, the IR's ``rotary`` of each head's first ``rotary_dim``
    channels concatenated with the rest unchanged, as GPT-NeoX, Phi and StableLM steps compute it."""
    from lowbit.ir.ops import rotary

    def rotated(x: torch.Tensor) -> torch.Tensor:
        if rotary_dim is None or rotary_dim == x.shape[-1]:
            return rotary(x, cos, sin)
        return torch.cat((rotary(x[..., :rotary_dim], cos, sin), x[..., rotary_dim:]), -1)

    k_cache.scatter_(2, index, rotated(k))
    v_cache.scatter_(2, index, v)
    return rotated(q)


def _rows(t: torch.Tensor, b: int, n: int, d: int) -> torch.Tensor | None:
    """``cos``/``sin`` as a ``[B, 1, N, D]`` view (stride 0 where the graph broadcasts), or None when they vary
    per head or do not broadcast to it."""
    if t.dim() > 4 or (t.dim() == 4 and t.shape[1] != 1):
        return None
    try:
        return torch.broadcast_to(t, (b, 1, n, d))
    except RuntimeError:
        return None


def rotary_write_kv_unsupported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                                sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                index: torch.Tensor, rotary_dim: int | None = None) -> str | None:
    """Why ``rotary_write_kv``'s kernel does not take these operands (None: it does; the op then runs the
    reference): one dtype of ``ROTARY_DTYPES`` for all seven tensors, caches ``[B, Hkv, S, D]`` matching the
    keys, ``cos``/``sin`` broadcast over heads (``rotary_dim`` channels wide), a row index (``cache_rows_index``),
    unit last strides, the kernel device."""
    b, hkv, n, d = k.shape
    width = d if rotary_dim is None else rotary_dim
    dts = {t.dtype for t in (q, k, v, cos, sin, k_cache, v_cache)}
    if len(dts) != 1 or q.dtype not in ROTARY_DTYPES:
        return f"dtypes {sorted(str(t) for t in dts)} (one of bf16/fp16/fp32 for all)"
    if (k_cache.dim() != 4 or k_cache.shape != v_cache.shape or k_cache.shape[0] != b or k_cache.shape[1] != hkv
            or k_cache.shape[3] != d):
        return f"caches {tuple(k_cache.shape)}, {tuple(v_cache.shape)} for keys {tuple(k.shape)}"
    c, s = _rows(cos, b, n, width), _rows(sin, b, n, width)
    if c is None or s is None:
        return (f"cos {tuple(cos.shape)}, sin {tuple(sin.shape)} do not broadcast to [B, 1, N, rotary_dim] = "
                f"{(b, 1, n, width)}")
    if not cache_rows_index(index, 2, k) or index.dtype not in (torch.int64, torch.int32):
        return f"index {tuple(index.shape)} strides {index.stride()} is not a row index for keys {tuple(k.shape)}"
    if any(t.stride(3) != 1 for t in (q, k, v, c, s, k_cache, v_cache)):
        return "a last dimension that is not contiguous"
    if not all(on_kernel_device(t) for t in (q, k, v, cos, sin, k_cache, v_cache, index)):
        return "not on the kernel device"
    return None


@triton.jit
def _round_to(y, IS_BF16: tl.constexpr, IS_FP16: tl.constexpr):
    """fp32 ``y`` rounded (to nearest even) onto the activation dtype's grid, still fp32: where torch rounds."""
    if IS_BF16:
        return round_to_bf16(y)
    elif IS_FP16:
        return y.to(tl.float16).to(tl.float32)
    else:
        return y


@triton.jit
def _rotary_write_kv(q_ptr, k_ptr, v_ptr, c_ptr, s_ptr, kc_ptr, vc_ptr, i_ptr, o_ptr, N, HQ,
                     sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, scb, scn, ssb, ssn,
                     skcb, skch, skcs, svcb, svch, svcs, sib, sin_, sob, soh, son,
                     HALF: tl.constexpr, ROWS: tl.constexpr, IS_BF16: tl.constexpr, IS_FP16: tl.constexpr,
                     PDL: tl.constexpr, D: tl.constexpr, HALF_BLOCK: tl.constexpr):
    """Program ``(b * cdiv(N, ROWS) + block, h)``: rows ``block * ROWS ...`` (``ROWS`` tokens) of one head. For
    ``h < HQ``, query head ``h``'s rows rotated into the output; else kv head ``h - HQ``: its key rows rotated and
    its value rows copied, both to cache slots ``index[b, 0, n, 0]``. Rotate-half of the first ``2 HALF`` of the
    ``D`` channels in two halves, ``(x1 c1 - x2 s1, x2 c2 + x1 s2)``, each product and the sum rounded to the
    activation dtype as the IR's ``rotary`` rounds them (``-x2 * s1`` rounds to ``-(x2 * s1)``); channels from ``2
    HALF`` on (a partial rotary's) copied unchanged. ``HALF`` 0 (``write_kv``: no query heads, ``HQ`` 0): no rotary,
    cos/sin never read, every channel of the keys copied as the values are. ``HALF_BLOCK``: ``HALF`` rounded up to
    a power of two (a ``tl.arange``), lanes past ``HALF`` masked. ``PDL``: let the attention launch, then wait for
    the GEMV that wrote q, k and v."""
    pdl_prologue(PDL)
    nblocks = tl.cdiv(N, ROWS)
    r = tl.program_id(0)
    h = tl.program_id(1)
    b = r // nblocks
    n = (r % nblocks) * ROWS + tl.arange(0, ROWS)[:, None]  # [ROWS, 1]
    ok = n < N
    if HALF > 0:
        lo = tl.arange(0, HALF_BLOCK)[None, :]
        hi = lo + HALF
        turned = ok
        if HALF_BLOCK != HALF:
            turned = ok & (lo < HALF)
        c1 = tl.load(c_ptr + b * scb + n * scn + lo, mask=turned).to(tl.float32)
        c2 = tl.load(c_ptr + b * scb + n * scn + hi, mask=turned).to(tl.float32)
        s1 = tl.load(s_ptr + b * ssb + n * ssn + lo, mask=turned).to(tl.float32)
        s2 = tl.load(s_ptr + b * ssb + n * ssn + hi, mask=turned).to(tl.float32)
    if h < HQ:
        src = q_ptr + b * sqb + h * sqh + n * sqn
        dst = o_ptr + b * sob + h * soh + n * son
    else:
        j = h - HQ
        pos = tl.load(i_ptr + b * sib + n * sin_, mask=ok, other=0)
        src = k_ptr + b * skb + j * skh + n * skn
        dst = kc_ptr + b * skcb + j * skch + pos * skcs
        vs = v_ptr + b * svb + j * svh + n * svn
        vd = vc_ptr + b * svcb + j * svch + pos * svcs
        ds = tl.arange(0, D)[None, :]
        tl.store(vd + ds, tl.load(vs + ds, mask=ok), mask=ok)
    if HALF > 0:
        x1 = tl.load(src + lo, mask=turned).to(tl.float32)
        x2 = tl.load(src + hi, mask=turned).to(tl.float32)
        y1 = _rotated(x1, x2, c1, s1, -1.0, IS_BF16, IS_FP16)
        y2 = _rotated(x2, x1, c2, s2, 1.0, IS_BF16, IS_FP16)
        tl.store(dst + lo, y1.to(dst.dtype.element_ty), mask=turned)
        tl.store(dst + hi, y2.to(dst.dtype.element_ty), mask=turned)
    if 2 * HALF < D:
        rest = tl.arange(0, D)[None, :]
        kept = ok & (rest >= 2 * HALF)
        tl.store(dst + rest, tl.load(src + rest, mask=kept), mask=kept)


@triton.jit
def _partner(ds, D: tl.constexpr):
    """The channel a rotate-half pairs with channel ``ds``: ``ds + D/2`` in the first half, ``ds - D/2`` after."""
    return tl.where(ds < D // 2, ds + D // 2, ds - D // 2)


@triton.jit
def _rotated(x, partner, c, s, sign, IS_BF16: tl.constexpr, IS_FP16: tl.constexpr):
    """``x c + sign partner s`` (``sign`` -1 in a rotate-half's first half, +1 in its second), each product and the
    sum rounded to the activation dtype as the IR's ``rotary`` rounds them (``-x2 * s1`` rounds to ``-(x2 *
    s1)``); fp32 on that dtype's grid. ``_rotary_write_kv`` and ``_rotate`` both."""
    xs = _round_to(x.to(tl.float32) * c, IS_BF16, IS_FP16)
    return _round_to(xs + sign * _round_to(partner.to(tl.float32) * s, IS_BF16, IS_FP16), IS_BF16, IS_FP16)


@triton.jit
def _rotate(x, partner, c, s, ds, D: tl.constexpr, IS_BF16: tl.constexpr, IS_FP16: tl.constexpr):
    """Rotate-half of whole rows ``x`` given each channel's partner (``_partner``): ``_rotated`` with the sign of
    each channel's half."""
    return _rotated(x, partner, c, s, tl.where(ds < D // 2, -1.0, 1.0), IS_BF16, IS_FP16)


ROTARY_ROWS = 16
"""Tokens per ``_rotary_write_kv`` program when a call has more than one (a prefill): one row per program made a
1x2048 prefill's rotary 158 µs per layer on the H200 (131K one-warp programs of 256 bytes each), 16 rows on four
warps 31 µs (``tools/profile_decode.py --prefill 2048``, 7B-shaped stack); a decode step (one token) keeps one row
per program."""


@torch.library.custom_op("lowbit::rotary_write_kv", mutates_args=("k_cache", "v_cache"))
def rotary_write_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    k_cache: torch.Tensor, v_cache: torch.Tensor, index: torch.Tensor,
                    pdl: bool = False, rotary_dim: int | None = None) -> torch.Tensor:
    """A decode step's attention inputs in one launch: the IR's ``rotary`` of ``q [B, Hq, N, D]`` and ``k [B,
    Hkv, N, D]`` (``cos``/``sin`` broadcast to ``[B, 1, N, D]``), the rotated keys and the values ``v`` written
    into the float caches ``[B, Hkv, S, D]`` at the slots a row ``index`` names (``cache_rows_index``: the
    step's positions broadcast over heads and head_dim, as ``scatter_into`` writes them); returns the rotated
    queries (contiguous). Grid ``(B * cdiv(N, rows), Hq + Hkv)``: ``rows`` tokens of one head per program (one in a
    decode step, up to ``ROTARY_ROWS``), query heads and kv heads alike. The
    reference where ``rotary_write_kv_unsupported`` names a reason. ``pdl``: launch with programmatic dependent
    launch (the triton backend's ``pdl``, Hopper+; ignored under the interpreter). ``rotary_dim`` (None: the whole
    head): a partial rotary (GPT-NeoX, Phi, StableLM) turns each head's first ``rotary_dim`` channels (``cos``/``sin``
    that wide) and passes the rest through unchanged, as ``rotary_write_kv_ref`` says.

    Why a ``custom_op`` and not a ``triton_op``: it writes two graph inputs, and an opaque op's declared
    mutation is what ``scatter_into`` measured staying in place under ``torch.compile`` (no whole-cache copy);
    a CUDA graph replays its launch without the host code."""
    check(q.dim() == 4 and k.dim() == 4 and k.shape == v.shape and q.shape[0] == k.shape[0]
          and q.shape[2:] == k.shape[2:], "rotary_write_kv",
          f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} are not [B, H, N, D] of one B, N and D")
    d = q.shape[3]
    why = rotary_head_dim_unsupported(d)
    check(why is None, "rotary_write_kv", f"head_dim {d} (q {tuple(q.shape)}): {why}")
    width = d if rotary_dim is None else rotary_dim
    check(0 < width <= d and width % 2 == 0, "rotary_write_kv",
          f"rotary_dim {rotary_dim} of head_dim {d} (q {tuple(q.shape)}): an even width from 2 to the head_dim")
    if rotary_write_kv_unsupported(q, k, v, cos, sin, k_cache, v_cache, index, rotary_dim) is not None:
        return rotary_write_kv_ref(q, k, v, cos, sin, k_cache, v_cache, index, rotary_dim).contiguous()
    b, hkv, n, _ = k.shape
    hq = q.shape[1]
    c, s = _rows(cos, b, n, width), _rows(sin, b, n, width)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    on = pdl and not interpreting()
    # enable_fp_fusion=False: fp32's x1 * c1 - x2 * s1 must not become one FMA (torch rounds both products)
    rows = min(ROTARY_ROWS, next_pow2(n))
    _rotary_write_kv[(b * cdiv(n, rows), hq + hkv)](
        q, k, v, c, s, k_cache, v_cache, index, out, n, hq,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1),
        v.stride(2), c.stride(0), c.stride(2), s.stride(0), s.stride(2), k_cache.stride(0), k_cache.stride(1),
        k_cache.stride(2), v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), index.stride(0),
        index.stride(2), out.stride(0), out.stride(1), out.stride(2), HALF=width // 2, ROWS=rows,
        IS_BF16=q.dtype == torch.bfloat16, IS_FP16=q.dtype == torch.float16, PDL=on, D=d,
        HALF_BLOCK=next_pow2(width // 2), num_warps=1 if rows == 1 else 4, enable_fp_fusion=False,
        **({"launch_pdl": True} if on else {}))
    return out


@rotary_write_kv.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
      k_cache: torch.Tensor, v_cache: torch.Tensor, index: torch.Tensor, pdl: bool = False,
      rotary_dim: int | None = None) -> torch.Tensor:
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)


def write_kv_ref(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 index: torch.Tensor) -> None:
    """The two ops ``write_kv`` replaces: ``scatter_(2, index, ·)`` of the keys into ``k_cache`` and of the values
    into ``v_cache``, in place."""
    k_cache.scatter_(2, index, k)
    v_cache.scatter_(2, index, v)


def write_kv_unsupported(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         index: torch.Tensor) -> str | None:
    """Why ``write_kv``'s kernel does not take these operands (None: it does; the op then runs the reference):
    ``[B, Hkv, N, D]`` keys and values of one dtype of ``ROTARY_DTYPES`` with caches ``[B, Hkv, S, D]`` of it, a
    head_dim ``rotary_head_dim_unsupported`` takes, a row index (``cache_rows_index``), unit last strides, the
    kernel device."""
    if k.dim() != 4 or k.shape != v.shape:
        return f"keys {tuple(k.shape)}, values {tuple(v.shape)} are not [B, Hkv, N, D] of one shape"
    b, hkv, _, d = k.shape
    if len({t.dtype for t in (k, v, k_cache, v_cache)}) != 1 or k.dtype not in ROTARY_DTYPES:
        return f"dtypes {sorted(str(t.dtype) for t in (k, v, k_cache, v_cache))} (one of bf16/fp16/fp32 for all)"
    if (k_cache.dim() != 4 or k_cache.shape != v_cache.shape or k_cache.shape[0] != b or k_cache.shape[1] != hkv
            or k_cache.shape[3] != d):
        return f"caches {tuple(k_cache.shape)}, {tuple(v_cache.shape)} for keys {tuple(k.shape)}"
    why = rotary_head_dim_unsupported(d)
    if why is not None:
        return f"head_dim {d}: {why}"
    if not cache_rows_index(index, 2, k) or index.dtype not in (torch.int64, torch.int32):
        return f"index {tuple(index.shape)} strides {index.stride()} is not a row index for keys {tuple(k.shape)}"
    if any(t.stride(3) != 1 for t in (k, v, k_cache, v_cache)):
        return "a last dimension that is not contiguous"
    if not all(on_kernel_device(t) for t in (k, v, k_cache, v_cache, index)):
        return "not on the kernel device"
    return None


@torch.library.custom_op("lowbit::write_kv", mutates_args=("k_cache", "v_cache"))
def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, index: torch.Tensor,
             pdl: bool = False) -> None:
    """A layer without rotary (GPT-2's learned positions, Bloom's ALiBi, SmolLM3's NoPE layers) writes its keys and
    values ``[B, Hkv, N, D]`` into the float caches ``[B, Hkv, S, D]`` at the slots a row ``index`` names in one
    launch: ``_rotary_write_kv`` with no rotary (``HALF`` 0) and no query heads, where two ``scatter_into`` ran a
    ``_write_rows`` each. The reference (``write_kv_ref``) where ``write_kv_unsupported`` names a reason. A
    ``custom_op`` for ``rotary_write_kv``'s reason (an opaque op's declared mutation stays in place under
    ``torch.compile``); ``pdl`` as there."""
    if write_kv_unsupported(k, v, k_cache, v_cache, index) is not None:
        write_kv_ref(k, v, k_cache, v_cache, index)
        return
    b, hkv, n, d = k.shape
    on = pdl and not interpreting()
    rows = min(ROTARY_ROWS, next_pow2(n))
    # q, cos, sin and the output are never read (HQ 0, HALF 0): k stands in for their pointers and strides 0
    _rotary_write_kv[(b * cdiv(n, rows), hkv)](
        k, k, v, k, k, k_cache, v_cache, index, k, n, 0, 0, 0, 0, k.stride(0), k.stride(1), k.stride(2), v.stride(0),
        v.stride(1), v.stride(2), 0, 0, 0, 0, k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), index.stride(0), index.stride(2), 0, 0, 0, HALF=0,
        ROWS=rows, IS_BF16=False, IS_FP16=False, PDL=on, D=d, HALF_BLOCK=1, num_warps=1 if rows == 1 else 4,
        **({"launch_pdl": True} if on else {}))


@write_kv.register_fake
def _(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, index: torch.Tensor,
      pdl: bool = False) -> None:
    return None


DECODE_SDPA_CHUNK = 64
"""Cache slots per split program of ``decode_sdpa``: a 768-slot context is 12 chunks per kv head, so batch 1 of 32
kv heads launches 384 programs (the H200 has 132 SMs), each reading 2 x 64 x 128 bf16 = 32 KB. A kv head's query
heads are the rows of two ``tl.dot``s (padded to 16): scores, then probabilities times values."""

DECODE_SDPA_MAX_HEADS = 64
"""Most (sequence, kv head) pairs ``decode_sdpa`` takes: H200 run of ``tools/bench_decode_sdpa.py`` (session 11)
measured it 1.69x torch's SDPA at batch 1 x 32 kv heads (768 slots), 2.2x at 1 x 8 (GQA 4), a tie at 1 x 32 over
4096 slots, and 0.96x at 16 x 32: torch's kernel beyond."""

DECODE_SDPA_WARPS = 4
"""Warps per ``_sdpa_split`` program (``tools/bench_decode_sdpa.py`` sweeps it with the chunk)."""


def decode_sdpa_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float | None,
                    enable_gqa: bool) -> torch.Tensor:
    """torch's ``scaled_dot_product_attention`` with a boolean mask or an additive one of the query's dtype (the
    IR's ``attention`` op): what ``decode_sdpa`` computes."""
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                                            enable_gqa=enable_gqa)


def decode_sdpa_layout_unsupported(dtype: torch.dtype, head_dim: int) -> str | None:
    """The part of ``decode_sdpa_supported`` a lowering can decide from types: the dtype (bf16/fp16) and head_dim
    (a power of two <= 256). None: a decode step of this attention may run the kernel."""
    if dtype not in (torch.bfloat16, torch.float16):
        return f"dtype {dtype}: the kernel takes bf16/fp16"
    if head_dim > 256 or head_dim & (head_dim - 1):
        return f"head_dim {head_dim} (a power of two <= 256, contiguous)"
    return None


def decode_sdpa_supported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                          is_causal: bool = False) -> str | None:
    """Why ``decode_sdpa`` does not take these operands (None: it does): one query row per sequence, bf16/fp16,
    ``[B, H, S, D]`` with D a power of two <= 256, whole kv-head groups, a boolean mask broadcastable to
    ``[B, 1, 1, S]`` or an additive one of the query's dtype to ``[B, Hq, 1, S]`` (Bloom's ALiBi with its -inf),
    at most ``DECODE_SDPA_MAX_HEADS`` (sequence, kv head) pairs, on the kernel device."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4 or q.shape[2] != 1:
        return "not one query row per sequence"
    if is_causal or mask is None or mask.dim() != 4 or mask.dtype not in (torch.bool, q.dtype):
        return "no boolean [B, 1, 1, S] mask nor an additive [B, Hq, 1, S] one of the query's dtype"
    b, hq, _, d = q.shape
    heads = (1,) if mask.dtype == torch.bool else (1, hq)  # a boolean mask: one row for every head
    if (mask.shape[1] not in heads or mask.shape[2] != 1 or mask.shape[0] not in (1, b) or mask.shape[3] != k.shape[2]
            or k.shape != v.shape or k.shape[0] != b or k.shape[3] != d or hq % k.shape[1]):
        return f"shapes q {tuple(q.shape)}, k {tuple(k.shape)}, mask {tuple(mask.shape)}"
    if q.dtype not in (torch.bfloat16, torch.float16) or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"dtypes {q.dtype}, {k.dtype}, {v.dtype}"
    why = decode_sdpa_layout_unsupported(q.dtype, d)
    if why is not None:
        return why
    if q.stride(3) != 1 or k.stride(3) != 1 or v.stride(3) != 1:
        return f"head_dim {d} (a power of two <= 256, contiguous)"
    if b * k.shape[1] > DECODE_SDPA_MAX_HEADS:
        return (f"batch x kv heads = {b * k.shape[1]} > DECODE_SDPA_MAX_HEADS = {DECODE_SDPA_MAX_HEADS}: torch's "
                "SDPA measured faster there")
    if not (on_kernel_device(q) and on_kernel_device(k) and on_kernel_device(v)):
        return "not on the kernel device"
    return None


@triton.jit
def _sdpa_split(q_ptr, k_ptr, v_ptr, m_ptr, p_ptr, l_ptr, a_ptr, S, HKV, NCH, scale,
                sqb, sqh, skb, skh, sks, svb, svh, svs, smb, sms, smh,
                kn_ptr, vn_ptr, c_ptr, s_ptr, i_ptr, sknb, sknh, svnb, svnh, scb, ssb, sib,
                n_ptr, o_ptr, sob, soh,
                G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, CHUNK: tl.constexpr, UPCAST: tl.constexpr,
                PDL: tl.constexpr, ROTARY: tl.constexpr = False, IS_BF16: tl.constexpr = False,
                IS_FP16: tl.constexpr = False, MERGE: tl.constexpr = False, NCP: tl.constexpr = 1,
                FLOAT_MASK: tl.constexpr = False):
    """Program ``(b * HKV + h, c)``: the ``G`` query heads of kv head ``h`` over cache slots ``[c * CHUNK, ...)``:
    scores ``q . k * scale`` where the mask allows, their max, the sum of ``exp(score - max)`` and the
    un-normalised ``sum p v`` (fp32), written per (query head, chunk) for ``_sdpa_merge``. A chunk with no allowed
    slot writes max -inf, sum 0, zeros. ``FLOAT_MASK``: the mask is additive (``m`` per query head at stride
    ``smh``, 0 for one row of all heads), added to each score in fp32 as SDPA adds it; -inf is a masked slot, and a
    slot every head of the program masks is not read. ``PDL`` (``pdl_launches``): let the merge launch, then wait
    for the kernels that wrote q and the cache's new row.

    ``ROTARY`` (``rotary_decode_sdpa``): ``q`` is the step's query before its rotary, which each program applies
    to its heads as ``_rotary_write_kv`` does; the program whose chunk holds the step's slot ``index[b]`` first
    writes that slot of both caches (the new key ``kn`` rotated, the new value ``vn``), so the keys it then reads
    are the ones a separate ``rotary_write_kv`` launch would have written.

    ``MERGE`` (``split_counters``): no ``_sdpa_merge`` launch: each program counts itself done on its (sequence,
    kv head)'s counter ``n`` after its partials are written; the last one of the ``NCH`` merges the ``G`` rows
    (``_merge_row``, into ``o``) and sets the counter back to zero for the next launch."""
    pdl_prologue(PDL)
    bh = tl.program_id(0)
    c = tl.program_id(1)
    b = bh // HKV
    h = bh % HKV
    gs = tl.arange(0, GP)
    g_ok = gs < G
    ds = tl.arange(0, D)
    slots = c * CHUNK + tl.arange(0, CHUNK)
    s_ok = slots < S
    if FLOAT_MASK:  # Bloom's ALiBi + causal -inf: one bias per (query head, slot)
        bias = tl.load(m_ptr + b * smb + (h * G + gs)[:, None] * smh + slots[None, :] * sms,
                       mask=g_ok[:, None] & s_ok[None, :], other=float("-inf")).to(tl.float32)
        head_allowed = bias != float("-inf")
        allowed = tl.max(head_allowed.to(tl.int32), axis=0) != 0
    else:
        allowed = tl.load(m_ptr + b * smb + slots * sms, mask=s_ok, other=0) != 0
    q_rows = q_ptr + b * sqb + (h * G + gs)[:, None] * sqh
    if ROTARY:
        cr = tl.load(c_ptr + b * scb + ds).to(tl.float32)
        sr = tl.load(s_ptr + b * ssb + ds).to(tl.float32)
        q = _rotate(tl.load(q_rows + ds[None, :], mask=g_ok[:, None], other=0.0),
                    tl.load(q_rows + _partner(ds, D)[None, :], mask=g_ok[:, None], other=0.0),
                    cr[None, :], sr[None, :], ds[None, :], D, IS_BF16, IS_FP16).to(k_ptr.dtype.element_ty)
        pos = tl.load(i_ptr + b * sib)
        if pos // CHUNK == c:
            kn = kn_ptr + b * sknb + h * sknh
            kr = _rotate(tl.load(kn + ds), tl.load(kn + _partner(ds, D)), cr, sr, ds, D, IS_BF16, IS_FP16)
            tl.store(k_ptr + b * skb + h * skh + pos * sks + ds, kr.to(k_ptr.dtype.element_ty))
            tl.store(v_ptr + b * svb + h * svh + pos * svs + ds, tl.load(vn_ptr + b * svnb + h * svnh + ds))
        tl.debug_barrier()  # the slot's row written before this program's threads read the chunk
    else:
        q = tl.load(q_rows + ds[None, :], mask=g_ok[:, None], other=0.0)
    kt = tl.load(k_ptr + b * skb + h * skh + slots[:, None] * sks + ds[None, :], mask=allowed[:, None], other=0.0)
    # the values' load issued with the keys' (it does not wait for the scores: one memory round trip, not two)
    vt = tl.load(v_ptr + b * svb + h * svh + slots[:, None] * svs + ds[None, :], mask=allowed[:, None], other=0.0)
    if UPCAST:  # Triton's interpreter multiplies bf16 tiles wrongly: fp32 there (the kernels' tests)
        q = q.to(tl.float32)
        kt = kt.to(tl.float32)
        vt = vt.to(tl.float32)
    s = tl.dot(q, tl.trans(kt)) * scale  # [GP, CHUNK] on tensor cores (GP >= 16 rows, the padding zero)
    if FLOAT_MASK:
        s = tl.where(head_allowed, s + bias, float("-inf"))
        m = tl.max(s, axis=1)
        p = tl.where(head_allowed, tl.exp(s - tl.where(m == float("-inf"), 0.0, m)[:, None]), 0.0)
    else:
        s = tl.where(allowed[None, :], s, float("-inf"))
        m = tl.max(s, axis=1)
        p = tl.where(allowed[None, :], tl.exp(s - tl.where(m == float("-inf"), 0.0, m)[:, None]), 0.0)
    if UPCAST:
        acc = tl.dot(p, vt)
    else:
        # p as a sum of two cache-dtype parts (16 mantissa bits): one bf16 p would be off by up to 2^-9 against
        # its fp32 sum below (measured on the H200: outside the test's one-step bound); the second dot is free
        # in a memory-bound kernel
        p_hi = p.to(vt.dtype)
        p_lo = (p - p_hi.to(tl.float32)).to(vt.dtype)
        acc = tl.dot(p_hi, vt) + tl.dot(p_lo, vt)  # [GP, D]
    row = (bh * G + gs) * NCH + c  # (b, query head, chunk)
    tl.store(p_ptr + row, m, mask=g_ok)
    tl.store(l_ptr + row, tl.sum(p, axis=1), mask=g_ok)
    tl.store(a_ptr + row[:, None] * D + ds[None, :], acc, mask=g_ok[:, None])
    if MERGE:
        tl.debug_barrier()  # every thread's partials stored before the count (acq_rel: visible GPU-wide with it)
        if tl.atomic_add(n_ptr + bh, 1, sem="acq_rel") == NCH - 1:
            for g in tl.static_range(G):
                _merge_row(p_ptr, l_ptr, a_ptr, o_ptr, bh * G + g, NCH, HKV * G, sob, soh, D, NCP)
            tl.atomic_xchg(n_ptr + bh, 0)


@triton.jit
def _merge_row(p_ptr, l_ptr, a_ptr, o_ptr, r, NCH, H, sob, soh, D: tl.constexpr, NCP: tl.constexpr):
    """Row ``r = b * H + hq``: the chunks' partials merged by log-sum-exp, ``sum_c w_c acc_c / sum_c w_c l_c``
    with ``w_c = exp(max_c - max)``, written in the output dtype. The partials are read past L1 (``.cg``): in
    ``_sdpa_split``'s own merge other programs wrote them."""
    cs = tl.arange(0, NCP)
    c_ok = cs < NCH
    m = tl.load(p_ptr + r * NCH + cs, mask=c_ok, other=float("-inf"), cache_modifier=".cg")
    top = tl.max(m, axis=0)
    w = tl.where(c_ok, tl.exp(m - top), 0.0)
    denom = tl.sum(w * tl.load(l_ptr + r * NCH + cs, mask=c_ok, other=0.0, cache_modifier=".cg"), axis=0)
    ds = tl.arange(0, D)
    acc = tl.load(a_ptr + (r * NCH + cs)[:, None] * D + ds[None, :], mask=c_ok[:, None], other=0.0,
                  cache_modifier=".cg")
    out = tl.sum(w[:, None] * acc, axis=0) / denom
    tl.store(o_ptr + (r // H) * sob + (r % H) * soh + ds, out.to(o_ptr.dtype.element_ty))


@triton.jit
def _sdpa_merge(p_ptr, l_ptr, a_ptr, o_ptr, NCH, H, sob, soh, D: tl.constexpr, NCP: tl.constexpr,
                PDL: tl.constexpr):
    """Program ``b * H + hq``: ``_merge_row`` of its row."""
    pdl_prologue(PDL)  # the next GEMV may launch and prefetch its weights; the partials come from _sdpa_split
    _merge_row(p_ptr, l_ptr, a_ptr, o_ptr, tl.program_id(0), NCH, H, sob, soh, D, NCP)


@triton_op("lowbit::decode_sdpa", mutates_args=())
def decode_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float | None = None,
                enable_gqa: bool = False) -> torch.Tensor:
    """Decode-step attention over a float KV cache: ``scaled_dot_product_attention(q, k, v, attn_mask=mask)``
    for one query row per sequence (``q [B, Hq, 1, D]``, ``k``/``v [B, Hkv, S, D]``, boolean ``mask
    [B or 1, 1, 1, S]`` or an additive one of q's dtype ``[B or 1, Hq or 1, 1, S]``: Bloom's ALiBi),
    flash-decoding in two launches: ``_sdpa_split`` over ``DECODE_SDPA_CHUNK``-slot chunks
    (each kv head's query heads together: GQA reads each key once), then ``_sdpa_merge``. Every sequence needs
    one allowed slot (a decode step's slot 0 always is). The reference where ``decode_sdpa_supported`` says
    no."""
    return _decode_sdpa(q, k, v, mask, scale, enable_gqa)


def _decode_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float | None,
                 enable_gqa: bool, merge_in_split: bool = False) -> torch.Tensor:
    if decode_sdpa_supported(q, k, v, mask) is not None:
        return decode_sdpa_ref(q, k, v, mask, scale, enable_gqa)
    return _launch_sdpa(q, k, v, mask, scale, merge_in_split=merge_in_split)


_SPLIT_COUNTERS: dict[torch.device, list[torch.Tensor]] = {}


def split_counters(device: torch.device, count: int = DECODE_SDPA_MAX_HEADS) -> torch.Tensor | None:
    """At least ``count`` zeroed int32 counters of the device with which a split kernel merges its own partials
    (``_sdpa_split``'s ``MERGE``: one per (sequence, kv head), ``DECODE_SDPA_MAX_HEADS`` at most; the packed cache's
    ``_split_kernel_v3``: one per (sequence, query-head group), batch x query heads at most, which no
    ``GenerationSpec`` limit bounds), made on the first eager call of a size and kept: each launch's last programs
    set theirs back to zero, so a CUDA graph replays the launch without a memset. A larger count makes a larger
    set and keeps the smaller ones (a captured graph may hold them). None while a CUDA graph is being captured before
    enough exist (the capture then keeps the merge launch). Launches on two streams at once would share them: the
    ops that take them (``decode_sdpa_pdl``, ``rotary_decode_sdpa``, the triton backend's ``_cache_attention``) run
    on the decode step's one stream."""
    kept = _SPLIT_COUNTERS.setdefault(device, [])
    for counters in kept:
        if counters.numel() >= count:
            return counters
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return None
    size = max(DECODE_SDPA_MAX_HEADS, next_pow2(count))
    kept.append(torch.zeros(size, dtype=torch.int32, device=device))
    return kept[-1]


def _launch_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float | None,
                 rotary: tuple[torch.Tensor, ...] | None = None, merge_in_split: bool = False) -> torch.Tensor:
    """``_sdpa_split`` then ``_sdpa_merge`` on operands ``decode_sdpa_supported`` takes; ``rotary``: ``(k_new,
    v_new, cos, sin, index)`` of ``rotary_decode_sdpa`` (``q`` then not yet rotated, the caches written here);
    ``merge_in_split``: the split's last program per (sequence, kv head) merges (``split_counters``; opaque ops
    only: a ``triton_op`` traced by Inductor cannot hold the kept counters)."""
    b, hq, _, d = q.shape
    hkv, s = k.shape[1], k.shape[2]
    g = hq // hkv
    gp = max(16, next_pow2(g))  # tl.dot's smallest M
    chunk = DECODE_SDPA_CHUNK
    nch = cdiv(s, chunk)
    parts = torch.empty((b * hq * nch,), device=q.device, dtype=torch.float32)
    sums = torch.empty_like(parts)
    accs = torch.empty((b * hq * nch, d), device=q.device, dtype=torch.float32)
    out = torch.empty((b, hq, 1, d), device=q.device, dtype=q.dtype)
    mb = mask.stride(0) if mask.shape[0] > 1 else 0
    mh = mask.stride(1) if mask.shape[1] > 1 else 0
    if rotary is None:
        extra: tuple = (q, q, q, q, q, 0, 0, 0, 0, 0, 0, 0)
    else:
        kn, vn, c, sn, index = rotary
        extra = (kn, vn, c, sn, index, kn.stride(0), kn.stride(1), vn.stride(0), vn.stride(1), c.stride(0),
                 sn.stride(0), index.stride(0))
    counters = split_counters(q.device) if merge_in_split else None
    pdl = pdl_launch_options()  # PDL, and launch_pdl where pdl_on, for the split and the merge alike
    launcher(q, _sdpa_split)[(b * hkv, nch)](
        q, k, v, mask, parts, sums, accs, s, hkv, nch, scale if scale is not None else d ** -0.5,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        mb, mask.stride(3), mh, *extra, q if counters is None else counters, out, out.stride(0), out.stride(1),
        G=g, GP=gp, D=d, CHUNK=chunk, UPCAST=interpreting(), ROTARY=rotary is not None,
        IS_BF16=q.dtype == torch.bfloat16, IS_FP16=q.dtype == torch.float16, MERGE=counters is not None,
        NCP=next_pow2(nch), FLOAT_MASK=mask.dtype != torch.bool, num_warps=DECODE_SDPA_WARPS, **pdl)
    if counters is None:
        launcher(q, _sdpa_merge)[(b * hq,)](parts, sums, accs, out, nch, hq, out.stride(0), out.stride(1), D=d,
                                            NCP=next_pow2(nch), num_warps=4, **pdl)
    return out


@torch.library.custom_op("lowbit::decode_sdpa_pdl", mutates_args=())
def decode_sdpa_pdl(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                    scale: float | None = None, enable_gqa: bool = False,
                    merge_in_split: bool = False) -> torch.Tensor:
    """``decode_sdpa`` as an opaque op whose two kernels launch with programmatic dependent launch
    (``pdl_launches``; opaque because Inductor launches a ``triton_op``'s kernels itself, without it): the split
    starts while the kernel before it drains, and the merge lets the next GEMV launch and prefetch its weights.
    ``merge_in_split``: one launch, the split's last program per (sequence, kv head) merging (``split_counters``;
    slower on the H100 than the merge's own launch: the triton backend's ``merge_in_split`` option says by how
    much)."""
    with pdl_launches():
        return _decode_sdpa(q, k, v, mask, scale, enable_gqa, merge_in_split=merge_in_split)


@decode_sdpa_pdl.register_fake
def _(q, k, v, mask, scale=None, enable_gqa=False, merge_in_split=False):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


def rotary_decode_sdpa_unsupported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                                   sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                   index: torch.Tensor, mask: torch.Tensor | None, is_causal: bool) -> str | None:
    """Why ``rotary_decode_sdpa`` runs ``rotary_write_kv`` and the attention as two ops (None: one kernel pair
    does both): ``rotary_write_kv_unsupported``'s reasons, ``decode_sdpa_supported``'s for the caches, more than
    one token per sequence, a head_dim ``rotary_write_kv`` refuses."""
    why = rotary_write_kv_unsupported(q, k, v, cos, sin, k_cache, v_cache, index)
    if why is None and (q.dim() != 4 or q.shape[2] != 1 or rotary_head_dim_unsupported(q.shape[3]) is not None):
        why = f"q {tuple(q.shape)} is not one row per sequence of a head_dim rotary_write_kv takes"
    return why if why is not None else decode_sdpa_supported(q, k_cache, v_cache, mask, is_causal)


def causal_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, index: torch.Tensor,
                             scale: float | None, enable_gqa: bool) -> torch.Tensor | None:
    """The attention of a prefill from position 0 over a float cache whose mask is ``slot <= position`` (the
    caller's word: ``rotary_decode_sdpa``'s ``causal_slots``), as torch's causal SDPA over the cache's first ``L``
    slots; None where the step's host has not vouched for its positions (``lowbit.ir.kvcache.host_positions``:
    ``L`` query columns whose positions are ``0..L-1``). Each row's column order is its positions' (a prefill of
    equal prompts), or with ``padded`` a permutation of them (``lowbit.generate.left_padded`` / ``bucketed``
    rows: pad columns first, at the positions past the prompt's), whose queries are put in position order for the
    causal kernel and its outputs back (two gathers of ``[B, Hq, L, D]``; ``index`` ``[B, Hkv, L, D]`` holds each
    column's position). The same keys for every query as the mask's: the slots past ``L - 1`` hold no token of
    the prefill and no position reaches them. Why: with the mask torch ran cuDNN's masked kernel over all slots,
    93 us a layer of SmolLM2's 1x2048 prefill on an H100 against 34.5 causal (the 7B shape 254 against 91:
    session 58's probe), 28% of that prefill's GPU time."""
    from lowbit.ir.kvcache import host_positions
    from lowbit.ir.ops import attention

    host = host_positions()
    length = q.shape[2]
    if host is None or length < 2 or host[0] != length - 1 or k_cache.shape[2] < length:
        return None
    keys, values = k_cache[:, :, :length], v_cache[:, :, :length]
    if not host[1]:  # every row's columns at positions 0..L-1 in order
        return attention(q, keys, values, None, scale=scale, is_causal=True, enable_gqa=enable_gqa)
    positions = index[:, 0, :, 0]  # [B, L]: column -> position
    columns = torch.empty_like(positions).scatter_(1, positions, torch.arange(length, device=positions.device)
                                                   .expand_as(positions))  # position -> column
    ordered = q.gather(2, columns[:, None, :, None].expand_as(q))
    out = attention(ordered, keys, values, None, scale=scale, is_causal=True, enable_gqa=enable_gqa)
    return out.gather(2, positions[:, None, :, None].expand_as(out))


@torch.library.custom_op("lowbit::rotary_decode_sdpa", mutates_args=("k_cache", "v_cache"))
def rotary_decode_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                       k_cache: torch.Tensor, v_cache: torch.Tensor, index: torch.Tensor, mask: torch.Tensor | None,
                       scale: float | None = None, is_causal: bool = False, enable_gqa: bool = False,
                       pdl: bool = False, merge_in_split: bool = False, causal_slots: bool = False) -> torch.Tensor:
    """``rotary_write_kv`` then the IR's ``attention`` of its rotated queries over the caches it wrote, in the
    launches of ``decode_sdpa`` alone where ``rotary_decode_sdpa_unsupported`` says nothing: ``_sdpa_split``
    rotates each program's query heads itself and the program holding the step's slot writes the new key and
    value there first (``ROTARY``). Why: ``rotary_write_kv`` was a launch of its own per layer between the qkv
    GEMV and the attention (21.7 µs per step of the H100's 7B-shaped 4-layer decode profile, most of it waiting on
    its neighbours). Elsewhere (a prefill, larger batches, no boolean mask) the two ops as they are. ``pdl``: the
    kernels launch with programmatic dependent launch (the triton backend's ``pdl``); ``merge_in_split`` as
    ``decode_sdpa_pdl``'s. ``causal_slots``: the mask is ``slot <= position`` (the triton backend matched it), so
    a prefill the host vouches for attends causally over its own slots (``causal_prefill_attention``)."""
    from lowbit.ir.ops import attention

    with pdl_launches() if pdl else contextlib.nullcontext():
        if rotary_decode_sdpa_unsupported(q, k, v, cos, sin, k_cache, v_cache, index, mask, is_causal) is None:
            b, _, n, d = k.shape
            return _launch_sdpa(q, k_cache, v_cache, mask, scale, (k, v, _rows(cos, b, n, d), _rows(sin, b, n, d),
                                                                    index), merge_in_split=merge_in_split)
        q_rot = rotary_write_kv(q, k, v, cos, sin, k_cache, v_cache, index, pdl)
        if decode_sdpa_supported(q_rot, k_cache, v_cache, mask, is_causal) is None:
            return _launch_sdpa(q_rot, k_cache, v_cache, mask, scale, merge_in_split=merge_in_split)
        if causal_slots and not is_causal:
            out = causal_prefill_attention(q_rot, k_cache, v_cache, index, scale, enable_gqa)
            if out is not None:
                return out
        return attention(q_rot, k_cache, v_cache, mask, scale=scale, is_causal=is_causal, enable_gqa=enable_gqa)


@rotary_decode_sdpa.register_fake
def _(q, k, v, cos, sin, k_cache, v_cache, index, mask, scale=None, is_causal=False, enable_gqa=False, pdl=False,
      merge_in_split=False, causal_slots=False):
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)
