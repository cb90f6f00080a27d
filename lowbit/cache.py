"""The user cache directory, and writes into it that are all-or-nothing.

Loading SmolLM2 from GGUF, decompressing shipped text and tokenizing a corpus each cost seconds to
tens of seconds; lowbit keeps the results under one directory so later runs and tests skip that
work. Every entry is written to a temporary sibling and renamed into place, so a run killed
half-way never leaves a cache entry that later runs would trust.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["cache_dir", "atomic_dir", "atomic_file"]


def cache_dir(*parts: str) -> Path:
    """`$LOWBIT_CACHE` (or `~/.cache/lowbit`) joined with `parts`, created if missing."""
    root = os.environ.get("LOWBIT_CACHE") or Path.home() / ".cache" / "lowbit"
    path = Path(root).expanduser().joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


STALE_SECONDS = 3600.0
"""A temporary sibling older than this is an interrupted save (no save takes an hour to write its files)."""


def clean_stale_temporaries(parent: Path, name: str, older_than: float = STALE_SECONDS) -> list[Path]:
    """Remove ``.NAME.*.tmp`` / ``.NAME.*.old`` directories in ``parent`` left by saves that were killed."""
    removed = []
    if not parent.is_dir():
        return removed
    now = time.time()
    for p in parent.glob(f".{name}.*"):
        if p.suffix not in (".tmp", ".old") or not p.is_dir():
            continue
        try:
            if now - p.stat().st_mtime < older_than:
                continue  # may belong to a save still running in another process
        except FileNotFoundError:
            continue
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed


@contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary directory beside `final`; rename it to `final` only if the block succeeds.

    If another process finished the same entry first, its copy is kept and ours is dropped:
    both were built from the same inputs.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(final.parent, final.name)  # left by a run that was killed while writing this entry
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        yield tmp
        try:
            tmp.rename(final)
        except OSError:
            if not final.is_dir():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def atomic_file(final: Path) -> Iterator[Path]:
    """Yield a temporary file path beside `final`; replace `final` with it only if the block succeeds."""
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def replacing_dir(final: Path, finish: Callable[[Path], None] | None = None) -> Iterator[Path]:
    """Yield a temporary sibling of ``final``; it becomes ``final`` only if the block finishes.

    Readers see the old directory or the complete new one, never a half-written one: an existing ``final`` is
    moved aside and removed only after the new one is in place. ``finish(tmp)`` runs just before the swap (file
    modes, say); temporaries of killed writers are cleaned first.
    """
    if final.is_symlink():  # replace what it points to: renaming the link itself swapped it for a directory
        final = final.resolve()
    final.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(final.parent, final.name)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        yield tmp
        if finish is not None:
            finish(tmp)
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".old", dir=final.parent))
            os.rmdir(old)
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
