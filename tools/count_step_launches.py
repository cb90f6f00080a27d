"""Kernel launches of one decode step per scheme, counted on the CPU under Triton's interpreter.

    TRITON_INTERPRET=1 python tools/count_step_launches.py [--schemes float,w8a8,fp8,w4a16] [--layers 2] [--nodes]

Why: a decode step of a small model (SmolLM2-135M: 30 blocks, hidden 576) is bound by launches, ~2-4 µs each on
an H100 inside a CUDA graph, so the launches per block say most of what a scheme's step costs before any GPU
timing. This lowers a random bf16 Llama with SmolLM2's head layout (9 query / 3 kv heads of 64; hidden and MLP
smaller, which changes no launch) as a generation step graph on ``backend="triton"`` (device cpu, no
``torch.compile``), runs one decode step (batch 1, one token) through an FX interpreter, and prints each node's
Triton launches and the graph's torch compute ops between them (each an Inductor kernel on the GPU unless
Inductor fuses neighbours; views are left out). The interpreter takes the GPU's paths with two differences:
the float GEMV never splits K there (on the GPU SmolLM2's 576-wide rows add a split-K reduce launch to some
linears), and fp8 per token x per channel runs the Triton GEMM where the GPU takes ``torch._scaled_mm`` above 16
rows.

Counts at the default 2 blocks (session 50): float 13, w8a8 12, fp8 12, w4a16-g64 19. A W8A8 / FP8 block is 5,
float's count: four ``_a8_gemv_kernel`` (o_proj and down_proj quantizing their rows in the GEMV,
``A8_GEMV_QUANTIZE_MAX_K``, and writing the next RMSNorm's first half; q/k/v and gate/up norming and quantizing
it: ``_fuse_norm_quant_a8``) and attention, plus one ``_rms_norm_quant_kernel`` per step (the first block's norm,
of the embedding). Session 49 ended at 9 per block: two ``_rms_norm_quant_kernel`` and an ``_act_quant_kernel``
ahead of o_proj and down_proj each.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_generate import SMOLLM2_QUANTIZED  # noqa: E402

PIPELINES = {"float": None, **{k: SMOLLM2_QUANTIZED[k] for k in ("w8a8", "fp8", "w4a16-g64")},
             "fp8-block64": "quantize(w=fp8e4m3,group=64,a=fp8e4m3,a_group=64)"}
"""The SmolLM2 decode benchmark's schemes (``tools/bench_generate.py``'s ``SMOLLM2_QUANTIZED``) and the fp8
recipe's block form."""

_VIEWS = {"getitem", "sym_size", "reshape", "transpose", "unsqueeze", "expand", "slice", "split_with_sizes", "view",
          "_assert_scalar", "sym_constrain_range_for_size", "permute"}
"""Op names that launch nothing (views, shape reads)."""


def count(scheme: str, layers: int) -> tuple[list[tuple[str, str, list[str]]], int]:
    """(node name, target, its Triton launches) for each compute node of one decode step, and the block count."""
    import torch
    import triton.runtime.interpreter as interp
    from transformers import LlamaConfig, LlamaForCausalLM

    from lowbit.api import compile_model
    from lowbit.generate import GenerationSpec

    launched: list[str] = []
    run = interp.InterpretedFunction.run

    def recording(self, *args, **kwargs):
        launched.append(self.fn.__name__)
        return run(self, *args, **kwargs)

    interp.InterpretedFunction.run = recording
    try:
        torch.manual_seed(0)
        cfg = LlamaConfig(hidden_size=192, intermediate_size=512, num_attention_heads=3, num_key_value_heads=1,
                          head_dim=64, num_hidden_layers=layers, vocab_size=1000, max_position_embeddings=256)
        model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
        spec = GenerationSpec(max_length=16, max_batch=1)
        options = {} if PIPELINES[scheme] is None else {"pipeline": PIPELINES[scheme]}
        compiled = compile_model(model, backend="triton", backend_options={"compile": False}, generation=spec,
                                 device="cpu", **options)
        gm = compiled.runner.gm
        rows: list[tuple[str, str, list[str]]] = []

        class Recorder(torch.fx.Interpreter):
            def run_node(self, n):
                before = len(launched)
                out = super().run_node(n)
                if n.op == "call_function":
                    rows.append((n.name, getattr(n.target, "__name__", str(n.target)), launched[before:]))
                return out

        positions = torch.tensor([[4]])
        cache = [torch.zeros(1, cfg.num_key_value_heads, spec.max_length, 64, dtype=torch.bfloat16)
                 for _ in range(2 * layers)]
        with torch.no_grad():
            Recorder(gm).run(torch.tensor([[9]]), positions, *cache)
    finally:
        interp.InterpretedFunction.run = run
    return [r for r in rows if r[2] or r[1].split(".")[0] not in _VIEWS], layers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--schemes", default="float,w8a8,fp8,w4a16-g64", help=f"of {', '.join(PIPELINES)}")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--nodes", action="store_true", help="print every node's launches")
    args = ap.parse_args()
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("count_step_launches: run it with TRITON_INTERPRET=1 (it counts the interpreter's launches)")
    for scheme in args.schemes.split(","):
        rows, layers = count(scheme, args.layers)
        kernels = collections.Counter(k for _, _, ks in rows for k in ks)
        torch_ops = [target for _, target, ks in rows if not ks]
        total = sum(kernels.values())
        print(f"{scheme}: {total} Triton launches + {len(torch_ops)} torch ops per step of {layers} blocks "
              f"{dict(kernels)}; torch ops: {torch_ops}")
        if args.nodes:
            for name, target, ks in rows:
                print(f"  {name:36s} {target:40s} {' '.join(ks)}")


if __name__ == "__main__":
    main()
