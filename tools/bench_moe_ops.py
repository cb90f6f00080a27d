"""The routed MoE ops alone, one Mixtral-shaped layer: the per-row grouped ops (``moe_gate_up`` + ``moe_down``, one
program per (token, expert)) against the expert-blocked ones (``moe_route`` + ``moe_gate_up_blocked`` +
``moe_down_blocked``, one program per (expert, block of its rows)) over the rows of a call, to place
``grouped_experts.MAX_ROWS`` / ``WORDS_MAX_ROWS`` where the two cross.

    python tools/bench_moe_ops.py [--out bench/results/moe.json]    # on a GPU
    TRITON_INTERPRET=1 python tools/bench_moe_ops.py --smoke         # CPU: tiny shapes, the two forms compared

The layer: hidden 1024, 8 experts of 2816, top-2 of random router weights, bf16 weights and int4 words (asymmetric,
groups of 128, ``pack_words``' default order); each form replayed from one CUDA graph (``bench_kernels.bench_graph``:
no launch cost, as a captured step sees it). ``speedup``: per-row µs / blocked µs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_io import machine, merge_rows, run_header  # noqa: E402

from lowbit.kernels.moe_blocked import moe_down_blocked, moe_gate_up_blocked, moe_route  # noqa: E402
from lowbit.kernels.moe_gemv import moe_down, moe_gate_up, stack_experts  # noqa: E402

ROWS = (1, 2, 4, 8, 16, 32, 64, 256, 2048)
SCHEMES = {"float-bf16": ("", 0), "w4a16-g128": ("int4", 128)}
ROW_KEY = ("model", "scheme", "method", "batch", "device")  # (bench_moe's)


def _stacked(n: int, k: int, experts: int, qdtype: str, group: int, interleave: bool, dev: str) -> tuple:
    """Every expert's weight as the Triton backend leaves it (``pack_words``, gate/up rows interleaved for the
    weight-only gated epilogue), stacked (``stack_experts``)."""
    if not qdtype:
        return (torch.randn(experts, n, k, device=dev) / k ** 0.5).to(torch.bfloat16), None, None
    from lowbit.calibration.gptq import weight_qparams
    from lowbit.ir.quant import get_qdtype, quantize
    from lowbit.kernels.weight_only import interleave_rows, pack_words

    parts = []
    for _ in range(experts):
        w = torch.randn(n, k, device=dev) / k ** 0.5
        s, z = weight_qparams(w, get_qdtype(qdtype), False, group)
        q = quantize(w, s, z, qdtype=qdtype, axis=1, block_size=group)
        if interleave:
            q, s, z = interleave_rows(q), interleave_rows(s), interleave_rows(z)
        parts.append(pack_words(q, s, z, qdtype, group))
    return tuple(stack_experts([p[i] for p in parts]) for i in range(3))


def _routing(rows: int, experts: int, top_k: int, dev: str) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(rows)
    ids = torch.stack([torch.randperm(experts, generator=g)[:top_k] for _ in range(rows)])
    weights = torch.rand(rows, top_k, generator=g).softmax(-1)
    dense = torch.zeros(rows, experts).scatter(1, ids, weights).to(torch.bfloat16).to(dev)
    return dense, dense != 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("bench/results/moe.json"))
    ap.add_argument("--smoke", action="store_true", help="CPU, Triton's interpreter, tiny shapes; writes nothing")
    ap.add_argument("--rows", default=",".join(map(str, ROWS)), help="comma-separated rows of a call")
    args = ap.parse_args()
    smoke = args.smoke
    if not smoke and not torch.cuda.is_available():
        sys.exit("bench_moe_ops times the kernels on a GPU (--smoke checks the script under TRITON_INTERPRET=1)")
    dev = "cpu" if smoke else "cuda"
    hidden, inner, experts, top_k = (64, 128, 4, 2) if smoke else (1024, 2816, 8, 2)
    rows_list = [1, 20] if smoke else [int(r) for r in args.rows.split(",")]
    if not smoke:
        from bench_kernels import bench_graph
    out = []
    for scheme, (qdtype, group) in SCHEMES.items():
        torch.manual_seed(0)
        group = 32 if smoke and qdtype else group  # (the smoke's 64-wide rows)
        gate_up = _stacked(2 * inner, hidden, experts, qdtype, group, bool(qdtype), dev)
        down = _stacked(hidden, inner, experts, qdtype, group, False, dev)
        for rows in rows_list:
            dense, picked = _routing(rows, experts, top_k, dev)
            x = torch.randn(rows, hidden, device=dev).to(torch.bfloat16)

            def per_row():
                h = moe_gate_up(x, picked, *gate_up, qdtype, group, "silu*up", bool(qdtype))
                return moe_down(h, picked, dense, *down, qdtype, group, torch.bfloat16)

            def blocked():
                route = moe_route(picked)
                h = moe_gate_up_blocked(x, *route, *gate_up, qdtype, group, "silu*up", bool(qdtype), top_k)
                return moe_down_blocked(h, picked, dense, *route, *down, qdtype, group, torch.bfloat16)

            a, b = per_row(), blocked()
            err = ((a.float() - b.float()).abs().max() / a.float().abs().max()).item()
            row = {"scheme": scheme, "batch": rows, "max_rel_diff": round(err, 5)}
            if not smoke:
                us_row, us_blocked = bench_graph([per_row]), bench_graph([blocked])
                row |= {"per_row_us": round(us_row, 1), "blocked_us": round(us_blocked, 1),
                        "speedup": round(us_row / us_blocked, 3)}
            out.append(row)
            print(row, file=sys.stderr)
    base = {"area": "moe-ops", "model": "mixtral-layer-1024h-8x2816-top2", "method": "blocked-vs-per-row",
            "device": machine(dev)}
    rows_out = [{**base, **r} for r in out]
    if smoke:
        assert all(r["max_rel_diff"] < 2 ** -6 for r in out), out  # bf16 steps apart at most
        return
    header = run_header(machine(dev))
    merge_rows(args.out, header, rows_out, key=ROW_KEY, append_command=True)


if __name__ == "__main__":
    main()
