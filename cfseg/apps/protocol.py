"""``cfseg-protocol --config protocol.yaml``: a multi-stage continual-learning protocol, strategies x seeds.

A protocol file names a base training config (trainer/model/data settings shared by every stage), the stages
(each with its datasets and, optionally, the classes that count as annotated there, image-only datasets of
earlier domains for distillation, and its own budget) and the strategies to compare, as typed rows::

    strategies:
      - distill                                   # a short name: the strategy's defaults
      - {name: distill_kd5, strategy: {class_path: cfseg.continual.Distill, init_args: {kd_weight: 5.0}}}
      - {name: sched, strategy: distill, stages: {<stage name>: {kd_weight: 0.0}}}   # one stage's settings
      - {name: ft_bs1, strategy: finetune, config: {data: {batch_size: 1}}}          # other settings of the row

* ``distill``: stage i starts from stage i-1's checkpoint, which is also the frozen teacher (cfseg's method);
  it also distils on the stage's ``unlabeled`` datasets;
* ``finetune``: stage i starts from stage i-1's checkpoint, no distillation (the lower bound);
* ``experts``: stage 0's network is frozen; stage i trains only a new LoRA expert that serves the stage's classes in
  the stage's domains, chosen per volume by the analytic router;
* ``ewc`` (reference): ``finetune`` with the EWC penalty towards the previous stage's weights, weighted by the
  diagonal Fisher each stage stores in its checkpoint;
* ``replay`` (reference, not rehearsal-free): ``finetune`` plus a fraction (``cfseg.continual.Replay``'s
  ``fraction``, or the protocol's ``replay_fraction`` for the short name) of every earlier stage's training cases;
* ``joint``: after stage i, one model trained from scratch on the data of stages 0..i at once with the
  *cumulative* step budget of stages 0..i and stage 0's learning rate (each stage keeps its own annotated classes).

Budgets: every stage trains ``max_steps`` steps (per stage, else the protocol's ``max_steps``, else the base
config's ``trainer.max_steps``) at ``lr * lr_factor`` (``lr``: the protocol's, else the base config's
``model.lr``, else 2e-3; ``model.incremental_lr_factor`` in a row's ``config`` would multiply on top).
Each run's configuration is built as data (:func:`stage_config`): the base config, the protocol's settings for the
stage (datasets, budget, seed, strategy), then the ``config`` overrides of the protocol, the stage and the row; a
row's ``stages`` settings change its strategy's init_args in one incremental stage only.
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

Several devices and nodes: a row's ``config`` (or the protocol's or a stage's) may set ``trainer.devices``,
``trainer.strategy`` and ``trainer.num_nodes``, e.g. ``{name: ft_ddp, strategy: finetune, config: {trainer:
{devices: 2, strategy: ddp}}}``. A stage that trains on more than one process (:func:`own_process`) runs as its
own training process, ``<launcher> cfseg.apps.protocol --train-stage <run dir>/stage.json``, while the protocol
stays one process that scores every stage and writes every report once; its ``final.json`` records the world size
it trained with. ``launcher`` (protocol key, or ``--launcher``; a command split like a shell's) defaults to this
Python's ``python -m``, for which Lightning starts the other processes of the node itself. On a cluster it names
what starts the processes: ``launcher: "srun python -m"`` inside an sbatch allocation (rows with ``trainer:
{num_nodes: 2, devices: 4, strategy: ddp}``) or ``launcher: "torchrun --nproc_per_node=4 -m"``. With a launcher
every stage is started with it, so settings that must match the processes it starts (``devices``, ``num_nodes``)
belong in the protocol's ``config``; ``num_nodes`` above 1 without a launcher is refused. Started by torchrun or
as one of several srun tasks, ``cfseg-protocol`` stops with an error: start it once and give ``--launcher``.
"""

from __future__ import annotations

import argparse
import copy
import json
import multiprocessing
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from cfseg.apps.cli import main as cli
from cfseg.apps.cli import reporting_user_errors, resolve_fit_config
from cfseg.continual import Finetune
from cfseg.experiments.protocol import (
    joint_datasets,
    launcher_words,
    load_protocol,
    replayed_datasets,
    row_strategy,
    settings_mismatch,
    stage_datasets,
    unlabeled_datasets,
    val_config,
    val_only_datasets,
)
from cfseg.experiments.report import evaluate_stage_tests, print_results, write_atomic, write_matrix, write_summary
from cfseg.metrics import DICE_CONVENTION, average_after_last, backward_transfer

#: how a stage that trains as its own process is started: ``<launcher words> cfseg.apps.protocol --train-stage ...``
DEFAULT_LAUNCHER = [sys.executable, "-m"]


def merge_config(base: dict[str, Any], *overrides: dict[str, Any]) -> dict[str, Any]:
    """``base`` with each override merged in turn: mappings recursively, except class specs (a mapping with
    ``class_path``), which an override replaces whole unless it names the same class; other values replace."""
    out = copy.deepcopy(base)
    for o in overrides:
        for k, v in o.items():
            old = out.get(k)
            same_class = isinstance(v, dict) and isinstance(old, dict) and v.get("class_path", old.get("class_path")) \
                == old.get("class_path")
            out[k] = merge_config(old, v) if isinstance(v, dict) and isinstance(old, dict) and same_class \
                else copy.deepcopy(v)
    return out


def stage_config(spec: dict[str, Any], run_dir: Path, datasets: list[dict], previous: Path | None,
                 strategy: dict[str, Any], steps: int, lr: float | None, seed: int,
                 overrides: list[dict[str, Any]]) -> dict[str, Any]:
    """The ``cfseg fit`` configuration of one stage: the base config, the protocol's settings for the stage, then
    ``overrides`` (the protocol's, the stage's, the row's ``config``) in that order."""
    base = yaml.safe_load(Path(spec["base_config"]).read_text()) or {}
    trainer: dict[str, Any] = {"default_root_dir": str(run_dir), "enable_checkpointing": True, "max_steps": steps,
                               "max_epochs": -1, **val_config(spec, steps)}
    logger = (base.get("trainer") or {}).get("logger")
    if isinstance(logger, dict) and "class_path" in logger:
        trainer["logger"] = {"class_path": logger["class_path"], "init_args": {"save_dir": str(run_dir)}}
    model: dict[str, Any] = {"strategy": strategy}
    if lr is not None:
        model["lr"] = lr
    if previous is not None:
        model["previous_checkpoint"] = str(previous)
    own = {"seed_everything": seed, "trainer": trainer, "model": model,
           "data": {"datasets": datasets, "seed": spec.get("split_seed", seed)}}
    return merge_config(base, own, *overrides)


def _as_int(v: Any) -> int | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    if isinstance(v, str) and v.strip().lstrip("-").isdigit():
        return int(v)
    return None


def own_process(trainer: dict[str, Any], launcher: list[str] | None) -> bool:
    """Whether a stage with the resolved trainer settings ``trainer`` trains as its own process (started with
    ``launcher``, default ``python -m``) instead of in the protocol's process: when it trains on more than one
    process (``devices`` above 1, a list or ``"0,1"`` of several, ``-1``/``"auto"`` on more than one GPU,
    ``num_nodes`` above 1) or a launcher is given.

    Raises:
        ValueError: ``num_nodes`` above 1 without a launcher (Lightning cannot start processes on other nodes).
    """
    nodes = _as_int(trainer.get("num_nodes", 1)) or 1
    if nodes > 1 and not launcher:
        raise ValueError(f"trainer.num_nodes={nodes}: processes on other nodes need a launcher; give the protocol "
                         "key `launcher` or --launcher, e.g. 'srun python -m' inside an sbatch allocation")
    if launcher:
        return True
    devices = trainer.get("devices", "auto")
    if isinstance(devices, str) and "," in devices:
        devices = [d for d in devices.split(",") if d.strip()]
    if isinstance(devices, (list, tuple)):
        return len(devices) > 1
    n = _as_int(devices)
    if n is None or n == -1:  # "auto" or -1: every device of the accelerator; a CPU run is one process
        cpu = str(trainer.get("accelerator", "auto")).lower() == "cpu"
        return not cpu and torch.cuda.device_count() > 1
    return n > 1


def fit_stage(config: dict[str, Any], checkpoint: Path, record: dict[str, Any],
              resolved: dict[str, Any]) -> dict[str, Any]:
    """``cfseg fit`` with ``config``, then ``checkpoint`` (``final.ckpt``; every process saves, Lightning writes
    once) and, from the global-zero process only, its record ``final.json`` beside it: ``record`` (tag, steps,
    lr, seed) with the wall time, the global step, the world size, the parameter counts and ``resolved`` (the
    resolved fit configuration) as ``config``.

    Returns:
        the record (every process).
    """
    t0 = time.time()
    run = cli({"fit": config})
    run.trainer.save_checkpoint(checkpoint)  # a collective under DDP
    params = list(run.model.parameters())
    info = {**record, "wall_time_s": round(time.time() - t0, 1), "global_step": run.trainer.global_step,
            "world_size": run.trainer.world_size,
            "trainable_params": sum(p.numel() for p in params if p.requires_grad),
            "total_params": sum(p.numel() for p in params), "config": resolved}
    if run.trainer.is_global_zero:
        write_atomic(Path(checkpoint).with_name("final.json"), json.dumps(info, indent=2))
    return info


def fit_stage_file(path: str | Path) -> int:
    """The stage-training process (``python -m cfseg.apps.protocol --train-stage <stage.json>``): :func:`fit_stage`
    with the file's ``config``, ``checkpoint``, ``record`` and ``resolved``. Under Lightning's own launcher every
    other local process runs this same command line."""
    stage = json.loads(Path(path).read_text())
    fit_stage(stage["config"], Path(stage["checkpoint"]), stage["record"], stage["resolved"])
    return 0


def _fit_in_own_process(config: dict[str, Any], done: Path, record: dict[str, Any], resolved: dict[str, Any],
                        launcher: list[str]) -> dict[str, Any]:
    """:func:`fit_stage` as ``<launcher> cfseg.apps.protocol --train-stage <run dir>/stage.json``; its record."""
    stage = done.parent / "stage.json"
    write_atomic(stage, json.dumps({"config": config, "checkpoint": str(done), "record": record,
                                    "resolved": resolved}, indent=2))
    cmd = [*launcher, "cfseg.apps.protocol", "--train-stage", str(stage)]
    print(f"[{record['tag']}] {shlex.join(cmd)}", flush=True)
    rc = subprocess.run(cmd).returncode
    final = done.with_name("final.json")
    if rc != 0 or not done.is_file() or not final.is_file():
        raise RuntimeError(f"stage {record['tag']} failed (exit code {rc}): {shlex.join(cmd)}")
    return json.loads(final.read_text())


def train_stage(spec: dict, out: Path, tag: str, datasets: list[dict], previous: Path | None,
                strategy: dict[str, Any], steps: int, lr: float | None, seed: int,
                overrides: list[dict[str, Any]] | None = None) -> tuple[Path, float]:
    """One ``cfseg fit`` run of ``steps`` steps at learning rate ``lr`` under ``out/runs/tag``, configured by
    :func:`stage_config` (``strategy``: a spec ``{class_path, init_args}``). It trains in this process, or as its own
    process (:func:`own_process`: several devices or nodes, or ``spec["launcher"]``) started with
    ``spec["launcher"]`` (default ``python -m``).

    Returns:
        (checkpoint path, training wall time in s). A finished run of the same tag is reused (its recorded
        wall time is returned); one trained with another budget or other settings (:func:`settings_mismatch`:
        the resolved configuration, base config, defaults) is refused.
    """
    run_dir = out / "runs" / tag
    done, record = run_dir / "final.ckpt", run_dir / "final.json"
    names: set[str] = set()
    for d in datasets:  # distinct dataset names (the same folder may appear as labelled and image-only)
        base = d.get("name") or Path(d["path"]).name
        d["name"] = base if base not in names else f"{base}_{len(names)}"
        names.add(d["name"])
    config = stage_config(spec, run_dir, datasets, previous, strategy, steps, lr, seed, overrides or [])
    resolved = resolve_fit_config(copy.deepcopy(config))  # parsing turns the mappings it reads into Namespaces
    launcher = spec.get("launcher")
    separate = own_process(resolved.get("trainer") or {}, launcher)
    if done.is_file():
        info = json.loads(record.read_text()) if record.is_file() else {}
        if info and (info.get("steps"), info.get("lr")) != (steps, lr):
            raise ValueError(f"{done} was trained with max_steps={info.get('steps')}, lr={info.get('lr')}, but the "
                             f"protocol now asks for max_steps={steps}, lr={lr}: delete {run_dir} or use another "
                             "output folder")
        diffs = settings_mismatch(done, info, resolved)
        if diffs:
            raise ValueError(f"{done} was trained with other settings than the protocol now asks for ("
                             + "; ".join(diffs) + f"): delete {run_dir} or use another output folder")
        print(f"[{tag}] reusing {done}")
        return done, float(info.get("wall_time_s", 0.0))
    print(f"[{tag}] cfseg fit: {strategy['class_path']} {strategy['init_args']}, {steps} steps, lr {lr}", flush=True)
    fields = {"tag": tag, "steps": steps, "lr": lr, "seed": seed}
    if separate:
        run_dir.mkdir(parents=True, exist_ok=True)
        info = _fit_in_own_process(config, done, fields, resolved, launcher or DEFAULT_LAUNCHER)
    else:
        info = fit_stage(config, done, fields, resolved)
    wall = float(info["wall_time_s"])
    print(f"[{tag}] trained in {wall:.0f} s on {info['world_size']} process(es) -> {done}", flush=True)
    return done, wall


def _params(run_dir: Path) -> dict[str, int | None]:
    """Trainable and total parameters of a finished run (from its ``final.json``; None for older records)."""
    record = run_dir / "final.json"
    info = json.loads(record.read_text()) if record.is_file() else {}
    return {"trainable": info.get("trainable_params"), "total": info.get("total_params")}


def run_seed(spec: dict[str, Any], seed: int, strategies: list[dict[str, Any]]) -> dict[str, Any]:
    """Every strategy of one seed under ``<output>/seed<seed>/``, sharing one stage-0 run.

    Returns:
        ``{strategy name: result}``; each result is also written as ``<name>_matrix.{json,csv,png}``.
    """
    out = Path(spec["output"]) / f"seed{seed}"
    out.mkdir(parents=True, exist_ok=True)
    stages, steps, lrs = spec["stages"], spec["stage_steps"], spec["stage_lr"]
    names = [s["name"] for s in stages]
    stage0, t_stage0 = train_stage(spec, out, "stage0", stage_datasets(stages[0]), None, Finetune().spec(), steps[0],
                                   lrs[0], seed, [spec["config"], stages[0]["config"]])
    last = len(stages) - 1
    upto = (lambda i: last) if spec.get("full_matrix") else (lambda i: i)  # full_matrix: later stages' tests too
    row0, classes0 = evaluate_stage_tests(stage0, spec, upto(0), seed)
    score_val = bool(spec.get("score_val", False))
    val0, val_classes0 = evaluate_stage_tests(stage0, spec, upto(0), seed, "val") if score_val else (None, {})
    results: dict[str, Any] = {}
    for entry in strategies:
        name = entry["name"]
        from_scratch = not row_strategy(entry).allows_previous  # joint: one model per stage on the stages so far
        train_s, eval_s = t_stage0, 0.0
        R, per_class, prev = [row0], classes0, stage0
        R_val, per_class_val = [val0], val_classes0
        budget = [steps[0]]
        routing: list[list[float | None]] = []
        params = [_params(out / "runs" / "stage0")]
        for i in range(1, len(stages)):
            if from_scratch:
                datasets = joint_datasets(stages[: i + 1])
                budget.append(sum(steps[: i + 1]))
                ckpt, t = train_stage(spec, out, f"{name}_stage{i}", datasets, None, entry["strategy"], budget[-1],
                                      lrs[0], seed, [spec["config"], stages[0]["config"], entry["config"]])
            else:
                strategy = row_strategy(entry, names[i])
                replayed = replayed_datasets(strategy, stages[:i])
                datasets = stage_datasets(stages[i]) \
                    + (unlabeled_datasets(stages[i]) if strategy.uses_unlabeled else []) \
                    + (replayed or val_only_datasets(stages[:i]))
                budget.append(steps[i])
                ckpt, t = train_stage(spec, out, f"{name}_stage{i}", datasets, prev, strategy.spec(), steps[i],
                                      lrs[i], seed, [spec["config"], stages[i]["config"], entry["config"]])
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
        res = {"strategy": name, "base_strategy": row_strategy(entry).short_name or entry["strategy"]["class_path"],
               "seed": seed, "stages": names,
               "R": R,
               "average_dice": average_after_last(R), "bwt": backward_transfer(R), "per_class_dice": per_class,
               "stage_steps": budget, "stage_lr": [lrs[0]] * len(stages) if from_scratch else lrs,
               "strategy_spec": entry["strategy"], **({"stages_settings": entry["stages"]} if entry["stages"] else {}),
               **({"config": entry["config"]} if entry["config"] else {}),
               "wall_time_s": round(train_s, 1),
               "eval_time_s": round(eval_s, 1), "dice_convention": DICE_CONVENTION, "params": params}
        if any(v is not None for r in routing for v in (r or [])):  # experts: routing accuracy per stage's cases
            res["routing_accuracy"] = [None, *routing]
        if score_val:  # the validation cases' matrix: what settings are chosen on (never the test cases)
            res.update(R_val=R_val, average_dice_val=average_after_last(R_val), bwt_val=backward_transfer(R_val),
                       per_class_dice_val=per_class_val)
        results[name] = res
        write_matrix(out, res)
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
    base = (yaml.safe_load(Path(spec["base_config"]).read_text()) or {}).get("trainer") or {}
    for st in spec["stages"]:  # before anything trains: a row on several nodes needs a launcher
        for entry in chosen:
            layers = [(c or {}).get("trainer") or {} for c in (spec.get("config"), st.get("config"), entry["config"])]
            own_process(merge_config(base, *layers), spec.get("launcher"))
    if workers == 1 or len(chosen) == 1:
        results = {seed: run_seed(spec, seed, chosen) for seed in (seeds or spec["seeds"])}
    else:
        results = {seed: _run_seed_parallel(spec, seed, chosen, workers) for seed in (seeds or spec["seeds"])}
    write_summary(Path(spec["output"]), spec.get("summary_copy"))
    return results


def single_thread_logging_to(log: str) -> None:
    """In a child process: stdout and stderr (file descriptors, so C libraries too) to ``log``; one torch thread."""
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


def one_process_check(env: dict[str, str] | None = None) -> None:
    """Refuse to run the protocol as one of several processes (started by ``torchrun`` or as one of several tasks
    of an ``srun`` step): every process would train, score and write the same files. An sbatch script's batch
    step (one process) may start it.

    Raises:
        ValueError: one line that says to start it once and give ``--launcher``.
    """
    env = os.environ if env is None else env
    tasks, how = 1, ""
    if "RANK" in env and (_as_int(env.get("WORLD_SIZE", "1")) or 1) > 1:
        tasks, how = _as_int(env["WORLD_SIZE"]) or 1, "torchrun (WORLD_SIZE"
    # srun sets SLURM_STEP_NUM_TASKS for the tasks of a step; sbatch's SLURM_NTASKS is the allocation's, and the
    # batch step (SLURM_STEP_ID "batch" or 4294967294 where set) is the one process that runs the script
    elif (_as_int(env.get("SLURM_STEP_NUM_TASKS", "1")) or 1) > 1 and \
            env.get("SLURM_STEP_ID", env.get("SLURM_STEPID")) not in ("batch", "4294967294"):
        tasks, how = _as_int(env["SLURM_STEP_NUM_TASKS"]) or 1, "srun (SLURM_STEP_NUM_TASKS"
    if tasks > 1:
        raise ValueError(f"cfseg-protocol was started as one of {tasks} processes by {how}={tasks}); start it once, "
                         "as one process, and give --launcher (e.g. --launcher 'srun python -m' or "
                         "'torchrun --nproc_per_node=4 -m'): each multi-process stage is then started with it")


def main(argv: list[str] | None = None) -> int:
    """Console entry point: 0 on success, 2 with one line ``cfseg-protocol: error: ...`` on a configuration or
    data error (``CFSEG_DEBUG=1``: the traceback)."""
    return reporting_user_errors("cfseg-protocol", lambda: _main(argv))


def _main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="cfseg-protocol", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="protocol YAML (required)")
    p.add_argument("--strategies", nargs="*", default=None, help="strategy names (default: all in the protocol)")
    p.add_argument("--seeds", nargs="+", type=int, default=None,
                   help="seeds (default: the protocol's `seeds`, or [`seed`])")
    p.add_argument("--output", default=None, help="override the protocol's output folder")
    p.add_argument("--copy-summary", default=None, help="also copy summary.json here (YAML key: summary_copy)")
    p.add_argument("--workers", type=int, default=1,
                   help="run a seed's strategies side by side in this many single-thread processes (after stage 0)")
    p.add_argument("--launcher", default=None,
                   help="command that starts a stage as its own process(es), followed by 'cfseg.apps.protocol "
                        "--train-stage FILE', e.g. 'srun python -m' or 'torchrun --nproc_per_node=4 -m' (YAML key: "
                        "launcher; default for multi-device stages: this Python's 'python -m')")
    p.add_argument("--train-stage", default=None, help=argparse.SUPPRESS)  # a stage's own process
    a = p.parse_args(argv)
    if a.train_stage:
        return fit_stage_file(a.train_stage)
    if not a.config:
        p.error("the following arguments are required: --config")
    one_process_check()
    spec = load_protocol(a.config)
    if a.output:
        spec["output"] = a.output
    if a.copy_summary:
        spec["summary_copy"] = a.copy_summary
    if a.launcher is not None:
        spec["launcher"] = launcher_words(a.launcher, "--launcher")
    results = run_protocol(spec, a.strategies, a.seeds, a.workers)
    summary = json.loads((Path(spec["output"]) / "summary.json").read_text())
    print_results(results, summary)
    print(f"\nwrote {Path(spec['output']) / 'summary.json'}" + (f" and {spec['summary_copy']}"
                                                               if spec.get("summary_copy") else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
