"""Regenerate the README's result tables from ``bench/results/*.json`` (never typed by hand).

Each table sits between ``<!-- results:NAME -->`` and ``<!-- /results:NAME -->`` in README.md, where NAME is
a results file's stem (``accuracy``, ``onnx``, ...). Filters after the name pick rows of a file that holds
several models or runs: ``<!-- results:accuracy model=minilm-l6 device~cuda -->`` (``=`` exact, ``~``
substring, ``!=`` anything but; all must hold); ``cols=a,b,c`` picks the columns of that one table. Usage:
``python tools/readme_tables.py [--check]``; ``--check`` exits 1 when the README is stale.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PREFERRED = ["model", "scheme", "method", "variant", "eval", "value", "float_value", "ratio", "min_cos", "backend", "format",
             "kernel", "M", "K", "N", "us", "baseline", "baseline_us", "speedup", "latency_ms", "param_mb", "calib",
             "pass_seconds", "learn_seconds", "learn_rss_mb", "kurtosis", "seconds", "cpu_seconds", "load_avg_before", "pipeline"]
"""Columns shown, in order; other keys stay in the JSON (command lines, byte counts, per-run notes)."""
COLUMNS = {
    "pruning": ["scheme", "method", "variant", "eval", "value", "float_value", "ratio", "params_removed_frac_blocks",
                "params_removed_frac_total", "sparsity_measured", "recovery", "pass_seconds", "pipeline"],
    "onnx": ["run", "variant", "scheme", "format", "value", "ppl_ratio", "latency_ms", "latency_ms_min", "file_mb",
             "parity_rel", "tensorrt_qdq_errors", "tensorrt_qdq_rules", "onnx_ops"],
    "memory": ["model", "model_mib", "run", "limit_mib", "dtype", "lowering", "offload", "ok", "peak_anon_mib",
               "peak_rss_mib", "cgroup_peak_mib", "max_logit_diff", "seconds", "pipeline", "format"],
}
"""Per results file: its own columns, in order, instead of ``PREFERRED``."""
PIVOT_ID = {
    "a8_gemm": ["run", "M", "kernel", "config", "gemm"],
    "e2e_backend": ["run", "scheme", "path", "variant"],
    "generate": ["model", "scheme", "method"],
}
"""Per results file: the columns that name one line of a pivoted table."""
PIVOT_CARRY = {"e2e_backend": ["gpu_memory_mib"], "generate": ["peak_mem_mib"]}
"""Per results file: columns shown on a pivoted line (its first row that has one), not part of its name."""
DIGITS = {"onnx": {"value": 4}}
"""Per results file: decimals for columns whose differences are below ``_fmt``'s 4 significant digits."""
SORT = {"accuracy": ("model", "eval", "scheme", "value")}
"""Per results file: row order (value ascending for perplexity, descending for cosine)."""


def _fmt(v: object) -> str:
    if isinstance(v, dict):  # op or rule counts: short names, one cell
        return ", ".join(f"{str(k).replace('com.microsoft::', 'ms:')} {_fmt(n)}" for k, n in v.items())
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1000 else f"{v:.1f}"
    return "" if v is None else str(v)


def _sort_key(row: dict, keys: tuple[str, ...]) -> tuple:
    """Text keys as text; ``value`` best first (lower perplexity, higher cosine), rows without one last."""
    out: list = []
    for k in keys:
        if k == "value":
            v = row.get("value")
            better_high = row.get("eval") == "minilm-cos"
            out.append(float("inf") if not isinstance(v, (int, float)) else (-v if better_high else v))
        else:
            out.append(str(row.get(k, "")))
    return tuple(out)


def _keep(row: dict, data: dict, filters: str) -> bool:
    """Whether ``row`` passes every ``key=value`` / ``key~substring`` / ``key!=value`` filter (``device`` falls back
    to the file's); ``key=a|b`` keeps either value, ``key!=a|b`` neither."""
    for f in filters.split():
        key, op, want = re.match(r"(\w+)(!=|[=~])(.*)", f).groups()  # type: ignore[union-attr]
        have = str(row.get(key, data.get(key, "")))
        if ((op == "=" and have not in want.split("|")) or (op == "~" and want not in have)
                or (op == "!=" and have in want.split("|"))):
            return False
    return True


def table(path: Path, filters: str = "") -> str:
    data = json.loads(path.read_text())
    pivot = re.search(r"\bpivot=(\w+):(\w+)", filters)
    cols = re.search(r"\bcols=(\S+)", filters)
    filters = re.sub(r"\b(pivot|cols)=\S+", "", filters)
    rows = [r for r in data.get("rows", []) if _keep(r, data, filters)]
    if pivot:
        return _pivot(path, data, rows, *pivot.groups())
    for r in rows:
        if "value" in r and isinstance(r.get("float_value"), (int, float)) and r["float_value"] and "ratio" not in r:
            if r.get("eval", "").startswith("wt2"):
                r["ratio"] = r["value"] / r["float_value"]
    keys: list[str] = []
    for k in cols.group(1).split(",") if cols else COLUMNS.get(path.stem, PREFERRED):
        if any(k in r for r in rows):
            keys.append(k)
    devices = {r.get("device", data.get("device")) for r in rows}
    if len(devices) > 1 and "device" not in keys:
        keys.append("device")
    if path.stem in SORT:
        rows = sorted(rows, key=lambda r: _sort_key(r, SORT[path.stem]))
    commands = sorted({r.get("command") or data.get("command", "") for r in rows}) or [data.get("command", "")]
    dates = sorted({r.get("date", data.get("date", "")) for r in rows})
    lines = [f"Source: `{path.relative_to(ROOT)}` — " + "; ".join(f"`{c}`" for c in commands)
             + f" ({', '.join(dates)}, {'; '.join(sorted(d for d in devices if d)) or 'per row'})", "",
             "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        digits = DIGITS.get(path.stem, {})
        lines.append("| " + " | ".join(f"{r[k]:.{digits[k]}f}" if k in digits and isinstance(r.get(k), float)
                                       else _fmt(r.get(k)) for k in keys) + " |")
    return "\n".join(lines)


def _pivot(path: Path, data: dict, rows: list[dict], col: str, value: str) -> str:
    """One line per identity (``PIVOT_ID``), one column per distinct ``col``; a cell holds ``value`` or the row's
    error (shortened), so a failed shape shows as failed rather than missing."""
    ident = [k for k in PIVOT_ID.get(path.stem, PREFERRED) if any(k in r for r in rows)]
    carry = [k for k in PIVOT_CARRY.get(path.stem, []) if any(k in r for r in rows)]
    heads: list[str] = []
    lines: dict[tuple, dict[str, str]] = {}
    for r in rows:
        if col not in r:
            continue
        c = str(r[col])
        if c not in heads:
            heads.append(c)
        cell = _fmt(r.get(value)) if r.get(value) is not None else ("failed" if r.get("error") else "")
        line = lines.setdefault(tuple(_fmt(r.get(k)) for k in ident), {})
        line[c] = cell
        for k in carry:
            if not line.get(k) and r.get(k) is not None:
                line[k] = _fmt(r[k])
    devices = sorted({str(r.get("device", data.get("device", ""))) for r in rows})
    dates = sorted({str(r.get("date", data.get("date", ""))) for r in rows})
    out = [f"Source: `{path.relative_to(ROOT)}` — `{data.get('command', '')}` ({', '.join(dates)}, "
           f"{'; '.join(devices)}); {value} by {col}", "",
           "| " + " | ".join(ident + carry + heads) + " |", "|" + "---|" * (len(ident) + len(carry) + len(heads))]
    for key, cells in lines.items():
        out.append("| " + " | ".join(list(key) + [cells.get(h, "") for h in carry + heads]) + " |")
    return "\n".join(out)


def render(readme: str) -> str:
    def repl(m: re.Match[str]) -> str:
        name, filters = m.group(1), (m.group(2) or "").strip()
        path = ROOT / "bench" / "results" / f"{name}.json"
        body = table(path, filters) if path.is_file() else f"(no `bench/results/{name}.json` yet)"
        opening = f"<!-- results:{name} {filters} -->" if filters else f"<!-- results:{name} -->"
        return f"{opening}\n{body}\n<!-- /results:{name} -->"

    return re.sub(r"<!-- results:(\w+)((?: [\w]+(?:!=|[=~])[^ >]+)*) ?-->.*?<!-- /results:\1 -->", repl, readme, flags=re.S)


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
