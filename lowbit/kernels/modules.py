"""``nn.Module`` faces of the ops: a linear layer that keeps its quantized weight packed and calls one kernel.

What a backend (or a benchmark) swaps in for ``nn.Linear``: the buffers are lowbit's stored form (weight-only: the
int32 decode layout ``weight_only.pack_words`` makes from it, same bytes, where K and the group allow), so the
module's memory is the quantized weight's (codes + scales + zero points), and ``forward`` is one custom-op call
that ``torch.compile`` and CUDA graphs see through.
"""

from __future__ import annotations

import torch


class QuantLinear(torch.nn.Module):
    """``y = qlinear(x)`` on packed weights: weight-only (``a_qdtype`` None) or with dynamic activation quant."""

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
                 bias: torch.Tensor | None, w_qdtype: str, w_group: int, a_qdtype: str | None = None,
                 a_group: int = 0) -> None:
        super().__init__()
        if a_qdtype is None:  # weight-only: the decode layout, as the triton backend lowers it (same bytes)
            from lowbit.kernels.weight_only import pack_words

            qweight, scale, zero_point = pack_words(qweight, scale, zero_point, w_qdtype, w_group)
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale)
        self.register_buffer("zero_point", zero_point)
        self.register_buffer("bias", bias)
        self.w_qdtype, self.w_group, self.a_qdtype, self.a_group = w_qdtype, w_group, a_qdtype, a_group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.a_qdtype is None:
            return torch.ops.lowbit.weight_only_linear(x, self.qweight, self.scale, self.zero_point, self.bias,
                                                       self.w_qdtype, self.w_group)
        return torch.ops.lowbit.a8_linear(x, self.qweight, self.scale, self.zero_point, self.bias, self.w_qdtype,
                                          self.w_group, self.a_qdtype, self.a_group)

    def extra_repr(self) -> str:
        a = f", a={self.a_qdtype}" + (f"/g{self.a_group}" if self.a_group else "") if self.a_qdtype else ""
        return f"w={self.w_qdtype}" + (f"/g{self.w_group}" if self.w_group else "/channel") + a
