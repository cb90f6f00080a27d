"""The ONNX Runtime backend: lower the IR to ONNX and run it in an ``InferenceSession``.

``OrtCompiled(graph)`` is called like ``TorchCompiled(graph)`` (positional or keyword inputs by the graph's
input names; torch tensors in, torch tensors out), so evaluation code does not care which backend runs.

Provider choice: the best one this onnxruntime build has, in the order TensorRT EP, CUDA, CPU (ORT assigns
each node to the first provider in the list that supports it). Asking for a provider the build lacks
is not an error: a ``ProviderFallbackWarning`` says what was asked, what is available and what runs
instead; so is ORT silently dropping a provider it failed to initialise (CUDA libraries missing).
"""

from __future__ import annotations

import os
import re
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import torch
from onnx_ir.tensor_adapters import to_torch_dtype

from lowbit.backends.onnx import LoweringOptions, load_onnx, save_onnx, to_onnx
from lowbit.backends.onnx.context import int8_gemm_exact
from lowbit.backends.onnx.lowering import unfused_integer_matmul, unfused_matmulnbits
from lowbit.backends.onnx.io import (
    EXTERNAL_DATA_THRESHOLD,
    OnnxFileError,
    initializer_bytes,
)
from lowbit.backends.onnx.widen import has_bfloat16, widen_bfloat16
from lowbit.errors import DeviceError, LowbitError, OptionError, did_you_mean
from lowbit.ir.graph import Graph
from lowbit.ir.offload import offloaded_bytes
from lowbit.ir.signature import InputChecker, InputError, is_int_dtype, ordered_inputs

PREFERRED_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
_GPU_PROVIDERS = {"TensorrtExecutionProvider", "CUDAExecutionProvider"}

_ONNX_TO_TORCH = {
    "tensor(float)": torch.float32, "tensor(float16)": torch.float16, "tensor(double)": torch.float64,
    "tensor(bfloat16)": torch.bfloat16, "tensor(int64)": torch.int64, "tensor(int32)": torch.int32,
    "tensor(int8)": torch.int8, "tensor(uint8)": torch.uint8, "tensor(bool)": torch.bool,
}


ORT_LOWERING: dict[str, Any] = {"opset": 23, "attention": "onnx", "rotary": "onnx", "integer_matmul": True}
"""What this backend lowers to unless told otherwise: ORT's fused opset-23 Attention, RotaryEmbedding and
RMSNormalization kernels and the integer-GEMM form of int8 linears — the same numbers as the portable opset-21 QDQ form
(``lowbit.export(format="onnx")``), and faster on CPU (bench/results/onnx.json)."""


def ort_lowering_options(**lowering: Any) -> LoweringOptions:
    """``ORT_LOWERING`` with ``lowering`` over it; an opset below 23 keeps unset attention/rotary decomposed.
    Raises ``ValueError`` for options the lowering refuses (the backend registry calls it before capture)."""
    chosen = {**ORT_LOWERING, **lowering}
    if isinstance(chosen["opset"], int) and chosen["opset"] < 23:  # Attention and RotaryEmbedding exist from 23
        for key in ("attention", "rotary"):
            if key not in lowering:
                chosen[key] = "decompose"
    return LoweringOptions(**chosen)


class SessionOptionError(LowbitError, ValueError):
    """An ONNX Runtime session option with a value the session cannot take (``threads=-1``, ``spinning="false"``),
    named with what it takes. A ``LowbitError`` as every deliberate refusal is: it was a bare ValueError."""


class ProviderFallbackWarning(UserWarning):
    """A requested execution provider is not available; the message says which one runs instead."""


def provider_name(p: str | tuple[str, Any]) -> str:
    """An execution provider as ORT takes one, its name or (name, provider options), by name."""
    return p if isinstance(p, str) else p[0]


def _checked_requested(requested: str | Sequence[Any]) -> list[str | tuple[str, dict[str, Any]]]:
    """``providers=`` as a list of names and (name, options) pairs: one name given as a string was iterated
    character by character (providers 'C', 'P', 'U', ... "not available", a silent fall back to CPU)."""
    if isinstance(requested, str):
        return [requested]
    if not isinstance(requested, Sequence):
        raise TypeError(f"providers must be a list of execution provider names, got {type(requested).__name__}")
    out: list[str | tuple[str, dict[str, Any]]] = []
    for i, p in enumerate(requested):
        if isinstance(p, str):
            out.append(p)
        elif isinstance(p, (tuple, list)) and len(p) == 2 and isinstance(p[0], str) and isinstance(p[1], Mapping):
            out.append((p[0], dict(p[1])))
        else:
            raise TypeError(f"providers[{i}] is {p!r}: give an execution provider name ('CUDAExecutionProvider') or "
                            "a (name, provider options) pair as ONNX Runtime takes them")
    return out


def ort_device(device: str | torch.device | None) -> torch.device | None:
    """``device=`` as a torch device; a string torch cannot read ('gpu') is a ``DeviceError``, not torch's
    RuntimeError listing every device type it knows."""
    if device is None:
        return None
    try:
        return torch.device(device)
    except (RuntimeError, TypeError):
        raise DeviceError(f"device={device!r} is not a device: give 'cpu', 'cuda' or 'cuda:N'") from None


def choose_providers(requested: str | Sequence[Any] | None = None, device: str | torch.device | None = None
                     ) -> list[str | tuple[str, dict[str, Any]]]:
    """Providers to ask ORT for: ``requested`` filtered to the available ones, else the best available.

    ``requested`` holds names or (name, options) pairs (a single name may be a string). ``device="cpu"`` means CPU
    only; ``"cuda"`` prefers the GPU providers (``"cuda:N"`` with ``device_id`` N) and warns when there are none.
    """
    available = ort.get_available_providers()
    where = ort_device(device)
    dev = where.type if where is not None else None
    if requested is None:
        if dev == "cpu":
            return ["CPUExecutionProvider"]
        if dev not in (None, "cuda"):  # 'mps', 'meta': was a silent CPU session
            raise DeviceError(f"device={str(device)!r}: onnxruntime runs on 'cpu' or 'cuda' (cuda:N), not on {dev!r}")
        chosen: list[str | tuple[str, dict[str, Any]]] = [p for p in PREFERRED_PROVIDERS if p in available]
        if where is not None and where.index is not None:
            # ORT picks the GPU by provider option, not by torch's device: cuda:1 ran on GPU 0
            chosen = [(p, {"device_id": str(where.index)}) if p in _GPU_PROVIDERS else p for p in chosen]
        if dev == "cuda" and not any(provider_name(p) in _GPU_PROVIDERS for p in chosen):
            warnings.warn(f"device='cuda' asked for, but this onnxruntime build ({ort.__version__}) has no GPU "
                          f"provider (available: {', '.join(available)}); running on CPUExecutionProvider. "
                          "Install onnxruntime-gpu for CUDA/TensorRT.", ProviderFallbackWarning, stacklevel=3)
        return chosen or ["CPUExecutionProvider"]
    wanted = _checked_requested(requested)
    chosen = [p for p in wanted if provider_name(p) in available]
    missing = [provider_name(p) for p in wanted if provider_name(p) not in available]
    if not chosen:
        chosen = ["CPUExecutionProvider"]
    if missing:
        warnings.warn(f"execution provider(s) {', '.join(missing)} not available in this onnxruntime build "
                      f"({ort.__version__}; available: {', '.join(available)}); falling back to "
                      f"{', '.join(map(provider_name, chosen))}", ProviderFallbackWarning, stacklevel=3)
    return chosen


def session_options(threads: int | None = None, optimization: str = "all",
                    optimized_model_path: str | None = None, accuracy_level: int = 0,
                    spinning: bool | None = None) -> ort.SessionOptions:
    """Session options with graph optimizations on (``"all"``: layout and QDQ fusions included).

    ``spinning=False`` stops idle intra-op threads from spinning: on a CPU shared with other processes a spinning
    worker competes with them for the cores the session needs (SmolLM2 decode on a loaded 2-core machine: float ORT
    36 ms/step with spinning, 18 ms without; tools/bench_generate.py --cpu). None keeps ORT's default (spinning).

    ``accuracy_level`` is what ORT's fusion of ``DequantizeLinear(int4) → MatMul`` into MatMulNBits may
    use for activations: ORT's default (4) quantizes them to int8 per block, which moves W4A16 logits by
    ~1% from the reference; 0 keeps float activations, i.e. the numerics of the graph as written.

    On x86 CPUs without VNNI/AMX (``int8_gemm_exact`` False) ORT's QDQ fusion turns int8 Q/DQ → MatMul into u8·s8
    GEMMs whose int16 pair sums saturate (a full-range int8 MatMul measured 2.1 relative error); with
    ``session.qdqisint8allowed=1`` it keeps int8 activations (s8·s8 kernels): exact (2.6e-7), so it is set there.
    """
    levels = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    if optimization not in levels:
        raise SessionOptionError(f"optimization must be one of {', '.join(levels)}, got {optimization!r}")
    so = ort.SessionOptions()
    so.graph_optimization_level = levels[optimization]
    if threads is not None:
        if not isinstance(threads, int) or isinstance(threads, bool) or threads < 0:
            raise SessionOptionError(f"threads must be an integer >= 0 (0: ONNX Runtime's default), got {threads!r}")
        so.intra_op_num_threads = threads
    if optimized_model_path is not None:
        so.optimized_model_filepath = optimized_model_path
    so.log_severity_level = 3
    if spinning is not None:
        if not isinstance(spinning, bool):  # "false" is truthy: the workers spun
            raise SessionOptionError(f"spinning must be True, False or None (ORT's default), got {spinning!r}")
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(accuracy_level))
    if not int8_gemm_exact():
        so.add_session_config_entry("session.qdqisint8allowed", "1")
    return so


def create_session(model: ir.Model | str | os.PathLike[str], providers: list[Any], so: ort.SessionOptions, *,
                   file_checked: bool = False) -> ort.InferenceSession:
    """An InferenceSession from an in-memory model (via a temporary external-data file when > 2 GB) or a path.
    ``file_checked``: the caller has already read the file with ``load_onnx`` (no second read of its protobuf)."""
    if isinstance(model, ir.Model):
        try:
            if initializer_bytes(model) > EXTERNAL_DATA_THRESHOLD:
                # protobuf cannot hold > 2 GB in memory: go through a file with external data; ORT has read (or
                # mapped) it once the session exists, so the directory can go (a mapped file outlives its name)
                with tempfile.TemporaryDirectory(prefix="lowbit-ort-") as tmp:
                    path = save_onnx(model, Path(tmp) / "model.onnx", external_data=True)
                    return ort.InferenceSession(os.fspath(path), so, providers=providers)
            return _session_from_memory(model, providers, so)
        except Exception as exc:  # noqa: BLE001 - ORT's errors are untyped
            hint = _missing_kernel_hint(exc)
            if hint is None:
                raise
            raise OnnxFileError(f"onnxruntime cannot run the lowered model: {hint}") from exc
    path = Path(model).expanduser()
    if not file_checked:
        load_onnx(path, check=False)  # clear errors for missing/truncated/corrupted files before ORT's own
    try:
        return ort.InferenceSession(os.fspath(path), so, providers=providers)
    except Exception as exc:  # noqa: BLE001 - ORT raises several untyped Fail/InvalidProtobuf errors
        hint = _missing_kernel_hint(exc)
        raise OnnxFileError(f"onnxruntime cannot load {path}: {hint or str(exc).strip()[:300]}") from exc


_SHARED_DTYPES = frozenset({ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE, ir.DataType.INT8,
                            ir.DataType.UINT8, ir.DataType.INT32, ir.DataType.INT64})
"""Initializer dtypes handed to ORT from memory: numpy holds them as they are stored (a view of the lowered tensor,
no conversion); INT4/UINT4 (packed two a byte), bfloat16 and float8 stay in the serialized model."""

SHARED_MIN_BYTES = 1024
"""Initializers smaller than this stay in the serialized model: ORT reads small constants (shapes, axes) during graph
resolution, before external initializers are put in place."""

_IN_MEMORY = "lowbit-in-memory"
"""The external-data location the serialized model names for an initializer handed over from memory (never read:
``add_external_initializers`` replaces it before ORT resolves the graph)."""


def _session_from_memory(model: ir.Model, providers: list[Any], so: ort.SessionOptions) -> ort.InferenceSession:
    """An InferenceSession whose large initializers come from the lowered model's own tensors
    (``SessionOptions.add_external_initializers``) instead of the serialized protobuf: serialized, every weight was
    copied into the protobuf, its bytes and ORT's parse of them (SmolLM2 2 layers, float, 135 MiB of params: building
    the session took +640 MiB peak RSS and held +537 MiB; now +518 / +414). ORT still copies each one into its graph
    once (``add_external_initializers`` documents the copy; ``add_initializer`` would share the buffer but needs the
    initializer's data in the model it loads); the outputs are bit-identical."""
    swapped: dict[str, Any] = {}
    names: list[str] = []
    values: list[ort.OrtValue] = []
    try:
        for name, v in model.graph.initializers.items():
            t = v.const_value
            if t is None or isinstance(t, ir.ExternalTensor) or t.dtype not in _SHARED_DTYPES or \
                    t.nbytes < SHARED_MIN_BYTES:
                continue
            array = np.ascontiguousarray(t.numpy())  # a view of the lowered tensor (TorchTensor): no copy
            values.append(ort.OrtValue.ortvalue_from_numpy(array))
            names.append(name)
            swapped[name] = t
            v.const_value = ir.ExternalTensor(_IN_MEMORY, 0, t.nbytes, t.dtype, shape=t.shape, name=name)
        proto = ir.serde.serialize_model(model).SerializeToString()
    finally:
        for name, t in swapped.items():
            model.graph.initializers[name].const_value = t
    if names:
        so.add_external_initializers(names, values)
    return ort.InferenceSession(proto, so, providers=providers)


def _missing_kernel_hint(exc: BaseException) -> str | None:
    """ORT's "Could not find an implementation for QuantizeLinear(28) node ..." as what to do about it: an opset
    onnx defines can still be newer than this ONNX Runtime's kernels (ORT 1.32 has no opset-28 Q/DQ)."""
    match = re.search(r"Could not find an implementation for (\w+)\((\d+)\) node with name '([^']*)'", str(exc))
    if match is None:
        return None
    op, version, node = match.groups()
    return (f"this onnxruntime {ort.__version__} has no {op} kernel at opset {version} (node {node!r}); lower to an "
            f"older opset (e.g. opset=23, the onnxruntime backend's default: backend_options={{'opset': 23}} "
            f"or `--backend-option opset=23`)")


def accuracy_from_metadata(model: ir.Model) -> int:
    """The MatMulNBits accuracy level a lowbit export asks for in its metadata (``lowbit.ort_session_config``);
    0 (exact) for files without it. Only this one entry is read, and only as a level 0-4: a file from someone
    else must not choose arbitrary session options."""
    import json

    from lowbit.backends.onnx.lowering import ORT_ACCURACY_LEVEL, ORT_SESSION_CONFIG

    try:
        entries = json.loads(model.metadata_props.get(ORT_SESSION_CONFIG, "{}"))
        level = entries.get(ORT_ACCURACY_LEVEL, "0") if isinstance(entries, dict) else "0"
        return int(level) if str(level) in ("0", "1", "2", "3", "4") else 0
    except (ValueError, TypeError):
        return 0


def declared_inputs(model: ir.Model) -> InputChecker:
    """The input contract an ONNX file states, for a session run from a file (no lowbit Graph to read it from).

    Every file: the inputs' dtypes and ranks (a float tensor fed as int64 ids was truncated by ``Tensor.to``). A
    lowbit export also records its symbols' ranges (``lowbit.symbols``) and names its dims after them, and its
    embedding tables are ``Gather`` nodes on an input: those are checked as the compiled model checks them (ONNX's
    Gather wraps a negative id to a row from the end, a silent wrong result). A foreign file's dim names promise
    nothing, so each of its dims is left free.
    """
    import json

    from lowbit.ir.graph import TensorType

    recorded = model.metadata_props.get("lowbit.symbols")
    symbols: dict[str, tuple[int | None, int | None]] = {}
    if recorded is not None:
        try:
            for name, r in json.loads(recorded).items():
                lo, hi = r.get("min"), r.get("max")
                symbols[str(name)] = (lo if isinstance(lo, int) else None, hi if isinstance(hi, int) else None)
        except (ValueError, TypeError, AttributeError):
            recorded, symbols = None, {}
    names, types = [], []
    for i, v in enumerate(model.graph.inputs):
        dims: list[int | str] = []
        for j, d in enumerate(v.shape.dims if v.shape is not None else ()):
            if isinstance(d, int):
                dims.append(d)
            elif recorded is not None and d.value is not None and d.value in symbols:
                dims.append(d.value)
            else:
                free = f"?{i}.{j}"
                symbols[free] = (None, None)
                dims.append(free)
        names.append(v.name)
        try:
            dtype = to_torch_dtype(v.dtype)
        except (TypeError, KeyError, ValueError):
            dtype = None
        types.append(TensorType(dtype, tuple(dims)) if dtype is not None and v.shape is not None else None)
    vocab: dict[int, list[tuple[str, int]]] = {}
    if recorded is not None:
        index = {id(v): i for i, v in enumerate(model.graph.inputs)}
        for node in model.graph:
            if node.op_type != "Gather" or len(node.inputs) < 2 or id(node.inputs[1]) not in index:
                continue
            axis = node.attributes.get("axis")
            if axis is not None and axis.as_int() != 0:  # rows of a table only: an id indexes axis 0
                continue
            table = node.inputs[0]
            if table is not None and table.const_value is not None and len(table.const_value.shape) == 2:
                vocab.setdefault(index[id(node.inputs[1])], []).append((table.name, table.const_value.shape[0]))
    return InputChecker.declared(names, types, symbols, vocab)


class OrtCompiled(torch.nn.Module):
    """A graph lowered to ONNX and run by ONNX Runtime; same call interface as ``TorchCompiled``.

    ``lowering`` takes ``LoweringOptions`` fields (``opset``, ``attention``, ``weight_format`` =
    ``"qdq"`` | ``"matmulnbits"``, ``integer_matmul``; defaults ``ORT_LOWERING``). ``providers`` overrides
    the automatic choice (names or ORT's (name, options) pairs; missing ones fall back with a warning); ``threads`` /
    ``spinning`` set ORT's intra-op pool (``session_options``).
    """

    def __init__(
        self,
        graph: Graph | None = None,
        device: str | torch.device | None = None,
        *,
        providers: str | Sequence[Any] | None = None,
        threads: int | None = None,
        spinning: bool | None = None,
        optimization: str = "all",
        model: ir.Model | str | os.PathLike[str] | None = None,
        **lowering: Any,
    ) -> None:
        super().__init__()
        if (graph is None) == (model is None):
            raise TypeError("OrtCompiled takes a lowbit Graph or an ONNX model/path (model=...), exactly one")
        self.graph = graph
        self.device = ort_device(device)
        self.onnx_model: ir.Model | None
        self.options: LoweringOptions | None
        if graph is not None:
            self.options = ort_lowering_options(**lowering)
            self.onnx_model = to_onnx(graph, self.options)
            source: ir.Model | str | os.PathLike[str] = self.onnx_model
        else:
            if lowering:
                from dataclasses import fields

                known = {f.name for f in fields(LoweringOptions)}
                session = ["device", "optimization", "providers", "spinning", "threads"]
                for key in sorted(lowering):
                    if key not in known:  # a misspelt session option was called a lowering option
                        raise OptionError(f"unknown option {key!r}{did_you_mean(key, session)} for a model run "
                                          f"from an ONNX file; options are: {', '.join(session)}")
                raise OptionError(f"lowering options {sorted(lowering)} apply only when lowering a Graph: the file's "
                                  "lowering is fixed (export it again with them)")
            self.options = None
            self.onnx_model = model if isinstance(model, ir.Model) else None
            source = model  # type: ignore[assignment]
        self.requested_providers = choose_providers(providers, device)
        on_file = load_onnx(model, check=False) if model is not None and not isinstance(model, ir.Model) else None
        self.source_path = Path(model).expanduser() if on_file is not None else None
        self.widened_outputs: list[bool] = []
        self.notes: list[str] = []
        if self.options is not None and self.onnx_model is not None:
            for asked, unfused in ((self.options.weight_format == "matmulnbits", unfused_matmulnbits),
                                   (self.options.integer_matmul, unfused_integer_matmul)):
                note = unfused(self.onnx_model) if asked else None
                if note is not None:
                    self.notes.append(note)
        target = self.onnx_model if self.onnx_model is not None else on_file
        # a file's contract is read before widening: callers pass what the file declares (bfloat16 stays bfloat16)
        self.check_inputs = InputChecker(graph) if graph is not None else \
            declared_inputs(target) if target is not None else None
        if target is not None and self.requested_providers == ["CPUExecutionProvider"] and has_bfloat16(target):
            # ORT's CPU provider has no bfloat16 Mul/MatMul/...: run the graph in float32, hand back bfloat16
            self.widened_outputs = [o.dtype == ir.DataType.BFLOAT16 for o in target.graph.outputs]
            n = widen_bfloat16(target)
            source = target
            self.notes.append(f"bfloat16 runs as float32 on CPUExecutionProvider (no bfloat16 kernels there): {n} "
                              "tensors widened, outputs cast back to bfloat16")
        accuracy = self.options.accuracy_level if self.options is not None else \
            accuracy_from_metadata(model if isinstance(model, ir.Model) else on_file)
        self.session = create_session(source, self.requested_providers,
                                      session_options(threads, optimization, accuracy_level=accuracy,
                                                      spinning=spinning),
                                      file_checked=on_file is not None)
        self.providers = self.session.get_providers()
        # offload_dir says where weights would go, not that any went: a pipeline that rewrites no weight (dce, a
        # float model's) offloads none, and the note claimed offloaded weights anyway
        offloaded = offloaded_bytes(v.data for v in graph.params.values() if v.data is not None) \
            if graph is not None and graph.offload_dir is not None and self.onnx_model is not None else 0
        if offloaded is None or offloaded:
            # ORT reads its initializers into its own buffers (a prepacked copy for MatMulNBits); it never maps the
            # offloaded files, so the offload bounded the passes' memory, not the lowered model's: said, not silent
            mib = initializer_bytes(self.onnx_model) / 2**20
            held = "" if offloaded is None else f"{offloaded / 2**20:.1f} MiB "
            # named by what set it: `lowbit compile -o DIR` offloads to DIR's disk unasked, and its user read
            # "offload_dir:" (an API argument) and "backend='torch'" (an API spelling) for a flag they never gave
            self.notes.append(f"offloaded weights ({held}in offload_dir={graph.offload_dir}; `lowbit compile -o DIR` "
                              f"offloads to DIR's disk): the onnxruntime session holds its own copy of the model's "
                              f"{mib:.1f} MiB of weights in memory (it does not read the offloaded files), so the "
                              "offload bounded the passes' memory, not this backend's; the torch backend with "
                              "keep_packed (-b torch --backend-option keep_packed=true, or backend='torch', "
                              "backend_options={'keep_packed': True}) runs on the offloaded weights")
        dropped = [provider_name(p) for p in self.requested_providers if provider_name(p) not in self.providers]
        if dropped:
            warnings.warn(f"onnxruntime could not initialise {', '.join(dropped)} (see its log); running on "
                          f"{', '.join(self.providers)}", ProviderFallbackWarning, stacklevel=2)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.input_dtypes = [_ONNX_TO_TORCH.get(i.type) for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def report_text(self) -> str:
        """The session's providers and what the backend changed to run on them (``CompileReport.lowering``)."""
        return "\n".join([f"onnxruntime {ort.__version__} on {', '.join(self.providers)}", *self.notes])

    @classmethod
    def load(cls, path: str | os.PathLike[str], **kwargs: Any) -> OrtCompiled:
        """Run an ONNX file (lowbit's or anyone's); a missing or damaged file raises ``OnnxFileError``."""
        return cls(model=path, **kwargs)

    def save(self, path: str | os.PathLike[str], *, external_data: bool | None = None) -> Path:
        """The model this session runs (widened to float32 where ``report_text`` says so; ``lowbit.export``
        writes the graph's own dtypes)."""
        if self.onnx_model is None:
            raise ValueError("this session was loaded from a file; copy that file instead")
        return save_onnx(self.onnx_model, path, external_data=external_data)

    def extra_repr(self) -> str:
        """Which file or graph, on which providers, taking what: ``OrtCompiled()`` said none of it."""
        source = f"file={str(self.source_path)!r}" if self.source_path is not None else "graph"
        return (f"{source}, providers={self.providers}, inputs={self.input_names}, "
                f"outputs={self.output_names}")

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """Refused by name: ``lowbit.export.load`` gives a file's step graph (its ``lowbit.generation`` metadata)
        a ``generate()``; this session maps ids to logits, and ``.generate`` was an AttributeError."""
        raise TypeError("this ONNX model maps inputs to outputs (input_ids -> logits) and has no KV cache: it holds no "
                        "'lowbit.generation' metadata. To generate from a file, export a model compiled with "
                        "compile_model(..., generation=GenerationSpec(...)) and load that with lowbit.export.load")

    @torch.no_grad()
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        args = ordered_inputs(self.input_names, args, kwargs)
        if self.check_inputs is not None:
            if self.graph is None:  # a file's runner has always taken arrays and lists as well as tensors
                args = tuple(a if isinstance(a, torch.Tensor) else torch.as_tensor(a) for a in args)
            args = self.check_inputs(args)
        out_device = next((a.device for a in args if isinstance(a, torch.Tensor)), torch.device("cpu"))
        feeds: dict[str, np.ndarray] = {}
        unchecked = [self.graph is None and (self.check_inputs is None or self.check_inputs.types[i] is None)
                     for i in range(len(self.input_names))]
        for name, dtype, a, free in zip(self.input_names, self.input_dtypes, args, unchecked):
            t = a if isinstance(a, torch.Tensor) else torch.as_tensor(a)
            if dtype is not None and t.dtype != dtype:
                if free and not (is_int_dtype(t.dtype) and is_int_dtype(dtype)):
                    # a file input of unknown shape has no checker entry: floats fed as int64 were truncated here
                    raise InputError(f"input {name!r} (declared {dtype}, shape not given by the file): expected "
                                     f"dtype {dtype}, got {t.dtype}")
                t = t.to(dtype)
            feeds[name] = t.detach().cpu().contiguous().numpy()
        outs = self.session.run(self.output_names, feeds)
        tensors = [torch.from_numpy(np.ascontiguousarray(o)).to(out_device) for o in outs]
        if self.widened_outputs:
            tensors = [t.to(torch.bfloat16) if w else t for t, w in zip(tensors, self.widened_outputs)]
        return tensors[0] if len(tensors) == 1 else tuple(tensors)


OnnxRuntimeCompiled = OrtCompiled


def lower(graph: Graph, device: str | None = None, **lowering: Any) -> OrtCompiled:
    """The backend registry's entry point: unset lowering options keep ``ORT_LOWERING``'s."""
    return OrtCompiled(graph, device=device, **{k: v for k, v in lowering.items() if v is not None})
