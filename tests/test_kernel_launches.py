"""Every Triton launch an op makes passes every parameter of its kernel, defaults included.

Why: under ``torch.compile`` a ``triton_op``'s launches are traced (``wrap_triton``) and Inductor launches the kernel
with exactly the arguments the trace saw, so a constexpr left to its Python default is a missing argument there
("Incorrect number of arguments passed to kernel", or a shifted grid argument), while the eager and interpreted
calls, which use the default, run. Session 18 lost two H200 calls to two such defaults (``_a8_kernel``'s ``SUBK``
in the autotune configs, ``_act_quant_kernel``'s ``CHUNKED``). The interpreter never takes the GPU's configs, so
this test runs the ops with ``interpreting()`` reporting False (the GPU's tables, the autotuner's configs, the
static tiles) and a launcher that records each launch instead of running it: it checks arguments, not results.
"""

from __future__ import annotations

import importlib
import inspect

import pytest
import torch
from conftest import quantized_weight
from triton.runtime.autotuner import Autotuner

MODULES = ("a8_linear", "a8_gemv", "act_quant", "norm_quant", "weight_only", "hadamard", "decode_step", "moe_gemv",
           "moe_blocked")


def _missing(kernel, args: tuple, kwargs: dict) -> list[str]:
    """Parameters of ``kernel`` (a JITFunction or an Autotuner) that neither the call nor every autotune config
    supplies."""
    fn = kernel.fn if isinstance(kernel, Autotuner) else kernel  # a JITFunction, or the interpreter's wrapper
    names = getattr(fn, "arg_names", None) or list(inspect.signature(fn.fn).parameters)
    configs = getattr(kernel, "configs", None) or []
    from_configs = set.intersection(*(set(c.kwargs) for c in configs)) if configs else set()
    prune = getattr(kernel, "early_config_prune", None)
    if prune is not None:  # the prune's fallback configs (built when no listed config fits) must carry them too
        named = dict(zip(names, args)) | kwargs
        kept = prune(configs, named)
        from_configs &= set.intersection(*(set(c.kwargs) for c in kept)) if kept else set()
    return [a for a in names[len(args):] if a not in kwargs and a not in from_configs]


@pytest.fixture
def launches(monkeypatch) -> list[tuple[str, list[str]]]:
    """(kernel name, parameters not passed) for every launch the ops make while the fixture is active."""
    seen: list[tuple[str, list[str]]] = []

    def launcher(_t, kernel):
        class Launch:
            def __getitem__(self, grid):
                def call(*args, **kwargs):
                    fn = kernel.fn if isinstance(kernel, Autotuner) else kernel
                    seen.append((getattr(fn, "__name__", None) or fn.fn.__name__, _missing(kernel, args, kwargs)))
                return call
        return Launch()

    for name in MODULES:
        mod = importlib.import_module(f"lowbit.kernels.{name}")
        if hasattr(mod, "launcher"):
            monkeypatch.setattr(mod, "launcher", launcher)
        if hasattr(mod, "interpreting"):
            monkeypatch.setattr(mod, "interpreting", lambda: False)
        if hasattr(mod, "on_kernel_device"):  # CPU tensors launch (recorded) on a CUDA machine too, where no
            monkeypatch.setattr(mod, "on_kernel_device", lambda t: True)  # interpreter makes them kernel-readable
    return seen


@pytest.mark.parametrize("m", [3, 40, 128, 1024])
@pytest.mark.parametrize("w_qdtype,w_group,a_qdtype,a_group", [
    ("int8", 0, "int8", 0), ("int8", 0, "int8", 64), ("int4", 64, "int8", 0), ("fp8e4m3", 64, "fp8e4m3", 64),
    ("fp8e4m3", 0, "fp8e4m3", 0)])
def test_a8_and_activation_quantize_pass_every_parameter(launches, m, w_qdtype, w_group, a_qdtype, a_group,
                                                        a8_quantizes_in_gemv):
    """``a8_linear`` at decode (M <= 16, where the GEMV takes the form, ``a8_gemv``: one launch quantizing its rows
    at K <= ``A8_GEMV_QUANTIZE_MAX_K``, the quantize then the GEMV on its codes at a wider K; codes handed in too,
    ``a8_linear_q``), autotuned, mid-size (``a8_mid_config``) and static-tile M; the activation quantize whole-row
    and chunked."""
    k, n = (4352 if m == 40 else 256), 128
    q, s, z = quantized_weight(n, k, w_qdtype, w_group, w_qdtype != "int4")
    x = torch.randn(m, k).to(torch.bfloat16)
    torch.ops.lowbit.a8_linear(x, q, s, z, None, w_qdtype, w_group, a_qdtype, a_group, False)
    names = {name for name, _ in launches}
    if m <= 16 and w_qdtype != "int4":
        assert [name for name, _ in launches] == ["_a8_gemv_kernel"]
        wide = 4352  # past A8_GEMV_QUANTIZE_MAX_K: the quantize (chunked rows), then the GEMV on codes
        qw, sw, zw = quantized_weight(n, wide, w_qdtype, w_group, True)
        torch.ops.lowbit.a8_linear(torch.randn(m, wide).to(torch.bfloat16), qw, sw, zw, None, w_qdtype, w_group,
                                   a_qdtype, a_group, False)
        assert [name for name, _ in launches][1:] == ["_act_quant_kernel", "_a8_gemv_kernel"]
        # the split RMSNorm around two A8 GEMVs (_fuse_norm_quant_a8): one GEMV writes its halves, one reads them
        gain, stream = torch.ones(n).to(torch.bfloat16), torch.randn(m, n).to(torch.bfloat16)
        torch.ops.lowbit.a8_linear_add_norm(x, q, s, z, None, w_qdtype, w_group, a_qdtype, a_group, stream, gain)
        torch.ops.lowbit.a8_linear(x, q, s, z, None, w_qdtype, w_group, a_qdtype, a_group,
                                   norm_sumsq=torch.ones(m, 3), norm_eps=1e-5)
        assert [name for name, _ in launches][3:] == ["_a8_gemv_kernel", "_a8_gemv_kernel"]
        xq, xs = torch.ops.lowbit.quantize_activation(x, a_qdtype, a_group)
        torch.ops.lowbit.a8_linear_q(xq, xs, q, s, z, None, w_qdtype, w_group, a_group, torch.bfloat16, False,
                                     "silu*up")
        assert [name for name, _ in launches][-2:] == ["_act_quant_kernel", "_a8_gemv_kernel"]
    else:
        assert {"_act_quant_kernel", "_a8_kernel"} <= names
    assert all(not missing for _, missing in launches), launches


@pytest.mark.parametrize("m", [1, 5, 40, 128])
@pytest.mark.parametrize("k,group", [(4096, 128), (512, 0)])
def test_weight_only_linear_passes_every_parameter(launches, m, k, group):
    """The word-layout GEMVs (M = 1 and tensor-core M), the prefill tables' tiles, the split-K reduce."""
    from lowbit.kernels import weight_only as wo

    n = 256
    q, s, z = quantized_weight(n, k, "int4", group, False)
    words, ws, wz = wo.pack_words(q, s, z, "int4", group)
    x = torch.randn(m, k).to(torch.bfloat16)
    torch.ops.lowbit.weight_only_linear(x, words, ws, wz, None, "int4", group, "auto")
    assert launches and all(not missing for _, missing in launches), launches


@pytest.mark.parametrize("qdtype,group", [("int8", 0), ("fp8e4m3", 64)])
def test_rms_norm_quant_and_weight_only_add_norm_pass_every_parameter(launches, qdtype, group):
    """The fused RMSNorm + quantize, and the GEMV whose split-K reduce adds the residual and takes the norm's
    partial sums (``norm_residual``), here folded into the GEMV's programs (``FOLD``) as a gated epilogue is."""
    from lowbit.kernels import weight_only as wo

    x = torch.randn(4, 512).to(torch.bfloat16)
    torch.ops.lowbit.rms_norm_quant(x, torch.randn(512).to(torch.bfloat16), 1e-6, True, qdtype, group)
    q, s, z = quantized_weight(512, 512, "int4", 128, False)
    words, ws, wz = wo.pack_words(q, s, z, "int4", 128)
    wo.weight_only_linear_add_norm(x[:1], words, ws, wz, None, "int4", 128, x[:1].clone(),
                                   torch.randn(512).to(torch.bfloat16))
    assert [name for name, _ in launches][-1] == "_gemv_t"  # K = 512: one split with the reduce folded in
    torch.ops.lowbit.weight_only_linear(x[:1], words, ws, wz, None, "int4", 128, "auto",
                                        "silu*up", torch.rand(1, 4), 1e-6)  # the folded gated epilogue and norm
    assert [name for name, _ in launches][-1] == "_gemv_t"
    assert len(launches) >= 3 and all(not missing for _, missing in launches), launches


def test_decode_step_kernels_pass_every_parameter(launches):
    """The greedy argmax and a decode step's attention over a float cache (GQA: 4 query heads on 2 kv heads)."""
    torch.ops.lowbit.row_argmax(torch.randn(2, 1000).to(torch.bfloat16))
    q = torch.randn(2, 4, 1, 32).to(torch.bfloat16)
    k, v = (torch.randn(2, 2, 64, 32).to(torch.bfloat16) for _ in range(2))
    mask = torch.zeros(2, 1, 1, 64, dtype=torch.bool)
    mask[..., :9] = True
    torch.ops.lowbit.decode_sdpa(q, k, v, mask, None, True)
    names = {name for name, _ in launches}
    assert {"_row_argmax", "_sdpa_split", "_sdpa_merge"} <= names, names
    assert all(not missing for _, missing in launches), launches


@pytest.mark.parametrize("qdtype,group", [("", 0), ("int4", 128), ("uint4", 0)])
def test_grouped_moe_ops_pass_every_parameter(launches, qdtype, group):
    """``moe_gate_up`` and ``moe_down`` on the GPU's column blocks (narrowed at one token), float and word weights."""
    from lowbit.kernels.moe_gemv import moe_down, moe_gate_up, stack_experts
    from lowbit.kernels.weight_only import interleave_rows, pack_words

    def stacked(n: int, k: int, interleave: bool) -> list:
        if not qdtype:
            return [torch.randn(4, n, k).to(torch.bfloat16), None, None]
        parts = [pack_words(*(interleave_rows(t) if interleave else t for t in quantized_weight(
            n, k, qdtype, group, qdtype == "int4")), qdtype, group) for _ in range(4)]
        return [None if parts[0][i] is None else stack_experts([p[i] for p in parts]) for i in range(3)]

    x = torch.randn(1, 256).to(torch.bfloat16)
    dense = torch.tensor([[0.0, 0.7, 0.0, 0.3]])
    h = moe_gate_up(x, dense != 0, *stacked(512, 256, bool(qdtype)), qdtype, group, "silu*up", bool(qdtype))
    moe_down(torch.randn(1, 4, 256).to(torch.bfloat16), dense != 0, dense, *stacked(256, 256, False), qdtype, group,
             torch.bfloat16)
    assert h.shape == (1, 4, 256) and [name for name, _ in launches] == ["_moe_gate_up", "_moe_down"]
    assert all(not missing for _, missing in launches), launches


@pytest.mark.parametrize("qdtype,group", [("", 0), ("int4", 128), ("uint4", 0)])
@pytest.mark.parametrize("rows", [20, 2048])
def test_blocked_moe_ops_pass_every_parameter(launches, qdtype, group, rows):
    """``moe_route``, ``moe_gate_up_blocked`` and ``moe_down_blocked`` (its product and slot-sum launches) at a
    decode batch's tiles and a prefill's, float and word weights."""
    from lowbit.kernels.moe_blocked import moe_down_blocked, moe_gate_up_blocked, moe_route
    from lowbit.kernels.moe_gemv import stack_experts
    from lowbit.kernels.weight_only import pack_words

    def stacked(n: int, k: int) -> list:
        if not qdtype:
            return [torch.randn(4, n, k).to(torch.bfloat16), None, None]
        parts = [pack_words(*quantized_weight(n, k, qdtype, group, qdtype == "int4"), qdtype, group) for _ in range(4)]
        return [None if parts[0][i] is None else stack_experts([p[i] for p in parts]) for i in range(3)]

    dense = torch.tensor([[0.0, 0.7, 0.0, 0.3]]).repeat(rows, 1)
    route = moe_route(dense != 0)
    h = moe_gate_up_blocked(torch.randn(rows, 256).to(torch.bfloat16), *route, *stacked(512, 256), qdtype, group,
                            "silu*up", bool(qdtype), 2)
    moe_down_blocked(h, dense != 0, dense, *route, *stacked(256, 256), qdtype, group, torch.bfloat16)
    assert h.shape == (rows, 2, 256)
    assert [name for name, _ in launches] == ["_moe_route", "_moe_gate_up_blocked", "_moe_down_blocked",
                                               "_moe_slot_sum"]
    assert all(not missing for _, missing in launches), launches


@pytest.fixture
def pdl_launches_seen(launches, monkeypatch) -> list[tuple[str, object, object]]:
    """(kernel name, its ``PDL`` argument, its ``launch_pdl`` keyword) of every launch, with ``pdl_on`` as on a
    Hopper GPU (``pdl_launches`` decides; the interpreter's answer, False, would hide the choice)."""
    from lowbit.kernels import _common

    seen: list[tuple[str, object, object]] = []
    recording = importlib.import_module("lowbit.kernels.a8_gemv").launcher  # the ``launches`` fixture's

    def launcher(t, kernel):
        launch = recording(t, kernel)

        class Launch:
            def __getitem__(self, grid):
                def call(*args, **kwargs):
                    launch[grid](*args, **kwargs)
                    seen.append((launches[-1][0], kwargs.get("PDL", "absent"), kwargs.get("launch_pdl", "absent")))
                return call
        return Launch()

    for name in ("a8_linear", "a8_gemv", "act_quant", "norm_quant"):
        monkeypatch.setattr(importlib.import_module(f"lowbit.kernels.{name}"), "launcher", launcher)
    monkeypatch.setattr(_common, "interpreting", lambda: False)
    return seen


@pytest.mark.parametrize("w_qdtype,w_group,a_qdtype,a_group", [("int8", 0, "int8", 0), ("fp8e4m3", 0, "fp8e4m3", 0),
                                                               ("fp8e4m3", 64, "fp8e4m3", 64)])
def test_a8_pdl_ops_launch_their_kernels_with_pdl_and_the_plain_ops_without(pdl_launches_seen, launches, w_qdtype,
                                                                            w_group, a_qdtype, a_group):
    """A W8A8 / FP8 decode step's kernels (``_rms_norm_quant_kernel``, ``_act_quant_kernel``, ``_a8_gemv_kernel``)
    take ``PDL=True`` and the ``launch_pdl`` attribute from the opaque ``*_pdl`` ops (``pdl_launches``) and
    ``PDL=False`` without the attribute from the plain ops (the constexpr passed either way: Inductor's launcher
    miscounts a defaulted one left out). At one row, as the triton backend routes them (``_one_row``)."""
    k, n = 256, 128
    q, s, z = quantized_weight(n, k, w_qdtype, w_group, True)
    x, stream = torch.randn(1, k).to(torch.bfloat16), torch.randn(1, n).to(torch.bfloat16)
    gain, norm_gain = torch.ones(n).to(torch.bfloat16), torch.ones(k).to(torch.bfloat16)
    codes = torch.zeros(1, k, dtype=torch.float8_e4m3fn if a_qdtype == "fp8e4m3" else torch.int8)
    scales = torch.ones(1, k // a_group if a_group else 1)
    lin = (x, q, s, None, None, w_qdtype, w_group, a_qdtype, a_group, False)
    calls = {"a8_linear": lin, "a8_linear_q": (codes, scales, q, s, None, None, w_qdtype, w_group, a_group,
                                               torch.bfloat16, False, "silu*up"),
             "a8_linear_add_norm": (*lin[:9], stream, gain), "rms_norm_quant": (x, norm_gain, 1e-6, True, a_qdtype,
                                                                                a_group)}
    kernels = {"a8_linear": ["_act_quant_kernel", "_a8_gemv_kernel"], "a8_linear_q": ["_a8_gemv_kernel"],
               "a8_linear_add_norm": ["_act_quant_kernel", "_a8_gemv_kernel"],
               "rms_norm_quant": ["_rms_norm_quant_kernel"]}
    for name, args in calls.items():
        for pdl in (True, False):
            pdl_launches_seen.clear()
            getattr(torch.ops.lowbit, name + "_pdl" if pdl else name)(*args)
            assert [kernel for kernel, *_ in pdl_launches_seen] == kernels[name], (name, pdl_launches_seen)
            want = (True, True) if pdl else (False, "absent")
            assert all(tuple(options) == want for _, *options in pdl_launches_seen), (name, pdl, pdl_launches_seen)
    assert all(not missing for _, missing in launches), launches
