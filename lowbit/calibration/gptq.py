"""GPTQ: quantize a weight column by column, pushing each column's rounding error onto the columns not yet done.

For a linear ``y = x·Wᵀ`` whose inputs ``x`` were seen during calibration, GPTQ (Frantar et al., 2022; the
OBQ update of Frantar & Alistarh) minimises ``‖X·Wᵀ − X·Qᵀ‖²`` row by row with the Hessian ``H = 2/n·XᵀX``:
after column ``j`` is rounded, the remaining columns move by ``−err_j · H⁻¹[j, j+1:] / H⁻¹[j, j]`` so
that the layer's output error, not the weight error, is what the rounding leaves behind. The rows of ``W``
are independent given ``H``, so linears that read the same input (q/k/v, gate/up) are quantized in one call
on their concatenated rows.

What this file implements, and why:

* **Cholesky form** of ``H⁻¹`` (its upper factor), computed in float64 after damping (``damp``·mean diag
  added to the diagonal; raised ×10 when the factorisation fails) — the numerically stable formulation of
  the GPTQ paper.
* **Lazy batch updates**: columns are processed in blocks of ``block_size``; inside a block the updates are
  rank-1 on the block only, and the rest of the matrix gets one matrix product per block. This turns the
  O(K) sequential steps into cheap vector work plus K/B GEMMs.
* **act-order**: columns in order of decreasing ``diag(H)`` (the inputs with the most energy first, while
  there are still many columns left to absorb their error).
* **Static groups**: with act-order and groups, each group's scale/zero point comes from the *original*
  weights of that contiguous group, so the QDQ layout stays block-wise along K (``axis=1, block_size=g``)
  and no permutation index has to be stored. Without act-order, a group's qparams come from the weights as
  updated when GPTQ reaches the group (the usual, slightly better choice).
* **Dead inputs** (``diag(H) = 0``: the channel was zero on every calibration token) get ``H[j, j] = 1``: the
  column is then plain round-to-nearest and receives no error from the others. Its weights are kept, not
  zeroed, so an input that does fire at run time still sees a sensible weight.

Rounding is exactly the QDQ contract (``lowbit.ir.quant``): ``q = clamp(round_half_even(w/s) + zp)``,
``w' = (q − zp)·s``, with qparams from ``qparams_from_range`` — so ``dequantize(pack(qdata))`` reproduces the
returned weight bit for bit.

**FP8** (``fp8e4m3``, ``fp8e5m2``) is the same algorithm on a non-uniform grid: a column rounds as the
``quantize`` op rounds fp8, ``q = cast(clamp(w/s, ±qmax))`` (round-to-nearest-even onto the format's values),
``w' = q·s``. fp8 is symmetric only (ONNX fp8 zero points are 0), with the min-max scale ``amax/qmax`` that the
``quantize`` pass's observer gives — so ``dequantize(qdata)`` (fp8 codes, unpacked) reproduces the weight too.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch

from lowbit.ir.quant import QDType, get_qdtype, qparams_from_range

__all__ = ["HessianAccumulator", "GPTQResult", "gptq_quantize", "rtn_quantize", "weight_qparams",
           "quantize_with", "fake_quantize", "single_thread", "qdtype_of", "output_error", "check_weight_hessian"]


def check_weight_hessian(w: torch.Tensor, h: torch.Tensor, what: str) -> tuple[int, int]:
    """``(N, K)`` of a linear's ``[out, in]`` weight whose input Hessian ``h`` is ``[K, K]``; a ``ValueError`` naming
    ``what`` (GPTQ, SparseGPT, the learned mask) otherwise."""
    if w.dim() != 2:
        raise ValueError(f"{what}: weight must be 2-d [out, in], got shape {tuple(w.shape)}")
    n, k = w.shape
    if h.shape != (k, k):
        raise ValueError(f"{what}: Hessian shape {tuple(h.shape)} does not match the weight's input size {k}")
    return n, k


@contextmanager
def single_thread() -> Iterator[None]:
    """Run torch ops on one intra-op thread inside the block.

    GPTQ's column loop and the AWQ grid are thousands of small ops (a column of a few thousand floats). Splitting
    each across threads gains nothing, and on a shared CPU every parallel region waits for a descheduled worker:
    measured on this 2-core machine under load, GPTQ of a [3072, 576] weight took 6.8 s with 2 threads and 0.3 s
    with one.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def qdtype_of(bits: int | str, symmetric: bool) -> QDType:
    """``4`` → int4 (both symmetric and asymmetric: the zero point lives in int4's range); a name is taken as is."""
    if isinstance(bits, str):
        return get_qdtype(bits)
    if bits not in (2, 3, 4, 8):
        raise ValueError(f"bits={bits}: integer weights are 8, 4, 3 or 2 bits (or give a qdtype name)")
    return get_qdtype(f"int{bits}")


class HessianAccumulator:
    """Running ``H = 2/n · Σ xᵀx`` over every row of every batch of a linear's input, plus ``mean|x|`` and
    ``max|x|`` per channel (AWQ's and SmoothQuant's statistics: one pass over the data serves all three).

    Each batch's product is one float32 GEMM (the cost that matters: 65,536 tokens × K² per linear input),
    taken in row chunks so float32 partial sums stay short, and added into a float64 sum, so the result
    does not drift with the number of batches. Linears that read the same value share one accumulator.
    The sums live on ``device`` (the inputs' device when calibrating on a GPU; default CPU).
    """

    def __init__(self, features: int, chunk_rows: int | None = None, device: torch.device | str | None = None,
                 second_moment: bool = True) -> None:
        """``second_moment=False`` keeps only the per-channel statistics: plain RTN starts (block tuning without
        AWQ) never read ``XᵀX``, and its GEMM is the dominant cost of a calibration pass on a CPU.

        ``chunk_rows`` (default: 16384 rows, fewer where that would pass 64 MiB of float32) bounds the float32 copy of
        the input that ``add`` makes: a single-pass GPTQ hands it every calibration token of a linear's input at once
        (at 64 sequences of 512 a down_proj input of 11008 channels is 1.4 GiB in float32)."""
        if features < 1:
            raise ValueError(f"HessianAccumulator: features must be positive, got {features}")
        self.features = features
        self.chunk_rows = chunk_rows if chunk_rows is not None else min(16384, max(256, (64 << 20) // (4 * features)))
        self.second_moment = second_moment
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        k2 = features if second_moment else 0
        self.sum = torch.zeros(k2, k2, dtype=torch.float64, device=self.device)
        self.abs_sum = torch.zeros(features, dtype=torch.float64, device=self.device)
        self.abs_max = torch.zeros(features, device=self.device)
        self.rows = 0

    def add(self, x: torch.Tensor) -> None:
        """Add the rows of ``x`` (``[..., K]``; every leading dim is a token)."""
        if x.shape[-1] != self.features:
            raise ValueError(f"HessianAccumulator: input has {x.shape[-1]} features, expected {self.features}")
        x2 = x.detach().reshape(-1, self.features)
        if not x2.shape[0]:
            return
        half = self.features // 2
        for part in x2.split(self.chunk_rows):  # float32 copies a chunk at a time, never the whole input
            chunk = part.to(device=self.device, dtype=torch.float32)
            if self.second_moment:
                # Symmetric: the two diagonal blocks and one off-diagonal block, 3/4 of the full product's work
                # (the one GEMM that matters for GPTQ's cost; 30% faster measured at K = 1536).
                a, b = chunk[:, :half], chunk[:, half:]
                self.sum[:half, :half] += torch.mm(a.t(), a).double()
                off = torch.mm(a.t(), b).double()
                self.sum[:half, half:] += off
                self.sum[half:, :half] += off.t()
                del off
                self.sum[half:, half:] += torch.mm(b.t(), b).double()
            mag = chunk.abs()  # not in place: ``chunk`` is the caller's own tensor when it was float32 already
            self.abs_sum += mag.sum(0).double()
            self.abs_max = torch.maximum(self.abs_max, mag.amax(0))
        self.rows += x2.shape[0]

    def _need_rows(self) -> None:
        if self.rows == 0:
            raise ValueError("HessianAccumulator: no inputs were added (empty calibration set?)")

    def _need_second_moment(self) -> None:
        self._need_rows()
        if not self.second_moment:
            raise ValueError("HessianAccumulator: built with second_moment=False (or its Hessian was taken already), "
                             "so it has no XᵀX")

    @property
    def hessian(self) -> torch.Tensor:
        """``2/n · XᵀX`` in float64 (GPTQ only needs it up to scale; the 2/n matches the paper's loss)."""
        self._need_second_moment()
        return self.sum * (2.0 / self.rows)

    def take_hessian(self) -> torch.Tensor:
        """``hessian``, scaled in place and handed over: the accumulator keeps no ``XᵀX`` after this (reading
        ``hessian`` or ``sum`` again is an error), so the caller holds the only ``K × K`` float64 copy and may let
        GPTQ spend it (``gptq_quantize(..., consume_h=True)``)."""
        self._need_second_moment()
        out = self.sum.mul_(2.0 / self.rows)
        self.sum = torch.empty(0, dtype=torch.float64, device=self.device)
        self.second_moment = False
        return out

    @property
    def abs_mean(self) -> torch.Tensor:
        """Mean ``|x|`` per input channel (float64)."""
        self._need_rows()
        return self.abs_sum / self.rows


class GPTQResult(NamedTuple):
    """``weight`` is the dequantized result; ``qdata`` the codes, unpacked, in the qdtype's container (integers,
    or fp8 values for a float qdtype)."""

    weight: torch.Tensor
    qdata: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor | None
    stats: dict[str, Any]
    unrounded: torch.Tensor | None = None
    """GPTQ: each weight as it was just before being rounded (the error-compensated value, ``[N, K]``), so that
    ``round(unrounded / scale) + zero_point`` are the codes; block tuning starts from it."""


def _check_group(k: int, group_size: int | None) -> None:
    if group_size is not None and (group_size < 1 or k % group_size):
        raise ValueError(f"group_size={group_size} does not divide the input size {k} of the weight")


def _check_float_symmetric(qd: QDType, symmetric: bool, what: str) -> None:
    """fp8 has no zero point (ONNX fp8 zero points are 0): an asymmetric fp8 request is a caller's mistake."""
    if qd.is_float and not symmetric:
        raise ValueError(f"{what}: {qd.name} is a float format with no zero point (symmetric only): pass "
                         "symmetric=True")


def _round_codes(y: torch.Tensor, qd: QDType) -> torch.Tensor:
    """``y = w/s`` (plus nothing: no zero point) onto the fp8 grid, as the ``quantize`` op does: clamp, then cast.

    Only for float qdtypes; the result is in the fp8 container. Clamping first matters: e4m3fn has no inf, and
    a cast of an out-of-range value gives NaN.
    """
    return y.clamp(qd.qmin, qd.qmax).to(qd.container)


def weight_qparams(w: torch.Tensor, qd: QDType, symmetric: bool, group_size: int | None,
                   shrink: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Min-max qparams of ``w [N, K]`` in the QDQ layout: ``[N]`` per channel, ``[N, K/g]`` per group.

    ``shrink`` (same shape as the scale) multiplies each group's range: a clipping factor from a search.
    fp8 qdtypes need ``symmetric`` (their zero point is None).
    """
    n, k = w.shape
    _check_group(k, group_size)
    _check_float_symmetric(qd, symmetric, "weight_qparams")
    g = group_size or k
    rows = w.float().reshape(n, k // g, g)
    lo, hi = rows.amin(-1), rows.amax(-1)
    if shrink is not None:
        lo, hi = lo * shrink.reshape(lo.shape), hi * shrink.reshape(hi.shape)
    scale, zp = qparams_from_range(lo, hi, qd, symmetric)
    if group_size is None:
        return scale.reshape(n), None if zp is None else zp.reshape(n)
    return scale, zp


def _no_float_zero_point(qd: QDType, zp: torch.Tensor | None) -> None:
    if zp is not None:
        raise ValueError(f"{qd.name} takes no zero point (fp8 is symmetric only): pass zero point None")


def _expand_cols(t: torch.Tensor, n: int, k: int, group_size: int | None) -> torch.Tensor:
    """A per-channel ``[N]`` or per-group ``[N, K/g]`` qparam as ``[N, K]`` (one value per weight)."""
    if group_size is None:
        return t.reshape(n, 1).expand(n, k)
    return t.repeat_interleave(group_size, dim=1)


def quantize_with(w: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor | None, qd: QDType,
                  group_size: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes in the qdtype's container, dequantized float32) of ``w [N, K]``: the ``quantize`` op's arithmetic.

    fp8 codes are the clamped cast of ``w/s`` (float8 container, unpacked), dequantized as ``q·s``."""
    n, k = w.shape
    s = _expand_cols(scale.float(), n, k, group_size)
    if qd.is_float:
        _no_float_zero_point(qd, zp)
        q8 = _round_codes(w.float() / s, qd)
        return q8, q8.float() * s
    q = torch.round(w.float() / s)
    if zp is not None:
        z = _expand_cols(zp.float(), n, k, group_size)
        q = (q + z).clamp(qd.qmin, qd.qmax)
        return q.to(qd.container), (q - z) * s
    q = q.clamp(qd.qmin, qd.qmax)
    return q.to(qd.container), q * s


def fake_quantize(w: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor | None, qd: QDType,
                  group_size: int | None) -> torch.Tensor:
    """Only the dequantized float32 weights of ``quantize_with`` (searches need no codes)."""
    n, k = w.shape
    s = _expand_cols(scale.float(), n, k, group_size)
    if qd.is_float:
        _no_float_zero_point(qd, zp)
        return _round_codes(w.float() / s, qd).float().mul_(s)
    q = torch.round(w.float() / s)
    if zp is not None:
        z = _expand_cols(zp.float(), n, k, group_size)
        return (q + z).clamp_(qd.qmin, qd.qmax).sub_(z).mul_(s)
    return q.clamp_(qd.qmin, qd.qmax).mul_(s)


def rtn_quantize(w: torch.Tensor, bits: int | str, group_size: int | None, symmetric: bool,
                 shrink: torch.Tensor | None = None) -> GPTQResult:
    """Round-to-nearest with min-max (optionally shrunk) qparams: the baseline GPTQ and AWQ are measured against."""
    qd = qdtype_of(bits, symmetric)
    scale, zp = weight_qparams(w, qd, symmetric, group_size, shrink)
    q, deq = quantize_with(w, scale, zp, qd, group_size)
    return GPTQResult(deq.to(w.dtype), q, scale, zp, {"method": "rtn"})


def output_error(x: torch.Tensor, w: torch.Tensor, wq: torch.Tensor) -> float:
    """Mean squared error of the layer output ``x·Wᵀ`` vs ``x·Wqᵀ`` (float64 sum)."""
    x2 = x.reshape(-1, x.shape[-1]).float()
    d = x2 @ (w.float() - wq.float()).t()
    return float(d.double().pow(2).mean())


def reversed_hessian(h: torch.Tensor, order: torch.Tensor | None = None, *, consume: bool = False) -> torch.Tensor:
    """``P·H·P`` in float64: ``H``'s rows and columns in ``order`` (act-order; default the identity), then reversed —
    what ``_inverse_cholesky`` factors. Dead inputs (``H[j, j] = 0``) get 1 on the diagonal.

    ``consume=True`` hands ``h`` over: a contiguous float64 ``h`` is permuted in place and returned (columns, then
    rows, a 16 MiB band at a time), so a caller that owns its Hessian holds one ``K × K`` float64 matrix here, not
    two (at ``K = 11008``, a 7B model's down_proj, each is 0.9 GiB); any other ``h`` is gathered into a new matrix
    and released. Without it ``h`` is left as it was.
    """
    k = h.shape[0]
    idx = (order if order is not None else torch.arange(k, device=h.device)).flip(0)
    if consume and h.dtype == torch.float64 and h.is_contiguous():
        out, band = h, max(1, (16 << 20) // (8 * k))
        for r0 in range(0, k, band):  # out = H[:, idx]: each band of rows gathers its own columns
            out[r0:r0 + band] = out[r0:r0 + band, idx]
        for c0 in range(0, k, band):  # out = out[idx, :]: each band of columns gathers its own rows
            out[:, c0:c0 + band] = out[idx, c0:c0 + band]
    else:
        out = h.to(torch.float64)[idx[:, None], idx]
        if consume:
            h.set_()
    diag = out.diagonal()
    diag.masked_fill_(diag == 0, 1.0)
    return out


def _invert_lower_in_place(lower: torch.Tensor, block: int | None = None) -> None:
    """``L ← L⁻¹`` for a lower-triangular ``L`` (zeros above the diagonal), in place: blocked from the bottom
    right, ``[[D, 0], [B, C⁻¹]] → [[D⁻¹, 0], [-C⁻¹·B·D⁻¹, C⁻¹]]`` — LAPACK's ``trtri`` order, which torch does not
    expose; a triangular solve against an identity would need a second ``K × K``. The products' temporaries are
    ``2 · K × block``: the default ``K/4`` (at most 1024; wide blocks keep the GEMMs as fast as that solve) holds
    them to half a ``K × K``."""
    k = lower.shape[0]
    block = block or min(1024, max(128, k // 4))
    for j in range(((k - 1) // block) * block, -1, -block):
        e = min(j + block, k)
        diag = lower[j:e, j:e]
        eye = torch.eye(e - j, dtype=lower.dtype, device=lower.device)
        diag_inv = torch.linalg.solve_triangular(diag, eye, upper=False)
        if e < k:
            below = lower[e:, j:e]
            below.copy_(torch.mm(torch.mm(lower[e:, e:], below), diag_inv).neg_())
        diag.copy_(diag_inv)


def _inverse_cholesky(hr: torch.Tensor, damp: float) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor ``U`` of ``(H + λI)⁻¹`` in float32 and the relative damping λ/mean(diag H) used, from
    ``hr = P·H·P`` (``reversed_hessian``; float64), which this *consumes*: it is damped, factored and inverted in
    place, then released.

    Computed without forming the inverse: with ``P`` the index reversal and ``P·H·P = L·Lᵀ``,
    ``U = P·L⁻¹·P`` is upper triangular with ``UᵀU = H⁻¹`` — one Cholesky and one triangular inversion instead of
    Cholesky, inverse and a second Cholesky (4× faster at K = 1536 here, and no explicit inverse to lose
    precision in). A Hessian from few tokens or with collinear inputs can be numerically singular even after
    the usual 1%; the damping then grows tenfold until the factorisation succeeds (the stats say so).

    Memory: ``hr`` and at most half of another ``K × K`` float64 matrix. LAPACK factors the column-major view of
    ``hr`` where it lies (overwriting it), so a float32 copy of the undamped matrix is kept while factoring to
    start a retry from (its diagonal is restored exactly); ``L⁻¹`` overwrites ``L`` (``_invert_lower_in_place``);
    the float32 result is the other half.
    """
    mean_diag = float(torch.diagonal(hr).mean())
    if not math.isfinite(mean_diag) or mean_diag <= 0:
        raise ValueError(f"GPTQ: the Hessian's mean diagonal is {mean_diag}; the calibration inputs are not "
                         "finite")
    lower = hr.mT  # column-major: LAPACK writes L into hr's storage with no copy (hr is symmetric: hr.mT is hr)
    undamped, diag = hr.float(), hr.diagonal().clone()
    info = torch.empty((), dtype=torch.int32, device=hr.device)
    rel = damp
    for attempt in range(6):
        if attempt:
            hr.copy_(undamped)
            hr.diagonal().copy_(diag)
        hr.diagonal().add_(rel * mean_diag)
        torch.linalg.cholesky_ex(lower, out=(lower, info))
        if int(info) == 0:
            break
        rel *= 10
    else:
        raise ValueError(f"GPTQ: the Hessian is not positive definite even with damping {rel / 10:g}× its mean "
                         "diagonal (non-finite calibration inputs?)")
    del undamped
    _invert_lower_in_place(lower)
    u = lower.float()
    hr.set_()
    return u.flip(0, 1), rel


def gptq_quantize(
    w: torch.Tensor,
    h: torch.Tensor,
    bits: int | str = 4,
    group_size: int | None = None,
    symmetric: bool = False,
    act_order: bool = True,
    static_groups: bool = True,
    damp: float = 0.01,
    block_size: int = 128,
    qparams: tuple[torch.Tensor, torch.Tensor | None] | None = None,
    zero_mask: torch.Tensor | None = None,
    *,
    consume_h: bool = False,
    unrounded: bool = True,
) -> GPTQResult:
    """GPTQ-quantize ``w [N, K]`` given the Hessian ``h [K, K]`` of its input.

    ``bits`` is 8/4/3/2 (int qdtypes) or a qdtype name (``fp8e4m3``/``fp8e5m2`` too, with ``symmetric=True``:
    codes are then fp8 values, rounded as the ``quantize`` op casts); ``group_size`` None means one scale per output
    channel. ``qparams`` (scale, zero point in the QDQ layout) fixes the grid instead of min-max — e.g. the
    clipping AWQ or an MSE observer found; GPTQ then only chooses the codes.

    ``zero_mask`` (bool ``[N, K]``, a pruned weight's zeros) forces those weights to the code of 0 (the zero point,
    or 0) however the error feedback moved them, and spreads that error like any other: sparsity kept through
    quantization, as SparseGPT's joint prune-and-quantize does.

    Returns ``GPTQResult(weight, qdata, scale, zero_point, stats)``; ``stats`` has the GPTQ loss
    ``½ Σ err²/H⁻¹_jj`` (what the algorithm minimises; it equals ``½ ΔW·(H + λI)·ΔWᵀ`` of the returned weight), the
    damping used, dead columns and seconds.
    Everything is computed on ``h``'s device (``w`` and ``qparams`` are moved there) and returned there.

    Memory (it bounds what calibrating a large model needs): ``consume_h=True`` hands ``h`` over (it is permuted,
    factored and inverted in place, then left empty), so the factorisation holds ``h`` and at most half another
    ``K × K`` float64 matrix (a float32 copy while factoring, then the float32 result); the weight side
    holds ``[N, K]`` float32 work rows, the dequantized result and the codes. ``unrounded=False`` skips
    ``GPTQResult.unrounded`` (only block tuning reads it).
    """
    t0 = time.perf_counter()
    n, k = check_weight_hessian(w, h, "GPTQ")
    _check_group(k, group_size)
    if block_size < 1:
        raise ValueError(f"GPTQ: block_size must be positive, got {block_size}")
    if act_order and group_size is not None and not static_groups and qparams is None:
        raise ValueError("GPTQ: act_order with groups needs static_groups=True: lowbit stores contiguous groups "
                         "along K (block-wise QDQ), not a permuted group index")
    qd = qdtype_of(bits, symmetric)
    _check_float_symmetric(qd, symmetric, "GPTQ")
    if qd.is_float and qparams is not None and qparams[1] is not None:
        raise ValueError(f"GPTQ: qparams has a zero point, but {qd.name} takes none (fp8 is symmetric only)")

    dev = h.device
    diag = torch.diagonal(h).to(torch.float64)
    dead = diag == 0
    # act-order ranks dead columns as if their diagonal were 1 (what the factorisation sees)
    perm = torch.argsort(diag.masked_fill(dead, 1.0), descending=True, stable=True) if act_order else None
    hinv, rel_damp = _inverse_cholesky(reversed_hessian(h, perm, consume=consume_h), damp)
    del h

    # Grid: fixed up front (given, per channel, or static groups), or found per group as GPTQ reaches it.
    dynamic_groups = qparams is None and group_size is not None and not act_order
    if qparams is not None:
        scale, zp = (None if t is None else t.to(dev) for t in qparams)
    elif not dynamic_groups:
        scale, zp = weight_qparams(w.detach().to(dev), qd, symmetric, group_size)
    else:
        g = group_size
        assert g is not None
        scale = torch.empty(n, k // g, device=dev)
        zp = torch.empty(n, k // g, dtype=qd.container, device=dev) if not symmetric else None

    if zero_mask is not None and tuple(zero_mask.shape) != (n, k):
        raise ValueError(f"GPTQ: zero_mask shape {tuple(zero_mask.shape)} does not match the weight's {(n, k)}")

    # Work on Wᵀ [K, N] (columns in act-order) so a column of W is a contiguous row; rows are updated in place, so
    # when a block is done its rows hold the values that were rounded (``unrounded``). fp8 codes are kept as their
    # (exact) float32 values until the end: float8 tensors support little beyond casts.
    wt_view = w.detach().to(dev).t()
    if perm is not None:
        wt = wt_view[perm]  # a gather: already a new, contiguous tensor
        wt = wt if wt.dtype == torch.float32 else wt.float()
    else:
        wt = torch.empty(k, n, device=dev)
        wt.copy_(wt_view)
    del wt_view
    zm_t = None
    if zero_mask is not None:
        zm_t = zero_mask.to(dev).t()
        zm_t = (zm_t[perm] if perm is not None else zm_t).contiguous()
    qt = torch.empty(k, n, dtype=torch.float32 if qd.is_float else qd.container, device=dev)
    deq_t = torch.empty(k, n, device=dev)
    if not dynamic_groups:  # each column's qparams: a row of the [K/g, N] (or [1, N]) transposed grid
        s_rows = scale.float().reshape(n, -1).t().contiguous()
        z_rows = zp.float().reshape(n, -1).t().contiguous() if zp is not None else None
        cols = perm.tolist() if perm is not None else range(k)
        row_of = [c // group_size for c in cols] if group_size is not None else [0] * k

    if group_size is not None and dynamic_groups:  # a group must start on a block boundary or inside one block
        block_size = max(group_size, block_size // group_size * group_size)
    qmin, qmax = float(qd.qmin), float(qd.qmax)
    loss = torch.zeros((), dtype=torch.float64, device=dev)

    with single_thread():
        for i1 in range(0, k, block_size):
            i2 = min(i1 + block_size, k)
            w1 = wt[i1:i2]
            err1 = torch.empty_like(w1)
            h1 = hinv[i1:i2, i1:i2]
            for i in range(i2 - i1):
                col = i1 + i
                if dynamic_groups and col % group_size == 0:  # type: ignore[operator]
                    gi = col // group_size  # type: ignore[operator]
                    part = w1[i:i + group_size]  # the group's columns as updated so far, [g, N]
                    s_g, z_g = qparams_from_range(part.amin(0), part.amax(0), qd, symmetric)
                    scale[:, gi] = s_g
                    if zp is not None:
                        zp[:, gi] = z_g  # type: ignore[index]
                    s_cur, z_cur = s_g, (z_g.float() if z_g is not None else None)
                elif not dynamic_groups:
                    r = row_of[col]
                    s_cur, z_cur = s_rows[r], (z_rows[r] if z_rows is not None else None)
                wcol = w1[i]
                if qd.is_float:  # the quantize op's fp8 rounding: clamp, cast (round to nearest even fp8 value)
                    q = _round_codes(wcol / s_cur, qd).float()
                    dq = q * s_cur
                elif z_cur is not None:
                    q = (torch.round(wcol / s_cur) + z_cur).clamp_(qmin, qmax)
                    dq = (q - z_cur) * s_cur
                else:
                    q = torch.round(wcol / s_cur).clamp_(qmin, qmax)
                    dq = q * s_cur
                if zm_t is not None and bool(zm_t[col].any()):
                    pruned = zm_t[col]
                    q = torch.where(pruned, z_cur if z_cur is not None and not qd.is_float else torch.zeros_like(q), q)
                    dq = torch.where(pruned, torch.zeros_like(dq), dq)
                qt[col] = q if qd.is_float else q.to(qd.container)
                deq_t[col] = dq
                e = (wcol - dq) / h1[i, i]
                if i + 1 < i2 - i1:
                    w1[i + 1:].addmm_(h1[i, i + 1:, None], e[None, :], alpha=-1.0)
                err1[i] = e
            loss += err1.double().pow(2).sum() / 2  # err = (w - q) / U_jj, so err² = (w - q)² / H⁻¹_jj
            if i2 < k:
                wt[i2:].addmm_(hinv[i1:i2, i2:].t(), err1, alpha=-1.0)
    del hinv

    def untransposed(t_kn: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``[K, N]`` rows in act-order -> ``[N, K]`` in the weight's column order, one new tensor at a time."""
        out = torch.empty(n, k, dtype=dtype, device=dev)
        if perm is None:
            out.copy_(t_kn.t())
        else:
            out[:, perm] = t_kn.t().to(dtype)
        return out

    weight = untransposed(deq_t, w.dtype)
    del deq_t
    codes = untransposed(qt, qd.container)
    del qt
    pre = untransposed(wt, torch.float32) if unrounded else None
    del wt
    stats = {
        "method": "gptq",
        "loss": float(loss),
        "damp": rel_damp,
        "dead_columns": int(dead.sum()),
        "act_order": act_order,
        "seconds": time.perf_counter() - t0,
    }
    return GPTQResult(weight, codes, scale, zp, stats, pre)
