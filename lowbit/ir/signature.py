"""Check a call's inputs against what a graph declares, before any backend runs it.

A captured graph states its inputs (``%input_ids: i64[s0,s1]``), the range each symbol was captured for
(``symbol s1 in [2, 8192]``) and, through its embedding nodes, how many rows an id may index. A call outside
that contract (3-D ids, an empty sequence, batch 0, an id past the vocabulary, float ids) would otherwise fail
deep inside attention with a message about some intermediate, or produce garbage; here it fails at the door
with a message naming the input. Every backend calls ``InputChecker`` so all of them accept and refuse the
same calls (integer ids of another width are converted, as ONNX Runtime's feeds always were).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from lowbit.errors import LowbitError
from lowbit.ir.graph import Graph, TensorType
from lowbit.ir.symexpr import eval_dim

_EMBEDDING_OPS = ("embedding", "aten.embedding.default")


class InputError(LowbitError, ValueError):
    """A call's input does not match the graph's declared input; the message names the input."""


_EXTRA_INPUT_HINTS = {
    "token_type_ids": (": a sentence encoder embeds one segment (token type 0), so drop token_type_ids, or tokenize "
                       "with the compiled model's own tokenizer (compiled.tokenizer), which does not return them"),
}
"""Why a call's extra input is not one the graph takes, for the names HF tokenizers return beside what a compiled
model reads: BERT's tokenizer output (model(**tokenizer(texts))) was refused with the bare 'unexpected inputs'."""


def ordered_inputs(names: Sequence[str], args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
    """A call's inputs in the model's order, from positions then names: an unknown name, an input given both ways
    (the name was silently ignored) and a missing one (a KeyError) are ``TypeError``s naming them, as a Python
    call's would be. Every runner binds its calls here."""
    names = list(names)
    if kwargs:
        extra = sorted(set(kwargs) - set(names))
        if extra:
            hint = _EXTRA_INPUT_HINTS.get(extra[0], "") if len(extra) == 1 else ""
            raise TypeError(f"unexpected inputs {extra}; the model takes {names}{hint}")
        twice = sorted(set(kwargs) & set(names[:len(args)]))
        if twice:
            raise TypeError(f"inputs {twice} given both by position and by name")
        missing = [n for n in names[len(args):] if n not in kwargs]
        if missing:
            raise TypeError(f"missing inputs {missing}; the model takes {names}")
        args = tuple(args) + tuple(kwargs[n] for n in names[len(args):])
    if len(args) != len(names):
        raise TypeError(f"the model takes {len(names)} inputs ({', '.join(names)}), got {len(args)}")
    return args


_LITERALS = {"True": True, "False": False}


def _check_constant(name: str, t: Any, a: Any) -> None:
    """A Python bool or number given at capture (``interpolate_pos_encoding=True``) is traced as that constant: the
    graph computes with the value it saw whatever a call passes, so another value is refused, not ignored."""
    expr = getattr(t, "expr", None)
    if not isinstance(expr, str):
        return
    try:
        traced = _LITERALS[expr] if expr in _LITERALS else float(expr)
    except ValueError:  # a symbol (s0), not a literal
        return
    if isinstance(a, torch.Tensor) and a.numel() == 1:
        a = a.item()
    if not isinstance(a, (bool, int, float)) or isinstance(a, bool) != isinstance(traced, bool) or a != traced:
        raise InputError(f"input %{name} was {expr} at capture, and the graph computes with that value (torch.export "
                         f"fixes a Python {type(traced).__name__} it is given); got {a!r}: pass {expr}, or capture "
                         "again with the value you need")


def is_int_dtype(dtype: torch.dtype) -> bool:
    """An integer dtype (bool is not one): what token ids may be given as."""
    return not dtype.is_floating_point and not dtype.is_complex and dtype != torch.bool


class InputChecker:
    """The graph's input contract, computed once; ``__call__`` checks (and converts) one call's inputs."""

    def __init__(self, graph: Graph) -> None:
        vocab: dict[int, list[tuple[str, int]]] = {}
        index = {id(v): i for i, v in enumerate(graph.inputs)}
        for node in graph.nodes:
            if node.op not in _EMBEDDING_OPS or len(node.args) < 2:
                continue
            weight, ids = node.args[0], node.args[1]
            i = index.get(id(ids))
            rows = weight.type.shape[0] if isinstance(getattr(weight, "type", None), TensorType) else None
            if i is not None and isinstance(rows, int):
                vocab.setdefault(i, []).append((weight.name, rows))
        self._declare([v.name for v in graph.inputs], [v.type for v in graph.inputs],
                      {name: (s.min, s.max) for name, s in graph.symbols.items()}, vocab)
        cache = (graph.meta.get("generation") or {}).get("cache_inputs") or []
        names = [v.name for v in graph.inputs]
        if cache and names[1:3] == ["positions", cache[0]]:
            self.slots = (1, 2)

    @classmethod
    def declared(cls, names: Sequence[str], types: Sequence[Any], symbols: dict[str, tuple[int | None, int | None]],
                 vocab: dict[int, list[tuple[str, int]]] | None = None) -> InputChecker:
        """The contract of a graph known only by its declaration: an exported ONNX file's inputs, the symbol ranges
        its metadata records and the embedding tables its ids index."""
        checker = cls.__new__(cls)
        checker._declare(list(names), list(types), symbols, vocab or {})
        return checker

    def _declare(self, names: list[str], types: list[Any], symbols: dict[str, tuple[int | None, int | None]],
                 vocab: dict[int, list[tuple[str, int]]]) -> None:
        self.names = names
        self.types = types
        # torch.export reports 2 as the lower bound of a dim declared from 0 or 1 (it reasons about sizes 0 and 1
        # apart, "0/1 specialization"), yet the graph it traced runs at 1: accept 1, refuse only empty dims
        self.symbols = {name: (1 if lo is not None and lo <= 2 else lo, hi) for name, (lo, hi) in symbols.items()}
        self.vocab = vocab
        """input index -> (embedding weight name, rows) of every embedding that reads that input directly."""
        self.slots: tuple[int, int] | None = None
        """A step graph's (positions input, first cache input) indices: each position is a slot of that cache (dim
        2), written in place there; one past it crashed the process or wrote past the buffer on the Triton cache
        write kernels (``scatter_`` raised only on the CPU reference)."""

    def __call__(self, args: Sequence[Any]) -> tuple[Any, ...]:
        if len(args) != len(self.names):
            raise InputError(f"the graph takes {len(self.names)} input(s) ({', '.join(self.names)}), got {len(args)}")
        out: list[Any] = []
        bound: dict[str, tuple[int, str, int]] = {}
        for name, t, a in zip(self.names, self.types, args):
            if not isinstance(t, TensorType):
                _check_constant(name, t, a)
                out.append(a)
                continue
            where = f"input %{name} (declared {t})"
            if not isinstance(a, torch.Tensor):
                raise InputError(f"{where}: expected a tensor, got {type(a).__name__}")
            if a.device.type == "meta":  # was torch's "Tensor.item() cannot be called on meta tensors" further down
                raise InputError(f"{where}: is on the meta device, which holds shapes but no values: give a tensor "
                                 "with values, on 'cpu' or 'cuda'")
            if a.dim() != len(t.shape):
                raise InputError(f"{where}: expected {len(t.shape)} dims, got {a.dim()} (shape {tuple(a.shape)})")
            if a.dtype != t.dtype:
                if not (is_int_dtype(a.dtype) and is_int_dtype(t.dtype)):
                    raise InputError(f"{where}: expected dtype {t.dtype}, got {a.dtype}")
                if a.numel() and (int(a.min()) < torch.iinfo(t.dtype).min or int(a.max()) > torch.iinfo(t.dtype).max):
                    raise InputError(f"{where}: {a.dtype} values do not fit {t.dtype}")
                a = a.to(t.dtype)
            for i, (d, n) in enumerate(zip(t.shape, a.shape)):
                if isinstance(d, int):
                    if d != n:
                        # example inputs given without dynamic_shapes capture every size as it was: say how to
                        # make one vary (a ViT compiled on a batch of 2 refused a batch of 1 with no hint)
                        raise InputError(f"{where}: dim {i} is {n}, the graph takes exactly {d} (the size it was "
                                         "captured at; for a dim that varies, capture with dynamic_shapes=, e.g. "
                                         f"compile_model(model, example_inputs, dynamic_shapes={{{name!r}: "
                                         f"{{{i}: torch.export.Dim.AUTO}}}}))")
                elif d in self.symbols:
                    lo, hi = self.symbols[d]
                    if (lo is not None and n < lo) or (hi is not None and n > hi):
                        raise InputError(f"{where}: dim {i} ({d}) is {n}, outside the range "
                                         f"[{lo if lo is not None else '?'}, {hi if hi is not None else '?'}] the "
                                         "graph was captured for")
                    if d in bound and bound[d][0] != n:
                        raise InputError(f"{where}: dim {i} ({d}) is {n}, but input %{bound[d][1]} dim {bound[d][2]} "
                                         f"({d}) is {bound[d][0]}: they must be equal")
                    bound.setdefault(d, (n, name, i))
            out.append(a)
        values = {k: v[0] for k, v in bound.items()}
        for name, t, a in zip(self.names, self.types, out):
            if not isinstance(t, TensorType):
                continue
            for i, d in enumerate(t.shape):
                if isinstance(d, str) and d not in self.symbols:
                    want = eval_dim(d, values)
                    if want is not None and want != a.shape[i]:
                        raise InputError(f"input %{name} (declared {t}): dim {i} ({d}) is {a.shape[i]}, the other "
                                         f"inputs make it {want}")
        # ids against the vocabulary and positions against the cache read the values (one host sync for all): not
        # while a CUDA graph is being captured (the generator's decode step; its ids come from the model's own
        # logits), where a sync is an error
        capturing = torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
        read = [i for i in [*self.vocab, *(self.slots[:1] if self.slots is not None else ())]
                if out[i].numel() and not (capturing and out[i].is_cuda)]
        ranges = _value_ranges({i: out[i] for i in read})
        for i, embeddings in self.vocab.items():
            a = out[i]
            if i not in ranges:
                continue
            lo, hi = ranges[i]
            for weight, rows in embeddings:
                if lo < 0 or hi >= rows:
                    bad = lo if lo < 0 else hi
                    pos = tuple((a == bad).nonzero()[0].tolist())
                    raise InputError(f"input %{self.names[i]}: id {bad} at position {pos} is outside the "
                                     f"vocabulary of embedding @{weight} ({rows} rows: ids 0..{rows - 1})")
        if self.slots is not None:
            p, cache = out[self.slots[0]], out[self.slots[1]]
            n = cache.shape[2]
            if self.slots[0] in ranges:
                lo, hi = ranges[self.slots[0]]
                if lo < 0 or hi >= n:
                    bad = lo if lo < 0 else hi
                    pos = tuple((p == bad).nonzero()[0].tolist())
                    raise InputError(f"input %{self.names[self.slots[0]]}: position {bad} at {pos} is outside the "
                                     f"{n} slots of the cache input %{self.names[self.slots[1]]} (positions "
                                     f"0..{n - 1})")
        return tuple(out)


def _value_ranges(tensors: dict[int, torch.Tensor]) -> dict[int, tuple[int, int]]:
    """Each tensor's (min, max), read to the host in one copy. Why: the ids' min and max and the positions' were
    four reads a step call, each a host sync on a GPU."""
    if not tensors:
        return {}
    device = next(iter(tensors.values())).device
    values = torch.stack([m.to(device, torch.long) for t in tensors.values() for m in torch.aminmax(t)]).tolist()
    return {i: (values[2 * j], values[2 * j + 1]) for j, i in enumerate(tensors)}
