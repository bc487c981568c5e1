"""Does each class's cosine similarity map alone segment it? Prototype ablation on OpenKBP (issue 14, item 6).

For checkpoints of cfseg's prototype head trained with different prototypes (``model.prototypes: text | random |
text_no_gs``, ``model.prototype_order``), every case is predicted once with its similarity maps
(:func:`cfseg.inference.predict_volume` with ``similarity=True``: ``cos(W z, p_k)`` per class). Two Dice per class:

* **head**: the head's labels (argmax over background and the classes), as ``heads.py`` scores them;
* **map**: the class's similarity map alone, thresholded (``cos > t``). ``t`` is chosen per class and checkpoint on
  the *validation* cases (the value of :data:`THRESHOLDS` with the best mean Dice there) and applied to the test
  cases. A map that segments its class by itself means the prototype direction carries the class (the paper's
  "interpretable embedding"); a map that needs the competition with the other prototypes does not.

Dice convention as ``cfseg.metrics``: only annotated classes are scored; both empty: 1; one empty: 0. Per case the
Dice at every threshold comes from two histograms (all voxels and the class's voxels), so one pass per class.
Per-case results are cached beside each checkpoint (``<stem>.simmaps.json``), keyed on its size and mtime::

    c=logs/version_0/checkpoints/joint.ckpt
    python benchmarks/openkbp/similarity_maps.py --ckpt text:0=results/heads/prototype_s0/$c \\
        --ckpt text:1=results/heads/prototype_s1/$c --ckpt random:0=results/heads/proto_random_s0/$c \\
        --ckpt text_no_gs:0=results/heads/proto_nogs_s0/$c --out benchmarks/openkbp/prototypes
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))
#: Candidate thresholds on the cosine (chosen per class on validation cases).
THRESHOLDS = np.round(np.arange(-0.3, 0.951, 0.05), 2) + 0.0  # + 0.0: no -0.0
CACHE_VERSION = 1


def dice_curve(sim: np.ndarray, truth: np.ndarray, thresholds: np.ndarray = THRESHOLDS) -> np.ndarray:
    """Dice of ``sim > t`` against the boolean mask ``truth`` for every ``t`` (one sort per mask).

    Returns:
        float array ``[len(thresholds)]``; both masks empty: 1.
    """
    def above(values: np.ndarray) -> np.ndarray:  # count of values > t for every t
        return values.size - np.searchsorted(np.sort(values, axis=None), thresholds, side="right")

    pred, tp, g = above(sim), above(sim[truth]), int(truth.sum())
    denom = pred + g
    return np.where(denom == 0, 1.0, 2.0 * tp / np.maximum(denom, 1))


def score(job: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Per-case head Dice and map-Dice curves of one checkpoint on the validation and test cases (cached), and
    its class names (background dropped)."""
    from heads import _write_json, load_test_cases

    from cfseg.inference import predict_volume
    from cfseg.metrics import dice_per_class
    from cfseg.module import load_checkpoint

    torch.set_num_threads(job["threads"])
    ckpt = Path(job["ckpt"])
    st = ckpt.stat()
    key = {"version": CACHE_VERSION, "size": st.st_size, "mtime_ns": st.st_mtime_ns,
           "thresholds": THRESHOLDS.tolist(), "data": str(Path(job["data"]).resolve())}
    cpath = ckpt.with_name(ckpt.stem + ".simmaps.json")
    cache = {"key": key, "val": {}, "test": {}}
    if cpath.is_file():
        old = json.loads(cpath.read_text())
        if old.get("key") == key:
            cache = old
    module = load_checkpoint(str(ckpt)).eval()
    if not module.head.has_similarity:
        raise ValueError(f"{ckpt}: a {type(module.head).__name__} has no cosine similarity maps")
    names = module.bank.names
    for part in ("val", "test"):
        transform, items = load_test_cases(module, Path(job["data"]), Path(job["split"]), job["max_cases"], part)
        for item in items:
            if item["case_id"] in cache[part]:
                continue
            vol = transform(item)
            ks = [k for k in torch.nonzero(vol["annotated"]).flatten().tolist() if k > 0]
            out = predict_volume(module, vol["image"], similarity=True, probabilities=False)
            target = vol["label"][0].long()
            head = dice_per_class(out["labels"].long(), target, ks).tolist()
            sims, truth = out["similarity"].numpy(), target.numpy()
            cache[part][item["case_id"]] = {names[k]: {"head": head[j], "map": dice_curve(sims[k], truth == k).tolist()}
                                            for j, k in enumerate(ks)}
            _write_json(cpath, cache)
            print(f"[{job['label']}] {part} {item['case_id']}", flush=True)
    return cache, names[1:]


def summarise(cache: dict[str, Any], classes: list[str]) -> dict[str, Any]:
    """Per class: threshold chosen on validation, test map Dice at it, test head Dice; means over classes."""
    per_class = {}
    for c in classes:
        val = [np.array(case[c]["map"]) for case in cache["val"].values() if c in case]
        test = [case[c] for case in cache["test"].values() if c in case]
        if not val or not test:
            continue
        best = int(np.argmax(np.mean(val, axis=0)))  # first of equal means: the lowest threshold
        per_class[c] = {"threshold": float(THRESHOLDS[best]), "val_map_dice": float(np.mean(val, axis=0)[best]),
                        "map_dice": statistics.fmean(case["map"][best] for case in test),
                        "head_dice": statistics.fmean(case["head"] for case in test), "test_cases": len(test)}
    return {"per_class": per_class,
            "mean_map_dice": statistics.fmean(v["map_dice"] for v in per_class.values()),
            "mean_head_dice": statistics.fmean(v["head_dice"] for v in per_class.values())}


def markdown(result: dict[str, Any], command: str) -> str:
    variants = result["variants"]
    classes = result["classes"]
    lines = ["# What the prototypes buy: OpenKBP, cfseg's prototype head (issue 14, item 6)", "",
             "Same backbone, data and budget; only `model.prototypes` / `model.prototype_order` differ. **head**: Dice "
             "of the head's labels; **map**: Dice of the class's similarity map alone, `cos > t` with `t` chosen per "
             "class on the validation cases. Mean over seeds (each seed in brackets).", "",
             "| variant | seeds | head Dice | map Dice |", "|---|---|---:|---:|"]

    def fmt(values: list[float]) -> str:
        mean = statistics.fmean(values)
        return f"{mean:.3f}" + (f" ({', '.join(f'{v:.3f}' for v in values)})" if len(values) > 1 else "")

    for name, v in variants.items():
        seeds = list(v["seeds"])
        lines.append(f"| {name} | {', '.join(seeds)} | {fmt([v['seeds'][s]['mean_head_dice'] for s in seeds])} | "
                     f"{fmt([v['seeds'][s]['mean_map_dice'] for s in seeds])} |")
    lines += ["", "## Per class: head Dice / map Dice, mean over seeds (threshold chosen for each seed)", "",
              "| class | " + " | ".join(variants) + " |", "|---|" + "---:|" * len(variants)]
    for c in classes:
        cells = []
        for v in variants.values():
            pcs = [s["per_class"][c] for s in v["seeds"].values() if c in s["per_class"]]
            if not pcs:
                cells.append("-")
                continue
            head = statistics.fmean(pc["head_dice"] for pc in pcs)
            cos = ", ".join(f"{pc['threshold']:+.2f}" for pc in pcs)
            cells.append(f"{head:.3f} / {statistics.fmean(pc['map_dice'] for pc in pcs):.3f} ({cos})")
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    lines += ["", f"Thresholds tried: {THRESHOLDS[0]:+.2f} to {THRESHOLDS[-1]:+.2f} in steps of 0.05. "
              f"Validation cases: {result['val_cases']}; test cases: {result['test_cases']}.", "",
              f"Command: `{command}`", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", action="append", required=True, help="variant:seed=path (repeat)")
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "openkbp_oar"))
    p.add_argument("--split", default=str(ROOT / "configs" / "openkbp" / "split_joint.json"))
    p.add_argument("--max-cases", type=int, default=None, help="first N cases of each split (quick check)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=HERE / "prototypes", help="writes <out>.json and <out>.md")
    a = p.parse_args(argv)
    if not Path(a.data).is_dir():
        print(f"SKIP: {a.data} not found (the OpenKBP data of ../shared/data)")
        return 0
    variants: dict[str, dict[str, Any]] = {}
    classes: list[str] = []
    counts = {}
    for spec in a.ckpt:
        label, path = spec.split("=", 1)
        name, seed = label.split(":", 1)
        cache, names = score({"ckpt": path, "data": a.data, "split": a.split, "max_cases": a.max_cases,
                              "threads": a.threads, "label": label})
        classes = classes or names
        counts = {"val_cases": len(cache["val"]), "test_cases": len(cache["test"])}
        variants.setdefault(name, {"seeds": {}})["seeds"][seed] = {**summarise(cache, classes), "checkpoint": path}
    command = "python benchmarks/openkbp/similarity_maps.py " + " ".join(f"--ckpt {c}" for c in a.ckpt) + \
        (f" --max-cases {a.max_cases}" if a.max_cases else "") + f" --out {a.out}"
    result = {"variants": variants, "classes": classes, **counts, "thresholds": THRESHOLDS.tolist(),
              "command": command}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    a.out.with_suffix(".md").write_text(markdown(result, command))
    print(markdown(result, command))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
