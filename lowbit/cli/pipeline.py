"""Running a pass pipeline from the command line: the one place a failing pass becomes an exit code.

``compile``, ``debug compare``, ``debug bisect`` and ``debug sensitivity`` all run pipelines through
``run_pipeline``; it lives apart from ``lowbit.cli.main`` (the commands) so those modules import it without
importing the command table that imports them.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

from lowbit.cli.common import Exit, fail
from lowbit.cli.reproducer import write_reproducer
from lowbit.ir.offload import OffloadError
from lowbit.passes.base import PassFileError
from lowbit.passes.manager import (
    ModelRefusedError,
    PassManager,
    PipelineError,
    PipelineReport,
    ScopeError,
    format_pipeline,
)

__all__ = ["run_pipeline"]


def run_pipeline(graph: Any, passes: list[Any], *, instruments: list[Any] = (), verify_each: bool = True,
                 measure_memory: bool = False, reproducer: Path | None = None, model_spec: str = "",
                 limit: int | None = None, takes_reproducer: bool = True,
                 ran_before: list[Any] = (), input_verified: bool = False) -> PipelineReport:
    """Run a PassManager; a failing pass exits 4 after saving a reproducer when asked. ``takes_reproducer``:
    whether the command running it has ``--reproducer`` (``debug bisect`` and ``sensitivity`` do not: their hint
    is the ``compile`` command that saves one, with the passes ``ran_before`` on this graph in front).
    ``input_verified``: ``graph`` is a clone of one the verifier passed, so it is not verified again before the
    passes (each pass's output still is)."""
    original = graph.clone() if reproducer is not None else None
    pm = PassManager(passes, verify_each=verify_each, instruments=list(instruments), limit=limit,
                     measure_memory=measure_memory, keep_before_failure=reproducer is not None,
                     verify_input=not input_verified)
    try:
        return pm.run(graph)
    except PipelineError as exc:
        msg = str(exc)
        if isinstance(exc.__cause__, PassFileError):  # a calibration file that cannot be read: no pass to replay
            fail(msg, Exit.NOT_FOUND)
        if isinstance(exc.__cause__, OffloadError):
            # the disk under the offload directory, not the pass: a replay keeps its weights in memory and would pass,
            # and a reproducer is the IR and weights again, written to the disk that just filled up. The error says
            # where to offload instead
            if reproducer is not None:
                msg += (f"\n(no reproducer written to {reproducer}: the pass failed writing weights to the offload "
                        "directory, which a replay does not use)")
            fail(msg, Exit.PIPELINE)
        if isinstance(exc, (ModelRefusedError, ScopeError)) and reproducer is None:
            # no pass ran: nothing to debug, the pipeline does not fit the model or names a module it does not have
            # ('rerun with --reproducer' sent users to replay the same refusal)
            fail(msg, Exit.PIPELINE)
        if reproducer is not None:
            before = exc.graph_before if exc.graph_before is not None else original
            start = max(exc.record.index, 0)
            write_reproducer(reproducer, before, passes, start, msg, model_spec)
            msg += f"\nreproducer written to {reproducer} (run `lowbit replay {reproducer}`)"
        elif exc.record.index >= 0 and takes_reproducer:
            msg += "\n(rerun with --reproducer DIR to save the IR before this pass and replay it)"
        elif exc.record.index >= 0:
            upto = format_pipeline([*ran_before, *passes[:exc.record.index + 1]])
            model = shlex.quote(model_spec or "MODEL")  # quoted as the pipeline: a path with a space
            msg += (f"\n(`lowbit compile {model} --pipeline {shlex.quote(upto)} --reproducer DIR` saves the IR "
                    "before this pass to replay it)")
        fail(msg, Exit.PIPELINE)
