"""``cfseg predict`` output: NIfTI label maps in each input's own geometry, written by a Lightning callback.

:meth:`cfseg.module.CFSegModule.predict_step` maps every prediction back onto its input's voxel grid through
:func:`cfseg.geometry.labels_to_input_grid` (the same path as ``cfseg-segment``); this writer only saves, one
file per case:

    <output_dir>/<dataset>/<case_id>.nii.gz     uint8 label map, the input's shape and affine
    <output_dir>/labels.json                    label value -> class name

Each file is written under a temporary name in its folder and renamed into place, so a stopped run never
leaves a half-written mask under a case's name.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import nibabel as nib
import numpy as np
from lightning.pytorch.callbacks import BasePredictionWriter

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
        output_dir: folder for ``<dataset>/<case_id>.nii.gz`` and ``labels.json``.
    """

    def __init__(self, output_dir: str = "predictions"):
        super().__init__(write_interval="batch")
        self.output_dir = Path(output_dir)
        self.written: list[Path] = []

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        names = pl_module.bank.names
        labels = {str(k): n for k, n in enumerate(names)}
        tmp = self.output_dir / ".labels.json.tmp"
        tmp.write_text(json.dumps(labels, indent=2))
        os.replace(tmp, self.output_dir / "labels.json")

    def write_on_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, prediction: Sequence[dict],
                           batch_indices: Sequence[int] | None, batch: Any, batch_idx: int,
                           dataloader_idx: int) -> None:
        for case in prediction:
            folder = self.output_dir / safe_name(str(case["dataset"]))
            folder.mkdir(parents=True, exist_ok=True)
            self.written.append(save_nifti_atomic(folder / f"{safe_name(str(case['case_id']))}.nii.gz", case["labels"],
                                                  case["affine"]))

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            print(f"cfseg predict: wrote {len(self.written)} label maps to {self.output_dir} (labels.json: value -> "
                  "class)")
