"""clip-activations: per-site A4 clip ratios searched by readers' output error (an approximating pass)."""

from __future__ import annotations

import pytest
import torch

from lowbit.backends.torch_backend import TorchCompiled
from lowbit.calibration.act_clip import fake_quant, search_clip
from lowbit.passes.clip_activations import find_clip_sites
from lowbit.passes.manager import PassManager

CHEAP = "calib_n=4,calib_len=128,tokens=256,progress=false"


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out - ref).norm() / ref.norm()).item()


def test_clip_activations_golden_on_a_tiny_graph():
    """Starting from QuaRot's fixed 0.9: the up input's best ratio is 1 (the kwarg is dropped, as quantize writes an
    unclipped chain), down_proj's input gets 0.975; nothing else in the graph changes."""
    from test_rotation import TINY, _random_weights

    from lowbit.ir.parser import parse_graph
    from lowbit.ir.printer import print_graph
    from lowbit.passes.clip_activations import ClipActivations
    from lowbit.passes.insert_qdq import InsertQDQ

    g = parse_graph(TINY, _random_weights(TINY))
    PassManager([InsertQDQ(a="int4", a_clip=0.9)]).run(g)
    before = print_graph(g)
    ids = torch.randint(0, 10, (6, 3), generator=torch.Generator().manual_seed(0))
    clip = ClipActivations(calib=ids, calib_n=6, calib_len=3, progress=False, batch_size=1)
    rec = PassManager([clip]).run(g).records[0]
    up = "block_size=4, clip_ratio=0.9)  # up"
    down = "block_size=8, clip_ratio=0.9)  # down"
    assert up in before and down in before
    assert print_graph(g) == before.replace(up, "block_size=4)  # up").replace(
        down, "block_size=8, clip_ratio=0.975)  # down")
    assert rec.stats["ratios"]["down"] == {"ratio": 0.975, "was": 0.9, "error_vs_unclipped": 0.9506}
    assert rec.stats["ratios"]["up"]["ratio"] == 1.0 and rec.stats["sites"] == 2


def test_clip_activations_refuses_nonfinite_calibration_inputs():
    """With a NaN in the calibration inputs every ratio's error was NaN, min() kept the grid's first ratio (0.5, the
    harshest clip) and the pass reported success; it now refuses, naming the quantizer."""
    from lowbit.ir.parser import parse_graph
    from lowbit.passes.base import PassError
    from lowbit.passes.clip_activations import ClipActivations
    from lowbit.passes.insert_qdq import InsertQDQ

    text = """graph main(%x: f32[s1,s0,8]) {
  symbol s0 in [2, 64] hint 4
  symbol s1 in [1, 64] hint 2
  param @fc.weight: f32[4,8]
  %y: f32[s1,s0,4] = linear(%x, @fc.weight)  # fc
  return %y
}
"""
    g = parse_graph(text, {"fc.weight": torch.randn(4, 8)})
    InsertQDQ(a="int4").run(g)
    x = torch.randn(4, 6, 8)
    x[1, 2, 3] = float("nan")
    with pytest.raises(PassError, match="pass clip-activations: the calibration inputs of the quantizer of 'fc' are "
                                        "not "
                                        "finite"):
        ClipActivations(calib=x, progress=False).run(g)


@pytest.fixture(scope="module")
def slice2(smollm2):
    from conftest import held_out_slice

    return held_out_slice(smollm2, 2, 1)


def test_fake_quant_is_the_graphs_chain_and_search_never_loses_to_no_clip(slice2):
    graph, ids, _ = slice2
    g = graph.clone()
    PassManager("fold-norms,rotate,quantize(a=int4,a_clip=0.9)").run(g)
    sites = find_clip_sites(g)
    assert len(sites) == 2 * 4  # per block: q/k/v (one chain), o_proj, gate/up (one chain), down_proj
    site = sites[0]
    x = torch.randn(64, site.qparams.args[0].tensor_type.shape[-1]) * torch.linspace(0.1, 4, 64)[:, None]
    from lowbit.ir.ops import resolve

    scale, zp = resolve("dynamic_qparams")(x, **site.qparams.kwargs)
    ref = resolve("dequantize")(resolve("quantize")(x, scale, None, **site.quantize.kwargs), scale, None,
                                **site.dequantize.kwargs)
    assert torch.equal(fake_quant(site, x, 0.9), ref)  # the chain's own ops and kwargs
    w = [r.args[1].data for r in site.readers]
    ratio, err, err1 = search_clip(site, x, w, [0.6, 0.8, 1.0], 0.05)
    assert 0.55 <= ratio <= 1 and err <= err1


def test_clip_activations_on_smollm2_lowers_the_held_out_error(slice2):
    """On a real 2-block slice with W4 RTN + A4 per token: held-out logits error with the searched ratios is at
    most that of unclipped A4, and within 2% of QuaRot's fixed 0.9 or better (the bound this pass states)."""
    graph, ids, ref = slice2
    base = graph.clone()
    PassManager("fold-norms,rotate,quantize(w=int4,sym=false)").run(base)
    errs = {}
    for name, tail in (("none", "quantize(a=int4)"), ("0.9", "quantize(a=int4,a_clip=0.9)"),
                       ("searched", f"quantize(a=int4),clip-activations({CHEAP})")):
        g = base.clone()
        report = PassManager(tail).run(g)
        errs[name] = _rel_err(TorchCompiled(g)(ids), ref)
        if name == "searched":
            st = report.records[-1].stats
            assert st["sites"] == 8 and 0.5 <= st["ratio_min"] <= st["ratio_max"] <= 1
            assert all(v["error_vs_unclipped"] <= 1 for v in st["ratios"].values())
            assert {n.kwargs.get("clip_ratio", 1.0) for n in g.find("dynamic_qparams")} == \
                {v["ratio"] for v in st["ratios"].values()}
    assert errs["searched"] <= errs["none"], errs
    assert errs["searched"] <= 1.02 * errs["0.9"], errs


def test_clip_activations_scope_matching_no_quantizer_names_the_scope():
    """A ``modules`` scope that left out every activation quantizer said 'run quantize(a=...) first', though the graph
    had them; it now names the scope and where the quantizers are."""
    from lowbit.ir.parser import parse_graph
    from lowbit.passes.base import PassError
    from lowbit.passes.clip_activations import ClipActivations
    from lowbit.passes.insert_qdq import InsertQDQ

    text = """graph main(%x: f32[s1,s0,8]) {
  symbol s0 in [2, 64] hint 4
  symbol s1 in [1, 64] hint 2
  param @fc.weight: f32[4,8]
  param @out.weight: f32[4,4]
  %y: f32[s1,s0,4] = linear(%x, @fc.weight)  # fc
  %z: f32[s1,s0,4] = linear(%y, @out.weight)  # out
  return %z
}
"""
    g = parse_graph(text, {"fc.weight": torch.randn(4, 8), "out.weight": torch.randn(4, 4)})
    InsertQDQ(a="int4", keep=["out"]).run(g)
    with pytest.raises(PassError, match=r"option modules=\^out\$ matches none of the 1 dynamic activation quantizers "
                                        r"feeding linears \(at fc"):
        ClipActivations(modules="^out$", calib=torch.randn(4, 6, 8), progress=False).run(g)
