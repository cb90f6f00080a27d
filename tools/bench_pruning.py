"""Pruning accuracy on SmolLM2-135M: perplexity of sparse (2:4, unstructured) and structurally pruned models.

One run, one machine: the float model and every row are captured once, pruned from the same float graph and
scored on the same windows, so ``ratio = value / float_value`` compares like with like.

    python tools/bench_pruning.py [--eval wt2-512x40] [--windows 8] [--match REGEX] [--out bench/results/pruning.json]

Rows are merged into the results file by (model, scheme, method, variant, eval, device). ``scheme`` follows
../shared/RESULTS.md (``2:4``, ``unstructured-50``, ``structured-20``, ``2:4+w4a16``); structured rows carry the
fraction of parameters removed, of the transformer blocks' linears (``params_removed_frac_blocks``) and of the
whole model with its tied embedding (``params_removed_frac_total``). No recovery (distillation) step: that needs
a GPU; every structured row is one-shot.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import re
import sys
import time
from pathlib import Path

import torch
from results_io import machine, merge_rows

from lowbit.backends.torch_backend import TorchCompiled
from lowbit.eval import EVALS, perplexity
from lowbit.ir.capture import capture
from lowbit.models import load_model
from lowbit.passes.manager import PassManager

CAL = "calib_n=16,progress=false"
CAL_S = "calib_n=8,progress=false"
# (scheme, method, variant, pipeline)
ROWS: list[tuple[str, str, str, str | None]] = [
    ("float", "float", "", None),
    ("2:4", "sparsegpt", "", f"sparsify(method=sparsegpt,pattern=2:4,{CAL})"),
    ("2:4", "wanda", "", f"sparsify(method=wanda,pattern=2:4,{CAL})"),
    ("2:4", "magnitude", "", "sparsify(method=magnitude,pattern=2:4)"),
    ("structured-20", "flap", "mlp channels, fluctuation + bias compensation, global allocation",
     f"prune-mlp(ratio=0.27,score=fluctuation,compensate=true,allocation=global,{CAL_S})"),
    ("unstructured-50", "sparsegpt", "", f"sparsify(method=sparsegpt,sparsity=0.5,{CAL})"),
    ("unstructured-50", "wanda", "", f"sparsify(method=wanda,sparsity=0.5,{CAL})"),
    ("unstructured-50", "magnitude", "", "sparsify(method=magnitude,sparsity=0.5)"),
    ("2:4+w4a16", "sparsegpt+gptq", "sparsegpt 2:4, then gptq w4 g64 asym keeping the zeros",
     f"sparsify(method=sparsegpt,pattern=2:4,{CAL}),gptq(w=int4,group=64,sym=false,{CAL})"),
    ("structured-20", "wanda", "mlp channels, global allocation",
     f"prune-mlp(ratio=0.27,allocation=global,{CAL_S})"),
    ("structured-20", "flap", "mlp channels (uniform 25%) + 10% of kv groups (global), fluctuation + compensation",
     (f"prune-mlp(ratio=0.25,score=fluctuation,compensate=true,{CAL_S}),"
      f"prune-heads(ratio=0.1,score=fluctuation,compensate=true,allocation=global,{CAL_S})")),
    ("structured-20", "block-influence", "6 of 30 blocks removed", f"prune-blocks(n=6,{CAL_S})"),
    ("structured-10", "flap", "mlp channels, fluctuation + bias compensation, global allocation",
     f"prune-mlp(ratio=0.135,score=fluctuation,compensate=true,allocation=global,{CAL_S})"),
    ("structured-30", "flap", "mlp channels, fluctuation + bias compensation, global allocation",
     f"prune-mlp(ratio=0.4,score=fluctuation,compensate=true,allocation=global,{CAL_S})"),
]


def _block_linear_params(g) -> int:
    return sum(n.args[1].data.numel() for n in g.find("linear", r"^model\.layers\.") if n.args[1].is_param)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--eval", default="wt2-512x40", choices=sorted(EVALS))
    ap.add_argument("--windows", type=int, default=None, help="override the eval's window count")
    ap.add_argument("--match", default="", help="regex on 'scheme:method:variant' selecting rows (float always runs)")
    ap.add_argument("--out", default="bench/results/pruning.json")
    args = ap.parse_args()
    dev_name = machine("cpu")
    model, tok, kind = load_model(args.model)
    assert kind == "causal-lm"
    spec = dict(EVALS[args.eval])
    if args.windows is not None:
        spec["max_windows"] = args.windows
    eval_name = args.eval if args.windows is None else f"wt2-{spec['seq_len']}x{args.windows}"
    graph = capture(model, (torch.randint(0, 49152, (1, 64)),),
                    dynamic_shapes={"input_ids": {1: torch.export.Dim.DYNAMIC(min=2, max=8192)}})
    block_params = _block_linear_params(graph)
    total_params = sum(v.data.numel() for v in graph.params.values())
    import lowbit

    header = {
        "command": "python " + " ".join(sys.argv),
        "date": datetime.date.today().isoformat(),
        "device": dev_name,
        "versions": {"lowbit": lowbit.__version__, "torch": torch.__version__,
                     "transformers": __import__("transformers").__version__, "python": platform.python_version()},
        "notes": ("One-shot pruning, no recovery/distillation (CPU only). Calibration: the shipped WikiText-2 "
                  "validation text (wikitext2-valid-calib), 512-token windows; calib count in each row's pipeline. "
                  "Structured rows: params_removed_frac_blocks = removed / params of the 30 blocks' linears "
                  f"({block_params}); params_removed_frac_total = removed / all params ({total_params}, tied "
                  "embedding once)."),
    }
    out = Path(args.out)
    rows: list[dict] = []
    float_value = None
    for scheme, method, variant, pipeline in ROWS:
        if args.match and scheme != "float" and not re.search(args.match, f"{scheme}:{method}:{variant}"):
            continue
        g = graph.clone()
        t1 = time.perf_counter()
        stats: dict = {}
        if pipeline is not None:
            report = PassManager(pipeline).run(g)
            stats = {r.spec: r.stats for r in report.records}
        pass_s = time.perf_counter() - t1
        r = perplexity(TorchCompiled(g), "wikitext2-test", tokenizer=tok, progress=False, **spec)
        if scheme == "float":
            float_value = r.ppl
        removed = total_params - sum(v.data.numel() for v in g.params.values())
        row = {
            "model": "smollm2-135m", "scheme": scheme, "method": method, "variant": variant, "eval": eval_name,
            "value": round(r.ppl, 4), "float_value": round(float_value, 4) if float_value else None,
            "ratio": round(r.ppl / float_value, 4) if float_value else None,
            "pipeline": pipeline or "", "calib": "wikitext2-valid-calib" if pipeline and "calib_n" in pipeline else "",
            "pass_seconds": round(pass_s, 1), "seconds": round(r.seconds, 1),
            "param_mb": round(g.param_bytes() / 2**20, 1), "device": dev_name, "date": header["date"],
        }
        if scheme.startswith("structured"):
            row["params_removed_frac_blocks"] = round(removed / block_params, 4)
            row["params_removed_frac_total"] = round(removed / total_params, 4)
            row["recovery"] = "none"
        for st in stats.values():
            for k in ("sparsity_measured", "widths", "heads", "blocks_removed"):
                if k in st:
                    row[k] = st[k] if k != "widths" else sorted(set(st[k].values()))
        rows.append(row)
        print(json.dumps(row), flush=True)
        merge_rows(out, header, rows)
        del g


if __name__ == "__main__":
    main()
