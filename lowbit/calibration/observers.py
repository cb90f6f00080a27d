"""Observers: turn the values a tensor takes into quantization parameters.

Every observer sees tensors as ``[groups, elements]`` rows, one row per scale (``lowbit.ir.quant.group_view``),
so the same code serves per-tensor, per-channel and block-wise layouts. ``observe`` may be called once (a
weight) or once per calibration batch (an activation); ``qparams(shape)`` returns the scale (and zero point)
shaped for the QDQ ops.

- ``minmax``: the full observed range. Never clips; the error is all rounding.
- ``ema``: moving-average min/max (torch.ao's ``MovingAverageMinMaxObserver``): one outlier batch moves the
  range by ``averaging_constant`` of its excess instead of all of it.
- ``percentile``: the ``percentile``-th value of each batch (and the mirrored one for the minimum), averaged
  over batches: ignores the rarest outliers.
- ``mse``: grid search over range shrink factors for the one minimising ``sum |x - x'|^norm`` per group, on
  the observed values (a bounded deterministic sample of them for large activations).
- ``histogram``: a per-group histogram of the values (up to ``bins`` bins, fewer for small groups); picks the
  shrink factor minimising the expected squared error estimated from the histogram (clipping error of the
  bins outside plus rounding noise step²/12 inside), so it needs no stored samples.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from lowbit.ir.quant import (
    Layout,
    QDType,
    Role,
    fake_quant_with,
    from_groups,
    get_qdtype,
    group_view,
    layout_for,
    qparams_from_range,
)

if TYPE_CHECKING:
    from lowbit.ir.qscheme import QScheme

__all__ = ["Observer", "MinMaxObserver", "MovingAverageMinMaxObserver", "PercentileObserver", "MSEObserver",
           "HistogramObserver", "OBSERVERS", "make_observer", "fake_quant_rows", "fake_quant"]


def fake_quant_rows(rows: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor | None, qd: QDType) -> torch.Tensor:
    """Quantize-dequantize ``[G, M]`` rows with one scale per row: the same arithmetic as the QDQ ops."""
    s = scale.float().reshape(-1, 1)
    y = rows.float() / s
    if qd.is_float:
        return y.clamp(qd.qmin, qd.qmax).to(qd.container).float() * s
    q = torch.round(y)
    if zp is not None:
        z = zp.float().reshape(-1, 1)
        return (q + z).clamp(qd.qmin, qd.qmax).sub(z).mul(s)
    return q.clamp(qd.qmin, qd.qmax).mul(s)


class Observer:
    """Accumulates statistics of one tensor and produces its qparams; subclasses define the statistic."""

    name: ClassVar[str] = ""

    def __init__(self, qdtype: str, symmetric: bool, layout: Layout) -> None:
        self.qd = get_qdtype(qdtype)
        self.symmetric = symmetric
        self.layout = layout
        self.batches = 0
        if self.qd.is_float and not symmetric:
            raise ValueError(f"observer {self.name}: qdtype {self.qd.name} is symmetric only")

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        return group_view(x.detach(), self.layout).float()

    def observe(self, x: torch.Tensor) -> None:
        rows = self.rows(x)
        if rows.numel() == 0:
            raise ValueError(f"observer {self.name}: observed an empty tensor of shape {tuple(x.shape)}")
        self._observe_rows(rows)
        self.batches += 1

    def _observe_rows(self, rows: torch.Tensor) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-group (lo, hi) the qparams cover."""
        raise NotImplementedError  # pragma: no cover - interface

    def qparams(self, shape: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Scale and zero point (None when symmetric) shaped for a tensor of ``shape`` in this layout."""
        if not self.batches:
            raise ValueError(f"observer {self.name} has seen no data: calibration produced no batches")
        lo, hi = self.range()
        scale, zp = qparams_from_range(lo, hi, self.qd, self.symmetric)
        return (from_groups(scale, shape, self.layout),
                None if zp is None else from_groups(zp, shape, self.layout))


class MinMaxObserver(Observer):
    name = "minmax"

    def __init__(self, qdtype: str, symmetric: bool, layout: Layout) -> None:
        super().__init__(qdtype, symmetric, layout)
        self.lo: torch.Tensor | None = None
        self.hi: torch.Tensor | None = None

    def _observe_rows(self, rows: torch.Tensor) -> None:
        lo, hi = rows.amin(1), rows.amax(1)
        if self.lo is None:
            self.lo, self.hi = lo, hi
        else:
            self._check_groups(lo)
            self.lo, self.hi = self._combine(lo, hi)

    def _combine(self, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This batch's per-group range folded into the running one: their union (subclasses average instead)."""
        return torch.minimum(self.lo, lo), torch.maximum(self.hi, hi)  # type: ignore[arg-type]

    def _check_groups(self, lo: torch.Tensor) -> None:
        if self.lo is not None and lo.shape != self.lo.shape:
            raise ValueError(f"observer {self.name}: {lo.numel()} groups in this batch, {self.lo.numel()} before "
                             "(the layout must give every batch the same groups)")

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.lo is not None and self.hi is not None
        return self.lo, self.hi


class MovingAverageMinMaxObserver(MinMaxObserver):
    name = "ema"

    def __init__(self, qdtype: str, symmetric: bool, layout: Layout, averaging_constant: float = 0.1) -> None:
        super().__init__(qdtype, symmetric, layout)
        if not 0 < averaging_constant <= 1:
            raise ValueError(f"observer ema: averaging_constant must be in (0, 1], got {averaging_constant}")
        self.c = averaging_constant

    def _combine(self, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The running range moved ``averaging_constant`` of the way to this batch's."""
        return self.lo + self.c * (lo - self.lo), self.hi + self.c * (hi - self.hi)  # type: ignore[operator]


class PercentileObserver(MinMaxObserver):
    name = "percentile"

    def __init__(self, qdtype: str, symmetric: bool, layout: Layout, percentile: float = 99.99) -> None:
        super().__init__(qdtype, symmetric, layout)
        if not 50 < percentile <= 100:
            raise ValueError(f"observer percentile: percentile must be in (50, 100], got {percentile}")
        self.p = percentile
        self.sum_lo: torch.Tensor | None = None
        self.sum_hi: torch.Tensor | None = None

    def _observe_rows(self, rows: torch.Tensor) -> None:
        m = rows.shape[1]
        k_hi = max(1, min(m, round(m * self.p / 100)))
        k_lo = max(1, min(m, m - k_hi + 1))
        hi = rows.kthvalue(k_hi, dim=1).values
        lo = rows.kthvalue(k_lo, dim=1).values
        if self.sum_lo is None:
            self.sum_lo, self.sum_hi = lo, hi
        else:
            self._check_groups(lo)  # a sum over different groups would broadcast (one group) or fail bare
            self.sum_lo, self.sum_hi = self.sum_lo + lo, self.sum_hi + hi  # type: ignore[operator]
        self.lo, self.hi = self.sum_lo / (self.batches + 1), self.sum_hi / (self.batches + 1)


def _shrink_search(lo: torch.Tensor, hi: torch.Tensor, qd: QDType, symmetric: bool, grid: int, maxshrink: float,
                   error_of: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group, the shrink factor a in (1-maxshrink, 1] of [lo, hi] whose ``error_of(scale, zp)`` is least."""
    best = torch.full_like(lo, float("inf"))
    best_lo, best_hi = lo.clone(), hi.clone()
    for i in range(grid):
        a = 1.0 - maxshrink * i / grid
        clo, chi = lo * a, hi * a
        scale, zp = qparams_from_range(clo, chi, qd, symmetric)
        err = error_of(scale, zp)
        better = err < best
        best = torch.where(better, err, best)
        best_lo = torch.where(better, clo, best_lo)
        best_hi = torch.where(better, chi, best_hi)
    return best_lo, best_hi


class MSEObserver(MinMaxObserver):
    """Grid search of the clipping range (GPTQ's ``mse`` option): a = 1 is in the grid, so never worse than min-max."""

    name = "mse"

    def __init__(self, qdtype: str, symmetric: bool, layout: Layout, grid: int = 100, maxshrink: float = 0.8,
                 norm: float = 2.0, max_samples: int = 1 << 22, seed: int = 0) -> None:
        super().__init__(qdtype, symmetric, layout)
        self.grid, self.maxshrink, self.norm = grid, maxshrink, norm
        self.max_samples = max_samples
        self.samples: list[torch.Tensor] = []
        self.gen = torch.Generator().manual_seed(seed)

    def _observe_rows(self, rows: torch.Tensor) -> None:
        super()._observe_rows(rows)
        self.samples.append(rows)
        total = sum(s.numel() for s in self.samples)
        if total > self.max_samples:
            data = torch.cat(self.samples, 1)
            keep = max(1, self.max_samples // data.shape[0])
            idx = torch.randperm(data.shape[1], generator=self.gen)[:keep]
            self.samples = [data[:, idx.to(data.device)]]

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = super().range()
        data = torch.cat(self.samples, 1) if len(self.samples) > 1 else self.samples[0]

        def error_of(scale: torch.Tensor, zp: torch.Tensor | None) -> torch.Tensor:
            return (fake_quant_rows(data, scale, zp, self.qd) - data).abs().pow(self.norm).sum(1)

        return _shrink_search(lo, hi, self.qd, self.symmetric, self.grid, self.maxshrink, error_of)


class HistogramObserver(MinMaxObserver):
    name = "histogram"

    def __init__(self, qdtype: str, symmetric: bool, layout: Layout, bins: int = 2048, grid: int = 100,
                 maxshrink: float = 0.8) -> None:
        super().__init__(qdtype, symmetric, layout)
        self.bins, self.grid, self.maxshrink = bins, grid, maxshrink
        self.counts: torch.Tensor | None = None
        self.h_lo: torch.Tensor | None = None
        self.h_width: torch.Tensor | None = None

    def _edges(self, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lo = torch.minimum(lo, torch.zeros_like(lo))
        hi = torch.maximum(hi, torch.zeros_like(hi))
        width = ((hi - lo) / self.bins).clamp(min=1e-12)
        return lo, width

    def _bin(self, values: torch.Tensor, lo: torch.Tensor, width: torch.Tensor) -> torch.Tensor:
        return ((values - lo[:, None]) / width[:, None]).floor().clamp(0, self.bins - 1).long()

    def _observe_rows(self, rows: torch.Tensor) -> None:
        super()._observe_rows(rows)
        assert self.lo is not None and self.hi is not None
        if self.counts is None:  # small groups (weights, g64) need no more bins than they have values
            self.bins = min(self.bins, max(16, 1 << (rows.shape[1] - 1).bit_length()))
        lo, width = self._edges(self.lo, self.hi)
        counts = torch.zeros(rows.shape[0], self.bins, device=rows.device)
        if self.counts is not None:  # re-bin the old histogram into the (possibly wider) new range
            assert self.h_lo is not None and self.h_width is not None
            old_lo, old_w = self.h_lo, self.h_width
            centers = old_lo[:, None] + old_w[:, None] * (torch.arange(self.bins, device=old_lo.device) + 0.5)
            counts.scatter_add_(1, self._bin(centers, lo, width), self.counts)
        counts.scatter_add_(1, self._bin(rows, lo, width), torch.ones_like(rows))
        self.counts, self.h_lo, self.h_width = counts, lo, width

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = super().range()
        assert self.counts is not None and self.h_lo is not None and self.h_width is not None
        centers = self.h_lo[:, None] + self.h_width[:, None] * (torch.arange(self.bins, device=self.h_lo.device) + 0.5)
        counts = self.counts
        qd = self.qd

        def error_of(scale: torch.Tensor, zp: torch.Tensor | None) -> torch.Tensor:
            s = scale[:, None]
            if qd.is_float:
                err = (fake_quant_rows(centers, scale, None, qd) - centers).pow(2)
            else:
                z = zp.float()[:, None] if zp is not None else 0.0
                rep_lo, rep_hi = (qd.qmin - z) * s, (qd.qmax - z) * s
                clipped = (centers - centers.clamp(min=rep_lo, max=rep_hi)).pow(2)
                inside = (centers >= rep_lo) & (centers <= rep_hi)
                err = torch.where(inside, s.pow(2) / 12, clipped)
            return (err * counts).sum(1)

        return _shrink_search(lo, hi, qd, self.symmetric, self.grid, self.maxshrink, error_of)


OBSERVERS: dict[str, type[Observer]] = {
    cls.name: cls
    for cls in (MinMaxObserver, MovingAverageMinMaxObserver, PercentileObserver, MSEObserver, HistogramObserver)
}


def make_observer(name: str, qdtype: str, symmetric: bool, layout: Layout, **options: Any) -> Observer:
    """An observer by name (``minmax``, ``ema``, ``percentile``, ``mse``, ``histogram``) with its options."""
    try:
        cls = OBSERVERS[name]
    except KeyError:
        raise ValueError(f"unknown observer {name!r}; known: {', '.join(OBSERVERS)}") from None
    try:
        return cls(qdtype, symmetric, layout, **options)  # type: ignore[call-arg]
    except TypeError as exc:
        raise ValueError(f"observer {name}: bad options {sorted(options)}: {exc}") from exc


def fake_quant(x: torch.Tensor, scheme: QScheme, role: Role = "weight") -> torch.Tensor:
    """Quantize then dequantize ``x`` as ``scheme`` says, with qparams from ``x`` itself via the scheme's observer.

    This is what calibration and the weight algorithms use to measure quantization error; the numerics are
    those of the ``quantize``/``dequantize`` ops.
    """
    layout = layout_for(scheme, x.shape, role)
    obs = make_observer(scheme.observer, scheme.qdtype, scheme.symmetric, layout)
    obs.observe(x)
    scale, zp = obs.qparams(x.shape)
    return fake_quant_with(x, scale, zp, scheme.qdtype, layout)
