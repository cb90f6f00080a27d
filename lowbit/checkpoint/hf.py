"""Hugging Face checkpoint formats: ``compressed-tensors`` and ``gptq``, written from a graph and read back into one.

compressed-tensors (the format vLLM, SGLang and transformers load; layouts from the ``compressed-tensors``
package, whose packing helpers are used here):

* ``pack-quantized`` — integer weights (int4/int8, and 2/3-bit), with or without integer input activations:
  ``weight_packed`` int32 ``[N, ceil(K·b/32)]`` (codes as signed ints + 2^(b-1), packed densely along K),
  ``weight_scale`` ``[N, 1]`` (channel) or ``[N, K/g]`` (group), ``weight_zero_point`` (asymmetric: signed ints
  packed along N) and ``weight_shape``.
* ``int-quantized`` — W8A8: ``weight`` int8 ``[N, K]``, ``weight_scale`` ``[N, 1]``; input activations dynamic
  per token (``strategy: token``), or static per tensor (``input_scale`` ``[1]``, with FP8 too).
* ``float-quantized`` — FP8 e4m3: ``weight`` float8_e4m3fn, ``weight_scale`` per channel or group.

lowbit's unsigned codes (uint4 with zero points 0..15) are stored as compressed-tensors' signed ones by
subtracting 2^(b-1) from codes and zero points alike; ``q - zp`` and so every dequantized value are unchanged.
GPTQ with ``act_order`` keeps contiguous groups (static groups), which is compressed-tensors'
``actorder: "static"`` and needs no ``g_idx``.

gptq (the AutoGPTQ/GPTQModel v1 layout transformers+optimum read): ``qweight`` int32 ``[K·b/32, N]`` (unsigned
codes packed along K), ``qzeros`` int32 ``[G, N·b/32]`` holding ``zero - 1`` (the v1 convention), ``scales``
``[G, N]``, ``g_idx`` int32 ``[K]``; symmetric int4/int8 only (runtimes' fast kernels assume it). Scales are
written in float32 so a lowbit reload is bit-exact; loaders cast them to their compute dtype.

Reading: the HF model is built from ``config.json`` (weights loaded as float where float, zeros where
quantized), captured, and the QDQ form is inserted by the ``quantize`` pass's own code with the stored codes,
scales and zero points in place of its RTN ones — the same IR a compile produces.
"""

from __future__ import annotations

import copy
import json
import re
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lowbit.api import UNREAD_TENSORS
from lowbit.checkpoint.files import (
    CheckpointError,
    check_listed,
    read_config,
    read_json,
    read_safetensors,
    read_tokenizer,
    shareable_config,
    unopenable,
    write_safetensors,
)
from lowbit.checkpoint.experts import ExpertNames, expert_names, name_as_checkpoint
from lowbit.checkpoint.graph_view import ActScheme, HFView, QuantWeight, hf_view
from lowbit.checkpoint.zero_heads import ZeroHeads, head_interleaved, pad_zero_heads, zero_head_report
from lowbit.ir.graph import BLOCK_PATTERN, Graph, TensorType
from lowbit.ir.offload import map_from_disk
from lowbit.ir.quant import QDTYPES, get_qdtype, stored_codes

__all__ = ["save_compressed_tensors", "save_gptq", "load_hf_checkpoint", "skeleton", "unpack_zero_points",
           "SHARD_BYTES", "MissingTensorsWarning"]

SHARD_BYTES = 2 * 2**30
"""Largest safetensors shard (HF's default ``max_shard_size`` is 5 GB; 2 GB keeps single files small)."""

SAFE_INDEX = "model.safetensors.index.json"


# ---- tensors the captured forward never reads ------------------------------------------------------


class MissingTensorsWarning(UserWarning):
    """An HF save left out tensors of the model its config.json builds (ones the captured forward never reads, e.g.
    BERT's pooler under a sentence embedder): transformers initialises them at random when it loads the directory."""


_NO_RECORD = ("the graph holds no copy of the source model's tensors (it was read from a lowbit-format checkpoint, "
              "which stores the graph's own, or captured outside lowbit.compile_model)")


def _copy_unread(graph: Graph, view: HFView, keys: dict[str, tuple[int, ...]],
                 missing: list[str]) -> tuple[list[str], dict[str, str]]:
    """Put the ``missing`` HF tensors the source model recorded (``UNREAD_TENSORS``) into ``view.tensors``, as the
    source had them (float, unquantized). Returns (the names copied, {name left out: why}). A source tensor is not
    copied where it no longer fits the saved model: another shape than the written config's, a residual stream
    sliced or rotated (the source's weights read the unrotated stream), or a tensor inside a block when blocks were
    removed (the kept blocks are renumbered)."""
    recorded = (graph.meta.get("source") or {}).get(UNREAD_TENSORS)
    pruned = graph.meta.get("pruned") or {}
    copied: list[str] = []
    left: dict[str, str] = {}
    for key in missing:
        t = None if recorded is None else recorded.get(key)
        if recorded is None:
            left[key] = _NO_RECORD
        elif t is None:
            left[key] = ("the source model had none to copy (a checkpoint reloaded without it, or a parameter never "
                         "loaded, on meta)")
        elif tuple(t.shape) != tuple(keys[key]):
            left[key] = (f"the source's is {list(t.shape)}, the saved config's {list(keys[key])} (a structural "
                         "prune changed it)")
        elif graph.meta.get("residual_rotated") or "hidden_size" in pruned:
            left[key] = "the residual stream was rotated or sliced, and the source's tensor reads the original one"
        elif pruned.get("layers_kept") and re.match(BLOCK_PATTERN, key):
            left[key] = "blocks were removed and the kept ones renumbered, so a block's source tensor has no place"
        else:
            view.tensors[key] = t.cpu()
            copied.append(key)
    return copied, left


def _unread_record(left: dict[str, str], copied: list[str]) -> dict[str, Any]:
    """The manifest's entries for the tensors the graph never reads: ``copied_from_source`` (written as the source
    has them) and ``not_in_graph`` (not written, which lowbit.load excuses); a warning names the latter."""
    return {"not_in_graph": sorted(left), **({"copied_from_source": sorted(copied)} if copied else {})}


def keep_stored_unread(graph: Graph, stored: set[str] | None = None, unstored: list[str] | None = None) -> None:
    """Forget the recorded unread tensors (``UNREAD_TENSORS``) of a reloaded checkpoint that it did not store: the
    loader made them up (zeros for a meta parameter, transformers' random initialisation), and a later save would
    write them as if they were the source's. ``stored``: the names the checkpoint holds; ``unstored``: the manifest's
    ``not_in_graph``."""
    recorded = (graph.meta.get("source") or {}).get(UNREAD_TENSORS)
    if recorded is None:
        return
    graph.meta["source"][UNREAD_TENSORS] = {k: t for k, t in recorded.items()
                                            if (stored is None or k in stored) and k not in (unstored or [])}


def _warn_unwritten(left: dict[str, str], fmt: str) -> None:
    """Say loudly what ``_copy_unread`` could not write: transformers only warns of missing keys, and the model it
    loads then computes with random tensors (BERT's ``pooler_output``)."""
    if not left:
        return
    names = sorted(left)
    reasons = "; ".join(sorted(set(left.values())))
    more = f" (and {len(names) - 6} more)" if len(names) > 6 else ""
    warnings.warn(f"the {fmt} checkpoint has no {', '.join(names[:6])}{more}, tensors of the HF model its "
                  f"config.json builds: the captured forward never reads them, and {reasons}. transformers "
                  "(AutoModel.from_pretrained) will initialise them at random (BERT's pooler_output is then noise); "
                  "lowbit.load does not read them. Save a compile of the source model to write them as it has them",
                  MissingTensorsWarning, stacklevel=5)  # lowbit.save's caller


# ---- the HF model skeleton ----------------------------------------------------------------------


def _auto_class(kind: str) -> Any:
    from transformers import AutoModel, AutoModelForCausalLM

    return AutoModelForCausalLM if kind == "causal-lm" else AutoModel


def skeleton(config: Any, kind: str, device: str = "meta", dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The HF model ``config`` describes (on ``meta``: shapes only), with the quantization config dropped."""
    cfg = copy.deepcopy(config)
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    with torch.device(device):
        model = _auto_class(kind).from_config(cfg, dtype=dtype, trust_remote_code=False)
    return model.eval()


_HALF = {torch.bfloat16: "bfloat16", torch.float16: "float16"}


def _float_dtype(view: HFView) -> str:
    """The checkpoint's ``dtype``: the one dtype of the graph's float tensors when it is bfloat16/float16, else
    float32. The HF config's own ``dtype`` may name what the model was stored in, not what was compiled; a bf16
    model written as "float32" loaded in float32 in transformers and vLLM, and in lowbit.load (not bit-exact)."""
    dtypes = {t.dtype for t in view.tensors.values() if t.is_floating_point()}
    return _HALF[dtypes.pop()] if len(dtypes) == 1 and next(iter(dtypes)) in _HALF else "float32"


def _hf_keys(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict(keep_vars=True).items()}


def _tied(model: torch.nn.Module) -> tuple[str, str] | None:
    """(output head key, input embedding key) when the HF model ties them."""
    try:
        out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    if out is None or inp is None or out.weight is not inp.weight:
        return None
    names = {id(m): n for n, m in model.named_modules()}
    return f"{names[id(out)]}.weight", f"{names[id(inp)]}.weight"


def _source(graph: Graph) -> tuple[Any, str]:
    src = graph.meta.get("source") or {}
    config = src.get("config")
    if config is None:
        # a lowbit checkpoint of layers pruned differently has no config.json, so its reload has no source: the
        # per-layer sizes are why, and what no config= can fix
        _check_uniform(graph.meta.get("pruned") or {})
        first = graph.inputs[0] if graph.inputs else None
        if first is not None and isinstance(first.type, TensorType) and first.type.dtype.is_floating_point:
            raise CheckpointError(f"the graph reads float input %{first.name} ({first.type}; a vision model's "
                                  "pixel_values?) and records no Hugging Face wrapper: lowbit.load rebuilds an HF "
                                  "checkpoint only as a causal LM (input_ids -> logits) or a text encoder "
                                  "(input_ids, attention_mask -> embeddings); save it with format='lowbit', which "
                                  "keeps the graph as compiled (config= writes the HF files for other loaders)")
        # "compile it with lowbit.compile_model" was the advice even for a graph compile_model made: it records the
        # source only for the modules it wraps, not for an HF model given as is (BertModel, ViTModel)
        captured = graph.meta.get("model_class")
        raise CheckpointError("the graph does not say which Hugging Face model it was captured from (no "
                              "graph.meta['source']; compile_model records it for the models lowbit wraps: a name "
                              "or directory, a causal LM with an lm_head, a lowbit.models.SentenceEmbedder"
                              f"{f'; this graph was captured from {captured}' if captured else ''}): pass "
                              "config=model.config and kind='causal-lm' or 'encoder' (the wrapper lowbit.load "
                              "rebuilds), or save with format='lowbit'")
    return config, src.get("kind", "causal-lm")


def _uniform(what: str, per_block: dict[str, Any], field: str, kept: list[str] | None) -> Any:
    """The one value every (kept) block has, or a CheckpointError listing the per-layer values: an HF config
    holds one number for all layers."""
    if kept is not None:
        per_block = {b: v for b, v in per_block.items() if b in kept}
    values = {json.dumps(v) for v in per_block.values()}
    if len(values) != 1:
        blocks = sorted(per_block, key=lambda b: [int(x) if x.isdigit() else x for x in re.split(r"(\d+)", b)])
        shown = [per_block[b] for b in blocks]
        raise CheckpointError(f"the pruned layers have different {what}: per-layer {field} {shown} (blocks "
                              f"{blocks[0]} ... {blocks[-1]}); an HF config.json holds one number for all layers: "
                              "save with format='lowbit', or prune every layer alike (allocation=uniform, no modules=)")
    return next(iter(per_block.values()))


def _check_uniform(pruned: dict[str, Any]) -> None:
    """The CheckpointError of ``_uniform`` when the prune record holds per-layer MLP widths or head counts."""
    kept = list(pruned["layers_kept"]) if pruned.get("layers_kept") else None
    if "intermediate_size" in pruned:
        _uniform("MLP widths", pruned["intermediate_size"], "intermediate_size", kept)
    if "heads" in pruned:
        _uniform("attention head counts", pruned["heads"], "[num_attention_heads, num_key_value_heads]", kept)


def _derived_head_dim(config: Any, why: str) -> CheckpointError:
    """The refusal of a head-pruned graph whose architecture computes its head size instead of reading it."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return CheckpointError(f"model_type {text.model_type!r} derives head_dim from hidden_size / num_attention_heads "
                           f"(ignoring config.json's head_dim={text.head_dim}), so it cannot hold the pruned "
                           f"{text.num_attention_heads} heads of {text.head_dim} channels: {why}; its HF config cannot "
                           "describe pruned heads; save with format='lowbit'")


def _pruned_skeleton(graph: Graph, config: Any, kind: str) -> torch.nn.Module:
    """``skeleton``, with the constructor's refusal of a head-pruned config (BERT: 'hidden size (384) is not a
    multiple of the number of attention heads (9)', a bare ValueError from inside transformers) said as such."""
    try:
        return skeleton(config, kind)
    except ValueError as exc:
        if "heads" not in (graph.meta.get("pruned") or {}):
            raise
        raise _derived_head_dim(config, f"transformers refuses it ({' '.join(str(exc).split())})") from None


def _check_head_dim(graph: Graph, config: Any, keys: dict[str, tuple[int, ...]]) -> None:
    """Pruned heads keep their ``head_dim``, written into config.json; an architecture that derives it as
    ``hidden_size / num_attention_heads`` (StableLM, Phi, BERT) ignores that, so its attention projections would be
    the wrong size for the checkpoint: say so (the generic shape mismatch did not say why). Every linear is looked
    at by its module path, whatever the family calls its projections (q_proj, query, q_lin), and so is every per-head
    norm (Phi's ``q_layernorm``, sized ``hidden_size / num_attention_heads`` even where the projections read
    ``head_dim``)."""
    if "heads" not in (graph.meta.get("pruned") or {}):
        return
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    want = text.num_attention_heads * text.head_dim
    for node in graph.nodes:
        key = f"{node.module}.weight"
        w = node.args[1] if node.op in ("linear", "rms_norm", "layer_norm") and len(node.args) > 1 else None
        if key not in keys or not isinstance(getattr(w, "type", None), TensorType):
            continue
        shape = tuple(w.type.shape)
        # a fused q/k/v projection (GPT-NeoX's, GPT-2's) holds the heads three times
        if shape != tuple(keys[key]) and ((want in shape or 3 * want in shape) if node.op == "linear" else
                                          shape == (text.head_dim,)):
            raise _derived_head_dim(config, f"{key!r} would be {tuple(keys[key])} instead of the graph's {shape}")


MLP_WIDTH_FIELDS = ("intermediate_size", "ffn_dim", "ffn_hidden_size", "n_inner")
"""Where a family's config holds its MLP width: Llama's and most, OPT's, Falcon's, GPT-2's and GPT-J's (None there
means 4 x hidden_size). Setting ``intermediate_size`` on an OPT config added a field OPT never reads."""
MLP_WIDTH_BY_TYPE = {"distilbert": "hidden_dim"}
"""Families whose MLP width field has a name other configs use for something else (DistilBERT's ``hidden_dim`` is
its FFN width, its stream is ``dim``): looked up by ``model_type``."""


PER_LAYER_FIELDS = ("layer_types", "sliding_window_pattern_list", "no_rope_layers")
"""Config lists with one entry per layer, which a removed block's entry must leave: attention kinds (Gemma 3, Qwen 2,
Ministral), and SmolLM3's ``no_rope_layers`` (1: the layer applies rotary; kept whole, a NoPE layer moved up into a
removed rotary layer's place was saved with rotary)."""


def pruned_config(config: Any, pruned: dict[str, Any] | None) -> tuple[Any, dict[str, str]]:
    """The HF config of a structurally pruned graph (``graph.meta["pruned"]``, written by the prune passes) and
    the module renames it needs: MLP width (``intermediate_size``, or the family's field of ``MLP_WIDTH_FIELDS``),
    attention heads (``num_attention_heads``, ``num_key_value_heads``, with ``head_dim`` kept explicit), a sliced
    residual stream (``hidden_size``) and removed blocks (``num_hidden_layers``; the kept blocks renumbered from 0).
    Widths must be the same in every block: HF configs have one per model."""
    if not pruned:
        return config, {}
    cfg = copy.deepcopy(config)
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    heads0 = getattr(text, "num_attention_heads", None)
    head_dim = getattr(text, "head_dim", None) or (text.hidden_size // heads0 if heads0 else None)
    kept_blocks = list(pruned["layers_kept"]) if pruned.get("layers_kept") else None
    if "intermediate_size" in pruned:
        width = int(_uniform("MLP widths", pruned["intermediate_size"], "intermediate_size", kept_blocks))
        field = MLP_WIDTH_BY_TYPE.get(text.model_type) or next((f for f in MLP_WIDTH_FIELDS if hasattr(text, f)),
                                                               None)
        if field is None:
            raise CheckpointError(f"model_type {text.model_type!r} has no MLP width in its config (none of "
                                  f"{', '.join(MLP_WIDTH_FIELDS)}: it derives the width from hidden_size), so "
                                  f"config.json cannot describe the pruned width {width}; save with format='lowbit'")
        setattr(text, field, width)
    if "heads" in pruned:
        q, kv = _uniform("attention head counts", pruned["heads"], "[num_attention_heads, num_key_value_heads]",
                         kept_blocks)
        text.num_attention_heads, text.num_key_value_heads = int(q), int(kv)
    if "hidden_size" in pruned:
        text.hidden_size = int(pruned["hidden_size"])
    if ("heads" in pruned or "hidden_size" in pruned) and head_dim is not None:
        try:
            text.head_dim = int(head_dim)  # no longer hidden_size / num_attention_heads
        except AttributeError:  # Falcon's head_dim is a property computing it (a raw AttributeError, every format)
            if int(text.head_dim) != int(head_dim):
                raise _derived_head_dim(config, f"its config computes head_dim as {text.head_dim}") from None
    renames: dict[str, str] = {}
    if "layers_kept" in pruned:
        kept = list(pruned["layers_kept"])
        for i, block in enumerate(kept):
            prefix, _, index = block.rpartition(".")
            if not index.isdigit():
                raise CheckpointError(f"pruned block {block!r} is not named <prefix>.<index>; cannot renumber the "
                                      "kept layers for an HF checkpoint (save with format='lowbit')")
            renames[block] = f"{prefix}.{i}"
        keep_index = [int(b.rpartition(".")[2]) for b in kept]
        text.num_hidden_layers = len(kept)
        for name in PER_LAYER_FIELDS:  # per-layer lists follow the kept layers
            per_layer = getattr(text, name, None)
            if isinstance(per_layer, list) and len(per_layer) > len(kept):  # not a config already pruned
                setattr(text, name, [per_layer[i] for i in keep_index])
    try:  # what a loader does with config.json: transformers validates the sizes against each other
        type(cfg).from_dict(cfg.to_dict())
    except Exception as exc:  # noqa: BLE001 - transformers' validators raise several kinds
        why = " ".join(str(exc).split())  # transformers' validation text spans lines
        raise CheckpointError(f"the pruned model's HF config is not one transformers accepts ({why}); save with "
                              "format='lowbit', or prune to sizes the architecture allows") from None
    return cfg, renames


def _renamed(graph: Graph, renames: dict[str, str]) -> Graph:
    """A clone of ``graph`` whose nodes' module paths (and params named after them) follow ``renames``."""
    if not renames:
        return graph
    graph = graph.clone()

    def move(path: str | None) -> str | None:
        if not path:
            return path
        for old, new in renames.items():
            if path == old or path.startswith(old + "."):
                return new + path[len(old):]
        return path

    for node in graph.nodes:
        node.module = move(node.module)
    read = {v.name for n in graph.nodes for v in n.inputs() if v.is_param}
    params = {}
    for name, v in graph.params.items():
        if name in read:  # a removed block's params may linger unread; its index is a kept block's now
            v.name = move(name)
            params[v.name] = v
    graph.params = params
    return graph


_BIAS_SWITCHES = (("mlp_bias", ".mlp."), ("attention_bias", ".self_attn."))
"""Config switches that give a family's MLP / attention linears biases (Llama-style configs)."""


def _bias_switches(graph: Graph, config: Any) -> tuple[Any, Callable[[dict[str, Any]], list[str]]]:
    """Turn on ``mlp_bias``/``attention_bias`` where a pass gave such linears a bias the config has off (prune-mlp's
    and prune-heads' compensation, the OBS refit): the config then declares a bias for every one of them, and the
    returned function lists the bias keys the switch added (written as zeros where the graph has none)."""
    with_bias = {n.module for n in graph.nodes if n.op == "linear" and n.arg(2, "bias") is not None}
    switched = [(flag, part) for flag, part in _BIAS_SWITCHES
                if getattr(config, flag, None) is False and any(part in m for m in with_bias)]
    if not switched:
        return config, lambda keys: []
    config = copy.deepcopy(config)
    for flag, _ in switched:
        setattr(config, flag, True)
    return config, lambda keys: [k for k in keys if k.endswith(".bias") and any(part in k for _, part in switched)]


_ROTARY_CONSTANT = re.compile(r"(^|\.)rotary_emb\.lifted_tensor_\d+$")
"""A constant torch.export lifted out of a rotary embedding's forward: longrope (Phi-3 128k) computes its
long_inv_freq from the config the first time it runs (``transformers.modeling_rope_utils.dynamic_rope_update``)."""


def _zero_heads(config: Any, pruned: dict[str, Any], renames: dict[str, str]) -> ZeroHeads:
    """The head padding of a head-pruned graph written at ``config``'s head counts: each kept block's (renamed)
    kept heads."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    q_heads = int(text.num_attention_heads)
    kv_heads = int(getattr(text, "num_key_value_heads", None) or getattr(text, "num_kv_heads", None) or q_heads)
    head_dim = int(getattr(text, "head_dim", None) or text.hidden_size // q_heads)
    kept = list(pruned["layers_kept"]) if pruned.get("layers_kept") else None
    heads = {renames.get(b, b): (int(v[0]), int(v[1])) for b, v in pruned["heads"].items()
             if kept is None or b in kept}
    return ZeroHeads(heads, q_heads, kv_heads, head_dim, head_interleaved(text))


def _graph_shapes(graph: Graph, keys: dict[str, tuple[int, ...]], zero: ZeroHeads,
                  conv1d: frozenset[str]) -> dict[str, tuple[int, ...]]:
    """``keys`` with the graph's own shapes for the weights and biases of the head-pruned blocks' linears (HF's
    orientation: a Conv1D weight ``[in, out]``), which the view is made with before its zero heads are added."""
    shapes = dict(keys)
    for node in graph.nodes:
        if node.op != "linear" or zero.block(f"{node.module}.weight") is None:
            continue
        for leaf, v in (("weight", node.args[1]), ("bias", node.arg(2, "bias"))):
            key = f"{node.module}.{leaf}"
            if key in keys and isinstance(getattr(v, "type", None), TensorType):
                shape = tuple(int(d) for d in v.type.shape)
                shapes[key] = shape[::-1] if leaf == "weight" and node.module in conv1d else shape
    return shapes


def _config_and_kind(graph: Graph, config: Any, kind: str | None) -> tuple[Any, str]:
    """The HF config and wrapper kind an HF saver writes: those given, else what the graph's capture recorded
    (``_source``), else a causal LM: one rule for the compressed-tensors, GPTQ and float HF savers."""
    if config is None:
        config, recorded_kind = _source(graph)
        kind = kind or recorded_kind
    return config, kind or "causal-lm"


def _prepare(graph: Graph, config: Any, kind: str) -> tuple[HFView, Any]:
    if any(n.op in ("qlinear", "qlinear_q") or n.meta.get("merged") for n in graph.nodes):
        # fused (fuse-qlinear, and the triton backend's merge-linears / fuse-norm-quant): HF formats store each
        # linear's own QDQ weights (merged q/k/v were refused as "no parameter model.layers.0.self_attn.weight")
        from lowbit.ir.fusion import unfuse_qlinear
        from lowbit.ir.merge import unmerge_horizontal
        from lowbit.ir.normquant import unfuse_norm_quant

        graph = graph.clone()
        unfuse_norm_quant(graph)
        unmerge_horizontal(graph)
        unfuse_qlinear(graph)
    pruned = graph.meta.get("pruned") or {}
    zero = None
    try:
        config1, renames = pruned_config(config, pruned)
        graph1 = _renamed(graph, renames)
        config1, added = _bias_switches(graph1, config1)
        model = _pruned_skeleton(graph1, config1, kind)
        keys, experts = _sliced_keys(graph1, model)
        _check_head_dim(graph1, config1, keys)
    except CheckpointError as pruned_error:
        if "heads" not in pruned:
            raise
        # the config cannot hold the pruned head counts (its family derives head_dim, or they differ per layer):
        # the config's own counts, the removed heads written as zero heads (lowbit.checkpoint.zero_heads)
        try:
            config1, renames = pruned_config(config, {k: v for k, v in pruned.items() if k != "heads"})
        except CheckpointError:
            # neither fits (a stream sliced to 448 holds neither the 6 kept heads nor the 9 unpruned ones): the
            # first refusal names the counts the user pruned to, the fallback's only the unpruned ones
            raise pruned_error from None
        graph1 = _renamed(graph, renames)
        config1, added = _bias_switches(graph1, config1)
        model = skeleton(config1, kind)
        keys, experts = _sliced_keys(graph1, model)
        zero = _zero_heads(config1, pruned, renames)
    graph, config = graph1, config1
    derived = {n for n, _ in model.named_buffers()} - set(keys)
    # and the tables a rotary computes from config.json while traced (longrope's long_inv_freq, which torch.export
    # lifts as a constant): no HF parameter holds them, and the loader computes the same from the config
    derived |= {n for n in graph.params if _ROTARY_CONSTANT.search(n)}
    if "hidden_size" in (graph.meta.get("pruned") or {}):
        # a scalar HF recomputes from config.json (Gemma's embedding scale, sqrt(hidden_size)) would follow the
        # sliced width, while the graph keeps the value it was captured with: transformers would run another model
        scalars = sorted(n for n in derived if n in graph.params and graph.params[n].data is not None
                         and graph.params[n].data.dim() == 0)
        if scalars:
            raise CheckpointError(f"the residual stream was sliced to hidden_size={graph.meta['pruned']['hidden_size']}"
                                  f", but the HF model recomputes {', '.join(scalars)} from config.json (a "
                                  f"non-persistent buffer; the graph's is {float(graph.params[scalars[0]].data):g}): "
                                  "a loader would compute it from the sliced size and run another model; save with "
                                  "format='lowbit'")
    # GPT-2's Conv1D stores its weight [in, out]; the graph's linear holds it [out, in] (lowbit.ir.raising)
    conv1d = frozenset(n for n, m in model.named_modules() if type(m).__name__ == "Conv1D")
    if zero is None:
        view = hf_view(graph, keys, derived, conv1d)
    else:
        graph_keys = _graph_shapes(graph, keys, zero, conv1d)
        view = hf_view(graph, graph_keys, derived, conv1d)
        pad_zero_heads(view, keys, graph_keys, zero)
        view.zero_heads = zero_head_report(zero)
    # the switch gives every such linear a bias: the ones the graph lacks are zero, in the checkpoint's float dtype
    # (float32 zeros in a bf16 model made _float_dtype write dtype "float32": transformers loaded it in float32)
    floats = {t.dtype for t in view.tensors.values() if t.is_floating_point()}
    zero_dtype = floats.pop() if len(floats) == 1 else torch.float32
    for key in added(keys):
        if key not in view.tensors:
            view.tensors[key] = torch.zeros(keys[key], dtype=zero_dtype)
    cfg = copy.deepcopy(config)
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    # the class whose parameter names the checkpoint holds, as save_pretrained writes it: a config built in code
    # has none, and vLLM refuses such a config.json while lowbit.load took a causal LM for an encoder
    cfg.architectures = [type(model).__name__]
    tied = _tied(model)
    if tied is not None:
        head, emb = tied
        head_quantized = head.rsplit(".", 1)[0] in view.quantized  # quantized linears are keyed by module
        if emb not in view.tensors and head in view.tensors and not head_quantized:
            view.tensors[emb] = view.tensors[head]  # capture named the shared tensor after the head
        head_t = view.tensors.get(head)
        if head_quantized or (head_t is not None and emb in view.tensors
                                      and not torch.equal(head_t, view.tensors[emb])):
            # a pass changed or quantized the head alone: the checkpoint unties it
            cfg.tie_word_embeddings = False
            if hasattr(cfg, "get_text_config"):
                cfg.get_text_config().tie_word_embeddings = False
        else:
            view.tensors.pop(head, None)
            view.tied_lm_head = True
    missing = [k for k in keys if k not in view.tensors and k.rsplit(".", 1)[0] not in view.quantized
               and not (view.tied_lm_head and tied and k == tied[0])]
    # linears of the HF model the captured forward never runs (BERT's pooler under a sentence embedder): their
    # weights are not in the graph, so they are listed as ignored (left float), and written as the source has them
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    view.float_linears.extend(sorted(m for m in linears - set(view.quantized) - set(view.float_linears)
                                     if any(k.startswith(m + ".") for k in missing)))
    copied, left = _copy_unread(graph, view, keys, missing)
    if experts is not None:
        _refuse_quantized_routers(view, model, linears, experts)
        name_as_checkpoint(view, experts)
    return view, (cfg, left, copied)


def _refuse_quantized_routers(view: HFView, model: torch.nn.Module, linears: set[str], experts: ExpertNames) -> None:
    """A quantized linear of a mixture-of-experts graph that is no ``nn.Linear`` of transformers' model and no
    expert projection: a router (transformers' ``...TopKRouter``, GraniteMoE's ``block_sparse_moe.router``; float
    by default, ``DEFAULT_KEEP_FLOAT``, so quantized on request). transformers quantizes ``nn.Linear`` modules only, and
    loaded its codes as unexpected tensors with the router left at random: refused by name."""
    slices = experts.slice_modules()
    routers = sorted(m for m in view.quantized if m not in linears and m not in slices)
    if routers:
        kind = type(model.get_submodule(routers[0])).__name__
        raise CheckpointError(f"linear {routers[0]!r} (and {len(routers) - 1} more) is quantized, but it is a {kind} "
                              f"in transformers' {type(model).__name__}, no nn.Linear: a loader would not find its "
                              f"codes; keep it float (quantize(..., keep=[*.{routers[0].rsplit('.', 1)[-1]}])) or "
                              "save with format='lowbit'")


def _sliced_keys(graph: Graph, model: torch.nn.Module) -> tuple[dict[str, tuple[int, ...]], ExpertNames | None]:
    """The HF model's keys as the graph names them, and (a mixture-of-experts graph) how the checkpoint names them:
    each fused experts tensor seen as ``DenseExperts``' per-expert slices, which ``name_as_checkpoint`` renames to
    the family's checkpoint names once the view is built."""
    from lowbit.models import DENSE_EXPERT_PARAM

    keys = _hf_keys(model)
    if not any(DENSE_EXPERT_PARAM.match(name) for name in graph.params):
        return keys, None
    experts = expert_names(model, keys)
    return experts.sliced_keys(keys), experts


def _write_shards(tensors: dict[str, torch.Tensor], directory: Path) -> list[str]:
    """``model.safetensors`` or ``model-0000i-of-0000n.safetensors`` + the HF index."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    meta = {"format": "pt"}
    if len(shards) == 1:
        write_safetensors(shards[0], directory / "model.safetensors", meta)
        return ["model.safetensors"]
    files, weight_map = [], {}
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(shard, directory / fname, meta)
        files.append(fname)
        weight_map.update({k: fname for k in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (directory / SAFE_INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                   indent=2) + "\n")
    return files


def _write_config(cfg: Any, directory: Path, quantization_config: dict[str, Any] | None, tokenizer: Any,
                  dtype: str = "float32") -> None:
    """config.json (in ``dtype``, with ``quantization_config``; None: a float model, so any the source config had is
    dropped, or it would load as quantized) and the tokenizer."""
    d = shareable_config(cfg.to_dict())
    d["dtype"] = dtype
    d.pop("torch_dtype", None)
    if quantization_config is None:
        d.pop("quantization_config", None)
    else:
        d["quantization_config"] = quantization_config
    (directory / "config.json").write_text(json.dumps(d, indent=2, sort_keys=True, default=str) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(str(directory))


# ---- compressed-tensors --------------------------------------------------------------------------


def _ct_args(qw: QuantWeight, actorder: str | None) -> dict[str, Any]:
    qd = get_qdtype(qw.qdtype)
    if qd.is_float and qw.qdtype != "fp8e4m3":
        raise CheckpointError(f"linear {qw.module!r}: {qw.qdtype} weights have no compressed-tensors format "
                              "(fp8e4m3 does)")
    args: dict[str, Any] = {
        "num_bits": qd.bits, "type": "float" if qd.is_float else "int", "symmetric": qw.symmetric,
        "strategy": "group" if qw.group else "channel", "group_size": qw.group, "dynamic": False,
    }
    if qw.tile is not None:  # compressed-tensors' block strategy (its FP8_BLOCK preset: [128, 128])
        args.update(strategy="block", block_structure=list(qw.tile))
    if actorder and qw.group and not qd.is_float:
        args["actorder"] = actorder
    return args


def _ct_act_args(a: ActScheme, module: str) -> dict[str, Any]:
    qd = get_qdtype(a.qdtype)
    if qd.is_float and a.qdtype != "fp8e4m3":
        raise CheckpointError(f"linear {module!r}: {a.qdtype} activations have no compressed-tensors format")
    if not qd.is_float and qd.bits != 8:
        raise CheckpointError(f"linear {module!r}: {a.qdtype} activations: compressed-tensors integer activations "
                              "are 8-bit here (int4 activations are not a format runtimes load)")
    if not qd.signed and not qd.is_float:
        raise CheckpointError(f"linear {module!r}: unsigned ({a.qdtype}) activations have no compressed-tensors "
                              "format (its integer activations are signed)")
    return {"num_bits": qd.bits, "type": "float" if qd.is_float else "int", "symmetric": a.symmetric,
            "strategy": a.strategy, "group_size": a.group_size, "dynamic": a.dynamic}


def _ct_format(qw: QuantWeight) -> str:
    qd = get_qdtype(qw.qdtype)
    if qd.is_float:
        return "float-quantized"
    if qw.act is not None and qd.bits == 8:
        return "int-quantized"
    return "pack-quantized"


def _ct_tensors(qw: QuantWeight, fmt: str) -> dict[str, torch.Tensor]:
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    n, k = qw.shape
    scale = (qw.scale if qw.tile is not None else qw.scale.reshape(n, -1)).to(torch.float32)
    out = {"weight_scale": scale}
    q, zp = qw.signed_codes()
    if fmt == "float-quantized":
        out["weight"] = q
    elif fmt == "int-quantized":
        out["weight"] = q
        if zp is not None:
            out["weight_zero_point"] = zp.reshape(n, -1)
    else:
        bits = get_qdtype(qw.qdtype).bits
        out["weight_packed"] = pack_to_int32(q, bits)
        out["weight_shape"] = torch.tensor([n, k], dtype=torch.int64)
        if zp is not None:
            out["weight_zero_point"] = pack_to_int32(zp.reshape(n, -1), bits, packed_dim=0)
    if qw.act_scale is not None:
        out["input_scale"] = qw.act_scale.to(torch.float32)
    return out


def _zero_weights(qw: QuantWeight) -> int:
    """How many weights of a quantized linear are exactly zero: codes equal to their zero point (0 when
    symmetric)."""
    q, zp = qw.signed_codes()
    q = q.to(torch.float32)  # fp8 codes compare as floats
    if zp is not None:
        n, k = qw.shape
        zp = zp.reshape(n, -1).to(torch.float32)
        q = q - zp.repeat_interleave(k // zp.shape[1], dim=1)
    return int((q == 0).sum())


def _ct_sparsity_config(view: HFView) -> dict[str, Any] | None:
    """compressed-tensors' ``sparsity_config`` for the linears ``sparsify`` pruned: the weights stay dense
    (``format: dense``) and ``sparsity_structure`` says the pattern, which is how vLLM tells a 2:4 checkpoint (its
    ``CompressedTensorsConfig._parse_sparsity_config``: targets and ignore select the layers). Without it a 2:4 model
    was written as a plain quantized one. Every linear is targeted and the unpruned ones are ignored by name, so a
    reader's target lookup finds every layer; patterns that differ between linears are declared ``unstructured``
    (true of all of them). ``global_sparsity`` is the share of zeros over all the model's parameters (a tied one counted
    once), as llm-compressor computes it."""
    if not view.sparsity:
        return None
    patterns = set(view.sparsity.values())
    structure = next(iter(patterns)) if len(patterns) == 1 and ":" in next(iter(patterns)) else "unstructured"
    linears = set(view.quantized) | set(view.float_linears)
    floats = [t for t in view.tensors.values() if t.is_floating_point()]
    zeros = sum(int((t == 0).sum()) for t in floats) + sum(_zero_weights(qw) for qw in view.quantized.values())
    total = sum(t.numel() for t in floats) + sum(qw.shape[0] * qw.shape[1] for qw in view.quantized.values())
    sparsity = {"format": "dense", "sparsity_structure": structure, "targets": ["Linear"],
                "ignore": sorted(linears - set(view.sparsity)), "global_sparsity": round(zeros / max(total, 1), 6)}
    from compressed_tensors.config import SparsityCompressionConfig

    try:  # the package's own model validates what we wrote (and vLLM parses it with the same class)
        SparsityCompressionConfig.load_from_registry("dense", **sparsity)
    except Exception as exc:  # noqa: BLE001 - re-raised with context
        raise CheckpointError(f"compressed-tensors rejects the sparsity_config lowbit built ({sparsity}): {exc}") \
            from exc
    return sparsity


def _spilled(tensors: dict[str, torch.Tensor], directory: Path, module: str) -> dict[str, torch.Tensor]:
    """One linear's repacked tensors, moved to a file in the checkpoint's ``directory`` (``lowbit.ir.offload``:
    mapped back, unlinked at once) as soon as they are made.

    Why: a save builds every linear's tensors before writing the file (its header lists them all), so held in the
    heap they were the whole packed checkpoint again, on top of the graph's own packed weights (offloaded or
    not). File pages the kernel can drop are what they cost now; the bytes written are the same."""
    return dict(zip(tensors, map_from_disk(list(tensors.values()), directory, stem=module)))


def _float_advice(graph: Graph) -> str:
    """Where a float graph goes instead (a pruned one is not the module it was captured from, so its source's
    save_pretrained would not hold it)."""
    return "save a float model with format='hf' (a plain transformers directory) or format='lowbit'"


def save_compressed_tensors(graph: Graph, directory: Path, *, tokenizer: Any = None, config: Any = None,
                            kind: str | None = None, actorder: str | None = None) -> dict[str, Any]:
    """Write ``graph`` as a compressed-tensors HF directory into ``directory`` (which exists and is empty)."""
    config, kind = _config_and_kind(graph, config, kind)
    view, (cfg, unwritten, copied) = _prepare(graph, config, kind)
    if view.kv:
        raise CheckpointError(
            f"the graph quantizes the KV cache ({len(view.kv)} key/value quantizers, e.g. %{view.kv[0].name} "
            f"({view.kv[0].op}) in {view.kv[0].module!r}); compressed-tensors' kv_cache_scheme holds one static or "
            "per-head scale per tensor, which lowbit's dynamic per-channel/per-token KV scales are not: save without "
            "kv= / kv-cache, or use format='lowbit'")
    if not view.quantized and not view.sparsity:
        raise CheckpointError("the graph has no quantized linear: nothing for compressed-tensors to describe "
                              f"({_float_advice(graph)})")
    if view.conv1d:
        # its schemes target nn.Linear modules: transformers loaded such a checkpoint with no error and the Conv1D
        # weights left at their random initialisation (their weight_packed tensors unused)
        why_not_gptq = next((f"{m!r}: {why}" for m in view.conv1d
                             if (why := _not_in_gptq(view.quantized[m])) is not None), None)
        # GPTQ was named for any Conv1D model, and GPTQ's refusal of W8A8 named compressed-tensors back
        where = ("format='lowbit' (GPTQ, whose loaders take Conv1D, cannot hold it either: linear "
                 f"{why_not_gptq})" if why_not_gptq else
                 "format='gptq' (symmetric int4/int8 weight-only; its loaders take Conv1D) or format='lowbit'")
        raise CheckpointError(f"linear {view.conv1d[0]!r} (and {len(view.conv1d) - 1} more) is quantized and is a "
                              "Conv1D in the HF model (weight stored [in, out], GPT-2's); compressed-tensors quantizes "
                              f"nn.Linear modules only, so a loader would leave it unloaded: save with {where}")
    _refuse_unloadable_experts(view)
    tensors = dict(view.tensors)
    groups: dict[str, dict[str, Any]] = {}
    members: dict[str, list[str]] = {}
    formats = set()
    for module, qw in view.quantized.items():
        _refuse_partial_groups(qw, module)
        fmt = _ct_format(qw)
        formats.add(fmt)
        scheme = {"weights": _ct_args(qw, actorder), "input_activations":
                  _ct_act_args(qw.act, module) if qw.act is not None else None,
                  "output_activations": None, "format": fmt}
        key = json.dumps(scheme, sort_keys=True)
        groups.setdefault(key, scheme)
        members.setdefault(key, []).append(module)
        for name, t in _spilled(_ct_tensors(qw, fmt), directory, module).items():
            tensors[f"{module}.{name}"] = t
    config_groups = {}
    for i, (key, scheme) in enumerate(groups.items()):
        targets = ["Linear"] if len(groups) == 1 else [f"re:^{m.replace('.', '[.]')}$" for m in members[key]]
        config_groups[f"group_{i}"] = {**scheme, "targets": targets}
    qcfg: dict[str, Any] = {
        "quant_method": "compressed-tensors",
        # a float sparsify'd graph: dense float weights, no config_groups, only the sparsity_config below (how
        # llm-compressor writes a sparse-only model; transformers loads it as the plain model, vLLM reads the pattern)
        "format": formats.pop() if len(formats) == 1 else "mixed-precision" if formats else "dense",
        "quantization_status": "compressed",
        "config_groups": config_groups,
        # a sparse-only checkpoint ignores nothing: vLLM runs a linear its quantization ignore names unquantized
        # and dense, before it looks at the sparsity_config
        "ignore": sorted(view.float_linears) if view.quantized else [],
        "kv_cache_scheme": None,
    }
    sparsity = _ct_sparsity_config(view)
    if sparsity is not None:
        qcfg["sparsity_config"] = sparsity
    from compressed_tensors.quantization import QuantizationConfig

    try:  # the package's own model validates what we wrote
        QuantizationConfig.model_validate(qcfg)
    except Exception as exc:  # noqa: BLE001 - re-raised with context
        raise CheckpointError(f"compressed-tensors rejects the quantization_config lowbit built: {exc}") from exc
    return _write_quantized(view, tensors, directory, qcfg, tokenizer, cfg=cfg, unwritten=unwritten, copied=copied,
                            fmt="compressed-tensors", kind=kind)


def _refuse_partial_groups(qw: QuantWeight, module: str) -> None:
    """compressed-tensors' dynamic group quantization reshapes each token into whole groups (its
    ``_process_group`` raises 'tensor column shape must be divisble by the given group_size'), so activation groups
    that end in a partial one (fp8-block128 on a K no tile divides: SmolLM2's 576) have no loadable form."""
    k = qw.shape[1]
    if qw.act is not None and qw.act.group_size and k % qw.act.group_size:
        raise CheckpointError(f"linear {module!r}: input activations in groups of {qw.act.group_size} over K={k} end "
                              "in a partial group; compressed-tensors' group quantization takes whole groups only "
                              "(its loaders raise 'tensor column shape must be divisble by the given group_size'): "
                              "save with format='lowbit', or quantize a model whose input sizes the group divides")


def _refuse_unloadable_experts(view: HFView) -> None:
    """transformers 5.25 has no module for a mixture-of-experts projection: it loads a compressed-tensors
    checkpoint's experts by dequantizing each one's weight (``CompressedTensorsDequantize``: ``weight_packed`` with
    its scale and shape, or an fp8 ``weight`` times its scale) in the one scheme it finds for experts
    (``get_experts_scheme``), and merging them into its fused expert tensors. Measured there on a tiny Mixtral: an
    asymmetric expert failed ('Asymmetric quant requires zero-point values': the zero point is not collected), a
    W8A8 one and a float one too (their ``weight`` is not kept: 'Concatenate ... Ckpt contains: 0'); quantized
    inputs of an expert would run in float anyway, and experts of two schemes would be unpacked as one. Refused by
    name, before anything is written."""
    quantized = {m: view.quantized[m] for m in view.experts if m in view.quantized}
    schemes: dict[tuple[Any, ...], list[str]] = {}
    for m, qw in quantized.items():
        schemes.setdefault((qw.qdtype, qw.group, qw.tile, qw.symmetric), []).append(m)
    checks = (
        ("is float (kept float, or not quantized)", [m for m in view.experts if m not in quantized]),
        ("quantizes its input activations", [m for m, qw in quantized.items() if qw.act is not None]),
        ("has asymmetric weights (zero points)", [m for m, qw in quantized.items() if not qw.symmetric]),
        (f"is quantized in another scheme than others ({', '.join(map(str, schemes))})",
         [ms[0] for ms in list(schemes.values())[1:]]),
    )
    for why, bad in checks:
        if bad:
            raise CheckpointError(f"expert projection {bad[0]!r} (and {len(bad) - 1} more) {why}: transformers "
                                  "loads a compressed-tensors mixture-of-experts checkpoint by dequantizing every "
                                  "expert's weight, in one scheme, into its fused expert tensors, from the packed "
                                  "codes, scale and shape only (or fp8 weights and scale), so it would not load or "
                                  "would run other numerics; quantize every expert weight-only and symmetric in one "
                                  "scheme, or save with format='lowbit' (a float graph: format='hf')")


def _write_quantized(view: HFView, tensors: dict[str, torch.Tensor], directory: Path, qcfg: dict[str, Any],
                     tokenizer: Any, *, cfg: Any, unwritten: dict[str, str], copied: list[str], fmt: str,
                     kind: str) -> dict[str, Any]:
    """Write a quantized HF format's shards, config.json (``qcfg`` its quantization_config) and tokenizer, warn of
    the tensors left unwritten, and return its manifest: what compressed-tensors and GPTQ write and record alike."""
    files = _write_shards(tensors, directory)
    _write_config(cfg, directory, qcfg, tokenizer, _float_dtype(view))
    _warn_unwritten(unwritten, fmt)
    return {"format": fmt, "kind": kind, "shards": files, "quantized_linears": len(view.quantized),
            "float_linears": sorted(view.float_linears), **_unread_record(unwritten, copied),
            "lowbit_qdtypes": {m: qw.qdtype for m, qw in view.quantized.items()},
            **({"zero_heads": view.zero_heads} if view.zero_heads else {})}


# ---- float (plain transformers) ---------------------------------------------------------------


def save_hf_float(graph: Graph, directory: Path, *, tokenizer: Any = None, config: Any = None,
                  kind: str | None = None) -> dict[str, Any]:
    """Write a float ``graph`` as a plain transformers directory (no ``quantization_config``): the form of a
    structurally pruned, sliced or rotated float model, which is no longer the module it was captured from, so the
    source's ``save_pretrained`` cannot write it. A quantized graph is refused (its HF forms are
    compressed-tensors and GPTQ)."""
    config, kind = _config_and_kind(graph, config, kind)
    view, (cfg, unwritten, copied) = _prepare(graph, config, kind)
    if view.quantized or view.kv:
        what = (f"{len(view.quantized)} quantized linears (e.g. {next(iter(view.quantized))!r})" if view.quantized
                else f"a quantized KV cache (%{view.kv[0].name})")
        raise CheckpointError(f"format='hf' writes float weights, but the graph has {what}: save it with "
                              "format='compressed-tensors' or 'gptq'")
    files = _write_shards(dict(view.tensors), directory)
    _write_config(cfg, directory, None, tokenizer, _float_dtype(view))
    _warn_unwritten(unwritten, "hf")
    # config.json has no field for a sparsify pattern: the manifest keeps it, so lowbit.load marks those linears
    # again (a reload was unmarked: its compressed-tensors save was refused, the 2:4 backends were not told)
    return {"format": "hf", "kind": kind, "shards": files, **_unread_record(unwritten, copied),
            **({"zero_heads": view.zero_heads} if view.zero_heads else {}),
            **({"sparsity": dict(sorted(view.sparsity.items()))} if view.sparsity else {})}


# ---- gptq ---------------------------------------------------------------------------------------


def _pack_rows(u: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes ``[R, C]`` packed ``32/bits`` rows per int32 (value ``i`` of a word at bits ``i·b``)."""
    per = 32 // bits
    r, c = u.shape
    u = u.to(torch.int64).reshape(r // per, per, c)
    shifts = (torch.arange(per, dtype=torch.int64) * bits).reshape(1, per, 1)
    word = (u << shifts).sum(1)
    return (word - ((word >> 31) << 32)).to(torch.int32)  # two's complement into int32


def _unpack_rows(p: torch.Tensor, bits: int) -> torch.Tensor:
    per = 32 // bits
    w = p.to(torch.int64) & 0xFFFFFFFF
    shifts = (torch.arange(per, dtype=torch.int64) * bits).reshape(1, per, 1)
    u = (w.unsqueeze(1) >> shifts) & ((1 << bits) - 1)
    return u.reshape(p.shape[0] * per, p.shape[1])


def save_gptq(graph: Graph, directory: Path, *, tokenizer: Any = None, config: Any = None,
              kind: str | None = None) -> dict[str, Any]:
    """Write ``graph`` in the HF GPTQ layout (symmetric int4/int8 weight-only linears)."""
    config, kind = _config_and_kind(graph, config, kind)
    view, (cfg, unwritten, copied) = _prepare(graph, config, kind)
    if view.kv:
        raise CheckpointError(f"the graph quantizes the KV cache (%{view.kv[0].name} ({view.kv[0].op}) in "
                              f"{view.kv[0].module!r}); the GPTQ format has no KV "
                              "scheme: use format='lowbit'")
    if not view.quantized:
        raise CheckpointError(f"the graph has no quantized linear: nothing to write in GPTQ format "
                              f"({_float_advice(graph)})")
    tensors = dict(view.tensors)
    bits_seen, groups_seen = set(), set()
    for module, qw in view.quantized.items():
        why = _not_in_gptq(qw)
        if why is not None:
            # compressed-tensors holds every such scheme but not a Conv1D (GPT-2's): its own refusal named GPTQ back
            other = "use format='lowbit' (compressed-tensors quantizes nn.Linear modules only, and this is a Conv1D)" \
                if module in view.conv1d else "use format='compressed-tensors'"
            raise CheckpointError(f"linear {module!r}: {why}; {other}")
        qd = get_qdtype(qw.qdtype)
        n, k = qw.shape
        g = qw.group or k
        bits = qd.bits
        bits_seen.add(bits)
        groups_seen.add(qw.group or -1)
        off = 1 << (bits - 1)
        signed, _ = qw.signed_codes()
        u = (signed.to(torch.int16) + off).t().contiguous()  # [K, N] unsigned
        if k % (32 // bits) or n % (32 // bits):
            raise CheckpointError(f"linear {module!r}: [{n}, {k}] is not a multiple of {32 // bits} on both sides, "
                                  "which GPTQ's int32 packing needs")
        n_groups = k // g
        zeros = torch.full((n_groups, n), off - 1, dtype=torch.int64)  # v1 format stores zero - 1
        mine = {"qweight": _pack_rows(u, bits),
                "qzeros": _pack_rows(zeros.t().contiguous(), bits).t().contiguous(),
                "scales": qw.scale.reshape(n, -1).t().contiguous().to(torch.float32),
                "g_idx": torch.arange(k, dtype=torch.int32) // g}
        del u, signed
        for name, t in _spilled(mine, directory, module).items():
            tensors[f"{module}.{name}"] = t
    if len(bits_seen) > 1 or len(groups_seen) > 1:
        raise CheckpointError(f"the GPTQ format has one bit width and group size per model; the graph mixes bits "
                              f"{sorted(bits_seen)} and groups {sorted(groups_seen)}: use compressed-tensors")
    qcfg = {"quant_method": "gptq", "bits": bits_seen.pop(), "group_size": groups_seen.pop(), "desc_act": False,
            "sym": True, "checkpoint_format": "gptq", "true_sequential": True, "damp_percent": 0.01,
            "modules_in_block_to_quantize": _gptq_block_modules(view)}
    return {**_write_quantized(view, tensors, directory, qcfg, tokenizer, cfg=cfg, unwritten=unwritten,
                               copied=copied, fmt="gptq", kind=kind),
            # GPTQ's config has no sparsity field: the manifest keeps the pattern, as format 'hf' does (a reload of a
            # 2:4 model saved as GPTQ was unmarked, so the 2:4 backends and a later save did not know it)
            **({"sparsity": dict(sorted(view.sparsity.items()))} if view.sparsity else {})}


def _not_in_gptq(qw: Any) -> str | None:
    """Why the GPTQ layout cannot hold quantized linear ``qw`` (symmetric int4/int8 weight-only), or None."""
    qd = get_qdtype(qw.qdtype)
    if qd.is_float or qd.bits not in (4, 8):
        return f"{qw.qdtype} weights; the GPTQ format holds int4/int8 only"
    if not qw.symmetric:
        return ("asymmetric weights (zero points); lowbit writes GPTQ symmetric only, which runtimes' fast kernels "
                "assume (quantize with sym=true)")
    if qw.act is not None:
        return f"quantized input activations ({qw.act.qdtype}); the GPTQ format is weight-only"
    if qw.tile is not None:
        return f"weight scales in {list(qw.tile)} tiles; GPTQ's are per output channel or input group"
    return None


def _gptq_block_modules(view: HFView) -> list[list[str]] | None:
    """``modules_in_block_to_quantize``: GPTQ loaders (transformers + optimum) turn every linear of the decoder
    blocks into a quantized one and no other, so a float linear in a block must be left out by name (it loaded as
    a missing qweight) and a quantized one outside the blocks (``head=``) cannot be expressed (its float weight
    was missing). None when every block linear is quantized."""
    blocks: dict[str, tuple[str, str]] = {}  # module -> (block, name within the block)
    for module in [*view.quantized, *view.float_linears]:
        m = re.match(r"(.+?\.\d+)\.(.+)$", module)  # the first numbered level: the decoder block
        if m:
            blocks[module] = (m.group(1), m.group(2))
    outside = sorted(m for m in view.quantized if m not in blocks)
    if outside:
        raise CheckpointError(f"linear {outside[0]!r} is quantized but is not in a decoder block; HF GPTQ loaders "
                              "quantize the blocks' linears only and would load it with its float weight missing: "
                              "keep it float (no head=), or use format='compressed-tensors'")
    floats = {m for m in view.float_linears if m in blocks}
    if not floats:
        return None
    per_block: dict[str, set[str]] = {}
    for module, (block, name) in blocks.items():
        per_block.setdefault(block, set())
        if module in view.quantized:
            per_block[block].add(name)
    kinds = {tuple(sorted(v)) for v in per_block.values()}
    if len(kinds) != 1:
        raise CheckpointError(f"the blocks quantize different linears (e.g. {sorted(floats)[0]!r} is float); the GPTQ "
                              "format's modules_in_block_to_quantize names one set for every block: use "
                              "compressed-tensors")
    return [list(next(iter(kinds)))]


# ---- reading -----------------------------------------------------------------------------------


def _read_weights(directory: Path, manifest: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
    index = directory / SAFE_INDEX
    if index.is_file():
        check_listed(directory, manifest, SAFE_INDEX)
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: has no 'weight_map'")
        for name, f in weight_map.items():  # shard files beside the index only, as the manifest's files are
            why = None if not isinstance(f, str) or Path(f).name != f else unopenable(directory / f)
            if not isinstance(f, str) or Path(f).name != f or f in ("", ".", "..") or why:
                shown = f"{f[:80]!r}..." if why and len(f) > 80 else repr(f)
                raise CheckpointError(f"{index}: 'weight_map' puts tensor {name!r} in {shown}, which is not a file "
                                      "name in the checkpoint directory" + (f" ({why})" if why else ""))
        files = sorted(set(weight_map.values()))
        out: dict[str, torch.Tensor] = {}
        for f in files:
            if not (directory / f).is_file():
                names = [k for k, v in weight_map.items() if v == f]
                raise CheckpointError(f"{directory}: shard {f!r} is missing ({len(names)} tensors, e.g. "
                                      f"{names[0]!r}, are listed in it by {SAFE_INDEX})")
            check_listed(directory, manifest, f)
            part = read_safetensors(directory / f)
            for name, where in weight_map.items():
                if where == f and name not in part:
                    raise CheckpointError(f"{directory / f}: tensor {name!r} listed in {SAFE_INDEX} is not in it")
            out.update(part)
        return out
    single = directory / "model.safetensors"
    if not single.is_file():
        if list(directory.glob("*.bin")) or list(directory.glob("*.pt")):
            raise CheckpointError(f"{directory}: has only pickle weights (.bin/.pt); lowbit reads safetensors only "
                                  "(pickle can run code)")
        raise CheckpointError(f"{directory}: no model.safetensors and no {SAFE_INDEX}")
    check_listed(directory, manifest, single.name)
    return read_safetensors(single)


def _need(tensors: dict[str, torch.Tensor], name: str, directory: Path) -> torch.Tensor:
    t = tensors.get(name)
    if t is None:
        raise CheckpointError(f"{directory}: tensor {name!r} is missing from the checkpoint's safetensors")
    return t


def _tensor_file(directory: Path, name: str) -> Path:
    """The safetensors file holding tensor ``name`` (the index's shard, else model.safetensors), for messages."""
    index = directory / SAFE_INDEX
    if index.is_file():
        try:
            return directory / str(json.loads(index.read_text())["weight_map"][name])
        except (OSError, ValueError, KeyError, TypeError):
            pass
    return directory / "model.safetensors"


def _check_tensor(tensors: dict[str, torch.Tensor], name: str, directory: Path, shapes: list[list[int]],
                  dtypes: tuple[torch.dtype, ...] | None, why: str) -> torch.Tensor:
    """Tensor ``name``, refused unless its shape is one of ``shapes`` and its dtype one of ``dtypes`` (None: any):
    config.json and the tensors are separate files, and a false ``num_bits`` or ``group_size`` unpacked 4-bit
    data as 3-bit (garbage) or crashed in a reshape."""
    t = _need(tensors, name, directory)
    if (dtypes is not None and t.dtype not in dtypes) or list(t.shape) not in shapes:
        want = " or ".join(str(d).removeprefix("torch.") for d in dtypes) if dtypes else "shape"
        got = f"{str(t.dtype).removeprefix('torch.')} {list(t.shape)}"
        raise CheckpointError(f"{_tensor_file(directory, name)}: tensor {name!r} is {got}, but {why} needs {want} "
                              f"{' or '.join(str(x) for x in shapes)}")
    return t


def _lowbit_qdtype(bits: int, symmetric: bool, is_float: bool, hint: str | None, where: str) -> str:
    """The lowbit qdtype of a stored integer or float scheme; ``hint`` is the manifest's record of what lowbit wrote
    (uint4 round-trips as uint4), used only where config.json's scheme can be it: "fp8e4m3" for int8 codes loaded
    them as fp8 (another model), "uint4" for symmetric ones or an unknown name were raw pydantic/ValueErrors."""
    from lowbit.ir.quant import QDTYPES

    if is_float:
        return "fp8e4m3"
    qd = QDTYPES.get(hint) if hint is not None else None
    if hint is not None and (qd is None or (qd.bits == bits and (qd.is_float or (symmetric and not qd.signed)))):
        raise CheckpointError(f"{where}: gives {hint!r}, which config.json's {bits}-bit "
                              f"{'symmetric' if symmetric else 'asymmetric'} integer scheme cannot be")
    if qd is not None and qd.bits == bits:  # another width: config.json (checked against the tensors) decides
        return hint
    if bits not in (2, 3, 4, 8):
        raise CheckpointError(f"{bits}-bit integer weights: lowbit has int2/int3/int4/int8")
    return f"int{bits}"


def _from_signed(q: torch.Tensor, zp: torch.Tensor | None, qdtype: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    qd = get_qdtype(qdtype)
    if qd.is_float:
        return q, None
    off = 0 if qd.signed else 1 << (qd.bits - 1)
    cont = qd.container
    q2 = (q.to(torch.int16) + off).to(cont)
    z2 = None if zp is None else (zp.to(torch.int16) + off).to(cont)
    return q2, z2


def _ct_scheme_of(module: str, groups: dict[str, Any], ignore: list[str]) -> Any:
    from compressed_tensors.utils.match import match_name

    if any(match_name(module, i) for i in ignore):
        return None
    for scheme in groups.values():
        if any(t == "Linear" or match_name(module, t) for t in scheme.targets):
            return scheme
    return None


def load_hf_checkpoint(directory: Path, manifest: dict[str, Any] | None, generation: Any = None
                       ) -> tuple[Graph, Any, str]:
    """(graph with QDQ weights and activations, tokenizer or None, kind) from a compressed-tensors/GPTQ directory;
    with ``generation`` the graph is the generation step (``compile_model(..., generation=)``'s capture)."""
    from lowbit.ir.qscheme import ModuleRule, QScheme, QuantConfig
    from lowbit.models import config_dtype  # the float dtype _float_dtype wrote (float32 where none)
    from lowbit.passes.insert_qdq import quantize_graph

    cfg_path = directory / "config.json"
    check_listed(directory, manifest, cfg_path.name)
    raw = read_json(cfg_path)
    qcfg = raw.get("quantization_config")
    if not isinstance(qcfg, dict):
        if (directory / "quantize_config.json").is_file():  # was "a float HF model": compiling it found no weights
            raise CheckpointError(f"{cfg_path}: no quantization_config, but quantize_config.json is beside it (an "
                                  "older AutoGPTQ layout); lowbit, like transformers, reads the GPTQ settings from "
                                  "config.json's quantization_config: copy them there (with quant_method 'gptq')")
        raise CheckpointError(f"{cfg_path}: no quantization_config (a float HF model: load it with "
                              "lowbit.compile_model instead)")
    method = qcfg.get("quant_method")
    if method not in ("compressed-tensors", "gptq"):
        raise CheckpointError(f"{cfg_path}: quantization_config.quant_method {method!r} is not one lowbit reads "
                              "(compressed-tensors, gptq)")
    config = read_config(directory)
    lb = (manifest or {}).get("lowbit", {})
    kind = lb.get("kind") or ("causal-lm" if any(a.endswith(("ForCausalLM", "LMHeadModel"))
                                                 for a in (config.architectures or [])) else "encoder")
    hints = lb.get("lowbit_qdtypes", {})
    tensors = _read_weights(directory, manifest)
    positions = getattr(config, "max_position_embeddings", None)
    if isinstance(positions, int) and not isinstance(positions, bool) and positions < 2:  # torch.export's assert
        raise CheckpointError(f"{cfg_path}: max_position_embeddings {positions}; lowbit captures sequences of at "
                              "least 2 tokens")
    # on meta first: config.json's sizes are checked against the stored tensors before anything is allocated (a
    # crafted vocab_size of 1e9 allocated 256 GB: a raw RuntimeError at best, the OOM killer at worst)
    try:
        model = skeleton(config, kind, dtype=config_dtype(raw))
    except Exception as exc:  # noqa: BLE001 - a field transformers reads only while building (hidden_act: KeyError)
        why = " ".join(str(exc).split())[:300]
        raise CheckpointError(f"{cfg_path}: transformers cannot build the model this config describes "
                              f"({type(exc).__name__}: {why})") from None
    names = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    experts = _load_expert_names(model)
    slices = experts.slice_modules() if experts is not None else {}  # each expert projection's [out, in]
    # a linear's name in config.json's targets and ignore (the graph's, but an expert's or a renamed router's)
    checkpoint_module: Callable[[str], str] = experts.module_to_checkpoint if experts is not None else str
    if experts is not None:  # the experts' linears as the graph's DenseExperts names them, and their tensors too
        # a family whose checkpoints keep the experts fused (GraniteMoE) has float experts only: no linear to plan
        names |= {m for m in slices if f"{m}.weight" in experts.to_checkpoint}
        tensors = experts.graph_named(tensors)
        hints = {m: hints[checkpoint_module(m)] for m in names if checkpoint_module(m) in hints}
    # GPT-2's Conv1D (weight [in, out]): GPTQ stores its codes as a Linear's (GPTQ loaders build the quantized layer
    # with in = weight.shape[0]); compressed-tensors targets nn.Linear only, so its reader skips them
    conv1d = {n for n, m in model.named_modules() if type(m).__name__ == "Conv1D"} if method == "gptq" else set()

    def linear_shape(module: str) -> tuple[int, ...]:
        """The module's weight as ``[out, in]``, whatever its storage (an expert projection: its slice's)."""
        if module in slices:
            return slices[module]
        shape = tuple(model.get_submodule(module).weight.shape)
        return shape[::-1] if module in conv1d else shape

    # decide, per linear, whether it is quantized and how
    plan: dict[str, tuple[QScheme, QScheme | None, torch.Tensor, torch.Tensor, torch.Tensor | None]] = {}
    if method == "compressed-tensors":
        from compressed_tensors.quantization import QuantizationConfig

        try:
            parsed = QuantizationConfig.model_validate(qcfg)
        except Exception as exc:  # noqa: BLE001
            raise CheckpointError(f"{cfg_path}: quantization_config is not valid compressed-tensors: {exc}") from None
        if parsed.kv_cache_scheme is not None:
            raise CheckpointError(f"{cfg_path}: kv_cache_scheme is set; lowbit reads compressed-tensors checkpoints "
                                  "with a float KV cache only")
        _refuse_unread_ct_fields(qcfg, cfg_path)
        for module in sorted(names):
            scheme = _ct_scheme_of(checkpoint_module(module), parsed.config_groups, parsed.ignore or [])
            if scheme is None or scheme.weights is None:
                continue
            plan[module] = _ct_linear(module, scheme, parsed.format, tensors, directory, hints.get(module),
                                      linear_shape(module))
    else:
        bits, group, zero_offset = _gptq_config(qcfg, cfg_path)
        for module in sorted(names | conv1d):
            if any(f"{module}.{s}" in tensors for s in _GPTQ_TENSORS):
                plan[module] = _gptq_linear(module, bits, group, zero_offset, tensors, directory,
                                            linear_shape(module))
    sparse_only = method == "compressed-tensors" and not qcfg.get("config_groups") and \
        isinstance(qcfg.get("sparsity_config"), dict)
    if not plan and not sparse_only:  # a sparse-only checkpoint (a float 2:4 model) has float weights throughout
        raise CheckpointError(f"{directory}: the quantization_config matches no linear of "
                              f"{type(model).__name__}")
    float_state = {}
    quant_suffixes = (".weight_packed", ".weight_scale", ".weight_zero_point", ".weight_shape", ".input_scale",
                      ".qweight", ".qzeros", ".scales", ".g_idx")
    for name, t in tensors.items():
        mod = name.rsplit(".", 1)[0]
        if mod in plan and (name.endswith(quant_suffixes) or name == f"{mod}.weight"):
            continue
        float_state[name] = t
    # placeholders: the real codes replace the RTN of these zeros below
    placeholders = {f"{module}.weight": model.get_submodule(module).weight.shape for module in plan
                    if module not in slices}
    if experts is not None:
        experts.fused_state(float_state, set(plan), placeholders)
    own = model.state_dict()
    for name, t in float_state.items():
        if name in own and own[name].shape != t.shape:
            raise CheckpointError(f"{_tensor_file(directory, name)}: tensor {name!r} is {list(t.shape)}, but "
                                  f"{type(model).__name__} built from config.json has {list(own[name].shape)} "
                                  "(config.json and the weights disagree)")
    unexpected = [k for k in float_state if k not in own]
    if unexpected:
        raise CheckpointError(f"{directory}: tensors {unexpected[:4]} are not parameters of "
                              f"{type(model).__name__} built from config.json")
    unused = set((manifest or {}).get("lowbit", {}).get("not_in_graph", []))  # never read by the captured forward
    missing = [k for k in own if k not in float_state and k not in placeholders and not _is_tied_key(model, k)
               and k not in unused]
    if missing:
        raise CheckpointError(f"{directory}: the checkpoint has no tensor {missing[0]!r} (and {len(missing) - 1} "
                              "more) that the model built from config.json needs")
    model = _assigned_model(config, kind, config_dtype(raw), float_state, placeholders)
    stored = set(float_state)
    del float_state
    graph, tokenizer = _capture(model, kind, directory, generation)
    keep_stored_unread(graph, stored)
    # static input scales are stored, not calibrated: the quantize pass gets the weights (and dynamic inputs) only
    rules = [ModuleRule(pattern=_glob_escape(m), weight=p[0], input=p[1] if p[1] is None or p[1].dynamic else None)
             for m, p in plan.items()]
    if plan:
        done: set[str] = set()
        forms: dict[str, Any] = {}
        quantize_graph(graph, QuantConfig(rules=rules, keep_float=[]),
                       weight_codes=lambda node, scheme, group: _stored_codes(node, scheme, group, plan, directory,
                                                                              done, forms))
        left = set(plan) - done
        if left:
            raise CheckpointError(f"{directory}: quantized linears {sorted(left)[:3]} were not found in the captured "
                                  "graph")
    _install_static_inputs(graph, {m: (p[1], _ct_input_scale(m, tensors, directory)) for m, p in plan.items()
                                   if p[1] is not None and not p[1].dynamic})
    if method == "compressed-tensors":
        _mark_sparsity(graph, qcfg.get("sparsity_config"))
    else:  # lowbit's GPTQ save records the pattern in its manifest
        mark_recorded_sparsity(graph, (manifest or {}).get("lowbit", {}).get("sparsity"))
    graph.meta["loaded_format"] = method  # what generate() names when asked for a step graph this is not
    if generation and graph.meta["generation"]["logits"] == "last":  # as compile_model's plan adds it
        from lowbit.passes.last_logits import LastLogits
        from lowbit.passes.manager import PassManager

        PassManager([LastLogits()]).run(graph)
    return graph, tokenizer, kind


def _mark_sparsity(graph: Graph, sparsity: Any) -> None:
    """The N:M pattern a compressed-tensors ``sparsity_config`` declares (``sparsity_structure: 2:4``) as each of its
    targeted linears' ``node.meta["sparsity"]``, the mark ``sparsify`` leaves: a reload of a 2:4 checkpoint was
    unmarked, so its save declared no sparsity and the 2:4 backends and a later gptq did not know the pattern. The
    mark only names linears to check: the backends verify the weights themselves."""
    structure = sparsity.get("sparsity_structure") if isinstance(sparsity, dict) else None
    if not isinstance(structure, str) or not re.fullmatch(r"\d{1,4}:\d{1,4}", structure):
        return
    from compressed_tensors.utils.match import match_name

    targets, ignore = sparsity.get("targets") or [], sparsity.get("ignore") or []
    for node in graph.nodes:
        if node.op == "linear" and node.module and not any(match_name(node.module, i) for i in ignore) and \
                any(t == "Linear" or match_name(node.module, t) for t in targets):
            node.meta["sparsity"] = structure


def mark_recorded_sparsity(graph: Graph, sparsity: Any) -> None:
    """A manifest's record of the linears ``sparsify`` pruned (module -> ``2:4``; formats whose config has no field
    for it: ``hf``, ``gptq``) marked again as ``sparsify`` marks them (a later save reads them; the 2:4 backends
    check the weights themselves). Anything but a dict of known patterns marks nothing."""
    if not isinstance(sparsity, dict):
        return
    from lowbit.ir.parser import SPARSITY_MARK

    for node in graph.nodes:
        pattern = sparsity.get(node.module) if node.op == "linear" else None
        if isinstance(pattern, str) and SPARSITY_MARK.fullmatch(pattern):
            node.meta["sparsity"] = pattern


def _load_expert_names(model: torch.nn.Module) -> ExpertNames | None:
    """How the checkpoint names ``model``'s tensors, where it has fused experts that ``DenseExperts`` slices at
    capture (``lowbit.checkpoint.experts``); None for any other model."""
    from lowbit.models import DENSE_EXPERT_MODEL_TYPES

    if getattr(model.config, "model_type", None) not in DENSE_EXPERT_MODEL_TYPES:
        return None
    experts = expert_names(model, _hf_keys(model))
    return experts if experts.fused else None


def _refuse_unread_ct_fields(qcfg: dict[str, Any], cfg_path: Path) -> None:
    """A compressed-tensors ``transform_config`` (online Hadamard/rotation transforms vLLM applies at run time) or a
    ``sparsity_config`` in a compressed sparse format changes what the stored tensors compute; both were ignored, so
    such a checkpoint loaded as another model without a word."""
    transform = qcfg.get("transform_config")
    if transform:
        groups = transform.get("config_groups") if isinstance(transform, dict) else None
        shown = f" (groups {', '.join(map(str, groups))})" if isinstance(groups, dict) and groups else ""
        raise CheckpointError(f"{cfg_path}: quantization_config.transform_config{shown} asks for transforms "
                              "(rotations) applied at run time, which lowbit does not read; loading the weights "
                              "without them would run another model")
    sparsity = qcfg.get("sparsity_config")
    if sparsity and not (isinstance(sparsity, dict) and sparsity.get("format") in (None, "dense")):
        fmt = sparsity.get("format") if isinstance(sparsity, dict) else sparsity
        raise CheckpointError(f"{cfg_path}: quantization_config.sparsity_config has format {fmt!r}; lowbit reads "
                              "dense weights only (sparsity format 'dense' or none)")


def _assigned_model(config: Any, kind: str, dtype: torch.dtype, float_state: dict[str, torch.Tensor],
                    placeholders: dict[str, torch.Size]) -> torch.nn.Module:
    """The HF model with the checkpoint's float tensors *as* its parameters (memory-mapped: nothing is copied unless
    a dtype differs) and a zero-strided placeholder, which holds no memory, for each quantized weight (the codes
    replace it after capture). A model larger than the memory left loads as its codes plus what the page cache
    holds: building it on the CPU first allocated every weight in float and the placeholders in float32."""
    from accelerate import init_empty_weights

    # built on the CPU with each parameter on meta (no memory, no initialisation) and the buffers real: non-persistent
    # buffers (rotary inv_freq, position ids) are computed at construction and are in no checkpoint
    with init_empty_weights(include_buffers=False):
        model = skeleton(config, kind, device="cpu", dtype=dtype)
    own = model.state_dict(keep_vars=True)
    state = {k: t if t.dtype == own[k].dtype else t.to(own[k].dtype) for k, t in float_state.items()}
    state.update({k: torch.zeros((), dtype=own[k].dtype).expand(shape) for k, shape in placeholders.items()})
    model.load_state_dict(state, strict=False, assign=True)
    if hasattr(model, "tie_weights"):  # a tied head still holds the meta parameter the embedding had
        model.tie_weights()
    for name, param in list(model.named_parameters()):  # not stored and never read by the captured forward
        if param.device.type == "meta":
            owner, _, leaf = name.rpartition(".")
            module = model.get_submodule(owner) if owner else model
            setattr(module, leaf, torch.nn.Parameter(torch.zeros(param.shape, dtype=param.dtype),
                                                     requires_grad=False))
    return model


def _is_tied_key(model: torch.nn.Module, key: str) -> bool:
    tied = _tied(model)
    return tied is not None and key == tied[0]


def _glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_INTS = (torch.int64, torch.int32)


def unpack_zero_points(packed: torch.Tensor, bits: int, shape: torch.Size) -> torch.Tensor:
    """compressed-tensors' ``unpack_from_int32(packed, bits, shape, packed_dim=0)`` (zero points packed along the
    output rows), through a contiguous transpose. Why not the helper's own: its transpose of a one-word-row
    ``[1, G]`` tensor (8 or fewer outputs at 4 bits, 2 or more groups) keeps a stride it cannot view as bytes
    (compressed-tensors 0.20: RuntimeError 'self.stride(-1) must be 1 to view Int as Byte')."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    words, groups = packed.shape
    rows = packed.t().reshape(-1).view(groups, words)
    return unpack_from_int32(rows, bits, torch.Size([shape[1], shape[0]])).t()


def words_as_stored_codes(packed: torch.Tensor, bits: int, k: int, signed: bool) -> torch.Tensor | None:
    """compressed-tensors' ``weight_packed`` words ``[N, ceil(K*bits/32)]`` as the codes a lowbit weight param stores,
    without unpacking: 4-bit as ``pack_int4``'s bytes ``[N, K/2]``, 8-bit as int8/uint8 ``[N, K]``; None where the
    layouts differ (other widths, odd K at 4 bits, a big-endian host).

    Why it is exact: ``pack_to_int32`` puts element ``i`` at bits ``bits*i`` of its row's words, each the signed code
    plus ``2^(bits-1)``, so on a little-endian host byte ``j`` of a row holds elements ``2j`` (low nibble) and ``2j+1``
    (high) at 4 bits, as ``pack_int4`` does, and element ``j`` at 8 bits. lowbit's unsigned code is that stored value
    (its codes and zero points are the signed ones plus the offset), and its signed code's two's complement is the
    value with the top bit flipped: ``(q + 8) ^ 8`` per nibble, ``(q + 128) ^ 128`` per byte. Unpacking to int8 codes
    and packing them again was ~70% of a SmolLM2 int4 load's own time and held every linear's codes unpacked until
    capture."""
    if bits not in (4, 8) or (bits == 4 and k % 2) or sys.byteorder != "little":
        return None
    data = packed.contiguous().view(torch.uint8)[:, : k * bits // 8]
    if not signed:
        return data.contiguous()
    flipped = data ^ (0x88 if bits == 4 else 0x80)
    return flipped if bits == 4 else flipped.view(torch.int8)


def _ct_linear(module: str, scheme: Any, fmt: str, tensors: dict[str, torch.Tensor], directory: Path,
               hint: str | None, shape: tuple[int, int]
               ) -> tuple[Any, Any, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One compressed-tensors linear's (weight scheme, input scheme, codes as a weight param stores them, scale, zero
    point); ``shape`` is the linear's [out, in] in the model built from config.json, which every stored tensor must
    agree with."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    from lowbit.ir.qscheme import QScheme

    wa = scheme.weights
    fmt = scheme.format or fmt
    if scheme.output_activations is not None:  # was ignored: the model loaded without its output quantization
        raise CheckpointError(f"{directory / 'config.json'}: linear {module!r}: output_activations are quantized; "
                              "lowbit reads weight and input-activation quantization only")
    if wa.type == "float" and wa.num_bits != 8:  # a 4-bit float scheme was read as fp8
        raise CheckpointError(f"{directory / 'config.json'}: linear {module!r}: {wa.num_bits}-bit float weights; "
                              "lowbit reads 8-bit float (fp8e4m3) weights")
    if wa.strategy not in ("channel", "group", "block"):
        raise CheckpointError(f"{directory}: linear {module!r}: weight strategy {wa.strategy!r}; lowbit reads "
                              "channel, group and block (tensor scales are not a lowbit weight layout)")
    tile = wa.block_structure if wa.strategy == "block" else None
    if tile is not None and (len(tile) != 2 or tile[0] != tile[1] or wa.type != "float"):
        raise CheckpointError(f"{directory / 'config.json'}: linear {module!r}: block_structure {tile} of "
                              f"{wa.num_bits}-bit {wa.type} weights; lowbit reads square blocks of fp8 weights "
                              "(FP8_BLOCK's [128, 128])")
    if getattr(wa, "actorder", None) in ("group", "dynamic"):
        raise CheckpointError(f"{directory}: linear {module!r}: actorder 'group' (a g_idx permutation); lowbit "
                              "reads contiguous groups only")
    is_float = wa.type == "float"
    qdtype = _lowbit_qdtype(wa.num_bits, wa.symmetric, is_float, hint,
                            f"{directory / 'lowbit-manifest.json'}: 'lowbit.lowbit_qdtypes.{module}'")
    n, k = shape
    group = wa.group_size if wa.strategy == "group" else None
    cfg = f"config.json's quantization_config ({wa.num_bits} bits, group {group}) for linear {module!r} [{n}, {k}]"
    if group is not None and (group < 1 or k % group):
        raise CheckpointError(f"{directory / 'config.json'}: group_size {group} does not divide the input size {k} "
                              f"of linear {module!r}")
    if k % 2 and get_qdtype(qdtype).packed:  # was pack_int4's ValueError, naming no linear, after every tensor read
        raise CheckpointError(f"{directory / 'config.json'}: linear {module!r} [{n}, {k}] has {wa.num_bits}-bit "
                              f"weights ({qdtype}) and an odd input size {k}; lowbit packs codes of 4 bits and fewer "
                              "two per byte along the input, so it cannot hold this linear (its quantize pass "
                              "refuses one too; transformers loads it)")
    n_scales = 1 if group is None else k // group
    per_row = [[n, n_scales]] + ([[n]] if group is None else [])
    if tile is not None:  # one scale per tile, edge tiles partial
        per_row = [[-(-n // tile[0]), -(-k // tile[1])]]
    scale = _check_tensor(tensors, f"{module}.weight_scale", directory, per_row, _FLOATS, cfg).to(torch.float32)
    scale = scale.reshape(n) if group is None and tile is None else scale
    zp, direct = None, None
    if fmt == "pack-quantized":
        if not 1 <= wa.num_bits <= 8:
            raise CheckpointError(f"{directory / 'config.json'}: num_bits {wa.num_bits} of linear {module!r} is not "
                                  "a packed integer width (1..8)")
        stored = _check_tensor(tensors, f"{module}.weight_shape", directory, [[2]], _INTS,
                               f"linear {module!r}").tolist()
        if stored != [n, k]:
            raise CheckpointError(f"{_tensor_file(directory, module + '.weight_shape')}: tensor "
                                  f"'{module}.weight_shape' says {stored}, but linear {module!r} built from "
                                  f"config.json is [{n}, {k}]")
        packed = _check_tensor(tensors, f"{module}.weight_packed", directory, [[n, -(-k * wa.num_bits // 32)]],
                               (torch.int32,), cfg)
        direct = words_as_stored_codes(packed, wa.num_bits, k, get_qdtype(qdtype).signed)
        q = direct if direct is not None else unpack_from_int32(packed, wa.num_bits, torch.Size([n, k]))
        if not wa.symmetric:
            zpk = _check_tensor(tensors, f"{module}.weight_zero_point", directory,
                                [[-(-n * wa.num_bits // 32), n_scales]], (torch.int32,), cfg)
            zp = unpack_zero_points(zpk, wa.num_bits, torch.Size([n, n_scales]))
    elif fmt in ("int-quantized", "float-quantized", "naive-quantized"):
        exact = {"int-quantized": (torch.int8,), "float-quantized": (torch.float8_e4m3fn,)}.get(fmt)
        q = _check_tensor(tensors, f"{module}.weight", directory, [[n, k]], exact, cfg)
        if not wa.symmetric:
            zp = _check_tensor(tensors, f"{module}.weight_zero_point", directory, per_row,
                               (torch.int8, torch.int32, torch.int64), cfg).to(torch.int8)
    else:
        raise CheckpointError(f"{directory}: linear {module!r}: compressed-tensors format {fmt!r} is not one lowbit "
                              "reads (pack-quantized, int-quantized, float-quantized, naive-quantized)")
    if zp is not None:
        zp = zp.reshape(scale.shape)
    if direct is not None:  # already lowbit's packed codes; only the zero points move to lowbit's convention
        zp = None if zp is None else _from_signed(zp, None, qdtype)[0]
    else:
        q, zp = _from_signed(q, zp, qdtype)
        q = stored_codes(q, qdtype)
    ws = QScheme(qdtype=qdtype, symmetric=wa.symmetric,
                 granularity="per_block" if tile else "per_group" if group else "per_channel",
                 group_size=tile[0] if tile else group)
    xs = None
    ia = scheme.input_activations
    if ia is not None:
        a_qd = "fp8e4m3" if ia.type == "float" else f"int{ia.num_bits}"
        # int16 was a raw pydantic error from QScheme, 4-bit float activations were read as fp8
        if a_qd not in QDTYPES or (ia.type == "float" and ia.num_bits != 8):
            raise CheckpointError(f"{directory / 'config.json'}: linear {module!r}: {ia.num_bits}-bit {ia.type} "
                                  "input activations; lowbit has int8/int4/int3/int2 and fp8e4m3 activations")
        if not ia.dynamic:
            if ia.strategy != "tensor" or not ia.symmetric:
                raise CheckpointError(f"{directory}: linear {module!r}: static {ia.strategy} input scales"
                                      f"{'' if ia.symmetric else ' with zero points'}; lowbit reads static input "
                                      "scales per tensor and symmetric")
            xs = QScheme(qdtype=a_qd, symmetric=True, granularity="per_tensor", dynamic=False)
            return ws, xs, q, scale, zp
        gran = {"token": ("per_token", None), "group": ("per_token", ia.group_size),
                "tensor": ("per_tensor", None)}.get(ia.strategy)
        if gran is None:
            raise CheckpointError(f"{directory}: linear {module!r}: dynamic input strategy {ia.strategy!r}")
        xs = QScheme(qdtype=a_qd, symmetric=ia.symmetric, granularity=gran[0], group_size=gran[1], dynamic=True)
    return ws, xs, q, scale, zp


_GPTQ_TENSORS = ("qweight", "qzeros", "scales", "g_idx")
_GPTQ_ZERO_OFFSET = {"gptq": 1, "gptq_v2": 0}
"""``checkpoint_format`` -> what ``qzeros`` holds less the zero point: v1 stores ``zero - 1``, v2 the zero itself."""


def _gptq_config(qcfg: dict[str, Any], cfg_path: Path) -> tuple[int, int, int]:
    """(bits, group size or -1, zero offset) of a GPTQ quantization_config, each checked: a string or a 0 there was
    int()'s ValueError or a ZeroDivisionError, and a v2 checkpoint's zeros were read as v1's."""
    values = {}
    for key, default in (("bits", 4), ("group_size", -1)):
        v = qcfg.get(key, default)
        if isinstance(v, bool) or not isinstance(v, int):
            raise CheckpointError(f"{cfg_path}: quantization_config.{key} is {v!r}, not an integer")
        values[key] = v
    bits, group = values["bits"], values["group_size"]
    if bits not in (4, 8):
        raise CheckpointError(f"{cfg_path}: GPTQ bits={bits}; lowbit reads 4 and 8")
    if group != -1 and group < 1:
        raise CheckpointError(f"{cfg_path}: GPTQ group_size={group}; it is -1 (per channel) or a positive size")
    if not qcfg.get("sym", True):
        raise CheckpointError(f"{cfg_path}: asymmetric GPTQ (sym=false); lowbit reads symmetric GPTQ only")
    fmt = qcfg.get("checkpoint_format", "gptq")
    if fmt not in _GPTQ_ZERO_OFFSET:
        raise CheckpointError(f"{cfg_path}: GPTQ checkpoint_format {fmt!r}; lowbit reads "
                              f"{' and '.join(map(repr, _GPTQ_ZERO_OFFSET))} "
                              "(other layouts pack the codes differently)")
    return bits, group, _GPTQ_ZERO_OFFSET[fmt]


def gptq_words_as_stored_codes(qweight: torch.Tensor, bits: int) -> torch.Tensor | None:
    """GPTQ's ``qweight`` ``[K*bits/32, N]`` (each column's unsigned codes ``q + 2^(bits-1)`` packed along K, element
    ``i`` of a word at bits ``bits*i``) as lowbit's stored signed codes: ``pack_int4``'s bytes ``[N, K/2]`` at 4 bits,
    int8 ``[N, K]`` at 8; None on a big-endian host. On a little-endian one byte ``j`` of a word holds the word's
    elements ``2j`` and ``2j+1`` (4 bits) or ``j`` (8 bits), so the words' bytes, transposed to rows of N, are
    ``pack_int4``'s layout, and the signed code's two's complement is the stored value with its top bit flipped.
    Unpacking through int64 shifts and packing again made a SmolLM2 GPTQ load ~4x a compressed-tensors one."""
    if bits not in (4, 8) or sys.byteorder != "little":
        return None
    words, n = qweight.shape
    flipped = qweight.contiguous().view(torch.uint8) ^ (0x88 if bits == 4 else 0x80)  # [words, 4N]
    rows = flipped.view(words, n, 4).transpose(0, 1).reshape(n, words * 4)
    return rows if bits == 4 else rows.view(torch.int8)


def _gptq_linear(module: str, bits: int, group: int, zero_offset: int, tensors: dict[str, torch.Tensor],
                 directory: Path, shape: tuple[int, int]
                 ) -> tuple[Any, Any, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One GPTQ linear's (weight scheme, None, stored codes, scale, None); every tensor is checked against config.json's
    bits and group size and the linear's [out, in] ``shape`` first: a false bits or group_size was reported as a
    desc_act permutation, and float codes, a cut qzeros or integer scales loaded without a word."""
    from lowbit.ir.qscheme import QScheme

    n, k = shape
    per = 32 // bits
    g = k if group == -1 else group
    cfg = f"config.json's quantization_config ({bits} bits, group {group}) for linear {module!r} [{n}, {k}]"
    if k % per or n % per or k % g:
        raise CheckpointError(f"{directory / 'config.json'}: linear {module!r} [{n}, {k}] cannot be stored as GPTQ "
                              f"with {bits} bits and group {group} (whole int32 words and groups along both sides)")
    n_groups = k // g
    qweight = _check_tensor(tensors, f"{module}.qweight", directory, [[k // per, n]], (torch.int32,), cfg)
    qzeros = _check_tensor(tensors, f"{module}.qzeros", directory, [[n_groups, n // per]], (torch.int32,), cfg)
    scales = _check_tensor(tensors, f"{module}.scales", directory, [[n_groups, n]], _FLOATS, cfg).to(torch.float32)
    g_idx = tensors.get(f"{module}.g_idx")
    if g_idx is not None:
        g_idx = _check_tensor(tensors, f"{module}.g_idx", directory, [[k]], _INTS, cfg)
        if not torch.equal(g_idx.to(torch.int64), torch.arange(k) // g):
            raise CheckpointError(f"{directory}: linear {module!r}: g_idx is a permutation (desc_act GPTQ); lowbit "
                                  "reads contiguous groups only")
    zeros = _unpack_rows(qzeros.t().contiguous(), bits).t() + zero_offset
    off = 1 << (bits - 1)
    if not bool((zeros == off).all()):
        raise CheckpointError(f"{directory}: linear {module!r}: qzeros are not all {off} (asymmetric GPTQ); lowbit "
                              "reads symmetric GPTQ only")
    qdtype = f"int{bits}"
    q = gptq_words_as_stored_codes(qweight, bits)
    if q is None:
        q = stored_codes((_unpack_rows(qweight, bits).t().contiguous() - off).to(torch.int8), qdtype)
    per_channel = group == -1
    scale = scales.t().contiguous().reshape(n) if per_channel else scales.t().contiguous()
    ws = QScheme(qdtype=qdtype, symmetric=True, granularity="per_channel" if per_channel else "per_group",
                 group_size=None if per_channel else g)
    return ws, None, q, scale, None


def _capture(model: torch.nn.Module, kind: str, directory: Path, generation: Any = None) -> tuple[Graph, Any]:
    from lowbit.api import _default_example, _generation_model, describe_source, record_step_graph
    from lowbit.checkpoint.reuse import capture_once
    from lowbit.ir.capture import capture
    from lowbit.models import CausalLMLogits, SentenceEmbedder

    tokenizer = None
    if (directory / "tokenizer_config.json").is_file() or (directory / "tokenizer.json").is_file():
        tokenizer = read_tokenizer(directory)
    if generation:
        if kind != "causal-lm":
            raise CheckpointError(f"{directory}: generation= needs a causal LM checkpoint; this one is a {kind}")
        step, example, dyn, meta = _generation_model(model, generation)
        graph = capture_once(capture, step, model, example, dyn, generation)
        graph.meta["source"] = describe_source(step, graph)
        record_step_graph(graph, meta)
        if tokenizer is not None:
            graph.meta["tokenizer"] = tokenizer
        return graph, tokenizer
    wrapper = CausalLMLogits(model).eval() if kind == "causal-lm" else SentenceEmbedder(model).eval()
    if kind != "causal-lm" and tokenizer is None:
        raise CheckpointError(f"{directory}: an encoder checkpoint needs its tokenizer files to build example "
                              "inputs for capture")
    example, dyn = _default_example(wrapper, tokenizer)
    graph = capture_once(capture, wrapper, model, example, dyn)
    graph.meta["source"] = describe_source(wrapper, graph)
    if tokenizer is not None:
        graph.meta["tokenizer"] = tokenizer
    return graph, tokenizer


def _ct_input_scale(module: str, tensors: dict[str, torch.Tensor], directory: Path) -> torch.Tensor:
    """A static per-tensor ``input_scale`` (one finite positive float), as the scalar the quantize pass stores."""
    t = _check_tensor(tensors, f"{module}.input_scale", directory, [[1], []], _FLOATS,
                      f"linear {module!r}'s static per-tensor input quantization")
    if not (torch.isfinite(t).all() and (t > 0).all()):
        raise CheckpointError(f"{_tensor_file(directory, module + '.input_scale')}: tensor '{module}.input_scale' is "
                              f"{t.item()}, not a positive finite scale")
    return t.to(torch.float32).reshape(())


def _install_static_inputs(graph: Graph, static: dict[str, tuple[Any, torch.Tensor]]) -> None:
    """Give each linear in ``static`` (module -> (input scheme, stored scale)) its static input QDQ; linears that
    read one value with the same scheme and scale share one, as the quantize pass writes them (q/k/v)."""
    from lowbit.ir.qdq import write_static_input_qdq
    from lowbit.ir.quant import layout_for

    groups: dict[tuple[int, Any, float], list[Any]] = {}
    for node in graph.nodes:
        if node.op == "linear" and node.module in static:
            scheme, scale = static[node.module]
            groups.setdefault((id(node.args[0]), scheme, scale.item()), []).append(node)
    for (_, scheme, _), readers in groups.items():
        x = readers[0].args[0]
        layout = layout_for(scheme, x.tensor_type.shape, "activation")
        write_static_input_qdq(graph, x, readers, scheme, layout, static[readers[0].module][1], None)


def _stored_codes(node: Any, scheme: Any, group: int | None, plan: dict[str, Any], directory: Path, done: set[str],
                  forms: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The stored (codes, scale, zero point) of linear ``node``, checked against the form and shapes the ``quantize``
    pass's RTN makes for ``scheme``: worked out on the meta device once per weight shape and scheme (``forms``), since
    RTN of the placeholder weights, all of it replaced, was ~60% of a SmolLM2 load."""
    from lowbit.passes.insert_qdq import quantize_weight

    w = node.args[1].data
    key = f"{list(w.shape)} {w.dtype} {group} {scheme.model_dump_json()}"
    if key not in forms:
        forms[key] = quantize_weight(torch.empty(w.shape, dtype=w.dtype, device="meta"), scheme, group)[:3]
    expected = forms[key]
    _, _, stored, scale, zp = plan[node.module]
    for e, t, what in zip(expected, (stored, scale, zp), ("codes", "scale", "zero point")):
        if (e is None) != (t is None):
            raise CheckpointError(f"{directory}: linear {node.module!r}: {what} present on one side only")
        if e is not None and (tuple(e.shape) != tuple(t.shape) or e.dtype != t.dtype):
            raise CheckpointError(f"{directory}: linear {node.module!r}: stored {what} is "
                                  f"{t.dtype}{list(t.shape)}, the graph expects {e.dtype}{list(e.shape)}")
    done.add(node.module)
    return stored, scale, zp
