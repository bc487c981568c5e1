"""Is a missing organ unseen or only outvoted? A per-class logit bias sweep on the validation cases.

For each checkpoint, the whole-volume logits of every validation case (the ``val`` list of the split file) are
computed once; then, for one class at a time, a bias ``b`` is added to that class's logit (log-odds against every
other class, so ``b = log 2`` doubles its odds) and the Dice of that class, and the mean Dice of the other
annotated classes, is recomputed for every ``b`` of the grid. A class that the network ranks second where it
should win comes back with a modest bias (the network saw it, the argmax outvotes it: a calibration / prior
problem); a class that stays at zero for every bias was not learnt. Inside the ground truth of the class it also
reports which class wins and the class's mean probability.

Settings come from the validation cases only; ``--test`` then applies the bias chosen on validation to the test
cases (for reporting, never for choosing).

    c=logs/version_0/checkpoints
    python benchmarks/openkbp/class_bias.py --ckpt prototype:0=results/heads/prototype1500_s0/$c/joint.ckpt \
        --ckpt softmax:0=results/heads/softmax1500_s0/$c/joint.ckpt --classes esophagus larynx --test \
        --out benchmarks/openkbp/class_bias.json
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from heads import DATA, SPLIT, load_test_cases, parse_ckpt  # noqa: E402

BIASES = [0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0]


def dice(pred: torch.Tensor, gt: torch.Tensor) -> float:
    """Dice of two boolean masks (1.0 when both are empty)."""
    inter = (pred & gt).sum().item()
    total = pred.sum().item() + gt.sum().item()
    return 1.0 if total == 0 else 2.0 * inter / total


def case_logits(module: Any, vol: dict[str, Any]) -> torch.Tensor:
    """[K+1, *S] whole-volume logits over every class (background first)."""
    x = vol["image"][None].as_subclass(torch.Tensor)
    with torch.no_grad():
        return module.sliding_window_logits(x, list(range(1, len(module.bank.names))), device="cpu")[0]


def sweep(cases: list[dict[str, Any]], k: int, biases: list[float]) -> list[dict[str, float]]:
    """Dice of class ``k`` and mean Dice of the other annotated classes, per bias, over ``cases``.

    ``cases``: ``{"logits": [K+1, *S], "label": [*S] global ids, "annotated": [K+1] bool}``.
    """
    rows = []
    for b in biases:
        own, others = [], []
        for c in cases:
            logits = c["logits"].clone()
            logits[k] += b
            pred = logits.argmax(0)
            ann = torch.nonzero(c["annotated"]).flatten().tolist()
            for j in ann:
                if j == 0:
                    continue
                d = dice(pred == j, c["label"] == j)
                (own if j == k else others).append(d)
        rows.append({"bias": b, "dice": float(np.mean(own)) if own else float("nan"),
                     "others_dice": float(np.mean(others)) if others else float("nan"), "n_cases": len(own)})
    return rows


def inside_gt(cases: list[dict[str, Any]], k: int, names: list[str]) -> dict[str, Any]:
    """Over the ground-truth voxels of class ``k``: which class wins (fractions) and the mean softmax of ``k``."""
    wins = torch.zeros(len(names))
    probs, rank2 = [], 0
    n = 0
    for c in cases:
        if not bool(c["annotated"][k]):
            continue
        m = c["label"] == k
        if not m.any():
            continue
        lg = c["logits"][:, m]  # [K+1, n]
        wins += torch.bincount(lg.argmax(0), minlength=len(names)).float()
        probs.append(torch.softmax(lg.float(), 0)[k])
        rank2 += int((lg.topk(2, dim=0).indices == k).any(0).sum())
        n += int(m.sum())
    p = torch.cat(probs) if probs else torch.zeros(0)
    return {"voxels": n, "winner_fraction": {names[i]: round(float(w) / max(n, 1), 4) for i, w in enumerate(wins)
                                             if w > 0},
            "mean_prob": float(p.mean()) if n else float("nan"),
            "top2_fraction": rank2 / max(n, 1)}


def main(argv: list[str] | None = None) -> None:
    from cfseg.module import load_checkpoint

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", action="append", required=True, help="name:seed=path (repeat)")
    p.add_argument("--classes", nargs="+", default=["esophagus"])
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--split", type=Path, default=SPLIT)
    p.add_argument("--test", action="store_true", help="also score the validation-chosen bias on the test cases")
    p.add_argument("--max-cases", type=int, default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    args = sys.argv[1:] if argv is None else argv
    split = a.split.resolve()
    report: dict[str, Any] = {
        "command": shlex.join(["python", "benchmarks/openkbp/class_bias.py", *args]),
        "biases": BIASES, "split": str(split.relative_to(ROOT)) if split.is_relative_to(ROOT) else str(split),
        "checkpoints": {}}
    for spec in a.ckpt:
        name, seed, path = parse_ckpt(spec)
        module = load_checkpoint(str(path)).eval()
        names = list(module.bank.names)
        entry: dict[str, Any] = {"path": str(path), "classes": {}}
        parts = ["val", "test"] if a.test else ["val"]
        data: dict[str, list[dict[str, Any]]] = {}
        for part in parts:
            transform, items = load_test_cases(module, a.data, a.split, a.max_cases, part=part)
            data[part] = []
            for item in items:
                vol = transform(item)
                data[part].append({"logits": case_logits(module, vol), "label": vol["label"][0].long(),
                                   "annotated": vol["annotated"].bool()})
                print(f"[{name}:{seed}] {part} {item['case_id']}", flush=True)
        for cls in a.classes:
            k = names.index(cls)
            val = sweep(data["val"], k, BIASES)
            base_others = val[0]["others_dice"]
            # the largest validation Dice of the class whose other classes lose at most 0.01
            ok = [r for r in val if r["others_dice"] >= base_others - 0.01]
            best = max(ok, key=lambda r: (r["dice"], -r["bias"]))
            e = {"val": val, "val_inside_gt": inside_gt(data["val"], k, names), "chosen_bias": best["bias"]}
            if a.test:
                e["test"] = sweep(data["test"], k, sorted({0.0, best["bias"]}))
                e["test_inside_gt"] = inside_gt(data["test"], k, names)
            entry["classes"][cls] = e
            print(f"[{name}:{seed}] {cls}: val Dice by bias " +
                  ", ".join(f"{r['bias']:g}: {r['dice']:.3f}/{r['others_dice']:.3f}" for r in val) +
                  f"; chosen {best['bias']:g}", flush=True)
        report["checkpoints"][f"{name}:{seed}"] = entry
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(report, indent=1))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
