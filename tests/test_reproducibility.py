"""The same seed gives the same random crops and the same trained weights.

``seed_everything`` seeds torch, numpy and random, but MONAI's random transforms keep their own numpy
RandomState (created at import from OS entropy), so the data module seeds them, and the shuffling, from
``torch.initial_seed()`` when it creates the training DataLoader, and reseeds them per DataLoader worker.

What still varies between runs with the same seed, and is held fixed here: the number of CPU threads
(``OMP_NUM_THREADS``; float reductions are split differently) and, on a GPU, non-deterministic kernels (cuDNN
convolution algorithms, atomics in scatter/index ops) unless ``trainer.deterministic: true``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import make_nnunet

from cfseg.data import datamodule as dmod
from cfseg.data.datamodule import DatasetConfig, SegDataModule

ROOT = Path(__file__).resolve().parents[1]
CFSEG = Path(sys.executable).with_name("cfseg")


@pytest.fixture(scope="module")
def two_small(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("repro")
    a = make_nnunet(tmp / "site_a", {"liver": 1, "spleen": 2}, n_cases=4, shape=(16, 16, 16))
    b = make_nnunet(tmp / "site_b", {"liver": 1, "kidney_right": 3}, n_cases=4, shape=(16, 16, 16), seed=1)
    return a, b


def _batches(roots, seed: int, n: int = 2, num_workers: int = 0, **kw) -> list[dict]:
    L.seed_everything(seed, workers=True, verbose=False)
    args = dict(spacing=(1.0, 1.0, 1.0), patch_size=(8, 8, 8), batch_size=2, samples_per_volume=2, crop="random",
                val_fraction=0.0, num_workers=num_workers, cache="none" if num_workers else "memory")
    args.update(kw)
    val = args.pop("val_fraction")
    dm = SegDataModule([DatasetConfig(str(r), val_fraction=val, test_fraction=0.0) for r in roots], **args)
    dm.setup("fit")
    it = iter(dm.train_dataloader())
    return [next(it) for _ in range(n)]


def _same(x: list[dict], y: list[dict]) -> bool:
    return all(torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
               and a["case_id"] == b["case_id"] for a, b in zip(x, y, strict=True))


def test_same_seed_same_crops_in_one_process(two_small):
    first = _batches(two_small, seed=7)
    assert _same(first, _batches(two_small, seed=7))  # crops, intensity augmentation and shuffling repeat
    assert not _same(first, _batches(two_small, seed=8))


def test_dataloader_workers_reproducible(two_small):
    first = _batches(two_small, seed=3, n=4, num_workers=2)
    assert _same(first, _batches(two_small, seed=3, n=4, num_workers=2))


def test_workers_get_different_streams(two_small, monkeypatch):
    """seed_worker reseeds each worker's copy of the transforms from that worker's own seed."""
    L.seed_everything(0, verbose=False)
    dm = SegDataModule([DatasetConfig(str(two_small[0]), val_fraction=0.0, test_fraction=0.0)],
                       spacing=(1.0, 1.0, 1.0), patch_size=(8, 8, 8), crop="random", cache="none")
    ds = dm.split_dataset("train")
    draws = []
    for worker_seed in (100, 101, 100):
        info = torch.utils.data._utils.worker.WorkerInfo(id=worker_seed - 100, num_workers=2, seed=worker_seed,
                                                         dataset=ds)
        monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda info=info: info)
        dmod.seed_worker(worker_seed - 100)
        draws.append(ds.datasets[0].transform.R.randint(2**31, size=4).tolist())
    assert draws[0] != draws[1] and draws[0] == draws[2]


def _fit(cwd: Path, roots: list[Path], seed: int) -> subprocess.Popen:
    cwd.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    datasets = "[" + ", ".join(f"{{path: {r}}}" for r in roots) + "]"
    cmd = [str(CFSEG), "fit", "--config", str(ROOT / "tests" / "configs" / "tiny.yaml"), f"--data.datasets={datasets}",
           f"--seed_everything={seed}", "--trainer.max_steps=3", "--trainer.enable_progress_bar=false"]
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _equal(a, b) -> bool:
    if torch.is_tensor(a) or torch.is_tensor(b):
        return torch.is_tensor(a) and torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def test_two_fit_runs_same_seed_bit_identical_weights(tiny_phantoms, tmp_path):
    """Two ``cfseg fit`` processes (run side by side, one thread each) with the same seed: identical weights.

    Before the data module seeded MONAI's transforms, these two runs drew different crops and their weights
    differed after 3 steps.
    """
    procs = [_fit(tmp_path / f"run{i}", tiny_phantoms, seed=5) for i in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-3000:]
    ckpts = [tmp_path / f"run{i}" / "results" / "tiny" / "logs" / "version_0" / "checkpoints" / "tiny.ckpt"
             for i in range(2)]
    a, b = (torch.load(c, map_location="cpu", weights_only=True) for c in ckpts)
    assert a["global_step"] == b["global_step"] == 3
    assert a["state_dict"].keys() == b["state_dict"].keys()
    differing = [k for k in a["state_dict"] if not _equal(a["state_dict"][k], b["state_dict"][k])]
    assert not differing, differing
