"""Analytic ridge-regression router: which per-stage LoRA expert should process an image.

As in EvoSAM (Liu et al., 2025) and analytic continual learning (ACIL, RanPAC), a linear classifier on
pooled features of a frozen network is fitted in closed form from two running statistics, never from stored
images: ``G = sum phi^T phi`` ``[E, E]`` and ``Q = sum phi^T Y`` ``[E, n_experts]`` (``Y`` one-hot of the
expert index). Rows of earlier stages contribute 0 to a column appended later, exactly as their one-hot
targets do, so the solution after stage ``t`` equals the joint ridge solution on all stages' data
(:func:`ridge_solution`): the router cannot forget.

Features: ``phi(x) = [relu(x @ R), 1]`` with a fixed random expansion ``R`` ``[in_features,
random_features]`` (``random_features > 0``) or ``phi(x) = [x, 1]`` (``random_features == 0``); the constant
last column is the bias, so ``E = (random_features or in_features) + 1``. All statistics are float64 on CPU.

:class:`ModalityRouter` asks the same kind of ridge classifier which modality an image is. Each modality has its
own intensity preprocessing (CT window, MRI z-score), so features of a preprocessed image already presuppose the
answer; the modality router reads the frozen network's features of a *modality-neutral view* instead (the raw
intensities' 0.5th-99.5th percentiles mapped to [0, 1], one spacing and orientation for all), which exists before
the modality is known.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

__all__ = ["ModalityRouter", "RidgeRouter", "pooled_features", "ridge_solution"]


def pooled_features(acts: Tensor) -> Tensor:
    """Per-channel spatial mean and (population) standard deviation of activations.

    Args:
        acts: ``[B, C, *S]`` activations with at least one non-empty spatial dimension.

    Returns:
        ``[B, 2C]`` float32: means in columns ``[0, C)``, standard deviations in ``[C, 2C)``.
    """
    if acts.dim() < 3 or 0 in acts.shape:
        raise ValueError(f"pooled_features expects [B, C, *S] with B, C and S non-empty, got {tuple(acts.shape)}")
    flat = acts.float().flatten(2)
    return torch.cat([flat.mean(dim=2), flat.std(dim=2, unbiased=False)], dim=1)


def ridge_solution(phi: Tensor, y: Tensor, gamma: float) -> Tensor:
    """Closed-form ridge regression ``(phi^T phi + gamma I)^-1 phi^T y`` in float64.

    Args:
        phi: ``[N, E]`` features.
        y: ``[N, T]`` targets.
        gamma: ridge strength, ``> 0``.

    Returns:
        ``[E, T]`` float64 weights.
    """
    if phi.dim() != 2 or y.dim() != 2 or phi.shape[0] != y.shape[0]:
        raise ValueError(f"ridge_solution expects phi [N, E] and y [N, T], got {tuple(phi.shape)}, {tuple(y.shape)}")
    _check_gamma(gamma)
    phi, y = phi.double().cpu(), y.double().cpu()
    eye = torch.eye(phi.shape[1], dtype=torch.float64)
    return torch.linalg.solve(phi.T @ phi + gamma * eye, phi.T @ y)


def _check_gamma(gamma: float) -> None:
    if not (isinstance(gamma, (int, float)) and math.isfinite(gamma) and gamma > 0):
        raise ValueError(f"gamma must be a finite number > 0 (ridge strength), got {gamma!r}")


def _check_args(in_features: Any, gamma: Any, random_features: Any, seed: Any) -> None:
    if isinstance(in_features, bool) or not isinstance(in_features, int) or in_features < 1:
        raise ValueError(f"in_features must be an int >= 1, got {in_features!r}")
    if isinstance(random_features, bool) or not isinstance(random_features, int) or random_features < 0:
        raise ValueError(f"random_features must be an int >= 0 (0: no expansion), got {random_features!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    _check_gamma(gamma)


class RidgeRouter:
    """Analytic router over experts, updated one stage at a time from statistics only.

    Args:
        in_features: width ``F`` of the input features (e.g. ``2C`` from :func:`pooled_features`).
        gamma: ridge strength ``> 0``.
        random_features: width of the fixed random ReLU expansion; 0 uses the features as they are.
        seed: seed of the expansion ``R ~ N(0, 1/F)``, drawn in float64 and stored in :meth:`state`.
    """

    def __init__(self, in_features: int, gamma: float = 1.0, random_features: int = 0, seed: int = 0) -> None:
        _check_args(in_features, gamma, random_features, seed)
        gen = torch.Generator().manual_seed(seed)
        proj = torch.randn(in_features, random_features, generator=gen, dtype=torch.float64) / math.sqrt(in_features)
        self._setup(in_features, float(gamma), random_features, seed, proj)

    def _setup(self, in_features: int, gamma: float, random_features: int, seed: int, proj: Tensor) -> None:
        self.in_features, self.gamma, self.random_features, self.seed = in_features, gamma, random_features, seed
        self.projection = proj
        e = (random_features or in_features) + 1
        self.G = torch.zeros(e, e, dtype=torch.float64)
        self.Q = torch.zeros(e, 0, dtype=torch.float64)
        self.n_samples: list[int] = []
        self._W: Tensor | None = None

    @property
    def n_experts(self) -> int:
        """Number of experts (columns of ``Q``)."""
        return self.Q.shape[1]

    @property
    def feature_dim(self) -> int:
        """Width ``E`` of ``phi``, bias column included."""
        return self.G.shape[0]

    def _phi(self, x: Tensor) -> Tensor:
        if x.dim() != 2 or x.shape[1] != self.in_features:
            raise ValueError(f"expected features [N, {self.in_features}], got {tuple(x.shape)}")
        x = x.detach().cpu().double()
        if not torch.isfinite(x).all():
            raise ValueError(f"features contain {int((~torch.isfinite(x)).sum())} non-finite values (NaN/inf)")
        if self.random_features:
            x = torch.relu(x @ self.projection)
        return torch.cat([x, torch.ones(x.shape[0], 1, dtype=torch.float64)], dim=1)

    def update(self, x: Tensor, expert: int) -> None:
        """Accumulate ``[N, in_features]`` features of ``expert`` (an existing index, or ``n_experts`` to add one)."""
        if isinstance(expert, bool) or not isinstance(expert, int) or not 0 <= expert <= self.n_experts:
            raise ValueError(f"expert must be an int in [0, {self.n_experts}] (n_experts adds one), got {expert!r}")
        phi = self._phi(x)
        if expert == self.n_experts:
            self.Q = torch.cat([self.Q, torch.zeros(self.feature_dim, 1, dtype=torch.float64)], dim=1)
            self.n_samples.append(0)
        self.G += phi.T @ phi
        self.Q[:, expert] += phi.sum(dim=0)
        self.n_samples[expert] += phi.shape[0]
        self._W = None

    def solve(self) -> Tensor:
        """Ridge weights ``W = (G + gamma I)^-1 Q``, ``[E, n_experts]`` float64, cached until the next update."""
        if self.n_experts == 0:
            raise ValueError("the router has no expert yet: call update(x, 0) first")
        if self._W is None:
            eye = torch.eye(self.feature_dim, dtype=torch.float64)
            self._W = torch.linalg.solve(self.G + self.gamma * eye, self.Q)
        return self._W.clone()

    def scores(self, x: Tensor) -> Tensor:
        """Scores ``phi(x) @ W``: ``[N, in_features]`` -> ``[N, n_experts]`` float64."""
        w = self.solve()
        return self._phi(x) @ w

    def predict(self, x: Tensor) -> Tensor:
        """Best expert per row: ``[N, in_features]`` -> ``[N]`` long."""
        return self.scores(x).argmax(dim=1)

    def predict_volume(self, x: Tensor) -> int:
        """Top-1 expert of the mean score over the ``[N_windows, in_features]`` windows of one volume."""
        if x.dim() == 2 and x.shape[0] == 0:
            raise ValueError("predict_volume needs at least one window, got 0")
        return int(self.scores(x).mean(dim=0).argmax())

    def state(self) -> dict[str, Any]:
        """Plain state (tensors, ints, floats, lists) loadable with ``torch.load(weights_only=True)``."""
        return {
            "in_features": self.in_features, "gamma": self.gamma, "random_features": self.random_features,
            "seed": self.seed, "projection": self.projection.clone(), "G": self.G.clone(), "Q": self.Q.clone(),
            "n_samples": list(self.n_samples),
        }  # fmt: skip

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> RidgeRouter:
        """Rebuild a router from :meth:`state`; the stored projection is used, not regenerated.

        Raises:
            ValueError: missing keys, wrong types, shapes or dtypes, non-finite statistics.
        """
        keys = {"in_features", "gamma", "random_features", "seed", "projection", "G", "Q", "n_samples"}
        if not isinstance(state, dict) or not keys <= set(state):
            got = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"router state needs keys {sorted(keys)}, got {got}")
        f, r, counts = state["in_features"], state["random_features"], state["n_samples"]
        _check_args(f, state["gamma"], r, state["seed"])
        if not isinstance(counts, list) or not all(isinstance(k, int) and k >= 0 for k in counts):
            raise ValueError(f"damaged router state: n_samples must be a list of ints >= 0, got {counts!r}")
        e, n = (r or f) + 1, len(counts)
        for name, shape in (("projection", (f, r)), ("G", (e, e)), ("Q", (e, n))):
            t = state[name]
            if not isinstance(t, Tensor) or t.dtype != torch.float64 or tuple(t.shape) != shape:
                desc = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__
                raise ValueError(f"damaged router state: {name} should be float64 {shape}, got {desc}")
            if not torch.isfinite(t).all():
                raise ValueError(f"damaged router state: {name} has non-finite values")
        router = cls.__new__(cls)
        router._setup(f, float(state["gamma"]), r, state["seed"], state["projection"].clone())
        router.G, router.Q, router.n_samples = state["G"].clone(), state["Q"].clone(), list(counts)
        return router


class ModalityRouter:
    """Which modality an image is: a :class:`RidgeRouter` over modality names, fitted on the modality-neutral view.

    Args:
        in_features: width of the pooled features.
        view: the neutral view's preprocessing (:meth:`cfseg.data.transforms.Preprocessing.to_dict` with
            ``modality="neutral"``): every image is resampled and scaled this way before its features are taken.
        gamma: ridge regularisation.
    """

    def __init__(self, in_features: int, view: dict[str, Any], gamma: float = 1.0) -> None:
        if not isinstance(view, dict) or view.get("modality") != "neutral":
            raise ValueError(f"the modality router's view must be a preprocessing dict with modality 'neutral', "
                             f"got {view!r}")
        self.ridge = RidgeRouter(in_features, gamma=gamma)
        self.names: list[str] = []
        self.view = dict(view)

    def update(self, x: Tensor, modality: str) -> None:
        """Accumulate ``[N, in_features]`` window features of images of ``modality`` (a new name is appended)."""
        if not isinstance(modality, str) or not modality:
            raise ValueError(f"modality must be a non-empty string, got {modality!r}")
        if modality not in self.names:
            self.ridge.update(x, len(self.names))
            self.names.append(modality)
        else:
            self.ridge.update(x, self.names.index(modality))

    def scores(self, x: Tensor) -> dict[str, float]:
        """Mean ridge score per modality over the ``[N_windows, in_features]`` windows of one volume."""
        if x.dim() != 2 or x.shape[0] == 0:
            raise ValueError(f"expected [N_windows >= 1, {self.ridge.in_features}] features, got {tuple(x.shape)}")
        mean = self.ridge.scores(x).mean(dim=0)
        return {name: float(v) for name, v in zip(self.names, mean, strict=True)}

    def state(self) -> dict[str, Any]:
        """Plain state loadable with ``torch.load(weights_only=True)``."""
        return {"ridge": self.ridge.state(), "names": list(self.names), "view": dict(self.view)}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> ModalityRouter:
        """Rebuild from :meth:`state`.

        Raises:
            ValueError: missing keys, or names that do not match the statistics' columns.
        """
        if not isinstance(state, dict) or not {"ridge", "names", "view"} <= set(state):
            got = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"modality router state needs keys ['names', 'ridge', 'view'], got {got}")
        ridge = RidgeRouter.from_state(state["ridge"])
        names = state["names"]
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names) or len(names) != ridge.n_experts:
            raise ValueError(f"damaged modality router state: {ridge.n_experts} statistics columns, names {names!r}")
        router = cls(ridge.in_features, dict(state["view"]), ridge.gamma)
        router.ridge, router.names = ridge, list(names)
        return router
