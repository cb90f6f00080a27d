"""``lowbit debug sensitivity``: quantize one layer at a time and rank layers by the damage they do alone.

Each unit (a block, or one linear) gets the ``quantize`` pass restricted to it (``lowbit.cli.restrict``) on top of
the float graph (after an optional prefix such as ``fold-norms``), and the end metric is measured on real inputs.
The most damaging units are the ones worth keeping at higher precision: the result is an override file that
``lowbit compile --overrides`` reads (it adds those units to the ``keep`` list of ``quantize``, ``gptq`` or
``sparsify``). A structured cut (``prune-mlp``, ``prune-heads``, ...) has no ``keep``: its file is the ranking
alone (``keep_float`` empty, no ``--overrides`` command printed).
"""

from __future__ import annotations

import re
import shlex
import time
from pathlib import Path
from typing import Any

from rich.progress import Progress
from rich.table import Table

from lowbit import jsonio
from lowbit.cli.common import (Exit, atomic_write_text, capture_model, check_calibration, console, err_console, fail,
                               load, parse, quiet_progress, worst_first)
from lowbit.cli.probes import end_metric, fmt_metric, make_inputs, metric_label, metric_name, slice_note
from lowbit.cli.restrict import block_units, how_restricted, linear_units, restrict, units_in_scope
from lowbit.cli.reuse import ReusedRuns
from lowbit.ir.graph import BLOCK_NAMES

OVERRIDES_FORMAT = "lowbit-overrides/1"
_SCHEME = re.compile(r"^w(?P<w>\d+)(?:a(?P<a>\d+))?$", re.I)


def scheme_to_pipeline(scheme: str, group: int | None) -> str:
    """``w4a4`` → ``quantize(w=int4,a=int4)``; ``a16`` (or no ``a``) keeps activations float; options pass through.
    A pass written as pipeline text (``sparsify(method=wanda,pattern=2:4)``, ``prune-mlp(ratio=0.3)``) is taken as
    is: pruning passes are restricted to one layer at a time through their ``modules`` option."""
    s = scheme.strip()
    name = s.split("(", 1)[0]
    from lowbit.passes.base import all_passes

    if group is not None and (name in all_passes() or "=" in s):  # it was silently dropped for these
        fail(f"--group {group} applies to wNaM schemes (w4, w4a8, ...); --scheme {scheme!r} gives its options "
             "itself: put group=N there", Exit.USAGE)
    if name in all_passes() and (name != "quantize" or "(" in s):
        return s
    if "=" in s:
        return f"quantize({s})"
    m = _SCHEME.match(s)
    if not m:
        fail(f"--scheme {scheme!r}: give wNaM (w4a4, w8a8, w4a16, w4) or quantize options like "
             "'w=int4,group=64,a=int8'", Exit.USAGE)
    opts = [f"w=int{m.group('w')}"]
    if group:
        opts.append(f"group={group}")
    if m.group("a") and int(m.group("a")) < 16:
        opts.append(f"a=int{m.group('a')}")
    return f"quantize({','.join(opts)})"


def sensitivity(model_spec: str, scheme: str, *, group: int | None = None, prefix: str | None = None,
                granularity: str = "block", metric: str = "auto", windows: int = 4, seq_len: int = 128,
                n_sentences: int = 32, progress: bool = True, dtype: str = "float32") -> dict[str, Any]:
    t0 = time.perf_counter()
    qtext = scheme_to_pipeline(scheme, group)
    parsed = parse(qtext)
    if len(parsed) != 1:  # 'quantize(w=int4),dce' unpacked into one pass: a ValueError traceback (exit 1)
        fail(f"--scheme {scheme!r} is {len(parsed)} passes: give the one pass to apply a layer at a time, and the "
             "passes to run before it with --pipeline", Exit.USAGE)
    (qpass,) = parsed
    pre = parse(prefix) if prefix else []
    if not progress:  # -q: the passes' calibration bars (restricted copies keep the option) and transformers'
        quiet_progress([*pre, qpass])
    if how_restricted(qpass) is None:
        fail(f"pass {qpass.name} has no 'modules' or 'keep' option: it cannot be applied one layer at a time",
             Exit.USAGE)
    if granularity not in ("block", "linear"):
        fail(f"--granularity {granularity!r}: give block or linear", Exit.USAGE)
    if granularity == "linear" and qpass.scope_unit != "linear":
        # restricted to a q_proj it matched none of its sites: exit 4 with a reproducer hint, after the float runs
        fail(f"pass {qpass.name} rewrites each {qpass.scope_unit} as a whole, so it cannot be applied to one linear "
             "at a time: use --granularity block", Exit.USAGE)
    kv = getattr(qpass.options, "kv", None) if qpass.name == "quantize" else None
    if granularity == "linear" and kv is not None:
        # restricted to one linear, the KV cache (an attention's, not a linear's) stayed float in every run: each
        # linear ranked at +0 damage (kv only), or the cache's share was missing from each (with w/a)
        fail(f"--scheme {qpass.spec()} quantizes the KV cache (kv={kv}), which belongs to each block's attention, not "
             "to a linear: rank it per block (--granularity block), or the weights and activations alone per linear "
             "(leave kv out of --scheme)", Exit.USAGE)
    loaded = load(model_spec, dtype)
    check_calibration([*pre, qpass], loaded)
    metric = metric_name(loaded.kind, metric)
    note = slice_note(loaded, metric, ranking=True)
    if note:
        err_console.print(note, markup=False, soft_wrap=True)
    inputs = make_inputs(loaded, windows=windows, seq_len=seq_len, n_sentences=n_sentences)
    graph = capture_model(loaded)
    # each unit's run is computed from the last block boundary it shares with the graph after --pipeline, and each
    # packed weight is dequantized once (lowbit.cli.reuse)
    runs = ReusedRuns(inputs)
    reference = runs.run(graph, reference=True)
    from lowbit.cli.pipeline import run_pipeline

    if pre:
        run_pipeline(graph, pre, model_spec=model_spec, takes_reproducer=False)

    def score(g: Any, *, as_reference: bool = False) -> float:
        return end_metric(metric, inputs, runs.run(g, reference=as_reference), reference)

    # without --pipeline the graph is the float one whose run is the reference already: it ran twice (a whole
    # float pass over the inputs, the costliest run of a small ranking)
    baseline = score(graph, as_reference=True) if pre else end_metric(metric, inputs, reference, reference)
    units = block_units(graph) if granularity == "block" else linear_units(graph)
    if not units:
        fail(f"the graph has no blocks ({BLOCK_NAMES}) to quantize one at a time", Exit.USAGE)
    units = units_in_scope(qpass, units, graph)  # a pass given modules= ranks the units it reaches
    if not units:
        fail(f"pass {qpass.spec()}: its modules= scope reaches no {granularity} of the graph", Exit.USAGE)
    rows = []
    with Progress(console=console, transient=True, disable=not progress) as bar:
        task = bar.add_task(f"{qtext} one {granularity} at a time", total=len(units) + 1)
        verified = bool(pre)  # the graph --pipeline left, or else by the first unit's run: its clones are not
        # verified again before each run (~0.8 s a run on the whole SmolLM2), only after their pass
        for u in units:
            g = graph.clone()
            run_pipeline(g, [restrict(qpass, [u], units)], model_spec=model_spec, takes_reproducer=False,
                         ran_before=pre, input_verified=verified)
            verified = True
            value = score(g)
            rows.append({"module": u.name, "glob": u.glob, "metric": value, "damage": value - baseline})
            bar.advance(task)
        g = graph.clone()
        run_pipeline(g, [qpass], model_spec=model_spec, takes_reproducer=False, ran_before=pre, input_verified=True)
        everything = score(g)
        bar.advance(task)
    rows = ranked(rows)
    return {"format": OVERRIDES_FORMAT, "model": model_spec, "scheme": scheme, "quantize": qpass.spec(),
            "prefix": ",".join(p.spec() for p in pre), "granularity": granularity, "metric": metric,
            "inputs": inputs.description, "baseline": baseline, "all_quantized": everything, "ranking": rows,
            "seconds": round(time.perf_counter() - t0, 2)}


def ranked(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Units by damage, worst first: a unit whose output turns NaN does the most damage (sorted as NaN it stayed
    wherever it was), then an infinite one (``worst_first``)."""
    return sorted(rows, key=lambda r: worst_first(r["damage"], higher_is_worse=True))


def run_sensitivity(model_spec: str, scheme: str, *, group: int | None, prefix: str | None, granularity: str,
                    metric: str, keep_top: int, windows: int, seq_len: int, n_sentences: int, out: Path,
                    dtype: str = "float32", progress: bool = True) -> None:
    res = sensitivity(model_spec, scheme, group=group, prefix=prefix, granularity=granularity, metric=metric,
                      windows=windows, seq_len=seq_len, n_sentences=n_sentences, dtype=dtype, progress=progress)
    m = res["metric"]
    (qpass,) = parse(res["quantize"])
    # compile --overrides adds the damaged layers to a keep list (quantize/gptq/sparsify); a structured cut has none
    keepable = "keep" in qpass.Options.model_fields or "config" in qpass.Options.model_fields
    keep = [r["glob"] for r in res["ranking"][:max(0, keep_top)]] if keepable else []
    res["keep_float"] = keep
    pruning = qpass.name == "sparsify" or qpass.name.startswith("prune-") or qpass.name == "slice-residual"
    every = "all pruned" if pruning else "all quantized"
    label = metric_label(m)
    table = Table(title=f"{res['quantize']} one {granularity} at a time on {res['model']} "
                  f"(float {label} {fmt_metric(m, res['baseline'])}, {every} {fmt_metric(m, res['all_quantized'])})")
    cols = ("rank", granularity, label, "damage", "override") if keepable else ("rank", granularity, label, "damage")
    for col in cols:
        table.add_column(col, justify="left" if col in (granularity, "override") else "right")
    kept_as = "keep dense" if pruning else "keep float"
    for i, r in enumerate(res["ranking"], 1):
        # relative to a perplexity only: the encoders' 1 - cosine is 0 for float, up to rounding (-4e-18), and a
        # damage over it printed as "+0.0292 (-6575409664623125.0%)"
        rel = f" ({r['damage'] / res['baseline']:+.1%})" if m == "ppl" and res["baseline"] else ""
        row = [str(i), r["module"], fmt_metric(m, r["metric"]), f"{r['damage']:+.4g}{rel}"]
        table.add_row(*row, *([kept_as if r["glob"] in keep else ""] if keepable else []))
    console.print(table)
    atomic_write_text(out, jsonio.dumps(res, indent=2) + "\n")
    if not keepable:
        console.print(f"wrote {out} ({res['seconds']:.1f} s): the ranking only; pass {qpass.name} has no keep option, "
                      "so compile --overrides cannot keep the damaged layers out of it: restrict it to the others with "
                      f"its modules= option (a regex on module paths)", markup=False, soft_wrap=True)
        return
    pipe = ",".join(x for x in (res["prefix"], res["quantize"]) if x)
    if keep and len(keep) == len(res["ranking"]):  # the compile it prints would leave every unit float
        err_console.print(f"warning: --keep-top {keep_top} keeps all {len(keep)} {granularity}s "
                          f"{'dense' if pruning else 'float'}: compiled with {out}, {res['quantize']} changes none of "
                          f"them; give --keep-top {len(keep) - 1} or less", markup=False, soft_wrap=True)
    # shell-quoted as bisect's reproduce command: '{pipe}' broke on a quoted option, {out} on a space
    console.print(f"wrote {out} ({res['seconds']:.1f} s); use it with:\n"
                  f"  lowbit compile {shlex.quote(model_spec)} --pipeline {shlex.quote(pipe)} --overrides "
                  f"{shlex.quote(str(out))} -o OUT", markup=False, soft_wrap=True)  # no line breaks inside it
