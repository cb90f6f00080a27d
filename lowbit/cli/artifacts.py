"""Reading and writing lowbit's on-disk graph form: ``model.lowbit`` (IR text) beside ``params.safetensors``.

The IR text is the same text golden tests compare, so an artefact can be read, diffed and re-parsed; weights
go to safetensors because they are large and binary. ``inspect``, ``graph`` and ``replay`` read this form.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

IR_FILE = "model.lowbit"
PARAMS_FILE = "params.safetensors"


def save_graph(graph: Any, directory: Path, ir_name: str = IR_FILE, params_name: str = PARAMS_FILE) -> None:
    """Write ``graph`` as IR text plus a safetensors file of its parameters into ``directory``.

    safetensors refuses tensors that share storage (SmolLM2's tied embedding/lm_head after a pass copied it),
    so a tensor whose storage was already written is cloned.
    """
    from safetensors.torch import save_file

    from lowbit.ir.printer import print_graph

    (directory / ir_name).write_text(print_graph(graph, version=True))
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, v in graph.params.items():
        if v.data is None:
            continue
        t = v.data.detach().cpu().contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen or t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        tensors[name] = t
    save_file(tensors, str(directory / params_name))


def load_params(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; a truncated or corrupt file raises ``CorruptFileError`` naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from lowbit.errors import CorruptFileError

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError, OverflowError) as exc:
        raise CorruptFileError(path, f"is not a readable safetensors file (truncated or corrupt?): "
                                     f"{type(exc).__name__}: {exc}") from exc


def read_graph(ir_path: Path, params_path: Path | None = None) -> Any:
    """Parse the IR text at ``ir_path`` with the weights of ``params_path`` (or types only when None).

    Raises ``CorruptFileError`` (unreadable text or weights, a tensor the IR does not declare, a non-finite
    scale) or ``IRParseError`` (not lowbit IR, or an op or dimension lowbit refuses to run from a file); nothing
    in the file runs before it has parsed. The verifier is the caller's (``inspect`` shows its errors).
    """
    from lowbit.errors import CorruptFileError
    from lowbit.ir.parser import parse_graph
    from lowbit.ir.verifier import check_fixed_sizes, check_stored, listed

    try:
        text = Path(ir_path).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise CorruptFileError(ir_path, f"is not UTF-8 text, so not lowbit IR ({exc})") from exc
    params = load_params(params_path) if params_path is not None else None
    graph = parse_graph(text, params)
    problems = check_stored(graph, params) if params is not None else []
    if problems:
        raise CorruptFileError(params_path, f"does not fit {str(ir_path)!r}: {listed(problems)}")
    fixed = check_fixed_sizes(graph) if params is not None else []  # types only: nothing is allocated
    if fixed:
        raise CorruptFileError(ir_path, f"declares values too large for the model it holds: {listed(fixed)}")
    return graph


def load_graph(path: Path) -> tuple[Any, bool]:
    """Parse a ``.lowbit`` file (or a directory holding ``model.lowbit``); returns (graph, has_weights).

    Weights come from ``params.safetensors`` beside the IR when present; without it the graph has types only.
    """
    from lowbit.checkpoint.files import check_format, check_inside, check_listed, verify_manifest

    path = Path(path)
    if path.is_dir():
        path = path / IR_FILE
    manifest = verify_manifest(path.parent)  # a directory lowbit wrote: its files' SHA-256 first (none: no check)
    if path.name == IR_FILE:  # the manifest's format as lowbit.load checks it
        check_format(path.parent, manifest, IR_FILE)
    if path.name == IR_FILE and manifest is None:  # a directory's own files; a manifest's check refuses such links
        check_inside(path.parent, IR_FILE, PARAMS_FILE)
    params_path = path.with_name(PARAMS_FILE)
    if path.name != IR_FILE:
        alt = path.with_suffix(".safetensors")
        params_path = alt if alt.is_file() else params_path
    has = params_path.is_file()
    if path.name == IR_FILE:  # a checkpoint's own files; a loose .lowbit beside a manifest is not one
        check_listed(path.parent, manifest, IR_FILE, *([PARAMS_FILE] if has else []))
    return read_graph(path, params_path if has else None), has
