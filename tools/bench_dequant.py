"""Prefill W4A16 (M >= 256) as it runs today, dequantize the whole weight to bf16 then cuBLAS, against doing it in
row chunks small enough that the bf16 chunk is still in L2 when cuBLAS reads it (and is overwritten there by the
next chunk instead of being written back to DRAM).

    python tools/bench_dequant.py [--ms 2048] [--shapes 4096x11008,...] [--chunks 1024,2048,4096]
                                  [--out bench/results/gemv.json] [--run LABEL]

Per (M, K, N), int4 g128 asymmetric on the N-major words ``pack_words`` makes: cuBLAS bf16 ``F.linear``; the
dequantize kernel alone (``_dequantize_words``, several tile widths); the op's default (dequantize + cuBLAS);
``chunked/<rows>``: for each block of ``rows`` weight rows, dequantize into one reused ``[rows, K]`` buffer and
``torch.mm`` into the matching column slice of the output (cuBLAS writes with the output's leading dimension, no
copy). Times are CUDA-graph replays over weight copies spanning ~2x L2 (``bench_kernels.bench_graph``), medians;
each product checked against the reference. Rows ``kernel = dequant_sweep/<what>`` merge into ``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gemv import GROUP, make_weight, rel_err
from results_io import machine, merge_rows

from lowbit.kernels import weight_only as wo


def chunked_linear(x: torch.Tensor, words: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, out: torch.Tensor,
                   buf: torch.Tensor, rows: int) -> torch.Tensor:
    """``x @ dequantize(words).T`` a ``rows``-row block of the weight at a time through ``buf``."""
    n, k = words.shape[0], x.shape[1]
    for n0 in range(0, n, rows):
        n1 = min(n, n0 + rows)
        b = buf[: n1 - n0]
        wo._dequantize_words(words[n0:n1], scale[n0:n1], zp[n0:n1], "int4", GROUP, k, x.dtype, out=b)
        torch.mm(x, b.t(), out=out[:, n0:n1])
    return out


def chunk_candidates(n: int, spec: str) -> list[int]:
    if spec != "auto":
        return [r for r in (int(v) for v in spec.split(",")) if r < n]
    cands = {n // d for d in (2, 3, 4, 6, 8) if n % d == 0 and (n // d) % 64 == 0} | {2048, 4096, 6144, 8192}
    return sorted(r for r in cands if r < n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ms", default="2048")
    ap.add_argument("--shapes", default="4096x11008,11008x4096,4096x4096,4096x12288,4096x22016")
    ap.add_argument("--chunks", default="auto", help="row counts, or auto: N/2, N/3, N/4, N/6, N/8 (multiples of 64) "
                    "and 2048, 4096, 6144, 8192 below N")
    ap.add_argument("--tiles", default="32x4", help="dequantize kernel tiles BLOCK_NxWARPS to time alone "
                    "(run 2026-12-03-S21-dq: 32x4,64x4,64x8,128x8,16x2 all 0.77-0.81 of copy bandwidth)")
    ap.add_argument("--out", default="bench/results/gemv.json")
    ap.add_argument("--run", default="")
    a = ap.parse_args()
    import bench_kernels as bk
    import triton

    dev, date = machine("cuda"), datetime.date.today().isoformat()
    run = a.run or datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M")
    rows: list[dict] = []
    bw = bk.copy_bandwidth()
    rows.append({"kernel": "copy_bandwidth", "variant": "d2d", "bytes_per_s": round(bw), "run": run, "device": dev,
                 "date": date})

    def emit(r: dict) -> None:
        r.update(run=run, device=dev, date=date)
        rows.append(r)
        print(" ".join(f"{k}={v}" for k, v in r.items() if k not in ("device", "date")), flush=True)

    for shape in a.shapes.split(","):
        k, n = (int(v) for v in shape.split("x"))
        copies = [make_weight(n, k, "cuda") for _ in range(bk.n_copies(n * k // 2))]
        ws = [c[True] for c in copies]  # the N-major words the triton backend deploys
        q, s, z = copies[0]["stored"]
        del copies
        for m in (int(v) for v in a.ms.split(",")):
            base = {"M": m, "K": k, "N": n, "group": GROUP}
            torch.manual_seed(0)
            x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
            ref = wo.weight_only_linear_ref(x, q, s, z, None, "int4", GROUP)
            dense = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(bk.n_copies(2 * n * k))]
            cub = bk.bench_graph([lambda w=w: F.linear(x, w) for w in dense])
            del dense
            emit(dict(base, kernel="dequant_sweep/cublas_bf16", us=round(cub, 2)))
            op = torch.ops.lowbit.weight_only_linear
            err = rel_err(op(x, *ws[0], None, "int4", GROUP, "auto"), ref)
            t = bk.bench_graph([lambda w=w: op(x, *w, None, "int4", GROUP, "auto") for w in ws])
            emit(dict(base, kernel="dequant_sweep/op_default", us=round(t, 2), speedup=round(cub / t, 3),
                      rel_err=round(err, 5)))
            for bn, nw in (tuple(int(v) for v in t.split("x")) for t in a.tiles.split(",")):
                dq = torch.empty(n, k, device="cuda", dtype=torch.bfloat16)
                try:
                    t = bk.bench_graph([lambda w=w: wo._dequantize_words(*w, "int4", GROUP, k, torch.bfloat16,
                                                                         out=dq, block_n=bn, num_warps=nw)
                                        for w in ws])
                    nbytes = n * k // 2 + n * k // GROUP * 8 + 2 * n * k
                    emit(dict(base, kernel="dequant_sweep/dequant_alone", variant=f"bn{bn}w{nw}", us=round(t, 2),
                              bw_frac=round(nbytes / (t * 1e-6) / bw, 3)))
                except Exception as e:  # noqa: BLE001 - a config that fails is a row
                    emit(dict(base, kernel="dequant_sweep/dequant_alone", variant=f"bn{bn}w{nw}", error=repr(e)[:200]))
                del dq
            out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
            for rows_ in chunk_candidates(n, a.chunks):
                buf = torch.empty(rows_, k, device="cuda", dtype=torch.bfloat16)
                try:
                    y = chunked_linear(x, *ws[0], out, buf, rows_)
                    err = rel_err(y, ref)
                    t = bk.bench_graph([lambda w=w: chunked_linear(x, *w, out, buf, rows_) for w in ws])
                    emit(dict(base, kernel="dequant_sweep/chunked", variant=f"rows{rows_}", us=round(t, 2),
                              speedup=round(cub / t, 3), rel_err=round(err, 5), buffer_mib=round(rows_ * k * 2 / 2**20, 1)))
                except Exception as e:  # noqa: BLE001
                    emit(dict(base, kernel="dequant_sweep/chunked", variant=f"rows{rows_}", error=repr(e)[:200]))
                del buf
        del ws
        torch.cuda.empty_cache()
    header = {"command": "python " + " ".join(sys.argv), "date": date, "device": dev,
              "versions": {"torch": torch.__version__, "triton": triton.__version__}}
    merge_rows(Path(a.out), header, rows, key=("kernel", "variant", "M", "K", "N", "run"), replace_header=False,
               append_command=True)


if __name__ == "__main__":
    main()
