"""Small in-place IR rewrites that every layer needs: dead-code elimination, private parameter copies and a
norm's gain read and written through its stored form.

They live in the IR, not in ``lowbit.passes``, because capture and raising (``lowbit.ir``), scale migration
(``lowbit.calibration``) and the passes all call them, and a layer never imports one above it. The ``dce``
pass (``lowbit.passes.dce``) is a thin wrapper over ``eliminate_dead_code``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from lowbit.ir.graph import Graph, Node, Value

__all__ = ["ELEMENTWISE_PIECE_BYTES", "dead_nodes", "eliminate_dead_code", "float64_pieces", "gain_weight",
           "matvec_float64", "norm_gain", "private_weight", "rows_in_float64", "scaled_columns", "whole_in_float64"]

FLOAT64_PIECE_BYTES = 32 * 2**20
"""The float64 bytes of one piece of a weight that a pass rewrites in float64 (``scaled_columns``: fold-norms,
smoothing; ``rotate``): whole, a bf16 weight took 4x its size in float64 for its input and as much again for the
result (SmolLM2's 57 MiB embedding or head: 450 MiB at once)."""


ELEMENTWISE_PIECE_BYTES = 2**20
"""The float64 bytes of one piece of a weight scaled element by element (``scaled_columns``: fold-norms, smoothing):
such a product reads and writes memory three times (widen, scale, narrow) for one multiply an element, so a piece
that stays in the CPU cache took SmolLM2's 49152×576 head in 0.29-0.33 s where 32 MiB pieces took 0.51 s; a GEMM
piece keeps ``FLOAT64_PIECE_BYTES`` (its BLAS ran slower on 256-row pieces)."""


def whole_in_float64(t: torch.Tensor) -> bool:
    """Whether ``t`` in float64 fits one piece (``FLOAT64_PIECE_BYTES``, read now: tests shrink it)."""
    return t.numel() * 8 <= FLOAT64_PIECE_BYTES


def float64_pieces(n: int, row_bytes: int, align: int = 1, piece_bytes: int | None = None
                   ) -> Iterator[tuple[int, int]]:
    """Row ranges ``[start, stop)`` over ``n`` rows of ``row_bytes`` float64 bytes each, ``piece_bytes`` (default
    ``FLOAT64_PIECE_BYTES``) a piece (at least one row), each starting at a multiple of ``align`` rows."""
    most = FLOAT64_PIECE_BYTES if piece_bytes is None else piece_bytes
    step = max(align, most // max(1, row_bytes) // align * align)
    for start in range(0, n, step):
        yield start, min(n, start + step)


def dead_nodes(graph: Graph) -> tuple[set[int], set[int]]:
    """``(ids of the nodes no graph output depends on, ids of the values one does)``: one backward sweep (nodes are
    in topological order)."""
    live: set[int] = {id(v) for v in graph.outputs}
    dead: set[int] = set()
    for node in reversed(graph.nodes):
        if any(id(v) in live for v in node.outputs):
            live.update(id(v) for v in node.inputs())
        else:
            dead.add(id(node))
    return dead, live


def eliminate_dead_code(graph: Graph) -> tuple[int, int]:
    """Remove the nodes and params no graph output depends on; returns (nodes removed, params removed)."""
    dead, live = dead_nodes(graph)
    if dead:
        graph.remove_nodes(dead)
    unused = [name for name, v in graph.params.items() if id(v) not in live]
    for name in unused:
        graph.remove_param(name)
    return len(dead), len(unused)


def private_weight(graph: Graph, reader: Node, index: int, users: dict[int, list[Node]], base: str) -> Value:
    """The param at ``reader.args[index]``, copied under a fresh name (``base``) if any other node reads it.

    A rewrite that changes one reader's weight (folding a norm gain, migrating a scale) must not change the
    same tensor for its other readers (a tied embedding / lm_head, say).
    """
    w: Value = reader.args[index]
    if [n for n in users.get(id(w), []) if n is not reader]:
        w = graph.add_param(graph.fresh_param_name(base), w.data)
        args = list(reader.args)
        args[index] = w
        reader.args = tuple(args)
    return w


def norm_gain(norm: Node) -> torch.Tensor | None:
    """The gain an ``rms_norm`` / ``layer_norm`` multiplies by, in float64: its weight plus its ``offset``
    (Gemma stores ``w`` for a gain ``1 + w``); None when the norm has no weight (gain 1)."""
    w = norm.arg(1, "weight")
    if w is None:
        return None
    return w.data.to(torch.float64) + float(norm.kwargs.get("offset", 0.0))


def gain_weight(norm: Node, gain: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The weight that stores ``gain`` in ``norm``'s form (``gain - offset``), in ``dtype``."""
    offset = float(norm.kwargs.get("offset", 0.0))
    return (gain.to(torch.float64) - offset).to(dtype) if offset else gain.to(dtype)


def rows_in_float64(w: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor], dtype: torch.dtype,
                    align: int = 1, piece_bytes: int | None = None) -> torch.Tensor:
    """``fn(w in float64)`` stored in ``dtype``, computed ``float64_pieces`` of ``w``'s rows at a time where ``w`` is
    larger than one piece (``piece_bytes``, at most ``FLOAT64_PIECE_BYTES``): ``fn`` maps each group of ``align``
    rows on its own, so the pieces give the same bits. The result takes ``fn``'s row count from ``w`` and its other
    dims from the first piece (``fn`` may change the width: slice-residual's ``w @ Q``)."""
    most = FLOAT64_PIECE_BYTES if piece_bytes is None else min(piece_bytes, FLOAT64_PIECE_BYTES)
    if w.dim() < 2 or w.numel() * 8 <= most:
        return fn(w.to(torch.float64)).to(dtype)
    out = None
    for start, stop in float64_pieces(w.shape[0], 8 * w[0].numel(), align, most):
        piece = fn(w[start:stop].to(torch.float64))
        if out is None:
            out = torch.empty((w.shape[0], *piece.shape[1:]), dtype=dtype)
        out[start:stop] = piece
    assert out is not None
    return out


def scaled_columns(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``(w * scale[None, :])`` computed in float64 and stored in ``w``'s dtype (``rows_in_float64``). Each element
    is its own product, so the pieces give the same bits."""
    scale = scale.to(torch.float64)
    return rows_in_float64(w, lambda rows: rows * scale[None, :], w.dtype, piece_bytes=ELEMENTWISE_PIECE_BYTES)


def matvec_float64(w: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``w @ v`` in float64 (a LayerNorm's bias moved into the linear reading it: fold-norms), ``rows_in_float64``:
    whole, a weight took 4x its bf16 size in float64 at once. Each output is its own row's dot product."""
    v = v.to(torch.float64)
    return rows_in_float64(w, lambda rows: rows @ v, torch.float64)
