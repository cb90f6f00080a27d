"""End-to-end tuning of a quantized model's scales (``tune-qparams``, EfficientQAT's E2E-QP): on a real SmolLM2
slice quantized W4A8, the KL to the float model falls on held-out WikiText-2 *test* windows (training reads the
validation text), the codes and zero points stay bit for bit, and the scales behind the activation quantizers
move too (their gradient passes the A8 rounding straight through)."""

from __future__ import annotations

import pytest
import torch
from conftest import held_out_kl, held_out_slice

from lowbit.calibration.distill import trainable_params
from lowbit.passes.base import PassError
from lowbit.passes.manager import PassManager, PipelineError, PipelineSpecError
from lowbit.passes.tune_qparams import TuneQParams

QUANT = "quantize(w=int4,group=64,sym=false,a=int8)"
TUNE = "tune-qparams(tokens=1536,calib_n=16,calib_len=64,batch_size=2,lr=0.0002,progress=false)"


@pytest.fixture(scope="module")
def slice2(smollm2):
    return held_out_slice(smollm2, 2, 2)


def test_tune_qparams_lowers_held_out_kl_and_keeps_the_codes(slice2):
    graph, ids, ref = slice2
    quantized = graph.clone()
    PassManager(QUANT).run(quantized)
    tuned = graph.clone()
    st = PassManager(f"{QUANT},{TUNE}").run(tuned).records[1].stats
    assert st["steps"] == 12 and st["params_per_role"]["norms"] > 0 and st["params_per_role"]["biases"] == 0
    scales = {v.name for v in trainable_params(tuned, "all", ["scales"])}
    assert len(scales) == 2 * 7  # 7 linears per block (the head stays float by default): every quantized weight
    for name, v in quantized.params.items():
        new = tuned.params[name].data
        if name.endswith((".qdata", ".zero_point")):
            assert torch.equal(new, v.data), name  # the codes are what the quantizer chose
        elif name in scales:
            # every scale moved, q/k/v and gate/up too: their gradient crosses o_proj's and down_proj's A8 rounding
            assert not torch.equal(new, v.data), name
    before, after = held_out_kl(quantized, ids, ref), held_out_kl(tuned, ids, ref)
    assert after < 0.85 * before, (before, after, st)  # measured 0.0498 -> 0.0369


def test_tune_qparams_contract_and_bad_input(slice2):
    graph, _, _ = slice2
    with pytest.raises(PipelineSpecError, match="tune-qparams .* must come after gptq"):
        PassManager(f"{TUNE},gptq(w=int4)")
    with pytest.raises(PipelineSpecError, match="fuse-qlinear .* must come after tune-qparams"):
        PassManager(f"{QUANT},fuse-qlinear,{TUNE}")
    with pytest.raises(PipelineError, match="some weight is quantized"):
        PassManager(TUNE).run(graph.clone())
    quantized = graph.clone()
    PassManager(QUANT).run(quantized)
    with pytest.raises(PipelineError, match="the teacher is quantized"):
        PassManager([TuneQParams(tokens=10, progress=False)]).run(quantized.clone())
    # resuming from a graph an earlier run quantized: the float model is handed over as the teacher
    resumed = quantized.clone()
    st = PassManager("tune-qparams(tokens=128,calib_n=4,calib_len=64,batch_size=2,progress=false)").run(
        resumed, reference=graph).records[0].stats
    assert st["steps"] == 1 and st["scale_change_mean"] > 0
    with pytest.raises(PassError, match="option train"):
        TuneQParams(train=["codes"])
