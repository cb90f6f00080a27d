"""Cost of calibration: GPTQ W4 (group 64) of SmolLM2-135M with 128 × 512 calibration tokens, wall and CPU time.

    python tools/bench_calibration.py            # -> bench/results/calibration.json (rows merged by device)
    python tools/bench_calibration.py --device cuda

Run it on an otherwise idle machine: the row records the load average before and after, so a loaded run is
visible as such. The pass is the one the accuracy table scores (``gptq(w=int4,group=64,sym=false)``, act-order,
static groups, damp 0.01); its ``gptq_loss`` ties the row to that result.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

import torch
from results_io import machine, merge_rows

CALIB = "../shared/data/wikitext2_valid_tokenized.txt"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results/calibration.json")
    ap.add_argument("--calib", default=CALIB)
    ap.add_argument("--device", default=None, help="where calibration runs (default: the CPU)")
    args = ap.parse_args()

    import lowbit
    from lowbit.ir.capture import capture
    from lowbit.models import load_model
    from lowbit.passes.manager import PassManager

    model, _, _ = load_model("smollm2")
    dyn = {"input_ids": {0: torch.export.Dim.DYNAMIC(min=1, max=1024), 1: torch.export.Dim.DYNAMIC(min=2, max=8192)}}
    graph = capture(model, (torch.randint(0, 49152, (2, 64)),), dyn)
    del model
    pipeline = (f"gptq(w=int4,group=64,sym=false,calib={args.calib},calib_n=128,calib_len=512,progress=false"
                + (f",device={args.device})" if args.device else ")"))
    load_before = os.getloadavg()
    wall, cpu = time.perf_counter(), time.process_time()
    report = PassManager(pipeline).run(graph)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    stats = report.records[0].stats
    device = machine(args.device or "cpu")
    row = {"model": "smollm2-135m", "scheme": "w4a16-g64", "method": "gptq", "calib": "128x512",
           "pipeline": pipeline, "seconds": round(wall, 1), "cpu_seconds": round(cpu, 1),
           "seconds_calibration_engine": round(stats.get("seconds_calibration_engine", 0.0), 1),
           "seconds_rounding": round(stats.get("seconds_rounding", 0.0), 1),
           "gptq_loss": stats.get("gptq_loss"), "load_avg_before": round(load_before[0], 2),
           "load_avg_after": round(os.getloadavg()[0], 2),
           "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
           "device": device, "date": datetime.date.today().isoformat(), "command": "python " + " ".join(sys.argv)}
    header = {"command": row["command"], "date": row["date"], "device": "per row",
              "versions": {"lowbit": lowbit.__version__, "torch": torch.__version__, "python": platform.python_version()}}
    merge_rows(Path(args.out), header, [row], key=("model", "scheme", "method", "device"))
    print(json.dumps(row))


if __name__ == "__main__":
    main()
