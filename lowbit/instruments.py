"""Pipeline instruments that need more than the IR: running the graph on real inputs.

``PassManager`` (``lowbit.passes.manager``) calls instruments around every pass; the ones there only read the
IR. ``NumericCheck`` executes the graph, so it needs a backend, and the pass layer never imports a backend:
it lives here, at the API level, beside ``compile_model``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from lowbit.backends.torch_backend import TorchCompiled
from lowbit.ir.graph import Graph
from lowbit.passes.base import Pass
from lowbit.passes.manager import Instrument, PassRecord

__all__ = ["NumericCheck", "compare_outputs"]


def compare_outputs(ref: torch.Tensor, out: torch.Tensor) -> dict[str, float]:
    """Max/mean absolute error, SQNR (dB) and cosine similarity of ``out`` against ``ref``, in float64. An ``out``
    with fewer positions than ``ref`` (a ``last-logits`` graph) is compared with ``ref``'s last ones."""
    if out.dim() == ref.dim() >= 2 and out.shape[1] < ref.shape[1]:
        ref = ref[:, ref.shape[1] - out.shape[1]:]
    ref64, out64 = ref.detach().double().cpu(), out.detach().double().cpu()
    err = out64 - ref64
    sig = float(ref64.pow(2).mean())
    noise = float(err.pow(2).mean())
    sqnr = float("inf") if noise == 0 else 10 * torch.log10(torch.tensor(sig / noise)).item()
    cos = torch.nn.functional.cosine_similarity(ref64.flatten(), out64.flatten(), dim=0).item()
    return {"max_abs": float(err.abs().max()), "mean_abs": float(err.abs().mean()), "sqnr_db": sqnr, "cosine": cos}


class NumericCheck(Instrument):
    """Run the graph after every pass on real inputs and compare with the float model's outputs.

    Records max/mean abs error, SQNR (dB) and cosine in ``record.numeric`` (what ``lowbit debug compare`` and
    the bisector read), on the torch reference backend.
    """

    def __init__(self, inputs: Sequence[Any], reference: torch.Tensor, device: str | None = None) -> None:
        self.inputs, self.reference, self.device = list(inputs), reference, device

    def after_pass(self, record: PassRecord, p: Pass, graph: Graph) -> None:
        if record.skipped:
            return
        out = TorchCompiled(graph, self.device)(*self.inputs)
        record.numeric = compare_outputs(self.reference, out)
