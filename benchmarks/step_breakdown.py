"""Where a cfseg training step's time goes (one thread): data loading, backbone, heads, losses, full steps.

* data: ms per training batch of :class:`cfseg.data.datamodule.SegDataModule` over ``--cases`` cached OpenKBP
  volumes (class-balanced crops, the OpenKBP base config's spacing, patch, batch and window);
* on a fixed batch of the same shape (4 x 64^3, 7 organs), each forward + backward (+ AdamW where a step):
  the backbone alone; backbone + cosine head; backbone + ``1x1x1`` conv head; the full cfseg ``training_step``;
  the plain MONAI step (backbone + conv head + ``DiceCELoss`` + AdamW, what ``train_throughput.py`` compares
  against); and the losses alone on random logits: cfseg's partial-label loss (fused) and its composed reference
  (``losses._partial_label_loss_reference``), fully and partially annotated, and MONAI's ``DiceCELoss``.
  ``--partial`` runs the full steps with two classes unannotated in every sample.

The parts are interleaved (one round runs each once, ``--reps`` rounds after a warm-up round), so load from
other processes hits all of them alike. Each part reports the median wall time and the median CPU time of this
thread (``time.thread_time``: user + system, page faults included; descheduled time excluded, so it is the
steadier number on a shared machine).

``--malloc-keep`` first raises glibc's mmap and trim thresholds (``mallopt``), so freed blocks above 32 MiB stay
in the heap and are reused instead of being unmapped and page-faulted in afresh on their next use: it shows
the steps' pure compute, without the allocation cost that weighs on every full-resolution temporary here.
Example::

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


def interleaved(parts: dict, reps: int) -> dict[str, tuple[float, float]]:
    """``{name: (median wall s, median thread CPU s)}`` over ``reps`` rounds after one warm-up round."""
    wall: dict[str, list[float]] = {k: [] for k in parts}
    cpu: dict[str, list[float]] = {k: [] for k in parts}
    for r in range(reps + 1):
        for name, fn in parts.items():
            t, c = time.perf_counter(), time.thread_time()
            fn()
            if r:
                wall[name].append(time.perf_counter() - t)
                cpu[name].append(time.thread_time() - c)
    return {k: (statistics.median(wall[k]), statistics.median(cpu[k])) for k in parts}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/openkbp/base.yaml")
    p.add_argument("--data", default="../shared/data/openkbp_oar")
    p.add_argument("--cases", type=int, default=12, help="cached cases for the data row (0: skip it)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--partial", action="store_true", help="full steps with two classes unannotated")
    p.add_argument("--malloc-keep", action="store_true", help="glibc: keep freed large blocks (see above)")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    if a.malloc_keep:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        if not (libc.mallopt(m_mmap_threshold, 2**30) and libc.mallopt(m_trim_threshold, 2**31 - 1)):
            raise SystemExit("mallopt failed (not glibc?)")
    from monai.losses import DiceCELoss

    from cfseg.builder import build_network
    from cfseg.data.datamodule import DatasetConfig, SegDataModule
    from cfseg.losses import _partial_label_loss_reference, partial_label_loss
    from cfseg.module import CFSegModule

    cfg = yaml.safe_load(Path(a.config).read_text())
    d = cfg["data"]
    if a.cases and Path(a.data).is_dir():
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
        print(f"data: skipped ({a.data} not found or --cases 0)")

    torch.manual_seed(0)
    f = cfg["model"]["feature_channels"]
    m = CFSegModule(class_names=ORGANS, backbone=cfg["model"]["backbone"], feature_channels=f)
    m.log = lambda *args, **kwargs: None
    n = d["batch_size"] * d["samples_per_volume"]
    k = len(ORGANS) + 1
    x = torch.rand(n, 1, *d["patch_size"])
    y = torch.randint(0, k, (n, 1, *d["patch_size"])).to(torch.uint8)
    full = torch.ones(n, k, dtype=torch.bool)
    partial = full.clone()
    partial[:, 5:7] = False
    y_partial = y.masked_fill((y == 5) | (y == 6), 0)
    batch = ({"image": x, "label": y_partial, "annotated": partial} if a.partial
             else {"image": x, "label": y, "annotated": full})
    opt = torch.optim.AdamW(m.parameters(), 1e-3)
    conv = torch.nn.Conv3d(f, k, 1)
    torch.manual_seed(0)
    plain = torch.nn.Sequential(build_network(cfg["model"]["backbone"]), torch.nn.Conv3d(f, k, 1))
    plain_opt = torch.optim.AdamW(plain.parameters(), 1e-3)
    dice_ce = DiceCELoss(to_onehot_y=True, softmax=True)
    y_plain = batch["label"].long()

    def step(out):
        opt.zero_grad(set_to_none=True)
        out.backward()
        opt.step()

    def plain_step():
        loss = dice_ce(plain(x), y_plain)
        plain_opt.zero_grad(set_to_none=True)
        loss.backward()
        plain_opt.step()

    logits = torch.randn(n, k, *d["patch_size"], requires_grad=True)
    target, target_partial = y[:, 0].long(), y_partial[:, 0].long()

    def loss_fn(fn, t, ann):
        def run():
            logits.grad = None
            fn(logits, t, ann, batch_dice=True).backward()
        return run

    def monai_loss():
        logits.grad = None
        dice_ce(logits, y.long()).backward()

    parts = {
        "backbone": lambda: step(m.net.features(x).mean()),
        "backbone + cosine head": lambda: step(m.logits_from_features(*m.net.encode(x)).mean()),
        "backbone + conv head": lambda: step(conv(m.net.features(x)).mean()),
        f"full cfseg training_step{' (partial)' if a.partial else ''}": lambda: step(m.training_step(batch, 0)),
        "plain MONAI step (conv head, DiceCELoss)": plain_step,
        "loss fused, all annotated": loss_fn(partial_label_loss, target, full),
        "loss fused, 2 classes unannotated": loss_fn(partial_label_loss, target_partial, partial),
        "loss reference, all annotated": loss_fn(_partial_label_loss_reference, target, full),
        "loss reference, 2 classes unannotated": loss_fn(_partial_label_loss_reference, target_partial, partial),
        "loss MONAI DiceCELoss": monai_loss,
    }
    res = interleaved(parts, a.reps)
    width = max(map(len, parts))
    print(f"{'part':<{width}}  wall (s)  CPU (s)")
    for name, (w, c) in res.items():
        print(f"{name:<{width}}  {w:8.3f}  {c:7.3f}")
    step_name = next(s for s in parts if s.startswith("full cfseg"))
    (w1, c1), (w0, c0) = res[step_name], res["plain MONAI step (conv head, DiceCELoss)"]
    print(f"full cfseg step / plain MONAI step: wall {w1 / w0:.3f}, CPU {c1 / c0:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
