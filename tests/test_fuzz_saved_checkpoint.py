"""Fuzzing a real saved checkpoint: a tiny Llama compiled to int4 and written by ``lowbit.save`` (lowbit format),
then damaged the way a stranger's file can be (truncated, bytes flipped, lines duplicated or dropped, a huge or
negative size, another dtype, a value defined twice, a parameter named with a path, brackets nested thousands
deep, a safetensors header with another shape, dtype, offsets or an aliased tensor) with its manifest rehashed to
match. ``lowbit.load`` and ``lowbit inspect`` either read it or refuse it with a ``LowbitError`` naming the file
(exit 3): never another exception (a lowbit bug, exit 1 with a traceback), never an allocation past the machine.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from conftest import rehash_manifest as _rehash, tiny_llama
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

import lowbit
from lowbit.cli.main import app
from lowbit.errors import LowbitError

pytest.importorskip("compressed_tensors")


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    compiled = lowbit.compile_model(tiny_llama(hidden=32, inter=64, heads=2, kv_heads=1, vocab=61),
                                    pipeline="quantize(w=int4,group=16)")
    return lowbit.save(compiled, tmp_path_factory.mktemp("fuzz") / "lb", format="lowbit")


HUGE_NODE = '  %big: f32[100000,100000,100] = aten.zeros.default([100000, 100000, 100], device=device("cpu"))\n'


@st.composite
def damaged_ir(draw, text: str) -> str:
    """``text`` (a saved model.lowbit) with one damage a file can carry."""
    lines = text.split("\n")
    kind = draw(st.sampled_from(["cut", "flip", "dup", "drop", "size", "dtype", "redefine", "param", "nest", "huge"]))
    if kind == "cut":
        return text[:draw(st.integers(0, len(text) - 1))]
    if kind == "flip":
        i = draw(st.integers(0, len(text) - 1))
        return text[:i] + draw(st.characters(max_codepoint=0x2FF)) + text[i + 1:]
    if kind in ("dup", "drop"):
        i = draw(st.integers(0, len(lines) - 1))
        return "\n".join(lines[:i + 1] + lines[i:] if kind == "dup" else lines[:i] + lines[i + 1:])
    if kind == "size":
        m = draw(st.sampled_from(list(re.finditer(r"(?<=[\[,])\d+(?=[\],])", text))))
        new = draw(st.sampled_from(["0", "-1", "3", "2147483648", "99999999999", "99999999999999999999999"]))
        return text[:m.start()] + new + text[m.end():]
    if kind == "dtype":
        m = draw(st.sampled_from(list(re.finditer(r"\b(f32|u8|i64|bool)\[", text))))
        return text[:m.start()] + draw(st.sampled_from(["f64", "bf16", "i8", "u8", "f16", "i32", "c64", "q9"])) + \
            "[" + text[m.end():]
    if kind == "redefine":
        a, b = draw(st.lists(st.sampled_from(sorted(set(re.findall(r"%[A-Za-z0-9_]+(?=:)", text)))), min_size=2,
                             max_size=2))
        return text.replace(a + ":", b + ":", 1)
    if kind == "param":
        name = draw(st.sampled_from(sorted(set(re.findall(r"@[A-Za-z0-9_.\-/]+", text)))))
        return text.replace(name, draw(st.sampled_from(["@../../etc/passwd", "@/etc/passwd", "@a/../../b",
                                                         "@" + "x" * 5000])))
    if kind == "nest":
        i = draw(st.sampled_from([k for k, line in enumerate(lines) if "= " in line and "(" in line]))
        n = draw(st.sampled_from([50, 5000, 100000]))
        lines[i] = lines[i].replace("(", "(" + "[" * n, 1).replace(")", "]" * n + ")", 1)
        return "\n".join(lines)
    i = next(k for k, line in enumerate(lines) if line.strip().startswith("%"))
    return "\n".join(lines[:i] + [HUGE_NODE.rstrip("\n")] + lines[i:])


@st.composite
def damaged_params(draw, data: bytes) -> bytes:
    """``data`` (a saved params.safetensors) with its header or body damaged."""
    n = int.from_bytes(data[:8], "little")
    kind = draw(st.sampled_from(["cut", "flip", "shape", "dtype", "offsets", "alias"]))
    if kind == "cut":
        return data[:draw(st.integers(0, len(data) - 1))]
    if kind == "flip":
        i = draw(st.integers(0, 8 + n - 1))
        return data[:i] + bytes([draw(st.integers(0, 255))]) + data[i + 1:]
    header = json.loads(data[8:8 + n])
    names = sorted(k for k in header if k != "__metadata__")
    name = draw(st.sampled_from(names))
    if kind == "shape":
        header[name]["shape"] = [draw(st.sampled_from([0, 3, 2**31, 2**40]))] * len(header[name]["shape"])
    elif kind == "dtype":
        header[name]["dtype"] = draw(st.sampled_from(["F64", "I8", "U8", "BF16", "I64", "BOOL", "F8_E4M3", "XX"]))
    elif kind == "offsets":
        header[name]["data_offsets"] = [0, draw(st.sampled_from([1, 10**9, 2**40]))]
    else:
        header[draw(st.sampled_from(names))] = header[name]
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw + data[8 + n:]


def _check_damaged(saved: Path, name: str, content: str | bytes) -> None:
    """A copy of the saved model with file ``name`` replaced by ``content`` (its manifest hash updated, so the
    damage reaches the parser) is read, or refused naming itself."""
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(shutil.copytree(saved, Path(tmp) / "lb"))
        if isinstance(content, str):
            (d / name).write_text(content)
        else:
            (d / name).write_bytes(content)
        _rehash(d)
        _check(d)


def _check(d: Path) -> None:
    try:
        lowbit.load(d)
    except LowbitError as exc:
        assert str(d) in str(exc), str(exc)  # the directory or the file in it
    res = CliRunner().invoke(app, ["inspect", str(d)])
    assert res.exit_code in (0, 3), (res.output, res.exception)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_a_damaged_model_lowbit_is_read_or_refused_naming_it(saved, data):
    _check_damaged(saved, "model.lowbit", data.draw(damaged_ir((saved / "model.lowbit").read_text())))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_a_damaged_params_safetensors_is_read_or_refused_naming_it(saved, data):
    _check_damaged(saved, "params.safetensors", data.draw(damaged_params((saved / "params.safetensors").read_bytes())))
