"""Token ids of a text: tokenized once, cached in the user cache.

Evaluation (perplexity windows) and calibration (calibration windows) read the same ids, so this sits with
the texts, below both.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings

import torch
from transformers import PreTrainedTokenizerBase

from lowbit.cache import atomic_file, cache_dir
from lowbit.data import read_text

__all__ = ["token_ids", "tokenizer_fingerprint"]


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A hash that changes whenever the tokenizer would split text differently."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        # truncation/padding are call-time state a tokenizer call may change; they do not change the split
        spec = json.loads(backend.to_str())
        spec.pop("truncation", None)
        spec.pop("padding", None)
        described = json.dumps(spec, sort_keys=True)
    else:  # slow (Python) tokenizer: its vocabulary and class stand in for its definition
        described = f"{type(tokenizer).__qualname__}:{sorted(tokenizer.get_vocab().items())}"
    return hashlib.sha256(described.encode()).hexdigest()[:16]


def token_ids(text: str | os.PathLike[str], tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
    """All tokens of a text (name or path, see `lowbit.data.text_path`) as 1-D int64, no special tokens.

    Cached in the user cache keyed by the text's and the tokenizer's hashes: tokenizing
    WikiText-2 takes seconds and every evaluation needs the same ids.
    """
    content = read_text(text)
    key = f"{hashlib.sha256(content.encode()).hexdigest()[:16]}-{tokenizer_fingerprint(tokenizer)}"
    cached = cache_dir("tokens") / f"{key}.pt"
    if cached.is_file():
        try:
            ids = torch.load(cached, weights_only=True)
            if isinstance(ids, torch.Tensor) and ids.dtype == torch.int64 and ids.dim() == 1:
                return ids
            problem = f"holds {type(ids).__name__} {getattr(ids, 'dtype', '')}, not 1-D int64 ids"
        except Exception as exc:  # noqa: BLE001 - an unreadable entry is rebuilt whatever the reason
            problem = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''}"
        warnings.warn(f"lowbit cache entry {str(cached)!r} is corrupt ({problem}); rebuilding it", stacklevel=2)
    ids = torch.tensor(tokenizer(content, add_special_tokens=False)["input_ids"], dtype=torch.int64)
    with atomic_file(cached) as tmp:
        torch.save(ids, tmp)
    return ids
