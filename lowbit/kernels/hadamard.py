"""Online Hadamard rotation (the IR's ``hadamard`` op) along the last axis, and the same fused with the
dynamic per-token activation quantize that follows it (int8 / int4 / fp8 codes + fp32 scale per token).

Numerics = ``lowbit.ir.ops.hadamard``: ``y = x · H_n · c`` with ``H_n`` lowbit's ±1 matrix
(``lowbit.ir.hadamard.hadamard_matrix``: ``kron(A_m, Sylvester_p)``, ``n = m·p``) and ``c`` the reference's
constant ``1/sqrt(n)`` rounded to the input dtype (the reference multiplies by ``H/sqrt(n)`` cast to
``x.dtype``: its entries are all ``±c``), fp32 accumulation, one rounding to ``x.dtype`` at the end. The
fused variant then quantizes that rounded output exactly as ``dynamic_qparams(per_token, symmetric)`` +
``quantize`` do (``act_quant.py``'s arithmetic: ``amax / qmax`` as torch computes it on the device,
IEEE division, round-half-even / RTNE to e4m3).

Design. ``H_n = kron(L, R)`` with ``R`` the Sylvester matrix of order ``N2 = min(p, Config.n2_cap)`` and
``L = kron(A_m, Sylvester_{p/N2})`` of order ``n1 = n/N2`` (a ±1 table, ``Lᵀ`` zero-padded, read by the
kernel). A row viewed as ``X [n1, N2]`` (row-major: index ``a·N2 + b``) maps to ``Y = Lᵀ·X·R``:

1. ``W = Lᵀ · [X_1 | X_2 | ...]``: ``tl.dot`` over the ``RB`` rows of the tile side by side. Its operands are
   exact in 16 bits (±1 and the bf16/fp16 input), so the MMA with fp32 accumulation is exact up to fp32
   summation; an fp32 input is split into three bf16 pieces (hi + mid + lo = the fp32 value) and takes three
   MMAs. ``n1 <= 128``: one block (``BA`` = n1 padded to a power of two >= 16), or with ``Config.split`` two
   parts ``BA + BB`` (76 = 64 + 16: 2 x 2 blocks, four MMAs, 80 rows of padding-and-data instead of 128); larger
   (11008 = 344·32): ``BA = 128`` output blocks, one program each, and a loop over 128-wide K blocks. ``n1 = 1``
   (a power of two with ``n2_cap >= n``): no first product.
2. ``Y = W · R``, by ``Config.stage2``: "mma" — the tile reshaped ``[BA·RB, N2]`` times ``R`` on tensor cores,
   ``W`` (fp32) split into three bf16 pieces (all 24 bits; two pieces flip ~0.4% of bf16 outputs by one ulp);
   "bfly" — ``log2(N2)`` butterfly stages in fp32 (reshape / permute / split / join along the last axis: the
   compiler keeps register-local stages in registers and moves the others by warp shuffles and one shared-memory
   exchange per warp bit, Dao-AILab fast-hadamard-transform's thread / warp / block split). The butterflies cost
   ``log2(N2)`` adds per element where the MMA path costs ``6·N2`` tensor-core flops plus the splitting.

Programs are persistent (``Config.waves`` per SM): each makes ``Lᵀ`` and ``R`` once and loops over row tiles,
issuing the next tile's loads before the current tile's math (``Config.stages = 2``, in registers) or
(``stages = 1``) leaving them to Triton's pipeliner: the loop's own ``num_stages = Config.pipeline`` streams them
through ``pipeline - 1`` shared-memory buffers by cp.async (sm_90 PTX of the AOT compile; without it, as before
round 14, only loads that feed ``tl.dot`` were pipelined, not the butterfly-only path's). ``CONFIGS`` /
``FUSED_CONFIGS`` hold, per length, the configs ``tools/bench_hadamard.py --sweep`` / ``--variants`` measured
fastest on the H200; ``EAGER_ROWS`` / ``GRAPH_ROWS`` the measured
row ranges where the kernel beats the reference op, outside which the triton backend runs the reference
(``prefers_kernel``: at a few rows one cuBLAS launch beats the kernel's Python launch).

Shapes the kernel does not take (``unsupported`` says why): ``n`` with no Hadamard construction, on the "mma"
path a power-of-two factor below 16 (the MMA's K), or ``n1 > 2048``. The fused quantize also needs ``n1 <= 128``
(a row in one program: ``unsupported_fused``). The backend keeps the reference op for those and names them.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import numpy as np
import torch
import triton
import triton.language as tl
from torch.library import triton_op

from lowbit.kernels._common import (
    check,
    interpreting,
    launcher,
    max_nan,
    next_pow2,
    pow2_at_most,
    round_half_even,
    round_to_e4m3,
)
from lowbit.kernels.a8_linear import FP8_ROWWISE_SCALED_MM, _check_qdtypes, _linear_on_codes
from lowbit.kernels.act_quant import cuda_reciprocal, divide_exact, row_scale

__all__ = [
    "CONFIGS",
    "FUSED_CONFIGS",
    "HAD_DTYPES",
    "HAD_QDTYPES",
    "Config",
    "config_for",
    "hadamard_a8_linear",
    "hadamard_direct",
    "hadamard_factors",
    "hadamard_quantize",
    "hadamard_quantize_ref",
    "hadamard_ref",
    "online_hadamard",
    "prefers_kernel",
    "unsupported",
]

HAD_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
HAD_QDTYPES = {"int8": 127.0, "int4": 7.0, "fp8e4m3": 448.0}
_QCODE = {"int8": 1, "int4": 2, "fp8e4m3": 3}
BLOCK_A = 128
MAX_N1 = 2048
MIN_N2 = 16


class Config(NamedTuple):
    """How the kernel runs rows of one length; ``tools/bench_hadamard.py --sweep`` times the alternatives and
    ``CONFIGS`` keeps the measured choice per length (``DEFAULT`` elsewhere)."""

    stage2: str = "mma"
    """The Sylvester factor ``R``: "mma" = ``W·R`` on tensor cores (``W`` split into three bf16 pieces), "bfly" =
    ``log2(N2)`` fp32 butterfly stages in registers (no MMA, any power of two)."""
    n2_cap: int = 64
    """``N2 = min(p, n2_cap)``: the order of ``R``; the rest of ``p`` goes into ``L`` (the first product)."""
    tile: int = 4096
    """Elements per loop step: ``RB`` rows of ``(BA + BB)·N2``, RB the largest power of two within ``tile`` (at
    least one row, and what the MMA shapes need)."""
    warps: int = 4
    stages: int = 2
    """2: each loop step issues the next tile's loads before its own math (a hand-made two-stage pipeline in
    registers; Triton's pipeliner is told to leave this loop alone); 1: the loads as written, which Triton's
    pipeliner streams (``pipeline``)."""
    waves: int = 3
    """Persistent programs per SM, each looping over row tiles with ``L`` and ``R`` made once (0: one tile per
    program, the table and ``R`` re-made per tile)."""
    pipeline: int = 3
    """Triton's ``num_stages``, for the kernel and (``stages = 1``) the row-tile loop: its pipeliner streams the
    loop's loads (the row tiles, on every path) and the blocked path's K blocks through ``pipeline - 1``
    shared-memory buffers by cp.async: bytes in flight without registers, at a cost in shared memory (fewer
    programs per SM)."""
    split: bool = False
    """``n1`` not a power of two (one block): ``Lᵀ`` as 2 x 2 blocks of two power-of-two parts ``BA + BB`` (76 =
    64 + 16 padded to 80, 36 = 32 + 16 to 48) instead of one block padded to the next power of two (128, 64):
    the first product's work falls by up to (128/80)², the second's and the registers by 128/80. Lengths where it
    saves nothing (``BA + BB`` would not be smaller) keep one block."""


DEFAULT = Config(waves=3)
CONFIGS: dict[int, Config] = {
    4096: Config(stage2="mma", n2_cap=64, tile=4096, warps=4, stages=1, waves=3, pipeline=4),  # 43.3 µs (see below)
    1536: Config(stage2="mma", n2_cap=64, tile=4096, warps=4, stages=2, waves=3, pipeline=3),  # 31.1 µs (was 43.0)
    576: Config(stage2="mma", n2_cap=64, tile=4096, warps=4, stages=1, waves=4, pipeline=4, split=True),  # 19.8 (26.0)
    # 64.9 (135.7)
    4864: Config(stage2="mma", n2_cap=64, tile=4096, warps=4, stages=1, waves=3, pipeline=3, split=True),
    14336: Config(stage2="bfly", n2_cap=4096, tile=4096, warps=8, stages=1, waves=2, pipeline=3),  # 308.8 (323.7)
    11008: Config(stage2="bfly", n2_cap=64, tile=8192, warps=8, stages=1, waves=2, pipeline=2),  # 325.1 (535.7)
}
"""Per row length, the config ``tools/bench_hadamard.py --variants`` measured fastest on the H200 (M = 8192, bf16,
CUDA-graph time, session 14: bench/results/hadamard.json, run ``s14``) for the plain transform plus its fused
quantize (which must share its arithmetic: same path and geometry, so the fused codes are those of
``quantize(hadamard(x))``); ``DEFAULT`` elsewhere. 4096 (session 16, its 4096 variant rows): the MMA path
with a pipelined loop, 43.3 / 43.7 µs in two runs (0.728 / 0.721 of copy bandwidth; the rotation issue asks >=
0.70) against the butterflies' 46.7 (0.675); its fused int8 quantize 77.3 µs against the butterflies' 69.0 (both
after the one-row tile's quantize stopped reshaping, 83.3 and 74.1 before), so a W4A4 model's fused op pays ~12% at
this length for the plain op's 8%. At 576 the pair kept is not the plain op's fastest (butterflies 17.3 µs, but fused
56.2 against 31.7)."""
FUSED_CONFIGS: dict[int, Config] = {
    4096: Config(stage2="mma", n2_cap=64, tile=4096, warps=4, stages=1, waves=4, pipeline=3),  # int8 77.3 (bfly 69.0)
    1536: Config(stage2="mma", n2_cap=64, tile=4096, warps=4, stages=2, waves=3, pipeline=3),  # 92.8 µs (92.8)
    576: Config(stage2="mma", n2_cap=64, tile=4096, warps=4, stages=1, waves=0, pipeline=3, split=True),  # 31.7 (48.2)
    4864: Config(stage2="mma", n2_cap=64, tile=4096, warps=4, stages=1, waves=3, pipeline=3, split=True),  # 218 (361)
    14336: Config(stage2="bfly", n2_cap=4096, tile=4096, warps=4, stages=1, waves=0, pipeline=3),  # 538.8 (577.2)
}
"""The same for the fused quantize (int8 timings): each differs from its length's ``CONFIGS`` entry only in the
launch (warps, tile, persistence, pipeline depth), never in the arithmetic (path, ``N2``, split: one table operand
serves both). 11008 has no fused form (``unsupported_fused``)."""


def config_for(n: int, fused: bool = False) -> Config:
    return (FUSED_CONFIGS if fused else CONFIGS).get(n) or CONFIGS.get(n, DEFAULT)


INF = 1 << 62
EAGER_ROWS: dict[int, tuple[int, int]] = {
    4096: (512, INF), 1536: (4096, INF), 576: (INF, INF), 4864: (512, INF), 11008: (1, INF), 14336: (1, INF),
}
"""Per row length, the rows ``[lo, hi)`` where the kernel, launched eagerly (``hadamard_direct``: its Python launch
cost included), beats the reference op (one cuBLAS matmul by ``H/sqrt(n)``): ``tools/bench_hadamard.py`` on the
H200 at M = 1, 16, 128, 2048, 8192, each bound the geometric mean of the last losing and first winning M (4096:
kernel 55 µs vs reference 88 at M = 2048, 58 vs 18 at 128; 576: the reference's 15 µs at M = 8192 wins). 11008
and 14336: the reference reads the whole n² matrix (242 / 411 MB) even for one row."""
GRAPH_ROWS: dict[int, tuple[int, int]] = {
    4096: (1, INF), 1536: (1, INF), 576: (1, 512), 4864: (1, INF), 11008: (1, INF), 14336: (1, INF),
}
"""The same for device time alone (one CUDA-graph replay: what counts inside ``torch.compile`` / CUDA graphs):
the kernel wins from one row (5.7-8 µs vs 7-24 µs) except 576 from M = 2048 on (10.4 vs 8.9 µs)."""


def prefers_kernel(n: int, rows: int | torch.SymInt, device: torch.device) -> bool:
    """Whether ``rows`` rows of length ``n`` should run on the kernel rather than the reference op: the measured
    crossover of the nearest measured length (log scale); eager calls read ``EAGER_ROWS``, calls traced by
    torch.compile ``GRAPH_ROWS``. Not CUDA (the interpreter) or a symbolic row count: the kernel."""
    if device.type != "cuda" or not isinstance(rows, int):
        return True
    table = GRAPH_ROWS if torch.compiler.is_compiling() else EAGER_ROWS
    span = table.get(n)
    if span is None:
        span = table[min(table, key=lambda k: abs(math.log(k / n)))]
    return span[0] <= rows < span[1]


def hadamard_ref(x: torch.Tensor) -> torch.Tensor:
    """The IR op itself (``lowbit.ir.ops.hadamard``): ``x @ (H/sqrt(n))`` in ``x.dtype``."""
    from lowbit.ir.ops import hadamard as ir_hadamard

    return ir_hadamard(x)


def hadamard_quantize_ref(x: torch.Tensor, qdtype: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference of the fused op: the IR's hadamard, then per-token symmetric ``dynamic_qparams`` + ``quantize``.

    Codes ``[M, n]`` (int8, float8_e4m3fn) or ``[M, n/2]`` packed uint8 (int4), fp32 scales ``[M, 1]``."""
    from lowbit.ir.quant import dynamic_qparams, quantize

    n = x.shape[-1]
    y = hadamard_ref(x).reshape(-1, n)
    scale, _ = dynamic_qparams(y, qdtype=qdtype, granularity="per_token", symmetric=True, axis=-1, block_size=n)
    return quantize(y, scale, None, qdtype=qdtype, axis=-1, block_size=n), scale


@functools.cache
def _split(n: int, n2_cap: int = DEFAULT.n2_cap) -> tuple[int, int, int]:
    """(m, p, N2): ``n = m·p`` as lowbit's construction splits it, and the Sylvester order the kernel's right
    factor takes (raises ``HadamardError`` where no construction exists)."""
    from lowbit.ir.hadamard import hadamard_order_split

    m, p = hadamard_order_split(n)
    return m, p, min(p, n2_cap)


@functools.cache
def _geometry(n: int, cfg: Config | None = None) -> tuple[int, int, int, int, int]:
    """(n1, N2, BA, NKB, BB): ``L`` of order n1, processed in NKB x NKB blocks of BA (one block, BA = n1 padded to
    a power of two >= 16, when n1 <= BLOCK_A; BA = 1 when n1 = 1: no first product); BB > 0 (``Config.split``):
    one block as two parts, BA (a power of two) + BB (the rest padded to a power of two >= 16)."""
    cfg = cfg or config_for(n)
    n2 = _split(n, cfg.n2_cap)[2]
    n1 = n // n2
    if n1 == 1:
        return 1, n2, 1, 1, 0
    if n1 > BLOCK_A:
        return n1, n2, BLOCK_A, -(-n1 // BLOCK_A), 0
    ba = max(MIN_N2, next_pow2(n1))
    if cfg.split and MIN_N2 < n1 < ba:
        tail = max(MIN_N2, next_pow2(n1 - ba // 2))  # head: the largest power of two below n1
        if ba // 2 + tail < ba:
            return n1, n2, ba // 2, 1, tail
    return n1, n2, ba, 1, 0


def _table_side(n: int, cfg: Config | None = None) -> int:
    """The side of the padded ``Lᵀ`` table: NKB·BA + BB."""
    _, _, ba, nkb, bb = _geometry(n, cfg)
    return ba * nkb + bb


@functools.cache
def unsupported(n: int, cfg: Config | None = None) -> str | None:
    """Why the kernel does not take rows of length ``n`` (None: it does)."""
    from lowbit.ir.hadamard import HadamardError

    cfg = cfg or config_for(n)
    try:
        m, p, n2 = _split(n, cfg.n2_cap)
    except HadamardError as e:
        return str(e)
    if cfg.stage2 == "mma" and n2 < MIN_N2:
        return f"n={n} = {m}·{p}: the power-of-two factor {p} is below {MIN_N2} (the tensor-core product's K)"
    if n // n2 > MAX_N1:
        return f"n={n} = {m}·{p}: the Kronecker factor of order {n // n2} exceeds {MAX_N1}"
    return None


def unsupported_fused(n: int, cfg: Config | None = None) -> str | None:
    """Why the fused hadamard + quantize does not take rows of length ``n`` (it needs a row in one program)."""
    why = unsupported(n, cfg)
    if why is None and _geometry(n, cfg)[3] > 1:
        why = (f"n={n}: the fused quantize needs the whole row in one program (Kronecker factor of order "
               f"{_geometry(n, cfg)[0]} > {BLOCK_A})")
    return why


@functools.lru_cache(maxsize=32)
def _left_t(n: int, cfg: Config | None = None) -> torch.Tensor:
    """``Lᵀ`` zero-padded to ``[NKB·BA + BB, NKB·BA + BB]``, bf16 on the CPU (±1 and 0 are exact)."""
    from lowbit.ir.hadamard import hadamard_matrix, sylvester

    cfg = cfg or config_for(n)
    m, p, n2 = _split(n, cfg.n2_cap)
    left = torch.kron(hadamard_matrix(m, torch.float64), sylvester(p // n2).to(torch.float64))
    n1 = _geometry(n, cfg)[0]
    side = _table_side(n, cfg)
    out = torch.zeros(side, side, dtype=torch.float64)
    out[:n1, :n1] = left.T
    return out.to(torch.bfloat16)


def hadamard_factors(n: int, device: str | torch.device, cfg: Config | None = None) -> torch.Tensor:
    """The op's table operand for rows of length ``n``: ``Lᵀ`` padded (``H_n = kron(L, Sylvester_N2)``)."""
    check(unsupported(n, cfg) is None, "hadamard", str(unsupported(n, cfg)))
    return _left_t_on(n, str(torch.device(device)), cfg)


@functools.lru_cache(maxsize=64)
def _left_t_on(n: int, device: str, cfg: Config | None = None) -> torch.Tensor:
    return _left_t(n, cfg).to(device)


@functools.cache
def _scale_const(n: int, dtype: torch.dtype) -> float:
    """``1/sqrt(n)`` as the reference's constant matrix holds it in ``dtype``: torch casts the float64 value to
    fp32, then (bf16/fp16) rounds that half-to-even to 8/11 significant bits. Plain Python/numpy, no tensor:
    this runs under fake tensors when torch.compile traces the op."""
    v = float(np.float32(1.0 / math.sqrt(n)))
    bits = {torch.bfloat16: 8, torch.float16: 11}.get(dtype)
    if bits is None:
        return v
    f, e = math.frexp(v)  # v = f·2^e, 0.5 <= f < 1: f·2^bits is exact, round() is half-to-even
    return math.ldexp(round(math.ldexp(f, bits)), e - bits)


@functools.cache
def _num_sms(device: str) -> int:
    if device.startswith("cuda"):
        return torch.cuda.get_device_properties(torch.device(device)).multi_processor_count
    return 2  # the interpreter: a loop of several tiles per program still runs


@triton.jit
def _split_bf16(v):
    """fp32 ``v`` -> (bf16 hi, fp32 remainder) with ``hi + remainder == v`` exactly."""
    hi = v.to(tl.bfloat16)
    return hi, v - hi.to(tl.float32)


@triton.jit
def _round_bf16(y):
    """fp32 ``y`` rounded half-to-even onto the bf16 grid, still fp32 (the cast that follows is then exact:
    the interpreter's fp32 -> bf16 cast truncates; the GPU's rounds to nearest even, the same result)."""
    bits = y.to(tl.int32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _mma(a, b, acc, UPCAST: tl.constexpr):
    """acc + a @ b with fp32 accumulation; 16-bit operands (exact ±1 and split pieces). UPCAST: the
    interpreter's bf16/fp16 dot is wrong (Triton 3.8), fp32 operands hold the same values exactly."""
    if UPCAST:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _butterfly(x, R: tl.constexpr, P: tl.constexpr, H: tl.constexpr):
    """One Walsh-Hadamard stage along the last axis of ``x [R, P]``: pairs ``(i, i + H)`` -> (sum, difference)."""
    x = tl.permute(tl.reshape(x, (R, P // (2 * H), 2, H)), (0, 1, 3, 2))
    lo, hi = tl.split(x)
    x = tl.permute(tl.join(lo + hi, lo - hi), (0, 1, 3, 2))
    return tl.reshape(x, (R, P))


@triton.jit
def _fwht(x, R: tl.constexpr, P: tl.constexpr, LOG_P: tl.constexpr):
    """``x [R, P] · Sylvester(P)`` in fp32: ``log2(P)`` butterfly stages (Sylvester's natural order)."""
    for k in tl.static_range(LOG_P):
        x = _butterfly(x, R, P, 1 << k)
    return x


@triton.jit
def _load_x(x_ptr, pr, M, sxm, j, b, kk, N1: tl.constexpr, N2: tl.constexpr, RB: tl.constexpr):
    """Row tile ``pr`` as the first product's operand ``X_cat [BA, RB·N2]`` (``[1, RB·N2]`` when N1 = 1)."""
    rows = pr * RB + j
    if N1 == 1:
        x = tl.load(x_ptr + rows[None, :].to(tl.int64) * sxm + b[None, :], mask=(rows < M)[None, :], other=0.0)
    else:
        x = tl.load(x_ptr + rows[None, :].to(tl.int64) * sxm + kk[:, None] * N2 + b[None, :],
                    mask=(kk < N1)[:, None] & (rows < M)[None, :], other=0.0)
    return x


@triton.jit
def _left_product(lt, x, w, IN_KIND: tl.constexpr, UPCAST: tl.constexpr):
    """``w + Lᵀ·x``: one MMA for 16-bit ``x`` (exact products), three for fp32 ``x`` (split into bf16 pieces)."""
    if IN_KIND < 2:
        w = _mma(lt, x, w, UPCAST)
    else:
        x_hi, r = _split_bf16(x)
        x_mid, r = _split_bf16(r)
        w = _mma(lt, x_hi, w, UPCAST)
        w = _mma(lt, x_mid, w, UPCAST)
        w = _mma(lt, r.to(tl.bfloat16), w, UPCAST)
    return w


@triton.jit
def _load_table(lt_ptr, r, k, LD: tl.constexpr, IN_KIND: tl.constexpr):
    """The block ``Lᵀ[r, k]`` of the padded table (no mask): bf16 ±1 / 0, fp16 for an fp16 input."""
    lt = tl.load(lt_ptr + r[:, None] * LD + k[None, :])
    if IN_KIND == 1:
        lt = lt.to(tl.float32).to(tl.float16)
    return lt


@triton.jit
def _right_product(w, rmat, R: tl.constexpr, W: tl.constexpr, N2: tl.constexpr, EXACT_W: tl.constexpr,
                   MID_PARTS: tl.constexpr, UPCAST: tl.constexpr, BFLY: tl.constexpr, LOG_N2: tl.constexpr):
    """``W · R`` per N2-chunk of ``w [R, W]`` (fp32): butterflies, one MMA (EXACT_W: ``w`` is the bf16 input
    itself) or MMAs of its bf16 pieces."""
    w2 = tl.reshape(w, (R * (W // N2), N2))
    if BFLY:
        y = _fwht(w2, R * (W // N2), N2, LOG_N2)
    elif EXACT_W:
        y = _mma(w2.to(tl.bfloat16), rmat, tl.zeros((R * (W // N2), N2), dtype=tl.float32), UPCAST)
    else:
        w_hi, r2 = _split_bf16(w2)
        y = _mma(w_hi, rmat, tl.zeros((R * (W // N2), N2), dtype=tl.float32), UPCAST)
        if MID_PARTS == 2:
            y = _mma(r2.to(tl.bfloat16), rmat, y, UPCAST)
        else:
            w_mid, r3 = _split_bf16(r2)
            y = _mma(w_mid, rmat, y, UPCAST)
            y = _mma(r3.to(tl.bfloat16), rmat, y, UPCAST)
    return tl.reshape(y, (R, W))


@triton.jit
def _to_out(y, y_ptr, SCALE: tl.constexpr, UPCAST: tl.constexpr):
    """``y · c`` rounded once to the output dtype."""
    y = y * SCALE
    if UPCAST and y_ptr.dtype.element_ty == tl.bfloat16:  # the GPU's cast already rounds to nearest even
        y = _round_bf16(y)
    return y.to(y_ptr.dtype.element_ty)


@triton.jit
def _row_amax(y, R: tl.constexpr, RB: tl.constexpr, N2: tl.constexpr):
    """Per tile row ``j``: the largest ``|y|`` of ``y [R, RB·N2]`` (padding is 0). One row per tile (``RB`` = 1:
    the MMA path at 4096 = 64 x 64) reduces the tile as it lies: no reshape, whose new layout Triton reaches
    through shared memory."""
    if RB == 1:
        return tl.zeros((1,), dtype=tl.float32) + max_nan(max_nan(tl.abs(y.to(tl.float32)), 1), 0)
    yf = tl.reshape(y.to(tl.float32), (R, RB, N2))
    return max_nan(max_nan(tl.abs(yf), 2), 0)


@triton.jit
def _quant_store(q_ptr, y, s, ar, pr, M, sqm, N1: tl.constexpr, R: tl.constexpr, RB: tl.constexpr,
                 N2: tl.constexpr, QUANT: tl.constexpr, QMAX: tl.constexpr, RCP: tl.constexpr):
    """Codes of ``y [R, RB·N2]`` (rows ``ar`` of ``L``) at per-row scales ``s [RB]``: the IEEE quotient
    (``divide_exact``: one division per row on the GPU, ``RCP`` nonzero), then round-half-even (int) / RTNE to
    e4m3, as the reference ``quantize``."""
    W: tl.constexpr = RB * N2
    c = tl.arange(0, W)
    rows = pr * RB + c // N2
    ok = (ar < N1)[:, None] & (rows < M)[None, :]
    offs = rows[None, :].to(tl.int64) * sqm + ar[:, None] * N2 + (c % N2)[None, :]
    if RB == 1 and QUANT != 2:  # one row: the tile as it lies (see _row_amax), its one scale broadcast
        yf = y.to(tl.float32)
        t = divide_exact(yf, tl.sum(s, 0), RCP)
        if QUANT == 3:
            tl.store(q_ptr + offs, round_to_e4m3(tl.clamp(t, -QMAX, QMAX)).to(tl.float8e4nv), mask=ok)
        else:
            tl.store(q_ptr + offs, tl.clamp(round_half_even(t), -128.0, 127.0).to(tl.int8), mask=ok)
    else:
        yf = tl.reshape(y.to(tl.float32), (R, RB, N2))
        t = divide_exact(yf, s[None, :, None], RCP)
        if QUANT == 3:
            q = tl.reshape(round_to_e4m3(tl.clamp(t, -QMAX, QMAX)), (R, W)).to(tl.float8e4nv)
            tl.store(q_ptr + offs, q, mask=ok)
        elif QUANT == 1:
            q = tl.reshape(tl.clamp(round_half_even(t), -128.0, 127.0), (R, W)).to(tl.int8)
            tl.store(q_ptr + offs, q, mask=ok)
        else:
            q = tl.reshape(tl.clamp(round_half_even(t), -8.0, 7.0), (R, W // 2, 2)).to(tl.int32)
            lo, hi = tl.split(q)  # even / odd index: low / high nibble (lowbit's packing)
            byte = ((lo & 0xF) | ((hi & 0xF) << 4)).to(tl.uint8)
            HN: tl.constexpr = N2 // 2
            ch = tl.arange(0, W // 2)
            rows_h = pr * RB + ch // HN
            ok_h = (ar < N1)[:, None] & (rows_h < M)[None, :]
            tl.store(q_ptr + rows_h[None, :].to(tl.int64) * sqm + ar[:, None] * HN + (ch % HN)[None, :], byte,
                     mask=ok_h)


@triton.jit
def _hadamard_kernel(x_ptr, lt_ptr, y_ptr, q_ptr, s_ptr, M, sxm, sym, sqm, NPROG,
                     N1: tl.constexpr, BA: tl.constexpr, NKB: tl.constexpr, BB: tl.constexpr, N2: tl.constexpr,
                     RB: tl.constexpr, SCALE: tl.constexpr, IN_KIND: tl.constexpr, MID_PARTS: tl.constexpr,
                     QUANT: tl.constexpr, QMAX: tl.constexpr, RCP: tl.constexpr, STORE_Y: tl.constexpr,
                     UPCAST: tl.constexpr, BFLY: tl.constexpr, LOG_N2: tl.constexpr, PREFETCH: tl.constexpr,
                     LOOP_STAGES: tl.constexpr):
    # Programs: NKB output blocks (pa) x NPROG row programs, each looping over the row tiles pr = p0 + k·NPROG
    # (RB rows each). IN_KIND: 0 bf16, 1 fp16, 2 fp32 input. QUANT: 0 none, 1 int8, 2 int4 (packed), 3 fp8 e4m3
    # (the host allows it only with NKB == 1). BFLY: R by fp32 butterflies instead of three MMAs. BB > 0 (only
    # with NKB == 1): rows BA..BA+BB of L are a second part ("b"), the tile's first product four MMAs.
    # LOOP_STAGES: the tile loop's own num_stages (> 1: Triton streams all its loads through shared memory, the
    # butterfly-only path's too, which the kernel-wide num_stages leaves alone: no tl.dot consumes them).
    pid = tl.program_id(0)
    pa = pid % NKB  # the NKB programs of the same rows run next to each other: their x re-reads hit L2
    p0 = pid // NKB
    W: tl.constexpr = RB * N2
    LD: tl.constexpr = NKB * BA + BB
    EXACT_W: tl.constexpr = N1 == 1 and IN_KIND == 0
    a = pa * BA + tl.arange(0, BA)
    kk = tl.arange(0, BA)
    c = tl.arange(0, W)
    j = c // N2  # which row of the tile
    b = c % N2  # index inside the Sylvester factor
    # made once per program: the table (one block, or the 2 x 2 blocks of two parts) and
    # R = Sylvester(N2)[i, k] = (-1)^popcount(i & k)
    if N1 > 1 and NKB == 1:
        lt0 = _load_table(lt_ptr, a, kk, LD, IN_KIND)
        if BB > 0:
            ab = BA + tl.arange(0, BB)
            lt_ab = _load_table(lt_ptr, a, ab, LD, IN_KIND)
            lt_ba = _load_table(lt_ptr, ab, kk, LD, IN_KIND)
            lt_bb = _load_table(lt_ptr, ab, ab, LD, IN_KIND)
    if not BFLY:
        i2 = tl.arange(0, N2)
        v = i2[:, None] & i2[None, :]
        v = v ^ (v >> 4)
        v = v ^ (v >> 2)
        v = v ^ (v >> 1)
        rmat = (1 - 2 * (v & 1)).to(tl.float32).to(tl.bfloat16)  # via fp32: the interpreter's int->bf16 is wrong
    else:
        rmat = 0  # _right_product's butterflies take no matrix
    n_tiles = tl.cdiv(M, RB)
    if PREFETCH:  # the first tile's x; each step then issues the next tile's loads before its own math
        x_next = _load_x(x_ptr, p0, M, sxm, j, b, kk, N1, N2, RB)
        if BB > 0:
            xb_next = _load_x(x_ptr, p0, M, sxm, j, b, ab, N1, N2, RB)
    for pr in tl.range(p0, n_tiles, NPROG, num_stages=LOOP_STAGES):
        rows = pr * RB + j
        row_base = rows[None, :].to(tl.int64)
        # 1. W = Lᵀ · X_cat over K blocks, X_cat[k, j·N2 + b] = x[row j, k·N2 + b]; exact products, fp32 sums
        if NKB == 1:
            if PREFETCH:
                x = x_next
                x_next = _load_x(x_ptr, pr + NPROG, M, sxm, j, b, kk, N1, N2, RB)  # masked past the last tile
                if BB > 0:
                    xb = xb_next
                    xb_next = _load_x(x_ptr, pr + NPROG, M, sxm, j, b, ab, N1, N2, RB)
            else:
                x = _load_x(x_ptr, pr, M, sxm, j, b, kk, N1, N2, RB)
                if BB > 0:
                    xb = _load_x(x_ptr, pr, M, sxm, j, b, ab, N1, N2, RB)
            if N1 == 1:
                w = x.to(tl.float32)
            else:
                w = _left_product(lt0, x, tl.zeros((BA, W), dtype=tl.float32), IN_KIND, UPCAST)
                if BB > 0:
                    w = _left_product(lt_ab, xb, w, IN_KIND, UPCAST)
                    wb = _left_product(lt_ba, x, tl.zeros((BB, W), dtype=tl.float32), IN_KIND, UPCAST)
                    wb = _left_product(lt_bb, xb, wb, IN_KIND, UPCAST)
        else:
            w = tl.zeros((BA, W), dtype=tl.float32)
            for kb in range(NKB):  # a loop, not unrolled: unrolled, every block kept its own shared memory
                ak = kb * BA + kk
                x = tl.load(x_ptr + row_base * sxm + ak[:, None] * N2 + b[None, :],
                            mask=(ak < N1)[:, None] & (rows < M)[None, :], other=0.0)
                w = _left_product(_load_table(lt_ptr, a, ak, LD, IN_KIND), x, w, IN_KIND, UPCAST)
        # 2. Y = W · R, scaled and rounded once
        y = _to_out(_right_product(w, rmat, BA, W, N2, EXACT_W, MID_PARTS, UPCAST, BFLY, LOG_N2), y_ptr, SCALE,
                    UPCAST)
        if BB > 0:
            yb = _to_out(_right_product(wb, rmat, BB, W, N2, EXACT_W, MID_PARTS, UPCAST, BFLY, LOG_N2), y_ptr,
                         SCALE, UPCAST)
        if STORE_Y:
            tl.store(y_ptr + row_base * sym + a[:, None] * N2 + b[None, :], y,
                     mask=(a < N1)[:, None] & (rows < M)[None, :])
            if BB > 0:
                tl.store(y_ptr + row_base * sym + ab[:, None] * N2 + b[None, :], yb,
                         mask=(ab < N1)[:, None] & (rows < M)[None, :])
        if QUANT != 0:
            # the reference quantizes the rounded hadamard output: per token (= per tile row j) symmetric scale
            amax = _row_amax(y, BA, RB, N2)  # [RB]
            if BB > 0:
                amax = tl.maximum(amax, _row_amax(yb, BB, RB, N2), propagate_nan=tl.PropagateNan.ALL)
            s = row_scale(amax, QMAX, RCP)
            rows_s = pr * RB + tl.arange(0, RB)
            tl.store(s_ptr + rows_s, s, mask=rows_s < M)
            _quant_store(q_ptr, y, s, a, pr, M, sqm, N1, BA, RB, N2, QUANT, QMAX, RCP)
            if BB > 0:
                _quant_store(q_ptr, yb, s, ab, pr, M, sqm, N1, BB, RB, N2, QUANT, QMAX, RCP)


def _launch(x: torch.Tensor, lt: torch.Tensor, qdtype: str | None, cfg: Config | None = None
            ) -> tuple[torch.Tensor, ...]:
    n = x.shape[-1]
    cfg = cfg or config_for(n, qdtype is not None)
    # the messages are formatted only on failure: this runs per call, and at decode sizes the host is the cost
    if x.dtype not in HAD_DTYPES:
        check(False, "hadamard", f"dtype {x.dtype} (takes bf16, fp16, fp32)")
    why = unsupported(n, cfg) if qdtype is None else unsupported_fused(n, cfg)
    if why is not None:
        check(False, "hadamard" if qdtype is None else "hadamard_quantize", why)
    n1, n2, ba, nkb, bb = _geometry(n, cfg)
    side = ba * nkb + bb
    if lt.shape != (side, side) or lt.dtype != torch.bfloat16:
        check(False, "hadamard", f"table operand {tuple(lt.shape)} {lt.dtype}, expected ({side}, {side}) "
              f"bfloat16 (hadamard_factors({n}))")
    x2 = x.reshape(-1, n)
    if x2.stride(-1) != 1 or (x2.shape[0] > 1 and x2.stride(0) != n):
        x2 = x2.contiguous()
    rows = x2.shape[0]
    rb = pow2_at_most(cfg.tile // ((ba + bb) * n2), cfg.tile)  # a power of two (two parts: 48 or 80 rows of L)
    if isinstance(rows, int):  # a symbolic M (torch.compile dynamic=True) keeps one specialization
        rb = max(1, min(rb, next_pow2(max(rows, 1))))
    if n1 > 1:  # the first product's N (RB·N2) is at least 16
        rb = max(rb, -(-16 // n2))
    if cfg.stage2 == "mma":  # the second product's M (BA·RB) is at least 16
        rb = max(rb, -(-16 // ba))
    # the fused op writes no float output: a 1-element tensor carries the output dtype to the kernel
    y = torch.empty((rows, n) if qdtype is None else (1,), device=x.device, dtype=x.dtype)
    if qdtype is None:
        q = s = y
        quant, qmax, rcp = 0, 0.0, 0.0
    else:
        check(qdtype in HAD_QDTYPES, "hadamard_quantize", f"qdtype {qdtype!r} is not one of {sorted(HAD_QDTYPES)}")
        qmax = HAD_QDTYPES[qdtype]
        if qdtype == "int4":
            q = torch.empty((rows, n // 2), device=x.device, dtype=torch.uint8)
        else:
            q = torch.empty((rows, n), device=x.device, dtype=torch.int8 if qdtype == "int8" else torch.float8_e4m3fn)
        s = torch.empty((rows, 1), device=x.device, dtype=torch.float32)
        quant, rcp = _QCODE[qdtype], (cuda_reciprocal(qmax) if x.is_cuda else 0.0)
    if rows:
        n_tiles = -(-rows // rb)
        nprog = n_tiles
        if cfg.waves and isinstance(rows, int):
            nprog = min(n_tiles, cfg.waves * _num_sms(str(x.device)))
        launcher(x2, _hadamard_kernel)[(nkb * nprog,)](
            x2, lt, y, q, s, rows, x2.stride(0), y.stride(0), q.stride(0), nprog,
            N1=n1, BA=ba, NKB=nkb, BB=bb, N2=n2, RB=rb, SCALE=_scale_const(n, x.dtype),
            IN_KIND=_IN_KIND[x.dtype], MID_PARTS=3, QUANT=quant, QMAX=qmax, RCP=rcp,
            STORE_Y=qdtype is None, UPCAST=interpreting(), BFLY=cfg.stage2 == "bfly",
            LOG_N2=n2.bit_length() - 1, PREFETCH=cfg.stages > 1 and nkb == 1,
            LOOP_STAGES=cfg.pipeline if cfg.stages == 1 else 1, num_warps=cfg.warps, num_stages=cfg.pipeline)
    if qdtype is None:
        return (y.reshape(x.shape),)
    return q, s


_IN_KIND = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}


@triton_op("lowbit::hadamard", mutates_args=())
def hadamard_op(x: torch.Tensor, lt: torch.Tensor) -> torch.Tensor:
    """``x · H/sqrt(n)`` along the last axis (the IR's ``hadamard``); ``lt = hadamard_factors(n, device)``."""
    return _launch(x, lt, None)[0]


@triton_op("lowbit::hadamard_quantize", mutates_args=())
def hadamard_quantize_op(x: torch.Tensor, lt: torch.Tensor, qdtype: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The hadamard then per-token symmetric quantization, one pass: codes and fp32 scales ``[M, 1]``."""
    q, s = _launch(x, lt, qdtype)
    return q, s


def hadamard_direct(x: torch.Tensor, lt: torch.Tensor) -> torch.Tensor:
    """``torch.ops.lowbit.hadamard(x, lt)`` without torch's custom-op dispatch when called eagerly (its Python
    cost is several times the kernel's run time at decode sizes); traced by torch.compile, the op itself."""
    if torch.compiler.is_compiling() or type(x) not in (torch.Tensor, torch.nn.Parameter):
        return torch.ops.lowbit.hadamard(x, lt)
    return _launch(x, lt, None)[0]


def online_hadamard(x: torch.Tensor) -> torch.Tensor:
    """Eager convenience: the kernel with its table made (and cached) for ``x``'s length and device."""
    return torch.ops.lowbit.hadamard(x, hadamard_factors(x.shape[-1], x.device))


def hadamard_quantize(x: torch.Tensor, qdtype: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager convenience for ``torch.ops.lowbit.hadamard_quantize``."""
    return torch.ops.lowbit.hadamard_quantize(x, hadamard_factors(x.shape[-1], x.device), qdtype)


@triton_op("lowbit::hadamard_a8_linear", mutates_args=())
def hadamard_a8_linear(x: torch.Tensor, lt: torch.Tensor, qweight: torch.Tensor, w_scale: torch.Tensor,
                       w_zero_point: torch.Tensor | None, bias: torch.Tensor | None, w_qdtype: str, w_group: int,
                       a_qdtype: str) -> torch.Tensor:
    """``a8_linear(hadamard(x), ...)`` with per-token activations, the rotation fused into the activation
    quantize: one kernel reads ``x`` and writes codes + scales, then ``a8_linear``'s product on codes
    (``_linear_on_codes``: the A8 GEMV at decode sizes, else ``a8_gemm`` or ``torch._scaled_mm`` for fp8 per
    channel). Bit-identical to the unfused kernels: the codes are those of ``quantize_activation(hadamard(x))`` and
    the product is the one ``a8_linear`` picks for them (session 57, H100: taking ``_scaled_mm`` at 3 rows where
    ``a8_linear`` runs its GEMV put an fp8 output one bf16 step off)."""
    _check_qdtypes("hadamard_a8_linear", w_qdtype, a_qdtype)
    xq, sa = _launch(x, lt, a_qdtype)
    return _linear_on_codes(xq, sa, tuple(x.shape[:-1]), qweight, w_scale, w_zero_point, bias, w_qdtype, w_group, 0,
                            x.dtype, FP8_ROWWISE_SCALED_MM, "", 0, None)
