"""What the test suite leaves behind: a passing test's temporary files do not outlive it.

Tests that compile a SmolLM2 slice with ``-o`` write 100-230 MB each; kept for the last three runs (pytest's
default), ``/tmp/pytest-of-root`` grew to 36 GB on a machine several sessions share.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

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


def test_the_clis_cached_models_are_released_after_each_test_file(tmp_path):
    """Commands run in-process (CliRunner) keep the models and graphs they loaded in ``lowbit.cli.common``'s caches,
    and test_cli.py's left a second float32 SmolLM2 (beside the session fixture's), MiniLM and their graphs alive for
    the rest of the session (~180 MiB more at the peak of the next file that loads a model). The conftest drops them
    when a test file ends; within a file they are shared."""
    (tmp_path / "test_a_fills.py").write_text(
        "import lowbit.cli.common as common\n\n"
        "def test_fills():\n"
        "    common._MODELS['x'] = object()\n"
        "    common._GRAPHS['x'] = object()\n\n"
        "def test_same_file_still_shares():\n"
        "    assert 'x' in common._MODELS\n")
    (tmp_path / "test_b_reads.py").write_text(
        "import lowbit.cli.common as common\n\n"
        "def test_released():\n"
        "    assert not common._MODELS and not common._GRAPHS\n")
    env = {**__import__("os").environ,
           "PYTHONPATH": __import__("os").pathsep.join([str(ROOT / "tests"), str(ROOT)])}
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "conftest", "-p", "no:cacheprovider",
                          "-c", str(ROOT / "pyproject.toml"), "--rootdir", str(tmp_path),
                          str(tmp_path / "test_a_fills.py"),
                          str(tmp_path / "test_b_reads.py")], capture_output=True, text=True, timeout=120, env=env,
                         cwd=tmp_path)
    assert "3 passed" in res.stdout, res.stdout + res.stderr


def test_a_smollm2_slice_copies_only_the_blocks_it_keeps(smollm2, monkeypatch):
    """conftest's ``smollm2_slice`` deep-copied the whole 30-block SmolLM2 (540 MB) and then cut the copy: 3-10 s a
    call, and the suite makes dozens. It copies only the blocks it keeps; the slice owns its weights (a test may
    change them) and the session's model keeps all its blocks, untouched."""
    from conftest import smollm2_slice

    model = smollm2[0]
    blocks = len(model.model.layers)

    def copied(memo: dict) -> None:
        raise AssertionError("smollm2_slice copied a block it drops")

    monkeypatch.setattr(model.model.layers[2], "__deepcopy__", copied, raising=False)
    sliced = smollm2_slice(model, 2, torch.bfloat16)
    inner = sliced.model.model
    assert len(inner.layers) == 2 and sliced.model.config.num_hidden_layers == 2
    assert len(model.model.layers) == blocks == model.config.num_hidden_layers
    ours = {t.data_ptr() for t in model.parameters()}
    assert not any(p.data_ptr() in ours for p in sliced.parameters())
    assert {p.dtype for p in sliced.parameters()} == {torch.bfloat16}
    assert torch.equal(inner.layers[1].mlp.down_proj.weight, model.model.layers[1].mlp.down_proj.weight.bfloat16())
