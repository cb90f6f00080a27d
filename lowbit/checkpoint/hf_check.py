"""Run a saved compressed-tensors/GPTQ checkpoint through transformers, to show (and test) that it loads there."""

from __future__ import annotations

import contextlib
import json
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from lowbit.remote_code import from_pretrained


def linear_subclasses(directory: Path, ignore: list[str]) -> list[str]:
    """Modules of the checkpoint's model, outside ``ignore``, whose class subclasses ``nn.Linear`` (Falcon's
    ``FalconLinear``): transformers' default compressed-tensors route replaces their ``weight`` by the packed
    tensors, and the family's own ``_init_weights`` then fails on ``module.weight`` inside ``from_pretrained``."""
    from transformers import AutoConfig

    from lowbit.checkpoint.hf import skeleton

    model = skeleton(from_pretrained(AutoConfig, str(directory)), "causal-lm")
    return [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)
            and type(m) is not torch.nn.Linear and name not in ignore]


@contextlib.contextmanager
def _zero_points_unpacked_by_rows() -> Iterator[None]:
    """compressed-tensors' decompression (what transformers runs on an asymmetric pack-quantized checkpoint) with
    its zero points unpacked by ``unpack_zero_points``: its own ``unpack_from_int32(packed_dim=0)`` raises on a linear
    of 8 or fewer outputs at 4 bits with 2 or more groups (a GQA k_proj of one 8-wide kv head, a small head), so
    the check after ``python -m lowbit --save`` ended in that RuntimeError. Restored on exit."""
    from compressed_tensors.compressors.pack_quantized import base

    from lowbit.checkpoint.hf import unpack_zero_points

    original = base.unpack_from_int32

    def unpack(value: torch.Tensor, num_bits: int, shape: torch.Size, packed_dim: int = 1) -> torch.Tensor:
        if packed_dim == 0 and value.dim() == 2:
            return unpack_zero_points(value, num_bits, torch.Size(shape))
        return original(value, num_bits, shape, packed_dim)

    base.unpack_from_int32 = unpack
    try:
        yield
    finally:
        base.unpack_from_int32 = original


def transformers_logits(directory: str | Path, ids: torch.Tensor) -> torch.Tensor:
    """Logits of ``AutoModelForCausalLM.from_pretrained(directory)`` on ``ids`` (CPU).

    Two kinds of checkpoint go through transformers' dequantize-at-load route, where its default route fails with
    compressed-tensors 0.20: asymmetric pack-quantized ones (vllm-project/llm-compressor#1618), and any whose
    quantized linears are a family's ``nn.Linear`` subclass (Falcon: 'FalconLinear' object has no attribute
    'weight', raised while loading)."""
    from transformers import AutoModelForCausalLM

    directory = Path(directory)
    qcfg = json.loads((directory / "config.json").read_text()).get("quantization_config", {})
    kwargs: dict[str, Any] = {}
    groups = qcfg.get("config_groups", {}).values()
    if qcfg.get("quant_method") == "compressed-tensors" and (
            any(not (g.get("weights") or {}).get("symmetric", True) for g in groups)
            or linear_subclasses(directory, qcfg.get("ignore", []))):
        from transformers import CompressedTensorsConfig

        kwargs["quantization_config"] = CompressedTensorsConfig(dequantize=True)
    with warnings.catch_warnings():
        # passing that config is the route, not a mistake: transformers' "You passed `quantization_config` ... The
        # rest will be ignored" warning was printed in the middle of the main job's (python -m lowbit) output
        warnings.filterwarnings("ignore", message="You passed `quantization_config`", category=UserWarning)
        with _zero_points_unpacked_by_rows():
            model = from_pretrained(AutoModelForCausalLM, str(directory), **kwargs).eval()
    with torch.no_grad():
        return model(ids).logits
