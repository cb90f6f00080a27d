"""The quantized KV cache the decode-attention benches time (bench_attention, bench_generate), built one way: KIVI's
layout, whose sink token and recent window stay float, and the small slice every kernel config is checked on before
it is timed. Imported by the scripts beside it."""

from __future__ import annotations

from typing import Any

import torch


def kivi_cache_operands(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, codes: tuple[torch.Tensor, ...], bits: int,
                        k_block: int, window: int) -> tuple[tuple, dict[str, Any], tuple, dict[str, Any]]:
    """``decode_attention``'s operands over a cache of ``k``/``v`` [batch, kv heads, context, head dim]: ``codes``
    are (key codes, scales, zeros, value codes, scales, zeros) as ``quantize_keys``/``quantize_values`` made them
    (the scales in the dtype to time); the sink token and the last ``window`` stay float, as the ``kv`` recipes
    keep them. Returns (args, kw) over the whole cache and (sub, skw) over its first 2 sequences and 4K tokens,
    where a config's output is compared with ``decode_attention_reference`` first."""
    kc, ks, kz, vc, vs, vz = codes
    b, s, dev = k.shape[0], k.shape[2], k.device
    kf = torch.cat([k[:, :, :1], k[:, :, -window:]], 2)
    vf = torch.cat([v[:, :, :1], v[:, :, -window:]], 2)
    fvalid = torch.ones(b, window + 1, dtype=torch.bool, device=dev)
    lo = torch.ones(b, dtype=torch.int32, device=dev)
    hi = torch.full((b,), s - window, dtype=torch.int32, device=dev)
    kw = dict(bits=bits, lo=lo, hi=hi, k_float=kf, v_float=vf, float_valid=fvalid)
    sub_n, sb = min(4096, s), min(2, b)
    nb = sub_n // k_block
    sub = (q[:sb], kc[:sb, :, :sub_n], ks[:sb, :, :nb], kz[:sb, :, :nb], vc[:sb, :, :sub_n], vs[:sb, :, :sub_n],
           vz[:sb, :, :sub_n])
    skw = dict(bits=bits, lo=lo[:sb], hi=torch.full((sb,), sub_n - window, device=dev), k_float=kf[:sb],
               v_float=vf[:sb], float_valid=fvalid[:sb])
    return (q, *codes), kw, sub, skw
