"""lowbit: a compiler that makes PyTorch models small and fast with low-bit quantization and sparsity."""

from __future__ import annotations

from lowbit.api import CompiledModel, CompileReport, compile_model
# ``lowbit.export(compiled, path, format=...)`` writes ONNX (QDQ / MatMulNBits) or a TensorRT engine and
# ``lowbit.export.load(path)`` runs such a file: both are the module ``lowbit.export``, which is callable. A function
# of that name here was replaced by the module the first time anything imported it, so ``lowbit.export.load``
# failed in a fresh process until ``lowbit.export(...)`` had run once.
from lowbit import export
# the functions themselves, not wrappers taking **kwargs: help(lowbit.save) shows their options and what they raise
from lowbit.checkpoint import load, save
from lowbit.version import __version__

__all__ = ["compile_model", "CompiledModel", "CompileReport", "GenerationSpec", "__version__", "export", "save", "load"]


def __getattr__(name: str):  # type: ignore[no-untyped-def]
    """``lowbit.GenerationSpec`` without importing transformers when the package is imported."""
    if name == "GenerationSpec":
        from lowbit.generate import GenerationSpec

        return GenerationSpec
    raise AttributeError(f"module 'lowbit' has no attribute {name!r}")

