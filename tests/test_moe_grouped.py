"""The Triton backend's ``grouped_experts``: under a CUDA-graph capture a routed MoE layer runs its picked experts as
``moe_gate_up`` + ``moe_down`` (``lowbit.backends.grouped_experts``), reading the router's picks on the device, where
it ran the dense form. Tiny generation steps of ``tests/test_moe.py`` (2 layers, hidden 64, 4 experts, top-2) under
``TRITON_INTERPRET=1``; the capture is simulated (``RoutedExperts.runs_dense`` patched), and every call that would
wait for the device (``nonzero``, ``.tolist()``, ``.item()``) is patched to raise. The generation test is
``test_moe_routed_triton``'s step test (``grouped_experts`` on there)."""

from __future__ import annotations

import pytest
import torch

import lowbit
from lowbit.backends import grouped_experts
from lowbit.backends.routed_experts import RoutedExperts

transformers = pytest.importorskip("transformers")
pytest.importorskip("triton")
from lowbit.kernels.moe_blocked import moe_route  # noqa: E402
from test_moe import N_EXPERTS, N_LAYERS, _sharp_tiny  # noqa: E402

from conftest import forbid_device_waits, moe_triton_marks  # noqa: E402

pytestmark = moe_triton_marks()
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BLOCKED_ROWS = 20
"""A call past every row limit (``grouped_experts.MAX_ROWS`` ... ``DENSE_MAX_ROWS``, 16 at most): the expert-blocked
ops."""


@pytest.fixture(autouse=True)
def _one_export_per_model(reuse_captures: object) -> None:
    """Captures through the session's capture cache (conftest's ``reuse_captures``), as the other MoE files."""


def _routing(tokens: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-2 router weights ``[T, E]`` and picks: token 0 on experts 2 and 3 (one half), the rest spread; past 5
    tokens expert 3 and one of the others each (expert 3's rows: two of the blocked ops' blocks of 16 at T = 20)."""
    more = [[t % 3, 3] for t in range(5, tokens)]
    ids = torch.tensor([[2, 3], [0, 1], [1, 3], [0, 2], [3, 0]] + more)[:tokens]
    weights = torch.tensor([0.6, 0.4]).expand(tokens, 2)
    dense = torch.zeros(tokens, N_EXPERTS).scatter(1, ids, weights).to(dtype).to(DEVICE)
    return dense, dense != 0


@pytest.mark.parametrize(("family", "pipeline", "dtype"), [("qwen3_moe", None, torch.bfloat16),
                                                          ("mixtral", "quantize(w=uint4,sym=false,group=32)",
                                                           torch.float16)], ids=["bf16", "uint4-asym-g32-fp16"])
def test_grouped_layer_under_capture_equals_the_dense_form_without_device_waits(family, pipeline, dtype, monkeypatch):
    """Each routed layer of a generation step takes the grouped form (the report says so per layer; the experts'
    buffers are views of its stacks, one copy of the weights). Under a simulated capture it equals the dense form
    at T = 1 and 5 on the per-row ops (words: 4, with the blocked ops off, which take words from one row:
    ``WORDS_MAX_ROWS``, ``WORDS_DENSE_MAX_ROWS``): bit for bit on bf16 weights under the interpreter at T = 1 (the
    same roundings in the same order; at T = 5 as far as the processor's bf16 GEMM lets it, below; on a GPU within
    the bound that follows), within 2 eps (fp16's) of the largest
    output on uint4 words (measured at T = 1 and 5, session 54: bit for bit at T = 1; at T = 5, where the dense form
    runs the word kernels of M = 5 rows, whose float32 sums run in another order, 64% of the fp16 outputs moved, by
    at most 0.95 eps of the largest: an expert's output one step apart, then the terms' sum). At T = 20, past the
    row limits, the expert-blocked ops (``moe_route`` once a layer, no device wait either), within the same bound:
    their ``tl.dot`` tiles sum in another order on a GPU (measured under the interpreter, session 55: bit for bit on
    bf16, 0.86 eps of the largest on uint4); with them off a capture keeps the dense form. The step's spec is
    ``test_moe_routed_triton``'s (one capture of the float16 Mixtral in a session)."""
    hf = _sharp_tiny(family).to(dtype)
    from lowbit.generate import GenerationSpec

    compiled = lowbit.compile_model(hf, pipeline=pipeline, backend="triton", device=DEVICE,
                                    backend_options={"compile": False, "grouped_experts": True},
                                    generation=GenerationSpec(max_length=32, max_batch=2, cuda_graph=False))
    layers = [m for m in compiled.runner.gm.modules() if isinstance(m, RoutedExperts)]
    assert len(layers) == N_LAYERS and all(layer.grouped is not None for layer in layers)
    text = compiled.runner.report_text()
    rows = layers[0].grouped.max_rows  # against the blocked ops: 5 on float experts, 0 on words
    said = f"grouped at <= {rows} rows, expert-blocked above" if rows else "no per-row calls, expert-blocked from 1 row"
    assert text.count(said) == N_LAYERS and "kept dense under capture" not in text
    stack = layers[0].grouped.gate_up_weight
    views = [b for e in layers[0].experts for b in e.buffers() if b.shape == stack.shape[1:]]
    assert len(views) == N_EXPERTS and all(b.data_ptr() == stack[e].data_ptr() for e, b in enumerate(views))
    monkeypatch.setattr(RoutedExperts, "runs_dense", staticmethod(lambda x: True))
    routes = []
    monkeypatch.setattr(grouped_experts, "moe_route", lambda p: routes.append(p.shape[0]) or moe_route(p))
    # the per-row ops at T = 1 and 5; words take them only with the blocked ops off (WORDS_DENSE_MAX_ROWS: 4)
    per_row = (1, min(5, rows or grouped_experts.WORDS_DENSE_MAX_ROWS))
    for tokens in (*per_row, BLOCKED_ROWS):
        dense, picked = _routing(tokens, dtype)
        for layer in layers:
            layer.grouped.blocked_off = None if tokens == BLOCKED_ROWS or rows else "off"
            x = torch.randn(tokens, layer.out_features, generator=torch.Generator().manual_seed(tokens)).to(dtype)
            grouped, layer.grouped = layer.grouped, None
            reference = layer(dense, picked, x.to(DEVICE))  # the dense form
            layer.grouped = grouped
            with monkeypatch.context() as m:
                forbid_device_waits(m)
                y = layer(dense, picked, x.to(DEVICE))
            assert y.dtype == reference.dtype == dtype
            if pipeline is None and DEVICE == "cpu" and tokens == 1:  # (on a GPU cuBLAS and the GEMVs sum in
                assert torch.equal(y, reference)                         # other orders; tl.dot's tiles too)
            elif pipeline is None and DEVICE == "cpu" and tokens in per_row:
                # the dense form's several rows are torch's CPU bf16 GEMM, whose sums are the processor's: bit for
                # bit on the AMD EPYCs of sessions 54-58; on an Intel Xeon with AMX (session 59) 0.3% of the
                # outputs one bf16 step apart at T = 5
                assert (y != reference).float().mean().item() <= 0.01
                assert (y.float() - reference.float()).abs().max() <= 2 * torch.finfo(dtype).eps * reference.float(
                ).abs().max()
            else:
                err = (y.float() - reference.float()).abs().max()
                assert err <= 2 * torch.finfo(dtype).eps * reference.float().abs().max(), err
    assert routes == [BLOCKED_ROWS] * N_LAYERS  # the blocked ops ran at 20 rows only
    # past the row limit (a prefill's rows) the expert-blocked ops: each expert's weights once for its rows (the
    # per-row grid re-reads them per row: H100, a replayed 16 x 128 prefill 72-379 ms against the dense form's 9);
    # with them off (blocked_experts=false) a capture keeps the dense form past the per-row ops' own limit
    layer = layers[0]
    assert layer.grouped.slots == 2 and "(2 slots a token)" in text  # the router's top-2
    dense_rows = grouped_experts.DENSE_MAX_ROWS if rows else grouped_experts.WORDS_DENSE_MAX_ROWS
    x = torch.randn(dense_rows + 1, layer.out_features, generator=torch.Generator().manual_seed(0)).to(dtype)
    x = x.to(DEVICE)
    assert layer.grouped.takes(x, capturing=True) and layer.grouped.takes(x[:1], capturing=True)
    monkeypatch.setattr(layer.grouped, "blocked_off", "off")
    assert not layer.grouped.takes(x, capturing=True) and layer.grouped.takes(x[:dense_rows], capturing=True)


def test_a_layer_the_grouped_ops_cannot_read_keeps_the_dense_form_and_says_why():
    """An expert whose down projection is not a weight-only or float linear on the kernels (here a plain aten
    matmul) is refused with the reason, and nothing of the layer is changed (its buffers are not stacked)."""
    from lowbit.backends.grouped_experts import expert_forms, plan_grouped

    root = torch.nn.Module()
    root.register_buffer("w", torch.randn(8, 4))
    g = torch.fx.Graph()
    x, weight = g.placeholder("hidden_0"), g.placeholder("weight")
    y = g.call_function(torch.ops.aten.mm.default, (x, g.get_attr("w")))
    g.output(g.call_function(torch.ops.aten.mul.Tensor, (y, weight)))
    expert = torch.fx.GraphModule(root, g)
    assert expert_forms(expert, torch.bfloat16) == "its 2 ops are not gate/up, down, scale (and a cast)"
    before = expert.w
    assert plan_grouped([expert, expert], torch.bfloat16, 4).startswith("expert 0: its 2 ops")
    assert expert.w is before


def test_grouped_experts_needs_routed_experts():
    """``grouped_experts`` runs routed layers only: set away from its default (on) with ``routed_experts=false`` it
    is an error, not ignored; ``routed_experts=false`` alone is accepted (the dense form, nothing grouped); and
    ``blocked_experts`` so against ``grouped_experts=false``."""
    from lowbit.backends.registry import TritonBackendOptions

    with pytest.raises(ValueError, match="grouped_experts=false applies only with routed_experts=true"):
        TritonBackendOptions(grouped_experts=False, routed_experts=False)
    assert TritonBackendOptions(routed_experts=False).grouped_experts
    with pytest.raises(ValueError, match="blocked_experts=false applies only with grouped_experts=true"):
        TritonBackendOptions(blocked_experts=False, grouped_experts=False)
    assert not TritonBackendOptions(blocked_experts=False).blocked_experts
