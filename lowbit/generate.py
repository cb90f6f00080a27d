"""Text generation with a compiled step graph (docs/design.md, "Program form").

A model compiled with ``generation=GenerationSpec(...)`` is one graph ``(input_ids, positions, *cache) ->
(logits, *cache')`` captured from ``lowbit.models.CausalLMStep``. ``Generator`` drives it: a prefill over the
prompts (left-padded, per-sequence positions) into a fresh cache of ``max_length`` slots, then one decode step
per new token over that cache. On CUDA the decode step is replayed
from a CUDA graph over static buffers (the host work of a step is then one replay). Sampling follows
transformers' order: temperature, then top-k, then top-p, then a draw from a seeded ``torch.Generator``.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from lowbit.errors import counted
from lowbit.ir.kvcache import host_checked_positions, layer_kv_heads
from lowbit.kernels.decode_step import not_finite_rows, row_argmax_checked, row_argmax_checked_ref
from lowbit.models import CausalLMStep, GenerationError

__all__ = ["GenerationSpec", "GenerationOutput", "Generator", "step_example", "GenerationError", "left_padded",
           "continuation", "before_stop"]


@dataclass(frozen=True)
class GenerationSpec:
    """The static limits a step graph is captured with: prompt + new tokens <= ``max_length``, batch <=
    ``max_batch``. ``cuda_graph`` replays decode steps from a CUDA graph when the model runs on CUDA, and
    ``prefill_graphs`` prefill shapes too (a shape's second prefill captures it). ``logits``:
    ``"last"`` (the head on the last position only, all generation reads) or ``"all"`` (every position's logits:
    perplexity through the step graph and its cache). A value out of range is a ``GenerationError``."""

    max_length: int = 512
    max_batch: int = 8
    cuda_graph: bool = True
    logits: Literal["last", "all"] = "last"
    """``last``: the step computes the final norm and the head for the last position only (the ``last-logits``
    pass; logits ``[B, 1, V]``), all that generation reads. ``all``: every position's (perplexity through the
    step graph and its cache)."""
    prefill_graphs: int = 4
    """With ``cuda_graph`` on CUDA (float or packed cache): how many prefill shapes (batch, prompt length rounded up to
    ``PREFILL_BUCKET``) keep a captured CUDA graph. A prefill run eagerly launches every op from Python (SmolLM2's
    1 x 512 prefill: ~42 ms of host time for a few ms of GPU work); a shape is captured the second time it is
    seen (a one-off prompt is not worth a capture), the least recently used dropped past this many. 0: eager."""

    def __post_init__(self) -> None:
        for name in ("max_length", "max_batch"):
            value = getattr(self, name)
            if not _is_int(value):
                raise GenerationError(f"GenerationSpec.{name}={value!r}: must be an integer")
            object.__setattr__(self, name, int(value))
        if self.max_length < 2:
            raise GenerationError(f"GenerationSpec.max_length={self.max_length}: need at least 2 (one prompt token, "
                                  "one new token)")
        if self.max_batch < 1:
            raise GenerationError(f"GenerationSpec.max_batch={self.max_batch}: need at least 1")
        if not isinstance(self.cuda_graph, (bool, np.bool_)):  # "false" is truthy: decode replayed CUDA graphs
            raise GenerationError(f"GenerationSpec.cuda_graph={self.cuda_graph!r}: must be True or False")
        object.__setattr__(self, "cuda_graph", bool(self.cuda_graph))
        if not _is_int(self.prefill_graphs) or self.prefill_graphs < 0:
            raise GenerationError(f"GenerationSpec.prefill_graphs={self.prefill_graphs!r}: must be an integer >= 0 "
                                  "(0: prefill without CUDA graphs)")
        object.__setattr__(self, "prefill_graphs", int(self.prefill_graphs))
        if self.logits not in ("last", "all"):
            raise GenerationError(f"GenerationSpec.logits={self.logits!r}: 'last' (generation) or 'all' (every "
                                  "position's logits)")


def step_example(step: CausalLMStep, spec: GenerationSpec) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Example inputs and dynamic shapes to capture ``step``: batch, tokens and cache slots all dynamic, up to
    the spec's limits (the example sizes 2, 3, 5 differ so export specialises none of them)."""
    dim = torch.export.Dim
    # export wants max > 2 for every dynamic dim; the spec's limits are checked again at run time
    batch = dim("batch", min=1, max=max(spec.max_batch, 3))
    tokens = dim("tokens", min=1, max=max(spec.max_length, 6))
    slots = dim("slots", min=1, max=max(spec.max_length, 6))
    ids = torch.ones(2, 3, dtype=torch.long)
    positions = torch.arange(3).repeat(2, 1)
    cache = step.empty_cache(2, 5)
    dynamic = {"input_ids": {0: batch, 1: tokens}, "positions": {0: batch, 1: tokens},
               "cache": [{0: batch, 2: slots}] * len(cache)}
    return (ids, positions, cache), dynamic


@dataclass
class GenerationOutput:
    """New tokens per sequence (stop token included, padding excluded) and timings."""

    tokens: list[list[int]]
    prompt_lengths: list[int]
    prefill_seconds: float
    decode_seconds: float
    decode_steps: int
    peak_memory_bytes: int | None = None
    texts: list[str] | None = None
    """Per sequence, the text its new tokens add after its prompt's (``continuation``), where the model has a
    tokenizer: decoded alone, a SentencePiece tokenizer's first new word lost its leading space."""

    @property
    def decode_tokens_per_second(self) -> float:
        """Tokens the decode steps produced per second, over the batch: each sequence's tokens after its first
        (which prefill makes), so a sequence that stopped early adds nothing for the steps it sat out. NaN when no
        decode step ran (``max_new_tokens=1``, or every sequence stopped at its first token): 0 tokens over the
        microseconds of the host's bookkeeping read as 0.0 tokens/s, a measurement of nothing."""
        n = sum(max(0, len(t) - 1) for t in self.tokens)
        return n / self.decode_seconds if self.decode_steps and self.decode_seconds > 0 else float("nan")

    @property
    def prefill_tokens_per_second(self) -> float:
        """Prompt tokens the prefill read per second (padding excluded)."""
        return sum(self.prompt_lengths) / self.prefill_seconds if self.prefill_seconds > 0 else float("nan")

    @property
    def timings(self) -> dict[str, float | int]:
        """The run's timings as one dict, to log or write as JSON (it was a field nothing filled: always {})."""
        return {"prefill_seconds": self.prefill_seconds, "decode_seconds": self.decode_seconds,
                "decode_steps": self.decode_steps, "prefill_tokens_per_second": self.prefill_tokens_per_second,
                "decode_tokens_per_second": self.decode_tokens_per_second}

    def sequences(self, prompts: Sequence[Sequence[int]]) -> list[list[int]]:
        """Each prompt followed by its new tokens (``prompts`` as given to ``generate``, token ids)."""
        return [list(p) + t for p, t in zip(prompts, self.tokens)]


def continuation(tokenizer: Any, prompt_ids: Sequence[int], tokens: Sequence[int], head: str | None = None) -> str:
    """The text ``tokens`` add after the prompt: the decode of prompt + tokens past the decode of the prompt, so a
    word's leading space that a SentencePiece decoder strips at the start of a text is kept. The tokens' own decode
    where the prompt's text is not a prefix of the whole (a decoder that rewrites across the join). ``head``: the
    prompt's decode, where the caller keeps it (a stop-string check decodes after every token)."""
    if not prompt_ids:
        return tokenizer.decode(list(tokens), skip_special_tokens=True)
    if head is None:
        head = tokenizer.decode(list(prompt_ids), skip_special_tokens=True)
    whole = tokenizer.decode(list(prompt_ids) + list(tokens), skip_special_tokens=True)
    return whole[len(head):] if whole.startswith(head) else tokenizer.decode(list(tokens), skip_special_tokens=True)


def stop_at(text: str, stop: Sequence[str]) -> int | None:
    """Where the first of the ``stop`` strings starts in ``text`` (the earliest, whichever string), or None."""
    found = [i for i in (text.find(s) for s in stop) if i >= 0]
    return min(found) if found else None


def before_stop(text: str, stop: Sequence[str]) -> str:
    """``text`` up to the first stop string, which is left out (as transformers' ``stop_strings`` text reads)."""
    at = stop_at(text, stop)
    return text if at is None else text[:at]


def stop_strings(stop: Any) -> list[str]:
    """Stop strings as a list from one string or a sequence of them; an empty one (which every text contains, so
    every sequence would end at its first token) and a non-string (a token id belongs in ``stop_tokens``) refused."""
    if stop is None:
        return []
    items = [stop] if isinstance(stop, str) else stop
    try:
        items = list(items)
    except TypeError:
        raise GenerationError(f"stop={stop!r}: expected a string or a list of strings (token ids go in "
                              "stop_tokens=)") from None
    for item in items:
        if not isinstance(item, str):
            raise GenerationError(f"stop: {item!r} is not a string (token ids go in stop_tokens=)")
        if not item:
            raise GenerationError("stop: '' is empty; every text contains it, so each sequence would end at its "
                                  "first token")
    return items


def special_stops(tokenizer: Any, stop: Sequence[str]) -> tuple[list[str], set[int]]:
    """``stop`` split into strings to look for in the text and the ids of those that are a special token's text
    (``<|im_end|>``): the text is decoded without special tokens, so such a stop never matched and the run went on
    to ``max_new_tokens``; it ends a sequence as that token does. A stop holding one among other text cannot match
    either: refused."""
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    special = {t.content: i for i, t in added.items() if getattr(t, "special", False)}
    special.update({t: tokenizer.convert_tokens_to_ids(t) for t in getattr(tokenizer, "all_special_tokens", [])
                    if t not in special})
    texts, ids = [], set()
    for s in stop:
        if s in special:
            ids.add(int(special[s]))
            continue
        inside = next((t for t in special if t and t in s), None)
        if inside is not None:
            raise GenerationError(f"stop: {s!r} holds the special token {inside!r}, which the decoded text leaves out, "
                                  f"so it could never match: give {inside!r} as a stop of its own")
        texts.append(s)
    return texts, ids


def _is_int(x: Any) -> bool:
    """An integer (Python or numpy), not a bool: what sizes, counts and token ids must be."""
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def sampling_only(*, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                  seed: int | None = None) -> list[tuple[str, Any]]:
    """The sampling options given (name, value) that greedy decoding would ignore: refused without sampling, by
    ``check_request`` and, before the model loads, by ``lowbit generate``."""
    return [(name, value) for name, value, given in (
        ("temperature", temperature, temperature != 1.0), ("top_k", top_k, top_k is not None),
        ("top_p", top_p, top_p is not None), ("seed", seed, seed is not None)) if given]


def _integral(t: Any) -> int:
    """A token id: an integer, or a float/0-d tensor holding one exactly (5.7 was silently read as 5)."""
    if isinstance(t, torch.Tensor):
        t = t.item()
    if isinstance(t, bool) or not float(t).is_integer():
        raise ValueError(t)
    return int(t)


def _check_mask(mask: torch.Tensor) -> None:
    """An attention mask marks real tokens 1 and padding 0, padding at the ends: a 0.5 was counted as a real token
    and a 0 between real tokens dropped that token, both without a word."""
    bad = ((mask != 0) & (mask != 1)).nonzero()
    if len(bad):
        at = tuple(bad[0].tolist())
        raise GenerationError(f"attention_mask holds {mask[at].item()} at position {at}: it takes 1 (a real token) "
                              "or 0 (padding)")
    for b, row in enumerate(mask.reshape(-1, mask.shape[-1]) if mask.dim() else mask.reshape(1, 1)):
        real = row.nonzero().flatten()
        if len(real) and int(real[-1] - real[0]) + 1 != len(real):
            hole = int(next(i for i in range(int(real[0]), int(real[-1])) if not row[i]))
            raise GenerationError(f"attention_mask row {b} holds 0 at position {hole}, between real tokens: padding "
                                  "sits at either end of a prompt. A masked token inside a prompt (which transformers "
                                  "keeps in place, unattended) would be dropped here, giving another result: remove "
                                  "it from the prompt")


def _one_row(mask: Any) -> bool:
    """Whether a mask is one row (a 1-D tensor or array, or a list of numbers), not one row per prompt."""
    if isinstance(mask, (torch.Tensor, np.ndarray)):
        return mask.ndim == 1
    return not any(hasattr(m, "__iter__") for m in mask)


def _prompts(input_ids: Any, attention_mask: Any, tokenizer: Any = None) -> list[list[int]]:
    """Prompts as lists of ids: from a list of lists, or a ``[B, L]`` tensor whose ``attention_mask`` (left or
    right padding) says which ids are real. A flat list of ids is one prompt (as a 1-D tensor is); strings are
    encoded with ``tokenizer`` (``int('h')`` on each character was the error a user saw)."""
    if isinstance(input_ids, Mapping) and "input_ids" in input_ids:  # a tokenizer's output (BatchEncoding)
        if attention_mask is None:
            attention_mask = input_ids.get("attention_mask")
        input_ids = input_ids["input_ids"]
    if isinstance(input_ids, np.ndarray):  # as a tensor (a 1-D array is one prompt, not prompts of one int each)
        input_ids = torch.from_numpy(input_ids)
    if isinstance(input_ids, torch.Tensor) and attention_mask is not None and not isinstance(attention_mask,
                                                                                           torch.Tensor):
        attention_mask = torch.as_tensor(np.asarray(attention_mask))  # a list mask ("'list' has no attribute 'shape'")
    if not hasattr(input_ids, "__iter__"):  # None, an int: "'NoneType' object is not iterable"
        raise GenerationError(f"input_ids is {type(input_ids).__name__} {str(input_ids)[:40]!r}: expected token ids "
                              "(a list of lists of ints or a [batch, length] tensor) or text (with a tokenizer)")
    if isinstance(input_ids, torch.Tensor):
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
            if attention_mask is not None and attention_mask.dim() == 1:  # the one prompt's mask, as its ids
                attention_mask = attention_mask[None]
        if input_ids.dim() != 2:
            raise GenerationError(f"input_ids has shape {tuple(input_ids.shape)}; expected [batch, length]")
        # as a list's ids are (``_integral``): a float tensor's 3.7 was read as 3 and a bool tensor as ids 0/1
        if input_ids.dtype == torch.bool or input_ids.is_complex():
            raise GenerationError(f"input_ids is a {input_ids.dtype} tensor: token ids are integers (torch.long)")
        if input_ids.is_floating_point():
            fractional = (input_ids != input_ids.round()).nonzero()
            if len(fractional):
                at = tuple(fractional[0].tolist())
                raise GenerationError(f"input_ids holds {input_ids[at].item()} at position {at}: token ids are "
                                      "integers")
            input_ids = input_ids.long()
        if attention_mask is None:
            return [row.tolist() for row in input_ids]
        if attention_mask.shape != input_ids.shape:
            raise GenerationError(f"attention_mask {tuple(attention_mask.shape)} does not match input_ids "
                                  f"{tuple(input_ids.shape)}")
        _check_mask(attention_mask)
        return [row[m.bool()].tolist() for row, m in zip(input_ids, attention_mask)]
    if isinstance(input_ids, str):
        input_ids = [input_ids]
    input_ids = list(input_ids)
    if input_ids and all(_is_int(p) for p in input_ids):  # numpy ints too (np.int64 ids read as prompts)
        input_ids = [input_ids]
        # and its mask is one row too: tok("text") and apply_chat_template() give flat ids and a flat mask, which was
        # read as one mask row per prompt ("'int' object is not iterable")
        if attention_mask is not None and _one_row(attention_mask):
            attention_mask = [attention_mask]
    if attention_mask is not None and len(attention_mask) != len(input_ids):  # an IndexError, or extra rows ignored
        raise GenerationError(f"attention_mask has {len(attention_mask)} rows for {len(input_ids)} prompts: give one "
                              "row per prompt")
    prompts = []
    for i, p in enumerate(input_ids):
        if isinstance(p, str):
            if tokenizer is None:
                raise GenerationError(f"prompt {i} is text ({p[:40]!r}) and this model has no tokenizer: pass token "
                                      "ids (lists of ints or a [batch, length] tensor)")
            p = tokenizer(p).input_ids
        try:
            if isinstance(p, torch.Tensor):
                p = p.tolist()
            ids = [t if isinstance(t, int) else _integral(t) for t in p]
        except (TypeError, ValueError):
            raise GenerationError(f"prompt {i} is {type(p).__name__} {str(p)[:40]!r}: expected a list of token ids "
                                  "(or text, with a tokenizer)") from None
        if attention_mask is not None:  # a padded list batch: keep the ids the mask marks real
            _check_mask(torch.as_tensor(np.asarray(attention_mask[i], dtype=np.float64))[None])
            mask = [bool(m) for m in attention_mask[i]]
            if len(mask) != len(ids):
                raise GenerationError(f"attention_mask row {i} has {len(mask)} entries for {len(ids)} ids")
            ids = [t for t, m in zip(ids, mask) if m]
        prompts.append(ids)
    return prompts


# the candidates a CPU nucleus cutoff tries first: SmolLM2's nucleus at temperature 0.7 and top_p 0.9 keeps <= 47 of
# its 49152 tokens, and a top-k of 64 costs a fraction of the full sort (108-123 ms a step at batch 16, one thread)
_NUCLEUS_FIRST_K = 64


def _nucleus_cutoff(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """``[B, 1]``: per row, the smallest logit of the nucleus (the fewest most likely tokens whose probability
    reaches ``top_p``; the token that crosses it is kept, and so are all tokens tied with the last one kept).

    On the CPU a top-k stands in for the full sort: first of a few candidates, then, for a wider nucleus, of every
    token at least ``(1 - top_p) / V`` likely (the rest, less likely than all of those and ``< 1 - top_p`` together,
    are outside it), which a top-k still sorts faster than a sort of the whole row. On an accelerator the host read
    that picks k would stall the queue, so it sorts all at once."""
    vocab = logits.shape[-1]
    log_total = logits.logsumexp(-1, keepdim=True)
    k = min(vocab, _NUCLEUS_FIRST_K) if logits.device.type == "cpu" else vocab
    while True:
        # descending; all of a row by a sort
        top = torch.topk(logits, k, dim=-1).values if k < vocab else logits.sort(-1, descending=True).values
        probs = (top - log_total).exp()
        before = probs.cumsum(-1) - probs  # the probability of the tokens more likely than each
        kept = (before < top_p).sum(-1, keepdim=True).clamp_(min=1)  # the most likely is always kept
        if k == vocab or bool((kept < k).all()):
            return top.gather(-1, kept - 1)
        if k == _NUCLEUS_FIRST_K:
            floor = log_total + math.log((1 - top_p) / vocab)
            k = max(int((logits >= floor).sum(-1).max()), k + 1)  # + 1: or, on a rounding, all the row next
        else:
            k = vocab


def _sample(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
            generator: torch.Generator | None) -> torch.Tensor:
    """Next tokens ``[B]`` from last-position logits ``[B, V]``."""
    # shifted so the largest is 0 before dividing (softmax, top-k and top-p are shift-invariant), in float64: a small
    # temperature (1e-40) overflowed float32 logits to inf (or 0/0) and multinomial failed on NaN probabilities.
    # A copy (the caller's logits may already be float64), then in place: each full-vocabulary temporary costs ms
    logits = logits.to(torch.float64, copy=True)
    logits.sub_(logits.amax(-1, keepdim=True)).div_(temperature)
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits.masked_fill_(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        logits.masked_fill_(logits < _nucleus_cutoff(logits, top_p), float("-inf"))
    probs = logits.softmax(-1)
    try:
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    except RuntimeError:  # "probability tensor contains either inf, nan or element < 0", naming no sequence
        bad = (~torch.isfinite(probs).all(-1)).nonzero()
        if not len(bad):
            raise
        raise GenerationError(f"sequence {bad[0].item()}: the model's logits are not finite (NaN or inf), so there "
                              "is no distribution to sample from") from None


class _CudaGraphStep:
    """The decode step replayed from a CUDA graph: static input buffers, outputs written by the replay.

    ``greedy``: the graph also takes the argmax of the last logits and writes it into its own token input and
    advances its positions, so a greedy step is one replay and the host never copies inputs in (fewer launches per
    step; the host only reads the chosen tokens, one step behind)."""

    def __init__(self, runner: Callable[..., Any], ids: torch.Tensor, positions: torch.Tensor,
                 cache: list[torch.Tensor], greedy: bool = False) -> None:
        self.ids, self.positions = ids.clone(), positions.clone()
        self.cache = [c.clone() for c in cache]
        self.greedy = greedy
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm up allocations outside the capture
                runner(self.ids, self.positions, *self.cache)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = runner(self.ids, self.positions, *self.cache)
            if greedy:
                # the tokens and their rows' not-finite flags in one kernel, read together: NaN logits are named
                self.picked = row_argmax_checked(self.out[0][:, -1])
                self.ids.copy_(self.picked[0].view_as(self.ids))
                self.positions.add_(1)

    def __call__(self, ids: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, ...]:
        self.ids.copy_(ids)
        self.positions.copy_(positions)
        self.graph.replay()
        self._copy_cache_back()
        return self.out

    def _copy_cache_back(self) -> None:
        # the new cache becomes the next step's input: copy back into the static input buffers
        for dst, src in zip(self.cache, self.out[1:]):
            if dst.data_ptr() != src.data_ptr():  # the backends write the donated cache in place
                dst.copy_(src)

    def replay_with(self, ids: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """A prefill's replay: its outputs (logits and the filled cache) are read before the next replay, and its
        cache inputs are never read past the prompt (so no cache is copied back or cleared)."""
        self.ids.copy_(ids)
        self.positions.copy_(positions)
        self.graph.replay()
        return self.out

    def start(self, ids: torch.Tensor, positions: torch.Tensor, cache: list[torch.Tensor]) -> None:
        """Load a generation's first decode inputs (greedy graphs then feed themselves)."""
        self.ids.copy_(ids)
        self.positions.copy_(positions)
        for dst, src in zip(self.cache, cache):
            dst.copy_(src)

    def step(self) -> torch.Tensor:
        """One greedy step: replay, then a copy of the chosen tokens and their rows' not-finite flags ``[2, B]``
        (the next replay overwrites both)."""
        self.graph.replay()
        self._copy_cache_back()
        return self.picked.clone()


def logits_vocab(graph: Any) -> int | None:
    """The vocabulary size a step graph's logits output declares (its last dim), or None where it is not static."""
    shape = getattr(getattr(graph.outputs[0], "type", None), "shape", None) if graph.outputs else None
    last = shape[-1] if shape else None
    return last if isinstance(last, int) else None


def left_padded(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, positions)`` of a prefill over prompts of different lengths, left-padded so that every prompt ends in
    the last column (a ``last-logits`` step computes only that one): prompt b's tokens take positions 0..n-1 in
    the last n columns, its pad columns (token 0) the positions n..L-1, whose cache slots none of its tokens
    attends to and its decode steps overwrite before reading."""
    longest = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), longest, dtype=torch.long)
    positions = torch.zeros(len(prompts), longest, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, longest - len(p):] = torch.tensor(p, dtype=torch.long)
        positions[b] = torch.cat([torch.arange(len(p), longest), torch.arange(len(p))])
    return ids, positions


PREFILL_BUCKET = 64
"""Captured prefills take prompts left-padded up to a multiple of this many tokens (capped at ``max_length``), so
nearby prompt lengths share one graph; pad columns are attended by no prompt token (``left_padded``)."""


def bucketed(ids: torch.Tensor, positions: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``left_padded``'s ``(ids, positions)`` widened to ``length`` columns: the new pad columns on the left take
    token 0 and the positions ``L .. length-1`` (every row of ``left_padded``'s ``L`` columns holds positions
    ``0 .. L-1``), as every pad column does: slots no prompt token attends to, which the row's decode steps
    overwrite before reading them."""
    extra = length - ids.shape[1]
    if extra <= 0:
        return ids, positions
    pad_pos = torch.arange(ids.shape[1], length, device=positions.device).expand(ids.shape[0], extra)
    return (torch.cat([ids.new_zeros(ids.shape[0], extra), ids], 1), torch.cat([pad_pos, positions], 1))


def check_request(spec: GenerationSpec, prompts: list[list[int]], max_new_tokens: int, *, do_sample: bool = False,
                  temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                  seed: int | None = None, max_positions: int | None = None) -> None:
    """Refuse a request the step graph of ``spec`` cannot serve, naming the limit. Separate from ``Generator`` so
    ``lowbit generate`` checks its flags before the compile (a bad -n or --top-k failed only after it).
    ``max_positions``: the model's ``max_position_embeddings`` (``meta["generation"]["max_positions"]``), past
    which no larger cache helps."""
    if not _is_int(max_new_tokens):
        raise GenerationError(f"max_new_tokens={max_new_tokens!r}: must be an integer")
    if max_new_tokens <= 0:
        raise GenerationError(f"max_new_tokens={max_new_tokens}: must be at least 1")
    if not prompts:
        raise GenerationError("no prompts given")
    if len(prompts) > spec.max_batch:
        raise GenerationError(f"batch of {len(prompts)} prompts is larger than the captured max_batch="
                              f"{spec.max_batch}: compile with generation=GenerationSpec(max_batch="
                              f"{len(prompts)}) (CLI: --max-batch)")
    for i, p in enumerate(prompts):
        if not p:
            raise GenerationError(f"prompt {i} is empty: generation continues a prompt of at least one token (text "
                                  "whose tokenizer adds no BOS token can encode to none)")
        if max_positions is not None and len(p) + max_new_tokens > max_positions:
            # the max_length advice below would be refused by GenerationSpec: the model has no such positions
            raise GenerationError(
                f"prompt {i} has {counted(len(p), 'token')} + max_new_tokens={max_new_tokens} = "
                f"{len(p) + max_new_tokens} > the model's max_position_embeddings={max_positions}: shorten the prompt "
                "or ask for fewer tokens")
        if len(p) + max_new_tokens > spec.max_length:
            raise GenerationError(
                f"prompt {i} has {counted(len(p), 'token')} + max_new_tokens={max_new_tokens} = "
                f"{len(p) + max_new_tokens} > the cache's max_length={spec.max_length}: compile with "
                f"generation=GenerationSpec(max_length={len(p) + max_new_tokens}) (CLI: --max-length), or ask for "
                "fewer tokens")
    if not isinstance(do_sample, bool):  # do_sample="no" is truthy: it sampled
        raise GenerationError(f"do_sample={do_sample!r}: must be True or False")
    # a wrong type failed deep in torch (topk(): argument 'k' must be int; manual_seed expected a long) or not at all
    for name, value, kind in (("temperature", temperature, "a number"), ("top_p", top_p, "a number"),
                              ("top_k", top_k, "an integer"), ("seed", seed, "an integer")):
        if value is None or _is_int(value) or (kind == "a number" and isinstance(value, (float, np.floating))):
            continue
        raise GenerationError(f"{name}={value!r}: must be {kind}")
    if seed is not None and not -2**63 <= seed < 2**64:
        raise GenerationError(f"seed={seed}: must fit in 64 bits")
    ignored = sampling_only(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    if ignored and not do_sample:  # as the CLI refuses --temperature without --sample: greedy would ignore them
        raise GenerationError(f"{', '.join(f'{n}={v}' for n, v in ignored)} only "
                              f"{'applies' if len(ignored) == 1 else 'apply'} when sampling: pass do_sample=True "
                              "(without it decoding is greedy)")
    if do_sample and not (math.isfinite(temperature) and temperature > 0):
        raise GenerationError(f"temperature={temperature}: must be a finite number > 0 when sampling (use "
                              "do_sample=False for greedy)")
    if top_k is not None and top_k < 1:
        raise GenerationError(f"top_k={top_k}: must be >= 1")
    if top_p is not None and not 0 < top_p <= 1:
        raise GenerationError(f"top_p={top_p}: must be in (0, 1]")


def _stop_ids(stop_tokens: Any) -> set[int]:
    """Stop tokens as ints from an int, a sequence, a numpy array or scalar, or a tensor: a tensor's elements
    hash by identity, so ``set(tensor)`` never matched a token and generation ran past every stop."""
    if isinstance(stop_tokens, (torch.Tensor, np.ndarray)):
        stop_tokens = stop_tokens.reshape(-1).tolist()
    elif isinstance(stop_tokens, (int, np.integer)):
        stop_tokens = [stop_tokens]
    try:
        items = list(stop_tokens)
    except TypeError:
        raise GenerationError(f"stop_tokens={stop_tokens!r}: expected token ids (an int or a sequence of ints)") \
            from None
    bad = [t for t in items if not _is_int(t)]
    if bad:
        raise GenerationError(f"stop_tokens: {bad[0]!r} is not a token id (an integer)")
    negative = [t for t in items if int(t) < 0]
    if negative:  # no token is ever negative: the run went on to max_new_tokens as if no stop had been asked for
        raise GenerationError(f"stop_tokens: {int(negative[0])} is not a token id (ids are >= 0)")
    return {int(t) for t in items}


_HF_NAMES = {
    "eos_token_id": "use stop_tokens= (ids that end a sequence)",
    "max_length": "give max_new_tokens (the cache's max_length is fixed when compiling: GenerationSpec(max_length=))",
    "num_beams": "lowbit decodes greedily or by sampling (do_sample=True), no beam search",
    "pad_token_id": "not needed: give prompts as lists of ids, or a padded tensor with attention_mask=",
    "generator": "use seed= for reproducible sampling",
    "streamer": "give on_token=callable(sequence_index, token): it is called as each token is made",
    "stop_strings": "use stop= (strings that end a sequence once its new text contains one)",
}
"""transformers' ``generate`` options that users carry over, with what lowbit takes instead."""


class Generator:
    """Runs prefill and decode with a lowered step graph ``runner(ids, positions, *cache) -> (logits, *cache)``."""

    def __init__(self, runner: Callable[..., Any], meta: dict[str, Any], device: str | torch.device | None = None,
                 tokenizer: Any = None, vocab_size: int | None = None) -> None:
        self.runner = runner
        self.meta = meta
        self.vocab_size = vocab_size
        """The logits' width where the caller knows it (the step graph's output type), so stop tokens are checked
        before the prefill; None: they are checked against the prefill's logits."""
        self._eos_warned = False
        self.spec = GenerationSpec(meta["max_length"], meta["max_batch"], meta.get("cuda_graph", True),
                                   meta.get("logits", "all"), meta.get("prefill_graphs", 4))
        self.cache_dtype: torch.dtype = getattr(torch, meta["cache_dtype"])
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.tokenizer = tokenizer
        self._cuda_graphs: dict[tuple[int, bool], _CudaGraphStep] = {}
        self._prefill_graphs: dict[tuple[int, int], _CudaGraphStep] = {}
        """Captured prefills by (batch, bucketed length), least recently used first."""
        self._prefill_seen: set[tuple[int, int]] = set()
        self.prefill_graph_error: str | None = None
        """Why a prefill capture failed (prefills then run eagerly), or None."""
        self.kv: dict[str, Any] | None = meta.get("kv_cache")
        """The packed quantized cache's layout (the ``kv-cache`` pass), or None for a float cache."""

    def _slots(self, slots: int) -> int:
        """Cache slots to allocate: the packed cache holds whole key blocks."""
        if self.kv is None:
            return slots
        kb = self.kv["k_block"]
        return -(-slots // kb) * kb

    def _cache(self, batch: int, slots: int) -> list[torch.Tensor]:
        if self.kv is not None:
            from lowbit.ir.kvcache import cache_layout, empty_cache

            kv = self.kv
            return [t for heads in layer_kv_heads(self.meta)
                    for t in empty_cache(cache_layout(batch, heads, self._slots(slots), self.meta["head_dim"],
                                                      bits=kv["bits"], k_block=kv["k_block"], v_group=kv["v_group"],
                                                      window=kv["window"], sink=kv["sink"],
                                                      scale_dtype=getattr(torch, kv["scale_dtype"]),
                                                      float_dtype=self.cache_dtype), self.device)]
        return [torch.zeros((batch, heads, slots, self.meta["head_dim"]), dtype=self.cache_dtype, device=self.device)
                for heads in layer_kv_heads(self.meta) for _ in range(2)]

    @torch.no_grad()
    def prefill_logits(self, ids: torch.Tensor) -> torch.Tensor:
        """Every position's logits ``[B, L, V]`` of ``ids`` ``[B, L]``: one prefill over a fresh cache of ``L``
        slots, what perplexity through the step graph reads. Needs a step compiled with ``logits="all"``."""
        if self.spec.logits != "all":
            raise GenerationError("this step graph computes the logits of the last position only "
                                  "(GenerationSpec(logits='last'), the default for generation); every position's "
                                  "logits (perplexity) need compile_model(..., generation=GenerationSpec(..., "
                                  "logits='all'))")
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype != torch.long:
            raise GenerationError(f"prefill_logits takes input_ids as an int64 [B, L] tensor, got "
                                  f"{getattr(ids, 'dtype', type(ids).__name__)} {tuple(getattr(ids, 'shape', ()))}")
        batch, length = ids.shape
        if batch > self.spec.max_batch or length > self.spec.max_length:
            raise GenerationError(f"input_ids {tuple(ids.shape)} do not fit the step graph, captured for at most "
                                  f"max_batch={self.spec.max_batch} sequences of max_length={self.spec.max_length} "
                                  "tokens: compile with a larger GenerationSpec, or give fewer/shorter windows")
        ids = ids.to(self.device)
        positions = torch.arange(length, device=self.device)[None].expand(batch, -1)
        with host_checked_positions(length - 1):  # (the layers of a packed cache need not read them on the device)
            return self.runner(ids, positions, *self._cache(batch, length))[0]

    def _prefill(self, ids: torch.Tensor, positions: torch.Tensor,
                 lengths: list[int]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The last position's logits ``[B, V]`` of left-padded prompts and the full-length cache they fill."""
        graph = self._prefill_graph(ids, positions)
        if graph is not None:
            out = graph.replay_with(*bucketed(ids, positions, graph.ids.shape[1]))
            return out[0][:, -1], list(out[1:])
        if self.kv is not None:
            return self._prefill_packed(ids, positions, lengths)
        # the prompt goes straight into the full-length cache: a prompt-length cache copied into a zeroed full one
        # cost 16 fills and 8 copies per prefill of the 7B-shaped 4-layer stack (~0.3 ms of a 1x2048 prefill on
        # the H200); attention over the slots past the prompt is masked, or (the triton backend's rotary_decode_sdpa)
        # causal over the prompt's slots, each row's positions 0..L-1 as left_padded made them
        with host_checked_positions(ids.shape[1] - 1, padded=any(n != ids.shape[1] for n in lengths)):
            out = self.runner(ids, positions, *self._cache(len(lengths), self.spec.max_length))
        return out[0][:, -1], list(out[1:])

    def _captures_prefills(self) -> bool:
        """Whether prefills may replay from CUDA graphs (on CUDA, with the spec's graphs, last logits only)."""
        return (self.device.type == "cuda" and self.spec.cuda_graph and self.spec.prefill_graphs > 0
                and self.spec.logits == "last")

    def _padded_runner(self, ids: torch.Tensor, positions: torch.Tensor,
                       *cache: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The step over ``bucketed`` rows (``host_checked_positions(padded=True)``): what a captured prefill runs,
        every row's prompt its own length (the packed cache's layers write each row by position; a float cache's
        causal prefill attention puts each row's queries in position order: ``causal_prefill_attention``)."""
        with host_checked_positions(ids.shape[1] - 1, padded=True):
            return self.runner(ids, positions, *cache)

    def _prefill_graph(self, ids: torch.Tensor, positions: torch.Tensor) -> _CudaGraphStep | None:
        """The captured prefill for this shape (captured at its second sighting), or None: run it eagerly.

        The packed cache's too, keyed as the float cache's by (batch, bucketed length), its prompts of any lengths
        in one graph: the layers write each row by position, not by column (``_padded_runner``; the cache
        decoding reads equals the unpadded prefill's). Padding, not exact-length keys: a graph per prompt length
        would rarely replay (prompts seldom repeat a length) and a batch of mixed lengths would take one graph per
        length, where one bucket's graph serves 64 lengths and the whole batch. Longrope's packed prefill stays
        eager: its groups of one length pick their own frequencies by their largest position, which pads (or a
        batch padded together) would move."""
        if not self._captures_prefills() or self.prefill_graph_error is not None:
            return None
        length = min(self.spec.max_length, -(-ids.shape[1] // PREFILL_BUCKET) * PREFILL_BUCKET)
        if self.meta.get("rope_switch") is not None:  # longrope picks frequencies by the largest position: no pads
            if self.kv is not None:
                return None
            length = ids.shape[1]
        key = (ids.shape[0], length)
        graph = self._prefill_graphs.pop(key, None)
        if graph is None:
            if key not in self._prefill_seen:
                self._prefill_seen.add(key)
                return None
            while len(self._prefill_graphs) >= self.spec.prefill_graphs:  # the least recently used goes
                self._prefill_graphs.pop(next(iter(self._prefill_graphs)))
            try:
                graph = _CudaGraphStep(self._padded_runner, *bucketed(ids, positions, length),
                                       self._cache(ids.shape[0], self.spec.max_length))
            except Exception as exc:  # noqa: BLE001 - a step that cannot be captured still prefills, eagerly
                self.prefill_graph_error = f"{type(exc).__name__}: {exc}"
                warnings.warn(f"prefill CUDA graph: capturing the {key[0]} x {length} prefill failed "
                              f"({self.prefill_graph_error[:300]}); prefills run eagerly (GenerationSpec("
                              "prefill_graphs=0) says so without trying)", RuntimeWarning, stacklevel=4)
                torch.cuda.synchronize(self.device)
                return None
        self._prefill_graphs[key] = graph  # most recently used last
        return graph

    def _prefill_packed(self, ids: torch.Tensor, positions: torch.Tensor,
                        lengths: list[int]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``_prefill`` into the packed cache: one prefill per distinct prompt length, its prompts together.

        The packed cache writes each sequence's tokens in order from position 0 (its float ring holds a sequence's
        last tokens, and a left-padded row's pad positions would come after them), so a padded batch cannot be
        prefilled as one; prompts of one length need no padding. Their positions (0..n-1) are known on the host,
        so the layers neither check nor read them on the device (``host_checked_positions``). Why: each prompt
        was prefilled alone, 16 prefills for a batch of 16 (SmolLM2 W4A16 kv4 on an H100: 2.5 s at batch 16 against
        0.22 s at batch 1). A shape seen before replays a CUDA graph instead (``_prefill_graph``: the batch
        left-padded to its bucket, ``_padded_runner``)."""
        longest = ids.shape[1]
        groups: dict[int, list[int]] = {}
        for b, n in enumerate(lengths):
            groups.setdefault(n, []).append(b)
        if len(groups) == 1:
            with host_checked_positions(longest - 1):
                out = self.runner(ids, positions, *self._cache(len(lengths), self.spec.max_length))
            return out[0][:, -1], list(out[1:])
        rows, parts = [], []
        where: dict[int, tuple[int, int]] = {}  # each prompt's (group, row in it)
        for g, (n, members) in enumerate(groups.items()):
            # a group's rows by slices, not an index tensor (its copy to the device would wait for the group before)
            group_ids, group_positions = (torch.cat([t[b:b + 1, longest - n:] for b in members])
                                          for t in (ids, positions))
            with host_checked_positions(n - 1):
                out = self.runner(group_ids, group_positions, *self._cache(len(members), self.spec.max_length))
            rows.append(out[0][:, -1])
            parts.append(out[1:])
            where.update((b, (g, r)) for r, b in enumerate(members))

        def in_batch_order(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
            return torch.cat([tensors[g][r:r + 1] for g, r in (where[b] for b in range(len(lengths)))])

        return in_batch_order(rows), [in_batch_order(ts) for ts in zip(*parts)]

    def _decode_fn(self, batch: int, ids: torch.Tensor, positions: torch.Tensor,
                   cache: list[torch.Tensor]) -> Callable[[torch.Tensor, torch.Tensor, list[torch.Tensor]], Any]:
        """The decode step: a CUDA graph replay on CUDA (captured once per batch size), else a plain call."""
        if self.device.type == "cuda" and self.spec.cuda_graph:
            graph = self._graph(batch, ids, positions, cache, greedy=False)
            graph.start(ids, positions, cache)
            return lambda i, p, c: graph(i, p)
        return lambda i, p, c: self.runner(i, p, *c)

    def _graph(self, batch: int, ids: torch.Tensor, positions: torch.Tensor, cache: list[torch.Tensor],
               greedy: bool) -> _CudaGraphStep:
        """The captured decode step for this batch size (captured once per batch size and kind)."""
        graph = self._cuda_graphs.get((batch, greedy))
        if graph is None:
            graph = self._cuda_graphs[(batch, greedy)] = _CudaGraphStep(self.runner, ids, positions, cache, greedy)
        return graph

    def _check_switch_in_packed_batch(self, lengths: list[int], max_new_tokens: int) -> None:
        """A longrope step picks its frequencies by the largest position of the whole input: a batched decode step
        by the batch's, but the packed cache prefills prompts of each length apart, by their own. Prompts of
        different lengths whose decode steps put the batch past the switch while a shorter one is still before it
        were rotated both ways (tokens that were neither transformers' batched nor single-prompt ones, without a
        word): refused."""
        switch = self.meta.get("rope_switch")
        if self.kv is None or switch is None or len(set(lengths)) < 2:
            return
        # decode step s feeds positions len_b + s; the batch takes the long frequencies once longest + s >= switch
        first, last = max(0, switch - max(lengths)), min(max_new_tokens - 2, switch - min(lengths) - 1)
        if first <= last:
            raise GenerationError(
                f"this longrope model (its rotary switches frequencies at position {switch}) has the packed KV cache "
                f"(kv-cache), which prefills prompts of each length apart: with prompts of {min(lengths)} and "
                f"{max(lengths)} tokens, decode step {first} would rotate the shorter one with the batch's long "
                "frequencies over keys it cached with the short ones. Generate prompts of one length together, or one "
                "prompt per generate() call (or compile without kv-cache: the float cache prefills the batch together)")

    def _check_stops(self, stops: set[int], given: bool, vocab: int) -> None:
        """Stop ids the head can never choose: the run went on to max_new_tokens, silently. A given one is refused;
        the model's own end-of-sequence id past its vocabulary (a config's eos for another vocabulary: GPT-2's
        50256 on a smaller head) is said once, since generating without it is still what the model does."""
        outside = sorted(t for t in stops if t >= vocab)
        if not outside:
            return
        if given:
            raise GenerationError(f"stop_tokens: {outside[0]} is outside the vocabulary ({vocab} logits: ids "
                                  f"0..{vocab - 1}); it can never be generated")
        if not self._eos_warned:
            self._eos_warned = True
            warnings.warn(f"the model's end-of-sequence id {outside[0]} (eos_token_id in its generation config) is "
                          f"outside its vocabulary ({vocab} logits: ids 0..{vocab - 1}): no sequence can end on it, "
                          "each runs to max_new_tokens; give stop_tokens= (or stop=) to end them", UserWarning,
                          stacklevel=3)

    @torch.no_grad()
    def generate(self, input_ids: Any, max_new_tokens: int, *, attention_mask: torch.Tensor | None = None,
                 do_sample: bool = False, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, seed: int | None = None, stop_tokens: Sequence[int] | int | None = None,
                 stop: Sequence[str] | str | None = None, on_token: Callable[[int, int], None] | None = None,
                 **unknown: Any) -> GenerationOutput:
        """Generate up to ``max_new_tokens`` per prompt; a sequence ends at its first stop token or stop string.

        ``input_ids``: a list of token-id lists (any lengths), of strings (encoded with the model's tokenizer),
        or a ``[B, L]`` tensor (with ``attention_mask`` when padded, left or right). ``stop_tokens`` defaults to the
        model's end-of-sequence ids (``()`` for none). ``stop``: strings that end a sequence once the text its new
        tokens add (``continuation``) contains one, each sequence on its own; its ``tokens`` keep the token that
        completed it and its ``texts`` end before it, as transformers' ``stop_strings`` (needs the tokenizer).
        ``on_token(sequence_index, token)`` is called as tokens are made (streaming).
        """
        if unknown:  # transformers' names were a bare "unexpected keyword argument"
            raise GenerationError("; ".join(f"generate() has no option {k!r}" + (f": {_HF_NAMES[k]}" if k in _HF_NAMES
                                                                                  else "") for k in unknown))
        if on_token is not None and not callable(on_token):  # it failed at the first token, after the prefill
            raise GenerationError(f"on_token={on_token!r}: expected a callable on_token(sequence_index, token)")
        prompts = _prompts(input_ids, attention_mask, self.tokenizer)
        stop = stop_strings(stop)
        if stop and self.tokenizer is None:  # the text to look in is the tokenizer's decode
            raise GenerationError(f"stop={stop!r}: stop strings are looked for in the decoded text, and this model "
                                  "has no tokenizer: compile it with tokenizer=, or give stop_tokens= (token ids)")
        stop, special_ids = special_stops(self.tokenizer, stop) if stop else ([], set())
        heads = [self.tokenizer.decode(p, skip_special_tokens=True) for p in prompts] if stop else []
        check_request(self.spec, prompts, max_new_tokens, do_sample=do_sample, temperature=temperature, top_k=top_k,
                      top_p=top_p, seed=seed, max_positions=self.meta.get("max_positions"))
        given_stops = stop_tokens is not None
        if stop_tokens is None:  # the model's end-of-sequence tokens, as transformers' generate stops on
            stop_tokens = self.meta.get("eos_token_ids", ())
        stops = _stop_ids(stop_tokens) | special_ids
        if self.vocab_size is not None:  # before any work: the prefill of every prompt ran first
            self._check_stops(stops, given_stops, self.vocab_size)
        gen = None
        if do_sample:
            gen = torch.Generator(device=self.device)
            # unseeded: a seed drawn from torch's global generator, so torch.manual_seed makes it reproducible
            # (torch.seed() re-seeded the global generator from the clock)
            gen.manual_seed(seed if seed is not None else int(torch.randint(2**62, ()).item()))
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.device)

        def sync() -> None:
            if cuda:
                torch.cuda.synchronize(self.device)

        batch = len(prompts)
        lengths = [len(p) for p in prompts]
        self._check_switch_in_packed_batch(lengths, max_new_tokens)
        ids, positions = (t.to(self.device) for t in left_padded(prompts))
        longest = ids.shape[1]

        def pick(logits: torch.Tensor) -> torch.Tensor:
            """``[2, B]``: the next tokens and 1 where a row's logits are not finite (named when the host reads the
            tokens, with the step: one read for both, so the device still runs a step ahead of the host)."""
            logits = logits.float()
            if not do_sample:
                return row_argmax_checked_ref(logits)  # the greedy graph's kernel, in torch
            bad = not_finite_rows(logits)
            # such a row is reported by step when read; sampled as uniform meanwhile (multinomial fails on it)
            logits = logits.masked_fill(bad.bool().unsqueeze(-1), 0.0)
            return torch.stack((_sample(logits, temperature, top_k, top_p, gen), bad))

        def check_finite(flags: list[int], step: int) -> None:
            for b, flag in enumerate(flags):
                if flag and not done[b]:
                    where = "the prefill (its first new token)" if step == 0 else \
                        f"decode step {step} (its new token {len(tokens[b]) + 1})"
                    raise GenerationError(
                        f"sequence {b}: the model's logits at {where} are not finite (NaN or inf), so there is no "
                        f"token to choose ({'sampling' if do_sample else 'greedy'}); "
                        f"{counted(len(tokens[b]), 'token')} {'was' if len(tokens[b]) == 1 else 'were'} made before "
                        "it. The compiled model's numerics broke: `lowbit debug compare` shows the pass "
                        "and layer")

        sync()
        t0 = time.perf_counter()
        first, cache = self._prefill(ids, positions, lengths)
        if self.vocab_size is None:  # known from the logits: the generation meta does not record it
            self._check_stops(stops, given_stops, first.shape[-1])
        next_tokens = pick(first)
        sync()
        t1 = time.perf_counter()

        tokens: list[list[int]] = [[] for _ in range(batch)]
        made: list[list[int]] = [[] for _ in range(batch)]  # every token read, a stopped sequence's later ones too
        done = [False] * batch
        switch = self.meta.get("rope_switch")
        pos = torch.tensor(lengths, device=self.device).view(batch, 1)
        steps = 0
        read = 0  # the step whose tokens the host reads next: 0 is the prefill's
        decode = None
        greedy_graph = None
        if cuda and self.spec.cuda_graph and not do_sample and max_new_tokens > 1:
            greedy_graph = self._graph(batch, next_tokens[0].view(batch, 1), pos, cache, greedy=True)
        pending = next_tokens
        while True:
            # Launch the next step before reading this one's tokens on the host: the tokens stay on the device, so
            # the host's bookkeeping (and its wait) overlaps the device's work. A step launched after the last
            # sequence stopped is wasted, never seen.
            launched = None
            launch_start = time.perf_counter()
            if steps < max_new_tokens - 1 and longest + steps == switch:
                # longrope: this step's largest position is the first at which the rotary takes its long frequencies,
                # but the cached keys were rotated with the short ones. Every sequence is prefilled again, prompt and
                # tokens so far, into a fresh cache, as transformers' Phi-3 recomputes its cache at this step
                seqs = [p + m + [t] for p, m, t in zip(prompts, made, pending[0].tolist())]
                first, cache = self._prefill(*(t.to(self.device) for t in left_padded(seqs)), [len(q) for q in seqs])
                launched = pick(first)
                pos = torch.tensor(lengths, device=self.device).view(batch, 1) + steps + 1  # the next step's
                if greedy_graph is not None:
                    greedy_graph.start(launched[0].view(batch, 1), pos, cache)
                    cache = []  # the graph holds its own copy
                decode = None  # a CUDA graph step loads the new cache when next made
                steps += 1
            elif steps < max_new_tokens - 1:
                step_ids = pending[0].view(batch, 1)
                if greedy_graph is not None:  # greedy on CUDA graphs: the graph feeds itself its tokens
                    if steps == 0:
                        greedy_graph.start(step_ids, pos, cache)
                        del cache
                    launched = greedy_graph.step()
                else:
                    if decode is None:
                        decode = self._decode_fn(batch, step_ids, pos, cache)
                    out = decode(step_ids, pos, cache)
                    if not (cuda and self.spec.cuda_graph):
                        cache = list(out[1:])
                    launched = pick(out[0][:, -1])
                    pos = pos + 1
                steps += 1
            launch_s = time.perf_counter() - launch_start
            picked, flags = pending.tolist()
            check_finite(flags, read)
            read += 1
            for b, t in enumerate(picked):
                made[b].append(t)
                if done[b]:
                    continue
                tokens[b].append(t)
                if on_token is not None:
                    on_token(b, t)
                if t in stops or len(tokens[b]) >= max_new_tokens:
                    done[b] = True
                elif stop and stop_at(continuation(self.tokenizer, prompts[b], tokens[b], heads[b]), stop) is not None:
                    done[b] = True
            if all(done) or launched is None:
                break
            pending = launched
        t2 = time.perf_counter()
        if launched is not None:
            # the step launched after the last sequence stopped made nothing: it is not counted, nor the host's time
            # in launching it (the whole step on the CPU, which runs a step as it is launched; on CUDA the last read
            # still waits for it, in stream order)
            steps -= 1
            t2 -= launch_s
        sync()
        peak = torch.cuda.max_memory_allocated(self.device) if cuda else None
        texts = None
        if self.tokenizer is not None:
            # after each prompt's text: decoded alone, a SentencePiece tokenizer's first new word lost its space
            texts = [before_stop(continuation(self.tokenizer, p, t), stop) for p, t in zip(prompts, tokens)]
        return GenerationOutput(tokens, lengths, t1 - t0, t2 - t1, steps, peak, texts)
