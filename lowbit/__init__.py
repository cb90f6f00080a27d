"""lowbit: a compiler that makes PyTorch models small and fast with low-bit quantization and sparsity."""

from __future__ import annotations

__version__ = "0.1.0"

from lowbit.api import CompiledModel, CompileReport, compile_model  # noqa: E402

__all__ = ["compile_model", "CompiledModel", "CompileReport", "GenerationSpec", "__version__", "export"]


def __getattr__(name: str):  # type: ignore[no-untyped-def]
    """``lowbit.GenerationSpec`` without importing transformers when the package is imported."""
    if name == "GenerationSpec":
        from lowbit.generate import GenerationSpec

        return GenerationSpec
    raise AttributeError(f"module 'lowbit' has no attribute {name!r}")


def export(compiled, path, format: str = "onnx", **kwargs):  # type: ignore[no-untyped-def]
    """Write a compiled model as ONNX (QDQ), ONNX with MatMulNBits, or a TensorRT engine."""
    from lowbit.export import export as _export

    return _export(compiled, path, format=format, **kwargs)
