import json
import shutil

import numpy as np
import pytest
from conftest import make_nnunet, real_dataset, write_nifti

from cfseg.data.formats import DatasetError, modality_from_channel, read_dataset


def test_nnunet_reader(tiny_nnunet):
    info = read_dataset(tiny_nnunet)
    assert info.format == "nnunet" and info.modality == "ct"
    assert info.labels == {"liver": 1, "kidney_right": 3, "spleen": 7}  # canonical names, gaps kept
    assert [c.case_id for c in info.cases] == ["case0", "case1", "case2"]
    assert all(c.annotated == ("liver", "kidney_right", "spleen") for c in info.cases)  # no partial file
    assert info.cases[0].images[0].name == "case0_0000.nii.gz"


def test_partial_labels(tmp_path):
    root = make_nnunet(tmp_path / "d", {"liver": 1, "spleen": 2}, n_cases=2,
                       partial={"case0": ["Liver"], "case1": ["spleen", "liver"]})
    info = read_dataset(root)
    assert info.case("case0").annotated == ("liver",)
    assert info.case("case1").annotated == ("liver", "spleen")


def make_msd(root, shape=(8, 8, 6)):
    root.mkdir(parents=True)
    training = []
    for i in range(2):
        lab = np.zeros(shape, np.uint8)
        lab[2:4, 2:4, 2:4] = 2
        write_nifti(root / "imagesTr" / f"c{i}.nii.gz", np.ones(shape, np.float32))
        write_nifti(root / "labelsTr" / f"c{i}.nii.gz", lab)
        training.append({"image": f"./imagesTr/c{i}.nii.gz", "label": f"./labelsTr/c{i}.nii.gz"})
    (root / "dataset.json").write_text(json.dumps({
        "name": "msd", "modality": {"0": "MRI"}, "labels": {"0": "background", "2": "Left Kidney"},
        "training": training, "numTraining": 2}))
    return root


def test_msd_reader(tmp_path):
    info = read_dataset(make_msd(tmp_path / "Task01_x"))
    assert info.format == "msd" and info.modality == "mri"
    assert info.labels == {"kidney_left": 2}
    assert [c.case_id for c in info.cases] == ["c0", "c1"]


def test_modality_from_channel():
    assert modality_from_channel("CT") == "ct"
    for name in ("MRI", "T2", "t1w", "FLAIR", "ADC"):
        assert modality_from_channel(name) == "mri"
    with pytest.raises(DatasetError, match="modality"):
        modality_from_channel("PET")


# ---- every bad input gets one clear error naming the file -------------------------------------------------
def test_missing_dataset_json(tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(DatasetError, match=r"dataset.json: file not found"):
        read_dataset(tmp_path / "d")


def test_unreadable_dataset_json(tiny_nnunet):
    (tiny_nnunet / "dataset.json").write_text('{"labels": {"liver": 1,}')
    with pytest.raises(DatasetError, match=r"dataset.json: not valid JSON .* line 1"):
        read_dataset(tiny_nnunet)


def test_missing_label_file(tiny_nnunet):
    (tiny_nnunet / "labelsTr" / "case1.nii.gz").unlink()
    with pytest.raises(DatasetError, match=r"case1.nii.gz: file not found"):
        read_dataset(tiny_nnunet)
    info = read_dataset(tiny_nnunet, require_labels=False)  # image-only entries are allowed on request
    assert info.case("case1").label is None


def test_missing_channel(tmp_path):
    root = make_nnunet(tmp_path / "d", {"liver": 1})
    meta = json.loads((root / "dataset.json").read_text())
    meta["channel_names"] = {"0": "CT", "1": "CT"}
    (root / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(DatasetError, match=r"case0_0001.nii.gz: file not found"):
        read_dataset(root)


def test_empty_dataset(tmp_path):
    root = make_nnunet(tmp_path / "d", {"liver": 1}, n_cases=0)
    with pytest.raises(DatasetError, match="no cases"):
        read_dataset(root)


def test_unknown_class_in_partial_labels(tmp_path):
    root = make_nnunet(tmp_path / "d", {"liver": 1, "spleen": 2}, n_cases=2,
                       partial={"case0": ["livr"], "case1": ["spleen"]})
    with pytest.raises(DatasetError, match=r"partial_labels.json: case 'case0'.*'livr'.*did you mean liver"):
        read_dataset(root)


def test_partial_labels_missing_case(tmp_path):
    root = make_nnunet(tmp_path / "d", {"liver": 1}, n_cases=2, partial={"case0": ["liver"]})
    with pytest.raises(DatasetError, match=r"case 'case1' is missing"):
        read_dataset(root)


def test_shape_mismatch(tiny_nnunet):
    write_nifti(tiny_nnunet / "labelsTr" / "case2.nii.gz", np.zeros((5, 5, 5), np.uint8))
    with pytest.raises(DatasetError, match=r"case2.nii.gz: shape \(5, 5, 5\) does not match"):
        read_dataset(tiny_nnunet)


def test_affine_mismatch(tiny_nnunet):
    write_nifti(tiny_nnunet / "labelsTr" / "case2.nii.gz", np.zeros((12, 10, 8), np.uint8), np.diag([2, 1, 1, 1]))
    with pytest.raises(DatasetError, match=r"case2.nii.gz: affine does not match"):
        read_dataset(tiny_nnunet)


def test_4d_image_rejected(tiny_nnunet):
    write_nifti(tiny_nnunet / "imagesTr" / "case0_0000.nii.gz", np.zeros((12, 10, 8, 2), np.float32))
    with pytest.raises(DatasetError, match=r"case0_0000.nii.gz: expected a 3D volume"):
        read_dataset(tiny_nnunet)


def test_bad_label_values_in_json(tmp_path):
    with pytest.raises(DatasetError, match="background must have value 0"):
        make_nnunet(tmp_path / "a", {"liver": 1})
        meta = json.loads((tmp_path / "a" / "dataset.json").read_text())
        meta["labels"]["background"] = 3
        (tmp_path / "a" / "dataset.json").write_text(json.dumps(meta))
        read_dataset(tmp_path / "a")
    root = make_nnunet(tmp_path / "b", {"liver": 1, "Liver": 2})
    with pytest.raises(DatasetError, match="appears twice"):
        read_dataset(root)


# ---- real data (../shared/data) ---------------------------------------------------------------------------
def test_real_openkbp_partial_labels():
    info = read_dataset(real_dataset("openkbp_oar"))
    assert len(info.cases) == 203
    assert info.labels["mandible"] == 7 and info.labels["parotid_gland_left"] == 4
    n_eso = sum("esophagus" in c.annotated for c in info.cases)
    assert 0.2 * 203 < n_eso < 0.5 * 203  # about a third, per the data README
    assert all(set(c.annotated) <= set(info.labels) for c in info.cases)


def test_real_totalseg_gapped_labels():
    import nibabel as nib

    for name in ("totalseg_ct", "totalseg_mr"):
        info = read_dataset(real_dataset(name))
        assert len(info.cases) == 1
        present = sorted(int(v) for v in np.unique(np.asarray(nib.load(info.cases[0].label).dataobj)) if v)
        assert present != list(range(1, len(present) + 1)), "label values in the file have gaps"
        assert set(present) <= set(info.labels.values())
    assert read_dataset(real_dataset("totalseg_mr")).modality == "mri"


def test_real_dataset_copy_with_broken_json(tmp_path):
    src = real_dataset("totalseg_ct")
    dst = tmp_path / "ct"
    shutil.copytree(src, dst)
    meta = json.loads((dst / "dataset.json").read_text())
    del meta["labels"]
    (dst / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(DatasetError, match="missing required key 'labels'"):
        read_dataset(dst)
