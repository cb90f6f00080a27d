"""Saving and loading lowbit's ONNX files: external data past protobuf's 2 GB limit, clear errors on bad files.

A protobuf message cannot exceed 2 GiB, so a model whose initializers come near that is saved with its
tensors in a side file (``<name>.onnx.data``) that the ``.onnx`` references; ONNX Runtime, TensorRT's
parser and ``onnx.checker`` (given the path) all follow the reference. Loading checks what a truncated
or corrupted file breaks — the protobuf parse, the external data's extent, the checker — and says
which file is bad and how, instead of surfacing a protobuf stack trace.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import onnx
import onnx_ir as ir

from lowbit.cache import clean_stale_temporaries
from lowbit.errors import LowbitError

EXTERNAL_DATA_THRESHOLD = 1_800_000_000
"""Initializer bytes above which a model is saved with external data (protobuf's hard limit is 2 GiB)."""


class OnnxFileError(LowbitError, ValueError):
    """An ONNX file (or its external data) is missing, truncated, corrupted or not a valid model."""


def initializer_bytes(model: ir.Model) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


def save_onnx(model: ir.Model, path: str | os.PathLike[str], *, external_data: bool | None = None) -> Path:
    """Write ``model`` to ``path``; tensors go to ``<path>.data`` when ``external_data`` (default: if > ~1.8 GB).

    Returns the path. The written model passes ``onnx.checker.check_model(full_check=True)``; run
    ``check_onnx(path)`` to verify.
    """
    as_dir = os.fspath(path).endswith(tuple(sep for sep in (os.sep, os.altsep) if sep))  # 'out/': Path drops the /
    path = Path(path).expanduser()
    if as_dir or path.is_dir():  # was a bare IsADirectoryError from the rename (and an empty <dir>.data beside it)
        raise OnnxFileError(f"cannot write an ONNX model to {path}: it is a directory; give a file path such as "
                            f"{path / 'model.onnx'}")
    path.parent.mkdir(parents=True, exist_ok=True)
    if external_data is None:
        external_data = initializer_bytes(model) > EXTERNAL_DATA_THRESHOLD
    data_name = f"{path.name}.data"
    data_path = path.with_name(data_name)
    if external_data:
        _save_external(model, path, data_path)
    else:
        # written beside and renamed over: a save that fails part way (disk full, interrupted) leaves an earlier
        # export at this path whole instead of truncated
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            ir.save(model, tmp)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        if data_path.exists():
            data_path.unlink()  # a stale side file from an earlier external-data save would mislead readers
    return path


def _save_external(model: ir.Model, path: Path, data_path: Path) -> None:
    """``model`` as ``path`` + ``data_path``, both written in a temporary directory beside them and renamed into
    place, as the checkpoint writers do: saved in place, a save that failed part way (disk full, killed: minutes
    for a large model) left a valid-looking ``.onnx`` over a half-written ``.data``, or an earlier export's
    ``.onnx`` reading the new side file. The ``.onnx`` readers open is renamed last."""
    clean_stale_temporaries(path.parent, path.name)  # left by a save that was killed
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        ir.save(model, tmp / path.name, external_data=data_path.name, size_threshold_bytes=1024)
        if path.exists() and data_path.exists():
            path.unlink()  # an earlier external-data export: its .onnx must not read the new side file meanwhile
        os.replace(tmp / data_path.name, data_path)
        os.replace(tmp / path.name, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_onnx(model: str | os.PathLike[str] | onnx.ModelProto | ir.Model, *, full_check: bool = True) -> None:
    """``onnx.checker.check_model`` with full shape inference; a path is checked in place (external data)."""
    if isinstance(model, ir.Model):
        model = ir.serde.serialize_model(model)
    if isinstance(model, (str, os.PathLike)):
        onnx.checker.check_model(os.fspath(model), full_check=full_check)
    else:
        onnx.checker.check_model(model, full_check=full_check)


def load_onnx(path: str | os.PathLike[str], *, check: bool = True) -> ir.Model:
    """Read an ONNX file (external tensors stay lazy); bad files raise ``OnnxFileError`` saying what is wrong."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise OnnxFileError(f"no ONNX file at {path}" + (" (it is a directory)" if path.is_dir() else ""))
    size = path.stat().st_size
    if size == 0:
        raise OnnxFileError(f"{path} is empty (0 bytes): the write was interrupted or the file was truncated")
    try:
        proto = onnx.load(os.fspath(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - protobuf raises DecodeError or RuntimeError variants
        raise OnnxFileError(f"{path} ({size} bytes) is not a readable ONNX model: it is truncated or corrupted "
                            f"({type(exc).__name__}: {str(exc).strip()[:200]})") from exc
    if not proto.graph.node and not proto.graph.output:
        raise OnnxFileError(f"{path} ({size} bytes) parsed to an empty model (no nodes, no outputs): "
                            "it is truncated or not an ONNX file")
    check_external_data(proto, path)
    if check:
        try:
            onnx.checker.check_model(os.fspath(path))
        except onnx.checker.ValidationError as exc:
            raise OnnxFileError(f"{path} is not a valid ONNX model (truncated or corrupted?): "
                                f"{str(exc).strip().splitlines()[0][:300]}") from exc
    model = ir.serde.deserialize_model(proto)
    ir.external_data.set_base_dir(model.graph, path.parent)
    return model


def check_external_data(proto: onnx.ModelProto, path: Path) -> None:
    """Every external tensor's file exists and is long enough for its offset + length."""
    sizes: dict[str, int] = {}
    for tensor in proto.graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in tensor.external_data}
        location = info.get("location", "")
        target = path.parent / location
        if location not in sizes:
            if not target.is_file():
                raise OnnxFileError(f"{path} stores tensor {tensor.name!r} in {target}, which is missing: "
                                    "copy the .data file next to the .onnx file")
            sizes[location] = target.stat().st_size
        end = int(info.get("offset", 0)) + int(info.get("length", 0))
        if end > sizes[location]:
            raise OnnxFileError(f"external data {target} is truncated: tensor {tensor.name!r} needs bytes up to "
                                f"{end}, the file has {sizes[location]}")
