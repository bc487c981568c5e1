import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import make_nnunet, real_dataset, write_nifti

from cfseg.data.formats import DatasetError, read_dataset
from cfseg.data.transforms import Preprocessing, build_transforms, make_label_lut


def item(info, case, gidx, annotated=None):
    c = info.case(case)
    return {"image": str(c.images[0]), "label": str(c.label),
            "label_lut": make_label_lut(info.labels, annotated or c.annotated, gidx)}


def test_lut_remaps_by_name_and_drops_unannotated():
    lut = make_label_lut({"liver": 1, "spleen": 7, "stomach": 9}, ["liver", "spleen"],
                         {"background": 0, "spleen": 1, "liver": 2, "stomach": 3})
    assert lut[0] == 0 and lut[1] == 2 and lut[7] == 1
    assert lut[9] == 0  # declared but not annotated in this case
    assert lut[2] == -1  # not declared: an error when met


def test_ct_pipeline_remaps_and_windows(tiny_nnunet):
    info = read_dataset(tiny_nnunet)
    gidx = {"background": 0, "spleen": 1, "kidney_right": 2, "liver": 3}
    pre = Preprocessing("ct", spacing=(1.0, 1.0, 1.0), ct_window=(0.0, 100.0))
    out = build_transforms(pre, train=False)(item(info, "case0", gidx))
    raw = np.asarray(nib.load(info.case("case0").label).dataobj)
    lab = out["label"][0].numpy()
    assert out["label"].dtype == torch.uint8 and out["image"].dtype == torch.float32
    for name, value in info.labels.items():
        assert np.array_equal(lab == gidx[name], raw == value)
    assert 0.0 <= out["image"].min() and out["image"].max() <= 1.0


def test_undeclared_label_value_is_an_error(tiny_nnunet):
    info = read_dataset(tiny_nnunet)
    path = info.case("case1").label
    lab = np.asarray(nib.load(path).dataobj).copy()
    lab[0, 0, 0] = 5
    write_nifti(path, lab)
    pre = Preprocessing("ct", spacing=(1.0, 1.0, 1.0))
    with pytest.raises(DatasetError, match=r"case1.nii.gz: label values \[5\] are not declared"):
        build_transforms(pre, train=False)(item(info, "case1", {"background": 0, "liver": 1}))


def test_nan_intensities_are_an_error(tiny_nnunet):
    info = read_dataset(tiny_nnunet)
    path = info.case("case2").images[0]
    img = np.asarray(nib.load(path).dataobj).copy()
    img[3, 3, 3] = np.nan
    write_nifti(path, img)
    with pytest.raises(DatasetError, match=r"case2_0000.nii.gz: 1 NaN/infinite"):
        build_transforms(Preprocessing("ct", spacing=(1.0, 1.0, 1.0)), train=False)(item(info, "case2", {}))


def test_mri_zscore_over_foreground(tmp_path):
    root = make_nnunet(tmp_path / "mr", {"liver": 1}, n_cases=1, shape=(16, 16, 16), channel="T2")
    info = read_dataset(root)
    img = np.zeros((16, 16, 16), np.float32)
    img[4:12, 4:12, 4:12] = np.random.default_rng(0).normal(500, 50, (8, 8, 8))
    write_nifti(info.cases[0].images[0], img)
    out = build_transforms(Preprocessing("mri", spacing=(1.0, 1.0, 1.0)), train=False)(
        item(info, "case0", {"background": 0, "liver": 1}))
    fg = out["image"][0, 4:12, 4:12, 4:12]
    assert abs(float(fg.mean())) < 1e-3 and abs(float(fg.std()) - 1) < 0.02
    assert float(out["image"][0, 0, 0, 0]) < -5  # air far below the foreground mean


def test_orientation_then_spacing_lps(tmp_path):
    """An LPS image comes out in RAS at the requested spacing, with anatomy in the same world place."""
    root = make_nnunet(tmp_path / "lps", {"liver": 1}, n_cases=1, shape=(10, 12, 8))
    info = read_dataset(root)
    affine = np.diag([-2.0, -2.0, 3.0, 1.0])
    lab = np.zeros((10, 12, 8), np.uint8)
    lab[1:3, 2:5, 1:3] = 1
    write_nifti(info.cases[0].images[0], lab.astype(np.float32) * 100, affine)
    write_nifti(info.cases[0].label, lab, affine)
    out = build_transforms(Preprocessing("ct", spacing=(1.0, 1.0, 1.5)), train=False)(
        item(info, "case0", {"background": 0, "liver": 1}))
    new_aff = out["label"].affine.numpy()
    assert np.allclose(np.diag(new_aff)[:3], [1.0, 1.0, 1.5])
    world_before = affine @ np.r_[np.argwhere(lab).mean(0), 1]
    world_after = new_aff @ np.r_[np.argwhere(out["label"][0].numpy()).mean(0), 1]
    assert np.allclose(world_before[:3], world_after[:3], atol=1.0)


def test_train_crops_are_class_balanced(tiny_nnunet):
    info = read_dataset(tiny_nnunet)
    gidx = {"background": 0, "liver": 1, "kidney_right": 2, "spleen": 3}
    tf = build_transforms(Preprocessing("ct", spacing=(1.0, 1.0, 1.0)), train=True, patch_size=(4, 4, 4),
                          num_classes=4, samples_per_volume=40, augment=False)
    tf.set_random_state(0)
    samples = tf(item(info, "case0", gidx))
    assert len(samples) == 40 and samples[0]["image"].shape == (1, 4, 4, 4)
    centre_class = [int(s["label"][0, 2, 2, 2]) for s in samples]
    for k in range(4):
        assert centre_class.count(k) >= 4, centre_class  # each class drawn as a centre


def test_real_totalseg_mr_lps_to_ras():
    info = read_dataset(real_dataset("totalseg_mr"))
    case = info.cases[0]
    src = nib.load(case.label)
    assert nib.aff2axcodes(src.affine) == ("L", "P", "S")
    gidx = {"background": 0, "liver": 1, "spleen": 2}
    out = build_transforms(Preprocessing("mri", spacing=(3.0, 3.0, 3.0)), train=False)(
        item(info, case.case_id, gidx))
    assert nib.aff2axcodes(out["label"].affine.numpy()) == ("R", "A", "S")
    assert set(np.unique(out["label"].numpy())) <= {0, 1, 2}
    raw = np.asarray(src.dataobj)
    for name in ("liver", "spleen"):
        n_raw = int((raw == info.labels[name]).sum())
        assert n_raw > 0 and int((out["label"] == gidx[name]).sum()) == n_raw  # same spacing: voxel count kept


def test_class_indices_match_a_scan_and_thin_only_large_classes():
    from cfseg.data.transforms import ClassIndicesd

    rng = np.random.default_rng(0)
    label = rng.choice(4, size=(1, 20, 18, 16), p=[0.9, 0.07, 0.03, 0.0]).astype(np.uint8)
    out = ClassIndicesd("label", num_classes=4, max_per_class=1000)({"label": torch.as_tensor(label)})
    idx = out["label_cls_indices"]
    flat = label.reshape(-1)
    for k in (1, 2):  # small classes: exactly the voxels of the class, in order
        assert np.array_equal(idx[k], np.flatnonzero(flat == k))
    assert len(idx[3]) == 0
    assert 500 < len(idx[0]) <= 1000 and (flat[idx[0]] == 0).all()  # background thinned, still background
    gaps = np.diff(idx[0])
    assert gaps.min() > 0 and np.flatnonzero(flat == 0)[-1] - idx[0][-1] < 2 * gaps.max()  # spread over the volume


def _box_item(shape=(40, 36, 32)):
    """An image equal to its label (two boxes), so any misalignment of image and label shows."""
    from monai.data import MetaTensor

    lab = torch.zeros((1, *shape), dtype=torch.uint8)
    lab[0, 4:14, 6:16, 5:12] = 1
    lab[0, 22:34, 18:30, 15:28] = 2
    return {"image": MetaTensor(lab.float()), "label": MetaTensor(lab.clone()),
            "annotated": torch.ones(3, dtype=torch.bool)}


@pytest.mark.parametrize("level", ["none", "intensity", "spatial", "strong"])
def test_augment_levels_give_aligned_patches_of_the_patch_size(level):
    from cfseg.data.transforms import CheckedCompose, random_transforms

    tf = CheckedCompose(random_transforms((16, 16, 16), 3, samples_per_volume=4, augment=level))
    tf.set_random_state(0)
    for _ in range(6):
        for s in tf(_box_item()):
            assert s["image"].shape == (1, 16, 16, 16) and s["label"].shape == (1, 16, 16, 16)
            assert s["label"].dtype == torch.uint8 and s["image"].dtype == torch.float32
            assert set(torch.unique(s["label"]).tolist()) <= {0, 1, 2}
            if level in ("none", "spatial"):  # no intensity change beyond scale/shift: the boxes still match
                img = s["image"][0]
                inside, outside = img[s["label"][0] == 2], img[s["label"][0] == 0]
                if len(inside) > 50 and len(outside) > 50:
                    assert inside.median() > outside.median()


def test_strong_augmentation_is_seeded_and_differs_from_the_light_one():
    from cfseg.data.transforms import CheckedCompose, random_transforms

    def run(level, seed):
        tf = CheckedCompose(random_transforms((16, 16, 16), 3, samples_per_volume=2, augment=level))
        tf.set_random_state(seed)
        return [s["image"] for _ in range(8) for s in tf(_box_item())]

    a, b = run("strong", 3), run("strong", 3)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a, run("strong", 4), strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a, run("intensity", 3), strict=True))


def test_spatial_crop_centres_cover_the_volume_as_a_plain_crop():
    """The enlarged crop is cut from the volume padded by the margin: a patch centred on an organ in a corner still
    holds it (a patch-plus-margin crop of the unpadded volume would sit near the centre)."""
    from cfseg.data.transforms import CheckedCompose, crop_margin, crop_size, random_transforms

    assert crop_size((48, 48, 48), "spatial") == (60, 60, 60) and crop_margin((48, 48, 48), True) == (0, 0, 0)
    item = _box_item((40, 40, 40))
    item["label"][:] = 0
    item["label"][0, 1:4, 1:4, 1:4] = 1  # a corner organ
    tf = CheckedCompose(random_transforms((32, 32, 32), 3, samples_per_volume=1, augment="spatial",
                                          class_ratios=[0.0, 1.0, 0.0]))
    tf.set_random_state(0)
    counts = [int((tf(dict(item))[0]["label"] == 1).sum()) for _ in range(20)]
    assert sum(c == 27 for c in counts) >= 10, counts  # whole whenever not rotated (70 % of the patches)


def test_bad_augment_level_is_an_error():
    from cfseg.data.transforms import augment_level

    assert augment_level(True) == "intensity" and augment_level(False) == "none"
    with pytest.raises(ValueError, match="augment must be"):
        augment_level("heavy")
