"""``cfseg-convert``: DICOM series with their structure sets (RTSTRUCT or DICOM-SEG) -> the nnU-Net layout cfseg
trains on.

    cfseg-convert -i cases/ -o Dataset201_HNOAR/ --classes brainstem spinal_cord parotid_gland_left ...
    cfseg-convert -i cases/ -o Dataset201_HNOAR/ --ckpt model.ckpt [--mapping roi_names.json]

``-i`` is a folder of case folders (or one case folder); a case folder holds one image series and one structure set
that references it, anywhere inside (subfolders are searched). The classes come from ``--classes`` or from the
vocabulary of ``--ckpt``. Each ROI name is matched to a class by :func:`cfseg.structure_sets.match_roi` (spellings
such as "Parotid_L", "PAROTID LT", "Lt Parotid"; never a guess: ambiguous, derived and unknown names are listed, with
why); ``--mapping`` (JSON ``{"ROI name": "class" | null}``) decides before it.

Output (written into a temporary folder beside ``-o`` and renamed into place; ``-o`` must not exist)::

    dataset.json              channel_names (CT or MRI), labels {background: 0, <class>: 1, ...}, file_ending
    imagesTr/<case>_0000.nii.gz
    labelsTr/<case>.nii.gz
    partial_labels.json       per case: the classes with a matched, non-empty ROI
    conversion_report.json    per case: each ROI name and how it was read; the notes; failed cases

Every ROI not used is printed, one line each. Exit codes: 0 every case converted, 1 some cases failed (the others
are written), 2 a usage error or no case converted (nothing is written).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

from cfseg.apps.segment import OneLineParser
from cfseg.dicom import DicomError, is_dicom_file
from cfseg.geometry import nifti_image
from cfseg.module import load_checkpoint
from cfseg.segmentation import safe_name
from cfseg.structure_sets import StructureSetError, convert_case, load_mapping
from cfseg.vocab import canonical_name


def _fail(message: str) -> int:
    print(f"cfseg-convert: error: {message}", file=sys.stderr)
    return 2


def case_folders(root: Path) -> list[Path]:
    """The case folders of ``-i``: its subfolders holding DICOM files, or ``-i`` itself when it has none."""
    subs = sorted(p for p in root.iterdir()
                  if p.is_dir() and any(is_dicom_file(f) for f in p.rglob("*") if f.is_file()))
    return subs or [root]


def main(argv: Sequence[str] | None = None) -> int:
    """``cfseg-convert``; returns the exit code (0 done, 1 some cases failed, 2 error)."""
    p = OneLineParser(prog="cfseg-convert", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-i", "--input", type=Path, required=True, help="folder of case folders, or one case folder")
    p.add_argument("-o", "--output", type=Path, required=True, help="new dataset folder (nnU-Net raw layout)")
    p.add_argument("--classes", nargs="+", default=None, help="the classes to keep, in label-value order")
    p.add_argument("--ckpt", type=Path, default=None, help="take the classes from this checkpoint's vocabulary")
    p.add_argument("--mapping", type=Path, default=None, help='JSON {"ROI name": "class" or null}, decides first')
    a = p.parse_args(argv)
    if (a.classes is None) == (a.ckpt is None):
        p.error("give the classes with --classes or --ckpt (one of them)")
    if a.ckpt is not None:
        try:
            classes = list(load_checkpoint(str(a.ckpt)).bank.names[1:])
        except Exception as e:  # any failure to load is the checkpoint's problem, reported in one line
            return _fail(f"{a.ckpt}: {' '.join(str(e).split())}")
    else:
        try:
            classes = [canonical_name(c) for c in a.classes]
        except ValueError as e:
            return _fail(str(e))
        if len(set(classes)) != len(classes):
            return _fail(f"--classes names a class twice: {classes}")
    if not a.input.is_dir():
        return _fail(f"{a.input}: not a folder")
    if a.output.exists():
        return _fail(f"{a.output}: exists; cfseg-convert writes a new dataset folder (choose another -o)")
    try:
        mapping = load_mapping(a.mapping, classes) if a.mapping is not None else None
    except StructureSetError as e:
        return _fail(str(e))
    cases = case_folders(a.input)
    names = {c: safe_name(c.name) for c in cases}
    if len(set(names.values())) != len(names):
        return _fail(f"{a.input}: two case folders give the same case name; rename one")
    a.output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=a.output.parent, prefix=f".{a.output.name}.tmp-"))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)
    try:
        (tmp / "imagesTr").mkdir()
        (tmp / "labelsTr").mkdir()
        report, partial, failed, modalities = {}, {}, {}, set()
        for folder in cases:
            case = names[folder]
            try:
                c = convert_case(folder, classes, mapping)
            except (StructureSetError, DicomError) as e:
                failed[case] = " ".join(str(e).split())
                print(f"cfseg-convert: error: {failed[case]}", file=sys.stderr)
                continue
            modalities.add(c.modality)
            data = np.asarray(c.image.dataobj)
            if c.modality == "ct" and np.array_equal(data, np.round(data)) and np.abs(data).max() < 32768:
                data = data.astype(np.int16)  # Hounsfield units as stored
            nib.save(nifti_image(data, c.image.affine), str(tmp / "imagesTr" / f"{case}_0000.nii.gz"))
            nib.save(nifti_image(c.labels, c.image.affine), str(tmp / "labelsTr" / f"{case}.nii.gz"))
            partial[case] = c.annotated
            report[case] = {"source": str(folder), "annotated": c.annotated, "notes": c.notes,
                            "rois": [{"roi": m.roi, "class": m.cls, "status": m.status, "reason": m.reason}
                                     for m in c.matches]}
            print(f"{case}: {len(c.annotated)} of {len(classes)} classes annotated"
                  + (f" ({', '.join(c.annotated)})" if c.annotated else ""))
            for note in c.notes:
                print(f"  {case}: {note}")
        if not partial:
            return _fail(f"{a.input}: no case converted ({len(failed)} failed); nothing written")
        if len(modalities) > 1:
            return _fail(f"{a.input}: the cases mix CT and MR series; convert each modality into its own dataset")
        channel = "CT" if modalities == {"ct"} else "MRI"
        (tmp / "dataset.json").write_text(json.dumps({
            "channel_names": {"0": channel}, "labels": {"background": 0, **{c: i for i, c in enumerate(classes, 1)}},
            "numTraining": len(partial), "file_ending": ".nii.gz",
            "description": "converted from DICOM structure sets by cfseg-convert"}, indent=2))
        (tmp / "partial_labels.json").write_text(json.dumps(partial, indent=2))
        (tmp / "conversion_report.json").write_text(json.dumps({"classes": classes, "cases": report,
                                                                 "failed": failed}, indent=2))
        tmp.rename(a.output)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"cfseg-convert: {len(partial)} cases written to {a.output}" + (f"; {len(failed)} failed" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
