"""lowbit's GPU kernels: Triton kernels registered as torch custom ops, each with a plain-torch reference.

A leaf package (torch + triton only): backends import it, it imports nothing of lowbit's but the reference
ops of ``lowbit.ir`` (``quant``, ``ops``) inside the ``*_ref`` functions. Every op is a ``torch.library.triton_op``,
so ``torch.compile`` traces through it (no graph break) and CUDA graphs capture its launches, but
``rotary_write_kv``, ``write_kv`` and ``rotary_decode_sdpa`` (they write two graph inputs) and the ``*_pdl`` ops
(their launches carry the programmatic-dependent-launch attribute): opaque ``custom_op``s (see their docstrings).

- ``torch.ops.lowbit.weight_only_linear``: W4A16 / W8A16 (and int3/int2 in 4-bit storage) on the stored layout or
  the int32 decode layout (``weight_only.pack_words``, made once at lowering; N-major words by default): GEMVs
  for M <= 16, dequantize + cuBLAS or a tiled GEMM above (``weight_only.py``); ``weight_only_linear_add_norm``:
  the same + a residual add, leaving the next RMSNorm's halves (a decode step's block glue in the split-K reduce).
- ``torch.ops.lowbit.float_linear`` / ``float_linear_add_norm``: a float (bf16/fp16) linear at one row as a GEMV
  that ends in the same split-K reduce, so a float decode step's norms, residual adds and gated activation fuse
  as the weight-only ones do, and its launches take PDL (``float_gemv.py``).
- ``torch.ops.lowbit.moe_gate_up`` / ``moe_down``: a routed MoE layer's experts for a CUDA-graph decode step, the
  router's picks read on the device (no ``nonzero``): every picked (token, expert)'s gated up projection, then the
  down projections scaled by the router weights and summed in expert order (``moe_gemv.py``);
  ``moe_route`` / ``moe_gate_up_blocked`` / ``moe_down_blocked``: the same for many rows, one program per (expert,
  block of its rows): each expert's weight tile read once for its rows, on the tensor cores (``moe_blocked.py``).
- ``torch.ops.lowbit.quantize_activation``: dynamic per-token / per-group int8 or fp8 quantization in one pass
  (``act_quant.py``).
- ``torch.ops.lowbit.hadamard`` / ``hadamard_quantize``: the online Hadamard rotation (the IR's ``hadamard``)
  as two tensor-core products (Kronecker factor, then a Sylvester block), alone or fused with the per-token
  int8 / int4 / fp8 quantize that follows it, and ``hadamard_a8_linear`` (that quantize feeding the A8 GEMM:
  the triton backend's form of ``hadamard -> qlinear`` with per-token int8/fp8 activations) (``hadamard.py``).
- ``torch.ops.lowbit.a8_linear``: W8A8, W4A8 (int8 tensor-core dot) and FP8 e4m3 (rowwise or 64-blocked scales)
  with the activation quantization fused into the op (``a8_linear.py``); ``a8_linear_q`` takes codes + scales
  already quantized by ``torch.ops.lowbit.rms_norm_quant`` (RMSNorm + per-token quantization, ``norm_quant.py``).
  Up to 16 rows both run ``a8_gemv.py``: one launch that quantizes its rows in registers where K <= 2048 (no
  separate quantize). ``a8_linear_add_norm``: the residual add and the next RMSNorm's first half in the GEMV's
  store, which the next ``a8_linear`` norms and quantizes in its own (``norm_sumsq``). ``a8_linear_pdl``,
  ``a8_linear_q_pdl``, ``a8_linear_add_norm_pdl`` and ``rms_norm_quant_pdl``: the same, their launches with PDL
  (a W8A8 / FP8 decode step's one-row calls, the triton backend's ``pdl``).
- Epilogues: ``weight_only_linear``, ``a8_linear`` and ``a8_linear_q`` take ``epilogue`` — an activation (``silu``,
  ``gelu``, ``gelu_tanh``) applied to their output, or ``<act>*up`` for a merged gate/up weight with interleaved
  rows, returning ``act(gate) * up`` (``_common.parse_epilogue``; reference ``_common.epilogue_ref``): computed in
  the weight-only GEMVs' split-K reduce and in the A8 GEMM's store.
- ``torch.ops.lowbit.row_argmax`` and ``write_cache_rows``: a decode step's greedy argmax and float KV-cache row
  write, one launch each where aten took a copy + a single-block reduction and a generic scatter; and
  ``torch.ops.lowbit.decode_sdpa``, the step's attention over a float cache (flash-decoding) at small batches,
  and ``torch.ops.lowbit.rotary_write_kv``: the rotary of a step's q and k with the write of its keys and values
  into the float cache, one launch; ``torch.ops.lowbit.write_kv``: the same kernel with no rotary, a rotary-free
  layer's key and value writes in one launch (``decode_step.py``).
- ``write_packed_kv``: a decode step's write into the packed int8/int4/int2 KV cache (value row quantized per
  token, the key block re-quantized per channel from the float ring, the ring and sink slots), with the layer's
  rotary of q and k and the attention's float candidates, in one launch where ``cache_update`` ran ~74 aten ops and
  ``float_candidates`` ~25; a plain function that
  ``decode_attention.cache_attention_decode`` calls (``packed_kv_write.py``).

Kernels run on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1`` (the tests).
"""

from lowbit.kernels.a8_linear import a8_gemm, a8_linear, a8_linear_add_norm, a8_linear_q, a8_linear_ref
from lowbit.kernels.act_quant import quantize_activation, quantize_activation_ref
from lowbit.kernels.float_gemv import float_linear, float_linear_add_norm, float_linear_ref
from lowbit.kernels.decode_step import row_argmax, row_argmax_ref, write_cache_rows, write_cache_rows_ref
from lowbit.kernels.hadamard import (
           hadamard_quantize,
           hadamard_quantize_ref,
           hadamard_ref,
           online_hadamard,
)
from lowbit.kernels.moe_blocked import (
           moe_down_blocked,
           moe_down_blocked_ref,
           moe_gate_up_blocked,
           moe_gate_up_blocked_ref,
           moe_route,
           moe_route_ref,
)
from lowbit.kernels.moe_gemv import moe_down, moe_down_ref, moe_gate_up, moe_gate_up_ref
from lowbit.kernels.norm_quant import rms_norm_quant, rms_norm_quant_ref
from lowbit.kernels.weight_only import (
           dequantize_weight,
           weight_only_linear,
           weight_only_linear_add_norm,
           weight_only_linear_ref,
)

__all__ = [
           "a8_gemm",
           "a8_linear",
           "a8_linear_add_norm",
           "a8_linear_q",
           "a8_linear_ref",
           "dequantize_weight",
           "float_linear",
           "float_linear_add_norm",
           "float_linear_ref",
           "hadamard_quantize",
           "hadamard_quantize_ref",
           "hadamard_ref",
           "moe_down",
           "moe_down_blocked",
           "moe_down_blocked_ref",
           "moe_down_ref",
           "moe_gate_up",
           "moe_gate_up_blocked",
           "moe_gate_up_blocked_ref",
           "moe_gate_up_ref",
           "moe_route",
           "moe_route_ref",
           "online_hadamard",
           "quantize_activation",
           "quantize_activation_ref",
           "rms_norm_quant",
           "rms_norm_quant_ref",
           "row_argmax",
           "row_argmax_ref",
           "weight_only_linear",
           "weight_only_linear_add_norm",
           "weight_only_linear_ref",
           "write_cache_rows",
           "write_cache_rows_ref",
]
