"""Structure sets (RTSTRUCT, DICOM-SEG) as masks, and their ROI names as cfseg classes.

Reading: :func:`read_structure_masks` gives ROI name -> boolean mask [X, Y, Z] on an image's grid. RTSTRUCT contours
are rasterised on any grid whose slices they lie on (each contour's points are mapped to voxel coordinates through
the image's affine; the voxel centres inside a closed planar contour are filled, contours of one ROI on one slice
combined by the even-odd rule, so a hole is a contour inside another); a contour between slices or off the grid is
refused. A DICOM-SEG is read with highdicom onto the series it was made from (its SOP instances).

Names: :func:`match_roi` matches one ROI name to a class of a vocabulary (canonical names, :mod:`cfseg.vocab`),
the way clinics spell organs ("Parotid_L", "PAROTID LT", "Lt Parotid", "Parotid (L)", "SpinalCord", "Cord",
"Bone_Mandible", "Oesophagus"...). It never guesses: a paired organ without a side ("Parotid") or with both
("Parotids", "Parotid L+R") is ambiguous, a derived structure (a PRV, a margin "+3mm", an optimisation or avoidance
structure, a target volume) and any name it cannot place are unmatched, each with its reason. A user mapping
(``{"ROI name": "class" or null}``, :func:`load_mapping`) decides first.

Converting: :func:`convert_case` turns one case folder (an image series and the structure set that references it)
into an image, a label map and the classes annotated (those with a matched, non-empty ROI), with a note for every
ROI not used; :mod:`cfseg.apps.convert` (``cfseg-convert``) writes them in the nnU-Net layout with
``partial_labels.json``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import RTStructureSetStorage, SegmentationStorage

from cfseg.dicom import (
    IMAGE_SOP_CLASSES,
    LPS_TO_RAS,
    DicomError,
    DicomSeries,
    is_dicom_file,
    read_headers,
    read_series,
    sop_class_name,
)
from cfseg.vocab import canonical_name, close_matches

STRUCTURE_SOP_CLASSES = {RTStructureSetStorage: "rtstruct", SegmentationStorage: "dicom-seg"}
#: largest distance (in voxels) of a contour's points from an image slice
PLANE_TOLERANCE = 0.1


class StructureSetError(ValueError):
    """A structure set that cannot be read onto the image, or a case that cannot be converted (one line)."""


# ---------------------------------------------------------------------------------------------------------------
# reading


def structure_kind(ds: Dataset) -> str | None:
    """``"rtstruct"``, ``"dicom-seg"`` or None for a dataset of another SOP class."""
    return STRUCTURE_SOP_CLASSES.get(str(ds.get("SOPClassUID", "")))


def referenced_series(ds: Dataset) -> str | None:
    """The SeriesInstanceUID of the image series a structure set references (None when it names none)."""
    try:
        if structure_kind(ds) == "rtstruct":
            for frame in ds.ReferencedFrameOfReferenceSequence:
                for study in frame.get("RTReferencedStudySequence", []):
                    for series in study.get("RTReferencedSeriesSequence", []):
                        return str(series.SeriesInstanceUID)
        elif structure_kind(ds) == "dicom-seg":
            return str(ds.ReferencedSeriesSequence[0].SeriesInstanceUID)
    except (AttributeError, IndexError, KeyError):
        return None
    return None


def frame_of_reference(ds: Dataset) -> str | None:
    """The Frame of Reference UID a structure set's coordinates are in."""
    if "FrameOfReferenceUID" in ds:
        return str(ds.FrameOfReferenceUID)
    try:
        return str(ds.ReferencedFrameOfReferenceSequence[0].FrameOfReferenceUID)
    except (AttributeError, IndexError):
        return None


def roi_names(ds: Dataset) -> list[str]:
    """ROI names (RTSTRUCT) or segment labels (DICOM-SEG), in file order."""
    if structure_kind(ds) == "rtstruct":
        return [str(r.ROIName) for r in ds.get("StructureSetROISequence", [])]
    return [str(s.SegmentLabel) for s in ds.get("SegmentSequence", [])]


def _fill_polygon(poly: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Voxel centres [shape] inside the polygon ``poly`` [N, 2] (voxel coordinates)."""
    from matplotlib.path import Path as MplPath

    out = np.zeros(shape, bool)
    lo = np.maximum(np.floor(poly.min(0)).astype(int), 0)
    hi = np.minimum(np.ceil(poly.max(0)).astype(int) + 1, shape)
    if np.any(hi <= lo):
        return out
    a, b = np.meshgrid(np.arange(lo[0], hi[0]), np.arange(lo[1], hi[1]), indexing="ij")
    inside = MplPath(poly).contains_points(np.c_[a.ravel(), b.ravel()]).reshape(a.shape)
    out[lo[0]:hi[0], lo[1]:hi[1]] = inside
    return out


def rtstruct_masks(ds: Dataset, shape: Sequence[int], affine: np.ndarray, where: str = "") -> dict[str, np.ndarray]:
    """ROI name -> boolean mask [X, Y, Z] of an RTSTRUCT on the grid ``shape`` with RAS ``affine``.

    Raises:
        StructureSetError: a contour that lies between the grid's slices, outside it, or not in a plane of it.
    """
    shape = tuple(int(s) for s in shape)
    inv = np.linalg.inv(LPS_TO_RAS @ np.asarray(affine, np.float64))  # LPS mm -> voxel
    names = {int(r.ROINumber): str(r.ROIName) for r in ds.get("StructureSetROISequence", [])}
    out = {name: np.zeros(shape, bool) for name in names.values()}
    for rc in ds.get("ROIContourSequence", []):
        number = int(rc.ReferencedROINumber)
        if number not in names:
            raise StructureSetError(f"{where}: ROIContourSequence refers to ROI number {number}, which "
                                    f"StructureSetROISequence does not define")
        name, mask = names[number], out[names[number]]
        for c in rc.get("ContourSequence", []):
            if str(c.get("ContourGeometricType", "CLOSED_PLANAR")).upper() != "CLOSED_PLANAR":
                continue  # points and open lines enclose no voxel
            pts = np.asarray([float(v) for v in c.ContourData], np.float64).reshape(-1, 3)
            if len(pts) < 3:
                continue
            vox = (np.c_[pts, np.ones(len(pts))] @ inv.T)[:, :3]
            spread = vox.max(0) - vox.min(0)
            axis = int(np.argmin(spread))
            level = float(np.mean(vox[:, axis]))
            k = int(round(level))
            if spread[axis] > PLANE_TOLERANCE or abs(level - k) > PLANE_TOLERANCE:
                raise StructureSetError(f"{where}: ROI {name!r}: a contour does not lie on a slice of the image "
                                        f"(voxel coordinate {level:.2f} along axis {axis}); the structure set was "
                                        f"drawn on another grid")
            if not 0 <= k < shape[axis]:
                raise StructureSetError(f"{where}: ROI {name!r}: a contour lies outside the image (slice {k} of "
                                        f"{shape[axis]} along axis {axis})")
            plane = [a for a in range(3) if a != axis]
            filled = _fill_polygon(vox[:, plane], (shape[plane[0]], shape[plane[1]]))
            index: list = [slice(None)] * 3
            index[axis] = k
            mask[tuple(index)] ^= filled
    return out


def seg_masks(ds: Dataset, series: DicomSeries, where: str = "") -> dict[str, np.ndarray]:
    """Segment label -> boolean mask [X, Y, Z] of a DICOM-SEG on the series it was made from."""
    import highdicom as hd

    try:
        seg = hd.seg.Segmentation.from_dataset(ds, copy=False)
        numbers = list(seg.segment_numbers)
        arr = seg.get_pixels_by_source_instance(series.sop_instance_uids, segment_numbers=numbers,
                                                assert_missing_frames_are_empty=True)
    except Exception as e:  # highdicom raises several types for segmentations of other series
        raise StructureSetError(f"{where}: the DICOM-SEG cannot be read onto {series.where} ({type(e).__name__}: "
                                f"{' '.join(str(e).split())[:200]})") from None
    out = {}
    for j, n in enumerate(numbers):
        label = str(seg.get_segment_description(n).SegmentLabel)
        out[label] = np.transpose(arr[..., j] > 0, (2, 1, 0))
    return out


def read_structure_masks(source: str | Path | Dataset, image: DicomSeries | nib.Nifti1Image,
                         where: str = "") -> dict[str, np.ndarray]:
    """ROI name -> boolean mask [X, Y, Z] on ``image``'s grid, of an RTSTRUCT or a DICOM-SEG.

    Args:
        source: the structure set's file or dataset.
        image: a :class:`~cfseg.dicom.DicomSeries` (its Frame of Reference must be the structure set's) or, for an
            RTSTRUCT, any image whose slices the contours lie on.

    Raises:
        StructureSetError: not a structure set, another frame of reference, contours off the grid.
    """
    import pydicom

    if isinstance(source, Dataset):
        ds, where = source, where or "<structure set>"
    else:
        where = where or str(source)
        try:
            ds = pydicom.dcmread(str(source))
        except Exception as e:  # pydicom raises several types for damaged files
            raise StructureSetError(f"{where}: not a readable DICOM file ({type(e).__name__}: {e})") from None
    kind = structure_kind(ds)
    if kind is None:
        raise StructureSetError(f"{where}: {sop_class_name(ds.get('SOPClassUID', '?'))} is not a structure set "
                                f"(RTSTRUCT or DICOM-SEG)")
    if isinstance(image, DicomSeries):
        ref = frame_of_reference(ds)
        if ref is not None and ref != image.frame_of_reference_uid:
            raise StructureSetError(f"{where}: its Frame of Reference {ref} is not the series' "
                                    f"({image.frame_of_reference_uid}, {image.where}); it was drawn on another scan")
        if kind == "dicom-seg":
            return seg_masks(ds, image, where)
        grid = image.image
    else:
        if kind == "dicom-seg":
            raise StructureSetError(f"{where}: a DICOM-SEG is read onto the DICOM series it was made from; give "
                                    f"that series (its folder) as the image")
        grid = image
    return rtstruct_masks(ds, grid.shape[:3], grid.affine, where)


def is_structure_file(path: Path) -> bool:
    """Whether ``path`` is a DICOM RTSTRUCT or DICOM-SEG file."""
    import pydicom

    if not (Path(path).is_file() and is_dicom_file(Path(path))):
        return False
    try:
        return structure_kind(pydicom.dcmread(str(path), stop_before_pixels=True)) is not None
    except Exception:  # unreadable: not one
        return False


# ---------------------------------------------------------------------------------------------------------------
# ROI names -> classes

_SIDES = {"left": "left", "l": "left", "lt": "left", "lft": "left", "sin": "left", "sx": "left",
          "li": "left", "links": "left",
          "right": "right", "r": "right", "rt": "right", "rgt": "right", "dex": "right", "dx": "right",
          "re": "right", "rechts": "right"}
#: words naming both sides of a paired organ ("Bilat Parotids", "Parotids_Combined")
_BOTH = {"bilat", "bilateral", "both", "combined", "bil", "lr", "rl"}
#: words that say which structure, not what: dropped before matching ("Bone_Mandible", "Parotid Gland L")
_FILLER = {"gland", "glnd", "bone", "organ", "oar", "total", "whole", "entire", "structure"}
#: words of derived structures (expansions, optimisation and avoidance helpers, targets): never an organ
_DERIVED = {"prv", "opt", "optimization", "optimisation", "avoid", "avoidance", "ring", "ptv", "ctv", "gtv", "itv",
            "exp", "expanded", "expansion", "margin", "planning", "help", "helper", "dose", "crop", "cropped",
            "minus", "eval", "ph", "z", "zz", "x", "xx", "dvh", "block", "nt", "nos"}
#: ROI-name aliases (snake_case, side removed) -> canonical base name
ROI_ALIASES = {
    "cord": "spinal_cord", "spinalcord": "spinal_cord", "spinal_cord": "spinal_cord", "medulla_spinalis": "spinal_cord",
    "brain_stem": "brainstem", "brainstem": "brainstem", "truncus_encephali": "brainstem",
    "oesophagus": "esophagus", "esophagus": "esophagus", "esoph": "esophagus", "oesophagus_cervical": "esophagus",
    "jaw": "mandible", "mandibula": "mandible", "mandible": "mandible", "lower_jaw": "mandible",
    "parotid": "parotid", "parotis": "parotid",
    "larynx": "larynx",
}


@dataclass(frozen=True)
class RoiMatch:
    """How one ROI name was read.

    Attributes:
        roi: the ROI name as written in the structure set.
        cls: the class it names (canonical), or None.
        status: ``"matched"``, ``"mapped"`` (by the user's mapping), ``"ignored"`` (mapped to null),
            ``"unmatched"``, ``"ambiguous"`` or ``"derived"``.
        reason: why, for every status but matched.
    """

    roi: str
    cls: str | None
    status: str
    reason: str = ""

    @property
    def used(self) -> bool:
        return self.cls is not None

    def describe(self) -> str:
        if self.cls is not None:
            return f"ROI {self.roi!r} -> {self.cls}" + (" (mapping file)" if self.status == "mapped" else "")
        return f"ROI {self.roi!r}: {self.status}: {self.reason}"


def _tokens(name: str) -> list[str]:
    s = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name.strip())
    s = re.sub(r"(?<=[A-Za-z])(?=[0-9])|(?<=[0-9])(?=[A-Za-z]{3,})", "_", s)
    return [t for t in re.sub(r"[^0-9a-zA-Z]+", "_", s).lower().split("_") if t]


def _class_key(cls: str) -> tuple[str, str | None]:
    """(base without filler words, side) of a canonical class name: ``parotid_gland_left`` -> (parotid, left)."""
    tokens = cls.split("_")
    side = tokens[-1] if len(tokens) > 1 and tokens[-1] in ("left", "right") else None
    base = [t for t in (tokens[:-1] if side else tokens) if t not in _FILLER] or tokens
    key = "_".join(base)
    return ROI_ALIASES.get(key, key), side


def _normalise_key(key: str) -> str:
    return " ".join(str(key).split()).casefold()


def load_mapping(path: str | Path, classes: Sequence[str]) -> dict[str, str | None]:
    """A user mapping file: JSON ``{"ROI name": "class name" | null}`` (null: never use that ROI). Keys compare
    case-insensitively; class names in any spelling, each one of ``classes``.

    Raises:
        StructureSetError: unreadable, not an object of strings, or naming a class not in ``classes``.
    """
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise StructureSetError(f"{path}: not a readable JSON mapping of ROI name -> class ({e})") from None
    if not isinstance(raw, dict):
        raise StructureSetError(f"{path}: expected a JSON object {{\"ROI name\": \"class\" or null}}")
    known = {canonical_name(c) for c in classes}
    out: dict[str, str | None] = {}
    for roi, cls in raw.items():
        if cls is None:
            out[_normalise_key(roi)] = None
            continue
        if not isinstance(cls, str):
            raise StructureSetError(f"{path}: {roi!r} maps to {cls!r}; expected a class name or null")
        c = canonical_name(cls)
        if c not in known:
            hint = close_matches(cls, sorted(known))
            raise StructureSetError(f"{path}: {roi!r} maps to {cls!r}, not one of the classes "
                                    f"({', '.join(sorted(known))})"
                                    + (f"; did you mean {', '.join(hint)}?" if hint else ""))
        out[_normalise_key(roi)] = c
    return out


def match_roi(name: str, classes: Sequence[str], mapping: dict[str, str | None] | None = None) -> RoiMatch:
    """Match one ROI name to one of ``classes`` (see the module doc); never a guess.

    Args:
        name: the ROI name (RTSTRUCT ``ROIName`` or DICOM-SEG ``SegmentLabel``).
        classes: the vocabulary's class names (any spelling).
        mapping: from :func:`load_mapping`; decides first.
    """
    canon = [canonical_name(c) for c in classes]
    if mapping and _normalise_key(name) in mapping:
        target = mapping[_normalise_key(name)]
        return RoiMatch(name, target, "mapped" if target else "ignored", "" if target else "mapped to null")
    tokens = _tokens(name)
    if not any(re.search("[a-z]", t) for t in tokens):
        return RoiMatch(name, None, "unmatched", "no letters")
    derived = [t for t in tokens if t in _DERIVED or re.fullmatch(r"\d+(mm|cm)", t)] + \
        (["+margin"] if re.search(r"[+-]\s*\d", name) else [])
    if derived:
        return RoiMatch(name, None, "derived", f"a derived structure ({derived[0]}: an expansion, optimisation or "
                                               f"target volume), not the organ itself")
    sides = {_SIDES[t] for t in tokens if t in _SIDES} if len(tokens) > 1 else set()
    if len(tokens) > 1 and any(t in _BOTH for t in tokens):
        sides = {"left", "right"}
    rest = [t for t in tokens if not (len(tokens) > 1 and (t in _SIDES or t in _BOTH))]
    base_tokens = [t for t in rest if t not in _FILLER] or rest
    keys = {_class_key(c): c for c in canon}
    paired = {b for b, s in keys if s is not None}
    plural = False
    joined = "_".join(base_tokens)
    base = ROI_ALIASES.get(joined, joined)
    if (base, None) not in keys and base not in paired and base.endswith("s"):
        single = ROI_ALIASES.get(base[:-1], base[:-1])
        if (single, None) in keys or single in paired:
            base, plural = single, True
    if base not in paired and (base, None) not in keys:
        try:  # cfseg's own synonyms (vocab.SYNONYMS) on the base name
            alt = _class_key(canonical_name(base))[0]
        except ValueError:
            alt = base
        if alt in paired or (alt, None) in keys:
            base = alt
    if len(sides) > 1 and base not in paired:
        return RoiMatch(name, None, "unmatched", f"names both sides of {base}, which the classes have no sides of")
    if len(sides) > 1 or (plural and base in paired):
        return RoiMatch(name, None, "ambiguous", f"names both sides of a paired organ ({base}); cfseg classes are "
                                                 f"one side each: split it or map it in the mapping file")
    side = next(iter(sides), None)
    if (base, side) in keys:
        return RoiMatch(name, keys[(base, side)], "matched")
    if side is None and base in paired:
        return RoiMatch(name, None, "ambiguous", f"a paired organ ({base}) without a side; say left or right in the "
                                                 f"mapping file")
    if side is not None and (base, None) in keys:
        return RoiMatch(name, None, "unmatched", f"the classes have {keys[(base, None)]} without a side, this ROI "
                                                 f"names the {side} one only")
    hint = close_matches(name, canon)
    return RoiMatch(name, None, "unmatched", "no class of that name" + (f" (close: {', '.join(hint)})" if hint else ""))


# ---------------------------------------------------------------------------------------------------------------
# converting a case


@dataclass
class ConvertedCase:
    """One case read from DICOM.

    Attributes:
        image: the image series (float32 [X, Y, Z], RAS affine).
        labels: uint8 label map [X, Y, Z], value ``i + 1`` for ``classes[i]``.
        annotated: the classes with a matched, non-empty ROI (canonical names, in class order).
        matches: how each ROI name was read.
        notes: one line per ROI not used and per overlap resolved.
        modality: ``"ct"`` or ``"mri"``.
    """

    image: nib.Nifti1Image
    labels: np.ndarray
    annotated: list[str]
    matches: list[RoiMatch]
    notes: list[str] = field(default_factory=list)
    modality: str = "ct"


def find_case_objects(folder: Path) -> tuple[dict[str, list[Path]], list[tuple[Path, Dataset]]]:
    """The DICOM files anywhere under ``folder``: image files by SeriesInstanceUID, and structure sets."""
    files = sorted(p for p in Path(folder).rglob("*") if p.is_file() and is_dicom_file(p))
    if not files:
        raise StructureSetError(f"{folder}: no DICOM files in this case folder")
    images: dict[str, list[Path]] = {}
    structures = []
    for f, h in read_headers(files, str(folder)):
        sop = str(h.get("SOPClassUID", ""))
        if sop in IMAGE_SOP_CLASSES:
            images.setdefault(str(h.get("SeriesInstanceUID", "")), []).append(f)
        elif sop in STRUCTURE_SOP_CLASSES:
            structures.append((f, h))
    return images, structures


def convert_case(folder: str | Path, classes: Sequence[str],
                 mapping: dict[str, str | None] | None = None) -> ConvertedCase:
    """Read one case folder (an image series and one structure set referencing it, anywhere inside) into an image,
    a label map of ``classes`` and the classes annotated.

    Overlaps between ROIs of two classes go to the smaller ROI (noted). Two ROIs naming one class make that class
    not annotated in this case (noted: never a guess). An ROI without contours annotates nothing (noted).

    Raises:
        StructureSetError: no image series, no or several structure sets, a structure set referencing no series of
            the folder, or a series or structure set that cannot be read.
    """
    folder = Path(folder)
    canon = [canonical_name(c) for c in classes]
    images, structures = find_case_objects(folder)
    if not images:
        raise StructureSetError(f"{folder}: no CT or MR image series in this case folder")
    if not structures:
        raise StructureSetError(f"{folder}: no structure set (RTSTRUCT or DICOM-SEG) in this case folder")
    if len(structures) > 1:
        listed = ", ".join(f.name for f, _ in structures)
        raise StructureSetError(f"{folder}: {len(structures)} structure sets ({listed}); "
                                f"keep the one to train on in each case folder")
    path, header = structures[0]
    ref = referenced_series(header)
    if ref in images:
        series_files = images[ref]
    elif len(images) == 1:
        series_files = next(iter(images.values()))
    else:
        raise StructureSetError(f"{folder}: {path.name} references series {ref}, which is not among the "
                                f"{len(images)} series of this folder")
    try:
        series = read_series(series_files)
    except DicomError as e:
        raise StructureSetError(str(e)) from None
    masks = read_structure_masks(path, series, str(path))
    matches = [match_roi(n, canon, mapping) for n in masks]
    notes = [f"{path.name}: {m.describe()}" for m in matches if not m.used]
    by_class: dict[str, list[str]] = {}
    for m in matches:
        if m.used:
            by_class.setdefault(m.cls, []).append(m.roi)
    chosen: dict[str, np.ndarray] = {}
    for cls in canon:
        rois = by_class.get(cls, [])
        if len(rois) > 1:
            notes.append(f"{path.name}: ROIs {', '.join(repr(r) for r in rois)} all name {cls}; none used (map all "
                         f"but one to null in the mapping file)")
        elif rois:
            if not masks[rois[0]].any():
                notes.append(f"{path.name}: ROI {rois[0]!r} ({cls}) has no voxel on this image; {cls} counts as not "
                             f"annotated")
            else:
                chosen[cls] = masks[rois[0]]
    labels = np.zeros(series.image.shape[:3], np.uint8)
    order = sorted(chosen, key=lambda c: -int(chosen[c].sum()))  # largest first: smaller ROIs keep overlaps
    for cls in order:
        overlap = chosen[cls] & (labels > 0)
        if overlap.any():
            others = sorted(canon[v - 1] for v in np.unique(labels[overlap]))
            notes.append(f"{path.name}: {int(overlap.sum())} voxels in both {cls} and {', '.join(others)}: given "
                         f"to {cls} (the smaller)")
        labels[chosen[cls]] = canon.index(cls) + 1
    annotated = [c for c in canon if c in chosen]
    return ConvertedCase(series.image, labels, annotated, matches, notes, series.modality)
