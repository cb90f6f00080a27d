"""Property tests of quantize -> dequantize round trips: every qdtype, symmetric or not, every granularity and group
size, through the weight observers (``fake_quant``) and the dynamic activation qparams the graphs compute.

The bounds are the grid's: an integer round trip of a value inside its group's observed range is off by at most half
a step (the group's scale / 2); fp8 by half a unit in the last place of the value over its scale (2**-4 relative for
e4m3, 2**-3 for e5m2) or, below the normal range, half the smallest subnormal. Each tolerance adds a few float32
roundings of the operands (``x / scale`` and ``q * scale`` are float32 ops).
"""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.calibration.observers import make_observer
from lowbit.ir.qscheme import QScheme
from lowbit.ir.quant import (
    QDTYPES,
    Layout,
    dequantize,
    dynamic_layout,
    dynamic_qparams,
    get_qdtype,
    layout_for,
    quantize,
)

INTEGER = [q for q in QDTYPES.values() if not q.is_float]
FLOAT8 = {"fp8e4m3": (2.0**-4, 2.0**-10), "fp8e5m2": (2.0**-3, 2.0**-17)}  # (half ulp relative, half min subnormal)
F32_EPS = torch.finfo(torch.float32).eps


def _data(seed: int, shape: tuple[int, ...], spread: float) -> torch.Tensor:
    """Random values with a few outliers, so groups have very different ranges (and some are all one sign)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.exp(spread * torch.randn(shape, generator=g))
    if seed % 3 == 0:
        x = x.abs()  # every group one-signed: the asymmetric grid must still hold 0 and the whole range
    return x


def _per_element(scale: torch.Tensor, x_shape: torch.Size, layout: Layout) -> torch.Tensor:
    """Each element's scale: the scale tensor broadcast back over its groups (a ragged last block included)."""
    if layout.axis is None:
        return scale.reshape(()).expand(x_shape)
    ax = layout.axis % len(x_shape)
    if layout.block_size is None:
        return scale.reshape([-1] + [1] * (len(x_shape) - 1 - ax)).expand(x_shape)
    return scale.repeat_interleave(layout.block_size, dim=ax).narrow(ax, 0, x_shape[ax])


def _round_trip(x: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor | None, qdtype: str, layout: Layout
                ) -> torch.Tensor:
    q = quantize(x, scale, zp, qdtype=qdtype, axis=layout.axis, block_size=layout.block_size)
    assert q.dtype == get_qdtype(qdtype).storage_dtype
    return dequantize(q, scale, zp, qdtype=qdtype, axis=layout.axis, block_size=layout.block_size,
                      out_dtype=torch.float32)


def _check_bound(x: torch.Tensor, back: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor | None, qdtype: str,
                 layout: Layout) -> None:
    s = _per_element(scale, x.shape, layout)
    err = (back - x).abs()
    qd = get_qdtype(qdtype)
    if qd.is_float:
        rel, sub = FLOAT8[qdtype]
        bound = rel * x.abs() + sub * s
    else:
        bound = 0.5 * s
    # float32 roundings: x / s (relative to the code, at most qmax), the zero point's shift, q * s
    slack = 8 * F32_EPS * (x.abs() + (abs(qd.qmin) + qd.qmax) * s)
    worst = (err - bound - slack).max()
    assert worst <= 0, (f"{qdtype} {layout}: error {err.max().item():.3g} beyond the bound by {worst.item():.3g} "
                        f"at {(err - bound - slack).argmax().item()} (scale {s.flatten()[(err - bound).argmax()]})")


SCHEMES = st.sampled_from([(q.name, sym) for q in INTEGER for sym in (True, False) if not (sym and q.qmin == 0)]
                          + [(name, True) for name in FLOAT8])


@settings(max_examples=40, deadline=None)
@given(SCHEMES, st.sampled_from(["per_tensor", "per_channel", "per_group"]), st.sampled_from([1, 2, 3, 8, 16, 32]),
       st.integers(1, 6), st.integers(1, 4), st.floats(0.0, 2.0), st.integers(0, 2**31 - 1))
def test_weight_round_trip_is_within_half_a_step_of_its_group(scheme, granularity, group, rows, groups, spread, seed):
    """A weight ``[N, K]`` through its scheme's observer (min/max per group), then quantize and dequantize: every
    element within half its group's step (fp8: half an ulp) of where it was."""
    qdtype, sym = scheme
    qs = QScheme(qdtype=qdtype, symmetric=sym, granularity=granularity,
                 group_size=group if granularity == "per_group" else None)
    k = group * groups
    if get_qdtype(qdtype).packed and k % 2:
        qs = qs.model_copy(update={"group_size": qs.group_size and qs.group_size * 2})
        k *= 2  # packed codes hold two per byte along K
    x = _data(seed, (rows, k), spread)
    layout = layout_for(qs, x.shape, "weight")
    obs = make_observer("minmax", qdtype, sym, layout)
    obs.observe(x)
    scale, zp = obs.qparams(x.shape)
    _check_bound(x, _round_trip(x, scale, zp, qdtype, layout), scale, zp, qdtype, layout)


@settings(max_examples=40, deadline=None)
@given(SCHEMES, st.sampled_from(["per_tensor", "per_token", "per_channel", "per_block"]),
       st.sampled_from([None, 1, 3, 8, 16]), st.integers(1, 3), st.integers(1, 5), st.integers(1, 40),
       st.floats(0.0, 2.0), st.integers(0, 2**31 - 1))
def test_dynamic_round_trip_is_within_half_a_step_of_its_block(scheme, granularity, block, b, s, k, spread, seed):
    """An activation ``[B, S, K]`` through ``dynamic_qparams`` (the in-graph scales of dynamic activations and the
    KV cache), then quantize and dequantize as the graph does: ragged last blocks included."""
    qdtype, sym = scheme
    if granularity == "per_block" and block is None:
        block = 2
    if get_qdtype(qdtype).packed and k % 2:
        k += 1  # packed codes hold two per byte along the last axis
    axis = 1 if granularity == "per_block" else -1
    x = _data(seed, (b, s, k), spread)
    scale, zp = dynamic_qparams(x, qdtype=qdtype, granularity=granularity, symmetric=sym, axis=axis,
                                block_size=block)
    layout = dynamic_layout(x.shape, granularity, axis, block)
    zp_arg = None if sym else zp
    _check_bound(x, _round_trip(x, scale, zp_arg, qdtype, layout), scale, zp_arg, qdtype, layout)


LINEAR_IR = """graph main(%x: f32[1,s0,{k}]) {{
  symbol s0 in [2, 64] hint 4
  param @model.layers.0.mlp.down_proj.weight: f32[{n},{k}]
  %y: f32[1,s0,{n}] = linear(%x, @model.layers.0.mlp.down_proj.weight)  # model.layers.0.mlp.down_proj
  return %y
}}
"""


@settings(max_examples=25, deadline=None)
@given(SCHEMES, st.sampled_from([None, 4, 8, 16, 48]), st.integers(1, 6), st.integers(1, 4), st.floats(0.0, 2.0),
       st.integers(0, 2**31 - 1))
def test_quantize_pass_keeps_2_4_zeros_and_the_half_step_bound(scheme, group, n, k16, spread, seed):
    """``sparsify(method=magnitude,pattern=2:4)`` then the ``quantize`` pass, on one block linear of random shape:
    the weight the graph dequantizes keeps every pruned zero exactly (so the 2:4 pattern survives) and every kept
    weight is within half a step of its group's stored scale (fp8: half an ulp), ``group_fallback``'s groups too."""
    from lowbit.ir.ops import resolve
    from lowbit.ir.parser import parse_graph
    from lowbit.passes.manager import PassManager

    qdtype, sym = scheme
    k = 16 * k16
    name = "model.layers.0.mlp.down_proj.weight"
    graph = parse_graph(LINEAR_IR.format(n=n, k=k), {name: _data(seed, (n, k), spread)})
    PassManager("sparsify(method=magnitude,pattern=2:4)").run(graph)
    w = graph.params[name].data.clone()
    assert int((w.reshape(-1, 4) != 0).sum(1).max()) <= 2
    fallback = ",group_fallback=16" if group and k % group else ""  # group 48 where it divides K, 16 elsewhere
    PassManager(f"quantize(w={qdtype},sym={str(sym).lower()}{f',group={group}' if group else ''}{fallback})").run(graph)
    (dq,) = graph.find("dequantize")
    operands = [a.data if hasattr(a, "data") else a for a in dq.args]
    back = resolve("dequantize")(*operands, **dq.kwargs)
    assert torch.equal(back[w == 0], torch.zeros(int((w == 0).sum()))), f"{qdtype} sym={sym} group={group}"
    layout = Layout(dq.kwargs["axis"], dq.kwargs["block_size"])
    _check_bound(w, back, operands[1], operands[2], qdtype, layout)


@settings(max_examples=30, deadline=None)
@given(st.sampled_from([2, 4, 8]), st.integers(1, 2), st.integers(1, 3), st.integers(1, 4), st.sampled_from([4, 8, 16]),
       st.sampled_from([1, 2, 4, 8]), st.floats(0.0, 2.0), st.integers(0, 2**31 - 1))
def test_kv_cache_codes_pack_losslessly_and_round_trip_within_half_a_step(bits, b, h, blocks, d, block, spread,
                                                                          seed):
    """The ``kv-cache`` pass's stored form (``lowbit.ir.kvcache``: ``8 / bits`` unsigned codes per byte, keys per
    channel over ``block`` tokens, values per token in groups of channels): packing is lossless for every code, and
    keys and values come back within half a step of their block's / group's scale."""
    from lowbit.ir.kvcache import (dequantize_keys, dequantize_values, pack_codes, quantize_keys, quantize_values,
                                   unpack_codes)

    g = torch.Generator().manual_seed(seed)
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    codes = torch.randint(lo, hi + 1, (b, h, blocks * block, d), generator=g)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape[-1] == d * bits // 8
    assert torch.equal(unpack_codes(packed, bits), codes - lo)
    x = _data(seed, (b, h, blocks * block, d), spread)
    kq, ks, kz = quantize_keys(x, bits, block)
    err = (dequantize_keys(kq, ks, kz, bits) - x).abs()
    step = ks.repeat_interleave(block, 2)
    assert (err <= 0.5 * step + 8 * F32_EPS * (x.abs() + (1 << bits) * step)).all(), (bits, block)
    group = min(block, d)
    vq, vs, vz = quantize_values(x, bits, group)
    err = (dequantize_values(vq, vs, vz, bits) - x).abs()
    step = vs.repeat_interleave(group, -1)
    assert (err <= 0.5 * step + 8 * F32_EPS * (x.abs() + (1 << bits) * step)).all(), (bits, group)
