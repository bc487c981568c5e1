"""Shared fixtures: tiny hand-made datasets and the location of the real data."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REAL_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def real_dataset(name: str) -> Path:
    """Path of a dataset in ../shared/data, or skip the test with the reason."""
    path = REAL_DATA / name
    if not (path / "dataset.json").is_file():
        pytest.skip(f"real dataset {name} not found at {path} (../shared/data is absent on this machine)")
    return path


def write_nifti(path: Path, array: np.ndarray, affine: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.eye(4) if affine is None else affine), str(path))
    return path


def make_nnunet(root: Path, labels: dict[str, int], n_cases: int = 3, shape=(12, 10, 8), seed: int = 0,
                channel: str = "CT", partial: dict | None = None) -> Path:
    """A tiny nnU-Net v2 dataset: label k is a box at a distinct place; image = 100 * label + noise."""
    rng = np.random.default_rng(seed)
    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    (root / "labelsTr").mkdir(parents=True, exist_ok=True)
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": channel}, "labels": {"background": 0, **labels},
        "numTraining": n_cases, "file_ending": ".nii.gz"}))
    for i in range(n_cases):
        lab = np.zeros(shape, np.uint8)
        for j, v in enumerate(sorted(labels.values())):
            lab[1 + 2 * j: 3 + 2 * j, 2:6, 2:6] = v
        img = (lab * 10.0 + rng.normal(0, 1, shape)).astype(np.float32)
        write_nifti(root / "imagesTr" / f"case{i}_0000.nii.gz", img)
        write_nifti(root / "labelsTr" / f"case{i}.nii.gz", lab)
    if partial is not None:
        (root / "partial_labels.json").write_text(json.dumps(partial))
    return root


@pytest.fixture(scope="session", autouse=True)
def _text_cache(tmp_path_factory):
    """Text-embedding cache shared by the session (and its subprocesses), never the user's home."""
    os.environ["CFSEG_CACHE_DIR"] = str(tmp_path_factory.mktemp("cfseg_cache"))


@pytest.fixture(scope="session")
def tiny_phantoms(tmp_path_factory) -> list[Path]:
    """The synthetic 'tiny' preset (two 32^3 sites: a partially annotated CT, an LPS MRI)."""
    from cfseg.data.synthetic import make_datasets

    return make_datasets(tmp_path_factory.mktemp("phantoms"), "tiny", seed=0)


@pytest.fixture
def tiny_nnunet(tmp_path: Path) -> Path:
    return make_nnunet(tmp_path / "Dataset001_tiny", {"liver": 1, "right kidney": 3, "Spleen": 7})


BOX_LABELS = {"liver": 1, "spleen": 2, "aorta": 3}


def make_boxes(root: Path, labels: dict[str, int] | None = None, n_cases: int = 6, seed: int = 0,
               affine: np.ndarray | None = None) -> Path:
    """An easy CT dataset a tiny network learns in a few dozen steps: three cubes of distinct HU at random places.

    ``labels`` maps the three class names to label values (another mapping gives the same images with the values
    permuted, and dataset.json lists the classes in that order). ``affine``: default 4 mm, RAS.
    """
    labels = labels or BOX_LABELS
    rng = np.random.default_rng(seed)
    (root / "dataset.json").parent.mkdir(parents=True, exist_ok=True)
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "labels": {"background": 0, **dict(sorted(labels.items(), key=lambda kv: kv[1]))},
        "numTraining": n_cases, "file_ending": ".nii.gz"}))
    affine = np.diag([4.0, 4.0, 4.0, 1.0]) if affine is None else affine
    for i in range(n_cases):
        cls = np.zeros((24, 24, 24), np.uint8)  # 1 liver, 2 spleen, 3 aorta whatever the file's values
        for k in (1, 2, 3):
            c = rng.integers(4, 18, 3)
            cls[c[0] - 3:c[0] + 3, c[1] - 3:c[1] + 3, c[2] - 3:c[2] + 3] = k
        img = (-100 + 60.0 * cls + rng.normal(0, 10, cls.shape)).astype(np.float32)
        value = np.array([0, *(labels[n] for n in BOX_LABELS)], np.uint8)[cls]
        write_nifti(root / "imagesTr" / f"box{i}_0000.nii.gz", img, affine)
        write_nifti(root / "labelsTr" / f"box{i}.nii.gz", value, affine)
    return root


@pytest.fixture(scope="session")
def boxes(tmp_path_factory) -> Path:
    return make_boxes(tmp_path_factory.mktemp("boxes") / "Dataset050_boxes")


@pytest.fixture(scope="session")
def box_model(boxes, tmp_path_factory) -> Path:
    """A tiny model trained 40 steps on :func:`make_boxes` (validation Dice about 0.2-0.5 per class)."""
    from cfseg.apps.cli import main as cli

    tmp = tmp_path_factory.mktemp("box_model")
    config = Path(__file__).parent / "configs" / "tiny.yaml"
    run = cli(["fit", "--config", str(config), f"--data.datasets={json.dumps([box_dataset(boxes)])}",
               f"--trainer.logger.init_args.save_dir={tmp}", f"--trainer.default_root_dir={tmp}",
               "--trainer.max_steps=40", "--trainer.max_epochs=100", "--data.spacing=[4.0, 4.0, 4.0]",
               "--model.lr=0.01", "--trainer.check_val_every_n_epoch=100"])
    return Path(run.trainer.checkpoint_callback.best_model_path)


def box_dataset(root: Path, **kw) -> dict:
    return {"path": str(root), "val_fraction": 0.34, "test_fraction": 0.0, **kw}
