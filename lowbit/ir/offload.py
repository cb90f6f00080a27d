"""Parameters held in a file on disk instead of in anonymous memory.

Why: a quantizing pass replaces each float weight by its packed codes and scales, and until the model is saved
those packed tensors live in the process's heap. Block by block calibration keeps one block's working set, but the
packed result of every block done so far grows with the model (a 4-bit model is a quarter of its bf16 size), so
the model still had to fit in RAM in packed form. With ``Graph.offload_dir`` set, each packed weight is written to
a file there and read back as a private mapping of that file: its pages are page cache the kernel can drop and
read again, not anonymous memory, so what a compile holds no longer grows with the model's depth.

The file is unlinked as soon as it is mapped: the mapping keeps its data, the disk space is returned when the last
tensor viewing it is freed (or the process ends), and a crash leaves no file behind. The mapping is private
(copy on write), like ``lowbit.checkpoint.files.read_safetensors``' weights, so a pass that writes into such a
tensor gets anonymous pages for what it writes and never changes the file.
"""

from __future__ import annotations

import bisect
import os
import re
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

__all__ = ["OffloadError", "map_from_disk", "offloaded_bytes", "ram_backed"]

_ALIGN = 64
"""Each tensor starts at a multiple of 64 bytes in its file: aligned for every dtype and for vector loads."""


_RAM_FILESYSTEMS = frozenset({"tmpfs", "ramfs"})
"""File systems whose files are memory: pages written there cannot be dropped and read again (tmpfs only swapped)."""


def ram_backed(directory: str | os.PathLike[str], mounts: str | None = None) -> str | None:
    """The file system type (``tmpfs``, ``ramfs``) when ``directory`` lies on one held in memory, else None.

    Why: offloading packed weights to such a directory writes them into memory again, so it saves nothing (and
    ``/tmp`` is a tmpfs on many systems). ``mounts`` is the mount table's text (``/proc/self/mounts``, read when
    None); the deepest mount point holding the directory decides; None where there is no such table."""
    if mounts is None:
        try:
            mounts = Path("/proc/self/mounts").read_text()
        except OSError:
            return None
    path = os.path.realpath(os.path.expanduser(os.fspath(directory))) if mounts else ""
    best, kind = "", None
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        # the table escapes space, tab, newline and backslash as octal (\040)
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[1])
        inside = path == point or path.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, kind = point, fields[2]
    return kind if kind in _RAM_FILESYSTEMS else None


class OffloadError(OSError):
    """The offload directory cannot take a tensor (missing, read-only, full); names the directory."""


def map_from_disk(tensors: Sequence[torch.Tensor], directory: str | os.PathLike[str], stem: str = "offload"
                  ) -> list[torch.Tensor]:
    """Write ``tensors`` (CPU, any dtype and shape) into one new file in ``directory`` and return views of a
    private mapping of it, equal to them element for element. Tensors on another device are returned unchanged
    (their memory is not the host's); an empty list writes nothing."""
    host = [i for i, t in enumerate(tensors) if t.device.type == "cpu" and t.numel() > 0]
    out = list(tensors)
    if not host:
        return out
    offsets, size = [], 0
    for i in host:
        offsets.append(size)
        size += tensors[i].numel() * tensors[i].element_size()
        size += -size % _ALIGN
    directory = Path(directory)
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in stem)[:80]
    try:
        fd, name = tempfile.mkstemp(prefix=f".lowbit-{safe}-", suffix=".bin", dir=directory)
    except OSError as exc:
        raise OffloadError(f"offload directory {str(directory)!r}: cannot create a file there ({exc.strerror or exc})"
                           ) from None
    try:
        with os.fdopen(fd, "wb") as f:
            for i, start in zip(host, offsets):
                f.seek(start)
                flat = tensors[i].detach().reshape(-1)
                if not flat.is_contiguous():
                    flat = flat.contiguous()
                f.write(memoryview(flat.view(torch.uint8).numpy()))
            f.truncate(size)
        storage = torch.UntypedStorage.from_file(name, shared=False, nbytes=size)
    except OSError as exc:
        raise OffloadError(f"offload directory {str(directory)!r}: cannot write {size} bytes of {stem}'s weights "
                           f"({exc.strerror or exc}); free disk space there, or offload to another disk: "
                           "compile_model(offload_dir=...), or for `lowbit compile` an -o OUT elsewhere (the weights "
                           "wait in OUT's parent directory until the save)") from None
    finally:
        try:
            os.unlink(name)
        except OSError:
            pass
    for i, start in zip(host, offsets):
        t = tensors[i]
        nbytes = t.numel() * t.element_size()
        raw = torch.empty(0, dtype=torch.uint8).set_(storage, start, (nbytes,))
        out[i] = raw.view(t.dtype).reshape(t.shape)
    return out


def offloaded_bytes(tensors: Iterable[torch.Tensor]) -> int | None:
    """How many bytes of ``tensors`` (a tensor seen twice counted once) live in an offload file's mapping
    (``map_from_disk``'s, unlinked, so the process's memory map lists it as ``.lowbit-*.bin (deleted)``); None where
    the system has no memory map to read. Why: ``Graph.offload_dir`` says where weights would go, not that any went
    (a pipeline that rewrites no weight offloads none), and a note about the offload is true only for what is there."""
    try:
        with open("/proc/self/maps") as f:
            spans = sorted(tuple(int(a, 16) for a in line.split(None, 1)[0].split("-")) for line in f
                           if "/.lowbit-" in line and line.rstrip().endswith(".bin (deleted)"))
    except OSError:
        return None
    starts = [lo for lo, _ in spans]
    seen: set[tuple[int, int]] = set()
    total = 0
    for t in tensors:
        ptr, nbytes = (t.data_ptr(), t.numel() * t.element_size()) if t.device.type == "cpu" else (0, 0)
        if not nbytes or (ptr, nbytes) in seen:
            continue
        i = bisect.bisect_right(starts, ptr) - 1
        if i >= 0 and ptr < spans[i][1]:
            seen.add((ptr, nbytes))
            total += nbytes
    return total
