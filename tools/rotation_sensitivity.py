"""Where the W4A4KV4 error comes from: the best recipe with one quantizer group back at (near) float at a time.

    python tools/rotation_sensitivity.py                          # CPU, wt2-512x8
    python tools/rotation_sensitivity.py --weights float         # the same with float weights (no GPTQ)
    python tools/rotation_sensitivity.py --device cuda --eval wt2-512x40 --out sens.json

The rotated, GPTQ-quantized graph is built once (``--head``); each variant then runs the activation/KV
quantization (``--tail`` with some sites left out) on a clone and is scored on WikiText-2 test windows.
``weights-float`` runs the tail on the rotated graph without GPTQ. Activation groups are left out through the
``quantize`` pass's ``modules`` scope (q/k/v share one input chain, so do gate/up); ``keys-float`` /
``values-float`` keep that half of the cache at 8 bits (per token per head), the closest the ``quantize`` options
come to float for one half. Blocks: activations and KV of those blocks float (their weights stay GPTQ W4).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time

import torch

KV = "kv=int4,k_gran=per_token,v_gran=per_token,kv_group=64"
ROTATE_ONLY = "fold-norms,rotate(kind=kurtosis,progress=false)"
GPTQ = "gptq(w=int4,sym=false,calib=wikitext2-valid-calib,calib_n=16,calib_len=512,progress=false)"
HEAD = f"{ROTATE_ONLY},{GPTQ}"
TAIL = f"quantize(a=int4,{KV},a_clip=0.9)"


def _blocks_except(lo: int, hi: int, n: int) -> str:
    return r"layers\.(" + "|".join(str(i) for i in range(n) if not lo <= i <= hi) + r")\."


def variants(n_layers: int) -> dict[str, str]:
    a = "quantize(a=int4,a_clip=0.9,modules={})"
    out = {
        "all-quantized": TAIL,
        "activations-float": f"quantize({KV})",
        "kv-float": "quantize(a=int4,a_clip=0.9)",
        "qkv-input-float": a.format("o_proj|mlp") + f",quantize({KV})",
        "o-input-float": a.format("[qkv]_proj|mlp") + f",quantize({KV})",
        "gate-up-input-float": a.format("self_attn|down_proj") + f",quantize({KV})",
        "down-input-float": a.format("self_attn|gate_proj|up_proj") + f",quantize({KV})",
        "keys-float": "",  # see _kv_half_at_8_bits
        "values-float": "",
    }
    for lo in range(0, n_layers, 6):
        hi = min(lo + 5, n_layers - 1)
        out[f"blocks-{lo}-{hi}-float"] = f"quantize(a=int4,{KV},a_clip=0.9,modules={_blocks_except(lo, hi, n_layers)})"
    for i in (0, 1, 2, n_layers - 1):
        out[f"block-{i}-float"] = f"quantize(a=int4,{KV},a_clip=0.9,modules={_blocks_except(i, i, n_layers)})"
    return out


def _kv_half_at_8_bits(g, which: str) -> None:  # type: ignore[no-untyped-def]
    from lowbit.passes.insert_qdq import InsertQDQOptions, config_from_options, quantize_graph

    cfg = config_from_options(InsertQDQOptions(kv="int4", k_gran="per_token", v_gran="per_token", kv_group=64))
    kv = cfg.kv.model_copy(update={which: getattr(cfg.kv, which).model_copy(update={"qdtype": "int8"})})
    quantize_graph(g, cfg.model_copy(update={"kv": kv}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--eval", default="wt2-512x8")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--match", default="", help="regex on variant names")
    ap.add_argument("--weights", choices=("gptq", "float"), default="gptq",
                    help="the variants on the GPTQ W4 graph, or on the rotated graph with float weights")
    ap.add_argument("--out", default="", help="JSON file for the results (default: print only)")
    args = ap.parse_args()

    from lowbit.backends.torch_backend import TorchCompiled
    from lowbit.eval import perplexity
    from lowbit.ir.capture import capture
    from lowbit.models import load_model
    from lowbit.passes.manager import PassManager

    m = re.fullmatch(r"wt2-(\d+)x(\d+)", args.eval)
    if not m:
        raise SystemExit(f"--eval {args.eval!r}: expected wt2-<seq_len>x<windows>")
    ev = {"seq_len": int(m.group(1)), "max_windows": int(m.group(2))}
    device = torch.device(args.device)
    dev = "" if device.type == "cpu" else f",device={args.device}"
    model, tok, _ = load_model("smollm2")
    dyn = {"input_ids": {0: torch.export.Dim.DYNAMIC(min=1, max=1024), 1: torch.export.Dim.DYNAMIC(min=2, max=8192)}}
    graph = capture(model, (torch.randint(0, 49152, (2, 64)),), dyn)
    n_layers = model.config.num_hidden_layers if hasattr(model, "config") else 30

    def score(g) -> float:  # type: ignore[no-untyped-def]
        return perplexity(TorchCompiled(g, device), "wikitext2-test", tokenizer=tok, progress=False, batch_size=4,
                          device=device, **ev).ppl

    results: dict[str, object] = {"eval": args.eval, "device": args.device, "head": HEAD, "tail": TAIL}
    fl = score(graph)
    results["float"] = round(fl, 4)
    print(f"float ppl {fl:.3f}", flush=True)
    rotated = graph.clone()
    PassManager(ROTATE_ONLY.replace("progress=false", f"progress=false{dev}")).run(rotated)
    head = rotated.clone()
    t = time.perf_counter()
    if args.weights == "gptq":
        PassManager(GPTQ.replace("progress=false", f"progress=false{dev}")).run(head)
    print(f"head built in {time.perf_counter() - t:.0f}s", flush=True)
    results["weights"] = args.weights
    todo = {**({"weights-float": TAIL} if args.weights == "gptq" else {}), **variants(n_layers)}
    for name, tail in todo.items():
        if args.match and not re.search(args.match, name):
            continue
        g = (rotated if name == "weights-float" else head).clone()
        try:
            if name in ("keys-float", "values-float"):
                PassManager("quantize(a=int4,a_clip=0.9)").run(g)
                _kv_half_at_8_bits(g, "key" if name == "keys-float" else "value")
            else:
                PassManager(tail).run(g)
            ppl = score(g)
            results[name] = {"ppl": round(ppl, 4), "ratio": round(ppl / fl, 4)}
            print(f"{name:24s} ppl {ppl:9.3f} ratio {ppl / fl:7.3f}", flush=True)
        except Exception as exc:  # one failing variant must not lose the others
            results[name] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            print(name, "ERROR", results[name], flush=True)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(results, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
