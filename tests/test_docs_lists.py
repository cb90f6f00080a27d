"""The lists the docs give of lowbit's registries (backends and their options, passes, recipes) against the
registries themselves, so a backend option or pass added in code cannot go undocumented, and a name the docs give
cannot stop existing, without a test failing here."""

from __future__ import annotations

import re
import typing
from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "docs"


def _table_rows(text: str, header: str) -> list[list[str]]:
    """The body rows of the markdown table whose header line starts with ``header``, as lists of cell texts."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith(header)), None)
    assert start is not None, f"no table starting {header!r}: update tests/test_docs_lists.py"
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return rows


def _literal_values(annotation: object) -> set[str]:
    """The strings a ``Literal[...]`` option (or ``Literal[...] | None``) takes: a cell may list them in backticks."""
    kinds = [annotation, *typing.get_args(annotation)]
    return {str(v) for k in kinds if typing.get_origin(k) is typing.Literal for v in typing.get_args(k)}


def test_design_backend_table_lists_every_backend_its_passes_and_options():
    """docs/design.md's backend table: one row per registered backend, the passes it runs before lowering as
    registered, and every option of its options model named (a backticked word that is neither an option nor one
    of an option's literal values is a name the code no longer has)."""
    from lowbit.backends.registry import all_backends

    rows = _table_rows((DOCS / "design.md").read_text(encoding="utf-8"), "| backend | passes before lowering |")
    documented = {re.fullmatch(r"`([\w-]+)`", row[0]).group(1): row for row in rows}  # type: ignore[union-attr]
    backends = all_backends()
    assert sorted(documented) == sorted(backends), "docs/design.md's backend table lists other backends"
    for name, (_, passes, _, options) in documented.items():
        spec = backends[name]
        assert passes.strip("`") == (spec.passes or "—"), f"{name}: passes before lowering"
        fields = spec.options.model_fields
        named = set(re.findall(r"`([\w-]+)`", options))
        values = set().union(*(_literal_values(f.annotation) for f in fields.values()))
        assert not set(fields) - named, f"{name}: options missing from docs/design.md: {sorted(set(fields) - named)}"
        assert not named - set(fields) - values, f"{name}: docs/design.md names options it lacks: {named - set(fields)}"


def _backticked_after(text: str, start: str, end: str) -> list[str]:
    """The backticked names in ``text`` between the first ``start`` and the next ``end`` after it."""
    i = text.index(start) + len(start)
    return re.findall(r"`([\w-]+)`", text[i:text.index(end, i)])


def test_design_scope_and_exact_lists_match_the_pass_registry():
    """docs/design.md's pass contract lists the passes that take a ``modules`` scope (what ``debug bisect`` and
    ``debug sensitivity`` can restrict by layer) and the exact ones; the scope list named 6 of the 13."""
    from lowbit.passes.base import ScopedOptions, all_passes

    design = (DOCS / "design.md").read_text(encoding="utf-8")
    passes = all_passes()
    scoped = _backticked_after(design, "honours `modules`, a regex searched in module paths", "only nodes whose")
    assert sorted(scoped) == sorted(n for n, c in passes.items() if issubclass(c.Options, ScopedOptions))
    exact = _backticked_after(design, "Exact: ", ".\n")
    assert sorted(exact) == sorted(n for n, c in passes.items() if c.exact)


def test_every_pass_option_has_the_doc_lowbit_passes_shows():
    """README: ``lowbit passes NAME`` "adds option docs"; it reads each option's attribute docstring, and eleven
    options (quantize's a_gran/a_sym/k_gran/v_gran/kv_sym among them) had none, so they showed a bare type."""
    from lowbit.cli.main import option_docs
    from lowbit.passes.base import all_passes

    undocumented = {name: [k for k in cls.Options.model_fields if k not in option_docs(cls.Options)]
                    for name, cls in all_passes().items()
                    if cls.__module__.startswith("lowbit.")}  # not the passes other tests register (test_cli's plants)
    assert not {n: ks for n, ks in undocumented.items() if ks}


def test_pipeline_texts_in_the_docs_parse():
    """Every backticked pipeline text in README.md and docs/design.md (outside the generated tables; ``...`` marks a
    placeholder) parses as written: ``quantize(a_clip=0.9)`` is refused (a_clip needs ``a=``), and design.md wrote
    ``kv-cache(bits=4|2|8, k_block, ...)`` and ``quantize(a_clip=, kv_clip=)`` as if they were pipelines."""
    from lowbit.passes.base import all_passes
    from lowbit.passes.manager import parse_pipeline

    names = sorted(all_passes(), key=len, reverse=True)
    item = r"(?:" + "|".join(map(re.escape, names)) + r")(?:\((?:[^()`]|\([^()`]*\))*\))?"
    pipeline = re.compile(r"`(" + item + r"(?:," + item + r")*)`")
    checked = 0
    for doc in (DOCS.parent / "README.md", DOCS / "design.md"):
        for n, line in enumerate(doc.read_text(encoding="utf-8").splitlines(), 1):
            if line.startswith(("|", "Source:")):
                continue
            for m in pipeline.finditer(line):
                text = m.group(1)
                if "..." in text or "…" in text or "(" not in text:
                    continue
                try:
                    parse_pipeline(text)
                except Exception as exc:  # noqa: BLE001 (the assertion names it)
                    raise AssertionError(f"{doc.name}:{n}: `{text}` does not parse: {exc}") from None
                checked += 1
    assert checked >= 10


def test_design_checkpoint_section_names_every_format_save_writes():
    """docs/design.md's checkpoint section lists the formats ``lowbit.save``/``load`` take; it named three of four
    (``hf``, the float format for pruned or rotated models, was missing)."""
    from lowbit.checkpoint import FORMATS

    text = (DOCS / "design.md").read_text(encoding="utf-8")
    section = text[text.index("## Checkpoints"):]
    first = section[:section.index("\n- ", section.index("\n- ") + 1)]  # the save/load bullet
    assert "`save(compiled, dir, format)`" in first, "design.md's checkpoint bullet moved: update this test"
    assert [f for f in FORMATS if f"`{f}`" not in first] == []


def test_readme_names_every_mlp_output_projection_prune_mlp_knows():
    """README's Pruning section lists the MLP output projections prune-mlp finds by name
    (``pruning_sites.DOWN_PROJECTIONS``); DistilBERT's ``ffn.lin2`` was added to the code and not to the list."""
    from lowbit.passes.pruning_sites import DOWN_PROJECTIONS

    readme = (DOCS.parent / "README.md").read_text(encoding="utf-8")
    listed = re.search(r"by name \((.*?); `pruning_sites\.DOWN_PROJECTIONS`\)", readme, re.S)
    assert listed, "README no longer lists the names before `pruning_sites.DOWN_PROJECTIONS`: update this test"
    names = set(re.findall(r"`([\w.]+)`", listed.group(1)))
    assert [n for n in DOWN_PROJECTIONS if n not in names] == []
