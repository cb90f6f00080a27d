"""Pipelines: parse a text spec into passes, run them with verification and instruments.

    PassManager("fold-norms,dce,quantize(w=int4,group=64)", verify_each=True,
                instruments=[PrintIR(after_change=True)]).run(graph)

Instruments are the hooks the debugging CLI hangs on (MLIR's ``--print-ir-after-all``, pass timing, TVM's
pass instruments): each is called before and after every pass and may record into the pass's record.
"""

from __future__ import annotations

import difflib
import re
import sys
import time
import tracemalloc
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, TextIO

import torch

from lowbit.errors import LowbitError
from lowbit.ir.graph import Graph
from lowbit.ir.printer import print_graph
from lowbit.ir.verifier import VerificationError, verify
from lowbit.passes.base import (Pass, PassError, PassFileError, ScopedOptions, all_passes, closest, get_pass,
                                 quote_pipeline, split_top, unmet_condition)


# ---- pipeline text -------------------------------------------------------------------------------

def _split_top(text: str, sep: str, where: str) -> list[str]:
    """Split on ``sep`` outside parentheses, brackets and quotes."""
    return split_top(text, sep, where)


_ITEM = re.compile(r"^\s*([A-Za-z][\w\-]*)\s*(?:\((.*)\))?\s*$", re.S)


def pipeline_pass_names(text: str) -> list[str]:
    """The pass names pipeline ``text`` lists, read by ``parse_pipeline``'s grammar without building the passes
    (an item it cannot read is left out: ``parse_pipeline`` says what is wrong with it)."""
    items = _split_top(text, ",", text) if text.strip() else []
    return [m.group(1) for m in map(_ITEM.match, items) if m]


def _parse_value(raw: str) -> Any:
    raw = raw.strip()
    if len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "\"'":
        return raw[1:-1]
    if raw.startswith("[") and raw.endswith("]"):
        inner = raw[1:-1].strip()
        # quote-aware, as spec() writes an element holding a ';' or ',' ("['a;b';c]" was "'a", "b'", "c")
        return [_parse_value(x) for x in split_top(inner, ";,", raw)] if inner else []
    return raw


def parse_pipeline(text: str, *, read_files: bool = True,
                   own_file: Callable[[str, str, str], str] | None = None) -> list[Pass]:
    """``"a,b(x=1,y=\\"s\\")"`` → ``[A(), B(x=1, y="s")]``; errors name the pass and the option.

    ``read_files=False`` (a pipeline from a stranger's file: a reproducer's ``replay_pipeline``) refuses every option
    that names a file (each pass's ``input_files``: ``config=``, ``calib=``, ``tokenizer=``) with an
    UntrustedInputError before any file is read: building ``quantize(config=PATH)`` already reads PATH. With
    ``own_file(pass, option, path)`` it instead maps each such path to the file the artefact may read (a
    reproducer's own copy of its calibration text) or raises UntrustedInputError."""
    if not text or not text.strip():
        raise PassError("empty pipeline: give pass names separated by commas, e.g. 'fold-norms,dce'")
    passes = []
    items = _split_top(text, ",", text)
    for i, item in enumerate(items):
        if not item.strip():
            where = ("a trailing comma" if i == len(items) - 1 else "a leading comma" if i == 0
                     else "two commas in a row")
            raise PassError(f"empty pass name in pipeline {quote_pipeline(text)} ({where}?)")
        m = _ITEM.match(item)
        if not m:
            raise PassError(f"cannot read pipeline item {item.strip()!r}: expected NAME or NAME(key=value,...)"
                            + _separator_hint(item))
        name, body = m.group(1), m.group(2)
        cls = get_pass(name)
        options: dict[str, Any] = {}
        if body and body.strip():
            fields = sorted(cls.Options.model_fields)
            for opt in split_top(body, ",", item, offset=m.start(2)):  # columns of item, not of the body
                if "=" not in opt:
                    raise PassError(f"pass {name}: option {opt.strip()!r} needs a value (key=value); "
                                    f"options are: {', '.join(fields) or 'none'}")
                key, value = opt.split("=", 1)
                key = key.strip().replace("-", "_")
                if key not in cls.Options.model_fields:
                    raise PassError(f"pass {name} has no option {key!r}{closest(key, fields)}; "
                                    f"options are: {', '.join(fields) or 'none'}")
                if key in options:
                    raise PassError(f"pass {name}: option {key!r} is given twice in {item.strip()!r}; give it "
                                    "once (the last would silently win)")
                options[key] = _parse_value(value)
        if not read_files:
            _refuse_file_options(name, cls, options, own_file)
        passes.append(build_pass(cls, options))
    check_order(passes)
    check_input_files(passes)
    return passes


def _separator_hint(item: str) -> str:
    """'fold-norms dce' or 'fold-norms;dce' is two passes without the comma between them: say so."""
    words = [w for w in split_top(item.strip(), " \t\n;", item) if w.strip()]
    if len(words) > 1 and all(m and m.group(1) in all_passes() for m in map(_ITEM.match, words)):
        return f"; passes are separated by commas: {','.join(w.strip() for w in words)!r}"
    return ""


def _refuse_file_options(name: str, cls: type[Pass], options: dict[str, Any],
                         own_file: Callable[[str, str, str], str] | None = None) -> None:
    """UntrustedInputError naming the first option of ``options`` that is a file path, unless ``own_file`` maps it
    to a file the artefact may read (``options`` is then rewritten to that path). The options are read
    unvalidated (``model_construct``): validating them would read the file."""
    from lowbit.errors import UntrustedInputError

    for option, path in cls.Options.model_construct(**options).input_files():
        if own_file is not None:
            options[option] = own_file(name, option, path)
            continue
        raise UntrustedInputError(f"pass {name}: option {option}={path!r} names a path; a pipeline read from an "
                                  "artefact may only use lowbit's shipped data (wikitext2-valid, smollm2, ...)")


def check_calibration_texts(passes: Sequence[Pass], tokenizer: Any, positions: int | None = None,
                            max_seq_length: int | None = None) -> None:
    """Every calibration text of the pipeline holds the ``calib_n x calib_len`` tokens its pass asks for (an unset
    calib_len capped to an encoder's ``max_seq_length``), and no ``calib_len`` is longer than the model's
    ``positions`` (where known), checked once the model's tokenizer is known and before the capture
    (``CalibrationOptions.check_text_length``)."""
    from lowbit.passes.base import CalibrationOptions

    for p in passes:
        if isinstance(p.options, CalibrationOptions):
            p.options.check_text_length(tokenizer, p.name, positions=positions, max_seq_length=max_seq_length)


def check_input_files(passes: Sequence[Pass]) -> None:
    """Every file any pass of the pipeline reads exists and is readable, checked before the first pass (and
    before the model is loaded): ``PassFileError`` names the pass, the option and the path."""
    import os

    from lowbit.passes.base import PassFileError

    for p in passes:
        for option, path in p.options.input_files():
            where = f"pass {p.name}: option {option}={path!r}"
            full = os.path.expanduser(path)
            if not os.path.exists(full):
                raise PassFileError(f"{where}: no such file or directory")
            if os.path.isfile(full) and not os.access(full, os.R_OK):
                raise PassFileError(f"{where}: the file is not readable")
            if option == "tokenizer" and not os.path.isdir(full):
                raise PassFileError(f"{where}: a tokenizer is 'smollm2', 'minilm' or a tokenizer directory")
            if option == "calib" and os.path.isdir(full):
                raise PassFileError(f"{where}: is a directory; give a text file or a .safetensors of token ids")
            if option != "tokenizer" and os.path.isdir(full):  # config=DIR failed after the model load
                raise PassFileError(f"{where}: is a directory; give a file")
            if option == "calib":  # an empty or binary text failed in the pass, after the model load
                _check_calibration_file(full, where)


def _check_calibration_file(path: str, where: str) -> None:
    """Read a calibration file as the pass will (a text, or token ids in a ``.safetensors``): what cannot be read is a
    ``PassFileError`` now rather than a pass failure after the model is loaded and captured."""
    from lowbit.calibration.data import calibration_tensor
    from lowbit.data import read_text, refuse_json_text
    from lowbit.errors import CorruptFileError
    from lowbit.passes.base import PassError, PassFileError

    try:  # a JSON dataset was refused by the pass, after the model load
        refuse_json_text(path, "calibration text", "calib= files", "calibrate on",
                         ", or give token ids (a tensor or a .safetensors file)")
    except ValueError as exc:
        raise PassError(f"{where}: {exc}") from None
    try:
        if calibration_tensor(path) is None:
            read_text(path)
    except (CorruptFileError, OSError) as exc:
        raise PassFileError(f"{where}: {exc}") from None


def build_pass(cls: type[Pass], options: dict[str, Any]) -> Pass:
    """``cls(**options)``; a bad option is a ``PipelineSpecError`` naming the pass, the option and the rule (a
    missing file stays a ``PassFileError``: exit 3, not 2)."""
    try:
        return cls(**options)
    except PassFileError:
        raise
    except PassError as exc:
        raise PipelineSpecError(str(exc)) from None


def check_order(passes: Sequence[Pass]) -> None:
    """Every pass comes after the passes it declares it must follow (``Pass.after``), where both are present, and
    no pass runs after one whose work it would undo (``Pass.undone_by``)."""
    for i, p in enumerate(passes):
        for j in range(i + 1, len(passes)):
            undone = p.undone_by(passes[j])
            if undone:
                raise PipelineSpecError(f"pass {passes[j].spec()} (#{j}) would undo pass {p.spec()} (#{i}): {undone}")
            if passes[j].name in p.after:
                earlier = [k for k in range(i) if passes[k].name == passes[j].name]
                if earlier:  # "move fold-norms before rotate" read wrong where fold-norms already ran first
                    raise PipelineSpecError(
                        f"pass {p.name} (#{i}) must come after every {passes[j].name}: it runs at #{earlier[0]} "
                        f"and again at #{j}, after {p.name}; drop the later one in "
                        f"{quote_pipeline(format_pipeline(passes))}")
                raise PipelineSpecError(
                    f"pass {p.name} (#{i}) must come after {passes[j].name}, which the pipeline runs later "
                    f"(#{j}): move {passes[j].name} before {p.name} in {quote_pipeline(format_pipeline(passes))}")


def format_pipeline(passes: Sequence[Pass]) -> str:
    return ",".join(p.spec() for p in passes)


# ---- records and instruments ---------------------------------------------------------------------

@dataclass
class PassRecord:
    index: int
    name: str
    spec: str
    changed: bool = False
    skipped: bool = False
    seconds: float = 0.0
    verify_seconds: float = 0.0
    peak_mb: float = 0.0
    nodes_before: int = 0
    nodes_after: int = 0
    stats: dict[str, Any] = field(default_factory=dict)
    numeric: dict[str, float] = field(default_factory=dict)


@dataclass
class PipelineReport:
    pipeline: str
    records: list[PassRecord] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"pipeline": self.pipeline, "seconds": round(self.seconds, 3),
                "passes": [asdict(r) for r in self.records]}


class Instrument:
    """Hooks around each pass. Override what you need."""

    def before_pass(self, record: PassRecord, p: Pass, graph: Graph) -> None:
        pass

    def after_pass(self, record: PassRecord, p: Pass, graph: Graph) -> None:
        pass


class PrintIR(Instrument):
    """MLIR-style IR printing: after all passes, after those that changed the IR, after named ones, or diffs."""

    def __init__(self, *, after_all: bool = False, after_change: bool = False, diff: bool = False,
                 after: Iterable[str] = (), before_first: bool = False, filter: str | None = None,
                 stream: TextIO | None = None) -> None:
        self.after_all, self.after_change, self.diff = after_all, after_change, diff
        self.after = set(after)
        self.before_first = before_first
        self.filter = filter
        self.stream = stream or sys.stdout
        self._before: str | None = None

    def _text(self, graph: Graph) -> str:
        return print_graph(graph, filter=self.filter, params=self.filter is None)

    def before_pass(self, record: PassRecord, p: Pass, graph: Graph) -> None:
        if self.diff:
            self._before = self._text(graph)
        if self.before_first and record.index == 0:
            self.stream.write(f"// ----- IR before {record.spec} -----\n{self._text(graph)}")

    def after_pass(self, record: PassRecord, p: Pass, graph: Graph) -> None:
        if record.skipped:
            return
        if self.diff and self._before is not None:
            after = self._text(graph)
            lines = list(difflib.unified_diff(self._before.splitlines(), after.splitlines(),
                                              f"before {record.spec}", f"after {record.spec}", lineterm="", n=1))
            if lines:
                self.stream.write("\n".join(lines) + "\n")
            elif record.changed:  # the pass changed weights (no IR text) or lines outside the filter
                where = "the lines --filter keeps" if self.filter else "the IR text (weights only)"
                self.stream.write(f"// {record.spec}: changed, but not in {where}\n")
            else:
                self.stream.write(f"// {record.spec}: no change\n")
        show = self.after_all or (self.after_change and record.changed) or record.name in self.after
        if show:
            self.stream.write(f"// ----- IR after {record.spec} -----\n{self._text(graph)}")


class PipelineError(LowbitError, RuntimeError):
    """A pass failed or left invalid IR; names the pass and carries the IR from before it."""

    def __init__(self, message: str, record: PassRecord, graph_before: Graph | None) -> None:
        super().__init__(message)
        self.record = record
        self.graph_before = graph_before


class ModelRefusedError(PipelineError):
    """A pass's ``precheck`` refuses the model before any pass ran: the pipeline cannot run on this model (change
    the pipeline or the model); there is no pass failure to replay."""


class ScopeError(PipelineError):
    """A pass's ``modules=`` scope matches no module of the graph: a typo in the pipeline, found before the pass ran,
    so a reproducer of it would only say the same again (the message names the modules it could have meant)."""


class PipelineSpecError(PassError, PipelineError):
    """The pipeline text is wrong (an option out of range, passes out of order): found when it is parsed, before
    any pass runs. Both a ``PassError`` (a bad spec) and a ``PipelineError`` (this pipeline cannot run)."""

    def __init__(self, message: str) -> None:
        PipelineError.__init__(self, message, PassRecord(-1, "(pipeline)", "(pipeline)"), None)


# ---- the manager ---------------------------------------------------------------------------------

class PassManager:
    """Runs passes in order on a graph, in place; verifies after each one when ``verify_each``.

    ``limit`` runs only the first N passes (LLVM's ``-opt-bisect-limit``); ``keep_before_failure`` keeps a
    copy of the IR before each pass so a failure can be replayed (``lowbit replay``). ``verify_input=False`` skips
    the check of the graph before the first pass, for a clone of a graph a verified run left (the verifier takes
    ~0.8 s on the whole SmolLM2, and ``debug sensitivity`` runs one restricted pass per block on such clones).
    """

    def __init__(self, passes: str | Sequence[Pass], *, verify_each: bool = True,
                 instruments: Sequence[Instrument] = (), limit: int | None = None,
                 measure_memory: bool = False, keep_before_failure: bool = False, verify_input: bool = True) -> None:
        self.passes = parse_pipeline(passes) if isinstance(passes, str) else list(passes)
        check_order(self.passes)
        self.verify_each = verify_each
        self.verify_input = verify_input
        self.instruments = list(instruments)
        self.limit = limit
        self.measure_memory = measure_memory
        self.keep_before_failure = keep_before_failure

    @property
    def pipeline(self) -> str:
        return format_pipeline(self.passes)

    def run(self, graph: Graph, reference: Graph | None = None) -> PipelineReport:
        """Run the passes on ``graph`` in place. ``reference``: the model passes that read one (``distill``,
        ``tune-qparams``: their teacher) compare against; unset, the graph as this run received it (give the
        float model when resuming a pipeline from a graph an earlier run already quantized).

        Passes run outside ``torch.inference_mode`` whatever the caller's mode: those that learn (autoround, learned
        rotations, distill, refits) take gradients, which tensors made in inference mode cannot have (under the
        caller's ``inference_mode()`` autoround failed with "Inference tensors cannot be saved for backward")."""
        with torch.inference_mode(False):
            return self._run(graph, reference)

    def _run(self, graph: Graph, reference: Graph | None) -> PipelineReport:
        report = PipelineReport(self.pipeline)
        t_start = time.perf_counter()
        if self.verify_each and self.verify_input:
            try:
                verify(graph)
            except VerificationError as exc:
                raise PipelineError(f"the input IR is invalid before any pass ran:\n{exc}",
                                    PassRecord(-1, "(input)", "(input)"), None) from exc
        _precheck(self.passes[:self.limit], graph)
        # the model as the pipeline received it, for passes that read it (distill's teacher); tensors are shared
        start = None
        if any(p.needs_reference for p in self.passes):
            start = reference if reference is not None else graph.clone()
        for i, p in enumerate(self.passes):
            rec = PassRecord(i, p.name, p.spec(), nodes_before=len(graph.nodes))
            report.records.append(rec)
            if self.limit is not None and i >= self.limit:
                rec.skipped = True
                rec.nodes_after = rec.nodes_before
                continue
            before = graph.clone() if self.keep_before_failure else None
            _check_scope(p, i, graph, rec, before)
            _check_conditions(p, i, "requires", p.requires, graph, rec, before)
            for ins in self.instruments:
                ins.before_pass(rec, p, graph)
            if self.measure_memory:
                tracemalloc.start()
            t0 = time.perf_counter()
            own_reference = p.needs_reference and p.reference is None
            if own_reference:
                p.reference = start
            try:
                result = p.run(graph)
            except PassError as exc:
                raise PipelineError(f"pass {p.spec()} (#{i}) failed: {exc}", rec, before) from exc
            except Exception as exc:
                raise PipelineError(f"pass {p.spec()} (#{i}) failed: {type(exc).__name__}: {exc}", rec, before) from exc
            finally:
                if own_reference:
                    p.reference = None
                rec.seconds = time.perf_counter() - t0
                if self.measure_memory:
                    rec.peak_mb = tracemalloc.get_traced_memory()[1] / 2**20
                    tracemalloc.stop()
            rec.changed, rec.stats = result.changed, dict(result.stats)
            rec.nodes_after = len(graph.nodes)
            _check_conditions(p, i, "ensures", p.ensures, graph, rec, before)
            if self.verify_each:
                t1 = time.perf_counter()
                try:
                    verify(graph)
                except VerificationError as exc:
                    raise PipelineError(f"pass {p.spec()} (#{i}) left invalid IR:\n{exc}", rec, before) from exc
                rec.verify_seconds = time.perf_counter() - t1
            for ins in self.instruments:
                ins.after_pass(rec, p, graph)
        report.seconds = time.perf_counter() - t_start
        return report


def _precheck(passes: Sequence[Pass], graph: Graph) -> None:
    """Every pass's ``precheck`` on the input graph, before any pass runs: a PipelineError naming the pass that
    refuses the model (no pass has changed it, so there is no IR to keep)."""
    for i, p in enumerate(passes):
        try:
            p.precheck(graph)
        except PassError as exc:
            raise ModelRefusedError(f"pass {p.spec()} (#{i}) refuses this model, so no pass ran: {exc}",
                                    PassRecord(i, p.name, p.spec(), nodes_before=len(graph.nodes),
                                               nodes_after=len(graph.nodes)), None) from exc


def _check_scope(p: Pass, index: int, graph: Graph, rec: PassRecord, before: Graph | None) -> None:
    """A ``modules`` scope that matches no module of the graph is a typo, not a pass with nothing to do: raise a
    PipelineError naming the pattern and modules it could have meant, before the pass runs."""
    opts = getattr(p, "options", None)
    if not isinstance(opts, ScopedOptions) or not opts.modules:
        return
    modules = sorted({n.module for n in graph.nodes if n.module})
    if any(opts.in_scope(m) for m in modules):
        return
    near = difflib.get_close_matches(opts.modules, modules, n=3, cutoff=0.5) or modules[:3]
    raise ScopeError(f"pass {p.spec()} (#{index}): modules={opts.modules} matches no module of the graph "
                     f"(a regex searched in module paths such as {', '.join(map(repr, near))})", rec, before)


def _check_conditions(p: Pass, index: int, kind: str, conditions: Sequence[Any], graph: Graph, rec: PassRecord,
                      before: Graph | None) -> None:
    """Raise a PipelineError naming the pass, the condition and the first offending nodes."""
    why = unmet_condition(kind, conditions, graph)
    if why is not None:
        raise PipelineError(f"pass {p.spec()} (#{index}) {why}", rec, before)
