"""`make gpu-check` on a machine without a GPU stops at its preflight, says why, and runs nothing else."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_gpu_check_stops_cleanly_at_the_preflight_without_a_gpu(tmp_path):
    out = tmp_path / "out"
    completed = subprocess.run(["make", "--no-print-directory", "gpu-check", f"OUT={out}"], cwd=REPO, capture_output=True,
                               text=True, timeout=300, check=False)
    if json.loads((out / "preflight.json").read_text())["device"] is not None:
        pytest.skip("this machine has a GPU: gpu-check runs its steps instead")
    assert completed.returncode != 0
    assert "gpu-check stopped at the preflight, nothing else ran" in completed.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == [] and summary["preflight"]["problems"]
    assert sorted(p.name for p in out.iterdir()) == ["preflight.json", "summary.json"]
