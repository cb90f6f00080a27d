"""Write the README's architecture matrix (family × step: works / refused with the reason) from the tests.

Runs ``tests/test_architectures.py`` (every cell, slow ones included) with ``LOWBIT_ARCH_MATRIX`` pointing at a
JSON-lines file the tests append their outcomes to, then replaces the block between
``<!-- arch-matrix -->`` and ``<!-- /arch-matrix -->`` in README.md. A cell that failed its test is shown as
FAILED, so the table never claims more than the tests showed.

    python tools/arch_matrix.py            # run the tests, rewrite the README block
    python tools/arch_matrix.py --from F   # render from an existing outcomes file
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

SHORT = [
    (r"post-norm encoder.*", "refused: post-norm (norm output feeds the residual)"),
    (r"no place to fold scales.*", "refused: no norm/gated site to fold scales into"),
    (r"lowbit records no HF wrapper.*", "refused: no HF wrapper recorded for pixel models"),
    (r"has no causal-LM head.*", "refused: not a causal LM (no lm_head to generate with)"),
    (r"sandwich / post-norm.*", "refused: post-norm gains on the residual stream"),
    (r"residual stream cannot be rotated: .*is a LayerNorm.*", "refused: LayerNorm subtracts the mean"),
    (r"residual stream cannot be rotated: .*no embedding node.*", "refused: no token embedding starts the stream"),
]


def short(outcome: str) -> str:
    if outcome == "works":
        return "works"
    reason = outcome.removeprefix("refused: ")
    reason = re.sub(r"^pass [^:]+ failed: pass [\w-]+: ", "", reason)
    for pattern, text in SHORT:
        if re.search(pattern, reason):
            return text
    return "refused: " + reason[:80]


def render(rows: list[dict[str, str]], passed: dict[tuple[str, str], bool]) -> str:
    from test_architectures import FAMILIES, STEPS

    cells = {(r["family"], r["step"]): r["outcome"] for r in rows}
    lines = ["| family | " + " | ".join(STEPS) + " |", "|---|" + "---|" * len(STEPS)]
    for fam in FAMILIES:
        out = []
        for step in STEPS:
            o = cells.get((fam, step))
            if o is None:
                out.append("not run")
            elif not passed.get((fam, step), True):
                out.append(f"FAILED ({short(o)})")
            else:
                out.append(short(o))
        lines.append(f"| {fam} | " + " | ".join(out) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--from", dest="source", type=Path, help="outcomes JSON-lines file from an earlier run")
    ap.add_argument("--readme", type=Path, default=ROOT / "README.md")
    args = ap.parse_args()
    passed: dict[tuple[str, str], bool] = {}
    if args.source is None:
        sink = Path(tempfile.mkstemp(suffix=".jsonl")[1])
        report = Path(tempfile.mkstemp(suffix=".txt")[1])
        env = {**os.environ, "LOWBIT_ARCH_MATRIX": str(sink), "LOWBIT_SLOW": "1", "PYTHONPATH": str(ROOT)}
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rA",
               str(ROOT / "tests" / "test_architectures.py")]
        res = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
        report.write_text(res.stdout)
        for m in re.finditer(r"^(PASSED|FAILED) \S+::test_architecture_step\[([^\]]+)\]", res.stdout, re.M):
            fam, step = _split_id(m.group(2))
            passed[(fam, step)] = m.group(1) == "PASSED"
        source = sink
    else:
        source = args.source
    rows = [json.loads(line) for line in source.read_text().splitlines() if line.strip()]
    table = render(rows, passed)
    text = args.readme.read_text()
    block = f"<!-- arch-matrix -->\n{table}\n<!-- /arch-matrix -->"
    if "<!-- arch-matrix -->" in text:
        text = re.sub(r"<!-- arch-matrix -->.*?<!-- /arch-matrix -->", lambda _: block, text, flags=re.S)
    else:
        text += "\n" + block + "\n"
    args.readme.write_text(text)
    print(table)


def _split_id(test_id: str) -> tuple[str, str]:
    from test_architectures import STEPS

    for step in STEPS:
        if test_id.endswith("-" + step):
            return test_id[: -len(step) - 1], step
    return test_id, ""


if __name__ == "__main__":
    main()
