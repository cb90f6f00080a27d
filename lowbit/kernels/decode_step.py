"""Two small kernels of a decode step whose aten forms cost more than their work: the greedy argmax of the logits
and the write of a step's keys/values into a float KV cache.

Measured inside the 7B-shaped stack's CUDA-graph decode step on the H200 (``tools/profile_decode.py``, session 7):
``logits.float().argmax(-1)`` took a 3.5 µs copy plus a 10.3 µs single-block reduction over 32000 logits, and
each ``cache.scatter_(2, index, new)`` 4.2 µs (8 per step) for 8 KB of new rows. Both are launch- and
latency-bound: ``row_argmax`` reads a row in one wide tile per program (no fp32 copy), ``write_cache_rows`` copies
one ``head_dim`` row per program to the slot its position names.

- ``torch.ops.lowbit.row_argmax(x)``: ``x.argmax(-1)`` over the last dim of a 2-D ``[B, V]`` tensor, the first
  index of the maximum as torch returns it (NaNs: torch returns the first NaN; here a NaN never wins, so a row with
  NaNs can differ — a NaN logit is already a broken model). Reference: ``torch.argmax``.
- ``write_cache_rows(cache, positions, new)``: ``cache[b, h, positions[b, n], :] = new[b, h, n, :]``, in place:
  the form of ``cache.scatter_(2, index, new)`` whose index is the positions broadcast over heads and head_dim
  (``cache_rows_index`` recognises it, so callers keep the general scatter for any other index).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from lowbit.kernels._common import check, launcher, next_pow2, on_kernel_device

__all__ = ["cache_rows_index", "row_argmax", "row_argmax_ref", "write_cache_rows", "write_cache_rows_ref"]

ARGMAX_TILE = 32768
"""Logits per program and loop step: a 32K vocabulary (Llama-2) is one load per row, read by 16 warps."""


def row_argmax_ref(x: torch.Tensor) -> torch.Tensor:
    return x.argmax(-1)


@triton.jit
def _row_argmax(x_ptr, o_ptr, V, sxb, BLOCK: tl.constexpr):
    """One row per program: the running (max, first index) over ``BLOCK``-wide tiles, ties to the left."""
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    best = tl.full((), float("-inf"), tl.float32)
    best_i = tl.full((), 0, tl.int64)
    for start in range(0, V, BLOCK):
        ok = offs + start < V
        v = tl.load(x_ptr + row * sxb + start + offs, mask=ok, other=float("-inf")).to(tl.float32)
        v = tl.where(v != v, float("-inf"), v)  # a NaN never wins (see the module docstring)
        m = tl.max(v, 0)
        i = tl.argmax(v, 0, tie_break_left=True).to(tl.int64) + start
        take = m > best  # strictly greater: an equal maximum in a later tile keeps the first index
        best_i = tl.where(take, i, best_i)
        best = tl.where(take, m, best)
    tl.store(o_ptr + row, best_i)


@triton_op("lowbit::row_argmax", mutates_args=())
def row_argmax(x: torch.Tensor) -> torch.Tensor:
    """``x.argmax(-1)`` for a 2-D ``[B, V]`` tensor (int64 ``[B]``); torch's own argmax off the kernel device."""
    check(x.dim() == 2, "row_argmax", f"expects [B, V] logits, got shape {tuple(x.shape)}")
    if not on_kernel_device(x):
        return row_argmax_ref(x)
    if x.stride(1) != 1:
        x = x.contiguous()
    b, v = x.shape
    out = torch.empty(b, device=x.device, dtype=torch.int64)
    block = min(ARGMAX_TILE, next_pow2(v))
    launcher(x, _row_argmax)[(b,)](x, out, v, x.stride(0), BLOCK=block, num_warps=16 if block >= 8192 else 4)
    return out


def cache_rows_index(index: torch.Tensor, dim: int, src: torch.Tensor) -> bool:
    """True when ``scatter_(dim, index, src)`` on a ``[B, H, S, D]`` cache writes whole rows at per-(b, n)
    positions: dim 2 and an index broadcast over heads and head_dim (strides 0), as a decode step's is."""
    return (dim == 2 and index.dim() == 4 and index.shape == src.shape and index.stride(1) == 0
            and index.stride(3) == 0)


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
