import numpy as np
import pytest
import torch
from conftest import make_nnunet, real_dataset

from cfseg.data.datamodule import DatasetConfig, SegDataModule, split_cases
from cfseg.data.formats import DatasetError, read_dataset


@pytest.fixture
def two_sites(tmp_path):
    a = make_nnunet(tmp_path / "site_a", {"liver": 1, "Right Kidney": 2}, n_cases=5, shape=(12, 12, 12))
    b = make_nnunet(tmp_path / "site_b", {"kidney_right": 4, "spleen": 6}, n_cases=5, shape=(12, 12, 12),
                    partial={f"case{i}": (["spleen"] if i % 2 else ["kidney_right", "spleen"]) for i in range(5)})
    return a, b


def dm_for(a, b, **kw):
    args = dict(spacing=(1.0, 1.0, 1.0), patch_size=(8, 8, 8), batch_size=2, samples_per_volume=2, augment=False)
    args.update(kw)
    return SegDataModule([DatasetConfig(str(a), name="A", val_fraction=0.2, test_fraction=0.2),
                          DatasetConfig(str(b), name="B", val_fraction=0.2, test_fraction=0.2)], **args)


def test_remap_by_name_and_annotated_masks(two_sites):
    dm = dm_for(*two_sites)
    assert dm.class_names == ["liver", "kidney_right", "spleen"]  # union, by name, in dataset order
    dm.setup("fit")
    seen = {"A": 0, "B": 0}
    for i in range(len(dm.split_dataset("train"))):
        for s in dm.split_dataset("train")[i]:
            lab, ann = s["label"], s["annotated"]
            assert ann.dtype == torch.bool and ann.shape == (4,) and ann[0]
            seen[s["dataset"]] += 1
            if s["dataset"] == "A":
                assert ann.tolist() == [True, True, True, False]
            else:
                case = int(s["case_id"][-1])
                assert ann.tolist() == [True, False, case % 2 == 0, True]
                if case % 2:  # kidney not annotated in this case: its voxels are not labelled kidney
                    assert not (lab == 2).any()
            assert set(torch.unique(lab).tolist()) <= set(torch.nonzero(ann).flatten().tolist())
    assert seen["A"] and seen["B"]


def test_global_class_list_and_values(two_sites):
    dm = dm_for(*two_sites, classes=["spleen", "liver", "kidney_right"])
    dm.setup("validate")
    vol = next(s for s in dm.split_dataset("val") if s["dataset"] == "B" and s["annotated"][1])
    raw = read_dataset(two_sites[1])
    import nibabel as nib
    lab = np.asarray(nib.load(raw.case(vol["case_id"]).label).dataobj)
    out = vol["label"][0].numpy()
    assert np.array_equal(out == 1, lab == 6)  # spleen is global 1 with the explicit class list
    assert vol["image"].shape[1:] == (12, 12, 12)  # validation volumes are whole


def test_batches(two_sites):
    dm = dm_for(*two_sites)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 1, 8, 8, 8) and batch["label"].shape == (4, 1, 8, 8, 8)
    assert batch["annotated"].shape == (4, 4) and len(batch["dataset"]) == 4 and len(batch["domain"]) == 4


def test_split_deterministic_and_disjoint(two_sites):
    info = read_dataset(two_sites[0])
    s1 = split_cases(info.cases, 0, "A", 0.2, 0.2)
    s2 = split_cases(info.cases, 0, "A", 0.2, 0.2)
    ids = {k: [c.case_id for c in v] for k, v in s1.items()}
    assert ids == {k: [c.case_id for c in v] for k, v in s2.items()}
    assert sorted(sum(ids.values(), [])) == [c.case_id for c in info.cases]
    assert len(ids["test"]) == 1 and len(ids["val"]) == 1 and len(ids["train"]) == 3
    others = [tuple(c.case_id for c in split_cases(info.cases, seed, "A", 0.2, 0.2)["test"]) for seed in range(8)]
    assert len(set(others)) > 1  # the seed matters
    # the split of a dataset does not depend on the other datasets listed
    a, b = two_sites
    d1 = dm_for(a, b)
    d2 = SegDataModule([DatasetConfig(str(a), name="A", val_fraction=0.2, test_fraction=0.2)],
                       spacing=(1.0, 1.0, 1.0), patch_size=(8, 8, 8))
    assert d1.datasets[0].split == d2.datasets[0].split


def test_split_file(two_sites, tmp_path):
    import json
    f = tmp_path / "split.json"
    f.write_text(json.dumps({"train": ["case0", "case1"], "val": ["case2"], "test": ["case3", "case4"]}))
    info = read_dataset(two_sites[0])
    s = split_cases(info.cases, 0, "A", split_file=f)
    assert [c.case_id for c in s["test"]] == ["case3", "case4"]
    f.write_text(json.dumps({"train": ["case0", "nope"]}))
    with pytest.raises(DatasetError, match="nope"):
        split_cases(info.cases, 0, "A", split_file=f)


def test_cache_does_not_reread(two_sites, monkeypatch):
    dm = dm_for(*two_sites)
    dm.setup("validate")
    import monai.transforms as mt
    calls = []
    orig = mt.LoadImaged.__call__
    monkeypatch.setattr(mt.LoadImaged, "__call__", lambda self, d, *a, **k: calls.append(1) or orig(self, d, *a, **k))
    ds = dm.split_dataset("val")
    for _ in range(2):
        for i in range(len(ds)):
            ds[i]
    assert calls == []  # loaded and resampled once, at setup


def test_config_errors(two_sites):
    a, b = two_sites
    with pytest.raises(ValueError, match="empty"):
        SegDataModule([])
    with pytest.raises(ValueError, match="share a name"):
        SegDataModule([DatasetConfig(str(a), name="X"), DatasetConfig(str(b), name="X")])
    with pytest.raises(ValueError, match="did you mean spleen"):
        SegDataModule([DatasetConfig(str(b), classes=["spleeen"])])


def test_restrict_classes_for_a_stage(two_sites):
    a, _ = two_sites
    dm = SegDataModule([DatasetConfig(str(a), classes=["liver"], test_fraction=0.2)],
                       classes=["liver", "kidney_right"], spacing=(1.0, 1.0, 1.0), patch_size=(8, 8, 8))
    dm.setup("test")
    vol = dm.split_dataset("test")[0]
    assert vol["annotated"].tolist() == [True, True, False]
    assert not (vol["label"] == 2).any()


def test_summary_lists_cases_and_classes(two_sites):
    text = dm_for(*two_sites).summary()
    assert "B  [nnunet, ct" in text and "kidney_right" in text
    assert "annotated in   3/5 cases" in text  # spleen-only cases 1 and 3 leave kidney in 3 of 5


def test_real_openkbp_datamodule():
    root = real_dataset("openkbp_oar")
    dm = SegDataModule([DatasetConfig(str(root), max_cases=6, val_fraction=0, test_fraction=0.34)],
                       spacing=(4.0, 4.0, 3.0), patch_size=(32, 32, 32), cache="none")
    assert dm.class_names[:2] == ["brainstem", "spinal_cord"]
    vol = dm.split_dataset("test")[0]
    info = read_dataset(root)
    case = info.case(vol["case_id"])
    assert vol["annotated"][1:].tolist() == [c in case.annotated for c in dm.class_names]
    assert np.allclose(np.abs(np.diag(vol["image"].affine.numpy()))[:3], [4.0, 4.0, 3.0])


def test_real_ct_and_mr_one_vocabulary():
    ct, mr = real_dataset("totalseg_ct"), real_dataset("totalseg_mr")
    dm = SegDataModule([DatasetConfig(str(ct), val_fraction=0, test_fraction=0),
                        DatasetConfig(str(mr), val_fraction=0, test_fraction=0)],
                       classes=["liver", "spleen", "kidney_left", "kidney_right", "aorta"],
                       spacing=(3.0, 3.0, 3.0), patch_size=(16, 16, 16), cache="none")
    assert [d.domain for d in dm.datasets] == ["ct", "mri"]
    for vol in dm.split_dataset("train"):
        lab = vol[0]["label"]
        assert int(lab.max()) <= 5


def test_no_validation_cases_skips_validation(two_sites):
    a, _ = two_sites
    dm = SegDataModule([DatasetConfig(str(a), val_fraction=0.0, test_fraction=0.2)], spacing=(1.0, 1.0, 1.0),
                       patch_size=(8, 8, 8))
    assert dm.val_dataloader() == []
    with pytest.raises(DatasetError, match="no test cases"):
        SegDataModule([DatasetConfig(str(a), val_fraction=0.2, test_fraction=0.0)]).test_dataloader()


def test_inverse_frequency_crop_ratios(two_sites):
    """Rarely annotated classes become crop centres more often where they are annotated: ratio N / n_c."""
    import monai.transforms as mt

    dm = dm_for(*two_sites, class_ratios="inverse_frequency")
    n, counts = dm.annotation_counts("train")
    expect = [0] * dm.num_classes
    for ds in dm.datasets:
        for case in ds.split["train"]:
            for c in ds.annotated(case):
                expect[dm.class_names.index(c) + 1] += 1
    assert n == sum(len(ds.split["train"]) for ds in dm.datasets) and counts[1:] == expect[1:]
    ratios = dm.crop_ratios()
    assert ratios == [1.0] + [n / c for c in counts[1:]]
    kidney = dm.class_names.index("kidney_right") + 1
    assert ratios[kidney] < ratios[dm.class_names.index("liver") + 1]  # kidney in A and B's even cases, liver in A
    dm.setup("fit")
    croppers = [t for part in dm.split_dataset("train").datasets for t in part.transform.transforms
                if isinstance(t, mt.RandCropByLabelClassesd)]
    assert croppers and all(list(c.cropper.ratios) == ratios for c in croppers)
    assert dm_for(*two_sites).crop_ratios() is None  # default: equal within each case
    with pytest.raises(ValueError, match="inverse_frequency"):
        dm_for(*two_sites, class_ratios="inverse")
    with pytest.raises(ValueError, match="class_ratios has 2 entries"):
        dm_for(*two_sites, class_ratios=[1.0, 2.0]).crop_ratios()


def test_train_fraction_replay_subset(tmp_path):
    """train_fraction keeps ceil(f * n) training cases, a seeded subset; val/test and other datasets unchanged."""
    import math

    from cfseg.data.datamodule import train_subset

    a = make_nnunet(tmp_path / "site_a", {"liver": 1}, n_cases=10, shape=(8, 8, 8))
    b = make_nnunet(tmp_path / "site_b", {"spleen": 1}, n_cases=5, shape=(8, 8, 8))

    def dm(fraction, seed=0):
        return SegDataModule([DatasetConfig(str(a), name="A", val_fraction=0.2, test_fraction=0.2,
                                            train_fraction=fraction),
                              DatasetConfig(str(b), name="B", val_fraction=0.2, test_fraction=0.2)],
                             spacing=(1.0, 1.0, 1.0), patch_size=(8, 8, 8), seed=seed)

    def ids(d, split, i=0):
        return [c.case_id for c in d.datasets[i].split[split]]

    full = dm(1.0)
    assert len(ids(full, "train")) == 6
    for f in (0.1, 0.25, 0.3, 0.5, 0.99):
        sub = dm(f)
        assert len(ids(sub, "train")) == math.ceil(round(f * 6, 9))
        assert set(ids(sub, "train")) <= set(ids(full, "train"))
        assert ids(sub, "train") == [i for i in ids(full, "train") if i in ids(sub, "train")]  # order kept
        assert ids(sub, "val") == ids(full, "val") and ids(sub, "test") == ids(full, "test")
        assert sub.datasets[1].split == full.datasets[1].split  # the other dataset is untouched
        assert ids(dm(f), "train") == ids(sub, "train")  # same seed, same subset
    assert set(ids(dm(0.25), "train")) <= set(ids(dm(0.5), "train"))  # nested
    assert len(dm(0.5).split_dataset("train").datasets[0]) == 3  # the loader sees the subset
    subsets = {tuple(ids(dm(0.5, seed), "train")) for seed in range(8)}
    assert len(subsets) > 1  # the seed matters
    # the subset does not depend on the other datasets listed
    alone = SegDataModule([DatasetConfig(str(a), name="A", val_fraction=0.2, test_fraction=0.2, train_fraction=0.5)],
                          spacing=(1.0, 1.0, 1.0), patch_size=(8, 8, 8))
    assert ids(alone, "train") == ids(dm(0.5), "train")
    cases = read_dataset(a).cases
    assert len(train_subset(cases[:3], 0.01, 0, "A")) == 1  # at least one case


@pytest.mark.parametrize("bad", [0, 0.0, -0.5, 1.5, float("nan"), "0.5", True])
def test_train_fraction_rejected(tmp_path, bad):
    with pytest.raises(ValueError, match="train_fraction must be in \\(0, 1\\]"):
        DatasetConfig(str(tmp_path), train_fraction=bad)
