"""Bad inputs (issue 37, item 5): corrections that would corrupt the online corrector are refused or left out, and
an edited ``state.json`` is refused as damaged."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from cfseg.online import OnlineCorrector
from cfseg.online_state import OnlineConfig, OnlineStateError, state_checksum

SMALL = {"network": {"class_path": "monai.networks.nets.UNet",
                     "init_args": {"spatial_dims": 3, "channels": [4, 8], "strides": [2], "num_res_units": 0}},
         "crop_size": [16, 16, 16], "buffer_size": 4, "warmup": 1, "alpha_window": 2}


@pytest.fixture(scope="module")
def module(box_model):
    from cfseg.module import load_checkpoint

    return load_checkpoint(str(box_model))


def _case(boxes: Path, i: int = 0):
    img_path = boxes / "imagesTr" / f"box{i}_0000.nii.gz"
    lab = np.asarray(nib.load(str(boxes / "labelsTr" / f"box{i}.nii.gz")).dataobj)
    return img_path, nib.load(str(img_path)), lab


def _write(path: Path, array, affine) -> Path:
    nib.save(nib.Nifti1Image(np.asarray(array, dtype=np.uint8), affine), str(path))
    return path


def _run(box_model, state, img_path, *args):
    from cfseg.apps.correct import main as correct_main

    return correct_main(["--ckpt", str(box_model), "--state", str(state), "--image", str(img_path),
                         "--modality", "ct", *[str(a) for a in args]])


# ---- labels.json naming one class twice -------------------------------------------------------------------
@pytest.mark.parametrize("second", ["Liver", "hepar", "LIVER "])
def test_labels_json_naming_one_class_under_two_values_is_refused(box_model, boxes, tmp_path, capsys, second):
    img_path, _, lab = _case(boxes)
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps({"0": "background", "1": "liver", "2": second, "3": "aorta"}))
    state = tmp_path / "online"
    rc = _run(box_model, state, img_path, "--mask", boxes / "labelsTr" / "box0.nii.gz", "--labels", labels)
    err = capsys.readouterr().err
    assert rc == 2
    assert f"values 1 ('liver') and 2 ({second!r}) both name the class 'liver'; give each class one value" in err
    assert len(err.strip().splitlines()) == 1
    assert not state.exists()  # nothing learnt, nothing written


# ---- all-background / all-foreground corrections ----------------------------------------------------------
def test_empty_correction_warns_and_is_learnt_only_with_allow_empty(box_model, boxes, tmp_path, capsys):
    img_path, img, lab = _case(boxes)
    empty = _write(tmp_path / "liver.nii.gz", np.zeros(lab.shape), img.affine)
    state = tmp_path / "online"
    rc = _run(box_model, state, img_path, "--mask", empty, "--classes", "liver")
    err = capsys.readouterr().err
    assert rc == 2
    assert ("cfseg-correct: warning: " + f"{img_path}: the correction of 'liver' is all background (no voxel of it in "
            "the volume); not learnt from (if the organ is truly absent, pass --allow-empty / allow_empty=True)") in err
    assert f"cfseg-correct: error: {img_path}: no class left to learn from (see the warnings above)" in err
    assert not state.exists()
    rc = _run(box_model, state, img_path, "--mask", empty, "--classes", "liver", "--allow-empty")
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "warning" not in captured.err and "liver: Dice checkpoint" in captured.out
    assert json.loads((state / "state.json").read_text())["n_updates"] == 1


def test_full_correction_is_left_out_and_the_others_learnt(box_model, boxes, tmp_path, capsys):
    img_path, img, lab = _case(boxes)
    full = _write(tmp_path / "liver.nii.gz", np.ones(lab.shape), img.affine)
    spleen = _write(tmp_path / "spleen.nii.gz", lab == 2, img.affine)
    state = tmp_path / "online"
    rc = _run(box_model, state, img_path, "--mask", full, spleen, "--classes", "liver", "spleen")
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert (f"{img_path}: the correction of 'liver' is all foreground (every voxel of the volume); not learnt from "
            "(if that is meant, pass --allow-full / allow_full=True)") in captured.err
    assert "spleen: Dice checkpoint" in captured.out and "liver: Dice" not in captured.out
    rc = _run(box_model, tmp_path / "online2", img_path, "--mask", full, spleen, "--classes", "liver", "spleen",
              "--allow-full")
    captured = capsys.readouterr()
    assert rc == 0 and "warning" not in captured.err and "liver: Dice checkpoint" in captured.out


def test_api_warns_and_takes_the_keywords(module, boxes, tmp_path):
    from cfseg.correction import CorrectionWarning, correct
    from cfseg.segmentation import SegmentError

    img_path, img, lab = _case(boxes)
    full = tmp_path / "labels.nii.gz"
    _write(full, np.ones(lab.shape), img.affine)
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps({"1": "liver", "2": "spleen"}))  # spleen listed but absent: empty
    with pytest.warns(CorrectionWarning) as caught, pytest.raises(SegmentError, match="no class left"):
        correct(img_path, [full], module, tmp_path / "s", labels=labels, modality="ct", config=SMALL)
    assert sorted(str(w.message).split("'")[1] for w in caught) == ["liver", "spleen"]
    assert not (tmp_path / "s").exists()
    corr, report = correct(img_path, [full], module, tmp_path / "s", labels=labels, modality="ct", config=SMALL,
                           allow_empty=True, allow_full=True)
    assert set(report.dice_frozen) == {"liver", "spleen"} and corr.n_updates == 1


# ---- state.json range-checked and covered by the checksum ---------------------------------------------------
@pytest.fixture(scope="module")
def saved_state(module, boxes, tmp_path_factory):
    from cfseg.inference import predict_volume, preprocessing_for
    from cfseg.segmentation import preprocess

    _, img, lab = _case(boxes)
    work = preprocess(img, preprocessing_for(module, "ct"), np.stack([lab == k for k in (1, 2, 3)]))
    out = predict_volume(module, work["image"], [1, 2, 3])
    corr = OnlineCorrector(module, SMALL)
    corr.update(work["image"], out["probs"], [1, 2, 3],
                {k: torch.as_tensor(work["masks"][k - 1]).bool() for k in (1, 2, 3)})
    d = tmp_path_factory.mktemp("state")
    corr.save(d)
    return d


def _edited(saved_state: Path, tmp_path: Path, edit, rehash: bool) -> Path:
    d = tmp_path / f"edited{'-rehashed' * rehash}"
    d.mkdir()
    for p in saved_state.iterdir():
        (d / p.name).write_bytes(p.read_bytes())
    meta = json.loads((d / "state.json").read_text())
    edit(meta)
    if rehash:  # an edit that also recomputes the checksum: the range checks still catch it
        meta["checksum"] = state_checksum(meta)
    (d / "state.json").write_text(json.dumps(meta, indent=1))
    return d


def test_saved_state_loads_and_has_a_checksum(module, saved_state):
    meta = json.loads((saved_state / "state.json").read_text())
    assert meta["checksum"] == state_checksum(meta)
    assert OnlineCorrector.load(saved_state, module).n_updates == 1


def _set(path: str, value):
    def edit(meta):
        node = meta
        *head, last = path.split("/")
        for key in head:
            node = node[int(key)] if isinstance(node, list) else node[key]
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value
    return edit


EDITS = [
    ("alphas/liver", [-5.0], "alphas['liver'][0] = -5.0 is outside [0, 1]"),
    ("alphas/liver", [1.5], "alphas['liver'][0] = 1.5 is outside [0, 1]"),
    ("alphas/pancreas", [0.5], "alphas has an entry for 'pancreas', not a class of this model"),
    ("config/crop_size", [160, 160, 160], "crop_size must be 3 whole sizes from 8 to 128 voxels"),
    ("config/steps_per_update", 0, "steps_per_update must be at least 1"),
    ("config/steps_per_update", 10 ** 6, "steps_per_update at most 1000"),
    ("config/lr", -1.0, "lr must be in (0, 1]"),
    ("config/buffer_size", 2.5, "buffer_size must be an integer"),
    ("config/residual", "yes", "residual must be true or false"),
    ("config/evil", 1, "unknown online setting(s) ['evil']"),
    ("n_updates", -3, "n_updates = -3 is not a non-negative integer"),
    ("extents/liver", [1.0, 2.0, float("nan"), 1.0], "extents['liver'][2] = nan is not a finite number"),
    ("optimizer/param_groups/0/lr", 0.0, "optimizer.param_groups[0].lr = 0.0 is outside (0, 1]"),
    ("optimizer/param_groups/0/betas", [0.9, 1.0], "optimizer.param_groups[0].betas[1] = 1.0 is outside [0, 1)"),
    ("optimizer/param_groups/0/amsgrad", "no", "optimizer.param_groups[0].amsgrad = 'no' is not true, false or"),
    ("extra", {"x": 1}, "unknown field(s) ['extra']"),
]


@pytest.mark.parametrize("path, value, message", EDITS, ids=[f"{p}={v}"[:40] for p, v, _ in EDITS])
def test_edited_state_is_refused(module, saved_state, tmp_path, path, value, message):
    d = _edited(saved_state, tmp_path, _set(path, value), rehash=False)
    with pytest.raises(OnlineStateError, match="state.json does not match its checksum"):
        OnlineCorrector.load(d, module)
    d = _edited(saved_state, tmp_path, _set(path, value), rehash=True)
    with pytest.raises(OnlineStateError) as e:
        OnlineCorrector.load(d, module)
    assert "damaged online state (state.json: " in str(e.value) and message in str(e.value), str(e.value)


def test_missing_checksum_is_refused_and_the_cli_says_so(box_model, boxes, module, saved_state, tmp_path, capsys):
    d = _edited(saved_state, tmp_path, lambda m: m.pop("checksum"), rehash=False)
    with pytest.raises(OnlineStateError, match="does not match its checksum"):
        OnlineCorrector.load(d, module)
    from cfseg.apps.segment import main as segment_main

    img_path, _, _ = _case(boxes)
    rc = segment_main(["-i", str(img_path), "-o", str(tmp_path / "seg"), "--ckpt", str(box_model), "--online", str(d),
                       "--modality", "ct"])
    assert rc == 2 and "state.json does not match its checksum" in capsys.readouterr().err
    assert not (tmp_path / "seg").exists()


def test_config_bounds_hold_for_a_new_state_too():
    with pytest.raises(ValueError, match="crop_size"):
        OnlineConfig(crop_size=(160, 160, 160))
    with pytest.raises(ValueError, match="lr must be in"):
        OnlineConfig(lr=0)
    assert OnlineConfig(crop_size=[128, 128, 8]).crop_size == (128, 128, 8)
