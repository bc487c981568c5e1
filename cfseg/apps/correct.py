"""``cfseg-correct``: teach the online corrector from one case whose masks a user corrected.

    cfseg-correct --ckpt model.ckpt --state online/ --image case.nii.gz --mask corrected.nii.gz --labels labels.json
    cfseg-correct --ckpt model.ckpt --state online/ --image case.nii.gz --mask liver.nii.gz spleen.nii.gz \\
                  --classes liver spleen
    cfseg-correct --ckpt model.ckpt --state online/ --image case.nii.gz --mask masks/        # a cfseg-segment -o
    cfseg-correct --ckpt model.ckpt --state online/ --image ct_series/ --mask rtstruct.dcm [--roi-map map.json]

The corrected masks come in one of three forms:

* a label map with ``--labels labels.json`` (value -> class name, as ``cfseg-segment --multilabel`` writes it):
  every class the JSON lists counts as corrected (absent from the map: the organ is not there, learnt so only
  with ``--allow-empty``, see below);
* per-class binary masks with ``--classes``, one name per file, in order;
* a folder as ``cfseg-segment -o`` wrote it and the user edited: ``labels.nii.gz`` + ``labels.json``, or
  ``<class>.nii.gz`` per class;
* a structure set (RTSTRUCT or DICOM-SEG file) on the DICOM series given as ``--image``: its ROI names are matched
  to the checkpoint's classes as ``cfseg-convert`` matches them (``--roi-map`` decides first); ROIs it cannot
  place are not learnt from, with a warning each.

``--classes`` with a label map restricts learning to those classes; a ``labels.json`` naming one class under two
values (``"1": "liver", "2": "Liver"``) is refused. Every mask must have the image's shape and affine (a mask saved
on another grid is refused, not resampled). A class whose corrected mask is all background (no voxel of it) or all
foreground (every voxel) is not learnt from, with a warning on stderr, unless ``--allow-empty`` (the organ is truly
absent) or ``--allow-full`` says it is meant; when no class is left, nothing is learnt (exit 2). The checkpoint's
model segments the image (frozen, all its classes), the corrector fuses and scores its output against the
correction, records the best fusion weight, learns from the crops and saves its state (:mod:`cfseg.online`)
atomically into ``--state``. A missing or empty ``--state`` starts a new state (``--config settings.json`` sets
:class:`~cfseg.online_state.OnlineConfig` then); a folder holding other files, a damaged state or one made for another
checkpoint is refused. Any error leaves the state as it was. Then ``cfseg-segment --online DIR`` segments with the
fused output.

Output: one line per corrected class (Dice of the checkpoint and of the fused output against the correction,
before learning from it; the fusion weight used and the best one) and the update's seconds. Exit codes: 0 done,
2 an error (one line on stderr).
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

from cfseg.apps.segment import OneLineParser
from cfseg.correction import CorrectionWarning, correct
from cfseg.module import load_checkpoint
from cfseg.online import CaseReport
from cfseg.segmentation import SegmentError


def format_report(report: CaseReport) -> list[str]:
    """What one update did, one line per corrected class and one for the update."""
    lines = []
    for name in report.dice_frozen:
        best = report.best_alpha.get(name)
        lines.append(f"  {name}: Dice checkpoint {report.dice_frozen[name]:.3f}, fused {report.dice_fused[name]:.3f} "
                     f"(weight used {report.alpha_used[name]:.2f}"
                     + (f", best {best:.2f})" if best is not None else "; no crop: the checkpoint found nothing)"))
    loss = "" if report.loss is None else f", loss {report.loss:.3f}"
    lines.append(f"  update {report.seconds:.2f} s, buffer {report.buffer} crops{loss}")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    """``cfseg-correct``; returns the exit code (0 done, 2 error)."""
    p = OneLineParser(prog="cfseg-correct", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", type=Path, required=True, help="cfseg checkpoint (the frozen model)")
    p.add_argument("--state", type=Path, required=True, help="online state directory (missing or empty: new)")
    p.add_argument("--image", type=Path, required=True, help="the case's image (NIfTI, or a DICOM series folder)")
    p.add_argument("--mask", type=Path, nargs="+", required=True,
                   help="corrected label map, per-class masks (with --classes) or a cfseg-segment output folder")
    p.add_argument("--labels", type=Path, default=None, help="labels.json of a label-map mask (value -> class)")
    p.add_argument("--roi-map", type=Path, default=None,
                   help='with a structure set: JSON {"ROI name": "class" or null}, decides before name matching')
    p.add_argument("--classes", nargs="+", default=None, help="class of each mask file, or the classes to learn")
    p.add_argument("--modality", default=None, choices=["ct", "mri"])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--config", type=Path, default=None, help="JSON of online settings for a new state")
    p.add_argument("--allow-empty", action="store_true",
                   help="learn from a class's correction with no voxel of it (the organ is truly absent)")
    p.add_argument("--allow-full", action="store_true",
                   help="learn from a class's correction that covers every voxel of the volume")
    a = p.parse_args(argv)
    try:
        module = load_checkpoint(str(a.ckpt))
    except Exception as e:  # any failure to load is the checkpoint's problem, reported in one line
        print(f"cfseg-correct: error: {a.ckpt}: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    try:
        config = json.loads(a.config.read_text()) if a.config is not None else None
    except (OSError, ValueError) as e:
        print(f"cfseg-correct: error: {a.config}: {e}", file=sys.stderr)
        return 2
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CorrectionWarning)
        try:
            corrector, report = correct(a.image, a.mask, module, a.state, a.labels, a.classes, a.modality, a.device,
                                        config, allow_empty=a.allow_empty, allow_full=a.allow_full,
                                        roi_map=a.roi_map)
            error = None
        except (SegmentError, ValueError, OSError) as e:
            error = e
    for w in caught:
        if issubclass(w.category, CorrectionWarning):
            print(f"cfseg-correct: warning: {' '.join(str(w.message).split())}", file=sys.stderr)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if error is not None:
        print(f"cfseg-correct: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    print(f"{a.image}: learnt from the correction ({corrector.n_updates} corrected cases in {a.state})")
    for line in format_report(report):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
