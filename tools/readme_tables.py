"""Regenerate the README's result tables from ``bench/results/*.json`` (never typed by hand).

Each table sits between ``<!-- results:NAME -->`` and ``<!-- /results:NAME -->`` in README.md, where NAME is
a results file's stem (``accuracy``, ``onnx``, ...). Usage: ``python tools/readme_tables.py [--check]``;
``--check`` exits 1 when the README is stale.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PREFERRED = ["model", "scheme", "method", "variant", "eval", "value", "float_value", "ratio", "backend", "format",
             "kernel", "M", "K", "N", "us", "baseline", "baseline_us", "speedup", "latency_ms", "param_mb", "calib",
             "seconds", "pipeline"]
"""Columns shown, in order; other keys stay in the JSON (command lines, byte counts, per-run notes)."""


def _fmt(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1000 else f"{v:.1f}"
    return "" if v is None else str(v)


def table(path: Path) -> str:
    data = json.loads(path.read_text())
    rows = data.get("rows", [])
    for r in rows:
        if "value" in r and isinstance(r.get("float_value"), (int, float)) and r["float_value"] and "ratio" not in r:
            if r.get("eval", "").startswith("wt2"):
                r["ratio"] = r["value"] / r["float_value"]
    keys: list[str] = []
    for k in PREFERRED:
        if any(k in r for r in rows):
            keys.append(k)
    devices = {r.get("device", data.get("device")) for r in rows}
    if len(devices) > 1:
        keys.append("device")
    lines = [f"Source: `{path.relative_to(ROOT)}` — `{data.get('command', '')}` ({data.get('date', '')}, "
             f"{data.get('device', 'per row')})", "",
             "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(k)) for k in keys) + " |")
    return "\n".join(lines)


def render(readme: str) -> str:
    def repl(m: re.Match[str]) -> str:
        name = m.group(1)
        path = ROOT / "bench" / "results" / f"{name}.json"
        body = table(path) if path.is_file() else f"(no `bench/results/{name}.json` yet)"
        return f"<!-- results:{name} -->\n{body}\n<!-- /results:{name} -->"

    return re.sub(r"<!-- results:(\w+) -->.*?<!-- /results:\1 -->", repl, readme, flags=re.S)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args()
    readme = ROOT / "README.md"
    old = readme.read_text()
    new = render(old)
    if args.check:
        return int(new != old)
    readme.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
