"""``cfseg-segment``: masks for your own NIfTI files, in their own geometry.

    cfseg-segment -i ct.nii.gz -o masks/ --ckpt model.ckpt [--classes liver spleen] [--multilabel]
                  [--similarity] [--box x0 y0 z0 x1 y1 z1] [--device cpu|cuda] [--list-classes]

The image is reoriented and resampled as in training (the checkpoint records how), segmented by sliding
windows over background plus the requested classes in one forward pass, and the result is resampled back onto
the input's own voxel grid: every output has the input's shape and affine, whatever its orientation.

The Python API is :func:`segment`, also exported as ``cfseg.segment`` (hence this module is not named
``segment.py``: the package attribute is the function).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch

NIFTI_SUFFIXES = (".nii", ".nii.gz")


class SegmentError(ValueError):
    """A user error: bad input file, unknown class, bad box. The message says what and where."""


def _is_nifti(path: Path) -> bool:
    return path.name.endswith(NIFTI_SUFFIXES)


def _case_name(path: Path) -> str:
    name = path.name
    for suf in (".nii.gz", ".nii"):
        if name.endswith(suf):
            name = name[: -len(suf)]
    return name[:-5] if name.endswith("_0000") else name


def load_input(image: str | Path | nib.Nifti1Image) -> tuple[nib.Nifti1Image, str]:
    """A 3D NIfTI image (path or nibabel image) checked for dimensionality and finite values."""
    if isinstance(image, nib.spatialimages.SpatialImage):
        img, where = image, "<in-memory image>"
    else:
        path = Path(image)
        where = str(path)
        if not path.is_file():
            raise SegmentError(f"{path}: file not found")
        if not _is_nifti(path):
            raise SegmentError(f"{path}: not a NIfTI file (expected .nii or .nii.gz)")
        try:
            img = nib.load(str(path))
        except Exception as e:  # nibabel raises several types
            raise SegmentError(f"{path}: cannot be read as NIfTI ({e})") from e
    shape = img.shape
    if len(shape) == 4 and shape[3] == 1:
        img = nib.Nifti1Image(np.asarray(img.dataobj)[..., 0], img.affine, img.header)
    elif len(shape) != 3:
        raise SegmentError(f"{where}: expected a 3D image, got shape {tuple(shape)}")
    data = np.asarray(img.dataobj, dtype=np.float32)
    if not np.isfinite(data).all():
        raise SegmentError(f"{where}: {int((~np.isfinite(data)).sum())} NaN/infinite intensities")
    return nib.Nifti1Image(data, img.affine), where


def resolve_classes(module, classes: Sequence[str] | None) -> list[int]:
    """Global indices of the requested classes (any spelling); unknown names fail with close matches."""
    if not classes:
        return list(range(1, len(module.bank.names)))
    return [module.bank.index(c) for c in classes]


def _grid_map(src_affine: np.ndarray, src_shape: Sequence[int], dst_affine: np.ndarray,
              tol: float = 1e-3) -> tuple[list[int], list[bool], list[int]] | None:
    """How the ``dst`` voxel grid sits on the ``src`` grid when no interpolation is needed, else None.

    That is the case when ``inv(src_affine) @ dst_affine`` is a signed axis permutation with an integer shift
    (up to ``tol`` voxels): the network grid is the input grid reoriented (same spacing, e.g. after
    ``Orientationd`` and a no-op ``Spacingd``), possibly cropped or padded.

    Returns:
        ``(axes, flips, shifts)``: dst axis ``j`` reads src axis ``axes[j]``, flipped when ``flips[j]``, at
        index ``d + shifts[j]`` of the (flipped) src axis for dst index ``d``.
    """
    M = np.linalg.inv(src_affine) @ dst_affine
    R, t = M[:3, :3], M[:3, 3]
    P = np.round(R)
    if np.abs(R - P).max() > tol or np.abs(t - np.round(t)).max() > tol:
        return None
    if not (np.abs(P).sum(0) == 1).all() or not (np.abs(P).sum(1) == 1).all():
        return None
    axes, flips, shifts = [], [], []
    for j in range(3):
        i = int(np.flatnonzero(P[:, j])[0])
        flip = bool(P[i, j] < 0)
        ti = int(np.round(t[i]))  # src index s = +-d + t_i; on the flipped axis s' = n - 1 - s = d + (n - 1 - t_i)
        axes.append(i)
        flips.append(flip)
        shifts.append(int(src_shape[i]) - 1 - ti if flip else ti)
    return axes, flips, shifts


def _take_grid(src: np.ndarray, mapping: tuple[list[int], list[bool], list[int]], dst_shape: Sequence[int],
               fill: float | Sequence[float] = 0.0) -> np.ndarray:
    """Copy ``src`` [*C, X, Y, Z] onto the dst grid of :func:`_grid_map` (exact; ``fill`` outside src).

    ``fill`` is a scalar or one value per leading channel. Returns [*C, *dst_shape] with ``src``'s dtype.
    """
    axes, flips, shifts = mapping
    lead = src.ndim - 3
    a = np.transpose(src, (*range(lead), *(lead + i for i in axes)))
    flip_axes = tuple(lead + j for j in range(3) if flips[j])
    if flip_axes:
        a = np.flip(a, flip_axes)
    out = np.empty((*src.shape[:lead], *dst_shape), src.dtype)
    fill_arr = np.asarray(fill, src.dtype)
    out[...] = fill_arr.reshape(*fill_arr.shape, 1, 1, 1) if fill_arr.ndim else fill_arr
    dst_sl, src_sl = [], []
    for j in range(3):
        n_src, n_dst, t = a.shape[lead + j], int(dst_shape[j]), shifts[j]
        d0, d1 = max(0, -t), min(n_dst, n_src - t)
        if d1 <= d0:
            return out  # no overlap
        dst_sl.append(slice(d0, d1))
        src_sl.append(slice(d0 + t, d1 + t))
    out[(..., *dst_sl)] = a[(..., *src_sl)]
    return out


def _resample_to(src: np.ndarray, src_affine: np.ndarray, dst_shape: Sequence[int], dst_affine: np.ndarray,
                 order: int, cval: float | Sequence[float] = 0.0, slab: int = 32) -> np.ndarray:
    """Resample ``src`` [C, *S] (world-aligned by ``src_affine``) onto a voxel grid, slab by slab.

    Trilinear (``order=1``) or nearest (``order=0``) by ``torch.nn.functional.grid_sample``, all channels at
    once. ``cval`` (a scalar or one value per channel) is what lies outside ``src``: a dst voxel within one
    voxel of the edge blends towards it.

    Returns [C, *dst_shape] float32.
    """
    import torch.nn.functional as F

    if order not in (0, 1):
        raise ValueError(f"order must be 0 (nearest) or 1 (linear), got {order!r}")
    C = src.shape[0]
    fill = np.broadcast_to(np.asarray(cval, np.float32), (C,)).reshape(C, 1, 1, 1)
    M = np.linalg.inv(src_affine) @ dst_affine
    n_src = np.asarray(src.shape[1:], np.float64)
    A = M[:3, :3] * (2 / n_src)[:, None]  # dst voxel index -> src normalised coordinate (align_corners=False)
    b = (2 * M[:3, 3] + 1) / n_src - 1
    vol = torch.from_numpy(np.ascontiguousarray(src, dtype=np.float32) - fill)[None]  # padding is 0: shift by fill
    out = np.empty((C, *dst_shape), np.float32)
    nx, ny, nz = (int(n) for n in dst_shape)
    ys, zs = (torch.arange(n, dtype=torch.float64) for n in (ny, nz))
    for x0 in range(0, nx, slab):
        xs = torch.arange(x0, min(x0 + slab, nx), dtype=torch.float64)
        grid = torch.empty(1, len(xs), ny, nz, 3)  # last dim (z, y, x): grid_sample's (W, H, D) order
        for k in range(3):  # separable: one broadcast sum per src axis
            grid[0, ..., 2 - k] = ((A[k, 0] * xs + b[k]).float()[:, None, None] + (A[k, 1] * ys).float()[:, None]
                                   + (A[k, 2] * zs).float())
        res = F.grid_sample(vol, grid, mode="bilinear" if order else "nearest", padding_mode="zeros",
                            align_corners=False)
        out[:, x0:x0 + len(xs)] = res[0].numpy() + fill
    return out


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
    image: str | Path | nib.Nifti1Image,
    checkpoint: str | Path | Any,
    classes: Sequence[str] | None = None,
    multilabel: bool = False,
    similarity: bool = False,
    box: Sequence[int] | None = None,
    device: str = "cpu",
    modality: str | None = None,
    context: int = 16,
) -> dict[str, nib.Nifti1Image]:
    """Segment one image; every returned image has the input's shape and affine.

    Args:
        image: NIfTI path or nibabel image (3D).
        checkpoint: cfseg checkpoint path, or an already loaded module (batch use).
        classes: class names to segment (synonyms allowed); None = every class the checkpoint knows.
        multilabel: return one ``"labels"`` image (uint8, global class values; see ``labels_json``) instead
            of one binary mask per class.
        similarity: also return ``"similarity_<class>"`` float maps (cosine to the class prototype).
        box: ``(x0, y0, z0, x1, y1, z1)`` voxel box of the input (end exclusive); outside is background.
        device: ``"cpu"`` or ``"cuda"``.
        modality: ``"ct"`` or ``"mri"`` when the checkpoint knows several.
        context: voxels of context around ``box`` given to the network.

    Returns:
        name -> image: ``<class>`` masks (uint8 0/1) or ``"labels"``; ``similarity_<class>`` when asked.
    """
    from cfseg.data.transforms import Preprocessing
    from cfseg.inference import predict_volume, preprocessing_for
    from cfseg.module import CFSegModule, load_checkpoint

    module = checkpoint if isinstance(checkpoint, CFSegModule) else load_checkpoint(str(checkpoint))
    idx = resolve_classes(module, classes)
    img, where = load_input(image)
    pre: Preprocessing = preprocessing_for(module, modality)
    full_shape, full_affine = img.shape, img.affine
    region = None
    if box is not None:
        region = _check_box(box, full_shape)
        ctx = tuple(slice(max(0, r.start - context), min(n, r.stop + context))
                    for r, n in zip(region, full_shape, strict=True))
        img = img.slicer[ctx]
    work = _preprocess(img, pre)
    out = predict_volume(module, work["image"], idx, device=device, similarity=similarity)
    src_affine = work["image"].affine.numpy()
    # Network grid = input grid up to axis permutation/flip/crop (same spacing): copy, no interpolation.
    mapping = _grid_map(src_affine, work["image"].shape[1:], img.affine)
    if mapping is not None:
        labels = _take_grid(out["labels"].numpy(), mapping, img.shape, fill=0)
    else:  # interpolate the probabilities, then argmax; outside the network grid is background
        cval = [1.0] + [0.0] * len(idx)
        probs = _resample_to(out["probs"].numpy(), src_affine, img.shape, img.affine, order=1, cval=cval)
        labels = np.array([0, *idx], dtype=np.uint8)[probs.argmax(0)]
        del probs
    if region is not None:  # paste back into the full grid, background outside the box
        full = np.zeros(full_shape, np.uint8)
        offs = [c.start for c in ctx]
        inner = tuple(slice(r.start - o, r.stop - o) for r, o in zip(region, offs, strict=True))
        full[region] = labels[inner]
        labels = full
    names = module.bank.names
    result: dict[str, nib.Nifti1Image] = {}
    if multilabel:
        result["labels"] = _nifti(labels, full_affine)
    else:
        for k in idx:
            result[names[k]] = _nifti((labels == k).astype(np.uint8), full_affine)
    if similarity:
        sim = out["similarity"].numpy()
        if mapping is not None:
            sims = _take_grid(sim, mapping, img.shape, fill=-1.0)
        else:
            sims = _resample_to(sim, src_affine, img.shape, img.affine, order=1, cval=-1.0)
        for j, k in enumerate(idx, start=1):
            s = sims[j]
            if region is not None:
                f = np.full(full_shape, -1.0, np.float32)
                f[region] = s[inner]
                s = f
            result[f"similarity_{names[k]}"] = _nifti(s.astype(np.float32), full_affine)
    del where
    return result


def _nifti(arr: np.ndarray, affine: np.ndarray) -> nib.Nifti1Image:
    img = nib.Nifti1Image(arr, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    return img


def _preprocess(img: nib.Nifti1Image, pre) -> dict[str, Any]:
    """Run the checkpoint's deterministic preprocessing on an in-memory image."""
    from monai.data import MetaTensor
    from monai.transforms import Compose, EnsureTyped, Orientationd, Spacingd

    from cfseg.data.transforms import intensity_transform

    arr = torch.as_tensor(np.asarray(img.dataobj, dtype=np.float32))[None]
    mt = MetaTensor(arr, affine=torch.as_tensor(img.affine, dtype=torch.float64))
    tf = Compose([
        Orientationd("image", axcodes=pre.orientation, labels=(("L", "R"), ("P", "A"), ("I", "S"))),
        Spacingd("image", pixdim=pre.spacing, mode="bilinear"),
        intensity_transform(pre, "image"),
        EnsureTyped("image", dtype=torch.float32),
    ])
    return tf({"image": mt})


def labels_json(module, classes: Sequence[str] | None) -> dict[str, str]:
    """value -> class name for a ``--multilabel`` output."""
    idx = resolve_classes(module, classes)
    return {"0": "background", **{str(k): module.bank.names[k] for k in idx}}


def _inputs(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if _is_nifti(p))
        if not files:
            raise SegmentError(f"{path}: no .nii/.nii.gz files in this folder")
        return files
    return [path]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="cfseg-segment", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-i", "--input", type=Path, help="NIfTI file or folder of NIfTI files")
    p.add_argument("-o", "--output", type=Path, help="output folder")
    p.add_argument("--ckpt", type=Path, required=True, help="cfseg checkpoint")
    p.add_argument("--classes", nargs="+", default=None, help="classes to segment (default: all)")
    p.add_argument("--multilabel", action="store_true", help="one label file + labels.json")
    p.add_argument("--similarity", action="store_true", help="also write similarity maps (float NIfTI)")
    p.add_argument("--box", type=int, nargs=6, metavar=("X0", "Y0", "Z0", "X1", "Y1", "Z1"), default=None)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--modality", default=None, choices=["ct", "mri"])
    p.add_argument("--list-classes", action="store_true", help="print the classes the checkpoint knows")
    a = p.parse_args(argv)
    from cfseg.module import load_checkpoint

    try:
        module = load_checkpoint(str(a.ckpt))
        if a.list_classes:
            for name in module.bank.classes:
                print(name)
            return 0
        if a.input is None or a.output is None:
            p.error("-i and -o are required unless --list-classes")
        resolve_classes(module, a.classes)  # unknown names fail before any work
        if a.device == "cuda" and not torch.cuda.is_available():
            raise SegmentError("--device cuda: no CUDA device is available here")
        files = _inputs(a.input)
        for f in files:
            if not (f.is_file() and _is_nifti(f)):
                raise SegmentError(f"{f}: not a NIfTI file (expected .nii or .nii.gz)" if f.exists()
                                   else f"{f}: file not found")
        from tqdm import tqdm

        a.output.mkdir(parents=True, exist_ok=True)
        for f in tqdm(files, desc="segmenting", unit="case", disable=len(files) == 1):
            dest = a.output if len(files) == 1 else a.output / _case_name(f)
            _write_case(f, dest, module, a)
    except (SegmentError, ValueError, FileNotFoundError) as e:
        print(f"cfseg-segment: error: {e}", file=sys.stderr)
        return 2
    return 0


def _write_case(f: Path, dest: Path, module, a) -> None:
    """Segment one file and move its outputs into ``dest`` only when all of them are written."""
    images = segment(f, module, a.classes, a.multilabel, a.similarity, a.box, a.device, a.modality)
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest, prefix=".cfseg-tmp-") as tmp:
        written = []
        for name, img in images.items():
            path = Path(tmp) / f"{name}.nii.gz"
            nib.save(img, str(path))
            written.append(path)
        if a.multilabel:
            path = Path(tmp) / "labels.json"
            path.write_text(json.dumps(labels_json(module, a.classes), indent=2))
            written.append(path)
        for path in written:
            shutil.move(str(path), dest / path.name)


if __name__ == "__main__":
    sys.exit(main())
