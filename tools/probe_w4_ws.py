"""Probe: W4A16 prefill GEMM (M = 64..2048) on the N-major int4 words with TMA tensor descriptors and Triton's
Hopper warp specialization (``tl.range(..., warp_specialize=True)``), against cuBLAS bf16, the op's current path
and a plain bf16 Triton GEMM of the same loop (the ceiling of Triton's dot here). One chunk (256 codes, two g128
groups) per loop step: a ``[32, BLOCK_N]`` word tile, the ``[BLOCK_M, 256]`` activation tile, both groups' scales
and zero points, each by one descriptor load; the codes dequantized to bf16 and one K = 256 dot.

    python tools/probe_w4_ws.py --out DIR        # on the H200; rows to DIR/probe_w4_ws.jsonl as they come
    TRITON_INTERPRET=1 python tools/probe_w4_ws.py --smoke    # CPU: the kernels against the reference
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lowbit.calibration.gptq import weight_qparams
from lowbit.ir.quant import get_qdtype, quantize
from lowbit.kernels import weight_only as wo

GROUP = 128
BF16 = os.environ.get("PROBE_BF16", "0") == "1"
XOR: tl.constexpr = tl.constexpr(-2004318072)  # 0x88888888 as int32: signed nibbles -> offset binary


@triton.jit
def _w4_ws(x_desc, w_desc, s_desc, z_desc, o_ptr, M, N, NCH, CH_SPLIT, som,
           BM: tl.constexpr, BN: tl.constexpr, STAGES: tl.constexpr, WS: tl.constexpr, ATOMIC: tl.constexpr,
           MAGIC: tl.constexpr, UPCAST: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    c_lo = pid_k * CH_SPLIT
    c_hi = tl.minimum(c_lo + CH_SPLIT, NCH)
    sh = tl.arange(0, 8) * 4
    for c in tl.range(c_lo, c_hi, num_stages=STAGES, warp_specialize=WS):
        wv = w_desc.load([c * 32, pid_n * BN]) ^ XOR
        xk = x_desc.load([pid_m * BM, c * 256])
        s = s_desc.load([c * 2, pid_n * BN])
        z = z_desc.load([c * 2, pid_n * BN]).to(tl.float32) + 8.0
        u = (wv[None, :, :] >> sh[:, None, None]) & 15  # [8, 32, BN]: code k = i*32 + j of the chunk
        if MAGIC:  # 0x4300 | u is bf16 128 + u: no int -> float conversion
            v = (u | 0x4300).to(tl.int16).to(tl.bfloat16, bitcast=True)
            v = tl.reshape(v, (2, 128, BN))
            w = (v - (z + 128.0).to(tl.bfloat16)[:, None, :]) * s.to(tl.bfloat16)[:, None, :]
        else:
            u = tl.reshape(u, (2, 128, BN))
            w = (u.to(tl.float32) - z[:, None, :]) * s[:, None, :]
        w = tl.reshape(w.to(tl.bfloat16), (256, BN))
        if UPCAST:
            acc += tl.dot(xk.to(tl.float32), w.to(tl.float32), input_precision="ieee")
        else:
            acc = tl.dot(xk, w, acc)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    ptrs = o_ptr + offs_m[:, None] * som + offs_n[None, :]
    if ATOMIC:
        tl.atomic_add(ptrs, acc, mask=mask, sem="relaxed")
    else:
        tl.store(ptrs, acc.to(tl.bfloat16), mask=mask)


@triton.jit
def _bf16_ws(x_desc, w_desc, o_ptr, M, N, NK, som, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
             STAGES: tl.constexpr, WS: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(2)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for c in tl.range(0, NK, num_stages=STAGES, warp_specialize=WS):
        acc = tl.dot(x_desc.load([pid_m * BM, c * BK]), w_desc.load([c * BK, pid_n * BN]), acc)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    tl.store(o_ptr + offs_m[:, None] * som + offs_n[None, :], acc.to(tl.bfloat16), mask=mask)


def make(n: int, k: int, device: str):
    w = torch.randn(n, k, device=device)
    s, z = weight_qparams(w, get_qdtype("int4"), False, GROUP)
    q = quantize(w, s, z, qdtype="int4", axis=1, block_size=GROUP)
    words, s2, z2 = wo.pack_words(q, s, z, "int4", GROUP, n_major=True)
    return q, s, z, words, s2, z2


def launch_w4(x, words, s2, z2, cfg, interp=False):
    m, k = x.shape
    n = words.shape[0]
    bm, bn, split = cfg["BM"], cfg["BN"], cfg["SPLIT"]
    nch = k // 256
    per = triton.cdiv(nch, split)
    xd = TensorDescriptor.from_tensor(x, [bm, 256])
    wd = TensorDescriptor.from_tensor(words.t(), [32, bn])
    sd = TensorDescriptor.from_tensor(s2.t(), [2, bn])
    zd = TensorDescriptor.from_tensor(z2.t(), [2, bn])
    atomic = split > 1
    out = torch.zeros((m, n), device=x.device, dtype=torch.float32) if atomic else torch.empty(
        (m, n), device=x.device, dtype=torch.bfloat16)
    grid = (triton.cdiv(n, bn), split, triton.cdiv(m, bm))
    _w4_ws[grid](xd, wd, sd, zd, out, m, n, nch, per, out.stride(0), BM=bm, BN=bn, STAGES=cfg["ST"], WS=cfg["WS"],
                 ATOMIC=atomic, MAGIC=cfg["MAGIC"], UPCAST=interp, num_warps=cfg["W"])
    return out.to(torch.bfloat16) if atomic else out


def launch_bf16(x, wt, cfg):
    m, k = x.shape
    n = wt.shape[1]
    bm, bn, bk = cfg["BM"], cfg["BN"], cfg["BK"]
    out = torch.empty((m, n), device=x.device, dtype=torch.bfloat16)
    xd = TensorDescriptor.from_tensor(x, [bm, bk])
    wd = TensorDescriptor.from_tensor(wt, [bk, bn])
    _bf16_ws[(triton.cdiv(n, bn), 1, triton.cdiv(m, bm))](xd, wd, out, m, n, k // bk, out.stride(0), BM=bm, BN=bn,
                                                          BK=bk, STAGES=cfg["ST"], WS=cfg["WS"], num_warps=cfg["W"])
    return out


def w4_configs() -> list[dict]:
    out = []
    for bm, bn, st, ws, split, magic in itertools.product((64, 128), (64, 128), (2, 3), (False, True), (1, 2, 4),
                                                          (False, True)):
        if (magic and (split > 1 or st == 3 or ws)) or (ws and (split == 4 or bm == 128)) or (bm == 128 and st == 3):
            continue
        out.append({"BM": bm, "BN": bn, "ST": st, "WS": ws, "SPLIT": split, "MAGIC": magic, "W": 4 if ws else 8})
    return out


def bf16_configs() -> list[dict]:
    return [{"BM": bm, "BN": bn, "BK": 64, "ST": st, "WS": ws, "W": 4 if ws else 8}
            for bm, bn, st, ws in itertools.product((64, 128), (128, 256), (3, 4), (False, True))
            if not ws or (bm == 64 and bn == 128)]  # the other WS tiles crashed or hung Triton 3.6's compiler


def name(cfg: dict) -> str:
    return "_".join(f"{k}{int(v) if isinstance(v, bool) else v}" for k, v in cfg.items())


def all_configs() -> list[tuple[str, dict]]:
    return [("w4", c) for c in w4_configs()] + ([("bf16", c) for c in bf16_configs()] if BF16 else [])


def smoke() -> None:
    torch.manual_seed(0)
    q, s, z, words, s2, z2 = make(128, 512, "cpu")
    x = torch.randn(64, 512, dtype=torch.bfloat16)
    ref = F.linear(x.float(), wo.dequantize_weight(q, s, z, "int4", GROUP, 512, torch.bfloat16).float())
    for cfg in ({"BM": 64, "BN": 64, "ST": 2, "WS": False, "SPLIT": 1, "MAGIC": False, "W": 4},
                {"BM": 64, "BN": 64, "ST": 2, "WS": True, "SPLIT": 2, "MAGIC": False, "W": 4},
                {"BM": 64, "BN": 64, "ST": 2, "WS": False, "SPLIT": 1, "MAGIC": True, "W": 4}):
        y = launch_w4(x, words, s2, z2, cfg, interp=True).float()
        print(name(cfg), "rel err", ((y - ref).norm() / ref.norm()).item())


def warm_one(idx: int, ok_dir: Path) -> None:
    """Compile one config at a small shape (a compiler crash or hang costs only this process)."""
    kind, cfg = all_configs()[idx]
    tag = f"{kind}_{name(cfg)}"
    try:
        for k in (4096, 11008):  # both K's specializations (11008 / 256 chunks is not a multiple of 16)
            _q, _s, _z, words, s2, z2 = make(1024, k, "cuda")
            x = torch.randn(128, k, device="cuda", dtype=torch.bfloat16)
            wt = torch.randn(k, 1024, device="cuda", dtype=torch.bfloat16)
            if kind == "w4":
                launch_w4(x, words, s2, z2, cfg)
            else:
                launch_bf16(x, wt, cfg)
            torch.cuda.synchronize()
        (ok_dir / f"{tag}.ok").write_text("")
    except Exception as e:  # noqa: BLE001
        (ok_dir / f"{tag}.err").write_text(repr(e)[:400])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="/tmp/probe")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--warm", default="")
    ap.add_argument("--ms", default="128")
    ap.add_argument("--shapes", default="4096x11008,11008x4096")
    ap.add_argument("--budget-s", type=float, default=200)
    args = ap.parse_args()
    if args.smoke:
        return smoke()
    out = Path(args.out)
    ok_dir = out / "ok"
    ok_dir.mkdir(parents=True, exist_ok=True)
    if args.warm:
        return warm_one(int(args.warm), ok_dir)
    t0 = time.time()
    from concurrent.futures import ThreadPoolExecutor

    def one(i: int) -> None:
        try:
            subprocess.run([sys.executable, __file__, "--out", str(out), "--warm", str(i)], check=False, timeout=45,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            kind, cfg = all_configs()[i]
            (ok_dir / f"{kind}_{name(cfg)}.err").write_text("compile timeout (45 s)")
    with ThreadPoolExecutor(14) as pool:
        list(pool.map(one, range(len(all_configs()))))
    rows = out / "probe_w4_ws.jsonl"
    f = rows.open("a")

    def emit(r: dict) -> None:
        r.update(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__)
        f.write(json.dumps(r) + "\n")
        f.flush()
        print(json.dumps(r), flush=True)

    emit({"kind": "warm", "seconds": round(time.time() - t0, 1),
              "ok": len(list(ok_dir.glob("*.ok"))), "err": len(list(ok_dir.glob("*.err"))),
              "crashed": [f"{k}_{name(c)}" for k, c in all_configs() if not (ok_dir / f"{k}_{name(c)}.ok").exists()
                       and not (ok_dir / f"{k}_{name(c)}.err").exists()]})
    for p in ok_dir.glob("*.err"):
        emit({"kind": "compile_error", "cfg": p.stem, "error": p.read_text()[:300]})
    from bench_kernels import bench_graph, n_copies
    for shape in args.shapes.split(","):
        k, n = map(int, shape.split("x"))
        copies = [make(n, k, "cuda") for _ in range(n_copies(n * k // 2))]
        dense = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(n_copies(2 * n * k))]
        dense_t = [d.t().contiguous() for d in dense[:2]]
        for m in map(int, args.ms.split(",")):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            q, s, z, words, s2, z2 = copies[0]
            ref = F.linear(x.float(), wo.dequantize_weight(q, s, z, "int4", GROUP, k, torch.bfloat16).float())
            base = {"M": m, "K": k, "N": n}
            cub = bench_graph([lambda d=d: F.linear(x, d) for d in dense])
            emit(dict(base, kind="cublas_bf16", us=round(cub, 2)))
            op = torch.ops.lowbit.weight_only_linear
            t = bench_graph([lambda c=c: op(x, c[3], c[4], c[5], None, "int4", GROUP, "auto") for c in copies])
            emit(dict(base, kind="op_auto", us=round(t, 2), x=round(cub / t, 3)))
            for cfg in bf16_configs():
                if not (ok_dir / f"bf16_{name(cfg)}.ok").exists() or time.time() - t0 > args.budget_s:
                    continue
                try:
                    t = bench_graph([lambda d=d: launch_bf16(x, d, cfg) for d in dense_t])
                    emit(dict(base, kind="triton_bf16", cfg=name(cfg), us=round(t, 2), x=round(cub / t, 3)))
                except Exception as e:  # noqa: BLE001
                    emit(dict(base, kind="triton_bf16", cfg=name(cfg), error=repr(e)[:200]))
            for cfg in w4_configs():
                if not (ok_dir / f"w4_{name(cfg)}.ok").exists() or time.time() - t0 > args.budget_s:
                    continue
                try:
                    y = launch_w4(x, words, s2, z2, cfg).float()
                    err = ((y - ref).norm() / ref.norm()).item()
                    t = bench_graph([lambda c=c: launch_w4(x, c[3], c[4], c[5], cfg) for c in copies])
                    emit(dict(base, kind="w4_ws", cfg=name(cfg), us=round(t, 2), x=round(cub / t, 3),
                              rel_err=round(err, 5)))
                except Exception as e:  # noqa: BLE001
                    emit(dict(base, kind="w4_ws", cfg=name(cfg), error=repr(e)[:200]))
    f.close()


if __name__ == "__main__":
    main()
