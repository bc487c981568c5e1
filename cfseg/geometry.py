"""Voxel-grid geometry for inference: sanity limits read from a NIfTI header, exact grid copies, resampling.

Limits are checked on the header alone, before any voxel is read or any grid is allocated:

* the affine must be finite and invertible;
* voxel spacing (the length of each affine column) must lie within :data:`SPACING_RANGE` mm;
* the input grid and the grid it is resampled to for the network (``shape * spacing / target spacing``, axes
  matched through the orientation) must each hold at most ``max_voxels`` voxels (default
  :data:`DEFAULT_MAX_VOXELS` = 2**28 = 512 x 512 x 1024);
* a NIfTI header must hold a qform or an sform (:func:`check_header`: with both codes 0 the orientation would be
  guessed) and a finite, non-zero ``pixdim`` on each spatial axis, whatever affine nibabel substitutes;
* each axis of the input grid needs at least :data:`MIN_AXIS_VOXELS` voxels, and each axis of the resampled grid
  at least the network's total stride (:func:`check_min_size`; never fewer than :data:`MIN_AXIS_VOXELS`): below
  that the deepest level of the network sees less than one voxel of the image and the output is noise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import nibabel as nib
import numpy as np
import torch

#: Largest input grid and largest resampled (network) grid accepted by default: 2**28 voxels (512 x 512 x 1024).
DEFAULT_MAX_VOXELS = 2**28
#: Accepted voxel spacing in mm, exclusive bounds.
SPACING_RANGE = (1e-3, 100.0)
#: Fewest voxels along any axis of an input grid, and of the grid it is resampled to (the network's total stride
#: raises the latter; :func:`check_min_size`).
MIN_AXIS_VOXELS = 4
_WORLD_AXIS = {"R": 0, "L": 0, "A": 1, "P": 1, "S": 2, "I": 2}


class GeometryError(ValueError):
    """An image header whose geometry cannot be used (bad affine, absurd spacing, too large)."""


def check_affine(affine: np.ndarray) -> np.ndarray:
    """Voxel spacing (mm per axis, shape [3]) of a finite, invertible affine with sane spacing.

    Raises:
        GeometryError: non-finite or singular affine, or a spacing outside :data:`SPACING_RANGE`.
    """
    a = np.asarray(affine, dtype=np.float64)
    if a.shape != (4, 4) or not np.isfinite(a).all():
        raise GeometryError("the affine has NaN/infinite entries (broken header: fix its sform/qform)")
    zooms = np.linalg.norm(a[:3, :3], axis=0)
    if not zooms.all() or abs(np.linalg.det(a[:3, :3])) <= 1e-12 * float(np.prod(zooms)):
        raise GeometryError(f"the affine is singular (voxel spacing {_fmt(zooms)} mm; broken header: fix its "
                            f"sform/qform)")
    lo, hi = SPACING_RANGE
    if not ((zooms > lo) & (zooms < hi)).all():
        raise GeometryError(f"voxel spacing {_fmt(zooms)} mm is outside ({lo:g}, {hi:g}) mm (a broken header or "
                            f"units other than mm)")
    return zooms


def check_header(header) -> None:
    """Refuse a NIfTI header whose geometry would be guessed (before any voxel is read).

    Checks the qform/sform codes (both 0: nibabel falls back to a diagonal affine from ``pixdim``, so the
    orientation is a guess) and ``pixdim[1:4]`` (0 or non-finite: nibabel substitutes 1 mm, or the sform says
    something the header itself contradicts). Headers that are not NIfTI (no ``qform_code``) pass.

    Raises:
        GeometryError: what is missing and how to fix it.
    """
    try:
        qcode, scode = int(header["qform_code"]), int(header["sform_code"])
        pixdim = np.asarray(header["pixdim"], np.float64)[1:4]
    except (KeyError, TypeError, ValueError, IndexError):
        return
    if qcode == 0 and scode == 0:
        raise GeometryError("the header has neither a qform nor an sform (qform_code and sform_code are 0): the "
                            "image's orientation in the body would be guessed; set its qform/sform (the scanner "
                            "geometry) before segmenting")
    if len(pixdim) == 3 and not (np.isfinite(pixdim) & (pixdim != 0)).all():
        raise GeometryError(f"the header's voxel size pixdim[1:4] is {_fmt(pixdim)} (a zero or non-finite spacing "
                            f"is a broken header, whatever affine is read from it; fix its pixdim)")


def check_min_size(shape: Sequence[int], min_voxels: int = MIN_AXIS_VOXELS, what: str = "the image",
                   why: str = "") -> None:
    """Refuse a grid with fewer than ``min_voxels`` voxels along some axis (too small for the network)."""
    if min(int(s) for s in shape) < min_voxels:
        raise GeometryError(f"{what} has {_fmt(shape, 'x')} voxels, fewer than {min_voxels} along an axis"
                            f"{why}: too small to segment")


def resampled_shape(shape: Sequence[int], affine: np.ndarray, spacing: Sequence[float],
                    orientation: str = "RAS") -> tuple[int, int, int]:
    """Approximate grid shape after reorienting to ``orientation`` and resampling to ``spacing`` (mm).

    Input axis ``i`` (spacing ``z_i``) becomes the output axis pointing along the same world axis, with about
    ``ceil(shape_i * z_i / spacing_j)`` voxels. Needs only the header (no voxel data).
    """
    zooms = np.linalg.norm(np.asarray(affine, np.float64)[:3, :3], axis=0)
    ornt = nib.io_orientation(affine)
    out = [1, 1, 1]
    for i in range(3):
        w = int(ornt[i, 0])
        j = next(k for k, c in enumerate(orientation.upper()) if _WORLD_AXIS[c] == w)
        out[j] = max(1, math.ceil(float(shape[i]) * float(zooms[i]) / float(spacing[j]) - 1e-6))
    return tuple(out)  # type: ignore[return-value]


def check_size(shape: Sequence[int], max_voxels: int, what: str = "the image") -> None:
    """Refuse a grid of more than ``max_voxels`` voxels (checked before anything is allocated)."""
    n = math.prod(int(s) for s in shape)
    if n > max_voxels:
        raise GeometryError(f"{what} has {_fmt(shape, 'x')} = {n:,} voxels, more than the limit {max_voxels:,} "
                            f"(raise it with --max-voxels / max_voxels= if this is intended)")


def nifti_image(array: np.ndarray, affine: np.ndarray) -> nib.Nifti1Image:
    """A NIfTI image of ``array`` whose sform and qform both hold ``affine`` (how every cfseg output is written)."""
    img = nib.Nifti1Image(array, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    return img


def _fmt(values, sep: str = " x ") -> str:
    return sep.join(f"{float(v):g}" for v in values)


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



def to_input_grid(values: np.ndarray, net_affine: np.ndarray, dst_shape: Sequence[int], dst_affine: np.ndarray,
                  fill: float | Sequence[float] = 0.0) -> np.ndarray:
    """Float maps [C, *S] on the network grid -> [C, *dst_shape] on the input's own grid.

    An exact copy when the grids align (the network grid is the input grid reoriented, cropped or padded),
    trilinear interpolation otherwise; ``fill`` (scalar or per channel) outside the network grid.
    """
    mapping = _grid_map(net_affine, values.shape[1:], dst_affine)
    if mapping is not None:
        return _take_grid(values, mapping, dst_shape, fill=fill)
    return _resample_to(values, net_affine, dst_shape, dst_affine, order=1, cval=fill)


def grids_align(net_affine: np.ndarray, dst_affine: np.ndarray) -> bool:
    """Whether a prediction on the network grid maps onto the input grid without interpolation (then
    :func:`labels_to_input_grid` copies labels and needs no probabilities)."""
    return _grid_map(net_affine, (1, 1, 1), dst_affine) is not None


def labels_to_input_grid(labels: np.ndarray, probs: np.ndarray | None, class_values: Sequence[int],
                         net_affine: np.ndarray, dst_shape: Sequence[int], dst_affine: np.ndarray) -> np.ndarray:
    """A prediction on the network grid -> a uint8 label map with the input's shape (the one geometry path of
    ``cfseg-segment`` and ``cfseg predict``).

    Args:
        labels: uint8 [*S] label values on the network grid (used when the grids align: an exact copy).
        probs: float [K'+1, *S] probabilities of background and the predicted classes (interpolated
            trilinearly, then argmax, when the grids do not align; background outside the network grid);
            may be None when :func:`grids_align`.
        class_values: the label value of each channel of ``probs`` (background 0 first).
        net_affine: [4, 4] affine of the network grid; ``dst_shape``, ``dst_affine``: the input's grid.

    Returns:
        uint8 [*dst_shape].
    """
    mapping = _grid_map(net_affine, labels.shape, dst_affine)
    if mapping is not None:
        return _take_grid(labels, mapping, dst_shape, fill=0)
    if probs is None:
        raise ValueError("the network grid does not align with the input grid: probabilities are needed to "
                         "resample the prediction (predict with probabilities=True)")
    cval = [1.0] + [0.0] * (probs.shape[0] - 1)
    resampled = _resample_to(probs, net_affine, dst_shape, dst_affine, order=1, cval=cval)
    return np.asarray(class_values, dtype=np.uint8)[resampled.argmax(0)]
