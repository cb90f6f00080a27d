"""Property tests of the expert-blocked MoE ops (``lowbit.kernels.moe_blocked``) against their plain-torch
references, over drawn shapes, weight schemes, routings and tiles: ``tests/test_moe_blocked.py``'s fixed cases
missed a configuration that was wrong on the GPU (asymmetric words in chunks of 8 words, two code positions a dot,
K = 64: 1.6-2x off), so here hypothesis draws what a layer can hand the ops:

- tokens T 1..40, experts E 2..9, top-k 1..min(3, E), slots the top-k or one more;
- routings with an expert no token picks, one every token picks, tokens with fewer picks than top-k (none too);
- bf16/fp16 float weights (any K), int4/uint4/int8/uint8 words (K a multiple of 64 that ``chunk_words`` takes:
  chunks of 8 (U = 2 code positions a dot, K = 64, 192, 320), 16 and 32 words, 1 to 5 chunks), groups of 16, 32,
  64, 128 or per channel, symmetric or with zero points, N- or K-major words, scales in float32 or the rows' dtype;
- rows of x and h at their widths' strides or views of wider buffers (NaN past the width);
- interleaved (gate, up) rows or halves, silu/gelu/gelu_tanh, the down op's output in the rows' dtype or float32,
  router weights in float32 or the rows' dtype;
- the tiles: the interpreter's (16 rows x 128 columns) or the GPU's (``BLOCK_M`` 16/64, ``BLOCK_N`` 16..128),
  patched in so the GPU's row and column masks run here too.

The default suite runs a few examples (and the configurations that failed before, as ``@example``); the ``slow``
variant runs many more (``LOWBIT_SLOW=1``; ``LOWBIT_MOE_PROP_EXAMPLES`` sets how many), and the per-row grouped
ops (``moe_gemv``: the same references) on half as many calls of up to 16 tokens."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from unittest import mock

import pytest
import torch
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from conftest import quantized_weight

pytest.importorskip("triton", reason="lowbit's kernels need triton")
from lowbit.kernels import moe_blocked, moe_gemv  # noqa: E402 - registers the ops
from lowbit.kernels.moe_blocked import (  # noqa: E402
    blocked_unsupported,
    moe_down_blocked_ref,
    moe_gate_up_blocked_ref,
    moe_route_ref,
)
from lowbit.kernels.moe_gemv import moe_down_ref, moe_gate_up_ref, stack_experts  # noqa: E402
from lowbit.kernels.weight_only import chunk_words, interleave_rows, pack_words  # noqa: E402
from test_moe_gemv import DEV, _close, down_slack, gate_up_slack  # noqa: E402
from test_moe_gemv import pytestmark as gemv_marks  # noqa: E402

pytestmark = gemv_marks

WORD_QDTYPES = {"int4": 4, "uint4": 4, "int8": 8, "uint8": 8}
FLOAT_KINDS = {"bf16": torch.bfloat16, "fp16": torch.float16}
WORD_KS = (64, 128, 192, 256, 320, 384)
"""Input sizes drawn for words: 4-bit codes in chunks of 8 (64, 192, 320: K not a multiple of 128), 16 (128,
384) and 32 words (256); 8-bit codes in chunks of 16 and 32 words."""
COLUMN_TILES = (16, 32, 64, 128) if DEV == "cpu" else (16, 32, 64)
"""``BLOCK_N`` drawn for the blocked ops: the GPU's (``_block_n``: 16..64) and, under the interpreter, its 128."""
DEFAULT_EXAMPLES = 10
SLOW_EXAMPLES = int(os.environ.get("LOWBIT_MOE_PROP_EXAMPLES", "400"))


@dataclass(frozen=True)
class Case:
    """One drawn call of the two blocked ops (``picks``: each token's experts; ``seed``: the tensors' values)."""

    qdtype: str  # "" for a float weight
    dtype: torch.dtype  # the rows' (and a float weight's)
    group: int
    symmetric: bool
    n_major: bool
    scale_in_rows_dtype: bool
    hidden: int
    inner: int
    experts: int
    slots: int
    picks: tuple[tuple[int, ...], ...]
    interleaved: bool
    epilogue: str
    out_dtype: torch.dtype
    router_dtype: torch.dtype
    tiles: tuple[int, int] | None  # (BLOCK_M, BLOCK_N) patched in; None: the interpreter's
    seed: int
    padded: bool = False  # x and h views of wider buffers (row strides past their widths)


def _word_ks(bits: int, group: int) -> list[int]:
    """The drawn input sizes that words of ``bits`` per group take, blocked ops included."""
    return [k for k in WORD_KS if (group == 0 or k % group == 0) and chunk_words(k, group, bits)
            and (chunk_words(k, group, bits) >= 16 or group % 16 == 0)]


@st.composite
def routings(draw, tokens: int, experts: int, top_k: int) -> tuple[tuple[int, ...], ...]:
    """Each token's picked experts (at most ``top_k``, maybe none): maybe one expert no token picks and one
    every token picks, the rest drawn per token; mostly a full top-k, as a router gives."""
    nobody = draw(st.none() | st.integers(0, experts - 1))
    everyone = draw(st.none() | st.integers(0, experts - 1).filter(lambda e: e != nobody))
    others = [e for e in range(experts) if e not in (nobody, everyone)]
    forced = () if everyone is None else (everyone,)
    free = top_k - len(forced)
    picks = []
    for _ in range(tokens):
        if draw(st.integers(0, 3)) and len(others) >= free:  # (3 in 4: a full top-k)
            chosen = draw(st.permutations(others))[:free]
        else:
            chosen = sorted(draw(st.sets(st.sampled_from(others), max_size=free))) if others else []
        picks.append(tuple(sorted((*forced, *chosen))))
    return tuple(picks)


@st.composite
def cases(draw, max_tokens: int = 40, max_k: int = 384) -> Case:
    """A call the blocked ops take (the module docstring's list); ``max_tokens`` / ``max_k`` bound its cost."""
    kind = draw(st.sampled_from([*FLOAT_KINDS, *WORD_QDTYPES]))
    qdtype = "" if kind in FLOAT_KINDS else kind
    dtype = FLOAT_KINDS[kind] if not qdtype else draw(st.sampled_from([torch.bfloat16, torch.float16]))
    group, symmetric, n_major = 0, True, False
    if qdtype:
        group = draw(st.sampled_from([0, 16, 32, 64, 128]))
        symmetric = draw(st.booleans()) if qdtype in ("int4", "int8") else False
        n_major = draw(st.booleans())
        ks = [k for k in _word_ks(WORD_QDTYPES[qdtype], group) if k <= max_k]
        hidden, inner = draw(st.sampled_from(ks)), draw(st.sampled_from(ks))
    else:
        hidden, inner = draw(st.integers(8, 160)), draw(st.integers(8, 160))
    experts = draw(st.integers(2, 9))
    top_k = draw(st.integers(1, min(3, experts)))
    tokens = draw(st.integers(1, max_tokens))
    tiles = draw(st.none() | st.tuples(st.sampled_from([16, 64]), st.sampled_from(COLUMN_TILES)))
    return Case(qdtype, dtype, group, symmetric, n_major, draw(st.booleans()), hidden, inner, experts,
                top_k + draw(st.integers(0, 1)), draw(routings(tokens, experts, top_k)), draw(st.booleans()),
                draw(st.sampled_from(["silu*up", "gelu*up", "gelu_tanh*up"])),
                draw(st.sampled_from([dtype, torch.float32])), draw(st.sampled_from([dtype, torch.float32])), tiles,
                draw(st.integers(0, 2**16)), draw(st.booleans()))


def _stacked(case: Case, n: int, k: int, interleave: bool) -> tuple[torch.Tensor, torch.Tensor | None,
                                                                     torch.Tensor | None]:
    """Every expert's weight ``[n, k]`` as the triton backend leaves it (``pack_words``, gate/up rows interleaved
    where asked), stacked with each expert's strides; a float weight as random rows of the rows' dtype."""
    g = torch.Generator().manual_seed(case.seed + n + k)
    if not case.qdtype:
        return (torch.randn(case.experts, n, k, generator=g) / k ** 0.5).to(case.dtype).to(DEV), None, None
    parts = []
    with torch.random.fork_rng():
        torch.manual_seed(case.seed + n + k)
        for _ in range(case.experts):
            q, s, z = quantized_weight(n, k, case.qdtype, case.group, case.symmetric)
            if case.scale_in_rows_dtype:
                s = s.to(case.dtype)
            if interleave:
                q, s, z = interleave_rows(q), interleave_rows(s), interleave_rows(z)
            parts.append(pack_words(q, s, z, case.qdtype, case.group, n_major=case.n_major))
    words, scale, zero = (None if parts[0][i] is None else stack_experts([p[i].to(DEV) for p in parts])
                          for i in range(3))
    assert words is not None and words.dtype == torch.int32 and scale is not None
    return words, scale, zero


def _router(case: Case) -> tuple[torch.Tensor, torch.Tensor]:
    """``(picked [T, E], dense router weights [T, E])``: positive weights at the picks, each token's summing to 1."""
    tokens = len(case.picks)
    picked = torch.zeros(tokens, case.experts, dtype=torch.bool)
    for t, experts in enumerate(case.picks):
        picked[t, list(experts)] = True
    w = torch.rand(tokens, case.experts, generator=torch.Generator().manual_seed(case.seed)) + 0.1
    w = torch.where(picked, w, 0.0)
    dense = (w / w.sum(1, keepdim=True).clamp_min(1e-6)).to(case.router_dtype)
    return picked.to(DEV), dense.to(DEV)


def _tiles_patched(tiles: tuple[int, int] | None):
    """The ops' tile choice replaced by ``tiles`` (the GPU's sizes under the interpreter), or left as it is."""
    if tiles is None:
        return contextlib.nullcontext()
    return mock.patch.multiple(moe_blocked, _block_m=lambda rows: tiles[0],
                               _block_n=lambda n, rows, slots, experts, block_m: tiles[1])


def _by_slot(by_expert: torch.Tensor, picked: torch.Tensor, slots: int) -> torch.Tensor:
    """``[T, E, ...]`` -> ``[T, slots, ...]``: each pick's row at its slot (``moe_route``'s), 0 elsewhere."""
    out = by_expert.new_zeros((by_expert.shape[0], slots, *by_expert.shape[2:]))
    tokens, experts = torch.nonzero(picked, as_tuple=True)
    out[tokens, moe_route_ref(picked)[2][picked].long()] = by_expert[tokens, experts]
    return out


def _by_expert(by_slot: torch.Tensor, picked: torch.Tensor) -> torch.Tensor:
    """``[T, slots, ...]`` -> ``[T, E, ...]``: each expert's row from its pick's slot (an unpicked one's: any)."""
    slot = moe_route_ref(picked)[2].long().clamp(max=by_slot.shape[1] - 1)
    return by_slot[torch.arange(by_slot.shape[0])[:, None], slot]


def _count(case: Case) -> None:
    """Hypothesis events of a draw's scheme, chunk sizes and tiles (``--hypothesis-show-statistics`` counts them)."""
    for k in (case.hidden, case.inner):
        words = chunk_words(k, case.group, WORD_QDTYPES[case.qdtype]) if case.qdtype else 0
        event(f"{case.qdtype or 'float'} K in chunks of {words} words" if words else "float K")
    event(f"{'asymmetric' if case.qdtype and not case.symmetric else 'symmetric or float'}, tiles {case.tiles}")


def check_case(case: Case) -> None:
    """Both ops against their references on the filled slots within ``test_moe_gemv._close`` (with its rounding
    chains' slack), the down op reading only the filled slots (the rest NaN)."""
    picked, dense = _router(case)
    tokens = picked.shape[0]
    x = torch.randn(tokens, case.hidden, generator=torch.Generator().manual_seed(case.seed + 1)).to(case.dtype)
    x = x.to(DEV)
    if case.padded:
        x = torch.cat([x, torch.full_like(x[:, :3], float("nan"))], 1)[:, :case.hidden]
    gate_up = _stacked(case, 2 * case.inner, case.hidden, case.interleaved)
    down = _stacked(case, case.hidden, case.inner, False)
    with _tiles_patched(case.tiles):
        route = torch.ops.lowbit.moe_route(picked)
        h = torch.ops.lowbit.moe_gate_up_blocked(x, *route, *gate_up, case.qdtype, case.group, case.epilogue,
                                                 case.interleaved, case.slots)
        filled = (torch.arange(case.slots)[None, :] < picked.cpu().sum(1, keepdim=True)).to(DEV)
        h_read = torch.where(filled[:, :, None], h, float("nan"))
        if case.padded:
            h_read = torch.cat([h_read, torch.full_like(h_read[:, :, :5], float("nan"))], 2)[:, :, :case.inner]
        y = torch.ops.lowbit.moe_down_blocked(h_read, picked, dense, *route, *down, case.qdtype, case.group,
                                              case.out_dtype)
    cpu = [t if t is None else t.cpu() for t in (*gate_up, *down)]
    ref_h = moe_gate_up_blocked_ref(x.cpu(), picked.cpu(), *cpu[:3], case.qdtype, case.group, case.epilogue,
                                    case.interleaved, case.slots)
    assert h.shape == (tokens, case.slots, case.inner) and h.dtype == case.dtype
    at = filled.cpu()
    picked, dense = picked.cpu(), dense.cpu()
    slack = _by_slot(gate_up_slack(x.cpu(), *cpu[:3], case.qdtype, case.group, case.epilogue, case.interleaved),
                     picked, case.slots)
    _close(h.cpu()[at], ref_h[at], slack[at])
    h_filled = torch.where(filled[:, :, None], h, 0.0).cpu()
    ref_y = moe_down_blocked_ref(h_filled, picked, dense, *cpu[3:], case.qdtype, case.group, case.out_dtype)
    assert y.shape == (tokens, case.hidden) and y.dtype == case.out_dtype and torch.isfinite(y).all()
    slack = down_slack(_by_expert(h_filled, picked), picked, dense, *cpu[3:], case.qdtype, case.group, case.out_dtype)
    _close(y.cpu(), ref_y, slack)


GEMV_COLUMNS = {16: 4, 32: 8, 64: 16, 128: 128}
"""A drawn ``BLOCK_N`` of the blocked ops -> the per-row ops' (the GPU's 4..16, the interpreter's 128)."""


def check_grouped_case(case: Case) -> None:
    """The per-row grouped ops (``moe_gate_up`` / ``moe_down``: one program per (token, expert), the backend's
    decode path) on the same drawn call: their references share the blocked ones', and so do the bounds."""
    picked, dense = _router(case)
    x = torch.randn(len(case.picks), case.hidden, generator=torch.Generator().manual_seed(case.seed + 1))
    x = x.to(case.dtype).to(DEV)
    gate_up = _stacked(case, 2 * case.inner, case.hidden, case.interleaved)
    down = _stacked(case, case.hidden, case.inner, False)
    columns = contextlib.nullcontext() if case.tiles is None else mock.patch.object(
        moe_gemv, "_block_n", lambda n, rows: GEMV_COLUMNS[case.tiles[1]])
    with columns:
        h = torch.ops.lowbit.moe_gate_up(x, picked, *gate_up, case.qdtype, case.group, case.epilogue,
                                         case.interleaved)
        h_read = torch.where(picked[:, :, None], h, float("nan"))
        y = torch.ops.lowbit.moe_down(h_read, picked, dense, *down, case.qdtype, case.group, case.out_dtype)
    cpu = [t if t is None else t.cpu() for t in (*gate_up, *down)]
    picked, dense, h = picked.cpu(), dense.cpu(), h.cpu()
    ref_h = moe_gate_up_ref(x.cpu(), picked, *cpu[:3], case.qdtype, case.group, case.epilogue, case.interleaved)
    slack = gate_up_slack(x.cpu(), *cpu[:3], case.qdtype, case.group, case.epilogue, case.interleaved)
    _close(h[picked], ref_h[picked], slack[picked])
    h0 = torch.where(picked[:, :, None], h, 0.0)
    ref_y = moe_down_ref(h0, picked, dense, *cpu[3:], case.qdtype, case.group, case.out_dtype)
    assert y.dtype == case.out_dtype and torch.isfinite(y).all()
    _close(y.cpu(), ref_y, down_slack(h0, picked, dense, *cpu[3:], case.qdtype, case.group, case.out_dtype))


LEAD_GPU_MISS = [
    Case("uint4", torch.bfloat16, 64, False, n_major, False, 64, 64, 4, 2, ((0, 1), (1, 3), (1,), ()) * 5, True,
         "silu*up", torch.bfloat16, torch.float32, (16, 64), 7)
    for n_major in (True, False)
] + [Case("int4", torch.float16, 0, False, False, True, 192, 320, 3, 2, ((0, 2),) * 9, True, "silu*up",
          torch.float32, torch.float16, None, 3)]
"""Asymmetric words in chunks of 8 words (U = 2), K = 64 per group of 64 (session 55's GPU failure), and per
channel at K = 192 / 320 (three and five chunks)."""


GROUP_SPANS = [
    Case("uint4", torch.bfloat16, 96, False, True, False, 192, 192, 2, 2, ((0, 1), (1,), (0, 1)), False, "silu*up",
         torch.bfloat16, torch.float32, (64, 64), 11),
    Case("int8", torch.float16, 256, True, False, True, 256, 256, 3, 1, ((2,), (0,), (1,)), True, "gelu*up",
         torch.float32, torch.float16, (64, 32), 12),
]
"""Groups ``_word_dot`` scales apart from the drawn ones (powers of two up to a chunk): 96 K of 4-bit codes in
chunks of 8 words (64 K), a group straddling two chunks at an offset that changes by chunk (each dot its own
partial), and 256 K of 8-bit codes in chunks of 32 words (128 K), a group of two chunks (a partial a chunk); at the
GPU's 64-row tiles (x's row sums taken per dot)."""


CANCELLING_DOWN_SUM = Case("", torch.float16, 0, True, False, True, 128, 127, 5, 3, (
    (0, 1, 2), (0,), (0, 1, 2), (0, 1), (0, 1, 3), (0, 1, 2), (0,), (0,), (0, 1, 3), (0, 1, 2), (0, 1, 3), (0, 1, 2),
    (0, 1, 2), (0, 1, 3), (0, 1, 3), (0, 1, 2), (0, 1, 3), (0, 1, 3), (0, 1, 2), (0, 1, 3), (0, 1, 3), (0, 1, 2),
    (0, 1, 2), (0, 1, 3), (0, 1, 3), (0, 1, 2), (0, 1, 2)), True, "silu*up", torch.float16, torch.float16, None, 694)
"""The first slow run's failure under ``_close`` without its slack (token 19, column 66: the fp16 down output of
``_close``'s docstring): fp16 rows, down sums of three terms cancelling to an output 1/30 of its first term."""


def _with_examples(*explicit: Case):
    """Hypothesis's ``@example`` for each of ``explicit``: run first, whatever the draws."""
    def decorate(test):
        for case in explicit:
            test = example(case)(test)
        return test
    return decorate


@settings(max_examples=DEFAULT_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@_with_examples(*LEAD_GPU_MISS, *GROUP_SPANS)
@given(cases(max_tokens=40, max_k=256))
def test_blocked_ops_match_their_references_on_drawn_calls(case):
    """A few drawn calls (up to K = 256), ``LEAD_GPU_MISS`` and ``GROUP_SPANS``: both ops within ``_close``."""
    _count(case)
    check_case(case)


@pytest.mark.slow
@settings(max_examples=SLOW_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@_with_examples(*LEAD_GPU_MISS, CANCELLING_DOWN_SUM)
@given(cases())
def test_blocked_ops_match_their_references_on_many_drawn_calls(case):
    """``SLOW_EXAMPLES`` drawn calls (up to K = 384), ``LEAD_GPU_MISS`` and ``CANCELLING_DOWN_SUM``."""
    _count(case)
    check_case(case)


@pytest.mark.slow
@settings(max_examples=SLOW_EXAMPLES // 2, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@_with_examples(*LEAD_GPU_MISS)
@given(cases(max_tokens=16))
def test_grouped_ops_match_their_references_on_many_drawn_calls(case):
    """The per-row ops on ``SLOW_EXAMPLES / 2`` drawn calls of up to 16 tokens (the backend gives them at most 16)."""
    check_grouped_case(case)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 150), st.integers(1, 12), st.floats(0.0, 1.0), st.integers(0, 2**16))
def test_moe_route_equals_its_reference_on_drawn_picks(tokens, experts, density, seed):
    """``moe_route`` exactly as ``moe_route_ref`` where it writes: the counts, each expert's tokens in ascending
    order up to its count, each pick's slot; over 0..150 tokens (the kernel's 64-token steps), 1..12 experts (a
    power of two or not: the kernel's masked ``[64, E]`` tile)."""
    picked = torch.rand(tokens, experts, generator=torch.Generator().manual_seed(seed)) < density
    order, counts, slot = torch.ops.lowbit.moe_route(picked.to(DEV))
    ref_order, ref_counts, ref_slot = moe_route_ref(picked)
    assert order.shape == (experts, tokens) and slot.shape == (tokens, experts)
    assert torch.equal(counts.cpu(), ref_counts)
    for e in range(experts):
        assert torch.equal(order[e, :counts[e]].cpu(), ref_order[e, :counts[e]])
    assert torch.equal(slot.cpu()[picked], ref_slot[picked])


def _broken_calls(case: Case) -> dict[str, tuple[str, str, Callable[[], object]]]:
    """Per way to break one operand of a valid ``case``: ``(op, what its refusal names, the call)``."""
    picked, dense = _router(case)
    tokens = picked.shape[0]
    x = torch.randn(tokens, case.hidden).to(case.dtype).to(DEV)
    w, s, z = _stacked(case, 2 * case.inner, case.hidden, case.interleaved)
    route = moe_route_ref(picked)
    h = torch.randn(tokens, case.slots, case.inner).to(case.dtype).to(DEV)
    down = _stacked(case, case.hidden, case.inner, False)
    q, g = case.qdtype, case.group

    def gate_up(x=x, route=route, w=w, s=s, z=z, group=g):
        return lambda: torch.ops.lowbit.moe_gate_up_blocked(x, *route, w, s, z, q, group, case.epilogue,
                                                            case.interleaved, case.slots)

    def down_op(h=h, picked=picked, dense=dense, route=route, out_dtype=case.out_dtype):
        return lambda: torch.ops.lowbit.moe_down_blocked(h, picked, dense, *route, *down, q, g, out_dtype)

    calls = {
        "x float32": ("moe_gate_up_blocked", r"x \(", gate_up(x=x.float())),
        "x strided": ("moe_gate_up_blocked", r"x \(", gate_up(x=torch.cat([x, x], 1)[:, ::2])),
        "x other width": ("moe_gate_up_blocked", r"weight \(", gate_up(x=torch.cat([x, x], 1))),
        "route of fewer tokens": ("moe_gate_up_blocked", r"route \(", gate_up(route=moe_route_ref(picked[1:]))),
        "route int64": ("moe_down_blocked", r"route \(", down_op(route=[r.long() for r in route])),
        "h float32": ("moe_down_blocked", r"h \(", down_op(h=h.float())),
        "picked uint8": ("moe_down_blocked", r"picked \(", down_op(picked=picked.to(torch.uint8))),
        "router weights of fewer experts": ("moe_down_blocked", r"router weights \(", down_op(dense=dense[:, 1:])),
        "out_dtype int32": ("moe_down_blocked", "out_dtype torch.int32", down_op(out_dtype=torch.int32)),
    }
    if q:
        groups = s.shape[2] if s.dim() == 3 else 1
        calls["scales of one expert fewer"] = ("moe_gate_up_blocked", r"scale \(", gate_up(s=s[1:], z=None))
        calls["scales of one row fewer"] = ("moe_gate_up_blocked", r"scale \(", gate_up(s=s[:, 1:], z=None))
        if groups > 1:
            calls["another group size"] = ("moe_gate_up_blocked", r"weight \(", gate_up(group=2 * g))
        if z is not None and groups > 1:
            calls["zero points of one group"] = ("moe_gate_up_blocked", r"zero points \(", gate_up(z=z[..., :1]))
    else:
        calls["odd rows"] = ("moe_gate_up_blocked", "odd number of rows", gate_up(w=torch.cat([w, w[:, :1]], 1)))
        calls["K not contiguous"] = ("moe_gate_up_blocked", "K not contiguous",
                                     gate_up(w=w.transpose(1, 2).contiguous().transpose(1, 2)))
        other = torch.float16 if case.dtype == torch.bfloat16 else torch.bfloat16
        calls["weight of another dtype"] = ("moe_gate_up_blocked", "one dot dtype", gate_up(w=w.to(other)))
    return calls


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_blocked_ops_refuse_a_broken_operand_naming_op_and_shape(data):
    """A call with one operand the ops cannot take (another dtype, layout or shape) raises the kernels' error
    (``_common.check``): the op's name and the operand's shape or dtype. Scales or zero points of another shape
    and a float weight not K-contiguous or of an odd row count were read as they were (wrong outputs, no error)
    until session 56."""
    calls = _broken_calls(data.draw(cases(max_tokens=6, max_k=128)))
    op, names, call = calls[data.draw(st.sampled_from(sorted(calls)))]
    with pytest.raises(ValueError, match=rf"lowbit kernel {op}: .*{names}"):
        call()


def test_gate_up_refuses_chunks_of_8_words_with_groups_of_8():
    """K = 64 of int4 is one chunk of 8 words: a dot's 16 K lanes span two code positions, which groups of 8 would
    scale apart (``blocked_unsupported``); the refusal names the op, the weight's shape and why."""
    case = Case("int4", torch.bfloat16, 8, True, False, False, 64, 64, 3, 1, ((0,), (2,)), True, "silu*up",
                torch.bfloat16, torch.float32, None, 0)
    assert "groups of 8" in blocked_unsupported(_stacked(case, 128, 64, True)[0], "int4", 8, 64, torch.bfloat16)
    picked, _ = _router(case)
    with pytest.raises(ValueError, match=r"lowbit kernel moe_gate_up_blocked: weight \(3, 128, 8\), K=64: .*groups "
                                         r"of 8"):
        torch.ops.lowbit.moe_gate_up_blocked(torch.zeros(2, 64, dtype=torch.bfloat16, device=DEV),
                                             *moe_route_ref(picked), *_stacked(case, 128, 64, True), "int4", 8,
                                             "silu*up", True, 1)


def test_operands_the_kernels_misread_are_refused():
    """Minimized from the refusal property above (session 56): a float stack whose K is not contiguous (each
    expert's weight stored transposed: the kernels index rows at K stride 1), scales of another group size than
    the call's (group 64 read as 128: the second half's scales never read), and a gate/up stack of an odd row count
    were read as they were, giving wrong outputs without an error; now each op refuses them, naming itself and the
    operand's shape."""
    picked = torch.tensor([[True, False], [True, True]], device=DEV)
    x = torch.randn(2, 64).to(torch.bfloat16).to(DEV)
    route = moe_route_ref(picked)
    transposed = torch.randn(2, 64, 32).to(torch.bfloat16).transpose(1, 2).to(DEV)
    for op, args in (("moe_gate_up", (x, picked)), ("moe_gate_up_blocked", (x, *route))):
        tail = ("silu*up", False) + ((1,) if op.endswith("blocked") else ())
        with pytest.raises(ValueError, match=rf"kernel {op}: weight \(2, 32, 64\) .*strides \(2048, 1, 32\): K not"):
            getattr(torch.ops.lowbit, op)(*args, transposed, None, None, "", 0, *tail)
        with pytest.raises(ValueError, match=rf"kernel {op}: gate/up weight \(2, 33, 64\): an odd number of rows"):
            getattr(torch.ops.lowbit, op)(*args, torch.zeros(2, 33, 64, dtype=torch.bfloat16, device=DEV), None,
                                          None, "", 0, *tail)
    case = Case("uint4", torch.bfloat16, 64, False, False, False, 128, 32, 2, 2, ((0,), (0, 1)), False, "silu*up",
                torch.bfloat16, torch.float32, None, 0)
    words, scale, zero = _stacked(case, 64, 128, False)
    h = torch.randn(2, 2, 128).to(torch.bfloat16).to(DEV)
    dense = picked.float()
    with pytest.raises(ValueError, match=r"kernel moe_down: weight \(2, 64, 16\) torch.int32: scale \(2, 64, 2\), "
                                         r"not \(2, 64, 1\)"):
        torch.ops.lowbit.moe_down(h, picked, dense, words, scale, zero, "uint4", 128, torch.bfloat16)
    with pytest.raises(ValueError, match=r"kernel moe_down_blocked: weight \(2, 64, 16\) torch.int32: scale"):
        torch.ops.lowbit.moe_down_blocked(h, picked, dense, *route, words, scale, zero, "uint4", 128, torch.bfloat16)
    flat = torch.zeros(64, dtype=torch.bfloat16, device=DEV)  # not a stack: read its shape[1] raised IndexError
    for op, args in (("moe_down", (h, picked, dense)), ("moe_down_blocked", (h, picked, dense, *route))):
        with pytest.raises(ValueError, match=rf"kernel {op}: weight \(64,\): a stack \[experts, N, K or words\]"):
            getattr(torch.ops.lowbit, op)(*args, flat, None, None, "", 0, torch.bfloat16)
