"""W8A8 / W4A8 (int8 tensor-core dot) and FP8 e4m3 linears with the activation quantization fused in the op.

One op, ``lowbit::a8_linear``, runs two kernels: ``quantize_activation`` (one read of x, codes + scales) and the
GEMM below, which accumulates exact int32 (or fp32 for fp8) dot products and applies both scales in fp32; at
decode sizes (M <= 16, int8 or fp8 weights without zero points or scale tiles) ``a8_gemv`` instead of the GEMM,
one launch quantizing its own rows where K <= ``A8_GEMV_QUANTIZE_MAX_K``, on the codes of the quantize above (the
same codes and the same kernel either way: the same result bit for bit, int8 also the GEMM's; ``_gemv_rows``). The
GEMM:

- per-token activation scale and per-channel weight scale: both in the epilogue (``acc * sa[m] * sw[n]``);
- per-group scales on either side (``w8a8-g64``: activation groups of 64; ``fp8``: weight and activation groups
  of 64; W4A8: int4 weight groups): one dot per group (BLOCK_K = the smaller group, ``SUBK`` groups per loop
  step), each adding ``dot * sa[m, g] * sw[n, g]`` to an fp32 accumulator;
- fp8 weight tiles (``fp8-block128``, compressed-tensors' FP8_BLOCK: one weight scale per ``W_BLOCK_N`` x
  ``W_GROUP`` tile, activations in groups of ``W_GROUP``): a program's ``BLOCK_N`` columns divide a tile's rows, so
  its weight scale for a K step is one scalar and the step adds ``dot * (sa[m, g] * sw)``: one multiply of the
  ``[BLOCK_M, BLOCK_N]`` partial, where per-column group scales take two; K not a multiple of the tile ends in a
  partial group (zeros past K add nothing).

Programs take their output tiles in bands of ``A8_GROUP_M`` row tiles (``_grouped_tile``) so the weight tiles a
band reads stay in L2; from M = ``A8_STATIC_MIN_M`` the tile is ``a8_static_config`` and for per-token x
per-channel scales at ``A8_MID_M`` rows ``a8_mid_config`` (both measured), elsewhere the autotuner's pick from
``_configs``.

Weights are lowbit's stored form: int8 ``[N, K]`` (symmetric), int4 packed ``[N, K/2]`` unpacked to int8 in
registers (an int4 zero point is subtracted there: ``q - zp`` stays in [-15, 15]), float8_e4m3fn ``[N, K]``.
``[N, K]`` K-contiguous is the K-major B operand Hopper's int8/fp8 wgmma needs, so no repack either.

A decode step's one-row calls take the opaque ``a8_linear_pdl`` / ``a8_linear_q_pdl`` / ``a8_linear_add_norm_pdl``
(the triton backend's ``pdl``): the same bodies inside ``pdl_launches``, so the quantize and the GEMV launch with
programmatic dependent launch on Hopper+ (each overlaps its predecessor's tail; their ``PDL`` constexprs wait).

FP8 per-token x per-channel can instead run on ``torch._scaled_mm`` (cuBLASLt rowwise); ``FP8_ROWWISE_SCALED_MM``
says which is the default, chosen from ``tools/bench_kernels.py``'s and ``tools/bench_a8.py``'s side-by-side timing
(session 18: ``_scaled_mm`` 1.60x / 1.19x cuBLAS bf16 incl. the quantize at M = 2048, the Triton GEMM 1.49x / 1.29x).

Numerics vs the reference (activation fake-quant to x.dtype, weight dequantize to x.dtype, bf16 ``linear``):
the kernel's products are exact and scaled once in fp32, the reference rounds each dequantized operand to bf16
first, so they agree to bf16 rounding (the tests state the tolerance). The int32 accumulation itself is exact.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.library import triton_op

from lowbit.kernels._common import (
    add_residual_tile,
    apply_epilogue,
    cdiv,
    check,
    epilogue_ref,
    interpreting,
    is_pow2,
    launcher,
    m_bucket,
    norm_parts_ref,
    parse_epilogue,
    pdl_launches,
    store_epilogue,
    unpack_nibbles,
)
import lowbit.kernels.a8_gemv as a8_gemv_module  # its A8_GEMV_QUANTIZE_MAX_K read per call: one patch point
from lowbit.kernels.a8_gemv import (
    a8_gemv,
    a8_gemv_add_norm,
    a8_gemv_config,
    a8_gemv_unsupported,
)
from lowbit.kernels.act_quant import quantize_activation
from lowbit.kernels.norm_quant import add_norm_parts, add_norm_parts_takes

__all__ = ["FP8_ROWWISE_SCALED_MM", "a8_add_norm_partials", "a8_gemm", "a8_linear", "a8_linear_add_norm",
           "a8_linear_add_norm_pdl", "a8_linear_pdl", "a8_linear_q", "a8_linear_q_pdl", "a8_linear_ref"]

FP8_ROWWISE_SCALED_MM = True
"""FP8 per-token x per-channel through ``torch._scaled_mm`` (set from the H200 side-by-side in kernels.json)."""

W_QDTYPES = {"int8": (False, True), "int4": (True, True), "uint4": (True, False), "fp8e4m3": (False, True)}
"""Weight qdtype -> (packed, signed)."""


def a8_linear_ref(x: torch.Tensor, qweight: torch.Tensor, w_scale: torch.Tensor, w_zero_point: torch.Tensor | None,
                  bias: torch.Tensor | None, w_qdtype: str, w_group: int, a_qdtype: str, a_group: int,
                  epilogue: str = "", w_block_n: int = 0) -> torch.Tensor:
    """Plain torch, the qlinear reference: activation dynamic_qparams -> quantize -> dequantize (to x.dtype),
    weight dequantize (to x.dtype; ``w_block_n``: ``[w_block_n, w_group]`` tiles), ``F.linear``, then the
    epilogue's ops (``epilogue_ref``)."""
    from lowbit.ir.quant import dequantize, dynamic_qparams, quantize

    k = x.shape[-1]
    bs = a_group or k
    sa, za = dynamic_qparams(x, qdtype=a_qdtype, granularity="per_token", symmetric=True, axis=-1, block_size=bs)
    za = None if a_qdtype.startswith("fp8") else za
    xq = quantize(x, sa, za, qdtype=a_qdtype, axis=-1, block_size=bs)
    xd = dequantize(xq, sa, za, qdtype=a_qdtype, axis=-1, block_size=bs, out_dtype=x.dtype)
    if w_block_n:
        w = dequantize(qweight, w_scale, w_zero_point, qdtype=w_qdtype, axis=[0, 1], block_size=[w_block_n, w_group],
                       out_dtype=x.dtype)
    else:
        w = dequantize(qweight, w_scale, w_zero_point, qdtype=w_qdtype, axis=1 if w_group else 0,
                       block_size=w_group or None, out_dtype=x.dtype)
    return epilogue_ref(F.linear(xd, w, bias), epilogue)


@triton.jit
def _grouped_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(row tile, column tile) of a 1-D grid, column tiles swept ``GROUP_M`` row tiles at a time: the programs
    resident together read ``GROUP_M`` activation tiles and a band of weight tiles that stay in L2, where a row-major
    order (``GROUP_M = 1``) streams the whole weight through L2 once per row tile."""
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    band = GROUP_M * tiles_n
    first_m = (pid // band) * GROUP_M
    rows = tl.minimum(tiles_m - first_m, GROUP_M)
    return first_m + (pid % band) % rows, (pid % band) // rows


@triton.jit
def _a8_kernel(a_ptr, sa_ptr, w_ptr, sw_ptr, zw_ptr, b_ptr, o_ptr, r_ptr, M, N, K, M_KEY,
               sam, ssam, swn, sswn, som, srm,
               W_PACKED: tl.constexpr, W_SIGNED: tl.constexpr, HAS_WZ: tl.constexpr, IS_FP8: tl.constexpr,
               A_GROUP: tl.constexpr, W_GROUP: tl.constexpr, HAS_BIAS: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
               ACT: tl.constexpr = 0, GATED: tl.constexpr = False, GROUP_M: tl.constexpr = 1,
               SUBK: tl.constexpr = 1, W_BLOCK_N: tl.constexpr = 0, HAS_RES: tl.constexpr = False,
               IS_BF16: tl.constexpr = False):
    pid_m, pid_n = _grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    GROUPED: tl.constexpr = A_GROUP > 0 or W_GROUP > 0
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if IS_FP8:
        acc_i = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    else:
        acc_i = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k_step in range(0, K, BLOCK_K * SUBK):
        for sub in tl.static_range(SUBK):  # SUBK scale groups per loop step: independent dots, one loop overhead
            k0 = k_step + sub * BLOCK_K
            if GROUPED:
                base = tl.zeros_like(acc_i)
            else:
                base = acc_i
            offs_k = k0 + tl.arange(0, BLOCK_K)
            a = tl.load(a_ptr + offs_m[:, None] * sam + offs_k[None, :], mask=m_ok[:, None] & (offs_k < K)[None, :],
                        other=0.0)
            if W_PACKED:  # int4 -> int8 in registers, interleaved to K order (even/odd halves measured slower)
                offs_c = k0 // 2 + tl.arange(0, BLOCK_K // 2)
                b = tl.load(w_ptr + offs_n[:, None] * swn + offs_c[None, :],
                            mask=n_ok[:, None] & (offs_c * 2 < K)[None, :], other=0)
                q = unpack_nibbles(b, W_SIGNED)
                if HAS_WZ:  # BLOCK_K <= W_GROUP: one zero point per row in this step
                    if W_GROUP > 0:
                        zp = tl.load(zw_ptr + offs_n * sswn + k0 // W_GROUP, mask=n_ok & (k0 < K),
                                     other=0).to(tl.int32)
                    else:
                        zp = tl.load(zw_ptr + offs_n, mask=n_ok, other=0).to(tl.int32)
                    q = q - zp[:, None]
                part = tl.dot(a, tl.trans(q.to(tl.int8)), base, out_dtype=tl.int32)
            else:
                w = tl.load(w_ptr + offs_n[:, None] * swn + offs_k[None, :],
                            mask=n_ok[:, None] & (offs_k < K)[None, :], other=0.0)
                if IS_FP8:
                    part = tl.dot(a, tl.trans(w), base)
                else:
                    part = tl.dot(a, tl.trans(w), base, out_dtype=tl.int32)
            if W_BLOCK_N > 0:  # one weight scale for the program's columns (BLOCK_N divides W_BLOCK_N)
                sw_t = tl.load(sw_ptr + (pid_n * BLOCK_N // W_BLOCK_N) * sswn + k0 // W_GROUP, mask=k0 < K, other=0)
                sa = tl.load(sa_ptr + offs_m * ssam + k0 // A_GROUP, mask=m_ok & (k0 < K), other=0)
                acc += part.to(tl.float32) * (sa * sw_t.to(tl.float32))[:, None]
            elif GROUPED:
                pf = part.to(tl.float32)
                if A_GROUP > 0:
                    sa = tl.load(sa_ptr + offs_m * ssam + k0 // A_GROUP, mask=m_ok & (k0 < K), other=0)
                    pf = pf * sa[:, None]
                if W_GROUP > 0:
                    sw = tl.load(sw_ptr + offs_n * sswn + k0 // W_GROUP, mask=n_ok & (k0 < K), other=0).to(tl.float32)
                    pf = pf * sw[None, :]
                acc += pf
            else:
                acc_i = part
    if not GROUPED:
        acc = acc_i.to(tl.float32)
    if A_GROUP == 0:
        acc = acc * tl.load(sa_ptr + offs_m * ssam, mask=m_ok, other=0)[:, None]
    if W_GROUP == 0:
        acc = acc * tl.load(sw_ptr + offs_n, mask=n_ok, other=0).to(tl.float32)[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0).to(tl.float32)[None, :]
    if HAS_RES:  # a block's residual add (no epilogue then), as a8_gemv's store adds it
        acc = add_residual_tile(acc, r_ptr, offs_m, offs_n, m_ok, n_ok, srm, IS_BF16)
    store_epilogue(acc, o_ptr, offs_m, pid_n * BLOCK_N, m_ok, som, N, ACT, GATED)


A8_GROUP_M = 8
"""Row tiles per band of the grouped program order (``_grouped_tile``) for the autotuned configs."""


A8_STATIC_MIN_M = 1024
"""From this M on, int8 / fp8 weights (not packed int4) take ``a8_static_config`` instead of the autotuner."""


def a8_static_config(group: int) -> dict:
    """The tile for M >= ``A8_STATIC_MIN_M``: the best of the H200 sweep (session 18, ``tools/bench_a8.py``, run
    S18-a8 of bench/results/a8_gemm.json, M = 2048 at five 7B shapes). Per token x per channel: 128 x 128 x 128, 8
    warps, 3 stages, bands of 8 row tiles — 1.53-1.83x cuBLAS bf16 for the GEMM; the autotuner's pick from
    ``_configs`` measured 1.39x at 4096 x 22016 (the merged gate/up) where this tile took 1.72x. Scale groups
    (``group``, the smaller of the two sides'): 64 x 128 x ``group`` with two groups per loop step, 4 warps, 4
    stages (0.44-0.50x; the autotuned 0.31-0.47x): each group's partial is scaled on CUDA cores, as long as its
    tensor-core product at fp8. Groups of 128 (fp8-block128) take one group per step: the same K per loop step
    and shared memory per stage (~24 KB) as the measured group-64 tile, where two 128-wide groups would double it
    to ~196 KB over 4 stages (not measured yet: ``tools/bench_a8.py --schemes fp8-block64,fp8-block128``)."""
    if group:
        return {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": group, "GROUP_M": A8_GROUP_M, "SUBK": 2 if group < 128 else 1,
                "num_warps": 4, "num_stages": 4}
    return {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": A8_GROUP_M, "SUBK": 1, "num_warps": 8,
            "num_stages": 3}


A8_MID_M = (64, 256)
"""``a8_mid_config`` serves ``A8_MID_M[0] < M <= A8_MID_M[1]`` (measured at M = 128; up to 256 its 64-row tiles
still give every SM a program at these widths)."""


def a8_mid_config(n: int) -> dict:
    """The tile for ``A8_MID_M`` rows per token x per channel: the best of the H200 sweep at M = 128 (session 19,
    ``tools/bench_a8.py --ms 128``, run 2026-12-03-m128 of bench/results/a8_gemm.json; the int8 GEMM x cuBLAS
    bf16). 64-row tiles, their width by N so ~250-350 programs share the 132 SMs: N <= 4096 64 x 32 (1.06x /
    1.08x at 11008x4096 / 4096x4096, the autotuner's pick 0.82x / 0.84x), N < 16384 64 x 64 (1.35x / 1.45x at
    4096x11008 / 4096x12288; autotuned 1.26x / 1.35x), wider 128 x 128 (1.50x at the merged gate/up 4096x22016;
    autotuned 1.49x)."""
    if n >= 16384:
        return a8_static_config(0)
    return {"BLOCK_M": 64, "BLOCK_N": 32 if n <= 4096 else 64, "BLOCK_K": 128, "GROUP_M": A8_GROUP_M, "SUBK": 1,
            "num_warps": 4, "num_stages": 4}


def _fixed_tile(m: int, n: int, packed: bool, groups: list[int]) -> dict | None:
    """The op's own tile where it does not autotune: the interpreter's small one, ``a8_static_config`` from
    ``A8_STATIC_MIN_M`` rows, ``a8_mid_config`` at ``A8_MID_M`` rows per token x per channel; None: autotune."""
    if interpreting():
        bk = min(groups) if groups else 64
        return {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": min(bk, 64), "GROUP_M": 2, "SUBK": 2 if groups else 1}
    if packed:
        return None
    if m >= A8_STATIC_MIN_M:
        return a8_static_config(min(groups or [0]))
    if not groups and A8_MID_M[0] < m <= A8_MID_M[1]:
        return a8_mid_config(n)
    return None


def _configs() -> list[triton.Config]:
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": A8_GROUP_M, "SUBK": 1},
                          num_warps=w, num_stages=s)
            for bm, bn, bk, w, s in ((128, 128, 128, 8, 3), (128, 256, 128, 8, 3), (128, 128, 64, 8, 4),
                                     (64, 128, 128, 4, 4), (16, 64, 128, 4, 4), (16, 128, 64, 4, 4),
                                     (64, 64, 64, 4, 4))]


def _prune(configs, named_args, **kw):
    """Keep configs whose BLOCK_K fits the scale groups (one scale per K step) and whose BLOCK_N divides a weight
    tile's rows (one tile scale per program); shrink small-M tiles."""
    g = min([v for v in (named_args.get(a, kw.get(a, 0)) for a in ("A_GROUP", "W_GROUP")) if v] or [0])
    bn = named_args.get("W_BLOCK_N", kw.get("W_BLOCK_N", 0))
    m = named_args["M"]
    out = [c for c in configs if (g == 0 or c.kwargs["BLOCK_K"] <= g) and (m > 64 or c.kwargs["BLOCK_M"] <= 64)
           and (not bn or bn % c.kwargs["BLOCK_N"] == 0)]
    if not out:
        out = [triton.Config({"BLOCK_M": 16 if m <= 16 else 64, "BLOCK_N": 128, "BLOCK_K": g,
                              "GROUP_M": A8_GROUP_M, "SUBK": 1}, num_warps=4, num_stages=4),
               triton.Config({"BLOCK_M": 128 if m > 64 else 64, "BLOCK_N": 128, "BLOCK_K": g,
                              "GROUP_M": A8_GROUP_M, "SUBK": 1}, num_warps=8, num_stages=3)]
    return out


_a8_kernel_tuned = triton.autotune(configs=_configs(), key=["M_KEY", "N", "K", "A_GROUP", "W_GROUP", "W_PACKED",
                                                            "IS_FP8", "ACT", "GATED", "W_BLOCK_N"],
                                   prune_configs_by={"early_config_prune": _prune}, warmup=5, rep=20)(_a8_kernel)


def a8_gemm(xq: torch.Tensor, x_scale: torch.Tensor, qweight: torch.Tensor, w_scale: torch.Tensor,
            w_zero_point: torch.Tensor | None, bias: torch.Tensor | None, w_qdtype: str, w_group: int, a_group: int,
            out_dtype: torch.dtype, epilogue: str = "", config: dict | None = None, w_block_n: int = 0,
            residual: torch.Tensor | None = None) -> torch.Tensor:
    """The GEMM half on already-quantized activations ``xq [M, K]`` with scales ``[M, ceil(K/a_group) or 1]``;
    ``epilogue`` (``parse_epilogue``) applied in the store (gated: the output is ``N / 2`` wide). ``config``: a
    tile to launch instead of the op's own choice (``BLOCK_M``, ``BLOCK_N``, ``BLOCK_K``, ``GROUP_M``, ``SUBK``,
    ``num_warps``, ``num_stages``; ``tools/bench_a8.py``'s sweep). ``w_block_n``: fp8 weight scales per
    ``[w_block_n, w_group]`` tile, ``w_scale`` ``[ceil(N/w_block_n), ceil(K/w_group)]``, activation groups of
    ``w_group``. ``residual``: ``[M, N]`` rows of ``out_dtype`` added in the store (a block's residual add, no
    epilogue: ``residual + y`` as torch rounds it), where a prefill's A8 linear ran the add as its own kernel."""
    m, k = xq.shape
    n = qweight.shape[0]
    act, gated = parse_epilogue(epilogue, "a8_linear")
    check(not gated or n % 2 == 0, "a8_linear", f"a gated epilogue needs an even N (gate, up pairs), got N={n}")
    packed, signed = W_QDTYPES[w_qdtype]
    is_fp8 = w_qdtype == "fp8e4m3"
    check(not is_fp8 or xq.dtype == torch.float8_e4m3fn, "a8_linear", "fp8 weights need fp8 activations")
    check(is_fp8 or xq.dtype == torch.int8, "a8_linear", f"{w_qdtype} weights need int8 activations")
    check(w_zero_point is None or packed, "a8_linear", "an int8 weight zero point can leave int8 range: use the "
          "reference")
    groups = [g for g in (a_group, w_group) if g]
    check(all(is_pow2(g) and g >= 32 for g in groups), "a8_linear", f"groups {groups} must be powers of two >= 32")
    if w_block_n:
        tiles = (cdiv(n, w_block_n), cdiv(k, w_group or k))
        check(is_fp8 and not gated and a_group == w_group > 0 and is_pow2(w_block_n) and w_block_n >= 32,
              "a8_linear", f"weight tiles [{w_block_n}, {w_group}] take fp8 weights, activation groups equal to the "
              f"tile's K ({a_group} given) and a power-of-two row count >= 32, no gated epilogue")
        check(tuple(w_scale.shape) == tiles, "a8_linear", f"weight tile scales of a [{n}, {k}] weight in "
              f"[{w_block_n}, {w_group}] tiles are {list(tiles)}, got {list(w_scale.shape)}")
    check(residual is None or (not epilogue and residual.dtype == out_dtype and tuple(residual.shape) == (m, n)
                               and residual.stride(-1) == 1), "a8_linear",
          f"a residual added in the store is [{m}, {n}] {out_dtype} rows with no epilogue, got "
          f"{None if residual is None else (tuple(residual.shape), residual.dtype)} and epilogue {epilogue!r}")
    out = torch.empty((m, n // 2 if gated else n), device=xq.device, dtype=out_dtype)
    wz = w_zero_point if w_zero_point is not None else w_scale
    b = bias if bias is not None else w_scale
    r = residual if residual is not None else out
    args = (xq, x_scale, qweight, w_scale, wz, b, out, r, m, n, k, m_bucket(m), xq.stride(0), x_scale.stride(0),
            qweight.stride(0), w_scale.stride(0), out.stride(0), r.stride(0))
    meta = {"W_PACKED": packed, "W_SIGNED": signed, "HAS_WZ": w_zero_point is not None, "IS_FP8": is_fp8,
            "A_GROUP": a_group, "W_GROUP": w_group, "HAS_BIAS": bias is not None, "ACT": act, "GATED": gated,
            "W_BLOCK_N": w_block_n, "HAS_RES": residual is not None, "IS_BF16": out_dtype == torch.bfloat16}
    cfg = config if config is not None else _fixed_tile(m, n, packed, groups)
    if cfg is not None:
        check(not w_block_n or w_block_n % cfg["BLOCK_N"] == 0, "a8_linear",
              f"BLOCK_N={cfg['BLOCK_N']} does not divide the weight tile's {w_block_n} rows")
        grid = (cdiv(n, cfg["BLOCK_N"]) * cdiv(m, cfg["BLOCK_M"]),)
        launcher(xq, _a8_kernel)[grid](*args, **meta, **cfg)
    else:
        def grid(meta):
            return (cdiv(n, meta["BLOCK_N"]) * cdiv(m, meta["BLOCK_M"]),)
        launcher(xq, _a8_kernel_tuned)[grid](*args, **meta)
    return out


def _a8_product(xq: torch.Tensor, sa: torch.Tensor, qweight: torch.Tensor, w_scale: torch.Tensor,
                w_zero_point: torch.Tensor | None, bias: torch.Tensor | None, w_qdtype: str, w_group: int,
                a_group: int, use_scaled_mm: bool, out_dtype: torch.dtype, epilogue: str = "",
                w_block_n: int = 0, residual: torch.Tensor | None = None) -> torch.Tensor:
    """The GEMM on codes ``[M, K]`` and scales ``[M, K/a_group or 1]``: ``_scaled_mm`` (then the epilogue's ops and
    the residual's add) or ``a8_gemm`` (the epilogue or the residual in its store)."""
    k = xq.shape[-1]
    n = qweight.shape[0]
    if (w_qdtype == "fp8e4m3" and use_scaled_mm and a_group == 0 and w_group == 0 and xq.is_cuda
            and k % 16 == 0 and n % 16 == 0):
        parse_epilogue(epilogue, "a8_linear")
        y = torch._scaled_mm(xq, qweight.t(), scale_a=sa, scale_b=w_scale.float().reshape(1, n), bias=bias,
                             out_dtype=out_dtype)
        y = apply_epilogue(y, epilogue)
        return y if residual is None else residual + y
    return a8_gemm(xq, sa, qweight, w_scale, w_zero_point, bias, w_qdtype, w_group, a_group, out_dtype, epilogue,
                   w_block_n=w_block_n, residual=residual)


def _takes_gemv(x: torch.Tensor, qweight: torch.Tensor, w_qdtype: str, w_group: int, a_group: int,
                w_zero_point: torch.Tensor | None, w_block_n: int) -> bool:
    """Decode sizes (M <= ``A8_GEMV_MAX_M``) of the forms the one-launch GEMV takes (``a8_gemv_unsupported``):
    chosen per call by M, as ``weight_only_linear`` picks its GEMV; the quantize + GEMM otherwise."""
    k = x.shape[-1]
    return (k > 0 and x.numel() > 0 and qweight.stride(-1) == 1
            and a8_gemv_unsupported(x.numel() // k, w_qdtype, w_group, a_group, w_zero_point, w_block_n) is None)


def _rows_residual(residual: torch.Tensor | None, out_shape: tuple, dtype: torch.dtype,
                   epilogue: str) -> torch.Tensor | None:
    """``residual`` as the GEMV's ``[M, N]`` rows where its store adds it (the output's shape and dtype, no
    epilogue); None where the op adds it after (``residual + y``, the IR's ``residual_add``)."""
    if residual is None or epilogue or residual.dtype != dtype or tuple(residual.shape) != tuple(out_shape):
        return None
    r = residual.reshape(-1, out_shape[-1])
    return r if r.stride(-1) == 1 else r.contiguous()


def _gemv_rows(rows: torch.Tensor, scales: torch.Tensor | None, lead: tuple[int, ...], qweight: torch.Tensor,
               w_scale: torch.Tensor, bias: torch.Tensor | None, w_qdtype: str, w_group: int, a_group: int,
               out_dtype: torch.dtype, epilogue: str, residual: torch.Tensor | None,
               norm_sumsq: torch.Tensor | None = None, norm_eps: float = 0.0) -> torch.Tensor:
    """``a8_gemv`` on ``rows [M, K]``: codes with their fp32 scales, or float rows it quantizes itself (``scales``
    None; normed first with ``norm_sumsq``); the output ``[*lead, N]``, plus ``residual`` (in the GEMV's store
    where it can be, else after)."""
    added = _rows_residual(residual, (*lead, qweight.shape[0]), out_dtype, epilogue)
    y = a8_gemv(rows, scales, qweight, w_scale, bias, w_qdtype, w_group,
                "fp8e4m3" if w_qdtype == "fp8e4m3" else "int8", a_group, out_dtype, epilogue, residual=added,
                norm_sumsq=norm_sumsq, norm_eps=norm_eps)
    y = y.reshape(*lead, y.shape[-1])
    return y if residual is None or added is not None else residual + y


def _quantizes_in_gemv(x: torch.Tensor, qweight: torch.Tensor, w_qdtype: str, w_group: int, a_group: int,
                       w_zero_point: torch.Tensor | None, w_block_n: int) -> bool:
    """The GEMV takes the call and quantizes its rows itself: K <= ``A8_GEMV_QUANTIZE_MAX_K`` (why: there)."""
    return (x.shape[-1] <= a8_gemv_module.A8_GEMV_QUANTIZE_MAX_K
            and _takes_gemv(x, qweight, w_qdtype, w_group, a_group, w_zero_point, w_block_n))


def _linear_on_codes(xq: torch.Tensor, sa: torch.Tensor, lead: tuple[int, ...], qweight: torch.Tensor,
                     w_scale: torch.Tensor, w_zero_point: torch.Tensor | None, bias: torch.Tensor | None, w_qdtype: str,
                     w_group: int, a_group: int, out_dtype: torch.dtype, use_scaled_mm: bool, epilogue: str,
                     w_block_n: int, residual: torch.Tensor | None) -> torch.Tensor:
    """Both ops after the activation is quantized (codes ``xq [M, K]``, fp32 scales ``sa [M, groups or 1]``; the
    output ``[*lead, N]``, plus ``residual``): ``a8_gemv`` on the codes at decode sizes (``_gemv_rows``), the GEMM
    (``_a8_product``) otherwise; the GEMV on codes beat the GEMM on them on an H100 (session 49: 4.1 vs ~4.4 us at
    576x1536; 18.9 at 4096x11008)."""
    if _takes_gemv(xq, qweight, w_qdtype, w_group, a_group, w_zero_point, w_block_n):
        return _gemv_rows(xq, sa, lead, qweight, w_scale, bias, w_qdtype, w_group, a_group, out_dtype, epilogue,
                          residual)
    added = _rows_residual(residual, (*lead, qweight.shape[0]), out_dtype, epilogue)
    y = _a8_product(xq, sa, qweight, w_scale, w_zero_point, bias, w_qdtype, w_group, a_group, use_scaled_mm,
                    out_dtype, epilogue, w_block_n, added)
    y = y.reshape(*lead, y.shape[-1])
    return y if residual is None or added is not None else residual + y


def _check_qdtypes(op: str, w_qdtype: str, a_qdtype: str) -> None:
    """A weight format the ops take, with the activations its dot reads (int8 with int weights, fp8 with fp8)."""
    check(w_qdtype in W_QDTYPES, op, f"weight qdtype {w_qdtype!r} not in {sorted(W_QDTYPES)}")
    check((a_qdtype == "fp8e4m3") == (w_qdtype == "fp8e4m3") and a_qdtype in ("int8", "fp8e4m3"), op,
          f"weights {w_qdtype} with activations {a_qdtype}: int weights take int8, fp8 weights fp8e4m3")


def _a8_linear_impl(x: torch.Tensor, qweight: torch.Tensor, w_scale: torch.Tensor,
                    w_zero_point: torch.Tensor | None, bias: torch.Tensor | None, w_qdtype: str, w_group: int,
                    a_qdtype: str, a_group: int, use_scaled_mm: bool, epilogue: str, w_block_n: int,
                    residual: torch.Tensor | None, norm_sumsq: torch.Tensor | None,
                    norm_eps: float) -> torch.Tensor:
    """``a8_linear``'s body (``a8_linear_add_norm`` runs it where its GEMV does not take the call)."""
    k = x.shape[-1]
    lead = tuple(x.shape[:-1])
    if _quantizes_in_gemv(x, qweight, w_qdtype, w_group, a_group, w_zero_point, w_block_n):
        sumsq = None if norm_sumsq is None else norm_sumsq.reshape(-1, norm_sumsq.shape[-1]).float().contiguous()
        return _gemv_rows(x.reshape(-1, k), None, lead, qweight, w_scale, bias, w_qdtype, w_group, a_group, x.dtype,
                          epilogue, residual, sumsq, norm_eps)
    xq, sa = quantize_activation(x, a_qdtype, a_group, norm_sumsq, norm_eps)  # normed as it loads, one launch
    return _linear_on_codes(xq, sa, lead, qweight, w_scale, w_zero_point, bias, w_qdtype, w_group, a_group, x.dtype,
                            use_scaled_mm, epilogue, w_block_n, residual)


@triton_op("lowbit::a8_linear", mutates_args=())
def a8_linear(x: torch.Tensor, qweight: torch.Tensor, w_scale: torch.Tensor, w_zero_point: torch.Tensor | None,
              bias: torch.Tensor | None, w_qdtype: str, w_group: int, a_qdtype: str, a_group: int,
              use_scaled_mm: bool = FP8_ROWWISE_SCALED_MM, epilogue: str = "", w_block_n: int = 0,
              residual: torch.Tensor | None = None, norm_sumsq: torch.Tensor | None = None,
              norm_eps: float = 0.0) -> torch.Tensor:
    """Quantize ``x`` per token (or per ``a_group`` channels) and multiply with the quantized weight.

    ``w_group``/``a_group`` 0 = per channel / per token. fp8 per-token x per-channel goes through
    ``torch._scaled_mm`` when ``use_scaled_mm`` (CUDA only). ``epilogue``: an activation (``silu``, ``gelu``,
    ``gelu_tanh``) applied in the GEMM's store, or ``<act>*up`` for interleaved (gate, up) weight rows
    (``weight_only.interleave_rows``): the output is ``act(gate) * up``, half as wide (``epilogue_ref``).
    ``w_block_n``: fp8 weight scales per ``[w_block_n, w_group]`` tile (``a8_gemm``). ``residual``: returns
    ``residual + linear`` (a block's residual add; in the GEMV's store at decode sizes, ``a8_gemv``).
    ``norm_sumsq``/``norm_eps``: ``x`` is an RMSNorm's ``gain * stream`` and ``norm_sumsq`` (``[..., P]`` fp32)
    the stream's partial sums of squares (``a8_linear_add_norm``'s halves): ``x`` is normed first
    (``norm_from_parts_ref``'s rounding) where it is quantized, in the GEMV or in ``quantize_activation``."""
    _check_qdtypes("a8_linear", w_qdtype, a_qdtype)
    return _a8_linear_impl(x, qweight, w_scale, w_zero_point, bias, w_qdtype, w_group, a_qdtype, a_group,
                           use_scaled_mm, epilogue, w_block_n, residual, norm_sumsq, norm_eps)


@triton_op("lowbit::a8_linear_add_norm", mutates_args=())
def a8_linear_add_norm(x: torch.Tensor, qweight: torch.Tensor, w_scale: torch.Tensor,
                       w_zero_point: torch.Tensor | None, bias: torch.Tensor | None, w_qdtype: str, w_group: int,
                       a_qdtype: str, a_group: int, residual: torch.Tensor, norm_weight: torch.Tensor,
                       use_scaled_mm: bool = FP8_ROWWISE_SCALED_MM,
                       w_block_n: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``stream = residual + a8_linear(x)`` and the next RMSNorm's first half: ``(stream, norm_weight * stream,
    partial sums of stream**2 [..., P] fp32)`` (``weight_only_linear_add_norm``'s contract), which the next A8
    linear reads as ``x`` and ``norm_sumsq``. Why: at decode sizes the GEMV's store writes all three (one partial
    per program and row), so the norm + quantize between the two linears (``rms_norm_quant``, a launch per norm
    of a W8A8/FP8 decode step) is gone; elsewhere (a prefill's rows) the GEMM, then one ``add_norm_parts`` launch
    for the add and the half (one partial per row), where the unsplit step ran the add as a torch op: with the
    reader's normed quantize (``quantize_activation(norm_sumsq=)``) in place of ``rms_norm_quant``, the split
    prefill launches as many kernels as the unsplit one (``tools/count_step_launches.py --prefill``)."""
    _check_qdtypes("a8_linear_add_norm", w_qdtype, a_qdtype)
    k = x.shape[-1]
    n = qweight.shape[0]
    lead = tuple(x.shape[:-1])
    if (_takes_gemv(x, qweight, w_qdtype, w_group, a_group, w_zero_point, w_block_n)
            and tuple(residual.shape) == (*lead, n) and residual.dtype == x.dtype
            and tuple(norm_weight.shape) == (n,) and norm_weight.dtype == x.dtype):
        rows, scales = x.reshape(-1, k), None
        if k > a8_gemv_module.A8_GEMV_QUANTIZE_MAX_K:
            rows, scales = quantize_activation(x, a_qdtype, a_group)
        stream, gained, sumsq = a8_gemv_add_norm(rows, scales, qweight, w_scale, bias, w_qdtype, w_group, a_qdtype,
                                                 a_group, residual.reshape(-1, n).contiguous(), norm_weight)
        return stream.reshape(*lead, n), gained.reshape(*lead, n), sumsq.reshape(*lead, -1)
    y = _a8_linear_impl(x, qweight, w_scale, w_zero_point, bias, w_qdtype, w_group, a_qdtype, a_group,
                        use_scaled_mm, "", w_block_n, None, None, 0.0)
    if add_norm_parts_takes(residual, y, norm_weight):
        return add_norm_parts(residual, y, norm_weight)
    stream = residual + y
    gained, sumsq = norm_parts_ref(stream, norm_weight)
    return stream, gained, sumsq


@triton_op("lowbit::a8_linear_q", mutates_args=())
def a8_linear_q(xq: torch.Tensor, x_scale: torch.Tensor, qweight: torch.Tensor, w_scale: torch.Tensor,
                w_zero_point: torch.Tensor | None, bias: torch.Tensor | None, w_qdtype: str, w_group: int,
                a_group: int, out_dtype: torch.dtype, use_scaled_mm: bool = FP8_ROWWISE_SCALED_MM,
                epilogue: str = "", w_block_n: int = 0, residual: torch.Tensor | None = None) -> torch.Tensor:
    """``a8_linear`` on an activation already quantized (``rms_norm_quant``): codes ``[..., K]`` (int8 /
    float8_e4m3fn) and fp32 scales ``[..., K/a_group or 1]``; the output is ``out_dtype``, ``epilogue`` and
    ``residual`` as in ``a8_linear``."""
    k = xq.shape[-1]
    check(w_qdtype in W_QDTYPES, "a8_linear_q", f"weight qdtype {w_qdtype!r} not in {sorted(W_QDTYPES)}")
    xq2 = xq.reshape(-1, k)
    sa = x_scale.reshape(xq2.shape[0], -1)
    if xq2.stride(-1) != 1:
        xq2 = xq2.contiguous()
    if sa.dtype != torch.float32 or sa.stride(-1) != 1:
        sa = sa.float().contiguous()
    return _linear_on_codes(xq2, sa, tuple(xq.shape[:-1]), qweight, w_scale, w_zero_point, bias, w_qdtype, w_group,
                            a_group, out_dtype, use_scaled_mm, epilogue, w_block_n, residual)


def _a8_output(x: torch.Tensor, n: int, dtype: torch.dtype, epilogue: str,
               residual: torch.Tensor | None) -> torch.Tensor:
    """An empty tensor shaped as an A8 op's output (the fake impls): ``[*lead, N]`` (gated ``N / 2``) of ``dtype``,
    broadcast with ``residual`` where the op adds one."""
    shape = (*x.shape[:-1], n // 2 if epilogue.endswith("*up") else n)
    if residual is None:
        return x.new_empty(shape, dtype=dtype)
    return x.new_empty(torch.broadcast_shapes(shape, residual.shape), dtype=torch.promote_types(residual.dtype, dtype))


@torch.library.custom_op("lowbit::a8_linear_pdl", mutates_args=())
def a8_linear_pdl(x: torch.Tensor, qweight: torch.Tensor, w_scale: torch.Tensor, w_zero_point: torch.Tensor | None,
                  bias: torch.Tensor | None, w_qdtype: str, w_group: int, a_qdtype: str, a_group: int,
                  use_scaled_mm: bool = FP8_ROWWISE_SCALED_MM, epilogue: str = "", w_block_n: int = 0,
                  residual: torch.Tensor | None = None, norm_sumsq: torch.Tensor | None = None,
                  norm_eps: float = 0.0) -> torch.Tensor:
    """``a8_linear`` as an opaque op whose quantize and GEMV launch with programmatic dependent launch
    (``pdl_launches``): opaque because Inductor launches a ``triton_op``'s kernels itself, without the launch
    attribute (``weight_only_linear_pdl``); in a CUDA-graph decode step its Python runs once, at capture."""
    with pdl_launches():
        return a8_linear(x, qweight, w_scale, w_zero_point, bias, w_qdtype, w_group, a_qdtype, a_group,
                         use_scaled_mm, epilogue, w_block_n, residual, norm_sumsq, norm_eps)


@a8_linear_pdl.register_fake
def _(x, qweight, w_scale, w_zero_point, bias, w_qdtype, w_group, a_qdtype, a_group,
      use_scaled_mm=FP8_ROWWISE_SCALED_MM, epilogue="", w_block_n=0, residual=None, norm_sumsq=None, norm_eps=0.0):
    return _a8_output(x, qweight.shape[0], x.dtype, epilogue, residual)


@torch.library.custom_op("lowbit::a8_linear_q_pdl", mutates_args=())
def a8_linear_q_pdl(xq: torch.Tensor, x_scale: torch.Tensor, qweight: torch.Tensor, w_scale: torch.Tensor,
                    w_zero_point: torch.Tensor | None, bias: torch.Tensor | None, w_qdtype: str, w_group: int,
                    a_group: int, out_dtype: torch.dtype, use_scaled_mm: bool = FP8_ROWWISE_SCALED_MM,
                    epilogue: str = "", w_block_n: int = 0, residual: torch.Tensor | None = None) -> torch.Tensor:
    """``a8_linear_q`` (the codes ``rms_norm_quant`` wrote) with its GEMV launched with PDL (``a8_linear_pdl``)."""
    with pdl_launches():
        return a8_linear_q(xq, x_scale, qweight, w_scale, w_zero_point, bias, w_qdtype, w_group, a_group, out_dtype,
                           use_scaled_mm, epilogue, w_block_n, residual)


@a8_linear_q_pdl.register_fake
def _(xq, x_scale, qweight, w_scale, w_zero_point, bias, w_qdtype, w_group, a_group, out_dtype,
      use_scaled_mm=FP8_ROWWISE_SCALED_MM, epilogue="", w_block_n=0, residual=None):
    return _a8_output(xq, qweight.shape[0], out_dtype, epilogue, residual)


def a8_add_norm_partials(x: torch.Tensor, qweight: torch.Tensor, w_zero_point: torch.Tensor | None, w_qdtype: str,
                         w_group: int, a_group: int, residual: torch.Tensor, norm_weight: torch.Tensor,
                         w_block_n: int = 0) -> int:
    """How many partial sums of squares per row ``a8_linear_add_norm`` returns: one per GEMV program where the
    GEMV writes the halves (``a8_gemv_config``'s ``BLOCK_N`` columns each), else one (``add_norm_parts``, or torch
    ops). The condition is ``a8_linear_add_norm``'s."""
    k = x.shape[-1]
    n = qweight.shape[0]
    if not (_takes_gemv(x, qweight, w_qdtype, w_group, a_group, w_zero_point, w_block_n)
            and tuple(residual.shape) == (*x.shape[:-1], n) and residual.dtype == x.dtype
            and tuple(norm_weight.shape) == (n,) and norm_weight.dtype == x.dtype):
        return 1
    group = min([g for g in (a_group, w_group) if g] or [0])
    return cdiv(n, a8_gemv_config(n, k, group)["BLOCK_N"])


@torch.library.custom_op("lowbit::a8_linear_add_norm_pdl", mutates_args=())
def a8_linear_add_norm_pdl(x: torch.Tensor, qweight: torch.Tensor, w_scale: torch.Tensor,
                           w_zero_point: torch.Tensor | None, bias: torch.Tensor | None, w_qdtype: str, w_group: int,
                           a_qdtype: str, a_group: int, residual: torch.Tensor, norm_weight: torch.Tensor,
                           use_scaled_mm: bool = FP8_ROWWISE_SCALED_MM,
                           w_block_n: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``a8_linear_add_norm`` with PDL launches (``a8_linear_pdl``)."""
    with pdl_launches():
        return a8_linear_add_norm(x, qweight, w_scale, w_zero_point, bias, w_qdtype, w_group, a_qdtype, a_group,
                                  residual, norm_weight, use_scaled_mm, w_block_n)


@a8_linear_add_norm_pdl.register_fake
def _(x, qweight, w_scale, w_zero_point, bias, w_qdtype, w_group, a_qdtype, a_group, residual, norm_weight,
      use_scaled_mm=FP8_ROWWISE_SCALED_MM, w_block_n=0):
    n = qweight.shape[0]
    rows = x.shape[:-1]
    p = a8_add_norm_partials(x, qweight, w_zero_point, w_qdtype, w_group, a_group, residual, norm_weight, w_block_n)
    return x.new_empty((*rows, n)), x.new_empty((*rows, n)), x.new_empty((*rows, p), dtype=torch.float32)
