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
