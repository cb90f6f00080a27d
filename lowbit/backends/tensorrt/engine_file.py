"""lowbit's TensorRT engine file: a small header (what the engine takes, a checksum) before the plan bytes.

A TensorRT plan is opaque, and ``deserialize_cuda_engine`` answers a damaged one with ``None`` and a log
line. lowbit writes ``LOWBIT-TRT`` + format version + JSON header length + JSON header + plan, where the
header records the plan's length and SHA-256, the TensorRT version that built it, input/output names and
the optimization profile. Loading checks all of that before TensorRT sees the bytes, so a truncated or
corrupted file is reported as such, on any machine (no TensorRT or GPU needed). Raw plans written by
other tools (``trtexec --saveEngine``) load too; only TensorRT can judge those.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lowbit.errors import LowbitError

MAGIC = b"LOWBIT-TRT"
FORMAT_VERSION = 1
_PREFIX = struct.Struct("<10sHQ")  # magic, format version, header length
VOCAB_KEY = "lowbit.vocab_size"
"""A step graph's logits width in the header's ``extra`` (beside ``lowbit.generation``), so ``generate()`` refuses a
stop token past it before any work; engines written before it lack it (their stop tokens are checked against the
first logits, after the prefill). In ``extra``, not a field: an older lowbit reads such a header too."""


class EngineFileError(LowbitError, ValueError):
    """A TensorRT engine file is missing, truncated, corrupted, or was built by another TensorRT version."""


@dataclass
class EngineHeader:
    """What lowbit records beside a plan: enough to call it and to detect damage."""

    plan_bytes: int
    plan_sha256: str
    tensorrt_version: str
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    profile: dict[str, list[list[int]]] = field(default_factory=dict)
    """Input name → [min, opt, max] shapes of the optimization profile."""
    strongly_typed: bool = True
    source: str = ""
    """The ONNX file the engine was built from, where it is kept (``export_engine(onnx_dir=...)``); empty when it
    was a temporary one."""
    lowbit_version: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def write_engine(path: str | os.PathLike[str], plan: bytes, header: EngineHeader) -> Path:
    """Write ``plan`` with its header; the header's length and checksum fields are filled in here."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    header.plan_bytes = len(plan)
    header.plan_sha256 = hashlib.sha256(plan).hexdigest()
    meta = json.dumps(asdict(header), sort_keys=True).encode()
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(_PREFIX.pack(MAGIC, FORMAT_VERSION, len(meta)))
        f.write(meta)
        f.write(plan)
    os.replace(tmp, path)
    return path


def read_engine(path: str | os.PathLike[str]) -> tuple[bytes, EngineHeader | None]:
    """The plan bytes and lowbit's header (None for a raw plan from another tool), integrity checked."""
    path = Path(path).expanduser()
    header, plan_start = _read_header(path)
    data = path.read_bytes()
    if header is None:
        return data, None
    plan = data[plan_start:]
    if len(plan) != header.plan_bytes:
        raise EngineFileError(f"{path} is truncated: the plan should be {header.plan_bytes} bytes, "
                              f"the file holds {len(plan)}")
    if hashlib.sha256(plan).hexdigest() != header.plan_sha256:
        raise EngineFileError(f"{path} is corrupted: the plan's SHA-256 does not match the one recorded at build")
    return plan, header


def read_engine_header(path: str | os.PathLike[str]) -> EngineHeader | None:
    """lowbit's header of an engine file (None for a raw plan) without reading or checking its plan: what a caller
    that only asks what the engine is needs (``read_engine`` reads and hashes the whole plan, gigabytes for a 7B)."""
    return _read_header(Path(path).expanduser())[0]


def _read_header(path: Path) -> tuple[EngineHeader | None, int]:
    """The header (None for a raw plan) and the offset where the plan starts, from the file's first bytes."""
    if not path.is_file():
        raise EngineFileError(f"no TensorRT engine file at {path}")
    size = path.stat().st_size
    if not size:
        raise EngineFileError(f"{path} is empty (0 bytes): the write was interrupted or the file truncated")
    with open(path, "rb") as f:
        prefix = f.read(_PREFIX.size)
        if not prefix.startswith(MAGIC):
            return None, 0
        if len(prefix) < _PREFIX.size:
            raise EngineFileError(f"{path} is truncated inside lowbit's engine header ({size} bytes)")
        _, version, meta_len = _PREFIX.unpack_from(prefix)
        if version > FORMAT_VERSION:
            raise EngineFileError(f"{path} uses lowbit engine format {version}; this lowbit reads up to "
                                  f"{FORMAT_VERSION}")
        meta_end = _PREFIX.size + meta_len
        if size < meta_end:
            raise EngineFileError(f"{path} is truncated: its header needs {meta_end} bytes, the file has {size}")
        meta = f.read(meta_len)
    try:
        header = EngineHeader(**json.loads(meta))
    except (ValueError, TypeError) as exc:
        raise EngineFileError(f"{path} has a corrupted header ({exc})") from exc
    return header, meta_end
