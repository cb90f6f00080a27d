"""Perplexity of a causal LM on a text, by the standard WikiText-2 protocol.

The text is read whole in text mode (`lowbit.data.read_text`: CRLF becomes LF, nothing stripped),
tokenized once without special tokens, and cut into non-overlapping windows of `seq_len` tokens;
the last partial window is dropped. In each window tokens 1..L-1 are predicted from the tokens
before them in the same window. Perplexity is exp(sum of cross-entropy / number of predictions).
For WikiText-2 test and the SmolLM2 tokenizer: 301,948 tokens, 589 windows at 512, 147 at 2048.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from lowbit.data import refuse_json_text
from lowbit.data.tokens import token_ids

if TYPE_CHECKING:  # transformers costs ~1 s to import; only the type is needed here
    from transformers import PreTrainedTokenizerBase

__all__ = ["PerplexityResult", "EVALS", "nll_sum", "perplexity", "ppl_of", "run_eval", "token_ids", "windows"]

LogitsFn = Callable[[torch.Tensor], torch.Tensor]

# Named evaluations, as used in bench/results rows (`eval` key). All score WikiText-2 raw test.
EVALS: dict[str, dict[str, int]] = {
    "wt2-512x40": dict(seq_len=512, max_windows=40),
    "wt2-2048-full": dict(seq_len=2048),
}
EVAL_TEXT = "wikitext2-test"


@dataclass(frozen=True)
class PerplexityResult:
    ppl: float
    nll_sum: float
    n_predicted: int
    n_windows: int
    seq_len: int
    seconds: float
    seconds_per_window: float


def windows(ids: torch.Tensor, seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping windows `[n, seq_len]` of a 1-D token tensor; the partial tail is dropped."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2 (one context token, one predicted), got {seq_len}")
    n = ids.numel() // seq_len
    if max_windows is not None:
        if max_windows < 1:
            raise ValueError(f"max_windows must be at least 1 or None, got {max_windows}")
        n = min(n, max_windows)
    if n == 0:
        raise ValueError(f"text has {ids.numel()} tokens, fewer than one window of seq_len={seq_len}")
    return ids[: n * seq_len].view(n, seq_len)


def ppl_of(mean_nll: float) -> float:
    """``exp(mean_nll)``, or inf past the float range: a model whose logits blew up (mean loss > 709 nats) is
    infinitely bad, not an OverflowError traceback."""
    return math.inf if mean_nll > math.log(sys.float_info.max) else math.exp(mean_nll)


def nll_sum(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Summed next-token cross-entropy of ``logits [..., V]`` against ``targets [...]``: each token's loss in float32
    (lower-precision logits upcast first), the sum in float64. A float32 sum drifts by ~1e-7 of the total per
    10^4 tokens, so every perplexity lowbit reports (``perplexity``, ``lowbit debug``) sums the same way."""
    logits = logits.float()
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    return float(nll.double().sum().item())


def _logits_of(model: LogitsFn, batch: torch.Tensor) -> torch.Tensor:
    graph = getattr(model, "graph", None)
    if getattr(graph, "meta", {}).get("generation") is not None and callable(getattr(model, "prefill_logits", None)):
        # a compiled generation step takes (ids, positions, cache): called with the ids alone it was a TypeError
        out = model.prefill_logits(batch)  # type: ignore[attr-defined]
    else:
        out = model(batch)
    logits = getattr(out, "logits", out)  # a bare HF model returns a ModelOutput
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3 or logits.shape[:2] != batch.shape:
        got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise TypeError(f"model must map input_ids {tuple(batch.shape)} to logits [B, L, V]; it returned {got}")
    return logits


def perplexity(
    model: LogitsFn,
    text: str | os.PathLike[str],
    seq_len: int = 512,
    max_windows: int | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    progress: bool = True,
    batch_size: int = 1,
    device: torch.device | str = "cpu",
) -> PerplexityResult:
    """Perplexity of `model` (input_ids [B, L] -> logits [B, L, V]) on `text` (a name or a path).

    A `CompiledModel` of a generation step (`GenerationSpec(logits="all")`) is scored through its step graph: each
    batch is one prefill over a fresh KV cache (its quantized cache included).

    `tokenizer` defaults to SmolLM2's. Cross-entropy is taken in float32 (logits of lower
    precision are upcast first) and summed in float64, so the result does not depend on
    the batch size beyond float32 rounding of the logits themselves.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    refuse_json_text(text, "evaluation text", "evaluation texts", "score perplexity on")  # as calibration does
    if tokenizer is None:
        from lowbit.models import load_smollm2_tokenizer

        tokenizer = load_smollm2_tokenizer()
    chunks = windows(token_ids(text, tokenizer), seq_len, max_windows)
    n_windows = chunks.shape[0]

    total = 0.0
    n_predicted = 0
    start = time.perf_counter()
    with torch.inference_mode(), tqdm(total=n_windows, disable=not progress, unit="win", desc="perplexity") as bar:
        for batch in chunks.split(batch_size):
            batch = batch.to(device)
            targets = batch[:, 1:]
            total += nll_sum(_logits_of(model, batch)[:, :-1], targets)
            n_predicted += targets.numel()
            bar.update(batch.shape[0])
            bar.set_postfix(ppl=f"{ppl_of(total / n_predicted):.3f}")
    seconds = time.perf_counter() - start
    return PerplexityResult(
        ppl=ppl_of(total / n_predicted),
        nll_sum=total,
        n_predicted=n_predicted,
        n_windows=n_windows,
        seq_len=seq_len,
        seconds=seconds,
        seconds_per_window=seconds / n_windows,
    )


def run_eval(
    name: str,
    model: LogitsFn,
    tokenizer: PreTrainedTokenizerBase | None = None,
    progress: bool = True,
    batch_size: int = 1,
    device: torch.device | str = "cpu",
) -> PerplexityResult:
    """Run a named evaluation from `EVALS` on WikiText-2 test."""
    if name not in EVALS:
        raise ValueError(f"unknown evaluation {name!r}; known: {sorted(EVALS)}")
    return perplexity(
        model, EVAL_TEXT, tokenizer=tokenizer, progress=progress, batch_size=batch_size, device=device, **EVALS[name]
    )
