"""The per-token activation quantize alone (the part of the W8A8 / FP8 op that is not the GEMM): the op's launch
against other launches of its one-row kernel.

    python tools/bench_act_quant.py [--ms 2048] [--ks 4096,11008] [--out bench/results/a8_gemm.json] [--run LABEL]

Per (M, K, qdtype): ``op`` (``torch.ops.lowbit.quantize_activation`` as the A8 op calls it), ``row/<BLOCK_K>w<warps>``
(``_act_quant_kernel``, one row per program, whole or chunked). Every launch's codes and scales are compared with
the op's (bit-identical or the row says ``wrong``). Run 2026-12-03-S21-aq also timed a split form (partial amaxes
over ``[ROWS, BLOCK_K]`` tiles by many programs, then scales and codes: two launches): 40-99 µs at K = 11008
against the op's 39.3 (int8), never faster; it was removed. Times: CUDA-graph replays over activation copies spanning ~2x
L2 (``bench_kernels.bench_graph``), medians; ``bw_frac`` = bytes read and written (x once, codes, scales) over
the copy bandwidth. Rows ``kernel = act_quant_sweep/<what>`` merge into ``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_io import machine, merge_rows

from lowbit.kernels import act_quant as aq

ROWS = [(2048, 4), (2048, 8), (1024, 4), (4096, 8), (4096, 4)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ms", default="2048")
    ap.add_argument("--ks", default="4096,11008")
    ap.add_argument("--qdtypes", default="int8,fp8e4m3")
    ap.add_argument("--out", default="bench/results/a8_gemm.json")
    ap.add_argument("--run", default="")
    a = ap.parse_args()
    import bench_kernels as bk
    import triton

    dev, date = machine("cuda"), datetime.date.today().isoformat()
    run = a.run or datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M")
    bw = bk.copy_bandwidth()
    rows: list[dict] = [{"kernel": "copy_bandwidth", "bytes_per_s": round(bw), "run": run, "device": dev,
                         "date": date}]

    def emit(r: dict) -> None:
        r.update(run=run, device=dev, date=date)
        rows.append(r)
        print(" ".join(f"{k}={v}" for k, v in r.items() if k not in ("device", "date", "run")), flush=True)

    for m in (int(v) for v in a.ms.split(",")):
        for k in (int(v) for v in a.ks.split(",")):
            xs = [torch.randn(m, k, device="cuda").mul_(3).to(torch.bfloat16) for _ in range(bk.n_copies(2 * m * k))]
            nbytes = m * k * 3 + m * 4
            for qd in a.qdtypes.split(","):
                base = {"M": m, "K": k, "N": 0, "qdtype": qd}
                q0, s0 = torch.ops.lowbit.quantize_activation(xs[0], qd, 0)
                t = bk.bench_graph([lambda x=x: torch.ops.lowbit.quantize_activation(x, qd, 0) for x in xs])
                qr, sr = aq.quantize_activation_ref(xs[0], qd, 0)
                exact = torch.equal(q0.view(torch.int8), qr.view(torch.int8)) and torch.equal(s0, sr)
                emit(dict(base, kernel="act_quant_sweep/op", config=f"op/{qd}", us=round(t, 2),
                          bw_frac=round(nbytes / (t * 1e-6) / bw, 3), equals_reference=exact))

                def variant(name: str, fn) -> None:
                    try:
                        x2, q, s, meta = aq.row_quant_setup(xs[0], qd, 0, "bench")
                        fn(x2, q, s, meta)
                        same = torch.equal(q.view(torch.int8), q0.view(torch.int8)) and torch.equal(s, s0)
                        bufs = [aq.row_quant_setup(x, qd, 0, "bench") for x in xs]
                        t = bk.bench_graph([lambda b=b: fn(*b) for b in bufs])
                        emit(dict(base, kernel="act_quant_sweep/" + name.split("/")[0], config=f"{name}/{qd}", us=round(t, 2),
                                  bw_frac=round(nbytes / (t * 1e-6) / bw, 3), **({} if same else {"wrong": True})))
                    except Exception as e:  # noqa: BLE001 - a launch that fails is a row
                        emit(dict(base, kernel="act_quant_sweep/" + name.split("/")[0], config=f"{name}/{qd}",
                                  error=repr(e)[:200]))

                for blk, w in ROWS:
                    def row(x2, q, s, meta, blk=blk, w=w):
                        whole = blk >= k
                        aq._act_quant_kernel[(x2.shape[0],)](
                            x2, q, s, s, k, x2.stride(0), q.stride(0), s.stride(0), QMAX=meta["QMAX"],
                            RCP=meta["RCP"], IS_FP8=meta["IS_FP8"], GROUP=0, BLOCK_K=aq.next_pow2(k) if whole else blk,
                            CHUNKED=not whole, eps=0.0, NQ=0, NQP=1, IS_BF16=False, PDL=False, num_warps=w)
                    variant(f"row/{blk}w{w}", row)
            del xs
    header = {"command": "python " + " ".join(sys.argv), "date": date, "device": dev,
              "versions": {"torch": torch.__version__, "triton": triton.__version__}}
    merge_rows(Path(a.out), header, rows, key=("run", "kernel", "M", "K", "N", "config"),
               replace_header=False, append_command=True)


if __name__ == "__main__":
    main()
