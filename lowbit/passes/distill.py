"""The ``distill`` pass: recover a pruned model by training its weights toward the float model's logits.

    prune-mlp(ratio=0.27,score=fluctuation,compensate=true),distill(tokens=1000000,device=cuda,dtype=bfloat16)
    ...,distill(tokens=100000000,max_seconds=240,device=cuda,dtype=bfloat16,calib_n=61,calib_len=1024,batch_size=16,
                lr=2e-4,schedule=cosine,warmup=0.03,random_offsets=true,holdout=6,eval_every=100)   # the GPU recovery

Why: structured pruning (``prune-mlp``, ``prune-heads``, ``prune-blocks``) gives a smaller dense model, but its
one-shot repairs are local and the perplexity gap grows with the ratio; a short end-to-end distillation on
calibration text closes much of it for a stated token budget (``tokens``). The teacher is the model as the
pipeline received it (the ``PassManager`` snapshots it before the first pass: ``needs_reference``), so a text
pipeline needs nothing else; ``lowbit.calibration.distill`` is the training loop (KL to the teacher's logits,
AdamW, float32 masters, bf16 autocast with ``dtype=bfloat16``).

Place in the pass contract: after the pruning passes, before any quantizer (it is in ``WEIGHT_REWRITES``:
``quantize``/``gptq``/``awq``/``autoround`` must come after it) and on a float graph (no ``qlinear`` nor weight
``dequantize``). Approximating, not exact: the stats carry the KL on the first and last training batches, the
steps and tokens run and the trained params. The graph's shapes do not change; trained params are replaced with
``graph.set_param`` in their own dtype and device. A linear ``sparsify`` pruned (``meta["sparsity"]``) keeps its
mask: its zeros are re-applied after every step, so recovery never undoes the sparsity the meta promises.

The tokens come from the calibration options: ``calib_n`` windows of ``calib_len`` from ``calib`` (default the
shipped WikiText-2 validation excerpt, 123 windows of 512), visited in shuffled epochs until ``tokens`` are
spent (``batch_size`` windows per step). ``max_seconds`` caps the wall time (the stats say what ran).
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import Field, model_validator

from lowbit.calibration.distill import DistillError, DistillStats, ParamRole, distill_logits
from lowbit.ir.graph import Graph
from lowbit.passes.base import (
    NO_QLINEAR,
    WEIGHT_REWRITES,
    CalibrationOptions,
    Pass,
    PassError,
    PassResult,
    no_op,
    register_pass,
)

__all__ = ["Distill", "DistillOptions", "run_distillation"]


class DistillOptions(CalibrationOptions):
    calib_n: int = Field(default=112, ge=1)
    """Training windows (the shipped text has 123 of 512 tokens)."""
    tokens: int = Field(default=200_000, ge=1)
    """Token budget: steps = ceil(tokens / (batch_size * calib_len))."""
    lr: float = Field(default=1e-4, gt=0, le=1)
    """AdamW's first learning rate, decaying linearly to 0 over the steps."""
    weight_decay: float = Field(default=0.0, ge=0)
    """AdamW's decoupled weight decay (0: none)."""
    clip: float = Field(default=1.0, ge=0)
    """Gradient-norm clipping (0: none)."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Forward precision: float32, or bf16 autocast (float32 master weights either way)."""
    scope: Literal["blocks", "all"] = "blocks"
    """Which params train: those of the repeated blocks (default; the embedding and head stay), or all."""
    max_seconds: float | None = Field(default=None, gt=0)
    """Stop after this many seconds even if tokens remain (a GPU-time cap; the stats say how many ran)."""
    seed: int = 0
    """Seed of the training windows' order (and offsets, with ``random_offsets``)."""
    batch_size: int = Field(default=8, ge=1)
    """Windows per training step."""
    schedule: Literal["linear", "cosine"] = "linear"
    """Learning-rate decay to 0 after the warmup."""
    warmup: float = Field(default=0.0, ge=0.0, lt=1.0)
    """Fraction of the run (steps, or ``max_seconds``) over which the learning rate rises linearly first."""
    topk: int = Field(default=0, ge=0)
    """KL over the teacher's top-k tokens plus one bucket for the rest (0: the whole vocabulary)."""
    random_offsets: bool = False
    """Training windows start anywhere in the text (the calibration windows read as one stream)."""
    holdout: int = Field(default=0, ge=0)
    """Calibration windows kept out of training; the params with the lowest KL on them are written back."""
    eval_every: int = Field(default=0, ge=0)
    """Steps between held-out KL measurements (0: only at the start and the end)."""
    ce_weight: float = Field(default=0.0, ge=0.0)
    """Weight of an added cross-entropy to the text's next token (0: pure distillation)."""

    @model_validator(mode="after")
    def _eval_every_needs_holdout(self) -> DistillOptions:
        # eval_every measures the KL on the held-out windows: without them it did nothing
        self.refuse_unread({"eval_every": None if self.holdout else "holdout=N"})
        return self


@register_pass
class Distill(Pass):
    """Recovery after pruning: KL distillation of the graph's logits toward the float model's, for a token budget."""

    name = "distill"
    Options = DistillOptions
    requires = (NO_QLINEAR, no_op("dequantize", "it trains float weights: distill before quantizing"))
    needs_reference = True
    after = tuple(p for p in WEIGHT_REWRITES if p != "distill")  # the rotation and the pruning passes

    def run(self, graph: Graph) -> PassResult:
        o: DistillOptions = self.options  # type: ignore[assignment]
        teacher = self.reference
        if teacher is None:
            raise PassError("pass distill: no teacher: run it in a pipeline (the PassManager hands it the model "
                            "as the pipeline received it) or set the pass's .reference to the float graph")
        st, stats = run_distillation(self.name, graph, teacher, o)
        return PassResult(st.steps > 0, stats)


def run_distillation(pass_name: str, graph: Graph, teacher: Graph, o: DistillOptions,
                     roles: list[ParamRole] | None = None) -> tuple[DistillStats, dict[str, Any]]:
    """The training loop of ``distill`` and ``tune-qparams`` with ``o``'s options: the calibration windows, the
    steps the token budget buys, the run, and the stats both passes report (errors as ``PassError``)."""
    ids = o.token_ids(graph, pass_name)
    if o.holdout >= ids.shape[0]:
        raise PassError(f"pass {pass_name}: option holdout={o.holdout} leaves none of the {ids.shape[0]} "
                        "calibration windows to train on")
    batch = min(o.batch_size_for(graph), ids.shape[0] - o.holdout)
    steps = max(1, math.ceil(o.tokens / (batch * ids.shape[1])))
    try:
        st = distill_logits(graph, teacher, ids, steps=steps, lr=o.lr, batch=batch,
                            device=o.torch_device(pass_name), dtype=o.dtype, weight_decay=o.weight_decay,
                            clip=o.clip, scope=o.scope, seed=o.seed, max_seconds=o.max_seconds,
                            progress=o.progress, what=f"pass {pass_name}", schedule=o.schedule, warmup=o.warmup,
                            topk=o.topk, random_offsets=o.random_offsets, holdout=o.holdout,
                            eval_every=o.eval_every, ce_weight=o.ce_weight, roles=roles)
    except DistillError as exc:
        raise PassError(str(exc)) from None
    stats = {"steps": st.steps, "steps_planned": steps, "tokens": st.tokens, "token_budget": o.tokens,
             "kl_first": st.kl_first, "kl_last": st.kl_last, "kl_last_10pct": st.kl_mean_last_10pct,
             "trained_params": st.trained_params, "trained_tensors": st.trained_tensors,
             "stopped_early": st.stopped_early, "seconds": st.seconds, "calib_windows": int(ids.shape[0]),
             "batch_windows": batch, "tokens_per_second": st.tokens_per_second,
             "train_tokens": st.train_tokens, "epochs": round(st.tokens / max(st.train_tokens, 1), 2),
             "holdout_kl": st.holdout_kl, "best_step": st.best_step, "restored_best": st.restored_best}
    return st, stats
