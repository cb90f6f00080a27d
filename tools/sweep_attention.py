"""Quick H200 sweep of decode-attention launches (issue 18), self-checking: every launch is compared with
``decode_attention_reference`` on a slice first (2 sequences, <= 4K tokens), then timed beside bf16 SDPA in the
same process, both with ``triton.testing.do_bench`` (L2 flushed; host launch overhead shows at small shapes) and
as a CUDA graph of 20 calls (GPU time only). One JSON line per row on stdout and in ``--out``.

    PYTHONUNBUFFERED=1 python tools/sweep_attention.py --out $OUT/sweep.jsonl --budget 270
    TRITON_INTERPRET=1 python tools/sweep_attention.py --smoke   # checks the script on CPU
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LAYOUT = {"int8": (8, 32, 32, 32), "int4": (4, 32, 32, 32), "int2": (2, 32, 16, 64)}
"""name -> (bits, k_block, v_group, window), as tools/bench_attention.py."""

V3 = [{"variant": "v3"}, {"variant": "v3", "maxnreg": 128}, {"variant": "v3", "st": False, "num_warps": 4},
      {"variant": "v3", "blocks": 1}, {"variant": "v3", "blocks": 2}, {"variant": "v3", "st": False, "vt": True},
      {"variant": "v3", "num_stages": 2}, {"variant": "v3", "asm": False},
      {"variant": "v3", "waves": 4}, {"variant": "v3", "waves": 16}, {"variant": "v3", "natural": True},
      {"variant": "v3", "asm": 2}, {"variant": "v3", "st": False, "vt": True, "num_warps": 4},
      {"variant": "v3", "num_stages": 2, "maxnreg": 128}, {"variant": "v3", "num_warps": 4}]

SHAPES = [  # (batch, q heads, kv heads, context, kinds, launches; {} = DEFAULT_CONFIG) in priority order
    (16, 32, 8, 32768, ["int4", "int2"], [{}, V3[0], V3[1], V3[6], V3[13]]),
    (16, 32, 32, 32768, ["int4", "int2", "int8"], [{}, V3[0], V3[1]]),
    (1, 32, 8, 4096, ["int4"], [{}, V3[0]]),
    (1, 32, 32, 4096, ["int4"], [{}, V3[0]]),
    (1, 32, 8, 32768, ["int4"], [{}, V3[0]]),
    (1, 32, 32, 32768, ["int4"], [{}, V3[0]]),
    (1, 32, 32, 768, ["int4"], [{}, V3[0], {"split": 64}, {"split": 128}, V3[3], V3[8]]),
    (16, 32, 32, 768, ["int4"], [{}, V3[0], V3[8], V3[9]]),
    "step",
    (16, 32, 8, 32768, ["int4"], V3[3:] + [{"variant": "v2", "heads": 2}, {"variant": "v2", "heads": 1}]),
    (16, 32, 32, 32768, ["int4"], V3[2:7] + V3[10:]),
    (1, 32, 32, 768, ["int4"], [V3[1], V3[13]]),
    (16, 32, 8, 32768, ["int2"], V3[3:6] + V3[10:]),
    (16, 32, 8, 32768, ["int8"], [{}, V3[0], V3[1]]),
]


def _graph_us(fn, n: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(n):
            fn()
    flush = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")
    times = []
    for _ in range(5):
        flush.zero_()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        g.replay()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e) * 1000 / n)
    return sorted(times)[len(times) // 2]


def _times(fn, dev: str) -> dict:
    if dev != "cuda":
        t = time.perf_counter()
        fn()
        return {"us": round((time.perf_counter() - t) * 1e6, 1)}
    import triton.testing

    return {"us": round(triton.testing.do_bench(fn, warmup=10, rep=40) * 1000, 1), "graph_us": round(_graph_us(fn), 1)}


def run_shape(b, hq, hkv, s, d, kinds, configs, dev, deadline, emit):
    from lowbit.kernels import decode_attention as da

    base = {"batch": b, "heads": hq, "kv_heads": hkv, "context": s}
    torch.manual_seed(0)
    q = torch.randn(b, hq, d, device=dev, dtype=torch.bfloat16)
    k = torch.randn(b, hkv, s, d, device=dev, dtype=torch.bfloat16)
    v = torch.randn(b, hkv, s, d, device=dev, dtype=torch.bfloat16)
    try:
        t = _times(lambda: torch.nn.functional.scaled_dot_product_attention(q[:, :, None], k, v,
                                                                            enable_gqa=hq != hkv), dev)
        sdpa = t
        emit({**base, "kernel": "sdpa-bf16", **t})
    except Exception as exc:  # noqa: BLE001
        sdpa = {}
        emit({**base, "kernel": "sdpa-bf16", "error": f"{type(exc).__name__}: {exc}"[:300]})
    for name in kinds:
        bits, k_block, v_group, window = LAYOUT[name]
        kc, ks, kz = da.quantize_keys(k, bits, k_block)
        vc, vs, vz = da.quantize_values(v, bits, v_group)
        ks, vs = ks.half(), vs.half()
        kf = torch.cat([k[:, :, :1], k[:, :, -window:]], 2)
        vf = torch.cat([v[:, :, :1], v[:, :, -window:]], 2)
        fvalid = torch.ones(b, window + 1, dtype=torch.bool, device=dev)
        lo = torch.ones(b, dtype=torch.int32, device=dev)
        hi = torch.full((b,), s - window, dtype=torch.int32, device=dev)
        args = (q, kc, ks, kz, vc, vs, vz)
        kw = dict(bits=bits, lo=lo, hi=hi, k_float=kf, v_float=vf, float_valid=fvalid)
        sub_n, sb = min(4096, s), min(2, b)
        nb = sub_n // k_block
        sub = (q[:sb], kc[:sb, :, :sub_n], ks[:sb, :, :nb], kz[:sb, :, :nb], vc[:sb, :, :sub_n], vs[:sb, :, :sub_n],
               vz[:sb, :, :sub_n])
        skw = dict(bits=bits, lo=lo[:sb], hi=torch.full((sb,), sub_n - window, device=dev, dtype=torch.int32),
                   k_float=kf[:sb], v_float=vf[:sb], float_valid=fvalid[:sb])
        ref = da.decode_attention_reference(*sub, **skw)
        for cfg in configs:
            row = {**base, "kernel": name, "config": ",".join(f"{a}={c}" for a, c in cfg.items()) or "default"}
            if time.perf_counter() > deadline:
                emit({**row, "error": "skipped: budget"})
                continue
            try:
                err = float((da.decode_attention(*sub, **cfg, **skw) - ref).abs().max())
                row["err"] = round(err, 7)
                if err > 2e-3:
                    raise RuntimeError(f"max abs err {err:.3g} vs the reference")
                t = _times(lambda cfg=cfg: da.decode_attention(*args, **cfg, **kw), dev)
                row.update(t)
                for key in ("us", "graph_us"):
                    if key in t and key in sdpa:
                        row["x_" + key] = round(sdpa[key] / t[key], 2)
            except Exception as exc:  # noqa: BLE001 - a failing launch is a row
                row["error"] = f"{type(exc).__name__}: {exc}"[:300]
            emit(row)
        del kc, ks, kz, vc, vs, vz
    if dev == "cuda":
        torch.cuda.empty_cache()


def run_step_parts(b: int, hq: int, hkv: int, ctx: int, d: int, emit, dev: str = "cuda", slots: int = 1024) -> None:
    """GPU time (CUDA graph) of a generation decode step's cache attention at ``ctx`` tokens, by part: the cache
    write (``cache_update``), the float candidates, the kernel, and ``cache_attention_decode`` whole (kv4)."""
    from lowbit.ir import kvcache as kv
    from lowbit.kernels import decode_attention as da

    bits, k_block, v_group, window = LAYOUT["int4"]
    sink = 1
    kw = dict(bits=bits, k_block=k_block, v_group=v_group, window=window, sink=sink)
    cache = kv.empty_cache(kv.cache_layout(b, hkv, slots, d, scale_dtype=torch.float16, **kw), dev)
    q = torch.randn(b, hq, 1, d, device=dev, dtype=torch.bfloat16)
    k = torch.randn(b, hkv, 1, d, device=dev, dtype=torch.bfloat16)
    v = torch.randn(b, hkv, 1, d, device=dev, dtype=torch.bfloat16)
    pos = torch.full((b, 1), ctx, device=dev, dtype=torch.long)
    kb16 = torch.randn(b, hkv, ctx, d, device=dev, dtype=torch.bfloat16)
    vb16 = torch.randn(b, hkv, ctx, d, device=dev, dtype=torch.bfloat16)
    new = kv.cache_update(k, v, pos, cache, **kw)
    kf, vf, fm = kv.float_candidates(k.float(), v.float(), pos, cache[6], cache[7], window=window, sink=sink)
    p32 = pos[:, 0].to(torch.int32)
    lo = torch.full_like(p32, sink)
    hi = torch.clamp(p32 - window + 1, min=sink)
    parts = {
        "cache_update": lambda: kv.cache_update(k, v, pos, cache, **kw),
        "float_candidates": lambda: kv.float_candidates(k.float(), v.float(), pos, cache[6], cache[7],
                                                        window=window, sink=sink),
        "decode_attention": lambda: da.decode_attention(q[:, :, 0], *new[:6], bits=bits, lo=lo, hi=hi, k_float=kf,
                                                        v_float=vf, float_valid=fm[:, 0]),
        "decode_attention_v3": lambda: da.decode_attention(q[:, :, 0], *new[:6], bits=bits, lo=lo, hi=hi,
                                                           k_float=kf, v_float=vf, float_valid=fm[:, 0],
                                                           variant="v3"),
        "cache_attention_decode": lambda: da.cache_attention_decode(q, k, v, pos, *cache, **kw),
        "sdpa-bf16": lambda: torch.nn.functional.scaled_dot_product_attention(q, kb16, vb16, enable_gqa=hq != hkv),
    }
    for name, fn in parts.items():
        row = {"step_part": name, "batch": b, "heads": hq, "kv_heads": hkv, "context": ctx}
        try:
            row.update(_times(fn, dev))
        except Exception as exc:  # noqa: BLE001
            row["error"] = f"{type(exc).__name__}: {exc}"[:300]
        emit(row)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--budget", type=float, default=270)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--only", default="", help="comma-separated shape indices into SHAPES")
    a = ap.parse_args()
    deadline = time.perf_counter() + a.budget
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    out = open(a.out, "a") if a.out else None

    def emit(row):
        line = json.dumps(row)
        print(line, flush=True)
        if out:
            out.write(line + "\n")
            out.flush()

    if a.smoke:
        shapes, d = [(2, 8, 2, 256, ["int4", "int2"], [{}, V3[0], {"variant": "v3", "asm": False}]),
                     (1, 4, 4, 128, ["int8"], [V3[0]])], 64
    else:
        shapes, d = SHAPES, 128
        if a.only:
            shapes = [SHAPES[int(i)] for i in a.only.split(",")]
    import triton

    emit({"device": torch.cuda.get_device_name() if dev == "cuda" else "cpu", "torch": torch.__version__,
          "triton": triton.__version__})
    for shape in shapes:
        if shape == "step":
            for b in (1, 16) if dev == "cuda" and time.perf_counter() < deadline else ():
                try:
                    run_step_parts(b, 32, 32, 768, 128, emit)
                except Exception as exc:  # noqa: BLE001
                    emit({"step_part": "setup", "batch": b, "error": f"{type(exc).__name__}: {exc}"[:300]})
            continue
        b, hq, hkv, s, kinds, configs = shape
        if time.perf_counter() > deadline:
            emit({"batch": b, "heads": hq, "kv_heads": hkv, "context": s, "error": "skipped: budget"})
            continue
        try:
            run_shape(b, hq, hkv, s, d, kinds, configs, dev, deadline, emit)
        except Exception as exc:  # noqa: BLE001
            emit({"batch": b, "heads": hq, "kv_heads": hkv, "context": s, "error": f"{type(exc).__name__}: {exc}"[:300]})


if __name__ == "__main__":
    main()
