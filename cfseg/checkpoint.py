"""The checkpoint as data: what a cfseg checkpoint holds besides the weights, read without running its code.

``checkpoint["cfseg"]`` holds the format tag, the vocabulary (class names in index order), the prototype bank
(prototypes, prompts, encoder id), the preprocessing per modality, the head, the stage history, the experts
(records, LoRA layout, router statistics), the accumulated EWC Fisher and the strategy's own state;
``checkpoint["hyper_parameters"]`` holds the module's settings (network specs as ``{class_path, init_args}``, the
strategy as its spec). Files are read with ``torch.load(weights_only=True)``: no pickled code; the network is
built only from the allow-list of :mod:`cfseg.builder` (:func:`cfseg.module.load_checkpoint`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from cfseg.continual.stages import StageStatistics
from cfseg.continual.strategy import build_strategy
from cfseg.losses import LossWeights

CHECKPOINT_FORMAT = "cfseg-checkpoint-v1"

#: module settings of checkpoints written before strategies were objects -> their ``statistics`` field
LEGACY_STATISTICS = {"router_layer": "router_layer", "router_gamma": "router_gamma",
                     "router_random_features": "router_random_features", "router_batches": "router_batches",
                     "router_modality_gamma": "router_modality_gamma", "ewc_fisher_batches": "fisher_batches"}
#: ... and their ``loss_weights`` fields
LEGACY_LOSS_WEIGHTS = ("ce_weight", "dice_weight", "batch_dice", "exclusion_weight", "entropy_weight")


def canonical(value: Any) -> Any:
    """``value`` as plain JSON data (tuples and lists compare equal)."""
    return json.loads(json.dumps(value, default=str))


def merge_preprocessing(known: dict[str, Any], new: dict[str, Any], where: str | None = None) -> dict[str, Any]:
    """Preprocessing per modality of every domain seen so far: ``known`` plus ``new``'s modalities.

    A model that learnt CT in one stage and MRI in the next must still read CT, so nothing is dropped; one
    modality preprocessed two ways (another spacing, window, orientation) is an error, because the weights
    learnt on one cannot serve both.

    Raises:
        ValueError: a modality present in both with different settings.
    """
    out = dict(known or {})
    for modality, pre in (new or {}).items():
        if modality in out and canonical(out[modality]) != canonical(pre):
            raise ValueError(
                f"two preprocessings for {modality!r}: {canonical(out[modality])} (learnt earlier) "
                f"vs {canonical(pre)} ({where or 'new'}); keep the earlier spacing, orientation and "
                "intensity settings for this modality"
            )
        out.setdefault(modality, pre)
    return out


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """A cfseg checkpoint file as data (``weights_only=True``).

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not a loadable cfseg checkpoint.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: checkpoint not found")
    try:
        ckpt = torch.load(p, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises several types for non-checkpoints
        raise ValueError(load_error_message(p, e)) from e
    check_format(ckpt, str(p))
    return ckpt


def load_error_message(path: str | Path, err: BaseException) -> str:
    """One whole line ``<path>: not a loadable cfseg checkpoint: <why>`` for a file ``torch.load(weights_only=True)``
    refused. torch's own messages are not passed on: they are long, and for a file holding more than tensors and
    numbers they suggest loading with ``weights_only`` off, which would run whatever code the file names."""
    p = Path(path)
    try:
        size = p.stat().st_size
        with open(p, "rb") as f:
            head = f.read(4)
    except OSError:
        size, head = -1, b""
    kind = type(err).__name__
    if size == 0:
        why = "empty file (0 bytes)"
    elif head != b"PK\x03\x04":
        why = "the file is damaged or not a cfseg checkpoint (it is not a torch zip archive)"
    elif "weights only load failed" in str(err).lower() or kind == "UnpicklingError":
        why = ("the file is damaged or not a cfseg checkpoint: it holds something other than tensors, numbers and "
               "strings (cfseg never loads code from a checkpoint)")
    else:  # a zip archive torch cannot read: cut off (central directory missing) or corrupt
        why = (f"the file is damaged: its zip archive ends early or is corrupt ({size} bytes, {kind}; a truncated "
               "or interrupted copy?); re-copy or re-save it")
    return f"{p}: not a loadable cfseg checkpoint: {why}"


def check_format(ckpt: Any, where: str = "checkpoint") -> dict[str, Any]:
    """``ckpt["cfseg"]`` after checking the format tag.

    Raises:
        ValueError: not a cfseg checkpoint.
    """
    meta = ckpt.get("cfseg") if isinstance(ckpt, dict) else None
    if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{where}: not a cfseg checkpoint (no 'cfseg' metadata of format {CHECKPOINT_FORMAT})")
    return meta


def check_fisher(fisher: Any) -> dict[str, torch.Tensor] | None:
    """The stored EWC Fisher (a dict of tensors) or None.

    Raises:
        ValueError: anything else.
    """
    if fisher is not None and not (isinstance(fisher, dict) and all(isinstance(v, torch.Tensor)
                                                                    for v in fisher.values())):
        raise ValueError("damaged cfseg checkpoint: 'ewc_fisher' is not a dict of tensors")
    return fisher


def module_settings(hparams: dict[str, Any], allowed: set[str]) -> dict[str, Any]:
    """The module settings a stored ``hyper_parameters`` gives, restricted to ``allowed`` names; the flat router,
    Fisher and loss settings of older checkpoints become ``statistics`` and ``loss_weights``."""
    out = {k: v for k, v in hparams.items() if k in allowed}
    legacy = {new: hparams[old] for old, new in LEGACY_STATISTICS.items() if old in hparams}
    if legacy and "statistics" in allowed and not isinstance(hparams.get("statistics"), dict):
        out["statistics"] = legacy
    loss = {k: hparams[k] for k in LEGACY_LOSS_WEIGHTS if k in hparams}
    if loss and "loss_weights" in allowed and not isinstance(hparams.get("loss_weights"), dict):
        out["loss_weights"] = loss
    return out


def effective_settings(model: dict[str, Any], default_backbone: dict[str, Any]) -> dict[str, Any]:
    """Model settings as a run records them, for comparing two runs: the backbone's default filled in, the
    strategy as its full spec (defaults resolved), statistics with every field; in a first stage (no
    ``previous_checkpoint``) only the strategy's class and no ``incremental_lr_factor``, which act only later."""
    out = dict(model)
    out["backbone"] = out.get("backbone") or default_backbone
    incremental = out.get("previous_checkpoint") is not None
    if "strategy" in out:
        spec = build_strategy(out["strategy"]).spec()
        out["strategy"] = spec if incremental else {"class_path": spec["class_path"]}
    if "statistics" in out:
        out["statistics"] = StageStatistics.build(out["statistics"]).to_dict()
    if "loss_weights" in out:
        out["loss_weights"] = LossWeights.build(out["loss_weights"]).to_dict()
    if not incremental:
        out.pop("incremental_lr_factor", None)
    return canonical(out)
