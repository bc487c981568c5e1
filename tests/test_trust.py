"""Trust (issue 10): checkpoints are data, class indices follow names, resume keeps one stage, runs reproduce."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import BOX_LABELS, box_dataset, make_boxes

from cfseg.apps.cli import CFSegCLI
from cfseg.apps.cli import main as cli
from cfseg.apps.cli import run as cli_run
from cfseg.builder import TRUSTED_ENV, UntrustedSpecError, build_network
from cfseg.data.datamodule import SegDataModule
from cfseg.data.transforms import Preprocessing
from cfseg.module import CFSegModule, load_checkpoint, merge_preprocessing

CONFIG = Path(__file__).parent / "configs" / "tiny.yaml"
TINY_BACKBONE = yaml.safe_load(CONFIG.read_text())["model"]["backbone"]
CONV = {"class_path": "torch.nn.Conv3d", "init_args": {"in_channels": 1, "out_channels": 8, "kernel_size": 1}}


def save_ckpt(path: Path, backbone: dict | None = None, trusted: list[str] | None = None) -> Path:
    """A real cfseg checkpoint (no training), optionally with its backbone spec replaced afterwards."""
    model = CFSegModule(class_names=["liver", "spleen"], backbone=dict(CONV if trusted else TINY_BACKBONE),
                        feature_channels=8, preprocessing={"ct": Preprocessing().to_dict()}, trusted_modules=trusted)
    ckpt = {"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}
    model.on_save_checkpoint(ckpt)
    if backbone is not None:
        ckpt["hyper_parameters"]["backbone"] = backbone
    torch.save(ckpt, path)
    return path


# ---- 1. checkpoints are data ------------------------------------------------------------------------------
@pytest.mark.parametrize("make_spec", [
    lambda d: {"class_path": "os.makedirs", "init_args": {"name": str(d / "pwned")}},
    lambda d: {"class_path": "subprocess.run", "init_args": {"args": ["mkdir", str(d / "pwned")]}},
    lambda d: {"class_path": "builtins.eval", "init_args": {}},
    lambda d: {"class_path": "evil_on_import.Net", "init_args": {}},  # importing it would create d/pwned
    lambda d: {"class_path": "monai.networks.nets_but_not.Net", "init_args": {}},  # prefix without the dot
    lambda d: {"class_path": "monai.networks.nets.efficientnet.BlockArgs", "init_args": {}},  # not an nn.Module
    lambda d: {"class_path": "monai.networks.nets.resnet10", "init_args": {}},  # a function, not a class
], ids=["os.makedirs", "subprocess.run", "builtins.eval", "import-side-effect", "prefix-trick", "not-a-module",
        "function"])
def test_checkpoint_naming_code_is_refused_before_anything_runs(tmp_path, monkeypatch, make_spec):
    (tmp_path / "evil_on_import.py").write_text(
        f"import os\nos.makedirs({str(tmp_path / 'pwned')!r})\nclass Net:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    path = save_ckpt(tmp_path / "evil.ckpt", make_spec(tmp_path))
    with pytest.raises(UntrustedSpecError, match="refusing to build"):
        load_checkpoint(str(path))
    assert not (tmp_path / "pwned").exists()
    assert "evil_on_import" not in sys.modules
    # the same file as an incremental stage's teacher, and through the command line tools
    with pytest.raises(UntrustedSpecError):
        CFSegModule(class_names=["liver", "spleen", "aorta"], backbone=TINY_BACKBONE, feature_channels=8,
                    previous_checkpoint=str(path))
    from cfseg.apps.segment import main as segment_main

    assert segment_main(["--ckpt", str(path), "--list-classes"]) == 2
    assert not (tmp_path / "pwned").exists()


def test_ckpt_path_hyperparameters_cannot_trust_code(box_model, boxes, tmp_path, monkeypatch):
    """Lightning merges a --ckpt_path checkpoint's hyper-parameters into the config; trust is not among them."""
    (tmp_path / "evil_on_import.py").write_text(
        f"import os\nos.makedirs({str(tmp_path / 'pwned')!r})\nclass Net:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    ckpt = torch.load(box_model, weights_only=True)
    ckpt["hyper_parameters"]["trusted_modules"] = ["evil_on_import"]
    ckpt["hyper_parameters"]["backbone"] = {"class_path": "evil_on_import.Net", "init_args": {}}
    torch.save(ckpt, tmp_path / "evil.ckpt")
    with pytest.raises(UntrustedSpecError, match="evil_on_import.Net"):
        cli(["validate", "--config", str(CONFIG), f"--data.datasets={json.dumps([box_dataset(boxes)])}",
             f"--trainer.logger.init_args.save_dir={tmp_path}", "--data.spacing=[4.0, 4.0, 4.0]",
             f"--ckpt_path={tmp_path / 'evil.ckpt'}"])
    assert not (tmp_path / "pwned").exists() and "evil_on_import" not in sys.modules


def test_own_network_needs_explicit_trust(tmp_path, monkeypatch):
    with pytest.raises(UntrustedSpecError, match="torch.nn.Conv3d"):
        build_network(CONV)
    assert isinstance(build_network(CONV, ["torch.nn"]), torch.nn.Conv3d)
    path = save_ckpt(tmp_path / "own.ckpt", trusted=["torch.nn"])
    assert torch.load(path, weights_only=True)["hyper_parameters"]["trusted_modules"] == ["torch.nn"]
    with pytest.raises(UntrustedSpecError):  # the file's own trusted_modules is never honoured
        load_checkpoint(str(path))
    assert isinstance(load_checkpoint(str(path), trusted_modules=["torch.nn"]).net.backbone, torch.nn.Conv3d)
    monkeypatch.setenv(TRUSTED_ENV, "torch.nn")
    assert isinstance(load_checkpoint(str(path)).net.backbone, torch.nn.Conv3d)


# ---- 2. class indices follow names ------------------------------------------------------------------------
def test_validate_on_reordered_dataset_scores_the_same(box_model, boxes, tmp_path):
    """The same images with label values permuted and dataset.json in another order: identical Dice per class."""
    permuted = make_boxes(tmp_path / "Dataset051_permuted", {"liver": 3, "spleen": 1, "aorta": 2})
    assert list(json.loads((permuted / "dataset.json").read_text())["labels"])[1:] == ["spleen", "aorta", "liver"]
    scores = []
    for root in (boxes, permuted):
        run = cli(["validate", "--config", str(CONFIG), f"--data.datasets={json.dumps([box_dataset(root)])}",
                   f"--trainer.logger.init_args.save_dir={tmp_path}", "--data.spacing=[4.0, 4.0, 4.0]",
                   "--trainer.limit_val_batches=null", f"--ckpt_path={box_model}"])
        assert run.datamodule.class_names == list(BOX_LABELS)  # the checkpoint's order, not the file's
        scores.append({k: float(v) for k, v in run.trainer.logged_metrics.items() if "dice_" in k})
    assert scores[0] == pytest.approx(scores[1], abs=1e-6)
    per_class = sorted(scores[0][f"val/dice_{c}"] for c in BOX_LABELS)
    assert per_class[-1] > 0.2 and per_class[-1] - per_class[0] > 0.02  # a swap of classes would show


def test_fit_resume_refuses_another_vocabulary(box_model, tiny_phantoms, tmp_path, capsys):
    args = ["fit", "--config", str(CONFIG), f"--trainer.logger.init_args.save_dir={tmp_path}",
            f"--data.datasets={json.dumps([{'path': str(tiny_phantoms[1]), 'val_fraction': 0.25}])}",
            f"--ckpt_path={box_model}"]
    with pytest.raises(ValueError, match="does not know"):
        cli(args)
    assert cli_run(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("cfseg: error:") and "kidney_left" in err[0]
    # a model whose classes are in another order than the checkpoint's is refused before its weights load
    model = CFSegModule(class_names=["aorta", "liver", "spleen"], backbone=TINY_BACKBONE, feature_channels=8)
    with pytest.raises(ValueError, match="same classes in another order"):
        model.on_load_checkpoint(torch.load(box_model, weights_only=True))


# ---- 3. preprocessing of every domain ---------------------------------------------------------------------
def test_merge_preprocessing_keeps_domains_and_refuses_conflicts():
    ct, mri = Preprocessing("ct").to_dict(), Preprocessing("mri").to_dict()
    assert merge_preprocessing({"ct": ct}, {"mri": mri}) == {"ct": ct, "mri": mri}
    assert merge_preprocessing({"ct": ct}, {"ct": {**ct, "spacing": tuple(ct["spacing"])}}) == {"ct": ct}
    with pytest.raises(ValueError, match="two preprocessings for 'ct'"):
        merge_preprocessing({"ct": ct}, {"ct": {**ct, "spacing": [2.0, 2.0, 2.0]}})


# ---- 6. resume after kill -9 ------------------------------------------------------------------------------
def test_resume_after_kill_finishes_with_one_stage_and_same_steps(boxes, tmp_path):
    ckpt_dir = tmp_path / "ckpts"
    extra = tmp_path / "resume.yaml"
    extra.write_text(yaml.safe_dump({"trainer": {"callbacks": [{
        "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
        "init_args": {"dirpath": str(ckpt_dir), "filename": "tiny", "monitor": None, "save_last": True,
                      "every_n_train_steps": 4, "enable_version_counter": False}}]}}))
    steps = 40
    cmd = [sys.executable, "-m", "cfseg.apps.cli", "fit", "--config", str(CONFIG), "--config", str(extra),
           f"--data.datasets={json.dumps([box_dataset(boxes)])}", f"--trainer.logger.init_args.save_dir={tmp_path}",
           f"--trainer.default_root_dir={tmp_path}", f"--trainer.max_steps={steps}", "--trainer.max_epochs=100",
           "--data.spacing=[4.0, 4.0, 4.0]", "--data.train_repeats=10", "--trainer.check_val_every_n_epoch=100",
           "--trainer.enable_progress_bar=false"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    last = ckpt_dir / "last.ckpt"
    deadline = time.time() + 240
    while not last.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # let the write finish; the next save is a few steps away
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    killed_at = torch.load(last, weights_only=True)["global_step"]
    assert 0 < killed_at < steps
    r = subprocess.run([*cmd, "--ckpt_path=last"], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    final = torch.load(ckpt_dir / "last.ckpt", weights_only=True)
    assert final["global_step"] == steps
    history = final["cfseg"]["stage_history"]
    assert len(history) == 1 and history[0]["stage"] == 0
    assert load_checkpoint(str(ckpt_dir / "last.ckpt")).stage_history == history


# ---- 8. a test that fails when training does nothing ------------------------------------------------------
def test_training_changes_the_modules_own_initial_weights(boxes, tmp_path):
    args = ["--config", str(CONFIG), f"--data.datasets={json.dumps([box_dataset(boxes)])}",
            f"--trainer.logger.init_args.save_dir={tmp_path}", f"--trainer.default_root_dir={tmp_path}",
            "--data.spacing=[4.0, 4.0, 4.0]"]
    c = CFSegCLI(CFSegModule, SegDataModule, args=args, run=False)
    before = {k: v.clone() for k, v in c.model.state_dict().items() if isinstance(v, torch.Tensor)}
    c.trainer.fit(c.model, c.datamodule)
    after = c.model.state_dict()
    assert torch.equal(before["bank.prototypes"], after["bank.prototypes"])  # prototypes are fixed
    changed = [k for k in before if k.startswith("net.") and not torch.equal(before[k], after[k])]
    assert "net.head.weight" in changed and any("backbone" in k for k in changed)


def test_a_config_naming_a_strategy_outside_the_allow_list_is_refused_before_import(boxes, tmp_path, monkeypatch):
    """``model.strategy`` goes through the strategies' allow-list like a checkpoint's network: nothing is imported."""
    (tmp_path / "evil_strategy.py").write_text("import pathlib\npathlib.Path(__file__).with_suffix('.ran').touch()\n"
                                               "class X: pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    from cfseg.apps.cli import main as cli

    data = json.dumps([box_dataset(boxes)])
    with pytest.raises(ValueError, match="refusing strategy 'evil_strategy.X'"):
        cli(["fit", "--config", str(CONFIG), f"--data.datasets={data}", f"--trainer.default_root_dir={tmp_path}",
             f"--trainer.logger.init_args.save_dir={tmp_path}", '--model.strategy={"class_path": "evil_strategy.X"}'])
    assert not (tmp_path / "evil_strategy.ran").exists()
