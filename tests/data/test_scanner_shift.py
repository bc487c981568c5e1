"""The simulated-scanner CT transform and the shifted dataset writer (small synthetic volumes only)."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from conftest import make_nnunet, write_nifti

from cfseg.data.formats import read_dataset
from cfseg.data.scanner_shift import PARAMS_FILE, SCANNER_B, ScannerShift, apply, write_shifted_dataset

SPACING = (2.0, 2.0, 3.0)


def _image(seed: int = 0, shape=(24, 20, 16)) -> np.ndarray:
    return np.random.default_rng(seed).normal(40.0, 100.0, shape).astype(np.float32)


def _neighbour_var(a: np.ndarray) -> float:
    """Mean over axes of the variance of differences between neighbouring voxels."""
    return float(np.mean([np.var(np.diff(a, axis=k)) for k in range(3)]))


def test_deterministic_per_case_and_different_across_cases():
    img = _image()
    a = SCANNER_B.apply(img, SPACING, "case_007")
    b = SCANNER_B.apply(img.copy(), SPACING, "case_007")
    assert a.dtype == np.float32 and a.shape == img.shape
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(apply(img, SPACING, "case_007"), a)  # the module function defaults to SCANNER_B
    c = SCANNER_B.apply(img, SPACING, "case_008")
    assert not np.allclose(a, c)
    noise_only = ScannerShift(noise_sd_hu=30.0, kernel=0.0, hu_offset=0.0)
    diff = noise_only.apply(img, SPACING, "x") - noise_only.apply(img, SPACING, "y")
    assert diff.std() == pytest.approx(30.0 * np.sqrt(2), rel=0.05)  # independent noise per case
    assert not np.allclose(ScannerShift(seed=1).apply(img, SPACING, "x"), ScannerShift(seed=0).apply(img, SPACING, "x"))


def test_zero_shift_is_identity_and_input_untouched():
    img = _image()
    keep = img.copy()
    out = ScannerShift(noise_sd_hu=0.0, kernel=0.0, hu_offset=0.0).apply(img, SPACING, "c")
    np.testing.assert_array_equal(out, img)
    np.testing.assert_array_equal(img, keep)
    SCANNER_B.apply(img, SPACING, "c")
    np.testing.assert_array_equal(img, keep)


def test_offset_shifts_mean_and_noise_has_its_sd():
    img = _image()
    out = ScannerShift(noise_sd_hu=0.0, hu_offset=40.0).apply(img, SPACING, "c")
    assert out.mean() - img.mean() == pytest.approx(40.0, abs=1e-3)
    np.testing.assert_allclose(out - img, 40.0, atol=1e-3)
    flat = np.zeros((32, 32, 32), np.float32)
    noisy = ScannerShift(noise_sd_hu=25.0).apply(flat, SPACING, "c")
    assert noisy.std() == pytest.approx(25.0, rel=0.03) and abs(noisy.mean()) < 0.5


def test_blur_lowers_and_sharpening_raises_neighbour_variance():
    img = _image()
    base = _neighbour_var(img)
    blurred = ScannerShift(noise_sd_hu=0.0, kernel=2.0).apply(img, SPACING, "c")
    sharp = ScannerShift(noise_sd_hu=0.0, kernel=-0.6).apply(img, SPACING, "c")
    assert _neighbour_var(blurred) < 0.5 * base
    assert _neighbour_var(sharp) > 1.5 * base
    # the mean is kept by both (up to the border handling)
    assert blurred.mean() == pytest.approx(img.mean(), abs=2.0) and sharp.mean() == pytest.approx(img.mean(), abs=2.0)
    # sharpening is still visible on a coarse grid (detail scale: at least one voxel)
    coarse = ScannerShift(noise_sd_hu=0.0, kernel=-0.6).apply(img, (4.6, 4.6, 3.0), "c")
    assert _neighbour_var(coarse) > 1.5 * base


def test_bad_parameters():
    with pytest.raises(ValueError, match="noise_sd_hu"):
        ScannerShift(noise_sd_hu=-1.0)
    with pytest.raises(ValueError, match="kernel"):
        ScannerShift(kernel=float("nan"))
    with pytest.raises(ValueError, match="spacing"):
        SCANNER_B.apply(_image(), (1.0, 0.0, 1.0), "c")


def _ct_dataset(root, n_cases=3):
    """A tiny nnU-Net CT dataset with int16 HU images, a non-identity affine and partial labels."""
    partial = {f"case{i}": ["liver", "spleen"] if i else ["liver"] for i in range(n_cases)}
    make_nnunet(root, {"liver": 1, "spleen": 2}, n_cases=n_cases, partial=partial)
    affine = np.diag([1.5, 1.5, 2.5, 1.0])
    affine[:3, 3] = [-10.0, 5.0, 30.0]
    rng = np.random.default_rng(1)
    for i in range(n_cases):
        lab = np.asanyarray(nib.load(root / "labelsTr" / f"case{i}.nii.gz").dataobj)
        write_nifti(root / "labelsTr" / f"case{i}.nii.gz", lab, affine)
        img = (np.where(lab > 0, 60, -900) + rng.normal(0, 10, lab.shape)).astype(np.int16)
        write_nifti(root / "imagesTr" / f"case{i}_0000.nii.gz", img, affine)
    return root


def test_write_shifted_dataset(tmp_path):
    src = _ct_dataset(tmp_path / "src")
    dst = tmp_path / "dst"
    res = write_shifted_dataset(src, dst, ["case0", "case2"], SCANNER_B)
    assert res == {"written": ["case0", "case2"], "skipped": []}
    info = read_dataset(dst)  # readable in the same format, headers consistent
    assert [c.case_id for c in info.cases] == ["case0", "case2"]
    assert info.case("case0").annotated == ("liver",) and info.case("case2").annotated == ("liver", "spleen")
    meta = json.loads((dst / "dataset.json").read_text())
    assert meta["numTraining"] == 2 and "noise 30 HU" in meta["name"] and "offset +40 HU" in meta["description"]
    assert json.loads((dst / PARAMS_FILE).read_text())["shift"] == SCANNER_B.params()
    assert not (dst / ".scanner_shift_tmp").exists()
    for cid in ("case0", "case2"):
        s_lab, d_lab = nib.load(src / "labelsTr" / f"{cid}.nii.gz"), nib.load(dst / "labelsTr" / f"{cid}.nii.gz")
        np.testing.assert_array_equal(np.asanyarray(d_lab.dataobj), np.asanyarray(s_lab.dataobj))
        np.testing.assert_array_equal(d_lab.affine, s_lab.affine)
        name = f"imagesTr/{cid}_0000.nii.gz"
        s_img, d_img = nib.load(src / name), nib.load(dst / name)
        np.testing.assert_array_equal(d_img.affine, s_img.affine)
        assert d_img.get_data_dtype() == s_img.get_data_dtype() == np.int16
        expected = SCANNER_B.apply(s_img.get_fdata(dtype=np.float32), (1.5, 1.5, 2.5), cid)
        np.testing.assert_allclose(d_img.get_fdata(), np.rint(expected), atol=0)
    # a second run skips the finished cases and adds new ones; the metadata follows
    first = (dst / "imagesTr" / "case0_0000.nii.gz").stat().st_mtime_ns
    res = write_shifted_dataset(src, dst, ["case0", "case1", "case2"], ScannerShift(30.0, -0.6, 40.0, 0))
    assert res == {"written": ["case1"], "skipped": ["case0", "case2"]}
    assert (dst / "imagesTr" / "case0_0000.nii.gz").stat().st_mtime_ns == first
    assert json.loads((dst / "dataset.json").read_text())["numTraining"] == 3
    assert len(read_dataset(dst).cases) == 3


def test_write_shifted_dataset_refuses(tmp_path):
    src = _ct_dataset(tmp_path / "src", n_cases=1)
    dst = tmp_path / "dst"
    write_shifted_dataset(src, dst, ["case0"], ScannerShift(noise_sd_hu=0.0, kernel=1.0))
    with pytest.raises(ValueError, match="already holds a shifted dataset with shift"):
        write_shifted_dataset(src, dst, ["case0"], ScannerShift(noise_sd_hu=5.0, kernel=1.0))
    with pytest.raises(ValueError, match="not in the dataset: nope"):
        write_shifted_dataset(src, tmp_path / "other", ["nope"], SCANNER_B)
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "x.txt").write_text("mine")
    with pytest.raises(ValueError, match="has no scanner_shift.json"):
        write_shifted_dataset(src, tmp_path / "foreign", ["case0"], SCANNER_B)
    mri = make_nnunet(tmp_path / "mri", {"liver": 1}, n_cases=1, channel="T2")
    with pytest.raises(ValueError, match="needs CT"):
        write_shifted_dataset(mri, tmp_path / "mri_out", ["case0"], SCANNER_B)


def test_write_shifted_msd(tmp_path):
    src = tmp_path / "Task01"
    lab = np.zeros((8, 8, 6), np.uint8)
    lab[2:5, 2:5, 2:4] = 1
    for i in range(2):
        write_nifti(src / "imagesTr" / f"m{i}.nii.gz", (lab * 100.0 - 50.0).astype(np.float32))
        write_nifti(src / "labelsTr" / f"m{i}.nii.gz", lab)
    (src / "dataset.json").write_text(json.dumps({
        "name": "tiny msd", "modality": {"0": "CT"}, "labels": {"0": "background", "1": "liver"},
        "training": [{"image": f"./imagesTr/m{i}.nii.gz", "label": f"./labelsTr/m{i}.nii.gz"} for i in range(2)],
        "test": ["./imagesTs/t.nii.gz"]}))
    write_shifted_dataset(src, tmp_path / "out", ["m1"], ScannerShift(noise_sd_hu=0.0, hu_offset=10.0))
    info = read_dataset(tmp_path / "out")
    assert info.format == "msd" and [c.case_id for c in info.cases] == ["m1"]
    out = nib.load(tmp_path / "out" / "imagesTr" / "m1.nii.gz")
    assert out.get_data_dtype() == np.float32
    np.testing.assert_allclose(out.get_fdata(), lab * 100.0 - 40.0, atol=1e-4)
    assert json.loads((tmp_path / "out" / "dataset.json").read_text())["test"] == []
