"""DICOM outputs of cfseg-segment (cfseg.dicom_outputs): a DICOM-SEG read back by highdicom equals the mask voxel for
voxel, RTSTRUCT contours rasterised back reach Dice >= 0.95 per class, both reference the source series and carry the
class names, colours and the algorithm; written atomically with the manifest like the NIfTI outputs."""

from __future__ import annotations

import json

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest

import cfseg
from cfseg.apps.segment import main as segment_main
from cfseg.dicom import read_series, write_series
from cfseg.dicom_outputs import class_colour, rtstruct, slice_contours
from cfseg.module import load_checkpoint
from cfseg.online import model_fingerprint
from cfseg.structure_sets import read_structure_masks


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 1.0 if not a.any() and not b.any() else float(2 * (a & b).sum() / (a.sum() + b.sum()))


@pytest.fixture(scope="module")
def series_and_labels(boxes, box_model, tmp_path_factory):
    """A series written from a box case, and the NIfTI-path multilabel output of the box model on it."""
    tmp = tmp_path_factory.mktemp("dicom_out")
    src = nib.load(boxes / "imagesTr" / "box2_0000.nii.gz")
    nifti = tmp / "case.nii.gz"
    nib.save(nib.Nifti1Image(np.round(np.asarray(src.dataobj)).astype(np.int16), src.affine), nifti)
    write_series(nifti, tmp / "series")
    assert segment_main(["-i", str(nifti), "-o", str(tmp / "nifti"), "--ckpt", str(box_model), "--multilabel",
                         "--modality", "ct"]) == 0
    labels = np.asarray(nib.load(tmp / "nifti" / "labels.nii.gz").dataobj)
    table = json.loads((tmp / "nifti" / "labels.json").read_text())
    return tmp / "series", labels, {n: int(v) for v, n in table.items()}


def test_dicom_seg_reads_back_voxel_for_voxel(series_and_labels, box_model, tmp_path):
    folder, labels, values = series_and_labels
    rc = segment_main(["-i", str(folder), "-o", str(tmp_path), "--ckpt", str(box_model), "--output-type",
                       "dicom-seg", "--classes", "spleen", "liver", "--modality", "ct"])
    assert rc == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [".cfseg-segment.json", "seg.dcm"]
    manifest = json.loads((tmp_path / ".cfseg-segment.json").read_text())
    assert manifest["files"] == ["seg.dcm"] and len(manifest["sha256"]["seg.dcm"]) == 64
    seg = hd.seg.segread(tmp_path / "seg.dcm")
    series = read_series(folder)
    assert seg.FrameOfReferenceUID == series.frame_of_reference_uid
    assert seg.StudyInstanceUID == series.first.StudyInstanceUID and seg.PatientID == series.first.PatientID
    refs = {str(r.ReferencedSOPInstanceUID) for s in seg.ReferencedSeriesSequence
            for r in s.ReferencedInstanceSequence}
    assert refs == set(series.sop_instance_uids) and seg.ReferencedSeriesSequence[0].SeriesInstanceUID == \
        series.series_uid
    names = [str(seg.get_segment_description(n).SegmentLabel) for n in seg.segment_numbers]
    assert names == ["spleen", "liver"]  # the classes asked for, in that order, nothing else
    arr = seg.get_pixels_by_source_instance(series.sop_instance_uids, assert_missing_frames_are_empty=True)
    # only the requested classes compete with the background: the reference is the NIfTI path with those classes
    labels = np.asarray(cfseg.segment(folder.parent / "case.nii.gz", box_model, classes=["spleen", "liver"],
                                      multilabel=True, modality="ct")["labels"].dataobj)
    for j, name in enumerate(names):
        got = np.transpose(arr[..., j] > 0, (2, 1, 0))
        assert np.array_equal(got, labels == values[name]), name
    assert any((labels == values[n]).any() for n in names), "the model found something"
    module = load_checkpoint(str(box_model))
    for n in seg.segment_numbers:
        d = seg.get_segment_description(n)
        ident = d.SegmentationAlgorithmIdentificationSequence[0]
        assert ident.AlgorithmName == "cfseg" and ident.AlgorithmVersion == cfseg.__version__
        assert model_fingerprint(module) in ident.AlgorithmParameters
        lab = hd.color.CIELabColor.from_dicom_value(d.RecommendedDisplayCIELabValue).to_rgb()
        k = module.bank.index(str(d.SegmentLabel))
        assert np.abs(np.subtract(lab, class_colour(k))).max() <= 2
        assert d.SegmentedPropertyTypeCodeSequence[0].CodeValue in ("78961009", "10200004")  # SCT spleen, liver


def test_rtstruct_contours_reach_dice_095_per_class(series_and_labels, box_model, tmp_path):
    folder, labels, values = series_and_labels
    rc = segment_main(["-i", str(folder), "-o", str(tmp_path), "--ckpt", str(box_model), "--output-type",
                       "rtstruct", "--modality", "ct"])
    assert rc == 0
    ds = pydicom.dcmread(tmp_path / "rtstruct.dcm")
    series = read_series(folder)
    assert ds.Modality == "RTSTRUCT" and ds.PatientID == series.first.PatientID
    frame = ds.ReferencedFrameOfReferenceSequence[0]
    assert frame.FrameOfReferenceUID == series.frame_of_reference_uid
    ref_series = frame.RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
    assert ref_series.SeriesInstanceUID == series.series_uid
    assert [str(r.ReferencedSOPInstanceUID) for r in ref_series.ContourImageSequence] == series.sop_instance_uids
    module = load_checkpoint(str(box_model))
    assert model_fingerprint(module) in ds.StructureSetDescription and "cfseg 0." in ds.StructureSetDescription
    names = [str(r.ROIName) for r in ds.StructureSetROISequence]
    assert names == module.bank.names[1:]
    for rc_item in ds.ROIContourSequence:
        k = module.bank.index(names[int(rc_item.ReferencedROINumber) - 1])
        assert tuple(int(v) for v in rc_item.ROIDisplayColor) == class_colour(k)
        for c in rc_item.get("ContourSequence", []):  # each contour on the slice it references, at its z
            uid = str(c.ContourImageSequence[0].ReferencedSOPInstanceUID)
            z = float(series.headers[series.sop_instance_uids.index(uid)].ImagePositionPatient[2])
            assert np.allclose(np.asarray(c.ContourData, float).reshape(-1, 3)[:, 2], z, atol=1e-3)
    masks = read_structure_masks(tmp_path / "rtstruct.dcm", series)
    found = 0
    for name in names:
        truth = labels == values[name]
        found += int(truth.any())
        assert dice(masks[name], truth) >= 0.95, name
    assert found >= 2, "the model found at least two classes (else the Dice says little)"


def test_contours_of_shapes_with_holes_and_touching_corners():
    """Marching squares + even-odd filling give back the mask exactly, holes and diagonal neighbours included."""
    rng = np.random.default_rng(0)
    shapes = [np.pad(np.ones((5, 5), bool), 2), np.zeros((9, 9), bool), rng.random((12, 11)) > 0.5]
    shapes[0][4, 4] = False  # a one-voxel hole
    shapes[1][2, 2] = shapes[1][3, 3] = True  # two voxels touching at a corner
    import tempfile

    from cfseg.dicom_outputs import Algorithm

    for m in shapes:
        assert all(len(c) >= 3 for c in slice_contours(m))
        with tempfile.TemporaryDirectory() as tmp:
            vol = np.repeat(m[:, :, None], 3, axis=2)
            write_series(nib.Nifti1Image(np.where(vol, 100.0, -900.0), np.diag([1.0, 1.2, 2.0, 1.0])), tmp)
            s = read_series(tmp)
            ds = rtstruct(vol.astype(np.uint8), s, [(1, "liver")], Algorithm("0", "0" * 64))
            back = read_structure_masks(ds, s)["liver"]
            assert dice(back, vol) >= 0.95
            assert np.array_equal(back[:, :, 1], m) or m is shapes[2]  # random noise: saddles may differ


def test_dicom_outputs_need_a_series_and_no_multilabel(series_and_labels, boxes, box_model, tmp_path, capsys):
    nifti = boxes / "imagesTr" / "box2_0000.nii.gz"
    rc = segment_main(["-i", str(nifti), "-o", str(tmp_path / "a"), "--ckpt", str(box_model), "--output-type",
                       "rtstruct"])
    assert rc == 2 and "--output-type rtstruct needs a DICOM series as input" in capsys.readouterr().err
    folder = series_and_labels[0]
    with pytest.raises(SystemExit) as e:  # a usage error, as argparse's
        segment_main(["-i", str(folder), "-o", str(tmp_path / "b"), "--ckpt", str(box_model), "--output-type",
                      "dicom-seg", "--multilabel"])
    assert e.value.code == 2 and "--multilabel and --similarity apply to NIfTI outputs only" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_rerun_replaces_and_an_edited_structure_set_is_kept(series_and_labels, box_model, tmp_path, capsys):
    folder = series_and_labels[0]
    args = ["-i", str(folder), "-o", str(tmp_path), "--ckpt", str(box_model), "--output-type", "rtstruct",
            "--classes", "liver", "--modality", "ct"]
    assert segment_main(args) == 0
    first = pydicom.dcmread(tmp_path / "rtstruct.dcm").SOPInstanceUID
    assert segment_main(args) == 0  # a rerun replaces its own output
    assert pydicom.dcmread(tmp_path / "rtstruct.dcm").SOPInstanceUID != first
    ds = pydicom.dcmread(tmp_path / "rtstruct.dcm")  # a reviewer edits it (e.g. renames the ROI)
    ds.StructureSetROISequence[0].ROIName = "Liver_reviewed"
    ds.save_as(tmp_path / "rtstruct.dcm")
    assert segment_main(args) == 2
    assert "rtstruct.dcm differs from what cfseg-segment wrote" in capsys.readouterr().err
    assert segment_main([*args, "--keep-edited"]) == 0
    assert pydicom.dcmread(tmp_path / "rtstruct.dcm").StructureSetROISequence[0].ROIName == "Liver_reviewed"
    assert (tmp_path / "rtstruct.new.dcm").is_file()
