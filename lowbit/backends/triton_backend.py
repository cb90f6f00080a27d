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
``mode="reduce-overhead"`` (one CUDA graph per static shape).

Registered in ``lowbit.backends.registry`` (``TritonBackendOptions``: ``compile``, ``cuda_graphs``); the registry
checks for CUDA (or the interpreter) before the model is loaded.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx

from lowbit.backends.semi_structured import report_lines
from lowbit.backends.torch_backend import TorchCompiled
from lowbit.ir.graph import Graph
from lowbit.ir.quant import qlinear

__all__ = ["KERNEL_FORMS", "NO_CUDA", "TritonCompiled", "lower", "plan_qlinear"]

NO_CUDA = ("backend 'triton' runs lowbit's Triton kernels and needs a CUDA GPU, and none is visible: use "
           "backend='torch' (the CPU/CUDA reference) or backend='onnxruntime' (MatMulNBits / integer GEMM on CPU)")

_PACKED = {"int4", "uint4", "int3", "int2"}
_KERNEL_DTYPES = (torch.bfloat16, torch.float16)


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
    KernelForm("w4a16", "weight_only_linear", frozenset(_PACKED), None, 16, True),
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


def _runs_kernel(x: torch.Tensor) -> bool:
    return x.dtype in _KERNEL_DTYPES and (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")


def _kernel_qlinear(op: str, w_group: int, a_group: int) -> Callable[..., torch.Tensor]:
    """The FX target replacing one qlinear: its kernel, or the reference for an input the kernel cannot read."""

    def run(x, qweight, w_scale, w_zero_point=None, bias=None, a_scale=None, a_zero_point=None, **kw):
        if not _runs_kernel(x):
            if qweight.dtype == torch.int32:  # repacked at lowering: the reference reads the stored form
                from lowbit.kernels.weight_only import unpack_words

                qweight = unpack_words(qweight, kw["w_qdtype"], x.shape[-1], w_group)
            return qlinear(x, qweight, w_scale, w_zero_point, bias, a_scale, a_zero_point, **kw)
        if op == "weight_only_linear":
            return torch.ops.lowbit.weight_only_linear(x, qweight, w_scale, w_zero_point, bias, kw["w_qdtype"],
                                                       w_group)
        return torch.ops.lowbit.a8_linear(x, qweight, w_scale, w_zero_point, bias, kw["w_qdtype"], w_group,
                                          kw["a_qdtype"], a_group)

    run.__name__ = f"triton_{op}"
    return run


def _cache_attention(*args: Any, **kwargs: Any) -> Any:
    from lowbit.kernels.decode_attention import cache_attention_decode

    return cache_attention_decode(*args, **kwargs)


_CACHE_ATTENTION = torch.compiler.disable(_cache_attention)


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

    nodes = [node.args[i] if len(node.args) > i else node.kwargs.get(name)
             for i, name in ((1, "qweight"), (2, "w_scale"), (3, "w_zero_point"))]
    for a in nodes:  # the weight's dequantize that fuse-qlinear replaced may linger unused: it would read words
        for u in list(a.users) if isinstance(a, torch.fx.Node) else ():
            if u is not node and not u.users and getattr(u.target, "__name__", "") == "dequantize":
                gm.graph.erase_node(u)
    for a in nodes:
        if a is not None and not (isinstance(a, torch.fx.Node) and a.op == "get_attr" and len(a.users) == 1):
            return False
    qw, s, z = (getattr(gm, a.target) if a is not None else None for a in nodes)
    words, s2, z2 = pack_words(qw, s, z, node.kwargs["w_qdtype"], group)
    if words.dtype != torch.int32:
        return False
    for a, t in zip(nodes, (words, s2, z2), strict=True):
        if a is not None:
            gm.register_buffer(a.target, t)
    return True


def retarget(gm: torch.fx.GraphModule) -> dict[str, dict[str, str]]:
    """Point every qlinear the kernels take at its op; returns ``{"kernels": {node: form}, "fallback":
    {node: reason}, "layout": {node: "words"}}`` (weight-only nodes whose buffers now hold the decode layout)."""
    import lowbit.kernels  # noqa: F401 - registers torch.ops.lowbit.*

    from lowbit.ir.kvcache import cache_attention

    report: dict[str, dict[str, str]] = {"kernels": {}, "fallback": {}, "layout": {}}
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is cache_attention:
            # decode steps on the quantized-cache kernel (outside torch.compile: it launches per call shape)
            node.target = _CACHE_ATTENTION
            report["kernels"][node.name] = "cache-attention"
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
        node.target = _kernel_qlinear(plan.form.op, plan.static["w_group"], plan.static["a_group"])
        report["kernels"][node.name] = plan.form.name
        if plan.form.op == "weight_only_linear" and _repack_words(gm, node, plan.static["w_group"]):
            report["layout"][node.name] = "words"
    gm.recompile()
    return report


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
                 semi_structured: bool = True, sparse_library: str = "auto") -> None:
        from lowbit.ir.fusion import fuse_qlinear

        fused = graph.clone()
        fuse_qlinear(fused)  # the registry runs the fuse-qlinear pass first; a direct lower() may not have
        # float 2:4 linears become semi-structured sparse tensors (torch_backend; torch.compile traces the subclass)
        super().__init__(fused, device, keep_packed=True, donated=donated, semi_structured=semi_structured,
                         sparse_library=sparse_library)
        self.report = retarget(self.gm)
        self.host_copies = offload_replaced(self.gm, (graph, fused))
        self.compiled = compile
        self._run: Callable[..., Any] = self.gm
        if compile:
            self._run = torch.compile(self.gm, mode="reduce-overhead" if cuda_graphs else None)

    def report_text(self) -> str:
        lines = [(f"triton: {len(self.report['kernels'])} qlinear nodes on kernels, "
                 f"{len(self.report['fallback'])} on the reference")]
        by_form: dict[str, int] = {}
        for form in self.report["kernels"].values():
            by_form[form] = by_form.get(form, 0) + 1
        lines += [f"  {form}: {n}" for form, n in sorted(by_form.items())]
        if self.report["layout"]:
            lines.append(f"  decode layout (int32 words): {len(self.report['layout'])} weight-only nodes")
        lines += [f"  reference: %{name}: {why}" for name, why in self.report["fallback"].items()]
        lines += report_lines(self.sparse_report)
        return "\n".join(lines)

    @torch.no_grad()
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        names = [v.name for v in self.graph.inputs]
        if kwargs:
            extra = set(kwargs) - set(names)
            if extra:
                raise TypeError(f"unexpected inputs {sorted(extra)}; the graph takes {names}")
            args = tuple(args) + tuple(kwargs[n] for n in names[len(args):])
        if len(args) != len(names):
            raise TypeError(f"the graph takes {len(names)} inputs ({', '.join(names)}), got {len(args)}")
        if self.device is not None:
            args = tuple(a.to(self.device) if isinstance(a, torch.Tensor) else a for a in args)
        return self._run(*args)


def lower(graph: Graph, device: str | None = None, *, compile: bool = True, cuda_graphs: bool = False,
          semi_structured: bool = True, sparse_library: str = "auto") -> TritonCompiled:
    """Build the Triton runner; no CUDA device (and no ``TRITON_INTERPRET=1``) is an error naming the other
    backends. ``compile``: run under ``torch.compile`` (default); ``cuda_graphs``: its ``reduce-overhead`` mode;
    ``semi_structured``: float 2:4 linears on cuSPARSELt/CUTLASS (``sparse_library``) where they qualify."""
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if not interpret and not torch.cuda.is_available():
        raise RuntimeError(NO_CUDA)
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if torch.device(dev).type != "cuda" and not interpret:
        raise RuntimeError(f"backend 'triton' runs on CUDA, not {dev!r}: " + NO_CUDA.split(": ", 1)[1])
    # a step graph's cache inputs are handed over by the generator (written in place), as on the torch backend
    donated = set(graph.meta.get("generation", {}).get("cache_inputs", ()))
    return TritonCompiled(graph, dev, compile=compile and torch.device(dev).type == "cuda", cuda_graphs=cuda_graphs,
                          donated=donated, semi_structured=semi_structured, sparse_library=sparse_library)
