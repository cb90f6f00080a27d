"""Logit distillation: train a pruned graph's float weights so its next-token distribution matches the float
model's (the recovery step after structured pruning).

Structured pruning removes whole channels, heads or blocks; the one-shot repairs (bias compensation, least
squares) fix each layer's output locally, but the errors still compound through the depth. A short end-to-end
step against the unpruned model's own logits recovers much of the loss with few tokens: the teacher's whole
distribution per token is a far richer target than the next token alone (Sheared-LLaMA, Minitron and LLM-Pruner
use such a step after pruning). The loss is the per-token ``KL(teacher ‖ student)`` at temperature 1.

Both graphs run node by node through the ops' reference implementations (``engine._execute``, as the learned
rotation does) with autograd on: the student's trainable params are float32 master copies on the training
device, read in the graph's own dtype (``dtype=bfloat16`` runs the forward under autocast), updated by AdamW with
a linear decay to zero (over the steps, or over ``max_seconds`` if that ends first) and gradient clipping; the
teacher runs without gradients on the same batch. At the end every trained param is written back with
``graph.set_param`` in its own dtype and device; the teacher's tensors are never touched (clones share tensors,
so the masters are always copies).
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from lowbit.calibration.engine import (
    BLOCK_PATTERN,
    CalibrationError,
    _DeviceParams,
    _execute,
    home_device,
)
from lowbit.ir.graph import Graph, Value

__all__ = ["DistillError", "DistillStats", "distill_logits", "logit_kl", "trainable_params"]


class DistillError(CalibrationError):
    """Distillation cannot run (graphs that do not match) or diverged (a non-finite loss), named with its step."""


@dataclass
class DistillStats:
    steps: int
    tokens: int
    kl_first: float
    kl_last: float
    kl_mean_last_10pct: float
    trained_params: int
    trained_tensors: int
    seconds: float
    stopped_early: bool = False
    history: list[float] = field(default_factory=list)


def trainable_params(graph: Graph, scope: Literal["blocks", "all"] = "blocks") -> list[Value]:
    """The floating-point params the step trains: those read by nodes of the repeated blocks (``blocks``: the
    linears and norms pruning changed; the tied embedding and head stay) or every floating param (``all``)."""
    rx = re.compile(BLOCK_PATTERN)
    seen: dict[int, Value] = {}
    for n in graph.nodes:
        if scope == "blocks" and not rx.match(n.module):
            continue
        for v in n.inputs():
            if v.is_param and isinstance(v.data, torch.Tensor) and v.data.is_floating_point():
                seen.setdefault(id(v), v)
    return list(seen.values())


class _Params(_DeviceParams):
    """The engine's param reader with the trained params replaced by their masters (in the graph's dtype)."""

    def __init__(self, device: torch.device | None, masters: dict[int, tuple[Value, torch.Tensor]]) -> None:
        super().__init__(device)
        self.masters = masters

    def get(self, v: Value) -> Any:
        hit = self.masters.get(id(v))
        if hit is None:
            return super().get(v)
        master = hit[1]
        return master if master.dtype == v.data.dtype else master.to(v.data.dtype)


def logit_kl(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean per-token ``KL(softmax(teacher) ‖ softmax(student))`` in float32, logits ``[..., V]``."""
    s = F.log_softmax(student.float().reshape(-1, student.shape[-1]), -1)
    t = F.log_softmax(teacher.float().reshape(-1, teacher.shape[-1]), -1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean")


def _forward(graph: Graph, ids: torch.Tensor, params: _DeviceParams) -> torch.Tensor:
    env: dict[Value, Any] = {graph.inputs[0]: ids}
    out = graph.outputs[0]
    _execute(graph.nodes, env, None, {out}, params)
    return env[out]


def distill_logits(student: Graph, teacher: Graph, windows: torch.Tensor, *, steps: int, lr: float, batch: int,
                   device: torch.device | None = None, dtype: Literal["float32", "bfloat16"] = "float32",
                   weight_decay: float = 0.0, clip: float = 1.0, scope: Literal["blocks", "all"] = "blocks",
                   seed: int = 0, max_seconds: float | None = None, progress: bool = True,
                   what: str = "distill") -> DistillStats:
    """Train ``student``'s params (``trainable_params(scope)``) for ``steps`` AdamW steps of ``batch`` windows
    (``windows``: ``[n, L]`` token ids, visited in shuffled epochs) toward ``teacher``'s logits; write them back.

    Both graphs take ``input_ids`` first and return logits first. ``max_seconds`` stops earlier (the stats say
    how many steps and tokens ran)."""
    t0 = time.perf_counter()
    if len(student.inputs) != 1 or len(teacher.inputs) != 1:
        raise DistillError(f"{what}: distillation runs input_ids -> logits graphs; the student takes "
                           f"{len(student.inputs)} inputs and the teacher {len(teacher.inputs)}")
    home = home_device(student)
    dev = device if device is not None else home
    masters: dict[int, tuple[Value, torch.Tensor]] = {}
    for v in trainable_params(student, scope):
        m = v.data.detach().to(dev, torch.float32, copy=True).requires_grad_(True)
        masters[id(v)] = (v, m)
    if not masters:
        raise DistillError(f"{what}: the student graph has no floating-point param to train (scope={scope})")
    opt = torch.optim.AdamW([m for _, m in masters.values()], lr=lr, weight_decay=weight_decay)
    def decay(i: int) -> float:
        """Linear to 0 over the steps, or over ``max_seconds`` when that ends first (a capped run still anneals)."""
        done_frac = i / max(steps, 1)
        if max_seconds is not None:
            done_frac = max(done_frac, (time.perf_counter() - t0) / max_seconds)
        return max(0.0, 1.0 - done_frac)

    sched = torch.optim.lr_scheduler.LambdaLR(opt, decay)
    s_params, t_params = _Params(dev, masters), _DeviceParams(dev)
    autocast = dtype == "bfloat16"
    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    history: list[float] = []
    done = 0
    stopped = False
    bar = tqdm(range(steps), desc=what, unit="step", disable=not progress)
    for step in bar:
        if max_seconds is not None and step > 0 and time.perf_counter() - t0 > max_seconds:
            stopped = True
            break
        pick = []
        while len(pick) < min(batch, windows.shape[0]):
            if not order:
                order = torch.randperm(windows.shape[0], generator=gen).tolist()
            pick.append(order.pop())
        ids = windows[pick].to(dev)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast):
            with torch.no_grad():
                try:
                    target = _forward(teacher, ids, t_params)
                except CalibrationError as exc:
                    raise DistillError(f"{what}: step {step}: teacher: {exc}") from None
            with torch.enable_grad():
                try:
                    logits = _forward(student, ids, s_params)
                except CalibrationError as exc:
                    raise DistillError(f"{what}: step {step}: student: {exc}") from None
                if logits.shape != target.shape:
                    raise DistillError(f"{what}: the student's logits are {list(logits.shape)} and the teacher's "
                                       f"{list(target.shape)}: they must match")
                loss = logit_kl(logits, target)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise DistillError(f"{what}: step {step} of {steps}: the KL is {value} (diverged; lower lr={lr})")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_([m for _, m in masters.values()], clip)
        opt.step()
        sched.step()
        history.append(round(value, 5))
        done += 1
        if progress:
            bar.set_postfix(kl=f"{value:.4f}")
        del logits, target, loss
    bar.close()
    with torch.no_grad():
        for v, m in masters.values():
            if not torch.isfinite(m).all():
                raise DistillError(f"{what}: param @{v.name} is not finite after {done} steps (lower lr={lr})")
            student.set_param(v.name, m.detach().to(home, v.data.dtype))
    tail = history[-max(1, len(history) // 10):] if history else [float("nan")]
    return DistillStats(
        steps=done, tokens=done * min(batch, windows.shape[0]) * int(windows.shape[1]),
        kl_first=history[0] if history else float("nan"), kl_last=history[-1] if history else float("nan"),
        kl_mean_last_10pct=round(sum(tail) / len(tail), 5),
        trained_params=sum(m.numel() for _, m in masters.values()), trained_tensors=len(masters),
        seconds=round(time.perf_counter() - t0, 2), stopped_early=stopped, history=history)
