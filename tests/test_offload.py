"""Packed weights offloaded to disk (``lowbit.ir.offload``, ``compile_model(offload_dir=...)``, ``lowbit compile -o``):
the model computes exactly what it does with the weights in memory, the weights are file pages and not heap, and
nothing is left in the directory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama

import lowbit
from lowbit.ir.offload import OffloadError, map_from_disk, ram_backed

LINUX_MAPS = Path("/proc/self/maps")


def _file_mapped(t: torch.Tensor) -> str | None:
    """The path of the file mapping ``t``'s data lies in (``(deleted)`` once unlinked), None if it is heap."""
    ptr = t.data_ptr()
    for line in LINUX_MAPS.read_text().splitlines():
        fields = line.split(maxsplit=5)
        lo, hi = (int(x, 16) for x in fields[0].split("-"))
        if lo <= ptr < hi:
            return fields[5] if len(fields) == 6 else None
    return None


@pytest.mark.parametrize("make", [
    lambda: torch.randint(0, 256, (7, 5), dtype=torch.uint8),
    lambda: torch.randn(3, 9, dtype=torch.bfloat16),
    lambda: torch.randn(4, 6).t(),  # not contiguous
    lambda: torch.randint(-8, 8, (33,), dtype=torch.int8),
    lambda: torch.zeros(0, 4),
    lambda: torch.tensor(2.5, dtype=torch.float64),
], ids=["u8", "bf16", "transposed", "i8", "empty", "scalar"])
def test_mapped_tensors_equal_what_was_written_and_leave_no_file(tmp_path: Path, make) -> None:
    src = [make(), torch.randn(5, dtype=torch.float16)]
    got = map_from_disk(src, tmp_path, stem="model.layers.0.mlp/down")
    for a, b in zip(src, got):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    assert list(tmp_path.iterdir()) == []  # unlinked at once: a crash leaves nothing behind
    if LINUX_MAPS.is_file():
        where = _file_mapped(got[1])
        assert where is not None and ".lowbit-model.layers.0.mlp_down-" in where and where.endswith("(deleted)")
    got[1].add_(1)  # a private mapping: writing copies the page, and the tensor is still usable
    assert torch.equal(got[1], src[1] + 1)


def test_a_directory_that_cannot_take_the_file_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "gone"
    with pytest.raises(OffloadError, match="offload directory .*gone.*cannot create a file there"):
        map_from_disk([torch.ones(3)], missing)


def test_compile_model_refuses_a_missing_offload_dir_before_loading(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="offload_dir=.*nowhere.*no such directory"):
        lowbit.compile_model("no-such-model-is-loaded", pipeline="quantize(w=int4,group=32)",
                             offload_dir=tmp_path / "nowhere")


@pytest.mark.parametrize("pipeline", ["quantize(w=int4,group=32,sym=false)",
                                      "gptq(w=int4,group=32,sym=false,calib_n=2,calib_len=16,progress=false)"])
def test_offloaded_compile_is_the_in_memory_compile_with_its_packed_weights_on_disk(tmp_path: Path,
                                                                                    pipeline: str) -> None:
    model = tiny_llama(layers=2)
    calib = torch.randint(0, 60, (2, 16)) if pipeline.startswith("gptq") else None
    kw = {"pipeline": pipeline, "backend_options": {"keep_packed": True}, "calib": calib}
    held = lowbit.compile_model(model, **kw)
    off = lowbit.compile_model(model, offload_dir=tmp_path, **kw)
    assert held.graph.params.keys() == off.graph.params.keys()
    for name, v in held.graph.params.items():
        assert torch.equal(v.data, off.graph.params[name].data), name
    ids = torch.randint(0, 60, (1, 12))
    torch.testing.assert_close(off(ids), held(ids), rtol=0, atol=0)
    assert list(tmp_path.iterdir()) == []
    packed = [v.data for n, v in off.graph.params.items() if n.endswith((".qdata", ".scale", ".zero_point"))]
    assert len(packed) == 3 * 7 * 2  # q, k, v, o, gate, up, down of both blocks, each codes + scale + zero point
    if LINUX_MAPS.is_file():
        assert all((_file_mapped(t) or "").endswith("(deleted)") for t in packed)
        assert not any((_file_mapped(v.data) or "").endswith("(deleted)") for n, v in held.graph.params.items())


@pytest.mark.skipif(not LINUX_MAPS.is_file(), reason="reads Linux /proc for mappings")
def test_cli_compile_offloads_beside_its_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`lowbit compile -o OUT` puts the packed weights in OUT's parent directory (on the disk the output goes to, not
    in a RAM-backed /tmp) until they are saved, and leaves no file there."""
    from typer.testing import CliRunner

    import lowbit.ir.qdq as qdq
    from lowbit.cli.main import app

    dirs: list[str] = []
    real = qdq.map_from_disk

    def spy(tensors, directory, stem="offload"):
        dirs.append(str(directory))
        return real(tensors, directory, stem)

    monkeypatch.setattr(qdq, "map_from_disk", spy)
    out = tmp_path / "deeper" / "out"
    res = CliRunner().invoke(app, ["compile", "smollm2:1", "-p", "quantize(w=int4,group=64)", "-o", str(out), "-q"])
    assert res.exit_code == 0, res.output
    assert dirs and set(dirs) == {str(tmp_path.resolve())}  # 'deeper' did not exist yet: its first existing parent
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deeper"]
    assert not any(p.name.startswith(".lowbit-") for p in out.iterdir())
    logits = lowbit.load(out)(torch.tensor([[1, 504, 3458, 282]]))  # the weights read back from the mapping
    assert logits.shape[-1] == 49152 and bool(torch.isfinite(logits).all())


@pytest.mark.skipif(not LINUX_MAPS.is_file(), reason="reads Linux /proc for mappings")
def test_offloaded_compile_runs_on_its_mapped_weights_not_float_copies(tmp_path: Path) -> None:
    """``offload_dir`` on the torch backend keeps the weights packed in the lowered module (``keep_packed``): by
    default the backend dequantized every packed weight at lowering into a float copy in the heap, the float
    model's size again, so the offload saved nothing once the compile returned. ``keep_packed=False`` given still
    dequantizes, as asked; both compute the same logits."""
    model = tiny_llama(layers=1, hidden=64, inter=128)
    off = lowbit.compile_model(model, pipeline="quantize(w=int4,group=32)", offload_dir=tmp_path)
    packed = {v.data.untyped_storage().data_ptr() for n, v in off.graph.params.items() if n.endswith(".qdata")}
    held = {b.untyped_storage().data_ptr() for b in off.runner.gm.buffers()}
    assert len(packed) == 7 and packed <= held  # the module reads the mapped codes themselves
    assert not any("dequantized at lowering" in line for line in off.report.lowering)
    floats = lowbit.compile_model(model, pipeline="quantize(w=int4,group=32)", offload_dir=tmp_path,
                                  backend_options={"keep_packed": False})
    assert floats.runner.dequantized_weights == 7
    assert off.runner.buffer_bytes < 0.6 * floats.runner.buffer_bytes
    ids = torch.randint(0, 60, (1, 9))
    torch.testing.assert_close(off(ids), floats(ids), rtol=0, atol=0)


_MOUNTS = """/dev/vda / ext4 rw,relatime 0 0
tmpfs /dev/shm tmpfs rw,nosuid,nodev 0 0
tmpfs /run/user/1000 tmpfs rw 0 0
none /mnt/ram\\040disk ramfs rw 0 0
/dev/vdb /dev/shm/disk xfs rw 0 0
"""


def test_ram_backed_names_the_filesystem_a_directory_is_on() -> None:
    """The deepest mount holding the directory decides: a disk mounted inside a tmpfs is a disk; the mount table's
    octal escapes (a space as \\040) are read."""
    assert ram_backed("/dev/shm/x/y", _MOUNTS) == "tmpfs"
    assert ram_backed("/dev/shm", _MOUNTS) == "tmpfs"
    assert ram_backed("/mnt/ram disk/out", _MOUNTS) == "ramfs"
    assert ram_backed("/dev/shm/disk/out", _MOUNTS) is None
    assert ram_backed("/dev/shmem", _MOUNTS) is None  # a prefix of the name is not the mount
    assert ram_backed("/home/u", _MOUNTS) is None


def _tmpfs_dir() -> Path | None:
    shm = Path("/dev/shm")
    return shm if shm.is_dir() and os.access(shm, os.W_OK) and ram_backed(shm) == "tmpfs" else None


@pytest.mark.skipif(_tmpfs_dir() is None, reason="needs a writable tmpfs at /dev/shm")
def test_offloading_into_memory_is_said_or_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A tmpfs is memory: packed weights offloaded there save none of it (and cannot be dropped without swap).
    ``compile_model(offload_dir=...)`` there warns, naming the directory; ``lowbit compile -o OUT`` with OUT on a
    tmpfs keeps the packed weights in memory rather than writing them to another part of it."""
    import tempfile

    from typer.testing import CliRunner

    import lowbit.ir.qdq as qdq
    from lowbit.cli.main import app

    with tempfile.TemporaryDirectory(dir=_tmpfs_dir()) as shm:
        with pytest.warns(UserWarning, match=f"offload_dir={shm!r} is on a tmpfs"):
            lowbit.compile_model(tiny_llama(), pipeline="quantize(w=int8)", offload_dir=shm)
        dirs: list[str] = []
        real = qdq.map_from_disk
        monkeypatch.setattr(qdq, "map_from_disk", lambda t, d, stem="offload": dirs.append(str(d)) or real(t, d, stem))
        res = CliRunner().invoke(app, ["compile", "smollm2:1", "-p", "quantize(w=int8)", "-o", f"{shm}/out", "-q"])
        assert res.exit_code == 0, res.output
        assert dirs == []


@pytest.mark.skipif(not LINUX_MAPS.is_file(), reason="reads Linux /proc for mappings")
@pytest.mark.parametrize("fmt", ["compressed-tensors", "gptq"])
def test_hf_save_streams_each_linear_s_repacked_tensors_from_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                   fmt: str) -> None:
    """An HF save repacks every quantized linear into its format's int32 layout. Each linear's result was kept in
    the heap until the whole file was written, so a save held the whole packed checkpoint in memory again, even of a
    model whose packed weights were offloaded. Each linear's tensors now go to a file beside the checkpoint as they
    are made (mapped back, unlinked) and stream from there; the checkpoint loads as the model it was saved from."""
    import lowbit.checkpoint.hf as hf

    written: dict[str, str | None] = {}
    real = hf.write_safetensors

    def spy(tensors, path, metadata=None):
        written.update({k: _file_mapped(t) for k, t in tensors.items()})
        return real(tensors, path, metadata)

    monkeypatch.setattr(hf, "write_safetensors", spy)
    model = tiny_llama(layers=1, hidden=64, inter=128)
    compiled = lowbit.compile_model(model, pipeline="quantize(w=int4,group=32)", offload_dir=tmp_path)
    lowbit.save(compiled, tmp_path / "ckpt", format=fmt)
    repacked = [k for k in written if k.endswith((".weight_packed", ".qweight"))]
    assert len(repacked) == 7
    assert all((written[k] or "").endswith("(deleted)") for k in repacked), {k: written[k] for k in repacked}
    assert not any(p.name.startswith(".lowbit-") for p in (tmp_path / "ckpt").iterdir())
    ids = torch.randint(0, 60, (1, 7))
    torch.testing.assert_close(lowbit.load(tmp_path / "ckpt")(ids), compiled(ids), rtol=0, atol=1e-5)


@pytest.mark.skipif(not LINUX_MAPS.is_file(), reason="reads Linux /proc for mappings")
def test_weights_a_pass_rewrites_in_float_wait_on_disk_too(tmp_path: Path) -> None:
    """Passes that rewrite float weights across the whole model before it is quantized (fold-norms, smooth-quant,
    rotate, AWQ's scales) held every rewritten weight in the heap: the float model's linears again, all at once
    (smooth-quant then int8 on a 40-block bf16 Llama peaked at +289 MiB, +68 MiB at 4 blocks). With ``offload_dir``
    a rewritten weight (a page or more) is mapped from a file there like the packed ones, with the same numbers."""
    model = tiny_llama(layers=1, hidden=64, inter=128)
    held = lowbit.compile_model(model, pipeline="fold-norms")
    off = lowbit.compile_model(model, pipeline="fold-norms", offload_dir=tmp_path)
    folded = [n for n in off.graph.params if n.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight",
                                                          "gate_proj.weight", "up_proj.weight", "lm_head.weight"))]
    assert len(folded) == 6  # the readers of the three norms; o_proj and down_proj are left as they are
    for name in folded:
        assert (_file_mapped(off.graph.params[name].data) or "").endswith("(deleted)"), name
        assert torch.equal(off.graph.params[name].data, held.graph.params[name].data), name
    assert list(tmp_path.iterdir()) == []
    ids = torch.randint(0, 60, (1, 9))
    torch.testing.assert_close(off(ids), held(ids), rtol=0, atol=0)


def test_a_full_offload_disk_says_how_to_offload_elsewhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A disk that fills up during the offload is named with the bytes it could not take, and the way out is one a
    user of either entry point can take: ``offload_dir=`` elsewhere, or (``lowbit compile``, which offloads beside
    its output without a flag) an ``-o`` on another disk. It said 'compile without offloading', which the CLI has no
    flag for."""
    import errno

    import lowbit.ir.offload as offload

    class Full:
        def __init__(self, fd: int, mode: str) -> None:
            os.close(fd)

        def __enter__(self) -> Full:
            return self

        def __exit__(self, *exc: object) -> None:
            return None

        def seek(self, pos: int) -> None:
            return None

        def write(self, data: object) -> int:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(offload.os, "fdopen", Full)
    with pytest.raises(OffloadError) as exc:
        map_from_disk([torch.ones(64)], tmp_path, stem="model.layers.3.mlp.down_proj")
    text = str(exc.value)
    assert f"offload directory {str(tmp_path)!r}: cannot write 256 bytes" in text and "No space left" in text
    assert "offload_dir=" in text and "-o OUT" in text and "compile without offloading" not in text
    assert "model.layers.3.mlp.down_proj" in text
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("with_reproducer", [False, True])
def test_a_failed_offload_in_lowbit_compile_gives_advice_that_fits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  with_reproducer: bool) -> None:
    """A pass that could not write a packed weight to the offload directory (a full disk) ended with '(rerun with
    --reproducer DIR to save the IR before this pass and replay it)': a replay keeps its weights in memory (it
    would pass), and the reproducer is the model again, on the disk that just filled up. The error's own advice
    (offload elsewhere) stands alone, and --reproducer writes nothing and says why."""
    import errno

    from typer.testing import CliRunner

    import lowbit.ir.qdq as qdq
    from lowbit.cli.main import app

    def full(tensors, directory, stem="offload"):
        raise OffloadError(f"offload directory {str(directory)!r}: cannot write 1 bytes of {stem}'s weights "
                           f"({os.strerror(errno.ENOSPC)}); free disk space there, or offload to another disk")

    monkeypatch.setattr(qdq, "map_from_disk", full)
    repro = tmp_path / "repro"
    args = ["compile", "smollm2:1", "-p", "quantize(w=int4,group=64)", "-o", str(tmp_path / "out"), "-q",
            *(["--reproducer", str(repro)] if with_reproducer else [])]
    res = CliRunner().invoke(app, args)
    text = " ".join(res.output.split())
    assert res.exit_code == 4, res.output
    assert "No space left on device" in text and "offload to another disk" in text
    assert "rerun with --reproducer" not in text and "replay" not in text.replace("a replay does not use", "")
    if with_reproducer:
        assert f"no reproducer written to {repro}" in text and not repro.exists()
    assert not (tmp_path / "out").exists()


def test_onnxruntime_backend_says_it_holds_its_own_copy_of_offloaded_weights(tmp_path: Path) -> None:
    """With offload_dir, the onnxruntime backend lowered the packed weights the passes had put on disk into a session
    that reads them into its own buffers: the lowered model held its weights in memory again, and neither the report
    nor a warning said so. The report's lowering notes say it, with the MiB, and what runs on the offloaded files."""
    pytest.importorskip("onnxruntime")
    from lowbit.backends.onnxruntime_backend import OrtCompiled
    from lowbit.backends.torch_backend import TorchCompiled

    torch.manual_seed(0)
    off = lowbit.compile_model(tiny_llama(hidden=64, inter=128, heads=4, kv_heads=2, vocab=97),
                               pipeline="quantize(w=int4,group=32)", backend="onnxruntime", offload_dir=tmp_path)
    note = next((line for line in off.report.lowering if line.startswith("offloaded weights")), None)
    assert note is not None, off.report.lowering
    assert "holds its own copy of the model's" in note and " MiB of weights in memory" in note
    assert note in off.report.summary()
    ids = torch.randint(0, 97, (1, 7))
    torch.testing.assert_close(off(ids), TorchCompiled(off.graph)(ids), rtol=1e-5, atol=1e-5)
    off.graph.offload_dir = None  # the same graph lowered without an offload: nothing to say
    assert "offload_dir" not in OrtCompiled(off.graph).report_text()
    assert list(tmp_path.iterdir()) == []


def test_lowbit_compile_to_onnxruntime_says_why_its_weights_were_offloaded(tmp_path: Path) -> None:
    """``lowbit compile -b onnxruntime -o DIR`` (no offload asked for: -o offloads to DIR's disk) printed "offload_dir:
    the onnxruntime session holds its own copy ... backend='torch' (keep_packed) runs on the offloaded weights": an API
    argument and an API spelling its user never wrote. The note says what offloaded and the flags that run on it."""
    from typer.testing import CliRunner

    from lowbit.calibration.data import load_tokenizer
    from lowbit.cli.main import app

    if ram_backed(tmp_path) is not None:
        pytest.skip(f"{tmp_path} is memory-backed: lowbit compile -o does not offload there")
    torch.manual_seed(0)
    tiny_llama(hidden=64, inter=128, heads=4, kv_heads=2).save_pretrained(tmp_path / "tiny")
    load_tokenizer("smollm2").save_pretrained(tmp_path / "tiny")
    res = CliRunner().invoke(app, ["compile", str(tmp_path / "tiny"), "-b", "onnxruntime", "-p",
                                   "quantize(w=int4,group=32)", "-o", str(tmp_path / "out")], terminal_width=400)
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    assert "`lowbit compile -o DIR` offloads to DIR's disk): the onnxruntime session holds its own copy" in text
    assert "-b torch --backend-option keep_packed=true" in text and "offload_dir:" not in text


def test_onnxruntime_offload_note_only_where_weights_were_offloaded(tmp_path: Path) -> None:
    """The onnxruntime backend said "offloaded weights ... the session holds its own copy" whenever offload_dir was
    set (`lowbit compile -o` sets it unasked), also for a pipeline that offloads nothing (dce on a float model: no
    weight is rewritten, none goes to disk). The note comes only where weights are in offload files, with their
    MiB; offloaded_bytes counts the tensors living in such files and nothing else."""
    pytest.importorskip("onnxruntime")
    from lowbit.ir.offload import offloaded_bytes

    mapped = map_from_disk([torch.randn(1000), torch.randn(24)], tmp_path)
    assert offloaded_bytes([*mapped, mapped[0], torch.randn(500)]) == 4096
    torch.manual_seed(0)
    model = tiny_llama(hidden=64, inter=128, heads=4, kv_heads=2, vocab=97)
    plain = lowbit.compile_model(model, pipeline="dce", backend="onnxruntime", offload_dir=tmp_path)
    assert plain.graph.offload_dir is not None
    assert not any("offload" in line for line in plain.report.lowering), plain.report.lowering
    packed = lowbit.compile_model(model, pipeline="quantize(w=int4,group=32)", backend="onnxruntime",
                                  offload_dir=tmp_path)
    note = next(line for line in packed.report.lowering if line.startswith("offloaded weights"))
    mib = offloaded_bytes(v.data for v in packed.graph.params.values() if v.data is not None) / 2**20
    assert mib > 0 and f"offloaded weights ({mib:.1f} MiB in offload_dir={tmp_path}" in note, note


@pytest.fixture(autouse=True)
def _one_export_per_model(reuse_captures: object) -> None:
    """Every test here captures through the session's capture cache (conftest's ``reuse_captures``): the same tiny
    model compiled or reloaded again is not exported again."""
