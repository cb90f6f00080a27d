"""How close a candidate sentence embedder stays to a reference one, on real sentences.

Used to score a quantized MiniLM: both models embed the same WikiText-2 sentences and the
cosine between each pair of embeddings is reported (mean and worst case).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from lowbit.data import read_text

if TYPE_CHECKING:  # transformers costs ~1 s to import; only the type is needed here
    from transformers import PreTrainedTokenizerBase

__all__ = ["SimilarityResult", "load_sentences", "embedding_similarity"]

EmbedFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# WikiText marks number-internal separators as " @-@ ", " @,@ ", " @.@ "; undo them so the
# sentences read as written.
_WIKITEXT_MARK = re.compile(r" @(.)@ ")
# WikiText tokenization puts spaces around sentence-final punctuation: "... actor . He had ..."
_SENTENCE_END = re.compile(r"(?<= [.!?]) (?=\S)")
_MIN_WORDS, _MAX_WORDS = 6, 60


@dataclass(frozen=True)
class SimilarityResult:
    mean_cos: float
    min_cos: float
    n: int


def usable_sentences(text: str | os.PathLike[str] = "wikitext2-test") -> list[str]:
    """Every sentence of 6-60 words in ``text``, in order, that ``load_sentences`` draws from (what a caller asking
    for more than there are is told)."""
    sentences: list[str] = []
    for line in read_text(text).splitlines():
        line = line.strip()
        if not line or line.startswith("="):
            continue
        for sentence in _SENTENCE_END.split(_WIKITEXT_MARK.sub(r"\1", line)):
            if _MIN_WORDS <= len(sentence.split()) <= _MAX_WORDS:
                sentences.append(sentence)
    return sentences


def load_sentences(n: int = 64, text: str | os.PathLike[str] = "wikitext2-test") -> list[str]:
    """`n` sentences of 6-60 words from `text`, spread evenly over it; the same on every call.

    Heading lines (" = Title = ") and empty lines are skipped.
    """
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    sentences = usable_sentences(text)
    if len(sentences) < n:
        raise ValueError(f"text {str(text)!r} has {len(sentences)} usable sentences, fewer than n={n}")
    step = len(sentences) / n
    return [sentences[int(i * step)] for i in range(n)]


def embedding_similarity(
    reference: EmbedFn,
    candidate: EmbedFn,
    tokenizer: PreTrainedTokenizerBase,
    sentences: Sequence[str],
    batch_size: int = 16,
    max_length: int = 256,
    device: torch.device | str = "cpu",
) -> SimilarityResult:
    """Cosine similarity between the two embedders' outputs, sentence by sentence.

    Both are called as `(input_ids, attention_mask) -> embeddings [B, H]` on the same padded
    batches; inputs are truncated to `max_length` tokens (all-MiniLM-L6-v2's 256 by default).
    """
    if not sentences:
        raise ValueError("sentences is empty")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    longest = getattr(tokenizer, "model_max_length", None)
    if isinstance(longest, int) and longest < 10**6 and max_length > longest:
        # a longer sentence then reached the model past its positions: torch's 'expanded size of the tensor' error
        raise ValueError(f"max_length={max_length} is longer than the tokenizer's model_max_length={longest} (the "
                         f"longest input the model takes: its positions, or a sentence-transformers model's "
                         f"max_seq_length): give max_length={longest} or less")
    cosines: list[torch.Tensor] = []
    with torch.inference_mode():
        for start in range(0, len(sentences), batch_size):
            batch = tokenizer(
                list(sentences[start : start + batch_size]),
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            )
            ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
            ref, cand = reference(ids, mask), candidate(ids, mask)
            if ref.shape != cand.shape or ref.dim() != 2:
                raise ValueError(
                    f"embeddings must both be [B, H]; reference gave {tuple(ref.shape)}, candidate {tuple(cand.shape)}"
                )
            cosines.append(F.cosine_similarity(ref.double(), cand.double(), dim=1).cpu())
    cos = torch.cat(cosines)
    return SimilarityResult(mean_cos=cos.mean().item(), min_cos=cos.min().item(), n=cos.numel())
