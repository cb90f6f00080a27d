"""What every benchmark under ``tools/`` writes the same way: the machine's name and row merging into
``bench/results/*.json`` (format: ../shared/RESULTS.md). Imported by the scripts beside it."""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

ROW_KEY = ("model", "scheme", "method", "variant", "eval", "device")
"""Fields that identify a row: a new row replaces an old one with the same values, other rows are kept."""

CALIB_ROW_KEY = (*ROW_KEY, "calib")
"""``ROW_KEY`` and the calibration a row records (``"<text> <n>x<len>"``), for benches run at several calibration
sizes: a ``--calib-n 16`` row then sits beside the ``--calib-n 120`` one instead of replacing it. A row without
the field reads as ``calib`` None, so rows that calibrate nothing group exactly as under ``ROW_KEY``."""


def machine(device: str | torch.device = "cpu") -> str:
    """``cuda: <GPU name>`` or ``cpu: <CPU model>, <cores> cores, <threads> threads``: a row's ``device``."""
    if torch.device(device).type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(torch.device(device))}"
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu: {model or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"


def versions() -> dict[str, str]:
    """The software a result was measured with (a results file's ``versions``): lowbit, torch, python, CUDA, and
    triton / transformers where they are installed."""
    import lowbit

    v = {"lowbit": lowbit.__version__, "torch": torch.__version__, "python": platform.python_version(),
         "cuda": str(torch.version.cuda)}
    for mod in ("triton", "transformers"):
        try:
            v[mod] = __import__(mod).__version__
        except ImportError:
            v[mod] = "not installed"
    return v


def run_header(device: str) -> dict[str, Any]:
    """A speed bench's results header: the command line, today's date, ``device`` and ``versions()``."""
    return {"command": "python " + " ".join(sys.argv), "date": datetime.date.today().isoformat(), "device": device,
            "versions": versions()}


def accuracy_header(device: str, **more: Any) -> dict[str, Any]:
    """A perplexity bench's results header: the command line, today's date, ``device``, the lowbit, torch,
    transformers and python versions, then ``more`` (notes, timings). One form for bench_accuracy, bench_rotation and
    bench_rtn, whose files the README's accuracy tables read side by side."""
    import lowbit

    return {
        "command": "python " + " ".join(sys.argv),
        "date": datetime.date.today().isoformat(),
        "device": device,
        "versions": {"lowbit": getattr(lowbit, "__version__", "dev"), "torch": torch.__version__,
                     "transformers": __import__("transformers").__version__, "python": platform.python_version()},
        **more,
    }


def load_results(out: Path) -> dict:
    """The results file's content, or ``{}`` when it is missing or not valid JSON."""
    if out.is_file():
        try:
            return json.loads(out.read_text())
        except json.JSONDecodeError:
            pass
    return {}


def merge_rows(out: Path, header: dict, rows: list[dict], key: Sequence[str] = ROW_KEY,
               replace_header: bool = True, append_command: bool = False) -> None:
    """Write ``rows`` into ``out``, replacing the rows with the same ``key`` values and keeping the others.

    ``replace_header``: the file's top level becomes ``header`` (the newest run's command and versions);
    False keeps an existing top level (a run that only adds rows of another model). ``append_command``: the
    header's ``command`` is added after the file's earlier ones (``old; new``), so a file filled by several runs
    keeps every command that produced its rows (with either ``replace_header``), and its ``notes`` likewise (a
    different run's notes describe its own rows: session 46 lost the pruned-speed rows' notes to a new header)."""
    old = load_results(out)
    earlier = old.get("command", "")
    if append_command and earlier and header.get("command"):
        new = header["command"]
        # recorded already: one of the earlier commands, as run or with a note after it ("cmd (session N: ...)");
        # not a substring test, which took "--run a" for recorded when "--run a2" was
        known = any(c == new or c.startswith(new + " (") for c in earlier.split("; "))
        header = {**header, "command": earlier if known else f"{earlier}; {new}"}
    ident = lambda r: tuple(r.get(k) for k in key)  # noqa: E731
    new_keys = {ident(r) for r in rows}
    merged = [r for r in old.get("rows", []) if ident(r) not in new_keys] + rows
    top = header if replace_header else ({k: v for k, v in old.items() if k != "rows"} or header)
    if append_command and header.get("command"):
        top = {**top, "command": header["command"]}
    if append_command and old.get("notes"):
        parts = [p for p in [top.get("notes", "")] + old["notes"].split(" | ") if p]
        top = {**top, "notes": " | ".join(dict.fromkeys(parts))}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**top, "rows": merged}, indent=1) + "\n")
