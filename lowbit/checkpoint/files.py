"""Checkpoint files: all-or-nothing directory writes, a SHA-256 manifest, and safetensors reads that name what broke.

A checkpoint is written into a hidden temporary sibling (``.NAME.<random>.tmp``) and renamed into place only when
every file is complete, so an interrupted save never leaves a directory that looks finished; temporaries left by
a killed process are removed by the next save into the same parent. Every file's SHA-256 goes into
``lowbit-manifest.json`` with the versions that wrote it; ``load`` verifies the hashes before reading a tensor.
Weights are read with safetensors only (no pickle); a truncated or corrupt file, or a missing tensor, is a
``CheckpointError`` naming the file and the tensor.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lowbit.cache import clean_stale_temporaries, replacing_dir
from lowbit.errors import LowbitError
from lowbit.hashing import sha256_file

__all__ = ["CheckpointError", "atomic_checkpoint_dir", "clean_stale_temporaries", "write_manifest",
           "verify_manifest", "check_format", "check_listed", "unopenable", "read_safetensors", "read_config",
           "read_tokenizer", "shareable_config", "write_safetensors", "MANIFEST", "FORMATS", "FORMAT_VERSION",
           "sha256_file", "not_replaceable", "NodeMeta", "NODE_META", "META_TEXT_MAX"]

MANIFEST = "lowbit-manifest.json"
FORMATS = ("compressed-tensors", "gptq", "hf", "lowbit")
"""The checkpoint formats lowbit writes (a manifest's ``format``)."""
FORMAT_VERSION = 1
"""The version of the directory lowbit writes (the manifest's ``format_version``): raise it when a change makes an
older lowbit misread a checkpoint. A manifest without one (written before it existed) is version 1."""


class CheckpointError(LowbitError, ValueError):
    """A checkpoint cannot be written or read; the message names the directory, file and tensor."""


LOWBIT_MARKERS = (MANIFEST, "reproducer.json", "model.lowbit")
"""Files only lowbit's outputs hold (checkpoints and compile -o, reproducers, IR artefacts)."""
REPRODUCER_FILES = ("reproducer.json", "README.md", "before.lowbit", "before.safetensors", "inputs.pt", "pipeline.txt",
                    "error.txt")
"""What ``lowbit.cli.reproducer.write_reproducer`` writes."""
REPRODUCER_COPIES = "files"
"""The reproducer's folder of copies of the files its passes read (``lowbit.cli.reproducer.FILES``)."""


def not_replaceable(final: Path) -> str | None:
    """Why the existing directory ``final`` must not be replaced by an output, or None when it may be: it is empty
    or one lowbit wrote. Replacing removes the old directory whole: ``-o`` naming the model's own directory (or
    any directory of other files) deleted them, and ``-o .`` crashed renaming the working directory."""
    final = Path(final).expanduser()
    if not final.is_dir():
        return None
    if final.resolve() == Path.cwd().resolve() or final.resolve() in Path.cwd().resolve().parents:
        return "it is the working directory (or holds it): give a directory below it"
    names = sorted(p.name for p in final.iterdir())
    if not names:
        return None
    if not any(m in names for m in LOWBIT_MARKERS):
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        return (f"it holds files lowbit did not write ({shown}; no {MANIFEST}) and replacing it would delete "
                "them: give a new or empty directory")
    foreign = sorted(set(_files_below(final)) - _lowbit_files(final))
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        return (f"it is a lowbit output that also holds files lowbit did not write there ({shown}), and replacing "
                "it would delete them: move them out, or give another directory")
    return None


def _files_below(directory: Path) -> list[str]:
    return [p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file() or p.is_symlink()]


def _lowbit_files(directory: Path) -> set[str]:
    """The files a lowbit output directory's own records name: its manifest's list (plus the manifest), a
    reproducer's fixed set. A directory whose records cannot be read names none, so nothing in it is taken for
    lowbit's."""
    names: set[str] = set()
    try:
        if (directory / MANIFEST).is_file():
            names |= {MANIFEST, *json.loads((directory / MANIFEST).read_text()).get("files", {})}
        if (directory / "reproducer.json").is_file():
            # and its copies of the files its passes read (calib=, tokenizer): a reproducer holding one could not be
            # written over by the next failing run ("files lowbit did not write there: files/1-calib-text.txt")
            copies = {f for f in _files_below(directory) if f.startswith(f"{REPRODUCER_COPIES}/")}
            names |= set(REPRODUCER_FILES) | copies
        elif (directory / "model.lowbit").is_file() and not (directory / MANIFEST).is_file():
            names |= set(_files_below(directory))  # an IR written before manifests existed: as it was accepted
    except (OSError, ValueError, AttributeError, TypeError):
        return set()
    return names


@contextmanager
def atomic_checkpoint_dir(final: Path, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary sibling of ``final``; it replaces ``final`` only if the block finishes."""
    final = Path(final).expanduser()
    if final.exists() and not final.is_dir():
        raise CheckpointError(f"cannot save to {str(final)!r}: it exists and is not a directory")
    if final.exists() and not overwrite:
        raise CheckpointError(f"cannot save to {str(final)!r}: the directory exists (pass overwrite=True)")
    reason = not_replaceable(final)
    if reason is not None:
        raise CheckpointError(f"cannot save to {str(final)!r}: {reason}")
    with ExitStack() as stack:
        try:  # the parent directory and the temporary beside it: an OSError there names lowbit's hidden temp path
            tmp = stack.enter_context(replacing_dir(final))
        except OSError as exc:
            raise CheckpointError(f"cannot save to {str(final)!r}: {exc.strerror or exc} (creating it or a "
                                  f"temporary directory in {str(final.parent)!r})") from None
        yield tmp


def _versions() -> dict[str, str]:
    from lowbit.version import __version__

    out = {"lowbit": __version__, "torch": torch.__version__}
    for mod in ("transformers", "safetensors", "compressed_tensors"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - optional packages
            pass
    return out


def write_manifest(directory: Path, fmt: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Hash every file in ``directory`` (recursively) into ``lowbit-manifest.json``."""
    files = {}
    for p in sorted(directory.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            files[p.relative_to(directory).as_posix()] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
    manifest = {"format": fmt, "format_version": FORMAT_VERSION, "versions": _versions(), "files": files,
                **(extra or {})}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
    except RecursionError:  # a crafted file of nested brackets: json's recursion, not a lowbit bug
        raise CheckpointError(f"{path}: JSON nested too deeply to be a checkpoint file") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


class FileRecord(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    sha256: str
    bytes: int = Field(ge=0)


META_TEXT_MAX = 200
"""The longest node meta text a manifest may hold (a scheme or an op name is a few dozen characters)."""
_MetaText = Annotated[str, Field(max_length=META_TEXT_MAX)]


class NodeMeta(BaseModel):
    """A node's meta that the IR text does not print and a lowbit checkpoint keeps in its manifest (``node_meta``,
    by node name): what reports read, never numerics. ``qscheme``: the scheme a QDQ pair stands for;
    ``qscheme_weight``: a linear's weight scheme; ``raised_from``: the ATen op a semantic node was raised from;
    ``kv``: a KV cache dequantize's role (``key``/``value``)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    qscheme: _MetaText | None = None
    qscheme_weight: _MetaText | None = None
    raised_from: _MetaText | None = None
    kv: Literal["key", "value"] | None = None


NODE_META = tuple(NodeMeta.model_fields)
"""The node meta keys a lowbit checkpoint keeps (``NodeMeta``)."""


class CaptureInfo(BaseModel):
    """What the capture of the graph measured (``graph.meta``: ``lowbit.ir.capture``), kept so a reloaded model's
    report says what it was captured from as the compile's did: the model class, the ATen nodes torch.export gave,
    the counts of the raising rules and the export/convert seconds. Figures only, never numerics."""

    model_config = ConfigDict(extra="forbid", strict=True)
    model_class: _MetaText | None = None
    aten_nodes: int | None = Field(default=None, ge=0)
    export_seconds: float | None = Field(default=None, ge=0)
    convert_seconds: float | None = Field(default=None, ge=0)
    raise_stats: Annotated[dict[_MetaText, Annotated[int, Field(ge=0)]], Field(max_length=10_000)] = {}


CAPTURE_META = tuple(CaptureInfo.model_fields)
"""The capture figures in ``graph.meta`` a lowbit checkpoint keeps (``CaptureInfo``)."""


class LowbitInfo(BaseModel):
    """The manifest's ``lowbit`` table: only what every reader relies on is checked here (its ``generation`` and
    ``pruned`` entries are validated field by field where they are used)."""

    model_config = ConfigDict(extra="allow", strict=True)
    kind: Literal["causal-lm", "encoder"] | None = None
    max_seq_length: int | None = Field(default=None, ge=1)
    not_in_graph: list[str] = []
    """HF tensors the save did not write (never read by the captured forward, no copy of the source's): the HF
    loader excuses them; transformers initialises them at random."""
    copied_from_source: list[str] = []
    """HF tensors the captured forward never reads (BERT's pooler), written as the source model had them."""
    lowbit_qdtypes: dict[str, str] = {}
    residual_rotated: bool = False
    """``graph.meta["residual_rotated"]`` (``rotate`` rotated the residual stream; ``debug compare`` and the report
    read it)."""
    node_meta: dict[str, NodeMeta] = {}
    capture: CaptureInfo | None = None
    actorder: Literal["static", "weight"] | None = None
    """``graph.meta["actorder"]`` (gptq with act-order: what a compressed-tensors save of the reload records)."""


class Manifest(BaseModel):
    """``lowbit-manifest.json``'s structure, checked before any entry is used: a crafted ``"lowbit": []`` or
    ``"files": {"model.lowbit": "abc"}`` ended in AttributeErrors."""

    model_config = ConfigDict(extra="allow", strict=True)
    format: Literal[FORMATS] | None = None  # type: ignore[valid-type]  # another was read as a float HF model
    format_version: int | None = Field(default=None, ge=1)
    versions: dict[str, Any] = {}
    files: dict[str, FileRecord]
    lowbit: LowbitInfo | None = None


def checked(model: type[BaseModel], raw: Any, message: Callable[[str, str], str]) -> Any:
    """``raw`` as ``model``, or a ``CheckpointError`` with ``message(field, why)`` of the first bad field (each
    reader names it where it found it: the manifest, a config, a metadata entry)."""
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise CheckpointError(message(".".join(str(x) for x in err["loc"]), err["msg"])) from None


def _checked_manifest(path: Path, raw: dict[str, Any]) -> dict[str, Any]:
    """``raw`` (the manifest at ``path``) when its structure is a manifest's; else a CheckpointError naming the
    file and the first bad key. A ``format_version`` newer than ``FORMAT_VERSION`` is refused first, naming both
    versions: the rest of a newer manifest may not be one this lowbit knows how to check."""
    version = raw.get("format_version")
    if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
        from lowbit.version import __version__

        writer = raw.get("versions", {}).get("lowbit") if isinstance(raw.get("versions"), dict) else None
        by = f" (written by lowbit {writer})" if isinstance(writer, str) else ""
        raise CheckpointError(f"{path}: format_version {version}{by} is newer than this lowbit ({__version__}) reads: "
                              f"it reads format_version {FORMAT_VERSION} and older; upgrade lowbit to load this "
                              "checkpoint")
    checked(Manifest, raw, lambda key, msg: f"{path}: key {key!r}: {msg}")
    return raw


def verify_manifest(directory: Path, required: bool = False) -> dict[str, Any] | None:
    """Check every file the manifest lists against its SHA-256; None when there is no manifest and not ``required``."""
    path = directory / MANIFEST
    if not path.is_file():
        if required:
            raise CheckpointError(f"{directory}: no {MANIFEST} (a lowbit-format checkpoint always has one)")
        return None
    manifest = _checked_manifest(path, read_json(path))
    files = manifest["files"]
    for rel, info in files.items():
        why = unopenable(directory / rel)  # the one question the shard index's names are asked too
        if why is not None:
            raise CheckpointError(f"{path}: lists {rel[:80]!r}{'...' if len(rel) > 80 else ''}, which is not a file "
                                  f"name this system can open ({why})")
        p = (directory / rel).resolve()
        is_file = p.is_file()
        if directory.resolve() not in p.parents:
            raise CheckpointError(f"{path}: lists {rel!r}, which is outside the checkpoint directory")
        if not is_file:
            raise CheckpointError(f"{directory}: file {rel!r} listed in {MANIFEST} is missing")
        if p.stat().st_size != info.get("bytes"):
            raise CheckpointError(f"{p}: {p.stat().st_size} bytes, but {MANIFEST} recorded {info.get('bytes')} "
                                  "(truncated or replaced)")
        digest = sha256_file(p)
        if digest != info.get("sha256"):
            raise CheckpointError(f"{p}: SHA-256 {digest[:16]}… does not match {MANIFEST} "
                                  f"({str(info.get('sha256'))[:16]}…): the file was modified or corrupted")
    return manifest


def check_format(directory: Path, manifest: dict[str, Any] | None, ir_file: str = "model.lowbit") -> None:
    """Refuse a directory holding ``ir_file`` (IR text, which only a lowbit-format checkpoint or a compile output
    has) whose manifest names another ``format``: ``load`` refused it while ``inspect`` and ``graph`` showed it."""
    fmt = (manifest or {}).get("format")
    if fmt not in (None, "lowbit") and (directory / ir_file).is_file():
        raise CheckpointError(f"{directory / MANIFEST}: key 'format' says {fmt!r}, but the directory holds {ir_file}, "
                              "which only a lowbit-format checkpoint has (the manifest was edited, or files of two "
                              "checkpoints mixed): save the model again")


def unopenable(path: Path) -> str | None:
    """Why the OS refuses to look ``path`` up at all (a NUL byte, a name past its length limit, a symlink loop), or
    None (it exists, or it is just missing): ``is_file`` raises OSError for an over-long name and says False for a NUL
    byte, and ``resolve`` raised RuntimeError for a loop. Asked of every name a manifest or a shard index lists."""
    try:
        os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (OSError, ValueError) as exc:
        return str(getattr(exc, "strerror", None) or exc)
    return None


def unreadable_file(path: Path) -> str | None:
    """Why ``path``, a name that is there, cannot be read as a file (a symlink loop, a dangling link, a directory, no
    permission), or None (a readable file, or nothing there): ``is_file`` says False for each, so a directory whose
    model.lowbit was a symlink loop read as one without a model.lowbit (inspect: 'has no model.lowbit', load: 'not a
    checkpoint lowbit reads') and a loop given to inspect as FILE as 'no such file or directory'."""
    if not os.path.lexists(path):
        return None
    why = unopenable(path)
    if why is not None:
        return why
    if path.is_symlink() and not path.exists():
        return f"a symlink to {os.readlink(path)!r}, which does not exist"
    if path.is_dir():
        return "a directory, not a file"
    if not path.is_file():
        return "not a regular file"
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        return str(exc.strerror or exc)
    return None


def check_inside(directory: Path, *names: str) -> None:
    """Refuse a file of an artifact directory read without a manifest that is a symlink leading out of the
    directory, naming it: with a manifest, ``verify_manifest`` refuses such a file, but without one a
    ``model.lowbit -> ~/.ssh/id_rsa`` in a downloaded directory was read (and a parse error quoted its first line)."""
    from lowbit.errors import UntrustedInputError

    root = directory.resolve()
    for name in names:
        path = directory / name
        why = unopenable(path) if path.is_symlink() else None
        if why is not None:  # a link to itself: resolve() raised RuntimeError ('Symlink loop'), a traceback
            raise UntrustedInputError(f"{path}: is a symlink this system cannot follow ({why}); an artifact's files "
                                      "must be inside it (copy the file in instead of linking it)")
        if path.is_symlink() and root not in path.resolve().parents:
            raise UntrustedInputError(f"{path}: is a symlink to {str(path.resolve())!r}, outside the directory; an "
                                      "artifact's files must be inside it (copy the file in instead of linking it)")


def check_listed(directory: Path, manifest: dict[str, Any] | None, *names: str) -> None:
    """Refuse a file lowbit is about to read from ``directory`` that its manifest does not list: ``verify_manifest``
    checks the listed files only, so a params.safetensors or config.json added (or dropped from the list) after the
    save was read unverified. Nothing to check without a manifest (another tool's checkpoint)."""
    if manifest is None:
        return
    for name in names:
        if name not in manifest.get("files", {}):
            raise CheckpointError(f"{directory / name}: not listed in {MANIFEST}, so its SHA-256 cannot be checked "
                                  "(added or replaced after the save, or the manifest was edited)")


_SAFETENSORS_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
    torch.uint16: "U16", torch.uint32: "U32", torch.uint64: "U64",
}
"""The safetensors format's name of each dtype lowbit writes."""
_SAFETENSORS_ORDER = ("U64", "I64", "F64", "F32", "U32", "I32", "BF16", "F16", "U16", "I16", "F8_E4M3", "F8_E5M2",
                      "I8", "U8", "BOOL")
"""The order safetensors' writer lays dtypes out in (alignment first); tensors of one dtype go by name."""
_SAFETENSORS_READ: dict[str, torch.dtype] = {code: dtype for dtype, code in _SAFETENSORS_DTYPES.items()}

_WRITE_CHUNK = 64 * 2**20
"""Bytes handed to one ``write`` call: bounds the copy a non-contiguous tensor needs to the chunk, not the tensor."""


def write_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` as one safetensors file, streaming each tensor's bytes to disk.

    Why not ``safetensors.torch.save_file``: it builds the whole file in memory before writing it, and needs every
    tensor contiguous and unshared (mmapped weights that share a file's storage were cloned first), so saving a
    model took its size again in RAM on top of the model, which stopped models larger than RAM from being saved.
    Here the header is written first and then each tensor's bytes in turn, so saving holds at most one chunk
    beyond the tensors themselves; the file is what ``save_file`` writes (tensors ordered by alignment then name,
    header padded to 8 bytes: byte for byte the same) and any safetensors reader takes it.
    """
    entries = []
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise CheckpointError(f"{path}: {name!r} is a {type(t).__name__}, not a tensor")
        code = _SAFETENSORS_DTYPES.get(t.dtype)
        if code is None:
            raise CheckpointError(f"{path}: tensor {name!r} has dtype {t.dtype}, which safetensors cannot store "
                                  "(it stores "
                                  f"{', '.join(str(d).removeprefix('torch.') for d in _SAFETENSORS_DTYPES)})")
        if t.is_sparse or t.layout != torch.strided:
            raise CheckpointError(f"{path}: tensor {name!r} has layout {t.layout}; safetensors stores dense tensors")
        entries.append((name, t.detach(), code))
    # widest elements first, in safetensors' own order (so the file is byte for byte what save_file writes): every
    # tensor then starts at a multiple of its element size
    entries.sort(key=lambda e: (_SAFETENSORS_ORDER.index(e[2]), e[0]))
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for name, t, code in entries:
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": code, "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(len(head).to_bytes(8, "little"))
        f.write(head)
        for _, t, _ in entries:
            for piece in _pieces(t, max(1, _WRITE_CHUNK // max(1, t.element_size()))):
                f.write(memoryview(piece.cpu().contiguous().view(torch.uint8).numpy()))


def _pieces(t: torch.Tensor, limit: int) -> Iterator[torch.Tensor]:
    """``t``'s elements in row-major order as views of at most ``limit`` elements each (a piece of a contiguous
    tensor is contiguous; one of a strided tensor is a block of its rows, which the caller copies). Why not
    ``t.reshape(-1)``: on a transposed or expanded tensor it copies the whole tensor before the first write."""
    if t.is_contiguous() or t.dim() == 0:
        flat = t.reshape(-1)
        for start in range(0, flat.numel(), limit):
            yield flat[start:start + limit]
        return
    row = max(1, t[0].numel()) if t.shape[0] else 1
    if row > limit:  # one row is already too large: split each row the same way
        for r in t:
            yield from _pieces(r, limit)
        return
    step = max(1, limit // row)
    for start in range(0, t.shape[0], step):
        yield t[start:start + step]


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of one safetensors file; a truncated or corrupt file names itself and the tensor.

    The tensors are views of a private, copy-on-write mapping of the file, so reading a checkpoint larger than the
    memory left costs page cache the kernel can evict, not anonymous memory (safetensors' ``get_tensor`` copies each
    tensor out). Writing to such a tensor copies only the pages written; the file is
    never changed. lowbit writes checkpoints into a new directory and renames it into place, so saving over the
    directory a model was loaded from leaves the mapped (unlinked) files intact."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise CheckpointError(f"{path}: file is missing")
    size = path.stat().st_size
    if size < 8:
        raise CheckpointError(f"{path}: {size} bytes is too short for a safetensors file (truncated?)")
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        if header_len > size - 8:
            raise CheckpointError(f"{path}: header says {header_len} bytes but the file has {size - 8} after it "
                                  "(truncated or not safetensors)")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{path}: safetensors header is not valid JSON ({exc})") from None
        except RecursionError:
            raise CheckpointError(f"{path}: safetensors header is JSON nested too deeply") from None
    if not isinstance(header, dict):  # a crafted list or string header was an AttributeError
        raise CheckpointError(f"{path}: safetensors header is a JSON {type(header).__name__}, not an object of "
                              "tensors")
    data_len = size - 8 - header_len
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2):  # [0] or {...} were IndexError / KeyError
            raise CheckpointError(f"{path}: tensor {name!r} has no 'data_offsets' [begin, end] in the safetensors "
                                  f"header (got {str(offsets)[:60]})")
        end = offsets[1]
        if not isinstance(end, int) or end > data_len:
            raise CheckpointError(f"{path}: tensor {name!r} ends at byte {end} of the data section, which has "
                                  f"{data_len} bytes (the file is truncated)")
    out: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(path), framework="pt") as f:  # its own checks: offsets tile the data, shapes fit dtypes
            names = list(f.keys())
            for name in names:
                try:
                    f.get_slice(name)  # a tensor this safetensors cannot read is refused here, as get_tensor would
                except (SafetensorError, RuntimeError, ValueError) as exc:
                    raise CheckpointError(f"{path}: tensor {name!r} cannot be read ({exc})") from None
    except SafetensorError as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None
    storage = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=size)
    base = 8 + header_len
    for name in names:
        info = header[name]
        dtype = _SAFETENSORS_READ.get(info.get("dtype"))
        begin, end = info["data_offsets"]
        shape = [int(d) for d in info.get("shape", [])]
        if dtype is None or (end - begin) != math.prod(shape) * dtype.itemsize:  # safe_open checked both already
            raise CheckpointError(f"{path}: tensor {name!r} ({info.get('dtype')}, shape {shape}) does not match its "
                                  f"{end - begin} bytes")
        raw = torch.empty(0, dtype=torch.uint8).set_(storage, base + begin, (end - begin,))
        if (base + begin) % dtype.itemsize:  # unaligned for its dtype: a copy (writers align; a crafted file may not)
            raw = raw.clone()
        out[name] = raw.view(dtype).reshape(shape)
    return out


def read_config(directory: Path) -> Any:
    """The directory's config.json as transformers' AutoConfig (never the directory's own code); JSON that is not
    an object, or a config transformers rejects (an unknown model_type, a field of the wrong type), is a
    CheckpointError naming config.json, not transformers' ValueError or a tokenizer error that read it first."""
    from transformers import AutoConfig

    from lowbit.remote_code import from_pretrained

    path = directory / "config.json"
    read_json(path)
    try:
        return from_pretrained(AutoConfig, str(directory))
    except LowbitError:
        raise
    except Exception as exc:  # noqa: BLE001 - transformers' validators raise several kinds; re-raised naming the file
        why = " ".join(str(exc).split())[:300]
        raise CheckpointError(f"{path}: transformers cannot read this config ({type(exc).__name__}: {why})") from None


def shareable_config(config: dict[str, Any]) -> dict[str, Any]:
    """A config dict without ``_name_or_path``, the local directory the source model was read from (a site-packages
    or ~/.cache path in every checkpoint lowbit wrote); transformers' own save_pretrained leaves it out too."""
    config.pop("_name_or_path", None)
    return config


def read_tokenizer(directory: Path) -> Any:
    """The directory's tokenizer (transformers' AutoTokenizer, never the directory's own code); a tokenizer
    config transformers cannot load (an unknown ``tokenizer_class``, a damaged tokenizer.json) is a
    CheckpointError naming the file, not transformers' ValueError."""
    from transformers import AutoTokenizer

    from lowbit.remote_code import from_pretrained

    try:
        return from_pretrained(AutoTokenizer, str(directory))
    except LowbitError:
        raise
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{directory / 'tokenizer_config.json'}: transformers cannot load this tokenizer "
                              f"({type(exc).__name__}: {str(exc).strip()[:300]})") from None
