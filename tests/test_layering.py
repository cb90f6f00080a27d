"""lowbit's layers run one way (docs/design.md, "Layers"): read every module's imports and check them.

Every ``import`` and ``from ... import`` in every file under ``lowbit/`` counts, at module level or inside a
function (a lazy import is still a dependency); imports under ``if TYPE_CHECKING:`` count for the layer order
(an annotation is a dependency too) but not for cycles (they never run). The test parses source with ``ast``
and imports nothing, so it runs in well under a second.
"""

from __future__ import annotations

import ast
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lowbit"

# Layer of each top-level module or subpackage of lowbit (``lowbit.ir`` covers ``lowbit.ir.graph``).
LAYER_OF: dict[str, str] = {
    "lowbit.cache": "base",
    "lowbit.version": "base",
    "lowbit.errors": "base",
    "lowbit.jsonio": "base",
    "lowbit.hashing": "base",
    "lowbit.remote_code": "base",
    "lowbit.data": "data",
    "lowbit.kernels": "kernels",
    "lowbit.ir": "ir",
    "lowbit.calibration": "calibration",
    "lowbit.passes": "passes",
    "lowbit.backends": "backends",
    "lowbit": "api",  # the package root (re-exports compile_model)
    "lowbit.api": "api",
    "lowbit.models": "api",
    "lowbit.eval": "api",
    "lowbit.recipes": "api",
    "lowbit.generate": "api",
    "lowbit.export": "api",
    "lowbit.checkpoint": "api",
    "lowbit.instruments": "api",
    "lowbit.cli": "cli",
    "lowbit.__main__": "cli",  # `python -m lowbit`, an entry point like the CLI
}

# The layers each layer may import (itself included). Everything not listed is a violation.
MAY_IMPORT: dict[str, set[str]] = {
    "base": {"base"},
    "data": {"data", "base"},
    "kernels": {"kernels", "ir", "base"},
    "ir": {"ir", "base"},
    "calibration": {"calibration", "ir", "data", "base"},
    "passes": {"passes", "calibration", "ir", "data", "base"},
    "backends": {"backends", "ir", "kernels", "base"},
    "api": {"api", "passes", "calibration", "backends", "ir", "kernels", "data", "base"},
    "cli": {"cli", "api", "passes", "calibration", "backends", "ir", "kernels", "data", "base"},
}

# Kernels sit beside the backends: third-party imports are the standard library, torch and triton only (their
# references call the IR's QDQ ops, lowbit.ir.quant).
KERNEL_THIRD_PARTY = {"torch", "triton", "numpy"}

# Upward imports that another change of the same issue removes; each names who removes it. A stale entry (the
# import is gone) is reported as a warning: delete it.
PENDING: dict[tuple[str, str], str] = {}

# Cycles allowed on purpose, as sets of modules, with the reason.
ALLOWED_CYCLES: dict[frozenset[str], str] = {
    frozenset({"lowbit.ir.graph", "lowbit.ir.printer"}):
        "Graph.__str__ prints through the printer (a call-time import) and the printer reads Graph's types: "
        "the text form is part of the IR core (MLIR's Operation::print), one unit in two files",
}


@dataclass(frozen=True)
class Import:
    source: str  # importing module
    target: str  # imported lowbit module (or package)
    line: int
    type_checking: bool


def module_files() -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the package (packages by their ``__init__``)."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _resolve(name: str, modules: dict[str, Path]) -> str:
    """The module a dotted name lives in (``lowbit.ir.graph.Graph`` -> ``lowbit.ir.graph``)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def read_imports(modules: dict[str, Path]) -> tuple[list[Import], dict[str, set[str]]]:
    """(every import of a lowbit module, top-level third-party packages each module imports)."""
    imports: list[Import] = []
    third_party: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        guarded: set[int] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and _is_type_checking(node.test):
                guarded.update(id(n) for stmt in node.body for n in ast.walk(stmt))
        for node in ast.walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
                # ``from lowbit.ir import quant`` imports the submodule lowbit.ir.quant
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for t in targets:
                top = t.split(".")[0]
                if top == "lowbit":
                    imports.append(Import(name, _resolve(t, modules), node.lineno, id(node) in guarded))
                elif top not in sys.stdlib_module_names and top != "__future__":
                    third_party.setdefault(name, set()).add(top)
    return imports, third_party


def layer_of(module: str) -> str:
    """The layer of ``lowbit.X.…`` is that of ``lowbit.X`` (KeyError for a module no layer names)."""
    return LAYER_OF[".".join(module.split(".")[:2])]


@pytest.fixture(scope="module")
def graph():
    modules = module_files()
    imports, third_party = read_imports(modules)
    return modules, imports, third_party


def test_every_module_has_a_layer(graph):
    modules, _, _ = graph
    unknown = [m for m in modules if ".".join(m.split(".")[:2]) not in LAYER_OF]
    assert not unknown, f"modules without a layer (add them to LAYER_OF and to docs/design.md's table): {unknown}"


def test_imports_follow_the_layers(graph):
    """ir <- calibration <- passes; ir <- backends; ir <- kernels <- backends; data a leaf;
    everything <- api-level modules <- cli."""
    _, imports, _ = graph
    violations, seen_pending = [], set()
    for imp in imports:
        src, dst = layer_of(imp.source), layer_of(imp.target)
        if dst in MAY_IMPORT[src]:
            continue
        key = (imp.source, imp.target)
        if key in PENDING:
            seen_pending.add(key)
            continue
        where = f"{imp.source.replace('.', '/')}.py:{imp.line}"
        violations.append(f"{where}: {imp.source} [{src}] imports {imp.target} [{dst}]"
                          + (" (under TYPE_CHECKING)" if imp.type_checking else ""))
    for key in set(PENDING) - seen_pending:
        warnings.warn(f"layering: {key[0]} no longer imports {key[1]}; remove it from PENDING", stacklevel=1)
    assert not violations, "imports against the layer order (docs/design.md, Layers):\n" + "\n".join(violations)


def test_kernels_import_only_torch_and_triton(graph):
    modules, _, third_party = graph
    extra = {m: sorted(third_party.get(m, set()) - KERNEL_THIRD_PARTY) for m in modules if layer_of(m) == "kernels"}
    assert not {m: e for m, e in extra.items() if e}, extra


def test_no_import_cycles_between_files(graph):
    _, imports, _ = graph
    g = nx.DiGraph()
    g.add_edges_from((i.source, i.target) for i in imports if not i.type_checking and i.source != i.target)
    cycles = [c for c in nx.strongly_connected_components(g) if len(c) > 1]
    unexpected = [sorted(c) for c in cycles if frozenset(c) not in ALLOWED_CYCLES]
    explain = []
    for c in unexpected:
        sub = g.subgraph(c)
        explain.append(" -> ".join(nx.find_cycle(sub)[i][0] for i in range(len(nx.find_cycle(sub)))))
    assert not unexpected, "import cycles:\n" + "\n".join(explain)


def test_the_checker_sees_a_function_level_upward_import(tmp_path):
    """The reader catches what the layer test exists for: a lazy, function-level import from a lower layer,
    a relative import, and a TYPE_CHECKING-only one (counted for layers, not for cycles)."""
    global ROOT, PACKAGE
    pkg = tmp_path / "lowbit"
    (pkg / "ir").mkdir(parents=True)
    (pkg / "passes").mkdir()
    for f in ("__init__.py", "ir/__init__.py", "passes/__init__.py", "passes/dce.py"):
        (pkg / f).write_text("")
    (pkg / "ir" / "capture.py").write_text(
        "from typing import TYPE_CHECKING\nfrom .graph import G\nif TYPE_CHECKING:\n    import lowbit.passes\n"
        "def f():\n    from lowbit.passes.dce import x\n")
    (pkg / "ir" / "graph.py").write_text("G = 1\n")
    saved = ROOT, PACKAGE
    ROOT, PACKAGE = tmp_path, pkg
    try:
        modules = module_files()
        imports, _ = read_imports(modules)
    finally:
        ROOT, PACKAGE = saved
    got = {(i.source, i.target, i.type_checking) for i in imports}
    assert got == {("lowbit.ir.capture", "lowbit.ir.graph", False),
                   ("lowbit.ir.capture", "lowbit.passes", True),
                   ("lowbit.ir.capture", "lowbit.passes.dce", False)}
    assert [layer_of(t) for _, t, _ in sorted(got)] == ["ir", "passes", "passes"]
