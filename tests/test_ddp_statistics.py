"""Under DDP (2 CPU processes, gloo) every statistic a stage accumulates over batches equals one process's over the
same cases: router G/Q and sample counts, the EWC Fisher, the PLOP entropy histogram and thresholds, and the
validation Dice (each case scored once).

Both runs train with ``lr: 0`` (AdamW then leaves the weights exactly as initialised, the same seed in both), on
whole-volume patches without augmentation and one case per batch, so the two runs see the same cases with the same
network and differ only in how the batches are shared out between processes.
"""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cfseg.apps.cli import main as cli

CONFIG = Path(__file__).parent / "configs" / "tiny.yaml"
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def boxes7(tmp_path_factory) -> Path:
    """Seven box cases: 4 training and 3 validation cases (3 on 2 processes: a padding sampler repeats one)."""
    from conftest import make_boxes

    return make_boxes(tmp_path_factory.mktemp("boxes7") / "Dataset051_boxes", n_cases=7)


def fit_args(out: Path, boxes: Path, classes: list[str], devices: int, *extra: str) -> list[str]:
    data = [{"path": str(boxes), "val_fraction": 0.43, "test_fraction": 0.0, "classes": classes}]
    ddp = ["--trainer.strategy=ddp", "--trainer.devices=2"] if devices == 2 else []
    return ["fit", "--config", str(CONFIG), f"--data.datasets={json.dumps(data)}", "--data.spacing=[4.0, 4.0, 4.0]",
            "--data.patch_size=[24, 24, 24]", "--data.augment=none", "--data.batch_size=1", "--data.cache=none",
            "--model.lr=0.0", "--trainer.max_steps=-1", "--trainer.max_epochs=1", "--trainer.limit_val_batches=null",
            f"--trainer.logger.init_args.save_dir={out}", f"--trainer.default_root_dir={out}",
            '--model.statistics={"router_batches": 4, "fisher_batches": 4}', *ddp, *extra]


def fit(out: Path, boxes: Path, classes: list[str], devices: int, *extra: str) -> dict:
    """Train one stage with ``devices`` processes; its checkpoint's metadata and its last validation metrics."""
    args = fit_args(out, boxes, classes, devices, *extra)
    if devices == 1:
        cli(args)
    else:  # Lightning starts the second process by running this command again
        r = subprocess.run([sys.executable, "-m", "cfseg.apps.cli", *args], capture_output=True, text=True,
                           timeout=600, cwd=out)
        assert r.returncode == 0, r.stderr[-3000:]
        assert "world_size=2" in (r.stderr + r.stdout).replace(" ", "") or "GLOBAL_RANK: 1" in r.stderr + r.stdout
    (ckpt,) = out.rglob("tiny.ckpt")
    rows = list(csv.DictReader((next(out.rglob("metrics.csv"))).open()))
    val = {k: float(v) for r in rows for k, v in r.items() if k.startswith("val/") and v}
    return {"path": ckpt, "meta": torch.load(ckpt, weights_only=True, map_location="cpu")["cfseg"], "val": val}


@pytest.fixture(scope="module")
def stage0(boxes7, tmp_path_factory):
    return {n: fit(tmp_path_factory.mktemp(f"stage0_{n}"), boxes7, ["liver", "spleen"], n) for n in (1, 2)}


def test_router_statistics_fisher_and_validation_under_ddp_equal_one_process(stage0):
    one, two = stage0[1]["meta"], stage0[2]["meta"]
    r1, r2 = one["experts"]["router"], two["experts"]["router"]
    print("router n_samples", r1["n_samples"], r2["n_samples"], "trace G", float(r1["G"].trace()),
          float(r2["G"].trace()))
    assert r1["n_samples"] == r2["n_samples"] == [4]  # 4 training cases, one patch each
    torch.testing.assert_close(r2["G"], r1["G"], rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(r2["Q"], r1["Q"], rtol=1e-6, atol=1e-8)
    m1, m2 = one["experts"]["modality_router"]["ridge"], two["experts"]["modality_router"]["ridge"]
    torch.testing.assert_close(m2["G"], m1["G"], rtol=1e-6, atol=1e-8)
    f1, f2 = one["ewc_fisher"], two["ewc_fisher"]
    print("Fisher sum", sum(float(f.sum()) for f in f1.values()), sum(float(f.sum()) for f in f2.values()))
    assert f1.keys() == f2.keys()
    for name in f1:
        torch.testing.assert_close(f2[name], f1[name], rtol=1e-4, atol=1e-12, msg=name)
    v1, v2 = stage0[1]["val"], stage0[2]["val"]
    print("validation", v1, v2)
    assert v1["val/n_cases"] == v2["val/n_cases"] == 3  # each validation case once
    assert {k for k in v1 if "dice" in k} == {k for k in v2 if "dice" in k} >= {"val/mean_dice"}
    for k in v1:
        assert v2[k] == pytest.approx(v1[k], abs=1e-6), k


def test_plop_thresholds_under_ddp_equal_one_process(stage0, boxes7, tmp_path_factory):
    strategy = json.dumps({"class_path": "cfseg.continual.Distill",
                           "init_args": {"pseudo_label": True, "pseudo_threshold_batches": 4}})
    runs = {n: fit(tmp_path_factory.mktemp(f"stage1_{n}"), boxes7, ["aorta"], n,
                   f"--model.previous_checkpoint={stage0[1]['path']}", f"--model.strategy={strategy}")
            for n in (1, 2)}
    s1, s2 = runs[1]["meta"]["strategy_state"], runs[2]["meta"]["strategy_state"]
    print("entropy histogram counts", int(s1["entropy_hist"].sum()), int(s2["entropy_hist"].sum()),
          "thresholds", s1["pseudo_thresholds"].tolist(), s2["pseudo_thresholds"].tolist())
    assert (s1["hist_batches"], s2["hist_batches"]) == (4, 2)  # 4 batches in all, 2 per process
    assert torch.equal(s1["entropy_hist"], s2["entropy_hist"])
    torch.testing.assert_close(s2["pseudo_thresholds"], s1["pseudo_thresholds"])
