"""``lowbit debug compare``: what every pass costs, per layer, on real inputs.

The float graph and the graph after each pass run the same WikiText-2 windows (or sentences); each block's
output is compared with the float one (SQNR, cosine, max/mean abs error) and the end metric is taken from the
same forward pass. Where other toolkits give one final number, this shows which pass and which layer the
error comes from.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from lowbit import jsonio
from lowbit.cli.common import (Exit, capture_model, check_calibration, console, err_console,
                               fail, is_stdout, load, parse, quiet_progress, worst_layer, write_text_output)
from lowbit.cli.probes import EvalInputs, Probe, end_metric, fmt_metric, layer_stats, make_inputs, metric_name, \
    run_probe
from lowbit.instruments import compare_outputs
from lowbit.passes.manager import Instrument, PassRecord


@dataclass
class Stage:
    """The model after one pass (index -1: the float graph before any pass)."""

    index: int
    spec: str
    changed: bool
    seconds: float
    metric: float
    output: dict[str, float]
    layers: dict[str, dict[str, float]] = field(default_factory=dict)


@dataclass
class CompareResult:
    model: str
    pipeline: str
    inputs: str
    metric: str
    stages: list[Stage]
    seconds: float

    def to_dict(self, finite: bool = True) -> dict[str, Any]:
        """JSON-ready data: JSON has no infinity, so an identical layer's SQNR (inf dB) is null (and so is a NaN;
        its ``max_abs`` is null too, an identical layer's 0). ``finite=False`` keeps the floats as they are."""
        data = {"model": self.model, "pipeline": self.pipeline, "inputs": self.inputs, "metric": self.metric,
                "seconds": round(self.seconds, 3), "stages": [asdict(s) for s in self.stages]}
        return jsonio.finite(data) if finite else data


class LayerCompare(Instrument):
    """After every pass, run the graph on the inputs and record per-layer and end-metric differences.

    ``reproducer``: where to save a replay when a pass leaves a graph that verifies but does not run on the inputs
    (the IR before the pass, the rest of the pipeline and these inputs, which ``lowbit replay`` runs the graph on);
    the IR before each pass is then kept (a structural clone, tensors shared)."""

    def __init__(self, inputs: EvalInputs, reference: Probe, metric: str, progress: Any = None, *,
                 passes: list[Any] = (), reproducer: Path | None = None, model_spec: str = "") -> None:
        self.inputs, self.reference, self.metric = inputs, reference, metric
        self.stages: list[Stage] = []
        self.progress = progress
        self.passes, self.reproducer, self.model_spec = list(passes), reproducer, model_spec
        self._before: Any = None

    def before_pass(self, record: PassRecord, p: Any, graph: Any) -> None:
        if self.reproducer is not None:
            self._before = graph.clone()

    def after_pass(self, record: PassRecord, p: Any, graph: Any) -> None:
        if record.skipped:
            return
        try:
            probe = run_probe(graph, self.inputs)
        except Exception as exc:  # the pass verified but its graph does not run: name the pass, not a frame
            msg = (f"after pass {record.spec} (#{record.index}) the graph does not run on the inputs: "
                   f"{type(exc).__name__}: {exc}")
            if self.reproducer is not None and self._before is not None:
                from lowbit.cli.reproducer import write_reproducer

                write_reproducer(self.reproducer, self._before, self.passes, record.index, msg, self.model_spec,
                                 run_inputs=self.inputs.args)
                msg += f"\nreproducer written to {self.reproducer} (run `lowbit replay {self.reproducer}`)"
            else:  # the advice compare gives for a pass that fails
                msg += "\n(rerun with --reproducer DIR to save the IR before this pass and replay it)"
            fail(msg, Exit.BACKEND)
        # a rotated residual stream holds the float model's block outputs in another basis (exactly: x Q): turned
        # back with the Q rotate recorded; without it (a graph reloaded from text) they are not comparable, n/a
        if graph.meta.get("residual_rotated"):
            rotation = graph.meta.get("residual_rotation")
            layers = {} if rotation is None else layer_stats(self.reference, unrotated(probe, rotation))
        else:
            layers = layer_stats(self.reference, probe)
        self.stages.append(Stage(
            record.index, record.spec, record.changed, record.seconds,
            end_metric(self.metric, self.inputs, probe.output, self.reference.output),
            compare_outputs(self.reference.output, probe.output), layers))
        if self.progress is not None:
            self.progress()


def unrotated(probe: Probe, rotation: torch.Tensor) -> Probe:
    """``probe`` with each block output ``x Q`` of a rotated residual stream turned back to ``x`` (float64, so the
    comparison adds no rounding of its own); a block of another width (a sliced stream) is left out."""
    q = rotation.double()
    return Probe(probe.output, {name: t.double() @ q.T.to(t.device) for name, t in probe.layers.items()
                                if t.shape[-1] == q.shape[0]})


def compare(model_spec: str, text: str, *, windows: int = 4, seq_len: int = 128, n_sentences: int = 32,
            verify_each: bool = True, reproducer: Path | None = None, progress: bool = True,
            dtype: str = "float32", bar_console: Console | None = None, metric: str = "auto") -> CompareResult:
    """Capture the model, run the pipeline with a LayerCompare instrument, return every stage's numbers
    (``bar_console``: where the progress bar draws, the standard output's console by default; ``metric``: the end
    metric, as bisect's ``--metric``, so its reproduce command measures what bisect measured)."""
    from rich.progress import Progress

    from lowbit.cli.pipeline import run_pipeline

    t0 = time.perf_counter()
    passes = parse(text)
    if not progress:  # -q: the passes' calibration bars and transformers' loading bar too
        quiet_progress(passes)
    loaded = load(model_spec, dtype)
    check_calibration(passes, loaded)
    metric = metric_name(loaded.kind, metric)
    inputs = make_inputs(loaded, windows=windows, seq_len=seq_len, n_sentences=n_sentences)
    graph = capture_model(loaded)
    with Progress(console=bar_console or console, transient=True, disable=not progress) as bar:
        task = bar.add_task("float reference", total=len(passes) + 1)
        ref = run_probe(graph, inputs)
        bar.advance(task)
        stages = [Stage(-1, "float", False, 0.0, end_metric(metric, inputs, ref.output, ref.output),
                        compare_outputs(ref.output, ref.output), layer_stats(ref, ref))]
        ins = LayerCompare(inputs, ref, metric, progress=lambda: bar.advance(task), passes=passes,
                           reproducer=reproducer, model_spec=model_spec)
        run_pipeline(graph, passes, instruments=[ins], verify_each=verify_each, reproducer=reproducer,
                     model_spec=model_spec)
    stages += ins.stages
    return CompareResult(model_spec, ",".join(p.spec() for p in passes), inputs.description, metric, stages,
                         time.perf_counter() - t0)


def _db(x: float) -> str:
    """SQNR in dB: ``inf`` for an exact match, ``nan`` for a NaN output (shown as ``n/a`` it read as "not
    comparable", the caption's removed or rotated block, for a pass that poisoned the numbers)."""
    if math.isnan(x):
        return "nan"
    return "inf" if math.isinf(x) else f"{x:.1f}"


METRIC_COLUMNS = {"ppl": "perplexity", "kl": "KL from float", "cos": "1 - emb. cosine"}
"""What the summary table calls each end metric (a KL run was headed "1 - emb. cosine")."""


def summary_table(res: CompareResult) -> Table:
    name = METRIC_COLUMNS[res.metric]
    table = Table(title=f"{res.model}: per-pass error on {res.inputs}")
    # the layer is ranked by its block output's SQNR whatever the end metric (--metric kl has no per-layer form): the
    # header says so ("worst layer" beside a KL column read as the layer with the worst KL)
    for col in ("#", "pass", name, "out SQNR dB", "out cosine", "lowest-SQNR layer", "its SQNR dB", "pass ms"):
        # a long pass spec folds onto more lines: cut with an ellipsis (a recipe's gptq at 160 columns lost its
        # calib_len), two passes that differ in their last options read the same
        table.add_column(col, justify="left" if col in ("pass", "lowest-SQNR layer") else "right",
                         overflow="fold" if col == "pass" else "ellipsis")
    for s in res.stages:
        worst = worst_layer(s.layers)
        table.add_row("" if s.index < 0 else str(s.index),
                      s.spec + ("" if s.changed or s.index < 0 else " (no change)"),
                      fmt_metric(res.metric, s.metric), _db(s.output["sqnr_db"]), f"{s.output['cosine']:.6f}",
                      worst[0] if worst else "-", _db(worst[1]["sqnr_db"]) if worst else "-",
                      f"{s.seconds * 1e3:.0f}")
    return table


def layer_table(res: CompareResult) -> Table:
    """Layers × passes, SQNR in dB: where along depth each pass's error appears."""
    last = [s for s in res.stages if s.index >= 0]
    layers = list(res.stages[0].layers)
    cells = [["n/a" if layer not in s.layers else _db(s.layers[layer]["sqnr_db"]) for s in last]
             for layer in layers]
    caption = None
    if any("n/a" in row for row in cells):  # said only where a cell is n/a
        caption = ("n/a: not comparable with the float model's block output: a pass removed the block or changed "
                   "its shape (a sliced residual stream), or the residual stream is rotated by a rotation this run "
                   "does not know (a graph reloaded from text)")
    table = Table(title="per-layer SQNR (dB) of the block output after each pass", caption=caption)
    table.add_column("layer")
    for s in last:
        table.add_column(f"#{s.index} {s.spec}", justify="right", overflow="fold")
    for layer, row in zip(layers, cells):
        table.add_row(layer, *row)
    return table


def run_compare(model_spec: str, text: str, *, windows: int, seq_len: int, n_sentences: int,
                json_out: Path | None, html_out: Path | None, verify_each: bool, reproducer: Path | None,
                dtype: str = "float32", progress: bool = True, metric: str = "auto") -> None:
    # --json - / --html -: the standard output holds the JSON (or the page) alone
    show = err_console if is_stdout(json_out) or is_stdout(html_out) else console
    res = compare(model_spec, text, windows=windows, seq_len=seq_len, n_sentences=n_sentences,
                  verify_each=verify_each, reproducer=reproducer, dtype=dtype, bar_console=show, progress=progress,
                  metric=metric)
    show.print(summary_table(res))
    show.print(layer_table(res))
    show.print(f"compare took {res.seconds:.1f} s", markup=False, soft_wrap=True)
    if json_out is not None:
        write_text_output(json_out, jsonio.dumps(res.to_dict(), indent=2) + "\n")
        if not is_stdout(json_out):
            show.print(f"wrote {json_out}", markup=False, soft_wrap=True)
    if html_out is not None:
        from lowbit.cli.report_html import render_report

        # the numbers as measured: in the JSON form NaN and inf are both null, and the report drew a NaN as ∞
        write_text_output(html_out, render_report(res.to_dict(finite=False)))
        if not is_stdout(html_out):
            show.print(f"wrote {html_out}", markup=False, soft_wrap=True)
