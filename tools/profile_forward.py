"""Where one forward of ``bench_e2e``'s rows spends its GPU time: HF bf16 ``torch.compile`` against
``compile_model(backend="triton", cuda_graphs=True)``, kernels by name and by kind.

    python tools/profile_forward.py [--shapes 16x128,1x2048] [--schemes w4a16-g128] [--run LABEL]
                                    [--out bench/results/profile_forward.json]

The 7B-shaped 4-layer Llama of ``tools/bench_e2e.py`` (same seed, same compile options as its rows): each path
is built, warmed up, timed (``do_bench`` median, as bench_e2e times it) and profiled over 5 forwards; the table
is device µs per forward for the heaviest kernels, and the totals by kind (GEMM, dequantize, attention, other),
so the gap between the two paths is read kernel by kind instead of guessed. Rows (``forward_profile/total``,
``/by_kind``, ``/top``) merge into ``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_e2e  # noqa: E402
from results_io import machine, merge_rows  # noqa: E402

KINDS = (("dequant", ("dequant",)), ("attention", ("flash", "attention", "fmha", "sdpa", "attn")),
         ("gemm", ("gemm", "nvjet", "cutlass", "sm90_xmma", "cublas", "_tc_", "_gemv", "mm_")))
REPS = 5


def kind(name: str) -> str:
    low = name.lower()
    for k, keys in KINDS:
        if any(s in low for s in keys):
            return k
    return "other"


def table(fn, ids: torch.Tensor) -> dict[str, tuple[float, int]]:
    with torch.no_grad():
        fn(ids)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(REPS):
                fn(ids)
            torch.cuda.synchronize()
    return {e.key: (e.self_device_time_total / REPS, e.count / REPS) for e in prof.key_averages()
            if e.self_device_time_total > 0}


def report(label: str, us: float, t: dict[str, tuple[float, int]], top: int) -> list[dict]:
    by_kind: dict[str, float] = {}
    for name, (d, _) in t.items():
        by_kind[kind(name)] = by_kind.get(kind(name), 0.0) + d
    total = sum(d for d, _ in t.values())
    print(f"== {label}: {us:.1f} us per forward (do_bench), device {total:.1f} us; "
          + ", ".join(f"{k} {v:.1f}" for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])), flush=True)
    rows = sorted(t.items(), key=lambda kv: -kv[1][0])
    for name, (d, c) in rows[:top]:
        print(f"{d:9.1f} us {c:6.1f}x [{kind(name)}] {name[:120]}", flush=True)
    return [{"kernel": "forward_profile/total", "us": round(us, 1), "device_us": round(total, 1)}] + [
        {"kernel": "forward_profile/by_kind", "kind": k, "us": round(v, 1)} for k, v in by_kind.items()] + [
        {"kernel": "forward_profile/top", "name": n[:200], "us": round(d, 1), "count": c, "kind": kind(n)}
        for n, (d, c) in rows[:top]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="16x128,1x2048")
    ap.add_argument("--schemes", default="w4a16-g128")
    ap.add_argument("--top", type=int, default=20)
    ap.add_argument("--out", default="bench/results/profile_forward.json", help="rows merge here ('' : print only)")
    ap.add_argument("--run", default="", help="a label every row carries (rows of other runs are kept)")
    a = ap.parse_args()
    shapes = [tuple(int(v) for v in s.split("x")) for s in a.shapes.split(",")]
    ref = bench_e2e.build_hf()
    paths = {"hf-bf16 torch.compile": torch.compile(ref, dynamic=True)}
    paths = {k: (lambda ids, m=m: m(ids, use_cache=False).logits) for k, m in paths.items()}
    for name in a.schemes.split(","):
        paths[f"lowbit {name} triton+cudagraphs"] = bench_e2e.compile_triton(ref, bench_e2e.PIPELINES[name], True)
    device, date = machine("cuda"), datetime.date.today().isoformat()
    rows = []
    for b, s in shapes:
        torch.manual_seed(0)
        ids = torch.randint(0, 32000, (b, s), device="cuda")
        for label, fn in paths.items():
            us = bench_e2e.time_forward(fn, b, s)
            rows += [dict(r, path=label, shape=f"{b}x{s}", run=a.run, device=device, date=date)
                     for r in report(f"{label} {b}x{s}", us, table(fn, ids), a.top)]
    if a.out:
        import transformers
        import triton
        header = {"command": "python " + " ".join(sys.argv), "date": date, "device": device,
                  "versions": {"torch": torch.__version__, "triton": triton.__version__,
                               "transformers": transformers.__version__}}
        merge_rows(Path(a.out), header, rows, key=("run", "kernel", "path", "shape", "kind", "name"),
                   append_command=True)


if __name__ == "__main__":
    main()
