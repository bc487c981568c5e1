"""Deterministic synthetic abdomen phantoms (:func:`generate_phantom`), for the demo and the tests.

They are small (64^3 voxels by default), fast to make and reproducible from a seed, yet not solvable by intensity
alone:

* a body outline (subcutaneous fat, muscle wall, visceral fat and bowel loops), a spine with discs and a
  spinal canal, paraspinal and psoas muscles: unlabelled structures that look like organs;
* eight labelled organs (:data:`ORGANS`), each an ellipsoid warped by a smooth displacement field, bent and
  bumped by a few random low-frequency terms, with random scale (about +-15 %), position jitter and small
  rotations per case;
* left and right kidney share one intensity distribution (cortex and medulla) and differ only by position;
  liver and spleen share intensity ranges on CT; pancreas looks like the surrounding soft tissue;
* a CT-like modality in Hounsfield units and an MRI-like (T2-weighted-like) one with other organ contrasts,
  a multiplicative bias field and Rician noise; a "scanner" (intensity calibration, noise, blur, bias field)
  per call.

Coordinates: :func:`generate_phantom` returns arrays in RAS+ voxel order (nibabel's convention): the first
axis increases towards the patient's Right, the second towards Anterior, the third towards Superior. The
liver therefore lies at HIGH first-axis indices. Sites and datasets on disk: :mod:`cfseg.data.synthetic`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
from scipy import ndimage

__all__ = ["MODALITIES", "ORGANS", "check_shape", "generate_phantom"]

#: Canonical organ name -> label value in every phantom label map (and every dataset written from them).
ORGANS: dict[str, int] = {
    "liver": 1,
    "spleen": 2,
    "kidney_left": 3,
    "kidney_right": 4,
    "pancreas": 5,
    "stomach": 6,
    "gallbladder": 7,
    "aorta": 8,
}

MODALITIES: tuple[str, ...] = ("ct", "mri")
_MIN_SHAPE = 16
_MIN_ORGAN_VOXELS = 4
_MAX_ATTEMPTS = 20


# ----------------------------------------------------------------------------------------------------------
# Tissues (internal; only organs are labelled)
# ----------------------------------------------------------------------------------------------------------
(
    _AIR,
    _SUBCUT_FAT,
    _MUSCLE,
    _VISCERAL_FAT,
    _BOWEL,
    _BONE_CORTEX,
    _BONE_MARROW,
    _DISC,
    _CANAL,
    _LIVER,
    _SPLEEN,
    _KIDNEY_CORTEX,
    _KIDNEY_MEDULLA,
    _PANCREAS,
    _STOMACH_WALL,
    _STOMACH_CONTENT,
    _STOMACH_GAS,
    _GALLBLADDER,
    _AORTA,
) = range(19)
_N_TISSUES = 19

# (mean, per-case jitter sd, texture amplitude) per tissue. CT in HU.
_CT_TABLE: dict[int, tuple[float, float, float]] = {
    _AIR: (-1000.0, 0.0, 3.0),
    _SUBCUT_FAT: (-100.0, 5.0, 12.0),
    _MUSCLE: (50.0, 4.0, 10.0),
    _VISCERAL_FAT: (-90.0, 5.0, 15.0),
    _BOWEL: (35.0, 6.0, 18.0),
    _BONE_CORTEX: (850.0, 60.0, 80.0),
    _BONE_MARROW: (260.0, 30.0, 50.0),
    _DISC: (90.0, 8.0, 10.0),
    _CANAL: (15.0, 3.0, 5.0),
    _LIVER: (60.0, 0.0, 9.0),  # mean drawn from U(55, 65)
    _SPLEEN: (52.0, 0.0, 9.0),  # mean drawn from U(45, 60)
    _KIDNEY_CORTEX: (165.0, 10.0, 10.0),
    _KIDNEY_MEDULLA: (120.0, 10.0, 10.0),
    _PANCREAS: (45.0, 4.0, 14.0),
    _STOMACH_WALL: (55.0, 5.0, 8.0),
    _STOMACH_CONTENT: (15.0, 5.0, 8.0),
    _STOMACH_GAS: (-900.0, 30.0, 20.0),
    _GALLBLADDER: (10.0, 3.0, 5.0),
    _AORTA: (170.0, 15.0, 8.0),
}

# T2-weighted-like contrasts in arbitrary positive units: fluid and fat bright, bone and flowing blood dark,
# kidneys bright, spleen brighter than liver.
_MRI_TABLE: dict[int, tuple[float, float, float]] = {
    _AIR: (0.0, 0.0, 0.0),
    _SUBCUT_FAT: (800.0, 40.0, 40.0),
    _MUSCLE: (180.0, 15.0, 15.0),
    _VISCERAL_FAT: (750.0, 40.0, 50.0),
    _BOWEL: (400.0, 40.0, 60.0),
    _BONE_CORTEX: (25.0, 5.0, 8.0),
    _BONE_MARROW: (450.0, 40.0, 40.0),
    _DISC: (700.0, 40.0, 30.0),
    _CANAL: (1000.0, 50.0, 30.0),
    _LIVER: (260.0, 20.0, 15.0),
    _SPLEEN: (520.0, 30.0, 25.0),
    _KIDNEY_CORTEX: (600.0, 30.0, 30.0),
    _KIDNEY_MEDULLA: (760.0, 30.0, 30.0),
    _PANCREAS: (330.0, 25.0, 30.0),
    _STOMACH_WALL: (300.0, 25.0, 20.0),
    _STOMACH_CONTENT: (950.0, 50.0, 30.0),
    _STOMACH_GAS: (5.0, 2.0, 2.0),
    _GALLBLADDER: (1100.0, 50.0, 25.0),
    _AORTA: (60.0, 15.0, 15.0),
}

_DEFAULT_NOISE = {"ct": 12.0, "mri": 20.0}
_DEFAULT_BIAS = {"ct": 0.0, "mri": 0.3}


# ----------------------------------------------------------------------------------------------------------
# Organ templates (normalised body coordinates in [-1, 1]; +x patient right, +y anterior, +z superior)
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Blob:
    """One warped ellipsoid: centre, semi-axes, base rotation (deg about x, y, z), bend, bump amplitude."""

    center: tuple[float, float, float]
    semi: tuple[float, float, float]
    rot: tuple[float, float, float] = (0.0, 0.0, 0.0)
    rot_jitter: float = 8.0
    bend: tuple[int, int, float] | None = None  # q[a] -= k * q[b]**2 in the blob's local frame
    bumps: float = 0.08
    scale_jitter: float = 0.15
    pos_jitter: float = 0.06

    def mirrored(self) -> _Blob:
        """The same blob mirrored through the sagittal midplane (x -> -x)."""
        cx, cy, cz = self.center
        rx, ry, rz = self.rot
        # With M = diag(-1, 1, 1): R' = M R M has angles (rx, -ry, -rz) and the local x axis flips sign, so a
        # bend that displaces local x changes sign.
        bend = self.bend
        if bend is not None and bend[0] == 0:
            bend = (bend[0], bend[1], -bend[2])
        return replace(self, center=(-cx, cy, cz), rot=(rx, -ry, -rz), bend=bend)


_KIDNEY_LEFT = _Blob(center=(-0.35, -0.29, -0.10), semi=(0.14, 0.11, 0.28), rot=(0.0, -12.0, 10.0),
                     bend=(0, 2, 0.35), bumps=0.05)
_ORGAN_BLOBS: dict[str, tuple[_Blob, ...]] = {
    "aorta": (_Blob(center=(-0.08, -0.21, 0.0), semi=(0.065, 0.065, 4.0), rot_jitter=1.5, bumps=0.03,
                    scale_jitter=0.1, pos_jitter=0.03),),
    "kidney_left": (_KIDNEY_LEFT,),
    "kidney_right": (replace(_KIDNEY_LEFT.mirrored(), center=(0.35, -0.29, -0.18)),),
    "gallbladder": (_Blob(center=(0.22, 0.22, -0.02), semi=(0.085, 0.075, 0.14), rot=(20.0, 0.0, 0.0)),),
    "pancreas": (_Blob(center=(-0.04, -0.06, 0.0), semi=(0.32, 0.075, 0.085), rot=(0.0, 10.0, 15.0),
                       bend=(1, 0, -1.2), bumps=0.1),),
    "stomach": (_Blob(center=(-0.33, 0.20, 0.32), semi=(0.20, 0.16, 0.24), rot=(0.0, 0.0, 20.0),
                      bend=(0, 2, 0.4)),),
    "spleen": (_Blob(center=(-0.55, -0.22, 0.35), semi=(0.14, 0.24, 0.22), rot=(0.0, 0.0, -30.0),
                     bend=(0, 1, 0.5)),),
    "liver": (
        _Blob(center=(0.40, 0.03, 0.32), semi=(0.36, 0.42, 0.40), bumps=0.07),
        _Blob(center=(0.02, 0.24, 0.45), semi=(0.24, 0.13, 0.15), rot=(0.0, 0.0, -10.0), bumps=0.06),
    ),
}
# Painting order: an organ never takes voxels of an organ painted before it.
_PAINT_ORDER: tuple[str, ...] = (
    "aorta", "kidney_left", "kidney_right", "gallbladder", "pancreas", "stomach", "spleen", "liver",
)
_ORGAN_TISSUE = {
    "aorta": _AORTA, "kidney_left": _KIDNEY_CORTEX, "kidney_right": _KIDNEY_CORTEX,
    "gallbladder": _GALLBLADDER, "pancreas": _PANCREAS, "stomach": _STOMACH_CONTENT, "spleen": _SPLEEN,
    "liver": _LIVER,
}
assert set(_PAINT_ORDER) == set(ORGANS) == set(_ORGAN_BLOBS)


def check_shape(shape: Sequence[int]) -> tuple[int, int, int]:
    """``shape`` as three integers, each at least 16 (a phantom's smallest side)."""
    try:
        out = tuple(int(s) for s in shape)
    except (TypeError, ValueError):
        raise ValueError(f"shape must be three integers, got {shape!r}.") from None
    if len(out) != 3 or min(out) < _MIN_SHAPE:
        raise ValueError(f"shape must be three integers >= {_MIN_SHAPE}, got {shape!r}; e.g. (64, 64, 64).")
    return out  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------------------------
# Phantom generation
# ----------------------------------------------------------------------------------------------------------
def _rotation(deg: Sequence[float]) -> np.ndarray:
    """Rotation matrix Rz @ Ry @ Rx for angles in degrees about x, y, z. Returns (3, 3)."""
    ax, ay, az = np.deg2rad(np.asarray(deg, dtype=np.float64))
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _random_directions(rng: np.random.Generator, n: int, lo: float, hi: float) -> np.ndarray:
    """n random vectors with random direction and norm in [lo, hi]. Returns (n, 3)."""
    v = rng.normal(size=(n, 3))
    v /= np.linalg.norm(v, axis=1, keepdims=True) + 1e-12
    return v * rng.uniform(lo, hi, size=(n, 1))


def _sinusoid_field(rng: np.random.Generator, p: np.ndarray, n_terms: int, amp: float, lo: float,
                    hi: float) -> np.ndarray:
    """Smooth random scalar field sum_k a_k sin(w_k . p + phi_k).

    Args:
        rng: Random generator.
        p: Points, shape (3, *S).
        n_terms: Number of sinusoids.
        amp: Maximum amplitude of each term.
        lo, hi: Range of the angular frequencies' norms.

    Returns:
        Field of shape S (float32).
    """
    w = _random_directions(rng, n_terms, lo, hi).astype(np.float32)
    a = rng.uniform(-amp, amp, size=n_terms).astype(np.float32)
    phi = rng.uniform(0, 2 * np.pi, size=n_terms).astype(np.float32)
    out = np.zeros(p.shape[1:], dtype=np.float32)
    for k in range(n_terms):
        out += a[k] * np.sin(_dot(w[k], p) + phi[k])
    return out


def _grid(shape: tuple[int, int, int]) -> np.ndarray:
    """Voxel centres in normalised coordinates (-1, 1) per axis. Returns (3, X, Y, Z) float32."""
    axes = [((np.arange(n, dtype=np.float32) + 0.5) / n) * 2 - 1 for n in shape]
    return np.stack(np.meshgrid(*axes, indexing="ij"))


def _dot(w: np.ndarray, p: np.ndarray) -> np.ndarray:
    """w . p for w of shape (3,) and points p of shape (3, *S). Returns S (float32)."""
    w = w.astype(np.float32)
    return w[0] * p[0] + w[1] * p[1] + w[2] * p[2]


def _matvec(m: np.ndarray, p: np.ndarray) -> np.ndarray:
    """m @ p for m of shape (3, 3) and points p of shape (3, *S). Returns (3, *S) float32."""
    return np.stack([_dot(row, p) for row in m])


def _blob_field(rng: np.random.Generator, p: np.ndarray, blob: _Blob, min_semi: np.ndarray
                ) -> tuple[tuple[slice, ...], np.ndarray, np.ndarray]:
    """Sample one random instance of ``blob`` and evaluate its normalised radius near it.

    Args:
        rng: Random generator (consumed in a fixed order).
        p: Warped body coordinates, shape (3, X, Y, Z).
        blob: Template.
        min_semi: Smallest allowed semi-axis per axis in normalised units (about one voxel), shape (3,).

    Returns:
        ``box``: slices of the voxel box that contains the blob; ``r`` of the box's shape: < 1 inside the
        blob, 0 at its centre; ``q``: local coordinates in units of the semi-axes, shape (3, *box shape).
    """
    center = np.asarray(blob.center) + rng.uniform(-blob.pos_jitter, blob.pos_jitter, size=3)
    scale = 1.0 + rng.uniform(-blob.scale_jitter, blob.scale_jitter, size=3)
    semi = np.maximum(np.asarray(blob.semi) * scale, min_semi)
    rot = _rotation(np.asarray(blob.rot) + rng.uniform(-blob.rot_jitter, blob.rot_jitter, size=3))
    w = _random_directions(rng, 3, 1.5, 3.5)
    a = rng.uniform(-blob.bumps, blob.bumps, size=3)
    phi = rng.uniform(0, 2 * np.pi, size=3)
    bend_k = 0.0 if blob.bend is None else blob.bend[2] * rng.uniform(0.7, 1.3)

    # Inside means |q| < 1 + sum|a| before bending; unbent |q| exceeds that by at most |k| (1 + sum|a|)^2, and
    # |p - c| <= max(semi) |unbent q|. The voxels within that distance (per axis) form the box.
    reach = 1.0 + np.abs(a).sum()
    radius = semi.max() * (reach + abs(bend_k) * reach**2) + 1e-3
    near = np.ones(p.shape[1:], dtype=bool)
    for c in range(3):
        near &= np.abs(p[c] - np.float32(center[c])) <= radius
    box = tuple(_extent(near, ax) for ax in range(3))
    pc = p[(slice(None), *box)]

    d = pc - center.astype(np.float32)[:, None, None, None]
    q = _matvec(rot.T / semi[:, None], d)  # R^T (p - c) / semi
    if blob.bend is not None:
        ia, ib, _ = blob.bend
        q[ia] -= np.float32(bend_k) * q[ib] ** 2
    rho = np.sqrt(np.sum(q * q, axis=0))
    u = q / np.maximum(rho, np.float32(1e-6))
    thresh = np.ones_like(rho)
    for k in range(3):
        thresh += np.float32(a[k]) * np.cos(_dot(w[k], u) + np.float32(phi[k]))
    return box, rho / thresh, q


def _extent(mask: np.ndarray, axis: int) -> slice:
    """Slice of the indices along ``axis`` where ``mask`` has any True (empty slice if none)."""
    other = tuple(i for i in range(mask.ndim) if i != axis)
    idx = np.flatnonzero(mask.any(axis=other))
    return slice(int(idx[0]), int(idx[-1]) + 1) if idx.size else slice(0, 0)


def _sample_anatomy(rng: np.random.Generator, shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """One random anatomy. Returns tissue map (X, Y, Z) uint8 and organ label map (X, Y, Z) uint8."""
    grid = _grid(shape)
    n = np.asarray(shape, dtype=np.float64)

    # Whole-body pose and size: small rotation about z, shift, scale.
    body_scale = 1.0 + rng.uniform(-0.06, 0.06, size=3)
    body_shift = np.array([*rng.uniform(-0.03, 0.03, size=2), rng.uniform(-0.05, 0.05)])
    body_rot = _rotation((0.0, 0.0, rng.uniform(-5.0, 5.0)))
    m = (body_rot.T / body_scale[:, None]).astype(np.float32)
    p = _matvec(m, grid - body_shift.astype(np.float32)[:, None, None, None])
    # Smooth global deformation.
    for c in range(3):
        p[c] += _sinusoid_field(rng, p, n_terms=3, amp=0.03, lo=1.0, hi=3.0)
    x, y, z = p
    # One voxel in normalised units (after body scaling), the smallest semi-axis we allow.
    min_semi = 1.3 * 2.0 / (n * body_scale)

    tissue = np.full(shape, _AIR, dtype=np.uint8)
    label = np.zeros(shape, dtype=np.uint8)

    # Body outline: elliptic cylinder, slightly varying along z; fat layer, muscle wall, interior.
    ax, ay = 0.86 * rng.uniform(0.95, 1.05), 0.64 * rng.uniform(0.93, 1.07)
    wobble = 1.0 + 0.04 * np.sin(np.float32(np.pi) * z + np.float32(rng.uniform(0, 2 * np.pi)))
    body_r = np.sqrt((x / ax) ** 2 + (y / ay) ** 2) / wobble
    fat = rng.uniform(0.05, 0.13)
    wall = rng.uniform(0.05, 0.08)
    body = body_r < 1.0
    tissue[body] = _SUBCUT_FAT
    tissue[body_r < 1.0 - fat] = _MUSCLE
    interior = body_r < 1.0 - fat - wall

    # Spine: vertebral body (cortex, marrow, discs), canal, posterior arch and spinous process.
    occupied = np.zeros(shape, dtype=bool)
    vb_c = np.array([0.0, -0.40]) + rng.uniform(-0.02, 0.02, size=2)
    vb_r = 0.10 * rng.uniform(0.9, 1.1)
    r_vb = np.sqrt((x - vb_c[0]) ** 2 + (y - vb_c[1]) ** 2)
    canal_c = vb_c + np.array([0.0, -0.15])
    r_canal = np.sqrt((x - canal_c[0]) ** 2 + (y - canal_c[1]) ** 2)
    spinous = (np.abs(x - vb_c[0]) < 0.03) & (y < canal_c[1] - 0.04) & (y > canal_c[1] - 0.17)
    arch = (r_canal < 0.08) | spinous
    # Paraspinal muscles and psoas.
    para = np.zeros(shape, dtype=bool)
    for side in (-1.0, 1.0):
        para |= ((x - side * 0.15) / 0.10) ** 2 + ((y - canal_c[1] + 0.01) / 0.085) ** 2 < 1.0
        psoas_r = 0.045 + 0.03 * np.clip(0.2 - z, 0.0, 1.0)
        para |= (x - side * 0.14) ** 2 + (y - vb_c[1] - 0.02) ** 2 < psoas_r**2
    para &= body_r < 1.0 - fat
    tissue[para] = _MUSCLE
    period = 0.17 * rng.uniform(0.9, 1.1)
    disc = np.mod(z / period + rng.uniform(0, 1), 1.0) < 0.2
    vb = r_vb < vb_r
    tissue[arch] = _BONE_CORTEX
    tissue[r_canal < 0.045] = _CANAL
    tissue[vb] = _BONE_CORTEX
    tissue[vb & (r_vb < 0.75 * vb_r)] = _BONE_MARROW
    tissue[vb & disc] = _DISC
    occupied |= vb | arch | para

    # Organs, in painting order.
    region = interior & ~occupied
    medulla = rng.uniform(0.5, 0.6)  # the same for both kidneys: they must look alike
    for name in _PAINT_ORDER:
        mask = np.zeros(shape, dtype=bool)
        inner = np.full(shape, np.inf, dtype=np.float32)  # normalised radius in the first blob
        q_front = np.zeros(shape, dtype=np.float32)  # its local anterior coordinate
        for j, blob in enumerate(_ORGAN_BLOBS[name]):
            box, r, q = _blob_field(rng, p, blob, min_semi)
            mask[box] |= r < 1.0
            if j == 0:
                inner[box], q_front[box] = r, q[1]
        mask &= region
        value = ORGANS[name]
        label[mask] = value
        tissue[mask] = _ORGAN_TISSUE[name]
        if name.startswith("kidney"):
            tissue[mask & (inner < medulla)] = _KIDNEY_MEDULLA
        elif name == "stomach":
            tissue[mask & (inner > rng.uniform(0.78, 0.85))] = _STOMACH_WALL
            if rng.uniform() < 0.7:  # an anterior gas bubble
                gas = mask & (inner < 0.8) & (q_front > rng.uniform(0.3, 0.55))
                tissue[gas] = _STOMACH_GAS
        region &= ~mask

    # Remaining interior: bowel loops in visceral fat, split by a smooth random field.
    rest = region
    loops = _sinusoid_field(rng, p, n_terms=12, amp=1.0, lo=6.0, hi=12.0)
    fat_fraction = rng.uniform(0.3, 0.6)
    thr = np.quantile(loops[rest], fat_fraction) if rest.any() else 0.0
    tissue[rest & (loops < thr)] = _VISCERAL_FAT
    tissue[rest & (loops >= thr)] = _BOWEL
    return tissue, label


def _texture(rng: np.random.Generator, shape: tuple[int, int, int]) -> np.ndarray:
    """Unit-variance texture: a mix of fine and coarse smoothed white noise. Returns (X, Y, Z) float32."""
    out = np.zeros(shape, dtype=np.float32)
    for sigma, weight in ((0.8, 0.6), (2.5, 0.8)):
        f = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma, truncate=3.0)
        out += np.float32(weight) * f / (f.std() + 1e-8)
    return out / np.float32(np.hypot(0.6, 0.8))


def _lookup(rng: np.random.Generator, table: dict[int, tuple[float, float, float]], modality: str
            ) -> tuple[np.ndarray, np.ndarray]:
    """Per-case tissue means and texture amplitudes. Returns two (n_tissues,) float32 arrays."""
    mean = np.zeros(_N_TISSUES, dtype=np.float32)
    amp = np.zeros(_N_TISSUES, dtype=np.float32)
    for t in range(_N_TISSUES):
        mu, jitter, a = table[t]
        mean[t] = mu + jitter * rng.standard_normal()
        amp[t] = a
    if modality == "ct":
        # Liver and spleen share an intensity range on purpose.
        mean[_LIVER] = rng.uniform(55.0, 65.0)
        mean[_SPLEEN] = rng.uniform(45.0, 60.0)
    return mean, amp


def generate_phantom(
    rng: np.random.Generator,
    modality: str = "ct",
    shape: Sequence[int] = (64, 64, 64),
    *,
    intensity_offset: float = 0.0,
    intensity_scale: float = 1.0,
    noise_std: float | None = None,
    bias_strength: float | None = None,
    blur_sigma: float = 0.6,
) -> tuple[np.ndarray, np.ndarray]:
    """One random abdomen phantom, fully annotated.

    Args:
        rng: Random generator; the same generator state gives the same phantom.
        modality: ``"ct"`` (Hounsfield units) or ``"mri"`` (T2-weighted-like, arbitrary positive units).
        shape: Volume shape (x, y, z), each >= 16. The anatomy always fills the field of view.
        intensity_offset: Added after scaling (scanner calibration).
        intensity_scale: Multiplies the intensities (scanner calibration / gain).
        noise_std: Acquisition noise sd (Gaussian for CT, Rician for MRI); None: CT 12 HU, MRI 20.
        bias_strength: Log-amplitude of a smooth multiplicative bias field; None: CT 0, MRI 0.3.
        blur_sigma: Gaussian point spread in voxels (partial volume), >= 0.

    Returns:
        ``image`` of shape (X, Y, Z) float32 and ``label`` of shape (X, Y, Z) uint8 with :data:`ORGANS`
        values (0 background), both in RAS+ voxel order (first axis towards the patient's right).

    Raises:
        ValueError: On an unknown modality, a bad shape or negative noise / blur.
        RuntimeError: If no phantom with every organ present could be drawn (only for tiny shapes).
    """
    if modality not in MODALITIES:
        raise ValueError(f"modality {modality!r} is not one of {MODALITIES}.")
    shape = check_shape(shape)
    noise_std = _DEFAULT_NOISE[modality] if noise_std is None else float(noise_std)
    bias_strength = _DEFAULT_BIAS[modality] if bias_strength is None else float(bias_strength)
    if noise_std < 0 or blur_sigma < 0 or bias_strength < 0:
        raise ValueError(f"noise_std ({noise_std}), bias_strength ({bias_strength}) and blur_sigma "
                         f"({blur_sigma}) must be >= 0.")
    if not (np.isfinite(intensity_scale) and intensity_scale > 0):
        raise ValueError(f"intensity_scale must be a positive number, got {intensity_scale}.")

    for _ in range(_MAX_ATTEMPTS):
        tissue, label = _sample_anatomy(rng, shape)
        counts = np.bincount(label.ravel(), minlength=max(ORGANS.values()) + 1)
        if all(counts[v] >= _MIN_ORGAN_VOXELS for v in ORGANS.values()):
            break
    else:
        raise RuntimeError(f"could not draw a phantom with every organ present at shape {shape}; "
                           f"use a larger shape, e.g. (32, 32, 32).")

    table = _CT_TABLE if modality == "ct" else _MRI_TABLE
    mean, amp = _lookup(rng, table, modality)
    image = mean[tissue] + amp[tissue] * _texture(rng, shape)
    if blur_sigma > 0:
        image = ndimage.gaussian_filter(image, blur_sigma, truncate=3.0)

    if modality == "ct":
        image += np.float32(noise_std) * rng.standard_normal(shape, dtype=np.float32)
        image = image * np.float32(intensity_scale) + np.float32(intensity_offset)
    else:
        gain = rng.uniform(0.7, 1.3)
        if bias_strength > 0:
            g = _sinusoid_field(rng, _grid(shape), n_terms=4, amp=1.0, lo=0.5, hi=1.5)
            g /= g.std() + 1e-8
            image *= np.exp(np.float32(bias_strength) * g)
        image *= np.float32(gain)
        n1 = rng.standard_normal(shape, dtype=np.float32)
        n2 = rng.standard_normal(shape, dtype=np.float32)
        image = np.sqrt((image + np.float32(noise_std) * n1) ** 2 + (np.float32(noise_std) * n2) ** 2)
        image = np.maximum(image * np.float32(intensity_scale) + np.float32(intensity_offset), 0.0)
    return image.astype(np.float32, copy=False), label
