"""Checkpoints written before continual strategies were objects (flat ``strategy``/router/Fisher hyper-parameters)
still load, segment exactly as the code that wrote them did, and start later stages.

``tests/golden/legacy/`` holds a stage-0 checkpoint (router statistics and Fisher stored) and a LoRA-experts stage-1
checkpoint trained by that earlier code on :func:`conftest.make_boxes` (seed 0; optimiser state stripped), and the
sha256 of the label maps that code's ``cfseg-segment --multilabel --modality ct`` wrote for the first case.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import make_boxes

from cfseg.apps.cli import main as cli
from cfseg.apps.segment import main as segment
from cfseg.module import load_checkpoint

LEGACY = Path(__file__).resolve().parent / "golden" / "legacy"
EXPECTED = json.loads((LEGACY / "expected.json").read_text())


@pytest.fixture(scope="module")
def boxes(tmp_path_factory) -> Path:
    return make_boxes(tmp_path_factory.mktemp("legacy") / "Dataset050_boxes")


def test_legacy_checkpoints_load_with_their_statistics():
    stage0 = load_checkpoint(str(LEGACY / "legacy_stage0.ckpt"))
    assert stage0.hparams.strategy == "finetune"  # what the stage was trained with, as stored
    assert stage0.statistics.router_batches == 2 and stage0.statistics.fisher_batches == 2  # flat keys translated
    assert stage0.router is not None and stage0.ewc_fisher and stage0.class_names == ["liver", "spleen"]
    experts = load_checkpoint(str(LEGACY / "legacy_experts.ckpt"))
    assert experts.n_experts == 2 and experts.expert_records[1]["classes"] == ["aorta"]
    assert experts.class_names == ["liver", "spleen", "aorta"]


@pytest.mark.parametrize("name", ["legacy_stage0", "legacy_experts"])
def test_legacy_checkpoints_segment_as_before(boxes, tmp_path, name):
    image = sorted((boxes / "imagesTr").glob("*.nii.gz"))[0]
    assert segment(["-i", str(image), "-o", str(tmp_path), "--ckpt", str(LEGACY / f"{name}.ckpt"), "--multilabel",
                    "--modality", "ct"]) == 0
    labels = np.asarray(nib.load(str(tmp_path / "labels.nii.gz")).dataobj)
    assert hashlib.sha256(labels.tobytes()).hexdigest() == EXPECTED[name]["labels_sha256"]
    assert json.loads((tmp_path / "labels.json").read_text()) == EXPECTED[name]["labels_json"]


@pytest.mark.parametrize("strategy", ["ewc", "experts", "distill"])
def test_a_legacy_checkpoint_starts_a_later_stage(boxes, tmp_path, strategy):
    data = json.dumps([{"path": str(boxes), "val_fraction": 0.0, "test_fraction": 0.34, "classes": ["aorta"]}])
    run = cli(["fit", "--config", str(Path(__file__).parent / "configs" / "tiny.yaml"), f"--data.datasets={data}",
               "--data.spacing=[4.0, 4.0, 4.0]", "--trainer.max_steps=1", "--trainer.max_epochs=-1",
               f"--trainer.default_root_dir={tmp_path}", f"--trainer.logger.init_args.save_dir={tmp_path}",
               f"--model.previous_checkpoint={LEGACY / 'legacy_stage0.ckpt'}", f"--model.strategy={strategy}"])
    assert run.model.class_names == ["liver", "spleen", "aorta"] and run.trainer.global_step == 1
    assert run.model.strategy.short_name == strategy
