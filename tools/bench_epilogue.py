"""Epilogue fusion on the GPU: a quantized linear with its activation (or gated MLP) in the kernel's store vs the
same op followed by the activation's torch ops, side by side in one run.

Shapes: BERT-base and MiniLM MLP up-projections with GELU (W8A8, M = 2048 = 16 x 128 tokens; W4A16 at M = 16),
and the 7B-shaped Llama's merged gate/up (K 4096 -> 2 x 11008) with silu*up (W4A16 at M = 1 and 16, W8A8 at
M = 16 and 2048). Times are CUDA-graph replays (``triton.testing.do_bench_cudagraph``) of the whole op, the
unfused row including the activation's own kernel; rows go to ``bench/results/kernels.json`` (key: kernel, M,
K, N, run).

    python tools/bench_epilogue.py --run E10
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_io import machine, merge_rows, versions  # noqa: E402

CASES = [  # name, scheme, M, K, N (the weight's rows: gated = 2 x the output width), epilogue
    ("bert-base up", "w8a8", 2048, 768, 3072, "gelu"),
    ("minilm up", "w8a8", 2048, 384, 1536, "gelu"),
    ("bert-base up", "w4a16-g128", 16, 768, 3072, "gelu"),
    ("llama-7b gate/up", "w4a16-g128", 1, 4096, 22016, "silu*up"),
    ("llama-7b gate/up", "w4a16-g128", 16, 4096, 22016, "silu*up"),
    ("llama-7b gate/up", "w8a8", 16, 4096, 22016, "silu*up"),
    ("llama-7b gate/up", "w8a8", 2048, 4096, 22016, "silu*up"),
]


def _weights(scheme: str, n: int, k: int, dev: str):
    """Quantized weight operands of ``scheme`` in the layout the triton backend gives them."""
    from lowbit.ir.quant import qparams_from_range, quantize
    from lowbit.kernels.weight_only import pack_words

    w = torch.randn(n, k, device=dev)
    if scheme == "w8a8":
        s = w.abs().amax(1) / 127
        return quantize(w, s, None, qdtype="int8", axis=0), s.to(torch.bfloat16), None
    g = w.reshape(n, k // 128, 128)
    s, z = qparams_from_range(g.amin(-1), g.amax(-1), qdtype="uint4", symmetric=False)
    q = quantize(w, s, z, qdtype="uint4", axis=1, block_size=128)
    return pack_words(q, s.to(torch.bfloat16), z.to(torch.bfloat16), "uint4", 128)


def _op(scheme: str, x, q, s, z, b, epilogue: str):
    if scheme == "w8a8":
        return torch.ops.lowbit.a8_linear(x, q, s, z, b, "int8", 0, "int8", 0, epilogue=epilogue)
    return torch.ops.lowbit.weight_only_linear(x, q, s, z, b, "uint4", 128, "auto", epilogue)


def main() -> None:
    import triton.testing

    import lowbit.kernels  # noqa: F401 - registers torch.ops.lowbit.*
    from lowbit.kernels._common import epilogue_ref

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="")
    ap.add_argument("--out", default="bench/results/kernels.json")
    args = ap.parse_args()
    dev = "cuda"
    rows = []
    for name, scheme, m, k, n, epilogue in CASES:
        torch.manual_seed(0)
        q, s, z = _weights(scheme, n, k, dev)
        x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
        b = torch.randn(n, device=dev, dtype=torch.bfloat16) if name.startswith(("bert", "minilm")) else None
        fused = lambda: _op(scheme, x, q, s, z, b, epilogue)  # noqa: E731
        unfused = lambda: epilogue_ref(_op(scheme, x, q, s, z, b, ""), epilogue)  # noqa: E731
        ref = unfused()
        got = fused()
        err = ((got.float() - ref.float()).norm() / ref.float().norm()).item()
        t_f = triton.testing.do_bench_cudagraph(fused, rep=100)
        t_u = triton.testing.do_bench_cudagraph(unfused, rep=100)
        row = {"kernel": f"{scheme}+{epilogue}", "shape": name, "M": m, "K": k, "N": n, "us": round(t_f * 1e3, 2),
               "baseline": f"{scheme} then torch {epilogue}", "baseline_us": round(t_u * 1e3, 2),
               "speedup": round(t_u / t_f, 3), "rel_diff_vs_unfused": float(f"{err:.3g}"),
               "device": machine(dev), "date": datetime.date.today().isoformat(),
               "run": f"{args.run}: epilogue fusion; us = CUDA-graph replay of the op (unfused: + the activation)"}
        print(row, flush=True)
        rows.append(row)
    out = Path(args.out)
    command = "python " + shlex.join(sys.argv)
    header = {"command": f"run {args.run}: {command}", "date": datetime.date.today().isoformat(),
              "device": machine(dev), "versions": versions()}
    # the file keeps its header (other runs' rows share it): this run's command is appended, its versions go
    # into the note
    merge_rows(out, header, rows, key=("kernel", "shape", "M", "K", "N", "run"), replace_header=False,
               append_command=True)
    add_note(out, f" Run {args.run} ({header['date']}, {header['device']}, torch {torch.__version__}, "
                  f"triton {header['versions'].get('triton')}): tools/bench_epilogue.py's rows (epilogue fusion).")


def add_note(out: Path, note: str) -> None:
    """A sentence added to the results file's ``note`` (once)."""
    top = json.loads(out.read_text())
    if note not in top.get("note", ""):
        top["note"] = top.get("note", "") + note
        out.write_text(json.dumps(top, indent=1) + "\n")


if __name__ == "__main__":
    main()
