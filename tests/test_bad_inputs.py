"""A catalogue of bad inputs: each kind fails in one line, with the documented exit code, leaving nothing behind.

The ``cfseg-segment`` cases check: exit code 2 (1 for a folder run in which some cases failed), stderr is
exactly one line ``cfseg-segment: error: <file>: <problem>`` naming the file and the problem (no
traceback), and ``-o`` holds no half-written output (no temporary directory, no mask, no lock).

cfseg-segment side (input images):
    missing file; empty file (0 bytes); non-NIfTI bytes named ``.nii.gz``; truncated ``.nii.gz`` (nibabel reads
    the header, the data read fails); a folder named ``.nii.gz``; a ``.txt`` file; a 2D image; a 4D image;
    NaN intensities; zero affine; singular affine; non-finite affine; a header declaring 2000^3 voxels; absurd
    spacing (1e6 mm); tiny spacing (1e-5 mm); a resampled grid above ``--max-voxels``; an input above
    ``--max-voxels``; a constant image; a near-empty image (one voxel set); an image that looks like MRI for a
    CT-only checkpoint; an image whose modality is unclear.
cfseg-segment side (arguments and output):
    ``--classes background``; an unknown class; ``--box`` out of range; a malformed ``--box`` (argparse, one
    line); an input folder without NIfTI files; an output path that is an existing file; a read-only output
    folder; a second run into a locked ``-o``; a folder whose output names cannot be made unique.
Checkpoint loading side:
    missing checkpoint; a folder as checkpoint; an empty file; bytes that are not a checkpoint; a truncated
    checkpoint; a torch file without cfseg metadata; a checkpoint whose weights do not fit its network; a
    checkpoint naming ``os.makedirs`` or ``os.system`` as its backbone (refused before anything is called: no
    ``pwned`` file or folder appears).
Folder runs:
    good cases are written, failed ones listed at the end (one line each plus a count), exit code 1.
cfseg fit and incremental stages (``cfseg.apps.cli.run``: exit 2, one line ``cfseg: error: ...``):
    ``--ckpt_path`` of a checkpoint with another vocabulary or of a file that is no checkpoint; a previous
    checkpoint naming code as its backbone (nothing created); a stage whose CT preprocessing differs from the
    one the checkpoint learnt; ``new_classes`` that differ from the classes the data add.
cfseg-protocol (the console entry: exit 2, one line ``cfseg-protocol: error: ...``):
    malformed YAML; an unknown strategy; a stage that is a string; a missing base config; a negative max_steps;
    a missing dataset.
Data layer (``KINDS`` below: undeclared label value, truncated image or label, truncated uncompressed data,
corrupt gzip, empty image, shape/spacing/origin mismatch, singular affine, NaN, inf, 4D image, missing label or
channel, unreadable or label-less dataset.json, unknown class in partial_labels.json, missing MSD image, stray
label, RGB24 and complex images): each gives ONE line naming the file and the problem.

    Every kind breaks one case of a small valid nnU-Net dataset. Three paths must report it:
    - the training path (``SegDataModule`` reading the dataset and filling its cache, as ``cfseg fit`` does), which
      raises one :class:`DatasetError`;
    - ``cfseg fit`` itself (a subprocess, for the kinds that once aborted or printed a long traceback): exit status 2
      and one line ``cfseg: error: <file>: <problem>``;
    - ``cfseg-data-summary --check``, which reads every voxel and reports every problem (exit status 2).
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import make_nnunet, write_nifti

from cfseg.apps import data_summary
from cfseg.apps.cli import run as cli_run
from cfseg.apps.segment import main as segment_main
from cfseg.data.datamodule import CheckedCacheDataset, DatasetConfig, SegDataModule
from cfseg.data.formats import DatasetError
from cfseg.data.transforms import Preprocessing
from cfseg.module import CFSegModule
from cfseg.outputs import OutputLock

BACKBONE = {"class_path": "monai.networks.nets.UNet",
            "init_args": {"spatial_dims": 3, "in_channels": 1, "out_channels": 8, "channels": [8, 16],
                          "strides": [2], "num_res_units": 0}}
SPACING = (4.0, 4.0, 4.0)


def _save(module: CFSegModule, path: Path) -> Path:
    ckpt = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}
    module.on_save_checkpoint(ckpt)
    torch.save(ckpt, path)
    return path


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    """Untrained checkpoints (the failures come before the network matters): CT+MRI and CT-only."""
    tmp = tmp_path_factory.mktemp("bad_ckpt")
    pre = {m: Preprocessing(modality=m, spacing=SPACING).to_dict() for m in ("ct", "mri")}
    torch.manual_seed(0)
    both = CFSegModule(class_names=["liver", "spleen"], backbone=BACKBONE, feature_channels=8,
                       roi_size=(16, 16, 16), preprocessing=pre)
    out = {"both": _save(both, tmp / "both.ckpt")}
    both.preprocessing = {"ct": pre["ct"]}
    out["ct"] = _save(both, tmp / "ct_only.ckpt")
    return out


def _ct(shape=(16, 16, 16), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = np.full(shape, -1000.0, np.float32)
    img[3:-3, 3:-3, 3:-3] = 40.0
    return (img + rng.normal(0, 10, shape)).astype(np.float32)


def _mri(shape=(16, 16, 16), seed=0) -> np.ndarray:
    return np.abs(np.random.default_rng(seed).normal(300, 100, shape)).astype(np.float32)


def _aff(spacing: float = 4.0) -> np.ndarray:
    return np.diag([spacing] * 3 + [1.0])


def _header_only(path: Path, shape, spacing=1.0) -> Path:
    """A .nii whose header declares ``shape`` but holds (almost) no data."""
    hdr = nib.Nifti1Header()
    hdr.set_data_dtype(np.int16)
    hdr.set_data_shape(shape)
    hdr.set_zooms((spacing,) * len(shape))
    hdr.set_sform(np.diag([spacing] * 3 + [1.0]), code=1)
    hdr["vox_offset"] = 352
    path.write_bytes(hdr.binaryblock + b"\0" * 4 + b"\0" * 64)
    return path


def _with_affine(path: Path, affine: np.ndarray) -> Path:
    """A valid image whose sform (and qform) hold ``affine`` verbatim, however broken."""
    img = nib.Nifti1Image(_ct(), np.eye(4))
    hdr = img.header
    hdr["sform_code"], hdr["qform_code"] = 1, 0
    hdr["srow_x"], hdr["srow_y"], hdr["srow_z"] = affine[0], affine[1], affine[2]
    nib.save(nib.Nifti1Image(_ct(), None, hdr), str(path))
    return path


def _bad_input(kind: str, tmp: Path) -> tuple[Path, list[str], str]:
    """(input path, extra arguments, expected message fragment) for one kind of bad image."""
    d = tmp / "in"
    d.mkdir(exist_ok=True)
    if kind == "missing":
        return d / "nope.nii.gz", [], "file not found"
    if kind == "empty_file":
        (d / "e.nii.gz").write_bytes(b"")
        return d / "e.nii.gz", [], "empty file"
    if kind == "not_nifti_content":
        (d / "x.nii.gz").write_bytes(b"hello, I am not an image" * 20)
        return d / "x.nii.gz", [], "not a readable NIfTI file"
    if kind == "truncated":
        good = write_nifti(d / "good.nii.gz", _ct((24, 24, 24)))
        raw = good.read_bytes()
        (d / "cut.nii.gz").write_bytes(raw[: len(raw) // 2])
        return d / "cut.nii.gz", [], "image data cannot be read"
    if kind == "folder_named_nifti":
        (d / "dir.nii.gz").mkdir()
        return d / "dir.nii.gz", [], "is a folder, not a NIfTI file"
    if kind == "txt_suffix":
        (d / "notes.txt").write_text("x")
        return d / "notes.txt", [], "not a NIfTI file"
    if kind == "2d":
        return write_nifti(d / "flat.nii.gz", np.ones((8, 8), np.float32)), [], "expected a 3D image"
    if kind == "4d":
        return write_nifti(d / "t.nii.gz", np.ones((8, 8, 8, 3), np.float32)), [], "got shape (8, 8, 8, 3)"
    if kind == "nan":
        arr = _ct()
        arr[3, 3, 3] = np.nan
        return write_nifti(d / "nan.nii.gz", arr, _aff()), [], "1 NaN/infinite intensities"
    if kind == "zero_affine":
        return _with_affine(d / "z.nii.gz", np.zeros((4, 4))), [], "affine is singular"
    if kind == "singular_affine":
        a = np.diag([4.0, 4.0, 4.0, 1.0])
        a[:3, 2] = a[:3, 0]  # two parallel axes
        return _with_affine(d / "s.nii.gz", a), [], "affine is singular"
    if kind == "nonfinite_affine":
        a = _aff()
        a[0, 3] = np.inf
        return _with_affine(d / "inf.nii.gz", a), [], "NaN/infinite entries"
    if kind == "huge_header":
        return _header_only(d / "huge.nii", (2000, 2000, 2000)), [], "more than the limit"
    if kind == "absurd_spacing":
        return write_nifti(d / "far.nii.gz", _ct(), _aff(1e6)), [], "outside (0.001, 100) mm"
    if kind == "tiny_spacing":
        return write_nifti(d / "near.nii.gz", _ct(), _aff(1e-5)), [], "outside (0.001, 100) mm"
    if kind == "resampled_too_large":  # 8^3 voxels of 20 mm -> 40^3 at 4 mm
        return (write_nifti(d / "coarse.nii.gz", _ct((8, 8, 8)), _aff(20.0)), ["--max-voxels", "10000"],
                "resampled to 4x4x4 mm")
    if kind == "input_too_large":
        return write_nifti(d / "big.nii.gz", _ct(), _aff()), ["--max-voxels", "1000"], "more than the limit 1,000"
    if kind == "constant":
        return write_nifti(d / "c.nii.gz", np.full((16, 16, 16), 7.0, np.float32), _aff()), [], "constant image"
    if kind == "near_empty":
        arr = np.zeros((16, 16, 16), np.float32)
        arr[2, 2, 2] = 5.0
        return write_nifti(d / "dot.nii.gz", arr, _aff()), [], "near-empty image"
    if kind == "unclear_modality":
        arr = np.random.default_rng(0).normal(0, 1, (16, 16, 16)).astype(np.float32)  # z-scored: neither rule
        return write_nifti(d / "z.nii.gz", arr, _aff()), [], "cannot tell CT from MRI"
    if kind == "mri_for_ct_checkpoint":
        return write_nifti(d / "mr.nii.gz", _mri(), _aff()), ["CT_ONLY"], "looks like mri"
    if kind == "classes_background":
        return write_nifti(d / "ct.nii.gz", _ct(), _aff()), ["--classes", "background"], "is the background"
    if kind == "unknown_class":
        return write_nifti(d / "ct.nii.gz", _ct(), _aff()), ["--classes", "livr"], "unknown class 'livr'"
    if kind == "box_out_of_range":
        return (write_nifti(d / "ct.nii.gz", _ct(), _aff()), ["--box", "0", "0", "0", "99", "4", "4"],
                "--box axis 0")
    if kind == "folder_without_nifti":
        (d / "notes.txt").write_text("x")
        return d, [], "no .nii/.nii.gz files"
    if kind == "unresolvable_names":  # a.nii and a.nii.gz disambiguate to a_nii, which a_nii.nii.gz already has
        for n in ("a.nii", "a.nii.gz", "a_nii.nii.gz"):
            write_nifti(d / n, _ct(), _aff())
        return d, [], "would be the same as"
    raise AssertionError(kind)


IMAGE_KINDS = ["missing", "empty_file", "not_nifti_content", "truncated", "folder_named_nifti", "txt_suffix", "2d",
               "4d", "nan", "zero_affine", "singular_affine", "nonfinite_affine", "huge_header", "absurd_spacing",
               "tiny_spacing", "resampled_too_large", "input_too_large", "constant", "near_empty",
               "unclear_modality", "mri_for_ct_checkpoint", "classes_background", "unknown_class",
               "box_out_of_range", "folder_without_nifti", "unresolvable_names"]


def _run(args: list[str], capsys) -> tuple[int, str, str]:
    try:
        rc = segment_main(args)
    except SystemExit as e:  # argparse
        rc = e.code
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def _assert_one_line(err: str, name: str, fragment: str) -> None:
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("cfseg-segment: error: ") and "Traceback" not in err, err
    assert name in lines[0] and fragment in lines[0], err


def _assert_nothing_left(out: Path) -> None:
    if out.exists():
        left = sorted(p.name for p in out.rglob("*"))
        assert not left, f"left behind in -o: {left}"


@pytest.mark.parametrize("kind", IMAGE_KINDS)
def test_bad_image_or_argument(kind, ckpts, tmp_path, capsys):
    path, extra, fragment = _bad_input(kind, tmp_path)
    ckpt = ckpts["both"]
    if extra[:1] == ["CT_ONLY"]:
        ckpt, extra = ckpts["ct"], extra[1:]
    out = tmp_path / "out"
    rc, _, err = _run(["-i", str(path), "-o", str(out), "--ckpt", str(ckpt), *extra], capsys)
    assert rc == 2, err
    named = ckpt if kind in ("unknown_class", "classes_background") else path  # class errors name the checkpoint
    _assert_one_line(err, str(named) if kind != "unresolvable_names" else str(path), fragment)
    _assert_nothing_left(out)
    assert not out.exists()  # a run that wrote nothing leaves no -o folder it created


def test_malformed_box_is_one_line(ckpts, tmp_path, capsys):
    img = write_nifti(tmp_path / "ct.nii.gz", _ct(), _aff())
    rc, _, err = _run(["-i", str(img), "-o", str(tmp_path / "o"), "--ckpt", str(ckpts["both"]), "--box", "1", "2"],
                      capsys)
    assert rc == 2 and len(err.splitlines()) == 1 and err.startswith("cfseg-segment: error: ") and "--box" in err


def test_output_path_is_a_file(ckpts, tmp_path, capsys):
    img = write_nifti(tmp_path / "ct.nii.gz", _ct(), _aff())
    target = tmp_path / "masks"
    target.write_text("keep me")
    rc, _, err = _run(["-i", str(img), "-o", str(target), "--ckpt", str(ckpts["both"])], capsys)
    assert rc == 2
    _assert_one_line(err, str(target), "exists and is not a folder")
    assert target.read_text() == "keep me"


def test_read_only_output_folder(ckpts, tmp_path, capsys):
    img = write_nifti(tmp_path / "ct.nii.gz", _ct(), _aff())
    out = tmp_path / "ro"
    out.mkdir()
    if os.geteuid() == 0:  # root ignores permission bits; the immutable attribute stops even root
        if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(out)], capture_output=True).returncode:
            pytest.skip("running as root and cannot make a folder immutable here (chattr +i unsupported)")
    else:
        out.chmod(0o555)
    try:
        rc, _, err = _run(["-i", str(img), "-o", str(out), "--ckpt", str(ckpts["both"])], capsys)
    finally:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(out)], capture_output=True)
        out.chmod(0o755)
    assert rc == 2
    _assert_one_line(err, str(out), "cannot write into the output folder")
    _assert_nothing_left(out)


def test_second_run_into_a_locked_output(ckpts, tmp_path, capsys):
    img = write_nifti(tmp_path / "ct.nii.gz", _ct(), _aff())
    out = tmp_path / "out"
    out.mkdir()
    with OutputLock(out):
        rc, _, err = _run(["-i", str(img), "-o", str(out), "--ckpt", str(ckpts["both"])], capsys)
    assert rc == 2
    _assert_one_line(err, str(out), "another cfseg-segment run is writing into this folder")
    _assert_nothing_left(out)


def _bad_ckpt(kind: str, tmp: Path, good: Path) -> tuple[Path, str]:
    p = tmp / f"{kind}.ckpt"
    if kind == "missing":
        return p, "checkpoint not found"
    if kind == "folder":
        p.mkdir()
        return p, "is a folder"
    if kind == "empty":
        p.write_bytes(b"")
        return p, "empty file (0 bytes)"
    if kind == "not_a_checkpoint":
        p.write_bytes(b"not a checkpoint" * 10)
        return p, "not a loadable cfseg checkpoint"
    if kind == "truncated":
        raw = good.read_bytes()
        p.write_bytes(raw[: len(raw) // 2])
        return p, "not a loadable cfseg checkpoint: the file is damaged: its zip archive ends early"
    if kind == "no_cfseg_metadata":
        torch.save({"state_dict": {"w": torch.zeros(2)}, "epoch": 3}, p)
        return p, "not a cfseg checkpoint"
    ckpt = torch.load(good, weights_only=True)
    if kind == "weights_do_not_fit":
        ckpt["state_dict"] = {k: v[..., :1] if isinstance(v, torch.Tensor) and v.ndim else v
                              for k, v in ckpt["state_dict"].items()}
        torch.save(ckpt, p)
        return p, ""
    if kind == "backbone_os_makedirs":
        ckpt["hyper_parameters"]["backbone"] = {"class_path": "os.makedirs",
                                                "init_args": {"name": str(tmp / "pwned"), "exist_ok": True}}
        torch.save(ckpt, p)
        return p, "os.makedirs"
    if kind == "backbone_os_system":
        ckpt["hyper_parameters"]["backbone"] = {"class_path": "os.system",
                                                "init_args": {"command": f"touch {tmp / 'pwned'}"}}
        torch.save(ckpt, p)
        return p, "os.system"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["missing", "folder", "empty", "not_a_checkpoint", "truncated", "no_cfseg_metadata",
                                  "weights_do_not_fit", "backbone_os_makedirs", "backbone_os_system"])
def test_bad_checkpoint(kind, ckpts, tmp_path, capsys):
    ckpt, fragment = _bad_ckpt(kind, tmp_path, ckpts["both"])
    img = write_nifti(tmp_path / "ct.nii.gz", _ct(), _aff())
    out = tmp_path / "out"
    rc, _, err = _run(["-i", str(img), "-o", str(out), "--ckpt", str(ckpt)], capsys)
    assert rc == 2, err
    _assert_one_line(err, str(ckpt), fragment)
    assert "weights_only" not in err  # never the unsafe fix torch's message suggests
    assert not (tmp_path / "pwned").exists()  # nothing named by the file was called
    _assert_nothing_left(out)


def test_folder_run_writes_good_cases_and_lists_failed_ones(ckpts, tmp_path, capsys):
    d = tmp_path / "in"
    write_nifti(d / "good_0000.nii.gz", _ct(), _aff())
    write_nifti(d / "flat.nii.gz", np.full((16, 16, 16), 3.0, np.float32), _aff())
    raw = (d / "good_0000.nii.gz").read_bytes()
    (d / "cut.nii.gz").write_bytes(raw[: len(raw) // 2])
    out = tmp_path / "out"
    rc, stdout, err = _run(["-i", str(d), "-o", str(out), "--ckpt", str(ckpts["both"]), "--classes", "liver"], capsys)
    assert rc == 1
    lines = [ln for ln in err.splitlines() if ln.startswith("cfseg-segment:")]
    assert lines[:2] == [ln for ln in lines if ln.startswith("cfseg-segment: error: ")]
    assert str(d / "flat.nii.gz") in lines[0] + lines[1] and str(d / "cut.nii.gz") in lines[0] + lines[1]
    assert lines[-1].startswith("cfseg-segment: 2 of 3 cases failed") and "Traceback" not in err
    assert sorted(p.name for p in out.iterdir()) == ["good"]
    assert sorted(p.name for p in (out / "good").iterdir()) == [".cfseg-segment.json", "liver.nii.gz"]  # + manifest
    assert "good_0000.nii.gz: modality ct (detected:" in stdout


# ==== cfseg fit and incremental stages ===================================================================
TINY_CONFIG = Path(__file__).parent / "configs" / "tiny.yaml"


def _fit_args(tmp: Path, dataset: Path, *extra: str) -> list[str]:
    return ["fit", "--config", str(TINY_CONFIG), f"--trainer.logger.init_args.save_dir={tmp}",
            f"--trainer.default_root_dir={tmp}",
            f"--data.datasets={json.dumps([{'path': str(dataset), 'val_fraction': 0.25}])}", *extra]


def _stage_case(kind: str, tmp: Path, ckpts: dict[str, Path], phantom: Path) -> tuple[list[str], str]:
    """Arguments of a ``cfseg fit`` that must fail, and the fragment its one line must hold."""
    if kind == "resume_other_vocabulary":
        return _fit_args(tmp, phantom, f"--ckpt_path={ckpts['ct']}"), "does not know"
    if kind == "ckpt_path_not_a_checkpoint":
        (tmp / "junk.ckpt").write_bytes(b"not a checkpoint")
        return _fit_args(tmp, phantom, f"--ckpt_path={tmp / 'junk.ckpt'}"), "junk.ckpt: not a loadable cfseg checkpoint"
    if kind in ("ckpt_path_truncated", "previous_checkpoint_truncated"):
        raw = ckpts["ct"].read_bytes()
        (tmp / "cut.ckpt").write_bytes(raw[: len(raw) // 2])
        option = "--ckpt_path" if kind == "ckpt_path_truncated" else "--model.previous_checkpoint"
        return (_fit_args(tmp, phantom, f"{option}={tmp / 'cut.ckpt'}"),
                "cut.ckpt: not a loadable cfseg checkpoint: the file is damaged: its zip archive ends early")
    if kind == "previous_checkpoint_runs_code":
        ckpt = torch.load(ckpts["ct"], weights_only=True)
        ckpt["hyper_parameters"]["backbone"] = {"class_path": "os.makedirs", "init_args": {"name": str(tmp / "pwned")}}
        torch.save(ckpt, tmp / "evil.ckpt")
        return _fit_args(tmp, phantom, f"--model.previous_checkpoint={tmp / 'evil.ckpt'}"), "refusing to build"
    # the checkpoints' backbone is tiny.yaml's; they learnt CT at 4 mm, tiny.yaml resamples to 11 mm
    if kind == "stage_with_another_ct_preprocessing":
        return _fit_args(tmp, phantom, f"--model.previous_checkpoint={ckpts['ct']}"), "two preprocessings for 'ct'"
    if kind == "new_classes_not_in_data":
        return (_fit_args(tmp, phantom, f"--model.previous_checkpoint={ckpts['ct']}", "--data.spacing=[4.0, 4.0, 4.0]",
                          "--model.new_classes=[aorta]"), "differ from the classes the data adds")
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["resume_other_vocabulary", "ckpt_path_not_a_checkpoint", "ckpt_path_truncated",
                                  "previous_checkpoint_truncated",
                                  "previous_checkpoint_runs_code", "stage_with_another_ct_preprocessing",
                                  "new_classes_not_in_data"])
def test_bad_fit_or_stage(kind, ckpts, tiny_phantoms, tmp_path, capsys):
    args, fragment = _stage_case(kind, tmp_path, ckpts, tiny_phantoms[0])
    assert cli_run(args) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("cfseg: error:")]
    assert len(err) == 1 and fragment in err[0] and "weights_only" not in err[0], err
    assert not (tmp_path / "pwned").exists()
    assert not list((tmp_path / "logs").rglob("*.ckpt"))  # nothing trained


# ==== data layer =========================================================================================
ROOT = Path(__file__).resolve().parents[1]
CFSEG = Path(sys.executable).with_name("cfseg")
SHAPE = (16, 16, 16)


def _label(root: Path, case: str = "case1") -> Path:
    return root / "labelsTr" / f"{case}.nii.gz"


def _image(root: Path, case: str = "case1", channel: int = 0) -> Path:
    return root / "imagesTr" / f"{case}_{channel:04d}.nii.gz"


def _edit(path: Path, fn) -> None:
    img = nib.load(str(path))
    write_nifti(path, fn(np.asarray(img.dataobj).copy()), img.affine)


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _write_singular(path: Path) -> None:
    """A NIfTI file whose sform has a zero column (nibabel refuses to write one through the affine)."""
    img = nib.Nifti1Image(np.asarray(nib.load(str(path)).dataobj), np.eye(4))
    img.header.set_sform(np.diag([1.0, 1.0, 0.0, 1.0]), code=1)
    img.header.set_qform(None, code=0)
    img.update_header = lambda: None  # keep the broken sform as written
    nib.save(img, str(path))


def _set_voxel(value):
    def fn(a):
        a[0, 0, 0] = value
        return a
    return fn


def _json(root: Path, fn) -> None:
    meta = json.loads((root / "dataset.json").read_text())
    fn(meta)
    (root / "dataset.json").write_text(json.dumps(meta))


def _write_dtype(path: Path, dtype) -> None:
    """Rewrite ``path`` (same affine and shape) with zeros of a data type cfseg cannot read as intensities."""
    ref = nib.load(str(path))
    nib.save(nib.Nifti1Image(np.zeros(ref.shape, dtype=dtype), ref.affine), str(path))


def _two_channels_one_missing(root: Path) -> None:
    _json(root, lambda m: m["channel_names"].update({"1": "CT"}))
    for i in range(3):
        if i != 1:
            _image(root, f"case{i}", 1).write_bytes(_image(root, f"case{i}").read_bytes())


# kind -> (how to break the dataset, file the message names (relative to the dataset), what it must say)
KINDS = {
    "undeclared_label_value": (lambda r: _edit(_label(r), _set_voxel(5)), "labelsTr/case1.nii.gz",
                               r"label values \[5\] are not declared in dataset.json \(declared: \[1, 2\]\)"),
    "truncated_image": (lambda r: _truncate(_image(r)), "imagesTr/case1_0000.nii.gz", r"truncated file"),
    "truncated_label": (lambda r: _truncate(_label(r)), "labelsTr/case1.nii.gz", r"truncated file"),
    "truncated_uncompressed_data": (
        lambda r: _image(r).write_bytes(gzip.compress(gzip.decompress(_image(r).read_bytes())[:2000])),
        "imagesTr/case1_0000.nii.gz", r"truncated file"),
    "corrupt_gzip": (lambda r: _image(r).write_bytes(_image(r).read_bytes()[:10] + bytes(64)
                                                     + _image(r).read_bytes()[74:]),
                     "imagesTr/case1_0000.nii.gz", r"corrupt gzip data|not a NIfTI file"),
    "empty_image_file": (lambda r: _image(r).write_bytes(b""), "imagesTr/case1_0000.nii.gz", r"empty file"),
    "shape_mismatch": (lambda r: write_nifti(_label(r), np.zeros((8, 8, 8), np.uint8)), "labelsTr/case1.nii.gz",
                       r"shape \(8, 8, 8\) does not match case1_0000.nii.gz \(16, 16, 16\)"),
    "spacing_mismatch": (lambda r: write_nifti(_label(r), np.zeros(SHAPE, np.uint8), np.diag([2.0, 1, 1, 1])),
                         "labelsTr/case1.nii.gz", r"affine does not match case1_0000.nii.gz \(spacing \(2.0"),
    "origin_mismatch": (
        lambda r: write_nifti(_label(r), np.zeros(SHAPE, np.uint8),
                              np.array([[1, 0, 0, 5.0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])),
        "labelsTr/case1.nii.gz", r"affine does not match case1_0000.nii.gz \(origin \(5.0"),
    "singular_affine": (
        lambda r: [_write_singular(p) for p in (_image(r), _label(r))],
        "imagesTr/case1_0000.nii.gz", r"affine is singular"),
    "nan_image": (lambda r: _edit(_image(r), _set_voxel(np.nan)), "imagesTr/case1_0000.nii.gz",
                  r"1 NaN/infinite intensities"),
    "inf_image": (lambda r: _edit(_image(r), _set_voxel(np.inf)), "imagesTr/case1_0000.nii.gz",
                  r"1 NaN/infinite intensities"),
    "4d_image": (lambda r: write_nifti(_image(r), np.zeros((*SHAPE, 2), np.float32)), "imagesTr/case1_0000.nii.gz",
                 r"expected a 3D volume, got shape \(16, 16, 16, 2\)"),
    "rgb24_image": (lambda r: _write_dtype(_image(r), [("R", "u1"), ("G", "u1"), ("B", "u1")]),
                    "imagesTr/case1_0000.nii.gz", r"RGB24 data: cfseg reads single-channel scalar images"),
    "complex_image": (lambda r: _write_dtype(_image(r), np.complex64), "imagesTr/case1_0000.nii.gz",
                      r"complex data \(complex64\): cfseg reads single-channel scalar images"),
    "label_file_missing": (lambda r: _label(r).unlink(), "labelsTr/case1.nii.gz", r"file not found \(label of case"),
    "image_channel_missing": (_two_channels_one_missing, "imagesTr/case1_0001.nii.gz",
                              r"file not found \(case 'case1' needs 2 channel"),
    "dataset_json_unreadable": (lambda r: (r / "dataset.json").write_text('{"labels": {"liver": 1,}'),
                                "dataset.json", r"not valid JSON \(.* line 1"),
    "dataset_json_without_labels": (lambda r: _json(r, lambda m: m.pop("labels")), "dataset.json",
                                    r"missing required key 'labels'"),
    "partial_labels_unknown_class": (
        lambda r: (r / "partial_labels.json").write_text(json.dumps(
            {"case0": ["liver"], "case1": ["livr"], "case2": ["spleen"]})),
        "partial_labels.json", r"case 'case1'.*'livr'.*did you mean liver"),
}


def _broken(tmp_path: Path, kind: str) -> tuple[Path, str, str]:
    root = make_nnunet(tmp_path / "Dataset001_bad", {"liver": 1, "spleen": 2}, n_cases=3, shape=SHAPE)
    breaker, rel, pattern = KINDS[kind]
    breaker(root)
    return root, str(root / rel), pattern


def _one_line_naming(message: str, path: str, pattern: str) -> None:
    assert "\n" not in message.strip(), message
    assert message.strip().startswith(f"{path}: ") or f" {path}: " in message, (path, message)
    assert __import__("re").search(pattern, message), (pattern, message)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_training_path_raises_one_line_naming_the_file(tmp_path, kind):
    root, path, pattern = _broken(tmp_path, kind)
    with pytest.raises(DatasetError) as err:
        dm = SegDataModule([DatasetConfig(str(root), val_fraction=0.0, test_fraction=0.0)], spacing=(1.0, 1.0, 1.0),
                           patch_size=(8, 8, 8))
        dm.setup("fit")  # fills the cache: every case is loaded, validated and remapped here
    _one_line_naming(str(err.value), path, pattern)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_summary_check_reports_it(tmp_path, kind, capsys):
    root, path, pattern = _broken(tmp_path, kind)
    assert data_summary.main([str(root), "--check"]) == 2
    lines = capsys.readouterr().out.strip().splitlines()
    hits = [line for line in lines if line.startswith(f"{path}: ")]
    assert hits, (path, lines)
    _one_line_naming(hits[0], path, pattern)


def test_summary_check_reports_every_problem_and_passes_clean_data(tmp_path, capsys):
    root = make_nnunet(tmp_path / "Dataset002_many", {"liver": 1, "spleen": 2}, n_cases=5, shape=SHAPE)
    assert data_summary.main([str(root), "--check"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("OK: 1 dataset(s), 5 cases, 10 files")
    # header-only checks (the plain summary) do not see voxel problems; --check sees all of them
    _edit(_label(root, "case0"), _set_voxel(9))
    _truncate(_image(root, "case2"))
    _edit(_image(root, "case3"), _set_voxel(np.nan))
    _label(root, "case4").unlink()
    (root / "partial_labels.json").write_text(json.dumps({c: ["liver"] for c in ("case0", "case1", "case2", "case3")}
                                                         | {"case4": ["stomach"]}))
    assert data_summary.main([str(root), "--check"]) == 2
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 4, out  # case4's partial label line is not reported: the case is already left out
    for case, what in [("labelsTr/case0.nii.gz", "label values [9]"), ("imagesTr/case2_0000.nii.gz", "truncated"),
                       ("imagesTr/case3_0000.nii.gz", "NaN"), ("labelsTr/case4.nii.gz", "file not found")]:
        assert any(line.startswith(f"{root / case}: ") and what in line for line in out), (case, out)


def test_plain_summary_is_header_only(tmp_path, capsys):
    root = make_nnunet(tmp_path / "Dataset003_voxels", {"liver": 1}, n_cases=3, shape=SHAPE)
    _edit(_image(root), _set_voxel(np.nan))
    assert data_summary.main([str(root)]) == 0  # the voxel problem is --check's (and training's) business
    assert "Dataset003_voxels" in capsys.readouterr().out


def test_dataloader_worker_error_is_one_line(tmp_path):
    """Without the cache, a case fails inside a DataLoader worker process; it still comes back as one line."""
    root, path, pattern = _broken(tmp_path, "undeclared_label_value")
    dm = SegDataModule([DatasetConfig(str(root), val_fraction=0.0, test_fraction=0.0)], spacing=(1.0, 1.0, 1.0),
                       patch_size=(8, 8, 8), batch_size=3, cache="none", num_workers=1)
    with pytest.raises(DatasetError) as err:
        next(iter(dm.train_dataloader()))
    _one_line_naming(str(err.value), path, pattern)
    assert "Traceback" in err.value.worker_traceback


def test_cache_fill_joins_its_threads_before_raising():
    """The cause of the SIGABRT: MONAI's cache fill raised while other pool threads were still transforming cases.

    Here the first case fails at once while the others are slow; when the error arrives, no pool thread may be
    left running (such a thread, caught in a torch op at interpreter shutdown, aborted the process).
    """
    from monai.transforms import Lambda

    from cfseg.data.transforms import CheckedCompose

    def slow_or_bad(x):
        if x["i"] == 0:
            raise DatasetError("case0.nii.gz: label values [5] are not declared in dataset.json")
        time.sleep(0.3)
        return x

    before = set(threading.enumerate())
    with pytest.raises(DatasetError, match="case0.nii.gz"):
        CheckedCacheDataset([{"i": i} for i in range(8)], CheckedCompose([Lambda(slow_or_bad)]), num_workers=4,
                            progress=False)
    assert [t for t in set(threading.enumerate()) - before if t.is_alive()] == []


def _fit(root: Path, cwd: Path) -> subprocess.Popen:
    cwd.mkdir(parents=True, exist_ok=True)
    cmd = [str(CFSEG), "fit", "--config", str(ROOT / "tests" / "configs" / "tiny.yaml"),
           f"--data.datasets=[{{path: {root}, val_fraction: 0, test_fraction: 0}}]", "--data.spacing=[1.0, 1.0, 1.0]"]
    env = {k: v for k, v in os.environ.items() if k != "CFSEG_DEBUG"}
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_cfseg_fit_exits_2_with_one_line(tmp_path):
    """``cfseg fit`` on an undeclared label value (once a SIGABRT in most runs) and on a truncated image."""
    runs = []
    for kind in ("undeclared_label_value", "truncated_image"):
        root, path, pattern = _broken(tmp_path / kind, kind)
        # more and larger cases, the bad one first: other cases are still being resampled when it fails
        for i in range(3, 10):
            write_nifti(_image(root, f"case{i}"), np.zeros((64, 64, 64), np.float32))
            write_nifti(_label(root, f"case{i}"), np.zeros((64, 64, 64), np.uint8))
        runs.append((_fit(root, tmp_path / f"run_{kind}"), path, pattern))
    for proc, path, pattern in runs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 2, (proc.returncode, err[-3000:])
        errors = [line for line in err.splitlines() if line.startswith("cfseg: error:")]
        assert len(errors) == 1 and "Traceback" not in err, err[-3000:]
        assert "args parameter is intended" not in err  # Lightning's warning: cfseg passes its own arguments
        _one_line_naming(errors[0].removeprefix("cfseg: error: "), path, pattern)


def test_missing_image_msd_and_stray_label_nnunet(tmp_path, capsys):
    """An image file named in an MSD dataset.json is missing; an nnU-Net label has no image (--check only)."""
    msd = tmp_path / "Task01_x"
    training = []
    for i in range(2):
        write_nifti(msd / "imagesTr" / f"c{i}.nii.gz", np.full((8, 8, 6), -1000.0, np.float32))  # HU: air
        write_nifti(msd / "labelsTr" / f"c{i}.nii.gz", np.zeros((8, 8, 6), np.uint8))
        training.append({"image": f"./imagesTr/c{i}.nii.gz", "label": f"./labelsTr/c{i}.nii.gz"})
    (msd / "dataset.json").write_text(json.dumps({"modality": {"0": "CT"}, "labels": {"0": "background", "1": "liver"},
                                                  "training": training}))
    (msd / "imagesTr" / "c1.nii.gz").unlink()
    with pytest.raises(DatasetError) as err:
        SegDataModule([DatasetConfig(str(msd))])
    _one_line_naming(str(err.value), str(msd.resolve() / "imagesTr" / "c1.nii.gz"), r"file not found \(training\[1\]")
    nn = make_nnunet(tmp_path / "Dataset004_stray", {"liver": 1}, n_cases=3, shape=SHAPE)
    _image(nn, "case2").unlink()
    assert data_summary.main([str(msd), str(nn), "--check"]) == 2
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 2, out
    assert out[0].startswith(f"{msd.resolve() / 'imagesTr' / 'c1.nii.gz'}: file not found")
    assert out[1].startswith(f"{_label(nn, 'case2')}: label without an image")


# ---- cfseg-protocol: configuration errors are one line, exit 2 -------------------------------------------------
PROTOCOL = Path(sys.executable).with_name("cfseg-protocol")


def _protocol_file(kind: str, tmp: Path) -> tuple[Path, str]:
    """A protocol YAML broken in one way, and the pattern its one-line error must match."""
    good = {"base_config": str(ROOT / "configs" / "incremental" / "base.yaml"), "output": str(tmp / "out"),
            "seeds": [0], "max_steps": 2, "strategies": ["finetune"],
            "stages": [{"name": "s0", "datasets": [{"path": str(tmp / "Dataset001_missing")}]}]}
    spec, pattern = json.loads(json.dumps(good)), ""
    if kind == "malformed_yaml":
        text = "base_config: [unclosed\n"
        pattern = r"not valid YAML \(line 2"
    else:
        if kind == "unknown_strategy":
            spec["strategies"], pattern = ["nosuchstrategy"], r"strategies\[0\]\.strategy 'nosuchstrategy' unknown"
        elif kind == "stage_is_a_string":
            spec["stages"], pattern = ["s0"], r"stages\[0\] is 's0': a stage is a mapping"
        elif kind == "missing_base_config":
            spec["base_config"], pattern = str(tmp / "none.yaml"), r"base_config .*none\.yaml not found"
        elif kind == "negative_max_steps":
            spec["max_steps"], pattern = -3, r"max_steps is -3: give a positive step budget"
        elif kind == "missing_dataset":
            pattern = r"Dataset001_missing: dataset folder not found"
        text = json.dumps(spec)
    path = tmp / f"{kind}.yaml"
    tmp.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path, pattern


PROTOCOL_KINDS = ["malformed_yaml", "unknown_strategy", "stage_is_a_string", "missing_base_config",
                  "negative_max_steps", "missing_dataset"]


def test_cfseg_protocol_errors_are_one_line_exit_2(tmp_path):
    """Every configuration error of ``cfseg-protocol`` (the console entry) ends in one line and exit status 2."""
    env = {k: v for k, v in os.environ.items() if k != "CFSEG_DEBUG"}
    runs = []
    for kind in PROTOCOL_KINDS:
        path, pattern = _protocol_file(kind, tmp_path / kind)
        proc = subprocess.Popen([str(PROTOCOL), "--config", str(path)], cwd=tmp_path, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        runs.append((kind, proc, pattern))
    for kind, proc, pattern in runs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 2, (kind, proc.returncode, err[-3000:])
        errors = [line for line in err.splitlines() if line.startswith("cfseg-protocol: error:")]
        assert len(errors) == 1 and "Traceback" not in err, (kind, err[-3000:])
        assert re.search(pattern, errors[0]), (kind, errors[0])
        assert "args parameter is intended" not in err, (kind, err[-3000:])  # cfseg passes its own arguments


def test_cfseg_protocol_debug_keeps_the_traceback(tmp_path, monkeypatch):
    from cfseg.apps.protocol import main as protocol_main

    path, _ = _protocol_file("stage_is_a_string", tmp_path)
    assert protocol_main(["--config", str(path)]) == 2
    monkeypatch.setenv("CFSEG_DEBUG", "1")
    with pytest.raises(ValueError, match="a stage is a mapping"):
        protocol_main(["--config", str(path)])
