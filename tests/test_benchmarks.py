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


def test_dynamic_vram_check_quick_compares_both_modes():
    """The GPU check of training under dynamic VRAM (issue 22) runs on the CPU: two processes started as
    ComfyUI's main.py starts, the same vectors from both, the devices and step times printed."""
    if harness.comfyui_path() is None:
        pytest.skip("COMFYUI_PATH is not set to a ComfyUI checkout; the check needs a real ComfyUI")
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "dynamic_vram_check.py"), "--quick"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "| UNet ran on | cpu | cpu |" in out and "| clip_l ran on | cpu | cpu |" in out, out
    assert "final vectors after 2 steps: max |on - off| = 0 " in out, out
    step = next(line for line in out.splitlines() if line.startswith("| step time"))
    assert all(float(x) > 0 for x in step.strip("|").split("|")[1:]), step


def test_paired_bootstrap_interval_covers_the_true_shift_and_excludes_zero():
    """Seeds share their noise: a method that is 0.1 better on every seed, under per-seed noise 5x
    larger than the shift, is detected by the paired difference (the unpaired spread would hide it)."""
    import random

    from benchmarks.world_stats import bootstrap_ci, paired_difference

    rng = random.Random(1)
    base = {s: rng.gauss(0.5, 0.5) for s in range(12)}
    method = {s: base[s] + 0.1 + rng.gauss(0, 0.01) for s in range(12)}
    d = paired_difference(method, base)
    assert d["low"] > 0 and d["low"] < 0.1 < d["high"] and d["ahead"] == 12 and d["seeds"] == 12
    m, lo, hi = bootstrap_ci([1.0, 1.0, 1.0])
    assert (m, lo, hi) == (1.0, 1.0, 1.0)
    same = paired_difference(base, base)
    assert same["low"] == same["high"] == 0.0 and same["ahead"] == same["behind"] == 0


def test_steps_to_threshold_needs_a_sustained_crossing_and_reports_never():
    from benchmarks.world_stats import INF, median_ci, seconds_to_threshold, steps_to_threshold, value_at

    steps = [0, 10, 20, 30, 40]
    assert steps_to_threshold(steps, [0.1, 0.9, 0.2, 0.8, 0.85], 0.8) == 30  # a lone spike at 10 does not count
    assert steps_to_threshold(steps, [0.1, 0.2, 0.3, 0.4, 0.9], 0.8) == INF
    med, lo, hi = median_ci([10.0, 20.0, INF, INF, INF])
    assert med == INF and lo <= 20.0  # most seeds never reach it: the median says so
    assert seconds_to_threshold(30, 0.5, fixed_seconds=4.0) == 19.0 and seconds_to_threshold(INF, 0.5) == INF
    assert value_at([0, 10], [0.0, 1.0], 2.5) == 0.25 and value_at([0, 10], [0.0, 1.0], 99) == 1.0


def test_sign_flip_test_and_holm_correction():
    """The exact sign-flip test gives 2/2^n for n equal positive differences and 1 for no difference;
    Holm multiplies the smallest p by m, the next by m - 1, keeps them monotone and caps them at 1."""
    from benchmarks.world_stats import holm, sign_flip_p

    assert sign_flip_p([0.1] * 10) == 2 / 1024
    assert sign_flip_p([0.0] * 10) == 1.0
    assert sign_flip_p([0.3, -0.3]) == 1.0
    mixed = sign_flip_p([0.2, 0.1, -0.05, 0.15, 0.1, 0.2, -0.02, 0.1, 0.12, 0.08])
    assert 0.0 < mixed < 0.05
    assert holm([0.01, 0.04, 0.03]) == [0.03, 0.06, 0.06]
    assert holm([0.5, 0.001]) == [0.5, 0.002] and holm([0.9, 0.8]) == [1.0, 1.0]
