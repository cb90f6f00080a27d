"""``compile_model``: capture a model, run a pipeline (or a named recipe) over its IR, lower it to a backend.

``compile_graph`` is the one compile driver: ``compile_model`` and ``lowbit compile`` both call it. It checks
the backend and the pipeline against each other before anything runs (``plan_compile``: a pass creating an op
the backend cannot lower is an error before capture and calibration), runs the pipeline and then the passes the
backend declares it needs (``lowbit.backends.registry``), and lowers.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import re
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from lowbit.backends.registry import (
    BackendError,
    BackendSpec,
    all_backends,
    get_backend,
)
from lowbit.errors import LowbitError
from lowbit.ir.capture import capture, refuse_unrunnable
from lowbit.ir.graph import Graph, Node
from lowbit.passes.base import Pass, PassError
from lowbit.passes.manager import (
    Instrument,
    PassManager,
    PipelineReport,
    check_calibration_texts,
    check_order,
    format_pipeline,
    parse_pipeline,
    quote_pipeline,
)
from lowbit.remote_code import from_pretrained

BACKENDS = tuple(all_backends())
"""Backend names registered when lowbit.api was imported (``lowbit.backends.registry.all_backends()`` is live)."""


@dataclass
class CompileReport:
    """What compile_model did: capture figures, each pass's record, and what no pass understood."""

    capture: dict[str, Any]
    pipeline: PipelineReport
    backend: str
    nodes_before: int
    nodes_after: int
    param_bytes_before: int
    param_bytes_after: int
    generic_ops: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    lowering: list[str] = field(default_factory=list)
    """What the backend's lowering decided, from its runner's ``report_text()`` (kernels, fallbacks, 2:4 weights
    on semi-structured sparse tensors or kept dense and why)."""

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-ready data (what ``lowbit compile`` writes to ``report.json``)."""
        return {
            "capture": self.capture, "pipeline": self.pipeline.to_dict(), "backend": self.backend,
            "nodes_before": self.nodes_before, "nodes_after": self.nodes_after,
            "param_bytes_before": self.param_bytes_before, "param_bytes_after": self.param_bytes_after,
            "generic_aten_ops": self.generic_ops, "seconds": round(self.seconds, 3), "lowering": self.lowering,
        }

    def summary(self) -> str:
        """Text for people: capture (or the checkpoint loaded), one line per pass (changed or not, time, stats),
        node and parameter sizes before and after, the ATen ops no pass raised, and the backend's lowering notes."""
        if "loaded_from" in self.capture:  # lowbit.load: no capture ran ("captured None in None s: None ATen nodes")
            lines = [f"loaded {self.capture.get('format')} checkpoint {self.capture['loaded_from']}: "
                     f"{self.nodes_before} IR nodes"]
            if self.capture.get("model_class"):  # what the saved model was captured from (a lowbit-format file)
                lines[0] += (f" (captured from {self.capture['model_class']}: {self.capture.get('aten_nodes')} ATen "
                             "nodes)")
        else:
            lines = [(f"captured {self.capture.get('model_class')} in {self.capture.get('export_seconds')} s: "
                      f"{self.capture.get('aten_nodes')} ATen nodes -> {self.nodes_before} IR nodes")]
        for r in self.pipeline.records:
            state = "skipped" if r.skipped else ("changed" if r.changed else "no change")
            lines.append(f"  {r.spec:<40} {state:<9} {r.seconds * 1000:8.1f} ms  {r.stats}")
        mb = 2**20
        lines.append(f"nodes {self.nodes_before} -> {self.nodes_after}; params "
                     f"{self.param_bytes_before / mb:.1f} MiB -> {self.param_bytes_after / mb:.1f} MiB; "
                     f"backend {self.backend}")
        if self.generic_ops:
            lines.append("left as generic ATen (no pass rewrites these): " +
                         ", ".join(f"{k}×{v}" for k, v in self.generic_ops.items()))
        lines += self.lowering
        return "\n".join(lines)


class CompiledModel(torch.nn.Module):
    """The callable a user gets: runs the lowered graph; ``graph`` and ``report`` stay inspectable.

    Call it as the captured model was called (``compiled(input_ids)`` -> logits for a causal LM); ``.graph`` is the
    IR after the pipeline (``print`` it), ``.report`` the ``CompileReport``, ``.tokenizer`` the model's tokenizer,
    ``.runner`` the backend's module, and ``generate`` works when it was compiled with ``generation=``. Save it with
    ``lowbit.save``, export it with ``lowbit.export``."""

    def __init__(self, runner: Any, graph: Graph, report: CompileReport, tokenizer: Any = None) -> None:
        super().__init__()
        self.runner = runner
        self.graph = graph
        self.report = report
        self.tokenizer = tokenizer

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the lowered graph. Inputs are checked against the graph's declared ones (rank, dtype, sizes within
        the captured ranges, ids inside the vocabulary): ``InputError`` (a ``LowbitError``) names the one refused."""
        return self.runner(*args, **kwargs)

    def prefill_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Every position's logits ``[B, L, V]`` of a generation step graph compiled with
        ``GenerationSpec(logits="all")``: one prefill over a fresh cache (``lowbit.eval.perplexity`` calls it)."""
        return self._step_generator().prefill_logits(input_ids)

    def _step_generator(self) -> Any:
        from lowbit.generate import GenerationError, Generator, logits_vocab

        meta = self.graph.meta.get("generation")
        if meta is None:
            raise GenerationError("this model was compiled as input_ids -> logits, with no KV cache: call it directly")
        if getattr(self, "_generator", None) is None:
            self._generator = Generator(self.runner, meta, getattr(self.runner, "device", None), self.tokenizer,
                                        logits_vocab(self.graph))
        return self._generator

    def extra_repr(self) -> str:
        """What was compiled: ``print(compiled)`` showed only the runner's module tree (``LowbitModule()``)."""
        rep = self.report
        source = (f"loaded={rep.capture['loaded_from']!r}" if "loaded_from" in rep.capture
                  else f"pipeline={rep.pipeline.pipeline or '(none)'!r}")
        inputs = ", ".join(f"{v.name}: {v.type}" for v in self.graph.inputs)
        text = (f"backend={rep.backend!r}, {source}, inputs=({inputs}), nodes={len(self.graph.nodes)}, "
                f"params={self.graph.param_bytes() / 2**20:.1f} MiB")
        gen = self.graph.meta.get("generation")
        if gen:
            text += f", generation(max_length={gen.get('max_length')}, max_batch={gen.get('max_batch')})"
        return text

    def generate(self, input_ids: Any, max_new_tokens: int, *, attention_mask: torch.Tensor | None = None,
                 do_sample: bool = False, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, seed: int | None = None, stop_tokens: Sequence[int] | int | None = None,
                 stop: Sequence[str] | str | None = None, on_token: Callable[[int, int], None] | None = None,
                 **unknown: Any) -> Any:
        """Generate up to ``max_new_tokens`` per prompt (``lowbit.generate.Generator.generate``); needs a model
        compiled with ``generation=GenerationSpec(...)``.

        ``input_ids``: a list of token-id lists (any lengths), of strings (encoded with the model's tokenizer), or a
        ``[B, L]`` tensor (with ``attention_mask`` when padded). Greedy unless ``do_sample`` (``temperature``,
        ``top_k``, ``top_p``, ``seed``); a sequence ends at its first of ``stop_tokens`` (default: the model's
        end-of-sequence ids; ``()`` for none) or once its new text contains one of the ``stop`` strings (left out of
        its text); ``on_token(sequence_index, token)`` streams. Returns a
        ``GenerationOutput`` (``tokens``, ``texts``, ``prefill_seconds``, ``decode_tokens_per_second``, ...).

        Raises ``GenerationError`` (a ``LowbitError``) naming the limit a request exceeds (``max_length``,
        ``max_batch``), a bad sampling option or token id, an option ``generate`` does not have (transformers'
        names say what to use instead), or a model compiled without ``generation=``."""
        from lowbit.generate import GenerationError

        meta = self.graph.meta.get("generation")
        if meta is None and (self.graph.meta.get("source") or {}).get("kind") == "encoder":
            # was 'compiled as input_ids -> logits ... compile it with generation=', which an encoder cannot be
            names = ", ".join(v.name for v in self.graph.inputs)
            raise GenerationError(f"this model is a text encoder ({names} -> embeddings) with no causal-LM head: "
                                  "nothing to generate with; generation needs a decoder LM such as smollm2")
        if meta is None and self.graph.meta.get("loaded_format") in ("compressed-tensors", "gptq"):
            raise GenerationError(
                f"this model was loaded from a {self.graph.meta['loaded_format']} checkpoint as input_ids -> logits "
                "(no KV cache): load it with lowbit.load(directory, generation=GenerationSpec(max_length=..., "
                "max_batch=...)) to generate")
        if meta is None:
            raise GenerationError(
                "this model was compiled as input_ids -> logits, with no KV cache: compile it with "
                "compile_model(model, generation=GenerationSpec(max_length=..., max_batch=...)) "
                "(CLI: lowbit generate) to generate")
        return self._step_generator().generate(
            input_ids, max_new_tokens, attention_mask=attention_mask, do_sample=do_sample, temperature=temperature,
            top_k=top_k, top_p=top_p, seed=seed, stop_tokens=stop_tokens, stop=stop, on_token=on_token, **unknown)


class ExampleInputsError(LowbitError, ValueError):
    """``compile_model`` without ``example_inputs`` for a model lowbit builds none for: the message names the inputs
    its forward takes (it was a plain ValueError, which a caller could not tell from a bug)."""


def dynamic_dim(lo: int, hi: int) -> Any:
    """A dynamic dimension that lets export keep the guards it cannot prove over the whole range (some torch
    versions prove ``min(64*s, 192*s) == 64*s`` for Llama's GQA reshape and some do not) instead of failing."""
    return torch.export.Dim.DYNAMIC(min=lo, max=hi)


def _default_example(model: torch.nn.Module, tokenizer: Any) -> tuple[tuple[Any, ...] | dict[str, Any], Any]:
    """Example inputs and dynamic shapes for the models lowbit ships wrappers for."""
    from lowbit.models import CausalLMLogits, SentenceEmbedder

    if isinstance(model, CausalLMLogits):
        # batch 2 in the example so export does not specialise the batch to 1; 64 tokens, or the model's positions
        # when fewer (a 32-position model was captured at 64, recorded as "s1 in [2, 32] hint 64")
        max_len = model_positions(model) or 8192
        seq = max(2, min(64, max_len))
        ids = torch.arange(1, 2 * seq + 1, dtype=torch.long).reshape(2, seq) % model.model.config.vocab_size
        return (ids,), {"input_ids": {0: dynamic_dim(1, 1024), 1: dynamic_dim(2, max_len)}}
    if isinstance(model, SentenceEmbedder):
        enc = tokenizer(["lowbit compiles models.", "A second, longer example sentence for capture."],
                        padding=True, return_tensors="pt")
        seq, batch = dynamic_dim(2, 512), dynamic_dim(1, 1024)
        dyn = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}}
        return (enc["input_ids"], enc["attention_mask"]), dyn
    if isinstance(model, torch.export.ExportedProgram) and model.example_inputs is not None:
        # export recorded the inputs it ran on (its dynamic dims are already in the program); asking for them again
        # refused compile_model(exported_program), which the docstring accepts
        args, kwargs = model.example_inputs
        if not kwargs or not args:
            return (dict(kwargs) if kwargs else tuple(args)), None
    raise ExampleInputsError(f"no example inputs given for {type(model).__name__}: lowbit builds them only for the "
                             f"models it wraps (a causal LM, lowbit.models.SentenceEmbedder); pass "
                             f"example_inputs={_example_hint(model)}")


def _example_hint(model: Any) -> str:
    """What ``example_inputs`` could be for ``model``, read off an HF config: a ViT's ``pixel_values`` shape (it was
    '(...)' alone, with no word on the input a vision model reads or its size), or a text encoder's ids and mask."""
    config = getattr(model, "config", None)
    main = getattr(model, "main_input_name", None)
    size = getattr(config, "image_size", None)
    if main == "pixel_values" and size is not None:
        h, w = (size, size) if isinstance(size, int) else tuple(size)[:2]
        channels = getattr(config, "num_channels", 3)
        return (f"(torch.randn(2, {channels}, {h}, {w}),) (pixel_values, preprocessed as its image processor does; "
                "add dynamic_shapes={'pixel_values': {0: torch.export.Dim.AUTO}} for a batch that varies)")
    if main == "input_ids":
        return ("(input_ids, attention_mask) of a tokenizer batch, or wrap a text encoder in "
                "lowbit.models.SentenceEmbedder, whose inputs lowbit builds")
    return _forward_inputs(model)


def _forward_inputs(model: Any) -> str:
    """``example_inputs`` spelled from ``model.forward``'s required parameters (``(x, scale)``), or a generic hint
    where the signature cannot be read."""
    import inspect

    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError, AttributeError):
        return "(...), the arguments its forward takes"
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    names = [p.name for p in params if p.kind in kinds and p.default is inspect.Parameter.empty]
    if not names:
        return "(...), the arguments its forward takes"
    return (f"({', '.join(names)}{',' if len(names) == 1 else ''}), an example of each input "
            f"{type(model).__name__}.forward requires, in that order")


def model_positions(model: Any) -> int | None:
    """The most token positions ``model`` (an HF model, or lowbit's wrapper of one) takes: its config's
    ``max_position_embeddings``, or None where it has none. Calibration windows longer than it are refused before
    the capture (``check_calibration_texts``)."""
    for holder in (getattr(model, "model", None), getattr(model, "encoder", None), model):
        limit = getattr(getattr(holder, "config", None), "max_position_embeddings", None)
        if isinstance(limit, int) and not isinstance(limit, bool) and limit >= 2:
            return limit
    return None


def own_tokenizer(model: torch.nn.Module) -> Any:
    """The tokenizer saved beside a Hugging Face model (or the one a lowbit wrapper holds), or None.

    A model loaded with ``from_pretrained(DIR)`` remembers DIR as ``config.name_or_path``; its tokenizer files
    are usually there. Without this, calibration would tokenize with SmolLM2's vocabulary.
    """
    import os

    inner = getattr(model, "model", None) or getattr(model, "encoder", None) or model
    config = getattr(inner, "config", None) or getattr(model, "config", None)
    where = getattr(config, "name_or_path", None) or getattr(config, "_name_or_path", None)
    if not where or not os.path.isdir(str(where)):
        return None
    from transformers import AutoTokenizer

    try:
        return from_pretrained(AutoTokenizer, str(where))
    except (OSError, ValueError, KeyError):
        return None


UNREAD_TENSORS = "unread_tensors"
"""``graph.meta["source"]`` key: the source HF model's tensors the captured forward never reads (HF name ->
tensor), recorded at capture (``unread_source_tensors``). An HF save writes them as they are, so the checkpoint
holds every tensor of the model its config.json builds. No such key: the graph has no copy of them."""


def unread_source_tensors(hf_model: torch.nn.Module, graph: Graph) -> dict[str, torch.Tensor]:
    """The tensors of ``hf_model`` (named as its state dict, which the graph's parameter names follow) that
    ``graph``, captured from it, never reads: BERT's pooler under a sentence embedder. Without them an HF save of
    the graph had no ``pooler.dense`` and transformers loaded it with a random pooler (``pooler_output`` noise,
    said only by a missing-keys warning). Held, not copied, as the graph holds the tensors it reads (they share the
    model's storage); a tied tensor (one tensor under two names) counts as read. Tensors are told apart by address
    and shape, not storage: a reloaded checkpoint's share one memory map. Tensors on ``meta`` (never loaded) are left
    out: a save then reports them as missing."""
    def where(t: torch.Tensor) -> tuple[int, tuple[int, ...], torch.dtype]:
        return t.data_ptr(), tuple(t.shape), t.dtype

    from lowbit.models import fused_expert_sources

    held = {where(v.data) for v in graph.params.values() if v.data is not None and v.data.device.type != "meta"}
    sliced = fused_expert_sources(graph.params)  # read through DenseExperts' per-expert views
    return {name: t.detach() for name, t in hf_model.state_dict().items()
            if name not in graph.params and name not in sliced and t.device.type != "meta" and where(t) not in held}


def describe_source(model: torch.nn.Module, graph: Graph | None = None) -> dict[str, Any]:
    """What a checkpoint needs to rebuild the HF model a graph was captured from: its config and wrapper kind, and
    with the captured ``graph`` the HF model's tensors it never reads (``UNREAD_TENSORS``), which an HF save
    writes as they are (BERT's pooler: without it transformers loaded a random one)."""
    from lowbit.models import CausalLMLogits, CausalLMStep, SentenceEmbedder

    # a generation step graph has the logits graph's parameter names (CausalLMStep calls the HF submodules):
    # without its source, lowbit.save(format="compressed-tensors"/"gptq") told the user to use compile_model
    if isinstance(model, (CausalLMLogits, CausalLMStep)):
        source, hf_model = {"kind": "causal-lm", "config": model.model.config}, model.model
    elif isinstance(model, SentenceEmbedder):
        source = {"kind": "encoder", "config": model.encoder.config, "max_seq_length": model.max_seq_length}
        hf_model = model.encoder
    else:
        return {}
    if graph is not None:
        source[UNREAD_TENSORS] = unread_source_tensors(hf_model, graph)
    return source


def record_step_graph(graph: Graph, meta: dict[str, Any]) -> None:
    """A captured generation step: its cache inputs/outputs named, and ``meta`` (``_generation_model``'s) completed
    with them and recorded as ``graph.meta["generation"]``, which ``generate`` reads."""
    _name_step_io(graph)
    _place_step_nodes(graph)
    meta["cache_inputs"] = [v.name for v in graph.inputs[2:]]
    meta["cache_dtype"] = str(graph.inputs[2].tensor_type.dtype).removeprefix("torch.")
    graph.meta["generation"] = meta


_LAYER = re.compile(r"^(.*?\b(?:layers|layer|h|blocks)\.\d+)\.")


def _place_step_nodes(graph: Graph) -> None:
    """Module paths for the nodes ``CausalLMStep``'s own code writes inside a layer (head reshapes, rotary, cache
    scatters, attention, residual adds), which torch.export records under the wrapper's root (''): per-layer reports
    (``debug sensitivity``, the calibration stages, a node's ``# module`` in the IR text) could not name their layer.
    A residual add goes to its layer (``model.layers.3``), any other node to the module of the last linear before it
    in that layer (``model.layers.3.self_attn``), as the logits graph's capture places them. Nodes before the first
    layer or after the last keep ''."""
    layer: str | None = None
    owner: str | None = None
    for node in graph.nodes:
        if node.module:
            m = _LAYER.match(node.module + ".")
            if m is None:
                if layer is not None:  # past the layers (the final norm, the head): nothing more to place
                    return
                continue
            if m.group(1) != layer:
                layer, owner = m.group(1), None
            if node.op in ("linear", "qlinear"):
                owner = node.module.rsplit(".", 1)[0]
        elif layer is not None:
            node.module = layer if node.op == "residual_add" else (owner or layer)


def _name_step_io(graph: Graph) -> None:
    """A step graph's cache inputs and outputs under the names ONNX generation runtimes use
    (``past_key_values_<layer>_key`` in, ``present_<layer>_key`` out)."""
    for i, v in enumerate(graph.inputs[2:]):
        graph.rename(v, f"past_key_values_{i // 2}_{'value' if i % 2 else 'key'}")
    graph.rename(graph.outputs[0], "logits")
    for i, v in enumerate(graph.outputs[1:]):
        graph.rename(v, f"present_{i // 2}_{'value' if i % 2 else 'key'}")


def refuse_for_generation(passes: Sequence[Pass], recipe: str | None = None) -> None:
    """Raise ``GenerationError`` for a pass a generation step graph cannot take (a simulated KV cache, distillation
    toward logits), from the pipeline alone: ``compile_model(generation=)`` and ``lowbit generate`` say it before
    the model is read. ``recipe``: the recipe the passes came from, which the advice names."""
    _refuse_kv_simulation(passes, recipe)
    _refuse_distillation(passes)


_KV_OPTIONS = ("kv", "k_gran", "v_gran", "kv_group", "k_group", "v_group", "kv_sym", "kv_clip", "kv_window",
               "kv_sink")
"""``quantize``'s options that describe the KV-cache accuracy model (all unread without ``kv=``)."""


def _packed_cache(opts: Any) -> tuple[str, list[str]]:
    """The ``kv-cache`` pass text closest to ``quantize``'s kv scheme ``opts``, and how that scheme differs from it
    (empty: the packed cache computes exactly this accuracy model, tests/test_kv_cache.py). The packed cache is
    asymmetric, keys per channel over ``k_block``-token blocks, values per token in ``v_group``-channel groups,
    with the sink and at least ``k_block`` recent tokens float."""
    differs = []
    bits = {"int8": 8, "uint8": 8, "int4": 4, "uint4": 4, "int2": 2}.get(opts.kv)
    if bits is None:
        differs.append(f"kv={opts.kv} (the packed cache stores 8, 4 or 2-bit integer codes)")
        bits = 8 if "8" in str(opts.kv) else 4
    for option, value, want in (("k_gran", opts.k_gran, "per_channel"), ("v_gran", opts.v_gran, "per_token"),
                                ("kv_sym", opts.kv_sym, False), ("kv_clip", opts.kv_clip, 1.0)):
        if value != want:
            differs.append(f"{option}={value} (the packed cache's is {want})")
    k_block = opts.k_group or opts.kv_group if opts.k_gran == "per_channel" else None
    v_group = opts.v_group or opts.kv_group if opts.v_gran == "per_token" else None
    if opts.k_gran == "per_channel" and (k_block is None or k_block > 1024):
        differs.append(f"keys per channel over {f'{k_block} tokens' if k_block else 'the whole sequence'} (the "
                       "packed cache's blocks are 1024 tokens at most)")
        k_block = None
    if opts.v_gran == "per_token" and v_group is None:
        differs.append("values per token over the whole head (the packed cache's take v_group=<head_dim>)")
    options = {"bits": bits, "k_block": k_block, "v_group": v_group, "sink": opts.kv_sink if opts.kv_sink <= 64
               else None, "window": opts.kv_window or None}
    if opts.kv_sink > 64:
        differs.append(f"kv_sink={opts.kv_sink} (the packed cache keeps at most 64)")
    if opts.kv_window < (k_block or 32):
        differs.append(f"kv_window={opts.kv_window} (the packed cache reads at least the last k_block="
                       f"{k_block or 32} tokens float)")
        options["window"] = None if k_block is None else k_block
    from lowbit.passes.kv_cache import KVCache

    try:
        text = KVCache(**{k: v for k, v in options.items() if v is not None}).spec()
    except PassError as exc:  # a v_group the packed cache's codes cannot take
        differs.append(str(exc))
        text = KVCache(bits=bits).spec()
    return text, differs


def _refuse_kv_simulation(passes: Sequence[Pass], recipe: str | None = None) -> None:
    """``quantize(kv=...)`` is the prefill accuracy model of a quantized cache (its window mask assumes query i
    sits at position i); on a step graph it would be wrong in decode, so generation refuses it by name, giving the
    pipeline with the packed cache (the ``kv-cache`` pass) in its place: the kv2 recipe was told to append the
    kv4 layout, and a per-token scheme (w4a4kv4) that the packed cache does not compute. For a recipe (whose
    user never wrote pipeline text) it also names the recipes that generate with a quantized cache."""
    from lowbit.models import GenerationError
    from lowbit.recipes import generation_recipes

    for i, p in enumerate(passes):
        opts = getattr(p, "options", None)
        kv = getattr(opts, "kv", None)
        if kv in (None, "none", "float"):
            continue
        cache, differs = _packed_cache(opts)
        kept = copy.copy(p)
        kept.options = opts.model_copy(update={k: type(opts).model_fields[k].default for k in _KV_OPTIONS})
        kept_passes = [*passes[:i], *([kept] if kept.spec() != p.name else []), *passes[i + 1:]]
        instead = quote_pipeline(f"{format_pipeline(kept_passes)},{cache}" if kept_passes else cache)
        if recipe is not None:
            how = (f"recipe {recipe}'s KV layout has no packed-cache form; the recipes that generate with a "
                   f"quantized cache are {', '.join(generation_recipes())} (--recipe kv4), or give the nearest "
                   f"pipeline, whose cache differs ({'; '.join(differs)}; measure its accuracy with `lowbit debug "
                   f"compare`): --pipeline {instead}") if differs else f"its packed form is --pipeline {instead}"
        else:
            advice = f"pipeline={instead}"
            how = (f"its packed form of this pass' kv scheme is {advice}" if not differs else
                   f"it does not compute this pass' kv scheme ({'; '.join(differs)}); the nearest is {advice}, "
                   "whose accuracy differs (measure it with `lowbit debug compare`)")
        what = f"recipe {recipe}: pass {p.spec()}" if recipe else f"pass {p.spec()}"
        raise GenerationError(
            f"{what}: KV-cache quantization is modelled for prefill only (the quantize pass' accuracy model, whose "
            "window mask assumes query i sits at position i); generation quantizes the cache itself as a packed "
            f"cache (the kv-cache pass): {how}")


def _refuse_distillation(passes: Sequence[Pass]) -> None:
    """``distill`` and ``tune-qparams`` train toward their teacher's logits over ``input_ids -> logits`` graphs; on a
    step graph (positions and the KV cache are inputs too) they failed inside the run, after the capture and every
    pass before them, so generation refuses them by name before any work."""
    from lowbit.models import GenerationError

    for p in passes:
        if getattr(p, "needs_reference", False):
            # the way round (an HF checkpoint compiled again with generation=) is closed to a pipeline whose rotate
            # leaves online Hadamards (the *-e2e recipes): no HF format holds them, and the writer refuses them
            online = [r for r in passes if r.name == "rotate" and (getattr(r.options, "online", False)
                                                                  or getattr(r.options, "online_o", False))]
            way = (f"; but pass {online[0].spec()} leaves online Hadamard rotations, which no HF format holds, so "
                   "this pipeline has no such way: give a pipeline with rotate(online=false,online_o=false), whose "
                   "rotations fold into the weights") if online else ""
            raise GenerationError(
                f"pass {p.spec()} trains toward the teacher's logits on the logits graph (input_ids -> logits); a "
                "generation step graph also takes positions and the KV cache. Compile without generation=, save it "
                "(format='hf' for a float model, 'compressed-tensors' after a quantizer) and compile or load that "
                f"directory with generation={way}")


def _add_last_logits(plan: CompilePlan, generation: Any) -> None:
    """``last-logits`` after the pipeline and the backend's passes when the spec asks for the last position's logits
    only (the default): generation reads one row per prompt, so the final norm and the head run on that row
    alone (a pipeline that names the pass keeps it where it is)."""
    from lowbit.passes.last_logits import LastLogits

    if _generation_spec(generation).logits == "last" and not any(p.name == LastLogits.name for p in plan.passes):
        plan.backend_passes.append(LastLogits())


def _generation_spec(generation: Any) -> Any:
    """``compile_model``'s ``generation=`` as a ``GenerationSpec`` (``True``: the defaults)."""
    from lowbit.generate import GenerationSpec

    spec = GenerationSpec() if generation is True else generation
    if not isinstance(spec, GenerationSpec):
        raise TypeError(f"generation= takes a GenerationSpec or True, got {type(generation).__name__}")
    return spec


def _within_positions(spec: Any, hf_model: torch.nn.Module, defaults: bool) -> Any:
    """``spec`` checked against the model's ``max_position_embeddings``: a cache longer than the positions the model
    was trained on ran positions it never saw (rotary tables past their range; the logits drift without an error).
    ``generation=True`` (the defaults) takes the model's length where it is shorter than the default 512."""
    from lowbit.models import GenerationError

    limit = model_positions(hf_model)
    if limit is None or spec.max_length <= limit:
        return spec
    if defaults:
        return dataclasses.replace(spec, max_length=limit)
    raise GenerationError(f"GenerationSpec.max_length={spec.max_length} is longer than the model's "
                          f"max_position_embeddings={limit} ({type(hf_model).__name__}'s config): positions past "
                          f"{limit - 1} are outside what it was trained on; give max_length <= {limit}")


def _generation_model(model: torch.nn.Module, generation: Any) -> tuple[torch.nn.Module, Any, Any, dict[str, Any]]:
    """The step module to capture for generation, its example inputs and dynamic shapes, and graph meta."""
    from lowbit.generate import step_example
    from lowbit.models import CausalLMLogits, CausalLMStep, GenerationError

    spec = _generation_spec(generation)
    if isinstance(model, CausalLMLogits):
        model = model.model
    if not isinstance(model, CausalLMStep):
        if not (hasattr(model, "lm_head") and hasattr(model, "generation_config")):
            raise GenerationError(f"{type(model).__name__} has no causal-LM head (lm_head): generation needs a "
                                  "decoder LM such as smollm2; an encoder compiles without generation=")
        model = CausalLMStep(model).eval()
    spec = _within_positions(spec, model.model, generation is True)
    example, dynamic = step_example(model, spec)
    eos = getattr(getattr(model.model, "generation_config", None), "eos_token_id", None)
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    meta = {"eos_token_ids": eos, "max_length": spec.max_length, "max_batch": spec.max_batch,
            "cuda_graph": spec.cuda_graph, "prefill_graphs": spec.prefill_graphs,
            "n_layers": model.n_layers, "kv_heads": model.kv_heads, "head_dim": model.head_dim, "logits": spec.logits,
            "windows": model.windows}
    limit = model_positions(model.model)
    if limit is not None:  # calibration windows are checked against it (the step has no symbol)
        meta["max_positions"] = limit
    written_out = model.attention_written_out()
    if written_out is not None:  # kv-cache's refusal names why
        meta["attention_written_out"] = written_out
    if model.rope_switch is not None:  # recorded past max_length too: a longrope step without it is an old artifact
        meta["rope_switch"] = model.rope_switch
    return model, example, dynamic, meta


def resolve_pipeline(pipeline: str | Sequence[Pass | str] | None, recipe: str | None,
                     overrides: Mapping[str, Any] | None = None, generation: bool = False) -> list[Pass]:
    """The passes ``pipeline`` or ``recipe`` name (``generation``: a recipe's generation pipeline, where it has one:
    ``kv4`` quantizes the packed cache with ``kv-cache``), with ``overrides`` of the recipe's options."""
    if pipeline is not None and recipe is not None:
        raise PassError("give either pipeline= or recipe=, not both")
    if overrides is not None and recipe is None:  # accepted and dropped otherwise
        raise PassError("overrides= changes a recipe's options (recipe='w4a16-gptq', overrides={'group': 32}); "
                        "with pipeline= write the options into the pipeline text")
    if recipe is not None:
        from lowbit.recipes import get_recipe, override_options

        if not isinstance(recipe, str):  # recipe=3 was an AttributeError from inside the name lookup
            raise PassError(f"recipe= takes a recipe name such as 'w4a16-g64' (see lowbit recipes), got "
                            f"{type(recipe).__name__} {recipe!r}")

        passes = parse_pipeline(get_recipe(recipe, generation))
        return override_options(recipe, passes, overrides) if overrides is not None else passes
    if pipeline is None:
        return []
    if isinstance(pipeline, str):
        return parse_pipeline(pipeline)
    if not isinstance(pipeline, Sequence):
        raise PassError(f"pipeline= takes pipeline text or a list of passes, got {type(pipeline).__name__}")
    # a list may mix Pass objects and pipeline text ("quantize(w=int4)"): each string is parsed as a pipeline
    passes: list[Pass] = []
    for i, p in enumerate(pipeline):
        if isinstance(p, str):
            passes.extend(parse_pipeline(p))
        elif isinstance(p, Pass):
            passes.append(p)
        else:
            raise PassError(f"pipeline[{i}] is {type(p).__name__} {p!r}: give Pass objects or pipeline text")
    check_order(passes)
    return passes


def _given_tokenizer(tokenizer: Any) -> Any:
    """``compile_model``'s ``tokenizer=``: a tokenizer object, or a name or directory (``smollm2``, ``minilm``, a
    local HF tokenizer directory) loaded here; anything else failed deep in a calibrating pass ("'str' object has
    no attribute 'get_vocab'")."""
    import os

    if tokenizer is None or callable(getattr(tokenizer, "get_vocab", None)):
        return tokenizer
    if isinstance(tokenizer, (str, os.PathLike)):
        from lowbit.calibration.data import load_tokenizer

        try:
            return load_tokenizer(str(tokenizer))
        except (OSError, ValueError) as exc:
            raise PassError(f"tokenizer={str(tokenizer)!r}: {exc}") from None
    raise PassError(f"tokenizer= takes a Hugging Face tokenizer, 'smollm2', 'minilm' or a tokenizer directory, got "
                    f"{type(tokenizer).__name__}")


def lower(graph: Graph, backend: str, device: str | None = None, options: Mapping[str, Any] | None = None) -> Any:
    """Lower ``graph`` to ``backend`` as it is (no backend passes: ``compile_graph`` runs those)."""
    return get_backend(backend).lower(graph, device, dict(options or {}))


@dataclass(frozen=True)
class CompilePlan:
    """What ``compile_graph`` will run, checked before any of it runs."""

    passes: list[Pass]
    backend: BackendSpec
    backend_passes: list[Pass]
    backend_options: dict[str, Any]


def plan_compile(passes: Sequence[Pass], backend: str,
                 backend_options: Mapping[str, Any] | None = None, device: str | None = None) -> CompilePlan:
    """Check the pipeline against the backend before capture and calibration: the backend exists, is built and runs
    here (on ``device`` when given), its options are valid, every op a pass declares it creates
    (``Pass.creates``) is one it lowers, and every pass's own ``device`` option names a device this machine has
    (``DeviceError``)."""
    spec = get_backend(backend)
    spec.check_built()
    opts = spec.parse_options(dict(backend_options or {})).model_dump()
    refusal = _quant_refusal(spec, passes)
    try:
        spec.check_available(device)
    except BackendError as exc:
        if refusal is None:
            raise
        # TensorRT absent (a CPU machine preparing its ONNX): its rules were not said, and the ONNX the advice
        # points to would be refused where TensorRT is
        also = f"\nwhere it runs, it would refuse this pipeline too: it cannot run what {refusal}"
        raise BackendError(f"{exc}{also}", cli=f"{exc.cli}{also}") from None
    from lowbit.errors import DeviceError, check_device

    for p in passes:
        # a calibrating pass's device=cuda on a machine without one (the GPU recipes' advice, --set device=cuda)
        # failed inside the pass, after the model load and the capture
        pass_device = getattr(getattr(p, "options", None), "device", None)
        if isinstance(pass_device, str):
            try:
                check_device(pass_device)
            except DeviceError as exc:
                raise DeviceError(f"pass {p.spec()}: option {exc}") from None
    # the backend's own passes, but for those the pipeline already runs where the user put them: appended again
    # they would follow passes that must come after them (merge-linears after fuse-qlinear), an order no pipeline
    # could then satisfy
    given = {p.name for p in passes}
    extra = [p for p in (parse_pipeline(spec.passes) if spec.passes else []) if p.name not in given]
    gaps = []
    for p in [*passes, *extra]:
        for op in getattr(p, "creates", ()):
            if not spec.lowers(op):
                gaps.append(f"pass {p.spec()} creates {op!r}")
    if gaps:
        raise BackendError(f"backend {spec.name!r} cannot lower what the pipeline creates: {'; '.join(gaps)} "
                           f"(backends lowering them: {_backends_lowering(gaps) or 'none'})")
    if refusal is not None:
        raise BackendError(f"backend {spec.name!r} cannot run what {refusal}")
    return CompilePlan(list(passes), spec, extra, opts)


def _quant_refusal(spec: BackendSpec, passes: Sequence[Pass]) -> str | None:
    """What of the pipeline's quantization the backend's rules refuse (TensorRT's explicit quantization), from the
    options alone, as "PASS writes: problems" and the fix; None: nothing. These were found on the exported ONNX,
    after capture and the whole pipeline's calibration. Every pass's at once: the fp8 recipe's weights were
    refused, and once fixed its activations, one pass per attempt."""
    if spec.quant_rules is None:
        return None
    refused = []
    for p in passes:
        config = p.quant_config()
        problems = spec.quant_problems(config) if config is not None else []
        if problems:
            refused.append(f"pass {p.spec()} writes:\n  - " + "\n  - ".join(problems))
    if not refused:
        return None
    what = refused[0] if len(refused) == 1 else \
        f"{len(refused)} passes write:\n" + "\n".join(f"{i}. {r}" for i, r in enumerate(refused, 1))
    ready = _recipes_for(spec)
    # no recipe was named that the backend builds: a user of -r w4a16-g64 had only the rules to go by
    recipes = f", use a recipe {spec.name} runs ({', '.join(ready)}: `lowbit recipes`)" if ready else ""
    return f"{what}\nchange those options{recipes}, or use a backend that runs them (torch, onnxruntime)"


def _recipes_for(spec: BackendSpec) -> list[str]:
    """The recipes that quantize and whose every pass's schemes ``spec``'s rules accept (TensorRT's ``trt-*``)."""
    from lowbit.recipes import RECIPES

    ready = []
    for name, recipe in RECIPES.items():
        configs = [p.quant_config() for p in parse_pipeline(recipe.pipeline)]
        if any(c is not None for c in configs) and not any(spec.quant_problems(c) for c in configs if c is not None):
            ready.append(name)
    return ready


def _backends_lowering(gaps: list[str]) -> str:
    ops = {g.rsplit("creates ", 1)[1].strip("'") for g in gaps}
    return ", ".join(b.name for b in all_backends().values() if b.built and all(b.lowers(op) for op in ops))


def _offload_directory(offload_dir: str | os.PathLike[str] | None) -> str | None:
    """``compile_model``'s ``offload_dir``, checked before the model loads: an existing, writable directory."""
    if offload_dir is None:
        return None
    if not isinstance(offload_dir, (str, os.PathLike)):
        raise TypeError(f"offload_dir= takes a directory path, got {type(offload_dir).__name__}")
    path = os.path.abspath(os.path.expanduser(os.fspath(offload_dir)))
    if not os.path.isdir(path):
        raise FileNotFoundError(f"offload_dir={os.fspath(offload_dir)!r}: no such directory (give an existing "
                                "directory on disk for the packed weights)")
    if not os.access(path, os.W_OK | os.X_OK):
        raise PermissionError(f"offload_dir={os.fspath(offload_dir)!r}: the directory is not writable")
    from lowbit.ir.offload import ram_backed

    fs = ram_backed(path)
    if fs is not None:  # the packed weights would be written into memory again: no saving, and said
        warnings.warn(f"offload_dir={os.fspath(offload_dir)!r} is on a {fs}, which is memory: packed weights "
                      "offloaded there save none of it; give a directory on disk", UserWarning, stacklevel=3)
    return path


RunPasses = Callable[[Graph, list[Pass], Sequence[Instrument]], PipelineReport]


def compile_graph(graph: Graph, plan: CompilePlan, *, device: str | None = None, verify: bool = True,
                  instruments: Sequence[Instrument] = (), run_passes: RunPasses | None = None,
                  started: float | None = None) -> tuple[Any, CompileReport]:
    """The compile driver: run the plan's pipeline and the backend's passes over ``graph`` (in place), lower it,
    and report. ``run_passes`` replaces the plain ``PassManager`` run (the CLI's adds reproducers on failure)."""
    t0 = started if started is not None else time.perf_counter()
    check_plan_on_graph(graph, plan)  # before the pipeline's calibration, not at lowering
    nodes_before, bytes_before = len(graph.nodes), graph.param_bytes()
    passes = [*plan.passes, *plan.backend_passes]
    if run_passes is None:
        pipeline_report = PassManager(passes, verify_each=verify, instruments=instruments).run(graph)
    else:
        pipeline_report = run_passes(graph, passes, instruments)
    runner = plan.backend.lower(graph, device, plan.backend_options)
    from lowbit.ir.ops import is_semantic

    generic: dict[str, int] = {k: v for k, v in graph.op_counts().items() if not is_semantic(k)}
    report = CompileReport(
        capture={k: v for k, v in graph.meta.items() if k not in ("tokenizer", "source") and _jsonable(v)},
        pipeline=pipeline_report, backend=plan.backend.name, nodes_before=nodes_before,
        nodes_after=len(graph.nodes), param_bytes_before=bytes_before, param_bytes_after=graph.param_bytes(),
        generic_ops=generic, seconds=time.perf_counter() - t0,
        lowering=lowering_lines(runner),
    )
    return runner, report


def check_plan_on_graph(graph: Graph, plan: CompilePlan) -> None:
    """What the plan's backend refuses in this model, before any pass runs: its options against the graph
    (TensorRT's ``shapes=``/``opt=``) and the schemes a pass writes only on this model (``group_fallback``'s).
    ``compile_graph`` calls it; the CLI too, right after capture, so the refusal is a usage error (exit 2) rather
    than "the backend could not lower the graph"."""
    plan.backend.check_graph(graph, plan.backend_options)
    _check_fallback_schemes(graph, plan)


def _check_fallback_schemes(graph: Graph, plan: CompilePlan) -> None:
    """What the backend's quantization rules refuse among the schemes a pass writes on this model only (its
    ``group_fallback`` groups, ``Pass.fallback_schemes``), named by linear, before any pass runs: ``plan_compile``
    checks the options' own schemes before capture, and a fallback group TensorRT refuses was found in the exported
    ONNX, after the pipeline's calibration."""
    spec = plan.backend
    if spec.quant_rules is None:
        return
    from lowbit.ir.qscheme import QuantConfig

    for p in plan.passes:
        refused: dict[str, list[Node]] = {}
        for node, scheme in p.fallback_schemes(graph):
            # this linear's input size: the fix names a group that divides it (128 was offered for a 192-wide one)
            size = node.args[1].type.shape[-1]
            sizes = [size] if isinstance(size, int) else []
            for problem in spec.quant_problems(QuantConfig(weight=scheme, keep_float=[]), sizes):
                refused.setdefault(problem, []).append(node)
        if not refused:
            continue
        fallback, group = (getattr(p.options, k, None) for k in ("group_fallback", "group"))
        lines = []
        for problem, nodes in refused.items():
            named = [f"%{n.name} (module {n.module!r}, input size {n.args[1].type.shape[-1]})" for n in nodes]
            more = f" and {len(named) - 2} more" if len(named) > 2 else ""
            fix = re.sub(r"\bgroup=", "group_fallback=", problem)  # the backend names group=; here it is this
            lines.append(f"linear {', '.join(named[:2])}{more}: {fix}")
        raise BackendError(f"backend {spec.name!r} cannot run what pass {p.spec()} writes on this model: "
                           f"group_fallback={fallback} is the group of the linears whose input size group={group} "
                           "does not divide:\n  - " + "\n  - ".join(lines) + "\nchange group_fallback (or give a group "
                           "that divides those input sizes), or use a backend that runs them (torch, onnxruntime)")


def lowering_lines(runner: Any) -> list[str]:
    """What a backend's lowering decided (its runner's ``report_text()``), as the report's ``lowering`` lines."""
    return runner.report_text().splitlines() if callable(getattr(runner, "report_text", None)) else []


def _jsonable(v: Any) -> bool:
    import json

    try:
        json.dumps(v)
        return True
    except (TypeError, ValueError):
        return False


def compile_model(
    model: torch.nn.Module | str | os.PathLike[str],
    example_inputs: tuple[Any, ...] | Mapping[str, Any] | torch.Tensor | None = None,
    *,
    pipeline: str | Sequence[Pass | str] | None = None,
    recipe: str | None = None,
    backend: str = "torch",
    device: str | None = None,
    dynamic_shapes: Any = "auto",
    verify: bool = True,
    instruments: Sequence[Instrument] | None = (),
    tokenizer: Any = None,
    backend_options: Mapping[str, Any] | None = None,
    calib: str | torch.Tensor | None = None,
    generation: Any = None,
    overrides: Mapping[str, Any] | None = None,
    offload_dir: str | os.PathLike[str] | None = None,
    run_passes: RunPasses | None = None,
) -> CompiledModel:
    """Capture ``model``, run ``pipeline`` (text like ``"fold-norms,dce"``, or a list of passes and texts) or
    ``recipe``, lower to ``backend``. ``overrides`` changes a recipe's options: ``recipe="w4a16-gptq",
    overrides={"group": 32, "gptq.calib_n": 64}`` (``OPTION`` on the pass of the recipe that has it, a
    calibration option on every calibrating pass that reads it; ``PASS.OPTION`` on that pass, needed where several
    passes have the option), validated as pipeline options are; a key no pass takes, or one several passes take, is
    an error naming them (``lowbit.recipes.override_options``).

    ``model`` may be a name or path understood by ``lowbit.models.load_model`` (``"smollm2"``, ``"minilm"``,
    an HF directory, a ``.gguf`` file). ``backend_options`` are the backend's own (``{"keep_packed": True}`` on
    torch; ONNX lowering options on onnxruntime). Returns a callable ``CompiledModel`` with ``.graph`` and
    ``.report``.

    ``example_inputs`` are what ``torch.export`` captures the model with; left out, lowbit builds them for the models
    it wraps (a causal LM, ``lowbit.models.SentenceEmbedder``, an ``ExportedProgram`` from the inputs it recorded) and
    any other model is refused, asking for them. ``dynamic_shapes`` is ``torch.export``'s; ``"auto"`` makes batch and
    sequence dynamic where lowbit built the example, and keeps every dim static with inputs you give (the compiled
    model then takes exactly their shapes: pass ``dynamic_shapes`` for a dim that varies). ``device`` is where the
    lowered model runs (``"cpu"``, ``"cuda"``; None: the backend's default); calibrating passes take their own
    ``device=`` option. ``verify=False`` skips the IR verifier after each pass. ``instruments`` are
    ``lowbit.passes.manager.Instrument`` objects called around every pass (``lowbit.instruments.NumericCheck``,
    ``PrintIR``, ...).

    Calibrating passes tokenize their text with ``tokenizer`` (a tokenizer, ``"smollm2"``, ``"minilm"`` or a
    tokenizer directory); unset, with the tokenizer saved beside a Hugging Face model (its ``name_or_path``
    directory). ``calib`` (a text name or path, a ``.safetensors`` file of token ids, or a tensor of ids: ``[n, L]``
    windows or a 1-D stream) replaces the data of every pass that calibrates; a pipeline with none is refused.

    ``offload_dir`` (an existing directory on disk, not a RAM-backed tmpfs: one is warned of) takes each packed
    weight a quantizing pass writes, and each float weight a pass rewrites (fold-norms, smooth-quant, rotate), mapped
    back from there (``lowbit.ir.offload``), so a compile holds one block's working set and not the whole packed (or
    rewritten) model: for models larger than RAM. The files are unlinked at once; nothing is left there. On
    the torch backend it implies ``keep_packed=True`` (the module runs on the mapped codes, not on float copies the
    size of the float model) unless ``backend_options`` sets ``keep_packed``.

    ``generation=GenerationSpec(max_length, max_batch)`` (or ``True`` for the defaults) captures the model's
    generation step instead (``lowbit.models.CausalLMStep``: ids, positions, KV cache -> logits, cache; see
    docs/design.md "Program form"), so ``CompiledModel.generate`` works; passes calibrate on its prefill.

    ``run_passes(graph, passes, instruments)`` replaces the plain ``PassManager`` run, as ``compile_graph``'s does
    (``lowbit generate``'s writes a reproducer of a pass that fails on the step graph).

    Raises, each a ``lowbit.errors.LowbitError`` naming what is at fault: ``PassError`` for an unknown pass,
    recipe or option (closest names suggested) and ``BackendError`` for an unknown backend, a backend option or an
    op the backend cannot lower, both before the model is loaded; ``DeviceError`` for a device this machine lacks;
    ``CaptureError`` when ``torch.export`` cannot capture the model; ``GenerationError`` for a ``generation=``
    spec or a model the step graph cannot serve (named); ``PipelineError`` when a pass fails or leaves
    invalid IR (it carries the pass's record and the IR before it); ``LoweringError`` when the backend cannot lower
    a node. A model name or path that does not exist is a ``FileNotFoundError``; an argument of the wrong type a
    ``TypeError``.
    """
    from lowbit.errors import check_device

    t0 = time.perf_counter()
    check_device(device)
    if not isinstance(verify, bool):  # verify="no" is truthy: it verified
        raise TypeError(f"verify= takes True or False, got {type(verify).__name__} {verify!r}")
    if instruments is None:  # "no instruments", as the default () says it
        instruments = ()
    if not isinstance(instruments, Sequence) or isinstance(instruments, str):  # was "object is not iterable"
        kind = type(instruments).__name__
        hint = f": pass [{kind}(...)]" if hasattr(instruments, "after_pass") else ""
        raise TypeError(f"instruments= takes a list of Instrument objects, got {kind}{hint}")
    for i, ins in enumerate(instruments):
        if not (callable(getattr(ins, "before_pass", None)) and callable(getattr(ins, "after_pass", None))):
            raise TypeError(f"instruments[{i}] is {type(ins).__name__}, not an Instrument (before_pass/after_pass): "
                            "give lowbit.passes.manager.Instrument objects such as PrintIR or NumericCheck")
    if isinstance(model, os.PathLike):  # a Path to a model directory or .gguf, like its string
        model = os.fspath(model)
    if not isinstance(model, (str, torch.nn.Module, torch.export.ExportedProgram)):  # None was 'no example inputs'
        raise TypeError(f"model must be an nn.Module (or an ExportedProgram) or a name or path (smollm2, minilm, an "
                        f"HF directory, a .gguf), got {type(model).__name__}")
    passes = resolve_pipeline(pipeline, recipe, overrides, bool(generation))  # bad specs fail before the capture
    offload = _offload_directory(offload_dir)
    if offload is not None and backend == "torch" and "keep_packed" not in (backend_options or {}):
        # dequantizing at lowering (the torch default) put a float copy of every packed weight in the heap: the
        # float model's size again, so the offload saved nothing once the compile returned
        backend_options = {**(backend_options or {}), "keep_packed": True}
    tokenizer = _given_tokenizer(tokenizer)
    if calib is not None:
        from lowbit.passes.base import CalibrationOptions
        from lowbit.passes.manager import check_input_files

        # both given: calib= replaced the override on every calibrating pass, silently
        given = [k for k in (overrides or {}) if isinstance(k, str) and k.rpartition(".")[2].strip() == "calib"]
        if given:
            raise PassError(f"calib= and overrides={{{given[0]!r}: ...}} both give calibration data, and calib= would "
                            f"silently replace the override on every calibrating pass: give one of them")

        import pydantic

        readers = [p for p in passes if isinstance(p.options, CalibrationOptions) and p.options.reads_calibration()]
        if not readers:  # it would be silently ignored
            shown = quote_pipeline(format_pipeline(passes)) if passes else "(empty)"
            raise PassError(f"calib= is read by calibrating passes (gptq, awq, smooth-quant, quantize(a_static=true), "
                            f"...); the pipeline {shown} has none")
        for p in readers:
            # a copy: the caller's Pass objects (pipeline=[GPTQ(...)]) must not keep this call's data for the next
            mine = copy.copy(p)
            mine.options = p.options.model_copy()
            try:
                mine.options.calib = calib
            except pydantic.ValidationError as exc:
                raise PassError(f"pass {p.name}: calib: {exc.errors()[0]['msg'].removeprefix('Value error, ')}"
                                ) from None
            passes[passes.index(p)] = mine
        check_input_files(passes)
    plan = plan_compile(passes, backend, backend_options, device)  # so does a backend that cannot take the pipeline
    if generation:
        refuse_for_generation(passes, recipe)
        _add_last_logits(plan, generation)
    if isinstance(model, str):
        from lowbit.models import float32_copy, load_model

        stored = float32_copy(model)
        if stored is not None:  # twice the checkpoint in memory, without a word: a bf16 model larger than RAM failed
            dtype = str(stored[0]).removeprefix("torch.")
            warnings.warn(f"compile_model({model!r}) loads the model in float32, but it stores its weights in {dtype}: "
                          f"a float32 copy of every weight in memory (about {2 * stored[1] / 2**20:.0f} MiB); to keep "
                          f"them {dtype} and memory-mapped (a model larger than RAM), pass lowbit.models.load_model("
                          f"{model!r}, dtype='auto')[0] instead", UserWarning, stacklevel=2)
        model, loaded, _ = load_model(model)
        tokenizer = loaded if tokenizer is None else tokenizer  # a tokenizer= given is kept
    elif tokenizer is None:
        tokenizer = own_tokenizer(model)
    # a text too short for calib_n x calib_len, or windows longer than the model's positions: before the capture
    check_calibration_texts(passes, tokenizer, positions=model_positions(model),
                            max_seq_length=getattr(model, "max_seq_length", None))
    # the wrappers below capture in eval mode, which .eval() sets on the caller's modules too: put them back after
    modes = [(m, m.training) for m in model.modules()] if isinstance(model, torch.nn.Module) else []
    try:
        if generation:
            model, example_inputs, dynamic_shapes, gen_meta = _generation_model(model, generation)
        elif hasattr(model, "lm_head") and hasattr(model, "generation_config"):
            from lowbit.models import CausalLMLogits

            model = CausalLMLogits(model).eval()
        if example_inputs is None:
            example_inputs, auto_dyn = _default_example(model, tokenizer)
            if dynamic_shapes == "auto":
                dynamic_shapes = auto_dyn
        if dynamic_shapes == "auto":
            dynamic_shapes = None
        graph = capture(model, example_inputs, dynamic_shapes)
        refuse_unrunnable(graph, model)
        graph.offload_dir = offload
    finally:
        for m, training in modes:
            m.training = training
    graph.meta["source"] = describe_source(model, graph)
    if generation:
        record_step_graph(graph, gen_meta)
    if tokenizer is not None:
        graph.meta["tokenizer"] = tokenizer
    runner, report = compile_graph(graph, plan, device=device, verify=verify, instruments=instruments,
                                   run_passes=run_passes, started=t0)
    return CompiledModel(runner, graph, report, tokenizer)
