"""A CT stored without its HU offset (all values shifted by +1024) is flagged by ``cfseg-data-summary --check`` and
when ``cfseg fit`` sets up its data; CTs in Hounsfield units, with or without air, are not."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import make_boxes

from cfseg.data.datamodule import SegDataModule
from cfseg.data.formats import ct_offset_problem
from cfseg.data.summary import check_datasets


def _ct(air: bool, offset: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(0)
    body = rng.normal(40, 20, (32, 32, 32))  # soft tissue
    body[:, :, :4] = rng.normal(-100, 10, (32, 32, 4))  # fat
    body[10:14, 10:14, 10:14] = 1200  # bone
    if air:
        body[:4] = -1000
    return (body + offset).astype(np.float32)


def test_ct_offset_problem_flags_only_shifted_cts():
    assert ct_offset_problem(_ct(air=True)) is None
    assert ct_offset_problem(_ct(air=False)) is None  # a crop inside the body: fat below 0
    problem = ct_offset_problem(_ct(air=True, offset=1024))
    assert problem and "Hounsfield" in problem and "-1024" in problem
    assert ct_offset_problem(np.full((4, 4, 4), np.nan)) is None  # nothing to judge


@pytest.fixture
def shifted_boxes(tmp_path) -> Path:
    root = make_boxes(tmp_path / "Dataset060_shifted", n_cases=3)
    for f in (root / "imagesTr").glob("*.nii.gz"):
        img = nib.load(str(f))
        data = np.asarray(img.dataobj, dtype=np.float32)
        data[:2] = -1000.0  # air along one side, then the whole volume shifted as a missing intercept does
        nib.save(nib.Nifti1Image(data + 1024.0, img.affine), str(f))
    return root


def test_data_summary_check_reports_a_shifted_ct(shifted_boxes, tmp_path):
    fine = make_boxes(tmp_path / "Dataset061_fine", n_cases=2)
    assert check_datasets([fine]).ok  # the boxes (no air, fat-like background below 0) are Hounsfield units
    report = check_datasets([shifted_boxes])
    flagged = [p for p in report.problems if "Hounsfield" in p]
    assert len(flagged) == 3 and all("imagesTr" in p for p in flagged)
    unshifted = tmp_path / "Dataset062_unshifted"
    shutil.copytree(shifted_boxes, unshifted)
    for f in (unshifted / "imagesTr").glob("*.nii.gz"):
        img = nib.load(str(f))
        nib.save(nib.Nifti1Image(np.asarray(img.dataobj) - 1024.0, img.affine), str(f))
    assert check_datasets([unshifted]).ok


def test_fit_setup_warns_about_a_shifted_ct(shifted_boxes, tmp_path):
    dm = SegDataModule([{"path": str(shifted_boxes), "val_fraction": 0.0, "test_fraction": 0.0}],
                       spacing=(4.0, 4.0, 4.0), patch_size=(16, 16, 16), cache="none")
    with pytest.warns(UserWarning, match="Dataset060_shifted.*Hounsfield"):
        dm.setup("fit")
    fine = make_boxes(tmp_path / "Dataset061_fine", n_cases=2)
    dm = SegDataModule([{"path": str(fine), "val_fraction": 0.0, "test_fraction": 0.0}],
                       spacing=(4.0, 4.0, 4.0), patch_size=(16, 16, 16), cache="none")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        assert dm.warn_ct_offsets() == []
