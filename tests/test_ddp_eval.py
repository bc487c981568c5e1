"""Evaluation under DDP counts every case once: ``cfseg validate`` on 2 CPU processes (gloo) logs the same Dice as on
one, where a padding sampler would score one of the 3 validation cases twice; ``cfseg predict`` on 2 processes
writes every case once, the shared files once and no temporary file; the evaluation loaders take an unpadded
:class:`~torch.utils.data.DistributedSampler` when a process group is running and a plain one otherwise."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DistributedSampler, SequentialSampler

CONFIG = Path(__file__).parent / "configs" / "tiny.yaml"
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _data(boxes: Path, split: str) -> dict:
    """The 6 boxes with 3 cases in ``split`` ("val" or "test"): shared out 2 + 1 on two processes."""
    from conftest import box_dataset

    return box_dataset(boxes, val_fraction=0.5 if split == "val" else 0.0,
                       test_fraction=0.5 if split == "test" else 0.0)


def _args(command: str, boxes: Path, ckpt: Path, root: Path, split: str, *extra: str) -> list[str]:
    return [command, "--config", str(CONFIG), f"--data.datasets={json.dumps([_data(boxes, split)])}",
            "--data.spacing=[4.0, 4.0, 4.0]", f"--ckpt_path={ckpt}", f"--trainer.default_root_dir={root}",
            f"--trainer.logger.init_args.save_dir={root}", "--trainer.limit_val_batches=1.0", *extra]


def _cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "cfseg.apps.cli", *args], capture_output=True, text=True,
                       timeout=300, cwd=cwd)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def _logged(root: Path, prefix: str) -> dict[str, float]:
    """The ``<prefix>/...`` values of the CSV logger's only metrics.csv under ``root``."""
    (path,) = root.rglob("metrics.csv")
    out: dict[str, float] = {}
    with path.open() as f:
        for row in csv.DictReader(f):
            out.update({k: float(v) for k, v in row.items() if k.startswith(prefix + "/") and v})
    return out


@pytest.fixture(scope="module")
def single_process_validation(box_model, boxes, tmp_path_factory):
    """``cfseg validate`` in this process (one device): the logged values and the per-case Dice."""
    from cfseg.apps.cli import main as cli

    root = tmp_path_factory.mktemp("validate_1")
    run = cli(_args("validate", boxes, box_model, root, "val"))
    (val,) = run.datamodule.datasets
    order = [item["case_id"] for item in run.datamodule.items(val, "val")]
    return _logged(root, "val"), run.model.case_scores, order


def test_validate_on_two_processes_logs_the_single_process_dice(single_process_validation, box_model, boxes,
                                                                 tmp_path):
    one, cases, order = single_process_validation
    assert one["val/n_cases"] == 3 and len(cases) == 3 and "val/mean_dice" in one
    _cli(_args("validate", boxes, box_model, tmp_path, "val", "--trainer.strategy=ddp", "--trainer.devices=2",
               "--trainer.accelerator=cpu"), tmp_path)
    two = _logged(tmp_path, "val")
    print({k: (one[k], two.get(k)) for k in sorted(one)})
    assert sorted(two) == sorted(one)
    for k in one:
        assert two[k] == pytest.approx(one[k], abs=1e-6), k

    # a padding DistributedSampler (shuffle off) gives rank 0 cases [0, 2] and rank 1 [1, 0]: case 0 twice
    assert _mean_dice(cases) == pytest.approx(one["val/mean_dice"], abs=1e-6)
    padded = _mean_dice([*cases, next(c for c in cases if c["case_id"] == order[0])])
    print(f"val/mean_dice: each case once {one['val/mean_dice']:.6f}, case {order[0]} twice {padded:.6f}")
    assert abs(padded - one["val/mean_dice"]) > 1e-4  # so the equality above would catch a repeated case


def _mean_dice(cases: list[dict]) -> float:
    """The mean over classes of the mean Dice per class over the cases annotating it (cfseg's val/mean_dice)."""
    names = sorted({n for c in cases for n in c["dice"]})
    return sum(sum(c["dice"][n] for c in cases if n in c["dice"]) / sum(n in c["dice"] for c in cases)
               for n in names) / len(names)


def test_predict_on_two_processes_writes_each_case_and_the_shared_files_once(box_model, boxes, tmp_path):
    r = _cli(_args("predict", boxes, box_model, tmp_path, "test", "--trainer.strategy=ddp", "--trainer.devices=2",
                   "--trainer.accelerator=cpu"), tmp_path)
    out = tmp_path / "predictions"
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())  # hidden temporary files too
    masks = [f for f in files if f.endswith(".nii.gz")]
    assert len(masks) == 3 and files == sorted([*masks, "labels.json", "checks.json"]), files
    assert r.stdout.count("cfseg predict: wrote") == 1 and "cfseg predict: wrote 3 label maps" in r.stdout
    assert json.loads((out / "labels.json").read_text())["0"] == "background"
    checks = json.loads((out / "checks.json").read_text())  # every process's cases, each with its verdict
    assert sorted(f"{c['dataset']}/{c['case_id']}.nii.gz" for c in checks) == masks
    assert all(c["ood_score"] is not None and c["written"] for c in checks)


def _fake_group(monkeypatch, rank: int) -> None:
    """torch.distributed as a running 2-process group seen from ``rank`` (no collective is called)."""
    import torch.distributed as dist

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: rank)


def test_evaluation_loaders_are_unpadded_under_a_process_group(boxes, monkeypatch):
    from cfseg.data.datamodule import SegDataModule

    val, test = (SegDataModule([_data(boxes, split)], cache="none", spacing=(4.0, 4.0, 4.0))
                 for split in ("val", "test"))
    loaders = {"val": val.val_dataloader, "test": test.test_dataloader, "predict": test.predict_dataloader}
    for name, make in loaders.items():  # no group: the plain sequential sampler
        assert isinstance(make().sampler, SequentialSampler), name
    shares: dict[tuple[str, int], list[int]] = {}
    for rank in (0, 1):
        with monkeypatch.context() as m:
            _fake_group(m, rank)
            for name, make in loaders.items():
                sampler = make().sampler
                # a DistributedSampler subclass, so Lightning keeps it instead of injecting its padding one
                assert isinstance(sampler, DistributedSampler) and not sampler.shuffle, name
                shares[name, rank] = list(sampler)
            assert not isinstance(val.train_dataloader().sampler, DistributedSampler)  # Lightning's, for training
    for name in loaders:
        assert (len(shares[name, 0]), len(shares[name, 1])) == (2, 1), name  # padding would give 2 and 2
        assert sorted(shares[name, 0] + shares[name, 1]) == [0, 1, 2], name
    assert not torch.distributed.is_initialized()
