"""A routed MoE layer's experts for many rows (a prefill, a large decode batch): one program per (expert, block of
``BLOCK_M`` rows among the tokens that picked it, column block), so each expert's weight tile is read once for all
its rows and multiplied on the tensor cores (``tl.dot``). ``moe_gemv``'s ops run one program per (token, expert):
each re-reads its expert's weights, which wins at a decode step's few rows only (H100, session 54,
``tools/bench_moe.py``: W4A16 4.2 ms a step at batch 16 against the dense form's 2.7, a 16 x 128 prefill 72-379 ms
against 9).

- ``torch.ops.lowbit.moe_route(picked [T, E]) -> (order [E, T], counts [E], slot [T, E])`` (int32): each expert's
  tokens in ascending order first in its row of ``order`` (``counts[e]`` of them; the rest unwritten), and
  ``slot[t, e]``, where t picked e, the rank of e among t's experts (unwritten elsewhere). One launch, on the device
  (no ``nonzero``: a CUDA graph captures it); the programs of a row block past its expert's count end at once.
- ``torch.ops.lowbit.moe_gate_up_blocked(x [T, H], order, counts, slot, weight, scale, zero_point, qdtype,
  group_size, epilogue, interleaved, slots) -> [T, slots, I]``: ``moe_gate_up``'s ``act(gate_e(x_t)) * up_e(x_t)``
  at ``[t, slot[t, e]]`` for each pick (slots a token did not fill are unwritten); ``slots``: at least the most
  experts a token picks (its router's top-k; a pick of a higher rank is dropped). Weights as ``moe_gate_up``'s.
- ``torch.ops.lowbit.moe_down_blocked(h [T, slots, I], picked, dense, order, counts, slot, weight, scale,
  zero_point, qdtype, group_size, out_dtype) -> [T, H]``: ``moe_down``'s sum with its roundings, in two launches:
  each pick's ``round_out(round(down_e(h)) * dense[t, e])`` into a ``[T, slots, H]`` buffer (out dtype: exact),
  then per token its slots added in order (slot order is expert order), rounded to ``out_dtype`` after each add.

Arithmetic: fp32 accumulation in ``tl.dot``; word codes ``q`` (exact small integers) in the activation dtype on
the GPU (fp32 in the interpreter, whose bf16 dot is wrong), the dots of a group's code positions chained into one
partial, which loses the zero point's share ``(sum of x's columns) z`` and takes the group's scale once (per
channel: once at the end; no share where z is 0). So each op differs from its reference (``*_ref``: ``moe_gemv``'s
references laid out by slot) by float32 accumulation order only, which may move a rounded output by one step.
Not supported (``blocked_unsupported``): chunks of 8 words (K not a multiple of 128 4-bit codes) with groups of 8
(a dot's K side, 16, then spans two code positions, which must share a group), and a float weight of another dtype
than the rows (a dot takes two operands of one dtype).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from lowbit.kernels._common import activation, cdiv, check, interpreting, launcher, next_pow2, parse_epilogue
from lowbit.kernels.moe_gemv import (
    _ROUND_CODE,
    FLOAT_DTYPES,
    MIN_PROGRAMS,
    _bits,
    _check_down,
    _gate_up_rows,
    _picked_bytes,
    _rounded,
    _weight_meta,
    _zero,
    moe_down_ref,
    moe_gate_up_ref,
)
from lowbit.kernels.weight_only import _mac, _word_tile, chunk_words

__all__ = ["blocked_unsupported", "moe_down_blocked", "moe_down_blocked_ref", "moe_gate_up_blocked",
           "moe_gate_up_blocked_ref", "moe_route", "moe_route_ref"]


@triton.jit
def _moe_route(p_ptr, order_ptr, count_ptr, slot_ptr, T, E, spt, BLOCK_T: tl.constexpr, EP: tl.constexpr):
    """Program e: over the tokens in blocks of ``BLOCK_T``, the ones that picked e appended to ``order[e]`` (a
    running count plus a cumulative sum in the block: ascending tokens), each one's ``slot[t, e]`` = its picks
    before e (a masked row sum of its ``[E]`` picks)."""
    e = tl.program_id(0)
    cols = tl.arange(0, EP)
    taken = tl.sum(tl.zeros((BLOCK_T,), dtype=tl.int32), axis=0)
    for t0 in range(0, T, BLOCK_T):
        tokens = t0 + tl.arange(0, BLOCK_T)
        ok = tokens < T
        p = tl.load(p_ptr + tokens[:, None] * spt + cols[None, :], mask=ok[:, None] & (cols < E)[None, :],
                    other=0).to(tl.int32)
        mine = tl.sum(tl.where(cols[None, :] == e, p, 0), axis=1)
        before = tl.sum(tl.where(cols[None, :] < e, p, 0), axis=1)
        at = taken + tl.cumsum(mine, axis=0) - mine
        tl.store(order_ptr + e * T + at, tokens, mask=mine != 0)
        tl.store(slot_ptr + tokens * E + e, before, mask=mine != 0)
        taken += tl.sum(mine, axis=0)
    tl.store(count_ptr + e, taken)


@triton.jit
def _float_dot(x_ptr, x_off, m_ok, w_ptr, cols, n_ok, K, swn, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """``x[rows] @ w[cols].T`` in fp32 (``[BLOCK_M, BLOCK_N]``) for a row-major float weight; row ``m`` of x at
    ``x_ptr + x_off[m]``."""
    lanes = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = k0 + lanes < K
        x = tl.load(x_ptr + x_off[:, None] + (k0 + lanes)[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptr + cols[:, None] * swn + (k0 + lanes)[None, :], mask=n_ok[:, None] & k_ok[None, :],
                    other=0.0)
        acc = _mac(acc, x, w, BLOCK_M, UPCAST)
    return acc


@triton.jit
def _word_dot(x_ptr, x_off, m_ok, w_ptr, s_ptr, z_ptr, cols, n_ok, NCH, swk, swn, ssn, ssg,
              BITS: tl.constexpr, SIGNED: tl.constexpr, GROUP: tl.constexpr, HAS_ZP: tl.constexpr,
              XOR: tl.constexpr, CW: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr,
              BLOCK_N: tl.constexpr):
    """``x[rows] @ (s * (q - z))[cols].T`` in fp32 for word rows: per chunk one ``[CW, BLOCK_N]`` word tile
    (``_word_tile``: either word order), per code position ``i`` a ``[BLOCK_M, CW] x [CW, BLOCK_N]`` dot of the
    activation columns ``i`` (contiguous in the word layout) against the codes ``i``, chained into one fp32 partial
    per scale: per group ``SPAN`` positions, per channel all of K. Each partial then loses the zero point's share
    ``(sum of its x columns) z`` and takes its scale once: per channel once after the loop, not at every position
    (a ``[BLOCK_M, BLOCK_N]`` multiply-add each), and never where z is 0 (unsigned codes without zero points)."""
    PER: tl.constexpr = 32 // BITS
    OFF: tl.constexpr = (1 << (BITS - 1)) if SIGNED else 0
    MASK: tl.constexpr = (1 << BITS) - 1
    U: tl.constexpr = 2 if CW < 16 else 1  # code positions a dot takes: its K side is at least 16
    HAS_Z: tl.constexpr = SIGNED or HAS_ZP
    # Positions a group partial spans inside a chunk: a group's (a divisor of the chunk's PER), the chunk (groups of
    # whole chunks), else one dot (a group of, say, 96 K straddles chunks at offsets that change by chunk; its dots
    # still each lie in one group: ``blocked_unsupported``)
    SPAN: tl.constexpr = PER if GROUP == 0 or GROUP % (PER * CW) == 0 else (
        GROUP // CW if (PER * CW) % GROUP == 0 else U)
    offs_j = tl.arange(0, CW)
    offs_u = tl.arange(0, U * CW)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    part = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # x's columns summed over the partial's positions (row sums at the end), or at 64 rows its row sums: there the
    # [64, U * CW] fp32 sums raised sm_90's spills at g128 from 116 to 192 bytes (ptxas -v), at 16 rows none
    XW: tl.constexpr = 1 if BLOCK_M > 16 else U * CW
    x_cols = tl.zeros((BLOCK_M, XW), dtype=tl.float32)
    for c in range(0, NCH):
        wv = _word_tile(w_ptr, c, offs_j, cols, n_ok, swk, swn, SIGNED, XOR, CW)
        for i in tl.static_range(0, PER, U):
            v = ((wv >> (i * BITS)) & MASK).to(tl.float32)  # offset-binary codes: exact in bf16/fp16
            if U == 2:  # positions i, i + 1 stacked along K, as their activation columns lie
                v1 = ((wv >> ((i + 1) * BITS)) & MASK).to(tl.float32)
                v = tl.reshape(tl.permute(tl.join(v, v1), (2, 0, 1)), (U * CW, BLOCK_N))
            x = tl.load(x_ptr + x_off[:, None] + (c * (PER * CW) + i * CW + offs_u)[None, :], mask=m_ok[:, None],
                        other=0.0)
            if UPCAST:  # the interpreter's bf16 dot is wrong (Triton 3.8); fp32 holds these values exactly
                part = tl.dot(x.to(tl.float32), v, part, input_precision="ieee")
            else:
                part = tl.dot(x, v.to(x.dtype), part)
            if HAS_Z:
                x_cols += _row_sums(x, XW)
            if GROUP != 0 and (i + U) % SPAN == 0:  # the partial's last dot: its group's zero point and scale
                at = cols * ssn + ((c * (PER * CW) + i * CW) // GROUP) * ssg
                s = tl.load(s_ptr + at, mask=n_ok, other=0).to(tl.float32)
                acc += _unzeroed(part, x_cols, z_ptr, at, n_ok, OFF, HAS_Z, HAS_ZP) * s[None, :]
                part = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                x_cols = tl.zeros((BLOCK_M, XW), dtype=tl.float32)
    if GROUP == 0:
        s = tl.load(s_ptr + cols * ssn, mask=n_ok, other=0).to(tl.float32)
        acc = _unzeroed(part, x_cols, z_ptr, cols * ssn, n_ok, OFF, HAS_Z, HAS_ZP) * s[None, :]
    return acc


@triton.jit
def _row_sums(x, XW: tl.constexpr):
    """x in fp32, summed over its columns where ``XW`` is 1 (``[rows, 1]``)."""
    if XW == 1:
        r = tl.sum(x.to(tl.float32), axis=1, keep_dims=True)
    else:
        r = x.to(tl.float32)
    return r


@triton.jit
def _unzeroed(part, x_cols, z_ptr, at, n_ok, OFF: tl.constexpr, HAS_Z: tl.constexpr, HAS_ZP: tl.constexpr):
    """``part - (row sums of x_cols) z`` (``x (q - z) = x q - (sum of x's columns) z``), z = ``OFF`` plus the zero
    points at ``at``; ``part`` itself where z is 0. The zero point stays out of the code tile: subtracting it there,
    before the join of two code positions (H100, Triton 3.6), gave wrong sums wherever z was loaded (asymmetric
    words at two code positions a dot: uint4 g64 / per channel at K = 64), right under the interpreter."""
    if HAS_Z:
        part -= tl.sum(x_cols, axis=1)[:, None] * _zero(z_ptr, at, n_ok, OFF, HAS_ZP)[None, :]
    return part


@triton.jit
def _expert_dot(x_ptr, x_off, m_ok, w_ptr, s_ptr, z_ptr, cols, n_ok, K, NCH, swk, swn, ssn, ssg,
                WORDS: tl.constexpr, BITS: tl.constexpr, SIGNED: tl.constexpr, GROUP: tl.constexpr,
                HAS_ZP: tl.constexpr, XOR: tl.constexpr, CW: tl.constexpr, UPCAST: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    if WORDS:
        y = _word_dot(x_ptr, x_off, m_ok, w_ptr, s_ptr, z_ptr, cols, n_ok, NCH, swk, swn, ssn, ssg, BITS, SIGNED,
                      GROUP, HAS_ZP, XOR, CW, UPCAST, BLOCK_M, BLOCK_N)
    else:
        y = _float_dot(x_ptr, x_off, m_ok, w_ptr, cols, n_ok, K, swn, UPCAST, BLOCK_M, BLOCK_N, BLOCK_K)
    return y


@triton.jit
def _expert_rows(order_ptr, count_ptr, slot_ptr, e, T, E, S, BLOCK_M: tl.constexpr):
    """This program's rows of expert ``e``: their tokens and slots (int64) and the mask of the rows it has (inside
    the expert's count, a slot below ``S``: a pick of a higher rank is dropped)."""
    idx = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = idx < tl.load(count_ptr + e)
    tokens = tl.load(order_ptr + e * T + idx, mask=m_ok, other=0).to(tl.int64)
    slots = tl.load(slot_ptr + tokens * E + e, mask=m_ok, other=0).to(tl.int64)
    return tokens, slots, m_ok & (slots < S)


@triton.jit
def _moe_gate_up_blocked(x_ptr, order_ptr, count_ptr, slot_ptr, w_ptr, s_ptr, z_ptr, o_ptr, T, E, I, K, NCH, S,
                         sxt, sew, swk, swn, ses, ssn, ssg, sot, sos,
                         WORDS: tl.constexpr, BITS: tl.constexpr, SIGNED: tl.constexpr, GROUP: tl.constexpr,
                         HAS_ZP: tl.constexpr, XOR: tl.constexpr, CW: tl.constexpr, ACT: tl.constexpr,
                         ROUND: tl.constexpr, INTERLEAVED: tl.constexpr, UPCAST: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Program (row block, column block, expert e): ``act(gate) * up`` of e's rows in the block, to their slots;
    the rows and the tile layouts of ``moe_gemv._moe_gate_up`` (``INTERLEAVED``: (gate, up) row pairs), its
    roundings."""
    e = tl.program_id(2)
    if tl.program_id(0) * BLOCK_M < tl.load(count_ptr + e):
        tokens, slots, m_ok = _expert_rows(order_ptr, count_ptr, slot_ptr, e, T, E, S, BLOCK_M)
        offs = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        ok = offs < I
        e64 = tl.cast(e, tl.int64)  # an expert's offset in a large stack passes 2**31 elements
        w_e, s_e, z_e = w_ptr + e64 * sew, s_ptr + e64 * ses, z_ptr + e64 * ses
        x_off = tokens * sxt
        if INTERLEAVED:
            pairs = tl.program_id(1) * (2 * BLOCK_N) + tl.arange(0, 2 * BLOCK_N)
            y = _expert_dot(x_ptr, x_off, m_ok, w_e, s_e, z_e, pairs, pairs < 2 * I, K, NCH, swk, swn, ssn, ssg,
                            WORDS, BITS, SIGNED, GROUP, HAS_ZP, XOR, CW, UPCAST, BLOCK_M, 2 * BLOCK_N, BLOCK_K)
            g, u = tl.split(tl.reshape(y, (BLOCK_M, BLOCK_N, 2)))
        else:
            g = _expert_dot(x_ptr, x_off, m_ok, w_e, s_e, z_e, offs, ok, K, NCH, swk, swn, ssn, ssg, WORDS, BITS,
                            SIGNED, GROUP, HAS_ZP, XOR, CW, UPCAST, BLOCK_M, BLOCK_N, BLOCK_K)
            u = _expert_dot(x_ptr, x_off, m_ok, w_e, s_e, z_e, offs + I, ok, K, NCH, swk, swn, ssn, ssg, WORDS,
                            BITS, SIGNED, GROUP, HAS_ZP, XOR, CW, UPCAST, BLOCK_M, BLOCK_N, BLOCK_K)
        a = _rounded(activation(_rounded(g, ROUND), ACT), ROUND)
        h = _rounded(a * _rounded(u, ROUND), ROUND)
        at = o_ptr + (tokens * sot + slots * sos)[:, None] + offs[None, :]
        tl.store(at, h.to(o_ptr.dtype.element_ty), mask=m_ok[:, None] & ok[None, :])


@triton.jit
def _moe_down_blocked(h_ptr, r_ptr, order_ptr, count_ptr, slot_ptr, w_ptr, s_ptr, z_ptr, y_ptr, T, E, N, K, NCH,
                      S, sht, shs, srt, sew, swk, swn, ses, ssn, ssg, syt, sys,
                      WORDS: tl.constexpr, BITS: tl.constexpr, SIGNED: tl.constexpr, GROUP: tl.constexpr,
                      HAS_ZP: tl.constexpr, XOR: tl.constexpr, CW: tl.constexpr, Y_ROUND: tl.constexpr,
                      OUT_ROUND: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr):
    """Program (row block, column block, expert e): each of e's rows' term ``round_out(round(down_e(h[t, slot])) *
    dense[t, e])`` into ``y[t, slot]``, as ``moe_down`` rounds it."""
    e = tl.program_id(2)
    if tl.program_id(0) * BLOCK_M < tl.load(count_ptr + e):
        tokens, slots, m_ok = _expert_rows(order_ptr, count_ptr, slot_ptr, e, T, E, S, BLOCK_M)
        offs = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        ok = offs < N
        e64 = tl.cast(e, tl.int64)
        y = _expert_dot(h_ptr, tokens * sht + slots * shs, m_ok, w_ptr + e64 * sew, s_ptr + e64 * ses,
                        z_ptr + e64 * ses, offs, ok, K, NCH, swk, swn, ssn, ssg, WORDS, BITS, SIGNED, GROUP, HAS_ZP,
                        XOR, CW, UPCAST, BLOCK_M, BLOCK_N, BLOCK_K)
        r = tl.load(r_ptr + tokens * srt + e, mask=m_ok, other=0).to(tl.float32)
        term = _rounded(_rounded(y, Y_ROUND) * r[:, None], OUT_ROUND)
        at = y_ptr + (tokens * syt + slots * sys)[:, None] + offs[None, :]
        tl.store(at, term.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & ok[None, :])


@triton.jit
def _moe_slot_sum(y_ptr, p_ptr, o_ptr, E, N, S, syt, sys, spt, sot, OUT_ROUND: tl.constexpr, EP: tl.constexpr,
                  BLOCK_N: tl.constexpr):
    """Program (token t, column block): t's filled slots added in order (its pick count: a sum of its picks),
    rounded to the output dtype after each add (the dense form's chain; its unpicked experts add an exact 0)."""
    t = tl.program_id(0)
    cols = tl.arange(0, EP)
    picks = tl.sum(tl.load(p_ptr + t * spt + cols, mask=cols < E, other=0).to(tl.int32), axis=0)
    offs = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = offs < N
    total = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for j in range(0, S):
        v = tl.load(y_ptr + t * syt + j * sys + offs, mask=ok & (j < picks), other=0.0).to(tl.float32)
        total = tl.where(j < picks, _rounded(total + v, OUT_ROUND), total)
    tl.store(o_ptr + t * sot + offs, total.to(o_ptr.dtype.element_ty), mask=ok)


ROUTE_BLOCK_T = 64
"""Tokens a routing program reads per step (a ``[64, E]`` tile of the picks)."""

BLOCK_M_PREFILL_ROWS = 128
"""Rows (tokens of the call) above which a program takes 64 of an expert's rows, not 16: a decode batch's experts
hold a few rows each (tiles of 16, ``tl.dot``'s least), a prefill's hundreds. Not yet tuned on a GPU."""


def blocked_unsupported(weight: torch.Tensor, qdtype: str, group_size: int, k: int, x_dtype: torch.dtype) -> str | None:
    """Why the blocked ops cannot read a stacked expert weight (which ``moe_weight_unsupported`` takes) of input
    size ``k`` against rows of ``x_dtype``, or None."""
    if not qdtype:
        return None if weight.dtype == x_dtype else f"float weight {weight.dtype}, rows {x_dtype}: one dot dtype"
    if chunk_words(k, group_size, _bits(qdtype)) < 16 and group_size % 16:
        return f"{qdtype} words in chunks of 8 with groups of {group_size}: a dot takes two code positions, one group"
    return None


FLOAT_BLOCK_K = 64
"""K per step of a float weight's dot (``moe_gemv``'s GEMVs take 256): a ``[64, 64]`` row tile and a ``[128, 64]``
weight tile, ~24 KiB of shared memory a pipeline stage."""


def _block_m(rows: int) -> int:
    return 16 if interpreting() or rows <= BLOCK_M_PREFILL_ROWS else 64


def _block_n(n: int, rows: int, slots: int, n_experts: int, block_m: int) -> int:
    """Columns per program: 128 under the interpreter (its cost is per program); on the GPU 64, down to 16 while the
    programs with rows (about ``rows * slots / E`` rows an expert, over at most ``rows * slots`` experts) number
    fewer than ``MIN_PROGRAMS``: a Mixtral-shaped down projection (H = 1024) at 16 rows has 8 experts x 16 column
    blocks of 64, 128 programs, and 512 of 16. Not yet tuned on a GPU."""
    if interpreting():
        return 128
    busy = min(n_experts, rows * slots) * cdiv(cdiv(rows * slots, n_experts), block_m)
    block = 64
    while block > 16 and busy * cdiv(n, block) < MIN_PROGRAMS:
        block //= 2
    return block


@triton_op("lowbit::moe_route", mutates_args=())
def moe_route(picked: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(order [E, T], counts [E], slot [T, E])``, int32: each expert's tokens (ascending, ``counts[e]`` of them)
    and each pick's rank among its token's picks; entries past a count or of an unpicked pair unwritten."""
    check(picked.dim() == 2 and picked.dtype == torch.bool, "moe_route", f"picked {tuple(picked.shape)} "
          f"{picked.dtype}: not bool [tokens, experts]")
    tokens, n_experts = picked.shape
    order = torch.empty((n_experts, tokens), device=picked.device, dtype=torch.int32)
    counts = torch.empty((n_experts,), device=picked.device, dtype=torch.int32)
    slot = torch.empty((tokens, n_experts), device=picked.device, dtype=torch.int32)
    p = _picked_bytes(picked)
    launcher(p, _moe_route)[(n_experts,)](p, order, counts, slot, tokens, n_experts, p.stride(0),
                                           BLOCK_T=ROUTE_BLOCK_T, EP=next_pow2(n_experts))
    return order, counts, slot


@moe_route.register_fake
def _(picked):
    tokens, n_experts = picked.shape
    return (picked.new_empty((n_experts, tokens), dtype=torch.int32),
            picked.new_empty((n_experts,), dtype=torch.int32), picked.new_empty((tokens, n_experts), dtype=torch.int32))


def _expert_grid(rows: int, n: int, n_experts: int, slots: int) -> tuple[tuple[int, int, int], int, int]:
    """Grid (row blocks, column blocks, experts), BLOCK_M and BLOCK_N: the row blocks vary fastest, so the
    programs reading one expert's weight tile run together (a re-read hits L2)."""
    block_m = _block_m(rows)
    block_n = _block_n(n, rows, slots, n_experts, block_m)
    return (cdiv(rows, block_m), cdiv(n, block_n), n_experts), block_m, block_n


def _check_route(op: str, rows: int, n_experts: int, order: torch.Tensor, counts: torch.Tensor,
                 slot: torch.Tensor) -> None:
    check(order.shape == (n_experts, rows) and counts.shape == (n_experts,) and slot.shape == (rows, n_experts)
          and all(t.dtype == torch.int32 and t.is_contiguous() for t in (order, counts, slot)), op,
          f"route {tuple(order.shape)} / {tuple(counts.shape)} / {tuple(slot.shape)}: not moe_route's for "
          f"{rows} tokens and {n_experts} experts")


def _blocked_operands(op: str, rows: int, k: int, x_dtype: torch.dtype, order: torch.Tensor, counts: torch.Tensor,
                      slot: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None,
                      zero_point: torch.Tensor | None, qdtype: str, group_size: int) -> tuple:
    """Both blocked ops' common checks (the route, ``blocked_unsupported``) and the weight's launch arguments:
    ``moe_gemv._weight_meta``'s nine, then its constexprs with ``FLOAT_BLOCK_K``."""
    args, meta = _weight_meta(op, weight, scale, zero_point, qdtype, group_size, k)
    _check_route(op, rows, weight.shape[0], order, counts, slot)
    why = blocked_unsupported(weight, qdtype, group_size, k, x_dtype)
    check(why is None, op, f"weight {tuple(weight.shape)}, K={k}: {why}")
    return (*args, {**meta, "BLOCK_K": FLOAT_BLOCK_K})


@triton_op("lowbit::moe_gate_up_blocked", mutates_args=())
def moe_gate_up_blocked(x: torch.Tensor, order: torch.Tensor, counts: torch.Tensor, slot: torch.Tensor,
                        weight: torch.Tensor, scale: torch.Tensor | None, zero_point: torch.Tensor | None,
                        qdtype: str, group_size: int, epilogue: str, interleaved: bool, slots: int) -> torch.Tensor:
    """``[T, slots, I]``: ``act(gate_e(x_t)) * up_e(x_t)`` at ``[t, slot[t, e]]`` for each pick of ``moe_route``'s
    ``(order, counts, slot)``; ``qdtype`` "" for a float weight; ``epilogue`` ``<act>*up``."""
    act, gated = parse_epilogue(epilogue, "moe_gate_up_blocked")
    check(gated, "moe_gate_up_blocked", f"epilogue {epilogue!r} is not a gated activation")
    check(x.dim() == 2 and x.stride(-1) == 1 and x.dtype in FLOAT_DTYPES, "moe_gate_up_blocked",
          f"x {tuple(x.shape)} {x.dtype}: rows of bf16/fp16")
    nch, sew, swk, swn, ses, ssn, ssg, s, z, meta = _blocked_operands(
        "moe_gate_up_blocked", x.shape[0], x.shape[1], x.dtype, order, counts, slot, weight, scale, zero_point,
        qdtype, group_size)
    n_experts, inner = _gate_up_rows("moe_gate_up_blocked", weight)
    out = torch.empty((x.shape[0], slots, inner), device=x.device, dtype=x.dtype)
    if x.shape[0] == 0:
        return out
    grid, block_m, block_n = _expert_grid(x.shape[0], inner, n_experts, slots)
    launcher(x, _moe_gate_up_blocked)[grid](
        x, order, counts, slot, weight, s, z, out, x.shape[0], n_experts, inner, x.shape[1], nch, slots, x.stride(0),
        sew, swk, swn, ses, ssn, ssg, out.stride(0), out.stride(1), **meta, ACT=act, ROUND=_ROUND_CODE[x.dtype],
        INTERLEAVED=interleaved, UPCAST=interpreting(), BLOCK_M=block_m, BLOCK_N=block_n)
    return out


@moe_gate_up_blocked.register_fake
def _(x, order, counts, slot, weight, scale, zero_point, qdtype, group_size, epilogue, interleaved, slots):
    return x.new_empty((x.shape[0], slots, weight.shape[1] // 2))


@triton_op("lowbit::moe_down_blocked", mutates_args=())
def moe_down_blocked(h: torch.Tensor, picked: torch.Tensor, dense: torch.Tensor, order: torch.Tensor,
                     counts: torch.Tensor, slot: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None,
                     zero_point: torch.Tensor | None, qdtype: str, group_size: int,
                     out_dtype: torch.dtype) -> torch.Tensor:
    """``[T, H]`` in ``out_dtype``: ``moe_down``'s sum over each token's picks in expert order, ``h``'s rows by
    slot (``moe_gate_up_blocked``'s)."""
    n_experts, n = _check_down("moe_down_blocked", "slots", h, picked, dense, weight, out_dtype)
    nch, sew, swk, swn, ses, ssn, ssg, s, z, meta = _blocked_operands(
        "moe_down_blocked", h.shape[0], h.shape[2], h.dtype, order, counts, slot, weight, scale, zero_point, qdtype,
        group_size)
    out = torch.empty((h.shape[0], n), device=h.device, dtype=out_dtype)
    if h.shape[0] == 0:
        return out
    terms = torch.empty((h.shape[0], h.shape[1], n), device=h.device, dtype=out_dtype)
    if dense.stride(-1) != 1:
        dense = dense.contiguous()
    grid, block_m, block_n = _expert_grid(h.shape[0], n, n_experts, h.shape[1])
    launcher(h, _moe_down_blocked)[grid](
        h, dense, order, counts, slot, weight, s, z, terms, h.shape[0], n_experts, n, h.shape[2], nch, h.shape[1],
        h.stride(0), h.stride(1), dense.stride(0), sew, swk, swn, ses, ssn, ssg, terms.stride(0), terms.stride(1),
        **meta, Y_ROUND=_ROUND_CODE[h.dtype], OUT_ROUND=_ROUND_CODE[out_dtype], UPCAST=interpreting(),
        BLOCK_M=block_m, BLOCK_N=block_n)
    p = _picked_bytes(picked)
    launcher(h, _moe_slot_sum)[(h.shape[0], cdiv(n, block_n))](
        terms, p, out, n_experts, n, h.shape[1], terms.stride(0), terms.stride(1), p.stride(0), out.stride(0),
        OUT_ROUND=_ROUND_CODE[out_dtype], EP=next_pow2(n_experts), BLOCK_N=block_n)
    return out


@moe_down_blocked.register_fake
def _(h, picked, dense, order, counts, slot, weight, scale, zero_point, qdtype, group_size, out_dtype):
    return h.new_empty((h.shape[0], weight.shape[1]), dtype=out_dtype)


def moe_route_ref(picked: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``moe_route`` in torch: a stable argsort of the unpicked flags per expert (its tokens first, ascending), the
    column sums, and the exclusive cumulative sum of each token's picks; here every entry is written."""
    order = torch.argsort((~picked).to(torch.int8), dim=0, stable=True).t()
    slot = picked.to(torch.int32).cumsum(1) - picked.to(torch.int32)
    return order.to(torch.int32).contiguous(), picked.sum(0).to(torch.int32), slot.to(torch.int32)


def _slot_index(picked: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The (token, slot) of each pick, in ``picked[picked]``'s order (row-major: token, then expert)."""
    tokens, _ = torch.nonzero(picked, as_tuple=True)
    return tokens, moe_route_ref(picked)[2][picked].long()


def moe_gate_up_blocked_ref(x: torch.Tensor, picked: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None,
                            zero_point: torch.Tensor | None, qdtype: str, group_size: int, epilogue: str,
                            interleaved: bool, slots: int) -> torch.Tensor:
    """``moe_gate_up_blocked`` in torch: ``moe_gate_up_ref``'s picked rows moved to their slots (0 elsewhere)."""
    h = moe_gate_up_ref(x, picked, weight, scale, zero_point, qdtype, group_size, epilogue, interleaved)
    out = h.new_zeros((x.shape[0], slots, h.shape[2]))
    out[_slot_index(picked)] = h[picked]
    return out


def moe_down_blocked_ref(h: torch.Tensor, picked: torch.Tensor, dense: torch.Tensor, weight: torch.Tensor,
                         scale: torch.Tensor | None, zero_point: torch.Tensor | None, qdtype: str, group_size: int,
                         out_dtype: torch.dtype) -> torch.Tensor:
    """``moe_down_blocked`` in torch: ``h``'s slots moved back to their experts (``[T, E, I]``, 0 where unpicked),
    then ``moe_down_ref``."""
    by_expert = h.new_zeros((h.shape[0], picked.shape[1], h.shape[2]))
    by_expert[picked] = h[_slot_index(picked)]
    return moe_down_ref(by_expert, picked, dense, weight, scale, zero_point, qdtype, group_size, out_dtype)
