"""The decode step's small kernels (``lowbit.kernels.decode_step``) against torch: greedy argmax and the float
KV-cache row write, on CPU under ``TRITON_INTERPRET=1`` and on the GPU."""

from __future__ import annotations

import contextlib
import os

import pytest
import torch

pytest.importorskip("triton", reason="lowbit's kernels need triton (pip install -e '.[dev]' brings it)")

from lowbit.kernels import decode_step
from lowbit.kernels.decode_step import cache_rows_index, row_argmax, row_argmax_checked, write_cache_rows

INTERP = os.environ.get("TRITON_INTERPRET") == "1"
DEVICES = [pytest.param("cpu", marks=pytest.mark.skipif(not INTERP, reason="CPU runs need TRITON_INTERPRET=1")),
           pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("tile", [256, decode_step.ARGMAX_TILE])
def test_row_argmax_is_torchs_first_index_of_the_maximum(device, tile, monkeypatch):
    """Ties inside a tile and across tiles resolve to the first index, as ``torch.argmax``; bf16 logits read
    without an fp32 copy."""
    monkeypatch.setattr(decode_step, "ARGMAX_TILE", tile)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 1000, generator=g).to(torch.bfloat16)
    x[0, 7] = x[0, 900] = 9.0  # tie across tiles of 256
    x[1, 300] = x[1, 301] = 9.0  # tie inside a tile
    x[2, 999] = 9.0  # the last logit
    x[3] = -1.0  # every logit equal: index 0
    x = x.to(device)
    got = row_argmax(x)
    assert got.dtype == torch.int64
    assert torch.equal(got.cpu(), x.cpu().float().argmax(-1))
    assert got.tolist() == [7, 300, 999, 0]
    with pytest.raises(ValueError, match="row_argmax.*\\[B, V\\]"):
        row_argmax(x[0])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("tile", [256, decode_step.ARGMAX_TILE])
def test_row_argmax_checked_flags_the_rows_with_no_finite_maximum(device, tile, monkeypatch):
    """One pass gives the tokens and, per row, whether its logits have a NaN or an infinite maximum (what greedy
    decoding refuses by name), as torch's amax + isfinite say; finite rows keep torch's argmax."""
    monkeypatch.setattr(decode_step, "ARGMAX_TILE", tile)
    x = torch.randn(6, 1000, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    x[1, 700] = float("nan")  # a NaN in a later tile, the maximum elsewhere
    x[2, 5] = float("inf")
    x[3] = float("-inf")  # nothing to choose
    x[4, 999] = float("-inf")  # one -inf logit is fine
    x[5, :300] = float("nan")
    got = row_argmax_checked(x.to(device)).cpu()
    assert got.shape == (2, 6) and got.dtype == torch.int64
    assert got[1].tolist() == [0, 1, 1, 1, 0, 1]
    assert torch.equal(got[1], (~torch.isfinite(x.float().amax(-1))).long())
    finite = got[1] == 0
    assert torch.equal(got[0][finite], x.float().argmax(-1)[finite])


@pytest.mark.parametrize("device", DEVICES)
def test_cache_row_write_equals_scatter(device):
    """``write_cache_rows`` writes what ``scatter_(2, index, new)`` writes, per-sequence positions, a head_dim that
    is not a power of two, a strided source (a view of the step's keys)."""
    g = torch.Generator().manual_seed(1)
    b, h, s, d, n = 2, 3, 16, 24, 2
    cache = torch.randn(b, h, s, d, generator=g).to(torch.bfloat16).to(device)
    new = torch.randn(b, n, h, d, generator=g).to(torch.bfloat16).to(device).transpose(1, 2)  # [b, h, n, d] view
    positions = torch.tensor([[5, 6], [9, 10]], device=device)
    index = positions[:, None, :, None].expand(b, h, n, d)
    assert cache_rows_index(index, 2, new)
    expect = cache.clone().scatter_(2, index, new)
    write_cache_rows(cache, index, new)
    assert torch.equal(cache, expect)
    write_cache_rows(cache, index, -new, checked=True)  # scatter_into's path: it has checked the index itself
    assert torch.equal(cache, expect.clone().scatter_(2, index, -new))
    one_head = positions[:, None, :, None].expand(b, 1, n, d)  # expand keeps a size-1 dim's stride (MQA)
    assert one_head.stride(1) != 0 and cache_rows_index(one_head, 2, new[:, :1])
    full = index.contiguous()  # a materialised index may hold anything: not a row write
    assert not cache_rows_index(full, 2, new) and not cache_rows_index(index, 1, new)
    with pytest.raises(ValueError, match="write_cache_rows.*not a row index"):
        write_cache_rows(cache, full, new)


SDPA_CASES = [  # batch, query heads, kv heads, cache slots, head_dim, each sequence's position, dtype
    (1, 4, 4, 100, 64, [99], torch.bfloat16),  # MHA, the last slot allowed
    (2, 8, 2, 130, 128, [5, 129], torch.bfloat16),  # GQA 4, chunks past a short sequence's position all masked
    (3, 6, 3, 40, 32, [0, 17, 39], torch.float16),  # GQA 2, one sequence at its first token
    (2, 32, 1, 70, 16, [69, 1], torch.bfloat16),  # MQA: 32 query heads share a key
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("b,hq,hkv,s,d,pos,dtype", SDPA_CASES)
def test_decode_sdpa_is_torchs_masked_sdpa(device, b, hq, hkv, s, d, pos, dtype):
    """One query row per sequence over a float cache with a decode step's mask (slots <= position): the split +
    log-sum-exp merge equals fp32 SDPA on the same bf16/fp16 operands to the output's rounding (half a step of its
    dtype), masked slots hold large values that must not leak, and a mask broadcast over the batch works too."""
    from lowbit.kernels.decode_step import decode_sdpa, decode_sdpa_pdl, decode_sdpa_ref

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(*shape, generator=g).to(dtype) for shape in ((b, hq, 1, d), (b, hkv, s, d), (b, hkv, s, d)))
    positions = torch.tensor(pos).view(b, 1)
    mask = torch.arange(s).view(1, 1, 1, -1) <= positions.view(b, 1, 1, 1)
    k[~mask.expand(b, hkv, 1, s).squeeze(2)] = 1e4  # beyond each position: values that would dominate if read
    v[~mask.expand(b, hkv, 1, s).squeeze(2)] = 1e4
    ref = decode_sdpa_ref(q.float(), k.float(), v.float(), mask, None, hq != hkv)
    got = decode_sdpa(q.to(device), k.to(device), v.to(device), mask.to(device), None, hq != hkv).cpu()
    assert got.shape == ref.shape and got.dtype == dtype
    step = _sdpa_step(dtype, device)
    assert bool(((got.float() - ref).abs() <= ref.abs() * step + 1e-3).all())
    one = torch.arange(s).view(1, 1, 1, -1) <= 3  # one mask for every sequence (batch dim 1)
    ref1 = decode_sdpa_ref(q.float(), k.float(), v.float(), one, 0.5, hq != hkv)
    got1 = decode_sdpa(q.to(device), k.to(device), v.to(device), one.to(device), 0.5, hq != hkv).cpu()
    assert bool(((got1.float() - ref1).abs() <= ref1.abs() * step + 1e-3).all())
    # the opaque PDL op (the triton backend's default on Hopper): the same kernels, the same bits; its fake impl
    args = (q.to(device), k.to(device), v.to(device), mask.to(device), None, hq != hkv)
    assert torch.equal(decode_sdpa_pdl(*args).cpu(), got)
    # its merge in the split kernel (the backend's merge_in_split): the same _merge_row code, counters back at zero
    _assert_merge_is_the_merge_launch(decode_sdpa_pdl(*args, merge_in_split=True), got, device)
    torch.library.opcheck(torch.ops.lowbit.decode_sdpa_pdl, args, test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("b,hq,hkv,s,d,pos,dtype", SDPA_CASES)
def test_decode_sdpa_adds_an_additive_mask_per_head(device, b, hq, hkv, s, d, pos, dtype):
    """An additive mask of the query's dtype (Bloom's step: ALiBi's slope x key position per head where the key is
    causal, -inf elsewhere) is added to each score per query head: the kernel equals fp32 SDPA with that mask to half
    a step of the output's dtype, as the boolean mask's test; masked slots hold values that would dominate if read. A
    mask of one row for every head (head axis 1) and one for every sequence (batch axis 1) are read as broadcast.
    The bias moves the output by more than the tolerance (a kernel reading only its -inf fails)."""
    from lowbit.kernels.decode_step import decode_sdpa, decode_sdpa_ref, decode_sdpa_supported

    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(*shape, generator=g).to(dtype) for shape in ((b, hq, 1, d), (b, hkv, s, d), (b, hkv, s, d)))
    causal = torch.arange(s).view(1, 1, 1, -1) <= torch.tensor(pos).view(b, 1, 1, 1)
    k[~causal.expand(b, hkv, 1, s).squeeze(2)] = 1e4
    v[~causal.expand(b, hkv, 1, s).squeeze(2)] = 1e4
    slopes = 2.0 ** (-8.0 * torch.arange(1, hq + 1) / hq)  # Bloom's slopes for a power-of-two head count
    alibi = (slopes.view(1, hq, 1, 1) * torch.arange(s).view(1, 1, 1, -1)).to(dtype)
    step = _sdpa_step(dtype, device)
    ramp = (torch.arange(s) % 7 - 3.0).view(1, 1, 1, -1).to(dtype)  # one bias row for every head
    first = torch.arange(s).view(1, 1, 1, -1) <= max(3, min(pos))  # one mask for every sequence
    for mask in (torch.where(causal, alibi, float("-inf")), torch.where(causal, ramp, float("-inf")),
                 torch.where(first, alibi, float("-inf"))):
        assert decode_sdpa_supported(q.to(device), k.to(device), v.to(device), mask.to(device)) is None
        ref = decode_sdpa_ref(q.float(), k.float(), v.float(), mask.float(), None, hq != hkv)
        got = decode_sdpa(q.to(device), k.to(device), v.to(device), mask.to(device), None, hq != hkv).cpu()
        assert got.shape == ref.shape and got.dtype == dtype
        assert bool(((got.float() - ref).abs() <= ref.abs() * step + 1e-3).all())
        unbiased = decode_sdpa_ref(q.float(), k.float(), v.float(), mask.isfinite(), None, hq != hkv)
        assert (unbiased - ref).abs().max() > 1e-2


def test_decode_sdpa_says_what_it_does_not_take():
    """Prefill rows, a float mask, fp32, a head_dim that is not a power of two and batches past
    ``DECODE_SDPA_MAX_HEADS`` go to the reference, each with its reason (the triton backend's attention target asks
    before every call). On the kernel device (the interpreter's CPU, else CUDA): elsewhere the answer is that."""
    from lowbit.kernels.decode_step import decode_sdpa_supported

    dev = "cpu" if INTERP or not torch.cuda.is_available() else "cuda"
    q, k = (torch.zeros(*shape, dtype=torch.bfloat16, device=dev) for shape in ((1, 4, 1, 64), (1, 4, 10, 64)))
    mask = torch.ones(1, 1, 1, 10, dtype=torch.bool, device=dev)
    assert "one query row" in decode_sdpa_supported(q.expand(1, 4, 3, 64), k, k, mask.expand(1, 1, 3, 10))
    assert "boolean" in decode_sdpa_supported(q, k, k, mask.float())  # additive: of the query's dtype only
    assert decode_sdpa_supported(q, k, k, mask.to(q.dtype).expand(1, 4, 1, 10)) is None
    assert "shapes" in decode_sdpa_supported(q, k, k, mask.expand(1, 4, 1, 10))  # boolean: one row for all heads
    assert "shapes" in decode_sdpa_supported(q, k, k, mask.to(q.dtype).expand(1, 2, 1, 10))
    assert "dtypes" in decode_sdpa_supported(q.float(), k.float(), k.float(), mask)
    assert "head_dim" in decode_sdpa_supported(q[..., :48], k[..., :48], k[..., :48], mask)
    assert "shapes" in decode_sdpa_supported(q, k[:, :3], k[:, :3], mask)
    q17, k17 = q.expand(17, 4, 1, 64), k.expand(17, 4, 10, 64)  # 68 (sequence, kv head) pairs: torch's SDPA
    assert "batch x kv heads = 68 > DECODE_SDPA_MAX_HEADS = 64" in decode_sdpa_supported(q17, k17, k17, mask)
    if dev == "cuda":  # (under the interpreter the CPU is the kernel device)
        assert "not on the kernel device" in decode_sdpa_supported(q.cpu(), k.cpu(), k.cpu(), mask.cpu())


def _rotary_case(b: int, hq: int, hkv: int, n: int, d: int, s: int, positions: list[list[int]], dtype: torch.dtype,
                 device: str, rot: int | None = None) -> tuple[torch.Tensor, ...]:
    """A step's operands as the graph gives them: q/k/v strided views of one merged projection ``[B, N, (Hq +
    2 Hkv) D]``, Llama's cos/sin ``[B, 1, N, rot]`` (fp32 angles, cast; ``rot`` None: the whole head, else a
    partial rotary's width), random caches and the positions' row index."""
    g = torch.Generator().manual_seed(d + hq + n)
    # views are taken on the device: .to() of a strided view (a split, a stride-0 expand) makes it contiguous,
    # and a contiguous index is no row index (the kernel would be refused)
    qkv = torch.randn(b, n, (hq + 2 * hkv) * d, generator=g).to(dtype).to(device)
    q, k, v = (t.unflatten(-1, (-1, d)).transpose(1, 2) for t in qkv.split([hq * d, hkv * d, hkv * d], -1))
    pos = torch.tensor(positions)
    width = d if rot is None else rot
    freqs = pos[..., None].float() / (10000 ** (torch.arange(0, width, 2).float() / width))
    emb = torch.cat([freqs, freqs], -1)
    cos, sin = (e.to(dtype).to(device)[:, None] for e in (emb.cos(), emb.sin()))
    k_cache, v_cache = (torch.randn(b, hkv, s, d, generator=g).to(dtype).to(device) for _ in range(2))
    index = pos.to(device)[:, None, :, None].expand(b, hkv, n, d)
    return q, k, v, cos, sin, k_cache, v_cache, index


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("hq,hkv,d,dtype,rot", [(4, 4, 64, torch.bfloat16, None), (8, 2, 128, torch.bfloat16, None),
                                                (8, 2, 64, torch.float32, None), (4, 4, 128, torch.float32, None),
                                                (8, 1, 128, torch.float16, None), (4, 2, 16, torch.bfloat16, 4),
                                                (4, 4, 32, torch.float32, 8), (2, 1, 32, torch.float16, 24)])
def test_rotary_write_kv_is_rotary_then_the_cache_scatters(device, hq, hkv, d, dtype, rot):
    """``rotary_write_kv`` (one launch) equals the IR's ``rotary`` of q and k and the two ``scatter_`` writes bit for
    bit: MHA and GQA, head_dim 64 and 128, bf16 (the interpreter's truncating cast would differ in about half the
    elements without the kernel's own rounding), fp16 and fp32 (no FMA), two sequences at different positions, a
    decode step, a 3-token prefill and a 19-token one (more tokens than a program's ``ROTARY_ROWS``: a full block
    and a partial one); cache rows not written keep their values. A partial rotary (``rotary_dim`` 4 of 16 as a tiny
    GPT-NeoX's 0.25, 8 of 32, 24 of 32: half of it, 12, no power of two) turns those channels and copies the rest."""
    from lowbit.kernels.decode_step import (ROTARY_ROWS, rotary_write_kv, rotary_write_kv_ref,
                                            rotary_write_kv_unsupported)

    slots = 24
    long = ROTARY_ROWS + 3
    for n, positions in ((1, [[3], [14]]), (3, [[2, 0, 1], [5, 6, 7]]),
                         (long, [list(range(long))[::-1], list(range(2, 2 + long))])):
        q, k, v, cos, sin, kc, vc, index = _rotary_case(2, hq, hkv, n, d, slots, positions, dtype, device, rot)
        assert rotary_write_kv_unsupported(q, k, v, cos, sin, kc, vc, index, rot) is None  # the kernel runs
        before_k, before_v = kc.clone(), vc.clone()
        ref_k, ref_v = kc.clone(), vc.clone()
        ref = rotary_write_kv_ref(q, k, v, cos, sin, ref_k, ref_v, index, rot)
        got = rotary_write_kv(q, k, v, cos, sin, kc, vc, index, rotary_dim=rot)
        assert got.is_contiguous() and got.dtype == dtype
        assert torch.equal(got, ref) and torch.equal(kc, ref_k) and torch.equal(vc, ref_v)
        if rot is not None:  # the channels past the rotary's are q's and k's own, the first ones turned
            assert torch.equal(got[..., rot:], q[..., rot:]) and not torch.equal(got[..., :rot], q[..., :rot])
            written_k = ref_k[torch.arange(2)[:, None], :, torch.tensor(positions).to(device)]
            assert torch.equal(written_k.permute(0, 2, 1, 3)[..., rot:], k[..., rot:])
        written = torch.zeros(2, slots, dtype=torch.bool)
        written[torch.arange(2)[:, None], torch.tensor(positions)] = True
        kept = ~written.to(device)[:, None, :, None].expand_as(kc)
        assert torch.equal(kc[kept], before_k[kept]) and torch.equal(vc[kept], before_v[kept])
        assert not torch.equal(kc, before_k) and not torch.equal(vc, before_v)


def test_rotary_write_kv_refuses_a_head_dim_and_falls_back_where_the_kernel_cannot_read():
    """A head_dim that is not a power of two and an odd or too wide ``rotary_dim`` are refused by name and shape; a
    materialised index (any write), cos/sin per head or narrower than the rotary's width, or mixed dtypes run the
    reference, with the same result."""
    from lowbit.kernels.decode_step import rotary_write_kv, rotary_write_kv_ref, rotary_write_kv_unsupported

    q, k, v, cos, sin, kc, vc, index = _rotary_case(2, 4, 2, 1, 64, 8, [[1], [6]], torch.bfloat16, "cpu")
    with pytest.raises(ValueError, match=r"rotary_write_kv: head_dim 48 \(q \(2, 4, 1, 48\)\)"):
        rotary_write_kv(q[..., :48], k[..., :48], v[..., :48], cos[..., :48], sin[..., :48], kc[..., :48],
                        vc[..., :48], index[..., :48])
    for bad in (7, 66):
        refusal = rf"rotary_write_kv: rotary_dim {bad} of head_dim 64 \(q \(2, 4, 1, 64\)\)"
        with pytest.raises(ValueError, match=refusal):
            rotary_write_kv(q, k, v, cos, sin, kc, vc, index, rotary_dim=bad)
    assert "broadcast" in rotary_write_kv_unsupported(q, k, v, cos[..., :16], sin[..., :16], kc, vc, index, 32)
    per_head = cos.expand(2, 2, 1, 64)
    cases = {"row index": (cos, sin, index.contiguous(), kc), "broadcast": (per_head, sin, index, kc),
             "dtypes": (cos, sin, index, kc.float())}
    for why, (c, s, i, k_cache) in cases.items():
        assert why in rotary_write_kv_unsupported(q, k, v, c, s, k_cache, vc, i)
    c, s, i, _ = cases["row index"]
    ref_k, ref_v, got_k, got_v = kc.clone(), vc.clone(), kc.clone(), vc.clone()
    ref = rotary_write_kv_ref(q, k, v, c, s, ref_k, ref_v, i)
    assert torch.equal(rotary_write_kv(q, k, v, c, s, got_k, got_v, i), ref)
    assert torch.equal(got_k, ref_k) and torch.equal(got_v, ref_v)


@pytest.mark.skipif(not INTERP, reason="the CPU run needs TRITON_INTERPRET=1")
def test_rotary_write_kv_writes_the_caches_in_place_under_torch_compile(monkeypatch):
    """Under torch.compile (Inductor, CPU) the op writes straight into its cache inputs: no fresh cache copied back
    (what functionalizing a mutation of a graph input can cost: a whole-cache copy per layer per step), the index
    reaches it as a stride-0 view (its kernel runs, not the reference), and results equal the eager op's."""
    from torch._inductor.utils import run_and_get_code

    ran: list[str | None] = []
    unsupported = decode_step.rotary_write_kv_unsupported
    monkeypatch.setattr(decode_step, "rotary_write_kv_unsupported", lambda *a: ran.append(unsupported(*a)) or ran[-1])
    q, k, v, cos, sin, kc, vc, index = _rotary_case(2, 4, 2, 1, 64, 16, [[3], [9]], torch.bfloat16, "cpu")
    positions = index[:, 0, :, 0]

    def step(q, k, v, cos, sin, k_cache, v_cache, positions):
        rows = positions[:, None, :, None].expand(k.shape)
        return torch.ops.lowbit.rotary_write_kv(q, k, v, cos, sin, k_cache, v_cache, rows) * 2, k_cache, v_cache

    eager_k, eager_v = kc.clone(), vc.clone()
    ref = step(q, k, v, cos, sin, eager_k, eager_v, positions)
    torch._dynamo.reset()
    out, code = run_and_get_code(torch.compile(step), q, k, v, cos, sin, kc, vc, positions)
    calls = [line.strip() for src in code for line in src.splitlines() if "rotary_write_kv.default(" in line]
    assert len(calls) == 1 and calls[0].split("(", 1)[1].startswith("arg"), calls
    assert not any("copy_" in line for src in code for line in src.splitlines()), "a cache copied back"
    assert ran and all(r is None for r in ran)
    assert torch.equal(out[0], ref[0]) and torch.equal(kc, eager_k) and torch.equal(vc, eager_v)
    assert out[1].data_ptr() == kc.data_ptr() and out[2].data_ptr() == vc.data_ptr()


def _sdpa_step(dtype: torch.dtype, device: str) -> float:
    """The decode SDPA tests' relative bound: half a step of the output dtype under the interpreter (its round to
    nearest since tests/conftest.py rounds its bf16 casts: measured there, session 52); one step on the GPU until a
    GPU run measures the half step there."""
    return 2.0 ** -((8 if dtype == torch.bfloat16 else 11) - (device != "cpu"))


def _assert_merge_is_the_merge_launch(merged: torch.Tensor, two: torch.Tensor, device: str) -> None:
    """``merge_in_split``'s output against the two-launch form's: bit for bit under the interpreter (the one
    ``_merge_row`` code), within a step of the output dtype on the GPU (two kernels compile the merge's float32
    arithmetic apart: session 52's H100 run of the packed cache's twin differed by 6e-8 before the cast); the
    merging programs set their counters back to zero (a CUDA graph replays the launch)."""
    if device == "cpu":
        assert torch.equal(merged.cpu(), two.cpu())
    else:
        torch.testing.assert_close(merged.float().cpu(), two.float().cpu(), rtol=2.0 ** -7, atol=1e-5)
    assert not decode_step.split_counters(merged.device).any()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("hq,hkv,d,slots,positions", [(4, 4, 64, 24, [[3], [14]]), (8, 2, 128, 150, [[70], [149]]),
                                                       (8, 1, 32, 130, [[0], [64]])])
def test_rotary_decode_sdpa_is_rotary_write_kv_then_decode_sdpa_bit_for_bit(device, hq, hkv, d, slots, positions):
    """``rotary_decode_sdpa`` (the split kernel rotates q itself and the program holding the step's slot writes
    the new key and value first) returns the same bits and leaves the same caches as ``rotary_write_kv`` followed
    by ``decode_sdpa``: MHA/GQA/MQA, head_dim 32-128, one chunk and several (the slot in the first, a middle and
    the last chunk, a partial last chunk), two sequences at different positions; rows past each position hold
    values that would dominate if read. A prefill (3 tokens) runs the two ops, with the same result as them."""
    from lowbit.kernels.decode_step import (decode_sdpa, rotary_decode_sdpa, rotary_decode_sdpa_unsupported,
                                            rotary_write_kv)

    q, k, v, cos, sin, kc, vc, index = _rotary_case(2, hq, hkv, 1, d, slots, positions, torch.bfloat16, device)
    pos = torch.tensor(positions).view(2, 1, 1, 1).to(device)
    mask = torch.arange(slots, device=device).view(1, 1, 1, -1) <= pos
    kc[~mask.expand(2, hkv, 1, slots).squeeze(2)] = 1e4
    vc[~mask.expand(2, hkv, 1, slots).squeeze(2)] = 1e4
    assert rotary_decode_sdpa_unsupported(q, k, v, cos, sin, kc, vc, index, mask, False) is None
    ref_k, ref_v, got_k, got_v = kc.clone(), vc.clone(), kc.clone(), vc.clone()
    ref = decode_sdpa(rotary_write_kv(q, k, v, cos, sin, ref_k, ref_v, index), ref_k, ref_v, mask, None, hq != hkv)
    got = rotary_decode_sdpa(q, k, v, cos, sin, got_k, got_v, index, mask, None, False, hq != hkv)
    assert torch.equal(got_k, ref_k) and torch.equal(got_v, ref_v) and not torch.equal(got_k, kc)
    assert got.shape == ref.shape and torch.equal(got, ref)
    merged_k, merged_v = kc.clone(), vc.clone()
    merged = rotary_decode_sdpa(q, k, v, cos, sin, merged_k, merged_v, index, mask, None, False, hq != hkv, False, True)
    assert torch.equal(merged_k, ref_k) and torch.equal(merged_v, ref_v)
    _assert_merge_is_the_merge_launch(merged, ref, device)
    torch.library.opcheck(torch.ops.lowbit.rotary_decode_sdpa, (q, k, v, cos, sin, kc.clone(), vc.clone(), index,
                                                               mask, None, False, hq != hkv),
                          test_utils=("test_schema", "test_faketensor"))
    # an additive mask (decode_sdpa's FLOAT_MASK: ALiBi-like slope x slot per query head, -inf past each position)
    # through the rotating kernel: the same bits and caches as the two ops, and the bias moves the output
    slopes = 2.0 ** (-torch.arange(1, hq + 1, dtype=torch.float32, device=device))
    bias = torch.where(mask, slopes.view(1, hq, 1, 1) * torch.arange(slots, device=device), float("-inf"))
    bias = bias.to(torch.bfloat16)
    assert rotary_decode_sdpa_unsupported(q, k, v, cos, sin, kc, vc, index, bias, False) is None
    ref_k, ref_v, got_k, got_v = kc.clone(), vc.clone(), kc.clone(), vc.clone()
    ref_b = decode_sdpa(rotary_write_kv(q, k, v, cos, sin, ref_k, ref_v, index), ref_k, ref_v, bias, None, hq != hkv)
    got_b = rotary_decode_sdpa(q, k, v, cos, sin, got_k, got_v, index, bias, None, False, hq != hkv)
    assert torch.equal(got_k, ref_k) and torch.equal(got_v, ref_v)
    assert torch.equal(got_b, ref_b) and (got_b.float() - got.float()).abs().max() > 1e-2
    q3, k3, v3, cos3, sin3, kc3, vc3, index3 = _rotary_case(2, hq, hkv, 3, d, slots, [[2, 0, 1], [5, 6, 7]],
                                                            torch.bfloat16, device)
    causal = torch.ones(1, 1, 3, slots, dtype=torch.bool, device=device)
    assert "one row per sequence" in rotary_decode_sdpa_unsupported(q3, k3, v3, cos3, sin3, kc3, vc3, index3,
                                                                     causal, False)
    from lowbit.ir.ops import attention

    ref_k, ref_v = kc3.clone(), vc3.clone()
    ref = attention(rotary_write_kv(q3, k3, v3, cos3, sin3, ref_k, ref_v, index3), ref_k, ref_v, causal,
                    enable_gqa=hq != hkv)
    got = rotary_decode_sdpa(q3, k3, v3, cos3, sin3, kc3, vc3, index3, causal, None, False, hq != hkv)
    assert torch.equal(got, ref) and torch.equal(kc3, ref_k) and torch.equal(vc3, ref_v)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("hq,hkv,d", [(4, 4, 64), (6, 2, 32), (3, 1, 64)])
def test_a_prefill_with_causal_slots_attends_its_own_slots_as_the_mask_does(device, hq, hkv, d):
    """``rotary_decode_sdpa(causal_slots=True)`` of a prefill the host vouches for (``host_checked_positions``)
    attends causally over the cache's first ``L`` slots (``causal_prefill_attention``): the masked SDPA's output
    over every slot within fp32 rounding, for rows in position order and for ``left_padded`` rows (pad columns
    first, at the positions past the prompt's: ``padded``), with slots past ``L`` holding values that would
    dominate if read; the caches written the same. Without the host's word, with ``last`` not ``L - 1`` or without
    ``causal_slots``, the masked SDPA itself, bit for bit."""
    from lowbit.generate import left_padded
    from lowbit.ir.kvcache import host_checked_positions
    from lowbit.ir.ops import attention
    from lowbit.kernels.decode_step import rotary_decode_sdpa, rotary_write_kv

    length, slots = 9, 40
    prompts = {"in order": [list(range(length))] * 2, "left-padded": [list(range(length)), list(range(4))]}
    for kind, rows in prompts.items():
        positions = left_padded(rows)[1].tolist()
        q, k, v, cos, sin, kc, vc, index = _rotary_case(2, hq, hkv, length, d, slots, positions, torch.float32,
                                                        device)
        kc[:, :, length:], vc[:, :, length:] = 1e4, -1e4
        pos = torch.tensor(positions, device=device).view(2, 1, length, 1)
        mask = torch.arange(slots, device=device).view(1, 1, 1, -1) <= pos
        ref_k, ref_v = kc.clone(), vc.clone()
        ref = attention(rotary_write_kv(q, k, v, cos, sin, ref_k, ref_v, index), ref_k, ref_v, mask,
                        enable_gqa=hq != hkv)
        padded = kind == "left-padded"
        got_k, got_v = kc.clone(), vc.clone()
        with host_checked_positions(length - 1, padded=padded):
            got = rotary_decode_sdpa(q, k, v, cos, sin, got_k, got_v, index, mask, None, False, hq != hkv,
                                     causal_slots=True)
        assert torch.equal(got_k, ref_k) and torch.equal(got_v, ref_v)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        assert ref.abs().max() < 1e3  # (no slot past L was read)
        for host, causal in (((length - 1, padded), False), (None, True), ((length, padded), True)):
            with host_checked_positions(*host[:1], padded=host[1]) if host else contextlib.nullcontext():
                plain = rotary_decode_sdpa(q, k, v, cos, sin, kc.clone(), vc.clone(), index, mask, None, False,
                                           hq != hkv, causal_slots=causal)
            assert torch.equal(plain, ref), (kind, host, causal)
    # a permuted row said to be in order would be read in column order: the host's word is what it trusts
    with host_checked_positions(length - 1, padded=False):
        wrong = rotary_decode_sdpa(q, k, v, cos, sin, kc.clone(), vc.clone(), index, mask, None, False, hq != hkv,
                                   causal_slots=True)
    assert not torch.allclose(wrong[1], ref[1], atol=1e-3)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("hq,hkv,d,dtype", [(4, 4, 64, torch.bfloat16), (8, 2, 128, torch.float32),
                                            (8, 1, 16, torch.float16), (4, 2, 32, torch.bfloat16)])
def test_write_kv_is_the_two_cache_scatters(device, hq, hkv, d, dtype, monkeypatch):
    """``write_kv`` (``_rotary_write_kv`` launched once with no rotary and no query heads) writes a rotary-free
    layer's keys and values as its two ``scatter_`` do, bit for bit: MHA, GQA and MQA, head_dim 16 to 128,
    bf16/fp16/fp32, k and v strided views of one merged projection, two sequences at slots in the middle of the
    cache, a decode step and prefills of 3 and ``ROTARY_ROWS + 3`` tokens (a full block of rows and a partial one).
    The kernel runs (the reference is made to fail inside the op), rows not written keep their values, and the
    written keys are the keys' own channels: nothing turned."""
    from lowbit.kernels.decode_step import ROTARY_ROWS, write_kv, write_kv_ref, write_kv_unsupported

    slots = 24
    long = ROTARY_ROWS + 3
    for n, positions in ((1, [[9], [14]]), (3, [[12, 10, 11], [5, 6, 7]]),
                         (long, [list(range(2, 2 + long))[::-1], list(range(3, 3 + long))])):
        _, k, v, _, _, kc, vc, index = _rotary_case(2, hq, hkv, n, d, slots, positions, dtype, device)
        assert write_kv_unsupported(k, v, kc, vc, index) is None  # the kernel takes them
        before_k, before_v = kc.clone(), vc.clone()
        ref_k, ref_v = kc.clone(), vc.clone()
        write_kv_ref(k, v, ref_k, ref_v, index)
        with monkeypatch.context() as m:
            m.setattr(decode_step, "write_kv_ref", lambda *a: pytest.fail("write_kv ran its reference"))
            assert write_kv(k, v, kc, vc, index) is None
        assert torch.equal(kc, ref_k) and torch.equal(vc, ref_v)
        rows = torch.arange(2)[:, None], slice(None), torch.tensor(positions).to(device)
        assert torch.equal(kc[rows].permute(0, 2, 1, 3), k) and torch.equal(vc[rows].permute(0, 2, 1, 3), v)
        written = torch.zeros(2, slots, dtype=torch.bool)
        written[torch.arange(2)[:, None], torch.tensor(positions)] = True
        kept = ~written.to(device)[:, None, :, None].expand_as(kc)
        assert torch.equal(kc[kept], before_k[kept]) and torch.equal(vc[kept], before_v[kept])
        assert not torch.equal(kc, before_k) and not torch.equal(vc, before_v)
    torch.library.opcheck(torch.ops.lowbit.write_kv, (k, v, kc, vc, index), test_utils=("test_schema",
                                                                                          "test_faketensor"))


def test_write_kv_falls_back_where_the_kernel_cannot_read():
    """Operands the kernel does not take run the reference, each reason naming the operand: a materialised index
    (any write), mixed dtypes, head_dim 48 (no power of two), caches of another head count; the result is the two
    scatters' all the same."""
    from lowbit.kernels.decode_step import write_kv, write_kv_ref, write_kv_unsupported

    _, k, v, _, _, kc, vc, index = _rotary_case(2, 4, 2, 1, 64, 8, [[1], [6]], torch.bfloat16, "cpu")
    cases = {"is not a row index": (k, v, kc, vc, index.contiguous()),
             "dtypes": (k, v, kc.float(), vc, index),
             "head_dim 48: the kernel takes a power of two": (k[..., :48], v[..., :48], kc[..., :48].contiguous(),
                                                              vc[..., :48].contiguous(), index[..., :48]),
             "caches (2, 1, 8, 64), (2, 1, 8, 64) for keys (2, 2, 1, 64)": (k, v, kc[:, :1], vc[:, :1], index)}
    for why, (k_, v_, kc_, vc_, i_) in cases.items():
        assert why in write_kv_unsupported(k_, v_, kc_, vc_, i_)
    for why in ("is not a row index", "head_dim 48: the kernel takes a power of two"):
        k_, v_, kc_, vc_, i_ = cases[why]
        ref_k, ref_v, got_k, got_v = kc_.clone(), vc_.clone(), kc_.clone(), vc_.clone()
        write_kv_ref(k_, v_, ref_k, ref_v, i_)
        write_kv(k_, v_, got_k, got_v, i_)
        assert torch.equal(got_k, ref_k) and torch.equal(got_v, ref_v) and not torch.equal(got_k, kc_)


@pytest.mark.skipif(not INTERP, reason="the CPU run needs TRITON_INTERPRET=1")
def test_write_kv_writes_the_caches_in_place_under_torch_compile(monkeypatch):
    """Under torch.compile (Inductor, CPU) ``write_kv`` writes straight into its cache inputs: one call on the graph's
    arguments, no fresh cache copied back, its kernel run (the index a stride-0 view), the caches the eager op's."""
    from torch._inductor.utils import run_and_get_code

    ran: list[str | None] = []
    unsupported = decode_step.write_kv_unsupported
    monkeypatch.setattr(decode_step, "write_kv_unsupported", lambda *a: ran.append(unsupported(*a)) or ran[-1])
    _, k, v, _, _, kc, vc, index = _rotary_case(2, 4, 2, 1, 64, 16, [[3], [9]], torch.bfloat16, "cpu")
    positions = index[:, 0, :, 0]

    def step(k, v, k_cache, v_cache, positions):
        torch.ops.lowbit.write_kv(k, v, k_cache, v_cache, positions[:, None, :, None].expand(k.shape))
        return k_cache, v_cache

    eager_k, eager_v = kc.clone(), vc.clone()
    step(k, v, eager_k, eager_v, positions)
    torch._dynamo.reset()
    out, code = run_and_get_code(torch.compile(step), k, v, kc, vc, positions)
    calls = [line.strip() for src in code for line in src.splitlines() if "write_kv.default(" in line]
    assert len(calls) == 1 and calls[0].split("(", 1)[1].startswith("arg"), calls
    assert not any("copy_" in line for src in code for line in src.splitlines()), "a cache copied back"
    assert ran and all(r is None for r in ran)
    assert torch.equal(kc, eager_k) and torch.equal(vc, eager_v) and not torch.equal(kc, _rotary_case(
        2, 4, 2, 1, 64, 16, [[3], [9]], torch.bfloat16, "cpu")[5])
    assert out[0].data_ptr() == kc.data_ptr() and out[1].data_ptr() == vc.data_ptr()


_AOT_SDPA = """
import json
import torch
import lowbit.kernels  # before conftest: the kernels jit-compiled, not interpreted
import conftest  # noqa: F401 - TRITON_INTERPRET=1 from here: the ops send CPU tensors to the kernels
from lowbit.kernels import decode_step
from lowbit.kernels._common import pdl_launches
from sm90_ptx import ptx_ops, record_launches

seen = record_launches([decode_step])
decode_step.on_kernel_device = lambda t: True  # CPU operands take the kernels (record_launches: no interpreter)
g = torch.Generator().manual_seed(0)
q = torch.randn(1, 9, 1, 64, generator=g).to(torch.bfloat16)  # SmolLM2's heads: 9 query, 3 key-value, 64 wide
k, v = (torch.randn(1, 3, 70, 64, generator=g).to(torch.bfloat16) for _ in range(2))
mask = torch.where(torch.arange(70) <= 40, 0.0, float("-inf")).view(1, 1, 1, -1).to(torch.bfloat16)
def inside_pdl_launches():
    with pdl_launches():
        decode_step.decode_sdpa(q, k, v, mask, None, True)
out = {}
for name, call in (("plain", lambda: decode_step.decode_sdpa(q, k, v, mask, None, True)),
                   ("pdl_launches", inside_pdl_launches),
                   ("pdl_op", lambda: decode_step.decode_sdpa_pdl(q, k, v, mask, None, True)),
                   ("pdl_op_merged", lambda: decode_step.decode_sdpa_pdl(q, k, v, mask, None, True, True))):
    seen.clear()
    call()
    out[name] = [ptx_ops(*s, listed=("griddepcontrol.launch_dependents", "griddepcontrol.wait")) for s in seen]
print(json.dumps(out))
"""


def test_decode_sdpa_launches_with_pdl_where_pdl_on_and_builds_for_sm90():
    """The float cache's decode attention takes its launch keywords from ``pdl_launch_options``: outside
    ``pdl_launches`` its split and merge launch with ``PDL=False`` and no ``launch_pdl``, inside (``pdl_on`` as on
    Hopper) with both on, as do ``decode_sdpa_pdl``'s two and its split alone where it merges (``merge_in_split``);
    each builds for sm_90 (``sm90_ptx``: Triton's bundled ptxas, no GPU), letting its dependents launch and waiting
    exactly where ``PDL`` is on."""
    import sm90_ptx

    launches = sm90_ptx.run(_AOT_SDPA)
    expected = {"plain": ["_sdpa_split", "_sdpa_merge"], "pdl_launches": ["_sdpa_split", "_sdpa_merge"],
                "pdl_op": ["_sdpa_split", "_sdpa_merge"], "pdl_op_merged": ["_sdpa_split"]}
    assert {name: [k["kernel"] for k in kernels] for name, kernels in launches.items()} == expected, launches
    for name, kernels in launches.items():
        on = name != "plain"
        for kernel in kernels:
            assert kernel["PDL"] is on and kernel["launch_pdl"] is on, (name, kernel)
            waits = {"griddepcontrol.launch_dependents", "griddepcontrol.wait"} if on else set()
            assert set(kernel["ops"]) == waits, (name, kernel)
