"""The ``gptq`` pass: GPTQ int or fp8 weights from block-by-block calibration, emitted as QDQ weights.

    gptq(w=int4,group=64,sym=false)                 GPTQ, act-order, static groups
    gptq(w=int4,sym=false,awq=true,clip=true)       AWQ scales + output-aware clipping, then GPTQ on that grid
    gptq(w=fp8e4m3,group=64)                        GPTQ onto the fp8 grid (symmetric: fp8 has no zero point)

The block-by-block driver is ``lowbit.calibration.weights.calibrate_weights``: while a block runs, the input
of every target linear feeds a Hessian (one per input value: q/k/v share one); when the block is done, its
linears are quantized (rows of linears sharing an input go through GPTQ together), their weights become
``dequantize`` of packed codes through the ``quantize`` pass's own per-node writer (``lowbit.ir.qdq``), and
the engine re-runs the block so the next block calibrates on what the quantized block really produces.

Which linears are quantized, and with what scheme, is the ``quantize`` pass's annotation
(``QuantConfig`` + ``plan``: ``lm_head`` and embeddings stay float, ``keep=`` adds globs, ``group_fallback``
handles SmolLM2's 576 inputs with group 128), so names, layout, metadata and the size report are the same
as for RTN.

The options shared with ``awq`` and ``autoround`` (``WeightCalibrationOptions``) and their resolution into the
driver's inputs (``run_weight_calibration``) are here; the passes differ only in their ``Rounding``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from lowbit.calibration.weights import SITE_KINDS, Rounding, WeightCalibrationError, calibrate_weights
from lowbit.ir.graph import Graph
from lowbit.ir.qscheme import DEFAULT_KEEP_FLOAT, QScheme, QuantConfig, module_matches
from lowbit.ir.quant import get_qdtype
from lowbit.passes.base import (NO_QLINEAR, WEIGHT_REWRITES, CalibrationOptions, Pass, PassError, PassResult,
                                ScopedOptions, register_pass)
from lowbit.passes.insert_qdq import NonFinitePolicy, plan

__all__ = ["WeightCalibrationOptions", "WeightCalibrationPass", "GPTQOptions", "GPTQ", "run_weight_calibration",
           "rounding", "SITE_KINDS", "check_awq_options", "check_clip_grid", "check_scale_grid", "weight_quant_config"]


class WeightCalibrationOptions(CalibrationOptions, ScopedOptions):
    """What to quantize (as the ``quantize`` pass's weight options), where (``modules``) and the calibration
    data."""

    w: str = "int4"
    """Weight qdtype: int8, int4, uint4, int3, int2, or fp8e4m3/fp8e5m2 (rounded as ``quantize`` casts fp8)."""
    group: int | None = Field(default=None, gt=0)
    """Weight group size along the input dim; unset: one scale per output channel."""
    group_fallback: int | None = Field(default=None, gt=0)
    """Group size for linears whose input size ``group`` does not divide (SmolLM2's 576 with group=128)."""
    block: int | None = Field(default=None, gt=0)
    """Refused: 2-D weight-scale tiles (``quantize(block=128)``, fp8-block128) are RTN only; the rounding here
    fixes one scale per row and input group, where a tile's scale is shared by 128 rows."""
    sym: bool = False
    """Symmetric weights (no zero point). Asymmetric is the default for integer weights: it tracks SmolLM2's Q4_1
    weights better. fp8 weights are always symmetric (no zero point): left unset, sym means true for them; an
    explicit sym=false with fp8 is an error."""
    keep: list[str] = []
    """Extra module globs kept float (added to the default lm_head and embeddings)."""
    nonfinite: NonFinitePolicy = "error"
    """A weight holding NaN/inf: ``error`` refuses naming the parameter and the row; ``keep-float`` leaves that
    linear float (listed in the stats as ``kept_float_nonfinite``)."""
    calib_n: int = Field(default=64, ge=1)
    """Calibration sequences (the shipped text has 123 windows of 512; give a longer file for more)."""

    @field_validator("w")
    @classmethod
    def _known_qdtype(cls, w: str) -> str:
        get_qdtype(w)  # ValueError naming the known ones
        return w

    @model_validator(mode="after")
    def _valid_scheme(self) -> WeightCalibrationOptions:
        """The weight scheme these options make, checked when the pipeline is parsed (``gptq(w=uint4,sym=true)``,
        ``awq(w=fp8e4m3,sym=false)`` fail before the model is loaded)."""
        if self.block is not None:
            raise ValueError(f"option block={self.block}: weight-scale tiles are quantized by RTN only "
                             f"(quantize(w={self.w},block={self.block})); this pass takes group= or per-channel scales")
        _weight_scheme(self)
        self.refuse_unread({"group_fallback": None if self.group is not None else "group="})
        return self

    @field_validator("sites", check_fields=False)
    @classmethod
    def _known_sites(cls, sites: list[str]) -> list[str]:
        bad = sorted(set(sites) - set(SITE_KINDS))
        if bad:
            raise ValueError(f"unknown site(s) {bad}; known: {', '.join(SITE_KINDS)}")
        return sites


class GPTQOptions(WeightCalibrationOptions):
    act_order: bool = True
    """Quantize columns in order of decreasing Hessian diagonal."""
    static_groups: bool = True
    """With act_order and groups: each group's grid from the original weights (keeps groups contiguous). Read only
    with group= and clip=false (clip=true fixes every grid from the original weights itself)."""
    damp: float = Field(default=0.01, gt=0, lt=1)
    """Diagonal damping, relative to the Hessian's mean diagonal."""
    block_size: int = Field(default=128, ge=1)
    """Columns per lazy-batch update."""
    awq: bool = False
    """Search AWQ scales first and fold them into the preceding ops (norms, up_proj, v_proj)."""
    clip: bool = False
    """Search each group's clipping range by output error (AWQ's auto-clip) and run GPTQ on that grid."""
    n_grid: int = Field(default=20, ge=1)
    """AWQ: grid points for the scale exponent and for the clipping factor."""
    sites: list[str] = list(SITE_KINDS)
    """AWQ: where scales may be folded (norm, gated, attention-v)."""
    single_pass: bool = True
    """Quantize each group of linears the moment its input has been computed for all calibration sequences,
    so every block runs once (on all sequences as one batch) instead of twice; later linears of the block
    then see the quantized earlier ones (true-sequential GPTQ). Off (or with awq=true): two runs per block,
    ``batch_size`` sequences at a time."""

    @model_validator(mode="after")
    def _groups_stay_contiguous(self) -> GPTQOptions:
        if self.act_order and self.group and not self.static_groups and not self.clip:
            raise ValueError("act_order=true with group needs static_groups=true (lowbit stores "
                             "contiguous groups along the input dim)")
        check_awq_options(self)
        # the grid is fixed up front without groups (one per channel) and with clip=true (the clip search's, from
        # the original weights): static_groups=false changed nothing there and was accepted without a word
        self.refuse_unread({"static_groups": None if self.group is not None and not self.clip else
                            "group= and clip=false (the clip search fixes every grid from the original weights)"})
        # a single pass runs every calibration sequence as one batch: batch_size=1, set to bound the memory of a
        # block's run, was ignored without a word (one of calib_n or more is that batch, and stays allowed)
        self.refuse_unread({"batch_size": None if not self.single_pass or self.awq or self.batch_size >= self.calib_n
                            else "single_pass=false (a single pass runs all calib_n sequences as one batch)"})
        return self


def check_awq_options(o: Any) -> None:
    """``n_grid`` is read only by the AWQ scale search or the clip search and ``sites`` only by the scale search
    (``awq=true``): given otherwise, each would be silently ignored (gptq, autoround)."""
    o.refuse_unread({"n_grid": None if o.awq or o.clip else "awq=true or clip=true",
                     "sites": None if o.awq else "awq=true"})
    check_clip_grid(o.clip, o.n_grid, 0.5, "")
    check_scale_grid(o.awq, o.n_grid, "x", "drop awq=true")
    if o.awq and not o.sites:  # every group then kept scale 1: awq=true did nothing but list them as unscaled
        raise ValueError(f"option sites=[] names no place to fold AWQ scales, so awq=true would scale nothing; give "
                         f"one or more of {', '.join(SITE_KINDS)} (sites=[norm;gated]), or drop awq=true")


def check_scale_grid(scale_search: bool, n_grid: int, scales: str, instead: str) -> None:
    """The AWQ scale search (``lowbit.calibration.awq.awq_search_scale``) tries ``s = mean|x|^α`` for
    ``α = i/n_grid``, ``i < n_grid``: at ``n_grid=1`` that is ``α = 0`` alone, ``s = 1`` everywhere, and the run was
    plain RTN (or GPTQ) reporting every group scaled. AutoAWQ's ``mean|x|^α / mean|ŵ|^(1-α)`` (``scales=xw``) is
    not 1 at ``α = 0``.
    ``instead`` says the other way out (``drop awq=true``)."""
    if scale_search and scales == "x" and n_grid < 2:
        raise ValueError(f"option n_grid={n_grid}: the AWQ scale search tries s = mean|x|^α for α = i/n_grid, "
                         f"i < n_grid, i.e. α = 0 alone, whose scale is 1 on every channel, so it would scale nothing; "
                         f"raise n_grid (n_grid=20 tries α = 0, 0.05, ..., 0.95), or {instead}")


def check_clip_grid(clip: bool, n_grid: int, max_shrink: float, shrink_option: str) -> None:
    """The clipping search (``lowbit.calibration.awq.awq_search_clip``) tries the ranges ``1 - i/n_grid`` of
    min-max for ``i < round(max_shrink·n_grid)``: a grid that coarse tries min-max alone, and ``clip=true`` ran
    as plain RTN without a word (``n_grid=2``). ``shrink_option`` names ``max_shrink`` where the pass has it."""
    tried = max(1, int(round(max_shrink * n_grid)))
    if clip and tried < 2:
        shrink = "max_shrink" if shrink_option else f"{max_shrink:g}"
        raise ValueError(f"option n_grid={n_grid}{shrink_option}: the clipping search tries the ranges 1 - i/n_grid of "
                         f"min-max for i < round({shrink}·n_grid) = {tried}, i.e. min-max alone, so clip=true would "
                         "clip nothing; raise n_grid" + (" or max_shrink" if shrink_option else "") +
                         " (n_grid=20 tries 1, 0.95, ..., 0.55), or set clip=false")


def _weight_scheme(o: WeightCalibrationOptions) -> QScheme:
    """The weight scheme of our options (ValueError naming the option when they make none). fp8 is symmetric
    whatever ``sym``'s default says: the default (false) is chosen for int4, and an fp8 user who never wrote
    ``sym`` asked for nothing asymmetric."""
    symmetric = o.sym
    if get_qdtype(o.w).is_float:
        if "sym" in o.model_fields_set and not o.sym:
            raise ValueError(f"option sym=false: w={o.w} is a float format with no zero point (symmetric only); "
                             "drop sym or set sym=true")
        symmetric = True
    try:
        return QScheme(qdtype=o.w, symmetric=symmetric, granularity="per_group" if o.group else "per_channel",
                       group_size=o.group)
    except ValidationError as exc:  # its messages, not pydantic's dump of the QScheme's input
        raise ValueError(f"option w={o.w}: " + "; ".join(e["msg"].removeprefix("Value error, ")
                                                         for e in exc.errors())) from None
    except ValueError as exc:
        raise ValueError(f"option w={o.w!r}: {exc}") from None


def _config(o: WeightCalibrationOptions, pass_name: str) -> tuple[QuantConfig, QScheme]:
    """The quantize pass's annotation for our options."""
    try:
        scheme = _weight_scheme(o)
    except ValueError as exc:
        raise PassError(f"pass {pass_name}: {exc}") from None
    cfg = QuantConfig(weight=scheme)
    if o.keep:  # model_copy: the defaults must not count as patterns the user wrote (each must match)
        cfg = cfg.model_copy(update={"keep_float": list(DEFAULT_KEEP_FLOAT) + list(o.keep)})
    return cfg, scheme


def weight_quant_config(o: WeightCalibrationOptions, pass_name: str) -> QuantConfig:
    """What ``gptq``, ``awq`` and ``autoround`` write (``Pass.quant_config``): their options' weight scheme on every
    linear but the kept-float ones."""
    return _config(o, pass_name)[0]


def run_weight_calibration(graph: Graph, o: WeightCalibrationOptions, r: Rounding, pass_name: str) -> dict[str, Any]:
    """What the ``gptq``, ``awq`` and ``autoround`` passes share: resolve their options into targets, token ids
    and a device, run ``lowbit.calibration.weights.calibrate_weights``, report its errors as the pass's."""
    device = o.torch_device(pass_name)
    cfg, _ = _config(o, pass_name)
    extra = [(f"option keep[{i}]", pat) for i, pat in enumerate(o.keep)]
    try:
        p = plan(graph, cfg, o.group_fallback, extra, scope=o.in_scope, nonfinite=o.nonfinite, pass_name=pass_name)
    except PassError as exc:
        raise PassError(str(exc).replace("pass quantize:", f"pass {pass_name}:", 1)) from None
    if not p.weights:
        linears = sorted({n.module for n in graph.nodes if n.op == "linear"})
        if o.modules and not any(o.in_scope(m) for m in linears):  # not the keep rules' doing: say what the scope hit
            sample = ", ".join(linears[:4]) + (", ..." if len(linears) > 4 else "")
            raise PassError(f"pass {pass_name}: option modules={o.modules} matches no linear's module (linears: "
                            f"{sample})")
        raise PassError(f"pass {pass_name}: no linear to quantize: " + _why_all_kept(linears, o, pass_name))
    ids = o.token_ids(graph, pass_name)
    try:
        stats = calibrate_weights(graph, p.weights, ids, r, batch_size=o.batch_size_for(graph), device=device,
                                  progress=o.progress, caller=f"pass {pass_name}")
    except WeightCalibrationError as exc:
        raise PassError(str(exc)) from None
    if p.kept_nonfinite:
        stats["kept_float_nonfinite"] = p.kept_nonfinite
    return stats


def _why_all_kept(linears: list[str], o: WeightCalibrationOptions, pass_name: str) -> str:
    """Why every linear in scope is kept float, naming each module and the keep rule that holds it (default or
    ``keep=``): ``gptq(modules=lm_head)`` said only 'every linear is kept float', with no word that the output head
    and embeddings are kept by default or how to quantize the head."""
    scoped = [m for m in linears if o.in_scope(m)]
    rules = [(p, "by default") for p in DEFAULT_KEEP_FLOAT]
    rules += [(p, f"by option keep[{i}]") for i, p in enumerate(o.keep)]
    held = []
    for m in scoped[:4]:
        rule = next(((p, why) for p, why in rules if module_matches(m, p)), None)
        held.append(f"{m} (kept float {rule[1]}: {rule[0]!r})" if rule else m)
    text = (f"option modules={o.modules} matches only linears kept float: " if o.modules else
            "every linear is kept float: ") + ", ".join(held) + (", ..." if len(scoped) > 4 else "")
    if any(module_matches(m, "lm_head") for m in scoped):
        text += (f"; {pass_name} does not calibrate the output head: quantize it round-to-nearest after {pass_name} "
                 "with quantize(head=int8) (or head=int4,head_group=64)")
    return text


def rounding(method: Literal["gptq", "awq"], pass_name: str, **settings: Any) -> Rounding:
    """``Rounding(method, **settings)``, its option errors (``sites``) named as the pass's."""
    try:
        return Rounding(method, **settings)
    except ValueError as exc:
        raise PassError(f"pass {pass_name}: {exc}") from None


class WeightCalibrationPass(Pass):
    """What ``gptq``, ``awq`` and ``autoround`` declare alike: they run before ``fuse-qlinear`` and after the weight
    rewrites, create ``dequantize`` nodes and write their options' weight scheme (``weight_quant_config``)."""

    requires = (NO_QLINEAR,)
    after = WEIGHT_REWRITES
    creates = ("dequantize",)

    def quant_config(self) -> QuantConfig:
        return weight_quant_config(self.options, self.name)  # type: ignore[arg-type]


@register_pass
class GPTQ(WeightCalibrationPass):
    """GPTQ integer weights (act-order, static groups, lazy batches) from block-by-block calibration."""

    name = "gptq"
    Options = GPTQOptions

    def run(self, graph: Graph) -> PassResult:
        o: GPTQOptions = self.options  # type: ignore[assignment]
        r = rounding("gptq", self.name, scale_search=o.awq, clip=o.clip, n_grid=o.n_grid, act_order=o.act_order,
                     static_groups=o.static_groups, damp=o.damp, block_size=o.block_size, sites=o.sites,
                     single_pass=o.single_pass and not o.awq)
        stats = run_weight_calibration(graph, o, r, self.name)
        if o.act_order and o.group:
            # what compressed-tensors calls actorder "static" (act-order, groups kept contiguous): in the graph, not
            # only the compile report, so `lowbit compile -f compressed-tensors` and a reloaded model write it too
            graph.meta["actorder"] = "static"
        return PassResult(True, stats)
