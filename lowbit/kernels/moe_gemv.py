"""A routed MoE layer's experts in two launches that read the router's picks on the device: for a CUDA-graph decode
step, where ``nonzero`` (the eager routed path) would wait for the device, and the dense form ran every expert on
every token (8 experts x 6 launches x 8 layers: a Mixtral-shaped step bound by launches, ~2 ms at batch 1 on an
H100 where its weights are ~0.3 ms of HBM traffic, ``tools/bench_moe.py``).

- ``torch.ops.lowbit.moe_gate_up(x [T, H], picked [T, E], weight, scale, zero_point, qdtype, group_size,
  epilogue, interleaved) -> [T, E, I]``: for every (token, expert) its router picked, ``act(gate_e(x_t)) *
  up_e(x_t)``; the programs of an unpicked pair end before reading a weight (their rows of the output are left
  unwritten: ``moe_down`` never reads them). ``weight``: every expert's merged gate/up stacked, ``[E, 2I, H]``
  bf16/fp16, or int32 words ``[E, 2I, H*bits/32]`` as ``weight_only.pack_words`` lays one linear out (either word
  order, any strides), with stacked scales (and zero points), per group or per channel. ``interleaved``: the rows
  are (gate, up) pairs (``interleave_rows``: the weight-only gated epilogue's layout), else the halves (gate rows
  then up rows: ``float_linear``'s).
- ``torch.ops.lowbit.moe_down(h [T, E, I], picked, dense [T, E], weight, scale, zero_point, qdtype, group_size,
  out_dtype) -> [T, H]``: each picked expert's down projection, times its router weight, summed over the token's
  experts in expert order, with the dense form's roundings (``DenseExperts``: the down linear's output in the
  model dtype, the product in the router's dtype promotion, the cast, each add in ``out_dtype``): one program per
  (token, column block) adds the terms itself, so the sum is deterministic and needs no atomics.

Arithmetic: fp32 products accumulated per lane and summed once; a word tile's codes (``weight_only._word_tile``)
shifted out all positions at once, exact in fp32, the zero point's share ``(sum of x) z`` and the scale applied to
each position's partial sum (as the word GEMVs: no rounding of the dequantized weight). So each op differs from its
reference (``*_ref``: the same roundings over a float32 product) by float32 accumulation order only, which may move
a rounded output by one step.
Grid: one program per (token, expert, column block) and per (token, column block): small and exact first, for the
few tokens of a decode step (T <= 16); any T runs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from lowbit.kernels._common import (
    activation,
    activation_ref,
    cdiv,
    check,
    interpreting,
    launcher,
    parse_epilogue,
    round_to_bf16,
)
from lowbit.kernels.weight_only import (
    BYTE_QDTYPES,
    PACKED_QDTYPES,
    WORD_XOR,
    _word_tile,
    chunk_words,
    unpack_words,
)

__all__ = ["moe_down", "moe_down_ref", "moe_gate_up", "moe_gate_up_ref", "moe_weight_unsupported", "stack_experts"]

FLOAT_DTYPES = (torch.bfloat16, torch.float16)
_ROUND_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def _bits(qdtype: str) -> int:
    return 4 if qdtype in PACKED_QDTYPES else 8


def stack_experts(tensors: list[torch.Tensor]) -> torch.Tensor | None:
    """One ``[E, *shape]`` tensor holding every expert's, each ``stacked[e]`` with the strides of the expert's own
    (N-major words stay N-major, transposed scales transposed: the per-expert ops read the views as they read the
    originals); None where the experts' shapes, dtypes or strides differ or one is not dense in memory."""
    first = tensors[0]
    dense_layout = first.is_contiguous() or (first.dim() == 2 and first.t().is_contiguous())
    if not dense_layout or any(t.shape != first.shape or t.dtype != first.dtype or t.stride() != first.stride()
                               or t.device != first.device for t in tensors):
        return None
    out = torch.empty_strided((len(tensors), *first.shape), (first.numel(), *first.stride()), dtype=first.dtype,
                              device=first.device)
    for e, t in enumerate(tensors):
        out[e].copy_(t)
    return out


def moe_weight_unsupported(weight: torch.Tensor, scale: torch.Tensor | None, qdtype: str, group_size: int,
                           k: int) -> str | None:
    """Why the ops cannot read a stacked expert weight of input size ``k``, or None. The kernels index a float
    weight's rows at K stride 1 and a scale (zero point) tile by the weight's rows and ``k``'s groups, so a weight
    of another layout or scales of another shape are refused here: read as they were, they gave wrong outputs
    without an error."""
    if weight.dim() != 3:
        return f"stacked weight is {weight.dim()}-D, not [experts, N, K]"
    if not qdtype:
        if weight.dtype not in FLOAT_DTYPES:
            return f"float weight dtype {weight.dtype}: the kernels read bf16/fp16"
        if weight.shape[2] != k:
            return f"weight K={weight.shape[2]}, rows of K={k}"
        return None if weight.stride(2) == 1 or k == 1 else f"float weight strides {weight.stride()}: K not contiguous"
    if qdtype not in PACKED_QDTYPES and qdtype not in BYTE_QDTYPES:
        return f"qdtype {qdtype!r} has no word layout"
    bits = _bits(qdtype)
    if weight.dtype != torch.int32 or chunk_words(k, group_size, bits) == 0 or weight.shape[2] * 32 != k * bits:
        return f"{qdtype} weight not in the int32 word layout for K={k}, group {group_size}"
    if scale is None or scale.dim() not in (2, 3):
        return "no stacked scale"
    return _scale_unsupported(tuple(weight.shape[:2]), scale, group_size, k)


def _scale_unsupported(rows: tuple[int, int], scale: torch.Tensor, group_size: int, k: int) -> str | None:
    """Why stacked scales are not one per (expert, row[, group of ``k``]) of a weight with ``rows`` (experts, N)."""
    groups = k // group_size if group_size else 1
    if group_size and k % group_size:
        return f"K={k} is not a multiple of group {group_size}"
    if tuple(scale.shape[:2]) == rows and (scale.shape[2] == groups if scale.dim() == 3 else groups == 1):
        return None
    want = [*rows, groups] if group_size else list(rows)
    return f"scale {tuple(scale.shape)}, not {tuple(want)} (experts, rows{', K/group' if group_size else ''})"


@triton.jit
def _rounded(y, CODE: tl.constexpr):
    """fp32 ``y`` rounded to the dtype of ``_ROUND_CODE`` (0 float32: unchanged), still fp32: bf16 by its bits (the
    interpreter's cast truncates), fp16 by a cast there and back."""
    if CODE == 1:
        r = round_to_bf16(y)
    elif CODE == 2:
        r = y.to(tl.float16).to(tl.float32)
    else:
        r = y
    return r


@triton.jit
def _float_rows(x_ptr, w_ptr, rows, n_ok, K, swn, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """``sum_k x[k] * w[rows, k]`` in fp32 (``[BLOCK_N]``) for a row-major float weight."""
    lanes = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = k0 + lanes < K
        w = tl.load(w_ptr + rows[:, None] * swn + (k0 + lanes)[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        x = tl.load(x_ptr + k0 + lanes, mask=k_ok, other=0.0)
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
    return tl.sum(acc, axis=1)


@triton.jit
def _word_rows(x_ptr, w_ptr, s_ptr, z_ptr, rows, n_ok, NCH, swk, swn, ssn, ssg,
               BITS: tl.constexpr, SIGNED: tl.constexpr, GROUP: tl.constexpr, HAS_ZP: tl.constexpr,
               XOR: tl.constexpr, CW: tl.constexpr, BLOCK_N: tl.constexpr):
    """``sum_k x[k] * s * (q - z)`` in fp32 (``[BLOCK_N]``) for word rows ``rows``: per chunk one ``[CW, BLOCK_N]``
    word tile (``_word_tile``), all its ``32/BITS`` code positions at once (``[PER, CW, BLOCK_N]``) against the
    chunk's activations, ``x (q - z) = x q - (sum of x) z``: the zero point's share comes off each position's
    partial sum (``[PER, BLOCK_N]``, not the tile), none where z is 0 (unsigned codes without zero points); each
    position's group scale on it (per channel: once at the end)."""
    PER: tl.constexpr = 32 // BITS
    OFF: tl.constexpr = (1 << (BITS - 1)) if SIGNED else 0
    HAS_Z: tl.constexpr = SIGNED or HAS_ZP
    offs_j = tl.arange(0, CW)
    pos = tl.arange(0, PER)
    shift = (pos * BITS)[:, None, None]
    if GROUP == 0:
        s = tl.load(s_ptr + rows * ssn, mask=n_ok, other=0).to(tl.float32)
        z = _zero(z_ptr, rows[None, :] * ssn, n_ok[None, :], OFF, HAS_ZP)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for c in range(0, NCH):
        wv = _word_tile(w_ptr, c, offs_j, rows, n_ok, swk, swn, SIGNED, XOR, CW)
        q = ((wv[None, :, :] >> shift) & ((1 << BITS) - 1)).to(tl.float32)  # offset binary u = q + OFF
        x = tl.load(x_ptr + c * (PER * CW) + pos[:, None] * CW + offs_j[None, :]).to(tl.float32)
        part = tl.sum(q * x[:, :, None], axis=1)  # [PER, BLOCK_N]
        if GROUP != 0:
            at = rows[None, :] * ssn + ((c * (PER * CW) + pos * CW) // GROUP)[:, None] * ssg
            s = tl.load(s_ptr + at, mask=n_ok[None, :], other=0).to(tl.float32)
            z = _zero(z_ptr, at, n_ok[None, :], OFF, HAS_ZP)
        if HAS_Z:
            part -= tl.sum(x, axis=1)[:, None] * z
        if GROUP == 0:
            acc += tl.sum(part, axis=0)
        else:
            acc += tl.sum(s * part, axis=0)
    if GROUP == 0:
        acc = acc * s
    return acc


@triton.jit
def _zero(z_ptr, at, ok, OFF: tl.constexpr, HAS_ZP: tl.constexpr):
    """z (fp32, the shape of ``at``): the codes' offset ``OFF`` plus the zero points at ``at``, if any."""
    z = tl.zeros(at.shape, dtype=tl.float32) + OFF
    if HAS_ZP:
        z += tl.load(z_ptr + at, mask=ok, other=0).to(tl.float32)
    return z


@triton.jit
def _expert_rows(x_ptr, w_ptr, s_ptr, z_ptr, rows, n_ok, K, NCH, swk, swn, ssn, ssg,
                 WORDS: tl.constexpr, BITS: tl.constexpr, SIGNED: tl.constexpr, GROUP: tl.constexpr,
                 HAS_ZP: tl.constexpr, XOR: tl.constexpr, CW: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    if WORDS:
        y = _word_rows(x_ptr, w_ptr, s_ptr, z_ptr, rows, n_ok, NCH, swk, swn, ssn, ssg, BITS, SIGNED, GROUP, HAS_ZP,
                       XOR, CW, BLOCK_N)
    else:
        y = _float_rows(x_ptr, w_ptr, rows, n_ok, K, swn, BLOCK_N, BLOCK_K)
    return y


@triton.jit
def _moe_gate_up(x_ptr, p_ptr, w_ptr, s_ptr, z_ptr, o_ptr, E, I, K, NCH, sxt, spt, sew, swk, swn, ses, ssn, ssg,
                 sot, soe,
                 WORDS: tl.constexpr, BITS: tl.constexpr, SIGNED: tl.constexpr, GROUP: tl.constexpr,
                 HAS_ZP: tl.constexpr, XOR: tl.constexpr, CW: tl.constexpr, ACT: tl.constexpr, ROUND: tl.constexpr,
                 INTERLEAVED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Program (token t, expert e, column block): ``act(gate) * up`` for outputs ``j`` of the block; nothing where
    t did not pick e. ``INTERLEAVED``: gate row ``2j`` and up row ``2j + 1``, read as one tile of ``2 * BLOCK_N``
    contiguous rows; else gate row ``j`` and up row ``I + j``. The roundings of the weight-only ops' gated epilogue:
    gate and up to the model dtype, the activation, the product."""
    pid = tl.program_id(0)
    t = pid // E
    e = pid % E
    if tl.load(p_ptr + t * spt + e) != 0:
        offs = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        ok = offs < I
        x_row = x_ptr + t * sxt
        e64 = tl.cast(e, tl.int64)  # an expert's offset in a large stack passes 2**31 elements
        w_e = w_ptr + e64 * sew
        s_e = s_ptr + e64 * ses
        z_e = z_ptr + e64 * ses
        if INTERLEAVED:
            pairs = tl.program_id(1) * (2 * BLOCK_N) + tl.arange(0, 2 * BLOCK_N)
            y = _expert_rows(x_row, w_e, s_e, z_e, pairs, pairs < 2 * I, K, NCH, swk, swn, ssn, ssg, WORDS, BITS,
                             SIGNED, GROUP, HAS_ZP, XOR, CW, 2 * BLOCK_N, BLOCK_K)
            g, u = tl.split(tl.reshape(y, (BLOCK_N, 2)))
        else:
            g = _expert_rows(x_row, w_e, s_e, z_e, offs, ok, K, NCH, swk, swn, ssn, ssg, WORDS, BITS, SIGNED, GROUP,
                             HAS_ZP, XOR, CW, BLOCK_N, BLOCK_K)
            u = _expert_rows(x_row, w_e, s_e, z_e, offs + I, ok, K, NCH, swk, swn, ssn, ssg, WORDS, BITS, SIGNED,
                             GROUP, HAS_ZP, XOR, CW, BLOCK_N, BLOCK_K)
        a = _rounded(activation(_rounded(g, ROUND), ACT), ROUND)
        h = _rounded(a * _rounded(u, ROUND), ROUND)
        tl.store(o_ptr + t * sot + e * soe + offs, h.to(o_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _moe_down(h_ptr, p_ptr, r_ptr, w_ptr, s_ptr, z_ptr, o_ptr, E, N, K, NCH, sht, she, spt, srt, sew, swk, swn, ses,
              ssn, ssg, sot,
              WORDS: tl.constexpr, BITS: tl.constexpr, SIGNED: tl.constexpr, GROUP: tl.constexpr,
              HAS_ZP: tl.constexpr, XOR: tl.constexpr, CW: tl.constexpr, Y_ROUND: tl.constexpr,
              OUT_ROUND: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Program (token t, column block): over experts 0..E-1 in order, each one t picked adds
    ``round_out(round(down_e(h[t, e])) * r[t, e])`` to the sum, rounded to the output dtype after each add (the
    dense form's ``where`` / cast / ``add`` chain; an unpicked expert's exact 0.0 changes nothing)."""
    t = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = offs < N
    total = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for e in range(0, E):
        if tl.load(p_ptr + t * spt + e) != 0:
            e64 = tl.cast(e, tl.int64)
            y = _expert_rows(h_ptr + t * sht + e * she, w_ptr + e64 * sew, s_ptr + e64 * ses, z_ptr + e64 * ses,
                             offs, ok, K, NCH, swk, swn, ssn, ssg, WORDS, BITS, SIGNED, GROUP, HAS_ZP, XOR, CW,
                             BLOCK_N, BLOCK_K)
            r = tl.load(r_ptr + t * srt + e).to(tl.float32)
            total = _rounded(total + _rounded(_rounded(y, Y_ROUND) * r, OUT_ROUND), OUT_ROUND)
    tl.store(o_ptr + t * sot + offs, total.to(o_ptr.dtype.element_ty), mask=ok)


MIN_PROGRAMS = 264
"""Programs a launch aims at on the GPU (2 per SM of an H100) before it narrows its column blocks below 16."""


def _block_n(n: int, rows: int) -> int:
    """Columns per program for ``rows`` working (token[, expert]) rows: few wide programs under the interpreter (its
    cost is per program); on the GPU 16, down to 4 where that leaves fewer than ``MIN_PROGRAMS`` (a Mixtral-shaped
    down projection at one token, H = 1024: 64 programs at 16 columns, 256 at 4). Not yet tuned on a GPU."""
    if interpreting():
        return 128
    block = 16
    while block > 4 and rows * cdiv(n, block) < MIN_PROGRAMS:
        block //= 2
    return block


def _weight_meta(op: str, weight: torch.Tensor, scale: torch.Tensor | None, zero_point: torch.Tensor | None,
                 qdtype: str, group_size: int, k: int) -> tuple[tuple, dict]:
    """Runtime arguments ``(NCH, sew, swk, swn, ses, ssn, ssg, scale, zero)`` and constexprs for a
    stacked weight (``moe_weight_unsupported`` checked it; a refusal names ``op``)."""
    why = moe_weight_unsupported(weight, scale, qdtype, group_size, k)
    check(why is None, op, f"weight {tuple(weight.shape)} {weight.dtype}: {why}")
    if not qdtype:
        meta = {"WORDS": False, "BITS": 8, "SIGNED": False, "GROUP": 0, "HAS_ZP": False, "XOR": 0, "CW": 16,
                "BLOCK_K": 64 if interpreting() else 256}
        return (0, weight.stride(0), 1, weight.stride(1), 0, 0, 0, weight, weight), meta
    bits = _bits(qdtype)
    signed = PACKED_QDTYPES.get(qdtype, BYTE_QDTYPES.get(qdtype, False))
    cw = chunk_words(k, group_size, bits)
    check(weight.stride(2) == 1 or weight.stride(1) == 1, op,
          f"words {tuple(weight.shape)} strides {weight.stride()}: rows neither K- nor N-major")
    assert scale is not None
    ssg = scale.stride(2) if scale.dim() == 3 and group_size else 0
    if zero_point is not None:
        check(zero_point.shape == scale.shape and zero_point.stride() == scale.stride(), op,
              f"zero points {tuple(zero_point.shape)} strides {zero_point.stride()} not laid out as the scales "
              f"{tuple(scale.shape)} {scale.stride()}")
    meta = {"WORDS": True, "BITS": bits, "SIGNED": signed, "GROUP": group_size, "HAS_ZP": zero_point is not None,
            "XOR": WORD_XOR[bits] if signed else 0, "CW": cw, "BLOCK_K": 16}
    args = (k // ((32 // bits) * cw), weight.stride(0), weight.stride(2), weight.stride(1), scale.stride(0),
            scale.stride(1), ssg, scale, zero_point if zero_point is not None else scale)
    return args, meta


def _check_routing(op: str, x_rows: int, picked: torch.Tensor, n_experts: int) -> None:
    check(picked.dim() == 2 and picked.shape == (x_rows, n_experts) and picked.dtype == torch.bool, op,
          f"picked {tuple(picked.shape)} {picked.dtype}: not bool [tokens={x_rows}, experts={n_experts}]")


def _picked_bytes(picked: torch.Tensor) -> torch.Tensor:
    """The picks as bytes for the kernels (a view: bool and uint8 share their storage)."""
    return (picked if picked.stride(-1) == 1 else picked.contiguous()).view(torch.uint8)


@triton_op("lowbit::moe_gate_up", mutates_args=())
def moe_gate_up(x: torch.Tensor, picked: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None,
                zero_point: torch.Tensor | None, qdtype: str, group_size: int, epilogue: str,
                interleaved: bool) -> torch.Tensor:
    """``[T, E, I]``: ``act(gate_e(x_t)) * up_e(x_t)`` where ``picked[t, e]`` (other rows unwritten); ``qdtype``
    "" for a float weight; ``epilogue`` ``<act>*up``."""
    act, gated = parse_epilogue(epilogue, "moe_gate_up")
    check(gated, "moe_gate_up", f"epilogue {epilogue!r} is not a gated activation")
    check(x.dim() == 2 and x.stride(-1) == 1 and x.dtype in FLOAT_DTYPES, "moe_gate_up",
          f"x {tuple(x.shape)} {x.dtype}: rows of bf16/fp16")
    args, meta = _weight_meta("moe_gate_up", weight, scale, zero_point, qdtype, group_size, x.shape[1])
    n_experts, inner = _gate_up_rows("moe_gate_up", weight)
    _check_routing("moe_gate_up", x.shape[0], picked, n_experts)
    nch, sew, swk, swn, ses, ssn, ssg, s, z = args
    out = torch.empty((x.shape[0], n_experts, inner), device=x.device, dtype=x.dtype)
    if x.shape[0] == 0:
        return out
    block = _block_n(inner, x.shape[0])  # (at least one expert a token: the picks are not read on the host)
    p = _picked_bytes(picked)
    launcher(x, _moe_gate_up)[(x.shape[0] * n_experts, cdiv(inner, block))](
        x, p, weight, s, z, out, n_experts, inner, x.shape[1], nch, x.stride(0), p.stride(0), sew, swk, swn, ses,
        ssn, ssg, out.stride(0), out.stride(1),
        **meta, ACT=act, ROUND=_ROUND_CODE[x.dtype], INTERLEAVED=interleaved, BLOCK_N=block)
    return out


@moe_gate_up.register_fake
def _(x, picked, weight, scale, zero_point, qdtype, group_size, epilogue, interleaved):
    return x.new_empty((x.shape[0], weight.shape[0], weight.shape[1] // 2))


def _gate_up_rows(op: str, weight: torch.Tensor) -> tuple[int, int]:
    """``(experts, I)`` of a merged gate/up stack ``[E, 2I, K]``; an odd row count is refused (the last row would
    be neither a gate nor an up row, and was dropped without an error)."""
    check(weight.shape[1] % 2 == 0, op, f"gate/up weight {tuple(weight.shape)}: an odd number of rows, not 2 I")
    return weight.shape[0], weight.shape[1] // 2


def _check_down(op: str, axis: str, h: torch.Tensor, picked: torch.Tensor, dense: torch.Tensor,
                weight: torch.Tensor, out_dtype: torch.dtype) -> tuple[int, int]:
    """A down op's operands checked (``h [tokens, <axis>, inner]``, the router's picks and weights, ``out_dtype``):
    ``(experts, output width)``. ``moe_down`` and ``moe_down_blocked`` (``axis``: experts / slots)."""
    check(h.dim() == 3 and h.stride(-1) == 1 and h.dtype in FLOAT_DTYPES, op,
          f"h {tuple(h.shape)} {h.dtype}: [tokens, {axis}, inner] of bf16/fp16")
    check(out_dtype in _ROUND_CODE and dense.shape == picked.shape, op,
          f"out_dtype {out_dtype}, router weights {tuple(dense.shape)}")
    check(weight.dim() == 3, op, f"weight {tuple(weight.shape)}: a stack [experts, N, K or words]")
    _check_routing(op, h.shape[0], picked, weight.shape[0])
    return weight.shape[0], weight.shape[1]


@triton_op("lowbit::moe_down", mutates_args=())
def moe_down(h: torch.Tensor, picked: torch.Tensor, dense: torch.Tensor, weight: torch.Tensor,
             scale: torch.Tensor | None, zero_point: torch.Tensor | None, qdtype: str, group_size: int,
             out_dtype: torch.dtype) -> torch.Tensor:
    """``[T, H]`` in ``out_dtype``: ``sum over e in order, where picked[t, e]`` of ``down_e(h[t, e]) * dense[t,
    e]``, with ``DenseExperts``' roundings."""
    n_experts, n = _check_down("moe_down", "experts", h, picked, dense, weight, out_dtype)
    args, meta = _weight_meta("moe_down", weight, scale, zero_point, qdtype, group_size, h.shape[2])
    nch, sew, swk, swn, ses, ssn, ssg, s, z = args
    out = torch.empty((h.shape[0], n), device=h.device, dtype=out_dtype)
    if h.shape[0] == 0:
        return out
    block = _block_n(n, h.shape[0])
    p = _picked_bytes(picked)
    if dense.stride(-1) != 1:  # (the kernel reads a token's router weights at stride 1)
        dense = dense.contiguous()
    launcher(h, _moe_down)[(h.shape[0], cdiv(n, block))](
        h, p, dense, weight, s, z, out, n_experts, n, h.shape[2], nch, h.stride(0), h.stride(1), p.stride(0),
        dense.stride(0), sew, swk, swn, ses, ssn, ssg, out.stride(0), **meta,
        Y_ROUND=_ROUND_CODE[h.dtype], OUT_ROUND=_ROUND_CODE[out_dtype], BLOCK_N=block)
    return out


@moe_down.register_fake
def _(h, picked, dense, weight, scale, zero_point, qdtype, group_size, out_dtype):
    return h.new_empty((h.shape[0], weight.shape[1]), dtype=out_dtype)


def _float_weights(weight: torch.Tensor, scale: torch.Tensor | None, zero_point: torch.Tensor | None, qdtype: str,
                   group_size: int, k: int) -> torch.Tensor:
    """The stacked weight as float32 ``[E, N, K]``: word codes ``s * (q - z)`` in float32 (the kernels' arithmetic,
    no rounding of the weight to the activation dtype)."""
    if not qdtype:
        return weight.float()
    from lowbit.ir.quant import dequantize

    out = []
    for e in range(weight.shape[0]):
        stored = unpack_words(weight[e], qdtype, k, group_size)
        out.append(dequantize(stored, scale[e], None if zero_point is None else zero_point[e], qdtype=qdtype,
                              axis=1 if group_size else 0, block_size=group_size or None, out_dtype=torch.float32))
    return torch.stack(out)


def moe_gate_up_ref(x: torch.Tensor, picked: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None,
                    zero_point: torch.Tensor | None, qdtype: str, group_size: int, epilogue: str,
                    interleaved: bool) -> torch.Tensor:
    """``moe_gate_up`` in torch: every expert on every token in float32 (the rows the kernel leaves unwritten are 0
    here), then the gated epilogue's roundings."""
    act = epilogue.removesuffix("*up")
    w = _float_weights(weight, scale, zero_point, qdtype, group_size, x.shape[1])
    inner = w.shape[1] // 2
    gate, up = (w[:, 0::2], w[:, 1::2]) if interleaved else (w[:, :inner], w[:, inner:])
    dt = x.dtype
    g = torch.einsum("th,eih->tei", x.float(), gate).to(dt)
    u = torch.einsum("th,eih->tei", x.float(), up).to(dt)
    h = activation_ref(g.float(), act).to(dt) * u
    return torch.where(picked[:, :, None], h, 0.0)


def moe_down_ref(h: torch.Tensor, picked: torch.Tensor, dense: torch.Tensor, weight: torch.Tensor,
                 scale: torch.Tensor | None, zero_point: torch.Tensor | None, qdtype: str, group_size: int,
                 out_dtype: torch.dtype) -> torch.Tensor:
    """``moe_down`` in torch: ``DenseExperts``' chain over float32 products: per expert in order
    ``where(picked, (y * dense).to(out_dtype), 0.0)`` added to the sum."""
    w = _float_weights(weight, scale, zero_point, qdtype, group_size, h.shape[2])
    total = None
    for e in range(w.shape[0]):
        y = (h[:, e].float() @ w[e].t()).to(h.dtype)
        term = torch.where(picked[:, e, None], (y.float() * dense[:, e, None].float()).to(out_dtype), 0.0)
        total = term if total is None else total + term
    return total
