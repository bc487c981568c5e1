"""Segmenting NIfTI images with a cfseg checkpoint: :func:`segment` (exported as ``cfseg.segment``), the checks of
an input file and the writing of the outputs. The command line ``cfseg-segment`` is :mod:`cfseg.apps.segment`.

The image is reoriented and resampled as in training (the checkpoint records how), segmented by sliding windows
over background plus the requested classes in one forward pass, and the result is resampled back onto the input's
own voxel grid: every output has the input's shape and affine, whatever its orientation. The modality is read off
the image or chosen by the checkpoint's modality router (:func:`cfseg.inference.choose_modality`); a checkpoint
with LoRA experts segments each class with the expert of the stage that trained it; an online corrector
(:mod:`cfseg.online`) may be fused with the checkpoint's output.

Inputs are checked before any voxel is read (:func:`load_input`: one 3D volume of real, single-channel voxels; a
qform or sform and a finite non-zero ``pixdim`` in the header as stored; finite invertible affine, spacing in range,
at least :data:`~cfseg.geometry.MIN_AXIS_VOXELS` and at most ``max_voxels`` voxels, :mod:`cfseg.geometry`), in
:func:`segment` the resampled grid against the backbone's total stride (:func:`min_network_voxels`), and after
reading (readable in full, finite, not constant or near-empty); a problem is a :class:`SegmentError` naming the
file.

Outputs: :func:`write_flat` writes one input's files directly into a folder (each replaced atomically; the files an
earlier run wrote there but this one does not are removed, as listed in ``.cfseg-segment.json``);
:func:`write_case_dir` writes ``<out>/<case>/`` in a temporary directory and swaps it in whole; :class:`OutputLock`
keeps a second writer out of the same folder. Reviewers' files are never overwritten or deleted: each manifest
(``<folder>/.cfseg-segment.json``) records the sha256 of every file written; a file a rerun would replace or remove
whose content differs from the record (or that cfseg did not write) makes the writer refuse with
:class:`EditedFilesError` naming it, before anything is written, or, with ``keep_edited`` (``--keep-edited``), keep
it and write the new output beside it (``labels.new.nii.gz``). A manifest without hashes (an older cfseg) protects
every file it lists.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, EnsureTyped, Orientationd, Spacingd

from cfseg.data.transforms import Preprocessing, intensity_transform
from cfseg.dicom import DicomError, DicomSeries, is_series_folder, read_series
from cfseg.geometry import (
    DEFAULT_MAX_VOXELS,
    MIN_AXIS_VOXELS,
    SLAB_VOXELS,
    GeometryError,
    check_affine,
    check_header,
    check_min_size,
    check_size,
    grids_align,
    labels_to_input_grid,
    network_grid,
    nifti_image,
    resample_in_blocks,
    resampled_shape,
    to_input_grid,
)
from cfseg.inference import ModalityError, choose_modality, predict_volume, preprocessing_for
from cfseg.module import CFSegModule, load_checkpoint
from cfseg.online import OnlineCorrector
from cfseg.online_state import OnlineStateError

NIFTI_SUFFIXES = (".nii", ".nii.gz")
#: inputs with more voxels than this (2**25: 512 x 512 x 128) are kept as stored (integers stay integers,
#: :func:`load_input`) and resampled onto the network grid block by block (:func:`preprocess`); smaller ones take
#: MONAI's Orientation + Spacing on one float32 copy, as in training
BLOCK_RESAMPLE_VOXELS = 2**25
log = logging.getLogger(__name__)


class SegmentError(ValueError):
    """A user error: bad input file, unknown class, bad box. The message says what and where."""


def is_nifti_name(path: Path) -> bool:
    """Whether ``path`` is named like a NIfTI file (``.nii`` or ``.nii.gz``)."""
    return path.name.endswith(NIFTI_SUFFIXES)


def _case_name(path: Path) -> str:
    name = path.name
    for suf in (".nii.gz", ".nii"):
        if name.endswith(suf):
            name = name[: -len(suf)]
    return name[:-5] if name.endswith("_0000") else name


def safe_name(name: str) -> str:
    """``name`` as a single path component that stays inside its folder and is not hidden.

    Characters other than letters, digits, ``_``, ``.`` and ``-`` become ``_``; leading dots are dropped
    (``..``, ``.`` and ``""`` become ``"unnamed"``).
    """
    s = re.sub(r"[^\w.-]", "_", name).lstrip(".")
    return s or "unnamed"


def case_names(files: Sequence[Path]) -> dict[Path, str]:
    """One output folder name per input, unique (case-insensitively) and safe.

    Names come from :func:`_case_name`; inputs whose names coincide (``a.nii`` / ``a.nii.gz`` / ``a_0000.nii.gz``)
    keep their full file name instead (``a_nii``, ``a_nii_gz``, ``a_0000_nii_gz``).

    Raises:
        SegmentError: when two inputs would still share a name.
    """
    names = {f: safe_name(_case_name(f)) for f in files}
    counts = Counter(n.casefold() for n in names.values())
    for f in files:
        if counts[names[f].casefold()] > 1:
            names[f] = safe_name(f.name.replace(".", "_"))
    seen: dict[str, Path] = {}
    for f in files:
        key = names[f].casefold()
        if key in seen:
            raise SegmentError(f"{f}: its output folder {names[f]!r} would be the same as that of {seen[key]} "
                               f"(rename one of them)")
        seen[key] = f
    return names


def check_path(path: Path) -> None:
    """Cheap checks of an input path before anything is read (exists, plain file, NIfTI name, not empty)."""
    if path.is_dir():
        raise SegmentError(f"{path}: is a folder, not a NIfTI file")
    if not path.exists():
        raise SegmentError(f"{path}: file not found")
    if not path.is_file():
        raise SegmentError(f"{path}: not a regular file")
    if not is_nifti_name(path):
        raise SegmentError(f"{path}: not a NIfTI file (expected .nii or .nii.gz)")
    if path.stat().st_size == 0:
        raise SegmentError(f"{path}: empty file (0 bytes)")


def one_line(e: BaseException) -> str:
    """``e`` as one line (its type named unless it is a ValueError or OSError, whose messages say what)."""
    text = " ".join(str(e).split()) or repr(e)
    return text if isinstance(e, (ValueError, OSError)) else f"{type(e).__name__}: {text}"


def load_input(image: str | Path | nib.Nifti1Image | DicomSeries,
               max_voxels: int = DEFAULT_MAX_VOXELS) -> tuple[nib.Nifti1Image, str]:
    """A 3D NIfTI image (path or nibabel image) or a DICOM series (its folder, or read by
    :func:`cfseg.dicom.read_series`), checked before and after its voxels are read.

    Before: the path (:func:`check_path`), that nibabel reads the header, 3D (or 4D with one volume), a finite
    invertible affine with spacing in range and at most ``max_voxels`` voxels (:mod:`cfseg.geometry`). After:
    the data could be read in full (a truncated ``.nii.gz`` fails only here), finite, not constant or near-empty.

    Returns:
        ``(image, where)``: an in-memory image with the input's affine, float32, or the stored integers when there
        are more than :data:`BLOCK_RESAMPLE_VOXELS` of them and no intensity scaling (the values a float32 copy would
        hold, at half or less of its size); ``where`` names it in messages.

    Raises:
        SegmentError: ``"<path>: <problem>"``.
    """
    if isinstance(image, DicomSeries):
        img, where = image.image, image.where
    elif isinstance(image, nib.spatialimages.SpatialImage):
        img, where = image, "<in-memory image>"
    elif Path(image).is_dir() and is_series_folder(Path(image)):
        try:
            series = read_series(Path(image))
        except DicomError as e:
            raise SegmentError(str(e)) from None
        img, where = series.image, series.where
    else:
        path = Path(image)
        where = str(path)
        check_path(path)
        try:
            with _quiet_nibabel():  # its header "fixes" (pixdim 0 -> 1) are checked below, in one line
                img = nib.load(str(path))
        except Exception as e:  # nibabel raises several types
            raise SegmentError(f"{path}: not a readable NIfTI file ({one_line(e)})") from e
    shape = tuple(int(s) for s in img.shape)
    if len(shape) == 4 and shape[3] > 1:
        raise SegmentError(f"{where}: expected a 3D image, got shape {shape}: {shape[3]} volumes or channels in one "
                           f"file (cfseg segments one 3D volume of one channel; split it and segment each)")
    if len(shape) not in (3, 4):
        raise SegmentError(f"{where}: expected a 3D image, got shape {shape}")
    dtype = np.dtype(img.get_data_dtype())
    if dtype.fields is not None or dtype.kind == "V":
        raise SegmentError(f"{where}: multi-channel voxels (data type {_dtype_name(img, dtype)}: several values "
                           f"per voxel, e.g. RGB colour); expected one intensity per voxel (a grey-scale scan)")
    if dtype.kind == "c":
        raise SegmentError(f"{where}: complex-valued voxels (data type {dtype.name}); expected real intensities "
                           f"(take the magnitude image)")
    try:
        check_header(_raw_header(image, img))
        check_affine(img.affine)
        check_size(shape[:3], max_voxels)
        check_min_size(shape[:3], MIN_AXIS_VOXELS)
    except GeometryError as e:
        raise SegmentError(f"{where}: {e}") from None
    keep = _keeps_integers(img, dtype, math.prod(shape[:3]))
    try:
        proxy = img.dataobj[..., 0] if len(shape) == 4 else img.dataobj
        data = np.asarray(proxy) if keep else np.asarray(proxy, dtype=np.float32)
    except Exception as e:  # EOFError, zlib.error, OSError, ValueError: truncated or corrupt data
        raise SegmentError(f"{where}: the image data cannot be read ({one_line(e)}; truncated or corrupt "
                           f"file?)") from e
    if not keep:
        n_bad = _count_slabs(data, lambda a: ~np.isfinite(a))
        if n_bad:
            raise SegmentError(f"{where}: {n_bad} NaN/infinite intensities")
    lo, hi = float(data.min()), float(data.max())
    if lo == hi:
        raise SegmentError(f"{where}: constant image (every voxel is {lo:g}); nothing to segment")
    med = float(np.median(data[:: max(1, data.size // 1_000_000)]))
    n_off = _count_slabs(data, lambda a: a != med)
    if n_off < max(10, 1e-4 * data.size):
        raise SegmentError(f"{where}: near-empty image (only {n_off} of {data.size} voxels differ from {med:g}); "
                           f"nothing to segment")
    return nib.Nifti1Image(data, img.affine), where


def _keeps_integers(img: Any, dtype: np.dtype, n_voxels: int) -> bool:
    """Whether :func:`load_input` keeps the voxels as stored (integers, converted to float32 one block at a time
    downstream) instead of one float32 copy: an integer image of more than :data:`BLOCK_RESAMPLE_VOXELS` voxels
    without intensity scaling (``scl_slope`` 1 or unset, ``scl_inter`` 0 or unset)."""
    if dtype.kind not in "iu" or n_voxels <= BLOCK_RESAMPLE_VOXELS:
        return False
    slope, inter = getattr(img.dataobj, "slope", 1.0), getattr(img.dataobj, "inter", 0.0)
    return float(slope) == 1.0 and float(inter) == 0.0


def _count_slabs(data: np.ndarray, test: Callable[[np.ndarray], np.ndarray]) -> int:
    """``count_nonzero(test(data))``, taken over slabs of about :data:`~cfseg.geometry.SLAB_VOXELS` voxels (no
    full-size boolean temporary)."""
    step = max(1, SLAB_VOXELS // max(1, math.prod(data.shape[1:])))
    return sum(int(np.count_nonzero(test(data[i:i + step]))) for i in range(0, max(1, data.shape[0]), step))


@contextlib.contextmanager
def _quiet_nibabel():
    logger = nib.imageglobals.logger
    level = logger.level
    logger.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        logger.setLevel(level)


def _raw_header(image: Any, img: Any) -> Any:
    """The header as stored in the file (nibabel "fixes" some fields on load, e.g. a zero pixdim becomes 1)."""
    if not isinstance(image, (str, Path)) or Path(image).is_dir() or not isinstance(img.header, nib.Nifti1Header):
        return img.header  # an in-memory image or a DICOM series: no file header
    try:
        with nib.openers.ImageOpener(str(image)) as f:
            return type(img.header).from_fileobj(f, check=False)
    except Exception:  # unreadable raw header: the loaded one is all there is
        return img.header


def _dtype_name(img, dtype: np.dtype) -> str:
    try:
        code = int(img.header["datatype"])
        return str(img.header._field_recoders["datatype"].label[code])
    except (KeyError, TypeError, ValueError, AttributeError):
        return str(dtype)


def network_stride(module) -> int:
    """The backbone's total downsampling factor along its most downsampled axis, from its recorded spec (the
    product of ``strides``, as MONAI's ``UNet`` and ``DynUNet`` record them); 1 when the spec records none.
    """
    spec = module.hparams.get("backbone") or {}
    strides = (spec.get("init_args") or {}).get("strides") if isinstance(spec, dict) else None
    if not isinstance(strides, (list, tuple)):
        return 1
    total = np.ones(3, np.int64)
    for level in strides:
        try:
            v = np.asarray(level, np.int64).reshape(-1)
        except (TypeError, ValueError):
            return 1
        if v.size == 1:
            v = np.repeat(v, 3)
        if v.size == 3:
            total *= np.maximum(v, 1)
    return int(total.max())


def min_network_voxels(module) -> int:
    """Fewest voxels along each axis of the resampled (network) grid: the backbone's total stride
    (:func:`network_stride`), never below :data:`cfseg.geometry.MIN_AXIS_VOXELS`."""
    return max(MIN_AXIS_VOXELS, network_stride(module))


def resolve_classes(module, classes: Sequence[str] | None) -> list[int]:
    """Global indices of the requested classes (any spelling, duplicates dropped); unknown names fail with close
    matches, ``background`` is refused (it is what no requested class claims)."""
    if not classes:
        return list(range(1, len(module.bank.names)))
    idx: list[int] = []
    for c in classes:
        k = module.bank.index(c)
        if k == 0:
            raise SegmentError(f"class {c!r} is the background, not a class to segment (every voxel that no "
                               f"requested class claims is background; leave it out of --classes)")
        if k not in idx:
            idx.append(k)
    return idx


def check_expert(module, expert: int | None) -> None:
    """Refuse an ``expert`` (``--expert``) the module does not have; None (the module's own plan) is always valid.

    Raises:
        SegmentError: ``expert`` is not an integer in ``0..module.n_experts - 1`` (only 0 without experts).
    """
    if expert is None:
        return
    n = int(module.n_experts)
    if not isinstance(expert, (int, np.integer)) or isinstance(expert, bool) or not 0 <= int(expert) < n:
        if n == 1:
            raise SegmentError(f"expert {expert!r} does not exist: this checkpoint has no LoRA experts, only expert 0 "
                               f"(the shared network); the valid range is 0..0")
        raise SegmentError(f"expert {expert!r} does not exist: this checkpoint has experts 0..{n - 1} (0: the shared "
                           f"network, 1..{n - 1}: the LoRA experts of its later stages)")


def experts_used(module, class_indices: Sequence[int]) -> str | None:
    """Which experts segmented ``class_indices`` in the module's last sliding-window pass, in one line; None when
    the module has no LoRA experts.

    Mirrors the module's own choice: ``route_override`` if set, else :meth:`~cfseg.module.CFSegModule.expert_plan`
    in the domain of ``last_route`` (the router's pick for the volume, when there is one).
    """
    if module.n_experts <= 1:
        return None
    names = module.bank.names
    ks = [int(k) for k in class_indices if int(k) != 0]
    if module.route_override is not None:
        return f"expert {int(module.route_override)} (forced) segments every class"
    route = module.last_route
    domains = (route or {}).get("domains") or [None]
    plan = module.expert_plan(ks, domains[0])
    used = ", ".join(f"{e} ({', '.join(names[k] for k in mine)})" for e, mine in sorted(plan.items()))
    head = f"routed to expert {route['expert']} (domains {', '.join(route['domains']) or 'none'}); " if route else ""
    return f"{head}experts used: {used}"


def open_online(online: str | Path | Any | None, module) -> Any:
    """The online corrector of ``online`` (a state directory or an :class:`~cfseg.online.OnlineCorrector`) for
    ``module``; None when ``online`` is None.

    Raises:
        SegmentError: not a state, a damaged one, or one made for another checkpoint.
    """
    if online is None:
        return None
    if isinstance(online, OnlineCorrector):
        if online.module is not module:
            raise SegmentError("the online corrector was made for another loaded model than the one segmenting")
        return online
    try:
        return OnlineCorrector.load(online, module)
    except OnlineStateError as e:
        raise SegmentError(str(e)) from None


def _check_box(box: Sequence[int], shape: Sequence[int]) -> tuple[slice, slice, slice]:
    if len(box) != 6:
        raise SegmentError(f"--box needs 6 integers x0 y0 z0 x1 y1 z1, got {list(box)}")
    lo, hi = [int(v) for v in box[:3]], [int(v) for v in box[3:]]
    for a, (l, h, n) in enumerate(zip(lo, hi, shape, strict=True)):
        if not 0 <= l < h <= n:
            raise SegmentError(f"--box axis {a}: need 0 <= {l} < {h} <= {n} (the image has shape {tuple(shape)})")
    return tuple(slice(l, h) for l, h in zip(lo, hi, strict=True))  # type: ignore[return-value]


@torch.no_grad()
def segment(
    image: str | Path | nib.Nifti1Image | DicomSeries,
    checkpoint: str | Path | Any,
    classes: Sequence[str] | None = None,
    multilabel: bool = False,
    similarity: bool = False,
    box: Sequence[int] | None = None,
    device: str = "cpu",
    modality: str | None = None,
    context: int = 16,
    max_voxels: int = DEFAULT_MAX_VOXELS,
    notify: Callable[[str, str], None] | None = None,
    expert: int | None = None,
    online: str | Path | Any | None = None,
    strict: bool = False,
    report: dict[str, Any] | None = None,
) -> dict[str, nib.Nifti1Image]:
    """Segment one image; every returned image has the input's shape and affine.

    Memory: an input of more than :data:`BLOCK_RESAMPLE_VOXELS` voxels is held once, as stored (integers stay
    integers, float32 otherwise), and resampled onto the network grid (and the modality-neutral view) in blocks of
    about :data:`~cfseg.geometry.SLAB_VOXELS` voxels, read and written (at least one slice); the prediction comes
    back onto the input grid in slabs of about :data:`~cfseg.geometry.SLAB_VOXELS` values (all classes together,
    at least one slice), reduced to uint8 labels slab by slab. What stays is the stored input, the float32 network
    grid with its class probabilities, and one byte per input voxel of labels (each binary mask is made when it is
    written); ``similarity`` adds 4 bytes per input voxel per class. The largest input accepted by default
    (:data:`~cfseg.geometry.DEFAULT_MAX_VOXELS`, 512 x 512 x 1024) thus segments without a full-size float copy of
    the image or of the class probabilities.

    Args:
        image: NIfTI path or nibabel image (3D), or a DICOM series: its folder or a :class:`cfseg.dicom.DicomSeries`
            (:func:`cfseg.dicom.read_series`: geometry from the headers, refusals of series that are not one volume).
        checkpoint: cfseg checkpoint path, or an already loaded module (batch use).
        classes: class names to segment (synonyms allowed); None = every class the checkpoint knows.
        multilabel: return one ``"labels"`` image (uint8, global class values; see ``labels_json``) instead
            of one binary mask per class.
        similarity: also return ``"similarity_<class>"`` float maps (cosine to the class prototype).
        box: ``(x0, y0, z0, x1, y1, z1)`` voxel box of the input (end exclusive); outside is background.
        device: ``"cpu"`` or ``"cuda"``.
        modality: ``"ct"`` or ``"mri"``; None = the checkpoint's modality router where it has one over two or
            more modalities, else detected from the image (:func:`cfseg.inference.detect_modality`); an image that
            looks like a modality the checkpoint was not trained on is refused unless ``modality`` is given (then a
            warning).
        context: voxels of context around ``box`` given to the network.
        max_voxels: largest input grid and largest resampled grid accepted (see :mod:`cfseg.geometry`).
        notify: ``notify(level, message)`` with level ``"info"`` (the modality used and why; with LoRA experts,
            which experts ran: :func:`experts_used`) or ``"warning"``; None logs the info (logger
            ``cfseg.segmentation``) and issues warnings with :func:`warnings.warn`.
        expert: force this expert (0: the shared network) for every class (the module's ``route_override`` for
            this call only); None: each class by the expert of the stage that trained it, routed by domain.
        online: an online corrector state directory (``cfseg-correct --state``) or a loaded
            :class:`cfseg.online.OnlineCorrector`: the masks come from the frozen model fused with the corrector
            (similarity maps stay the frozen model's cosines).
        strict: refuse an image the checkpoint's out-of-domain statistics call unlike its training images
            (:mod:`cfseg.ood`) instead of warning.
        report: filled with what was checked: ``modality``, ``ood_score`` and ``ood_threshold`` (None without
            out-of-domain statistics) and ``out_of_domain`` (the manifest records it).

    Raises:
        SegmentError: a bad image, box, class, modality, expert or online state (the message names the file and
            the problem).

    Returns:
        name -> image: ``<class>`` masks (uint8 0/1) or ``"labels"``; ``similarity_<class>`` when asked.
    """
    module = checkpoint if isinstance(checkpoint, CFSegModule) else load_checkpoint(str(checkpoint))
    idx = resolve_classes(module, classes)
    check_expert(module, expert)
    corrector = open_online(online, module)
    img, where = load_input(image, max_voxels)
    try:
        chosen, note, warning = choose_modality(module, np.asarray(img.dataobj), modality,
                                                modality_view(module, img, modality))
    except ModalityError as e:
        raise SegmentError(f"{where}: {e}") from None
    _notify(notify, "info", f"{where}: {note}")
    if warning:
        _notify(notify, "warning", f"{where}: {warning}")
    check_domain(module, img, where, strict, notify, report)
    if report is not None:
        report["modality"] = chosen
    pre: Preprocessing = preprocessing_for(module, chosen)
    full_shape, full_affine = img.shape, img.affine
    need = min_network_voxels(module)
    try:
        check_min_size(resampled_shape(img.shape, img.affine, pre.spacing, pre.orientation), need,
                       f"resampled to {'x'.join(f'{s:g}' for s in pre.spacing)} mm, the image",
                       f" (the network downsamples by {network_stride(module)}; it needs at least {need})")
    except GeometryError as e:
        raise SegmentError(f"{where}: {e}") from None
    region = None
    if box is not None:
        try:
            region = _check_box(box, full_shape)
        except SegmentError as e:
            raise SegmentError(f"{where}: {e}") from None
        ctx = tuple(slice(max(0, r.start - context), min(n, r.stop + context))
                    for r, n in zip(region, full_shape, strict=True))
        img = img.slicer[ctx]
    try:
        grid = resampled_shape(img.shape, img.affine, pre.spacing, pre.orientation)
        check_size(grid, max_voxels, f"resampled to {'x'.join(f'{s:g}' for s in pre.spacing)} mm, the image")
    except GeometryError as e:
        raise SegmentError(f"{where}: {e}") from None
    work = preprocess(img, pre)
    src_affine = work["image"].affine.numpy()
    # probabilities only where they are used: resampling onto a grid that does not align, or online fusion
    need_probs = corrector is not None or not grids_align(src_affine, img.affine)
    before = module.route_override
    if expert is not None:
        module.route_override = int(expert)
    try:
        out = predict_volume(module, work["image"], idx, device=device, similarity=similarity,
                             probabilities=need_probs)
        used = experts_used(module, idx)
    finally:
        module.route_override = before
    if used is not None:
        _notify(notify, "info", f"{where}: {used}")
    if corrector is not None:
        fused = corrector.fuse(work["image"], out["probs"], idx)
        out = {**out, "probs": fused["probs"], "labels": fused["labels"]}
        _notify(notify, "info", f"{where}: {corrector.describe(fused['alpha'])}")
    probs = out["probs"].numpy() if "probs" in out else None
    labels = labels_to_input_grid(out["labels"].numpy(), probs, [0, *idx], src_affine, img.shape, img.affine)
    if region is not None:  # paste back into the full grid, background outside the box
        full = np.zeros(full_shape, np.uint8)
        offs = [c.start for c in ctx]
        inner = tuple(slice(r.start - o, r.stop - o) for r, o in zip(region, offs, strict=True))
        full[region] = labels[inner]
        labels = full
    names = module.bank.names
    result: dict[str, nib.Nifti1Image] = {}
    if multilabel:
        result["labels"] = nifti_image(labels, full_affine)
    else:
        for k in idx:  # each mask is made when it is read or written, not all at once
            result[names[k]] = nifti_image(ClassMask(labels, k), full_affine)
    if similarity:
        # the requested classes' maps only (not the background's), each kept as the one float32 array resampled
        sims = to_input_grid(out["similarity"].numpy()[1:], src_affine, img.shape, img.affine, fill=-1.0)
        for j, k in enumerate(idx):
            s = sims[j]
            if region is not None:
                f = np.full(full_shape, -1.0, np.float32)
                f[region] = s[inner]
                s = f
            result[f"similarity_{names[k]}"] = nifti_image(s.astype(np.float32, copy=False), full_affine)
    return result


class ClassMask:
    """The uint8 0/1 mask of label value ``value`` in ``labels`` [*S], made when it is read (``np.asarray``,
    slicing), so that one image per class does not hold one full-size array per class (a nibabel array proxy)."""

    is_proxy = True
    dtype = np.dtype(np.uint8)

    def __init__(self, labels: np.ndarray, value: int) -> None:
        self.labels, self.value = labels, int(value)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.labels.shape)

    @property
    def ndim(self) -> int:
        return self.labels.ndim

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        mask = (self.labels == self.value).astype(np.uint8)
        return mask if dtype is None else mask.astype(dtype)

    def __getitem__(self, item: Any) -> np.ndarray:
        return (self.labels[item] == self.value).astype(np.uint8)


def check_domain(module, img: nib.Nifti1Image, where: str, strict: bool = False,
                 notify: Callable[[str, str], None] | None = None, report: dict[str, Any] | None = None) -> None:
    """Score ``img`` against the checkpoint's out-of-domain statistics (:mod:`cfseg.ood`): above the threshold a
    warning naming the score (``strict``: :class:`SegmentError`); a checkpoint without statistics says so once per
    call as info. ``report`` gets ``ood_score``, ``ood_threshold`` and ``out_of_domain``."""
    stats = module.domain_statistics
    result: dict[str, Any] = {"ood_score": None, "ood_threshold": None, "out_of_domain": None}
    if stats is None or stats.threshold is None or stats.view is None:
        _notify(notify, "info", f"{where}: not checked against the training images (this checkpoint has no "
                                "out-of-domain statistics: trained before cfseg kept them, or with "
                                "model.statistics.router_batches 0)")
    else:
        score, threshold = module.ood_score(preprocess(img, Preprocessing.from_dict(stats.view))["image"][None])
        result = {"ood_score": round(score, 4), "ood_threshold": round(threshold, 4),
                  "out_of_domain": score > threshold}
        if score > threshold:
            msg = (f"{where}: unlike the images this checkpoint was trained on (out-of-domain score {score:.2f} > "
                   f"{threshold:.2f}): the masks may be wrong")
            if strict:
                raise SegmentError(msg + "; refused (--strict)")
            _notify(notify, "warning", msg)
        else:
            _notify(notify, "info", f"{where}: out-of-domain score {score:.2f} (threshold {threshold:.2f})")
    if report is not None:
        report.update(result)


def _notify(notify: Callable[[str, str], None] | None, level: str, message: str) -> None:
    if notify is not None:
        notify(level, message)
    elif level == "warning":
        warnings.warn(message, stacklevel=3)
    else:
        log.info(message)


def modality_view(module, img: nib.Nifti1Image, modality: str | None = None) -> torch.Tensor | None:
    """The image in the modality router's neutral view [1, C, *S], or None where the router is not asked: a given
    ``modality``, a checkpoint without LoRA experts (strategy ``experts``) or without a modality router, or of one
    modality."""
    router = module.modality_router
    if modality is not None or router is None or module.n_experts < 2 or len(module.preprocessing or {}) < 2:
        return None
    return preprocess(img, Preprocessing.from_dict(router.view))["image"][None]


def preprocess(img: nib.Nifti1Image, pre: Preprocessing, masks: np.ndarray | None = None,
               block_voxels: int = BLOCK_RESAMPLE_VOXELS) -> dict[str, Any]:
    """Run the checkpoint's deterministic preprocessing on an in-memory image; ``masks`` [M, *S] (on the image's
    grid) go along as ``"masks"``, resampled nearest-neighbour onto the network grid.

    An image of more than ``block_voxels`` voxels (and no masks) is resampled onto the same network grid block by
    block (:func:`cfseg.geometry.resample_in_blocks`: the grid MONAI's Orientation + Spacing give, trilinear as
    theirs, equal to float32 rounding) instead of through full-size copies of the image.
    """
    if masks is None and math.prod(img.shape[:3]) > block_voxels:
        shape, grid_affine = network_grid(img.shape[:3], img.affine, pre.spacing, pre.orientation)
        data = resample_in_blocks(np.asarray(img.dataobj), img.affine, shape, grid_affine)
        image = MetaTensor(torch.from_numpy(data)[None], affine=torch.as_tensor(grid_affine, dtype=torch.float64))
        return Compose([intensity_transform(pre, "image"), EnsureTyped("image", dtype=torch.float32)])(
            {"image": image})
    affine = torch.as_tensor(img.affine, dtype=torch.float64)
    data = {"image": MetaTensor(torch.as_tensor(np.asarray(img.dataobj, dtype=np.float32))[None], affine=affine)}
    keys = ["image"]
    if masks is not None:
        data["masks"] = MetaTensor(torch.as_tensor(np.asarray(masks, dtype=np.uint8)), affine=affine.clone())
        keys.append("masks")
    tf = Compose([
        Orientationd(keys, axcodes=pre.orientation, labels=(("L", "R"), ("P", "A"), ("I", "S"))),
        Spacingd(keys, pixdim=pre.spacing, mode=["bilinear", "nearest"][:len(keys)]),
        intensity_transform(pre, "image"),
        EnsureTyped("image", dtype=torch.float32),
    ])
    return tf(data)


def labels_json(module, classes: Sequence[str] | None) -> dict[str, str]:
    """value -> class name for a ``--multilabel`` output."""
    idx = resolve_classes(module, classes)
    return {"0": "background", **{str(k): module.bank.names[k] for k in idx}}
