"""``lowbit.save`` / ``lowbit.load``: checkpoints other runtimes load, and lowbit's own, read back without pickle.

Formats (``save(compiled, directory, format=...)``):

* ``"compressed-tensors"`` — an HF model directory (``config.json`` with ``quantization_config``, safetensors
  shards, tokenizer files) in the layouts of the ``compressed-tensors`` package: what vLLM, SGLang and
  transformers load. See ``lowbit.checkpoint.hf``.
* ``"gptq"`` — the HF GPTQ layout (``qweight``/``qzeros``/``scales``/``g_idx``), symmetric int4/int8.
* ``"lowbit"`` — the IR text (``model.lowbit``) and ``params.safetensors``, exactly the compiled graph, whatever
  passes ran (rotations, KV quantization, anything no HF format expresses); a generation step graph's meta
  (cache layout, limits, stop tokens) goes into the manifest and is validated field by field on load, so the
  reloaded model generates; so do the prune record, ``residual_rotated`` and the node meta reports read that the
  IR text does not print (``NODE_META``: qscheme, qscheme_weight, raised_from, kv).

Every directory gets ``lowbit-manifest.json`` (versions, and SHA-256 and size of every file, verified by ``load``;
for HF formats other loaders ignore it). Writes go to a hidden temporary sibling renamed into place at the end,
so a failed save leaves nothing; temporaries left by killed saves are removed by the next save. ``load`` reads
JSON and safetensors only — never pickle — and builds a ``CompiledModel`` without the source model: the lowbit
format parses the IR; the HF formats build the model from ``config.json``, capture it and insert the stored
quantized weights.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from lowbit.checkpoint.files import (
    CAPTURE_META,
    FORMATS,
    MANIFEST,
    META_TEXT_MAX,
    NODE_META,
    CaptureInfo,
    CheckpointError,
    LowbitInfo,
    atomic_checkpoint_dir,
    check_format,
    checked,
    shareable_config,
    unreadable_file,
    verify_manifest,
    write_manifest,
)

__all__ = ["save", "load", "FORMATS", "CheckpointError", "GenerationMeta", "PrunedMeta", "generation_meta",
           "validated_meta", "write_checkpoint_files"]

KINDS = ("causal-lm", "encoder")
IR_FILE = "model.lowbit"
PARAMS_FILE = "params.safetensors"
SOURCE_UNREAD_FILE = "source-unread.safetensors"
"""The lowbit format's copy of the source model's tensors the captured forward never reads (BERT's pooler under a
sentence embedder; ``lowbit.api.UNREAD_TENSORS``): without it, an HF save of a reloaded lowbit checkpoint had no
pooler to write and transformers loaded a random one."""


def _graph_and_tokenizer(compiled: Any) -> tuple[Any, Any]:
    from lowbit.ir.graph import graph_of

    graph = graph_of(compiled)
    tokenizer = getattr(compiled, "tokenizer", None) or graph.meta.get("tokenizer")
    return graph, tokenizer


def save(compiled: Any, directory: str | os.PathLike[str], format: str = "compressed-tensors", *,
         overwrite: bool = True, config: Any = None, kind: str | None = None,
         actorder: str | None = None) -> Path:
    """Write ``compiled`` (a CompiledModel or Graph) to ``directory`` in ``format``; returns the directory.

    ``format``: ``"compressed-tensors"`` (what vLLM, SGLang and transformers load), ``"gptq"`` (symmetric int4/int8
    weight-only), ``"hf"`` (a float model that no longer is the module it was captured from: pruned, sliced,
    rotated, norms folded) or ``"lowbit"`` (IR text + safetensors: anything the IR holds, ``lowbit.load`` only).
    The files go to a temporary sibling renamed into place, with ``lowbit-manifest.json`` (SHA-256 of each file);
    ``overwrite=False`` refuses an existing directory.
    ``config``/``kind`` override the HF config and wrapper (``"causal-lm"``/``"encoder"``) recorded at capture.
    ``actorder="static"`` marks GPTQ act-order weights (contiguous groups) in compressed-tensors' metadata.

    Raises ``CheckpointError`` (a ``lowbit.errors.LowbitError``) naming the node, module or parameter the format
    cannot hold (a quantized KV cache or an online Hadamard in an HF format, asymmetric weights in ``gptq``, a
    quantized graph as ``hf``, non-finite scales), the directory it cannot write, or an unknown ``format``, ``kind``
    or ``actorder``; ``TypeError`` for a ``config`` that is not a transformers config.
    """
    if format not in FORMATS:
        from lowbit.passes.base import closest

        near = closest(format, list(FORMATS)) if isinstance(format, str) else ""
        raise CheckpointError(f"unknown checkpoint format {format!r}{near}; known: {', '.join(FORMATS)}")
    if kind not in (None, *KINDS):  # any other kind built a bare AutoModel whose names matched nothing
        raise CheckpointError(f"unknown kind {kind!r}: {' or '.join(map(repr, KINDS))} (the HF wrapper the graph was "
                         "captured through)")
    if actorder not in (None, "static", "weight"):  # "group"/"dynamic" promise a g_idx lowbit never writes
        raise CheckpointError(f"actorder={actorder!r}: lowbit keeps act-order groups contiguous, which is 'static' or "
                         "'weight' (or None); 'group' and 'dynamic' need a g_idx permutation lowbit does not write")
    if actorder is not None and format != "compressed-tensors":  # was accepted and written nowhere
        raise CheckpointError(f"actorder={actorder!r} is a field of compressed-tensors' quantization_config; format "
                              f"{format!r} has none (its act-order groups are contiguous as written): drop actorder= "
                              "or save with format='compressed-tensors'")
    if config is not None and not callable(getattr(config, "to_dict", None)):
        # a dict was an AttributeError (lowbit format) or transformers' "Unrecognized configuration class" list
        raise TypeError(f"config= takes a transformers PretrainedConfig (model.config, "
                        f"AutoConfig.from_pretrained(DIR)), got {type(config).__name__}")
    graph, tokenizer = _graph_and_tokenizer(compiled)
    from lowbit.ir.verifier import check_qparams, listed

    bad = check_qparams(graph)
    if bad:  # load refuses such a file (check_stored): writing it made a checkpoint nothing can load
        raise CheckpointError(f"the graph's quantization parameters are not finite, so no checkpoint would load: "
                              f"{listed(bad)}")
    directory = Path(directory)
    if actorder is None:
        actorder = _gptq_actorder(compiled)
    with atomic_checkpoint_dir(directory, overwrite=overwrite) as tmp:
        info = write_checkpoint_files(graph, tmp, format, tokenizer=tokenizer, config=config, kind=kind,
                                      actorder=actorder)
        write_manifest(tmp, format, {"lowbit": info})
    return directory


def write_checkpoint_files(graph: Any, directory: Path, format: str, *, tokenizer: Any = None, config: Any = None,
                           kind: str | None = None, actorder: str | None = None) -> dict[str, Any]:
    """Write ``graph``'s files for ``format`` into an existing directory (no manifest); returns what was written.

    ``save`` wraps this in a temporary directory and adds the manifest; ``lowbit compile --format`` adds its
    report first."""
    if format == "lowbit":
        return _save_lowbit(graph, directory, tokenizer, config=config, kind=kind)
    _refuse_dense_experts(graph, format)
    if format == "compressed-tensors":
        from lowbit.checkpoint.hf import save_compressed_tensors

        # `lowbit compile -f compressed-tensors` passes none: the graph's record, as save() reads it
        return save_compressed_tensors(graph, directory, tokenizer=tokenizer, config=config, kind=kind,
                                       actorder=actorder if actorder is not None else graph.meta.get("actorder"))
    if format == "hf":
        from lowbit.checkpoint.hf import save_hf_float

        return save_hf_float(graph, directory, tokenizer=tokenizer, config=config, kind=kind)
    if format == "gptq":
        from lowbit.checkpoint.hf import save_gptq

        return save_gptq(graph, directory, tokenizer=tokenizer, config=config, kind=kind)
    raise ValueError(f"unknown checkpoint format {format!r}; known: {', '.join(FORMATS)}")


def _refuse_dense_experts(graph: Any, format: str) -> None:
    """A mixture-of-experts graph holds each expert's projections as separate linears
    (``lowbit.models.DenseExperts``). ``hf`` and ``compressed-tensors`` write them under the family's per-expert
    checkpoint names, which transformers merges into its fused expert tensors at load (``lowbit.checkpoint.experts``);
    GPTQ loaders (optimum, GPTQModel) quantize ``nn.Linear`` modules, and transformers' model has none for an expert:
    refused by name; the lowbit format holds the graph as is."""
    from lowbit.models import DENSE_EXPERT_PARAM

    sliced = [name for name in graph.params if DENSE_EXPERT_PARAM.match(name)]
    if sliced and format == "gptq":
        raise CheckpointError(f"format {format!r} cannot hold this mixture-of-experts graph: its experts are "
                              f"separate linears (parameter {sliced[0]} and {len(sliced) - 1} more), and transformers' "
                              "model holds them as fused 3-D tensors, no nn.Linear a GPTQ loader could quantize; save "
                              "with format='compressed-tensors' (transformers dequantizes its experts at load) or "
                              "format='lowbit'")


def _gptq_actorder(compiled: Any) -> str | None:
    """``"static"`` when the compile ran GPTQ with act-order (lowbit keeps its groups contiguous): the graph's record
    (``graph.meta["actorder"]``, the gptq pass's; a lowbit checkpoint keeps it), else the compile report's."""
    from lowbit.ir.graph import graph_of

    if graph_of(compiled).meta.get("actorder") is not None:
        return graph_of(compiled).meta["actorder"]
    report = getattr(compiled, "report", None)
    pipeline = getattr(report, "pipeline", None)
    for r in getattr(pipeline, "records", []) or []:
        spec = str(getattr(r, "spec", ""))
        if spec.startswith("gptq") and "act_order=false" not in spec.replace(" ", "").lower():
            return "static"
    return None


def _pruned_source_config(config: Any, pruned: dict[str, Any] | None) -> Any:
    """The config.json of a lowbit checkpoint: the source model's, with a structural cut's sizes (the same
    ``hf.pruned_config`` the HF formats write), so ``AutoConfig`` reads the model that is stored. Per-layer sizes
    an HF config cannot hold (layers pruned differently): no config.json rather than one with wrong sizes (the IR
    and the manifest's prune record hold them)."""
    if config is None or not pruned:
        return config
    from lowbit.checkpoint.hf import pruned_config

    try:
        return pruned_config(config, pruned)[0]
    except CheckpointError:
        return None


def _save_lowbit(graph: Any, directory: Path, tokenizer: Any, config: Any = None,
                 kind: str | None = None) -> dict[str, Any]:
    """``config``/``kind`` replace the recorded source's, as for the HF formats (they were ignored here)."""
    import json

    from lowbit.checkpoint.files import write_safetensors
    from lowbit.ir.printer import print_graph

    empty = [n for n, v in graph.params.items() if v.data is None]
    if empty:  # written without them, the checkpoint (manifest and all) could never be loaded
        raise CheckpointError(f"parameter @{empty[0]} (and {len(empty) - 1} more) has no tensor (a graph parsed "
                              "without its weights?); the lowbit format stores every declared parameter")
    (directory / IR_FILE).write_text(print_graph(graph, version=True))
    write_safetensors({n: v.data for n, v in graph.params.items()}, directory / PARAMS_FILE)  # none empty: refused
    src = graph.meta.get("source") or {}
    info: dict[str, Any] = {"format": "lowbit", "kind": kind or src.get("kind")}
    unread = _source_unread(graph)
    if unread:
        write_safetensors(unread, directory / SOURCE_UNREAD_FILE)
        info["copied_from_source"] = sorted(unread)
    config = _pruned_source_config(config if config is not None else src.get("config"), graph.meta.get("pruned"))
    if config is not None:
        d = shareable_config(config.to_dict())
        d.pop("quantization_config", None)
        (directory / "config.json").write_text(json.dumps(d, indent=2, sort_keys=True, default=str) + "\n")
    if src.get("max_seq_length") is not None:
        info["max_seq_length"] = src["max_seq_length"]
    if graph.meta.get("pruned"):
        info["pruned"] = validated_meta(PrunedMeta, graph.meta["pruned"], "graph.meta['pruned']")
    if graph.meta.get("residual_rotated"):
        info["residual_rotated"] = True
    if graph.meta.get("actorder") is not None:
        info["actorder"] = checked(LowbitInfo, {"actorder": graph.meta["actorder"]}, lambda field, msg: (
            f"graph.meta['actorder']: {msg}")).actorder
    capture = {k: graph.meta[k] for k in CAPTURE_META if graph.meta.get(k) is not None}
    if capture:  # a reload's report said 'loaded ... N IR nodes' and no more of what the compile was captured from
        info["capture"] = checked(CaptureInfo, capture, lambda field, msg: (
            f"graph.meta[{field.split('.')[0]!r}]: {msg} (the lowbit format keeps the capture figures "
            "CaptureInfo knows)")).model_dump(exclude_none=True)
    node_meta = {n.name: {k: v for k in NODE_META if isinstance(v := n.meta.get(k), str) and len(v) <= META_TEXT_MAX}
                 for n in graph.nodes}
    if any(node_meta.values()):  # what reports read and the IR text does not print: a reload reported less
        info["node_meta"] = {name: m for name, m in node_meta.items() if m}
    if tokenizer is not None:
        tokenizer.save_pretrained(str(directory))
    if graph.meta.get("generation") is not None:
        meta = _validated_generation(graph.meta["generation"], lambda field, msg: (
            f"graph.meta['generation'].{field}: {msg} (the lowbit format stores only the fields GenerationMeta knows)"))
        info["generation"] = meta.model_dump(exclude_none=True)
    return info


def _source_unread(graph: Any) -> dict[str, torch.Tensor]:
    """The recorded source tensors the graph never reads, those a lowbit checkpoint can store: a name the graph
    also declares as a parameter would shadow it on reload, so it is left to the graph's copy."""
    from lowbit.api import UNREAD_TENSORS

    recorded = (graph.meta.get("source") or {}).get(UNREAD_TENSORS) or {}
    return {name: t for name, t in recorded.items() if name not in graph.params and t.device.type != "meta"}


class _KVLayout(BaseModel):
    """The packed KV cache's layout (``kv-cache`` pass), as a step graph's meta records it."""

    model_config = ConfigDict(extra="forbid", strict=True)
    bits: Literal[2, 4, 8]
    k_block: int = Field(ge=1)
    v_group: int = Field(ge=1)
    window: int = Field(ge=0)
    sink: int = Field(ge=0)
    scale_dtype: Literal["float32", "float16", "bfloat16"]
    parts: list[str]


class GenerationMeta(BaseModel):
    """``graph.meta["generation"]`` of a step graph, checked field by field when a lowbit checkpoint is saved and
    loaded: the manifest is read from disk, so a crafted one must fail here with the field's name (the generator
    turns ``cache_dtype`` into a torch dtype and sizes buffers from the ints)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    eos_token_ids: list[int]
    max_length: int = Field(ge=2)
    max_batch: int = Field(ge=1)
    cuda_graph: bool = True
    prefill_graphs: int = Field(default=4, ge=0)
    """Prefill shapes kept as CUDA graphs (``GenerationSpec.prefill_graphs``); absent before session 49: 4."""
    n_layers: int = Field(ge=1)
    kv_heads: int | list[int]
    head_dim: int = Field(ge=1)
    logits: Literal["last", "all"] = "all"
    cache_inputs: list[str]
    cache_dtype: Literal["float32", "float16", "bfloat16"]
    kv_cache: _KVLayout | None = None
    float_cache_inputs: list[str] | None = None
    windows: list[Annotated[int, Field(ge=1)] | None] | None = None
    """Each layer's sliding window (None: full causal); absent in checkpoints written before it was recorded."""
    max_positions: int | None = Field(default=None, ge=2)
    """The model's ``max_position_embeddings`` (calibration windows must fit it); absent in checkpoints written
    before it was recorded, and for a model whose config has none."""
    attention_written_out: Literal["softcap", "upcast"] | None = None
    """Why the step writes its attention out as matmuls and a softmax (no attention node for ``kv-cache``): Gemma 2's
    soft-capped scores, or GPT-2's ``reorder_and_upcast_attn`` under eager attention; absent for an SDPA step and in
    files written before it was recorded."""
    rope_switch: int | None = Field(default=None, ge=1)
    """longrope's ``original_max_position_embeddings`` (the generator recomputes the cache when a sequence reaches
    it; recorded for a cache too short to reach it too); absent for fixed rotary frequencies and in files written
    before it was recorded (recomputed from config.json on load; without one such a longrope step is refused)."""


class PrunedMeta(BaseModel):
    """``graph.meta["pruned"]`` (the structural prune passes' record, per block): kept in a lowbit checkpoint so a
    reloaded pruned graph still saves to the HF formats with its smaller config."""

    model_config = ConfigDict(extra="forbid", strict=True)
    intermediate_size: dict[str, Annotated[int, Field(ge=1)]] | None = None
    heads: dict[str, list[Annotated[int, Field(ge=1)]]] | None = None
    layers_kept: list[str] | None = None
    hidden_size: int | None = Field(default=None, ge=1)


def _validated_generation(raw: Any, message: Callable[[str, str], str]) -> GenerationMeta:
    return checked(GenerationMeta, raw, message)


def validated_meta(model: type[BaseModel], raw: Any, where: str) -> dict[str, Any]:
    """``raw`` checked against ``model`` (a dict of its set fields), or a ``CheckpointError`` naming ``where``;
    public because ``lowbit.export`` checks the generation meta it writes into (and reads from) ONNX files too."""
    return checked(model, raw, lambda field, msg: f"{where}{'.' + field if field else ''}: {msg}"
                    ).model_dump(exclude_none=True)


def generation_meta(info: dict[str, Any], graph: Any, where: str) -> dict[str, Any] | None:
    """``info["generation"]`` read from a file (a checkpoint's or a reproducer's manifest), validated against the
    schema and the parsed graph's inputs; errors name ``where`` (``"DIR: manifest 'lowbit"``) and the field."""
    raw = info.get("generation")
    if raw is None:
        return None
    meta = _validated_generation(raw, lambda field, msg: f"{where}.generation.{field}': {msg}")
    names = [v.name for v in graph.inputs]
    if names[2:] != meta.cache_inputs:
        raise CheckpointError(f"{where}.generation.cache_inputs' {meta.cache_inputs} are not the graph's cache "
                              f"inputs {names[2:]}")
    _check_cache_sizes(meta, graph, where)
    return meta.model_dump(exclude_none=True)


def _check_cache_sizes(meta: GenerationMeta, graph: Any, where: str) -> None:
    """The cache ``generate`` allocates from ``meta`` (one tensor per cache input, sized by ``n_layers``, ``kv_heads``,
    ``head_dim``, ``max_length``, ``max_batch`` and the packed layout) fits what the graph's cache inputs declare,
    and takes no more than the verifier's bound on a stored graph's fixed-size values (``check_fixed_sizes``):
    a crafted ``max_length=10**9`` made a three-token prompt allocate 64 GB, ``n_layers=7`` was a raw TypeError ('the
    model takes 4 inputs ... got 16') and ``head_dim`` an error blaming the caller's input, all at generate time."""
    import torch

    from lowbit.ir.graph import DTYPE_NAMES, TensorType
    from lowbit.ir.kvcache import cache_layout, layer_kv_heads
    from lowbit.ir.verifier import FIXED_SIZE_FACTOR, FIXED_SIZE_FLOOR

    fields = (f"n_layers={meta.n_layers}, kv_heads={meta.kv_heads}, head_dim={meta.head_dim}, max_length="
              f"{meta.max_length}, max_batch={meta.max_batch}, cache_dtype={meta.cache_dtype}"
              + (", kv_cache" if meta.kv_cache else ""))
    heads = layer_kv_heads(meta.model_dump())
    if len(heads) != meta.n_layers:
        raise CheckpointError(f"{where}.generation.kv_heads': {meta.kv_heads} gives {len(heads)} layers' heads, but "
                              f"n_layers is {meta.n_layers}")
    float_dtype = getattr(torch, meta.cache_dtype)
    kv = meta.kv_cache
    if kv is None:
        want = [((meta.max_batch, h, meta.max_length, meta.head_dim), float_dtype) for h in heads for _ in range(2)]
    else:
        slots = -(-meta.max_length // kv.k_block) * kv.k_block  # what generate allocates: whole key blocks
        want = [(shape, dtype) for h in heads for _, shape, dtype in cache_layout(
            meta.max_batch, h, slots, meta.head_dim, bits=kv.bits, k_block=kv.k_block, v_group=kv.v_group,
            window=kv.window, sink=kv.sink, scale_dtype=getattr(torch, kv.scale_dtype), float_dtype=float_dtype)]
    inputs = graph.inputs[2:]
    if len(inputs) != len(want):
        raise CheckpointError(f"{where}.generation' ({fields}) makes {len(want)} cache tensors, but the graph has "
                              f"{len(inputs)} cache inputs")
    for v, (shape, dtype) in zip(inputs, want):
        t = v.type
        fits = isinstance(t, TensorType) and t.dtype == dtype and len(t.shape) == len(shape)
        for declared, size in zip(t.shape if fits else (), shape):
            sym = graph.symbols.get(declared) if isinstance(declared, str) else None
            if isinstance(declared, int):
                fits = fits and declared == size
            elif sym is not None:
                fits = fits and (sym.max is None or size <= sym.max) and (sym.min is None or size >= sym.min)
        if not fits:
            bounds = ", ".join(f"{d} in [{s.min}, {s.max}]" for d in (t.shape if isinstance(t, TensorType) else ())
                               if isinstance(d, str) and (s := graph.symbols.get(d)) is not None)
            raise CheckpointError(f"{where}.generation' ({fields}) sizes cache input %{v.name} as "
                                  f"{DTYPE_NAMES.get(dtype, dtype)}{list(shape)}, which the graph's declared {t}"
                                  + (f" ({bounds})" if bounds else "") + " does not take: the manifest does not "
                                  "describe this graph")
    nbytes = sum(math.prod(shape) * dtype.itemsize for shape, dtype in want)
    limit = max(FIXED_SIZE_FLOOR, FIXED_SIZE_FACTOR * graph.param_bytes())
    if nbytes > limit:  # the IR's symbol range and the manifest agreeing on a 10**9-slot cache: 64 GB per prompt
        raise CheckpointError(f"{where}.generation' ({fields}) makes a KV cache of {nbytes / 2**30:.3g} GiB at "
                              f"max_batch sequences, more than {FIXED_SIZE_FACTOR}x the parameters' bytes (or 1 GiB), "
                              f"the most a stored model's fixed-size values may take ({limit / 2**30:.3g} GiB here)")


_SPEC_FIELDS = ("max_length", "max_batch", "cuda_graph", "logits")


def _check_stored_spec(directory: Path, meta: dict[str, Any] | None, generation: Any) -> None:
    """``generation=`` on a lowbit-format checkpoint: its graph is fixed as compiled, so a spec equal to the one it
    was captured with is accepted (``True``: whichever it was captured with) and a different one is refused naming
    the field, rather than every ``generation=`` being refused (a caller reloading what it saved passed its own)."""
    from lowbit.api import _generation_spec

    if meta is None:
        raise CheckpointError(f"{directory}: this lowbit-format checkpoint was compiled without generation= (an "
                              "input_ids -> logits graph, no decode step); its graph is fixed as compiled, so "
                              "generation= cannot add one: compile the float model with generation= and save that")
    if generation is True:
        return
    spec = _generation_spec(generation)
    differ = [f"{name}={getattr(spec, name)!r} (saved with {meta.get(name)!r})" for name in _SPEC_FIELDS
              if getattr(spec, name) != meta.get(name)]
    if differ:
        raise CheckpointError(f"{directory}: this lowbit-format checkpoint's step graph was captured with "
                              + ", ".join(f"{n}={meta.get(n)!r}" for n in _SPEC_FIELDS)
                              + f"; generation= asks for {', '.join(differ)}, which the stored graph cannot change: "
                              "pass the spec it was saved with (or none), or compile the float model again with it")


def load(directory: str | os.PathLike[str], *, backend: str = "torch", device: str | None = None,
         generation: Any = None, backend_options: Mapping[str, Any] | None = None) -> Any:
    """A ``CompiledModel`` from a directory ``save`` wrote (any format), or a compressed-tensors/GPTQ directory
    another tool wrote. Files listed in ``lowbit-manifest.json`` are checked against their SHA-256 first.

    ``backend`` and ``device`` are where the reloaded graph is lowered and runs, as ``compile_model`` takes them;
    ``backend_options`` are the backend's own (``{"keep_packed": True}`` on torch, so the reloaded module holds the
    stored codes and not float copies); all checked before anything is read.

    ``generation=GenerationSpec(...)`` (HF formats): capture the generation step (prefill and decode with a KV cache,
    as ``compile_model(..., generation=)``) instead of the logits forward, with the stored codes, so ``generate``
    works; a lowbit-format checkpoint keeps whichever graph it was compiled as: ``generation=`` there must be the
    spec it was saved with (``True``: any), and a different one is refused naming the field.

    Raises ``CheckpointError`` or ``CorruptFileError`` (both ``lowbit.errors.LowbitError``) naming the directory,
    file and tensor for a missing, damaged or inconsistent checkpoint (a hash the manifest does not match, a
    truncated file, a tensor of the wrong shape, a NaN scale); ``BackendError`` for an unknown backend or option and
    ``DeviceError`` for a device this machine lacks, both before anything is read."""
    from lowbit.api import CompiledModel, CompileReport, lower, lowering_lines
    from lowbit.errors import check_device
    from lowbit.passes.manager import PipelineReport

    check_device(device)  # before the capture: "gpu" was torch's RuntimeError after it
    from lowbit.backends.registry import get_backend

    get_backend(backend).check_built()  # a misspelt backend was found only after the whole load
    get_backend(backend).parse_options(dict(backend_options or {}))
    get_backend(backend).check_available(device)  # and triton without CUDA, or on device='cpu', after it too
    directory = Path(directory)
    if directory.is_file():  # an exported file was "no such checkpoint directory", as if it did not exist
        raise CheckpointError(f"{directory} is a file, not a checkpoint directory: lowbit.load reads what lowbit.save "
                              "(or `lowbit compile -o`) writes; an exported .onnx file or TensorRT engine is read by "
                              "lowbit.export.load")
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: no such checkpoint directory")
    manifest = verify_manifest(directory)
    check_format(directory, manifest, IR_FILE)  # only save(format="lowbit") writes one
    fmt = (manifest or {}).get("format")
    for name in (IR_FILE, "config.json"):  # a symlink loop there read as no such file: 'not a checkpoint lowbit reads'
        why = unreadable_file(directory / name)
        if why is not None:
            raise CheckpointError(f"{directory / name}: cannot be read: {why}")
    if fmt == "hf":
        return _load_hf_float(directory, backend=backend, device=device, generation=generation,
                              backend_options=backend_options,
                              sparsity=(manifest or {}).get("lowbit", {}).get("sparsity"),
                              unstored=(manifest or {}).get("lowbit", {}).get("not_in_graph"))
    if fmt == "lowbit" or (fmt is None and (directory / IR_FILE).is_file()):
        graph, tokenizer = _load_lowbit(directory, manifest)
        if generation:
            _check_stored_spec(directory, graph.meta.get("generation"), generation)
    else:
        from lowbit.checkpoint.hf import load_hf_checkpoint

        if not (directory / "config.json").is_file():
            raise CheckpointError(f"{directory}: neither {IR_FILE} nor config.json: not a checkpoint lowbit reads")
        graph, tokenizer, _ = load_hf_checkpoint(directory, manifest, generation=generation)
        fmt = fmt or "hf"
        from lowbit.ir.verifier import check_stored, listed

        # its NaN/inf scale or zero point check (every tensor is declared: the graph was built from the files)
        stored = check_stored(graph, {})
        if stored:  # a crafted scale loaded and made every logit NaN
            raise CheckpointError(f"{directory}: the checkpoint's tensors do not make a usable model: {listed(stored)}")
    runner = lower(graph, backend, device, backend_options)
    from lowbit.ir.ops import is_semantic

    # as compile's report says them; a lowbit-format checkpoint keeps its capture's figures (CaptureInfo)
    kept = {k: graph.meta[k] for k in ("residual_rotated", *CAPTURE_META) if graph.meta.get(k)}
    report = CompileReport(
        capture={"loaded_from": str(directory), "format": fmt, **kept}, pipeline=PipelineReport(f"(loaded {fmt})"),
        backend=backend, nodes_before=len(graph.nodes), nodes_after=len(graph.nodes),
        param_bytes_before=graph.param_bytes(), param_bytes_after=graph.param_bytes(),
        generic_ops={k: v for k, v in graph.op_counts().items() if not is_semantic(k)},
        lowering=lowering_lines(runner))  # a reload lowers afresh: its kernels and fallbacks are said as a compile's
    return CompiledModel(runner, graph, report, tokenizer)


def _load_hf_float(directory: Path, *, backend: str, device: str | None, generation: Any,
                   backend_options: Mapping[str, Any] | None, sparsity: Any = None,
                   unstored: list[str] | None = None) -> Any:
    """A ``format="hf"`` directory (float weights, no ``quantization_config``; its files already checked against the
    manifest) compiled as the plain transformers model it is, in its stored dtype. The HF reader takes quantized
    linears only, so ``load`` refused the float format ``save`` had written ("load it with lowbit.compile_model
    instead"). ``sparsity``: the manifest's record of the linears ``sparsify`` pruned (module -> ``2:4``), marked
    again as ``sparsify`` marks them (a later save reads them; the 2:4 backends check the weights themselves).
    ``unstored``: the manifest's ``not_in_graph``, tensors the save did not write, which transformers initialised at
    random here: a later save must not write them as the source's."""
    from lowbit.api import compile_model
    from lowbit.models import load_model

    module, tokenizer = _tokenizer_free_causal_lm(directory) or load_model(directory, dtype="auto")[:2]
    compiled = compile_model(module, tokenizer=tokenizer, backend=backend, device=device,
                             backend_options=backend_options, generation=generation or None)
    from lowbit.checkpoint.hf import keep_stored_unread, mark_recorded_sparsity

    mark_recorded_sparsity(compiled.graph, sparsity)
    keep_stored_unread(compiled.graph, unstored=unstored)
    # what this load captured, as the other formats' reports say it (the figures were dropped with the rest)
    figures = {k: compiled.report.capture[k] for k in CAPTURE_META if compiled.report.capture.get(k)}
    compiled.report.capture = {"loaded_from": str(directory), "format": "hf", **figures}
    return compiled


def _tokenizer_free_causal_lm(directory: Path) -> tuple[Any, None] | None:
    """A causal LM ``format="hf"`` directory without tokenizer files, as ``CausalLMLogits`` (ids -> logits): a model
    compiled from a module (no tokenizer) saves none, and its float reload was refused ('has no tokenizer files')
    while its compressed-tensors and GPTQ reloads run on token ids. None where there are tokenizer files or the
    model is an encoder (its capture builds example inputs with the tokenizer): ``load_model`` reads those."""
    from transformers import AutoModelForCausalLM

    from lowbit.checkpoint.files import read_config
    from lowbit.data.model_files import TOKENIZER_FILES
    from lowbit.models import CausalLMLogits, checkpoint_dtype
    from lowbit.remote_code import from_pretrained

    architectures = read_config(directory).architectures or []
    if any((directory / f).is_file() for f in TOKENIZER_FILES) or \
            not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
        return None
    model = from_pretrained(AutoModelForCausalLM, directory, dtype=checkpoint_dtype(directory))
    return CausalLMLogits(model.eval()).eval(), None


def _parsed_and_verified(ir: Path, params: dict[str, Any]) -> Any:
    """The graph of ``ir`` with ``params``, verified: the manifest proves only that the files are the ones it lists,
    and a rehashed model.lowbit declaring f16 where f32 is computed, or a size no tensor has, loaded and ran. Every
    error names ``ir`` (or the params file), as the parser's line numbers alone did not."""
    from lowbit.ir.parser import IRParseError, IRVersionError, parse_graph
    from lowbit.ir.verifier import VerificationError, check_fixed_sizes, check_stored, listed, verify

    try:
        text = ir.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise CheckpointError(f"{ir}: is not UTF-8 text, so not lowbit IR ({exc})") from None
    try:
        graph = parse_graph(text, params)
    except IRVersionError as exc:
        raise CheckpointError(f"{ir}: {exc}") from None
    except IRParseError as exc:
        raise CheckpointError(f"{ir}: not valid lowbit IR: {exc}") from None
    stored = check_stored(graph, params)
    if stored:
        raise CheckpointError(f"{ir.parent / PARAMS_FILE}: does not fit {ir.name}: {listed(stored)}")
    missing = sorted(n for n, v in graph.params.items() if v.data is None)
    if missing:
        raise CheckpointError(f"{ir.parent / PARAMS_FILE}: has no tensor for parameter @{missing[0]} declared in "
                              f"{ir.name}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    fixed = check_fixed_sizes(graph)
    if fixed:  # before lowering folds them: the allocation is the attack
        raise CheckpointError(f"{ir}: declares values too large for the model it holds: {listed(fixed)}")
    try:
        verify(graph)
    except VerificationError as exc:
        raise CheckpointError(f"{ir}: the IR does not verify: {exc}") from None
    return graph


def _recompute_rope_switch(generation: dict[str, Any], graph: Any, config: Any, directory: Path) -> None:
    """A longrope step graph saved before ``rope_switch`` was recorded loaded without it, and its decode steps went
    on past the switch with keys rotated by the short frequencies: other tokens than the compile's, silently. The
    switch is recomputed from the saved config.json as ``compile_model`` computes it; with no config.json, a graph
    whose rotary reads the largest position (longrope's switch) is refused."""
    if "rope_switch" in generation:
        return
    if config is not None:
        from lowbit.models import GenerationError, longrope_switch

        try:
            switch = longrope_switch(config, f"{directory / 'config.json'}")
        except GenerationError as exc:
            raise CheckpointError(str(exc)) from None
        if switch is not None:
            generation["rope_switch"] = switch
        return
    positions = graph.inputs[1] if len(graph.inputs) > 1 else None
    reads_max = [n for n in graph.nodes if n.op == "aten.max.default" and n.args and n.args[0] is positions]
    if reads_max:
        raise CheckpointError(f"{directory}: its step graph's %{reads_max[0].outputs[0].name} "
                              f"({reads_max[0].module or 'no module'}) takes the largest position, as a longrope "
                              "rotary does to switch frequencies, but the manifest records no 'rope_switch' (saved by "
                              "a lowbit before it was recorded) and there is no config.json to recompute it from: "
                              "generation past the switch would reuse keys rotated with the other frequencies. "
                              "Compile and save the model again with this lowbit")


def _load_source_unread(directory: Path, manifest: dict[str, Any], info: dict[str, Any]) -> dict[str, Any]:
    """``{UNREAD_TENSORS: ...}`` from the checkpoint's ``SOURCE_UNREAD_FILE`` (none written: ``{}``); the file must
    hold exactly the tensors the manifest's ``copied_from_source`` lists."""
    from lowbit.api import UNREAD_TENSORS
    from lowbit.checkpoint.files import check_listed, read_safetensors

    listed = info.get("copied_from_source") or []
    path = directory / SOURCE_UNREAD_FILE
    if not listed and not path.exists():
        return {}
    check_listed(directory, manifest, SOURCE_UNREAD_FILE)
    tensors = read_safetensors(path)
    if sorted(tensors) != sorted(listed):
        raise CheckpointError(f"{path}: holds {sorted(tensors)[:5]}, the manifest's 'lowbit.copied_from_source' "
                              f"lists {sorted(listed)[:5]} (the files of two checkpoints mixed?)")
    return {UNREAD_TENSORS: tensors}


def _load_lowbit(directory: Path, manifest: dict[str, Any] | None) -> tuple[Any, Any]:
    from lowbit.checkpoint.files import check_listed, read_safetensors

    if manifest is None:
        raise CheckpointError(f"{directory}: a lowbit-format checkpoint needs its lowbit-manifest.json (it holds the "
                              "files' SHA-256)")
    ir = directory / IR_FILE
    if not ir.is_file():
        raise CheckpointError(f"{directory}: {IR_FILE} is missing")
    check_listed(directory, manifest, IR_FILE, PARAMS_FILE)
    params = read_safetensors(directory / PARAMS_FILE)
    graph = _parsed_and_verified(ir, params)
    info = manifest.get("lowbit", {})
    config = None
    if (directory / "config.json").is_file() and info.get("kind"):  # before the tokenizer, which reads it too
        from lowbit.checkpoint.files import read_config

        check_listed(directory, manifest, "config.json")
        config = read_config(directory)
    tokenizer = None
    if (directory / "tokenizer_config.json").is_file():
        from lowbit.checkpoint.files import read_tokenizer

        tokenizer = read_tokenizer(directory)
        graph.meta["tokenizer"] = tokenizer
    if config is not None:
        src: dict[str, Any] = {"kind": info["kind"], "config": config}
        if info.get("max_seq_length") is not None:
            src["max_seq_length"] = info["max_seq_length"]
        src.update(_load_source_unread(directory, manifest, info))
        graph.meta["source"] = src
    if info.get("pruned") is not None:
        graph.meta["pruned"] = validated_meta(PrunedMeta, info["pruned"], f"{directory}: manifest 'lowbit.pruned'")
    generation = generation_meta(info, graph, f"{directory}: manifest 'lowbit")
    if generation is not None:
        _recompute_rope_switch(generation, graph, config, directory)
        graph.meta["generation"] = generation
    if info.get("residual_rotated"):  # a bool: verify_manifest checked the table's types
        graph.meta["residual_rotated"] = True
    graph.meta.update(info.get("capture") or {})  # CaptureInfo: verify_manifest checked its fields
    if info.get("actorder") is not None:  # LowbitInfo: "static" or "weight"
        graph.meta["actorder"] = info["actorder"]
    nodes = {n.name: n for n in graph.nodes}
    for name, meta in info.get("node_meta", {}).items():
        if name not in nodes:
            raise CheckpointError(f"{directory / MANIFEST}: key 'lowbit.node_meta' names node %{name[:80]}, which "
                                  f"{IR_FILE} does not have (the files of two checkpoints mixed?): save the model "
                                  "again")
        nodes[name].meta.update({k: v for k, v in meta.items() if k in NODE_META and v is not None})
    return graph, tokenizer
