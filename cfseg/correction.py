"""Teaching the online corrector (:mod:`cfseg.online`) from one case whose masks a user corrected: :func:`correct`
(exported as ``cfseg.correct``; the command line ``cfseg-correct`` is :mod:`cfseg.apps.correct`).

The corrected masks come in one of three forms (:func:`read_correction`):

* a label map with a ``labels.json`` (value -> class name, as ``cfseg-segment --multilabel`` writes it): every
  class the JSON lists counts as corrected (absent from the map: the organ is not there, learnt so only with
  ``allow_empty``, see below);
* per-class binary masks with their class names, one name per file, in order;
* a folder as ``cfseg-segment -o`` wrote it and the user edited: ``labels.nii.gz`` + ``labels.json``, or
  ``<class>.nii.gz`` per class;
* a structure set (one RTSTRUCT or DICOM-SEG file, e.g. the ``rtstruct.dcm`` of ``cfseg-segment --output-type
  rtstruct`` after review in a planning system): each ROI name is matched to a class as ``cfseg-convert`` does
  (:func:`cfseg.structure_sets.match_roi`; ``roi_map``, a JSON ``{"ROI name": "class" | null}`` file, decides
  first), and every matched ROI counts as corrected; an ROI name that is unmatched, ambiguous or derived (a PRV,
  a margin) is not learnt from, with a warning, and so is a class two ROIs name. The image is then the DICOM series
  the structure set references (its folder; a DICOM-SEG needs it), or any image whose slices the RTSTRUCT's
  contours lie on.

Class names given with a label map restrict learning to those classes; a ``labels.json`` naming one class under two
values (``"1": "liver", "2": "Liver"``: names compare as cfseg's vocabulary reads them, :mod:`cfseg.vocab`) is
refused. Every mask must have the image's shape and affine (a mask saved on another grid is refused, not resampled).
A class whose corrected mask is all background (no voxel of it in the volume) or all foreground (every voxel) is
most likely a slip (a mask saved empty, a fill that flooded the volume): it is not learnt from, with a warning
(:class:`CorrectionWarning`), unless ``allow_empty`` (the organ is truly absent) or ``allow_full`` says it is meant;
when no class is left, nothing is learnt and the state is left as it was. The checkpoint's model segments the image
(frozen, all its classes), the corrector fuses and scores its output against the correction, records the best fusion
weight, learns from the crops and saves its state atomically. A missing or empty state folder starts a new state; a
folder holding other files, a damaged state or one made for another checkpoint is refused. Any error leaves the
state as it was.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch

from cfseg.dicom import DicomError, DicomSeries, is_series_folder, read_series
from cfseg.inference import ModalityError, choose_modality, predict_volume, preprocessing_for
from cfseg.module import CFSegModule, load_checkpoint
from cfseg.online import OnlineCorrector
from cfseg.online_state import OnlineStateError
from cfseg.segmentation import SegmentError, load_input, modality_view, preprocess, safe_name
from cfseg.structure_sets import StructureSetError, is_structure_file, load_mapping, match_roi, read_structure_masks

AFFINE_TOLERANCE = 1e-3  # mm: two grids whose affines differ by less are the same grid


class CorrectionWarning(UserWarning):
    """A corrected mask that is not learnt from (all background or all foreground; see the module doc)."""


def suspicious_masks(module, corrected: dict[int, np.ndarray], allow_empty: bool = False,
                     allow_full: bool = False, where: str = "") -> tuple[dict[int, np.ndarray], list[str]]:
    """The corrections to learn from and a warning per class left out: all background unless ``allow_empty``,
    all foreground unless ``allow_full``."""
    keep, notes = {}, []
    prefix = f"{where}: " if where else ""
    for k, m in corrected.items():
        name = module.bank.names[k]
        if not m.any() and not allow_empty:
            notes.append(f"{prefix}the correction of {name!r} is all background (no voxel of it in the volume); not "
                         f"learnt from (if the organ is truly absent, pass --allow-empty / allow_empty=True)")
        elif m.all() and not allow_full:
            notes.append(f"{prefix}the correction of {name!r} is all foreground (every voxel of the volume); not "
                         f"learnt from (if that is meant, pass --allow-full / allow_full=True)")
        else:
            keep[k] = m
    return keep, notes


def _read_mask(path: Path, image: nib.Nifti1Image) -> np.ndarray:
    """A mask file as an integer array on the image's grid (same shape and affine, else refused)."""
    if not path.is_file():
        raise SegmentError(f"{path}: mask not found")
    try:
        m = nib.load(str(path))
        shape = tuple(int(s) for s in m.shape)
        if len(shape) == 4 and shape[3] == 1:
            shape = shape[:3]
        if shape != tuple(image.shape[:3]):
            raise SegmentError(f"{path}: the mask has shape {shape}, the image {tuple(image.shape[:3])}; a "
                               f"correction must be saved on the image's own grid")
        if not np.allclose(m.affine, image.affine, atol=AFFINE_TOLERANCE):
            raise SegmentError(f"{path}: the mask's affine differs from the image's (max difference "
                               f"{float(np.abs(m.affine - image.affine).max()):.4g}); a correction must be saved "
                               f"on the image's own grid")
        data = np.asarray(m.dataobj).reshape(shape)
    except SegmentError:
        raise
    except Exception as e:  # nibabel raises several types for unreadable files
        raise SegmentError(f"{path}: not a readable NIfTI mask ({type(e).__name__}: {e})") from e
    if not np.isfinite(data).all() or (data < 0).any() or (data != np.round(data)).any():
        raise SegmentError(f"{path}: a mask holds non-negative integer labels, this one does not")
    return data.astype(np.int64)


def _class_index(module, name: str, where: str) -> int:
    try:
        k = module.bank.index(name)
    except (KeyError, ValueError) as e:
        raise SegmentError(f"{where}: {' '.join(str(e).split())}") from None
    if k == 0:
        raise SegmentError(f"{where}: {name!r} is the background, not a class to correct")
    return k


def read_correction(module, image: nib.Nifti1Image | DicomSeries, masks: Sequence[str | Path],
                    labels: str | Path | None = None,
                    classes: Sequence[str] | None = None,
                    roi_map: str | Path | None = None) -> dict[int, np.ndarray]:
    """The corrected masks on the image's grid: global class index -> boolean [X, Y, Z] (see the module doc).

    Raises:
        SegmentError: a mask of another shape or affine, an unknown class, values a labels.json does not name,
            or masks whose meaning is not said (no labels.json, no --classes).
    """
    paths = [Path(m) for m in masks]
    if len(paths) == 1 and is_structure_file(paths[0]):
        if labels is not None:
            raise SegmentError(f"{paths[0]}: a structure set names its ROIs itself; --labels goes with a label map")
        return _structure_correction(module, image, paths[0], classes, roi_map)
    if roi_map is not None:
        raise SegmentError("--roi-map goes with a structure set (RTSTRUCT or DICOM-SEG) as the correction")
    if isinstance(image, DicomSeries):
        image = image.image
    if len(paths) == 1 and paths[0].is_dir():
        folder = paths[0]
        if (folder / "labels.nii.gz").is_file() and (folder / "labels.json").is_file() and labels is None:
            paths, labels = [folder / "labels.nii.gz"], folder / "labels.json"
        elif labels is None and not classes:
            by_name = {f"{safe_name(n)}.nii.gz": n for n in module.bank.names[1:]}
            found = sorted(p.name for p in folder.iterdir() if p.name in by_name)
            if not found:
                raise SegmentError(f"{folder}: no labels.nii.gz + labels.json and no <class>.nii.gz of the "
                                   f"checkpoint's classes in this folder")
            paths, classes = [folder / f for f in found], [by_name[f] for f in found]
        else:
            raise SegmentError(f"{folder}: a folder of masks is read as cfseg-segment writes it; with --labels or "
                               f"--classes give the mask files themselves")
    if labels is not None:
        if len(paths) != 1:
            raise SegmentError(f"--labels goes with one label-map mask, got {len(paths)} mask files")
        try:
            table = json.loads(Path(labels).read_text())
            table = {int(v): str(n) for v, n in table.items()}
        except (OSError, ValueError, AttributeError, TypeError) as e:
            raise SegmentError(f"{labels}: not a labels.json of value -> class name ({e})") from None
        data = _read_mask(paths[0], image)
        named = {v: _class_index(module, n, str(labels)) for v, n in table.items() if v != 0}
        first: dict[int, int] = {}
        for v, k in sorted(named.items()):
            if k in first:
                raise SegmentError(f"{labels}: values {first[k]} ({table[first[k]]!r}) and {v} ({table[v]!r}) both "
                                   f"name the class {module.bank.names[k]!r}; give each class one value")
            first[k] = v
        stray = sorted(set(np.unique(data).tolist()) - set(named) - {0})
        if stray:
            raise SegmentError(f"{paths[0]}: label values {stray} are not in {labels}")
        wanted = None if not classes else {_class_index(module, c, "--classes") for c in classes}
        out = {k: data == v for v, k in named.items() if wanted is None or k in wanted}
        if wanted is not None and wanted - set(out):
            raise SegmentError(f"--classes {sorted(module.bank.names[k] for k in wanted - set(out))} are not in "
                               f"{labels}")
        return out
    if not classes:
        raise SegmentError("say what the masks are: a label map with --labels labels.json, or one binary mask per "
                           "class with --classes (one name per mask, in order)")
    if len(classes) != len(paths):
        raise SegmentError(f"--classes names {len(classes)} classes for {len(paths)} mask files; give one per mask")
    out: dict[int, np.ndarray] = {}
    for c, p in zip(classes, paths, strict=True):
        k = _class_index(module, c, "--classes")
        if k in out:
            raise SegmentError(f"--classes names {module.bank.names[k]!r} twice")
        out[k] = _read_mask(p, image) > 0
    return out


def _structure_correction(module, image: nib.Nifti1Image | DicomSeries, path: Path, classes: Sequence[str] | None,
                          roi_map: str | Path | None) -> dict[int, np.ndarray]:
    """The matched ROIs of a structure set as corrections (see the module doc); warnings for the ROIs left out."""
    known = list(module.bank.names[1:])
    try:
        mapping = load_mapping(roi_map, known) if roi_map is not None else None
        masks = read_structure_masks(path, image)
    except StructureSetError as e:
        raise SegmentError(str(e)) from None
    wanted = None if not classes else {_class_index(module, c, "--classes") for c in classes}
    by_class: dict[int, list[str]] = {}
    for name in masks:
        m = match_roi(name, known, mapping)
        if not m.used:
            warnings.warn(f"{path}: {m.describe()}; not learnt from", CorrectionWarning, stacklevel=3)
            continue
        k = module.bank.index(m.cls)
        if wanted is None or k in wanted:
            by_class.setdefault(k, []).append(name)
    out = {}
    for k, rois in by_class.items():
        if len(rois) > 1:
            warnings.warn(f"{path}: ROIs {', '.join(repr(r) for r in rois)} all name {module.bank.names[k]!r}; not "
                          f"learnt from (map all but one to null with --roi-map)", CorrectionWarning, stacklevel=3)
        else:
            out[k] = masks[rois[0]]
    if wanted is not None and wanted - set(by_class):
        raise SegmentError(f"--classes {sorted(module.bank.names[k] for k in wanted - set(by_class))} have no ROI "
                           f"in {path}")
    return out


def correct(image: str | Path | nib.Nifti1Image | DicomSeries, masks: Sequence[str | Path],
            checkpoint: str | Path | Any, state: str | Path, labels: str | Path | None = None,
            classes: Sequence[str] | None = None, modality: str | None = None, device: str = "cpu",
            config: dict | None = None, allow_empty: bool = False, allow_full: bool = False,
            roi_map: str | Path | None = None):
    """Learn from one corrected case and save the online state (the Python API of ``cfseg-correct``).

    Args:
        image: the case (NIfTI path or nibabel image, or a DICOM series: its folder or a read
            :class:`~cfseg.dicom.DicomSeries`).
        masks: the corrected mask file(s), a cfseg-segment output folder, or a structure set file (see the module
            doc).
        checkpoint: cfseg checkpoint path or loaded module.
        state: the online state directory (missing or empty: a new state).
        labels, classes: what the masks mean (see the module doc).
        modality: ``"ct"``/``"mri"``; None: detected.
        config: :class:`~cfseg.online_state.OnlineConfig` fields for a new state.
        allow_empty, allow_full: learn from a class's correction that is all background / all foreground (else
            left out with a :class:`CorrectionWarning`).
        roi_map: with a structure set: JSON ``{"ROI name": "class" | null}`` deciding before the name matching.

    Returns:
        ``(corrector, report)``: the :class:`~cfseg.online.OnlineCorrector` after the update and its
        :class:`~cfseg.online.CaseReport`.

    Raises:
        SegmentError: bad inputs or state, or no class left to learn from (nothing is written then).
    """
    module = checkpoint if isinstance(checkpoint, CFSegModule) else load_checkpoint(str(checkpoint))
    try:
        corrector = OnlineCorrector.open(state, module, config)
    except (OnlineStateError, ValueError) as e:
        raise SegmentError(str(e)) from None
    if not isinstance(image, (DicomSeries, nib.spatialimages.SpatialImage)) and is_series_folder(Path(image)):
        try:
            image = read_series(Path(image))
        except DicomError as e:
            raise SegmentError(str(e)) from None
    img, where = load_input(image)
    corrected = read_correction(module, image if isinstance(image, DicomSeries) else img, masks, labels, classes,
                                roi_map)
    corrected, notes = suspicious_masks(module, corrected, allow_empty, allow_full, where)
    for note in notes:
        warnings.warn(note, CorrectionWarning, stacklevel=2)
    if not corrected:
        raise SegmentError(f"{where}: no class left to learn from" + (" (see the warnings above)" if notes else ""))
    try:
        chosen, _, _ = choose_modality(module, np.asarray(img.dataobj), modality, modality_view(module, img, modality))
    except ModalityError as e:
        raise SegmentError(f"{where}: {e}") from None
    ks = sorted(corrected)
    work = preprocess(img, preprocessing_for(module, chosen), np.stack([corrected[k] for k in ks]))
    idx = list(range(1, len(module.bank.names)))
    out = predict_volume(module, work["image"], idx, device=device)
    on_grid = {k: torch.as_tensor(work["masks"][i]).bool() for i, k in enumerate(ks)}
    report = corrector.update(work["image"], out["probs"], idx, on_grid)
    corrector.save(state)
    return corrector, report
