"""Lower a lowbit Graph to an ONNX model (an ``onnx_ir.Model``), node by node through ``LOWERINGS``.

Graph inputs keep the IR's symbolic dims as ONNX ``dim_param``s, so batch and sequence stay dynamic, named
``batch`` / ``sequence`` / ``past_sequence`` where lowbit knows them (``dim_names``; others keep ``s0``, ``s1``); every
IR value keeps its name and declared type on the ONNX value that computes it, so an ONNX graph reads like the IR it came
from, and nodes carry ``lowbit.module`` metadata.

Every node is attempted even after one fails: the error lists every node that could not be lowered (its
value, op and module path) and every op with no lowering at all, so one run shows the whole gap.
"""

from __future__ import annotations

import json
import re
from typing import Any

import onnx
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

import lowbit.backends.onnx.aten  # noqa: F401  registers the ATen lowerings
import lowbit.backends.onnx.quant  # noqa: F401  registers the Q/DQ lowerings
import lowbit.backends.onnx.semantic  # noqa: F401  registers the semantic-op lowerings
from lowbit.backends.onnx.context import (
    LoweringContext,
    LoweringOptions,
    NotLowerable,
    OnnxLoweringError,
    to_onnx_dtype,
    where,
)
from lowbit.backends.onnx.registry import LOWERINGS
from lowbit.ir.graph import Graph, SymType, TensorType, Value
from lowbit.ir.normquant import unfuse_norm_quant
from lowbit.ir.verifier import check_qparams

PRODUCER = "lowbit"

_WHY_NOT = {  # ops with no ONNX form by design: what to export instead
    "cache_attention": " (the packed int8/int4/int2 KV cache of the kv-cache pass has no ONNX form: export the "
                       "generation model compiled without kv-cache, whose float cache ONNX Runtime runs, or keep this "
                       "one with lowbit.save(..., format='lowbit'))",
}


UNFUSED_FOR_ONNX = ("rms_norm_quant", "qlinear_q")
"""Ops ``to_onnx`` writes as the ops they fuse (``lowbit.ir.normquant.unfuse_norm_quant``): a graph compiled for the
triton backend exported with no ONNX lowering for them."""


def _onnx_shape(t: TensorType) -> ir.Shape:
    return ir.Shape([d if isinstance(d, int) else ir.SymbolicDim(str(d)) for d in t.shape])


def _annotate(v: ir.Value, irv: Value) -> None:
    """Give an ONNX value the IR value's name and (unless the lowering set one) its dtype and shape."""
    v.name = irv.name
    if v.type is not None:
        return
    if isinstance(irv.type, TensorType):
        v.dtype = to_onnx_dtype(irv.type.dtype)
        v.shape = _onnx_shape(irv.type)
    elif isinstance(irv.type, SymType):
        v.dtype = ir.DataType.INT64
        v.shape = ir.Shape([])


_TOKEN_INPUTS = {"input_ids", "attention_mask", "token_type_ids", "position_ids", "positions"}
_BATCH_INPUTS = _TOKEN_INPUTS | {"pixel_values", "inputs_embeds"}


def dim_names(graph: Graph) -> dict[str, str]:
    """Readable ONNX names for the IR's symbols where lowbit knows what they are: ``batch`` and ``sequence`` for the
    token inputs' [B, L] (and a vision input's leading dim), ``past_sequence`` for a KV cache input's slots
    ([B, H, S, D], ``graph.meta["generation"]["cache_inputs"]``). A runtime's user reads ``batch``, not ``s0``;
    any other symbol keeps its IR name, and a name is given to one symbol only."""
    cache = set(graph.meta.get("generation", {}).get("cache_inputs", ()))
    wanted: list[tuple[str, str]] = []
    for v in graph.inputs:
        if not isinstance(v.type, TensorType):
            continue
        shape = v.type.shape
        if v.name in _BATCH_INPUTS and shape:
            wanted.append((shape[0], "batch"))
        if v.name in _TOKEN_INPUTS and len(shape) == 2:
            wanted.append((shape[1], "sequence"))
        if v.name in cache and len(shape) == 4:
            wanted += [(shape[0], "batch"), (shape[2], "past_sequence")]
    names: dict[str, str] = {}
    for sym, name in wanted:
        if isinstance(sym, str) and sym in graph.symbols and sym not in names and name not in names.values() \
                and name not in graph.symbols:
            names[sym] = name
    return names


def _rename_dims(model: ir.Model, names: dict[str, str]) -> None:
    """Write ``names`` into every symbolic dim of ``model`` (expressions such as ``2*s1`` included)."""
    if not names:
        return
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, sorted(names, key=len, reverse=True))) + r")\b")
    seen: set[int] = set()

    def rename(v: ir.Value | None) -> None:
        if v is None or id(v) in seen or v.shape is None:
            return
        seen.add(id(v))
        if any(not isinstance(d, int) and d.value is not None and pattern.search(str(d.value)) for d in v.shape):
            v.shape = ir.Shape([d if isinstance(d, int) or d.value is None else
                                ir.SymbolicDim(pattern.sub(lambda m: names[m.group(1)], str(d.value)))
                                for d in v.shape])

    for v in [*model.graph.inputs, *model.graph.outputs]:
        rename(v)
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        for v in node.outputs:
            rename(v)


def missing_lowerings(graph: Graph) -> dict[str, list[str]]:
    """Ops in ``graph`` with no ONNX lowering, each with the nodes (value and module) that use it."""
    missing: dict[str, list[str]] = {}
    for node in graph.nodes:
        if node.op not in LOWERINGS and node.op not in UNFUSED_FOR_ONNX:
            missing.setdefault(node.op, []).append(where(node))
    return missing


def needs_fusion(options: LoweringOptions) -> bool:
    """Whether these options lower quantized linears to fused kernels, which read ``qlinear`` nodes: the
    ``fuse-qlinear`` rewrite (``lowbit.ir.fusion``) then runs on a copy of the graph before lowering."""
    return options.weight_format == "matmulnbits" or options.integer_matmul


def _live(graph: Graph) -> set[int]:
    """``id`` of every node the outputs depend on (a fusion leaves the QDQ nodes it read for DCE)."""
    needed = {id(v) for v in graph.outputs}
    live: set[int] = set()
    for node in reversed(graph.nodes):
        if any(id(v) in needed for v in node.outputs):
            live.add(id(node))
            needed.update(id(v) for v in node.inputs())
    return live


def to_onnx(graph: Graph, options: LoweringOptions | None = None, **kwargs: Any) -> ir.Model:
    """The ONNX model computing ``graph``; keyword arguments are ``LoweringOptions`` fields.

    When the options ask for fused kernels (``needs_fusion``), quantized linears are fused into ``qlinear``
    nodes on a copy first (``graph`` is not changed), as the triton backend's fused norms (``UNFUSED_FOR_ONNX``)
    are written out; a ``qlinear`` always lowers, to its QDQ reference where
    no fused kernel applies. Raises ``OnnxLoweringError`` naming every node that cannot be lowered (and every
    op with no lowering), or every NaN/inf quantization scale or zero point.
    """
    if options is None:
        options = LoweringOptions(**kwargs)
    elif kwargs:
        raise TypeError("pass either options= or keyword options, not both")
    if any(n.op in UNFUSED_FOR_ONNX for n in graph.nodes):
        # the triton backend's norm + activation-quantize form (fuse-norm-quant): the same ops written out, on a copy
        unfused = graph.clone()
        unfuse_norm_quant(unfused)
        graph = unfused
    if needs_fusion(options) and any(n.op == "linear" for n in graph.nodes):
        from lowbit.ir.fusion import fuse_qlinear

        fused = graph.clone()
        if fuse_qlinear(fused).rewritten:
            graph = fused
    nonfinite = check_qparams(graph)
    if nonfinite:  # the file was written and ran, every output NaN; lowbit.load refuses such a checkpoint by name
        raise OnnxLoweringError([f"{p}: the exported model would compute NaN/inf from it" for p in nonfinite])
    live = _live(graph)
    ctx = LoweringContext(graph, options)
    for v in graph.inputs:
        ctx._names.add(v.name)
    for n in graph.nodes:
        for v in n.outputs:
            ctx._names.add(v.name)

    inputs: list[ir.Value] = []
    for v in graph.inputs:
        if not isinstance(v.type, TensorType):
            raise OnnxLoweringError([f"graph input %{v.name} is not a tensor ({v.type}); "
                                     "ONNX models take tensors only"])
        value = ir.Value(name=v.name, type=ir.TensorType(to_onnx_dtype(v.type.dtype)), shape=_onnx_shape(v.type))
        ctx.env[id(v)] = value
        inputs.append(value)
    for name, p in graph.params.items():
        if p.data is None:
            raise OnnxLoweringError([f"parameter @{name} has no tensor (IR parsed without weights?)"])

    problems: list[str] = []
    missing_ops: list[str] = []
    bound: set[int] = {id(v) for v in inputs}
    for node in graph.nodes:
        if id(node) not in live:
            continue
        ctx.current = node
        fn = LOWERINGS.get(node.op)
        if fn is None:
            problems.append(f"{where(node)}: no ONNX lowering for op {node.op!r}{_WHY_NOT.get(node.op, '')}")
            missing_ops.append(node.op)
            continue
        operands = node.inputs()
        if any(id(x) not in ctx.env and not x.is_param for x in operands):
            continue  # an input failed to lower: already reported at its producer
        for x in operands:
            if x.is_param and id(x) not in ctx.env:
                ctx.env[id(x)] = ctx.const_tensor(x.name, x.data)
        try:
            result = fn(ctx, node)
        except NotLowerable as exc:
            problems.append(f"{where(node)}: {exc}")
            continue
        outs = [result] if isinstance(result, ir.Value) else list(result)
        if len(outs) != len(node.outputs):
            problems.append(f"{where(node)}: lowering produced {len(outs)} values for {len(node.outputs)} outputs")
            continue
        for onnx_v, irv in zip(outs, node.outputs):
            if onnx_v.producer() is None and onnx_v.const_value is not None:
                ctx.env[id(irv)] = onnx_v  # a folded constant stays an initializer: runtimes see it as one
                continue
            if onnx_v.producer() is None or id(onnx_v) in bound:
                # an input, initializer or an already-bound value: bind through Identity to keep names unique
                onnx_v = ctx.op("Identity", [onnx_v])
            _annotate(onnx_v, irv)
            ctx.env[id(irv)] = onnx_v
            bound.add(id(onnx_v))
    ctx.current = None
    if problems:
        raise OnnxLoweringError(problems, missing_ops)

    outputs: list[ir.Value] = []
    for v in graph.outputs:
        if v.is_param and id(v) not in ctx.env:
            ctx.env[id(v)] = ctx.const_tensor(v.name, v.data)
        value = ctx.env[id(v)]
        if value.producer() is None or any(value is o for o in outputs):
            value = ctx.op("Identity", [value])
            value.name = ctx.unique(f"{v.name}_out")
            if isinstance(v.type, TensorType):
                value.dtype, value.shape = to_onnx_dtype(v.type.dtype), _onnx_shape(v.type)
        outputs.append(value)

    opsets = {"": options.opset, **ctx.opsets}
    onnx_graph = ir.Graph(inputs, outputs, nodes=ctx.nodes, initializers=ctx.initializers,
                          opset_imports=opsets, name=graph.name or "main")
    ir_version = onnx.helper.find_min_ir_version_for(
        [onnx.helper.make_opsetid(d, v) for d, v in opsets.items()], ignore_unknown=True)
    model = ir.Model(onnx_graph, ir_version=max(ir_version, 10), producer_name=PRODUCER,
                     producer_version=_lowbit_version())
    names = dim_names(graph)
    _rename_dims(model, names)
    model.metadata_props["lowbit.symbols"] = json.dumps(
        {names.get(s.name, s.name): {"min": s.min, "max": s.max, "hint": s.hint, "symbol": s.name}
         for s in graph.symbols.values()})
    generation = graph.meta.get("generation")
    if generation:  # a step graph's limits, which size a runtime's profile (TensorRT's batch, tokens and cache slots)
        model.metadata_props["lowbit.step_limits"] = json.dumps(
            {k: generation[k] for k in ("max_batch", "max_length") if k in generation})
    model.metadata_props["lowbit.inputs"] = json.dumps([v.name for v in graph.inputs])
    # what was written, not what was asked: int8_weights="auto" is resolved on the exporting CPU, and a file read on
    # another machine could not tell whether its integer GEMMs take int8 or uint8 weight codes
    model.metadata_props["lowbit.options"] = json.dumps({**vars(options),
                                                        "int8_weights": "u8" if options.u8_weights else "s8"})
    model.metadata_props[ORT_SESSION_CONFIG] = json.dumps(ort_session_config(options))
    common_passes.RemoveUnusedNodesPass()(model)
    return model


ORT_SESSION_CONFIG = "lowbit.ort_session_config"
"""Model metadata key: the ONNX Runtime session config entries the model's numbers assume (JSON object)."""
ORT_ACCURACY_LEVEL = "session.qdq_matmulnbits_accuracy_level"


def ort_session_config(options: LoweringOptions) -> dict[str, str]:
    """What an ONNX Runtime session needs to compute what lowbit's reference computes.

    ORT fuses ``DequantizeLinear(int4) -> MatMul`` into MatMulNBits at session creation and, unless told
    otherwise, lets it quantize the activations to int8 per block (accuracy level 4): measured on a 4-layer
    SmolLM2 W4A16 g64 export, a default session's logits are 1.0% (relative L2) from the reference and 0.76%
    off in perplexity; with this entry they match to 5e-7. ``OrtCompiled.load`` applies it; a hand-made
    session needs ``so.add_session_config_entry(key, value)`` for each entry.
    """
    return {ORT_ACCURACY_LEVEL: str(options.accuracy_level)}


def _lowbit_version() -> str:
    try:
        from lowbit.version import __version__

        return __version__
    except ImportError:  # pragma: no cover - partial checkouts
        return "0"


def unfused_matmulnbits(model: ir.Model, most: int = 5) -> str | None:
    """What ``weight_format="matmulnbits"`` left in another form, for the compile report and ``lowbit.export``'s
    warning: an int8 weight at accuracy level 0 or a linear with quantized activations has no MatMulNBits form, and
    the backend (and ``format="onnx-matmulnbits"``) chose the QDQ one without a word."""
    qlinears: dict[str, str] = {}
    fused: set[str] = set()
    for node in model.graph:
        if node.metadata_props.get("lowbit.op") != "qlinear":
            continue
        value = node.metadata_props.get("lowbit.value", "")
        qlinears.setdefault(value, node.metadata_props.get("lowbit.module") or f"%{value}")
        if node.op_type == "MatMulNBits":
            fused.add(value)
    rest = [where for value, where in qlinears.items() if value not in fused]
    if not rest:
        return None
    return (f"weight_format=matmulnbits: {len(fused)} of {len(qlinears)} quantized linears run as MatMulNBits; "
            f"{len(rest)} keep the QDQ or integer-GEMM form (MatMulNBits takes weight-only 4-bit weights, 8-bit ones "
            f"at accuracy_level=4): {_first(rest, most)}")


def _first(names: list[str], most: int) -> str:
    """The first ``most`` of ``names`` joined, with the count when some are left out (the reports' lists)."""
    return ", ".join(names[:most]) + (f", ... ({len(names)} in all)" if len(names) > most else "")


def unfused_integer_matmul(model: ir.Model, most: int = 5) -> str | None:
    """What ``integer_matmul=True`` left in QDQ form, for the compile report and ``lowbit.export``'s warning: a
    linear with quantized activations becomes ``MatMulIntegerToFloat`` only for int8 weights (per channel or per
    tensor, no zero point) and symmetric int8 activations per tensor or per token (or ``quantize_dynamic``'s uint8)
    in float32, and every other one (W4A8, per-group or per-channel activation scales, fp8, 16-bit models) was
    written as DequantizeLinear + MatMul without a word. A linear is counted where a MatMul reads a dequantized
    activation and a dequantized stored weight."""
    linears: dict[str, str] = {}
    fused: set[str] = set()
    for node in model.graph:
        where = node.metadata_props.get("lowbit.module") or f"%{node.metadata_props.get('lowbit.value', node.name)}"
        if node.domain == "com.microsoft" and node.op_type == "MatMulIntegerToFloat":
            linears.setdefault(where, where)
            fused.add(where)
        elif node.op_type == "MatMul" and len(node.inputs) == 2 and all(
                v is not None and v.producer() is not None and v.producer().op_type == "DequantizeLinear"
                for v in node.inputs):
            weight = node.inputs[1].producer().inputs[0]  # type: ignore[union-attr]
            if weight is not None and weight.const_value is not None:
                linears.setdefault(where, where)
    rest = [w for w in linears if w not in fused]
    if not rest:
        return None
    return (f"integer_matmul: {len(fused)} of {len(linears)} linears with quantized activations run as "
            f"MatMulIntegerToFloat; {len(rest)} keep the QDQ form (the integer GEMM takes int8 weights per channel or "
            "per tensor with symmetric int8 activations per tensor or per token, in float32): "
            f"{_first(rest, most)}")


def lowered_op_types(model: ir.Model) -> dict[str, int]:
    """ONNX op types in a model with counts (for reports and tests)."""
    counts: dict[str, int] = {}
    for node in model.graph:
        key = f"{node.domain}::{node.op_type}" if node.domain else node.op_type
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


__all__ = ["to_onnx", "needs_fusion", "missing_lowerings", "lowered_op_types", "unfused_matmulnbits",
           "OnnxLoweringError", "LoweringOptions", "unfused_integer_matmul"]
