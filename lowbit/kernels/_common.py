"""What every kernel module shares: the interpreter switch, shape checks that name the op, jit helpers."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

KERNEL_DTYPES = (torch.bfloat16, torch.float16)
"""Activation dtypes the kernels take; anything else is the caller's reference fallback."""


def interpreting() -> bool:
    """True under ``TRITON_INTERPRET=1`` (kernels run on CPU tensors through Triton's interpreter)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def on_kernel_device(t: torch.Tensor) -> bool:
    """A tensor a kernel can read: CUDA, or any device under the interpreter."""
    return t.is_cuda or interpreting()


def on_kernel_rows(t: torch.Tensor) -> bool:
    """Activation rows the kernels take: ``KERNEL_DTYPES`` on a kernel device (others: the caller's reference)."""
    return on_kernel_device(t) and t.dtype in KERNEL_DTYPES


class _PdlState:
    """Whether this thread's launches use programmatic dependent launch (``pdl_launches``)."""

    on = False


def pdl_on() -> bool:
    """Inside ``pdl_launches`` and on the GPU (the interpreter has no grid dependency control)."""
    return _PdlState.on and not interpreting()


class pdl_launches:  # noqa: N801 - used as a context manager, like torch.no_grad
    """Launch the kernels that take a ``PDL`` constexpr with programmatic dependent launch (Hopper+): each starts
    while its predecessor finishes and waits for it (``griddepcontrol.wait``) before it touches memory another
    kernel writes, so a CUDA graph of launch-bound decode kernels overlaps one's tail with the next one's launch.
    Measured (H200, session 14, a graph of 64 chained GEMV-like launches): 0.6-0.85 µs saved per launch."""

    def __enter__(self) -> None:
        self._was = _PdlState.on
        _PdlState.on = True

    def __exit__(self, *exc: object) -> None:
        _PdlState.on = self._was


def pdl_launch_options() -> dict[str, bool]:
    """The launch keywords of a kernel declaring a ``PDL`` constexpr: ``PDL`` always (Inductor's launcher for a user
    kernel miscounts its arguments when a defaulted constexpr is left out: ``_direct_or_split``), and the launch
    attribute ``launch_pdl`` where ``pdl_on``."""
    on = pdl_on()
    return {"PDL": on, "launch_pdl": True} if on else {"PDL": False}


def launcher(t: torch.Tensor, kernel):
    """``wrap_triton(kernel)`` while torch traces (fake or functional tensors, torch.compile), else ``kernel``.

    Eager calls skip the traceable wrapper: its per-launch Python cost is far above the kernel's run time at
    decode sizes, and outside a ``triton_op`` it re-ran the autotuner on every call. An eager tensor no kernel can
    read (CPU without the interpreter) is refused here, naming the kernel (``check_kernel_device``)."""
    if type(t) in (torch.Tensor, torch.nn.Parameter) and not torch.compiler.is_compiling():
        if not t.is_cuda:
            check_kernel_device(t, kernel)
        return kernel
    return wrap_triton(kernel)


def check_kernel_device(t: torch.Tensor, kernel: object) -> None:
    """Refuse a tensor the Triton kernel ``kernel`` cannot read, with what to do instead: without this a CPU tensor
    outside the interpreter reached Triton's launcher, which said only "0 active drivers ([]). There should only be
    one." (no GPU) or "Pointer argument cannot be accessed from Triton (cpu tensor?)" (a GPU, the tensor on CPU)."""
    if on_kernel_device(t):
        return
    from lowbit.errors import DeviceError

    fn = kernel
    while hasattr(fn, "fn"):  # Autotuner -> JITFunction -> the Python function
        fn = fn.fn
    name = getattr(fn, "__name__", type(kernel).__name__)
    raise DeviceError(f"lowbit kernel {name}: its operand {tuple(t.shape)} {t.dtype} is on {t.device}, and "
                      "lowbit's Triton kernels read CUDA tensors only (CPU tensors only under TRITON_INTERPRET=1, "
                      "set before torch and triton are imported): move the operands to the GPU, or call the "
                      "op's plain-torch reference (lowbit.kernels.*_ref) or compile with backend='torch'")


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
def max_nan(x, axis: tl.constexpr):
    """``tl.max`` that keeps a NaN, as ``torch.amax`` does. ``tl.max`` (and ``tl.maximum``) return the other operand
    (PTX ``max.f32``), so a NaN row quantized in a kernel got a finite scale and finite codes where the reference's
    scale is NaN: a model whose activations broke decoded garbage instead of NaN. Two plain reductions (the slice's
    NaNs summed: NaN where it holds one, else 0), not ``tl.reduce`` with a NaN-keeping combine, which Triton's
    interpreter runs element by element in Python (the A8 tests took 2-4x as long)."""
    nans = tl.sum(tl.where(x != x, x, 0.0), axis)
    return tl.where(nans != nans, nans, tl.max(x, axis))


@triton.jit
def min_nan(x, axis: tl.constexpr):
    """``tl.min`` that keeps a NaN, as ``torch.amin`` does (see ``max_nan``)."""
    nans = tl.sum(tl.where(x != x, x, 0.0), axis)
    return tl.where(nans != nans, nans, tl.min(x, axis))


@triton.jit
def pdl_prologue(PDL: tl.constexpr):
    """With ``PDL`` (``pdl_launches``): let the next kernel launch now, then wait until the kernels before this one
    have finished and flushed: the first lines of a kernel every input of which another kernel may have written."""
    if PDL:
        gdc_launch_dependents()
        gdc_wait()


@triton.jit
def round_to_bf16(y):
    """fp32 ``y`` (finite) rounded half-to-even onto the bfloat16 grid, still fp32: the cast that follows is then
    exact whatever its rounding mode (the interpreter's fp32 -> bf16 cast truncates; the GPU's rounds to nearest
    even, the same result). Add 0x7FFF plus the kept LSB to the bits, clear the low 16 (no int32 overflow for
    finite values)."""
    bits = y.to(tl.int32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def round_like(y, like, IS_BF16: tl.constexpr):
    """fp32 ``y`` rounded once to ``like``'s dtype where torch's op would round it, still fp32: bf16 half to even
    by its bits (``round_to_bf16``: the interpreter's cast truncates), other dtypes by a cast there and back."""
    if IS_BF16:
        r = round_to_bf16(y)
    else:
        r = y.to(like.dtype).to(tl.float32)
    return r


@triton.jit
def round_to_e4m3(y):
    """fp32 ``y`` (|y| <= 448) rounded half-to-even onto the e4m3 grid, still fp32.

    The cast that follows is then exact whatever its rounding mode (the interpreter's fp32 -> fp8 cast is not
    round-to-nearest-even). The grid spacing is 2**(e - 3) for exponent e, at least 2**-9 (subnormals)."""
    bits = y.to(tl.int32, bitcast=True)
    e = ((bits >> 23) & 0xFF) - 127
    e = tl.maximum(e, -6)
    ulp = ((e - 3 + 127) << 23).to(tl.float32, bitcast=True)
    r = round_half_even(y / ulp) * ulp
    return tl.where(r == 0.0, y * 0.0, r)  # a negative y that rounds to zero is -0 (torch's cast: code 0x80, not 0)


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


ACTIVATIONS = {"": 0, "silu": 1, "gelu": 2, "gelu_tanh": 3}
"""An epilogue's activation -> the ``ACT`` constexpr of ``activation`` (0: none)."""


EPILOGUE_CODES = {**{act: (code, False) for act, code in ACTIVATIONS.items()},
                  **{f"{act}*up": (code, True) for act, code in ACTIVATIONS.items() if act}}
"""Every epilogue an op takes -> ``(ACT, gated)``."""


def parse_epilogue(epilogue: str, op: str) -> tuple[int, bool]:
    """``(ACT, gated)`` of an op's ``epilogue``: ``""``, an activation (``silu``, ``gelu``, ``gelu_tanh``: applied
    to the output) or ``<activation>*up`` (a gated MLP: the output columns are interleaved (gate, up) pairs and
    the op returns ``act(gate) * up``, half as wide). One dict lookup: ops parse it on every call."""
    parsed = EPILOGUE_CODES.get(epilogue)
    if parsed is None:
        names = ", ".join(repr(a) for a in ACTIVATIONS if a) + " or one of them followed by '*up'"
        check(False, op, f"epilogue {epilogue!r} is not '' (none), {names}")
    return parsed


def activation_ref(y: torch.Tensor, act: str) -> torch.Tensor:
    """The IR's activation op in plain torch (``lowbit.ir.ops.silu`` / ``gelu``)."""
    if act == "silu":
        return torch.nn.functional.silu(y)
    if act in ("gelu", "gelu_tanh"):
        return torch.nn.functional.gelu(y, approximate="tanh" if act == "gelu_tanh" else "none")
    return y


def epilogue_ref(y: torch.Tensor, epilogue: str, halves: bool = False) -> torch.Tensor:
    """What the unfused ops compute after a linear whose op fused ``epilogue`` (``parse_epilogue``): the
    activation, or for ``act*up`` the gated MLP's ``act(gate) * up`` on interleaved (gate, up) columns (the
    weight-only ops' layout), or with ``halves`` on the gate columns then the up columns (``float_linear``'s: a
    merged weight as ``merge_horizontal`` makes it; views, no copy); ``y`` itself for no epilogue."""
    if not epilogue:
        return y
    act, _, up = epilogue.partition("*")
    if up:
        gate, upv = y.tensor_split(2, -1) if halves else y.unflatten(-1, (-1, 2)).unbind(-1)
        return activation_ref(gate, act) * upv
    return activation_ref(y, act)


def norm_parts_ref(stream: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An RMSNorm split in two (the residual stream's half): the stream times the gain, and the row's sum of squares
    in fp32 as ``[..., 1]`` (the kernels leave ``[..., P]`` partial sums: ``norm_from_parts_ref`` adds them)."""
    return weight * stream, stream.float().pow(2).sum(-1, keepdim=True)


def norm_from_parts_ref(gained: torch.Tensor, sumsq: torch.Tensor, eps: float) -> torch.Tensor:
    """The other half: ``gained * rsqrt(mean of squares + eps)``. Against the IR's ``rms_norm`` (fp32 statistics,
    the gain applied to the normalised row in the input dtype) it rounds ``gain * stream`` where that rounds
    ``stream * rsqrt``: one bf16 step per element either way."""
    r = torch.rsqrt(sumsq.sum(-1, keepdim=True) / gained.shape[-1] + eps)
    return (gained.float() * r).to(gained.dtype)


@triton.jit
def activation(g, ACT: tl.constexpr):
    """fp32 ``g`` through the ``ACT`` activation (``ACTIVATIONS``): silu, exact (erf) GELU or tanh-approximated
    GELU (tanh as ``1 - 2 / (1 + exp(2z))``, which saturates to +-1 without a NaN), or unchanged."""
    if ACT == 1:
        r = g / (1.0 + tl.exp(-g))
    elif ACT == 2:
        r = 0.5 * g * (1.0 + tl.math.erf(g * 0.7071067811865476))
    elif ACT == 3:
        z = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        r = 0.5 * g * (2.0 - 2.0 / (1.0 + tl.exp(2.0 * z)))
    else:
        r = g
    return r


@triton.jit
def store_epilogue(acc, o_ptr, offs_m, n0, m_ok, som, N, ACT: tl.constexpr, GATED: tl.constexpr):
    """Store an fp32 output tile ``[BM, BN]`` (bias already added) with its epilogue, rounding where the unfused
    ops round: the linear's output to the output dtype first, then the activation's. The tile's columns start at
    ``n0`` of the ``N``-wide product; ``GATED``: they are (gate, up) pairs and the tile's ``BN / 2`` outputs
    ``act(gate) * up`` go to columns ``n0 / 2 ...`` of the ``N / 2``-wide output, rounded as ``epilogue_ref``
    rounds them."""
    dt = o_ptr.dtype.element_ty
    if GATED:
        BM: tl.constexpr = acc.shape[0]
        BH: tl.constexpr = acc.shape[1] // 2
        g, u = tl.split(tl.reshape(acc.to(dt).to(tl.float32), (BM, BH, 2)))
        a = activation(g, ACT).to(dt).to(tl.float32)
        half = n0 // 2 + tl.arange(0, BH)
        tl.store(o_ptr + offs_m[:, None] * som + half[None, :], (a * u).to(dt),
                 mask=m_ok[:, None] & (half < N // 2)[None, :])
    else:
        offs_n = n0 + tl.arange(0, acc.shape[1])
        if ACT != 0:
            acc = activation(acc.to(dt).to(tl.float32), ACT)
        tl.store(o_ptr + offs_m[:, None] * som + offs_n[None, :], acc.to(dt),
                 mask=m_ok[:, None] & (offs_n < N)[None, :])


@triton.jit
def add_residual_tile(acc, r_ptr, offs_m, offs_n, m_ok, n_ok, srm, IS_BF16: tl.constexpr):
    """An fp32 output tile ``[BM, BN]`` plus the residual rows' tile at ``r_ptr`` (row stride ``srm``), rounded
    where torch's ``residual + y`` rounds: the product to the residual's dtype first, then the sum (bf16 half to
    even by its bits: the interpreter's cast truncates). Still fp32: a block's residual add in a GEMM's store."""
    res = tl.load(r_ptr + offs_m[:, None] * srm + offs_n[None, :], mask=m_ok[:, None] & n_ok[None, :], other=0)
    acc = acc.to(res.dtype).to(tl.float32) + res.to(tl.float32)
    if IS_BF16:
        acc = round_to_bf16(acc)
    return acc


@triton.jit
def _gated_epilogue_kernel(y_ptr, o_ptr, NO, sym, som, ACT: tl.constexpr, HALVES: tl.constexpr,
                           IS_BF16: tl.constexpr, BLOCK: tl.constexpr):
    """``act(gate) * up`` of one row's ``BLOCK`` outputs: gate and up from the halves (``HALVES``) or from
    interleaved pairs, rounded where ``epilogue_ref``'s two torch ops round (the activation, then the product)."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < NO
    if HALVES:
        g = tl.load(y_ptr + row * sym + offs, mask=ok, other=0.0)
        u = tl.load(y_ptr + row * sym + NO + offs, mask=ok, other=0.0)
    else:
        g = tl.load(y_ptr + row * sym + 2 * offs, mask=ok, other=0.0)
        u = tl.load(y_ptr + row * sym + 2 * offs + 1, mask=ok, other=0.0)
    a = round_like(activation(g.to(tl.float32), ACT), g, IS_BF16)
    tl.store(o_ptr + row * som + offs, round_like(a * u.to(tl.float32), g, IS_BF16).to(g.dtype), mask=ok)


def apply_epilogue(y: torch.Tensor, epilogue: str, halves: bool = False) -> torch.Tensor:
    """``epilogue_ref(y, epilogue, halves)`` as a product's caller runs it: a gated epilogue on bf16/fp16 rows of a
    kernel device in one launch, where the activation and the product were two torch kernels and a pass over the
    activation's output between them (every multi-row gated MLP: prefills and batched decode steps); anything else
    through ``epilogue_ref``. Bit for bit the reference's roundings, its activation's exp the device's."""
    act, gated = parse_epilogue(epilogue, "apply_epilogue")
    if not (gated and on_kernel_rows(y) and y.numel() > 0):
        return epilogue_ref(y, epilogue, halves)
    n = y.shape[-1]
    check(n % 2 == 0, "apply_epilogue", f"a gated epilogue needs an even width (gate and up), got {tuple(y.shape)}")
    y2 = y.reshape(-1, n)
    y2 = y2 if y2.stride(-1) == 1 else y2.contiguous()
    out = torch.empty((y2.shape[0], n // 2), device=y.device, dtype=y.dtype)
    block = min(1024, next_pow2(n // 2))
    launcher(y2, _gated_epilogue_kernel)[(y2.shape[0], cdiv(n // 2, block))](
        y2, out, n // 2, y2.stride(0), out.stride(0), ACT=act, HALVES=halves, IS_BF16=y.dtype == torch.bfloat16,
        BLOCK=block, num_warps=4)
    return out.reshape(*y.shape[:-1], n // 2)
