"""Build, save, load and run TensorRT engines from lowbit's QDQ ONNX, with TensorRT's Python API.

Build (``build_engine``): parse the ONNX with ``trt.OnnxParser`` into a **strongly typed** network where
the TensorRT version has that flag (9.1+; then the Q/DQ nodes alone decide precisions: explicit
quantization, no INT8/FP16 builder flags), else a weakly typed one with the INT8 flag that explicit
quantization needs on TensorRT 8. Dynamic dims get one optimization profile, from the IR's symbol
ranges recorded in the model (``lowbit.symbols``: min / capture hint / max) unless shapes are given.
A timing cache file is read before and written after the build, so rebuilds skip kernel timing.

Run (``TensorRTRunner``): ``execute_async_v3`` on torch CUDA tensors (no pycuda): inputs are bound by
address, output shapes come from the context after the input shapes are set.

``tensorrt`` is imported only inside these functions: the rest of lowbit (and the QDQ checker, and the
engine-file integrity checks) works where it is not installed.
"""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

import onnx_ir as ir
import torch

from lowbit.backends.onnx import LoweringOptions
from lowbit.backends.tensorrt.engine_file import (
    EngineFileError,
    EngineHeader,
    read_engine,
    write_engine,
)
from lowbit.errors import LowbitError, OptionError, did_you_mean
from lowbit.ir.graph import Graph, TensorType
from lowbit.ir.signature import InputError

Shape = Sequence[int]
ProfileShapes = Mapping[str, tuple[Shape, Shape, Shape]]


class TensorRTUnavailable(LowbitError, ImportError):
    """The ``tensorrt`` package (or a CUDA GPU) is not available here (a ``LowbitError``: a deliberate refusal
    that says what to do, which ``except LowbitError`` around an export missed)."""


class TensorRTBuildError(LowbitError, RuntimeError):
    """TensorRT could not parse the ONNX model or build an engine, or the profile asked for does not fit the
    model; the message carries its errors."""


class TensorRTOptionError(LowbitError, ValueError):
    """A TensorRT build option with a value it cannot take (``max_dim=0``, ``shapes`` that are not (min, opt, max)),
    named with what to give. A ``LowbitError`` as every deliberate refusal is: it was a bare ValueError."""


def import_tensorrt() -> Any:
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise TensorRTUnavailable(
            "the TensorRT backend needs the 'tensorrt' Python package and an NVIDIA GPU "
            "(pip install tensorrt, or lowbit[tensorrt]); it is not importable here: "
            f"{exc}. lowbit.export(..., format='onnx') writes the QDQ ONNX that TensorRT builds from, "
            "and lowbit.backends.tensorrt.check_tensorrt_qdq validates it without TensorRT.") from exc
    return trt


def _trt_logger(trt: Any) -> Any:
    return trt.Logger(trt.Logger.WARNING)


DEFAULT_MAX_BATCH = 8
"""The default profile's largest batch where the model records no generation limit (``GenerationSpec``'s default
``max_batch``): the capture's batch range (up to 1024) sized SmolLM2's engine for 1024 x 4096 tokens, ~800 GB of
logits alone."""


def default_dim_profile(name: str, least: int | None, most: int | None, hint: int | None,
                        generation: Mapping[str, Any] | None, max_dim: int = 4096,
                        max_batch: int | None = None) -> tuple[int, int, int]:
    """A dynamic dim's (min, opt, max) in the default optimization profile, from its recorded range and capture
    hint (``name``: its ONNX name, ``batch``/``sequence``/``past_sequence`` where lowbit knows the dim;
    ``generation``: a step graph's ``GenerationSpec`` limits, or None). A cap below the dim's least size is refused
    (``TensorRTOptionError``), naming it.

    Every max is capped at ``max_dim``; the batch at ``max_batch``, by default a generation step graph's
    ``GenerationSpec.max_batch`` (its capture range reached max(max_batch, 3): export wants a max above 2), else
    ``DEFAULT_MAX_BATCH``. A step graph's profile is tuned for decode, the call ``generate`` makes most: one new token
    (``sequence`` opt 1, at most ``max_length``) over the whole cache of ``max_length`` slots it always passes
    (``past_sequence`` opt ``max_length``; the capture example's sizes tuned it for 3 tokens over an empty cache)."""
    lo, hi = profile_range(least, most, max_dim)
    cap = f"max_dim={max_dim}"  # what set the max, named where it falls below the dim's least size
    if name == "batch":
        batch_cap = max_batch if max_batch is not None else \
            int(generation["max_batch"]) if generation and "max_batch" in generation else DEFAULT_MAX_BATCH
        if batch_cap < hi:
            hi, cap = batch_cap, f"max_batch={batch_cap}"
    if generation and "max_length" in generation:
        if name == "sequence":
            if int(generation["max_length"]) < hi:
                hi, cap = int(generation["max_length"]), f"the step graph's max_length={generation['max_length']}"
            hint = 1
        elif name == "past_sequence":
            hint = int(generation["max_length"])
    if hi < lo:
        # was raised to the least size without a word: an engine for max_dim=16 took only 32-token calls
        raise TensorRTOptionError(f"TensorRT profile of dim {name!r}: {cap} is below its least size {lo} (the model "
                                  f"was captured for [{least}, {most}]); give {cap.split('=')[0].split()[-1]} >= "
                                  f"{lo}, or shapes= for the inputs with that dim")
    return lo, min(max(hint or lo, lo), hi), hi


def profile_from_symbols(model: ir.Model, opt: Mapping[str, int] | None = None,
                         max_default: int = 4096, shapes: ProfileShapes | None = None,
                         max_batch: int | None = None) -> dict[str, tuple[list[int], list[int], list[int]]]:
    """[min, opt, max] shapes per input from the symbols lowbit records (``lowbit.symbols`` metadata, and a step
    graph's ``lowbit.step_limits``: ``default_dim_profile``); ``shapes`` (input name -> (min, opt, max)) gives
    some or all of them instead.

    ``shapes`` for one input of several used to replace the whole profile (the others had none, and TensorRT's build
    failed on them), and a name no input has reached TensorRT's ``set_shape``: both are refused or completed here.
    A dynamic dim the given inputs share with the others takes their range there too."""
    symbols = json.loads(model.metadata_props.get("lowbit.symbols", "{}"))
    generation = json.loads(model.metadata_props.get("lowbit.step_limits", "null"))
    given = dict(shapes or {})
    names = [v.name for v in model.graph.inputs]
    unknown = [k for k in given if k not in names]
    if unknown:
        raise TensorRTBuildError(f"shapes= names {', '.join(map(repr, unknown))}, which the model has no input "
                                 f"called{did_you_mean(unknown[0], names)}; its inputs are: {', '.join(names)}")
    # opt's keys: a dynamic dim's ONNX name (batch, sequence) or the IR symbol it was exported from (s0); another
    # name was silently ignored
    dim_keys: dict[str, None] = {}
    for v in model.graph.inputs:
        for name in (_dim_name(d) for d in v.shape or () if not isinstance(d, int)):
            dim_keys |= dict.fromkeys([name, str(symbols.get(name, {}).get("symbol", name))])
    _check_opt_names(opt, list(dim_keys), "the model", TensorRTBuildError)
    profile: dict[str, tuple[list[int], list[int], list[int]]] = {}
    # a dynamic dim a given input shares with the others (batch, sequence) takes the given range in all of them: from
    # the symbols, attention_mask's optimum was [2, 7] beside input_ids' given [4, 64], shapes no call has
    shared: dict[str, tuple[tuple[int, int, int], str]] = {}
    for value in model.graph.inputs:
        if value.name not in given:
            continue
        profile[value.name] = _given_profile(value, given[value.name])
        for i, d in enumerate(value.shape or ()):
            if isinstance(d, int):
                continue
            name, sizes = _dim_name(d), tuple(s[i] for s in profile[value.name])
            before = shared.setdefault(name, (sizes, value.name))  # type: ignore[arg-type]
            if before[0] != sizes:
                raise TensorRTBuildError(f"shapes= gives dim {name!r} (min, opt, max) {sizes} in {value.name!r} but "
                                         f"{before[0]} in {before[1]!r}: inputs that share a dim need one range")
    for value in model.graph.inputs:
        if value.name in given:
            continue
        if value.shape is None:
            raise TensorRTBuildError(f"input {value.name!r} has no shape: pass shapes= for the profile")
        lo: list[int] = []
        mid: list[int] = []
        hi: list[int] = []
        for d in value.shape:
            if isinstance(d, int):
                lo.append(d)
                mid.append(d)
                hi.append(d)
                continue
            name = _dim_name(d)
            if name in shared:
                for bound, size in zip((lo, mid, hi), shared[name][0]):
                    bound.append(size)
                continue
            s = symbols.get(name)
            if s is None:
                raise TensorRTBuildError(f"input {value.name!r} has dim {name!r} with no recorded range: "
                                         "pass shapes={name: (min, opt, max)}")
            smin, sopt, smax = default_dim_profile(name, s.get("min"), s.get("max"), s.get("hint"), generation,
                                                   max_default, max_batch)
            # opt by the dim's ONNX name (batch, sequence) or by the IR symbol it was exported from (s0)
            key = name if name in (opt or {}) else str(s.get("symbol"))
            if key in (opt or {}):
                sopt = opt[key]  # type: ignore[index]
            if not smin <= sopt <= smax:
                raise TensorRTBuildError(_opt_out_of_range(key, sopt, f"dim {name!r} of input {value.name!r}", smin,
                                                           smax))
            lo.append(smin)
            mid.append(sopt)
            hi.append(smax)
        profile[value.name] = (lo, mid, hi)
    return profile


def _dim_name(dim: Any) -> str:
    """An ONNX symbolic dim's name (``batch``, ``s0``)."""
    return str(dim.value) if hasattr(dim, "value") else str(dim)


def profile_range(least: int | None, most: int | None, max_dim: int) -> tuple[int, int]:
    """A dynamic dim's (min, max) in the optimization profile, from its recorded range and ``max_dim``."""
    # torch.export reports 2 as the least size of a dim declared from 0 or 1 ("0/1 specialization"), yet the graph
    # runs at 1 and every other backend takes 1 (lowbit.ir.signature): a profile from 2 built engines that refused
    # batch 1 and one-token calls
    lo = 1 if (least or 1) <= 2 else least
    return lo, min(most or max_dim, max_dim)  # type: ignore[return-value]


def _check_opt_names(opt: Mapping[str, int] | None, names: Sequence[str], what: str,
                     error: type[LowbitError]) -> None:
    """Every ``opt=`` key names a dynamic dim of ``what``'s inputs (``names``: their ONNX names and IR symbols)."""
    unknown = [k for k in (opt or {}) if k not in names]
    if unknown:
        raise error(f"TensorRT option opt= names {', '.join(map(repr, unknown))}, but the inputs of {what} have no "
                    f"dynamic dim called so{did_you_mean(unknown[0], list(names))}; their dynamic dims are: "
                    f"{', '.join(names) or 'none (every input is static)'}")


def _opt_out_of_range(key: str, size: int, dim: str, lo: int, hi: int) -> str:
    return (f"TensorRT option opt={{{key}: {size}}} is outside the profile of {dim}: [{lo}, {hi}] (its recorded "
            f"range, capped at max_dim, and a batch at max_batch); give an optimum in it, or shapes= for that input")


def _given_profile(value: ir.Value, triple: tuple[Shape, Shape, Shape]) -> tuple[list[int], list[int], list[int]]:
    """One input's (min, opt, max) from ``shapes=``, checked against its rank and static sizes."""
    lo, mid, hi = (list(s) for s in triple)
    if value.shape is not None:
        dims = list(value.shape)
        if len(lo) != len(dims):
            raise TensorRTBuildError(f"shapes[{value.name!r}] has rank {len(lo)}; the input is rank {len(dims)} "
                                     f"({[d if isinstance(d, int) else str(d) for d in dims]})")
        for i, d in enumerate(dims):
            if isinstance(d, int) and not lo[i] == mid[i] == hi[i] == d:
                raise TensorRTBuildError(f"shapes[{value.name!r}]: dim {i} of the input is static ({d}), the "
                                         f"profile gives {lo[i]}, {mid[i]}, {hi[i]}")
    return lo, mid, hi


def check_profile_inputs(graph: Graph, shapes: ProfileShapes | None) -> None:
    """``shapes=`` against the inputs of the graph it will profile, before that graph is lowered: an input name the
    graph lacks (a typo, ``ids`` for ``input_ids``), a wrong rank or a profile over a static size was found only by
    the engine build, after capture, the whole pipeline's calibration and the ONNX lowering. The compile driver
    calls this on the captured graph before any pass runs (``BackendSpec.check_graph``)."""
    if not shapes:
        return
    inputs = {v.name: v.type for v in graph.inputs}
    names = list(inputs)
    unknown = [k for k in shapes if k not in inputs]
    if unknown:
        raise TensorRTOptionError(
            f"TensorRT option shapes= names {', '.join(map(repr, unknown))}, but graph {graph.name!r} has no such "
            f"input{did_you_mean(unknown[0], names)}; its inputs are: {', '.join(names) or 'none'}")
    for name, triple in shapes.items():
        vtype = inputs[name]
        if not isinstance(vtype, TensorType):
            raise TensorRTOptionError(f"TensorRT option shapes[{name!r}]: input {name!r} is {vtype}, not a tensor")
        lo, mid, hi = (list(s) for s in triple)
        if len(lo) != vtype.rank:
            raise TensorRTOptionError(f"TensorRT option shapes[{name!r}] has rank {len(lo)}; input {name!r} is "
                                      f"{vtype} (rank {vtype.rank})")
        for i, d in enumerate(vtype.shape):
            if isinstance(d, int) and not lo[i] == mid[i] == hi[i] == d:
                raise TensorRTOptionError(f"TensorRT option shapes[{name!r}]: dim {i} of input {name!r} ({vtype}) "
                                          f"is static ({d}), the profile gives {lo[i]}, {mid[i]}, {hi[i]}")
    # inputs sharing a symbol (input_ids and attention_mask: batch, sequence) need one range for it, as the build's
    # profile_from_symbols refuses, but before the graph is calibrated and lowered
    ranges: dict[str, tuple[tuple[int, int, int], str]] = {}
    for name, triple in shapes.items():
        for i, d in enumerate(inputs[name].shape):  # type: ignore[union-attr]
            if isinstance(d, str):
                sizes = tuple(int(s[i]) for s in triple)
                before = ranges.setdefault(d, (sizes, name))  # type: ignore[arg-type]
                if before[0] != sizes:
                    raise TensorRTOptionError(f"TensorRT option shapes= gives dim {d} (min, opt, max) {sizes} in "
                                              f"{name!r} but {before[0]} in {before[1]!r}: inputs that share a dim "
                                              "need one range")


def check_profile_optima(graph: Graph, opt: Mapping[str, int] | None, max_dim: int = 4096,
                         max_batch: int | None = None, given: Sequence[str] = ()) -> None:
    """``opt=`` against the dynamic dims of the graph's inputs, before it is lowered: a name no dim has (``seq`` for
    ``sequence``) was silently ignored, and an optimum outside the dim's profile range reached TensorRT's builder.
    Every dynamic dim's default profile is made here too (``given``: symbols ``shapes=`` sets instead), so a
    ``max_dim``/``max_batch`` below a dim's least size is refused before any pass runs."""
    from lowbit.backends.onnx.lowering import dim_names

    onnx_names = dim_names(graph)
    dims: dict[str, str] = {}  # ONNX dim name or IR symbol -> symbol
    for v in graph.inputs:
        for d in v.type.shape if isinstance(v.type, TensorType) else ():
            if isinstance(d, str) and d in graph.symbols:
                dims[onnx_names.get(d, d)] = dims[d] = d
    for sym in (graph.symbols[d] for d in dict.fromkeys(dims.values()) if d not in given):
        default_dim_profile(onnx_names.get(sym.name, sym.name), sym.min, sym.max, sym.hint,
                            graph.meta.get("generation"), max_dim, max_batch)
    if not opt:
        return
    _check_opt_names(opt, list(dims), f"graph {graph.name!r}", TensorRTOptionError)
    for key, size in opt.items():
        sym = graph.symbols[dims[key]]
        name = onnx_names.get(sym.name, sym.name)
        lo, _, hi = default_dim_profile(name, sym.min, sym.max, sym.hint, graph.meta.get("generation"), max_dim,
                                        max_batch)
        if not lo <= size <= hi:
            raise TensorRTOptionError(_opt_out_of_range(key, size, f"dim {name!r} (symbol {sym.name})", lo, hi))


def check_graph_options(graph: Graph, options: Mapping[str, Any]) -> None:
    """The backend registry's ``check_graph``: the build options that name parts of the model, against it."""
    shapes = options.get("shapes") or {}
    check_profile_inputs(graph, shapes)
    given = [d for v in graph.inputs if v.name in shapes and isinstance(v.type, TensorType)
             for d in v.type.shape if isinstance(d, str)]
    check_profile_optima(graph, options.get("opt"), options.get("max_dim", 4096), options.get("max_batch"), given)


def check_build_options(options: Mapping[str, Any], also: Sequence[str] = ()) -> None:
    """Names and values of ``build_engine``'s options, checked before TensorRT is imported or anything is lowered:
    a misspelt or ill-typed option was reported as "TensorRT is not installed" on a machine without it, and
    otherwise only after the whole lowering, inside TensorRT's builder. ``also``: the caller's own options, listed
    with the build options in a refusal (``export_engine``'s ``onnx_dir`` was missing from the list it showed)."""
    known = sorted([n for n in inspect.signature(build_engine).parameters if n != "onnx_path"] + list(also))
    lowering = {f.name for f in fields(LoweringOptions)}  # the engine's ONNX has fixed ones (_checked_onnx)
    for flag in ("fp16", "bf16"):
        if options.get(flag) is True and options.get("strongly_typed", True) is True:
            raise TensorRTOptionError(f"TensorRT option {flag}=True applies to a weakly typed build only "
                                      "(strongly_typed=False): a strongly typed network takes no precision flag, its "
                                      f"Q/DQ nodes and types decide; drop {flag}= or set strongly_typed=False")
    for key, value in options.items():
        if key in lowering:  # was "did you mean 'opt'?" for opset
            raise OptionError(f"{key}= is an ONNX lowering option; a TensorRT engine is built from the opset-21 QDQ "
                              "form (Attention and RotaryEmbedding decomposed, QDQ weights), so it takes none: drop "
                              f"{key}=, or export format='onnx' with it and build that file yourself. TensorRT build "
                              f"options are: {', '.join(known)}")
        if key not in known:
            raise OptionError(f"unknown TensorRT build option {key!r}{did_you_mean(key, known)}; options are: "
                              f"{', '.join(known)}")
        if key == "max_batch" and value is None:
            continue
        if key in ("max_dim", "max_batch", "workspace_bytes") and (isinstance(value, bool) or not isinstance(value, int)
                                                                   or value <= 0):
            raise TensorRTOptionError(f"TensorRT option {key}={value!r}: give a positive integer")
        if key in ("strongly_typed", "fp16", "bf16") and not isinstance(value, bool):
            raise TensorRTOptionError(f"TensorRT option {key}={value!r}: give True or False")
        if key == "timing_cache" and value is not None and not isinstance(value, (str, os.PathLike)):
            raise TensorRTOptionError(f"TensorRT option timing_cache={value!r}: give a file path or None")
        if key == "opt" and value is not None and (not isinstance(value, Mapping) or any(
                not isinstance(k, str) or isinstance(v, bool) or not isinstance(v, int) or v <= 0
                for k, v in value.items())):
            raise TensorRTOptionError(f"TensorRT option opt={value!r}: give {{symbol name: positive size}}")
        if key == "shapes" and value is not None:
            if not isinstance(value, Mapping):
                raise TensorRTOptionError(f"TensorRT option shapes={value!r}: give {{input name: (min, opt, max)}}")
            for name, triple in value.items():
                if not isinstance(triple, (tuple, list)) or len(triple) != 3:
                    raise TensorRTOptionError(f"TensorRT option shapes[{name!r}]={triple!r}: give (min, opt, max) "
                                              "shapes")
                dims = [list(s) if isinstance(s, (tuple, list, torch.Size)) else None for s in triple]
                if any(d is None for d in dims) or len({len(d) for d in dims}) != 1 or any(  # type: ignore[arg-type]
                        isinstance(x, bool) or not isinstance(x, int) or x < 0
                        for d in dims for x in d):  # type: ignore[union-attr]
                    raise TensorRTOptionError(f"TensorRT option shapes[{name!r}]={triple!r}: min, opt and max must be "
                                              "shapes of the same rank with non-negative integer sizes")
                if any(not lo <= mid <= hi for lo, mid, hi in zip(*dims)):  # type: ignore[misc]
                    raise TensorRTOptionError(f"TensorRT option shapes[{name!r}]={triple!r}: each size needs "
                                              "min <= opt <= max")


def builder_config(trt: Any, builder: Any, *, workspace_bytes: int, strongly_typed: bool, fp16: bool = False,
                   bf16: bool = False) -> Any:
    """The builder config of a build: the workspace limit and, for a weakly typed network, the precision flags (a
    strongly typed one takes none: its Q/DQ nodes and types decide). A flag this TensorRT lacks is refused by name
    rather than skipped."""
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    if strongly_typed:
        if fp16 or bf16:
            raise TensorRTOptionError(f"TensorRT option {'fp16' if fp16 else 'bf16'}=True applies to a weakly typed "
                                      "build only: a strongly typed network takes no precision flag (set "
                                      "strongly_typed=False, or drop it)")
        return config
    # weakly typed explicit quantization (TensorRT 8.x) needs the INT8 flag
    config.set_flag(trt.BuilderFlag.INT8)
    for name, on in (("FP16", fp16), ("BF16", bf16)):
        if not on:
            continue
        flag = getattr(trt.BuilderFlag, name, None)
        if flag is None:
            raise TensorRTOptionError(f"TensorRT option {name.lower()}=True: this TensorRT ({trt.__version__}) has no "
                                      f"BuilderFlag.{name}")
        config.set_flag(flag)
    return config


def build_engine(
    onnx_path: str | os.PathLike[str],
    *,
    shapes: ProfileShapes | None = None,
    opt: Mapping[str, int] | None = None,
    max_dim: int = 4096,
    max_batch: int | None = None,
    workspace_bytes: int = 4 << 30,
    timing_cache: str | os.PathLike[str] | None = None,
    strongly_typed: bool = True,
    fp16: bool = False,
    bf16: bool = False,
) -> tuple[bytes, EngineHeader]:
    """Build a serialized engine (plan bytes) from an ONNX file; returns it with lowbit's header.

    ``shapes`` sets the optimization profile of the inputs it names (input → (min, opt, max)); the others come from
    the model's symbol ranges, with dynamic maxima capped at ``max_dim``, the batch at ``max_batch`` (default: a step
    graph's ``GenerationSpec.max_batch``, else ``DEFAULT_MAX_BATCH``), and optima at ``opt`` (symbol → size) or
    the capture hint (``default_dim_profile``). ``fp16`` / ``bf16`` let a weakly typed build
    (``strongly_typed=False``) run the float layers in half precision.
    """
    trt = import_tensorrt()
    from lowbit.backends.onnx import load_onnx

    onnx_path = Path(onnx_path)
    model = load_onnx(onnx_path, check=False)
    logger = _trt_logger(trt)
    builder = trt.Builder(logger)
    flags = 0
    typed_flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    use_strong = strongly_typed and typed_flag is not None
    if use_strong:
        flags |= 1 << int(typed_flag)
    explicit_batch = getattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH", None)
    if explicit_batch is not None and int(trt.__version__.split(".")[0]) < 10:
        flags |= 1 << int(explicit_batch)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(os.fspath(onnx_path)):  # follows external data beside the file
        errs = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise TensorRTBuildError(f"TensorRT's ONNX parser rejected {onnx_path}:\n  - " + "\n  - ".join(errs))
    config = builder_config(trt, builder, workspace_bytes=workspace_bytes, strongly_typed=use_strong, fp16=fp16,
                            bf16=bf16)
    profile_shapes = profile_from_symbols(model, opt, max_dim, shapes, max_batch)
    profile = builder.create_optimization_profile()
    for name, (lo, mid, hi) in profile_shapes.items():
        profile.set_shape(name, lo, mid, hi)
    config.add_optimization_profile(profile)
    cache_bytes = b""
    if timing_cache is not None and Path(timing_cache).is_file():
        cache_bytes = Path(timing_cache).read_bytes()
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise TensorRTBuildError(f"TensorRT could not build an engine from {onnx_path}; its log above says why "
                                 "(run lowbit.backends.tensorrt.check_tensorrt_qdq on the model first)")
    if timing_cache is not None:
        Path(timing_cache).parent.mkdir(parents=True, exist_ok=True)
        Path(timing_cache).write_bytes(bytes(memoryview(config.get_timing_cache().serialize())))
    header = EngineHeader(
        plan_bytes=0, plan_sha256="", tensorrt_version=trt.__version__,
        inputs=[network.get_input(i).name for i in range(network.num_inputs)],
        outputs=[network.get_output(i).name for i in range(network.num_outputs)],
        profile={k: [list(s) for s in v] for k, v in profile_shapes.items()},
        strongly_typed=use_strong, source=os.fspath(onnx_path),
    )
    return bytes(memoryview(plan)), header


def save_engine(path: str | os.PathLike[str], plan: bytes, header: EngineHeader) -> Path:
    from lowbit.version import __version__

    header.lowbit_version = __version__
    return write_engine(path, plan, header)


class TensorRTRunner:
    """A deserialized engine and one execution context, called with torch tensors."""

    def __init__(self, plan: bytes, header: EngineHeader | None = None, where: str = "<memory>") -> None:
        trt = import_tensorrt()
        if not torch.cuda.is_available():
            raise TensorRTUnavailable("running a TensorRT engine needs a CUDA GPU; torch sees none")
        if header is not None and header.tensorrt_version != trt.__version__:
            raise EngineFileError(f"engine {where} was built by TensorRT {header.tensorrt_version}; this is "
                                  f"{trt.__version__}. Engines are tied to the TensorRT version: rebuild it")
        self.trt = trt
        self.runtime = trt.Runtime(_trt_logger(trt))
        self.engine = self.runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise EngineFileError(f"TensorRT could not deserialize engine {where}: the plan is corrupted, "
                                  "truncated, or from another TensorRT version or GPU")
        self.context = self.engine.create_execution_context()
        self.device = torch.device("cuda", torch.cuda.current_device())
        """Where the engine runs (the current CUDA device when it was loaded): inputs are moved there, outputs made
        there."""
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) != trt.TensorIOMode.INPUT]
        self.header = header

    def _torch_dtype(self, name: str) -> torch.dtype:
        pairs = [("float32", torch.float32), ("float16", torch.float16), ("bfloat16", torch.bfloat16),
                 ("int32", torch.int32), ("int64", torch.int64), ("int8", torch.int8), ("uint8", torch.uint8),
                 ("bool", torch.bool)]
        table = {getattr(self.trt, n): t for n, t in pairs if hasattr(self.trt, n)}  # int64/bf16: TensorRT 9+
        dtype = self.engine.get_tensor_dtype(name)
        if dtype not in table:
            raise TypeError(f"engine tensor {name!r} has TensorRT type {dtype}, which lowbit cannot bind")
        return table[dtype]

    def __call__(self, *args: torch.Tensor) -> list[torch.Tensor]:
        if len(args) != len(self.inputs):
            raise TypeError(f"the engine takes {len(self.inputs)} inputs ({', '.join(self.inputs)}), got {len(args)}")
        keep = []
        for name, a in zip(self.inputs, args):
            if not self.context.set_input_shape(name, tuple(a.shape)):
                # outside the optimization profile: TensorRT said False and the outputs got -1 sizes (torch.empty
                # then failed with "negative dimension")
                profile = (self.header.profile or {}).get(name) if self.header is not None else None
                built = f" (the engine was built for min {profile[0]}, max {profile[2]}: rebuild it with " \
                        "shapes= covering this call)" if profile else ""
                raise InputError(f"input {name!r}: shape {tuple(a.shape)} is outside the engine's optimization "
                                 f"profile{built}")
            t = a.to(device=self.device, dtype=self._torch_dtype(name)).contiguous()
            keep.append(t)
            self.context.set_tensor_address(name, t.data_ptr())
        outs = []
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            out = torch.empty(shape, dtype=self._torch_dtype(name), device=self.device)
            self.context.set_tensor_address(name, out.data_ptr())
            outs.append(out)
        # enqueued on torch's current stream, with no host sync after it: every torch op that reads the outputs (or
        # reuses the inputs' memory) runs after it in stream order. A stream.synchronize() here failed generate's
        # CUDA graph capture of the decode step ("operation not permitted when stream is capturing"), and outside a
        # capture it made the host wait for every step it meant to launch ahead
        stream = torch.cuda.current_stream(self.device)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed (see its log)")
        return outs


def load_engine(path: str | os.PathLike[str]) -> TensorRTRunner:
    """Load an engine file (lowbit's, integrity-checked, or a raw plan) and make it runnable."""
    plan, header = read_engine(path)
    return TensorRTRunner(plan, header, where=os.fspath(path))
