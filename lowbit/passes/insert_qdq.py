"""The ``quantize`` pass: insert quantize/dequantize nodes for linear weights, linear inputs and the KV cache.

Annotation (which linear gets which scheme) is ``lowbit.ir.qscheme.QuantConfig``; this pass is the
transformation. What it writes is the QDQ contract of ``docs/design.md``:

* **weights**: the float weight param is replaced by packed params ``<w>.qdata`` / ``<w>.scale`` /
  ``<w>.zero_point`` (no zero point when symmetric) read by a ``dequantize`` node feeding the linear. Scales
  come from an observer over the weight (round-to-nearest; ``w_obs=mse`` searches the clipping range). The
  old weight is never modified: a weight other nodes also read (SmolLM2's ``lm_head`` is the embedding) stays
  as it is for them.
* **activations**: ``dynamic_qparams → quantize → dequantize`` in front of the linear's input (one chain per
  input value and scheme, shared by q/k/v projections), or, with ``a_static=true``, a fixed scale found by
  running calibration data block by block (``lowbit.calibration.engine``) with the weights already quantized.
* **KV cache**: ``dynamic_qparams → quantize → dequantize`` on the keys after rotary and on the values, at
  ``[batch, kv_heads, seq, head_dim]`` (before grouped-query expansion: that is what a cache stores).
  ``kv_window=R`` keeps each query's ``R`` most recent tokens float (KIVI's residual) and ``kv_sink=N`` the
  first ``N`` tokens (the attention sink, whose keys/values are outliers; IntactKV/KVQuant keep it float):
  attention then reads the quantized and the float keys/values concatenated along the sequence, with a mask
  letting query ``t`` see every other token only quantized and those only float, which is exactly what
  decoding with a quantized cache plus float sink and window computes.

Options are short so pipelines stay readable: ``quantize(w=int4,group=64)``,
``quantize(w=int8,a=int8)`` (per-channel W8, per-token dynamic A8), ``quantize(w=int8,a=int8,kv=int4)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from pydantic import Field, ValidationError, field_validator, model_validator

from lowbit.calibration.observers import make_observer
from lowbit.ir.graph import Graph, Node, TensorType, Value
from lowbit.ir.qscheme import (
    DEFAULT_KEEP_FLOAT,
    KVCacheScheme,
    ModuleRule,
    ObserverName,
    QScheme,
    QuantConfig,
    module_matches,
)
from lowbit.ir.quant import (QDTYPES, Layout, ceil_div_dim, get_qdtype, layout_for, mul_dim, qparams_from_range,
                             quantize, tiled_minmax)
from lowbit.ir.qdq import WeightPlan, write_weight_qdq
from lowbit.ir.rewrite import eliminate_dead_code
from lowbit.ir.rotation_regions import no_attention_reason
from lowbit.passes.base import (NO_QLINEAR, WEIGHT_REWRITES, CalibrationOptions, Pass, PassError, PassResult,
                                ScopedOptions, missing_comma, nonfinite_problem, register_pass)

__all__ = ["InsertQDQ", "InsertQDQOptions", "config_from_options", "quantize_weight", "insert_dynamic_qdq",
           "quantize_graph", "VIEW_OPS"]

VIEW_OPS = {"reshape", "aten.reshape.default", "aten.view.default", "aten.expand.default",
            "aten.unsqueeze.default", "aten.clone.default", "aten.contiguous.default"}
"""Ops that only re-view a KV tensor between where it is computed and where attention reads it (GQA expand)."""


def _is_view(node: Node) -> bool:
    """A view op, or a slice that keeps the whole axis (``x[:, :, None, :]`` exports as ``slice(x, 3, 0, 2**63-1)``)."""
    if node.op in VIEW_OPS:
        return True
    if node.op == "aten.slice.Tensor":
        start, end, step = node.arg(2, "start", None), node.arg(3, "end", None), node.arg(4, "step", 1)
        return start in (0, None) and (end is None or (isinstance(end, int) and end >= 2**62)) and step in (1, None)
    return False


NonFinitePolicy = Literal["error", "keep-float"]


class InsertQDQOptions(CalibrationOptions, ScopedOptions):
    """Options of ``quantize``; a ``config`` JSON file replaces the w/a/kv options for mixed precision. The
    calibration options (``calib``, ``calib_n``, ...) are read by static activation scales (``a_static``) only."""

    w: str | None = None
    """Weight qdtype: int8, uint8, int4, uint4, int3, int2, fp8e4m3, fp8e5m2; unset keeps weights float."""
    group: int | None = Field(default=None, gt=0)
    """Weight group size along the input dim (block-wise scales); unset: one scale per output channel."""
    block: int | None = Field(default=None, gt=0)
    """One weight scale per ``block`` x ``block`` tile of ``[out, in]`` (DeepSeek-V3's and compressed-tensors'
    FP8_BLOCK: 128), edge tiles partial; RTN (minmax) only; exclusive with ``group``."""
    group_fallback: int | None = Field(default=None, gt=0)
    """Group size for linears whose input dim ``group`` does not divide (SmolLM2's 576 with group=128)."""
    sym: bool = True
    """Symmetric weights (no zero point)."""
    w_obs: ObserverName = "minmax"
    """Weight scale observer: minmax (plain RTN) or mse/percentile/histogram (clipping search)."""
    a: str | None = None
    """Input-activation qdtype; unset keeps activations float."""
    a_gran: Literal["per_token", "per_tensor", "per_channel"] = "per_token"
    """Input-activation scale granularity: one scale per token (or per ``a_group`` channels of it), per tensor, or
    per input channel."""
    a_group: int | None = Field(default=None, gt=0)
    """Channels per scale within a token (per_token only); unset: one scale per token."""
    a_sym: bool = True
    """Symmetric activation scales (no zero point); false: asymmetric, with a zero point."""
    a_static: bool = False
    """Fixed activation scales from calibration data instead of in-graph dynamic ones."""
    a_obs: ObserverName = "minmax"
    """Observer of static activation scales."""
    a_clip: float = Field(default=1.0, gt=0, le=1)
    """Dynamic activation scales from ``a_clip·`` each token's (group's) range: values beyond are clamped and the
    rest get a finer grid. QuaRot uses 0.9 for A4 per token; 1 is plain min/max. Such a QDQ is not fused into
    ``qlinear`` (the op has no clip kwarg); ONNX scales the range the same way (QuantizeLinear saturates what lies
    beyond), the HF checkpoint writers refuse it."""
    kv: str | None = None
    """KV-cache qdtype (keys after rotary and values); unset keeps the cache float."""
    k_gran: Literal["per_channel", "per_token", "per_tensor"] = "per_channel"
    """Key scale granularity: per channel over ``k_group``-token blocks (KIVI), per token, or per tensor."""
    v_gran: Literal["per_channel", "per_token", "per_tensor"] = "per_token"
    """Value scale granularity: per token in ``v_group``-channel groups (KIVI), per channel, or per tensor."""
    kv_group: int | None = Field(default=32, gt=0)
    """Keys per_channel: tokens per scale block (KIVI); values per_token: channels per scale. ``none``: the whole
    axis (per_token: one scale per token per head, whatever head_dim is)."""
    k_group: int | None = Field(default=None, gt=0)
    """Overrides kv_group for the keys."""
    v_group: int | None = Field(default=None, gt=0)
    """Overrides kv_group for the values."""
    kv_sym: bool = False
    """Symmetric KV-cache scales (no zero point); default asymmetric, with a zero point."""
    kv_clip: float = Field(default=1.0, gt=0, le=1)
    """KV-cache scales from ``kv_clip·`` each block's range (QuaRot: 0.95 for KV4); 1 is plain min/max."""
    kv_window: int = Field(default=0, ge=0)
    """Most recent tokens each query reads unquantized (KIVI's float residual)."""
    kv_sink: int = Field(default=0, ge=0)
    """First tokens kept unquantized (the attention sink)."""
    keep: list[str] = []
    """Extra module globs kept float (added to the default lm_head and embeddings): their linears, and with ``kv``
    the KV cache of the attention they match (``model.layers.0.*``, or ``model.layers.0.self_attn`` alone)."""
    head: str | None = None
    """Weight qdtype of the output head (``lm_head``), weight-only; unset keeps it float. The head is the largest
    matrix a small LM reads per decoded token (SmolLM2-135M: 49152 x 576, 21% of the weights), so a float head
    caps the speed-up of low-bit decoding. A head tied to the embeddings is untied: it gets its own packed params
    and the embedding lookup keeps reading the float table."""
    head_group: int | None = Field(default=None, gt=0)
    """Group size of the head's weight scales; unset: ``group`` (per output channel when that is unset too)."""
    nonfinite: NonFinitePolicy = "error"
    """A weight holding NaN/inf: ``error`` refuses naming the parameter and the row; ``keep-float`` leaves that
    linear float (listed in the stats as ``kept_float_nonfinite``)."""
    config: str | None = None
    """Path of a JSON ``QuantConfig`` (per-module rules); exclusive with w/a/kv."""

    def reads_calibration(self) -> bool:
        return self.a_static or self.config is not None  # a config file may ask for static scales

    @field_validator("kv_group", mode="before")
    @classmethod
    def _whole_axis(cls, v: Any) -> Any:
        """``kv_group=none`` in pipeline text: the one option whose default (32) is not its unset value, so text
        could not reach the whole axis, and ``spec()``'s ``kv_group=None`` did not parse back (report.json,
        reproducers)."""
        return None if isinstance(v, str) and v.strip().lower() in ("none", "null") else v

    def input_files(self) -> list[tuple[str, str]]:
        files = [("config", self.config)] if self.config is not None else []
        return files + (super().input_files() if self.a_static else [])

    @model_validator(mode="after")
    def _semantics(self) -> InsertQDQOptions:
        """qdtype names, fp8 symmetry and the rest of what ``config_from_options`` checks, when the pipeline is
        parsed: ``quantize(w=int5)`` fails before the model is loaded (the config file is read at run time)."""
        import os

        from lowbit.passes.base import PassFileError

        _check_read_options(self)
        if self.config is None:
            config_from_options(self)
        elif os.path.isfile(self.config):
            try:
                config_from_options(self)
            except PassError:
                raise
            except (ValueError, OSError) as exc:
                raise PassFileError(f"pass quantize: option config={self.config!r}: {exc}") from None
        return self


def _unset(qdtype: str | None) -> bool:
    return qdtype in (None, "none", "float")  # "none"/"float": that part asked, explicitly, to stay float


def _check_read_options(o: InsertQDQOptions) -> None:
    """Refuse an option set to a non-default value that nothing reads (``quantize(w=int4,a_static=true)``,
    ``kv_window=32`` without ``kv=``): the run would succeed with the option silently ignored. A ``config`` file
    replaces the w/a/kv options (only the head, ``keep`` and ``group_fallback`` still apply); the head reads the
    weight options. Static per-token scales are refused here too, before the model is loaded."""
    if o.config is None and not _unset(o.a) and o.a_static and o.a_gran == "per_token":
        raise PassError("pass quantize: static activation scales cannot be per token (tokens vary at run time): use "
                        "a_gran=per_tensor or per_channel with a_static=true")
    plain = o.config is None  # the w/a/kv options are read
    head = not _unset(o.head)
    reads = {
        "a_gran": (plain and not _unset(o.a), "a="),
        "a_group": (plain and not _unset(o.a) and o.a_gran == "per_token", "a= and a_gran=per_token"),
        "a_sym": (plain and not _unset(o.a), "a="), "a_static": (plain and not _unset(o.a), "a="),
        "a_clip": (plain and not _unset(o.a), "a="), "a_obs": (plain and not _unset(o.a) and o.a_static,
                                                              "a= and a_static=true"),
        **{k: (plain and not _unset(o.kv), "kv=") for k in ("k_gran", "v_gran", "kv_sym", "kv_clip", "kv_window",
                                                           "kv_sink")},
        "k_group": (plain and not _unset(o.kv) and o.k_gran != "per_tensor", "kv= and a k_gran but per_tensor"),
        "v_group": (plain and not _unset(o.kv) and o.v_gran != "per_tensor", "kv= and a v_gran but per_tensor"),
        "kv_group": (plain and not _unset(o.kv) and ((o.k_gran != "per_tensor" and o.k_group is None) or
                                                     (o.v_gran != "per_tensor" and o.v_group is None)),
                     "kv= and keys or values not per_tensor without their own k_group/v_group"),
        **{k: (head or (plain and not _unset(o.w)), "w= (or head=)") for k in ("group", "sym", "w_obs")},
        "block": (plain and not _unset(o.w), "w="),
        "group_fallback": (not plain or o.group is not None or o.head_group is not None, "group= (or head_group=)"),
        "head_group": (head, "head="),
        # dynamic scales read no data: quantize(w=int4,calib_n=4) ran with calib_n silently ignored
        **{k: (o.reads_calibration(), "a_static=true (static activation scales) or config=")
           for k in ("calib", "calib_n", "calib_len", "tokenizer", "batch_size", "device")},
    }
    needs = {k: None if read else why for k, (read, why) in reads.items()}
    message = o.unread_message(needs)
    if message and not plain:  # the first unread option is a w/a/kv one that the config file replaces
        replaced = {k: why for k, why in needs.items() if why is not None and why[0] in "awk"}
        message = o.unread_message(replaced, f"config={o.config!r} replaces the w/a/kv options: write it in the "
                                   "config file") or message
    if message:
        raise PassError(f"pass quantize: {message}")


def config_from_options(o: InsertQDQOptions) -> QuantConfig:
    """The QuantConfig the options describe (or the ``config`` file's)."""
    if o.config is not None:
        given = [k for k in ("w", "a", "kv") if getattr(o, k) is not None]
        if given:
            raise PassError(f"pass quantize: option config={o.config!r} replaces {', '.join(given)}: give one or "
                            "the other")
        cfg = QuantConfig.from_file(o.config)
        if o.keep:
            cfg = cfg.model_copy(update={"keep_float": [*cfg.keep_float, *o.keep]})
        return _with_head(cfg, o)
    for qopt, sopt in (("w", "sym"), ("a", "a_sym"), ("kv", "kv_sym")):
        value = getattr(o, qopt)
        if _unset(value):
            continue
        if value not in QDTYPES:
            raise PassError(f"pass quantize: option {qopt}={value}: unknown qdtype {value!r}; known: "
                            f"{', '.join(QDTYPES)} (or none){missing_comma(value)}")
        if QDTYPES[value].is_float and not getattr(o, sopt):
            raise PassError(f"pass quantize: option {qopt}={value} is symmetric only (fp8 has no zero point): "
                            f"set {sopt}=true")
    if o.block is not None and o.group is not None:
        raise PassError(f"pass quantize: options block={o.block} and group={o.group}: a weight has tiles or groups "
                        "of scales, give one")
    try:
        gran = "per_block" if o.block else "per_group" if o.group else "per_channel"
        weight = None if _unset(o.w) else QScheme(
            qdtype=o.w, symmetric=o.sym, granularity=gran, group_size=o.block or o.group, observer=o.w_obs)
        inp = None if _unset(o.a) else QScheme(
            qdtype=o.a, symmetric=o.a_sym, granularity=o.a_gran, group_size=o.a_group,
            dynamic=not o.a_static, observer=o.a_obs, clip_ratio=o.a_clip)
        kv = None
        if not _unset(o.kv):
            k_group = (o.k_group or o.kv_group) if o.k_gran != "per_tensor" else None
            v_group = (o.v_group or o.kv_group) if o.v_gran != "per_tensor" else None
            kv = KVCacheScheme(
                key=QScheme(qdtype=o.kv, symmetric=o.kv_sym, granularity=o.k_gran, group_size=k_group, dynamic=True,
                            clip_ratio=o.kv_clip),
                value=QScheme(qdtype=o.kv, symmetric=o.kv_sym, granularity=o.v_gran, group_size=v_group,
                              dynamic=True, clip_ratio=o.kv_clip),
                window=o.kv_window, sink=o.kv_sink)
    except ValidationError as exc:
        raise PassError("pass quantize: " + "; ".join(e["msg"].removeprefix("Value error, ") for e in exc.errors())
                        ) from None
    return _with_head(QuantConfig(weight=weight, input=inp, kv=kv, keep_float=[*DEFAULT_KEEP_FLOAT, *o.keep]), o)


HEAD_MODULE = "lm_head"


def _with_head(cfg: QuantConfig, o: InsertQDQOptions) -> QuantConfig:
    """``cfg`` with the output head quantized weight-only as the ``head`` options say (unchanged when unset)."""
    if _unset(o.head):
        return cfg
    if o.head not in QDTYPES:
        raise PassError(f"pass quantize: option head={o.head}: unknown qdtype {o.head!r}; known: "
                        f"{', '.join(QDTYPES)} (or none)")
    group = o.head_group or o.group
    try:
        scheme = QScheme(qdtype=o.head, symmetric=o.sym or QDTYPES[o.head].is_float,
                         granularity="per_group" if group else "per_channel", group_size=group, observer=o.w_obs)
    except ValidationError as exc:
        raise PassError("pass quantize: option head: " + "; ".join(e["msg"].removeprefix("Value error, ")
                                                                   for e in exc.errors())) from None
    rule = ModuleRule(pattern=HEAD_MODULE, weight=scheme)
    return cfg.model_copy(update={"rules": [*cfg.rules, rule],
                                  "keep_float": [p for p in cfg.keep_float if p != HEAD_MODULE]})


# ---- helpers ------------------------------------------------------------------------------------


def _common_module(nodes: list[Node]) -> str:
    parts = [n.module.split(".") for n in nodes if n.module]
    if not parts:
        return ""
    common = []
    for segs in zip(*parts):
        if all(s == segs[0] for s in segs):
            common.append(segs[0])
        else:
            break
    return ".".join(common)


def _pow2_divisors(k: int, below: int) -> list[int]:
    out, g = [], 1
    while g * 2 <= below and k % (g * 2) == 0:
        g *= 2
        out.append(g)
    return sorted((d for d in out if d >= 16), reverse=True)[:2] or sorted(out, reverse=True)[:2]


def _static_dim(t: TensorType, i: int, what: str) -> int:
    d = t.shape[i]
    if not isinstance(d, int):
        raise PassError(f"pass quantize: {what} has a dynamic size {d!r} at dim {i}; it must be static")
    return d


def _check_group(node: Node, w: Value, scheme: QScheme, fallback: int | None, option: str = "option group"
                 ) -> int | None:
    """The group size to use on this linear, or an error naming option, node and dimension. ``option`` is where the
    group came from (``option head_group`` for the head, ``config group_size`` from a config file)."""
    if scheme.granularity != "per_group":
        return None
    g = scheme.group_size
    assert g is not None
    n, k = w.tensor_type.shape
    if k % g == 0:  # type: ignore[operator]
        return g
    if fallback is not None and k % fallback == 0:  # type: ignore[operator]
        return fallback
    ok = _pow2_divisors(int(k), g)
    key = "group_fallback" if fallback is not None else option.split()[-1]  # the option that failed is the one to fix
    hint = f"use {key}={f' or {key}='.join(map(str, ok))}" if ok else "use per-channel scales (no group)"
    extra = (f", or keep {key}={g} with group_fallback={ok[0]} (group {g} where it divides, {ok[0]} elsewhere)"
             if ok and fallback is None else "")
    what = "option group_fallback" if fallback is not None else option
    gval = fallback if fallback is not None else g
    raise PassError(
        f"pass quantize: {what}={gval} does not divide the input size {k} of linear %{node.name} "
        f"(module {node.module!r}, weight @{w.name} [{n}, {k}]): {k} is not a multiple of {gval}; {hint}{extra}")


def _follows_weight_tiles(xs: QScheme, ws: QScheme | None) -> bool:
    """Activation groups that are the weight's tile columns (``block=128,a_group=128``): the last one is partial
    where K is not a multiple, as the weight's edge tiles are (SmolLM2's K = 576 = 4.5 x 128), and the GEMM scales
    each K step by one activation and one weight scale either way."""
    return ws is not None and ws.granularity == "per_block" and ws.group_size == xs.group_size


def quantize_weight(w: torch.Tensor, scheme: QScheme, group: int | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, Layout]:
    """RTN: (qdata, scale, zero point or None, layout) of a weight ``[N, K]`` under ``scheme``."""
    if group is not None and group != scheme.group_size:
        scheme = scheme.model_copy(update={"group_size": group})
    layout = layout_for(scheme, w.shape, "weight")
    if layout.is_tiled:  # minmax over each tile (QScheme refuses other observers with per_block)
        scale, zp = qparams_from_range(*tiled_minmax(w, layout), scheme.qdtype, scheme.symmetric)
    else:
        obs = make_observer(scheme.observer, scheme.qdtype, scheme.symmetric, layout)
        obs.observe(w)
        scale, zp = obs.qparams(w.shape)
    q = quantize(w, scale, zp, qdtype=scheme.qdtype, axis=layout.axis, block_size=layout.block_size)
    return q, scale, zp, layout


def _insert_weight_qdq(graph: Graph, node: Node, scheme: QScheme, group: int | None,
                       users: dict[int, list[Node]]) -> tuple[int, int]:
    """Replace the linear's weight by packed params + dequantize; returns (float bytes, quantized bytes)."""
    w: Value = node.args[1]
    q, scale, zp, _ = quantize_weight(w.data, scheme, group)
    return write_weight_qdq(graph, node, scheme, group, q, scale, zp, users)


def _dynamic_types(x: Value, scheme_qdtype: str, layout: Layout) -> tuple[TensorType, TensorType, TensorType]:
    """Types of (scale, zero point, q) for a dynamic QDQ of ``x``."""
    t = x.tensor_type
    qd = get_qdtype(scheme_qdtype)
    if layout.axis is None:
        sshape: tuple[Any, ...] = ()
    elif layout.block_size is None:
        sshape = (t.shape[layout.axis],)
    else:
        ax = layout.axis % t.rank
        s = list(t.shape)
        s[ax] = ceil_div_dim(s[ax], layout.block_size)
        sshape = tuple(s)
    qshape = list(t.shape)
    if qd.packed:
        last = qshape[-1]
        if not isinstance(last, int) or last % 2:
            raise PassError(f"pass quantize: {qd.name} values are packed two per byte along the last dim, which "
                            f"must be static and even; %{x.name} is {t}")
        qshape[-1] = last // 2
    return (TensorType(torch.float32, sshape), TensorType(qd.container, sshape),
            TensorType(qd.storage_dtype, tuple(qshape)))


def insert_dynamic_qdq(graph: Graph, x: Value, scheme: QScheme, layout: Layout, *, before: Node, module: str,
                       name: str) -> Node:
    """Insert ``dynamic_qparams → quantize → dequantize`` of ``x`` before ``before``; returns the dequantize node."""
    qd = get_qdtype(scheme.qdtype)
    if layout.axis is None:
        gran, axis, block = "per_tensor", None, None
    elif layout.block_size is None:
        gran, axis, block = "per_channel", layout.axis, None
    elif layout.axis in (-1, x.tensor_type.rank - 1):
        gran, axis, block = "per_token", -1, layout.block_size
    else:
        gran, axis, block = "per_block", layout.axis, layout.block_size
    st, zt, qt = _dynamic_types(x, scheme.qdtype, layout)
    kwargs = {"qdtype": scheme.qdtype, "granularity": gran, "symmetric": scheme.symmetric, "axis": axis,
              "block_size": block}
    if scheme.clip_ratio != 1.0:  # only when set: unclipped graphs stay what they were
        kwargs["clip_ratio"] = scheme.clip_ratio
    qp = graph.make_node("dynamic_qparams", [x], kwargs, name=f"{name}_scale", types=[st, zt], module=module)
    zp = None if (scheme.symmetric or qd.is_float) else qp.outputs[1]
    q = graph.make_node("quantize", [x, qp.outputs[0], zp], {"qdtype": scheme.qdtype, "axis": axis,
                                                             "block_size": block},
                        name=f"{name}_q", type=qt, module=module)
    dq = graph.make_node("dequantize", [q.output, qp.outputs[0], zp],
                         {"qdtype": scheme.qdtype, "axis": axis, "block_size": block,
                          "out_dtype": x.tensor_type.dtype},
                         name=f"{name}_dq", type=x.type, module=module)
    for n in (qp, q, dq):
        n.meta["qscheme"] = scheme.short()
        graph.insert_before(before, n)
    return dq


# ---- KV cache -----------------------------------------------------------------------------------


def _tag(node: Node) -> str:
    """Short base for names of nodes made for an attention node (``sdpa_3_kvmask``)."""
    return node.name.replace("scaled_dot_product_attention", "sdpa")


def _view_chain(v: Value) -> tuple[Value, list[Node]]:
    """The value a KV operand is a view of, and the view nodes from it to the operand (source first)."""
    chain: list[Node] = []
    while v.producer is not None and _is_view(v.producer):
        chain.append(v.producer)
        v = v.producer.args[0]
    return v, list(reversed(chain))


def _clone_chain(graph: Graph, chain: list[Node], src: Value, new_src: Value, before: Node, tag: str) -> Value:
    """Re-run the view nodes of ``chain`` on ``new_src`` instead of ``src``; returns the last output."""
    cur_old, cur_new = src, new_src
    for n in chain:
        args = tuple(cur_new if a is cur_old else a for a in n.args)
        c = graph.make_node(n.op, args, dict(n.kwargs), name=f"{n.name}_{tag}", type=n.output.type,
                            module=n.module)
        graph.insert_before(before, c)
        cur_old, cur_new = n.output, c.output
    return cur_new


def kv_group_options(role: str) -> tuple[str, str]:
    """(the option that set ``role``'s group, what else would set it) when the group came from ``kv_group``."""
    return "kv_group", f" (or {role[0]}_group for the {role}s alone)"


def _kv_layout(scheme: QScheme, src: Value, role: str, node: Node,
               group_options: Callable[[str], tuple[str, str]] = kv_group_options) -> Layout:
    t = src.tensor_type
    if t.rank != 4:
        raise PassError(f"pass quantize: the {role}s read by attention %{node.name} (module {node.module!r}) come "
                        f"from %{src.name} of type {t}, not [batch, heads, seq, head_dim]")
    d = _static_dim(t, 3, f"{role} %{src.name} of attention %{node.name}")
    layout = layout_for(scheme, t.shape, role)  # type: ignore[arg-type]
    if layout.axis == -1 and layout.block_size is not None and d % layout.block_size:
        # named with both options that set it and a group that fits: a recipe's kv_group=32 on a model with 16-wide
        # heads read as if the user had asked for it, with nothing to change it to
        fit = math.gcd(layout.block_size, d)
        option, aside = group_options(role)
        raise PassError(f"pass quantize: option {option}={layout.block_size}{aside} does not divide head_dim {d} of "
                        f"the {role}s of attention %{node.name} (module {node.module!r}); give a divisor of {d}, e.g. "
                        f"{option}={fit}")
    return layout


def _mask_is_causal(graph: Graph, mask: Value) -> bool:
    """Whether ``mask`` never lets a query read a later token, probed by computing it on a neutral input.

    The mask is built in-graph from the inputs (HF builds causal and padding masks alike from index
    comparisons), so its nodes are run on all-ones inputs at the capture-time sequence length: a causal mask
    allows nothing above the diagonal, a padding-only (encoder) mask allows everything.
    """
    from torch.utils import _pytree as pytree

    from lowbit.ir.ops import resolve
    from lowbit.ir.symexpr import eval_dim

    needed: set[int] = {id(mask)}
    nodes = []
    for n in reversed(graph.nodes):
        if any(id(v) in needed for v in n.outputs):
            nodes.append(n)
            needed.update(id(v) for v in n.inputs())
    hints = {name: sym.hint or 8 for name, sym in graph.symbols.items()}
    env: dict[int, Any] = {}
    for v in graph.inputs:
        if id(v) in needed:
            t = v.tensor_type
            shape = [eval_dim(d, hints) for d in t.shape]
            if any(d is None for d in shape):
                raise PassError(f"pass quantize: input %{v.name} has shape {t} with a symbol the graph does not "
                                "declare; cannot probe attention mask %" + mask.name)
            env[id(v)] = torch.ones(shape, dtype=t.dtype)
    try:
        for n in reversed(nodes):
            args, kwargs = pytree.tree_map(
                lambda x: (x.data if x.is_param else env[id(x)]) if isinstance(x, Value) else x, (n.args, n.kwargs))
            out = resolve(n.op)(*args, **kwargs)
            for v, o in zip(n.outputs, list(out) if len(n.outputs) > 1 else [out]):
                env[id(v)] = o
    except Exception as exc:  # noqa: BLE001 - reported: the caller refuses the window
        raise PassError(f"pass quantize: cannot tell whether attention mask %{mask.name} is causal: computing it "
                        f"on a neutral input failed ({type(exc).__name__}: {exc})") from exc
    m = env[id(mask)]
    allowed = m if m.dtype == torch.bool else torch.isfinite(m) & (m > torch.finfo(m.dtype).min / 2)
    s_q, s_k = allowed.shape[-2], allowed.shape[-1]
    future = torch.ones(s_q, s_k, dtype=torch.bool).triu(1)
    return not bool((allowed & future).any())


def check_window_attention(graph: Graph, node: Node) -> None:
    """Refuse a float KV window (``kv_window``/``kv_sink``) on attention ``node`` unless it is causal
    self-attention: the window keeps tokens float by position relative to each query."""
    q, k = node.args[0], node.args[1]
    s_q = q.tensor_type.shape[2]
    s_len = _view_chain(k)[0].tensor_type.shape[2]
    if s_q != s_len:
        raise PassError(f"pass quantize: kv_window/kv_sink need self-attention over the whole sequence; attention "
                        f"%{node.name} has {s_q} queries and {s_len} keys")
    mask = node.arg(3, "mask")
    if not node.kwargs.get("is_causal", False) and (mask is None or not _mask_is_causal(graph, mask)):
        raise PassError(f"pass quantize: kv_window/kv_sink keep tokens float by position, which needs causal "
                        f"attention; attention %{node.name} (module {node.module!r}) lets queries read later "
                        "tokens (a bidirectional encoder has no KV cache to window)")


def kv_attention(graph: Graph, cfg: QuantConfig, in_scope: Callable[[str], bool]) -> list[Node]:
    """The attention nodes whose KV ``cfg.kv`` quantizes (its ``modules`` pattern, within the pass's scope, not
    kept float)."""
    assert cfg.kv is not None
    nodes = [n for n in graph.nodes if n.op == "attention" and module_matches(n.module, cfg.kv.modules)]
    if not nodes:
        if not any(n.op == "attention" for n in graph.nodes):
            # Gemma 2's soft-capped attention is matmul/tanh/softmax: the message named a pattern ('*', the
            # default) the user never wrote, as if a scope were wrong
            raise PassError(f"pass quantize: kv={cfg.kv.key.qdtype} quantizes the keys and values an attention op "
                            f"reads, and {no_attention_reason(graph)}: keep this model's KV cache float (drop kv=)")
        raise PassError(f"pass quantize: kv modules pattern {cfg.kv.modules!r} matches no attention node "
                        f"({sum(1 for n in graph.nodes if n.op == 'attention')} attention nodes in the graph)")
    # a module kept float keeps its KV cache float too (keep=[model.layers.0.*] quantized block 0's cache)
    return [n for n in nodes if in_scope(n.module) and not any(module_matches(n.module, k) for k in cfg.keep_float)]


def _window_mask(graph: Graph, node: Node, k_src: Value, window: int, sink: int, before: Node) -> Value:
    """``[..., S, 2S]`` mask: the first half lets query t read the quantized copy of token j when
    ``t - j >= window and j >= sink``, the second half the float copy of every other token."""
    mask = node.arg(3, "mask")
    check_window_attention(graph, node)
    s_len = k_src.tensor_type.shape[2]
    mod = node.module

    def add(op: str, args: list[Any], kwargs: dict[str, Any] | None, t: Any, name: str) -> Value:
        n = graph.make_node(op, args, kwargs or {}, name=f"{_tag(node)}_{name}", type=t, module=mod)
        graph.insert_before(before, n)
        return n.output

    from lowbit.ir.graph import SymType

    if isinstance(s_len, int):
        length: Any = s_len
    else:
        length = add("aten.sym_size.int", [k_src, 2], None, SymType(str(s_len)), "kvlen")
    i64, b = torch.int64, torch.bool
    pos = add("aten.arange.default", [length], {"device": torch.device("cpu"), "pin_memory": False},
              TensorType(i64, (s_len,)), "kvpos")
    qi = add("aten.unsqueeze.default", [pos, 1], None, TensorType(i64, (s_len, 1)), "kvqi")
    kj = add("aten.unsqueeze.default", [pos, 0], None, TensorType(i64, (1, s_len)), "kvkj")
    dist = add("aten.sub.Tensor", [qi, kj], None, TensorType(i64, (s_len, s_len)), "kvdist")
    old = add("aten.ge.Scalar", [dist, window], None, TensorType(b, (s_len, s_len)), "kvold")
    if sink:
        after_sink = add("aten.ge.Scalar", [kj, sink], None, TensorType(b, (1, s_len)), "kvaftersink")
        old = add("aten.logical_and.default", [old, after_sink], None, TensorType(b, (s_len, s_len)), "kvoldns")
    recent = add("aten.logical_not.default", [old], None, TensorType(b, (s_len, s_len)), "kvrecent")
    if mask is None:  # causal: old tokens are causal already (dist >= window >= 0); float ones need dist >= 0
        causal = add("aten.ge.Scalar", [dist, 0], None, TensorType(b, (s_len, s_len)), "kvcausal")
        m_old = old
        m_new = add("aten.logical_and.default", [causal, recent], None, TensorType(b, (s_len, s_len)), "kvnew")
        mt = TensorType(b, (s_len, s_len))
    else:
        mt0 = mask.tensor_type
        if mt0.rank < 2 or mt0.shape[-1] != s_len or mt0.shape[-2] != s_len:
            raise PassError(f"pass quantize: kv_window cannot combine with the mask %{mask.name} {mt0} of attention "
                            f"%{node.name}: expected [..., {s_len}, {s_len}]")
        mt = mt0
        if mt0.dtype == torch.bool:
            m_old = add("aten.logical_and.default", [mask, old], None, mt, "kvmold")
            m_new = add("aten.logical_and.default", [mask, recent], None, mt, "kvmnew")
        else:
            m_old = add("aten.where.ScalarOther", [old, mask, float("-inf")], None, mt, "kvmold")
            m_new = add("aten.where.ScalarOther", [recent, mask, float("-inf")], None, mt, "kvmnew")
    cat_shape = tuple(mt.shape[:-1]) + (mul_dim(s_len, 2),)
    return add("aten.cat.default", [[m_old, m_new], -1], None, TensorType(mt.dtype, cat_shape), "kvmask")


def insert_kv_qdq(graph: Graph, node: Node, kv: KVCacheScheme,
                  group_options: Callable[[str], tuple[str, str]] = kv_group_options) -> int:
    """Quantize the keys (after rotary) and values of one attention node; returns the number of QDQ chains.
    ``group_options(role)``: the options that set a role's group, named when it does not divide head_dim."""
    args = list(node.args)
    while len(args) < 4:
        args.append(node.kwargs.pop("mask", None) if len(args) == 3 else None)
    sources = []
    for idx, role, scheme in ((1, "key", kv.key), (2, "value", kv.value)):
        operand = args[idx]
        src, chain = _view_chain(operand)
        layout = _kv_layout(scheme, src, role, node, group_options)
        anchor = chain[0] if chain else node
        dq = insert_dynamic_qdq(graph, src, scheme, layout, before=anchor, module=node.module,
                                name=f"{_tag(node)}_{role[0]}")
        dq.meta["kv"] = role
        sources.append((idx, src, chain, dq, anchor))
    if kv.window == 0 and kv.sink == 0:
        for idx, src, chain, dq, anchor in sources:
            if chain:
                chain[0].args = tuple(dq.output if a is src else a for a in chain[0].args)
            else:
                args[idx] = dq.output
    else:
        for idx, src, chain, dq, anchor in sources:
            quant_view = _clone_chain(graph, chain, src, dq.output, node, "kvq")
            t = args[idx].tensor_type
            cat_t = TensorType(t.dtype, tuple(t.shape[:2]) + (mul_dim(t.shape[2], 2),) + tuple(t.shape[3:]))
            cat = graph.make_node("aten.cat.default", [[quant_view, args[idx]], 2], {},
                                  name=f"{_tag(node)}_{'kv'[idx - 1]}cat", type=cat_t, module=node.module)
            graph.insert_before(node, cat)
            args[idx] = cat.output
        args[3] = _window_mask(graph, node, sources[0][1], kv.window, kv.sink, node)
        node.kwargs["is_causal"] = False
    node.args = tuple(args)
    node.meta["qscheme_kv"] = f"k:{kv.key.short()} v:{kv.value.short()} window:{kv.window} sink:{kv.sink}"
    return 2


# ---- the pass -----------------------------------------------------------------------------------


@dataclass
class QuantizePlan:
    """The resolved annotation: what happens to each linear and attention node."""

    weights: list[WeightPlan] = field(default_factory=list)
    inputs: list[tuple[Node, QScheme]] = field(default_factory=list)
    attention: list[Node] = field(default_factory=list)
    kept_nonfinite: list[str] = field(default_factory=list)
    """Modules left float because their weight holds NaN/inf (``nonfinite="keep-float"``)."""


_MATMULS = ("aten.addmm.default", "aten.mm.default", "aten.matmul.default")


def unraised_projections(graph: Graph) -> list[str]:
    """Modules (or node names) of ATen matrix products with a stored 2-D weight: projections raising did not make
    ``linear`` nodes (an ``x @ W`` on a stored ``W [in, out]``; GPT-2's Conv1D ``addmm`` is raised), which the
    quantizers never see."""
    return [n.module or f"%{n.name}" for n in graph.nodes if n.op in _MATMULS and any(
        isinstance(a, Value) and a.is_param and a.tensor_type is not None and a.tensor_type.rank == 2
        for a in n.args)]


WeightCodes = Callable[[Node, QScheme, int | None], tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]
"""``(linear, its weight scheme, its group) -> (stored codes, scale, zero point or None)`` for ``quantize_graph``."""


def plan(graph: Graph, cfg: QuantConfig, group_fallback: int | None = None,
         extra_patterns: Sequence[tuple[str, str]] = (), scope: Callable[[str], bool] | None = None,
         nonfinite: NonFinitePolicy = "error", pass_name: str = "quantize",
         group_option: Callable[[str], str] = lambda module: "option group",
         read_weights: bool = True) -> QuantizePlan:
    """Resolve ``cfg`` against the graph; every error (bad pattern, group, weight) is raised before any change.

    ``extra_patterns`` are (where, glob) pairs the user wrote outside the config (the ``keep`` option): like
    the config's own rules, each must match a linear's module. ``scope`` (the ``modules`` option) limits the
    linears and attention nodes changed to those whose module it accepts. A weight with NaN/inf would give NaN
    scales and an all-NaN model; ``nonfinite`` says whether that refuses the pass or keeps the linear float.
    ``group_option(module)`` names where a linear's group size came from, for the error when it does not divide.
    ``read_weights=False``: the weights' values are not quantized here (stored codes replace them), so not checked.
    """
    linears = [n for n in graph.nodes if n.op == "linear"]
    in_scope = scope if scope is not None else (lambda module: True)
    modules = sorted({n.module for n in linears})
    # a kept module keeps its KV cache float too: a block kept float (keep=, an override file) still had its cache
    # quantized, so a keep glob may name an attention module (model.layers.0.self_attn) where kv= is set
    caches = sorted({n.module for n in graph.nodes if n.op == "attention"}) if cfg.kv is not None else []
    for where, pat in list(extra_patterns) + cfg.user_patterns():
        kept = [] if where.startswith("rules") else caches
        if not any(module_matches(m, pat) for m in modules + kept):
            sample = ", ".join(modules[:4]) + (", ..." if len(modules) > 4 else "")
            also = f", attention modules: {', '.join(kept[:2])}{', ...' if len(kept) > 2 else ''}" if kept else ""
            raise PassError(f"pass quantize: {where} {pat!r} matches no linear{' or attention' if kept else ''} "
                            f"module (linears: {sample}{also})")
    p = QuantizePlan()
    for n in linears:
        if not in_scope(n.module):
            continue
        ws, xs = cfg.resolve(n.module)
        if ws is not None:
            w = n.args[1]
            if isinstance(w, Value) and w.producer is not None and w.producer.op == "dequantize":
                raise PassError(f"pass {pass_name}: weight %{w.name} of linear %{n.name} (module {n.module!r}) is "
                                "already quantized (a dequantize from an earlier quantize, gptq, awq or autoround); "
                                "quantize each weight once (or leave this linear to the earlier pass with keep=...)")
            if not isinstance(w, Value) or not w.is_param:
                raise PassError(f"pass quantize: linear %{n.name} (module {n.module!r}) has a computed weight; only "
                                "stored weights can be quantized (keep it float with keep=...)")
            if w.tensor_type.rank != 2:
                raise PassError(f"pass quantize: weight @{w.name} of linear %{n.name} is {w.type}, not [out, in]")
            problem = nonfinite_problem(w.data) if w.data is not None and read_weights else None
            if problem is not None:
                if nonfinite == "keep-float":
                    p.kept_nonfinite.append(n.module or n.name)
                    continue
                raise PassError(f"pass {pass_name}: weight @{w.name} of linear %{n.name} (module {n.module!r}) has "
                                f"{problem}; quantizing it would make the model NaN. Fix the checkpoint, or keep "
                                "that linear float with nonfinite=keep-float (or keep=MODULE)")
            k = w.tensor_type.shape[-1]
            if get_qdtype(ws.qdtype).packed and isinstance(k, int) and k % 2:  # before any calibration runs
                raise PassError(f"pass {pass_name}: {ws.qdtype} weights are packed two per byte along the input "
                                f"dim, but linear %{n.name} (module {n.module!r}) has odd input size {k}; keep it "
                                "float with keep=..., or use 8-bit weights")
            p.weights.append(WeightPlan(n, ws, _check_group(n, w, ws, group_fallback, group_option(n.module))))
        if xs is not None:
            x = n.args[0]
            if isinstance(x, Value) and x.producer is not None and x.producer.op == "dequantize":
                # a second quantize(a=...) stacked another QDQ chain on the first, silently
                raise PassError(f"pass {pass_name}: input %{x.name} of linear %{n.name} (module {n.module!r}) is "
                                "already quantized (a dequantize from an earlier quantize(a=...)); quantize each "
                                "activation once (or leave this linear to the earlier pass with keep=...)")
            k_in = _static_dim(x.tensor_type, -1, f"input %{x.name} of linear %{n.name}")
            if get_qdtype(xs.qdtype).packed and k_in % 2:  # static scales would fail only after calibrating
                raise PassError(f"pass {pass_name}: {xs.qdtype} activations are packed two per byte along the last "
                                f"dim, but input %{x.name} of linear %{n.name} (module {n.module!r}) has odd size "
                                f"{k_in}; keep that linear float with keep=..., or use 8-bit activations")
            if xs.granularity == "per_token" and xs.group_size and x.tensor_type.shape[-1] % xs.group_size \
                    and not _follows_weight_tiles(xs, ws):
                raise PassError(f"pass quantize: option a_group={xs.group_size} does not divide the input size "
                                f"{x.tensor_type.shape[-1]} of linear %{n.name} (module {n.module!r})")
            if not xs.dynamic and xs.granularity == "per_token":
                raise PassError("pass quantize: static activation scales cannot be per token (tokens vary at run "
                                "time): use a_gran=per_tensor or per_channel with a_static=true")
            p.inputs.append((n, xs))
    if cfg.weight is not None and not p.weights:
        unraised = [m for m in unraised_projections(graph) if in_scope(m)]
        if unraised:
            sample = ", ".join(unraised[:3]) + (", ..." if len(unraised) > 3 else "")
            raise PassError(f"pass {pass_name}: no linear to quantize: the model's projections are ATen matrix "
                            f"products on stored weights that lowbit does not raise to linear ({len(unraised)}: "
                            f"{sample}), so they would all stay float")
    if cfg.kv is not None:
        p.attention = kv_attention(graph, cfg, in_scope)
    return p


def quantize_graph(graph: Graph, cfg: QuantConfig, *, group_fallback: int | None = None,
                   calibration: dict[str, Any] | None = None,
                   extra_patterns: Sequence[tuple[str, str]] = (),
                   scope: Callable[[str], bool] | None = None,
                   nonfinite: NonFinitePolicy = "error",
                   group_option: Callable[[str], str] = lambda module: "option group",
                   kv_group_option: Callable[[str], tuple[str, str]] = kv_group_options,
                   weight_codes: WeightCodes | None = None) -> dict[str, Any]:
    """Apply ``cfg`` to ``graph`` in place (only to modules ``scope`` accepts); returns the pass's statistics.
    ``group_option`` / ``kv_group_option``: the option a weight's / a KV role's group came from, for errors.
    ``weight_codes(linear, scheme, group)``: each quantized weight's (stored codes, scale, zero point) in place of
    RTN, which then never reads the weights (``lowbit.load`` gives a checkpoint's codes: RTN of its placeholder
    weights was ~60% of a SmolLM2 load, all of it thrown away)."""
    p = plan(graph, cfg, group_fallback, extra_patterns, scope, nonfinite, group_option=group_option,
             read_weights=weight_codes is None)
    bytes_before = graph.param_bytes()
    users = graph.users()
    w_float = w_quant = 0
    for wp in p.weights:
        if weight_codes is None:
            b, a = _insert_weight_qdq(graph, wp.node, wp.scheme, wp.group, users)
        else:
            b, a = write_weight_qdq(graph, wp.node, wp.scheme, wp.group, *weight_codes(wp.node, wp.scheme, wp.group),
                                    users)
        w_float, w_quant = w_float + b, w_quant + a
    dynamic = [(n, s) for n, s in p.inputs if s.dynamic]
    chains: dict[tuple[int, QScheme], Node] = {}
    groups: dict[tuple[int, QScheme], list[Node]] = {}
    for n, s in dynamic:
        groups.setdefault((id(n.args[0]), s), []).append(n)
    for key, readers in groups.items():
        x = readers[0].args[0]
        layout = layout_for(key[1], x.tensor_type.shape, "activation")
        first = min(readers, key=graph.index)
        dq = insert_dynamic_qdq(graph, x, key[1], layout, before=first, module=_common_module(readers),
                                name=x.name)
        chains[key] = dq
        for r in readers:
            r.args = (dq.output,) + tuple(r.args[1:])
    kv_chains = 0
    for att in p.attention:
        kv_chains += insert_kv_qdq(graph, att, cfg.kv, kv_group_option)  # type: ignore[arg-type]
    static = [(n, s) for n, s in p.inputs if not s.dynamic]
    calib_stats: dict[str, Any] = {}
    if static:
        from lowbit.calibration.static import calibrate_static_inputs

        calib_stats = calibrate_static_inputs(graph, static, **(calibration or {}))
    eliminate_dead_code(graph)
    stats: dict[str, Any] = {
        "weights_quantized": len(p.weights),
        "inputs_quantized": len(p.inputs),
        "activation_qdq_chains": len(chains) + calib_stats.get("static_inputs", 0),  # q/k/v share one chain
        "kv_qdq_chains": kv_chains,
        "param_bytes_before": bytes_before,
        "param_bytes_after": graph.param_bytes(),
        "quantized_weight_bytes_before": w_float,
        "quantized_weight_bytes_after": w_quant,
    }
    if calib_stats:
        stats["calibration"] = calib_stats
    if p.kept_nonfinite:
        stats["kept_float_nonfinite"] = p.kept_nonfinite
    return stats


_NOTHING = ("pass quantize: nothing to quantize: set w=, a=, kv= or head= (e.g. quantize(w=int4,group=64)) or "
            "config=path.json")


@register_pass
class InsertQDQ(Pass):
    """Insert quantize/dequantize nodes: packed RTN weights, dynamic/static input activations, the KV cache."""

    name = "quantize"
    Options = InsertQDQOptions
    requires = (NO_QLINEAR,)
    after = WEIGHT_REWRITES
    creates = ("dequantize", "quantize", "dynamic_qparams", "aten.cat.default", "aten.arange.default",
               "aten.unsqueeze.default", "aten.sub.Tensor", "aten.ge.Scalar", "aten.logical_and.default",
               "aten.logical_not.default", "aten.where.ScalarOther", "aten.sym_size.int")
    """QDQ ops, and the KV window mask's ATen ops (kv_window/kv_sink)."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        # refused when the pipeline is parsed, not after capture (the Options' own defaults quantize nothing, so
        # this cannot be a validator: spec() builds them)
        if self.options.config is None and config_from_options(self.options).is_empty():
            raise PassError(_NOTHING)

    def quant_config(self) -> QuantConfig:
        return config_from_options(self.options)

    def precheck(self, graph: Graph) -> None:
        """The KV cache's attention nodes, their head_dim against the KV groups, and a float window only on causal
        self-attention: what the model's architecture decides, refused before earlier passes calibrate
        (``w8a8kv4`` on an encoder, ``kv4``'s groups of 32 on 16-wide heads)."""
        cfg = config_from_options(self.options)
        if cfg.kv is None:
            return
        for node in kv_attention(graph, cfg, self.options.in_scope):
            for idx, role, scheme in ((1, "key", cfg.kv.key), (2, "value", cfg.kv.value)):
                _kv_layout(scheme, _view_chain(node.args[idx])[0], role, node, self._kv_group_option)
            if cfg.kv.window or cfg.kv.sink:
                check_window_attention(graph, node)

    def _kv_group_option(self, role: str) -> tuple[str, str]:
        """The option a KV role's group came from: the user's k_group/v_group, where given, else kv_group."""
        own = f"{role[0]}_group"
        return (own, "") if getattr(self.options, own) is not None else kv_group_options(role)

    def run(self, graph: Graph) -> PassResult:
        o = self.options
        cfg = config_from_options(o)
        if cfg.is_empty():
            raise PassError(_NOTHING)
        calibration = {"text": o.calib, "n": o.calib_n, "seq_len": o.calib_len_for(graph), "tokenizer": o.tokenizer,
                       "progress": o.progress, "batch_size": o.batch_size_for(graph),
                       "device": o.torch_device(self.name)}
        # static scales read the calibration data through token_ids (a .safetensors of ids, the vocabulary check,
        # errors named as the pass's), a config file's as well as a_static's
        static = any(isinstance(s, QScheme) and not s.dynamic for s in [cfg.input, *(r.input for r in cfg.rules)])
        if static or isinstance(o.calib, torch.Tensor):
            calibration["ids"] = o.token_ids(graph, self.name)
        extra = [(f"option keep[{i}]", pat) for i, pat in enumerate(o.keep)]
        if not _unset(o.head):  # else plan() names the rule head= adds ("rules[0].pattern 'lm_head'"), never written
            linears = sorted({n.module for n in graph.nodes if n.op == "linear"})
            if not any(module_matches(m, HEAD_MODULE) for m in linears):
                sample = ", ".join(linears[:4]) + (", ..." if len(linears) > 4 else "")
                raise PassError(f"pass quantize: option head={o.head}: the graph has no output head linear "
                                f"{HEAD_MODULE!r} (linears: {sample}); drop head=, or quantize that linear with "
                                "w= or a config rule")
        def group_option(module: str) -> str:  # the head's group is head_group's (else group's), the rest the config's
            if not _unset(o.head) and module_matches(module, HEAD_MODULE):
                return "option head_group" if o.head_group is not None else "option group"
            return "config group_size" if o.config is not None else "option group"

        stats = quantize_graph(graph, cfg, group_fallback=o.group_fallback, calibration=calibration,
                               extra_patterns=extra, scope=o.in_scope, nonfinite=o.nonfinite, group_option=group_option,
                               kv_group_option=self._kv_group_option)
        changed = bool(stats["weights_quantized"] or stats["inputs_quantized"] or stats["kv_qdq_chains"])
        return PassResult(changed, stats)

