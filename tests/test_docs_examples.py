"""README's examples, run as written (on a 1- or 2-block SmolLM2 slice where they name the full model), so the docs
cannot drift from what lowbit does.

The Python blocks are read out of README.md and executed; the few edits that make them cheap (a model slice, fewer
windows and tokens) are a table here, each checked to apply, so a changed example fails here until the table follows.
Shell examples run through typer's CliRunner, in a temporary directory.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from typer.testing import CliRunner

import lowbit
from lowbit.cli.main import app

README = Path(__file__).resolve().parents[1] / "README.md"


def fenced_blocks(text: str, lang: str | None = None) -> list[str]:
    """The bodies of the ```-fenced blocks of ``text`` (only those tagged ``lang`` when given)."""
    blocks = re.findall(r"^```(\w*)\n(.*?)^```", text, flags=re.S | re.M)
    return [body for tag, body in blocks if lang is None or tag == lang]


def section(title: str) -> str:
    """README's text from the heading ``title`` to the next heading of the same or a higher level (a ``#`` line
    inside a fenced block is a comment, not a heading)."""
    lines = README.read_text(encoding="utf-8").splitlines(keepends=True)
    start, level, fenced = None, 0, False
    for i, line in enumerate(lines):
        if line.startswith("```"):
            fenced = not fenced
        m = None if fenced else re.match(r"(#+) (.*)\n", line)
        if m and start is None and m.group(2) == title:
            start, level = i + 1, len(m.group(1))
        elif m and start is not None and len(m.group(1)) <= level:
            return "".join(lines[start:i])
    assert start is not None, f"README.md has no heading {title!r}: update tests/test_docs_examples.py"
    return "".join(lines[start:])


def cheap(code: str, edits: list[tuple[str, str]]) -> str:
    """``code`` with each (old, new) edit applied; an edit that no longer matches is the docs having changed."""
    for old, new in edits:
        assert old in code, f"README example no longer has {old!r}: update the edits in tests/test_docs_examples.py"
        code = code.replace(old, new)
    return code


def invoke(line: str, code: int = 0) -> str:
    args = shlex.split(line)
    assert args[0] == "lowbit", line
    res = CliRunner().invoke(app, args[1:])
    if res.exit_code != code:
        if res.exception is not None and not isinstance(res.exception, SystemExit):
            raise res.exception
        raise AssertionError(f"`{line}` exited {res.exit_code} (wanted {code}):\n{res.output}")
    return res.output


PYTHON_EDITS = [
    ('"smollm2"', '"smollm2:1"'),  # both compile_model calls
    ("seq_len=512, max_windows=40", "seq_len=32, max_windows=1"),
    ("GenerationSpec(max_length=512)", "GenerationSpec(max_length=16)"),
    ('.input_ids], 32)', '.input_ids], 3)'),
]


def test_readme_python_examples_run_as_written(tmp_path, monkeypatch, capsys):
    """"Using it from Python" then "Checkpoints", in one namespace (the second block uses the first's ``compiled``):
    compile, report, perplexity, IR text, ONNX export, save, bit-exact reload, generation."""
    monkeypatch.chdir(tmp_path)
    (using,) = fenced_blocks(section("Using it from Python"), "python")
    # the section's first block (its subsections' blocks, "Models larger than the memory left", need other models)
    checkpoints = fenced_blocks(section("Checkpoints: serving runtimes, transformers, and lowbit's own reload"),
                                "python")[0]
    scope: dict = {}
    exec(compile(cheap(using, PYTHON_EDITS), "README.md:Using it from Python", "exec"), scope)
    # the first block saved and reloaded compressed-tensors already: this one takes the format its comment offers
    # (a compressed-tensors reload captures the model again, ~8 s)
    exec(compile(cheap(checkpoints, [('format="compressed-tensors")', 'format="lowbit")')]), "README.md:Checkpoints",
                 "exec"), scope)
    out = capsys.readouterr().out
    compiled, reloaded, model = scope["compiled"], scope["reloaded"], scope["model"]
    assert "quantize(w=int4,group=64,sym=false)" in out and "graph main(%input_ids" in out  # summary, then the IR
    assert (tmp_path / "smollm2-w4.onnx").is_file() and (tmp_path / "smollm2-w4" / "config.json").is_file()
    ids = compiled.tokenizer("The capital of France is", return_tensors="pt").input_ids
    want = compiled(ids)
    assert (reloaded(ids) == want).all() and (model(ids) == want).all()  # "bit-exact"
    # every format a comment offers instead ('or "lowbit"') saves this model: "gptq" was offered for w4a16-g64,
    # whose asymmetric weights GPTQ refuses
    offered = set(re.findall(r'or "([a-z-]+)"', using + checkpoints))
    assert offered and all(lowbit.save(compiled, tmp_path / f"alt-{fmt}", format=fmt).is_dir() for fmt in offered)
    gen_out = scope["out"]
    assert len(gen_out.tokens[0]) == 3 and gen_out.texts[0] in out and gen_out.decode_tokens_per_second > 0


def test_readme_cli_listing_runs(tmp_path, monkeypatch):
    """The command listing under "Debugging a pipeline": list passes and recipes, compile with the IR diff of one
    linear, inspect the output directory, draw its graph."""
    monkeypatch.chdir(tmp_path)
    (listing,) = [b for b in fenced_blocks(section("Debugging a pipeline"), "") if b.startswith("lowbit passes")]
    lines = [line.split("#")[0].strip() for line in listing.splitlines()]
    edits = [(" smollm2 ", " smollm2:1 "), (r"layers\.29\.mlp", r"layers\.0\.mlp")]
    outputs = [invoke(cheap(line, edits) if line.startswith("lowbit compile") else line) for line in lines]
    passes, recipes, compiled, inspected, drawn = outputs
    assert "`lowbit passes quantize` adds option docs" in listing
    quantize_docs = invoke("lowbit passes quantize")
    assert "fold-norms" in passes and "Regex searched in module paths" in quantize_docs and "w4a8-rtn" in recipes
    assert "+++ after quantize(" in compiled and "model.layers.0.mlp.down_proj" in compiled
    assert "pass timing" in compiled and (tmp_path / "out" / "model.lowbit").is_file()
    assert "quantized tensors" in inspected and "wrote" in drawn


def test_readme_reproducer_example_prints_what_readme_shows(tmp_path, monkeypatch):
    """"When a pass fails": the command (already on smollm2:2) exits 4 with README's error line, writes the listed
    reproducer files and no ``out/``; ``lowbit replay`` reproduces it and exits 4 too."""
    monkeypatch.chdir(tmp_path)
    (session,) = fenced_blocks(section("When a pass fails: `--reproducer DIR` and `lowbit replay DIR`"), "")
    commands = [line[2:] for line in session.splitlines() if line.startswith("$ ")]
    compile_line, ls_line, replay_line = commands
    shown = session.splitlines()
    error = shown[shown.index(f"$ {compile_line}") + 1]
    assert error.startswith("error: ")
    out = invoke(compile_line, code=4)
    assert error in out and "reproducer written to repro" in out and not (tmp_path / "out").exists()
    listed = shown[shown.index(f"$ {ls_line}") + 1].split()
    assert ls_line == "ls repro" and sorted(p.name for p in (tmp_path / "repro").iterdir()) == sorted(listed)
    replay = replay_line.split(";")[0].strip()
    out = invoke(replay, code=4)
    assert "error: reproduced: pass quantize(w=int4,group=128) (#0) failed" in out


def test_readme_exit_codes_match_the_cli_help():
    """README lists the exit codes as `lowbit --help` does: the same codes, in the same order, each one described."""
    readme = re.search(r"Exit codes \(also in `lowbit --help`\): (.*?)\n\n", README.read_text(encoding="utf-8"), re.S)
    assert readme, "README.md no longer lists the exit codes after 'Exit codes (also in `lowbit --help`)'"
    from lowbit.cli.common import EXIT_CODES_HELP

    codes = [re.findall(r"(?:^|; )(\d) ", " ".join(t.split())) for t in (readme.group(1),
                                                                       EXIT_CODES_HELP.removeprefix("Exit codes: "))]
    assert codes[0] == codes[1] == [str(i) for i in range(7)]


def test_the_public_names_readme_uses_exist():
    """``lowbit.X`` names the README's prose and examples use are exported (``lowbit.export.load`` included)."""
    used = set(re.findall(r"\blowbit\.([A-Za-z_]\w*)\(", README.read_text(encoding="utf-8")))
    assert {"compile_model", "save", "load", "export", "GenerationSpec"} <= used
    for name in sorted(used):
        assert callable(getattr(lowbit, name)), name
    assert callable(lowbit.export.load)


def test_public_functions_show_their_options_formats_and_errors():
    """``help(lowbit.save)`` is the reference a user reads: each public function's signature carries the keyword
    options the README gives it (``save``/``load`` were wrappers taking ``**kwargs``, ``export`` showed its
    ``__call__``'s), ``save``'s docstring names every format it writes (``"hf"`` was missing), and every one says
    what it raises."""
    import inspect

    from lowbit import checkpoint

    params = {name: inspect.signature(getattr(lowbit, name)).parameters
              for name in ("compile_model", "save", "load", "export")}
    assert {"overwrite", "config", "kind", "actorder"} <= set(params["save"])
    assert {"backend", "device", "generation", "backend_options"} <= set(params["load"])
    assert {"check", "external_data"} <= set(params["export"])
    for name in ("compile_model", "save", "load"):
        assert all(p.kind is not p.VAR_KEYWORD for p in params[name].values()), f"lowbit.{name} hides options in **"
    assert all(f'"{fmt}"' in lowbit.save.__doc__ for fmt in checkpoint.FORMATS)
    for fn in (lowbit.compile_model, lowbit.save, lowbit.load, lowbit.export.export):
        assert "Raises" in inspect.getdoc(fn), f"{fn.__qualname__}'s docstring does not say what it raises"


def test_main_job_help_shows_the_defaults_readme_gives(monkeypatch):
    """README describes ``python -m lowbit --help``'s flags and the main job's defaults (40 windows of 512 tokens,
    ``--save`` to ``lowbit-checkpoint``); the help named the flags but none of their defaults, so a user could not
    tell from it that a bare run writes a checkpoint into the current directory."""
    from lowbit.__main__ import DEFAULT_RECIPE, build_parser

    monkeypatch.setenv("COLUMNS", "400")  # argparse wraps at hyphens: 'lowbit-' / 'checkpoint'
    readme = README.read_text(encoding="utf-8")
    parser = build_parser()
    text = " ".join(parser.format_help().split())
    described = re.search(r"`python -m lowbit --help` takes (.*?)\n\n", readme, re.S)
    assert described, "README no longer describes `python -m lowbit --help`: update this test"
    flags = set(re.findall(r"`(--[\w-]+)", described.group(1)))
    assert flags and flags <= {a for action in parser._actions for a in action.option_strings}
    defaults = parser.parse_args([])
    assert f"--save DIR` (default `{defaults.save}`" in " ".join(described.group(1).split())
    assert f"({defaults.windows} windows of {defaults.seq_len} tokens" in readme
    for shown in (defaults.save, defaults.seq_len, defaults.windows, defaults.text, defaults.model, DEFAULT_RECIPE):
        assert f"default: {shown}" in text, shown


def test_readme_recipe_override_example_fits_the_model_it_names(smollm2):
    """README's ``overrides=`` example (and its ``--set`` twin) ran ``w4a16-gptq`` with ``group=128`` on SmolLM2,
    whose 576-wide projections 128 does not divide: the example failed in GPTQ after the AWQ search, on the model it
    names. Every ``group`` it sets must divide SmolLM2's linear input widths, and the two forms must agree."""
    from lowbit.recipes import recipe_passes

    text = " ".join(section("Using it from Python").split())
    m = re.search(r'compile_model\("smollm2", recipe="([\w-]+)", overrides=(\{.*?\})\)` \(CLI: `--recipe ([\w-]+) '
                  r'((?:--set \S+ ?)+)`', text)
    assert m, "README's overrides= example changed: update this test"
    recipe, overrides, cli_recipe = m.group(1), eval(m.group(2)), m.group(3)  # noqa: S307 (a dict literal of README)
    cli = dict(kv.split("=", 1) for kv in re.findall(r"--set (\S+)", m.group(4)))
    assert recipe == cli_recipe and {k: str(v) for k, v in overrides.items()} == cli
    config = smollm2[0].config
    widths = {config.hidden_size, config.intermediate_size}
    groups = [p.options.group for p in recipe_passes(recipe, overrides) if getattr(p.options, "group", None)]
    assert groups and all(w % g == 0 for g in groups for w in widths), (groups, widths)


def test_public_classes_document_every_public_method():
    """``help(lowbit.CompiledModel)`` and ``help(lowbit.CompileReport)`` (and the ``GenerationOutput`` that
    ``generate`` returns) are the reference for what a compile hands back: ``forward``, ``summary`` and ``to_dict``
    showed no text at all."""
    import inspect

    from lowbit.generate import GenerationOutput

    classes = [getattr(lowbit, n) for n in lowbit.__all__ if inspect.isclass(getattr(lowbit, n))] + [GenerationOutput]
    bare = [f"{cls.__name__}.{k}" for cls in classes for k, v in vars(cls).items()
            if not k.startswith("_") and (inspect.isfunction(v) or isinstance(v, property))
            and not (v.__doc__ or "").strip()]
    assert len(classes) >= 4 and not bare, bare
    assert all((getattr(lowbit, n).__doc__ or "").strip() for n in lowbit.__all__ if n != "__version__")


def test_public_dataclasses_name_every_field_in_their_docstring():
    """``help(lowbit.GenerationSpec)`` shows the class docstring, not the attribute docstrings under each field:
    ``logits``, which README tells users to set (``GenerationSpec(logits="all")``), was not in it."""
    import dataclasses

    for name in ("GenerationSpec",):
        cls = getattr(lowbit, name)
        missing = [f.name for f in dataclasses.fields(cls) if f"``{f.name}``" not in cls.__doc__]
        assert not missing, f"lowbit.{name}'s docstring does not name {missing}"


def test_public_functions_describe_every_option_they_take():
    """``help(lowbit.compile_model)`` is where a user reads what an option does: every option of the public functions
    is named in its docstring. compile_model said nothing of ``example_inputs``, ``dynamic_shapes`` (whose
    ``"auto"`` keeps every dim static once you give your own inputs), ``device``, ``verify`` or ``instruments``;
    ``load`` nothing of ``device``; ``export`` nothing of ``check``."""
    import inspect

    from lowbit.api import CompiledModel

    for fn in (lowbit.compile_model, lowbit.save, lowbit.load, lowbit.export.export, lowbit.export.load,
               CompiledModel.generate, lowbit.GenerationSpec):
        doc = inspect.getdoc(fn)
        params = list(inspect.signature(fn).parameters.values())
        options = [p.name for p in params if p.default is not p.empty]
        missing = [name for name in options if f"``{name}" not in doc]
        assert not missing, f"{fn.__qualname__}'s docstring does not describe {missing}"
