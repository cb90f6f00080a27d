"""``lowbit.export``: write a compiled model (or a Graph) as a deployable file, and load one back.

Formats:
- ``"onnx"``: standard QDQ ONNX (opset 21: INT8/FP8 Q/DQ, INT4/UINT4 block-wise weights) — ONNX Runtime,
  TensorRT and any ONNX consumer; checked with ``onnx.checker`` (full check) after writing.
- ``"onnx-matmulnbits"``: the same, with 4-bit weight-only linears as ``com.microsoft::MatMulNBits``
  (ONNX Runtime's int4 GEMM; not for TensorRT).
- ``"tensorrt"``: a TensorRT engine built from the QDQ ONNX after TensorRT's Q/DQ rules are checked
  (needs ``tensorrt`` and a GPU).
"""

from __future__ import annotations

import difflib
import os
import sys
import types
from pathlib import Path
from typing import Any

import torch

from lowbit.ir.graph import Graph

FORMATS = ("onnx", "onnx-matmulnbits", "tensorrt")


def graph_of(compiled: Any) -> Graph:
    """The IR behind a compiled model (anything with ``.graph``) or the Graph itself."""
    if isinstance(compiled, Graph):
        return compiled
    graph = getattr(compiled, "graph", None)
    if isinstance(graph, Graph):
        return graph
    raise TypeError(f"export takes a lowbit Graph or a compiled model with a .graph, got {type(compiled).__name__}")


def export(compiled: Any, path: str | os.PathLike[str], format: str = "onnx", *, check: bool = True,
           external_data: bool | None = None, **options: Any) -> Path:
    """Write ``compiled`` to ``path`` in ``format``; returns the path.

    ONNX options (``opset``, ``attention``, ``accuracy_level``) go to ``lowbit.backends.onnx.LoweringOptions``;
    TensorRT options (``shapes``, ``timing_cache``, ``workspace_bytes``, ...) to ``build_engine``.
    ``external_data`` forces (or forbids) a ``.data`` side file; by default models over ~1.8 GB use one.
    """
    if format not in FORMATS:
        near = difflib.get_close_matches(format, FORMATS, n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise ValueError(f"unknown export format {format!r}{hint}; known: {', '.join(FORMATS)}")
    graph = graph_of(compiled)
    if format == "tensorrt":
        from lowbit.backends.tensorrt import export_engine

        return export_engine(graph, path, **options)
    from dataclasses import fields

    from lowbit.backends.onnx import LoweringOptions, check_onnx, save_onnx, to_onnx

    # named here: a misspelt option was LoweringOptions' bare "unexpected keyword argument", and a directory path
    # an IsADirectoryError from the writer after the whole lowering
    known = sorted(f.name for f in fields(LoweringOptions) if f.name != "weight_format")
    for key in options:
        if key not in known:
            near = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise TypeError(f"unknown ONNX export option {key!r}{hint}; options are: {', '.join(known)} (the "
                            "format picks weight_format: 'onnx' is QDQ, 'onnx-matmulnbits' MatMulNBits)")
    if Path(path).is_dir():
        raise ValueError(f"export path {str(path)!r} is a directory: give a file path such as "
                         f"{str(Path(path) / 'model.onnx')!r}")
    weight_format = "matmulnbits" if format == "onnx-matmulnbits" else "qdq"
    model = to_onnx(graph, weight_format=weight_format, **options)
    out = save_onnx(model, path, external_data=external_data)
    if check:
        check_onnx(out, full_check=True)
    return out


def load(path: str | os.PathLike[str], **options: Any) -> torch.nn.Module:
    """A runnable module for an exported file: ``.onnx`` → ONNX Runtime, anything else → a TensorRT engine.

    A missing, truncated or corrupted file raises ``OnnxFileError`` / ``EngineFileError`` saying so.
    """
    path = Path(path)
    if path.suffix == ".onnx":
        from lowbit.backends.onnxruntime_backend import OrtCompiled

        return OrtCompiled.load(path, **options)
    from lowbit.backends.tensorrt import TensorRTCompiled

    return TensorRTCompiled.load(path)


class _CallableModule(types.ModuleType):
    """``lowbit.export`` names both this module and its ``export`` function (the package re-exports it).

    Importing the submodule sets the package attribute ``lowbit.export`` to the module, shadowing the
    function, so the module itself is made callable: ``lowbit.export(model, path)`` works either way.
    """

    def __call__(self, compiled: Any, path: str | os.PathLike[str], format: str = "onnx", **kwargs: Any) -> Path:
        return export(compiled, path, format, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
