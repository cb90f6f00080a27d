"""Calibration data: N sequences of L tokens from any text file, the same ones every run.

The text is read whole (``lowbit.data.read_text``: a shipped text name or any path), tokenized once without
special tokens (cached, ``lowbit.data.tokens.token_ids``) and cut into non-overlapping windows of L
tokens; N of them are taken evenly spaced through the text, so a calibration set covers the whole file
rather than its first articles, and depends on nothing but the text, the tokenizer, N and L. A tokenizer with
both a CLS and a SEP token (BERT-style encoders such as MiniLM) gets each window as ``[CLS] ... [SEP]`` of L
tokens in all, the form every input of such a model has (position 0 is always CLS).
"""

from __future__ import annotations

import os

import torch
from transformers import PreTrainedTokenizerBase

from lowbit.data.model_files import load_tokenizer
from lowbit.data.tokens import token_ids
from lowbit.ir.graph import Graph

__all__ = ["calibration_ids", "load_tokenizer", "graph_tokenizer", "DEFAULT_CALIBRATION_TEXT"]

DEFAULT_CALIBRATION_TEXT = "wikitext2-valid-calib"
"""Shipped with lowbit (WikiText-2 validation, first ~250 KB: ~60k SmolLM2 tokens, 117 windows of 512).
For 128 × 512 tokens give a longer file of text (the whole WikiText-2 validation split, say)."""


def calibration_ids(text: str | os.PathLike[str], tokenizer: PreTrainedTokenizerBase, n: int, seq_len: int
                    ) -> torch.Tensor:
    """``[n, seq_len]`` int64 token ids from ``text``; errors say how much text the request needs."""
    if n < 1 or seq_len < 2:
        raise ValueError(f"calibration needs n >= 1 sequences of seq_len >= 2 tokens, got n={n}, seq_len={seq_len}")
    ids = token_ids(text, tokenizer)
    if ids.numel() == 0:
        raise ValueError(f"calibration text {str(text)!r} has no tokens (empty or whitespace only)")
    cls, sep = getattr(tokenizer, "cls_token_id", None), getattr(tokenizer, "sep_token_id", None)
    if cls is not None and sep is not None:
        if seq_len < 3:
            raise ValueError(f"calibration for a [CLS] ... [SEP] tokenizer needs seq_len >= 3, got {seq_len}")
        body = calibration_ids_plain(ids, text, n, seq_len - 2)
        return torch.cat([torch.full((n, 1), cls), body, torch.full((n, 1), sep)], dim=1)
    return calibration_ids_plain(ids, text, n, seq_len)


def calibration_ids_plain(ids: torch.Tensor, text: str | os.PathLike[str], n: int, seq_len: int) -> torch.Tensor:
    """``n`` windows of ``seq_len`` tokens of ``ids``, evenly spaced."""
    available = ids.numel() // seq_len
    if available < n:
        raise ValueError(
            f"calibration text {str(text)!r} has {ids.numel()} tokens: {available} non-overlapping windows of "
            f"{seq_len}, but n={n} were asked ({n * seq_len} tokens); use a longer text, fewer sequences or "
            "shorter ones")
    starts = (torch.arange(n) * available // n) * seq_len
    return torch.stack([ids[s:s + seq_len] for s in starts.tolist()])


def graph_tokenizer(graph: Graph, name: str | None) -> PreTrainedTokenizerBase:
    """The tokenizer a calibrating pass uses: ``name`` if given, else the one ``compile_model`` captured with the
    model (``graph.meta["tokenizer"]``: MiniLM's for MiniLM), else SmolLM2's."""
    if name is not None:
        return load_tokenizer(name)
    tok = graph.meta.get("tokenizer")
    return tok if tok is not None else load_tokenizer("smollm2")
