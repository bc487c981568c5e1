"""How often each OpenKBP organ is seen in training: why the esophagus stayed at Dice 0 (issue: no organ at zero).

    python benchmarks/openkbp/class_exposure.py [--split configs/openkbp/split_joint.json] [--out benchmarks/openkbp]

For the joint training cases, at the training grid (4 x 4 x 3 mm, RAS), per organ: how many cases annotate it,
its size in voxels, and what a class-balanced 64^3 crop sees under equal crop-centre ratios (the old default)
and ``class_ratios: inverse_frequency``: the share of crop centres on the organ, the share of patches that
contain any of it, and the organ's share of the supervised voxels of all patches (what the partial-label CE
weighs it by). Crops are simulated exactly as MONAI's ``RandCropByLabelClassesd`` draws them (class by the
case's ratios over the classes present, then a voxel of that class; centres clamped so the patch fits), 64
patches per case, numpy seed 0. Writes ``class_exposure.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import monai.transforms as mt
import numpy as np

from cfseg.data.datamodule import SegDataModule
from cfseg.data.transforms import LoadCased, RemapLabelsd

ROOT = Path(__file__).resolve().parents[2]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "openkbp_oar"))
    p.add_argument("--split", default=str(ROOT / "configs" / "openkbp" / "split_joint.json"))
    p.add_argument("--patch", type=int, default=64)
    p.add_argument("--patches-per-case", type=int, default=64)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    a = p.parse_args()
    dm = SegDataModule([{"path": a.data, "split_file": a.split}], spacing=(4.0, 4.0, 3.0), cache="none")
    ds = dm.datasets[0]
    items = dm.items(ds, "train")
    names = ["background", *dm.class_names]
    K = len(names)
    load = mt.Compose([LoadCased(["label"], image_only=True, ensure_channel_first=True), RemapLabelsd("label"),
                       mt.Orientationd(["label"], axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
                       mt.Spacingd(["label"], pixdim=(4.0, 4.0, 3.0), mode="nearest")])
    dm.hparams.class_ratios = "inverse_frequency"
    schemes = {"equal": [1.0] * K, "inverse_frequency": dm.crop_ratios()}
    rng = np.random.default_rng(0)
    size = np.zeros(K)
    n_ann = np.zeros(K, int)
    stats = {s: {"centre": np.zeros(K), "contains": np.zeros(K), "voxels": np.zeros(K), "patches": 0}
             for s in schemes}
    ps = a.patch
    for it in items:
        lab = np.asarray(load({"label": it["label"], "label_lut": it["label_lut"]})["label"])[0].astype(np.int64)
        ann = it["annotated"].numpy()
        counts = np.bincount(lab.ravel(), minlength=K)
        n_ann += ann
        size += np.where(ann, counts, 0)
        present = [k for k in range(K) if counts[k] > 0]
        where = {k: np.flatnonzero(lab.ravel() == k) for k in present}
        pad = [max(ps, s) for s in lab.shape]
        for s, ratios in schemes.items():
            w = np.array([ratios[k] for k in present], float)
            w /= w.sum()
            for _ in range(a.patches_per_case):
                k = present[rng.choice(len(present), p=w)]
                c = np.unravel_index(where[k][rng.integers(len(where[k]))], lab.shape)
                lo = [int(min(max(ci - ps // 2, 0), max(pi - ps, 0))) for ci, pi in zip(c, pad, strict=True)]
                patch = lab[lo[0]:lo[0] + ps, lo[1]:lo[1] + ps, lo[2]:lo[2] + ps]
                pc = np.bincount(patch.ravel(), minlength=K)
                st = stats[s]
                st["centre"][k] += 1
                st["contains"] += pc > 0
                st["voxels"] += pc
                st["patches"] += 1
    n = len(items)
    rows = []
    for k in range(1, K):
        row = {"class": names[k], "cases_annotating": int(n_ann[k]), "of_cases": n,
               "mean_voxels_where_annotated": float(size[k] / max(n_ann[k], 1))}
        for s, st in stats.items():
            row[f"{s}_centre_share"] = float(st["centre"][k] / st["patches"])
            row[f"{s}_patches_containing"] = float(st["contains"][k] / st["patches"])
            row[f"{s}_voxel_share"] = float(st["voxels"][k] / st["voxels"].sum())
        rows.append(row)
    doc = {"split": a.split, "patch": ps, "patches_per_case": a.patches_per_case, "ratios": schemes, "rows": rows}
    (a.out / "class_exposure.json").write_text(json.dumps(doc, indent=2))
    lines = ["| organ | cases annotating | voxels (4x4x3 mm) | crop centres: equal | inverse freq | patches "
             "containing it: equal | inverse freq | share of patch voxels: equal | inverse freq |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['class']} | {r['cases_annotating']}/{n} | {r['mean_voxels_where_annotated']:.0f} | "
                     f"{r['equal_centre_share']:.3f} | {r['inverse_frequency_centre_share']:.3f} | "
                     f"{r['equal_patches_containing']:.3f} | {r['inverse_frequency_patches_containing']:.3f} | "
                     f"{r['equal_voxel_share']:.4f} | {r['inverse_frequency_voxel_share']:.4f} |")
    (a.out / "class_exposure.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
