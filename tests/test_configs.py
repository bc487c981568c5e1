"""Every YAML under configs/ parses and builds, without training: protocol files through ``load_protocol`` and the
configuration of each run they would start, training configs through the CLI's parser and the module they name."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from cfseg.apps.cli import resolve_fit_config
from cfseg.apps.protocol import stage_config
from cfseg.continual import Finetune, Strategy, build_strategy
from cfseg.experiments.protocol import load_protocol, row_strategy
from cfseg.module import CFSegModule

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p for p in (ROOT / "configs").rglob("*.yaml"))


def _is_protocol(path: Path) -> bool:
    return "stages" in (yaml.safe_load(path.read_text()) or {})


def _layers(path: Path) -> list[str]:
    """The ``--config`` files a config is used with, as its header's command line shows (a config layered on a base
    config), else the config alone."""
    header = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        header.append(line)
    named = re.findall(r"--config\s+(\S+\.yaml)", " ".join(header).replace("\\", " "))
    rel = str(path.relative_to(ROOT))
    return named if rel in named else [rel]


def _build_model(model: dict) -> CFSegModule:
    """The module a resolved ``model`` section builds (two placeholder classes: the data links the real ones)."""
    args = {k: v for k, v in model.items() if k not in ("class_names", "preprocessing", "previous_checkpoint")}
    args["strategy"] = "finetune" if build_strategy(args.get("strategy")).requires_previous else args.get("strategy")
    return CFSegModule(class_names=["liver", "spleen"], **args)


@pytest.fixture(autouse=True)
def _repo_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # configs name their base configs and split files relative to the repository


def test_configs_are_found():
    assert len(CONFIGS) >= 10 and any(_is_protocol(p) for p in CONFIGS)


@pytest.mark.parametrize("path", [p for p in CONFIGS if _is_protocol(p)], ids=lambda p: str(p.relative_to(ROOT)))
def test_protocol_config_parses_and_every_run_resolves(path, tmp_path):
    spec = load_protocol(path)
    stages = spec["stages"]
    configs = [stage_config(spec, tmp_path, [], None, Finetune().spec(), spec["stage_steps"][0], spec["stage_lr"][0],
                            0, [spec["config"], stages[0]["config"]])]
    for row in spec["strategies"]:
        for i, stage in enumerate(stages[1:], 1):
            strategy = row_strategy(row, stage["name"])
            assert isinstance(strategy, Strategy)
            previous = None if not strategy.allows_previous else tmp_path / "previous.ckpt"
            configs.append(stage_config(spec, tmp_path, [], previous, strategy.spec(), spec["stage_steps"][i],
                                        spec["stage_lr"][i], 0, [spec["config"], stage["config"], row["config"]]))
    resolved = [resolve_fit_config(c) for c in configs]
    assert all(r["model"]["strategy"]["class_path"].startswith("cfseg.continual.") for r in resolved)
    _build_model(resolved[0]["model"])  # the shared stage 0's network, bank and head build


@pytest.mark.parametrize("path", [p for p in CONFIGS if not _is_protocol(p)], ids=lambda p: str(p.relative_to(ROOT)))
def test_training_config_parses_and_builds_its_model(path):
    resolved = resolve_fit_config([a for c in _layers(path) for a in ("--config", c)])
    assert {"model", "data", "trainer"} <= set(resolved)
    model = _build_model(resolved["model"])
    assert model.bank.classes == ["liver", "spleen"]
