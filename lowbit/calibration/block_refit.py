"""Block refit: train a pruned block's kept weights so the *block's* output, not each linear's, matches float.

Wanda, SparseGPT and the learned mask each fit one linear against its own output error. What the next block
reads is the whole block's output, after attention's softmax, the MLP's gate and the residual sum have mixed
the linears' errors. The refit (EBFT, Guo et al. 2024; the block objective AutoRound tunes rounding with)
keeps every mask fixed and trains the kept weights of the block's pruned linears with Adam to minimise

    Σ_batches ‖block(x_p; M ⊙ W) − target‖²

one calibration batch per step, cycling through them. ``x_p`` is what the pruned earlier blocks produce;
``target`` is the float block's output on the float model's own input (``"float"``: the block also learns to
undo what earlier blocks got wrong) or on ``x_p`` (``"pruned-input"``). The weights train as float32 masters
and run in the param's dtype; the mask ``M`` multiplies them in the forward, so a pruned weight's gradient
is exactly zero, Adam never moves it, and the zeros (and so the N:M pattern) come back exact. As in block
tuning, the result is kept only if it lowers the loss over every calibration batch.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from lowbit.calibration.block_tuning import (BlockFitStats, activation_straight_through, batch_cycle, block_loss,
                                             output_loss, trainable_inputs)
from lowbit.calibration.engine import BlockRun, Replacement
from lowbit.ir.graph import Graph, Node
from lowbit.ir.ops import resolve

__all__ = ["RefitOptions", "refit_block"]


@dataclass
class RefitOptions:
    iters: int = 200
    """Adam steps per block (one calibration batch per step, cycling through them)."""
    lr: float = 1e-3
    """Adam's first step size (weight units), decaying linearly to 0."""
    target: Literal["float", "pruned-input"] = "float"
    seed: int = 0


class _MaskedWeight:
    """A pruned linear's weight as a float32 master times its fixed mask (nonzeros of the pruned weight)."""

    def __init__(self, node: Node, ctx: BlockRun) -> None:
        self.node = node
        w = ctx.params.get(node.args[1])
        self.dtype = w.dtype
        self.keep = w != 0
        self.master = w.detach().float().clone().requires_grad_(True)

    def weight(self) -> torch.Tensor:
        return (self.master * self.keep).to(self.dtype)

    def replacement(self) -> Replacement:
        linear = resolve("linear")
        return lambda args, kwargs: linear(args[0], self.weight(), *args[2:], **kwargs)


def refit_block(ctx: BlockRun, linears: Sequence[Node], targets: Sequence[dict[Any, Any]], o: RefitOptions,
                stats: BlockFitStats, graph: Graph) -> None:
    """Refit the kept weights of ``linears`` (this block's pruned linears, each with a private weight param) toward
    ``targets`` (per batch, the block's exports to match) and write them back into the graph if the block's
    loss over every batch went down."""
    if not linears:
        return
    t0 = time.perf_counter()
    weights = [_MaskedWeight(n, ctx) for n in linears]
    replace: dict[int, Replacement] = {id(w.node): w.replacement() for w in weights}
    replace.update(activation_straight_through(ctx.nodes(), skip=set(replace)))
    inputs = trainable_inputs(ctx)
    batches = batch_cycle(len(inputs), o.seed + ctx.index)
    with torch.inference_mode(False), torch.enable_grad():
        before = block_loss(ctx, inputs, targets, replace)
        opt = torch.optim.Adam([w.master for w in weights], lr=o.lr)
        for step in range(o.iters):
            for group in opt.param_groups:
                group["lr"] = o.lr * (1 - step / o.iters)
            b = next(batches)
            loss = output_loss(ctx.run(inputs=[inputs[b]], replace=replace)[0], targets[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        after = block_loss(ctx, inputs, targets, replace)
    keep = after < before
    if keep:
        for w in weights:
            wv = w.node.args[1]
            with torch.no_grad():
                graph.set_param(wv.name, w.weight().detach().to(wv.data.device, wv.data.dtype))
    stats.add_block(ctx.name, before, after, keep, time.perf_counter() - t0)
