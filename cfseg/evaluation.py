"""Scoring a trained module on the cases of one or more datasets (per-class Dice, partial annotation aware)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from cfseg.data.datamodule import DatasetConfig, SegDataModule
from cfseg.data.transforms import build_transforms
from cfseg.inference import predict_volume
from cfseg.metrics import DICE_CONVENTION, dice_per_class, mean_ignore_nan
from cfseg.module import CFSegModule


def evaluate_datasets(
    module: CFSegModule,
    datasets: Sequence[DatasetConfig | dict],
    split: str = "test",
    classes: Sequence[str] | None = None,
    seed: int = 0,
    device: str = "cpu",
    keep_first: bool = False,
    postprocess: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Dice per class on a split of ``datasets``, predicted with ``module``.

    Args:
        module: trained module (its vocabulary and preprocessing are used).
        datasets: dataset configs (their split settings decide which cases are in ``split``; use ``"all"`` to
            score every case).
        split: ``"train"``, ``"val"``, ``"test"`` or ``"all"``.
        classes: score only these classes (default: every class annotated in a case). A case is scored only
            on classes annotated for it.
        seed: split seed (the same as in training, so test cases are the held-out ones).
        device: where the network runs.
        keep_first: also return the first case's volume and prediction (for plots).
        postprocess: applied to each case's predicted labels [*S] before they are scored (e.g. keeping each
            class's largest connected component); None scores the prediction as it is.

    Returns:
        ``{"per_class_dice": {name: mean}, "mean_dice": float, "n_cases": int, "dice_convention": str}``
        (classes never annotated in the scored cases are NaN and left out of the mean); with a router
        (LoRA experts of several domains) also ``routing_accuracy``: the fraction of cases routed to an expert of
        their own dataset's domain.
    """
    return evaluate_groups(module, [(datasets, classes)], split=split, seed=seed, device=device,
                           keep_first=keep_first, postprocess=postprocess)[0]


def evaluate_groups(
    module: CFSegModule,
    groups: Sequence[tuple[Sequence[DatasetConfig | dict], Sequence[str] | None]],
    split: str = "test",
    seed: int = 0,
    device: str = "cpu",
    keep_first: bool = False,
    postprocess: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> list[dict[str, Any]]:
    """:func:`evaluate_datasets` for several (datasets, classes) groups, each case predicted once.

    Groups that share cases (for example the stages of a protocol, which share one test set but score
    different classes) reuse the prediction of a case (keyed by dataset folder and case id) instead of running
    the network again; each group still reads the label with its own annotated classes.

    Returns:
        one result dict per group, as :func:`evaluate_datasets` returns.
    """
    pre = next(iter(module.preprocessing.values()))
    names = module.bank.names
    predictions: dict[tuple[str, str], torch.Tensor] = {}
    routes: dict[tuple[str, str], bool] = {}  # LoRA experts: was the case routed to an expert of its own domain?
    results = []
    for datasets, classes in groups:
        configs = [d if isinstance(d, DatasetConfig) else DatasetConfig(**d) for d in datasets]
        if split == "all":
            configs = [replace(c, val_fraction=0.0, test_fraction=0.0, split_file=None) for c in configs]
        dm = SegDataModule(configs, classes=module.class_names, spacing=tuple(pre["spacing"]),
                           ct_window=tuple(pre.get("ct_window", (-175.0, 250.0))), cache="none", seed=seed)
        wanted = set(range(1, len(names))) if classes is None else {module.bank.index(c) for c in classes}
        scores: dict[str, list[float]] = {names[k]: [] for k in sorted(wanted)}
        n_cases, first, routed = 0, None, []
        for ds in dm.datasets:
            items = dm.items(ds, "train" if split == "all" else split)
            if not items:
                continue
            transform = build_transforms(dm.preprocessing(ds.info.modality), train=False)
            for item in items:
                vol = transform(item)
                key = (str(Path(ds.config.path).resolve()), item["case_id"])
                labels = predictions.get(key)
                if keep_first and first is None:  # one pass gives the plot's similarity maps and the labels
                    first = (vol, predict_volume(module, vol["image"], device=device,
                                                 similarity=module.head.has_similarity))
                    labels = first[1]["labels"]
                elif labels is None:
                    labels = predict_volume(module, vol["image"], device=device)["labels"]  # uint8 [*S]
                route = getattr(module, "last_route", None)
                if key not in routes and key not in predictions and route is not None:
                    routes[key] = str(ds.domain) in route["domains"]
                if key in routes:
                    routed.append(routes[key])
                if len(groups) > 1:  # kept only where a later group may score the same case
                    predictions[key] = labels
                ks = [k for k in torch.nonzero(vol["annotated"]).flatten().tolist() if k in wanted]
                scored = labels if postprocess is None else postprocess(labels)
                dices = dice_per_class(scored, vol["label"][0].long(), ks).tolist()
                for k, d in zip(ks, dices, strict=True):
                    scores[names[k]].append(d)
                n_cases += 1
        per_class = {n: (mean_ignore_nan(v) if v else float("nan")) for n, v in scores.items()}
        result: dict[str, Any] = {
            "per_class_dice": per_class,
            "mean_dice": mean_ignore_nan(list(per_class.values())),
            "n_cases": n_cases,
            "dice_convention": DICE_CONVENTION,
        }
        if routed:  # the router chose an expert of the case's own domain (domain-incremental experts)
            result["routing_accuracy"] = sum(routed) / len(routed)
        if keep_first:
            result["first"] = first
        results.append(result)
    return results
