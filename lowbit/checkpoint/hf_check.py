"""Run a saved compressed-tensors/GPTQ checkpoint through transformers, to show (and test) that it loads there."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch

from lowbit.remote_code import from_pretrained


def transformers_logits(directory: str | Path, ids: torch.Tensor) -> torch.Tensor:
    """Logits of ``AutoModelForCausalLM.from_pretrained(directory)`` on ``ids`` (CPU).

    Asymmetric pack-quantized checkpoints go through transformers' dequantize-at-load route: its default route
    does not load any asymmetric pack-quantized checkpoint with compressed-tensors 0.20 (vllm-project/
    llm-compressor#1618)."""
    from transformers import AutoModelForCausalLM

    directory = Path(directory)
    qcfg = json.loads((directory / "config.json").read_text()).get("quantization_config", {})
    kwargs: dict[str, Any] = {}
    groups = qcfg.get("config_groups", {}).values()
    if qcfg.get("quant_method") == "compressed-tensors" and any(
            not (g.get("weights") or {}).get("symmetric", True) for g in groups):
        from transformers import CompressedTensorsConfig

        kwargs["quantization_config"] = CompressedTensorsConfig(dequantize=True)
    with warnings.catch_warnings():
        # passing that config is the route, not a mistake: transformers' "You passed `quantization_config` ... The
        # rest will be ignored" warning was printed in the middle of the main job's (python -m lowbit) output
        warnings.filterwarnings("ignore", message="You passed `quantization_config`", category=UserWarning)
        model = from_pretrained(AutoModelForCausalLM, str(directory), **kwargs).eval()
    with torch.no_grad():
        return model(ids).logits
