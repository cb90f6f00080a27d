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
keeps 2 of 4). Unstructured masks are chosen per row (``selection="row"``: every row loses exactly ``floor(s·K)``
weights, Wanda's comparison group) or per layer (``"layer"``: the lowest scores of the whole ``[N, K]`` matrix,
``floor(s·N·K)`` of them, so rows that matter keep more; SparseGPT's reference selects this way, block of columns
by block of columns).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from collections.abc import Sequence
from typing import Any, Literal

import torch

from lowbit.calibration.gptq import _inverse_cholesky, single_thread

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
    return _smallest(score, int(p.sparsity * k))


def sparsegpt_prune(w: torch.Tensor, h: torch.Tensor, p: SparsityPattern, damp: float = 0.01,
                    block_size: int = 128, selection: Selection = "row",
                    groups: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """SparseGPT on ``w [N, K]`` with input Hessian ``h [K, K]``: (pruned weight in ``w``'s dtype, mask, stats).

    Unstructured, ``selection="row"``: each block of columns ``[i1, i2)`` zeroes ``floor(s·i2) - floor(s·i1)``
    weights of every row, so every row ends with exactly ``floor(s·K)`` zeros. ``"layer"``: the block zeroes the
    ``floor(s·R·i2) - floor(s·R·i1)`` lowest scores among all its ``R`` rows, so the matrix ends with exactly
    ``floor(s·R·K)`` zeros and rows differ. ``groups`` (row counts summing to N) are matrices stacked because they
    share ``h`` (q/k/v): each is its own layer for the selection. Computation on ``h``'s device in float32 (the
    factor in float64)."""
    t0 = time.perf_counter()
    n, k = w.shape
    if h.shape != (k, k):
        raise ValueError(f"SparseGPT: Hessian shape {tuple(h.shape)} does not match the weight's input size {k}")
    groups = [n] if groups is None else list(groups)
    if sum(groups) != n or min(groups) < 1:
        raise ValueError(f"SparseGPT: row groups {groups} do not split the weight's {n} rows")
    dev = h.device
    h = h.to(torch.float64).clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    u, rel_damp = _inverse_cholesky(h, damp)
    hinv = u.float()
    del h, u
    wf = w.detach().float().to(dev).clone()
    mask = torch.zeros(n, k, dtype=torch.bool, device=dev)
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
                count = int(p.sparsity * i2) - int(p.sparsity * i1)
                mask1 = _smallest(w1.pow(2) / d1.pow(2)[None, :], count)
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
                loss += float((e.double() * d1[i].double()).pow(2).sum()) / 2
            wf[:, i1:i2] = w1
            mask[:, i1:i2] = mask1
            if i2 < k:
                wf[:, i2:].addmm_(err1, hinv[i1:i2, i2:], alpha=-1.0)
    wf[mask] = 0.0
    stats = {"loss": loss, "damp": rel_damp, "dead_columns": int(dead.sum()), "seconds": time.perf_counter() - t0}
    return wf.to(w.dtype), mask, stats
