"""Pass contract v2: requires/ensures checked by the PassManager, ``after`` checked when a pipeline is parsed,
``creates`` checked against the backend before anything runs, option ranges as pydantic constraints, the common
``modules`` scope, and ``Pass.exact`` read: every registered pass that declares itself exact is run in float64 on
a real 2-layer SmolLM2 slice and must leave its logits unchanged."""

from __future__ import annotations

import pytest
import torch

from conftest import float64_norm_stats
from lowbit.api import compile_model, plan_compile
from lowbit.backends import registry
from lowbit.backends.registry import BackendError, register_backend
from lowbit.backends.torch_backend import TorchCompiled
from lowbit.cli.restrict import Unit, how_restricted, restrict
from lowbit.ir.parser import parse_graph
from lowbit.passes.base import NO_DEAD_NODES, PassError, PassResult, all_passes, function_pass, get_pass
from lowbit.passes.manager import PassManager, PipelineError, parse_pipeline

TWO = """graph main(%x: f32[1,s0,16]) {
  symbol s0 in [2, 64] hint 4
  param @fc1.weight: f32[16,16]
  param @fc2.weight: f32[8,16]
  %h: f32[1,s0,16] = linear(%x, @fc1.weight)  # fc1
  %y: f32[1,s0,8] = linear(%h, @fc2.weight)  # fc2
  return %y
}
"""


def _two():
    gen = torch.Generator().manual_seed(0)
    return parse_graph(TWO, {"fc1.weight": torch.randn(16, 16, generator=gen),
                             "fc2.weight": torch.randn(8, 16, generator=gen)})


# ---- requires / ensures / after / creates ------------------------------------------------------------

def test_requires_names_the_pass_and_the_node():
    g = _two()
    PassManager("quantize(w=int8),fuse-qlinear").run(g)
    with pytest.raises(PipelineError, match=r"pass quantize\(w=int8\) \(#0\) requires no qlinear node \(it rewrites "
                                            r"linear nodes.*run fuse-qlinear after it\).*before it runs: %qlinear "
                                            r"\(qlinear\) in module 'fc1'; %qlinear_1 \(qlinear\) in module 'fc2'"):
        PassManager("quantize(w=int8)").run(g)


@function_pass("test-leave-dead", "Test only: adds a node nothing reads, but claims it leaves none.",
               ensures=(NO_DEAD_NODES,))
def _leave_dead(graph):
    node = graph.make_node("aten.neg.default", [graph.inputs[0]], type=graph.inputs[0].type, name="orphan")
    graph.append(node)
    return PassResult(True)


def test_ensures_is_checked_after_the_pass():
    with pytest.raises(PipelineError, match=r"pass test-leave-dead \(#0\) ensures no node whose results nothing "
                                            r"reads, which does not hold after it ran: %orphan \(aten.neg.default\)"):
        PassManager("test-leave-dead").run(_two())
    g = _two()
    g.append(g.make_node("aten.neg.default", [g.inputs[0]], type=g.inputs[0].type, name="orphan"))
    PassManager("dce").run(g)  # dce ensures it, and does
    assert "orphan" not in str(g)


def test_order_constraints_fail_when_the_pipeline_is_parsed():
    with pytest.raises(PassError, match=r"pass fuse-qlinear \(#0\) must come after gptq, which the pipeline runs "
                                        r"later \(#1\): move gptq before fuse-qlinear"):
        parse_pipeline("fuse-qlinear,gptq(w=int4)")
    # a repeat after the pass was read as if the earlier one were missing ("move fold-norms before rotate")
    with pytest.raises(PassError, match=r"pass rotate \(#1\) must come after every fold-norms: it runs at #0 and "
                                        r"again at #2, after rotate; drop the later one"):
        parse_pipeline("fold-norms,rotate,fold-norms")
    with pytest.raises(PipelineError, match="must come after quantize"):  # the same error, whichever is caught
        PassManager("dce,fuse-qlinear,quantize(w=int8)")
    assert [p.name for p in parse_pipeline("fold-norms,quantize(w=int8),fuse-qlinear")] == \
        ["fold-norms", "quantize", "fuse-qlinear"]


def test_a_backend_gap_is_reported_before_capture_and_calibration(monkeypatch):
    monkeypatch.setattr(registry, "BACKENDS", dict(registry.BACKENDS))
    register_backend("no-dynamic", "lowbit.backends.torch_backend:lower", ops=lambda op: op != "dynamic_qparams",
                     summary="test only: a backend without dynamic activation scales")
    # the model name is never loaded: the gap is found from the pipeline's declarations alone
    with pytest.raises(BackendError, match=r"backend 'no-dynamic' cannot lower what the pipeline creates: pass "
                                           r"quantize\(w=int8,a=int8\) creates 'dynamic_qparams' "
                                           r"\(backends lowering them: torch, onnxruntime, tensorrt, triton\)"):
        compile_model("no-such-model", pipeline="smooth-quant,quantize(w=int8,a=int8)", backend="no-dynamic")
    # the backend's own passes are checked too: onnxruntime's fuse-qlinear creates qlinear, which it lowers
    plan = plan_compile(parse_pipeline("quantize(w=int8,a=int8)"), "onnxruntime")
    assert [p.name for p in plan.backend_passes] == ["fuse-qlinear"]


@pytest.mark.parametrize("spec, rule", [
    ("gptq(damp=0)", "option damp=0 must be > 0"),
    ("gptq(group=64,static_groups=false)", "act_order=true with group needs static_groups=true"),
    ("awq(n_grid=0)", "option n_grid=0 must be >= 1"),
    ("awq(max_shrink=1)", "option max_shrink=1 must be < 1"),
    ("autoround(lr=0)", "option lr=0 must be > 0"),
    ("smooth-quant(alpha=1.5)", "option alpha=1.5 must be <= 1"),
    # an empty list failed only after capture and calibration data, as 'no place to fold scales ()'
    ("smooth-quant(sites=[])", "option sites: sites=[] names no place to fold scales; give one or more of norm, "
                               "gated, attention-v"),
    ("quantize(w=int8,modules=\"layers[\")", "option modules: not a valid regex"),
])
def test_option_ranges_fail_at_parse_time(spec, rule):
    with pytest.raises(PassError, match=rule.replace("(", r"\(").replace("[", r"\[")):
        parse_pipeline(spec)


# ---- the common modules scope ---------------------------------------------------------------------

@pytest.mark.parametrize("pipeline", ["quantize(w=int8,a=int8,modules=\"^fc2$\")",
                                      "quantize(w=int8,a=int8),fuse-qlinear(modules=\"^fc2$\")"])
def test_modules_scope_limits_what_a_pass_changes(pipeline):
    g = _two()
    PassManager(pipeline).run(g)
    changed = {n.module for n in g.nodes if n.op in ("dequantize", "qlinear")}
    if "fuse" in pipeline:
        assert [(n.op, n.module) for n in g.nodes if n.op in ("linear", "qlinear")] == [("linear", "fc1"),
                                                                                       ("qlinear", "fc2")]
    else:
        assert changed == {"fc2"} and "fc1.weight" in g.params


@pytest.mark.parametrize("pipeline", ["quantize(w=int8,modules=\"^fc3$\")", "fold-norms(modules=layers)"])
def test_modules_scope_matching_nothing_is_an_error(pipeline):
    """A scope that matches no module (a typo, or a model without such layers) fails before the pass runs and
    names the pattern and the modules the graph has, instead of a pipeline that silently changes nothing."""
    g = _two()
    with pytest.raises(PipelineError, match=r"matches no module of the graph .*'fc\d'") as exc:
        PassManager(pipeline).run(g)
    assert exc.value.record.name == pipeline.split("(")[0] and not any(n.op == "dequantize" for n in g.nodes)


def test_bisect_and_sensitivity_restrict_passes_through_modules():
    (q,) = parse_pipeline("quantize(w=int4,group=8)")
    assert how_restricted(q) == "modules"
    r = restrict(q, [Unit("fc2", r"^fc2$", "fc2")], [Unit("fc1", r"^fc1$", "fc1"), Unit("fc2", r"^fc2$", "fc2")])
    assert r.spec() == "quantize(w=int4,group=8,modules=^(fc2$))"
    g = _two()
    PassManager([r]).run(g)
    assert {n.module for n in g.nodes if n.op == "dequantize"} == {"fc2"}


def test_restricting_a_scope_with_alternatives_keeps_every_alternative():
    """A pass scoped to 'c1|c2' restricted to fc2 (debug bisect / sensitivity) became '(?=.*c1|c2)^(fc2$)': the
    second alternative sat outside the lookahead, anchored at the path's start, so fc2 fell out of the scope."""
    (q,) = parse_pipeline("quantize(w=int4,group=8,modules=c1|c2)")
    units = [Unit("fc1", r"^fc1$", "fc1"), Unit("fc2", r"^fc2$", "fc2")]
    r = restrict(q, [units[1]], units)
    assert r.options.in_scope("fc2") and not r.options.in_scope("fc1")
    g = _two()
    PassManager([r]).run(g)
    assert {n.module for n in g.nodes if n.op == "dequantize"} == {"fc2"}


# ---- Pass.exact, read: float64 on a real model ---------------------------------------------------

PREPARE = {"fuse-qlinear": "quantize(w=int8,a=int8)", "rotate": "fold-norms"}
"""Passes that need something to act on: the pipeline run first (its output is the reference)."""
OPTIONS = {"smooth-quant": "(calib_n=2,calib_len=32,progress=false)"}
CHANGES = {"fold-norms", "smooth-quant", "fuse-qlinear", "rotate"}
"""Exact passes that must change the slice (so the check is not vacuous)."""


VARIANTS = [pytest.param("rotate(kind=kurtosis,calib_n=2,calib_len=32,samples=32,steps=3,batch_tokens=128,"
                         "progress=false)", marks=pytest.mark.slow),
            # float64 forward and backward of the slice per step (~6 s); its fold is kurtosis's (_fold_residual)
            "rotate(kind=learned,calib_n=1,calib_len=16,steps=2,progress=false)"]
"""Exact passes whose kinds take different code paths: a learned rotation folds through the same code as the
Hadamard but computes its matrix from calibration data (here at the smallest size that still learns). The
kind=kurtosis variant runs only with LOWBIT_SLOW=1: test_rotation's
test_kurtosis_rotation_exact_and_orthogonal_in_float64_on_smollm2 holds the same float64 slice after
fold-norms,rotate(kind=kurtosis,learn_heads=true) to this file's bound."""


def _exact_passes() -> list[str]:
    return sorted(name for name, cls in all_passes().items() if cls.exact and not name.startswith("test-"))


def test_every_exact_pass_is_checked():
    assert {"dce", "constant-fold", "fold-norms", "smooth-quant", "fuse-qlinear", "rotate"} <= set(_exact_passes())


@pytest.mark.parametrize("spec", _exact_passes() + VARIANTS)
def test_exact_pass_leaves_float64_logits_unchanged(smollm2_slice_f64, smollm2, spec):
    name = spec.split("(")[0]
    _, graph = smollm2_slice_f64
    g = float64_norm_stats(graph.clone()) if name == "rotate" else graph.clone()
    if name in PREPARE:
        PassManager(PREPARE[name]).run(g)
    ids = smollm2[1]("Exact passes change how a model is written, never what it computes.",
                     return_tensors="pt").input_ids
    ref = TorchCompiled(g)(ids)
    assert ref.dtype == torch.float64
    report = PassManager(spec if spec != name else name + OPTIONS.get(name, "")).run(g)
    out = TorchCompiled(g)(ids)
    rel = float((out - ref).norm() / ref.norm())
    assert rel <= 1e-12, (spec, rel)
    if name in CHANGES:
        assert report.records[0].changed, spec


# ---- PassResult.changed -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_llama_graph():
    from conftest import tiny_llama

    torch.manual_seed(0)
    return compile_model(tiny_llama(hidden=64, inter=128, heads=4, kv_heads=2, vocab=97), pipeline="dce").graph


def _ir_state(graph) -> tuple[str, dict[str, torch.Tensor]]:
    from lowbit.ir.printer import print_graph

    return print_graph(graph), {k: v.data for k, v in graph.params.items()}


def _same(a, b) -> bool:
    return a[0] == b[0] and a[1].keys() == b[1].keys() and all(torch.equal(a[1][k], b[1][k]) for k in a[1])


@pytest.mark.parametrize("pipeline", ["dce", "constant-fold", "fold-norms", "last-logits", "merge-linears",
                                      "quantize(w=int8,a=int8),fuse-qlinear",
                                      "quantize(w=int8,a=int8),fuse-qlinear,fuse-norm-quant",
                                      "sparsify(method=magnitude,sparsity=0.5)",
                                      "sparsify(method=magnitude,pattern=2:4)"])
def test_changed_says_whether_the_ir_changed_and_a_second_run_changes_nothing(tiny_llama_graph, pipeline):
    """``PassResult.changed`` is what ``--print-ir-after-change`` and the reports trust: it is True exactly when
    the pass changed the IR's text or a parameter's values, and the pipeline's last pass run again on its own output
    changes nothing and says so. sparsify said changed=True when it zeroed only zeros (a second run, same pattern)."""
    g = tiny_llama_graph.clone()
    *first, last = parse_pipeline(pipeline)
    if first:
        PassManager(first).run(g)
    before = _ir_state(g)
    changed = last(g).changed
    after = _ir_state(g)
    assert changed == (not _same(before, after))
    (again,) = parse_pipeline(last.spec())
    assert not again(g).changed
    assert _same(after, _ir_state(g))


def test_a_pass_called_on_its_own_checks_requires_and_ensures(tiny_llama_graph):
    """``KVCache(bits=4)(graph)`` on a graph without a KV cache was a bare ``KeyError: 'generation'``: calling a
    pass checks its ``requires`` and ``ensures`` around ``run``, as the PassManager does, naming the pass, the
    condition and the nodes."""
    with pytest.raises(PassError, match=r"pass kv-cache requires a step graph with a float KV cache, which does "
                                        r"not hold before it runs"):
        get_pass("kv-cache")()(tiny_llama_graph.clone())
    g = tiny_llama_graph.clone()
    PassManager("quantize(w=int8),fuse-qlinear").run(g)
    with pytest.raises(PassError, match=r"pass quantize\(w=int8\) requires no qlinear node .*before it runs: "
                                        r"%qlinear \(qlinear\) in module 'model.layers.0.self_attn.q_proj'"):
        get_pass("quantize")(w="int8")(g)
    (leave_dead,) = parse_pipeline("test-leave-dead")
    with pytest.raises(PassError, match=r"pass test-leave-dead ensures no node whose results nothing reads, which "
                                        r"does not hold after it ran: %orphan"):
        leave_dead(_two())
    assert not get_pass("dce")()(tiny_llama_graph.clone()).changed


@pytest.mark.parametrize("alpha", [0.0, 0.5])
def test_smooth_quant_says_changed_only_when_it_moved_a_scale(tiny_llama_graph, alpha):
    """smooth-quant(alpha=0) smooths nothing (every scale is 1, as documented) yet said changed=True; a scale of ones
    is no longer applied, so the IR is left as it was and the result says so."""
    g = tiny_llama_graph.clone()
    before = _ir_state(g)
    result = get_pass("smooth-quant")(alpha=alpha, calib=torch.randint(0, 97, (2, 16)), progress=False)(g)
    assert result.changed == (not _same(before, _ir_state(g))) == (alpha > 0)
    assert result.stats["sites_scaled"] == (0 if alpha == 0 else sum(result.stats["sites"].values()))
