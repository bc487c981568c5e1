"""cfseg beside nnU-Net v2 on OpenKBP: test Dice against training CPU seconds (issue 34).

Gathers every row of the comparison into one result file (``reports/data/nnunet/comparison.json``, which
``reports/build.py`` turns into section 14's tables and ``figures/nnunet_budget.png``):

* **cfseg** joint runs with ``configs/openkbp/budget_curve.yaml`` (checkpoints every 375 steps with
  :class:`cfseg.callbacks.TrainingClock`), one per head and seed, found at
  ``<results>/<head>_s<seed>/logs/version_0/checkpoints/step<N>.ckpt``; each checkpoint is scored on the 40 test
  cases with ``benchmarks/openkbp/heads.py``'s scorer (cached beside the checkpoint), and its training CPU seconds
  are the clock it holds;
* **cfseg for longer**: ``benchmarks/openkbp/ingredients.py``'s ``baseline_5250`` runs (the same recipe for 5250
  steps instead of 1500), found at ``<long-results>/baseline_5250_<head>_s<seed>/...`` and scored the same way at
  ``--long-steps`` (rows ``cfseg_<head>_5250``; their cosine schedule spans 5250 steps, so their 1500-step point is
  not the 1500-step run's);
* **nnU-Net at equal terms**: the files ``run_equal_terms.sh`` writes (``equal_terms_s<seed>_<it375|it750|final>.json``,
  scored by ``score.py`` with the same conventions); training CPU seconds = iterations x the run's CPU seconds per
  iteration (its log's ``train CPU seconds/iteration`` lines; for epochs logged before those lines existed, the
  wall seconds per iteration of the epochs that ran at a load average <= the core count, where wall and CPU time
  agree);
* **nnU-Net's own recipe**: its measured step time (``step_time.py``) and how many iterations fit in cfseg's budget.

Run with cfseg's environment (the nnU-Net rows need only their JSON files)::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/nnunet/compare.py --results results/curve \\
        --out reports/data/nnunet/comparison.json

``--update nnunet`` recomputes only the nnU-Net rows and keeps cfseg's rows of the existing ``--out`` as they are
(each row records the command that made it), so a new nnU-Net point needs none of cfseg's checkpoints.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import shlex
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT.parent / "shared" / "data" / "openkbp_oar"
SPLIT = ROOT / "configs" / "openkbp" / "split_joint.json"
NNUNET_DATA = ROOT / "reports" / "data" / "nnunet"
LAYOUT = "{results}/{head}_s{seed}/logs/version_0/checkpoints/step{step}.ckpt"
LONG_LAYOUT = "{results}/baseline_5250_{head}_s{seed}/logs/version_0/checkpoints/step{step}.ckpt"
NNUNET_POINTS = {375: "it375", 750: "it750", 1500: "final"}


def _heads_module() -> Any:
    spec = importlib.util.spec_from_file_location("cfseg_openkbp_heads", ROOT / "benchmarks" / "openkbp" / "heads.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _number(x: Any) -> float | None:
    """A float, or None for NaN / missing (HD95 is undefined when every prediction of a class is empty)."""
    return None if x is None or math.isnan(float(x)) else float(x)


def _scores(summary: dict[str, Any]) -> dict[str, Any]:
    """The fields kept per point from a ``heads.summarise_seed``-shaped summary."""
    return {"mean_dice": _number(summary["mean_dice"]),
            "per_class": {c: _number(v) for c, v in summary["per_class"].items()},
            "mean_hd95_mm": _number(summary["mean_hd95_mm"]),
            "mean_surface_dice": _number(summary["mean_surface_dice"])}


def cfseg_row(heads: Any, results: Path, head: str, seeds: list[int], steps: list[int],
              threads: int, layout: str = LAYOUT) -> dict[str, Any]:
    """``{"points": {steps: {seed: scores + cpu_seconds + wall_seconds}}}`` for one head, its checkpoints found
    with ``layout`` (missing checkpoints are left out and listed under ``missing``)."""
    from cfseg.module import load_checkpoint

    points: dict[str, dict[str, Any]] = {}
    missing = []
    for step in steps:
        for seed in seeds:
            ckpt = Path(layout.format(results=results, head=head, seed=seed, step=step))
            if not ckpt.is_file():
                missing.append(str(ckpt))
                continue
            clock = torch.load(ckpt, map_location="cpu", weights_only=True).get("callbacks", {}).get("TrainingClock")
            if clock is None:
                raise SystemExit(f"{ckpt}: no TrainingClock state (train with configs/openkbp/budget_curve.yaml)")
            scored = heads.score_checkpoint({"ckpt": str(ckpt), "data": str(DATA), "split": str(SPLIT),
                                             "classes": None, "tolerance_mm": 2.0, "max_cases": None,
                                             "cache_dir": None, "threads": threads, "label": f"{head}:{seed}:{step}"})
            classes = list(load_checkpoint(str(ckpt)).class_names)
            summary = heads.summarise_seed(scored["cases"], classes)
            points.setdefault(str(step), {})[str(seed)] = {
                **_scores(summary), "n_cases": summary["n_cases"], "steps": clock["steps"],
                "cpu_seconds": round(clock["cpu_seconds"], 1), "wall_seconds": round(clock["wall_seconds"], 1),
                "checkpoint": os.path.relpath(ckpt, ROOT)}
    return {"points": points, "missing": missing}


def nnunet_cpu_per_iteration(training: dict[str, Any], cores: int) -> tuple[float, str]:
    """CPU seconds per iteration of an nnU-Net run from ``score.py``'s ``training`` summary, and how it was got."""
    epochs = training["per_epoch"].values()
    cpu = [e["cpu_seconds_per_iteration"] for e in epochs if "cpu_seconds_per_iteration" in e]
    if cpu:
        return statistics.median(cpu), f"median of {len(cpu)} epochs' logged CPU seconds per iteration"
    quiet = [e["seconds_per_iteration"] for e in epochs if e["load_average"] <= cores]
    if not quiet:
        raise SystemExit("nnU-Net log: no CPU time logged and no epoch ran at a load average <= the core count")
    return statistics.median(quiet), (f"median wall seconds per iteration of the {len(quiet)} epochs at a load "
                                      f"average <= {cores} (no CPU time logged)")


def nnunet_row(seeds: list[int], cores: int, recipe: str = "equal") -> dict[str, Any]:
    """nnU-Net's scored curve points (``run_equal_terms.sh``: ``equal_terms_*``; ``run_gpu.sh``: ``own_recipe_*``)."""
    prefix = {"equal": "equal_terms", "own": "own_recipe"}[recipe]
    points: dict[str, dict[str, Any]] = {}
    missing = []
    for iterations, tag in NNUNET_POINTS.items():
        for seed in seeds:
            path = NNUNET_DATA / f"{prefix}_s{seed}_{tag}.json"
            if not path.is_file():
                missing.append(str(path.relative_to(ROOT)))
                continue
            doc = json.loads(path.read_text())
            per_it, how = nnunet_cpu_per_iteration(doc["training"], cores)
            points.setdefault(str(iterations), {})[str(seed)] = {
                **_scores(doc), "n_cases": doc["n_cases"], "steps": iterations,
                "cpu_seconds": round(iterations * per_it, 1), "cpu_seconds_how": how,
                "source": str(path.relative_to(ROOT))}
    return {"points": points, "missing": missing}


def own_recipe(budget_cpu_seconds: float) -> dict[str, Any]:
    """nnU-Net's planned configuration: step time and the iterations cfseg's budget buys."""
    path = NNUNET_DATA / "step_time_nnunet_own_recipe.json"
    doc = json.loads(path.read_text())
    step = doc["step_cpu_s"] + doc["data_cpu_s"]
    return {"cpu_seconds_per_iteration": step, "iterations_per_epoch": 250,
            "iterations_in_cfseg_budget": budget_cpu_seconds / step, "source": str(path.relative_to(ROOT))}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", type=Path, default=ROOT / "results" / "curve")
    p.add_argument("--heads", nargs="+", default=["prototype", "softmax"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--steps", nargs="+", type=int, default=[375, 750, 1500])
    p.add_argument("--long-results", type=Path, default=ROOT / "results" / "ingredients",
                   help="ingredients.py's results folder with the baseline_5250 runs (rows left out when absent)")
    p.add_argument("--long-steps", nargs="+", type=int, default=[1500, 2625, 5250])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--recipe", choices=["equal", "own"], default="equal",
                   help="nnU-Net rows: equal terms on CPU (run_equal_terms.sh) or its own recipe (run_gpu.sh)")
    p.add_argument("--out", type=Path, default=NNUNET_DATA / "comparison.json")
    p.add_argument("--update", choices=["cfseg", "nnunet"], nargs="+", default=["cfseg", "nnunet"],
                   help="which rows to compute; the others are kept as they are in --out, with the command that "
                        "made them (e.g. --update nnunet adds a new nnU-Net point without cfseg's checkpoints)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    cores = os.cpu_count() or 1
    command = ("OMP_NUM_THREADS=1 .venv/bin/python benchmarks/nnunet/compare.py "
               + shlex.join(sys.argv[1:] if argv is None else argv))
    rows: dict[str, dict[str, Any]] = {}
    kept = {"cfseg", "nnunet"} - set(a.update)
    if kept:
        if not a.out.is_file():
            raise SystemExit(f"{a.out} does not exist: nothing to keep the {' and '.join(kept)} rows from "
                             f"(compute them with --update {' '.join(sorted(kept))})")
        previous = json.loads(a.out.read_text())
        rows = {name: {**row, "command": row.get("command", previous["command"])}
                for name, row in previous["rows"].items() if name.split("_")[0] in kept}
    if "cfseg" in a.update:
        heads = _heads_module()
        for h in a.heads:
            rows[f"cfseg_{h}"] = cfseg_row(heads, a.results, h, a.seeds, a.steps, a.threads)
        for h in a.heads:
            long = cfseg_row(heads, a.long_results, h, a.seeds, a.long_steps, a.threads, LONG_LAYOUT)
            if long["points"]:
                rows[f"cfseg_{h}_5250"] = long
    if "nnunet" in a.update:
        rows[f"nnunet_{a.recipe}"] = nnunet_row(a.seeds, cores, a.recipe)
    for row in rows.values():
        row.setdefault("command", command)
    rows = dict(sorted(rows.items(), key=lambda kv: (not kv[0].startswith("cfseg"), kv[0].endswith("_5250"))))
    budgets = [pt["cpu_seconds"] for pt in rows[f"cfseg_{a.heads[0]}"]["points"].get(str(max(a.steps)), {}).values()]
    report = {
        "command": command,
        "test_cases": 40, "split": str(SPLIT.relative_to(ROOT)), "cores": cores, "threads": a.threads,
        "rows": rows,
        "nnunet_own_step": own_recipe(statistics.fmean(budgets)) if budgets else None,
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = a.out.with_name(a.out.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(report, indent=1, allow_nan=False))
    tmp.replace(a.out)
    for name, row in rows.items():
        for step, seeds in row["points"].items():
            print(name, step, {s: (round(v["mean_dice"], 3), v["cpu_seconds"]) for s, v in seeds.items()})
        for m in row["missing"]:
            print(f"{name}: missing {m}")
    return report


if __name__ == "__main__":
    main()
