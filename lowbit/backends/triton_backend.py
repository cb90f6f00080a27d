"""``backend="triton"``: the reference lowering with every ``qlinear`` a kernel can take retargeted to lowbit's
Triton custom ops, packed weights kept packed on the GPU, the module run under ``torch.compile``.

Lowering: fuse the graph's quantized linears (``lowbit.ir.fusion.fuse_qlinear``, the IR's own rewrite), build
the reference FX module (``torch_backend``: params become buffers, parameter-only nodes are folded once), then
retarget each ``qlinear`` call by ``KERNEL_FORMS`` (a table: which weight/activation formats each op takes);
weight-only nodes get their buffers rewritten once into the decode layout (int32 words, transposed scales:
``lowbit.kernels.weight_only.pack_words``; same bytes) where K and the group allow it. A
node no kernel takes keeps the reference op and ``report`` names it with the reason (shape, dtype, scheme);
at run time an input the kernel cannot read (a float32 or CPU tensor) also takes the reference — never a wrong
result. ``torch.compile`` sees through the ops (``torch.library.triton_op``); ``cuda_graphs`` selects
``mode="reduce-overhead"`` (one CUDA graph per static shape). A generation step's rotary and float KV-cache writes
fuse per layer (``rotary_write_kv``; ``write_kv`` for a layer without rotary), its attention at one query row runs
``decode_sdpa``, the packed cache's ``cache_attention`` its decode kernel, whose decode-step write (with the layer's
rotary) is one ``write_packed_kv`` launch. A mixture-of-experts layer runs routed (``routed_experts``, as on the
torch backend): its linears merge per expert, not across experts, and each expert's module is retargeted as the rest.

Registered in ``lowbit.backends.registry`` (``TritonBackendOptions``: ``compile``, ``cuda_graphs``); the registry
checks for CUDA (or the interpreter) before the model is loaded.
"""

from __future__ import annotations

import contextlib
import operator
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx

from lowbit.backends.registry import BackendError
from lowbit.backends.routed_experts import RoutedExperts, expert_partition, separate_experts
from lowbit.backends.semi_structured import report_lines
from lowbit.backends.torch_backend import TorchCompiled, buffer_bytes
from lowbit.ir.graph import Graph, TensorType, params_device
from lowbit.ir import ops as ir_ops
from lowbit.ir.ops import hadamard as ir_hadamard
from lowbit.ir.quant import qlinear

__all__ = ["EPILOGUES", "EPILOGUE_RULES", "FLOAT32_HINT", "KERNEL_FORMS", "NO_CUDA", "TritonCompiled",
           "TritonUnavailable", "cache_write_pattern", "lower", "plan_attention", "plan_cache_attention",
           "plan_cache_write", "plan_hadamard", "plan_qlinear", "plan_rms_norm_quant", "plan_rotary_cache",
           "rotary_cache_pattern"]


class TritonUnavailable(BackendError, RuntimeError):
    """No CUDA to run the kernels on (a ``BackendError``, so the CLI says it as a usage error; a ``RuntimeError`` as
    it always was)."""


NO_CUDA = ("backend 'triton' runs lowbit's Triton kernels and needs a CUDA GPU, and none is visible: use "
           "backend='torch' (the CPU/CUDA reference) or backend='onnxruntime' (MatMulNBits / integer GEMM on CPU)")

FLOAT32_HINT = ("float32 activations run the reference: the kernels take bf16/fp16, so load the model in bfloat16 "
                "(load_model(name, torch.bfloat16), model.to(torch.bfloat16), CLI --dtype bfloat16)")
"""The report's last word where a node fell back for float32: ``lowbit compile`` loads float32 by default, and the
reasons alone ("out_dtype torch.float32") did not say what to change."""

_PACKED = {"int4", "uint4", "int3", "int2"}
_KERNEL_DTYPES = (torch.bfloat16, torch.float16)
_HAD_DTYPES = (torch.bfloat16, torch.float16, torch.float32)  # lowbit.kernels.hadamard.HAD_DTYPES


@dataclass(frozen=True)
class KernelForm:
    """One row: a weight/activation format and the custom op that runs it."""

    name: str
    op: str
    w_qdtypes: frozenset[str]
    a_qdtype: str | None
    min_group: int
    zero_point: bool  # weight zero points allowed


KERNEL_FORMS = (
    # one row per packed width, so the report names the bits the weights hold (an int2 linear is not "w4a16")
    KernelForm("w4a16", "weight_only_linear", frozenset({"int4", "uint4"}), None, 16, True),
    KernelForm("w3a16", "weight_only_linear", frozenset({"int3"}), None, 16, True),
    KernelForm("w2a16", "weight_only_linear", frozenset({"int2"}), None, 16, True),
    KernelForm("w8a16", "weight_only_linear", frozenset({"int8", "uint8"}), None, 16, True),
    KernelForm("w8a8", "a8_linear", frozenset({"int8"}), "int8", 32, False),
    KernelForm("w4a8", "a8_linear", frozenset({"int4", "uint4"}), "int8", 32, True),
    KernelForm("fp8", "a8_linear", frozenset({"fp8e4m3"}), "fp8e4m3", 32, False),
)


@dataclass
class Plan:
    form: KernelForm | None
    reason: str = ""
    static: dict[str, Any] = field(default_factory=dict)


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def plan_qlinear(kwargs: dict[str, Any], qweight: torch.Tensor | None, has_w_zp: bool, has_a_scale: bool) -> Plan:
    """Which ``KERNEL_FORMS`` row runs a qlinear with these kwargs and weight, or why none does."""
    if qweight is None:
        return Plan(None, "weight is not a parameter")
    w_qdtype, a_qdtype = kwargs["w_qdtype"], kwargs.get("a_qdtype")
    out_dtype = kwargs.get("out_dtype", torch.float32)
    if out_dtype not in _KERNEL_DTYPES:
        return Plan(None, f"out_dtype {out_dtype}: the kernels take bf16/fp16 activations")
    k = qweight.shape[1] * (2 if w_qdtype in _PACKED else 1)
    axis, block = kwargs.get("w_axis", 0), kwargs.get("w_block_size")
    if isinstance(block, (list, tuple)):
        return _plan_weight_tiles(kwargs, list(axis or []), list(block), has_a_scale)
    if axis in (0, -2) and block is None:
        group = 0
    elif axis in (1, -1) and block is not None:
        group = int(block)
    else:
        return Plan(None, f"weight scale layout axis={axis}, block_size={block}")
    if a_qdtype is not None:
        if has_a_scale:
            return Plan(None, "static activation scales")
        if kwargs.get("a_granularity", "per_token") != "per_token" or not kwargs.get("a_symmetric", True):
            return Plan(None, f"activation {kwargs.get('a_granularity')} symmetric={kwargs.get('a_symmetric')}")
    a_block = kwargs.get("a_block_size")
    a_group = 0 if a_block is None or a_block == k else int(a_block)
    for form in KERNEL_FORMS:
        if w_qdtype not in form.w_qdtypes or a_qdtype != form.a_qdtype:
            continue
        for g, what in ((group, "weight"), (a_group, "activation")):
            if g and not (_pow2(g) and g >= form.min_group and k % g == 0):
                return Plan(None, f"{what} group {g} with K={k} (needs a power of two >= {form.min_group} dividing K)")
        if has_w_zp and not form.zero_point:
            return Plan(None, f"{w_qdtype} weight zero point")
        if w_qdtype in _PACKED and k % 2:
            return Plan(None, f"odd K={k}")
        return Plan(form, static={"w_group": group, "a_group": a_group})
    return Plan(None, f"no kernel for weights {w_qdtype} with activations {a_qdtype or 'float'}")


def _plan_weight_tiles(kwargs: dict[str, Any], axis: list[int], block: list[int], has_a_scale: bool) -> Plan:
    """fp8 weights in ``[bn, bk]`` tiles (``fp8-block128``) with dynamic activations in groups of ``bk``: the A8
    GEMM's tile path (one weight scale per program and K step), K and N edges partial."""
    fp8 = KERNEL_FORMS[-1]
    a_block = kwargs.get("a_block_size")
    if axis not in ([0, 1], [-2, -1]) or len(block) != 2:
        return Plan(None, f"weight scale tiles axis={axis}, block_size={block}")
    bn, bk = block
    if kwargs["w_qdtype"] != "fp8e4m3" or kwargs.get("a_qdtype") != "fp8e4m3":
        return Plan(None, f"weight tiles {block} with {kwargs['w_qdtype']} weights and activations "
                          f"{kwargs.get('a_qdtype') or 'float'} (the tile kernel is fp8e4m3 x fp8e4m3)")
    if has_a_scale or kwargs.get("a_granularity", "per_token") != "per_token" or not kwargs.get("a_symmetric", True):
        return Plan(None, "weight tiles need dynamic symmetric per-token activation groups")
    if a_block != bk or not (_pow2(bk) and bk >= fp8.min_group and _pow2(bn) and bn >= fp8.min_group):
        return Plan(None, f"weight tiles {block} with activation groups of {a_block} (needs groups of the tile's "
                          f"K, powers of two >= {fp8.min_group})")
    return Plan(fp8, static={"w_group": bk, "a_group": bk, "w_block_n": bn})


def _runs_kernel(x: torch.Tensor) -> bool:
    return x.dtype in _KERNEL_DTYPES and _on_kernel_device(x)


def _on_kernel_device(x: torch.Tensor) -> bool:
    """A CUDA tensor, or any tensor under Triton's interpreter (how the kernels run on CPU in the tests)."""
    return x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def _one_row(x: torch.Tensor) -> bool:
    """Whether a linear's input is one row (M = 1): only there do the PDL ops launch with PDL (``_gemv_r``). Any
    other M takes the ``triton_op``, which ``torch.compile`` traces into: a prefill's norm, residual add and gated
    activation around the dequantize + cuBLAS product then fuse into Inductor kernels, where the opaque PDL op ran
    them as eager torch ops: a 1x2048 W4A16 + int4-head prefill of the 7B-shaped 4-layer stack went 8.85 -> 7.38 ms
    on the H200 (``tools/profile_decode.py --prefill 2048``).
    Under ``torch.compile`` the test is a guard: M = 1 and M > 1 are two specializations."""
    return x.numel() == x.shape[-1]


def _step_op(name: str, pdl: bool, x: torch.Tensor) -> Any:
    """``torch.ops.lowbit.<name>``, or its opaque ``<name>_pdl`` form (the same body inside ``pdl_launches``) where
    the backend's ``pdl`` is on and ``x`` is one row (``_one_row``)."""
    return getattr(torch.ops.lowbit, f"{name}_pdl" if pdl and _one_row(x) else name)


def _kernel_qlinear(op: str, w_group: int, a_group: int, epilogue: str = "",
                    pdl: bool = False, w_block_n: int = 0) -> Callable[..., torch.Tensor]:
    """The FX target replacing one qlinear: its kernel, or the reference for an input the kernel cannot read.
    ``epilogue``: the activation (or gated MLP) after it that ``_fuse_epilogue`` folded into the op (the
    reference: then the epilogue's ops, ``epilogue_ref``); ``norm_sumsq``/``norm_eps`` (weight-only): its input
    is the gained half of an RMSNorm that ``_fuse_norm_residual`` split (the reference: ``norm_from_parts_ref``
    first)."""
    from lowbit.kernels._common import epilogue_ref, norm_from_parts_ref

    def run(x, qweight, w_scale, w_zero_point=None, bias=None, a_scale=None, a_zero_point=None, *,
            norm_sumsq=None, norm_eps=0.0, residual=None, **kw):
        if not _runs_kernel(x):
            if norm_sumsq is not None:
                x = norm_from_parts_ref(x, norm_sumsq, norm_eps)
            y = qlinear(x, _stored(qweight, x, kw["w_qdtype"], w_group), w_scale, w_zero_point, bias, a_scale,
                        a_zero_point, **kw)
            y = epilogue_ref(y, epilogue)
            return y if residual is None else ir_ops.residual_add(residual, y)
        if op == "weight_only_linear" and pdl and _one_row(x):
            return torch.ops.lowbit.weight_only_linear_pdl(x, qweight, w_scale, w_zero_point, bias, kw["w_qdtype"],
                                                           w_group, epilogue, norm_sumsq, norm_eps)
        if op == "weight_only_linear":
            return torch.ops.lowbit.weight_only_linear(x, qweight, w_scale, w_zero_point, bias, kw["w_qdtype"],
                                                       w_group, "auto", epilogue, norm_sumsq, norm_eps)
        return _step_op("a8_linear", pdl, x)(x, qweight, w_scale, w_zero_point, bias, kw["w_qdtype"], w_group,
                                             kw["a_qdtype"], a_group, epilogue=epilogue, w_block_n=w_block_n,
                                             residual=residual)

    run.__name__ = f"triton_{op}" + (f"_{epilogue.replace('*', '_')}" if epilogue else "")
    run.kernel_form = (op, epilogue, w_group)  # type: ignore[attr-defined]  # what grouped_experts reads
    run.adds_residual = op == "a8_linear" and not epilogue  # type: ignore[attr-defined]
    # (w_group, a_group, w_block_n) of an A8 linear that may write the next norm's halves (_fuse_norm_quant_a8)
    run.a8_add_norm_form = (w_group, a_group, w_block_n) if run.adds_residual else None  # type: ignore[attr-defined]
    return run


def _stored(qweight: torch.Tensor, x: torch.Tensor, qdtype: str, group: int) -> torch.Tensor:
    """A weight as the reference reads it: the stored form of one repacked into int32 words at lowering."""
    if qweight.dtype != torch.int32:
        return qweight
    from lowbit.kernels.weight_only import unpack_words

    return unpack_words(qweight, qdtype, x.shape[-1], group)


def _add_norm_outputs(gm: torch.fx.GraphModule, node: torch.fx.Node) -> tuple[torch.fx.Node, ...]:
    """``(stream, gain * stream, sums of squares)``: getitem nodes of an add+norm linear, right after it in order."""
    items = []
    for i in (2, 1, 0):
        with gm.graph.inserting_after(node):
            items.append(gm.graph.call_function(operator.getitem, (node, i)))
    return tuple(reversed(items))


def _add_norm_target(w_group: int, name: str, kernel_op: Callable[..., tuple]) -> Callable[..., tuple]:
    """An FX target for a qlinear whose stream (its output plus ``residual``) an RMSNorm reads: ``(stream, gain *
    stream, sums of stream**2)`` from ``kernel_op(x, qweight, w_scale, w_zero_point, bias, residual, norm_weight,
    kw)`` where the kernels run, else the reference (the qlinear, the add, then ``norm_parts_ref``)."""
    from lowbit.kernels._common import norm_parts_ref

    def run(x, qweight, w_scale, w_zero_point=None, bias=None, a_scale=None, a_zero_point=None, *, residual,
            norm_weight, **kw):
        if not _runs_kernel(x):
            y = qlinear(x, _stored(qweight, x, kw["w_qdtype"], w_group), w_scale, w_zero_point, bias, a_scale,
                        a_zero_point, **kw)
            stream = ir_ops.residual_add(residual, y)
            return (stream, *norm_parts_ref(stream, norm_weight))
        return kernel_op(x, qweight, w_scale, w_zero_point, bias, residual, norm_weight, kw)

    run.__name__ = name
    return run


def _kernel_qlinear_add_norm(w_group: int,
                             pdl: bool = False) -> Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The FX target replacing a weight-only qlinear whose output a ``residual_add`` adds to the stream that an
    RMSNorm then reads (``_fuse_norm_residual``): ``weight_only_linear_add_norm`` (``_add_norm_target``)."""

    def on_kernel(x, qweight, w_scale, w_zero_point, bias, residual, norm_weight, kw):
        return _step_op("weight_only_linear_add_norm", pdl, x)(x, qweight, w_scale, w_zero_point, bias,
                                                               kw["w_qdtype"], w_group, residual, norm_weight)

    return _add_norm_target(w_group, "triton_weight_only_linear_add_norm", on_kernel)


def _kernel_float_linear(epilogue: str = "", pdl: bool = False) -> Callable[..., torch.Tensor]:
    """The FX target replacing a float ``linear`` of a generation step (``float_gemv``): the GEMV at one row
    (``lowbit::float_linear``, PDL form with ``pdl``), ``F.linear`` elsewhere; ``epilogue`` and ``norm_sumsq`` as
    in ``_kernel_qlinear``."""
    from lowbit.kernels.float_gemv import float_linear_ref

    def run(x, weight, bias=None, *, norm_sumsq=None, norm_eps=0.0):
        if not _runs_kernel(x):
            return float_linear_ref(x, weight, bias, epilogue, norm_sumsq, norm_eps)
        return _step_op("float_linear", pdl, x)(x, weight, bias, epilogue, norm_sumsq, norm_eps)

    run.__name__ = "triton_float_linear" + (f"_{epilogue.replace('*', '_')}" if epilogue else "")
    run.kernel_form = ("float_linear", epilogue, 0)  # type: ignore[attr-defined]
    return run


def _kernel_float_linear_add_norm(pdl: bool = False) -> Callable[..., tuple[torch.Tensor, torch.Tensor,
                                                                            torch.Tensor]]:
    """``_kernel_qlinear_add_norm`` for a float linear (``lowbit::float_linear_add_norm``)."""
    from lowbit.kernels._common import norm_parts_ref

    def run(x, weight, bias=None, *, residual, norm_weight):
        if not _runs_kernel(x):
            stream = ir_ops.residual_add(residual, ir_ops.linear(x, weight, bias))
            return (stream, *norm_parts_ref(stream, norm_weight))
        return _step_op("float_linear_add_norm", pdl, x)(x, weight, bias, residual, norm_weight)

    run.__name__ = "triton_float_linear_add_norm"
    return run


def _float_gemv_weight(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    """A float ``linear`` whose weight ``_gemv_f`` reads: a 2-D bf16/fp16 buffer (not a 2:4 sparse one)."""
    from lowbit.kernels.float_gemv import float_linear_unsupported

    w = _operand(gm, node, 1, "weight")
    return (isinstance(w, torch.Tensor) and not isinstance(w, torch.sparse.SparseSemiStructuredTensor)
            and float_linear_unsupported(w.dtype, w) is None)


def _activation(node: torch.fx.Node) -> str | None:
    """The epilogue name of an IR activation node (``lowbit.kernels._common.ACTIVATIONS``), else None."""
    if node.op != "call_function":
        return None
    if node.target is ir_ops.silu:
        return "silu"
    if node.target is ir_ops.gelu:
        return {"none": "gelu", "tanh": "gelu_tanh"}.get(node.kwargs.get("approximate", "none"))
    return None


def _gated_chain(q: torch.fx.Node) -> tuple[str, torch.fx.Node, tuple[torch.fx.Node, ...]] | None:
    """``q``'s readers when they are exactly a gated MLP's ``split([I, I], -1) -> act(first) -> mul(·, second)``
    (the merged gate/up of ``merge_horizontal``; act silu or GELU): ``("<act>*up", mul, the nodes it replaces)``."""

    if len(q.users) != 1:
        return None
    split = next(iter(q.users))
    if split.target is not torch.ops.aten.split_with_sizes.default or len(split.users) != 2:
        return None
    sizes = split.args[1]
    dim = split.args[2] if len(split.args) > 2 else split.kwargs.get("dim", 0)
    if len(sizes) != 2 or sizes[0] != sizes[1] or dim != -1:
        return None
    parts = {u.args[1]: u for u in split.users if u.target is operator.getitem}
    if set(parts) != {0, 1} or len(parts[0].users) != 1 or len(parts[1].users) != 1:
        return None
    act = next(iter(parts[0].users))
    mul = next(iter(parts[1].users))
    name = _activation(act)
    if name is None or mul.target is not ir_ops.mul or set(mul.args) != {act, parts[1]} or len(act.users) != 1:
        return None
    return f"{name}*up", mul, (mul, act, parts[1], parts[0], split)


def _activation_chain(q: torch.fx.Node) -> tuple[str, torch.fx.Node, tuple[torch.fx.Node, ...]] | None:
    """``q`` read by one activation alone (BERT/ViT's ``linear -> GELU``): ``(act, it, (it,))``."""
    if len(q.users) != 1:
        return None
    act = next(iter(q.users))
    name = _activation(act)
    return None if name is None else (name, act, (act,))


EPILOGUE_RULES: tuple[tuple[str, str, Callable[[torch.fx.Node], Any]], ...] = (
    ("gated", "gated MLP: split -> act(gate) -> mul(up); weight rows interleaved", _gated_chain),
    ("activation", "activation: silu / gelu / gelu(tanh)", _activation_chain),
)
"""The epilogues ``_fuse_epilogue`` folds into a kernel's store, first match wins: each row (kind, what, matcher)
finds the nodes after a quantized linear that its kernels can compute in their epilogue
(``lowbit.kernels._common.parse_epilogue``).

``EPILOGUES`` says which kinds a lowering applies (``TritonBackendOptions.epilogues``). Measured on the H200 (run
E10b of ``bench/results/kernels.json``, ``tools/bench_epilogue.py``, the op + its activation as CUDA-graph
replays): gated 1.15-1.32x faster than the op and then torch's silu*up (W4A16 M = 1 and 16, W8A8 M = 16 and 2048
at the 7B gate/up); a lone GELU 1.05x at MiniLM's up-projection (W8A8, M = 2048) but 0.92x at BERT-base's (the
erf in a short-K GEMM's store costs more than the separate kernel's pass) and 1.00x W4A16 M = 16 (the reduce
launch replaces the activation's). So ``gated`` is the default and ``all`` adds the lone activation."""

EPILOGUES = {"none": (), "gated": ("gated",), "all": ("gated", "activation")}
"""``TritonBackendOptions.epilogues`` -> the ``EPILOGUE_RULES`` kinds it applies."""


_OPERAND_NAMES = ("qweight", "w_scale", "w_zero_point", "bias")


def _own_buffers(node: torch.fx.Node, slots: tuple[int, ...]) -> list[torch.fx.Node | None] | None:
    """The node's weight operands at argument positions ``slots`` (named as ``qlinear``'s: qweight, w_scale,
    w_zero_point, bias), when each is absent or a buffer no other node reads, so rewriting it in place is safe;
    else None."""
    operands = [node.args[i] if len(node.args) > i else node.kwargs.get(name)
                for i, name in zip(slots, _OPERAND_NAMES, strict=False)]
    if all(a is None or (isinstance(a, torch.fx.Node) and a.op == "get_attr" and len(a.users) == 1)
           for a in operands):
        return operands
    return None


def _fuse_epilogue(gm: torch.fx.GraphModule, node: torch.fx.Node, slots: tuple[int, ...],
                   retarget_to: Callable[[str], Callable[..., torch.Tensor]], kinds: tuple[str, ...],
                   interleave: bool = True) -> str:
    """Fold the activation (or gated MLP) reading a retargeted qlinear into its op (``EPILOGUE_RULES``): the
    node's target becomes ``retarget_to(epilogue)``, its readers' nodes are erased and their readers read it.
    A gated epilogue interleaves the weight, scale, zero point and bias rows into (gate, up) pairs (buffers
    replaced, same bytes) unless ``interleave`` is False (``float_linear`` reads the halves as merged);
    ``slots``: those operands' argument positions; ``kinds``: the rules applied (``EPILOGUES``). Returns the
    epilogue, "" if none."""
    from lowbit.kernels.weight_only import interleave_rows

    for kind, _, match in EPILOGUE_RULES:
        found = match(node) if kind in kinds else None
        if found is None:
            continue
        epilogue, last, replaced = found
        if epilogue.endswith("*up") and interleave:
            operands = _own_buffers(node, slots)
            if operands is None:
                return ""
            for a in operands:
                if a is not None:
                    gm.register_buffer(a.target, interleave_rows(getattr(gm, a.target)))
        node.target = retarget_to(epilogue)
        last.replace_all_uses_with(node)
        for dead in replaced:
            gm.graph.erase_node(dead)
        return epilogue
    return ""


def _tile_kinds(kinds: tuple[str, ...], w_block_n: int) -> tuple[str, ...]:
    """The epilogue kinds a qlinear may fold: with weight-scale tiles (``w_block_n``) not the gated one, whose
    (gate, up) row interleave would put rows of two tiles under one scale."""
    return tuple(k for k in kinds if k != "gated") if w_block_n else kinds


def _kernel_qlinear_q(w_group: int, a_group: int, epilogue: str = "", w_block_n: int = 0,
                      pdl: bool = False) -> Callable[..., torch.Tensor]:
    """The FX target replacing one ``qlinear_q`` (its input arrives as codes + per-token scales); ``epilogue`` and
    ``pdl`` (one row: ``a8_linear_q_pdl``) as in ``_kernel_qlinear``."""
    from lowbit.ir.normquant import qlinear_q
    from lowbit.kernels._common import epilogue_ref

    def run(xq, x_scale, qweight, w_scale, w_zero_point=None, bias=None, *, residual=None, **kw):
        out_dtype = kw.get("out_dtype", torch.float32)
        if not (_on_kernel_device(xq) and out_dtype in _KERNEL_DTYPES
                and kw.get("x_dtype") == out_dtype):
            y = epilogue_ref(qlinear_q(xq, x_scale, qweight, w_scale, w_zero_point, bias, **kw), epilogue)
            return y if residual is None else ir_ops.residual_add(residual, y)
        return _step_op("a8_linear_q", pdl, xq)(xq, x_scale, qweight, w_scale, w_zero_point, bias, kw["w_qdtype"],
                                                w_group, a_group, out_dtype, epilogue=epilogue, w_block_n=w_block_n,
                                                residual=residual)

    run.__name__ = "triton_a8_linear_q" + (f"_{epilogue.replace('*', '_')}" if epilogue else "")
    run.adds_residual = not epilogue  # type: ignore[attr-defined]
    run.a8_codes_form = (w_group, a_group, epilogue, w_block_n)  # type: ignore[attr-defined]
    return run


def _kernel_qlinear_q_normed(w_group: int, a_group: int, epilogue: str = "", w_block_n: int = 0,
                             pdl: bool = False) -> Callable[..., torch.Tensor]:
    """The FX target replacing a ``qlinear_q`` whose ``rms_norm_quant`` ``_fuse_norm_quant_a8`` split: its input is
    the norm's ``gain * stream`` with the stream's partial sums of squares (``norm_sumsq``), which
    ``lowbit::a8_linear`` norms and quantizes (in the GEMV at decode sizes); the reference: ``norm_from_parts_ref``,
    the IR's quantize, then the ``qlinear_q`` target's reference."""
    from lowbit.ir.quant import dynamic_qparams, quantize
    from lowbit.kernels._common import norm_from_parts_ref

    on_codes = _kernel_qlinear_q(w_group, a_group, epilogue, w_block_n, pdl)

    def run(x, qweight, w_scale, w_zero_point=None, bias=None, *, norm_sumsq, norm_eps, residual=None, **kw):
        if not (_runs_kernel(x) and kw.get("out_dtype") == x.dtype and kw.get("x_dtype") == x.dtype):
            h = norm_from_parts_ref(x, norm_sumsq, norm_eps)
            block = kw.get("a_block_size")
            scale, _ = dynamic_qparams(h, qdtype=kw["a_qdtype"], granularity="per_token", symmetric=True, axis=-1,
                                       block_size=block)
            xq = quantize(h, scale, None, qdtype=kw["a_qdtype"], axis=-1, block_size=block)
            return on_codes(xq, scale, qweight, w_scale, w_zero_point, bias, residual=residual, **kw)
        return _step_op("a8_linear", pdl, x)(x, qweight, w_scale, w_zero_point, bias, kw["w_qdtype"], w_group,
                                             kw["a_qdtype"], a_group, epilogue=epilogue, w_block_n=w_block_n,
                                             residual=residual, norm_sumsq=norm_sumsq, norm_eps=norm_eps)

    run.__name__ = "triton_a8_linear_normed" + (f"_{epilogue.replace('*', '_')}" if epilogue else "")
    return run


def _kernel_a8_linear_add_norm(w_group: int, a_group: int, w_block_n: int = 0,
                               pdl: bool = False) -> Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The FX target replacing an A8 qlinear whose stream (its output plus ``residual``) an ``rms_norm_quant``
    reads (``_fuse_norm_quant_a8``): ``lowbit::a8_linear_add_norm`` (``_add_norm_target``; one row with ``pdl``:
    ``a8_linear_add_norm_pdl``)."""

    def on_kernel(x, qweight, w_scale, w_zero_point, bias, residual, norm_weight, kw):
        return _step_op("a8_linear_add_norm", pdl, x)(x, qweight, w_scale, w_zero_point, bias, kw["w_qdtype"],
                                                      w_group, kw["a_qdtype"], a_group, residual, norm_weight,
                                                      w_block_n=w_block_n)

    return _add_norm_target(w_group, "triton_a8_linear_add_norm", on_kernel)


def plan_rms_norm_quant(x_dtype: torch.dtype, k: int, weight_dtype: torch.dtype | None,
                        kwargs: dict[str, Any]) -> str | None:
    """Why the fused ``rms_norm_quant`` kernel does not take a node (None: it does), from what is known before
    it runs: the input's dtype and row length ``k``, the gain's dtype (None: no gain) and the node's kwargs (the
    statistics' dtype, the activation format and group, a gain in Gemma's form)."""
    group = 0 if kwargs.get("a_block_size") in (None, k) else int(kwargs["a_block_size"])
    if x_dtype not in _KERNEL_DTYPES:
        return f"input {x_dtype}: the kernel takes bf16/fp16"
    if weight_dtype is not None and weight_dtype != x_dtype:
        return f"gain {weight_dtype} with input {x_dtype}"
    if kwargs.get("compute_dtype") not in (None, torch.float32):
        return f"statistics in {kwargs['compute_dtype']} (the kernel's are fp32)"
    if kwargs.get("a_qdtype") not in ("int8", "fp8e4m3"):
        return f"activations {kwargs.get('a_qdtype')} (the kernel writes int8/fp8e4m3)"
    if group and not _pow2(group):  # a K it does not divide ends in a partial group (fp8-block128 on K = 576)
        return f"activation group {group} (needs a power of two)"
    if not ir_ops.llama_gain_form(kwargs, weight_dtype is not None):
        return "gain in Gemma's form (offset + w)"
    return None


def _kernel_rms_norm_quant(x, weight=None, *, eps, compute_dtype=None, a_qdtype, a_block_size=None, offset=0.0,
                           gain_in_compute=False):
    """The FX target replacing ``rms_norm_quant`` where ``plan_rms_norm_quant`` said the kernel takes it: the fused
    kernel, or the reference for an input it cannot read after all (another dtype, or a CPU tensor without the
    interpreter)."""
    return _rms_norm_quant_on_kernel(x, weight, eps, compute_dtype, a_qdtype, a_block_size, offset, gain_in_compute,
                                     pdl=False)


def _kernel_rms_norm_quant_pdl(x, weight=None, *, eps, compute_dtype=None, a_qdtype, a_block_size=None,
                               offset=0.0, gain_in_compute=False):
    """``_kernel_rms_norm_quant`` with the backend's ``pdl``: one row launches with PDL (``rms_norm_quant_pdl``)."""
    return _rms_norm_quant_on_kernel(x, weight, eps, compute_dtype, a_qdtype, a_block_size, offset, gain_in_compute,
                                     pdl=True)


_RMS_NORM_QUANT_TARGETS = (_kernel_rms_norm_quant, _kernel_rms_norm_quant_pdl)
"""The FX targets of a lowered ``rms_norm_quant`` (``_split_norm_quant`` looks for either)."""


def _rms_norm_quant_on_kernel(x, weight, eps, compute_dtype, a_qdtype, a_block_size, offset, gain_in_compute,
                              pdl: bool):
    """The two targets' body: the kernel (its PDL op at one row with ``pdl``) or the reference."""
    from lowbit.ir.normquant import rms_norm_quant

    k = x.shape[-1]
    kw = {"compute_dtype": compute_dtype, "a_qdtype": a_qdtype, "a_block_size": a_block_size, "offset": offset,
          "gain_in_compute": gain_in_compute}
    if _runs_kernel(x) and plan_rms_norm_quant(x.dtype, k, None if weight is None else weight.dtype, kw) is None:
        group = 0 if a_block_size in (None, k) else int(a_block_size)
        return _step_op("rms_norm_quant", pdl, x)(x, weight, eps, compute_dtype == torch.float32, a_qdtype, group)
    return rms_norm_quant(x, weight, eps=eps, **kw)


def plan_hadamard(t: TensorType | None) -> str | None:
    """Why the hadamard kernel does not take an online rotation of this output type (None: it does)."""
    from lowbit.kernels.hadamard import unsupported

    if t is None or not t.shape or not isinstance(t.shape[-1], int):
        return "last dimension unknown at lowering"
    if t.dtype not in _HAD_DTYPES:
        return f"dtype {t.dtype}: the kernel takes bf16/fp16/fp32"
    return unsupported(int(t.shape[-1]))


def _type_of(arg: Any, types: dict[str, TensorType] | None) -> TensorType | None:
    """The lowering-time type of an FX node argument (None: not a node, or no type recorded for it)."""
    return (types or {}).get(arg.name) if isinstance(arg, torch.fx.Node) else None


def plan_attention(node: torch.fx.Node, types: dict[str, TensorType] | None) -> str | None:
    """Why no call of an ``attention`` node can take ``decode_sdpa`` (None: a decode step's may): an additive mask
    (Bloom's ALiBi, which the kernel adds per query head) of a dtype other than the query's, the query's dtype and
    head_dim (``decode_sdpa_layout_unsupported``); the rest (one query row, the mask's shape, the batch) is per
    call."""
    from lowbit.kernels.decode_step import decode_sdpa_layout_unsupported

    mask = _type_of(node.args[3] if len(node.args) > 3 else node.kwargs.get("mask"), types)
    q = node.args[0] if node.args else None
    t = _type_of(q, types)
    if mask is not None and mask.dtype != torch.bool and t is not None and mask.dtype != t.dtype:
        return (f"a {str(mask.dtype).removeprefix('torch.')} additive mask of a {str(t.dtype).removeprefix('torch.')}"
                " query: the kernel adds a mask of the query's dtype only")
    if t is None or not t.shape or not isinstance(t.shape[-1], int):
        return None  # decided per call (decode_sdpa_supported)
    return decode_sdpa_layout_unsupported(t.dtype, int(t.shape[-1]))


def plan_cache_attention(node: torch.fx.Node, types: dict[str, TensorType] | None,
                         gm: torch.fx.GraphModule | None = None
                         ) -> tuple[str | None, tuple[torch.Tensor, torch.dtype] | None]:
    """(why the packed-cache decode kernel does not take a ``cache_attention`` node, None where it does; the ALiBi
    slopes and bias dtype it then takes for a ``bias``, read once here): its query and key types (head_dim, heads),
    its layout kwargs against ``cache_attention_unsupported`` and a ``bias`` that is not ALiBi (``alibi_slopes_of``;
    without ``gm`` every bias)."""
    from lowbit.kernels.decode_attention import cache_attention_unsupported

    q, k = node.args[0], node.args[1]
    tq, tk = _type_of(q, types), _type_of(k, types)
    if tq is None or tk is None or tq.rank != 4 or tk.rank != 4 or not all(
            isinstance(d, int) for d in (tq.shape[1], tq.shape[3], tk.shape[1])):
        return "heads or head_dim unknown at lowering", None
    kw = node.kwargs
    if kw.get("sliding") is not None:
        return (f"a sliding window of {kw['sliding']} tokens: the kernel reads every quantized slot from the sink on",
                None)
    alibi = None
    if kw.get("bias") is not None:
        found = alibi_slopes_of(gm, node, int(tq.shape[1])) if gm is not None else "the graph was not given"
        if isinstance(found, str):
            return f"an additive bias over key positions that the kernel cannot read as ALiBi slopes: {found}", None
        alibi = found
    why = cache_attention_unsupported(int(tq.shape[3]), int(kw["k_block"]), int(kw["v_group"]), int(kw["bits"]),
                                      int(tq.shape[1]), int(tk.shape[1]))
    return why, None if why is not None else alibi


ALIBI_PROBES = ((40, ((39,), (0,))), (40, ((17,), (26,))), (9, ((8,), (1,))), (300, ((299,), (257,))))
"""(cache slots, decode positions of two sequences) at which ``alibi_slopes_of`` evaluates a bias: every slot of a
full cache, a first token, mid-cache positions, a second cache length (the table is built per slot count), and
positions past 256, where Falcon's ``build_alibi_tensor`` (positions and product rounded to bfloat16) departs from
slope x position even for power-of-two slopes and sqrt(head_dim): below 256 its bias is exactly that."""


class _NotAlibi(Exception):
    """A bias subgraph ``alibi_slopes_of`` cannot evaluate from the step's positions and cache size alone."""


def _cache_operands(gm: torch.fx.GraphModule) -> tuple[set[torch.fx.Node], set[torch.fx.Node]]:
    """(every packed-cache operand of the graph's ``cache_attention`` nodes, their codes: the slot axis)."""
    from lowbit.ir.kvcache import cache_attention, cache_attention_into

    ops = (cache_attention, cache_attention_into, _CACHE_ATTENTION)
    layers = [n.args[4:12] for n in gm.graph.nodes if n.op == "call_function" and n.target in ops]
    return {c for parts in layers for c in parts}, {c for parts in layers for c in (parts[0], parts[3])}


def _evaluate_bias(gm: torch.fx.GraphModule, node: torch.fx.Node, attention: torch.fx.Node,
                   positions: torch.Tensor, slots: int, memo: dict[torch.fx.Node, Any],
                   caches: tuple[set[torch.fx.Node], set[torch.fx.Node]]) -> Any:
    """``node``'s value in a decode step at ``positions [B, 1]`` over ``slots`` cache slots: the step's positions
    (``attention``'s fourth operand), constants, and the batch and slot sizes read off a packed cache (any layer's:
    Bloom builds one bias for all of them); any other graph input is refused (the bias would be per call, not a
    table of the positions)."""
    if node in memo:
        return memo[node]
    cache, codes = caches
    if node is attention.args[3]:
        value: Any = positions
    elif node.op == "get_attr":
        value = getattr(gm, str(node.target))
    elif node.op == "call_function" and node.target is torch.ops.aten.sym_size.int:
        src, dim = node.args
        if src is attention.args[3]:
            value = positions.shape[dim]
        elif src in cache and dim in (0, -4):
            value = positions.shape[0]
        elif src in codes and dim in (2, -2):  # the codes' slot axis
            value = slots
        else:
            raise _NotAlibi(f"%{node.name} reads dim {dim} of %{src}")
    elif node.op == "call_function":
        args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), lambda a: _evaluate_bias(
            gm, a, attention, positions, slots, memo, caches))
        value = node.target(*args, **kwargs)
    else:
        raise _NotAlibi(f"%{node.name} is graph input {node.op} {node.target}")
    memo[node] = value
    return value


def alibi_slopes_of(gm: torch.fx.GraphModule, node: torch.fx.Node, heads: int
                    ) -> tuple[torch.Tensor, torch.dtype] | str:
    """A ``cache_attention`` node's ``bias`` read as ALiBi: (float32 slopes ``[heads]``, the bias' dtype) where the
    bias is ``slope[h] * key position`` (float32, rounded to its dtype: transformers' ``build_alibi_tensor``)
    wherever the key is causal (slot <= the query's position) and -inf elsewhere, at every ``ALIBI_PROBES`` decode
    step; else why not, naming the node. Why probes: the bias is a subgraph of the positions and the cache size
    (Bloom's: the model's ``build_alibi_tensor`` over the slots and a causal ``where``), so evaluating it is what
    shows the kernel's slope-times-position equals it; the kernel never gets a bias it would compute otherwise. The
    slopes are read at position 1, so a half-precision bias whose slopes are not exact in its dtype (Bloom's for a
    head count that is no power of two) is refused too."""
    from lowbit.kernels.decode_attention import alibi_bias

    bias = node.kwargs["bias"]
    where = f"%{bias.name} (bias of %{node.name})"
    slopes: torch.Tensor | None = None
    dtype = None
    caches = _cache_operands(gm)
    for slots, rows in ALIBI_PROBES:
        positions = torch.tensor(rows)
        try:
            value = _evaluate_bias(gm, bias, node, positions, slots, {}, caches)
        except _NotAlibi as e:
            return f"{where} is not a table of the step's positions: {e}"
        except Exception as e:  # an op that cannot run at the probe's sizes
            return f"{where} could not be evaluated at {slots} slots: {type(e).__name__}: {e}"
        b = positions.shape[0]
        if not isinstance(value, torch.Tensor) or value.dim() != 4 or not value.is_floating_point() or any(
                n not in (1, full) for n, full in zip(value.shape, (b, heads, 1, slots))) or value.shape[3] != slots:
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            return f"{where} is {shape}, not one bias per head and key over {slots} slots"
        value = value.detach().cpu().expand(b, heads, 1, slots)
        dtype = value.dtype
        if slopes is None:  # read where every position is causal: slot 1 of the sequence at position 39
            slopes = value[0, :, 0, 1].float().contiguous()  # (a view of the expanded bias: strided)
        keys = torch.arange(slots)
        causal = keys[None, :] <= positions
        want = torch.where(causal[:, None, None, :], alibi_bias(slopes, keys.expand(b, slots), dtype)[:, :, None],
                           float("-inf")).to(dtype)
        if not torch.equal(value, want):
            return (f"{where} is not slope x key position where a key is causal and -inf elsewhere (decode at "
                    f"positions {rows} over {slots} slots; slopes read {slopes.tolist()})")
    assert slopes is not None and dtype is not None
    return slopes, dtype


def _kernel_hadamard(x: torch.Tensor, lt: torch.Tensor) -> torch.Tensor:
    """FX target of a lowered ``hadamard``: the kernel (``lt``: its table, a buffer made at lowering), or the
    reference for an input the kernel cannot read (CPU without the interpreter, another dtype) or one below the
    measured crossover (``lowbit.kernels.hadamard.prefers_kernel``: few rows, where the reference's one matmul
    launches faster than the kernel)."""
    from lowbit.kernels.hadamard import hadamard_direct, prefers_kernel

    n = x.shape[-1]
    if x.dtype in _HAD_DTYPES and _on_kernel_device(x) and prefers_kernel(n, x.numel() // max(n, 1), x.device):
        return hadamard_direct(x, lt)
    return ir_hadamard(x)


def _kernel_hadamard_a8(w_group: int) -> Callable[..., torch.Tensor]:
    """FX target replacing ``hadamard -> qlinear`` (A8, per-token activations): the rotation fused into the
    activation quantize (``lowbit::hadamard_a8_linear``), or the reference pair for an input the kernels cannot
    read."""

    def run(x, lt, qweight, w_scale, w_zero_point=None, bias=None, a_scale=None, a_zero_point=None, **kw):
        if not _runs_kernel(x):
            return qlinear(ir_hadamard(x), qweight, w_scale, w_zero_point, bias, a_scale, a_zero_point, **kw)
        return torch.ops.lowbit.hadamard_a8_linear(x, lt, qweight, w_scale, w_zero_point, bias, kw["w_qdtype"],
                                                   w_group, kw["a_qdtype"])

    run.__name__ = "triton_hadamard_a8_linear"
    return run


def _fuse_hadamard_a8(gm: torch.fx.GraphModule, a8: dict[torch.fx.Node, Plan], report: dict[str, dict[str, str]]
                      ) -> None:
    """``hadamard -> qlinear`` pairs where the qlinear runs ``a8_linear`` per token and reads the rotation
    alone: one node on ``hadamard_a8_linear`` (the rotated activation is never written to memory)."""
    from lowbit.kernels.hadamard import unsupported_fused

    for q, plan in a8.items():
        h = q.args[0] if q.args else None
        if not (isinstance(h, torch.fx.Node) and h.target is _kernel_hadamard and len(h.users) == 1
                and plan.static["a_group"] == 0):  # (plan_qlinear sends static activation scales to the reference)
            continue
        n = int(h.args[1].meta.get("hadamard_n", 0)) if isinstance(h.args[1], torch.fx.Node) else 0
        why = unsupported_fused(n) if n else "row length unknown"
        if why is not None:
            report["unfused"][q.name] = f"hadamard: {why}"
            continue
        q.args = (h.args[0], h.args[1], *q.args[1:])
        q.target = _kernel_hadamard_a8(plan.static["w_group"])
        gm.graph.erase_node(h)
        report["kernels"].pop(h.name, None)
        report["kernels"][q.name] = f"hadamard+{plan.form.name}"  # type: ignore[union-attr]


def _cache_attention(*args: Any, pdl: bool = False, **kwargs: Any) -> Any:
    """``cache_attention_decode``; ``pdl`` (the backend's): inside ``pdl_launches``, so a decode step's packed write,
    split and merge launch with programmatic dependent launch as the GEMVs around them do (a prefill runs torch ops
    there, which ignore it). ``torch.compiler.disable``d (``_CACHE_ATTENTION``): lowbit's Python launches the kernels,
    so the thread's PDL state reaches them."""
    from lowbit.kernels._common import pdl_launches
    from lowbit.kernels.decode_attention import cache_attention_decode

    with pdl_launches() if pdl else contextlib.nullcontext():
        return cache_attention_decode(*args, **kwargs)


_CACHE_ATTENTION = torch.compiler.disable(_cache_attention)


def _attention_target(op: str) -> Callable[..., torch.Tensor]:
    """FX target of the IR's ``attention``: a decode step's one query row per sequence over a float cache runs
    ``lowbit::<op>`` (``decode_sdpa``, flash-decoding, the mask read as it is; ``decode_sdpa_pdl`` the same with
    programmatic dependent launch, the backend's ``pdl``) up to ``DECODE_SDPA_MAX_HEADS`` (sequence, kv head)
    pairs; anything else (prefill, no mask it reads, fp32, larger batches) the reference SDPA."""

    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None, *,
            scale: float | None = None, is_causal: bool = False, enable_gqa: bool = False,
            merge_in_split: bool = False) -> torch.Tensor:
        from lowbit.kernels.decode_step import decode_sdpa_supported

        if decode_sdpa_supported(q, k, v, mask, is_causal) is None:
            # (merge_in_split: the opaque decode_sdpa_pdl's; the traced triton_op cannot hold the kept counters)
            extra = (merge_in_split,) if merge_in_split else ()
            return getattr(torch.ops.lowbit, op)(q, k, v, mask, scale, enable_gqa, *extra)
        return ir_ops.attention(q, k, v, mask, scale=scale, is_causal=is_causal, enable_gqa=enable_gqa)

    run.__name__ = f"triton_attention_{op}"
    return run


_kernel_attention = _attention_target("decode_sdpa")
_kernel_attention_pdl = _attention_target("decode_sdpa_pdl")


def _operand(gm: torch.fx.GraphModule, node: torch.fx.Node, i: int, name: str) -> Any:
    a = node.args[i] if len(node.args) > i else node.kwargs.get(name)
    if isinstance(a, torch.fx.Node) and a.op == "get_attr":
        return getattr(gm, a.target)
    return a


def _repack_words(gm: torch.fx.GraphModule, node: torch.fx.Node, group: int) -> bool:
    """Replace a weight-only qlinear's weight, scale and zero point buffers by the decode layout
    (``lowbit.kernels.weight_only.pack_words``: int32 words, transposed scales) once, in place; False (the
    stored layout stays) where a buffer is shared with another node or K/group do not allow the layout."""
    from lowbit.kernels.weight_only import pack_words

    nodes = _own_buffers(node, (1, 2, 3))
    if nodes is None:
        return False
    qw, s, z = (getattr(gm, a.target) if a is not None else None for a in nodes)
    words, s2, z2 = pack_words(qw, s, z, node.kwargs["w_qdtype"], group)
    if words.dtype != torch.int32:
        return False
    for a, t in zip(nodes, (words, s2, z2), strict=True):
        if a is not None:
            gm.register_buffer(a.target, t)
    return True


def _fusible_norm(x: torch.fx.Node,
                  readers: set[torch.fx.Node]) -> tuple[torch.fx.Node, torch.fx.Node, float] | None:
    """``(norm, gain, eps)`` of the one RMSNorm among ``x``'s readers when every reader of that norm is in
    ``readers`` (weight-only linears on the decode layout), with fp32 statistics (the kernels' arithmetic) and a
    gain; else None."""
    norms = [u for u in x.users if u.op == "call_function" and u.target is ir_ops.rms_norm]
    if len(norms) != 1 or not norms[0].users or set(norms[0].users) - readers:
        return None
    norm = norms[0]
    gain = norm.args[1] if len(norm.args) > 1 else norm.kwargs.get("weight")
    if (norm.args[0] is not x or not isinstance(gain, torch.fx.Node)
            or norm.kwargs.get("compute_dtype") is not torch.float32 or not ir_ops.llama_gain_form(norm.kwargs, True)):
        return None
    return norm, gain, float(norm.kwargs["eps"])


def _plan_norm_quant_node(gm: torch.fx.GraphModule, node: torch.fx.Node,
                          types: dict[str, TensorType] | None) -> str | None:
    """``plan_rms_norm_quant`` for an FX ``rms_norm_quant`` node: its input's type, its gain's dtype."""
    x = node.args[0]
    t = _type_of(x, types)
    if t is None or not t.shape or not isinstance(t.shape[-1], int):
        return "row length unknown at lowering"
    weight = _operand(gm, node, 1, "weight")
    if weight is not None and not isinstance(weight, torch.Tensor):
        return "gain is not a parameter"
    return plan_rms_norm_quant(t.dtype, int(t.shape[-1]), None if weight is None else weight.dtype, node.kwargs)


class _NodeOrder:
    """The graph's node positions, taken once per fusion pass: a scan of the graph per candidate made the passes
    quadratic in nodes. A rewrite keeps the order of the nodes it leaves (erasing one moves none); the getitems a
    pass inserts right after a node are placed between it and its successor (``place_after``)."""

    def __init__(self, graph: torch.fx.Graph) -> None:
        self._position: dict[torch.fx.Node, float] = {node: float(i) for i, node in enumerate(graph.nodes)}

    def after(self, node: torch.fx.Node, other: torch.fx.Node) -> bool:
        """Whether ``node`` comes after ``other`` in the graph."""
        return self._position[node] > self._position[other]

    def place_after(self, anchor: torch.fx.Node, inserted: tuple[torch.fx.Node, ...]) -> None:
        """Positions for ``inserted``, in graph order right after ``anchor`` (``_add_norm_outputs``)."""
        for i, node in enumerate(inserted, 1):
            self._position[node] = self._position[anchor] + i / (len(inserted) + 1)


def _fuse_norm_residual(gm: torch.fx.GraphModule,
                        linears: dict[torch.fx.Node, tuple[str, Callable[..., Any]]],
                        report: dict[str, dict[str, str]]) -> None:
    """Split each block's ``stream = residual_add(s, linear(...))`` then ``rms_norm(stream)`` read by GEMV linears
    (``linears``: node -> (epilogue, its add + norm target): weight-only ones on the decode layout, float ones on
    ``float_gemv``): the linear making the update becomes ``weight_only_linear_add_norm`` or
    ``float_linear_add_norm`` (the stream, gain * stream, partial sums of squares: its split-K reduce writes all
    three), the norm's readers read ``gain * stream`` and finish the norm in their reduce
    (``norm_sumsq``). Why: in a decode step the add + norm is a launch-bound Inductor kernel (2.2-4.2 µs on the
    H200, two per block) between two GEMVs that already have a reduce each. The stream's other readers (the next
    residual add) read it from the new node. A first block's norm (of the embedding) and a norm behind a slice
    (``last-logits``) keep their ops."""

    readers = set(linears)
    order = _NodeOrder(gm.graph)
    for node, (epilogue, add_norm_target) in linears.items():
        add = next(iter(node.users)) if len(node.users) == 1 else None
        if (epilogue or add is None or add.target is not ir_ops.residual_add or len(add.args) != 2
                or add.args[1] is not node or not isinstance(add.args[0], torch.fx.Node)):
            continue
        found = _fusible_norm(add, readers)
        # the stream becomes the node's input: it must come before it (an earlier rewrite's getitem, placed)
        if found is None or order.after(add.args[0], node):
            continue
        norm, gain, eps = found
        node.target = add_norm_target
        node.kwargs = {**node.kwargs, "residual": add.args[0], "norm_weight": gain}
        stream, gained, sumsq = _add_norm_outputs(gm, node)
        order.place_after(node, (stream, gained, sumsq))
        for reader in list(norm.users):
            reader.args = (gained, *reader.args[1:])
            reader.kwargs = {**reader.kwargs, "norm_sumsq": sumsq, "norm_eps": eps}
            report["kernels"][reader.name] += "+norm"
        gm.graph.erase_node(norm)
        add.replace_all_uses_with(stream)
        gm.graph.erase_node(add)
        report["kernels"][node.name] += "+add+norm"


def _fuse_residual_a8(gm: torch.fx.GraphModule, report: dict[str, dict[str, str]]) -> None:
    """``residual_add(stream, y)`` of an A8 linear's output ``y`` (no epilogue, no other reader): the linear's node
    takes ``residual=stream`` and the add is erased. Why: at decode sizes ``a8_gemv`` adds it in its store, where
    the add was a launch of its own after the GEMV (two per block of a W8A8/FP8 decode step; the float and
    weight-only steps fold theirs already, ``_fuse_norm_residual``); at other sizes the op adds it with torch ops,
    which ``torch.compile`` traces as before. The stream must come before the linear (it becomes its input)."""
    order = _NodeOrder(gm.graph)  # (this pass inserts no node: an add's erasure moves none)
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or not getattr(node.target, "adds_residual", False) or len(node.users) != 1:
            continue
        add = next(iter(node.users))
        if add.op != "call_function" or add.target is not ir_ops.residual_add or len(add.args) != 2 or add.kwargs:
            continue
        stream = add.args[0] if add.args[1] is node else add.args[1] if add.args[0] is node else None
        if not isinstance(stream, torch.fx.Node) or order.after(stream, node):
            continue
        node.kwargs = {**node.kwargs, "residual": stream}
        add.replace_all_uses_with(node)
        gm.graph.erase_node(add)
        report["kernels"][node.name] += "+add"


def _split_norm_quant(node: torch.fx.Node) -> tuple[torch.fx.Node, torch.fx.Node, float, list[torch.fx.Node]] | None:
    """``(norm, gain, eps, readers)`` when ``node``'s one ``rms_norm_quant`` reader (lowered to its kernel) has a
    Llama-form gain, fp32 statistics, and only A8 ``qlinear_q`` targets reading its codes and scales (as their
    first two operands, nothing else); else None."""

    norms = [u for u in node.users if u.op == "call_function" and u.target in _RMS_NORM_QUANT_TARGETS]
    if len(norms) != 1 or norms[0].args[0] is not node:
        return None
    norm = norms[0]
    gain = norm.args[1] if len(norm.args) > 1 else norm.kwargs.get("weight")
    if (not isinstance(gain, torch.fx.Node) or norm.kwargs.get("compute_dtype") is not torch.float32
            or not ir_ops.llama_gain_form(norm.kwargs, True)):
        return None
    outs = {u.args[1]: u for u in norm.users if u.target is operator.getitem}
    if len(outs) != len(norm.users) or set(outs) != {0, 1} or set(outs[0].users) != set(outs[1].users):
        return None
    readers = list(outs[0].users)
    if not readers or any(getattr(r.target, "a8_codes_form", None) is None or r.args[:2] != (outs[0], outs[1])
                          or outs[0] in r.args[2:] or outs[1] in r.args[2:] for r in readers):
        return None
    return norm, gain, float(norm.kwargs["eps"]), readers


def _gemv_quantizes(gm: torch.fx.GraphModule, node: torch.fx.Node, slot: int, w_group: int, a_group: int,
                    w_block_n: int) -> int | None:
    """The weight's N where an A8 linear (its qweight at argument ``slot``, zero point after its scale) takes the
    decode GEMV (``a8_gemv_unsupported`` at one row), else None."""
    from lowbit.kernels.a8_gemv import a8_gemv_unsupported

    qweight = _operand(gm, node, slot, "qweight")
    zero_point = _operand(gm, node, slot + 2, "w_zero_point")
    if not isinstance(qweight, torch.Tensor) or qweight.dim() != 2 or a8_gemv_unsupported(
            1, node.kwargs.get("w_qdtype"), w_group, a_group, zero_point, w_block_n) is not None:
        return None
    return int(qweight.shape[0])


def _fuse_norm_quant_a8(gm: torch.fx.GraphModule, report: dict[str, dict[str, str]], pdl: bool = False) -> None:
    """Split each ``rms_norm_quant`` between two A8 linears of a block as ``_fuse_norm_residual`` splits a float or
    weight-only step's norm: the linear making the stream (its residual add in its store, ``_fuse_residual_a8``)
    becomes ``a8_linear_add_norm`` (the stream, gain * stream, partial sums of squares), the norm's ``qlinear_q``
    readers read ``gain * stream`` and the partials and norm + quantize it in their GEMV (``a8_linear``'s
    ``norm_sumsq``). Why: the norm + quantize was a launch of its own per norm (two per block of a W8A8/FP8 decode
    step, SmolLM2's launch-bound step); the GEMVs already read their rows whole. Only where every linear involved
    takes the GEMV and the stream is at most ``A8_GEMV_QUANTIZE_MAX_K`` wide (the readers norm and quantize it in
    their GEMV): elsewhere the split would run the norm as torch ops and a quantize launch, more than the kernel.
    The stream's other readers (the next residual add) read it from the new node; a first block's norm (of the
    embedding) keeps its kernel. Off while ``A8_GEMV_QUANTIZE_MAX_K`` is 0, its default since session 50 measured
    the split step slower on an H100 (fewer launches, longer GEMV prologues: the constant's docstring)."""

    from lowbit.kernels.a8_gemv import A8_GEMV_QUANTIZE_MAX_K

    order = _NodeOrder(gm.graph)
    for node in list(gm.graph.nodes):
        form = getattr(node.target, "a8_add_norm_form", None) if node.op == "call_function" else None
        if form is None or not isinstance(node.kwargs.get("residual"), torch.fx.Node):
            continue
        found = _split_norm_quant(node)
        if found is None or order.after(found[1], node):  # the gain must come before it
            continue
        norm, gain, eps, readers = found
        width = _gemv_quantizes(gm, node, 1, *form)
        if (width is None or width > A8_GEMV_QUANTIZE_MAX_K or any(
                _gemv_quantizes(gm, r, 2, r.target.a8_codes_form[0], r.target.a8_codes_form[1],
                                r.target.a8_codes_form[3]) is None for r in readers)):
            continue
        node.target = _kernel_a8_linear_add_norm(*form, pdl)
        node.kwargs = {**node.kwargs, "norm_weight": gain}
        stream, gained, sumsq = _add_norm_outputs(gm, node)
        order.place_after(node, (stream, gained, sumsq))
        codes = tuple(readers[0].args[:2])
        for reader in readers:
            w_group, a_group, epilogue, w_block_n = reader.target.a8_codes_form
            reader.target = _kernel_qlinear_q_normed(w_group, a_group, epilogue, w_block_n, pdl)
            reader.args = (gained, *reader.args[2:])
            reader.kwargs = {**reader.kwargs, "norm_sumsq": sumsq, "norm_eps": eps}
            report["kernels"][reader.name] += "+norm"
        for dead in (*codes, norm):
            gm.graph.erase_node(dead)
        node.replace_all_uses_with(stream, delete_user_cb=lambda u: u not in (stream, gained, sumsq))
        report["kernels"][node.name] += "+norm"
        report["norm_quant"][norm.name] = f"split: gain * stream from {node.name}, normed + quantized in its readers"


_SHAPE_READS = frozenset({torch.ops.aten.sym_size.int, torch.ops.aten.sym_numel.default,
                          torch.ops.aten.sym_stride.int, torch.ops.aten.sym_storage_offset.default})
"""Readers of a cache input that see only its metadata (``torch_backend._SHAPE_ONLY``): a write before them is
invisible to them."""


def _cache_write(cache: torch.fx.Node, attn: torch.fx.Node) -> torch.fx.Node | None:
    """The one ``scatter_into(cache, 2, index, src)`` writing a donated cache input that ``attn`` then reads,
    when the cache's other readers are that attention, the graph's output and shape reads (nothing else sees its
    data between the write and the attention); else None."""
    if cache.op != "placeholder":
        return None
    writes = [u for u in cache.users if u.target is torch.ops.lowbit.scatter_into.default]
    others = set(cache.users) - set(writes) - {attn}
    if (len(writes) != 1 or writes[0].args[0] is not cache or writes[0].args[1] != 2 or writes[0].users
            or any(u.op != "output" and u.target not in _SHAPE_READS for u in others)):
        return None
    return writes[0]


def _is_rotary(node: Any, reader: torch.fx.Node) -> bool:
    """``node`` is an IR ``rotary(x, cos, sin)`` (positional operands) read by ``reader`` alone."""
    return (isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target is ir_ops.rotary
            and len(node.args) == 3 and not node.kwargs and set(node.users) == {reader})


def _slice_of_heads(node: Any, reader: torch.fx.Node) -> tuple[torch.fx.Node, int, int | None] | None:
    """``(x, start, end)`` of an ``aten.slice`` of ``x``'s last axis (dim 3 or -1 of a ``[B, H, N, D]`` head
    tensor, step 1) read by ``reader`` alone (end None: to the end); else None."""
    if not (isinstance(node, torch.fx.Node) and node.op == "call_function"
            and node.target is torch.ops.aten.slice.Tensor and not node.kwargs and set(node.users) == {reader}):
        return None
    x, dim, start, end, step = (*node.args, *(0, None, None, 1)[len(node.args) - 1:])
    if not isinstance(x, torch.fx.Node) or dim not in (3, -1) or step != 1:
        return None
    return x, start or 0, None if end is None or end >= 2 ** 62 else end


def _rotated_heads(node: Any, reader: torch.fx.Node) -> dict[str, Any] | None:
    """How ``node`` (read by ``reader`` alone) rotates heads ``x``: an IR ``rotary(x, cos, sin)`` over the whole
    head (``rotary_dim`` None), or a partial rotary, ``cat((rotary(x[..., :r], cos, sin), x[..., r:]), -1)``
    (GPT-NeoX, Phi, StableLM: ``rotary_dim`` r); with the nodes the fusion erases, users first. Else None."""
    if _is_rotary(node, reader):
        return {"x": node.args[0], "cos": node.args[1], "sin": node.args[2], "rotary_dim": None, "nodes": [node]}
    if not (isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target is torch.ops.aten.cat.default
            and set(node.users) == {reader} and len(node.args) == 2 and node.args[1] in (3, -1)
            and not node.kwargs and len(node.args[0]) == 2):
        return None
    turned, rest = node.args[0]
    if not _is_rotary(turned, node):
        return None
    head, tail = _slice_of_heads(turned.args[0], turned), _slice_of_heads(rest, node)
    if head is None or tail is None or head[0] is not tail[0] or head[1] != 0 or head[2] is None:
        return None
    width = head[2]
    if tail[1] != width or tail[2] is not None or width <= 0 or width % 2:
        return None
    return {"x": head[0], "cos": turned.args[1], "sin": turned.args[2], "rotary_dim": width,
            "nodes": [node, turned, turned.args[0], rest]}


def cache_write_pattern(attn: torch.fx.Node) -> tuple[torch.fx.Node, torch.fx.Node] | None:
    """``(k_write, v_write)``: the ``scatter_into(k_cache, 2, index, k)`` and ``scatter_into(v_cache, 2, index, v)``
    of one index writing the two float caches an attention then reads (``_cache_write``: nothing else reads their
    data in between), whatever their sources; else None."""
    attention_ops = (_kernel_attention, _kernel_attention_pdl, ir_ops.attention)
    if attn.op != "call_function" or attn.target not in attention_ops or len(attn.args) < 3:
        return None
    k_cache, v_cache = attn.args[1:3]
    if not (isinstance(k_cache, torch.fx.Node) and isinstance(v_cache, torch.fx.Node) and k_cache is not v_cache):
        return None
    k_write, v_write = _cache_write(k_cache, attn), _cache_write(v_cache, attn)
    if k_write is None or v_write is None or k_write.args[2] is not v_write.args[2]:
        return None
    return k_write, v_write


def rotary_cache_pattern(attn: torch.fx.Node) -> dict[str, Any] | None:
    """The nodes of one layer's ``rotary(q) -> attention`` whose caches were written by ``scatter_into(k_cache, 2,
    index, rotary(k))`` and ``scatter_into(v_cache, 2, index, v)`` (one index, one cos/sin and rotary width for q
    and k, each rotary read by its consumer alone; a rotary over the whole head or a partial one's cat,
    ``_rotated_heads``), by role: ``q_rot, k_rot, k_write, v_write`` (nodes), ``q, k`` (their unrotated heads),
    ``rotary_dim`` (None: the whole head) and ``erased`` (the rotaries' nodes, users first); else None."""
    writes = cache_write_pattern(attn)
    q_heads = _rotated_heads(attn.args[0], attn) if writes is not None else None
    if writes is None or q_heads is None:
        return None
    q_rot = attn.args[0]
    k_write, v_write = writes
    k_rot = k_write.args[3]
    k_heads = _rotated_heads(k_rot, k_write)
    if k_heads is None or any(k_heads[key] is not q_heads[key] for key in ("cos", "sin")) \
            or k_heads["rotary_dim"] != q_heads["rotary_dim"]:
        return None
    return {"q_rot": q_rot, "k_rot": k_rot, "k_write": k_write, "v_write": v_write, "q": q_heads["x"],
            "k": k_heads["x"], "cos": q_heads["cos"], "sin": q_heads["sin"], "rotary_dim": q_heads["rotary_dim"],
            "erased": k_heads["nodes"] + q_heads["nodes"]}


def _written_out_rotary(attn: torch.fx.Node) -> torch.fx.Node | None:
    """The keys a layer writes into its float k cache before ``attn`` reads it, where they are no IR ``rotary``
    (``rotary_cache_pattern`` then leaves the layer's ops): what the report names, so a step whose rotary the kernel
    does not take is never fused silently wrong nor left unsaid. None for any other node or form."""
    attention_ops = (_kernel_attention, _kernel_attention_pdl, ir_ops.attention)
    if attn.op != "call_function" or attn.target not in attention_ops or len(attn.args) < 3:
        return None
    k_cache = attn.args[1]
    k_write = _cache_write(k_cache, attn) if isinstance(k_cache, torch.fx.Node) else None
    keys = k_write.args[3] if k_write is not None else None
    if not isinstance(keys, torch.fx.Node) or (keys.op == "call_function" and keys.target is ir_ops.rotary):
        return None
    return keys


def _op_name(node: torch.fx.Node) -> str:
    target = node.target
    return str(getattr(target, "__name__", target)) if node.op == "call_function" else node.op


def plan_rotary_cache(q: TensorType | None, k: TensorType | None, rotary_dim: int | None = None) -> str | None:
    """Why ``rotary_write_kv`` does not take a layer's rotated q and k of these types (None: it does): the
    kernel's head_dims (a power of two from 16 to 256) and dtypes (``ROTARY_DTYPES``), one for both; a partial
    rotary's ``rotary_dim`` (None: the whole head) even and no wider than the head."""
    from lowbit.kernels.decode_step import ROTARY_DTYPES, rotary_head_dim_unsupported

    if q is None or k is None or not q.shape or not k.shape or not isinstance(k.shape[-1], int):
        return "head_dim unknown at lowering"
    d = int(k.shape[-1])
    why = rotary_head_dim_unsupported(d)
    if why is not None:
        return f"head_dim {d}: {why}"
    if q.dtype != k.dtype or k.dtype not in ROTARY_DTYPES:
        return f"dtypes {q.dtype}, {k.dtype}: the kernel takes one of bf16/fp16/fp32"
    if rotary_dim is not None and not (0 < rotary_dim <= d and rotary_dim % 2 == 0):
        return f"rotary_dim {rotary_dim} of head_dim {d}: the kernel turns an even width up to the head_dim"
    return None


def plan_cache_write(k: TensorType | None, v: TensorType | None) -> str | None:
    """Why ``write_kv`` does not take a layer's k and v caches of these types (None: it does; the caches, graph
    inputs, are typed where a written key may not be: Bloom's is a ``getitem`` of a chunk). ``write_kv`` is
    ``rotary_write_kv``'s kernel with no rotary, so its head_dims and dtypes are ``plan_rotary_cache``'s, one for
    both."""
    return plan_rotary_cache(k, v)


def _fuse_cache_writes(gm: torch.fx.GraphModule, attn: torch.fx.Node, types: dict[str, TensorType] | None,
                       report: dict[str, dict[str, str]], pdl: bool) -> bool:
    """A layer ``rotary_cache_pattern`` leaves (no IR rotary: GPT-2, Bloom, a NoPE layer; or a rotary its kernel
    does not take, such as GPT-J's): its two float-cache ``scatter_into`` writes (``cache_write_pattern``) become one
    ``lowbit::write_kv`` node before the attention; whether they did. Why: two ``_write_rows`` launches per layer
    and step where one copies both rows. A write ``plan_cache_write`` refuses keeps its ops, reported."""
    writes = cache_write_pattern(attn)
    if writes is None:
        return False
    k_write, v_write = writes
    why = plan_cache_write(_type_of(k_write.args[0], types), _type_of(v_write.args[0], types))
    if why is not None:
        report["unfused"][k_write.name] = f"k/v cache write: {why}"
        return False
    with gm.graph.inserting_before(attn):
        fused = gm.graph.call_function(torch.ops.lowbit.write_kv.default, (
            k_write.args[3], v_write.args[3], k_write.args[0], v_write.args[0], k_write.args[2], pdl))
    report["cache_write"][fused.name] = f"cache writes %{k_write.name}, %{v_write.name} (no rotary)"
    gm.graph.erase_node(k_write)
    gm.graph.erase_node(v_write)
    return True


def slot_causal_mask(mask: Any) -> bool:
    """Whether an attention's mask is the generation step's ``slot <= position`` and nothing else (no sliding
    window, no ALiBi bias): ``le(arange(slots) as [1, 1, 1, S], positions as [B, 1, L, 1])``, as
    ``lowbit.models``' step makes it. Such a prefill may attend causally over its own slots
    (``causal_prefill_attention``), which the masked SDPA over every slot did ~2.7x slower on an H100."""
    def viewed(node: Any, shape_ok: Callable[[list[Any]], bool]) -> Any:
        if (isinstance(node, torch.fx.Node) and node.op == "call_function" and _op_name(node) == "reshape"
                and isinstance(node.args[1], (list, tuple)) and len(node.args[1]) == 4 and shape_ok(node.args[1])):
            return node.args[0]
        return None

    if not (isinstance(mask, torch.fx.Node) and mask.op == "call_function"
            and mask.target is torch.ops.aten.le.Tensor and len(mask.args) == 2):
        return False
    slots = viewed(mask.args[0], lambda s: list(s) == [1, 1, 1, -1])
    positions = viewed(mask.args[1], lambda s: s[1] == 1 and s[3] == 1)
    return (isinstance(slots, torch.fx.Node) and slots.target is torch.ops.aten.arange.default
            and len(slots.args) == 1 and isinstance(positions, torch.fx.Node) and positions.op == "placeholder"
            and positions.name == "positions")


def _fuse_rotary_cache(gm: torch.fx.GraphModule, types: dict[str, TensorType] | None,
                       report: dict[str, dict[str, str]], pdl: bool = False) -> None:
    """Each layer's ``rotary(q)``, ``rotary(k)`` (whole heads, or a partial rotary's slices and cat: its width the
    op's ``rotary_dim``) and the two float-cache ``scatter_into`` writes (``rotary_cache_pattern``) become one
    ``lowbit::rotary_write_kv`` node whose rotated queries the attention reads. Why: in a decode step they were
    four launch-bound kernels per layer (Inductor's rotary of q and of k, two ``_write_rows``: 21.6 µs per step over
    the 7B-shaped stack's 4 layers on the H200, ``profile_decode``); a partial rotary added its slices and cats. A
    decode-sdpa attention takes a whole-head rotary inside its own kernel (``rotary_decode_sdpa``). A packed
    (quantized) cache is written by ``cache_attention`` (its rotary goes into that node:
    ``_fuse_packed_cache_writes``) and a QDQ'd key is no rotary's direct reader: neither matches here. A layer this
    leaves has its two float-cache writes on one ``write_kv`` (``_fuse_cache_writes``). At run time operands the
    kernel cannot read run the reference."""
    for attn in list(gm.graph.nodes):
        found = rotary_cache_pattern(attn)
        if found is None:
            written_out = _written_out_rotary(attn)  # (read before the writes it names are replaced)
            writes = "one write_kv" if _fuse_cache_writes(gm, attn, types, report, pdl) else "two scatters"
            if written_out is not None:
                report["unfused"][written_out.name] = (
                    f"rotary + k/v cache write: the keys written are %{written_out.name} ({_op_name(written_out)}), no "
                    "IR rotate-half rotary, whole or partial (rotary_write_kv's kernel turns those only): an "
                    "adjacent-pair rotary (GPT-J, Cohere), none (a NoPE layer, GPT-2's learned positions, Bloom's "
                    "ALiBi), or an op after the rotary (a fake-quantized key's dequantize); its ops run as captured, "
                    f"the k/v cache writes as {writes}")
            continue
        q_rot, k_rot, k_write, v_write = found["q_rot"], found["k_rot"], found["k_write"], found["v_write"]
        rotary_dim = found["rotary_dim"]
        why = plan_rotary_cache(_type_of(q_rot, types), _type_of(k_rot, types), rotary_dim)
        if why is not None:
            report["unfused"][k_rot.name] = f"rotary + k/v cache write: {why}"
            continue
        operands = (found["q"], found["k"], v_write.args[3], found["cos"], found["sin"], k_write.args[0],
                    v_write.args[0], k_write.args[2])
        what = (f"rotary %{q_rot.name}, %{k_rot.name} + cache writes %{k_write.name}, %{v_write.name}"
                + (f" (partial: {rotary_dim} channels of each head)" if rotary_dim is not None else ""))
        with gm.graph.inserting_before(attn):
            # the split attention kernel's own rotary turns whole heads: a partial one keeps its attention apart
            if attn.target in (_kernel_attention, _kernel_attention_pdl) and rotary_dim is None:
                # a decode step's attention kernel rotates q and writes the slot itself: one launch fewer
                mask = attn.args[3] if len(attn.args) > 3 else attn.kwargs.get("mask")
                causal = slot_causal_mask(mask)
                fused = gm.graph.call_function(torch.ops.lowbit.rotary_decode_sdpa.default, (
                    *operands, mask, attn.kwargs.get("scale"), attn.kwargs.get("is_causal", False),
                    attn.kwargs.get("enable_gqa", False), pdl, attn.kwargs.get("merge_in_split", False), causal))
                attn.replace_all_uses_with(fused)
                report["rotary_cache"][fused.name] = (f"{what} + attention %{attn.name} (decode-sdpa at one row"
                                                      + ("; a prefill causal over its own slots)" if causal else ")"))
                gm.graph.erase_node(attn)
            else:
                fused = gm.graph.call_function(torch.ops.lowbit.rotary_write_kv.default, (*operands, pdl, rotary_dim))
                attn.args = (fused, *attn.args[1:])
                report["rotary_cache"][fused.name] = what
        for dead in (k_write, v_write, *found["erased"]):
            gm.graph.erase_node(dead)


def _fuse_packed_cache_writes(gm: torch.fx.GraphModule, types: dict[str, TensorType] | None,
                              report: dict[str, dict[str, str]]) -> None:
    """Each packed-cache attention on the decode kernel (``_CACHE_ATTENTION``) writes a decode step's keys and values
    in one ``write_packed_kv`` launch (``cache_attention_decode``'s ``fused_write``), and takes its layer's
    ``rotary(q)`` and ``rotary(k)`` (whole heads, or a partial rotary's slices and cat: ``_rotated_heads``) into it:
    the rotaries' nodes are erased and their heads, ``cos`` and ``sin`` become the node's operands. Why: a decode
    step's packed write was ``cache_update``'s ~74 aten ops per layer, its float candidates ~25 and the two rotaries
    ~10 more, each a launch (``tests/test_packed_kv_write.py`` checks the fused form). A rotary
    ``plan_rotary_cache`` refuses stays as captured, reported; at run time operands the kernel cannot read take the
    reference (``write_packed_kv_unsupported``)."""
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not _CACHE_ATTENTION:
            continue
        q_heads, k_heads = _rotated_heads(node.args[0], node), _rotated_heads(node.args[1], node)
        if q_heads is None or k_heads is None:
            report["packed_write"][node.name] = "packed k/v cache write (no rotary)"
            continue
        q_rot, k_rot = node.args[0], node.args[1]
        if k_heads["cos"] is not q_heads["cos"] or k_heads["sin"] is not q_heads["sin"] \
                or k_heads["rotary_dim"] != q_heads["rotary_dim"]:
            report["packed_write"][node.name] = "packed k/v cache write (no rotary)"
            report["unfused"][k_rot.name] = ("rotary + packed k/v cache write: q and k rotated by different "
                                              "cos/sin or widths")
            continue
        why = plan_rotary_cache(_type_of(q_rot, types), _type_of(k_rot, types), q_heads["rotary_dim"])
        if why is not None:
            report["packed_write"][node.name] = "packed k/v cache write (no rotary)"
            report["unfused"][k_rot.name] = f"rotary + packed k/v cache write: {why}"
            continue
        node.args = (q_heads["x"], k_heads["x"], *node.args[2:])
        node.kwargs = {**node.kwargs, "cos": q_heads["cos"], "sin": q_heads["sin"],
                       "rotary_dim": q_heads["rotary_dim"]}
        report["packed_write"][node.name] = (f"rotary %{q_rot.name}, %{k_rot.name} + packed k/v cache write"
                                             + (f" (partial: {q_heads['rotary_dim']} channels of each head)"
                                                if q_heads["rotary_dim"] is not None else ""))
        for dead in (*k_heads["nodes"], *q_heads["nodes"]):
            gm.graph.erase_node(dead)


def _outer_product(node: torch.fx.Node, types: dict[str, TensorType] | None) -> bool:
    """Whether a ``matmul`` node multiplies ``[..., m, 1]`` by ``[..., 1, n]`` (both operands at least 2-D), which
    a broadcast multiply computes exactly (one product per element, nothing summed). Llama-style rotary makes its
    angles so (``inv_freq @ positions`` in fp32): captured on CUDA, the decode step ran it as a cuBLAS SIMT SGEMM
    (3.1-3.3 µs per step on the H200) plus a kernel copying its operand."""
    a, b = node.args[0], node.args[1]
    if types is None or not isinstance(a, torch.fx.Node) or not isinstance(b, torch.fx.Node):
        return False
    ta, tb = types.get(a.name), types.get(b.name)
    return (ta is not None and tb is not None and ta.rank >= 2 and tb.rank >= 2 and ta.shape[-1] == 1
            and tb.shape[-2] == 1)


def retarget(gm: torch.fx.GraphModule, types: dict[str, TensorType] | None = None,
             device: str | torch.device | None = None, epilogues: str = "gated", norm_residual: bool = True,
             pdl: bool = False, rotary_cache: bool = True, decode: bool = True,
             float_gemv: bool = True, merge_in_split: bool = False) -> dict[str, dict[str, str]]:
    """Point every qlinear (and online ``hadamard``) the kernels take at its op; returns ``{"kernels": {node:
    form}, "fallback": {node: reason}, "layout": {node: "words"}}`` (weight-only nodes whose buffers now hold
    the decode layout). ``types``: the lowered graph's value types by name (a hadamard's row length);
    ``device``: where the hadamard tables go (the module's device); ``epilogues``: which activations after a
    qlinear its kernel computes (``EPILOGUES``); ``norm_residual``: fold RMSNorms and residual adds into the
    weight-only linears around them (``_fuse_norm_residual``), residual adds into the A8 linears before them
    (``_fuse_residual_a8``) and the RMSNorm + quantize between two A8 linears into both (``_fuse_norm_quant_a8``);
    ``pdl``: weight-only, float and A8 linears (and the A8 step's ``rms_norm_quant``) as opaque ops whose M = 1
    launches use programmatic dependent launch (``weight_only_linear_pdl``, ``a8_linear_pdl``), as do the float
    cache's decode attention (``decode_sdpa_pdl``) and a packed cache's write and attention (``_cache_attention``);
    ``rotary_cache``:
    each layer's rotary of q and k and its float-cache writes in one ``rotary_write_kv`` (``_fuse_rotary_cache``),
    a layer without one its two cache writes in one ``write_kv``, a packed cache's decode-step write (and rotary) in
    one ``write_packed_kv`` (``_fuse_packed_cache_writes``; off: ``cache_update``'s ops, the rotaries as captured);
    ``decode``: the graph runs decode steps (a generation step graph), so its attention goes to ``decode_sdpa`` at one
    query row. An encoder or a logits graph never decodes: its attention stays SDPA and the report does not list it
    (it said "decode-sdpa" for MiniLM); ``float_gemv`` (with ``decode``): bf16/fp16 linears on ``float_linear``, whose
    one-row GEMV takes the same epilogue and norm/residual fusions as the weight-only ones; ``merge_in_split``: the
    decode attention merges in its split kernel, a packed cache's (``_cache_attention``: two launches a layer, not
    three) and, with ``pdl``, a float cache's (``decode_sdpa_pdl``, ``rotary_decode_sdpa``: one launch, not two)."""
    import lowbit.kernels  # noqa: F401 - registers torch.ops.lowbit.*
    from lowbit.ir.kvcache import cache_attention, cache_attention_into
    from lowbit.ir.normquant import qlinear_q, rms_norm_quant

    report: dict[str, dict[str, str]] = {"kernels": {}, "fallback": {}, "layout": {}, "unfused": {}, "norm_quant": {},
                                         "attention": {}, "rotary_cache": {}, "cache_write": {}, "outer": {},
                                         "packed_write": {}}
    kinds = EPILOGUES[epilogues]
    tables: dict[int, torch.fx.Node] = {}
    a8: dict[torch.fx.Node, Plan] = {}
    words: dict[torch.fx.Node, tuple[str, int]] = {}
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target is ir_ops.matmul and _outer_product(node, types):
            node.target = torch.mul
            report["outer"][node.name] = "matmul over a contraction of 1: a broadcast multiply"
            continue
        if node.op == "call_function" and node.target is ir_hadamard:
            why = plan_hadamard(_type_of(node, types))
            if why is not None:
                report["fallback"][node.name] = f"hadamard: {why}"
                continue
            from lowbit.kernels.hadamard import hadamard_factors

            n = int(types[node.name].shape[-1])  # type: ignore[index]
            if n not in tables:
                attr = f"_hadamard_table_{n}"
                gm.register_buffer(attr, hadamard_factors(n, device or "cpu"))
                with gm.graph.inserting_before(node):  # its first reader
                    tables[n] = gm.graph.get_attr(attr)
                tables[n].meta["hadamard_n"] = n
            node.target = _kernel_hadamard
            node.args = (node.args[0], tables[n])
            report["kernels"][node.name] = "hadamard"
            continue
        if node.op == "call_function" and node.target is rms_norm_quant:
            # RMSNorm + per-token quantization in one kernel where it takes the node; else the reference, reported
            why = _plan_norm_quant_node(gm, node, types)
            if why is not None:
                report["fallback"][node.name] = f"rms-norm-quant: {why}"
                continue
            node.target = _kernel_rms_norm_quant_pdl if pdl else _kernel_rms_norm_quant
            report["norm_quant"][node.name] = "rms-norm-quant"
            continue
        if node.op == "call_function" and node.target is qlinear_q:
            qweight = _operand(gm, node, 2, "qweight")
            plan = plan_qlinear(node.kwargs, qweight if isinstance(qweight, torch.Tensor) else None,
                                _operand(gm, node, 4, "w_zero_point") is not None, False)
            if plan.form is None or plan.form.op != "a8_linear":
                report["fallback"][node.name] = plan.reason or "no a8 kernel for this form"
                continue
            wg, ag, bn = plan.static["w_group"], plan.static["a_group"], plan.static.get("w_block_n", 0)
            node.target = _kernel_qlinear_q(wg, ag, "", bn, pdl)
            epilogue = _fuse_epilogue(gm, node, (2, 3, 4, 5),
                                      lambda e, wg=wg, ag=ag, bn=bn: _kernel_qlinear_q(wg, ag, e, bn, pdl),
                                      _tile_kinds(kinds, bn))
            report["kernels"][node.name] = plan.form.name + (f"+{epilogue}" if epilogue else "")
            continue
        if node.op == "call_function" and node.target is ir_ops.attention and decode:
            why = plan_attention(node, types)
            if why is not None:  # never a decode-sdpa call: torch's SDPA, as the torch backend runs it
                report["fallback"][node.name] = f"decode-sdpa: {why}"
                continue
            # decided per call: one query row (a decode step) or not
            node.target = _kernel_attention_pdl if pdl else _kernel_attention
            if pdl and merge_in_split:
                node.kwargs = {**node.kwargs, "merge_in_split": True}
            report["attention"][node.name] = "decode-sdpa at one query row and small batches, SDPA otherwise"
            continue
        if node.op == "call_function" and node.target in (cache_attention, cache_attention_into):
            why, alibi = plan_cache_attention(node, types, gm)
            if why is not None:
                report["fallback"][node.name] = f"cache-attention: {why}"
                # the reference as before, out of place: torch.compile traces it (the torch backend's in-place
                # decode would turn into a functionalized write and a copy of the whole cache)
                node.target = cache_attention
                continue
            if alibi is not None:  # the ALiBi slopes its bias was checked to be
                slopes, bias_dtype = alibi
                attr = f"_alibi_slopes_{node.name}"
                gm.register_buffer(attr, slopes.to(device or "cpu"))
                with gm.graph.inserting_before(node):
                    node.kwargs = {**node.kwargs, "alibi_slopes": gm.graph.get_attr(attr), "bias_dtype": bias_dtype}
            # decode steps on the quantized-cache kernel (outside torch.compile: it launches per call shape); their
            # packed write on write_packed_kv with rotary_cache (_fuse_packed_cache_writes), else cache_update's ops
            node.target = _CACHE_ATTENTION
            node.kwargs = {**node.kwargs, "fused_write": rotary_cache, "pdl": pdl, "merge_in_split": merge_in_split}
            report["kernels"][node.name] = "cache-attention"
            continue
        if (node.op == "call_function" and node.target is ir_ops.linear and decode and float_gemv
                and _float_gemv_weight(gm, node)):
            node.target = _kernel_float_linear("", pdl)
            epilogue = _fuse_epilogue(gm, node, (), lambda e: _kernel_float_linear(e, pdl), kinds,
                                      interleave=False)
            report["kernels"][node.name] = "float-gemv" + (f"+{epilogue}" if epilogue else "")
            words[node] = (epilogue, _kernel_float_linear_add_norm(pdl))
            continue
        if node.op != "call_function" or node.target is not qlinear:
            continue
        qweight = _operand(gm, node, 1, "qweight")
        plan = plan_qlinear(node.kwargs, qweight if isinstance(qweight, torch.Tensor) else None,
                            _operand(gm, node, 3, "w_zero_point") is not None,
                            _operand(gm, node, 5, "a_scale") is not None)
        if plan.form is None:
            report["fallback"][node.name] = plan.reason
            continue
        op, wg, ag = plan.form.op, plan.static["w_group"], plan.static["a_group"]
        bn = plan.static.get("w_block_n", 0)
        node.target = _kernel_qlinear(op, wg, ag, "", pdl, bn)
        epilogue = _fuse_epilogue(gm, node, (1, 2, 3, 4),
                                  lambda e, op=op, wg=wg, ag=ag, bn=bn: _kernel_qlinear(op, wg, ag, e, pdl, bn),
                                  _tile_kinds(kinds, bn))
        report["kernels"][node.name] = plan.form.name + (f"+{epilogue}" if epilogue else "")
        if op == "a8_linear" and not epilogue:  # (hadamard_a8_linear has no epilogue)
            a8[node] = plan
        if op == "weight_only_linear" and _repack_words(gm, node, wg):
            report["layout"][node.name] = "words"
            words[node] = (epilogue, _kernel_qlinear_add_norm(wg, pdl))
    _fuse_hadamard_a8(gm, a8, report)
    if norm_residual:
        _fuse_norm_residual(gm, words, report)
        _fuse_residual_a8(gm, report)
        _fuse_norm_quant_a8(gm, report, pdl)
    if rotary_cache:
        _fuse_rotary_cache(gm, types, report, pdl)
        _fuse_packed_cache_writes(gm, types, report)
    gm.recompile()
    return report


def _route_experts(gm: torch.fx.GraphModule, types: dict[str, TensorType], device: str | torch.device | None,
                   options: dict[str, Any], report: dict[str, dict[str, str]], grouped: bool = False,
                   blocked: bool = True) -> None:
    """Retarget each routed MoE layer's expert modules (``RoutedExperts.experts``: the torch backend's lowering of
    each expert's nodes) as the main module, adding their nodes to ``report``; their calls run outside
    ``torch.compile``, whose graph ``nonzero`` (rows per expert, known only on the device) would break per expert.
    ``grouped``: a layer whose experts ``plan_grouped`` takes runs ``moe_gate_up`` + ``moe_down`` on decode-sized
    calls (``GroupedExperts.takes``) instead of the dense form or ``nonzero``, and with ``blocked`` larger calls
    the expert-blocked ops (``report["grouped"]`` says per layer which, and why not)."""
    from lowbit.backends.grouped_experts import plan_grouped

    report.setdefault("grouped", {})
    for module in gm.modules():
        if not isinstance(module, RoutedExperts):
            continue
        for expert in module.experts:
            for key, found in retarget(expert, types, device, **options).items():
                report[key].update(found)
        if grouped:
            plan = plan_grouped(list(module.experts), module.out_dtype, module.out_features, module.most_picks,
                                blocked)
            if isinstance(plan, str):
                report["grouped"][module.prefix] = f"kept dense under capture: {plan}"
            else:
                module.grouped = plan
                g, d = plan.gate_up_form, plan.down_form
                above = (f"expert-blocked {'above' if plan.max_rows else 'from 1 row'} ({plan.slots} slots a token)"
                         if plan.blocked else
                         "expert-blocked off" if plan.blocked_off == "off" else f"not blocked: {plan.blocked_off};")
                rows = f"grouped at <= {plan.max_rows} rows, " if plan.max_rows else "no per-row calls, "
                report["grouped"][module.prefix] = (f"{rows}{above} ({g.op} "
                                                    f"{g.qdtype or 'float'}{f' g{g.group}' if g.group else ''}, down "
                                                    f"{d.qdtype or 'float'}{f' g{d.group}' if d.group else ''})")
        module.forward = torch.compiler.disable(module.forward)  # type: ignore[method-assign]


def offload_replaced(gm: torch.fx.GraphModule, graphs: tuple[Graph, ...]) -> int:
    """Move to host memory every IR parameter tensor on the GPU that the lowered module no longer reads (the
    stored int4 form of weights repacked into the decode layout); returns how many were moved.

    The IR keeps the stored form (``.graph`` is still printable, saveable, re-lowerable), but the device must
    hold one copy of each weight: without this a W4A16 model kept the stored codes beside the repacked words
    on the GPU (1336 MiB against 919 for the 7B-shaped 4-layer stack, measured on the H200)."""
    # a semi-structured sparse buffer (a 2:4 weight) is a wrapper subclass without storage of its own: skipped, so
    # the dense IR weight it replaced moves to the host like a repacked one
    live = {t.untyped_storage().data_ptr() for t in gm.buffers()
            if t.is_cuda and not isinstance(t, torch.sparse.SparseSemiStructuredTensor)}
    moved: dict[int, torch.Tensor] = {}
    for g in graphs:
        for v in g.params.values():
            t = v.data
            if t is None or not t.is_cuda or t.untyped_storage().data_ptr() in live:
                continue
            if id(t) not in moved:
                moved[id(t)] = t.to("cpu")
            v.data = moved[id(t)]
    return len(moved)


class TritonCompiled(TorchCompiled):
    """The lowered module: ``report`` says which qlinear nodes run which kernel and which fell back, and why."""

    def __init__(self, graph: Graph, device: str | torch.device | None = None, *, compile: bool = True,
                 cuda_graphs: bool = False, donated: set[str] | frozenset[str] = frozenset(),
                 semi_structured: bool = False, sparse_library: str = "auto", epilogues: str = "gated",
                 norm_residual: bool = True, pdl: bool = False, rotary_cache: bool = True,
                 float_gemv: bool = True, merge_in_split: bool = False, routed_experts: bool = True,
                 grouped_experts: bool = True, blocked_experts: bool = True) -> None:
        """``routed_experts``: each MoE layer's experts run only on the tokens routed to them, each expert's lowered
        nodes retargeted to the kernels as the rest (``_route_experts``); ``routed_report`` names each layer and
        why one stays dense. ``grouped_experts``: a routed layer's decode-sized calls run its picked experts in two
        launches (``lowbit.backends.grouped_experts``), not the dense form (in a capture) or ``nonzero``;
        ``blocked_experts``: its larger calls too, on the expert-blocked ops."""
        from lowbit.ir.fusion import fuse_qlinear
        from lowbit.ir.merge import merge_horizontal
        from lowbit.ir.normquant import fuse_norm_quant
        from lowbit.ir.rewrite import eliminate_dead_code

        fused = graph.clone()
        # the registry runs fuse-qlinear, merge-linears and fuse-norm-quant first; a direct lower() may not have.
        # Dead nodes go after each: the next step must not see replaced nodes as readers, and the FX module built
        # below then holds no unread op (a dead dequantize or activation QDQ would count as a weight's or a
        # rotation's second reader in retarget)
        # routed MoE layers: no merge across experts (one expert's gate and up still merge), and a merge a pass made
        # across them is split back (separate_experts), as each expert runs on its own rows
        def merge_linears(g: Graph) -> None:
            merge_horizontal(g, partition=expert_partition if routed_experts else None)
            if routed_experts:
                separate_experts(g)

        for fuse in (fuse_qlinear, merge_linears, fuse_norm_quant):
            fuse(fused)
            eliminate_dead_code(fused)
        # float 2:4 linears become semi-structured sparse tensors (torch_backend; torch.compile traces the subclass)
        super().__init__(fused, device, keep_packed=True, donated=donated, semi_structured=semi_structured,
                         sparse_library=sparse_library, routed_experts=routed_experts)
        types = {v.name: v.type for v in [*fused.inputs, *(v for nd in fused.nodes for v in nd.outputs)]
                 if isinstance(v.type, TensorType)}  # (a graph input is what a first norm or rotation may read)
        options = dict(epilogues=epilogues, norm_residual=norm_residual, pdl=pdl, rotary_cache=rotary_cache,
                       decode=graph.meta.get("generation") is not None, float_gemv=float_gemv,
                       merge_in_split=merge_in_split)
        self.report = retarget(self.gm, types, self.device, **options)
        _route_experts(self.gm, types, self.device, options, self.report, grouped_experts, blocked_experts)
        self.host_copies = offload_replaced(self.gm, (graph, fused))
        self.buffer_bytes = buffer_bytes(self.gm)  # after the decode-layout repack: what the device holds
        self.report["merged"] = {n.output.name: ", ".join(n.meta["merged"]) for n in fused.nodes
                                 if n.meta.get("merged")}
        # torch.compile (and its CUDA graphs) cannot trace Triton's CPU interpreter: the module then runs eagerly,
        # and the report says which options were not applied rather than leaving them silently ignored
        self.report["not_applied"] = {}
        device = self.device if self.device is not None else params_device(fused)
        if device.type != "cuda":
            for option, on in (("compile", compile), ("cuda_graphs", cuda_graphs)):
                if on:
                    self.report["not_applied"][option] = (f"{option}=true is not applied on device "
                                                          f"{device.type!r} (Triton's CPU interpreter): "
                                                          "the module runs eagerly")
            if self.report["not_applied"].get("cuda_graphs"):
                warnings.warn(f"backend 'triton': {self.report['not_applied']['cuda_graphs']}", stacklevel=3)
            compile = cuda_graphs = False
        self.compiled = compile
        self._run: Callable[..., Any] = self.gm
        if compile:
            self._run = torch.compile(self.gm, mode="reduce-overhead" if cuda_graphs else None)

    def report_text(self) -> str:
        lines = [(f"triton: {len(self.report['kernels'])} nodes on kernels, "
                 f"{len(self.report['fallback'])} on the reference; the module holds "
                 f"{self.buffer_bytes / 2**20:.1f} MiB (weights as stored, not dequantized)")]
        lines += [f"  {why}" for why in self.report.get("not_applied", {}).values()]
        merged = self.report.get("merged", {})
        if merged:
            n = sum(len(v.split(", ")) for v in merged.values())
            lines.append(f"  merged: {len(merged)} wide linears replace {n} (same input, same scheme)")
        if self.report.get("norm_quant"):
            lines.append(f"  rms_norm + activation quantize fused: {len(self.report['norm_quant'])} norms")
        if self.report.get("attention"):
            lines.append(f"  attention: {len(self.report['attention'])} nodes on decode-sdpa at one query row "
                         "(float cache, batch x kv heads <= 64), SDPA otherwise")
        by_form: dict[str, int] = {}
        for form in self.report["kernels"].values():
            by_form[form] = by_form.get(form, 0) + 1
        lines += [f"  {form}: {n}" for form, n in sorted(by_form.items())]
        if self.report["layout"]:
            lines.append(f"  decode layout (int32 words): {len(self.report['layout'])} weight-only nodes")
        lines += [f"  reference: %{name}: {why}" for name, why in self.report["fallback"].items()]
        if any("float32" in why for why in self.report["fallback"].values()):
            lines.append(f"  {FLOAT32_HINT}")
        if self.report.get("rotary_cache"):
            fused = self.report["rotary_cache"].values()
            into = sum("+ attention" in what for what in fused)
            lines.append(f"  rotary + k/v cache write fused: {len(fused)} layers on rotary_write_kv"
                         + (f" ({into} of them inside their decode-sdpa attention at one query row)" if into else ""))
        if self.report.get("cache_write"):
            lines.append(f"  k/v cache writes fused: {len(self.report['cache_write'])} layers without a rotary on "
                         "write_kv (keys and values in one launch)")
        if self.report.get("packed_write"):
            fused = self.report["packed_write"].values()
            rotated = sum(what.startswith("rotary") for what in fused)
            lines.append(f"  packed k/v cache write fused: {len(fused)} layers on write_packed_kv (a decode step's "
                         "quantized keys and values and float window in one launch"
                         + (f"; the rotary of q and k inside for {rotated} of them)" if rotated else ")"))
        if self.report.get("outer"):
            lines.append(f"  matmul over a contraction of 1 as a broadcast multiply: {len(self.report['outer'])} nodes")
        lines += [f"  not fused at %{name}: {why}" for name, why in self.report["unfused"].items()]
        routed = [p for p, what in self.routed_report.items() if what.startswith("routed")]
        if routed:
            lines.append(f"  routed experts: {len(routed)} MoE layers run each expert on its routed tokens only, on "
                         f"its kernels ({', '.join(routed)}); routed_experts=false runs them densely")
        lines += [f"  {p} {what}" for p, what in self.routed_report.items() if not what.startswith("routed")]
        lines += [f"  {p} {what}" for p, what in self.report.get("grouped", {}).items()]
        lines += report_lines(self.sparse_report)
        return "\n".join(lines)

    @torch.no_grad()
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        # checked as the torch backend checks them: an empty sequence or an id past the vocabulary was a raw
        # reshape/IndexError from inside the module, float ids an embedding error, a sequence beyond the captured
        # range ran silently
        return self._run(*self.bind_inputs(args, kwargs))


def lower(graph: Graph, device: str | None = None, *, compile: bool = True, cuda_graphs: bool = False,
          semi_structured: bool = False, sparse_library: str = "auto", epilogues: str = "gated",
          norm_residual: bool = True, pdl: bool = True, rotary_cache: bool = True,
          float_gemv: bool = True, merge_in_split: bool = False, routed_experts: bool = True,
          grouped_experts: bool = True, blocked_experts: bool = True) -> TritonCompiled:
    """Build the Triton runner; no CUDA device (and no ``TRITON_INTERPRET=1``) is an error naming the other
    backends. ``compile``: run under ``torch.compile`` (default); ``cuda_graphs``: its ``reduce-overhead`` mode;
    ``semi_structured``: float 2:4 linears on cuSPARSELt/CUTLASS (``sparse_library``) where they qualify;
    ``epilogues``: the activations fused into their linear's kernel (``EPILOGUES``); ``norm_residual``: RMSNorms
    and residual adds fused into the weight-only linears around them; ``pdl``: the one-row launches of a decode
    step's linears (weight-only, float, A8 and the A8 norm + quantize) use programmatic dependent launch where the
    GPU has it (``pdl_supported``); ``rotary_cache``:
    each layer's rotary of q and k and its float KV-cache writes in one kernel (a layer without rotary: its k and v
    writes in one; a packed cache: its decode-step write and the rotary in one); ``float_gemv``: a generation step's
    bf16/fp16 linears on lowbit's one-row GEMV (``float_linear``) instead of cuBLAS, so they take those fusions too;
    ``merge_in_split``: the decode attention's merge in its split kernel, not a launch of its own (off by default:
    slower where measured, ``TritonBackendOptions.merge_in_split``);
    ``routed_experts``: each MoE layer's experts run on their kernels only over the tokens routed to them;
    ``grouped_experts``: a routed layer's decode-sized calls (in a CUDA-graph capture, or on the GPU) run its picked
    experts as two grouped launches that read the router's picks on the device, not the dense form or ``nonzero``;
    ``blocked_experts``: its larger calls (a prefill) on the expert-blocked ones (each expert's weights read once)."""
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if not interpret and not torch.cuda.is_available():
        raise TritonUnavailable(NO_CUDA)
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if torch.device(dev).type != "cuda" and not interpret:
        raise TritonUnavailable(f"backend 'triton' runs on CUDA, not {dev!r}: give device='cuda', or use "
                                "backend='torch' on the CPU")
    # a step graph's cache inputs are handed over by the generator (written in place), as on the torch backend
    donated = set(graph.meta.get("generation", {}).get("cache_inputs", ()))
    return TritonCompiled(graph, dev, compile=compile, cuda_graphs=cuda_graphs,
                          donated=donated, semi_structured=semi_structured, sparse_library=sparse_library,
                          epilogues=epilogues, norm_residual=norm_residual, pdl=pdl and pdl_supported(dev),
                          rotary_cache=rotary_cache, float_gemv=float_gemv, merge_in_split=merge_in_split,
                          routed_experts=routed_experts, grouped_experts=grouped_experts,
                          blocked_experts=blocked_experts)


def pdl_supported(device: str | torch.device) -> bool:
    """Programmatic dependent launch needs Hopper or newer (``griddepcontrol``, sm_90); under the interpreter the
    PDL ops run (their kernels launch plainly there), so the CPU suite tests the path an H200 takes."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return os.environ.get("TRITON_INTERPRET") == "1"
    return torch.cuda.get_device_capability(dev)[0] >= 9
