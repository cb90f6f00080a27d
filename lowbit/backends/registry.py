"""The backend contract: what a backend lowers, what it needs run before lowering, and how to build it.

A backend is one ``register_backend(...)`` call::

    register_backend("onnxruntime", "lowbit.backends.onnxruntime_backend:lower",
                     summary="ONNX Runtime (CPU/CUDA/TensorRT EPs)", passes="fuse-qlinear",
                     ops="lowbit.backends.onnx.registry:LOWERINGS", options=OrtBackendOptions)

* ``lower`` — ``"module:function"`` (imported only when the backend is used, so an optional dependency that is
  missing costs nothing until then) taking ``(graph, device, **options)`` and returning a callable runner.
  ``None`` declares a backend that is not built yet: asking for it is an error that says what to use instead.
* ``passes`` — pipeline text the compile driver (``lowbit.api.compile_graph``) runs after the user's pipeline
  and before lowering, recorded in the report like any pass (ONNX Runtime wants ``fuse-qlinear``: its fused
  kernels read ``qlinear`` nodes). A backend never imports a pass; it names them here.
* ``ops`` — the IR ops it lowers: ``"module:NAME"`` of a collection of op names (a lowering table), a callable
  ``op -> bool``, or None for "every op the IR can run" (the torch reference). The driver checks the ops each
  pass declares it creates (``Pass.creates``) against this before the pipeline runs — a gap is reported before
  calibration starts — and the graph's ops after it.
* ``options`` — a pydantic model of the backend's own options (the torch backend's ``keep_packed``), checked
  before anything runs.
* ``quant_rules`` — ``"module:function"`` taking a pass's ``QuantConfig`` (``Pass.quant_config``), and the input
  sizes of the linears it is for where known (a ``group_fallback``'s), and returning what the backend cannot run in
  it, one line each (TensorRT's explicit-quantization rules: symmetric, static
  per-tensor activations, INT4 in blocks of 64/128), checked with the pipeline before capture and calibration.
* ``check_graph`` — ``"module:function"`` taking ``(graph, options)`` (the captured graph, the backend's options as
  a dict) and raising a ``LowbitError`` for an option that does not fit the model (TensorRT's ``shapes=`` naming an
  input the graph lacks), called by the compile driver before any pass runs.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from lowbit.errors import LowbitError, did_you_mean, unread_options

__all__ = [
    "BACKENDS",
    "BackendError",
    "BackendOptions",
    "BackendSpec",
    "all_backends",
    "get_backend",
    "register_backend",
]


class BackendError(LowbitError, ValueError):
    """A backend cannot be used as asked (unknown, not built, bad option, an op it does not lower). ``cli`` is the
    same message in the ``lowbit`` command's words (``-b torch`` for ``backend='torch'``), where they differ."""

    def __init__(self, message: str, *, cli: str | None = None) -> None:
        super().__init__(message)
        self.cli = cli if cli is not None else message


class BackendOptions(BaseModel):
    """Base of a backend's options: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True)
class BackendSpec:
    name: str
    lower_ref: str | None
    summary: str = ""
    passes: str = ""
    ops_ref: str | Callable[[str], bool] | None = None
    options: type[BackendOptions] = BackendOptions
    not_built: str = ""
    unavailable: Callable[[str | None, bool], str | None] | None = None
    """``unavailable(device, cli)``: why the backend cannot run on this machine, or on the device asked for
    (``None``: its default), or None; checked before capture (no CUDA, or ``device="cpu"``, for triton). With
    ``cli=True`` its advice is worded for the ``lowbit`` command (flags, not keyword arguments)."""
    quant_rules: str | None = None
    """``"module:function"``: ``function(QuantConfig) -> [problem, ...]``, what this backend cannot run among the
    schemes a quantizing pass writes (None: it runs every scheme the IR has)."""
    graph_check: str | None = None
    """``"module:function"``: ``function(graph, options)``, the options checked against the captured model before
    any pass runs (None: nothing to check)."""
    _ops_cache: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def built(self) -> bool:
        return self.lower_ref is not None

    def check_built(self) -> None:
        if not self.built:
            raise BackendError(f"backend {self.name!r} is declared but not built yet: {self.not_built}")

    def check_available(self, device: str | None = None) -> None:
        reason = self.unavailable(device, False) if self.unavailable is not None else None
        if reason:
            raise BackendError(f"backend {self.name!r} cannot run here: {reason}",
                               cli=f"backend {self.name!r} cannot run here: {self.unavailable(device, True)}")

    def parse_options(self, options: dict[str, Any] | None) -> BackendOptions:
        try:
            return self.options(**(options or {}))
        except ValidationError as exc:
            names = sorted(self.options.model_fields)
            # a misspelt option named the list only: did_you_mean points at 'workspace_bytes' for 'workspace'
            msgs = [f"option {'.'.join(str(x) for x in e['loc'])}: {e['msg'].removeprefix('Value error, ')}"
                    + (did_you_mean(e["loc"][0], names, cutoff=0.5) if e["type"] == "extra_forbidden" else "")
                    + f" (got {e.get('input')!r})" if e["loc"]
                    else e["msg"].removeprefix("Value error, ") for e in exc.errors()]  # a whole-model check's own text
            fields = ", ".join(names) or "none"
            raise BackendError(f"backend {self.name}: " + "; ".join(msgs) + f"; options are: {fields}") from None

    def lowers(self, op: str) -> bool:
        """Whether this backend lowers ``op`` (an IR op name)."""
        ref = self.ops_ref
        if ref is None:
            from lowbit.ir.ops import resolve

            try:
                resolve(op)
                return True
            except KeyError:
                return False
        if callable(ref):
            return bool(ref(op))
        if "table" not in self._ops_cache:
            self._ops_cache["table"] = _load(ref)
        table: Collection[str] = self._ops_cache["table"]
        return op in table

    def missing(self, ops: Iterable[str]) -> list[str]:
        """The ops of ``ops`` this backend does not lower, sorted."""
        return sorted({op for op in ops if not self.lowers(op)})

    def quant_problems(self, config: Any, input_sizes: Sequence[int] = ()) -> list[str]:
        """What this backend cannot run in the schemes of ``config`` (a ``QuantConfig``), one line each;
        ``input_sizes``: of the linears ``config`` is for, where known (the fix named fits them)."""
        return list(_load(self.quant_rules)(config, input_sizes)) if self.quant_rules is not None else []

    def check_graph(self, graph: Any, options: dict[str, Any]) -> None:
        """The backend's options (as ``parse_options`` gave them) against ``graph``, the captured model: an input
        name the model lacks is refused before calibration, not at the engine build."""
        if self.graph_check is not None:
            _load(self.graph_check)(graph, options)

    def lower(self, graph: Any, device: str | None = None, options: dict[str, Any] | None = None) -> Any:
        """Build the runner (imports the backend module now)."""
        self.check_built()
        self.check_available(device)
        opts = self.parse_options(options)
        fn = _load(self.lower_ref)  # type: ignore[arg-type]
        return fn(graph, device, **opts.model_dump())


def _load(ref: str) -> Any:
    module, _, attr = ref.partition(":")
    obj: Any = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


BACKENDS: dict[str, BackendSpec] = {}


def register_backend(name: str, lower: str | None, *, summary: str = "", passes: str = "",
                     ops: str | Callable[[str], bool] | None = None, options: type[BackendOptions] = BackendOptions,
                     not_built: str = "", unavailable: Callable[[str | None, bool], str | None] | None = None,
                     quant_rules: str | None = None, graph_check: str | None = None,
                     replace: bool = False) -> BackendSpec:
    """Declare a backend (see the module docstring); ``replace=True`` lets a later registration win (the Triton
    backend replacing its not-built declaration)."""
    if name in BACKENDS and not replace:
        raise ValueError(f"backend {name!r} registered twice (pass replace=True to redefine it)")
    if lower is None and not not_built:
        raise ValueError(f"backend {name!r} has no lower function: say in not_built= what to use instead")
    spec = BackendSpec(name, lower, summary, passes, ops, options, not_built, unavailable, quant_rules, graph_check)
    BACKENDS[name] = spec
    return spec


def all_backends() -> dict[str, BackendSpec]:
    return dict(BACKENDS)


def get_backend(name: str) -> BackendSpec:
    """The backend registered as ``name``; an unknown name lists the known ones."""
    if name not in BACKENDS:
        raise BackendError(f"unknown backend {name!r}{did_you_mean(name, list(BACKENDS), n=2, cutoff=0.5)}; "
                           f"known: {', '.join(BACKENDS)}")
    return BACKENDS[name]


# ---- the built-in backends ------------------------------------------------------------------------


class TorchBackendOptions(BackendOptions):
    keep_packed: bool = False
    """Keep packed weights on the device and dequantize them per call (default: dequantize once at lowering)."""
    semi_structured: bool = False
    """Float linears whose weight has the 2:4 pattern run as semi-structured sparse tensors (cuSPARSELt/CUTLASS)
    on CUDA in fp16/bf16; elsewhere they stay dense and the runner's ``sparse_report`` says why. Off by default:
    on the H200 cuSPARSELt took 0.26x/0.48x dense bf16's speed at M=2048 (4096x11008/11008x4096) and
    0.04-0.08x at M=1-16
    (bench/results/sparse24.json), so 2:4 saves no time there; turn it on to measure your GPU."""
    sparse_library: Literal["auto", "cusparselt", "cutlass"] = "auto"
    """Which sparse GEMM: cuSPARSELt where torch has it (``auto``), or CUTLASS."""
    routed_experts: bool = True
    """A mixture-of-experts layer runs each expert only on the tokens its router picked (the captured dense form
    runs every expert on every token: E/k times the FLOPs), with the dense form's terms in its order; false runs
    the dense form (``lowbit.backends.routed_experts``)."""

    @model_validator(mode="after")
    def _sparse_library_needs_semi_structured(self) -> TorchBackendOptions:
        _refuse_unread(self, "sparse_library", "semi_structured", self.semi_structured)
        return self


def _refuse_unread(opts: BackendOptions, option: str, needs: str, on: bool, want: bool = True) -> None:
    """An option set away from its default that only ``needs=true`` (``want=False``: ``needs=false``) reads is an
    error while ``needs`` is otherwise: it would be silently ignored (``cuda_graphs=true, compile=false`` ran eagerly
    with no CUDA graph)."""
    w, other = str(want).lower(), str(not want).lower()
    if unread_options(opts, {option: None if on else f"{needs}={w}"}):
        given = getattr(opts, option)
        raise ValueError(f"option {option}={str(given).lower() if isinstance(given, bool) else given} applies only "
                         f"with {needs}={w}, and {needs} is {other}: drop {option} or set {needs}={w}")


ORT_LOWERING_KEYS = ("opset", "attention", "rotary", "weight_format", "accuracy_level", "integer_matmul",
                     "int8_weights")
"""The onnxruntime backend's options that are ONNX lowering options (``LoweringOptions`` fields): the CLI applies
them to the model.onnx it writes too."""


class OrtBackendOptions(BackendOptions):
    opset: int | None = None
    attention: str | None = None
    rotary: str | None = None
    weight_format: Literal["qdq", "matmulnbits"] | None = None
    accuracy_level: int | None = None
    integer_matmul: bool | None = None
    """Unset options keep ``ORT_LOWERING``'s choices (opset 23, ONNX Attention and RotaryEmbedding, integer GEMM)."""
    int8_weights: Literal["auto", "s8", "u8"] | None = None
    """The integer GEMM's weight codes (``LoweringOptions.int8_weights``); unset: "auto", uint8 on x86 CPUs without
    VNNI/AMX, where ORT's u8·s8 kernels saturate."""
    threads: int | None = Field(default=None, ge=0)
    """ORT intra-op threads; unset or 0: ORT's default (one per physical core)."""
    spinning: bool | None = None
    """Whether idle ORT worker threads spin; unset: ORT's default (on). Off on a CPU shared with other work."""
    providers: tuple[str, ...] | None = None
    """Execution providers in order of preference (``CUDAExecutionProvider,CPUExecutionProvider`` on the CLI); unset:
    the best this onnxruntime build has (TensorRT EP, CUDA, CPU). One it lacks falls back with a warning."""

    @field_validator("providers", mode="before")
    @classmethod
    def _provider_list(cls, value: Any) -> Any:
        """A CLI value is one string: names separated by commas."""
        return [p.strip() for p in value.split(",") if p.strip()] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _lowerable(self) -> OrtBackendOptions:
        """The lowering options the backend will build, checked now: an opset no runtime loads or an accuracy level
        MatMulNBits lacks is refused before capture and calibration, not by ONNX Runtime at session creation."""
        from lowbit.backends.onnxruntime_backend import ort_lowering_options

        keys = ORT_LOWERING_KEYS
        ort_lowering_options(**{k: getattr(self, k) for k in keys if getattr(self, k) is not None})
        return self


register_backend("torch", "lowbit.backends.torch_backend:lower",
                 summary="the reference: an FX GraphModule on CPU or CUDA; packed weights dequantized at lowering "
                         "unless keep_packed", options=TorchBackendOptions)
register_backend("onnxruntime", "lowbit.backends.onnxruntime_backend:lower",
                 summary="ONNX Runtime session (MatMulNBits, integer GEMM, QDQ)", passes="fuse-qlinear",
                 ops="lowbit.backends.onnx.registry:LOWERINGS", options=OrtBackendOptions)
def _use(backend: str, cli: bool) -> str:
    """A backend to use instead, as the API (``backend='torch'``) or the ``lowbit`` command (``-b torch``) takes it."""
    return f"-b {backend}" if cli else f"backend={backend!r}"


def _tensorrt_unavailable(device: str | None = None, cli: bool = False) -> str | None:
    """No ``tensorrt`` package or no CUDA device: said before capture and calibration, as triton says it (TensorRT
    runs on CUDA whatever ``device`` says)."""
    import importlib.util

    import torch

    if importlib.util.find_spec("tensorrt") is None:
        onnx = ("`lowbit compile -b onnxruntime` writes the QDQ ONNX (model.onnx) TensorRT builds from, and runs it"
                if cli else "lowbit.export(..., format='onnx') writes the QDQ ONNX TensorRT builds from, and "
                "backend='onnxruntime' runs it")
        return (f"the 'tensorrt' Python package is not installed (pip install tensorrt, or lowbit[tensorrt]); {onnx} "
                "here")
    if not torch.cuda.is_available():
        return (f"TensorRT needs an NVIDIA GPU and none is visible: use {_use('onnxruntime', cli)} or "
                f"{_use('torch', cli)}")
    return None


class TensorRTBackendOptions(BackendOptions):
    """``lowbit.backends.tensorrt.build_engine``'s options (checked before capture, whether or not TensorRT is
    installed), and ``engine_cache``. The precision of the quantized layers is the model's Q/DQ nodes' (explicit
    quantization), never a flag: INT8/INT4/FP8 come from the pipeline."""

    workspace_bytes: int = Field(default=4 << 30, gt=0)
    """TensorRT's workspace memory pool limit (``MemoryPoolType.WORKSPACE``), in bytes."""
    max_dim: int = Field(default=4096, gt=0)
    """The optimization profile's maximum of every dynamic dim without a smaller recorded range (batch, sequence)."""
    max_batch: int | None = Field(default=None, gt=0)
    """The profile's largest batch; unset: a generation step graph's ``GenerationSpec.max_batch``, else 8 (the
    capture's own batch range, up to 1024, sized an engine for 1024 x 4096 tokens)."""
    opt: dict[str, int] | None = None
    """The profile's optimum per dynamic dim, by ONNX dim name or IR symbol (``batch=4,sequence=128`` or
    ``s0=4,s1=128`` on the CLI), inside the dim's range; unset: the size seen at capture."""
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]] | None = None
    """(min, opt, max) shapes per input (``input_ids=1x1:1x128:8x512,...`` on the CLI); the inputs it leaves out
    take theirs from the recorded symbol ranges, but for the dims they share with a given one (batch, sequence)."""
    timing_cache: str | None = None
    """A timing-cache file read before and written after the build, so a rebuild skips kernel timing."""
    strongly_typed: bool = True
    """A strongly typed network (TensorRT 9.1+): the Q/DQ nodes and the ONNX types alone decide every precision."""
    fp16: bool = False
    """Let the layers the Q/DQ nodes leave in float run in fp16 (``BuilderFlag.FP16``); weakly typed builds only
    (``strongly_typed=false``): TensorRT takes no precision flag on a strongly typed network."""
    bf16: bool = False
    """As ``fp16``, in bf16 (``BuilderFlag.BF16``, TensorRT 9+); ``strongly_typed=false`` only."""
    engine_cache: str | None = None
    """A directory of built engines, keyed by the SHA-256 of the checked ONNX, these options and the TensorRT
    version: a compile of the same graph with the same options loads the engine instead of building it again."""

    @field_validator("opt", mode="before")
    @classmethod
    def _opt_text(cls, value: Any) -> Any:
        """A CLI value is one string: ``NAME=SIZE`` pairs separated by commas."""
        if not isinstance(value, str):
            return value
        pairs = [p.partition("=") for p in value.split(",") if p.strip()]
        if any(not eq or not k.strip() for k, eq, _ in pairs):
            raise ValueError(f"opt={value!r}: give NAME=SIZE pairs separated by commas (s0=128,s1=64)")
        return {k.strip(): v.strip() for k, _, v in pairs}

    @field_validator("shapes", mode="before")
    @classmethod
    def _shapes_text(cls, value: Any) -> Any:
        """A CLI value is one string: ``INPUT=MIN:OPT:MAX`` per input, separated by commas, each shape ``AxB``."""
        if not isinstance(value, str):
            return value
        out: dict[str, list[list[str]]] = {}
        for item in (p for p in value.split(",") if p.strip()):
            name, eq, triple = item.partition("=")
            shapes = triple.split(":")
            if not eq or not name.strip() or len(shapes) != 3:
                raise ValueError(f"shapes={value!r}: give INPUT=MIN:OPT:MAX per input, separated by commas, each "
                                 "shape as sizes joined by x (input_ids=1x1:1x128:8x512)")
            out[name.strip()] = [s.strip().split("x") for s in shapes]
        return out

    @model_validator(mode="after")
    def _buildable(self) -> TensorRTBackendOptions:
        """Precision flags only where TensorRT reads them, and the build options as ``build_engine`` checks them
        (positive optima, min <= opt <= max), before capture and calibration."""
        _refuse_unread(self, "fp16", "strongly_typed", not self.strongly_typed, want=False)
        _refuse_unread(self, "bf16", "strongly_typed", not self.strongly_typed, want=False)
        from lowbit.backends.tensorrt.engine import check_build_options

        check_build_options({k: getattr(self, k) for k in ("opt", "shapes")})
        return self


register_backend("tensorrt", "lowbit.backends.tensorrt:lower",
                 summary="TensorRT engine from the explicit-quantization (QDQ) ONNX form",
                 ops="lowbit.backends.onnx.registry:LOWERINGS", options=TensorRTBackendOptions,
                 unavailable=_tensorrt_unavailable,
                 quant_rules="lowbit.backends.tensorrt.qdq_rules:pipeline_violations",
                 graph_check="lowbit.backends.tensorrt.engine:check_graph_options")
class TritonBackendOptions(BackendOptions):
    compile: bool = True
    """Run the lowered module under ``torch.compile`` (the kernels are ``triton_op``s it sees through)."""
    cuda_graphs: bool = False
    """``torch.compile(mode="reduce-overhead")``: one CUDA graph per static shape (small calls are host-bound)."""
    semi_structured: bool = False
    """Float 2:4 linears run as semi-structured sparse tensors (cuSPARSELt/CUTLASS) where they qualify; off by
    default (slower than dense on the H200: see ``TorchBackendOptions.semi_structured``)."""
    sparse_library: Literal["auto", "cusparselt", "cutlass"] = "auto"
    epilogues: Literal["gated", "all", "none"] = "gated"
    """Activations computed in their linear's kernel: ``gated`` (a gated MLP's ``act(gate) * up`` in the merged
    gate/up's, measured 1.15-1.32x on the H200), ``all`` (also a lone silu/GELU after a linear: BERT/ViT's, measured
    0.92-1.05x), ``none`` (``lowbit.backends.triton_backend.EPILOGUES``)."""
    norm_residual: bool = True
    """An RMSNorm before a weight-only linear (int4/int8 on the decode layout) and a residual add after it run in
    that linear's kernels: in a decode step the norm in the GEMV and its split-K reduce, the add in the reduce
    (``lowbit.backends.triton_backend._fuse_norm_residual``); ``False`` keeps them as their own ops."""
    pdl: bool = True
    """Weight-only linears as opaque ops whose M = 1 GEMV and split-K reduce launch with programmatic dependent
    launch (``lowbit.kernels._common.pdl_launches``): each starts while its predecessor drains and prefetches its
    first weight tile before it waits. Hopper or newer only (ignored on older GPUs). Measured (H200, session 15,
    ``tools/profile_decode.py --schemes w4a16-g128-head4 [--no-pdl]``, 7B-shaped 4-layer stack, batch 1): 0.403 / 0.401
    ms per decode step without, 0.357 / 0.355 with."""
    float_gemv: bool = True
    """In a generation step graph, float (bf16/fp16) linears at one row run lowbit's GEMV
    (``lowbit::float_linear``) instead of cuBLAS: it ends in the weight-only kernels' split-K reduce, so the RMSNorm,
    residual add and gated activation around it fuse there (``norm_residual``, ``epilogues``) and it launches with
    PDL (``pdl``). Its GEMV alone measured 0.997-1.23x cuBLAS at the 7B step's five shapes (H200, session 34,
    ``tools/bench_float_gemv.py``); ``False`` keeps ``F.linear`` (the A/B). Other row counts run ``F.linear``."""
    rotary_cache: bool = True
    """Each layer's rotary of q and k and the write of its rotated keys and values into a float KV cache run as one
    kernel (``lowbit::rotary_write_kv``, ``lowbit.backends.triton_backend._fuse_rotary_cache``): in the 7B-shaped
    decode step on the H200 they were four launches per layer (21.6 µs per step over 4 layers); ``False`` keeps
    Inductor's rotary kernels and the row writes (``tools/profile_decode.py --no-rotary-cache``, the A/B). A layer
    without rotary (GPT-2, Bloom, a NoPE layer) writes its keys and values in one launch (``lowbit::write_kv``)
    where two row writes ran. A packed (int8/int4/int2) cache's decode-step write, with the layer's rotary, is one
    ``write_packed_kv`` launch (``_fuse_packed_cache_writes``) where ``cache_update``'s ~74 aten ops, the float
    candidates' ~25 and two rotaries' ~10 ran per layer; ``False`` keeps those ops too."""
    merge_in_split: bool = False
    """The decode step's attention merges its chunks in the split kernel (the last program per sequence and head
    group, counting itself done on ``split_counters``) instead of a merge launch of its own: a packed cache's
    (``decode_attention``'s ``merge_in_split``: two launches a layer, not three) and, with ``pdl``, a float cache's
    (``_sdpa_split``'s ``MERGE``: one, not two). Off: slower where measured (H100, session 52,
    ``tools/bench_generate.py --model smollm2-random [--merge-in-split]``): SmolLM2's config, float 0.676 / 2.706 ms
    a step at batch 1 / 16 against 0.593 / 2.572 with the merge launch, W4A16 g64 + int4 cache 1.410 / 2.328
    against 1.246 / 2.165; the float cache's attention alone
    (``tools/bench_decode_sdpa.py``) 7.40 against 5.09 us at 1 x 9 x 3 heads over 640 slots and 8.88 against
    7.38 at the 7B step's 1 x 32 x 32 over 768: the last program's serial merge is a tail the parallel merge launch
    does not have. The same merge code: equal outputs but for float32 rounding."""
    routed_experts: bool = True
    """A mixture-of-experts layer runs each expert, on its kernels, only over the tokens its router picked (as the
    torch backend's ``routed_experts``; the expert's gate and up merge per expert, not across experts); false runs
    the dense form: every expert on every token, all experts' gate and up in one wide GEMM."""
    grouped_experts: bool = True
    """Decode-sized calls (<= 7 rows on float experts where the expert-blocked ops take the rest, else <= 16; on
    int4/int8 words only where those ops are off, <= 4: ``grouped_experts.MAX_ROWS`` and its siblings) of a routed MoE
    layer, while a CUDA graph captures (the generator's decode steps) or on the GPU outside one, run each token's
    picked experts in two launches that read the router's picks on the device (``moe_gate_up`` + ``moe_down``,
    ``lowbit.backends.grouped_experts``) instead of the dense form (every expert on every token: the layer's launches
    times E) or ``nonzero`` (a host wait). H100, a Mixtral-shaped stack (``tools/bench_moe.py``): bf16 decode 0.836 /
    1.632 ms a step at batch 1 / 16 against 2.089 / 2.760 dense, W4A16 1.132 against 2.009 at batch 1. The report
    names any layer that keeps the dense form and why; false: the dense form under capture."""
    blocked_experts: bool = True
    """With ``grouped_experts``: a routed layer's calls past its row limit (a prefill, a larger decode batch), in a
    capture or on the GPU, run on the expert-blocked ops (``moe_route`` + ``moe_gate_up_blocked`` +
    ``moe_down_blocked``, ``lowbit.kernels.moe_blocked``: one program per expert and block of its rows, its weight
    tile read once for them, ``tl.dot``), not the dense form (in a capture) or ``nonzero`` (eager). H100, session 57
    (``tools/bench_moe.py``, each pair from one run): W4A16 decode 1.081 / 1.310 ms a step at batch 1 / 4 against
    the per-row ops' 1.162 / 1.751, 1.548 at 16 against the dense form's 2.980; a 16 x 128 prefill 6.05 ms (W4A16) /
    4.25 (bf16) against the dense form's 9.51 / 11.54. False: as before it."""

    @model_validator(mode="after")
    def _read_options(self) -> TritonBackendOptions:
        _refuse_unread(self, "cuda_graphs", "compile", self.compile)  # reduce-overhead is a torch.compile mode
        _refuse_unread(self, "sparse_library", "semi_structured", self.semi_structured)
        _refuse_unread(self, "grouped_experts", "routed_experts", self.routed_experts)  # grouped: a routed layer's
        _refuse_unread(self, "blocked_experts", "grouped_experts", self.grouped_experts and self.routed_experts)
        return self


def _triton_unavailable(device: str | None = None, cli: bool = False) -> str | None:
    """No CUDA device and no Triton interpreter (``TRITON_INTERPRET=1``, how the kernels are tested on CPU), or a
    device that is not CUDA outside the interpreter: found by the lowering after capture and calibration, as a
    RuntimeError."""
    import os

    import torch

    if os.environ.get("TRITON_INTERPRET") == "1":
        return None
    if not torch.cuda.is_available():
        # the command's torch backend keeps weights packed already (compile sets keep_packed=true)
        packed = "" if cli else "; keep_packed=True keeps weights packed"
        return (f"lowbit's Triton kernels need a CUDA GPU and none is visible: use {_use('torch', cli)} (the CPU/CUDA "
                f"reference{packed}) or {_use('onnxruntime', cli)} (MatMulNBits / integer GEMM on CPU)")
    if device is not None and torch.device(device).type != "cuda":
        asked, give = (f"--device {device}", "--device cuda") if cli else \
            (f"device={device!r}", "device='cuda' (CLI: --device cuda)")
        return (f"lowbit's Triton kernels run on CUDA, not on {asked}: give {give}, or use {_use('torch', cli)} on "
                "the CPU")
    return None


register_backend("triton", "lowbit.backends.triton_backend:lower",
                 summary="lowbit's Triton kernels (W4A16/W8A16 GEMV, W8A8/W4A8 int8 GEMM, FP8) over packed weights, "
                         "under torch.compile; other nodes run the torch reference",
                 passes="fuse-qlinear,merge-linears,fuse-norm-quant", options=TritonBackendOptions,
                 unavailable=_triton_unavailable)
