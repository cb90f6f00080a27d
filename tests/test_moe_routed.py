"""The torch backend runs a mixture-of-experts layer routed (``lowbit.backends.routed_experts``): each expert only on
the tokens its router picked, with the dense form's terms in its order. Tiny random models of ``tests/test_moe.py``
(2 layers, hidden 64, 4 experts, top-2), against the same graph lowered densely (``routed_experts=False``) and
against transformers' eager expert loop."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import lowbit
from lowbit.backends.routed_experts import RoutedExperts
from lowbit.backends.torch_backend import TorchCompiled

transformers = pytest.importorskip("transformers")
from conftest import needs_fused_experts  # noqa: E402

pytestmark = needs_fused_experts()
from test_moe import _COMMON, N_EXPERTS, N_LAYERS, _ids, _tiny  # noqa: E402

ROUTED_FAMILIES = ["mixtral", "qwen2_moe-norm_topk", "qwen3_moe", "olmoe"]


@pytest.fixture(autouse=True)
def _one_export_per_model(reuse_captures: object) -> None:
    """Every capture here goes through the session's capture cache (conftest's ``reuse_captures``): the tiny MoE
    models of ``test_moe`` (~8 s an export on CI's cores) are compiled again under other pipelines and backends."""


def _routed_layers(runner: TorchCompiled) -> list[RoutedExperts]:
    return [m for m in runner.gm.modules() if isinstance(m, RoutedExperts)]


@pytest.mark.parametrize("family", ROUTED_FAMILIES)
def test_routed_logits_equal_dense_and_transformers_in_float64(family):
    """Every MoE layer runs routed by default, and the logits equal the dense lowering's and transformers' eager
    loop's to 1e-12 in float64 (measured: 0.0 against the dense lowering: each token's sum has the same terms in
    the same order). The report names the routed layers."""
    model = _tiny(family, experts_implementation="eager").double()
    ids = _ids()
    with torch.no_grad():
        reference = model(input_ids=ids).logits
    compiled = lowbit.compile_model(model)
    assert len(_routed_layers(compiled.runner)) == N_LAYERS
    assert "2 MoE layers run each expert on its routed tokens only" in compiled.runner.report_text()
    dense = TorchCompiled(compiled.graph, routed_experts=False)
    assert _routed_layers(dense) == [] and "routed" not in dense.report_text()
    logits = compiled(ids)
    torch.testing.assert_close(logits, dense(ids), atol=1e-12, rtol=0)
    torch.testing.assert_close(logits, reference, atol=1e-12, rtol=0)


@pytest.mark.parametrize("pipeline", ["quantize(w=int4,group=32)", "quantize(w=int8,a=int8)"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_routed_quantized_graphs_equal_dense(pipeline, dtype):
    """W4A16 RTN (weights dequantized at lowering, and kept packed) and W8A8 (a per-token activation QDQ inside each
    expert, before down_proj) run routed on Qwen3-MoE and equal the dense lowering: to 1e-12 in float64, 1e-6 in
    float32 (a matmul over fewer rows may round otherwise; measured 0.0 on these, 4.8e-7 on a 32-expert model)."""
    model = _tiny("qwen3_moe").to(dtype)
    ids = _ids()
    compiled = lowbit.compile_model(model, pipeline=pipeline)
    atol = 1e-12 if dtype == torch.float64 else 1e-6
    for keep_packed in (False, True):
        routed = TorchCompiled(compiled.graph, keep_packed=keep_packed)
        assert len(_routed_layers(routed)) == N_LAYERS
        dense = TorchCompiled(compiled.graph, keep_packed=keep_packed, routed_experts=False)
        torch.testing.assert_close(routed(ids), dense(ids), atol=atol, rtol=0)


def test_routed_experts_run_only_on_their_tokens():
    """Each expert sees only its routed rows: per layer the rows add up to tokens x top-k, and the matmul FLOPs
    drop by exactly (E - k) x tokens x the three projections' FLOPs per layer against the dense lowering (which
    runs every expert on every token)."""
    model = _tiny("mixtral")
    ids = _ids()
    compiled = lowbit.compile_model(model)
    tokens, top_k = ids.numel(), _COMMON["num_experts_per_tok"]
    hidden, inner = _COMMON["hidden_size"], _COMMON["intermediate_size"]
    dense = TorchCompiled(compiled.graph, routed_experts=False)
    with FlopCounterMode(display=False) as dense_flops:
        dense(ids)
    layers = _routed_layers(compiled.runner)
    for layer in layers:
        layer.rows_seen = [0] * N_EXPERTS
    with FlopCounterMode(display=False) as routed_flops:
        compiled(ids)
    saved = N_LAYERS * (N_EXPERTS - top_k) * tokens * 3 * 2 * hidden * inner
    assert dense_flops.get_total_flops() - routed_flops.get_total_flops() == saved
    assert len(layers) == N_LAYERS
    assert all(sum(layer.rows_seen) == tokens * top_k and max(layer.rows_seen) < tokens for layer in layers)


def test_chain_not_exactly_dense_form_stays_dense_and_is_reported():
    """A layer whose chain differs from the dense form (here one expert's ``where`` fills 1.0, not 0.0, where its
    router did not pick it) is lowered densely, and the report says why; the other layer still runs routed, and the
    logits equal the dense lowering of the same graph (never a routed result of another computation)."""
    model = _tiny("olmoe").double()
    ids = _ids()
    graph = lowbit.compile_model(model).graph.clone()
    where = next(n for n in graph.nodes if n.op == "aten.where.ScalarOther" and n.module.startswith("model.layers.0."))
    where.args = (*where.args[:2], 1.0)
    routed = TorchCompiled(graph)
    assert routed.routed_report["model.layers.0.mlp.experts"].startswith("kept dense: expert 0's scaled output")
    assert routed.routed_report["model.layers.1.mlp.experts"] == f"routed ({N_EXPERTS} experts)"
    assert "torch: model.layers.0.mlp.experts kept dense" in routed.report_text()
    dense = TorchCompiled(graph, routed_experts=False)
    torch.testing.assert_close(routed(ids), dense(ids), atol=1e-12, rtol=0)
    assert not torch.equal(dense(ids), TorchCompiled(lowbit.compile_model(model).graph)(ids))


def test_routed_experts_option_reaches_the_torch_backend():
    """``backend_options={'routed_experts': False}`` lowers every MoE layer densely."""
    compiled = lowbit.compile_model(_tiny("qwen3_moe"), backend_options={"routed_experts": False})
    assert _routed_layers(compiled.runner) == []


def test_routed_layer_runs_the_dense_form_while_a_cuda_graph_captures(monkeypatch):
    """Under a CUDA graph capture (the generator's decode steps on CUDA) ``nonzero`` cannot run: the routed module
    takes the dense form there (forced here on the CPU), and the logits equal the dense lowering's in float64 with
    no routed rows counted."""
    model = _tiny("qwen2_moe-norm_topk").double()
    ids = _ids()
    compiled = lowbit.compile_model(model)
    monkeypatch.setattr(RoutedExperts, "runs_dense", staticmethod(lambda x: True))
    layers = _routed_layers(compiled.runner)
    logits = compiled(ids)
    assert len(layers) == N_LAYERS and all(sum(layer.rows_seen) == 0 for layer in layers)
    torch.testing.assert_close(logits, TorchCompiled(compiled.graph, routed_experts=False)(ids), atol=1e-12, rtol=0)


def test_experts_linears_merged_across_experts_stay_dense():
    """``merge-linears`` after ``fuse-qlinear`` merges every expert's gate and up projections into one wide qlinear
    (as the Triton backend runs them): no expert has its own nodes, so each layer stays dense, the report says why,
    and the logits are the dense lowering's."""
    model = _tiny("mixtral").double()
    ids = _ids()
    compiled = lowbit.compile_model(model, pipeline="quantize(w=int4,group=32),fuse-qlinear,merge-linears",
                                    backend_options={"keep_packed": True})
    assert _routed_layers(compiled.runner) == []
    for layer in range(N_LAYERS):
        why = compiled.runner.routed_report[f"model.layers.{layer}.mlp.experts"]
        assert why.startswith("kept dense: expert 1 reads") and "merged across experts" in why
    dense = TorchCompiled(compiled.graph, keep_packed=True, routed_experts=False)
    torch.testing.assert_close(compiled(ids), dense(ids), atol=0, rtol=0)


def test_routed_layer_finds_every_experts_rows_in_one_nonzero():
    """``nonzero`` waits for the device: a routed layer calls it once for all its experts (expert-major rows of
    ``picked.t()``), not once per expert, and the logits stay the dense lowering's in float64."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountNonzero(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - torch's protocol
            CountNonzero.calls += func is torch.ops.aten.nonzero.default
            return func(*args, **(kwargs or {}))

    model = _tiny("mixtral").double()
    ids = _ids()
    compiled = lowbit.compile_model(model)
    with CountNonzero():
        logits = compiled(ids)
    assert CountNonzero.calls == N_LAYERS
    torch.testing.assert_close(logits, TorchCompiled(compiled.graph, routed_experts=False)(ids), atol=1e-12, rtol=0)
