"""The ``smooth-quant`` pass: fold SmoothQuant scales into the model before int8 activation quantization.

    smooth-quant,quantize(w=int8,a=int8)                      the w8a8-sq recipe
    smooth-quant(alpha=0.6,sites=[norm;gated])                 migration strength and where scales go
    smooth-quant(search=true)                                  α per site by W8A8 output error on calibration tokens
    smooth-quant(search=true,w_bits=4),quantize(w=int4,a=int8)  ... scored as the W4A8 that follows

Statistics (``max|x|`` per input channel, and a token sample when searching α) come from running calibration
text block by block through ``lowbit.calibration.engine``. Each scale is folded by
``lowbit.calibration.scale_migration`` — the same code AWQ uses — so the float model is unchanged (exact up to
float rounding; the engine reuses each block's outputs). A site read only by linears kept float (``lm_head``,
``keep=``) is not smoothed: their inputs are never quantized, so there is nothing to gain, and SmolLM2's ``lm_head``
is tied to the embedding (smoothing it would duplicate 28M parameters). A kept-float linear beside quantized ones
(a mixture-of-experts router reading the same norm as its experts' gate/up) absorbs ``s`` in its input columns like
the others (exact) but has no say in choosing it; one whose weight another node shares refuses the site instead.
Every site passed over is listed with its reason in the stats (``sites_skipped``), and the CLI report prints it.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from pydantic import Field, field_validator, model_validator

from lowbit.calibration.data import calib_size
from lowbit.calibration.engine import BlockRun, batches_from_ids, run
from lowbit.calibration.scale_migration import SITE_KINDS, MigrationSite, apply_scale, find_sites, tied_reader
from lowbit.calibration.smoothquant import search_alpha, smoothquant_scale
from lowbit.ir.graph import Graph, Node, Value
from lowbit.ir.qscheme import DEFAULT_KEEP_FLOAT, module_matches
from lowbit.passes.base import NO_QLINEAR, CalibrationOptions, Pass, PassError, PassResult, register_pass

__all__ = ["SmoothQuant", "SmoothQuantOptions"]


class SmoothQuantOptions(CalibrationOptions):
    alpha: float = Field(default=0.5, ge=0, le=1)
    """Migration strength: 0 leaves activations alone (no smoothing, as the search's α = 0), 1 moves all of their
    range into the weights."""
    search: bool = False
    """Choose α per site from {0, 0.3, ..., 0.8} by the output error on ``samples`` calibration tokens of the
    site's linears quantized as ``w_bits`` / ``a_bits`` say (W8A8 by default)."""
    w_bits: int = Field(default=8, ge=2, le=16)
    """Search: weight bits the α is scored with (symmetric per output channel; 16: float), as the quantizer after
    smooth-quant will use (``quantize(w=int4)``: 4). The search scored every α with int8 weights whatever followed."""
    a_bits: int = Field(default=8, ge=2, le=16)
    """Search: activation bits the α is scored with (symmetric per token; 16: float), as ``quantize(a=...)``."""
    sites: list[str] = ["norm", "gated"]
    """Where scales are folded: norm (RMSNorm/LayerNorm → q/k/v, gate/up), gated (up_proj → down_proj),
    attention-v (v_proj → o_proj)."""
    keep: list[str] = []
    """Extra module globs not smoothed (added to the default lm_head and embeddings)."""
    require_sites: bool = True
    """False: a graph with no place to fold scales (a post-norm encoder such as MiniLM, whose norms also feed
    the residual) is left as it is, with a warning and ``sites: 0`` in the stats, instead of an error. Recipes
    set it so that ``w8a8`` runs on any model."""
    samples: int = Field(default=4096, ge=1)
    """Search: tokens kept per site (evenly spread over the calibration batches)."""

    @field_validator("sites")
    @classmethod
    def _known_sites(cls, sites: list[str]) -> list[str]:
        bad = sorted(set(sites) - set(SITE_KINDS))
        if bad:  # when parsed, not after capture
            raise ValueError(f"unknown {bad}; known: {', '.join(SITE_KINDS)}")
        if not sites:  # it failed after calibration data and capture as 'no place to fold scales ()', or did nothing
            raise ValueError(f"sites=[] names no place to fold scales; give one or more of {', '.join(SITE_KINDS)} "
                             "(sites=[norm;gated])")
        return sites

    @model_validator(mode="after")
    def _read_by_the_mode(self) -> SmoothQuantOptions:
        """``alpha`` is read only without the search and ``samples`` only with it: the other would be silently
        ignored."""
        self.refuse_unread({"alpha": "search=false" if self.search else None,
                            **{k: None if self.search else "search=true" for k in ("samples", "w_bits", "a_bits")}})
        for k in ("w_bits", "a_bits"):
            if 8 < getattr(self, k) < 16:
                raise ValueError(f"option {k}={getattr(self, k)}: the search scores 2-8-bit integers, or 16 for float")
        return self


@dataclass
class _SiteStats:
    site: MigrationSite
    quantized: list[Node]
    """The site's consumers that a later quantize rounds: their weights choose ``s`` (kept-float ones only
    absorb it)."""
    absmax: torch.Tensor | None = None
    sample: list[torch.Tensor] = field(default_factory=list)
    done: bool = False


def _quantized_linear(graph: Graph, keep: list[str]) -> str | None:
    """The first linear SmoothQuant would smooth whose weight or input an earlier pass already quantized (a
    ``dequantize`` output), described; None when there is none."""
    for n in graph.nodes:
        if n.op != "linear" or any(module_matches(n.module, p) for p in keep):
            continue
        for what, v in (("weight", n.args[1]), ("input", n.args[0])):
            if isinstance(v, Value) and v.producer is not None and v.producer.op == "dequantize":
                return (f"the {what} %{v.name} of linear %{n.name} (module {n.module!r}) is already quantized (a "
                        "dequantize from an earlier pass)")
    return None


def _why_no_site(graph: Graph, kind: str) -> str:
    """Why ``find_sites`` found no site of ``kind`` in ``graph``, said in the stats: a kind asked for (the default
    sites=[norm;gated] included) and found nowhere was dropped without a word while the others were smoothed."""
    if kind == "gated":
        users = graph.users()
        behind = [n for n in graph.nodes if n.op == "hadamard" and isinstance(n.args[0], Value)
                  and n.args[0].producer is not None and n.args[0].producer.op in ("mul", "aten.mul.Tensor")
                  and any(u.op == "linear" for u in users.get(id(n.output), []))]
        if behind:
            r = next(u for u in users[id(behind[0].output)] if u.op == "linear")
            return (f"linear %{r.name} (module {r.module!r}) and {len(behind) - 1} more read an online Hadamard of "
                    "the gated product (rotate ran before), which a per-channel scale cannot pass through: "
                    "smooth-quant(sites=[gated]) before fold-norms and rotate smooths it (SmoothRot's order)")
        return "no act(gate)·up product read only by linears (the MLPs are not gated)"
    if kind == "norm":
        return "no RMSNorm/LayerNorm read only by linears"
    return "no v_proj whose output reaches an attention's value through views alone"


_EVERY_READER_KEPT = "every reader is a linear kept float (lm_head, keep=)"


def _kept_float_refusal(graph: Graph, site: MigrationSite, keep: list[str]) -> list[Node] | str:
    """The site's consumers that will be quantized, or why the site is not smoothed: every consumer is kept float
    (nothing to gain), or a kept-float consumer shares its weight with another node (a tied ``lm_head``: scaling
    its columns would copy the tensor)."""
    kept = [c for c in site.consumers if any(module_matches(c.module, p) for p in keep)]
    if len(kept) == len(site.consumers):
        return _EVERY_READER_KEPT
    c = tied_reader(graph, kept)
    if c is not None:
        return (f"its reader linear %{c.name} (module {c.module!r}) is kept float and shares its weight with "
                "another node (tied): scaling its columns would copy that weight")
    kept_ids = {id(c) for c in kept}
    return [c for c in site.consumers if id(c) not in kept_ids]


def _why_every_site_skipped(sites: list[MigrationSite], skipped: dict[str, str]) -> str:
    """Why every site of one kind that ``find_sites`` found was passed over, from each one's reason in ``skipped``:
    this said 'every one feeds a linear kept float' also where a kept-float reader tied to another node's weight
    refused the site (a quantized reader beside it: keeping it float was not the reason)."""
    reasons = [skipped[s.name] for s in sites]
    kept = sum(r == _EVERY_READER_KEPT for r in reasons)
    if kept == len(reasons):
        return "every one feeds a linear kept float (lm_head, keep=)"
    other = [(s.name, r) for s, r in zip(sites, reasons) if r != _EVERY_READER_KEPT]
    more = f" (and {len(other) - 1} more so)" if len(other) > 1 else ""
    text = f"every one is skipped: {other[0][0]}{more}: {other[0][1]}"
    return text + (f"; {kept} more {'feeds' if kept == 1 else 'feed'} only linears kept float (lm_head, keep=)"
                   if kept else "")


@register_pass
class SmoothQuant(Pass):
    """SmoothQuant: per-channel scales from activation and weight ranges, folded into norms/linears (exact)."""

    name = "smooth-quant"
    Options = SmoothQuantOptions
    exact = True
    requires = (NO_QLINEAR,)

    def undone_by(self, later: Pass) -> str | None:
        """fold-norms after norm sites: the norm's gain g/s goes back into its readers' columns W·s, giving W·g,
        fold-norms' own result, so those sites' smoothing vanished while both passes reported success (the
        gated and attention-v scales sit between two linears and stay)."""
        if later.name != "fold-norms" or "norm" not in self.options.sites:
            return None
        return ("it folds each smoothed norm's gain g/s back into the columns W·s of the linears that read it "
                "(W·g: fold-norms' own result), so the norm sites would end unsmoothed; run smooth-quant after "
                "fold-norms (and after rotate), or smooth-quant(sites=[gated]) before it (SmoothRot's order)")

    def run(self, graph: Graph) -> PassResult:
        o: SmoothQuantOptions = self.options  # type: ignore[assignment]
        device = o.torch_device(self.name)
        bad = sorted(set(o.sites) - set(SITE_KINDS))
        if bad:
            raise PassError(f"pass smooth-quant: option sites: unknown {bad}; known: {', '.join(SITE_KINDS)}")
        keep = list(DEFAULT_KEEP_FLOAT) + list(o.keep)
        modules = [n.module for n in graph.nodes if n.op == "linear"]
        for pat in o.keep:
            if not any(module_matches(m, pat) for m in modules):
                raise PassError(f"pass smooth-quant: option keep {pat!r} matches no linear module")
        quantized = _quantized_linear(graph, keep)
        if quantized is not None:  # its sites vanish: "no place to fold scales" (or, with require_sites=false,
            # a warning and nothing done) sent the user looking for a model problem, not a pipeline order one
            raise PassError(f"pass smooth-quant: {quantized}; SmoothQuant moves scales between float weights and "
                            "must run before quantize, gptq, awq and autoround (move smooth-quant first)")
        skipped: dict[str, str] = {}  # site -> why it is not smoothed, for the stats
        found = find_sites(graph, o.sites, skipped)
        sites: list[_SiteStats] = []
        for site in found:
            why = _kept_float_refusal(graph, site, keep)
            if isinstance(why, str):
                skipped[site.name] = why
            else:
                sites.append(_SiteStats(site, why))
        if not sites:
            message = f"pass smooth-quant: no place to fold scales ({', '.join(o.sites)}) in this graph"
            if found:  # each one passed over: say why, a tied reader apart from readers kept float
                message += f"; of the {len(found)} site(s) found, {_why_every_site_skipped(found, skipped)}"
            if o.require_sites:
                raise PassError(message + " (require_sites=false leaves such a graph unchanged)")
            warnings.warn(message + "; left unchanged (require_sites=false)", stacklevel=2)
            return PassResult(False, {"sites": 0, "skipped": message, "sites_skipped": skipped})
        t0 = time.perf_counter()
        stats_of = {id(ss.quantized[0]): ss for ss in sites}
        per_batch = 1  # tokens sampled per batch and site; set once the batches are known
        alphas: list[float] = []
        moved: list[str] = []  # the sites whose scale was not all ones

        def on_node(node: Node, args: tuple[Any, ...], kwargs: dict[str, Any], outs: list[Any]) -> None:
            ss = stats_of.get(id(node))
            if ss is None or ss.done:
                return
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            amax = x.abs().amax(0)
            ss.absmax = amax if ss.absmax is None else torch.maximum(ss.absmax, amax)
            if o.search:
                step = max(1, x.shape[0] // per_batch)
                ss.sample.append(x[::step][:per_batch].clone())

        def on_block(ctx: BlockRun) -> bool:
            for ss in stats_of.values():
                if ss.absmax is None or ss.done:
                    continue
                if not bool(torch.isfinite(ss.absmax).all()):  # s would be 1 there: no smoothing, without a word
                    bad = int((~torch.isfinite(ss.absmax)).sum())
                    raise PassError(f"pass smooth-quant: site {ss.site.name}: the calibration inputs are not finite "
                                    f"(NaN/inf in {bad} of {ss.absmax.numel()} channels); give finite calibration "
                                    "data")
                weights = [c.args[1].data for c in ss.quantized]
                if o.search:
                    alpha, s, _ = search_alpha(torch.cat(ss.sample), ss.absmax, weights, expand=ss.site.expand,
                                               w_bits=o.w_bits, a_bits=o.a_bits)
                elif o.alpha > 0:
                    alpha, s = o.alpha, smoothquant_scale(ss.absmax, weights, o.alpha, ss.site.expand)
                else:  # as documented and as the search's α = 0: no smoothing (the formula would give s = 1/max|W|)
                    alpha, s = 0.0, torch.ones(ss.site.channels)
                if not bool((s == 1).all()):  # s = 1 moves nothing (it gave a weightless norm a weight of ones)
                    apply_scale(graph, ss.site, s)
                    moved.append(ss.site.name)
                alphas.append(alpha)
                ss.done, ss.sample = True, []
            return False  # exact: the block's outputs do not change

        ids = o.token_ids(graph, self.name)
        batches = batches_from_ids(graph, ids, o.batch_size_for(graph))
        per_batch = max(1, o.samples // len(batches))
        report = run(graph, batches, on_node=on_node, on_block=on_block, progress=o.progress, device=device)
        missing = [ss.site.name for ss in stats_of.values() if not ss.done]
        if missing:
            raise PassError(f"pass smooth-quant: calibration never reached the site(s) {', '.join(missing[:5])}")
        by_kind: dict[str, int] = {}
        for ss in sites:
            by_kind[ss.site.kind] = by_kind.get(ss.site.kind, 0) + 1
        found_of_kind: dict[str, list[MigrationSite]] = {}
        for site in found:
            found_of_kind.setdefault(site.kind, []).append(site)
        return PassResult(bool(moved), {
            "sites": by_kind,
            "sites_scaled": len(moved),
            "float_readers_scaled": sum(len(ss.site.consumers) - len(ss.quantized) for ss in sites
                                        if ss.site.name in moved),
            "sites_skipped": skipped,
            "sites_not_found": {k: _why_every_site_skipped(found_of_kind[k], skipped) if k in found_of_kind
                                else _why_no_site(graph, k) for k in o.sites if k not in by_kind},
            "alpha_mean": round(sum(alphas) / len(alphas), 3),
            "alpha_search": o.search,
            **({"alpha_scored_as": f"W{o.w_bits}A{o.a_bits}"} if o.search else {}),  # 16: that side float
            **calib_size(ids),
            "seconds": round(time.perf_counter() - t0, 2),
            "seconds_calibration_engine": round(report.seconds, 2),
        })
