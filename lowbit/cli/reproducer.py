"""Crash reproducers (MLIR's ``--mlir-pass-pipeline-crash-reproducer``): save the IR a pass failed on, replay it.

A reproducer directory holds everything needed to re-run the failure without the model: the IR before the
failing pass (text + safetensors), the rest of the pipeline from that pass on, example inputs, the error and
the versions of lowbit, torch, transformers and Python. ``lowbit replay DIR`` re-runs it.
"""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path
from typing import Any

import torch

from lowbit.cli.common import Exit, atomic_output_dir, console, fail

MANIFEST = "reproducer.json"


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


def write_reproducer(directory: Path, graph_before: Any, passes: list[Any], start: int, error: str,
                     model_spec: str) -> None:
    """Write the reproducer for a failure of ``passes[start]`` on ``graph_before`` (atomically)."""
    from lowbit.cli.artifacts import save_graph
    from lowbit.passes.manager import format_pipeline

    with atomic_output_dir(Path(directory)) as tmp:
        save_graph(graph_before, tmp, "before.lowbit", "before.safetensors")
        try:
            torch.save(_example_inputs(graph_before), tmp / "inputs.pt")
        except Exception:  # an input type the sampler cannot build: the reproducer still replays the passes
            pass
        rest = format_pipeline(passes[start:])
        (tmp / "pipeline.txt").write_text(rest + "\n")
        (tmp / "error.txt").write_text(error + "\n")
        manifest = {"model": model_spec, "full_pipeline": format_pipeline(passes), "failing_index": start,
                    "failing_pass": passes[start].spec() if start < len(passes) else None, "replay_pipeline": rest,
                    "ir": "before.lowbit", "params": "before.safetensors", "inputs": "inputs.pt",
                    "versions": versions(), "error": error}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        (tmp / "README.md").write_text(
            f"# lowbit reproducer\n\n`{manifest['failing_pass']}` (pass #{start} of `{manifest['full_pipeline']}` "
            f"on `{model_spec}`) failed:\n\n```\n{error}\n```\n\nReplay with `lowbit replay {directory}`; the IR it "
            "failed on is `before.lowbit` (weights in `before.safetensors`).\n")


def replay(directory: Path, verify_each: bool = True) -> None:
    """Parse the saved IR and run the saved pipeline; exit 4 if it fails again, 0 if it no longer does."""
    from lowbit.cli.common import parse
    from lowbit.passes.manager import PassManager, PipelineError

    directory = Path(directory)
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        fail(f"{str(directory)!r} is not a reproducer directory (no {MANIFEST})", Exit.NOT_FOUND)
    manifest = json.loads(manifest_path.read_text())
    from lowbit.ir.parser import parse_graph

    params_file = directory / manifest["params"]
    params = None
    if params_file.is_file():
        from safetensors.torch import load_file

        params = load_file(str(params_file))
    graph = parse_graph((directory / manifest["ir"]).read_text(), params)
    passes = parse(manifest["replay_pipeline"])
    console.print(f"replaying {manifest['replay_pipeline']!r} on {directory / manifest['ir']} "
                  f"({len(graph.nodes)} nodes); recorded with {manifest['versions'].get('lowbit')} / torch "
                  f"{manifest['versions'].get('torch')}", markup=False)
    try:
        PassManager(passes, verify_each=verify_each).run(graph)
    except PipelineError as exc:
        fail(f"reproduced: {exc}", Exit.PIPELINE)
    console.print("the pipeline now succeeds: the failure no longer reproduces", markup=False)
