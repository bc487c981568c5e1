"""Tests of the synthetic phantom generator and its nnU-Net / MSD writers (cfseg.data.synthetic)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from cfseg.apps.synth import main
from cfseg.data import synthetic
from cfseg.data.phantoms import ORGANS, generate_phantom
from cfseg.data.synthetic import (
    PRESETS,
    SiteSpec,
    make_datasets,
    write_msd_dataset,
    write_nnunet_dataset,
)

SMALL = (32, 32, 32)


def _phantom(seed: int, modality: str = "ct", shape=SMALL, **kw) -> tuple[np.ndarray, np.ndarray]:
    return generate_phantom(np.random.default_rng(seed), modality, shape, **kw)


def _centroid(mask: np.ndarray) -> np.ndarray:
    return np.array(np.nonzero(mask), dtype=np.float64).mean(axis=1)


def _best_threshold_accuracy(a: np.ndarray, b: np.ndarray) -> float:
    """Balanced accuracy of the best single intensity threshold separating samples a from samples b."""
    best = 0.5
    for t in np.quantile(np.concatenate([a, b]), np.linspace(0, 1, 101)):
        acc = 0.5 * ((a < t).mean() + (b >= t).mean())
        best = max(best, acc, 1 - acc)
    return best


def _site(**kw) -> SiteSpec:
    base = {"name": "unit_ct", "modality": "ct", "classes": ("liver", "kidney_left", "aorta"), "n_cases": 2,
            "seed": 5, "spacing": (11.0, 11.0, 11.0), "shape": SMALL}
    base.update(kw)
    return SiteSpec(**base)


def _load(path: Path) -> tuple[np.ndarray, np.ndarray]:
    img = nib.load(str(path))
    return np.asarray(img.dataobj), img.affine


# --------------------------------------------------------------------------------------------------------
# Phantoms
# --------------------------------------------------------------------------------------------------------
def test_organ_vocabulary() -> None:
    expected = {"liver": 1, "spleen": 2, "kidney_left": 3, "kidney_right": 4, "pancreas": 5, "stomach": 6,
                "gallbladder": 7, "aorta": 8}
    assert {k: ORGANS[k] for k in expected} == expected
    assert len(set(ORGANS.values())) == len(ORGANS)
    assert 0 not in ORGANS.values()


@pytest.mark.parametrize("modality", ["ct", "mri"])
def test_phantom_is_deterministic_by_seed(modality: str) -> None:
    img1, lab1 = _phantom(3, modality)
    img2, lab2 = _phantom(3, modality)
    img3, lab3 = _phantom(4, modality)
    assert img1.dtype == np.float32 and lab1.dtype == np.uint8
    assert img1.shape == lab1.shape == SMALL
    np.testing.assert_array_equal(img1, img2)
    np.testing.assert_array_equal(lab1, lab2)
    assert not np.array_equal(lab1, lab3)
    assert np.abs(img1 - img3).mean() > 1.0


@pytest.mark.parametrize("shape", [(32, 32, 32), (64, 64, 64), (40, 32, 24)])
def test_every_organ_present_compact_and_inside_body(shape: tuple[int, int, int]) -> None:
    seeds = range(3) if shape == (64, 64, 64) else range(6)
    for seed in seeds:
        img, lab = _phantom(seed, "ct", shape)
        assert img.shape == lab.shape == shape
        assert set(np.unique(lab).tolist()) == {0, *ORGANS.values()}, f"seed {seed}"
        body = ndimage.binary_fill_holes(img > -500)
        for name, value in ORGANS.items():
            mask = lab == value
            assert mask.sum() >= 4, f"{name} nearly empty (seed {seed}, shape {shape})"
            assert body[mask].all(), f"{name} leaves the body (seed {seed})"
            comps, _ = ndimage.label(mask)
            largest = np.bincount(comps.ravel())[1:].max()
            assert largest >= 0.75 * mask.sum(), f"{name} fragmented (seed {seed}, shape {shape})"


def test_organ_sizes_vary_between_cases() -> None:
    labels = [_phantom(s)[1] for s in range(6)]
    sizes = np.array([[(lab == v).sum() for v in ORGANS.values()] for lab in labels])
    rel_spread = sizes.std(axis=0) / sizes.mean(axis=0)
    assert (rel_spread > 0.03).all(), dict(zip(ORGANS, rel_spread.round(3), strict=True))


def test_anatomy_sides_in_ras_voxel_order() -> None:
    """RAS+: the first axis increases towards the patient's right, so the liver sits at high x."""
    for seed in range(4):
        img, lab = _phantom(seed, "ct", (48, 48, 48))
        mid = _centroid(ndimage.binary_fill_holes(img > -500))[0]
        liver, spleen = _centroid(lab == ORGANS["liver"]), _centroid(lab == ORGANS["spleen"])
        left, right = _centroid(lab == ORGANS["kidney_left"]), _centroid(lab == ORGANS["kidney_right"])
        aorta = _centroid(lab == ORGANS["aorta"])
        assert liver[0] > mid > spleen[0]
        assert left[0] < mid < right[0]
        assert aorta[0] < mid + 1
        # Kidneys mirror each other about the midline: similar distance to it, similar depth.
        dl, dr = mid - left[0], right[0] - mid
        assert abs(dl - dr) < 0.25 * (dl + dr), (dl, dr)
        assert abs(left[1] - right[1]) < 4
        # Kidneys posterior (low y), stomach anterior.
        assert _centroid(lab == ORGANS["stomach"])[1] > left[1] + 3


def test_kidneys_look_alike_on_ct() -> None:
    diffs, contrast = [], []
    for seed in range(8):
        img, lab = _phantom(seed)
        kl, kr = img[lab == ORGANS["kidney_left"]], img[lab == ORGANS["kidney_right"]]
        diffs.append(kl.mean() - kr.mean())
        contrast.append(0.5 * (kl.mean() + kr.mean()) - img[lab == ORGANS["liver"]].mean())
        assert _best_threshold_accuracy(kl, kr) < 0.75, f"kidneys separable by intensity (seed {seed})"
    assert abs(np.mean(diffs)) < 8.0, diffs
    assert np.max(np.abs(diffs)) < 30.0, diffs
    assert min(contrast) > 25.0  # the kidneys are visible, just not distinguishable from each other


def test_liver_and_spleen_share_intensities_on_ct() -> None:
    accs = []
    for seed in range(6):
        img, lab = _phantom(seed)
        liver, spleen = img[lab == ORGANS["liver"]], img[lab == ORGANS["spleen"]]
        lo = max(np.percentile(liver, 5), np.percentile(spleen, 5))
        hi = min(np.percentile(liver, 95), np.percentile(spleen, 95))
        assert hi - lo > 20.0, "liver and spleen 5-95 % ranges barely overlap"
        accs.append(_best_threshold_accuracy(liver, spleen))
    assert np.mean(accs) < 0.8, accs


def test_mri_contrasts_differ_from_ct() -> None:
    for seed in range(3):
        ct, lab = _phantom(seed, "ct")
        mri, lab_mri = _phantom(seed, "mri")
        np.testing.assert_array_equal(lab, lab_mri)  # same anatomy for the same seed
        assert mri.min() >= 0.0
        means = {m: {n: img[lab == v].mean() for n, v in ORGANS.items()} for m, img in (("ct", ct), ("mri", mri))}
        # T2-like: spleen much brighter than liver, fluid brightest, flowing blood dark.
        assert means["mri"]["spleen"] > 1.4 * means["mri"]["liver"]
        assert abs(means["ct"]["spleen"] - means["ct"]["liver"]) < 25.0
        assert means["mri"]["gallbladder"] > means["mri"]["liver"] * 2
        assert means["ct"]["gallbladder"] < means["ct"]["liver"]
        assert means["mri"]["aorta"] < means["mri"]["kidney_left"] / 2
        assert means["ct"]["aorta"] > means["ct"]["liver"]
        # Subcutaneous fat: dark on CT, bright on MRI (relative to the liver).
        assert np.percentile(ct, 20) < -50


def test_mri_bias_field_changes_intensities_smoothly() -> None:
    flat, lab = _phantom(7, "mri", bias_strength=0.0, noise_std=0.0)
    biased, _ = _phantom(7, "mri", bias_strength=0.5, noise_std=0.0)
    body = ndimage.binary_erosion(flat > 50, iterations=2)
    ratio = np.log(biased[body] / flat[body])
    assert ratio.std() > 0.1  # the field varies over the body
    # ...smoothly: neighbouring voxels see nearly the same gain.
    log_ratio = np.zeros_like(flat)
    log_ratio[body] = ratio
    both = body[1:] & body[:-1]
    assert np.abs(np.diff(log_ratio, axis=0)[both]).mean() < 0.2 * ratio.std()


def test_scanner_offset_scale_and_noise() -> None:
    base, lab = _phantom(2, "ct")
    shifted, lab2 = _phantom(2, "ct", intensity_offset=25.0, intensity_scale=1.1)
    np.testing.assert_array_equal(lab, lab2)
    np.testing.assert_allclose(shifted, base * 1.1 + 25.0, rtol=1e-5, atol=1e-2)
    quiet, _ = _phantom(2, "ct", noise_std=2.0)
    loud, _ = _phantom(2, "ct", noise_std=40.0)
    air = ndimage.binary_erosion(base < -900, iterations=2)
    assert loud[air].std() > 5 * quiet[air].std()


@pytest.mark.parametrize(
    ("kw", "match"),
    [({"modality": "pet"}, "modality"), ({"shape": (8, 32, 32)}, "shape"), ({"noise_std": -1.0}, "noise_std")],
)
def test_generate_phantom_rejects_bad_arguments(kw: dict, match: str) -> None:
    args = {"modality": "ct", "shape": SMALL, **kw}
    with pytest.raises(ValueError, match=match):
        generate_phantom(np.random.default_rng(0), **args)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"classes": ("liver", "lung")}, "lung"),
        ({"classes": ()}, "non-empty"),
        ({"modality": "xray"}, "modality"),
        ({"orientation": "LAS"}, "orientation"),
        ({"name": "../evil"}, "folder name"),
        ({"n_cases": 0}, "n_cases"),
        ({"spacing": (1.0, -1.0, 1.0)}, "spacing"),
    ],
)
def test_sitespec_validation(kw: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        _site(**kw)


# --------------------------------------------------------------------------------------------------------
# Writers
# --------------------------------------------------------------------------------------------------------
def test_write_nnunet_dataset_layout_and_content(tmp_path: Path) -> None:
    site = _site()
    folder = write_nnunet_dataset(tmp_path, site, 7)
    assert folder == tmp_path / "Dataset007_unit_ct"
    meta = json.loads((folder / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "CT"}
    assert meta["labels"] == {"background": 0, "liver": 1, "kidney_left": 3, "aorta": 8}
    assert meta["numTraining"] == 2 and meta["file_ending"] == ".nii.gz"
    assert meta["modality"] == "ct" and meta["name"] == "unit_ct"
    assert not (folder / "partial_labels.json").exists()
    assert sorted(p.name for p in (folder / "imagesTr").iterdir()) == ["unit_ct_000_0000.nii.gz",
                                                                      "unit_ct_001_0000.nii.gz"]
    assert sorted(p.name for p in (folder / "labelsTr").iterdir()) == ["unit_ct_000.nii.gz", "unit_ct_001.nii.gz"]
    assert [p.name for p in tmp_path.iterdir()] == [folder.name]  # no temporary leftovers

    for i, case in enumerate(site.case_ids):
        image, affine = _load(folder / "imagesTr" / f"{case}_0000.nii.gz")
        label, label_affine = _load(folder / "labelsTr" / f"{case}.nii.gz")
        assert image.dtype == np.float32 and label.dtype == np.uint8
        np.testing.assert_array_equal(affine, label_affine)
        np.testing.assert_allclose(np.diag(affine)[:3], site.spacing)
        # The documented seeding: case i uses SeedSequence([site.seed, i]).
        ref_img, ref_lab = generate_phantom(np.random.default_rng(np.random.SeedSequence([site.seed, i])), "ct",
                                            SMALL, **site.scanner_params())
        np.testing.assert_array_equal(image, ref_img)
        keep = np.isin(ref_lab, [ORGANS[c] for c in site.classes])
        np.testing.assert_array_equal(label, np.where(keep, ref_lab, 0))
        assert set(np.unique(label).tolist()) == {0, 1, 3, 8}


def test_partial_labels(tmp_path: Path) -> None:
    site = _site(classes=tuple(ORGANS), n_cases=5, partial=True)
    folder = write_nnunet_dataset(tmp_path, site, 8)
    meta = json.loads((folder / "dataset.json").read_text())
    assert meta["labels"] == {"background": 0, **ORGANS}
    partial = json.loads((folder / "partial_labels.json").read_text())
    assert sorted(partial) == site.case_ids
    sizes = []
    for case, classes in partial.items():
        assert classes and set(classes) <= set(site.classes) and len(set(classes)) == len(classes)
        label, _ = _load(folder / "labelsTr" / f"{case}.nii.gz")
        # Exactly the annotated classes appear (every organ exists in every phantom).
        assert set(np.unique(label).tolist()) == {0, *(ORGANS[c] for c in classes)}
        sizes.append(len(classes))
    assert min(sizes) < len(ORGANS)  # subsets, not always everything


def test_lps_affine_and_world_positions_match_ras(tmp_path: Path) -> None:
    ras = write_nnunet_dataset(tmp_path, _site(name="ras_site", n_cases=1), 1)
    lps = write_nnunet_dataset(tmp_path, _site(name="lps_site", n_cases=1, orientation="LPS"), 2)
    lab_r, aff_r = _load(ras / "labelsTr" / "ras_site_000.nii.gz")
    lab_l, aff_l = _load(lps / "labelsTr" / "lps_site_000.nii.gz")
    img_r, _ = _load(ras / "imagesTr" / "ras_site_000_0000.nii.gz")
    img_l, _ = _load(lps / "imagesTr" / "lps_site_000_0000.nii.gz")
    assert nib.aff2axcodes(aff_r) == ("R", "A", "S")
    assert nib.aff2axcodes(aff_l) == ("L", "P", "S")
    assert aff_l[0, 0] < 0 and aff_l[1, 1] < 0 and aff_l[2, 2] > 0
    np.testing.assert_array_equal(img_l, img_r[::-1, ::-1, :])
    for name in ("liver", "kidney_left", "aorta"):
        v = ORGANS[name]
        world_r = aff_r @ np.append(_centroid(lab_r == v), 1.0)
        world_l = aff_l @ np.append(_centroid(lab_l == v), 1.0)
        np.testing.assert_allclose(world_l, world_r, atol=1e-6)
    # Patient right is +x in RAS+ world: the liver is to the right of the left kidney.
    liver_x = (aff_r @ np.append(_centroid(lab_r == ORGANS["liver"]), 1.0))[0]
    kidney_x = (aff_r @ np.append(_centroid(lab_r == ORGANS["kidney_left"]), 1.0))[0]
    assert liver_x > 0 > kidney_x


def test_write_msd_dataset(tmp_path: Path) -> None:
    site = _site(modality="mri", partial=True, n_cases=3)
    folder = write_msd_dataset(tmp_path, site, 4)
    assert folder == tmp_path / "Task04_unit_ct"
    meta = json.loads((folder / "dataset.json").read_text())
    assert meta["modality"] == {"0": "MRI"}
    assert meta["labels"] == {"0": "background", "1": "liver", "3": "kidney_left", "8": "aorta"}
    assert meta["numTraining"] == 3
    assert meta["training"] == [{"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"}
                                for c in site.case_ids]
    for entry in meta["training"]:
        assert (folder / entry["image"]).is_file() and (folder / entry["label"]).is_file()
    assert not list((folder / "imagesTr").glob("*_0000.nii.gz"))
    assert sorted(json.loads((folder / "partial_labels.json").read_text())) == site.case_ids


def test_overwrite_refused_and_allowed(tmp_path: Path) -> None:
    site = _site(n_cases=1)
    folder = write_nnunet_dataset(tmp_path, site, 3)
    marker = folder / "marker.txt"
    marker.write_text("keep me")
    with pytest.raises(ValueError, match="already exists"):
        write_nnunet_dataset(tmp_path, site, 3)
    assert marker.read_text() == "keep me"
    write_nnunet_dataset(tmp_path, site, 3, overwrite=True)
    assert not marker.exists() and (folder / "dataset.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == [folder.name]
    with pytest.raises(ValueError, match="dataset_id"):
        write_nnunet_dataset(tmp_path, site, 1000)


def test_crash_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def failing_save(path: Path, arr: np.ndarray, affine: np.ndarray) -> None:
        calls.append(path)
        if len(calls) > 1:
            raise OSError("disk full")
        Path(path).write_bytes(b"x")

    monkeypatch.setattr(synthetic, "_save_nifti", failing_save)
    with pytest.raises(OSError, match="disk full"):
        write_nnunet_dataset(tmp_path, _site(), 9)
    assert len(calls) == 2
    assert list(tmp_path.iterdir()) == []


def test_make_datasets_tiny_preset_determinism(tmp_path: Path) -> None:
    a = make_datasets(tmp_path / "a", "tiny", seed=0)
    b = make_datasets(tmp_path / "b", "tiny", seed=0)
    c = make_datasets(tmp_path / "c", "tiny", seed=1)
    assert [p.name for p in a] == ["Dataset021_tiny_a_ct", "Dataset022_tiny_b_mri"]
    for pa, pb, pc in zip(a, b, c, strict=True):
        files = sorted(p.relative_to(pa) for p in pa.rglob("*.nii.gz"))
        assert files == sorted(p.relative_to(pb) for p in pb.rglob("*.nii.gz"))
        assert len(files) == 8
        for rel in files:
            arr_a, aff_a = _load(pa / rel)
            arr_b, aff_b = _load(pb / rel)
            np.testing.assert_array_equal(arr_a, arr_b)
            np.testing.assert_array_equal(aff_a, aff_b)
            assert arr_a.shape == (32, 32, 32)
        img = next((pa / "imagesTr").iterdir())
        assert not np.array_equal(_load(img)[0], _load(pc / "imagesTr" / img.name)[0])
    # The sites differ from each other, and one is partial, one LPS, one MRI.
    assert (a[0] / "partial_labels.json").is_file() and not (a[1] / "partial_labels.json").exists()
    assert nib.aff2axcodes(_load(next((a[1] / "labelsTr").iterdir()))[1]) == ("L", "P", "S")
    assert json.loads((a[1] / "dataset.json").read_text())["channel_names"] == {"0": "MRI"}


def test_make_datasets_shape_override_keeps_field_of_view(tmp_path: Path) -> None:
    (folder,) = make_datasets(tmp_path, "tiny", seed=0, shape=(24, 24, 20), fmt="msd")[:1]
    assert folder.name == "Task21_tiny_a_ct"
    img = nib.load(str(next((folder / "imagesTr").iterdir())))
    assert img.shape == (24, 24, 20)
    np.testing.assert_allclose(np.asarray(img.header.get_zooms()) * img.shape, 32 * 11.0)


def test_make_datasets_checks_everything_before_writing(tmp_path: Path) -> None:
    (tmp_path / "Dataset022_tiny_b_mri").mkdir()
    with pytest.raises(ValueError, match="Dataset022_tiny_b_mri"):
        make_datasets(tmp_path, "tiny")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Dataset022_tiny_b_mri"]
    with pytest.raises(ValueError, match="preset"):
        make_datasets(tmp_path, "huge")
    with pytest.raises(ValueError, match="format"):
        make_datasets(tmp_path, "tiny", fmt="dicom")


def test_presets_match_their_purpose() -> None:
    demo = {s.name: s for s in PRESETS["demo"]}
    train = [s for s in PRESETS["demo"] if not s.name.startswith("test")]
    assert len(train) >= 2 and all(s.modality == "ct" for s in PRESETS["demo"])
    assert len({s.classes for s in train}) == len(train)
    assert set().union(*(s.classes for s in train)) == set(ORGANS)
    assert set(demo["test_ct"].classes) == set(ORGANS) and not demo["test_ct"].partial
    assert len({s.seed for s in PRESETS["demo"]}) == len(PRESETS["demo"])

    s0, s1, s2 = PRESETS["incremental"]
    assert s0.modality == s1.modality == "ct" and s2.modality == "mri"
    assert not set(s0.classes) & set(s1.classes)
    assert set(s2.classes) == set(s0.classes)
    assert all(int(0.2 * s.n_cases) >= 1 for s in PRESETS["incremental"])

    tiny = PRESETS["tiny"]
    assert len(tiny) == 2 and all(s.shape == (32, 32, 32) and s.n_cases == 4 for s in tiny)
    assert any(s.partial for s in tiny) and any(s.orientation == "LPS" for s in tiny)


def test_cli_writes_and_refuses_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "synth"
    argv = ["--out", str(out), "--preset", "tiny", "--seed", "3", "--shape", "24", "24", "24", "--format", "msd"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "Task21_tiny_a_ct" in printed and "Task22_tiny_b_mri" in printed
    assert sorted(p.name for p in out.iterdir()) == ["Task21_tiny_a_ct", "Task22_tiny_b_mri"]
    assert len(list((out / "Task21_tiny_a_ct" / "imagesTr").iterdir())) == 4
    assert main(argv) == 2
    assert "already exists" in capsys.readouterr().err
    assert main([*argv, "--overwrite"]) == 0
