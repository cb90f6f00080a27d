"""The one base class of every error lowbit raises on purpose.

A caller (the CLI, a fuzz test, a service loading files from strangers) can tell "lowbit refused this input,
and the message says why" (``LowbitError``) from "lowbit has a bug" (anything else). Each concrete error also
derives from the builtin it has always been (``ValueError``, ``RuntimeError``, ...), so existing ``except``
clauses keep working.
"""

from __future__ import annotations


class LowbitError(Exception):
    """Base of lowbit's deliberate errors: the message names the file, node, op or option at fault."""


class UntrustedInputError(LowbitError, ValueError):
    """An artefact (IR text, reproducer, weights file) asks for something lowbit never does for a file:
    an op outside the registry and the ATen allowlist, a path outside its directory, an expression that
    is not a dimension."""


class CorruptFileError(LowbitError, ValueError):
    """A file exists but cannot be read as what it claims to be (truncated, wrong format, bad header);
    the message is the file's name followed by ``what`` ("is truncated ...", "has no weights")."""

    def __init__(self, path: object, what: str) -> None:
        self.path = str(path)
        super().__init__(f"{self.path!r} {what}")
