"""DICOM series in (cfseg.dicom): geometry from the headers, and one refusal per kind of series that is not one
volume; cfseg-segment on a series gives the masks of the same volume as NIfTI. Outputs: tests/test_dicom_outputs.py."""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.uid import JPEG2000Lossless, generate_uid

from cfseg.apps.segment import main as segment_main
from cfseg.dicom import DicomError, read_series, write_series


def volume(shape=(12, 10, 8), seed=0) -> np.ndarray:
    """Integer 'Hounsfield units' (stored exactly by a CT series)."""
    rng = np.random.default_rng(seed)
    return np.round(rng.normal(0, 300, shape)).astype(np.float32)


def _series(tmp_path: Path, affine=None, name="ct", modality="CT", data=None) -> Path:
    affine = np.diag([0.8, 0.9, 2.5, 1.0]) if affine is None else affine
    write_series(nib.Nifti1Image(volume() if data is None else data, affine), tmp_path / name, modality)
    return tmp_path / name


def _rotation_z(angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, -s, 0, 0], [s, c, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]])


# a RAS-diagonal grid; an LPS one whose slices run foot-wards, against row x column (read back in reverse); an
# oblique one with permuted axes (rows along L, columns along I, slices along P), rotated about z
AFFINES = {
    "ras": np.array([[0.8, 0, 0, -10.0], [0, 0.9, 0, 20.0], [0, 0, 2.5, -30.0], [0, 0, 0, 1]]),
    "lps_descending": np.array([[-0.7, 0, 0, 40.0], [0, -0.7, 0, 50.0], [0, 0, -3.0, 7.5], [0, 0, 0, 1]]),
    "oblique": _rotation_z(0.3) @ np.array([[-1.1, 0, 0, 3.0], [0, 0, -2.0, -4.0], [0, -1.3, 0, 5.0], [0, 0, 0, 1]]),
}


@pytest.mark.parametrize("name", sorted(AFFINES))
def test_series_reads_back_the_volume_and_its_affine(tmp_path, name):
    affine = AFFINES[name]
    data = volume()
    s = read_series(_series(tmp_path, affine, data=data))
    lps = np.diag([-1, -1, 1, 1.0]) @ affine
    same_order = np.cross(lps[:3, 0], lps[:3, 1]) @ lps[:3, 2] > 0  # slices are sorted along row x column
    assert same_order == (name != "lps_descending")
    expect = data if same_order else data[:, :, ::-1]
    assert np.array_equal(np.asarray(s.image.dataobj), expect)
    world = affine if same_order else affine @ _flip_z(data.shape[2])
    assert np.allclose(s.image.affine, world, atol=1e-5)
    assert s.modality == "ct" and len(s.headers) == data.shape[2]
    assert [int(h.InstanceNumber) for h in s.headers] == (list(range(1, 9)) if same_order else list(range(8, 0, -1)))


def _flip_z(n: int) -> np.ndarray:
    f = np.eye(4)
    f[2, 2], f[2, 3] = -1, n - 1
    return f


def test_slice_order_from_positions_not_file_names_and_rescale(tmp_path):
    data = volume()
    folder = _series(tmp_path, data=data)
    files = sorted(folder.iterdir())
    rng = np.random.default_rng(1)
    for i, f in enumerate(rng.permutation(files)):  # shuffled names and instance numbers
        ds = pydicom.dcmread(f)
        ds.InstanceNumber = i + 1
        ds.save_as(folder / f"x{i:03d}.tmp")
        f.unlink()
    for f in folder.iterdir():
        f.rename(f.with_suffix(".dcm"))
    # one slice stored with its own slope and intercept (HU = 2 * stored - 1000)
    f = sorted(folder.iterdir())[3]
    ds = pydicom.dcmread(f)
    hu = ds.pixel_array.astype(np.int32) - 1024
    stored = (hu + 1000) // 2
    ds.RescaleSlope, ds.RescaleIntercept = "2", "-1000"
    ds.PixelData = stored.astype(np.int16).tobytes()
    ds.save_as(f)
    s = read_series(folder)
    k = [str(h.SOPInstanceUID) for h in s.headers].index(str(ds.SOPInstanceUID))
    expect = data.copy()
    expect[:, :, k] = (2 * stored - 1000).T
    assert np.array_equal(np.asarray(s.image.dataobj), expect)
    assert np.allclose(s.image.affine, np.diag([0.8, 0.9, 2.5, 1.0]), atol=1e-6)


def test_mr_series_with_a_float_slope(tmp_path):
    data = np.abs(volume()) / 7.0
    s = read_series(_series(tmp_path, modality="MR", data=data))
    assert s.modality == "mri"
    assert np.abs(np.asarray(s.image.dataobj) - data).max() <= (data.max() - data.min()) / 65535 + 1e-4


# ---- refusals: one line each -----------------------------------------------------------------------------------


def _refused(folder: Path, match: str) -> str:
    with pytest.raises(DicomError, match=match) as e:
        read_series(folder)
    text = str(e.value)
    assert "\n" not in text and text.startswith(str(folder))
    return text


def test_refuses_mixed_series(tmp_path):
    a = _series(tmp_path, name="a")
    b = _series(tmp_path, name="b")
    shutil.copy(sorted(b.iterdir())[0], a / "other.dcm")
    _refused(a, "mixed series in one folder: 2 series")


def test_refuses_a_missing_slice(tmp_path):
    folder = _series(tmp_path)
    sorted(folder.iterdir())[4].unlink()
    _refused(folder, r"missing slices: 1 slice\(s\) missing between slice_0003.dcm and slice_0005.dcm")


def test_refuses_duplicated_slices(tmp_path):
    folder = _series(tmp_path)
    files = sorted(folder.iterdir())
    shutil.copy(files[2], folder / "copy.dcm")  # the same instance twice
    _refused(folder, "duplicated slice: files .* are the same SOP instance")
    (folder / "copy.dcm").unlink()
    ds = pydicom.dcmread(files[2])  # another instance at the same position
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.save_as(folder / "again.dcm")
    _refused(folder, "duplicated slice: .* are at the same position")


def test_refuses_non_uniform_spacing(tmp_path):
    folder = _series(tmp_path)
    for f in sorted(folder.iterdir())[5:]:  # the last three slices 0.4 mm further (2.5 mm spacing, 1 % tolerance)
        ds = pydicom.dcmread(f)
        ds.ImagePositionPatient = [*ds.ImagePositionPatient[:2], float(ds.ImagePositionPatient[2]) + 0.4]
        ds.save_as(f)
    text = _refused(folder, "non-uniform slice spacing: gaps from 2.500 to 2.900 mm")
    assert "slice_0004.dcm and slice_0005.dcm" in text
    assert read_series(folder, spacing_tolerance=0.2).image.shape == (12, 10, 8)  # a looser tolerance takes it


def test_refuses_gantry_tilt(tmp_path):
    folder = _series(tmp_path)
    for k, f in enumerate(sorted(folder.iterdir())):  # positions sheared along y: 10 degrees of tilt
        ds = pydicom.dcmread(f)
        ds.ImagePositionPatient = [ds.ImagePositionPatient[0], k * 2.5 * np.tan(np.radians(10)),
                                   ds.ImagePositionPatient[2]]
        ds.save_as(f)
    _refused(folder, r"gantry tilt of 10.00 degrees")
    folder = _series(tmp_path, name="tag")
    for f in folder.iterdir():  # the tilt recorded in the header only
        ds = pydicom.dcmread(f)
        ds.GantryDetectorTilt = 15
        ds.save_as(f)
    _refused(folder, r"gantry tilt of 15 degrees \(GantryDetectorTilt\)")


def test_refuses_non_image_sop_class(tmp_path, box_model_free_rtstruct):
    folder = tmp_path / "rs"
    folder.mkdir()
    shutil.copy(box_model_free_rtstruct, folder / "rs.dcm")
    _refused(folder, r"no CT or MR image in this folder, only RT Structure Set Storage .* x1: a non-image SOP class")
    series = _series(tmp_path, name="with_rs")  # beside the images of one series it is set aside
    shutil.copy(box_model_free_rtstruct, series / "rs.dcm")
    assert len(read_series(series).headers) == 8


def test_refuses_multi_frame_images(tmp_path):
    folder = _series(tmp_path)
    f = sorted(folder.iterdir())[0]
    ds = pydicom.dcmread(f)
    ds.NumberOfFrames = 2
    ds.save_as(f)
    _refused(folder, "slice_0000.dcm is a multi-frame image .* 2 frames")


def test_refuses_undecodable_compressed_pixel_data(tmp_path):
    folder = _series(tmp_path)
    f = sorted(folder.iterdir())[2]
    ds = pydicom.dcmread(f)
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    ds.PixelData = pydicom.encaps.encapsulate([b"\xff\x4f\xff\x51" + bytes(60)])  # a broken JPEG 2000 stream
    ds["PixelData"].VR = "OB"
    ds.save_as(f, enforce_file_format=True)
    _refused(folder, r"slice_0002.dcm: compressed pixel data that cannot be decoded here \(transfer syntax JPEG 2000")


def test_cli_refusal_is_one_line_exit_2(tmp_path, box_model, capsys):
    folder = _series(tmp_path)
    sorted(folder.iterdir())[4].unlink()
    rc = segment_main(["-i", str(folder), "-o", str(tmp_path / "out"), "--ckpt", str(box_model)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0
    assert err.startswith(f"cfseg-segment: error: {folder}: missing slices")
    assert not (tmp_path / "out").exists()


@pytest.fixture
def box_model_free_rtstruct(tmp_path) -> Path:
    """An RTSTRUCT file (written by cfseg.dicom_outputs from a series, no model needed)."""
    from cfseg.dicom_outputs import Algorithm, rtstruct

    s = read_series(_series(tmp_path, name="src"))
    labels = np.zeros(s.image.shape, np.uint8)
    labels[3:7, 3:6, 2:5] = 1
    path = tmp_path / "rtstruct.dcm"
    rtstruct(labels, s, [(1, "liver")], Algorithm("0", "0" * 64)).save_as(path, enforce_file_format=True)
    return path


# ---- segmenting a series ---------------------------------------------------------------------------------------


def test_nifti_and_dicom_inputs_give_identical_masks(boxes, box_model, tmp_path):
    src = nib.load(boxes / "imagesTr" / "box1_0000.nii.gz")
    nifti = tmp_path / "case.nii.gz"
    nib.save(nib.Nifti1Image(np.round(np.asarray(src.dataobj)).astype(np.int16), src.affine), nifti)
    write_series(nifti, tmp_path / "series" / "case")
    for i, inp in enumerate([nifti, tmp_path / "series" / "case"]):
        assert segment_main(["-i", str(inp), "-o", str(tmp_path / f"out{i}"), "--ckpt", str(box_model),
                             "--multilabel", "--modality", "ct"]) == 0
    a, b = (nib.load(tmp_path / f"out{i}" / "labels.nii.gz") for i in (0, 1))
    la, lb = np.asarray(a.dataobj), np.asarray(b.dataobj)
    assert la.shape == lb.shape == src.shape
    assert np.allclose(a.affine, b.affine, atol=1e-5)
    assert len(np.unique(la)) > 1, "the model found something (else the comparison says little)"
    assert np.array_equal(la, lb)
    # a folder of series folders: one case folder each
    shutil.copytree(tmp_path / "series" / "case", tmp_path / "series" / "case2")
    assert segment_main(["-i", str(tmp_path / "series"), "-o", str(tmp_path / "many"), "--ckpt", str(box_model),
                         "--multilabel", "--modality", "ct"]) == 0
    for case in ("case", "case2"):
        assert np.array_equal(np.asarray(nib.load(tmp_path / "many" / case / "labels.nii.gz").dataobj), la)
