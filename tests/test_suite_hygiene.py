"""What the test suite leaves behind: a passing test's temporary files do not outlive it.

Tests that compile a SmolLM2 slice with ``-o`` write 100-230 MB each; kept for the last three runs (pytest's
default), ``/tmp/pytest-of-root`` grew to 36 GB on a machine several sessions share.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_a_passing_tests_tmp_path_is_removed_and_a_failing_ones_kept(tmp_path):
    """The project's pytest configuration, on two tests that each write 1 MB to their tmp_path."""
    (tmp_path / "test_writes.py").write_text(
        "def test_passes(tmp_path):\n"
        "    (tmp_path / 'big.bin').write_bytes(bytes(2**20))\n\n"
        "def test_fails(tmp_path):\n"
        "    (tmp_path / 'big.bin').write_bytes(bytes(2**20))\n"
        "    assert False\n")
    base = tmp_path / "base"
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-c", str(ROOT / "pyproject.toml"), "--rootdir",
                          str(tmp_path), "-p", "no:cacheprovider", f"--basetemp={base}", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert "1 failed, 1 passed" in res.stdout, res.stdout + res.stderr
    left = sorted(p.parent.name for p in base.rglob("big.bin"))
    assert left == ["test_fails0"], left
