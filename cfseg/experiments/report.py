"""Scoring a continual-learning protocol's checkpoints and reporting: the accuracy matrix R (R[i][j]: mean Dice on
stage j's test cases after stage i; :func:`evaluate_stage_tests` scores one row), its files (JSON, CSV, heatmap
PNG), the summary over strategies and seeds (average Dice after the last stage and backward transfer BWT, means and
SDs over seeds) and the printed tables.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import shutil
import statistics
from pathlib import Path
from typing import Any

from cfseg.evaluation import evaluate_groups
from cfseg.experiments.protocol import STRATEGIES, stage_datasets
from cfseg.metrics import DICE_CONVENTION
from cfseg.module import load_checkpoint


def write_atomic(path: Path, text: str) -> None:
    """Write ``path`` through a temporary file named after this process, so readers never see half a file and
    processes writing the same file never share a temporary one."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def evaluate_stage_tests(ckpt: Path, spec: dict, upto: int, seed: int = 0, split: str = "test",
                         details: dict[str, Any] | None = None) -> tuple[list[float], dict[str, dict]]:
    """Dice of ``ckpt`` on the ``split`` ("test" or "val") cases of stages 0..upto, each on its own classes.

    Stages that share test cases (one fixed test set, as in the OpenKBP protocol) predict each case once.
    ``details``, when given, receives ``routing_accuracy``: per stage, the fraction of its cases the router sent
    to an expert of their own domain (None where the model does not route).

    Returns:
        (mean Dice per stage [upto + 1], ``{stage name: {class: Dice}}``).
    """
    # scores are kept beside the checkpoint: a protocol run again (another strategy, a restart) does not predict
    # the same cases with the same model twice; the key covers the checkpoint file and the stages' definitions
    stat = Path(ckpt).stat()
    key = json.dumps([split, upto, spec.get("split_seed", seed), stat.st_size, stat.st_mtime_ns,
                      [{k: st.get(k) for k in ("name", "classes", "datasets")} for st in spec["stages"][: upto + 1]]],
                     sort_keys=True, default=str)
    cache = Path(ckpt).parent / f"scores_{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"
    if cache.is_file():
        hit = json.loads(cache.read_text())
        if details is not None:
            details["routing_accuracy"] = hit.get("routing_accuracy", [None] * (upto + 1))
        return [float("nan") if v is None else v for v in hit["row"]], hit["per_class"]
    module = load_checkpoint(str(ckpt))
    known = set(module.class_names)
    groups, scored = [], []
    for j in range(upto + 1):
        st = spec["stages"][j]
        datasets = [{**d, "classes": None} for d in stage_datasets(st)]
        classes = st.get("classes") or sorted({c for d in stage_datasets(st) for c in (d.get("classes") or [])}) \
            or None
        if classes is not None:  # a later stage (full_matrix) is scored on the classes the model knows
            classes = [c for c in classes if c in known]
            if not classes:
                continue
        groups.append((datasets, classes))
        scored.append(j)
    res = evaluate_groups(module, groups, split=split, seed=spec.get("split_seed", seed))
    by_stage = dict(zip(scored, res, strict=True))
    names = [spec["stages"][j]["name"] for j in range(upto + 1)]
    row = [by_stage[j]["mean_dice"] if j in by_stage else float("nan") for j in range(upto + 1)]
    per_class = {n: by_stage[j]["per_class_dice"] if j in by_stage else {} for j, n in enumerate(names)}
    routing = [by_stage[j].get("routing_accuracy") if j in by_stage else None for j in range(upto + 1)]
    if details is not None:
        details["routing_accuracy"] = routing
    write_atomic(cache, json.dumps(nan_to_none({"key": key, "row": row, "per_class": per_class,
                                                "routing_accuracy": routing})))
    return row, per_class


def plot_matrix(R: list[list[float]], names: list[str], title: str, path: Path) -> None:
    """Heatmap PNG of the accuracy matrix ``R`` (rows: after stage i; columns: test cases of stage j)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    n = len(names)
    M = np.full((n, n), np.nan)
    for i, row in enumerate(R):
        M[i, : len(row)] = row
    fig, ax = plt.subplots(figsize=(1.6 * n + 1.5, 1.4 * n + 1))
    im = ax.imshow(M, vmin=0, vmax=1, cmap="viridis")
    for i in range(n):
        for j in range(n):
            if not math.isnan(M[i, j]):
                ax.text(j, i, f"{M[i, j]:.2f}", ha="center", va="center", color="w" if M[i, j] < 0.6 else "k")
    ax.set_xticks(range(n), [f"test {x}" for x in names], rotation=20)
    ax.set_yticks(range(n), [f"after {x}" for x in names])
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046, label="Dice")
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def format_matrix(R: list[list[float]], names: list[str]) -> str:
    """The accuracy matrix as a plain-text table."""
    w = max(10, *[len(n) + 6 for n in names])
    lines = [" " * w + "".join(f"{'test ' + n:>{w}}" for n in names)]
    for i, row in enumerate(R):
        cells = "".join(f"{v:>{w}.3f}" for v in row) + "".join(f"{'-':>{w}}" for _ in range(len(names) - len(row)))
        lines.append(f"{'after ' + names[i]:<{w}}{cells}")
    return "\n".join(lines)


def nan_to_none(x: Any) -> Any:
    """NaN -> None, recursively (strict JSON)."""
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: nan_to_none(v) for k, v in x.items()}
    if isinstance(x, list):
        return [nan_to_none(v) for v in x]
    return x


def write_matrix(out: Path, res: dict[str, Any]) -> None:
    """One strategy's result of one seed (a :func:`cfseg.apps.protocol.run_seed` result) as
    ``<out>/<name>_matrix.json``, ``.csv`` (the matrix R) and ``.png`` (its heatmap)."""
    name, names, R = res["strategy"], res["stages"], res["R"]
    write_atomic(out / f"{name}_matrix.json", json.dumps(nan_to_none(res), indent=2))
    with open(out / f"{name}_matrix.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["after_stage", *[f"test_{n}" for n in names]])
        for i, row in enumerate(R):
            w.writerow([names[i], *[f"{v:.4f}" for v in row], *[""] * (len(names) - len(row))])
    plot_matrix(R, names, f"{name} (seed {res['seed']}): avg Dice {res['average_dice']:.3f}, BWT {res['bwt']:+.3f}",
                out / f"{name}_matrix.png")


def _mean(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return float(statistics.fmean(vals)) if vals else None


def _sd(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return float(statistics.stdev(vals)) if len(vals) > 1 else None


def write_summary(out: Path, copy_to: str | Path | None = None) -> dict[str, Any]:
    """``<out>/summary.json`` over every ``seed<N>/<strategy>_matrix.json`` under ``out``.

    Built from the files, so strategies and seeds run in separate invocations (for example side by side,
    sharing the stage-0 checkpoint of a seed) end up in one summary instead of the last run overwriting the others.

    Returns:
        ``{"seeds", "stages", "dice_convention", "strategies": {name: {"average_dice", "bwt" (means over
        seeds), "average_dice_sd", "bwt_sd", "seeds", "per_seed": {seed: {"average_dice", "bwt", "matrix",
        "per_class_dice", "wall_time_s"; with score_val also "average_dice_val", "bwt_val", "matrix_val",
        "per_class_dice_val"}}, "per_class_dice" (mean over seeds), "stage_steps", "stage_lr",
        "wall_time_s" (mean over seeds, training incl. stage 0)}}}``.
    """
    files: dict[str, dict[int, dict]] = {}
    for f in sorted(out.glob("seed*/*_matrix.json")):
        r = json.loads(f.read_text())
        if "seed" in r:
            files.setdefault(r["strategy"], {})[int(r["seed"])] = r
    order = sorted(files, key=lambda n: (STRATEGIES.index(n) if n in STRATEGIES else len(STRATEGIES), n))
    strategies, stages = {}, None
    for name in order:
        runs = dict(sorted(files[name].items()))
        first = next(iter(runs.values()))
        stages = stages or first["stages"]
        per_class: dict[str, dict[str, float | None]] = {}
        for st, classes in first["per_class_dice"].items():
            per_class[st] = {c: _mean([r["per_class_dice"][st].get(c) for r in runs.values()]) for c in classes}
        strategies[name] = {
            "average_dice": _mean([r["average_dice"] for r in runs.values()]),
            "bwt": _mean([r["bwt"] for r in runs.values()]),
            "average_dice_sd": _sd([r["average_dice"] for r in runs.values()]),
            "bwt_sd": _sd([r["bwt"] for r in runs.values()]),
            "seeds": list(runs),
            "per_seed": {str(s): {"average_dice": r["average_dice"], "bwt": r["bwt"], "matrix": r["R"],
                                  "per_class_dice": r["per_class_dice"], "wall_time_s": r["wall_time_s"],
                                  **({"average_dice_val": r["average_dice_val"], "bwt_val": r["bwt_val"],
                                      "matrix_val": r["R_val"]} if "R_val" in r else {}),
                                  **({"per_class_dice_val": r["per_class_dice_val"]}
                                     if "per_class_dice_val" in r else {}),
                                  **{k: r[k] for k in ("routing_accuracy", "params") if k in r}}
                         for s, r in runs.items()},
            "per_class_dice": per_class,
            "base_strategy": first["base_strategy"],
            "stage_steps": first["stage_steps"],
            "stage_lr": first["stage_lr"],
            "wall_time_s": _mean([r["wall_time_s"] for r in runs.values()]),
        }
        if all("R_val" in r for r in runs.values()):
            strategies[name]["average_dice_val"] = _mean([r["average_dice_val"] for r in runs.values()])
            strategies[name]["bwt_val"] = _mean([r["bwt_val"] for r in runs.values()])
    doc = {"seeds": sorted({s for runs in files.values() for s in runs}), "stages": stages,
           "dice_convention": DICE_CONVENTION, "strategies": strategies}
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "summary.json", json.dumps(nan_to_none(doc), indent=2))
    if copy_to:
        Path(copy_to).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out / "summary.json", copy_to)
    return doc


def print_results(results: dict[int, dict[str, Any]], summary: dict[str, Any] | None = None) -> None:
    """Print every seed's matrices and, when given, the summary's means over seeds."""
    for seed, by_name in results.items():
        for name, res in by_name.items():
            print(f"\n== {name}, seed {seed} ==  (R[i][j]: mean Dice on stage j's test cases after stage i)")
            print(format_matrix(res["R"], res["stages"]))
            print(f"average Dice after the last stage: {res['average_dice']:.3f}   BWT: {res['bwt']:+.3f}   "
                  f"steps per stage: {res['stage_steps']}")
    if summary:
        print(f"\n{'strategy':<16}{'avg Dice':>10}{'BWT':>10}   per seed (avg Dice / BWT)")
        for name, s in summary["strategies"].items():
            per = ", ".join(f"{k}: {v['average_dice']:.3f}/{v['bwt']:+.3f}" if v["bwt"] is not None else
                            f"{k}: {v['average_dice']:.3f}" for k, v in s["per_seed"].items())
            bwt = f"{s['bwt']:>+10.3f}" if s["bwt"] is not None else f"{'-':>10}"
            print(f"{name:<16}{s['average_dice']:>10.3f}{bwt}   {per}")
