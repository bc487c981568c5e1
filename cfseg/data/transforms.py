"""MONAI transform presets per modality, case validation and label remapping by class name.

The deterministic prefix of every pipeline (load -> validate -> remap labels -> Orientation -> Spacing ->
intensity) is what :class:`monai.data.CacheDataset` caches, so an epoch does not re-read and re-resample the
NIfTI files; random crops and augmentation (:func:`augmentation`) come after it.

Each item dict entering the pipeline carries (see :mod:`cfseg.data.datamodule`):
    ``image``: channel file path(s); ``label``: label path (absent for image-only cases);
    ``label_lut``: int16 array [256] mapping this dataset's label values to global class indices
    (-1 = value not declared in dataset.json; 0 for classes not annotated in this case).

Left-right flips are deliberately absent: in anatomy, left and right organs are different classes.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from monai import transforms as mt
from monai.config import KeysCollection

from cfseg.data.formats import DatasetError, describe_affine_difference, read_error_message

CT_WINDOW = (-175.0, 250.0)


@dataclass
class Preprocessing:
    """Everything inference needs to reproduce training's preprocessing (stored in checkpoints).

    Attributes:
        modality: ``"ct"`` or ``"mri"``.
        spacing: target voxel spacing in mm (x, y, z) after reorientation.
        orientation: axis codes images are reoriented to before resampling.
        ct_window: HU window (min, max) mapped linearly to [0, 1] and clipped (CT only).
        mri_foreground: fraction of the 99th percentile above which an MRI voxel counts as foreground for
            z-scoring.
    """

    modality: str = "ct"
    spacing: tuple[float, float, float] = (1.5, 1.5, 1.5)
    orientation: str = "RAS"
    ct_window: tuple[float, float] = CT_WINDOW
    mri_foreground: float = 0.05
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["spacing"] = list(self.spacing)
        d["ct_window"] = list(self.ct_window)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Preprocessing:
        d = dict(d)
        d["spacing"] = tuple(d["spacing"])
        d["ct_window"] = tuple(d.get("ct_window", CT_WINDOW))
        return cls(**d)


def _filename(d: Mapping, key: str) -> str:
    img = d.get(key)
    meta = getattr(img, "meta", None) or d.get(f"{key}_meta_dict", {})
    return str(meta.get("filename_or_obj", f"<{key}>"))


def _culprit(files: str | Sequence[str]) -> str:
    """The first of ``files`` whose voxels nibabel cannot read (the files of one key, e.g. channels)."""
    if isinstance(files, str | bytes) or not isinstance(files, Sequence):
        return str(files)
    import nibabel as nib

    for f in files:
        try:
            np.asarray(nib.load(str(f)).dataobj)
        except Exception:  # noqa: BLE001 - any failure marks the culprit
            return str(f)
    return ", ".join(map(str, files))


class LoadCased(mt.LoadImaged):
    """:class:`monai.transforms.LoadImaged` that turns a reader failure into one :class:`DatasetError`.

    nibabel reads a NIfTI header eagerly but its voxels lazily, so a truncated or corrupt ``.nii.gz`` passes
    every header check and fails only here, deep inside MONAI, with an ``EOFError``/``zlib.error`` that never
    names the file. This names the file (the failing channel, for multi-channel cases) and the problem.
    """

    def __init__(self, *args, **kwargs):
        # with pydicom installed MONAI adds its GPU DICOM reader, which warns (and logs) on a CPU that it has no
        # decoder; cfseg reads NIfTI here (DICOM series go through cfseg.dicom)
        logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader")
            super().__init__(*args, **kwargs)

    def __call__(self, data, reader=None):
        try:
            return super().__call__(data, reader)
        except DatasetError:
            raise
        except Exception as e:
            for key in self.key_iterator(dict(data)):  # which key failed (the image's channels, or the label)
                try:
                    self._loader(data[key], reader)
                except Exception as e2:  # noqa: BLE001 - this key's own failure
                    raise DatasetError(read_error_message(_culprit(data[key]), e2)) from e2
            raise DatasetError(read_error_message(_culprit(data[self.keys[0]]), e)) from e


class ValidateCased(mt.MapTransform):
    """Check a loaded case: finite intensities, image/label shape and affine agree.

    Raises:
        DatasetError: naming the file and the problem.
    """

    def __init__(self, image_key: str = "image", label_key: str = "label", allow_missing_keys: bool = True):
        super().__init__([image_key, label_key], allow_missing_keys)
        self.image_key, self.label_key = image_key, label_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        img = d[self.image_key]
        arr = img.as_tensor() if hasattr(img, "as_tensor") else torch.as_tensor(img)
        if not torch.isfinite(arr).all():
            n = int((~torch.isfinite(arr)).sum())
            raise DatasetError(f"{_filename(d, self.image_key)}: {n} NaN/infinite intensities")
        if self.label_key in d:
            lab = d[self.label_key]
            if tuple(lab.shape[1:]) != tuple(img.shape[1:]):
                raise DatasetError(
                    f"{_filename(d, self.label_key)}: label shape {tuple(lab.shape[1:])} does not match image "
                    f"{_filename(d, self.image_key)} shape {tuple(img.shape[1:])}"
                )
            a, b = getattr(img, "affine", None), getattr(lab, "affine", None)
            if a is not None and b is not None and not torch.allclose(
                torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64), atol=1e-3
            ):
                diff = describe_affine_difference(np.asarray(b, np.float64), np.asarray(a, np.float64))
                raise DatasetError(
                    f"{_filename(d, self.label_key)}: label affine does not match image "
                    f"{_filename(d, self.image_key)} ({diff})"
                )
        return d


class RemapLabelsd(mt.MapTransform):
    """Map dataset label values to global class indices with the per-case ``label_lut`` in the item.

    The look-up table is [256] int: ``lut[v]`` is the global index of value ``v``, 0 for classes not
    annotated in this case, and -1 for values not declared in ``dataset.json`` (an error).
    """

    def __init__(self, label_key: str = "label", lut_key: str = "label_lut", allow_missing_keys: bool = True):
        super().__init__([label_key], allow_missing_keys)
        self.label_key, self.lut_key = label_key, lut_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        lut = d.pop(self.lut_key, None)
        if self.label_key not in d:
            return d
        if lut is None:
            raise KeyError(f"item has no {self.lut_key!r}: build items with cfseg.data.datamodule")
        lab = d[self.label_key]
        arr = lab.as_tensor() if hasattr(lab, "as_tensor") else torch.as_tensor(lab)
        values = torch.unique(arr)
        bad = [
            int(v) if v == int(v) else v for v in values.tolist()
            if v != int(v) or not 0 <= int(v) < len(lut) or lut[int(v)] < 0
        ]
        if bad:
            declared = [i for i in range(1, len(lut)) if lut[i] >= 0]
            raise DatasetError(
                f"{_filename(d, self.label_key)}: label values {bad} are not declared in dataset.json "
                f"(declared: {declared})"
            )
        table = torch.as_tensor(np.asarray(lut), dtype=torch.int64)
        out = table[arr.long()].to(torch.uint8)
        d[self.label_key] = lab.clone().set_array(out) if hasattr(lab, "set_array") else out
        return d


class ZScoreForegroundd(mt.MapTransform):
    """MRI intensity: z-score over foreground voxels (above ``fraction`` x the 99th percentile)."""

    def __init__(self, keys: KeysCollection, fraction: float = 0.05):
        super().__init__(keys)
        self.fraction = fraction

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            x = img.as_tensor().float() if hasattr(img, "as_tensor") else torch.as_tensor(img).float()
            out = torch.empty_like(x)
            for c in range(x.shape[0]):
                xc = x[c]
                thr = self.fraction * torch.quantile(xc.flatten()[:: max(1, xc.numel() // 200_000)], 0.99)
                fg = xc[xc > thr]
                if fg.numel() < 10:
                    fg = xc.flatten()
                out[c] = (xc - fg.mean()) / fg.std().clamp_min(1e-6)
            d[key] = img.clone().set_array(out) if hasattr(img, "set_array") else out
        return d


class ClassIndicesd(mt.MapTransform):
    """Flat voxel indices of every class of ``label``, computed once so class-balanced crops never rescan a volume.

    Placed before the first random transform, it is cached with the volume (:class:`monai.data.CacheDataset`);
    :class:`monai.transforms.RandCropByLabelClassesd` then reads ``indices_key`` instead of calling
    ``map_classes_to_indices`` on every crop (about 60 ms per 1.3 M-voxel OpenKBP volume, most of a training
    step's data time). A class with more than ``max_per_class`` voxels (in practice the background) keeps every
    n-th of its indices: a fixed, regular thinning, so crop centres still cover the whole class and the cache
    stays small (int32, at most ``max_per_class`` per class).

    Output: ``indices_key`` -> list of K+1 int32 arrays [n_k] (flat indices into the label's spatial shape).
    """

    def __init__(self, label_key: str = "label", num_classes: int = 2, indices_key: str = "label_cls_indices",
                 max_per_class: int = 200_000):
        super().__init__([label_key])
        self.label_key, self.num_classes, self.indices_key = label_key, num_classes, indices_key
        self.max_per_class = max_per_class

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        lab = d[self.label_key]
        flat = np.asarray(lab.as_tensor() if hasattr(lab, "as_tensor") else lab).reshape(-1)
        order = np.argsort(flat, kind="stable")  # one pass groups every class's voxels
        bounds = np.searchsorted(flat[order], np.arange(self.num_classes + 1))
        out = []
        for k in range(self.num_classes):
            idx = order[bounds[k]:bounds[k + 1]]
            if len(idx) > self.max_per_class:
                idx = idx[:: -(-len(idx) // self.max_per_class)]
            out.append(np.ascontiguousarray(idx, dtype=np.int32))
        d[self.indices_key] = out
        return d


#: Percentiles of the raw intensities that the modality-neutral view maps to 0 and 1 (clipped outside).
NEUTRAL_PERCENTILES = (0.5, 99.5)


def neutral_view(spacing: Sequence[float], orientation: str = "RAS") -> Preprocessing:
    """The modality-neutral view (``modality="neutral"``): an image of any modality resampled to ``spacing`` and
    its intensities' :data:`NEUTRAL_PERCENTILES` mapped to [0, 1]: what a question about the modality is asked
    of, since it presupposes no CT window or MRI normalisation (:class:`cfseg.continual.router.ModalityRouter`)."""
    return Preprocessing(modality="neutral", spacing=tuple(float(s) for s in spacing), orientation=orientation)


def intensity_transform(pre: Preprocessing, key: str = "image") -> mt.Transform:
    """The modality's intensity normalisation: CT window to [0, 1]; MRI z-score over foreground; the neutral view's
    percentile scaling (:func:`neutral_view`)."""
    if pre.modality == "neutral":
        lo, hi = NEUTRAL_PERCENTILES
        return mt.ScaleIntensityRangePercentilesd(key, lower=lo, upper=hi, b_min=0.0, b_max=1.0, clip=True,
                                                  channel_wise=True)
    if pre.modality == "ct":
        lo, hi = pre.ct_window
        return mt.ScaleIntensityRanged(key, a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True)
    if pre.modality == "mri":
        return ZScoreForegroundd(key, fraction=pre.mri_foreground)
    raise ValueError(f"modality must be 'ct' or 'mri', got {pre.modality!r}")


def deterministic_transforms(pre: Preprocessing, labeled: bool = True) -> list[mt.Transform]:
    """Load, validate, remap, reorient, resample, normalise: the cached prefix.

    Output items: ``image`` float32 [C, X, Y, Z] and, when labelled, ``label`` uint8 [1, X, Y, Z] in global
    class indices.
    """
    keys = ["image", "label"] if labeled else ["image"]
    modes = ("bilinear", "nearest") if labeled else ("bilinear",)
    return [
        LoadCased(keys, image_only=True, ensure_channel_first=True),
        ValidateCased("image", "label"),
        RemapLabelsd("label"),
        mt.Orientationd(keys, axcodes=pre.orientation, labels=(("L", "R"), ("P", "A"), ("I", "S"))),
        mt.Spacingd(keys, pixdim=pre.spacing, mode=modes),
        intensity_transform(pre, "image"),
        mt.EnsureTyped("image", dtype=torch.float32),
        *([mt.EnsureTyped("label", dtype=torch.uint8)] if labeled else []),
    ]


def random_transforms(
    patch_size: Sequence[int],
    num_classes: int,
    samples_per_volume: int = 2,
    crop: str = "class_balanced",
    class_ratios: Sequence[float] | None = None,
    labeled: bool = True,
    augment: bool | str = True,
) -> list[mt.Transform]:
    """Random patch sampling and augmentation for training.

    Args:
        patch_size: crop size (voxels).
        num_classes: K + 1 (background included), for class-balanced crops.
        samples_per_volume: patches drawn per loaded volume.
        crop: ``"class_balanced"`` (centre on each class equally often, or by ``class_ratios``; classes absent
            from a volume are skipped), ``"foreground"`` (half the patches centred on any foreground) or
            ``"random"``. Image-only items always get random crops.
        augment: an :data:`AUGMENT_LEVELS` name, or True (``"intensity"``) / False (``"none"``); see
            :func:`augmentation`. With ``"spatial"`` / ``"strong"`` the crop is :func:`crop_size` (the patch plus a
            margin, cut from the volume padded by that margin: see :func:`crop_padding`) and the spatial
            augmentation cuts the patch out of it.
    """
    keys = ["image", "label"] if labeled else ["image"]
    level = augment_level(augment)
    size = crop_size(patch_size, level)
    pad = crop_padding(keys, patch_size, level)
    if not labeled or crop == "random":
        cropper = mt.RandSpatialCropSamplesd(keys, roi_size=size, num_samples=samples_per_volume,
                                             random_size=False)
    elif crop == "class_balanced":
        indices = ClassIndicesd("label", num_classes)  # deterministic: cached with the volume
        cropper = mt.RandCropByLabelClassesd(
            keys, label_key="label", spatial_size=size, num_classes=num_classes,
            ratios=list(class_ratios) if class_ratios is not None else None, num_samples=samples_per_volume,
            warn=False, indices_key=indices.indices_key,
        )
    elif crop == "foreground":
        cropper = mt.RandCropByPosNegLabeld(
            keys, label_key="label", spatial_size=size, pos=1, neg=1, num_samples=samples_per_volume
        )
    else:
        raise ValueError(f"crop must be 'class_balanced', 'foreground' or 'random', got {crop!r}")
    out: list[mt.Transform] = [*pad, cropper]
    if crop == "class_balanced" and labeled:
        out = [*pad, indices, cropper, mt.DeleteItemsd(indices.indices_key)]
    return out + augmentation(level, patch_size, labeled)


#: ``data.augment`` levels. ``"intensity"`` (the default, and what ``augment: true`` means): light random scale and
#: shift of the intensities. ``"spatial"``: random rotation and scaling on top of that. ``"strong"``: nnU-Net-style
#: (Isensee et al., Nat. Methods 2021): the rotation and scaling, Gaussian noise and blur, simulated low resolution
#: and gamma on top of the light scale/shift. No mirroring in any level: left and right organs are different classes.
AUGMENT_LEVELS = ("none", "intensity", "spatial", "strong")

#: With ``"spatial"`` or ``"strong"``, patches are cropped this much larger per axis (at least), rotated/scaled about
#: their centre and cut back to the patch size, so the rotated patch's corners come from the image rather than from
#: padding.
SPATIAL_MARGIN = 1.25


def augment_level(augment: bool | str) -> str:
    """``data.augment`` as one of :data:`AUGMENT_LEVELS` (True: ``"intensity"``, False: ``"none"``)."""
    if augment is True or augment is False:
        return "intensity" if augment else "none"
    if augment not in AUGMENT_LEVELS:
        raise ValueError(f"augment must be true, false or one of {AUGMENT_LEVELS}, got {augment!r}")
    return str(augment)


def crop_margin(patch_size: Sequence[int], augment: bool | str) -> tuple[int, ...]:
    """Voxels added on each side of the patch before the spatial augmentation (0 without it)."""
    if augment_level(augment) not in ("spatial", "strong"):
        return (0,) * len(patch_size)
    return tuple(int(np.ceil(int(p) * (SPATIAL_MARGIN - 1) / 2)) for p in patch_size)


def crop_size(patch_size: Sequence[int], augment: bool | str) -> tuple[int, ...]:
    """Size of the random crop: the patch plus :func:`crop_margin` on each side."""
    return tuple(int(p) + 2 * m for p, m in zip(patch_size, crop_margin(patch_size, augment), strict=True))


def crop_padding(keys: KeysCollection, patch_size: Sequence[int], augment: bool | str) -> list[mt.Transform]:
    """Deterministic padding before the random crop (cached with the volume).

    Pads to at least the patch, then by :func:`crop_margin` on every side: a crop of :func:`crop_size` then has
    its centre in the same range as a patch-sized crop of the unpadded volume, so the centre patch the spatial
    augmentation cuts out lies where a plain crop would (on a volume barely larger than the patch, an enlarged crop
    of the unpadded volume could only sit at its centre).
    """
    pad: list[mt.Transform] = [mt.SpatialPadd(keys, spatial_size=tuple(int(p) for p in patch_size), mode="constant")]
    margin = crop_margin(patch_size, augment)
    if any(margin):
        pad.append(mt.BorderPadd(keys, spatial_border=[m for m in margin for _ in (0, 1)], mode="constant"))
    return pad


def augmentation(augment: bool | str = "intensity", patch_size: Sequence[int] | None = None,
                 labeled: bool = True) -> list[mt.Transform]:
    """Random augmentation of one cropped item (see :data:`AUGMENT_LEVELS`).

    ``"spatial"`` and ``"strong"`` take an item of :func:`crop_size` and return one of ``patch_size``: a random
    rotation (up to 15 degrees about each axis) and scaling (0.85-1.15) about the crop's centre with probability
    0.3 (otherwise the centre patch), image trilinear and label nearest. ``"spatial"`` adds the light scale/shift;
    ``"strong"`` adds per image, each with its own probability, Gaussian noise (std up to 0.03 in normalised
    units: 13 HU in the default 425 HU CT window, 22 HU in OpenKBP's 750 HU one), Gaussian blur (sigma 0.5-1
    voxel), simulated low resolution (down by up to 2x and back), gamma 0.7-1.5, and the light scale/shift. Rates
    follow nnU-Net's defaults, the ranges are milder (CPU budgets see few steps).
    """
    level = augment_level(augment)
    if level == "none":
        return []
    light: list[mt.Transform] = [mt.RandScaleIntensityd("image", factors=0.1, prob=0.5),
                                 mt.RandShiftIntensityd("image", offsets=0.05, prob=0.5)]
    if level == "intensity":
        return light
    if patch_size is None:
        raise ValueError(f"augment {level!r} needs the patch size (the spatial augmentation cuts the patch out)")
    keys = ["image", "label"] if labeled else ["image"]
    angle = float(np.deg2rad(15.0))
    size = tuple(int(p) for p in patch_size)
    affine = mt.RandAffined(keys, spatial_size=size, prob=1.0, rotate_range=(angle,) * 3, scale_range=(0.15,) * 3,
                            mode=("bilinear", "nearest")[:len(keys)], padding_mode="border")
    spatial: list[mt.Transform] = [  # the centre patch by slicing when not rotated: resampling costs 20 ms per 48^3
        mt.OneOf([affine, mt.CenterSpatialCropd(keys, roi_size=size)], weights=[0.3, 0.7]),
        *([mt.EnsureTyped("label", dtype=torch.uint8)] if labeled else []),
    ]
    if level == "spatial":
        return spatial + light
    return spatial + [
        mt.RandGaussianNoised("image", prob=0.15, std=0.03, sample_std=True),
        mt.RandGaussianSmoothd("image", sigma_x=(0.5, 1.0), sigma_y=(0.5, 1.0), sigma_z=(0.5, 1.0), prob=0.2),
        mt.RandSimulateLowResolutiond("image", prob=0.25, zoom_range=(0.5, 1.0)),
        mt.RandAdjustContrastd("image", gamma=(0.7, 1.5), prob=0.3),
        *light,
    ]


class ChosenClassCropd(mt.RandCropByLabelClassesd):
    """Random patches centred on voxels of the class the sampler chose for this item (hierarchical sampling).

    The item carries ``class_key`` (a global class index, chosen by
    :class:`cfseg.data.datamodule.HierarchicalSampler`) and the per-class voxel indices of :class:`ClassIndicesd`;
    every one of the ``num_samples`` patches is centred on a random voxel of that class. A case that annotates the
    class but has no voxel of it (an organ outside the scan) falls back to a class drawn uniformly among the
    classes present, as ``crop: class_balanced`` with equal ratios.

    Output: a list of ``num_samples`` item dicts (``class_key`` and the indices removed).
    """

    def __init__(self, keys: KeysCollection, label_key: str, spatial_size: Sequence[int], num_classes: int,
                 num_samples: int = 1, indices_key: str = "label_cls_indices", class_key: str = "crop_class"):
        super().__init__(keys, label_key=label_key, spatial_size=spatial_size, num_classes=num_classes,
                         num_samples=num_samples, warn=False, indices_key=indices_key)
        self.class_key = class_key
        self.num_classes = num_classes

    def __call__(self, data: Mapping[Hashable, Any], lazy: bool | None = None) -> list[dict[Hashable, Any]]:
        d = dict(data)
        if self.class_key not in d:
            raise ValueError(f"{type(self).__name__} needs the chosen class under {self.class_key!r}; it runs inside "
                             "cfseg's hierarchical sampling (data.sampling: hierarchical)")
        k = int(d.pop(self.class_key))
        indices = d[self.indices_key]
        if not 0 <= k < len(indices):
            raise ValueError(f"chosen crop class {k} is outside 0..{len(indices) - 1}")
        if len(indices[k]):
            self.cropper.ratios = [1.0 if j == k else 0.0 for j in range(len(indices))]
        else:  # annotated but absent here: any class present, equally likely
            self.cropper.ratios = None
        return super().__call__(d, lazy)


def hierarchical_transforms(
    patch_size: Sequence[int], num_classes: int, samples_per_volume: int = 2, augment: bool | str = True,
) -> tuple[list[mt.Transform], list[mt.Transform]]:
    """Training transforms of hierarchical sampling, split where the chosen class enters.

    Returns:
        ``(cached, random)``: ``cached`` follows :func:`deterministic_transforms` inside each dataset (padding to the
        patch and the per-class voxel indices, deterministic, so cached with the volume); ``random`` runs after the
        sampler's choice is attached (:class:`ChosenClassCropd`, then :func:`augmentation` at level ``augment``).
    """
    keys = ["image", "label"]
    size = crop_size(patch_size, augment)
    indices = ClassIndicesd("label", num_classes)
    cached: list[mt.Transform] = [*crop_padding(keys, patch_size, augment), indices]
    rand: list[mt.Transform] = [
        ChosenClassCropd(keys, "label", size, num_classes, samples_per_volume, indices.indices_key),
    ]  # the crop consumes the indices
    return cached, rand + augmentation(augment, patch_size)


class CheckedCompose(mt.Compose):
    """A Compose that surfaces a :class:`DatasetError` raised inside it as itself.

    MONAI wraps a transform's exception in ``RuntimeError("applying transform ...")``; a user should see the
    one line naming the file and the problem instead.
    """

    def __call__(self, input_, *args, **kwargs):
        try:
            return super().__call__(input_, *args, **kwargs)
        except RuntimeError as e:
            cause: BaseException | None = e
            while cause is not None and not isinstance(cause, DatasetError):
                cause = cause.__cause__
            if cause is not None:
                raise cause from None
            raise


def build_transforms(
    pre: Preprocessing,
    train: bool,
    patch_size: Sequence[int] | None = None,
    num_classes: int | None = None,
    labeled: bool = True,
    **random_kwargs: Any,
) -> mt.Compose:
    """The full pipeline: deterministic prefix, plus random crops/augmentation when ``train``."""
    ts = deterministic_transforms(pre, labeled)
    if train:
        if patch_size is None or num_classes is None:
            raise ValueError("training transforms need patch_size and num_classes")
        ts += random_transforms(patch_size, num_classes, labeled=labeled, **random_kwargs)
    return CheckedCompose(ts)


def make_label_lut(dataset_labels: Mapping[str, int], annotated: Sequence[str],
                   global_index: Mapping[str, int]) -> np.ndarray:
    """Per-case look-up table dataset value -> global index (see :class:`RemapLabelsd`).

    Args:
        dataset_labels: canonical class name -> label value in the dataset's files.
        annotated: classes annotated in this case; values of other declared classes map to 0.
        global_index: canonical name -> index in the experiment's class list (classes missing there map to 0).

    Returns:
        int16 array [256].
    """
    lut = np.full(256, -1, dtype=np.int16)
    lut[0] = 0
    for name, value in dataset_labels.items():
        lut[value] = global_index.get(name, 0) if name in annotated else 0
    return lut
