"""A continual-learning protocol's spec and stages: the YAML ``cfseg-protocol`` reads (:func:`load_protocol`; the
keys are described in ``cfseg-protocol --help``), the datasets each stage trains and validates on (stage by stage,
joint, replayed, image-only) and whether a finished run was trained with the settings a protocol now asks for
(:func:`settings_mismatch`). Scoring and reports: :mod:`cfseg.experiments.report`; training the stages through the
CLI: :mod:`cfseg.apps.protocol`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import yaml

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


def stage_datasets(stage: dict[str, Any]) -> list[dict[str, Any]]:
    """The stage's labelled datasets, with the stage's classes as the annotated set when given."""
    out = []
    for d in map(_entry, stage["datasets"]):
        if stage.get("classes") and "classes" not in d:
            d["classes"] = list(stage["classes"])
        out.append(d)
    return out


def joint_datasets(stages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The labelled datasets of ``stages`` (each with its own annotated classes): a joint run's training data."""
    return [d for st in stages for d in stage_datasets(st)]


def unlabeled_datasets(stage: dict[str, Any]) -> list[dict[str, Any]]:
    """Image-only entries (their own split settings keep earlier stages' test cases out)."""
    return [{**_entry(d), "labeled": False, "name": f"unlabeled_{i}_" + Path(_entry(d)["path"]).name}
            for i, d in enumerate(stage.get("unlabeled", []))]


def val_only_datasets(stages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The validation cases of ``stages`` as validation-only entries, each annotating its own stage's classes."""
    return [{**d, "val_only": True, "name": f"val_{st['name']}_{k}_" + Path(d["path"]).name}
            for st in stages for k, d in enumerate(stage_datasets(st))]


def replayed_datasets(spec: dict[str, Any], stages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``replay``: every earlier stage's labelled datasets restricted to ``replay_fraction`` of their training
    cases (their validation cases validate as usual, so no validation-only copies are added)."""
    fraction = float(spec.get("replay_fraction", DEFAULT_REPLAY_FRACTION))
    return [{**d, "train_fraction": fraction, "name": f"replay_{st['name']}_{k}_" + Path(d["path"]).name}
            for st in stages for k, d in enumerate(stage_datasets(st))]


def val_args(spec: dict[str, Any], steps: int) -> list[str]:
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
    """How the resolved ``cfseg fit`` ``config`` (:func:`cfseg.apps.cli.resolve_fit_config`) differs from the finished
    run ``ckpt`` was trained with: its model and data hyper-parameters (stored in the checkpoint) and, for runs
    recorded with their configuration (``record["config"]``), its trainer settings and seed.

    Not compared: a setting only one side knows (an option added since the run), :data:`RUN_LOCATION_KEYS`, and
    model settings without effect on the run (:func:`cfseg.module.settings_without_effect`: a stage 0 shared by
    every strategy stays reusable when a distillation default changes). A default changed in code since the run
    counts wherever the checkpoint stored the old value.

    Returns:
        One ``"section.key: trained with A, now B"`` line per difference (empty: the run is what the protocol asks).
    """
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
