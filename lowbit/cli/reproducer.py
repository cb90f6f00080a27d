"""Crash reproducers (MLIR's ``--mlir-pass-pipeline-crash-reproducer``): save the IR a pass failed on, replay it.

A reproducer directory holds everything needed to re-run the failure without the model: the IR before the
failing pass (text + safetensors), the rest of the pipeline from that pass on, example inputs, the error and
the versions of lowbit, torch, transformers and Python. ``lowbit replay DIR`` re-runs it.
"""

from __future__ import annotations

import json
import platform
import re
import sys
from pathlib import Path
from typing import Any

import torch

from lowbit.checkpoint.files import REPRODUCER_COPIES
from lowbit.cli.common import Exit, atomic_output_dir, console, fail, quiet_progress

MANIFEST = "reproducer.json"
INVALID_INPUT = "the input IR is invalid"
"""How PassManager's error for an input that does not verify starts: the one failure a reproducer's IR may fail
the verifier for."""


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0], "platform": platform.platform(), "torch": torch.__version__}
    for pkg in ("lowbit", "transformers", "onnx", "onnxruntime", "pydantic"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def _example_inputs(graph: Any) -> dict[str, torch.Tensor]:
    """Inputs matching the graph's input types (symbolic dims at their capture hint) for a quick run check."""
    out = {}
    for v in graph.inputs:
        t = v.type
        shape = [d if isinstance(d, int) else (graph.symbols[d].hint if d in graph.symbols and
                                              graph.symbols[d].hint else 8) for d in t.shape]
        if t.dtype.is_floating_point:
            out[v.name] = torch.randn(shape, dtype=t.dtype, generator=torch.Generator().manual_seed(0))
        else:
            out[v.name] = torch.ones(shape, dtype=t.dtype)
    return out


FILES = REPRODUCER_COPIES
"""The reproducer's copies of the files its passes read (``calib=``, ``config=``, ``tokenizer=``)."""


def _copy_input_files(tmp: Path, passes: list[Any], first: int) -> list[Any]:
    """``passes`` with every file option pointing at a copy under ``tmp/files`` (a relative path): replay reads
    only the reproducer's own files, so ``calib=/home/me/text.txt`` is carried along instead of refused."""
    import copy
    import re
    import shutil

    out = []
    for i, p in enumerate(passes, start=first):
        files = p.options.input_files()
        if not files:
            out.append(p)
            continue
        update = {}
        for option, path in files:
            src = Path(path).expanduser()
            rel = f"{FILES}/{i}-{option}-{re.sub(r'[^A-Za-z0-9_.-]', '_', src.name) or option}"
            (tmp / FILES).mkdir(exist_ok=True)
            if src.is_dir():
                shutil.copytree(src, tmp / rel)
            else:
                shutil.copyfile(src, tmp / rel)
            update[option] = rel
        q = copy.copy(p)
        q.options = p.options.model_copy(update=update)  # no validation: it would read the relative path here
        out.append(q)
    return out


TOKENIZER = f"{FILES}/tokenizer"
"""Where a reproducer keeps the model's tokenizer, when a pass it replays calibrates with the graph's own."""


def _save_tokenizer(tmp: Path, graph: Any, passes: list[Any]) -> str | None:
    """Save the graph's tokenizer (``graph.meta["tokenizer"]``: the CLI's model's) when a pass to replay calibrates
    with it (a ``tokenizer`` option left unset); returns its relative path. Without it a reproducer of a model other
    than SmolLM2 failed on replay with "no tokenizer for this model", and replay called that "reproduced"."""
    from lowbit.passes.base import CalibrationOptions

    tokenizer = graph.meta.get("tokenizer")
    # a pass that tokenizes text with the graph's tokenizer: quantize(w=int4) has the options but calibrates nothing
    uses = any(isinstance(p.options, CalibrationOptions) and p.options.reads_calibration()
               and p.options.tokenizer is None and not isinstance(p.options.calib, torch.Tensor)
               and not str(p.options.calib).endswith(".safetensors") for p in passes)
    if tokenizer is None or not uses or not callable(getattr(tokenizer, "save_pretrained", None)):
        return None
    tokenizer.save_pretrained(str(tmp / TOKENIZER))
    return TOKENIZER


def _graph_meta(graph: Any) -> dict[str, Any]:
    """What of ``graph.meta`` a replay needs besides the tokenizer, as JSON: a step graph's ``generation`` (kv-cache
    requires it, calibration builds a step's inputs from it), the prune record (``pruned``) and whether the residual
    stream is rotated. Without them a replay of kv-cache failed with "requires a step graph", not as recorded."""
    from lowbit.checkpoint import GenerationMeta, PrunedMeta, validated_meta

    meta: dict[str, Any] = {}
    if graph.meta.get("generation") is not None:
        meta["generation"] = validated_meta(GenerationMeta, graph.meta["generation"], "graph.meta['generation']")
    if graph.meta.get("pruned"):
        meta["pruned"] = validated_meta(PrunedMeta, graph.meta["pruned"], "graph.meta['pruned']")
    if graph.meta.get("residual_rotated"):
        meta["residual_rotated"] = True
    return meta


def _restore_meta(directory: Path, manifest: dict[str, Any], graph: Any) -> None:
    """Put the manifest's ``meta`` back on the parsed graph, each part checked as a checkpoint's is (the manifest
    is someone else's file); a bad one exits 3 naming the field."""
    from lowbit.checkpoint import CheckpointError, PrunedMeta, generation_meta, validated_meta

    raw = manifest.get("meta", {})
    where = f"reproducer {str(directory)!r}: {MANIFEST}"
    try:
        if not isinstance(raw, dict):
            raise CheckpointError(f"{where} 'meta' is not a JSON object")
        unknown = sorted(set(raw) - {"generation", "pruned", "residual_rotated"})
        if unknown:
            raise CheckpointError(f"{where} 'meta' has unknown entries {unknown}")
        if raw.get("generation") is not None:
            graph.meta["generation"] = generation_meta(raw, graph, f"{where} 'meta")
        if raw.get("pruned") is not None:
            graph.meta["pruned"] = validated_meta(PrunedMeta, raw["pruned"], f"{where} 'meta.pruned'")
        if "residual_rotated" in raw:
            if not isinstance(raw["residual_rotated"], bool):
                raise CheckpointError(f"{where} 'meta.residual_rotated' is not true or false")
            graph.meta["residual_rotated"] = raw["residual_rotated"]
    except CheckpointError as exc:
        fail(str(exc), Exit.NOT_FOUND)


def _load_tokenizer(directory: Path, manifest: dict[str, Any]) -> Any:
    """The tokenizer a reproducer carries (``tokenizer`` in its manifest), read as a checkpoint's is (transformers'
    classes only, never the directory's code), from files inside the reproducer only; None without one."""
    from lowbit.checkpoint.files import CheckpointError, read_tokenizer
    from lowbit.errors import UntrustedInputError

    name = manifest.get("tokenizer")
    if name is None:
        return None
    try:
        where = confined(directory, name, "tokenizer")
        if not where.is_dir():
            fail(f"reproducer {str(directory)!r}: tokenizer directory {str(where)!r} ('tokenizer' in {MANIFEST}) "
                 "is missing", Exit.NOT_FOUND)
        for f in where.iterdir():  # the directory is inside; a file in it may still link out
            confined(directory, str(f.relative_to(directory.resolve())), "tokenizer file")
        return read_tokenizer(where)
    except (UntrustedInputError, CheckpointError) as exc:
        fail(str(exc), Exit.NOT_FOUND)


RUN_INPUTS = "run_inputs.pt"
"""The real inputs a graph that verified failed to run on (``debug compare``): replay runs the graph on them."""


def write_reproducer(directory: Path, graph_before: Any, passes: list[Any], start: int, error: str,
                     model_spec: str, run_inputs: tuple[torch.Tensor, ...] | None = None) -> None:
    """Write the reproducer for a failure of ``passes[start]`` on ``graph_before`` (atomically), with copies of
    the files the remaining passes read. ``run_inputs``: the pass succeeded and verified, but the graph it left
    failed to run on these inputs; they are saved, and replay runs the graph on them after the passes."""
    from lowbit.cli.artifacts import save_graph
    from lowbit.passes.manager import format_pipeline

    with atomic_output_dir(Path(directory)) as tmp:
        save_graph(graph_before, tmp, "before.lowbit", "before.safetensors")
        try:
            torch.save(_example_inputs(graph_before), tmp / "inputs.pt")
        except Exception:  # an input type the sampler cannot build: the reproducer still replays the passes
            pass
        # a graph that did not run: the failing pass alone, the passes after it never ran
        replayed = passes[start:start + 1] if run_inputs is not None else passes[start:]
        rest = format_pipeline(_copy_input_files(tmp, replayed, start))
        tokenizer = _save_tokenizer(tmp, graph_before, replayed)
        (tmp / "pipeline.txt").write_text(rest + "\n")
        (tmp / "error.txt").write_text(error + "\n")
        if run_inputs is not None:
            torch.save([t.detach().cpu() for t in run_inputs], tmp / RUN_INPUTS)
        manifest = {"model": model_spec, "full_pipeline": format_pipeline(passes), "failing_index": start,
                    "failing_pass": passes[start].spec() if start < len(passes) else None, "replay_pipeline": rest,
                    "ir": "before.lowbit", "params": "before.safetensors", "inputs": "inputs.pt",
                    **({"run_inputs": RUN_INPUTS} if run_inputs is not None else {}),
                    **({"tokenizer": tokenizer} if tokenizer else {}),
                    **({"meta": meta} if (meta := _graph_meta(graph_before)) else {}),
                    "versions": versions(), "error": error}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        (tmp / "README.md").write_text(
            f"# lowbit reproducer\n\n`{manifest['failing_pass']}` (pass #{start} of `{manifest['full_pipeline']}` "
            f"on `{model_spec}`) failed:\n\n```\n{error}\n```\n\nReplay with `lowbit replay {directory}`; the IR it "
            "failed on is `before.lowbit` (weights in `before.safetensors`).\n")


def confined(directory: Path, name: Any, what: str) -> Path:
    """``directory / name`` for a manifest entry, refused unless it stays inside ``directory``.

    A reproducer is a directory someone else wrote: its manifest must not point lowbit at ``../../etc/passwd``,
    an absolute path, or a symlink leading out of the directory.
    """
    from lowbit.checkpoint.files import unopenable
    from lowbit.errors import UntrustedInputError

    if not isinstance(name, str) or not name or "\x00" in name:
        raise UntrustedInputError(f"reproducer {str(directory)!r}: {what} entry {name!r} is not a file name")
    rel = Path(name)
    if rel.is_absolute() or ".." in rel.parts:
        raise UntrustedInputError(f"reproducer {str(directory)!r}: {what} path {name!r} leaves the reproducer "
                                  "directory (absolute or '..'); a reproducer only reads its own files")
    # a name past the system's length limit (the OSError came raw from replay's is_file()), a symlink loop
    # (resolve()'s RuntimeError): the question every listed name is asked (checkpoint.files.unopenable)
    why = unopenable(directory / rel)
    if why is not None:
        raise UntrustedInputError(f"reproducer {str(directory)!r}: {what} entry {name[:80]!r}"
                                  f"{'...' if len(name) > 80 else ''} is not a file name this system can open "
                                  f"({why})")
    root = directory.resolve()
    target = (directory / rel).resolve()
    if target != root and root not in target.parents:
        raise UntrustedInputError(f"reproducer {str(directory)!r}: {what} path {name!r} resolves to "
                                  f"{str(target)!r}, outside the reproducer directory (a symlink?)")
    return target


def load_manifest(directory: Path) -> dict[str, Any]:
    """The reproducer's manifest, checked: JSON object with the entries replay reads (exit 3 otherwise)."""
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        fail(f"{str(directory)!r} is not a reproducer directory (no {MANIFEST})", Exit.NOT_FOUND)
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        fail(f"{str(manifest_path)!r} is not valid JSON: {exc}", Exit.NOT_FOUND)
    if not isinstance(manifest, dict):
        fail(f"{str(manifest_path)!r} must hold a JSON object", Exit.NOT_FOUND)
    for key in ("ir", "params", "replay_pipeline"):
        if not isinstance(manifest.get(key), str):
            fail(f"{str(manifest_path)!r} has no {key!r} entry (a string)", Exit.NOT_FOUND)
    if not isinstance(manifest.get("versions", {}), dict):
        manifest["versions"] = {}
    return manifest


def _replay_passes(directory: Path, text: str) -> list[Any]:
    """The reproducer's ``replay_pipeline``, parsed without reading any file outside the directory: a reproducer
    reads only its own files (``files/...``, copied when it was written), and ``quantize(config=/path/secret.json)``
    read (and echoed) that file while its options were built. A file option elsewhere exits 3 naming it; a bad
    pass or option exits 2."""
    from lowbit.errors import UntrustedInputError
    from lowbit.passes.base import PassError
    from lowbit.passes.manager import parse_pipeline

    def own_file(name: str, option: str, path: str) -> str:
        where = f"pass {name}: option {option}={path!r}"
        if not isinstance(path, str) or Path(path).is_absolute() or ".." in Path(path).parts:
            raise UntrustedInputError(f"{where} names a path outside the reproducer; a pipeline read from an "
                                      "artefact may only use lowbit's shipped data (wikitext2-valid, smollm2, ...) "
                                      f"or the reproducer's own {FILES}/")
        return str(confined(directory, path, f"pass {name} option {option}"))

    try:
        return parse_pipeline(text, read_files=False, own_file=own_file)
    except UntrustedInputError as exc:
        fail(f"reproducer {str(directory)!r}: replay_pipeline {exc}; a reproducer only reads its own files",
             Exit.NOT_FOUND)
    except PassError as exc:
        fail(f"reproducer {str(directory)!r}: replay_pipeline: {exc}", Exit.USAGE)


def replay(directory: Path, verify_each: bool = True, progress: bool = True) -> None:
    """Parse the saved IR and run the saved pipeline; exit 4 if it fails again, 0 if it no longer does
    (``progress=False``: ``-q``, no calibration bars).

    Every path is checked to stay inside ``directory`` and the IR is parsed (ops and dimensions refused unless
    allowlisted) before anything runs.
    """
    from lowbit.cli.artifacts import read_graph
    from lowbit.errors import UntrustedInputError
    from lowbit.passes.manager import PassManager, PipelineError

    directory = Path(directory)
    manifest = load_manifest(directory)
    try:
        ir_file = confined(directory, manifest["ir"], "ir")
        params_file = confined(directory, manifest["params"], "params")
    except UntrustedInputError as exc:
        fail(str(exc), Exit.NOT_FOUND)
    if not ir_file.is_file():
        fail(f"reproducer {str(directory)!r}: IR file {str(ir_file)!r} is missing", Exit.NOT_FOUND)
    if not params_file.is_file():  # without weights every pass "reproduces" a failure on an IR with no tensors
        fail(f"reproducer {str(directory)!r}: weights file {str(params_file)!r} ('params' in {MANIFEST}) is missing",
             Exit.NOT_FOUND)
    from lowbit.cli.common import artifact_errors

    with artifact_errors(ir_file):
        graph = read_graph(ir_file, params_file)
    passes = _replay_passes(directory, manifest["replay_pipeline"])
    if not progress:
        quiet_progress(passes)
    tokenizer = _load_tokenizer(directory, manifest)
    if tokenizer is not None:
        graph.meta["tokenizer"] = tokenizer
    _restore_meta(directory, manifest, graph)
    versions = manifest.get("versions", {})
    console.print(f"replaying {manifest['replay_pipeline']!r} on {ir_file} "
                  f"({len(graph.nodes)} nodes); recorded with {versions.get('lowbit')} / torch "
                  f"{versions.get('torch')}", markup=False, soft_wrap=True)
    try:
        PassManager(passes, verify_each=verify_each).run(graph)
    except PipelineError as exc:
        if exc.record.index < 0 and not str(manifest.get("error", "")).startswith(INVALID_INPUT):
            # --reproducer saves the IR before the failing pass, which verified: this file was edited since
            fail(f"reproducer {str(directory)!r}: {str(ir_file)!r} does not verify, so it is not the IR the recorded "
                 f"failure happened on: {exc}", Exit.NOT_FOUND)
        recorded = _failure(str(manifest.get("error", "")))
        if recorded is not None and _failure(str(exc)) != recorded:
            # a failure is not the recorded one because it is a failure: replay without the model's tokenizer said
            # "reproduced: ... no tokenizer for this model" for a recorded "group=100 does not divide ..."
            fail(f"the pipeline fails again, but not as recorded: {exc}\n(recorded: {manifest['error']})",
                 Exit.PIPELINE)
        fail(f"reproduced: {exc}", Exit.PIPELINE)
    if manifest.get("run_inputs") is not None:
        _replay_run(directory, manifest, graph)
        return
    console.print("the pipeline now succeeds: the failure no longer reproduces", markup=False, soft_wrap=True)


def _replay_run(directory: Path, manifest: dict[str, Any], graph: Any) -> None:
    """The second half of a reproducer ``debug compare`` wrote for a graph that verified but did not run: run the
    graph the passes left on the saved inputs (exit 5 if it still fails, as compare did)."""
    from lowbit.cli.probes import EvalInputs, run_probe
    from lowbit.errors import UntrustedInputError

    try:
        where = confined(directory, manifest["run_inputs"], "run_inputs")
    except UntrustedInputError as exc:
        fail(str(exc), Exit.NOT_FOUND)
    try:
        args = torch.load(where, weights_only=True)  # tensors only: no pickled code runs
    except Exception as exc:
        fail(f"reproducer {str(directory)!r}: run_inputs file {str(where)!r} cannot be read: {exc}", Exit.NOT_FOUND)
    if not isinstance(args, list) or not args or not all(isinstance(t, torch.Tensor) for t in args):
        fail(f"reproducer {str(directory)!r}: run_inputs file {str(where)!r} does not hold a list of tensors",
             Exit.NOT_FOUND)
    try:
        run_probe(graph, EvalInputs("saved", tuple(args), "saved inputs"), with_layers=False)
    except Exception as exc:
        fail(f"reproduced: after {manifest['replay_pipeline']} the graph does not run on the saved inputs "
             f"({', '.join(str(list(t.shape)) for t in args)}): {type(exc).__name__}: {exc}", Exit.BACKEND)
    console.print("the pipeline now succeeds and its graph runs on the saved inputs: the failure no longer "
                  "reproduces", markup=False, soft_wrap=True)


_FAILED = re.compile(r"^pass .*? \(#\d+\) failed: ", re.S)


def _failure(message: str) -> str | None:
    """What a pass failure says past its ``pass SPEC (#i) failed:`` head (the index differs on replay, which starts
    at the failing pass), or None for a message of another form (nothing to compare it with)."""
    m = _FAILED.match(message.strip())
    return message.strip()[m.end():] if m else None
