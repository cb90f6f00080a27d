"""Golden IR tests as files: ``tests/golden/*.lbir``, MLIR lit/FileCheck style (docs/design.md, Golden IR tests).

Each file holds a ``// RUN: <pipeline>`` line, the input IR (every line not starting with ``//``) and
``// CHECK:`` / ``// CHECK-NEXT:`` / ``// CHECK-NOT:`` lines matched against the printed IR after the pipeline
(``tests/filecheck.py``). Parameters get seeded random values of their declared dtype and shape: a golden
test checks the IR's form; numbers are checked on real models elsewhere.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from filecheck import CheckFailure, filecheck, parse_checks
from lowbit.ir.parser import parse_graph
from lowbit.ir.printer import print_graph
from lowbit.passes.manager import PassManager

GOLDEN = Path(__file__).parent / "golden"
FILES = sorted(GOLDEN.glob("*.lbir"))


def read_case(path: Path) -> tuple[str, str, str]:
    """(pipeline, input IR, file text) of a .lbir file; errors name the file."""
    text = path.read_text(encoding="utf-8")
    runs = [ln.split("RUN:", 1)[1].strip() for ln in text.splitlines() if ln.lstrip().startswith("// RUN:")]
    if len(runs) != 1 or not runs[0]:
        raise ValueError(f"{path}: needs exactly one '// RUN: <pipeline>' line, found {len(runs)}")
    ir = "".join(ln + "\n" for ln in text.splitlines() if not ln.lstrip().startswith("//") and ln.strip())
    return runs[0], ir, text


def seeded_params(ir: str) -> dict[str, torch.Tensor]:
    g = parse_graph(ir)
    gen = torch.Generator().manual_seed(0)
    out = {}
    for name, v in g.params.items():
        shape, dtype = tuple(v.type.shape), v.type.dtype
        out[name] = (torch.randn(shape, generator=gen, dtype=dtype) if dtype.is_floating_point
                     else torch.randint(-8, 8, shape, generator=gen).to(dtype))
    return out


def test_golden_files_exist():
    assert {p.name for p in FILES} >= {"fold_norms.lbir", "dce.lbir", "quantize_w4g4_a8.lbir"}


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_golden(path: Path):
    pipeline, ir, text = read_case(path)
    checks = parse_checks(text)
    assert checks, f"{path}: no CHECK lines"
    g = parse_graph(ir, seeded_params(ir))
    PassManager(pipeline).run(g)
    filecheck(checks, print_graph(g), where=str(path.relative_to(GOLDEN.parent.parent)))


# ---- the matcher itself ---------------------------------------------------------------------------

TEXT = "graph g(%x) {\n  %a = relu(%x)\n  %b = neg(%a)\n  return %b\n}\n"


def _run(checks: str) -> None:
    filecheck(parse_checks(checks), TEXT)


def test_filecheck_accepts_what_holds():
    _run("// CHECK: graph g\n// CHECK-NEXT: %a = relu(%x)\n// CHECK-NOT: exp\n// CHECK: return   %b\n// CHECK-NEXT: }")
    _run("// CHECK: %{{[a-z]}} = neg({{.*}})\n// CHECK-NOT: relu")


@pytest.mark.parametrize("checks,message", [
    ("// CHECK: graph g\n// CHECK-NEXT: %b = neg", r"<checks>:2: CHECK-NEXT: '%b = neg' is not on the line after"),
    ("// CHECK: graph g\n// CHECK-NOT: relu\n// CHECK: return", r"<checks>:2: CHECK-NOT: 'relu' found on text line 2"),
    ("// CHECK: return\n// CHECK: relu", r"<checks>:2: CHECK: 'relu' not found from text line 5"),
    ("// CHECK: neg\n// CHECK-NOT: }", r"CHECK-NOT: '}' found on text line 5"),
])
def test_filecheck_names_the_failing_check(checks, message):
    with pytest.raises(CheckFailure, match=message):
        _run(checks)


def test_filecheck_rejects_malformed_checks():
    with pytest.raises(ValueError, match="CHECK-NEXT has no previous match"):
        parse_checks("// CHECK-NEXT: x")
    with pytest.raises(ValueError, match="empty pattern"):
        parse_checks("// CHECK:   ")
