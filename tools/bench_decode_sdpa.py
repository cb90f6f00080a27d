"""Decode-step attention over a float KV cache: lowbit's ``decode_sdpa`` (flash-decoding, chunk x warps) vs torch's
``scaled_dot_product_attention`` with the step graph's boolean mask, side by side in one run ->
bench/results/attention.json (``area = decode-sdpa``).

Shapes are the decode steps of the 7B-shaped stack (``tools/bench_generate.py``: 32 heads of 128, a 768-slot cache
at position 600) at batch 1 and 16, and a GQA 4 variant. Each config is checked against the reference first
(``max_abs_err``), then timed as a CUDA graph of 20 calls with the L2 flushed (``bench_attention._time_us``).

    python tools/bench_decode_sdpa.py --out $OUT/attention.json          # on the GPU
    python tools/bench_decode_sdpa.py --shapes 1x9x3x768x64x600,16x9x3x768x64x600   # SmolLM2's step (b x hq x hkv
                                                                          # x slots x head_dim x position)
    TRITON_INTERPRET=1 python tools/bench_decode_sdpa.py --smoke          # checks the script on CPU (writes nothing)

Each config is timed twice: the two launches of ``decode_sdpa`` (split, then ``_sdpa_merge``) and ``+merge`` - the
split's last program per (sequence, kv head) merging (``merge_in_split``, what the decode step's opaque ops run).
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from bench_attention import _time_us  # noqa: E402
from results_io import machine, merge_rows  # noqa: E402
from results_io import versions as results_versions  # noqa: E402

OUT = ROOT / "bench" / "results" / "attention.json"
KEY = ("area", "batch", "heads", "kv_heads", "head_dim", "context", "kernel", "config", "device")
CONFIGS = [(64, 4), (32, 4), (32, 2), (64, 2), (128, 4), (128, 8), (16, 2), (16, 1), (32, 1)]
"""(chunk, warps) of ``_sdpa_split``; the first is the op's default."""


def bench(b: int, hq: int, hkv: int, s: int, d: int, pos: int, dev: str) -> list[dict]:
    from lowbit.kernels import decode_step as ds

    base = {"area": "decode-sdpa", "batch": b, "heads": hq, "kv_heads": hkv, "head_dim": d, "context": s,
            "position": pos}
    torch.manual_seed(0)
    q = torch.randn(b, hq, 1, d, device=dev, dtype=torch.bfloat16)
    k = torch.randn(b, hkv, s, d, device=dev, dtype=torch.bfloat16)
    v = torch.randn(b, hkv, s, d, device=dev, dtype=torch.bfloat16)
    mask = (torch.arange(s, device=dev) <= pos).view(1, 1, 1, s).expand(b, 1, 1, s).contiguous()
    gqa = hq != hkv
    ref = ds.decode_sdpa_ref(q.float(), k.float(), v.float(), mask, None, gqa)
    rows = []
    sdpa_us = _time_us(lambda: ds.decode_sdpa_ref(q, k, v, mask, None, gqa), dev, True)
    rows.append({**base, "kernel": "torch-sdpa-bf16", "config": "default", "us": round(sdpa_us, 2)})
    chunk0, warps0 = ds.DECODE_SDPA_CHUNK, ds.DECODE_SDPA_WARPS
    try:
        for chunk, warps in CONFIGS:
            ds.DECODE_SDPA_CHUNK, ds.DECODE_SDPA_WARPS = chunk, warps
            for merge in (False, True):
                row = {**base, "kernel": "lowbit-decode-sdpa",
                       "config": f"chunk={chunk},warps={warps}" + (",merge-in-split" if merge else "")}
                call = lambda: ds._decode_sdpa(q, k, v, mask, None, gqa, merge_in_split=merge)  # noqa: E731
                try:
                    row["max_abs_err"] = float((call().float() - ref).abs().max())  # (makes the merge's counters)
                    row["us"] = round(_time_us(call, dev, True), 2)
                    row["speedup"] = round(sdpa_us / row["us"], 3)
                except Exception as exc:  # noqa: BLE001 - a failing config becomes a row
                    row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
                rows.append(row)
                print(row, flush=True)
    finally:
        ds.DECODE_SDPA_CHUNK, ds.DECODE_SDPA_WARPS = chunk0, warps0
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (TRITON_INTERPRET=1); writes nothing")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--shapes", default="", help="comma list of BxHQxHKVxSLOTSxHEAD_DIMxPOSITION (default: the 7B "
                    "step's four)")
    args = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    shapes = [(1, 4, 2, 96, 32, 70)] if args.smoke else [
        (1, 32, 32, 768, 128, 600), (16, 32, 32, 768, 128, 600), (1, 32, 8, 768, 128, 600), (1, 32, 32, 4096, 128, 4000)]
    if args.shapes:
        shapes = [tuple(int(v) for v in shape.split("x")) for shape in args.shapes.split(",")]
        bad = [shape for shape in shapes if len(shape) != 6]
        if bad:
            raise SystemExit(f"--shapes: {bad} - each shape is BxHQxHKVxSLOTSxHEAD_DIMxPOSITION (six numbers)")
    rows = [r for shape in shapes for r in bench(*shape, dev)]
    if args.smoke:
        return
    date = datetime.datetime.now(datetime.timezone.utc).date().isoformat()
    dev_name = machine(dev)
    for r in rows:
        r.update(device=dev_name, date=date)
    header = {"command": "python " + " ".join(sys.argv), "date": date, "device": dev_name,
              "versions": results_versions()}
    merge_rows(args.out, header, rows, key=KEY, replace_header=False, append_command=True)


if __name__ == "__main__":
    main()
