"""The float decode GEMV (``lowbit.kernels.float_gemv``) against cuBLAS at the 7B-shaped decode step's float linears.

    python tools/bench_float_gemv.py [--sweep] [--out bench/results/kernels.json]

Per shape: cuBLAS (``F.linear``, bf16) and ``_gemv_f`` at its default config (``float_gemv_config``), both replayed
from one CUDA graph over weight copies spanning ~2x L2 (``bench_kernels.bench_graph``); ``--sweep`` adds every
config of ``SWEEP`` and reports the best. A chain row per shape: 16 launches in one graph with PDL on (each GEMV
overlapping its predecessor's tail), the form a decode step runs. ``eff_bw_frac``: weight bytes / time / the run's
device copy bandwidth.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kernels import bench_graph, copy_bandwidth, n_copies  # noqa: E402
from results_io import machine, merge_rows, versions  # noqa: E402

from lowbit.kernels._common import pdl_launches  # noqa: E402
from lowbit.kernels.float_gemv import _launch_gemv_f, float_gemv_config  # noqa: E402

SHAPES = ((12288, 4096), (4096, 4096), (22016, 4096), (4096, 11008), (32000, 4096))
"""(N, K) of the 7B-shaped step's float linears: merged q/k/v, o, merged gate/up, down, the lm_head."""

SWEEP = [{"BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": sk, "num_warps": w}
         for bn, bk, w, sk in itertools.product((2, 4, 8, 16), (256, 512, 1024), (4, 8), (1, 2, 4))
         if bn * bk // (32 * w) <= 128]


def run_gemv(x, w, out, cfg, pdl: bool = False):
    def f():
        if pdl:
            with pdl_launches():
                _launch_gemv_f(x, w, None, out, "", None, cfg)
        else:
            _launch_gemv_f(x, w, None, out, "", None, cfg)
    return f


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--out", default="bench/results/kernels.json")
    ap.add_argument("--shapes", default="",
                    help="comma list of NxK to run instead of the 7B step's (e.g. a pruned step's: 9984x4096,4096x3328)")
    args = ap.parse_args()
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")] if args.shapes else SHAPES
    dev = "cuda"
    bw = copy_bandwidth()  # bytes read + written per second by a device copy
    date = datetime.date.today().isoformat()
    rows = []
    for n, k in shapes:
        nbytes = n * k * 2
        copies = n_copies(nbytes)
        ws = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) / k ** 0.5 for _ in range(copies)]
        x = torch.randn(1, k, device=dev, dtype=torch.bfloat16)
        out = torch.empty(1, n, device=dev, dtype=torch.bfloat16)
        ref = F.linear(x.float(), ws[0].float())
        cublas = bench_graph([lambda w=w: torch.mm(x, w.t(), out=out) for w in ws])
        base = {"kernel": "float_gemv", "M": 1, "K": k, "N": n, "group": None, "baseline": "cublas_bf16",
                "baseline_us": round(cublas, 2), "device": machine(dev), "date": date}
        cands = [("default", float_gemv_config(n, k))]
        if args.sweep:
            cands += [(f"BN{c['BLOCK_N']}_BK{c['BLOCK_K']}_W{c['num_warps']}_S{c['SPLIT_K']}", c) for c in SWEEP]
        best = None
        timed: list[tuple[float, str]] = []
        for name, cfg in cands:
            try:
                _launch_gemv_f(x, ws[0], None, out, "", None, cfg)
                err = ((out.float() - ref).norm() / ref.norm()).item()
                us = bench_graph([run_gemv(x, w, out, cfg) for w in ws])
            except Exception as e:  # noqa: BLE001 - a config that does not compile is reported, not fatal
                print(f"{n}x{k} {name}: {type(e).__name__}: {str(e)[:120]}", flush=True)
                continue
            row = {**base, "variant": name, "us": round(us, 2), "speedup": round(cublas / us, 3),
                   "eff_bw_frac": round(nbytes / (us * 1e-6) / bw, 3), "rel_err": round(err, 5),
                   "config": cfg}
            timed.append((us, name))
            if name == "default":
                rows.append(row)
            if best is None or us < best["us"]:
                best = row
        if args.sweep:
            print(f"{n}x{k} fastest: " + ", ".join(f"{name} {us:.2f}" for us, name in sorted(timed)[:5]), flush=True)
        if args.sweep and best is not None:
            rows.append({**best, "variant": "sweep-best " + best["variant"]})
        cfg = float_gemv_config(n, k)
        pdl_us = bench_graph([run_gemv(x, w, out, cfg, pdl=True) for w in ws])
        rows.append({**base, "variant": "default+pdl", "us": round(pdl_us, 2), "speedup": round(cublas / pdl_us, 3),
                     "eff_bw_frac": round(nbytes / (pdl_us * 1e-6) / bw, 3), "config": cfg})
        for r in rows[-3:]:
            print(f"{n}x{k} {r['variant']:36s} {r['us']:8.2f} us  cuBLAS {cublas:7.2f}  x{r['speedup']:.3f}  "
                  f"bw {r['eff_bw_frac']:.3f}", flush=True)
    command = "python tools/bench_float_gemv.py" + (" --sweep" if args.sweep else "")
    header = {"command": command + (f" --shapes {args.shapes}" if args.shapes else ""), "date": date,
              "device": machine(dev), "versions": versions()}
    merge_rows(Path(args.out), header, rows, key=("kernel", "M", "K", "N", "variant", "date"), replace_header=False,
               append_command=True)


if __name__ == "__main__":
    main()
