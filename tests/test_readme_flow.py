"""The README's path for a new user, run as written on tiny data: train on your own datasets with the example config,
then add a class with a second ``cfseg fit`` from the first checkpoint, then segment with the result.

Only sizes change (tiny volumes, patch, budget, where results go); the config file and the command forms are the
README's."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from conftest import make_boxes

from cfseg.apps.cli import main as cli
from cfseg.apps.segment import main as segment
from cfseg.module import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "configs" / "examples" / "my_datasets.yaml"


def _small(out: Path) -> list[str]:
    """The README's commands at a test's size: tiny patch, a few steps, results under ``out``."""
    return ["--trainer.accelerator=cpu", "--trainer.max_steps=3", "--trainer.max_epochs=-1",
            "--trainer.check_val_every_n_epoch=null", "--trainer.val_check_interval=3",
            "--trainer.enable_progress_bar=false", "--data.spacing=[3.0, 3.0, 3.0]", "--data.patch_size=[32, 32, 32]",
            "--data.cache=none", "--data.num_workers=0", "--data.augment=none",
            f"--trainer.default_root_dir={out}", f"--trainer.logger.init_args.save_dir={out}"]
    # no --trainer.callbacks.init_args.dirpath: the checkpoints follow default_root_dir, as the README says


def test_train_on_your_datasets_then_add_a_class_then_segment(tmp_path):
    data = make_boxes(tmp_path / "Dataset050_boxes")
    first = json.dumps([{"path": str(data), "classes": ["liver", "spleen"], "val_fraction": 0.34, "test_fraction": 0}])
    stage0 = tmp_path / "my_model"
    cli(["fit", "--config", str(EXAMPLE), f"--data.datasets={first}", *_small(stage0)])
    ckpt0 = stage0 / "checkpoints" / "final.ckpt"
    assert ckpt0.is_file()
    model0 = load_checkpoint(str(ckpt0))
    assert model0.class_names == ["liver", "spleen"]

    # "Add a class later": the same config, the first checkpoint as previous_checkpoint, data of the new class only
    new = json.dumps([{"path": str(data), "classes": ["aorta"], "val_fraction": 0.34, "test_fraction": 0}])
    stage1 = tmp_path / "my_model_stage1"
    cli(["fit", "--config", str(EXAMPLE), f"--model.previous_checkpoint={ckpt0}", f"--data.datasets={new}",
         *_small(stage1)])
    model1 = load_checkpoint(str(stage1 / "checkpoints" / "final.ckpt"))
    assert model1.class_names == ["liver", "spleen", "aorta"]
    assert torch.equal(model1.prototypes[:3], model0.prototypes)  # the old prototypes bit-identical
    assert model1.hparams.strategy["class_path"] == "cfseg.continual.Distill"  # the default strategy
    assert [s["new_classes"] for s in model1.stage_history] == [["liver", "spleen"], ["aorta"]]

    image = sorted((data / "imagesTr").glob("*.nii.gz"))[0]
    out = tmp_path / "masks"
    assert segment(["-i", str(image), "-o", str(out), "--ckpt", str(stage1 / "checkpoints" / "final.ckpt"),
                    "--modality", "ct", "--multilabel"]) == 0
    assert set(json.loads((out / "labels.json").read_text()).values()) >= {"aorta"}
