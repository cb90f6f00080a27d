"""Token ids of a text: tokenized once, cached in the user cache.

Evaluation (perplexity windows) and calibration (calibration windows) read the same ids, so this sits with
the texts, below both.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from typing import TYPE_CHECKING

import torch
from tokenizers import Tokenizer

from lowbit.cache import atomic_file, cache_dir
from lowbit.data import read_text

if TYPE_CHECKING:  # transformers costs ~1 s to import; only the type is needed here
    from transformers import PreTrainedTokenizerBase

__all__ = ["token_ids", "tokenizer_fingerprint"]


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A hash that changes whenever the tokenizer would split text differently.

    A fast tokenizer hashes its backend's serialised definition (deterministic: the vocabulary is written in id
    order). Truncation and padding are call-time state a tokenizer call may leave set; they do not change the split,
    so when either is set the hash is taken of a copy without them. Hashing the string as written, not a re-sorted
    JSON of it, keeps this at ~0.04 s for SmolLM2's 1.5 MB definition (the JSON round trip took ~0.45 s, paid by
    every calibrating pass)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        if backend.truncation is None and backend.padding is None:
            described = backend.to_str()
        else:
            plain = Tokenizer.from_str(backend.to_str())
            plain.no_truncation()
            plain.no_padding()
            described = plain.to_str()
    else:  # slow (Python) tokenizer: its class, vocabulary and settings stand in for its definition (settings:
        # BertTokenizer's do_lower_case=False shared cached ids with the lower-casing one); paths are left out
        settings = {k: v for k, v in getattr(tokenizer, "init_kwargs", {}).items()
                    if not k.endswith("_file") and k not in ("name_or_path", "_name_or_path")}
        described = (f"{type(tokenizer).__qualname__}:{sorted(tokenizer.get_vocab().items())}:"
                     f"{json.dumps(settings, sort_keys=True, default=str)}")
    return hashlib.sha256(described.encode()).hexdigest()[:16]


def token_ids(text: str | os.PathLike[str], tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
    """All tokens of a text (name or path, see `lowbit.data.text_path`) as 1-D int64, no special tokens.

    Cached in the user cache keyed by the text's and the tokenizer's hashes: tokenizing
    WikiText-2 takes seconds and every evaluation needs the same ids.
    """
    content = read_text(text)
    if content.isspace():  # a byte-level BPE (SmolLM2's) makes tokens of whitespace: it was scored / calibrated on
        raise ValueError(f"text {str(text)!r} is whitespace only: give a file of text")
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
