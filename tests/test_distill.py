"""Recovery after structured pruning: the ``distill`` pass lowers the KL to the float model on held-out text
(real SmolLM2 slice, WikiText-2 test windows never trained on), gets its teacher from the pipeline's start, and
holds its place in the pass contract."""

from __future__ import annotations

import pytest
import torch
from conftest import held_out_slice

from lowbit.backends.torch_backend import TorchCompiled
from lowbit.calibration.distill import logit_kl
from lowbit.passes.base import PassError
from lowbit.passes.distill import Distill
from lowbit.passes.manager import PassManager, PipelineError, PipelineSpecError

CALIB = "calib_n=4,calib_len=64,progress=false"
PRUNE = f"prune-mlp(ratio=0.5,{CALIB})"
DISTILL = "distill(tokens=768,calib_n=24,calib_len=64,batch_size=2,lr=0.0005,progress=false)"


@pytest.fixture(scope="module")
def slice2(smollm2):
    return held_out_slice(smollm2, 2, 2)  # 2 x 256 WikiText-2 *test* tokens; training reads the validation text


def _kl(g, ids, ref) -> float:
    with torch.no_grad():
        return float(logit_kl(TorchCompiled(g)(ids), ref))


def test_distill_lowers_held_out_kl_to_the_float_model(slice2):
    graph, ids, ref = slice2
    pruned = graph.clone()
    PassManager(PRUNE).run(pruned)
    recovered = graph.clone()
    q = "model.layers.0.self_attn.q_proj.weight"
    q0 = graph.params[q].data.clone()
    report = PassManager(f"{PRUNE},{DISTILL}").run(recovered)
    st = report.records[1].stats
    assert st["steps"] == st["steps_planned"] == 6 and st["tokens"] == 6 * 2 * 64 and not st["stopped_early"]
    assert st["trained_tensors"] == 2 * 9  # 7 linears + 2 norms per block; the tied embedding/head stays
    # only the blocks' params changed, with the pruned shapes kept; the teacher's (shared) tensors are untouched
    assert recovered.params["lm_head.weight"].data is graph.params["lm_head.weight"].data
    assert torch.equal(graph.params[q].data, q0) and not torch.equal(recovered.params[q].data, q0)
    for name, v in pruned.params.items():
        assert recovered.params[name].data.shape == v.data.shape
    before, after = _kl(pruned, ids, ref), _kl(recovered, ids, ref)
    assert after < 0.85 * before, (before, after, st)  # measured 0.714 -> 0.526


def test_distill_contract_and_bad_input(slice2):
    graph, _, _ = slice2
    with pytest.raises(PipelineSpecError, match="distill .* must come after prune-mlp"):
        PassManager(f"{DISTILL},{PRUNE}")
    with pytest.raises(PipelineSpecError, match="quantize .* must come after distill"):
        PassManager(f"{PRUNE},quantize(w=int4),{DISTILL}")
    with pytest.raises(PassError, match="no teacher: run it in a pipeline"):
        Distill(tokens=10).run(graph.clone())
    with pytest.raises(PassError, match="option tokens"):
        Distill(tokens=0)
    g = graph.clone()
    PassManager("quantize(w=int8)").run(g)
    with pytest.raises(PipelineError, match="no dequantize node"):
        PassManager([Distill(tokens=10, progress=False)]).run(g)


@pytest.mark.gpu
def test_distill_on_cuda_bf16_lowers_held_out_kl(slice2):
    graph, ids, ref = slice2
    pruned = graph.clone()
    PassManager(PRUNE).run(pruned)
    recovered = graph.clone()
    spec = "distill(tokens=16384,calib_n=64,calib_len=128,batch_size=8,lr=0.0005,device=cuda,dtype=bfloat16,progress=false)"
    st = PassManager(f"{PRUNE},{spec}").run(recovered).records[1].stats
    assert st["steps"] == 16
    assert all(v.data.device.type == "cpu" for v in recovered.params.values())  # written back where they were
    assert _kl(recovered, ids, ref) < 0.8 * _kl(pruned, ids, ref)
