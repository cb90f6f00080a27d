"""Round-to-nearest accuracy of lowbit's ``quantize`` pass on SmolLM2-135M: wt2-512x40 perplexity.

One run, one machine: the float model and every scheme are captured once, quantized from the same float graph
and scored on the same 40 windows, so the ratios ``value / float_value`` compare like with like.

    python tools/bench_rtn.py [--out bench/results/accuracy_rtn_draft.json] [--device cuda] [--model PATH.gguf]

Rows are merged into the results file by (model, scheme, method, variant, eval, device), as the other benchmarks do.

Each row's ``pipeline`` is the exact pass pipeline applied; ``scheme`` follows ../shared/RESULTS.md names, and
variants of one scheme (observer, symmetry, KV group/window) carry a ``variant`` key.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import torch
from results_io import accuracy_header, machine, merge_rows

from lowbit.backends.torch_backend import TorchCompiled
from lowbit.eval import EVALS, perplexity
from lowbit.ir.capture import capture
from lowbit.models import load_model
from lowbit.passes.manager import PassManager
from lowbit.recipes import get_recipe

# (scheme, variant, pipeline): "recipe:NAME" takes the pipeline from lowbit.recipes, so the table measures exactly
# what a user gets; the other rows are the variants that were tried around each recipe
SCHEMES: list[tuple[str, str, str | None]] = [
    ("float", "", None),
    ("w8a8", "per-token A8", "recipe:w8a8"),
    ("w8a8", "A8 per 64-channel group of each token", "recipe:w8a8-g64"),
    ("w8a8", "a_sym=false", "quantize(w=int8,a=int8,a_sym=false)"),
    ("w8a8", "w_obs=mse", "quantize(w=int8,a=int8,w_obs=mse)"),
    ("w8a16", "diagnostic: weights only", "quantize(w=int8)"),
    ("a8", "diagnostic: activations only", "quantize(a=int8)"),
    ("fp8", "per-channel W, per-token A", "recipe:fp8"),
    ("fp8", "weights only", "quantize(w=fp8e4m3)"),
    ("fp8", "a_group=64", "quantize(w=fp8e4m3,a=fp8e4m3,a_group=64)"),
    ("w4a16-g64", "asym", "recipe:w4a16-g64"),
    ("w4a16-g64", "sym", "quantize(w=int4,group=64)"),
    ("w4a16-g64", "asym,w_obs=mse", "quantize(w=int4,group=64,sym=false,w_obs=mse)"),
    ("w4a16-g128", "g128 where it divides K, g64 where K=576", "recipe:w4a16-g128"),
    ("w4a16-pc", "asym", "recipe:w4a16-pc"),
    ("w4a16-pc", "sym", "quantize(w=int4)"),
    ("w4a16-pc", "asym,w_obs=mse", "quantize(w=int4,sym=false,w_obs=mse)"),
    ("w4a8", "g64 asym W, per-token A8", "recipe:w4a8"),
    ("w4a8", "per-channel asym W", "quantize(w=int4,sym=false,a=int8)"),
    ("w4a8", "g64 asym W, A8 per 64 channels", "quantize(w=int4,group=64,sym=false,a=int8,a_group=64)"),
    ("w8a8kv4", "k per-channel/32 tokens, v per-token, sink 1, window 32", "recipe:w8a8kv4"),
    ("w8a8kv4", "g64, no sink/window", "quantize(w=int8,a=int8,kv=int4,kv_group=64)"),
    ("w8a8kv4", "g32, no sink/window", "quantize(w=int8,a=int8,kv=int4,kv_group=32)"),
    ("w8a8kv4", "g32, sink 1", "quantize(w=int8,a=int8,kv=int4,kv_group=32,kv_sink=1)"),
    ("w8a8kv4", "on w8a8-g64", "quantize(w=int8,a=int8,a_group=64,kv=int4,kv_group=32,kv_sink=1,kv_window=32)"),
    ("w8a8kv2", "k per-channel/32 tokens, v per-token/16, sink 1, window 64", "recipe:w8a8kv2"),
    ("w8a8kv2", "g32, window 32", "quantize(w=int8,a=int8,kv=int2,kv_group=32,kv_window=32)"),
    ("w8a8kv2", "g32, window 128", "quantize(w=int8,a=int8,kv=int2,kv_group=32,kv_window=128)"),
    ("w8a8kv2", "g16, sink 1, window 32", "quantize(w=int8,a=int8,kv=int2,kv_group=16,kv_sink=1,kv_window=32)"),
    ("w8a8kv2", "on w8a8-g64",
     "quantize(w=int8,a=int8,a_group=64,kv=int2,k_group=32,v_group=16,kv_sink=1,kv_window=64)"),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2", help="smollm2 or a SmolLM2 .gguf path")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the model's)")
    ap.add_argument("--eval", default="wt2-512x40", choices=sorted(EVALS))
    ap.add_argument("--windows", type=int, default=None, help="override the eval's window count (smoke runs)")
    ap.add_argument("--only", default="", help="comma-separated schemes to run (default: all)")
    ap.add_argument("--match", default="", help="regex on 'scheme:variant' selecting rows (float always runs)")
    ap.add_argument("--out", default="bench/results/accuracy_rtn_draft.json")
    args = ap.parse_args()

    device = torch.device(args.device)
    dev_name = machine(device)
    model, tok, kind = load_model(args.model)
    assert kind == "causal-lm"
    if args.tokenizer:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(args.tokenizer, local_files_only=True)
    from lowbit.eval import token_ids

    n_tokens = int(token_ids("wikitext2-test", tok).numel())
    print(f"wikitext2-test: {n_tokens} tokens", flush=True)
    spec = dict(EVALS[args.eval])
    if args.windows is not None:
        spec["max_windows"] = args.windows
    t0 = time.perf_counter()
    try:
        graph = capture(model, (torch.randint(0, 49152, (1, 64)),),
                        dynamic_shapes={"input_ids": {1: torch.export.Dim.DYNAMIC(min=2, max=8192)}})
    except Exception as exc:  # older torch.export (2.11) rejects SmolLM2's GQA guard on a dynamic seq
        print(f"dynamic capture failed ({str(exc).splitlines()[0][:120]}); capturing at seq {spec['seq_len']}")
        graph = capture(model, (torch.randint(0, 49152, (1, spec["seq_len"])),))
    capture_s = time.perf_counter() - t0
    only = {s for s in args.only.split(",") if s}
    rows = []
    out = Path(args.out)
    float_value = None

    header = accuracy_header(
        dev_name,
        notes=("RTN (round to nearest) only: no GPTQ/AWQ/SmoothQuant. SmolLM2's shipped weights are Q4_1 "
               "(asymmetric, block 32) dequantized; asymmetric group-32 RTN does not reproduce them (Q4_1's float "
               "block minimum is not on an integer zero point: 8.2% relative error on layer 0's down_proj, 9.4% "
               "at group 64). Weight-only rows use group 64/128 and per channel. KV rows quantize keys after "
               "rotary and values at [batch, kv_heads, seq, head_dim]; window = tokens each query reads "
               "unquantized."),
        capture_seconds=round(capture_s, 1),
        wikitext2_test_tokens=n_tokens,
    )
    for scheme, variant, spec_text in SCHEMES:
        recipe = spec_text.split(":", 1)[1] if spec_text and spec_text.startswith("recipe:") else ""
        pipeline = get_recipe(recipe) if recipe else spec_text
        if only and scheme not in only and scheme != "float":
            continue
        if args.match and scheme != "float" and not re.search(args.match, f"{scheme}:{variant}"):
            continue
        g = graph.clone()
        t1 = time.perf_counter()
        stats = {}
        if pipeline is not None:
            report = PassManager(pipeline).run(g)
            stats = report.records[-1].stats
        pass_s = time.perf_counter() - t1
        compiled = TorchCompiled(g, device)
        r = perplexity(compiled, "wikitext2-test", tokenizer=tok, progress=False, device=device, **spec)
        if scheme == "float":
            float_value = r.ppl
        row = {
            "model": "smollm2-135m", "scheme": scheme, "variant": variant, "method": "rtn" if pipeline else "float",
            "eval": args.eval if args.windows is None else f"{args.eval}[:{args.windows}]",
            "value": round(r.ppl, 4), "float_value": round(float_value, 4) if float_value else None,
            "ratio": round(r.ppl / float_value, 4) if float_value else None,
            "pipeline": pipeline or "", "recipe": recipe, "pass_seconds": round(pass_s, 1), "seconds": round(r.seconds, 1),
            "param_mb": round(g.param_bytes() / 2**20, 1),
            "device": dev_name, "date": header["date"],
        }
        if stats:
            row["param_bytes_before"] = stats.get("param_bytes_before")
            row["param_bytes_after"] = stats.get("param_bytes_after")
        rows.append(row)
        print(json.dumps(row), flush=True)
        merge_rows(out, header, rows)
        del compiled, g
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
