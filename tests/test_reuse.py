"""``lowbit.cli.reuse``: the runs of ``debug bisect`` and ``debug sensitivity`` start from the last block boundary a
graph shares with the reference and dequantize each packed weight once, and give the very numbers a whole run does
(``run_probe``), on a real SmolLM2 slice and on MiniLM."""

from __future__ import annotations

import json

import torch
from typer.testing import CliRunner

from lowbit.cli.common import capture_model, load, parse
from lowbit.cli.main import app
from lowbit.cli.pipeline import run_pipeline
from lowbit.cli.probes import make_inputs, run_probe
from lowbit.cli.restrict import block_units, restrict
from lowbit.cli.reuse import ReusedRuns


def _restricted(graph, spec: str, chosen: list[int]):
    """``graph`` after pass ``spec`` restricted to the blocks at ``chosen`` (a clone; ``graph`` is left as it was)."""
    (p,) = parse(spec)
    units = block_units(graph)
    g = graph.clone()
    run_pipeline(g, [restrict(p, [units[i] for i in chosen], units)])
    return g


def _whole(graph, inputs) -> torch.Tensor:
    return run_probe(graph, inputs, with_layers=False).output


def _slice_as_reference():
    """SmolLM2's 2-block slice, one window of 32 tokens, and ``ReusedRuns`` of those inputs that ran the slice as its
    reference."""
    loaded = load("smollm2:2")
    inputs = make_inputs(loaded, windows=1, seq_len=32)
    graph = capture_model(loaded)
    runs = ReusedRuns(inputs)
    runs.run(graph, reference=True)
    return graph, inputs, runs


def test_reused_runs_give_a_whole_run_s_numbers_on_smollm2():
    """A restricted quantize on block 1 runs block 1 and the head only, from block 0's saved output; on block 0 it
    runs both blocks; each packed weight quantized again is unpacked once. Every output equals a whole run's."""
    loaded = load("smollm2:2")
    inputs = make_inputs(loaded, windows=2, seq_len=32)
    graph = capture_model(loaded)
    run_pipeline(graph, parse("fold-norms,dce"))
    runs = ReusedRuns(inputs)
    assert torch.equal(runs.run(graph, reference=True), _whole(graph, inputs))
    spec = "quantize(w=int4,group=64,a=int8)"
    last = _restricted(graph, spec, [1])
    assert torch.equal(runs.run(last), _whole(last, inputs))
    assert runs.nodes_run < len(last.nodes) // 2, (runs.nodes_run, len(last.nodes))  # block 0 was not run again
    first = _restricted(graph, spec, [0])
    assert torch.equal(runs.run(first), _whole(first, inputs))
    assert runs.weights.hits == 0 and runs.weights.misses == 14  # 7 linears a block
    both = _restricted(graph, spec, [0, 1])
    assert torch.equal(runs.run(both), _whole(both, inputs))
    assert runs.weights.hits == 14 and runs.weights.misses == 14  # the same bytes again: nothing unpacked
    assert torch.equal(runs.run(graph), _whole(graph, inputs))  # the reference itself: the head only
    assert runs.nodes_run < 20, runs.nodes_run
    assert torch.equal(runs.run(both, reference=True), _whole(both, inputs))
    assert runs.weights.hits == 28  # a new reference keeps the weights unpacked before it


def test_reused_runs_see_a_rewritten_weight_and_a_pruned_block():
    """A parameter a pass replaces (fold-norms on block 1) and a block whose shapes change (prune-mlp) are not the
    reference's: they run again, and the outputs equal a whole run's."""
    graph, inputs, runs = _slice_as_reference()
    # magnitude scores need no calibration (the default wanda ran 32 x 512 tokens through the slice first); the
    # pruned block's shapes change all the same
    for spec in ("fold-norms", "prune-mlp(ratio=0.5,score=magnitude)"):
        g = _restricted(graph, spec, [1])
        out = runs.run(g)
        assert torch.equal(out, _whole(g, inputs)), spec
        assert not torch.equal(out, _whole(graph, inputs)), spec  # the pass did change the output


def test_reused_runs_of_an_encoder_keep_its_attention_mask():
    """MiniLM takes input_ids and an attention mask, a whole batch at once: a run from block 5's boundary gives the
    embeddings a whole run gives."""
    loaded = load("minilm")
    inputs = make_inputs(loaded, n_sentences=8)
    graph = capture_model(loaded)
    runs = ReusedRuns(inputs)
    runs.run(graph, reference=True)
    g = _restricted(graph, "quantize(w=int4,group=32,a=int8)", [5])
    assert torch.equal(runs.run(g), _whole(g, inputs))
    assert runs.nodes_run < len(g.nodes) // 3, (runs.nodes_run, len(g.nodes))


def test_debug_sensitivity_ranks_with_the_numbers_of_whole_runs(tmp_path, monkeypatch):
    """sensitivity's every number (the float model's, each block's, all quantized) is the one whole runs give."""
    def measure(out):
        res = CliRunner().invoke(app, ["debug", "sensitivity", "smollm2:2", "--scheme", "w4a8", "--group", "64",
                                       "-p", "fold-norms", "--metric", "kl", "--windows", "2", "--seq-len", "32",
                                       "-o", str(out), "-q"])
        assert res.exit_code == 0, res.output
        data = json.loads(out.read_text())
        return data["baseline"], data["all_quantized"], {r["module"]: r["metric"] for r in data["ranking"]}

    reused = measure(tmp_path / "reused.json")
    monkeypatch.setattr(ReusedRuns, "run", lambda self, graph, reference=False: _whole(graph, self.inputs))
    assert measure(tmp_path / "whole.json") == reused
    assert reused[2]["model.layers.0"] > 0 and reused[2]["model.layers.1"] > 0


def test_dequantized_weights_stay_within_their_budget():
    """Past its budget the oldest dequantized weight is dropped (the newest is always kept): a model larger than
    memory does not keep a float copy of every weight, and the output is still a whole run's."""
    graph, inputs, runs = _slice_as_reference()
    runs.weights.budget = 1
    g = _restricted(graph, "quantize(w=int4,group=64)", [1])
    assert torch.equal(runs.run(g), _whole(g, inputs))
    assert len(runs.weights.saved) == 1 and runs.weights.misses == 7
