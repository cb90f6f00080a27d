"""Head-pruned attention written at the config's head counts, the removed heads as zero weights.

Why: GPT-2, GPT-NeoX, StableLM, BERT, OPT, GPT-J and Falcon compute ``head_dim`` as ``hidden_size /
num_attention_heads`` and size q/k/v/o from ``hidden_size``; their config has no field for fewer heads of the same
width (nor Llama's for head counts that differ between layers), so a head-pruned model had no HF form. A head whose
value rows and output-projection columns are zero adds exactly nothing to the attention's output, whatever its
scores (q and k rows are zero too), so the model written with zero heads in place of the removed ones computes the
pruned model's logits in any loader; the checkpoint is as large as the unpruned model's attention (the MLP and
removed blocks stay cut).

The zero heads are appended after each kept part: a q, k or v linear gains rows (a ``[q | k | v]`` fused one in each
part, GPT-NeoX's head-interleaved one at its end), the output projection gains input columns. Grouped-query heads
stay matched: the kept groups keep their indices, the zero query heads read the zero kv heads. A quantized linear
gains codes that dequantize to 0 (its zero point, scale 1 for a new group); an output projection whose added columns
are not whole groups cannot be written so and is refused by name.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from lowbit.checkpoint.files import CheckpointError
from lowbit.checkpoint.graph_view import HFView, QuantWeight
from lowbit.ir.quant import get_qdtype

__all__ = ["HEAD_INTERLEAVED", "ZeroHeads", "head_interleaved", "pad_zero_heads", "zero_head_report"]

HEAD_INTERLEAVED = frozenset({"gpt_neox"})
"""Families whose fused q/k/v linear holds each head's q, k and v rows together (GPT-NeoX's ``query_key_value``,
viewed ``[.., heads, 3·head_dim]``): a zero head is ``3·head_dim`` rows at its end. Another fused one is
``[q | k | v]`` (GPT-2's ``c_attn``), padded in each part."""


def head_interleaved(config: Any) -> bool:
    """Whether ``config``'s fused q/k/v holds each head's q, k and v rows together: ``HEAD_INTERLEAVED``, a Falcon
    without multi_query (``[.., heads, 3, head_dim]``; a zero head appended at the end of the rows was a wrong model)
    and Falcon's grouped new_decoder_architecture (``[.., kv_heads, q_per_kv + 2, head_dim]``: a kv group's query
    heads, key and value together, so zero groups go at the end; padded as ``[q | k | v]`` it was a wrong model)."""
    if config.model_type == "falcon":
        return getattr(config, "new_decoder_architecture", False) or not getattr(config, "multi_query", True)
    return config.model_type in HEAD_INTERLEAVED


@dataclasses.dataclass(frozen=True)
class ZeroHeads:
    """What is padded: the kept ``[q heads, kv heads]`` per block (HF names), to the config's counts."""

    kept: dict[str, tuple[int, int]]
    q_heads: int
    kv_heads: int
    head_dim: int
    interleaved: bool

    def block(self, key: str) -> str | None:
        return next((b for b in self.kept if key.startswith(b + ".")), None)

    def parts(self, key: str, have: int, want: int) -> list[tuple[int, int]]:
        """``(kept size, written size)`` of each part of one head-sized dimension of ``key`` (rows of q/k/v, columns
        of the output projection), or a CheckpointError saying the sizes are none of those."""
        q, kv = self.kept[self.block(key) or ""]
        hd, big_q, big_kv = self.head_dim, self.q_heads, self.kv_heads
        if (have, want) in ((q * hd, big_q * hd), (kv * hd, big_kv * hd)):
            return [(have, want)]
        if (have, want) == ((q + 2 * kv) * hd, (big_q + 2 * big_kv) * hd):
            if self.interleaved:
                return [(have, want)]
            return [(q * hd, big_q * hd), (kv * hd, big_kv * hd), (kv * hd, big_kv * hd)]
        raise CheckpointError(f"{key!r} has {have} head channels where the config's {big_q} heads (kv {big_kv}) of "
                              f"{hd} make {want}; the pruned block keeps {q} heads (kv {kv}), which does not explain "
                              "that size: cannot write its removed heads as zero heads")


def _padded(t: torch.Tensor, dim: int, parts: list[tuple[int, int]], fill: torch.Tensor | float = 0) -> torch.Tensor:
    """``t`` with each part along ``dim`` followed by ``written - kept`` entries of ``fill`` (a scalar, or a tensor
    broadcast along ``dim``: an asymmetric row's zero point)."""
    pieces, start = [], 0
    for have, want in parts:
        piece = t.narrow(dim, start, have)
        shape = list(t.shape)
        shape[dim] = want - have
        raw = t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t  # fp8 0.0 is byte 0
        pad = (fill.to(raw.dtype).expand(shape) if isinstance(fill, torch.Tensor)
               else torch.full(shape, fill, dtype=raw.dtype))
        pieces += [piece, pad.view(t.dtype) if raw is not t else pad]
        start += have
    return torch.cat(pieces, dim)


def _padded_rows(qw: QuantWeight, parts: list[tuple[int, int]]) -> QuantWeight:
    """Rows (output channels) that dequantize to 0: code 0 and zero point 0, scale 1."""
    n = qw.shape[0]
    scale = _padded(qw.scale.reshape(n, -1), 0, parts, 1.0)
    zp = None if qw.zero_point is None else _padded(qw.zero_point.reshape(n, -1), 0, parts)
    if qw.group is None:
        scale, zp = scale.reshape(-1), None if zp is None else zp.reshape(-1)
    return dataclasses.replace(qw, stored=_padded(qw.codes, 0, parts), scale=scale, zero_point=zp, packed=False)


def _padded_columns(qw: QuantWeight, parts: list[tuple[int, int]], key: str) -> QuantWeight:
    """Input columns that dequantize to 0: the row's zero point as code in its one channel group, else whole new
    groups of code 0 and zero point 0, scale 1."""
    n = qw.shape[0]
    if qw.group is None:
        fill = torch.zeros(n, 1) if qw.zero_point is None else qw.zero_point.reshape(n, 1)
        return dataclasses.replace(qw, stored=_padded(qw.codes, 1, parts, fill), packed=False)
    g = qw.group
    if any(have % g or want % g for have, want in parts):
        raise CheckpointError(f"{key!r} is quantized in groups of {g} input channels, and the removed heads' "
                              f"{', '.join(str(w - h) for h, w in parts)} columns are not whole groups: their zero "
                              "heads cannot be written without requantizing; save with format='lowbit', or quantize "
                              "with a group that divides the heads' width")
    groups = [(h // g, w // g) for h, w in parts]
    zp = None if qw.zero_point is None else _padded(qw.zero_point.reshape(n, -1), 1, groups)
    return dataclasses.replace(qw, stored=_padded(qw.codes, 1, parts), scale=_padded(qw.scale.reshape(n, -1), 1,
                                                                                    groups, 1.0),
                               zero_point=zp, packed=False)


def pad_zero_heads(view: HFView, keys: dict[str, tuple[int, ...]], graph_keys: dict[str, tuple[int, ...]],
                   zero: ZeroHeads) -> None:
    """Pad ``view`` (made with the graph's shapes, ``graph_keys``, in HF's orientation) to the HF model's ``keys``
    with zero heads, in place."""
    for key, want in keys.items():
        have = graph_keys.get(key, want)
        if tuple(have) == tuple(want) or zero.block(key) is None:
            continue
        module, _, leaf = key.rpartition(".")
        differ = [d for d in range(len(want)) if have[d] != want[d]]
        if len(differ) != 1:
            raise CheckpointError(f"{key!r} is {tuple(have)} in the graph and {tuple(want)} in the HF model: more "
                                  "than one dimension differs, which no removed heads explain")
        dim = differ[0]
        parts = zero.parts(key, have[dim], want[dim])
        qw = view.quantized.get(module) if leaf == "weight" else None
        if qw is not None and qw.tile is not None:  # removed heads move rows / columns across tile edges
            raise CheckpointError(f"{key!r} has weight scales in {list(qw.tile)} tiles, and its zero heads would "
                                  "shift rows or columns across tiles without requantizing: save with format='lowbit'")
        if qw is not None:  # quantized codes are [out, in]; a Conv1D's HF weight [in, out] (GPT-2's, for GPTQ)
            rows = dim == (1 if module in view.conv1d else 0)
            view.quantized[module] = _padded_rows(qw, parts) if rows else _padded_columns(qw, parts, key)
        elif key in view.tensors:
            view.tensors[key] = _padded(view.tensors[key], dim, parts)


def zero_head_report(zero: ZeroHeads) -> dict[str, Any]:
    """What the save info (and so the manifest) records: each block's kept heads and the counts written."""
    return {"written_heads": [zero.q_heads, zero.kv_heads],
            "kept_heads": {b: list(v) for b, v in zero.kept.items()}}
