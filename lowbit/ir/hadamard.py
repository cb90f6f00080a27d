"""Hadamard matrices for rotations: constructed, never looked up in a table, and checked.

A rotation that folds into a model's weights (QuaRot) or runs online before a quantized linear needs an
orthogonal matrix with small, equal-magnitude entries: ``H/sqrt(n)`` for a Hadamard matrix ``H``
(``H·Hᵀ = n·I``, entries ±1). Dimensions of real models are a power of two times a small "odd part"
(SmolLM2: 576 = 36·16, 1536 = 12·128; 4864 = 76·64), so a dimension ``n`` is split as ``m·2^k`` where an
order ``m`` has a construction, and ``H_n = H_m ⊗ H_{2^k}``. The constructions, all generated here:

* Sylvester doubling: ``H_{2n} = [[H, H], [H, -H]]`` (orders 2^k).
* Paley I: ``q + 1`` for a prime power ``q ≡ 3 (mod 4)`` (12, 20, 28 over GF(27), 60, 108, 140, 344 over
  GF(343), …), from the quadratic character of GF(q).
* Paley II: ``2(q + 1)`` for a prime power ``q ≡ 1 (mod 4)`` (36, 52 over GF(25), 76, …).
* Goethals–Seidel with four commuting circulants from T-matrices of order 3 times Williamson matrices of
  order w (found by a meet-in-the-middle search over symmetric circulants): ``12·w`` (156 = 12·13).
* Kronecker products of any of the above.

A dimension with no construction raises :class:`HadamardError` naming it; there is no random fallback.
"""

from __future__ import annotations

import functools
import itertools
import math

import torch

__all__ = [
    "HadamardError",
    "hadamard",
    "hadamard_matrix",
    "hadamard_order_split",
    "paley1",
    "paley2",
    "random_hadamard",
    "sylvester",
    "williamson",
]

BASE_ORDERS = (12, 20, 28, 36, 40, 52, 60, 76, 108, 140, 156, 172)
"""The odd-part orders QuaRot-style rotations need for common LLM widths (172 is refused: see ``_BASE``)."""


class HadamardError(ValueError):
    """No Hadamard construction is known for a dimension."""


# ---- finite fields GF(p^k) --------------------------------------------------------------------

def _prime_power(q: int) -> tuple[int, int] | None:
    """(p, k) with q = p^k, or None."""
    if q < 2:
        return None
    p = next(d for d in range(2, q + 1) if q % d == 0)
    k, r = 0, q
    while r % p == 0:
        r //= p
        k += 1
    return (p, k) if r == 1 else None


class _GF:
    """GF(p^k) with elements 0..q-1 as base-p digit vectors (polynomials mod an irreducible of degree k)."""

    def __init__(self, p: int, k: int) -> None:
        self.p, self.k, self.q = p, k, p ** k
        self.modulus = self._irreducible() if k > 1 else None
        nonzero = range(1, self.q)
        self.squares = {self.mul(x, x) for x in nonzero}

    def _digits(self, x: int) -> list[int]:
        return [(x // self.p ** i) % self.p for i in range(self.k)]

    def _num(self, d: list[int]) -> int:
        return sum(c * self.p ** i for i, c in enumerate(d))

    def _irreducible(self) -> list[int]:
        """A monic polynomial of degree k with no factor of degree <= k/2 (brute force: q is small)."""
        p, k = self.p, self.k
        for tail in itertools.product(range(p), repeat=k):
            f = list(tail) + [1]
            if f[0] == 0:
                continue
            if all(any(self._polymod(f, g))
                   for d in range(1, k // 2 + 1)
                   for g in (list(t) + [1] for t in itertools.product(range(p), repeat=d))):
                return f
        raise HadamardError(f"no irreducible polynomial of degree {k} over GF({p})")  # pragma: no cover

    def _polymod(self, a: list[int], f: list[int]) -> list[int]:
        """a mod f (f monic), as deg f coefficients, low first."""
        a = [c % self.p for c in a]
        n = len(f) - 1
        for i in range(len(a) - 1, n - 1, -1):
            c = a[i]
            if c:
                for j in range(n + 1):
                    a[i - n + j] = (a[i - n + j] - c * f[j]) % self.p
        return a[:n] + [0] * max(0, n - len(a))

    def sub(self, a: int, b: int) -> int:
        da, db = self._digits(a), self._digits(b)
        return self._num([(x - y) % self.p for x, y in zip(da, db)])

    def mul(self, a: int, b: int) -> int:
        if self.k == 1:
            return a * b % self.p
        da, db = self._digits(a), self._digits(b)
        prod = [0] * (2 * self.k - 1)
        for i, x in enumerate(da):
            for j, y in enumerate(db):
                prod[i + j] += x * y
        return self._num(self._polymod(prod, self.modulus))

    def chi(self) -> torch.Tensor:
        """The quadratic character matrix Q[i, j] = χ(a_i - a_j) (0 on the diagonal), as int64."""
        q = self.q
        sign = torch.tensor([0] + [1 if x in self.squares else -1 for x in range(1, q)], dtype=torch.int64)
        diff = torch.tensor([[self.sub(i, j) for j in range(q)] for i in range(q)], dtype=torch.int64)
        return sign[diff]


# ---- constructions ----------------------------------------------------------------------------

def sylvester(n: int) -> torch.Tensor:
    """H of order n = 2^k by doubling."""
    if n < 1 or n & (n - 1):
        raise HadamardError(f"Sylvester's construction needs a power of two, got {n}")
    h = torch.ones(1, 1, dtype=torch.int64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def paley1(q: int) -> torch.Tensor:
    """Paley's first construction, order q + 1 for a prime power q ≡ 3 (mod 4)."""
    pk = _prime_power(q)
    if pk is None or q % 4 != 3:
        raise HadamardError(f"Paley I needs a prime power q ≡ 3 (mod 4), got q={q} (order {q + 1})")
    qm = _GF(*pk).chi()
    s = torch.zeros(q + 1, q + 1, dtype=torch.int64)
    s[0, 1:], s[1:, 0], s[1:, 1:] = 1, -1, qm
    return s + torch.eye(q + 1, dtype=torch.int64)


def paley2(q: int) -> torch.Tensor:
    """Paley's second construction, order 2(q + 1) for a prime power q ≡ 1 (mod 4)."""
    pk = _prime_power(q)
    if pk is None or q % 4 != 1:
        raise HadamardError(f"Paley II needs a prime power q ≡ 1 (mod 4), got q={q} (order {2 * (q + 1)})")
    c = torch.zeros(q + 1, q + 1, dtype=torch.int64)
    c[0, 1:], c[1:, 0], c[1:, 1:] = 1, 1, _GF(*pk).chi()
    a = torch.tensor([[1, 1], [1, -1]])
    b = torch.tensor([[1, -1], [-1, -1]])
    return torch.kron(c, a) + torch.kron(torch.eye(q + 1, dtype=torch.int64), b)


def _circulant(row: torch.Tensor) -> torch.Tensor:
    n = row.numel()
    idx = (torch.arange(n)[None, :] - torch.arange(n)[:, None]) % n
    return row[idx]


def williamson(w: int, max_order: int = 25) -> tuple[torch.Tensor, ...]:
    """Williamson matrices of odd order w: symmetric ±1 circulants A, B, C, D with A²+B²+C²+D² = 4w·I.

    Meet in the middle over first rows (first entry +1, symmetric): the periodic autocorrelations of (A, B)
    must cancel those of (C, D) off zero. 2^((w-1)/2) rows each, so only small w (<= ``max_order``).
    """
    if w % 2 == 0 or w > max_order:
        raise HadamardError(f"Williamson search supports odd orders <= {max_order}, got {w}")
    half = (w - 1) // 2
    rows = []
    for signs in itertools.product((1, -1), repeat=half):
        r = [1] + list(signs) + list(reversed(signs))
        rows.append(torch.tensor(r, dtype=torch.int64))
    acf = [tuple(int((r * torch.roll(r, s)).sum()) for s in range(1, half + 1)) for r in rows]
    pairs: dict[tuple[int, ...], tuple[int, int]] = {}
    for i, j in itertools.combinations_with_replacement(range(len(rows)), 2):
        pairs.setdefault(tuple(a + b for a, b in zip(acf[i], acf[j])), (i, j))
    for key, (i, j) in pairs.items():
        other = pairs.get(tuple(-v for v in key))
        if other is not None:
            return tuple(_circulant(rows[t]) for t in (i, j, *other))
    raise HadamardError(f"no Williamson matrices of order {w} found")  # pragma: no cover


def goethals_seidel(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """The Goethals–Seidel array: four ±1 circulants with AAᵀ+BBᵀ+CCᵀ+DDᵀ = 4n·I give H of order 4n."""
    n = a.shape[0]
    r = torch.flip(torch.eye(n, dtype=torch.int64), [1])
    t = lambda m: m.T  # noqa: E731 - reads like the array
    return torch.cat([
        torch.cat([a, b @ r, c @ r, d @ r], 1),
        torch.cat([-b @ r, a, t(d) @ r, -t(c) @ r], 1),
        torch.cat([-c @ r, -t(d) @ r, a, t(b) @ r], 1),
        torch.cat([-d @ r, t(c) @ r, -t(b) @ r, a], 1),
    ], 0)


def t3_williamson(w: int) -> torch.Tensor:
    """Order 12·w: T-matrices of order 3 (I, P, P², 0) times Williamson matrices of order w, through the
    Goethals–Seidel array. The four products are circulants over Z_3 × Z_w ≅ Z_3w (w coprime to 3),
    permuted to plain circulants by the Chinese remainder map."""
    if w % 3 == 0:
        raise HadamardError(f"T-matrices of order 3 need a Williamson order coprime to 3, got {w}")
    wa, wb, wc, wd = williamson(w)
    eye = torch.eye(3, dtype=torch.int64)
    p = torch.roll(eye, 1, 1)
    x = (eye, p, p @ p, torch.zeros_like(eye))
    # the left-regular quaternion pattern: its columns are orthogonal for commuting entries
    ws = ((wa, wb, wc, wd), (-wb, wa, -wd, wc), (-wc, wd, wa, -wb), (-wd, -wc, wb, wa))
    ys = [sum(torch.kron(xi, wi) for xi, wi in zip(x, row)) for row in ws]
    n = 3 * w
    # index i of Z_3w <-> (i mod 3, i mod w) of Z_3 × Z_w (kron index = 3-part * w + w-part)
    perm = torch.tensor([(i % 3) * w + (i % w) for i in range(n)])
    circ = [y[perm][:, perm] for y in ys]
    return goethals_seidel(*circ)


def _base(m: int) -> torch.Tensor | None:
    """A Hadamard matrix of order m from a direct construction, or None (powers of two excluded)."""
    if m in (1, 2):
        return sylvester(m)
    if m % 4:
        return None
    if _prime_power(m - 1) and (m - 1) % 4 == 3:
        return paley1(m - 1)
    if m % 8 == 4 and _prime_power(m // 2 - 1) and (m // 2 - 1) % 4 == 1:
        return paley2(m // 2 - 1)
    if m % 12 == 0 and (m // 12) % 2 == 1 and (m // 12) % 3 and m // 12 <= 25:
        return t3_williamson(m // 12)
    if m % 2 == 0 and m // 2 > 2 and _base(m // 2) is not None:
        return torch.kron(sylvester(2), _base(m // 2))
    return None


def hadamard_order_split(n: int) -> tuple[int, int]:
    """(m, 2^k) with n = m·2^k and m the smallest order with a construction (m = 1 for powers of two)."""
    if n < 1:
        raise HadamardError(f"dimension {n}: a Hadamard matrix needs n >= 1")
    odd, k = n, 0
    while odd % 2 == 0:
        odd //= 2
        k += 1
    for j in range(k + 1):
        m = odd * 2 ** j
        if _constructible(m):
            return m, n // m
    raise HadamardError(
        f"no Hadamard construction known for dimension {n} = {odd}·2^{k}: none of the orders "
        f"{', '.join(str(odd * 2 ** j) for j in range(k + 1))} is a power of two, Paley I (q+1, q ≡ 3 mod 4 "
        f"prime power), Paley II (2(q+1), q ≡ 1 mod 4), or 12·w (T-matrices × Williamson, odd w <= 25)"
    )


@functools.lru_cache(maxsize=None)
def _constructible(m: int) -> bool:
    if m & (m - 1) == 0:
        return True
    if m % 4:
        return False
    if _prime_power(m - 1) and (m - 1) % 4 == 3:
        return True
    if m % 8 == 4 and _prime_power(m // 2 - 1) and (m // 2 - 1) % 4 == 1:
        return True
    if m % 12 == 0 and (m // 12) % 2 == 1 and (m // 12) % 3 and m // 12 <= 25:
        return True
    return m % 2 == 0 and m // 2 > 2 and _constructible(m // 2)


@functools.lru_cache(maxsize=32)
def _hadamard_int(n: int) -> torch.Tensor:
    with torch.inference_mode(False):  # cached: never an inference tensor (see lowbit.ir.ops._hadamard_const)
        m, p2 = hadamard_order_split(n)
        hm = sylvester(m) if m & (m - 1) == 0 else _base(m)
        assert hm is not None
        return torch.kron(hm, sylvester(p2)) if p2 > 1 else hm


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The ±1 Hadamard matrix lowbit uses for dimension n (H·Hᵀ = n·I), deterministic."""
    return _hadamard_int(n).to(dtype)


def hadamard(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The orthogonal matrix H/sqrt(n)."""
    return (hadamard_matrix(n, torch.float64) / math.sqrt(n)).to(dtype)


def random_hadamard(n: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The randomised Hadamard rotation H·diag(±1)/sqrt(n) (QuaRot), signs from ``seed``: orthogonal."""
    gen = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (n,), generator=gen, dtype=torch.int64) * 2 - 1
    return (hadamard(n, torch.float64) * signs.to(torch.float64)[None, :]).to(dtype)
