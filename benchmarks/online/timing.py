"""Seconds per correction update and per fused segmentation for a 128^3 case with 7 classes.

A real OpenKBP case (image, frozen probabilities of a checkpoint, ground truth as the correction) is resized to
128^3 (trilinear; labels nearest). The corrector first learns from ``--warm`` cases (so the buffer is full, the
largest batch an update trains on, and the fusion acts on every class), then each of ``--repeats`` updates and
fused segmentations is timed. The frozen model's own pass is not included (it is the segmentation the user
reviewed).

    OMP_NUM_THREADS=2 python benchmarks/online/timing.py --ckpt <checkpoint> --threads 2 \
        --out benchmarks/online/timing.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from stream import frozen_probs, stream_cases  # noqa: E402

from cfseg.module import load_checkpoint  # noqa: E402
from cfseg.online import OnlineCorrector, model_fingerprint  # noqa: E402
from cfseg.online_state import OnlineConfig  # noqa: E402


def to_128(image, probs, label, size=(128, 128, 128)):
    image = F.interpolate(image[None].float(), size=size, mode="trilinear", align_corners=False)[0]
    probs = F.interpolate(probs[None].float(), size=size, mode="trilinear", align_corners=False)[0]
    label = F.interpolate(label[None, None].float(), size=size, mode="nearest")[0, 0].long()
    return image, probs / probs.sum(0, keepdim=True), label


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warm", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--config", default=None, help="JSON of OnlineConfig fields")
    p.add_argument("--cache", default="results/online/streams/frozen")
    p.add_argument("--out", default="benchmarks/online/timing.json")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    module = load_checkpoint(a.ckpt)
    fp = model_fingerprint(module)
    idx = list(range(1, len(module.bank.names)))
    cfg = OnlineConfig.from_dict(json.loads(a.config) if a.config else {})
    corr = OnlineCorrector(module, cfg)
    cases = []
    for i, (case_id, image, label, ks) in enumerate(stream_cases(module, "../shared/data/openkbp_oar",
                                                                  "configs/openkbp/split_joint.json", ["test"])):
        if i >= a.warm + a.repeats:
            break
        probs = frozen_probs(module, fp, case_id, "openkbp_oar_test", image, idx, Path(a.cache)).float()
        cases.append(to_128(image, probs, label) + (ks,))
    for image, probs, label, _ in cases[: a.warm]:
        corr.update(image, probs, idx, {k: label == k for k in idx})
    corr.alphas = {n: [0.5] * cfg.alpha_window for n in module.bank.names[1:]}  # every class fused: the worst case
    upd, fus = [], []
    for image, probs, label, _ in cases[a.warm:]:
        t0 = time.perf_counter()
        corr.fuse(image, probs, idx)
        fus.append(time.perf_counter() - t0)
        rep = corr.update(image, probs, idx, {k: label == k for k in idx})
        upd.append(rep.seconds)
    result = {"shape": [128, 128, 128], "classes": len(idx), "threads": a.threads, "buffer": len(corr.buffer),
              "config": cfg.to_dict(), "aux_parameters": corr.n_parameters(),
              "seconds_per_update": {"mean": float(np.mean(upd)), "max": float(np.max(upd)), "all": upd},
              "seconds_per_fused_segmentation": {"mean": float(np.mean(fus)), "max": float(np.max(fus)), "all": fus},
              "cpu": platform.processor() or platform.machine(), "torch": torch.__version__}
    Path(a.out).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "config"}, indent=1))


if __name__ == "__main__":
    main()
