"""Decode speed of a mixture-of-experts model on the Triton backend: routed experts with ``grouped_experts`` off
against the dense lowering (every expert on every token, all experts' gate/up in one wide GEMM), the per-row grouped
decode (``grouped_experts`` with ``blocked_experts`` off: a layer's call of <= 16 rows, <= 4 on int words, its
picked experts in two launches, ``moe_gate_up`` + ``moe_down``; the dense form past that in a capture), the default
(``blocked``: past those limits the expert-blocked ops, ``moe_route`` + ``moe_gate_up_blocked`` +
``moe_down_blocked``) and the expert-blocked ops at every row count (``blocked-all``), W4A16 and bf16, batch 1, 4
and 16 (the prefill: batch x 128 rows), with HF eager ``generate`` beside them; and how often each routed lowering's
greedy tokens agree with the dense one's.

    python tools/bench_moe.py [--out bench/results/moe.json]       # on a GPU (needs transformers' fused experts)
    TRITON_INTERPRET=1 python tools/bench_moe.py --smoke            # CPU: a 2-layer model, checks the script only

The model: a random Mixtral-shaped stack (hidden 1024, 8 experts of 2816, top-2, 8 layers, 16 / 8 heads, vocab
32000) in bf16, a 128-token prompt, 64 new tokens. The decode steps replay a CUDA graph, inside which a routed
layer takes its dense form (``RoutedExperts.runs_dense``: ``nonzero`` cannot be captured) unless grouped, so the
routed and dense decode rows compare two dense schedules (per expert vs merged) and the grouped rows the grouped
launches a layer; the prefill (replayed from its second sighting) is where the row limits matter: routed and
``grouped`` run the dense form there, ``blocked`` the expert-blocked ops (session 54 timed the per-row ops with no
row limit: moe.json's). ``--methods grouped,blocked,dense`` times only those lowerings.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_io import machine, merge_rows, run_header  # noqa: E402

SCHEMES = {"w4a16-g128": "quantize(w=int4,group=128,sym=false)", "float-bf16": None}
MODEL = "mixtral-random-1024h-8x2816-8L-8e-top2"
ROW_KEY = ("model", "scheme", "method", "batch", "device")


def _model(smoke: bool) -> torch.nn.Module:
    import transformers

    torch.manual_seed(0)
    size = (dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                 num_hidden_layers=2, num_local_experts=4) if smoke else
            dict(hidden_size=1024, intermediate_size=2816, num_attention_heads=16, num_key_value_heads=8,
                 num_hidden_layers=8, num_local_experts=8))
    config = transformers.MixtralConfig(num_experts_per_tok=2, vocab_size=_vocab(smoke), max_position_embeddings=1024,
                                        **size)
    return transformers.AutoModelForCausalLM.from_config(config).to(torch.bfloat16).eval()


def _vocab(smoke: bool) -> int:
    """Mixtral's 32000, or 512 for the smoke: the interpreter's lm_head GEMV at 32000 rows took ~8 s a step."""
    return 512 if smoke else 32000


def _prompt(batch: int, length: int, vocab: int) -> torch.Tensor:
    return torch.randint(3, vocab, (batch, length), generator=torch.Generator().manual_seed(batch))


LOWERINGS = {"routed": {"routed_experts": True, "grouped_experts": False}, "dense": {"routed_experts": False},
             "grouped": {"routed_experts": True, "grouped_experts": True, "blocked_experts": False},
             "blocked": {"routed_experts": True, "grouped_experts": True, "blocked_experts": True},
             "blocked-all": {"routed_experts": True, "grouped_experts": True, "blocked_experts": True}}
"""Method suffix -> the Triton backend options of that lowering: ``grouped`` the per-row grouped ops up to the row
limits (the dense form past them, in a capture), ``blocked`` the default (the expert-blocked ops past them),
``blocked-all`` the expert-blocked ops at every row count (the limits set to 0: ``_row_limits``)."""
GROUPED = ("grouped", "blocked", "blocked-all")


@contextlib.contextmanager
def _row_limits(lowering: str) -> Iterator[None]:
    """``blocked-all``: ``grouped_experts.MAX_ROWS`` / ``WORDS_MAX_ROWS`` at 0 while it runs (the per-row ops take
    no call), so the blocked ops are timed at a decode step's rows too, beside the per-row ones."""
    from lowbit.backends import grouped_experts

    saved = grouped_experts.MAX_ROWS, grouped_experts.WORDS_MAX_ROWS
    if lowering == "blocked-all":
        grouped_experts.MAX_ROWS = grouped_experts.WORDS_MAX_ROWS = 0
    try:
        yield
    finally:
        grouped_experts.MAX_ROWS, grouped_experts.WORDS_MAX_ROWS = saved


@contextlib.contextmanager
def _capture_simulated(on: bool) -> Iterator[None]:
    """The CPU runs no CUDA graph: with ``on`` (the smoke's grouped lowering) every routed layer's call is taken as
    under a capture, so the grouped ops run there too (and their tokens meet the dense lowering's)."""
    from lowbit.backends.routed_experts import RoutedExperts

    saved = RoutedExperts.__dict__["runs_dense"]  # the staticmethod itself, to put back as it was
    if on:
        RoutedExperts.runs_dense = staticmethod(lambda x: True)  # type: ignore[method-assign]
    try:
        yield
    finally:
        RoutedExperts.runs_dense = saved


def lowbit_rows(hf: torch.nn.Module, dev: str, batches: list[int], prompt: int, new: int,
                smoke: bool, methods: list[str]) -> tuple[list[dict], dict]:
    """One row per (scheme, lowering, batch): ms a decode step, prefill ms; and each run's greedy tokens."""
    import lowbit
    from lowbit.generate import GenerationSpec

    rows, tokens = [], {}
    for scheme, pipeline in SCHEMES.items():
        if smoke and pipeline is not None:
            pipeline = pipeline.replace("group=128", "group=32")  # the smoke model's 64-wide rows
        for lowering in methods:
            with _row_limits(lowering):  # (from the compile on: the report says what the calls take)
                t = time.perf_counter()
                spec = GenerationSpec(max_length=prompt + max(new, 8), max_batch=max(batches))
                cm = lowbit.compile_model(hf, pipeline=pipeline, backend="triton", device=dev,
                                          backend_options={"compile": False, **LOWERINGS[lowering]}, generation=spec)
                compile_s = time.perf_counter() - t
                method = "lowbit-triton-cudagraph-" + lowering
                grouped = [line.strip() for line in cm.runner.report_text().splitlines()
                           if "grouped at" in line or "no per-row calls" in line or "kept dense" in line]
                with _capture_simulated(smoke and lowering in GROUPED):
                    for b in batches:
                        ids = _prompt(b, prompt, _vocab(smoke))
                        for _ in range(2):  # the decode graph, then the prefill's (captured at its second sighting)
                            cm.generate(ids, 8, stop_tokens=())
                        out = cm.generate(ids, new, stop_tokens=())
                        tokens[(scheme, lowering, b)] = out.tokens
                        ms = out.decode_seconds * 1000 / out.decode_steps
                        rows.append({"scheme": scheme, "method": method, "batch": b, "ms_per_step": round(ms, 3),
                                     "prefill_ms": round(out.prefill_seconds * 1000, 2),
                                     "compile_s": round(compile_s, 1),
                                     "peak_mem_mib": round((out.peak_memory_bytes or 0) / 2**20, 1),
                                     "kernels": cm.runner.report_text().splitlines()[0],
                                     **({"grouped": grouped[0] + (f" (+{len(grouped) - 1} layers)" if len(grouped) > 1
                                                                  else "")} if grouped else {})})
                        print(rows[-1], file=sys.stderr)
            del cm
            gc.collect()
    return rows, tokens


def agreement_rows(tokens: dict, batches: list[int], methods: list[str]) -> list[dict]:
    """Routed (and grouped) vs dense greedy tokens per scheme and batch: the share equal and the first position
    they part."""
    rows = []
    for scheme in SCHEMES:
        for lowering in [m for m in methods if m != "dense"] if "dense" in methods else []:
            for b in batches:
                ours, dense = tokens[(scheme, lowering, b)], tokens[(scheme, "dense", b)]
                same = sum(x == y for p, q in zip(ours, dense) for x, y in zip(p, q))
                first = min(next((i for i, (x, y) in enumerate(zip(p, q)) if x != y), len(p))
                            for p, q in zip(ours, dense))
                rows.append({"scheme": scheme, "method": f"{lowering}-vs-dense-tokens", "batch": b,
                             "token_agreement": round(same / sum(map(len, ours)), 4), "first_divergence": first})
    return rows


def hf_rows(hf: torch.nn.Module, batches: list[int], prompt: int) -> list[dict]:
    """HF eager greedy ``generate`` on the GPU: ms a step from 33 new tokens minus 1 (the prefill's share)."""
    hf = hf.cuda()
    rows = []
    for b in batches:
        ids = _prompt(b, prompt, _vocab(False)).cuda()
        with torch.no_grad():
            hf.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)
            seconds = []
            for new in (33, 1):
                torch.cuda.synchronize()
                t = time.perf_counter()
                hf.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False)
                torch.cuda.synchronize()
                seconds.append(time.perf_counter() - t)
        rows.append({"scheme": "float-bf16", "method": "hf-eager", "batch": b,
                     "ms_per_step": round((seconds[0] - seconds[1]) * 1000 / 32, 3)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("bench/results/moe.json"))
    ap.add_argument("--smoke", action="store_true", help="CPU, Triton's interpreter, a 2-layer model; writes nothing")
    ap.add_argument("--methods", default="routed,dense,grouped,blocked,blocked-all",
                    help=f"comma-separated lowerings to time, of {', '.join(LOWERINGS)}")
    ap.add_argument("--no-hf", action="store_true", help="skip HF eager generate's rows")
    ap.add_argument("--batches", default="1,4,16",
                    help="comma-separated decode batches (each also a batch x 128-row prefill); the row limits "
                         "MAX_ROWS / WORDS_MAX_ROWS fall between them")
    args = ap.parse_args()
    methods = args.methods.split(",")
    if not methods or set(methods) - set(LOWERINGS):
        sys.exit(f"--methods {args.methods!r}: give a comma-separated list of {', '.join(LOWERINGS)}")
    smoke = args.smoke
    if not smoke and not torch.cuda.is_available():
        sys.exit("bench_moe times the Triton backend on a GPU: no CUDA device here (--smoke checks the script on "
                 "the CPU under TRITON_INTERPRET=1)")
    from lowbit.models import fused_experts_gate

    if fused_experts_gate() is None:
        import transformers

        sys.exit(f"transformers {transformers.__version__} has no fused experts module "
                 "(transformers.integrations.moe), whose MoE layers lowbit captures: install a newer one (5.25 runs it)")
    dev = "cpu" if smoke else "cuda"
    batches, prompt, new = ([1], 8, 4) if smoke else ([int(b) for b in args.batches.split(",")], 128, 64)
    hf = _model(smoke)
    rows, tokens = lowbit_rows(hf, dev, batches, prompt, new, smoke, methods)
    rows += agreement_rows(tokens, batches, methods)
    if not smoke and not args.no_hf:
        rows += hf_rows(hf, batches, prompt)
    base = {"area": "moe-decode", "model": MODEL if not smoke else "mixtral-tiny", "prompt": prompt,
            "new_tokens": new, "device": machine(dev)}
    rows = [{**base, **r} for r in rows]
    for r in rows:
        print(r)
    if smoke:
        return
    header = run_header(machine(dev))
    merge_rows(args.out, header, rows, key=ROW_KEY, append_command=True)


if __name__ == "__main__":
    main()
