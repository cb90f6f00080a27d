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
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

__all__ = [
    "HadamardError",
    "HadamardRotation",
    "hadamard",
    "hadamard_factors",
    "hadamard_matrix",
    "hadamard_order_split",
    "kron_rows",
    "paley1",
    "paley2",
    "random_hadamard",
    "random_signs",
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
        # a_i - a_j digit by digit for every pair at once (q² ``sub`` calls took 3 s for GF(343), LLaMA's 11008)
        digits = torch.tensor([self._digits(x) for x in range(q)], dtype=torch.int64)
        place = self.p ** torch.arange(self.k, dtype=torch.int64)
        diff = ((digits[:, None, :] - digits[None, :, :]) % self.p * place).sum(-1)
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


@functools.lru_cache(maxsize=32)
def _base(m: int) -> torch.Tensor | None:
    """A Hadamard matrix of order m from a direct construction, or None (powers of two excluded). Cached (callers
    copy it: ``.to``, ``kron``): ``hadamard_factors`` and ``_hadamard_int`` built the same order again for each
    dimension that shares its odd part."""
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
    half = _base(m // 2) if m % 2 == 0 and m // 2 > 2 else None  # built once, not once to test and again to use
    return torch.kron(sylvester(2), half) if half is not None else None


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
    """H_n as int8 (±1): an eighth of int64's memory for the cached copy (121 MB at 11008, not 970 MB), and its
    Kronecker product 6x faster."""
    with torch.inference_mode(False):  # cached: never an inference tensor (see lowbit.ir.ops._hadamard_const)
        m, p2 = hadamard_order_split(n)
        hm = sylvester(m) if m & (m - 1) == 0 else _base(m)
        assert hm is not None
        hm = hm.to(torch.int8)
        return torch.kron(hm, sylvester(p2).to(torch.int8)) if p2 > 1 else hm


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The ±1 Hadamard matrix lowbit uses for dimension n (H·Hᵀ = n·I), deterministic."""
    return _hadamard_int(n).to(dtype)


def hadamard(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The orthogonal matrix H/sqrt(n)."""
    return (hadamard_matrix(n, torch.float64) / math.sqrt(n)).to(dtype)


def random_signs(n: int, seed: int) -> torch.Tensor:
    """The ±1 float64 column signs of ``random_hadamard(n, seed)``."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 2, (n,), generator=gen, dtype=torch.int64) * 2 - 1).to(torch.float64)


def random_hadamard(n: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The randomised Hadamard rotation H·diag(±1)/sqrt(n) (QuaRot), signs from ``seed``: orthogonal."""
    return (hadamard(n, torch.float64) * random_signs(n, seed)[None, :]).to(dtype)


FACTOR_MOST = 64
"""The largest Sylvester factor ``hadamard_factors`` splits ``H_{2^k}`` into: a product with an ``f×f`` factor costs
``f`` multiply-adds an element, so several small ones beat one large one, down to where each matmul is too small
for BLAS to run well (16-64 measured alike on SmolLM2's 576 and 1536)."""


@functools.lru_cache(maxsize=32)
def hadamard_factors(n: int) -> tuple[torch.Tensor, ...]:
    """±1 float64 matrices whose Kronecker product is ``hadamard_matrix(n)``: the odd part's ``H_m`` (unless
    m = 1), then ``H_{2^k}`` as Sylvester factors of at most ``FACTOR_MOST`` (Sylvester's ``H_a ⊗ H_b`` is
    ``H_ab``). ``kron_rows`` multiplies by them one at a time: ``n·Σf`` multiply-adds a row instead of ``n²``
    (576 = 36·16: 11x fewer; 4096 = 64·64: 32x)."""
    with torch.inference_mode(False):  # cached: never an inference tensor (as _hadamard_int)
        m, p2 = hadamard_order_split(n)
        factors = [] if m == 1 else [(sylvester(m) if m & (m - 1) == 0 else _base(m)).to(torch.float64)]
        while p2 > 1:
            f = min(p2, FACTOR_MOST)
            factors.append(sylvester(f).to(torch.float64))
            p2 //= f
        return tuple(factors) or (torch.ones(1, 1, dtype=torch.float64),)


def kron_rows(x: torch.Tensor, factors: Sequence[torch.Tensor]) -> torch.Tensor:
    """``x @ (A_1 ⊗ ... ⊗ A_t)`` along the last axis without forming the product: each row, read as a tensor of
    shape ``(f_1, ..., f_t)``, is multiplied by one factor along its leading axis, which then moves to the end,
    so after ``t`` steps the axes are back in order (in ``x``'s dtype; the factors are cast to it)."""
    n = x.shape[-1]
    lead = x.shape[:-1]
    rows = x.reshape(-1, n)
    r = rows.shape[0]
    for a in factors:
        f = a.shape[0]
        rows = (rows.reshape(r, f, n // f).transpose(1, 2).reshape(-1, f) @ a.to(x.dtype)).reshape(r, n)
    return rows.reshape(*lead, n)


BLOCK_BYTES = 2**19
"""``HadamardRotation.rows`` works on this many float64 bytes of rows at a time: each factor's product reads and
writes the rows again, and a block that stays in the CPU's L2 cache took SmolLM2's embedding in half the time of
whole 32 MiB pieces (on 2 shared cores, where memory bandwidth, not arithmetic, bounds the products)."""


@dataclass(frozen=True)
class HadamardRotation:
    """The orthogonal ``Q = H_n·diag(signs)/sqrt(n)`` (``signs`` None: all +1, ``hadamard(n)``; else
    ``random_hadamard``'s) kept in factored form, so that folding it into a weight costs ``n·Σf`` multiply-adds a
    row (``hadamard_factors``) instead of the dense ``n²``: rotate folded SmolLM2's 49152×576 embedding and every
    linear through dense float64 products. The same float64 product up to rounding (1e-15 relative)."""

    n: int
    signs: torch.Tensor | None = None

    @classmethod
    def randomised(cls, n: int, seed: int) -> HadamardRotation:
        """``random_hadamard(n, seed)`` in factored form."""
        hadamard_order_split(n)  # raises HadamardError naming n before any sign is drawn
        return cls(n, random_signs(n, seed))

    def matrix(self) -> torch.Tensor:
        """``Q`` as a dense float64 matrix (the bits ``hadamard`` / ``random_hadamard`` give)."""
        h = hadamard(self.n, torch.float64)
        return h if self.signs is None else h * self.signs[None, :]

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ Q`` along the last axis, in float64 (``x`` is cast), ``BLOCK_BYTES`` of rows at a time: each block's
        small products run on one intra-op thread, the blocks spread over torch's threads (split inside each small
        product, 2 threads took 4x one thread's time on a loaded 2-core machine: as ``gptq.single_thread``)."""
        factors, root = hadamard_factors(self.n), math.sqrt(self.n)
        flat = x.reshape(-1, self.n)
        out = torch.empty(flat.shape, dtype=torch.float64)
        step = max(1, BLOCK_BYTES // (8 * self.n))

        def rotate_block(start: int) -> None:
            # divided, not multiplied by a rounded 1/sqrt(n): the ±1 sums of a bf16 or float32 weight are exact in
            # float64, so where sqrt(n) is (576 = 24², 4096) each entry is the exact product rounded once
            block = kron_rows(flat[start:start + step].to(torch.float64), factors).div_(root)
            out[start:start + step] = block if self.signs is None else block.mul_(self.signs)

        starts = range(0, flat.shape[0], step)
        threads = torch.get_num_threads()
        if threads == 1 or len(starts) == 1:
            for start in starts:
                rotate_block(start)
            return out.reshape(x.shape)
        torch.set_num_threads(1)
        try:
            with ThreadPoolExecutor(min(threads, len(starts))) as pool:
                list(pool.map(rotate_block, starts))  # list: re-raises a block's error here
        finally:
            torch.set_num_threads(threads)
        return out.reshape(x.shape)
