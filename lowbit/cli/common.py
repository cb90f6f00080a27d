"""What every ``lowbit`` command shares: exit codes, error reporting, model loading and capture, pipelines.

The commands are thin: they turn flags into calls of the same functions ``compile_model`` uses
(``load_model``, ``capture``, ``parse_pipeline``, ``PassManager``), so what the CLI shows is what the API does.
Loaded models and captured graphs are cached per process, so in-process tests (and ``debug`` commands that
capture once and run many pipelines) pay for loading only once.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import tempfile
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Any, NoReturn

import click
import typer
from rich.console import Console
from typer.core import TyperGroup

_PACKAGE_DIR = Path(__file__).resolve().parents[1]  # lowbit/: where a warning that is lowbit's own comes from


def _width() -> int | None:
    """Rich falls back to 80 columns when output is piped, which truncates the per-pass tables; use 160 then."""
    return None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 160


def _end_on_closed_output(*streams: Any) -> NoReturn:
    """Output its reader stopped taking (``lowbit inspect DIR | head -1``) ends the command quietly with exit 0:
    click and rich exited 1 there, which ``--help`` lists as a bug in lowbit."""
    for stream in streams:
        with contextlib.suppress(AttributeError, OSError, ValueError):  # a test runner's stream has no fd
            # what is still buffered is flushed at exit, into nothing now (else a second BrokenPipeError)
            os.dup2(os.open(os.devnull, os.O_WRONLY), stream.fileno())
    raise typer.Exit(int(Exit.OK))


class _Console(Console):
    def on_broken_pipe(self) -> None:
        _end_on_closed_output(sys.stdout, self.file)


# markup off: what the commands print (pass specs such as "keep=[lm_head]", module paths, file names) is text, and
# rich read "[lm_head]" in a table cell as a style tag and dropped it; the one styled line (fail) asks for markup
console = _Console(highlight=False, markup=False, width=_width())
err_console = _Console(stderr=True, highlight=False, markup=False, width=_width())


class Exit(IntEnum):
    """Exit codes of every ``lowbit`` command (listed in ``lowbit --help``)."""

    OK = 0
    INTERNAL = 1
    """An unexpected error (a bug in lowbit): the traceback is printed."""
    USAGE = 2
    """Bad flags or arguments, unknown pass/option/recipe/backend (the message names the closest valid ones)."""
    NOT_FOUND = 3
    """A model, data or input file does not exist or cannot be read."""
    PIPELINE = 4
    """A pass failed or left invalid IR (the message names the pass; ``--reproducer DIR`` saves a replay)."""
    BACKEND = 5
    """The backend could not lower or export the compiled graph."""
    THRESHOLD = 6
    """``debug bisect``: the full pipeline stays within ``--max-increase`` (nothing to bisect)."""


_EXIT_DOCS = {
    Exit.OK: "success",
    Exit.INTERNAL: "unexpected internal error (a bug: the traceback is printed)",
    Exit.USAGE: "bad flags or arguments; unknown pass, option, recipe or backend (closest names suggested)",
    Exit.NOT_FOUND: "a model, data or input file does not exist or cannot be read",
    Exit.PIPELINE: "a pass failed or left invalid IR",
    Exit.BACKEND: "the backend could not lower or export the graph",
    Exit.THRESHOLD: "debug bisect: the whole pipeline stays within --max-increase (nothing to bisect)",
}
_REPRODUCER_HINT = {Exit.PIPELINE: " (--reproducer DIR saves a replayable case)"}


def exit_codes_help(codes: Iterable[Exit] = tuple(Exit), reproducer: bool = True) -> str:
    """The ``Exit codes: ...`` epilog listing ``codes`` (a program lists the codes it can return: ``python -m lowbit``
    runs no ``debug bisect``); ``reproducer``: with the hint at code 4, for the commands that take ``--reproducer``."""
    hint = _REPRODUCER_HINT if reproducer else {}
    return "Exit codes: " + "; ".join(f"{int(c)} {_EXIT_DOCS[c]}{hint.get(c, '')}" for c in codes) + "."


EXIT_CODES_HELP = exit_codes_help()


class LowbitGroup(TyperGroup):
    """The ``lowbit`` command group: a plain write to a closed pipe ends the command as rich's do (exit 0)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except BrokenPipeError:
            _end_on_closed_output(sys.stdout)


def quiet_progress(passes: list[Any]) -> None:
    """``-q``: no progress bar on stderr: the calibrating passes' (where the pipeline does not ask for them with
    ``progress=true``) and transformers' ("Loading weights", "Writing model shards", and through ``lowbit.models``
    its GGUF reader's)."""
    for p in passes:
        if "progress" in type(p.options).model_fields and "progress" not in p.options.model_fields_set:
            p.options.progress = False
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def fail(message: str, code: Exit) -> NoReturn:
    """Print ``message`` on stderr and exit with ``code``; every expected error goes through here."""
    from rich.markup import escape

    # the message is text, not markup: "keep=[lm_head]" or a path with [brackets] lost them as style tags
    err_console.print(f"[bold red]error:[/] {escape(message)}", markup=True, highlight=False,
                      soft_wrap=True)  # paths stay whole
    raise typer.Exit(int(code))


def warning_line(message: Warning | str, category: type[Warning], filename: str, lineno: int) -> str:
    """One line for a warning a command raised: ``warning: <message>``, then the category where it says more than
    UserWarning (``PYTHONWARNINGS=ignore::<its module>.<name>`` silences it), and for a warning from outside lowbit
    (torch, transformers) where it came from. Python's own form was two lines naming lowbit's source
    (``.../passes/manager.py:371: UntiedWeightWarning: ...`` over ``result = p.run(graph)``): the warn call's
    place, which tells a user of the command nothing."""
    text = " ".join(str(message).split())
    ours = Path(filename).resolve().is_relative_to(_PACKAGE_DIR) or \
        category.__module__.split(".")[0] == "lowbit"
    if ours:
        return f"warning: {text}" + ("" if category is UserWarning else f" ({category.__name__})")
    return f"warning: {text} ({category.__name__} from {filename}:{lineno})"


def show_warnings_as_lines() -> None:
    """Print every warning as ``warning_line`` on stderr, for the rest of the process (every command sets it up)."""
    def show(message: Warning | str, category: type[Warning], filename: str, lineno: int, file: Any = None,
             line: str | None = None) -> None:
        text = warning_line(message, category, filename, lineno)
        if file is not None:
            file.write(text + "\n")
        else:
            err_console.print(text, markup=False, highlight=False, soft_wrap=True)

    warnings.showwarning = show


# ---- models -------------------------------------------------------------------------------------


@dataclass
class LoadedModel:
    """A model as the CLI uses it: the module lowbit captures, its tokenizer and kind, and the spec it came from."""

    spec: str
    module: Any
    tokenizer: Any
    kind: str
    n_layers: int | None = None


def text_tokenizer(model: LoadedModel, why: str) -> Any:
    """The model's tokenizer where a command reads text; a causal-LM directory saved without one (it compiles on
    token ids) exits 3 naming the files and ``why`` (generate's prompts, an evaluation's text)."""
    if model.tokenizer is None:
        from lowbit.models import missing_tokenizer

        fail(str(missing_tokenizer(model.spec, why)), Exit.NOT_FOUND)
    return model.tokenizer


def limit_heap_retention(threshold: int = 1 << 20) -> bool:
    """Have glibc map every allocation over ``threshold`` bytes on its own, so freeing it returns it to the system.

    Why: by default glibc raises its mmap threshold after the first large free (up to 32 MiB), and from then on
    freed tensors of a few MiB stay in the heap for reuse. A compile frees a float temporary per weight; on a
    model of 1.1 GB in bf16 that kept ~0.3 GB more resident than was live, enough to be killed where the model
    otherwise compiles and saves within less memory than its own size (``tools/bench_memory.py``). Returns whether
    the setting took (False off glibc).
    """
    import ctypes

    try:
        mallopt = getattr(ctypes.CDLL(None), "mallopt", None)  # the process's own symbols: libc's on Linux
    except OSError:
        return False
    if mallopt is None:
        return False
    m_mmap_threshold = -3  # glibc's M_MMAP_THRESHOLD; a fixed value also stops the dynamic adjustment
    return bool(mallopt(m_mmap_threshold, int(threshold)))


_MODELS: dict[str, LoadedModel] = {}
_GRAPHS: dict[str, Any] = {}
_STAMPS: dict[str, str] = {}
"""The files of each model path loaded (``source_stamp``), so a directory rewritten between two loads in one process
is loaded again (cached by the path string alone, the second load returned the first model)."""


def source_stamp(name: str) -> str | None:
    """Names, sizes and modification times of the files a model path holds (the file itself, or a directory's files),
    hashed; None where ``name`` is no path (``smollm2``)."""
    import hashlib

    path = Path(name).expanduser()
    if not path.exists():
        return None
    files = [path] if path.is_file() else sorted(f for f in path.iterdir() if f.is_file())
    digest = hashlib.sha256()
    for f in files:
        st = f.stat()
        digest.update(f"{f.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _forget_if_rewritten(spec: str) -> None:
    """Drop what is cached from model path ``spec`` (its slices, dtypes and captured graphs too) when its files changed
    since it was loaded."""
    from lowbit.models import SLICE

    m = SLICE.match(spec)
    name = m.group("name") if m and not Path(spec).exists() else spec
    stamp = source_stamp(name)
    if stamp is None:
        return
    if _STAMPS.get(name, stamp) != stamp:
        for cache in (_MODELS, _GRAPHS):
            for key in [k for k in cache if k == name or k.startswith((f"{name}@", f"{name}:"))]:
                del cache[key]
    _STAMPS[name] = stamp


DTYPES = ("float32", "bfloat16", "float16", "auto")
DTYPE_HELP = ("dtype the model is loaded in: float32 (default), bfloat16 or float16 (the triton backend's kernels "
              "take 16-bit activations: on a float32 model every op runs its reference), or auto: an HF directory's "
              "own (its weights stay memory-mapped, no copy: a model larger than RAM compiles and saves)")
GENERATE_DTYPE_HELP = ("dtype the model is loaded and generates in: float32 (default), bfloat16 or float16 (the triton "
                       "backend's kernels take 16-bit activations: on a float32 model every op runs its reference), or "
                       "auto: an HF directory's own (its weights stay memory-mapped, no copy)")
DEBUG_DTYPE_HELP = ("dtype the model is loaded in, and so the dtype the float model and every pass's graph are "
                    "evaluated in: float32 (default), bfloat16, float16, or auto: an HF directory's own (its weights "
                    "stay memory-mapped, no copy)")


def advise_dtype(spec: str, writes: bool = False) -> None:
    """A note on stderr when ``spec`` is an HF directory of 16-bit weights loaded in float32 because no ``--dtype``
    was given: every weight is converted into a float32 copy in memory (twice the checkpoint, where ``--dtype auto``
    keeps the file's pages mapped) and, for a command that ``writes`` a model, the weights it does not quantize are
    written in float32, so an int4 checkpoint of a bf16 model could be larger than the model. Silent otherwise."""
    from lowbit.models import float32_copy

    found = float32_copy(spec)
    if found is None:
        return
    name, size = str(found[0]).removeprefix("torch."), found[1]
    copy = f" (about {2 * size / 2**20:.0f} MiB)" if size else ""
    written = ", and the weights left unquantized are written in float32" if writes else ""
    err_console.print(f"note: {spec} stores its weights in {name}, and without --dtype they are loaded in float32: a "
                      f"float32 copy of every weight in memory{copy}{written}. --dtype auto keeps them {name} and "
                      "memory-mapped (a model larger than RAM compiles); --dtype float32 keeps float32 without this "
                      "note", markup=False, highlight=False, soft_wrap=True)


def check_dtype(dtype: str) -> None:
    """``--dtype`` is one of ``DTYPES``, checked before any model is read."""
    if dtype not in DTYPES:
        fail(f"--dtype {dtype!r}: give one of {', '.join(DTYPES)}", Exit.USAGE)


def load(spec: str, dtype: str = "float32") -> LoadedModel:
    """Load ``spec`` (``smollm2``, ``minilm``, a path; ``NAME:N`` keeps the first N blocks) once per process, in
    ``dtype`` (``DTYPES``).

    ``smollm2:2`` is a real SmolLM2 cut to two decoder layers (final norm and lm_head kept): the debugging
    commands are exercised on it in seconds. Missing paths exit with code 3, bad specs with 2.
    """
    check_dtype(dtype)
    _forget_if_rewritten(spec)
    if dtype != "float32":  # cached (and captured) per dtype: the key carries it
        key = f"{spec}@{dtype}"
        if key not in _MODELS:
            import torch

            _MODELS[key] = _load(spec, "auto" if dtype == "auto" else getattr(torch, dtype), key)
        return _MODELS[key]
    if spec in _MODELS:
        return _MODELS[spec]
    return _load(spec, None, spec)


def _load(spec: str, torch_dtype: Any, key: str) -> LoadedModel:
    """``load``'s work: ``torch_dtype`` None is float32, cached under the bare spec (``key``)."""
    from lowbit.models import SLICE, load_model

    suffix = "" if torch_dtype is None else key[len(spec):]
    name, n_layers = spec, None
    m = SLICE.match(spec)
    if m and not Path(spec).exists():
        name, n_layers = m.group("name"), int(m.group("n"))
        if n_layers < 1:  # before loading the model (cut_layers says the same after)
            fail(f"model {spec!r}: the layer count after ':' must be at least 1", Exit.USAGE)
    base = _MODELS.get(name + suffix)
    if base is None:
        from lowbit.errors import CorruptFileError, UntrustedInputError
        from lowbit.ir.capture import CaptureError

        try:
            module, tokenizer, kind = load_model(name) if torch_dtype is None else load_model(name, torch_dtype)
        except (FileNotFoundError, CorruptFileError, UntrustedInputError) as exc:
            fail(str(exc), Exit.NOT_FOUND)
        except ValueError as exc:
            fail(str(exc), Exit.USAGE)
        except CaptureError as exc:  # refused by name when wrapped (dynamic RoPE): as `python -m lowbit` reports it
            fail(str(exc), Exit.PIPELINE)
        base = _MODELS[name + suffix] = LoadedModel(name + suffix, module, tokenizer, kind)
    if n_layers is None:
        return base
    from lowbit.models import cut_layers

    try:
        module = cut_layers(base.module, n_layers, spec)
    except ValueError as exc:
        fail(str(exc), Exit.USAGE)
    sliced = _MODELS[key] = LoadedModel(key, module, base.tokenizer, base.kind, n_layers)
    return sliced


def check_calibration(passes: list[Any], model: LoadedModel) -> None:
    """Every calibration text of ``passes`` holds the ``calib_n x calib_len`` tokens its pass asks for, in the
    model's tokenizer, and no calib_len passes the model's positions: checked once the model is loaded, before its
    capture and any float run (``compile`` and each ``debug`` command; the debug commands found it only when the pass
    ran, after the float reference). Exit 3 for an unreadable file, 2 for a text too short or windows too long."""
    from lowbit.api import model_positions
    from lowbit.passes.base import CalibrationOptions, PassError, PassFileError
    from lowbit.passes.manager import check_calibration_texts

    if model.tokenizer is None:  # a causal-LM directory saved without one: its text failed after the capture
        from lowbit.calibration.data import SMOLLM2_VOCAB

        config = getattr(getattr(model.module, "model", None), "config", None)
        for p in passes:
            o = p.options
            if isinstance(o, CalibrationOptions) and o.reads_calibration() and o.tokenizer is None and \
                    isinstance(o.calib, str) and not o.calib.endswith(".safetensors") and \
                    getattr(config, "vocab_size", None) != SMOLLM2_VOCAB:  # SmolLM2's is the default tokenizer
                text_tokenizer(model, f"pass {p.name} calibrates on the text {o.calib!r} (or give the pass token ids, "
                                      "calib=IDS.safetensors, or tokenizer=DIR)")
    try:
        check_calibration_texts(passes, model.tokenizer, positions=model_positions(model.module),
                                max_seq_length=getattr(model.module, "max_seq_length", None))
    except PassError as exc:
        fail(str(exc), Exit.NOT_FOUND if isinstance(exc, PassFileError) else Exit.USAGE)


def capture_model(model: LoadedModel) -> Any:
    """The model's captured IR (a fresh clone each call: passes mutate graphs in place)."""
    if model.spec not in _GRAPHS:
        from lowbit.api import _default_example
        from lowbit.ir.capture import CaptureError, capture, refuse_unrunnable

        example, dynamic = _default_example(model.module, model.tokenizer)
        try:
            graph = capture(model.module, example, dynamic)
            refuse_unrunnable(graph, model.module)
        except CaptureError as exc:  # the message names the module and what to try: no traceback
            fail(str(exc), Exit.PIPELINE)
        graph.meta["tokenizer"] = model.tokenizer
        from lowbit.api import describe_source

        graph.meta["source"] = describe_source(model.module, graph)
        _GRAPHS[model.spec] = graph
    return _GRAPHS[model.spec].clone()


# ---- pipelines ----------------------------------------------------------------------------------

def pipeline_text(pipeline: str | None, recipe: str | None, sets: list[str] | None = None,
                  generation: bool = False) -> str:
    """The pipeline text from ``--pipeline`` or ``--recipe``; errors name the closest recipe. ``sets``: ``--set
    KEY=VALUE`` overrides of the recipe's options (``lowbit.recipes.override_options``), written into the text.
    ``generation``: a recipe's generation pipeline, where it has one (``lowbit generate --recipe kv4``)."""
    if pipeline and recipe:
        fail("give either --pipeline or --recipe, not both", Exit.USAGE)
    if sets and not recipe:  # accepted and dropped otherwise
        fail("--set changes a recipe's options (--recipe w4a16-gptq --set group=128); with --pipeline write the "
             "options into the pipeline text", Exit.USAGE)
    if recipe:
        text = recipe_pipeline(recipe, generation)
        return _with_overrides(recipe, text, sets) if sets else text
    if not pipeline:
        fail("give --pipeline 'pass,pass(opt=value)' or --recipe NAME (see `lowbit passes`, `lowbit recipes`)",
             Exit.USAGE)
    return pipeline


def _with_overrides(recipe: str, text: str, sets: list[str]) -> str:
    """Recipe ``recipe``'s pipeline ``text`` with the ``--set KEY=VALUE`` overrides applied, as pipeline text (what
    the report, the reproducer and ``--print-ir`` show). A bad key or value exits 2, a missing file 3."""
    from lowbit.passes.base import PassError, PassFileError
    from lowbit.passes.manager import format_pipeline, parse_pipeline
    from lowbit.recipes import override_options

    overrides: dict[str, str] = {}
    for item in sets:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            fail(f"--set {item!r}: give OPTION=VALUE or PASS.OPTION=VALUE (e.g. --set group=128)", Exit.USAGE)
        if key.strip() in overrides:
            fail(f"--set {key.strip()} is given twice; give it once (the last would silently win)", Exit.USAGE)
        overrides[key.strip()] = value
    try:
        return format_pipeline(override_options(recipe, parse_pipeline(text), overrides))
    except PassError as exc:
        fail(str(exc), Exit.NOT_FOUND if isinstance(exc, PassFileError) else Exit.USAGE)


def recipes_module() -> Any | None:
    """``lowbit.recipes`` if it exists in this install, else None (recipes arrive with their own module)."""
    try:
        import lowbit.recipes as recipes
    except ModuleNotFoundError as exc:
        if exc.name == "lowbit.recipes":
            return None
        raise
    return recipes


def recipe_pipeline(name: str, generation: bool = False) -> str:
    """The pipeline text of recipe ``name`` (``generation``: its generation pipeline, where it has one); an unknown
    name or a recipe whose passes are missing exits 2."""
    from lowbit.passes.base import closest

    mod = recipes_module()
    if mod is None:
        fail(f"unknown recipe {name!r}: this install has no named recipes (lowbit.recipes is missing); "
             "give the passes with --pipeline", Exit.USAGE)
    known = sorted(getattr(mod, "RECIPES", {}))
    try:
        text = mod.get_recipe(name, generation=True) if generation else mod.get_recipe(name)
    except (KeyError, ValueError) as exc:
        message = str(exc).strip("'\"")
        if name not in known and "unknown recipe" not in message:
            message = f"unknown recipe {name!r}{closest(name, known)}; known: {', '.join(known) or 'none'}"
        fail(message + " (see `lowbit recipes`)", Exit.USAGE)
    return text if isinstance(text, str) else getattr(text, "pipeline", str(text))


def parse(text: str) -> list[Any]:
    """Parse pipeline text; a bad pass or option exits 2 with the parser's suggestion."""
    from lowbit.passes.base import PassError, PassFileError
    from lowbit.passes.manager import parse_pipeline

    try:
        return parse_pipeline(text)
    except PassFileError as exc:
        fail(str(exc), Exit.NOT_FOUND)
    except PassError as exc:
        fail(str(exc), Exit.USAGE)


# ---- artefacts read from disk -------------------------------------------------------------------

@contextlib.contextmanager
def artifact_errors(path: Path) -> Iterator[None]:
    """Turn what reading an artefact can refuse (corrupt file, invalid IR, an op or path lowbit will not run
    from a file) into exit 3 naming the file: the file cannot be read as what it claims to be."""
    from lowbit.checkpoint.files import CheckpointError
    from lowbit.errors import CorruptFileError, UntrustedInputError
    from lowbit.ir.parser import IRParseError, IRVersionError

    try:
        yield
    except IRVersionError as exc:
        fail(f"{str(path)!r}: {exc}", Exit.NOT_FOUND)
    except IRParseError as exc:
        fail(f"{str(path)!r} is not valid lowbit IR: {exc}", Exit.NOT_FOUND)
    except (CorruptFileError, UntrustedInputError, CheckpointError) as exc:
        fail(str(exc) if str(path) in str(exc) else f"{str(path)!r}: {exc}", Exit.NOT_FOUND)
    except OSError as exc:
        fail(f"{str(path)!r} cannot be read: {exc.strerror or exc}", Exit.NOT_FOUND)


# ---- output directories -------------------------------------------------------------------------

def existing_ancestor(path: Path) -> Path:
    """The nearest directory above ``path`` that exists: where an output that creates its parents is made."""
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    return parent


def check_output(path: Path | None, flag: str, *, directory: bool) -> None:
    """Fail now, before any model is loaded, if ``path`` cannot be written at the end of the command.

    A file where a directory is wanted (or the reverse) is a bad argument (exit 2); a parent that is not a
    directory, or one lowbit may not create entries in, is a file-system problem (exit 3). Writability is
    probed by creating and removing a temporary entry, the only test that holds for root, read-only mounts
    and ACLs alike.
    """
    if path is None:
        return
    p = Path(path).expanduser()
    if directory and p.exists() and not p.is_dir():
        fail(f"{flag} {str(p)!r} exists and is not a directory", Exit.USAGE)
    if not directory and p.is_dir():
        fail(f"{flag} {str(p)!r} is a directory; give a file path", Exit.USAGE)
    parent = existing_ancestor(p)
    if not parent.is_dir():
        fail(f"{flag} {str(p)!r} cannot be written: {str(parent)!r} is not a directory", Exit.NOT_FOUND)
    try:
        probe = tempfile.mkdtemp(prefix=".lowbit-probe.", dir=parent)
        os.rmdir(probe)
    except OSError as exc:
        fail(f"{flag} {str(p)!r} cannot be written in {str(parent)!r}: {exc.strerror or exc}", Exit.NOT_FOUND)
    if p.exists() and not os.access(p, os.W_OK):
        fail(f"{flag} {str(p)!r} exists and is not writable", Exit.NOT_FOUND)
    if directory:
        from lowbit.checkpoint.files import not_replaceable

        reason = not_replaceable(p)
        if reason is not None:
            fail(f"{flag} {str(p)!r}: {reason}", Exit.USAGE)


@contextlib.contextmanager
def atomic_output_dir(final: Path, force: bool = True) -> Iterator[Path]:
    """Yield a temporary sibling of ``final``; it becomes ``final`` only if the block finishes.

    A failed or interrupted command never leaves a half-written OUT: readers see the old directory or
    the complete new one. An existing ``final`` is replaced only after the new one is complete.
    """
    final = final.expanduser()
    if final.exists() and not final.is_dir():
        fail(f"output {str(final)!r} exists and is not a directory", Exit.USAGE)
    if final.exists() and not force:
        fail(f"output directory {str(final)!r} exists (pass --force to replace it)", Exit.USAGE)
    from lowbit.cache import replacing_dir

    with replacing_dir(final, finish=_public_modes) as tmp:
        yield tmp


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _public_modes(root: Path) -> None:
    """mkdtemp/mkstemp create owner-only entries; give outputs the modes a plain write would have."""
    mask = _umask()
    root.chmod(0o777 & ~mask)
    for p in root.rglob("*"):
        p.chmod((0o777 if p.is_dir() else 0o666) & ~mask)


def is_stdout(path: Path | None) -> bool:
    """Whether an output flag names ``-``: the standard output, as for most command-line tools (it wrote a file
    named '-')."""
    return path is not None and str(path) == "-"


def write_text_output(path: Path, text: str) -> None:
    """``text`` to the file ``path`` (``atomic_write_text``), or whole to the standard output for ``-``."""
    if is_stdout(path):
        sys.stdout.write(text)
        sys.stdout.flush()
    else:
        atomic_write_text(path, text)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary sibling, so readers never see half a file."""
    path = path.expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.chmod(name, 0o666 & ~_umask())
        os.replace(name, path)
    except BaseException:  # Ctrl-C or a full disk mid-write left '.sens.json.XXXX.tmp' beside the output
        with contextlib.suppress(OSError):
            os.unlink(name)
        raise


def worst_first(value: float | None, *, higher_is_worse: bool) -> tuple[int, float]:
    """A sort key that puts the worst value first, one rule for every ranking the debug commands show (compare's
    worst layer, its HTML report, sensitivity's units): a NaN (a poisoned output) is the worst there is, then an
    infinite error (SQNR -inf, damage +inf), then finite values from worst to best; an exact result (SQNR +inf, or
    None: JSON's form of it) last. ``min``/``sort`` over NaN alone is arbitrary."""
    if value is None:  # an identical output (infinite SQNR) stored as null
        value = -math.inf if higher_is_worse else math.inf
    if math.isnan(value):
        return (0, 0.0)
    return (1, -value if higher_is_worse else value)


def worst_layer(layers: dict[str, dict[str, float]]) -> tuple[str, dict[str, float]] | None:
    """The layer with the lowest SQNR (a NaN one first, ``worst_first``); None where every layer is identical to
    float (infinite SQNR): no layer is worse than another then, as the HTML report says ('-')."""
    changed = [kv for kv in layers.items() if kv[1]["sqnr_db"] not in (None, math.inf)]
    return min(changed, key=lambda kv: worst_first(kv[1]["sqnr_db"], higher_is_worse=False), default=None)


def check_eval_sizes(windows: int, seq_len: int, sentences: int) -> None:
    """The debug commands' input sizes, refused before the model loads (they failed after it, naming
    ``max_windows`` / ``n`` rather than the flag)."""
    for flag, value, least in (("--windows", windows, 1), ("--seq-len", seq_len, 2), ("--sentences", sentences, 1)):
        if value < least:
            fail(f"{flag} {value}: give at least {least}" + (" (one context token, one predicted)"
                                                             if flag == "--seq-len" else ""), Exit.USAGE)


def check_eval_flags_fit(model: str, given: set[str], dtype: str = "float32") -> None:
    """Refuse the input-size flags the model's kind does not read: ``--windows``/``--seq-len`` size a causal LM's
    WikiText-2 windows, ``--sentences`` an encoder's sentences; the others were silently ignored. ``given``: the
    flags on the command line (the model is loaded here, in the command's ``dtype``, once per process: the command
    reuses it)."""
    causal = ("--windows", "--seq-len")
    if not given:
        return
    loaded = load(model, dtype)
    wrong = [f for f in causal if f in given] if loaded.kind != "causal-lm" else \
        [f for f in ("--sentences",) if f in given]
    if wrong:
        what, use = (("an encoder", "--sentences N (sentences embedded)") if loaded.kind != "causal-lm" else
                     ("a causal LM", "--windows N and --seq-len L (WikiText-2 windows)"))
        fail(f"{' and '.join(wrong)} {'do' if len(wrong) > 1 else 'does'} not apply to {model!r}, {what}: it is "
             f"measured on {use}", Exit.USAGE)


def parse_percent_or_number(text: str) -> tuple[float, bool]:
    """``"5%"`` → (0.05, relative=True); ``"0.3"`` → (0.3, relative=False)."""
    import math

    t = text.strip()
    try:
        value, relative = (float(t[:-1]) / 100.0, True) if t.endswith("%") else (float(t), False)
    except ValueError:
        value, relative = math.nan, False
    if not math.isfinite(value):  # nan/inf passed float(): a nan threshold let every pass through as "ok"
        fail(f"--max-increase {text!r}: give a percentage like 5% or an absolute amount like 0.5", Exit.USAGE)
    return value, relative
