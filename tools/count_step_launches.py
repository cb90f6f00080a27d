"""Kernel launches of one decode step per scheme, counted on the CPU under Triton's interpreter.

    TRITON_INTERPRET=1 python tools/count_step_launches.py [--schemes float,w8a8,fp8,w4a16-g64+kv4] [--layers 2]
        [--nodes] [--prefill N] [--batch B] [--a8-in-gemv] [--merge-in-split] [--k-major-max-k K]

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

Counts at the default 2 blocks (session 52): float 15, w8a8 21, fp8 21, w4a16-g64 15 (21 before ``_gemv_t`` folded
its split-K reduce in: ``FOLD``), w4a16-g64+kv4 17. A float-cache block's attention is two launches, ``_sdpa_split``
(the rotary and the cache write inside) and ``_sdpa_merge``; a packed-cache block's three, ``_write_packed_kv``,
``_split_kernel_v3`` and ``_reduce_kernel`` (no ATen op between them: ``cache_attention_decode``'s bounds of the
quantized tokens and its output cast were 7 a block, until the write kernel wrote the bounds and the merge the
step's dtype). ``--merge-in-split`` (the backend's ``merge_in_split``) has each split kernel's last program per
head group merge: one launch a block fewer (float 13, w4a16-g64+kv4 15), slower on the H100 (session 52: the
option's docstring). A W8A8 / FP8 block is 10: two
``_rms_norm_quant_kernel``, an ``_act_quant_kernel`` ahead of o_proj and down_proj each, four ``_a8_gemv_kernel`` on
codes and attention's two. ``--a8-in-gemv`` counts the form with the rows quantized and normed in the GEMVs
(``A8_GEMV_QUANTIZE_MAX_K`` 2048, ``_fuse_norm_quant_a8``): 14, 6 a block, which decoded 7-16% slower than the
9-launch block of then on an H100 (session 50: fewer launches, each with a longer prologue).

``--batch B``: a decode step of B sequences, whose linears take the multi-row paths (no one-row GEMV): at 2
blocks and batch 16 (session 58) float 10 Triton launches + 13 ATen ops inside lowbit ops (4 + 57 before the
prefill-size norm kernels, ``add_norm_parts`` / ``norm_from_parts``), W4A16 g64 18 + 1 (15 + 16); float 12 + 9
since session 59's ``apply_epilogue`` (a gated MLP's SiLU and product, two ATen kernels, one launch). Views
(``tensor_split``, ``unflatten``, ``unbind`` since session 59) count as nothing.

``--prefill N`` counts the step of an N-token prompt instead (N > 16: the A8 linears take the GEMM), and each
row also lists the ATen compute ops a lowbit op's body runs besides its launches (``a8_linear``'s torch ops at
prefill sizes: each a kernel on the GPU too). Prefill of 32, 2 blocks, w8a8 / fp8 / fp8-block64 alike (Triton
launches + ATen ops inside ops, plus 13 graph torch ops): 19 + 6, with ``--a8-in-gemv`` 22 + 3 (session 50; 19 + 39
before its prefill halves became ``add_norm_parts`` and the normed ``quantize_activation``); 19 + 2 since session
59 (``a8_gemm`` adds a block's residual in its store: the 4 ``add`` kernels gone, SDPA's 2 left). Prefill of 64:
float 9 + 14 -> 11 + 10, W4A16 g64 17 + 14 -> 19 + 10 (session 59: ``apply_epilogue``).
"""

from __future__ import annotations

import argparse
import importlib
import collections
import contextlib
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_generate import SMOLLM2_QUANTIZED  # noqa: E402

PIPELINES = {"float": None, **{k: SMOLLM2_QUANTIZED[k] for k in ("w8a8", "fp8", "w4a16-g64", "w4a16-g64+kv4")},
             "fp8-block64": "quantize(w=fp8e4m3,group=64,a=fp8e4m3,a_group=64)"}
"""The SmolLM2 decode benchmark's schemes (``tools/bench_generate.py``'s ``SMOLLM2_QUANTIZED``; ``+kv4``: the
packed int4 KV cache, issue 18's 1.572 ms step against 1.043 with the bf16 cache) and the fp8 recipe's block
form."""

_VIEWS = {"getitem", "sym_size", "reshape", "transpose", "unsqueeze", "expand", "slice", "split_with_sizes", "view",
          "_assert_scalar", "sym_constrain_range_for_size", "permute", "select", "tensor_split", "unflatten", "unbind"}
"""Op names that launch nothing (views, shape reads)."""
_NO_KERNEL = _VIEWS | {"empty", "new_empty", "empty_like", "empty_strided", "set_", "alias", "detach", "lift_fresh",
                       "broadcast_to", "zeros_like"}
"""ATen ops inside a lowbit op's body that launch nothing on the GPU (views, allocations; ``zeros_like`` is the
kernels' spare-operand placeholder)."""


def _inner_aten_recorder(launched: list[str], inside: list[str], whole: bool = False):
    """A dispatch mode appending to ``inside`` each ATen compute op a lowbit op's Python body runs outside its
    Triton launches (the interpreter's own copies during a launch are not the op's): the torch ops a step graph's
    node hides, e.g. ``a8_linear``'s norm at prefill sizes (each a kernel of its own on the GPU). ``whole``: the
    node is lowbit Python itself (the packed cache's ``_cache_attention``, no custom op), so every op it runs."""
    from torch._library.custom_ops import OPDEFS
    from torch.utils._python_dispatch import TorchDispatchMode

    class InnerAten(TorchDispatchMode):
        depth = int(whole)

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func._schema.name
            if name in OPDEFS:  # the body, with this mode still on (a custom op hides it from the mode)
                self.depth += 1
                try:
                    with self:
                        return OPDEFS[name]._init_fn(*args, **(kwargs or {}))
                finally:
                    self.depth -= 1
            if self.depth and launched[-1:] != ["<running>"] and name.split("::")[-1] not in _NO_KERNEL:
                inside.append(name.split("::")[-1])
            return func(*args, **(kwargs or {}))

    return InnerAten()


def count(scheme: str, layers: int, prefill: int = 0, a8_in_gemv: bool | None = None,
          merge_in_split: bool = False, k_major_max_k: int | None = None,
          batch: int = 1) -> tuple[list[tuple[str, str, list[str], list[str]]], int]:
    """(node name, target, its Triton launches, the ATen compute ops its op's body runs besides them) for each
    compute node of one decode step (``prefill`` 0) or of a
    ``prefill``-token prompt's step, and the block count. ``a8_in_gemv`` True: ``A8_GEMV_QUANTIZE_MAX_K`` at 2048
    (default 0), so the A8 GEMVs quantize their rows and the backend splits each A8 block's RMSNorm + quantize into
    them (``_fuse_norm_quant_a8``), the form session 50 measured slower on an H100; False: at 0; None: as it is.
    ``merge_in_split``: the triton backend's option (a decode attention's split kernel merges its own chunks).
    ``k_major_max_k``: ``weight_only.K_MAJOR_MAX_K`` while the model is lowered, from K = 0 (``K_MAJOR_MIN_K``;
    None: both as they are, so this model's narrow K stays N-major). ``batch``: sequences in the decode step (the
    one-row GEMVs and their fusions take one; more run the ops' multi-row paths)."""
    import torch
    import triton.runtime.interpreter as interp
    from transformers import LlamaConfig, LlamaForCausalLM

    from lowbit.api import compile_model
    from lowbit.backends.triton_backend import _CACHE_ATTENTION
    from lowbit.generate import GenerationSpec
    from lowbit.kernels.decode_step import split_counters

    launched: list[str] = []
    run = interp.InterpretedFunction.run

    def recording(self, *args, **kwargs):
        launched.append("<running>")
        try:
            return run(self, *args, **kwargs)
        finally:
            launched[-1] = self.fn.__name__

    interp.InterpretedFunction.run = recording
    gemv_module = importlib.import_module("lowbit.kernels.a8_gemv")  # a8_linear and the backend read it there
    old_limit = gemv_module.A8_GEMV_QUANTIZE_MAX_K
    gemv_module.A8_GEMV_QUANTIZE_MAX_K = old_limit if a8_in_gemv is None else 2048 if a8_in_gemv else 0
    wo = importlib.import_module("lowbit.kernels.weight_only")  # pack_words reads K_MAJOR_MAX_K at lowering
    old_k_major = wo.K_MAJOR_MAX_K, wo.K_MAJOR_MIN_K
    if k_major_max_k is not None:  # this model's K (192, 512) is under K_MAJOR_MIN_K: the rule from K = 0 up
        wo.K_MAJOR_MAX_K, wo.K_MAJOR_MIN_K = k_major_max_k, 0
    try:
        torch.manual_seed(0)
        cfg = LlamaConfig(hidden_size=192, intermediate_size=512, num_attention_heads=3, num_key_value_heads=1,
                          head_dim=64, num_hidden_layers=layers, vocab_size=1000, max_position_embeddings=256)
        model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
        spec = GenerationSpec(max_length=max(16, prefill + 1), max_batch=batch)
        options = {} if PIPELINES[scheme] is None else {"pipeline": PIPELINES[scheme]}
        compiled = compile_model(model, backend="triton",
                                 backend_options={"compile": False, "merge_in_split": merge_in_split},
                                 generation=spec, device="cpu", **options)
        gm = compiled.runner.gm
        rows: list[tuple[str, str, list[str], list[str]]] = []
        inside: list[str] = []

        class Recorder(torch.fx.Interpreter):
            def run_node(self, n):
                before = len(launched)
                inside.clear()
                record = (_inner_aten_recorder(launched, inside, n.target is _CACHE_ATTENTION)
                          if n.op == "call_function" else contextlib.nullcontext())
                with record:
                    out = super().run_node(n)
                if n.op == "call_function":
                    rows.append((n.name, getattr(n.target, "__name__", str(n.target)), launched[before:],
                                 list(inside)))
                return out

        tokens, positions = torch.full((batch, 1), 9), torch.full((batch, 1), 4)
        if prefill:
            tokens, positions = torch.arange(prefill)[None] * 7 % cfg.vocab_size, torch.arange(prefill)[None]
        cache = compiled._step_generator()._cache(tokens.shape[0], spec.max_length)  # float, or the packed caches'
        # operands
        # the merge counters are made (zeroed) once per device, by a step before any CUDA graph capture: not this
        # step's work (split_counters)
        split_counters(torch.device("cpu"))
        with torch.no_grad():
            Recorder(gm).run(tokens, positions, *cache)
    finally:
        interp.InterpretedFunction.run = run
        gemv_module.A8_GEMV_QUANTIZE_MAX_K = old_limit
        wo.K_MAJOR_MAX_K, wo.K_MAJOR_MIN_K = old_k_major
    return [r for r in rows if r[2] or r[3] or r[1].split(".")[0] not in _VIEWS], layers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--schemes", default="float,w8a8,fp8,w4a16-g64,w4a16-g64+kv4", help=f"of {', '.join(PIPELINES)}")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--prefill", type=int, default=0, metavar="N",
                    help="count the step of an N-token prompt (batch 1) instead of a decode step")
    ap.add_argument("--a8-in-gemv", action="store_true",
                    help="A8_GEMV_QUANTIZE_MAX_K 2048: the A8 GEMVs quantize (and norm) their rows themselves")
    ap.add_argument("--nodes", action="store_true", help="print every node's launches")
    ap.add_argument("--merge-in-split", action="store_true",
                    help="the decode attention's split kernel merges its chunks (no _reduce_kernel / _sdpa_merge)")
    ap.add_argument("--k-major-max-k", type=int, default=None, metavar="K",
                    help="weight_only.K_MAJOR_MAX_K: int4 words of K <= it K-major (_gemv_words, FOLD_K), "
                    "K_MAJOR_MIN_K 0")
    ap.add_argument("--batch", type=int, default=1, metavar="B",
                    help="sequences in the decode step (with --prefill: ignored, the prompt is one sequence)")
    args = ap.parse_args()
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("count_step_launches: run it with TRITON_INTERPRET=1 (it counts the interpreter's launches)")
    for scheme in args.schemes.split(","):
        rows, layers = count(scheme, args.layers, args.prefill, args.a8_in_gemv or None,
                             merge_in_split=args.merge_in_split, k_major_max_k=args.k_major_max_k,
                             batch=1 if args.prefill else args.batch)
        kernels = collections.Counter(k for _, _, ks, _ in rows for k in ks)
        torch_ops = [target for _, target, ks, inner in rows if not ks and not inner]
        inner_ops = collections.Counter(op for *_, inner in rows for op in inner)
        total = sum(kernels.values())
        step = f"prefill of {args.prefill}" if args.prefill else f"decode step, batch {args.batch}"
        print(f"{scheme} ({step}): {total} Triton launches + {len(torch_ops)} torch ops + "
              f"{sum(inner_ops.values())} ATen ops inside lowbit ops per step of {layers} blocks {dict(kernels)}; "
              f"torch ops: {torch_ops}; inside ops: {dict(inner_ops)}")
        if args.nodes:
            for name, target, ks, inner in rows:
                print(f"  {name:36s} {target:40s} {' '.join(ks)} {' '.join(inner)}")


if __name__ == "__main__":
    main()
