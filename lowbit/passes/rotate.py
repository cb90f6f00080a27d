"""Rotate: fold orthogonal rotations into the weights (QuaRot) so that activations lose their outliers.

Low-bit activations fail on a few huge channels; an orthogonal rotation spreads each token's energy over
all channels without changing the model. ``rotate`` applies, on the regions that
``lowbit.ir.rotation_regions`` finds:

* the residual stream (R1): embedding ``E·Q``, readers ``W·Q``, writers ``Qᵀ·W`` — needs unit-gain norms,
  so ``fold-norms`` must have run (checked: a norm with a gain is an error naming it);
* per-head V/O (R2): ``v_proj`` rows ``Rᵀ·W_h``, ``o_proj`` columns ``W·(I ⊗ R)``;
* an online ``hadamard`` before each writer no fold reaches (``down_proj``, R4), its transpose folded into
  the weight;
* an online ``hadamard`` on queries and keys after rotary (R3), so the KV cache holds rotated keys;
* with ``online_o=true``, an online ``hadamard`` over all heads before each ``o_proj`` (QuaRot's online part of
  its o_proj rotation), its transpose folded into o_proj's columns.

``kind=hadamard`` uses the randomised Hadamard ``H·diag(±1)/√n`` (seeded), ``kind=random`` a Haar-random
orthogonal matrix (QR of a seeded Gaussian) for R1/R2; ``kind=kurtosis`` (KurTail) learns R1 from that
randomised Hadamard, minimising the per-token kurtosis of the normalised residual streams the rotated linears
read (``lowbit.calibration.rotation_learning``: the streams are collected once from the model as it is — unit
gain RMSNorm makes them independent of R1 — and the rotation is learned offline on them, so no model forward
runs per step); R2 stays the randomised Hadamard. Online rotations are always the plain Hadamard, so backends
can run them as a fast transform. Every rotation is exact: the model's outputs change by float
rounding only. A tied embedding/lm_head weight is untied (stats ``untied``).

In a generation step graph keys and values are rotated before they are written to the KV cache, so the cache
holds them rotated in prefill and decode alike. ``residual=false`` needs no foldable stream: on a LayerNorm model
it applies R2-R4 alone (where found). After ``slice-residual`` the norms' gain is one number, which commutes with
a rotation; ``prune-heads`` and ``prune-mlp`` must come before ``rotate`` (its online Hadamards hide their sites).
"""

from __future__ import annotations

import math
import time
import warnings
from typing import Any, Literal

import torch
from pydantic import Field, field_validator, model_validator

from lowbit.calibration.data import calib_size
from lowbit.calibration.engine import CalibrationError, batches_from_ids, static_batch
from lowbit.calibration.engine import run as calibrate
from lowbit.calibration.rotation_learning import (
    UNIFORM_KURTOSIS,
    LearnedRotation,
    RotationLearningError,
    learn_kurtosis_rotation,
    learn_kurtosis_rotations,
    learn_quantized_rotation,
)
from lowbit.calibration.memory import PeakRss
from lowbit.ir.graph import Graph, Node, Value
from lowbit.ir.hadamard import HadamardError, HadamardRotation, hadamard_order_split, random_hadamard
from lowbit.ir.qscheme import DEFAULT_KEEP_FLOAT, module_matches
from lowbit.ir.rewrite import float64_pieces, rows_in_float64, whole_in_float64
from lowbit.ir.rotation_regions import HeadRegion, OnlineSite, ResidualRegion, find_rotation_regions
from lowbit.passes.base import NO_QLINEAR, CalibrationOptions, Pass, PassError, PassResult, no_op, register_pass
from lowbit.passes.fold_norms import private_weight

__all__ = ["Rotate", "RotateOptions", "check_foldable", "check_hadamard_sizes", "fold_residual", "rotation_matrix",
           "set_weight"]


_CALIBRATION_DATA = frozenset({"calib", "calib_n", "calib_len", "tokenizer", "device"})
"""The calibration options both learned kinds read (``progress`` is display only, so it is not checked)."""
_KIND_OPTIONS: dict[str, frozenset[str]] = {
    "kurtosis": _CALIBRATION_DATA | {"samples", "steps", "lr", "batch_tokens", "learn_heads", "head_chunk_layers",
                                     "target", "moment", "tail_mean", "batch_size", "lr_schedule"},
    "learned": _CALIBRATION_DATA | {"steps", "lr", "windows_per_step", "w_bits", "a_bits", "check_windows"},
}
"""The learning and calibration options each learned kind reads (hadamard and random read none of them: they use
no data; learned runs ``windows_per_step`` windows a step, not ``batch_size``)."""
_LEARNING_OPTIONS = frozenset().union(*_KIND_OPTIONS.values())
NOT_QUANTIZED = no_op("dequantize", "rotate folds its rotations into float weights and puts its online Hadamards "
                      "where the quantizers will read them; on a quantized graph the weights, activations and KV "
                      "cache stay rounded unrotated: rotate before quantizing")
"""A graph quantized by an earlier run (a pipeline with quantize before rotate is refused when parsed): rotate after
quantize(a=...) put its Hadamards after the activation quantizers and skipped the quantized keys, and on a LayerNorm
model's quantized weights rotate(residual=false) failed with an AttributeError."""


class RotateOptions(CalibrationOptions):
    """The rotation and, for the learned kinds, its learning: the calibration options (``calib``, ``calib_n``,
    ...) are read only by the learned kinds, and refused for the others (they would be silently ignored)."""

    kind: Literal["hadamard", "random", "kurtosis", "learned"] = "hadamard"
    """hadamard: randomised Hadamard (QuaRot); random: Haar-random orthogonal; kurtosis: learned from the
    randomised Hadamard to minimise activation kurtosis (KurTail); learned: learned from it to minimise the
    W4A4 fake-quantized network's loss on calibration text (SpinQuant)."""
    seed: int = 0
    """Seed of the random signs / random matrix (and of the learning's token draws)."""
    calib_n: int = Field(default=8, ge=1)
    """kurtosis: calibration sequences whose normalised residual streams are collected (once); learned: the
    windows the steps draw from and the ``check_windows`` check scores on."""
    samples: int = Field(default=512, ge=8, le=1_000_000)
    """kurtosis: tokens kept per norm output (spread over the batches); memory is samples × width × norms."""
    steps: int | None = Field(default=None, ge=1, le=100_000)
    """Optimiser steps; unset: 100 for kurtosis (each a matmul of ``batch_tokens`` × width², cheap), 20 for
    learned (each a forward and backward of the whole fake-quantized model on ``windows_per_step`` windows)."""
    lr: float | None = Field(default=None, gt=0, le=1)
    """Adam step on the Cayley parameter of the rotation; unset: 3e-3 (kurtosis), 1e-3 (learned)."""
    lr_schedule: Literal["constant", "cosine"] = "constant"
    """kurtosis: ``lr`` every step, or decayed to 0 over the steps on a cosine (the minibatch draws keep a constant
    step hopping around the minimum to the end)."""
    windows_per_step: int = Field(default=1, ge=1, le=1024)
    """learned: calibration windows per step (of the ``calib_n`` × ``calib_len`` drawn once)."""
    w_bits: int = Field(default=4, ge=2, le=16)
    """learned: weight bits of the fake quantizer (asymmetric per output channel, round to nearest); 16: weights
    stay float (SpinQuant's recipe for GPTQ: the rotation learns against activation quantization only, since
    GPTQ, not round-to-nearest, will set the weights)."""
    a_bits: int = Field(default=4, ge=2, le=16)
    """learned: activation bits of the fake quantizer (symmetric per token, dynamic); 16: activations stay float."""

    @field_validator("w_bits", "a_bits")
    @classmethod
    def _bits_or_float(cls, v: int) -> int:
        if 8 < v < 16:
            raise ValueError(f"{v} bits: the fake quantizer takes 2-8 bits, or 16 for float")
        return v

    def reads_calibration(self) -> bool:
        return self.kind in ("kurtosis", "learned")  # the fixed rotations use no data

    @model_validator(mode="after")
    def _options_of_the_kind(self) -> RotateOptions:
        """A learning option set for a kind that never reads it is a mistake the user would not see (the run
        succeeds with the option ignored): refuse it, naming the kinds that read it. Defaults stay fine (by
        value: ``rotate(calib_n=8)`` restates the default)."""
        own = _KIND_OPTIONS.get(self.kind, frozenset())
        self.refuse_unread({name: None if name in own else
                            "kind=" + " or kind=".join(k for k, names in _KIND_OPTIONS.items() if name in names)
                            for name in sorted(_LEARNING_OPTIONS)})
        if self.learn_heads and not self.heads:
            raise ValueError("learn_heads=true learns the head rotations R2, which heads=false turns off")
        if "head_chunk_layers" in self.model_fields_set and not self.learn_heads:
            raise ValueError(f"head_chunk_layers={self.head_chunk_layers} says how many layers' R2s learn together, "
                             "and only learn_heads=true learns them; without it it would be silently ignored")
        if self.kind == "learned" and self.w_bits == 16 and self.a_bits == 16:
            # the steps would run (minutes) on a loss whose gradient is float rounding and keep the Hadamard
            raise ValueError("kind=learned with w_bits=16 and a_bits=16 quantizes nothing: the float model's loss is "
                             "the same under every rotation, so there is nothing to learn; give a_bits (e.g. 4) or "
                             "w_bits below 16")
        return self
    batch_tokens: int = Field(default=4096, ge=8, le=1_000_000)
    """kurtosis: tokens per step, drawn evenly from every norm output; at most ``samples`` from each (stats
    ``tokens_per_step``; a larger value set here is warned about)."""
    check_windows: int = Field(default=8, ge=0, le=1024)
    """learned: after the steps, score the start and the learned rotation on this many calibration windows and
    keep the learned one only if its quantized loss is lower (stats ``check``); 0 keeps it unchecked. The steps
    draw from the other windows when at least ``windows_per_step`` remain (``check.held_out``)."""
    learn_heads: bool = False
    """kurtosis (with ``heads``): also learn each layer's R2 from the Hadamard, on the head outputs its o_proj
    reads (collected in the same run: R1 does not change them). Off by default: KurTail's paper learns R1, and
    the measured rows (bench/results/accuracy.json, ``kurtail-r2``) say whether R2 pays on SmolLM2."""
    head_chunk_layers: int = Field(default=1, ge=1, le=4096)
    """kurtosis with ``learn_heads``: layers whose R2s learn in one set of stacked steps, as soon as calibration has
    run them; their head samples are then freed, so the host holds one chunk's head samples and step temporaries,
    never all layers' (SmolLM2 at 7680 tokens a site: 531 MB of head samples and, measured, 1.1 GB of stacked-step
    temporaries for 30 layers at once). Each layer's loss reads only its own R2 and draws from its own seeded
    generator, so every value learns the same rotations bit for bit; larger chunks launch fewer, larger kernels (a
    GPU's steps are bound by launches), 1 holds the least (and on the CPU was not slower: 20 steps of 30 layers,
    7.4-7.9 s one layer a chunk, 10.4-11.3 s all 30 at once)."""
    target: float = Field(default=UNIFORM_KURTOSIS, ge=1, le=10)
    """kurtosis: the per-token kurtosis aimed at (1.8: uniform, what an integer grid covers best)."""
    moment: int = Field(default=4, ge=4, le=64)
    """kurtosis: the order of the tail measure minimised. 4: KurTail's ``|kurtosis - target|``; p > 4: the mean
    log-ratio of each token's p-th to quadratic mean (``tail_ratio``), which at large p nears the largest channel
    over the rms, what a per-token absmax scale pays for (SmolLM2, A4 at the R1 sites: 16 about doubles the gain
    over QuaRot that kurtosis gives, 0.944x -> 0.887x of its perplexity; bench/results/accuracy.json ``kurtail-m16``
    rows)."""
    tail_mean: Literal["mean", "square"] = "mean"
    """kurtosis: how the per-token losses (``moment``'s) are averaged. ``square``: the mean of their squares, so
    the most heavy-tailed tokens weigh more (each token's A4 error is set by its own tail; a mean lets a few bad
    tokens stay bad while the typical one improves). Measured with moment=16 on SmolLM2 (W4A4KV4, GPTQ, wt2-512x40):
    no gain, 2.466x / 2.549x at seeds 0 / 2 against the mean's 2.413x / 2.545x (bench rows ``kurtail-m16-sq*``)."""
    residual: bool = True
    """Rotate the residual stream (R1). It needs ``fold-norms`` (RMSNorm commutes with a rotation only at unit
    gain), and the folded gains then sit in every reader's weights, where they stop shielding the low-gain
    channels (the attention-sink tokens' normalised streams) from weight error. Off: only R2-R4, which fold
    without touching the norms, so weight-only schemes keep the gains (and AWQ can still scale into them)."""
    heads: bool = True
    """Rotate each head's values and o_proj's matching columns (R2)."""
    online: bool = True
    """Online Hadamard before linears writing the residual stream that no fold reaches (down_proj, R4)."""
    qk: bool = True
    """Online Hadamard on queries and keys after rotary (R3: rotated KV cache)."""
    online_o: bool = False
    """Online Hadamard over all heads before each o_proj (QuaRot's ``H_heads ⊗ H_head`` on the attention output):
    R2 mixes channels only within a head, so a head whose output is larger than the others' stays an outlier of
    the per-token A4 scale; the full-width Hadamard spreads it over every channel (its transpose folds into
    o_proj's columns, so the model is unchanged)."""


def rotation_matrix(kind: str, n: int, seed: int, what: str) -> torch.Tensor:
    """The float64 orthogonal matrix of ``kind`` for dimension ``n``; errors name ``what`` it was for."""
    if kind == "random":
        gen = torch.Generator().manual_seed(seed)
        q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
        return q * torch.sign(torch.diagonal(r))[None, :]
    try:
        return random_hadamard(n, seed)
    except HadamardError as exc:
        raise PassError(f"pass rotate: {what}: {exc}") from None


Rotation = torch.Tensor | HadamardRotation
"""An orthogonal ``Q`` to fold: dense float64, or a Hadamard kept factored (``HadamardRotation``: folded in
``n·Σf`` multiply-adds a row, not ``n²``)."""


def residual_rotation(kind: str, n: int, seed: int, what: str) -> Rotation:
    """``rotation_matrix(kind, ...)``, factored where it is a Hadamard (the same ``Q``)."""
    if kind == "random":
        return rotation_matrix(kind, n, seed, what)
    try:
        return HadamardRotation.randomised(n, seed)
    except HadamardError as exc:
        raise PassError(f"pass rotate: {what}: {exc}") from None


def dense(q: Rotation) -> torch.Tensor:
    """``q`` as a float64 matrix."""
    return q.matrix() if isinstance(q, HadamardRotation) else q


def right_product(q: Rotation):  # type: ignore[no-untyped-def]
    """``w -> w @ q`` along the last axis, in float64."""
    return q.rows if isinstance(q, HadamardRotation) else (lambda w: w @ q)


CHUNK_ALIGN = 256
"""Pieces start at multiples of this many rows: MKL's float64 GEMM then gives each row the bits the whole product
gives it (checked on SmolLM2: bit-identical weights), where pieces of any other height changed the last bits."""


def set_weight(graph: Graph, node: Node, index: int, users: dict, fn=None,  # type: ignore[no-untyped-def]
               rows: int | None = None, left: torch.Tensor | None = None, columns: bool = False) -> None:
    """Replace ``node.args[index]`` (a param) by ``fn(float64 data)`` (or ``left @ data``), copying it first if shared
    (the use lists are updated in place, so the last reader of a once-shared param keeps the original).

    Whole, a bf16 weight took 4x its size in float64 for its input and as much again for the product (SmolLM2's
    57 MiB embedding: 450 MiB at once). ``rows=g``: ``fn`` maps each group of ``g`` rows on its own (``w @ q``: 1;
    a per-head rotation: head_dim), so the weight is rotated ``float64_pieces`` of rows at a time into a
    tensor of its own dtype. ``left``: the product ``left @ w``, whose rows come a piece of ``left`` at a time from
    one float64 copy of ``w`` (half the memory it took). ``columns``: ``fn`` maps each column on its own (``Qᵀ·w``
    as ``(wᵀ·Q)ᵀ``), computed pieces of columns at a time."""
    old = node.args[index]
    w = private_weight(graph, node, index, users, f"{node.module or node.name}.{'bias' if index == 2 else 'weight'}")
    if w is not old:
        users[id(old)] = [u for u in users[id(old)] if u is not node]
        users[id(w)] = [node]
    data = w.data
    if columns:
        out = rows_in_float64(data.T, fn, data.dtype, CHUNK_ALIGN).T.contiguous()
    elif left is not None and data.dim() == 2 and not whole_in_float64(data):
        whole = data.to(torch.float64)
        out = torch.empty((left.shape[0], data.shape[1]), dtype=data.dtype)
        for start, stop in float64_pieces(left.shape[0], 8 * data.shape[1], math.lcm(CHUNK_ALIGN, rows or 1)):
            out[start:stop] = left[start:stop] @ whole
        del whole
    elif left is not None:
        out = (left @ data.to(torch.float64)).to(data.dtype)
    elif rows is None:
        out = fn(data.to(torch.float64)).to(data.dtype)
    else:
        out = rows_in_float64(data, fn, data.dtype, math.lcm(CHUNK_ALIGN, rows))
    graph.set_param(w.name, out)


def _learning_sites(res: ResidualRegion) -> list[Node]:
    """The norms whose output a quantized linear reads (lm_head and embeddings stay float: their norm, the
    final one, is not a site — and it runs in the graph's suffix, which calibration skips)."""
    return [n for n in res.norms
            if any(not any(module_matches(r.module or "", k) for k in DEFAULT_KEEP_FLOAT) for r in res.readers
                   if r.args[0] is n.output)]


def learn_residual_rotation(graph: Graph, res: ResidualRegion, q0: torch.Tensor, o: RotateOptions,
                            pass_name: str, heads: list[HeadRegion] | None = None, r0: torch.Tensor | None = None
                            ) -> tuple[torch.Tensor, dict[str, Any], dict[int, torch.Tensor]]:
    """KurTail's R1 (and each layer's R2 for ``heads``): collect the normalised residual streams (and the head
    outputs each o_proj reads) once, learn ``Q`` from ``q0`` (each R2 from ``r0``, ``head_chunk_layers`` layers at a
    time as calibration passes them) on them. The stats' ``learn_rss_above_start_mb``: the host memory collecting
    and learning added at their peak (``PeakRss``)."""
    with PeakRss() as mem:
        q, stats, r2 = _learn_residual_rotation(graph, res, q0, o, pass_name, heads, r0)
    return q, {**stats, "learn_rss_above_start_mb": mem.above_start_mb}, r2


class _KeptRows:
    """The rows one site keeps over the calibration batches, written into one buffer allocated at its first batch:
    per-batch pieces concatenated at the end held every site's samples twice while they were concatenated (1.06 GB
    of R1 samples twice, SmolLM2's kurtail-r2 at 7680 tokens a site)."""

    def __init__(self, capacity: int, device: torch.device) -> None:
        self.capacity, self.device = capacity, device
        self.buffer: torch.Tensor | None = None
        self.filled = 0

    def add(self, rows: torch.Tensor) -> None:
        """Append ``rows`` (``[n, width]``, any float dtype and device) as float32 on ``device``."""
        if self.buffer is None:
            self.buffer = torch.empty(self.capacity, rows.shape[-1], dtype=torch.float32, device=self.device)
        self.buffer[self.filled:self.filled + rows.shape[0]].copy_(rows)
        self.filled += rows.shape[0]

    def rows(self) -> torch.Tensor:
        """The rows kept so far (a view of the buffer: no copy)."""
        assert self.buffer is not None
        return self.buffer[:self.filled]


def _learn_residual_rotation(graph: Graph, res: ResidualRegion, q0: torch.Tensor, o: RotateOptions,
                             pass_name: str, heads: list[HeadRegion] | None, r0: torch.Tensor | None
                             ) -> tuple[torch.Tensor, dict[str, Any], dict[int, torch.Tensor]]:
    """Collect R1's samples (and each layer's head samples), learning the R2s of each ``head_chunk_layers`` layers
    as soon as calibration has run them and freeing their samples; then learn R1."""
    t0 = time.perf_counter()
    device = o.torch_device(pass_name)
    sites = _learning_sites(res)
    if not sites:
        raise PassError(f"pass {pass_name}: kind=kurtosis: no RMSNorm output of the residual stream feeds a "
                        "quantized linear, so there is nothing to learn from")
    index = {id(n): i for i, n in enumerate(sites)}
    heads = heads or []
    o_index = {id(h.o_proj): i for i, h in enumerate(heads)}
    ids = o.token_ids(graph, pass_name)
    batches = batches_from_ids(graph, ids, o.batch_size_for(graph))
    per_batch = max(1, o.samples // len(batches))
    keep_on = device or torch.device("cpu")
    # kept where the steps will run: on the host they were 6 GB of d480v's 12.5 GB peak RSS (SmolLM2, 30720 tokens
    # a site, --device cuda)
    kept = [_KeptRows(per_batch * len(batches), keep_on) for _ in sites]
    o_kept: list[_KeptRows | None] = [_KeptRows(per_batch * len(batches), keep_on) for _ in heads]
    collecting: list[int] = []  # heads whose o_proj the current block runs
    pending: list[int] = []  # heads whose samples are complete, their R2 not learned yet
    learned_r2: dict[int, LearnedRotation] = {}
    head_bytes = 0
    r2_seconds = 0.0

    def on_node(node: Node, args: tuple[Any, ...], kwargs: dict[str, Any], outs: list[Any]) -> None:
        i, j = index.get(id(node)), o_index.get(id(node))
        if i is not None or j is not None:
            t = outs[0] if i is not None else args[0]
            x = t.detach().reshape(-1, t.shape[-1])
            step = max(1, x.shape[0] // per_batch)
            if i is not None:
                kept[i].add(x[::step][:per_batch])
            else:
                head = o_kept[j]
                assert head is not None, f"o_proj %{node.name} ran after its R2 was learned"
                if not head.filled:
                    collecting.append(j)
                head.add(x[::step][:per_batch])

    def learn_pending() -> None:
        """Learn the R2s of ``pending`` in one set of steps (each as it would alone), then drop their samples."""
        nonlocal head_bytes, r2_seconds
        t = time.perf_counter()
        chunk = list(pending)
        pending.clear()
        problems = []
        for j in chunk:
            rows = o_kept[j].rows()  # type: ignore[union-attr]
            head_bytes += rows.numel() * rows.element_size()
            problems.append([rows])
            o_kept[j] = None
        assert r0 is not None
        got = learn_kurtosis_rotations(
            problems, r0, steps=o.steps or 100, lr=o.lr or 3e-3, batch_tokens=o.batch_tokens,
            target=o.target, seed=o.seed, moment=o.moment, tail_mean=o.tail_mean, device=device,
            lr_schedule=o.lr_schedule, heads=problems[0][0].shape[-1] // r0.shape[0],
            site_names=[[f"the input of o_proj %{heads[j].o_proj.name} (module {heads[j].o_proj.module!r})"]
                        for j in chunk],
            whats=[f"pass {pass_name}: kind=kurtosis, head rotation of %{heads[j].o_proj.name}" for j in chunk])
        learned_r2.update(zip(chunk, got))
        r2_seconds += time.perf_counter() - t

    def on_block(ctx: Any) -> bool:
        pending.extend(collecting)
        collecting.clear()
        if len(pending) >= o.head_chunk_layers:
            learn_pending()
        return False  # nothing changed: the block's outputs feed the next one as they are

    try:
        calibrate(graph, batches, on_node=on_node, on_block=on_block if heads else None, progress=o.progress,
                  device=device)
        pending.extend(collecting)
        if pending:
            learn_pending()
    except RotationLearningError as exc:
        raise PassError(str(exc)) from None
    except CalibrationError as exc:
        raise PassError(f"pass {pass_name}: kind=kurtosis: collecting activations: {exc}") from None
    missing = [n for n, k in zip(sites, kept) if not k.filled]
    if missing:
        raise PassError(f"pass {pass_name}: kind=kurtosis: calibration never reached rms_norm %{missing[0].name} "
                        f"(module {missing[0].module!r})")
    missing_o = [h for j, h in enumerate(heads) if j not in learned_r2]
    if missing_o:
        raise PassError(f"pass {pass_name}: kind=kurtosis: calibration never reached o_proj "
                        f"%{missing_o[0].o_proj.name}")
    samples = [k.rows() for k in kept]
    kept.clear()  # samples holds the buffers now
    collect_s = time.perf_counter() - t0 - r2_seconds
    try:
        learned = learn_kurtosis_rotation(samples, q0, steps=o.steps or 100, lr=o.lr or 3e-3,
                                          batch_tokens=o.batch_tokens, target=o.target, seed=o.seed, moment=o.moment,
                                          tail_mean=o.tail_mean, device=device, lr_schedule=o.lr_schedule,
                                          site_names=[f"rms_norm %{n.name} (module {n.module!r})" for n in sites],
                                          what=f"pass {pass_name}: kind=kurtosis, residual stream of width {res.dim}")
    except CalibrationError as exc:
        raise PassError(str(exc)) from None
    per_site = samples[0].shape[0]
    samples_bytes = sum(t.numel() * t.element_size() for t in samples) + head_bytes
    samples_device = samples[0].device.type
    del samples
    ordered_r2 = [learned_r2[j] for j in range(len(heads))]
    r2 = {id(h.o_proj): lr2.q for h, lr2 in zip(heads, ordered_r2)}
    r2_kurt = [(lr2.kurtosis_start, lr2.kurtosis_end, lr2.check["kept"] == "start") for lr2 in ordered_r2]
    _say_batch_tokens_short(o, pass_name, learned.tokens_per_step, len(sites), per_site)
    extra = {} if not r2_kurt else {
        "head_rotations": len(r2_kurt),
        "head_kurtosis_start": round(sum(a for a, _, _ in r2_kurt) / len(r2_kurt), 4),
        "head_kurtosis_end": round(sum(b for _, b, _ in r2_kurt) / len(r2_kurt), 4),
        "head_kept_start": sum(k for _, _, k in r2_kurt), "head_tokens_per_step": ordered_r2[0].tokens_per_step,
        "head_learn_seconds": round(r2_seconds, 2), "head_chunk_layers": o.head_chunk_layers}
    return learned.q, {
        **extra,
        "sites": len(sites), **calib_size(ids), "samples_per_site": per_site,
        "samples_mb": round(samples_bytes / 2**20, 1),
        "kurtosis_start": round(learned.kurtosis_start, 4), "kurtosis_end": round(learned.kurtosis_end, 4),
        "loss_start": round(learned.loss_start, 4), "loss_end": round(learned.loss_end, 4),
        "steps": learned.steps, "lr_schedule": o.lr_schedule, "tokens_per_step": learned.tokens_per_step,
        "orthogonality": learned.orthogonality, "history": learned.history,
        "check": learned.check, "learn_device": str(keep_on), "samples_device": samples_device,
        "collect_seconds": round(collect_s, 2),
        "learn_seconds": round(time.perf_counter() - t0 - collect_s, 2),
    }, r2


def _say_batch_tokens_short(o: RotateOptions, pass_name: str, got: int | None, sites: int, per_site: int) -> None:
    """Warn when ``batch_tokens``, set by the user, asks for more tokens a step than R1's samples hold: each step
    then draws as many as a site holds (stats ``tokens_per_step``), and only ``samples`` (tokens kept per norm
    output) gives it more. (Each R2 learns from one site, its o_proj's input: a step draws ``samples`` whenever
    ``batch_tokens`` >= ``samples``, the default; stats ``head_tokens_per_step``.)"""
    # a share of batch_tokens // sites per site: a total below batch_tokens by the rounding alone is no shortfall
    if "batch_tokens" in o.model_fields_set and got is not None and o.batch_tokens // sites > per_site:
        warnings.warn(f"pass {pass_name}: batch_tokens={o.batch_tokens}, but the R1 learning has {got} tokens "
                      f"({per_site} kept per site x {sites} sites), so each step drew {got}; raise samples "
                      f"(now {o.samples}) to learn on more", stacklevel=3)


def learn_extra_rotation(graph: Graph, res: ResidualRegion, o: RotateOptions, pass_name: str
                         ) -> tuple[torch.Tensor, dict[str, Any]]:
    """SpinQuant's R1, on a graph already rotated by the randomised Hadamard: the extra rotation ``U`` that
    minimises the fake-quantized network's next-token loss (the caller folds it into the residual stream). The
    stats' ``learn_rss_above_start_mb``: the host memory the learning added at its peak (``PeakRss``)."""
    keep = [r for r in res.readers if any(module_matches(r.module or "", k) for k in DEFAULT_KEEP_FLOAT)]
    ids = o.token_ids(graph, pass_name)
    batch, fixed = o.windows_per_step, static_batch(graph)
    if fixed is not None:  # every forward of this graph takes exactly `fixed` windows
        if "windows_per_step" in o.model_fields_set and batch != fixed:
            raise PassError(f"pass {pass_name}: kind=learned: windows_per_step={batch}, but the graph was captured "
                            f"with a fixed batch of {fixed}, so each step runs exactly {fixed} windows: set "
                            f"windows_per_step={fixed} (or leave it unset), or capture with a dynamic batch")
        batch = fixed
    try:
        with PeakRss() as mem:
            learned = learn_quantized_rotation(
                graph, res.embeddings, res.readers, res.writers, keep, ids, steps=o.steps or 20, lr=o.lr or 1e-3,
                batch=batch, w_bits=o.w_bits, a_bits=o.a_bits, seed=o.seed, fixed_batch=fixed is not None,
                check_windows=o.check_windows, device=o.torch_device(pass_name),
                what=f"pass {pass_name}: kind=learned, residual stream of width {res.dim}")
    except CalibrationError as exc:
        raise PassError(str(exc)) from None
    return learned.q, {
        **calib_size(ids), "windows_per_step": learned.windows_per_step, "steps": learned.steps,
        "loss_start": round(learned.loss_start, 4), "loss_end": round(learned.loss_end, 4),
        "orthogonality": learned.orthogonality, "history": learned.history, "collect_seconds": 0.0,
        "learn_seconds": round(learned.seconds, 2), "learn_rss_above_start_mb": mem.above_start_mb,
        "samples_mb": 0.0, "kurtosis_start": None, "kurtosis_end": None, "check": learned.check,
    }


def fold_residual(graph: Graph, res: ResidualRegion, users: dict, q: Rotation) -> None:
    """x -> x·Q on the residual stream: embeddings E·Q, readers W·Q, writers Qᵀ·W (bias b·Q)."""
    times_q = right_product(q)
    for e in res.embeddings:
        set_weight(graph, e, 0, users, times_q, rows=1)
    for r in res.readers:
        set_weight(graph, r, 1, users, times_q, rows=1)
    for wr in res.writers:
        if isinstance(q, HadamardRotation):
            set_weight(graph, wr, 1, users, times_q, columns=True)
        else:
            set_weight(graph, wr, 1, users, left=q.T)
        if wr.arg(2, "bias") is not None:
            set_weight(graph, wr, 2, users, times_q)


def _scalar_gain(w: object) -> bool:
    """A stored gain with one value in every channel (slice-residual's ``sqrt(d/d')``): a product with a number,
    which commutes with a rotation."""
    return isinstance(w, Value) and w.is_param and w.data.numel() > 0 and bool((w.data == w.data.reshape(-1)[0]).all())


def check_foldable(res: ResidualRegion, pass_name: str, gains: bool = True, scalar_gains: bool = False) -> None:
    """Refuse a stream a rotation cannot fold into: norms that still carry gains (``gains``: RMSNorm is rotation
    invariant only with unit gain, so ``fold-norms`` runs first; ``scalar_gains``: a gain equal in every channel
    is let through, since it commutes with the rotation) or readers/writers with computed (quantized) weights. The
    error names the first offending node, its module and how many there are."""
    gained = [n for n in res.norms if n.arg(1, "weight") is not None
              and not (scalar_gains and _scalar_gain(n.arg(1, "weight")))] if gains else []
    if gained:
        n = gained[0]
        raise PassError(f"pass {pass_name} needs fold-norms first: rms_norm %{n.name} (module {n.module!r}) still has "
                        f"a gain, and RMSNorm is rotation invariant only with unit gain ({len(gained)} such norms); "
                        "smooth-quant and awq fold their scales into norm gains, so after fold-norms they go after "
                        f"{pass_name} too")
    computed = [n for n in (*res.readers, *res.writers) if not n.args[1].is_param]
    if computed:
        n = computed[0]
        src = n.args[1].producer.op if n.args[1].producer else "?"
        raise PassError(f"pass {pass_name} must run before quantization: linear %{n.name} (module {n.module!r}) reads "
                        f"a computed weight (%{n.args[1].name}, from {src})")


def check_not_rotated_online(sites: list[OnlineSite], pass_name: str) -> None:
    """Refuse an online site whose input already is an online Hadamard's output (rotate ran before): a second
    ``x·H`` on top of the first undoes it for a symmetric H (Sylvester: ``H·H/n = I``), so the linear would read
    its outliers again while the run succeeded. Checked before anything changes."""
    again = [s.node for s in sites if s.kind == "linear_input" and isinstance(s.node.args[0], Value)
             and s.node.args[0].producer is not None and s.node.args[0].producer.op == "hadamard"]
    if again:
        n = again[0]
        raise PassError(f"pass {pass_name}: linear %{n.name} (module {n.module!r}) already reads an online Hadamard "
                        f"(%{n.args[0].name}): the graph was rotated before, and a second one would undo it "
                        f"({len(again)} such linears); run rotate once, or rotate(online=false,online_o=false) to fold "
                        "another rotation on top")


def check_hadamard_sizes(o: RotateOptions, res: ResidualRegion | None, heads: list[HeadRegion],
                          sites: list[OnlineSite], pass_name: str) -> None:
    """Refuse, before anything is learned or changed, a dimension the rotation needs a Hadamard matrix for and no
    construction covers: the residual width and each head_dim (kind=hadamard, and the kurtosis/learned kinds,
    which start from the randomised Hadamard) and every online site. Found at the site it was needed for, it came
    after kind=kurtosis had collected and learned (minutes on a real model) and after the residual was folded."""
    need: list[tuple[int, str, str]] = []  # (size, what needs it, the option that does without it)
    if o.kind != "random":
        if o.residual and res is not None:
            need.append((res.dim, f"residual stream of width {res.dim}",
                         f"{pass_name}(kind=random) folds a random orthogonal matrix there instead "
                         f"({pass_name}(residual=false) leaves the stream unrotated)"))
        if o.heads:
            need += [(h.head_dim, f"head_dim {h.head_dim} of %{h.attention.name}",
                      f"{pass_name}(kind=random) rotates the heads with a random orthogonal matrix instead "
                      f"({pass_name}(heads=false) leaves them unrotated)") for h in heads]
    o_projs = {id(h.o_proj) for h in heads} if o.online_o else set()
    for s in sites:
        if s.kind == "linear_input":
            need.append((s.dim, f"online rotation of the input of linear %{s.node.name} (module {s.node.module!r})",
                         f"{pass_name}({'online_o' if id(s.node) in o_projs else 'online'}=false) leaves it out"))
        else:
            need.append((s.dim, f"online rotation of rotary %{s.node.name} (module {s.node.module!r}) output",
                         f"{pass_name}(qk=false) leaves queries and keys unrotated"))
    for dim, what, avoid in need:
        try:
            hadamard_order_split(dim)
        except HadamardError as exc:
            raise PassError(f"pass {pass_name}: {what}: {exc}; {avoid}") from None


@register_pass
class Rotate(Pass):
    """Fold orthogonal rotations (Hadamard, random, learned: KurTail, SpinQuant) into the weights, online Hadamards."""

    name = "rotate"
    Options = RotateOptions
    exact = True
    after = ("fold-norms", "prune-heads", "prune-mlp")
    """prune-heads and prune-mlp find their sites by the q/k/v/o and gate/up/down patterns, which the online
    Hadamards rotate inserts break: they run on the unrotated graph."""
    requires = (NO_QLINEAR, NOT_QUANTIZED)
    creates = ("hadamard",)

    def undone_by(self, later: Pass) -> str | None:
        """A second rotate that puts its online Hadamard where this one put one: ``x·H·H = x`` for a symmetric H,
        which ``check_not_rotated_online`` refuses when the second runs; said when the pipeline is parsed, before
        the first rotate (minutes for the learned kinds) and everything between them run."""
        if later.name != self.name:
            return None
        same = [k for k in ("online", "online_o") if getattr(self.options, k) and getattr(later.options, k)]
        if not same:
            return None
        where = "down_proj" if same[0] == "online" else "o_proj"
        return (f"both put an online Hadamard before each {where} ({same[0]}=true), and the second one undoes the "
                f"first (x·H·H = x); rotate once, or give the later one {same[0]}=false to fold another rotation on "
                "top")

    def run(self, graph: Graph) -> PassResult:
        o = self.options
        if not o.residual and o.kind in ("kurtosis", "learned"):
            raise PassError(f"pass rotate: kind={o.kind} learns the residual rotation R1, so it needs residual=true")
        regions = find_rotation_regions(graph)
        res = regions.residual
        if res is None and o.residual:
            raise PassError("pass rotate: the residual stream cannot be rotated: " + "; ".join(regions.refused) +
                            " (rotate(residual=false) applies the rotations that do not fold through the norms)")
        if res is not None:
            check_foldable(res, self.name, gains=o.residual, scalar_gains=True)
        enabled = {"linear_input": o.online, "rotary_output": o.qk}
        sites = [s for s in regions.online if enabled.get(s.kind)]
        if o.online_o:
            sites += [OnlineSite("linear_input", h.o_proj, h.o_proj.args[1].tensor_type.shape[-1])
                      for h in regions.heads]
        check_not_rotated_online(sites, self.name)
        check_hadamard_sizes(o, res, regions.heads, sites, self.name)
        users = graph.users()
        base = "hadamard" if o.kind in ("kurtosis", "learned") else o.kind
        q = residual_rotation(base, res.dim, o.seed, f"residual stream of width {res.dim}") if o.residual else None
        learned = None
        r2: dict[int, torch.Tensor] = {}
        if o.kind == "kurtosis":
            heads = regions.heads if o.heads and o.learn_heads else []
            r0 = rotation_matrix(base, heads[0].head_dim, o.seed + 1, f"head_dim {heads[0].head_dim}") if heads \
                else None
            q, learned, r2 = learn_residual_rotation(graph, res, dense(q), o, self.name, heads, r0)
        untied = list(regions.tied) if o.residual else []
        if o.residual:
            fold_residual(graph, res, users, q)
            # the residual stream now holds x Q: a block-by-block difference with the float model read as -3 dB of
            # damage after this exact pass, so debug compare turns block outputs back with Q^T (a second rotate
            # composes: x Q1 Q2); float32, as the block outputs it maps back
            graph.meta["residual_rotated"] = True
            before = graph.meta.get("residual_rotation")
            rotation = dense(q).detach().to("cpu", torch.float64)
            graph.meta["residual_rotation"] = (rotation if before is None else before.double() @ rotation).float()
        stats: dict[str, object] = {"kind": o.kind, "residual_dim": res.dim if o.residual else None,
                                    "readers": len(res.readers) if o.residual else 0,
                                    "writers": len(res.writers) if o.residual else 0, "untied": untied}
        if learned is not None:
            stats["learned"] = learned
        heads = 0
        if o.heads:
            for h in regions.heads:
                r = r2.get(id(h.o_proj))
                if r is None:
                    r = rotation_matrix(base, h.head_dim, o.seed + 1, f"head_dim {h.head_dim} of %{h.attention.name}")
                hd = h.head_dim

                def rot_rows(w: torch.Tensor, r: torch.Tensor = r, hd: int = hd) -> torch.Tensor:
                    return (r.T @ w.reshape(-1, hd, w.shape[-1])).reshape(w.shape)

                def rot_bias(b: torch.Tensor, r: torch.Tensor = r, hd: int = hd) -> torch.Tensor:
                    return (b.reshape(-1, hd) @ r).reshape(b.shape)

                def rot_cols(w: torch.Tensor, r: torch.Tensor = r, hd: int = hd) -> torch.Tensor:
                    return (w.reshape(w.shape[0], -1, hd) @ r).reshape(w.shape)

                set_weight(graph, h.v_proj, 1, users, rot_rows, rows=hd)
                if h.v_proj.arg(2, "bias") is not None:
                    set_weight(graph, h.v_proj, 2, users, rot_bias)
                set_weight(graph, h.o_proj, 1, users, rot_cols, rows=1)
                heads += 1
        stats["head_regions"] = heads
        online = []
        for site in sites:
            if site.kind == "linear_input":
                lin = site.node
                x = lin.args[0]
                hm = HadamardRotation(site.dim)  # its size was checked by check_hadamard_sizes
                node = graph.make_node("hadamard", [x], name=f"{lin.name}_had", type=x.type, module=lin.module)
                graph.insert_before(lin, node)
                lin.args = (node.output, *lin.args[1:])
                set_weight(graph, lin, 1, users, hm.rows, rows=1)
                online.append(lin.module or lin.name)
            elif site.kind == "rotary_output":
                rot = site.node
                node = graph.make_node("hadamard", [rot.output], name=f"{rot.name}_had", type=rot.output.type,
                                       module=rot.module)
                graph.insert_after(rot, node)
                graph.replace_all_uses(rot.output, node.output, after=node)
                online.append(f"{rot.module or rot.name}:{rot.name}")
        stats["online_hadamards"] = len(online)
        stats["refused"] = list(regions.refused)
        qk_left = [r for r in regions.refused if r.startswith("q/k after rotary")]
        if o.qk and qk_left:
            # qk=true asked for them: a skip recorded only in stats (a second rotate's, say) looked like a rotation
            warnings.warn(f"rotate(qk=true) left the queries and keys of {len(qk_left)} attention(s) unrotated: "
                          f"{qk_left[0]}; give qk=false when that is intended", stacklevel=2)
        if o.kind == "learned":
            # learned on the graph as it runs now (R1-R4 in place), then folded on top: R1 = Q₀·U, exact
            u, stats["learned"] = learn_extra_rotation(graph, res, o, self.name)
            fold_residual(graph, res, users, u)
        # nothing found (or every part turned off) leaves the graph as it was: say so, as every pass does
        return PassResult(bool(o.residual or heads or online), stats)
