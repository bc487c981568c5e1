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
#: Such an input is segmented without a full-size float copy of it or of the class probabilities: it is resampled
#: onto the network grid block by block (:func:`resample_in_blocks`) and the prediction comes back in slabs of
#: about :data:`SLAB_VOXELS` values (:func:`labels_to_input_grid`; :func:`cfseg.segmentation.segment`, Memory).
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


#: voxels of the output grid resampled at once (one slab): bounds the temporaries of large images
SLAB_VOXELS = 2**22


def _slab_width(dst_shape: Sequence[int], budget: int = SLAB_VOXELS) -> int:
    """Slices along the first axis per slab so that a slab holds about ``budget`` voxels (at least one slice)."""
    return max(1, budget // max(1, int(dst_shape[1]) * int(dst_shape[2])))


def _dst_to_src(src_affine: np.ndarray, dst_affine: np.ndarray) -> np.ndarray:
    """[4, 4] map from destination voxel indices to source voxel indices."""
    return np.linalg.inv(np.asarray(src_affine, np.float64)) @ np.asarray(dst_affine, np.float64)


def _slab_grid(M: np.ndarray, x0: int, x1: int, ny: int, nz: int, n_src: Sequence[int],
               offset: Sequence[int] = (0, 0, 0)) -> torch.Tensor:
    """grid_sample's grid [1, x1-x0, ny, nz, 3] of destination slab ``x0:x1`` in a source block of shape ``n_src``
    that starts at source index ``offset`` (normalised, align_corners=False)."""
    n = np.asarray(n_src, np.float64)
    A = M[:3, :3] * (2 / n)[:, None]  # dst voxel index -> src normalised coordinate
    b = (2 * (M[:3, 3] - np.asarray(offset, np.float64)) + 1) / n - 1
    xs = torch.arange(x0, x1, dtype=torch.float64)
    ys, zs = (torch.arange(k, dtype=torch.float64) for k in (ny, nz))
    grid = torch.empty(1, x1 - x0, ny, nz, 3)
    for k in range(3):  # separable: one broadcast sum per src axis; last dim (z, y, x): grid_sample's (W, H, D)
        grid[0, ..., 2 - k] = ((A[k, 0] * xs + b[k]).float()[:, None, None] + (A[k, 1] * ys).float()[:, None]
                               + (A[k, 2] * zs).float())
    return grid


def _resampled_slabs(src: np.ndarray, src_affine: np.ndarray, dst_shape: Sequence[int], dst_affine: np.ndarray,
                     order: int, cval: float | Sequence[float] = 0.0, slab: int | None = None):
    """Yield ``(x0, x1, values [C, x1-x0, *dst_shape[1:]] float32)``: ``src`` [C, *S] resampled onto the
    destination grid, ``slab`` slices along its first axis at a time (default: about :data:`SLAB_VOXELS` values
    per slab; see :func:`_resample_to`)."""
    import torch.nn.functional as F

    if order not in (0, 1):
        raise ValueError(f"order must be 0 (nearest) or 1 (linear), got {order!r}")
    C = src.shape[0]
    fill = np.broadcast_to(np.asarray(cval, np.float32), (C,)).reshape(C, 1, 1, 1)
    M = _dst_to_src(src_affine, dst_affine)
    # grid_sample pads with 0: channels filled otherwise are shifted by their fill (a copy of those channels only;
    # the others, e.g. every class but the background of a probability map, are read in place)
    groups = []
    for idx in (np.flatnonzero(fill.ravel() != 0), np.flatnonzero(fill.ravel() == 0)):
        if idx.size:
            part = src[idx[0]:idx[-1] + 1] if (np.diff(idx) == 1).all() else src[idx]
            vol = np.ascontiguousarray(part, dtype=np.float32)
            groups.append((idx, torch.from_numpy(vol - fill[idx] if fill[idx[0]].item() else vol)[None]))
    nx, ny, nz = (int(n) for n in dst_shape)
    slab = slab or _slab_width(dst_shape, SLAB_VOXELS // max(1, C))
    for x0 in range(0, nx, slab):
        x1 = min(x0 + slab, nx)
        grid = _slab_grid(M, x0, x1, ny, nz, src.shape[1:])
        out = np.empty((C, x1 - x0, ny, nz), np.float32)
        for idx, vol in groups:
            res = F.grid_sample(vol, grid, mode="bilinear" if order else "nearest", padding_mode="zeros",
                                align_corners=False)
            out[idx] = res[0].numpy() + fill[idx]
        yield x0, x1, out


def _resample_to(src: np.ndarray, src_affine: np.ndarray, dst_shape: Sequence[int], dst_affine: np.ndarray,
                 order: int, cval: float | Sequence[float] = 0.0, slab: int | None = None) -> np.ndarray:
    """Resample ``src`` [C, *S] (world-aligned by ``src_affine``) onto a voxel grid, slab by slab.

    Trilinear (``order=1``) or nearest (``order=0``) by ``torch.nn.functional.grid_sample``, all channels at
    once. ``cval`` (a scalar or one value per channel) is what lies outside ``src``: a dst voxel within one
    voxel of the edge blends towards it.

    Returns [C, *dst_shape] float32.
    """
    out = np.empty((src.shape[0], *dst_shape), np.float32)
    for x0, x1, values in _resampled_slabs(src, src_affine, dst_shape, dst_affine, order, cval, slab):
        out[:, x0:x1] = values
    return out


def network_grid(shape: Sequence[int], affine: np.ndarray, spacing: Sequence[float],
                 orientation: str = "RAS") -> tuple[tuple[int, int, int], np.ndarray]:
    """The grid MONAI's ``Orientation`` + ``Spacing`` give an image of ``shape`` and ``affine``: (shape, [4, 4]
    affine), from the header alone (the transforms run lazily on a placeholder that holds no voxels)."""
    from monai.data import MetaTensor
    from monai.transforms import Orientation, Spacing

    placeholder = MetaTensor(torch.zeros(1, 1, 1, 1).expand(1, *(int(s) for s in shape)),
                             affine=torch.as_tensor(np.asarray(affine), dtype=torch.float64))
    out = Orientation(axcodes=orientation, labels=(("L", "R"), ("P", "A"), ("I", "S")), lazy=True)(placeholder)
    out = Spacing(pixdim=tuple(float(s) for s in spacing), mode="bilinear", lazy=True)(out)
    grid = tuple(int(s) for s in out.peek_pending_shape())
    return grid, np.asarray(out.peek_pending_affine(), dtype=np.float64)  # type: ignore[return-value]


def _source_box(M: np.ndarray, x0: int, x1: int, ny: int, nz: int,
                n_src: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(lo, hi)``: the block of source indices that destination slab ``x0:x1`` interpolates from (its corners'
    bounding box, one voxel of margin each side), clipped to the source grid of shape ``n_src`` and never empty
    (unclipped when ``n_src`` is None)."""
    corners = np.array([[x, y, z, 1.0] for x in (x0, x1 - 1) for y in (0, ny - 1) for z in (0, nz - 1)])
    src = (M @ corners.T)[:3]  # the slab is a parallelepiped in source index space: its corners bound it
    lo, hi = np.floor(src.min(1)).astype(np.int64) - 1, np.ceil(src.max(1)).astype(np.int64) + 2
    if n_src is None:
        return lo, hi
    lo = np.clip(lo, 0, n_src - 1)
    return lo, np.clip(hi, lo + 1, n_src)


def _block_width(M: np.ndarray, dst_shape: Sequence[int], n_src: np.ndarray, budget: int) -> int:
    """Destination slices per slab such that the slab holds at most ``budget`` voxels and so does the source block
    it reads (at least one slice)."""
    nx, ny, nz = (int(n) for n in dst_shape)
    lo_w, hi_w = 1, max(1, min(nx, _slab_width(dst_shape, budget)))
    while lo_w < hi_w:  # the largest width whose source box (unclipped: the same size anywhere) fits
        w = (lo_w + hi_w + 1) // 2
        lo, hi = _source_box(M, 0, w, ny, nz)
        if int(np.prod(np.minimum(hi - lo + 1, n_src))) <= budget:  # +1: floor/ceil shift with the position
            lo_w = w
        else:
            hi_w = w - 1
    return lo_w


def resample_in_blocks(data: np.ndarray, affine: np.ndarray, dst_shape: Sequence[int], dst_affine: np.ndarray,
                       budget: int = SLAB_VOXELS) -> np.ndarray:
    """``data`` [*S] (any real dtype, e.g. a memory map or an int16 array) resampled trilinearly onto the
    destination grid, as MONAI's ``Spacing`` does (align_corners=False, border padding), one destination slab at
    a time, each from the block of ``data`` it needs (converted to float32 alone): a slab and its source block hold
    at most ``budget`` voxels each (unless one destination slice alone needs more).

    Returns float32 [*dst_shape].
    """
    import torch.nn.functional as F

    M = _dst_to_src(affine, dst_affine)
    nx, ny, nz = (int(n) for n in dst_shape)
    n_src = np.asarray(data.shape[:3], np.int64)
    out = np.empty((nx, ny, nz), np.float32)
    step = _block_width(M, dst_shape, n_src, budget)
    for x0 in range(0, nx, step):
        x1 = min(x0 + step, nx)
        lo, hi = _source_box(M, x0, x1, ny, nz, n_src)
        block = torch.from_numpy(np.ascontiguousarray(data[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]],
                                                      dtype=np.float32))[None, None]
        res = F.grid_sample(block, _slab_grid(M, x0, x1, ny, nz, block.shape[2:], lo), mode="bilinear",
                            padding_mode="border", align_corners=False)
        out[x0:x1] = res[0, 0].numpy()
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
        uint8 [*dst_shape]; the probabilities are resampled and reduced one slab of about
        :data:`SLAB_VOXELS` / (K'+1) voxels at a time.
    """
    mapping = _grid_map(net_affine, labels.shape, dst_affine)
    if mapping is not None:
        return _take_grid(labels, mapping, dst_shape, fill=0)
    if probs is None:
        raise ValueError("the network grid does not align with the input grid: probabilities are needed to "
                         "resample the prediction (predict with probabilities=True)")
    cval = [1.0] + [0.0] * (probs.shape[0] - 1)
    values = np.asarray(class_values, dtype=np.uint8)
    out = np.empty(tuple(int(n) for n in dst_shape), np.uint8)
    for x0, x1, resampled in _resampled_slabs(probs, net_affine, dst_shape, dst_affine, 1, cval):
        out[x0:x1] = values[resampled.argmax(0)]
    return out
