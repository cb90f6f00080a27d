"""``lowbit.export``: write a compiled model (or a Graph) as a deployable file, and load one back.

Formats:
- ``"onnx"``: standard QDQ ONNX (opset 21: INT8/FP8 Q/DQ, INT4/UINT4 block-wise weights) — ONNX Runtime,
  TensorRT and any ONNX consumer; checked with ``onnx.checker`` (full check) after writing.
- ``"onnx-matmulnbits"``: the same, with 4-bit weight-only linears as ``com.microsoft::MatMulNBits``
  (ONNX Runtime's int4 GEMM; not for TensorRT); an ``ExportFormWarning`` names the quantized linears left in QDQ
  form (8-bit weights below ``accuracy_level=4``, quantized activations).
- ``"tensorrt"``: a TensorRT engine built from the QDQ ONNX after TensorRT's Q/DQ rules are checked
  (needs ``tensorrt`` and a GPU).
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import sys
import tempfile
import types
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from lowbit.errors import LowbitError, OptionError, did_you_mean
from lowbit.ir.graph import graph_of

FORMATS = ("onnx", "onnx-matmulnbits", "tensorrt")


def export(compiled: Any, path: str | os.PathLike[str], format: str = "onnx", *, check: bool = True,
           external_data: bool | None = None, **options: Any) -> Path:
    """Write ``compiled`` to ``path`` in ``format``; returns the path.

    ONNX options (``opset``, ``attention``, ``accuracy_level``) go to ``lowbit.backends.onnx.LoweringOptions``;
    TensorRT options (``shapes``, ``timing_cache``, ``workspace_bytes``, ...) to ``build_engine``, and ``onnx_dir``
    (where to keep the QDQ ONNX the engine is built from) to ``export_engine``.
    ``external_data`` forces (or forbids) a ``.data`` side file; by default models over ~1.8 GB use one.
    ``check=False`` skips ``onnx.checker``'s full check of the written file. Both are for ONNX files:
    ``"tensorrt"`` refuses them.

    Raises ``OnnxLoweringError`` (a ``lowbit.errors.LowbitError``) listing every node the ONNX lowering cannot
    write, by op and module; ``ExportPathError`` for a path it cannot write; ``ExportError`` for an unknown format
    (closest names suggested), a directory as the path or a bad ``external_data``; ``lowbit.errors.OptionError`` (a
    ``TypeError``) for an unknown option; ``LoweringOptionError`` (a ``ValueError``) for an option value the ONNX
    lowering cannot take (``opset=19``, ``attention="onnx"`` below opset 23).
    """
    if format not in FORMATS:
        raise ExportError(f"unknown export format {format!r}{did_you_mean(format, list(FORMATS))}; "
                          f"known: {', '.join(FORMATS)}")
    if external_data is not None and not isinstance(external_data, bool):  # "false" is truthy: it wrote a .data file
        raise ExportError(f"external_data takes True, False or None (by size), got {external_data!r}")
    inner = getattr(compiled, "runner", compiled)  # GeneratingOnnx runs an OrtCompiled
    if getattr(compiled, "graph", None) is None and hasattr(inner, "graph") and inner.graph is None:
        # was "expected ... a compiled model with a .graph, got OrtCompiled": it has one, empty
        raise TypeError(f"this {type(compiled).__name__} runs a file (lowbit.export.load) and holds no lowbit graph to "
                        "export again: copy that file, or export the compiled model it was written from")
    graph = graph_of(compiled)
    # 'out/' names a directory even before it exists: Path drops the slash, and a file named 'out' was written
    as_dir = os.fspath(path).endswith(tuple(sep for sep in (os.sep, os.altsep) if sep))
    path = Path(path).expanduser()  # as lowbit.save: '~/m.onnx' was written under a directory named '~'
    if as_dir or path.is_dir():  # an engine too: it was found only when the built plan was renamed onto the directory
        suggestion = path / ("model.engine" if format == "tensorrt" else "model.onnx")
        raise ExportError(f"export path {str(path)!r} is a directory: give a file path such as {str(suggestion)!r}")
    if format == "tensorrt":
        from lowbit.backends.tensorrt import export_engine

        # both were accepted and dropped: an engine is one file (no .data side file), and no onnx.checker runs on it
        # (the ONNX it is built from always passes TensorRT's Q/DQ rules first)
        given = [f"{k}={v!r}" for k, v, default in (("external_data", external_data, None), ("check", check, True))
                 if v is not default]
        if given:
            raise OptionError(f"{', '.join(given)} applies to ONNX files; format='tensorrt' writes one engine file "
                              "(built from ONNX that is always checked against TensorRT's Q/DQ rules): drop it, or "
                              "export format='onnx' with it")

        if graph.meta.get("generation") is not None:  # checked as the ONNX file's: export_engine records it
            from lowbit.checkpoint import GenerationMeta, validated_meta

            validated_meta(GenerationMeta, graph.meta["generation"], "graph.meta['generation']")
        with _created_dirs_removed_on_failure(check_writable(path)):
            return export_engine(graph, path, **options)
    from dataclasses import fields

    from lowbit.backends.onnx import LoweringOptions, check_onnx, save_onnx, to_onnx

    # named here: a misspelt option was LoweringOptions' bare "unexpected keyword argument", and a directory path
    # an IsADirectoryError from the writer after the whole lowering
    known = sorted(f.name for f in fields(LoweringOptions) if f.name != "weight_format")
    for key in options:
        if key not in known:
            raise OptionError(f"unknown ONNX export option {key!r}{did_you_mean(key, known)}; options are: "
                              f"{', '.join(known)} (the format picks weight_format: 'onnx' is QDQ, 'onnx-matmulnbits' "
                              "MatMulNBits)")
    with _created_dirs_removed_on_failure(check_writable(path)):
        weight_format = "matmulnbits" if format == "onnx-matmulnbits" else "qdq"
        model = to_onnx(graph, weight_format=weight_format, **options)
        if graph.meta.get("generation") is not None:  # what generate() needs beside the step: load() reads it back
            from lowbit.checkpoint import GenerationMeta, validated_meta

            meta = validated_meta(GenerationMeta, graph.meta["generation"], "graph.meta['generation']")
            model.metadata_props[GENERATION_KEY] = json.dumps(meta)
        out = save_onnx(model, path, external_data=external_data)
    if check:
        check_onnx(out, full_check=True)
    from lowbit.backends.onnx.lowering import unfused_integer_matmul, unfused_matmulnbits

    notes = [unfused_matmulnbits(model) if weight_format == "matmulnbits" else None,
             unfused_integer_matmul(model) if options.get("integer_matmul") else None]
    for note in notes:
        if note is not None:  # the file was written in the QDQ form without a word
            warnings.warn(f"{out}: {note}", ExportFormWarning, stacklevel=2)
    return out


class ExportFormWarning(UserWarning):
    """The file was written, but some of it is not in the form the export format or options name (``onnx-matmulnbits``
    or ``integer_matmul=True`` linears left in QDQ form)."""


class ExportError(LowbitError, ValueError):
    """An export asked for what it cannot do: an unknown format, a directory as the file path, a bad option value.
    A ``LowbitError`` as every deliberate refusal is (it was a bare ValueError), still a ValueError."""


class ExportPathError(LowbitError, OSError):
    """The export path cannot be written: a parent is a file, or the directory is read-only or takes no files."""


def check_writable(path: Path) -> list[Path]:
    """Create ``path``'s directory and write a probe file there: an unwritable target fails before the lowering
    (minutes on a large model) and names the export path, not after it with a bare OSError ('File exists' for a
    parent that is a file). Returns the directories it created, deepest first, for the caller to remove should
    the export fail (a failed lowering left empty directories behind); a failed probe removes them itself."""
    missing: list[Path] = []
    for parent in (path.parent, *path.parent.parents):
        if parent.exists():
            if not parent.is_dir():
                raise ExportPathError(f"cannot write export path {str(path)!r}: {str(parent)!r} is a file, not a "
                                      "directory")
            break
        missing.append(parent)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".probe"):
            pass
    except OSError as exc:
        _remove_empty(missing)
        raise ExportPathError(f"cannot write export path {str(path)!r}: {exc.strerror or exc} (in "
                              f"{str(path.parent)!r})") from None
    return missing


def _remove_empty(created: list[Path]) -> None:
    """Remove the directories ``check_writable`` created (deepest first), each only while it is empty."""
    for d in created:
        try:
            d.rmdir()
        except OSError:
            break  # not empty (something else wrote there) or gone: leave it and what is above it


@contextlib.contextmanager
def _created_dirs_removed_on_failure(created: list[Path]) -> Iterator[None]:
    try:
        yield
    except BaseException:
        _remove_empty(created)
        raise


def load(path: str | os.PathLike[str], *, tokenizer: Any = None, **options: Any) -> torch.nn.Module:
    """A runnable module for an exported file: ONNX (``.onnx``, or an ONNX model under another name) → ONNX Runtime,
    anything else → a TensorRT engine.

    A step graph exported from a ``generation=`` compile carries its generation meta (``lowbit.generation``), so
    the loaded file has ``generate()`` like the compiled model (``tokenizer=`` for text prompts: a tokenizer, or
    ``smollm2``, ``minilm`` or a tokenizer directory). ``options`` are
    ``OrtCompiled``'s session options (``threads``, ``providers``, ...); an engine file takes none. A missing,
    truncated or corrupted file raises ``OnnxFileError`` / ``EngineFileError`` saying so.
    """
    path = Path(path).expanduser()
    if path.is_dir():  # was "no TensorRT engine file at DIR" (any name not ending .onnx went to TensorRT)
        from lowbit.backends.onnx import OnnxFileError

        files = [f"{path / name} is the {what} in it" for name, what in (("model.engine", "TensorRT engine"),
                                                                         ("model.onnx", "ONNX file"))
                 if (path / name).is_file()]
        inside = f" ({', '.join(files)})" if files else ""
        raise OnnxFileError(f"{path} is a directory: lowbit.export.load reads one exported file (.onnx or a TensorRT "
                            f"engine); lowbit.load reads a lowbit.save or `lowbit compile -o` directory{inside}")
    if path.suffix.lower() == ".onnx" or looks_like_onnx(path):
        from lowbit.backends.onnxruntime_backend import OrtCompiled

        ort = OrtCompiled.load(path, **options)
        raw = ort.session.get_modelmeta().custom_metadata_map.get(GENERATION_KEY)
        if raw is None:
            if tokenizer is not None:  # was dropped: the runner takes token ids, and nothing said so
                raise TypeError(f"tokenizer= is for a step graph exported from compile_model(generation=...), whose "
                                f"generate() reads text; {path} is not one (no {GENERATION_KEY!r} metadata): call it "
                                "with token ids")
            return ort
        from lowbit.checkpoint import CheckpointError, GenerationMeta, validated_meta

        try:
            parsed = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{path}: metadata {GENERATION_KEY!r} is not JSON: {exc}") from None
        meta = validated_meta(GenerationMeta, parsed, f"{path}: metadata {GENERATION_KEY!r}")
        if "rope_switch" not in meta:
            _refuse_unrecorded_rope_switch(path)
        # the logits' width, where the file declares it: a stop token past it is refused before the prefill
        vocab = ort.session.get_outputs()[0].shape[-1]
        return GeneratingOnnx(ort, meta, _given_tokenizer(tokenizer),
                              vocab_size=vocab if isinstance(vocab, int) else None)
    meta, vocab = _engine_step(path)
    if (options or (tokenizer is not None and meta is None)) and path.is_file():  # were dropped without a word
        given = sorted(options) + (["tokenizer"] if tokenizer is not None and meta is None else [])
        raise OptionError(f"{path} is read as a TensorRT engine (not an ONNX file), which takes no options: got "
                          f"{', '.join(given)} (ONNX Runtime session options apply to .onnx files"
                          f"{'' if meta is None else '; tokenizer= is for its generate()'})")
    _refuse_unreadable_as_engine(path)
    from lowbit.backends.tensorrt import TensorRTCompiled

    engine = TensorRTCompiled.load(path)
    # an exported step graph's engine had no generate(): the meta it needs was not recorded (the ONNX file's was)
    # generating on the engine's GPU: its cache was made on the CPU and copied to the GPU at every step
    if meta is None:
        return engine
    # the logits' width, where the header records it: a stop token past it is refused before the prefill
    return GeneratingOnnx(engine, meta, _given_tokenizer(tokenizer), engine.device, vocab_size=vocab)


def _engine_generation(path: Path) -> dict[str, Any] | None:
    """The generation meta a lowbit engine file's header records (an exported step graph's), validated; None for
    another engine, a raw plan or a file that is not there (``TensorRTCompiled.load`` says why)."""
    return _engine_step(path)[0]


def _engine_step(path: Path) -> tuple[dict[str, Any] | None, int | None]:
    """``_engine_generation``'s meta and the logits width the header records beside it (None: an engine written
    before lowbit recorded it, whose stop tokens are checked against the first logits)."""
    from lowbit.backends.tensorrt.engine_file import VOCAB_KEY, EngineFileError, read_engine_header

    try:
        header = read_engine_header(path)  # its header only: TensorRTCompiled.load reads and checks the plan
    except (EngineFileError, OSError):
        return None, None
    raw = header.extra.get(GENERATION_KEY) if header is not None else None
    if raw is None:
        return None, None
    from lowbit.checkpoint import GenerationMeta, validated_meta

    meta = validated_meta(GenerationMeta, raw, f"{path}: engine header {GENERATION_KEY!r}")
    vocab = header.extra.get(VOCAB_KEY)
    if vocab is not None and (not isinstance(vocab, int) or isinstance(vocab, bool) or vocab < 1):
        raise EngineFileError(f"{path}: engine header {VOCAB_KEY!r} is {vocab!r}: expected a positive integer (the "
                              "logits' width); the header is damaged")
    return meta, vocab


def _given_tokenizer(tokenizer: Any) -> Any:
    """``load``'s ``tokenizer=`` as ``compile_model`` takes it: a tokenizer, or ``smollm2``, ``minilm`` or a tokenizer
    directory, loaded here (a name was kept as the string, and generate() failed with "'str' object is not
    callable")."""
    if tokenizer is None or callable(getattr(tokenizer, "get_vocab", None)):
        return tokenizer
    if isinstance(tokenizer, (str, os.PathLike)):
        from lowbit.data.model_files import load_tokenizer

        try:
            return load_tokenizer(os.fspath(tokenizer))
        except (OSError, ValueError) as exc:
            raise ValueError(f"tokenizer={os.fspath(tokenizer)!r}: {exc}") from None
    raise TypeError(f"tokenizer= takes a Hugging Face tokenizer, 'smollm2', 'minilm' or a tokenizer directory, got "
                    f"{type(tokenizer).__name__}")


def _refuse_unreadable_as_engine(path: Path) -> None:
    """A file that is neither ONNX nor lowbit's engine could only be a raw TensorRT plan; without the tensorrt
    package the error was "the TensorRT backend needs the 'tensorrt' Python package", for a text file too."""
    import importlib.util

    from lowbit.backends.tensorrt.engine_file import MAGIC, EngineFileError

    if not path.is_file() or importlib.util.find_spec("tensorrt") is not None:
        return
    with open(path, "rb") as f:
        head = f.read(len(MAGIC))
    if head and head != MAGIC:
        raise EngineFileError(f"{path} is neither an ONNX model nor a lowbit TensorRT engine (it starts with "
                              f"{head!r}); lowbit.export.load reads what lowbit.export writes. Read as a raw "
                              "TensorRT plan it would need the 'tensorrt' package, which is not installed here")


def looks_like_onnx(path: Path) -> bool:
    """Whether a file named otherwise (``export(c, "model")`` writes ONNX at any path) holds an ONNX model: a
    ModelProto starts with field 1, ``ir_version`` (tag byte 0x08); lowbit's engine files start ``LOWBIT-TRT``."""
    try:
        with open(path, "rb") as f:
            head = f.read(2)
    except OSError:
        return False
    return len(head) == 2 and head[0] == 0x08 and 0 < head[1] < 0x80


GENERATION_KEY = "lowbit.generation"
"""ONNX metadata key holding a step graph's generation meta (the lowbit format's manifest field, same schema)."""


def _refuse_unrecorded_rope_switch(path: Path) -> None:
    """A longrope step exported before ``rope_switch`` was recorded in its metadata: its rotary switches frequencies
    at the largest position (a ReduceMax over ``positions``), but the generator, not knowing where, never recomputed
    the cache there and the tokens after the switch were others than the compile's, silently. An ONNX file holds no
    config to recompute the switch from, so it is refused."""
    from lowbit.backends.onnx.io import load_onnx
    from lowbit.checkpoint import CheckpointError

    graph = load_onnx(path, check=False).graph
    positions = graph.inputs[1].name if len(graph.inputs) > 1 else None
    for node in graph:
        if node.op_type == "ReduceMax" and node.inputs and node.inputs[0] is not None \
                and node.inputs[0].name == positions:
            raise CheckpointError(f"{path}: node {node.name!r} takes the largest of the {positions!r} input, as a "
                                  f"longrope rotary does to switch frequencies, but metadata {GENERATION_KEY!r} "
                                  "records no 'rope_switch' (exported by a lowbit before it was recorded): generation "
                                  "past the switch would reuse keys rotated with the other frequencies. Export the "
                                  "compiled model again with this lowbit")


class GeneratingOnnx(torch.nn.Module):
    """An exported step graph run by ONNX Runtime (or a TensorRT engine), with ``generate()`` from the meta the file
    carries; ``device``: where its cache lives (an engine's GPU; None: the CPU); ``vocab_size``: the logits' width
    where the file declares it."""

    def __init__(self, runner: torch.nn.Module, meta: dict[str, Any], tokenizer: Any = None,
                 device: torch.device | None = None, vocab_size: int | None = None) -> None:
        super().__init__()
        from lowbit.generate import Generator

        self.runner = runner
        self.tokenizer = tokenizer
        self.generator = Generator(runner, meta, device, tokenizer, vocab_size)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.runner(*args, **kwargs)

    def generate(self, input_ids: Any, max_new_tokens: int, **kwargs: Any) -> Any:
        """As ``CompiledModel.generate`` (greedy or sampling, stop tokens default to the model's EOS ids)."""
        prompts = [input_ids] if isinstance(input_ids, str) else input_ids
        if self.tokenizer is None and isinstance(prompts, (list, tuple)) and any(isinstance(p, str) for p in prompts):
            from lowbit.models import GenerationError

            # the file holds no tokenizer: the generator's own "pass token ids" leaves out where one goes
            raise GenerationError("text prompts need a tokenizer and an exported file carries none: load it with "
                                  "lowbit.export.load(path, tokenizer=...) or pass token ids")
        return self.generator.generate(input_ids, max_new_tokens, **kwargs)


class _CallableModule(types.ModuleType):
    """``lowbit.export`` names both this module and its ``export`` function (the package re-exports it).

    Importing the submodule sets the package attribute ``lowbit.export`` to the module, shadowing the
    function, so the module itself is made callable: ``lowbit.export(model, path)`` works either way.
    """

    def __call__(self, compiled: Any, path: str | os.PathLike[str], format: str = "onnx", **kwargs: Any) -> Path:
        return export(compiled, path, format, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
__signature__ = inspect.signature(export)
"""What ``inspect.signature(lowbit.export)`` (and so ``help``) shows: ``export``'s own options, not ``__call__``'s
``**kwargs``."""
