"""Pruning accuracy on SmolLM2-135M: perplexity of sparse (2:4, unstructured) and structurally pruned models.

One run, one machine: the float model and every row are captured once, pruned from the same float graph and
scored on the same windows, so ``ratio = value / float_value`` compares like with like.

    python tools/bench_pruning.py [--eval wt2-512x40] [--windows 8] [--match REGEX] [--out bench/results/pruning.json]
    python tools/bench_pruning.py --rows structured --recover-tokens 500000 --recover-seconds 35 --device cuda \
        --windows 40 --out $OUT/pruning_recover.json      # structured 10/20/30 with and without recovery, GPU

Rows are merged into the results file by (model, scheme, method, variant, eval, device). ``scheme`` follows
../shared/RESULTS.md (``2:4``, ``unstructured-50``, ``structured-20``, ``2:4+w4a16``); structured rows carry the
fraction of parameters removed, of the transformer blocks' linears (``params_removed_frac_blocks``) and of the
whole model with its tied embedding (``params_removed_frac_total``). ``--recover-tokens N`` adds, after each
structured row, the same pruned graph recovered by the ``distill`` pass (KL to the float model's logits on the
shipped calibration text, N tokens, capped by ``--recover-seconds``); the row's ``ratio_without_recovery`` is
the one-shot ratio of the same run.

2:4 speed on the GPU (issue 21 item 3: semi-structured sparse tensors against dense bf16, one run)::

    python tools/bench_pruning.py --gpu-speed --out $OUT/sparse24.json     # < 60 s on one H200
    python tools/bench_pruning.py --gpu-speed --smoke --out /tmp/s.json    # tiny shapes; runs on CPU (error rows)

M in {1, 16, 2048}, (K, N) in {(4096, 11008), (11008, 4096)}: ``F.linear`` on a dense bf16 weight against the
same 2:4 weight as ``SparseSemiStructuredTensorCUSPARSELT`` and ``...CUTLASS`` (each where this torch has it);
medians of ``triton.testing.do_bench``; ``speedup = dense_us / us``; ``rel_err`` of the sparse result against
the dense one. A configuration that raises becomes a row with ``error``.
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


SPEED_SHAPES = [(4096, 11008), (11008, 4096)]
SPEED_M = [2048, 16, 1]
SMOKE_SHAPES = [(128, 256), (256, 128)]
SMOKE_M = [64, 16, 1]
SPEED_KEY = ("kernel", "M", "K", "N", "device")


def _time_us(fn, cuda: bool) -> float:
    """Median microseconds of ``fn()``: ``triton.testing.do_bench`` on CUDA (L2 flushed), a wall clock elsewhere."""
    if cuda:
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=25, rep=100, return_mode="median")) * 1e3
    fn()
    ts = []
    for _ in range(5):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return sorted(ts)[len(ts) // 2] * 1e6


def gpu_speed(args: argparse.Namespace) -> None:
    """Dense bf16 ``F.linear`` against the same 2:4 weight on cuSPARSELt and CUTLASS, one row per call shape."""
    import torch.nn.functional as F

    from lowbit.backends.semi_structured import (
        cusparselt_available,
        is_2to4,
        to_semi_structured,
    )
    from lowbit.calibration.sparsity import parse_pattern, prune_mask

    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    dev_name = machine(dev)
    shapes, ms = (SMOKE_SHAPES, SMOKE_M) if args.smoke else (SPEED_SHAPES, SPEED_M)
    import lowbit

    versions = {"lowbit": lowbit.__version__, "torch": torch.__version__, "python": platform.python_version(),
                "cuda": str(torch.version.cuda)}
    try:
        import triton

        versions["triton"] = triton.__version__
    except ImportError:
        versions["triton"] = "not installed"
    try:
        versions["cusparselt"] = str(torch.backends.cusparselt.version()) if cusparselt_available() else "absent"
    except (AttributeError, RuntimeError) as exc:
        versions["cusparselt"] = f"unknown ({exc})"
    date = datetime.datetime.now(datetime.timezone.utc).date().isoformat()
    header = {"command": "python " + " ".join(sys.argv), "date": date, "device": dev_name, "versions": versions,
              "notes": ("2:4 semi-structured sparse GEMM vs dense bf16 F.linear, y = x @ W.T with x [M, K] bf16 "
                        "and W [N, K] bf16 (magnitude 2:4 mask on a random normal weight). us = median of "
                        "triton.testing.do_bench (warmup 25 ms, rep 100 ms); speedup = dense us / us in the same "
                        "run; rel_err = ||y_sparse - y_dense|| / ||y_dense||." + (" SMOKE: tiny shapes." if args.smoke
                                                                                  else ""))}
    out = Path(args.out)
    rows: list[dict] = []
    libs = ["cusparselt", "cutlass"]
    gen = torch.Generator().manual_seed(0)
    for k, n in shapes:
        w = torch.randn(n, k, generator=gen)
        w[prune_mask(w.abs(), parse_pattern("2:4", 0.5))] = 0
        w = w.to(dev, torch.bfloat16)
        assert is_2to4(w)
        sparse: dict[str, torch.Tensor | Exception] = {}
        for lib in libs:
            try:
                if lib == "cusparselt" and not cusparselt_available():
                    raise RuntimeError("this torch has no cuSPARSELt")
                sparse[lib] = to_semi_structured(w, lib)
            except Exception as exc:  # noqa: BLE001 - a library that refuses becomes an error row
                sparse[lib] = exc
        for m in ms:
            x = torch.randn(m, k, generator=gen).to(dev, torch.bfloat16)
            base = {"model": "", "scheme": "2:4", "M": m, "K": k, "N": n, "dtype": "bf16", "device": dev_name,
                    "date": date}
            with torch.no_grad():
                ref = F.linear(x, w)
                dense_us = _time_us(lambda x=x, w=w: F.linear(x, w), cuda)
            row = {**base, "kernel": "dense-bf16", "method": "F.linear", "us": round(dense_us, 2)}
            rows.append(row)
            print(json.dumps(row), flush=True)
            for lib in libs:
                row = {**base, "kernel": f"2:4-{lib}", "method": f"SparseSemiStructuredTensor{lib.upper()}",
                       "baseline": "dense-bf16", "baseline_us": round(dense_us, 2)}
                try:
                    ws = sparse[lib]
                    if isinstance(ws, Exception):
                        raise ws
                    with torch.no_grad():
                        y = F.linear(x, ws)
                        row["rel_err"] = float((y.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30))
                        us = _time_us(lambda x=x, ws=ws: F.linear(x, ws), cuda)
                    row.update(us=round(us, 2), speedup=round(dense_us / us, 3))
                except Exception as exc:  # noqa: BLE001 - one failing configuration must not end the run
                    row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
                rows.append(row)
                print(json.dumps(row), flush=True)
            merge_rows(out, header, rows, key=SPEED_KEY)
        sparse.clear()
        if cuda:
            torch.cuda.empty_cache()
    merge_rows(out, header, rows, key=SPEED_KEY)


STRUCTURED_ROWS = r"^structured-[123]0:flap:mlp channels, fluctuation"
"""``--rows structured``: the FLAP-style MLP rows at 10/20/30% (one method across the three ratios)."""


def _on_device(pipeline: str, dev: str) -> str:
    """Calibrating passes (every one whose options carry ``progress=false`` here) calibrate on ``dev``."""
    return pipeline if dev == "cpu" else pipeline.replace("progress=false", f"progress=false,device={dev}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--eval", default="wt2-512x40", choices=sorted(EVALS))
    ap.add_argument("--windows", type=int, default=None, help="override the eval's window count")
    ap.add_argument("--match", default="", help="regex on 'scheme:method:variant' selecting rows (float always runs)")
    ap.add_argument("--rows", default="all", choices=["all", "structured"],
                    help=f"structured: only the rows matching {STRUCTURED_ROWS!r} (and float)")
    ap.add_argument("--device", default="cpu", help="where calibration, evaluation and recovery run (cpu, cuda)")
    ap.add_argument("--recover-tokens", type=int, default=0,
                    help="after each structured row, also a row recovered by distill(tokens=N) toward the float "
                         "model's logits (0: none)")
    ap.add_argument("--recover-lr", type=float, default=2e-4)
    ap.add_argument("--recover-seconds", type=float, default=None,
                    help="cap on each recovery's wall time (the row says how many tokens ran)")
    ap.add_argument("--recover-batch", type=int, default=8, help="512-token windows per recovery step")
    ap.add_argument("--out", default="bench/results/pruning.json")
    ap.add_argument("--gpu-speed", action="store_true",
                    help="time 2:4 semi-structured sparse GEMMs against dense bf16 instead (see the docstring)")
    ap.add_argument("--smoke", action="store_true", help="with --gpu-speed: tiny shapes (checks the script on CPU)")
    args = ap.parse_args()
    if args.gpu_speed:
        gpu_speed(args)
        return
    dev = args.device
    dev_name = machine(dev)
    match = STRUCTURED_ROWS if args.rows == "structured" else args.match
    if args.rows == "structured" and args.match:
        match = f"(?={STRUCTURED_ROWS})(?=.*(?:{args.match}))"
    model, tok, kind = load_model(args.model)
    assert kind == "causal-lm"
    spec = dict(EVALS[args.eval])
    if args.windows is not None:
        spec["max_windows"] = args.windows
    eval_name = args.eval if args.windows is None else f"wt2-{spec['seq_len']}x{args.windows}"
    if args.recover_tokens:
        # recovery trains on batches of windows: a batch-1 example would specialise the graph to batch 1
        graph = capture(model, (torch.randint(0, 49152, (2, 64)),),
                        dynamic_shapes={"input_ids": {0: torch.export.Dim.DYNAMIC(min=1, max=64),
                                                      1: torch.export.Dim.DYNAMIC(min=2, max=8192)}})
    else:
        graph = capture(model, (torch.randint(0, 49152, (1, 64)),),
                        dynamic_shapes={"input_ids": {1: torch.export.Dim.DYNAMIC(min=2, max=8192)}})
    block_params = _block_linear_params(graph)
    total_params = sum(v.data.numel() for v in graph.params.values())
    import lowbit

    recovery_note = ""
    if args.recover_tokens:
        recovery_note = (f" Recovered rows: distill(tokens={args.recover_tokens}, lr={args.recover_lr}, "
                         f"batch {args.recover_batch} x 512, dtype {'bfloat16' if dev != 'cpu' else 'float32'}, "
                         f"max_seconds={args.recover_seconds}) on the pruned graph, teacher = the float graph, "
                         "KL to its logits on the shipped WikiText-2 validation excerpt (112 windows of 512, "
                         "repeated in shuffled epochs; never the test text); row 'recovery' and 'recover_*' say "
                         "what ran.")
    header = {
        "command": "python " + " ".join(sys.argv),
        "date": datetime.date.today().isoformat(),
        "device": dev_name,
        "versions": {"lowbit": lowbit.__version__, "torch": torch.__version__,
                     "transformers": __import__("transformers").__version__, "python": platform.python_version()},
        "notes": ("One-shot pruning unless a row says recovery. Calibration: the shipped WikiText-2 "
                  "validation text (wikitext2-valid-calib), 512-token windows; calib count in each row's pipeline. "
                  "Structured rows: params_removed_frac_blocks = removed / params of the 30 blocks' linears "
                  f"({block_params}); params_removed_frac_total = removed / all params ({total_params}, tied "
                  "embedding once)." + recovery_note),
    }
    out = Path(args.out)
    rows: list[dict] = []
    float_value = None

    def score(g, scheme: str, method: str, variant: str, pipeline: str | None, pass_s: float, stats: dict) -> dict:
        nonlocal float_value
        r = perplexity(TorchCompiled(g, dev), "wikitext2-test", tokenizer=tok, progress=False, device=dev, **spec)
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
        return row

    def emit(row: dict) -> None:
        rows.append(row)
        print(json.dumps(row), flush=True)
        merge_rows(out, header, rows)

    for scheme, method, variant, pipeline in ROWS:
        if match and scheme != "float" and not re.search(match, f"{scheme}:{method}:{variant}"):
            continue
        g = graph.clone()
        t1 = time.perf_counter()
        stats: dict = {}
        fallback = ""
        try:
            if pipeline is not None:
                try:
                    report = PassManager(_on_device(pipeline, dev)).run(g)
                except Exception as exc:
                    if dev == "cpu":
                        raise
                    fallback = f"calibrated on cpu: on {dev}: {type(exc).__name__}: {str(exc)[:200]}"
                    g = graph.clone()
                    report = PassManager(pipeline).run(g)
                stats = {r.spec: r.stats for r in report.records}
            row = score(g, scheme, method, variant, pipeline, time.perf_counter() - t1, stats)
            if fallback:
                row["calibration_fallback"] = fallback
        except Exception as exc:
            if scheme == "float":
                raise
            row = {"model": "smollm2-135m", "scheme": scheme, "method": method, "variant": variant,
                   "eval": eval_name, "device": dev_name, "date": header["date"], "pipeline": pipeline or "",
                   "error": f"{type(exc).__name__}: {str(exc)[:400]}"}
            emit(row)
            continue
        emit(row)
        if args.recover_tokens and scheme.startswith("structured"):
            emit(recover(args, graph, g, row, score, dev))
        del g


def recover(args: argparse.Namespace, teacher, pruned, base: dict, score, dev: str) -> dict:
    """The pruned graph after ``distill`` toward ``teacher`` (the float graph): a row beside ``base``."""
    from lowbit.passes.distill import Distill

    variant = f"{base['variant']} + distill {args.recover_tokens} tokens"
    g = pruned.clone()
    d = Distill(tokens=args.recover_tokens, lr=args.recover_lr, batch_size=args.recover_batch, calib_len=512,
                calib_n=112, dtype="float32" if dev == "cpu" else "bfloat16",
                device=None if dev == "cpu" else dev, max_seconds=args.recover_seconds, progress=False)
    d.reference = teacher
    t1 = time.perf_counter()
    try:
        st = d.run(g).stats
        if dev != "cpu":
            torch.cuda.synchronize()
        row = score(g, base["scheme"], base["method"], variant, base["pipeline"] + "," + d.spec(),
                    base["pass_seconds"] + time.perf_counter() - t1, {})
    except Exception as exc:  # noqa: BLE001 - a failing recovery becomes an error row
        return {**{k: base[k] for k in ("model", "scheme", "method", "eval", "device", "date")}, "variant": variant,
                "pipeline": base["pipeline"] + "," + d.spec(), "error": f"{type(exc).__name__}: {str(exc)[:400]}"}
    row["recovery"] = f"distill: {st['tokens']} tokens in {st['steps']} steps, {st['seconds']} s on {dev}"
    row.update(recover_tokens=st["tokens"], recover_token_budget=args.recover_tokens, recover_steps=st["steps"],
               recover_batch=st["batch_windows"],
               recover_seconds=st["seconds"], recover_stopped_early=st["stopped_early"],
               recover_kl_first=st["kl_first"], recover_kl_last_10pct=st["kl_last_10pct"],
               ratio_without_recovery=base.get("ratio"))
    for k in ("widths", "heads", "blocks_removed"):
        if k in base:
            row[k] = base[k]
    return row


if __name__ == "__main__":
    main()
