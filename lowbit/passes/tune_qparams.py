"""The ``tune-qparams`` pass: after quantization, train the quantized model's continuous params (weight scales,
norm gains, biases) end to end toward the float model's logits, the integer codes fixed.

    fold-norms,rotate,gptq(w=int4,group=64,sym=false,clip=true),tune-qparams(device=cuda,dtype=bfloat16)
    ...,quantize(a=int8),tune-qparams(calib=wikitext2-valid,calib_n=500,holdout=8,tokens=2000000,device=cuda)

Why: GPTQ, AWQ and AutoRound round one linear or one block at a time against a local error; what is left is
the error the whole depth compounds. With the codes chosen, the group scales are a small set of continuous
params (one per 64 weights at g64) that can still move: a short distillation of the quantized model's next-token
distribution to the float model's (EfficientQAT's E2E-QP, Chen et al. 2024) corrects the compounded error at a
cost the GPU pays in seconds. Activation and KV-cache quantizers stay in the forward with a straight-through
gradient (``lowbit.calibration.block_tuning.activation_straight_through``), so W4A8 and W4A4KV4 scales are tuned
against the activations' real rounding.

Place: after every pass that quantizes or calibrates (``quantize``, ``gptq``, ``awq``, ``autoround``,
``clip-activations``: the model it tunes is the one they leave), before the fusion passes (no ``qlinear``).
The teacher is the model as the pipeline received it (``needs_reference``): a pipeline starting from the float
model needs nothing else; a teacher that is itself quantized is an error. Approximating, not exact: the stats
carry the KL on the first and last batches (and on held-out windows with ``holdout``), the params trained per
role and how far the scales moved. Codes, zero points and shapes never change, so every backend and checkpoint
format takes the result as it takes the quantizer's.

The loop is ``lowbit.calibration.distill.distill_logits`` with ``roles``: the options are ``distill``'s (tokens,
lr, schedule, holdout, ...), with ``train`` choosing the roles and a learning rate sized for scales.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from lowbit.calibration.distill import ParamRole, is_weight_dequantize, trainable_params
from lowbit.ir.graph import Graph
from lowbit.passes.base import NO_QLINEAR, WEIGHT_PASSES, Condition, Pass, PassError, PassResult, register_pass
from lowbit.passes.distill import DistillOptions, run_distillation

__all__ = ["TuneQParams", "TuneQParamsOptions"]


def _weight_dequantizes(graph: Graph) -> list[str]:
    return [n.name for n in graph.nodes if is_weight_dequantize(n)]


QUANTIZED_WEIGHTS = Condition(
    "some weight is quantized (a dequantize reading codes): run quantize, gptq, awq or autoround first",
    lambda g: [] if _weight_dequantizes(g) else ["the graph has no quantized weight"])


class TuneQParamsOptions(DistillOptions):
    train: list[ParamRole] = Field(default_factory=lambda: ["scales", "norms", "biases"], min_length=1)
    """Which params train: the weights' ``scales``, the ``norms``' gains and biases, the linears' ``biases``."""
    lr: float = Field(default=2e-5, gt=0, le=1)
    """AdamW's first learning rate (absolute, as for the scales: group scales of int4 weights are ~1e-3-1e-2)."""
    tokens: int = Field(default=1_000_000, ge=1)
    """Token budget: steps = ceil(tokens / (batch_size * calib_len))."""
    scope: Literal["blocks", "all"] = "all"
    """``all``: every quantized linear, the head included (``blocks``: only the repeated blocks')."""
    calib_n: int = Field(default=117, ge=1)
    """Training windows (the shipped excerpt has 123 of 512; ``calib=wikitext2-valid`` has 534)."""


@register_pass
class TuneQParams(Pass):
    """After quantization: distil the quantized model's scales (and norms, biases) toward the float logits."""

    name = "tune-qparams"
    Options = TuneQParamsOptions
    requires = (NO_QLINEAR, QUANTIZED_WEIGHTS)
    needs_reference = True
    after = (*(p for p in WEIGHT_PASSES if p != "tune-qparams"), "clip-activations")

    def run(self, graph: Graph) -> PassResult:
        o: TuneQParamsOptions = self.options  # type: ignore[assignment]
        teacher = self.reference
        if teacher is None:
            raise PassError(f"pass {self.name}: no teacher: run it in a pipeline that starts from the float model "
                            "(the PassManager hands it the model as the pipeline received it) or set .reference")
        quantized = _weight_dequantizes(teacher)
        if quantized:
            raise PassError(f"pass {self.name}: the teacher is quantized (%{quantized[0]} and {len(quantized) - 1} "
                            "more weight dequantizes): start the pipeline from the float model")
        roles = list(dict.fromkeys(o.train))
        by_role = {r: trainable_params(graph, o.scope, [r]) for r in roles}
        if not any(by_role.values()):
            raise PassError(f"pass {self.name}: nothing to train for train={roles} (scope={o.scope})")
        scales_before = {v.name: v.data.detach().float().clone() for v in by_role.get("scales", [])}
        st, stats = run_distillation(self.name, graph, teacher, o, roles)
        moved = [float(((graph.params[name].data.float() - old).abs() / old.abs().clamp_min(1e-12)).mean())
                 for name, old in scales_before.items()]
        stats.update(params_per_role={r: sum(v.data.numel() for v in vs) for r, vs in by_role.items()},
                     scale_change_mean=round(sum(moved) / len(moved), 5) if moved else 0.0)
        return PassResult(st.steps > 0, stats)

