"""One capture per model architecture a process loads: the graph of a checkpoint loaded before, with this one's weights.

``lowbit.load`` of a compressed-tensors or GPTQ directory builds the HF model from ``config.json`` and captures it:
torch.export was ~90% of a load (a 2-block Llama: 1.5 of 1.6 CPU-s; SmolLM2: ~20 s), and the same architecture was
exported again for every load: a reload, or the same model saved under other recipes and compared. The graph depends
on the model's config (quantization settings aside: the skeleton drops them), its parameters' shapes and dtypes, the
wrapper and the example's shapes, never on the weights' values; so the first capture's structure is kept (no
tensors of its own checkpoint: each parameter is remembered as the module tensor it was read from) and a later load
of the same key gets a clone bound to its own model's tensors. Nothing is written to disk: a cache entry lives as
long as the process, and a key that cannot be rebound (a parameter the new model lacks, another shape) is captured
afresh.
"""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch

from lowbit.ir.graph import Graph

__all__ = ["capture_once", "clear"]

KEEP = 8
"""Architectures kept (least recently used dropped first); an entry holds the IR structure and the small constants
traced from the code (never the checkpoint's weights), tens of KB for SmolLM2."""

_ENTRIES: OrderedDict[str, tuple[Graph, dict[str, str]]] = OrderedDict()
_LOCK = threading.Lock()
"""Guards ``_ENTRIES`` (not the captures): loads in several threads read, refresh and evict it at once."""


def clear() -> None:
    """Forget every kept structure (the next load of each architecture captures again)."""
    with _LOCK:
        _ENTRIES.clear()


def _shape_key(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return ["tensor", str(x.dtype), list(x.shape)]
    if isinstance(x, dict):
        return {str(k): _shape_key(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_shape_key(v) for v in x]
    return repr(x)


def _key(wrapper: torch.nn.Module, hf_model: torch.nn.Module, example: Any, dynamic_shapes: Any, variant: Any) -> str:
    """What the captured graph depends on: the wrapper, the HF config less its quantization settings and its path, the
    parameters' and buffers' names, shapes and dtypes, the example's and dynamic dims' shapes, and ``variant`` (the
    generation spec)."""
    config = hf_model.config.to_dict()
    for field in ("quantization_config", "_name_or_path"):
        config.pop(field, None)
    tensors = [[name, str(t.dtype), list(t.shape)] for name, t in _module_tensors(wrapper).items()]
    return json.dumps([type(wrapper).__qualname__, config, tensors, _shape_key(example), _shape_key(dynamic_shapes),
                       repr(variant)], sort_keys=True, default=repr)


def _module_tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer by name, a tied one under each of its names."""
    found = dict(module.named_parameters(remove_duplicate=False))
    found.update(module.named_buffers(remove_duplicate=False))
    return found


def _where(t: torch.Tensor) -> tuple[Any, ...]:
    return t.device.type, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype


def _structure(graph: Graph, wrapper: torch.nn.Module) -> tuple[Graph, dict[str, str]] | None:
    """(a clone of ``graph`` whose parameters read from the wrapper hold no data, graph param -> wrapper tensor name),
    or None where a parameter named as a module tensor is not that tensor. Parameters read from no module tensor
    (constants the code made while tracing, from the config) keep their data."""
    by_place = {}
    for name, t in _module_tensors(wrapper).items():
        by_place.setdefault(_where(t), name)
    kept = graph.clone()
    sources = {}
    for name, v in kept.params.items():
        source = by_place.get(_where(v.data)) if v.data is not None else None
        if source is not None:
            sources[name] = source
            v.data = None
        elif any(n == name or n.endswith("." + name) for n in by_place.values()):
            return None  # a module's own tensor, copied on the way: kept, it would hold this checkpoint's weights
    return kept, sources


def _bound(kept: Graph, sources: dict[str, str], wrapper: torch.nn.Module) -> Graph | None:
    """A clone of ``kept`` with the wrapper's tensors as its parameters, or None where one is missing or differs."""
    tensors = _module_tensors(wrapper)
    graph = kept.clone()
    for name, source in sources.items():
        t = tensors.get(source)
        v = graph.params[name]
        if t is None or tuple(t.shape) != tuple(v.type.shape) or t.dtype != v.type.dtype:
            return None
        v.data = t.detach()
    return graph


def capture_once(capture: Callable[..., Graph], wrapper: torch.nn.Module, hf_model: torch.nn.Module, example: Any,
                 dynamic_shapes: Any, variant: Any = None) -> Graph:
    """``capture(wrapper, example, dynamic_shapes)``, or the graph a load of the same architecture captured before,
    bound to ``wrapper``'s tensors (``graph.meta["capture_reused"]``: True; ``export_seconds`` 0)."""
    key = _key(wrapper, hf_model, example, dynamic_shapes, variant)
    with _LOCK:
        entry = _ENTRIES.get(key)
    if entry is not None:
        t0 = time.perf_counter()
        graph = _bound(*entry, wrapper)
        if graph is not None:
            with _LOCK:
                if key in _ENTRIES:  # another thread's load may have evicted it (or cleared all) meanwhile
                    _ENTRIES.move_to_end(key)
            graph.meta.update(export_seconds=0.0, convert_seconds=round(time.perf_counter() - t0, 3),
                              capture_reused=True)
            return graph
    graph = capture(wrapper, example, dynamic_shapes)
    structure = _structure(graph, wrapper)
    if structure is None:
        return graph
    with _LOCK:
        _ENTRIES[key] = structure
        while len(_ENTRIES) > KEEP:
            _ENTRIES.popitem(last=False)
    return graph
