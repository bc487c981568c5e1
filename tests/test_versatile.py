"""Versatile-style training of a softmax head (issue 14 item 4): exclusion loss, entropy on ambiguous voxels,
hierarchical (dataset -> class) sampling. The marginal loss itself is tested in test_losses.py."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cfseg.bank import PrototypeBank
from cfseg.losses import ambiguous_entropy, ambiguous_voxels, exclusion_loss, partial_label_loss
from cfseg.text.encoders import TextEncoder

BIG = 1e4  # logits this far apart give exactly one-hot float32 softmax


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Sample 0 annotates classes 1 and 2 (3 not), sample 1 annotates class 3 only."""
    target = torch.zeros(2, 6, 4, 3, dtype=torch.long)
    target[0, :2] = 1
    target[0, 4:] = 2
    target[1, 1:3] = 3
    annotated = torch.tensor([[True, True, True, False], [True, False, False, True]])
    return target, annotated


def _one_hot_logits(labels: torch.Tensor, n: int = 4) -> torch.Tensor:
    return F.one_hot(labels, n).movedim(-1, 1).double() * BIG


def _np_exclusion(logits: torch.Tensor, target: torch.Tensor, annotated: torch.Tensor, smooth: float = 1e-5) -> float:
    """Loop reference: per (sample, class >= 1) the Dice overlap of p_k with the voxels known not to be k."""
    x = logits.double().numpy()
    p = np.exp(x - x.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    t, ann = target.numpy(), annotated.numpy()
    vals = []
    for b in range(x.shape[0]):
        for k in range(1, x.shape[1]):
            e = np.zeros(t[b].shape, bool)
            for idx in np.ndindex(t[b].shape):
                lab = t[b][idx]
                e[idx] = lab != k and (lab > 0 or ann[b, k])
            if e.any():
                vals.append(2 * (p[b, k] * e).sum() / (p[b, k].sum() + e.sum() + smooth))
    return float(np.mean(vals)) if vals else 0.0


def test_exclusion_matches_a_loop_reference():
    target, annotated = _batch()
    logits = torch.randn(2, 4, 6, 4, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    got = exclusion_loss(logits, target, annotated)
    assert float(got) == pytest.approx(_np_exclusion(logits, target, annotated), rel=1e-10)
    assert float(got) > 0


def test_exclusion_is_zero_for_a_perfect_prediction_and_lets_unannotated_classes_take_label_0():
    target, annotated = _batch()
    assert float(exclusion_loss(_one_hot_logits(target), target, annotated)) == 0.0
    # sample 0 does not annotate class 3: predicting it on voxels labelled 0 is allowed (they may be class 3),
    # and so is class 1 or 2 on sample 1's label-0 voxels
    pred = target.clone()
    pred[0][target[0] == 0] = 3
    pred[1][target[1] == 0] = 1
    assert float(exclusion_loss(_one_hot_logits(pred), target, annotated)) == 0.0


@pytest.mark.parametrize("where, cls", [
    ("organ", 2),  # an annotated class on another annotated organ's voxels
    ("background", 2),  # an annotated class on the (known) background of its case
    ("organ", 3),  # an unannotated class on a drawn organ (organs do not overlap: Shi et al.)
])
def test_exclusion_is_positive_where_labels_rule_the_class_out(where, cls):
    target, annotated = _batch()
    pred = target.clone()
    if where == "organ":
        pred[0, 0] = cls  # voxels labelled 1
    else:
        pred[0, 2] = cls  # voxels labelled 0
    loss = exclusion_loss(_one_hot_logits(pred), target, annotated)
    assert float(loss) > 0
    assert float(loss) == pytest.approx(_np_exclusion(_one_hot_logits(pred), target, annotated), rel=1e-9)


def test_exclusion_ignores_ignored_voxels_and_has_gradients():
    target, annotated = _batch()
    pred = target.clone()
    pred[0, 2] = 2
    masked = target.clone()
    masked[0, 2] = -1
    assert float(exclusion_loss(_one_hot_logits(pred), masked, annotated, ignore_index=-1)) == 0.0
    x = torch.randn(2, 4, 6, 4, 3, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda z: exclusion_loss(z, target, annotated), (x,))


def test_entropy_is_zero_for_one_hot_predictions_on_ambiguous_voxels_only():
    target, annotated = _batch()
    amb = ambiguous_voxels(target, annotated)
    assert bool((amb == (target == 0)).all())  # both samples leave classes unannotated
    # one-hot on the ambiguous voxels (any class: background or an unannotated organ), uniform elsewhere
    logits = torch.zeros(2, 4, 6, 4, 3, dtype=torch.float64)
    logits[0, 3][target[0] == 0] = BIG
    logits[1, 0][target[1] == 0] = BIG
    assert float(ambiguous_entropy(logits, target, annotated)) == 0.0
    # uniform on the ambiguous voxels: log(K+1)
    assert float(ambiguous_entropy(torch.zeros(2, 4, 6, 4, 3), target, annotated)) == pytest.approx(np.log(4))


def test_entropy_leaves_fully_annotated_samples_and_labelled_voxels_out():
    target, annotated = _batch()
    annotated[0] = True  # sample 0 annotates every class: its zeros are plain background
    logits = torch.zeros(2, 4, 6, 4, 3, dtype=torch.float64)
    logits[1, 0][target[1] == 0] = BIG
    assert float(ambiguous_entropy(logits, target, annotated)) == 0.0
    x = torch.randn(2, 4, 6, 4, 3, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda z: ambiguous_entropy(z, target, annotated), (x,))


class _Fake(TextEncoder):
    encoder_id = "fake:versatile"

    @property
    def dim(self) -> int:
        return 16

    def encode(self, texts: list[str]) -> torch.Tensor:
        rows = [torch.randn(16, generator=torch.Generator().manual_seed(
            int.from_bytes(hashlib.sha256(t.encode()).digest()[:8], "little"))) for t in texts]
        return F.normalize(torch.stack(rows), dim=-1)


TINY = {"class_path": "monai.networks.nets.UNet",
        "init_args": {"spatial_dims": 3, "in_channels": 1, "out_channels": 4, "channels": [4, 8], "strides": [2],
                      "num_res_units": 0}}


def _module(**kw):
    from cfseg.module import CFSegModule

    bank = PrototypeBank.build(["liver", "spleen", "aorta"], _Fake())
    return CFSegModule(class_names=bank.classes, backbone=TINY, feature_channels=4, bank_state=bank.state(), **kw)


@pytest.mark.parametrize("head", ["softmax", "prototype"])
def test_module_options_off_change_nothing_and_on_add_the_weighted_terms(head):
    target, annotated = _batch()
    batch = {"label": target[:, None], "annotated": annotated}
    logits = torch.randn(2, 4, 6, 4, 3, generator=torch.Generator().manual_seed(1))
    off = _module(head=head)
    terms = off.loss_terms(logits, batch)
    assert list(terms) == ["partial"]
    plain = partial_label_loss(logits, target, annotated, batch_dice=True)
    assert torch.equal(off.loss(logits, batch), plain)
    on = _module(head=head, loss_weights={"exclusion_weight": 0.5, "entropy_weight": 0.25})
    terms = on.loss_terms(logits, batch)
    assert set(terms) == {"partial", "exclusion", "entropy"}
    torch.testing.assert_close(terms["exclusion"], 0.5 * exclusion_loss(logits, target, annotated))
    torch.testing.assert_close(terms["entropy"], 0.25 * ambiguous_entropy(logits, target, annotated))
    torch.testing.assert_close(on.loss(logits, batch), plain + terms["exclusion"] + terms["entropy"])


def test_module_refuses_the_terms_on_a_sigmoid_head_and_negative_weights():
    with pytest.raises(ValueError, match="exclusion_weight regularises one softmax"):
        _module(head={"class_path": "cfseg.heads.UniversalHead", "init_args": {"controller_channels": 4}},
                loss_weights={"exclusion_weight": 1.0})
    with pytest.raises(ValueError, match="entropy_weight must be a finite number >= 0"):
        _module(head="softmax", loss_weights={"entropy_weight": -1.0})


# ----------------------------------------------------------------------------------------------------------
# hierarchical (dataset -> class) sampling
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_box_sets(tmp_path_factory):
    """Dataset A: 8 cases annotating liver and spleen; dataset B: 3 cases annotating aorta only."""
    from conftest import make_boxes

    root = tmp_path_factory.mktemp("versatile")
    a = make_boxes(root / "Dataset051_a", n_cases=8, seed=1)
    b = make_boxes(root / "Dataset052_b", n_cases=3, seed=2)
    return [{"path": str(a), "val_fraction": 0.0, "test_fraction": 0.0, "classes": ["liver", "spleen"]},
            {"path": str(b), "val_fraction": 0.0, "test_fraction": 0.0, "classes": ["aorta"]}]


def _dm(datasets, **kw):
    from cfseg.data.datamodule import SegDataModule

    return SegDataModule(datasets, spacing=(4.0, 4.0, 4.0), patch_size=(8, 8, 8), samples_per_volume=2,
                         cache="none", **kw)


def test_hierarchical_sampling_draws_datasets_uniformly_then_their_classes(two_box_sets):
    dm = _dm(two_box_sets, sampling="hierarchical")
    ds = dm.split_dataset("train")
    names = dm.class_names  # liver, spleen, aorta
    n = 8000
    draws = list(ds.sampler(n, torch.Generator().manual_seed(0)))
    assert len(draws) == n
    d = np.array([t[0] for t in draws])
    # 8 cases vs 3 cases, but each dataset half of the draws (binomial sd 0.0056: 5 sd tolerance)
    assert abs((d == 0).mean() - 0.5) < 0.028
    for part, classes in ((0, ["liver", "spleen"]), (1, ["aorta"])):
        ks = [t[2] for t in draws if t[0] == part]
        assert {names[k - 1] for k in ks} == set(classes)  # only the classes that dataset annotates
        for c in classes:
            share = np.mean([names[k - 1] == c for k in ks])
            assert abs(share - 1 / len(classes)) < 0.04
    cases_b = [t[1] for t in draws if t[0] == 1]
    assert set(cases_b) == {0, 1, 2}
    # the same seed repeats the draws; every draw is a case annotating the drawn class
    assert draws[:50] == list(ds.sampler(50, torch.Generator().manual_seed(0)))
    for part, i, k in draws[:200]:
        assert bool(ds.parts[part].data[i]["annotated"][k])


def test_hierarchical_patches_are_centred_on_the_drawn_class(two_box_sets):
    dm = _dm(two_box_sets, sampling="hierarchical", augment=False)
    ds = dm.split_dataset("train")
    for key in [(0, 0, 1), (0, 3, 2), (1, 1, 3)]:
        patches = ds[key]
        assert len(patches) == 2 and "crop_class" not in patches[0] and "label_cls_indices" not in patches[0]
        for p in patches:
            assert tuple(p["label"].shape) == (1, 8, 8, 8)
            assert bool((p["label"] == key[2]).any())
    loader = dm.train_dataloader()
    assert len(loader) == 11 // 2 + 1  # as many draws per pass as training cases (8 + 3), batch 2
    batch = next(iter(loader))
    assert tuple(batch["image"].shape) == (4, 1, 8, 8, 8)  # 2 draws x samples_per_volume 2


def test_sampling_default_and_bad_value(two_box_sets):
    from torch.utils.data import ConcatDataset

    assert isinstance(_dm(two_box_sets).split_dataset("train"), ConcatDataset)  # unchanged default ("cases")
    with pytest.raises(ValueError, match="sampling must be one of"):
        _dm(two_box_sets, sampling="datasets")


def test_fit_with_the_versatile_options_from_the_cli(two_box_sets, tmp_path):
    import csv
    import json
    from pathlib import Path

    import yaml

    from cfseg.apps.cli import main as cli

    example = yaml.safe_load((Path(__file__).parents[1] / "configs/openkbp/heads/versatile.yaml").read_text())
    assert example["model"] == {"head": "softmax", "loss_weights": {"exclusion_weight": 1.0, "entropy_weight": 0.1}}
    assert example["data"] == {"sampling": "hierarchical"}
    config = Path(__file__).parent / "configs" / "tiny.yaml"
    run = cli(["fit", "--config", str(config), f"--data.datasets={json.dumps(two_box_sets)}",
               f"--trainer.logger.init_args.save_dir={tmp_path}", f"--trainer.default_root_dir={tmp_path}",
               "--trainer.max_steps=2", "--trainer.limit_val_batches=0", "--data.spacing=[4.0, 4.0, 4.0]",
               "--data.patch_size=[8, 8, 8]", "--model.head=softmax",
               "--model.loss_weights.exclusion_weight=1.0", "--model.loss_weights.entropy_weight=0.1",
               "--data.sampling=hierarchical"])
    assert run.trainer.global_step == 2
    rows = list(csv.DictReader(open(Path(run.trainer.logger.log_dir) / "metrics.csv")))
    for name in ("train/exclusion_step", "train/entropy_step"):
        values = [float(r[name]) for r in rows if r.get(name)]
        assert values and all(np.isfinite(values))
