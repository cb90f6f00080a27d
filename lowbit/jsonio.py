"""JSON that every reader parses: lowbit's reports carry floats (losses, SQNRs) that can be NaN or infinite, which
Python's ``json`` writes as the bare tokens ``NaN``/``Infinity`` — not JSON, so ``jq``, JavaScript and strict
parsers refuse the file. They are written as ``null`` instead."""

from __future__ import annotations

import json
import math
from typing import Any

__all__ = ["dumps", "finite"]


def finite(x: Any) -> Any:
    """``x`` with every non-finite float (nested in dicts, lists, tuples) replaced by None."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [finite(v) for v in x]
    return x


def dumps(obj: Any, **kwargs: Any) -> str:
    """``json.dumps`` with non-finite floats as ``null`` (``default=`` conversions included)."""
    default = kwargs.pop("default", None)
    if default is not None:  # run the conversions first, so what they return is sanitised too
        obj = json.loads(json.dumps(obj, default=default))
    return json.dumps(finite(obj), allow_nan=False, **kwargs)
