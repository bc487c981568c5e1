"""The MR-like rendering of CT anatomy (the real-anatomy domain step) and its dataset writer."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from conftest import write_nifti

from cfseg.data.formats import read_dataset
from cfseg.data.mr_contrast import MR_LIKE, MRContrast
from cfseg.data.scanner_shift import PARAMS_FILE, write_shifted_dataset

SPACING = (3.9, 3.9, 2.5)

#: typical HU of the tissues the mapping orders (air, fat, water/CSF, brain/cord, muscle, marrow, cortical bone)
TISSUES = {"air": -1000.0, "fat": -100.0, "water": 0.0, "cord": 35.0, "muscle": 60.0, "marrow": 300.0,
           "cortex": 1200.0}


def _head(shape=(40, 36, 30), seed: int = 0) -> np.ndarray:
    """A head-like CT: air, a fat shell, muscle, a bone ring with marrow, a water core, with texture."""
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    r = np.sqrt(x**2 + y**2 + 0.5 * z**2)
    img = np.full(shape, TISSUES["air"], np.float32)
    for radius, hu in ((0.95, "fat"), (0.85, "muscle"), (0.6, "cortex"), (0.55, "marrow"), (0.45, "cord"),
                       (0.2, "water")):
        img[r < radius] = TISSUES[hu]
    return img + np.random.default_rng(seed).normal(0, 8, shape).astype(np.float32)


def test_mapping_is_deterministic_per_case_and_differs_across_cases():
    img = _head()
    a = MR_LIKE.apply(img, SPACING, "openkbp_007")
    b = MR_LIKE.apply(img.copy(), SPACING, "openkbp_007")
    assert a.dtype == np.float32 and a.shape == img.shape and a.min() >= 0
    np.testing.assert_array_equal(a, b)  # same case: same bias field and noise, bit for bit
    c = MR_LIKE.apply(img, SPACING, "openkbp_008")
    assert not np.allclose(a, c)
    assert not np.allclose(MRContrast(seed=1).apply(img, SPACING, "x"), MRContrast(seed=0).apply(img, SPACING, "x"))


def test_mapping_is_not_monotonic_in_hu():
    f = {k: float(MR_LIKE.tissue_map(np.array([hu]))[0]) for k, hu in TISSUES.items()}
    assert f["fat"] > f["water"] < f["cord"]            # fat (lower HU) brighter than water, cord brighter again
    assert f["cord"] > f["muscle"]                      # the soft-tissue order changes
    assert f["marrow"] > f["cortex"] and f["cortex"] < f["muscle"]  # CT's brightest tissue is dark
    assert f["air"] == 0.0
    # no monotonic map (increasing or decreasing) of HU gives these intensities: Spearman far from +-1
    hu = np.linspace(-1000, 2000, 301)
    v = MR_LIKE.tissue_map(hu)
    d = np.sign(np.diff(v))
    assert (d > 0).any() and (d < 0).any()
    ranks = np.argsort(np.argsort(v, kind="stable"))
    rho = np.corrcoef(np.arange(len(hu)), ranks)[0, 1]
    assert abs(rho) < 0.5


def test_bias_field_is_smooth_and_bounded_and_noise_is_rician():
    flat = np.full((48, 48, 40), TISSUES["muscle"], np.float32)
    biased = MRContrast(noise_sd=0.0, bias_log_amplitude=0.3).apply(flat, SPACING, "c")
    base = float(MR_LIKE.tissue_map(np.array([TISSUES["muscle"]]))[0])
    ratio = np.log(biased / base)
    assert np.abs(ratio).max() <= 0.3 + 1e-5 and ratio.std() > 0.01  # present, within its amplitude
    assert np.abs(np.diff(ratio, axis=0)).max() < 0.3 * 2 * np.pi * SPACING[0] / 250.0 + 1e-5  # smooth in mm
    air = MRContrast(bias_log_amplitude=0.0, noise_sd=20.0).apply(np.full((40, 40, 40), -1000.0, np.float32),
                                                                 SPACING, "c")
    assert air.mean() == pytest.approx(20.0 * np.sqrt(np.pi / 2), rel=0.03)  # Rayleigh floor in air
    clean = MRContrast(bias_log_amplitude=0.0, noise_sd=0.0).apply(flat, SPACING, "c")
    np.testing.assert_allclose(clean, base, rtol=1e-6)


def test_bad_parameters():
    for kwargs, match in (({"knots_hu": (0.0, 0.0), "knots_value": (1.0, 2.0)}, "strictly increasing"),
                          ({"knots_value": (1.0,)}, "one value per knot"),
                          ({"knots_value": tuple([-1.0] * 13)}, ">= 0"),
                          ({"noise_sd": -1.0}, "noise_sd"),
                          ({"bias_terms": 0}, "bias_terms"),
                          ({"bias_wavelength_mm": (300.0, 100.0)}, "bias_wavelength_mm"),
                          ({"seed": -1}, "seed")):
        with pytest.raises(ValueError, match=match):
            MRContrast(**kwargs)
    with pytest.raises(ValueError, match="3D"):
        MR_LIKE.apply(np.zeros((4, 4)), SPACING, "c")


def test_written_dataset_is_mri_with_labels_unchanged(tmp_path):
    src = tmp_path / "src"
    lab = np.zeros((20, 18, 16), np.uint8)
    lab[5:12, 5:12, 4:10] = 1
    for i in range(2):
        write_nifti(src / "imagesTr" / f"case{i}_0000.nii.gz", _head((20, 18, 16), seed=i).astype(np.int16))
        write_nifti(src / "labelsTr" / f"case{i}.nii.gz", lab)
    (src / "dataset.json").write_text(json.dumps({"name": "tiny", "channel_names": {"0": "CT"},
                                                  "labels": {"background": 0, "brainstem": 1}, "numTraining": 2,
                                                  "file_ending": ".nii.gz"}))
    dst = tmp_path / "dst"
    write_shifted_dataset(src, dst, ["case1"], MR_LIKE)
    info = read_dataset(dst)
    assert info.modality == "mri" and [c.case_id for c in info.cases] == ["case1"]
    meta = json.loads((dst / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "MRI"} and meta["mr_contrast"] == MR_LIKE.params()
    assert "MR-like" in meta["name"] and "Rician" in meta["description"]
    record = json.loads((dst / PARAMS_FILE).read_text())
    assert record["transform"] == "cfseg.data.mr_contrast.MRContrast"
    np.testing.assert_array_equal(np.asanyarray(nib.load(dst / "labelsTr" / "case1.nii.gz").dataobj), lab)
    s_img = nib.load(src / "imagesTr" / "case1_0000.nii.gz")
    expected = MR_LIKE.apply(s_img.get_fdata(dtype=np.float32), (1.0, 1.0, 1.0), "case1")
    np.testing.assert_allclose(nib.load(dst / "imagesTr" / "case1_0000.nii.gz").get_fdata(), np.rint(expected))
    with pytest.raises(ValueError, match="already holds a shifted dataset with transform"):
        from cfseg.data.scanner_shift import SCANNER_B

        write_shifted_dataset(src, dst, ["case0"], SCANNER_B)
