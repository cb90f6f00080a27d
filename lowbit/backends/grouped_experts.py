"""A routed MoE layer's experts in two launches while a CUDA graph captures (the Triton backend's ``grouped_experts``).

``RoutedExperts`` finds each expert's rows with ``nonzero``, which waits for the device, so under a capture (the
generator's decode steps) it ran the dense form: every expert on every token, ~6 launches per expert per layer (a
Mixtral-shaped step, 8 experts x 8 layers: ~2 ms at batch 1 on an H100, bound by launches, ``tools/bench_moe.py``).
``GroupedExperts`` runs the layer as ``moe_gate_up`` then ``moe_down`` (``lowbit.kernels.moe_gemv``): the router's
picks read on the device, each token's picked experts only, the terms summed in expert order with the dense form's
roundings (so it differs from the dense form only by each GEMV's float32 accumulation order). A decode-sized call
on the GPU outside a capture takes it too (``GroupedExperts.takes``). A larger call (a prefill; a decode batch past
``MAX_ROWS`` / ``WORDS_MAX_ROWS``) takes the expert-blocked ops (``lowbit.kernels.moe_blocked``, the backend option
``blocked_experts``): the picks sorted per expert on the device (``moe_route``), then one program per expert and
block of its rows, so each expert's weights are read once for all its rows, not once per row; their per-token
buffers are ``slots`` wide, the router's top-k where the graph shows it (``RoutedExperts.most_picks``).

It takes a layer whose every expert module (after the Triton backend retargets it) is exactly: the merged gate/up
linear with its gated epilogue (``weight_only_linear`` on int32 words, or ``float_linear`` on bf16/fp16) reading the
hidden rows, the down linear of the same kind, the scale by the router column, an optional cast to the layer's output
dtype; every expert with the same scheme. Anything else keeps the dense form under capture, and ``plan_grouped`` says
why (the compile report lists it per layer).

One copy of the weights: each expert's buffers are stacked once (``stack_experts``: every expert's strides kept) and
the expert modules' buffers replaced by views of the stack, so the eager routed path (a prefill) and the grouped one
read the same memory, and ``offload_replaced`` moves the IR's copies to the host as before. A device table of
per-expert pointers would avoid the copy at lowering (a layer's weights, once), but each kernel would then cast
loaded integers to pointers of each dtype; with a stack an expert is one stride, as the per-expert kernels index.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.fx

from lowbit.kernels._common import on_kernel_device
from lowbit.kernels.moe_blocked import blocked_unsupported, moe_down_blocked, moe_gate_up_blocked, moe_route
from lowbit.kernels.moe_gemv import FLOAT_DTYPES, moe_down, moe_gate_up, moe_weight_unsupported, stack_experts

MAX_ROWS = 7
"""Rows up to which a call takes the per-row grouped ops (``moe_gate_up`` / ``moe_down``: one program per (token,
expert), each reading its expert's weights) where the expert-blocked ops take the rows past it (``blocked_experts``:
each expert's weights read once for its rows). H100, session 57 (``python tools/bench_moe.py --no-hf --methods
grouped,blocked-all --batches 1,2,4,8,16``: a Mixtral-shaped bf16 stack, 8 experts of 2816 top-2, 8 layers,
bench/results/moe.json), ms a decode step per-row against blocked: 0.830 / 0.952 at batch 1, 0.986 / 1.058 at 2,
1.126 / 1.157 at 4, 1.295 / 1.211 at 8, 1.718 / 1.345 at 16 (the ops alone, ``tools/bench_moe_ops.py``, cross at 8
rows); session 58 (``--batches 5,6,7``, H100): 1.114 / 1.210 at 5, 1.151 / 1.167 at 6, 1.183 / 1.194 at 7. So
per-row through 7 rows, blocked from 8."""

WORDS_MAX_ROWS = 0
"""``MAX_ROWS`` for experts on int4/int8 words. The same H100 runs, W4A16 g128 (after session 57's zero-point
changes to both forms), per-row against blocked: 1.162 / 1.081 ms at batch 1, 1.419 / 1.240 at 2, 1.751 / 1.310 at
4; a 16 x 128 prefill 6.05 ms blocked against 9.51 dense (20.8 before those changes): the blocked ops win from one
row (each per-row program dequantizes its expert's words again)."""

DENSE_MAX_ROWS = 16
"""``MAX_ROWS`` where the blocked ops do not take the layer (``blocked_off``): per-row up to here, the dense form
(in a capture) or ``nonzero`` past it. H100, session 54 (``tools/bench_moe.py --no-hf``, the same stack) with no
row limit: bf16 decode 0.836 / 1.632 ms a step at batch 1 / 16 against the dense form's 2.089 / 2.760, a replayed
16 x 128 prefill 72.3 ms against 8.7 (each (token, expert) program reads its expert's weights again)."""

WORDS_DENSE_MAX_ROWS = 4
"""``DENSE_MAX_ROWS`` on words: once the rows' picks outnumber the experts the dense form (each expert's words once
for all rows) reads less. Session 54: W4A16 g128 1.132 ms at batch 1 against the dense form's 2.009, 4.236 against
2.661 at batch 16; 4 rows of Mixtral's top-2 pick 8 experts' words, as many as the dense form reads."""
CASTS = {torch.ops.aten._to_copy.default: lambda src, dtype: ((src,), {"dtype": dtype}),
         torch.ops.aten.to.dtype: lambda src, dtype: ((src, dtype), {})}
"""An expert's cast of its scaled term to the layer's dtype: the (args, kwargs) of each form capture writes
(``_to_copy`` where the model was functionalized by retracing, ``to.dtype`` where not)."""
SCALE = torch.ops.aten.mul.Tensor


@dataclass(frozen=True)
class LinearForm:
    """One expert linear as retargeted: its op (``kernel_form`` of the Triton backend's FX target), epilogue, scheme
    and the buffer names of its weight, scale and zero point (None where absent)."""

    op: str
    epilogue: str
    qdtype: str
    group: int
    buffers: tuple[str | None, str | None, str | None]

    @property
    def scheme(self) -> tuple[str, str, str, int, bool, bool]:
        return (self.op, self.epilogue, self.qdtype, self.group, self.buffers[1] is not None,
                self.buffers[2] is not None)


def _linear_form(node: torch.fx.Node) -> LinearForm | str:
    """``node``'s ``LinearForm``, or why it is not a linear the grouped ops read."""
    form = getattr(node.target, "kernel_form", None)
    if form is None or form[0] not in ("weight_only_linear", "float_linear"):
        return f"%{node.name} is not a weight-only or float linear on the kernels"
    op, epilogue, group = form
    names = [a.target if isinstance(a, torch.fx.Node) and a.op == "get_attr" else a for a in node.args[1:]]
    if op == "float_linear":
        if len(names) > 2 or (len(names) == 2 and names[1] is not None) or node.kwargs:
            return f"%{node.name} has a bias or fused operands"
        return LinearForm(op, epilogue, "", 0, (names[0], None, None))
    names += [None] * (4 - len(names))
    extra = {k: v for k, v in node.kwargs.items() if k not in ("w_qdtype", "w_axis", "w_block_size", "a_qdtype",
                                                                "a_granularity", "a_symmetric", "a_block_size",
                                                                "out_dtype")}
    if names[3] is not None or len(names) > 4 or extra or node.kwargs.get("a_qdtype") is not None:
        return f"%{node.name} has a bias, activation quantization or fused operands"
    return LinearForm(op, epilogue, node.kwargs["w_qdtype"], group, (names[0], names[1], names[2]))


def expert_forms(expert: torch.fx.GraphModule, out_dtype: torch.dtype) -> tuple[LinearForm, LinearForm] | str:
    """``(gate/up, down)`` of an expert module that is exactly gate/up -> down -> scale (-> cast), else why not."""
    inputs = [n for n in expert.graph.nodes if n.op == "placeholder"]
    calls = [n for n in expert.graph.nodes if n.op == "call_function"]
    out = next(n for n in expert.graph.nodes if n.op == "output")
    if len(inputs) != 2:
        return f"it reads {len(inputs) - 1} hidden values, not one"
    if len(calls) not in (3, 4):
        return f"its {len(calls)} ops are not gate/up, down, scale (and a cast)"
    gate_up, down, scale = calls[:3]
    cast = calls[3] if len(calls) == 4 else None
    forms = [_linear_form(gate_up), _linear_form(down)]
    for form in forms:
        if isinstance(form, str):
            return form
    assert isinstance(forms[0], LinearForm) and isinstance(forms[1], LinearForm)
    if not forms[0].epilogue.endswith("*up") or forms[1].epilogue:
        return (f"gate/up epilogue {forms[0].epilogue!r}, down epilogue {forms[1].epilogue!r}: not a gated "
                "activation then a plain linear")
    if gate_up.args[0] is not inputs[0] or down.args[0] is not gate_up:
        return "its linears do not read the hidden rows, then the gated activation"
    if scale.target is not SCALE or tuple(scale.args) != (down, inputs[1]) or scale.kwargs:
        return "its down output is not scaled by the router column alone"
    last = scale
    if cast is not None:
        if cast.target not in CASTS or (tuple(cast.args), dict(cast.kwargs)) != CASTS[cast.target](scale, out_dtype):
            return f"%{cast.name} is not a cast to the layer's {out_dtype}"
        last = cast
    if out.args[0] is not last:
        return "its output is not the scaled term"
    return forms[0], forms[1]


class GroupedExperts(torch.nn.Module):
    """The stacked experts of one layer and their two ops: ``forward(dense, picked, x) -> [T, H]``."""

    def __init__(self, gate_up: LinearForm, down: LinearForm, tensors: dict[str, torch.Tensor | None],
                 out_dtype: torch.dtype, slots: int, blocked_off: str | None = None) -> None:
        super().__init__()
        self.gate_up_form, self.down_form, self.out_dtype = gate_up, down, out_dtype
        self.slots, self.blocked_off = slots, blocked_off
        for name, t in tensors.items():
            self.register_buffer(name, t)

    def takes(self, x: torch.Tensor, capturing: bool) -> bool:
        """Whether a call on rows ``x`` runs the grouped ops: calls of rows they read (bf16/fp16 on a kernel device)
        while a CUDA graph captures, and on the GPU outside one (so the generator's warm-up runs before its capture
        compile the kernels the capture launches: a Triton compile inside a capture is a CUDA call it may refuse,
        and an eager call does not wait for the device); decode-sized ones (``MAX_ROWS``, ``WORDS_MAX_ROWS``), and
        with ``blocked`` any larger one on the expert-blocked ops (where its rows' dtype is a float weight's)."""
        reads = x.dim() == 2 and x.dtype in FLOAT_DTYPES and on_kernel_device(x) and (capturing or x.is_cuda)
        return reads and (x.shape[0] <= self.rows_limit(x.dtype) or self.blocks(x.dtype))

    @property
    def blocked(self) -> bool:
        """Whether calls past the row limit take the expert-blocked ops (``blocked_off``: why not)."""
        return self.blocked_off is None

    def blocks(self, dtype: torch.dtype) -> bool:
        """Whether the expert-blocked ops take rows of ``dtype`` (float weights: their own dtype, one a dot)."""
        return self.blocked and (self.words or dtype == self.gate_up_weight.dtype)

    @property
    def words(self) -> bool:
        """Whether the experts are int4/int8 words (their row limits are the ``WORDS_*`` ones)."""
        return self.gate_up_form.op == "weight_only_linear"

    @property
    def max_rows(self) -> int:
        """The most rows a call of the layer's own dtype takes the per-row grouped ops at (the report's)."""
        return self.rows_limit(self.gate_up_weight.dtype)

    def rows_limit(self, dtype: torch.dtype) -> int:
        """The most rows a call of ``dtype`` takes the per-row ops at: against the blocked ops ``MAX_ROWS`` /
        ``WORDS_MAX_ROWS``, where those do not take it ``DENSE_MAX_ROWS`` / ``WORDS_DENSE_MAX_ROWS``."""
        if self.blocks(dtype):
            return WORDS_MAX_ROWS if self.words else MAX_ROWS
        return WORDS_DENSE_MAX_ROWS if self.words else DENSE_MAX_ROWS

    def forward(self, dense: torch.Tensor, picked: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if x.stride(-1) != 1:
            x = x.contiguous()
        g, d = self.gate_up_form, self.down_form
        interleaved = self.words  # the weight-only gated epilogue's (gate, up) pairs
        gate_up = (self.gate_up_weight, self.gate_up_scale, self.gate_up_zero, g.qdtype, g.group)
        down = (self.down_weight, self.down_scale, self.down_zero, d.qdtype, d.group)
        if x.shape[0] <= self.rows_limit(x.dtype):
            h = moe_gate_up(x, picked, *gate_up, g.epilogue, interleaved)
            return moe_down(h, picked, dense, *down, self.out_dtype)
        route = moe_route(picked)
        h = moe_gate_up_blocked(x, *route, *gate_up, g.epilogue, interleaved, self.slots)
        return moe_down_blocked(h, picked, dense, *route, *down, self.out_dtype)


def plan_grouped(experts: Sequence[torch.fx.GraphModule], out_dtype: torch.dtype, hidden_size: int,
                 most_picks: int | None = None, blocked: bool = True) -> GroupedExperts | str:
    """The grouped form of a layer's retargeted expert modules, their buffers replaced by views of the stacks; or
    why the layer keeps the dense form under capture (nothing changed then). ``most_picks``: the most experts a
    token picks (the router's top-k), the width of the blocked ops' per-token buffers (None: every expert);
    ``blocked``: calls past the row limits take the expert-blocked ops (``GroupedExperts.blocked_off`` says why
    not, "off" or where their kernels cannot read the weights)."""
    forms = []
    for e, expert in enumerate(experts):
        found = expert_forms(expert, out_dtype)
        if isinstance(found, str):
            return f"expert {e}: {found}"
        forms.append(found)
    if any(f[0].scheme != forms[0][0].scheme or f[1].scheme != forms[0][1].scheme for f in forms):
        return "its experts' linears differ in kernel or scheme"
    gate_up, down = forms[0]
    first = experts[0]
    inner = getattr(first, gate_up.buffers[0]).shape[0] // 2  # type: ignore[arg-type]
    blocked_off = None if blocked else "off"
    for form, part, k in ((gate_up, "gate_up", hidden_size), (down, "down", inner)):
        weight, scale = (None if n is None else getattr(first, n)[None] for n in form.buffers[:2])
        why = moe_weight_unsupported(weight, scale, form.qdtype, form.group, k)  # type: ignore[arg-type]
        if why is not None:
            return f"{part}: {why}"
        unread = blocked_unsupported(weight, form.qdtype, form.group, k,  # type: ignore[arg-type]
                                     weight.dtype if not form.qdtype else torch.bfloat16)  # type: ignore[union-attr]
        blocked_off = blocked_off or (f"{part}: {unread}" if unread else None)
    tensors: dict[str, torch.Tensor | None] = {}
    for part, index in (("gate_up", 0), ("down", 1)):
        for slot, kind in enumerate(("weight", "scale", "zero")):
            names = [f[index].buffers[slot] for f in forms]
            if names[0] is None:
                tensors[f"{part}_{kind}"] = None
                continue
            stacked = stack_experts([getattr(x, n) for x, n in zip(experts, names, strict=True)])
            if stacked is None:
                return f"its experts' {part} {kind}s differ in shape, dtype or layout"
            tensors[f"{part}_{kind}"] = stacked
    for e, (expert, (g, d)) in enumerate(zip(experts, forms, strict=True)):
        for part, form in (("gate_up", g), ("down", d)):
            for name, kind in zip(form.buffers, ("weight", "scale", "zero"), strict=True):
                if name is not None:
                    expert.register_buffer(name, tensors[f"{part}_{kind}"][e])  # type: ignore[index]
    return GroupedExperts(gate_up, down, tensors, out_dtype, min(most_picks or len(experts), len(experts)),
                          blocked_off)
