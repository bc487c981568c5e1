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


# nnU-Net ends its log lines with a space
NNUNET_EPOCHS = "".join(line + " \n" for line in """2026-12-06 01:58:12.810916: Epoch 0
2026-12-06 01:58:12.811007: Current learning rate: 0.01
2026-12-06 02:12:40.100000: cfseg-equal: train seconds/iteration 11.500 (epoch 0, 75 iterations, load average 2.10)
2026-12-06 02:12:40.100001: cfseg-equal: train CPU seconds/iteration 22.100 (epoch 0, process CPU time, all threads)
2026-12-06 02:12:50.000000: train_loss 0.0431
2026-12-06 02:12:50.000001: val_loss -0.0123
2026-12-06 02:12:50.000002: Pseudo dice [np.float32(0.0), np.float32(0.5123), np.float32(nan)]
2026-12-06 02:12:50.000003: Epoch time: 878.1 s
2026-12-06 02:12:50.100000: Epoch 1
2026-12-06 02:12:50.100001: Current learning rate: 0.00955
""".splitlines())


def test_training_log_keeps_nnunets_own_loss_and_pseudo_dice_per_epoch(tmp_path):
    score = _load("score")
    (tmp_path / "training_log_1.txt").write_text(NNUNET_EPOCHS)
    epoch = score.training_summary(tmp_path)["per_epoch"]["0"]
    assert epoch["train_loss"] == 0.0431 and epoch["val_loss"] == -0.0123
    assert epoch["pseudo_dice"][:2] == [0.0, 0.5123] and epoch["pseudo_dice"][2] != epoch["pseudo_dice"][2]  # nan
    assert epoch["cpu_seconds_per_iteration"] == 22.1
    # epoch 1 has started but not ended: no timing line, so it is not an epoch of the summary
    assert set(score.training_summary(tmp_path)["per_epoch"]) == {"0"}


def _scored(mean_dice: float, cpu_per_it: float) -> dict:
    return {"mean_dice": mean_dice, "per_class": {"mandible": mean_dice}, "mean_hd95_mm": None,
            "mean_surface_dice": mean_dice, "n_cases": 40,
            "training": {"per_epoch": {"0": {"seconds_per_iteration": cpu_per_it, "iterations": 75,
                                             "load_average": 1.0, "cpu_seconds_per_iteration": cpu_per_it}}}}


def test_update_nnunet_keeps_cfsegs_rows_and_their_command(tmp_path, monkeypatch):
    import json

    compare = _load("compare")
    monkeypatch.setattr(compare, "NNUNET_DATA", tmp_path)
    monkeypatch.setattr(compare, "ROOT", tmp_path.parent)
    monkeypatch.setattr(compare, "SPLIT", tmp_path.parent / "split_joint.json")
    out = tmp_path / "comparison.json"
    with pytest.raises(SystemExit, match="nothing to keep"):
        compare.main(["--update", "nnunet", "--out", str(out)])
    cfseg_row = {"points": {"1500": {"0": {"mean_dice": 0.5, "cpu_seconds": 700.0}}}, "missing": []}
    out.write_text(json.dumps({"command": "compare.py (earlier)", "rows": {
        "cfseg_prototype": cfseg_row, "nnunet_equal": {"points": {}, "missing": ["old"]}}}))
    (tmp_path / "equal_terms_s0_it375.json").write_text(json.dumps(_scored(0.0, 20.0)))
    (tmp_path / "equal_terms_s1_it375.json").write_text(json.dumps(_scored(0.25, 22.0)))
    (tmp_path / "step_time_nnunet_own_recipe.json").write_text(json.dumps({"step_cpu_s": 99.0, "data_cpu_s": 1.0}))
    report = compare.main(["--update", "nnunet", "--heads", "prototype", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert list(rows) == ["cfseg_prototype", "nnunet_equal"] and report["rows"] == rows
    assert rows["cfseg_prototype"]["points"] == cfseg_row["points"]
    assert rows["cfseg_prototype"]["command"] == "compare.py (earlier)"
    assert "--update nnunet" in rows["nnunet_equal"]["command"]
    point = rows["nnunet_equal"]["points"]["375"]
    assert point["0"]["cpu_seconds"] == 375 * 20.0 and point["1"]["mean_dice"] == 0.25
    assert report["nnunet_own_step"]["iterations_in_cfseg_budget"] == pytest.approx(7.0)
