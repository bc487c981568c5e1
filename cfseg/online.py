"""Learning from corrected masks: an online auxiliary corrector beside a frozen cfseg model (AuxOL-style).

A clinician reviews each automatic segmentation and fixes it. :class:`OnlineCorrector` keeps the cfseg model
frozen and trains a small auxiliary 3D network online from those corrections, then fuses the two outputs with a
weight that follows which of them has recently been better. Modelled on AuxOL (Huang et al., IEEE TMI 2025,
"On-the-fly improving Segment Anything for medical image segmentation using auxiliary online learning"; public
code qianxihaoyue/AuxOL), brought to 3D volumes and to several classes per case.

Per class ``k`` of a case (all on the network grid, i.e. after the checkpoint's preprocessing):

* **Crop.** The box of the largest connected component of the frozen prediction of ``k`` (its label map),
  expanded on each side by ``max(min_margin, margin x extent)`` voxels and clipped to the volume. When the frozen
  model predicts nothing for ``k``, the box is centred on its most probable voxel with the mean size of the boxes
  that class's corrections had so far (none yet: ``k`` is left to the frozen model). A user's box replaces
  the prediction's (``boxes=`` of :meth:`OnlineCorrector.fuse` / :meth:`~OnlineCorrector.update`). The crop is
  resized (trilinear) to ``crop_size``.
* **Auxiliary input.** Image crop, the frozen model's probability (``prior: probability``) or mask
  (``prior: mask``) of ``k``, and a one-hot class code as constant channels (``class_code``), so one small
  network serves every class. Output: one logit map ``z_aux``, resized back into the box.
* **Residual correction** (``residual``, the default; AuxOL predicts from scratch): ``z_aux = z_main + d``,
  the network predicting the correction ``d`` from a zero-initialised last layer, so a new corrector is the
  frozen model and the fusion below becomes ``z_main + (1 - alpha) d`` (why it is the default:
  ``docs/decisions.md``).
* **Fusion.** ``p = sigmoid(alpha z_main + (1 - alpha) z_aux)`` inside the box, ``z_main = logit(p_main)`` of the
  frozen softmax; outside the box the frozen probability is kept. The fused probability of ``k`` replaces the
  frozen one and background takes what is left (``1 - sum_k p_k``, at least 0), so the label map is the argmax.
* **Adaptive fusion weight.** After each corrected case the best ``alpha`` on the grid ``0, alpha_step, ..., 1``
  (soft Dice against the correction, in the crop) is recorded per class (``alpha_per_class``; else one history
  for all); the next case uses the mean of the last ``alpha_window`` records. Until ``warmup`` records exist
  the frozen model is used alone (``alpha = 1``), as AuxOL does for its first 5 cases.
* **Adaptive online batch.** Each corrected crop (input, target) goes into a FIFO buffer of at most
  ``buffer_size`` crops; each update runs ``steps_per_update`` AdamW steps (``lr``, ``weight_decay``) on the whole
  buffer (Dice + BCE, MONAI ``DiceCELoss``), so the batch grows with the stream until the buffer is full.

State (:meth:`OnlineCorrector.save` / :meth:`OnlineCorrector.load`): one directory holding ``state.json``
(configuration, fusion-weight histories, box sizes, the optimiser's hyper-parameters, the fingerprint of the base
model and its class list, the SHA-256 of each tensor file, and a ``checksum``: the SHA-256 of ``state.json``'s own
content without that field) and two safetensors files (auxiliary weights with the optimiser's moments; the buffer).
Loading checks every checksum and every field (known keys only; the configuration as :class:`OnlineConfig` checks
it; fusion weights in [0, 1]; box sizes finite and non-negative; the update count a non-negative integer; the
optimiser's learning rate, betas, epsilon and weight decay in range): an edited or damaged ``state.json`` is
refused, naming the field or the failed checksum. No pickled code: the auxiliary network is built through
:mod:`cfseg.builder`'s allow-list. A save writes new tensor files, then replaces ``state.json`` atomically, then
deletes the files it no longer names: a crash at any point leaves the previous or the new state, both loadable.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import time
import uuid
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cfseg.builder import build_network
from cfseg.online_state import (
    STATE_FILE,
    STATE_FORMAT,
    OnlineConfig,
    OnlineStateError,
    check_state_dir,
    check_state_fields,
    state_checksum,
)

_LOGIT_EPS = 1e-6


# ---------------------------------------------------------------------------------------------------------------
# pure helpers (boxes, crops, fusion weight)


Box = tuple[tuple[int, int, int], tuple[int, int, int]]  # (lo, hi), end exclusive


def largest_component_box(mask: np.ndarray) -> Box | None:
    """Box of the largest 26-connected component of a boolean [X, Y, Z] mask; None when empty."""
    from scipy import ndimage

    sl = ndimage.find_objects(mask.astype(np.uint8))
    if not sl:
        return None
    sub = mask[sl[0]]  # label only inside the mask's bounding box
    lab, n = ndimage.label(sub, structure=np.ones((3, 3, 3), bool))
    if n > 1:
        sizes = np.bincount(lab.ravel())[1:]
        sub = lab == (int(sizes.argmax()) + 1)
    idx = np.nonzero(sub)
    off = [s.start for s in sl[0]]
    return (tuple(int(i.min()) + o for i, o in zip(idx, off, strict=True)),  # type: ignore[return-value]
            tuple(int(i.max()) + 1 + o for i, o in zip(idx, off, strict=True)))


def expand_box(box: Box, shape: Sequence[int], margin: float, min_margin: int) -> Box:
    """``box`` grown on each side by ``max(min_margin, margin x extent)`` voxels, clipped to ``shape``."""
    lo, hi = [], []
    for l, h, n in zip(box[0], box[1], shape, strict=True):
        m = max(int(min_margin), int(round(margin * (h - l))))
        lo.append(max(0, l - m))
        hi.append(min(int(n), h + m))
    return tuple(lo), tuple(hi)  # type: ignore[return-value]


def centred_box(centre: Sequence[int], extent: Sequence[float], shape: Sequence[int]) -> Box:
    """A box of ``extent`` voxels around ``centre``, shifted to lie inside ``shape`` (clipped if larger)."""
    lo, hi = [], []
    for c, e, n in zip(centre, extent, shape, strict=True):
        e = int(min(max(1, round(e)), n))
        l = min(max(0, int(c) - e // 2), int(n) - e)
        lo.append(l)
        hi.append(l + e)
    return tuple(lo), tuple(hi)  # type: ignore[return-value]


def crop_resize(volume: torch.Tensor, box: Box, size: Sequence[int], mode: str = "trilinear") -> torch.Tensor:
    """[C, *S] -> the box's content resized to [C, *size] (``mode`` trilinear or nearest)."""
    sl = tuple(slice(l, h) for l, h in zip(*box, strict=True))
    sub = volume[(slice(None), *sl)].float()[None]
    kw = {"align_corners": False} if mode == "trilinear" else {}
    return F.interpolate(sub, size=tuple(size), mode=mode, **kw)[0]


def uncrop_resize(crop: torch.Tensor, box: Box) -> torch.Tensor:
    """[C, *size] -> [C, *box extent] (trilinear): a crop's output back at the box's own resolution."""
    extent = tuple(h - l for l, h in zip(*box, strict=True))
    return F.interpolate(crop.float()[None], size=extent, mode="trilinear", align_corners=False)[0]


def soft_dice(prob: torch.Tensor, target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Soft Dice over all but the leading dimension: prob, target [A, ...] -> [A] (both empty: 1)."""
    p, t = prob.flatten(1).double(), target.flatten(1).double()
    return (2 * (p * t).sum(1) + eps) / (p.sum(1) + t.sum(1) + eps)


def best_alpha(z_main: torch.Tensor, z_aux: torch.Tensor, target: torch.Tensor,
               grid: torch.Tensor) -> tuple[float, float]:
    """The fusion weight on ``grid`` whose ``sigmoid(a z_main + (1 - a) z_aux)`` has the highest soft Dice with
    ``target`` (same shapes). Ties go to the larger weight (the frozen model): AuxOL starts from 1 and keeps the
    first best.

    Returns:
        ``(alpha, soft Dice at alpha)``.
    """
    a = grid.to(torch.float64).view(-1, *([1] * z_main.dim()))
    fused = torch.sigmoid(a * z_main.double()[None] + (1 - a) * z_aux.double()[None])
    dice = soft_dice(fused, target.double()[None].expand_as(fused))
    order = torch.arange(len(grid) - 1, -1, -1)  # from alpha = 1 down: argmax keeps the first maximum
    j = int(order[int(dice[order].argmax())])
    return float(grid[j]), float(dice[j])


def _plain(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor (MONAI's MetaTensor tracks metadata through every operation: slow, and not needed here)."""
    t = torch.as_tensor(t)
    return t.as_subclass(torch.Tensor) if type(t) is not torch.Tensor else t


def channel_argmax(probs: torch.Tensor) -> torch.Tensor:
    """``probs.argmax(0)`` for [C, *S] (int64 [*S], first maximum wins), one channel at a time: torch's argmax
    over a leading dimension walks memory with a stride and is about 10x slower on CPU."""
    best = probs[0].clone()
    arg = torch.zeros(probs.shape[1:], dtype=torch.int64)
    for c in range(1, probs.shape[0]):
        better = probs[c] > best
        arg[better] = c
        torch.maximum(best, probs[c], out=best)
    return arg


def _logit(p: torch.Tensor) -> torch.Tensor:
    p = p.double().clamp(_LOGIT_EPS, 1 - _LOGIT_EPS)
    return torch.log(p) - torch.log1p(-p)


def model_fingerprint(module) -> str:
    """SHA-256 of a cfseg module's class list and weights (every state-dict tensor, by name): what an online
    state is bound to. Independent of the checkpoint file's path or how it was saved."""
    h = hashlib.sha256()
    h.update(json.dumps(list(module.bank.names)).encode())

    def feed(v: Any) -> None:
        if isinstance(v, torch.Tensor):
            h.update(f"{v.dtype}{tuple(v.shape)}".encode())
            if v.numel():
                h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(v, Mapping):  # extra states (e.g. the prototype bank's)
            for key in sorted(v, key=str):
                h.update(str(key).encode())
                feed(v[key])
        elif isinstance(v, (list, tuple)):
            for item in v:
                feed(item)
        else:
            h.update(repr(v).encode())

    for name, value in sorted(module.state_dict().items()):
        h.update(name.encode())
        feed(value)
    return h.hexdigest()


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------------------


@dataclass
class CaseReport:
    """What one corrected case did (per class name): Dice of the frozen and the fused prediction against the
    correction (computed before learning from it), the best fusion weight found, the weight that was used, and
    seconds spent in the update (crop, fusion-weight search, optimiser steps; not the frozen model's pass)."""

    dice_frozen: dict[str, float]
    dice_fused: dict[str, float]
    best_alpha: dict[str, float]
    alpha_used: dict[str, float]
    seconds: float
    buffer: int
    loss: float | None


class OnlineCorrector:
    """An auxiliary network learning online from corrected cases, fused with a frozen cfseg module.

    Args:
        module: the loaded cfseg module (:func:`cfseg.module.load_checkpoint`); frozen here (eval mode, no grads).
        config: :class:`OnlineConfig` (or a dict of its fields); defaults when None.
        trusted_modules: packages trusted for the auxiliary network beyond the allow-list (never from a file).

    Tensors: ``image`` [C, X, Y, Z] preprocessed (network grid); ``probs`` [K'+1, X, Y, Z] the frozen softmax
    over background + ``class_indices`` (global indices of the module's bank, as :func:`cfseg.inference.
    predict_volume` returns them).
    """

    def __init__(self, module, config: OnlineConfig | Mapping[str, Any] | None = None,
                 trusted_modules: Sequence[str] | None = None):
        self.module = module.eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.config = config if isinstance(config, OnlineConfig) else OnlineConfig.from_dict(config or {})
        self.class_names: list[str] = list(module.bank.names)
        self.fingerprint = model_fingerprint(module)
        spec = copy.deepcopy(self.config.network)
        spec.setdefault("init_args", {})
        spec["init_args"].update(in_channels=self.in_channels(module), out_channels=1)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.config.seed)
            self.aux: nn.Module = build_network(spec, trusted_modules)
        if self.config.residual:  # start as the frozen model: the last convolution outputs zero
            last = [m for m in self.aux.modules() if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d))][-1]
            nn.init.zeros_(last.weight)
            if last.bias is not None:
                nn.init.zeros_(last.bias)
        self.optimizer = torch.optim.AdamW(self.aux.parameters(), lr=self.config.lr,
                                           weight_decay=self.config.weight_decay)
        from monai.losses import DiceCELoss

        self.loss_fn = DiceCELoss(sigmoid=True)
        self.buffer: deque[tuple[torch.Tensor, torch.Tensor, int]] = deque(maxlen=self.config.buffer_size)
        self.alphas: dict[str, list[float]] = {}
        self.extents: dict[str, list[float]] = {}  # class -> [sum x, sum y, sum z, count] of correction boxes
        self.n_updates = 0

    # -- shapes and channels ------------------------------------------------------------------------------------
    def in_channels(self, module) -> int:
        n_code = len(module.bank.names) - 1 if self.config.class_code else 0
        return _in_channels(module) + 1 + n_code

    def n_parameters(self) -> int:
        return sum(p.numel() for p in self.aux.parameters())

    # -- fusion weight ------------------------------------------------------------------------------------------
    def _history_key(self, k: int) -> str:
        return self.class_names[k] if self.config.alpha_per_class else "*"

    def alpha(self, k: int) -> float:
        """The fusion weight the next case uses for class ``k``: 1 (frozen alone) during warm-up, else the mean
        of the last ``alpha_window`` best weights."""
        hist = self.alphas.get(self._history_key(k), [])
        if len(hist) < max(1, self.config.warmup):
            return 1.0
        return float(np.mean(hist[-self.config.alpha_window:]))

    def describe(self, alpha: Mapping[str, float] | None = None) -> str:
        """One line: how many corrections the corrector learnt from, and the fusion weight per class."""
        head = f"online corrector ({self.n_updates} corrected case{'s' * (self.n_updates != 1)}"
        if not alpha:
            return head + "; no class fused yet: the checkpoint alone)"
        parts = ", ".join(f"{n} {a:.2f}" for n, a in alpha.items())
        return head + f"); weight of the checkpoint per class (1 = it alone): {parts}"

    # -- boxes and crops ----------------------------------------------------------------------------------------
    def box(self, k: int, prob: torch.Tensor, mask: torch.Tensor, user_box: Box | None = None) -> Box | None:
        """The crop box of class ``k`` from its frozen probability and mask [X, Y, Z] (see the module doc), or
        from ``user_box`` ((lo, hi) voxel corners on the network grid, end exclusive), expanded by the margin."""
        shape = tuple(prob.shape)
        if user_box is not None:
            lo, hi = (tuple(int(v) for v in c) for c in user_box)
            if len(lo) != 3 or len(hi) != 3 or not all(0 <= l < h <= n for l, h, n in zip(lo, hi, shape, strict=True)):
                raise ValueError(f"box of {self.class_names[k]!r} must be (lo, hi) with 0 <= lo < hi <= {shape}, "
                                 f"got {user_box}")
            return expand_box((lo, hi), shape, self.config.margin, self.config.min_margin)  # type: ignore[arg-type]
        b = largest_component_box(mask.cpu().numpy().astype(bool))
        if b is None:
            ext = self.extents.get(self.class_names[k])
            if not ext or ext[3] == 0:
                return None
            centre = np.unravel_index(int(prob.argmax()), shape)
            b = centred_box(centre, [e / ext[3] for e in ext[:3]], shape)
        return expand_box(b, shape, self.config.margin, self.config.min_margin)

    def _inputs(self, image: torch.Tensor, prob: torch.Tensor, mask: torch.Tensor, box: Box) -> torch.Tensor:
        """[C_img + 1, *crop_size]: image crop and the prior channel (class code added at use)."""
        prior = (mask.float() if self.config.prior == "mask" else prob.float())[None]
        return crop_resize(torch.cat([image.float(), prior], 0), box, self.config.crop_size)

    def _with_code(self, x: torch.Tensor, classes: Sequence[int]) -> torch.Tensor:
        """[B, C, *crop] + one-hot class code channels -> [B, C + K - 1, *crop]."""
        if not self.config.class_code:
            return x
        code = torch.zeros(x.shape[0], len(self.class_names) - 1, *x.shape[2:], dtype=x.dtype)
        for i, k in enumerate(classes):
            code[i, int(k) - 1] = 1
        return torch.cat([x, code], 1)

    @torch.no_grad()
    def _aux_logits(self, inputs: torch.Tensor, classes: Sequence[int]) -> torch.Tensor:
        """The network's own output [B, *crop] (with ``residual``: the correction, before the frozen logit is
        added; :meth:`_fuse` adds it at full resolution, so a zero correction is exactly the frozen model)."""
        self.aux.eval()
        return self.aux(self._with_code(inputs, classes))[:, 0]

    def _aux_forward(self, inputs: torch.Tensor, classes: Sequence[int]) -> torch.Tensor:
        """Auxiliary logits [B, *crop] of crops [B, C_img + 1, *crop] (no class code yet); with ``residual`` the
        network's output is added to the frozen logit (the prior channel)."""
        z = self.aux(self._with_code(inputs, classes))[:, 0]
        return z + _logit(inputs[:, -1]).float() if self.config.residual else z

    def _crops(self, image: torch.Tensor, probs: torch.Tensor, labels: torch.Tensor, class_indices: Sequence[int],
               only: set[int] | None = None, user_boxes: Mapping[int, Box] | None = None
               ) -> list[tuple[int, int, Box, torch.Tensor]]:
        """(j, k, box, inputs [C_img + 1, *crop_size]) per requested class with a box (those in ``only``, when
        given); j is the channel of class k in ``probs``, ``labels`` [*S] the frozen argmax channel."""
        user_boxes = user_boxes or {}
        out = []
        for j, k in enumerate(class_indices, start=1):
            if only is not None and int(k) not in only:
                continue
            mask = labels == j
            b = self.box(int(k), probs[j], mask, user_boxes.get(int(k)))
            if b is not None:
                out.append((j, int(k), b, self._inputs(image, probs[j], mask, b)))
        return out

    def _fuse(self, probs: torch.Tensor, idx: list[int], crops, z_aux: torch.Tensor | None) -> dict[str, Any]:
        """Fusion given the crops and their auxiliary logits [n, *crop_size] (None: no crop acts)."""
        fused = probs.clone().float()
        used = {self.class_names[c[1]]: 1.0 for c in crops}
        boxes = {}
        acting = [(c, z) for c, z in zip(crops, z_aux if z_aux is not None else [None] * len(crops), strict=True)
                  if self.alpha(c[1]) < 1.0]
        for (j, k, b, _), z in acting:
            a = self.alpha(k)
            sl = tuple(slice(l, h) for l, h in zip(*b, strict=True))
            z_box = uncrop_resize(z[None], b)[0].double()
            if self.config.residual:
                z_box = z_box + _logit(probs[j][sl])
            fused[j][sl] = torch.sigmoid(a * _logit(probs[j][sl]) + (1 - a) * z_box).float()
            used[self.class_names[k]] = a
            boxes[self.class_names[k]] = b
        if acting:
            fused[0] = (1 - fused[1:].sum(0)).clamp_min(0)
        table = torch.tensor([0, *idx], dtype=torch.uint8)
        return {"probs": fused, "labels": table[channel_argmax(fused)], "alpha": used, "boxes": boxes}

    # -- inference ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def fuse(self, image: torch.Tensor, probs: torch.Tensor, class_indices: Sequence[int],
             boxes: Mapping[int, Box] | None = None) -> dict[str, Any]:
        """Fuse the frozen probabilities with the auxiliary network's, class by class inside each class's box
        (``boxes``: a user's box per global class index, instead of the one around the frozen prediction).

        Returns:
            ``probs`` [K'+1, *S] fused (background: what the classes leave), ``labels`` uint8 [*S] in global
            class values, ``alpha`` {class name: weight used} for the classes with a box and ``boxes`` {class
            name: box} for those the auxiliary network acted on (weight < 1).
        """
        image, probs = _plain(image), _plain(probs)
        idx = [int(k) for k in class_indices]
        acting = {k for k in idx if self.alpha(k) < 1.0}
        crops = self._crops(image, probs, channel_argmax(probs), idx, only=acting, user_boxes=boxes)
        z_aux = self._aux_logits(torch.stack([c[3] for c in crops]), [c[1] for c in crops]) if crops else None
        out = self._fuse(probs, idx, crops, z_aux)
        for k in idx:  # classes left to the frozen model during warm-up
            out["alpha"].setdefault(self.class_names[k], 1.0)
        return out

    # -- learning -----------------------------------------------------------------------------------------------
    def update(self, image: torch.Tensor, probs: torch.Tensor, class_indices: Sequence[int],
               corrected: Mapping[int, torch.Tensor], boxes: Mapping[int, Box] | None = None) -> CaseReport:
        """Learn from one corrected case (``boxes``: as in :meth:`fuse`).

        Args:
            image, probs, class_indices: the case and the frozen model's output on it (see the class doc).
            corrected: global class index -> boolean mask [X, Y, Z] on the network grid (the user's correction;
                an empty mask says the organ is absent). Only these classes are learnt from.

        Returns:
            :class:`CaseReport` (Dice before learning from this case).
        """
        t0 = time.perf_counter()
        image, probs = _plain(image), _plain(probs)
        idx = [int(k) for k in class_indices]
        unknown = sorted(set(int(k) for k in corrected) - set(idx))
        if unknown:
            raise ValueError(f"corrected classes {[self.class_names[k] for k in unknown]} were not predicted "
                             f"(class_indices {idx})")
        targets = {int(k): _plain(m).bool() for k, m in corrected.items()}
        for k, m in targets.items():
            if tuple(m.shape) != tuple(probs.shape[1:]):
                raise ValueError(f"correction of {self.class_names[k]!r} has shape {tuple(m.shape)}, the case "
                                 f"{tuple(probs.shape[1:])}")
        labels = channel_argmax(probs)
        crops = self._crops(image, probs, labels, idx, only=set(targets), user_boxes=boxes)
        z_aux = self._aux_logits(torch.stack([c[3] for c in crops]), [c[1] for c in crops]) if crops else None
        with torch.no_grad():
            out = self._fuse(probs, idx, crops, z_aux)
        dice_frozen, dice_fused, best, used = {}, {}, {}, {}
        for k, m in targets.items():
            name = self.class_names[k]
            j = idx.index(k) + 1
            dice_frozen[name] = _hard_dice(labels == j, m)
            dice_fused[name] = _hard_dice(out["labels"] == k, m)
            used[name] = self.alpha(k)
        grid = self.config.alpha_grid()
        for (j, k, b, x), z in zip(crops, z_aux if z_aux is not None else [], strict=True):
            target = crop_resize(targets[k][None].float(), b, self.config.crop_size)[0] >= 0.5
            z_main = _logit(x[-1] if self.config.prior == "probability" else
                            crop_resize(probs[j][None], b, self.config.crop_size)[0])
            if self.config.residual:
                z = z + z_main
            a, _ = best_alpha(z_main, z, target.float(), grid)
            best[self.class_names[k]] = a
            self.alphas.setdefault(self._history_key(k), []).append(a)
            self.buffer.append((x, target[None].to(torch.uint8), k))
        for k, m in targets.items():  # box sizes of the corrections: where to look when the frozen model misses
            b = largest_component_box(m.numpy())
            if b is not None:
                ext = self.extents.setdefault(self.class_names[k], [0.0, 0.0, 0.0, 0.0])
                for a in range(3):
                    ext[a] += b[1][a] - b[0][a]
                ext[3] += 1
        loss = self._train_steps() if self.buffer else None
        self.n_updates += 1
        return CaseReport(dice_frozen, dice_fused, best, used, time.perf_counter() - t0, len(self.buffer), loss)

    def _train_steps(self) -> float:
        """``steps_per_update`` AdamW steps on the whole buffer; returns the last loss."""
        x = torch.stack([b[0] for b in self.buffer])
        y = torch.stack([b[1] for b in self.buffer]).float()
        classes = [b[2] for b in self.buffer]
        self.aux.train()
        loss = torch.zeros(())
        for _ in range(self.config.steps_per_update):
            self.optimizer.zero_grad(set_to_none=True)
            loss = self.loss_fn(self._aux_forward(x, classes)[:, None], y)
            loss.backward()
            self.optimizer.step()
        self.aux.eval()
        return float(loss.detach())

    # -- persistence --------------------------------------------------------------------------------------------
    def state_dict(self) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(JSON-able metadata, weight tensors incl. the optimiser's moments, buffer tensors)."""
        weights = {f"aux.{k}": v.detach().cpu().contiguous() for k, v in self.aux.state_dict().items()}
        opt = self.optimizer.state_dict()
        for i, st in opt["state"].items():
            for name, v in st.items():
                weights[f"opt.{i}.{name}"] = torch.as_tensor(v).detach().cpu().contiguous()
        buffer: dict[str, torch.Tensor] = {}
        if self.buffer:
            buffer = {"inputs": torch.stack([b[0] for b in self.buffer]).contiguous(),
                      "targets": torch.stack([b[1] for b in self.buffer]).contiguous(),
                      "classes": torch.tensor([b[2] for b in self.buffer], dtype=torch.int64)}
        meta = {
            "format": STATE_FORMAT,
            "base": {"fingerprint": self.fingerprint, "classes": self.class_names},
            "config": self.config.to_dict(),
            "n_updates": self.n_updates,
            "alphas": self.alphas,
            "extents": self.extents,
            "optimizer": {"param_groups": [{k: v for k, v in g.items() if k != "params"}
                                           for g in opt["param_groups"]],
                          "state_keys": {str(i): sorted(st) for i, st in opt["state"].items()}},
        }
        return meta, weights, buffer

    def save(self, directory: str | Path) -> Path:
        """Write the state into ``directory`` (created if needed) atomically; returns ``directory/state.json``.

        Raises:
            OnlineStateError: ``directory`` holds files but no online state (refused, nothing written).
        """
        from safetensors.torch import save_file

        d = Path(directory)
        check_state_dir(d, must_exist=False)
        d.mkdir(parents=True, exist_ok=True)
        meta, weights, buffer = self.state_dict()
        tag = uuid.uuid4().hex[:12]
        files = {"weights": f"weights-{tag}.safetensors", "buffer": f"buffer-{tag}.safetensors"}
        written = []
        try:
            for role, tensors in (("weights", weights), ("buffer", buffer)):
                path = d / files[role]
                save_file(tensors, str(path))
                written.append(path)
                _fsync(path)
            meta["files"] = files
            meta["sha256"] = {name: _sha256_file(d / name) for name in files.values()}
            meta["checksum"] = state_checksum(meta)
            tmp = d / f".{STATE_FILE}.{tag}.tmp"
            tmp.write_text(json.dumps(meta, indent=1))
            written.append(tmp)
            _fsync(tmp)
            os.replace(tmp, d / STATE_FILE)
            _fsync_dir(d)
        except BaseException:
            for p in written:
                p.unlink(missing_ok=True)
            raise
        keep = set(files.values()) | {STATE_FILE}
        for p in d.iterdir():  # files of earlier saves and temporaries of crashed ones
            if p.name not in keep and (p.name.startswith(("weights-", "buffer-")) or p.name.endswith(".tmp")):
                p.unlink(missing_ok=True)
        return d / STATE_FILE

    @classmethod
    def load(cls, directory: str | Path, module, trusted_modules: Sequence[str] | None = None) -> OnlineCorrector:
        """Load a state written by :meth:`save` for ``module``.

        Raises:
            OnlineStateError: not a state, damaged (unparsable JSON, a missing or altered tensor file, tensors that
                do not fit), or made for another model or class list.
        """
        from safetensors.torch import load_file

        d = Path(directory)
        check_state_dir(d, must_exist=True)
        try:
            meta = json.loads((d / STATE_FILE).read_text())
        except (OSError, ValueError) as e:
            raise OnlineStateError(f"{d}: damaged online state ({STATE_FILE} unreadable: {e})") from None
        if not isinstance(meta, dict) or meta.get("format") != STATE_FORMAT:
            raise OnlineStateError(f"{d}: {STATE_FILE} is not a cfseg online state (format "
                                   f"{meta.get('format') if isinstance(meta, dict) else None!r}, expected "
                                   f"{STATE_FORMAT!r})")
        base = meta.get("base") or {}
        names = list(module.bank.names)
        if base.get("classes") != names:
            raise OnlineStateError(f"{d}: this online state was made for a model with classes {base.get('classes')}, "
                                   f"the checkpoint has {names}; start a new state directory for this checkpoint")
        fp = model_fingerprint(module)
        if base.get("fingerprint") != fp:
            raise OnlineStateError(f"{d}: this online state was made for another checkpoint (weights fingerprint "
                                   f"{str(base.get('fingerprint'))[:12]}..., this checkpoint {fp[:12]}...); an "
                                   f"online state is bound to the model it corrects: start a new state directory")
        if meta.get("checksum") != state_checksum(meta):
            raise OnlineStateError(f"{d}: damaged online state ({STATE_FILE} does not match its checksum: it was "
                                   f"edited or damaged; a state is changed only by cfseg-correct)")
        try:
            check_state_fields(meta, names)
        except ValueError as e:
            raise OnlineStateError(f"{d}: damaged online state ({STATE_FILE}: {e})") from None
        try:
            files = meta["files"]
            for name in files.values():
                if Path(name).name != name:
                    raise OnlineStateError(f"{d}: damaged online state (file name {name!r} is not a plain name)")
                p = d / name
                if not p.is_file():
                    raise OnlineStateError(f"{d}: damaged online state ({name} is missing)")
                if _sha256_file(p) != meta["sha256"][name]:
                    raise OnlineStateError(f"{d}: damaged online state ({name} does not match its checksum)")
            weights = load_file(str(d / files["weights"]))
            buffer = load_file(str(d / files["buffer"]))
            obj = cls(module, OnlineConfig.from_dict(meta["config"]), trusted_modules=trusted_modules)
            obj.aux.load_state_dict({k[4:]: v for k, v in weights.items() if k.startswith("aux.")})
            opt_state: dict[int, dict[str, torch.Tensor]] = {}
            for key, v in weights.items():
                if key.startswith("opt."):
                    _, i, name = key.split(".", 2)
                    opt_state.setdefault(int(i), {})[name] = v
            groups = meta["optimizer"]["param_groups"]
            n_params = len(list(obj.aux.parameters()))
            if len(groups) != 1:
                raise OnlineStateError(f"{d}: damaged online state (expected one optimiser group, got {len(groups)})")
            fresh = {k for k in obj.optimizer.param_groups[0] if k != "params"}
            if set(groups[0]) - fresh:
                raise OnlineStateError(f"{d}: damaged online state ({STATE_FILE}: unknown optimiser setting(s) "
                                       f"{sorted(set(groups[0]) - fresh)})")
            obj.optimizer.load_state_dict({"state": opt_state, "param_groups": [{**groups[0],
                                                                                  "params": list(range(n_params))}]})
            if buffer:
                inputs, targets, classes = buffer["inputs"], buffer["targets"], buffer["classes"].tolist()
                if not len(inputs) == len(targets) == len(classes):
                    raise OnlineStateError(f"{d}: damaged online state (buffer tensors of different lengths)")
                for x, y, k in zip(inputs, targets, classes, strict=True):
                    if not 1 <= int(k) < len(names):
                        raise OnlineStateError(f"{d}: damaged online state (buffer class {k} out of range)")
                    obj.buffer.append((x, y, int(k)))
            obj.alphas = {str(k): [float(a) for a in v] for k, v in meta["alphas"].items()}
            obj.extents = {str(k): [float(a) for a in v] for k, v in meta["extents"].items()}
            obj.n_updates = int(meta["n_updates"])
        except OnlineStateError:
            raise
        except Exception as e:  # KeyError, RuntimeError (shapes), safetensors errors, ...
            raise OnlineStateError(f"{d}: damaged online state ({type(e).__name__}: {' '.join(str(e).split())[:300]})"
                                   ) from None
        return obj

    @classmethod
    def open(cls, directory: str | Path, module, config: OnlineConfig | Mapping[str, Any] | None = None,
             trusted_modules: Sequence[str] | None = None) -> OnlineCorrector:
        """The state in ``directory`` if there is one (``config`` must then be None), else a new corrector
        (``directory`` missing or empty); a folder with other files is refused."""
        d = Path(directory)
        if (d / STATE_FILE).is_file():
            if config is not None:
                raise OnlineStateError(f"{d}: already holds an online state; its settings are fixed (leave out the "
                                       f"configuration, or start a new state directory)")
            return cls.load(d, module, trusted_modules)
        check_state_dir(d, must_exist=False)
        return cls(module, config, trusted_modules)


def _in_channels(module) -> int:
    """Image channels the cfseg module's network takes."""
    init = (module.hparams.get("backbone") or {}).get("init_args", {}) if hasattr(module, "hparams") else {}
    return int(init.get("in_channels", 1))


def _hard_dice(pred: torch.Tensor, target: torch.Tensor) -> float:
    p, t = pred.bool(), target.bool()
    s = int(p.sum()) + int(t.sum())
    return 1.0 if s == 0 else 2.0 * int((p & t).sum()) / s


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        _fsync(path)
    except OSError:  # some file systems do not fsync directories
        pass
