"""tools/results_io.merge_rows: which rows a new run replaces in a results file.

The benchmarks under ``tools/`` are scripts, not a package; the test imports ``results_io`` from that folder.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

from results_io import CALIB_ROW_KEY, ROW_KEY, merge_rows  # noqa: E402


def _row(method: str, value: float, **extra: object) -> dict:
    return {"model": "m", "scheme": "w4a4kv4", "method": method, "variant": "", "eval": "wt2-512x40",
            "device": "cpu", "value": value, **extra}


def _rows(out: Path) -> list[dict]:
    return json.loads(out.read_text())["rows"]


def test_row_key_replaces_same_key_and_keeps_others(tmp_path):
    out = tmp_path / "r.json"
    merge_rows(out, {"command": "a"}, [_row("rtn", 1.0), _row("gptq", 2.0)])
    merge_rows(out, {"command": "b"}, [_row("gptq", 3.0)])
    assert [(r["method"], r["value"]) for r in _rows(out)] == [("rtn", 1.0), ("gptq", 3.0)]
    assert json.loads(out.read_text())["command"] == "b"


def test_row_key_ignores_calib(tmp_path):
    """The default key leaves calibration out: benches that key on it opt in with CALIB_ROW_KEY."""
    out = tmp_path / "r.json"
    merge_rows(out, {}, [_row("gptq", 1.0, calib="c 120x512")])
    merge_rows(out, {}, [_row("gptq", 2.0, calib="c 16x512")], key=ROW_KEY)
    assert [r["value"] for r in _rows(out)] == [2.0]


def test_calib_key_keeps_rows_of_other_calibration_sizes(tmp_path):
    out = tmp_path / "r.json"
    merge_rows(out, {}, [_row("gptq", 1.0, calib="c 120x512")], key=CALIB_ROW_KEY)
    merge_rows(out, {}, [_row("gptq", 2.0, calib="c 16x512")], key=CALIB_ROW_KEY)
    assert sorted((r["calib"], r["value"]) for r in _rows(out)) == [("c 120x512", 1.0), ("c 16x512", 2.0)]
    merge_rows(out, {}, [_row("gptq", 3.0, calib="c 16x512")], key=CALIB_ROW_KEY)  # same calibration: replaced
    assert sorted((r["calib"], r["value"]) for r in _rows(out)) == [("c 120x512", 1.0), ("c 16x512", 3.0)]


def test_calib_key_groups_rows_without_calib_as_row_key_does(tmp_path):
    """A missing field and ``calib: None`` (a row that calibrates nothing, a float row) are one key, so a re-run
    neither duplicates nor drops rows written before the field existed."""
    out = tmp_path / "r.json"
    old = [_row("float", 1.0), _row("rtn", 2.0, calib=None), _row("gptq", 3.0, calib="c 16x512")]
    merge_rows(out, {}, old, key=CALIB_ROW_KEY)
    rerun = [_row("float", 1.5, calib=None), _row("rtn", 2.5), _row("gptq", 3.5, calib="c 16x512")]
    merge_rows(out, {}, rerun, key=CALIB_ROW_KEY)
    assert [(r["method"], r["value"]) for r in _rows(out)] == [("float", 1.5), ("rtn", 2.5), ("gptq", 3.5)]


def test_a_kept_header_still_takes_the_appended_command(tmp_path):
    """``replace_header=False`` keeps the file's versions and notes; ``append_command`` still records the run
    (once, even when it runs again)."""
    out = tmp_path / "r.json"
    merge_rows(out, {"command": "a", "note": "first", "versions": {"torch": "1"}}, [_row("rtn", 1.0)])
    for _ in range(2):
        merge_rows(out, {"command": "b", "versions": {"torch": "2"}}, [_row("gptq", 2.0)], replace_header=False,
                   append_command=True)
    top = json.loads(out.read_text())
    assert top["command"] == "a; b" and top["note"] == "first" and top["versions"] == {"torch": "1"}
    assert [r["method"] for r in top["rows"]] == ["rtn", "gptq"]


def test_appended_runs_keep_every_runs_notes(tmp_path):
    """A run with its own ``notes`` (what its rows mean) does not drop an earlier run's; the same notes again are
    kept once."""
    out = tmp_path / "r.json"
    merge_rows(out, {"command": "a", "notes": "speed rows: 12 layers"}, [_row("rtn", 1.0)])
    for _ in range(2):
        merge_rows(out, {"command": "b", "notes": "accuracy rows: one-shot"}, [_row("gptq", 2.0)],
                   append_command=True)
    top = json.loads(out.read_text())
    assert top["notes"] == "accuracy rows: one-shot | speed rows: 12 layers"
    merge_rows(out, {"command": "c"}, [_row("awq", 3.0)], append_command=True)
    assert json.loads(out.read_text())["notes"] == "accuracy rows: one-shot | speed rows: 12 layers"


def test_an_appended_command_that_begins_an_earlier_one_is_still_recorded(tmp_path):
    """``run --run x2`` recorded first does not make ``run --run x`` look recorded (session 21 lost a command so);
    a command recorded with a note after it counts as recorded."""
    out = tmp_path / "r.json"
    merge_rows(out, {"command": "run --run x2"}, [_row("rtn", 1.0)])
    merge_rows(out, {"command": "run --run x"}, [_row("gptq", 2.0)], append_command=True)
    assert json.loads(out.read_text())["command"] == "run --run x2; run --run x"
    top = json.loads(out.read_text())
    out.write_text(json.dumps({**top, "command": "run --run x2 (session 21: a note)"}))
    merge_rows(out, {"command": "run --run x2"}, [_row("awq", 3.0)], append_command=True)
    assert json.loads(out.read_text())["command"] == "run --run x2 (session 21: a note)"


def test_readme_table_filters_exact_substring_and_not(tmp_path, monkeypatch):
    """``tools/readme_tables.py``'s marker filters: ``=`` (one of ``a|b``), ``~`` (substring) and ``!=`` (none of
    ``a|b``) pick the rows of one results file, in the README's own marker syntax."""
    import readme_tables

    (tmp_path / "bench" / "results").mkdir(parents=True)
    path = tmp_path / "bench" / "results" / "accuracy.json"
    rows = [_row("rtn", 1.0, device="cuda: H200"), _row("gptq", 2.0, device="cuda: H200"),
            _row("kurtail", 3.0, device="cpu", eval="host-memory"), _row("spin", 4.0, eval="gpu-memory")]
    path.write_text(json.dumps({"command": "x", "rows": rows}))

    def methods(filters: str) -> list[str]:
        return [r["method"] for r in rows if readme_tables._keep(r, {}, filters)]

    assert methods("device~cuda") == ["rtn", "gptq"]
    assert methods("method=rtn|spin") == ["rtn", "spin"]
    assert methods("eval!=gpu-memory|host-memory") == ["rtn", "gptq"]
    assert methods("device~cuda eval!=gpu-memory method!=rtn") == ["gptq"]
    monkeypatch.setattr(readme_tables, "ROOT", tmp_path)
    marker = "<!-- results:accuracy eval!=gpu-memory device~cuda -->\nold\n<!-- /results:accuracy -->"
    out = readme_tables.render(marker)
    assert out.startswith("<!-- results:accuracy eval!=gpu-memory device~cuda -->") and "old" not in out
    assert "| rtn |" in out and "| gptq |" in out and "| spin |" not in out and "| kurtail |" not in out


def test_bench_rotation_match_selecting_no_row_says_so_before_any_work(monkeypatch, capsys):
    """``tools/bench_rotation.py --match quarot-seed2$`` captured SmolLM2 and exited 0 having run and written nothing
    (the key it searches ends in the row's description): it now stops at once, naming the pattern and the fix."""
    import bench_rotation
    import pytest

    monkeypatch.setattr(sys, "argv", ["bench_rotation.py", "--match", "quarot-seed2$", "--dry"])
    with pytest.raises(SystemExit) as stopped:
        bench_rotation.main()
    assert "--match 'quarot-seed2$' selects no row" in str(stopped.value) and "'quarot-seed2:'" in str(stopped.value)
    monkeypatch.setattr(sys, "argv", ["bench_rotation.py", "--match", "quarot-seed2:", "--dry"])
    bench_rotation.main()
    assert "w4a4kv4:quarot-seed2:" in capsys.readouterr().out
