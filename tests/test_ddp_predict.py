"""Evaluation loaders under a real 2-process gloo group (unpadded: each case on one process); the prediction
writer's out-of-domain warning and ``strict``; ``cfseg predict``'s per-case verdict. The DDP run of ``cfseg predict``
itself: tests/test_ddp_eval.py."""

import json

import numpy as np
import pytest

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


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
