"""A simulated second CT scanner: a deterministic image transform, and a writer for a shifted dataset copy.

A domain-incremental stage needs the same organs on images from another "domain". With one real CT dataset,
the other domain is simulated: the images are passed through :class:`ScannerShift`, which models three ways CT
from another scanner or reconstruction protocol differs (labels never change):

* reconstruction kernel (``kernel``): a softer kernel blurs, a sharper one enhances edges and fine texture.
  ``kernel > 0`` is a Gaussian blur of that sigma in mm (converted per axis with the voxel spacing, so it means
  the same physical blur on any grid; a blur much finer than a voxel does almost nothing). ``kernel < 0`` is an
  unsharp mask of strength ``|kernel|``: ``image + |kernel| * (image - blur(image))``, where the blur's sigma is
  1 mm or one voxel per axis, whichever is larger (on the 2.5-5 mm grids of resampled planning CT a 1 mm blur
  is below the voxel size and the sharpening would vanish);
* noise (``noise_sd_hu``): white Gaussian noise of that SD in HU, added after the kernel (so its SD in the
  output is exactly ``noise_sd_hu``), as from a lower dose or thinner slices. The generator is seeded with
  ``(seed, zlib.crc32(case_id))``, so a case gets the same noise on every run and machine, and different cases
  get different noise;
* calibration (``hu_offset``): a constant added to every voxel, as from another tube voltage, calibration or
  contrast protocol.

:data:`SCANNER_B` is the shift the OpenKBP domain-incremental protocol uses (``configs/openkbp/domain.yaml``;
``benchmarks/openkbp/make_scanner_shift.py`` writes the data). :func:`write_shifted_dataset` writes a shifted
copy of some cases of a dataset folder in the source's own format (see :mod:`cfseg.data.formats`), resumably
and atomically per file, with this shift or any other :class:`ImageShift` (the MR-like rendering of
:mod:`cfseg.data.mr_contrast`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np

from cfseg.data.formats import PARTIAL_LABELS_FILE, read_dataset

PARAMS_FILE = "scanner_shift.json"
TRANSFORM_VERSION = 1  # bump when apply() changes, so an old shifted folder is not silently extended
_TMP_DIR = ".scanner_shift_tmp"


def checked_volume(image_hu: np.ndarray, spacing_mm: tuple[float, float, float]
                   ) -> tuple[np.ndarray, tuple[float, float, float]]:
    """``image_hu`` as a float32 3D array and ``spacing_mm`` as three positive floats; ValueError otherwise."""
    img = np.asarray(image_hu, dtype=np.float32)
    if img.ndim != 3:
        raise ValueError(f"apply expects a 3D image, got shape {img.shape}")
    spacing = tuple(float(s) for s in spacing_mm)
    if len(spacing) != 3 or not all(math.isfinite(s) and s > 0 for s in spacing):
        raise ValueError(f"spacing_mm must be three positive numbers, got {spacing_mm!r}")
    return img, spacing  # type: ignore[return-value]


def case_rng(seed: int, case_id: str) -> np.random.Generator:
    """The generator of one case's random draws: seeded with ``(seed, crc32(case_id))``."""
    return np.random.default_rng([seed, zlib.crc32(case_id.encode("utf-8"))])


@dataclass(frozen=True)
class ScannerShift:
    """Parameters of a simulated scanner/reconstruction change of CT images (all in HU or mm).

    Attributes:
        noise_sd_hu: SD of the additive white Gaussian noise, in HU (0: none).
        kernel: reconstruction kernel. > 0: Gaussian blur with this sigma in mm; < 0: unsharp-mask sharpening
            of strength ``|kernel|`` (detail scale: 1 mm or one voxel, whichever is larger); 0: unchanged.
        hu_offset: constant added to every voxel, in HU.
        seed: fixed seed of the noise; each case's generator is seeded with ``(seed, crc32(case_id))``.
    """

    noise_sd_hu: float = 25.0
    kernel: float = 0.0
    hu_offset: float = 0.0
    seed: int = 0

    #: the written images' channel name in ``dataset.json``
    channel_name: ClassVar[str] = "CT"
    #: bumped when :meth:`apply` changes, so an old shifted folder is not silently extended
    version: ClassVar[int] = TRANSFORM_VERSION
    #: the key under which ``dataset.json`` records the parameters
    metadata_key: ClassVar[str] = "scanner_shift"
    #: what :meth:`apply` does, in the order it does it (for ``dataset.json``'s description)
    steps: ClassVar[str] = "kernel, then white Gaussian noise seeded per case, then a HU offset"

    def __post_init__(self) -> None:
        for name in ("noise_sd_hu", "kernel", "hu_offset"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
                raise ValueError(f"ScannerShift.{name} must be a finite number, got {v!r}")
        if self.noise_sd_hu < 0:
            raise ValueError(f"ScannerShift.noise_sd_hu must be >= 0, got {self.noise_sd_hu}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"ScannerShift.seed must be a non-negative integer, got {self.seed!r}")

    def params(self) -> dict[str, Any]:
        """The parameters as a JSON-ready dict (floats as floats, so ``30`` and ``30.0`` compare equal)."""
        d = dataclasses.asdict(self)
        return {k: (int(v) if k == "seed" else float(v)) for k, v in d.items()}

    def describe(self) -> str:
        """One line, e.g. ``noise 30 HU, sharpening 0.6, offset +40 HU, seed 0``."""
        if self.kernel > 0:
            k = f"blur sigma {self.kernel:g} mm"
        elif self.kernel < 0:
            k = f"sharpening {-self.kernel:g}"
        else:
            k = "kernel unchanged"
        return f"noise {self.noise_sd_hu:g} HU, {k}, offset {self.hu_offset:+g} HU, seed {self.seed}"

    def title(self) -> str:
        """The dataset name's suffix."""
        return f"simulated scanner: {self.describe()}"

    def apply(self, image_hu: np.ndarray, spacing_mm: tuple[float, float, float], case_id: str) -> np.ndarray:
        """The shifted image: kernel, then noise, then offset (float32, same shape).

        Args:
            image_hu: 3D CT image in HU.
            spacing_mm: voxel size in mm along the array's three axes.
            case_id: identifies the case; seeds its noise (same id -> same noise).
        """
        from scipy.ndimage import gaussian_filter

        img, spacing = checked_volume(image_hu, spacing_mm)
        out = img.copy()
        if self.kernel > 0:
            out = gaussian_filter(out, sigma=[self.kernel / s for s in spacing], mode="nearest")
        elif self.kernel < 0:
            detail = gaussian_filter(out, sigma=[max(1.0 / s, 1.0) for s in spacing], mode="nearest")
            out = out + np.float32(-self.kernel) * (out - detail)
        if self.noise_sd_hu > 0:
            rng = case_rng(self.seed, case_id)
            out = out + rng.normal(0.0, self.noise_sd_hu, size=out.shape).astype(np.float32)
        if self.hu_offset:
            out = out + np.float32(self.hu_offset)
        return out.astype(np.float32, copy=False)


#: The "scanner B" of the OpenKBP domain-incremental protocol. A clear but realistic shift for a model that
#: windows CT to -250..500 HU (750 HU -> [0, 1]):
#:
#: * a sharp (bone/edge-enhancing) kernel instead of a soft-tissue one: edge overshoot at bone and air
#:   boundaries, amplified fine texture (``kernel=-0.6``);
#: * noise 30 HU: about 3x the ~9-10 HU SD measured inside the brainstem of the original images, as a low-dose
#:   protocol gives; 0.04 of the window, the order of the 10-40 HU contrast between brainstem or spinal cord
#:   and their surroundings, so soft-tissue organs get harder while bone (the mandible, saturated in the
#:   window) barely changes;
#: * offset +40 HU (0.053 of the window), as another tube voltage, calibration or a contrast-enhanced protocol
#:   moves soft-tissue values: every intensity the model learnt moves.
#:
#: Each is within what clinical scanners and protocols differ by; together they make a domain that a model
#: trained on the original scanner alone should score visibly worse on.
SCANNER_B = ScannerShift(noise_sd_hu=30.0, kernel=-0.6, hu_offset=40.0, seed=0)


def apply(image_hu: np.ndarray, spacing_mm: tuple[float, float, float], case_id: str,
          shift: ScannerShift = SCANNER_B) -> np.ndarray:
    """``shift.apply(image_hu, spacing_mm, case_id)``; by default the :data:`SCANNER_B` shift."""
    return shift.apply(image_hu, spacing_mm, case_id)


def _atomic_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


class ImageShift(Protocol):
    """What :func:`write_shifted_dataset` needs of a transform of CT images (:class:`ScannerShift`,
    :class:`cfseg.data.mr_contrast.MRContrast`)."""

    channel_name: ClassVar[str]
    version: ClassVar[int]
    metadata_key: ClassVar[str]
    steps: ClassVar[str]

    def params(self) -> dict[str, Any]: ...

    def describe(self) -> str: ...

    def title(self) -> str: ...

    def apply(self, image_hu: np.ndarray, spacing_mm: tuple[float, float, float], case_id: str) -> np.ndarray: ...


def _transform_name(shift: ImageShift) -> str:
    return f"{type(shift).__module__}.{type(shift).__qualname__}"


def _record(shift: ImageShift, src: Path) -> dict[str, Any]:
    return {"transform": _transform_name(shift), "version": shift.version,
            "shift": shift.params(), "source": str(src.resolve())}


def _check_destination(dst: Path, record: dict[str, Any]) -> None:
    """Refuse a ``dst`` made with other parameters (or from another source), or one that is not ours."""
    params = dst / PARAMS_FILE
    if params.is_file():
        try:
            old = json.loads(params.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{params}: cannot be read ({e}); delete {dst} to write it again") from e
        for key in ("transform", "version", "shift", "source"):
            if old.get(key) != record[key]:
                raise ValueError(
                    f"{dst}: already holds a shifted dataset with {key} {old.get(key)!r}, not "
                    f"{record[key]!r} (see {params}); delete {dst} or choose another output folder"
                )
    elif dst.exists() and any(p.name != _TMP_DIR for p in dst.iterdir()):
        raise ValueError(f"{dst}: exists and is not empty but has no {PARAMS_FILE}; refusing to write a "
                         "shifted dataset into it (choose an empty or new folder)")


def _copy_file(src: Path, dst: Path, tmp_dir: Path) -> None:
    """``dst`` becomes a hard link to (else a copy of) ``src``, atomically."""
    tmp = tmp_dir / f"{dst.name}.{os.getpid()}"
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:  # another file system, or a file we may not link (protected_hardlinks)
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def _write_image(src: Path, dst: Path, tmp_dir: Path, shift: ImageShift, noise_id: str) -> None:
    """Shift one image file; keep its affine and header, its on-disk dtype when integer (rounded) else float32."""
    import nibabel as nib

    img = nib.load(str(src))
    data = img.get_fdata(dtype=np.float32)
    squeeze4 = data.ndim == 4 and data.shape[3] == 1
    vol = data[..., 0] if squeeze4 else data
    out = shift.apply(vol, tuple(float(z) for z in img.header.get_zooms()[:3]), noise_id)
    if squeeze4:
        out = out[..., None]
    header = img.header.copy()
    dtype = np.dtype(header.get_data_dtype())
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        out = np.clip(np.rint(out), info.min, info.max).astype(dtype)
    else:
        dtype = np.dtype(np.float32)
    header.set_data_dtype(dtype)
    header.set_slope_inter(1.0, 0.0)
    new = nib.Nifti1Image(out, img.affine, header=header)
    new.header.set_slope_inter(1.0, 0.0)
    suffix = "".join(dst.suffixes[-2:]) if dst.name.endswith(".nii.gz") else dst.suffix
    tmp = tmp_dir / f"{dst.name[: -len(suffix)]}.{os.getpid()}{suffix}"
    nib.save(new, str(tmp))
    os.replace(tmp, dst)


def write_shifted_dataset(src: Path, dst: Path, case_ids: list[str], shift: ImageShift) -> dict[str, list[str]]:
    """Write the cases ``case_ids`` of the CT dataset ``src`` to ``dst`` with their images shifted.

    ``dst`` gets the source's format (nnU-Net v2 raw or MSD, see :mod:`cfseg.data.formats`): the same relative file
    paths; ``dataset.json`` copied with a name and description stating the shift (and ``numTraining``, an MSD
    ``training`` list, for the cases in ``dst``; every channel named ``shift.channel_name``);
    ``partial_labels.json`` restricted to the cases in ``dst``; each image passed through ``shift.apply`` (noise
    seeded by the case id; channel c > 0 by ``"<case id>_<c>"``) and written with the source's affine and header,
    rounded to the source's integer dtype (else float32); each label hard-linked or copied unchanged. Every file is
    written under a temporary name and moved into place, so an interrupted run leaves no half-written file; running
    again skips the cases already complete. ``dst/scanner_shift.json`` records the shift and the source.

    Returns:
        ``{"written": [...], "skipped": [...]}`` case ids.

    Raises:
        ValueError: ``dst`` was made with other shift parameters or from another source, or is a non-empty
            folder not made by this function; ``src`` is not CT; a case id is not in ``src``.
        cfseg.data.formats.DatasetError: ``src`` is not a readable dataset folder.
    """
    src, dst = Path(src), Path(dst)
    info = read_dataset(src, require_labels=False, check_headers=False)
    if info.modality != "ct":
        raise ValueError(f"{src}: a scanner shift in HU needs CT images; this dataset's modality is "
                         f"{info.modality!r} (channels {info.channel_names})")
    by_id = {c.case_id: c for c in info.cases}
    missing = [c for c in case_ids if c not in by_id]
    if missing:
        raise ValueError(f"{src}: {len(missing)} case(s) not in the dataset: {', '.join(missing[:5])}")
    if len(set(case_ids)) != len(case_ids):
        raise ValueError("case_ids repeat a case")
    record = _record(shift, src)
    _check_destination(dst, record)
    dst.mkdir(parents=True, exist_ok=True)
    if not (dst / PARAMS_FILE).is_file():
        _atomic_json(dst / PARAMS_FILE, record)
    tmp_dir = dst / _TMP_DIR
    tmp_dir.mkdir(exist_ok=True)
    root = src.resolve()

    def target(p: Path) -> Path:
        try:
            rel = Path(p).resolve().relative_to(root)
        except ValueError as e:
            raise ValueError(f"{p}: outside the dataset folder {src}; cannot place it in {dst}") from e
        return dst / rel

    written, skipped = [], []
    for cid in case_ids:
        case = by_id[cid]
        outs = [target(p) for p in case.images] + ([target(case.label)] if case.label is not None else [])
        if all(p.is_file() for p in outs):
            skipped.append(cid)
            continue
        for c, p in enumerate(case.images):
            t = target(p)
            t.parent.mkdir(parents=True, exist_ok=True)
            _write_image(p, t, tmp_dir, shift, cid if c == 0 else f"{cid}_{c}")
        if case.label is not None:
            t = target(case.label)
            t.parent.mkdir(parents=True, exist_ok=True)
            _copy_file(case.label, t, tmp_dir)
        written.append(cid)
    _write_metadata(src, dst, info, shift, target)
    shutil.rmtree(tmp_dir, ignore_errors=True)
    return {"written": written, "skipped": skipped}


def _write_metadata(src: Path, dst: Path, info: Any, shift: ImageShift, target: Any) -> None:
    """``dataset.json`` (name, description, case list) and ``partial_labels.json`` for the cases in ``dst``."""
    present = [c for c in info.cases
               if all(target(p).is_file() for p in c.images) and (c.label is None or target(c.label).is_file())]
    ids = {c.case_id for c in present}
    meta = json.loads((src / "dataset.json").read_text(encoding="utf-8"))
    name = meta.get("name") or src.name
    meta["name"] = f"{name} ({shift.title()})"
    meta["description"] = (
        f"{name} with every CT image passed through {_transform_name(shift)}({shift.describe()}): "
        f"{shift.steps}; labels unchanged. "
        f"Source: {src.resolve()}. " + (f"Source description: {meta['description']}" if meta.get("description")
                                        else "")
    ).strip()
    meta[shift.metadata_key] = shift.params()
    for key in ("channel_names", "modality"):  # nnU-Net v2 raw / MSD: the written images' modality
        if isinstance(meta.get(key), dict):
            meta[key] = {c: shift.channel_name for c in meta[key]}
    meta["numTraining"] = len(present)
    if info.format == "msd":
        meta["training"] = [e for e in meta.get("training", [])
                            if isinstance(e, dict) and Path(str(e.get("image", ""))).name.split(".")[0] in ids]
        if "test" in meta:
            meta["test"] = []
            meta["numTest"] = 0
    _atomic_json(dst / "dataset.json", meta)
    partial = src / PARTIAL_LABELS_FILE
    if partial.is_file():
        raw = json.loads(partial.read_text(encoding="utf-8"))
        _atomic_json(dst / PARTIAL_LABELS_FILE, {k: v for k, v in raw.items() if k in ids})
