"""Quantize–dequantize semantics: the numbers every lowbit backend must reproduce.

The ops registered here are the QDQ contract of ``docs/design.md``:

    %q  = quantize(%x, %scale, %zero_point, qdtype="int8", axis=-1, block_size=None)
    %xq = dequantize(%q, %scale, %zero_point, qdtype="int8", axis=-1, block_size=None, out_dtype=f32)
    %s, %zp = dynamic_qparams(%x, qdtype="int8", granularity="per_token", symmetric=True, axis=-1, block_size=None)

They follow ONNX QuantizeLinear/DequantizeLinear: ``q = saturate(round_half_even(x / scale) + zero_point)``
and ``x' = (q - zero_point) * scale``; fp8 is ``saturate(cast(x / scale))``. Granularity comes from the scale's
shape with ``axis``/``block_size`` (per-tensor: 0-d scale; per-axis: 1-d scale of the axis' length; block-wise:
same rank as ``x`` with ``ceil(len / block_size)`` along ``axis``; 2-D blocks, which ONNX's 1-D blocking lacks:
``axis`` and ``block_size`` lists of equal length, ``ceil(len / block)`` along each listed axis, as
DeepSeek-V3's and compressed-tensors' ``FP8_BLOCK`` 128x128 weight scales ``axis=[0, 1], block_size=[128, 128]``;
an edge block past the tensor's end is partial).

Storage rule for 4 bits and fewer: **every** ``int4``/``uint4``/``int3``/``int2`` tensor that ``quantize``
produces, or that ``dequantize`` reads, is packed two values per ``uint8`` byte along the last axis (low nibble
= even index). ``int3`` and ``int2`` use the same 4-bit nibbles (their ranges fit a signed nibble); nothing is
packed tighter, so a 3-bit or 2-bit weight costs as many bytes as a 4-bit one until a backend defines a denser
format. Zero points are never packed: they are stored unpacked in the qdtype's container (``int8``/``uint8``).

Everything here is plain torch and runs on ``meta`` tensors too (no data-dependent checks), so the verifier
can type-check QDQ nodes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch

from lowbit.ir.ops import register_op

if TYPE_CHECKING:
    from lowbit.ir.qscheme import QScheme

__all__ = [
    "QDType",
    "QDTYPES",
    "SCALE_EPS",
    "asymmetric_qparams",
    "Layout",
    "get_qdtype",
    "pack_int4",
    "unpack_int4",
    "quantize",
    "dequantize",
    "dynamic_qparams",
    "qlinear",
    "activation_axis",
    "qparams_from_range",
    "group_view",
    "scale_shape",
    "from_groups",
    "layout_for",
    "tiled_minmax",
    "dynamic_layout",
    "fake_quant_with",
    "ceil_div_dim",
    "mul_dim",
]

SCALE_EPS = 1e-12
"""Smallest scale ever produced: an all-zero group gets this scale (q = 0, so x' = 0 exactly), never 0 or NaN."""


@dataclass(frozen=True)
class QDType:
    """A quantized number format: its range, the torch dtype that holds one value, and its storage."""

    name: str
    bits: int
    qmin: float
    qmax: float
    container: torch.dtype
    is_float: bool = False

    @property
    def signed(self) -> bool:
        return self.qmin < 0

    @property
    def packed(self) -> bool:
        """Stored two per byte (uint8) along the last axis."""
        return not self.is_float and self.bits <= 4

    @property
    def storage_dtype(self) -> torch.dtype:
        return torch.uint8 if self.packed else self.container


QDTYPES: dict[str, QDType] = {
    q.name: q
    for q in (
        QDType("int8", 8, -128, 127, torch.int8),
        QDType("uint8", 8, 0, 255, torch.uint8),
        QDType("int4", 4, -8, 7, torch.int8),
        QDType("uint4", 4, 0, 15, torch.uint8),
        QDType("int3", 3, -4, 3, torch.int8),
        QDType("int2", 2, -2, 1, torch.int8),
        QDType("fp8e4m3", 8, -448.0, 448.0, torch.float8_e4m3fn, is_float=True),
        QDType("fp8e5m2", 8, -57344.0, 57344.0, torch.float8_e5m2, is_float=True),
    )
}


def get_qdtype(name: str | QDType) -> QDType:
    """The QDType named ``name``; an unknown name is an error listing the known ones."""
    if isinstance(name, QDType):
        return name
    try:
        return QDTYPES[name]
    except KeyError:
        raise ValueError(f"unknown qdtype {name!r}; known: {', '.join(QDTYPES)}") from None


# ---- packing ------------------------------------------------------------------------------------


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Pack 4-bit values (int8 in [-8, 7] or uint8 in [0, 15]) two per byte along the last axis.

    Byte ``j`` holds element ``2j`` in its low nibble and ``2j+1`` in its high nibble; signed values are
    stored as two's-complement nibbles. Also used for int3/int2, whose ranges fit a signed nibble.
    """
    if q.dtype not in (torch.int8, torch.uint8):
        raise TypeError(f"pack_int4 takes int8 or uint8 values, got {q.dtype}")
    if q.dim() == 0 or q.shape[-1] % 2:
        raise ValueError(f"pack_int4 needs an even last dimension (two values per byte), got shape {tuple(q.shape)}")
    # int8 viewed as uint8 keeps its bits, so & 0xF is the two's-complement nibble; the uint8 shift drops the high
    # nibble of the odd element by itself. In place on one new tensor: half the passes over memory of copying first.
    u = q.view(torch.uint8) if q.dtype == torch.int8 else q
    packed = u[..., 0::2] & 0xF
    packed |= u[..., 1::2] << 4
    return packed


def stored_codes(q: torch.Tensor, qdtype: str | QDType) -> torch.Tensor:
    """Codes as a weight param stores them: int4 and narrower packed two per byte, others in the storage dtype."""
    qd = get_qdtype(qdtype)
    return pack_int4(q) if qd.packed else q.to(qd.storage_dtype)


def unpack_int4(packed: torch.Tensor, signed: bool) -> torch.Tensor:
    """Inverse of ``pack_int4``: uint8 ``[..., K/2]`` -> int8 (``signed``) or uint8 ``[..., K]``."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"unpack_int4 takes packed uint8 bytes, got {packed.dtype}")
    if signed:
        # arithmetic shifts of the bytes as int8 sign-extend each nibble: ~8x faster than a where(q >= 8, q - 16, q)
        # over the unpacked codes (SmolLM2's 49152x576 embedding: 0.46 s -> 0.07 s on one core)
        as_int8 = packed.view(torch.int8)
        lo, hi = (as_int8 << 4) >> 4, as_int8 >> 4
    else:
        lo, hi = packed & 0xF, packed >> 4
    return torch.stack([lo, hi], dim=-1).flatten(-2)


# ---- granularity: axis / block_size -------------------------------------------------------------


def _norm_axis(axis: int, rank: int, what: str) -> int:
    if not -rank <= axis < rank:
        raise ValueError(f"{what}: axis {axis} is out of range for a rank-{rank} tensor")
    return axis % rank


def _tiled_axes(x_shape: Sequence[int], scale: torch.Tensor, axis: Any, block_size: Sequence[int],
                what: str) -> None:
    """Check a 2-D (n-D) block layout: ``axis`` lists distinct axes, one positive ``block_size`` each, and the scale
    is ``x``'s shape with ``ceil(len / block)`` along each listed axis (an edge block may be partial)."""
    if not isinstance(axis, (list, tuple)) or len(axis) != len(block_size) or not block_size:
        raise ValueError(f"{what}: block_size {list(block_size)} needs axis to list one axis per block length, got "
                         f"axis={axis!r}")
    axes = [_norm_axis(int(a), len(x_shape), what) for a in axis]
    if len(set(axes)) != len(axes) or any(not isinstance(b, int) or b < 1 for b in block_size):
        raise ValueError(f"{what}: axis={list(axis)}, block_size={list(block_size)}: axes must be distinct and block "
                         "lengths positive ints")
    want = list(x_shape)
    for a, b in zip(axes, block_size):
        want[a] = -(-x_shape[a] // b)
    if list(scale.shape) != want:
        raise ValueError(f"{what}: tiled scale for x {tuple(x_shape)}, axis {list(axis)}, block_size "
                         f"{list(block_size)} must have shape {tuple(want)}, got {tuple(scale.shape)}")


def _granularity(x_shape: Sequence[int], scale: torch.Tensor, axis: Any, block_size: Any,
                 what: str) -> Literal["tensor", "axis", "block", "tiles"]:
    if isinstance(block_size, (list, tuple)):
        _tiled_axes(x_shape, scale, axis, block_size, what)
        return "tiles"
    if scale.dim() == 0 or (scale.numel() == 1 and block_size is None and scale.dim() <= 1):
        return "tensor"
    if axis is None:
        raise ValueError(f"{what}: a scale of shape {tuple(scale.shape)} needs an axis")
    ax = _norm_axis(axis, len(x_shape), what)
    if block_size is None:
        if scale.dim() != 1 or scale.shape[0] != x_shape[ax]:
            raise ValueError(f"{what}: per-axis scale must be 1-d of length {x_shape[ax]} (axis {axis} of "
                             f"{tuple(x_shape)}), got {tuple(scale.shape)}")
        return "axis"
    if block_size < 1:
        raise ValueError(f"{what}: block_size must be positive, got {block_size}")
    want = list(x_shape)
    want[ax] = -(-x_shape[ax] // block_size)
    if list(scale.shape) != want:
        raise ValueError(f"{what}: block-wise scale for x {tuple(x_shape)}, axis {axis}, block_size {block_size} "
                         f"must have shape {tuple(want)}, got {tuple(scale.shape)}")
    return "block"


def _check_qparams(qd: QDType, scale: torch.Tensor, zero_point: torch.Tensor | None, what: str) -> None:
    """The QDQ contract's scale and zero point (ONNX's): a float scale, and a zero point of the scale's shape in the
    qdtype's container. dequantize checked neither: a ``[N, 1]`` zero point beside an ``[N, K/g]`` scale broadcast
    to one zero point per row (other numbers, no error), and a float or wrong-signed one was used as given."""
    if not scale.is_floating_point():
        raise TypeError(f"{what}: the scale must be a float tensor, got {scale.dtype}")
    if zero_point is None:
        return
    if qd.is_float:
        raise ValueError(f"{what}: fp8 takes no zero point (pass None)")
    if zero_point.shape != scale.shape:
        raise ValueError(f"{what}: zero point shape {tuple(zero_point.shape)} != scale shape {tuple(scale.shape)} "
                         "(one zero point per scale)")
    if zero_point.dtype != qd.container:
        raise TypeError(f"{what}: the zero point must be {str(qd.container).removeprefix('torch.')} ({qd.name}'s "
                        f"container, unpacked), got {str(zero_point.dtype).removeprefix('torch.')}")


def _blocked_view(x: torch.Tensor, kind: str, axis: Any, block_size: Any) -> tuple[torch.Tensor, Any, Any]:
    """``x`` in a shape its scale broadcasts against, a function undoing that reshape, and one shaping a scale.

    Block-wise with the axis a multiple of the block: ``x`` is viewed as ``[..., nb, bs, ...]`` and the scale
    as ``[..., nb, 1, ...]`` (nothing materialized); a ragged last block repeats each scale over its block, and so
    do 2-D tiles along each of their axes (weights: once, when quantized or lowered).
    """
    rank = x.dim()
    if kind == "tiles":
        def tile(t: torch.Tensor) -> torch.Tensor:
            for a, b in zip(axis, block_size):
                ax = int(a) % rank
                t = t.repeat_interleave(int(b), dim=ax).narrow(ax, 0, x.shape[ax])
            return t
        return x, lambda y: y, tile
    if kind == "tensor":
        return x, lambda y: y, lambda t: t.reshape(())
    ax = axis % rank  # type: ignore[operator]
    if kind == "axis":
        return x, lambda y: y, lambda t: t.reshape([t.shape[0]] + [1] * (rank - 1 - ax))
    assert block_size is not None
    length = x.shape[ax]
    if length % block_size == 0:
        xv = x.unflatten(ax, (length // block_size, block_size))
        return xv, lambda y: y.flatten(ax, ax + 1), lambda t: t.unsqueeze(ax + 1)
    return x, lambda y: y, lambda t: t.repeat_interleave(block_size, dim=ax).narrow(ax, 0, length)


@dataclass(frozen=True)
class Layout:
    """Where a tensor's scales live, in QDQ terms: ``axis=None`` is per-tensor; tuples of axes and block lengths are
    2-D tiles (``is_tiled``)."""

    axis: int | tuple[int, ...] | None = None
    block_size: int | tuple[int, ...] | None = None

    @property
    def is_tiled(self) -> bool:
        return isinstance(self.block_size, tuple)

    def kwargs(self) -> dict[str, Any]:
        """``axis`` / ``block_size`` as a QDQ node's kwargs: tiles as lists, the form the IR text reads back."""
        if self.is_tiled:
            return {"axis": list(self.axis), "block_size": list(self.block_size)}  # type: ignore[arg-type]
        return {"axis": self.axis, "block_size": self.block_size}


def scale_shape(x_shape: Sequence[int], layout: Layout) -> list[int]:
    """Shape of the scale that ``layout`` gives a tensor of ``x_shape``."""
    if layout.axis is None:
        return []
    if layout.is_tiled:
        out = list(x_shape)
        for a, b in zip(layout.axis, layout.block_size):  # type: ignore[arg-type]
            out[a] = -(-x_shape[a] // b)
        return out
    ax = _norm_axis(layout.axis, len(x_shape), "scale_shape")
    if layout.block_size is None:
        return [x_shape[ax]]
    out = list(x_shape)
    out[ax] = -(-x_shape[ax] // layout.block_size)
    return out


def group_view(x: torch.Tensor, layout: Layout) -> torch.Tensor:
    """``x`` as ``[groups, elements]``: one row per scale (row order = the scale tensor's flat order).

    Block-wise layouts need the axis to be a multiple of the block (observers see whole groups); the
    dynamic op handles a ragged last block itself.
    """
    if layout.axis is None:
        return x.reshape(1, -1)
    if layout.is_tiled:  # observers see rows of equal length; a tile is not one (tiled_minmax serves them)
        raise ValueError(f"group_view: 2-D tiles {layout.block_size} along axes {layout.axis} are not rows of one "
                         "length; use tiled_minmax")
    ax = _norm_axis(layout.axis, x.dim(), "group_view")
    if layout.block_size is None:
        return x.movedim(ax, 0).reshape(x.shape[ax], -1)
    bs = layout.block_size
    if x.shape[ax] % bs:
        raise ValueError(f"group_view: axis {layout.axis} of length {x.shape[ax]} is not a multiple of block {bs}")
    # move the blocked axis last, split it into [nb, bs]: rows follow the scale's order (axis in place)
    xm = x.movedim(ax, -1)
    xm = xm.reshape(*xm.shape[:-1], x.shape[ax] // bs, bs)  # [..., nb, bs] with `..` = other dims in order
    # the scale has shape x.shape with axis -> nb; its flat order is (dims before ax, nb, dims after ax)
    nd = xm.dim()
    perm = list(range(ax)) + [nd - 2] + list(range(ax, nd - 2)) + [nd - 1]
    return xm.permute(perm).reshape(-1, bs)


def tiled_minmax(x: torch.Tensor, layout: Layout) -> tuple[torch.Tensor, torch.Tensor]:
    """Min and max of ``x`` over each 2-D tile of ``layout`` (edge tiles partial), shaped like its scale: the
    blocked min/max along one axis, then of those along the next."""
    lo = hi = x.float()
    for a, b in zip(layout.axis, layout.block_size):  # type: ignore[arg-type]
        ax = _norm_axis(a, x.dim(), "tiled_minmax")
        lo, hi = _blocked_minmax(lo, ax, b)[0], _blocked_minmax(hi, ax, b)[1]
    return lo, hi


def from_groups(values: torch.Tensor, x_shape: Sequence[int], layout: Layout) -> torch.Tensor:
    """Per-group values (``[groups]``, in ``group_view`` row order) shaped as the layout's scale."""
    return values.reshape(scale_shape(x_shape, layout))


# ---- qparams ------------------------------------------------------------------------------------


def qparams_from_range(lo: torch.Tensor, hi: torch.Tensor, qdtype: str | QDType, symmetric: bool
                       ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale and zero point that map ``[lo, hi]`` (per group) onto the qdtype's grid.

    Symmetric: ``scale = max(|lo|, |hi|) / qmax``, no zero point (the most negative code, e.g. -128, is unused,
    as in ONNX/TensorRT symmetric int8). Asymmetric: the range is widened to include 0 (so 0 is exactly
    representable and the zero point fits the qdtype), ``scale = (hi - lo) / (qmax - qmin)``,
    ``zero_point = clamp(round(qmin - lo / scale))``. fp8 is symmetric only. Scales are at least ``SCALE_EPS``.
    """
    qd = get_qdtype(qdtype)
    lo, hi = lo.float(), hi.float()
    if symmetric or qd.is_float:
        if qd.is_float and not symmetric:
            raise ValueError(f"qdtype {qd.name} is symmetric only (ONNX fp8 zero points are 0): set symmetric=True")
        if not qd.is_float and qd.qmin == 0:
            raise ValueError(f"qdtype {qd.name} has no negative codes: symmetric qparams (zero point 0) would clamp "
                             f"every negative value to 0; use int{qd.bits} or symmetric=False")
        amax = torch.maximum(lo.abs(), hi.abs())
        return (amax / qd.qmax).clamp(min=SCALE_EPS), None
    scale, zp = asymmetric_qparams(lo, hi, qd.qmin, qd.qmax)
    return scale, zp.to(qd.container)


def asymmetric_qparams(lo: torch.Tensor, hi: torch.Tensor, qmin: int, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 scale and zero point (an integer-valued float in ``[qmin, qmax]``) of ranges ``[lo, hi]`` widened to
    hold 0: ``scale = max((hi - lo) / (qmax - qmin), SCALE_EPS)``, ``zero_point = clamp(round(qmin - lo / scale))``.

    Why one function: the packed KV cache (``lowbit.ir.kvcache``: a decode step's ``cache_update``, a prefill's,
    and so ``write_packed_kv``'s reference, which its Triton kernel equals bit for bit) derives its scales and zero
    points here, as the accuracy model it is tested against (``insert_kv_qdq``'s ``dynamic_qparams``, through
    ``qparams_from_range``) does, so the two cannot drift apart. ``clamp`` rather than ``minimum``/``maximum`` with a
    zeros tensor: the same values (signed zeros and NaN included) without making that tensor, one launch fewer
    each on a GPU, where a decode step's cache write is launch-bound."""
    lo = lo.float().clamp(max=0)
    hi = hi.float().clamp(min=0)
    scale = ((hi - lo) / (qmax - qmin)).clamp(min=SCALE_EPS)
    return scale, torch.round(qmin - lo / scale).clamp(qmin, qmax)


# ---- the ops ------------------------------------------------------------------------------------


@register_op("quantize")
def quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None = None,
    *,
    qdtype: str,
    axis: int | None = -1,
    block_size: int | None = None,
) -> torch.Tensor:
    """ONNX QuantizeLinear: saturate(round_half_even(x / scale) + zero_point); <=4-bit results are packed."""
    qd = get_qdtype(qdtype)
    what = f"quantize(qdtype={qd.name})"
    kind = _granularity(x.shape, scale, axis, block_size, what)
    _check_qparams(qd, scale, zero_point, what)
    xv, restore, view = _blocked_view(x, kind, axis, block_size)
    y = xv.float() / view(scale.float())
    if qd.is_float:
        return restore(y.clamp(qd.qmin, qd.qmax).to(qd.container))
    q = torch.round(y)
    if zero_point is not None:
        q = q + view(zero_point.float())
    q = restore(q.clamp(qd.qmin, qd.qmax).to(qd.container))
    return pack_int4(q) if qd.packed else q


@register_op("dequantize")
def dequantize(
    q: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None = None,
    *,
    qdtype: str,
    axis: int | None = -1,
    block_size: int | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """ONNX DequantizeLinear: (q - zero_point) * scale, computed in float32 then cast to ``out_dtype``."""
    qd = get_qdtype(qdtype)
    what = f"dequantize(qdtype={qd.name})"
    if q.dtype != qd.storage_dtype:
        raise TypeError(f"{what}: expects {qd.storage_dtype} data"
                        f"{' (packed two per byte)' if qd.packed else ''}, got {q.dtype}")
    if qd.packed:
        q = unpack_int4(q, signed=qd.signed)
    kind = _granularity(q.shape, scale, axis, block_size, what)
    _check_qparams(qd, scale, zero_point, what)
    qv, restore, view = _blocked_view(q, kind, axis, block_size)
    y = qv.float()
    if zero_point is not None:
        y = y - view(zero_point.float())
    return restore((y * view(scale.float())).to(out_dtype))


DynamicGranularity = Literal["per_tensor", "per_token", "per_channel", "per_block"]


def dynamic_layout(x_shape: Sequence[int], granularity: str, axis: int | None, block_size: int | None) -> Layout:
    """The quantize/dequantize ``axis``/``block_size`` matching a ``dynamic_qparams`` granularity."""
    if granularity == "per_tensor":
        return Layout(None, None)
    if granularity == "per_token":  # one scale per row of the last axis (or per group of block_size channels)
        return Layout(-1, block_size if block_size is not None else int(x_shape[-1]))
    if granularity == "per_channel":  # one scale per index of ``axis``, over every other dim
        return Layout(-1 if axis is None else axis, None)
    if granularity == "per_block":  # block-wise along ``axis`` (KIVI keys: axis=seq, block=token group)
        if axis is None or block_size is None:
            raise ValueError("dynamic_qparams granularity 'per_block' needs axis and block_size")
        return Layout(axis, block_size)
    raise ValueError(f"unknown dynamic granularity {granularity!r}; known: per_tensor, per_token, per_channel, "
                     "per_block")


def _blocked_minmax(x: torch.Tensor, axis: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Min and max over blocks of ``block`` along ``axis`` (last block may be partial), shaped like the scale."""
    xm = x.movedim(axis, -1)
    length = xm.shape[-1]
    full = length // block * block
    los, his = [], []
    if full:
        blocks = xm.narrow(-1, 0, full).unflatten(-1, (full // block, block))
        los.append(blocks.amin(-1))
        his.append(blocks.amax(-1))
    if full != length:
        tail = xm.narrow(-1, full, length - full)
        los.append(tail.amin(-1, keepdim=True))
        his.append(tail.amax(-1, keepdim=True))
    lo = torch.cat(los, -1) if len(los) > 1 else los[0]
    hi = torch.cat(his, -1) if len(his) > 1 else his[0]
    return lo.movedim(-1, axis), hi.movedim(-1, axis)


@register_op("dynamic_qparams", num_outputs=2)
def dynamic_qparams(
    x: torch.Tensor,
    *,
    qdtype: str,
    granularity: str = "per_token",
    symmetric: bool = True,
    axis: int | None = -1,
    block_size: int | None = None,
    clip_ratio: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point of ``x`` from its own min/max (dynamic activation quantization); scales never 0/NaN.

    ``clip_ratio`` < 1 shrinks the range to ``clip_ratio·[min, max]`` (QuaRot clips A4 at 0.9, the KV cache at
    0.95): the few values outside are clamped by ``quantize``, the many inside get a finer grid.

    Granularity, with the matching quantize ``axis``/``block_size`` (see ``dynamic_layout``): ``per_tensor``
    (0-d scale); ``per_token`` (block-wise along the last axis, one block = the whole row or ``block_size``
    channels); ``per_channel`` (1-d scale along ``axis``); ``per_block`` (block-wise along ``axis``). The zero
    point is zeros for symmetric and fp8 qdtypes (same shape as the scale, in the qdtype's container).
    """
    qd = get_qdtype(qdtype)
    layout = dynamic_layout(x.shape, granularity, axis, block_size)
    xf = x.float()
    if layout.axis is None:
        lo, hi = xf.amin(), xf.amax()
    elif layout.block_size is None:
        ax = _norm_axis(layout.axis, x.dim(), "dynamic_qparams")
        dims = [d for d in range(x.dim()) if d != ax]
        lo, hi = (xf.amin(dims), xf.amax(dims)) if dims else (xf, xf)
    else:
        lo, hi = _blocked_minmax(xf, _norm_axis(layout.axis, x.dim(), "dynamic_qparams"), layout.block_size)
    if not 0 < clip_ratio <= 1:
        raise ValueError(f"dynamic_qparams: clip_ratio={clip_ratio} must be in (0, 1]")
    if clip_ratio != 1.0:
        lo, hi = lo * clip_ratio, hi * clip_ratio
    scale, zp = qparams_from_range(lo, hi, qd, symmetric)
    if zp is None:
        zp = torch.zeros_like(scale, dtype=qd.container)
    return scale, zp


# ---- the fused quantized linear -------------------------------------------------------------------


def activation_axis(granularity: str) -> int | None:
    """The ``axis`` a linear input's activation QDQ uses for a granularity (``quantize`` pass's layouts):
    per_tensor has none; per_token (blocks along K) and per_channel (one scale per K index) use the last axis."""
    if granularity == "per_tensor":
        return None
    if granularity in ("per_token", "per_channel"):
        return -1
    raise ValueError(f"qlinear: activation granularity {granularity!r} is not one of per_tensor, per_token, "
                     "per_channel")


@register_op("qlinear")
def qlinear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    w_scale: torch.Tensor,
    w_zero_point: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    a_scale: torch.Tensor | None = None,
    a_zero_point: torch.Tensor | None = None,
    *,
    w_qdtype: str,
    w_axis: int | None = 0,
    w_block_size: int | None = None,
    a_qdtype: str | None = None,
    a_granularity: str = "per_token",
    a_symmetric: bool = True,
    a_block_size: int | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """A fused quantized linear: exactly dequantize(weight) (+ the input's quantize/dequantize) + linear.

    ``a_qdtype=None`` is weight-only. Otherwise the input goes through ``dynamic_qparams → quantize →
    dequantize`` (``a_scale`` None), or ``quantize → dequantize`` with the stored ``a_scale``/``a_zero_point``
    (static scales), with the ``a_*`` kwargs, before the product. Same ops, same order as the unfused graph
    (``lowbit.ir.fusion``), so the result is bit-identical to it.
    """
    w = dequantize(qweight, w_scale, w_zero_point, qdtype=w_qdtype, axis=w_axis, block_size=w_block_size,
                   out_dtype=out_dtype)
    if a_qdtype is not None:
        axis = activation_axis(a_granularity)
        if a_scale is None:
            a_scale, zp = dynamic_qparams(x, qdtype=a_qdtype, granularity=a_granularity, symmetric=a_symmetric,
                                          axis=axis, block_size=a_block_size)
            a_zero_point = None if (a_symmetric or get_qdtype(a_qdtype).is_float) else zp
        q = quantize(x, a_scale, a_zero_point, qdtype=a_qdtype, axis=axis, block_size=a_block_size)
        x = dequantize(q, a_scale, a_zero_point, qdtype=a_qdtype, axis=axis, block_size=a_block_size,
                       out_dtype=x.dtype)
    return torch.ops.aten.linear.default(x, w, bias)


# ---- fake quantization (calibration, observers, algorithms) ---------------------------------------


Role = Literal["weight", "activation", "key", "value"]


def layout_for(scheme: QScheme, shape: Sequence[int], role: Role = "weight") -> Layout:
    """The QDQ layout a scheme gives a tensor in a role.

    weight ``[N, K]``: per_channel = one scale per output row (``axis=0``); per_group(g) = block-wise along
    K (``axis=1, block_size=g``); per_block(g) = one scale per g x g tile (``axis=(0, 1), block_size=(g, g)``).
    activation ``[..., K]``: per_token = one scale per row (block of K, or of
    ``group_size`` channels); per_channel = one scale per channel (``axis=-1``). key/value ``[B, H, S, D]``:
    per_token = one scale per (batch, head, token) over D (or D-groups of ``group_size``); per_channel =
    one scale per (batch, head, channel) over blocks of ``group_size`` tokens (KIVI keys; ``axis=2``), or
    one scale per channel shared by all heads and tokens when ``group_size`` is None.
    """
    g = scheme.granularity
    if g == "per_tensor":
        return Layout(None, None)
    if role == "weight":
        if g == "per_channel":
            return Layout(0, None)
        if g == "per_group":
            return Layout(len(shape) - 1, scheme.group_size)
        if g == "per_block":  # group_size x group_size tiles over [N, K]
            return Layout((0, 1), (scheme.group_size, scheme.group_size))  # type: ignore[arg-type]
        raise ValueError(f"granularity {g!r} does not apply to weights (use per_tensor, per_channel, per_group, "
                         "per_block)")
    if role == "activation":
        if g in ("per_token", "per_group"):
            return Layout(-1, scheme.group_size or int(shape[-1]))
        return Layout(-1, None)
    if g in ("per_token", "per_group"):
        return Layout(-1, scheme.group_size or int(shape[-1]))
    if g == "per_channel":
        return Layout(2, scheme.group_size) if scheme.group_size else Layout(-1, None)
    raise ValueError(f"granularity {g!r} does not apply to role {role}")


def fake_quant_with(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, qdtype: str,
                    layout: Layout) -> torch.Tensor:
    """``dequantize(quantize(x))`` with given qparams, in ``x``'s dtype."""
    q = quantize(x, scale, zero_point, qdtype=qdtype, axis=layout.axis, block_size=layout.block_size)
    return dequantize(q, scale, zero_point, qdtype=qdtype, axis=layout.axis, block_size=layout.block_size,
                      out_dtype=x.dtype)


def ceil_div_dim(d: int | str, b: int) -> int | str:
    """``ceil(d / b)`` for a static or symbolic dimension (symbolic dims stay sympy-readable text)."""
    if isinstance(d, int):
        return -(-d // b)
    return f"ceiling(({d})/{b})" if not d.isidentifier() else f"ceiling({d}/{b})"


def mul_dim(d: int | str, k: int) -> int | str:
    """``k * d`` for a static or symbolic dimension (the float-window attention reads 2·S keys)."""
    if isinstance(d, int):
        return d * k
    return f"{k}*{d}" if d.isidentifier() else f"{k}*({d})"
