"""Diagnostic joint runs outside a protocol's budget: is the joint bound limited by its steps or its lr?

The protocol's ``joint`` after the last stage trains ``sum(stage_steps)`` steps at stage 0's lr (a bound on the
compute the sequential strategies spent). This script trains the same joint run (same datasets, seed, crops and
settings, plus ``--config-override``: a YAML mapping merged onto the base config) with ``--steps`` x that budget
and ``--lr-factor`` x that lr, under ``<protocol output>/seed<N>/runs/<tag>``, and scores it like the protocol on
the test and validation cases of every stage (per stage and per class). At ``--steps 1`` it repeats the protocol's
equal-compute joint row; with ``--steps 4`` (four times the compute the sequential strategies spent) it is the joint
bound reports section 3 states its "/ joint" ratios against, beside the equal-compute one.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/openkbp/joint_diagnostic.py \\
        --config configs/openkbp/incremental_v2.yaml --seed 0 --steps 4 --tag joint_lt_4x \\
        --config-override '{model: {learnable_temperature: true}}'

Writes ``<run>/diagnostic.json``: ``{"steps", "lr", "test": {"row", "per_class"}, "val": {...}}``; with
``--summary FILE`` also merges it into FILE as ``{"runs": {tag: {seed: ...}}, "commands": {tag: {seed: ...}}}``
(a finished run is reused, so rerunning a command with ``--summary`` only scores it again).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
from pathlib import Path

import yaml

from cfseg.apps.protocol import train_stage
from cfseg.continual import Joint
from cfseg.experiments.protocol import joint_datasets, load_protocol
from cfseg.experiments.report import evaluate_stage_tests


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="protocol YAML")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=float, default=1.0, help="multiple of the protocol's joint budget")
    p.add_argument("--lr-factor", type=float, default=1.0, help="multiple of stage 0's lr")
    p.add_argument("--tag", required=True, help="run folder name under <output>/seed<N>/runs")
    p.add_argument("--config-override", default="{}",
                   help="YAML mapping merged onto the base config, e.g. '{model: {learnable_temperature: true}}'")
    p.add_argument("--summary", type=Path, default=None, help="JSON file the result is merged into (by tag, seed)")
    a = p.parse_args(argv)
    spec = load_protocol(a.config)
    stages, last = spec["stages"], len(spec["stages"]) - 1
    steps = round(a.steps * sum(spec["stage_steps"]))
    lr = spec["stage_lr"][0] * a.lr_factor
    out = Path(spec["output"]) / f"seed{a.seed}"
    override = yaml.safe_load(a.config_override) or {}
    ckpt, wall = train_stage(spec, out, a.tag, joint_datasets(stages), None, Joint().spec(), steps, lr, a.seed,
                             [spec["config"], stages[0]["config"], override])
    result = {"steps": steps, "lr": lr, "seed": a.seed, "config_override": override, "train_wall_s": wall}
    for split in ("test", "val"):
        row, per_class = evaluate_stage_tests(ckpt, spec, last, a.seed, split)
        result[split] = {"row": row, "average_dice": statistics.fmean(row), "per_class": per_class}
        print(f"{a.tag} seed {a.seed} {split}: per stage {[round(v, 3) for v in row]}, "
              f"average {statistics.fmean(row):.3f}", flush=True)
    (ckpt.parent / "diagnostic.json").write_text(json.dumps(result, indent=2))
    if a.summary is not None:
        args = shlex.join(sys.argv[1:] if argv is None else argv)
        doc = json.loads(a.summary.read_text()) if a.summary.is_file() else {"runs": {}, "commands": {}}
        doc["runs"].setdefault(a.tag, {})[str(a.seed)] = result
        doc["commands"].setdefault(a.tag, {})[str(a.seed)] = \
            f"OMP_NUM_THREADS=1 .venv/bin/python benchmarks/openkbp/joint_diagnostic.py {args}"
        a.summary.parent.mkdir(parents=True, exist_ok=True)
        tmp = a.summary.with_name(a.summary.name + f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(doc, indent=1))
        tmp.replace(a.summary)
    return result


if __name__ == "__main__":
    main()
