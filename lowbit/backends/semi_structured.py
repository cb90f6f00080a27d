"""2:4 weights as PyTorch semi-structured sparse tensors (cuSPARSELt or CUTLASS sparse tensor cores).

A float linear whose weight has the 2:4 pattern (every group of 4 consecutive weights along K holds at most 2
nonzeros: what ``sparsify(pattern=2:4)`` makes) can keep its weight as ``torch.sparse.SparseSemiStructuredTensor``:
half the values plus metadata, multiplied on the sparse tensor cores. That needs a CUDA device, an fp16/bf16
weight and the library's shape constraints (rows and columns multiples of 16 for cuSPARSELt, 32 x 64 for CUTLASS).
The pattern is read from the weight itself (a backend never imports a pass); the sparsify pass's
``node.meta["sparsity"]`` only adds nodes to check, so a weight that lost its pattern is reported too.

``plan_weight`` says which library takes a weight or why none does; ``apply_semi_structured`` rewrites the
buffers of a lowered FX module in place and returns the report the backends expose (every 2:4 weight kept
dense is named with its reason — never silent).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.fx

__all__ = ["SPARSE_DTYPES", "apply_semi_structured", "check_2to4", "is_2to4", "plan_weight", "to_semi_structured"]

SPARSE_DTYPES = (torch.float16, torch.bfloat16)
_MULTIPLE = {"cusparselt": (16, 16), "cutlass": (32, 64)}
"""(rows, cols) each dimension of the weight must be a positive multiple of, per library, fp16/bf16
(``torch.sparse.semi_structured``'s ``_DTYPE_SHAPE_CONSTRAINTS``)."""


def check_2to4(w: torch.Tensor) -> str | None:
    """None when ``w`` ([N, K]) has at most 2 nonzeros in every group of 4 along K; else why not."""
    if w.dim() != 2:
        return f"weight is {w.dim()}-D, not [N, K]"
    n, k = w.shape
    if k % 4:
        return f"K={k} is not a multiple of 4"
    if w.numel() == 0:
        return "empty weight"
    per_group = (w.reshape(n, k // 4, 4) != 0).sum(-1)
    worst = int(per_group.max())
    if worst > 2:
        bad = int((per_group > 2).sum())
        return f"{bad} of {per_group.numel()} groups of 4 along K hold more than 2 nonzeros (up to {worst})"
    return None


def is_2to4(w: torch.Tensor) -> bool:
    """Whether ``w`` has the 2:4 pattern along K (see ``check_2to4``)."""
    return check_2to4(w) is None


def cusparselt_available() -> bool:
    try:
        return bool(torch.backends.cusparselt.is_available())
    except (AttributeError, RuntimeError):
        return False


def plan_weight(w: torch.Tensor, device: torch.device | str | None, *, library: str = "auto"
                ) -> tuple[str | None, str]:
    """``(library, "")`` where the 2:4 weight ``w`` can become a semi-structured tensor on ``device``, else
    ``(None, reason)``. ``library``: ``cusparselt``, ``cutlass`` or ``auto`` (cuSPARSELt where it is built in,
    else CUTLASS). The pattern itself is not checked here (``check_2to4``)."""
    dev = torch.device(device) if device is not None else w.device
    if dev.type != "cuda":
        return None, "no CUDA" if not torch.cuda.is_available() else f"device {dev.type}, not cuda"
    if w.dtype not in SPARSE_DTYPES:
        return None, f"dtype {str(w.dtype).removeprefix('torch.')} (semi-structured takes fp16/bf16)"
    if library == "auto":
        library = "cusparselt" if cusparselt_available() else "cutlass"
    elif library == "cusparselt" and not cusparselt_available():
        return None, "this torch has no cuSPARSELt"
    if library not in _MULTIPLE:
        return None, f"unknown library {library!r}"
    if library == "cutlass" and torch.cuda.is_available() and torch.cuda.get_device_capability(dev)[0] != 8:
        # measured on the H200: torch's CUTLASS semi-structured kernels run on compute capability 8.x only
        return None, ("CUTLASS semi-structured needs compute capability 8.x, not "
                      f"{torch.cuda.get_device_capability(dev)}")
    rows, cols = _MULTIPLE[library]
    n, k = w.shape
    if n % rows or k % cols:
        return None, f"shape [N={n}, K={k}] ({library} needs N a multiple of {rows} and K of {cols})"
    return library, ""


def to_semi_structured(w: torch.Tensor, library: str) -> torch.Tensor:
    """The semi-structured tensor of a 2:4 CUDA fp16/bf16 weight, by the named library (no global flag)."""
    from torch.sparse import (
        SparseSemiStructuredTensorCUSPARSELT,
        SparseSemiStructuredTensorCUTLASS,
    )

    cls = SparseSemiStructuredTensorCUSPARSELT if library == "cusparselt" else SparseSemiStructuredTensorCUTLASS
    return cls.from_dense(w.contiguous())


def _linear_targets() -> set[Any]:
    from lowbit.ir.ops import resolve

    return {resolve("linear"), torch.ops.aten.linear.default}


def _dequantized(wn: Any) -> bool:
    from lowbit.ir.ops import resolve

    return isinstance(wn, torch.fx.Node) and wn.op == "call_function" and wn.target is resolve("dequantize")


def apply_semi_structured(gm: torch.fx.GraphModule, device: torch.device | str | None, *, enabled: bool = True,
                          library: str = "auto", marked: frozenset[str] = frozenset(),
                          labels: Mapping[str, str] | None = None) -> dict[str, dict[str, str]]:
    """Replace, in place, the weight buffer of every linear of ``gm`` whose weight is 2:4 by its semi-structured
    tensor where ``plan_weight`` allows; returns ``{"semi_structured": {linear: library}, "dense": {linear:
    reason}}``, each linear by its ``labels`` entry (its module path; FX names such as ``linear_12`` told a user
    nothing), else by its FX node name.

    ``marked``: FX node names the IR recorded as 2:4 (``node.meta["sparsity"]``, kept through quantize and
    fuse-qlinear); one whose weight is not 2:4 any more, or is quantized, is reported dense with the reason. A weight
    read by another node too is converted only if every reader is a linear (the buffer is shared)."""
    report: dict[str, dict[str, str]] = {"semi_structured": {}, "dense": {}}
    targets = _linear_targets()
    decided: dict[str, str | None] = {}  # buffer -> library or None (kept dense)
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target not in targets and node.name in marked:
            # a 2:4 linear quantized after sparsify (a fused qlinear): the sparse tensor cores take float weights
            report["dense"][node.name] = ("weight is quantized (a fused qlinear): semi-structured sparse tensors "
                                          "take float fp16/bf16 weights")
            continue
        if node.op != "call_function" or node.target not in targets or len(node.args) < 2:
            continue
        wn = node.args[1]
        if not (isinstance(wn, torch.fx.Node) and wn.op == "get_attr"):
            if node.name in marked:
                report["dense"][node.name] = ("weight is dequantized at each call (keep_packed=true), not a stored "
                                              "float parameter" if _dequantized(wn) else
                                              "weight is not a stored parameter")
            continue
        w = getattr(gm, wn.target)
        if not isinstance(w, torch.Tensor) or isinstance(w, torch.sparse.SparseSemiStructuredTensor):
            if decided.get(wn.target):
                report["semi_structured"][node.name] = str(decided[wn.target])
            continue
        if node.name not in marked and w.dim() == 2 and w.shape[1] % 4 == 0 and check_2to4(w[:1]) is not None:
            continue  # a dense weight: its first row already breaks the pattern (the cheap common case)
        why = check_2to4(w)
        if why is not None:
            if node.name in marked:
                report["dense"][node.name] = f"marked 2:4 but {why}"
            continue
        if not enabled:
            report["dense"][node.name] = "semi_structured=false"
            continue
        if any(u.op != "call_function" or u.target not in targets or u.args[1] is not wn for u in wn.users):
            report["dense"][node.name] = "weight buffer also read by a node that is not a linear"
            continue
        lib, why = plan_weight(w, device, library=library)
        if lib is None:
            report["dense"][node.name] = why
            decided[wn.target] = None
            continue
        try:
            sparse = to_semi_structured(w.to(device), lib)
        except (RuntimeError, NotImplementedError, ValueError) as exc:
            report["dense"][node.name] = f"{lib} refused: {str(exc).splitlines()[0][:200]}"
            continue
        setattr(gm, wn.target, sparse)
        decided[wn.target] = lib
        report["semi_structured"][node.name] = lib
    names = labels or {}
    return {kind: {names.get(node, f"%{node}"): v for node, v in entries.items()} for kind, entries in report.items()}


def report_lines(report: dict[str, dict[str, str]]) -> list[str]:
    """Human-readable lines of ``apply_semi_structured``'s report (empty when no weight is 2:4)."""
    sparse, dense = report.get("semi_structured", {}), report.get("dense", {})
    if not sparse and not dense:
        return []
    libs: dict[str, int] = {}
    for lib in sparse.values():
        libs[lib] = libs.get(lib, 0) + 1
    head = f"2:4 linears: {len(sparse)} semi-structured sparse"
    if libs:
        head += " (" + ", ".join(f"{k}: {v}" for k, v in sorted(libs.items())) + ")"
    head += f", {len(dense)} kept dense"
    return [head] + [f"  dense: {name}: {why}" for name, why in dense.items()]
