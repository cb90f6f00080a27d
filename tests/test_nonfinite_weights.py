"""A NaN/inf weight is refused naming the parameter and the row (or, asked for, that linear stays float);
GPTQ's numerical failures name the linear. On a real 1-layer SmolLM2 slice."""

from __future__ import annotations

import pytest
import torch

from lowbit.passes.base import PassError
from lowbit.passes.manager import parse_pipeline

from conftest import smollm2_slice

Q_PROJ = "model.layers.0.self_attn.q_proj.weight"


@pytest.fixture(scope="module")
def slice_graph(smollm2):
    from lowbit.ir.capture import capture

    wrapper = smollm2_slice(smollm2[0], 1)
    graph = capture(wrapper, (torch.ones(2, 16, dtype=torch.long),))
    graph.meta["tokenizer"] = smollm2[1]
    return graph


def _poisoned(graph, name: str, row: int, col: int, value: float):
    g = graph.clone()
    w = g.params[name].data.clone()
    w[row, col] = value
    g.set_param(name, w)
    return g


@pytest.mark.parametrize("value, kind", [(float("nan"), "nan"), (float("inf"), "inf")])
def test_quantize_refuses_a_nonfinite_weight_naming_parameter_and_row(slice_graph, value, kind):
    g = _poisoned(slice_graph, Q_PROJ, 7, 11, value)
    with pytest.raises(PassError) as info:
        parse_pipeline("quantize(w=int4,group=64)")[0].run(g)
    msg = str(info.value)
    assert f"@{Q_PROJ}" in msg and "row 7, column 11" in msg and kind in msg and "nonfinite=keep-float" in msg
    assert not any(n.op == "dequantize" for n in g.nodes)  # refused before any change


def test_keep_float_option_leaves_only_that_linear_float(slice_graph):
    g = _poisoned(slice_graph, Q_PROJ, 0, 0, float("nan"))
    (p,) = parse_pipeline("quantize(w=int4,group=64,nonfinite=keep-float)")
    assert p.options.nonfinite == "keep-float"
    stats = p.run(g).stats
    assert stats["kept_float_nonfinite"] == ["model.layers.0.self_attn.q_proj"]
    q = next(n for n in g.nodes if n.op == "linear" and n.module == "model.layers.0.self_attn.q_proj")
    assert q.args[1].is_param and q.args[1].name == Q_PROJ  # float weight, no dequantize in front
    assert stats["weights_quantized"] == sum(1 for n in slice_graph.nodes if n.op == "linear") - 2  # lm_head too
    with pytest.raises(PassError, match="nonfinite"):
        parse_pipeline("quantize(w=int4,nonfinite=skip)")


def test_gptq_refuses_a_nonfinite_weight_and_names_the_linear_on_bad_hessians(slice_graph):
    g = _poisoned(slice_graph, Q_PROJ, 3, 0, float("nan"))
    spec = "gptq(w=int4,group=64,calib_n=2,calib_len=32,progress=false)"
    with pytest.raises(PassError, match=rf"pass gptq: weight @{Q_PROJ}.*row 3"):
        parse_pipeline(spec)[0].run(g)
    # a NaN in a float (kept) weight upstream reaches GPTQ as NaN activations: the error names the linears
    g = slice_graph.clone()
    norm = g.params["model.layers.0.input_layernorm.weight"].data.clone()
    norm[5] = float("nan")
    g.set_param("model.layers.0.input_layernorm.weight", norm)
    with pytest.raises(PassError, match=r"pass gptq: linear\(s\) model\.layers\.0\.self_attn\.(q|k|v)_proj"):
        parse_pipeline(spec)[0].run(g)


@pytest.mark.parametrize("spec, param", [
    ("prune-mlp(ratio=0.25,score=magnitude)", "model.layers.0.mlp.up_proj.weight"),
    ("prune-heads(ratio=0.34,score=magnitude)", Q_PROJ),
    ("sparsify(method=magnitude,sparsity=0.5)", Q_PROJ),
    ("prune-blocks(blocks=[model.layers.0])", Q_PROJ),
    ("fold-norms,slice-residual(ratio=0.2,progress=false)", Q_PROJ)])
def test_pruning_refuses_a_nonfinite_weight_naming_parameter_and_row(slice_graph, spec, param):
    """The pruning passes ran over a NaN weight: magnitude scores of NaN made which units go arbitrary, and a
    removed NaN row vanished without a word. Refused like the quantizers do, naming the parameter and the row,
    with the graph unchanged."""
    from lowbit.passes.manager import PassManager, PipelineError

    g = _poisoned(slice_graph, param, 3, 5, float("nan"))
    if spec.startswith("fold-norms,"):  # slice-residual needs the norms folded first; that part is not checked
        spec = spec.removeprefix("fold-norms,")
        PassManager("fold-norms").run(g)
    shapes = {k: tuple(v.data.shape) for k, v in g.params.items() if v.data is not None}
    with pytest.raises(PipelineError, match=rf"parameter {param} of linear %\w+ \(.*\) holds 1 non-finite "
                                            r"value\(s\) \(nan\), the first at row 3, column 5"):
        PassManager(spec).run(g)
    assert {k: tuple(v.data.shape) for k, v in g.params.items() if v.data is not None} == shapes


@pytest.mark.parametrize("spec", ["awq(w=int4,group=64,calib_n=2,calib_len=16,progress=false)",
                                  "autoround(w=int4,group=64,iters=2,calib_n=2,calib_len=16,progress=false)"])
def test_awq_and_autoround_refuse_nonfinite_calibration_inputs(slice_graph, spec):
    """GPTQ's Cholesky failed on NaN activations, but AWQ's searches kept the unscaled grid (every candidate's error
    NaN: 'mean_error_gain: nan') and block tuning's NaN loss never beat its start, so both returned plain RTN
    without a word; every weight pass now refuses them naming the linears."""
    g = slice_graph.clone()
    norm = g.params["model.layers.0.input_layernorm.weight"].data.clone()
    norm[5] = float("nan")
    g.set_param("model.layers.0.input_layernorm.weight", norm)
    name = spec.split("(")[0]
    with pytest.raises(PassError, match=rf"pass {name}: linear\(s\) model\.layers\.0\.self_attn\.(q|k|v)_proj.*"
                                        r"calibration inputs are not finite"):
        parse_pipeline(spec)[0].run(g)


def test_smooth_quant_refuses_nonfinite_calibration_inputs(slice_graph):
    """A NaN activation made that channel's scale 1 (a never-firing channel's rule), so a NaN calibration set left the
    model unsmoothed and the pass reported success; it now names the site."""
    g = slice_graph.clone()
    norm = g.params["model.layers.0.input_layernorm.weight"].data.clone()
    norm[5] = float("nan")
    g.set_param("model.layers.0.input_layernorm.weight", norm)
    with pytest.raises(PassError, match=r"pass smooth-quant: site .*model\.layers\.0\.input_layernorm.*: the "
                                        r"calibration inputs are not finite"):
        parse_pipeline("smooth-quant(calib_n=2,calib_len=16,progress=false)")[0].run(g)


def test_finite_weights_are_checked_with_one_sum_not_a_mask(slice_graph, monkeypatch):
    """quantize checks every weight for NaN/inf on every run, and the boolean mask (torch.isfinite) took 10-25x a sum's
    time on SmolLM2's weights: a sizeable part of each debug bisect and sensitivity evaluation. A finite weight is now
    cleared by its sum alone; the mask is built only where the sum is not finite."""
    from lowbit.passes import base

    masks = []
    real = torch.isfinite
    monkeypatch.setattr(base.torch, "isfinite", lambda t: masks.append(t.shape) or real(t))
    g = slice_graph.clone()
    parse_pipeline("quantize(w=int4,group=64)")[0].run(g)
    assert masks == [] and any(n.op == "dequantize" for n in g.nodes)
    huge = torch.full((4, 4), 3e38)  # finite, but its float32 sum overflows: the mask decides
    assert base.nonfinite_problem(huge) is None and masks == [(4, 4)]
    both = torch.zeros(4, 4)
    both[1, 2], both[3, 0] = float("inf"), float("-inf")  # the sum is NaN, not inf: still found
    assert base.nonfinite_problem(both) == "2 non-finite value(s) (inf), the first at row 1, column 2"
