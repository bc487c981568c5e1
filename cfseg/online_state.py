"""The online corrector's settings and saved state as data (:mod:`cfseg.online`): :class:`OnlineConfig` with its
bounds, and the checks a ``state.json`` passes before it is used (format, known keys, a checksum of its own
content, every field in range).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

STATE_FORMAT = "cfseg-online/1"
STATE_FILE = "state.json"
STATE_KEYS = ("format", "base", "config", "n_updates", "alphas", "extents", "optimizer", "files", "sha256",
              "checksum")
MIN_CROP_SIZE, MAX_CROP_SIZE = 8, 128  # voxels per axis (128^3 crops: about 2 GB while learning)
MAX_STEPS_PER_UPDATE = 1000
MAX_BUFFER_SIZE = 4096


class OnlineStateError(ValueError):
    """An online state that cannot be used: not a state, damaged, or made for another model or class list."""


def default_network() -> dict[str, Any]:
    """The auxiliary network: a small MONAI UNet (8-16-32 channels, two stride-2 levels, no residual units, about
    30 k parameters); ``in_channels``/``out_channels`` are set by the corrector. Without residual units MONAI's
    last layer is a plain transposed convolution; with them the 1-channel output would pass an instance norm and
    a PReLU before the last convolution, which rescales every crop's logits."""
    return {"class_path": "monai.networks.nets.UNet",
            "init_args": {"spatial_dims": 3, "channels": [8, 16, 32], "strides": [2, 2], "num_res_units": 0}}


@dataclass
class OnlineConfig:
    """Every constant of the online corrector.

    Defaults: AuxOL's, except three chosen on a tuning stream of OpenKBP validation and training cases
    (``docs/decisions.md``): ``residual`` (AuxOL: False), ``steps_per_update`` 4 (AuxOL: one step per case) and
    ``lr`` 5e-3 (AuxOL: 5e-4). AuxOL exactly:
    ``{"residual": false, "steps_per_update": 1, "lr": 5e-4}``.

    Attributes:
        network: auxiliary network spec (``class_path`` in ``monai.networks.nets``/``cfseg.nets``; its
            ``in_channels``/``out_channels`` are filled in).
        crop_size: the fixed size crops are resized to, voxels: 3 sizes from 8 to 128 (memory grows with their
            product: 32^3 learns in about 0.75 GB, 160^3 needed 3.5 GB).
        margin: box expansion on each side, as a fraction of the box's extent along that axis.
        min_margin: at least this many voxels of expansion on each side.
        prior: ``"probability"`` or ``"mask"``: which frozen output the auxiliary network sees.
        class_code: give the auxiliary network a one-hot class code (one network for every class).
        buffer_size: FIFO buffer of corrected crops (AuxOL: 32); 1 to 4096.
        steps_per_update: AdamW steps on the whole buffer per corrected case; 1 to 1000.
        lr, weight_decay: AdamW (weight decay: AuxOL's 5e-4); lr in (0, 1], weight decay in [0, 1].
        alpha_step: grid step of the fusion weight search (AuxOL: 0.05).
        alpha_window: the next case uses the mean of this many latest best weights (AuxOL: 5).
        warmup: the frozen model alone until this many best weights are recorded (AuxOL: 5).
        alpha_per_class: one weight history per class (default) or one for all classes.
        residual: the auxiliary network predicts a correction added to the frozen logit (its last convolution
            starts at zero, so it starts as the frozen model) instead of a segmentation from scratch (AuxOL's
            choice, ``False``); needs ``prior: probability``.
        seed: initialisation of the auxiliary network.
    """

    network: dict[str, Any] = field(default_factory=default_network)
    crop_size: tuple[int, int, int] = (32, 32, 32)
    margin: float = 0.25
    min_margin: int = 4
    prior: str = "probability"
    class_code: bool = True
    buffer_size: int = 32
    steps_per_update: int = 4
    lr: float = 5e-3
    weight_decay: float = 5e-4
    alpha_step: float = 0.05
    alpha_window: int = 5
    warmup: int = 5
    alpha_per_class: bool = True
    residual: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.network, dict):
            raise ValueError(f"network must be a {{class_path, init_args}} spec, got {self.network!r}")
        for name in ("class_code", "alpha_per_class", "residual"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        for name in ("min_margin", "buffer_size", "steps_per_update", "alpha_window", "warmup", "seed"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) and not (
                    isinstance(v, float) and v.is_integer()):
                raise ValueError(f"{name} must be an integer, got {v!r}")
            setattr(self, name, int(v))
        for name in ("margin", "lr", "weight_decay", "alpha_step"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float, np.number)) or not np.isfinite(v):
                raise ValueError(f"{name} must be a finite number, got {v!r}")
        if (not isinstance(self.crop_size, (list, tuple)) or len(self.crop_size) != 3
                or not all(isinstance(c, (int, np.integer)) and not isinstance(c, bool) for c in self.crop_size)
                or not all(MIN_CROP_SIZE <= c <= MAX_CROP_SIZE for c in self.crop_size)):
            raise ValueError(f"crop_size must be 3 whole sizes from {MIN_CROP_SIZE} to {MAX_CROP_SIZE} voxels, got "
                             f"{self.crop_size!r}")
        self.crop_size = tuple(int(s) for s in self.crop_size)  # type: ignore[assignment]
        if self.prior not in ("probability", "mask"):
            raise ValueError(f"prior must be 'probability' or 'mask', got {self.prior!r}")
        if self.residual and self.prior != "probability":
            raise ValueError("residual: true adds the network's output to the frozen logit, which needs "
                             "prior: probability")
        for name in ("buffer_size", "steps_per_update", "alpha_window"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)!r}")
        if self.buffer_size > MAX_BUFFER_SIZE or self.steps_per_update > MAX_STEPS_PER_UPDATE:
            raise ValueError(f"buffer_size must be at most {MAX_BUFFER_SIZE} and steps_per_update at most "
                             f"{MAX_STEPS_PER_UPDATE}, got {self.buffer_size}, {self.steps_per_update}")
        if self.warmup < 0 or self.min_margin < 0 or self.margin < 0:
            raise ValueError("warmup, min_margin and margin must be non-negative")
        if not 0 < self.alpha_step <= 1:
            raise ValueError(f"alpha_step must be in (0, 1], got {self.alpha_step}")
        if not 0 < self.lr <= 1 or not 0 <= self.weight_decay <= 1:
            raise ValueError(f"lr must be in (0, 1] and weight_decay in [0, 1], got {self.lr}, {self.weight_decay}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["crop_size"] = list(self.crop_size)
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> OnlineConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown online setting(s) {unknown}; known: {sorted(known)}")
        return cls(**dict(data))

    def alpha_grid(self) -> torch.Tensor:
        n = int(round(1 / self.alpha_step))
        return torch.linspace(0, 1, n + 1, dtype=torch.float64)



def state_checksum(meta: Mapping[str, Any]) -> str:
    """SHA-256 of a state's ``state.json`` content without its ``checksum`` field (keys sorted, compact JSON)."""
    body = {k: v for k, v in meta.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _number(v: Any, where: str, lo: float, hi: float, lo_open: bool = False, hi_open: bool = False) -> float:
    """``v`` as a float inside [lo, hi] (``lo_open``/``hi_open``: that end excluded); else a ValueError naming
    ``where``."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v):
        raise ValueError(f"{where} = {v!r} is not a finite number")
    if v < lo or v > hi or (lo_open and v == lo) or (hi_open and v == hi):
        raise ValueError(f"{where} = {v!r} is outside {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}")
    return float(v)


def check_state_fields(meta: Mapping[str, Any], class_names: Sequence[str]) -> None:
    """Range-check every field of a state's ``state.json`` (see the module doc).

    Raises:
        ValueError: naming the first field out of range, of the wrong type or unknown.
    """
    unknown = sorted(set(meta) - set(STATE_KEYS))
    if unknown:
        raise ValueError(f"unknown field(s) {unknown}")
    missing = sorted(set(STATE_KEYS) - set(meta))
    if missing:
        raise ValueError(f"missing field(s) {missing}")
    if not isinstance(meta["config"], dict):
        raise ValueError(f"config = {meta['config']!r} is not a mapping")
    try:
        config = OnlineConfig.from_dict(meta["config"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"config: {e}") from None
    n = meta["n_updates"]
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n_updates = {n!r} is not a non-negative integer")
    classes = set(class_names[1:])
    keys = classes if config.alpha_per_class else {"*"}
    for field_name, rows, width in (("alphas", meta["alphas"], None), ("extents", meta["extents"], 4)):
        if not isinstance(rows, dict):
            raise ValueError(f"{field_name} = {rows!r} is not a mapping")
        for key, values in rows.items():
            if key not in (keys if field_name == "alphas" else classes):
                raise ValueError(f"{field_name} has an entry for {key!r}, not a class of this model")
            if not isinstance(values, list) or (width is not None and len(values) != width):
                raise ValueError(f"{field_name}[{key!r}] = {values!r} is not a list"
                                 + (f" of {width} numbers" if width else ""))
            for i, v in enumerate(values):
                if field_name == "alphas":
                    _number(v, f"alphas[{key!r}][{i}]", 0.0, 1.0)
                else:
                    _number(v, f"extents[{key!r}][{i}]", 0.0, float("inf"))
    opt = meta["optimizer"]
    if not isinstance(opt, dict) or set(opt) != {"param_groups", "state_keys"}:
        raise ValueError(f"optimizer = {opt!r} is not a mapping of param_groups and state_keys")
    groups = opt["param_groups"]
    if not isinstance(groups, list) or len(groups) != 1 or not isinstance(groups[0], dict):
        raise ValueError("optimizer.param_groups must be one group of settings")
    g = groups[0]
    _number(g.get("lr"), "optimizer.param_groups[0].lr", 0.0, 1.0, lo_open=True)
    _number(g.get("eps"), "optimizer.param_groups[0].eps", 0.0, 1.0, lo_open=True)
    _number(g.get("weight_decay"), "optimizer.param_groups[0].weight_decay", 0.0, 1.0)
    betas = g.get("betas")
    if not isinstance(betas, list) or len(betas) != 2:
        raise ValueError(f"optimizer.param_groups[0].betas = {betas!r} is not two numbers")
    for i, b in enumerate(betas):
        _number(b, f"optimizer.param_groups[0].betas[{i}]", 0.0, 1.0, hi_open=True)
    for key, v in g.items():
        if key not in ("lr", "eps", "weight_decay", "betas") and not (v is None or isinstance(v, bool)):
            raise ValueError(f"optimizer.param_groups[0].{key} = {v!r} is not true, false or null")
    if not isinstance(opt["state_keys"], dict):
        raise ValueError("optimizer.state_keys is not a mapping")
    files = meta["files"]
    if not isinstance(files, dict) or set(files) != {"weights", "buffer"} or not all(
            isinstance(f, str) for f in files.values()):
        raise ValueError(f"files = {files!r} is not a mapping of weights and buffer file names")
    sha = meta["sha256"]
    if not isinstance(sha, dict) or set(sha) != set(files.values()):
        raise ValueError("sha256 does not name exactly the state's files")


def check_state_dir(d: Path, must_exist: bool) -> None:
    """Refuse what is not an online state directory.

    ``must_exist``: ``d/state.json`` must be there. Otherwise ``d`` may be missing or empty (a new state) or hold
    a state; a file, or a folder with other files and no ``state.json``, is refused so that a state is never
    written into an unrelated folder.
    """
    if d.exists() and not d.is_dir():
        raise OnlineStateError(f"{d}: is a file, not an online state directory")
    if (d / STATE_FILE).is_file():
        return
    if must_exist:
        what = "does not exist" if not d.exists() else ("is empty" if not any(d.iterdir()) else
                                                           f"has no {STATE_FILE}")
        raise OnlineStateError(f"{d}: not a cfseg online state ({what}); create one by learning from a corrected "
                               f"case: cfseg-correct --state {d} ...")
    if d.exists() and any(p for p in d.iterdir() if not p.name.endswith(".tmp")):
        raise OnlineStateError(f"{d}: holds files but no online state ({STATE_FILE}); refusing to write a state "
                               f"there: choose an empty or new directory")
