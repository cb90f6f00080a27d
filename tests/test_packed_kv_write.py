"""``write_packed_kv`` (lowbit.kernels.packed_kv_write): a decode step's write into the packed int8/int4/int2 KV cache
in one launch, with the layer's rotary of q and k, against its plain-torch reference (the IR's ``rotary`` and
``cache_update``) bit for bit; and the triton backend's decode step over a packed cache, which now writes each
layer's token through it and generates the torch reference's greedy tokens. CPU under ``TRITON_INTERPRET=1``, and
the GPU."""

from __future__ import annotations

import contextlib
import functools
import os

import pytest
import torch

pytest.importorskip("triton", reason="lowbit's kernels need triton (pip install -e '.[dev]' brings it)")

from lowbit.ir import kvcache as kv
from lowbit.ir.quant import SCALE_EPS
from lowbit.kernels import packed_kv_write
from lowbit.kernels.packed_kv_write import write_packed_kv, write_packed_kv_ref, write_packed_kv_unsupported

INTERP = os.environ.get("TRITON_INTERPRET") == "1"
DEVICES = [pytest.param("cpu", marks=pytest.mark.skipif(not INTERP, reason="CPU runs need TRITON_INTERPRET=1")),
           pytest.param("cuda", marks=pytest.mark.gpu)]
needs_kernels = pytest.mark.skipif(not (INTERP or torch.cuda.is_available()),
                                   reason="the triton backend needs CUDA or TRITON_INTERPRET=1")

SLOTS, D = 64, 32


@pytest.fixture(autouse=True)
def _one_export_per_model(reuse_captures: object) -> None:
    """Every capture here goes through the session's capture cache (conftest's ``reuse_captures``): the step tests
    compile the same tiny Llama under other recipes and backend options (and ``count_step_launches`` its model twice
    per scheme), each an export of the same step graph."""


def _written_cache(layout: dict, b: int, hkv: int, upto: torch.Tensor, dtype: torch.dtype,
                   g: torch.Generator, float_dtype: torch.dtype = torch.float32,
                   scale_dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    """A packed cache holding random tokens at positions ``0 .. upto[b] - 1`` of each sequence (a prefill of the
    longest, then sequence ``b``'s tokens past ``upto[b]`` taken out by prefilling it again alone), via the
    reference."""
    cache = kv.empty_cache(kv.cache_layout(b, hkv, SLOTS, D, scale_dtype=scale_dtype, float_dtype=float_dtype,
                                           **layout))
    for i, n in enumerate(upto.tolist()):
        if n:
            k = (torch.randn(1, hkv, n, D, generator=g) * 2).to(dtype)
            k[:, :, 0] *= 10  # an attention-sink-like outlier token
            v = torch.randn(1, hkv, n, D, generator=g).to(dtype)
            one = kv.cache_update(k, v, torch.arange(n)[None], [c[i:i + 1] for c in cache], **layout)
            for c, new in zip(cache, one):
                c[i:i + 1] = new
    return cache


CASES = [  # bits, k_block, v_group, window, sink, positions (one closing its key block, one not)
    pytest.param(8, 8, 16, 8, 1, (23, 29), id="int8"),
    pytest.param(4, 16, 8, 32, 1, (47, 37), id="int4"),
    pytest.param(2, 8, 8, 16, 0, (31, 20), id="int2"),
    pytest.param(4, 8, 16, 4, 2, (1, 15), id="int4-sink-ring-shorter-than-block"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits,kb,vg,window,sink,positions", CASES)
@pytest.mark.parametrize("hq,hkv", [(4, 4), (4, 2)], ids=["mha", "gqa"])
@pytest.mark.parametrize("dtype,rotary_dim", [(torch.bfloat16, D), (torch.float32, 16), (torch.bfloat16, None)],
                         ids=["bf16-rotary", "fp32-partial-rotary", "bf16-no-rotary"])
def test_write_packed_kv_is_rotary_then_cache_update_bit_for_bit(device, bits, kb, vg, window, sink, positions, hq,
                                                                 hkv, dtype, rotary_dim):
    """One token per sequence at positions in the middle of a 64-slot cache, one closing its key block (its scales
    from all the block's tokens) and one not (the block's later tokens zeros): the kernel's (rotated) q and k and
    all eight cache tensors equal the IR ``rotary`` then ``cache_update(inplace=True)``'s exactly, and with
    ``candidates`` its float candidates and mask ``float_candidates``' over the cache before the step. The step
    rewrites the block's codes and scales, the value row and the ring slot (what the reference changes); the
    float-ring and sink cases: a ring shorter than a key block (the block's older tokens read before the new key
    overwrites one of their slots) and a position inside the sink (its sink slot written too). With ``bounds`` the
    quantized tokens the query reads, ``[sink, position - window + 1)``. The candidates' launch again inside
    ``pdl_launches``: on a Hopper GPU with programmatic dependent launch (waiting at its start), the same bytes
    (under the interpreter the plain launch)."""
    from lowbit.kernels._common import pdl_launches

    layout = dict(bits=bits, k_block=kb, v_group=vg, window=window, sink=sink)
    g = torch.Generator().manual_seed(bits * 100 + kb + hq * hkv)
    pos = torch.tensor(positions)[:, None]
    cache = [c.to(device) for c in _written_cache(layout, 2, hkv, pos[:, 0], dtype, g,
                                                  float_dtype=torch.bfloat16 if bits == 2 else torch.float32,
                                                  scale_dtype=torch.float16 if bits == 8 else torch.float32)]
    q = torch.randn(2, hq, 1, D, generator=g).to(dtype).to(device)
    k = (torch.randn(2, hkv, 1, D, generator=g) * 3).to(dtype).to(device)
    v = torch.randn(2, hkv, 1, D, generator=g).to(dtype).to(device)
    cos = sin = None
    if rotary_dim is not None:
        angle = torch.randn(2, 1, 1, rotary_dim, generator=g) * 3
        cos, sin = angle.cos().to(dtype).to(device), angle.sin().to(dtype).to(device)
        rotary_dim = None if rotary_dim == D else rotary_dim
    kw = dict(rotary_dim=rotary_dim, **layout)
    pos = pos.to(device)
    assert write_packed_kv_unsupported(q, k, v, cos, sin, pos, cache, **kw) is None  # the kernel runs
    # the reference on the kernel's device: torch's CUDA scales divide by a reciprocal, 1 ulp off the CPU's in some
    # (H100, session 48: 81-168 of 1024-2048 key scales, so a few codes), as the kernel's RCP does there
    want = [c.clone() for c in cache]
    want_q, want_k = write_packed_kv_ref(q, k, v, cos, sin, pos, want, **kw)
    want_kf, want_vf, want_mask = kv.float_candidates(want_k.float(), v.float(), pos, cache[6], cache[7],
                                                      window=window, sink=sink)
    want_bounds = [[sink] * 2, torch.clamp(pos[:, 0] - window + 1, min=sink, max=SLOTS).tolist()]
    for candidates, pdl in ((False, False), (True, False), (True, True)):
        got = [c.clone() for c in cache]
        bounds = torch.full((2, 2), -1, dtype=torch.int32, device=device) if candidates else None
        with pdl_launches() if pdl else contextlib.nullcontext():
            got_q, got_k, *got_candidates = write_packed_kv(q, k, v, cos, sin, pos, *got, candidates=candidates,
                                                            bounds=bounds, **kw)
        assert bounds is None or bounds.tolist() == want_bounds, (bounds, want_bounds)
        assert torch.equal(got_q, want_q) and torch.equal(got_k, want_k)
        for part, a, w in zip(kv.CACHE_PARTS, got, want):
            assert torch.equal(a, w), part
        if candidates:  # the attention's float candidates, from the ring as it was before the write
            kf, vf, mask = got_candidates
            assert torch.equal(kf, want_kf) and torch.equal(vf, want_vf)
            assert torch.equal(mask, want_mask[:, 0].to(torch.int8)), (mask, want_mask)
    changed = {part for part, before, w in zip(kv.CACHE_PARTS, cache, want) if not torch.equal(before, w)}
    assert changed >= {"k_codes", "k_scale", "v_codes", "v_scale", "k_float", "v_float"}, changed


def test_write_packed_kv_refuses_what_the_kernel_cannot_take_and_runs_the_reference():
    """A prefill chunk, a head_dim or value group that is no power of two, cos/sin per head and a strided cache are
    named; the op then writes through the reference (a two-token chunk: ``cache_update``'s result, in place)."""
    layout = dict(bits=4, k_block=8, v_group=8, window=8, sink=1)
    g = torch.Generator().manual_seed(0)
    cache = _written_cache(layout, 2, 2, torch.tensor([5, 9]), torch.float32, g)
    q, k, v = (torch.randn(2, h, 2, D, generator=g) for h in (4, 2, 2))
    pos = torch.tensor([[5, 6], [9, 10]])
    assert "one token per sequence" in write_packed_kv_unsupported(q, k, v, None, None, pos, cache, **layout)
    assert "powers of two" in write_packed_kv_unsupported(q[..., :1, :24], k[..., :1, :24], v[..., :1, :24], None,
                                                          None, pos[:, :1], cache, **layout)
    assert "powers of two" in write_packed_kv_unsupported(q[..., :1, :], k[..., :1, :], v[..., :1, :], None, None,
                                                          pos[:, :1], cache, **{**layout, "v_group": 12})
    per_head = torch.ones(2, 4, 1, D)
    assert "broadcast" in write_packed_kv_unsupported(q[..., :1, :], k[..., :1, :], v[..., :1, :], per_head,
                                                      per_head, pos[:, :1], cache, **layout)
    strided = [c.transpose(2, 3).contiguous().transpose(2, 3) if i == 6 else c for i, c in enumerate(cache)]
    assert "contiguous" in write_packed_kv_unsupported(q[..., :1, :], k[..., :1, :], v[..., :1, :], None, None,
                                                       pos[:, :1], strided, **layout)
    want = kv.cache_update(k, v, pos, [c.clone() for c in cache], **layout)
    got = [c.clone() for c in cache]
    q_out, k_out = write_packed_kv(q, k, v, None, None, pos, *got, **layout)
    assert q_out is q and k_out is k  # no rotary: the heads as given
    assert all(torch.equal(a, w) for a, w in zip(got, want))  # the chunk copied into the cache it was given


EDGE_KB, EDGE_VG, EDGE_N = 8, 16, 16  # two whole key blocks, two value groups a token


def _edge_kv(dtype: torch.dtype, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values ``[1, 4, EDGE_N, D]`` whose kv heads hold the ranges where scale and zero point derivations
    part: head 0 constant blocks and groups (max == min, above and below 0), head 1 all zeros (+0 and -0), head 2 one
    large outlier in a random block and group (6e4, near fp16's largest), head 3 random."""
    k = torch.randn(1, 4, EDGE_N, D, generator=g) * 2
    v = torch.randn(1, 4, EDGE_N, D, generator=g)
    k[0, 0, :EDGE_KB], k[0, 0, EDGE_KB:] = 0.75, -1.5
    v[0, 0, :, :EDGE_VG], v[0, 0, :, EDGE_VG:] = 0.75, -1.5
    k[0, 1], v[0, 1] = 0.0, 0.0
    k[0, 1, EDGE_KB:], v[0, 1, :, EDGE_VG:] = -0.0, -0.0
    k[0, 2, 3, 5], v[0, 2, 4, 9] = 6e4, -6e4
    return k.to(dtype), v.to(dtype)


def _model_codes(x: torch.Tensor, bits: int, layout: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The accuracy model's (``insert_kv_qdq``: ``dynamic_qparams`` then ``quantize``, asymmetric) signed codes,
    float32 scale and zero point of ``x``, its ``layout`` as insert_dynamic_qdq gives the keys' or values'."""
    from lowbit.ir.quant import dynamic_qparams, quantize, unpack_int4

    qdtype = f"int{bits}"
    scale, zp = dynamic_qparams(x, qdtype=qdtype, symmetric=False, **layout)
    q = quantize(x, scale, zp, qdtype=qdtype, axis=layout["axis"], block_size=layout["block_size"])
    return (unpack_int4(q, signed=True) if bits < 8 else q).float(), scale, zp.float()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_the_packed_cache_writers_give_the_accuracy_models_codes_scales_and_zeros(device, bits, dtype):
    """Every way a packed cache is written derives its scales and zero points as the accuracy model does
    (``lowbit.ir.quant.asymmetric_qparams``, the reference of record): ``cache_attention_decode``'s decode steps
    through ``write_packed_kv`` (the kernel) and without it (``fused_write`` off: ``cache_update`` in place; both
    called here as it calls them, without its attention), and a prefill (``_prefill_update``) leave the codes,
    scales and zero points of the accuracy model's QDQ on the same K/V, bit for bit, at the edges of ``_edge_kv``:
    constant blocks (max == min), zeros, an outlier, fp16 and bf16 inputs. On CUDA the model runs there too (its
    scale then divides by a reciprocal, as the kernel's ``RCP`` does)."""
    layout = dict(bits=bits, k_block=EDGE_KB, v_group=EDGE_VG, window=EDGE_KB, sink=1)
    k, v = (t.to(device) for t in _edge_kv(dtype, torch.Generator().manual_seed(bits)))
    empty = kv.empty_cache(kv.cache_layout(1, 4, 2 * EDGE_N, D, float_dtype=dtype, **layout), device)
    written = {"write_packed_kv": [c.clone() for c in empty], "cache_update": [c.clone() for c in empty]}
    for t in range(EDGE_N):  # cache_attention_decode's two writes of a decode step, as it calls them
        kt, vt, pos = k[:, :, t:t + 1], v[:, :, t:t + 1], torch.tensor([[t]], device=device)
        assert write_packed_kv_unsupported(kt, kt, vt, None, None, pos, written["write_packed_kv"], **layout) is None
        write_packed_kv(kt, kt, vt, None, None, pos, *written["write_packed_kv"], checked=True, **layout)
        kv.cache_update(kt, vt, pos, written["cache_update"], inplace=True, **layout)
    with kv.host_checked_positions(EDGE_N - 1):
        written["prefill"] = kv.cache_update(k, v, torch.arange(EDGE_N, device=device)[None], empty, **layout)
    qmin = -(1 << (bits - 1))
    k_codes, k_scale, k_zp = _model_codes(k, bits, {"granularity": "per_block", "axis": 2, "block_size": EDGE_KB})
    v_codes, v_scale, v_zp = _model_codes(v, bits, {"granularity": "per_token", "axis": -1, "block_size": EDGE_VG})
    want = {"k_codes": k_codes - qmin, "k_scale": k_scale, "k_zero": k_zp - qmin, "v_codes": v_codes - qmin,
            "v_scale": v_scale, "v_zero": v_zp - qmin}
    assert torch.isfinite(k_scale).all() and (k_scale[0, 1] == SCALE_EPS).all()  # the zeros' floor scale
    for path, cache in written.items():
        parts = dict(zip(kv.CACHE_PARTS, cache))
        blocks = EDGE_N // EDGE_KB
        got = {"k_codes": kv.unpack_codes(parts["k_codes"][:, :, :EDGE_N], bits).float(),
               "k_scale": parts["k_scale"][:, :, :blocks], "k_zero": parts["k_zero"][:, :, :blocks],
               "v_codes": kv.unpack_codes(parts["v_codes"][:, :, :EDGE_N], bits).float(),
               "v_scale": parts["v_scale"][:, :, :EDGE_N], "v_zero": parts["v_zero"][:, :, :EDGE_N]}
        for name, w in want.items():
            a = got[name].float()
            assert torch.equal(a.view(torch.int32), w.contiguous().view(torch.int32)), (path, name, (a != w).sum())


@pytest.mark.skipif(not INTERP, reason="forces the kernel's CUDA arithmetic under the interpreter")
@pytest.mark.parametrize("bits", [8, 4, 2])
def test_the_write_kernels_cuda_scales_divide_as_torch_does_on_cuda(bits, monkeypatch):
    """On CUDA, torch's ``(hi - lo) / (qmax - qmin)`` (a tensor by a Python scalar) multiplies by the scalar's fp32
    reciprocal (PyTorch's ``div_true_kernel_cuda``), so there the reference's scales (the accuracy model's and
    ``cache_update``'s) are that product's, 1 ulp off the IEEE quotient in some of them (the GPU test of session
    48 found 81-168 of 1024-2048 key scales). The kernel's ``RCP`` (``scale_reciprocal``, nonzero on CUDA), forced
    here under the interpreter: its key and value scales are ``max((hi - lo) * fp32(1 / (qmax - qmin)), eps)`` of
    the ranges held to 0 bit for bit, where the division differs in some (so without it this would fail)."""
    from lowbit.kernels.act_quant import cuda_reciprocal

    rcp = cuda_reciprocal((1 << bits) - 1)
    monkeypatch.setattr(packed_kv_write, "scale_reciprocal", lambda b, x: cuda_reciprocal((1 << b) - 1))
    layout = dict(bits=bits, k_block=EDGE_KB, v_group=EDGE_VG, window=EDGE_KB, sink=1)
    g = torch.Generator().manual_seed(bits + 7)
    k, v = torch.randn(2, 4, EDGE_N, D, generator=g) * 3, torch.randn(2, 4, EDGE_N, D, generator=g)
    cache = kv.empty_cache(kv.cache_layout(2, 4, EDGE_N, D, **layout))
    for t in range(EDGE_N):
        write_packed_kv(k[:, :, :1], k[:, :, t:t + 1], v[:, :, t:t + 1], None, None, torch.full((2, 1), t), *cache,
                        **layout)
    kb = k.reshape(2, 4, EDGE_N // EDGE_KB, EDGE_KB, D)
    vg = v.reshape(2, 4, EDGE_N, D // EDGE_VG, EDGE_VG)
    for got, lo, hi in ((cache[1], kb.amin(3), kb.amax(3)), (cache[4], vg.amin(-1), vg.amax(-1))):
        span = hi.clamp(min=0) - lo.clamp(max=0)
        assert torch.equal(got, (span * rcp).clamp(min=SCALE_EPS))
        assert not torch.equal(got, (span / ((1 << bits) - 1)).clamp(min=SCALE_EPS))


def _tiny_llama_kv(recipe: str, backend: str, monkeypatch: pytest.MonkeyPatch | None = None,
                   pdl: bool | None = None):
    """A random 2-layer Llama (4 query heads of 32 channels over 2 kv heads, weights x4 for sharp logits, float32:
    no near-ties between the kernel's and SDPA's rounding) compiled for generation with ``recipe``'s packed
    cache on ``backend``. No CUDA graph: every decode step runs its Python, so the tests count its calls (a replayed
    graph calls none: on an H100 the count was 6 of 14). ``pdl``: the triton backend's option (None: its default)."""
    from conftest import tiny_llama

    from lowbit.api import compile_model
    from lowbit.generate import GenerationSpec

    torch.manual_seed(0)
    model = tiny_llama(hidden=128, inter=128, heads=4, kv_heads=2, layers=2, max_positions=128)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4)
    dev = "cuda" if torch.cuda.is_available() else None
    options = {"backend_options": {"compile": False, **({} if pdl is None else {"pdl": pdl})}} \
        if backend == "triton" else {}
    return compile_model(model, recipe=recipe, backend=backend, device=dev,
                         generation=GenerationSpec(max_length=96, max_batch=2, cuda_graph=False), **options)


PROMPTS = [[(7 * i) % 59 + 2 for i in range(66)], [(5 * i) % 53 + 3 for i in range(27)]]


@functools.cache
def _reference_tokens(recipe: str) -> list[list[int]]:
    """The torch backend's greedy tokens for ``PROMPTS`` (8 each) over ``recipe``'s packed cache: made once."""
    return _tiny_llama_kv(recipe, "torch").generate(PROMPTS, 8, stop_tokens=()).tokens


@needs_kernels
@pytest.mark.parametrize("recipe", ["kv4", "kv2"])
def test_a_packed_cache_decode_step_writes_each_layer_in_one_launch(recipe, monkeypatch):
    """The kv4 / kv2 recipes' packed cache on the triton backend: each layer's ``rotary(q)``, ``rotary(k)`` and
    packed write are one ``write_packed_kv`` launch in every decode step. The lowered graph holds no ``rotary``
    node (the two per layer went into the cache attention node, with its cos/sin), the report names the fusion,
    and a decode step calls no ``cache_update`` (74 aten ops per layer before) nor ``float_candidates`` (25) and
    launches the write kernel once per layer (the kernel path: nothing it refuses). Two prompts (66 and 27 tokens,
    past kv4's 32-token window and kv2's 64, over key-block boundaries) generate the torch reference's greedy
    tokens."""
    from lowbit.ir.ops import rotary

    ref = _reference_tokens(recipe)
    compiled = _tiny_llama_kv(recipe, "triton")
    gm = compiled.runner.gm
    assert not [n for n in gm.graph.nodes if n.target is rotary]
    packed = [n for n in gm.graph.nodes if n.kwargs.get("fused_write")]
    assert len(packed) == 2 and all(n.kwargs.get("cos") is not None for n in packed)
    assert ("packed k/v cache write fused: 2 layers on write_packed_kv (a decode step's quantized keys and values "
            "and float window in one launch; the rotary of q and k inside for 2 of them)"
            in compiled.runner.report_text())
    updates, candidates, writes, refused = [], [], [], []
    real_update, real_write, real_why = kv.cache_update, packed_kv_write.write_packed_kv, \
        packed_kv_write.write_packed_kv_unsupported
    real_candidates = kv._candidate_mask  # float_candidates' mask, which the reference's attention makes too
    monkeypatch.setattr(kv, "cache_update", lambda k, *a, **kw: updates.append(k.shape[2]) or real_update(k, *a, **kw))
    real_prefill = kv._prefill_update  # a prefill from position 0's write (cache_update's, in fewer ops)
    monkeypatch.setattr(kv, "_prefill_update",
                        lambda k, *a, **kw: updates.append(k.shape[2]) or real_prefill(k, *a, **kw))
    monkeypatch.setattr(kv, "_candidate_mask",
                        lambda pos, **kw: candidates.append(pos.shape[1]) or real_candidates(pos, **kw))
    monkeypatch.setattr(packed_kv_write, "write_packed_kv", lambda *a, **kw: writes.append(1) or real_write(*a, **kw))
    monkeypatch.setattr(packed_kv_write, "write_packed_kv_unsupported",
                        lambda *a, **kw: refused.append(real_why(*a, **kw)) or refused[-1])
    got = compiled.generate(PROMPTS, 8, stop_tokens=()).tokens
    assert got == ref, (got, ref)
    assert updates and all(n > 1 for n in updates), updates  # the prefill's chunks only
    assert candidates and all(n > 1 for n in candidates), candidates
    assert len(writes) == 2 * 7, writes  # two layers, seven decode steps after the prefill's token
    assert refused == [None] * len(writes), refused  # the kernel path each time (asked once, by the step)


@needs_kernels
def test_rotary_cache_off_keeps_the_packed_cache_writes_ops():
    """``rotary_cache=False`` (the before of a GPU comparison, ``tools/profile_decode.py --no-rotary-cache``)
    leaves the rotaries as captured and the packed write on ``cache_update``'s ops, and the report says nothing of
    the fusion."""
    from lowbit.backends.triton_backend import lower
    from lowbit.ir.ops import rotary

    graph = _tiny_llama_kv("kv4", "torch").graph
    runner = lower(graph, "cuda" if torch.cuda.is_available() else None, compile=False, rotary_cache=False)
    assert len([n for n in runner.gm.graph.nodes if n.target is rotary]) == 4
    assert [n.kwargs.get("fused_write") for n in runner.gm.graph.nodes if "fused_write" in n.kwargs] == [False] * 2
    assert "packed k/v cache write fused" not in runner.report_text()


@needs_kernels
@pytest.mark.parametrize("pdl", [True, False], ids=["pdl", "no-pdl"])
def test_the_packed_cache_decode_step_launches_inside_pdl_launches_with_the_pdl_option(pdl, monkeypatch):
    """The triton backend's ``pdl``: each packed-cache attention node carries it, and a decode step's
    ``write_packed_kv`` and ``decode_attention`` (the write, split and merge kernels) run inside ``pdl_launches`` with
    it on and outside with it off, so on Hopper they launch with programmatic dependent launch as the GEMVs around
    them do (issue 18: the kv4 step's three attention kernels were its only launches without it). The prefill's
    attention is torch ops, the PDL state is the thread's again after each call, and the greedy tokens are the
    torch reference's either way (under the interpreter the kernels launch plainly: ``pdl_on`` is False)."""
    from lowbit.backends.triton_backend import pdl_supported
    from lowbit.kernels import _common
    from lowbit.kernels import decode_attention as da

    compiled = _tiny_llama_kv("kv4", "triton", pdl=pdl)
    on = pdl and pdl_supported("cuda" if torch.cuda.is_available() else "cpu")
    nodes = [n for n in compiled.runner.gm.graph.nodes if "fused_write" in n.kwargs]
    assert [n.kwargs.get("pdl") for n in nodes] == [on] * 2, [n.kwargs for n in nodes]
    states: dict[str, list[bool]] = {"write": [], "attention": []}
    real_write, real_attention = packed_kv_write.write_packed_kv, da.decode_attention
    monkeypatch.setattr(packed_kv_write, "write_packed_kv",
                        lambda *a, **kw: states["write"].append(_common._PdlState.on) or real_write(*a, **kw))
    monkeypatch.setattr(da, "decode_attention",
                        lambda *a, **kw: states["attention"].append(_common._PdlState.on) or real_attention(*a, **kw))
    got = compiled.generate(PROMPTS, 8, stop_tokens=()).tokens
    assert got == _reference_tokens("kv4"), got
    assert states == {"write": [on] * 2 * 7, "attention": [on] * 2 * 7}, states  # 2 layers x 7 decode steps
    assert _common._PdlState.on is False


@pytest.mark.skipif(not INTERP, reason="counts the interpreter's launches")
def test_a_packed_cache_decode_step_runs_three_kernels_a_block_and_no_torch_ops_between_them(
        wide_interpreted_folds: int) -> None:
    """``tools/count_step_launches.py``'s kv4 scheme (SmolLM2's heads, 2 blocks, W4A16 g64 + the packed int4 cache):
    a block's attention is ``_write_packed_kv``, ``_split_kernel_v3`` and ``_reduce_kernel`` (17 launches a step,
    the float cache's step 15), with the backend's ``merge_in_split`` on the first two, the split's last program per
    (sequence, head group) merging (15; the float cache's 13). The packed attention's Python runs no ATen compute
    op: its bounds were seven torch ops a block (two casts, ``full_like``, ``sub``, ``add``, two ``clamp``) and its
    output a cast, each a launch on the GPU between PDL kernels; the write kernel writes the bounds and the merge its
    output dtype now."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    import count_step_launches as counter

    for merge_in_split, kernels, total in ((True, ["_write_packed_kv", "_split_kernel_v3"], 15),
                                           (False, ["_write_packed_kv", "_split_kernel_v3", "_reduce_kernel"], 17)):
        rows, layers = counter.count("w4a16-g64+kv4", 2, merge_in_split=merge_in_split)
        attention = [(ks, inner) for _, target, ks, inner in rows if target == "_cache_attention"]
        assert attention == [(kernels, [])] * layers, (merge_in_split, attention)
        assert sum(len(ks) for _, _, ks, _ in rows) == total
    for merge_in_split, kernels, total in ((True, ["_sdpa_split"], 13), (False, ["_sdpa_split", "_sdpa_merge"], 15)):
        rows, layers = counter.count("float", 2, merge_in_split=merge_in_split)  # the float cache's one or two
        assert [ks for _, _, ks, _ in rows if "_sdpa_split" in ks] == [kernels] * layers, (merge_in_split, rows)
        assert sum(len(ks) for _, _, ks, _ in rows) == total
