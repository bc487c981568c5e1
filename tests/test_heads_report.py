"""benchmarks/openkbp/heads.py: per-case surface metrics and the report's JSON schema on tiny checkpoints."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import make_boxes

ROOT = Path(__file__).resolve().parents[1]
HEADS = ROOT / "benchmarks" / "openkbp" / "heads.py"
TINY_BACKBONE = yaml.safe_load((ROOT / "tests" / "configs" / "tiny.yaml").read_text())["model"]["backbone"]


def _heads_script():
    spec = importlib.util.spec_from_file_location("heads_report", HEADS)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _box(shape=(20, 20, 20), lo=(5, 6, 7), size=6, value=1) -> torch.Tensor:
    t = torch.zeros(shape, dtype=torch.long)
    t[lo[0]:lo[0] + size, lo[1]:lo[1] + size, lo[2]:lo[2] + size] = value
    return t


def test_case_metrics_identical_empty_and_shifted():
    h = _heads_script()
    gt = _box() + _box(lo=(12, 12, 12), size=4, value=2)
    m = h.case_metrics(gt.clone(), gt, [1, 2, 3], (4.0, 4.0, 3.0), 2.0)
    for k in (1, 2):  # prediction == ground truth
        assert m[k]["dice"] == 1.0 and m[k]["hd95_mm"] == 0.0 and m[k]["surface_dice"] == 1.0
    assert m[3] == {"dice": 1.0, "hd95_mm": None, "surface_dice": 1.0, "pred_voxels": 0, "gt_voxels": 0}
    empty = h.case_metrics(torch.zeros_like(gt), gt, [1], (4.0, 4.0, 3.0), 2.0)[1]  # nothing predicted
    assert empty["dice"] == 0.0 and empty["hd95_mm"] is None and empty["surface_dice"] == 0.0
    assert empty["gt_voxels"] == 216 and empty["pred_voxels"] == 0
    # one voxel off along an axis: HD95 is that axis's spacing in mm; within a 3.5 mm tolerance the surfaces agree
    along0 = h.case_metrics(_box(lo=(6, 6, 7)), _box(), [1], (4.0, 4.0, 3.0), 3.5)[1]
    along2 = h.case_metrics(_box(lo=(5, 6, 8)), _box(), [1], (4.0, 4.0, 3.0), 3.5)[1]
    assert along0["hd95_mm"] == pytest.approx(4.0) and along2["hd95_mm"] == pytest.approx(3.0)
    assert along2["surface_dice"] == 1.0 and along0["surface_dice"] < 1.0
    a = np.diag([4.0, 4.0, 3.0, 1.0])
    a[:3, :3] = a[:3, :3] @ np.array([[0, 1, 0], [-1, 0, 0], [0, 0, 1]])  # rotated axes keep their voxel sizes
    assert h.voxel_spacing(a) == pytest.approx((4.0, 4.0, 3.0))


def test_report_schema_cache_and_class_adding(tmp_path):
    from cfseg.data.transforms import Preprocessing
    from cfseg.module import CFSegModule

    h = _heads_script()
    data = make_boxes(tmp_path / "Dataset050_boxes", n_cases=3)
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": ["box0"], "val": [], "test": ["box1", "box2"]}))
    pre = {"ct": Preprocessing(spacing=(4.0, 4.0, 4.0)).to_dict()}
    heads = {"prototype": "prototype", "softmax": "softmax",
             "dodnet": {"class_path": "cfseg.heads.DoDNetHead", "init_args": {"head_channels": 4}},
             "universal": {"class_path": "cfseg.heads.UniversalHead", "init_args": {"controller_channels": 8}}}
    specs = []
    for name, head in heads.items():
        for seed in ((0,) if name == "universal" else (0, 1)):
            torch.manual_seed(seed)
            model = CFSegModule(class_names=["liver", "spleen", "aorta"], backbone=TINY_BACKBONE, feature_channels=8,
                                head=head, preprocessing=pre, roi_size=(16, 16, 16))
            ckpt = {"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}
            model.on_save_checkpoint(ckpt)
            path = tmp_path / f"{name}_s{seed}" / "joint.ckpt"
            path.parent.mkdir()
            torch.save(ckpt, path)
            specs += ["--ckpt", f"{name}:{seed}={path}"]
    args = [*specs, "--data", str(data), "--split", str(split), "--out", str(tmp_path / "out"), "--time-cases", "1",
            "--step-reps", "1", "--step-warmup", "0", "--step-batch", "1", "--step-patch", "16", "--no-memory"]
    report = h.main(args)
    on_disk = json.loads((tmp_path / "out" / "heads.json").read_text())
    assert on_disk == report and (tmp_path / "out" / "heads.png").is_file()
    assert "| dodnet | sigmoid |" in (tmp_path / "out" / "heads.md").read_text()
    assert report["test_cases"] == ["box1", "box2"] and "command" in report and report["dice_convention"]
    for name in heads:
        r = report["heads"][name]
        if name == "universal":  # one seed: no spread
            assert set(r["per_seed"]) == {"0"} and r["mean_dice_spread"] is None
            assert r["mean_dice"] == r["per_seed"]["0"]["mean_dice"] and r["step_s"] > 0
            continue
        for key in ("mean_dice", "per_seed", "per_class", "hd95_mm", "surface_dice", "step_s", "infer_s",
                    "infer_one_class_s", "params", "head_params", "can_add_class"):
            assert key in r, (name, key)
        assert set(r["per_seed"]) == {"0", "1"} and set(r["per_class"]) == {"liver", "spleen", "aorta"}
        assert set(r["per_seed"]["0"]["per_class"]) == {"liver", "spleen", "aorta"}
        seeds = [s["mean_dice"] for s in r["per_seed"].values()]
        assert r["mean_dice"] == pytest.approx(sum(seeds) / 2)
        assert r["mean_dice_spread"] == pytest.approx(abs(seeds[0] - seeds[1]) / 2)
        assert 0 < r["head_params"] < r["params"] and r["step_s"] > 0 and r["infer_s"] > 0
    assert report["heads"]["prototype"]["can_add_class"].startswith("yes: a new text prototype")
    assert report["heads"]["universal"]["can_add_class"].startswith("yes: a new text embedding")
    assert report["heads"]["softmax"]["can_add_class"].startswith("no: a new output channel (classifier row, +9 ")
    assert report["heads"]["dodnet"]["can_add_class"].startswith("no: only by growing the one-hot class code")
    assert report["heads"]["dodnet"]["peak_memory_mib"] is None and report["meta"]["timing"]["memory"] is None
    assert h._memory_cell({"train_step": 812.4, "infer_all": 1500.0, "infer_one": 90.0}) == "812 / 1,500 / 90"
    # every memory task runs end to end on a checkpoint (here in this process, whose heap already holds freed pages,
    # so only that it runs is checked; the measurement itself: test_peak_memory_sees_an_allocation_of_known_size)
    if h.peak_memory_supported():
        one = {"ckpt": str(tmp_path / "dodnet_s0" / "joint.ckpt"), "data": str(data), "split": str(split),
               "one_class": "liver", "step_batch": 1, "step_patch": 16, "threads": 1}
        for task in h.MEMORY_TASKS:
            assert h.memory_job({**one, "task": task}) >= 0.0
    # a rerun reads every case from the caches beside the checkpoints and gives the same scores
    caches = sorted(tmp_path.glob("*_s*/joint.heads_eval.json"))
    assert len(caches) == 7
    stamp = [c.stat().st_mtime_ns for c in caches]
    again = h.main([*args, "--time-cases", "0", "--step-reps", "0"])
    assert [c.stat().st_mtime_ns for c in caches] == stamp
    for seed in ("0", "1"):
        new, old = again["heads"]["dodnet"]["per_seed"][seed], report["heads"]["dodnet"]["per_seed"][seed]
        assert new["seconds_per_case_scoring"] is None  # nothing predicted
        assert {k: new[k] for k in ("per_class", "hd95_mm", "surface_dice", "counts")} == \
            {k: old[k] for k in ("per_class", "hd95_mm", "surface_dice", "counts")}
    assert again["heads"]["dodnet"]["infer_s"] is None


def test_peak_memory_sees_an_allocation_of_known_size():
    h = _heads_script()
    if not h.peak_memory_supported():
        pytest.skip("this OS cannot reset a process's peak resident memory (/proc/self/clear_refs, Linux >= 4.0)")
    # in a fresh process, as the report measures: this test process's heap already holds freed pages (earlier
    # tests, cfseg's mallopt) that a new tensor reuses without raising the resident memory
    code = (f"import importlib.util, torch; spec = importlib.util.spec_from_file_location('h', {str(HEADS)!r}); "
            "h = importlib.util.module_from_spec(spec); spec.loader.exec_module(h); "
            "print(h.peak_memory_mib(lambda: torch.ones(12 * 2**20).sum()), h.peak_memory_mib(lambda: None))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    peak, idle = map(float, out.stdout.split()[-2:])
    assert 46 <= peak <= 48 + 24, peak  # a 48 MiB float32 tensor, freed when the function returns
    assert idle < 8, idle


def test_similarity_map_dice_curve_and_validation_threshold():
    """benchmarks/openkbp/similarity_maps.py: Dice of ``cos > t`` for every t equals a direct count, and the
    threshold is chosen on the validation cases only."""
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks" / "openkbp"))
    try:
        spec = importlib.util.spec_from_file_location("simmaps", ROOT / "benchmarks" / "openkbp" / "similarity_maps.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        sys.path.pop(0)
    rng = np.random.default_rng(0)
    sim = np.round(rng.uniform(-1, 1, (12, 12, 12)), 2)  # values on the threshold grid: ties must not count
    truth = rng.random(sim.shape) < 0.1
    want = [2 * ((sim > t) & truth).sum() / ((sim > t).sum() + truth.sum()) for t in mod.THRESHOLDS]
    np.testing.assert_allclose(mod.dice_curve(sim, truth), want)
    assert (mod.dice_curve(np.full((3, 3), -1.0), np.zeros((3, 3), bool)) == 1).all()  # both empty
    n = len(mod.THRESHOLDS)
    peak = lambda i: [1.0 if j == i else 0.0 for j in range(n)]  # noqa: E731
    cache = {"val": {"a": {"liver": {"head": 0.5, "map": peak(3)}}},
             "test": {"b": {"liver": {"head": 0.7, "map": peak(9)}}}}  # the test cases peak elsewhere
    got = mod.summarise(cache, ["liver"])["per_class"]["liver"]
    assert got["threshold"] == mod.THRESHOLDS[3] and got["map_dice"] == 0.0 and got["head_dice"] == 0.7
