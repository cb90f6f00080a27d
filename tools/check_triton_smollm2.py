"""SmolLM2 through ``backend="triton"`` against the torch reference backend on the same quantized graph.

    python tools/check_triton_smollm2.py [--windows 40] [--out bench/results/triton_smollm2.json]

Issue 17's accuracy goal: perplexity within 0.5% of the torch reference backend. The model is loaded in bf16
(the kernels take bf16/fp16 activations), quantized once per recipe, and lowered twice: ``backend="torch"``
(``keep_packed=True``: the reference ops on packed weights) and ``backend="triton"`` (kernels; CUDA graphs off).
Also records forward µs of one 1x512 window for each backend. Needs CUDA.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_io import machine  # noqa: E402

from lowbit.api import compile_graph, plan_compile  # noqa: E402
from lowbit.eval.perplexity import perplexity  # noqa: E402
from lowbit.ir.capture import capture  # noqa: E402
from lowbit.models import load_model  # noqa: E402
from lowbit.passes.manager import parse_pipeline  # noqa: E402

RECIPES = {"w4a16-g64": "fold-norms,quantize(w=int4,group=64,sym=false)",
           "w8a8": "fold-norms,quantize(w=int8,a=int8)",
           "fp8": "fold-norms,quantize(w=fp8e4m3,a=fp8e4m3)"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--out", default="bench/results/triton_smollm2.json")
    ap.add_argument("--no-compile", action="store_true", help="triton backend without torch.compile (same kernels)")
    args = ap.parse_args()
    out = Path(args.out)
    device, date = machine("cuda"), datetime.date.today().isoformat()
    model, tok, _ = load_model("smollm2", dtype=torch.bfloat16)
    model = model.to("cuda")
    ids = torch.arange(1, 129, dtype=torch.long).reshape(2, 64).cuda()
    dyn = {"input_ids": {0: torch.export.Dim.DYNAMIC(min=1, max=64), 1: torch.export.Dim.DYNAMIC(min=2, max=2048)}}
    base = capture(model, (ids,), dyn)
    base.meta["tokenizer"] = tok
    rows = []
    for name, pipeline in RECIPES.items():
        results = {}
        for backend, opts in (("torch", {"keep_packed": True}), ("triton", {"compile": not args.no_compile})):
            g = base.clone()
            runner, report = compile_graph(g, plan_compile(parse_pipeline(pipeline), backend, opts), device="cuda")
            ppl = perplexity(runner, "wikitext2-test", seq_len=512, max_windows=args.windows, tokenizer=tok,
                             progress=False, device="cuda")
            x = torch.randint(0, 49152, (1, 512), device="cuda")
            with torch.no_grad():
                for _ in range(3):
                    runner(x)
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                for _ in range(10):
                    runner(x)
                torch.cuda.synchronize()
            us = (time.perf_counter() - t0) / 10 * 1e6
            kernels = getattr(runner, "report", {}).get("kernels", {}) if backend == "triton" else {}
            fallback = getattr(runner, "report", {}).get("fallback", {}) if backend == "triton" else {}
            results[backend] = ppl.ppl
            rows.append({"model": "smollm2-135m", "recipe": name, "pipeline": pipeline, "backend": backend,
                         "eval": f"wt2-512x{args.windows}", "ppl": round(ppl.ppl, 4), "forward_1x512_us": round(us, 1),
                         "kernel_nodes": len(kernels), "fallback_nodes": len(fallback),
                         "fallback_reasons": sorted(set(fallback.values()))[:5], "device": device, "date": date})
            print(rows[-1], flush=True)
        rows.append({"model": "smollm2-135m", "recipe": name, "metric": "triton_vs_torch_ppl_rel",
                     "value": round(results["triton"] / results["torch"] - 1, 6), "device": device, "date": date})
        print(rows[-1], flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)  # after every recipe: a run stopped at its limit keeps them
        out.write_text(json.dumps({"command": "python " + " ".join(sys.argv), "date": date, "device": device,
                                   "versions": {"torch": torch.__version__}, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
