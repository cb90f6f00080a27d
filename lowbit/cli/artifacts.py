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

    (directory / ir_name).write_text(print_graph(graph))
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


def load_graph(path: Path) -> tuple[Any, bool]:
    """Parse a ``.lowbit`` file (or a directory holding ``model.lowbit``); returns (graph, has_weights).

    Weights come from ``params.safetensors`` beside the IR when present; without it the graph has types only.
    """
    from lowbit.ir.parser import parse_graph

    from lowbit.checkpoint.files import verify_manifest

    path = Path(path)
    if path.is_dir():
        path = path / IR_FILE
    verify_manifest(path.parent)  # a directory lowbit wrote: its files' SHA-256 first (no manifest: nothing to check)
    params_path = path.with_name(PARAMS_FILE)
    if path.name != IR_FILE:
        alt = path.with_suffix(".safetensors")
        params_path = alt if alt.is_file() else params_path
    params = None
    if params_path.is_file():
        from safetensors.torch import load_file

        params = load_file(str(params_path))
    return parse_graph(path.read_text(), params), params is not None
