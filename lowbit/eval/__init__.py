"""Accuracy measures: perplexity of causal LMs, embedding similarity of sentence encoders."""

from lowbit.eval.embedding import SimilarityResult, embedding_similarity, load_sentences
from lowbit.eval.perplexity import EVALS, PerplexityResult, perplexity, run_eval, token_ids, windows

__all__ = [
    "EVALS",
    "PerplexityResult",
    "SimilarityResult",
    "embedding_similarity",
    "load_sentences",
    "perplexity",
    "run_eval",
    "token_ids",
    "windows",
]
