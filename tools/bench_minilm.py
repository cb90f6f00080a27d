"""MiniLM (all-MiniLM-L6-v2) quantized by lowbit: mean cosine of its sentence embeddings to the float model's.

    python tools/bench_minilm.py                  # every row -> merged into bench/results/accuracy.json
    python tools/bench_minilm.py --match gptq     # some rows

One run, one machine: the float encoder is captured once, every row quantizes a clone of that graph and embeds
the same real sentences (``--sentences`` of 6-60 words spread over the WikiText-2 test split, shipped with
lowbit), and the cosine to the float embedding is taken sentence by sentence (``value`` = mean, ``min_cos`` =
worst). GPTQ calibrates on WikiText-2 validation windows shaped like the evaluated inputs: ``[CLS]`` + 30 tokens
+ ``[SEP]``, 4096 of them (all-MiniLM-L6-v2 was trained on sentences; 128- or 512-token windows calibrate it worse, see the
variants). Rows are merged into the results file by (model, scheme, method, variant, eval, device).
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import resource
import sys
import time
from pathlib import Path

import torch
from results_io import machine, merge_rows

CALIB = "../shared/data/wikitext2_valid_tokenized.txt"

# (scheme, method, variant, pipeline); {cal} becomes the calibration options
ROWS: list[tuple[str, str, str, str | None]] = [
    ("float", "float", "", None),
    ("w8a8", "rtn", "per-channel W8, per-token dynamic A8", "quantize(w=int8,a=int8)"),
    ("fp8", "rtn", "e4m3 per-channel W, per-token A", "quantize(w=fp8e4m3,a=fp8e4m3)"),
    ("w4a16-g64", "rtn", "asym", "quantize(w=int4,group=64,sym=false)"),
    ("w4a16-g64", "gptq", "asym, calib 4096 x 32, damp 0.003",
     "gptq(w=int4,group=64,sym=false,damp=0.003,calib_n=4096,calib_len=32,{cal})"),
    ("w4a16-g64", "gptq", "asym, calib 4096 x 32", "gptq(w=int4,group=64,sym=false,calib_n=4096,calib_len=32,{cal})"),
    ("w4a16-g64", "gptq", "asym, calib 64 x 128", "gptq(w=int4,group=64,sym=false,calib_n=64,calib_len=128,{cal})"),
    ("w4a16-g64", "awq", "asym, calib 1024 x 32", "awq(w=int4,group=64,sym=false,calib_n=1024,calib_len=32,{cal})"),
    ("w4a16-g64", "autoround", "awq scales + clip start, 200 steps, calib 4096 x 32",
     "autoround(w=int4,group=64,sym=false,awq=true,clip=true,calib_n=4096,calib_len=32,{cal})"),
    ("w4a16-g32", "rtn", "asym", "quantize(w=int4,group=32,sym=false)"),
    ("w4a16-g32", "gptq", "asym, calib 4096 x 32, damp 0.003",
     "gptq(w=int4,group=32,sym=false,damp=0.003,calib_n=4096,calib_len=32,{cal})"),
    ("w4a16-pc", "rtn", "asym", "quantize(w=int4,sym=false)"),
    ("w4a16-pc", "gptq", "asym, calib 4096 x 32, damp 0.003",
     "gptq(w=int4,sym=false,damp=0.003,calib_n=4096,calib_len=32,{cal})"),
    ("w4a16-pc", "autoround", "rtn start, 200 steps, calib 4096 x 32",
     "autoround(w=int4,sym=false,calib_n=4096,calib_len=32,{cal})"),
    ("w4a8", "gptq", "g64 asym (damp 0.003, calib 4096 x 32) + per-token A8",
     "gptq(w=int4,group=64,sym=false,damp=0.003,calib_n=4096,calib_len=32,{cal}),quantize(a=int8)"),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results/accuracy.json")
    ap.add_argument("--calib", default=CALIB, help="calibration text (default: WikiText-2 validation)")
    ap.add_argument("--sentences", type=int, default=256, help="WikiText-2 test sentences to embed")
    ap.add_argument("--match", default="", help="regex on 'scheme:method:variant' selecting rows (float always runs)")
    args = ap.parse_args()

    import lowbit
    from lowbit.backends.torch_backend import TorchCompiled
    from lowbit.eval.embedding import embedding_similarity, load_sentences
    from lowbit.ir.capture import capture
    from lowbit.models import load_model
    from lowbit.passes.manager import PassManager

    model, tok, _ = load_model("minilm")
    sentences = load_sentences(args.sentences)
    dyn = {"input_ids": {0: torch.export.Dim.DYNAMIC, 1: torch.export.Dim.DYNAMIC},
           "attention_mask": {0: torch.export.Dim.DYNAMIC, 1: torch.export.Dim.DYNAMIC}}
    example = tok(sentences[:2], padding=True, return_tensors="pt")
    graph = capture(model, (example["input_ids"], example["attention_mask"]), dyn)
    today = datetime.date.today().isoformat()
    device = machine()
    header = {"command": "python " + " ".join(sys.argv), "date": today, "device": device,
              "versions": {"lowbit": lowbit.__version__, "torch": torch.__version__,
                           "transformers": __import__("transformers").__version__}}
    cal = f"calib={args.calib},tokenizer=minilm,progress=false"
    rows: list[dict] = []
    for scheme, method, variant, pipe in ROWS:
        if args.match and scheme != "float" and not re.search(args.match, f"{scheme}:{method}:{variant}"):
            continue
        pipeline = pipe.format(cal=cal) if pipe else ""
        g = graph.clone()
        t0 = time.perf_counter()
        stats = []
        if pipeline:
            report = PassManager(pipeline, verify_each=True).run(g)
            stats = [{"pass": rec.spec.split("(")[0], **rec.stats} for rec in report.records]
        pass_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        r = embedding_similarity(model, TorchCompiled(g), tok, sentences)
        calib = re.search(r"calib_n=(\d+),calib_len=(\d+)", pipeline)
        row = {"model": "minilm-l6", "scheme": scheme, "method": method, "variant": variant, "eval": "minilm-cos",
               "value": round(r.mean_cos, 5), "min_cos": round(r.min_cos, 5), "float_value": 1.0,
               "sentences": r.n, "calib": f"{Path(args.calib).name} {calib[1]}x{calib[2]}" if calib else None,
               "pipeline": pipeline, "pass_seconds": round(pass_s, 1), "seconds": round(time.perf_counter() - t1, 1),
               "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
               "device": device, "date": today, "command": header["command"], "pass_stats": stats}
        rows.append(row)
        print(json.dumps({k: row[k] for k in ("scheme", "method", "variant", "value", "min_cos", "pass_seconds")}),
              flush=True)
        merge_rows(Path(args.out), header, rows, replace_header=False)


if __name__ == "__main__":
    main()
