"""``lowbit debug bisect``: the first pass that breaks the metric, then the fewest layers inside it that do.

Stage 1 is LLVM's ``-opt-bisect-limit``: binary-search the first prefix of the pipeline (k passes) whose metric
exceeds the threshold (assumes the damage, once done, is not undone by a later pass). The whole pipeline runs once
and keeps the IR after each pass (``PrefixGraphs``, within a memory budget; a prefix past it runs again with
``PassManager(limit=k)``), then both sides of the verdict are checked on a run of their own (passes that are not
deterministic would make it name an innocent pass).
Stage 2 is ``polygraphy debug reduce`` over layers: re-run the culprit pass, on the IR it saw, restricted to
subsets of blocks (``lowbit.cli.restrict``); halve while one half alone is still bad, then drop single blocks
while the rest stays bad, which leaves a set where every block is needed.
"""

from __future__ import annotations

import json
import math
import re
import shlex
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import typer
from rich.table import Table

from lowbit import jsonio
from lowbit.cli.common import Exit, capture_model, check_calibration, console, err_console, fail, is_stdout, load, \
    parse, parse_percent_or_number, quiet_progress, write_text_output
from lowbit.cli.probes import EvalInputs, _available_bytes, end_metric, fmt_metric, make_inputs, metric_label, \
    metric_name, slice_note
from lowbit.cli.restrict import Unit, block_units, how_restricted, restrict, units_in_scope
from lowbit.cli.reuse import ReusedRuns, same_literal
from lowbit.ir.graph import BLOCK_NAMES, Graph, Value
from lowbit.passes.manager import Instrument, PassRecord, format_pipeline, quote_pipeline


@dataclass
class Probe:
    what: str
    metric: float
    bad: bool


@dataclass
class BisectResult:
    model: str
    pipeline: str
    metric: str
    baseline: float
    threshold: float
    full: float
    culprit_index: int | None = None
    culprit_pass: str | None = None
    culprit_layers: list[str] = field(default_factory=list)
    restricted_spec: str | None = None
    restricted_metric: float | None = None
    note: str = ""
    reproduce: str = ""
    probes: list[Probe] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Evaluator:
    """Metric of a graph on fixed inputs, with the float reference output for the encoders' cosine and the KL.

    Runs go through ``runs`` (``lowbit.cli.reuse``): a graph is computed from the latest block boundary it shares
    with the last graph evaluated with ``reference=True``, and each packed weight is dequantized once."""

    def __init__(self, metric: str, inputs: EvalInputs, reference: Any, runs: ReusedRuns) -> None:
        self.metric, self.inputs, self.reference, self.runs = metric, inputs, reference, runs

    def __call__(self, graph: Any, *, reference: bool = False) -> float:
        return end_metric(self.metric, self.inputs, self.runs.run(graph, reference=reference), self.reference)


class PrefixGraphs(Instrument):
    """The IR after each of the first ``keep`` passes of one run, so stage 1 evaluates a prefix without running its
    passes again (each probe used to re-run the pipeline from the float graph: a costly pass early in it, a learned
    rotation or a calibrated quantizer, ran once per probe).

    A clone shares its parameter tensors, so a kept prefix costs the tensors its passes made; once those pass
    ``budget`` bytes (tensors the start graph holds are free) no later prefix is kept, and that one runs again."""

    def __init__(self, start: Graph, keep: int, budget: int) -> None:
        self.keep, self.budget = keep, budget
        self.graphs: dict[int, Graph] = {}
        self._held = {key for key, _ in _param_storages(start)}
        self.held_bytes = 0
        self.full = False

    def after_pass(self, record: PassRecord, p: Any, graph: Graph) -> None:
        if self.full or record.index >= self.keep:
            return
        new = {key: size for key, size in _param_storages(graph) if key not in self._held}
        if self.held_bytes + sum(new.values()) > self.budget:
            self.full = True
            return
        self.held_bytes += sum(new.values())
        self._held.update(new)
        self.graphs[record.index + 1] = graph.clone()

    def drop_outside(self, lo: int, hi: int) -> None:
        """Forget the prefixes the search has ruled out (it only probes between ``lo`` and ``hi`` from now on)."""
        for k in [k for k in self.graphs if not lo < k < hi]:
            del self.graphs[k]


def _param_storages(graph: Graph) -> list[tuple[int, int]]:
    """(storage address, bytes) of each parameter tensor of ``graph`` (views of one storage count once)."""
    out = []
    for v in graph.params.values():
        if isinstance(v.data, torch.Tensor) and v.data.device.type != "meta":
            storage = v.data.untyped_storage()
            out.append((storage.data_ptr(), storage.nbytes()))
    return out


def exceeds(value: float, threshold: float) -> bool:
    """Whether a metric is past the threshold; NaN is (a pass that makes the output NaN read as "ok": exit 6)."""
    return not value <= threshold


def bisect(model_spec: str, text: str, *, metric: str = "auto", max_increase: str = "5%", windows: int = 4,
           seq_len: int = 128, n_sentences: int = 32, log: Callable[[str], None] = lambda s: None,
           dtype: str = "float32", progress: bool = True) -> BisectResult:
    t0 = time.perf_counter()
    amount, relative = parse_percent_or_number(max_increase)
    passes = parse(text)
    if not progress:  # -q: the passes' calibration bars (restricted copies keep the option) and transformers'
        quiet_progress(passes)
    loaded = load(model_spec, dtype)
    check_calibration(passes, loaded)
    metric = metric_name(loaded.kind, metric)
    if relative and metric in ("cos", "kl"):
        fail(f"--metric {metric} starts at 0 for the float model: give --max-increase as an absolute amount "
             f"(e.g. {'0.01' if metric == 'cos' else '0.05'}), not a percentage", Exit.USAGE)
    inputs = make_inputs(loaded, windows=windows, seq_len=seq_len, n_sentences=n_sentences)
    graph0 = capture_model(loaded)
    runs = ReusedRuns(inputs)
    reference = runs.run(graph0, reference=True)
    evaluate = Evaluator(metric, inputs, reference, runs)
    baseline = end_metric(metric, inputs, reference, reference)
    threshold = baseline * (1 + amount) if relative else baseline + amount
    probes: list[Probe] = []

    def record(what: str, value: float) -> bool:
        bad = exceeds(value, threshold)
        probes.append(Probe(what, value, bad))
        log(f"{what:<70} {metric_label(metric)} {fmt_metric(metric, value)} {'BAD' if bad else 'ok'}")
        return bad

    graph0_verified = False  # by the first run: later runs from it do not verify it again

    def run_prefix(k: int, instruments: list[Instrument] = ()) -> Any:
        nonlocal graph0_verified
        g = graph0.clone()
        from lowbit.cli.pipeline import run_pipeline

        run_pipeline(g, passes, limit=k, model_spec=model_spec, takes_reproducer=False, instruments=instruments,
                     input_verified=graph0_verified)
        graph0_verified = True
        return g

    note = slice_note(loaded, metric)
    if note:
        log(note)
    log(f"float baseline {metric_label(metric)} {fmt_metric(metric, baseline)}; "
        f"threshold {fmt_metric(metric, threshold)}")
    # the IR of each prefix, kept from this one run: in a quarter of the memory available now (the rest is the
    # passes' own), or where that cannot be read, one more copy of the float weights
    available = _available_bytes()
    budget = available // 4 if available is not None else sum(size for _, size in _param_storages(graph0))
    prefixes = PrefixGraphs(graph0, len(passes) - 1, budget)
    full = evaluate(run_prefix(len(passes), [prefixes]))
    result = BisectResult(model_spec, format_pipeline(passes), metric, baseline, threshold, full, probes=probes)
    if not record(f"all {len(passes)} passes", full):
        result.note = "the whole pipeline stays within the threshold: nothing to bisect"
        result.seconds = time.perf_counter() - t0
        return result

    # stage 1: first bad prefix
    lo, hi = 0, len(passes)  # prefix lo is good (float), prefix hi is bad
    bad_at = {hi: full}  # the metric of each bad prefix measured
    if prefixes.full:
        log(f"kept the IR after the first {max(prefixes.graphs, default=0)} passes (their new weights: "
            f"{prefixes.held_bytes / 2**20:.0f} MiB of a {budget / 2**20:.0f} MiB budget); longer prefixes run again")
    while hi - lo > 1:
        mid = (lo + hi) // 2
        kept = prefixes.graphs.get(mid)
        value = evaluate(kept if kept is not None else run_prefix(mid))
        if record(f"first {mid} passes", value):
            hi = mid
            bad_at[mid] = value
        else:
            lo = mid
        prefixes.drop_outside(lo, hi)
    del prefixes
    k = hi - 1
    later = _later_damage(metric, baseline, bad_at[hi], full, hi, len(passes), relative)
    culprit = passes[k]
    result.culprit_index, result.culprit_pass = k, culprit.spec()
    prefix = format_pipeline(passes[:k])

    # the verdict rests on the first k passes being fine and the first k+1 being bad, on one run or two; a pass that
    # is not deterministic (random numbers without a seed, state outside the graph) flipped between runs and an
    # innocent pass (dce) was named: both are checked again (the culprit on the very IR it then sees)
    from lowbit.cli.pipeline import run_pipeline

    before = run_prefix(k)
    changed = []
    # the IR the culprit sees is the reference of every run from here on (k == 0: the float graph already is)
    if k > 0 and record(f"first {k} passes again", evaluate(before, reference=True)):
        changed.append(f"the first {k} passes, within the threshold before, now give {metric_label(metric)} "
                       f"{fmt_metric(metric, probes[-1].metric)}")
    again = before.clone()
    run_pipeline(again, [culprit], model_spec=model_spec, takes_reproducer=False, ran_before=passes[:k],
                 input_verified=True)  # a clone of the IR run_prefix verified
    again_metric = evaluate(again) if not changed else math.nan
    if not changed and not record(f"#{k} {culprit.name} again, on that IR", again_metric):
        changed.append(f"the first {k + 1} passes, past the threshold before, now give {metric_label(metric)} "
                       f"{fmt_metric(metric, probes[-1].metric)}")
    if changed:
        fail(f"bisect needs passes that give the same result each run: {changed[0]} (threshold "
             f"{fmt_metric(metric, threshold)}); a pass of {quote_pipeline(format_pipeline(passes[:k + 1]))} is not "
             "deterministic (an unseeded random choice?), so no culprit can be named", Exit.PIPELINE)

    # stage 2: layers within the culprit
    blocks_ = block_units(before)
    units = units_in_scope(culprit, blocks_, before)  # a pass given modules= is bisected over the blocks it reaches
    how = how_restricted(culprit)
    if how is None:
        result.note = (f"pass {culprit.name} has no 'modules' or 'keep' option, so it cannot be applied to a subset "
                       "of layers: the culprit is the pass as a whole")
    elif not blocks_:
        result.note = f"the graph has no repeated blocks ({BLOCK_NAMES}) to bisect over"
    elif not units:
        result.note = (f"the modules= scope of {culprit.name} reaches no block ({BLOCK_NAMES}): "
                       "the culprit is the pass as a whole")
    else:
        seen: dict[tuple[str, ...], float] = {}
        if not changed_outside(again, before, units):
            # the culprit changed nothing outside these blocks: restricted to all of them it is the run just measured
            # (it ran a third time over every block, the costliest run of stage 2: a GPTQ over the whole model)
            seen[tuple(u.name for u in units)] = again_metric

        def bad_with(chosen: list[Unit]) -> bool:
            key = tuple(u.name for u in chosen)
            if key not in seen:
                g = before.clone()
                from lowbit.cli.pipeline import run_pipeline

                run_pipeline(g, [restrict(culprit, chosen, units)], model_spec=model_spec, takes_reproducer=False,
                             ran_before=passes[:k], input_verified=True)
                seen[key] = evaluate(g)
                label = ",".join(u.name.rsplit(".", 1)[-1] for u in chosen)
                return record(f"{culprit.name} on blocks [{label}]", seen[key])
            return exceeds(seen[key], threshold)

        if not bad_with(units):
            result.note = (f"{culprit.name} restricted to all blocks stays within the threshold: the damage comes from "
                           "nodes outside the blocks (embeddings, final norm, lm_head)")
        else:
            chosen = _reduce(units, bad_with)
            result.culprit_layers = [u.name for u in chosen]
            result.restricted_spec = restrict(culprit, chosen, units).spec()
            result.restricted_metric = seen[tuple(u.name for u in chosen)]
            if how == "keep":
                result.note = (f"{culprit.name} was restricted through its 'keep' option (other blocks kept float); "
                               "only the nodes 'keep' governs are restricted")
    if later:
        result.note = f"{result.note}; {later}" if result.note else later
    repro_pipeline = ",".join(x for x in (prefix, result.restricted_spec or culprit.spec()) if x)
    # compare measures perplexity unless told: a KL bisect's command showed a ppl, not the KL past the threshold
    result.reproduce = (f"lowbit debug compare {shlex.quote(model_spec)} --pipeline {shlex.quote(repro_pipeline)}"
                        + (" --metric kl" if metric == "kl" else "")
                        + (f" --windows {windows} --seq-len {seq_len}" if metric != "cos" else
                           f" --sentences {n_sentences}"))
    result.seconds = time.perf_counter() - t0
    return result


def changed_outside(graph: Graph, before: Graph, units: list[Unit]) -> bool:
    """Whether a pass that turned ``before`` into ``graph`` changed a node outside ``units`` (by module path): one
    added, removed, or with another op, literal or parameter tensor (clones share tensors: a pass that rewrites one
    sets a new one). Values are compared by name, not by what flows into them, so a node after a changed block
    still counts as unchanged."""
    from torch.utils import _pytree as pytree

    def inside(node: Any) -> bool:
        return bool(node.module) and any(re.search(u.regex, node.module) for u in units)

    ref = {n.name: n for n in before.nodes if not inside(n)}
    now = [n for n in graph.nodes if not inside(n)]
    if {n.name for n in now} != set(ref) or [v.name for v in graph.outputs] != [v.name for v in before.outputs]:
        return True
    for node in now:
        old = ref[node.name]
        leaves, spec = pytree.tree_flatten((node.args, node.kwargs))
        old_leaves, old_spec = pytree.tree_flatten((old.args, old.kwargs))
        if old.op != node.op or spec != old_spec or [v.name for v in old.outputs] != [v.name for v in node.outputs]:
            return True
        for a, b in zip(leaves, old_leaves):
            if isinstance(a, Value) or isinstance(b, Value):
                if not (isinstance(a, Value) and isinstance(b, Value)) or a.name != b.name or a.kind != b.kind or (
                        a.kind == "param" and a.data is not b.data):
                    return True
            elif not same_literal(a, b):
                return True
    return False


def _later_damage(metric: str, baseline: float, at_culprit: float, full: float, culprit_end: int, n_passes: int,
                  relative: bool) -> str:
    """What to say when the passes after the culprit do most of the damage (a fault injected late in a pipeline whose
    weight quantizer is already past a tight threshold): bisect names the first pass past the threshold, and said
    nothing of the later ones, which took the metric many times further. Empty when they add less than the culprit
    did (or the culprit is the last pass)."""
    import math

    worse = math.isnan(full) or full - baseline > 2 * (at_culprit - baseline)
    if culprit_end >= n_passes or not (math.isfinite(at_culprit) and worse):
        return ""
    label = metric_label(metric)
    above = (f"{math.ceil((at_culprit / baseline - 1) * 100) + 1}%" if relative and baseline > 0 else
             f"{(at_culprit - baseline) * 1.1:.3g}")
    return (f"the passes after it (#{culprit_end} on) do most of the damage: {label} "
            f"{fmt_metric(metric, at_culprit)} after the culprit, {fmt_metric(metric, full)} after the whole "
            f"pipeline; to find the pass among them, bisect again with --max-increase {above} (past what the culprit "
            "does) or see each pass in debug compare")


def _reduce(units: list[Unit], bad: Callable[[list[Unit]], bool]) -> list[Unit]:
    """A small subset of ``units`` that is still bad (``bad(units)`` is known to hold)."""
    current = list(units)
    while len(current) > 1:
        half = len(current) // 2
        first, second = current[:half], current[half:]
        if bad(first):
            current = first
        elif bad(second):
            current = second
        else:
            break
    # blocks that only hurt together: drop one at a time while the rest stays bad (1-minimal)
    i = 0
    while len(current) > 1 and i < len(current):
        trial = current[:i] + current[i + 1:]
        if bad(trial):
            current = trial
        else:
            i += 1
    return current


def run_bisect(model_spec: str, text: str, *, metric: str, max_increase: str, windows: int, seq_len: int,
               n_sentences: int, json_out: Path | None, dtype: str = "float32", progress: bool = True) -> None:
    show = err_console if is_stdout(json_out) else console  # --json -: the standard output holds the JSON alone
    res = bisect(model_spec, text, metric=metric, max_increase=max_increase, windows=windows, seq_len=seq_len,
                 n_sentences=n_sentences, log=lambda s: show.print(s, markup=False, soft_wrap=True), dtype=dtype,
                 progress=progress)
    table = Table(title=f"bisect {res.model} ({metric_label(res.metric)}, threshold "
                        f"{fmt_metric(res.metric, res.threshold)})",
                  show_header=False)
    table.add_row("float baseline", fmt_metric(res.metric, res.baseline))
    table.add_row("whole pipeline", fmt_metric(res.metric, res.full))
    if res.culprit_pass is not None:
        table.add_row("culprit pass", f"#{res.culprit_index} {res.culprit_pass}")
        if res.culprit_layers:
            table.add_row("culprit layers", ", ".join(res.culprit_layers))
            # 'is None', not falsiness: a restricted metric of exactly 0.0 (a KL) printed as '?'
            measured = "?" if res.restricted_metric is None else fmt_metric(res.metric, res.restricted_metric)
            table.add_row("pass on those layers only", f"{res.restricted_spec} → {measured}")
    table.add_row("evaluations", f"{len(res.probes)} in {res.seconds:.1f} s")
    if res.note:
        table.add_row("note", res.note)
    show.print(table)
    if res.reproduce and res.culprit_pass is not None:
        show.print("reproduce with:", markup=False, soft_wrap=True)
        show.print(f"  {res.reproduce}", markup=False, soft_wrap=True)  # a wrapped command does not paste
        config = re.search(r"config=([^,)]+)", res.restricted_spec or "")
        if config and Path(config.group(1)).is_file():  # the restricted QuantConfig, shown so it can be read
            compact = json.dumps(json.loads(Path(config.group(1)).read_text()), separators=(",", ":"))
            show.print(f"  where {config.group(1)} is: {compact}", markup=False, soft_wrap=True)
    if json_out is not None:
        write_text_output(json_out, jsonio.dumps(res.to_dict(), indent=2) + "\n")
    if res.culprit_pass is None:
        err_console.print(res.note, soft_wrap=True)
        raise typer.Exit(int(Exit.THRESHOLD))
