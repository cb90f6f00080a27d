"""Every lowbit call into transformers' ``from_pretrained``: local files only, and never a directory's own code.

A directory's config.json or tokenizer_config.json can name Python files it ships (``auto_map``). With
``trust_remote_code`` left unset transformers *asks on stdin* whether to import them, so ``echo y | lowbit
inspect DIR`` ran the directory's code. Passing ``trust_remote_code=False`` makes transformers refuse without
asking; that refusal (a bare ValueError) becomes a `RemoteCodeError` naming the directory.
"""

from __future__ import annotations

import os
from typing import Any

from lowbit.errors import RemoteCodeError

LOCAL_ONLY: dict[str, bool] = {"local_files_only": True, "trust_remote_code": False}
"""The keywords every ``from_pretrained`` / ``from_config`` call of lowbit passes."""


def from_pretrained(auto_class: Any, directory: str | os.PathLike[str], **kwargs: Any) -> Any:
    """``auto_class.from_pretrained(directory, **kwargs)`` with `LOCAL_ONLY`; RemoteCodeError when the directory
    can only be loaded by running its own code."""
    try:
        return auto_class.from_pretrained(directory, **LOCAL_ONLY, **kwargs)
    except ValueError as exc:
        if "trust_remote_code" in str(exc):
            raise RemoteCodeError(directory) from None
        raise
