"""Decode attention over lowbit's packed KV cache vs bf16 SDPA, side by side in one run -> bench/results/attention.json.

For every shape (batch x query heads / kv heads x context): ``F.scaled_dot_product_attention`` over a bf16 cache
(one query token per sequence, ``enable_gqa`` for grouped heads), then ``lowbit.kernels.decode_attention`` over
int8 / int4 / int2 caches of the same keys and values (keys per channel over 32-token blocks, values per token
over groups of 32 (int8/int4) or 16 (int2) channels, the sink and the recent window float, as the ``kv`` recipes
keep them). Each kernel config is first checked against ``decode_attention_reference`` on a slice (2 sequences,
4K tokens: ``max_abs_err_vs_reference``), then timed with ``triton.testing.do_bench`` (which clears the L2 between
runs) or, with ``--graph``, as a CUDA graph of 20 calls. A config that fails becomes a row with ``error``.

    python tools/bench_attention.py --out $OUT/attention.json                  # the H200 sweep (--budget s)
    TRITON_INTERPRET=1 python tools/bench_attention.py --smoke                 # checks the script on CPU

``--sweep`` names the config list tried at the sweep shapes (``SWEEPS``); other shapes run the default launch.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from kv_cache_operands import kivi_cache_operands  # noqa: E402
from results_io import machine, merge_rows  # noqa: E402
from results_io import versions as results_versions

OUT = ROOT / "bench" / "results" / "attention.json"

BITS = {"int8": (8, 32, 32, 32), "int4": (4, 32, 32, 32), "int2": (2, 32, 16, 64)}
"""name -> (bits, k_block, v_group, window): the kv8 / kv4 / kv2 recipes' layouts."""

SWEEPS = {
    "none": [],
    "s14": [  # v4 / v3 (row tiles; Triton 3.6 offline: MHA int4 v2 5.17 instructions per code, v3 4.79, v4 3.96)
        {"variant": "v4"},
        {"variant": "v3"},
        {"variant": "v4", "heads": 2},  # GQA: 164 registers (12 warps per SM), no spills; 4 heads: 255, 48 B
        {"variant": "v4", "num_warps": 2},  # MHA int4 95 registers, 4.45 per code; GQA 4 heads 243, no spills
    ],
    "s19": [  # v4's launch knobs no sweep has moved: pipeline stages and the split's chunk length (default 2048
        # tokens at batch 16 x 32 kv heads x 32K: 8192 programs)
        {"variant": "v4", "num_stages": 2},
        {"variant": "v4", "num_stages": 3},
        {"variant": "v4", "split": 4096},
        {"variant": "v4", "split": 1024},
        {"variant": "v4", "split": 8192},
        {"variant": "v4", "num_stages": 4},
        {"variant": "v4", "num_warps": 2, "num_stages": 3},
        {"variant": "v4", "num_warps": 2, "split": 4096},
    ],
    "s19b": [  # the same call's follow-up (run s19b): shorter chunks around s19's winner
        {"variant": "v4", "split": 512},
        {"variant": "v4", "split": 256},
        {"variant": "v4", "split": 1024, "num_stages": 2},
        {"variant": "v4", "split": 512, "num_warps": 2},
    ],
    "s20": [  # 32-channel chunks (int4/int8): 4 lanes share a token row instead of 8, so each lane's softmax,
        # shuffle-reduce and p * scale work per token covers twice the codes; int2's 16-channel value groups cap
        # its chunk at 16, so int2 rows repeat the default launch
        {"variant": "v4", "split": 1024, "num_stages": 2},  # session 19's best, for the same-run comparison
        {"variant": "v4", "chunk": 32},
        {"variant": "v4", "chunk": 32, "num_stages": 2},
        {"variant": "v4", "chunk": 32, "split": 512},
        {"variant": "v4", "chunk": 32, "split": 2048},
        {"variant": "v4", "chunk": 32, "num_warps": 2},
        {"variant": "v4", "chunk": 32, "num_warps": 2, "num_stages": 2},
        {"variant": "v4", "chunk": 32, "heads": 2},  # GQA only
        {"variant": "v4", "chunk": 32, "heads": 1},  # GQA only
    ],
    "s23": [  # batch-1 / short grids (session 23, CUDA-graph timing): the default split targets 16 programs per SM,
        # which at 1 x 8 kv heads x 32K makes 128-token chunks and a 256-row merge per head
        {"reduce_chunks": 512},  # every chunk in one tile (the merge before session 23)
        {"reduce_chunks": 128},
        {"reduce_chunks": 128, "reduce_warps": 8},
        {"reduce_chunks": 64, "reduce_warps": 8},
        {"reduce_chunks": 32, "reduce_warps": 8},
        {"split": 128, "reduce_chunks": 128, "reduce_warps": 8},
        {"split": 256, "reduce_chunks": 128, "reduce_warps": 8},
        {"split": 256, "reduce_chunks": 128},
        {"split": 512, "reduce_chunks": 128, "reduce_warps": 8},
        {"heads": 2, "split": 128, "reduce_chunks": 128, "reduce_warps": 8},
        {"heads": 2, "reduce_chunks": 128, "reduce_warps": 8},
    ],
    "s23w": [  # warps per program at small grids: int2 without GQA runs on 2 (V4_INT2_MHA_WARPS, from 16 x 32K),
        # the rest on 1; a batch-1 program is latency-bound (~3.4 us per 32-token block at 4 GQA heads, one warp)
        {"num_warps": 1},
        {"num_warps": 2},
        {"num_warps": 4},
        {"heads": 2},  # GQA only: twice the programs, each code unpacked for 2 heads instead of 4
        {"heads": 1},
        {"heads": 2, "num_warps": 2},
    ],
    "s24": [  # v4's unmasked interior blocks and per-block pointer tiles (session 24; Triton 3.6 offline, MHA int4:
        # session 23's loop 3.96 instructions per code at 96 registers; interior loop now 3.31 at 128, 3.33 at a
        # cap of 104, 3.34 at 96; the masked edge loop 3.69; int2 3.86 -> 3.23 at 96)
        {"variant": "v4", "interior": True},
        {"variant": "v4", "interior": False},
        {"variant": "v4", "interior": True, "maxnreg": 104},
        {"variant": "v4", "interior": True, "maxnreg": 96},
    ],
    "s48": [  # int2's instructions per code (session 48; Triton 3.6 offline, interior loop, MHA): on 2 warps (int2's
        # launch from 4 key blocks a chunk) warp_blocks gives each warp key blocks of its own (3.75 -> 3.24 per
        # code); raw_scores takes the zero-point dot and the 2**49 once per block (int2 3.24 -> 3.15 on 2 warps, 3.23
        # -> 3.16 on 1; int4 3.31 -> 3.25 at 101 registers instead of 128). H100 (session 48, before warp_blocks was
        # turned off by default and put here): 16 x 32 x 32K default 760.7 us, raw 753.9, 1 warp 666.9, 1 warp + raw
        # 659.1 (4.21x SDPA)
        {"warp_blocks": True},
        {"raw_scores": True},
        {"num_warps": 1},  # int2 on one warp: the per-block work of warp_blocks, half the warps a program
        {"num_warps": 1, "raw_scores": True},
        {"warp_blocks": True, "raw_scores": True},
    ],
    "final": [  # most informative first: the budget may cut the tail
        {"variant": "v1"},  # v1 at its best launch of last session (32-token steps, 16-channel chunks)
        {"variant": "v2", "heads": 1},  # GQA: one query head per program (the kv tiles re-read from L2)
        {"variant": "v2", "num_warps": 4},  # 79 registers, 6.2 (3.6: 7.5) instructions per code
        {"variant": "v1", "block_n": 16, "chunk": 8},  # v1's launch of round 1
        {"variant": "v2", "num_warps": 2},
        {"variant": "v2", "heads": 2},
    ],
    "round1": [
        {"variant": "v1"},
        {"variant": "v2", "vchain": False},
        {"variant": "v2", "chunk": 32},
        {"variant": "v2", "num_warps": 2},
        {"variant": "v2", "num_warps": 4, "chunk": 32},
        {"variant": "v2", "split": 512},
        {"variant": "v2", "heads": 1},
        {"variant": "v2", "heads": 2},
    ],
}
"""Extra launches tried at the sweep shapes (beside ``DEFAULT_CONFIG``); ``heads`` only matters for GQA shapes."""


def _time_us(fn, dev: str, graph: bool) -> float:
    if dev != "cuda":  # the interpreter smoke run: one timed call
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e6
    import triton.testing

    if not graph:
        return triton.testing.do_bench(fn, warmup=10, rep=50) * 1000
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(20):
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
        times.append(s.elapsed_time(e) * 1000 / 20)
    return sorted(times)[len(times) // 2]


def _label(cfg: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in cfg.items()) or "default"


def bench_shape(b: int, hq: int, hkv: int, s: int, d: int, dev: str, sweep: list[dict], kinds: list[str],
                scale_dtypes: list[torch.dtype], graph: bool, deadline: float, default: bool = True,
                scale_kinds: tuple[str, ...] = ("int4",)) -> list[dict]:
    """Rows of one shape: SDPA bf16, then every (bits, scale dtype, config): the default launch (unless
    ``default`` is False: a second pass) and the ``sweep``'s configs on the first scale dtype."""
    from lowbit.kernels import decode_attention as da

    base = {"area": "decode-attention", "batch": b, "heads": hq, "kv_heads": hkv, "head_dim": d, "context": s}
    if graph:  # device time of 20 replayed calls; do_bench rows (no "timing") include the Python launch path
        base["timing"] = "cuda-graph"
    rows: list[dict] = []
    torch.manual_seed(0)
    q = torch.randn(b, hq, d, device=dev, dtype=torch.bfloat16)
    k = torch.randn(b, hkv, s, d, device=dev, dtype=torch.bfloat16)
    v = torch.randn(b, hkv, s, d, device=dev, dtype=torch.bfloat16)
    kv_bytes = 2 * k.numel() * 2
    copy_us = _time_us(lambda: k.clone(), dev, False)
    copy_bw = 2 * k.numel() * 2 / (copy_us * 1e-6)

    def sdpa():
        return torch.nn.functional.scaled_dot_product_attention(q[:, :, None], k, v, enable_gqa=hq != hkv)

    try:
        sdpa_us = _time_us(sdpa, dev, graph)
        rows.append({**base, "kernel": "sdpa-bf16", "config": "default" if default else "default (sweep pass)",
                     "us": round(sdpa_us, 1), "bytes": kv_bytes,
                     "eff_bw_frac": round(kv_bytes / (sdpa_us * 1e-6) / copy_bw, 3),
                     "copy_bw_gbs": round(copy_bw / 1e9, 1)})
    except Exception as exc:  # noqa: BLE001 - reported in the row
        sdpa_us = None
        rows.append({**base, "kernel": "sdpa-bf16", "config": "default", "error": f"{type(exc).__name__}: {exc}"[:300]})
    print(rows[-1], flush=True)
    for name in kinds:
        bits, k_block, v_group, window = BITS[name]
        try:
            kc, ks32, kz = da.quantize_keys(k, bits, k_block)
            vc, vs32, vz = da.quantize_values(v, bits, v_group)
        except Exception as exc:  # noqa: BLE001
            rows.append({**base, "kernel": f"lowbit-{name}-cache", "error": f"quantize: {type(exc).__name__}: {exc}"[:300]})
            print(rows[-1], flush=True)
            continue
        for scale_dtype in scale_dtypes if name in scale_kinds else scale_dtypes[:1]:
            ks, vs = ks32.to(scale_dtype), vs32.to(scale_dtype)
            args, kw, sub, skw = kivi_cache_operands(q, k, v, (kc, ks, kz, vc, vs, vz), bits, k_block, window)
            ref = da.decode_attention_reference(*sub, **skw)
            qbytes = sum(t.numel() * t.element_size() for t in (kc, ks, kz, vc, vs, vz))
            sname = "scales-" + str(scale_dtype).removeprefix("torch.")
            tried = sweep if scale_dtype is scale_dtypes[0] else []  # other scale dtypes: the default launch
            for cfg in [{}] * default + [c for c in tried if not ("heads" in c and hq == hkv)]:
                row = {**base, "kernel": f"lowbit-{name}-cache", "scheme": sname, "config": _label(cfg),
                       "k_block": k_block, "v_group": v_group, "window": window, "bytes": qbytes}
                if time.perf_counter() > deadline:
                    row["error"] = "skipped: the run's --budget is spent"
                    rows.append(row)
                    print(row, flush=True)
                    continue
                try:
                    err = float((da.decode_attention(*sub, **cfg, **skw) - ref).abs().max())
                    call = lambda cfg=cfg, args=args, kw=kw: da.decode_attention(*args, **cfg, **kw)  # noqa: E731
                    call()
                    us = _time_us(call, dev, graph)
                    row.update({"us": round(us, 1), "max_abs_err_vs_reference": err,
                                "eff_bw_frac": round(qbytes / (us * 1e-6) / copy_bw, 3)})
                    if sdpa_us is not None:
                        row.update({"baseline": "sdpa-bf16", "baseline_us": round(sdpa_us, 1),
                                    "speedup": round(sdpa_us / us, 2)})
                except Exception as exc:  # noqa: BLE001 - a config that fails is a row, not a crash
                    row["error"] = f"{type(exc).__name__}: {exc}"[:300]
                rows.append(row)
                print(row, flush=True)
        del kc, ks32, kz, vc, vs32, vz
    if dev == "cuda":
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (TRITON_INTERPRET=1); writes nothing "
                    "unless --out is given")
    ap.add_argument("--budget", type=float, default=90.0, help="seconds; later configs become 'skipped' rows")
    ap.add_argument("--sweep", default="final", choices=sorted(SWEEPS))
    ap.add_argument("--sweep-shapes", default="16x32x32x32768,16x32x8x32768",
                    help="BxHQxHKVxS shapes that try every --sweep config")
    ap.add_argument("--shapes", default="16x32x32x32768,16x32x8x32768,1x32x32x32768,1x32x8x32768,"
                    "16x32x32x4096,16x32x8x4096,1x32x32x4096,1x32x8x4096")
    ap.add_argument("--kinds", default="int4,int2,int8")
    ap.add_argument("--sweep-kinds", default="int4,int2", help="kinds the sweep's configs run on")
    ap.add_argument("--scales", default="float16,float32", help="scale dtypes: the sweep runs on the first, the "
                    "others at the sweep shapes with the default launch")
    ap.add_argument("--scale-kinds", default="int4", help="kinds timed with every --scales dtype (others: the first)")
    ap.add_argument("--graph", action="store_true", help="time CUDA graphs of 20 calls instead of do_bench")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    t0 = time.perf_counter()
    deadline = t0 + a.budget
    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    if not cuda and not a.smoke:
        ap.error("needs CUDA (use --smoke with TRITON_INTERPRET=1 on CPU)")
    kinds = a.kinds.split(",")
    scales = [getattr(torch, x) for x in a.scales.split(",")]
    if a.smoke:
        shapes, sweep_shapes, d = [(2, 4, 4, 256), (2, 4, 2, 256)], {(2, 4, 4, 256), (2, 4, 2, 256)}, 64
    else:
        parse = lambda t: tuple(int(x) for x in t.split("x"))  # noqa: E731
        shapes = [parse(t) for t in a.shapes.split(",")]
        sweep_shapes, d = {parse(t) for t in a.sweep_shapes.split(",")}, 128
    rows: list[dict] = []
    # pass 1: every shape, every kind, the default launch (float32 scales too at the sweep shapes: the kv_cache
    # pass's default); pass 2: the sweep's configs at the sweep shapes, for the kinds the goals name
    passes = [(shape, [], kinds, scales if shape in sweep_shapes else scales[:1], True) for shape in shapes]
    swept_kinds = [k for k in kinds if k in a.sweep_kinds.split(",")]
    passes += [(shape, SWEEPS[a.sweep], swept_kinds, scales[:1], False) for shape in shapes
               if shape in sweep_shapes and SWEEPS[a.sweep] and swept_kinds]
    for shape, sweep, kk, ss, default in passes:
        try:
            rows += bench_shape(*shape, d, dev, sweep, kk, ss, a.graph, deadline, default,
                                tuple(a.scale_kinds.split(",")))
        except Exception as exc:  # noqa: BLE001 - e.g. out of memory for a shape
            b, hq, hkv, s = shape
            rows.append({"area": "decode-attention", "batch": b, "heads": hq, "kv_heads": hkv, "head_dim": d,
                         "context": s, "kernel": "shape", "error": f"{type(exc).__name__}: {exc}"[:300]})
            print(rows[-1], flush=True)
    # the fastest correct launch per (shape, kernel, scales)
    best: dict[tuple, dict] = {}
    for r in rows:
        if "us" not in r or r["kernel"] == "sdpa-bf16" or r.get("max_abs_err_vs_reference", 1) > 1e-3:
            continue
        key = (r["batch"], r["heads"], r["kv_heads"], r["context"], r["kernel"], r.get("scheme"))
        if key not in best or r["us"] < best[key]["us"]:
            best[key] = r
    for r in best.values():
        r["fastest"] = True
        print("fastest:", {k: r[k] for k in ("batch", "heads", "kv_heads", "context", "kernel", "scheme", "config",
                                             "us", "speedup") if k in r}, flush=True)
    date = datetime.date.today().isoformat()
    devname = machine(dev)
    rows = [{**r, "device": devname, "date": date} for r in rows]
    print(f"attention bench: {len(rows)} rows in {time.perf_counter() - t0:.0f} s", flush=True)
    if a.out is not None or not a.smoke:
        header = {"command": "python tools/bench_attention.py " + " ".join(sys.argv[1:]), "date": date,
                  "device": devname, "versions": results_versions()}
        merge_rows(a.out or OUT, header, rows,
                   key=("area", "kernel", "scheme", "config", "batch", "heads", "kv_heads", "context", "timing",
                        "device"),
                   append_command=True)


if __name__ == "__main__":
    main()
