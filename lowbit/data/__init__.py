"""Text shipped with lowbit, so evaluation and calibration need nothing outside the package.

Named texts are stored xz-compressed in this package and decompressed once into the user cache
(`lowbit.cache.cache_dir`); any other name is taken as a path to the user's own text file.
See README.md in this directory for where the texts come from and their licence.
"""

from __future__ import annotations

import hashlib
import lzma
import os
from importlib.resources import files
from pathlib import Path

from lowbit.cache import atomic_file, cache_dir
from lowbit.errors import CorruptFileError

__all__ = ["TEXTS", "text_path", "read_text"]

# name -> packaged xz file
TEXTS: dict[str, str] = {
    # WikiText-2 raw, test split, whole and byte-for-byte (CRLF line ends).
    "wikitext2-test": "wikitext2_test.raw.xz",
    # WikiText-2 (tokenized, <unk>) validation split, first ~250 KB cut at a line end: calibration.
    "wikitext2-valid-calib": "wikitext2_valid_calib.txt.xz",
    # The same validation split whole (~4.5x the excerpt): training text for recovery after pruning.
    "wikitext2-valid": "wikitext2_valid.txt.xz",
}


def text_path(name_or_path: str | os.PathLike[str]) -> Path:
    """Path of a named shipped text (decompressed on first use) or of a user's non-empty text file."""
    name = str(name_or_path)
    if name in TEXTS:
        packed = files(__name__).joinpath(TEXTS[name]).read_bytes()
        # Keyed by the packed bytes so an upgraded lowbit never reads a stale decompressed copy.
        target = cache_dir("data", hashlib.sha256(packed).hexdigest()[:16]) / TEXTS[name].removesuffix(".xz")
        if not target.is_file():
            with atomic_file(target) as tmp:
                tmp.write_bytes(lzma.decompress(packed))
        return target

    path = Path(name).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"text {name!r}: no such file; give a path to a text file or one of {sorted(TEXTS)}"
        )
    if not path.is_file():
        raise ValueError(f"text {name!r} is not a file; give a path to a text file or one of {sorted(TEXTS)}")
    if path.stat().st_size == 0:
        raise CorruptFileError(path, "is empty: give a text file with some text in it")
    return path


def refuse_json_text(name_or_path: str | os.PathLike[str], what: str, files: str, effect: str,
                     instead: str = "") -> None:
    """A ``.json``/``.jsonl`` file given where lowbit reads plain text (calibration, perplexity): read as text, its
    records' syntax and keys (``{"text": "...", "id": 3}``) were what calibrated or was scored, without a word."""
    if str(name_or_path).lower().endswith((".jsonl", ".json")):
        raise ValueError(f"{what} {str(name_or_path)!r} is JSON: lowbit reads {files} as plain text, so it would "
                         f"{effect} the records' syntax and keys; write their text to a plain text file and give "
                         f"that{instead}")


def read_text(name_or_path: str | os.PathLike[str]) -> str:
    """The whole text, as is, except that line ends become "\\n" (Python's universal newlines).

    Reading in text mode is part of the evaluation protocol: the WikiText-2 token counts that
    lowbit checks (301,948 SmolLM2 tokens for the test split) are those of the "\\n" text.
    """
    path = text_path(name_or_path)
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:  # a binary file given as text: say so, not the codec's words
        raise CorruptFileError(path, f"is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset "
                               f"{exc.start}): give a text file") from None
