"""A continual-learning protocol's spec and stages: the YAML ``cfseg-protocol`` reads (:func:`load_protocol`; the
keys are described in ``cfseg-protocol --help``), the datasets each stage trains and validates on (stage by stage,
joint, replayed, image-only) and whether a finished run was trained with the settings a protocol now asks for
(:func:`settings_mismatch`). Scoring and reports: :mod:`cfseg.experiments.report`; training the stages through the
CLI: :mod:`cfseg.apps.protocol`.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

import torch
import yaml

from cfseg.checkpoint import effective_settings
from cfseg.continual import Strategy, build_strategy
from cfseg.module import DEFAULT_BACKBONE

#: the short names a row may give (any cfseg.continual strategy is also accepted as ``{class_path, init_args}``)
STRATEGIES = ("distill", "finetune", "joint", "experts", "replay", "ewc")
DEFAULT_STRATEGIES = ("distill", "finetune", "joint")
DEFAULT_LR = 2e-3  # CFSegModule's default
#: set through protocol keys, never through a ``config`` override
RESERVED = {"trainer.max_steps": "max_steps", "model.lr": "lr / lr_factor", "seed_everything": "seeds",
            "data.seed": "seeds / split_seed", "model.strategy": "a row's strategy",
            "model.previous_checkpoint": "the stage order", "data.datasets": "the stages' datasets"}
CONFIG_SECTIONS = ("model", "data", "trainer")


def _flat_keys(d: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.append(key)
        if isinstance(v, dict) and "class_path" not in v:
            out += _flat_keys(v, key + ".")
    return out


def _overrides(value: Any, key: str) -> dict[str, Any]:
    """Check a ``config`` override (``{model: {...}, data: {...}, trainer: {...}}``, merged onto the base config)."""
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(k in CONFIG_SECTIONS and isinstance(v, dict) for k, v in value.items()):
        raise ValueError(f"{key}: config overrides are a mapping of {CONFIG_SECTIONS} sections, e.g. "
                         "{trainer: {precision: bf16-mixed}}, got " + repr(value))
    for k in _flat_keys(value):
        if k in RESERVED:
            raise ValueError(f"{key}: {k} is set by the protocol; use {RESERVED[k]} instead")
    return value


def _no_fit_args(d: dict[str, Any], key: str) -> None:
    for old, new in (("fit_args", "config: {model|data|trainer: {...}}"),
                     ("stage_fit_args", "stages: {<stage name>: {<strategy init_args>}}")):
        if old in d:
            raise ValueError(f"{key}: {old} (command-line strings) are gone; write {new}")


def strategy_spec(value: Any, spec: dict[str, Any], key: str) -> dict[str, Any]:
    """A row's strategy as a full spec ``{class_path, init_args}`` (defaults resolved); a short ``replay`` takes
    the protocol's ``replay_fraction``."""
    if value == "replay" and "replay_fraction" in spec:
        value = {"class_path": "cfseg.continual.Replay", "init_args": {"fraction": spec["replay_fraction"]}}
    try:
        return build_strategy(value).spec()
    except (TypeError, ValueError) as e:
        raise ValueError(f"{key}: {e}") from None


def row_strategy(entry: dict[str, Any], stage: str | None = None) -> Strategy:
    """The strategy object of a row in ``stage`` (its init_args with the stage's overrides)."""
    spec = entry["strategy"]
    overrides = entry["stages"].get(stage, {}) if stage else {}
    return build_strategy({"class_path": spec["class_path"], "init_args": {**spec["init_args"], **overrides}})


def _strategies(value: Any, path: Path, spec: dict[str, Any]) -> list[dict[str, Any]]:
    """Normalise ``strategies``: short names or typed rows ``{name, strategy, stages, config}`` -> rows with
    ``strategy`` as a full spec, ``stages`` (``{incremental stage name: init_args overrides}``) and ``config``."""
    stage_names = [st["name"] for st in spec["stages"]]
    out = []
    for i, s in enumerate(value):
        key = f"{path}: strategies[{i}]"
        entry = {"name": s, "strategy": s} if isinstance(s, str) else dict(s or {})
        _no_fit_args(entry, key)
        unknown = sorted(set(entry) - {"name", "strategy", "stages", "config"})
        if unknown:
            raise ValueError(f"{key}: unknown keys {unknown}; a row is {{name, strategy, stages, config}}")
        entry.setdefault("strategy", entry.get("name"))
        if isinstance(entry["strategy"], str) and entry["strategy"] not in STRATEGIES:
            raise ValueError(f"{key}.strategy {entry['strategy']!r} unknown; choose from {STRATEGIES} or give "
                             "{class_path: cfseg.continual.<Strategy>, init_args: {...}}")
        entry["strategy"] = strategy_spec(entry["strategy"], spec, f"{key}.strategy")
        entry.setdefault("name", entry["strategy"]["class_path"].rsplit(".", 1)[-1].lower())
        if not str(entry["name"]).replace("_", "").replace("-", "").isalnum():
            raise ValueError(f"{key}.name {entry['name']!r}: letters, digits, '_' or '-' only")
        stages = entry.get("stages") or {}
        if not isinstance(stages, dict) or not all(isinstance(v, dict) for v in stages.values()):
            raise ValueError(f"{key}.stages maps an incremental stage's name to strategy init_args overrides, e.g. "
                             f"{{{stage_names[-1]}: {{kd_weight: 5.0}}}}")
        if stages and not build_strategy(entry["strategy"]).allows_previous:
            raise ValueError(f"{key}: a {entry['strategy']['class_path']} row trains one model per stage from "
                             "scratch; it takes no per-stage settings (stages)")
        for name in stages:
            if name not in stage_names[1:]:
                raise ValueError(f"{key}.stages: {name!r} is not an incremental stage (stage 0 is shared by every "
                                 f"row); choose from {stage_names[1:]}")
        entry["stages"] = stages
        entry["config"] = _overrides(entry.get("config"), f"{key}.config")
        for name in stages:  # every stage's settings must build
            try:
                row_strategy(entry, name)
            except (TypeError, ValueError) as e:
                raise ValueError(f"{key}.stages.{name}: {e}") from None
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


def launcher_words(value: Any, key: str) -> list[str]:
    """A ``launcher`` (the command that starts a stage's processes, e.g. ``"srun python -m"``) as its words."""
    words = shlex.split(value) if isinstance(value, str) else None
    if not words:
        raise ValueError(f"{key}: a launcher is a command that runs a Python module, e.g. 'srun python -m' or "
                         f"'torchrun --nproc_per_node=4 -m', got {value!r}")
    return words


def load_protocol(path: str | Path) -> dict[str, Any]:
    """Read and check a protocol YAML (paths in it are relative to the working directory).

    Returns:
        the spec with defaults filled in: ``strategies`` as rows ``{name, strategy (a full spec), stages, config}``,
        ``config`` overrides (top level and per stage), ``seeds``, ``launcher`` (its words, or None),
        ``stage_steps`` and ``stage_lr`` (one per stage).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: protocol file not found")
    try:
        spec = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(e, "problem", None) or type(e).__name__
        raise ValueError(f"{path}: not valid YAML{where}: {problem}") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("stages"), list) or not spec["stages"]:
        raise ValueError(f"{path}: a protocol needs a non-empty 'stages' list")
    if not spec.get("base_config"):
        raise ValueError(f"{path}: base_config (the cfseg fit config every stage shares) is missing")
    for i, st in enumerate(spec["stages"]):
        if not isinstance(st, dict):
            raise ValueError(f"{path}: stages[{i}] is {st!r}: a stage is a mapping with at least 'datasets' "
                             "(e.g. {name: ct, datasets: [data/Dataset001]})")
        if not st.get("datasets"):
            raise ValueError(f"{path}: stages[{i}].datasets is empty")
        st.setdefault("name", f"stage{i}")
        _no_fit_args(st, f"{path}: stages[{i}]")
        st["config"] = _overrides(st.get("config"), f"{path}: stages[{i}].config")
    _no_fit_args(spec, str(path))
    spec["config"] = _overrides(spec.get("config"), f"{path}: config")
    spec["strategies"] = _strategies(spec.get("strategies", DEFAULT_STRATEGIES), path, spec)
    spec.setdefault("output", "results/protocol")
    spec["launcher"] = launcher_words(spec["launcher"], f"{path}: launcher") if spec.get("launcher") is not None \
        else None
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


def replayed_datasets(strategy: Strategy, stages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A data-side strategy's (``Replay``) share of every earlier stage's labelled datasets (their validation cases
    validate as usual, so no validation-only copies are added); [] for any other strategy."""
    replayed = getattr(strategy, "replayed", None)
    return replayed([(st["name"], stage_datasets(st)) for st in stages]) if replayed else []


def val_config(spec: dict[str, Any], steps: int) -> dict[str, Any]:
    """Trainer settings that validate at the end of a stage (or every ``val_every_n_steps``)."""
    every = spec.get("val_every_n_steps", "end")
    if every is None:
        return {}
    return {"check_val_every_n_epoch": None, "val_check_interval": steps if every == "end" else every}


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
    model settings without effect on the run (:func:`cfseg.checkpoint.effective_settings`: a first stage compares
    only its strategy's class, so a stage 0 shared by every strategy stays reusable when a distillation default
    changes). A default changed in code since the run counts wherever the checkpoint stored the old value.

    Returns:
        One ``"section.key: trained with A, now B"`` line per difference (empty: the run is what the protocol asks).
    """
    def plain(v: Any) -> Any:
        return json.loads(json.dumps(v, default=str))

    stored = torch.load(ckpt, map_location="cpu", weights_only=True)
    recorded = record.get("config") or {}
    model = effective_settings(config.get("model", {}), DEFAULT_BACKBONE)
    stored_model = stored.get("hyper_parameters") or {}
    try:
        stored_model = effective_settings(stored_model, DEFAULT_BACKBONE)
    except (TypeError, ValueError):  # a run of an older cfseg whose strategy no longer builds: compared as stored
        stored_model = plain(stored_model)
    sides = [("model", model, stored_model),
             ("data", config.get("data", {}), stored.get("datamodule_hyper_parameters") or {}),
             ("trainer", config.get("trainer", {}), recorded.get("trainer") or {})]
    diffs = []
    for section, new, old in sides:
        for key, now in sorted(new.items()):
            if f"{section}.{key}" in RUN_LOCATION_KEYS or key not in old or key.startswith("_"):
                continue
            if plain(old[key]) != now:
                diffs.append(f"{section}.{key}: trained with {plain(old[key])!r}, now {now!r}")
    if "seed_everything" in recorded and recorded["seed_everything"] != config.get("seed_everything"):
        diffs.append(f"seed_everything: trained with {recorded['seed_everything']!r}, now "
                     f"{config.get('seed_everything')!r}")
    return diffs
