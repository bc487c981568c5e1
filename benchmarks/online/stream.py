"""Stream real OpenKBP cases through a frozen cfseg model and the online corrector (cfseg.online).

Each case of a fixed-order stream (sorted case ids) is segmented by the frozen model and by the fused output
(frozen + corrector), both scored against the ground truth (per annotated class, the project's Dice convention);
then, if the case gets feedback, the ground truth stands in for the user's correction and the corrector learns
from it (:meth:`cfseg.online.OnlineCorrector.update`). Everything runs on the checkpoint's network grid (the
preprocessed volume), as ``cfseg evaluate`` scores.

Feedback: ``all`` (every case), ``every2`` (every 2nd case: 1st, 3rd, ...) or ``below0.8`` (only cases whose
*shown* output, the fused one, has mean Dice below 0.8 over the case's annotated classes: the cases a reviewer
would bother to fix).

    python benchmarks/online/stream.py --name weak --ckpt results/online/base_weak_300/.../joint.ckpt \\
        --split test --out results/online/streams

Frozen predictions are cached per checkpoint fingerprint and case (``<out>/frozen/``), so the settings that share a
model and a stream run the frozen model once. Writes ``<out>/<name>.json``: per case the frozen and fused Dice per
class, the fusion weight used per class, whether it got feedback, seconds per update and per fused segmentation.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from cfseg.data.datamodule import DatasetConfig, SegDataModule
from cfseg.data.transforms import build_transforms
from cfseg.inference import predict_volume
from cfseg.metrics import DICE_CONVENTION, dice_per_class
from cfseg.module import load_checkpoint
from cfseg.online import OnlineCorrector, model_fingerprint
from cfseg.online_state import OnlineConfig


def stream_cases(module, dataset: str, split_file: str, splits: list[str]):
    """Yield (case_id, image [1, *S], label [*S] global indices, annotated class indices) in sorted case order."""
    pre = next(iter(module.preprocessing.values()))
    dm = SegDataModule([DatasetConfig(path=dataset, split_file=split_file)], classes=module.class_names,
                       spacing=tuple(pre["spacing"]), ct_window=tuple(pre.get("ct_window", (-175.0, 250.0))),
                       cache="none", seed=0)
    ds = dm.datasets[0]
    transform = build_transforms(dm.preprocessing(ds.info.modality), train=False)
    for split in splits:
        for item in sorted(dm.items(ds, split), key=lambda it: it["case_id"]):
            vol = transform(item)
            ks = torch.nonzero(vol["annotated"]).flatten().tolist()
            image = vol["image"].as_subclass(torch.Tensor)  # plain tensors: MONAI's metadata tracking is not needed
            label = vol["label"][0].long().as_subclass(torch.Tensor)
            yield item["case_id"], image, label, [k for k in ks if k != 0]


def frozen_probs(module, fingerprint: str, case_id: str, tag: str, image: torch.Tensor, idx: list[int],
                 cache: Path) -> torch.Tensor:
    path = cache / f"{fingerprint[:16]}_{tag}_{case_id}.pt"
    if path.is_file():
        return torch.load(path, weights_only=True)
    # [K+1, *S]; half precision keeps the cache small
    probs = predict_volume(module, image, idx)["probs"].as_subclass(torch.Tensor).half()
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(probs, tmp)
    tmp.replace(path)
    return probs


def run(args) -> dict:
    torch.manual_seed(0)
    module = load_checkpoint(args.ckpt)
    fp = model_fingerprint(module)
    config = OnlineConfig.from_dict(json.loads(args.config) if args.config else {})
    corrector = OnlineCorrector(module, config)
    idx = list(range(1, len(module.bank.names)))
    names = module.bank.names
    cases = []
    tag = Path(args.dataset).name + "_" + "-".join(args.splits)
    for i, (case_id, image, label, ks) in enumerate(stream_cases(module, args.dataset, args.split_file, args.splits)):
        if args.max_cases is not None and i >= args.max_cases:
            break
        probs = frozen_probs(module, fp, case_id, tag, image, idx, Path(args.out) / "frozen").float()
        t0 = time.perf_counter()
        fused = corrector.fuse(image, probs, idx)
        t_fuse = time.perf_counter() - t0
        table = torch.tensor([0, *idx])
        frozen_labels = table[probs.argmax(0)]
        d_frozen = dice_per_class(frozen_labels, label, ks).tolist()
        d_fused = dice_per_class(fused["labels"].long(), label, ks).tolist()
        mean_shown = float(np.mean(d_fused)) if ks else 1.0
        if args.feedback == "all":
            feedback = True
        elif args.feedback == "every2":
            feedback = i % 2 == 0
        else:
            feedback = mean_shown < float(args.feedback.removeprefix("below"))
        rec = {"case": case_id, "frozen": dict(zip((names[k] for k in ks), d_frozen, strict=True)),
               "fused": dict(zip((names[k] for k in ks), d_fused, strict=True)),
               "alpha": {n: float(a) for n, a in fused["alpha"].items()}, "feedback": feedback,
               "seconds_fuse": t_fuse}
        if feedback:
            report = corrector.update(image, probs, idx, {k: label == k for k in ks})
            rec.update(seconds_update=report.seconds, best_alpha=report.best_alpha, loss=report.loss,
                       buffer=report.buffer)
        cases.append(rec)
        print(f"{i:3d} {case_id}: frozen {np.mean(d_frozen):.3f} fused {np.mean(d_fused):.3f}"
              f"{' (feedback)' if feedback else ''}", flush=True)
    return {"name": args.name, "ckpt": args.ckpt, "fingerprint": fp, "dataset": args.dataset,
            "split_file": args.split_file, "splits": args.splits, "feedback": args.feedback,
            "config": config.to_dict(), "aux_parameters": corrector.n_parameters(), "dice_convention": DICE_CONVENTION,
            "threads": torch.get_num_threads(), "cases": cases}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", required=True)
    p.add_argument("--ckpt", required=True)
    p.add_argument("--dataset", default="../shared/data/openkbp_oar")
    p.add_argument("--split-file", default="configs/openkbp/split_joint.json")
    p.add_argument("--splits", nargs="+", default=["test"], help="splits streamed in this order")
    p.add_argument("--max-cases", type=int, default=None, help="stop the stream after this many cases")
    p.add_argument("--feedback", default="all", help="all | every2 | below<dice>, e.g. below0.8")
    p.add_argument("--config", default=None, help="JSON of OnlineConfig fields")
    p.add_argument("--out", default="results/online/streams")
    a = p.parse_args(argv)
    if a.feedback not in ("all", "every2") and not a.feedback.startswith("below"):
        p.error(f"--feedback: all, every2 or below<dice>, got {a.feedback!r}")
    result = run(a)
    out = Path(a.out) / f"{a.name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
