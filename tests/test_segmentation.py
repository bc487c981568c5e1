"""cfseg-segment and cfseg.segment: outputs in the input's geometry, class subsets, boxes, bad input."""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import real_dataset, write_nifti

import cfseg
from cfseg.cli import main as cli
from cfseg.segmentation import main as segment_main

CONFIG = Path(__file__).parent / "configs" / "tiny.yaml"


@pytest.fixture(scope="module")
def ckpt(tiny_phantoms, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("seg_ckpt")
    datasets = [{"path": str(p), "val_fraction": 0.25, "test_fraction": 0.0} for p in tiny_phantoms]
    run = cli(["fit", "--config", str(CONFIG), f"--data.datasets={json.dumps(datasets)}",
               f"--trainer.logger.init_args.save_dir={tmp}", f"--trainer.default_root_dir={tmp}",
               "--data.spacing=[6.0, 6.0, 6.0]"])
    return Path(run.trainer.checkpoint_callback.best_model_path)


@pytest.mark.parametrize("name,modality,codes", [("totalseg_ct", "ct", ("R", "A", "S")),
                                                  ("totalseg_mr", "mri", ("L", "P", "S"))])
def test_real_outputs_in_input_geometry(ckpt, tmp_path, name, modality, codes):
    root = real_dataset(name)
    image = next((root / "imagesTr").glob("*.nii.gz"))
    src = nib.load(image)
    assert nib.aff2axcodes(src.affine) == codes
    rc = segment_main(["-i", str(image), "-o", str(tmp_path), "--ckpt", str(ckpt), "--classes", "Liver",
                       "right kidney", "--modality", modality, "--similarity"])
    assert rc == 0
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["kidney_right.nii.gz", "liver.nii.gz", "similarity_kidney_right.nii.gz",
                     "similarity_liver.nii.gz"]
    for f in files:
        out = nib.load(tmp_path / f)
        assert out.shape == src.shape
        assert np.allclose(out.affine, src.affine, atol=1e-4)
    assert nib.load(tmp_path / "liver.nii.gz").get_data_dtype() == np.uint8
    sim = np.asarray(nib.load(tmp_path / "similarity_liver.nii.gz").dataobj)
    assert sim.dtype == np.float32 and sim.min() >= -1.001 and sim.max() <= 1.001


def test_api_multilabel_box_and_geometry(ckpt, tiny_phantoms, tmp_path):
    image = sorted((tiny_phantoms[1] / "imagesTr").glob("*.nii.gz"))[0]  # LPS MRI phantom
    src = nib.load(image)
    out = cfseg.segment(str(image), ckpt, classes=["liver", "spleen"], multilabel=True, modality="mri")
    lab = np.asarray(out["labels"].dataobj)
    assert out["labels"].shape == src.shape and np.allclose(out["labels"].affine, src.affine)
    liver, spleen = (__import__("cfseg.module", fromlist=["x"]).load_checkpoint(str(ckpt)).bank.index(n)
                     for n in ("liver", "spleen"))
    assert set(np.unique(lab)) <= {0, liver, spleen}
    box = (4, 5, 6, 20, 22, 24)
    boxed = cfseg.segment(nib.load(image), ckpt, classes=["liver"], box=box, modality="mri")["liver"]
    arr = np.asarray(boxed.dataobj)
    inside = np.zeros(arr.shape, bool)
    inside[4:20, 5:22, 6:24] = True
    assert not arr[~inside].any()  # nothing outside the box


def test_cli_folder_multilabel_and_list(ckpt, tiny_phantoms, tmp_path, capsys):
    folder = tiny_phantoms[0] / "imagesTr"
    rc = segment_main(["-i", str(folder), "-o", str(tmp_path / "out"), "--ckpt", str(ckpt), "--multilabel",
                       "--modality", "ct"])
    assert rc == 0
    cases = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert len(cases) == 4 and all((tmp_path / "out" / c / "labels.nii.gz").is_file() for c in cases)
    labels = json.loads((tmp_path / "out" / cases[0] / "labels.json").read_text())
    assert labels["0"] == "background" and "liver" in labels.values()
    assert segment_main(["--ckpt", str(ckpt), "--list-classes"]) == 0
    assert "kidney_left" in capsys.readouterr().out.split()


def test_bad_inputs_leave_nothing(ckpt, tmp_path, capsys):
    out = tmp_path / "out"

    def run(*args):
        rc = segment_main(["-o", str(out), "--ckpt", str(ckpt), "--modality", "ct", *args])
        return rc, capsys.readouterr().err

    rc, err = run("-i", str(tmp_path), "--classes", "livr")
    assert rc == 2 and "unknown class 'livr'" in err and "did you mean liver" in err
    txt = tmp_path / "notes.txt"
    txt.write_text("x")
    rc, err = run("-i", str(txt))
    assert rc == 2 and "not a NIfTI file" in err
    two_d = write_nifti(tmp_path / "flat.nii.gz", np.zeros((8, 8), np.float32))
    rc, err = run("-i", str(two_d))
    assert rc == 2 and "expected a 3D image" in err
    four_d = write_nifti(tmp_path / "t.nii.gz", np.zeros((8, 8, 8, 3), np.float32))
    rc, err = run("-i", str(four_d))
    assert rc == 2 and "expected a 3D image, got shape (8, 8, 8, 3)" in err
    arr = np.zeros((16, 16, 16), np.float32)
    arr[3, 3, 3] = np.nan
    nan = write_nifti(tmp_path / "nan.nii.gz", arr)
    rc, err = run("-i", str(nan))
    assert rc == 2 and "1 NaN/infinite" in err
    rc, err = run("-i", str(nan), "--box", "0", "0", "0", "99", "4", "4")
    assert rc == 2
    fake = tmp_path / "fake.ckpt"
    fake.write_bytes(b"not a checkpoint")
    rc = segment_main(["-i", str(nan), "-o", str(out), "--ckpt", str(fake)])
    assert rc == 2 and "not a loadable cfseg checkpoint" in capsys.readouterr().err
    assert not out.exists() or not any(out.rglob("*.nii.gz"))  # nothing half-written


def test_grid_copy_equals_world_lookup():
    """Reoriented, shifted grids are copied exactly; interpolation agrees with the same world mapping."""
    from cfseg.segmentation import _grid_map, _resample_to, _take_grid

    rng = np.random.default_rng(0)
    src = rng.normal(size=(2, 6, 7, 5)).astype(np.float32)
    src_affine = np.diag([-2.0, -2.0, 3.0, 1.0])
    src_affine[:3, 3] = [30.0, 20.0, -5.0]
    perm = np.zeros((4, 4))
    perm[0, 1], perm[1, 0], perm[2, 2], perm[3, 3] = -1, 1, 1, 1  # swap x/y, flip one
    dst_affine = src_affine @ perm
    dst_affine[:3, 3] = src_affine[:3, :3] @ np.array([5.0, 1.0, 0.0]) + src_affine[:3, 3]
    dst_shape = (8, 6, 5)
    mapping = _grid_map(src_affine, src.shape[1:], dst_affine)
    assert mapping is not None
    fast = _take_grid(src, mapping, dst_shape, fill=-9.0)
    slow = _resample_to(src, src_affine, dst_shape, dst_affine, order=0, cval=-9.0)
    M = np.linalg.inv(src_affine) @ dst_affine
    for idx in [(0, 0, 0), (3, 2, 4), (7, 5, 1)]:
        s = np.rint(M @ np.r_[idx, 1])[:3].astype(int)
        inside = all(0 <= s[a] < src.shape[1 + a] for a in range(3))
        expected = src[(slice(None), *s)] if inside else np.full(2, -9.0)
        assert np.allclose(fast[(slice(None), *idx)], expected)
        assert np.allclose(slow[(slice(None), *idx)], expected)
    assert _grid_map(src_affine, src.shape[1:], np.diag([1.5, 2.0, 3.0, 1.0])) is None  # other spacing
