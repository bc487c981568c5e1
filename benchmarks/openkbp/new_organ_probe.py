"""Why a stage's new organs are never predicted: the teacher's and the student's labels on their voxels.

For the first ``--cases`` validation cases of a protocol stage, and each of the stage's new classes a case
annotates, prints what the teacher (the previous stage's checkpoint) and the student (this stage's) predict on that
class's voxels (fraction per predicted class) and the student's largest probability of the class there. A teacher
that predicted an old class on them would pseudo-label the new organ as that class where the organ is not
annotated; a student whose largest probability stays near 0 never learnt the class.

Usage (OpenKBP v2, seed 0, the `distill_plop_sep` stage 2; reports/README.md, section 3b)::

    .venv/bin/python benchmarks/openkbp/new_organ_probe.py \\
        --teacher results/openkbp/incremental_v2/seed0/runs/distill_plop_sep_stage1/final.ckpt \\
        --student results/openkbp/incremental_v2/seed0/runs/distill_plop_sep_stage2/final.ckpt \\
        --split-file configs/openkbp/split_stage2.json --classes esophagus larynx
"""

from __future__ import annotations

import argparse

import torch

from cfseg.data.datamodule import DatasetConfig, SegDataModule
from cfseg.data.transforms import build_transforms
from cfseg.inference import predict_volume
from cfseg.module import load_checkpoint


def _shares(labels: torch.Tensor, on: torch.Tensor, names: list[str]) -> dict[str, float]:
    """Fraction of the voxels ``on`` predicted as each class."""
    return {names[c]: round(float((labels[on] == c).float().mean()), 3) for c in labels[on].unique().tolist()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--teacher", required=True, help="the previous stage's checkpoint")
    p.add_argument("--student", required=True, help="this stage's checkpoint")
    p.add_argument("--data", default="../shared/data/openkbp_oar")
    p.add_argument("--split-file", required=True, help="the stage's split file")
    p.add_argument("--classes", nargs="+", required=True, help="the stage's new classes")
    p.add_argument("--cases", type=int, default=4, help="first N validation cases")
    a = p.parse_args(argv)
    teacher, student = load_checkpoint(a.teacher).eval(), load_checkpoint(a.student).eval()
    pre = next(iter(student.preprocessing.values()))
    dm = SegDataModule([DatasetConfig(path=a.data, split_file=a.split_file)], classes=student.class_names,
                       spacing=tuple(pre["spacing"]), cache="none", seed=0)
    ds, names = dm.datasets[0], student.bank.names
    tf = build_transforms(dm.preprocessing(ds.info.modality), train=False)
    for item in dm.items(ds, "val")[: a.cases]:
        vol = tf(item)
        lab = vol["label"][0].long()
        t_labels = predict_volume(teacher, vol["image"])["labels"].long()
        out = predict_volume(student, vol["image"])
        s_labels = out["labels"].long()
        for name in a.classes:
            k = names.index(name)
            on = lab == k
            if not bool(on.any()):
                continue
            print(f"{item['case_id']} {name}: {int(on.sum())} voxels; teacher {_shares(t_labels, on, names)}; "
                  f"student {_shares(s_labels, on, names)}; student's largest p({name}) there "
                  f"{float(out['probs'][k][on].max()):.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
