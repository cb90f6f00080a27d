"""SHA-256 of files, in one place for every layer: checkpoint manifests (api) and the TensorRT engine cache
(backends) hash files alike, and neither layer may import the other's code."""

from __future__ import annotations

import hashlib
import os

__all__ = ["sha256_file"]

_BLOCK = 1 << 20
"""Bytes read at a time: a multi-GB safetensors shard or ONNX external-data file is never held whole in memory."""


def sha256_file(path: str | os.PathLike[str]) -> str:
    """The hex SHA-256 of the file at ``path``, read in blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_BLOCK), b""):
            h.update(block)
    return h.hexdigest()
