"""How unlike its training images an input looks to a trained network: an out-of-domain score from statistics only.

At the end of every stage the module pools the features of its training images in the modality-neutral view (the
same window features the routers use) and keeps, per modality, their count and sum, and over all of them the sum
of outer products: a Gaussian per modality with one shared covariance (Lee et al., NeurIPS 2018, "A simple unified
framework for detecting out-of-distribution samples"). An input's score is the mean over its windows of the
squared Mahalanobis distance to the nearest modality's mean, divided by the feature width (about 1 for a window
drawn from the fitted Gaussians). The threshold is calibrated on the stage's validation cases (or its training
cases when it has none): ``factor`` times the largest of their scores.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from monai import transforms as mt
from torch import Tensor

from cfseg.data.transforms import Preprocessing, deterministic_transforms
from cfseg.distributed import shared_map

#: threshold = OOD_FACTOR x the largest score of the calibration cases
OOD_FACTOR = 3.0
#: ridge added to the shared covariance, relative to its largest eigenvalue
COVARIANCE_RIDGE = 1e-3


class DomainStatistics:
    """Per-modality feature means and a shared covariance, accumulated from ``[N, F]`` window features.

    Args:
        in_features: width ``F`` of the features.
        view: the preprocessing (:meth:`cfseg.data.transforms.Preprocessing.to_dict`) images are scored in.
    """

    def __init__(self, in_features: int, view: dict[str, Any] | None = None) -> None:
        if not isinstance(in_features, int) or in_features < 1:
            raise ValueError(f"in_features must be a positive int, got {in_features!r}")
        self.in_features = in_features
        self.view = dict(view) if view is not None else None
        self.names: list[str] = []
        self.sums = torch.zeros(0, in_features, dtype=torch.float64)
        self.counts = torch.zeros(0, dtype=torch.float64)
        self.outer = torch.zeros(in_features, in_features, dtype=torch.float64)
        self.threshold: float | None = None
        self.calibration: list[float] = []
        self._cache: tuple[Tensor, Tensor] | None = None

    def _check(self, x: Tensor) -> Tensor:
        if x.dim() != 2 or x.shape[1] != self.in_features or x.shape[0] == 0:
            raise ValueError(f"expected features [N >= 1, {self.in_features}], got {tuple(x.shape)}")
        x = x.detach().cpu().double()
        if not torch.isfinite(x).all():
            raise ValueError("features contain non-finite values")
        return x

    def update(self, x: Tensor, modality: str) -> None:
        """Accumulate window features ``x`` [N, F] of an image of ``modality``."""
        x = self._check(x)
        if modality not in self.names:
            self.names.append(modality)
            self.sums = torch.cat([self.sums, torch.zeros(1, self.in_features, dtype=torch.float64)])
            self.counts = torch.cat([self.counts, torch.zeros(1, dtype=torch.float64)])
        k = self.names.index(modality)
        self.sums[k] += x.sum(0)
        self.counts[k] += x.shape[0]
        self.outer += x.T @ x
        self._cache = None

    def _fitted(self) -> tuple[Tensor, Tensor]:
        """Means [M, F] and the precision [F, F] of the shared covariance."""
        if self._cache is None:
            if not self.names or float(self.counts.sum()) < 2:
                raise ValueError("no domain statistics accumulated")
            means = self.sums / self.counts[:, None]
            cov = (self.outer - (self.counts[:, None, None] * means[:, :, None] * means[:, None, :]).sum(0)) \
                / self.counts.sum()
            cov = (cov + cov.T) / 2
            ridge = COVARIANCE_RIDGE * float(torch.linalg.eigvalsh(cov).max().clamp_min(1e-12))
            self._cache = means, torch.linalg.inv(cov + ridge * torch.eye(self.in_features, dtype=cov.dtype))
        return self._cache

    def score(self, x: Tensor) -> float:
        """Mean over the windows ``x`` [N, F] of one volume of the squared Mahalanobis distance to the nearest
        modality's mean, divided by ``F``."""
        x = self._check(x)
        means, precision = self._fitted()
        d = x[None] - means[:, None]  # [M, N, F]
        dist = torch.einsum("mnf,fg,mng->mn", d, precision, d).min(0).values / self.in_features
        return float(dist.mean())

    def calibrate(self, scores: list[float], factor: float = OOD_FACTOR) -> None:
        """Set the threshold to ``factor`` times the largest of the calibration cases' ``scores``."""
        if not scores or not all(math.isfinite(s) for s in scores) or not factor > 0:
            raise ValueError(f"need finite calibration scores and a positive factor, got {scores!r}, {factor!r}")
        self.calibration = [float(s) for s in scores]
        self.threshold = factor * max(self.calibration)

    def state(self) -> dict[str, Any]:
        """Plain state loadable with ``torch.load(weights_only=True)``."""
        return {"in_features": self.in_features, "view": self.view, "names": list(self.names),
                "sums": self.sums.clone(), "counts": self.counts.clone(), "outer": self.outer.clone(),
                "threshold": self.threshold, "calibration": list(self.calibration)}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> DomainStatistics:
        """Rebuild from :meth:`state`.

        Raises:
            ValueError: missing keys or inconsistent shapes.
        """
        keys = {"in_features", "names", "sums", "counts", "outer", "threshold", "calibration"}
        if not isinstance(state, dict) or not keys <= set(state):
            raise ValueError(f"domain statistics need keys {sorted(keys)}, got "
                             f"{sorted(state) if isinstance(state, dict) else type(state).__name__}")
        out = cls(int(state["in_features"]), state.get("view"))
        f, m = out.in_features, len(state["names"])
        sums, counts, outer = state["sums"], state["counts"], state["outer"]
        if not (isinstance(sums, Tensor) and isinstance(counts, Tensor) and isinstance(outer, Tensor)
                and sums.shape == (m, f) and counts.shape == (m,) and outer.shape == (f, f)):
            raise ValueError("damaged domain statistics: shapes do not match the names and the feature width")
        out.names = [str(n) for n in state["names"]]
        out.sums, out.counts, out.outer = sums.double(), counts.double(), outer.double()
        out.threshold = None if state["threshold"] is None else float(state["threshold"])
        out.calibration = [float(s) for s in state["calibration"]]
        return out


def spread(items: list[Any], k: int) -> list[Any]:
    """Up to ``k`` of ``items`` spread evenly over them (first and last included)."""
    k = min(k, len(items))
    return [items[i] for i in sorted({round(j * (len(items) - 1) / max(1, k - 1)) for j in range(k)})] if k else []


def fit_domain_statistics(module: Any, datamodule: Any, view: Preprocessing, n_cases: int,
                          factor: float = OOD_FACTOR) -> DomainStatistics | None:
    """Domain statistics of ``module``'s network on up to ``n_cases`` training cases of each labelled dataset of
    ``datamodule`` (every image in the neutral ``view``, covered by windows as at inference), calibrated on up to
    ``n_cases`` validation cases per dataset (the training cases when there are none). None without training cases.

    ``module`` provides ``window_features(image [1, C, *S]) -> [N, F]``; ``datamodule`` provides ``datasets`` and
    ``items(dataset, split)``.
    """
    load = mt.Compose(deterministic_transforms(view, labeled=False))
    train = [(d, it) for d in datamodule.datasets if d.config.labeled and not d.config.val_only
             for it in spread(datamodule.items(d, "train"), n_cases)]
    if not train:
        return None
    val = [it for d in datamodule.datasets for it in spread(datamodule.items(d, "val"), n_cases)]

    def features(item: dict[str, Any]) -> Tensor:
        return module.window_features(load({"image": item["image"]})["image"][None])

    # under DDP each process computes its share of the cases' features; every process fits on all of them
    train_features = shared_map(features, [it for _, it in train])
    stats: DomainStatistics | None = None
    for (d, _), feats in zip(train, train_features, strict=True):
        stats = stats or DomainStatistics(int(feats.shape[1]), view.to_dict())
        stats.update(feats, str(d.info.modality))
    calibration = shared_map(features, val) if val else train_features
    stats.calibrate([stats.score(f) for f in calibration], factor)
    return stats
