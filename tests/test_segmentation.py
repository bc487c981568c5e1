"""cfseg-segment and cfseg.segment: outputs in the input's geometry, class subsets, boxes, bad input, modality
detection, output layout (unique names, atomic replacement, lock), device plumbing, and the Dice a tiny trained
model reaches on phantoms through cfseg-segment. The catalogue of bad inputs is in test_bad_inputs.py."""

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import real_dataset, write_nifti

import cfseg
from cfseg.apps.cli import main as cli
from cfseg.apps.segment import main as segment_main

CONFIG = Path(__file__).parent / "configs" / "tiny.yaml"


@pytest.fixture(scope="module")
def ckpt(tiny_phantoms, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("seg_ckpt")
    datasets = [{"path": str(p), "val_fraction": 0.25, "test_fraction": 0.0} for p in tiny_phantoms]
    run = cli(["fit", "--config", str(CONFIG), f"--data.datasets={json.dumps(datasets)}",
               f"--trainer.logger.init_args.save_dir={tmp}", f"--trainer.default_root_dir={tmp}",
               "--data.spacing=[6.0, 6.0, 6.0]"])
    return Path(run.trainer.checkpoint_callback.best_model_path)


def _visible(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))


@pytest.mark.parametrize("name,modality,codes", [("totalseg_ct", "ct", ("R", "A", "S")),
                                                  ("totalseg_mr", "mri", ("L", "P", "S"))])
def test_real_outputs_in_input_geometry(ckpt, tmp_path, name, modality, codes, capsys):
    root = real_dataset(name)
    image = next((root / "imagesTr").glob("*.nii.gz"))
    src = nib.load(image)
    assert nib.aff2axcodes(src.affine) == codes
    rc = segment_main(["-i", str(image), "-o", str(tmp_path), "--ckpt", str(ckpt), "--classes", "Liver",
                       "right kidney", "--similarity"])  # no --modality: detected from the image
    assert rc == 0
    assert f"{image}: modality {modality} (detected: " in capsys.readouterr().out
    files = _visible(tmp_path)
    assert files == ["kidney_right.nii.gz", "liver.nii.gz", "similarity_kidney_right.nii.gz",
                     "similarity_liver.nii.gz"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == [".cfseg-segment.json"]
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
    cases = sorted(p.name for p in (tmp_path / "out").iterdir())  # no lock, no temporary folder left
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
    from cfseg.geometry import _grid_map, _resample_to, _take_grid

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


# ---------------------------------------------------------------------------------------------------------
# Modality detection
# ---------------------------------------------------------------------------------------------------------
def _ct_array(shape=(20, 20, 20), seed=0):
    rng = np.random.default_rng(seed)
    a = np.full(shape, -1000.0)
    a[4:-4, 4:-4, 4:-4] = 40.0
    return (a + rng.normal(0, 12, shape)).astype(np.float32)


def test_detect_modality_synthetic_arrays():
    from cfseg.inference import ModalityError, detect_modality

    rng = np.random.default_rng(0)
    assert detect_modality(_ct_array())[0] == "ct"
    assert "air" in detect_modality(_ct_array())[1]
    assert detect_modality(np.round(_ct_array()).astype(np.int16))[0] == "ct"
    mri = np.sqrt(rng.normal(200, 20, (20, 20, 20)) ** 2 + rng.normal(0, 20, (20, 20, 20)) ** 2)  # Rician
    assert detect_modality(mri)[0] == "mri"
    small_negatives = mri.copy()
    small_negatives.flat[:50] = -5.0  # interpolation undershoot stays MRI
    assert detect_modality(small_negatives)[0] == "mri"
    with pytest.raises(ModalityError, match="cannot tell CT from MRI.*--modality ct or --modality mri"):
        detect_modality(rng.normal(0, 1, (20, 20, 20)))  # z-scored: neither rule
    soft_tissue_ct = rng.normal(0, 80, (20, 20, 20))  # a CT crop inside the body, fat and no air
    with pytest.raises(ModalityError):
        detect_modality(soft_tissue_ct)


def test_detect_modality_real_and_phantom_files(tiny_phantoms):
    from cfseg.inference import detect_modality

    for root, expected in ((tiny_phantoms[0], "ct"), (tiny_phantoms[1], "mri")):
        for f in sorted((root / "imagesTr").glob("*.nii.gz")):
            assert detect_modality(np.asarray(nib.load(f).dataobj))[0] == expected, f
    for name, expected in (("totalseg_ct", "ct"), ("totalseg_mr", "mri")):
        f = next((real_dataset(name) / "imagesTr").glob("*.nii.gz"))
        assert detect_modality(np.asarray(nib.load(f).dataobj))[0] == expected, f


def test_choose_modality_rules():
    from types import SimpleNamespace

    from cfseg.inference import ModalityError, choose_modality

    both = SimpleNamespace(preprocessing={"ct": {}, "mri": {}})
    ct_only = SimpleNamespace(preprocessing={"ct": {}})
    ct, mri = _ct_array(), np.abs(_ct_array()) + 1000
    assert choose_modality(both, ct)[:1] == ("ct",)
    assert choose_modality(both, mri)[1].startswith("modality mri (detected: ")
    with pytest.raises(ModalityError, match="looks like mri.*trained on ct only.*--modality ct"):
        choose_modality(ct_only, mri)
    modality, note, warning = choose_modality(ct_only, mri, "ct")  # an explicit override wins, with a warning
    assert (modality, note) == ("ct", "modality ct (given)") and "looks like mri" in warning
    with pytest.raises(ModalityError, match="trained on \\['ct'\\], not 'mri'"):
        choose_modality(ct_only, ct, "mri")
    with pytest.raises(ModalityError, match="the checkpoint knows ct and mri"):
        choose_modality(both, np.random.default_rng(0).normal(0, 1, (9, 9, 9)))


def _ct_only(ckpt: Path, tmp: Path) -> Path:
    import torch

    c = torch.load(ckpt, weights_only=True)
    c["cfseg"]["preprocessing"] = {"ct": c["cfseg"]["preprocessing"]["ct"]}
    torch.save(c, tmp / "ct_only.ckpt")
    return tmp / "ct_only.ckpt"


def test_ct_checkpoint_refuses_mri_unless_forced(ckpt, tiny_phantoms, tmp_path, capsys):
    mri = sorted((tiny_phantoms[1] / "imagesTr").glob("*.nii.gz"))[0]
    ct_only = _ct_only(ckpt, tmp_path)
    out = tmp_path / "out"
    assert segment_main(["-i", str(mri), "-o", str(out), "--ckpt", str(ct_only), "--classes", "liver"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{mri}: the image looks like mri" in err and "--modality ct" in err
    assert not out.exists()
    rc = segment_main(["-i", str(mri), "-o", str(out), "--ckpt", str(ct_only), "--classes", "liver",
                       "--modality", "ct"])
    cap = capsys.readouterr()
    assert rc == 0 and "cfseg-segment: warning:" in cap.err and "looks like mri" in cap.err
    assert f"{mri}: modality ct (given)" in cap.out
    assert _visible(out) == ["liver.nii.gz"]


# ---------------------------------------------------------------------------------------------------------
# Device plumbing
# ---------------------------------------------------------------------------------------------------------
def test_predict_volume_runs_windows_on_the_model_device_and_stitches_on_cpu(ckpt, monkeypatch):
    import torch

    import cfseg.module as cm
    from cfseg.inference import predict_volume
    from cfseg.module import load_checkpoint

    module = load_checkpoint(str(ckpt))
    seen = {}
    real = cm.sliding_window_inference

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(cm, "sliding_window_inference", spy)
    out = predict_volume(module, torch.rand(1, 20, 20, 20), [1, 2], device="cpu")
    assert torch.device(seen["sw_device"]) == next(module.parameters()).device  # windows where the model is
    assert str(seen["device"]) == "cpu"  # the stitched volume on the CPU, whatever the model's device
    assert out["labels"].shape == (20, 20, 20) and out["labels"].device.type == "cpu"
    calls = []
    monkeypatch.setattr(type(module), "sliding_window_logits",
                        lambda self, image, idx, **kw: calls.append(kw) or torch.zeros(1, 3, *image.shape[2:]))
    predict_volume(module, torch.rand(1, 8, 8, 8), [1, 2], device="cpu")
    assert calls == [{"sw_device": "cpu", "device": "cpu"}]


# ---------------------------------------------------------------------------------------------------------
# Output layout: unique safe names, atomic replacement without stale files
# ---------------------------------------------------------------------------------------------------------
def test_case_names_unique_and_inside_output():
    from cfseg.segmentation import case_names, safe_name

    files = [Path(n) for n in ("a.nii", "a.nii.gz", "a_0000.nii.gz", "...nii.gz", ".nii.gz", "b_0000.nii.gz",
                               "x\\y.nii.gz")]
    names = case_names(files)
    assert names[Path("b_0000.nii.gz")] == "b"
    assert len({n.casefold() for n in names.values()}) == len(files)
    for n in names.values():
        assert n == safe_name(n) and n not in ("", ".", "..") and "/" not in n and "\\" not in n
        assert not n.startswith(".") and Path("/out", n).parent == Path("/out")
    assert names[Path("a.nii")] == "a_nii" and names[Path("a.nii.gz")] == "a_nii_gz"
    assert names[Path("a_0000.nii.gz")] == "a_0000_nii_gz"


def _small_ct(path: Path) -> Path:
    """A 20^3 CT-like image at 4 mm (fast to segment)."""
    return write_nifti(path, _ct_array(), np.diag([4.0, 4.0, 4.0, 1.0]))


def test_folder_run_names_and_stale_outputs(ckpt, tmp_path, capsys):
    src = _small_ct(tmp_path / "src.nii.gz")
    d = tmp_path / "in"
    d.mkdir()
    for n in ("a.nii.gz", "a_0000.nii.gz", "...nii.gz"):
        shutil.copy(src, d / n)
    out = tmp_path / "out"
    args = ["-i", str(d), "-o", str(out), "--ckpt", str(ckpt)]
    assert segment_main([*args, "--classes", "liver", "spleen"]) == 0
    assert _visible(out) == sorted(p.name for p in out.iterdir()) == ["a_0000_nii_gz", "a_nii_gz", "unnamed"]
    assert segment_main([*args, "--classes", "liver"]) == 0  # spleen no longer requested
    for case in ("a_0000_nii_gz", "a_nii_gz", "unnamed"):  # the case folder swapped whole (with its manifest)
        assert sorted(p.name for p in (out / case).iterdir()) == [".cfseg-segment.json", "liver.nii.gz"]
    assert sorted(p.name for p in tmp_path.glob("*.nii.gz")) == ["src.nii.gz"]  # nothing escaped -o
    capsys.readouterr()


def test_single_file_replaces_its_own_outputs(ckpt, tmp_path, capsys):
    image = _small_ct(tmp_path / "ct.nii.gz")
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("a user's file")
    args = ["-i", str(image), "-o", str(out), "--ckpt", str(ckpt)]
    assert segment_main([*args, "--classes", "liver", "spleen", "--similarity"]) == 0
    assert _visible(out) == ["liver.nii.gz", "mine.txt", "similarity_liver.nii.gz", "similarity_spleen.nii.gz",
                             "spleen.nii.gz"]
    assert segment_main([*args, "--multilabel", "--classes", "liver"]) == 0
    assert _visible(out) == ["labels.json", "labels.nii.gz", "mine.txt"]  # stale masks gone, user's file kept
    manifest = json.loads((out / ".cfseg-segment.json").read_text())
    assert manifest["input"] == str(image) and manifest["files"] == ["labels.nii.gz", "labels.json"]
    assert sorted(manifest["sha256"]) == ["labels.json", "labels.nii.gz"]  # what protects a reviewer's edits
    capsys.readouterr()


# ---------------------------------------------------------------------------------------------------------
# A tiny trained model reaches a stated Dice through cfseg-segment
# ---------------------------------------------------------------------------------------------------------
#: Liver Dice the tiny model must reach on two held-out easy phantoms (measured 0.89 and 0.84 after 40 steps at
#: lr 0.01, seed 0, on CPU; all-background scores 0, all-body about 0.1).
LIVER_DICE = 0.6


def _easy_phantoms(root: Path, n: int, seed: int, shape=(24, 24, 24), spacing=4.0) -> Path:
    """CT-like phantoms in HU: air outside an ellipsoid body (0 HU), a liver ball (+60), a spleen ball (+130)."""
    rng = np.random.default_rng(seed)
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1, "spleen": 2}, "numTraining": n,
        "file_ending": ".nii.gz"}))
    g = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).astype(np.float32)
    c = (np.asarray(shape) - 1) / 2
    body = (((g - c) / (np.asarray(shape) * 0.45)) ** 2).sum(-1) <= 1
    affine = np.diag([spacing] * 3 + [1.0])
    for i in range(n):
        lab = np.zeros(shape, np.uint8)
        lab[(((g - c - rng.uniform(-2, 2, 3) - [-3, 0, 0]) / rng.uniform(4, 6)) ** 2).sum(-1) <= 1] = 1
        lab[(((g - c - rng.uniform(-1, 1, 3) - [6, 0, 0]) / rng.uniform(2, 3)) ** 2).sum(-1) <= 1] = 2
        lab[~body] = 0
        img = np.where(body, 0.0, -1000.0) + np.choose(lab, [0.0, 60.0, 130.0]) + rng.normal(0, 10, shape)
        write_nifti(root / "imagesTr" / f"easy{i}_0000.nii.gz", img.astype(np.int16), affine)
        write_nifti(root / "labelsTr" / f"easy{i}.nii.gz", lab, affine)
    return root


def test_tiny_model_reaches_stated_dice_through_cfseg_segment(tmp_path, capsys):
    train = _easy_phantoms(tmp_path / "Dataset900_easy", 4, seed=0)
    test = _easy_phantoms(tmp_path / "held_out", 2, seed=99)
    datasets = [{"path": str(train), "val_fraction": 0.0, "test_fraction": 0.0}]
    run = cli(["fit", "--config", str(CONFIG), f"--data.datasets={json.dumps(datasets)}",
               f"--trainer.logger.init_args.save_dir={tmp_path}", f"--trainer.default_root_dir={tmp_path}",
               "--data.spacing=[4.0, 4.0, 4.0]", "--trainer.max_steps=40", "--model.lr=0.01", "--trainer.max_epochs=-1",
               "--trainer.limit_val_batches=0", "--trainer.enable_progress_bar=false"])
    ckpt = run.trainer.checkpoint_callback.last_model_path or run.trainer.checkpoint_callback.best_model_path
    out = tmp_path / "masks"
    assert segment_main(["-i", str(test / "imagesTr"), "-o", str(out), "--ckpt", ckpt, "--classes", "liver"]) == 0
    dice = []
    for i in range(2):
        pred = np.asarray(nib.load(out / f"easy{i}" / "liver.nii.gz").dataobj) > 0
        gt = np.asarray(nib.load(test / "labelsTr" / f"easy{i}.nii.gz").dataobj) == 1
        dice.append(2 * (pred & gt).sum() / (pred.sum() + gt.sum()))
    assert min(dice) > LIVER_DICE, dice
    capsys.readouterr()


# ---------------------------------------------------------------------------------------------------------
# LoRA experts: --expert N and the "experts used" line
# ---------------------------------------------------------------------------------------------------------
EXPERT_CLASSES = ["liver", "spleen", "stomach"]  # expert e (stage e) serves EXPERT_CLASSES[e]


def _save_module(module, path: Path) -> Path:
    import torch

    ckpt = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}
    module.on_save_checkpoint(ckpt)
    torch.save(ckpt, path)
    return path


@pytest.fixture(scope="module")
def expert_models(tmp_path_factory):
    """A tiny CT module with 3 experts (0: the shared network, 1 and 2: LoRA experts with random non-zero
    factors), one class each, saved as a checkpoint beside the same network without experts."""
    import copy

    import torch

    from cfseg.continual import experts
    from cfseg.data.transforms import Preprocessing
    from cfseg.module import CFSegModule

    tmp = tmp_path_factory.mktemp("experts_ckpt")
    torch.manual_seed(0)
    plain = CFSegModule(
        class_names=EXPERT_CLASSES, feature_channels=8, encoder="minilm", roi_size=(16, 16, 16),
        backbone={"class_path": "monai.networks.nets.UNet", "init_args": {
            "spatial_dims": 3, "in_channels": 1, "out_channels": 8, "channels": [8, 16], "strides": [2],
            "num_res_units": 0}},
        preprocessing={"ct": Preprocessing("ct", spacing=(8.0, 8.0, 8.0)).to_dict()})
    module = copy.deepcopy(plain)
    layout = {"layers": list(experts.DEFAULT_EXPERT_LAYERS), "rank": 2, "alpha": 2.0}
    experts.attach_lora(module.net, layout["layers"], 2, 2.0)
    experts.add_expert(module.net)
    experts.add_expert(module.net)
    with torch.no_grad():
        for layer in experts.lora_layers(module.net).values():
            for up in layer.lora_up:
                up.normal_()
    module.expert_layout = layout
    module.expert_records = [{"expert": e, "classes": [c], "domains": ["ct"]} for e, c in enumerate(EXPERT_CLASSES)]
    assert module.n_experts == 3
    return {"module": module.eval(), "ckpt": _save_module(module, tmp / "experts.ckpt"),
            "plain": _save_module(plain, tmp / "plain.ckpt")}


def test_expert_out_of_range_fails_and_writes_nothing(expert_models, tmp_path, capsys):
    image = _small_ct(tmp_path / "ct.nii.gz")
    out = tmp_path / "out"
    for ckpt, bad, valid in ((expert_models["ckpt"], "3", "0..2"), (expert_models["ckpt"], "-1", "0..2"),
                             (expert_models["plain"], "1", "0..0")):
        assert segment_main(["-i", str(image), "-o", str(out), "--ckpt", str(ckpt), "--expert", bad]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"{ckpt}: expert {bad} does not exist" in err and valid in err, err
        assert not out.exists()
    # expert 0 of a checkpoint without experts is the network itself: it runs and says nothing about experts
    assert segment_main(["-i", str(image), "-o", str(out), "--ckpt", str(expert_models["plain"]),
                         "--expert", "0", "--classes", "liver"]) == 0
    cap = capsys.readouterr()
    assert _visible(out) == ["liver.nii.gz"] and "modality ct" in cap.out
    assert "experts used" not in cap.out + cap.err and "(forced)" not in cap.out + cap.err
    with pytest.raises(cfseg.segmentation.SegmentError, match=r"experts 0\.\.2"):
        cfseg.segment(image, expert_models["module"], expert=5)


def test_expert_override_changes_which_expert_ran(expert_models, tmp_path, capsys, monkeypatch):
    from cfseg.continual import experts

    module = expert_models["module"]
    image = _small_ct(tmp_path / "ct.nii.gz")
    ran: list[int] = []
    layer = next(iter(experts.lora_layers(module.net).values()))
    handle = layer.register_forward_pre_hook(lambda m, _x: ran.append(m.active))
    try:
        def run(**kw) -> tuple[set[int], list[str], dict]:
            ran.clear()
            msgs: list[str] = []
            res = cfseg.segment(image, module, notify=lambda level, m: msgs.append(m), **kw)
            return set(ran), [m for m in msgs if "expert" in m.removeprefix(str(image))], res

        used, msgs, default = run()
        assert used == {0, 1, 2}  # each class by its own stage's expert
        assert msgs == [f"{image}: experts used: 0 (liver), 1 (spleen), 2 (stomach)"]
        used, msgs, forced = run(expert=1)
        assert used == {1} and msgs == [f"{image}: expert 1 (forced) segments every class"]
        assert module.route_override is None  # forced for that call only
        used, msgs, _ = run(classes=["stomach"])
        assert used == {2} and msgs == [f"{image}: experts used: 2 (stomach)"]
        assert sorted(forced) == sorted(default) == EXPERT_CLASSES

        # a routed volume: the router's pick is reported, and a class picks its expert in that domain
        module.expert_records[2]["domains"] = ["mri"]
        monkeypatch.setattr(type(module), "can_route", property(lambda self: True))
        monkeypatch.setattr(module, "route", lambda _img: {"expert": 2, "domains": ["mri"], "stage": 2})
        _, msgs, _ = run()
        assert msgs == [f"{image}: routed to expert 2 (domains mri); experts used: 0 (liver), 1 (spleen), 2 (stomach)"]
    finally:
        handle.remove()
        module.expert_records[2]["domains"] = ["ct"]

    # the command line: the forced expert is printed per case
    out = tmp_path / "out"
    assert segment_main(["-i", str(image), "-o", str(out), "--ckpt", str(expert_models["ckpt"]),
                         "--expert", "2"]) == 0
    assert f"{image}: expert 2 (forced) segments every class" in capsys.readouterr().out
    assert _visible(out) == sorted(f"{c}.nii.gz" for c in EXPERT_CLASSES)
