"""Mixture-of-experts follow-ups on the dense-routing form (``lowbit.models.DenseExperts``): an expert's non-finite
output on a token not routed to it, a float64 model's norms raised through its float32 casts, the reasons
smooth-quant gives for the sites it passes over, and AWQ's scale at the norm before the experts. Tiny random models
as in ``test_moe``, against transformers' forward."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import lowbit

transformers = pytest.importorskip("transformers")

from test_moe import N_EXPERTS, N_LAYERS, _ids, _tiny  # noqa: E402

POISONED_EXPERT = N_EXPERTS - 1


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
