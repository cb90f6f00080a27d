"""lowbit's IR: typed SSA graphs captured from torch.export, printable, parsable and verifiable."""

# First: importing ``quant`` registers the QDQ ops in ``ops.OPS`` (quant imports ops, never the reverse), and
# importing any ``lowbit.ir.*`` module runs this file first, so the ops are known wherever the IR is used.
from lowbit.ir import quant as _quant  # noqa: F401  # isort: skip
from lowbit.ir import kvcache as _kvcache  # noqa: F401  # isort: skip  (registers cache_attention)
from lowbit.ir import normquant as _normquant  # noqa: F401  # isort: skip  (rms_norm_quant, qlinear_q)
from lowbit.ir.capture import CaptureError, capture, from_exported
from lowbit.ir.graph import Graph, Node, SymType, TensorType, Value, blocks
from lowbit.ir.parser import IRParseError, parse_graph
from lowbit.ir.printer import print_graph
from lowbit.ir.verifier import VerificationError, verify

__all__ = [
    "capture", "from_exported", "CaptureError", "Graph", "Node", "Value", "TensorType", "SymType", "blocks",
    "parse_graph", "IRParseError", "print_graph", "verify", "VerificationError",
]
