"""The online corrector (cfseg.online) and its commands (cfseg-correct, cfseg-segment --online)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from cfseg.online import (
    OnlineCorrector,
    best_alpha,
    centred_box,
    expand_box,
    largest_component_box,
)
from cfseg.online_state import OnlineConfig, OnlineStateError

SMALL = {"network": {"class_path": "monai.networks.nets.UNet",
                     "init_args": {"spatial_dims": 3, "channels": [4, 8], "strides": [2], "num_res_units": 0}},
         "crop_size": [16, 16, 16], "buffer_size": 4, "warmup": 1, "alpha_window": 2}


@pytest.fixture(scope="module")
def module(box_model):
    from cfseg.module import load_checkpoint

    return load_checkpoint(str(box_model))


def _case(boxes: Path, i: int):
    img = nib.load(str(boxes / "imagesTr" / f"box{i}_0000.nii.gz"))
    lab = np.asarray(nib.load(str(boxes / "labelsTr" / f"box{i}.nii.gz")).dataobj)
    return img, lab


def _frozen(module, boxes, i):
    """(image [1,*S], probs [4,*S], truth {k: mask}) on the network grid (the boxes are on it already: 4 mm RAS)."""
    from cfseg.inference import predict_volume, preprocessing_for
    from cfseg.segmentation import preprocess

    img, lab = _case(boxes, i)
    work = preprocess(img, preprocessing_for(module, "ct"), np.stack([lab == k for k in (1, 2, 3)]))
    out = predict_volume(module, work["image"], [1, 2, 3])
    assert tuple(work["masks"].shape[1:]) == lab.shape  # same grid: the comparisons below are voxel to voxel
    return work["image"], out["probs"], {k: torch.as_tensor(work["masks"][k - 1]).bool() for k in (1, 2, 3)}


def test_boxes_helpers():
    m = np.zeros((10, 10, 10), bool)
    m[1:3, 1:3, 1:3] = True
    m[5:9, 4:8, 2:6] = True  # the larger component
    assert largest_component_box(m) == ((5, 4, 2), (9, 8, 6))
    assert largest_component_box(np.zeros((4, 4, 4), bool)) is None
    assert expand_box(((5, 4, 2), (9, 8, 6)), (10, 10, 10), margin=0.5, min_margin=1) == ((3, 2, 0), (10, 10, 8))
    assert centred_box((0, 9, 5), (4, 4, 20), (10, 10, 10)) == ((0, 6, 0), (4, 10, 10))


def test_alpha_search_picks_the_better_output():
    torch.manual_seed(0)
    target = (torch.rand(8, 8, 8) > 0.5).float()
    good = (target * 2 - 1) * 6  # confident and right
    bad = -good  # confident and wrong
    grid = OnlineConfig().alpha_grid()
    assert len(grid) == 21 and float(grid[1]) == pytest.approx(0.05)
    assert best_alpha(good, bad, target, grid)[0] == 1.0  # the frozen model (z_main) is the better one
    assert best_alpha(bad, good, target, grid)[0] == 0.0  # the auxiliary network is
    a, dice = best_alpha(good, torch.zeros_like(good), target, grid)
    assert a == 1.0 and dice > 0.99
    half = best_alpha(good, good * 0.5, target, grid)  # both right: ties go to the frozen model
    assert half[0] == 1.0


def test_buffer_is_fifo_and_the_batch_grows(module, boxes):
    corr = OnlineCorrector(module, SMALL)
    sizes = []
    for i in range(3):
        image, probs, truth = _frozen(module, boxes, i)
        report = corr.update(image, probs, [1, 2, 3], truth)
        sizes.append(report.buffer)
    assert len(corr.buffer) == 4  # capped at buffer_size
    assert sizes[0] <= 3 and sizes == sorted(sizes) and sizes[-1] == 4  # grows, then stays at the cap
    assert corr.n_updates == 3 and sum(len(v) for v in corr.alphas.values()) >= sizes[0]
    oldest = corr.buffer[0][0]
    newest = corr.buffer[-1][0]
    image, probs, truth = _frozen(module, boxes, 3)
    corr.update(image, probs, [1, 2, 3], truth)
    assert len(corr.buffer) == 4 and not any(x is oldest for x, _, _ in corr.buffer)  # first in, first out
    assert corr.buffer[-1][0] is not newest


def test_user_box_replaces_the_predicted_one(module, boxes):
    corr = OnlineCorrector(module, {**SMALL, "margin": 0.0, "min_margin": 1})
    image, probs, _ = _frozen(module, boxes, 0)
    corr.alphas["liver"] = [0.5]  # past the warm-up (1 record): the corrector acts on the liver
    user = ((2, 3, 4), (10, 11, 12))
    out = corr.fuse(image, probs, [1, 2, 3], boxes={1: user})
    assert out["boxes"]["liver"] == ((1, 2, 3), (11, 12, 13))  # the user's box, expanded by min_margin
    outside = torch.ones(probs.shape[1:], dtype=torch.bool)
    outside[1:11, 2:12, 3:13] = False
    assert torch.equal(out["probs"][1][outside], probs[1][outside].float())  # the frozen model outside the box
    with pytest.raises(ValueError, match="box of 'liver'"):
        corr.fuse(image, probs, [1, 2, 3], boxes={1: ((0, 0, 0), (99, 5, 5))})


def test_residual_corrector_starts_as_the_frozen_model(module, boxes):
    corr = OnlineCorrector(module, {**SMALL, "residual": True})
    image, probs, truth = _frozen(module, boxes, 0)
    corr.alphas = {n: [0.0] for n in ("liver", "spleen", "aorta")}  # the corrector alone, wherever it has a box
    out = corr.fuse(image, probs, [1, 2, 3])
    assert out["boxes"], "the corrector acted on no class"
    for k in (1, 2, 3):
        assert torch.allclose(out["probs"][k], probs[k].float(), atol=1e-4)  # zero correction: frozen output
    corr.update(image, probs, [1, 2, 3], truth)
    moved = corr.fuse(image, probs, [1, 2, 3])["probs"]
    assert not torch.allclose(moved[1:], probs[1:].float(), atol=1e-4)  # one step later it corrects


def test_config_validation():
    with pytest.raises(ValueError, match="unknown online setting"):
        OnlineConfig.from_dict({"buffer": 3})
    with pytest.raises(ValueError, match="prior"):
        OnlineConfig(prior="logits")
    with pytest.raises(ValueError, match="needs prior: probability"):
        OnlineConfig(residual=True, prior="mask")
    with pytest.raises(ValueError, match="buffer_size"):
        OnlineConfig(buffer_size=0)


def test_state_round_trip_and_refusals(module, boxes, tmp_path):
    corr = OnlineCorrector(module, SMALL)
    image, probs, truth = _frozen(module, boxes, 0)
    corr.update(image, probs, [1, 2, 3], truth)
    image1, probs1, truth1 = _frozen(module, boxes, 1)
    corr.update(image1, probs1, [1, 2, 3], truth1)
    d = tmp_path / "state"
    corr.save(d)
    back = OnlineCorrector.load(d, module)
    assert back.n_updates == 2 and back.alphas == corr.alphas and back.extents == corr.extents
    assert len(back.buffer) == len(corr.buffer)
    for (x, y, k), (x2, y2, k2) in zip(corr.buffer, back.buffer, strict=True):
        assert k == k2 and torch.equal(x, x2) and torch.equal(y, y2)
    for (n, p), (_, p2) in zip(corr.aux.state_dict().items(), back.aux.state_dict().items(), strict=True):
        assert torch.equal(p, p2), n
    s1, s2 = corr.optimizer.state_dict(), back.optimizer.state_dict()
    assert torch.equal(s1["state"][0]["exp_avg_sq"], s2["state"][0]["exp_avg_sq"])
    # the same next update from both: the state is complete
    nxt = _frozen(module, boxes, 2)
    r1, r2 = corr.update(nxt[0], nxt[1], [1, 2, 3], nxt[2]), back.update(nxt[0], nxt[1], [1, 2, 3], nxt[2])
    assert r1.dice_fused == r2.dice_fused and r1.loss == pytest.approx(r2.loss, rel=1e-5)
    # another checkpoint: same classes, other weights
    other = _with_other_weights(module)
    with pytest.raises(OnlineStateError, match="another checkpoint"):
        OnlineCorrector.load(d, other)
    assert not list(d.glob("*.tmp"))


def _with_other_weights(module):
    """The same model and classes with one weight changed: another checkpoint."""
    import copy

    other = copy.deepcopy(module)
    with torch.no_grad():
        next(other.parameters()).add_(1e-3)
    return other


def test_state_for_another_class_list_is_refused(module, tiny_phantoms, tmp_path, boxes):
    corr = OnlineCorrector(module, SMALL)
    corr.save(tmp_path / "s")
    meta = json.loads((tmp_path / "s" / "state.json").read_text())
    meta["base"]["classes"] = ["background", "liver", "kidney"]
    (tmp_path / "s" / "state.json").write_text(json.dumps(meta))
    with pytest.raises(OnlineStateError, match="classes"):
        OnlineCorrector.load(tmp_path / "s", module)


def test_damaged_state_fails_cleanly(module, boxes, tmp_path):
    corr = OnlineCorrector(module, SMALL)
    image, probs, truth = _frozen(module, boxes, 0)
    corr.update(image, probs, [1, 2, 3], truth)
    d = tmp_path / "state"
    corr.save(d)
    meta = json.loads((d / "state.json").read_text())
    weights = d / meta["files"]["weights"]
    raw = bytearray(weights.read_bytes())
    raw[-10] ^= 0xFF
    weights.write_bytes(bytes(raw))
    with pytest.raises(OnlineStateError, match="checksum"):
        OnlineCorrector.load(d, module)
    (d / "state.json").write_text("{not json")
    with pytest.raises(OnlineStateError, match="damaged"):
        OnlineCorrector.load(d, module)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(OnlineStateError, match="is empty"):
        OnlineCorrector.load(empty, module)
    other = tmp_path / "photos"
    other.mkdir()
    (other / "holiday.jpg").write_bytes(b"x")
    with pytest.raises(OnlineStateError, match="holds files but no online state"):
        corr.save(other)
    assert sorted(p.name for p in other.iterdir()) == ["holiday.jpg"]


def test_save_is_atomic(module, boxes, tmp_path, monkeypatch):
    corr = OnlineCorrector(module, SMALL)
    d = tmp_path / "state"
    corr.save(d)
    before = sorted(p.name for p in d.iterdir())
    image, probs, truth = _frozen(module, boxes, 0)
    corr.update(image, probs, [1, 2, 3], truth)

    def crash(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        corr.save(d)
    monkeypatch.undo()
    assert sorted(p.name for p in d.iterdir()) == before  # nothing half-written left behind
    assert OnlineCorrector.load(d, module).n_updates == 0  # the previous state still loads


def test_repeated_corrections_raise_dice_on_phantoms(module, boxes):
    """A systematically wrong base model (40 steps on the box phantoms): corrections of the same few cases teach
    the corrector, whose fused output then beats the frozen model on them."""
    cfg = {**SMALL, "steps_per_update": 8, "lr": 3e-3, "buffer_size": 16, "margin": 0.5}
    corr = OnlineCorrector(module, cfg)
    cases = [_frozen(module, boxes, i) for i in range(4)]
    reports = []
    for _ in range(5):
        for image, probs, truth in cases:
            reports.append(corr.update(image, probs, [1, 2, 3], truth))
    first = np.mean([np.mean(list(r.dice_frozen.values())) for r in reports[-4:]])
    fused = np.mean([np.mean(list(r.dice_fused.values())) for r in reports[-4:]])
    assert first < 0.8  # the base model is wrong enough to improve on
    print(f"frozen {first:.3f} fused {fused:.3f}")
    assert fused > first + 0.1, (first, fused)
    assert any(a < 1 for r in reports[-4:] for a in r.alpha_used.values())  # the corrector is trusted by now


def _write(path: Path, array, affine):
    nib.save(nib.Nifti1Image(np.asarray(array), affine), str(path))
    return path


def test_cli_correct_then_segment_online(box_model, boxes, tmp_path, capsys):
    from cfseg.apps.correct import main as correct_main
    from cfseg.apps.segment import main as segment_main

    state = tmp_path / "online"
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps(SMALL))
    for i in range(2):
        img, lab = _case(boxes, i)
        labels = tmp_path / "labels.json"
        labels.write_text(json.dumps({"0": "background", "1": "liver", "2": "spleen", "3": "aorta"}))
        rc = correct_main(["--ckpt", str(box_model), "--state", str(state), "--image",
                           str(boxes / "imagesTr" / f"box{i}_0000.nii.gz"), "--mask",
                           str(boxes / "labelsTr" / f"box{i}.nii.gz"), "--labels", str(labels), "--modality", "ct",
                           *(["--config", str(cfg)] if i == 0 else [])])
        assert rc == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "liver: Dice checkpoint" in out and "2 corrected cases" in out
    assert json.loads((state / "state.json").read_text())["n_updates"] == 2
    rc = segment_main(["-i", str(boxes / "imagesTr" / "box2_0000.nii.gz"), "-o", str(tmp_path / "seg"),
                       "--ckpt", str(box_model), "--online", str(state), "--multilabel", "--modality", "ct"])
    assert rc == 0, capsys.readouterr().err
    assert "online corrector (2 corrected cases" in capsys.readouterr().out
    seg = nib.load(str(tmp_path / "seg" / "labels.nii.gz"))
    assert seg.shape == (24, 24, 24)


def test_cli_refuses_bad_masks_and_writes_nothing(box_model, boxes, tmp_path, capsys):
    from cfseg.apps.correct import main as correct_main

    state = tmp_path / "online"
    img_path = boxes / "imagesTr" / "box0_0000.nii.gz"
    img, lab = _case(boxes, 0)
    moved = img.affine.copy()
    moved[0, 3] += 4.0  # one voxel off
    shifted = _write(tmp_path / "shifted.nii.gz", lab, moved)
    small = _write(tmp_path / "small.nii.gz", lab[:20], img.affine)
    mask = _write(tmp_path / "liver.nii.gz", (lab == 1).astype(np.uint8), img.affine)
    cases = [
        (["--mask", str(shifted), "--classes", "liver"], "affine differs"),
        (["--mask", str(small), "--classes", "liver"], "shape"),
        (["--mask", str(mask), "--classes", "pancreas"], "pancreas"),
        (["--mask", str(mask)], "say what the masks are"),
        (["--mask", str(mask), "--classes", "liver", "spleen"], "one per mask"),
    ]
    for args, message in cases:
        rc = correct_main(["--ckpt", str(box_model), "--state", str(state), "--image", str(img_path),
                           "--modality", "ct", *args])
        err = capsys.readouterr().err
        assert rc == 2 and message in err, (args, err)
        assert not state.exists()  # nothing written
    # a state for another checkpoint: refused by cfseg-segment too
    state.mkdir()
    (state / "state.json").write_text("garbage")
    from cfseg.apps.segment import main as segment_main

    rc = segment_main(["-i", str(img_path), "-o", str(tmp_path / "seg"), "--ckpt", str(box_model),
                       "--online", str(state), "--modality", "ct"])
    assert rc == 2 and "damaged online state" in capsys.readouterr().err
    assert not (tmp_path / "seg").exists()

