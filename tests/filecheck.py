"""A small FileCheck (LLVM's lit tool) for lowbit's IR text: ``CHECK:``, ``CHECK-NEXT:``, ``CHECK-NOT:``.

Checks are matched in order against the text, each as a substring of one line:

- ``CHECK: p``      the first line at or after the current position containing ``p``;
- ``CHECK-NEXT: p`` the line right after the previous match (so a chain of them pins consecutive lines);
- ``CHECK-NOT: p``  no line between the previous match and the next positive match (or the end) contains ``p``.

Runs of spaces in a pattern match any run of horizontal whitespace, and ``{{regex}}`` embeds a Python regular
expression (``%{{.*}}_wdq``), as in FileCheck. A failure names the check's file and line, and shows the text
where the search was.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

DIRECTIVE = re.compile(r"^\s*//\s*(CHECK|CHECK-NEXT|CHECK-NOT):(.*)$")


@dataclass(frozen=True)
class Check:
    kind: str  # CHECK, CHECK-NEXT, CHECK-NOT
    pattern: str
    line: int  # 1-based line of the directive in its file
    regex: re.Pattern[str]


class CheckFailure(AssertionError):
    pass


def compile_pattern(pattern: str) -> re.Pattern[str]:
    """A FileCheck pattern as a regex: literal text (whitespace runs flexible) and ``{{regex}}`` pieces."""
    out, pos = [], 0
    for m in re.finditer(r"\{\{(.*?)\}\}", pattern):
        out.append(_literal(pattern[pos:m.start()]))
        out.append(f"(?:{m.group(1)})")
        pos = m.end()
    out.append(_literal(pattern[pos:]))
    return re.compile("".join(out))


def _literal(text: str) -> str:
    return r"[ \t]+".join(re.escape(part) for part in re.split(r"[ \t]+", text))


def parse_checks(text: str) -> list[Check]:
    checks = []
    for i, line in enumerate(text.splitlines(), 1):
        m = DIRECTIVE.match(line)
        if m:
            pattern = m.group(2).strip()
            if not pattern:
                raise ValueError(f"line {i}: {m.group(1)} with an empty pattern")
            checks.append(Check(m.group(1), pattern, i, compile_pattern(pattern)))
    if checks and checks[0].kind == "CHECK-NEXT":
        raise ValueError(f"line {checks[0].line}: CHECK-NEXT has no previous match")
    return checks


def filecheck(checks: list[Check], text: str, where: str = "<checks>") -> None:
    """Match ``checks`` against ``text`` in order; raise ``CheckFailure`` at the first that does not hold."""
    lines = text.splitlines()
    pos = 0  # index of the first line not yet consumed
    last = -1  # index of the previous positive match
    pending_not: list[Check] = []

    def context(start: int) -> str:
        shown = lines[start:start + 8]
        return "\n".join(f"    {start + k + 1:>4}| {ln}" for k, ln in enumerate(shown)) or "    (end of text)"

    def check_nots(upto: int) -> None:
        for c in pending_not:
            for k in range(last + 1, upto):
                if c.regex.search(lines[k]):
                    raise CheckFailure(f"{where}:{c.line}: CHECK-NOT: {c.pattern!r} found on text line {k + 1}:\n"
                                       f"    {lines[k]}")
        pending_not.clear()

    for c in checks:
        if c.kind == "CHECK-NOT":
            pending_not.append(c)
            continue
        if c.kind == "CHECK-NEXT":
            k = last + 1
            if k >= len(lines) or not c.regex.search(lines[k]):
                got = lines[k] if k < len(lines) else "(end of text)"
                raise CheckFailure(f"{where}:{c.line}: CHECK-NEXT: {c.pattern!r} is not on the line after the "
                                   f"previous match (text line {k + 1}):\n    {got}")
        else:
            k = next((j for j in range(pos, len(lines)) if c.regex.search(lines[j])), -1)
            if k < 0:
                raise CheckFailure(f"{where}:{c.line}: CHECK: {c.pattern!r} not found from text line {pos + 1}:\n"
                                   + context(pos))
        check_nots(k)
        last, pos = k, k + 1
    check_nots(len(lines))
