"""``cfseg predict`` on 2 CPU processes (DDP, gloo): every case written once, the count and the checks gathered; the
evaluation loaders are unpadded under DDP; the writer's out-of-domain warning and ``strict``."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

CONFIG = Path(__file__).parent / "configs" / "tiny.yaml"
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def test_predict_on_two_processes_writes_every_case_once(box_model, boxes, tmp_path):
    from conftest import box_dataset

    data = box_dataset(boxes, val_fraction=0.0, test_fraction=0.5)  # 3 test cases: 2 + 1 on two processes
    cmd = [sys.executable, "-m", "cfseg.apps.cli", "predict", "--config", str(CONFIG),
           f"--data.datasets={json.dumps([data])}", "--data.spacing=[4.0, 4.0, 4.0]", f"--ckpt_path={box_model}",
           f"--trainer.default_root_dir={tmp_path}", f"--trainer.logger.init_args.save_dir={tmp_path}",
           "--trainer.strategy=ddp", "--trainer.devices=2"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "predictions"
    masks = sorted(out.rglob("*.nii.gz"))
    print(r.stdout[-500:])
    assert len(masks) == 3
    assert r.stdout.count("cfseg predict: wrote 3 label maps") == 1  # the total, printed once
    checks = json.loads((out / "checks.json").read_text())
    assert sorted(c["case_id"] for c in checks) == sorted(p.name.removesuffix(".nii.gz") for p in masks)
    assert all(c["ood_score"] is not None and c["written"] for c in checks)
    assert (out / "labels.json").is_file() and not list(tmp_path.rglob("*.tmp"))


def _gloo_loaders(rank: int, port: int, boxes: str, results) -> None:
    import os

    import torch.distributed as dist

    from cfseg.data.datamodule import SegDataModule

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        dm = SegDataModule([{"path": boxes, "val_fraction": 0.5, "test_fraction": 0.0}], cache="none",
                           spacing=(4.0, 4.0, 4.0))
        results[rank] = [b["case_id"][0] for b in dm.val_dataloader()]
    finally:
        dist.destroy_process_group()


def test_validation_cases_are_shared_out_without_repeats(boxes):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_gloo_loaders, args=(port, str(boxes), results), nprocs=2, join=True)
    r0, r1 = results[0], results[1]
    assert (len(r0), len(r1)) == (2, 1)  # 3 cases: a padding sampler would give each process 2
    assert not set(r0) & set(r1)


def test_strict_writer_writes_no_mask_for_an_input_outside_the_domain(tmp_path):
    from types import SimpleNamespace

    from cfseg.apps.writers import NiftiPredictionWriter

    trainer = SimpleNamespace(is_global_zero=True)
    module = SimpleNamespace(bank=SimpleNamespace(names=["background", "liver"]))

    def case(cid, unlike):
        return {"case_id": cid, "dataset": "d", "source": f"/in/{cid}.nii.gz", "affine": np.eye(4),
                "labels": np.zeros((4, 4, 4), np.uint8),
                "checks": {"ood_score": 2.0 if unlike else 0.1, "ood_threshold": 1.0, "out_of_domain": unlike}}

    for strict in (False, True):
        w = NiftiPredictionWriter(str(tmp_path / str(strict)), strict=strict)
        w.on_predict_start(trainer, module)
        with pytest.warns(UserWarning, match="unlike the images this checkpoint was trained on"):
            w.write_on_batch_end(trainer, module, [case("a", False), case("b", True)], None, None, 0, 0)
        w.on_predict_end(trainer, module)
        written = sorted(p.name for p in (tmp_path / str(strict)).rglob("*.nii.gz"))
        checks = json.loads((tmp_path / str(strict) / "checks.json").read_text())
        assert written == (["a.nii.gz"] if strict else ["a.nii.gz", "b.nii.gz"])
        assert [c["written"] for c in checks] == [True, not strict]
        assert checks[1]["out_of_domain"] is True and checks[1]["ood_score"] == 2.0


def test_predict_step_reports_the_out_of_domain_verdict(box_model, boxes):
    from cfseg.module import load_checkpoint

    module = load_checkpoint(str(box_model))
    image = sorted((boxes / "imagesTr").glob("*.nii.gz"))[0]
    verdict = module.ood_check_file(str(image))
    assert verdict["out_of_domain"] is False and 0 <= verdict["ood_score"] < verdict["ood_threshold"]
    module.domain_statistics = None
    assert module.ood_check_file(str(image)) == {"ood_score": None, "ood_threshold": None, "out_of_domain": None}
