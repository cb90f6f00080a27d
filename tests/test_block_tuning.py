"""Block tuning (the ``autoround`` pass): exact start, straight-through activations, better held-out logits.

All on a real 1-block SmolLM2 slice with WikiText-2 text: calibration from the validation split, errors on
windows of the test split the tuning never saw.
"""

from __future__ import annotations

import pytest
import torch

from conftest import CALIB_TEXT
from lowbit.backends.torch_backend import TorchCompiled
from lowbit.calibration.block_tuning import TunedWeight, _replacements
from lowbit.calibration.engine import BlockRun, _DeviceParams, _execute, _exports, split_stages
from lowbit.ir.ops import resolve
from lowbit.passes.manager import PassManager, PipelineError


@pytest.fixture(scope="module")
def block1(smollm2):
    """A real 1-block SmolLM2 (float32, dynamic batch and sequence), four held-out windows and their logits."""
    from conftest import held_out_slice

    return held_out_slice(smollm2, 1, 4)


def _block_ctx(graph, ids):
    """The block stage of ``graph`` with its inputs computed from ``ids`` (prefix run by hand)."""
    stages = split_stages(graph)
    prefix, block = stages[0], stages[1]
    env = dict(zip(graph.inputs, (ids,)))
    _execute(prefix.nodes, env, None, set(block.reads()))
    return BlockRun(graph, block, [{v: env[v] for v in block.reads()}], _exports(graph, stages, block),
                    params=_DeviceParams(None))


@pytest.mark.parametrize("pipeline", ["quantize(w=int4,group=64,sym=false)", "quantize(w=int4,sym=true)",
                                      "quantize(w=uint4,group=32,sym=false)", "quantize(w=fp8e4m3,group=64)"])
def test_tuning_starts_exactly_at_the_rounding(block1, pipeline):
    """At v = 0, λ = 0 every parametrised weight is the dequantize op's output bit for bit, whether its base is
    the float weight RTN rounded or the dequantized weight itself, and ``final`` writes back the same codes and
    scale: tuning starts exactly where the rounding left the block."""
    graph, ids, _ = block1
    g = graph.clone()
    PassManager(pipeline).run(g)
    ctx = _block_ctx(g, ids[:1, :32])
    dqs = [n for n in ctx.nodes() if n.op == "dequantize" and n.args[0].is_param]
    assert len(dqs) == 7
    for dq in dqs:
        args = [a.data if a is not None else None for a in dq.args]
        want = resolve("dequantize")(*args, **dq.kwargs)
        for base in (None, graph.params[f"{dq.module}.weight"].data):
            t = TunedWeight(dq, ctx, base)
            assert t.start_mismatch == 0 and t.changed() == 0, dq.module
            assert torch.equal(t.weight().detach(), want), dq.module
            codes, scale = t.final()
            assert codes.view(torch.uint8).equal(dq.args[0].data.view(torch.uint8))
            assert torch.equal(scale, dq.args[1].data)


def test_activation_quantizers_run_straight_through(block1):
    """In a W8A8 + KV4 block the replaced activation QDQ pairs give the exact forward values and pass gradients."""
    graph, ids, _ = block1
    g = graph.clone()
    PassManager("quantize(w=int8,a=int8,kv=int4)").run(g)
    ctx = _block_ctx(g, ids[:1, :64])
    dqs = [n for n in ctx.nodes() if n.op == "dequantize" and n.args[0].is_param]
    tuned = [TunedWeight(n, ctx) for n in dqs]
    replace = _replacements(ctx.nodes(), tuned)
    n_act = sum(1 for n in ctx.nodes() if n.op == "quantize")
    assert n_act >= 4 and len(replace) == len(dqs) + sum(
        1 + sum(1 for u in ctx.nodes() if n.output in u.inputs()) for n in ctx.nodes() if n.op == "quantize")
    plain = ctx.run()[0]
    with torch.enable_grad():
        tuned_out = ctx.run(replace=replace)[0]
        (out,) = tuned_out.values()
        out.float().pow(2).mean().backward()
    for v in plain:
        assert torch.equal(plain[v], tuned_out[v].detach())
    # gradient reaches the first linears through the activation quantizers
    assert all(t.v.grad is not None and float(t.v.grad.abs().sum()) > 0 for t in tuned)


@pytest.mark.slow
def test_autoround_beats_rtn_on_held_out_text(block1):
    """AutoRound (RTN start) gives logits much closer to float than RTN on held-out WikiText-2 test
    windows, and the tuned block's calibration loss went down (the stats say the block was kept). Measured:
    RTN 0.322, GPTQ 0.19–0.20, AutoRound 100 steps 0.167 (mean squared logit error); AutoRound 60 steps on 16 x 256
    tokens of the shipped calibration text 0.183 (tuning loss 0.0318 -> 0.0105, 14% of the codes changed); 40
    steps on 8 x 128 (each step is a forward and backward over all 1024 tokens): 0.186 against RTN's 0.322 (tuning
    loss 0.0315 -> 0.0085, 17% of the codes changed). 60 steps gave 0.180, 30 steps 0.216 (too near the 0.7
    bound), 20 steps 0.267; 40 steps on 4 x 128 0.228 (0.71x, over the bound) and barely cheaper. Those on AMD
    EPYCs; on an Intel Xeon (session 59; its fp32 sums in another order, and sign-descent's rounding flips follow
    them) 40 steps reached only 0.251 (0.78x) and 60 steps 0.195 (0.61x): the test runs 60.

    Slow-only (28 s of the default suite's CPU time, a quality proof): the benchmarks carry the claim on the whole
    model (README's accuracy table: ``w4a16-autoround`` against GPTQ and RTN), and the default suite keeps the
    mechanics: test_tuning_starts_exactly_at_the_rounding (the start is RTN's codes bit for bit),
    test_activation_quantizers_run_straight_through (gradients reach the weights) and
    test_autoround_seed_orders_the_batches_and_is_refused_where_one_batch_leaves_nothing_to_order (a tuned block is
    kept: its calibration loss went down, ``tuned_blocks_kept``)."""
    graph, ids, ref = block1
    cal = f"calib={CALIB_TEXT},calib_n=8,calib_len=128,progress=false"
    errors, stats = {}, {}
    for name, pipe in (("rtn", "quantize(w=int4,group=64,sym=false)"),
                       ("autoround", f"autoround(w=int4,group=64,iters=60,{cal})")):
        g = graph.clone()
        report = PassManager(pipe).run(g)
        stats[name] = report.records[-1].stats
        with torch.inference_mode():
            errors[name] = float((TorchCompiled(g)(ids) - ref).pow(2).mean())
    s = stats["autoround"]
    assert s["tuned_blocks"] == 1 and s["tuned_blocks_kept"] == 1, s
    assert s["tune_loss_after"] < 0.6 * s["tune_loss_before"] and 0 < s["tune_codes_changed"] < 0.3, s
    assert errors["autoround"] < 0.7 * errors["rtn"], errors


def test_autoround_bad_options(block1):
    graph, _, _ = block1
    for bad in ("iters=0", "lr=0", "max_scale=0.5"):
        with pytest.raises(PipelineError, match=f"option {bad.split('=')[0]}=.* must be"):
            PassManager(f"autoround(w=int4,group=64,calib_n=2,calib_len=16,{bad})").run(graph.clone())


def test_autoround_seed_orders_the_batches_and_is_refused_where_one_batch_leaves_nothing_to_order():
    """``seed`` orders the calibration batches the steps visit: with several batches two seeds tune differently and
    one seed repeats bit for bit. With calib_n <= batch_size there is one batch, visited every step whatever the
    seed, so seed=3 gave exactly seed=0's model without a word; it is refused, naming calib_n and batch_size."""
    from conftest import tiny_llama

    from lowbit.ir.capture import capture
    from lowbit.models import CausalLMLogits
    from lowbit.passes.autoround import AutoRound

    torch.manual_seed(0)
    graph = capture(CausalLMLogits(tiny_llama(layers=1)), (torch.ones(2, 16, dtype=torch.long),),
                    {"input_ids": {0: torch.export.Dim.DYNAMIC(min=1, max=8)}})
    calib = torch.randint(0, 61, (4, 16), generator=torch.Generator().manual_seed(0))
    # two steps over four one-sequence batches: enough for two seeds to visit different batches (each step costs a
    # backward through the block, ~0.15 s of CPU here; eight made this test one of the slowest)
    options = dict(w="int4", group=16, iters=2, lr=0.01, calib=calib, calib_n=4, calib_len=16, progress=False)

    def codes(**more: int) -> dict[str, torch.Tensor]:
        g = graph.clone()
        stats = PassManager([AutoRound(**options, **more)]).run(g).records[-1].stats
        assert stats["tuned_blocks_kept"] == 1, stats  # tuned, not the RTN start kept
        return {k: v.data for k, v in g.params.items() if k.endswith((".qdata", ".scale"))}

    one, again, other = codes(batch_size=1, seed=1), codes(batch_size=1, seed=1), codes(batch_size=1, seed=2)
    assert all(torch.equal(one[k], again[k]) for k in one)
    assert any(not torch.equal(one[k], other[k]) for k in one)
    with pytest.raises(PipelineError, match=r"pass autoround: option seed=3 orders the calibration batches .* "
                                            r"calib_n=4 sequences make one batch of batch_size=8, .* silently ignored"):
        codes(seed=3)


def test_learning_passes_run_under_the_callers_inference_mode():
    """compile_model under torch.inference_mode() failed in autoround ("Inference tensors cannot be saved for
    backward", at the first rotary) and in learned rotations ("element 0 of tensors does not require grad"): passes
    now run outside inference mode, to the same result as a run outside it."""
    from conftest import tiny_llama

    from lowbit.api import _default_example
    from lowbit.ir.capture import capture
    from lowbit.models import CausalLMLogits
    from lowbit.passes.manager import parse_pipeline

    model = CausalLMLogits(tiny_llama(vocab=49152)).eval()
    graph = capture(model, *_default_example(model, None))
    calib = torch.randint(0, 1000, (2, 16))
    for pipeline in ("autoround(w=int4,group=32,iters=2)", "fold-norms,rotate(kind=learned,steps=2)"):
        runs = []
        for mode in (False, True):
            passes = parse_pipeline(pipeline)
            passes[-1].options.calib = calib
            g = graph.clone()
            with torch.inference_mode(mode):
                PassManager(passes).run(g)
            runs.append(g.params)
        assert runs[0].keys() == runs[1].keys()
        assert all(torch.equal(runs[0][k].data, runs[1][k].data) for k in runs[0]), pipeline
