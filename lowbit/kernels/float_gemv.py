"""A float (bf16 / fp16) linear at one row, for a float model's decode step: the GEMV cuBLAS would run, as a Triton
kernel that launches with programmatic dependent launch and does a block's RMSNorm, residual add and gated
activation itself: in its own programs where K is not split (``FOLD``, one launch), else in the same split-K
reduce as the weight-only GEMVs (``weight_only._direct_or_split``) after it.

Why the fold: at one split the reduce launch did nothing but the epilogue, and a float step has one such launch
after every linear but the unfused ones (17 in the 7B-shaped 4-layer step), each a serial kernel boundary.

Why not cuBLAS: in the 7B-shaped 4-layer float decode step on the H200 (``tools/profile_decode.py``, session 33) the
cuBLAS GEMVs ran at the byte limit (490 µs of a 644 µs step), and the rest was glue: 8 RMSNorm + residual kernels
(~20 µs), the gated activation (4.7 µs), cuBLAS's own split-K reduces (13.7 µs) and the launch gaps between
kernels that cannot overlap (cuBLAS launches without PDL). The weight-only path fuses all of it already.

- ``torch.ops.lowbit.float_linear(x, weight, bias, epilogue, norm_sumsq, norm_eps)``: ``F.linear`` with the
  weight-only op's ``epilogue`` and ``norm_sumsq`` (``weight_only_linear``'s meaning, but a gated epilogue reads the
  merged weight's gate and up halves as they are: the GEMV writes its partials in (gate, up) pairs); the GEMV at
  M = 1 on a kernel device, ``F.linear`` and torch ops otherwise. ``float_linear_add_norm``: the same + a residual
  add, returning the next RMSNorm's halves (``weight_only_linear_add_norm``'s contract). ``*_pdl``: opaque forms
  whose launches use PDL (``pdl_launches``), for a CUDA-graph decode step.
- Kernel ``_gemv_f``: ``[BLOCK_N, BLOCK_K]`` tiles of the row-major weight (16-byte loads along K), products
  accumulated in fp32 per lane and summed once after the loop; the next tile is loaded before this one's
  arithmetic (a load always in flight); split-K programs write fp32 partials. Reference: ``float_linear_ref``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.library import triton_op
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from lowbit.kernels._common import (
    apply_epilogue,
    cdiv,
    check,
    epilogue_ref,
    interpreting,
    launcher,
    norm_from_parts_ref,
    parse_epilogue,
    pdl_launch_options,
    pdl_launches,
    pdl_on,
)
from lowbit.kernels.weight_only import (
    UNFOLDED,
    ReduceFusion,
    _direct_or_split,
    _fold_operands,
    _folded_row,
    _norm_den,
    _store_row,
    _unfused,
    interleave_rows,
)

__all__ = ["FLOAT_GEMV_DTYPES", "float_gemv_config", "float_linear", "float_linear_add_norm", "float_linear_ref",
           "float_linear_unsupported"]

FLOAT_GEMV_DTYPES = (torch.bfloat16, torch.float16)


def float_linear_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                     epilogue: str = "", norm_sumsq: torch.Tensor | None = None,
                     norm_eps: float = 0.0) -> torch.Tensor:
    """The op in torch: the norm's second half (``norm_sumsq``), ``F.linear``, then the epilogue (a gated one on
    the merged weight's halves, gate columns then up columns, read as views: ``epilogue_ref(halves=True)``;
    interleaving them first, a stack, was a copy of the whole product, 25 us a layer of SmolLM2's 1x2048 prefill
    on an H100, session 58)."""
    if norm_sumsq is not None:
        x = norm_from_parts_ref(x, norm_sumsq, norm_eps)
    return epilogue_ref(F.linear(x, weight, bias), epilogue, halves=True)


def float_linear_unsupported(x_dtype: torch.dtype, weight: torch.Tensor) -> str | None:
    """Why ``_gemv_f`` cannot take a weight (the op then runs ``F.linear``), or None."""
    if weight.dim() != 2:
        return f"weight is {weight.dim()}-D, not [N, K]"
    if weight.dtype not in FLOAT_GEMV_DTYPES or x_dtype != weight.dtype:
        return f"dtypes x {x_dtype}, weight {weight.dtype}: the GEMV reads bf16/fp16 of one dtype"
    if weight.stride(1) != 1:
        return "weight rows are not contiguous"
    if weight.shape[1] % 8:
        return f"K={weight.shape[1]} is not a multiple of 8 (16-byte loads)"
    return None


def float_gemv_config(n: int, k: int) -> dict[str, int]:
    """Tile, split and warps for an ``[N, K]`` GEMV: 4 rows x 1024 lanes per step (a warp's 16-byte loads along K),
    the sweep's best at four of the 7B step's five shapes on the H200 (``tools/bench_float_gemv.py --sweep``,
    session 34: 0.997-1.23x cuBLAS; at 12288x4096 16 x 512 was 1% faster); split-K only where N alone gives
    fewer than ~4 programs per SM (SmolLM2's 576-wide rows)."""
    if interpreting():
        # few, wide programs: the interpreter's cost is per program; K >= 256 still runs the split + reduce path,
        # a shorter K the one-split GEMV that folds the reduce's work in
        return {"BLOCK_N": 32, "BLOCK_K": 64, "SPLIT_K": 2 if k >= 256 else 1, "num_warps": 1}
    block_n, block_k = 4, 1024
    tiles = cdiv(n, block_n)
    split = 1
    while tiles * split < 528 and k // (split * 2) >= 2 * block_k:
        split *= 2
    return {"BLOCK_N": block_n, "BLOCK_K": block_k, "SPLIT_K": split, "num_warps": 4}


@triton.jit
def _gemv_f(x_ptr, w_ptr, b_ptr, o_ptr, q_ptr, r_ptr, g_ptr, gx_ptr, qo_ptr, N, K, K_PER, swn, sos, eps,
            HAS_BIAS: tl.constexpr, PARTIAL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
            HALVES: tl.constexpr = False, FOLD: tl.constexpr = False, ACT: tl.constexpr = 0,
            GATED: tl.constexpr = False, NQ: tl.constexpr = 0, NQP: tl.constexpr = 0,
            HAS_RES: tl.constexpr = False, NORM_OUT: tl.constexpr = False, PDL: tl.constexpr = False):
    """``o[n] = sum_k x[k] * w[n, k]`` over this program's K range ``[pid_k * K_PER, + K_PER)`` (fp32 partial
    with ``PARTIAL``). ``HALVES`` (a gated epilogue, partials only): row ``n`` of the weight's gate half lands at
    column ``2n`` and of its up half at ``2(n - N/2) + 1``, the (gate, up) pairs the reduce's gated epilogue reads,
    so the weight is read as merged, never copied into pairs. The first weight tile is loaded before
    ``gdc_wait``: weights never change, only ``x`` (and the fold's norm partials and residual) are another
    kernel's output.

    ``FOLD`` (one split, M = 1): this program does ``_splitk_reduce``'s work for its rows itself, one launch
    instead of two: the norm (``NQ`` partial sums of squares at ``q_ptr``, ``_norm_den``),
    the bias, ``ACT``, the residual add and the next norm's halves (``NORM_OUT``: ``gx = g * out`` and one sum of
    ``out**2`` per GEMV program at ``qo_ptr``), with the reduce's roundings. ``GATED`` reads gate row ``j`` and up
    row ``N/2 + j`` in the same program (rows interleaved in the tile), so ``act(gate) * up`` needs no partials."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    if GATED:
        i = tl.arange(0, BLOCK_N)
        pair = pid_n * (BLOCK_N // 2) + i // 2
        offs_n = tl.where(i % 2 == 0, pair, N // 2 + pair)
        n_ok = pair < N // 2
    else:
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
    k_lo = pid_k * K_PER
    k_hi = tl.minimum(k_lo + K_PER, K)
    lanes = tl.arange(0, BLOCK_K)
    rows = w_ptr + offs_n[:, None] * swn
    if PDL:
        gdc_launch_dependents()
    w = tl.load(rows + (k_lo + lanes)[None, :], mask=n_ok[:, None] & (k_lo + lanes < k_hi)[None, :], other=0.0)
    if PDL:
        gdc_wait()
    den = 1.0
    if FOLD and NQ > 0:  # the norm's partials, loaded before the loop so their latency hides behind it
        den = _norm_den(q_ptr, offs_n * 0, n_ok, K, eps, NQ, NQP, BLOCK_N)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + lanes
        nxt = offs_k + BLOCK_K
        w_next = tl.load(rows + nxt[None, :], mask=n_ok[:, None] & (nxt < k_hi)[None, :], other=0.0)
        x = tl.load(x_ptr + offs_k, mask=offs_k < k_hi, other=0.0).to(tl.float32)
        acc += w.to(tl.float32) * x[None, :]
        w = w_next
    y = tl.sum(acc, axis=1)
    if FOLD:
        _folded_row(y, den, offs_n, n_ok, pid_n, N, o_ptr, b_ptr, r_ptr, g_ptr, gx_ptr, qo_ptr, HAS_BIAS, BLOCK_N, ACT,
                    GATED, HAS_RES, NORM_OUT, NQ)
    else:
        dst = offs_n
        if HALVES:
            half = N // 2
            dst = tl.where(offs_n < half, 2 * offs_n, 2 * (offs_n - half) + 1)
        _store_row(y, o_ptr, b_ptr, pid_k, dst, n_ok, sos, PARTIAL, HAS_BIAS)


def _split_k(n: int, k: int, cfg: dict[str, int]) -> tuple[int, int]:
    """``(K_PER, split)``: each program's K range (whole ``BLOCK_K`` steps) and how many programs share a row."""
    k_per = cdiv(cdiv(k, cfg["SPLIT_K"]), cfg["BLOCK_K"]) * cfg["BLOCK_K"]
    return k_per, cdiv(k, k_per)


def _folded_programs(n: int, cfg: dict[str, int], gated: bool) -> int:
    """The ``FOLD`` launch's programs: row tiles, or (gate, up) pair tiles of ``BLOCK_N / 2`` outputs."""
    return cdiv(n // 2, cfg["BLOCK_N"] // 2) if gated else cdiv(n, cfg["BLOCK_N"])


def _launch_gemv_f(x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor,
                   epilogue: str, fusion: ReduceFusion | None, cfg: dict[str, int] | None = None) -> None:
    n, k = weight.shape
    cfg = cfg or float_gemv_config(n, k)
    k_per, split = _split_k(n, k, cfg)
    act, gated = parse_epilogue(epilogue, "float_linear")
    meta = {"BLOCK_N": cfg["BLOCK_N"], "BLOCK_K": cfg["BLOCK_K"], "num_warps": cfg["num_warps"]}
    if split == 1 and (epilogue or fusion is not None):
        _launch_folded(x2, weight, bias, out, act, gated, fusion, meta, _folded_programs(n, cfg, gated), k_per)
        return
    if gated and bias is not None:  # the reduce adds the bias at the partials' (interleaved) columns
        bias = interleave_rows(bias)
    b = bias if bias is not None else weight
    # every constexpr passed: Inductor's launcher for a user kernel miscounts a defaulted one left out
    meta |= {"HALVES": gated, **UNFOLDED}

    def args(t: torch.Tensor, som: int, sos: int) -> tuple:
        return (x2, weight, b, t, weight, weight, weight, weight, weight, n, k, k_per, weight.stride(0), sos, 0.0)

    grid = (cdiv(n, cfg["BLOCK_N"]), split)
    _direct_or_split(x2, _gemv_f, grid, args, meta, split, n, out, bias, b, epilogue, 128, fusion,
                     pdl=pdl_on())


def _launch_folded(x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor, act: int,
                   gated: bool, fusion: ReduceFusion | None, meta: dict, programs: int, k_per: int) -> None:
    """One ``_gemv_f`` launch with ``FOLD``: the epilogue and the block fusions in the GEMV's own programs, where
    a split K would need ``_splitk_reduce``'s launch after it (one partial sum of squares per program)."""
    n, k = weight.shape
    ptrs, fold, eps = _fold_operands(x2, fusion, act, gated, programs, "float_linear")
    launcher(x2, _gemv_f)[(programs, 1)](
        x2, weight, bias if bias is not None else weight, out, *(t if t is not None else weight for t in ptrs),
        n, k, k_per, weight.stride(0), 0, eps, HAS_BIAS=bias is not None, PARTIAL=False, **meta, HALVES=False,
        **fold, **pdl_launch_options())


def _takes_gemv(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``_gemv_f`` runs: one non-empty row, a kernel device, a weight ``float_linear_unsupported`` takes."""
    return (x.shape[-1] > 0 and x.numel() == x.shape[-1] and (x.is_cuda or interpreting())
            and float_linear_unsupported(x.dtype, weight) is None)


def _float_impl(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, epilogue: str,
                fusion: ReduceFusion | None) -> torch.Tensor:
    """The GEMV where it applies (``_takes_gemv``), else ``F.linear`` and torch ops."""
    k = x.shape[-1]
    n = weight.shape[0]
    _, gated = parse_epilogue(epilogue, "float_linear")
    check(weight.dim() == 2 and weight.shape[1] == k, "float_linear",
          f"weight {tuple(weight.shape)} does not take rows of K={k}")
    check(not gated or n % 2 == 0, "float_linear", f"a gated epilogue needs an even N (gate, up pairs), got N={n}")
    if not _takes_gemv(x, weight):
        if fusion is not None:
            return _unfused(lambda v: apply_epilogue(F.linear(v, weight, bias), epilogue, halves=True), x, fusion)
        return apply_epilogue(F.linear(x, weight, bias), epilogue, halves=True)
    x2 = x.reshape(1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    n_out = n // 2 if gated else n
    out = torch.empty((1, n_out), device=x.device, dtype=x.dtype)
    if fusion is not None:
        fusion.to_rows(out)
    _launch_gemv_f(x2, weight, bias, out, epilogue, fusion)
    if fusion is not None:
        fusion.from_rows(x.shape[:-1])
    return out.reshape(*x.shape[:-1], n_out)


def add_norm_partials_f(x: torch.Tensor, weight: torch.Tensor) -> int:
    """How many partial sums of squares per row ``float_linear_add_norm`` returns: one per GEMV program where the
    GEMV folds the reduce in (one split), one per 128-wide reduce program where K is split, one where torch ops do
    (``norm_parts_ref``)."""
    if not _takes_gemv(x, weight):
        return 1
    n, k = weight.shape
    cfg = float_gemv_config(n, k)
    return _folded_programs(n, cfg, False) if _split_k(n, k, cfg)[1] == 1 else cdiv(n, 128)


@triton_op("lowbit::float_linear", mutates_args=())
def float_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, epilogue: str = "",
                 norm_sumsq: torch.Tensor | None = None, norm_eps: float = 0.0) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` with ``weight_only_linear``'s ``epilogue`` and ``norm_sumsq``, but a gated
    epilogue reads the weight's halves (gate rows, then up rows: a merged gate/up as it is), not interleaved pairs;
    the GEMV (and the fusions in its reduce) at one row, torch ops elsewhere."""
    fusion = None if norm_sumsq is None else ReduceFusion(sumsq=norm_sumsq, eps=norm_eps)
    return _float_impl(x, weight, bias, epilogue, fusion)


@triton_op("lowbit::float_linear_add_norm", mutates_args=())
def float_linear_add_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor,
                          norm_weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``residual + F.linear(x, weight, bias)`` and the next RMSNorm's first half: ``(stream, norm_weight *
    stream, partial sums of stream**2)`` (``weight_only_linear_add_norm``'s contract)."""
    return _float_add_norm(x, weight, bias, residual, norm_weight)


def _float_add_norm(x, weight, bias, residual, norm_weight):
    fusion = ReduceFusion(residual=residual, gain=norm_weight)
    stream = _float_impl(x, weight, bias, "", fusion)  # (``_unfused`` fills the halves where torch ops ran)
    return stream, fusion.gained, fusion.sumsq_out


@torch.library.custom_op("lowbit::float_linear_pdl", mutates_args=())
def float_linear_pdl(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, epilogue: str = "",
                     norm_sumsq: torch.Tensor | None = None, norm_eps: float = 0.0) -> torch.Tensor:
    """``float_linear`` as an opaque op launching with PDL (see ``weight_only_linear_pdl`` for why opaque)."""
    fusion = None if norm_sumsq is None else ReduceFusion(sumsq=norm_sumsq, eps=norm_eps)
    with pdl_launches():
        return _float_impl(x, weight, bias, epilogue, fusion)


@float_linear_pdl.register_fake
def _(x, weight, bias=None, epilogue="", norm_sumsq=None, norm_eps=0.0):
    n = weight.shape[0]
    return x.new_empty((*x.shape[:-1], n // 2 if epilogue.endswith("*up") else n))


@torch.library.custom_op("lowbit::float_linear_add_norm_pdl", mutates_args=())
def float_linear_add_norm_pdl(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                              residual: torch.Tensor,
                              norm_weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``float_linear_add_norm`` with PDL launches."""
    with pdl_launches():
        return _float_add_norm(x, weight, bias, residual, norm_weight)


@float_linear_add_norm_pdl.register_fake
def _(x, weight, bias, residual, norm_weight):
    rows = x.shape[:-1]
    n = weight.shape[0]
    p = add_norm_partials_f(x, weight)
    return x.new_empty((*rows, n)), x.new_empty((*rows, n)), x.new_empty((*rows, p), dtype=torch.float32)
