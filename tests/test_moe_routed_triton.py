"""The Triton backend runs a mixture-of-experts layer routed, as the torch backend does (``tests/test_moe_routed.py``):
each expert's gate and up merge per expert (never across experts), its nodes are retargeted to the kernels, and it
runs only on the tokens its router picked. Tiny random models of ``tests/test_moe.py`` (2 layers, hidden 64, 4
experts, top-2) under ``TRITON_INTERPRET=1`` on the CPU (or on CUDA), against the same graph lowered densely by the
Triton backend (``routed_experts=False``: all experts' gate and up in one wide GEMM)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import lowbit
from lowbit.backends.routed_experts import RoutedExperts, expert_of

transformers = pytest.importorskip("transformers")
pytest.importorskip("triton")
from test_moe import _COMMON, GEN_PROMPTS, N_EXPERTS, N_LAYERS, _ids, _sharp_tiny, _tiny  # noqa: E402

from conftest import forbid_device_waits, moe_triton_marks  # noqa: E402

pytestmark = moe_triton_marks()
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
W4A16 = "quantize(w=int4,group=32)"
EAGER = {"compile": False}


@pytest.fixture(autouse=True)
def _one_export_per_model(reuse_captures: object) -> None:
    """Every capture here goes through the session's capture cache (conftest's ``reuse_captures``): the tiny MoE
    models of ``test_moe`` (~8 s an export on CI's cores) are compiled again under other pipelines and backends."""


def _routed_layers(runner: torch.nn.Module) -> list[RoutedExperts]:
    return [m for m in runner.gm.modules() if isinstance(m, RoutedExperts)]


def _compile(model: torch.nn.Module, pipeline: str | None, **options: bool) -> Any:
    return lowbit.compile_model(model, pipeline=pipeline, backend="triton", device=DEVICE,
                                backend_options={**EAGER, **options})


def _expert_nodes(runner: torch.nn.Module) -> set[str]:
    """The node names of every routed expert module (each expert's own lowered nodes)."""
    return {n.name for layer in _routed_layers(runner) for e in layer.experts for n in e.graph.nodes
            if n.op == "call_function"}


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
@pytest.mark.parametrize(("pipeline", "dtype", "form"), [(None, torch.float32, None),
                                                          (W4A16, torch.float16, "w4a16"),
                                                          ("quantize(w=int8,a=int8)", torch.float16, "w8a8")],
                         ids=["float32", "w4a16-float16", "w8a8-float16"])
def test_triton_routed_logits_equal_the_dense_triton_lowering(family, pipeline, dtype, form):
    """Every MoE layer runs routed by default on the Triton backend: each expert's gate and up merge into one linear
    of that expert only (the registry's merge-linears had merged all experts' into one, split back here), W4A16's and
    W8A8's expert linears run their kernels inside the routed modules (gate/up with the silu*up epilogue; none on the
    reference), and the logits equal the dense Triton lowering's to 1e-6 (the torch backend's float32 bound for a
    matmul over fewer rows; measured 0.0 on both families in all three forms). The report names the routed
    layers. The expert-blocked ops are off here: on a GPU an eager call past the per-row limits takes them by
    default, whose ``tl.dot`` tiles sum in another order (H100, session 55: W4A16 float16 logits 4.9e-4 apart);
    ``test_moe_grouped`` bounds that path against the dense form."""
    model = _tiny(family).to(dtype)
    ids = _ids()
    compiled = _compile(model, pipeline, blocked_experts=False)
    runner = compiled.runner
    assert any(len({expert_of(m) for m in n.meta.get("merged", ())}) > 1 for n in compiled.graph.nodes)
    merged_experts = [m.split(", ") for m in runner.report["merged"].values() if ".experts." in m]
    assert len(merged_experts) == N_LAYERS * N_EXPERTS
    assert all(len(members) == 2 and len({expert_of(m) for m in members}) == 1 for members in merged_experts)
    assert len(_routed_layers(runner)) == N_LAYERS
    assert (f"routed experts: {N_LAYERS} MoE layers run each expert on its routed tokens only, on its kernels "
            "(model.layers.0.mlp.experts, model.layers.1.mlp.experts)") in runner.report_text()
    if form is not None:
        assert not runner.report["fallback"], runner.report["fallback"]
        experts_on_kernels = [f for n, f in runner.report["kernels"].items() if n in _expert_nodes(runner)]
        assert sorted(experts_on_kernels) == [form] * (N_LAYERS * N_EXPERTS) + [
            f"{form}+silu*up"] * (N_LAYERS * N_EXPERTS)
    dense = _compile(model, pipeline, routed_experts=False).runner
    assert _routed_layers(dense) == [] and "routed" not in dense.report_text()
    torch.testing.assert_close(compiled(ids), dense(ids), atol=1e-6, rtol=0)


def test_triton_routed_experts_run_only_on_their_tokens():
    """Each expert sees only its routed rows (per layer tokens x top-k in all), and the matmul FLOPs drop by exactly
    (E - k) x tokens x the three projections' FLOPs per layer against the dense Triton lowering (float32: its linears
    are aten matmuls the counter sees; the kernels' rows are ``rows_seen``)."""
    model = _tiny("mixtral")
    ids = _ids()
    compiled = _compile(model, None)
    dense = _compile(model, None, routed_experts=False)
    tokens, top_k = ids.numel(), _COMMON["num_experts_per_tok"]
    with FlopCounterMode(display=False) as dense_flops:
        dense(ids)
    layers = _routed_layers(compiled.runner)
    with FlopCounterMode(display=False) as routed_flops:
        compiled(ids)
    saved = N_LAYERS * (N_EXPERTS - top_k) * tokens * 3 * 2 * _COMMON["hidden_size"] * _COMMON["intermediate_size"]
    assert dense_flops.get_total_flops() - routed_flops.get_total_flops() == saved
    assert len(layers) == N_LAYERS
    assert all(sum(layer.rows_seen) == tokens * top_k and max(layer.rows_seen) < tokens for layer in layers)


def test_triton_chain_not_exactly_dense_form_stays_dense_and_is_reported():
    """A layer whose chain differs from the dense form (one expert's ``where`` fills 1.0 where its router did not
    pick it) stays dense on the Triton backend and its report says why; the other layer runs routed, and the logits
    equal the dense Triton lowering of the same graph."""
    from lowbit.backends.triton_backend import TritonCompiled

    model = _tiny("olmoe")
    ids = _ids()
    graph = lowbit.compile_model(model).graph.clone()
    where = next(n for n in graph.nodes if n.op == "aten.where.ScalarOther" and n.module.startswith("model.layers.0."))
    where.args = (*where.args[:2], 1.0)
    routed = TritonCompiled(graph, DEVICE, compile=False)
    assert routed.routed_report["model.layers.0.mlp.experts"].startswith("kept dense: expert 0's scaled output")
    assert routed.routed_report["model.layers.1.mlp.experts"] == f"routed ({N_EXPERTS} experts)"
    text = routed.report_text()
    assert "  model.layers.0.mlp.experts kept dense: expert 0's scaled output" in text
    assert "routed experts: 1 MoE layers run each expert on its routed tokens only" in text
    dense = TritonCompiled(graph, DEVICE, compile=False, routed_experts=False)
    torch.testing.assert_close(routed(ids), dense(ids), atol=1e-6, rtol=0)


# 4 tokens (the prefill and 3 decode steps: every path the routed step has, ~1/3 of the 12 tokens' interpreter time)
# by default; the 12 tokens, where a later step's router pick could still part from the reference's, with LOWBIT_SLOW=1
@pytest.mark.parametrize("new_tokens", [4, pytest.param(12, marks=pytest.mark.slow)])
def test_triton_routed_w4a16_mixtral_step_generates_the_torch_backends_tokens(new_tokens, monkeypatch):
    """A float16 W4A16 Mixtral generation step on the Triton backend runs its experts routed on the w4a16 kernels in
    the prefill (many rows) and in each decode step (one row: its top-2 experts only, outside a CUDA graph and with
    ``grouped_experts`` off; under a capture without it the layer takes the dense form), and its greedy tokens for two
    left-padded prompts equal the torch backend's (the dense Triton lowering's: ``tests/test_moe_step.py``). The
    decode steps run eagerly here (no CUDA graph) so every step's routed rows are counted; on CUDA the step replayed
    from CUDA graphs, captured dense (``grouped_experts`` off) and with ``grouped_experts`` (the default: each decode
    step's layer captured as ``moe_gate_up`` + ``moe_down``) generates the same tokens (H100, session 54; a replay
    runs no Python, so its rows cannot be counted). On the CPU (where grouping changes nothing uncaptured) the same
    generation with every call taken as under a capture (``runs_dense`` patched; the decode steps' 2 rows and the
    prefill's 18 on the expert-blocked ops, which take words from one row (``WORDS_MAX_ROWS``), any device wait raising:
    ``tests/test_moe_grouped.py``) gives them too and runs no expert on its routed rows."""
    hf = _sharp_tiny("mixtral").to(torch.float16)
    from lowbit.generate import GenerationSpec

    spec = GenerationSpec(max_length=32, max_batch=2, cuda_graph=False)
    reference = lowbit.compile_model(hf, pipeline=W4A16, generation=spec).generate(GEN_PROMPTS, new_tokens,
                                                                                   stop_tokens=())
    if DEVICE == "cuda":
        graphed = lowbit.compile_model(hf, pipeline=W4A16, backend="triton", device=DEVICE,
                                       backend_options={**EAGER, "grouped_experts": False},  # captured dense
                                       generation=GenerationSpec(max_length=32, max_batch=2))
        assert graphed.generate(GEN_PROMPTS, new_tokens, stop_tokens=()).tokens == reference.tokens
        grouped = lowbit.compile_model(hf, pipeline=W4A16, backend="triton", device=DEVICE,
                                       backend_options={**EAGER, "grouped_experts": True},
                                       generation=GenerationSpec(max_length=32, max_batch=2))
        assert grouped.generate(GEN_PROMPTS, new_tokens, stop_tokens=()).tokens == reference.tokens  # a real capture
    tri = lowbit.compile_model(hf, pipeline=W4A16, backend="triton", generation=spec, device=DEVICE,
                               backend_options={**EAGER, "grouped_experts": DEVICE == "cpu"})
    layers = _routed_layers(tri.runner)
    assert len(layers) == N_LAYERS
    assert not tri.runner.report["fallback"], tri.runner.report["fallback"]
    assert tri.generate(GEN_PROMPTS, new_tokens, stop_tokens=()).tokens == reference.tokens
    # each layer's top-2 experts ran on the prefill's 2 x 9 rows (left-padded) and each decode step's 2 rows
    rows = len(GEN_PROMPTS) * max(map(len, GEN_PROMPTS)) + (new_tokens - 1) * len(GEN_PROMPTS)
    assert all(sum(layer.rows_seen) == rows * _COMMON["num_experts_per_tok"] for layer in layers)
    if DEVICE == "cuda":
        return
    for layer in layers:
        layer.rows_seen = [0] * N_EXPERTS
    monkeypatch.setattr(RoutedExperts, "runs_dense", staticmethod(lambda x: True))

    def without_device_waits(forward):
        def run(*args):
            with monkeypatch.context() as waits:
                forbid_device_waits(waits)
                return forward(*args)
        return run

    for layer in layers:
        monkeypatch.setattr(layer, "forward", without_device_waits(layer.forward))
    assert tri.generate(GEN_PROMPTS, new_tokens, stop_tokens=()).tokens == reference.tokens
    assert all(sum(layer.rows_seen) == 0 for layer in layers)
