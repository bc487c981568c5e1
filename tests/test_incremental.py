"""Incremental stages: bank extension, frozen teacher, stage history, clear errors before training, protocol."""

import json
from pathlib import Path

import pytest
import torch
import yaml

from cfseg.cli import CFSegCLI
from cfseg.cli import main as cli
from cfseg.data.datamodule import SegDataModule
from cfseg.module import CFSegModule, load_checkpoint
from cfseg.continual.protocol import load_protocol, run_protocol

CONFIG = Path(__file__).parent / "configs" / "tiny.yaml"
STAGE0 = ["liver", "spleen", "kidney_left", "kidney_right"]
STAGE1 = ["stomach", "aorta"]


def ds(path, classes=None):
    return {"path": str(path), "val_fraction": 0.25, "test_fraction": 0.25, "classes": classes}


def fit(tmp_path, datasets, *extra):
    return cli(["fit", "--config", str(CONFIG), f"--data.datasets={json.dumps(datasets)}",
                f"--trainer.logger.init_args.save_dir={tmp_path}", f"--trainer.default_root_dir={tmp_path}",
                *extra])


@pytest.fixture(scope="module")
def stage0_ckpt(tiny_phantoms, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stage0")
    run = fit(tmp, [ds(tiny_phantoms[0], STAGE0)])
    return Path(run.trainer.checkpoint_callback.best_model_path)


def test_stage_extends_bank_and_keeps_old_prototypes_exact(stage0_ckpt, tiny_phantoms, tmp_path):
    teacher = load_checkpoint(str(stage0_ckpt))
    assert teacher.class_names == STAGE0
    run = fit(tmp_path, [ds(tiny_phantoms[0], STAGE1)], f"--model.previous_checkpoint={stage0_ckpt}")
    student = run.model
    assert student.class_names == STAGE0 + STAGE1  # old classes first, new appended
    assert torch.equal(student.prototypes[: len(STAGE0) + 1], teacher.prototypes)  # bit-identical
    # data annotate only the new classes here; old ones count as not annotated
    batch = next(iter(run.datamodule.train_dataloader()))
    assert not batch["annotated"][:, 1:5].any() and batch["annotated"][:, 5:].any()
    ckpt_path = run.trainer.checkpoint_callback.best_model_path
    ckpt = torch.load(ckpt_path, weights_only=True)
    assert not any("teacher" in k for k in ckpt["state_dict"])  # the teacher is not stored twice
    history = ckpt["cfseg"]["stage_history"]
    assert [h["new_classes"] for h in history] == [STAGE0, STAGE1]
    assert history[1]["previous_checkpoint"] == str(stage0_ckpt) and history[1]["strategy"] == "distill"
    assert history[1]["datasets"][0]["classes"] == STAGE1
    # after the second stage one forward pass segments both stages' classes
    model = load_checkpoint(ckpt_path)
    logits = model(torch.randn(1, 1, 16, 16, 16), class_indices=[model.bank.index("liver"),
                                                                 model.bank.index("stomach")])
    assert logits.shape == (1, 3, 16, 16, 16)
    assert model.stage_history == history


def test_teacher_frozen_and_unchanged(stage0_ckpt, tiny_phantoms):
    student = CFSegModule(class_names=STAGE0 + STAGE1, backbone=yaml.safe_load(CONFIG.read_text())["model"]["backbone"],
                          feature_channels=8, previous_checkpoint=str(stage0_ckpt), strategy="distill")
    teacher = student.teacher
    assert teacher is not None and not teacher.training
    assert all(not p.requires_grad for p in teacher.parameters())
    assert not any(p is q for p in student.parameters() for q in teacher.parameters())
    before = {k: v.clone() for k, v in teacher.state_dict().items() if isinstance(v, torch.Tensor)}
    x = torch.randn(2, 1, 16, 16, 16)
    batch = {"image": x, "label": torch.zeros(2, 1, 16, 16, 16, dtype=torch.uint8),
             "annotated": torch.tensor([[True] + [False] * 4 + [True] * 2] * 2)}
    student.log = lambda *a, **k: None
    loss = student.training_step(batch, 0)
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    after = teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # the student starts as the teacher
    assert torch.equal(student.net.head.weight, teacher.net.head.weight)
    # distillation pulls: identical student and teacher on old classes -> loss near the teacher entropy floor
    fin = CFSegModule(class_names=STAGE0 + STAGE1, backbone=student.hparams.backbone, feature_channels=8,
                      previous_checkpoint=str(stage0_ckpt), strategy="finetune")
    assert fin.teacher is None


def test_stage_errors_before_training(stage0_ckpt, tiny_phantoms, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        fit(tmp_path, [ds(tiny_phantoms[0], STAGE1)], f"--model.previous_checkpoint={tmp_path / 'nope.ckpt'}")
    other = tmp_path / "other_backbone.yaml"
    other.write_text(yaml.safe_dump({"model": {"backbone": {"class_path": "monai.networks.nets.UNet", "init_args": {
        "spatial_dims": 3, "in_channels": 1, "out_channels": 8, "channels": [8, 32], "strides": [2]}}}}))
    with pytest.raises(ValueError, match="another backbone"):
        fit(tmp_path, [ds(tiny_phantoms[0], STAGE1)], f"--model.previous_checkpoint={stage0_ckpt}",
            "--config", str(other))
    with pytest.raises(ValueError, match="repeats classes .*liver"):
        fit(tmp_path, [ds(tiny_phantoms[0], STAGE1)], f"--model.previous_checkpoint={stage0_ckpt}",
            "--model.new_classes=[Liver, stomach]")
    assert not list(tmp_path.rglob("*.ckpt"))  # nothing trained


def test_protocol_writes_matrices_and_beats_an_untrained_model(boxes, tmp_path):
    def box(classes=None):
        return {"path": str(boxes), "val_fraction": 0.0, "test_fraction": 0.34, "classes": classes}

    spec_path = tmp_path / "protocol.yaml"
    spec_path.write_text(yaml.safe_dump({
        "base_config": str(CONFIG), "output": str(tmp_path / "out"), "strategies": ["distill", "finetune", "joint"],
        "fit_args": ["--trainer.max_steps=40", "--trainer.max_epochs=100", "--data.spacing=[4.0, 4.0, 4.0]",
                     "--model.lr=0.01", "--trainer.check_val_every_n_epoch=100"],
        "stages": [
            {"name": "s0", "datasets": [box(["liver", "spleen"])]},
            {"name": "s1", "classes": ["aorta"], "datasets": [box()], "unlabeled": [box()]},
        ]}))
    res = run_protocol(load_protocol(spec_path))
    out = tmp_path / "out"
    for s in ("distill", "finetune", "joint"):
        R = res[s]["R"]
        assert len(R) == 2 and len(R[0]) == 1 and len(R[1]) == 2
        assert all(0 <= v <= 1 for row in R for v in row)
        assert res[s]["bwt"] == pytest.approx(R[1][0] - R[0][0])
        assert (out / f"{s}_matrix.png").stat().st_size > 1000
        assert (out / f"{s}_matrix.csv").read_text().startswith("after_stage,test_s0,test_s1")
    assert res["distill"]["R"][0] == res["finetune"]["R"][0]  # stage 0 trained once, shared
    assert json.loads((out / "summary.json").read_text())["strategies"].keys() == {"distill", "finetune", "joint"}
    # training did something: stage 0 and the distilled stage 1 beat an untrained model on the same test cases
    from cfseg.evaluation import evaluate_datasets

    trained = load_checkpoint(str(out / "runs" / "distill_stage1" / "final.ckpt"))
    untrained = CFSegModule(class_names=trained.class_names, backbone=trained.hparams.backbone, feature_channels=8,
                            preprocessing=trained.preprocessing)
    chance = [evaluate_datasets(untrained, [box()], classes=c)["mean_dice"] for c in (["liver", "spleen"], ["aorta"])]
    print("protocol R", res["distill"]["R"], "untrained", chance)
    assert res["distill"]["R"][0][0] > chance[0] + 0.1
    assert res["distill"]["R"][1][1] > chance[1] + 0.1
    distill, finetune = (torch.load(out / "runs" / f"{s}_stage1" / "final.ckpt", weights_only=True)["state_dict"]
                         for s in ("distill", "finetune"))
    assert not torch.equal(distill["net.head.weight"], finetune["net.head.weight"])
    # a later invocation for one strategy reuses the checkpoints and keeps the others in the summary
    again = run_protocol(load_protocol(spec_path), ["finetune"])
    assert again["finetune"]["R"] == res["finetune"]["R"]
    assert json.loads((out / "summary.json").read_text())["strategies"].keys() == {"distill", "finetune", "joint"}


def test_grouped_evaluation_predicts_shared_cases_once(stage0_ckpt, tiny_phantoms, monkeypatch):
    """Protocol rows score one shared test set on several class groups: one prediction per case, same Dice."""
    import cfseg.evaluation as ev

    module = load_checkpoint(str(stage0_ckpt))
    data = [ds(tiny_phantoms[0])]
    separate = [ev.evaluate_datasets(module, data, classes=c) for c in (STAGE0[:2], STAGE0[2:])]
    calls = []
    real = ev.predict_volume
    monkeypatch.setattr(ev, "predict_volume", lambda *a, **k: calls.append(1) or real(*a, **k))
    grouped = ev.evaluate_groups(module, [(data, STAGE0[:2]), (data, STAGE0[2:])])
    assert len(calls) == grouped[0]["n_cases"] == grouped[1]["n_cases"] > 0
    for g, s in zip(grouped, separate, strict=True):
        assert g["per_class_dice"] == pytest.approx(s["per_class_dice"], nan_ok=True)
        assert set(g["per_class_dice"]) == set(s["per_class_dice"])


def test_new_classes_in_another_order_follow_the_data(stage0_ckpt, tiny_phantoms, tmp_path):
    """Indices follow names: ``new_classes`` in another order than the data's cannot swap two prototypes."""
    base = ["--config", str(CONFIG), f"--data.datasets={json.dumps([ds(tiny_phantoms[0], STAGE1)])}",
            f"--trainer.logger.init_args.save_dir={tmp_path}", f"--model.previous_checkpoint={stage0_ckpt}"]
    data_order = CFSegCLI(CFSegModule, SegDataModule, args=base, run=False).datamodule.class_names[len(STAGE0):]
    c = CFSegCLI(CFSegModule, SegDataModule, args=[*base, f"--model.new_classes={json.dumps(data_order[::-1])}"],
                 run=False)
    model, dm = c.model, c.datamodule
    assert model.class_names == dm.class_names == STAGE0 + data_order
    loaded = dm.datasets[0]
    for name in STAGE1:  # a voxel of this class in a case that annotates it trains this class's prototype
        luts = [it["label_lut"] for it in dm.items(loaded, "train") + dm.items(loaded, "val")]
        mapped = {int(lut[loaded.info.labels[name]]) for lut in luts} - {0}
        assert mapped == {model.bank.index(name)}
    with pytest.raises(ValueError, match="differ from the classes the data adds"):
        CFSegCLI(CFSegModule, SegDataModule, args=[*base, "--model.new_classes=[stomach]"], run=False)


def test_domain_stage_keeps_the_earlier_modality(stage0_ckpt, tiny_phantoms, tmp_path):
    """CT stage -> MRI stage (no CT images in it): the checkpoint still reads CT; a second CT recipe is refused."""
    import nibabel as nib

    import cfseg

    run = fit(tmp_path, [ds(tiny_phantoms[1], STAGE0)], f"--model.previous_checkpoint={stage0_ckpt}",
              "--model.strategy=finetune", "--trainer.max_steps=1")
    model = load_checkpoint(run.trainer.checkpoint_callback.best_model_path)
    assert set(model.preprocessing) == {"ct", "mri"}
    assert model.preprocessing["ct"] == load_checkpoint(str(stage0_ckpt)).preprocessing["ct"]
    ct_image = sorted((tiny_phantoms[0] / "imagesTr").glob("*.nii.gz"))[0]
    masks = cfseg.segment(ct_image, model, classes=["liver"], modality="ct")
    assert masks["liver"].shape == nib.load(ct_image).shape
    with pytest.raises(ValueError, match="two preprocessings for 'ct'"):
        fit(tmp_path, [ds(tiny_phantoms[0], STAGE1)], f"--model.previous_checkpoint={stage0_ckpt}",
            "--data.spacing=[9.0, 9.0, 9.0]")


def test_distillation_is_active(stage0_ckpt):
    """The distill strategy adds a positive term and changes the gradients against finetune on the same batch."""
    kw = {"class_names": STAGE0 + STAGE1, "backbone": yaml.safe_load(CONFIG.read_text())["model"]["backbone"],
          "feature_channels": 8, "previous_checkpoint": str(stage0_ckpt)}
    torch.manual_seed(0)
    batch = {"image": torch.randn(2, 1, 16, 16, 16), "label": torch.zeros(2, 1, 16, 16, 16, dtype=torch.uint8),
             "annotated": torch.tensor([[True] + [False] * 4 + [True] * 2] * 2)}
    batch["label"][:, :, 4:8, 4:8, 4:8] = 5
    logged, grads = {}, {}
    for strategy in ("distill", "finetune"):
        m = CFSegModule(**kw, strategy=strategy)
        logged[strategy] = {}
        m.log = lambda name, value, _d=logged[strategy], **k: _d.__setitem__(name, float(value))
        m.training_step(batch, 0).backward()
        grads[strategy] = m.net.head.weight.grad.clone()
    assert logged["distill"]["train/distill"] > 1e-4 and "train/distill" not in logged["finetune"]
    assert logged["distill"]["train/loss"] > logged["finetune"]["train/loss"]
    assert not torch.allclose(grads["distill"], grads["finetune"])
