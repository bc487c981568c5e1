"""A simulated MR-like contrast of real CT anatomy: a deterministic, non-monotonic tissue-intensity mapping.

A domain-incremental step that a CT model must *learn* (not absorb through its window and instance norm)
needs the same organs in another contrast. With real labelled anatomy on CT only, the new contrast is
rendered from the CT: :class:`MRContrast` maps each voxel's HU through a piecewise-linear table that orders
tissues as a T1-weighted MR image does, then multiplies a smooth bias field and adds Rician noise:

* **tissue mapping** (``knots_hu`` -> ``knots_value``, linear between knots, constant outside): air dark;
  fat (-180..-60 HU) the brightest tissue; water and CSF (0..15 HU) dark; brain, cord and muscle (30..60 HU)
  intermediate with their order changed (cord and brainstem brighter than muscle); fatty marrow and cancellous
  bone (200..400 HU) bright; cortical bone and teeth (> 700 HU) dark. The mapping is not monotonic: fat is
  brighter than water although it has lower HU, and cortical bone, the brightest CT tissue, is among the
  darkest here, so no intensity window or normalisation of the CT model can undo it;
* **bias field**: ``exp(b(x))``, ``b`` a sum of ``bias_terms`` sinusoids of physical position (wavelengths
  ``bias_wavelength_mm``), amplitudes up to ``bias_log_amplitude`` in total, phases and directions seeded by
  the case, as a receive coil's smooth sensitivity gives;
* **Rician noise**: ``sqrt((s + n1)^2 + n2^2)`` with ``n1, n2 ~ N(0, noise_sd)``, the magnitude of a complex
  signal with Gaussian noise in both channels, as an MR magnitude image has (air becomes a Rayleigh floor).

Every random draw comes from a generator seeded with ``(seed, zlib.crc32(case_id))``: a case gets the same
image on every run and machine, and different cases get different bias fields and noise. Labels never change.
:data:`MR_LIKE` is the contrast of the OpenKBP real-anatomy domain protocol (``configs/openkbp/contrast.yaml``);
``benchmarks/openkbp/make_scanner_shift.py --shift mr_like`` writes the data with
:func:`cfseg.data.scanner_shift.write_shifted_dataset`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from cfseg.data.scanner_shift import case_rng, checked_volume

#: HU knots of the default mapping and the T1-weighted-like intensity (arbitrary units) at each.
_KNOTS_HU: tuple[float, ...] = (-1000.0, -400.0, -180.0, -100.0, -40.0, 0.0, 15.0, 35.0, 60.0, 120.0, 300.0,
                                700.0, 3000.0)
_KNOTS_VALUE: tuple[float, ...] = (0.0, 0.0, 650.0, 950.0, 560.0, 120.0, 200.0, 430.0, 330.0, 480.0, 700.0,
                                   110.0, 40.0)


@dataclass(frozen=True)
class MRContrast:
    """Parameters of a simulated MR-like rendering of CT images (see the module docstring).

    Attributes:
        knots_hu: increasing HU values of the piecewise-linear mapping's knots.
        knots_value: the rendered intensity at each knot (arbitrary positive units).
        bias_log_amplitude: bound on ``|b(x)|`` of the multiplicative bias field ``exp(b(x))`` (0: none).
        bias_terms: number of sinusoids in ``b``.
        bias_wavelength_mm: (shortest, longest) wavelength of the sinusoids, in mm.
        noise_sd: SD of the Gaussian noise in each of the two channels of the Rician noise (0: none).
        seed: fixed seed; each case's generator is seeded with ``(seed, crc32(case_id))``.
    """

    knots_hu: tuple[float, ...] = _KNOTS_HU
    knots_value: tuple[float, ...] = _KNOTS_VALUE
    bias_log_amplitude: float = 0.3
    bias_terms: int = 3
    bias_wavelength_mm: tuple[float, float] = (250.0, 500.0)
    noise_sd: float = 20.0
    seed: int = 0

    #: the written images' channel name in ``dataset.json`` (cfseg reads it as the dataset's modality)
    channel_name: ClassVar[str] = "MRI"
    #: bumped when :meth:`apply` changes, so an old rendered folder is not silently extended
    version: ClassVar[int] = 1
    #: the key under which ``dataset.json`` records the parameters
    metadata_key: ClassVar[str] = "mr_contrast"
    #: what :meth:`apply` does, in the order it does it (for ``dataset.json``'s description)
    steps: ClassVar[str] = ("HU mapped through a non-monotonic piecewise-linear tissue table, then a smooth "
                            "multiplicative bias field and Rician noise seeded per case")

    def __post_init__(self) -> None:
        hu, val = tuple(self.knots_hu), tuple(self.knots_value)
        if len(hu) < 2 or len(hu) != len(val):
            raise ValueError(f"MRContrast needs >= 2 knots and one value per knot, got {len(hu)} HU knots and "
                             f"{len(val)} values")
        if not all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in hu + val):
            raise ValueError("MRContrast knots and values must be finite numbers")
        if any(b <= a for a, b in zip(hu, hu[1:], strict=False)):
            raise ValueError(f"MRContrast.knots_hu must be strictly increasing, got {hu}")
        if min(val) < 0:
            raise ValueError(f"MRContrast.knots_value must be >= 0 (MR magnitudes), got {val}")
        for name in ("bias_log_amplitude", "noise_sd"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v < 0:
                raise ValueError(f"MRContrast.{name} must be a finite number >= 0, got {v!r}")
        if isinstance(self.bias_terms, bool) or not isinstance(self.bias_terms, int) or self.bias_terms < 1:
            raise ValueError(f"MRContrast.bias_terms must be a positive integer, got {self.bias_terms!r}")
        lo, hi = (float(w) for w in self.bias_wavelength_mm)
        if not (math.isfinite(lo) and math.isfinite(hi) and 0 < lo <= hi):
            raise ValueError(f"MRContrast.bias_wavelength_mm must be 0 < shortest <= longest, got "
                             f"{self.bias_wavelength_mm!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"MRContrast.seed must be a non-negative integer, got {self.seed!r}")

    def params(self) -> dict[str, Any]:
        """The parameters as a JSON-ready dict (lists of floats; the seed and term count as ints)."""
        d = dataclasses.asdict(self)
        out: dict[str, Any] = {}
        for k, v in d.items():
            if k in ("seed", "bias_terms"):
                out[k] = int(v)
            elif isinstance(v, tuple | list):
                out[k] = [float(x) for x in v]
            else:
                out[k] = float(v)
        return out

    def describe(self) -> str:
        """One line, e.g. ``MR-like T1 contrast (13 knots), bias 0.3, Rician noise 20, seed 0``."""
        return (f"MR-like T1 contrast ({len(self.knots_hu)} knots), bias {self.bias_log_amplitude:g}, "
                f"Rician noise {self.noise_sd:g}, seed {self.seed}")

    def title(self) -> str:
        """The dataset name's suffix."""
        return f"simulated MR-like contrast: {self.describe()}"

    def tissue_map(self, image_hu: np.ndarray) -> np.ndarray:
        """The noiseless, bias-free rendering: ``knots_hu -> knots_value`` linearly, constant outside."""
        return np.interp(np.asarray(image_hu, dtype=np.float32), np.asarray(self.knots_hu, dtype=np.float64),
                         np.asarray(self.knots_value, dtype=np.float64)).astype(np.float32)

    def apply(self, image_hu: np.ndarray, spacing_mm: tuple[float, float, float], case_id: str) -> np.ndarray:
        """The rendered image: tissue mapping, bias field, Rician noise (float32, same shape, >= 0).

        Args:
            image_hu: 3D CT image in HU, shape (X, Y, Z).
            spacing_mm: voxel size in mm along the array's three axes (the bias field is smooth in mm).
            case_id: identifies the case; seeds its bias field and noise.
        """
        img, spacing = checked_volume(image_hu, spacing_mm)
        rng = case_rng(self.seed, case_id)
        out = self.tissue_map(img)
        if self.bias_log_amplitude > 0:
            out *= np.exp(self._bias(rng, img.shape, spacing))
        if self.noise_sd > 0:
            n1 = rng.normal(0.0, self.noise_sd, size=img.shape).astype(np.float32)
            n2 = rng.normal(0.0, self.noise_sd, size=img.shape).astype(np.float32)
            out = np.sqrt((out + n1) ** 2 + n2**2)
        return out.astype(np.float32, copy=False)

    def _bias(self, rng: np.random.Generator, shape: tuple[int, ...], spacing: tuple[float, ...]) -> np.ndarray:
        """``b(x) = sum_k a_k sin(w_k . x + phi_k)`` over positions x in mm from the volume's centre, with
        ``sum_k |a_k| <= bias_log_amplitude``. Returns shape ``shape`` float32."""
        k = self.bias_terms
        d = rng.normal(size=(k, 3))
        d /= np.linalg.norm(d, axis=1, keepdims=True) + 1e-12
        lo, hi = (float(w) for w in self.bias_wavelength_mm)
        w = d * (2 * np.pi / rng.uniform(lo, hi, size=(k, 1)))
        a = rng.uniform(-1.0, 1.0, size=k)
        a *= self.bias_log_amplitude / max(float(np.abs(a).sum()), 1e-12)
        phi = rng.uniform(0.0, 2 * np.pi, size=k)
        axes = [(np.arange(n, dtype=np.float64) - (n - 1) / 2) * s for n, s in zip(shape, spacing, strict=True)]
        out = np.zeros(shape, dtype=np.float64)
        for i in range(k):
            arg = (w[i, 0] * axes[0][:, None, None] + w[i, 1] * axes[1][None, :, None]
                   + w[i, 2] * axes[2][None, None, :] + phi[i])
            out += a[i] * np.sin(arg)
        return out.astype(np.float32)


#: The contrast of the OpenKBP real-anatomy domain step: the default table, bias log-amplitude 0.3 (up to
#: +-35 % intensity over the head), Rician noise SD 20 (about 5 % of muscle's 330, the order of the contrast
#: between the cord and its surroundings in the table).
MR_LIKE = MRContrast()
