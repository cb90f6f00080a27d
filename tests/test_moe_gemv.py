"""The grouped MoE decode ops (``lowbit.kernels.moe_gemv``: ``moe_gate_up`` / ``moe_down``, the experts of a routed
layer read through the router's picks on the device) against their plain-torch references: bf16/fp16 float weights
and int4/uint4 words (N- and K-major, per group and per channel), T = 1 and 5 tokens, top-1 and top-2 routing with a
token whose experts both sit in one half of the expert range."""

from __future__ import annotations

import os

import pytest
import torch

from conftest import quantized_weight

pytest.importorskip("triton", reason="lowbit's kernels need triton")
from lowbit.kernels._common import activation_ref  # noqa: E402
from lowbit.kernels.moe_gemv import (  # noqa: E402 - registers the ops
    _float_weights,
    moe_down_ref,
    moe_gate_up_ref,
    stack_experts,
)
INTERP = os.environ.get("TRITON_INTERPRET") == "1"
pytestmark = pytest.mark.skipif(not (INTERP or torch.cuda.is_available()), reason="needs CUDA or the interpreter")
DEV = "cuda" if torch.cuda.is_available() and not INTERP else "cpu"
E, H, I = 4, 64, 128


def _routing(tokens: int, top_k: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(picked [T, E], dense router weights [T, E])``: token 0 picks experts 2 and 3 (one half of the range) or 3
    alone, the others random distinct experts."""
    g = torch.Generator().manual_seed(tokens * 10 + top_k)
    ids = torch.stack([torch.randperm(E, generator=g)[:top_k] for _ in range(tokens)])
    ids[0] = torch.tensor([2, 3][-top_k:])
    weights = torch.rand(tokens, top_k, generator=g) + 0.1
    dense = torch.zeros(tokens, E).scatter(1, ids, weights / weights.sum(1, keepdim=True)).to(dtype)
    return (dense != 0).to(DEV), dense.to(DEV)


def _stacked(n: int, k: int, qdtype: str, group: int, symmetric: bool, n_major: bool, interleave: bool):
    """Every expert's weight as the triton backend leaves it (``pack_words``; gate/up rows interleaved for the
    weight-only gated epilogue), stacked with each expert's strides (``stack_experts``)."""
    from lowbit.kernels.weight_only import interleave_rows, pack_words

    torch.manual_seed(n + k + group)
    parts = []
    for _ in range(E):
        q, s, z = quantized_weight(n, k, qdtype, group, symmetric)
        if interleave:
            q, s, z = interleave_rows(q), interleave_rows(s), interleave_rows(z)
        parts.append(pack_words(q, s, z, qdtype, group, n_major=n_major))
    words, scale, zero = (None if parts[0][i] is None else stack_experts([p[i].to(DEV) for p in parts])
                          for i in range(3))
    assert words is not None and words.dtype == torch.int32 and scale is not None
    return words, scale, zero


CASES = [("", 0, True, True), ("int4", 32, True, True), ("int4", 0, True, False), ("uint4", 64, False, True),
         ("uint4", 0, False, False), ("int8", 32, True, True)]
"""(qdtype, group, symmetric, N-major): float; int4 words per group 32 / per channel; uint4 with zero points; int8
words (W8A16: four codes a word)."""


def _weights(case, n, k, dtype, interleave):
    qdtype, group, symmetric, n_major = case
    if not qdtype:
        g = torch.Generator().manual_seed(n * k)
        return (torch.randn(E, n, k, generator=g) / k ** 0.5).to(dtype).to(DEV), None, None
    return _stacked(n, k, qdtype, group, symmetric, n_major, interleave)


ACC_EPS = 2.0 ** -24
"""float32's unit roundoff: a K-term float32 dot summed in another order moves by at most ``K * ACC_EPS`` times the
sum of its terms' magnitudes."""


def _flip(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The most one rounding of ``v`` to ``dtype`` can land apart when its input moved across a rounding boundary:
    a step, at most ``eps * |v|``."""
    return torch.finfo(dtype).eps * v.abs()


def gate_up_slack(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None,
                  zero_point: torch.Tensor | None, qdtype: str, group: int, epilogue: str,
                  interleaved: bool) -> torch.Tensor:
    """``[T, E, I]`` for ``moe_gate_up_ref``'s arguments: how far the gated epilogue's chain ``h =
    round(round(act(round(g))) * round(u))`` may move where the kernel's float32 dots ``g``, ``u`` differ from the
    reference's in summation order only: each dot by ``K * ACC_EPS * sum |x w|``, each rounding by a step
    (``_flip``), carried through (``act'(g)`` for the activation, the product rule): a step of ``g`` near a
    cancellation becomes many steps of ``h``."""
    dt, k = x.dtype, x.shape[1]
    w = _float_weights(weight, scale, zero_point, qdtype, group, k)
    inner = w.shape[1] // 2
    gate, up = (w[:, 0::2], w[:, 1::2]) if interleaved else (w[:, :inner], w[:, inner:])
    xf = x.float()
    g, u = (torch.einsum("th,eih->tei", xf, m) for m in (gate, up))
    acc = [k * ACC_EPS * torch.einsum("th,eih->tei", xf.abs(), m.abs()) for m in (gate, up)]
    g_r, u_r = g.to(dt).float(), u.to(dt).float()
    g64 = g_r.double().requires_grad_()
    act = activation_ref(g64, epilogue.removesuffix("*up"))
    (slope,) = torch.autograd.grad(act.sum(), g64)
    a_r = act.detach().float().to(dt).float()
    dg, du = acc[0] + _flip(g_r, dt), acc[1] + _flip(u_r, dt)
    da = slope.float().abs() * dg + _flip(a_r, dt)
    return u_r.abs() * da + a_r.abs() * du + da * du + _flip(a_r * u_r, dt)


def down_slack(h: torch.Tensor, picked: torch.Tensor, dense: torch.Tensor, weight: torch.Tensor,
               scale: torch.Tensor | None, zero_point: torch.Tensor | None, qdtype: str, group: int,
               out_dtype: torch.dtype) -> torch.Tensor:
    """``[T, H]`` for ``moe_down_ref``'s arguments: how far its chain (per pick ``round_out(round(y) * r)`` added in
    expert order, each sum rounded) may move where the kernel's float32 ``y`` differs from the reference's in
    summation order only: a step of each rounding, carried to the end (a step of a large term or partial sum stays
    a step of that size when the sum then cancels to a small output)."""
    w = _float_weights(weight, scale, zero_point, qdtype, group, h.shape[2])
    total = torch.zeros(h.shape[0], w.shape[1], device=h.device)
    slack = torch.zeros_like(total)
    for e in range(w.shape[0]):
        rows = h[:, e].float()
        y = (rows @ w[e].t()).to(h.dtype).float()
        r = dense[:, e, None].float()
        term = torch.where(picked[:, e, None], (y * r).to(out_dtype).float(), 0.0)
        total = (total + term).to(out_dtype).float()
        dy = h.shape[2] * ACC_EPS * (rows.abs() @ w[e].abs().t()) + _flip(y, h.dtype)
        step = r.abs() * dy + _flip(term, out_dtype) + _flip(total, out_dtype)
        slack += torch.where(picked[:, e, None], step, 0.0)
    return slack


def _close(y: torch.Tensor, ref: torch.Tensor, slack: torch.Tensor) -> None:
    """Within ``slack`` of each output (``gate_up_slack`` / ``down_slack``: the float32 dots' summation order and a
    step of each rounding of the chain, carried to the output; each op differs from its reference in that order
    only, ``moe_gemv``'s docstring), plus 2**-15 of its row's largest output. Where a sum lands within its order's
    error of a rounding midpoint it is rightly rounded either way, a step that the chain's later roundings and a
    cancelling sum carry to the output: the property tests met one (an fp16 down output of -0.0051, three terms
    adding to it from 0.155, the second term's y = -0.83618165 on the midpoint of two fp16 steps to within 1e-8,
    float64) where two steps of the output allowed too little; fixed cases pass such a bound by their seeds, which
    a GPU's other summation order would not keep. The slack has those steps, so no relative term is added: with
    one of 2 eps, a kernel off by 1% passed 12 of the 18 cases of ``test_moe_gate_up_and_down_match_their_references``
    (bf16's eps is 2**-7), without it 2. The floor: with one torch thread, as an xdist worker has, the reference's
    float32 matmul summed another way and an int8 down output of 0.0977 in a row of up to 352 came out 0.0957,
    2**-17 of that row."""
    err = (y.float() - ref.float()).abs()
    floor = 2.0 ** -15 * ref.float().abs().amax(-1, keepdim=True)
    bound = floor + 1e-6 + slack.to(err.device)
    assert (err <= bound).all(), ((err - bound).max().item(), err.max().item())


@pytest.mark.parametrize("case", CASES, ids=["bf16", "int4-g32", "int4-channel-kmajor", "uint4-g64", "uint4-channel",
                                         "int8-g32"])
@pytest.mark.parametrize(("tokens", "top_k"), [(1, 2), (5, 2), (5, 1)])
def test_moe_gate_up_and_down_match_their_references(case, tokens, top_k):
    """Each op equals its reference on the picked pairs within ``_close`` (bf16 for float, int4 and int8, fp16 for
    uint4; measured under the interpreter: bit for bit but 1-2 fp16 outputs of 64-1280), the down op's sum in
    expert order over the picked experts only, unpicked pairs never read."""

    qdtype, group = case[0], case[1]
    dtype = torch.float16 if qdtype == "uint4" else torch.bfloat16
    picked, dense = _routing(tokens, top_k, torch.float32 if qdtype == "uint4" else dtype)
    x = torch.randn(tokens, H, generator=torch.Generator().manual_seed(tokens)).to(dtype).to(DEV)
    interleave = bool(qdtype)
    gate_up = _weights(case, 2 * I, H, dtype, interleave)
    h = torch.ops.lowbit.moe_gate_up(x, picked, *gate_up, qdtype, group, "silu*up", interleave)
    ref_h = moe_gate_up_ref(x, picked, *gate_up, qdtype, group, "silu*up", interleave)
    assert h.shape == (tokens, E, I) and h.dtype == dtype
    _close(h[picked], ref_h[picked], gate_up_slack(x, *gate_up, qdtype, group, "silu*up", interleave)[picked])
    h = torch.where(picked[:, :, None], h, float("nan"))  # a row the op wrote nothing to is never read
    down = _weights(case, H, I, dtype, False)
    y = torch.ops.lowbit.moe_down(h, picked, dense, *down, qdtype, group, dtype)
    h0 = torch.where(picked[:, :, None], h, 0.0)
    ref_y = moe_down_ref(h0, picked, dense, *down, qdtype, group, dtype)
    assert y.shape == (tokens, H) and y.dtype == dtype and torch.isfinite(y).all()
    _close(y, ref_y, down_slack(h0, picked, dense, *down, qdtype, group, dtype))


def test_moe_down_sums_in_expert_order_with_the_dense_forms_roundings():
    """With identity-like down weights the products are exact, so only the chain's roundings remain: the op's bits
    equal the dense form's (``DenseExperts``: each term rounded, then added in expert order), and differ from a sum
    rounded once (which the test would not tell apart if the op summed in float32)."""

    dtype = torch.bfloat16
    picked = torch.ones(1, E, dtype=torch.bool, device=DEV)
    dense = torch.tensor([[0.3, 0.7, 0.11, 0.9]], dtype=torch.float32, device=DEV)
    w = torch.eye(H, I).repeat(E, 1, 1).to(dtype).to(DEV)
    h = (1 + torch.arange(I, dtype=torch.float32) / 7).to(dtype).repeat(1, E, 1).to(DEV)
    y = torch.ops.lowbit.moe_down(h, picked, dense, w, None, None, "", 0, dtype)
    ref = moe_down_ref(h, picked, dense, w, None, None, "", 0, dtype)
    assert torch.equal(y, ref)
    once = (h[:, :, :H].float() * dense[:, :, None]).sum(1).to(dtype)
    assert not torch.equal(y, once)


_AOT_MOE = """
import json
import torch
from lowbit.kernels import moe_gemv
from lowbit.kernels.weight_only import pack_words
from conftest import quantized_weight
from sm90_ptx import ptx_ops, record_launches

seen = record_launches([moe_gemv])
moe_gemv.interpreting = lambda: False  # the GPU's column blocks and K tiles
dense = torch.tensor([[0.0, 0.7, 0.0, 0.3]])
out = {}
for name, qdtype, group, symmetric in (("bf16", "", 0, True), ("int4", "int4", 128, False),
                                      ("int4-channel", "int4", 0, True)):
    def stacked(n, k):
        if not qdtype:
            return torch.randn(4, n, k).to(torch.bfloat16), None, None
        parts = [pack_words(*quantized_weight(n, k, qdtype, group, symmetric), qdtype, group) for _ in range(4)]
        return tuple(None if parts[0][i] is None else moe_gemv.stack_experts([p[i] for p in parts]) for i in range(3))
    seen.clear()
    moe_gemv.moe_gate_up(torch.randn(1, 512).to(torch.bfloat16), dense != 0, *stacked(1024, 512), qdtype, group,
                         "silu*up", bool(qdtype))
    moe_gemv.moe_down(torch.randn(1, 4, 512).to(torch.bfloat16), dense != 0, dense, *stacked(512, 512), qdtype, group,
                      torch.bfloat16)
    out[name] = [ptx_ops(*s, listed=("st.global",))["kernel"] for s in seen]
print(json.dumps(out))
"""


def test_moe_ops_build_for_sm90():
    """Both kernels build for sm_90 (``sm90_ptx``: Triton's bundled ptxas, no GPU) at the GPU's tiles, on bf16
    weights, int4 words with zero points per group of 128 and symmetric int4 per channel (the zero point's share
    once after the loop): the interpreter runs constructs the GPU compiler may
    refuse (the ops' picked-pair branch, the expert loop carrying the sum). Measured with ptxas -v: no spills, 40-140
    registers (the float gate/up's two [16, 256] fp32 accumulators the most)."""
    import sm90_ptx

    built = sm90_ptx.run(_AOT_MOE)
    assert built == {name: ["_moe_gate_up", "_moe_down"] for name in ("bf16", "int4", "int4-channel")}, built
