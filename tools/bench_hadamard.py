"""The online Hadamard kernel (``torch.ops.lowbit.hadamard``) and its fused per-token quantize
(``lowbit::hadamard_quantize``) against the torch reference op and a dense cuBLAS matmul by H, in one run.

    python tools/bench_hadamard.py --out bench/results/hadamard.json [--ms 8192,2048,16,1]
                                   [--ns 4096,11008,4864,1536,576] [--budget-s 70]
    TRITON_INTERPRET=1 python tools/bench_hadamard.py --smoke --out /tmp/hadamard.json   # CPU check of the script

Times are medians of ``triton.testing.do_bench`` (L2 flushed between calls) in µs, bf16 activations
``[M, n]``. Per (M, n): the kernel; (a) the IR's reference op (``lowbit.ir.ops.hadamard``: matmul by the cached
constant ``H/sqrt(n)``); (b) a dense bf16 cuBLAS ``x @ H`` (the constant made beforehand); the fused
hadamard + per-token int8 quantize (at the largest M also int4 and fp8) against the two kernels run one after
the other (``lowbit::hadamard`` then ``lowbit::quantize_activation``). ``eff_bw_frac`` = (bytes read + bytes
written) / time / the device-to-device copy bandwidth measured in the same run (goal >= 0.70 at large M).
``mismatch_frac`` = fraction of outputs (codes for the fused rows) that differ from the reference (bf16
rounding near-ties only: it should be ~1e-3 or less). A length the kernel (or the fused variant: 11008 =
344·32) does not take gets a row naming why, with the baselines timed. Each config is caught on its own: an
exception becomes an ``error`` row. Configs stop starting after ``--budget-s`` seconds (rows say ``skipped``).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from results_io import machine, merge_rows

import lowbit.kernels.hadamard as K
from lowbit.ir.hadamard import hadamard as orthogonal_hadamard
from lowbit.kernels.act_quant import quantize_activation

KEY = ("kernel", "variant", "M", "K", "device")


def timer(smoke: bool):
    """µs per call: ``do_bench`` medians on CUDA; a wall-clock mean of 3 calls in ``--smoke`` (CPU)."""
    if smoke:
        def wall(fn) -> float:
            fn()
            t0 = time.perf_counter()
            for _ in range(3):
                fn()
            return (time.perf_counter() - t0) / 3 * 1e6
        return wall
    from triton.testing import do_bench

    return lambda fn: do_bench(fn, warmup=5, rep=25, return_mode="median") * 1e3


def copy_bandwidth(dev: str, bench) -> float:
    """Device-to-device copy, bytes read + written per second."""
    a = torch.empty(2 ** 30 if dev == "cuda" else 2 ** 22, dtype=torch.uint8, device=dev)
    b = torch.empty_like(a)
    return 2 * a.numel() / (bench(lambda: b.copy_(a)) * 1e-6)


def _mismatch(a: torch.Tensor, b: torch.Tensor) -> float:
    return round((a.reshape(-1).view(torch.uint8) != b.reshape(-1).view(torch.uint8)).float().mean().item(), 6)


def bench_config(m: int, n: int, dev: str, bw: float, bench, big: bool, base: dict) -> list[dict]:
    x = torch.randn(m, n, device=dev, dtype=torch.bfloat16)
    rows: list[dict] = []
    K.hadamard_ref(x)  # builds and caches the reference's constant (and warms cuBLAS) before the timing
    ref_us = bench(lambda: K.hadamard_ref(x))
    h = orthogonal_hadamard(n, torch.float64).to(device=dev, dtype=torch.bfloat16)
    dense_us = bench(functools.partial(torch.matmul, x, h))
    del h
    io = 2 * m * n * 2  # bf16 read + write
    common = {**base, "M": m, "K": n, "N": n, "group": None}
    why = K.unsupported(n)
    if why is not None:
        return [{**common, "kernel": "hadamard", "variant": "bf16", "error": f"unsupported: {why}",
                 "baseline": "torch_ref", "baseline_us": round(ref_us, 2), "dense_us": round(dense_us, 2),
                 "ref_eff_bw_frac": round(io / (ref_us * 1e-6) / bw, 3)}]
    lt = K.hadamard_factors(n, dev)
    y = torch.ops.lowbit.hadamard(x, lt)
    us = bench(lambda: torch.ops.lowbit.hadamard(x, lt))
    rows.append({**common, "kernel": "hadamard", "variant": "bf16", "us": round(us, 2), "baseline": "torch_ref",
                 "baseline_us": round(ref_us, 2), "speedup": round(ref_us / us, 3), "dense_us": round(dense_us, 2),
                 "speedup_vs_dense": round(dense_us / us, 3), "eff_bw_frac": round(io / (us * 1e-6) / bw, 3),
                 "ref_eff_bw_frac": round(io / (ref_us * 1e-6) / bw, 3),
                 "mismatch_frac": _mismatch(y, K.hadamard_ref(x))})
    quantize_activation(y, "int8", 0)  # compiled before the timing
    sep_us = bench(lambda: quantize_activation(torch.ops.lowbit.hadamard(x, lt), "int8", 0))
    why_fused = K.unsupported_fused(n)
    if why_fused is not None:
        rows.append({**common, "kernel": "hadamard_quantize", "variant": "int8", "error": f"unsupported: {why_fused}",
                     "baseline": "hadamard+quantize_activation", "baseline_us": round(sep_us, 2)})
    for qd in (() if why_fused else ("int8", "int4", "fp8e4m3") if big else ("int8",)):
        q = torch.ops.lowbit.hadamard_quantize(x, lt, qd)[0]
        qr, _ = K.hadamard_quantize_ref(x, qd)
        fus = bench(lambda qd=qd: torch.ops.lowbit.hadamard_quantize(x, lt, qd))
        code_bytes = m * n // 2 if qd == "int4" else m * n
        qio = m * n * 2 + code_bytes + 4 * m
        r = {**common, "kernel": "hadamard_quantize", "variant": qd, "us": round(fus, 2),
             "eff_bw_frac": round(qio / (fus * 1e-6) / bw, 3), "mismatch_frac": _mismatch(q, qr)}
        if qd == "int8":
            r.update(baseline="hadamard+quantize_activation", baseline_us=round(sep_us, 2),
                     speedup=round(sep_us / fus, 3))
        rows.append(r)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results/hadamard.json")
    ap.add_argument("--ms", default="8192,2048,16,1")
    ap.add_argument("--ns", default="4096,11008,4864,1536,576")
    ap.add_argument("--budget-s", type=float, default=70.0, help="start no new config after this many seconds")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU under TRITON_INTERPRET=1")
    args = ap.parse_args()
    t_start = time.time()
    if args.smoke:
        dev, ms, ns = "cpu", [3, 1], [64, 576, 2240, 96]
    else:
        if not torch.cuda.is_available():
            raise SystemExit("bench_hadamard needs CUDA (or --smoke under TRITON_INTERPRET=1)")
        dev = "cuda"
        ms = [int(v) for v in args.ms.split(",") if v]
        ns = [int(v) for v in args.ns.split(",") if v]
    import triton

    from lowbit.version import __version__

    device, date = machine(dev), datetime.date.today().isoformat()
    bench = timer(args.smoke)
    torch.manual_seed(0)
    bw = copy_bandwidth(dev, bench)
    base = {"device": device, "date": date}
    rows: list[dict] = [{**base, "kernel": "copy_bandwidth", "variant": "d2d", "bytes_per_s": round(bw)}]
    header = {"command": "python " + " ".join(sys.argv), "date": date, "device": device,
              "versions": {"lowbit": __version__, "torch": torch.__version__, "triton": triton.__version__}}
    out = Path(args.out)
    print(f"copy bandwidth {bw / 1e12:.3f} TB/s", flush=True)
    big = max(ms)
    for m in ms:
        for n in ns:
            if time.time() - t_start > args.budget_s:
                new = [{**base, "kernel": "hadamard", "variant": "bf16", "M": m, "K": n, "N": n,
                        "error": f"skipped: past --budget-s {args.budget_s}"}]
            else:
                t0 = time.time()
                try:
                    new = bench_config(m, n, dev, bw, bench, m == big, base)
                except Exception as e:  # noqa: BLE001 - one failing config must not lose the others
                    new = [{**base, "kernel": "hadamard", "variant": "bf16", "M": m, "K": n, "N": n,
                            "error": repr(e)[:300]}]
                for r in new:
                    r["seconds"] = round(time.time() - t0, 1)
            for r in new:
                print(f"M={m} n={n} {r['kernel']}/{r['variant']}: "
                      + (f"{r['us']} us eff_bw {r['eff_bw_frac']} speedup {r.get('speedup')} "
                         f"dense {r.get('dense_us')} mismatch {r['mismatch_frac']}" if "us" in r
                         else f"{r.get('error')} ref {r.get('baseline_us')} dense {r.get('dense_us')}"), flush=True)
            rows.extend(new)
            merge_rows(out, header, rows, key=KEY)
    print(f"wrote {out} ({len(rows)} rows, {time.time() - t_start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
