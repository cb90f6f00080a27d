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
a linear or cosine decay to zero after an optional warmup (over the steps, or over ``max_seconds`` if that ends
first) and gradient clipping; the teacher runs without gradients on the same batch (its matrices cast to bf16 once
under ``dtype=bfloat16``). The shipped calibration text is short (~60K tokens), so a GPU run makes many epochs:
``random_offsets`` varies the windows' starts, ``holdout`` keeps windows aside and writes back the params with the
lowest KL on them (early stopping), and the loss reaches the host only every few steps (no sync per step).
At the end every trained param is written back with ``graph.set_param`` in its own dtype and device; the
teacher's tensors are never touched (clones share tensors, so the masters are always copies).

The same loop tunes a quantized model after its quantizers (``tune-qparams``): ``roles`` limits the trained params
to the weights' scales, the norms and the biases (the integer codes stay), and the activation quantizers pass their
gradient straight through.
"""

from __future__ import annotations

import math
import re
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from lowbit.calibration.block_tuning import activation_straight_through
from lowbit.calibration.engine import (
    BLOCK_PATTERN,
    CalibrationError,
    Replacement,
    _DeviceParams,
    _execute,
    home_device,
    static_misfit,
)
from lowbit.ir.graph import Graph, Node, Value
from lowbit.ir.quant import SCALE_EPS

__all__ = ["DistillError", "DistillStats", "ParamRole", "distill_logits", "is_weight_dequantize", "logit_kl",
           "trainable_params"]

SLOW_RUN_WARN_SECONDS = 1800.0
"""A run whose first steps project past this (and that has no ``max_seconds``) warns with the projection: the
reference interpreter trains SmolLM2 at ~28 tokens/s on a CPU, so a GPU-sized token budget there runs for hours."""


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
    tokens_per_second: float = 0.0
    """Training tokens per second (the teacher's and the student's passes, the update)."""
    train_tokens: int = 0
    """Distinct tokens trained on (the windows minus the held-out ones); ``tokens / train_tokens`` epochs ran."""
    holdout_kl: list[tuple[int, float]] = field(default_factory=list)
    """(step, KL on the held-out windows) as measured; empty without ``holdout``."""
    best_step: int = 0
    """The step whose params were written back (the lowest held-out KL; the last step without ``holdout``)."""
    restored_best: bool = False


ParamRole = Literal["scales", "norms", "biases"]
"""What a quantized graph's end-to-end tuning may train (its codes stay): ``scales`` of the weights'
``dequantize`` nodes, ``norms``' gains and biases, the linears' ``biases``."""


def is_weight_dequantize(node: Node) -> bool:
    """A ``dequantize`` of stored codes (a quantized weight), not of an activation."""
    return node.op == "dequantize" and node.args[0].is_param


def _role_inputs(node: Node, roles: frozenset[str]) -> list[Any]:
    if is_weight_dequantize(node):
        return [node.args[1]] if "scales" in roles else []
    if node.op in ("rms_norm", "layer_norm"):
        return list(node.args[1:]) + list(node.kwargs.values()) if "norms" in roles else []
    if node.op == "linear":
        return list(node.args[2:3]) + [node.kwargs.get("bias")] if "biases" in roles else []
    return []


def trainable_params(graph: Graph, scope: Literal["blocks", "all"] = "blocks",
                     roles: Sequence[ParamRole] | None = None) -> list[Value]:
    """The floating-point params the step trains: those read by nodes of the repeated blocks (``blocks``: the
    linears and norms pruning changed; the tied embedding and head stay) or every floating param (``all``);
    with ``roles``, only the params of those roles (``ParamRole``), so a quantized graph keeps its codes."""
    rx = re.compile(BLOCK_PATTERN)
    wanted = frozenset(roles) if roles is not None else None
    seen: dict[int, Value] = {}
    for n in graph.nodes:
        if scope == "blocks" and not rx.match(n.module):
            continue
        for v in (n.inputs() if wanted is None else _role_inputs(n, wanted)):
            if (isinstance(v, Value) and v.is_param and isinstance(v.data, torch.Tensor)
                    and v.data.is_floating_point()):
                seen.setdefault(id(v), v)
    return list(seen.values())


def sparsity_masks(graph: Graph, masters: dict[int, tuple[Value, torch.Tensor]]
                   ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(master, nonzero mask) for each trained weight of a linear that ``sparsify`` pruned (``meta["sparsity"]``):
    re-applied after every step, so the zeros stay exact and a 2:4 pattern stays 2:4 (AdamW's update and weight
    decay would otherwise fill them in: recovery after pruning must not undo it)."""
    out: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for n in graph.nodes:
        if n.op != "linear" or "sparsity" not in n.meta or len(n.args) < 2:
            continue
        w = n.args[1]
        if isinstance(w, Value) and id(w) in masters and id(w) not in out:
            m = masters[id(w)][1]
            out[id(w)] = (m, (m.detach() != 0).to(m.dtype))
    return list(out.values())


def weight_scale_masters(graph: Graph, masters: dict[int, tuple[Value, torch.Tensor]]) -> list[torch.Tensor]:
    """The trained copies of the weights' quantization scales: kept at ``SCALE_EPS`` or above after every step, as
    every scale lowbit writes is (an AdamW step larger than a small group scale made it negative, flipping the
    sign of the group's weights and breaking the QDQ contract that backends and checkpoint formats rely on)."""
    out: dict[int, torch.Tensor] = {}
    for n in graph.nodes:
        if is_weight_dequantize(n) and isinstance(n.args[1], Value) and id(n.args[1]) in masters:
            out[id(n.args[1])] = masters[id(n.args[1])][1]
    return list(out.values())


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


def logit_kl(student: torch.Tensor, teacher: torch.Tensor, topk: int = 0) -> torch.Tensor:
    """Mean per-token ``KL(softmax(teacher) ‖ softmax(student))`` in float32, logits ``[..., V]``.

    ``topk > 0``: the KL over the teacher's ``topk`` most likely tokens and one bucket holding the rest of the
    vocabulary (both distributions coarsened the same way, so it is still a KL, >= 0, and equal to the full one
    when the bucket carries no mass): the teacher's tail costs nothing to store or compare."""
    v = student.shape[-1]
    s = F.log_softmax(student.float().reshape(-1, v), -1)
    t = F.log_softmax(teacher.float().reshape(-1, v), -1)
    if topk <= 0 or topk >= v:
        return F.kl_div(s, t, log_target=True, reduction="batchmean")
    t_top, idx = t.topk(topk, dim=-1)
    s_top = s.gather(-1, idx)
    tiny = torch.finfo(torch.float32).tiny
    t_rest = torch.log1p(-t_top.exp().sum(-1).clamp(max=1 - 1e-6)).clamp_min(math.log(tiny))
    s_rest = torch.log1p(-s_top.exp().sum(-1).clamp(max=1 - 1e-6)).clamp_min(math.log(tiny))
    kl = (t_top.exp() * (t_top - s_top)).sum(-1) + t_rest.exp() * (t_rest - s_rest)
    return kl.mean()


def _forward(graph: Graph, ids: torch.Tensor, params: _DeviceParams,
             replace: dict[int, Replacement] | None = None) -> torch.Tensor:
    env: dict[Value, Any] = {graph.inputs[0]: ids}
    out = graph.outputs[0]
    try:
        _execute(graph.nodes, env, None, {out}, params, replace)
    except CalibrationError as exc:  # a held-out or training batch a fixed-shape capture cannot take: say so
        misfit = static_misfit(graph, (ids,))
        if misfit is None:
            raise
        raise CalibrationError(f"{exc}; {misfit}") from exc
    return env[out]


class _TeacherParams(_DeviceParams):
    """The teacher's params on the training device, matrices (linears, embedding) once in bf16 under a bf16 run
    (autocast would otherwise cast every weight again at every step); vectors (norms, biases) keep their dtype."""

    def __init__(self, device: torch.device | None, matrices: torch.dtype | None) -> None:
        super().__init__(device)
        self.matrices = matrices
        self._cast: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def get(self, v: Value) -> Any:
        data = super().get(v)
        if (self.matrices is None or not isinstance(data, torch.Tensor) or data.dim() < 2
                or not data.is_floating_point() or data.dtype == self.matrices):
            return data
        hit = self._cast.get(id(v))
        if hit is not None and hit[0] is data:
            return hit[1]
        cast = data.to(self.matrices)
        self._cast[id(v)] = (data, cast)
        return cast


def lr_factor(progress: float, schedule: Literal["linear", "cosine"], warmup: float) -> float:
    """The learning-rate multiplier at ``progress`` in [0, 1] of the run: a linear warmup over the first
    ``warmup`` fraction, then linear or cosine decay to 0."""
    p = min(max(progress, 0.0), 1.0)
    if warmup > 0 and p < warmup:
        return max(p / warmup, 1e-3)
    q = (p - warmup) / max(1.0 - warmup, 1e-9)
    return max(0.0, 1.0 - q) if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * q))


def distill_logits(student: Graph, teacher: Graph, windows: torch.Tensor, *, steps: int, lr: float, batch: int,
                   device: torch.device | None = None, dtype: Literal["float32", "bfloat16"] = "float32",
                   weight_decay: float = 0.0, clip: float = 1.0, scope: Literal["blocks", "all"] = "blocks",
                   seed: int = 0, max_seconds: float | None = None, progress: bool = True,
                   what: str = "distill", schedule: Literal["linear", "cosine"] = "linear", warmup: float = 0.0,
                   topk: int = 0, random_offsets: bool = False, holdout: int = 0, eval_every: int = 0,
                   ce_weight: float = 0.0, log_every: int = 16, roles: Sequence[ParamRole] | None = None
                   ) -> DistillStats:
    """Train ``student``'s params (``trainable_params(scope)``) for ``steps`` AdamW steps of ``batch`` windows
    (``windows``: ``[n, L]`` token ids, visited in shuffled epochs) toward ``teacher``'s logits; write them back.

    Both graphs take ``input_ids`` first and return logits first. ``max_seconds`` stops earlier (the stats say
    how many steps and tokens ran; the schedule then runs on the elapsed fraction of ``max_seconds``).

    ``random_offsets``: windows of ``L`` start anywhere in the text (the ``[n, L]`` windows read as one stream)
    rather than at multiples of ``L``: many epochs over a short text see different contexts. ``holdout``: the
    last ``holdout`` windows are not trained on; every ``eval_every`` steps (and at the end) the KL on them is
    measured and the params with the lowest held-out KL are the ones written back (early stopping: many epochs
    over a short text can overfit it). ``ce_weight`` adds that much cross-entropy to the text's next token.
    ``topk``: see ``logit_kl``. The loss is read back to the host only every ``log_every`` steps.

    ``roles`` (a quantized student): train only those params (``trainable_params``), the codes fixed; its
    activation quantizers (A8/A4, the KV cache) pass gradients straight through (``activation_straight_through``)
    while the forward computes their real fake-quant."""
    t0 = time.perf_counter()
    if len(student.inputs) != 1 or len(teacher.inputs) != 1:
        step = " (a generation step graph: its positions and KV cache are inputs too; distill the logits graph, " \
            "compiled without generation=)" if student.meta.get("generation") else ""
        raise DistillError(f"{what}: distillation runs input_ids -> logits graphs; the student takes "
                           f"{len(student.inputs)} inputs and the teacher {len(teacher.inputs)}{step}")
    if holdout >= windows.shape[0]:
        raise DistillError(f"{what}: holdout={holdout} leaves no training window of the {windows.shape[0]} given")
    home = home_device(student)
    dev = device if device is not None else home
    if dev is None:
        dev = torch.device("cpu")
    cuda = dev.type == "cuda"
    masters: dict[int, tuple[Value, torch.Tensor]] = {}
    for v in trainable_params(student, scope, roles):
        m = v.data.detach().to(dev, torch.float32, copy=True).requires_grad_(True)
        masters[id(v)] = (v, m)
    if not masters:
        raise DistillError(f"{what}: the student graph has no floating-point param to train (scope={scope}"
                           + (f", roles={list(roles)})" if roles is not None else ")"))
    plist = [m for _, m in masters.values()]
    masks = sparsity_masks(student, masters)
    scales = weight_scale_masters(student, masters)
    opt = torch.optim.AdamW(plist, lr=lr, weight_decay=weight_decay, **({"fused": True} if cuda else {}))

    def frac(i: int) -> float:
        done_frac = i / max(steps, 1)
        if max_seconds is not None:
            done_frac = max(done_frac, (time.perf_counter() - t0) / max_seconds)
        return done_frac

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: lr_factor(frac(i), schedule, warmup))
    autocast = dtype == "bfloat16"
    s_params = _Params(dev, masters)
    ste = activation_straight_through(student.nodes)
    t_params = _TeacherParams(dev, torch.bfloat16 if autocast else None)
    gen = torch.Generator().manual_seed(seed)
    seq = int(windows.shape[1])
    held = windows[windows.shape[0] - holdout:] if holdout else windows[:0]
    train = windows[:windows.shape[0] - holdout]
    stream = train.reshape(-1) if random_offsets else None
    n_train = int(train.shape[0])
    per_step = min(batch, n_train)
    order: list[int] = []
    history: list[float] = []
    pending: list[torch.Tensor] = []
    held_hist: list[tuple[int, float]] = []
    best: tuple[float, int, list[torch.Tensor] | None] = (math.inf, 0, None)
    held_ref: list[torch.Tensor] = []

    def flush(step: int) -> None:
        if not pending:
            return
        vals = torch.stack(pending).float().cpu().tolist()
        pending.clear()
        for k, value in enumerate(vals):
            if not math.isfinite(value):
                raise DistillError(f"{what}: step {step - len(vals) + k + 1} of {steps}: the KL is {value} "
                                   f"(diverged; lower lr={lr})")
            history.append(round(value, 5))

    def held_kl() -> float:
        if not holdout:
            return math.nan
        total = 0.0
        with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast):
            for j in range(0, holdout, per_step):
                ids = held[j:j + per_step].to(dev)
                try:
                    if len(held_ref) <= j // per_step:
                        ref = _forward(teacher, ids, t_params)
                        held_ref.append(ref.to(torch.bfloat16) if autocast else ref)
                    s = _forward(student, ids, s_params, ste)
                except CalibrationError as exc:
                    raise DistillError(f"{what}: held-out windows {j}..{j + ids.shape[0] - 1}: {exc}") from None
                total += float(logit_kl(s, held_ref[j // per_step], topk)) * ids.shape[0]
        return total / holdout

    def check_held(step: int) -> None:
        nonlocal best
        value = held_kl()
        held_hist.append((step, round(value, 5)))
        if value < best[0]:
            best = (value, step, [m.detach().clone() for m in plist])

    if holdout:
        check_held(0)
    done = 0
    stopped = False
    bar = tqdm(range(steps), desc=what, unit="step", disable=not progress)
    for step in bar:
        if max_seconds is not None and step > 0 and time.perf_counter() - t0 > max_seconds:
            stopped = True
            break
        if stream is not None:
            starts = torch.randint(0, stream.numel() - seq + 1, (per_step,), generator=gen)
            ids = torch.stack([stream[s:s + seq] for s in starts.tolist()])
        else:
            pick = []
            while len(pick) < per_step:
                if not order:
                    order = torch.randperm(n_train, generator=gen).tolist()
                pick.append(order.pop())
            ids = train[pick]
        ids = ids.to(dev, non_blocking=True)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast):
            with torch.no_grad():
                try:
                    target = _forward(teacher, ids, t_params)
                except CalibrationError as exc:
                    raise DistillError(f"{what}: step {step}: teacher: {exc}") from None
            with torch.enable_grad():
                try:
                    logits = _forward(student, ids, s_params, ste)
                except CalibrationError as exc:
                    raise DistillError(f"{what}: step {step}: student: {exc}") from None
                if logits.shape != target.shape:
                    raise DistillError(f"{what}: the student's logits are {list(logits.shape)} and the teacher's "
                                       f"{list(target.shape)}: they must match")
                loss = logit_kl(logits, target, topk)
                kl = loss.detach()
                if ce_weight > 0:
                    ce = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
                    loss = loss + ce_weight * ce
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(plist, clip)
        opt.step()
        with torch.no_grad():
            for m, keep in masks:
                m.mul_(keep)
            for m in scales:
                m.clamp_(min=SCALE_EPS)
        sched.step()
        pending.append(kl)
        done += 1
        if done == 2 and max_seconds is None and steps > done:  # the first step pays one-off costs; two are a rate
            per_step_s = (time.perf_counter() - t0) / done
            if per_step_s * steps > SLOW_RUN_WARN_SECONDS:
                warnings.warn(f"{what}: {steps} steps at {per_step_s:.1f} s a step will take about "
                              f"{per_step_s * steps / 60:.0f} minutes on {dev}; use a GPU (device=cuda), fewer "
                              "tokens, or max_seconds to cap it", stacklevel=2)
        if done % log_every == 0:
            flush(step)
            if progress:
                tps = done * per_step * seq / (time.perf_counter() - t0)
                bar.set_postfix(kl=f"{history[-1]:.4f}", tok_s=f"{tps:.0f}")
        if holdout and eval_every and done % eval_every == 0:
            check_held(done)
        del logits, target, loss
    bar.close()
    flush(done)
    if cuda:
        torch.cuda.synchronize(dev)
    train_seconds = time.perf_counter() - t0
    if holdout and (not held_hist or held_hist[-1][0] != done):
        check_held(done)
    restored = best[2] is not None and best[1] != done
    with torch.no_grad():
        if restored:
            for m, b in zip(plist, best[2]):
                m.copy_(b)
        for v, m in masters.values():
            if not torch.isfinite(m).all():
                raise DistillError(f"{what}: param @{v.name} is not finite after {done} steps (lower lr={lr})")
            student.set_param(v.name, m.detach().to(home, v.data.dtype))
    tail = history[-max(1, len(history) // 10):] if history else [float("nan")]
    tokens = done * per_step * seq
    return DistillStats(
        steps=done, tokens=tokens,
        kl_first=history[0] if history else float("nan"), kl_last=history[-1] if history else float("nan"),
        kl_mean_last_10pct=round(sum(tail) / len(tail), 5),
        trained_params=sum(m.numel() for _, m in masters.values()), trained_tensors=len(masters),
        seconds=round(time.perf_counter() - t0, 2), stopped_early=stopped, history=history,
        tokens_per_second=round(tokens / max(train_seconds, 1e-9), 1), train_tokens=int(train.numel()),
        holdout_kl=held_hist, best_step=best[1] if holdout else done, restored_best=restored)
