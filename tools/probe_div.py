"""Probe: is the per-element IEEE division (``div_rn``) what bounds the activation quantize, and does the
reciprocal + two FMA corrections give the same quotient bits?

    python tools/probe_div.py        # on the GPU; prints, writes nothing

(1) ``x / s`` three ways over 2**30 random pairs (x: bf16 of random sign and exponent, s: the per-row scale
``amax * fp32(1/127)`` of rows of such x): ``div_rn``, the corrected product (``q = x r; q += fma(-q, s, x) r``
twice, ``r = div_rn(1, s)``) and the plain product ``x r``; counts of quotients that differ from ``div_rn`` and of
int8 codes that differ. (2) The int8 per-token quantize of a [2048, K] bf16 activation, one row per program, with
each division: µs (CUDA-graph replays).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent))


@triton.jit
def _div(x, s, r, HOW: tl.constexpr):
    if HOW == 0:
        return tl.math.div_rn(x, tl.zeros_like(x) + s)
    if HOW == 1:
        q = x * r
        q = tl.fma(tl.fma(-q, s, x), r, q)
        q = tl.fma(tl.fma(-q, s, x), r, q)
        return tl.where(q == 0.0, x * r, q)
    return x * r


@triton.jit
def _pairs(x_ptr, s_ptr, o_ptr, n, HOW: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    x = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    s = tl.load(s_ptr + offs, mask=ok, other=1.0)
    r = tl.math.div_rn(tl.zeros_like(s) + 1.0, s)
    tl.store(o_ptr + offs, _div(x, s, r, HOW), mask=ok)


@triton.jit
def _row_q(x_ptr, q_ptr, s_ptr, K, HOW: tl.constexpr, BLOCK_K: tl.constexpr, CHUNK: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, CHUNK)
    amax = tl.zeros((CHUNK,), dtype=tl.float32)
    for c in range(0, BLOCK_K, CHUNK):
        x = tl.load(x_ptr + row * K + c + offs, mask=offs < K - c, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    s = tl.maximum(tl.max(amax, 0) * 0.007874015718698502, 1e-12)
    tl.store(s_ptr + row, s)
    r = tl.math.div_rn(1.0, s)
    for c in range(0, BLOCK_K, CHUNK):
        ok = offs < K - c
        x = tl.load(x_ptr + row * K + c + offs, mask=ok, other=0.0).to(tl.float32)
        y = _div(x, s, r, HOW)
        q = tl.clamp((y + 12582912.0) - 12582912.0, -128.0, 127.0).to(tl.int8)
        tl.store(q_ptr + row * K + c + offs, q, mask=ok)


def main() -> None:
    import bench_kernels as bk

    g = torch.Generator(device="cuda").manual_seed(0)
    n = 2 ** 26
    diff = {1: 0, 2: 0}
    cdiff = {1: 0, 2: 0}
    total = 0
    for _ in range(16):
        mant = torch.rand(n, device="cuda", generator=g) + 1.0
        ex = torch.randint(-40, 40, (n,), device="cuda", generator=g).float()
        sign = torch.randint(0, 2, (n,), device="cuda", generator=g).float() * 2 - 1
        x = (sign * mant * torch.exp2(ex)).to(torch.bfloat16)
        # a row's scale: amax over 64 neighbours times fp32(1/127), as the quantize computes it
        s = (x.float().abs().reshape(-1, 64).amax(1, keepdim=True) * 0.007874015718698502).clamp_min(1e-12)
        s = s.expand(-1, 64).reshape(-1).contiguous()
        outs = {}
        for how in (0, 1, 2):
            o = torch.empty(n, device="cuda", dtype=torch.float32)
            _pairs[(triton.cdiv(n, 1024),)](x, s, o, n, HOW=how, BLOCK=1024)
            outs[how] = o
        ref = x.float() / s
        assert torch.equal(outs[0].view(torch.int32), ref.view(torch.int32)), "div_rn differs from torch's division"
        codes = {h: torch.round(o).clamp(-128, 127) for h, o in outs.items()}
        for h in (1, 2):
            diff[h] += int((outs[h].view(torch.int32) != outs[0].view(torch.int32)).sum())
            cdiff[h] += int((codes[h] != codes[0]).sum())
        total += n
    print(f"pairs {total}: corrected product differs from div_rn in {diff[1]} quotients / {cdiff[1]} int8 codes; "
          f"plain product {diff[2]} / {cdiff[2]}", flush=True)
    for k in (4096, 11008):
        xs = [torch.randn(2048, k, device="cuda").mul_(3).to(torch.bfloat16) for _ in range(bk.n_copies(2 * 2048 * k))]
        blk = triton.next_power_of_2(k) if k <= 4096 else triton.cdiv(k, 2048) * 2048
        chunk = min(blk, 4096 if k <= 4096 else 2048)
        res = {}
        for how in (0, 1, 2):
            bufs = [(x, torch.empty(2048, k, device="cuda", dtype=torch.int8),
                     torch.empty(2048, device="cuda")) for x in xs]
            launch = lambda b, how=how: _row_q[(2048,)](b[0], b[1], b[2], k, HOW=how, BLOCK_K=blk, CHUNK=chunk,
                                                      num_warps=8 if chunk == 4096 else 4)
            launch(bufs[0])
            res[how] = bufs[0][1].clone()
            t = bk.bench_graph([lambda b=b: launch(b) for b in bufs])
            print(f"K={k} how={('div_rn', 'corrected', 'product')[how]}: {t:.2f} us, "
                  f"{2048 * k * 3 / (t * 1e-6) / 1e12:.2f} TB/s, codes equal to div_rn: {torch.equal(res[how], res[0])}",
                  flush=True)


if __name__ == "__main__":
    main()
