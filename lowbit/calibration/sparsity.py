"""Sparsity masks and SparseGPT: which weights of a linear to zero, and how to update the ones that stay.

Scores (larger = keep), compared within each output row (Wanda's comparison group; magnitude uses the same so
the two differ only in the score):

- ``magnitude``: ``|W_ij|``;
- ``wanda``: ``|W_ij| · ||X_j||₂`` (Sun et al. 2023), ``||X_j||`` the norm of input channel j over the
  calibration tokens;
- ``sparsegpt``: SparseGPT (Frantar & Alistarh 2023): columns are visited left to right; in each block of
  columns the mask is chosen by ``W² / [H⁻¹]²_jj`` and every zeroed weight's error is spread over the columns
  not yet visited through the inverse Hessian, exactly as GPTQ spreads rounding errors (its Cholesky factor is
  GPTQ's, ``lowbit.calibration.gptq._inverse_cholesky``).

Patterns: unstructured at a fraction ``s``, or N:M (``n`` of every ``m`` consecutive weights along K are kept: 2:4
keeps 2 of 4). Unstructured masks are chosen per row (``selection="row"``: every row loses ``floor(s·K)`` weights, or
one more in the first rows so that the matrix loses exactly ``floor(s·N·K)`` — a per-block OWL sparsity rarely makes
``s·K`` whole —, Wanda's comparison group) or per layer (``"layer"``: the lowest scores of the whole ``[N, K]`` matrix,
``floor(s·N·K)`` of them, so rows that matter keep more; SparseGPT's reference selects this way, block of columns
by block of columns).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from collections.abc import Sequence
from typing import Any, Literal

import torch

from lowbit.calibration.gptq import _inverse_cholesky, check_weight_hessian, reversed_hessian, single_thread

__all__ = ["SparsityPattern", "Selection", "parse_pattern", "prune_mask", "sparsegpt_prune", "check_pattern"]

Selection = Literal["row", "layer"]
"""Where unstructured masks compare scores: within each output row, or over the whole weight matrix."""


@dataclass(frozen=True)
class SparsityPattern:
    """``n:m`` (keep n of every m along K) when ``m`` is set, else unstructured at ``sparsity``."""

    sparsity: float
    n: int | None = None
    m: int | None = None

    @property
    def is_nm(self) -> bool:
        return self.m is not None

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.is_nm else f"unstructured-{self.sparsity:g}"


def parse_pattern(pattern: str | None, sparsity: float) -> SparsityPattern:
    """``"2:4"`` or None/``"unstructured"``; raises ValueError on anything else."""
    if pattern in (None, "", "unstructured"):
        if not 0 <= sparsity < 1:
            raise ValueError(f"sparsity={sparsity} must be in [0, 1)")
        return SparsityPattern(sparsity)
    try:
        n_s, m_s = pattern.split(":")
        n, m = int(n_s), int(m_s)
    except ValueError:
        raise ValueError(f"pattern {pattern!r} is not 'N:M' (such as 2:4) or 'unstructured'") from None
    if not 0 < n < m:
        raise ValueError(f"pattern {pattern!r}: need 0 < N < M")
    return SparsityPattern(1 - n / m, n, m)


def check_pattern(k: int, p: SparsityPattern, where: str) -> None:
    """N:M needs K divisible by M; the error names the layer and the number."""
    if p.is_nm and k % p.m:  # type: ignore[operator]
        raise ValueError(f"{where}: {p} sparsity needs the input size to be a multiple of {p.m}, but it is {k}")


def _smallest(score: torch.Tensor, count: int) -> torch.Tensor:
    """Bool mask of the ``count`` smallest entries of each row (ties broken by position)."""
    mask = torch.zeros_like(score, dtype=torch.bool)
    if count > 0:
        idx = torch.topk(score, count, dim=1, largest=False, sorted=False).indices
        mask.scatter_(1, idx, True)
    return mask


def _row_counts(groups: Sequence[int], k: int, sparsity: float) -> torch.Tensor:
    """Zeros per row: ``floor(s·R·K)`` per matrix of ``R`` rows (``groups``), as even over its rows as integers
    allow."""
    out = []
    for rows in groups:
        total = int(sparsity * rows * k)
        c = torch.full((rows,), total // rows, dtype=torch.long)
        c[:total - (total // rows) * rows] += 1
        out.append(c)
    return torch.cat(out)


def _smallest_per_row(score: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Bool mask of the ``counts[r]`` smallest entries of each row ``r`` (ties broken by position)."""
    if bool((counts == counts[0]).all()):
        return _smallest(score, int(counts[0]))
    order = torch.sort(score, dim=1, stable=True).indices
    rank = torch.arange(score.shape[1], device=score.device)[None, :] < counts.to(score.device)[:, None]
    return torch.zeros_like(score, dtype=torch.bool).scatter_(1, order, rank)


def _smallest_in_groups(score: torch.Tensor, counts: Sequence[int], groups: Sequence[int]) -> torch.Tensor:
    """Bool mask of the ``counts[g]`` smallest entries of each block of rows ``groups[g]`` (rows of ``score``)."""
    parts, r0 = [], 0
    for rows, count in zip(groups, counts):
        part = score[r0:r0 + rows]
        parts.append(_smallest(part.reshape(1, -1), count).reshape(part.shape))
        r0 += rows
    return torch.cat(parts, 0)


def prune_mask(score: torch.Tensor, p: SparsityPattern, selection: Selection = "row") -> torch.Tensor:
    """Bool ``[N, K]``, True where a weight is zeroed: the lowest scores of each M-group, or (unstructured) of each
    row (``floor(s·K)`` each) or of the whole matrix (``floor(s·N·K)``)."""
    n_rows, k = score.shape
    if p.is_nm:
        m = p.m
        assert m is not None and p.n is not None
        g = score.reshape(n_rows * (k // m), m)
        return _smallest(g, m - p.n).reshape(n_rows, k)
    if selection == "layer":
        return _smallest(score.reshape(1, -1), int(p.sparsity * n_rows * k)).reshape(n_rows, k)
    return _smallest_per_row(score, _row_counts([n_rows], k, p.sparsity))


def sparsegpt_prune(w: torch.Tensor, h: torch.Tensor, p: SparsityPattern, damp: float = 0.01,
                    block_size: int = 128, selection: Selection = "row",
                    groups: Sequence[int] | None = None, *, consume_h: bool = False
                    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """SparseGPT on ``w [N, K]`` with input Hessian ``h [K, K]``: (pruned weight in ``w``'s dtype, mask, stats).

    Unstructured, ``selection="row"``: row ``r`` is to lose ``c_r`` weights (``_row_counts``: ``floor(s·K)`` or one
    more), each block of columns ``[i1, i2)`` zeroes ``floor(c_r·i2/K) - floor(c_r·i1/K)`` of them. ``"layer"``: the
    block zeroes the ``floor(s·R·i2) - floor(s·R·i1)`` lowest scores among all its ``R`` rows, so the matrix ends with
    exactly ``floor(s·R·K)`` zeros and rows differ. ``groups`` (row counts summing to N) are matrices stacked because
    they share ``h`` (q/k/v): each is its own layer for the selection. Computation on ``h``'s device in float32 (the
    factor in float64). ``consume_h=True`` hands ``h`` over, as ``gptq_quantize``'s does: it is factored in place
    and left empty (one ``K × K`` float64 matrix less than a copy)."""
    t0 = time.perf_counter()
    n, k = check_weight_hessian(w, h, "SparseGPT")
    groups = [n] if groups is None else list(groups)
    if sum(groups) != n or min(groups) < 1:
        raise ValueError(f"SparseGPT: row groups {groups} do not split the weight's {n} rows")
    dev = h.device
    dead = torch.diagonal(h) == 0
    hinv, rel_damp = _inverse_cholesky(reversed_hessian(h, consume=consume_h), damp)
    del h
    wf = w.detach().float().to(dev).clone()
    mask = torch.zeros(n, k, dtype=torch.bool, device=dev)
    row_counts = None if p.is_nm else _row_counts(groups, k, p.sparsity).to(dev)
    if p.is_nm:
        m = p.m
        assert m is not None
        block_size = max(m, block_size // m * m)
    loss = 0.0
    with single_thread():
        for i1 in range(0, k, block_size):
            i2 = min(i1 + block_size, k)
            w1 = wf[:, i1:i2].clone()
            err1 = torch.zeros_like(w1)
            h1 = hinv[i1:i2, i1:i2]
            d1 = torch.diagonal(h1)
            if p.is_nm:
                mask1 = torch.zeros_like(w1, dtype=torch.bool)
            elif selection == "layer":
                counts = [int(p.sparsity * r * i2) - int(p.sparsity * r * i1) for r in groups]
                mask1 = _smallest_in_groups(w1.pow(2) / d1.pow(2)[None, :], counts, groups)
            else:
                assert row_counts is not None
                counts = row_counts * i2 // k - row_counts * i1 // k
                mask1 = _smallest_per_row(w1.pow(2) / d1.pow(2)[None, :], counts)
            for i in range(i2 - i1):
                if p.is_nm and i % p.m == 0:  # type: ignore[operator]
                    j = i + p.m  # type: ignore[operator]
                    mask1[:, i:j] = prune_mask(w1[:, i:j].pow(2) / d1[i:j].pow(2)[None, :], p)
                col = w1[:, i]
                q = torch.where(mask1[:, i], torch.zeros_like(col), col)
                e = (col - q) / d1[i]
                w1[:, i] = q
                if i + 1 < i2 - i1:
                    w1[:, i + 1:].addmm_(e[:, None], h1[i, i + 1:][None, :], alpha=-1.0)
                err1[:, i] = e
                loss += float(e.double().pow(2).sum()) / 2  # e = (w - q) / U_jj: e² = (w - q)² / H⁻¹_jj
            wf[:, i1:i2] = w1
            mask[:, i1:i2] = mask1
            if i2 < k:
                wf[:, i2:].addmm_(err1, hinv[i1:i2, i2:], alpha=-1.0)
    wf[mask] = 0.0
    stats = {"loss": loss, "damp": rel_damp, "dead_columns": int(dead.sum()), "seconds": time.perf_counter() - t0}
    return wf.to(w.dtype), mask, stats
