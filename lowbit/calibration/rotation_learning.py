"""Learning an orthogonal rotation on the Stiefel manifold that makes activations easy to quantize (KurTail).

A per-token 4-bit quantizer spends its 16 levels on ``[-max|x|, max|x|]``; a token whose channels are
heavy-tailed (a few huge, most tiny) rounds most channels to zero. Kurtosis ``E[(x-μ)⁴]/E[(x-μ)²]²`` measures
that tailedness: 3 for a Gaussian (what a random Hadamard gives, by the central limit theorem), 1.8 for a
uniform distribution, which a uniform quantizer covers best. KurTail (Akhondzadeh et al., 2025,
arXiv:2503.01483) learns the residual-stream rotation ``Q`` that drives the per-token kurtosis of ``x·Q``
towards the uniform's, for every ``x`` a rotated linear reads.

Because unit-gain RMSNorm is rotation invariant (``norm(x·Q) = norm(x)·Q``), the normalised residual streams of
the float model are the same whatever ``Q`` is: they are collected once, and the rotation is learned offline on
them (no model forward per step), which is why this is cheap enough for a CPU.

The optimiser keeps ``Q`` exactly orthogonal by construction: ``Q = Q₀·C(S)`` with the Cayley transform
``C(S) = (I - S)⁻¹(I + S)`` of a skew-symmetric ``S = A - Aᵀ`` (every rotation near ``Q₀`` without a -1
eigenvalue is reached), and Adam on ``A``. The result is recomputed in float64 and projected onto the
orthogonal group (polar factor) so that ``‖QQᵀ - I‖`` is float64 rounding, whatever float the steps ran in.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from lowbit.calibration.distill import lr_factor
from lowbit.calibration.engine import CalibrationError
from lowbit.calibration.linalg import solve
from lowbit.ir.graph import Graph, Node

__all__ = ["RotationLearningError", "LearnedRotation", "kurtosis", "kurtosis_loss", "tail_ratio",
           "tail_ratio_reference", "cayley", "TAIL_MEANS", "LR_SCHEDULES", "token_losses", "pool_tokens",
           "learn_kurtosis_rotation", "learn_kurtosis_rotations", "orthogonal_polar", "fake_quant_weight",
           "fake_quant_tokens", "learn_quantized_rotation"]

LR_SCHEDULES = ("constant", "cosine")
"""How kind=kurtosis's Adam step size runs over the steps (``lr_schedule``)."""

UNIFORM_KURTOSIS = 1.8
"""Kurtosis of a uniform distribution: the shape a uniform (integer) quantizer covers with the least error."""


class RotationLearningError(CalibrationError):
    """The rotation learning diverged (a NaN or an infinite loss), named with its step."""


@dataclass
class LearnedRotation:
    q: torch.Tensor
    """The learned float64 orthogonal matrix."""
    kurtosis_start: float
    """Mean per-token kurtosis of the samples under the starting rotation (all sites, float64)."""
    kurtosis_end: float
    loss_start: float
    loss_end: float
    steps: int
    seconds: float
    orthogonality: float
    """``max|QQᵀ - I|`` of ``q`` in float64."""
    history: list[float] = field(default_factory=list)
    """Loss every tenth step (the minibatch loss, for a look at convergence)."""
    check: dict[str, Any] | None = None
    """learned (SpinQuant): the quantized loss of the start and of the learned rotation on the same fixed windows,
    and which one was ``kept`` (the learned one only when it is lower: a learned method never ends worse than
    its start); kurtosis (KurTail): the kurtosis loss of both on every sample, the start kept when the learned
    one's is higher."""
    windows_per_step: int | None = None
    """learned: calibration windows each step ran on (``batch``, or fewer when fewer windows remain to train on)."""
    tokens_per_step: int | None = None
    """kurtosis: rows each step drew: ``batch_tokens`` spread over the sites, at most as many as each site holds."""


def kurtosis(y: torch.Tensor) -> torch.Tensor:
    """Per-row kurtosis ``E[(y-μ)⁴] / E[(y-μ)²]²`` over the last axis (the channels of a token)."""
    c = y - y.mean(-1, keepdim=True)
    m2 = c.square().mean(-1)
    return c.pow(4).mean(-1) / m2.square().clamp_min(torch.finfo(y.dtype).tiny)


def rotate_tokens(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``x·Q``, or with ``Q`` smaller than a token, ``x·(I ⊗ Q)`` (each head's slice rotated). A stack of rotations
    ``q`` ``[problems, n, n]`` rotates each problem's rows ``x[j]`` (``[problems, tokens, width]``) by its own
    ``q[j]``, every head slice of a problem in one product."""
    n = q.shape[-1]
    if x.shape[-1] == n:
        return x @ q
    rows = x.shape[:1] if q.dim() == 3 else x.shape[:-1]
    return (x.reshape(*rows, -1, n) @ q).reshape(x.shape)


TAIL_MEANS = ("mean", "square")
"""How the per-token losses become one: their mean, or the mean of their squares (the worst tokens weigh more:
a token's 4-bit error grows with its own tail, and a few heavy-tailed tokens can cost more than the typical
token gains)."""


def token_losses(x: torch.Tensor, q: torch.Tensor, target: float = UNIFORM_KURTOSIS, moment: int = 4
                 ) -> torch.Tensor:
    """Per token: ``|kurtosis(x·Q) - target|`` (KurTail's), or for ``moment`` p > 4 the ``tail_ratio`` of order p
    (``target`` unused)."""
    return _rotated_losses(rotate_tokens(x, q), target, moment)


def _rotated_losses(y: torch.Tensor, target: float, moment: int, kurt: torch.Tensor | None = None) -> torch.Tensor:
    """``token_losses`` of rows already rotated; ``kurt``: their kurtosis where the caller has it already."""
    if moment == 4:
        return ((kurtosis(y) if kurt is None else kurt) - target).abs()
    return tail_ratio(y, moment)


def _weighed(losses: torch.Tensor, tail_mean: str) -> torch.Tensor:
    """The per-token ``losses`` as ``tail_mean`` (``TAIL_MEANS``) weighs them before they are averaged."""
    if tail_mean == "square":
        return losses.square()
    if tail_mean != "mean":
        raise ValueError(f"tail_mean={tail_mean!r}: expected one of {', '.join(TAIL_MEANS)}")
    return losses


def pool_tokens(losses: torch.Tensor, tail_mean: str = "mean") -> torch.Tensor:
    """The per-token ``losses`` as one number the way ``tail_mean`` says (``TAIL_MEANS``)."""
    return _weighed(losses, tail_mean).mean()


def kurtosis_loss(x: torch.Tensor, q: torch.Tensor, target: float = UNIFORM_KURTOSIS,
                  moment: int = 4, tail_mean: str = "mean") -> torch.Tensor:
    """Mean over tokens of ``|kurtosis(x·Q) - target|`` (KurTail's objective); ``moment`` p > 4: the mean
    ``tail_ratio`` of order p instead (``target`` unused); ``tail_mean="square"``: the mean of their squares."""
    return pool_tokens(token_losses(x, q, target, moment), tail_mean)


TAIL_CHUNK_ELEMENTS = 1 << 21
"""Values per row chunk of ``tail_ratio`` on the CPU (8 MB of float32, SmolLM2's 3640 rows of 576): the chunk and its
temporaries stay in cache, so its ~25 elementwise passes run from cache instead of each reading and writing the whole
``[problems, tokens, width]`` stack from memory (283 MB for SmolLM2's 30 R2s). Forward+backward over 122880 rows of
576 on the 2-core CPU, idle: 0.19 s at 2^19 to 2^21 values, 0.23 s at 2^22, 0.55 s unchunked (the plain
expression's autograd: 2.8 s); beside two busy processes each pass can wait for a descheduled thread, so fewer chunks
lose less: median of 7, 0.65 s at 2^21, 0.9 s at 2^22, 0.5 to 15 s at 2^19 and 2^20 (plain: 5.3 s)."""


def _tail_chunk_rows(rows: torch.Tensor) -> int:
    """Rows of ``rows`` per chunk: a cache-sized chunk on the CPU; elsewhere (a GPU) all of them, one launch per
    pass, since a GPU's passes at these sizes are bound by launches, not by a cache."""
    if rows.device.type != "cpu":
        return max(1, rows.shape[0])
    return max(1, TAIL_CHUNK_ELEMENTS // max(1, rows.shape[-1]))


def _power_(x: torch.Tensor, k: int) -> torch.Tensor:
    """``x**k`` (``k >= 0``) by repeated squaring, overwriting ``x``: from cache, a handful of multiplications cost
    less than one ``pow`` (which calls the general power function per value: ~20x a multiplication on the CPU)."""
    if k == 0:
        return x.fill_(1)
    result = None
    while k:
        if k & 1:
            if k == 1 and result is None:
                return x
            result = x.clone() if result is None else result.mul_(x)
        k >>= 1
        if k:
            x.square_()
    assert result is not None
    return result


def _scaled_rows(rows: torch.Tensor, means: torch.Tensor, tops: torch.Tensor) -> torch.Tensor:
    """``(rows - μ) / t`` per row, a new tensor (``t``: the row's max ``|y - μ|``; a flat row, ``t = 0``: zeros)."""
    return torch.sub(rows, means).mul_(1.0 / tops.clamp_min(torch.finfo(rows.dtype).tiny))


class _TailRatio(torch.autograd.Function):
    """``tail_ratio`` with a hand-written backward, both run over cache-sized row chunks. Autograd of the plain
    expression kept ~12 full-size intermediates and made ~25 passes over them from memory (2.6 s forward+backward
    over SmolLM2's 122880 R2 rows of 576 on the idle 2-core CPU); this keeps four numbers a row (mean, maximum
    ``t``, the two sums) and recomputes a chunk's scaled rows in the backward.

    For a row ``c = y - mean(y)`` of n channels, ``u = c / t`` with ``t = max|c|``, ``S_p = Σ|u_i|^p``,
    ``S_2 = Σu_i²`` and ``L = log(S_p/n)/p - log(S_2/n)/2``: ``∂L/∂u_i = sign(u_i)|u_i|^(p-1)/S_p - u_i/S_2``,
    ``∂L/∂c_i = ∂L/∂u_i / t``, and through the mean ``∂L/∂y = ∂L/∂c - mean(∂L/∂c)``. The path through ``t`` (the
    row's maximum, a function of the row too) cancels exactly: ``L`` is homogeneous of degree 0 in ``u``, so
    ``L(c/t)`` does not depend on ``t``; its derivative in ``t``, ``-Σ_i u_i ∂L/∂u_i / t = -(S_p/S_p - S_2/S_2) / t``,
    is 0. Autograd of the plain expression adds that 0 as rounding (a few ulps times n at the argmax channel); this
    leaves it out. A flat row (``t = 0``) is a constant 0 with a zero gradient, as before."""

    @staticmethod
    def forward(ctx: Any, y: torch.Tensor, p: int) -> torch.Tensor:  # type: ignore[override]
        width = y.shape[-1]
        rows = y.detach().reshape(-1, width)
        means, tops, sum_p, sum_2 = (torch.empty(rows.shape[0], 1, dtype=y.dtype, device=y.device) for _ in range(4))
        step = _tail_chunk_rows(rows)
        for start in range(0, rows.shape[0], step):
            chunk, span = rows[start:start + step], slice(start, start + step)
            mean = torch.mean(chunk, -1, keepdim=True, out=means[span])
            # rounding is monotonic, so max|y - μ| rounded is max(max y - μ, μ - min y) rounded: the same t
            torch.maximum(chunk.amax(-1, keepdim=True) - mean, mean - chunk.amin(-1, keepdim=True), out=tops[span])
            u = _scaled_rows(chunk, mean, tops[span])
            if p % 2:
                magnitude = u.abs_()
                torch.sum(magnitude.square(), -1, keepdim=True, out=sum_2[span])
                torch.sum(_power_(magnitude, p), -1, keepdim=True, out=sum_p[span])
            else:
                square = u.square_()
                torch.sum(square, -1, keepdim=True, out=sum_2[span])
                torch.sum(_power_(square, p // 2), -1, keepdim=True, out=sum_p[span])
        loss = sum_p.log().sub_(math.log(width)).div_(p).sub_(sum_2.log().sub_(math.log(width)).div_(2))
        loss = torch.where(tops == 0, 0.0, loss)  # flat: u is 0, the loss log(0) - log(0)
        ctx.save_for_backward(y, means, tops, sum_p, sum_2)
        ctx.p = p
        return loss.reshape(y.shape[:-1])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        y, means, tops, sum_p, sum_2 = ctx.saved_tensors
        p, width = ctx.p, y.shape[-1]
        rows = y.reshape(-1, width)
        # ∂L/∂c_i = u_i (a|u_i|^(p-2) - b) per row, a = 1/(t S_p), b = 1/(t S_2); a flat row (t = 0) gets none
        flat = tops == 0
        scale = grad_loss.reshape(-1, 1) / tops
        a = torch.where(flat, 0.0, scale / sum_p)
        b = torch.where(flat, 0.0, scale / sum_2)
        grad = torch.empty_like(rows)
        step = _tail_chunk_rows(rows)
        for start in range(0, rows.shape[0], step):
            span = slice(start, start + step)
            u = _scaled_rows(rows[span], means[span], tops[span])
            power = _power_(u.abs(), p - 2) if p % 2 else _power_(u.square(), p // 2 - 1)  # |u|^(p-2)
            grad_c = power.mul_(a[span]).sub_(b[span]).mul_(u)
            torch.sub(grad_c, grad_c.mean(-1, keepdim=True), out=grad[span])
        return grad.reshape(y.shape), None


def tail_ratio(y: torch.Tensor, p: int) -> torch.Tensor:
    """Per-row ``log(‖y-μ‖_p / ‖y-μ‖_2)`` with the norms as means (p-th and quadratic mean): 0 for a row whose
    channels all have one magnitude, growing with its tail. Kurtosis is this ratio at p = 4 (to the 4th power);
    at larger p it nears ``log(max|y-μ| / rms)``, the ratio a per-token absmax scale pays for: its step is set by
    the largest channel, its error by the step. Computed from the row's maximum so that ``|y|^p`` cannot
    overflow. A row without spread (all channels equal: the normalised stream of a zero embedding, e.g. a padding
    token's) is 0 too, not the NaN of log(0) - log(0) that made the whole loss NaN. Its gradient is hand-written
    and both passes run in cache-sized row chunks (``_TailRatio``): the autograd of the plain expression was
    memory-bound; ``tail_ratio_reference`` is the plain expression it equals."""
    if p < 2:
        raise ValueError(f"tail_ratio: order p={p} for rows of shape {tuple(y.shape)}: expected p >= 2")
    return _TailRatio.apply(y, p)


def tail_ratio_reference(y: torch.Tensor, p: int) -> torch.Tensor:
    """``tail_ratio`` as the plain expression, differentiated by autograd: what the fast one is tested against."""
    c = y - y.mean(-1, keepdim=True)
    top = c.abs().amax(-1, keepdim=True)
    flat = top == 0
    u = torch.where(flat, torch.ones_like(c), c / top.clamp_min(torch.finfo(y.dtype).tiny))
    return u.abs().pow(p).mean(-1).log() / p - u.square().mean(-1).log() / 2


def cayley(a: torch.Tensor) -> torch.Tensor:
    """``(I - S)⁻¹(I + S)`` with ``S = A - Aᵀ``: an orthogonal matrix (``C(0) = I``), differentiable in ``A``; a
    stack ``[..., n, n]`` gives one per matrix (solved one at a time on the CPU: ``lowbit.calibration.linalg``)."""
    s = a - a.mT
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    return solve(eye - s, eye + s)


def orthogonal_polar(q: torch.Tensor) -> torch.Tensor:
    """The nearest orthogonal matrix (polar factor ``U·Vᵀ``) in float64: removes accumulated rounding."""
    u, _, vh = torch.linalg.svd(q.to(torch.float64))
    return u @ vh


def _check_samples(samples: Sequence[torch.Tensor]) -> None:
    if not samples:
        raise RotationLearningError("rotation learning got no activation samples")
    dims = {s.shape[-1] for s in samples}
    if len(dims) != 1:
        raise RotationLearningError(f"rotation learning: activation samples of different widths {sorted(dims)}")


POOL_CHUNK = 2048
"""Tokens per float64 chunk when the loss and kurtosis are taken over every sample (start and end of learning):
the whole pool in float64 held several copies of the samples at once (a KurTail pass's host-memory peak; a chunk
of 2048 SmolLM2 tokens is five 9 MB temporaries)."""


def _pool_means(sites: Sequence[torch.Tensor], q: torch.Tensor, target: float, moment: int = 4,
                tail_mean: str = "mean") -> tuple[float, float]:
    """(mean loss (``kurtosis_loss``'s), mean kurtosis) over every row of ``sites``, in float64, chunk by chunk."""
    loss = kurt = 0.0
    rows = 0
    for site in sites:
        q = q.to(site.device, torch.float64)
        for start in range(0, site.shape[0], POOL_CHUNK):
            y = rotate_tokens(site[start:start + POOL_CHUNK].double(), q)
            k = kurtosis(y)
            loss += float(_weighed(_rotated_losses(y, target, moment, k), tail_mean).sum())
            kurt += float(k.sum())
            rows += k.numel()
    return loss / rows, kurt / rows


def _overflow_cause(raw: torch.Tensor, site: torch.Tensor, q: torch.Tensor, moment: int, dtype: torch.dtype) -> str:
    """Why finite activations ``raw`` (``site``: them as learned on, in ``dtype``) give a non-finite loss, and the
    way out: only ``moment=4`` raises values to a power before scaling (``tail_ratio`` divides by each token's
    maximum first), so a larger moment helps only there."""
    largest = f"largest |value| {float(raw.detach().abs().max()):.3g}"
    if not torch.isfinite(site).all():
        return (f"finite, but beyond {dtype}'s range ({largest}) in which the steps learn: the model's activations "
                "are too large to learn from; kind=hadamard learns nothing")
    if not torch.isfinite(rotate_tokens(site, q)).all():
        return (f"finite, but x·Q overflows {dtype} ({largest}): the model's activations are too large to learn "
                "from; kind=hadamard learns nothing")
    if moment == 4:
        return (f"finite, but their fourth powers overflow {dtype} ({largest}); moment=16 scales each token by its "
                "own maximum before the power, so it cannot overflow")
    return f"finite ({largest}), and x·Q is too, but the moment={moment} tail ratio is not"


def learn_kurtosis_rotation(samples: Sequence[torch.Tensor], q0: torch.Tensor, *, steps: int, lr: float,
                            batch_tokens: int, target: float = UNIFORM_KURTOSIS, seed: int = 0,
                            dtype: torch.dtype = torch.float32, what: str = "rotation",
                            heads: int = 1, site_names: Sequence[str] | None = None, moment: int = 4,
                            tail_mean: str = "mean", device: torch.device | str | None = None,
                            lr_schedule: str = "constant") -> LearnedRotation:
    """Learn ``Q = Q₀·C(S)`` minimising the mean ``|kurtosis(x·Q) - target|`` over the rows of ``samples``
    (``moment`` p > 4: the mean ``tail_ratio`` of order p, a tail measure nearer the per-token absmax scale's;
    ``tail_mean="square"``: the mean of the per-token losses' squares, so the worst tokens weigh more).

    ``samples``: one ``[tokens, d]`` tensor per site (each normalised residual stream a rotated linear reads);
    every site weighs the same per token. ``heads > 1``: ``Q`` is ``[d/heads, d/heads]`` and rotates each of
    the ``heads`` slices of a token (R2: the per-head values o_proj reads), the kurtosis still taken over the
    whole token (its quantizer sees all heads at once). Each step draws ``batch_tokens`` rows spread evenly over the
    sites (a seeded draw with replacement, at most as many rows as a site holds), and ``tokens_per_step`` says how
    many a step drew: fewer than ``batch_tokens`` when the sites hold fewer. (Every row of such a site each step
    instead, the whole-batch gradient, measured worse: SmolLM2 kurtail-m16-r2 at seed 2, wt2-512x8, 75.69 against
    the draw's 70.31, its R2s fitting their 512 tokens.) ``q0`` is the start (a randomised
    Hadamard), returned instead when the learned ``Q``'s loss on every sample is higher (``check.kept``). A NaN or
    infinite loss, or a singular Cayley system, is a :class:`RotationLearningError` naming ``what`` and the step;
    non-finite samples (the model's own activations, before any step) are one naming the site (``site_names``, else
    its index). ``device``: where the steps and the losses over every sample run (unset: the CPU); the draws come
    from the same CPU generator there, and the rotation comes back on the CPU in float64 either way.
    ``lr_schedule``: ``constant`` (Adam at ``lr`` every step) or ``cosine`` (``lr`` decayed to 0 over the steps, so
    the last steps stop hopping between minibatches' minima).
    """
    return learn_kurtosis_rotations([samples], q0, steps=steps, lr=lr, batch_tokens=batch_tokens, target=target,
                                    seed=seed, dtype=dtype, whats=[what], heads=heads, moment=moment,
                                    site_names=None if site_names is None else [site_names], tail_mean=tail_mean,
                                    device=device, lr_schedule=lr_schedule)[0]


def learn_kurtosis_rotations(problems: Sequence[Sequence[torch.Tensor]], q0: torch.Tensor, *, steps: int, lr: float,
                             batch_tokens: int, whats: Sequence[str], target: float = UNIFORM_KURTOSIS, seed: int = 0,
                             dtype: torch.dtype = torch.float32, heads: int = 1,
                             site_names: Sequence[Sequence[str]] | None = None, moment: int = 4,
                             tail_mean: str = "mean", device: torch.device | str | None = None,
                             lr_schedule: str = "constant") -> list[LearnedRotation]:
    """``learn_kurtosis_rotation`` for several independent problems at once (each a list of site samples, its own
    rotation from ``q0``; R2: one per layer), in one set of steps: their Cayley parameters stacked, one Adam on the
    stack. Adam is elementwise and each problem's loss reads only its own parameter, so each rotation takes the
    steps it would take alone; learned one after the other, SmolLM2's 30 R2s were 30 x 100 steps of small
    operations, each step's cost mostly per-operation overhead (measured: ~90 s a layer on the shared 2-core CPU).
    Each problem draws its rows from its own generator seeded with ``seed``, as it would alone; ``whats``: each
    one's name in errors; ``device``: as ``learn_kurtosis_rotation``'s (on the CPU, SmolLM2's 30 R2s at 4096
    tokens each were 126 s of a 137 s learning on a 16-core host, session 43)."""
    t0 = time.perf_counter()
    d = q0.shape[0]
    if len(whats) != len(problems):
        raise ValueError(f"{len(problems)} problems but {len(whats)} names")
    if tail_mean not in TAIL_MEANS:
        raise RotationLearningError(f"{whats[0]}: tail_mean={tail_mean!r}: expected one of {', '.join(TAIL_MEANS)}")
    if lr_schedule not in LR_SCHEDULES:
        raise RotationLearningError(f"{whats[0]}: lr_schedule={lr_schedule!r}: expected one of "
                                    f"{', '.join(LR_SCHEDULES)}")
    names = [list(n) for n in site_names] if site_names is not None else [None] * len(problems)
    for samples, what, sn in zip(problems, whats, names):
        _check_samples(samples)
        for i, s in enumerate(samples):
            bad = int((~torch.isfinite(s)).sum())
            if bad:
                name = sn[i] if sn is not None else f"site {i}"
                raise RotationLearningError(f"{what}: the activations collected at {name} hold {bad} non-finite "
                                            f"values of {s.numel()}: the model produces them on the calibration "
                                            "text, before any learning step (not a learning-rate problem)")
    dev = torch.device("cpu") if device is None else torch.device(device)
    sites = [[s.reshape(-1, d * heads).to(dev, dtype) for s in samples] for samples in problems]
    gens = [torch.Generator().manual_seed(seed) for _ in sites]  # CPU draws: the same rows on every device
    per_site = [max(1, batch_tokens // len(p)) for p in sites]
    q0c = q0.to(dev, dtype)
    a = torch.zeros(len(problems), d, d, dtype=dtype, device=dev, requires_grad=True)
    opt = torch.optim.Adam([a], lr=lr)
    sched = (torch.optim.lr_scheduler.LambdaLR(opt, lambda i: lr_factor(i / steps, "cosine", 0.0))
             if lr_schedule == "cosine" else None)
    history: list[list[float]] = [[] for _ in problems]
    with torch.no_grad():
        starts = [_pool_means(p, q0, target, moment, tail_mean) for p in sites]
    for step in range(steps):
        batches = [torch.cat([s[torch.randint(0, s.shape[0], (min(n, s.shape[0]),), generator=gen).to(dev)]
                              for s in p])
                   for p, n, gen in zip(sites, per_site, gens)]
        opt.zero_grad(set_to_none=True)
        try:
            q = q0c @ cayley(a)
        except torch.linalg.LinAlgError as exc:
            raise RotationLearningError(f"{whats[0]}: step {step}: the Cayley system is singular ({exc})") from None
        if len({b.shape[0] for b in batches}) == 1:  # one batched product for every problem
            y = rotate_tokens(torch.stack(batches), q)
            losses = _weighed(_rotated_losses(y, target, moment), tail_mean).mean(-1)
        else:
            losses = torch.stack([kurtosis_loss(b, q[j], target, moment, tail_mean) for j, b in enumerate(batches)])
        values = losses.detach().tolist()
        bad = next((j for j, v in enumerate(values) if not math.isfinite(v)), None)
        if bad is not None and step == 0:
            with torch.no_grad():
                i = next((i for i, x in enumerate(sites[bad])
                          if not math.isfinite(float(kurtosis_loss(x, q[bad], target, moment, tail_mean)))), 0)
            name = names[bad][i] if names[bad] is not None else f"site {i}"
            cause = _overflow_cause(problems[bad][i], sites[bad][i], q[bad].detach(), moment, dtype)
            raise RotationLearningError(f"{whats[bad]}: step 0 of {steps}, before any update: the "
                                        f"{'kurtosis' if moment == 4 else f'moment={moment} tail'} loss is "
                                        f"{values[bad]} on the activations collected at {name} ({cause}): "
                                        "not a learning-rate problem")
        if bad is not None:
            raise RotationLearningError(f"{whats[bad]}: step {step} of {steps}: the kurtosis loss is {values[bad]} "
                                        f"(diverged; lower lr={lr})")
        losses.sum().backward()
        if not torch.isfinite(a.grad).all():
            j = int((~torch.isfinite(a.grad)).flatten(1).any(1).nonzero()[0])
            raise RotationLearningError(f"{whats[j]}: step {step} of {steps}: the gradient is not finite (lower "
                                        f"lr={lr})")
        opt.step()
        if sched is not None:
            sched.step()
        if step % 10 == 0 or step == steps - 1:
            for h, v in zip(history, values):
                h.append(round(v, 5))
    seconds = time.perf_counter() - t0
    learned = []
    with torch.no_grad():
        for j, (p, what) in enumerate(zip(sites, whats)):
            q = orthogonal_polar(q0.double().cpu() @ cayley(a[j].detach().double().cpu()))
            if not torch.isfinite(q).all():
                raise RotationLearningError(f"{what}: after {steps} steps the rotation is not finite")
            (loss_start, kurt_start), (loss_end, kurt_end) = starts[j], _pool_means(p, q, target, moment, tail_mean)
            # the steps score minibatches; on every sample a too large lr can end above the start: keep the start
            # then (as kind=learned's check does), so a learned rotation never ends worse than the Hadamard it began
            # from
            kept = "learned" if loss_end <= loss_start else "start"
            check = {"loss_start": round(loss_start, 4), "loss_learned": round(loss_end, 4), "kept": kept}
            if kept == "start":
                q, loss_end, kurt_end = orthogonal_polar(q0), loss_start, kurt_start
            ortho = float((q @ q.T - torch.eye(d, dtype=torch.float64)).abs().max())
            learned.append(LearnedRotation(q, kurt_start, kurt_end, loss_start, loss_end, steps, seconds, ortho,
                                           history[j], check,
                                           tokens_per_step=sum(min(per_site[j], s.shape[0]) for s in p)))
    return learned


# ---- SpinQuant-style: the quantized network's own loss -------------------------------------------------------

def fake_quant_weight(w: torch.Tensor, bits: int = 4) -> torch.Tensor:
    """Asymmetric per-output-channel round-to-nearest with a straight-through gradient (what RTN/GPTQ store);
    ``bits`` >= 16: ``w`` itself (float weights)."""
    if bits >= 16:
        return w
    top = 2**bits - 1
    lo, hi = w.amin(1, keepdim=True).clamp(max=0), w.amax(1, keepdim=True).clamp(min=0)
    scale = ((hi - lo) / top).clamp_min(1e-8)
    zp = torch.round(-lo / scale)
    dq = (torch.clamp(torch.round(w / scale) + zp, 0, top) - zp) * scale
    return w + (dq - w).detach()


def fake_quant_tokens(x: torch.Tensor, bits: int = 4) -> torch.Tensor:
    """Symmetric per-token round-to-nearest with a straight-through gradient (dynamic per-token activations);
    ``bits`` >= 16: ``x`` itself."""
    if bits >= 16:
        return x
    top = 2 ** (bits - 1) - 1
    scale = (x.detach().abs().amax(-1, keepdim=True) / top).clamp_min(1e-8)
    dq = torch.clamp(torch.round(x / scale), -top - 1, top) * scale
    return x + (dq - x).detach()


def _feeds(graph: Graph, ids: torch.Tensor) -> list[dict[Any, torch.Tensor]]:
    """The graph's inputs for the windows ``ids``, as calibration builds them (``batches_from_ids``): a generation
    step graph also takes positions and empty caches (its prefill of the windows), and its ``max_batch`` may split
    them; each feed's tensors on ``ids``' device."""
    from lowbit.calibration.engine import batches_from_ids

    return [{v: t.to(ids.device) for v, t in zip(graph.inputs, batch)}
            for batch in batches_from_ids(graph, ids.cpu(), ids.shape[0])]


def _quantized_loss(graph: Graph, ids: torch.Tensor, params: Any, replace: dict[int, Any]) -> torch.Tensor:
    """Mean next-token loss of the graph run with ``replace`` (the fake-quantized, rotated linears) on ``ids``."""
    from lowbit.calibration.engine import _execute  # same layer: the engine's node-by-node runner

    out_value, total = graph.outputs[0], None
    for env in _feeds(graph, ids):
        rows = env[graph.inputs[0]]
        _execute(graph.nodes, env, None, {out_value}, params, replace)
        logits = env[out_value]
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                                 rows[:, 1:].reshape(-1)) * (rows.shape[0] / ids.shape[0])
        total = loss if total is None else total + loss
        del env, logits
    assert total is not None
    return total


def _first_non_finite(graph: Graph, ids: torch.Tensor, params: Any, replace: dict[int, Any]) -> str:
    """The first node whose output is not finite when ``graph`` runs ``ids`` (as the learning runs it)."""
    from lowbit.calibration.engine import _execute  # same layer: the engine's node-by-node runner

    found: list[Node] = []

    def on_node(node: Node, args: tuple[Any, ...], kwargs: dict[str, Any], outs: list[Any]) -> None:
        if not found and any(isinstance(o, torch.Tensor) and o.is_floating_point() and not torch.isfinite(o).all()
                             for o in outs):
            found.append(node)

    with torch.no_grad():
        for env in _feeds(graph, ids):
            _execute(graph.nodes, env, on_node, {graph.outputs[0]}, params, replace)
    if not found:
        return "no node's output is, only the loss"
    n = found[0]
    return f"node %{n.name} ({n.op}, module {n.module!r}) is the first whose output is not finite"


def learn_quantized_rotation(graph: Graph, embeddings: Sequence[Node], readers: Sequence[Node],
                             writers: Sequence[Node], keep_float: Sequence[Node], windows: torch.Tensor, *,
                             steps: int, lr: float, batch: int, w_bits: int = 4, a_bits: int = 4, seed: int = 0,
                             check_windows: int = 8, what: str = "rotation",
                             device: torch.device | None = None, fixed_batch: bool = False) -> LearnedRotation:
    """Learn an extra residual rotation ``U = C(S)`` (from ``I``) minimising the next-token loss of the
    fake-quantized network on ``windows`` (SpinQuant's objective, Adam on the Cayley parameter).

    ``graph`` is already rotated (its stream is ``x·Q₀``); the forward runs every node by its reference, with
    the residual stream's linears and embeddings computed as if ``U`` were folded: embeddings ``E[ids]·U``,
    readers ``fq_a(x)·fq_w(W·U)ᵀ``, writers ``fq_a(h)·fq_w(Uᵀ·W)ᵀ``, the float head (``keep_float``) reads
    ``x·Uᵀ`` with its own weight (the same product, without a vocabulary-sized matmul per step). The graph
    is not changed: the caller folds the returned ``q`` (= ``U``) exactly.

    Minibatch steps are noisy: after the last one, the start (``U = I``) and the learned ``U`` are both scored on
    the first ``check_windows`` windows and ``U = I`` is returned unless the learned one scores lower (0: no
    check, always the learned one). Those windows are held out of the steps when the other windows leave at least
    one batch to learn from (stats ``check.held_out``); a check on trained windows rewards memorising them.

    ``fixed_batch``: the graph was captured with a static batch of ``batch`` rows, so every forward (each step and
    each chunk of the check) runs exactly ``batch`` windows: the check windows round up to a multiple of it.

    ``device``: where the steps run (a GPU makes the paper's hundreds of steps affordable); the graph's params stay
    where they are and are read through device copies, as calibration reads them. The returned ``q`` is on the CPU.
    """
    from lowbit.calibration.engine import _DeviceParams  # same layer: device copies of the params, as calibration

    t0 = time.perf_counter()
    d = None
    for e in embeddings:
        d = e.args[0].data.shape[-1]
    if d is None:
        raise RotationLearningError(f"{what}: no embedding starts the residual stream")
    dtype = next(iter(graph.params.values())).data.dtype
    params = _DeviceParams(device)
    windows = windows.to(device) if device is not None else windows
    a = torch.zeros(d, d, dtype=dtype, device=device, requires_grad=True)
    opt = torch.optim.Adam([a], lr=lr)
    gen = torch.Generator().manual_seed(seed)
    box: dict[str, torch.Tensor] = {}
    inputs_of_readers = {id(n) for n in readers}

    def emb(args, kwargs):  # type: ignore[no-untyped-def]
        return torch.nn.functional.embedding(args[1], args[0]) @ box["u"]

    def reader(args, kwargs):  # type: ignore[no-untyped-def]
        x, w = args[0], args[1]
        b = args[2] if len(args) > 2 else kwargs.get("bias")
        return torch.nn.functional.linear(fake_quant_tokens(x, a_bits), fake_quant_weight(w @ box["u"], w_bits), b)

    def writer(args, kwargs):  # type: ignore[no-untyped-def]
        x, w = args[0], args[1]
        b = args[2] if len(args) > 2 else kwargs.get("bias")
        b = None if b is None else b @ box["u"]
        return torch.nn.functional.linear(fake_quant_tokens(x, a_bits), fake_quant_weight(box["u"].T @ w, w_bits), b)

    def head(args, kwargs):  # type: ignore[no-untyped-def]
        b = args[2] if len(args) > 2 else kwargs.get("bias")
        return torch.nn.functional.linear(args[0] @ box["u"].T, args[1], b)

    replace = {id(n): emb for n in embeddings}
    replace.update({id(n): reader for n in readers if id(n) not in {id(k) for k in keep_float}})
    replace.update({id(n): writer for n in writers})
    replace.update({id(n): head for n in keep_float if id(n) in inputs_of_readers})
    history: list[float] = []
    first = last = float("nan")
    n_check = min(check_windows, windows.shape[0])
    if fixed_batch:
        if windows.shape[0] < batch:
            raise RotationLearningError(f"{what}: the graph was captured with a fixed batch of {batch}, so every "
                                        f"step runs {batch} windows, but calibration has {windows.shape[0]} "
                                        f"(raise calib_n to at least {batch})")
        whole = windows.shape[0] - windows.shape[0] % batch
        n_check = min(-(-n_check // batch) * batch, whole)
    held_out = n_check > 0 and windows.shape[0] - n_check >= batch
    train = windows[n_check:] if held_out else windows
    for step in range(steps):
        pick = torch.randint(0, train.shape[0], (min(batch, train.shape[0]),), generator=gen)
        ids = train[pick]
        opt.zero_grad(set_to_none=True)
        box["u"] = cayley(a)
        with torch.enable_grad():
            try:
                loss = _quantized_loss(graph, ids, params, replace)
            except CalibrationError as exc:
                raise RotationLearningError(f"{what}: step {step}: {exc}") from None
        value = float(loss.detach())
        if not math.isfinite(value) and step == 0:
            raise RotationLearningError(f"{what}: step 0 of {steps}, before any update: the quantized loss is {value}"
                                        f", so the fake-quantized model is not finite on these windows (not a "
                                        f"learning-rate problem): {_first_non_finite(graph, ids, params, replace)}")
        if not math.isfinite(value):
            raise RotationLearningError(f"{what}: step {step} of {steps}: the quantized loss is {value} "
                                        f"(diverged; lower lr={lr})")
        loss.backward()
        if not torch.isfinite(a.grad).all():
            raise RotationLearningError(f"{what}: step {step} of {steps}: the gradient is not finite (lower lr={lr})")
        opt.step()
        first = value if step == 0 else first
        last = value
        if step % 10 == 0 or step == steps - 1:  # as the kurtosis learning: every tenth step and the last
            history.append(round(value, 4))
        del loss
    with torch.no_grad():
        q = orthogonal_polar(cayley(a.detach().double())).to(a.device)
        if not torch.isfinite(q).all():
            raise RotationLearningError(f"{what}: after {steps} steps the rotation is not finite")

        def check_loss(u: torch.Tensor) -> float:
            """Mean quantized loss with ``U = u`` on the first ``check_windows`` windows (the same for both)."""
            box["u"] = u.to(a.device, dtype)
            total = 0.0
            for i in range(0, n_check, batch):
                ids = windows[i:min(i + batch, n_check)]
                total += float(_quantized_loss(graph, ids, params, replace)) * ids.shape[0]
            return total / n_check

        eye = torch.eye(d, dtype=torch.float64, device=a.device)
        start_loss, learned_loss = (check_loss(eye), check_loss(q)) if check_windows else (float("nan"),) * 2
        keep_learned = not check_windows or learned_loss < start_loss
        check = {"windows": n_check, "held_out": held_out, "loss_start": round(start_loss, 4),
                 "loss_learned": round(learned_loss, 4), "kept": "learned" if keep_learned else "start"}
        if not keep_learned:
            q = eye
        ortho = float((q @ q.T - eye).abs().max())
        q = q.cpu()
    box.clear()
    return LearnedRotation(q, float("nan"), float("nan"), first, last, steps, time.perf_counter() - t0, ortho, history,
                           check, windows_per_step=min(batch, train.shape[0]))
