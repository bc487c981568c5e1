"""Reading a CT or MR DICOM series into the same in-memory image the NIfTI path gives, with its geometry checked.

:func:`read_series` reads the single-frame image files of one series (a folder, or a list of files) with pydicom
and returns a :class:`DicomSeries`: a ``nibabel.Nifti1Image`` (float32 voxels ``[X, Y, Z]`` = ``[column, row,
slice]``, RAS affine, as dcm2niix lays it out) and the slices' headers in slice order, which the DICOM writers
(:mod:`cfseg.dicom_outputs`) reference.

Geometry comes from the headers, never from file names: slices are ordered by ``ImagePositionPatient`` projected on
the slice normal (the cross product of the two ``ImageOrientationPatient`` cosines); the affine's in-plane columns
are those cosines times ``PixelSpacing``, its slice column the mean step between positions; LPS (DICOM) becomes RAS
(NIfTI) by negating x and y. Voxel values are ``stored * RescaleSlope + RescaleIntercept`` per slice (Hounsfield
units for CT).

Refused, each with one line (:class:`DicomError`, ``"<folder>: <problem>"``): no DICOM file; only non-image objects
(a structure set, a plan, a dose ...) or images that are not CT or MR; several series in one folder; multi-frame
(enhanced) images; slices that differ in size, pixel spacing or orientation; gantry tilt; duplicated slices;
missing slices; slice spacing that varies by more than :data:`SPACING_TOLERANCE`; pixel data that cannot be
decoded (a compressed transfer syntax without its decoder). Non-image objects beside the images of one series (an
RTSTRUCT exported with its CT) are set aside, not read.

:func:`write_series` does the reverse (a NIfTI volume as a CT or MR series) for tests and demos.
"""

from __future__ import annotations

import datetime
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    UID,
    CTImageStorage,
    EnhancedCTImageStorage,
    EnhancedMRImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)

#: image SOP classes read, and the cfseg modality of each
IMAGE_SOP_CLASSES = {CTImageStorage: "ct", MRImageStorage: "mri"}
#: multi-frame image SOP classes (refused: export the series as single-frame images)
MULTIFRAME_SOP_CLASSES = {EnhancedCTImageStorage, EnhancedMRImageStorage}
#: largest relative deviation of a gap between slice positions from the median gap
SPACING_TOLERANCE = 0.01
#: largest angle (degrees) between the slice stacking direction and the slice normal (gantry tilt above it)
TILT_TOLERANCE_DEG = 0.05
#: LPS (DICOM patient coordinates) <-> RAS (NIfTI world coordinates)
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


class DicomError(ValueError):
    """A DICOM input cfseg cannot read as one image volume; the message says where and why, in one line."""


@dataclass
class DicomSeries:
    """One image series read by :func:`read_series`.

    Attributes:
        image: float32 voxels [X, Y, Z] (column, row, slice) with the RAS affine (``image.affine``).
        headers: the slices' headers (no pixel data) in slice order: ``headers[k]`` is ``image``'s slice ``k``.
        modality: ``"ct"`` or ``"mri"``.
        where: how messages name the series (its folder).
    """

    image: nib.Nifti1Image
    headers: list[Dataset]
    modality: str
    where: str

    @property
    def first(self) -> Dataset:
        return self.headers[0]

    @property
    def series_uid(self) -> str:
        return str(self.first.SeriesInstanceUID)

    @property
    def frame_of_reference_uid(self) -> str:
        return str(self.first.FrameOfReferenceUID)

    @property
    def sop_instance_uids(self) -> list[str]:
        return [str(h.SOPInstanceUID) for h in self.headers]

    @property
    def lps_affine(self) -> np.ndarray:
        """Voxel [X, Y, Z] -> DICOM patient coordinates (LPS, mm), 4 x 4."""
        return LPS_TO_RAS @ self.image.affine


def is_dicom_file(path: Path) -> bool:
    """Whether ``path`` is a DICOM file (Part 10: ``DICM`` at byte 128)."""
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"


def dicom_files(folder: Path) -> list[Path]:
    """The DICOM files directly inside ``folder`` (not its subfolders), sorted by name."""
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and is_dicom_file(p))


def is_series_folder(path: Path) -> bool:
    """Whether ``path`` is a folder holding DICOM files itself."""
    path = Path(path)
    return path.is_dir() and any(p.is_file() and is_dicom_file(p) for p in path.iterdir())


def sop_class_name(uid: str) -> str:
    """``"RT Structure Set Storage (1.2.840.10008.5.1.4.1.1.481.3)"``: a SOP class UID with its name."""
    name = UID(str(uid)).name
    return f"{name} ({uid})" if name and name != str(uid) else str(uid)


def read_headers(files: Sequence[Path], where: str) -> list[tuple[Path, Dataset]]:
    """``(file, header without pixel data)`` for each file; an unreadable file is a :class:`DicomError`."""
    out = []
    for f in files:
        try:
            out.append((Path(f), pydicom.dcmread(str(f), stop_before_pixels=True)))
        except Exception as e:  # pydicom raises several types for damaged files
            raise DicomError(f"{where}: {Path(f).name} is not a readable DICOM file ({type(e).__name__}: "
                             f"{' '.join(str(e).split())})") from None
    return out


def _floats(ds: Dataset, keyword: str, n: int, where: str, f: Path) -> np.ndarray:
    value = ds.get(keyword)
    try:
        arr = np.asarray([float(v) for v in value], np.float64)
    except (TypeError, ValueError):
        arr = np.zeros(0)
    if arr.size != n or not np.isfinite(arr).all():
        raise DicomError(f"{where}: {f.name} has no valid {keyword} ({value!r}); its geometry is unknown")
    return arr


def read_series(source: str | Path | Sequence[Path], spacing_tolerance: float = SPACING_TOLERANCE,
                tilt_tolerance_deg: float = TILT_TOLERANCE_DEG) -> DicomSeries:
    """Read one CT or MR series (see the module doc for what is checked and refused).

    Args:
        source: a folder holding the series' files (subfolders are not read), or the files themselves.
        spacing_tolerance: largest relative deviation of a gap between slices from the median gap.
        tilt_tolerance_deg: largest angle between the slice stacking direction and the slice normal.

    Raises:
        DicomError: ``"<folder>: <problem>"``.
    """
    if isinstance(source, (str, Path)):
        folder = Path(source)
        if not folder.is_dir():
            raise DicomError(f"{folder}: not a folder of DICOM files")
        files, where = dicom_files(folder), str(folder)
        if not files:
            raise DicomError(f"{where}: no DICOM files in this folder (a DICOM file has 'DICM' at byte 128; a folder "
                             f"of series folders is read one subfolder at a time)")
    else:
        files = [Path(f) for f in source]
        where = str(files[0].parent) if files else "<no files>"
        if not files:
            raise DicomError("no DICOM files given")
    headers = read_headers(files, where)
    images = [(f, h) for f, h in headers if str(h.get("SOPClassUID", "")) in IMAGE_SOP_CLASSES]
    multi = [(f, h) for f, h in headers if str(h.get("SOPClassUID", "")) in MULTIFRAME_SOP_CLASSES
             or (str(h.get("SOPClassUID", "")) in IMAGE_SOP_CLASSES and int(h.get("NumberOfFrames", 1) or 1) > 1)]
    if multi:
        f, h = multi[0]
        raise DicomError(f"{where}: {f.name} is a multi-frame image ({sop_class_name(h.get('SOPClassUID', '?'))}, "
                         f"{h.get('NumberOfFrames', '?')} frames); cfseg reads series of single-frame CT or MR images "
                         f"(export the series as classic single-frame images)")
    if not images:
        kinds = Counter(sop_class_name(h.get("SOPClassUID", "?")) for _, h in headers)
        listed = ", ".join(f"{k} x{n}" for k, n in kinds.most_common())
        raise DicomError(f"{where}: no CT or MR image in this folder, only {listed}: a non-image SOP class or an image "
                         f"kind cfseg does not segment (it reads CT Image Storage and MR Image Storage series)")
    series = Counter(str(h.get("SeriesInstanceUID", "")) for _, h in images)
    if len(series) > 1:
        desc = {str(h.get("SeriesInstanceUID", "")): str(h.get("SeriesDescription", "")) for _, h in images}
        listed = "; ".join(f"{uid} {desc[uid]!r} ({n} files)" for uid, n in series.most_common())
        raise DicomError(f"{where}: mixed series in one folder: {len(series)} series ({listed}); put each series in "
                         f"its own folder")
    return _volume(images, where, spacing_tolerance, tilt_tolerance_deg)


def _volume(images: list[tuple[Path, Dataset]], where: str, spacing_tolerance: float,
            tilt_tolerance_deg: float) -> DicomSeries:
    """Sort, check and stack the headers of one series, then read and rescale their pixels."""
    uids = Counter(str(h.SOPInstanceUID) for _, h in images)
    dup = [u for u, n in uids.items() if n > 1]
    if dup:
        names = [f.name for f, h in images if str(h.SOPInstanceUID) == dup[0]]
        raise DicomError(f"{where}: duplicated slice: files {', '.join(names)} are the same SOP instance {dup[0]}")
    f0, h0 = images[0]
    iop = _floats(h0, "ImageOrientationPatient", 6, where, f0)
    spacing = _floats(h0, "PixelSpacing", 2, where, f0)  # (between rows, between columns)
    size = (int(h0.Rows), int(h0.Columns))
    for f, h in images[1:]:
        if not np.allclose(_floats(h, "ImageOrientationPatient", 6, where, f), iop, atol=1e-4):
            raise DicomError(f"{where}: slices differ in orientation ({f.name} vs {f0.name}: ImageOrientationPatient "
                             f"{list(h.ImageOrientationPatient)} vs {list(iop)}); not one volume")
        if not np.allclose(_floats(h, "PixelSpacing", 2, where, f), spacing, rtol=1e-4, atol=1e-5):
            raise DicomError(f"{where}: slices differ in pixel spacing ({f.name}: {list(h.PixelSpacing)}, {f0.name}: "
                             f"{list(spacing)}); not one volume")
        if (int(h.Rows), int(h.Columns)) != size:
            raise DicomError(f"{where}: slices differ in size ({f.name}: {h.Rows} x {h.Columns}, {f0.name}: "
                             f"{size[0]} x {size[1]}); not one volume")
    row, col = iop[:3], iop[3:]  # along a row (increasing column index), along a column (increasing row index)
    if abs(np.linalg.norm(row) - 1) > 1e-3 or abs(np.linalg.norm(col) - 1) > 1e-3 or abs(row @ col) > 1e-3:
        raise DicomError(f"{where}: ImageOrientationPatient {list(iop)} is not two orthogonal unit vectors")
    if np.any(spacing <= 0):
        raise DicomError(f"{where}: PixelSpacing {list(spacing)} is not positive")
    normal = np.cross(row, col)
    tilt = float(h0.get("GantryDetectorTilt", 0) or 0)
    if abs(tilt) > tilt_tolerance_deg:
        raise DicomError(f"{where}: gantry tilt of {tilt:g} degrees (GantryDetectorTilt); cfseg reads untilted series "
                         f"only: resample it onto an untilted grid first (e.g. dcm2niix corrects the tilt)")
    if len(images) < 2:
        raise DicomError(f"{where}: one slice only; cfseg segments 3D volumes (a series of at least 2 slices)")
    pos = np.stack([_floats(h, "ImagePositionPatient", 3, where, f) for f, h in images])
    order = np.argsort(pos @ normal, kind="stable")
    images, pos = [images[i] for i in order], pos[order]
    along = pos @ normal
    gaps = np.diff(along)
    step = float(np.median(gaps))
    close = np.flatnonzero(gaps <= max(1e-3, 1e-3 * abs(step)))
    if close.size:
        k = int(close[0])
        raise DicomError(f"{where}: duplicated slice: {images[k][0].name} and {images[k + 1][0].name} are at the same "
                         f"position ({along[k]:.3f} mm along the slice normal)")
    shift = pos[-1] - pos[0]
    angle = float(np.degrees(np.arccos(np.clip(abs(shift @ normal) / np.linalg.norm(shift), -1.0, 1.0))))
    if angle > tilt_tolerance_deg:
        raise DicomError(f"{where}: gantry tilt of {angle:.2f} degrees (slice positions are sheared against the slice "
                         f"normal); cfseg reads untilted series only: resample it onto an untilted grid first (e.g. "
                         f"dcm2niix corrects the tilt)")
    tol = spacing_tolerance * step
    for k, g in enumerate(gaps):
        if abs(g - step) <= tol:
            continue
        m = round(g / step)
        a, b = images[k][0].name, images[k + 1][0].name
        if m >= 2 and abs(g - m * step) <= tol:
            raise DicomError(f"{where}: missing slices: {m - 1} slice(s) missing between {a} and {b} (a gap of "
                             f"{g:.3f} mm, the series' spacing is {step:.3f} mm)")
        raise DicomError(f"{where}: non-uniform slice spacing: gaps from {gaps.min():.3f} to {gaps.max():.3f} mm "
                         f"(first off between {a} and {b}; median {step:.3f} mm, tolerance "
                         f"{100 * spacing_tolerance:g}%); "
                         f"resample it onto a uniform grid first")
    affine = np.eye(4)
    affine[:3, 0] = row * spacing[1]
    affine[:3, 1] = col * spacing[0]
    affine[:3, 2] = shift / (len(images) - 1)
    affine[:3, 3] = pos[0]
    data = np.empty((size[1], size[0], len(images)), np.float32)
    for k, (f, _) in enumerate(images):
        data[:, :, k] = _pixels(f, where, size).T
    modality = IMAGE_SOP_CLASSES[str(h0.SOPClassUID)]
    return DicomSeries(nib.Nifti1Image(data, LPS_TO_RAS @ affine), [h for _, h in images], modality, where)


def _pixels(f: Path, where: str, size: tuple[int, int]) -> np.ndarray:
    """One slice's rescaled values [rows, columns] (float32)."""
    try:
        ds = pydicom.dcmread(str(f))
    except Exception as e:  # pydicom raises several types for damaged files
        raise DicomError(f"{where}: {f.name} is not a readable DICOM file ({type(e).__name__}: {e})") from None
    if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        raise DicomError(f"{where}: {f.name} has {ds.SamplesPerPixel} samples per pixel (colour); expected one "
                         f"intensity per pixel")
    try:
        arr = ds.pixel_array
    except Exception as e:  # no decoder for the transfer syntax, or damaged compressed data
        ts = ds.file_meta.get("TransferSyntaxUID", "?")
        raise DicomError(f"{where}: {f.name}: compressed pixel data that cannot be decoded here (transfer syntax "
                         f"{UID(str(ts)).name or ts}: {type(e).__name__}: {' '.join(str(e).split())[:200]}); install "
                         f"its pydicom decoder plugin (pylibjpeg, pylibjpeg-libjpeg, pylibjpeg-openjpeg) or "
                         f"decompress the series (e.g. gdcmconv --raw)") from None
    if arr.shape != size:
        raise DicomError(f"{where}: {f.name}: pixel data of shape {arr.shape}, header says {size[0]} x {size[1]}")
    slope = float(ds.get("RescaleSlope", 1) or 1)
    inter = float(ds.get("RescaleIntercept", 0) or 0)
    return (arr.astype(np.float64) * slope + inter).astype(np.float32)


def _ds(value: float) -> str:
    """A decimal string (DICOM DS, at most 16 characters) holding ``value`` as closely as fits."""
    for digits in range(15, 0, -1):
        s = f"{value:.{digits}g}"
        if len(s) <= 16:
            return s
    return f"{value:.0f}"


def new_instance(sop_class: str) -> Dataset:
    """An empty explicit-VR little-endian instance of ``sop_class`` with a new SOP Instance UID and its file meta."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    return ds


def write_series(image: nib.Nifti1Image | str | Path, folder: str | Path, modality: str = "CT",
                 patient_id: str = "cfseg-demo", patient_name: str = "cfseg^demo", study_uid: str | None = None,
                 series_description: str = "") -> list[Path]:
    """Write a 3D NIfTI volume as a single-frame CT or MR series, one file per slice of the third axis.

    The volume's columns 0 and 1 must be orthogonal (the in-plane axes); the third axis may be sheared (a tilted
    series, for tests). CT values are rounded to integers and stored as int16 with ``RescaleIntercept`` -1024; MR
    values are stored as uint16 with a slope and intercept spanning their range.

    Args:
        image: the volume (nibabel image or NIfTI path); voxels [X, Y, Z] with a RAS affine.
        folder: created if missing; files ``slice_0000.dcm`` ... in slice order.
        modality: ``"CT"`` or ``"MR"``.

    Returns:
        the files written.
    """
    img = nib.load(str(image)) if isinstance(image, (str, Path)) else image
    data = np.asarray(img.dataobj, np.float64)
    if data.ndim != 3:
        raise ValueError(f"write_series needs a 3D volume, got shape {data.shape}")
    modality = modality.upper()
    if modality not in ("CT", "MR"):
        raise ValueError(f"modality must be 'CT' or 'MR', got {modality!r}")
    lps = LPS_TO_RAS @ np.asarray(img.affine, np.float64)
    sx, sy = np.linalg.norm(lps[:3, 0]), np.linalg.norm(lps[:3, 1])
    row, col = lps[:3, 0] / sx, lps[:3, 1] / sy
    if abs(row @ col) > 1e-6:
        raise ValueError("the volume's first two axes are not orthogonal; it cannot be written as DICOM slices")
    if modality == "CT":
        slope, inter = 1.0, -1024.0
        stored = np.clip(np.round(data) - inter, -32768, 32767).astype(np.int16)
    else:
        lo, hi = float(data.min()), float(data.max())
        slope, inter = max(hi - lo, 1e-6) / 65535.0, lo
        stored = np.clip(np.round((data - inter) / slope), 0, 65535).astype(np.uint16)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or generate_uid()
    series_uid, frame_uid = generate_uid(), generate_uid()
    sop_class = CTImageStorage if modality == "CT" else MRImageStorage
    today = datetime.date.today().strftime("%Y%m%d")
    files = []
    for k in range(data.shape[2]):
        ds = new_instance(sop_class)
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = patient_name, patient_id, "", "O"
        ds.StudyInstanceUID, ds.StudyDate, ds.StudyTime, ds.StudyID = study_uid, today, "120000", "1"
        ds.AccessionNumber, ds.ReferringPhysicianName = "", ""
        ds.Modality, ds.SeriesInstanceUID, ds.SeriesNumber = modality, series_uid, 1
        ds.SeriesDescription = series_description
        ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = frame_uid, ""
        ds.Manufacturer = "cfseg"
        ds.InstanceNumber = k + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImagePositionPatient = [_ds(v) for v in lps[:3, 3] + k * lps[:3, 2]]
        ds.ImageOrientationPatient = [_ds(v) for v in (*row, *col)]
        ds.PixelSpacing = [_ds(sy), _ds(sx)]
        ds.SliceThickness = _ds(float(np.linalg.norm(lps[:3, 2])))
        ds.Rows, ds.Columns = data.shape[1], data.shape[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
        ds.PixelRepresentation = 1 if stored.dtype == np.int16 else 0
        ds.RescaleSlope, ds.RescaleIntercept = _ds(slope), _ds(inter)
        if modality == "CT":
            ds.RescaleType = "HU"
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).tobytes()
        path = folder / f"slice_{k:04d}.dcm"
        ds.save_as(str(path), enforce_file_format=True)
        files.append(path)
    return files
