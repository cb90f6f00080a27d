"""The online Hadamard kernel (``torch.ops.lowbit.hadamard``) and its fused per-token quantize
(``lowbit::hadamard_quantize``) against the torch reference op and a plain device copy, in one run.

    python tools/bench_hadamard.py --out bench/results/hadamard.json [--ms 1,16,128,2048,8192]
        [--ns 4096,1536,576,4864,14336,11008] [--sweep] [--variants [SPEC]] [--no-main] [--budget-s 120]
    TRITON_INTERPRET=1 python tools/bench_hadamard.py --smoke --sweep --out /tmp/hadamard.json   # CPU check

Times are medians of ``triton.testing.do_bench`` in µs, bf16 activations ``[M, n]``. Rows:

* ``copy_bandwidth``: a device-to-device copy, bytes read + written per second (the yardstick).
* ``hadamard_sweep`` (``--sweep``, at ``--sweep-m``): every ``Config`` of ``--configs`` per length, so the fastest
  can go into ``lowbit.kernels.hadamard.CONFIGS``; ``eff_bw_frac`` = bytes / time / copy bandwidth (goal >= 0.70).
  ``graph_*``: the same from one CUDA-graph replay — device time; eager timings of a fast kernel are bounded by
  its Python launch (40-80 µs on the H200 host of round 1), so the eager ``eff_bw_frac`` is a lower bound there.
* ``hadamard_variant`` (``--variants``, at ``--sweep-m``): per length its current ``CONFIGS`` / ``FUSED_CONFIGS``
  entries next to candidates (``VARIANTS`` or the given ``n=cfg,cfg;n=...``), CUDA-graph time only, plain and fused
  int8 (``int8_vs_plain_mismatch``: 0 when the fused codes are the quantized plain output), then the per-length
  winners printed as ``CONFIGS`` / ``FUSED_CONFIGS`` entries ready to paste.
* ``hadamard`` / ``bf16`` per (M, n): the op with its default config (``us``), the IR's reference op
  (``baseline_us``: matmul by the cached ``H/sqrt(n)``), ``graph_us`` / ``baseline_graph_us`` (one CUDA-graph
  replay: device time without the Python launch cost) and their ``*_eff_bw_frac``, ``direct_us`` (``hadamard_direct``: the launch
  without torch's custom-op dispatch, what eager callers get), ``dispatch_us`` (the triton backend's FX target,
  which picks the reference below the crossover), ``mismatch_frac`` (outputs that differ from the float64
  transform rounded once to bf16: near-ties only).
* ``hadamard_quantize`` / int8 (int4, fp8 at the largest M): the fused op against the kernel pair
  (``lowbit::hadamard`` + ``lowbit::quantize_activation``) and the reference chain (reference op + that quantize).
* ``hadamard_crossover`` per n: ``eager_min_m`` / ``graph_min_m``, the smallest measured M from which the kernel
  beats the reference at that and every larger measured M (what ``lowbit.kernels.hadamard.EAGER_ROWS`` /
  ``GRAPH_ROWS`` record), and the win / loss at each measured M.

Each config is caught on its own (an exception becomes an ``error`` row); configs stop starting after
``--budget-s`` seconds (rows say ``skipped``).
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from results_io import machine, merge_rows

import lowbit.kernels.hadamard as K
from lowbit.ir.hadamard import hadamard_matrix, hadamard_order_split, sylvester
from lowbit.kernels.act_quant import quantize_activation

KEY = ("kernel", "variant", "M", "K", "device")
CONFIGS = ("mma/64/4096/4/1/0,mma/64/4096/4/2/3,bfly/64/4096/4/2/4,bfly/4096/4096/4/1/0,bfly/4096/4096/4/2/4,"
           "bfly/4096/4096/2/2/8,bfly/4096/4096/8/2/2,bfly/4096/8192/8/2/2")
FUSED_CONFIGS = "mma/64/4096/4/1/0,mma/64/4096/4/2/3,bfly/64/4096/4/2/4,bfly/4096/4096/4/2/4,bfly/4096/8192/8/2/2"
# --variants: per length, the candidates timed next to its current CONFIGS / FUSED_CONFIGS entries (these two come
# first, whatever is listed). Why each: stages 1 with persistent programs = Triton's cp.async pipeline of the
# tile loop (Config.pipeline, 3 unless a 7th field says otherwise), bytes in flight from shared memory instead of
# registers (4096's butterflies: 62 registers at 4 warps, 8 programs per SM, against 128 at 2 warps with the
# register prefetch); an 8th field 1 = Config.split (76 = 64 + 16, 36 = 32 + 16: less padding, fewer registers);
# 11008: more rows per tile (2-4) so each 32 KB table block read from L2 serves more than one row (at one row per
# tile the table reads are ~13x the row's bytes), more warps per SM.
VARIANTS = ("4096=bfly/4096/4096/4/1/8,bfly/4096/4096/4/1/6/4,bfly/4096/4096/2/1/10,bfly/4096/8192/8/1/4,"
            "bfly/64/4096/4/1/4/4,mma/64/4096/4/1/3/4;"
            "1536=bfly/64/4096/4/1/4,mma/64/4096/4/1/4/4,bfly/64/4096/4/1/6/4,bfly/128/4096/4/1/4/4,"
            "mma/64/4096/4/2/4;"
            "576=mma/64/4096/4/1/0/3/1,mma/64/4096/4/1/4/4/1,mma/64/8192/4/1/3/3/1,bfly/64/4096/4/1/4/4/1,"
            "mma/64/4096/4/1/4/4;"
            "4864=mma/64/4096/4/2/3/3/1,mma/64/4096/4/1/3/3/1,bfly/64/4096/4/1/4/3/1,bfly/64/4096/8/1/2/3/1,"
            "bfly/64/4096/4/2/4;"
            "14336=bfly/4096/4096/8/1/2,bfly/4096/4096/8/1/2/2,bfly/4096/4096/16/1/1/2,bfly/256/16384/16/1/1/2,"
            "bfly/128/16384/8/1/1/2;"
            "11008=mma/64/4096/4/1/3/2,mma/64/8192/8/1/2/2,bfly/64/8192/8/1/2/2,bfly/64/16384/8/1/1/2,"
            "bfly/64/16384/16/1/1/2")


def parse_config(spec: str) -> K.Config:
    """``stage2/n2_cap/tile/warps/stages/waves[/pipeline[/split]]`` -> ``Config`` (pipeline 3, split 0 if left
    out)."""
    st, cap, tile, warps, stages, waves, *rest = spec.split("/")
    pipeline, split = (*map(int, rest), *(3, 0)[len(rest):])
    return K.Config(stage2=st, n2_cap=int(cap), tile=int(tile), warps=int(warps), stages=int(stages),
                    waves=int(waves), pipeline=pipeline, split=bool(split))


def config_name(c: K.Config) -> str:
    tail = f"/{c.pipeline}/{int(c.split)}" if (c.pipeline, c.split) != (3, False) else ""
    return f"{c.stage2}/{c.n2_cap}/{c.tile}/{c.warps}/{c.stages}/{c.waves}{tail}"


def timer(smoke: bool):
    """µs per call: ``do_bench`` medians on CUDA; a wall-clock mean of 2 calls in ``--smoke`` (CPU)."""
    if smoke:
        def wall(fn) -> float:
            fn()
            t0 = time.perf_counter()
            for _ in range(2):
                fn()
            return (time.perf_counter() - t0) / 2 * 1e6
        return wall
    from triton.testing import do_bench

    return lambda fn: do_bench(fn, warmup=5, rep=20, return_mode="median") * 1e3


def graph_timer(bench, smoke: bool):
    """µs of one CUDA-graph replay of ``fn`` (device time, no Python launch cost); None in ``--smoke``."""
    def run(fn) -> float | None:
        if smoke:
            return None
        fn()
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        return bench(g.replay)
    return run


def copy_bandwidth(dev: str, bench) -> float:
    """Device-to-device copy, bytes read + written per second."""
    a = torch.empty(2 ** 30 if dev == "cuda" else 2 ** 20, dtype=torch.uint8, device=dev)
    b = torch.empty_like(a)
    return 2 * a.numel() / (bench(lambda: b.copy_(a)) * 1e-6)


def _mismatch(a: torch.Tensor, b: torch.Tensor) -> float:
    return round((a.reshape(-1).view(torch.uint8) != b.reshape(-1).view(torch.uint8)).float().mean().item(), 6)


def _exact(x: torch.Tensor) -> torch.Tensor:
    """The float64 transform (the reference's constant), rounded once to x.dtype: what the kernel should give. In
    its Kronecker form ``H_n = kron(A_m, S_p)``: ``x · H_n = Aᵀ · X · S`` per row (``X [m, p]``), no n² matrix
    (building the 14336² one took seconds of the bench's budget)."""
    n = x.shape[-1]
    m, p = hadamard_order_split(n)
    a, s = hadamard_matrix(m, torch.float64).to(x.device), sylvester(p).double().to(x.device)
    out = torch.empty_like(x)
    for i in range(0, x.shape[0], 1024):  # float64 [1024, n] at a time
        xs = x[i:i + 1024].double().reshape(-1, m, p)
        y = torch.einsum("ka,rkp,pq->raq", a, xs, s).reshape(-1, n)
        out[i:i + 1024] = (y * K._scale_const(n, x.dtype)).to(x.dtype)
    return out


def r3(v: float | None) -> float | None:
    return None if v is None else round(v, 3)


def sweep_rows(m: int, n: int, dev: str, bw: float, bench, gbench, configs: list[K.Config], base: dict,
               fused: list[K.Config]) -> list[dict]:
    x = torch.randn(m, n, device=dev, dtype=torch.bfloat16)
    exact = _exact(x[:256])
    rows = []
    for cfg in configs:
        r = {**base, "kernel": "hadamard_sweep", "variant": config_name(cfg), "M": m, "K": n, "N": n}
        why = K.unsupported(n, cfg)
        if why is not None:
            rows.append({**r, "error": f"unsupported: {why}"})
            continue
        try:
            t0 = time.time()
            lt = K.hadamard_factors(n, dev, cfg)
            y = K._launch(x, lt, None, cfg)[0]
            compile_s = time.time() - t0
            us = bench(lambda cfg=cfg, lt=lt: K._launch(x, lt, None, cfg))
            g = gbench(lambda cfg=cfg, lt=lt: K._launch(x, lt, None, cfg))
            r.update(graph_us=g and round(g, 2), graph_eff_bw_frac=g and r3(4 * m * n / (g * 1e-6) / bw))
            r.update(us=round(us, 2), eff_bw_frac=r3(4 * m * n / (us * 1e-6) / bw),
                     mismatch_frac=_mismatch(y[:256], exact), compile_s=round(compile_s, 1),
                     geometry=list(K._geometry(n, cfg)))
            if cfg in fused and K.unsupported_fused(n, cfg) is None:  # the int8 fused quantize on the same config
                K._launch(x, lt, "int8", cfg)
                fus = bench(lambda cfg=cfg, lt=lt: K._launch(x, lt, "int8", cfg))
                gf = gbench(lambda cfg=cfg, lt=lt: K._launch(x, lt, "int8", cfg))
                r.update(int8_us=round(fus, 2), int8_eff_bw_frac=r3((3 * m * n + 4 * m) / (fus * 1e-6) / bw),
                         int8_graph_us=gf and round(gf, 2),
                         int8_graph_eff_bw_frac=gf and r3((3 * m * n + 4 * m) / (gf * 1e-6) / bw))
            rows.append(r)
        except Exception as e:  # noqa: BLE001 - one failing config must not lose the others
            rows.append({**r, "error": repr(e)[:300]})
    return rows


def parse_variants(spec: str) -> dict[int, list[K.Config]]:
    """``n=cfg,cfg;n=cfg`` -> per length, its current plain and fused configs first, then the listed ones."""
    out: dict[int, list[K.Config]] = {}
    for part in filter(None, spec.split(";")):
        n, cfgs = part.split("=")
        cur = [K.config_for(int(n)), K.config_for(int(n), fused=True)]
        out[int(n)] = list(dict.fromkeys(cur + [parse_config(c) for c in cfgs.split(",") if c]))
    return out


def variant_rows(m: int, n: int, dev: str, bw: float, gbench, configs: list[K.Config], base: dict, over
                 ) -> list[dict]:
    """Each config of one length at M = m: graph time (``gbench``; wall clock under --smoke) of the plain
    transform and of the fused int8 quantize (where it runs), the plain output against the float64 transform
    and the fused codes against the reference quantize of the same config's plain output (0 when the two share
    their arithmetic, as CONFIGS needs)."""
    x = torch.randn(m, n, device=dev, dtype=torch.bfloat16)
    exact = _exact(x[:256])
    rows = []
    for cfg in configs:
        r = {**base, "kernel": "hadamard_variant", "variant": config_name(cfg), "M": m, "K": n, "N": n,
             "current": cfg == K.config_for(n), "fused_current": cfg == K.config_for(n, fused=True)}
        why = K.unsupported(n, cfg)
        if why is not None or over():
            rows.append({**r, "error": f"unsupported: {why}" if why else "skipped: past --budget-s"})
            continue
        try:
            t0 = time.time()
            lt = K.hadamard_factors(n, dev, cfg)
            y = K._launch(x, lt, None, cfg)[0]
            g = gbench(lambda cfg=cfg, lt=lt: K._launch(x, lt, None, cfg))
            r.update(graph_us=g and round(g, 2), graph_eff_bw_frac=g and r3(4 * m * n / (g * 1e-6) / bw),
                     mismatch_frac=_mismatch(y[:256], exact), geometry=list(K._geometry(n, cfg)))
            if K.unsupported_fused(n, cfg) is None:
                q = K._launch(x, lt, "int8", cfg)[0]
                gf = gbench(lambda cfg=cfg, lt=lt: K._launch(x, lt, "int8", cfg))
                r.update(int8_graph_us=gf and round(gf, 2),
                         int8_graph_eff_bw_frac=gf and r3((3 * m * n + 4 * m) / (gf * 1e-6) / bw),
                         int8_vs_plain_mismatch=_mismatch(q[:256], quantize_activation(y[:256], "int8", 0)[0]))
            r["seconds"] = round(time.time() - t0, 1)
            rows.append(r)
        except Exception as e:  # noqa: BLE001 - one failing config must not lose the others
            rows.append({**r, "error": repr(e)[:300]})
    return rows


def winners(rows: list[dict]) -> str:
    """Per length, the fastest plain variant (graph time, outputs within the near-tie bound) and the fastest
    fused one sharing its arithmetic (same path and geometry: fused codes = quantize(plain output)), as the
    ``CONFIGS`` / ``FUSED_CONFIGS`` entries to paste into lowbit/kernels/hadamard.py."""
    def arithmetic(r: dict) -> tuple:  # what fixes the plain output's rounding: the path and the geometry
        return r["variant"].split("/")[0], tuple(r["geometry"])

    plain, fused = [], []
    for n in dict.fromkeys(r["K"] for r in rows):
        ok = [r for r in rows if r["K"] == n and r.get("graph_us") and r.get("mismatch_frac", 1) <= 2e-3]
        if not ok:
            continue
        best = min(ok, key=lambda r: r["graph_us"])
        cur = next((r for r in ok if r["current"]), None)
        was = f" (current {cur['variant']}: {cur['graph_us']} µs)" if cur else ""
        cfg = parse_config(best["variant"])
        plain.append(f"    {n}: {cfg!r},  # {best['graph_us']} µs, {best['graph_eff_bw_frac']} of copy bandwidth{was}")
        fusable = [r for r in ok if r.get("int8_graph_us") and r.get("int8_vs_plain_mismatch") == 0]
        same = [r for r in fusable if arithmetic(r) == arithmetic(best)]
        if same:
            fb = min(same, key=lambda r: r["int8_graph_us"])
            fcur = next((r for r in rows if r["K"] == n and r["fused_current"] and r.get("int8_graph_us")), None)
            fwas = f" (current {fcur['variant']}: {fcur['int8_graph_us']} µs)" if fcur else ""
            fused.append(f"    {n}: {parse_config(fb['variant'])!r},  # int8 {fb['int8_graph_us']} µs{fwas}")
        pairs = [(p, f) for p in ok for f in fusable if arithmetic(f) == arithmetic(p)]
        if pairs:  # the plain pick can cost the fused op more than it saves: the best pair by summed time
            p, f = min(pairs, key=lambda pf: pf[0]["graph_us"] + pf[1]["int8_graph_us"])
            if p is not best:
                plain.append(f"    # {n}, best plain + fused pair instead: {p['variant']} ({p['graph_us']} µs) + "
                             f"{f['variant']} (int8 {f['int8_graph_us']} µs)")
    return "CONFIGS = {\n" + "\n".join(plain) + "\n}\nFUSED_CONFIGS = {\n" + "\n".join(fused) + "\n}"


def bench_config(m: int, n: int, dev: str, bw: float, bench, gbench, big: bool, base: dict) -> list[dict]:
    from lowbit.backends.triton_backend import _kernel_hadamard

    x = torch.randn(m, n, device=dev, dtype=torch.bfloat16)
    rows: list[dict] = []
    K.hadamard_ref(x)  # builds and caches the reference's constant (and warms cuBLAS) before the timing
    ref_us = bench(lambda: K.hadamard_ref(x))
    ref_g = gbench(lambda: K.hadamard_ref(x))
    io = 2 * m * n * 2  # bf16 read + write
    common = {**base, "M": m, "K": n, "N": n, "group": None}
    why = K.unsupported(n)
    if why is not None:
        return [{**common, "kernel": "hadamard", "variant": "bf16", "error": f"unsupported: {why}",
                 "baseline": "torch_ref", "baseline_us": round(ref_us, 2),
                 "ref_eff_bw_frac": r3(io / (ref_us * 1e-6) / bw)}]
    lt = K.hadamard_factors(n, dev)
    y = torch.ops.lowbit.hadamard(x, lt)
    us = bench(lambda: torch.ops.lowbit.hadamard(x, lt))
    g = gbench(lambda: torch.ops.lowbit.hadamard(x, lt))
    direct = bench(lambda: K.hadamard_direct(x, lt))
    disp = bench(lambda: _kernel_hadamard(x, lt))
    rows.append({**common, "kernel": "hadamard", "variant": "bf16", "config": config_name(K.config_for(n)),
                 "us": round(us, 2), "baseline": "torch_ref", "baseline_us": round(ref_us, 2),
                 "speedup": r3(ref_us / us), "graph_us": g and round(g, 2), "baseline_graph_us": ref_g and round(ref_g, 2),
                 "direct_us": round(direct, 2), "dispatch_us": round(disp, 2), "eff_bw_frac": r3(io / (us * 1e-6) / bw),
                 "ref_eff_bw_frac": r3(io / (ref_us * 1e-6) / bw),
                 "graph_eff_bw_frac": g and r3(io / (g * 1e-6) / bw),
                 "ref_graph_eff_bw_frac": ref_g and r3(io / (ref_g * 1e-6) / bw),
                 "mismatch_frac": _mismatch(y[:256], _exact(x[:256]))})
    quantize_activation(y, "int8", 0)  # compiled before the timing
    sep_us = bench(lambda: quantize_activation(torch.ops.lowbit.hadamard(x, lt), "int8", 0))
    chain_us = bench(lambda: quantize_activation(K.hadamard_ref(x), "int8", 0))
    why_fused = K.unsupported_fused(n)
    if why_fused is not None:
        rows.append({**common, "kernel": "hadamard_quantize", "variant": "int8", "error": f"unsupported: {why_fused}",
                     "baseline": "hadamard+quantize_activation", "baseline_us": round(sep_us, 2),
                     "ref_chain_us": round(chain_us, 2)})
    for qd in (() if why_fused else ("int8", "int4", "fp8e4m3") if big else ("int8",)):
        q = torch.ops.lowbit.hadamard_quantize(x, lt, qd)[0]
        qr, _ = K.hadamard_quantize_ref(x[:256], qd)
        fus = bench(lambda qd=qd: torch.ops.lowbit.hadamard_quantize(x, lt, qd))
        gf = gbench(lambda qd=qd: torch.ops.lowbit.hadamard_quantize(x, lt, qd))
        code_bytes = m * n // 2 if qd == "int4" else m * n
        qio = m * n * 2 + code_bytes + 4 * m
        r = {**common, "kernel": "hadamard_quantize", "variant": qd, "us": round(fus, 2),
             "eff_bw_frac": r3(qio / (fus * 1e-6) / bw), "graph_us": gf and round(gf, 2),
             "graph_eff_bw_frac": gf and r3(qio / (gf * 1e-6) / bw), "mismatch_frac": _mismatch(q[:256], qr)}
        if qd == "int8":
            r.update(baseline="hadamard+quantize_activation", baseline_us=round(sep_us, 2),
                     speedup=r3(sep_us / fus), ref_chain_us=round(chain_us, 2))
        rows.append(r)
    return rows


def crossover_rows(rows: list[dict], base: dict) -> list[dict]:
    """Per n: the smallest measured M from which the kernel beats the reference at every larger measured M."""
    out = []
    for n in sorted({r["K"] for r in rows if r.get("kernel") == "hadamard" and "us" in r}):
        pts = sorted((r["M"], r) for r in rows if r.get("kernel") == "hadamard" and r.get("K") == n and "us" in r)
        res = {**base, "kernel": "hadamard_crossover", "variant": "min_m", "K": n, "M": None}
        for mode, k, kb in (("eager", "direct_us", "baseline_us"), ("graph", "graph_us", "baseline_graph_us")):
            win = None
            for m, r in reversed(pts):
                if r.get(k) is None or r.get(kb) is None:
                    continue
                if r[k] < r[kb]:
                    win = m
                else:
                    break
            res[f"{mode}_min_m"] = win
            res[f"{mode}_kernel_wins"] = {str(m): r[k] < r[kb] for m, r in pts
                                          if r.get(k) is not None and r.get(kb) is not None}
        out.append(res)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results/hadamard.json")
    ap.add_argument("--ms", default="1,16,128,2048,8192")
    ap.add_argument("--ns", default="4096,1536,576,4864,14336,11008")
    ap.add_argument("--sweep", action="store_true", help="time every --configs entry per n at --sweep-m first")
    ap.add_argument("--sweep-m", type=int, default=8192)
    ap.add_argument("--configs", default=CONFIGS, help="stage2/n2_cap/tile/warps/stages/waves, comma separated")
    ap.add_argument("--variants", nargs="?", const=VARIANTS, default=None,
                    help="time per length its current configs and these (n=cfg,cfg;n=cfg; default: VARIANTS) at "
                         "--sweep-m, CUDA-graph time only, and print the winners as CONFIGS / FUSED_CONFIGS")
    ap.add_argument("--no-main", action="store_true", help="only the sweep / variants")
    ap.add_argument("--fused-configs", default=FUSED_CONFIGS, help="the configs the sweep also times fused (int8)")
    ap.add_argument("--budget-s", type=float, default=120.0, help="start no new config after this many seconds")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU under TRITON_INTERPRET=1")
    args = ap.parse_args()
    t_start = time.time()
    configs = [parse_config(s) for s in args.configs.split(",") if s]
    fused_configs = [parse_config(s) for s in args.fused_configs.split(",") if s]
    if args.smoke:
        dev, ms, ns, sweep_m = "cpu", [3, 1], [64, 576, 96, 2240], 5
    else:
        if not torch.cuda.is_available():
            raise SystemExit("bench_hadamard needs CUDA (or --smoke under TRITON_INTERPRET=1)")
        dev, sweep_m = "cuda", args.sweep_m
        ms = [int(v) for v in args.ms.split(",") if v]
        ns = [int(v) for v in args.ns.split(",") if v]
    import triton

    from lowbit.version import __version__

    device, date = machine(dev), datetime.date.today().isoformat()
    bench = timer(args.smoke)
    gbench = graph_timer(bench, args.smoke)
    torch.manual_seed(0)
    bw = copy_bandwidth(dev, bench)
    base = {"device": device, "date": date}
    rows: list[dict] = [{**base, "kernel": "copy_bandwidth", "variant": "d2d", "bytes_per_s": round(bw)}]
    header = {"command": "python " + " ".join(sys.argv), "date": date, "device": device,
              "versions": {"lowbit": __version__, "torch": torch.__version__, "triton": triton.__version__}}
    out = Path(args.out)
    print(f"copy bandwidth {bw / 1e12:.3f} TB/s", flush=True)

    def over() -> bool:
        return time.time() - t_start > args.budget_s

    if args.sweep:
        for n in ns:
            if over():
                new = [{**base, "kernel": "hadamard_sweep", "variant": "all", "M": sweep_m, "K": n,
                        "error": f"skipped: past --budget-s {args.budget_s}"}]
            else:
                try:
                    new = sweep_rows(sweep_m, n, dev, bw, bench, gbench, configs, base, fused_configs)
                except Exception as e:  # noqa: BLE001
                    new = [{**base, "kernel": "hadamard_sweep", "variant": "all", "M": sweep_m, "K": n,
                            "error": repr(e)[:300]}]
            for r in new:
                print(f"sweep M={r['M']} n={n} {r['variant']}: "
                      + (f"{r['us']} us eff_bw {r['eff_bw_frac']} graph {r.get('graph_us')} us eff_bw "
                         f"{r.get('graph_eff_bw_frac')} mismatch {r['mismatch_frac']} compile "
                         f"{r['compile_s']} s int8 {r.get('int8_us')} us eff_bw {r.get('int8_eff_bw_frac')} graph "
                         f"{r.get('int8_graph_us')} us eff_bw {r.get('int8_graph_eff_bw_frac')}"
                         if "us" in r else str(r.get("error"))), flush=True)
            rows.extend(new)
            merge_rows(out, header, rows, key=KEY, append_command=True)
    if args.variants:
        var_rows: list[dict] = []
        for n, cfgs in parse_variants(args.variants).items():
            if n in ns:
                new = variant_rows(sweep_m, n, dev, bw, bench if args.smoke else gbench, cfgs, base, over)
                for r in new:
                    print(f"variant M={r['M']} n={n} {r['variant']}{' (current)' * r['current']}"
                          f"{' (fused current)' * r['fused_current']}: "
                          + (f"graph {r['graph_us']} us eff_bw {r['graph_eff_bw_frac']} mismatch {r['mismatch_frac']} "
                             f"int8 graph {r.get('int8_graph_us')} us eff_bw {r.get('int8_graph_eff_bw_frac')} "
                             f"int8 vs plain {r.get('int8_vs_plain_mismatch')} ({r['seconds']} s)"
                             if "graph_us" in r else str(r.get("error"))), flush=True)
                var_rows.extend(new)
                rows.extend(new)
                merge_rows(out, header, rows, key=KEY, append_command=True)
        print("per-length winners (paste into lowbit/kernels/hadamard.py):\n" + winners(var_rows), flush=True)
    big = max(ms)
    for m in ([] if args.no_main else ms):
        for n in ns:
            if over():
                new = [{**base, "kernel": "hadamard", "variant": "bf16", "M": m, "K": n, "N": n,
                        "error": f"skipped: past --budget-s {args.budget_s}"}]
            else:
                t0 = time.time()
                try:
                    new = bench_config(m, n, dev, bw, bench, gbench, m == big, base)
                except Exception as e:  # noqa: BLE001 - one failing config must not lose the others
                    new = [{**base, "kernel": "hadamard", "variant": "bf16", "M": m, "K": n, "N": n,
                            "error": repr(e)[:300]}]
                for r in new:
                    r["seconds"] = round(time.time() - t0, 1)
            for r in new:
                print(f"M={m} n={n} {r['kernel']}/{r['variant']}: "
                      + (f"{r['us']} us direct {r.get('direct_us')} eff_bw {r['eff_bw_frac']} graph_eff_bw "
                         f"{r.get('graph_eff_bw_frac')} ref {r.get('baseline_us')} "
                         f"graph {r.get('graph_us')} ref_graph {r.get('baseline_graph_us')} "
                         f"dispatch {r.get('dispatch_us')} chain {r.get('ref_chain_us')} "
                         f"mismatch {r['mismatch_frac']}" if "us" in r
                         else f"{r.get('error')} ref {r.get('baseline_us')}"), flush=True)
            rows.extend(new)
            merge_rows(out, header, rows, key=KEY, append_command=True)
    cross = crossover_rows(rows, base)
    for r in cross:
        print(f"crossover n={r['K']}: eager from M={r['eager_min_m']} {r['eager_kernel_wins']}, graph from "
              f"M={r['graph_min_m']} {r['graph_kernel_wins']}", flush=True)
    rows.extend(cross)
    merge_rows(out, header, rows, key=KEY, append_command=True)
    print(f"wrote {out} ({len(rows)} rows, {time.time() - t_start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
