"""Does keeping each organ's largest connected component raise a checkpoint's Dice? (post-processing check)

nnU-Net keeps the largest component of a class where that helps on validation. This scores a checkpoint on every
case of the given datasets twice: as predicted, and with all but the largest 26-connected component of each
class set to background.

    python benchmarks/synthetic/largest_component.py --ckpt results/demo/cfseg-demo.ckpt \
        --data data/demo_check/Dataset061_val_ct
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from scipy import ndimage

from cfseg.data.datamodule import DatasetConfig, SegDataModule
from cfseg.data.transforms import build_transforms
from cfseg.inference import predict_volume
from cfseg.metrics import dice_per_class
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


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True)
    p.add_argument("--data", nargs="+", required=True, help="dataset folders; every case is scored")
    a = p.parse_args(argv)
    module = load_checkpoint(a.ckpt)
    pre, names = next(iter(module.preprocessing.values())), module.bank.names
    scores: dict[str, dict[str, list[float]]] = {"predicted": {}, "largest_component": {}}
    for root in a.data:
        dm = SegDataModule([DatasetConfig(root, val_fraction=0.0, test_fraction=0.0)], classes=module.class_names,
                           spacing=tuple(pre["spacing"]), ct_window=tuple(pre.get("ct_window", (-175.0, 250.0))),
                           cache="none")
        ds = dm.datasets[0]
        transform = build_transforms(dm.preprocessing(ds.info.modality), train=False)
        for item in dm.items(ds, "train"):
            vol = transform(item)
            labels = predict_volume(module, vol["image"], probabilities=False)["labels"]
            target = vol["label"][0].long()
            classes = [k for k in torch.nonzero(vol["annotated"]).flatten().tolist() if k > 0]  # annotated here
            kept = keep_largest_components(labels, len(names))
            for name, pred in (("predicted", labels), ("largest_component", kept)):
                for k, d in zip(classes, dice_per_class(pred, target, classes).tolist(), strict=True):
                    scores[name].setdefault(names[k], []).append(d)
    out = {}
    for name, per_case in scores.items():
        per_class = {c: float(np.nanmean(v)) for c, v in per_case.items()}
        out[name] = {"mean": float(np.mean(list(per_class.values()))), **per_class}
        print(f"{name}: mean {out[name]['mean']:.4f} | " + ", ".join(f"{c} {v:.3f}" for c, v in per_class.items()))
    return out


if __name__ == "__main__":
    main()
