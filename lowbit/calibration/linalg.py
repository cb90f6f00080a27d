"""Linear solves that stay right on the CPU whatever thread count the process has set.

torch's CPU LU of a stack of matrices factorises them on parallel threads once they are larger than 14x14 (its
grain-size heuristic rounds to 0 there), and MKL's getrf is not safe to call that way: after
``torch.set_num_threads(n)`` with ``n > 1`` (pytest's conftest, lowbit's CLI, GPTQ's ``single_thread`` restoring
the count) a ``[2, 576, 576]`` ``torch.linalg.solve`` raises "Pivots given to lu_solve must all be greater or
equal to 1" or returns wrong numbers (``|A·X - I|`` of 1e25 for a well-conditioned stack). Reported upstream as
pytorch/pytorch#142815, a fix proposed in #181570; measured with torch 2.13 and MKL 2024.2. One matrix at a time,
getrf is called from one thread and is right.
"""

from __future__ import annotations

import math

import torch

PARALLEL_LU_MIN_SIZE = 15
"""The smallest matrix size whose stacks torch's CPU LU factorises on parallel threads (3200 / n³ rounds to 0)."""


def solve(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``torch.linalg.solve(a, b)`` (same broadcasting, vector or matrix right-hand sides, autograd), solving a CPU
    stack of matrices of size >= ``PARALLEL_LU_MIN_SIZE`` one matrix at a time (module docstring: why)."""
    if a.dim() < 2 or a.shape[-1] != a.shape[-2]:
        raise ValueError(f"solve: the left-hand side has shape {tuple(a.shape)}: expected a stack of square matrices")
    n = a.shape[-1]
    vector = b.dim() == 1 or b.shape == a.shape[:-1]
    rhs = b.unsqueeze(-1) if vector else b
    if rhs.shape[-2] != n:
        raise ValueError(f"solve: the right-hand side has shape {tuple(b.shape)}, the matrices are {n}x{n}")
    batch = torch.broadcast_shapes(a.shape[:-2], rhs.shape[:-2])
    if a.device.type != "cpu" or n < PARALLEL_LU_MIN_SIZE or math.prod(batch) <= 1:
        return torch.linalg.solve(a, b)
    k = rhs.shape[-1]
    lhs_stack = a.expand(*batch, n, n).reshape(-1, n, n)
    rhs_stack = rhs.expand(*batch, n, k).reshape(-1, n, k)
    x = torch.stack([torch.linalg.solve(lhs, r) for lhs, r in zip(lhs_stack, rhs_stack)]).reshape(*batch, n, k)
    return x.squeeze(-1) if vector else x

