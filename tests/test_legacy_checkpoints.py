"""Checkpoints in the format written before continual strategies were objects still load, segment as the same weights
do in the current format, and start later stages.

The test makes them itself: short current-format runs (a stage 0 with router statistics and Fisher, a LoRA-experts
stage 1) rewritten into the old layout (:func:`to_legacy`): a short strategy name, the router, Fisher and loss
settings as flat hyper-parameters beside the old strategies' flat settings, and no out-of-domain statistics or
strategy state in ``checkpoint["cfseg"]``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import make_boxes

from cfseg.apps.cli import main as cli
from cfseg.apps.segment import main as segment
from cfseg.module import load_checkpoint

CONFIG = Path(__file__).parent / "configs" / "tiny.yaml"
#: the flat settings the old module took for distill, experts and ewc (values as a stage-0 run stored them)
OLD_STRATEGY_SETTINGS = {"kd_weight": 10.0, "kd_ramp_steps": 0, "kd_ramp_fraction": 0.5, "kd_ramp_start": 0.0,
                         "sim_weight": 1.0, "pseudo_label": "auto", "pseudo_dice_weight": 0.1, "pod_weight": 0.0,
                         "expert_rank": 4, "expert_alpha": 4.0, "expert_init": "previous", "ewc_lambda": 100.0}
OLD_STATISTICS_NAMES = {"fisher_batches": "ewc_fisher_batches"}


def to_legacy(src: Path, dst: Path) -> Path:
    """``src`` (current format) rewritten in the layout of checkpoints made before strategies were objects."""
    ckpt = torch.load(src, map_location="cpu", weights_only=True)
    hp = dict(ckpt["hyper_parameters"])
    strategy = hp.pop("strategy")["class_path"].rsplit(".", 1)[-1].lower()
    hp["strategy"] = strategy
    for k, v in hp.pop("statistics").items():
        hp[OLD_STATISTICS_NAMES.get(k, k)] = v
    hp.update(hp.pop("loss_weights"))
    hp.update(OLD_STRATEGY_SETTINGS)
    meta = dict(ckpt["cfseg"])
    meta.pop("ood")
    meta.pop("strategy_state")
    out = {"state_dict": ckpt["state_dict"], "hyper_parameters": hp, "cfseg": meta,
           "datamodule_hyper_parameters": ckpt.get("datamodule_hyper_parameters", {})}
    torch.save(out, dst)
    return dst


def _fit(tmp: Path, boxes: Path, classes: list[str], *extra: str) -> Path:
    data = json.dumps([{"path": str(boxes), "val_fraction": 0.0, "test_fraction": 0.34, "classes": classes}])
    run = cli(["fit", "--config", str(CONFIG), f"--data.datasets={data}", "--data.spacing=[4.0, 4.0, 4.0]",
               "--trainer.max_steps=3", "--trainer.max_epochs=-1", f"--trainer.default_root_dir={tmp}",
               f"--trainer.logger.init_args.save_dir={tmp}", "--model.statistics.router_batches=2",
               "--model.statistics.fisher_batches=2", *extra])
    run.trainer.save_checkpoint(tmp / "final.ckpt")
    return tmp / "final.ckpt"


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("legacy")
    boxes = make_boxes(tmp / "Dataset050_boxes")
    stage0 = _fit(tmp / "s0", boxes, ["liver", "spleen"], "--model.strategy=finetune")
    experts = _fit(tmp / "s1", boxes, ["aorta"], "--model.strategy=experts", f"--model.previous_checkpoint={stage0}")
    return {"boxes": boxes, "stage0": stage0, "experts": experts,
            "legacy_stage0": to_legacy(stage0, tmp / "legacy_stage0.ckpt"),
            "legacy_experts": to_legacy(experts, tmp / "legacy_experts.ckpt")}


def test_legacy_checkpoints_load_with_their_statistics(runs):
    stage0 = load_checkpoint(str(runs["legacy_stage0"]))
    assert stage0.hparams.strategy == "finetune"  # what the stage was trained with, as stored
    assert stage0.statistics.router_batches == 2 and stage0.statistics.fisher_batches == 2  # flat keys translated
    assert stage0.loss_weights.ce_weight == 1.0 and stage0.domain_statistics is None
    assert stage0.router is not None and stage0.ewc_fisher and stage0.class_names == ["liver", "spleen"]
    experts = load_checkpoint(str(runs["legacy_experts"]))
    assert experts.n_experts == 2 and experts.expert_records[1]["classes"] == ["aorta"]
    assert experts.class_names == ["liver", "spleen", "aorta"]


@pytest.mark.parametrize("name", ["stage0", "experts"])
def test_legacy_checkpoints_segment_as_the_same_weights_do(runs, tmp_path, name):
    image = sorted((runs["boxes"] / "imagesTr").glob("*.nii.gz"))[0]
    digests = []
    for which in (name, f"legacy_{name}"):
        out = tmp_path / which
        assert segment(["-i", str(image), "-o", str(out), "--ckpt", str(runs[which]), "--multilabel",
                        "--modality", "ct"]) == 0
        digests.append(hashlib.sha256(np.asarray(nib.load(str(out / "labels.nii.gz")).dataobj).tobytes()).digest())
    assert digests[0] == digests[1]


@pytest.mark.parametrize("strategy", ["ewc", "experts", "distill"])
def test_a_legacy_checkpoint_starts_a_later_stage(runs, tmp_path, strategy):
    data = json.dumps([{"path": str(runs["boxes"]), "val_fraction": 0.0, "test_fraction": 0.34,
                        "classes": ["aorta"]}])
    run = cli(["fit", "--config", str(CONFIG), f"--data.datasets={data}", "--data.spacing=[4.0, 4.0, 4.0]",
               "--trainer.max_steps=1", "--trainer.max_epochs=-1", f"--trainer.default_root_dir={tmp_path}",
               f"--trainer.logger.init_args.save_dir={tmp_path}",
               f"--model.previous_checkpoint={runs['legacy_stage0']}", f"--model.strategy={strategy}"])
    assert run.model.class_names == ["liver", "spleen", "aorta"] and run.trainer.global_step == 1
    assert run.model.strategy.short_name == strategy
