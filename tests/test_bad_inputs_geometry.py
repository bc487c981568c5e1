"""Bad-input catalogue, geometry and reviewers' files: images whose geometry cannot be trusted are refused in one
line (exit 2), and a rerun never overwrites or deletes an output a reviewer edited.

Refused images: a header with neither qform nor sform; pixdim 0 or NaN in a spatial axis (with a valid sform);
complex voxels; RGB voxels; a 4D file of several volumes; a 3^3 image (fewer than 4 voxels per axis); an image
whose resampled grid is smaller than the backbone's total stride.
Reviewers' files: an edited ``labels.nii.gz`` (single file and folder runs) survives byte-identical and the
refusal names it; ``--keep-edited`` keeps it and writes ``labels.new.nii.gz``; an unedited rerun works as before.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from cfseg.apps.segment import main as segment_main
from cfseg.data.transforms import Preprocessing
from cfseg.module import CFSegModule
from cfseg.outputs import EditedFilesError
from cfseg.segmentation import SegmentError, load_input, network_stride, segment

BACKBONE = {"class_path": "monai.networks.nets.UNet",
            "init_args": {"spatial_dims": 3, "in_channels": 1, "out_channels": 8, "channels": [8, 16, 16],
                          "strides": [2, 2], "num_res_units": 0}}
SPACING = (4.0, 4.0, 4.0)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """An untrained CT checkpoint whose backbone downsamples by 4."""
    pre = {"ct": Preprocessing(modality="ct", spacing=SPACING).to_dict()}
    torch.manual_seed(0)
    module = CFSegModule(class_names=["liver", "spleen"], backbone=BACKBONE, feature_channels=8,
                         roi_size=(16, 16, 16), preprocessing=pre)
    c = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}
    module.on_save_checkpoint(c)
    path = tmp_path_factory.mktemp("geom_ckpt") / "ct.ckpt"
    torch.save(c, path)
    return path


def _ct(shape=(16, 16, 16), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = np.full(shape, -1000.0, np.float32)
    img[tuple(slice(s // 5, s - s // 5) for s in shape)] = 40.0
    return (img + rng.normal(0, 10, shape)).astype(np.float32)


def _save(path: Path, data: np.ndarray, affine: np.ndarray | None = None, hdr=None) -> Path:
    affine = np.diag([4.0, 4.0, 4.0, 1.0]) if affine is None else affine
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(data, affine, hdr)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, str(path))
    return path


def _no_forms(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(_ct(), None)
    img.header.set_zooms((4.0, 4.0, 4.0))
    img.header["qform_code"], img.header["sform_code"] = 0, 0
    nib.save(img, str(path))
    return path


def _pixdim(path: Path, value: float) -> Path:
    _save(path, _ct())
    raw = bytearray(path.read_bytes())  # an uncompressed .nii: pixdim[1] at byte 80 (float32)
    raw[80:84] = np.float32(value).tobytes()
    path.write_bytes(bytes(raw))
    return path


def _rgb(path: Path) -> Path:
    rgb = np.zeros((16, 16, 16), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    rgb["R"] = np.random.default_rng(0).integers(0, 255, (16, 16, 16))
    return _save(path, rgb)


KINDS = {  # kind -> (make(path), path name, expected fragment)
    "no_qform_no_sform": (_no_forms, "noform.nii.gz", "neither a qform nor an sform"),
    "zero_pixdim": (lambda p: _pixdim(p, 0.0), "zero.nii", "pixdim[1:4] is 0 x 4 x 4"),
    "nan_pixdim": (lambda p: _pixdim(p, np.nan), "nan.nii", "zero or non-finite spacing"),
    "complex": (lambda p: _save(p, (_ct() + 1j * _ct()).astype(np.complex64)), "c.nii.gz", "complex-valued voxels"),
    "rgb": (_rgb, "rgb.nii.gz", "multi-channel voxels (data type RGB"),
    "multi_volume": (lambda p: _save(p, np.stack([_ct(), _ct(seed=1)], -1)), "t.nii.gz",
                     "got shape (16, 16, 16, 2): 2 volumes or channels"),
    "3_cubed": (lambda p: _save(p, _ct((3, 3, 3))), "tiny.nii.gz", "fewer than 4 along an axis"),
    "below_network_stride": (lambda p: _save(p, _ct((12, 12, 6)), np.diag([2.0, 2.0, 2.0, 1.0])), "thin.nii.gz",
                             "the network downsamples by 4; it needs at least 4"),
}


def _run(args: list[str], capsys) -> tuple[int, str, str]:
    rc = segment_main(args)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_untrustworthy_geometry_is_refused(kind, ckpt, tmp_path, capsys):
    make, name, fragment = KINDS[kind]
    path = make(tmp_path / "in" / name)
    out = tmp_path / "out"
    rc, _, err = _run(["-i", str(path), "-o", str(out), "--ckpt", str(ckpt), "--modality", "ct"], capsys)
    assert rc == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"cfseg-segment: error: {path}: "), err
    assert fragment in lines[0] and "Traceback" not in err, err
    assert not out.exists()
    with pytest.raises(SegmentError, match="^" + str(path)):
        segment(path, ckpt, modality="ct")


def test_header_problems_are_found_before_the_voxels_are_read(tmp_path):
    path = _no_forms(tmp_path / "noform.nii")
    raw = path.read_bytes()
    path.write_bytes(raw[:400])  # the voxels are gone: only the header check can answer
    with pytest.raises(SegmentError, match="neither a qform nor an sform"):
        load_input(path)
    path = _pixdim(tmp_path / "zero.nii", 0.0)
    path.write_bytes(path.read_bytes()[:400])
    with pytest.raises(SegmentError, match="pixdim"):
        load_input(path)


def test_network_stride_and_small_but_valid_image(ckpt, tmp_path, capsys):
    from cfseg.module import load_checkpoint

    assert network_stride(load_checkpoint(str(ckpt))) == 4
    path = _save(tmp_path / "small.nii.gz", _ct((8, 8, 8)))  # 8 voxels per axis at 4 mm: enough for stride 4
    rc, _, err = _run(["-i", str(path), "-o", str(tmp_path / "o"), "--ckpt", str(ckpt), "--modality", "ct"], capsys)
    assert rc == 0, err


# ---------------------------------------------------------------------------------------------------------
# Reviewers' files
# ---------------------------------------------------------------------------------------------------------
def _edit(path: Path) -> bytes:
    img = nib.load(str(path))
    data = np.asarray(img.dataobj).copy()
    data[0, 0, 0] = 2 if data[0, 0, 0] != 2 else 1
    nib.save(nib.Nifti1Image(data, img.affine, img.header), str(path))
    return path.read_bytes()


def test_single_file_rerun_never_touches_an_edited_mask(ckpt, tmp_path, capsys):
    image = _save(tmp_path / "ct.nii.gz", _ct())
    out = tmp_path / "review"
    args = ["-i", str(image), "-o", str(out), "--ckpt", str(ckpt), "--modality", "ct", "--multilabel"]
    assert _run(args, capsys)[0] == 0
    manifest = json.loads((out / ".cfseg-segment.json").read_text())
    assert manifest["files"] == ["labels.nii.gz", "labels.json"]
    assert set(manifest["sha256"]) == {"labels.nii.gz", "labels.json"}
    assert _run(args, capsys)[0] == 0  # an unedited rerun works as before
    edited = _edit(out / "labels.nii.gz")
    json_before = (out / "labels.json").read_bytes()
    rc, _, err = _run(args, capsys)
    assert rc == 2
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0] == (f"cfseg-segment: error: {image}: {out}: labels.nii.gz differs from what cfseg-segment wrote "
                        f"(edited by a reviewer, or not written by it): nothing was written or deleted; move it away, "
                        f"choose another -o, or rerun with --keep-edited to keep it and write the new outputs beside "
                        f"it (e.g. labels.new.nii.gz)")
    assert (out / "labels.nii.gz").read_bytes() == edited
    assert (out / "labels.json").read_bytes() == json_before
    # a run without --multilabel would remove labels.nii.gz: refused too
    rc, _, err = _run([a for a in args if a != "--multilabel"], capsys)
    assert rc == 2 and "labels.nii.gz differs" in err
    assert (out / "labels.nii.gz").read_bytes() == edited
    # --keep-edited: the edited file stays, the new one goes beside it, and stays protected afterwards
    rc, _, err = _run([*args, "--keep-edited"], capsys)
    assert rc == 0, err
    assert f"cfseg-segment: warning: {out / 'labels.nii.gz'}: differs from what cfseg-segment wrote, kept as it is " \
           f"(--keep-edited); the new output is {out / 'labels.new.nii.gz'}" in err
    assert (out / "labels.nii.gz").read_bytes() == edited
    assert sorted(p.name for p in out.iterdir()) == [".cfseg-segment.json", "labels.json", "labels.new.nii.gz",
                                                     "labels.nii.gz"]
    assert json.loads((out / ".cfseg-segment.json").read_text())["files"] == ["labels.new.nii.gz", "labels.json"]
    assert _run(args, capsys)[0] == 2  # still refused without the flag
    assert _run([*args, "--keep-edited"], capsys)[0] == 0  # labels.new.nii.gz is cfseg's own: replaced
    assert (out / "labels.nii.gz").read_bytes() == edited
    assert not (out / "labels.new2.nii.gz").exists()
    # no longer an output name: the kept file is left alone, like any file cfseg did not write
    assert _run([a for a in args if a != "--multilabel"], capsys)[0] == 0
    assert (out / "labels.nii.gz").read_bytes() == edited
    assert sorted(p.name for p in out.iterdir()) == [".cfseg-segment.json", "labels.nii.gz", "liver.nii.gz",
                                                     "spleen.nii.gz"]


def test_folder_rerun_never_deletes_an_edited_file(ckpt, tmp_path, capsys):
    d = tmp_path / "in"
    for n in ("a.nii.gz", "b.nii.gz"):
        _save(d / n, _ct(seed=len(n)))
    out = tmp_path / "out"
    args = ["-i", str(d), "-o", str(out), "--ckpt", str(ckpt), "--modality", "ct", "--multilabel"]
    assert _run(args, capsys)[0] == 0
    assert sorted(p.name for p in (out / "a").iterdir()) == [".cfseg-segment.json", "labels.json", "labels.nii.gz"]
    assert _run(args, capsys)[0] == 0  # unedited: swapped in whole as before
    edited = _edit(out / "a" / "labels.nii.gz")
    (out / "b" / "notes.txt").write_text("a reviewer's note")
    rc, _, err = _run(args, capsys)
    assert rc == 1
    assert f"{out / 'a'}: labels.nii.gz differs from what cfseg-segment wrote" in err
    assert f"{out / 'b'}: notes.txt differs from what cfseg-segment wrote" in err
    assert (out / "a" / "labels.nii.gz").read_bytes() == edited
    assert (out / "b" / "notes.txt").read_text() == "a reviewer's note"
    rc, _, err = _run([*args, "--keep-edited"], capsys)
    assert rc == 0, err
    assert (out / "a" / "labels.nii.gz").read_bytes() == edited
    assert sorted(p.name for p in (out / "a").iterdir()) == [".cfseg-segment.json", "labels.json",
                                                             "labels.new.nii.gz", "labels.nii.gz"]
    assert (out / "b" / "notes.txt").read_text() == "a reviewer's note"
    assert sorted(p.name for p in (out / "b").iterdir()) == [".cfseg-segment.json", "labels.json", "labels.nii.gz",
                                                             "notes.txt"]


def test_manifest_without_hashes_counts_as_changed(ckpt, tmp_path, capsys):
    image = _save(tmp_path / "ct.nii.gz", _ct())
    out = tmp_path / "o"
    args = ["-i", str(image), "-o", str(out), "--ckpt", str(ckpt), "--modality", "ct", "--classes", "liver"]
    assert _run(args, capsys)[0] == 0
    (out / ".cfseg-segment.json").write_text(json.dumps({"input": str(image), "files": ["liver.nii.gz"]}))
    before = (out / "liver.nii.gz").read_bytes()
    rc, _, err = _run(args, capsys)
    assert rc == 2 and "liver.nii.gz differs" in err
    assert (out / "liver.nii.gz").read_bytes() == before
    assert issubclass(EditedFilesError, SegmentError)
