"""lowbit.calibration.linalg.solve: torch.linalg.solve's answer, right on the CPU after a thread-count change.

torch's CPU LU of a stack of matrices above 14x14 runs MKL's getrf on parallel threads, which after
``torch.set_num_threads(2)`` raises or returns wrong numbers (pytorch/pytorch#142815): the KurTail R2 steps'
Cayley solve failed at step 0 ("Cayley system is singular") once GPTQ's single_thread block had run.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.calibration.linalg import solve
from lowbit.calibration.rotation_learning import cayley


def _well_conditioned(batch: tuple[int, ...], n: int, gen: torch.Generator) -> torch.Tensor:
    noise = torch.randn(*batch, n, n, generator=gen, dtype=torch.float64)
    return torch.eye(n, dtype=torch.float64) + 0.3 * noise / n**0.5


def test_stacks_solve_right_after_the_thread_count_is_set() -> None:
    """In a fresh process that sets two threads (what conftest and the CLI do), a [2, 576, 576] Cayley stack
    (SmolLM2's hidden size) is orthogonal and each matrix equals its own solve; a [3, 256, 256] solve's residual is
    rounding."""
    script = textwrap.dedent("""
        import torch
        torch.set_num_threads(2)
        from lowbit.calibration.linalg import solve
        from lowbit.calibration.rotation_learning import cayley
        gen = torch.Generator().manual_seed(0)
        a = 0.05 * torch.randn(2, 576, 576, generator=gen)
        c = cayley(a)
        eye = torch.eye(576)
        print("orth", float((c @ c.mT - eye).abs().max()))
        print("each", float(max((c[i] - cayley(a[i])).abs().max() for i in range(2))))
        m = torch.eye(256) + 0.3 * torch.randn(3, 256, 256, generator=gen, dtype=torch.float64) / 16
        b = torch.randn(3, 256, 7, generator=gen, dtype=torch.float64)
        print("residual", float((m @ solve(m, b) - b).abs().max()))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    figures = dict(line.split() for line in out.stdout.splitlines())
    assert float(figures["orth"]) < 1e-4, out.stdout
    assert float(figures["each"]) < 1e-5, out.stdout
    assert float(figures["residual"]) < 1e-10, out.stdout


@settings(max_examples=25, deadline=None)
@given(
    n=st.sampled_from([1, 3, 14, 15, 40]),
    a_batch=st.sampled_from([(), (1,), (3,), (2, 1), (2, 3)]),
    b_batch=st.sampled_from([(), (1,), (3,), (2, 3)]),
    k=st.integers(1, 3),
    as_vector=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_solve_equals_each_matrix_solved_alone(n, a_batch, b_batch, k, as_vector, seed) -> None:
    """Any broadcast of stacks, matrix or vector right-hand sides, below and above the parallel-LU size: the
    result (and its gradient) is what solving each broadcast pair alone gives."""
    try:
        batch = torch.broadcast_shapes(a_batch, b_batch)
    except RuntimeError:
        return
    gen = torch.Generator().manual_seed(seed)
    a = _well_conditioned(a_batch, n, gen).requires_grad_()
    if as_vector:
        b = torch.randn(*a_batch, n, generator=gen, dtype=torch.float64)
        rhs = b.unsqueeze(-1)
        batch = a_batch
    else:
        b = torch.randn(*b_batch, n, k, generator=gen, dtype=torch.float64)
        rhs = b
    x = solve(a, b)
    lhs_each = a.expand(*batch, n, n).reshape(-1, n, n)
    rhs_each = rhs.expand(*batch, n, rhs.shape[-1]).reshape(-1, n, rhs.shape[-1])
    expected = torch.stack([torch.linalg.solve(m, r) for m, r in zip(lhs_each, rhs_each)])
    expected = expected.reshape(*batch, n, rhs.shape[-1])
    assert x.shape == (expected.squeeze(-1) if as_vector else expected).shape
    assert torch.allclose(x.reshape(expected.shape), expected, rtol=1e-10, atol=1e-12)
    (grad,) = torch.autograd.grad(x.sum(), a)
    (grad_each,) = torch.autograd.grad(expected.sum(), a)
    assert torch.allclose(grad, grad_each, rtol=1e-8, atol=1e-10)


def test_bad_shapes_are_named() -> None:
    with pytest.raises(ValueError, match=r"shape \(3, 4\).*square"):
        solve(torch.zeros(3, 4), torch.zeros(3))
    with pytest.raises(ValueError, match=r"right-hand side has shape \(2, 5, 1\).*4x4"):
        solve(torch.eye(4).expand(2, 4, 4), torch.zeros(2, 5, 1))


def test_cayley_of_a_cpu_stack_equals_each_matrix_alone() -> None:
    gen = torch.Generator().manual_seed(1)
    a = 0.1 * torch.randn(3, 64, 64, generator=gen, dtype=torch.float64)
    stacked = cayley(a)
    assert torch.allclose(stacked, torch.stack([cayley(m) for m in a]), rtol=0, atol=1e-13)
    assert float((stacked @ stacked.mT - torch.eye(64, dtype=torch.float64)).abs().max()) < 1e-12
