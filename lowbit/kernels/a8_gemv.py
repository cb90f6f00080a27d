"""The A8 linear (W8A8 int8, FP8 e4m3) at decode sizes (M <= ``A8_GEMV_MAX_M``): one launch that quantizes its own
activation rows.

Why: ``a8_linear`` runs ``quantize_activation`` (one launch) and then the GEMM (another) whose tiles are 16+ rows
tall, and a decode step is launch-bound: SmolLM2-135M's W8A8 and FP8 steps on an H100 (session 48, CUDA graphs,
batch 1) took 1.21 and 1.56 ms against 0.705 for bf16, with two more launches per block than the float step (the
quantizes before o_proj and down_proj). Here every program reads the whole rows ``x[:M, :K]`` (K is 576-11008, M
at most 16: a few KB from L2), computes each row's (or each group's) scale exactly as ``quantize_activation``
does (``row_scale``, ``divide_exact``, ``quantize_codes``: the same code), quantizes the row in registers and
accumulates int8 x int8 in int32 (fp8 x fp8 in fp32) against its ``[BLOCK_N, BLOCK_K]`` weight tiles; the
epilogue (scales, bias, activation or gated ``act(gate) * up``) is ``_a8_kernel``'s, in its order
(``store_epilogue``).

Numerics: int8 codes and scales are the quantize kernel's bit for bit and the int32 sums are exact, so per token x
per channel the output is ``a8_linear``'s bit for bit. With scale groups each K step is one group (``BLOCK_K`` =
the smaller group), adding ``dot * sa * sw`` in fp32 in K order, as ``_a8_kernel`` does wherever its own step is
the group (every config at groups of 64, the interpreter's at groups <= 64). fp8 sums in fp32 in the dot's
order: within fp32 rounding of the GEMM's (the tests state the bound). ``QUANTIZED``: the rows arrive as codes and
scales (``a8_linear_q`` after ``rms_norm_quant``).

Routing: ``a8_linear_q`` hands the GEMV the fused norm's codes; ``a8_linear`` lets it quantize its rows where K is
at most ``A8_GEMV_QUANTIZE_MAX_K`` and runs ``quantize_activation`` then the GEMV on codes above. H100, session 49
(``tools/bench_a8.py --decode``, launches timed one by one, not in a graph): on codes 4.1 us at SmolLM2's 576x1536
and 18.9 at 4096x11008 (cuBLAS bf16 4.5 / 34.8); quantize + GEMV 6.0 / 22.6 us int8, 6.7 fp8 at 576x1536; in the
kernel 6.3 / 32.1 int8, 8.0 fp8 at 576x1536.

The block's RMSNorm between two A8 linears splits around them as around the float and weight-only GEMVs
(``a8_gemv_add_norm`` writes the stream, ``gain * stream`` and one partial sum of squares per program and row;
``a8_gemv(norm_sumsq=)`` norms the rows before quantizing them: ``_a8_gemv_kernel``), so with
``A8_GEMV_QUANTIZE_MAX_K`` raised a W8A8 / FP8 decode block is four GEMV launches and attention
(``tools/count_step_launches.py --a8-in-gemv``); at its default 0 the block keeps its norm + quantize launches.

Plain-torch reference beside it: ``a8_gemv_ref`` (the same quantization, the products in int64 / float64, the
scales in the kernel's order).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lowbit.kernels._common import (
    add_residual_tile,
    cdiv,
    check,
    epilogue_ref,
    interpreting,
    is_pow2,
    launcher,
    max_nan,
    parse_epilogue,
    pdl_launch_options,
    pdl_prologue,
    round_like,
    round_to_bf16,
    store_epilogue,
)
from lowbit.kernels.act_quant import (
    QMAX,
    cuda_reciprocal,
    divide_exact,
    quantize_activation_ref,
    quantize_codes,
    row_scale,
)

__all__ = ["A8_GEMV_MAX_M", "A8_GEMV_QUANTIZE_MAX_K", "a8_gemv", "a8_gemv_add_norm", "a8_gemv_config",
           "a8_gemv_ref", "a8_gemv_unsupported"]

A8_GEMV_MAX_M = 16
"""``a8_linear`` / ``a8_linear_q`` take this kernel up to this many rows (one 16-row dot tile holds them all)."""

A8_GEMV_QUANTIZE_MAX_K = 0
"""``a8_linear`` at decode sizes lets the GEMV quantize (and, split around it, norm) rows up to this wide itself:
one launch where ``quantize_activation`` + the GEMV on codes are two. 0: never, by measurement. Session 50, H100,
SmolLM2's config in one call (``.ab``-style A/B of this constant at 2048 against 0, ``tools/bench_generate.py --gpu
--model smollm2-random --schemes w8a8,fp8``): the step with the rows quantized and normed in the GEMVs (4 GEMV
launches a block, 5 with attention) decoded in 1.266 / 1.451 ms (W8A8, batch 1 / 16) and 1.528 / 1.739 (FP8)
against 1.172 / 1.315 and 1.352 / 1.501 with the separate quantize (and ``rms_norm_quant``) launches, 7-16% faster.
Inside a CUDA graph a launch costs less than each program's absmax prologue (the whole row read and reduced before
the first weight tile): ``tools/bench_a8.py --decode`` (run S50-a8decode) has the in-kernel quantize at 6.28 /
9.43 us (576x1536 / 1536x576, int8; fp8 7.97 / 13.0) and the normed one at 7.31 / 11.58 against 4.06 / 4.94 on
codes. Kept (and tested with the constant raised) for a kernel whose prologue gets cheaper; at 0 the split norm
(``_fuse_norm_quant_a8``) does not fire either."""

_BLOCK_M = 16  # tl.dot's smallest tile: the rows past M are zero codes (their outputs are never stored)


def a8_gemv_unsupported(m: int, w_qdtype: str, w_group: int, a_group: int, w_zero_point: torch.Tensor | None,
                        w_block_n: int) -> str | None:
    """Why the GEMV does not take a call (the op then runs its quantize + GEMM), or None."""
    if m > A8_GEMV_MAX_M:
        return f"M={m} > {A8_GEMV_MAX_M} rows"
    if w_qdtype not in ("int8", "fp8e4m3"):
        return f"{w_qdtype} weights (packed int4 runs the GEMM)"
    if w_zero_point is not None:
        return "a weight zero point"
    if w_block_n:
        return "weight scale tiles (fp8-block128)"
    if a_group and w_group and w_group < a_group:
        return f"weight groups of {w_group} inside activation groups of {a_group}"
    return None


def a8_gemv_config(n: int, k: int, block_k: int) -> dict[str, int]:
    """Tile and warps for an ``[N, K]`` weight; ``block_k``: the scale group (0: per token x per channel).

    Not yet timed on a GPU (``tools/bench_a8.py --decode`` sweeps ``BLOCK_N`` x ``BLOCK_K``): 16 or 32 weight rows
    per program so SmolLM2's 576-wide outputs still make 36 programs, K in steps of 256 (a 4-8 KB weight tile per
    step; the group where scales are grouped)."""
    if interpreting():
        return {"BLOCK_N": 16, "BLOCK_K": block_k or 64, "num_warps": 4}
    return {"BLOCK_N": 16 if n <= 2048 else 32, "BLOCK_K": block_k or 256, "num_warps": 4}


@triton.jit
def _normed(xf, rstd, IS_BF16: tl.constexpr, like):
    """``gain * stream`` rows ``xf`` (fp32 ``[BLOCK_M, BLOCK_K]``) times their ``1 / rms``, rounded to the input
    dtype as ``norm_from_parts_ref`` rounds them (``round_like``)."""
    return round_like(xf * rstd[:, None], like, IS_BF16)


@triton.jit
def _a8_gemv_kernel(x_ptr, sx_ptr, w_ptr, sw_ptr, b_ptr, r_ptr, o_ptr, q_ptr, g_ptr, gx_ptr, qo_ptr, M, N, K,
                    sxm, ssxm, swn, sswn, srm, som,
                    QMAX: tl.constexpr, RCP: tl.constexpr, IS_FP8: tl.constexpr, QUANTIZED: tl.constexpr,
                    A_GROUP: tl.constexpr, W_GROUP: tl.constexpr, HAS_BIAS: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    ACT: tl.constexpr, GATED: tl.constexpr, HAS_RES: tl.constexpr, IS_BF16: tl.constexpr,
                    eps: tl.constexpr, NQ: tl.constexpr, NQP: tl.constexpr, NORM_OUT: tl.constexpr,
                    PDL: tl.constexpr):
    """Output columns ``[pid * BLOCK_N, + BLOCK_N)`` of all ``M`` rows. Per token (``A_GROUP`` 0), unquantized:
    a first pass over the rows for their amax, then the codes step by step with the weight; per group
    (``BLOCK_K`` = ``A_GROUP``): each step's chunk is its group. ``HAS_RES`` (no activation): the residual
    stream ``r`` added to the output as ``residual_add`` adds it to the plain op's: the product rounded by the
    store's cast, the sum half to even (bf16 by its bits, as torch's add; the interpreter's cast truncates).

    A block's RMSNorm split around the GEMVs, as the float and weight-only ones split it (``ReduceFusion``):
    ``NQ > 0`` (unquantized rows): ``x`` is ``gain * stream`` and ``q`` (``[M, NQ]``, read as ``NQP``-wide rows)
    the stream's partial sums of squares; every load of ``x`` is normed (``_normed``) before its amax and codes,
    so the codes are those of ``quantize_activation(norm_from_parts_ref(x))`` up to the sum's order.
    ``NORM_OUT`` (with ``HAS_RES``): the next norm's first half of the stream this writes, ``gx = g * out``
    (``[M, N]``) and this program's sum of ``out**2`` per row at ``qo[m, pid]``.

    ``PDL`` (``pdl_launches``): the next kernel may launch now; this one waits for its predecessors before its first
    load, since the rows, their scales or norm partials and the residual are all another kernel's output."""
    pdl_prologue(PDL)
    pid_n = tl.program_id(0)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    lanes = tl.arange(0, BLOCK_K)
    GROUPED: tl.constexpr = A_GROUP > 0 or W_GROUP > 0
    rows = x_ptr + offs_m[:, None] * sxm
    rstd = tl.zeros((BLOCK_M,), dtype=tl.float32) + 1.0
    if NQ > 0:  # the partials first: their latency hides behind the amax pass
        parts = tl.arange(0, NQP)
        ss = tl.load(q_ptr + offs_m[:, None] * NQ + parts[None, :], mask=m_ok[:, None] & (parts < NQ)[None, :],
                     other=0.0)
        rstd = tl.where(m_ok, tl.rsqrt(tl.sum(ss, axis=1) / K + eps), 1.0)
    sa_row = tl.zeros((BLOCK_M,), dtype=tl.float32)
    if A_GROUP == 0:
        if QUANTIZED:
            sa_row = tl.load(sx_ptr + offs_m * ssxm, mask=m_ok, other=0)
        else:  # the row's amax: max is exact in any order, so the scale is quantize_activation's
            amax = tl.zeros((BLOCK_M,), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                xk = tl.load(rows + (k0 + lanes)[None, :], mask=m_ok[:, None] & (k0 + lanes < K)[None, :], other=0.0)
                xf = xk.to(tl.float32)
                if NQ > 0:
                    xf = _normed(xf, rstd, IS_BF16, xk)
                amax = tl.maximum(amax, max_nan(tl.abs(xf), 1), propagate_nan=tl.PropagateNan.ALL)
            sa_row = row_scale(amax, QMAX, RCP)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if IS_FP8:
        acc_i = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    else:
        acc_i = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + lanes
        k_ok = offs_k < K
        w = tl.load(w_ptr + offs_n[:, None] * swn + offs_k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        xk = tl.load(rows + offs_k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        sa = sa_row
        if QUANTIZED:
            a = xk
            if A_GROUP > 0:
                sa = tl.load(sx_ptr + offs_m * ssxm + k0 // A_GROUP, mask=m_ok, other=0)
        else:
            xf = xk.to(tl.float32)
            if NQ > 0:
                xf = _normed(xf, rstd, IS_BF16, xk)
            if A_GROUP > 0:
                sa = row_scale(max_nan(tl.abs(xf), 1), QMAX, RCP)
            a = quantize_codes(divide_exact(xf, sa[:, None], RCP), QMAX, IS_FP8)
        if GROUPED:
            base = tl.zeros_like(acc_i)
        else:
            base = acc_i
        if IS_FP8:
            part = tl.dot(a, tl.trans(w), base)
        else:
            part = tl.dot(a, tl.trans(w), base, out_dtype=tl.int32)
        if GROUPED:  # _a8_kernel's order: (dot * sa) * sw, added in K order
            pf = part.to(tl.float32)
            if A_GROUP > 0:
                pf = pf * sa[:, None]
            if W_GROUP > 0:
                sw = tl.load(sw_ptr + offs_n * sswn + k0 // W_GROUP, mask=n_ok, other=0).to(tl.float32)
                pf = pf * sw[None, :]
            acc += pf
        else:
            acc_i = part
    if not GROUPED:
        acc = acc_i.to(tl.float32)
    if A_GROUP == 0:
        acc = acc * sa_row[:, None]
    if W_GROUP == 0:
        acc = acc * tl.load(sw_ptr + offs_n, mask=n_ok, other=0).to(tl.float32)[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0).to(tl.float32)[None, :]
    if HAS_RES:
        acc = add_residual_tile(acc, r_ptr, offs_m, offs_n, m_ok, n_ok, srm, IS_BF16)
        if NORM_OUT:  # norm_parts_ref's halves of the stored stream (gain * stream rounded once, as torch's mul)
            dt = r_ptr.dtype.element_ty
            tile_ok = m_ok[:, None] & n_ok[None, :]
            h = tl.where(tile_ok, acc.to(dt).to(tl.float32), 0.0)
            gx = tl.load(g_ptr + offs_n, mask=n_ok, other=0).to(tl.float32)[None, :] * h
            if IS_BF16:
                gx = round_to_bf16(gx)
            tl.store(gx_ptr + offs_m[:, None] * som + offs_n[None, :], gx.to(dt), mask=tile_ok)
            tl.store(qo_ptr + offs_m * tl.num_programs(0) + pid_n, tl.sum(h * h, axis=1), mask=m_ok)
    store_epilogue(acc, o_ptr, offs_m, pid_n * BLOCK_N, m_ok, som, N, ACT, GATED)


def a8_gemv(x: torch.Tensor, x_scale: torch.Tensor | None, qweight: torch.Tensor, w_scale: torch.Tensor,
            bias: torch.Tensor | None, w_qdtype: str, w_group: int, a_qdtype: str, a_group: int,
            out_dtype: torch.dtype, epilogue: str = "", config: dict[str, int] | None = None,
            residual: torch.Tensor | None = None, norm_sumsq: torch.Tensor | None = None,
            norm_eps: float = 0.0) -> torch.Tensor:
    """``[M, N]`` (gated: ``N / 2``) of rows ``x [M, K]``: bf16/fp16 rows quantized in the kernel (``x_scale``
    None), or int8/fp8 codes with their fp32 scales ``[M, ceil(K/a_group) or 1]``. ``config``: ``BLOCK_N``,
    ``BLOCK_K``, ``num_warps`` instead of ``a8_gemv_config``'s (the bench's sweep). ``residual`` (``[M, N]``,
    ``out_dtype``; no epilogue): ``residual + the product``, the block's residual add in the same launch.
    ``norm_sumsq`` (``[M, P]`` fp32, rows quantized in the kernel): ``x`` is an RMSNorm's ``gain * stream`` and
    these the stream's partial sums of squares; the kernel norms the rows (``norm_from_parts_ref``, ``norm_eps``)
    before quantizing them."""
    return _launch(x, x_scale, qweight, w_scale, bias, w_qdtype, w_group, a_qdtype, a_group, out_dtype, epilogue,
                   config, residual, norm_sumsq, norm_eps, None)[0]


def a8_gemv_add_norm(x: torch.Tensor, x_scale: torch.Tensor | None, qweight: torch.Tensor, w_scale: torch.Tensor,
                     bias: torch.Tensor | None, w_qdtype: str, w_group: int, a_qdtype: str, a_group: int,
                     residual: torch.Tensor, norm_weight: torch.Tensor, config: dict[str, int] | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``a8_gemv(..., residual=residual)`` and the next RMSNorm's first half of that stream in the same launch:
    ``(stream [M, N], norm_weight * stream [M, N], partial sums of stream**2 [M, programs] fp32)``
    (``norm_parts_ref``'s halves; the next A8 GEMV takes them as ``norm_sumsq``)."""
    out, gained, sumsq = _launch(x, x_scale, qweight, w_scale, bias, w_qdtype, w_group, a_qdtype, a_group,
                                 residual.dtype, "", config, residual, None, 0.0, norm_weight)
    return out, gained, sumsq


def _launch(x: torch.Tensor, x_scale: torch.Tensor | None, qweight: torch.Tensor, w_scale: torch.Tensor,
            bias: torch.Tensor | None, w_qdtype: str, w_group: int, a_qdtype: str, a_group: int,
            out_dtype: torch.dtype, epilogue: str, config: dict[str, int] | None, residual: torch.Tensor | None,
            norm_sumsq: torch.Tensor | None, norm_eps: float, norm_weight: torch.Tensor | None
            ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """One ``_a8_gemv_kernel`` launch: the output, and with ``norm_weight`` the next norm's halves."""
    m, k = x.shape
    n = qweight.shape[0]
    why = a8_gemv_unsupported(m, w_qdtype, w_group, a_group, None, 0)
    check(why is None, "a8_gemv", f"{why}: use a8_linear")
    check((a_qdtype == "fp8e4m3") == (w_qdtype == "fp8e4m3"), "a8_gemv",
          f"weights {w_qdtype} with activations {a_qdtype}: int8 weights take int8, fp8 weights fp8e4m3")
    check(qweight.shape[1] == k and qweight.stride(1) == 1, "a8_gemv",
          f"weight {tuple(qweight.shape)} is not K-contiguous [N, {k}]")
    act, gated = parse_epilogue(epilogue, "a8_gemv")
    check(not gated or n % 2 == 0, "a8_gemv", f"a gated epilogue needs an even N (gate, up pairs), got N={n}")
    groups = [g for g in (a_group, w_group) if g]
    check(all(is_pow2(g) and g >= 32 for g in groups), "a8_gemv", f"groups {groups} must be powers of two >= 32")
    quantized = x_scale is not None
    if quantized:
        check(x.dtype == (torch.float8_e4m3fn if a_qdtype == "fp8e4m3" else torch.int8), "a8_gemv",
              f"codes of {a_qdtype} activations, got {x.dtype}")
        check(x_scale.dtype == torch.float32 and x_scale.shape[0] == m, "a8_gemv",
              f"activation scales {x_scale.dtype} {tuple(x_scale.shape)}: fp32 [{m}, K/group or 1]")
    if residual is not None:
        check(not epilogue and residual.shape == (m, n) and residual.dtype == out_dtype and residual.stride(1) == 1,
              "a8_gemv", f"a residual {residual.dtype} {tuple(residual.shape)} is added to an {out_dtype} [{m}, {n}] "
              f"output with no epilogue (got {epilogue!r}), rows contiguous")
    if norm_sumsq is not None:
        check(not quantized and norm_sumsq.dtype == torch.float32 and norm_sumsq.dim() == 2
              and norm_sumsq.shape[0] == m and norm_sumsq.is_contiguous(), "a8_gemv",
              f"norm partials {norm_sumsq.dtype} {tuple(norm_sumsq.shape)} of {'codes' if quantized else 'rows'}: "
              f"fp32 contiguous [{m}, P] of rows the kernel quantizes")
    if norm_weight is not None:
        check(residual is not None and norm_weight.shape == (n,), "a8_gemv",
              f"the next norm's gain {tuple(norm_weight.shape)} needs a residual add and N={n} channels")
    group = min(groups) if groups else 0
    cfg = config or a8_gemv_config(n, k, group)
    check(not group or cfg["BLOCK_K"] == group, "a8_gemv", f"BLOCK_K={cfg['BLOCK_K']} must be the group {group}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    out = torch.empty((m, n // 2 if gated else n), device=x.device, dtype=out_dtype)
    programs = cdiv(n, cfg["BLOCK_N"])
    gained = sumsq_out = None
    if norm_weight is not None:
        gained = torch.empty_like(out)
        sumsq_out = torch.empty((m, programs), device=x.device, dtype=torch.float32)
    sx = x_scale if quantized else w_scale
    b = bias if bias is not None else w_scale
    r = residual if residual is not None else out
    nq = 0 if norm_sumsq is None else norm_sumsq.shape[1]
    spare = (norm_sumsq, norm_weight, gained, sumsq_out)
    launcher(x, _a8_gemv_kernel)[(programs,)](
        x, sx, qweight, w_scale, b, r, out, *(t if t is not None else w_scale for t in spare), m, n, k, x.stride(0),
        sx.stride(0), qweight.stride(0), w_scale.stride(0), r.stride(0), out.stride(0), QMAX=QMAX[a_qdtype],
        RCP=cuda_reciprocal(QMAX[a_qdtype]) if x.is_cuda else 0.0, IS_FP8=w_qdtype == "fp8e4m3", QUANTIZED=quantized,
        A_GROUP=a_group, W_GROUP=w_group, HAS_BIAS=bias is not None, BLOCK_M=_BLOCK_M, BLOCK_N=cfg["BLOCK_N"],
        BLOCK_K=cfg["BLOCK_K"], ACT=act, GATED=gated, HAS_RES=residual is not None,
        IS_BF16=out_dtype == torch.bfloat16, eps=float(norm_eps), NQ=nq, NQP=triton.next_power_of_2(max(nq, 1)),
        NORM_OUT=norm_weight is not None, num_warps=cfg["num_warps"], **pdl_launch_options())
    return out, gained, sumsq_out


def a8_gemv_ref(x: torch.Tensor, x_scale: torch.Tensor | None, qweight: torch.Tensor, w_scale: torch.Tensor,
                bias: torch.Tensor | None, w_qdtype: str, w_group: int, a_qdtype: str, a_group: int,
                out_dtype: torch.dtype, epilogue: str = "", residual: torch.Tensor | None = None) -> torch.Tensor:
    """Plain torch, the kernel's arithmetic: codes and scales by ``quantize_activation_ref`` (or given), each
    step's (one scale group's, or the whole K's) dot exact (int64 / float64) then to fp32, the scales applied in
    the kernel's order, the output rounded to ``out_dtype`` before the epilogue's ops (``epilogue_ref``), then
    ``residual +`` it (the IR's ``residual_add``)."""
    k = x.shape[-1]
    xq, sa = (x, x_scale) if x_scale is not None else quantize_activation_ref(x, a_qdtype, a_group)
    exact = torch.float64 if w_qdtype == "fp8e4m3" else torch.int64
    a, w = xq.to(exact), qweight.to(exact)
    sa, sw = sa.float(), w_scale.float()
    step = min(g for g in (a_group, w_group, k) if g)
    if not (a_group or w_group):
        acc = (a @ w.T).to(torch.int32 if exact == torch.int64 else torch.float32).float()
    else:
        acc = torch.zeros(a.shape[0], w.shape[0])
        for k0 in range(0, k, step):
            part = (a[:, k0:k0 + step] @ w[:, k0:k0 + step].T)
            part = part.to(torch.int32 if exact == torch.int64 else torch.float32).float()
            if a_group:
                part = part * sa[:, k0 // a_group, None]
            if w_group:
                part = part * sw[None, :, k0 // w_group]
            acc = acc + part
    if not a_group:
        acc = acc * sa[:, :1]
    if not w_group:
        acc = acc * sw.reshape(1, -1)
    if bias is not None:
        acc = acc + bias.float()
    y = epilogue_ref(acc.to(out_dtype), epilogue)
    return y if residual is None else residual + y
