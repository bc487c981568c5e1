"""Out-of-domain scores of a trained checkpoint (:mod:`cfseg.ood`): in-domain test cases against inputs it never saw.

The domain statistics are fitted as the end of a stage fits them (``fit_domain_statistics`` on the training data of
``--config``, calibrated on its validation cases), then every file of each ``--group NAME=GLOB`` is scored in the
modality-neutral view, plus uniform noise on the grid of the first in-domain file. ``--group NAME=split:test``
scores the test cases of the datasets' split (``--split-file``: the training run's split). Writes ``--out`` (JSON):
the threshold, the calibration scores, and per group each file's score and whether it would be warned.

    .venv/bin/python benchmarks/ood.py --ckpt results/demo/cfseg-demo.ckpt --config configs/demo.yaml \\
        --datasets data/synthetic/Dataset001_site_a_ct data/synthetic/Dataset002_site_b_ct \\
        --group in_domain_test='data/synthetic/Dataset003_test_ct/imagesTr/*.nii.gz' \\
        --group synthetic_mri='data/synthetic/Dataset013_stage2_mri/imagesTr/*.nii.gz' \\
        --group real_ct='../shared/data/openkbp_oar/imagesTr/*.nii.gz' --out reports/data/ood/demo.json

    .venv/bin/python benchmarks/ood.py --ckpt <openkbp joint.ckpt> --config configs/openkbp/base.yaml \
        --datasets ../shared/data/openkbp_oar --split-file configs/openkbp/split_joint.json --max-files 40 \
        --group in_domain_test=split:test --group totalseg_ct='../shared/data/totalseg_ct/imagesTr/*.nii.gz' \
        --group totalseg_mr='../shared/data/totalseg_mr/imagesTr/*.nii.gz' \
        --group synthetic_ct='data/synthetic/Dataset003_test_ct/imagesTr/*.nii.gz' --out reports/data/ood/openkbp.json
"""

from __future__ import annotations

import argparse
import glob
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import yaml

from cfseg.data.datamodule import SegDataModule
from cfseg.data.transforms import Preprocessing, neutral_view
from cfseg.module import load_checkpoint
from cfseg.ood import fit_domain_statistics
from cfseg.segmentation import preprocess


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True)
    p.add_argument("--config", required=True, help="the training config (its data section: spacing, patch)")
    p.add_argument("--datasets", nargs="+", required=True, help="the training datasets (their val cases calibrate)")
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--split-file", default=None, help="the datasets' split file (train / val / test case ids)")
    p.add_argument("--cases", type=int, default=16, help="cases per dataset (model.statistics.router_batches)")
    p.add_argument("--group", action="append", default=[], help="NAME=GLOB of files to score (repeatable)")
    p.add_argument("--max-files", type=int, default=10, help="files per group")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    torch.manual_seed(0)
    module = load_checkpoint(a.ckpt)
    data = (yaml.safe_load(Path(a.config).read_text()) or {}).get("data", {})
    keep = {k: data[k] for k in ("spacing", "patch_size", "ct_window", "orientation") if k in data}
    split = {"split_file": a.split_file} if a.split_file else {"val_fraction": a.val_fraction, "test_fraction": 0.0}
    dm = SegDataModule([{"path": d, **split} for d in a.datasets], cache="none", **keep)
    if module.modality_router is not None:
        view = Preprocessing.from_dict(module.modality_router.view)
    else:
        first = dm.preprocessing(dm.datasets[0].info.modality)
        view = neutral_view(first.spacing, first.orientation)
    stats = fit_domain_statistics(module, dm, view, a.cases)
    module.domain_statistics = stats

    def score(img: nib.Nifti1Image) -> float:
        return module.ood_score(preprocess(img, view)["image"][None])[0]

    out = {"checkpoint": a.ckpt, "threshold": stats.threshold, "calibration": stats.calibration, "groups": {}}
    first_file = None
    for spec in a.group:
        name, pattern = spec.split("=", 1)
        if pattern.startswith("split:"):
            files = [str(it["image"]) for d in dm.datasets for it in dm.items(d, pattern[len("split:"):])]
        else:
            files = sorted(glob.glob(pattern))
        files = files[: a.max_files]
        first_file = first_file or (files[0] if files else None)
        scores = [score(nib.load(f)) for f in files]
        out["groups"][name] = {"files": files, "scores": scores,
                               "warned": [s > stats.threshold for s in scores],
                               "warned_fraction": float(np.mean([s > stats.threshold for s in scores]))}
        print(f"{name}: {len(files)} files, scores {[round(s, 3) for s in scores]}, "
              f"warned {out['groups'][name]['warned_fraction']:.0%}", flush=True)
    if first_file:
        ref = nib.load(first_file)
        noise = np.random.default_rng(0).uniform(-1000, 1000, ref.shape).astype(np.float32)
        s = score(nib.Nifti1Image(noise, ref.affine))
        out["groups"]["uniform_noise"] = {"scores": [s], "warned": [s > stats.threshold],
                                          "warned_fraction": float(s > stats.threshold)}
        print(f"uniform_noise: score {s:.3f}", flush=True)
    print(f"threshold {stats.threshold:.3f} (calibration scores {[round(c, 3) for c in stats.calibration]})")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
