"""Bad inputs at the data layer: each gives ONE line naming the file and the problem.

Every kind below breaks one case of a small valid nnU-Net dataset. Three paths must report it:
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
import subprocess
import sys
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import make_nnunet, write_nifti

from cfseg.data import summary
from cfseg.data.datamodule import CheckedCacheDataset, DatasetConfig, SegDataModule
from cfseg.data.formats import DatasetError

ROOT = Path(__file__).resolve().parents[2]
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
    assert summary.main([str(root), "--check"]) == 2
    lines = capsys.readouterr().out.strip().splitlines()
    hits = [line for line in lines if line.startswith(f"{path}: ")]
    assert hits, (path, lines)
    _one_line_naming(hits[0], path, pattern)


def test_summary_check_reports_every_problem_and_passes_clean_data(tmp_path, capsys):
    root = make_nnunet(tmp_path / "Dataset002_many", {"liver": 1, "spleen": 2}, n_cases=5, shape=SHAPE)
    assert summary.main([str(root), "--check"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("OK: 1 dataset(s), 5 cases, 10 files")
    # header-only checks (the plain summary) do not see voxel problems; --check sees all of them
    _edit(_label(root, "case0"), _set_voxel(9))
    _truncate(_image(root, "case2"))
    _edit(_image(root, "case3"), _set_voxel(np.nan))
    _label(root, "case4").unlink()
    (root / "partial_labels.json").write_text(json.dumps({c: ["liver"] for c in ("case0", "case1", "case2", "case3")}
                                                         | {"case4": ["stomach"]}))
    assert summary.main([str(root), "--check"]) == 2
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 4, out  # case4's partial label line is not reported: the case is already left out
    for case, what in [("labelsTr/case0.nii.gz", "label values [9]"), ("imagesTr/case2_0000.nii.gz", "truncated"),
                       ("imagesTr/case3_0000.nii.gz", "NaN"), ("labelsTr/case4.nii.gz", "file not found")]:
        assert any(line.startswith(f"{root / case}: ") and what in line for line in out), (case, out)


def test_plain_summary_is_header_only(tmp_path, capsys):
    root = make_nnunet(tmp_path / "Dataset003_voxels", {"liver": 1}, n_cases=3, shape=SHAPE)
    _edit(_image(root), _set_voxel(np.nan))
    assert summary.main([str(root)]) == 0  # the voxel problem is --check's (and training's) business
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
        _one_line_naming(errors[0].removeprefix("cfseg: error: "), path, pattern)


def test_missing_image_msd_and_stray_label_nnunet(tmp_path, capsys):
    """An image file named in an MSD dataset.json is missing; an nnU-Net label has no image (--check only)."""
    msd = tmp_path / "Task01_x"
    training = []
    for i in range(2):
        write_nifti(msd / "imagesTr" / f"c{i}.nii.gz", np.ones((8, 8, 6), np.float32))
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
    assert summary.main([str(msd), str(nn), "--check"]) == 2
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 2, out
    assert out[0].startswith(f"{msd.resolve() / 'imagesTr' / 'c1.nii.gz'}: file not found")
    assert out[1].startswith(f"{_label(nn, 'case2')}: label without an image")
