"""Synthetic sites (:class:`SiteSpec`, :data:`PRESETS`) written as nnU-Net v2 (or MSD) raw datasets of the
phantoms of :mod:`cfseg.data.phantoms`.

Several sites, each with its own "scanner" (intensity calibration, noise, blur, bias field), orientation, and the
subset of classes it annotates; optionally a random non-empty subset per case (partial labels).

Coordinates: the phantoms are in RAS+ voxel order. The writers store RAS sites with the affine
``diag(sx, sy, sz)`` and LPS sites with ``diag(-sx, -sy, sz)`` and the data flipped along the first two axes,
both centred on the volume, so an organ has the same world position in either orientation.

Command line: ``cfseg-synth --out data/synthetic --preset demo --seed 0 --format nnunet`` (:mod:`cfseg.apps.synth`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import nibabel as nib
import numpy as np

from cfseg.data.phantoms import MODALITIES, ORGANS, check_shape, generate_phantom

__all__ = [
    "FORMATS",
    "PRESETS",
    "PRESET_FIRST_ID",
    "SiteSpec",
    "make_datasets",
    "site_for_run",
    "write_msd_dataset",
    "write_nnunet_dataset",
]

ORIENTATIONS: tuple[str, ...] = ("RAS", "LPS")
FORMATS: tuple[str, ...] = ("nnunet", "msd")
_CHANNEL_NAMES = {"ct": "CT", "mri": "MRI"}
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]*$")


# ----------------------------------------------------------------------------------------------------------
# Sites and presets
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SiteSpec:
    """One synthetic site (hospital / scanner / annotation protocol).

    Attributes:
        name: Site name, used in folder names and case ids (letters, digits, ``_`` and ``-``).
        modality: ``"ct"`` or ``"mri"``.
        classes: Organ names (keys of :data:`ORGANS`) this site annotates; others are 0 in its label maps.
        n_cases: Number of training cases.
        seed: Seed of the site; case ``i`` uses ``SeedSequence([seed, i])``.
        partial: If True each case annotates a random non-empty subset of ``classes``, listed in
            ``partial_labels.json`` (case id -> class names).
        orientation: ``"RAS"`` or ``"LPS"``: axis codes of the written affine. The voxel data is flipped
            consistently, so the anatomy is the same in world coordinates.
        spacing: Voxel size in mm (x, y, z).
        shape: Volume shape (x, y, z) in voxels.
        intensity_offset: Scanner calibration offset added after scaling (HU for CT).
        intensity_scale: Scanner calibration gain.
        noise_std: Standard deviation of the acquisition noise; None uses the modality default (CT 12 HU,
            MRI 20 units).
        bias_strength: Strength of the multiplicative smooth bias field (log scale); None uses the modality
            default (CT 0, MRI 0.3).
        blur_sigma: Gaussian point-spread (partial volume) in voxels.
    """

    name: str
    modality: str
    classes: tuple[str, ...]
    n_cases: int
    seed: int
    partial: bool = False
    orientation: str = "RAS"
    spacing: tuple[float, float, float] = (5.5, 5.5, 5.5)
    shape: tuple[int, int, int] = (64, 64, 64)
    intensity_offset: float = 0.0
    intensity_scale: float = 1.0
    noise_std: float | None = None
    bias_strength: float | None = None
    blur_sigma: float = 0.6

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME_RE.match(self.name):
            raise ValueError(f"SiteSpec.name {self.name!r} is not a safe folder name; use letters, digits, "
                             f"'_' and '-', e.g. 'site_a_ct'.")
        if self.modality not in MODALITIES:
            raise ValueError(f"SiteSpec.modality {self.modality!r} is not one of {MODALITIES}.")
        object.__setattr__(self, "classes", tuple(self.classes))
        unknown = [c for c in self.classes if c not in ORGANS]
        if unknown or not self.classes:
            raise ValueError(f"SiteSpec.classes {self.classes!r} must be a non-empty subset of "
                             f"{sorted(ORGANS)} (unknown: {unknown}).")
        if len(set(self.classes)) != len(self.classes):
            raise ValueError(f"SiteSpec.classes {self.classes!r} contains duplicates.")
        if int(self.n_cases) < 1:
            raise ValueError(f"SiteSpec.n_cases must be >= 1, got {self.n_cases}.")
        if self.orientation not in ORIENTATIONS:
            raise ValueError(f"SiteSpec.orientation {self.orientation!r} is not one of {ORIENTATIONS}.")
        object.__setattr__(self, "shape", check_shape(self.shape))
        spacing = tuple(float(s) for s in self.spacing)
        if len(spacing) != 3 or not all(np.isfinite(s) and s > 0 for s in spacing):
            raise ValueError(f"SiteSpec.spacing must be three positive numbers in mm, got {self.spacing!r}.")
        object.__setattr__(self, "spacing", spacing)

    @property
    def case_ids(self) -> list[str]:
        """Case ids ``"{name}_{i:03d}"`` for ``i`` in ``range(n_cases)``."""
        return [f"{self.name}_{i:03d}" for i in range(self.n_cases)]

    def scanner_params(self) -> dict[str, float | None]:
        """Keyword arguments of :func:`generate_phantom` that describe this site's scanner."""
        return {
            "intensity_offset": self.intensity_offset,
            "intensity_scale": self.intensity_scale,
            "noise_std": self.noise_std,
            "bias_strength": self.bias_strength,
            "blur_sigma": self.blur_sigma,
        }


_ALL = tuple(ORGANS)
_STAGE0 = ("liver", "spleen", "kidney_left", "kidney_right")

#: Named lists of sites. ``demo``: two partially annotated CT training sites for joint training plus a fully
#: annotated held-out CT test set. ``incremental``: three stages (CT old classes, CT new classes only, MRI old
#: classes). ``tiny``: two 32^3 sites with 4 cases each (one partial, one MRI in LPS) for tests.
PRESETS: dict[str, list[SiteSpec]] = {
    "demo": [
        SiteSpec("site_a_ct", "ct", ("liver", "spleen", "kidney_left", "kidney_right", "aorta"), n_cases=20,
                 seed=1, noise_std=10.0, blur_sigma=0.5),
        SiteSpec("site_b_ct", "ct", ("liver", "pancreas", "stomach", "gallbladder"), n_cases=20, seed=2,
                 orientation="LPS", intensity_offset=8.0, intensity_scale=1.03, noise_std=18.0,
                 blur_sigma=0.8),
        SiteSpec("test_ct", "ct", _ALL, n_cases=8, seed=3, noise_std=14.0, blur_sigma=0.6),
    ],
    "incremental": [
        SiteSpec("stage0_ct", "ct", _STAGE0, n_cases=20, seed=11, noise_std=10.0, blur_sigma=0.5),
        SiteSpec("stage1_ct", "ct", ("pancreas", "stomach", "gallbladder", "aorta"), n_cases=20, seed=12,
                 intensity_offset=-6.0, noise_std=16.0, blur_sigma=0.7),
        SiteSpec("stage2_mri", "mri", _STAGE0, n_cases=20, seed=13, bias_strength=0.35, noise_std=20.0),
    ],
    "tiny": [
        SiteSpec("tiny_a_ct", "ct", _ALL, n_cases=4, seed=21, partial=True, spacing=(11.0, 11.0, 11.0),
                 shape=(32, 32, 32)),
        SiteSpec("tiny_b_mri", "mri", ("liver", "spleen", "kidney_left", "kidney_right", "aorta"), n_cases=4,
                 seed=22, orientation="LPS", spacing=(11.0, 11.0, 11.0), shape=(32, 32, 32)),
    ],
}
#: First dataset / task id of each preset (distinct ranges so presets can share one nnUNet_raw folder).
PRESET_FIRST_ID: dict[str, int] = {"demo": 1, "incremental": 11, "tiny": 21}


# ----------------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------------
def _affine(shape: tuple[int, int, int], spacing: tuple[float, float, float], orientation: str) -> np.ndarray:
    """Voxel-to-world (RAS+ mm) affine, centred on the volume. Returns (4, 4) float64."""
    s = np.asarray(spacing, dtype=np.float64)
    half = (np.asarray(shape, dtype=np.float64) - 1) / 2 * s
    aff = np.eye(4)
    if orientation == "RAS":
        aff[:3, :3] = np.diag(s)
        aff[:3, 3] = -half
    else:  # LPS: voxel i' = N - 1 - i along x and y maps to the same world point as RAS voxel i.
        aff[:3, :3] = np.diag([-s[0], -s[1], s[2]])
        aff[:3, 3] = [half[0], half[1], -half[2]]
    return aff


def _orient(arr: np.ndarray, orientation: str) -> np.ndarray:
    """RAS voxel order -> the site's voxel order (shape unchanged)."""
    return np.ascontiguousarray(arr[::-1, ::-1, :] if orientation == "LPS" else arr)


def _save_nifti(path: Path, arr: np.ndarray, affine: np.ndarray) -> None:
    img = nib.Nifti1Image(arr, affine)
    img.header.set_data_dtype(arr.dtype)
    img.header.set_xyzt_units("mm")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, str(path))


@contextmanager
def _atomic_dir(target: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary folder beside ``target``; rename it to ``target`` only when the block succeeds."""
    _check_target(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
            old.rmdir()
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _check_target(target: Path, overwrite: bool) -> None:
    if target.exists() and not overwrite:
        raise ValueError(f"{target} already exists; pass overwrite=True (CLI: --overwrite) to replace it, "
                         f"or choose another output folder.")
    if target.exists() and not target.is_dir():
        raise ValueError(f"{target} exists and is not a folder; remove it or choose another output folder.")


def _case_rngs(site: SiteSpec, i: int) -> tuple[np.random.Generator, np.random.Generator]:
    """Independent generators for case ``i``'s phantom and its partial-label subset."""
    return (np.random.default_rng(np.random.SeedSequence([site.seed, i])),
            np.random.default_rng(np.random.SeedSequence([site.seed, i, 1])))


def _iter_cases(site: SiteSpec) -> Iterator[tuple[str, np.ndarray, np.ndarray, list[str]]]:
    """Yield (case id, image, label, annotated classes), arrays in the site's voxel order."""
    for i, case_id in enumerate(site.case_ids):
        rng, subset_rng = _case_rngs(site, i)
        image, label = generate_phantom(rng, site.modality, site.shape, **site.scanner_params())
        annotated = list(site.classes)
        if site.partial:
            k = int(subset_rng.integers(1, len(annotated) + 1))
            pick = set(subset_rng.choice(len(annotated), size=k, replace=False).tolist())
            annotated = [c for j, c in enumerate(annotated) if j in pick]
        keep = np.zeros(256, dtype=np.uint8)
        for c in annotated:
            keep[ORGANS[c]] = ORGANS[c]
        yield case_id, _orient(image, site.orientation), _orient(keep[label], site.orientation), annotated


def _sorted_classes(classes: Sequence[str]) -> list[str]:
    return sorted(classes, key=lambda c: ORGANS[c])


def _write_cases(folder: Path, site: SiteSpec, image_suffix: str) -> dict[str, list[str]]:
    (folder / "imagesTr").mkdir()
    (folder / "labelsTr").mkdir()
    affine = _affine(site.shape, site.spacing, site.orientation)
    annotated_by_case: dict[str, list[str]] = {}
    for case_id, image, label, annotated in _iter_cases(site):
        _save_nifti(folder / "imagesTr" / f"{case_id}{image_suffix}.nii.gz", image, affine)
        _save_nifti(folder / "labelsTr" / f"{case_id}.nii.gz", label, affine)
        annotated_by_case[case_id] = annotated
    if site.partial:
        _write_json(folder / "partial_labels.json", annotated_by_case)
    return annotated_by_case


def _write_json(path: Path, obj: object) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


def _description(site: SiteSpec) -> str:
    return (f"cfseg synthetic abdomen phantoms, site {site.name} ({site.modality.upper()}, "
            f"{'partial labels' if site.partial else 'annotates'}: {', '.join(site.classes)}).")


def _provenance(site: SiteSpec) -> dict[str, object]:
    return {"generator": "cfseg.data.synthetic", "seed": site.seed, "spacing": list(site.spacing),
            "shape": list(site.shape), "orientation": site.orientation}


def _check_id(value: int, what: str, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 1 <= int(value) <= hi:
        raise ValueError(f"{what} must be an integer in [1, {hi}], got {value!r}.")
    return int(value)


def write_nnunet_dataset(out_root: Path | str, site: SiteSpec, dataset_id: int, *, overwrite: bool = False
                         ) -> Path:
    """Write one site as an nnU-Net v2 raw dataset.

    Layout: ``out_root/Dataset{dataset_id:03d}_{site.name}/`` with ``dataset.json``,
    ``imagesTr/<case>_0000.nii.gz`` (float32), ``labelsTr/<case>.nii.gz`` (uint8, :data:`ORGANS` values,
    classes not annotated for the case set to 0) and, for partial sites, ``partial_labels.json`` (case id ->
    annotated class names). Label values are the ORGANS values, so in general not consecutive. The folder is
    written beside the target under a temporary name and renamed at the end.

    Args:
        out_root: Parent folder (the nnUNet_raw folder); created if missing.
        site: The site.
        dataset_id: nnU-Net dataset id in [1, 999].
        overwrite: Replace an existing dataset folder instead of raising.

    Returns:
        The dataset folder.

    Raises:
        ValueError: If the folder exists and ``overwrite`` is False, or on a bad ``dataset_id``.
    """
    dataset_id = _check_id(dataset_id, "dataset_id", 999)
    target = Path(out_root) / f"Dataset{dataset_id:03d}_{site.name}"
    with _atomic_dir(target, overwrite) as tmp:
        _write_cases(tmp, site, "_0000")
        labels = {"background": 0, **{c: ORGANS[c] for c in _sorted_classes(site.classes)}}
        meta = {
            "name": site.name,
            "description": _description(site),
            "channel_names": {"0": _CHANNEL_NAMES[site.modality]},
            "labels": labels,
            "numTraining": site.n_cases,
            "file_ending": ".nii.gz",
            "modality": site.modality,
            "synthetic": _provenance(site),
        }
        if site.partial:
            meta["partial_labels"] = "partial_labels.json"
        _write_json(tmp / "dataset.json", meta)
    return target


def write_msd_dataset(out_root: Path | str, site: SiteSpec, task_id: int, *, overwrite: bool = False) -> Path:
    """Write one site in the Medical Segmentation Decathlon layout.

    Layout: ``out_root/Task{task_id:02d}_{site.name}/`` with ``dataset.json`` (``"labels"``: int string ->
    name, ``"modality"``: ``{"0": "CT"|"MRI"}``, ``"training"``: image/label pairs, ``"numTraining"``),
    ``imagesTr/<case>.nii.gz`` (no channel suffix), ``labelsTr/<case>.nii.gz`` and, for partial sites,
    ``partial_labels.json``. Written atomically like :func:`write_nnunet_dataset`.

    Args:
        out_root: Parent folder; created if missing.
        site: The site.
        task_id: Task id in [1, 99].
        overwrite: Replace an existing task folder instead of raising.

    Returns:
        The task folder.

    Raises:
        ValueError: If the folder exists and ``overwrite`` is False, or on a bad ``task_id``.
    """
    task_id = _check_id(task_id, "task_id", 99)
    target = Path(out_root) / f"Task{task_id:02d}_{site.name}"
    with _atomic_dir(target, overwrite) as tmp:
        _write_cases(tmp, site, "")
        meta = {
            "name": site.name,
            "description": _description(site),
            "tensorImageSize": "3D",
            "modality": {"0": _CHANNEL_NAMES[site.modality]},
            "labels": {"0": "background", **{str(ORGANS[c]): c for c in _sorted_classes(site.classes)}},
            "numTraining": site.n_cases,
            "numTest": 0,
            "training": [{"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"}
                         for c in site.case_ids],
            "test": [],
            "synthetic": _provenance(site),
        }
        if site.partial:
            meta["partial_labels"] = "partial_labels.json"
        _write_json(tmp / "dataset.json", meta)
    return target


def site_for_run(site: SiteSpec, seed: int, shape: Sequence[int] | None = None) -> SiteSpec:
    """The preset site with a run-specific seed and, when given, a new shape with the same field of view."""
    site_seed = int(np.random.SeedSequence([int(seed), site.seed]).generate_state(1)[0])
    if shape is None:
        return replace(site, seed=site_seed)
    shape = check_shape(shape)
    spacing = tuple(sp * n / m for sp, n, m in zip(site.spacing, site.shape, shape, strict=True))
    return replace(site, seed=site_seed, shape=shape, spacing=spacing)


def make_datasets(
    out_root: Path | str,
    preset: str = "demo",
    seed: int = 0,
    shape: Sequence[int] | None = None,
    fmt: str = "nnunet",
    *,
    overwrite: bool = False,
    first_id: int | None = None,
) -> list[Path]:
    """Write every site of a preset.

    Site ``k`` gets dataset/task id ``first_id + k`` and the seed ``SeedSequence([seed, site.seed])``, so
    sites differ and the same ``seed`` gives identical arrays.

    Args:
        out_root: Parent folder.
        preset: A key of :data:`PRESETS`.
        seed: Run seed.
        shape: Override the volume shape; the spacing is scaled so the field of view stays the same.
        fmt: ``"nnunet"`` or ``"msd"``.
        overwrite: Replace existing dataset folders instead of raising.
        first_id: Id of the first site; None uses :data:`PRESET_FIRST_ID`.

    Returns:
        The dataset folders, in preset order.

    Raises:
        ValueError: On an unknown preset or format, or when a target folder exists and ``overwrite`` is
            False (checked for all sites before anything is written).
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}.")
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {FORMATS}.")
    start = PRESET_FIRST_ID[preset] if first_id is None else first_id
    out_root = Path(out_root)
    sites = [site_for_run(s, seed, shape) for s in PRESETS[preset]]
    writer = write_nnunet_dataset if fmt == "nnunet" else write_msd_dataset
    hi = 999 if fmt == "nnunet" else 99
    ids = [_check_id(start + k, "first_id + site index", hi) for k in range(len(sites))]
    folder = "Dataset{:03d}_{}" if fmt == "nnunet" else "Task{:02d}_{}"
    for i, s in zip(ids, sites, strict=True):
        _check_target(out_root / folder.format(i, s.name), overwrite)
    return [writer(out_root, s, i, overwrite=overwrite) for i, s in zip(ids, sites, strict=True)]
