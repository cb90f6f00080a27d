"""The 7B-shaped 4-layer Llama on the GPU: HF bf16 vs the same stack on lowbit's packed-weight kernels.

    python tools/bench_e2e.py [--out bench/results/e2e.json] [--budget-s 240] [--run LABEL]

Rows merge into ``--out`` labelled ``run`` (a re-run with the same label replaces its own rows; other runs' rows
and commands are kept).

Model: hidden 4096, MLP 11008, 32 heads, vocab 32000, 4 layers, random bf16 weights (issue 17's table). Rows:
GPU memory of the weights (``torch.cuda.memory_allocated`` after building, whole model and the quantized linears
alone) and forward µs (median of ``do_bench``, ``use_cache=False``) at 1x1, 1x128, 1x2048, 16x1, 16x128, eager
and under ``torch.compile`` (dynamic shapes, one compile per path) while ``--budget-s`` lasts.

The ``QuantLinear`` rows swap every decoder ``nn.Linear`` for ``lowbit.kernels.modules.QuantLinear`` holding the
packed weight (quantized with lowbit's own ``quantize`` op): the kernels alone. ``--backend`` adds the rows of
``compile_model(..., backend="triton")`` (capture, quantize pass, fuse-qlinear, lowering, ``torch.compile``);
``--hf-only`` skips the QuantLinear rows. Needs CUDA and transformers.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import itertools
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import triton
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_io import machine, merge_rows

from lowbit.calibration.gptq import weight_qparams
from lowbit.ir.quant import get_qdtype, quantize
from lowbit.kernels.modules import QuantLinear

SHAPES = ((1, 1), (1, 128), (1, 2048), (16, 1), (16, 128))
E2E_ROW_KEY = ("model", "scheme", "path", "variant", "shape", "device", "run")
"""What identifies a forward row in the results file: a re-run with the same ``--run`` label replaces its rows."""
PIPELINES = {  # the same schemes as lowbit pipelines, for --backend (compile_model(backend="triton"))
    "w4a16-g128": "quantize(w=int4,group=128,sym=false)",
    "w8a8": "quantize(w=int8,a=int8)",
    "fp8": "quantize(w=fp8e4m3,a=fp8e4m3)",
    "w4a16-g128-head4": "quantize(w=int4,group=128,sym=false,head=int4)",  # the 32000x4096 head int4 too
}
SCHEMES = {  # name -> (w qdtype, w group, symmetric, a qdtype, a group)
    "w4a16-g128": ("int4", 128, False, None, 0),
    "w8a8": ("int8", 0, True, "int8", 0),
    "fp8": ("fp8e4m3", 0, True, "fp8e4m3", 0),
}


def build_hf() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                      num_hidden_layers=4, vocab_size=32000, max_position_embeddings=4096)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    return model


def quantize_linears(model: torch.nn.Module, scheme: tuple, lm_head_int8: bool = False) -> int:
    """Swap the decoder's linears (and optionally lm_head, int8 weight-only) in place; returns their packed bytes."""
    wq, wg, sym, aq, ag = scheme
    packed = 0
    targets = [(name, mod) for name, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)
               and (name.startswith("model.layers") or (lm_head_int8 and name == "lm_head"))]
    for name, lin in targets:
        is_head = name == "lm_head"
        qd, g, s_, a = ("int8", 0, True, None) if is_head else (wq, wg, sym, aq)
        w = lin.weight.detach().float()
        n, k = w.shape
        scale, zp = weight_qparams(w, get_qdtype(qd), s_, g or None)
        q = quantize(w, scale, zp, qdtype=qd, axis=1 if g else 0, block_size=g or None)
        new = QuantLinear(q, scale, zp, None, qd, g, a, 0 if is_head else ag)
        packed += sum(t.numel() * t.element_size() for t in (q, scale, zp) if t is not None)
        parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        setattr(parent, name.rsplit(".", 1)[-1], new)
        del w, lin
    if lm_head_int8:
        model.config.tie_word_embeddings = False
    return packed


def linear_bytes(model: torch.nn.Module) -> int:
    return sum(m.weight.numel() * m.weight.element_size() for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and name.startswith("model.layers"))


def time_forward(fn, batch: int, seq: int) -> float:
    ids = torch.randint(0, 32000, (batch, seq), device="cuda")
    with torch.no_grad():
        fn(ids)
        return do_bench(lambda: fn(ids), warmup=10, rep=50, return_mode="median") * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results/e2e.json")
    ap.add_argument("--run", default="", help="label written into every row (rows of other runs in --out are kept; "
                                               "this run's replace those with the same label, shape and path)")
    ap.add_argument("--budget-s", type=float, default=240.0, help="stop starting compiled runs after this long")
    ap.add_argument("--backend", action="store_true",
                    help="also run compile_model(backend='triton') rows (capture + quantize + lower, per scheme)")
    ap.add_argument("--hf-only", action="store_true",
                    help="skip the QuantLinear rows: HF bf16 (eager, torch.compile) and, with --backend, the backend rows")
    ap.add_argument("--graphs", choices=("both", "on", "off"), default="both",
                    help="with --backend: time the triton rows with cuda_graphs on, off or both")
    ap.add_argument("--schemes", default="w4a16-g128,w8a8,fp8", help="with --backend: which schemes (comma list "
                    f"of {', '.join(PIPELINES)})")
    args = ap.parse_args()
    t_start = time.time()
    device, date = machine("cuda"), datetime.date.today().isoformat()
    import transformers
    header = {"command": "python " + " ".join(sys.argv), "date": date, "device": device,
              "versions": {"torch": torch.__version__, "triton": triton.__version__,
                           "transformers": transformers.__version__}}
    rows: list[dict] = []
    out = Path(args.out)

    def flush() -> None:  # merged into --out: the file keeps every run's rows, each labelled by its run
        merge_rows(out, header, [dict(r, run=args.run) for r in rows], key=E2E_ROW_KEY,
                   append_command=True)

    ref = build_hf()
    bf16_linear = linear_bytes(ref)
    variants = [("hf-bf16", None, False)] + [(name, sch, False) for name, sch in SCHEMES.items()] + [
        ("w4a16-g128+lm_head-int8", SCHEMES["w4a16-g128"], True)]
    if args.hf_only:
        variants = variants[:1]
    for name, scheme, head8 in variants:
        gc.collect()
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated()
        model = copy.deepcopy(ref) if scheme is not None else ref
        packed = quantize_linears(model, scheme, head8) if scheme is not None else bf16_linear
        gc.collect()
        torch.cuda.empty_cache()
        mem = torch.cuda.memory_allocated() - (before if scheme is not None else 0)
        base = {"model": "llama-7b-shaped-4l", "scheme": name, "device": device, "date": date,
                "gpu_memory_mib": round(mem / 2 ** 20, 1), "linear_bytes_mib": round(packed / 2 ** 20, 1),
                "linear_bytes_vs_bf16": round(packed / bf16_linear, 3),
                "path": "HF eager" if scheme is None else "lowbit kernels (QuantLinear), eager"}
        fwd = lambda ids, m=model: m(ids, use_cache=False).logits
        for b, s in SHAPES:
            rows.append({**base, "variant": "eager", "shape": f"{b}x{s}", "us": round(time_forward(fwd, b, s), 1)})
        flush()
        print(name, [(r["shape"], r["us"]) for r in rows if r["scheme"] == name], base["gpu_memory_mib"], flush=True)
        if time.time() - t_start < args.budget_s and not head8:
            compiled = torch.compile(model, dynamic=True)
            cf = lambda ids, m=compiled: m(ids, use_cache=False).logits
            for b, s in SHAPES:
                try:
                    us = round(time_forward(cf, b, s), 1)
                except Exception as e:  # noqa: BLE001 - record the failure, keep the other rows
                    us = None
                    rows.append({**base, "variant": "torch.compile", "shape": f"{b}x{s}", "error": repr(e)[:300]})
                    continue
                rows.append({**base, "variant": "torch.compile", "shape": f"{b}x{s}", "us": us,
                             "path": base["path"].replace("eager", "torch.compile").replace("HF torch.compile",
                                                                                           "HF torch.compile")})
            flush()
            print(name, "compiled", [(r["shape"], r.get("us")) for r in rows if r["scheme"] == name
                                     and r["variant"] == "torch.compile"], f"{time.time() - t_start:.0f}s", flush=True)
        if scheme is not None:
            del model
    if args.backend:
        modes = {"both": (False, True), "on": (True,), "off": (False,)}[args.graphs]
        backend_rows(ref, device, date, modes, args.schemes.split(","), rows, flush)
    flush()


def compile_triton(ref: torch.nn.Module, pipeline: str, graphs: bool):
    """``compile_model`` of a copy of ``ref`` on the triton backend, as the backend rows time it: batch and sequence
    both dynamic from 1, so the decode shapes (1x1, 16x1) run on the same program."""
    import lowbit
    from lowbit.models import CausalLMLogits

    ids = torch.arange(1, 129, dtype=torch.long, device="cuda").reshape(2, 64)
    dyn = {"input_ids": {0: torch.export.Dim.DYNAMIC(min=1, max=64), 1: torch.export.Dim.DYNAMIC(min=1, max=4096)}}
    return lowbit.compile_model(CausalLMLogits(copy.deepcopy(ref)).eval(), (ids,), dynamic_shapes=dyn,
                                pipeline=pipeline, backend="triton", device="cuda",
                                backend_options={"cuda_graphs": graphs})


def backend_rows(ref: torch.nn.Module, device: str, date: str, graph_modes: tuple[bool, ...] = (False, True),
                 schemes: list[str] | None = None, rows: list[dict] | None = None,
                 flush: Callable[[], None] = lambda: None) -> list[dict]:
    """``compile_model(wrapped HF model, pipeline=..., backend="triton")``: memory and forward µs per scheme."""
    rows = [] if rows is None else rows
    for (name, pipeline), graphs in itertools.product([(k, v) for k, v in PIPELINES.items() if schemes is None or k in schemes], graph_modes):
        gc.collect()
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated()
        base = {"model": "llama-7b-shaped-4l", "scheme": name, "device": device, "date": date,
                "path": "compile_model(backend='triton'" + (", cuda_graphs=True)" if graphs else ")"), "pipeline": pipeline}
        try:
            compiled = compile_triton(ref, pipeline, graphs)
            gc.collect()
            torch.cuda.empty_cache()
            mem = torch.cuda.memory_allocated() - before
            # the decoder linears' share: whole-model memory less the bf16 embedding, lm_head and norms it keeps
            rest = sum(p.numel() * p.element_size() for p in ref.parameters()) - linear_bytes(ref)
            base["linear_mem_vs_bf16"] = round((mem - rest) / linear_bytes(ref), 3)
            report = compiled.runner.report_text() if hasattr(compiled.runner, "report_text") else ""
            for b, s in SHAPES:
                try:
                    us = round(time_forward(compiled, b, s), 1)
                except Exception as e:  # noqa: BLE001 - a failing shape is a row, not a lost run
                    rows.append({**base, "variant": "backend+cudagraphs" if graphs else "backend", "shape": f"{b}x{s}", "error": repr(e)[:300]})
                    continue
                rows.append({**base, "variant": "backend+cudagraphs" if graphs else "backend", "shape": f"{b}x{s}", "gpu_memory_mib": round(mem / 2 ** 20, 1),
                             "us": us, "report": report})
            print(name, "backend", mem / 2 ** 20, [(r.get("shape"), r.get("us")) for r in rows if r.get("scheme") == name],
                  report, flush=True)
            del compiled
        except Exception as e:  # noqa: BLE001 - a failing scheme is a row, not a lost run
            rows.append({**base, "variant": "backend+cudagraphs" if graphs else "backend", "error": repr(e)[:400]})
        flush()  # each scheme's rows reach the file before the next one starts (a run stopped at its limit keeps them)
    return rows


if __name__ == "__main__":
    main()
