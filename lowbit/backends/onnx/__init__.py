"""IR → ONNX: standard QDQ models (or MatMulNBits for 4-bit weight-only) that ONNX Runtime and TensorRT run.

    from lowbit.backends.onnx import to_onnx, save_onnx, check_onnx
    model = to_onnx(graph)                      # onnx_ir.Model, opset 21
    save_onnx(model, "model.onnx")              # external data past ~1.8 GB
    check_onnx("model.onnx")                    # onnx.checker, full check

Op lowerings are tables (``LOWERINGS``) filled by ``semantic.py``, ``aten.py`` and ``quant.py``.
"""

from lowbit.backends.onnx.context import LoweringOptionError, LoweringOptions, OnnxLoweringError
from lowbit.backends.onnx.io import OnnxFileError, check_onnx, load_onnx, save_onnx
from lowbit.backends.onnx.lowering import lowered_op_types, missing_lowerings, to_onnx
from lowbit.backends.onnx.registry import LOWERINGS

__all__ = [
    "LOWERINGS",
    "LoweringOptionError",
    "LoweringOptions",
    "OnnxFileError",
    "OnnxLoweringError",
    "check_onnx",
    "load_onnx",
    "lowered_op_types",
    "missing_lowerings",
    "save_onnx",
    "to_onnx",
]
