"""Where a cfseg training step's time goes (one thread): data loading, backbone, cosine head, partial-label loss.

* data: ms per training batch of :class:`cfseg.data.datamodule.SegDataModule` over ``--cases`` cached OpenKBP
  volumes (class-balanced crops, the OpenKBP base config's spacing, patch, batch and window);
* step parts on a fixed batch of the same shape (4 x 64^3, 7 organs): backbone alone, backbone + cosine head,
  the full ``training_step`` (forward, backward, AdamW); and the loss alone (forward + backward on random logits)
  for cfseg's partial-label loss, fully and partially annotated, against MONAI's DiceCELoss.

Medians over ``--reps`` repetitions (the first one dropped). Example::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/step_breakdown.py --cases 12
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import yaml

ORGANS = ["brainstem", "spinal_cord", "parotid_gland_right", "parotid_gland_left", "esophagus", "larynx", "mandible"]


def median_s(fn, reps: int) -> float:
    times = []
    for _ in range(reps + 1):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times[1:])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/openkbp/base.yaml")
    p.add_argument("--data", default="../shared/data/openkbp_oar")
    p.add_argument("--cases", type=int, default=12)
    p.add_argument("--reps", type=int, default=3)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    from monai.losses import DiceCELoss

    from cfseg.data.datamodule import DatasetConfig, SegDataModule
    from cfseg.losses import partial_label_loss
    from cfseg.module import CFSegModule

    cfg = yaml.safe_load(Path(a.config).read_text())
    d = cfg["data"]
    if Path(a.data).is_dir():
        dm = SegDataModule([DatasetConfig(a.data, max_cases=a.cases, val_fraction=0.0, test_fraction=0.0)],
                           spacing=d["spacing"], patch_size=d["patch_size"], batch_size=d["batch_size"],
                           samples_per_volume=d["samples_per_volume"], ct_window=d["ct_window"])
        dm.setup("fit")
        loader = dm.train_dataloader()
        next(iter(loader))
        t, n = time.perf_counter(), 0
        for _ in range(3):
            for _batch in loader:
                n += 1
        print(f"data: {(time.perf_counter() - t) / n * 1000:.0f} ms per batch over {n} batches")
    else:
        print(f"data: skipped ({a.data} not found)")

    torch.manual_seed(0)
    m = CFSegModule(class_names=ORGANS, backbone=cfg["model"]["backbone"],
                    feature_channels=cfg["model"]["feature_channels"])
    m.log = lambda *args, **kwargs: None
    n = d["batch_size"] * d["samples_per_volume"]
    k = len(ORGANS) + 1
    x = torch.rand(n, 1, *d["patch_size"])
    y = torch.randint(0, k, (n, 1, *d["patch_size"])).to(torch.uint8)
    batch = {"image": x, "label": y, "annotated": torch.ones(n, k, dtype=torch.bool)}
    opt = torch.optim.AdamW(m.parameters(), 1e-3)

    def step(out):
        opt.zero_grad()
        out.backward()
        opt.step()

    print(f"backbone: {median_s(lambda: step(m.net.features(x).mean()), a.reps):.3f} s")
    print(f"backbone + cosine head: {median_s(lambda: step(m._logits(m.net.features(x)).mean()), a.reps):.3f} s")
    print(f"full training_step: {median_s(lambda: step(m.training_step(batch, 0)), a.reps):.3f} s")
    logits = torch.randn(n, k, *d["patch_size"], requires_grad=True)
    target = y[:, 0].long()
    partial = batch["annotated"].clone()
    partial[:, 5:7] = False
    target_partial = target.masked_fill((target == 5) | (target == 6), 0)
    dice_ce = DiceCELoss(to_onehot_y=True, softmax=True)
    def cfseg_loss(t, ann):
        return lambda: partial_label_loss(logits, t, ann, batch_dice=True).backward()

    print(f"loss, all annotated: {median_s(cfseg_loss(target, batch['annotated']), a.reps):.3f} s")
    print(f"loss, 2 classes unannotated: {median_s(cfseg_loss(target_partial, partial), a.reps):.3f} s")
    print(f"MONAI DiceCELoss: {median_s(lambda: dice_ce(logits, y.long()).backward(), a.reps):.3f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
