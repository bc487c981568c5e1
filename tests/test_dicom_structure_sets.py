"""Structure sets as training data and corrections (cfseg.structure_sets, cfseg-convert, cfseg-correct): ROI names
of the OpenKBP organs as clinics spell them, refusals of ambiguous and derived names, the user mapping, the convert
round trip (synthetic, and an OpenKBP case when ../shared/data is present), a structure set as a correction."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from conftest import real_dataset

from cfseg.apps.convert import main as convert_main
from cfseg.apps.correct import main as correct_main
from cfseg.apps.segment import main as segment_main
from cfseg.data.formats import read_dataset
from cfseg.dicom import read_series, write_series
from cfseg.dicom_outputs import Algorithm, dicom_seg, rtstruct
from cfseg.structure_sets import StructureSetError, load_mapping, match_roi, read_structure_masks

OARS = ["brainstem", "spinal_cord", "parotid_gland_right", "parotid_gland_left", "esophagus", "larynx", "mandible"]
ALG = Algorithm("test", "0" * 64)

SPELLINGS = {  # ROI names found in clinical structure sets -> the OpenKBP class
    "Parotid_L": "parotid_gland_left", "PAROTID LT": "parotid_gland_left", "Lt Parotid": "parotid_gland_left",
    "Parotid (L)": "parotid_gland_left", "Parotid Left": "parotid_gland_left", "L_Parotid": "parotid_gland_left",
    "LeftParotid": "parotid_gland_left", "Parotid_Gland_L": "parotid_gland_left", "parotid_lt": "parotid_gland_left",
    "Parotis li": "parotid_gland_left", "Parotis sin": "parotid_gland_left",
    "Parotid_R": "parotid_gland_right", "PAROTID RT": "parotid_gland_right", "Rt Parotid": "parotid_gland_right",
    "Parotid (R)": "parotid_gland_right", "Right Parotid Gland": "parotid_gland_right",
    "Glnd_Parotid_R": "parotid_gland_right", "Parotis re": "parotid_gland_right",
    "SpinalCord": "spinal_cord", "Spinal Cord": "spinal_cord", "SPINAL_CORD": "spinal_cord", "Cord": "spinal_cord",
    "spinal-cord": "spinal_cord",
    "BrainStem": "brainstem", "Brainstem": "brainstem", "BRAIN STEM": "brainstem", "Brain_Stem": "brainstem",
    "Esophagus": "esophagus", "Oesophagus": "esophagus", "ESOPHAGUS": "esophagus",
    "Larynx": "larynx", "LARYNX": "larynx",
    "Mandible": "mandible", "MANDIBLE": "mandible", "Bone_Mandible": "mandible", "Jaw": "mandible",
    "Mandibula": "mandible",
}
AMBIGUOUS = ["Parotid", "PAROTID", "Parotids", "Parotid L+R", "Parotids_Combined", "Bilat Parotids"]
DERIVED = ["Cord_PRV", "SpinalCord_PRV5", "Brainstem+3mm", "z_Parotid_L_opt", "PTV70", "Mandible_avoid"]
UNMATCHED = ["External", "BODY", "Lung_L", "Couch", "Cochlea_L", "Brainstem_03"]


def test_roi_spellings_of_the_openkbp_organs():
    assert len(SPELLINGS) >= 30
    wrong = {n: match_roi(n, OARS).cls for n, c in SPELLINGS.items() if match_roi(n, OARS).cls != c}
    assert not wrong, wrong
    assert all(match_roi(n, OARS).status == "matched" for n in SPELLINGS)


@pytest.mark.parametrize("name", AMBIGUOUS)
def test_ambiguous_roi_names_are_refused(name):
    m = match_roi(name, OARS)
    assert m.cls is None and m.status == "ambiguous" and "parotid" in m.reason


@pytest.mark.parametrize("name", DERIVED + UNMATCHED)
def test_derived_and_unknown_roi_names_are_not_guessed(name):
    m = match_roi(name, OARS)
    assert m.cls is None and m.status == ("derived" if name in DERIVED else "unmatched") and m.reason


def test_mapping_file_decides_first(tmp_path):
    path = tmp_path / "map.json"
    path.write_text(json.dumps({"parotid": "Left Parotid", "Speicheldruese": "parotid_gland_right", "Cord": None}))
    mapping = load_mapping(path, OARS)
    assert match_roi("Parotid", OARS, mapping).cls == "parotid_gland_left"  # keys compare case-insensitively
    assert match_roi("Speicheldruese", OARS, mapping).status == "mapped"
    assert match_roi("Cord", OARS, mapping).status == "ignored"
    path.write_text(json.dumps({"Parotid": "parotid_gland"}))
    with pytest.raises(StructureSetError, match="maps to 'parotid_gland', not one of the classes"):
        load_mapping(path, OARS)


# ---- conversion ------------------------------------------------------------------------------------------------


def _labels(shape=(16, 14, 10)) -> np.ndarray:
    lab = np.zeros(shape, np.uint8)
    lab[2:6, 3:8, 2:7] = 1  # brainstem
    lab[8:13, 2:6, 3:8] = 4  # parotid_gland_left (OARS index + 1)
    lab[9:11, 9:12, 1:4] = 3  # parotid_gland_right
    return lab


def _case(folder: Path, lab: np.ndarray, names: dict[int, str], kind: str = "rtstruct", extra=()) -> Path:
    """A case folder: a CT series and an RTSTRUCT/DICOM-SEG of ``lab`` whose ROI of value v is named names[v];
    ``extra`` adds (value, name) ROIs."""
    img = np.where(lab > 0, 40.0, -700.0) + np.arange(lab.shape[2])[None, None, :]
    write_series(nib.Nifti1Image(img, np.diag([1.5, 1.5, 3.0, 1.0])), folder / "CT")
    s = read_series(folder / "CT")
    rois = [(v, n) for v, n in names.items()] + list(extra)
    make = rtstruct if kind == "rtstruct" else dicom_seg
    ds = make(lab, s, [(v, f"roi{i}") for i, (v, _) in enumerate(rois)], ALG)
    for i, (_, n) in enumerate(rois):  # clinical names instead of cfseg's
        if kind == "rtstruct":
            ds.StructureSetROISequence[i].ROIName = n
        else:
            ds.SegmentSequence[i].SegmentLabel = n
    ds.save_as(folder / ("RS.dcm" if kind == "rtstruct" else "SEG.dcm"), enforce_file_format=True)
    return folder


def test_convert_writes_the_nnunet_layout_with_partial_labels(tmp_path, capsys):
    lab = _labels()
    _case(tmp_path / "in" / "pat1", lab, {1: "BrainStem", 4: "Parotid (L)"},
          extra=[(3, "Parotid"), (0, "External"), (1, "Cord_PRV")])  # ambiguous, unmatched, derived (value 0: empty)
    _case(tmp_path / "in" / "pat2", lab, {1: "Brain Stem", 4: "PAROTID LT", 3: "Rt Parotid"}, kind="dicom-seg")
    _case(tmp_path / "in" / "pat3", lab, {1: "Brainstem", 4: "Lt Parotid"}, extra=[(1, "BRAINSTEM")])  # twice
    (tmp_path / "in" / "pat4").mkdir()
    shutil.copytree(tmp_path / "in" / "pat1" / "CT", tmp_path / "in" / "pat4" / "CT")  # no structure set
    out = tmp_path / "Dataset201_HN"
    rc = convert_main(["-i", str(tmp_path / "in"), "-o", str(out), "--classes", *OARS])
    captured = capsys.readouterr()
    assert rc == 1  # one case failed, the others written
    assert "pat4: no structure set (RTSTRUCT or DICOM-SEG) in this case folder" in captured.err
    for line in ("ROI 'Parotid': ambiguous", "ROI 'External': unmatched", "ROI 'Cord_PRV': derived",
                 "ROIs 'Brainstem', 'BRAINSTEM' all name brainstem; none used"):
        assert line in captured.out, line
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["labels"] == {"background": 0, **{c: i for i, c in enumerate(OARS, 1)}}
    assert meta["channel_names"] == {"0": "CT"}
    partial = json.loads((out / "partial_labels.json").read_text())
    assert partial == {"pat1": ["brainstem", "parotid_gland_left"],
                       "pat2": ["brainstem", "parotid_gland_right", "parotid_gland_left"],
                       "pat3": ["parotid_gland_left"]}
    for case, keep in (("pat1", {1, 4}), ("pat2", {1, 3, 4}), ("pat3", {4})):
        got = np.asarray(nib.load(out / "labelsTr" / f"{case}.nii.gz").dataobj)
        assert np.array_equal(got, np.where(np.isin(lab, list(keep)), lab, 0)), case
    info = read_dataset(out)  # cfseg reads what it wrote, partial labels included
    assert [c.case_id for c in info.cases] == ["pat1", "pat2", "pat3"]
    assert info.case("pat3").annotated == ("parotid_gland_left",)
    report = json.loads((out / "conversion_report.json").read_text())
    assert report["failed"].keys() == {"pat4"}
    assert convert_main(["-i", str(tmp_path / "in"), "-o", str(out), "--classes", *OARS]) == 2  # never overwrites


def test_structure_set_from_another_scan_is_refused(tmp_path):
    _case(tmp_path / "a", _labels(), {1: "Brainstem"})
    write_series(nib.Nifti1Image(np.random.default_rng(0).normal(size=(16, 14, 10)), np.eye(4)), tmp_path / "b")
    with pytest.raises(StructureSetError, match="Frame of Reference .* is not the series'"):
        read_structure_masks(tmp_path / "a" / "RS.dcm", read_series(tmp_path / "b"))


# ---- a structure set as a correction -----------------------------------------------------------------------------


def test_correct_from_an_rtstruct(boxes, box_model, tmp_path, capsys):
    src = nib.load(boxes / "imagesTr" / "box3_0000.nii.gz")
    truth = np.asarray(nib.load(boxes / "labelsTr" / "box3.nii.gz").dataobj)
    write_series(nib.Nifti1Image(np.round(np.asarray(src.dataobj)), src.affine), tmp_path / "series")
    s = read_series(tmp_path / "series")
    ds = rtstruct(truth, s, [(1, "Liver"), (2, "SPLEEN"), (3, "Aorta_PRV")], ALG)  # the reviewer's structure set
    ds.save_as(tmp_path / "reviewed.dcm", enforce_file_format=True)
    rc = correct_main(["--ckpt", str(box_model), "--state", str(tmp_path / "state"), "--image",
                       str(tmp_path / "series"), "--mask", str(tmp_path / "reviewed.dcm"), "--modality", "ct"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "ROI 'Aorta_PRV': derived" in captured.err  # warned, not learnt from
    lines = [x.strip() for x in captured.out.splitlines()]
    assert any(x.startswith("liver: Dice checkpoint") for x in lines)
    assert any(x.startswith("spleen: Dice checkpoint") for x in lines)
    assert not any(x.startswith("aorta") for x in lines)
    assert (tmp_path / "state" / "state.json").is_file()


# ---- an OpenKBP case (../shared/data) ----------------------------------------------------------------------------

CLINICAL = {"brainstem": "BrainStem", "spinal_cord": "SpinalCord", "parotid_gland_right": "Parotid_R",
            "parotid_gland_left": "Lt Parotid", "esophagus": "Oesophagus", "larynx": "LARYNX", "mandible": "Jaw"}


@pytest.fixture(scope="module")
def openkbp_case(tmp_path_factory):
    root = real_dataset("openkbp_oar")
    case = "openkbp_004"  # all seven organs contoured
    tmp = tmp_path_factory.mktemp("openkbp_dicom")
    img = nib.load(root / "imagesTr" / f"{case}_0000.nii.gz")
    lab = np.asarray(nib.load(root / "labelsTr" / f"{case}.nii.gz").dataobj)
    names = {int(v): n for n, v in json.loads((root / "dataset.json").read_text())["labels"].items() if v}
    annotated = json.loads((root / "partial_labels.json").read_text())[case]
    write_series(img, tmp / "in" / case / "CT")
    return tmp, case, img, lab, names, annotated


@pytest.mark.realdata
def test_openkbp_rtstruct_dice_and_convert_round_trip(openkbp_case, capsys):
    tmp, case, img, lab, names, annotated = openkbp_case
    s = read_series(tmp / "in" / case / "CT")
    assert np.array_equal(np.asarray(s.image.dataobj), np.asarray(img.dataobj, np.float32))
    assert np.allclose(s.image.affine, img.affine, atol=1e-5)
    present = [(v, names[v]) for v in sorted(names) if (lab == v).any()]
    assert {n for _, n in present} == set(annotated) == set(CLINICAL)
    ds = rtstruct(lab, s, [(v, CLINICAL[n]) for v, n in present], ALG)
    ds.save_as(tmp / "in" / case / "RS.dcm", enforce_file_format=True)
    masks = read_structure_masks(tmp / "in" / case / "RS.dcm", s)
    for v, n in present:
        truth = lab == v
        d = 2 * (masks[CLINICAL[n]] & truth).sum() / (masks[CLINICAL[n]].sum() + truth.sum())
        print(f"{case} {n} ({CLINICAL[n]}): RTSTRUCT Dice {d:.4f}, {truth.sum()} voxels")
        assert d >= 0.95, n
    out = tmp / "Dataset301_OpenKBPfromDICOM"
    assert convert_main(["-i", str(tmp / "in"), "-o", str(out), "--classes", *(names[v] for v in sorted(names))]) == 0
    back = nib.load(out / "labelsTr" / f"{case}.nii.gz")
    assert np.array_equal(np.asarray(back.dataobj), lab)  # the label map, value for value
    assert np.allclose(back.affine, img.affine, atol=1e-5)
    assert np.array_equal(np.asarray(nib.load(out / "imagesTr" / f"{case}_0000.nii.gz").dataobj),
                          np.asarray(img.dataobj))
    assert json.loads((out / "partial_labels.json").read_text()) == {case: [n for _, n in present]}
    assert json.loads((out / "dataset.json").read_text())["labels"] == \
        json.loads((real_dataset("openkbp_oar") / "dataset.json").read_text())["labels"]


@pytest.mark.realdata
@pytest.mark.filterwarnings("ignore:.*unlike the images this checkpoint was trained on")  # boxes vs a head CT
def test_openkbp_series_in_rtstruct_and_dicom_seg_out(openkbp_case, box_model, tmp_path):
    """A series written from an OpenKBP case goes through cfseg-segment; the RTSTRUCT and the DICOM-SEG read back
    (pydicom, highdicom) onto the series' geometry with the class names (the tiny box model's classes)."""
    import highdicom as hd

    import cfseg

    tmp, case, img, _, _, _ = openkbp_case
    folder = tmp / "in" / case / "CT"
    ref = np.asarray(cfseg.segment(folder, box_model, multilabel=True, modality="ct")["labels"].dataobj)
    for kind in ("rtstruct", "dicom-seg"):
        assert segment_main(["-i", str(folder), "-o", str(tmp_path / kind), "--ckpt", str(box_model),
                             "--output-type", kind, "--modality", "ct"]) == 0
    s = read_series(folder)
    seg = hd.seg.segread(tmp_path / "dicom-seg" / "seg.dcm")
    labels = [str(seg.get_segment_description(n).SegmentLabel) for n in seg.segment_numbers]
    assert labels == ["liver", "spleen", "aorta"] and seg.FrameOfReferenceUID == s.frame_of_reference_uid
    arr = seg.get_pixels_by_source_instance(s.sop_instance_uids, assert_missing_frames_are_empty=True)
    rs = pydicom.dcmread(tmp_path / "rtstruct" / "rtstruct.dcm")
    masks = read_structure_masks(rs, s)
    assert [str(r.ROIName) for r in rs.StructureSetROISequence] == labels
    for j, name in enumerate(labels):
        truth = ref == j + 1
        assert np.array_equal(np.transpose(arr[..., j] > 0, (2, 1, 0)), truth), name
        if truth.any():
            assert 2 * (masks[name] & truth).sum() / (masks[name].sum() + truth.sum()) >= 0.95, name
