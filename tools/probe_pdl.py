"""What programmatic dependent launch (PDL) saves per kernel boundary inside a CUDA graph on this GPU.

    python tools/probe_pdl.py [--out bench/results/pdl_probe.json]      # H200: ~20 s

A chain of 64 launches in one CUDA graph; launch i streams its own weight buffer (8 MB or 1 MB of int8, like a
decode GEMV) and reads the output of launch i-1. Modes: 0 no PDL; 1 PDL with ``griddepcontrol.wait`` first; 2 PDL
with ``launch_dependents`` first and the weight tile loaded before the wait. Each mode's final output must equal
mode 0's (``same_result``). Session 14 (H200): 4.80 / 4.21 / 5.38 µs per launch at 8 MB, 2.30 / 2.05 / 1.46 at 1 MB.
"""
from __future__ import annotations

import argparse
import datetime
import json
import time

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait


@triton.jit
def _chained_gemv(x_ptr, w_ptr, o_ptr, N, K: tl.constexpr, BN: tl.constexpr, MODE: tl.constexpr):
    """``BN`` rows of an int8 ``[N, K]`` weight times the previous launch's output (its first ``K`` values)."""
    pid = tl.program_id(0)
    offs_n = pid * BN + tl.arange(0, BN)
    offs_k = tl.arange(0, K)
    if MODE == 2:
        gdc_launch_dependents()
    if MODE == 1:
        gdc_wait()
    w = tl.load(w_ptr + offs_n[:, None] * K + offs_k[None, :])
    if MODE == 2:
        gdc_wait()
    x = tl.load(x_ptr + offs_k)
    y = tl.sum(w.to(tl.float32) * x.to(tl.float32)[None, :], 1)
    tl.store(o_ptr + offs_n, (y * 1e-3).to(o_ptr.dtype.element_ty))


def run(mode: int, L: int = 64, n: int = 4096, kk: int = 128, bn: int = 16) -> tuple[float, torch.Tensor]:
    """µs per launch of a CUDA graph of ``L`` chained launches in ``mode``, and the chain's last output."""
    ws = [torch.randint(-3, 3, (n, kk), device="cuda", dtype=torch.int8) for _ in range(L)]
    xs = [torch.randn(n, device="cuda", dtype=torch.bfloat16) for _ in range(L + 1)]
    def chain() -> None:
        for i in range(L):
            _chained_gemv[(n // bn,)](xs[i], ws[i], xs[i + 1], n, K=kk, BN=bn, MODE=mode, num_warps=1,
                          launch_pdl=mode > 0)
    chain()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        chain()
        torch.cuda.synchronize()
        with torch.cuda.graph(g, stream=s):
            chain()
    g.replay()
    torch.cuda.synchronize()
    ref = xs[-1].clone()
    for _ in range(20):
        g.replay()
    torch.cuda.synchronize()
    t = time.perf_counter()
    R = 200
    for _ in range(R):
        g.replay()
    torch.cuda.synchronize()
    us = (time.perf_counter() - t) / R / L * 1e6
    return us, ref


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    rows = []
    for n in (65536, 8192):  # 8 MB and 1 MB of weights per launch
        base = None
        for mode in (0, 1, 2):
            us, ref = run(mode, n=n)
            base = ref if base is None else base
            rows.append({"kernel": "pdl_probe", "variant": f"mode{mode}", "weight_bytes": n * 128,
                         "us_per_launch": round(us, 3), "same_result": bool(torch.equal(ref, base))})
            print(rows[-1], flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"command": "python tools/probe_pdl.py", "date": datetime.date.today().isoformat(),
                       "device": f"cuda: {torch.cuda.get_device_name()}",
                       "versions": {"torch": torch.__version__, "triton": triton.__version__}, "rows": rows}, f,
                      indent=1)


if __name__ == "__main__":
    main()
