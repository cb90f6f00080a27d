"""lowbit's Triton kernels vs cuBLAS bf16, tinygemm, torchao, ``_int_mm`` and ``_scaled_mm``, side by side in one run.

    python tools/bench_kernels.py [--out bench/results/kernels.json] [--quick] [--sweep] [--shapes 4096x11008,...]
                                  [--ms 1,16,2048,128] [--skip-a8]

Times are medians of ``triton.testing.do_bench`` (L2 flushed between calls) of the custom-op call as a model
calls it (``torch.ops.lowbit.*``: activation quantization included for A8 kernels). ``speedup`` = cuBLAS bf16
``F.linear`` time / kernel time at the same shape, same run; ``eff_bw_frac`` = bytes the kernel must move
(weights, scales, zero points, activation, output) / time / the run's measured device-to-device copy bandwidth.
Also: the launch path (host wall time per op call, and per call inside a CUDA graph) at the SmolLM2 shapes, and
with ``--sweep`` every word-layout GEMV config of ``WORDS_SWEEP`` at M = 1 (CUDA cores) and 16 (tensor cores),
the best one per shape marked. Weight-only rows run the layout the triton backend deploys (``layout``: the int32
decode layout where K and the group allow it, else lowbit's stored bytes); at M <= 16 the stored-byte GEMV is
measured beside it.
Needs CUDA.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_io import machine

from lowbit.calibration.gptq import weight_qparams
from lowbit.ir.quant import get_qdtype, quantize
from lowbit.kernels import a8_gemm, quantize_activation
from lowbit.kernels import weight_only as wo

MS = (1, 16, 128, 2048)
SHAPES = ((4096, 4096), (4096, 11008), (11008, 4096), (576, 1536), (1536, 576), (896, 4864), (4864, 896))
SMALL = ((576, 1536), (1536, 576))


def bench(fn, warmup: int = 10, rep: int = 40) -> float:
    """Median µs of ``fn`` (events, L2 flushed)."""
    return do_bench(fn, warmup=warmup, rep=rep, return_mode="median") * 1e3


COPIES_BYTES = 128 * 2 ** 20
"""Weight copies rotated inside a timed CUDA graph until they span ~2x the H200's 60 MB L2 (at most 16 copies)."""


def n_copies(weight_bytes: int) -> int:
    return max(1, min(16, -(-COPIES_BYTES // max(weight_bytes, 1))))


def bench_graph(fns: list, warmup: int = 10, rep: int = 40) -> float:
    """Median µs per call of ``fns`` (one per weight copy) replayed from one CUDA graph: the kernel time a
    graphed/compiled model sees (no host launch cost), weights cold in L2 as in a model whose layers differ."""
    for f in fns:
        f()
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    rounds = max(1, 16 // len(fns))
    g = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream):
        for f in fns:
            f()
        with torch.cuda.graph(g, stream=stream):
            for _ in range(rounds):
                for f in fns:
                    f()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    return bench(g.replay, warmup, rep) / (rounds * len(fns))


def measure(make, weight_bytes: int) -> tuple[float, float]:
    """(graph µs per call over rotated weight copies, eager µs of one op call with L2 flushed)."""
    fns = [make() for _ in range(n_copies(weight_bytes))]
    eager = bench(fns[0])
    try:
        graphed = bench_graph(fns)
    except Exception:  # noqa: BLE001 - a baseline that cannot be captured reports its eager time
        torch.cuda.synchronize()
        graphed = eager
    return graphed, eager


def copy_bandwidth() -> float:
    """Device-to-device copy, bytes read + written per second."""
    a = torch.empty(2 ** 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    us = bench(lambda: b.copy_(a), rep=100)
    return 2 * a.numel() / (us * 1e-6)


def qweight(n: int, k: int, qdtype: str, group: int, symmetric: bool):
    w = torch.randn(n, k, device="cuda")
    s, z = weight_qparams(w, get_qdtype(qdtype), symmetric, group or None)
    return quantize(w, s, z, qdtype=qdtype, axis=1 if group else 0, block_size=group or None), s, z, w


def tinygemm(w: torch.Tensor, x: torch.Tensor):
    """torch._weight_int4pack_mm (asymmetric int4 g128) as a callable, or None where the shape does not fit."""
    n, k = w.shape
    if k % 128:
        return None
    g = 128
    wv = w.view(n, k // g, g)
    lo, hi = wv.amin(-1), wv.amax(-1)
    scale = ((hi - lo) / 15).clamp(min=1e-6)
    q = ((wv - lo[..., None]) / scale[..., None]).round().clamp(0, 15).to(torch.int32).view(n, k)
    zeros = lo + 8 * scale  # tinygemm dequant: (q - 8) * scale + zero
    packed = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)
    try:
        wp = torch._convert_weight_to_int4pack(packed, 8 if k % 1024 == 0 else 2)
        sz = torch.stack([scale, zeros], -1).transpose(0, 1).contiguous().to(torch.bfloat16)
        torch._weight_int4pack_mm(x, wp, g, sz)
    except RuntimeError:
        return None
    return lambda: torch._weight_int4pack_mm(x, wp, g, sz)


def torchao_int4(w: torch.Tensor, x: torch.Tensor):
    try:
        from torchao.quantization import Int4WeightOnlyConfig, quantize_
    except ImportError:
        return None
    lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, device="cuda", dtype=torch.bfloat16)
    lin.weight.data.copy_(w)
    try:
        quantize_(lin, Int4WeightOnlyConfig(group_size=128, int4_packing_format="tile_packed_to_4d"))
        lin(x)
    except Exception:  # noqa: BLE001 - a shape torchao does not take is a missing baseline, not a failure
        return None
    return lambda: lin(x)


def row(kernel, m, k, n, group, t, base, nbytes=None, bw=None, **extra):
    """One result: ``t``/``base`` are (graph µs, eager µs) of the kernel and of cuBLAS bf16."""
    us, eager = t
    r = {"kernel": kernel, "M": m, "K": k, "N": n, "group": group, "us": round(us, 2), "eager_us": round(eager, 2),
         "baseline": "cublas_bf16", "baseline_us": round(base[0], 2), "speedup": round(base[0] / us, 3),
         "speedup_eager": round(base[1] / eager, 3), "device": DEVICE, "date": DATE}
    if nbytes is not None and bw:
        r["eff_bw_frac"] = round(nbytes / (us * 1e-6) / bw, 3)
    r.update(extra)
    return r


def bench_shape(m: int, k: int, n: int, bw: float, quick: bool) -> list[dict]:
    rows: list[dict] = []
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    g4 = 128 if k % 128 == 0 else 64
    act = 2 * (m * k + m * n)

    def dense():
        wb = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        return lambda: F.linear(x, wb)
    base = measure(dense, 2 * n * k)
    rows.append(row("cublas_bf16", m, k, n, None, base, base, 2 * n * k + act, bw))
    extra = {}

    def maker(build):
        def make():
            return build(torch.randn(n, k, device="cuda"))
        return make
    if tinygemm(torch.randn(n, k, device="cuda"), x) is not None:
        t = measure(maker(lambda w: tinygemm(w, x)), n * k // 2)
        extra["tinygemm_us"] = t[0]
        rows.append(row("tinygemm_int4_g128", m, k, n, 128, t, base, n * k // 2 + n * k // 128 * 4 + act, bw))
    if torchao_int4(torch.randn(n, k, device="cuda"), x) is not None:
        t = measure(maker(lambda w: torchao_int4(w, x)), n * k // 2)
        extra["torchao_us"] = t[0]
        rows.append(row("torchao_int4wo_g128", m, k, n, 128, t, base, n * k // 2 + n * k // 128 * 4 + act, bw))
    op = torch.ops.lowbit.weight_only_linear
    a8 = torch.ops.lowbit.a8_linear

    def wo_maker(qdtype, group, sym, path="auto", layout="words"):
        def make():
            q, s_, z, _ = qweight(n, k, qdtype, group, sym)
            if layout == "words":  # what the triton backend runs: the decode layout made once at lowering
                q, s_, z = wo.pack_words(q, s_, z, qdtype, group)
            return lambda: op(x, q, s_, z, None, qdtype, group, path)
        return make

    def a8_maker(wq, wg, sym, aq, ag, scaled_mm=True):
        def make():
            q, s_, z, _ = qweight(n, k, wq, wg, sym)
            return lambda: a8(x, q, s_, z, None, wq, wg, aq, ag, scaled_mm)
        return make
    w4_bytes = n * k // 2 + n * k // g4 * 5 + act
    t = measure(wo_maker("int4", g4, False), n * k // 2)
    layout = "words" if wo.chunk_words(k, g4, 4) else "bytes"
    r = row(f"w4a16_g{g4}_asym", m, k, n, g4, t, base, w4_bytes, bw, path="auto", layout=layout)
    for key in ("tinygemm_us", "torchao_us"):
        if key in extra:
            r["vs_" + key[:-3]] = round(extra[key] / t[0], 3)
    rows.append(r)
    if m <= 16 and layout == "words":  # the stored byte layout's split-K GEMV, for comparison
        t = measure(wo_maker("int4", g4, False, "gemv", "bytes"), n * k // 2)
        rows.append(row(f"w4a16_g{g4}_asym", m, k, n, g4, t, base, w4_bytes, bw, path="gemv", layout="bytes"))
    if m > 16:
        for path in ("dequant",) if NO_GEMM[0] else ("gemm", "dequant"):
            t = measure(wo_maker("int4", g4, False, path, "bytes"), n * k // 2)
            rows.append(row(f"w4a16_g{g4}_asym", m, k, n, g4, t, base, w4_bytes, bw, path=path, layout="bytes"))
    if not quick or (k, n) in ((4096, 11008), (11008, 4096)):
        for name, (qd, g, sym, nbytes) in {
                "w4a16_g128_sym": ("int4", g4, True, n * k // 2 + n * k // g4 * 4),
                "w4a16_g32_asym": ("int4", 32, False, n * k // 2 + n * k // 32 * 5),
                "w4a16_perchannel": ("int4", 0, True, n * k // 2 + n * 4),
                "w8a16_perchannel": ("int8", 0, True, n * k + n * 4)}.items():
            t = measure(wo_maker(qd, g, sym), nbytes)
            rows.append(row(name, m, k, n, g, t, base, nbytes + act, bw))
    if SKIP_A8:
        return rows
    # ---- A8: int8, fp8 (activation quantization inside the op)
    t = measure(a8_maker("int8", 0, True, "int8", 0), n * k)
    rows.append(row("w8a8_fused_quant", m, k, n, 0, t, base, n * k + act, bw))
    xq, xs = quantize_activation(x, "int8", 0)

    def gemm_only():
        q8, s8, _, _ = qweight(n, k, "int8", 0, True)
        return lambda: a8_gemm(xq, xs, q8, s8, None, None, "int8", 0, 0, torch.bfloat16)
    t = measure(gemm_only, n * k)
    rows.append(row("w8a8_gemm_only", m, k, n, 0, t, base, n * k + m * k + 2 * m * n, bw))
    if m > 16:
        def int_mm():
            q8, _, _, _ = qweight(n, k, "int8", 0, True)
            q8t = q8.t()
            return lambda: torch._int_mm(xq, q8t)

        def separate():
            q8, s8, _, _ = qweight(n, k, "int8", 0, True)
            q8t = q8.t()

            def f():
                xf = x.float()
                sc = xf.abs().amax(-1, keepdim=True) / 127
                qa = (xf / sc).round().clamp(-128, 127).to(torch.int8)
                return (torch._int_mm(qa, q8t).float() * sc * s8).to(torch.bfloat16)
            return f
        try:
            rows.append(row("torch_int_mm_raw", m, k, n, 0, measure(int_mm, n * k), base))
            rows.append(row("int8_separate_act_quant", m, k, n, 0, measure(separate, n * k), base))
        except RuntimeError:
            pass
    if not quick or m >= 128 or (k, n) in ((4096, 11008), (11008, 4096)):
        t = measure(a8_maker("int8", 0, True, "int8", 64), n * k)
        rows.append(row("w8a8_g64_fused_quant", m, k, n, 0, t, base, n * k + act, bw))
        t = measure(a8_maker("int4", 64, False, "int8", 0), n * k // 2)
        rows.append(row("w4a8_g64_fused_quant", m, k, n, 64, t, base, n * k // 2 + n * k // 64 * 5 + act, bw))
    t = measure(a8_maker("fp8e4m3", 0, True, "fp8e4m3", 0, True), n * k)
    rows.append(row("fp8_rowwise_fused_quant", m, k, n, 0, t, base, n * k + act, bw, gemm="torch._scaled_mm"))
    t = measure(a8_maker("fp8e4m3", 0, True, "fp8e4m3", 0, False), n * k)
    rows.append(row("fp8_rowwise_fused_quant", m, k, n, 0, t, base, n * k + act, bw, gemm="triton"))
    xf8, xfs = quantize_activation(x, "fp8e4m3", 0)

    def scaled_mm_raw():
        qf, sf, _, _ = qweight(n, k, "fp8e4m3", 0, True)
        qft, sfr = qf.t(), sf.reshape(1, n)
        return lambda: torch._scaled_mm(xf8, qft, scale_a=xfs, scale_b=sfr, out_dtype=torch.bfloat16)
    try:
        rows.append(row("torch_scaled_mm_fp8_rowwise_raw", m, k, n, 0, measure(scaled_mm_raw, n * k), base))
    except RuntimeError:
        pass
    if k % 64 == 0:
        t = measure(a8_maker("fp8e4m3", 64, True, "fp8e4m3", 64), n * k)
        rows.append(row("fp8_block64_fused_quant", m, k, n, 64, t, base, n * k + n * k // 64 * 4 + act, bw))
    return rows


WORDS_SWEEP = {
    "cc": [{"BLOCK_N": bn, "U": u, "num_warps": w, "num_stages": st, "SPLIT_K": sk}
           for bn, u, w, st, sk in ((2, 8, 2, 1, 1), (4, 8, 2, 1, 1), (2, 16, 4, 1, 1), (4, 16, 4, 1, 1),
                                    (4, 4, 1, 1, 1), (2, 4, 1, 1, 1), (2, 16, 2, 1, 1), (4, 32, 8, 1, 1),
                                    (2, 32, 8, 1, 1), (4, 8, 2, 1, 2), (2, 8, 2, 1, 2), (4, 16, 4, 1, 2),
                                    (4, 8, 2, 3, 1), (4, 16, 4, 3, 1))] + [
        {"BLOCK_N": bn, "U": u, "num_warps": w, "num_stages": 1, "SPLIT_K": 1, "PREFETCH": pf}
        for bn, u, w, pf in ((2, 4, 1, 2), (4, 8, 2, 2), (4, 4, 1, 2), (2, 8, 2, 2), (4, 16, 4, 2), (2, 4, 1, 1))],
    "tc": [{"BLOCK_N": bn, "SWAP": sw, "num_warps": w, "num_stages": st, "SPLIT_K": sk}
           for bn, sw, w, st, sk in ((64, True, 4, 2, 1), (64, True, 4, 2, 2), (64, True, 4, 2, 4), (64, True, 4, 2, 8),
                                     (64, False, 4, 2, 2), (64, False, 4, 2, 4), (128, True, 4, 2, 1),
                                     (128, True, 4, 2, 2), (128, True, 4, 2, 4), (32, False, 4, 2, 4),
                                     (64, True, 4, 3, 2), (64, True, 4, 3, 4))] + [
        {"BLOCK_N": bn, "SWAP": True, "num_warps": 4, "num_stages": 2, "SPLIT_K": sk, "PREFETCH": pf}
        for bn, sk, pf in ((64, 8, 2), (128, 4, 2), (64, 4, 1))],
}
"""Word-layout GEMV configs tried by ``--sweep`` (``weight_only.words_config`` reads the winners from
``_WORDS_TABLE``). The ``PREFETCH`` ones were added after run C (not yet measured). CUDA-core configs keep
``U * CW = 128 * num_warps`` words per step or more, so the activation tile shares the weight tile's layout."""


def sweep_words(m: int, k: int, n: int, bw: float) -> list[dict]:
    """Every ``WORDS_SWEEP`` config at one shape (int4 g128 asymmetric, raw launches in a CUDA graph); one row each
    and the best one marked."""
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    copies = [wo.pack_words(*qweight(n, k, "int4", 128, False)[:3], "int4", 128, n_major=False)
              for _ in range(n_copies(n * k // 2))]
    out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
    kind = "tc" if m >= wo.WORDS_TC_MIN_M else "cc"
    bm = 16 if kind == "tc" else 1
    nbytes = n * k // 2 + n * k // 128 * 5 + 2 * (m * k + m * n)
    rows = []
    for cfg in WORDS_SWEEP[kind]:
        c = dict(cfg, BLOCK_M=bm, TC=kind == "tc")
        try:
            t = bench_graph([lambda q=q, s=s, z=z, c=c: wo._launch_words(x, q, s, z, None, out, "int4", 128, c)
                             for q, s, z in copies])
        except Exception as e:  # noqa: BLE001 - a config that does not compile is recorded and skipped
            rows.append({"kernel": "w4a16_words_sweep", "M": m, "K": k, "N": n, "config": c, "error": repr(e)[:200]})
            continue
        rows.append({"kernel": "w4a16_words_sweep", "M": m, "K": k, "N": n, "group": 128, "us": round(t, 2),
                     "config": c, "eff_bw_frac": round(nbytes / (t * 1e-6) / bw, 3), "device": DEVICE, "date": DATE})
    ok = [r for r in rows if "us" in r]
    if ok:
        min(ok, key=lambda r: r["us"])["best"] = True
    return rows


def launch_path(k: int, n: int) -> list[dict]:
    """Host cost of one op call at a SmolLM2 shape (M=1): eager wall time per call, and per call in a CUDA graph."""
    rows = []
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    g = 128 if k % 128 == 0 else 64
    q, s, z, w = qweight(n, k, "int4", g, False)
    wb = w.to(torch.bfloat16)
    q8, s8, _, _ = qweight(n, k, "int8", 0, True)
    out = torch.empty(1, n, device="cuda", dtype=torch.bfloat16)
    cfg = wo.gemv_config(1, n, k, g)
    calls = {"cublas_bf16": lambda: F.linear(x, wb),
             f"w4a16_g{g}_asym": lambda: torch.ops.lowbit.weight_only_linear(x, q, s, z, None, "int4", g, "auto"),
             f"w4a16_g{g}_asym_raw_launch": lambda: wo._launch_gemv(x, q, s, z, None, out, True, True, g, cfg),
             "quantize_activation_op": lambda: torch.ops.lowbit.quantize_activation(x, "int8", 0),
             "w8a8_fused_quant": lambda: torch.ops.lowbit.a8_linear(x, q8, s8, None, None, "int8", 0, "int8", 0,
                                                                    True)}
    reps = 200
    for name, fn in calls.items():
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
        eager = (time.perf_counter() - t0) / reps * 1e6
        graph = torch.cuda.CUDAGraph()
        s_ = torch.cuda.Stream()
        s_.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s_):
            fn()
        torch.cuda.current_stream().wait_stream(s_)
        with torch.cuda.graph(graph):
            for _ in range(20):
                fn()
        graph.replay()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(20):
            graph.replay()
        torch.cuda.synchronize()
        graphed = (time.perf_counter() - t0) / 400 * 1e6
        rows.append({"kernel": name, "M": 1, "K": k, "N": n, "variant": "launch_path", "eager_wall_us": round(eager, 2),
                     "cuda_graph_us": round(graphed, 2), "device": DEVICE, "date": DATE})
    return rows


DEVICE = ""
DATE = ""
SKIP_A8 = False
NO_GEMM = [False]


def main() -> None:
    global DEVICE, DATE, SKIP_A8
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results/kernels.json")
    ap.add_argument("--quick", action="store_true", help="secondary schemes only at the goal shape / M >= 128")
    ap.add_argument("--sweep", action="store_true", help="also sweep the word-layout GEMV configs (WORDS_SWEEP)")
    ap.add_argument("--ms", default="1,16,2048,128")
    ap.add_argument("--shapes", default="", help="KxN,KxN,... (default: all of SHAPES)")
    ap.add_argument("--sweep-ms", default="1,16", help="M values the --sweep tries")
    ap.add_argument("--skip-a8", action="store_true", help="weight-only rows and baselines only")
    ap.add_argument("--no-launch-path", action="store_true")
    ap.add_argument("--no-gemm-path", action="store_true", help="M > 16: skip the tiled-GEMM comparison rows")
    ap.add_argument("--table-from", default="", help="a --sweep JSON whose best configs the op's table takes")
    args = ap.parse_args()
    SKIP_A8 = args.skip_a8
    NO_GEMM[0] = args.no_gemm_path
    if args.table_from:
        for r in json.loads(Path(args.table_from).read_text())["rows"]:
            if r.get("best"):
                c = {key: v for key, v in r["config"].items() if key not in ("BLOCK_M", "TC")}
                wo._WORDS_TABLE[("tc" if r["config"]["TC"] else "cc", r["config"]["BLOCK_M"], r["N"], r["K"])] = c
    shapes = [tuple(map(int, s.split("x"))) for s in args.shapes.split(",")] if args.shapes else list(SHAPES)
    if not torch.cuda.is_available():
        raise SystemExit("bench_kernels needs CUDA")
    DEVICE, DATE = machine("cuda"), datetime.date.today().isoformat()
    torch.manual_seed(0)
    bw = copy_bandwidth()
    rows: list[dict] = [{"kernel": "copy_bandwidth", "variant": "d2d", "bytes_per_s": round(bw), "device": DEVICE,
                         "date": DATE}]
    versions = {"torch": torch.__version__, "triton": triton.__version__}
    try:
        import torchao
        versions["torchao"] = torchao.__version__
    except ImportError:
        versions["torchao"] = "not installed (no torchao baseline)"
    header = {"command": "python " + " ".join(sys.argv), "date": DATE, "device": DEVICE, "versions": versions}
    out = Path(args.out)

    def flush() -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({**header, "rows": rows}, indent=1) + "\n")

    print(f"copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)
    for k, n in SMALL if not args.no_launch_path else ():
        rows.extend(launch_path(k, n))
        print("launch path", [(r["kernel"], r["eager_wall_us"], r["cuda_graph_us"]) for r in rows[-5:]], flush=True)
    flush()
    if args.sweep:
        for m in map(int, args.sweep_ms.split(",")):
            for k, n in shapes:
                t0 = time.time()
                new = sweep_words(m, k, n, bw)
                rows.extend(new)
                best = [r for r in new if r.get("best")]
                for r in best:  # the rows below run the winners (weight_only._WORDS_TABLE is what the op reads)
                    c = {key: v for key, v in r["config"].items() if key not in ("BLOCK_M", "TC")}
                    kind = "tc" if r["config"]["TC"] else "cc"
                    wo._WORDS_TABLE[(kind, r["config"]["BLOCK_M"], n, k)] = c
                print(f"sweep M={m} K={k} N={n} ({time.time() - t0:.0f}s):",
                      " ".join(f"{r['us']}" if "us" in r else "err" for r in new), "best",
                      [(r["us"], r["eff_bw_frac"], r["config"]) for r in best], flush=True)
                flush()
    for m in [int(v) for v in args.ms.split(",") if v]:
        for k, n in shapes:
            t0 = time.time()
            try:
                new = bench_shape(m, k, n, bw, args.quick)
            except Exception as e:  # noqa: BLE001 - one failing shape must not lose the others
                new = [{"kernel": "error", "M": m, "K": k, "N": n, "error": repr(e)[:300], "device": DEVICE}]
            rows.extend(new)
            flush()
            brief = " ".join(f"{r['kernel']}{'/' + r['path'] if 'path' in r else ''}"
                             f"{'/' + r['gemm'] if 'gemm' in r else ''}={r.get('speedup', r.get('error'))}/{r.get('speedup_eager')}"
                             for r in new)
            print(f"M={m} K={k} N={n} ({time.time() - t0:.0f}s): {brief}", flush=True)
    rows.append({"kernel": "words_table", "table": {"/".join(map(str, key)): v for key, v in wo._WORDS_TABLE.items()},
                 "device": DEVICE, "date": DATE})
    flush()


if __name__ == "__main__":
    main()
