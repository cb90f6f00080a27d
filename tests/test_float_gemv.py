"""The float decode GEMV (``lowbit.kernels.float_gemv``, ``torch.ops.lowbit.float_linear``) and the triton backend's
``float_gemv`` rewrite of a float generation step.

The kernel against ``F.linear`` in fp32 (bf16/fp16 inputs; bound: 1% relative norm, the output's own rounding plus
fp32 accumulation in another order), with its epilogues and the RMSNorm / residual halves it shares with the
weight-only GEMVs (``weight_only_linear_add_norm``'s contract); rows the GEMV does not take run ``F.linear`` exactly.
On a generation step: which linears the rewrite takes and fuses, and greedy tokens equal to the torch reference's
wherever the reference's top two logits are clearly apart (random tiny models have near-ties a last-bit change
flips, after which the sequences part legitimately).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from lowbit.kernels._common import norm_from_parts_ref, norm_parts_ref

pytest.importorskip("triton", reason="lowbit's kernels need triton")
INTERP = os.environ.get("TRITON_INTERPRET") == "1"
needs_kernels = pytest.mark.skipif(not (INTERP or torch.cuda.is_available()), reason="needs CUDA or the interpreter")
DEV = "cuda" if torch.cuda.is_available() and not INTERP else "cpu"


def _rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref.float()).norm() / ref.float().norm()).item()


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("n", "k", "bias", "epilogue"), [(40, 256, False, ""), (33, 200, True, ""),
                                                         (64, 136, False, "silu*up"), (16, 128, True, "gelu")])
def test_float_linear_matches_f_linear_with_its_epilogue(dtype, n, k, bias, epilogue):
    """Ragged N (33: a partial row tile) and K (200, 136: a partial K step and a split whose last part is short).
    The reference rounds as the op does (``float_linear_ref``: the product, then each epilogue step, in the input
    dtype): under the interpreter (fp32 sums, casts rounded to nearest even: tests/conftest.py) the same bits; on
    the GPU (its sums in another order, its epilogue's exp) within two bf16 steps, four with an epilogue's
    roundings. Before the conftest rounded the interpreter's bf16 casts they truncated: 2^-7.8 (bf16) and 2^-6.6
    (epilogues) of relative error, at those bounds."""
    import lowbit.kernels  # noqa: F401 - registers torch.ops.lowbit.*
    from lowbit.kernels.float_gemv import float_linear_ref

    g = torch.Generator().manual_seed(n * k)
    x = torch.randn(1, 1, k, generator=g).to(dtype).to(DEV)
    w = (torch.randn(n, k, generator=g) / k ** 0.5).to(dtype).to(DEV)
    b = torch.randn(n, generator=g).to(dtype).to(DEV) if bias else None
    y = torch.ops.lowbit.float_linear(x, w, b, epilogue)
    ref = float_linear_ref(x, w, b, epilogue)
    assert y.shape == ref.shape and y.dtype == dtype
    if INTERP:
        assert torch.equal(y, ref), _rel(y, ref)
    assert _rel(y, ref) <= (2 ** -6 if epilogue else 2 ** -7)
    if not epilogue:  # and against fp32 arithmetic: one rounding of the output
        assert _rel(y, F.linear(x.float(), w.float(), None if b is None else b.float())) <= 2 ** -7


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("width", [384, 192])
def test_add_norm_halves_feed_the_next_linear_like_the_unfused_ops(dtype, width):
    """``float_linear_add_norm`` returns the new stream, gain * stream and partial sums of squares (one per
    128-wide reduce program where K is split, one per GEMV program where the GEMV folds the reduce in: the
    interpreter splits K = 384, not 192; the fake op's count either way), and a ``float_linear`` reading those
    halves with ``norm_sumsq`` equals RMSNorm -> linear on the stream."""
    import lowbit.kernels  # noqa: F401
    from torch._subclasses.fake_tensor import FakeTensorMode

    from lowbit.kernels.float_gemv import _split_k, add_norm_partials_f, float_gemv_config

    g = torch.Generator().manual_seed(5)
    n = k = width
    x = torch.randn(1, 1, k, generator=g).to(dtype).to(DEV)
    w = (torch.randn(n, k, generator=g) / k ** 0.5).to(dtype).to(DEV)
    res = torch.randn(1, 1, n, generator=g).to(dtype).to(DEV)
    gain = (torch.rand(n, generator=g) + 0.5).to(dtype).to(DEV)
    stream, gained, sumsq = torch.ops.lowbit.float_linear_add_norm(x, w, None, res, gain)
    ref_stream = (res.float() + F.linear(x.float(), w.float())).to(dtype)
    assert _rel(stream, ref_stream) <= 1e-2
    assert _rel(gained, gain * stream) <= 1e-2
    cfg = float_gemv_config(n, k)
    folded = _split_k(n, k, cfg)[1] == 1
    assert folded == (not INTERP or width < 256)
    assert sumsq.shape == (1, 1, add_norm_partials_f(x, w))
    assert sumsq.shape[-1] == (-(-n // cfg["BLOCK_N"]) if folded else -(-n // 128))
    assert torch.allclose(sumsq.sum(-1), stream.float().pow(2).sum(-1), rtol=1e-3)
    with FakeTensorMode(allow_non_fake_inputs=True):
        fake = torch.ops.lowbit.float_linear_add_norm_pdl(x, w, None, res, gain)
    assert [tuple(t.shape) for t in fake] == [tuple(t.shape) for t in (stream, gained, sumsq)]
    w2 = (torch.randn(96, n, generator=g) / n ** 0.5).to(dtype).to(DEV)
    y = torch.ops.lowbit.float_linear(gained, w2, None, "", sumsq, 1e-6)
    ref = F.linear(norm_from_parts_ref(*norm_parts_ref(stream, gain), 1e-6).float(), w2.float())
    assert _rel(y, ref) <= 1e-2


@needs_kernels
def test_rows_and_dtypes_the_gemv_does_not_take_run_f_linear_exactly():
    """Several rows (a prefill), fp32, a K that is not a multiple of 8: ``F.linear`` (and the fusion's torch ops),
    bit for bit, with the reason the GEMV gives for each weight."""
    import lowbit.kernels  # noqa: F401
    from lowbit.kernels.float_gemv import float_linear_unsupported

    g = torch.Generator().manual_seed(2)
    w = torch.randn(48, 64, generator=g).to(torch.bfloat16).to(DEV)
    x = torch.randn(3, 64, generator=g).to(torch.bfloat16).to(DEV)
    assert torch.equal(torch.ops.lowbit.float_linear(x, w), F.linear(x, w))
    w32, x32 = w.float(), torch.randn(1, 64, generator=g).to(DEV)
    assert torch.equal(torch.ops.lowbit.float_linear(x32, w32), F.linear(x32, w32))
    assert "float32" in float_linear_unsupported(torch.float32, w32)
    w_odd = torch.randn(8, 60, generator=g).to(torch.bfloat16).to(DEV)
    x_odd = torch.randn(1, 60, generator=g).to(torch.bfloat16).to(DEV)
    assert "K=60" in float_linear_unsupported(torch.bfloat16, w_odd)
    assert torch.equal(torch.ops.lowbit.float_linear(x_odd, w_odd), F.linear(x_odd, w_odd))
    res = torch.randn(3, 48, generator=g).to(torch.bfloat16).to(DEV)
    gain = torch.rand(48, generator=g).to(torch.bfloat16).to(DEV)
    stream, gained, sumsq = torch.ops.lowbit.float_linear_add_norm(x, w, None, res, gain)
    assert torch.equal(stream, res + F.linear(x, w)) and sumsq.shape == (3, 1)
    # (the add and the norm's half in one add_norm_parts launch: torch's roundings, the sum in its own order)
    assert torch.equal(gained, gain * stream)
    torch.testing.assert_close(sumsq, stream.float().pow(2).sum(-1, keepdim=True), rtol=1e-6, atol=0)


@pytest.mark.parametrize("epilogue", ["silu*up", "gelu*up", "gelu_tanh*up", "silu", ""])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_prefill_rows_gate_the_merged_halves_exactly(epilogue, dtype):
    """At prefill sizes a gated ``float_linear`` takes ``act(gate half) * up half`` of ``F.linear`` on views of its
    halves, where it interleaved (gate, up) pairs for ``epilogue_ref`` before session 58 (a copy of the product,
    25 us a layer of a 1x2048 SmolLM2 prefill). The op returns its reference bit for bit; against the interleaved
    form at most a last-bit step per element (torch's CPU activations round strided and contiguous rows apart)."""
    import lowbit.kernels  # noqa: F401
    from lowbit.kernels._common import epilogue_ref
    from lowbit.kernels.float_gemv import float_linear_ref

    g = torch.Generator().manual_seed(len(epilogue))
    w = (torch.randn(2 * 96, 64, generator=g) / 8).to(dtype)
    x = torch.randn(2, 37, 64, generator=g).to(dtype)
    y = F.linear(x, w)
    interleaved = torch.stack((y[..., :96], y[..., 96:]), dim=-1).flatten(-2) if epilogue.endswith("*up") else y
    ref = float_linear_ref(x, w, None, epilogue)
    assert torch.equal(epilogue_ref(y, epilogue, halves=True), ref)
    assert ref.shape == (2, 37, 96 if "*" in epilogue else 192)
    got = torch.ops.lowbit.float_linear(x, w, None, epilogue)
    if dtype == torch.float32 or not epilogue.endswith("*up") or not INTERP:
        assert torch.equal(got, ref)
    else:  # bf16/fp16 gated rows under the interpreter: apply_epilogue's kernel, the device's exp
        _assert_epilogue_close(got, ref, epilogue, y[..., 96:])
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(ref, epilogue_ref(interleaved, epilogue), rtol=eps, atol=1e-6)


def _assert_epilogue_close(got: torch.Tensor, ref: torch.Tensor, epilogue: str, up: torch.Tensor) -> None:
    """``apply_epilogue``'s kernel against ``epilogue_ref`` (``up``: the product's up columns): SiLU within one step
    of the dtype and bit for bit on nearly all (the kernel's exp against torch's can round an activation the other
    way); the GELUs within two steps on more than 90% (torch's CPU GELU itself rounds a strided row and a
    contiguous one apart, the previous test's last check); tanh-GELU's ``1 - 2 / (1 + exp(2z))`` cancels where it
    saturates at -1, so there an absolute 2^-16 besides; a far-negative gate's activation lands among fp16's
    subnormals, whose coarse steps (16 of them) the up factor scales."""
    assert got.dtype == ref.dtype and got.shape == ref.shape
    info, silu = torch.finfo(ref.dtype), epilogue.startswith("silu")
    step = ((1 if silu else 2) * info.eps * ref.float().abs() + 16 * info.smallest_normal * info.eps
            * up.float().abs().clamp(min=1) + (2.0 ** -16 if epilogue.startswith("gelu_tanh") else 0))
    assert ((got.float() - ref.float()).abs() <= step).all()
    assert (got != ref).float().mean().item() <= (0.02 if silu else 0.1)


@needs_kernels
@pytest.mark.parametrize("epilogue", ["silu*up", "gelu*up", "gelu_tanh*up"])
@pytest.mark.parametrize("halves", [True, False])
@pytest.mark.parametrize(("dtype", "rows", "width"), [(torch.bfloat16, (3, 5), 74), (torch.float16, (7,), 2 * 1100),
                                                      (torch.bfloat16, (1,), 2)])
def test_gated_epilogue_kernel_matches_its_reference(epilogue, halves, dtype, rows, width):
    """``apply_epilogue`` (every multi-row gated MLP's ``act(gate) * up``: one launch where F.silu and the product
    were two kernels and a pass between them) against ``epilogue_ref``, on the halves (``float_linear``) and on
    interleaved pairs (the weight-only and A8 ops); a width past one 1024-wide program, one pair; an odd width is
    refused by name; fp32 rows and plain activations stay the reference's ops, bit for bit."""
    from lowbit.kernels._common import apply_epilogue, epilogue_ref

    g = torch.Generator().manual_seed(width)
    y = (torch.randn(*rows, width, generator=g) * 3).to(dtype).to(DEV)
    for rows_of in (y, y[..., : width - 2] if width > 2 else y):  # and rows whose stride is not their width
        up = rows_of[..., rows_of.shape[-1] // 2:] if halves else rows_of[..., 1::2]
        _assert_epilogue_close(apply_epilogue(rows_of, epilogue, halves), epilogue_ref(rows_of, epilogue, halves),
                               epilogue, up)
    assert torch.equal(apply_epilogue(y.float(), epilogue, halves), epilogue_ref(y.float(), epilogue, halves))
    assert torch.equal(apply_epilogue(y, "silu"), epilogue_ref(y, "silu"))
    with pytest.raises(ValueError, match="apply_epilogue.*even width"):
        apply_epilogue(y[..., : width - 1], epilogue, halves)


_AOT_GATED = """
import json
import torch
from lowbit.kernels import _common
from sm90_ptx import ptx_ops, record_launches

seen = record_launches([_common])
_common.on_kernel_device = lambda t: True  # build only: nothing runs
for dtype, halves in ((torch.bfloat16, True), (torch.float16, False)):
    _common.apply_epilogue(torch.randn(16, 2 * 1536).to(dtype), "silu*up", halves)
print(json.dumps([ptx_ops(*launch)["kernel"] for launch in seen]))
"""


def test_gated_epilogue_kernel_compiles_for_sm90():
    """``apply_epilogue``'s kernel builds for sm_90 through Triton's bundled ptxas, no device (``sm90_ptx``), for
    both layouts: the interpreter takes constructs the GPU compiler refuses."""
    import sm90_ptx

    assert sm90_ptx.run(_AOT_GATED) == ["_gated_epilogue_kernel"] * 2


def _tiny_llama() -> torch.nn.Module:
    """A random bf16 two-block Llama: hidden 128, MLP 256, two heads sharing one kv head."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=128, intermediate_size=256, num_attention_heads=2, num_key_value_heads=1,
                      num_hidden_layers=2, vocab_size=512, max_position_embeddings=256)
    return LlamaForCausalLM(cfg).to(torch.bfloat16).eval()


def _clear_prefix_agrees(model: torch.nn.Module, ids: torch.Tensor, got: list[int], ref: list[int]) -> int:
    """How many of ``ref``'s tokens were clear decisions (the float32 model's top two logits, teacher-forced on
    ``ref``, apart by more than 1% of the top logit's size) before the first near-tie; asserts ``got`` equals
    ``ref`` over them."""
    m32 = _float32_copy(model)
    seq = torch.cat([ids, torch.tensor([ref])], 1)
    with torch.no_grad():
        logits = m32(seq).logits[0, ids.shape[1] - 1:-1]
    clear = 0
    for i, row in enumerate(logits):
        top = row.topk(2).values
        if top[0] - top[1] <= 0.01 * top.abs().max():
            break
        assert got[i] == ref[i], (i, got, ref)
        clear += 1
    return clear


def _ir_params_not_held(compiled) -> set[str]:
    """The lowered graph's parameters whose storage no buffer of the module shares."""
    held = {t.untyped_storage().data_ptr() for t in compiled.runner.gm.buffers()}
    return {n for n, v in compiled.runner.graph.params.items()
            if v.data is not None and v.data.untyped_storage().data_ptr() not in held}


def _float32_copy(model: torch.nn.Module) -> torch.nn.Module:
    import copy

    return copy.deepcopy(model).float()


@needs_kernels
def test_a_float_generation_step_runs_its_linears_on_the_gemv_with_the_block_fusions():
    """A bf16 step graph on the triton backend: every linear is a ``float-gemv`` form — merged q/k/v and gate/up,
    the gated MLP in the reduce (``silu*up``), o/down_proj making the next norm's halves (``+add+norm``: 3, the
    final norm sits behind the last-logits slice) and their readers finishing it (``+norm``) — and greedy tokens
    agree with the torch reference wherever the decisions are clear. The module reads the IR's weight tensors (no
    copy made for the gated epilogue). ``float_gemv=False`` leaves the linears to
    ``F.linear``; a logits graph (no generation) is not rewritten."""
    from lowbit.api import compile_model
    from lowbit.generate import GenerationSpec

    model = _tiny_llama()
    spec = GenerationSpec(max_length=16, max_batch=1)
    tri = compile_model(model, backend="triton", backend_options={"compile": False}, generation=spec, device=DEV)
    forms = list(tri.runner.report["kernels"].values())
    assert sum(f.startswith("float-gemv") for f in forms) == 9, forms  # 2 x (qkv, o, gate/up, down) + lm_head
    assert sum(f.endswith("+add+norm") for f in forms) == 3
    assert sum(f == "float-gemv+silu*up+norm" for f in forms) == 2
    assert "float-gemv" in tri.runner.report_text()
    off = compile_model(model, backend="triton", backend_options={"compile": False, "float_gemv": False},
                        generation=spec, device=DEV)
    assert not any(f.startswith("float-gemv") for f in off.runner.report["kernels"].values())
    # the gated epilogue reads the merged gate/up weight as it is: the module holds the IR's tensors, as without
    # the rewrite (an interleaved copy would leave the IR's merged gate/up unread beside it)
    assert _ir_params_not_held(tri) == _ir_params_not_held(off)
    logits_only = compile_model(model, backend="triton", backend_options={"compile": False}, device=DEV)
    assert not any(f.startswith("float-gemv") for f in logits_only.runner.report["kernels"].values())
    ref = compile_model(model, generation=spec, device=DEV)
    ids = torch.randint(3, 512, (1, 5), generator=torch.Generator().manual_seed(1))
    want = ref.generate(ids, 3, stop_tokens=()).tokens[0]
    got = tri.generate(ids, 3, stop_tokens=()).tokens[0]
    assert _clear_prefix_agrees(model, ids, got, want) >= 2


@needs_kernels
def test_many_norm_partials_from_a_folded_gemv_feed_a_split_reduce():
    """A folded ``float_linear_add_norm`` over a wide stream writes one partial sum of squares per GEMV program,
    more than ``MANY_PARTIALS``: a split-K reader's ``_splitk_reduce`` (as a weight-only linear's) reads them as
    one vector, and equals RMSNorm -> linear on the stream."""
    import lowbit.kernels  # noqa: F401
    from lowbit.kernels.float_gemv import add_norm_partials_f
    from lowbit.kernels.weight_only import MANY_PARTIALS

    g = torch.Generator().manual_seed(9)
    dtype = torch.bfloat16
    n, k = 2176, 128  # interpreter: 68 programs of 32 rows, K not split
    x = torch.randn(1, k, generator=g).to(dtype).to(DEV)
    w = (torch.randn(n, k, generator=g) / k ** 0.5).to(dtype).to(DEV)
    res = torch.randn(1, n, generator=g).to(dtype).to(DEV)
    gain = (torch.rand(n, generator=g) + 0.5).to(dtype).to(DEV)
    stream, gained, sumsq = torch.ops.lowbit.float_linear_add_norm(x, w, None, res, gain)
    assert sumsq.shape[-1] == add_norm_partials_f(x, w) > MANY_PARTIALS
    assert torch.allclose(sumsq.sum(-1), stream.float().pow(2).sum(-1), rtol=1e-3)
    normed = norm_from_parts_ref(*norm_parts_ref(stream, gain), 1e-6).float()
    w2 = (torch.randn(96, n, generator=g) / n ** 0.5).to(dtype).to(DEV)  # K = 2176: split, read by the reduce
    y = torch.ops.lowbit.float_linear(gained, w2, None, "", sumsq, 1e-6)
    assert _rel(y, F.linear(normed, w2.float())) <= 1e-2


@pytest.fixture(autouse=True)
def _one_export_per_model(reuse_captures: object) -> None:
    """Every test here captures through the session's capture cache (conftest's ``reuse_captures``): the same tiny
    model compiled again is not exported again."""
