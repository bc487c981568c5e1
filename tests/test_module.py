"""LightningModule + CLI on tiny phantoms: training, self-describing checkpoints, heads, DDP."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cfseg.apps.cli import main as cli
from cfseg.module import CHECKPOINT_FORMAT, load_checkpoint

CONFIG = Path(__file__).parent / "configs" / "tiny.yaml"


def datasets_arg(paths, **kw):
    return json.dumps([{"path": str(p), "val_fraction": 0.25, "test_fraction": 0.0, **kw} for p in paths])


def fit(tmp_path, phantoms, *extra):
    args = ["fit", "--config", str(CONFIG), f"--data.datasets={datasets_arg(phantoms[:1])}",
            f"--trainer.logger.init_args.save_dir={tmp_path}", f"--trainer.default_root_dir={tmp_path}", *extra]
    return cli(args)


def test_fit_writes_a_self_describing_checkpoint(tmp_path, tiny_phantoms):
    run = fit(tmp_path, tiny_phantoms)
    assert run.model.class_names == run.datamodule.class_names  # linked from the data module
    ckpt_path = run.trainer.checkpoint_callback.best_model_path
    ckpt = torch.load(ckpt_path, weights_only=True)  # no pickled code needed
    meta = ckpt["cfseg"]
    assert meta["format"] == CHECKPOINT_FORMAT
    assert meta["vocabulary"] == ["background", *run.datamodule.class_names]
    assert meta["encoder_id"].startswith("sentence-transformers")
    assert meta["preprocessing"]["ct"]["spacing"] == [11.0, 11.0, 11.0]
    assert "liver" in meta["prompts"] and meta["prototype_bank"]["prototypes"].shape[0] == 9
    model = load_checkpoint(ckpt_path)
    assert torch.equal(model.prototypes, run.model.prototypes)
    x = torch.randn(1, 1, 16, 16, 16)
    run.model.eval()
    assert torch.allclose(model(x), run.model(x), atol=1e-5)
    # that training changes the module's own initial weights: tests/test_trust.py


def test_rerun_same_config_and_softmax_head(tmp_path, tiny_phantoms):
    fit(tmp_path, tiny_phantoms)
    run = fit(tmp_path, tiny_phantoms, "--model.head=softmax")  # same dir: the saved config is overwritten
    from cfseg.nets import SoftmaxSegmenter
    assert isinstance(run.model.net, SoftmaxSegmenter)
    model = load_checkpoint(run.trainer.checkpoint_callback.best_model_path)
    assert isinstance(model.net, SoftmaxSegmenter)
    assert model(torch.randn(1, 1, 16, 16, 16), class_indices=[2]).shape == (1, 2, 16, 16, 16)


def test_validation_dice_is_the_models_dice_on_the_validation_cases(box_model, boxes, tmp_path):
    """``cfseg validate`` logs the Dice of the model it is given: a trained model scores clearly above an untrained
    one on the same validation cases, and the logged per-class Dice equals an independent whole-volume evaluation
    (:func:`cfseg.evaluation.evaluate_datasets`) of the same checkpoint on the same split."""
    from conftest import BOX_LABELS, box_dataset

    from cfseg.evaluation import evaluate_datasets

    def validate(*extra):
        run = cli(["validate", "--config", str(CONFIG), f"--data.datasets={json.dumps([box_dataset(boxes)])}",
                   f"--trainer.logger.init_args.save_dir={tmp_path}", "--data.spacing=[4.0, 4.0, 4.0]",
                   "--trainer.limit_val_batches=null", *extra])
        return {k: float(v) for k, v in run.trainer.logged_metrics.items() if "dice" in k}

    trained, untrained = validate(f"--ckpt_path={box_model}"), validate()
    print("validation Dice: trained", trained, "untrained", untrained)
    per_class = [f"val/dice_{c}" for c in BOX_LABELS]
    assert set(per_class) | {"val/mean_dice"} <= trained.keys()
    assert trained["val/mean_dice"] == pytest.approx(sum(trained[k] for k in per_class) / len(per_class), abs=1e-6)
    assert trained["val/mean_dice"] > untrained["val/mean_dice"] + 0.1
    independent = evaluate_datasets(load_checkpoint(str(box_model)), [box_dataset(boxes)], split="val")
    assert independent["n_cases"] == 2
    for c in BOX_LABELS:
        assert trained[f"val/dice_{c}"] == pytest.approx(independent["per_class_dice"][c], abs=1e-4), c


def test_not_a_checkpoint(tmp_path):
    bad = tmp_path / "x.ckpt"
    torch.save({"state_dict": {}}, bad)
    with pytest.raises(ValueError, match="not a cfseg checkpoint"):
        load_checkpoint(str(bad))
    bad.write_text("hello")
    with pytest.raises(ValueError, match="not a loadable cfseg checkpoint"):
        load_checkpoint(str(bad))


def test_ddp_two_cpu_processes(tmp_path, tiny_phantoms):
    """`--trainer.strategy=ddp --trainer.devices=2 --trainer.accelerator=cpu` trains and saves a checkpoint."""
    cmd = [sys.executable, "-m", "cfseg.apps.cli", "fit", "--config", str(CONFIG),
           f"--data.datasets={datasets_arg(tiny_phantoms)}", f"--trainer.logger.init_args.save_dir={tmp_path}",
           f"--trainer.default_root_dir={tmp_path}", "--trainer.strategy=ddp", "--trainer.devices=2",
           "--trainer.accelerator=cpu", "--trainer.max_steps=3"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=420, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "GLOBAL_RANK: 1" in r.stderr + r.stdout or "world_size=2" in (r.stderr + r.stdout).replace(" ", "")
    ckpts = list(Path(tmp_path).rglob("tiny.ckpt"))
    assert len(ckpts) == 1
    metrics = list(Path(tmp_path).rglob("metrics.csv"))
    assert metrics and "train/loss_step" in metrics[0].read_text()
    model = load_checkpoint(str(ckpts[0]))
    assert torch.isfinite(model.net.head.weight).all()


def test_console_script_exit_status(tmp_path, tiny_phantoms):
    """`cfseg fit ...` exits 0 after a successful run (the CLI object is not the exit status)."""
    cmd = [sys.executable, "-m", "cfseg.apps.cli", "fit", "--config", str(CONFIG),
           f"--data.datasets={datasets_arg(tiny_phantoms[:1])}", f"--trainer.logger.init_args.save_dir={tmp_path}",
           f"--trainer.default_root_dir={tmp_path}", "--trainer.max_steps=1"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]


def test_bf16_on_a_cpu_without_native_bf16_warns(monkeypatch):
    import cfseg.apps.cli as c

    monkeypatch.setattr(c, "native_bf16", lambda: False)
    with pytest.warns(UserWarning, match="without native bfloat16"):
        assert c.warn_slow_bf16("bf16-mixed", "CPUAccelerator")
    assert not c.warn_slow_bf16("32-true", "CPUAccelerator")
    assert not c.warn_slow_bf16("bf16-mixed", "CUDAAccelerator")
    monkeypatch.setattr(c, "native_bf16", lambda: True)
    assert not c.warn_slow_bf16("bf16-mixed", "CPUAccelerator")


def test_keep_freed_memory_sets_glibc_thresholds_or_says_no(monkeypatch):
    import platform
    import sys

    from cfseg.apps import cli as c

    monkeypatch.setenv("CFSEG_MALLOC_KEEP", "0")
    assert c.keep_freed_memory() is False  # opt-out
    monkeypatch.delenv("CFSEG_MALLOC_KEEP")
    expected = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
    assert c.keep_freed_memory() is expected  # set on Linux/glibc (the CI image); elsewhere nothing is changed


def test_test_writes_the_dice_of_every_case(box_model, boxes, tmp_path):
    """``cfseg test`` writes ``test_cases.csv`` (one row per test case, a column per class); each class's mean over
    the rows is the logged ``test/dice_<class>`` and the row count is ``test/n_cases``."""
    import csv

    from conftest import BOX_LABELS, box_dataset

    data = box_dataset(boxes, val_fraction=0.0, test_fraction=0.5)
    run = cli(["test", "--config", str(CONFIG), f"--data.datasets={json.dumps([data])}",
               f"--trainer.logger.init_args.save_dir={tmp_path}", "--data.spacing=[4.0, 4.0, 4.0]",
               f"--ckpt_path={box_model}"])
    logged = {k: float(v) for k, v in run.trainer.logged_metrics.items()}
    (path,) = tmp_path.rglob("test_cases.csv")
    rows = list(csv.DictReader(path.open()))
    assert len(rows) == logged["test/n_cases"] == 3
    assert {r["case_id"] for r in rows} == {c["case_id"] for c in run.model.case_scores}
    for c in BOX_LABELS:
        assert sum(float(r[c]) for r in rows) / len(rows) == pytest.approx(logged[f"test/dice_{c}"], abs=1e-5), c


def test_lr_schedules_warm_up_then_decay_to_zero():
    from cfseg.module import lr_factor

    cos = [lr_factor(s, total=100, warmup=10) for s in range(101)]
    poly = [lr_factor(s, total=100, warmup=10, kind="poly") for s in range(101)]
    assert cos[:10] == poly[:10] == [pytest.approx((s + 1) / 10) for s in range(10)]
    assert cos[10] == poly[10] == 1.0 and cos[100] == pytest.approx(0.0) and poly[100] == 0.0
    assert all(a >= b for a, b in zip(poly[10:], poly[11:], strict=False))
    assert poly[55] == pytest.approx(0.5 ** 0.9)  # halfway after the warm-up: nnU-Net's (1 - t) ** 0.9
    assert cos[55] == pytest.approx(0.5)


def test_sgd_optimizer_and_poly_schedule_are_built_and_bad_names_refused():
    from cfseg.module import CFSegModule

    backbone = {"class_path": "monai.networks.nets.UNet", "init_args": {
        "spatial_dims": 3, "in_channels": 1, "out_channels": 8, "channels": [4, 8], "strides": [2]}}
    kw = dict(class_names=["liver", "spleen"], backbone=backbone, feature_channels=8)
    conf = CFSegModule(**kw, lr=0.01, optimizer_name="sgd", lr_schedule="poly",
                       warmup_fraction=0.0).configure_optimizers()
    opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    assert isinstance(opt, torch.optim.SGD)
    assert opt.param_groups[0]["momentum"] == 0.99 and opt.param_groups[0]["nesterov"]
    for _ in range(500):  # without a trainer the schedule spans 1000 steps
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01 * 0.5 ** 0.9, rel=1e-3)
    assert isinstance(CFSegModule(**kw).configure_optimizers()["optimizer"], torch.optim.AdamW)
    with pytest.raises(ValueError, match="optimizer_name"):
        CFSegModule(**kw, optimizer_name="adam")
    with pytest.raises(ValueError, match="lr_schedule"):
        CFSegModule(**kw, lr_schedule="step")


def test_deep_supervision_loss_is_nnunets_weighted_sum_of_every_output():
    from cfseg.module import CFSegModule
    from cfseg.nets import deep_supervision_weights

    assert deep_supervision_weights(3) == pytest.approx([4 / 7, 2 / 7, 1 / 7])
    backbone = {"class_path": "monai.networks.nets.DynUNet", "init_args": {
        "spatial_dims": 3, "in_channels": 1, "out_channels": 8, "kernel_size": [3, 3, 3], "strides": [1, 2, 2],
        "upsample_kernel_size": [2, 2], "filters": [4, 8, 16], "deep_supervision": True, "deep_supr_num": 1}}
    m = CFSegModule(class_names=["liver", "spleen"], backbone=backbone, feature_channels=8).train()
    m.log = lambda *a, **k: None
    torch.manual_seed(0)
    label = torch.zeros(2, 1, 16, 16, 16, dtype=torch.uint8)
    label[:, :, 2:8, 2:8, 2:8] = 1
    label[:, :, 9:14, 9:14, 9:14] = 2
    batch = {"image": torch.randn(2, 1, 16, 16, 16), "label": label, "annotated": torch.ones(2, 3, dtype=torch.bool)}
    loss = m.training_step(batch, 0)
    stacked = m.net.backbone(batch["image"])  # [B, 2, F, *S]: the main output, then the deep one
    assert stacked.shape == (2, 2, 8, 16, 16, 16)
    parts = []
    for i in range(2):
        logits = m.net.logits(m.net.head.features(stacked[:, i]), None, **m.head_context())
        parts.append(sum(m.loss_terms(logits, batch, label[:, 0].long(), batch["annotated"]).values()))
    w = deep_supervision_weights(2)
    assert loss.item() == pytest.approx((w[0] * parts[0] + w[1] * parts[1]).item(), rel=1e-5)
    assert abs(parts[0].item() - parts[1].item()) > 1e-4  # the deep output is scored on its own
    m.eval()
    feats, context = m.net.encode(batch["image"])  # in eval the network returns its main output only
    assert feats.shape[1] == m.net.head.features(stacked[:, 0]).shape[1] and "deep_features" not in context
