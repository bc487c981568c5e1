"""``cfseg predict``: NIfTI label maps in each input's own geometry, the same geometry path as cfseg-segment."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import BOX_LABELS, make_boxes

import cfseg
from cfseg.apps.cli import main as cli
from cfseg.evaluation import evaluate_datasets
from cfseg.metrics import dice_per_class
from cfseg.module import load_checkpoint

CONFIG = Path(__file__).parent / "configs" / "tiny.yaml"


def test_predict_writes_masks_in_input_geometry_like_segment(box_model, tmp_path):
    # 3 mm voxels, LPS, shifted origin: the network grid (4 mm RAS) differs, so the writer must resample
    affine = np.array([[-3.0, 0, 0, 40.0], [0, -3.0, 0, 30.0], [0, 0, 3.0, -20.0], [0, 0, 0, 1]])
    data = make_boxes(tmp_path / "Dataset052_lps", n_cases=3, seed=5, affine=affine)
    out = tmp_path / "run"
    datasets = [{"path": str(data), "val_fraction": 0.0, "test_fraction": 0.67}]
    cli(["predict", "--config", str(CONFIG), f"--data.datasets={json.dumps(datasets)}",
         f"--trainer.default_root_dir={out}", f"--trainer.logger.init_args.save_dir={out}",
         "--data.spacing=[4.0, 4.0, 4.0]", f"--ckpt_path={box_model}"])
    labels = json.loads((out / "predictions" / "labels.json").read_text())
    assert labels == {"0": "background", **{str(i + 1): n for i, n in enumerate(BOX_LABELS)}}
    files = sorted((out / "predictions" / data.name).glob("*.nii.gz"))
    assert len(files) == 2 and not list((out / "predictions").rglob(".tmp-*"))
    dice_input_grid = []
    for f in files:
        src = nib.load(data / "imagesTr" / f.name.replace(".nii.gz", "_0000.nii.gz"))
        pred = nib.load(f)
        assert pred.shape == src.shape and np.allclose(pred.affine, src.affine, atol=1e-5)
        arr = np.asarray(pred.dataobj)
        assert arr.dtype == np.uint8 and set(np.unique(arr)) <= {0, 1, 2, 3}
        ref = np.asarray(cfseg.segment(src, str(box_model), multilabel=True, modality="ct")["labels"].dataobj)
        assert (arr == ref).mean() > 0.999  # one geometry path: cfseg-segment agrees voxel for voxel
        truth = np.asarray(nib.load(data / "labelsTr" / f.name).dataobj)
        dice_input_grid.append(dice_per_class(torch.from_numpy(arr), torch.from_numpy(truth), [1, 2, 3]))
    # the maps lie where the organs are in the input's own grid: per class, their Dice against the input's labels
    # is the model's Dice on the network grid (cfseg's evaluation of the same test cases, labels resampled there),
    # up to the resampling of a 6-voxel cube between 3 and 4 mm. A map written flipped, or shifted by two voxels,
    # would still agree with cfseg-segment (the same path) but not with the labels.
    on_input = torch.stack(dice_input_grid).mean(0)
    on_network = evaluate_datasets(load_checkpoint(str(box_model)), datasets, split="test")["per_class_dice"]
    print("Dice on the input grid", on_input.tolist(), "on the network grid", on_network)
    for k, name in enumerate(BOX_LABELS):
        assert float(on_input[k]) == pytest.approx(on_network[name], abs=0.1), name
    assert float(on_input.mean()) > 0.2  # a trained model (an untrained one's validation Dice: 0.03), not empty



def test_labels_without_probabilities_are_the_same_and_segment_asks_only_when_resampling(box_model, boxes, tmp_path,
                                                                                          monkeypatch):
    import torch

    import cfseg.segmentation as cs
    from cfseg.inference import load_case, predict_volume, preprocessing_for
    from cfseg.module import load_checkpoint

    model = load_checkpoint(str(box_model)).eval()
    vol = load_case(str(boxes / "imagesTr" / "box0_0000.nii.gz"), preprocessing_for(model, "ct"))
    fast, full = predict_volume(model, vol["image"], probabilities=False), predict_volume(model, vol["image"])
    assert "probs" not in fast and torch.equal(fast["labels"], full["labels"])
    asked = []
    real = cs.predict_volume
    monkeypatch.setattr(cs, "predict_volume", lambda *a, **k: asked.append(k["probabilities"]) or real(*a, **k))
    same_grid = nib.load(boxes / "imagesTr" / "box0_0000.nii.gz")  # 4 mm RAS: the network grid itself
    masks = cfseg.segment(same_grid, model, multilabel=True, modality="ct")["labels"]
    assert np.array_equal(np.asarray(masks.dataobj), full["labels"].numpy())
    lps = np.array([[-3.0, 0, 0, 40.0], [0, -3.0, 0, 30.0], [0, 0, 3.0, -20.0], [0, 0, 0, 1]])
    other = make_boxes(tmp_path / "Dataset053_lps", n_cases=1, seed=5, affine=lps)
    cfseg.segment(nib.load(other / "imagesTr" / "box0_0000.nii.gz"), model, modality="ct")
    assert asked == [False, True]  # probabilities only where the prediction is resampled
