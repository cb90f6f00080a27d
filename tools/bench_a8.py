"""The A8 GEMM (W8A8 int8, FP8 block-scaled) tile configs against cuBLAS bf16, ``_int_mm`` and ``_scaled_mm``, one run.

    python tools/bench_a8.py [--ms 2048,128] [--shapes 4096x11008,...] [--out bench/results/a8_gemm.json]
                             [--run NAME] [--budget-s 300] [--no-sweep] [--schemes fp8-block64,fp8-block128]
    python tools/bench_a8.py --decode [--ms 1,16] [--shapes 576x1536,...] [--schemes w8a8,fp8-rowwise,...]

``--decode``: the decode-size GEMV (``lowbit.kernels.a8_gemv``, one launch quantizing its own rows) at M = 1 and 16
on SmolLM2's shapes and the 7B one (``DECODE_SHAPES``) against the two-launch path it replaces (``quantize_activation``
+ ``a8_gemm``; fp8-rowwise also + ``torch._scaled_mm``) and cuBLAS bf16, with a ``DECODE_CONFIGS`` sweep; see
``bench_decode``.

Issue 17's prefill goals (W8A8 and FP8 at M = 2048 >= 1.6x cuBLAS bf16 *including* the activation quantization)
are bound by ``lowbit.kernels.a8_linear._a8_kernel``'s tiles and program order. For every shape this times, in
CUDA-graph replays over rotated weight copies (weights cold in L2, ``bench_kernels.measure``): cuBLAS bf16
``F.linear``; ``torch._int_mm`` and ``torch._scaled_mm`` (fp8 rowwise) raw; the GEMM half alone (``a8_gemm``:
"op launch" = the op's own choice, the autotuner or ``a8_static_config`` from M = 1024) and at each config of
``CONFIGS`` (``GROUP_M`` 1 = row-major program order, 8 = grouped); and the op a model calls
(``torch.ops.lowbit.a8_linear``: activation quantization + that GEMM). Rows are merged into ``--out`` under
``--run`` (``results_io.merge_rows``). Needs CUDA.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kernels import copy_bandwidth, measure, qweight
from results_io import machine, merge_rows, versions

from lowbit.kernels import quantize_activation

a8mod = importlib.import_module("lowbit.kernels.a8_linear")  # the module (the package re-exports the op by this name)

SHAPES = ((4096, 11008), (11008, 4096), (4096, 12288), (4096, 22016), (4096, 4096))
"""(K, N): the issue's two goal shapes and the 7B stack's merged q/k/v, merged gate/up and o_proj."""

CONFIGS = [(bm, bn, bk, w, s, g, sub) for bm, bn, bk, w, s, g, sub in (
    (128, 128, 128, 8, 3, 1, 1), (128, 128, 128, 8, 3, 8, 1), (128, 256, 128, 8, 3, 1, 1), (128, 256, 128, 8, 3, 8, 1),
    (256, 128, 128, 8, 3, 8, 1), (128, 128, 128, 4, 4, 8, 1), (64, 128, 128, 4, 4, 8, 1), (128, 256, 128, 8, 4, 8, 1),
    (128, 128, 64, 8, 4, 1, 1), (128, 128, 64, 8, 4, 8, 1), (128, 256, 64, 8, 4, 8, 1), (256, 128, 64, 8, 4, 8, 1),
    (128, 128, 64, 4, 5, 8, 1), (128, 128, 64, 8, 4, 8, 2), (128, 256, 64, 8, 3, 8, 2), (128, 128, 64, 4, 4, 8, 2),
    (64, 128, 64, 4, 4, 8, 2), (128, 128, 64, 8, 6, 8, 1),
    # for M = 128 at N = 4096 (32 column tiles of 128 leave most of the 132 SMs idle): narrower tiles (not yet run)
    (64, 64, 128, 4, 4, 8, 1), (64, 64, 64, 4, 5, 8, 1), (32, 64, 128, 4, 4, 8, 1), (64, 32, 128, 4, 4, 8, 1),
    (64, 64, 64, 4, 4, 8, 2))]
"""(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages, GROUP_M, SUBK) tried for each scheme (BLOCK_K above a scale
group, or SUBK > 1 without groups, is skipped); the first is the kernel's old tile and program order."""

SCHEMES = {  # name -> (weight qdtype, weight group, activation qdtype, activation group)
    "w8a8": ("int8", 0, "int8", 0),
    "fp8-block64": ("fp8e4m3", 64, "fp8e4m3", 64),
    "fp8-block128": ("fp8e4m3", 128, "fp8e4m3", 128),
    "fp8-rowwise": ("fp8e4m3", 0, "fp8e4m3", 0),
}
"""The op rows run the Triton GEMM; fp8-rowwise also gets an op row through ``torch._scaled_mm`` (the default
where ``FP8_ROWWISE_SCALED_MM``)."""

TILE_ROWS = {"fp8-block128": 128}
"""Schemes whose weight scales are 2-D tiles (recipe ``fp8-block128``, compressed-tensors' FP8_BLOCK): rows per
tile (``a8_gemm``'s ``w_block_n``; the weight group is the tile's K). Configs whose BLOCK_N does not divide it are
skipped."""


def tile_qweight(n: int, k: int, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp8 codes and ``[ceil(N/rows), ceil(K/cols)]`` scales of a random weight, as ``quantize(block=...)`` makes
    them."""
    from lowbit.ir.qscheme import QScheme
    from lowbit.passes.insert_qdq import quantize_weight

    assert rows == cols, "quantize(block=) makes square tiles"
    q, s, _, _ = quantize_weight(torch.randn(n, k, device="cuda"),
                                 QScheme(qdtype="fp8e4m3", granularity="per_block", group_size=rows))
    return q, s


def a8_call(xq, xs, q, s, wq: str, wg: int, ag: int, cfg: tuple | None, w_block_n: int = 0):
    """The GEMM half at ``cfg`` (None: the op's own launch)."""
    tile = None
    if cfg is not None:
        bm, bn, bk, w, st, g, sub = cfg
        tile = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": g, "SUBK": sub, "num_warps": w,
                "num_stages": st}
    return lambda: a8mod.a8_gemm(xq, xs, q, s, None, None, wq, wg, ag, torch.bfloat16, config=tile,
                                 w_block_n=w_block_n)


def _add_row(rows: list[dict], common: dict, kernel: str, m: int, k: int, n: int, us: float, base: float | None,
             **extra) -> None:
    """One timing row of ``kernel`` at ``M x (K, N)``, with its speedup over cuBLAS bf16's ``base`` us where given."""
    r = {**common, "kernel": kernel, "M": m, "K": k, "N": n, "shape": f"{k}x{n}", "us": round(us, 2), **extra}
    if base:
        r.update(baseline="cublas_bf16", baseline_us=round(base, 2), speedup=round(base / us, 3))
    rows.append(r)


def _cublas_row(x: torch.Tensor, n: int, k: int, add) -> float:
    """cuBLAS bf16 ``F.linear`` of ``x`` by an ``[N, K]`` weight: timed, added as the baseline row, its us returned."""
    def dense():
        wb = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        return lambda: F.linear(x, wb)
    base = measure(dense, 2 * n * k)[0]
    add("cublas_bf16", (base, 0), None)
    return base


def bench_shape(m: int, k: int, n: int, common: dict, deadline: float, sweep: bool = True,
                schemes: tuple[str, ...] = tuple(SCHEMES)) -> list[dict]:
    """One shape's rows; ``sweep`` False: the baselines and the op's own launch only (no ``CONFIGS``); ``schemes``:
    the ``SCHEMES`` timed."""
    rows = []
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    flops = 2 * m * n * k

    def add(kernel: str, t: tuple[float, float], base: float | None, **extra) -> None:
        _add_row(rows, common, kernel, m, k, n, t[0], base, tflops=round(flops / t[0] / 1e6, 1), **extra)

    base = _cublas_row(x, n, k, add)
    xq8, xs8 = quantize_activation(x, "int8", 0)

    def int_mm():
        q8 = qweight(n, k, "int8", 0, True)[0]
        return lambda: torch._int_mm(xq8, q8.t())
    add("torch_int_mm_raw", measure(int_mm, n * k), base)
    xf8, xfs = quantize_activation(x, "fp8e4m3", 0)

    def scaled_mm():
        qf, sf = qweight(n, k, "fp8e4m3", 0, True)[:2]
        return lambda: torch._scaled_mm(xf8, qf.t(), scale_a=xfs, scale_b=sf.reshape(1, n), out_dtype=torch.bfloat16)
    add("torch_scaled_mm_fp8_rowwise_raw", measure(scaled_mm, n * k), base)
    for scheme in schemes:
        wq, wg, aq, ag = SCHEMES[scheme]
        bn = TILE_ROWS.get(scheme, 0)

        def weight(wq=wq, wg=wg, bn=bn):
            return tile_qweight(n, k, bn, wg) if bn else qweight(n, k, wq, wg, True)[:2]
        xq, xs = quantize_activation(x, aq, ag)
        groups = [g for g in (wg, ag) if g]
        best = None
        for cfg in [None, *CONFIGS] if sweep else [None]:
            if cfg is not None and (groups and cfg[2] > min(groups) or not groups and cfg[6] > 1
                                    or bn % cfg[1] or time.time() > deadline):
                continue

            def make(cfg=cfg):
                q, s = weight()
                return a8_call(xq, xs, q, s, wq, wg, ag, cfg, bn)
            try:
                t = measure(make, n * k)
            except Exception as e:  # noqa: BLE001 - a config that does not fit (shared memory) is a row, not a stop
                rows.append({**common, "kernel": f"{scheme}_gemm", "M": m, "K": k, "N": n,
                             "config": "op launch" if cfg is None else str(cfg), "error": repr(e)[:200]})
                continue
            name = "op launch" if cfg is None else "BM{}_BN{}_BK{}_w{}_s{}_G{}_S{}".format(*cfg)
            add(f"{scheme}_gemm", t, base, config=name)
            if cfg is not None and (best is None or t[0] < best[1]["us"]):
                best = (cfg, rows[-1])
        if best is not None:
            best[1]["best"] = True

        for scaled_mm in (False, True) if scheme == "fp8-rowwise" else (False,):
            def op(scaled_mm=scaled_mm):
                q, s = weight()
                return lambda: torch.ops.lowbit.a8_linear(x, q, s, None, None, wq, wg, aq, ag, scaled_mm,
                                                          w_block_n=bn)
            add(f"{scheme}_op_incl_act_quant", measure(op, n * k), base,
                gemm="torch._scaled_mm" if scaled_mm else "triton")
    return rows


DECODE_SHAPES = ((576, 1536), (1536, 576), (576, 192), (4096, 11008))
"""(K, N) for ``--decode``: SmolLM2-135M's gate/up and down_proj, its k/v projection, and the 7B MLP."""

DECODE_CONFIGS = [(bn, bk, w) for bn in (16, 32, 64) for bk in (128, 256, 512) for w in (4, 8)]
"""(BLOCK_N, BLOCK_K, num_warps) tried for ``a8_gemv`` (BLOCK_K is the group wherever scales are grouped, so
those schemes sweep BLOCK_N x num_warps only)."""


def bench_decode(m: int, k: int, n: int, common: dict, deadline: float, sweep: bool = True,
                 schemes: tuple[str, ...] = ("w8a8", "fp8-rowwise", "fp8-block64")) -> list[dict]:
    """One decode shape's rows: cuBLAS bf16; per scheme the old two-launch op path (``quantize_activation`` +
    ``a8_gemm`` with its autotuned tile; fp8-rowwise also + ``torch._scaled_mm``), ``a8_gemv`` at its own config
    ("op launch") and at each ``DECODE_CONFIGS`` entry, ``a8_gemv`` on codes already quantized (what
    ``a8_linear_q`` runs after the fused norm: the row-amax pass is the difference), ``a8_gemv`` norming its rows
    (``norm_sumsq``: the split RMSNorm's reader, ``_fuse_norm_quant_a8``), and
    ``torch.ops.lowbit.a8_linear`` (the op a model calls, which routes M <= 16 to the GEMV). All in CUDA-graph
    replays over rotated weight copies."""
    from lowbit.kernels.a8_gemv import a8_gemv

    rows = []
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)

    def add(kernel: str, t: tuple[float, float], base: float | None, **extra) -> None:
        _add_row(rows, common, kernel, m, k, n, t[0], base, eager_us=round(t[1], 2), **extra)

    base = _cublas_row(x, n, k, add)
    for scheme in schemes:
        wq, wg, aq, ag = SCHEMES[scheme]
        if TILE_ROWS.get(scheme):
            continue  # weight scale tiles: the GEMV does not take them

        def weight(wq=wq, wg=wg):
            return qweight(n, k, wq, wg, True)[:2]

        for scaled_mm in (False, True) if scheme == "fp8-rowwise" else (False,):
            def old(scaled_mm=scaled_mm, wq=wq, wg=wg, aq=aq, ag=ag):
                q, s = weight()
                return lambda: a8mod._a8_product(*quantize_activation(x, aq, ag), q, s, None, None, wq, wg, ag,
                                                 scaled_mm, torch.bfloat16)
            add(f"{scheme}_quantize_then_{'scaled_mm' if scaled_mm else 'gemm'}", measure(old, n * k), base)
        group = min([g for g in (wg, ag) if g] or [0])
        best = None
        for cfg in [None, *DECODE_CONFIGS] if sweep else [None]:
            if cfg is not None and (group and cfg[1] != 128 or time.time() > deadline):
                continue  # grouped: one sweep over BLOCK_N x warps (BLOCK_K is the group)
            tile = None if cfg is None else {"BLOCK_N": cfg[0], "BLOCK_K": group or cfg[1], "num_warps": cfg[2]}

            def gemv(tile=tile, wq=wq, wg=wg, aq=aq, ag=ag):
                q, s = weight()
                return lambda: a8_gemv(x, None, q, s, None, wq, wg, aq, ag, torch.bfloat16, config=tile)
            try:
                t = measure(gemv, n * k)
            except Exception as e:  # noqa: BLE001 - a config that does not compile is a row, not a stop
                rows.append({**common, "kernel": f"{scheme}_gemv", "M": m, "K": k, "N": n, "config": str(tile),
                             "error": repr(e)[:200]})
                continue
            name = "op launch" if tile is None else "BN{BLOCK_N}_BK{BLOCK_K}_w{num_warps}".format(**tile)
            add(f"{scheme}_gemv", t, base, config=name)
            if tile is not None and (best is None or t[0] < best["us"]):
                best = rows[-1]
        if best is not None:
            best["best"] = True
        xq, xs = quantize_activation(x, aq, ag)

        def gemv_codes(wq=wq, wg=wg, aq=aq, ag=ag, xq=xq, xs=xs):
            q, s = weight()
            return lambda: a8_gemv(xq, xs, q, s, None, wq, wg, aq, ag, torch.bfloat16)
        # codes handed in (a8_linear_q after rms_norm_quant, q/k/v and gate/up): no amax pass over the rows
        add(f"{scheme}_gemv_from_codes", measure(gemv_codes, n * k), base, config="op launch")
        parts = torch.rand(m, 36, device="cuda") * (k / 36)  # 36 programs' partial sums of squares (SmolLM2's o_proj)

        def gemv_normed(wq=wq, wg=wg, aq=aq, ag=ag):
            q, s = weight()
            return lambda: a8_gemv(x, None, q, s, None, wq, wg, aq, ag, torch.bfloat16, norm_sumsq=parts,
                                   norm_eps=1e-5)
        # the split RMSNorm's reader (q/k/v and gate/up since session 50): the norm applied in both passes
        add(f"{scheme}_gemv_normed", measure(gemv_normed, n * k), base, config="op launch")

        def op(wq=wq, wg=wg, aq=aq, ag=ag):
            q, s = weight()
            return lambda: torch.ops.lowbit.a8_linear(x, q, s, None, None, wq, wg, aq, ag)
        add(f"{scheme}_op_incl_act_quant", measure(op, n * k), base)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results/a8_gemm.json")
    ap.add_argument("--ms", default="2048,128")
    ap.add_argument("--shapes", default="")
    ap.add_argument("--run", default="")
    ap.add_argument("--budget-s", type=float, default=300)
    ap.add_argument("--no-sweep", action="store_true", help="skip CONFIGS: baselines and the op's launch only")
    ap.add_argument("--schemes", default=",".join(SCHEMES), help=f"of {', '.join(SCHEMES)}")
    ap.add_argument("--decode", action="store_true", help="the decode GEMV (a8_gemv) at DECODE_SHAPES, M = 1 and 16 "
                    "unless --ms/--shapes say otherwise, schemes w8a8,fp8-rowwise,fp8-block64 unless --schemes")
    args = ap.parse_args()
    if args.decode:
        args.ms = "1,16" if args.ms == ap.get_default("ms") else args.ms
        args.shapes = args.shapes or ",".join(f"{k}x{n}" for k, n in DECODE_SHAPES)
        if args.schemes == ap.get_default("schemes"):
            args.schemes = "w8a8,fp8-rowwise,fp8-block64"
    schemes = tuple(args.schemes.split(","))
    unknown = [sc for sc in schemes if sc not in SCHEMES]
    if unknown:
        raise SystemExit(f"bench_a8: unknown scheme(s) {unknown}; known: {', '.join(SCHEMES)}")
    if not torch.cuda.is_available():
        raise SystemExit("bench_a8 needs CUDA")
    deadline = time.time() + args.budget_s
    shapes = [tuple(map(int, s.split("x"))) for s in args.shapes.split(",")] if args.shapes else list(SHAPES)
    date = datetime.date.today().isoformat()
    common = {"device": machine("cuda"), "date": date, "run": args.run or date}
    bw = copy_bandwidth()
    rows = [{**common, "kernel": "copy_bandwidth", "bytes_per_s": round(bw)}]
    header = {"command": "python " + " ".join(sys.argv), "date": date, "device": common["device"],
              "versions": {**versions(), "triton": triton.__version__}}
    out = Path(args.out)
    key = ("run", "kernel", "M", "K", "N", "config")
    for m in map(int, args.ms.split(",")):
        for k, n in shapes:
            if time.time() > deadline:
                print(f"budget: M={m} {k}x{n} not run", flush=True)
                continue
            t0 = time.time()
            run_shape = bench_decode if args.decode else bench_shape
            new = run_shape(m, k, n, common, deadline, sweep=not args.no_sweep, schemes=schemes)
            rows.extend(new)
            merge_rows(out, header, rows, key=key, append_command=True)
            brief = " ".join(f"{r.get('config', r['kernel'])}{'/' + r['gemm'] if 'gemm' in r else ''}="
                             f"{r.get('speedup', r.get('us', 'err'))}"
                             for r in new if "error" not in r)
            print(f"M={m} {k}x{n} ({time.time() - t0:.0f}s): {brief}", flush=True)
    merge_rows(out, header, rows, key=key, append_command=True)


if __name__ == "__main__":
    main()
