"""Where a decode step's GPU time goes: torch.profiler over ``generate``'s CUDA-graph replays, kernels by name.

    python tools/profile_decode.py [--schemes w4a16-g128,float-bf16] [--batch 1] [--no-compile]
        [--no-norm-residual] [--no-pdl] [--no-rotary-cache]

On the 7B-shaped 4-layer Llama of ``bench_generate`` (prompt 512): each scheme is compiled on the triton backend
(step under ``torch.compile`` unless ``--no-compile``), warmed up, timed, then profiled over 32 decode steps; the
table is device µs per step and launches per step for the heaviest kernels (the prefill's kernels are in the totals,
divided over the steps: they are the large-tile GEMMs and ``_dequant_words``). Prints; writes nothing.
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

from lowbit.api import compile_model  # noqa: E402
from lowbit.generate import GenerationSpec  # noqa: E402


def profile_scheme(model: torch.nn.Module, scheme: str, batch: int, compiled: bool, top: int,
                   norm_residual: bool = True, pdl: bool = True, rotary_cache: bool = True) -> None:
    cm = compile_model(model, pipeline=bench_generate.QUANTIZED[scheme], backend="triton",
                       backend_options={"compile": compiled, "norm_residual": norm_residual, "pdl": pdl,
                                        "rotary_cache": rotary_cache},
                       generation=GenerationSpec(max_length=512 + 64, max_batch=batch), device="cuda")
    ids = torch.randint(3, model.config.vocab_size, (batch, 512))
    cm.generate(ids, 8, stop_tokens=())
    out = cm.generate(ids, 48, stop_tokens=())
    print(f"== {scheme} batch {batch} compile={compiled} norm_residual={norm_residual} pdl={pdl} "
          f"rotary_cache={rotary_cache}: "
          f"{out.decode_seconds * 1000 / out.decode_steps:.3f} ms/step")
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        out = cm.generate(ids, 33, stop_tokens=())
    steps = out.decode_steps
    events = sorted((e for e in prof.key_averages() if e.self_device_time_total > 0),
                    key=lambda e: -e.self_device_time_total)
    total = sum(e.self_device_time_total for e in events)
    print(f"device us per step (prefill's share included): {total / steps:.1f}")
    for e in events[:top]:
        print(f"{e.self_device_time_total / steps:9.1f} us/step {e.count / steps:6.1f}x  {e.key[:110]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--schemes", default="w4a16-g128,float-bf16")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--top", type=int, default=28)
    ap.add_argument("--no-norm-residual", action="store_true",
                    help="keep RMSNorms and residual adds out of the weight-only kernels (the A/B baseline)")
    ap.add_argument("--no-pdl", action="store_true",
                    help="weight-only GEMVs without programmatic dependent launch (the A/B baseline)")
    ap.add_argument("--no-rotary-cache", action="store_true",
                    help="keep the rotary of q/k and the float KV-cache writes as their own kernels (the A/B baseline)")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("profile_decode needs CUDA")
    model = bench_generate._llama(False)
    for scheme in a.schemes.split(","):
        profile_scheme(model, scheme, a.batch, not a.no_compile, a.top, not a.no_norm_residual, not a.no_pdl,
                       not a.no_rotary_cache)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
