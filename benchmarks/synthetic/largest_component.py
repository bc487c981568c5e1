"""Does keeping each organ's largest connected component raise a checkpoint's Dice? (post-processing check)

nnU-Net keeps the largest component of a class where that helps on validation. This scores a checkpoint on every
case of the given datasets twice: as predicted, and with all but the largest 26-connected component of each
class set to background.

    python benchmarks/synthetic/largest_component.py --ckpt results/demo/cfseg-demo.ckpt \
        --data data/demo_check/Dataset061_val_ct
"""

from __future__ import annotations

import argparse
from functools import partial

import numpy as np
import torch
from scipy import ndimage

from cfseg.data.datamodule import DatasetConfig
from cfseg.evaluation import evaluate_datasets
from cfseg.module import load_checkpoint


def keep_largest_components(labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    """``labels`` [*S] with every class 1..n_classes-1 cut to its largest 26-connected component."""
    out = labels.clone()
    for k in range(1, n_classes):
        cc, n = ndimage.label((labels == k).numpy(), structure=np.ones((3, 3, 3)))
        if n > 1:
            largest = 1 + np.bincount(cc.ravel())[1:].argmax()
            out[torch.from_numpy((cc > 0) & (cc != largest))] = 0
    return out


def main(argv: list[str] | None = None) -> dict[str, dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True)
    p.add_argument("--data", nargs="+", required=True, help="dataset folders; every case is scored")
    a = p.parse_args(argv)
    module = load_checkpoint(a.ckpt)
    datasets = [DatasetConfig(root) for root in a.data]
    out = {}
    for name, post in (("predicted", None),
                       ("largest_component", partial(keep_largest_components, n_classes=len(module.bank.names)))):
        r = evaluate_datasets(module, datasets, split="all", postprocess=post)
        out[name] = {"mean": r["mean_dice"], **r["per_class_dice"]}
        print(f"{name}: mean {r['mean_dice']:.4f} | "
              + ", ".join(f"{c} {v:.3f}" for c, v in r["per_class_dice"].items()))
    return out


if __name__ == "__main__":
    main()
