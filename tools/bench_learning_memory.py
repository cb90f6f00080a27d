"""Host memory of learning a rotation (issue 20: KurTail at most a quarter of SpinQuant's peak), SmolLM2-135M.

    python tools/bench_learning_memory.py                  # every method -> bench/results/accuracy.json
    python tools/bench_learning_memory.py --steps 4 --out /tmp/mem.json
    python tools/bench_learning_memory.py --device cuda    # GPU memory, with the GPU accuracy rows' settings

``--device cuda``: each method with ``device=cuda`` and the settings of ``bench_rotation``'s GPU rows (KurTail's
defaults; SpinQuant's ``spinquant-gpu``: 8 windows of 512 a step, float weights in the loss), and the number is the
GPU memory the pass allocated at its peak above what was allocated when it began (``torch.cuda``'s
``max_memory_allocated``; the device copies of the params that calibration reads count for both).

Each method runs ``fold-norms,rotate(kind=...)`` with ``bench_rotation``'s row settings and its smallest batch
(KurTail: the residual streams collected once, one calibration sequence per forward (``batch_size=1``; the rows
use 8: the same tokens, the kept rows drawn per batch), then the kurtosis steps; SpinQuant: Cayley/Adam steps
through the whole fake-quantized network, ``calib_n=16, calib_len=256``, one window a step) in a fresh process with
``MALLOC_MMAP_THRESHOLD_``
fixed, so that every tensor above 128 KiB is resident exactly while it lives (``lowbit.calibration.memory``).
The number is the pass's ``learn_rss_above_start_mb``: the peak anonymous resident memory (``RssAnon``: without
the code pages a first forward and backward map in) its learning (KurTail: the collection too) added above what
the process held when it began, sampled every 2 ms by a thread. Memory per step
does not depend on how many steps run, so ``--steps`` (default 4) keeps the run short; the accuracy rows use 100
(KurTail) and 16 (SpinQuant). The model itself (~540 MB in float32) is resident before the pass for both and is
not in the number.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from bench_rotation import SPIN_GPU_STEPS
from results_io import machine, merge_rows
from results_io import versions as results_versions

KURTAIL_R2 = "kind=kurtosis,moment=16,learn_heads=true,calib_n=120,samples=7680,lr_schedule=cosine"
"""The ``w4a4kv4-kurtail-r2`` recipe's rotation (bench_rotation's ``kurtail-m16-r2-d120-s400c`` rows, 400 steps): R1
and the 30 per-layer R2s learned on 7680 tokens a site; R1's samples (60 sites x 7680 x 576 float32, 1012.5 MiB) set
its memory's floor, each layer's R2 learning as calibration passes it (``head_chunk_layers``)."""
METHODS = {
    "kurtail": "fold-norms,rotate(kind=kurtosis,steps={steps},batch_size=1,progress=false)",
    "kurtail-r2": f"fold-norms,rotate({KURTAIL_R2},steps={{steps}},batch_size=1,progress=false)",
    "spinquant": "fold-norms,rotate(kind=learned,calib_n=16,calib_len=256,steps={steps},progress=false)",
}
METHODS_GPU = {
    "kurtail": "fold-norms,rotate(kind=kurtosis,steps={steps},progress=false,device=cuda)",
    "kurtail-r2": f"fold-norms,rotate({KURTAIL_R2},steps={{steps}},progress=false,device=cuda)",
    "spinquant": f"fold-norms,{SPIN_GPU_STEPS.replace('progress=false', 'progress=false,device=cuda')}",
}
MMAP_THRESHOLD = "131072"
ROW_KEY = ("model", "scheme", "method", "variant", "eval", "device")


def child(method: str, steps: int, device: str) -> None:
    """Run one method's passes in this (fresh) process and print its memory figures as the last line."""
    from lowbit.calibration.memory import rss_mb
    from lowbit.ir.capture import capture
    from lowbit.models import load_model
    from lowbit.passes.manager import PassManager

    model, _, _ = load_model("smollm2")
    dyn = {"input_ids": {0: torch.export.Dim.DYNAMIC(min=1, max=1024), 1: torch.export.Dim.DYNAMIC(min=2, max=8192)}}
    graph = capture(model, (torch.randint(0, 49152, (2, 64)),), dyn)
    del model
    pipeline = (METHODS_GPU if device == "cuda" else METHODS)[method].format(steps=steps)
    before = rss_mb()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        gpu_start = torch.cuda.memory_allocated()
    report = PassManager(pipeline).run(graph)
    gpu = {} if device != "cuda" else {
        "learn_gpu_peak_mb": round((torch.cuda.max_memory_allocated() - gpu_start) / 2**20, 1)}
    learned = next(r.stats["learned"] for r in report.records if isinstance(r.stats.get("learned"), dict))
    print(json.dumps({"pipeline": pipeline, "rss_before_mb": before, **gpu, **{k: learned.get(k) for k in (
        "learn_rss_above_start_mb", "samples_mb", "collect_seconds", "learn_seconds", "steps", "calib_tokens")}}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--out", default="bench/results/accuracy.json")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                    help="cuda: the GPU memory of learning on the GPU (module docstring)")
    ap.add_argument("--child", choices=sorted(METHODS), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.steps, args.device)
        return
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": MMAP_THRESHOLD}
    date = datetime.date.today().isoformat()
    device = machine(args.device)
    header = {"command": "python " + " ".join(sys.argv), "date": date, "device": device,
              "versions": results_versions()}
    got: dict[str, dict] = {}
    for method in METHODS:
        proc = subprocess.run([sys.executable, __file__, "--child", method, "--steps", str(args.steps),
                               "--device", args.device], env=env,
                              capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise SystemExit(f"{method}: the child process failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
        got[method] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(method, got[method], flush=True)
    gpu = args.device == "cuda"
    figure = "learn_gpu_peak_mb" if gpu else "learn_rss_above_start_mb"
    spin = got["spinquant"][figure]
    rows = []
    for method, m in got.items():
        mb = m[figure]
        what = ("learning's peak GPU memory above the pass's start (max_memory_allocated), the GPU rows' settings"
                if gpu else f"learning step's peak host memory, fresh process, MALLOC_MMAP_THRESHOLD_={MMAP_THRESHOLD}")
        rows.append({
            "model": "smollm2-135m", "scheme": "w4a4kv4", "method": method, "variant": what,
            "eval": "gpu-memory" if gpu else "host-memory", "learn_rss_mb": m["learn_rss_above_start_mb"],
            **({"learn_gpu_mb": mb} if gpu else {}), "learn_samples_mb": m["samples_mb"],
            "ratio_to_spinquant": round(mb / spin, 4) if mb is not None and spin else None,
            "rss_before_mb": None if m["rss_before_mb"] is None else round(m["rss_before_mb"], 1),
            "steps": m["steps"], "calib_tokens": m["calib_tokens"], "learn_seconds": m["learn_seconds"],
            "collect_seconds": m["collect_seconds"], "pipeline": m["pipeline"], "command": header["command"],
            "device": device, "date": date})
    merge_rows(Path(args.out), header, rows, key=ROW_KEY, replace_header=False, append_command=True)


if __name__ == "__main__":
    main()
