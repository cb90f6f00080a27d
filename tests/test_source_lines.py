"""Every line of ``lowbit/`` and ``tests/`` fits the code's 120 columns (STYLE: the width the sources are written
to; long lines had crept into lowbit/checkpoint/hf.py, lowbit/api.py, lowbit/export.py and others while each
change was reviewed alone). Reads the files as text; imports nothing."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIMIT = 120

IR_NODE_LINE = re.compile(r"^\s*%[\w\"]+(?:: [^=]+)?(?:, %[\w\"]+(?:: [^=]+)?)* = [\w.]+\(")
"""A node line of lowbit IR text inside a test's string (``%q: i8[1,s0,8] = quantize(...)``): the printer writes a
node on one line and the parser reads one node per line, so a golden text cannot wrap it."""


def long_lines(paths: list[Path], root: Path = ROOT) -> list[str]:
    """``file:line (columns)`` (relative to ``root``) of every line over ``LIMIT`` characters, IR node lines aside."""
    found = []
    for path in paths:
        for no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if len(line) > LIMIT and not IR_NODE_LINE.match(line):
                found.append(f"{path.relative_to(root)}:{no} ({len(line)} columns)")
    return found


def test_every_source_line_fits_120_columns():
    paths = sorted((ROOT / "lowbit").rglob("*.py")) + sorted((ROOT / "tests").rglob("*.py"))
    assert len(paths) > 100
    assert not long_lines(paths), "\n".join(long_lines(paths))


def test_the_check_sees_a_long_line_and_passes_only_ir_node_lines(tmp_path):
    long_code = "x = " + "1 + " * 40 + "1\n"
    ir = '  %s: f32[1,s0,1], %zp: i8[1,s0,1] = dynamic_qparams(%x, qdtype="int8", granularity="per_token", ' \
         'symmetric=True, axis=-1, block_size=None)\n'
    (tmp_path / "a.py").write_text(long_code + ir + "y = 1\n", encoding="utf-8")
    assert long_lines([tmp_path / "a.py"], tmp_path) == [f"a.py:1 ({len(long_code) - 1} columns)"]
