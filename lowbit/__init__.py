"""lowbit: a compiler that makes PyTorch models small and fast with low-bit quantization and sparsity."""

from __future__ import annotations

from lowbit.api import CompiledModel, CompileReport, compile_model
# ``lowbit.export(compiled, path, format=...)`` writes ONNX (QDQ / MatMulNBits) or a TensorRT engine and
# ``lowbit.export.load(path)`` runs such a file: both are the module ``lowbit.export``, which is callable. A function
# of that name here was replaced by the module the first time anything imported it, so ``lowbit.export.load``
# failed in a fresh process until ``lowbit.export(...)`` had run once.
from lowbit import export
from lowbit.version import __version__

__all__ = ["compile_model", "CompiledModel", "CompileReport", "GenerationSpec", "__version__", "export", "save", "load"]


def __getattr__(name: str):  # type: ignore[no-untyped-def]
    """``lowbit.GenerationSpec`` without importing transformers when the package is imported."""
    if name == "GenerationSpec":
        from lowbit.generate import GenerationSpec

        return GenerationSpec
    raise AttributeError(f"module 'lowbit' has no attribute {name!r}")


def save(compiled, directory, format: str = "compressed-tensors", **kwargs):  # type: ignore[no-untyped-def]
    """Write a compiled model as a checkpoint: compressed-tensors (vLLM/SGLang/transformers), gptq, or lowbit."""
    from lowbit.checkpoint import save as _save

    return _save(compiled, directory, format=format, **kwargs)


def load(directory, **kwargs):  # type: ignore[no-untyped-def]
    """A CompiledModel from a checkpoint directory (compressed-tensors, gptq or lowbit); never unpickles."""
    from lowbit.checkpoint import load as _load

    return _load(directory, **kwargs)
