"""Diagnostic joint runs outside a protocol's budget: is the joint bound limited by its steps or its lr?

The protocol's ``joint`` after the last stage trains ``sum(stage_steps)`` steps at stage 0's lr (a bound on the
compute the sequential strategies spent). This script trains the same joint run (same datasets, seed, crops and
settings, plus ``--config-override``: a YAML mapping merged onto the base config) with ``--steps`` x that budget
and ``--lr-factor`` x that lr, under ``<protocol output>/seed<N>/runs/<tag>``, and scores it like the protocol on
the test and validation cases of every stage (per stage and per class). It is a diagnostic, not a protocol row: a
joint run with more steps than the sequential strategies bounds nothing.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/openkbp/joint_diagnostic.py \\
        --config configs/openkbp/incremental_v2.yaml --seed 0 --steps 2 --tag joint_lt_2x \\
        --config-override '{model: {learnable_temperature: true}}'

Writes ``<run>/diagnostic.json``: ``{"steps", "lr", "test": {"row", "per_class"}, "val": {...}}``.
"""

from __future__ import annotations

import argparse
import json
import statistics
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
    return result


if __name__ == "__main__":
    main()
