"""Mixture-of-experts follow-ups on the dense-routing form (``lowbit.models.DenseExperts``): an expert's non-finite
output on a token not routed to it, a float64 model's norms raised through its float32 casts, the reasons
smooth-quant gives for the sites it passes over, and AWQ's scale at the norm before the experts. Tiny random models
as in ``test_moe``, against transformers' forward."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

import lowbit

transformers = pytest.importorskip("transformers")

from test_moe import _COMMON, N_EXPERTS, N_LAYERS, _ids, _logit_error, _tiny  # noqa: E402

POISONED_EXPERT = N_EXPERTS - 1


@pytest.fixture(autouse=True)
def _one_export_per_model(reuse_captures: object) -> None:
    """Every capture here goes through the session's capture cache (conftest's ``reuse_captures``): the tiny MoE
    models of ``test_moe`` (~8 s an export on CI's cores) are compiled again under other pipelines and backends."""


def _poison_an_unrouted_expert(model: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer 0's last expert made to overflow on exactly the tokens its router does not send to it: along a unit
    direction ``u`` of the hidden states, its router logit is ``-8·u·x`` (the other experts' logits are the random
    init's, ~0.2), so a token with ``u·x > 0.2`` never picks it, while its gate and up rows are ``1e20·u``, so its
    ``act(gate)·up`` is ``(1e20·u·x)^2``, inf in float32 from ``u·x > 0.2`` on (and 0 for ``u·x < 0``, where it is
    picked). transformers never runs it on those tokens. Returns the (experts' input, top-k index) that transformers'
    layer-0 experts module saw on ``_ids()``."""
    hidden = model.config.hidden_size
    u = torch.randn(hidden, generator=torch.Generator().manual_seed(5))
    u = u / u.norm()
    mlp = model.model.layers[0].mlp
    with torch.no_grad():
        mlp.gate.weight[POISONED_EXPERT] = -8 * u
        mlp.experts.gate_up_proj[POISONED_EXPERT] = 1e20 * u
    seen: dict[str, torch.Tensor] = {}

    def keep(module: Any, args: tuple[Any, ...]) -> None:
        seen["x"], seen["index"] = args[0].detach(), args[1].detach()

    handle = mlp.experts.register_forward_pre_hook(keep)
    with torch.no_grad():
        model(input_ids=_ids())
    handle.remove()
    return seen["x"], seen["index"]


def test_an_expert_overflowing_on_tokens_not_routed_to_it_leaves_the_logits_finite_and_transformers(tmp_path):
    """Layer 0's last expert overflows to inf (its down_proj then to NaN) on tokens its router does not pick, and
    only there: transformers never runs it on them and its logits are finite. The dense form ran it on every token
    and multiplied its output by the routing weight 0 (0 x inf = NaN), so every such token's logits were NaN; now
    an expert's output is dropped where its weight is 0 (a ``where``): the logits equal transformers' eager loop to
    1e-5 (float32), on the torch backend and in a plain ONNX Runtime session of the exported graph (``Where``)."""
    ort = pytest.importorskip("onnxruntime")
    model = _tiny("mixtral", experts_implementation="eager")
    x, index = _poison_an_unrouted_expert(model)
    experts = model.model.layers[0].mlp.experts
    inner = experts.gate_up_proj.shape[1] // 2
    with torch.no_grad():  # the poisoned expert run densely, as the dense form runs it: on every token
        gate_up = x @ experts.gate_up_proj[POISONED_EXPERT].t()
        dense_out = (experts.act_fn(gate_up[:, :inner]) * gate_up[:, inner:]) @ experts.down_proj[POISONED_EXPERT].t()
    routed = (index == POISONED_EXPERT).any(-1)
    overflowed = ~torch.isfinite(dense_out).all(-1)
    assert overflowed.sum() >= 8 and not (overflowed & routed).any() and routed.any()
    ids = _ids()
    with torch.no_grad():
        reference = model(input_ids=ids).logits
    assert torch.isfinite(reference).all()
    compiled = lowbit.compile_model(model)
    logits = compiled(ids)
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(logits, reference, atol=1e-5, rtol=0)
    session = ort.InferenceSession(str(lowbit.export(compiled, tmp_path / "moe.onnx")))
    got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: ids.numpy()})[0])
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, reference, atol=1e-5, rtol=0)


def _norm_ops(graph: Any) -> dict[str, dict[str, Any]]:
    """Each ``rms_norm`` node's kwargs by module."""
    return {n.module: n.kwargs for n in graph.nodes if n.op == "rms_norm"}


def test_a_float64_mixtrals_norms_are_raised_keeping_their_float32_statistics(monkeypatch):
    """A float64 Mixtral's RMSNorm casts to float32 for its statistics and back (transformers' ``to(float32)``).
    Mixtral's router renormalises the top-k weights in place (``div_``); functionalized by retracing
    (``run_decompositions``, here forced: ``FUNCTIONALIZE_IN_PLACE`` off) the casts read ``aten._to_copy``, so its
    norms stayed ATen (0 ``rms_norm``: no norm site for smooth-quant, AWQ, fold-norms or rotate). Now every norm (2 a
    layer and the final one) of a float64 Mixtral and of a float64 Llama (exported without functionalizing:
    ``aten.to.dtype``, the form a node-by-node functionalized Mixtral keeps too) is an ``rms_norm`` with
    ``compute_dtype=float32``: it keeps transformers' float32 rounding (a float64 rms_norm would not), so the logits
    equal transformers' exactly (measured 0.0), where float64 statistics would be off by ~1e-7 of them."""
    import importlib

    from conftest import tiny_llama

    from lowbit.backends.torch_backend import TorchCompiled

    monkeypatch.setattr(importlib.import_module("lowbit.ir.capture"), "FUNCTIONALIZE_IN_PLACE", False)

    mixtral = _tiny("mixtral", experts_implementation="eager").double()
    torch.manual_seed(0)
    llama = tiny_llama(layers=2, vocab=128).double()
    for model in (mixtral, llama):
        ids = _ids()
        with torch.no_grad():
            reference = model(input_ids=ids).logits
        compiled = lowbit.compile_model(model)
        norms = _norm_ops(compiled.graph)
        assert len(norms) == 2 * model.config.num_hidden_layers + 1, (type(model).__name__, sorted(norms))
        assert all(kwargs["compute_dtype"] == torch.float32 for kwargs in norms.values())
        assert not [n for n in compiled.graph.nodes if n.op.startswith("aten.") and n.module in norms]
        logits = compiled(ids)
        assert logits.dtype == torch.float64
        assert (logits - reference).abs().max().item() == 0.0
        for node in compiled.graph.nodes:  # statistics in float64 instead: no longer transformers' logits
            if node.op == "rms_norm":
                node.kwargs["compute_dtype"] = None
        off = (TorchCompiled(compiled.graph)(ids) - reference).abs().max().item() / reference.abs().max().item()
        assert 1e-10 < off < 1e-5, off


TIED_ROUTER = """\
graph g(%ids: i64[1,3]) {
  param @emb: f64[10,4]
  param @router: f64[2,4]
  param @gate: f64[8,4]
  param @up: f64[8,4]
  param @down: f64[4,8]
  param @head: f64[10,4]
  %e: f64[1,3,4] = embedding(@emb, %ids)  # model.embed_tokens
  %n: f64[1,3,4] = rms_norm(%e, None, eps=1e-06)  # layers.0.post_attention_layernorm
  %l: f64[1,3,2] = linear(%n, @router)  # layers.0.mlp.gate
  %g: f64[1,3,8] = linear(%n, @gate)  # layers.0.mlp.experts.expert_0.gate_proj
  %s: f64[1,3,8] = silu(%g)  # layers.0.mlp.experts.expert_0
  %u: f64[1,3,8] = linear(%n, @up)  # layers.0.mlp.experts.expert_0.up_proj
  %p: f64[1,3,8] = aten.mul.Tensor(%s, %u)  # layers.0.mlp.experts.expert_0
  %d: f64[1,3,4] = linear(%p, @down)  # layers.0.mlp.experts.expert_0.down_proj
  %r: f64[1,3,4] = residual_add(%e, %d)  # layers.0
  %w: f64[1,3,2] = linear(%r, @router)  # layers.0.probe
  %f: f64[1,3,4] = rms_norm(%r, None, eps=1e-06)  # model.norm
  %o: f64[1,3,10] = linear(%f, @head)  # lm_head
  return %l, %w, %o
}
"""
"""A one-expert MoE layer by hand: its norm read by the router (kept float by default) and the expert's gate/up,
the router's weight shared with another linear (tied); the final norm read by lm_head alone (kept float)."""


def _smooth(text: str, **options: Any) -> dict[str, Any]:
    """smooth-quant's stats on the hand-written graph ``text`` with random weights."""
    from lowbit.ir.parser import parse_graph
    from lowbit.passes.manager import PassManager
    from lowbit.passes.smooth_quant import SmoothQuant

    gen = torch.Generator().manual_seed(0)
    weights = {k: torch.randn(v.type.shape, generator=gen, dtype=v.type.dtype)
               for k, v in parse_graph(text).params.items()}
    calib = torch.randint(0, 10, (2, 3), generator=torch.Generator().manual_seed(1))
    manager = PassManager([SmoothQuant(calib=calib, progress=False, **options)])
    return manager.run(parse_graph(text, weights)).records[0].stats


def test_smoothquant_says_which_reason_skipped_every_site_of_a_kind():
    """Where every site of a kind is skipped, ``sites_not_found`` said 'every one feeds a linear kept float' whatever
    refused them. The MoE norm here is refused by its tied router (its expert's gate/up would be quantized): the
    message now names that site and the tie, and counts the final norm (lm_head alone) as kept float. With the
    expert's gate/up kept float too, both norms are kept-float ones, and the message says that alone. The gated
    site (up -> down) is smoothed either way. Without it (sites=[norm]) nothing is smoothed, and the error says
    why each site found was skipped."""
    from lowbit.passes.manager import PipelineError

    tied = ("its reader linear %l (module 'layers.0.mlp.gate') is kept float and shares its weight with another "
            "node (tied): scaling its columns would copy that weight")
    stats = _smooth(TIED_ROUTER)
    assert stats["sites"] == {"gated": 1}
    assert stats["sites_skipped"] == {"norm:layers.0.post_attention_layernorm": tied,
                                      "norm:model.norm": "every reader is a linear kept float (lm_head, keep=)"}
    assert stats["sites_not_found"] == {
        "norm": f"every one is skipped: norm:layers.0.post_attention_layernorm: {tied}; 1 more feeds only linears "
                "kept float (lm_head, keep=)"}
    stats = _smooth(TIED_ROUTER, keep=["*.expert_0.gate_proj", "*.expert_0.up_proj"])
    assert stats["sites"] == {"gated": 1}
    assert stats["sites_not_found"] == {"norm": "every one feeds a linear kept float (lm_head, keep=)"}
    with pytest.raises(PipelineError, match=r"no place to fold scales \(norm\) in this graph; of the 2 site\(s\) "
                                            r"found, every one is skipped: norm:layers\.0\.post_attention_layernorm: "
                                            r"its reader linear %l .* \(tied\).*; 1 more feeds only linears kept "
                                            r"float"):
        _smooth(TIED_ROUTER, sites=["norm"])


ROUTERS = [f"model.layers.{i}.mlp.gate" for i in range(N_LAYERS)]


def _with_outputs_of(graph: Any, modules: list[str]) -> Any:
    """A copy of ``graph`` that also returns the output of the linear of each module in ``modules``."""
    out = graph.clone()
    by_module = {n.module: n for n in out.nodes if n.op == "linear"}
    out.outputs = [*out.outputs, *(by_module[m].output for m in modules)]
    return out


def _awq_stats(compiled: Any) -> dict[str, Any]:
    return compiled.report.pipeline.records[0].stats


def test_awq_scales_the_norm_before_the_experts_with_the_float_router_absorbing_it(smollm2):
    """AWQ gave a group of linears a scale only where a site's readers were exactly the group, so the norm before a
    MoE block (read by the float router beside the experts' gate/up) got none: 12 of 14 groups scaled on a tiny
    Mixtral, the experts' gate/up listed unscaled. Now the router absorbs the scale in its input columns, as in
    smooth-quant: all 14 scaled, and the final norm (read by lm_head alone) is listed in ``sites_skipped`` with its
    reason. In float64 with attention kept float, layer 0's router logits, from the smoothed norm through the
    router's scaled weight, equal the float graph's (exact: measured 2.4e-16 of them) while both routers' weights
    changed. On real text (a tiny Mixtral with SmolLM2's vocabulary, calibrated on the shipped WikiText-2 text,
    measured on its test split) AWQ int4 (group 32) is within RTN int4's relative logit error (measured 0.0838
    against 0.0924). With the MoE norms unscaled it was 0.0820: the scale is chosen by the experts' output error
    on every token, while an expert's output counts only on the tokens routed to it."""
    from lowbit.backends.torch_backend import TorchCompiled
    from lowbit.calibration.data import calibration_ids
    from lowbit.eval.perplexity import token_ids, windows

    from conftest import CALIB_TEXT

    tok = smollm2[1]
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(transformers.MixtralConfig(
        num_local_experts=N_EXPERTS, **{**_COMMON, "vocab_size": len(tok)})).eval()
    calib = calibration_ids(CALIB_TEXT, tok, 16, 64)
    held_out = windows(token_ids("wikitext2-test", tok), 64, 4)
    awq = "awq(w=int4,group=32,calib_n=16,calib_len=64,progress=false)"

    double = copy.deepcopy(model).double()
    plain = lowbit.compile_model(double, pipeline="dce").graph
    smoothed = lowbit.compile_model(double, pipeline=awq.replace("progress", "keep=[*.self_attn.*],progress"),
                                    calib=calib)
    stats = _awq_stats(smoothed)
    # per layer the experts' gate/up (at the norm) and each expert's down (at its up_proj): all scaled
    assert stats["scaled_groups"] == stats["input_groups"] == N_LAYERS * (1 + N_EXPERTS)
    assert stats["unscaled_groups"] == []
    kept = "every reader is a linear this pass keeps float (lm_head, keep=, out of modules=)"
    assert stats["sites_skipped"] == {"norm:model.norm": kept, **{
        f"{kind}:model.layers.{i}.{module}": kept for i in range(N_LAYERS)
        for kind, module in (("norm", "input_layernorm"), ("attention-v", "self_attn.v_proj"))}}
    ids = held_out[:2]
    want = TorchCompiled(_with_outputs_of(plain, ROUTERS[:1]))(ids)[-1]
    got = TorchCompiled(_with_outputs_of(smoothed.graph, ROUTERS[:1]))(ids)[-1]
    assert got.dtype == torch.float64
    assert (got - want).abs().max().item() <= 1e-12 * want.abs().max().item()
    for module in ROUTERS:
        before = next(n.args[1].data for n in plain.nodes if n.op == "linear" and n.module == module)
        after = next(n.args[1].data for n in smoothed.graph.nodes if n.op == "linear" and n.module == module)
        assert not torch.allclose(before, after, rtol=1e-3, atol=0), module

    error = _logit_error(model, held_out)
    rtn, _ = error("quantize(w=int4,group=32)")
    awq_error, compiled = error(awq, calib=calib)
    stats = _awq_stats(compiled)
    assert stats["scaled_groups"] == N_LAYERS * (3 + N_EXPERTS)  # and q/k/v, o
    assert stats["sites_skipped"] == {"norm:model.norm": kept}
    assert awq_error <= rtn


def test_awq_refuses_a_site_whose_float_reader_is_tied_and_says_so():
    """The hand-written MoE layer's norm is read by its expert's gate/up (quantized) and by the router, kept float
    and sharing its weight with another linear: scaling the router's columns would change that linear too, so AWQ
    refuses the site and lists it with the reason, as it lists the final norm (lm_head alone); the gated site
    (up -> down) is scaled. The expert's gate/up group stays unscaled (in ``unscaled_groups``)."""
    from lowbit.ir.parser import parse_graph
    from lowbit.passes.awq import AWQ
    from lowbit.passes.manager import PassManager

    gen = torch.Generator().manual_seed(0)
    weights = {k: torch.randn(v.type.shape, generator=gen, dtype=v.type.dtype)
               for k, v in parse_graph(TIED_ROUTER).params.items()}
    graph = parse_graph(TIED_ROUTER, weights)
    calib = torch.randint(0, 10, (4, 3), generator=torch.Generator().manual_seed(1))
    stats = PassManager([AWQ(w="int8", calib=calib, calib_n=4, progress=False)]).run(graph).records[0].stats
    assert stats["sites_skipped"] == {
        "norm:layers.0.post_attention_layernorm": "its reader linear %l (module 'layers.0.mlp.gate') is kept float "
                                                  "and shares its weight with another node (tied): scaling its "
                                                  "columns would change that node too",
        "norm:model.norm": "every reader is a linear this pass keeps float (lm_head, keep=, out of modules=)"}
    assert stats["scaled_groups"] == 1 and stats["unscaled_groups"] == [
        "layers.0.mlp.experts.expert_0.gate_proj", "layers.0.probe"]
    assert torch.equal(graph.params["router"].data, weights["router"])
