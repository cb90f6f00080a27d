"""The ``slice-residual`` pass: SliceGPT-style slicing of the residual stream — rotate the stream onto its principal
components (calibrated) and drop the weakest ones, so every layer's hidden size shrinks.

    fold-norms,slice-residual(ratio=0.2)          576 -> 448 on SmolLM2 (kept width a multiple of 16)

Why it is exact up to the slice: the stream rotates exactly as ``rotate`` does it (``lowbit.ir.rotation_regions``:
the embedding ``E·Q``, the linears reading a unit-gain RMSNorm of it ``W·Q``, those writing it ``Qᵀ·W``; unit-gain
RMSNorm is rotation invariant, hence ``fold-norms`` first). With ``Q`` the eigenvectors of the calibration
activations' second moment, ordered by eigenvalue, the stream's last coordinates carry the least energy; keeping
the first ``d'`` columns of ``Q`` drops them from every weight at once. ``ratio=0`` is then a pure rotation (exact
in float64: a test). What is approximate, and compensated: RMSNorm divides by ``sqrt(mean(x²))`` over the kept
``d'`` channels instead of all ``d``, so each norm gets the constant gain ``sqrt(d/d')`` (the dropped energy is what
remains of the error). A head still tied to the embedding stays tied (both become ``E·Q'``); on SmolLM2
``fold-norms`` has already untied it (the final norm's gain folds into the head, not the embedding).

Why one rotation for the whole stream: SliceGPT rotates each block's input with its own ``Q_l`` and puts
``Q_lᵀ·Q_{l+1}`` on every residual connection, a ``d' × d'`` matmul per add that needs its own kernel and a format no
serving runtime loads; one global ``Q`` keeps the model a plain, narrower Llama (``hidden_size`` = ``d'``,
``head_dim`` unchanged). Its PCA is taken over the normed stream that the readers see
(each block's inputs to its q/k/v and gate/up linears), so every layer counts alike although the raw stream grows
with depth.

Bad input: a stream the rotation analysis refuses (LayerNorm, an unknown reader), norms that still carry per-channel
gains (run ``fold-norms`` first; an earlier slice's constant gain is kept and multiplied, so a stream slices
again), quantized weights, and a ratio that keeps nothing: errors naming the node or number.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace

import torch
from pydantic import Field

from lowbit.ir.graph import Graph
from lowbit.ir.rewrite import gain_weight, norm_gain
from lowbit.ir.rotation_regions import find_rotation_regions
from lowbit.passes.base import NO_DEQUANTIZE, NO_QLINEAR, CalibrationOptions, Pass, PassError, PassResult, register_pass
from lowbit.passes.prune_mlp import collect_input_stats, reinfer
from lowbit.passes.pruning_sites import refuse_nonfinite_weights
from lowbit.passes.rotate import check_foldable, fold_residual

__all__ = ["SliceResidual", "SliceResidualOptions", "principal_rotation"]


class SliceResidualOptions(CalibrationOptions):
    ratio: float = Field(default=0.2, ge=0.0, lt=1.0)
    """Fraction of the residual stream's channels removed."""
    multiple: int = Field(default=16, ge=1)
    """The kept width is rounded down to a multiple of this (tensor-core tiles and quantization groups); a ratio
    that keeps less than one multiple is an error naming both."""
    calib_n: int = Field(default=32, ge=1)


def principal_rotation(second_moment: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Q, eigenvalues): the eigenvectors of a symmetric ``Σ xᵀx`` as float64 columns, by decreasing eigenvalue."""
    evals, evecs = torch.linalg.eigh(second_moment.to(torch.float64))
    order = torch.argsort(evals, descending=True)
    return evecs[:, order], evals[order]


def kept_width(dim: int, ratio: float, multiple: int) -> int:
    """``dim·(1 - ratio)`` rounded down to ``multiple`` (``dim`` itself at ratio 0)."""
    if ratio == 0:
        return dim
    keep = int(dim * (1 - ratio)) // multiple * multiple
    return keep


@register_pass
class SliceResidual(Pass):
    """Rotate the residual stream onto its calibrated principal components and drop the weakest (SliceGPT)."""

    name = "slice-residual"
    Options = SliceResidualOptions
    after = ("fold-norms",)
    requires = (NO_QLINEAR, NO_DEQUANTIZE)

    def run(self, graph: Graph) -> PassResult:
        o: SliceResidualOptions = self.options  # type: ignore[assignment]
        t0 = time.perf_counter()
        regions = find_rotation_regions(graph)
        res = regions.residual
        if res is None:
            raise PassError(f"pass {self.name}: the residual stream cannot be rotated: " + "; ".join(regions.refused))
        # a gain equal in every channel commutes with the rotation: an earlier slice's sqrt(d/d') (slicing again)
        check_foldable(res, self.name, scalar_gains=True)
        refuse_nonfinite_weights(self.name, [*res.readers, *res.writers])
        params_before = sum(v.data.numel() for v in graph.params.values())
        d = res.dim
        keep = kept_width(d, o.ratio, o.multiple)
        if keep < 1:
            raise PassError(f"pass {self.name}: ratio={o.ratio} keeps {keep} of the residual stream's {d} channels "
                            f"(multiple={o.multiple}); lower the ratio or the multiple")
        # one reader per distinct normed input (q/k/v read the same one): each block's two norms count once
        firsts: dict[int, object] = {}
        for r in res.readers:
            firsts.setdefault(id(r.args[0]), r)
        sites = list(firsts.values())
        col = collect_input_stats(graph, sites, o, self.name, second_moment=True)  # type: ignore[arg-type]
        stats_in = [st for st in col.inputs.values() if st.xtx is not None and st.rows]
        if not stats_in:
            raise PassError(f"pass {self.name}: calibration reached none of the {len(sites)} linears reading the "
                            "normed stream; no principal components to take")
        moment = sum(st.xtx / st.rows for st in stats_in)
        q, evals = principal_rotation(moment)
        q = q[:, :keep]
        energy = float(evals[:keep].sum() / evals.sum())
        users = graph.users()
        # readers sharing the embedding's table (a tied head) are left out of the fold and then read the
        # embedding's rotated table: E·Q is computed once (it is the largest product) and the sliced model keeps
        # one table
        tied = [(r, e) for e in res.embeddings for r in res.readers if r.args[1] is e.args[0]]
        tied_readers = {id(r) for r, _ in tied}
        fold_residual(graph, replace(res, readers=[r for r in res.readers if id(r) not in tied_readers]), users, q)
        for r, e in tied:
            r.args = (r.args[0], e.args[0], *r.args[2:])
        if keep < d:
            # RMSNorm now averages over keep channels: a constant gain sqrt(d/keep) restores the d-channel scale
            # (a gain, not a scaled reader weight, so a tied head stays tied and the norm keeps its HF form)
            gain = math.sqrt(d / keep)
            dtype = res.embeddings[0].args[0].data.dtype if res.embeddings else torch.float32
            for n in res.norms:
                old = norm_gain(n)  # a scalar (check_foldable): an earlier slice's factor, kept
                g = gain * (float(old.reshape(-1)[0]) if old is not None else 1.0)
                w = graph.add_param(graph.fresh_param_name(f"{n.module or n.name}.weight"),
                                    gain_weight(n, torch.full((keep,), g, dtype=torch.float64), dtype))
                n.args = (n.args[0], w, *n.args[2:])
        from lowbit.passes.dce import eliminate_dead_code

        eliminate_dead_code(graph)
        shapes = reinfer(graph, self.name)
        graph.meta["pruned"] = {**graph.meta.get("pruned", {}), "hidden_size": keep}
        return PassResult(True, {"hidden_size": [d, keep], "energy_kept": round(energy, 5),
                                 "readers": len(res.readers), "writers": len(res.writers),
                                 "tied": len(tied), "calib_sites": len(stats_in), **col.size,
                                 "params_before": params_before,
                                 "params_after": sum(v.data.numel() for v in graph.params.values()), **shapes,
                                 "seconds": round(time.perf_counter() - t0, 2)})
