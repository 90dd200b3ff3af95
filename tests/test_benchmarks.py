"""The GPU training-speed benchmark's ``--quick`` CPU mode runs and prints its table (CI check)."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest

from devtools import harness

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_train_speed_quick_prints_finite_numbers():
    if harness.comfyui_path() is None:
        pytest.skip("COMFYUI_PATH is not set to a ComfyUI checkout; the benchmark needs a real ComfyUI")
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    env.pop("DIFFUSERS_TI_SCRIPT", None)  # the diffusers column is a GPU measurement
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "train_speed.py"), "--quick"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "diffusers column skipped" in proc.stdout
    rows = [line for line in proc.stdout.splitlines() if line.startswith("sd15 ")]
    assert len(rows) == 1, proc.stdout
    cells = rows[0].replace("|", " ").split()
    ours, floor, ratio = float(cells[4]), float(cells[6]), float(cells[9])
    assert all(math.isfinite(x) and x > 0 for x in (ours, floor, ratio)), rows[0]
