"""The state one IR → ONNX lowering carries, and the helpers every op lowering builds on.

A lowering function receives a ``LoweringContext`` and one IR node and returns the ONNX values that
compute the node's outputs. The context owns the mapping from IR values to ONNX values, the tape the
ONNX nodes are recorded on, the initializers (weights and small constants, deduplicated), and naming,
so lowering functions stay a few lines of "which ONNX ops compute this".

Symbolic integers (``aten.sym_size``, Python arithmetic on sizes) are 0-d ``int64`` tensors in the ONNX
graph; ``shape_vector`` turns a torch-style size list (ints mixed with symbolic values) into the 1-D
``int64`` tensor that Reshape/Expand/ConstantOfShape read.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import torch
from onnx_ir.tensor_adapters import TorchTensor, from_torch_dtype

from lowbit.errors import LowbitError
from lowbit.ir.graph import Graph, Node, SymType, TensorType, Value


class OnnxLoweringError(LowbitError, RuntimeError):
    """The graph cannot be lowered to ONNX; ``problems`` lists every node that failed, with op and module."""

    def __init__(self, problems: list[str], missing_ops: Sequence[str] = ()) -> None:
        self.problems = problems
        self.missing_ops = sorted(set(missing_ops))
        head = f"{len(problems)} node(s) cannot be lowered to ONNX"
        if self.missing_ops:
            head += f"; ops with no ONNX lowering: {', '.join(self.missing_ops)}"
        super().__init__(head + ":\n  - " + "\n  - ".join(problems))


class LoweringOptionError(LowbitError, ValueError):
    """A ``LoweringOptions`` value the lowering cannot take (an opset outside 21..newest, an unknown attention form,
    an accuracy level MatMulNBits lacks), named with the values it takes. A ``LowbitError`` as every deliberate
    refusal is: ``lowbit.export(c, path, opset=19)`` raised a bare ValueError, which callers took for a bug."""


class NotLowerable(Exception):
    """Raised by a lowering function when this node's operands are outside what it supports."""


def where(node: Node) -> str:
    """How error messages name a node: value, op and module path."""
    return f"%{node.name} = {node.op}(...)" + (f" in module {node.module!r}" if node.module else " (no module)")


def to_onnx_dtype(dtype: torch.dtype) -> ir.DataType:
    try:
        return from_torch_dtype(dtype)
    except TypeError as exc:
        raise NotLowerable(f"dtype {dtype} has no ONNX equivalent") from exc


@dataclass
class LoweringOptions:
    """Choices that change the ONNX form but not the numerics beyond float rounding.

    ``opset``: ONNX default-domain opset; 21 is the minimum for INT4/UINT4 and block-wise Q/DQ, and what
    TensorRT 10 parses; 23 adds RMSNormalization (used for RMSNorm when the compute dtype allows).
    ``attention``: "decompose" (MatMul/Softmax, every runtime) or "onnx" (the opset-23 Attention op).
    ``rotary``: "decompose" (Slice/Neg/Concat/Mul/Add) or "onnx": the opset-23 RotaryEmbedding op wherever the cos/sin
    tables provably repeat their first half (HF's ``cat(freqs, freqs)``); one op instead of seven per q/k, which is
    ~12 of a decoder layer's ~45 ONNX nodes.
    ``weight_format``: "qdq" (DequantizeLinear on INT4/INT8 initializers) or "matmulnbits"
    (``com.microsoft::MatMulNBits`` for 4-bit weight-only linears, ONNX Runtime only).
    ``accuracy_level``: MatMulNBits' activation compute type; 0 keeps float activations (exact parity
    with the reference), 4 lets ORT quantize activations to int8 per block (faster, not bit-comparable).
    ``integer_matmul``: a linear between int8 Q/DQ (symmetric, per-tensor or per-token activations,
    per-channel or per-tensor weights) becomes ``com.microsoft::MatMulIntegerToFloat`` on uint8 codes
    (q + 128, zero point 128) and int8 weights, with both scales as its inputs (weight scales in the GEMM's
    epilogue, a per-token activation scale applied in the same kernel): the same sum, in integers.
    Per-tensor dynamic asymmetric uint8 activations (``quantize(a=uint8,a_gran=per_tensor,a_sym=false)``,
    ONNX Runtime ``quantize_dynamic``'s scheme) become ONNX's ``DynamicQuantizeLinear`` — the same scale,
    zero point and codes as lowbit's ``dynamic_qparams`` — feeding MatMulIntegerToFloat its codes, scale and
    zero point (ORT fuses a single reader into ``DynamicQuantizeMatMul``).
    ONNX Runtime's u8·s8 CPU GEMM is several times faster than float; TensorRT takes none of these ops, so
    ``"onnx"`` exports keep QDQ.
    ``int8_weights``: the integer GEMM's weight codes. "s8": int8 (ORT's u8·s8 kernels; exact with VNNI, AMX or
    ARM's sdot, but on x86 CPUs with only AVX2 MLAS multiplies u8·s8 pairs with ``vpmaddubsw``, whose int16 pair
    sums saturate: ~2% error on full-range weights); "u8": the same codes + 128 as uint8 with weight zero point
    128 (MLAS's u8·u8 kernels widen to 16 bits first: exact everywhere, ~20% slower on the AVX2 machine measured);
    "auto": "u8" when the exporting CPU is x86 without VNNI/AMX (``int8_gemm_exact``), else "s8".
    """

    opset: int = 21
    attention: str = "decompose"
    rotary: str = "decompose"
    weight_format: str = "qdq"
    accuracy_level: int = 0
    integer_matmul: bool = False
    int8_weights: str = "auto"

    def __post_init__(self) -> None:
        if not _is_int(self.opset):
            raise LoweringOptionError(f"opset must be an integer, got {self.opset!r}")
        if self.opset < 21:
            raise LoweringOptionError(f"opset {self.opset} is too old: lowbit lowers to opset 21+ "
                                      "(INT4 and block-wise QuantizeLinear/DequantizeLinear need 21)")
        newest = onnx.defs.onnx_opset_version()
        if self.opset > newest:  # ONNX Runtime refuses to load a file stamped with an opset no onnx release defines
            raise LoweringOptionError(f"opset {self.opset} is newer than any this onnx {onnx.__version__} defines "
                                      f"(up to {newest}): runtimes refuse such files; pass an opset from 21 to "
                                      f"{newest}")
        if not _is_int(self.accuracy_level) or not 0 <= self.accuracy_level <= 4:
            # MatMulNBits' attribute and ORT's session entry both take 0-4; ORT fails session creation otherwise
            raise LoweringOptionError(f"accuracy_level must be an integer from 0 to 4 (MatMulNBits' levels), got "
                                      f"{self.accuracy_level!r}")
        if not isinstance(self.integer_matmul, bool):
            raise LoweringOptionError(f"integer_matmul must be True or False, got {self.integer_matmul!r}")
        if self.attention not in ("decompose", "onnx"):
            raise LoweringOptionError(f"attention must be 'decompose' or 'onnx', got {self.attention!r}")
        if self.attention == "onnx" and self.opset < 23:
            raise LoweringOptionError("attention='onnx' needs opset 23 (the Attention op); pass opset=23")
        if self.rotary not in ("decompose", "onnx"):
            raise LoweringOptionError(f"rotary must be 'decompose' or 'onnx', got {self.rotary!r}")
        if self.rotary == "onnx" and self.opset < 23:
            raise LoweringOptionError("rotary='onnx' needs opset 23 (the RotaryEmbedding op); pass opset=23")
        if self.weight_format not in ("qdq", "matmulnbits"):
            raise LoweringOptionError(f"weight_format must be 'qdq' or 'matmulnbits', got {self.weight_format!r}")
        if self.int8_weights not in ("auto", "s8", "u8"):
            raise LoweringOptionError(f"int8_weights must be 'auto', 's8' or 'u8', got {self.int8_weights!r}")

    @property
    def u8_weights(self) -> bool:
        """Whether the integer GEMM takes uint8 weight codes (``int8_weights``, "auto" resolved on this CPU)."""
        return self.int8_weights == "u8" or (self.int8_weights == "auto" and not int8_gemm_exact())


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@functools.cache
def int8_gemm_exact() -> bool:
    """Whether ONNX Runtime's CPU u8·s8 GEMMs (MatMulIntegerToFloat, DynamicQuantizeMatMul) compute exact integer
    dot products on this machine: not on x86-64 without VNNI or AMX (AVX2 only), where MLAS's ``vpmaddubsw``
    saturates int16 pair sums (measured 0.0207 relative error on SmolLM2's MLP; onnxruntime 1.23.2 and 1.32.0).
    Read once per process (``/proc/cpuinfo``): the lowering asks per int8 weight, the ORT backend per session."""
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64"):
        return True
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return True
    return any(flag in flags.split() for flag in ("avx512_vnni", "avx_vnni", "amx_int8"))


LowerFn = Callable[["LoweringContext", Node], "ir.Value | Sequence[ir.Value]"]


@dataclass
class LoweringContext:
    graph: Graph
    options: LoweringOptions
    env: dict[int, ir.Value] = field(default_factory=dict)
    nodes: list[ir.Node] = field(default_factory=list)
    initializers: list[ir.Value] = field(default_factory=list)
    opsets: dict[str, int] = field(default_factory=dict)
    current: Node | None = None
    _names: set[str] = field(default_factory=set)
    _consts: dict[tuple[Any, ...], ir.Value] = field(default_factory=dict)
    _derived: dict[tuple[Any, ...], ir.Value] = field(default_factory=dict)
    _users: dict[int, list[Node]] | None = None
    _counter: int = 0

    # ---- naming -------------------------------------------------------------------------------
    def unique(self, base: str) -> str:
        base = re.sub(r"[^A-Za-z0-9_./:-]", "_", base) or "v"
        name, i = base, 1
        while name in self._names:
            name, i = f"{base}_{i}", i + 1
        self._names.add(name)
        return name

    def users(self, v: Value) -> list[Node]:
        if self._users is None:
            self._users = self.graph.users()
        return self._users.get(id(v), [])

    # ---- building -----------------------------------------------------------------------------
    def op(self, op_type: str, inputs: Sequence[ir.Value | None], attributes: dict[str, Any] | None = None,
           *, domain: str = "", num_outputs: int = 1) -> Any:
        """Record one ONNX node; returns its output (or the list of outputs when ``num_outputs`` > 1)."""
        attrs = {k: v for k, v in (attributes or {}).items() if v is not None}
        node_ir = self.current
        base = f"{node_ir.module or 'graph'}/{node_ir.name}/{op_type}" if node_ir is not None else op_type
        meta = {"lowbit.op": node_ir.op, "lowbit.value": node_ir.name} if node_ir is not None else {}
        if node_ir is not None and node_ir.module:
            meta["lowbit.module"] = node_ir.module
        node = ir.Node(domain, op_type, list(inputs), attributes=ir.convenience.convert_attributes(attrs),
                       num_outputs=num_outputs, name=self.unique(base), metadata_props=meta)
        if domain:
            self.opsets.setdefault(domain, 1)
        self.nodes.append(node)
        for i, out in enumerate(node.outputs):
            self._counter += 1
            out.name = self.unique(f"{node_ir.name if node_ir is not None else 'v'}.{op_type}{self._counter}")
        return node.outputs[0] if num_outputs == 1 else list(node.outputs)

    def initializer(self, name: str, tensor: ir.TensorProtocol) -> ir.Value:
        """A named initializer (a weight); the name is made unique."""
        tensor.name = self.unique(name)
        value = ir.Value(name=tensor.name, shape=ir.Shape(tensor.shape.dims), type=ir.TensorType(tensor.dtype),
                         const_value=tensor)
        self.initializers.append(value)
        return value

    def const(self, value: Any, dtype: torch.dtype | ir.DataType) -> ir.Value:
        """A small constant (deduplicated by content) in ``dtype``."""
        onnx_dtype = dtype if isinstance(dtype, ir.DataType) else to_onnx_dtype(dtype)
        arr = np.asarray(value)
        if onnx_dtype == ir.DataType.BOOL:
            arr = arr.astype(np.bool_)
        elif onnx_dtype in (ir.DataType.BFLOAT16, ir.DataType.FLOAT8E4M3FN, ir.DataType.FLOAT8E5M2):
            arr = arr.astype(np.float32).astype(onnx_dtype.numpy())
        else:
            arr = arr.astype(onnx_dtype.numpy())
        key = (onnx_dtype, arr.shape, arr.tobytes())
        if key not in self._consts:
            tensor = ir.tensor(arr, dtype=onnx_dtype)
            self._consts[key] = self.initializer("const", tensor)
        return self._consts[key]

    def const_tensor(self, name: str, t: torch.Tensor) -> ir.Value:
        return self.initializer(name, TorchTensor(t.detach().contiguous()))

    def ints(self, values: Sequence[int]) -> ir.Value:
        return self.const(np.asarray(list(values), dtype=np.int64), ir.DataType.INT64)

    def derived(self, key: tuple[Any, ...], make: Callable[[], ir.Value]) -> ir.Value:
        """Memoize a value built once per key (a transposed weight, an unsqueezed size)."""
        if key not in self._derived:
            self._derived[key] = make()
        return self._derived[key]

    # ---- operands -----------------------------------------------------------------------------
    def v(self, x: Any) -> ir.Value:
        """The ONNX value of an IR tensor or symbolic-int operand."""
        if isinstance(x, Value):
            try:
                return self.env[id(x)]
            except KeyError:
                raise NotLowerable(f"operand %{x.name} has no ONNX value (its producer failed to lower)") from None
        raise NotLowerable(f"expected a tensor operand, got the literal {x!r}")

    def dtype(self, x: Any) -> torch.dtype:
        """The torch dtype of an operand: a tensor's declared dtype, int64 for symbolic ints."""
        if isinstance(x, Value):
            if isinstance(x.type, TensorType):
                return x.type.dtype
            if isinstance(x.type, SymType):
                return torch.int64
            raise NotLowerable(f"operand %{x.name} has no type")
        if isinstance(x, bool):
            return torch.bool
        if isinstance(x, int):
            return torch.int64
        if isinstance(x, float):
            return torch.float32
        raise NotLowerable(f"cannot type literal {x!r}")

    def out_dtype(self, node: Node, i: int = 0) -> torch.dtype:
        t = node.outputs[i].type
        if isinstance(t, TensorType):
            return t.dtype
        if isinstance(t, SymType):
            return torch.int64
        raise NotLowerable(f"output {i} of {node.op} has no declared type")

    def rank(self, x: Value) -> int:
        if isinstance(x, Value) and isinstance(x.type, TensorType):
            return x.type.rank
        if isinstance(x, Value) and isinstance(x.type, SymType):
            return 0
        raise NotLowerable(f"rank of {x!r} is unknown")

    def tensor(self, x: Any, dtype: torch.dtype) -> ir.Value:
        """An operand as an ONNX value of ``dtype``: literals become constants, tensors are cast if needed."""
        if isinstance(x, Value):
            return self.cast(self.v(x), self.dtype(x), dtype)
        if isinstance(x, (bool, int, float)):
            return self.const(x, dtype)
        raise NotLowerable(f"cannot use {x!r} as a tensor operand")

    def cast(self, v: ir.Value, src: torch.dtype, dst: torch.dtype) -> ir.Value:
        if src == dst:
            return v
        return self.op("Cast", [v], {"to": to_onnx_dtype(dst)})

    def scalar_int(self, x: Any) -> ir.Value:
        """A 0-d int64 for an int literal or a symbolic int."""
        if isinstance(x, bool) or not isinstance(x, (int, Value)):
            raise NotLowerable(f"expected an int or symbolic size, got {x!r}")
        if isinstance(x, int):
            return self.const(np.int64(x), ir.DataType.INT64)
        return self.cast(self.v(x), self.dtype(x), torch.int64)

    def vector_int(self, x: Any) -> ir.Value:
        """A 1-element int64 vector for an int literal or a symbolic int (Slice/Concat operands)."""
        if isinstance(x, int) and not isinstance(x, bool):
            return self.ints([x])
        return self.derived(("vec", id(x)), lambda: self.op("Reshape", [self.scalar_int(x), self.ints([1])]))

    def shape_vector(self, sizes: Sequence[Any], *, minus_one_as: int | None = None) -> ir.Value:
        """A torch size list (ints and symbolic ints) as a 1-D int64 tensor.

        Runs of literal ints become one constant, so a fully static list is a single initializer.
        ``minus_one_as`` rewrites literal -1 entries (Expand keeps a dim with 1, not -1).
        """
        pieces: list[ir.Value] = []
        run: list[int] = []
        for s in sizes:
            if isinstance(s, int) and not isinstance(s, bool):
                run.append(minus_one_as if (s == -1 and minus_one_as is not None) else s)
                continue
            if run:
                pieces.append(self.ints(run))
                run = []
            pieces.append(self.vector_int(s))
        if run or not pieces:
            pieces.append(self.ints(run))
        return pieces[0] if len(pieces) == 1 else self.op("Concat", pieces, {"axis": 0})

    def axes(self, dims: Sequence[int]) -> ir.Value:
        return self.ints(dims)


def result_dtype(ctx: LoweringContext, *operands: Any) -> torch.dtype:
    """torch's type promotion over IR operands (tensors, 0-d tensors, Python scalars, symbolic ints)."""
    probes: list[Any] = []
    for x in operands:
        if isinstance(x, Value) and isinstance(x.type, TensorType):
            shape = (0,) if x.type.rank > 0 else ()
            probes.append(torch.empty(shape, dtype=x.type.dtype))
        elif isinstance(x, Value):  # a symbolic int behaves as a Python int
            probes.append(1)
        elif isinstance(x, (bool, int, float)):
            probes.append(x)
        else:
            raise NotLowerable(f"cannot promote operand {x!r}")
    if len(probes) == 1:
        p = probes[0]
        return p.dtype if isinstance(p, torch.Tensor) else ctx.dtype(p)
    result = probes[0]
    dtype = None
    for p in probes[1:]:
        dtype = torch.result_type(result, p)
        result = torch.empty((0,) if any(isinstance(q, torch.Tensor) and q.dim() > 0 for q in (result, p)) else (),
                             dtype=dtype)
    assert dtype is not None
    return dtype
