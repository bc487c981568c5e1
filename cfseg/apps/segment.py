"""``cfseg-segment``: masks for your own NIfTI files or DICOM series, in their own geometry.

    cfseg-segment -i ct.nii.gz -o masks/ --ckpt model.ckpt [--classes liver spleen] [--multilabel]
                  [--similarity] [--box x0 y0 z0 x1 y1 z1] [--device cpu|cuda] [--modality ct|mri]
                  [--max-voxels N] [--expert N] [--online DIR] [--keep-edited] [--list-classes]
    cfseg-segment -i ct_series/ -o out/ --ckpt model.ckpt --output-type rtstruct|dicom-seg|nifti

Inputs: a NIfTI file, a DICOM series (a folder holding its files: CT or MR, read by :func:`cfseg.dicom.read_series`
with the geometry from the headers; a folder that is not one volume is refused in one line), or a folder of NIfTI
files and/or series folders (each a case).

``--output-type``: ``nifti`` (the default: the masks below), ``dicom-seg`` (``seg.dcm``: one segment per requested
class) or ``rtstruct`` (``rtstruct.dcm``: one ROI of contours per requested class), both referencing the input
series (its Frame of Reference and SOP instances) and naming cfseg's version and the model's SHA-256
(:mod:`cfseg.dicom_outputs`); they need a DICOM series as input and go without ``--multilabel`` and
``--similarity``. They are written and replaced like the NIfTI outputs (atomically, listed in the manifest).

The image is reoriented and resampled as in training (the checkpoint records how), segmented by sliding
windows over background plus the requested classes in one forward pass, and the result is resampled back onto
the input's own voxel grid: every output has the input's shape and affine, whatever its orientation.

Modality: without ``--modality`` it is read off the image (CT: air at about -1000 Hounsfield units; MRI:
non-negative arbitrary units) and printed (``case.nii.gz: modality ct (detected: ...)``). An image that looks
like a modality the checkpoint was not trained on, or that fits neither rule, is refused; ``--modality`` forces
one (with a warning when the image looks otherwise). A checkpoint with a modality router over two or more
modalities (``strategy: experts``) answers instead, from the image's modality-neutral view, and says whether the
intensity rule agrees; where they disagree the image is refused with both answers
(:func:`cfseg.inference.choose_modality`).

Experts: a checkpoint trained with LoRA experts (``strategy: experts``) segments each class with the expert of the
stage that trained it (expert 0: the shared network), the volume's domain picked by the checkpoint's router when
its experts cover several domains; each case prints which experts ran (``case.nii.gz: routed to expert 2 (domains
mri); experts used: 0 (liver, spleen), 2 (stomach)``). ``--expert N`` makes expert ``N`` segment every class (no
routing); ``N`` must be one of the checkpoint's experts, ``0..n-1`` (only 0 without experts). Checkpoints without
experts print nothing about them.

Online corrector: ``--online DIR`` fuses the checkpoint's output with the auxiliary network that ``cfseg-correct
--state DIR`` trained from corrected cases (:mod:`cfseg.online`); each case prints the fusion weight per class
(1: the checkpoint alone).

Output layout: for one input file, ``-o/<class>.nii.gz`` (or ``labels.nii.gz`` + ``labels.json``,
``similarity_<class>.nii.gz``); each file is replaced atomically and the files the previous single-file run wrote
into ``-o`` but this one does not (e.g. a class no longer requested) are removed (they are listed, with the sha256
of their content, in ``-o/.cfseg-segment.json``). For a folder, ``-o/<case>/...`` per input, ``<case>`` being the
file name without ``.nii``/``.nii.gz`` and ``_0000`` (characters other than letters, digits, ``_ . -`` become
``_``, leading dots are dropped, so it stays inside ``-o``; inputs whose case names would coincide keep their full
file name, ``a.nii`` -> ``a_nii``). A case directory is written in a temporary directory inside ``-o`` and swapped
in whole, so it never mixes two runs' files (its manifest is ``-o/<case>/.cfseg-segment.json``). A lock
(``-o/.cfseg-segment.lock``) stops a second run writing into the same ``-o`` at the same time.

Reviewers' files are never overwritten or deleted: a file a rerun would replace or remove whose content is not
the one the manifest recorded (a mask edited in a viewer, a file cfseg-segment did not write; in a case folder,
any file it did not write) makes the run refuse that output folder with one line naming the files (exit 2 for one
file; in a folder run that case fails, exit 1), before anything is written or deleted. ``--keep-edited`` keeps
them as they are and writes the new outputs beside them (``labels.nii.gz`` kept: the new one is
``labels.new.nii.gz``, then ``labels.new2.nii.gz``, ...), with a warning per kept file. Outputs written by a
cfseg-segment that recorded no hashes count as changed.

Sanity limits, checked on the header before any voxel is read: a qform or an sform (both codes 0: the
orientation would be guessed); finite, non-zero ``pixdim``; finite, invertible affine; voxel spacing in
(0.001, 100) mm; one real intensity per voxel (complex, RGB and 4D multi-volume files are refused); at least 4
voxels along each axis; at most ``--max-voxels`` voxels (default 2**28 = 512 x 512 x 1024) in the input and in the
grid it is resampled to, which needs at least the backbone's total stride (at least 4) voxels per axis (below it
the network's deepest level sees less than a voxel: 8 for the default 3-level UNet, e.g. 12 mm at 1.5 mm).
Constant or near-empty images are refused.

Errors: one line ``cfseg-segment: error: <file>: <problem>`` on stderr, never a traceback. Exit codes: 0 all
done; 1 a folder run in which some cases failed (the others are written; the failed ones are listed at the
end); 2 a usage error, a bad checkpoint or output folder, or a failed single-file run (nothing is written).

The Python API is :func:`cfseg.segmentation.segment`, also exported as ``cfseg.segment``; this module only reads
the command line, runs it over the inputs and reports.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from cfseg.dicom import is_series_folder, read_series
from cfseg.dicom_outputs import OUTPUT_FILES, OUTPUT_TYPES, algorithm_for, dicom_output
from cfseg.geometry import DEFAULT_MAX_VOXELS
from cfseg.module import load_checkpoint
from cfseg.outputs import LOCK_NAME, OutputLock, remove_stale_temporaries, write_case_dir, write_flat
from cfseg.segmentation import (
    SegmentError,
    case_names,
    check_expert,
    check_path,
    is_nifti_name,
    labels_json,
    one_line,
    open_online,
    resolve_classes,
    segment,
)


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a usage error in one line (exit 2), like every other error."""

    def error(self, message: str):  # type: ignore[override]
        print(f"{self.prog}: error: {' '.join(message.split())} (see --help)", file=sys.stderr)
        raise SystemExit(2)


def _fail(message: str) -> int:
    print(f"cfseg-segment: error: {message}", file=sys.stderr)
    return 2


def _where(path: Path, e: BaseException) -> str:
    text = one_line(e)
    return text if text.startswith(str(path)) else f"{path}: {text}"


def main(argv: Sequence[str] | None = None) -> int:
    """``cfseg-segment``; returns the exit code (0 done, 1 some cases of a folder failed, 2 error)."""
    p = OneLineParser(prog="cfseg-segment", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-i", "--input", type=Path,
                   help="NIfTI file, DICOM series folder, or a folder of NIfTI files and/or series folders")
    p.add_argument("-o", "--output", type=Path, help="output folder")
    p.add_argument("--ckpt", type=Path, required=True, help="cfseg checkpoint")
    p.add_argument("--classes", nargs="+", default=None, help="classes to segment (default: all)")
    p.add_argument("--multilabel", action="store_true", help="one label file + labels.json")
    p.add_argument("--similarity", action="store_true", help="also write similarity maps (float NIfTI)")
    p.add_argument("--box", type=int, nargs=6, metavar=("X0", "Y0", "Z0", "X1", "Y1", "Z1"), default=None)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--modality", default=None, choices=["ct", "mri"],
                   help="force the modality (default: detected from the image)")
    p.add_argument("--max-voxels", type=int, default=DEFAULT_MAX_VOXELS,
                   help=f"largest input and resampled grid, in voxels (default {DEFAULT_MAX_VOXELS} = 2**28)")
    p.add_argument("--expert", type=int, default=None, metavar="N",
                   help="LoRA-experts checkpoints: expert N (0: the shared network) segments every class (default: "
                        "each class by the expert of the stage that trained it, routed by the volume's domain)")
    p.add_argument("--online", type=Path, default=None, metavar="DIR",
                   help="fuse the checkpoint's output with the online corrector in DIR (what cfseg-correct --state "
                        "DIR learnt from corrected cases)")
    p.add_argument("--keep-edited", action="store_true",
                   help="keep output files changed since cfseg-segment wrote them (a reviewer's edits) and write the "
                        "new outputs beside them (<name>.new.nii.gz); without it such a folder is refused")
    p.add_argument("--strict", action="store_true",
                   help="refuse an image unlike the checkpoint's training images (out-of-domain score above its "
                        "threshold) instead of warning")
    p.add_argument("--output-type", default="nifti", choices=list(OUTPUT_TYPES),
                   help="nifti (default), dicom-seg (seg.dcm) or rtstruct (rtstruct.dcm); DICOM outputs need DICOM "
                        "series inputs")
    p.add_argument("--list-classes", action="store_true", help="print the classes the checkpoint knows")
    a = p.parse_args(argv)
    if a.output_type != "nifti" and (a.multilabel or a.similarity):
        p.error(f"--output-type {a.output_type} writes one segment per class; --multilabel and --similarity apply to "
                f"NIfTI outputs only")
    if a.ckpt.is_dir():
        return _fail(f"{a.ckpt}: is a folder, not a checkpoint file")
    if a.ckpt.is_file() and a.ckpt.stat().st_size == 0:
        return _fail(f"{a.ckpt}: empty file (0 bytes), not a checkpoint")
    try:
        module = load_checkpoint(str(a.ckpt))
    except Exception as e:  # any failure to load is the checkpoint's problem, reported in one line
        return _fail(_where(a.ckpt, e))
    if a.list_classes:
        for name in module.bank.classes:
            print(name)
        return 0
    if a.input is None or a.output is None:
        p.error("-i and -o are required unless --list-classes")
    if a.max_voxels <= 0:
        p.error(f"--max-voxels must be positive, got {a.max_voxels}")
    try:
        resolve_classes(module, a.classes)  # unknown names fail before any work
        check_expert(module, a.expert)
    except ValueError as e:
        return _fail(_where(a.ckpt, e))
    try:
        online = open_online(a.online, module)  # loaded once for every case; a bad state fails before any work
    except SegmentError as e:
        return _fail(str(e))
    if a.device == "cuda" and not torch.cuda.is_available():
        return _fail("--device cuda: no CUDA device is available here")
    folder = a.input.is_dir() and not is_nifti_name(a.input) and not is_series_folder(a.input)
    try:
        if folder:
            files = sorted(f for f in a.input.iterdir() if is_nifti_name(f) or is_series_folder(f))
            if not files:
                raise SegmentError(f"{a.input}: no .nii/.nii.gz files and no DICOM series folders in this folder")
            cases = case_names(files)
        else:
            files, cases = [a.input], {}
            if not is_series_folder(a.input):
                check_path(a.input)
            if a.output_type != "nifti" and not is_series_folder(a.input):
                raise SegmentError(_needs_series(a.input, a.output_type))
    except SegmentError as e:
        return _fail(str(e))
    out: Path = a.output
    if out.exists() and not out.is_dir():
        return _fail(f"{out}: exists and is not a folder (choose another -o)")
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        return _fail(f"{out}: cannot create the output folder ({e.strerror or e})")
    failures: list[str] = []
    done = 0
    try:
        with OutputLock(out):
            remove_stale_temporaries(out)  # of a run that was killed (we hold the lock)
            done, failures = _run(a, module, online, files, cases, out, folder)
    except BlockingIOError:
        return _fail(f"{out}: another cfseg-segment run is writing into this folder ({LOCK_NAME}); wait for it "
                     f"or choose another -o")
    except OSError as e:
        return _fail(f"{out}: cannot write into the output folder ({e.strerror or e})")
    finally:
        if created and done == 0:
            try:
                out.rmdir()
            except OSError:
                pass
    for msg in failures:
        print(f"cfseg-segment: error: {msg}", file=sys.stderr)
    if failures and folder:
        print(f"cfseg-segment: {len(failures)} of {len(files)} cases failed; the other {done} are in {out}",
              file=sys.stderr)
        return 1
    return 2 if failures else 0


def _run(a, module, online, files: list[Path], cases: dict[Path, str], out: Path,
         folder: bool) -> tuple[int, list[str]]:
    """Segment every file, writing each case as soon as it is done. Returns (cases written, failure messages)."""
    def notify(level: str, message: str) -> None:
        if level == "warning":
            tqdm.write(f"cfseg-segment: warning: {message}", file=sys.stderr)
        else:
            tqdm.write(message, file=sys.stdout)

    labels = labels_json(module, a.classes) if a.multilabel else None
    dicom_out = a.output_type != "nifti"
    if dicom_out:
        algorithm = algorithm_for(module, a.ckpt.name)
        classes = [(k, module.bank.names[k]) for k in resolve_classes(module, a.classes)]
    done, failures = 0, []
    for f in tqdm(files, desc="segmenting", unit="case", disable=not folder):
        try:
            checks: dict = {}
            source = f
            if is_series_folder(f):
                source = read_series(f)
            elif dicom_out:
                raise SegmentError(_needs_series(f, a.output_type))
            images = segment(source, module, a.classes, a.multilabel or dicom_out, a.similarity, a.box, a.device,
                             a.modality, max_voxels=a.max_voxels, notify=notify, expert=a.expert, online=online,
                             strict=a.strict, report=checks)
            if dicom_out:
                ds = dicom_output(a.output_type, np.asarray(images["labels"].dataobj), source, classes, algorithm)
                images = {OUTPUT_FILES[a.output_type][: -len(".dcm")]: ds}
            if folder:
                kept = write_case_dir(out, cases[f], images, labels, f, keep_edited=a.keep_edited, checks=checks)
            else:
                kept = write_flat(out, f, images, labels, keep_edited=a.keep_edited, checks=checks)
            for line in kept:
                notify("warning", line)
            done += 1
        except Exception as e:  # one case's failure is reported in one line; the others go on
            failures.append(_where(f, e))
    return done, failures


def _needs_series(path: Path, output_type: str) -> str:
    return (f"{path}: --output-type {output_type} needs a DICOM series as input (the output references the series' "
            f"slices); this is not a folder of DICOM files")


if __name__ == "__main__":
    sys.exit(main())
