"""Dice per class with partial annotation, tables, accuracy matrix and backward transfer.

Dice convention (used by every table cfseg writes): for one case and class, 2|P∩G| / (|P| + |G|); when both
prediction and ground truth are empty the Dice is 1, when only one is empty it is 0. A case is scored only on
the classes annotated for it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torchmetrics import Metric

DICE_CONVENTION = "empty prediction and empty ground truth: Dice 1; only one empty: 0; only annotated classes scored"


def dice_per_class(pred: torch.Tensor, target: torch.Tensor, classes: Sequence[int]) -> torch.Tensor:
    """Dice of each class index for one case.

    Args:
        pred: predicted label map [*S] (int).
        target: ground-truth label map [*S] (int), same shape.
        classes: class indices to score.

    Returns:
        float tensor [len(classes)].
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
    out = torch.empty(len(classes), dtype=torch.float64)
    for i, k in enumerate(classes):
        p, g = pred == k, target == k
        denom = int(p.sum()) + int(g.sum())
        out[i] = 1.0 if denom == 0 else 2.0 * int((p & g).sum()) / denom
    return out


def mean_ignore_nan(values: Sequence[float]) -> float:
    vals = [v for v in values if not math.isnan(v)]
    return float(sum(vals) / len(vals)) if vals else float("nan")


def dice_table(per_class: Mapping[str, float], title: str = "Dice") -> str:
    """A plain-text table of per-class Dice with the mean over classes that were scored."""
    width = max([len(n) for n in per_class] + [10])
    lines = [f"{'class':<{width}}  {title:>8}", "-" * (width + 10)]
    for name, v in per_class.items():
        lines.append(f"{name:<{width}}  {v:>8.3f}" if not math.isnan(v) else f"{name:<{width}}  {'n/a':>8}")
    lines.append("-" * (width + 10))
    lines.append(f"{'mean':<{width}}  {mean_ignore_nan(list(per_class.values())):>8.3f}")
    return "\n".join(lines)


def backward_transfer(R: Sequence[Sequence[float]]) -> float:
    """BWT = mean over j < T of (R[T][j] - R[j][j]) for an accuracy matrix R (T = last stage)."""
    T = len(R) - 1
    if T < 1:
        return float("nan")
    return float(sum(R[T][j] - R[j][j] for j in range(T)) / T)


def average_after_last(R: Sequence[Sequence[float]]) -> float:
    """Mean of the last row of R: average Dice over all stages' test sets after the last stage."""
    return float(sum(R[-1]) / len(R[-1]))


class PerClassDice(Metric):
    """Mean Dice per class over cases, where each case contributes only its annotated classes.

    States are sums and counts per class (summed across processes), so every rank computes the same result
    with one synchronisation, whichever classes its own cases annotate.

    Args:
        num_classes: K + 1 (index 0, background, is never scored).
    """

    full_state_update = False

    def __init__(self, num_classes: int, **kwargs):
        super().__init__(**kwargs)
        self.add_state("total", default=torch.zeros(num_classes, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.zeros(num_classes, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, classes: Sequence[int], dice: torch.Tensor) -> None:
        """Add one case's Dice ``dice`` [len(classes)] for class indices ``classes``."""
        for k, d in zip(classes, dice.tolist(), strict=True):
            self.total[k] += d
            self.count[k] += 1

    def compute(self) -> torch.Tensor:
        """[K+1] mean Dice per class; NaN where a class was never scored."""
        out = self.total / self.count
        out[self.count == 0] = float("nan")
        return out
