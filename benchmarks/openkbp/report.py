"""Score OpenKBP checkpoints on the committed 40-case test split and write tables and per-class Dice bars.

    python benchmarks/openkbp/report.py --ckpt cfseg=results/openkbp/joint_cfseg.ckpt \\
        --ckpt softmax=results/openkbp/joint_softmax.ckpt --out benchmarks/openkbp

A case is scored only on the classes annotated for it (partial_labels.json); Dice convention in
cfseg.metrics.DICE_CONVENTION. Writes <out>/<prefix>.json, .md and .png (prefix joint_dice by default).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT.parent / "shared" / "data" / "openkbp_oar"
CLASSES = ["brainstem", "spinal_cord", "mandible", "parotid_gland_left", "parotid_gland_right", "esophagus",
           "larynx"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", action="append", required=True, help="name=path (repeat)")
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--split", type=Path, default=ROOT / "configs" / "openkbp" / "split_joint.json")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "openkbp")
    p.add_argument("--prefix", default="joint_dice", help="output file names: <out>/<prefix>.{json,md,png}")
    p.add_argument("--title", default="OpenKBP organs at risk: joint training, 40 test cases")
    a = p.parse_args()
    from cfseg.evaluation import evaluate_datasets
    from cfseg.metrics import DICE_CONVENTION
    from cfseg.module import load_checkpoint

    results = {}
    for spec in a.ckpt:
        name, path = spec.split("=", 1)
        t0 = time.time()
        module = load_checkpoint(path)
        res = evaluate_datasets(module, [{"path": str(a.data), "split_file": str(a.split)}], split="test",
                                classes=CLASSES)
        res["seconds"] = round(time.time() - t0, 1)
        results[name] = res
        print(name, f"mean {res['mean_dice']:.3f}", {k: round(v, 3) for k, v in res["per_class_dice"].items()})
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / f"{a.prefix}.json").write_text(json.dumps(results, indent=2))
    names = list(results)
    lines = ["| class | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for c in CLASSES:
        lines.append(f"| {c} | " + " | ".join(f"{results[n]['per_class_dice'][c]:.3f}" for n in names) + " |")
    lines.append("| **mean** | " + " | ".join(f"**{results[n]['mean_dice']:.3f}**" for n in names) + " |")
    lines.append(f"\nTest cases: {results[names[0]]['n_cases']}. Dice: {DICE_CONVENTION}.")
    (a.out / f"{a.prefix}.md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    x = np.arange(len(CLASSES))
    w = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(10, 4))
    for i, n in enumerate(names):
        ax.bar(x + i * w, [results[n]["per_class_dice"][c] for c in CLASSES], w, label=n)
    ax.set_xticks(x + w * (len(names) - 1) / 2, CLASSES, rotation=20)
    ax.set_ylim(0, 1)
    ax.set_ylabel("Dice (test, annotated cases)")
    ax.legend()
    ax.set_title(a.title)
    fig.savefig(a.out / f"{a.prefix}.png", dpi=100, bbox_inches="tight")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
