"""Incremental stages: bank extension, frozen teacher, stage history, clear errors before training.

The multi-stage protocol (cfseg-protocol) is tested in test_protocol.py.
"""

import json
from pathlib import Path
from unittest import mock

import pytest
import torch
import yaml

from cfseg.apps.cli import CFSegCLI
from cfseg.apps.cli import main as cli
from cfseg.continual import Distill
from cfseg.data.datamodule import SegDataModule
from cfseg.module import CFSegModule, load_checkpoint

CONFIG = Path(__file__).parent / "configs" / "tiny.yaml"
STAGE0 = ["liver", "spleen", "kidney_left", "kidney_right"]
STAGE1 = ["stomach", "aorta"]


def ds(path, classes=None):
    return {"path": str(path), "val_fraction": 0.25, "test_fraction": 0.25, "classes": classes}


def distill_arg(**settings):
    """``--model.strategy=`` naming :class:`cfseg.continual.Distill` with ``settings``."""
    return f"--model.strategy={json.dumps({'class_path': 'cfseg.continual.Distill', 'init_args': settings})}"


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
    assert history[1]["previous_checkpoint"] == str(stage0_ckpt) and history[1]["strategy"] == {
        "class_path": "cfseg.continual.Distill", "init_args": Distill().spec()["init_args"]}
    assert history[1]["datasets"][0]["classes"] == STAGE1
    # after the second stage one forward pass segments both stages' classes
    model = load_checkpoint(ckpt_path)
    logits = model(torch.randn(1, 1, 16, 16, 16), class_indices=[model.bank.index("liver"),
                                                                 model.bank.index("stomach")])
    assert logits.shape == (1, 3, 16, 16, 16)
    assert model.stage_history == history
    assert model.hparams.strategy == history[1]["strategy"]  # a loaded stage names what it was trained with


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


def _stage_module(stage0_ckpt, **kw):
    return CFSegModule(class_names=STAGE0 + STAGE1, backbone=yaml.safe_load(CONFIG.read_text())["model"]["backbone"],
                       feature_channels=8, previous_checkpoint=str(stage0_ckpt), **kw)


def _distill_module(stage0_ckpt, **settings):
    """A stage of strategy :class:`cfseg.continual.Distill` with ``settings``."""
    return _stage_module(stage0_ckpt, strategy=Distill(**settings))


def _stage_batch(seed=0):
    torch.manual_seed(seed)
    batch = {"image": torch.randn(2, 1, 16, 16, 16), "label": torch.zeros(2, 1, 16, 16, 16, dtype=torch.uint8),
             "annotated": torch.tensor([[True] + [False] * 4 + [True] * 2] * 2)}
    batch["label"][:, :, 4:8, 4:8, 4:8] = 5
    return batch


def _spy_loss_terms(m):
    """Wrap ``m.loss_terms``; the returned dict receives each call's labels, logits and terms."""
    seen = {}
    real = m.loss_terms
    m.loss_terms = lambda logits, b, target=None, annotated=None, ignore_index=None, dice_labels=None, \
        pseudo_dice_weight=0.0: seen.update(
            target=target, annotated=annotated, ignore=ignore_index, dice=dice_labels, logits=logits,
            terms=real(logits, b, target, annotated, ignore_index, dice_labels, pseudo_dice_weight)) or seen["terms"]
    return seen


def test_incremental_lr_factor_scales_only_incremental_adamw(stage0_ckpt):
    opt = _stage_module(stage0_ckpt, lr=0.01, incremental_lr_factor=0.1).configure_optimizers()["optimizer"]
    assert opt.param_groups[0]["initial_lr"] == pytest.approx(0.001)
    stage0 = CFSegModule(class_names=STAGE0, backbone=yaml.safe_load(CONFIG.read_text())["model"]["backbone"],
                         feature_channels=8, lr=0.01, incremental_lr_factor=0.1)
    assert stage0.configure_optimizers()["optimizer"].param_groups[0]["initial_lr"] == pytest.approx(0.01)
    injected = _stage_module(stage0_ckpt, incremental_lr_factor=0.1,
                             optimizer=lambda p: torch.optim.SGD(p, lr=0.5)).configure_optimizers()
    assert injected.param_groups[0]["lr"] == 0.5  # an injected optimizer is the user's: untouched
    with pytest.raises(ValueError, match="incremental_lr_factor"):
        _stage_module(stage0_ckpt, incremental_lr_factor=0.0)


def test_pseudo_labels_and_pod_in_a_training_step(stage0_ckpt):
    """Pseudo-labels turn only label-0 voxels into old classes; POD is 0 at the first step (student == teacher)."""
    m = _distill_module(stage0_ckpt, pseudo_label=True, pod_weight=1.0, pseudo_entropy_floor=0.5)
    logged = {}
    m.log = lambda name, value, **k: logged.__setitem__(name, float(value.detach()))
    batch = _stage_batch()
    seen = _spy_loss_terms(m)
    m.training_step(batch, 0).backward()
    assert {"train/pseudo_voxels", "train/pseudo_ignored", "train/pod", "train/distill"} <= set(logged)
    assert 0 < logged["train/pseudo_voxels"] < 1 and 0 < logged["train/pseudo_ignored"] < 1  # the path runs
    assert logged["train/pod"] == 0.0  # the student starts as the teacher
    label = batch["label"][:, 0].long()
    t = seen["target"]
    assert torch.equal(t[label == 5], label[label == 5])  # the new class is never overwritten
    changed = t != label
    assert ((t[changed] >= 1) & (t[changed] <= len(STAGE0)) | (t[changed] == seen["ignore"])).all()
    assert seen["annotated"][:, 5:].all() and seen["annotated"][:, 0].all()
    assert logged["train/pseudo_voxels"] == pytest.approx(((t != label) & (t > 0)).float().mean().item())
    assert m.strategy.hist_batches == 1 and m.strategy.entropy_hist.sum() == (label == 0).sum()
    # pseudo-labels enter the cross-entropy only; the Dice keeps the batch's own labels
    assert torch.equal(seen["dice"][0], label) and torch.equal(seen["dice"][1], batch["annotated"].bool())
    lg, head = seen["logits"].detach(), m.head
    ce = head.loss(lg, t, seen["annotated"], dice_weight=0.0, ignore_index=seen["ignore"], batch_dice=True)
    dice = head.loss(lg, label, batch["annotated"].bool(), ce_weight=0.0, batch_dice=True)
    fused = head.loss(lg, t, seen["annotated"], ignore_index=seen["ignore"], batch_dice=True)
    assert seen["terms"]["partial"].item() == pytest.approx((ce + dice).item(), rel=1e-5)
    assert abs(fused.item() - (ce + dice).item()) > 1e-4  # the two losses really differ on this batch
    # after a step the student differs from the teacher: POD turns positive and has gradients
    with torch.no_grad():
        for p in m.net.backbone.parameters():
            p.add_(0.05 * torch.randn_like(p))
    m.training_step(batch, 1)
    assert logged["train/pod"] > 0
    with pytest.raises(ValueError, match="matches no module"):
        _distill_module(stage0_ckpt, pod_weight=1.0, pod_layers=["encoder\\.0"])


def test_teacher_under_bf16_autocast(stage0_ckpt):
    """The teacher runs under the student's autocast (bf16-mixed): every term finite, gradients flow."""
    m = _distill_module(stage0_ckpt, pseudo_label=True, pod_weight=1.0, sim_weight=1.0, feat_weight=1.0)
    m.log = lambda *a, **k: None
    batch = _stage_batch(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m.strategy.teacher_outputs(batch["image"])
        assert out["feats"].dtype == torch.bfloat16  # really under autocast
        loss = m.training_step(batch, 0)
    assert torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in m.net.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_cli_stage_with_pseudo_labels_and_pod(stage0_ckpt, tiny_phantoms, tmp_path):
    import csv

    fit(tmp_path, [ds(tiny_phantoms[0], STAGE1)], f"--model.previous_checkpoint={stage0_ckpt}",
        distill_arg(pseudo_label=True, pod_weight=1.0, kd_ramp_fraction=0), "--model.incremental_lr_factor=0.5",
        "--trainer.max_steps=2", "--trainer.max_epochs=5")  # KD from the first step
    rows = list(csv.DictReader(next(tmp_path.rglob("metrics.csv")).open()))
    steps = [r for r in rows if r.get("train/pod_step")]
    assert len(steps) == 2
    assert all(0 <= float(r["train/pseudo_voxels_step"]) <= 1 for r in steps)
    assert all(float(r["train/distill_step"]) > 0 for r in steps)


@pytest.mark.parametrize("variant", [["--model.prototypes=random", "--model.prototype_seed=5"],
                                     ["--model.prototype_order=reversed"]])
def test_prototype_variants_reload_bit_identically_and_only_text_takes_new_classes(variant, tiny_phantoms,
                                                                                   tmp_path):
    run = fit(tmp_path, [ds(tiny_phantoms[0], STAGE0)], *variant)
    ckpt = Path(run.trainer.checkpoint_callback.best_model_path)
    model = load_checkpoint(str(ckpt))
    raw = torch.load(ckpt, weights_only=True, map_location="cpu")
    assert torch.equal(model.bank.prototypes, run.model.bank.prototypes.cpu())
    assert torch.equal(model.bank.prototypes, raw["cfseg"]["prototype_bank"]["prototypes"])
    assert (model.bank.method, model.bank.order, model.bank.seed) == \
        (run.model.bank.method, run.model.bank.order, run.model.bank.seed)
    stage = {"class_names": STAGE0 + STAGE1, "previous_checkpoint": str(ckpt), "backbone": model.hparams.backbone,
             "feature_channels": model.hparams.feature_channels}
    if "random" in variant[0]:
        assert model.bank.method == "random" and model.bank.seed == 5
        with pytest.raises(ValueError, match="cannot add classes .* bank of 'random' prototypes"):
            CFSegModule(**stage, prototypes="random")
        with pytest.raises(ValueError, match="previous checkpoint's prototypes are 'random'"):
            CFSegModule(**stage)
    else:
        assert model.bank.order == ["background", *reversed(STAGE0)]
        student = CFSegModule(**stage)
        assert torch.equal(student.bank.prototypes[: len(STAGE0) + 1], model.bank.prototypes)
        assert student.bank.order == ["background", *reversed(STAGE0), *STAGE1]


def test_pseudo_label_auto_on_in_a_class_stage_off_in_a_domain_stage(stage0_ckpt, tiny_phantoms, tmp_path):
    """Default ``pseudo_label="auto"``: a CT stage after a CT teacher pseudo-labels the old classes; an MRI stage
    (a domain the teacher never saw) does not; explicit true/false win over the rule."""
    import csv

    def pseudo_logged(out, data, classes, *extra):
        fit(out, [ds(data, classes)], f"--model.previous_checkpoint={stage0_ckpt}", "--trainer.max_steps=2",
            "--trainer.max_epochs=5", *extra)
        rows = list(csv.DictReader(next(out.rglob("metrics.csv")).open()))
        return any(r.get("train/pseudo_voxels_step") for r in rows), any(float(r["train/distill_step"]) > 0
                                                                         for r in rows if r.get("train/distill_step"))

    ct, mri = tiny_phantoms[0], tiny_phantoms[1]  # the MRI site with the classes it annotates (None)
    assert pseudo_logged(tmp_path / "ct", ct, STAGE1) == (True, True)
    assert pseudo_logged(tmp_path / "ct_off", ct, STAGE1, distill_arg(pseudo_label=False)) == (False, True)
    # (distillation forced on the MRI images: without image-only data the default distils nothing there)
    assert pseudo_logged(tmp_path / "mri", mri, None, distill_arg(distill_labeled=True)) == (False, True)
    assert pseudo_logged(tmp_path / "mri_on", mri, None, distill_arg(pseudo_label=True, distill_labeled=True))[0]
    with pytest.raises(ValueError, match="pseudo_label must be"):
        _distill_module(stage0_ckpt, pseudo_label="yes")


def test_distill_labeled_false_distils_only_on_image_only_batches(stage0_ckpt):
    """``distill_labeled=False``: no teacher pass and no distillation on the labelled images; the image-only batch
    of the stage is still distilled. True (the default): both."""
    teacher_saw = {}

    def run(setting, with_unlabeled):
        m = _distill_module(stage0_ckpt, distill_labeled=setting, pseudo_label=False)
        logged = {}
        m.log = lambda name, value, **k: logged.__setitem__(name, float(value.detach()))
        seen = []
        s = m.strategy
        real_terms, real_teacher = s.distillation_terms, s.teacher_outputs
        s.distillation_terms = lambda module, x, *a, **k: seen.append(x) or real_terms(module, x, *a, **k)
        batch = _stage_batch()
        s.teacher_outputs = lambda x: teacher_saw.setdefault(setting, []).append(x is batch["image"]) or real_teacher(x)
        unlabeled = {"image": torch.randn(2, 1, 16, 16, 16)}
        m.training_step({"labeled": batch, "unlabeled": unlabeled} if with_unlabeled else batch, 0)
        return [x is unlabeled["image"] for x in seen], logged["train/distill"]

    assert run(True, True)[0] == [False, True]
    assert run("auto", True)[0] == [False, True]  # outside a fit, "auto" resolves to on (a trainer's stage decides)
    off, kd = run(False, True)
    assert off == [True] and kd > 0
    assert run(False, False) == ([], 0.0)
    assert not any(teacher_saw[False]) and any(teacher_saw[True])  # no teacher pass on labelled images when off
    with pytest.raises(ValueError, match="distill_labeled must be"):
        _distill_module(stage0_ckpt, distill_labeled="sometimes")
    # the documented defaults of strategy distill (cfseg/continual/distill.py, README: chosen on validation cases)
    spec = _stage_module(stage0_ckpt).hparams.strategy
    assert spec["class_path"] == "cfseg.continual.Distill" and spec["init_args"]["distill_labeled"] == "auto"
    h = _stage_module(stage0_ckpt).hparams.strategy["init_args"]
    assert (h["kd_weight"], h["kd_ramp_steps"], h["kd_ramp_fraction"], h["kd_ramp_start"]) == (10.0, 0, 0.5, 0.0)


def test_distill_labeled_auto_is_off_only_in_a_domain_stage(stage0_ckpt, tiny_phantoms, tmp_path):
    """``distill_labeled="auto"``: a CT stage after a CT teacher distils on its labelled images; an MRI stage
    without image-only data distils nothing and says so."""
    import csv

    def distill_logged(out, data, classes):
        fit(out, [ds(data, classes)], f"--model.previous_checkpoint={stage0_ckpt}", "--trainer.max_steps=2",
            "--trainer.max_epochs=5", distill_arg(distill_labeled="auto", kd_ramp_fraction=0))  # KD at step 0
        rows = list(csv.DictReader(next(out.rglob("metrics.csv")).open()))
        return [float(r["train/distill_step"]) for r in rows if r.get("train/distill_step")]

    assert all(v > 0 for v in distill_logged(tmp_path / "ct", tiny_phantoms[0], STAGE1))
    with pytest.warns(UserWarning, match="nothing is distilled"):
        assert all(v == 0 for v in distill_logged(tmp_path / "mri", tiny_phantoms[1], None))


def test_pseudo_label_dice_true_keeps_pseudo_labels_in_the_dice(stage0_ckpt):
    """``pseudo_label_dice=True``: one fused loss on the pseudo-labels, no separate Dice."""
    m = _distill_module(stage0_ckpt, pseudo_label=True, pseudo_label_dice=True, pseudo_entropy_floor=0.5)
    m.log = lambda *a, **k: None
    seen = _spy_loss_terms(m)
    batch = _stage_batch()
    m.training_step(batch, 0)
    assert seen["dice"] is None and not torch.equal(seen["target"], batch["label"][:, 0].long())
    fused = m.head.loss(seen["logits"].detach(), seen["target"], seen["annotated"], ignore_index=seen["ignore"],
                        batch_dice=True)
    assert seen["terms"]["partial"].item() == pytest.approx(fused.item(), rel=1e-5)


def test_pseudo_dice_weight_adds_a_dice_of_the_pseudo_labelled_classes(stage0_ckpt):
    """``pseudo_dice_weight``: the stage's Dice stays on its own labels and a second Dice, over the pseudo-labelled
    classes only, is its own term, leaving the weight of the stage classes' Dice unchanged."""
    from cfseg.continual.distill import pseudo_dice_labels

    m = _distill_module(stage0_ckpt, pseudo_label=True, pseudo_dice_weight=0.5, pseudo_entropy_floor=0.5)
    logged = {}
    m.log = lambda name, value, **k: logged.__setitem__(name, float(value.detach()))
    seen = _spy_loss_terms(m)
    batch = _stage_batch()
    m.training_step(batch, 0).backward()
    label, ann = batch["label"][:, 0].long(), batch["annotated"].bool()
    lg, t, a = seen["logits"].detach(), seen["target"], seen["annotated"]
    ce = m.head.loss(lg, t, a, dice_weight=0.0, ignore_index=seen["ignore"], batch_dice=True)
    dice = m.head.loss(lg, label, ann, ce_weight=0.0, batch_dice=True)
    assert seen["terms"]["partial"].item() == pytest.approx((ce + dice).item(), rel=1e-5)  # as without the term
    t_p, a_p = pseudo_dice_labels(t, a, ann, seen["ignore"])
    assert a_p[:, 1:].any() and not (a_p & ann)[:, 1:].any()  # pseudo-labelled old classes only
    pseudo = m.head.loss(lg, t_p, a_p, ce_weight=0.0, ignore_index=seen["ignore"], batch_dice=True)
    assert 0 < pseudo.item() and seen["terms"]["pseudo_dice"].item() == pytest.approx(0.5 * pseudo.item(), rel=1e-5)
    assert logged["train/pseudo_dice"] == pytest.approx(seen["terms"]["pseudo_dice"].item())
    with pytest.raises(ValueError, match="set one of the two"):
        _distill_module(stage0_ckpt, pseudo_dice_weight=1.0, pseudo_label_dice=True)
    # the default resolves to 0.1, or 0 where pseudo_label_dice already puts the pseudo-labels in the Dice
    assert _stage_module(stage0_ckpt).hparams.strategy["init_args"]["pseudo_dice_weight"] == 0.1
    assert _distill_module(stage0_ckpt, pseudo_label_dice=True).hparams.strategy["init_args"]["pseudo_dice_weight"] \
        == 0.0
    with pytest.raises(ValueError, match="pseudo_dice_weight must be"):
        _distill_module(stage0_ckpt, pseudo_dice_weight=-1.0)


def test_distill_new_voxels_false_leaves_the_new_class_voxels_out_of_the_distillation(stage0_ckpt):
    """``distill_new_voxels=False``: the voxel-wise terms average over the voxels not labelled with a new class,
    so they give no gradient at the new-class voxels; True (the default) distils every voxel."""
    batch = _stage_batch()
    new = batch["label"][:, 0] == 5
    grads, terms = {}, {}
    for setting in (True, False):
        m = _distill_module(stage0_ckpt, distill_new_voxels=setting, pseudo_label=False, feat_weight=1.0)
        m.log = lambda *a, **k: None
        with torch.no_grad():
            t = m.strategy.teacher_outputs(batch["image"])
            feats, ctx = m.net.encode(batch["image"])
        feats = (feats + 0.1 * torch.randn_like(feats)).requires_grad_()  # a student that differs from its teacher
        logits = m.logits_from_features(feats, ctx)
        keep = None if setting else batch["label"][:, 0].long() <= m.n_old
        terms[setting] = m.strategy.distillation_terms(m, batch["image"], logits, feats, t, keep=keep)
        assert set(terms[setting]) == {"kd", "sim", "feat"}
        sum(terms[setting].values()).backward()
        grads[setting] = feats.grad.abs().sum(1)  # [B, *S]
    assert grads[True][new].sum() > 0 and grads[False][new].sum() == 0  # nothing pulls the new voxels back
    assert grads[False][~new].sum() > 0
    assert all(terms[True][k].item() != pytest.approx(terms[False][k].item()) for k in terms[True])
    # in a training step the mask comes from the batch's labels (before pseudo-labelling)
    m = _distill_module(stage0_ckpt, distill_new_voxels=False, pseudo_label=True, pseudo_entropy_floor=0.5)
    m.log = lambda *a, **k: None
    seen, real = [], m.strategy.distillation_terms

    def spy(module, x, logits, feats=None, teacher_out=None, acts=None, keep=None):
        seen.append(keep)
        return real(module, x, logits, feats, teacher_out, acts, keep)

    m.strategy.distillation_terms = spy
    m.training_step(batch, 0)
    assert len(seen) == 1 and torch.equal(seen[0], ~new)
    assert _stage_module(stage0_ckpt).hparams.strategy["init_args"]["distill_new_voxels"] is True


def test_default_kd_ramp_in_a_fit_starts_at_zero_and_reaches_kd_weight_halfway(stage0_ckpt, tiny_phantoms, tmp_path):
    """distill's defaults in a real stage: KD 0 at the first step, ``kd_weight`` (10) from half the stage on."""
    import csv

    fit(tmp_path, [ds(tiny_phantoms[0], STAGE1)], f"--model.previous_checkpoint={stage0_ckpt}",
        "--trainer.max_steps=4", "--trainer.max_epochs=10", "--trainer.log_every_n_steps=1")
    rows = list(csv.DictReader(next(tmp_path.rglob("metrics.csv")).open()))
    weights = [(int(r["step"]), float(r["train/kd_weight"])) for r in rows if r.get("train/kd_weight")]
    assert weights == [(0, 0.0), (1, 5.0), (2, 10.0), (3, 10.0)]


def test_kd_ramp_raises_the_output_distillation_weight_linearly_over_the_stage(stage0_ckpt):
    """``kd_ramp_steps``: the KD term weighs ``kd_ramp_start`` at step 0, ``kd_weight`` from step N on; without a
    ramp (here: the default ``kd_ramp_fraction`` outside a fit, which has no stage length) ``kd_weight`` throughout.
    ``kd_ramp_fraction``: the same over a fraction of the stage's steps."""
    batch = _stage_batch()
    m = _distill_module(stage0_ckpt, kd_weight=5.0, kd_ramp_steps=100, kd_ramp_start=1.0, pseudo_label=False)
    flat = _distill_module(stage0_ckpt, kd_weight=5.0, pseudo_label=False)
    flat.load_state_dict(m.state_dict())
    with torch.no_grad():
        t = m.strategy.teacher_outputs(batch["image"])
        feats, ctx = m.net.encode(batch["image"])
        # a student unlike its teacher
        logits = m.logits_from_features(feats, ctx) + 0.5 * torch.randn(2, 7, 16, 16, 16)
    kd_full = flat.strategy.distillation_terms(flat, batch["image"], logits, teacher_out=t)["kd"].item()
    assert kd_full > 0
    for step, weight in ((0, 1.0), (50, 3.0), (100, 5.0), (400, 5.0)):
        # the trainer's step, without a trainer
        with mock.patch.object(CFSegModule, "global_step", new_callable=mock.PropertyMock, return_value=step):
            assert m.strategy.kd_weight_now(m) == pytest.approx(weight)
            kd = m.strategy.distillation_terms(m, batch["image"], logits, teacher_out=t)["kd"].item()
        assert kd == pytest.approx(kd_full * weight / 5.0, rel=1e-5)
    assert flat.strategy.kd_weight_now(flat) == 5.0
    with pytest.raises(ValueError, match="kd_ramp_steps"):
        _distill_module(stage0_ckpt, kd_ramp_steps=-1)
    # kd_ramp_fraction: the same ramp over a fraction of the stage's steps, whatever the stage's length
    for total, step, weight in ((200, 50, 3.0), (200, 100, 5.0), (400, 100, 3.0), (400, 300, 5.0)):
        frac = _distill_module(stage0_ckpt, kd_weight=5.0, kd_ramp_fraction=0.5, kd_ramp_start=1.0, pseudo_label=False)
        frac._trainer = mock.Mock(estimated_stepping_batches=total)  # a stage of `total` steps
        with mock.patch.object(CFSegModule, "global_step", new_callable=mock.PropertyMock, return_value=step):
            assert frac.strategy.kd_ramp_length(frac) == total // 2
            assert frac.strategy.kd_weight_now(frac) == pytest.approx(weight)
    both = _distill_module(stage0_ckpt, kd_weight=5.0, kd_ramp_steps=100, kd_ramp_fraction=0.5)
    both._trainer = mock.Mock(estimated_stepping_batches=400)
    assert both.strategy.kd_ramp_length(both) == 100  # kd_ramp_steps takes precedence
    frac._trainer = None
    # outside a fit: no stage length, no ramp
    assert frac.strategy.kd_ramp_length(frac) == 0 and frac.strategy.kd_weight_now(frac) == 5.0
    with pytest.raises(ValueError, match="kd_ramp_fraction"):
        _distill_module(stage0_ckpt, kd_ramp_fraction=1.5)
