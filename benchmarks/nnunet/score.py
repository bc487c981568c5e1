"""Score a folder of predicted label maps (e.g. nnU-Net's) on OpenKBP's 40 test cases with cfseg's own scorer.

Run with cfseg's environment::

    .venv/bin/python benchmarks/nnunet/score.py --pred results/nnunet/predictions/<trainer>/checkpoint_final \\
        --name nnunet_equal_s0_final --out reports/data/nnunet/equal_terms_s0_final.json

Conventions are the ones of cfseg's tables (``benchmarks/openkbp/heads.py``, whose ``case_metrics`` and
``summarise_seed`` this reuses):

* **grid**: the prediction ``<case>.nii.gz`` (label values as in the source ``dataset.json``) and the ground truth
  go through cfseg's own evaluation preprocessing (``SegDataModule`` items of the committed split, ``build_transforms
  (train=False)``: reorientation to RAS and nearest-neighbour resampling to cfseg's 4 x 4 x 3 mm grid), so the
  scores are computed on the same voxels as cfseg's; a prediction made at the images' own resolution is thereby
  resampled like cfseg's ground truth is;
* **classes**: each case only on its annotated organs (``partial_labels.json``, via the data module's ``annotated``
  mask), whatever the prediction holds for the others;
* **Dice**: :data:`cfseg.metrics.DICE_CONVENTION` (both empty 1, one empty 0); **HD95** and **surface Dice**
  (2 mm by default): ``heads.py``'s conventions (HD95 undefined with an empty mask: left out and counted).

Also written (secondary, ``native_grid``): Dice on the images' own voxel grid (prediction and ground truth as
stored, no resampling), the grid nnU-Net itself reports on.

With ``--train-log`` (an nnU-Net fold folder) the per-epoch training seconds per iteration that
``nnUNetTrainer_cfsegEqual`` logs are added (``training``), with nnU-Net's own train / validation loss and pseudo
Dice of each epoch.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import platform
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT.parent / "shared" / "data" / "openkbp_oar"
SPLIT = ROOT / "configs" / "openkbp" / "split_joint.json"
SPACING = (4.0, 4.0, 3.0)  # configs/openkbp/base.yaml data.spacing
CT_WINDOW = (-250.0, 500.0)  # configs/openkbp/base.yaml data.ct_window


def _heads_module():
    """benchmarks/openkbp/heads.py (a script, not a package): its metric and aggregation functions."""
    spec = importlib.util.spec_from_file_location("cfseg_openkbp_heads", ROOT / "benchmarks" / "openkbp" / "heads.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


_EPOCH = re.compile(r": Epoch (\d+)\s*$", re.M)
_LOSS = re.compile(r": (train_loss|val_loss) (-?[0-9.]+(?:e-?\d+)?|nan)\s*$", re.M)
_PSEUDO_DICE = re.compile(r": Pseudo dice \[(.*)\]\s*$", re.M)
_FLOAT = re.compile(r"-?\d+\.\d*(?:e-?\d+)?|nan")


def _progress(text: str) -> dict[int, dict[str, Any]]:
    """Per epoch of one nnU-Net training log: its train and validation loss and its pseudo Dice per class (the
    lines nnU-Net prints at the end of every epoch; numbers such as ``np.float32(0.0)`` are read as floats)."""
    starts = list(_EPOCH.finditer(text))
    out: dict[int, dict[str, Any]] = {}
    bounds = [m.start() for m in starts] + [len(text)]
    for m, end in zip(starts, bounds[1:], strict=True):
        block = text[m.end(): end]
        fields: dict[str, Any] = {k: float(v) for k, v in _LOSS.findall(block)}
        dice = _PSEUDO_DICE.search(block)
        if dice:
            fields["pseudo_dice"] = [float(v) for v in _FLOAT.findall(dice.group(1))]
        if fields:
            out[int(m.group(1))] = fields
    return out


def training_summary(fold_dir: Path) -> dict[str, Any] | None:
    """Per epoch of ``nnUNetTrainer_cfsegEqual``'s logs (all logs of the fold, a later log overriding an epoch it
    repeats): seconds and CPU seconds per training iteration, and nnU-Net's train loss, validation loss and pseudo
    Dice per class."""
    pat = re.compile(r"cfseg-equal: train seconds/iteration ([0-9.]+) \(epoch (\d+), (\d+) iterations, "
                     r"load average ([0-9.]+)\)")
    cpu_pat = re.compile(r"cfseg-equal: train CPU seconds/iteration ([0-9.]+) \(epoch (\d+),")
    epochs: dict[int, dict[str, Any]] = {}
    for log in sorted(fold_dir.glob("training_log_*.txt")):
        text = log.read_text(errors="replace")
        for m in pat.finditer(text):
            epochs[int(m.group(2))] = {"seconds_per_iteration": float(m.group(1)), "iterations": int(m.group(3)),
                                       "load_average": float(m.group(4))}
        for m in cpu_pat.finditer(text):
            epochs.setdefault(int(m.group(2)), {})["cpu_seconds_per_iteration"] = float(m.group(1))
        for epoch, fields in _progress(text).items():
            if epoch in epochs:
                epochs[epoch].update(fields)
    if not epochs:
        return None
    spi = [e["seconds_per_iteration"] for e in epochs.values()]
    return {"epochs_logged": len(epochs), "iterations_logged": sum(e["iterations"] for e in epochs.values()),
            "median_seconds_per_iteration": statistics.median(spi),
            "train_seconds_logged": round(sum(e["seconds_per_iteration"] * e["iterations"] for e in epochs.values()),
                                          1),
            "per_epoch": {str(k): v for k, v in sorted(epochs.items())}}


def score(pred_dir: Path, data: Path = DATA, split: Path = SPLIT, tolerance_mm: float = 2.0,
          max_cases: int | None = None) -> dict[str, Any]:
    """Per-case and per-class metrics of the predictions in ``pred_dir`` on the split's test cases."""
    from cfseg.data.datamodule import DatasetConfig, SegDataModule
    from cfseg.data.transforms import build_transforms, make_label_lut
    from cfseg.metrics import DICE_CONVENTION, dice_per_class

    heads = _heads_module()
    dm = SegDataModule([DatasetConfig(path=str(data), split_file=str(split))], spacing=SPACING, ct_window=CT_WINDOW,
                       cache="none", seed=0)
    ds = dm.datasets[0]
    names = dm.vocab.names  # index 0 = background
    classes = names[1:]
    gidx = {n: i for i, n in enumerate(names)}
    every_class = make_label_lut(ds.info.labels, list(ds.info.labels), gidx)  # prediction: every value kept
    transform = build_transforms(dm.preprocessing(ds.info.modality), train=False)
    items = dm.items(ds, "test")[:max_cases] if max_cases else dm.items(ds, "test")
    missing = [it["case_id"] for it in items if not (pred_dir / f"{it['case_id']}.nii.gz").is_file()]
    if missing:
        raise FileNotFoundError(f"{pred_dir}: no prediction for {len(missing)} test cases, e.g. {missing[:3]}")
    cases: dict[str, dict[str, Any]] = {}
    native: dict[str, list[float]] = {c: [] for c in classes}
    spacing_mm = None
    t0 = time.perf_counter()
    for item in items:
        pred_path = pred_dir / f"{item['case_id']}.nii.gz"
        vol = transform(item)
        pred = transform(dict(item, label=str(pred_path), label_lut=every_class))["label"][0].long()
        gt = vol["label"][0].long()
        spacing = heads.voxel_spacing(vol["image"].affine)
        spacing_mm = spacing_mm or list(spacing)
        ks = torch.nonzero(vol["annotated"]).flatten().tolist()
        ks = [k for k in ks if k > 0]
        per = heads.case_metrics(pred, gt, ks, spacing, tolerance_mm)
        cases[item["case_id"]] = {names[k]: v for k, v in per.items()}
        # native grid: the files as stored (ground truth through the case's annotation look-up table)
        p_nat = torch.from_numpy(every_class[np.asarray(nib.load(pred_path).dataobj).astype(np.int64)])
        g_nat = torch.from_numpy(item["label_lut"][np.asarray(nib.load(item["label"]).dataobj).astype(np.int64)])
        for k, d in zip(ks, dice_per_class(p_nat.long(), g_nat.long(), ks).tolist(), strict=True):
            native[names[k]].append(d)
    summary = heads.summarise_seed(cases, classes)
    nat_pc = {c: (sum(v) / len(v) if v else float("nan")) for c, v in native.items()}
    vals = [v for v in nat_pc.values() if not math.isnan(v)]
    return {
        **summary,
        "classes": classes,
        "spacing_mm": spacing_mm,
        "tolerance_mm": tolerance_mm,
        "dice_convention": DICE_CONVENTION,
        "hd95_convention": heads.HD95_CONVENTION,
        "surface_dice_convention": heads.NSD_CONVENTION.format(tol=tolerance_mm),
        "native_grid": {"per_class": nat_pc, "mean_dice": sum(vals) / len(vals) if vals else float("nan"),
                        "note": "Dice on the images' own voxel grid (no resampling), same classes and convention"},
        "cases": cases,
        "scoring_seconds": round(time.perf_counter() - t0, 1),
    }


def _clean(obj: Any) -> Any:
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    return obj


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pred", type=Path, required=True, help="folder of <case>.nii.gz label maps")
    p.add_argument("--name", default=None, help="row name stored in the JSON (default: the folder's name)")
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--split", type=Path, default=SPLIT)
    p.add_argument("--tolerance-mm", type=float, default=2.0)
    p.add_argument("--max-cases", type=int, default=None)
    p.add_argument("--train-log", type=Path, default=None, help="nnU-Net fold folder with training_log_*.txt")
    p.add_argument("--out", type=Path, default=None, help="JSON to write (default: print only)")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    result = score(a.pred, a.data, a.split, a.tolerance_mm, a.max_cases)
    info = a.pred / "predict_info.json"
    report = {
        "name": a.name or a.pred.name,
        "predictions": str(a.pred),
        "predict": json.loads(info.read_text()) if info.is_file() else None,
        "training": training_summary(a.train_log) if a.train_log else None,
        "split": str(a.split.relative_to(ROOT)) if a.split.is_relative_to(ROOT) else str(a.split),
        "command": " ".join([Path(sys.executable).name, *sys.argv]) if argv is None else None,
        "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}",
        **result,
    }
    report = _clean(report)
    print(json.dumps({k: report[k] for k in ("name", "n_cases", "mean_dice", "mean_hd95_mm", "mean_surface_dice")}))
    print(json.dumps({"per_class": report["per_class"], "native_grid_mean": report["native_grid"]["mean_dice"]}))
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
