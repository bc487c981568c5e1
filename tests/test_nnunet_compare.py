"""benchmarks/nnunet: the training-time bookkeeping of the cfseg / nnU-Net comparison (no nnU-Net needed)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"nnunet_{name}", ROOT / "benchmarks" / "nnunet" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


LOG = """t: cfseg-equal: train seconds/iteration 22.967 (epoch 0, 75 iterations, load average 1.01)
t: cfseg-equal: train seconds/iteration 21.246 (epoch 1, 75 iterations, load average 1.00)
t: cfseg-equal: train seconds/iteration 31.345 (epoch 2, 75 iterations, load average 3.02)
"""


def test_training_log_gives_cpu_seconds_where_logged_else_quiet_wall_seconds(tmp_path):
    score, compare = _load("score"), _load("compare")
    (tmp_path / "training_log_1.txt").write_text(LOG)
    summary = score.training_summary(tmp_path)
    assert summary["iterations_logged"] == 225 and summary["per_epoch"]["2"]["load_average"] == 3.02
    # no CPU lines: the epochs at a load average <= the core count (wall = CPU there), not the loaded one
    per_it, how = compare.nnunet_cpu_per_iteration(summary, cores=2)
    assert per_it == pytest.approx((22.967 + 21.246) / 2) and "wall" in how
    with pytest.raises(SystemExit, match="no epoch ran"):
        compare.nnunet_cpu_per_iteration(summary, cores=0)
    # a later log with CPU lines: those are used, whatever the load
    (tmp_path / "training_log_2.txt").write_text(
        "x: cfseg-equal: train seconds/iteration 40.0 (epoch 3, 75 iterations, load average 4.00)\n"
        "x: cfseg-equal: train CPU seconds/iteration 21.5 (epoch 3, process CPU time, all threads)\n")
    summary = score.training_summary(tmp_path)
    assert summary["per_epoch"]["3"]["cpu_seconds_per_iteration"] == 21.5
    per_it, how = compare.nnunet_cpu_per_iteration(summary, cores=2)
    assert per_it == 21.5 and "CPU" in how
