"""What capture spends beyond torch.export's tracing itself: nothing the IR does not keep."""

from __future__ import annotations

import pytest
import torch
import torch.fx.config
from conftest import tiny_llama

from lowbit.ir.capture import capture
from lowbit.ir.printer import print_graph
from lowbit.models import CausalLMLogits


@pytest.mark.skipif(not hasattr(torch.fx.config, "do_not_emit_stack_traces"), reason="torch < 2.12 has no switch")
def test_capture_extracts_no_stack_traces_and_the_graph_is_the_same(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.export extracted and symbolized a Python stack trace for every op it traced (~8% of an export) into FX
    metadata the IR never reads (a node's module is its nn_module_stack): capture turns that off with torch's own
    switch, ``torch.fx.config.do_not_emit_stack_traces``, for its export only. The IR is the same text as from an
    export that recorded them, and the caller's setting is left as it was."""
    from torch.utils._traceback import CapturedTraceback

    torch.manual_seed(0)
    wrapper = CausalLMLogits(tiny_llama(layers=2)).eval()
    example = (torch.ones(2, 8, dtype=torch.long),)
    dynamic = {"input_ids": {0: torch.export.Dim.DYNAMIC(min=1, max=64), 1: torch.export.Dim.DYNAMIC(min=2, max=32)}}
    extracted = []
    real_summary = CapturedTraceback.summary
    monkeypatch.setattr(CapturedTraceback, "summary", lambda self: extracted.append(1) or real_summary(self))
    graph = capture(wrapper, example, dynamic)
    # torch's structured log describes the input it fakes with one; no traced op takes any (274 here before)
    assert len(extracted) <= len(example) and torch.fx.config.do_not_emit_stack_traces is False, len(extracted)
    exported = {}
    for skip in (False, True):
        monkeypatch.setattr(torch.fx.config, "do_not_emit_stack_traces", skip)
        exported[skip] = torch.export.export(wrapper, example, dynamic_shapes=dynamic)
    traced = {skip: sum(bool(n.meta.get("stack_trace")) for n in ep.graph.nodes) for skip, ep in exported.items()}
    assert traced[False] > traced[True], traced
    texts = {skip: print_graph(capture(ep, example)) for skip, ep in exported.items()}
    assert texts[False] == texts[True]
    assert [n.op for n in graph.nodes] == [n.op for n in capture(exported[False], example).nodes]

