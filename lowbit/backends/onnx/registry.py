"""The lowering table: IR op name → function that emits the ONNX nodes for it.

The table is data (``LOWERINGS``); adding an op is one decorated function in ``semantic.py``,
``aten.py`` or ``quant.py``. ``lowering(op, ...)`` registers the same function for several op names
(ATen overloads of one operation, say).
"""

from __future__ import annotations

from collections.abc import Callable

from lowbit.backends.onnx.context import LowerFn

LOWERINGS: dict[str, LowerFn] = {}


def lowering(*ops: str) -> Callable[[LowerFn], LowerFn]:
    def deco(fn: LowerFn) -> LowerFn:
        for op in ops:
            if op in LOWERINGS:
                raise ValueError(f"ONNX lowering for {op!r} registered twice")
            LOWERINGS[op] = fn
        return fn

    return deco
