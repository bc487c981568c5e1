"""Shipped configs fix no output folder (issue 37, item 4): checkpoints follow ``--trainer.default_root_dir``, and a
fit never overwrites a checkpoint file it does not resume from unless ``CFSEG_OVERWRITE_CHECKPOINTS=1``."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from conftest import box_dataset

from cfseg.apps.cli import run as cli_run
from cfseg.callbacks import OVERWRITE_ENV

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo.yaml"
SHIPPED = [DEMO, ROOT / "configs" / "examples" / "my_datasets.yaml", *sorted((ROOT / "configs").rglob("*.yaml")),
           *sorted((ROOT / "tests" / "configs").glob("*.yaml"))]
BACKBONE = {"class_path": "monai.networks.nets.UNet",
            "init_args": {"spatial_dims": 3, "in_channels": 1, "out_channels": 8, "channels": [8, 16],
                          "strides": [2], "num_res_units": 0}}


def test_shipped_configs_fix_no_checkpoint_folder():
    for path in SHIPPED:
        callbacks = ((yaml.safe_load(path.read_text()) or {}).get("trainer") or {}).get("callbacks") or []
        for cb in callbacks if isinstance(callbacks, list) else [callbacks]:
            assert "dirpath" not in (cb.get("init_args") or {}), path


def _demo_fit(root_dir: Path, boxes: Path, *extra: str) -> list[str]:
    """``cfseg fit --config configs/demo.yaml`` at a test's size (a two-level network, one or two steps)."""
    small = root_dir.parent / "small.yaml"  # a second config file: demo.yaml's network at a test's size
    small.write_text(yaml.safe_dump({"model": {"backbone": BACKBONE, "feature_channels": 8}}))
    return ["fit", "--config", str(DEMO), "--config", str(small), f"--data.datasets={json.dumps([box_dataset(boxes)])}",
            f"--trainer.default_root_dir={root_dir}", f"--trainer.logger.init_args.save_dir={root_dir}",
            "--data.spacing=[4.0, 4.0, 4.0]", "--data.patch_size=[16, 16, 16]", "--data.cache=none",
            "--trainer.max_epochs=-1", "--trainer.limit_val_batches=0", "--trainer.enable_progress_bar=false",
            *extra]


def test_demo_config_checkpoints_follow_default_root_dir_and_are_not_overwritten(boxes, tmp_path, capsys,
                                                                                 monkeypatch):
    monkeypatch.chdir(tmp_path)  # a fixed folder in the config would land here
    first = tmp_path / "first"
    assert cli_run(_demo_fit(first, boxes, "--trainer.max_steps=2")) == 0
    ckpt = first / "checkpoints" / "cfseg-demo.ckpt"
    assert ckpt.is_file() and (first / "checkpoints" / "last.ckpt").is_file()
    assert not (tmp_path / "results").exists()  # nothing under the config's own results/demo
    before = ckpt.read_bytes()

    # a second fit into the same folder, not resuming: refused in one line naming the file and the way out
    capsys.readouterr()
    assert cli_run(_demo_fit(first, boxes, "--trainer.max_steps=1")) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("cfseg: error:")]
    assert len(err) == 1, err
    assert err[0] == (f"cfseg: error: {ckpt} exists and this fit would overwrite it (it does not resume from it); "
                      "write elsewhere (--trainer.default_root_dir=<new folder>, or "
                      "--trainer.callbacks.init_args.dirpath=<new folder>), resume it "
                      f"(--ckpt_path={ckpt}), or set {OVERWRITE_ENV}=1 to replace it"), err
    assert ckpt.read_bytes() == before

    # starting from another run's checkpoint is no resume of this folder either
    other = tmp_path / "other"
    assert cli_run(_demo_fit(other, boxes, "--trainer.max_steps=1")) == 0
    assert cli_run(_demo_fit(first, boxes, "--trainer.max_steps=3",
                             f"--ckpt_path={other / 'checkpoints' / 'last.ckpt'}")) == 2
    assert ckpt.read_bytes() == before

    # a resume of this folder may write it (--ckpt_path last finds <default_root_dir>/checkpoints/last.ckpt)
    assert cli_run(_demo_fit(first, boxes, "--trainer.max_steps=3", "--ckpt_path=last")) == 0
    assert ckpt.read_bytes() != before

    # and so may a fit told to
    monkeypatch.setenv(OVERWRITE_ENV, "1")
    again = ckpt.read_bytes()
    assert cli_run(_demo_fit(first, boxes, "--trainer.max_steps=1")) == 0
    assert ckpt.read_bytes() != again


def test_training_clock_is_kept_in_checkpoints_and_carried_over_on_resume(boxes, tmp_path, monkeypatch):
    import torch

    from cfseg.callbacks import training_clock

    monkeypatch.chdir(tmp_path)
    root = tmp_path / "clock"
    clock = "--trainer.callbacks+=cfseg.callbacks.TrainingClock"
    assert cli_run(_demo_fit(root, boxes, "--trainer.max_steps=2", clock)) == 0
    last = root / "checkpoints" / "last.ckpt"
    first = training_clock(torch.load(last, map_location="cpu", weights_only=True))
    assert first["steps"] == 2 and first["cpu_seconds"] > 0 and first["wall_seconds"] > 0
    assert cli_run(_demo_fit(root, boxes, "--trainer.max_steps=3", "--ckpt_path=last", clock)) == 0
    resumed = training_clock(torch.load(last, map_location="cpu", weights_only=True))
    assert resumed["steps"] == 3
    assert resumed["cpu_seconds"] > first["cpu_seconds"] and resumed["wall_seconds"] > first["wall_seconds"]
