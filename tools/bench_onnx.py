"""lowbit's ONNX exports vs ONNX Runtime's own quantizers on SmolLM2-135M: perplexity and ORT CPU latency.

One run, one machine, one results file (``bench/results/onnx.json``, format ``../shared/RESULTS.md``):

1. capture SmolLM2 (float32), export it with lowbit (the float ONNX every ORT quantizer starts from);
2. lowbit: recipes ``w8a8`` (int8 per-channel weights, int8 per-token dynamic activations), a static
   per-tensor W8A8 (same calibration data as ORT's), ``w4a16-g64`` (int4 asymmetric, group 64, RTN) and
   ``w4a16-gptq`` — each exported as standard QDQ ONNX and in the ORT-specialised form
   (``integer_matmul``: MatMulIntegerToFloat for W8A8; ``onnx-matmulnbits`` for W4A16);
3. peers: ``onnxruntime.quantization.quantize_static`` (QDQ, U8 activations per tensor + S8 weights per
   channel, MinMax calibration on the same sequences), ``quantize_dynamic`` (per-tensor dynamic U8 ×
   per-channel S8, MatMulInteger) and ``MatMulNBitsQuantizer`` (int4, block 64, asymmetric), all applied to
   the same linears (every transformer linear; lm_head and the tied embedding stay float as in lowbit);
3b. TensorRT-ready lowbit variants (``trt-*``, 0 ``check_tensorrt_qdq`` errors in their ``onnx`` form): int4
   symmetric group-64 weights (RTN; GPTQ with ``--trt-gptq``) and SmoothQuant + static symmetric per-tensor
   W8A8; every row counts the TensorRT rules it breaks (``tensorrt_qdq_rules``);
4. perplexity on WikiText-2 test (``--windows`` × ``--seq`` tokens) and latency (median of ``--runs``
   interleaved runs of one ``[1, seq]`` forward, ``--threads`` intra-op threads, CPUExecutionProvider).

Run: ``python tools/bench_onnx.py`` (about an hour on 2 CPU cores; ``--windows 10`` for a quick look).

A subset of variants, e.g. the like-for-like dynamic W8A8 pair (``lowbit-w8a8-pt-dyn``: lowbit's per-tensor
dynamic uint8 activations × per-channel int8 weights, ORT's ``quantize_dynamic`` scheme, lowered to
DynamicQuantizeLinear + MatMulIntegerToFloat)::

    python tools/bench_onnx.py --variants float,ort-quantize_dynamic,lowbit-w8a8:integer,\
        lowbit-w8a8-pt-dyn:integer --runs 15 --run dyn-pair

merges its rows into the results file (tagged ``run``/``command``/``date``/``device``; rows of other runs
are kept, earlier rows of the same ``run`` replaced) and states its comparisons in ``runs[run]``, within
that run only.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import resource
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnxruntime.quantization import CalibrationDataReader

import lowbit
from lowbit.backends.onnx import lowered_op_types
from lowbit.backends.onnxruntime_backend import OrtCompiled
from lowbit.backends.torch_backend import TorchCompiled
from lowbit.backends.tensorrt import check_tensorrt_qdq, errors
from lowbit.calibration.data import calibration_ids
from lowbit.eval.perplexity import perplexity
from lowbit.export import export
from lowbit.ir.capture import capture
from lowbit.models import CausalLMLogits, load_smollm2
from lowbit.passes.manager import PassManager, parse_pipeline
from lowbit.recipes import get_recipe

CALIB_TEXT = "wikitext2-valid-calib"

TRT_RULE_CAUSES = {
    "scale-constant-positive": "activation scales computed at run time (dynamic quantization)",
    "zero-point-zero": "non-zero or run-time zero points (asymmetric int4 weights, u8 activations)",
    "supported-qtype": "UINT8/UINT4 quantized types (TensorRT quantizes to signed INT8/INT4/FP8 only)",
    "activation-per-tensor": "per-token activation scales (TensorRT: one scale per activation tensor)",
    "unsupported-quantized-op": "ONNX Runtime integer/contrib ops (MatMulInteger, MatMulIntegerToFloat, "
                                "DynamicQuantizeLinear, MatMulNBits) instead of Q/DQ",
    "q-feeds-dq": "a QuantizeLinear read by something other than DequantizeLinear (integer GEMMs)",
}
"""Why a variant breaks each TensorRT rule, for the results notes (rule names: lowbit.backends.tensorrt.RULES)."""


@dataclass
class Variant:
    """One ONNX file to evaluate and the row fields that describe it."""

    name: str
    path: Path
    row: dict[str, Any]
    session: OrtCompiled | None = None
    latencies: list[float] = field(default_factory=list)
    reference: Any = None
    """For lowbit's exports: the quantized IR, whose torch reference the ONNX Runtime run is compared with."""


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def linear_matmuls(path: Path) -> list[str]:
    """Names of the MatMul nodes that compute quantizable linears (lm_head excluded, as lowbit keeps it float)."""
    model = onnx.load(os.fspath(path), load_external_data=False)
    names = []
    for node in model.graph.node:
        meta = {p.key: p.value for p in node.metadata_props}
        if node.op_type == "MatMul" and meta.get("lowbit.op") == "linear" and not meta.get(
                "lowbit.module", "").endswith("lm_head"):
            names.append(node.name)
    return names


class WindowsReader(CalibrationDataReader):
    """ORT's calibration reader over the same token windows lowbit's static calibration uses."""

    def __init__(self, ids: torch.Tensor) -> None:
        self.items = iter([{"input_ids": row[None].numpy()} for row in ids])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.items, None)


def quantize_lowbit(graph: Any, pipeline: str) -> tuple[Any, float]:
    g = graph.clone()
    t0 = time.perf_counter()
    PassManager(parse_pipeline(pipeline)).run(g)
    return g, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--calib-n", type=int, default=16)
    ap.add_argument("--calib-len", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--ref-windows", type=int, default=6)
    ap.add_argument("--opset", type=int, default=21)
    ap.add_argument("--no-gptq", action="store_true")
    ap.add_argument("--trt-gptq", action="store_true", help="also GPTQ with symmetric int4 (TensorRT-ready)")
    ap.add_argument("--trt-a-obs", default="minmax", help="observer of the TensorRT W8A8 static scales")
    ap.add_argument("--workdir", default="/tmp/lowbit-bench-onnx")
    ap.add_argument("--out", default="bench/results/onnx.json")
    ap.add_argument("--variants", default=None,
                    help="comma-separated variant names to run (default: all); their rows are merged into --out")
    ap.add_argument("--run", default=None, help="name of this subset run in --out (default: subset-<date>)")
    args = ap.parse_args()
    wanted = set(args.variants.split(",")) if args.variants else None

    def want(name: str) -> bool:
        return wanted is None or name in wanted
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    evaluation = f"wt2-{args.seq}x{args.windows}"
    calib_desc = f"{CALIB_TEXT} {args.calib_n}x{args.calib_len}"

    log("loading and capturing SmolLM2-135M")
    model, tok = load_smollm2()
    graph = capture(CausalLMLogits(model).eval(), (torch.ones(1, 32, dtype=torch.long),),
                    {"input_ids": {1: torch.export.Dim.DYNAMIC(min=2, max=8192)}})
    del model
    gc.collect()
    onnx_opts = {"opset": args.opset}
    variants: list[Variant] = []

    def add(name: str, path: Path, reference: Any = None, **row: Any) -> None:
        size = path.stat().st_size + (path.with_name(path.name + ".data").stat().st_size
                                      if path.with_name(path.name + ".data").exists() else 0)
        trt = check_tensorrt_qdq(path)
        row.update(file_mb=round(size / 2**20, 1), tensorrt_qdq_errors=len(errors(trt)),
                   tensorrt_qdq_rules=dict(sorted(Counter(v.rule for v in errors(trt)).items())),
                   tensorrt_qdq_warnings=dict(sorted(Counter(v.rule for v in trt if v.severity != "error").items())),
                   onnx_ops={k: v for k, v in lowered_op_types(onnx_load_ir(path)).items()
                             if k in ("QuantizeLinear", "DequantizeLinear", "MatMulInteger", "MatMul",
                                      "com.microsoft::MatMulIntegerToFloat", "com.microsoft::DynamicQuantizeMatMul",
                                      "com.microsoft::MatMulNBits", "DynamicQuantizeLinear")})
        if not want(name):
            return
        variants.append(Variant(name, path, row, reference=reference))
        log(f"  {name}: {row['file_mb']} MB, {row['onnx_ops']}, TensorRT Q/DQ errors {row['tensorrt_qdq_rules']}")

    # ---- float --------------------------------------------------------------------------------------
    float_path = export(graph, work / "float.onnx", **onnx_opts)
    if want("float"):
        add("float", float_path, scheme="float", method="none", format="onnx", calib=None)
    matmuls = linear_matmuls(float_path)
    log(f"float ONNX: {len(matmuls)} linear MatMuls to quantize (lm_head kept float)")
    calib = calibration_ids(CALIB_TEXT, tok, args.calib_n, args.calib_len)

    # ---- lowbit ---------------------------------------------------------------------------------------
    lowbit_runs: list[tuple[str, str, str, str]] = [
        ("lowbit-w8a8", get_recipe("w8a8"), "w8a8", "rtn"),
        # ORT quantize_dynamic's scheme (per-tensor dynamic asymmetric uint8 activations, per-channel int8
        # weights): the like-for-like pair; its integer form is DynamicQuantizeLinear + MatMulIntegerToFloat
        ("lowbit-w8a8-pt-dyn", "quantize(w=int8,a=uint8,a_gran=per_tensor,a_sym=false)", "w8a8-dynamic-per-tensor",
         "rtn"),
        ("lowbit-w8a8-static", "quantize(w=int8,a=int8,a_gran=per_tensor,a_static=true,"
                               f"calib_n={args.calib_n},calib_len={args.calib_len})", "w8a8-static", "rtn"),
        ("lowbit-w4a16-g64", get_recipe("w4a16-g64"), "w4a16-g64", "rtn"),
    ]
    if not args.no_gptq:
        # the w4a16-gptq recipe, calibrated on the same sequences as the static scales (the recipe's default
        # 64 x 512 takes over an hour on 2 cores)
        gptq = get_recipe("w4a16-gptq").replace(")", f",calib_n={args.calib_n},calib_len={args.calib_len})")
        lowbit_runs.append(("lowbit-w4a16-g64-gptq", gptq, "w4a16-g64", "gptq"))
    # TensorRT-ready variants (0 check_tensorrt_qdq errors in the "onnx" export): symmetric int4 block weights
    # (TensorRT's INT4 weight-only form has no zero points), and W8A8 with static symmetric per-tensor int8
    # activations (TensorRT's Q/DQ scales are build-time constants, one per activation tensor) after SmoothQuant
    cal = f"calib_n={args.calib_n},calib_len={args.calib_len}"
    lowbit_runs += [
        ("trt-w4a16-g64-sym", "quantize(w=int4,group=64,sym=true)", "w4a16-g64-sym", "rtn"),
        ("trt-w8a8-sq-static", f"smooth-quant({cal},progress=false),quantize(w=int8,a=int8,a_gran=per_tensor,"
                               f"a_static=true,a_obs={args.trt_a_obs},{cal})", "w8a8-static", "smoothquant"),
    ]
    if args.trt_gptq:
        lowbit_runs.append(("trt-w4a16-g64-sym-gptq", f"gptq(w=int4,group=64,sym=true,{cal})", "w4a16-g64-sym",
                            "gptq"))
    forms = ("onnx", "integer", "matmulnbits")
    lowbit_runs = [r for r in lowbit_runs if any(want(f"{r[0]}:{f}") for f in forms)]
    for name, pipeline, scheme, method in lowbit_runs:
        log(f"lowbit: {pipeline}")
        g, seconds = quantize_lowbit(graph, pipeline)
        base = dict(scheme=scheme, method=method, pipeline=pipeline, quantize_seconds=round(seconds, 1),
                    calib=calib_desc if ("static" in pipeline or method == "gptq") else None,
                    tensorrt_target=name.startswith("trt-"))
        if want(f"{name}:onnx"):
            add(f"{name}:onnx", export(g, work / f"{name}.onnx", **onnx_opts), reference=g, format="onnx", **base)
        if scheme.startswith("w8a8") and want(f"{name}:integer"):
            add(f"{name}:integer", export(g, work / f"{name}-int.onnx", integer_matmul=True, **onnx_opts),
                reference=g, format="onnx+integer_matmul", **base)
        elif not scheme.startswith("w8a8") and want(f"{name}:matmulnbits"):
            add(f"{name}:matmulnbits", export(g, work / f"{name}-nbits.onnx", format="onnx-matmulnbits",
                                              **onnx_opts), reference=g, format="onnx-matmulnbits", **base)
        gc.collect()

    # ---- ONNX Runtime's quantizers -----------------------------------------------------------------
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    if want("ort-quantize_static"):
        log("onnxruntime quantize_static (QDQ, U8 per-tensor activations, S8 per-channel weights, MinMax)")
        t0 = time.perf_counter()
        path = work / "ort-static.onnx"
        quantize_static(os.fspath(float_path), os.fspath(path), WindowsReader(calib), quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=["MatMul"], nodes_to_quantize=matmuls, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax)
        add("ort-quantize_static", path, scheme="w8a8-static", method="peer:onnxruntime-quantize_static",
            format="ort-qdq", calib=calib_desc, quantize_seconds=round(time.perf_counter() - t0, 1))

    if want("ort-quantize_dynamic"):
        log("onnxruntime quantize_dynamic (U8 per-tensor dynamic activations, S8 per-channel weights)")
        t0 = time.perf_counter()
        path = work / "ort-dynamic.onnx"
        quantize_dynamic(os.fspath(float_path), os.fspath(path), op_types_to_quantize=["MatMul"],
                         nodes_to_quantize=matmuls, per_channel=True, weight_type=QuantType.QInt8)
        add("ort-quantize_dynamic", path, scheme="w8a8-dynamic-per-tensor",
            method="peer:onnxruntime-quantize_dynamic", format="ort-qoperator", calib=None,
            quantize_seconds=round(time.perf_counter() - t0, 1))

    if want("ort-matmulnbits"):
        log("onnxruntime MatMulNBitsQuantizer (int4, block 64, asymmetric)")
        t0 = time.perf_counter()
        quant = MatMulNBitsQuantizer(onnx.load(os.fspath(float_path)), bits=4, block_size=64, is_symmetric=False,
                                     nodes_to_include=matmuls)
        quant.process()
        path = work / "ort-matmulnbits.onnx"
        onnx.save(quant.model.model, os.fspath(path))
        add("ort-matmulnbits", path, scheme="w4a16-g64", method="peer:onnxruntime-MatMulNBitsQuantizer",
            format="ort-matmulnbits", calib=None, quantize_seconds=round(time.perf_counter() - t0, 1))
    if wanted is not None and wanted - {v.name for v in variants}:
        raise SystemExit(f"unknown variants: {sorted(wanted - {v.name for v in variants})}")

    # ---- sessions, latency, perplexity --------------------------------------------------------------
    log("creating sessions")
    for v in variants:
        v.session = OrtCompiled.load(v.path, threads=args.threads, providers=["CPUExecutionProvider"])
    x = torch.randint(0, 49152, (1, args.seq), generator=torch.Generator().manual_seed(0))
    for v in variants:
        v.session(x)  # warm up
    log(f"latency: {args.runs} interleaved rounds of a [1, {args.seq}] forward")
    for _ in range(args.runs):
        for v in variants:
            t0 = time.perf_counter()
            v.session(x)
            v.latencies.append(time.perf_counter() - t0)
    rows = []
    float_ppl = None
    for v in variants:
        log(f"perplexity {evaluation}: {v.name}")
        result = perplexity(v.session, "wikitext2-test", seq_len=args.seq, max_windows=args.windows,
                            tokenizer=tok, progress=False)
        if v.name == "float":
            float_ppl = result.ppl
        row = dict(model="smollm2-135m", eval=evaluation, value=round(result.ppl, 4),
                   float_value=round(float_ppl, 4) if float_ppl else None, variant=v.name,
                   latency_ms=round(1000 * float(np.median(v.latencies)), 1),
                   latency_ms_min=round(1000 * min(v.latencies), 1), seconds=round(result.seconds, 1), **v.row)
        rows.append(row)
        log(f"  ppl {result.ppl:.3f}  latency {row['latency_ms']} ms")
    for r in rows:
        r["float_value"] = round(float_ppl, 4) if float_ppl else None
        r["ppl_ratio"] = round(r["value"] / float_ppl, 4) if float_ppl else None

    # parity on the full model: ONNX Runtime vs lowbit's torch reference of the same quantized graph, on the
    # first --ref-windows windows (the torch reference unpacks weights on every call: slow)
    parity_eval = f"wt2-{args.seq}x{args.ref_windows}"
    done: set[int] = set()
    for v in variants:
        if v.reference is None or id(v.reference) in done:
            continue
        done.add(id(v.reference))
        log(f"parity {parity_eval}: torch reference vs ONNX Runtime for {v.name}")
        ref = perplexity(TorchCompiled(v.reference), "wikitext2-test", seq_len=args.seq,
                         max_windows=args.ref_windows, tokenizer=tok, progress=False)
        noise: dict[str, Any] = {}
        if "a=" in v.row.get("pipeline", ""):
            # the graph's own sensitivity: the same reference with its norm gains moved by ±1 ulp
            jittered = perplexity(TorchCompiled(ulp_jitter(v.reference)), "wikitext2-test", seq_len=args.seq,
                                  max_windows=args.ref_windows, tokenizer=tok, progress=False)
            noise = dict(reference_1ulp_ppl=round(jittered.ppl, 4),
                         reference_1ulp_rel=round(abs(jittered.ppl - ref.ppl) / ref.ppl, 6))
            log(f"  reference with norm gains ±1 ulp: {jittered.ppl:.4f}")
        for w in variants:
            if w.reference is v.reference:
                got = perplexity(w.session, "wikitext2-test", seq_len=args.seq, max_windows=args.ref_windows,
                                 tokenizer=tok, progress=False)
                wrow = rows[variants.index(w)]
                wrow.update(parity_eval=parity_eval, reference_ppl=round(ref.ppl, 4), ort_ppl=round(got.ppl, 4),
                            parity_rel=round(abs(got.ppl - ref.ppl) / ref.ppl, 6), **noise)
                log(f"  {w.name}: reference {ref.ppl:.4f}, onnxruntime {got.ppl:.4f}")

    results = {
        "command": "python " + " ".join(sys.argv),
        "date": datetime.date.today().isoformat(),
        "device": f"cpu: {_cpu_name()} ({os.cpu_count()} cores), onnxruntime CPUExecutionProvider, "
                  f"{args.threads} intra-op threads",
        "versions": {"lowbit": lowbit.__version__, "torch": torch.__version__, "onnx": onnx.__version__,
                     "onnxruntime": ort.__version__, "onnx-ir": __import__("onnx_ir").__version__,
                     "transformers": __import__("transformers").__version__, "python": platform.python_version()},
        "notes": (f"latency: median of {args.runs} interleaved runs of one [1, {args.seq}] forward (the machine "
                  "is shared: compare rows of this run only); every quantized variant quantizes the same "
                  f"{len(matmuls)} linears (lm_head and the tied embedding float); ONNX opset {args.opset}, "
                  "attention decomposed (MatMul/Softmax) in every file; tensorrt_qdq_errors: violations of "
                  "TensorRT's explicit-quantization rules (lowbit.backends.tensorrt.check_tensorrt_qdq), per rule in "
                  "tensorrt_qdq_rules and, per rule with its cause, in tensorrt_rules_broken; trt-* variants are "
                  "the TensorRT-ready exports (0 errors in their onnx form); "
                  "parity_*: ONNX Runtime vs lowbit's torch reference of the same quantized graph on the first "
                  f"{args.ref_windows} windows; reference_1ulp_*: that reference with its norm gains moved by "
                  "±1 ulp (how far float rounding alone moves a graph with quantized activations); per-tensor "
                  "dynamic activation scales (lowbit-w8a8-pt-dyn, ort-quantize_dynamic) tie every token to the "
                  "tensor's extreme value, so float-rounding differences upstream (ONNX Runtime's float ops vs "
                  "torch's) move them further than per-token ones: their lowering is exact on equal inputs "
                  "(tests/test_onnx_quantized.py)"),
        "tensorrt_rules_broken": trt_rule_summary(rows),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "rows": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if wanted is None:
        results["side_by_side"] = side_by_side(rows)
    else:
        results = merge_subset_run(out, results, args.run or f"subset-{results['date']}", args.runs)
    out.write_text(json.dumps(results, indent=2) + "\n")
    log(f"wrote {out}")


PAIRS = [("lowbit-w8a8-pt-dyn:integer", "ort-quantize_dynamic"), ("lowbit-w8a8:integer", "ort-quantize_dynamic"),
         ("lowbit-w8a8-static:integer", "ort-quantize_static"), ("lowbit-w4a16-g64:matmulnbits", "ort-matmulnbits")]
"""lowbit variant vs the ONNX Runtime quantizer it is compared with (the first pair is the same scheme)."""


def side_by_side(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """lowbit vs ORT for each pair of PAIRS present in ``rows`` (rows of one run): perplexity and latency."""
    by = {r["variant"]: r for r in rows}
    out: dict[str, Any] = {}
    for mine, peer in PAIRS:
        if mine in by and peer in by:
            a, b = by[mine], by[peer]
            out[f"{mine} vs {peer}"] = dict(
                same_scheme=a["scheme"] == b["scheme"], ppl=a["value"], peer_ppl=b["value"],
                at_least_as_accurate=a["value"] <= b["value"] * 1.005,
                latency_ms=a["latency_ms"], peer_latency_ms=b["latency_ms"],
                latency_ratio=round(a["latency_ms"] / b["latency_ms"], 3),
                latency_ms_min=a["latency_ms_min"], peer_latency_ms_min=b["latency_ms_min"],
                latency_min_ratio=round(a["latency_ms_min"] / b["latency_ms_min"], 3),
                no_slower=a["latency_ms"] <= b["latency_ms"] and a["latency_ms_min"] <= b["latency_ms_min"])
    return out


def merge_subset_run(out: Path, results: dict[str, Any], run: str, runs: int) -> dict[str, Any]:
    """Merge a ``--variants`` run into the existing results file: its rows, tagged with ``run``, ``command``,
    ``date`` and ``device``, replace earlier rows of the same run; every other row and the file's top level
    (the full run's) stay. ``runs[run]`` holds this run's notes and its lowbit-vs-ORT comparisons, which
    only ever pair rows of this run."""
    merged = json.loads(out.read_text()) if out.exists() else {k: v for k, v in results.items() if k != "rows"} | {
        "rows": []}
    tag = dict(run=run, command=results["command"], date=results["date"], device=results["device"])
    rows = [dict(r, **tag) for r in results["rows"]]
    merged["rows"] = [r for r in merged.get("rows", []) if r.get("run") != run] + rows
    merged.setdefault("runs", {})[run] = dict(
        tag, versions=results["versions"], peak_rss_mb=results["peak_rss_mb"],
        notes=results["notes"].replace(f"median of {runs} interleaved runs",
                                       f"median (and min) of {runs} interleaved runs"),
        side_by_side=side_by_side(rows))
    if "tensorrt_rules_broken" in merged:  # the full run's summary, now with this run's variants too
        merged["tensorrt_rules_broken"] = trt_rule_summary(
            [r for r in merged["rows"] if r.get("run") in (None, run)])
    return merged


def trt_rule_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per TensorRT rule: what breaks it and the error count of every variant that does."""
    summary: dict[str, Any] = {}
    for r in rows:
        for rule, n in r.get("tensorrt_qdq_rules", {}).items():
            entry = summary.setdefault(rule, {"cause": TRT_RULE_CAUSES.get(rule, ""), "errors": {}})
            entry["errors"][r["variant"]] = n
    return summary


def ulp_jitter(graph: Any, seed: int = 0) -> Any:
    """A copy of ``graph`` whose norm gains each moved by -1, 0 or +1 ulp (seeded): a float32-rounding-sized
    change, to measure how far rounding alone moves a quantized graph's perplexity."""
    g = graph.clone()
    gen = torch.Generator().manual_seed(seed)
    for name, p in g.params.items():
        if name.endswith("norm.weight") and p.data is not None and p.data.is_floating_point():
            w = p.data
            step = torch.randint(-1, 2, w.shape, generator=gen)
            up = torch.nextafter(w, torch.full_like(w, float("inf")))
            down = torch.nextafter(w, torch.full_like(w, float("-inf")))
            g.set_param(name, torch.where(step > 0, up, torch.where(step < 0, down, w)))
    return g


def onnx_load_ir(path: Path) -> Any:
    from lowbit.backends.onnx import load_onnx

    return load_onnx(path, check=False)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


if __name__ == "__main__":
    main()
