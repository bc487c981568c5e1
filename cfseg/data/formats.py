"""Readers for nnU-Net v2 raw and Medical Segmentation Decathlon datasets, with per-case annotated classes.

Both formats are read into one :class:`DatasetInfo`: canonical class names (see :mod:`cfseg.vocab`) mapped to
the label values used in that dataset's files (values need not be consecutive), one :class:`CaseRecord` per
case with its image channel files, its label file and the classes annotated for it.

Per-case annotation comes from an optional ``partial_labels.json`` beside ``dataset.json`` (case id -> list of
class names). Without it every case annotates all of its dataset's labels.

Everything here reads JSON and NIfTI *headers* only; voxel checks (label values, NaN) happen when a case is
loaded (:mod:`cfseg.data.transforms`) or in ``cfseg-data-summary --check`` (:mod:`cfseg.data.summary`), which
passes a ``problems`` list to :func:`read_dataset` to collect every per-case problem instead of stopping at the
first. Every :class:`DatasetError` message is one line ``<file>: <what is wrong> (<hint>)``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cfseg.vocab import BACKGROUND, canonical_name, unknown_class_error

PARTIAL_LABELS_FILE = "partial_labels.json"
_MRI_CHANNELS = ("mr", "mri", "t1", "t2", "flair", "adc", "dwi", "pd", "t1c", "t1ce", "t1w", "t2w", "nonct")


class DatasetError(ValueError):
    """A dataset on disk is malformed. The message names the file and the problem.

    A DataLoader worker's exception comes back to the main process re-created as ``DatasetError("Caught
    DatasetError in DataLoader worker process 0.\nOriginal Traceback ...")``; that form is reduced to the
    original message (the worker's traceback is kept in :attr:`worker_traceback`), so a user still reads one
    line naming the file.
    """

    worker_traceback: str | None = None

    def __init__(self, *args: object):
        tb = None
        if len(args) == 1 and isinstance(args[0], str) and args[0].startswith("Caught DatasetError") \
                and "Original Traceback" in args[0] and "DatasetError: " in args[0]:
            tb = args[0]
            args = (tb.rsplit("DatasetError: ", 1)[1].strip(),)
        super().__init__(*args)
        self.worker_traceback = tb


@dataclass(frozen=True)
class CaseRecord:
    """One case of a dataset.

    Attributes:
        case_id: identifier (file stem without channel suffix).
        images: one NIfTI path per channel, in channel order.
        label: label map path, or None for an image-only case.
        annotated: canonical names of the classes annotated for this case.
    """

    case_id: str
    images: tuple[Path, ...]
    label: Path | None
    annotated: tuple[str, ...]


@dataclass
class DatasetInfo:
    """A dataset read from disk.

    Attributes:
        name: dataset name (folder name unless given).
        root: dataset folder (holding ``dataset.json``).
        format: ``"nnunet"`` or ``"msd"``.
        modality: ``"ct"`` or ``"mri"`` (from the first channel name unless given).
        channel_names: channel names in order.
        labels: canonical class name -> label value in this dataset's files (background excluded).
        cases: the cases, sorted by id.
    """

    name: str
    root: Path
    format: str
    modality: str
    channel_names: list[str]
    labels: dict[str, int]
    cases: list[CaseRecord] = field(default_factory=list)

    @property
    def classes(self) -> list[str]:
        """Foreground class names in label-value order."""
        return sorted(self.labels, key=self.labels.__getitem__)

    @property
    def labeled(self) -> bool:
        return any(c.label is not None for c in self.cases)

    def case(self, case_id: str) -> CaseRecord:
        for c in self.cases:
            if c.case_id == case_id:
                return c
        raise KeyError(f"case {case_id!r} not in dataset {self.name!r} ({self.root})")


def _problem(problems: list[str] | None, message: str) -> None:
    """Raise ``DatasetError(message)``, or collect it when a checker passes a ``problems`` list."""
    if problems is None:
        raise DatasetError(message)
    problems.append(message)


def _load_json(path: Path) -> Any:
    if not path.is_file():
        raise DatasetError(f"{path}: file not found")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from e
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path}: cannot be read ({e})") from e


def modality_from_channel(name: str) -> str:
    """``"CT"`` -> ``"ct"``; MRI sequence names (``"T2"``, ``"MRI"``, ``"FLAIR"``...) -> ``"mri"``."""
    key = str(name).strip().lower().replace(" ", "").replace("-", "")
    if key in ("ct", "cect", "ncct", "cbct"):
        return "ct"
    if key in _MRI_CHANNELS or key.startswith("mr") or key.startswith("t1") or key.startswith("t2"):
        return "mri"
    raise DatasetError(
        f"cannot tell the modality of channel {name!r}; pass modality='ct' or 'mri' in the dataset config"
    )


def detect_format(root: Path) -> str:
    """``"nnunet"`` or ``"msd"`` from the contents of ``dataset.json``."""
    meta = _load_json(Path(root) / "dataset.json")
    if not isinstance(meta, dict):
        raise DatasetError(f"{Path(root) / 'dataset.json'}: expected a JSON object, got {type(meta).__name__}")
    if "channel_names" in meta:
        return "nnunet"
    if "training" in meta or "modality" in meta:
        return "msd"
    raise DatasetError(
        f"{Path(root) / 'dataset.json'}: neither nnU-Net v2 ('channel_names') nor MSD ('training'/'modality')"
    )


def _parse_labels(raw: Any, path: Path, name_to_value: bool) -> dict[str, int]:
    """Canonical name -> value from the ``labels`` entry (nnU-Net: name -> int; MSD: "int" -> name)."""
    if not isinstance(raw, dict) or not raw:
        raise DatasetError(f"{path}: 'labels' must be a non-empty object")
    labels: dict[str, int] = {}
    for k, v in raw.items():
        name, value = (k, v) if name_to_value else (v, k)
        if isinstance(value, list | tuple):
            raise DatasetError(f"{path}: region-based label {name!r}: {value} is not supported")
        try:
            ivalue = int(value)
        except (TypeError, ValueError) as e:
            raise DatasetError(f"{path}: label {name!r} has non-integer value {value!r}") from e
        try:
            cname = canonical_name(str(name))
        except ValueError as e:
            raise DatasetError(f"{path}: {e}") from e
        if cname == BACKGROUND:
            if ivalue != 0:
                raise DatasetError(f"{path}: background must have value 0, not {ivalue}")
            continue
        if ivalue <= 0 or ivalue > 255:
            raise DatasetError(f"{path}: label {name!r} has value {ivalue}; foreground values must be 1..255")
        if cname in labels:
            raise DatasetError(f"{path}: class {name!r} appears twice (canonical name {cname!r})")
        if ivalue in labels.values():
            raise DatasetError(f"{path}: label value {ivalue} is used by two classes")
        labels[cname] = ivalue
    return labels


def _read_partial_labels(root: Path, labels: dict[str, int], case_ids: list[str],
                         problems: list[str] | None = None,
                         skipped: Sequence[str] = ()) -> dict[str, tuple[str, ...]]:
    """Annotated classes per case from ``partial_labels.json``; all labels when the file is absent.

    With ``problems``, per-case problems are collected there (those cases annotate nothing) instead of raised;
    ``skipped`` are ids of cases left out for other problems (not reported again as unknown here).
    """
    path = root / PARTIAL_LABELS_FILE
    everything = tuple(sorted(labels, key=labels.__getitem__))
    if not path.exists():
        return {c: everything for c in case_ids}
    raw = _load_json(path)
    if not isinstance(raw, dict):
        raise DatasetError(f"{path}: expected an object mapping case id -> list of class names")
    unknown_cases = sorted(set(raw) - set(case_ids) - set(skipped))
    if unknown_cases:
        _problem(problems, f"{path}: cases not in the dataset: {', '.join(unknown_cases[:5])}")
    out: dict[str, tuple[str, ...]] = {}
    for case_id in case_ids:
        out[case_id] = ()
        if case_id not in raw:
            _problem(problems, f"{path}: case {case_id!r} is missing (list the classes annotated for it)")
            continue
        names = raw[case_id]
        if not isinstance(names, list):
            _problem(problems, f"{path}: case {case_id!r} must map to a list of class names, got {names!r}")
            continue
        annotated = []
        for n in names:
            try:
                cn = canonical_name(str(n))
            except ValueError as e:
                if problems is None:
                    raise DatasetError(f"{path}: case {case_id!r}: {e}") from e
                problems.append(f"{path}: case {case_id!r}: {e}")
                continue
            if cn not in labels:
                _problem(problems, f"{path}: case {case_id!r}: {unknown_class_error(n, list(labels))}")
                continue
            if cn not in annotated:
                annotated.append(cn)
        out[case_id] = tuple(sorted(annotated, key=labels.__getitem__))
    return out


#: Hounsfield units at or below which a voxel is air (CT air is about -1000 HU)
CT_AIR_HU = -500.0
#: a CT in Hounsfield units has at least this fraction of air voxels (outside the body, lungs, airways, sinuses)
CT_MIN_AIR_FRACTION = 1e-3


def ct_offset_problem(array: np.ndarray, max_samples: int = 2_000_000) -> str | None:
    """Why a CT volume does not look like Hounsfield units, or None.

    A CT in HU has air near -1000; one stored without its HU offset (the DICOM RescaleIntercept, typically -1024,
    not applied) has no air and essentially non-negative intensities (air at 0, soft tissue near +1040). A CT cropped
    inside the body has no air either but keeps fat below 0, so it is not flagged.

    Args:
        array: intensities of one CT volume, any shape (a regular subsample of at most ``max_samples`` is read).
    """
    a = np.asarray(array).ravel()
    if a.size > max_samples:
        a = a[:: -(-a.size // max_samples)]
    a = a.astype(np.float32, copy=False)
    a = a[np.isfinite(a)]
    if a.size == 0 or float(np.mean(a <= CT_AIR_HU)) >= CT_MIN_AIR_FRACTION:
        return None
    lo, hi = (float(v) for v in np.percentile(a, [0.5, 99.5]))
    if lo < -0.05 * abs(hi):  # fat below 0: Hounsfield units without air (a crop inside the body)
        return None
    return (f"CT intensities do not look like Hounsfield units: no air near -1000 HU and non-negative values "
            f"(0.5th-99.5th percentile {lo:g} to {hi:g}), as a CT stored without its HU offset; apply the "
            "rescale intercept (typically -1024) or check that the channel is CT")


#: NIfTI's vector data types, by the fields nibabel reads them with
_VECTOR_DTYPES = {("R", "G", "B"): "RGB24", ("R", "G", "B", "A"): "RGBA32"}


def dtype_problem(dtype: Any) -> str | None:
    """What is wrong with a NIfTI file's data type for cfseg (one scalar intensity or label per voxel), or None.

    RGB24/RGBA32 (colour) and complex data are read by nibabel but are no scalar images; casting them to float
    fails with a numpy error that says nothing about the file.
    """
    dt = np.dtype(dtype)
    if dt.names:
        kind = _VECTOR_DTYPES.get(tuple(dt.names), f"multi-field ({', '.join(dt.names)})")
        what = f"{kind} data"
    elif np.issubdtype(dt, np.complexfloating):
        what = f"complex data ({dt})"
    elif not (np.issubdtype(dt, np.number) or np.issubdtype(dt, np.bool_)):
        what = f"{dt} data"
    else:
        return None
    return (f"{what}: cfseg reads single-channel scalar images (convert it to one scalar channel, e.g. grayscale "
            "or magnitude, or one file per channel)")


def read_error_message(path: str | Path, err: BaseException) -> str:
    """One line ``<path>: <what is wrong> (<hint>)`` for a NIfTI file nibabel/MONAI failed to read."""
    import gzip
    import zlib

    from nibabel.filebasedimages import ImageFileError

    detail = " ".join(str(err).split()) or type(err).__name__
    hint = "re-export or re-copy the file"
    if isinstance(err, EOFError):
        what = "truncated file: the compressed data end early"
    elif isinstance(err, zlib.error | gzip.BadGzipFile):
        what = f"corrupt gzip data ({detail})"
    elif isinstance(err, ImageFileError) and detail.startswith("Empty file"):
        what = "empty file (0 bytes)"
    elif isinstance(err, ImageFileError):
        what = _why_no_header(Path(path))
    elif isinstance(err, FileNotFoundError):
        what, hint = "file not found", "check the path and dataset.json"
    elif "bytes" in detail and ("Expected" in detail or "too short" in detail):
        what = f"truncated file ({detail})"
    else:
        what = f"cannot be read as NIfTI ({type(err).__name__}: {detail})"
    return f"{path}: {what} ({hint})"


def _why_no_header(path: Path) -> str:
    """Why nibabel could not tell the file type: a cut-off gzip stream, a short file, or not NIfTI at all."""
    import gzip
    import zlib

    try:
        if path.name.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                head = f.read(352)
                while f.read(1 << 20):
                    pass
        else:
            with open(path, "rb") as f:
                head = f.read(352)
    except EOFError:
        return "truncated file: the compressed data end early"
    except (OSError, zlib.error) as e:
        return f"corrupt gzip data ({' '.join(str(e).split())})"
    if len(head) < 348:
        return f"truncated file: {len(head)} bytes, shorter than a NIfTI header (348)"
    return "not a NIfTI file, or its header is corrupt"


def describe_affine_difference(affine: np.ndarray, ref: np.ndarray) -> str:
    """Which of spacing, origin and direction differ between two 4x4 voxel-to-world affines (one line)."""
    a, r = np.asarray(affine, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    sa, sr = np.linalg.norm(a[:3, :3], axis=0), np.linalg.norm(r[:3, :3], axis=0)
    parts = []
    if not np.allclose(sa, sr, atol=1e-3, rtol=1e-4):
        parts.append(f"spacing {tuple(np.round(sa, 4).tolist())} vs {tuple(np.round(sr, 4).tolist())}")
    if not np.allclose(a[:3, 3], r[:3, 3], atol=1e-3, rtol=1e-4):
        parts.append(f"origin {tuple(np.round(a[:3, 3], 3).tolist())} vs {tuple(np.round(r[:3, 3], 3).tolist())}")
    da, dr = a[:3, :3] / np.where(sa == 0, 1, sa), r[:3, :3] / np.where(sr == 0, 1, sr)
    if not np.allclose(da, dr, atol=1e-3):
        parts.append(f"direction {np.round(da, 3).tolist()} vs {np.round(dr, 3).tolist()}")
    return ", ".join(parts) or "affines differ"


def affine_problem(affine: np.ndarray) -> str | None:
    """What is wrong with a voxel-to-world affine (non-finite or singular), or None."""
    a = np.asarray(affine, dtype=np.float64)
    if not np.isfinite(a).all():
        return "affine has NaN/infinite entries (the header's sform/qform is broken)"
    if abs(np.linalg.det(a[:3, :3])) < 1e-12:
        return "affine is singular (a zero voxel spacing or collinear axes in the header)"
    return None


def affines_match(a: np.ndarray, b: np.ndarray) -> bool:
    """The tolerance every check of image/label geometry uses."""
    return bool(np.allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), atol=1e-3, rtol=1e-4))


def _check_headers(case: CaseRecord) -> None:
    """Image channels and label share shape and affine (reads NIfTI headers only)."""
    import nibabel as nib

    ref_shape = ref_affine = None
    ref_path = None
    for path in (*case.images, *([case.label] if case.label else [])):
        try:
            img = nib.load(str(path))
        except Exception as e:  # nibabel raises several types for unreadable files
            raise DatasetError(read_error_message(path, e)) from e
        problem = dtype_problem(img.get_data_dtype())
        if problem:
            raise DatasetError(f"{path}: {problem}")
        shape = tuple(img.shape[:3])
        if len(img.shape) != 3 and not (len(img.shape) == 4 and img.shape[3] == 1):
            raise DatasetError(f"{path}: expected a 3D volume, got shape {tuple(img.shape)} (one file per channel)")
        problem = affine_problem(img.affine)
        if problem:
            raise DatasetError(f"{path}: {problem}")
        if ref_shape is None:
            ref_shape, ref_affine, ref_path = shape, img.affine, path
            continue
        if shape != ref_shape:
            raise DatasetError(f"{path}: shape {shape} does not match {ref_path.name} {ref_shape}")
        if not affines_match(img.affine, ref_affine):
            raise DatasetError(
                f"{path}: affine does not match {ref_path.name} ({describe_affine_difference(img.affine, ref_affine)})"
            )


def read_nnunet(root: Path, require_labels: bool = True,
                problems: list[str] | None = None) -> tuple[dict[str, Any], list[CaseRecord], dict]:
    root = Path(root)
    path = root / "dataset.json"
    meta = _load_json(path)
    if not isinstance(meta, dict):
        raise DatasetError(f"{path}: expected a JSON object, got {type(meta).__name__}")
    for key in ("channel_names", "labels"):
        if key not in meta:
            raise DatasetError(f"{path}: missing required key {key!r}")
    channels = [meta["channel_names"][k] for k in sorted(meta["channel_names"], key=int)]
    labels = _parse_labels(meta["labels"], path, name_to_value=True)
    ending = meta.get("file_ending", ".nii.gz")
    images_dir, labels_dir = root / "imagesTr", root / "labelsTr"
    if not images_dir.is_dir():
        raise DatasetError(f"{images_dir}: folder not found")
    suffix = f"_0000{ending}"
    case_ids = sorted(p.name[: -len(suffix)] for p in images_dir.glob(f"*{suffix}"))
    cases, skipped = [], []
    for cid in case_ids:
        imgs = tuple(images_dir / f"{cid}_{c:04d}{ending}" for c in range(len(channels)))
        missing = [p for p in imgs if not p.is_file()]
        for p in missing:
            _problem(problems, f"{p}: file not found (case {cid!r} needs {len(channels)} channel(s))")
        lab = labels_dir / f"{cid}{ending}"
        if not lab.is_file():
            if require_labels:
                _problem(problems, f"{lab}: file not found (label of case {cid!r})")
                skipped.append(cid)
                continue
            lab = None
        if missing:
            skipped.append(cid)
        else:
            cases.append((cid, imgs, lab))
    if problems is not None and labels_dir.is_dir():
        for lab in sorted(labels_dir.glob(f"*{ending}")):
            if lab.name[: -len(ending)] not in case_ids:
                problems.append(f"{lab}: label without an image (expected {images_dir / lab.name[: -len(ending)]}"
                                f"_0000{ending})")
    return {"channels": channels, "labels": labels, "name": meta.get("name"), "skipped": skipped}, cases, meta


def read_msd(root: Path, require_labels: bool = True,
             problems: list[str] | None = None) -> tuple[dict[str, Any], list, dict]:
    root = Path(root)
    path = root / "dataset.json"
    meta = _load_json(path)
    if not isinstance(meta, dict):
        raise DatasetError(f"{path}: expected a JSON object, got {type(meta).__name__}")
    for key in ("labels", "training"):
        if key not in meta:
            raise DatasetError(f"{path}: missing required key {key!r}")
    modality = meta.get("modality", meta.get("channel_names", {"0": "CT"}))
    channels = [modality[k] for k in sorted(modality, key=int)]
    labels = _parse_labels(meta["labels"], path, name_to_value=False)
    cases, skipped = [], []
    for i, entry in enumerate(meta["training"]):
        if not isinstance(entry, dict) or "image" not in entry:
            raise DatasetError(f"{path}: training[{i}] must be an object with 'image' (and 'label')")
        img = (root / entry["image"]).resolve()
        cid = img.name.split(".")[0]
        lab = entry.get("label")
        lab = (root / lab).resolve() if lab else None
        if not img.is_file():
            _problem(problems, f"{img}: file not found (training[{i}] in {path})")
        elif lab is not None and not lab.is_file():
            _problem(problems, f"{lab}: file not found (training[{i}] in {path})")
        elif lab is None and require_labels:
            _problem(problems, f"{path}: training[{i}] has no 'label'")
        else:
            cases.append((cid, (img,), lab))
            continue
        skipped.append(cid)
    if len({c[0] for c in cases}) != len(cases):
        raise DatasetError(f"{path}: two training entries share a case id")
    head = {"channels": channels, "labels": labels, "name": meta.get("name"), "skipped": skipped}
    return head, sorted(cases), meta


def read_dataset(
    root: str | Path,
    fmt: str = "auto",
    modality: str | None = None,
    name: str | None = None,
    require_labels: bool = True,
    check_headers: bool = True,
    problems: list[str] | None = None,
) -> DatasetInfo:
    """Read an nnU-Net v2 raw or MSD dataset folder.

    Args:
        root: folder holding ``dataset.json``.
        fmt: ``"nnunet"``, ``"msd"`` or ``"auto"`` (from ``dataset.json``).
        modality: ``"ct"`` or ``"mri"``; default from the first channel name.
        name: dataset tag; default the folder name.
        require_labels: if False, cases without a label file are image-only (for distillation on unlabelled
            images); if True, a missing label file is an error.
        check_headers: check every case's channels and label agree in shape and affine (headers only).
        problems: if given, problems of single cases (missing files, ``partial_labels.json`` entries) are
            appended to it, one line each, and those cases left out, instead of raising at the first; problems
            of the dataset as a whole (``dataset.json``) still raise. For integrity checks
            (``cfseg-data-summary --check``).

    Raises:
        DatasetError: naming the file and the problem (missing files, unreadable JSON, unknown class names in
            ``partial_labels.json``, shape/affine mismatch, an empty dataset).
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: dataset folder not found")
    fmt = detect_format(root) if fmt == "auto" else fmt
    if fmt == "nnunet":
        head, raw_cases, _ = read_nnunet(root, require_labels, problems)
    elif fmt == "msd":
        head, raw_cases, _ = read_msd(root, require_labels, problems)
    else:
        raise ValueError(f"unknown dataset format {fmt!r}; use 'nnunet', 'msd' or 'auto'")
    if not raw_cases and not problems:
        raise DatasetError(f"{root}: the dataset has no cases (no images found)")
    if modality is None:
        modality = modality_from_channel(head["channels"][0])
    elif modality not in ("ct", "mri"):
        raise ValueError(f"modality must be 'ct' or 'mri', got {modality!r}")
    labels = head["labels"]
    annotated = _read_partial_labels(root, labels, [c[0] for c in raw_cases], problems, head["skipped"])
    cases = [
        CaseRecord(cid, imgs, lab, annotated[cid] if lab is not None else ()) for cid, imgs, lab in raw_cases
    ]
    if check_headers:
        for case in cases:
            _check_headers(case)
    return DatasetInfo(
        name=name or root.name,
        root=root,
        format=fmt,
        modality=modality,
        channel_names=list(head["channels"]),
        labels=labels,
        cases=cases,
    )
