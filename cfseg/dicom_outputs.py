"""DICOM outputs of a segmentation, referencing the series it was made from: DICOM-SEG (highdicom) and RTSTRUCT
(pydicom, contours traced with contourpy).

Both take a label map on the series' own voxel grid (``[X, Y, Z]``, as :func:`cfseg.segmentation.segment` returns it
for a :class:`~cfseg.dicom.DicomSeries`) and the classes to write as ``(label value, class name)``: one segment or
ROI per class, in that order, labelled with the cfseg class name and given a colour (:func:`class_colour`), even when
the class found nothing (a DICOM-SEG segment without pixels; an ROI without contours). Both carry the patient and
study of the source series, its Frame of Reference UID, references to each of its SOP instances, and the algorithm
(:class:`Algorithm`: cfseg, its version and the model's fingerprint, the SHA-256 of its classes and weights).

DICOM-SEG: ``BINARY``, one frame per source slice and segment where it has pixels, the segment's anatomy coded in
SNOMED CT where pydicom knows the organ (``segmented_property_type``; a side as its modifier), else "Organ".
RTSTRUCT: per slice, the closed planar contours of the mask at level 0.5 of its voxel-centre samples (marching
squares), holes as contours of their own (read back with the even-odd rule, :mod:`cfseg.structure_sets`), each
referencing its slice's SOP instance; ``ROIGenerationAlgorithm`` AUTOMATIC, interpreted type ORGAN.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import RTStructureSetStorage, generate_uid

from cfseg import __version__
from cfseg.dicom import DicomSeries, new_instance
from cfseg.online import model_fingerprint

#: RGB colours of classes, by global class index (cycled)
PALETTE: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
    (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255), (170, 110, 40),
    (128, 0, 0), (170, 255, 195), (128, 128, 0), (0, 0, 128),
)
OUTPUT_TYPES = ("nifti", "dicom-seg", "rtstruct")
#: the file each DICOM output type is written to (in the case's output folder)
OUTPUT_FILES = {"dicom-seg": "seg.dcm", "rtstruct": "rtstruct.dcm"}


@dataclass(frozen=True)
class Algorithm:
    """What made a segmentation: written into every DICOM output.

    Attributes:
        version: cfseg's version.
        fingerprint: SHA-256 of the model's classes and weights (:func:`cfseg.online.model_fingerprint`).
        checkpoint: the checkpoint's file name ("" when unknown).
    """

    version: str
    fingerprint: str
    checkpoint: str = ""

    @property
    def description(self) -> str:
        where = f" ({self.checkpoint})" if self.checkpoint else ""
        return f"cfseg {self.version}, model sha256 {self.fingerprint}{where}"


def algorithm_for(module, checkpoint: str = "") -> Algorithm:
    """The :class:`Algorithm` of a loaded cfseg module."""
    return Algorithm(__version__, model_fingerprint(module), str(checkpoint))


def class_colour(index: int) -> tuple[int, int, int]:
    """The RGB colour of global class ``index`` (1 = the first class)."""
    return PALETTE[(int(index) - 1) % len(PALETTE)]


def _check(labels: np.ndarray, series: DicomSeries, classes: Sequence[tuple[int, str]]) -> None:
    if tuple(labels.shape) != tuple(series.image.shape[:3]):
        raise ValueError(f"the label map has shape {tuple(labels.shape)}, the series {tuple(series.image.shape[:3])}; "
                         f"DICOM outputs are written on the series' own grid")
    if not classes:
        raise ValueError("no class to write")
    names = [n for _, n in classes]
    if len(set(names)) != len(names):
        raise ValueError(f"a class is listed twice: {names}")


def _property_codes(name: str):
    """(type, side modifier or None) codes of a cfseg class name: SNOMED CT where pydicom knows the organ."""
    from pydicom.sr.codedict import codes

    tokens = name.split("_")
    side = tokens[-1] if tokens[-1] in ("left", "right") else None
    base = tokens[:-1] if side else tokens
    organ = None
    for key in ("".join(t.capitalize() for t in base), "".join(t.capitalize() for t in base).replace("stem", "Stem")):
        try:
            organ = getattr(codes.SCT, key)
            break
        except AttributeError:
            continue
    modifier = None if side is None else getattr(codes.SCT, side.capitalize())
    return organ or codes.SCT.Organ, modifier


def dicom_seg(labels: np.ndarray, series: DicomSeries, classes: Sequence[tuple[int, str]],
              algorithm: Algorithm, series_number: int = 300) -> Dataset:
    """A DICOM-SEG (highdicom ``Segmentation``, BINARY) of ``labels`` [X, Y, Z] on ``series``.

    Args:
        labels: label values on the series' grid (``series.image.shape``).
        series: the source series (its headers are referenced).
        classes: ``(label value, class name)`` per segment, in segment order (segment numbers 1, 2, ...).
        algorithm: written as each segment's algorithm identification.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    _check(labels, series, classes)
    frames = np.transpose(np.asarray(labels), (2, 1, 0))  # [slice, row, column], as the source slices
    seg = np.zeros(frames.shape, np.uint8)
    for n, (value, _) in enumerate(classes, start=1):
        seg[frames == value] = n
    ident = hd.AlgorithmIdentificationSequence(
        name="cfseg", family=codes.cid7162.ArtificialIntelligence, version=algorithm.version,
        parameters={"model_sha256": algorithm.fingerprint, "checkpoint": algorithm.checkpoint or "-"})
    descriptions = []
    for n, (value, name) in enumerate(classes, start=1):
        organ, side = _property_codes(name)
        d = hd.seg.SegmentDescription(
            segment_number=n, segment_label=name, segmented_property_category=codes.SCT.AnatomicalStructure,
            segmented_property_type=organ, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=ident, tracking_uid=generate_uid(), tracking_id=f"cfseg {name}",
            display_color=hd.color.CIELabColor.from_rgb(*class_colour(value)))
        if side is not None:
            d.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [
                hd.sr.CodedConcept(side.value, side.scheme_designator, side.meaning)]
        descriptions.append(d)
    return hd.seg.Segmentation(
        source_images=series.headers, pixel_array=seg, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=generate_uid(), series_number=series_number,
        sop_instance_uid=generate_uid(), instance_number=1, manufacturer="cfseg",
        manufacturer_model_name="cfseg-segment", software_versions=algorithm.version, device_serial_number="-",
        series_description=f"cfseg {', '.join(n for _, n in classes)}"[:64],
        content_description=algorithm.description[:64], content_label="CFSEG",
        omit_empty_frames=bool(seg.any()))


def slice_contours(mask: np.ndarray) -> list[np.ndarray]:
    """Closed contours of a 2D mask [X, Y] at level 0.5 of its voxel-centre samples, each [N, 2] voxel coordinates
    (x, y), first point not repeated, collinear points dropped. Holes are contours of their own."""
    import contourpy

    m = np.pad(np.asarray(mask, np.float64), 1)
    x, y = np.arange(-1, m.shape[0] - 1, dtype=np.float64), np.arange(-1, m.shape[1] - 1, dtype=np.float64)
    gen = contourpy.contour_generator(y, x, m, line_type="Separate")  # contourpy: z[y, x] -> here z[x, y]
    out = []
    for line in gen.lines(0.5):
        pts = np.asarray(line)[:, ::-1]  # (x, y)
        if len(pts) > 1 and np.allclose(pts[0], pts[-1]):
            pts = pts[:-1]
        if len(pts) >= 3:
            d1 = np.roll(pts, -1, 0) - pts
            d0 = pts - np.roll(pts, 1, 0)
            keep = np.abs(d0[:, 0] * d1[:, 1] - d0[:, 1] * d1[:, 0]) > 1e-9
            pts = pts[keep]
        if len(pts) >= 3:
            out.append(pts)
    return out


def _copy_patient_study(src: Dataset, ds: Dataset) -> None:
    for kw in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "PatientAge", "StudyInstanceUID",
               "StudyDate", "StudyTime", "StudyID", "AccessionNumber", "ReferringPhysicianName", "StudyDescription"):
        if kw in src:
            setattr(ds, kw, src.get(kw))
    for kw in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime", "StudyID",
               "AccessionNumber", "ReferringPhysicianName"):
        if kw not in ds:
            setattr(ds, kw, "")


def rtstruct(labels: np.ndarray, series: DicomSeries, classes: Sequence[tuple[int, str]],
             algorithm: Algorithm, series_number: int = 301) -> Dataset:
    """An RT Structure Set of ``labels`` [X, Y, Z] on ``series``: one ROI per class, contours per slice.

    Args:
        labels: label values on the series' grid (``series.image.shape``).
        series: the source series (its slices are referenced by each contour and in the frame of reference).
        classes: ``(label value, class name)`` per ROI, in ROI order (ROI numbers 1, 2, ...).
        algorithm: written as the structure set's and each ROI's generation description.
    """
    _check(labels, series, classes)
    labels = np.asarray(labels)
    now = datetime.datetime.now()
    src = series.first
    ds = new_instance(RTStructureSetStorage)
    ds.SpecificCharacterSet = "ISO_IR 192"
    _copy_patient_study(src, ds)
    ds.Modality, ds.SeriesInstanceUID, ds.SeriesNumber = "RTSTRUCT", generate_uid(), series_number
    ds.SeriesDescription = f"cfseg {', '.join(n for _, n in classes)}"[:64]
    ds.InstanceNumber = 1
    ds.Manufacturer, ds.ManufacturerModelName, ds.SoftwareVersions = "cfseg", "cfseg-segment", algorithm.version
    ds.FrameOfReferenceUID = series.frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    ds.StructureSetLabel = "CFSEG"
    ds.StructureSetName = "cfseg"
    ds.StructureSetDescription = algorithm.description[:1024]
    ds.StructureSetDate, ds.StructureSetTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    ds.InstanceCreationDate, ds.InstanceCreationTime = ds.StructureSetDate, ds.StructureSetTime
    ds.ApprovalStatus = "UNAPPROVED"

    def image_ref(h: Dataset) -> Dataset:
        r = Dataset()
        r.ReferencedSOPClassUID, r.ReferencedSOPInstanceUID = h.SOPClassUID, h.SOPInstanceUID
        return r

    rseries = Dataset()
    rseries.SeriesInstanceUID = series.series_uid
    rseries.ContourImageSequence = DicomSequence([image_ref(h) for h in series.headers])
    rstudy = Dataset()
    rstudy.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"  # Detached Study Management (as the standard's examples)
    rstudy.ReferencedSOPInstanceUID = str(src.StudyInstanceUID)
    rstudy.RTReferencedSeriesSequence = DicomSequence([rseries])
    frame = Dataset()
    frame.FrameOfReferenceUID = series.frame_of_reference_uid
    frame.RTReferencedStudySequence = DicomSequence([rstudy])
    ds.ReferencedFrameOfReferenceSequence = DicomSequence([frame])

    lps = series.lps_affine
    rois, contours, observations = [], [], []
    for n, (value, name) in enumerate(classes, start=1):
        roi = Dataset()
        roi.ROINumber, roi.ReferencedFrameOfReferenceUID, roi.ROIName = n, series.frame_of_reference_uid, name
        roi.ROIGenerationAlgorithm = "AUTOMATIC"
        roi.ROIGenerationDescription = algorithm.description[:64]
        rois.append(roi)
        rc = Dataset()
        rc.ReferencedROINumber = n
        rc.ROIDisplayColor = list(class_colour(value))
        seq = []
        mask = labels == value
        for k in np.flatnonzero(mask.any(axis=(0, 1))):
            for pts in slice_contours(mask[:, :, k]):
                vox = np.c_[pts, np.full(len(pts), float(k)), np.ones(len(pts))]
                world = (vox @ lps.T)[:, :3]
                c = Dataset()
                c.ContourGeometricType = "CLOSED_PLANAR"
                c.NumberOfContourPoints = len(pts)
                c.ContourData = [f"{v:.4f}" for v in world.ravel()]
                c.ContourImageSequence = DicomSequence([image_ref(series.headers[int(k)])])
                seq.append(c)
        if seq:
            rc.ContourSequence = DicomSequence(seq)
        contours.append(rc)
        obs = Dataset()
        obs.ObservationNumber, obs.ReferencedROINumber = n, n
        obs.ROIObservationLabel = name[:16]
        obs.RTROIInterpretedType, obs.ROIInterpreter = "ORGAN", ""
        observations.append(obs)
    ds.StructureSetROISequence = DicomSequence(rois)
    ds.ROIContourSequence = DicomSequence(contours)
    ds.RTROIObservationsSequence = DicomSequence(observations)
    return ds


def dicom_output(kind: str, labels: np.ndarray, series: DicomSeries, classes: Sequence[tuple[int, str]],
                 algorithm: Algorithm) -> Dataset:
    """``kind`` (``"dicom-seg"`` or ``"rtstruct"``) of ``labels`` on ``series``."""
    if kind == "dicom-seg":
        return dicom_seg(labels, series, classes, algorithm)
    if kind == "rtstruct":
        return rtstruct(labels, series, classes, algorithm)
    raise ValueError(f"unknown DICOM output type {kind!r}; use one of {', '.join(OUTPUT_FILES)}")
