"""Block tuning: refine a block's rounded weights so the block's output, not each linear's, matches float.

GPTQ and AWQ round one linear at a time against that linear's own output error. What the next block sees is
the whole block's output, after attention's softmax, the MLP's gate and the residual sum have mixed the
linears' errors. Block tuning (in the spirit of AutoRound's signed-gradient rounding, Cheng et al. 2023)
starts from the codes a rounding already chose and learns, per weight, an offset ``v ∈ [−½, ½]`` added
before rounding (each code can move one step) and, per scale, a multiplier ``e^λ``, to minimise

    Σ_batches ‖block(x_q; W(v, λ)) − target‖²

by signed gradient descent with a linearly decaying step (straight-through rounding). ``x_q`` is what the
quantized earlier blocks produce; ``target`` is the float block's output on the float model's own input
(``target="float"``: the block also learns to undo what earlier blocks got wrong) or on ``x_q``
(``"quantized-input"``). Activation quantizers inside the block (W4A8, KV cache) stay in the loop with a
straight-through gradient, so weights are tuned against the activations they will really see.

The weights are parametrised around what the rounding rounded (``base``: the float weights for RTN, the
AWQ-scaled ones after AWQ): at ``v = 0, λ = 0`` the block is exactly the rounded one, and under
straight-through rounding a scale's gradient is its rounding residual. Given only the dequantized weights
``Ŵ = (c − z)·s`` (no base), only ``v`` is learned: ``Ŵ/s·s = Ŵ`` leaves the scales without a gradient. The
result is kept only if it lowers the loss over every calibration batch (the stats say when it did not).
Float formats (fp8) have no uniform grid for ``v`` to step on: their scales are tuned, their codes
re-rounded from the base under the new scales.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from lowbit.calibration.engine import BlockRun, Replacement
from lowbit.calibration.gptq import _expand_cols
from lowbit.ir.graph import Graph, Node, Value
from lowbit.ir.ops import resolve
from lowbit.ir.quant import QDType, get_qdtype, stored_codes, unpack_int4

__all__ = ["BlockFitStats", "FloatTargetStream", "TuneOptions", "TuneStats", "TunedWeight",
           "activation_straight_through", "tune_block", "float_targets", "block_loss", "batch_cycle", "output_loss",
           "trainable_inputs"]

Target = Literal["float", "quantized-input"]


@dataclass
class TuneOptions:
    iters: int = 200
    """Signed-gradient steps per block (one calibration batch per step, cycling through them)."""
    lr: float | None = None
    """First step size (in code units for ``v``, log-units for scales); unset: ``1/iters`` as AutoRound."""
    scales: bool = True
    """Also learn a multiplier per scale (within ``[1/max_scale, max_scale]``)."""
    max_scale: float = 1.5
    target: Target = "float"
    seed: int = 0


@dataclass
class BlockFitStats:
    """What a block-by-block fit (block tuning, the sparse block refit) did, summed over the blocks."""
    blocks: int = 0
    kept: int = 0
    """Blocks whose fitted weights lowered the whole-calibration loss (the others keep what they had)."""
    loss_before: float = 0.0
    loss_after: float = 0.0
    seconds: float = 0.0
    per_block: list[dict[str, Any]] = field(default_factory=list)

    def add_block(self, name: str, before: float, after: float, keep: bool, seconds: float, **more: Any) -> None:
        """Count block ``name``'s fit; a fit not kept leaves the block's loss at ``before``. ``more``: the fit's own
        per-block entries (block tuning's codes changed)."""
        self.blocks += 1
        self.kept += int(keep)
        self.loss_before += before
        self.loss_after += after if keep else before
        self.seconds += seconds
        self.per_block.append({"block": name, "loss_before": before, "loss_after": after, "kept": keep, **more,
                               "seconds": round(seconds, 2)})


@dataclass
class TuneStats(BlockFitStats):
    codes_changed: int = 0
    codes_total: int = 0


class TunedWeight:
    """One linear's weight ``dequantize`` node, as learnable ``(v, λ)`` around its current codes.

    ``base`` is what the rounding rounded (GPTQ's error-compensated weights, or the float weights for RTN):
    ``round(base / s) + z`` are the current codes, and under straight-through rounding the scale's gradient
    is the rounding residual, as in AutoRound. Without it the dequantized weight ``Ŵ`` is the base; every
    weight then sits mid-step, the scale has no gradient (``Ŵ/s·s = Ŵ``) and only ``v`` is learned."""

    def __init__(self, dq: Node, ctx: BlockRun, base: torch.Tensor | None = None) -> None:
        self.node = dq
        qv, sv, zv = dq.args[0], dq.args[1], dq.args[2]
        self.values: tuple[Value, Value, Value | None] = (qv, sv, zv)
        self.qd: QDType = get_qdtype(dq.kwargs["qdtype"])
        self.out_dtype: torch.dtype = dq.kwargs.get("out_dtype", torch.float32)
        codes = ctx.params.get(qv)
        scale = ctx.params.get(sv).float()
        zp = None if zv is None else ctx.params.get(zv).float()
        if self.qd.packed:
            codes = unpack_int4(codes, signed=self.qd.signed)
        if codes.dim() != 2:
            raise ValueError(f"block tuning: weight %{dq.output.name} of {dq.module!r} is {codes.dim()}-d; linear "
                             "weights are [out, in]")
        n, k = codes.shape
        axis, block = dq.kwargs.get("axis"), dq.kwargs.get("block_size")
        if block is not None and axis in (1, -1) and tuple(scale.shape) == (n, k // block):
            self.group = block
        elif block is None and axis == 0 and tuple(scale.shape) == (n,):
            self.group = k
        else:
            raise ValueError(f"block tuning: weight %{dq.output.name} of {dq.module!r}: scale {tuple(scale.shape)} "
                             f"with axis={axis}, block_size={block} is not per channel or per input group")
        self.shape = (n, k)
        self.scale0 = scale.reshape(n, k // self.group)
        self.zp = None if zp is None else zp.reshape(n, k // self.group)
        self.codes0 = codes
        self.learn_scale = base is not None
        if base is not None:
            if tuple(base.shape) != (n, k):
                raise ValueError(f"block tuning: {dq.module!r}: base weight {tuple(base.shape)} != codes {(n, k)}")
            self.base = base.detach().float().to(codes.device)
        elif self.zp is not None:
            self.base = (codes.float() - self._expand(self.zp)) * self._expand(self.scale0)
        else:
            self.base = codes.float() * self._expand(self.scale0)
        dev = self.base.device
        self.v = torch.zeros(n, k, device=dev, requires_grad=not self.qd.is_float)
        self.log_scale = torch.zeros_like(self.scale0, requires_grad=self.learn_scale)
        self.start_mismatch = self.changed()
        """Codes that ``base`` does not round to (0 when the base is the rounding's own input)."""

    def _expand(self, t: torch.Tensor | None) -> torch.Tensor:
        """A ``[N, K/g]`` scale or zero point as ``[N, K]`` (one value per weight)."""
        assert t is not None
        return _expand_cols(t, *self.shape, self.group)

    def params(self, scales: bool) -> list[torch.Tensor]:
        return ([] if self.qd.is_float else [self.v]) + ([self.log_scale] if scales and self.learn_scale else [])

    def scale(self) -> torch.Tensor:
        return self.scale0 * self.log_scale.exp()

    def _codes(self, s: torch.Tensor) -> torch.Tensor:
        """Codes (as float) under scale ``s`` (expanded): straight-through rounding and clamping."""
        x = self.base / s
        if self.qd.is_float:
            r = x.clamp(self.qd.qmin, self.qd.qmax)
            return r + (r.to(self.qd.container).float() - r).detach()
        x = x + self.v
        r = x + (torch.round(x) - x).detach()
        if self.zp is not None:
            r = r + self._expand(self.zp)
        return r.clamp(self.qd.qmin, self.qd.qmax)

    def weight(self) -> torch.Tensor:
        """The dequantized weight under the current ``(v, λ)`` (differentiable)."""
        s = self._expand(self.scale())
        q = self._codes(s)
        if self.zp is not None:
            q = q - self._expand(self.zp)
        return (q * s).to(self.out_dtype)

    def replacement(self) -> Replacement:
        return lambda args, kwargs: self.weight()

    @torch.no_grad()
    def final(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes in the storage layout, scale in the param's shape) of the tuned weight."""
        s = self.scale()
        q = self._codes(self._expand(s)).detach()
        codes = q.to(self.qd.container)
        return stored_codes(codes, self.qd), s.reshape(self.values[1].data.shape)

    @torch.no_grad()
    def changed(self) -> int:
        """Codes that differ from the ones tuning started from."""
        q = self._codes(self._expand(self.scale())).to(self.qd.container)
        return int((q != self.codes0).sum())


def _straight_through(q_node: Node) -> tuple[Replacement, Replacement]:
    """An activation ``quantize → dequantize`` pair as ``x + (fakequant(x) − x).detach()``.

    The quantize node passes ``x`` through; its dequantize computes the real fake-quant and adds it as a
    constant offset, so the forward value is exact and the gradient is the identity (straight-through)."""
    qkw = dict(q_node.kwargs)
    quantize, dequantize = resolve("quantize"), resolve("dequantize")

    def passthrough(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        return args[0]

    def fake(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        x, scale, zp = args[0], args[1], args[2] if len(args) > 2 else kwargs.get("zero_point")
        with torch.no_grad():
            codes = quantize(x.detach(), scale, zp, **qkw)
            y = dequantize(codes, scale, zp, **{k: v for k, v in kwargs.items() if k != "zero_point"})
        return x + (y - x.detach()).to(x.dtype)

    return passthrough, fake


def activation_straight_through(nodes: Sequence[Node], skip: set[int] | None = None) -> dict[int, Replacement]:
    """Every activation ``quantize → dequantize`` pair of ``nodes`` (the quantize reads no param; only dequantizes
    read it) as straight-through replacements for ``engine._execute``: the forward value is the real fake-quant,
    the gradient the identity. Without them ``round`` gives every earlier param a zero gradient."""
    out: dict[int, Replacement] = {}
    readers: dict[int, list[Node]] = {}
    for n in nodes:
        for v in n.inputs():
            readers.setdefault(id(v), []).append(n)
    for n in nodes:
        if n.op != "quantize" or n.args[0].is_param or (skip and id(n) in skip):
            continue
        users = readers.get(id(n.output), [])
        if users and all(u.op == "dequantize" and u.args[0] is n.output for u in users):
            through, fake = _straight_through(n)
            out[id(n)] = through
            for u in users:
                out[id(u)] = fake
    return out


def _replacements(nodes: Sequence[Node], tuned: Sequence[TunedWeight]) -> dict[int, Replacement]:
    out: dict[int, Replacement] = {id(t.node): t.replacement() for t in tuned}
    out.update(activation_straight_through(nodes, skip=set(out)))
    return out


def output_loss(out: dict[Value, Any], target: dict[Value, Any]) -> torch.Tensor:
    """Mean squared error summed over the block's float outputs that ``target`` holds (the fit's objective)."""
    total = None
    for v, t in target.items():
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            d = (out[v].float() - t.float()).pow(2).mean()
            total = d if total is None else total + d
    if total is None:
        raise ValueError("block tuning: the block exports no float tensor to match")
    return total


def float_targets(ctx: BlockRun, float_inputs: Sequence[dict[Value, Any]] | None) -> list[dict[Value, Any]]:
    """The block's current (float) output per batch on ``float_inputs`` (the float model's stream)."""
    if float_inputs is None:
        return [dict(r) for r in ctx.reference] if ctx.reference else ctx.run()
    merged = [{v: f.get(v, x) for v, x in inp.items()} for inp, f in zip(ctx.inputs, float_inputs)]
    with torch.no_grad():
        return ctx.run(inputs=merged)


class FloatTargetStream:
    """Each block's float targets, block after block (``float_targets``). ``chained`` (``target="float"``): a
    block's float input is the previous block's float output, so the float model's own stream runs beside the
    quantized or pruned one and a block also learns to undo what earlier blocks got wrong; otherwise the float
    block's output on the block's actual input."""

    def __init__(self, chained: bool) -> None:
        self.chained = chained
        self._last: list[dict[Value, Any]] | None = None

    def next(self, ctx: BlockRun) -> list[dict[Value, Any]]:
        """Call once per block, before its weights change (the block is still float)."""
        out = float_targets(ctx, self._last if self.chained else None)
        if self.chained:
            self._last = out
        return out


def block_loss(ctx: BlockRun, inputs: Sequence[dict[Value, Any]], targets: Sequence[dict[Value, Any]],
               replace: dict[int, Replacement]) -> float:
    """The block's loss against ``targets``, averaged over every calibration batch (the keep-or-discard test)."""
    with torch.no_grad():
        outs = ctx.run(inputs=inputs, replace=replace)
        return float(sum(float(output_loss(out, tgt)) for out, tgt in zip(outs, targets)) / len(inputs))


def batch_cycle(n: int, seed: int) -> Iterator[int]:
    """Calibration batch indices for training steps: each of ``n`` once per epoch, in a fresh random order."""
    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    while True:
        if not order:
            order = torch.randperm(n, generator=gen).tolist()
        yield order.pop()


def trainable_inputs(ctx: BlockRun) -> list[dict[Value, Any]]:
    """The block's cached inputs as plain tensors that autograd may save for the backward pass."""
    return [{v: (x.detach().clone() if isinstance(x, torch.Tensor) else x) for v, x in inp.items()}
            for inp in ctx.inputs]


def tune_block(ctx: BlockRun, weights: Sequence[tuple[Node, torch.Tensor | None]],
               targets: Sequence[dict[Value, Any]], o: TuneOptions, stats: TuneStats, graph: Graph) -> None:
    """Tune the weights behind ``weights`` (this block's weight dequantize nodes, each with the weights its
    rounding rounded, or None) and write them back into the graph."""
    t0 = time.perf_counter()
    if not weights:
        return
    tuned = [TunedWeight(n, ctx, base) for n, base in weights]
    mismatch = sum(t.start_mismatch for t in tuned)
    if mismatch:
        raise ValueError(f"block tuning: {ctx.name}: {mismatch} codes are not the rounding of the weights given "
                         "as their base (the rounding and the QDQ contract disagree)")
    nodes = ctx.nodes()
    replace = _replacements(nodes, tuned)
    lr = o.lr if o.lr is not None else 1.0 / max(o.iters, 1)
    limit = math.log(o.max_scale)
    params = [p for t in tuned for p in t.params(o.scales)]
    batches = batch_cycle(len(ctx.inputs), o.seed + ctx.index)
    inputs = trainable_inputs(ctx)
    with torch.inference_mode(False), torch.enable_grad():
        before = block_loss(ctx, inputs, targets, replace)
        for step in range(o.iters):
            b = next(batches)
            out = ctx.run(inputs=[inputs[b]], replace=replace)[0]
            loss = output_loss(out, targets[b])
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            step_lr = lr * (1 - step / o.iters)
            with torch.no_grad():
                for p, g in zip(params, grads):
                    if g is None:
                        continue
                    p.sub_(step_lr * g.sign())
                for t in tuned:
                    t.v.clamp_(-0.5, 0.5)
                    t.log_scale.clamp_(-limit, limit)
        after = block_loss(ctx, inputs, targets, replace)
    keep = after < before
    changed = sum(t.changed() for t in tuned) if keep else 0
    if keep:
        for t in tuned:
            codes, scale = t.final()
            qv, sv, _ = t.values
            graph.set_param(qv.name, codes.to(qv.data.device))
            graph.set_param(sv.name, scale.to(sv.data.device, sv.data.dtype))
    stats.codes_changed += changed
    stats.codes_total += sum(t.codes0.numel() for t in tuned)
    stats.add_block(ctx.name, before, after, keep, time.perf_counter() - t0, codes_changed=changed)
