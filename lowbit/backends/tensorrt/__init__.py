"""The TensorRT backend: lowbit's QDQ ONNX → a TensorRT engine (explicit quantization), saved, loaded, run.

    from lowbit.backends.tensorrt import TensorRTCompiled, check_tensorrt_qdq
    check_tensorrt_qdq("model.onnx")          # TensorRT's Q/DQ rules, no TensorRT needed
    trt_model = TensorRTCompiled(graph)       # lower, check, build (needs tensorrt + a GPU)
    trt_model.save("model.engine"); TensorRTCompiled.load("model.engine")

Building and running need the ``tensorrt`` package and an NVIDIA GPU; without them ``TensorRTUnavailable``
says so. The checker and the engine-file integrity checks run anywhere.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from lowbit.backends.tensorrt.engine import (
    TensorRTBuildError,
    TensorRTOptionError,
    TensorRTRunner,
    TensorRTUnavailable,
    build_engine,
    builder_config,
    check_build_options,
    check_graph_options,
    check_profile_inputs,
    check_profile_optima,
    import_tensorrt,
    load_engine,
    profile_from_symbols,
    save_engine,
)
from lowbit.backends.tensorrt.engine_file import VOCAB_KEY, EngineFileError, EngineHeader, read_engine, write_engine
from lowbit.backends.tensorrt.qdq_rules import RULES, Violation, check_tensorrt_qdq, errors
from lowbit.errors import LowbitError
from lowbit.ir.graph import Graph
from lowbit.ir.signature import InputChecker, ordered_inputs

__all__ = [
    "EngineFileError",
    "EngineHeader",
    "RULES",
    "TensorRTBuildError",
    "TensorRTCompiled",
    "TensorRTOptionError",
    "TensorRTQDQError",
    "TensorRTUnavailable",
    "Violation",
    "build_engine",
    "builder_config",
    "cache_entry",
    "check_build_options",
    "check_graph_options",
    "check_profile_inputs",
    "check_profile_optima",
    "check_tensorrt_qdq",
    "export_engine",
    "import_tensorrt",
    "load_engine",
    "profile_from_symbols",
    "read_engine",
    "save_engine",
    "write_engine",
]


class TensorRTQDQError(LowbitError, ValueError):
    """The exported ONNX breaks TensorRT's explicit-quantization rules; ``violations`` lists each."""

    def __init__(self, violations: list[Violation]) -> None:
        self.violations = violations
        # one line per rule (its first violation, then where else it is broken): a model's every linear breaks the
        # same rule, and one line per node was hundreds of lines of one message (360 for W8A8 SmolLM2)
        by_rule: dict[str, list[Violation]] = {}
        for v in violations:
            by_rule.setdefault(v.rule, []).append(v)
        lines = []
        for vs in by_rule.values():
            more = "" if len(vs) == 1 else \
                f" (and {len(vs) - 1} more: {', '.join(v.node for v in vs[1:4])}{', ...' if len(vs) > 4 else ''})"
            lines.append(f"{vs[0]}{more}")
        super().__init__(f"{len(violations)} TensorRT Q/DQ rule violation(s) of {len(by_rule)} rule(s); "
                         "`.violations` lists each:\n  - " + "\n  - ".join(lines))


def _checked_onnx(graph: Graph, directory: Path) -> Path:
    """Lower ``graph`` to TensorRT-friendly QDQ ONNX in ``directory`` and enforce the Q/DQ rules."""
    from lowbit.backends.onnx import save_onnx, to_onnx

    model = to_onnx(graph, opset=21, weight_format="qdq", attention="decompose")
    found = check_tensorrt_qdq(model)
    bad = errors(found)
    if bad:
        raise TensorRTQDQError(bad)
    for v in found:
        warnings.warn(f"TensorRT Q/DQ: {v}", stacklevel=3)
    return save_onnx(model, directory / "model.onnx")


def export_engine(graph: Graph, path: str | os.PathLike[str], *, onnx_dir: str | os.PathLike[str] | None = None,
                  **build: Any) -> Path:
    """Lower, check and build ``graph`` into an engine file at ``path`` (build options: ``build_engine``).

    ``onnx_dir``: a directory to keep the checked QDQ ONNX TensorRT builds from (``model.onnx``), instead of a
    temporary one. A step graph's generation meta goes into the header's ``extra`` (``lowbit.generation``), which
    ``lowbit.export.load`` validates and reads back to give the engine ``generate()``."""
    check_build_options(build, also=("onnx_dir",))
    check_graph_options(graph, build)
    if onnx_dir is not None and not isinstance(onnx_dir, (str, os.PathLike)):  # was a TypeError from Path() later
        raise TensorRTOptionError(f"TensorRT option onnx_dir={onnx_dir!r}: give a directory path or None")
    import_tensorrt()  # fail before the lowering work when TensorRT is absent
    with tempfile.TemporaryDirectory(prefix="lowbit-trt-") as tmp:
        onnx_path = _checked_onnx(graph, Path(onnx_dir or tmp))
        plan, header = build_engine(onnx_path, **build)
    if onnx_dir is None:
        header.source = ""  # a temporary file, gone: the header named a path that never existed for its reader
    if graph.meta.get("generation") is not None:
        header.extra["lowbit.generation"] = dict(graph.meta["generation"])
        vocab = logits_width(graph)
        if vocab is not None:  # generate() refuses a stop token past it before any work (the ONNX file declares it)
            header.extra[VOCAB_KEY] = vocab
    return save_engine(path, plan, header)


def logits_width(graph: Graph) -> int | None:
    """The last dim of ``graph``'s first output (a step graph's logits, the vocabulary), None where symbolic."""
    shape = getattr(getattr(graph.outputs[0], "type", None), "shape", None) if graph.outputs else None
    return shape[-1] if shape and isinstance(shape[-1], int) else None


class TensorRTCompiled(torch.nn.Module):
    """A graph built into a TensorRT engine; called like ``TorchCompiled`` (inputs moved to CUDA)."""

    def __init__(self, graph: Graph | None = None, *, engine: str | os.PathLike[str] | None = None,
                 shapes: Mapping[str, tuple[Any, Any, Any]] | None = None,
                 engine_cache: str | os.PathLike[str] | None = None, **build: Any) -> None:
        super().__init__()
        if (graph is None) == (engine is None):
            raise TypeError("TensorRTCompiled takes a lowbit Graph or an engine file (engine=...), exactly one")
        self.graph = graph
        self.cached: Path | None = None
        """The engine_cache file this engine was loaded from (None: built here)."""
        if graph is not None:
            check_build_options({"shapes": shapes, **build}, also=("engine_cache",))
            check_graph_options(graph, {"shapes": shapes, **build})
            if engine_cache is not None and not isinstance(engine_cache, (str, os.PathLike)):
                raise TensorRTOptionError(f"TensorRT option engine_cache={engine_cache!r}: give a directory path "
                                          "or None")
            trt = import_tensorrt()
            with tempfile.TemporaryDirectory(prefix="lowbit-trt-") as tmp:
                onnx_path = _checked_onnx(graph, Path(tmp))
                entry = None if engine_cache is None else \
                    cache_entry(engine_cache, onnx_path, {"shapes": shapes, **build}, trt.__version__)
                cached = _cached_engine(entry) if entry is not None else None
                if cached is not None:
                    self.plan, self.header = cached
                    self.cached = entry
                else:
                    self.plan, self.header = build_engine(onnx_path, shapes=shapes, **build)
                    self.header.source = ""  # the temporary ONNX, gone once built
                    if entry is not None:
                        save_engine(entry, self.plan, self.header)  # type: ignore[arg-type]
            self.runner = TensorRTRunner(self.plan, self.header)
        else:
            self.plan, self.header = read_engine(engine)  # type: ignore[arg-type]
            self.runner = TensorRTRunner(self.plan, self.header, where=os.fspath(engine))  # type: ignore[arg-type]
        self.input_names = self.runner.inputs
        self.device: torch.device = self.runner.device
        """The CUDA device the engine runs on, as every compiled runner has one: ``generate`` makes its KV cache there
        and replays its decode steps from CUDA graphs (without it the cache was made on the CPU and copied over at
        every call)."""
        # as every other backend: a float tensor of ids, a wrong rank or an id outside the vocabulary is named here,
        # not cast by the binding (ids were truncated) or read out of bounds by TensorRT's Gather
        self.check_inputs = InputChecker(graph) if graph is not None else None

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> TensorRTCompiled:
        return cls(engine=path)

    def save(self, path: str | os.PathLike[str]) -> Path:
        if self.header is None:
            raise ValueError("this engine came from a raw plan file; copy that file instead")
        return save_engine(path, self.plan, self.header)

    def report_text(self) -> str:
        """The engine's TensorRT version and optimization profile (``CompileReport.lowering``): the calls it takes,
        which a compile said nothing of (``lowbit inspect`` read them off a saved engine only)."""
        header = self.header
        if header is None:
            return "TensorRT engine from a raw plan (no lowbit header): only TensorRT can read what it takes"
        where = f", loaded from engine_cache {self.cached}" if self.cached is not None else ""
        lines = [f"TensorRT {header.tensorrt_version} engine, {'strongly' if header.strongly_typed else 'weakly'} "
                 f"typed{where}; optimization profile (min / opt / max):"]
        lines += [f"  {name}: " + " / ".join("x".join(map(str, s)) for s in shapes)
                  for name, shapes in header.profile.items()]
        return "\n".join(lines)

    @torch.no_grad()
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        args = ordered_inputs(self.input_names, args, kwargs)
        if self.check_inputs is not None:
            args = self.check_inputs(args)
        outs = self.runner(*args)
        return outs[0] if len(outs) == 1 else tuple(outs)


def _cached_engine(entry: Path) -> tuple[bytes, EngineHeader | None] | None:
    """The engine ``engine_cache`` holds at ``entry``, or None: none yet, or a damaged one (a killed write, a flipped
    byte), which is said and built again rather than failing the compile or loading a bad plan."""
    if not entry.is_file():
        return None
    try:
        return read_engine(entry)
    except EngineFileError as exc:
        warnings.warn(f"TensorRT engine cache: {exc}; building the engine again", stacklevel=3)
        return None


def cache_entry(directory: str | os.PathLike[str], onnx_path: Path, build: Mapping[str, Any], version: str) -> Path:
    """The engine file ``engine_cache`` keeps for this build: named by the SHA-256 of the ONNX it is built from
    (its external data too), the build options and the TensorRT version, so a changed graph, option or TensorRT
    builds afresh and never loads a stale engine."""
    import hashlib
    import json

    from lowbit.hashing import sha256_file

    h = hashlib.sha256()
    for f in sorted(onnx_path.parent.iterdir()):
        if f.is_file():
            h.update(f.name.encode() + b"\0" + sha256_file(f).encode())
    # the timing cache only speeds a build up: where it lives does not change the engine
    h.update(json.dumps({k: v for k, v in build.items() if k != "timing_cache"}, sort_keys=True, default=str).encode())
    h.update(version.encode())
    return Path(directory).expanduser() / f"{h.hexdigest()[:32]}.engine"


def lower(graph: Graph, device: str | None = None, **options: Any) -> TensorRTCompiled:
    """The backend registry's entry point (TensorRT runs on CUDA whatever ``device`` says); ``options`` are
    ``TensorRTBackendOptions``' (``build_engine``'s, and ``engine_cache``)."""
    return TensorRTCompiled(graph, **options)
