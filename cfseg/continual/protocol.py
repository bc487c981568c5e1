"""``cfseg-protocol --config protocol.yaml``: a multi-stage continual-learning protocol, several strategies.

A protocol file names a base training config (trainer/model/data settings shared by every stage), the stages
(each with its datasets and, optionally, the classes that count as annotated there, plus image-only datasets
of earlier domains for distillation) and the strategies to compare on the same budget:

* ``distill``: stage i starts from stage i-1's checkpoint, which is also the frozen teacher (cfseg's method);
* ``finetune``: stage i starts from stage i-1's checkpoint, no distillation (the lower bound);
* ``joint``: after stage i, one model trained from scratch on the data of stages 0..i at once (the upper
  bound; each stage keeps its own annotated classes).

Stage 0 is the same training for every strategy and runs once. After every stage the model is scored on the
test cases of every stage so far, on that stage's classes, giving the accuracy matrix R (R[i][j] = mean Dice
on stage j's test cases after stage i), the average Dice after the last stage and the backward transfer
BWT = mean_{j<T} (R[T][j] - R[j][j]). Written per strategy as JSON, CSV and a heatmap PNG.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from cfseg.metrics import DICE_CONVENTION, average_after_last, backward_transfer

STRATEGIES = ("distill", "finetune", "joint")


def load_protocol(path: str | Path) -> dict[str, Any]:
    """Read and check a protocol YAML (paths in it are relative to the working directory)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: protocol file not found")
    spec = yaml.safe_load(path.read_text())
    if not isinstance(spec, dict) or not spec.get("stages"):
        raise ValueError(f"{path}: a protocol needs a non-empty 'stages' list")
    for i, st in enumerate(spec["stages"]):
        if not st.get("datasets"):
            raise ValueError(f"{path}: stage {i} has no datasets")
        st.setdefault("name", f"stage{i}")
    bad = [s for s in spec.get("strategies", STRATEGIES) if s not in STRATEGIES]
    if bad:
        raise ValueError(f"{path}: unknown strategies {bad}; choose from {STRATEGIES}")
    spec.setdefault("strategies", list(STRATEGIES))
    spec.setdefault("output", "results/protocol")
    spec.setdefault("seed", 0)
    return spec


def _stage_datasets(stage: dict[str, Any]) -> list[dict[str, Any]]:
    """The stage's labelled datasets, with the stage's classes as the annotated set when given."""
    out = []
    for d in stage["datasets"]:
        d = dict(d) if isinstance(d, dict) else {"path": d}
        if stage.get("classes") and "classes" not in d:
            d["classes"] = list(stage["classes"])
        out.append(d)
    return out


def _unlabeled(stage: dict[str, Any]) -> list[dict[str, Any]]:
    """Image-only entries (their own split settings keep earlier stages' test cases out)."""
    return [{**(dict(d) if isinstance(d, dict) else {"path": d}), "labeled": False,
             "name": f"unlabeled_{i}_" + Path(d["path"] if isinstance(d, dict) else d).name}
            for i, d in enumerate(stage.get("unlabeled", []))]


def train_stage(spec: dict, out: Path, tag: str, datasets: list[dict], previous: Path | None, strategy: str,
                extra: list[str] | None = None) -> Path:
    """One ``cfseg fit`` run; returns its checkpoint. Reuses an existing checkpoint of the same tag."""
    from cfseg.cli import main as cli

    run_dir = out / "runs" / tag
    done = run_dir / "final.ckpt"
    if done.is_file():
        print(f"[{tag}] reusing {done}")
        return done
    names = {}
    for d in datasets:  # distinct dataset names (the same folder may appear as labelled and image-only)
        base = d.get("name") or Path(d["path"]).name
        d["name"] = base if base not in names else f"{base}_{len(names)}"
        names[d["name"]] = 1
    args = ["fit", "--config", str(spec["base_config"]), f"--data.datasets={json.dumps(datasets)}",
            f"--trainer.default_root_dir={run_dir}", f"--trainer.logger.init_args.save_dir={run_dir}",
            f"--model.strategy={strategy}", f"--seed_everything={spec['seed']}", f"--data.seed={spec['seed']}",
            "--trainer.enable_checkpointing=true"]
    if previous is not None:
        args.append(f"--model.previous_checkpoint={previous}")
    args += list(spec.get("fit_args", [])) + list(extra or [])
    t0 = time.time()
    print(f"[{tag}] cfseg {' '.join(args)}", flush=True)
    run = cli(args)
    run.trainer.save_checkpoint(done)
    print(f"[{tag}] trained in {time.time() - t0:.0f} s -> {done}", flush=True)
    return done


def evaluate_stage_tests(ckpt: Path, spec: dict, upto: int) -> list[float]:
    """Mean Dice of ``ckpt`` on the test cases of stages 0..upto, each on its own classes.

    Stages that share test cases (one fixed test set, as in the OpenKBP protocol) predict each case once.
    """
    from cfseg.evaluation import evaluate_groups
    from cfseg.module import load_checkpoint

    module = load_checkpoint(str(ckpt))
    groups = []
    for j in range(upto + 1):
        st = spec["stages"][j]
        datasets = [{**d, "classes": None} for d in _stage_datasets(st)]
        classes = st.get("classes") or sorted({c for d in _stage_datasets(st) for c in (d.get("classes") or [])}) \
            or None
        groups.append((datasets, classes))
    return [res["mean_dice"] for res in evaluate_groups(module, groups, split="test", seed=spec["seed"])]


def plot_matrix(R: list[list[float]], names: list[str], title: str, path: Path) -> None:
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
    w = max(10, *[len(n) + 6 for n in names])
    lines = [" " * w + "".join(f"{'test ' + n:>{w}}" for n in names)]
    for i, row in enumerate(R):
        cells = "".join(f"{v:>{w}.3f}" for v in row) + "".join(f"{'-':>{w}}" for _ in range(len(names) - len(row)))
        lines.append(f"{'after ' + names[i]:<{w}}{cells}")
    return "\n".join(lines)


def run_protocol(spec: dict[str, Any], strategies: list[str] | None = None) -> dict[str, Any]:
    out = Path(spec["output"])
    out.mkdir(parents=True, exist_ok=True)
    stages = spec["stages"]
    names = [s["name"] for s in stages]
    results: dict[str, Any] = {}
    t_start = time.time()
    stage0 = train_stage(spec, out, "stage0", _stage_datasets(stages[0]), None, "finetune")
    row0 = evaluate_stage_tests(stage0, spec, 0)
    for strategy in strategies or spec["strategies"]:
        t0 = time.time()
        R = [row0]
        prev = stage0
        for i in range(1, len(stages)):
            if strategy == "joint":
                datasets = [d for j in range(i + 1) for d in _stage_datasets(stages[j])]
                ckpt = train_stage(spec, out, f"joint_stage{i}", datasets, None, "joint")
            else:
                datasets = _stage_datasets(stages[i]) + (_unlabeled(stages[i]) if strategy == "distill" else [])
                ckpt = train_stage(spec, out, f"{strategy}_stage{i}", datasets, prev, strategy)
            R.append(evaluate_stage_tests(ckpt, spec, i))
            prev = ckpt
            print(f"[{strategy}] after {names[i]}: " + ", ".join(f"{v:.3f}" for v in R[-1]), flush=True)
        res = {"strategy": strategy, "stages": names, "R": R, "average_dice": average_after_last(R),
               "bwt": backward_transfer(R), "wall_time_s": round(time.time() - t0, 1),
               "dice_convention": DICE_CONVENTION}
        results[strategy] = res
        (out / f"{strategy}_matrix.json").write_text(json.dumps(res, indent=2))
        with open(out / f"{strategy}_matrix.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["after_stage", *[f"test_{n}" for n in names]])
            for i, row in enumerate(R):
                w.writerow([names[i], *[f"{v:.4f}" for v in row], *[""] * (len(names) - len(row))])
        plot_matrix(R, names, f"{strategy}: avg Dice {res['average_dice']:.3f}, BWT {res['bwt']:+.3f}",
                    out / f"{strategy}_matrix.png")
    write_summary(out, last_wall_time_s=round(time.time() - t_start, 1))
    return results


def write_summary(out: Path, last_wall_time_s: float | None = None) -> dict[str, Any]:
    """``summary.json`` over every ``<strategy>_matrix.json`` in ``out``.

    Built from the files, so strategies run in separate invocations (for example side by side, sharing the
    stage-0 checkpoint) end up in one summary instead of the last run overwriting the others.
    """
    summary = {}
    for s in STRATEGIES:
        f = out / f"{s}_matrix.json"
        if f.is_file():
            r = json.loads(f.read_text())
            summary[s] = {"average_dice": r["average_dice"], "bwt": r["bwt"], "wall_time_s": r.get("wall_time_s")}
    doc = {"strategies": summary, "last_invocation_wall_time_s": last_wall_time_s}
    (out / "summary.json").write_text(json.dumps(doc, indent=2))
    return doc


def print_results(results: dict[str, Any]) -> None:
    for strategy, res in results.items():
        print(f"\n== {strategy} ==  (R[i][j]: mean Dice on stage j's test cases after stage i)")
        print(format_matrix(res["R"], res["stages"]))
        print(f"average Dice after the last stage: {res['average_dice']:.3f}   BWT: {res['bwt']:+.3f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="cfseg-protocol", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="protocol YAML")
    p.add_argument("--strategies", nargs="*", choices=STRATEGIES, default=None)
    p.add_argument("--output", default=None, help="override the protocol's output folder")
    a = p.parse_args(argv)
    spec = load_protocol(a.config)
    if a.output:
        spec["output"] = a.output
    print_results(run_protocol(spec, a.strategies))
    return 0


if __name__ == "__main__":
    sys.exit(main())
