"""Digest what weight-calibrating pipelines write on a 2-layer SmolLM2 slice, to prove a refactor moved nothing.

    python tools/pass_digests.py before.json      # on the old code
    python tools/pass_digests.py after.json --compare before.json

For each pipeline: the printed IR, a SHA-256 of every parameter's bytes (with its dtype, in graph order) and the
pass's statistics without timings. ``--compare`` exits 1 on any difference and names it. Run both sides on one
machine: GPTQ's linear algebra is bit-stable on one machine, not across CPUs or thread counts.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import sys

import torch

CAL = "calib=wikitext2-valid-calib,calib_n=8,calib_len=128,progress=false"
PIPELINES = [
    f"gptq(w=int4,group=64,sym=false,{CAL})",
    f"gptq(w=int4,group=64,sym=false,single_pass=false,{CAL})",
    f"gptq(w=int4,sym=true,awq=true,clip=true,{CAL})",
    f"gptq(w=fp8e4m3,group=64,{CAL})",
    f"awq(w=int4,group=64,sym=false,{CAL})",
    f"autoround(w=int4,group=64,iters=4,{CAL})",
    f"quantize(w=int8,a=int8,a_static=true,a_gran=per_tensor,{CAL})",
    "fold-norms,quantize(w=int4,group=64)",
]


def _untimed(stats: dict) -> dict:
    return {k: _untimed(v) if isinstance(v, dict) else v for k, v in stats.items() if "seconds" not in k}


def digests() -> dict[str, dict]:
    from lowbit.ir.capture import capture
    from lowbit.ir.printer import print_graph
    from lowbit.models import CausalLMLogits, load_smollm2
    from lowbit.passes.manager import PassManager

    model, _ = load_smollm2()
    m = copy.deepcopy(model)
    m.model.layers = m.model.layers[:2]
    m.config.num_hidden_layers = 2
    dyn = {"input_ids": {0: torch.export.Dim.DYNAMIC(min=1, max=1024), 1: torch.export.Dim.DYNAMIC(min=2, max=4096)}}
    g0 = capture(CausalLMLogits(m).eval(), (torch.ones(2, 16, dtype=torch.long),), dyn)
    out = {}
    for pipe in PIPELINES:
        g = g0.clone()
        torch.manual_seed(0)
        report = PassManager(pipe).run(g)
        params = {k: hashlib.sha256(v.data.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
                  + f" {v.data.dtype}" for k, v in g.params.items()}
        out[pipe] = {"ir": print_graph(g), "params": params,
                     "stats": json.loads(json.dumps(_untimed(report.records[-1].stats), default=str))}
    return out


def compare(a: dict, b: dict) -> list[str]:
    diffs = []
    for pipe in sorted(set(a) | set(b)):
        if pipe not in a or pipe not in b:
            diffs.append(f"{pipe}: only on one side")
            continue
        for part in ("ir", "stats"):
            if a[pipe][part] != b[pipe][part]:
                diffs.append(f"{pipe}: {part} differs")
        if list(a[pipe]["params"].items()) != list(b[pipe]["params"].items()):
            names = [k for k in set(a[pipe]["params"]) | set(b[pipe]["params"])
                     if a[pipe]["params"].get(k) != b[pipe]["params"].get(k)]
            diffs.append(f"{pipe}: params differ ({len(names)}: {sorted(names)[:5]}) or their order")
    return diffs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--compare", default=None, help="an earlier output to compare with")
    args = ap.parse_args()
    out = digests()
    with open(args.out, "w") as fh:
        json.dump(out, fh, indent=1)
    if args.compare:
        with open(args.compare) as fh:
            diffs = compare(json.load(fh), out)
        print("\n".join(diffs) if diffs else f"identical: {len(out)} pipelines (IR, every param's bytes, stats)")
        return 1 if diffs else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
