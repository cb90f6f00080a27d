"""The ``lowbit`` command: compile a model through a pass pipeline and debug what each pass does to it.

Every command runs the same code as ``compile_model`` (load, capture, ``PassManager``, lower); the debugging
commands add instruments and real inputs on top. Heavy imports happen inside the commands so ``lowbit
--help`` and ``lowbit passes`` stay fast.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import typer
from rich.table import Table
from rich.text import Text

from lowbit import jsonio
from lowbit.cli.common import (
    DEBUG_DTYPE_HELP,
    DTYPE_HELP,
    EXIT_CODES_HELP,
    GENERATE_DTYPE_HELP,
    Exit,
    LowbitGroup,
    advise_dtype,
    atomic_output_dir,
    capture_model,
    check_calibration,
    check_eval_flags_fit,
    check_dtype,
    check_eval_sizes,
    check_output,
    console,
    err_console,
    existing_ancestor,
    fail,
    limit_heap_retention,
    load,
    parse,
    parse_percent_or_number,
    pipeline_text,
    quiet_progress,
    recipes_module,
    show_warnings_as_lines,
    text_tokenizer,
)
from lowbit.cli.pipeline import run_pipeline
from lowbit.errors import counted

app = typer.Typer(
    name="lowbit",
    help="Quantize PyTorch models through a pass pipeline you can see, check and bisect.",
    epilog=EXIT_CODES_HELP,
    cls=LowbitGroup,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
debug_app = typer.Typer(
    help="Find which pass and which layer cost accuracy: compare, bisect, sensitivity.",
    epilog=EXIT_CODES_HELP,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(debug_app, name="debug")


@app.callback()
def _process_setup() -> None:
    """Before any command: freed tensors go back to the system (``limit_heap_retention``), so a compile's resident
    memory follows what is live, which is what lets a model larger than the memory left be compiled and saved; and
    a warning prints as one ``warning: ...`` line (``show_warnings_as_lines``), not Python's file:line form."""
    limit_heap_retention()
    show_warnings_as_lines()

MODEL_HELP = ("smollm2, minilm, an HF model directory or a .gguf file; NAME:N keeps the first N blocks "
              "(smollm2:2 is a 2-layer SmolLM2)")
GENERATE_MODEL_HELP = ("a causal LM: smollm2, an HF *ForCausalLM directory or a .gguf file; NAME:N keeps the first N "
                       "blocks (smollm2:2 is a 2-layer SmolLM2)")
PIPELINE_HELP = "pass pipeline text, e.g. 'fold-norms,dce,quantize(w=int4,group=64)' (see `lowbit passes`)"
RECIPE_HELP = "a named recipe instead of --pipeline (see `lowbit recipes`)"
SET_HELP = ("OPTION=VALUE: change an option of the --recipe's passes (the one pass that has it, or every calibrating "
            "pass for calib_n/calib_len/...; PASS.OPTION=VALUE names the pass, needed where several passes have "
            "the option), e.g. --set group=32 --set gptq.calib_n=64; repeat for several")


# ---- passes / recipes ---------------------------------------------------------------------------

def _type_name(annotation: Any) -> str:
    if getattr(annotation, "__args__", None) or not hasattr(annotation, "__name__"):
        return str(annotation).replace("typing.", "")
    return annotation.__name__


def option_docs(options_cls: type) -> dict[str, str]:
    """Each option's attribute docstring (the string literal under it in the Options class), first line.

    Pass options are documented that way in their source; pydantic does not keep those strings, so they are
    read back from the source for ``lowbit passes NAME``.
    """
    docs: dict[str, str] = {}
    for klass in reversed(options_cls.__mro__):
        if klass.__module__.split(".")[0] == "lowbit":  # pydantic's BaseModel declares no option (and is slow to parse)
            docs.update(_class_option_docs(klass))
    return docs


@functools.lru_cache(maxsize=None)
def _class_option_docs(klass: type) -> dict[str, str]:
    """The attribute docstrings ``klass`` itself declares (each base is read once, however many passes share it)."""
    import ast
    import inspect
    import textwrap

    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
    except (OSError, TypeError, SyntaxError):
        return {}
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    return {a.target.id: " ".join(b.value.value.split()) for a, b in zip(body, body[1:])
            if (isinstance(a, ast.AnnAssign) and isinstance(a.target, ast.Name) and isinstance(b, ast.Expr)
                and isinstance(b.value, ast.Constant) and isinstance(b.value.value, str))}


@app.command("passes")
def passes_cmd(
    name: Optional[str] = typer.Argument(None, help="show only this pass"),
) -> None:
    """List every registered pass: its options with types and defaults, and what it is for."""
    from lowbit.passes.base import all_passes, closest

    registry = all_passes()
    if name is not None and name not in registry:
        fail(f"unknown pass {name!r}{closest(name, sorted(registry))}", Exit.USAGE)
    table = Table(title="lowbit passes", show_lines=True)
    table.add_column("pass", style="bold cyan", no_wrap=True)
    table.add_column("what it does")
    table.add_column("options (type = default)")
    for pname, cls in registry.items():
        if name is not None and pname != name:
            continue
        opts = []
        docs = option_docs(cls.Options) if name is not None else {}
        for key, f in cls.Options.model_fields.items():
            default = "required" if f.is_required() else repr(f.default)
            line = f"{key}: {_type_name(f.annotation)} = {default}"
            opts.append(Text(line) + (Text(f"\n    {docs[key]}", style="dim") if key in docs else Text("")))
        exact = Text(" (exact)", style="green") if getattr(cls, "exact", False) else Text("")
        doc = " ".join((cls.__doc__ or "").split()) if name is not None else cls.doc()
        table.add_row(pname, Text(doc) + exact, Text("\n").join(opts) if opts else Text("-"))
    console.print(table)


@app.command("recipes")
def recipes_cmd() -> None:
    """List the named recipes and the pipeline text each one stands for (and the one `lowbit generate` runs, where it
    differs)."""
    mod = recipes_module()
    if mod is None:
        console.print("No named recipes in this install (lowbit.recipes is missing); use --pipeline.", soft_wrap=True)
        return
    table = Table(title="lowbit recipes", show_lines=True)
    table.add_column("recipe", style="bold cyan", no_wrap=True)
    table.add_column("pipeline", overflow="fold")
    table.add_column("about")
    table.add_column("status")
    for rname, entry in sorted(getattr(mod, "RECIPES", {}).items()):
        text = entry if isinstance(entry, str) else str(getattr(entry, "pipeline", entry))
        generation = None if isinstance(entry, str) else getattr(entry, "generation", None)
        if generation:  # `lowbit generate --recipe` runs this one: the listing showed only the other
            text += f"\n(generate: {generation})"
        about = "" if isinstance(entry, str) else str(getattr(entry, "doc", "") or "")
        try:
            mod.get_recipe(rname)
            status = Text("ready", style="green")
        except Exception as exc:  # a recipe waiting for a pass is listed with the reason, not hidden
            missing = re.search(r"needs pass\(es\) ([\w\-, ]+?), which", str(exc))
            status = Text(f"needs {missing.group(1)}" if missing else f"unavailable: {exc}", style="yellow")
        table.add_row(rname, text, about, status)
    console.print(table)


# ---- compile ------------------------------------------------------------------------------------

class _RichStream:
    """A text stream for ``PrintIR`` that colours unified-diff lines (``+`` green, ``-`` red, ``@@`` cyan)."""

    def __init__(self, colour_diff: bool) -> None:
        self.colour_diff = colour_diff
        self._pending = ""

    def write(self, text: str) -> int:
        self._pending += text
        *lines, self._pending = self._pending.split("\n")
        for line in lines:
            style = None
            if self.colour_diff:
                if line.startswith("+++") or line.startswith("---"):
                    style = "bold"
                elif line.startswith("+"):
                    style = "green"
                elif line.startswith("-"):
                    style = "red"
                elif line.startswith("@@"):
                    style = "cyan"
            if line.startswith("// -----"):
                style = "bold magenta"
            # soft_wrap: a node line past the console width (160 columns when piped) was broken in two, so a dump
            # redirected to a file did not parse as IR
            console.print(line, style=style, markup=False, highlight=False, soft_wrap=True)
        return len(text)

    def flush(self) -> None:
        pass


def read_overrides(path: Path) -> list[str]:
    """The ``keep_float`` module globs of an override file written by ``lowbit debug sensitivity``.

    A file that cannot be read as one (binary, not JSON, no ``keep_float`` list) exits 3 as every unreadable input
    file does (a binary one was a UnicodeDecodeError traceback, a non-JSON one exit 2)."""
    if path.is_dir():
        fail(f"overrides file {str(path)!r} is a directory; give the JSON file `lowbit debug sensitivity -o` wrote",
             Exit.NOT_FOUND)
    if not path.is_file():
        fail(f"overrides file {str(path)!r}: no such file", Exit.NOT_FOUND)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        fail(f"overrides file {str(path)!r} is not JSON: {exc}", Exit.NOT_FOUND)
    except OSError as exc:
        fail(f"overrides file {str(path)!r} cannot be read: {exc.strerror or exc}", Exit.NOT_FOUND)
    keep = data.get("keep_float") if isinstance(data, dict) else None
    if not isinstance(keep, list) or not all(isinstance(k, str) for k in keep):
        fail(f"overrides file {str(path)!r} needs a 'keep_float' list of module globs", Exit.NOT_FOUND)
    return keep


def apply_overrides(passes: list[Any], keep: list[str], graph: Any, path: Path) -> list[Any]:
    """Keep the override file's modules float in every quantizing pass (one with a QuantConfig or ``keep``).

    Keeping the most damaging layers at higher precision is the mixed-precision decision ``debug sensitivity``
    recommends.
    """
    from lowbit.cli.restrict import keep_float
    from lowbit.ir.qscheme import module_matches
    from lowbit.passes.base import closest

    linears = sorted({n.module for n in graph.nodes if n.op == "linear" and n.module})
    for glob in keep:
        if not any(module_matches(m, glob) for m in linears):
            fail(f"--overrides {str(path)!r}: keep_float glob {glob!r} matches no linear module of this model"
                 f"{closest(glob, linears)} (linears: {', '.join(linears[:4])}{', ...' if len(linears) > 4 else ''}); "
                 "was the file written for another model?", Exit.USAGE)
    out, touched = [], 0
    for p in passes:
        q = keep_float(p, keep, graph) if ("keep" in p.Options.model_fields or "config" in p.Options.model_fields) \
            else None
        touched += q is not None
        out.append(q if q is not None else p)
    if not touched:
        fail(f"--overrides {str(path)!r}: no pass in the pipeline can keep modules float or dense (quantize, gptq "
             "and sparsify can)",
             Exit.USAGE)
    return out


class RssPeak:
    """Peak resident memory while each pass runs, sampled from /proc every 2 ms.

    ``PassManager(measure_memory=True)`` uses tracemalloc, which sees Python objects but not tensor storage
    (torch allocates outside Python's allocator), so a pass that copies a 100 MB weight shows 0 MiB there.
    The RSS high-water mark above the level at the pass's start is what a user running out of memory needs.
    An instrument by duck typing: ``PassManager`` only calls ``before_pass``/``after_pass``.
    """

    def __init__(self) -> None:
        self.peaks: dict[int, float] = {}
        self._stop: Any = None
        self._thread: Any = None

    @staticmethod
    def _rss() -> int:
        try:
            with open("/proc/self/statm") as fh:
                return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError):
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def before_pass(self, record: Any, p: Any, graph: Any) -> None:
        import threading

        start = self._rss()
        box = [start]
        self._stop = threading.Event()

        def sample(stop: Any = self._stop) -> None:
            while not stop.wait(0.002):
                box[0] = max(box[0], self._rss())

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        self._box, self._start = box, start

    def after_pass(self, record: Any, p: Any, graph: Any) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        self.peaks[record.index] = (max(self._box[0], self._rss()) - self._start) / 2**20


def timing_table(report: Any, rss: RssPeak | None = None) -> Table:
    table = Table(title=f"pass timing ({report.seconds:.2f} s total)")
    for col in ("#", "pass", "changed", "nodes", "wall ms", "verify ms", "py heap peak MiB", "RSS peak +MiB"):
        table.add_column(col, justify="right" if col not in ("pass", "changed") else "left")
    for r in report.records:
        state = "skipped" if r.skipped else ("yes" if r.changed else "no")
        peak = rss.peaks.get(r.index) if rss is not None else None
        table.add_row(str(r.index), r.spec, state, f"{r.nodes_before}→{r.nodes_after}", f"{r.seconds * 1e3:.1f}",
                      f"{r.verify_seconds * 1e3:.1f}", f"{r.peak_mb:.1f}", "-" if peak is None else f"{peak:.1f}")
    return table


def backend_options(items: list[str]) -> dict[str, str]:
    """``--backend-option KEY=VALUE`` flags as a dict (values are parsed by the backend's options model); a flag
    without ``=`` or a key given twice exits 2."""
    options: dict[str, str] = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            fail(f"--backend-option {item!r}: expected KEY=VALUE", Exit.USAGE)
        if key.strip() in options:  # as a pipeline option given twice: the last silently won
            fail(f"--backend-option {key.strip()} is given twice ({key.strip()}={options[key.strip()]}, "
                 f"{item.strip()}); give it once", Exit.USAGE)
        options[key.strip()] = value.strip()
    return options


@app.command("compile")
def compile_cmd(
    model: str = typer.Argument(..., help=MODEL_HELP),
    pipeline: Optional[str] = typer.Option(None, "--pipeline", "-p", help=PIPELINE_HELP),
    recipe: Optional[str] = typer.Option(None, "--recipe", "-r", help=RECIPE_HELP),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    backend: str = typer.Option("torch", "--backend", "-b", help="torch, onnxruntime, tensorrt or triton"),
    backend_option: list[str] = typer.Option([], "--backend-option", help="KEY=VALUE option of the backend "
                                             "(repeatable), e.g. keep_packed=true on torch, max_batch=16 on "
                                             "tensorrt (`lowbit inspect OUT/model.onnx` shows the profile)"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="output directory (model.lowbit, "
                                       "params.safetensors, report.json; model.onnx with -b onnxruntime, model.engine "
                                       "and the model.onnx it was built from with -b tensorrt); replaced only when the "
                                       "run succeeds"),
    fmt: str = typer.Option("lowbit", "--format", "-f", help="what -o holds: lowbit (IR text + safetensors), "
                            "compressed-tensors (an HF directory vLLM/SGLang/transformers load), gptq (HF GPTQ "
                            "layout) or hf (a float model, e.g. pruned, as plain transformers weights); each with "
                            "lowbit-manifest.json (SHA-256 of every file)"),
    overrides: Optional[Path] = typer.Option(None, "--overrides", help="override file from `lowbit debug "
                                             "sensitivity` (modules kept float)"),
    print_ir_after_all: bool = typer.Option(False, "--print-ir-after-all", help="print the IR after every pass"),
    print_ir_after_change: bool = typer.Option(False, "--print-ir-after-change",
                                               help="print the IR after each pass that changed it"),
    print_ir_diff: bool = typer.Option(False, "--print-ir-diff", help="coloured unified diff of the IR per pass"),
    print_ir_after: list[str] = typer.Option([], "--print-ir-after", help="print the IR after this pass "
                                             "(repeatable)"),
    print_ir_before: bool = typer.Option(False, "--print-ir-before", help="print the captured IR first"),
    filter: Optional[str] = typer.Option(None, "--filter", help="only show nodes whose module path matches this "
                                         "regex in printed IR"),
    verify_each: bool = typer.Option(True, "--verify-each/--no-verify-each", help="run the verifier after each "
                                     "pass"),
    timing: bool = typer.Option(False, "--timing", help="table of per-pass wall time and peak memory"),
    reproducer: Optional[Path] = typer.Option(None, "--reproducer", help="on failure, save the IR before the "
                                              "failing pass, the pipeline, inputs and versions here"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no summary and no calibration progress bars"),
    dtype: Optional[str] = typer.Option(None, "--dtype", help=DTYPE_HELP),
) -> None:
    """Capture MODEL, run the pipeline over its IR, lower it to BACKEND and write the artefact and a report."""
    from lowbit.api import check_plan_on_graph, compile_graph, plan_compile
    from lowbit.backends.registry import BackendError
    from lowbit.errors import DeviceError, LowbitError
    from lowbit.passes.base import all_passes, closest
    from lowbit.passes.manager import PrintIR

    t0 = time.perf_counter()
    if dtype is not None:
        check_dtype(dtype)
    text = pipeline_text(pipeline, recipe, set_)
    passes = parse(text)
    options = backend_options(backend_option)
    if backend == "torch" and "keep_packed" not in options:
        # the command writes the graph (or a checkpoint of it) and never runs the module it lowers: dequantizing
        # every weight to float there only took the float model's size again in memory
        options["keep_packed"] = "true"
    if quiet:  # the calibration bars too, where the pipeline does not ask for them (progress=true)
        quiet_progress(passes)
    try:
        plan = plan_compile(passes, backend, options)
    except BackendError as exc:
        fail(exc.cli, Exit.USAGE)
    except DeviceError as exc:  # a pass's device=cuda where there is none
        fail(str(exc), Exit.USAGE)
    registry = all_passes()
    names = [p.name for p in [*plan.passes, *plan.backend_passes]]  # the backend's own (fuse-qlinear) print too
    for name in print_ir_after:
        if name not in registry:
            fail(f"--print-ir-after: unknown pass {name!r}{closest(name, sorted(registry))}", Exit.USAGE)
        if name not in names:
            fail(f"--print-ir-after {name}: the pipeline has no {name} pass (it runs {', '.join(names) or 'none'}), "
                 "so nothing would be printed", Exit.USAGE)
    printing = print_ir_after_all or print_ir_after_change or print_ir_diff or print_ir_after or print_ir_before
    if filter is not None:
        try:
            re.compile(filter)
        except re.error as exc:
            fail(f"--filter {filter!r} is not a valid regex: {exc}", Exit.USAGE)
        if not printing:  # it only narrows printed IR: alone it was silently ignored
            fail(f"--filter {filter!r} selects the nodes of printed IR, and nothing is printed: add "
                 "--print-ir-after-all, --print-ir-after-change, --print-ir-diff, --print-ir-after PASS or "
                 "--print-ir-before", Exit.USAGE)
    keep = read_overrides(overrides) if overrides is not None else None
    check_output(out, "--out", directory=True)
    check_output(reproducer, "--reproducer", directory=True)
    if out is not None and reproducer is not None:
        o, r = out.expanduser().resolve(), reproducer.expanduser().resolve()
        if o == r or o in r.parents or r in o.parents:  # a failing run replaced an earlier OUT with the reproducer
            fail(f"--out {str(out)!r} and --reproducer {str(reproducer)!r} overlap: a failing run would write the "
                 "reproducer over (or into) the output, which only a successful run may replace; give two separate "
                 "directories", Exit.USAGE)
    from lowbit.checkpoint import FORMATS

    if fmt not in FORMATS:
        # --format is the checkpoint beside the IR; an ONNX file or a TensorRT engine comes from the backend that runs
        # it (the user asked for onnx and was told only the four checkpoint formats)
        runtime = {"onnx": "an ONNX file is written by -b onnxruntime -o DIR (DIR/model.onnx; "
                           "--backend-option weight_format=matmulnbits for MatMulNBits)",
                   "tensorrt": "a TensorRT engine is written by -b tensorrt -o DIR (DIR/model.engine)"}
        hint = next((f"; {v}" for k, v in runtime.items() if fmt.lower().startswith(k) or
                     (k == "tensorrt" and fmt.lower() in ("trt", "engine"))), "")
        fail(f"unknown --format {fmt!r}{closest(fmt, list(FORMATS))}; known: {', '.join(FORMATS)} (checkpoint "
             f"formats){hint}", Exit.USAGE)
    if fmt != "lowbit" and out is None:
        fail(f"--format {fmt} writes a checkpoint directory: give -o DIR", Exit.USAGE)
    refused = hf_format_refusal(fmt, passes)
    if refused:
        fail(f"cannot write --format {fmt}: {refused}", Exit.USAGE)

    loaded = load(model, dtype or "float32")
    if dtype is None:
        advise_dtype(model, writes=out is not None)
    check_calibration(passes, loaded)
    graph = capture_model(loaded)
    if out is not None:  # packed weights wait for the save on the output's disk, not in memory (models > RAM)
        from lowbit.ir.offload import ram_backed

        disk = existing_ancestor(out.expanduser().resolve())  # check_output found it writable
        if ram_backed(disk) is None:  # a tmpfs is memory: offloading there wrote the weights into memory again
            graph.offload_dir = str(disk)
    if keep is not None:
        passes = apply_overrides(passes, keep, graph, overrides)
        console.print(f"overrides {overrides}: keeping {', '.join(keep) or 'nothing'} float -> "
                      f"{','.join(p.spec() for p in passes)}", markup=False, soft_wrap=True)
        plan = plan_compile(passes, backend, options)
    refused = conv1d_refusal(fmt, passes, graph, loaded.module)
    if refused:
        fail(f"cannot write --format {fmt}: {refused}", Exit.USAGE)
    try:  # a backend option naming what the model lacks, or a group_fallback the backend refuses on it
        check_plan_on_graph(graph, plan)
    except LowbitError as exc:
        fail(getattr(exc, "cli", str(exc)), Exit.USAGE)
    instruments = []
    if printing:
        instruments.append(PrintIR(after_all=print_ir_after_all, after_change=print_ir_after_change,
                                   diff=print_ir_diff, after=print_ir_after, before_first=print_ir_before,
                                   filter=filter, stream=_RichStream(colour_diff=print_ir_diff)))
    rss = RssPeak() if timing else None
    if rss is not None:
        instruments.insert(0, rss)

    def run_passes(g: Any, ps: list[Any], ins: Any) -> Any:
        return run_pipeline(g, ps, instruments=list(ins), verify_each=verify_each, measure_memory=timing,
                            reproducer=reproducer, model_spec=model)

    try:
        runner, compile_report = compile_graph(graph, plan, instruments=instruments, run_passes=run_passes,
                                               started=t0)
    except typer.Exit:  # a failing pass: run_pipeline has reported it
        raise
    except (ImportError, ModuleNotFoundError) as exc:
        fail(f"backend {backend!r} is not available in this install: {exc}", Exit.BACKEND)
    except Exception as exc:
        fail(f"backend {backend!r} could not lower the graph: {type(exc).__name__}: {exc}", Exit.BACKEND)
    report = compile_report.pipeline
    if timing:
        console.print(timing_table(report, rss))
    if out is not None:
        _write_compile_output(out, graph, compile_report, runner, backend, model, text, fmt,
                              onnx_options={k: v for k, v in plan.backend_options.items() if v is not None})
    if not quiet:
        console.print(compile_report.summary(), markup=False, soft_wrap=True)
        if out is not None:
            console.print(f"wrote {out}/ ({', '.join(sorted(p.name for p in out.iterdir()))})", markup=False,
                          soft_wrap=True)


def hf_format_refusal(fmt: str, passes: list[Any]) -> str | None:
    """What an HF format refuses that the pipeline already shows, said before the model is loaded and compiled (the
    writer said it after the whole compile ran): ``hf`` writes float weights, so no quantizing pass and no packed KV
    cache; ``compressed-tensors`` and ``gptq`` describe quantized linears, so some pass must quantize weights."""
    quantizers = [p for p in passes if "dequantize" in getattr(p, "creates", ())]
    if fmt == "hf":
        writes = quantizers or [p for p in passes if "cache_attention" in getattr(p, "creates", ())]
        if writes:
            return (f"format 'hf' writes float weights, but pass {writes[0].spec()} quantizes the model: write "
                    "--format compressed-tensors or gptq, or drop the pass")
    elif fmt in ("compressed-tensors", "gptq") and not quantizers and \
            not (fmt == "compressed-tensors" and any(p.name == "sparsify" for p in passes)):
        # a float sparsify'd model is a sparse-only compressed-tensors checkpoint (its sparsity_config alone)
        names = ", ".join(p.spec() for p in passes) or "no pass"
        sparse = " (or, for compressed-tensors, a sparsify pass)" if fmt == "compressed-tensors" else ""
        return (f"format {fmt!r} describes quantized linears, and the pipeline ({names}) quantizes none: add a "
                f"quantizing pass (quantize, gptq, awq, autoround){sparse}, or write --format hf (a float model) or "
                "lowbit")
    if fmt == "gptq":
        # what the GPTQ writer refuses per linear, after the whole compile (GPTQ's calibration included): its
        # options say it first. gptq/awq/autoround quantize asymmetrically by default
        from lowbit.ir.quant import get_qdtype

        for p in quantizers:
            w, o = getattr(p.options, "w", None), p.options
            if w is not None and (get_qdtype(w).is_float or get_qdtype(w).bits not in (4, 8)):
                return (f"pass {p.spec()} quantizes weights to {w}, and format 'gptq' holds int4/int8 weights only: "
                        "write --format compressed-tensors")
            if w is not None and getattr(o, "sym", True) is False:
                default = "" if "sym" in o.model_fields_set else ", its default"
                return (f"pass {p.spec()} quantizes weights asymmetrically (sym=false{default}), and format 'gptq' "
                        "holds symmetric weights only: add sym=true, or write --format compressed-tensors (it stores "
                        "zero points)")
            if getattr(o, "a", None):
                return (f"pass {p.spec()} quantizes input activations (a={o.a}), and format 'gptq' is weight-only: "
                        "write --format compressed-tensors")
    if fmt in ("compressed-tensors", "gptq"):
        # the writers refused a quantized KV cache after the compile (hf refuses kv-cache above, and quantize as a
        # quantizer): lowbit's dynamic per-channel/per-token KV scales are not compressed-tensors' static
        # kv_cache_scheme, and GPTQ has none
        kv = [p for p in passes if "cache_attention" in getattr(p, "creates", ())
              or (p.name == "quantize" and getattr(p.options, "kv", None))]
        if kv:
            return (f"pass {kv[0].spec()} quantizes the KV cache, which format {fmt!r} cannot hold (lowbit's KV "
                    "scales are dynamic per channel/token; compressed-tensors' kv_cache_scheme is static, GPTQ has "
                    "none): drop kv= / kv-cache, or write --format lowbit")
        # clipped dynamic input scales: the writer refused them per linear after the whole compile (GPTQ included)
        clipped = [p for p in passes if p.name == "quantize" and getattr(p.options, "a", None)
                   and getattr(p.options, "a_clip", 1.0) < 1]
        if clipped:
            return (f"pass {clipped[0].spec()} clips the dynamic input scales to {clipped[0].options.a_clip} of the "
                    f"range, which format {fmt!r} has no field for: drop a_clip, or write --format lowbit")
    if fmt != "lowbit":
        # a global allocation prunes each layer by its own amount, and an HF config.json holds one MLP width for
        # all layers: the writer refused it after the whole compile (calibration included). Head counts that differ
        # are written with zero heads (lowbit.checkpoint.zero_heads), so prune-heads' is no refusal
        uneven = [p for p in passes
                  if p.name == "prune-mlp" and getattr(p.options, "allocation", "uniform") == "global"]
        if uneven:
            return (f"pass {uneven[0].spec()} prunes each layer by its own amount (allocation=global), and format "
                    f"{fmt!r} writes one MLP width for all layers in config.json: use allocation=uniform, or write "
                    "--format lowbit")
        # R4 before down_proj / the full-width Hadamard before o_proj stay in the graph as online hadamard nodes,
        # which no HF format holds: the writer refused them after the whole compile (GPTQ included) had run.
        # R3 (qk) alone is fine: the writer leaves out the exact q/k pair
        online = [p for p in passes if p.name == "rotate" and (p.options.online or p.options.online_o)]
        if online:
            return (f"pass {online[0].spec()} inserts online Hadamard rotations (online=true before down_proj"
                    f"{', online_o=true before o_proj' if online[0].options.online_o else ''}), which format {fmt!r} "
                    "has no field for (a loader would run another model): use rotate(online=false,online_o=false), "
                    "whose rotations fold into the weights, or write --format lowbit")
    return None


def conv1d_refusal(fmt: str, passes: list[Any], graph: Any, module: Any) -> str | None:
    """compressed-tensors quantizes ``nn.Linear`` modules only, and GPT-2's projections are ``Conv1D`` (weight
    ``[in, out]``): the writer refused them after the whole compile (GPTQ's calibration included). The captured
    ``graph`` and the HF ``module`` show which linears are Conv1D, and each quantizing pass's ``modules`` scope and
    ``keep`` globs which of them it quantizes, so this is said before any pass runs."""
    if fmt != "compressed-tensors":
        return None
    from lowbit.ir.qscheme import module_matches

    conv1d = {name for name, m in module.named_modules() if type(m).__name__ == "Conv1D"}
    linears = [n.module for n in graph.nodes if n.op == "linear"
               and any(c == n.module or c.endswith(f".{n.module}") for c in conv1d)]  # a wrapper adds "model."
    for p in passes:
        if "dequantize" not in getattr(p, "creates", ()):
            continue
        o = p.options
        hit = [m for m in linears if (not hasattr(o, "in_scope") or o.in_scope(m))
               and not any(module_matches(m, k) for k in getattr(o, "keep", []))]
        if hit:
            gptq = hf_format_refusal("gptq", passes)
            where = ("--format lowbit (gptq, whose loaders take Conv1D, cannot hold it either: "
                     f"{gptq.rsplit(': ', 1)[0]})" if gptq else
                     "--format gptq (symmetric int4/int8 weight-only; its loaders take Conv1D) or --format lowbit")
            return (f"pass {p.spec()} quantizes linear {hit[0]!r} (and {len(hit) - 1} more), a Conv1D in the HF model "
                    "(weight stored [in, out], GPT-2's); compressed-tensors quantizes nn.Linear modules only, so a "
                    f"loader would leave it unloaded: keep those linears float (keep= or modules=), or write {where}")
    return None


def _write_compile_output(out: Path, graph: Any, report: Any, runner: Any, backend: str, model: str,
                          text: str, fmt: str = "lowbit", onnx_options: dict[str, Any] | None = None) -> None:
    from lowbit.checkpoint import CheckpointError, write_checkpoint_files
    from lowbit.checkpoint.files import MANIFEST, clean_stale_temporaries, write_manifest

    clean_stale_temporaries(out.expanduser().parent, out.name)
    with atomic_output_dir(out) as tmp:
        try:
            info = write_checkpoint_files(graph, tmp, fmt, tokenizer=graph.meta.get("tokenizer"))
        except CheckpointError as exc:
            fail(f"cannot write --format {fmt}: {exc}", Exit.BACKEND)
        data = report.to_dict()
        data["model"] = model
        data["pipeline_text"] = text
        if backend == "onnxruntime":
            _export_onnx(runner, graph, report, tmp / "model.onnx", onnx_options)
        if backend == "tensorrt":  # the engine the compile built (minutes of TensorRT's tactic search) was dropped
            runner.save(tmp / "model.engine")
            # and the checked QDQ ONNX it was built from: an engine runs only on its TensorRT version and GPU, and OUT
            # held nothing to rebuild it from on another (trtexec --onnx, or lowbit.backends.tensorrt.build_engine)
            _export_onnx(runner, graph, report, tmp / "model.onnx")
        data["files"] = sorted([p.name for p in tmp.iterdir()] + ["report.json", MANIFEST])
        (tmp / "report.json").write_text(jsonio.dumps(data, indent=2, default=str) + "\n")
        write_manifest(tmp, fmt, {"lowbit": info})


def _export_onnx(runner: Any, graph: Any, report: Any, path: Path, options: dict[str, Any] | None = None) -> bool:
    """Write model.onnx through ``lowbit.export`` when that module exists in this install: the portable opset-21 QDQ
    form, with the ONNX lowering options given as --backend-option (weight_format=matmulnbits, opset, ...) applied
    to it too (they were dropped: the file had no MatMulNBits the session ran)."""
    try:
        from lowbit.export import ExportFormWarning, export
    except ModuleNotFoundError:
        err_console.print("note: lowbit.export is not in this install; no model.onnx written", soft_wrap=True)
        return False
    from lowbit.api import CompiledModel

    from lowbit.backends.registry import ORT_LOWERING_KEYS

    lowering = {k: v for k, v in (options or {}).items() if k in ORT_LOWERING_KEYS}
    fmt = "onnx-matmulnbits" if lowering.pop("weight_format", "qdq") == "matmulnbits" else "onnx"
    if "onnx" in (lowering.get("attention"), lowering.get("rotary")):
        lowering.setdefault("opset", 23)  # as the backend lowers them (ORT_LOWERING's opset)
    try:
        with warnings.catch_warnings():  # linears left out of MatMulNBits: the compile report lists them already
            warnings.simplefilter("ignore", ExportFormWarning)
            export(CompiledModel(runner, graph, report), path, fmt, **lowering)
    except Exception as exc:
        fail(f"ONNX export failed: {type(exc).__name__}: {exc}", Exit.BACKEND)
    return path.exists()


# ---- replay / inspect / graph -------------------------------------------------------------------

class _TextStream:
    """Streams generated tokens as text: each token prints what it adds to the decoded text so far.

    Why not print each token's own decode: byte-level BPE splits a character (an emoji, CJK) over several tokens,
    whose prefixes decode to U+FFFD; printed as they came, "😀" streamed as one U+FFFD and "日本語" as U+FFFD, "本",
    U+FFFD. Text ending in U+FFFD is held back until the character completes (as transformers' TextStreamer does).
    The new tokens are decoded after the prompt's (``continuation``): alone, a SentencePiece tokenizer (Llama 2,
    Mistral) drops the first one's leading space, and "The capital of France is" streamed "Paris"."""

    def __init__(self, tokenizer: Any, prompt_ids: list[int], stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.prompt_ids = prompt_ids
        self.stop = list(stop)
        """--stop strings: the text ends before the first; text that may be the start of one is held back."""
        self.tokens: list[int] = []
        self.shown = ""

    def push(self, token: int) -> None:
        from lowbit.generate import continuation

        self.tokens.append(token)
        self._show(continuation(self.tokenizer, self.prompt_ids, self.tokens), final=False)

    def flush(self) -> None:
        """Print what was held back (a character the last tokens left incomplete prints as U+FFFD)."""
        from lowbit.generate import continuation

        self._show(continuation(self.tokenizer, self.prompt_ids, self.tokens), final=True)

    def _show(self, text: str, final: bool) -> None:
        from lowbit.generate import stop_at

        at = stop_at(text, self.stop)
        if at is not None:  # the stop string and what its token added past it are never printed
            text, final = text[:at], True
        if not final:
            text = text.rstrip("\ufffd")
            # a tail that may still become a stop string waits for the next token ("\n" of a "\n\n" stop)
            held = max((n for s in self.stop for n in range(1, len(s)) if text.endswith(s[:n])), default=0)
            text = text[:len(text) - held]
        if len(text) > len(self.shown):
            console.print(text[len(self.shown):], end="", markup=False, highlight=False, soft_wrap=True)
            self.shown = text


def _prompt_file_text(name: str) -> str:
    """A --prompt-file's text (``-``: standard input), without the one line end an editor leaves at the end (a
    prompt typed on the command line has none); a missing or undecodable file is named, exit 3."""
    if name == "-":
        text = sys.stdin.read()
    else:
        path = Path(name).expanduser()
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            fail(f"--prompt-file {name}: no such file", Exit.NOT_FOUND)
        except IsADirectoryError:
            fail(f"--prompt-file {name}: is a directory; give a text file", Exit.NOT_FOUND)
        except UnicodeDecodeError as exc:
            fail(f"--prompt-file {name}: not UTF-8 text (byte {exc.start}: {exc.reason})", Exit.NOT_FOUND)
        except OSError as exc:
            fail(f"--prompt-file {name}: cannot be read ({exc.strerror})", Exit.NOT_FOUND)
    return text[:-2] if text.endswith("\r\n") else text[:-1] if text.endswith("\n") else text


def chat_ids(tokenizer: Any, message: str) -> list[int]:
    """``message`` as one user turn of the tokenizer's chat template, with the assistant's turn opened (what an
    instruct model answers); the template writes its own special tokens, so none are added again."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": message}], add_generation_prompt=True,
                                         tokenize=False)
    return tokenizer(text, add_special_tokens=False).input_ids


@app.command("generate")
def generate_cmd(
    model: str = typer.Argument(..., help=GENERATE_MODEL_HELP),
    prompt: list[str] = typer.Option([], "--prompt", help="prompt text (repeat for a batch)"),
    prompt_file: list[str] = typer.Option([], "--prompt-file", help="a file whose text is one prompt (its final "
                                          "line end dropped; repeat for a batch, after the --prompt ones; - reads "
                                          "standard input)"),
    pipeline: Optional[str] = typer.Option(None, "--pipeline", "-p", help=PIPELINE_HELP),
    recipe: Optional[str] = typer.Option(None, "--recipe", "-r", help=RECIPE_HELP),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", "-n", help="tokens to generate per prompt"),
    max_length: Optional[int] = typer.Option(None, "--max-length", help="KV-cache slots: prompt + new tokens must "
                                             "fit, at most the model's max_position_embeddings (default: 512, or "
                                             "that when smaller; the longest prompt + -n where that is more)"),
    max_batch: Optional[int] = typer.Option(None, "--max-batch", help="largest batch the step graph takes "
                                            "(default: the number of prompts)"),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda (decode steps replay a CUDA graph there)"),
    sample: bool = typer.Option(False, "--sample", help="sample instead of greedy decoding"),
    temperature: float = typer.Option(1.0, "--temperature", help="with --sample: logits are divided by this "
                                      "(below 1 sharper, above 1 flatter)"),
    top_k: Optional[int] = typer.Option(None, "--top-k", help="with --sample: draw only from the K most likely "
                                        "tokens"),
    top_p: Optional[float] = typer.Option(None, "--top-p", help="with --sample: draw only from the most likely "
                                          "tokens whose probabilities sum to P (nucleus, 0 < P <= 1)"),
    seed: Optional[int] = typer.Option(None, "--seed", help="sampling seed (reproducible draws)"),
    stop_token: Optional[list[int]] = typer.Option(None, "--stop-token", help="token id that ends a sequence "
                                                   "(repeat for several; default: the model's end-of-sequence "
                                                   "ids; --stop-token -1 for none)"),
    stop: list[str] = typer.Option([], "--stop", help="text that ends a sequence once its new text contains it "
                                   "(repeat for several; it is not printed)"),
    backend: str = typer.Option("torch", "--backend", "-b", help="torch (reference), onnxruntime, or triton "
                                "(CUDA)"),
    backend_option: list[str] = typer.Option([], "--backend-option", help="KEY=VALUE option of the backend "
                                             "(repeatable), e.g. weight_format=matmulnbits or threads=4 on "
                                             "onnxruntime, compile=false on triton"),
    dtype: Optional[str] = typer.Option(None, "--dtype", help=GENERATE_DTYPE_HELP),
    chat: bool = typer.Option(False, "--chat", help="each prompt is a user message in the tokenizer's chat "
                              "template, answered as the assistant (instruct models such as smollm2)"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="the generated text only: no progress bars and no "
                               "timings line"),
    reproducer: Optional[Path] = typer.Option(None, "--reproducer", help="on a failing pass, save the step graph "
                                              "before it and the rest of the pipeline here (`lowbit replay DIR`)"),
) -> None:
    """Compile MODEL for generation (one step graph: prefill and decode), stream the text, print timings."""
    import resource

    sources = [f"--prompt {p!r}" for p in prompt] + [f"--prompt-file {f}" for f in prompt_file]  # for messages
    prompt = [*prompt, *(_prompt_file_text(f) for f in prompt_file)]
    if not prompt:
        fail("give a prompt: --prompt TEXT or --prompt-file FILE (either repeated for a batch)", Exit.USAGE)

    from lowbit.api import compile_model
    from lowbit.errors import DeviceError, LowbitError, check_device
    from lowbit.backends.registry import BackendError
    from lowbit.generate import (GenerationError, GenerationSpec, before_stop, check_request, continuation,
                                 sampling_only, special_stops)
    from lowbit.passes.manager import PipelineError

    if dtype is not None:
        check_dtype(dtype)
    text = pipeline_text(pipeline, recipe, set_, generation=True) if pipeline or recipe or set_ else ""
    passes = parse(text) if text else []  # as `lowbit compile`: an unknown pass or a bad option exits 2
    if quiet:
        quiet_progress(passes)
    try:
        check_device(device)
    except DeviceError as exc:
        fail(f"--device: {exc}", Exit.USAGE)
    # and a backend that is not built, cannot run here (on --device), or cannot lower what the pipeline creates, is
    # said before any model is read, whichever kind MODEL is (a lowbit directory's load said it as exit 3)
    options = backend_options(backend_option)
    check_output(reproducer, "--reproducer", directory=True)
    try:
        from lowbit.api import plan_compile, refuse_for_generation

        plan_compile(passes, backend, options, device=device)  # the backend's options too, before the model is read
        refuse_for_generation(passes, recipe)  # w4a4kv4, the *-e2e recipes: before the model is read
    except BackendError as exc:
        fail(exc.cli, Exit.USAGE)
    except DeviceError as exc:  # a pass's device=cuda where there is none
        fail(str(exc), Exit.USAGE)
    except GenerationError as exc:
        fail(str(exc), Exit.USAGE)
    ignored = ["--" + name.replace("_", "-")
               for name, _ in sampling_only(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)]
    if ignored and not sample:
        fail(f"{', '.join(ignored)} only {'applies' if len(ignored) == 1 else 'apply'} when sampling: add --sample "
             "(without it decoding is greedy)", Exit.USAGE)
    check_generate_flags(len(prompt), max_new_tokens=max_new_tokens, max_length=max_length, max_batch=max_batch,
                         sample=sample, temperature=temperature, top_k=top_k, top_p=top_p)
    stops = None if not stop_token else () if stop_token == [-1] else tuple(stop_token)
    if "" in stop:  # every text contains it: each sequence would end at its first token, printing nothing
        fail("--stop '': give the text that ends a sequence (an empty one would end each at its first token)",
             Exit.USAGE)
    if stops and any(t < 0 for t in stops):
        fail(f"--stop-token {min(stops)}: token ids are 0 or more (-1 alone: no stop token)", Exit.USAGE)
    from lowbit.models import quantization_config

    ckpt = Path(model).expanduser() if quantization_config(model) is not None else None
    positions = None  # the model's max_position_embeddings, where known: --max-length's default stays within it
    fixed = None  # MODEL, when it is a lowbit directory: its step graph's max_length and max_batch cannot change
    load_s = 0.0  # a lowbit directory's load, which happens before the request is checked
    vocab = None  # the model's vocabulary size, where its config says it: a --stop-token past it is refused early
    lowbit_dir = Path(model).expanduser()
    from lowbit.checkpoint.files import unreadable_file

    why = unreadable_file(lowbit_dir / "model.lowbit") if lowbit_dir.is_dir() else None
    if why is not None:  # a symlink loop there read as 'a directory without config.json'
        fail(f"{str(lowbit_dir / 'model.lowbit')!r} cannot be read: {why}", Exit.NOT_FOUND)
    if dtype is not None and ((lowbit_dir / "model.lowbit").is_file() or ckpt is not None):
        fail(f"--dtype {dtype}: model {model!r} is already compiled, in the dtype it was compiled in; --dtype applies "
             "to a model lowbit compiles here (drop it)", Exit.USAGE)
    if reproducer is not None and ((lowbit_dir / "model.lowbit").is_file() or ckpt is not None):
        fail(f"--reproducer: model {model!r} is already compiled, so no pass runs here to fail (drop it)", Exit.USAGE)
    if (lowbit_dir / "model.lowbit").is_file():  # lowbit's format: the step graph as compiled (its spec fixed)
        if text:
            fail(f"model {model!r} is a compiled lowbit model (already compiled): drop --pipeline/--recipe",
                 Exit.USAGE)
        from lowbit.checkpoint import load as load_checkpoint

        try:
            start = time.perf_counter()
            stored = load_checkpoint(lowbit_dir, device=device, backend=backend, backend_options=options)
            load_s = time.perf_counter() - start  # before the timed build, which then took 0.0 s
        except LowbitError as exc:
            fail(str(exc), Exit.NOT_FOUND)
        meta = stored.graph.meta.get("generation")
        if meta is None:
            fail(f"model {model!r} holds no decode step (`lowbit compile` and compile_model without generation= "
                 f"capture the logits graph only): {_generate_from_source(lowbit_dir)}", Exit.USAGE)
        if stored.tokenizer is None:
            fail(f"model {model!r} was compiled without a tokenizer: give token ids through lowbit.load(...).generate",
                 Exit.USAGE)
        tok = stored.tokenizer
        # the cache it was captured with: a --max-length or --max-batch asking for other limits was ignored
        changed = [f"{flag} {given}" for flag, given, captured in (
            ("--max-length", max_length, meta["max_length"]), ("--max-batch", max_batch, meta["max_batch"]))
            if given is not None and given != captured]
        if changed:
            fail(f"model {model!r} is a compiled lowbit directory whose step graph was captured with max_length="
                 f"{meta['max_length']}, max_batch={meta['max_batch']}: {', '.join(changed)} cannot change it "
                 "(compile the original model again with these flags)", Exit.USAGE)
        max_length, max_batch = meta["max_length"], meta["max_batch"]
        from lowbit.generate import logits_vocab

        vocab = logits_vocab(stored.graph)  # a --stop-token past it is refused before the prompt is echoed
        fixed = model  # the limits are the directory's: generate()'s advice to compile with others does not apply
        build = lambda spec: stored  # noqa: E731
        text = "loaded from the lowbit directory"
    elif ckpt is not None:  # compressed-tensors / GPTQ: already compiled, loaded as the generation step
        if text:
            fail(f"model {model!r} is a quantized checkpoint (already compiled): drop --pipeline/--recipe", Exit.USAGE)
        from lowbit.checkpoint import load as load_checkpoint
        from lowbit.checkpoint.files import read_tokenizer

        try:
            tok = read_tokenizer(ckpt)
        except LowbitError as exc:  # an unloadable or code-shipping tokenizer: named, exit 3
            fail(str(exc), Exit.NOT_FOUND)
        build = lambda spec: load_checkpoint(ckpt, device=device, generation=spec, backend=backend,  # noqa: E731
                                             backend_options=options)
        text = "loaded from the checkpoint"
        from lowbit.models import config_json

        config = config_json(ckpt) or {}  # read once: its positions and vocabulary bound the request
        positions, vocab = config.get("max_position_embeddings"), config.get("vocab_size")
    else:
        loaded = load(model, dtype or "float32")
        if dtype is None:
            advise_dtype(model)
        if loaded.kind != "causal-lm":
            what = "a text encoder (input_ids, attention_mask -> embeddings)" if loaded.kind == "encoder" else \
                f"a {loaded.kind} model"
            fail(f"model {model!r} is {what} with no causal-LM head: `lowbit generate` needs a decoder LM "
                 "(smollm2, an HF *ForCausalLM directory, a .gguf)", Exit.USAGE)
        tok = text_tokenizer(loaded, "`lowbit generate` reads its prompts and writes its tokens as text")
        if backend == "triton" and dtype in (None, "float32"):  # it ran, every op on the reference, without a word
            err_console.print("note: the triton backend's kernels take bfloat16/float16 activations; this float32 "
                              "model runs every op on its reference path: add --dtype bfloat16", markup=False,
                              highlight=False, soft_wrap=True)
        config = getattr(getattr(loaded.module, "model", None), "config", None)
        positions = getattr(config, "max_position_embeddings", None)
        vocab = getattr(config, "vocab_size", None)
        def run_passes(g: Any, ps: list[Any], ins: Any) -> Any:  # a failing pass: exit 4, its reproducer if asked
            return run_pipeline(g, ps, instruments=list(ins), reproducer=reproducer, model_spec=model)

        # the parsed passes, not the text again: -q has turned their progress bars off
        build = lambda spec: compile_model(loaded.module, pipeline=passes or None, device=device,  # noqa: E731
                                           tokenizer=loaded.tokenizer, generation=spec, backend=backend,
                                           backend_options=options, run_passes=run_passes)
    outside = sorted(t for t in stops or () if isinstance(vocab, int) and not isinstance(vocab, bool) and t >= vocab)
    if outside:  # generate() refused it after the compile and the prefill, below the echoed prompt
        fail(f"--stop-token {outside[0]} is outside the model's vocabulary ({vocab} ids: 0..{vocab - 1}); it can "
             "never be generated", Exit.USAGE)
    known = isinstance(positions, int) and positions >= 2
    if known and max_length is not None and max_length > positions:
        # GenerationSpec refuses it too, in the API's words ('GenerationSpec.max_length=...; give max_length <= N')
        fail(f"--max-length {max_length}: model {model!r} takes at most {positions} positions "
             f"(max_position_embeddings in its config); give --max-length {positions} or less", Exit.USAGE)
    try:
        if chat and not getattr(tok, "chat_template", None):
            fail(f"--chat: model {model!r}'s tokenizer has no chat template (chat_template in its "
                 "tokenizer_config.json); give the prompt as text to continue, without --chat", Exit.USAGE)
        ids = [chat_ids(tok, p) if chat else tok(p).input_ids for p in prompt]
        shown = [f"{p}\n" if chat else p for p in prompt]  # the user's message on a line, the reply below it
        for source, encoded in zip(sources, ids):  # generate() said 'prompt 0 is empty', not which text or why
            if not encoded:
                fail(f"{source} encodes to no tokens (the tokenizer adds no BOS token): give text to continue",
                     Exit.USAGE)
        for i, p in enumerate(ids):  # no --max-length fits it: that advice led to the refusal above
            if known and len(p) + max_new_tokens > positions:
                fail(f"prompt {i} has {counted(len(p), 'token')} + --max-new-tokens {max_new_tokens} = "
                     f"{len(p) + max_new_tokens} "
                     f"> the model's max_position_embeddings={positions}: shorten the prompt or lower "
                     "--max-new-tokens", Exit.USAGE)
        if max_length is None:  # 512 (the model's positions where fewer), or what the request needs where more:
            # a long prompt was refused with the advice to give the --max-length this command could choose itself
            max_length = max(min(512, positions) if known else 512, max(map(len, ids)) + max_new_tokens)
        spec = GenerationSpec(max_length=max_length,
                              max_batch=len(prompt) if max_batch is None else max_batch)
        if fixed is not None:
            longest = max(len(p) for p in ids) + max_new_tokens
            if len(ids) > max_batch or longest > max_length:
                fail(f"model {fixed!r} is a compiled lowbit directory whose step graph was captured with max_length="
                     f"{max_length}, max_batch={max_batch}; this request needs {len(ids)} prompt(s) and "
                     f"{longest} tokens (the longest prompt + --max-new-tokens {max_new_tokens}): give fewer or "
                     "shorter prompts or a smaller -n, or compile the original model again with a larger --max-length/"
                     "--max-batch", Exit.USAGE)
        # the request is checked before the compile, which takes minutes on a large model
        text_stops = special_stops(tok, stop)[0]  # a stop holding a special token among other text: refused here
        check_request(spec, ids, max_new_tokens, do_sample=sample, temperature=temperature, top_k=top_k, top_p=top_p,
                      seed=seed)
        t0 = time.perf_counter()
        compiled = build(spec)
        compile_s = time.perf_counter() - t0 + load_s
        _note_reference_nodes(getattr(compiled, "runner", None))
        stream = _TextStream(tok, ids[0], text_stops)

        def on_token(seq: int, token: int) -> None:
            if len(prompt) == 1:
                stream.push(token)

        if len(prompt) == 1:
            console.print(shown[0], end="", markup=False, highlight=False, soft_wrap=True)
        try:
            out = compiled.generate(ids, max_new_tokens, do_sample=sample, temperature=temperature, top_k=top_k,
                                    top_p=top_p, seed=seed, on_token=on_token, stop_tokens=stops, stop=stop or None)
        except BaseException:
            if len(prompt) == 1:  # an error (or Ctrl-C) ends the streamed line: its message starts a line of its own
                console.print()
            raise
    except GenerationError as exc:
        fail(str(exc), Exit.USAGE)
    except BackendError as exc:  # unknown, unbuilt or unavailable here (triton without CUDA): as compile says it
        fail(exc.cli, Exit.USAGE)
    except PipelineError as exc:  # a compiled model's load (a pipeline's failure was run_pipeline's to report):
        # `lowbit compile MODEL --pipeline ... --reproducer DIR` was suggested for every failure, a missing file and a
        # refused model too, and compile captures the logits graph, not the step graph the pass failed on
        fail(str(exc), Exit.PIPELINE)
    if len(prompt) == 1:
        stream.flush()
        console.print()
    else:
        for p, encoded, t in zip(shown, ids, out.tokens):
            new = before_stop(continuation(tok, encoded, t), stop)
            console.print(f"{p}{new}\n", markup=False, highlight=False, soft_wrap=True)
    if quiet:
        return
    if out.peak_memory_bytes is not None:
        peak = f"{out.peak_memory_bytes / 2**20:.0f} MiB GPU"
    else:
        peak = f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB RSS"
    n_tokens = sum(len(t) for t in out.tokens)
    decode = (f"decode {counted(out.decode_steps, 'step')}, {out.decode_tokens_per_second:.1f} tokens/s "
              f"({out.decode_seconds * 1000 / out.decode_steps:.1f} ms/step, batch {len(prompt)})"
              if out.decode_steps else "no decode step (prefill made every token)")
    err_console.print(
        f"{'load' if text.startswith('loaded from') else 'compile'} {compile_s:.1f} s ({text or 'float'}); prefill "
        f"{out.prefill_seconds * 1000:.1f} ms for {counted(sum(out.prompt_lengths), 'token')}; {decode}; "
        f"{counted(n_tokens, 'new token')}; peak memory {peak}", markup=False, highlight=False, soft_wrap=True)


def _generate_from_source(directory: Path) -> str:
    """What to run instead of ``lowbit generate`` on a compile output without a decode step: the same command on the
    model and pipeline its report.json names (``lowbit compile -o`` writes them), where it can be read."""
    import shlex

    try:
        report = json.loads((directory / "report.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        report = None
    source = report.get("model") if isinstance(report, dict) else None
    text = report.get("pipeline_text") if isinstance(report, dict) else None
    if isinstance(source, str) and isinstance(text, str):
        return (f"run generate on the model it was compiled from: lowbit generate {shlex.quote(source)} --pipeline "
                f"{shlex.quote(text)} --prompt ...")
    return ("run generate on the model it was compiled from, with its --pipeline or --recipe (or save one compiled "
            "with lowbit.compile_model(..., generation=GenerationSpec(...)))")


def check_generate_flags(n_prompts: int, *, max_new_tokens: int, max_length: int | None, max_batch: int | None,
                         sample: bool, temperature: float, top_k: int | None, top_p: float | None) -> None:
    """``lowbit generate``'s numbers, refused by flag before the model is read. ``check_request`` and
    ``GenerationSpec`` refuse the same after the load, in the Python API's words (``max_new_tokens=0``,
    ``GenerationSpec.max_length=1``, "use do_sample=False"), which a user of the command never wrote."""
    refusals = (
        (max_new_tokens < 1, f"-n/--max-new-tokens {max_new_tokens}: give at least 1"),
        (max_length is not None and max_length < 2,
         f"--max-length {max_length}: give at least 2 (one prompt token, one new token)"),
        (max_batch is not None and max_batch < n_prompts,
         f"--max-batch {max_batch}: the step graph must take the {n_prompts} prompt(s) given; give at least "
         f"{n_prompts}, or leave it out"),
        (sample and not (math.isfinite(temperature) and temperature > 0),
         f"--temperature {temperature}: give a finite number above 0 (or leave out --sample: greedy decoding)"),
        (top_k is not None and top_k < 1, f"--top-k {top_k}: give at least 1"),
        (top_p is not None and not 0 < top_p <= 1, f"--top-p {top_p}: give a number above 0 and at most 1"),
    )
    for refused, message in refusals:
        if refused:
            fail(message, Exit.USAGE)


def _note_reference_nodes(runner: Any) -> None:
    """Say on stderr which nodes of a triton lowering run their reference path, by reason (``lowbit compile``
    prints the whole lowering report; ``generate`` printed none of it, so a packed cache or an attention the kernels
    do not take ran the reference at every step without a word)."""
    report = getattr(runner, "report", None)
    fallback = report.get("fallback") if isinstance(report, dict) else None
    if not fallback:
        return
    reasons: dict[str, int] = {}
    for why in fallback.values():
        reasons[why] = reasons.get(why, 0) + 1
    err_console.print(f"note: {counted(len(fallback), 'node')} {'runs its' if len(fallback) == 1 else 'run their'} "
                      "reference path on this backend:\n"
                      + "\n".join(f"  {n}x {why}" for why, n in reasons.items()), markup=False, highlight=False,
                      soft_wrap=True)


@app.command("replay")
def replay_cmd(
    directory: Path = typer.Argument(..., help="a directory written by --reproducer"),
    verify_each: bool = typer.Option(True, "--verify-each/--no-verify-each", help="run the verifier after each "
                                     "pass"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bars (the verdict still prints)"),
) -> None:
    """Re-run the failing part of a pipeline on the IR saved by --reproducer; exits 4 if it still fails (5: a graph
    debug compare saved because it did not run still does not)."""
    from lowbit.cli.reproducer import replay

    replay(directory, verify_each=verify_each, progress=not quiet)


@app.command("inspect")
def inspect_cmd(
    file: Path = typer.Argument(..., help="a .lowbit IR file, a compile output or HF model directory (compressed-"
                                "tensors, GPTQ, or a float model: captured as compile does), an .onnx file, or a "
                                "TensorRT .engine (its header: TensorRT version, inputs, optimization profile)"),
    top: int = typer.Option(20, help="show at most this many rows per table"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bars (an HF directory's loading bar; the "
                               "tables still print)"),
) -> None:
    """Summarise a compiled artefact: ops, quantized tensors (qdtype, granularity), dtypes and sizes."""
    from lowbit.cli.inspect import inspect_file

    if quiet:  # reading an HF directory loads it through transformers, whose bar went to stderr with the tables
        quiet_progress([])
    if top < 1:  # a negative --top sliced the tables from the end: every row but the last -N, silently
        fail(f"--top {top}: give at least 1 row per table", Exit.USAGE)
    inspect_file(file, top=top)


@app.command("graph")
def graph_cmd(
    file: Path = typer.Argument(..., help="a .lowbit IR file, a compile output or HF model directory (compressed-"
                                "tensors, GPTQ, or a float model: captured as compile does)"),
    format: str = typer.Option("html", "--format", "-f", help="dot or html"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="output file (default: beside FILE, with the "
                                       "format's suffix; for a directory OUT, OUT.html / OUT.dot next to it)"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bars (an HF directory's loading bar; the "
                               "'wrote' line still prints)"),
) -> None:
    """Draw the graph grouped by module: Graphviz dot (clusters) or HTML (collapsible, no JavaScript)."""
    from lowbit.cli.inspect import draw_graph

    if quiet:  # reading an HF directory loads it through transformers, whose bar went to stderr
        quiet_progress([])
    check_output(out, "--out", directory=False)
    draw_graph(file, format, out)


# ---- debug --------------------------------------------------------------------------------------

def _given_flags(ctx: typer.Context, flags: dict[str, str]) -> set[str]:
    """The flags (``{"--windows": "windows"}``: flag to parameter) given on the command line, not defaulted (by the
    source's name: typer may run on a click of its own, whose ParameterSource is another enum)."""
    return {flag for flag, param in flags.items()
            if getattr(ctx.get_parameter_source(param), "name", None) == "COMMANDLINE"}


_EVAL_FLAGS = {"--windows": "windows", "--seq-len": "seq_len", "--sentences": "sentences"}
# the help the debug commands' flags share (compare runs its --windows and --sentences once, not per evaluation,
# so it words those two its own way)
EVAL_WINDOWS_HELP = "causal LMs: WikiText-2 test windows per evaluation"
SEQ_LEN_HELP = "causal LMs: tokens per window"
EVAL_SENTENCES_HELP = "encoders: sentences per evaluation"
DEBUG_QUIET_HELP = "no progress bars (the tables and results still print)"


def _debug_dtype(model: str, dtype: str | None) -> str:
    """The dtype a debug command loads ``model`` in: ``--dtype``, or float32 with compile's note when ``model`` is a
    16-bit HF directory (they loaded it in float32, twice its weights in memory, without a word)."""
    if dtype is not None:
        check_dtype(dtype)
        return dtype
    advise_dtype(model)
    return "float32"


def _start_debug_eval(model: str, dtype: str | None, *, quiet: bool, metric: str, windows: int, seq_len: int,
                      sentences: int) -> str:
    """The checks debug compare, bisect and sensitivity open with, in one order for all three (their own flags'
    checks follow); returns the dtype to load ``model`` in (``_debug_dtype``)."""
    from lowbit.cli.probes import check_metric

    if quiet:  # transformers' loading bar: the flags' checks may load the model before the passes are read
        quiet_progress([])
    dtype = _debug_dtype(model, dtype)
    check_metric(metric)
    check_eval_sizes(windows, seq_len, sentences)
    return dtype


@debug_app.command("compare")
def compare_cmd(
    ctx: typer.Context,
    model: str = typer.Argument(..., help=MODEL_HELP),
    pipeline: Optional[str] = typer.Option(None, "--pipeline", "-p", help=PIPELINE_HELP),
    recipe: Optional[str] = typer.Option(None, "--recipe", "-r", help=RECIPE_HELP),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    windows: int = typer.Option(4, help="causal LMs: WikiText-2 test windows to run"),
    seq_len: int = typer.Option(128, help=SEQ_LEN_HELP),
    sentences: int = typer.Option(32, help="encoders: WikiText-2 sentences to embed"),
    metric: str = typer.Option("auto", help="the end metric: ppl or kl (causal LMs: perplexity, or the KL divergence "
                               "of the next-token distributions from the float model's), cos (encoders: 1 - embedding "
                               "cosine) or auto (ppl, cos); as debug bisect's --metric"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="write the numbers as JSON here ('-': to stdout, "
                                            "the tables then go to stderr)"),
    html_out: Optional[Path] = typer.Option(None, "--html", help="write a self-contained HTML report here ('-': to "
                                            "stdout, the tables then go to stderr)"),
    verify_each: bool = typer.Option(True, "--verify-each/--no-verify-each", help="run the verifier after each "
                                     "pass"),
    reproducer: Optional[Path] = typer.Option(None, "--reproducer", help="on a failing pass, save a replay here"),
    dtype: Optional[str] = typer.Option(None, "--dtype", help=DEBUG_DTYPE_HELP),
    quiet: bool = typer.Option(False, "--quiet", "-q", help=DEBUG_QUIET_HELP),
) -> None:
    """Run real inputs through the float graph and after every pass: per-pass, per-layer error and end metric."""
    from lowbit.cli.compare import run_compare

    dtype = _start_debug_eval(model, dtype, quiet=quiet, metric=metric, windows=windows, seq_len=seq_len,
                              sentences=sentences)
    check_output(json_out, "--json", directory=False)
    check_output(html_out, "--html", directory=False)
    if json_out is not None and html_out is not None and \
            json_out.expanduser().resolve() == html_out.expanduser().resolve():  # the report overwrote the numbers
        fail(f"--json and --html both name {str(json_out)!r}: give two files", Exit.USAGE)
    check_output(reproducer, "--reproducer", directory=True)
    check_eval_flags_fit(model, _given_flags(ctx, _EVAL_FLAGS), dtype)
    run_compare(model, pipeline_text(pipeline, recipe, set_), windows=windows, seq_len=seq_len, n_sentences=sentences,
                json_out=json_out, html_out=html_out, verify_each=verify_each, reproducer=reproducer, dtype=dtype,
                progress=not quiet, metric=metric)


@debug_app.command("bisect")
def bisect_cmd(
    ctx: typer.Context,
    model: str = typer.Argument(..., help=MODEL_HELP),
    pipeline: Optional[str] = typer.Option(None, "--pipeline", "-p", help=PIPELINE_HELP),
    recipe: Optional[str] = typer.Option(None, "--recipe", "-r", help=RECIPE_HELP),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    metric: str = typer.Option("auto", help="ppl or kl (causal LMs: perplexity, or the KL divergence of the next-token "
                               "distributions from the float model's, which a slice such as smollm2:2 needs), cos "
                               "(encoders: 1 - embedding cosine) or auto (ppl, cos)"),
    max_increase: str = typer.Option("5%", help="allowed metric increase over float: 5% (relative) or 0.01 "
                                     "(absolute)"),
    windows: int = typer.Option(4, help=EVAL_WINDOWS_HELP),
    seq_len: int = typer.Option(128, help=SEQ_LEN_HELP),
    sentences: int = typer.Option(32, help=EVAL_SENTENCES_HELP),
    json_out: Optional[Path] = typer.Option(None, "--json", help="write the result as JSON here ('-': to stdout, "
                                            "the tables then go to stderr)"),
    dtype: Optional[str] = typer.Option(None, "--dtype", help=DEBUG_DTYPE_HELP),
    quiet: bool = typer.Option(False, "--quiet", "-q", help=DEBUG_QUIET_HELP),
) -> None:
    """Find the first pass that pushes the metric past the threshold, then the fewest layers responsible."""
    from lowbit.cli.bisect import run_bisect

    dtype = _start_debug_eval(model, dtype, quiet=quiet, metric=metric, windows=windows, seq_len=seq_len,
                              sentences=sentences)
    check_output(json_out, "--json", directory=False)
    if parse_percent_or_number(max_increase)[0] <= 0:
        fail(f"--max-increase {max_increase}: must be above 0 (the threshold is the float model's metric plus "
             "this; at or below it every evaluation, the float model's included, fails)", Exit.USAGE)
    check_eval_flags_fit(model, _given_flags(ctx, _EVAL_FLAGS), dtype)
    run_bisect(model, pipeline_text(pipeline, recipe, set_), metric=metric, max_increase=max_increase,
               windows=windows, seq_len=seq_len, n_sentences=sentences, json_out=json_out, dtype=dtype,
               progress=not quiet)


@debug_app.command("sensitivity")
def sensitivity_cmd(
    ctx: typer.Context,
    model: str = typer.Argument(..., help=MODEL_HELP),
    scheme: str = typer.Option("w4a4", help="w4a4, w8a8, w4 (weights only), ... or quantize options "
                               "'w=int4,group=64,a=int8', or one pass as pipeline text (a pruning pass: "
                               "'sparsify(method=wanda,pattern=2:4)', 'prune-mlp(ratio=0.3)')"),
    group: Optional[int] = typer.Option(None, help="weight group size for wNaM schemes"),
    pipeline: Optional[str] = typer.Option(None, "--pipeline", "-p", help="passes run on the whole model before "
                                           "the --scheme pass, in every run (e.g. fold-norms)"),
    granularity: str = typer.Option("block", help="block (one transformer block at a time) or linear (one linear; "
                                    "not for prune-mlp, prune-heads, prune-blocks, which cut whole MLPs, heads or "
                                    "blocks)"),
    metric: str = typer.Option("auto", help="ppl, kl (causal LMs), cos (encoders) or auto (ppl, cos); see debug "
                               "bisect"),
    keep_top: int = typer.Option(1, help="how many of the most damaging units the override file keeps float (dense "
                                 "with a sparsify --scheme; a structured cut, prune-* or slice-residual, has no keep "
                                 "list: the ranking only)"),
    windows: int = typer.Option(4, help=EVAL_WINDOWS_HELP),
    seq_len: int = typer.Option(128, help=SEQ_LEN_HELP),
    sentences: int = typer.Option(32, help=EVAL_SENTENCES_HELP),
    out: Path = typer.Option(Path("sensitivity.json"), "--out", "-o", help="override file for `lowbit compile "
                             "--overrides`"),
    dtype: Optional[str] = typer.Option(None, "--dtype", help=DEBUG_DTYPE_HELP),
    quiet: bool = typer.Option(False, "--quiet", "-q", help=DEBUG_QUIET_HELP),
) -> None:
    """Quantize (or prune) one layer at a time, rank layers by metric damage, write an override file compile accepts."""
    from lowbit.cli.sensitivity import run_sensitivity

    dtype = _start_debug_eval(model, dtype, quiet=quiet, metric=metric, windows=windows, seq_len=seq_len,
                              sentences=sentences)
    check_output(out, "--out", directory=False)
    if group is not None and group < 1:
        fail(f"--group {group}: a weight group size is at least 1 (leave --group out for one scale per channel)",
             Exit.USAGE)
    if keep_top < 0:
        fail(f"--keep-top {keep_top}: the number of units kept must be 0 or more", Exit.USAGE)
    check_eval_flags_fit(model, _given_flags(ctx, _EVAL_FLAGS), dtype)
    run_sensitivity(model, scheme, group=group, prefix=pipeline, granularity=granularity, metric=metric,
                    keep_top=keep_top, windows=windows, seq_len=seq_len, n_sentences=sentences, out=out, dtype=dtype,
                    progress=not quiet)


def main() -> None:  # pragma: no cover - console entry for `python -m lowbit.cli.main`
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
