"""``cfseg-protocol --config protocol.yaml``: a multi-stage continual-learning protocol, strategies x seeds.

A protocol file names a base training config (trainer/model/data settings shared by every stage), the stages
(each with its datasets and, optionally, the classes that count as annotated there, image-only datasets of
earlier domains for distillation, and its own budget) and the strategies to compare:

* ``distill``: stage i starts from stage i-1's checkpoint, which is also the frozen teacher (cfseg's method);
* ``finetune``: stage i starts from stage i-1's checkpoint, no distillation (the lower bound);
* ``experts``: stage 0's network is frozen; stage i trains only a new LoRA expert (``model.expert_*``) that serves
  the stage's classes in the stage's domains, chosen per volume by the analytic router (``model.router_*``);
* ``ewc`` (reference): ``finetune`` with the EWC penalty (``model.ewc_lambda``) towards the previous stage's weights,
  weighted by the diagonal Fisher each stage stores in its checkpoint;
* ``replay`` (reference, not rehearsal-free): ``finetune`` plus ``replay_fraction`` (default 0.25) of every earlier
  stage's training cases;
* ``joint``: after stage i, one model trained from scratch on the data of stages 0..i at once with the
  *cumulative* step budget of stages 0..i and stage 0's learning rate (the upper bound; each stage keeps its own
  annotated classes).

Budgets: every stage trains ``max_steps`` steps (per stage, else the protocol's ``max_steps``, else the base
config's ``trainer.max_steps``) at ``lr * lr_factor`` (``lr``: the protocol's, else the base config's
``model.lr``, else 2e-3; ``model.incremental_lr_factor`` in a strategy's ``fit_args`` would multiply on top).
Free-form ``fit_args`` (top level, per stage, per strategy entry ``{name, strategy, fit_args}``) go to ``cfseg
fit`` after the protocol's own arguments; a strategy entry's ``stage_fit_args`` (``{stage name: [...]}``) go to
one incremental stage of that row only, after the rest (a distillation schedule that differs between stages).
Stage 0 is the same training for every strategy and runs once per seed. In an incremental stage the validation
cases of the earlier stages join as validation-only datasets, so the validation metrics (``val/dice_<class>``)
score every class seen so far.

Each seed runs under ``<output>/seed<N>/`` with ``--seed_everything=N --data.seed=N`` (the same crops for every
strategy of a seed). After every stage the model is scored on the test cases of every stage so far, on that
stage's classes: the accuracy matrix R (R[i][j] = mean Dice on stage j's test cases after stage i), the average
Dice after the last stage and the backward transfer BWT = mean_{j<T} (R[T][j] - R[j][j]), written per strategy
and seed as JSON, CSV and a heatmap PNG, and over all strategies and seeds as ``<output>/summary.json``.
With ``full_matrix: true`` every row also scores the later stages' test cases (R[i][j] for j > i: the
forward transfer, e.g. a stage-0 model on a new scanner's images before it learnt them); average Dice and BWT
still use R[T][j <= T] and the diagonal; a later stage whose classes the model does not know yet scores NaN.
With ``score_val: true`` the same matrix is also computed on the stages' validation cases (``R_val``,
``average_dice_val``, ``bwt_val``): the numbers to choose settings on, never the test cases.
A finished run (``runs/<tag>/final.ckpt``) is reused when the protocol runs again, and only if it was trained with
the settings the protocol now asks for (budget, lr, and the resolved fit configuration: :func:`settings_mismatch`);
stage 0 and joint runs copied into another output folder stay reusable.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from cfseg.metrics import DICE_CONVENTION, average_after_last, backward_transfer

STRATEGIES = ("distill", "finetune", "joint", "experts", "replay", "ewc")
#: the module's strategy for each protocol strategy (``replay`` is fine-tuning on the stage's data plus a fraction
#: of every earlier stage's training cases: a reference row that is not rehearsal-free)
MODULE_STRATEGY = {"distill": "distill", "finetune": "finetune", "joint": "joint", "experts": "experts",
                   "replay": "finetune", "ewc": "ewc"}
DEFAULT_STRATEGIES = ("distill", "finetune", "joint")
DEFAULT_REPLAY_FRACTION = 0.25  # EvoSAM's experience-replay baseline keeps 25% of each earlier task
DEFAULT_LR = 2e-3  # CFSegModule's default
# set through protocol keys (max_steps, lr/lr_factor, seeds), never through fit_args
RESERVED_ARGS = {"--trainer.max_steps": "max_steps", "--model.lr": "lr / lr_factor",
                 "--seed_everything": "seeds", "--data.seed": "seeds / split_seed"}


def _fit_args(value: Any, key: str) -> list[str]:
    """Check a ``fit_args`` list (strings passed to ``cfseg fit``); returns it as a list."""
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(a, str) for a in value):
        raise ValueError(f"{key}: fit_args must be a list of strings such as '--trainer.precision=bf16-mixed'")
    for a in value:
        if a.split("=")[0] in RESERVED_ARGS:
            raise ValueError(f"{key}: {a!r} is set by the protocol; use the protocol key "
                             f"`{RESERVED_ARGS[a.split('=')[0]]}` instead")
    return list(value)


def _stage_fit_args(value: Any, key: str, stage_names: list[str], strategy: str) -> dict[str, list[str]]:
    """Check a row's ``stage_fit_args`` (``{stage name: fit_args}``, incremental stages only) -> that dict."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"{key}: stage_fit_args maps an incremental stage's name to its fit_args, e.g. "
                         f"{{{stage_names[-1]}: ['--model.kd_weight=5.0']}}")
    if strategy == "joint":
        raise ValueError(f"{key}: joint trains one model per stage on the stages so far; give it fit_args, not "
                         "stage_fit_args")
    for name in value:
        if name not in stage_names[1:]:
            raise ValueError(f"{key}: {name!r} is not an incremental stage (stage 0 is shared by every row); "
                             f"choose from {stage_names[1:]}")
    return {name: _fit_args(args, f"{key}.{name}") for name, args in value.items()}


def _strategies(value: Any, path: Path, stage_names: list[str]) -> list[dict[str, Any]]:
    """Normalise ``strategies``: names or ``{name, strategy, fit_args, stage_fit_args}`` entries -> list of such
    dicts (``fit_args`` go to every incremental stage of the row, ``stage_fit_args[stage name]`` after them to
    that stage only)."""
    out = []
    for i, s in enumerate(value):
        entry = {"name": s, "strategy": s} if isinstance(s, str) else dict(s or {})
        entry.setdefault("strategy", entry.get("name"))
        entry.setdefault("name", entry["strategy"])
        if entry["strategy"] not in STRATEGIES:
            raise ValueError(f"{path}: strategies[{i}].strategy {entry['strategy']!r} unknown; choose from "
                             f"{STRATEGIES}")
        if not str(entry["name"]).replace("_", "").replace("-", "").isalnum():
            raise ValueError(f"{path}: strategies[{i}].name {entry['name']!r}: letters, digits, '_' or '-' only")
        entry["fit_args"] = _fit_args(entry.get("fit_args"), f"{path}: strategies[{i}].fit_args")
        entry["stage_fit_args"] = _stage_fit_args(entry.get("stage_fit_args"),
                                                  f"{path}: strategies[{i}].stage_fit_args", stage_names,
                                                  entry["strategy"])
        out.append(entry)
    names = [e["name"] for e in out]
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: strategies repeat a name: {names}")
    return out


def _budgets(spec: dict[str, Any], path: Path) -> None:
    """Fill ``spec["stage_steps"]`` and ``spec["stage_lr"]`` (None: the base config's optimizer decides)."""
    base_path = Path(spec["base_config"])
    if not base_path.is_file():
        raise FileNotFoundError(f"{path}: base_config {base_path} not found")
    base = yaml.safe_load(base_path.read_text()) or {}
    default_steps = spec.get("max_steps", (base.get("trainer") or {}).get("max_steps"))
    steps = []
    for i, st in enumerate(spec["stages"]):
        n = st.get("max_steps", default_steps)
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"{path}: stages[{i}].max_steps is {n!r}: give a positive step budget per stage, as "
                             f"`max_steps` at the top level, or trainer.max_steps in {base_path}")
        steps.append(n)
    model = base.get("model") or {}
    uses_lr = "lr" in spec or any("lr_factor" in st for st in spec["stages"])
    if "optimizer" in base or "optimizer" in model:
        if uses_lr:
            raise ValueError(f"{path}: `lr`/`lr_factor` scale model.lr, but {base_path} sets an optimizer block; "
                             "remove the optimizer block or the lr keys")
        spec["stage_lr"] = [None] * len(steps)
    else:
        lr = float(spec.get("lr", model.get("lr", DEFAULT_LR)))
        lrs = []
        for i, st in enumerate(spec["stages"]):
            f = st.get("lr_factor", 1.0)
            if not isinstance(f, (int, float)) or isinstance(f, bool) or f <= 0:
                raise ValueError(f"{path}: stages[{i}].lr_factor is {f!r}: give a positive number")
            lrs.append(lr * float(f))
        spec["stage_lr"] = lrs
    spec["stage_steps"] = steps


def load_protocol(path: str | Path) -> dict[str, Any]:
    """Read and check a protocol YAML (paths in it are relative to the working directory).

    Returns:
        the spec with defaults filled in: ``strategies`` as ``{name, strategy, fit_args}`` dicts, ``seeds``,
        ``stage_steps`` and ``stage_lr`` (one per stage).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: protocol file not found")
    spec = yaml.safe_load(path.read_text())
    if not isinstance(spec, dict) or not spec.get("stages"):
        raise ValueError(f"{path}: a protocol needs a non-empty 'stages' list")
    if not spec.get("base_config"):
        raise ValueError(f"{path}: base_config (the cfseg fit config every stage shares) is missing")
    for i, st in enumerate(spec["stages"]):
        if not st.get("datasets"):
            raise ValueError(f"{path}: stages[{i}].datasets is empty")
        st.setdefault("name", f"stage{i}")
        st["fit_args"] = _fit_args(st.get("fit_args"), f"{path}: stages[{i}].fit_args")
    spec["fit_args"] = _fit_args(spec.get("fit_args"), f"{path}: fit_args")
    spec["strategies"] = _strategies(spec.get("strategies", DEFAULT_STRATEGIES), path,
                                     [st["name"] for st in spec["stages"]])
    spec.setdefault("output", "results/protocol")
    seeds = spec.get("seeds", [spec.get("seed", 0)])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
        raise ValueError(f"{path}: seeds must be a non-empty list of integers, got {seeds!r}")
    spec["seeds"] = seeds
    val = spec.setdefault("val_every_n_steps", "end")
    if val not in ("end", None) and not (isinstance(val, int) and val > 0):
        raise ValueError(f"{path}: val_every_n_steps is {val!r}: 'end', a positive integer or null")
    _budgets(spec, path)
    return spec


def _entry(d: Any) -> dict[str, Any]:
    return dict(d) if isinstance(d, dict) else {"path": d}


def _stage_datasets(stage: dict[str, Any]) -> list[dict[str, Any]]:
    """The stage's labelled datasets, with the stage's classes as the annotated set when given."""
    out = []
    for d in map(_entry, stage["datasets"]):
        if stage.get("classes") and "classes" not in d:
            d["classes"] = list(stage["classes"])
        out.append(d)
    return out


def joint_datasets(stages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The labelled datasets of ``stages`` (each with its own annotated classes): a joint run's training data."""
    return [d for st in stages for d in _stage_datasets(st)]


def _unlabeled(stage: dict[str, Any]) -> list[dict[str, Any]]:
    """Image-only entries (their own split settings keep earlier stages' test cases out)."""
    return [{**_entry(d), "labeled": False, "name": f"unlabeled_{i}_" + Path(_entry(d)["path"]).name}
            for i, d in enumerate(stage.get("unlabeled", []))]


def _val_only(stages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The validation cases of ``stages`` as validation-only entries, each annotating its own stage's classes."""
    return [{**d, "val_only": True, "name": f"val_{st['name']}_{k}_" + Path(d["path"]).name}
            for st in stages for k, d in enumerate(_stage_datasets(st))]


def _replayed(spec: dict[str, Any], stages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``replay``: every earlier stage's labelled datasets restricted to ``replay_fraction`` of their training
    cases (their validation cases validate as usual, so no validation-only copies are added)."""
    fraction = float(spec.get("replay_fraction", DEFAULT_REPLAY_FRACTION))
    return [{**d, "train_fraction": fraction, "name": f"replay_{st['name']}_{k}_" + Path(d["path"]).name}
            for st in stages for k, d in enumerate(_stage_datasets(st))]


def _val_args(spec: dict[str, Any], steps: int) -> list[str]:
    every = spec.get("val_every_n_steps", "end")
    if every is None:
        return []
    return ["--trainer.check_val_every_n_epoch=null",
            f"--trainer.val_check_interval={steps if every == 'end' else every}"]


#: settings that say where a run lives, how its data is held or what it logs, not how it trains: a run copied
#: into another output folder (or run with another cache) stays reusable
RUN_LOCATION_KEYS = frozenset({"model.previous_checkpoint", "data.previous_checkpoint", "data.cache", "data.cache_dir",
                               "trainer.default_root_dir", "trainer.logger", "trainer.callbacks",
                               "trainer.enable_progress_bar", "trainer.enable_model_summary",
                               "trainer.log_every_n_steps"})


def settings_mismatch(ckpt: Path, record: dict, config: dict) -> list[str]:
    """How the resolved ``cfseg fit`` ``config`` (:func:`cfseg.cli.resolve_fit_config`) differs from the finished
    run ``ckpt`` was trained with: its model and data hyper-parameters (stored in the checkpoint) and, for runs
    recorded with their configuration (``record["config"]``), its trainer settings and seed.

    Not compared: a setting only one side knows (an option added since the run), :data:`RUN_LOCATION_KEYS`, and
    model settings without effect on the run (:func:`cfseg.module.settings_without_effect`: a stage 0 shared by
    every strategy stays reusable when a distillation default changes). A default changed in code since the run
    counts wherever the checkpoint stored the old value.

    Returns:
        One ``"section.key: trained with A, now B"`` line per difference (empty: the run is what the protocol asks).
    """
    import torch

    from cfseg.module import resolve_defaults, settings_without_effect

    def plain(v: Any) -> Any:
        return json.loads(json.dumps(v, default=str))

    stored = torch.load(ckpt, map_location="cpu", weights_only=True)
    recorded = record.get("config") or {}
    model = plain(resolve_defaults(config.get("model", {})))
    unused = settings_without_effect(str(model.get("strategy")), model.get("previous_checkpoint") is not None)
    sides = [("model", model, stored.get("hyper_parameters") or {}),
             ("data", config.get("data", {}), stored.get("datamodule_hyper_parameters") or {}),
             ("trainer", config.get("trainer", {}), recorded.get("trainer") or {})]
    diffs = []
    for section, new, old in sides:
        for key, now in sorted(new.items()):
            if f"{section}.{key}" in RUN_LOCATION_KEYS or key not in old or key.startswith("_") or (
                    section == "model" and key in unused):
                continue
            if plain(old[key]) != now:
                diffs.append(f"{section}.{key}: trained with {plain(old[key])!r}, now {now!r}")
    if "seed_everything" in recorded and recorded["seed_everything"] != config.get("seed_everything"):
        diffs.append(f"seed_everything: trained with {recorded['seed_everything']!r}, now "
                     f"{config.get('seed_everything')!r}")
    return diffs


def train_stage(spec: dict, out: Path, tag: str, datasets: list[dict], previous: Path | None, strategy: str,
                steps: int, lr: float | None, seed: int, extra: list[str] | None = None) -> tuple[Path, float]:
    """One ``cfseg fit`` run of ``steps`` steps at learning rate ``lr`` under ``out/runs/tag``.

    Returns:
        (checkpoint path, training wall time in s). A finished run of the same tag is reused (its recorded
        wall time is returned); one trained with another budget or other settings (:func:`settings_mismatch`:
        fit arguments, base config, defaults) is refused.
    """
    from cfseg.cli import main as cli
    from cfseg.cli import resolve_fit_config

    run_dir = out / "runs" / tag
    done, record = run_dir / "final.ckpt", run_dir / "final.json"
    names: set[str] = set()
    for d in datasets:  # distinct dataset names (the same folder may appear as labelled and image-only)
        base = d.get("name") or Path(d["path"]).name
        d["name"] = base if base not in names else f"{base}_{len(names)}"
        names.add(d["name"])
    split_seed = spec.get("split_seed", seed)
    args = ["fit", "--config", str(spec["base_config"]), f"--data.datasets={json.dumps(datasets)}",
            f"--trainer.default_root_dir={run_dir}", f"--trainer.logger.init_args.save_dir={run_dir}",
            f"--model.strategy={strategy}", f"--seed_everything={seed}", f"--data.seed={split_seed}",
            "--trainer.enable_checkpointing=true", f"--trainer.max_steps={steps}", "--trainer.max_epochs=-1",
            *_val_args(spec, steps)]
    if lr is not None:
        args.append(f"--model.lr={lr!r}")
    if previous is not None:
        args.append(f"--model.previous_checkpoint={previous}")
    args += list(spec.get("fit_args", [])) + list(extra or [])
    if done.is_file():
        info = json.loads(record.read_text()) if record.is_file() else {}
        if info and (info.get("steps"), info.get("lr")) != (steps, lr):
            raise ValueError(f"{done} was trained with max_steps={info.get('steps')}, lr={info.get('lr')}, but the "
                             f"protocol now asks for max_steps={steps}, lr={lr}: delete {run_dir} or use another "
                             "output folder")
        diffs = settings_mismatch(done, info, resolve_fit_config(args[1:]))
        if diffs:
            raise ValueError(f"{done} was trained with other settings than the protocol now asks for ("
                             + "; ".join(diffs) + f"): delete {run_dir} or use another output folder")
        print(f"[{tag}] reusing {done}")
        return done, float(info.get("wall_time_s", 0.0))
    t0 = time.time()
    print(f"[{tag}] cfseg {' '.join(args)}", flush=True)
    run = cli(args)
    run.trainer.save_checkpoint(done)
    wall = round(time.time() - t0, 1)
    params = list(run.model.parameters())
    record.write_text(json.dumps({"tag": tag, "steps": steps, "lr": lr, "seed": seed, "wall_time_s": wall,
                                  "global_step": run.trainer.global_step,
                                  "trainable_params": sum(p.numel() for p in params if p.requires_grad),
                                  "total_params": sum(p.numel() for p in params), "args": args[1:],
                                  "config": resolve_fit_config(args[1:])}, indent=2))
    print(f"[{tag}] trained in {wall:.0f} s -> {done}", flush=True)
    return done, wall


def evaluate_stage_tests(ckpt: Path, spec: dict, upto: int, seed: int = 0, split: str = "test",
                         details: dict[str, Any] | None = None) -> tuple[list[float], dict[str, dict]]:
    """Dice of ``ckpt`` on the ``split`` ("test" or "val") cases of stages 0..upto, each on its own classes.

    Stages that share test cases (one fixed test set, as in the OpenKBP protocol) predict each case once.
    ``details``, when given, receives ``routing_accuracy``: per stage, the fraction of its cases the router sent
    to an expert of their own domain (None where the model does not route).

    Returns:
        (mean Dice per stage [upto + 1], ``{stage name: {class: Dice}}``).
    """
    import hashlib

    from cfseg.evaluation import evaluate_groups
    from cfseg.module import load_checkpoint

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
        datasets = [{**d, "classes": None} for d in _stage_datasets(st)]
        classes = st.get("classes") or sorted({c for d in _stage_datasets(st) for c in (d.get("classes") or [])}) \
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
    tmp = cache.with_suffix(".tmp")
    tmp.write_text(json.dumps(_finite({"key": key, "row": row, "per_class": per_class, "routing_accuracy": routing})))
    tmp.replace(cache)
    return row, per_class


def _params(run_dir: Path) -> dict[str, int | None]:
    """Trainable and total parameters of a finished run (from its ``final.json``; None for older records)."""
    record = run_dir / "final.json"
    info = json.loads(record.read_text()) if record.is_file() else {}
    return {"trainable": info.get("trainable_params"), "total": info.get("total_params")}


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


def _finite(x: Any) -> Any:
    """NaN -> None, recursively (strict JSON)."""
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite(v) for v in x]
    return x


def run_seed(spec: dict[str, Any], seed: int, strategies: list[dict[str, Any]]) -> dict[str, Any]:
    """Every strategy of one seed under ``<output>/seed<seed>/``, sharing one stage-0 run.

    Returns:
        ``{strategy name: result}``; each result is also written as ``<name>_matrix.{json,csv,png}``.
    """
    out = Path(spec["output"]) / f"seed{seed}"
    out.mkdir(parents=True, exist_ok=True)
    stages, steps, lrs = spec["stages"], spec["stage_steps"], spec["stage_lr"]
    names = [s["name"] for s in stages]
    stage0, t_stage0 = train_stage(spec, out, "stage0", _stage_datasets(stages[0]), None, "finetune", steps[0],
                                   lrs[0], seed, stages[0]["fit_args"])
    last = len(stages) - 1
    upto = (lambda i: last) if spec.get("full_matrix") else (lambda i: i)  # full_matrix: later stages' tests too
    row0, classes0 = evaluate_stage_tests(stage0, spec, upto(0), seed)
    score_val = bool(spec.get("score_val", False))
    val0, val_classes0 = evaluate_stage_tests(stage0, spec, upto(0), seed, "val") if score_val else (None, {})
    results: dict[str, Any] = {}
    for entry in strategies:
        name, strategy = entry["name"], entry["strategy"]
        train_s, eval_s = t_stage0, 0.0
        R, per_class, prev = [row0], classes0, stage0
        R_val, per_class_val = [val0], val_classes0
        budget = [steps[0]]
        routing: list[list[float | None]] = []
        params = [_params(out / "runs" / "stage0")]
        for i in range(1, len(stages)):
            if strategy == "joint":
                datasets = joint_datasets(stages[: i + 1])
                budget.append(sum(steps[: i + 1]))
                ckpt, t = train_stage(spec, out, f"{name}_stage{i}", datasets, None, "joint", budget[-1], lrs[0],
                                      seed, stages[0]["fit_args"] + entry["fit_args"])
            else:
                datasets = _stage_datasets(stages[i]) + (_unlabeled(stages[i]) if strategy == "distill" else []) \
                    + (_replayed(spec, stages[:i]) if strategy == "replay" else _val_only(stages[:i]))
                budget.append(steps[i])
                ckpt, t = train_stage(spec, out, f"{name}_stage{i}", datasets, prev, MODULE_STRATEGY[strategy],
                                      steps[i], lrs[i], seed, stages[i]["fit_args"] + entry["fit_args"]
                                      + entry.get("stage_fit_args", {}).get(names[i], []))
            train_s += t
            params.append(_params(ckpt.parent))
            t0 = time.time()
            info: dict[str, Any] = {}
            row, per_class = evaluate_stage_tests(ckpt, spec, upto(i), seed, details=info)
            routing.append(info.get("routing_accuracy"))
            if score_val:
                row_val, per_class_val = evaluate_stage_tests(ckpt, spec, upto(i), seed, "val")
                R_val.append(row_val)
            eval_s += time.time() - t0
            R.append(row)
            prev = ckpt
            print(f"[seed {seed} {name}] after {names[i]}: " + ", ".join(f"{v:.3f}" for v in row), flush=True)
        res = {"strategy": name, "base_strategy": strategy, "seed": seed, "stages": names, "R": R,
               "average_dice": average_after_last(R), "bwt": backward_transfer(R), "per_class_dice": per_class,
               "stage_steps": budget, "stage_lr": [lrs[0]] * len(stages) if strategy == "joint" else lrs,
               "fit_args": entry["fit_args"],
               **({"stage_fit_args": entry["stage_fit_args"]} if entry.get("stage_fit_args") else {}),
               "wall_time_s": round(train_s, 1),
               "eval_time_s": round(eval_s, 1), "dice_convention": DICE_CONVENTION, "params": params}
        if any(v is not None for r in routing for v in (r or [])):  # experts: routing accuracy per stage's cases
            res["routing_accuracy"] = [None, *routing]
        if score_val:  # the validation cases' matrix: what settings are chosen on (never the test cases)
            res.update(R_val=R_val, average_dice_val=average_after_last(R_val), bwt_val=backward_transfer(R_val),
                       per_class_dice_val=per_class_val)
        results[name] = res
        (out / f"{name}_matrix.json").write_text(json.dumps(_finite(res), indent=2))
        with open(out / f"{name}_matrix.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["after_stage", *[f"test_{n}" for n in names]])
            for i, row in enumerate(R):
                w.writerow([names[i], *[f"{v:.4f}" for v in row], *[""] * (len(names) - len(row))])
        plot_matrix(R, names, f"{name} (seed {seed}): avg Dice {res['average_dice']:.3f}, BWT {res['bwt']:+.3f}",
                    out / f"{name}_matrix.png")
    return results


def run_protocol(spec: dict[str, Any], strategies: list[str] | None = None,
                 seeds: list[int] | None = None, workers: int = 1) -> dict[int, dict[str, Any]]:
    """Run ``strategies`` (names; default all of the spec's) for ``seeds`` (default the spec's), then write
    ``<output>/summary.json`` (and its copy when ``spec["summary_copy"]`` is set).

    With ``workers > 1`` a seed's stage 0 trains once in this process, then its strategies run side by side in
    up to ``workers`` single-thread processes (each logs to ``<output>/seed<N>/<strategy>.log``); the results
    are the same files a sequential run writes.

    Returns:
        ``{seed: {strategy name: result}}`` (see :func:`run_seed`).
    """
    known = {e["name"]: e for e in spec["strategies"]}
    unknown = [s for s in strategies or [] if s not in known]
    if unknown:
        raise ValueError(f"strategies {unknown} are not in the protocol; choose from {list(known)}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    chosen = [known[s] for s in strategies] if strategies else spec["strategies"]
    if workers == 1 or len(chosen) == 1:
        results = {seed: run_seed(spec, seed, chosen) for seed in (seeds or spec["seeds"])}
    else:
        results = {seed: _run_seed_parallel(spec, seed, chosen, workers) for seed in (seeds or spec["seeds"])}
    write_summary(Path(spec["output"]), spec.get("summary_copy"))
    return results


def single_thread_logging_to(log: str) -> None:
    """In a child process: stdout and stderr (file descriptors, so C libraries too) to ``log``; one torch thread."""
    import os

    import torch

    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    torch.set_num_threads(1)


def _strategy_worker(spec: dict[str, Any], seed: int, entry: dict[str, Any], log: str) -> None:
    """Child process: one strategy of one seed, one torch thread, stdout/stderr to ``log``."""
    single_thread_logging_to(log)
    run_seed(spec, seed, [entry])


def _run_seed_parallel(spec: dict[str, Any], seed: int, strategies: list[dict[str, Any]],
                       workers: int) -> dict[str, Any]:
    import multiprocessing

    run_seed(spec, seed, [])  # the shared stage 0, once, before any strategy needs it
    out = Path(spec["output"]) / f"seed{seed}"
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked torch thread pools
    pending, running = list(strategies), {}
    try:
        while pending or running:
            while pending and len(running) < workers:
                entry = pending.pop(0)
                log = out / f"{entry['name']}.log"
                proc = ctx.Process(target=_strategy_worker, args=(spec, seed, entry, str(log)))
                proc.start()
                print(f"[seed {seed}] {entry['name']}: process {proc.pid}, log {log}", flush=True)
                running[entry["name"]] = (proc, log)
            time.sleep(0.5)
            for name, (proc, log) in list(running.items()):
                if proc.is_alive():
                    continue
                proc.join()
                del running[name]
                if proc.exitcode != 0:
                    raise RuntimeError(f"strategy {name} (seed {seed}) failed with exit code {proc.exitcode}; "
                                       f"see {log}")
                print(f"[seed {seed}] {name} finished", flush=True)
    finally:
        for proc, _ in running.values():
            proc.terminate()
    return {e["name"]: json.loads((out / f"{e['name']}_matrix.json").read_text()) for e in strategies}


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
    (out / "summary.json").write_text(json.dumps(_finite(doc), indent=2))
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="cfseg-protocol", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="protocol YAML")
    p.add_argument("--strategies", nargs="*", default=None, help="strategy names (default: all in the protocol)")
    p.add_argument("--seeds", nargs="+", type=int, default=None,
                   help="seeds (default: the protocol's `seeds`, or [`seed`])")
    p.add_argument("--output", default=None, help="override the protocol's output folder")
    p.add_argument("--copy-summary", default=None, help="also copy summary.json here (YAML key: summary_copy)")
    p.add_argument("--workers", type=int, default=1,
                   help="run a seed's strategies side by side in this many single-thread processes (after stage 0)")
    a = p.parse_args(argv)
    spec = load_protocol(a.config)
    if a.output:
        spec["output"] = a.output
    if a.copy_summary:
        spec["summary_copy"] = a.copy_summary
    results = run_protocol(spec, a.strategies, a.seeds, a.workers)
    summary = json.loads((Path(spec["output"]) / "summary.json").read_text())
    print_results(results, summary)
    print(f"\nwrote {Path(spec['output']) / 'summary.json'}" + (f" and {spec['summary_copy']}"
                                                               if spec.get("summary_copy") else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
