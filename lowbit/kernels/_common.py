"""What every kernel module shares: the interpreter switch, shape checks that name the op, jit helpers."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

KERNEL_DTYPES = (torch.bfloat16, torch.float16)
"""Activation dtypes the kernels take; anything else is the caller's reference fallback."""


def interpreting() -> bool:
    """True under ``TRITON_INTERPRET=1`` (kernels run on CPU tensors through Triton's interpreter)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def on_kernel_device(t: torch.Tensor) -> bool:
    """A tensor a kernel can read: CUDA, or any device under the interpreter."""
    return t.is_cuda or interpreting()


def launcher(t: torch.Tensor, kernel):
    """``wrap_triton(kernel)`` while torch traces (fake or functional tensors, torch.compile), else ``kernel``.

    Eager calls skip the traceable wrapper: its per-launch Python cost is far above the kernel's run time at
    decode sizes, and outside a ``triton_op`` it re-ran the autotuner on every call."""
    if type(t) in (torch.Tensor, torch.nn.Parameter) and not torch.compiler.is_compiling():
        return kernel
    return wrap_triton(kernel)


def check(cond: bool, op: str, msg: str) -> None:
    """Raise ``ValueError`` naming the op when a kernel's precondition fails (the backend falls back first)."""
    if not cond:
        raise ValueError(f"lowbit kernel {op}: {msg}")


def cdiv(a: int, b: int) -> int:
    """Ceiling division on the host (``triton.cdiv`` costs microseconds per call through Triton's jit wrapper)."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (host side)."""
    return 1 << max(0, (int(n) - 1).bit_length())


def pow2_at_most(n: int, cap: int) -> int:
    """The largest power of two <= min(n, cap) (at least 1)."""
    p = 1
    while p * 2 <= min(n, cap):
        p *= 2
    return p


def is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def m_bucket(m: int) -> int:
    """M rounded up to a power of two (>= 16): the autotune key, so one decode or prefill size tunes once."""
    return max(16, next_pow2(m))


@triton.jit
def round_half_even(y):
    """round-half-to-even of fp32 ``y`` with |y| < 2**22 (what ``torch.round`` does), via the 1.5*2**23 trick.

    The add rounds to an integer in fp32's round-to-nearest-even mode; the subtract is exact. Used instead of
    libdevice's rint so the same code runs under the interpreter."""
    return (y + 12582912.0) - 12582912.0


@triton.jit
def round_to_e4m3(y):
    """fp32 ``y`` (|y| <= 448) rounded half-to-even onto the e4m3 grid, still fp32.

    The cast that follows is then exact whatever its rounding mode (the interpreter's fp32 -> fp8 cast is not
    round-to-nearest-even). The grid spacing is 2**(e - 3) for exponent e, at least 2**-9 (subnormals)."""
    bits = y.to(tl.int32, bitcast=True)
    e = ((bits >> 23) & 0xFF) - 127
    e = tl.maximum(e, -6)
    ulp = ((e - 3 + 127) << 23).to(tl.float32, bitcast=True)
    return round_half_even(y / ulp) * ulp


@triton.jit
def nibbles(b, SIGNED: tl.constexpr):
    """Low and high nibbles of uint8 ``b`` as int32 codes (low = even K index, high = odd: lowbit's packing)."""
    lo = (b & 0xF).to(tl.int32)
    hi = (b >> 4).to(tl.int32)
    if SIGNED:  # two's-complement nibble: 8..15 -> -8..-1
        lo = lo - ((lo & 8) << 1)
        hi = hi - ((hi & 8) << 1)
    return lo, hi


@triton.jit
def unpack_nibbles(b, SIGNED: tl.constexpr):
    """uint8 bytes ``[R, C]`` -> int32 codes ``[R, 2C]`` in K order (an interleave of the two nibbles)."""
    lo, hi = nibbles(b, SIGNED)
    return tl.interleave(lo, hi)
