"""Rotations: Hadamard constructions, rotation regions, the rotate pass and the online hadamard op."""

from __future__ import annotations

import pytest
import torch

from lowbit.ir.hadamard import (
    BASE_ORDERS,
    HadamardError,
    hadamard,
    hadamard_matrix,
    hadamard_order_split,
    paley1,
    paley2,
    random_hadamard,
    sylvester,
    williamson,
)

# ---- Hadamard constructions -----------------------------------------------------------------------

BUILT = [m for m in BASE_ORDERS if m != 172]


def _is_hadamard(h: torch.Tensor, rows: int | None = None) -> bool:
    """±1 entries and H·Hᵀ = n·I (on the first ``rows`` rows when given; exact in float32 for n < 2^24)."""
    n = h.shape[0]
    top = h if rows is None else h[:rows]
    return bool(((h == 1) | (h == -1)).all()) and torch.equal(
        top.float() @ h.float().T, n * torch.eye(n)[: top.shape[0]])


@pytest.mark.parametrize("m", BUILT)
def test_every_named_order_is_hadamard(m):
    assert hadamard_order_split(m) in ((m, 1), (m // 2, 2))
    assert _is_hadamard(hadamard_matrix(m))


def test_constructions_by_name():
    assert _is_hadamard(sylvester(64))
    assert _is_hadamard(paley1(27)) and _is_hadamard(paley1(343))     # GF(3^3), GF(7^3)
    assert _is_hadamard(paley2(25)) and _is_hadamard(paley2(17))      # GF(5^2)
    a, b, c, d = williamson(13)
    assert all(torch.equal(x, x.T) for x in (a, b, c, d))
    assert torch.equal(a @ a + b @ b + c @ c + d @ d, 52 * torch.eye(13, dtype=torch.int64))
    with pytest.raises(HadamardError, match="q ≡ 3"):
        paley1(13)


@pytest.mark.parametrize("n,split", [(576, (36, 16)), (1536, (12, 128)), (4864, (76, 64)), (896, (28, 32)),
                                     (8960, (140, 64)), (11008, (344, 32)), (192, (12, 16)), (2048, (1, 2048))])
def test_model_widths(n, split):
    # SmolLM2 (576, 1536), Qwen2-0.5B (896, 4864), Qwen2-1.5B (8960), LLaMA-2-7B (11008 via Paley I on GF(343))
    assert hadamard_order_split(n) == split
    assert _is_hadamard(hadamard_matrix(n, torch.float32), rows=None if n <= 2048 else 128)


def test_unknown_dimension_names_it():
    with pytest.raises(HadamardError, match="dimension 172 = 43·2\\^2"):
        hadamard_matrix(172)
    with pytest.raises(HadamardError, match="dimension 188 = 47"):
        hadamard(188)


def test_randomised_hadamard_is_orthogonal():
    for n in (576, 1536, 156):
        q = random_hadamard(n, seed=3)
        assert (q @ q.T - torch.eye(n, dtype=torch.float64)).abs().max() < 1e-12
        assert not torch.equal(q, hadamard(n))
        assert torch.equal(q, random_hadamard(n, seed=3))
