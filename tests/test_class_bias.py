"""benchmarks/openkbp/class_bias.py: the per-class logit bias sweep and the inside-ground-truth summary."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "openkbp" / "class_bias.py"


def _load():
    sys.path.insert(0, str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("class_bias", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _case() -> dict:
    """Background, class 1 (large, confident) and class 2 (small, always one logit unit behind class 1 or bg)."""
    label = torch.zeros(20, dtype=torch.long)
    label[:8] = 1
    label[8:12] = 2
    logits = torch.zeros(3, 20)
    logits[0] = 2.0
    logits[1, :8] = 4.0
    logits[2, 8:12] = 1.0  # class 2 is second inside its own ground truth (background 2.0 wins)
    return {"logits": logits, "label": label, "annotated": torch.tensor([True, True, True])}


def test_a_bias_recovers_an_outvoted_class_and_others_keep_their_dice():
    cb = _load()
    rows = cb.sweep([_case()], 2, [0.0, 0.5, 1.5])
    assert rows[0]["dice"] == 0.0 and rows[1]["dice"] == 0.0  # 1.0 + 0.5 < 2.0: still outvoted
    assert rows[2]["dice"] == 1.0  # 1.0 + 1.5 > 2.0: exactly its four voxels
    assert all(r["others_dice"] == 1.0 for r in rows)  # class 1 never loses a voxel
    too_much = cb.sweep([_case()], 2, [4.5])[0]  # 0 + 4.5 > 4.0: class 2 takes every voxel, class 1's too
    assert too_much["others_dice"] == 0.0 and too_much["dice"] < 1.0


def test_inside_gt_reports_the_winner_and_the_top2_rank():
    cb = _load()
    out = cb.inside_gt([_case()], 2, ["background", "a", "b"])
    assert out["voxels"] == 4
    assert out["winner_fraction"] == {"background": 1.0}
    assert out["top2_fraction"] == 1.0
    assert 0.2 < out["mean_prob"] < 0.3  # softmax of (2, 0, 1) at index 2
