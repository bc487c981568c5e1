"""OpenKBP (../shared/data/openkbp_oar) -> nnU-Net v2 raw dataset, with cfseg's joint split as nnU-Net's fold 0.

Writes, under ``--root`` (default ``results/nnunet``, git-ignored)::

    nnUNet_raw/Dataset501_OpenKBP/imagesTr, labelsTr   the split's 153 train + 10 val cases
    nnUNet_raw/Dataset501_OpenKBP/imagesTs, labelsTs   its 40 test cases
    nnUNet_raw/Dataset501_OpenKBP/dataset.json         the 7 organ labels (same values as the source)
    nnUNet_preprocessed/Dataset501_OpenKBP/splits_final.json   fold 0 = cfseg's train / val (10 cases)

Files are symbolic links to the source (``--copy`` copies them); the source already uses nnU-Net's file names
(``<case>_0000.nii.gz`` images, ``<case>.nii.gz`` labels).

Partial annotation: OpenKBP does not contour every organ in every case (``partial_labels.json``; e.g. the esophagus
in 60 and the larynx in 72 of the 153 training cases). cfseg knows which organs each case annotates and its loss
and Dice leave the others out. nnU-Net is given the label maps as they are: an organ that was not contoured in a
case is background there, and nnU-Net trains on it as background (it has no per-case "annotated classes"; its
ignore label would need a region, not a class). Scoring is the same for both (only each case's annotated organs,
``benchmarks/nnunet/score.py``); what differs is what each method is told during training, and that is part of
the comparison.

    .venv/bin/python benchmarks/nnunet/convert_openkbp.py            (stdlib only: any python3 works)
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT.parent / "shared" / "data" / "openkbp_oar"
SPLIT = ROOT / "configs" / "openkbp" / "split_joint.json"
DATASET_ID = 501
DATASET_NAME = f"Dataset{DATASET_ID}_OpenKBP"


def _place(src: Path, dst: Path, copy: bool) -> None:
    if not src.is_file():
        raise FileNotFoundError(f"{src} is missing")
    if dst.is_symlink() or dst.exists():
        dst.unlink()
    if copy:
        shutil.copy2(src, dst)
    else:
        dst.symlink_to(src.resolve())


def convert(data: Path, split_file: Path, root: Path, copy: bool = False) -> dict:
    """Write the raw dataset and fold 0's split; returns a summary (case counts, paths)."""
    split = json.loads(split_file.read_text())
    source = json.loads((data / "dataset.json").read_text())
    partial = json.loads((data / "partial_labels.json").read_text())
    trainval = list(split["train"]) + list(split["val"])
    test = list(split["test"])
    if set(trainval) & set(test):
        raise ValueError("the split's test cases overlap its training/validation cases")
    raw = root / "nnUNet_raw" / DATASET_NAME
    pre = root / "nnUNet_preprocessed" / DATASET_NAME
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        folder = raw / sub
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
    for cases, img_dir, lab_dir in ((trainval, "imagesTr", "labelsTr"), (test, "imagesTs", "labelsTs")):
        for case in cases:
            _place(data / "imagesTr" / f"{case}_0000.nii.gz", raw / img_dir / f"{case}_0000.nii.gz", copy)
            _place(data / "labelsTr" / f"{case}.nii.gz", raw / lab_dir / f"{case}.nii.gz", copy)
    labels = dict(source["labels"])
    dataset_json = {
        "name": "OpenKBP",
        "description": ("OpenKBP head-and-neck organs at risk, cfseg's joint split (configs/openkbp/split_joint.json):"
                        " imagesTr = its train + val cases, imagesTs = its 40 test cases. Partially annotated: an "
                        "organ not contoured in a case is background in its label map."),
        "reference": source.get("reference", ""),
        "channel_names": {"0": "CT"},
        "labels": labels,
        "numTraining": len(trainval),
        "file_ending": ".nii.gz",
    }
    (raw / "dataset.json").write_text(json.dumps(dataset_json, indent=1))
    pre.mkdir(parents=True, exist_ok=True)
    (pre / "splits_final.json").write_text(json.dumps([{"train": list(split["train"]),
                                                         "val": list(split["val"])}], indent=1))
    organs = [n for n in labels if n != "background"]
    counts = {o: sum(o in partial[c] for c in split["train"]) for o in organs}
    return {"raw": str(raw), "splits_final": str(pre / "splits_final.json"), "train": len(split["train"]),
            "val": len(split["val"]), "test": len(test), "train_cases_annotating": counts}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--split", type=Path, default=SPLIT)
    p.add_argument("--root", type=Path, default=ROOT / "results" / "nnunet",
                   help="holds nnUNet_raw / nnUNet_preprocessed / nnUNet_results")
    p.add_argument("--copy", action="store_true", help="copy the files instead of linking them")
    args = p.parse_args(argv)
    print(json.dumps(convert(args.data, args.split, args.root, args.copy), indent=1))


if __name__ == "__main__":
    main()
