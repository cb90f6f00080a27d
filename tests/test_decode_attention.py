"""The quantized-KV decode attention: its cache is the accuracy model's QDQ, its reference is the accuracy model's
attention, and the Triton kernel (TRITON_INTERPRET=1 on CPU) is its reference."""

from __future__ import annotations

import contextlib
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from conftest import run_interpreted

from lowbit.ir.quant import dequantize, dynamic_qparams, quantize
from lowbit.kernels import decode_attention as da

QDTYPE = {8: "int8", 4: "int4", 2: "int2"}


def _accuracy_model_qdq(x: torch.Tensor, bits: int, **layout) -> torch.Tensor:
    """dynamic_qparams -> quantize -> dequantize with the kwargs insert_qdq writes for keys / values."""
    scale, zp = dynamic_qparams(x, qdtype=QDTYPE[bits], symmetric=False, **layout)
    kw = {"qdtype": QDTYPE[bits], "axis": layout["axis"], "block_size": layout["block_size"]}
    return dequantize(quantize(x, scale, zp, **kw), scale, zp, out_dtype=torch.float32, **kw)


KEY_LAYOUT = {"granularity": "per_block", "axis": 2, "block_size": 16}
VALUE_LAYOUT = {"granularity": "per_token", "axis": -1, "block_size": 8}


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_cache_dequantizes_to_the_accuracy_models_qdq(bits):
    torch.manual_seed(0)
    k, v = torch.randn(2, 2, 64, 16) * 3, torch.randn(2, 2, 64, 16)
    k[:, :, 0] *= 20  # an attention-sink-like outlier token
    kc, ks, kz = da.quantize_keys(k, bits, 16)
    vc, vs, vz = da.quantize_values(v, bits, 8)
    assert kc.dtype == torch.uint8 and kc.shape[-1] == 16 * bits // 8
    assert torch.equal(da.dequantize_keys(kc, ks, kz, bits), _accuracy_model_qdq(k, bits, **KEY_LAYOUT))
    assert torch.equal(da.dequantize_values(vc, vs, vz, bits), _accuracy_model_qdq(v, bits, **VALUE_LAYOUT))


def _case(bits: int, seed: int = 0, b: int = 2, hq: int = 4, hkv: int = 2, d: int = 16, s: int = 64,
          window: int = 16, sink: int = 1):
    """A cache of ``s`` tokens whose queries sit at different positions; the float buffer holds the sink and the
    window (as a real cache keeps them), ``lo``/``hi`` bound the quantized tokens each query reads."""
    g = torch.Generator().manual_seed(seed)
    k, v = torch.randn(b, hkv, s, d, generator=g), torch.randn(b, hkv, s, d, generator=g)
    q = torch.randn(b, hq, d, generator=g)
    positions = torch.tensor([s - 1, s - 21])[:b]
    kc, ks, kz = da.quantize_keys(k, bits, 16)
    vc, vs, vz = da.quantize_values(v, bits, 8)
    idx = torch.arange(s)
    float_valid = (idx[None] < sink) | ((positions[:, None] - idx[None] < window) & (idx[None] <= positions[:, None]))
    lo = torch.full((b,), sink)
    hi = positions - window + 1
    return dict(q=q, k=k, v=v, kc=kc, ks=ks, kz=kz, vc=vc, vs=vs, vz=vz, positions=positions,
                float_valid=float_valid, lo=lo, hi=hi, window=window, sink=sink)


@pytest.mark.parametrize("bits", [4, 2])
def test_reference_equals_the_accuracy_models_attention(bits):
    """insert_kv_qdq's form: attention over [quantized ; float] keys with a mask choosing, per query, the float copy
    inside the window and the sink, the quantized copy elsewhere (and nothing after the query)."""
    c = _case(bits)
    kq = _accuracy_model_qdq(c["k"], bits, **KEY_LAYOUT)
    vq = _accuracy_model_qdq(c["v"], bits, **VALUE_LAYOUT)
    s = c["k"].shape[2]
    idx = torch.arange(s)
    causal = idx[None] <= c["positions"][:, None]
    old = (c["positions"][:, None] - idx[None] >= c["window"]) & (idx[None] >= c["sink"])
    mask = torch.cat([causal & old, causal & ~old], -1)[:, None, None, :]  # [B, 1, 1, 2S]
    keys = torch.cat([kq, c["k"]], 2).repeat_interleave(2, 1)
    values = torch.cat([vq, c["v"]], 2).repeat_interleave(2, 1)
    want = torch.nn.functional.scaled_dot_product_attention(c["q"][:, :, None], keys, values, attn_mask=mask)[:, :, 0]
    got = da.decode_attention_reference(c["q"], c["kc"], c["ks"], c["kz"], c["vc"], c["vs"], c["vz"], bits=bits,
                                        lo=c["lo"], hi=c["hi"], k_float=c["k"], v_float=c["v"],
                                        float_valid=c["float_valid"])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def _apply(check, case: tuple) -> None:
    """``check(*case)``, a trailing dict of the case being its launch options."""
    if isinstance(case[-1], dict):
        check(*case[:-1], **dict(case[-1]))
    else:
        check(*case)


def _run_cases(runs: list[tuple[str, object]], which: str) -> None:
    """For each (name of a case list, check): ``check`` on the cases its ``CORE`` entry names (``which`` = "core")
    or on all of them. In process on CUDA, and on CPU where this process already runs Triton's interpreter (conftest
    sets TRITON_INTERPRET=1 before anything imports triton); otherwise in one fresh interpreter (``run_interpreted``:
    triton reads the variable at import; its start and imports cost ~10 s, so the core cases of every list share
    one)."""
    pytest.importorskip("triton")
    plan = [(cases, check, CORE[cases] if which == "core" else tuple(range(len(globals()[cases]))))
            for cases, check in runs]
    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        for cases, check, idx in plan:
            for i in idx:
                _apply(check, globals()[cases][i])
        return
    code = "import tests.test_decode_attention as t\n" + "".join(
        f"for i in {list(idx)}:\n    t._apply(t.{check.__name__}, t.{cases}[i])\n" for cases, check, idx in plan)
    run_interpreted(code + "print('ok')")


CORE = {"KERNEL_CASES": (2, 7), "LAUNCH_CASES": (5, 6, 7, 8, 9), "REAL_LAYOUT_CASES": (7,)}
ALL = [pytest.param("all", id="all", marks=pytest.mark.slow)]
"""The default suite runs a few representative cases of each list (``test_triton_kernels_core_cases``), each kernel
test every case as ``slow`` (the interpreter takes ~4 s a case on CI's two cores). Between them the default cases
cover 2-, 4- and 8-bit codes (8: LAUNCH_CASES[6]), split and unsplit launches, GQA and SmolLM2's 3 query heads per
kv head at head dim 128."""


# (bits, split, query heads, kv heads, block_n): 64 tokens, key blocks of 16
KERNEL_CASES = [(8, 64, 4, 2, 16), (4, 16, 4, 2, 16), (2, 32, 4, 2, 32), (4, 48, 4, 2, 16), (4, 32, 2, 2, 32),
                (2, 16, 2, 2, 16), (4, 32, 8, 1, 16), (4, None, 2, 2, None)]


def _check_kernel(bits: int, split: int | None, hq: int, hkv: int, block_n: int | None, **launch) -> None:
    """Kernel vs reference. Tolerance: 2e-5 abs/rel under the interpreter (fp32 throughout); on CUDA 2e-3, as
    the GQA path's ``tl.dot`` runs in TF32 (10-bit mantissa) on tensor cores."""
    scale_dtype = launch.pop("scale_dtype", torch.float16)  # the second check's half-precision scales
    c = _case(bits, seed=bits + hq, hq=hq, hkv=hkv)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    tol = 2e-3 if dev == "cuda" and hq != hkv else 2e-5
    args = [c[n].to(dev) for n in ("q", "kc", "ks", "kz", "vc", "vs", "vz")]
    kw = dict(bits=bits, lo=c["lo"].to(dev), hi=c["hi"].to(dev), k_float=c["k"].to(dev), v_float=c["v"].to(dev),
              float_valid=c["float_valid"].to(dev))
    want = da.decode_attention_reference(*args, **kw)
    got = da.decode_attention(*args, split=split, block_n=block_n, **launch, **kw)
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    no_float = {k: v for k, v in kw.items() if k not in ("k_float", "v_float", "float_valid")}
    torch.testing.assert_close(da.decode_attention(*args, split=split, block_n=block_n, **launch, **no_float),
                               da.decode_attention_reference(*args, **no_float), rtol=tol, atol=tol)
    # half-precision scales (a smaller cache): the kernel reads them as the reference does
    half = [a.to(scale_dtype) if i in (2, 5) else a for i, a in enumerate(args)]
    torch.testing.assert_close(da.decode_attention(*half, split=split, block_n=block_n, **launch, **kw),
                               da.decode_attention_reference(*half, **kw), rtol=tol, atol=tol)


@pytest.mark.parametrize("which", ALL)
def test_triton_kernel_matches_reference(which):
    """Several splits per sequence, queries at different positions, GQA (2 and 4 query heads per kv head) and
    MHA, 8/4/2-bit codes, chunks that start/end inside a key block and inside an inner step. On CPU the kernel runs
    under TRITON_INTERPRET=1 (``_run_cases``)."""
    _run_cases([("KERNEL_CASES", _check_kernel)], which)


# launch options of the split kernel (key blocks of 16 tokens, head dim 16, value groups of 8): steps shorter than a
# key block (several unrolled steps per scale row), longer (one scale row per token row), channel chunks other
# than the scale dtype's default, bf16 scales
LAUNCH_CASES = [
    (4, 32, 4, 2, 8, {"num_warps": 8, "variant": "v1"}),
    (2, 16, 2, 2, 8, {"scale_dtype": torch.bfloat16}),
    (8, 32, 2, 2, 64, {"chunk": 4, "num_warps": 2, "variant": "v1"}),
    (4, 64, 2, 2, 4, {"chunk": 2, "variant": "v1"}),
    (2, 48, 4, 1, 4, {"chunk": 8, "variant": "v1"}),
    # v2: GQA heads per program, two warps, the value rows as a tree (vchain=False)
    (4, 32, 8, 2, 16, {"variant": "v2", "heads": 2, "num_warps": 2}),
    (8, 48, 4, 1, 16, {"variant": "v2", "heads": 1, "vchain": False}),
    # the merge two chunks a step (REDUCE_CHUNKS is 128): four chunks a head, merged with a running maximum
    (4, 16, 4, 2, 16, {"reduce_chunks": 2}),
    # int2 without GQA on v4: two warps a program once a chunk holds V4_INT2_MHA_MIN_BLOCKS key blocks (4 x 16 here)
    (2, 64, 2, 2, 16, {}),
    # a register cap (ptxas' maxnreg; on the GPU the kernel may spill, never change its result)
    (4, 48, 4, 2, 16, {"maxnreg": 96}),
]


def test_int2_mha_warps_follow_the_chunk_length():
    """int2 without GQA: one warp for one-to-three-block chunks (batch 1 x 4K), two from 4 blocks (batch 1 x 32K, 16 x
    4K: session 23's rows), one again from ``V4_INT2_MHA_ONE_WARP_BLOCKS`` (16 x 32 heads x 32K, issue 18's shape:
    593.8 us on one warp against 704.2 on two, H200 session 51) - the chunks ``_default_split`` makes there."""
    block = 32
    chunks = {shape: da._default_split(shape[2], shape[0] * shape[1], block)
              for shape in ((1, 32, 4096), (1, 32, 32768), (16, 32, 4096), (16, 32, 32768))}
    assert {shape: da.int2_mha_warps(c, block) for shape, c in chunks.items()} == {
        (1, 32, 4096): 1, (1, 32, 32768): da.V4_INT2_MHA_WARPS, (16, 32, 4096): da.V4_INT2_MHA_WARPS,
        (16, 32, 32768): 1}, chunks
    assert da.V4_INT2_MHA_WARPS == 2
    assert [da.int2_mha_warps(n * block, block) for n in (3, 4, 31, 32, 64)] == [1, 2, 2, 1, 1]


def test_launch_option_of_another_variant_is_an_error():
    """``interior`` belongs to the v3/v4 split kernel: asked of v1/v2 it is refused by name, not ignored."""
    pytest.importorskip("triton")
    g = torch.Generator().manual_seed(0)
    k, v, q = torch.randn(1, 2, 64, 16, generator=g), torch.randn(1, 2, 64, 16, generator=g), torch.randn(1, 2, 16)
    kc, ks, kz = da.quantize_keys(k, 4, 16)
    vc, vs, vz = da.quantize_values(v, 4, 16)
    for variant in ("v1", "v2"):
        with pytest.raises(ValueError, match=f"interior is a v3/v4 option \\(variant='{variant}'\\)"):
            da.decode_attention(q, kc, ks, kz, vc, vs, vz, bits=4, lo=torch.tensor([0]), hi=torch.tensor([64]),
                                variant=variant, interior=False)
        with pytest.raises(ValueError, match=f"warp_blocks is a v3/v4 option \\(variant='{variant}'\\)"):
            da.decode_attention(q, kc, ks, kz, vc, vs, vz, bits=4, lo=torch.tensor([0]), hi=torch.tensor([64]),
                                variant=variant, warp_blocks=True)
    # raw scores leave the 2**49 and the zero points to the exponent's offset: v4's, and not under ALiBi's bias
    with pytest.raises(ValueError, match="raw_scores is v4's without ALiBi slopes \\(variant='v3', alibi_slopes none"):
        da.decode_attention(q, kc, ks, kz, vc, vs, vz, bits=4, lo=torch.tensor([0]), hi=torch.tensor([64]),
                            variant="v3", raw_scores=True)
    with pytest.raises(ValueError, match="raw_scores is v4's without ALiBi slopes \\(variant='v4', alibi_slopes given"):
        da.decode_attention(q, kc, ks, kz, vc, vs, vz, bits=4, lo=torch.tensor([0]), hi=torch.tensor([64]),
                            raw_scores=True, alibi_slopes=torch.ones(2), float_positions=torch.zeros(1, 0))


@pytest.mark.parametrize("which", ALL)
def test_triton_kernel_launch_options_match_reference(which):
    """Every launch the benchmark sweeps computes the reference: block_n below/above k_block, channel chunks of
    2..8, bf16 scales (TRITON_INTERPRET=1 on CPU, as above)."""
    _run_cases([("LAUNCH_CASES", _check_kernel)], which)


def _check_real_layout(bits: int, hq: int, hkv: int, v_group: int, tokens: int = 192, **launch) -> None:
    """Head dim 128, key blocks of 32 tokens (the kv recipes' layout): the v2 kernel's full tile (8 token rows per
    thread, 16 channels per thread, every field position of a word) against the reference, queries reading
    different quantized ranges and float buffers, float16 scales. ``tokens``: the cache's length (at least 80: the
    second query's quantized range ends 70 tokens before it); the interpreter's time grows with it (a program a
    key block)."""
    g = torch.Generator().manual_seed(bits + hq)
    b, d, s = 2, 128, tokens
    k, v = torch.randn(b, hkv, s, d, generator=g), torch.randn(b, hkv, s, d, generator=g)
    q = torch.randn(b, hq, d, generator=g)
    kc, ks, kz = da.quantize_keys(k, bits, 32)
    vc, vs, vz = da.quantize_values(v, bits, v_group)
    float_valid = torch.ones(b, 8, dtype=torch.bool)
    float_valid[1, 3:] = False
    kw = dict(bits=bits, lo=torch.tensor([1, 5]), hi=torch.tensor([s - 16, s - 70]), k_float=k[:, :, -8:],
              v_float=v[:, :, -8:], float_valid=float_valid)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    args = [t.to(dev) for t in (q, kc, ks.half(), kz, vc, vs.half(), vz)]
    kw = {key: t.to(dev) if isinstance(t, torch.Tensor) else t for key, t in kw.items()}
    torch.testing.assert_close(da.decode_attention(*args, **launch, **kw), da.decode_attention_reference(*args, **kw),
                               rtol=2e-5, atol=2e-5)


REAL_LAYOUT_CASES = [(4, 4, 4, 32, {}), (2, 4, 2, 16, {}), (8, 4, 1, 32, {"split": 64}),
                     (4, 4, 4, 32, {"variant": "v2"}), (2, 8, 2, 16, {"variant": "v2", "heads": 4}),
                     (4, 4, 2, 32, {"variant": "v2", "split": 96}), (2, 4, 4, 16, {"variant": "v2", "num_warps": 2}),
                     # 3 query heads per kv head (SmolLM2's 9 / 3): one head per program, on 96 tokens (three key
                     # blocks a head: 192 made it 15 s of the default suite under the interpreter, for no other path)
                     (4, 6, 2, 32, {"tokens": 96})]


@pytest.mark.parametrize("which", ALL)
def test_triton_kernel_real_layout_matches_reference(which):
    """The kv4 / kv2 / kv8 cache layouts at head dim 128 (TRITON_INTERPRET=1 on CPU, as above)."""
    _run_cases([("REAL_LAYOUT_CASES", _check_real_layout)], which)


# v3 / v4 (row tiles; v4 with subnormal code fields): MHA and GQA (4 heads per program, 2, SmolLM2's 3 -> 1) at
# 4/2/8 bits, quantized ranges that start and end inside key blocks, the float sink + window; a split over several
# chunks and half-block steps
_ROW_CASES = [(4, 4, 4, 32, {}), (2, 4, 4, 16, {}), (8, 4, 4, 32, {}), (4, 8, 2, 32, {}),
              (2, 8, 2, 16, {"heads": 2, "split": 64}), (8, 8, 2, 32, {"block_n": 16}), (4, 6, 2, 32, {})]
V3_CASES = [(*c[:-1], {**c[-1], "variant": v}) for c in _ROW_CASES for v in ("v3", "v4")]
# and at head dim 16 / key blocks of 16 (_check_kernel: without a float buffer too, float16 and bfloat16 scales)
_ROW_KERNEL_CASES = [(4, 16, 4, 2, 16, {}), (2, 16, 2, 2, 16, {}), (8, 48, 4, 1, 16, {}),
                     (2, 32, 4, 2, 32, {"scale_dtype": torch.bfloat16}), (4, None, 2, 2, None, {}),
                     (4, 48, 4, 1, 16, {"interior": False})]  # every key block through the masked path
V3_KERNEL_CASES = [(*c[:-1], {**c[-1], "variant": v}) for c in _ROW_KERNEL_CASES for v in ("v3", "v4")]
CORE.update({"V3_CASES": (7,), "V3_KERNEL_CASES": (2, 5, 11)})


@pytest.mark.parametrize("which", [pytest.param("core", id="core"), *ALL])
def test_triton_kernel_v3_v4_match_reference(which):
    """The v3 / v4 split kernel against the reference (TRITON_INTERPRET=1 on CPU, as above): by default v4 on GQA
    int4 at head dim 128 (4 heads per program) and on 4-head GQA int8 at head dim 16 (interior key blocks unmasked,
    and with ``interior=False``), v3 on MHA int2."""
    _run_cases([("V3_CASES", _check_real_layout), ("V3_KERNEL_CASES", _check_kernel)], which)


# v4's warp_blocks (each warp's token lanes on key blocks of their own; off by default until a GPU times it) and
# raw_scores (the zero-point dot and the scores' 2**49 once per key block), session 48. Head dim 128: int2 without GQA
# on 2 warps over a 160-token cache (5 key blocks: a chunk's last step of 2 blocks has one past the cache, whose key
# scales only masked threads would read), chunks of 3 blocks (a step half outside its chunk), every step masked, the
# previous layout (warp_blocks=False); raw scores at 2/4/8 bits, MHA and GQA, on 1, 2 and 4 warps. Each query reads a
# different quantized range (sink 1 / 5, the window's start) and a float buffer with invalid slots (_check_real_layout).
WARP_BLOCK_CASES = [(2, 4, 4, 16, {"num_warps": 2, "warp_blocks": True, "split": 96, "tokens": 160}),
                    (2, 4, 4, 16, {"num_warps": 2, "warp_blocks": True, "tokens": 160}),
                    (2, 4, 4, 16, {"num_warps": 2, "warp_blocks": True, "interior": False}),
                    (2, 4, 4, 16, {"num_warps": 2, "warp_blocks": False, "split": 96}),
                    (2, 4, 4, 16, {"num_warps": 2, "warp_blocks": True, "raw_scores": True, "split": 96,
                                   "tokens": 160}),
                    (2, 4, 4, 16, {"raw_scores": True}),
                    (4, 4, 4, 32, {"raw_scores": True}),
                    (8, 4, 1, 32, {"split": 64, "raw_scores": True}),
                    (2, 8, 2, 16, {"heads": 2, "num_warps": 2, "raw_scores": True, "split": 96}),
                    # half-block steps (2 per key block a warp), and 4 warps on 4 blocks a step
                    (2, 4, 4, 16, {"num_warps": 2, "warp_blocks": True, "block_n": 16, "split": 96, "tokens": 160}),
                    (4, 4, 4, 32, {"num_warps": 4, "warp_blocks": True, "split": 128, "raw_scores": True,
                                   "tokens": 160})]
# and at head dim 16 / key blocks of 16 (_check_kernel: float16 and bfloat16 scales, with and without a float buffer)
WARP_BLOCK_KERNEL_CASES = [(2, 64, 2, 2, 16, {"num_warps": 2, "warp_blocks": True, "raw_scores": True}),
                           (4, 48, 4, 1, 16, {"num_warps": 2, "warp_blocks": True, "raw_scores": True}),
                           (2, 32, 4, 2, 32, {"num_warps": 2, "warp_blocks": True, "scale_dtype": torch.bfloat16})]
CORE.update({"WARP_BLOCK_CASES": (0, 4), "WARP_BLOCK_KERNEL_CASES": (0,)})


@pytest.mark.parametrize("which", [pytest.param("core", id="core"), *ALL])
def test_triton_kernel_warp_blocks_and_raw_scores_match_reference(which):
    """v4 with each warp on its own key blocks and with raw scores against the reference (TRITON_INTERPRET=1 on CPU,
    as above); by default int2 without GQA on 2 warps over a ragged cache in 3-block chunks, with and without raw
    scores, and raw scores at head dim 16 on 2 warps."""
    _run_cases([("WARP_BLOCK_CASES", _check_real_layout), ("WARP_BLOCK_KERNEL_CASES", _check_kernel)], which)


def test_warp_blocks_give_each_warp_whole_key_blocks():
    """The launch geometry: on 2 warps at head dim 128 int2, warp_blocks keeps one warp's tile (4 token lanes, 8 rows
    of a 32-token block per thread) and makes a step 2 key blocks; without it the 2 warps split each block (4 rows
    per thread). One warp is the same either way."""
    common = dict(block_n=32, chunk=16, heads=None)
    wb = da.v2_geometry(128, 2, 32, 16, 1, num_warps=2, warp_blocks=True, **common)
    split = da.v2_geometry(128, 2, 32, 16, 1, num_warps=2, warp_blocks=False, **common)
    one = da.v2_geometry(128, 2, 32, 16, 1, num_warps=1, **common)
    assert (wb["TT"], wb["N0"], wb["WB"]) == (8, 8, 2)
    assert (split["TT"], split["N0"], split["WB"]) == (8, 4, 1)
    assert da.v2_geometry(128, 2, 32, 16, 1, num_warps=1, warp_blocks=True, **common) == one
    assert wb["TT"] // wb["WB"] * wb["N0"] == 32  # a warp's token lanes cover one whole key block


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
def test_the_merge_writes_the_output_dtype_as_a_cast_of_the_float32_result(out_dtype):
    """``out_dtype`` (the packed decode step's activation dtype): ``_reduce_kernel`` rounds its result onto that grid
    itself, bit for bit what ``.to(out_dtype)`` of the float32 output gives (the cast launch it replaces), with and
    without the float buffer; int32 bounds given as they are (``bounds_ready``) read the same tokens."""
    pytest.importorskip("triton")
    if not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
        pytest.skip("the kernel needs CUDA or TRITON_INTERPRET=1")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    c = _case(4, seed=11, hq=4, hkv=2)
    args = [c[n].to(dev) for n in ("q", "kc", "ks", "kz", "vc", "vs", "vz")]
    args[0] = args[0] * 8  # sharp scores: outputs spread over many bf16 / fp16 grid steps
    kw = dict(bits=4, lo=c["lo"].to(dev), hi=c["hi"].to(dev), k_float=c["k"].to(dev), v_float=c["v"].to(dev),
              float_valid=c["float_valid"].to(dev))
    no_float = {k: v for k, v in kw.items() if k not in ("k_float", "v_float", "float_valid")}
    for launch in (kw, no_float):
        want = da.decode_attention(*args, split=16, **launch)
        got = da.decode_attention(*args, split=16, out_dtype=out_dtype, **launch)
        assert got.dtype == out_dtype and torch.equal(got, want.to(out_dtype))
        assert not torch.equal(got.float(), want)  # the rounding is real
        ready = {**launch, "lo": launch["lo"].to(torch.int32), "hi": launch["hi"].to(torch.int32)}
        assert torch.equal(da.decode_attention(*args, split=16, bounds_ready=True, **ready), want)
    with pytest.raises(ValueError, match="bounds_ready needs contiguous int32"):
        da.decode_attention(*args, split=16, bounds_ready=True, **kw)


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["v2", "v3", "v4"])
def test_decode_attention_inside_pdl_launches_is_the_plain_launch_bit_for_bit(variant):
    """Inside ``pdl_launches`` (the triton backend's ``pdl``, a packed-cache decode step) the split kernel and
    ``_reduce_kernel`` launch with programmatic dependent launch on Hopper, each waiting at its start for the kernels
    before it (here the query's scaling, the partials): the output is the plain launch's bit for bit, and the
    reference's within ``_check_kernel``'s tolerance, with and without the float buffer. The interpreter has no
    PDL (``pdl_on`` is False there): the GPU only."""
    from lowbit.backends.triton_backend import pdl_supported
    from lowbit.kernels._common import pdl_launches

    if not pdl_supported("cuda"):
        pytest.skip("programmatic dependent launch needs sm_90 or newer")
    c = _case(4, seed=5, hq=4, hkv=2)
    q, *cache = [c[n].cuda() for n in ("q", "kc", "ks", "kz", "vc", "vs", "vz")]
    kw = dict(bits=4, lo=c["lo"].cuda(), hi=c["hi"].cuda(), k_float=c["k"].cuda(), v_float=c["v"].cuda(),
              float_valid=c["float_valid"].cuda())
    no_float = {k: v for k, v in kw.items() if k not in ("k_float", "v_float", "float_valid")}
    for launch in (kw, no_float):
        plain = da.decode_attention(q * 2, *cache, variant=variant, split=16, **launch)
        with pdl_launches():
            got = da.decode_attention(q * 2, *cache, variant=variant, split=16, **launch)
        torch.cuda.synchronize()
        assert torch.equal(got, plain)
        torch.testing.assert_close(got, da.decode_attention_reference(q * 2, *cache, **launch), rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("cases", ["KERNEL_CASES", "LAUNCH_CASES", "REAL_LAYOUT_CASES"])
def test_triton_kernels_core_cases(cases):
    """The core cases of the three lists above (``_run_cases``), one list per test: together they were the suite's
    longest test (~23 s under the interpreter), which -n 2 could leave running alone at the end."""
    _run_cases([(cases, _check_real_layout if cases == "REAL_LAYOUT_CASES" else _check_kernel)], "core")


@settings(max_examples=200)
@given(s=st.integers(1, 1 << 20), programs=st.integers(1, 4096), block=st.sampled_from([16, 32, 64]))
def test_default_split_keeps_the_merge_to_one_step(s, programs, block):
    """The split's chunk length: a power of two of at least one key block, at most ``REDUCE_CHUNKS`` chunks a head
    (the merge's one tile), and no longer than needed to give the grid its target of programs when it can."""
    pytest.importorskip("triton")
    split = da._default_split(s, programs, block)
    chunks = -(-s // split)
    assert split >= block and split & (split - 1) == 0
    assert chunks <= da.REDUCE_CHUNKS
    if split > block and split > da.SPLIT_START:
        assert -(-s // (split // 2)) > da.REDUCE_CHUNKS  # only the merge's cap made it longer than the start
    elif split > block and -(-s // (split // 2)) <= da.REDUCE_CHUNKS:
        assert programs * chunks >= da.PROGRAMS_PER_SM * 132  # halving stopped because the grid was full


# (bits, split, query heads, kv heads, launch): ALiBi slopes on v4 (interior blocks unmasked and all masked) and v3,
# GQA and MHA, the bias rounded to bfloat16 / float16 as a half-precision step's float mask holds it
ALIBI_CASES = [(4, 16, 4, 2, {}), (8, 32, 2, 2, {"interior": False}), (2, 48, 4, 1, {"variant": "v3"}),
               (4, None, 4, 2, {"bias_dtype": torch.bfloat16}), (4, 32, 2, 1, {"bias_dtype": torch.float16})]
CORE["ALIBI_CASES"] = (0, 3)


def _check_alibi_kernel(bits: int, split: int | None, hq: int, hkv: int, **launch) -> None:
    """Kernel vs reference with ALiBi slopes (Bloom's for ``hq`` heads, 2**-8h/hq, times 0.9 so that a product is
    not exact in bfloat16) added at every key's position, quantized slots and float tokens alike; 2e-5 under the
    interpreter as ``_check_kernel``. The slopes move the output, and the bfloat16 rounding too (a kernel that
    ignored either would pass otherwise)."""
    c = _case(bits, seed=bits + hq, hq=hq, hkv=hkv)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    args = [c[n].to(dev) for n in ("q", "kc", "ks", "kz", "vc", "vs", "vz")]
    s = c["k"].shape[2]
    kw = dict(bits=bits, lo=c["lo"].to(dev), hi=c["hi"].to(dev), k_float=c["k"].to(dev), v_float=c["v"].to(dev),
              float_valid=c["float_valid"].to(dev), float_positions=torch.arange(s).expand(c["q"].shape[0], s).to(dev),
              alibi_slopes=torch.tensor([0.9 * 2.0 ** (-8 * (h + 1) / hq) for h in range(hq)], device=dev),
              bias_dtype=launch.pop("bias_dtype", torch.float32))
    want = da.decode_attention_reference(*args, **kw)
    got = da.decode_attention(*args, split=split, **launch, **kw)
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)
    plain = da.decode_attention_reference(*args, **{k: v for k, v in kw.items() if k != "alibi_slopes"})
    assert (plain - want).abs().max() > 1e-2
    if kw["bias_dtype"] != torch.float32:
        unrounded = da.decode_attention_reference(*args, **{**kw, "bias_dtype": torch.float32})
        assert (unrounded - want).abs().max() > 1e-4


@pytest.mark.parametrize("which", [pytest.param("core", id="core"), *ALL])
def test_triton_kernel_adds_alibi_slopes_as_the_reference_does(which):
    """Bloom's ALiBi on the packed-cache kernel: ``slope[h] * key position`` (float32, rounded to the step's mask
    dtype) added to each score, the quantized slots' and the float tokens' (TRITON_INTERPRET=1 on CPU)."""
    _run_cases([("ALIBI_CASES", _check_alibi_kernel)], which)


# (bits, query heads, kv heads, launch): the split kernel's own merge (merge_in_split) on int4 and int2, MHA (one
# head a program) and GQA (2 heads a program), with the float window or without, ALiBi slopes, a bf16 output, and
# a merge of several steps (reduce_chunks 2 over 4 chunks a head)
MERGE_CASES = [(4, 2, 2, {}), (2, 4, 2, {"out_dtype": torch.bfloat16}), (4, 4, 2, {"no_float": True}),
               (2, 2, 2, {"alibi": True, "out_dtype": torch.bfloat16}), (4, 4, 1, {"alibi": True, "no_float": True}),
               (4, 4, 2, {"variant": "v3", "reduce_chunks": 2})]


def _merge_case(bits: int, hq: int, hkv: int, dev: str, **launch) -> tuple[list, dict, dict]:
    """``_case``'s cache on ``dev`` as ``decode_attention``'s operands and keywords (``no_float``: without the float
    buffer; ``alibi``: Bloom-like slopes, bias rounded to bfloat16), and the rest of ``launch``."""
    c = _case(bits, seed=bits + 3 * hq + hkv, hq=hq, hkv=hkv)
    args = [c[n].to(dev) for n in ("q", "kc", "ks", "kz", "vc", "vs", "vz")]
    args[0] = args[0] * 4  # sharp scores: the chunks' maxima differ, so the merge's rescaling matters
    kw = dict(bits=bits, lo=c["lo"].to(dev), hi=c["hi"].to(dev), split=16)
    if not launch.pop("no_float", False):
        kw |= dict(k_float=c["k"].to(dev), v_float=c["v"].to(dev), float_valid=c["float_valid"].to(dev))
    if launch.pop("alibi", False):
        s = c["k"].shape[2]
        kw |= dict(alibi_slopes=torch.tensor([0.9 * 2.0 ** (-8 * (h + 1) / hq) for h in range(hq)], device=dev),
                   bias_dtype=torch.bfloat16, float_positions=torch.arange(s).expand(c["q"].shape[0], s).to(dev))
    return args, kw, launch


@pytest.mark.parametrize("case", range(len(MERGE_CASES)))
def test_merge_in_split_is_the_two_launch_merge_bit_for_bit(case, monkeypatch):
    """``merge_in_split``: the split kernel's last program per (sequence, head group) runs ``_merge_head`` itself,
    the code ``_reduce_kernel`` runs, so its output is the two-launch form's bit for bit (float window, ALiBi and the
    bf16 rounding included) with no ``_reduce_kernel`` launch; the counters are back at zero after the launch, and a
    second launch (a CUDA graph's replay) gives the same output. The reference agrees within ``_check_kernel``'s
    tolerance (the merge is real, not the two-launch form run twice)."""
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the interpreter's test (the GPU's: test_merge_in_split_on_cuda_is_the_two_launch_merge)")
    from lowbit.kernels import decode_step

    bits, hq, hkv, launch = MERGE_CASES[case]
    args, kw, launch = _merge_case(bits, hq, hkv, "cpu", **launch)
    chunks = launch.pop("reduce_chunks", None) or 32  # SmolLM2's merge step (_merge_chunks(64, 1))
    two = da.decode_attention(*args, **kw, **launch, reduce_chunks=chunks)
    reduce_launches = []
    real_reduce = da._reduce
    monkeypatch.setattr(da, "_reduce", lambda *a, **k: reduce_launches.append(1) or real_reduce(*a, **k))
    merged = da.decode_attention(*args, **kw, **launch, reduce_chunks=chunks, merge_in_split=True)
    assert reduce_launches == []
    assert merged.dtype == two.dtype and torch.equal(merged, two)
    assert not decode_step.split_counters(merged.device).any()
    assert torch.equal(da.decode_attention(*args, **kw, **launch, reduce_chunks=chunks, merge_in_split=True), two)
    ref_kw = {k: v for k, v in kw.items() if k != "split"}
    want = da.decode_attention_reference(*args, **ref_kw)
    tol = 2e-5 if two.dtype == torch.float32 else 1e-2
    torch.testing.assert_close(merged.float(), want, rtol=tol, atol=tol)


def test_merge_in_split_takes_v3_v4_and_sizes_its_counters_by_the_grid():
    """``merge_in_split`` is the v3/v4 kernel's (an error naming the variant otherwise); its counters, one per
    (sequence, query-head group), grow past ``DECODE_SDPA_MAX_HEADS`` for a large batch x heads (no
    ``GenerationSpec`` limit bounds it) and the smaller set stays kept (a captured graph may hold it)."""
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the interpreter's test")
    from lowbit.kernels import decode_step

    args, kw, _ = _merge_case(4, 2, 2, "cpu")
    with pytest.raises(ValueError, match="merge_in_split is a v3/v4 option.*'v2'"):
        da.decode_attention(*args, **kw, variant="v2", merge_in_split=True)
    small = decode_step.split_counters(torch.device("cpu"))
    big = decode_step.split_counters(torch.device("cpu"), decode_step.DECODE_SDPA_MAX_HEADS * 3)
    assert big.numel() >= decode_step.DECODE_SDPA_MAX_HEADS * 3 and small.numel() == decode_step.DECODE_SDPA_MAX_HEADS
    assert decode_step.split_counters(torch.device("cpu")) is small
    assert decode_step.split_counters(torch.device("cpu"), decode_step.DECODE_SDPA_MAX_HEADS + 1) is big


@pytest.mark.gpu
@pytest.mark.parametrize("case", range(len(MERGE_CASES)))
def test_merge_in_split_on_cuda_is_the_two_launch_merge(case):
    """On the GPU: the split kernel's own merge against the two-launch form with ``_reduce_kernel`` on the split's
    warps (one here; a reduction's order follows the warps) and against the default 4-warp merge within float32
    rounding (two kernels compile the one merge code apart: session 52's H100 run had GQA 4 + ALiBi 6e-8 off the
    one-warp merge, the other cases bit for bit); a replay bit for bit, counters back at zero; both inside
    ``pdl_launches`` where the GPU has PDL."""
    from lowbit.backends.triton_backend import pdl_supported
    from lowbit.kernels import decode_step
    from lowbit.kernels._common import pdl_launches

    bits, hq, hkv, launch = MERGE_CASES[case]
    args, kw, launch = _merge_case(bits, hq, hkv, "cuda", **launch)
    chunks = launch.pop("reduce_chunks", None) or 32
    warps = {"num_warps": 1}
    for pdl in (False, True) if pdl_supported("cuda") else (False,):
        with pdl_launches() if pdl else contextlib.nullcontext():
            two = da.decode_attention(*args, **kw, **launch, **warps, reduce_chunks=chunks, reduce_warps=1)
            default = da.decode_attention(*args, **kw, **launch, **warps, reduce_chunks=chunks)
            merged = da.decode_attention(*args, **kw, **launch, **warps, reduce_chunks=chunks, merge_in_split=True)
            again = da.decode_attention(*args, **kw, **launch, **warps, reduce_chunks=chunks, merge_in_split=True)
        torch.cuda.synchronize()
        assert torch.equal(again, merged), pdl
        for other in (two, default):
            torch.testing.assert_close(merged.float(), other.float(), rtol=1e-5 if two.dtype == torch.float32 else 1e-2,
                                       atol=1e-5 if two.dtype == torch.float32 else 1e-2)
        assert not decode_step.split_counters(merged.device).any()


_AOT_MERGE = """
import json
import torch
import lowbit.kernels  # before conftest: the kernels jit-compiled, not interpreted
from lowbit.kernels import decode_attention as da
from lowbit.kernels._common import pdl_launches
from sm90_ptx import ptx_ops, record_launches
import test_decode_attention as t

record_launches([])  # pdl_on as on Hopper
seen = []
class Recorded:
    def __init__(self, kernel):
        self.kernel = kernel
    def __getitem__(self, grid):
        return lambda *args, **kwargs: seen.append((self.kernel, args, kwargs))
da._split_kernel_v3, da._reduce_kernel = Recorded(da._split_kernel_v3), Recorded(da._reduce_kernel)
out = {}
for name, bits, hq, hkv, launch in (("int4_mha", 4, 2, 2, {}), ("int2_gqa_alibi", 2, 4, 2, {"alibi": True})):
    args, kw, launch = t._merge_case(bits, hq, hkv, "cpu", **launch)
    with pdl_launches():
        da.decode_attention(*args, **kw, **launch, out_dtype=torch.bfloat16, merge_in_split=True)
    out[name] = [ptx_ops(*s, listed=("griddepcontrol", "atom", "ld.global", "st.global")) for s in seen]
    seen.clear()
print(json.dumps(out))
"""


def test_merge_in_split_builds_for_sm90_with_the_count_after_the_partials():
    """The split kernel with its own merge, as the decode step launches it (v4, PDL, float window, bf16 out; int4 one
    head a program, int2 two with ALiBi), builds for sm_90 (``sm90_ptx``: Triton's bundled ptxas, no GPU; the
    interpreter runs constructs sm_90 refuses): one launch, no ``_reduce_kernel``; in its PTX the partials are stored
    before the counter's atomic, the merge's loads and its output store follow it, and a second atomic (the reset)
    comes last."""
    import sm90_ptx

    launches = sm90_ptx.run(_AOT_MERGE)
    for name, kernels in launches.items():
        assert [k["kernel"] for k in kernels] == ["_split_kernel_v3"], (name, kernels)
        ops = kernels[0]["ops"]
        assert kernels[0]["launch_pdl"] is True and kernels[0]["PDL"] is True, name
        first = ops.index("atom")
        assert "st.global" in ops[:first] and ops.count("atom") == 2 and ops[-1] == "atom", (name, ops)
        assert "ld.global" in ops[first:] and "st.global" in ops[first:], (name, ops)
