"""``cfseg predict`` output: NIfTI label maps in each input's own geometry, written by a Lightning callback.

:meth:`cfseg.module.CFSegModule.predict_step` maps every prediction back onto its input's voxel grid through
:func:`cfseg.geometry.labels_to_input_grid` (the same path as ``cfseg-segment``); this writer only saves, one
file per case:

    <output_dir>/<dataset>/<case_id>.nii.gz     uint8 label map, the input's shape and affine
    <output_dir>/labels.json                    label value -> class name
    <output_dir>/checks.json                    per case: the out-of-domain score, threshold and verdict

Each file is written under a temporary name (unique per process) in its folder and renamed into place, so a
stopped run never leaves a half-written mask under a case's name. An input the checkpoint's out-of-domain
statistics call unlike its training images is warned about (``strict=True``: no mask is written for it, and the
run says so). Under DDP each process writes its own cases; the counts and the checks are gathered, and the
summary line and the shared files are written once.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import nibabel as nib
import numpy as np
from lightning.pytorch.callbacks import BasePredictionWriter

from cfseg.distributed import gather_objects
from cfseg.geometry import nifti_image
from cfseg.segmentation import safe_name


def save_nifti_atomic(path: Path, array: np.ndarray, affine: np.ndarray) -> Path:
    """Save ``array`` with ``affine`` (sform and qform) to ``path`` by a rename from a temporary file."""
    img = nifti_image(array, affine)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    nib.save(img, str(tmp))
    os.replace(tmp, path)
    return path


class NiftiPredictionWriter(BasePredictionWriter):
    """Write ``cfseg predict`` label maps as NIfTI files in each input's geometry.

    Args:
        output_dir: folder for ``<dataset>/<case_id>.nii.gz``, ``labels.json`` and ``checks.json``.
        strict: write no mask for an input outside the checkpoint's domain (otherwise: a warning).
    """

    def __init__(self, output_dir: str = "predictions", strict: bool = False):
        super().__init__(write_interval="batch")
        self.output_dir = Path(output_dir)
        self.strict = strict
        self.written: list[Path] = []
        self.checks: list[dict[str, Any]] = []

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.written, self.checks = [], []
        if trainer.is_global_zero:
            names = pl_module.bank.names
            write_json_atomic(self.output_dir / "labels.json", {str(k): n for k, n in enumerate(names)})

    def write_on_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, prediction: Sequence[dict],
                           batch_indices: Sequence[int] | None, batch: Any, batch_idx: int,
                           dataloader_idx: int) -> None:
        for case in prediction:
            checks = case.get("checks") or {}
            refused = bool(checks.get("out_of_domain")) and self.strict
            self.checks.append({"dataset": str(case["dataset"]), "case_id": str(case["case_id"]),
                                "source": str(case["source"]), **checks, "written": not refused})
            if checks.get("out_of_domain"):
                warnings.warn(f"{case['source']}: unlike the images this checkpoint was trained on (out-of-domain "
                              f"score {checks['ood_score']:.2f} > {checks['ood_threshold']:.2f}): "
                              + ("no mask written (strict)" if refused else "the mask may be wrong"), stacklevel=2)
            if refused:
                continue
            folder = self.output_dir / safe_name(str(case["dataset"]))
            folder.mkdir(parents=True, exist_ok=True)
            self.written.append(save_nifti_atomic(folder / f"{safe_name(str(case['case_id']))}.nii.gz", case["labels"],
                                                  case["affine"]))

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        checks = sorted((c for part in gather_objects(self.checks) for c in part),
                        key=lambda c: (c["dataset"], c["case_id"]))
        written = sum(c["written"] for c in checks)
        if trainer.is_global_zero:
            write_json_atomic(self.output_dir / "checks.json", checks)
            unlike = [c for c in checks if c.get("out_of_domain")]
            print(f"cfseg predict: wrote {written} label maps to {self.output_dir} (labels.json: value -> class; "
                  f"checks.json: out-of-domain scores)"
                  + (f"; {len(unlike)} input(s) unlike the training images"
                     + (f", {len(checks) - written} without a mask (strict)" if self.strict else "") if unlike
                     else ""))


def write_json_atomic(path: Path, value: Any) -> Path:
    """Write ``value`` as JSON to ``path`` by a rename from a temporary file unique to this process."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(value, indent=2))
    os.replace(tmp, path)
    return path
