"""Generation benchmarks, every baseline side by side in one run -> bench/results/generate.json.

GPU part (``--gpu``):
* decode attention over an int4 / int2 quantized cache (lowbit.kernels.decode_attention, Triton) vs bf16
  ``F.scaled_dot_product_attention`` at batch 16, 32 heads, head dim 128, 32K context (``triton.testing.do_bench``);
* decode ms/step on the 7B-shaped 4-layer Llama (hidden 4096, MLP 11008, 32 heads, vocab 32000, random bf16):
  lowbit float bf16 (torch backend, decode step under a CUDA graph) vs HF ``generate`` eager and HF static cache
  + ``torch.compile``, batch 1 and 16, prompt 512, 256 new tokens.

CPU part (``--cpu``): SmolLM2 decode tokens/s, lowbit torch backend vs HF transformers ``generate`` (the
machine is shared: numbers carry the load average seen).

    python tools/bench_generate.py --gpu            # on the H200
    python tools/bench_generate.py --cpu --new 32   # here
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from results_io import machine, merge_rows  # noqa: E402

OUT = ROOT / "bench" / "results" / "generate.json"
START = time.perf_counter()


def _versions() -> dict:
    import transformers

    v = {"torch": torch.__version__, "transformers": transformers.__version__}
    try:
        import triton

        v["triton"] = triton.__version__
    except ImportError:
        pass
    return v


def attention_rows(smoke: bool = False) -> list[dict]:
    import triton.testing

    from lowbit.kernels import decode_attention as da

    dev = "cuda"
    b, h, d, s = (2, 4, 128, 1024) if smoke else (16, 32, 128, 32768)
    torch.manual_seed(0)
    rows = []
    q = torch.randn(b, h, d, device=dev, dtype=torch.bfloat16)
    k = torch.randn(b, h, s, d, device=dev, dtype=torch.bfloat16)
    v = torch.randn(b, h, s, d, device=dev, dtype=torch.bfloat16)
    sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(q[:, :, None], k, v)  # noqa: E731
    sdpa_us = triton.testing.do_bench(sdpa) * 1000
    kv_bytes = 2 * k.numel() * 2
    copy_us = triton.testing.do_bench(lambda: k.clone()) * 1000
    copy_bw = 2 * k.numel() * 2 / (copy_us * 1e-6)
    rows.append({"area": "decode-attention", "kernel": "sdpa-bf16", "batch": b, "heads": h, "head_dim": d,
                 "context": s, "us": round(sdpa_us, 1), "bytes": kv_bytes,
                 "eff_bw_frac": round(kv_bytes / (sdpa_us * 1e-6) / copy_bw, 3)})
    for name, bits, k_block, v_group, window in (("int4", 4, 32, 32, 32), ("int2", 2, 32, 16, 64)):
        kc, ks, kz = da.quantize_keys(k, bits, k_block)
        vc, vs, vz = da.quantize_values(v, bits, v_group)
        ks, kz, vs, vz = (t.to(torch.float16) for t in (ks, kz, vs, vz))
        # a real cache: the sink and the window stay float (KIVI), the rest is read quantized
        kf = torch.cat([k[:, :, :1], k[:, :, -window:]], 2)
        vf = torch.cat([v[:, :, :1], v[:, :, -window:]], 2)
        fvalid = torch.ones(b, window + 1, dtype=torch.bool, device=dev)
        lo = torch.ones(b, dtype=torch.int32, device=dev)
        hi = torch.full((b,), s - window, dtype=torch.int32, device=dev)
        args = (q, kc, ks, kz, vc, vs, vz)
        kw = dict(bits=bits, lo=lo, hi=hi, k_float=kf, v_float=vf, float_valid=fvalid)
        small = slice(0, 2048)
        ref = da.decode_attention_reference(q[:1], kc[:1, :, small], ks[:1, :, :2048 // k_block], kz[:1, :, :2048 // k_block],
                                            vc[:1, :, small], vs[:1, :, small], vz[:1, :, small], bits=bits,
                                            lo=lo[:1], hi=torch.full((1,), 2048 - window, device=dev))
        got = da.decode_attention(q[:1], kc[:1, :, small], ks[:1, :, :2048 // k_block], kz[:1, :, :2048 // k_block],
                                  vc[:1, :, small], vs[:1, :, small], vz[:1, :, small], bits=bits,
                                  lo=lo[:1], hi=torch.full((1,), 2048 - window, device=dev))
        err = float((got - ref).abs().max())
        qbytes = sum(t.numel() * t.element_size() for t in (kc, ks, kz, vc, vs, vz))
        best = None
        for warps, split in ((4, None), (1, 1024), (2, 1024), (2, 2048), (4, 2048), (1, 4096), (2, 4096), (4, 8192)):
            try:
                us = triton.testing.do_bench(lambda: da.decode_attention(*args, split=split, num_warps=warps,
                                                                         **kw)) * 1000
            except Exception as exc:  # noqa: BLE001 - a config that does not compile is reported, not fatal
                print(f"{name} warps={warps} split={split}: {type(exc).__name__}: {exc}", file=sys.stderr)
                continue
            print(f"{name} warps={warps} split={split}: {us:.1f} us", file=sys.stderr)
            if best is None or us < best[0]:
                best = (us, warps, split)
        if best is None:
            continue
        us = best[0]
        rows.append({"area": "decode-attention", "kernel": f"lowbit-{name}-cache", "batch": b, "heads": h,
                     "head_dim": d, "context": s, "us": round(us, 1), "baseline": "sdpa-bf16",
                     "baseline_us": round(sdpa_us, 1), "speedup": round(sdpa_us / us, 2), "bytes": qbytes,
                     "eff_bw_frac": round(qbytes / (us * 1e-6) / copy_bw, 3), "max_abs_err_vs_reference": err,
                     "config": f"num_warps={best[1]},split={best[2]}", "window": window,
                     "k_block": k_block, "v_group": v_group})
        del kc, ks, kz, vc, vs, vz
    del k, v
    torch.cuda.empty_cache()
    return rows


def _llama(smoke: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                      num_hidden_layers=4, vocab_size=32000, max_position_embeddings=4096)
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
    model.generate(ids, max_new_tokens=new, min_new_tokens=new, **gen)  # warm up (and compile)
    torch.cuda.synchronize()
    t = time.perf_counter()
    model.generate(ids, max_new_tokens=1, **gen)
    torch.cuda.synchronize()
    pre = time.perf_counter() - t
    t = time.perf_counter()
    out = model.generate(ids, max_new_tokens=new, min_new_tokens=new, **gen)
    torch.cuda.synchronize()
    full = time.perf_counter() - t
    assert out.shape[1] == ids.shape[1] + new
    return pre * 1000, (full - pre) * 1000 / (new - 1)


QUANTIZED = {"w4a16-g128": "quantize(w=int4,group=128,sym=false)", "w8a8": "quantize(w=int8,a=int8)",
             "fp8": "quantize(w=fp8e4m3,a=fp8e4m3)"}
"""Schemes whose decode runs on the Triton backend beside the float step (issue 18's W4A16/W8A8/FP8 rows)."""


def e2e_rows(prompt: int, new: int, batches: list[int], smoke: bool = False, hf_compile: bool = True,
             deadline: float = 1e9) -> list[dict]:
    from lowbit.api import compile_model
    from lowbit.generate import GenerationSpec

    model = _llama(smoke)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    t = time.perf_counter()
    cm = compile_model(model, generation=GenerationSpec(max_length=prompt + new, max_batch=max(batches)),
                       device="cuda")
    compile_s = time.perf_counter() - t
    rows = []
    shape = "llama-7b-shape-4layer" if not smoke else "llama-tiny"
    base = {"area": "decode", "model": shape, "prompt": prompt, "new_tokens": new, "weights_bytes": weights}
    for b in batches:
        ids = torch.randint(3, model.config.vocab_size, (b, prompt))
        cm.generate(ids, 8, stop_tokens=())  # warm up, captures the CUDA graph for this batch
        out = cm.generate(ids, new, stop_tokens=())
        ms = out.decode_seconds * 1000 / out.decode_steps
        rows.append({**base, "scheme": "float-bf16", "method": "lowbit-torch-cudagraph", "batch": b,
                     "ms_per_step": round(ms, 3), "prefill_ms": round(out.prefill_seconds * 1000, 2),
                     "tokens_per_s": round(b * 1000 / ms, 1), "peak_mem_mib": round(out.peak_memory_bytes / 2**20),
                     "compile_s": round(compile_s, 1)})
        print(rows[-1], file=sys.stderr)
    del cm
    torch.cuda.empty_cache()
    for scheme, pipeline in QUANTIZED.items():  # the same step on lowbit's kernels (backend="triton")
        t = time.perf_counter()
        try:
            cm = compile_model(model, pipeline=pipeline, backend="triton", backend_options={"compile": False},
                               generation=GenerationSpec(max_length=prompt + new, max_batch=max(batches)),
                               device="cuda")
        except Exception as exc:  # noqa: BLE001 - reported in the row
            rows.append({**base, "scheme": scheme, "method": "lowbit-triton-cudagraph",
                         "error": f"{type(exc).__name__}: {str(exc)[:300]}"})
            continue
        compile_s = time.perf_counter() - t
        for b in batches:
            try:
                ids = torch.randint(3, model.config.vocab_size, (b, prompt))
                cm.generate(ids, 8, stop_tokens=())
                out = cm.generate(ids, new, stop_tokens=())
            except Exception as exc:  # noqa: BLE001 - reported in the row
                rows.append({**base, "scheme": scheme, "method": "lowbit-triton-cudagraph", "batch": b,
                             "error": f"{type(exc).__name__}: {str(exc)[:300]}"})
                continue
            ms = out.decode_seconds * 1000 / out.decode_steps
            rows.append({**base, "scheme": scheme, "method": "lowbit-triton-cudagraph", "batch": b,
                         "pipeline": pipeline, "ms_per_step": round(ms, 3),
                         "prefill_ms": round(out.prefill_seconds * 1000, 2), "tokens_per_s": round(b * 1000 / ms, 1),
                         "peak_mem_mib": round(out.peak_memory_bytes / 2**20), "compile_s": round(compile_s, 1),
                         "kernels": cm.runner.report_text().splitlines()[0]})
            print(rows[-1], file=sys.stderr)
        del cm
        torch.cuda.empty_cache()
    hf = model.to("cuda")
    for b in batches:
        ids = torch.randint(3, model.config.vocab_size, (b, prompt), device="cuda")
        for method, kw in (("hf-eager", {}), ("hf-static-compile", {"cache_implementation": "static"})):
            if method == "hf-static-compile" and (not hf_compile or time.perf_counter() - START > deadline):
                rows.append({**base, "scheme": "float-bf16", "method": method, "batch": b,
                             "error": "skipped: out of the run's time budget (--deadline)"})
                continue
            try:
                torch.cuda.reset_peak_memory_stats()
                pre, ms = _hf_ms_per_step(hf, ids, new, **kw)
            except Exception as exc:  # noqa: BLE001 - reported in the row
                rows.append({**base, "scheme": "float-bf16", "method": method, "batch": b,
                             "error": f"{type(exc).__name__}: {str(exc)[:200]}"})
                continue
            rows.append({**base, "scheme": "float-bf16", "method": method, "batch": b, "ms_per_step": round(ms, 3),
                         "prefill_ms": round(pre, 2), "tokens_per_s": round(b * 1000 / ms, 1),
                         "peak_mem_mib": round(torch.cuda.max_memory_allocated() / 2**20)})
            print(rows[-1], file=sys.stderr)
    for r in rows:
        same = [x for x in rows if x.get("batch") == r.get("batch") and x["method"].startswith("hf-")
                and "ms_per_step" in x]
        if r["method"].startswith("lowbit-") and same and "ms_per_step" in r:
            fastest = min(same, key=lambda x: x["ms_per_step"])
            r["fastest_hf"] = fastest["method"]
            r["speedup_vs_fastest_hf"] = round(fastest["ms_per_step"] / r["ms_per_step"], 2)
        r["byte_limit_ms"] = round(weights / 4.3e12 * 1000, 3)
    return rows


def cpu_rows(new: int) -> list[dict]:
    """SmolLM2 decode tokens/s at batch 1 on this CPU, side by side: lowbit torch backend (float), ORT float,
    ORT W4 (w4a16-g64 RTN, MatMulNBits), HF transformers ``generate``. Greedy tokens of each ORT model must equal
    the torch reference's of the same graph."""
    from lowbit.api import compile_model
    from lowbit.backends.onnxruntime_backend import OrtCompiled
    from lowbit.generate import GenerationSpec, Generator
    from lowbit.models import load_smollm2

    model, tok = load_smollm2()
    ids = tok("The capital of France is").input_ids
    spec = GenerationSpec(max_length=len(ids) + new, max_batch=1)
    base = {"area": "decode", "model": "smollm2-135m", "batch": 1, "prompt": len(ids), "new_tokens": new}
    rows = []

    def timed(gen, method: str, scheme: str, threads: int | None = None) -> list[int]:
        gen.generate([ids], 4, stop_tokens=())  # warm up
        load = os.getloadavg()[0]
        out = gen.generate([ids], new, stop_tokens=())
        rows.append({**base, "scheme": scheme, "method": method, "tokens_per_s": round(out.decode_tokens_per_second, 2),
                     "ms_per_step": round(out.decode_seconds * 1000 / out.decode_steps, 2),
                     "prefill_ms": round(out.prefill_seconds * 1000, 1), "loadavg_1m": round(load, 2)})
        print(rows[-1], file=sys.stderr)
        return out.tokens[0]

    for scheme, recipe, fmt in (("float", None, "qdq"), ("w4a16-g64", "w4a16-g64", "matmulnbits")):
        cm = compile_model(model, recipe=recipe, tokenizer=tok, generation=spec)
        ref = timed(_gen(cm), "lowbit-torch", scheme)
        ort = OrtCompiled(cm.graph, device="cpu", weight_format=fmt)
        got = timed(Generator(ort, cm.graph.meta["generation"], "cpu"), f"lowbit-ort-{fmt}", scheme)
        rows[-1]["tokens_equal_torch_reference"] = got == ref
        del cm, ort
    t_ids = torch.tensor([ids])
    gen = dict(do_sample=False, eos_token_id=None, pad_token_id=0, attention_mask=torch.ones_like(t_ids))
    model.generate(t_ids, max_new_tokens=4, **gen)
    load = os.getloadavg()[0]
    t = time.perf_counter()
    model.generate(t_ids, max_new_tokens=1, **gen)
    pre = time.perf_counter() - t
    t = time.perf_counter()
    model.generate(t_ids, max_new_tokens=new, min_new_tokens=new, **gen)
    full = time.perf_counter() - t
    rows.append({**base, "scheme": "float", "method": "hf-generate", "tokens_per_s": round((new - 1) / (full - pre), 2),
                 "ms_per_step": round((full - pre) * 1000 / (new - 1), 2), "prefill_ms": round(pre * 1000, 1),
                 "loadavg_1m": round(load, 2)})
    print(rows[-1], file=sys.stderr)
    return rows


def _gen(cm):
    from lowbit.generate import Generator

    return Generator(cm.runner, cm.graph.meta["generation"], "cpu")


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
    ap.add_argument("--deadline", type=float, default=1e9, help="seconds after which HF compile runs are skipped")
    ap.add_argument("--out", type=Path, default=OUT)
    a = ap.parse_args()
    rows: list[dict] = []
    if a.gpu:
        dev = machine("cuda")
        if not a.skip_attention:
            rows += [{**r, "device": dev} for r in attention_rows(a.smoke)]
            print(rows, file=sys.stderr)
        if not a.skip_e2e:
            batches = [int(x) for x in a.batches.split(",")]
            rows += [{**r, "device": dev}
                     for r in e2e_rows(a.prompt, a.new, batches, a.smoke, not a.no_hf_compile, a.deadline)]
    if a.cpu:
        rows += [{**r, "device": machine("cpu")} for r in cpu_rows(a.new)]
    date = datetime.date.today().isoformat()
    rows = [{**r, "date": date} for r in rows]
    for r in rows:
        print(r)
    if not a.smoke:
        header = {"command": "python tools/bench_generate.py " + " ".join(sys.argv[1:]), "date": date,
                  "device": rows[0]["device"] if rows else "", "versions": _versions()}
        merge_rows(a.out, header, rows, key=("area", "model", "kernel", "scheme", "method", "batch", "device"),
                   replace_header=False)


if __name__ == "__main__":
    main()
