"""``tools/bench_pruning.py --pruned-speed --speed-model smollm2 --smoke``: the GPU round's SmolLM2 pruned-speed
command, run on the CPU under the Triton interpreter (2 blocks of the real SmolLM2, the heads + MLP accuracy row's
pipeline with a tiny calibration), writes rows whose pruned shapes and speedups come from the run itself."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_smollm2_pruned_speed_smoke_writes_smaller_pruned_rows_with_speedups(tmp_path: Path) -> None:
    """Every row error-free; the pruned rows' kv heads (per layer) and MLP width are below the unpruned ones and
    their removed-params fractions near the row's 20%; each pruned row has a positive speedup equal to the unpruned
    row's time over its own (same scheme, phase, batch), and the prune ran once (one prune_seconds for all)."""
    out = tmp_path / "speed.json"
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join([str(ROOT),
                                                                                  os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run([sys.executable, "tools/bench_pruning.py", "--pruned-speed", "--speed-model", "smollm2",
                          "--smoke", "--speed-budget", "1200", "--out", str(out)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert {r["scheme"] for r in rows} == {"float-bf16", "w4a16-g64"}
    assert all(r["area"] == "pruned-speed-20-heads-mlp-smollm2" for r in rows)
    errors = [r for r in rows if "error" in r]
    assert not errors, errors
    unpruned = {(r["scheme"], r["phase"], r["batch"]): r for r in rows if not r["pruned"]}
    pruned = [r for r in rows if r["pruned"]]
    assert len(pruned) == len(unpruned) == 4  # 2 schemes x (decode at batch 2, prefill at batch 1)
    for r in pruned:
        ref = unpruned[(r["scheme"], r["phase"], r["batch"])]
        assert len(r["kv_heads"]) == len(ref["kv_heads"]) == 2
        assert all(p <= u for p, u in zip(r["kv_heads"], ref["kv_heads"]))
        assert sum(r["kv_heads"]) < sum(ref["kv_heads"])
        assert r["mlp_width"] < ref["mlp_width"] == 1536
        assert 0.15 < r["params_removed_frac_blocks"] < 0.25 and 0 < r["params_removed_frac_total"] < 0.1
        assert ref["params_removed_frac_blocks"] == 0.0
        time_key = "ms_per_step" if r["phase"] == "decode" else "prefill_ms"
        assert r["unpruned_" + time_key] == ref[time_key]
        assert r["speedup"] > 0 and r["speedup"] == pytest.approx(ref[time_key] / r[time_key], rel=0.01, abs=2e-3)
        assert r["kernels"].startswith("triton:")
    assert len({r["prune_seconds"] for r in pruned}) == 1
