"""cfseg-demo's command-line plumbing and benchmarks/synthetic/demo_check.py (the demo itself runs in `make demo`,
not in the test suite)."""

import json
from pathlib import Path

import torch

from cfseg.apps.demo import CONFIG, last_callback_is_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def test_demo_checkpoint_folder_follows_out(tmp_path):
    """demo.yaml's ModelCheckpoint is the callback a --out override reaches; a config without one gets none."""
    assert last_callback_is_checkpoint(CONFIG)
    assert not last_callback_is_checkpoint(ROOT / "configs" / "incremental" / "base.yaml")
    other = tmp_path / "c.yaml"
    other.write_text("trainer:\n  callbacks:\n    - class_path: lightning.pytorch.callbacks.ModelCheckpoint\n"
                     "    - class_path: lightning.pytorch.callbacks.LearningRateMonitor\n")
    assert not last_callback_is_checkpoint(other)


def _benchmark(name: str):
    """benchmarks/synthetic/<name>.py as a module."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / "synthetic" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _demo_check():
    return _benchmark("demo_check")


def test_demo_check_sites_are_the_held_out_scanner_on_other_cases(tmp_path):
    """The validation and oracle sites: the held-out site's scanner and classes, none of its cases."""
    import nibabel as nib
    import numpy as np

    from cfseg.data.phantoms import ORGANS
    from cfseg.data.synthetic import PRESETS, site_for_run, write_nnunet_dataset

    mod = _demo_check()
    site = mod.held_out_site()
    assert site.name == "test_ct" and set(site.classes) == set(ORGANS)
    val, oracle = mod.main(["sites", "--out", str(tmp_path), "--n-oracle", "3", "--shape", "16", "16", "16",
                            "--train-cases", "22"])
    test = write_nnunet_dataset(tmp_path / "t", site_for_run(site, 0, (16, 16, 16)), 3)

    def image(root, case):
        return np.asarray(nib.load(next((root / "imagesTr").glob(f"*_{case:03d}_0000.nii.gz"))).dataobj)

    assert len(list((oracle / "labelsTr").glob("*.nii.gz"))) == 3
    assert len(list((val / "labelsTr").glob("*.nii.gz"))) == site.n_cases
    for root in (val, oracle):
        labels = json.loads((root / "dataset.json").read_text())["labels"]
        assert set(ORGANS) <= set(labels)  # fully annotated, as the held-out site
        assert not np.array_equal(image(root, 0), image(test, 0))
    assert not np.array_equal(image(val, 0), image(oracle, 0))
    # more training cases: make demo's own cases first, the held-out site unchanged
    more = sorted((tmp_path / "train22").glob("Dataset*"))
    assert [p.name for p in more] == ["Dataset001_site_a_ct", "Dataset002_site_b_ct", "Dataset003_test_ct"]
    assert len(list((more[0] / "labelsTr").glob("*.nii.gz"))) == 22
    demo_a = write_nnunet_dataset(tmp_path / "a", site_for_run(PRESETS["demo"][0], 0, (16, 16, 16)), 1)
    assert np.array_equal(image(more[0], 19), image(demo_a, 19))
    assert np.array_equal(image(more[2], 0), image(test, 0))


def test_demo_check_scores_each_checkpoint_on_both_sites(box_model, boxes, tmp_path):
    from cfseg.data.datamodule import DatasetConfig
    from cfseg.evaluation import evaluate_datasets
    from cfseg.module import load_checkpoint

    mod = _demo_check()
    out = tmp_path / "check"
    res = mod.main(["score", "--run", f"tiny={box_model}", "--val", str(boxes), "--test", str(boxes),
                    "--out", str(out)])
    ref = evaluate_datasets(load_checkpoint(str(box_model)), [DatasetConfig(str(boxes))], split="all")
    assert res["tiny"]["val"]["mean_dice"] == res["tiny"]["test"]["mean_dice"] == ref["mean_dice"]
    assert res["tiny"]["steps"] == 40
    assert json.loads(out.with_suffix(".json").read_text()) == res
    assert f"| tiny | 40 | {ref['mean_dice']:.3f} |" in out.with_suffix(".md").read_text()


class _Process:
    """Stands in for the protocol's process: alive for the first ``alive_for`` checks."""

    def __init__(self, alive_for: int) -> None:
        self.checks, self.alive_for = 0, alive_for

    def is_alive(self) -> bool:
        self.checks += 1
        return self.checks <= self.alive_for


def test_training_takes_the_threads_once_the_protocol_has_ended(boxes, tmp_path):
    """cfseg-demo's ThreadsAfterProcess, passed through cfseg.apps.cli.main beside the config's callbacks."""
    from lightning.pytorch import Callback

    from cfseg.apps.cli import main as cli
    from cfseg.apps.demo import ThreadsAfterProcess

    seen = []

    class Record(Callback):
        def on_train_batch_end(self, *args) -> None:
            seen.append(torch.get_num_threads())

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        process = _Process(alive_for=2)
        run = cli(["fit", "--config", str(ROOT / "tests" / "configs" / "tiny.yaml"),
                   f"--data.datasets={json.dumps([{'path': str(boxes), 'val_fraction': 0.34}])}",
                   f"--trainer.logger.init_args.save_dir={tmp_path}", f"--trainer.default_root_dir={tmp_path}",
                   "--data.spacing=[4.0, 4.0, 4.0]", "--trainer.limit_val_batches=0", "--trainer.max_epochs=10"],
                  [ThreadsAfterProcess(process, 3), Record()])
        assert seen == [1, 1, 3, 3]  # the third step finds the process ended
        assert process.checks == 3  # and stops asking
        assert any(type(c).__name__ == "ModelCheckpoint" for c in run.trainer.callbacks)  # the config's stay
    finally:
        torch.set_num_threads(before)


def test_largest_component_check_keeps_one_piece_per_class():
    """benchmarks/synthetic/largest_component.py: all but each class's largest 26-connected piece become background."""
    lc = _benchmark("largest_component")
    labels = torch.zeros(8, 8, 8, dtype=torch.uint8)
    labels[0:3, 0:3, 0:3] = 1  # 27 voxels
    labels[6:8, 6:8, 6:8] = 1  # 8 voxels, apart
    labels[4, 4, 4] = 2  # one piece only
    labels[3, 3, 3] = 1  # touches the big piece at a corner: 26-connected, kept
    out = lc.keep_largest_components(labels, 3)
    assert (out[6:8, 6:8, 6:8] == 0).all() and (out[0:3, 0:3, 0:3] == 1).all() and out[3, 3, 3] == 1
    assert out[4, 4, 4] == 2 and int((out == 1).sum()) == 28


def test_evaluate_datasets_scores_the_postprocessed_labels(box_model, boxes):
    """``postprocess`` acts on each case's labels before scoring: the identity scores as without it, an empty
    prediction scores 0."""
    from cfseg.data.datamodule import DatasetConfig
    from cfseg.evaluation import evaluate_datasets
    from cfseg.module import load_checkpoint

    module, data = load_checkpoint(str(box_model)), [DatasetConfig(str(boxes))]
    ref = evaluate_datasets(module, data, split="all")
    assert ref["mean_dice"] > 0
    assert evaluate_datasets(module, data, split="all", postprocess=lambda x: x.clone())["per_class_dice"] == \
        ref["per_class_dice"]
    assert evaluate_datasets(module, data, split="all", postprocess=torch.zeros_like)["mean_dice"] == 0.0
