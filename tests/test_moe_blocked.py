"""The expert-blocked MoE ops (``lowbit.kernels.moe_blocked``: ``moe_route``, ``moe_gate_up_blocked``,
``moe_down_blocked``, one program per (expert, block of its rows, column block)) against their plain-torch
references: bf16 weights and int4/uint4/int8 words (N- and K-major, per group and per channel, with zero points),
T = 1, 5 and 20 tokens (20: an expert's rows in two blocks of 16), top-1 and top-2, with an expert no token picked
and one every token picked."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="lowbit's kernels need triton")
from lowbit.kernels.moe_blocked import (  # noqa: E402 - registers the ops
    moe_down_blocked_ref,
    moe_gate_up_blocked_ref,
    moe_route_ref,
)
from lowbit.kernels.moe_gemv import moe_down_ref, moe_gate_up_ref  # noqa: E402
from test_moe_gemv import CASES, DEV, E, H, I, _close, _weights, down_slack, gate_up_slack  # noqa: E402
from test_moe_gemv import pytestmark as gemv_marks  # noqa: E402

pytestmark = gemv_marks

NOBODY, EVERYONE = 0, 1
"""The expert no token picks and the one every token picks (top-2: with one of experts 2..E-1)."""


def _routing(tokens: int, top_k: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(picked [T, E], dense router weights [T, E])``: every token on expert ``EVERYONE`` (and top-2: a random one
    of the others but ``NOBODY``)."""
    g = torch.Generator().manual_seed(tokens * 10 + top_k)
    ids = torch.full((tokens, top_k), EVERYONE)
    if top_k == 2:
        ids[:, 0] = torch.randint(2, E, (tokens,), generator=g)
    weights = torch.rand(tokens, top_k, generator=g) + 0.1
    dense = torch.zeros(tokens, E).scatter(1, ids, weights / weights.sum(1, keepdim=True)).to(dtype)
    return (dense != 0).to(DEV), dense.to(DEV)


def _by_expert(h: torch.Tensor, picked: torch.Tensor) -> torch.Tensor:
    """``[T, slots, I]`` -> ``[T, E, I]`` where every token fills its slots: a token's j-th expert (in order) from
    its slot j, 0 where unpicked (``down_slack`` reads the rows by expert)."""
    out = h.new_zeros((h.shape[0], picked.shape[1], h.shape[2]))
    out[picked] = h.flatten(0, 1)
    return out


def test_moe_route_lists_each_experts_tokens_and_each_picks_slot():
    """Per expert its tokens ascending (``counts`` of them) and per pick its rank among its token's picks, as the
    reference's stable argsort and cumulative sum; over 150 tokens (three of the kernel's 64-token steps), 6
    experts, random picks of 0 to 3 a token (a token with none, an expert with none)."""
    g = torch.Generator().manual_seed(0)
    picked = torch.rand(150, 6, generator=g) < 0.3
    picked[:, 4] = False
    picked[7] = False
    order, counts, slot = torch.ops.lowbit.moe_route(picked.to(DEV))
    ref_order, ref_counts, ref_slot = moe_route_ref(picked)
    assert torch.equal(counts.cpu(), ref_counts) and counts[4] == 0
    for e in range(6):
        assert torch.equal(order[e, :counts[e]].cpu(), ref_order[e, :counts[e]])
    assert torch.equal(slot.cpu()[picked], ref_slot[picked])


@pytest.mark.parametrize("case", CASES,
                         ids=["bf16", "int4-g32", "int4-channel-kmajor", "uint4-g64", "uint4-channel", "int8-g32"])
@pytest.mark.parametrize(("tokens", "top_k"), [(1, 2), (5, 1), (20, 2)])
def test_moe_blocked_ops_match_their_references(case, tokens, top_k):
    """Each op equals its reference on the filled slots (every token fills its top-k) within ``test_moe_gemv._close``
    (float32 accumulation order only: ``tl.dot``'s tiles sum in another order than the reference's matmul, and the
    rounding chains' slack); the down op reads the filled slots only (the rest NaN here)."""
    qdtype, group = case[0], case[1]
    dtype = torch.float16 if qdtype == "uint4" else torch.bfloat16
    picked, dense = _routing(tokens, top_k, torch.float32 if qdtype == "uint4" else dtype)
    x = torch.randn(tokens, H, generator=torch.Generator().manual_seed(tokens)).to(dtype).to(DEV)
    interleave = bool(qdtype)
    slots = top_k
    route = torch.ops.lowbit.moe_route(picked)
    gate_up = _weights(case, 2 * I, H, dtype, interleave)
    h = torch.ops.lowbit.moe_gate_up_blocked(x, *route, *gate_up, qdtype, group, "silu*up", interleave, slots)
    ref_h = moe_gate_up_blocked_ref(x.cpu(), picked.cpu(), *(t if t is None else t.cpu() for t in gate_up), qdtype,
                                    group, "silu*up", interleave, slots)
    assert h.shape == (tokens, slots, I) and h.dtype == dtype
    picked_cpu, cpu = picked.cpu(), [t if t is None else t.cpu() for t in gate_up]
    assert (picked_cpu.sum(1) == slots).all()
    slack = gate_up_slack(x.cpu(), *cpu, qdtype, group, "silu*up", interleave)[picked_cpu]
    _close(h.cpu().flatten(0, 1), ref_h.flatten(0, 1), slack)  # (slot order is expert order)
    down = _weights(case, H, I, dtype, False)
    y = torch.ops.lowbit.moe_down_blocked(h, picked, dense, *route, *down, qdtype, group, dtype)
    cpu = [t if t is None else t.cpu() for t in down]
    ref_y = moe_down_blocked_ref(h.cpu(), picked_cpu, dense.cpu(), *cpu, qdtype, group, dtype)
    assert y.shape == (tokens, H) and y.dtype == dtype and torch.isfinite(y).all()
    _close(y.cpu(), ref_y, down_slack(_by_expert(h.cpu(), picked_cpu), picked_cpu, dense.cpu(), *cpu, qdtype, group,
                                      dtype))


def test_moe_down_blocked_adds_the_slots_in_expert_order_with_the_dense_forms_roundings():
    """Every token on all E experts, identity-like down weights (exact products): only the chain's roundings remain,
    so the op's bits equal the reference's (each term rounded, added in expert order, each sum rounded), which
    differ from a sum rounded once (what an op summing in float32 would give)."""
    dtype, tokens = torch.bfloat16, 20
    picked = torch.ones(tokens, E, dtype=torch.bool, device=DEV)
    dense = (torch.tensor([0.3, 0.7, 0.11, 0.9]) * (1 + torch.arange(tokens)[:, None] / 40)).to(DEV)
    w = torch.eye(H, I).repeat(E, 1, 1).to(dtype).to(DEV)
    h = (1 + torch.arange(I, dtype=torch.float32) / 7).to(dtype).repeat(tokens, E, 1).to(DEV)
    route = torch.ops.lowbit.moe_route(picked)
    y = torch.ops.lowbit.moe_down_blocked(h, picked, dense, *route, w, None, None, "", 0, dtype)
    assert torch.equal(y.cpu(), moe_down_blocked_ref(h.cpu(), picked.cpu(), dense.cpu(), w.cpu(), None, None, "", 0,
                                                     dtype))
    once = (h[:, :, :H].float() * dense[:, :, None]).sum(1).to(dtype)
    assert not torch.equal(y, once)


_AOT_BLOCKED = """
import json
import torch
from lowbit.kernels import moe_blocked
from lowbit.kernels.moe_gemv import stack_experts
from lowbit.kernels.weight_only import pack_words
from conftest import quantized_weight
from sm90_ptx import ptx_ops, record_launches

seen = record_launches([moe_blocked])
moe_blocked.interpreting = lambda: False  # the GPU's tiles and bf16 dots
out = []
CASES = (("", 0, True, 512, 20), ("", 0, True, 512, 2048), ("int4", 128, False, 512, 20),
         ("int4", 128, False, 512, 2048), ("int4", 32, True, 64, 20), ("int4", 0, True, 512, 20))
for qdtype, group, symmetric, k, rows in CASES:
    def stacked(n, k):
        if not qdtype:
            return torch.randn(4, n, k).to(torch.bfloat16), None, None
        parts = [pack_words(*quantized_weight(n, k, qdtype, group, symmetric), qdtype, group) for _ in range(4)]
        return tuple(None if parts[0][i] is None else stack_experts([p[i] for p in parts]) for i in range(3))
    dense = torch.tensor([[0.0, 0.7, 0.0, 0.3]]).repeat(rows, 1)
    seen.clear()
    route = moe_blocked.moe_route(dense != 0)  # (recorded, not run: empty route tensors of the right shapes)
    moe_blocked.moe_gate_up_blocked(torch.randn(rows, k).to(torch.bfloat16), *route, *stacked(1024, k), qdtype, group,
                                    "silu*up", bool(qdtype), 2)
    moe_blocked.moe_down_blocked(torch.randn(rows, 2, k).to(torch.bfloat16), dense != 0, dense, *route,
                                 *stacked(512, k), qdtype, group, torch.bfloat16)
    built = [ptx_ops(*s, listed=("st.global", "mma")) for s in seen]
    out.append([(o["kernel"], "mma" in o["ops"], s[2].get("BLOCK_M"), s[2].get("BLOCK_N"))
                for o, s in zip(built, seen)])
print(json.dumps(out))
"""


def test_moe_blocked_kernels_build_for_sm90():
    """The route, gate/up, down and slot-sum kernels build for sm_90 (``sm90_ptx``: Triton's bundled ptxas, no GPU)
    at the GPU's tiles and bf16 dots (the interpreter runs fp32 ones): a decode batch's (20 rows: 16 x 16) and a
    prefill's (2048 rows: 64 x 64) on float weights and int4 words with zero points per group of 128 (chunks of 32
    words), int4 words in chunks of 8 (K = 64: two code positions a dot) and symmetric int4 per channel (one
    partial for all of K); the dots as tensor-core ``mma``."""
    import sm90_ptx

    built = sm90_ptx.run(_AOT_BLOCKED)
    tiles = {20: (16, 16), 2048: (64, 64)}
    for case, rows in zip(built, (20, 2048, 20, 2048, 20, 20), strict=True):
        bm, bn = tiles[rows]
        assert case == [["_moe_route", False, None, None], ["_moe_gate_up_blocked", True, bm, bn],
                        ["_moe_down_blocked", True, bm, bn], ["_moe_slot_sum", False, None, bn]], (rows, case)


def test_blocked_ops_refuse_what_their_dots_cannot_take():
    """``blocked_unsupported``: int4 words in chunks of 8 (K = 64) take two code positions a dot, so groups of 8
    (a group per position) are refused and groups of 16 or 32 taken; a float weight of another dtype than the rows
    is refused (one dtype a dot); the ops raise the reason."""
    from lowbit.kernels.moe_blocked import blocked_unsupported

    words = torch.zeros(E, 8, 8, dtype=torch.int32)
    assert "groups of 8" in blocked_unsupported(words, "int4", 8, 64, torch.bfloat16)
    assert blocked_unsupported(words, "int4", 16, 64, torch.bfloat16) is None
    assert blocked_unsupported(words, "int4", 32, 64, torch.bfloat16) is None
    weight = torch.zeros(E, 2 * I, H, dtype=torch.bfloat16)
    assert "one dot dtype" in blocked_unsupported(weight, "", 0, H, torch.float16)
    picked = torch.ones(3, E, dtype=torch.bool)
    with pytest.raises(ValueError, match="one dot dtype"):
        torch.ops.lowbit.moe_gate_up_blocked(torch.zeros(3, H, dtype=torch.float16), *moe_route_ref(picked), weight,
                                             None, None, "", 0, "silu*up", False, 2)


@pytest.mark.parametrize("group", [0, 64], ids=["channel", "g64"])
def test_unsigned_words_without_zero_points_match_their_references(group):
    """uint4 words given no zero points (z = 0: the one scheme whose word kernels subtract no zero-point share,
    ``HAS_Z`` off) through the blocked and the per-row ops, each within ``_close`` of its reference (which reads
    the codes as ``s * q``); a kernel that read zero points anyway would take the scales for them."""
    dtype, tokens, top_k = torch.bfloat16, 5, 2  # (codes 0..15 without a zero point: sums past fp16's range)
    picked, dense = _routing(tokens, top_k, torch.float32)
    x = torch.randn(tokens, H, generator=torch.Generator().manual_seed(3)).to(dtype).to(DEV)
    gate_up = (*_weights(("uint4", group, False, True), 2 * I, H, dtype, True)[:2], None)
    down = (*_weights(("uint4", group, False, False), H, I, dtype, False)[:2], None)
    route = torch.ops.lowbit.moe_route(picked)
    p, r, xc = picked.cpu(), dense.cpu(), x.cpu()
    w_up, w_down = ([t if t is None else t.cpu() for t in ws] for ws in (gate_up, down))
    up_slack = gate_up_slack(xc, *w_up, "uint4", group, "silu*up", True)
    h = torch.ops.lowbit.moe_gate_up_blocked(x, *route, *gate_up, "uint4", group, "silu*up", True, top_k).cpu()
    ref_h = moe_gate_up_blocked_ref(xc, p, *w_up, "uint4", group, "silu*up", True, top_k)
    _close(h.flatten(0, 1), ref_h.flatten(0, 1), up_slack[p])  # (every token fills both slots)
    y = torch.ops.lowbit.moe_down_blocked(h.to(DEV), picked, dense, *route, *down, "uint4", group, dtype)
    ref_y = moe_down_blocked_ref(h, p, r, *w_down, "uint4", group, dtype)
    _close(y.cpu(), ref_y, down_slack(_by_expert(h, p), p, r, *w_down, "uint4", group, dtype))
    h = torch.ops.lowbit.moe_gate_up(x, picked, *gate_up, "uint4", group, "silu*up", True).cpu()
    _close(h[p], moe_gate_up_ref(xc, p, *w_up, "uint4", group, "silu*up", True)[p], up_slack[p])
    h = torch.where(p[:, :, None], h, 0.0)
    y = torch.ops.lowbit.moe_down(h.to(DEV), picked, dense, *down, "uint4", group, dtype)
    _close(y.cpu(), moe_down_ref(h, p, r, *w_down, "uint4", group, dtype),
           down_slack(h, p, r, *w_down, "uint4", group, dtype))
