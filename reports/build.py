"""Build ``reports/current.json`` and ``reports/figures/*.png`` from the committed result files in ``reports/data``.

    python reports/build.py             # rewrite current.json and every figure
    python reports/build.py --check     # exit 1 when current.json is not what the result files give

Every entry of ``current.json`` is one headline number, keyed by a stable dotted name, with

* ``mean``: the number (over seeds where there are seeds; a ratio of two means is the ratio of the means),
* ``per_seed``: ``{seed: value}`` (empty for a timing or another single measurement),
* ``config``: the configuration row or setting it was measured with,
* ``command``: the command that regenerates the result file it is read from (it trains or measures again),
* ``commit``: the commit that last changed that result file's content (moving a file does not count),
* ``source``: that result file, relative to the repository root,
* ``description``: what the number is.

Needs git (for ``commit``) and matplotlib (for the figures).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
REPORTS = ROOT / "reports"
DATA = REPORTS / "data"
FIGURES = REPORTS / "figures"
CURRENT = REPORTS / "current.json"

PROTOCOL = "OMP_NUM_THREADS=1 .venv/bin/cfseg-protocol"
SYNTH_V2 = "configs/incremental/synthetic_v2.yaml"
SYNTH_V1 = "configs/incremental/synthetic.yaml"
OKBP_V2 = "configs/openkbp/incremental_v2.yaml"

Entries = dict[str, dict[str, Any]]


# --------------------------------------------------------------------------------------------------- provenance
_COMMITS: dict[Path, str] = {}


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, check=True, capture_output=True, text=True).stdout


def measured_commit(path: Path) -> str:
    """The newest commit that introduced ``path``'s current content (a blob count that grew), so that moving or
    copying a result file does not change the commit it was measured at."""
    if path in _COMMITS:
        return _COMMITS[path]
    blob = _git("hash-object", str(path)).strip()
    for commit in _git("log", "--format=%H", f"--find-object={blob}").split():
        parents = _git("rev-list", "--parents", "-n", "1", commit).split()[1:]
        here = _git("ls-tree", "-r", commit).count(blob)
        before = max((_git("ls-tree", "-r", p).count(blob) for p in parents), default=0)
        if here > before:
            _COMMITS[path] = _git("rev-parse", "--short=7", commit).strip()
            return _COMMITS[path]
    raise SystemExit(f"{path.relative_to(ROOT)}: its content is in no commit; commit the result file first")


def _load(rel: str) -> Any:
    return json.loads((DATA / rel).read_text())


def _num(x: Any) -> float | None:
    if x is None:
        return None
    x = float(x)
    return None if math.isnan(x) else round(x, 6)


def _fmean(xs: Sequence[float | None]) -> float | None:
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    return statistics.fmean(xs) if xs else None


def _ratio_of_means(values: dict[str, float], bound: dict[str, float]) -> tuple[float | None, dict[str, float]]:
    """``values`` over ``bound`` ({seed: number} each) on the seeds both have: the ratio of the means, and the
    ratio per seed."""
    common = [s for s in values if s in bound]
    return (_fmean([values[s] for s in common]) / _fmean([bound[s] for s in common]),
            {s: values[s] / bound[s] for s in common})


class Builder:
    def __init__(self) -> None:
        self.entries: Entries = {}

    def add(self, key: str, mean: Any, per_seed: dict[Any, Any] | None, *, config: str, command: str, source: str,
            description: str) -> None:
        if key in self.entries:
            raise ValueError(f"duplicate key {key}")
        if _num(mean) is None:
            raise ValueError(f"{key}: no value")
        path = DATA / source
        self.entries[key] = {
            "mean": _num(mean),
            "per_seed": {str(s): _num(v) for s, v in (per_seed or {}).items()},
            "config": config,
            "command": command,
            "commit": measured_commit(path),
            "source": str(path.relative_to(ROOT)),
            "description": description,
        }


def protocol_command(config: str, summary: str, seeds: str, output: str = "", before: str = "") -> Callable[[str], str]:
    """The ``cfseg-protocol`` command that trains ``row`` and merges the summary into ``reports/data/<summary>``."""
    out = f" --output {output}" if output else ""

    def command(row: str) -> str:
        return (f"{before}{PROTOCOL} --config {config}{out} --seeds {seeds} --strategies {row} --copy-summary "
                f"reports/data/{summary}")

    return command


# ------------------------------------------------------------------------------------------------ protocol rows
def protocol(b: Builder, prefix: str, source: str, rows: dict[str, tuple[str, str]], *, command: Callable[[str], str],
             stage_labels: Sequence[str], bound: str | None, what: str, classes: Sequence[str] = (),
             val_classes: Sequence[str] = (), final: bool = True, extra: Sequence[str] = (),
             final_val: bool = False) -> None:
    """Entries ``<prefix>.<key>.{average_dice, bwt, average_dice_val, bwt_val, ratio_to_<bound>, final.<stage>,
    final_val.<stage> (with ``final_val``), dice.<class>, dice_val.<class>}`` for ``rows`` ``{key: (summary row,
    config text)}``."""
    doc = _load(source)
    strategies = doc["strategies"]
    bound_row = strategies[rows[bound][0]] if bound else None
    for key, (row, config) in rows.items():
        st = strategies[row]
        seeds = st["per_seed"]
        kw = {"config": config, "command": command(row), "source": source}
        stem = f"{prefix}.{key}"
        b.add(f"{stem}.average_dice", st["average_dice"], {s: r["average_dice"] for s, r in seeds.items()}, **kw,
              description=f"{what}: mean Dice over the stages' test cases after the last stage (row {row})")
        b.add(f"{stem}.bwt", st["bwt"], {s: r["bwt"] for s, r in seeds.items()}, **kw,
              description=f"{what}: backward transfer on the test cases, mean over j<T of R[T][j] - R[j][j] "
                          f"(row {row})")
        if st.get("average_dice_val") is not None:
            b.add(f"{stem}.average_dice_val", st["average_dice_val"],
                  {s: r["average_dice_val"] for s, r in seeds.items()}, **kw,
                  description=f"{what}: the same average on the validation cases, where settings are chosen "
                              f"(row {row})")
            b.add(f"{stem}.bwt_val", st["bwt_val"], {s: r["bwt_val"] for s, r in seeds.items()}, **kw,
                  description=f"{what}: backward transfer on the validation cases (row {row})")
        if bound and key != bound:
            common = [s for s in seeds if s in bound_row["per_seed"]]
            b.add(f"{stem}.ratio_to_{bound}", st["average_dice"] / bound_row["average_dice"],
                  {s: seeds[s]["average_dice"] / bound_row["per_seed"][s]["average_dice"] for s in common}, **kw,
                  description=f"{what}: average Dice over {bound}'s (row {rows[bound][0]}): ratio of the means; "
                              f"per seed the ratio on that seed")
        if final:
            for j, label in enumerate(stage_labels):
                vals = {s: r["matrix"][-1][j] for s, r in seeds.items()}
                b.add(f"{stem}.final.{label}", _fmean(list(vals.values())), vals, **kw,
                      description=f"{what}: mean Dice on stage {j}'s test cases ({label}) after the last stage, "
                                  f"R[T][{j}] (row {row})")
        if final_val:
            for j, label in enumerate(stage_labels):
                vals = {s: r["matrix_val"][-1][j] for s, r in seeds.items()}
                b.add(f"{stem}.final_val.{label}", _fmean(list(vals.values())), vals, **kw,
                      description=f"{what}: mean Dice on stage {j}'s validation cases ({label}) after the last "
                                  f"stage (row {row}; settings are chosen on these)")
        for name in extra:
            j, label = name.split(":")
            vals = {s: r["matrix"][int(j)][int(j)] for s, r in seeds.items()}
            b.add(f"{stem}.{label}", _fmean(list(vals.values())), vals, **kw,
                  description=f"{what}: R[{j}][{j}], stage {j}'s test cases right after stage {j} (row {row})")
        for split, names in (("", classes), ("_val", val_classes)):
            for c in names:
                vals = {s: next(d[c] for d in r[f"per_class_dice{split}"].values() if d.get(c) is not None)
                        for s, r in seeds.items()}
                b.add(f"{stem}.dice{split}.{c}", _fmean(list(vals.values())), vals, **kw,
                      description=f"{what}: {c} Dice on the {'validation' if split else 'test'} cases after the "
                                  f"last stage (row {row})")


def demo(b: Builder) -> None:
    src = "synthetic/demo_check.json"
    doc = _load(src)
    score = ("python benchmarks/synthetic/demo_check.py score --run \"<name>=<ckpt>\" ... --val "
             "data/demo_check/Dataset061_val_ct --test data/synthetic/Dataset003_test_ct --out "
             "reports/data/synthetic/demo_check")
    runs = {
        "demo": ("16-256, spatial, 100 ep (now) s{}", "configs/demo.yaml (UNet 16-256, augment spatial, 100 epochs = "
                 "1800 steps, learnt temperature)",
                 "python benchmarks/synthetic/demo_check.py sites --out data/demo_check --train-cases 40; "
                 "OMP_NUM_THREADS=1 .venv/bin/cfseg-demo --skip-protocol --config configs/demo.yaml --seed S "
                 "--out results/dx/widesp_sS; " + score),
        "demo.oracle": ("oracle 16-256, spatial, 100 ep s{}", "configs/demo.yaml trained on the held-out scanner's "
                        "fully annotated oracle site (40 cases)",
                        "python benchmarks/synthetic/demo_check.py sites --out data/demo_check --train-cases 40; "
                        "OMP_NUM_THREADS=1 .venv/bin/cfseg fit --config configs/demo.yaml --trainer.max_epochs=100 "
                        "--data.datasets='[{\"path\": \"data/demo_check/Dataset062_oracle_ct\", \"val_fraction\": "
                        "0.1, \"test_fraction\": 0.0}]' --seed_everything=S (output folder results/dx/oraclesp100_sS); "
                        + score),
    }
    for prefix, (pattern, config, command) in runs.items():
        res = {s: doc[pattern.format(s)] for s in ("0", "1")}
        kw = {"config": config, "command": command, "source": src}
        for split, name in (("test", "heldout"), ("val", "validation_site")):
            vals = {s: r[split]["mean_dice"] for s, r in res.items()}
            b.add(f"{prefix}.{name}.mean_dice", _fmean(list(vals.values())), vals, **kw,
                  description=f"mean Dice over the 8 organs on the {res['0'][split]['n_cases']} "
                              f"{'held-out scanner' if split == 'test' else 'validation-site'} cases")
        for c in res["0"]["test"]["per_class_dice"]:
            vals = {s: r["test"]["per_class_dice"][c] for s, r in res.items()}
            b.add(f"{prefix}.heldout.dice.{c}", _fmean(list(vals.values())), vals, **kw,
                  description=f"{c} Dice on the held-out scanner's cases")
    variants = {  # the other settings tried on the validation site (configs/demo.yaml with one edit each)
        "unet8_40ep": ("8-128, 40 ep (before) s{}", "UNet 8-128, 40 epochs (720 steps), augment intensity"),
        "unet8_res2_40ep": ("8-128 res units 2, 40 ep s{}", "UNet 8-128 with num_res_units 2, 40 epochs"),
        "unet8_40cases_20ep": ("8-128, 40 cases per site, 20 ep s{}", "UNet 8-128, 40 cases per site, 20 epochs"),
        "unet8_100ep": ("8-128, 100 ep s{}", "UNet 8-128, 100 epochs (1800 steps)"),
        "unet16_40ep": ("16-256, 40 ep s{}", "UNet 16-256, 40 epochs"),
        "unet16_100ep": ("16-256, 100 ep s{}", "UNet 16-256, 100 epochs, augment intensity"),
        "unet16_40cases_50ep": ("16-256, 40 cases per site, 50 ep s{}", "UNet 16-256, 40 cases per site, 50 "
                                "epochs"),
        "unet16_spatial_100ep_bf16": ("16-256, spatial, 100 ep, bf16-mixed s{}", "configs/demo.yaml with "
                                      "trainer.precision bf16-mixed"),
        "oracle_50ep": ("oracle 16-256, 50 ep s{}", "oracle site, UNet 16-256, 50 epochs, augment intensity"),
        "oracle_100ep": ("oracle 16-256, 100 ep s{}", "oracle site, UNet 16-256, 100 epochs, augment intensity"),
    }
    for key, (pattern, config) in variants.items():
        res = {s: doc[pattern.format(s)] for s in ("0", "1") if pattern.format(s) in doc}
        kw = {"config": config + " (learnt temperature)", "command": runs["demo"][2].replace(
            "--config configs/demo.yaml", "--config <configs/demo.yaml with the edit>"), "source": src}
        for split, name in (("test", "heldout"), ("val", "validation_site")):
            vals = {s: r[split]["mean_dice"] for s, r in res.items()}
            b.add(f"demo.variant.{key}.{name}.mean_dice", _fmean(list(vals.values())), vals, **kw,
                  description=f"mean Dice on the {'held-out scanner' if split == 'test' else 'validation-site'} "
                              f"cases")
    d, o = b.entries["demo.heldout.mean_dice"], b.entries["demo.oracle.heldout.mean_dice"]
    b.add("demo.heldout.fraction_of_oracle", d["mean"] / o["mean"],
          {s: d["per_seed"][s] / o["per_seed"][s] for s in d["per_seed"]},
          config=runs["demo"][1], command=runs["demo"][2], source=src,
          description="held-out Dice of the demo over the oracle's (ideal labels from the held-out scanner itself)")


def synthetic(b: Builder) -> None:
    stages = ("ct_organs", "ct_new_organs", "mri")
    cmd_v2 = protocol_command(SYNTH_V2, "synthetic/protocol_v2/summary.json", "0 1 2", "results/synth_full_lr")
    protocol(b, "synthetic.protocol", "synthetic/protocol_v2/summary.json", {
        "distill": ("distill_kd10_ramp0", "distill's defaults: KD rising from 0 to 10 over each stage's first half, "
                    "similarity maps, pseudo-labels auto (on in the CT stage), distill_labeled auto"),
        "distill_kd25": ("distill", "distill with KD 2.5 flat (the defaults before; configs/incremental/base.yaml "
                         "pins them for this row)"),
        "distill_kd10_ramp": ("distill_kd10_ramp", "KD rising from 1 to 10 over each stage's first half"),
        "distill_kd5_ramp": ("distill_kd5_ramp", "KD rising from 1 to 5 over each stage's first half"),
        "distill_kd5": ("distill_kd5", "KD 5 flat"),
        "distill_kd1": ("distill_kd1", "KD 1 flat"),
        "distill_nonew": ("distill_nonew", "KD 2.5 flat, distill_new_voxels false"),
        "distill_kd5_nonew": ("distill_kd5_nonew", "KD 5 flat, distill_new_voxels false"),
        "distill_ci_kd0_mri_kd10_ramp": ("distill_ci_kd0_mri_kd10_ramp", "a schedule per stage: KD 0 in the CT "
                                         "class stage, KD rising from 1 to 10 over the MRI stage's first half"),
        "distill_ci_kd0": ("distill_ci_kd0", "KD 0 in the CT class stage, KD 2.5 flat in the MRI stage"),
        "finetune": ("finetune", "no distillation (lower bound)"),
        "joint": ("joint", "one model from scratch on stages 0..i with their summed steps (350, 500)"),
        "replay": ("replay", "finetune + 25 % of every earlier stage's training cases (not rehearsal-free)"),
        "ewc_1e5": ("ewc_1e5", "EWC, lambda 1e5"),
    }, command=cmd_v2, stage_labels=stages, bound="joint",
        what="synthetic protocol v2 (CT organs -> new CT organs -> MRI), seeds 0-2")
    # experts' default layout, from the layout comparison's runs (the same protocol, seeds and joint)
    src = "synthetic/experts_choice/summary.json"
    cmd_choice = protocol_command(SYNTH_V2, src, "0 1 2", "results/synth_experts")
    row, config = EXPERTS_CHOICE["experts_all_r16"]
    config = f"the experts default: {config}"
    what = "synthetic protocol v2 (CT organs -> new CT organs -> MRI), seeds 0-2"
    protocol(b, "synthetic.protocol", src, {"experts": (row, config)}, command=cmd_choice, stage_labels=stages,
             bound=None, what=what)
    strategies = _load(src)["strategies"]
    dice = {name: {s: r["average_dice"] for s, r in strategies[name]["per_seed"].items()} for name in (row, "joint")}
    b.add("synthetic.protocol.experts.ratio_to_joint", *_ratio_of_means(dice[row], dice["joint"]), config=config,
          command=cmd_choice(row), source=src, description=f"{what}: average Dice over joint's (the joint rerun "
          "beside it): ratio of the means; per seed the ratio on that seed")

    cmd_terms = protocol_command("configs/incremental/synthetic_v2_stage1_terms.yaml",
                                 "synthetic/stage1_terms/summary.json", "0 1 2")
    protocol(b, "synthetic.stage1_terms", "synthetic/stage1_terms/summary.json", {
        "distill": ("distill", "KD 2.5 + similarity maps + pseudo-labels"),
        "distill_nosim": ("distill_nosim", "no similarity maps (sim_weight 0)"),
        "distill_nokd": ("distill_nokd", "no output distillation (kd_weight 0)"),
        "distill_nopl": ("distill_nopl", "no pseudo-labels"),
        "distill_kd_only": ("distill_kd_only", "output distillation only"),
    }, command=cmd_terms, stage_labels=("ct_organs", "ct_new_organs"), bound=None,
        what="synthetic protocol v2, stage 1 only (seeds 0-2)", classes=("pancreas",))

    cmd_ret = protocol_command(SYNTH_V1, "synthetic/distill_retention/summary.json", "0 1 2", "results/synth_mod")
    protocol(b, "synthetic.distill_retention", "synthetic/distill_retention/summary.json", {
        "labeled_true_kd1": ("distill_pseudo_dice01", "KD 1, distill_labeled true (distils on the MRI images too)"),
        "labeled_auto_kd1": ("distill_domain_auto", "KD 1, distill_labeled auto"),
        "labeled_auto_kd25": ("distill", "KD 2.5, distill_labeled auto"),
        "labeled_auto_kd5": ("distill_domain_auto_kd5", "KD 5, distill_labeled auto"),
        "labeled_auto_kd25_full_lr": ("distill_full_lr", "KD 2.5, distill_labeled auto, incremental stages at "
                                      "stage 0's lr (incremental_lr_factor 2 over the protocol's 0.5)"),
        "joint": ("joint", "joint (bound)"),
    }, command=cmd_ret, stage_labels=stages, bound="joint",
        what="synthetic protocol v1 (incremental stages at half of stage 0's lr)")

    cmd_v1 = protocol_command(SYNTH_V1, "synthetic/protocol_v1/summary.json", "0", "results/synth_v2")
    protocol(b, "synthetic.protocol_v1", "synthetic/protocol_v1/summary.json", {
        "experts": ("experts", "LoRA rank 4 on the decoder + projection, each expert starting from the previous one"),
        "experts_zero": ("experts_zero", "as experts, each expert starting from zero"),
        "experts_all": ("experts_all", "LoRA rank 4 on every convolution + projection"),
        "ewc_100": ("ewc", "EWC, lambda 100 (EvoSAM's; the module default)"),
        "ewc_1e4": ("ewc_1e4", "EWC, lambda 1e4"),
        "ewc_1e5": ("ewc_1e5", "EWC, lambda 1e5"),
        "joint": ("joint", "joint (bound)"),
    }, command=cmd_v1, stage_labels=stages, bound="joint",
        what="synthetic protocol v1 (incremental stages at half of stage 0's lr), seed 0")


def openkbp_incremental(b: Builder) -> None:
    stages = ("brainstem_cord_mandible", "parotids", "esophagus_larynx")
    organs = ("brainstem", "spinal_cord", "mandible", "parotid_gland_right", "parotid_gland_left", "esophagus",
              "larynx")
    cmd = protocol_command(OKBP_V2, "openkbp/incremental_v2_rerun/summary.json", "0 1")
    pl = "pseudo-labels in the CE"
    rows = {
        "distill": ("distill_plop_sep01_kd10_ramp0", f"distill's defaults: {pl} and their own Dice at 0.1, KD "
                    "rising from 0 to 10 over each stage's first half, similarity maps"),
        "joint_lt": ("joint_lt", "joint from scratch on stages 0..i with their summed steps (1300, 1600), learnt "
                     "temperature"),
        "distill_plop_sep01_kd25": ("distill_plop_sep01_kd25", f"{pl}, their Dice at 0.1, KD 2.5 flat (the "
                                    "defaults before)"),
        "distill_plop_sep01_kd5": ("distill_plop_sep01_kd5", f"{pl}, their Dice at 0.1, KD 5 flat"),
        "distill_plop_sep01_kd5_ramp": ("distill_plop_sep01_kd5_ramp", f"{pl}, their Dice at 0.1, KD 1 -> 5 over "
                                        "150 steps"),
        "distill_plop_sep01_kd10_ramp": ("distill_plop_sep01_kd10_ramp", f"{pl}, their Dice at 0.1, KD 1 -> 10 "
                                         "over 150 steps"),
        "distill_plop_sep01_kd10_ramp0_s2": ("distill_plop_sep01_kd10_ramp0_s2", "as kd10_ramp, stage 2's ramp "
                                             "from KD 0"),
        "distill_plop_sep01_kd10_rampall_s2": ("distill_plop_sep01_kd10_rampall_s2", "as kd10_ramp, stage 2's "
                                               "ramp over the whole stage"),
        "distill_plop_sep01_kd5_nonew": ("distill_plop_sep01_kd5_nonew", "KD 5 flat, distill_new_voxels false"),
        "distill_plop_sep01_kd5_nosim": ("distill_plop_sep01_kd5_nosim", "KD 5 flat, no similarity maps"),
        "distill_plop_sep01_pod": ("distill_plop_sep01_pod", f"{pl}, their Dice at 0.1, KD 1, Local POD 1"),
        "distill_plop_sep01": ("distill_plop_sep01", f"{pl}, their Dice at 0.1, KD 1"),
        "distill_plop_sep03": ("distill_plop_sep03", f"{pl}, their Dice at 0.3, KD 1"),
        "distill_plop_sep": ("distill_plop_sep", f"{pl}, their Dice at 1.0, KD 1"),
        "distill_plop_ce": ("distill_plop_ce", f"{pl} only, KD 1"),
        "experts": ("experts", "LoRA rank 4 on the decoder + a projection per expert; the stage-0 network frozen"),
        "experts_all": ("experts_all", "LoRA rank 4 on every convolution + projection, 4x the stage lr"),
        "replay": ("replay", "finetune + 25 % of every earlier stage's training cases (not rehearsal-free)"),
        "ewc_1e5": ("ewc_1e5", "EWC, lambda 1e5"),
    }
    what = "OpenKBP class-incremental protocol v2 (retrained stage 0), seeds 0-1"
    src = "openkbp/incremental_v2_rerun/summary.json"
    # the default and the joint row with every organ; the other rows with the esophagus, the organ they trade
    protocol(b, "openkbp.incremental", src, {k: rows[k] for k in ("distill", "joint_lt")}, command=cmd,
             stage_labels=stages, bound="joint_lt", what=what, classes=organs, val_classes=organs)
    others = {k: v for k, v in rows.items() if k not in ("distill", "joint_lt")}
    _protocol_more(b, "openkbp.incremental", src, others, rows["joint_lt"][0], command=cmd, stage_labels=stages,
                   what=what)
    for key, row in (("experts", "experts"), ("experts_all", "experts_all")):
        st = _load(src)["strategies"][row]
        vals = {s: r["params"][1]["trainable"] for s, r in st["per_seed"].items()}
        total = {s: r["params"][0]["total"] for s, r in st["per_seed"].items()}
        b.add(f"openkbp.incremental.{key}.trainable_parameters_per_stage", _fmean(list(vals.values())), vals,
              config=rows[key][1], command=cmd(row), source=src,
              description="trainable parameters of one incremental stage (one expert)")
        b.add(f"openkbp.incremental.{key}.trainable_percent_per_stage",
              100 * _fmean(list(vals.values())) / _fmean(list(total.values())),
              {s: 100 * vals[s] / total[s] for s in vals}, config=rows[key][1], command=cmd(row), source=src,
              description="one expert's parameters in % of the stage-0 network's")

    stage0_model(b, "openkbp.incremental", src, "joint_lt", cmd("joint_lt"), what)
    cmd_first = protocol_command(OKBP_V2, "openkbp/incremental_v2/summary.json", "0 1")
    protocol(b, "openkbp.incremental_first_stage0", "openkbp/incremental_v2/summary.json", {
        "joint": ("joint", "joint from scratch on stages 0..i with their summed steps (1300, 1600), fixed "
                  "temperature"),
        "distill_no_pl": ("distill", "KD 1 + similarity maps, no pseudo-labels"),
        "distill_plop_ce": ("distill_plop_ce", f"{pl} only, KD 1"),
        "distill_plop": ("distill_plop", "pseudo-labels in the CE and in the stage's Dice, KD 1 (seed 0)"),
        "finetune": ("finetune", "no distillation (lower bound)"),
    }, command=cmd_first, stage_labels=stages, bound="joint",
        what="OpenKBP class-incremental protocol v2 (the first stage-0 training), seeds 0-1",
        classes=("esophagus",))
    stage0_model(b, "openkbp.incremental_first_stage0", "openkbp/incremental_v2/summary.json", "finetune",
                 cmd_first("finetune"), "OpenKBP protocol v2 (the first stage-0 training)")

    cmd_abl = protocol_command("configs/openkbp/ablation_v2.yaml", "openkbp/ablation_v2/summary.json", "0")
    protocol(b, "openkbp.ablation_v2", "openkbp/ablation_v2/summary.json", {
        "distill": ("distill", "KD 1 + similarity maps, lr x1.0"),
        "distill_lr05": ("distill_lr05", "as distill, incremental lr x0.5"),
        "distill_kd25": ("distill_kd25", "as distill, KD 2.5"),
        "distill_plop": ("distill_plop", "as distill + PLOP pseudo-labels (CE and Dice)"),
        "distill_pod": ("distill_pod", "as distill + Local POD 1"),
        "distill_plop_pod": ("distill_plop_pod", "as distill + pseudo-labels + Local POD (PLOP as published)"),
    }, command=cmd_abl, stage_labels=stages[:2], bound=None,
        what="OpenKBP protocol v2, stages 0-1 only, seed 0")


def stage0_model(b: Builder, prefix: str, source: str, row: str, command: str, what: str) -> None:
    """``<prefix>.stage0_model.{test, val}``: the shared stage-0 model's R[0][0] (read from ``row``)."""
    seeds = _load(source)["strategies"][row]["per_seed"]
    for split, name in (("", "test"), ("_val", "val")):
        vals = {s: r[f"matrix{split}"][0][0] for s, r in seeds.items() if r.get(f"matrix{split}")}
        b.add(f"{prefix}.stage0_model.{name}", _fmean(list(vals.values())), vals, config="the stage-0 model every "
              "row of a seed starts from", command=command, source=source,
              description=f"{what}: mean Dice of the stage-0 model on stage 0's {name} cases, R[0][0]")


def _protocol_more(b: Builder, prefix: str, source: str, rows: dict[str, tuple[str, str]], bound_row: str, *,
                   command: Callable[[str], str], stage_labels: Sequence[str], what: str) -> None:
    """:func:`protocol` for rows compared against a bound row that is not among them."""
    strategies = _load(source)["strategies"]
    bound = strategies[bound_row]
    protocol(b, prefix, source, rows, command=command, stage_labels=stage_labels, bound=None, what=what,
             classes=("esophagus",), val_classes=("esophagus",))
    for key, (row, config) in rows.items():
        seeds = strategies[row]["per_seed"]
        b.add(f"{prefix}.{key}.ratio_to_{bound_row}", strategies[row]["average_dice"] / bound["average_dice"],
              {s: r["average_dice"] / bound["per_seed"][s]["average_dice"] for s, r in seeds.items()},
              config=config, command=command(row), source=source,
              description=f"{what}: average Dice over {bound_row}'s: ratio of the means; per seed the ratio on "
                          f"that seed")


def openkbp_domain(b: Builder) -> None:
    src = "openkbp/domain_v2/summary.json"
    cmd = protocol_command("configs/openkbp/domain_v2.yaml", src, "0 1",
                           before="python benchmarks/openkbp/make_scanner_shift.py; ")
    rows = {
        "distill": ("distill", "distill_labeled auto (no distillation on the scanner-B images), KD 2.5 flat"),
        "distill_on_labeled": ("distill_on_labeled", "KD 2.5 flat on the scanner-B images too"),
        "finetune": ("finetune", "no distillation"),
    }
    protocol(b, "openkbp.domain", src, rows, command=cmd, stage_labels=("scanner_a", "scanner_b"), bound=None,
             what="OpenKBP domain step (scanner B) after protocol v2's stage 0, seeds 0-1")
    seeds = _load(src)["strategies"]["finetune"]["per_seed"]
    for j, label in ((0, "scanner_a"), (1, "scanner_b")):
        vals = {s: r["matrix"][0][j] for s, r in seeds.items()}
        b.add(f"openkbp.domain.stage0.{label}", _fmean(list(vals.values())), vals, config="protocol v2's stage 0 "
              "(1000 steps)", command=cmd("finetune"), source=src,
              description=f"the stage-0 model on the {label.replace('_', ' ')} test cases (R[0][{j}])")


#: the experts layouts compared on every protocol's validation cases: {key: (protocol row, config text)}
EXPERTS_CHOICE = {
    "experts_decoder": ("experts_decoder", "LoRA rank 4 on the decoder + a projection per expert, stage lr x1 (the "
                        "default before)"),
    "experts_all_lr1": ("experts_all_lr1", "LoRA rank 4 on every convolution + projection, stage lr x1"),
    "experts_all": ("experts_all", "LoRA rank 4 on every convolution + projection, stage lr x4"),
    "experts_all_r16": ("experts_all_r16", "LoRA rank 16 (alpha 16) on every convolution + projection, stage lr "
                        "x4"),
}


CONTRAST = "configs/openkbp/contrast.yaml"
CONTRAST_STAGES = ("ct", "mr_like")
#: the real-anatomy domain protocol's rows: {key: (summary row, config text)}
CONTRAST_ROWS = {
    "distill": ("distill", "KD 2.5 flat, distilling on the unlabelled stage-0 CT images (not on the labelled "
                "MR-like ones: distill_labeled auto), similarity maps"),
    **EXPERTS_CHOICE,
    "ewc_1e5": ("ewc_1e5", "EWC, lambda 1e5"),
    "replay": ("replay", "finetune + 25 % of the stage-0 training cases (keeps old data)"),
    "finetune": ("finetune", "the whole network on the MR-like cases, no distillation (lower bound)"),
    "joint": ("joint", "one model from scratch on both stages' data with their summed 1300 steps"),
}


def openkbp_contrast(b: Builder) -> None:
    """The real-anatomy domain step (CT -> MR-like contrast): rows, per-organ Dice, the stage-0 model on both."""
    src = "openkbp/contrast/summary.json"
    doc = _load(src)
    seeds_text = " ".join(str(s) for s in doc["seeds"])
    cmd = protocol_command(CONTRAST, src, seeds_text, before="python benchmarks/openkbp/make_scanner_shift.py "
                           "--shift mr_like; ")
    strategies = doc["strategies"]
    rows = CONTRAST_ROWS
    what = (f"OpenKBP real-anatomy domain step (CT, then the same organs in an MR-like contrast), seeds "
            f"{', '.join(str(s) for s in doc['seeds'])}")
    protocol(b, "openkbp.contrast", src, rows, command=cmd, stage_labels=CONTRAST_STAGES,
             bound="joint", what=what, final_val=True)
    for key, (row, config) in rows.items():
        seeds = strategies[row]["per_seed"]
        kw = {"config": config, "command": cmd(row), "source": src}
        for stage, label in zip(_load(src)["stages"], CONTRAST_STAGES, strict=True):
            for organ in next(iter(seeds.values()))["per_class_dice"][stage]:
                vals = {s: r["per_class_dice"][stage][organ] for s, r in seeds.items()}
                b.add(f"openkbp.contrast.{key}.dice.{label}.{organ}", _fmean(list(vals.values())), vals, **kw,
                      description=f"{what}: {organ} Dice on the {label} test cases after the last stage (row {row})")
    seeds = strategies["finetune"]["per_seed"]
    for j, label in enumerate(CONTRAST_STAGES):
        vals = {s: r["matrix"][0][j] for s, r in seeds.items()}
        b.add(f"openkbp.contrast.stage0.{label}", _fmean(list(vals.values())), vals,
              config="protocol v2's stage 0 (1000 steps on CT)", command=cmd("finetune"), source=src,
              description=f"the stage-0 CT model on the {label} test cases (R[0][{j}])")
    contrast_joint_4x(b, strategies, cmd)
    sources = {"0": "openkbp/contrast/modality_router.json", "1": "openkbp/contrast/modality_router_seed1.json"}
    docs = {s: _load(src) for s, src in sources.items()}
    kw = {"config": "modality router of the experts_all_r16 checkpoint (CT stage + MR-like stage), per seed",
          "source": sources["0"], "command": " ; ".join(
              f".venv/bin/python benchmarks/modality_router.py --config {CONTRAST} --checkpoint {d['checkpoint']} "
              f"--extra ../shared/data/totalseg_ct ../shared/data/totalseg_mr --out reports/data/{sources[s][:-5]}"
              for s, d in docs.items())}
    for answer in ("router_0.1", "router_0.01", "chosen", "rule"):
        for split in ("val", "test", "extra"):
            acc = {}
            for s, d in docs.items():
                key = f"router_{d['chosen_gamma']:g}" if answer == "chosen" else answer
                rows = [r for r in d["rows"] if r["split"] == split and r["variant"] == "stored"]
                acc[s] = sum(r[key] == r["truth"] for r in rows) / len(rows)
            name = answer.replace("router_", "gamma_").replace(".", "p")
            what = ("the gamma chosen on the validation cases per seed (" + ", ".join(
                f"{d['chosen_gamma']:g}" for d in docs.values()) + ")") if answer == "chosen" else name
            b.add(f"router.modality.contrast.{name}.{split}_accuracy", _fmean(list(acc.values())), acc, **kw,
                  description=f"{what}: fraction of the {len(rows)} {split} volumes (OpenKBP CT and MR-like; extra: "
                  "the TotalSegmentator CT and MR examples) whose modality is named correctly")


def contrast_joint_4x(b: Builder, strategies: dict[str, Any], protocol_cmd: Callable[[str], str]) -> None:
    """``openkbp.contrast.joint_4x.*``: one model from scratch on both contrasts with 4x the sequential rows' 1300
    steps, and every row's ratio to it (``openkbp.contrast.<row>.ratio_to_joint_4x``)."""
    src = "openkbp/contrast/joint_4x.json"
    doc = _load(src)
    runs = doc["runs"]["joint_4x"]
    cmd = " ; ".join(doc["commands"]["joint_4x"][s] for s in sorted(runs))
    kw = {"config": "joint on both contrasts' data from scratch with 4 x 1300 = 5200 steps", "command": cmd,
          "source": src}
    stem = "openkbp.contrast.joint_4x"
    for split, suffix in (("test", ""), ("val", "_val")):
        vals = {s: r[split]["average_dice"] for s, r in runs.items()}
        b.add(f"{stem}.average_dice{suffix}", _fmean(list(vals.values())), vals, **kw,
              description=f"mean Dice over both contrasts' {split} cases")
        for j, label in enumerate(CONTRAST_STAGES):
            vals = {s: r[split]["row"][j] for s, r in runs.items()}
            b.add(f"{stem}.final{suffix}.{label}", _fmean(list(vals.values())), vals, **kw,
                  description=f"mean Dice on the {label} {split} cases")
    for stage, label in zip(next(iter(runs.values()))["test"]["per_class"], CONTRAST_STAGES, strict=True):
        for organ in next(iter(runs.values()))["test"]["per_class"][stage]:
            vals = {s: r["test"]["per_class"][stage][organ] for s, r in runs.items()}
            b.add(f"{stem}.dice.{label}.{organ}", _fmean(list(vals.values())), vals, **kw,
                  description=f"{organ} Dice on the {label} test cases")
    bound = {s: r["test"]["average_dice"] for s, r in runs.items()}
    for key, (row, _config) in CONTRAST_ROWS.items():
        dice = {s: v["average_dice"] for s, v in strategies[row]["per_seed"].items()}
        b.add(f"openkbp.contrast.{key}.ratio_to_joint_4x", *_ratio_of_means(dice, bound),
              config=f"row {row} over joint_4x", command=cmd + " ; " + protocol_cmd(row),
              source="openkbp/contrast/summary.json",
            description="average Dice over the 4x joint's (ratio of the means over the seeds both have)")


def experts_choice(b: Builder) -> None:
    """The experts layouts on the synthetic protocol (``synthetic.experts_choice.*``, with its joint rerun as the
    bound) and the rank-16 layout on the class-incremental OpenKBP protocol (``openkbp.incremental.experts_all_r16.*``);
    the real-anatomy domain step's rows are ``openkbp.contrast.*``."""
    src = "synthetic/experts_choice/summary.json"
    seeds = " ".join(str(s) for s in _load(src)["seeds"])
    cmd = protocol_command(SYNTH_V2, src, seeds, "results/synth_experts")
    rows = {**EXPERTS_CHOICE, "joint": ("joint", "one model from scratch on stages 0..i with their summed steps "
                                                 "(350, 500)")}
    protocol(b, "synthetic.experts_choice", src, rows, command=cmd, stage_labels=("ct_organs", "ct_new_organs",
             "mri"), bound="joint", what=f"synthetic protocol v2, experts layouts, seeds {seeds}", final_val=True)
    src = "openkbp/experts_choice/incremental_v2.json"
    seeds = " ".join(str(s) for s in _load(src)["seeds"])
    cmd = protocol_command(OKBP_V2, src, seeds, "results/openkbp/incremental_v2_experts")
    row, config = EXPERTS_CHOICE["experts_all_r16"]
    protocol(b, "openkbp.incremental", src, {"experts_all_r16": (row, config)}, command=cmd,
             stage_labels=("brainstem_cord_mandible", "parotids", "esophagus_larynx"), bound=None,
             what=f"OpenKBP class-incremental protocol v2, seeds {seeds}", classes=("esophagus",),
             val_classes=("esophagus",))
    st = _load(src)["strategies"][row]
    vals = {s: r["params"][1]["trainable"] for s, r in st["per_seed"].items()}
    total = {s: r["params"][0]["total"] for s, r in st["per_seed"].items()}
    b.add("openkbp.incremental.experts_all_r16.trainable_percent_per_stage",
          100 * _fmean(list(vals.values())) / _fmean(list(total.values())),
          {s: 100 * vals[s] / total[s] for s in vals}, config=config, command=cmd(row), source=src,
          description="one expert's parameters in % of the stage-0 network's")
    # the same stage-0 models as the protocol's other rows (incremental_v2_rerun): its joint_lt is the bound
    bound = _load("openkbp/incremental_v2_rerun/summary.json")["strategies"]["joint_lt"]["per_seed"]
    per_seed = _load(src)["strategies"][row]["per_seed"]
    for split in ("", "_val"):
        b.add(f"openkbp.incremental.experts_all_r16.ratio{split}_to_joint_lt", *_ratio_of_means(
              {s: r[f"average_dice{split}"] for s, r in per_seed.items()},
              {s: r[f"average_dice{split}"] for s, r in bound.items()}), config=config,
              command=cmd(row), source=src, description=f"average Dice on the {'validation' if split else 'test'} "
              "cases over joint_lt's (openkbp/incremental_v2_rerun): ratio of the means")
    runs = _load("openkbp/joint_diagnostic.json")["runs"]["joint_lt_4x"]
    b.add("openkbp.incremental.experts_all_r16.ratio_to_joint_lt_4x", *_ratio_of_means(
          {s: r["average_dice"] for s, r in per_seed.items()}, {s: r["test"]["average_dice"] for s, r in runs.items()}),
          config=config, command=cmd(row), source=src,
          description="average Dice over the 4x joint's (openkbp/joint_diagnostic.json; ratio of the means over "
          "the seeds both have)")


def heads(b: Builder) -> None:
    names = {"prototype": "cfseg prototype head", "softmax": "softmax (1x1x1 conv) head", "dodnet": "DoDNet head",
             "universal": "CLIP-driven Universal head", "versatile": "softmax head + Versatile-style terms"}
    for steps, src in ((1500, "openkbp/heads_1500.json"), (600, "openkbp/heads.json")):
        doc = _load(src)
        for h, res in doc["heads"].items():
            kw = {"config": f"{names[h]}, configs/openkbp/base.yaml + joint.yaml, {steps} steps",
                  "command": f"(train: cfseg fit --config configs/openkbp/base.yaml --config configs/openkbp/joint.yaml"
                             f" --model.head=<{h}> --trainer.max_steps={steps} --seed_everything=S --data.seed=0) "
                             + doc["command"].replace("--out benchmarks/openkbp", "--out reports/data/openkbp"),
                  "source": src}
            stem = f"openkbp.heads_{steps}.{h}"
            seeds = res["per_seed"]
            b.add(f"{stem}.mean_dice", res["mean_dice"], {s: r["mean_dice"] for s, r in seeds.items()}, **kw,
                  description=f"mean Dice over 7 organs on the 40 test cases, joint training, {steps} steps")
            if h in ("prototype", "softmax"):
                for c in res["per_class"]:
                    b.add(f"{stem}.dice.{c}", res["per_class"][c], {s: r["per_class"][c] for s, r in seeds.items()},
                          **kw, description=f"{c} Dice on the test cases, {steps} steps")
            if steps == 600:
                b.add(f"{stem}.hd95_mm", res["hd95_mm"]["mean"],
                      {s: r["hd95_mm"]["mean"] for s, r in seeds.items()}, **kw,
                      description="mean HD95 in mm (a missed organ scores the volume diagonal)")
                b.add(f"{stem}.surface_dice", res["surface_dice"]["mean"],
                      {s: r["surface_dice"]["mean"] for s, r in seeds.items()}, **kw,
                      description="mean surface Dice at 2 mm")
                b.add(f"{stem}.head_params", res["head_params"], {}, **kw, description="the head's parameters")
                b.add(f"{stem}.train_step_s", res["step_s"], {}, **kw,
                      description="one training step (2 x 64^3), median, one thread")
                b.add(f"{stem}.infer_all_s", res["infer_s"], {}, **kw,
                      description="inference of one test case, every class, median of 3 cases, one thread")
                b.add(f"{stem}.infer_one_class_s", res["infer_one_class_s"], {}, **kw,
                      description="inference of one test case, one class (brainstem), one thread")
                for task, mib in res["peak_memory_mib"].items():
                    b.add(f"{stem}.peak_mib.{task}", mib, {}, **kw,
                          description=f"peak resident memory added by the task ({task}), MiB, median of 3 processes")
    src = "openkbp/heads_1500_esophagus.json"
    doc = _load(src)
    conf = {"prototype-gpu": "prototype head trained on an H100 (float32), default crop ratios",
            "prototype-eso3-gpu": "prototype head on an H100, 3x the esophagus crop-centre ratio",
            "softmax-eso3-gpu": "softmax head on an H100, 3x the esophagus crop-centre ratio (seed 0)"}
    for h, config in conf.items():
        res = doc["heads"][h]
        kw = {"config": config + ", 1500 steps", "source": src, "command": "bash benchmarks/openkbp/gpu/run.sh "
              "(on the GPU machine; --data.class_ratios for the x3 rows), then " + doc["command"].replace(
                  "--out benchmarks/openkbp", "--out reports/data/openkbp")}
        key = h.replace("-", "_")
        b.add(f"openkbp.heads_1500_gpu.{key}.mean_dice", res["mean_dice"],
              {s: r["mean_dice"] for s, r in res["per_seed"].items()}, **kw,
              description="mean Dice over 7 organs on the 40 test cases")
        b.add(f"openkbp.heads_1500_gpu.{key}.dice.esophagus", res["per_class"]["esophagus"],
              {s: r["per_class"]["esophagus"] for s, r in res["per_seed"].items()}, **kw,
              description="esophagus Dice on the test cases")


def prototypes(b: Builder) -> None:
    src = "openkbp/prototypes.json"
    doc = _load(src)
    conf = {"text": "text prototypes (MiniLM), Gram-Schmidt in class order (the default)",
            "text_reversed": "text prototypes, Gram-Schmidt in reversed class order",
            "random": "seeded random orthonormal prototypes",
            "text_no_gs": "normalised text embeddings, not orthogonalised"}
    for v, config in conf.items():
        seeds = doc["variants"][v]["seeds"]
        kw = {"config": config + "; prototype head, 600 steps", "source": src,
              "command": doc["command"].replace("--out benchmarks/openkbp/prototypes",
                                                "--out reports/data/openkbp/prototypes")}
        for field, name, what in (("mean_head_dice", "head_dice", "the head's mean Dice"),
                                  ("mean_map_dice", "map_dice", "mean Dice of each class's similarity map "
                                   "thresholded alone (threshold chosen on the validation cases)")):
            vals = {s: r[field] for s, r in seeds.items()}
            b.add(f"openkbp.prototypes.{v}.{name}", _fmean(list(vals.values())), vals, **kw,
                  description=f"{what} on the 40 test cases")


def esophagus(b: Builder) -> None:
    src = "openkbp/class_exposure.json"
    doc = _load(src)
    cmd = "python benchmarks/openkbp/class_exposure.py --out reports/data/openkbp"
    row = next(r for r in doc["rows"] if r["class"] == "esophagus")
    kw = {"config": "the 153 joint training cases, class-balanced 64^3 crops, 64 per case", "command": cmd,
          "source": src}
    b.add("openkbp.esophagus.cases_annotating_fraction", row["cases_annotating"] / row["of_cases"], {}, **kw,
          description="fraction of the joint training cases that contour the esophagus")
    for ratios in ("equal", "inverse_frequency"):
        b.add(f"openkbp.esophagus.voxel_share.{ratios}", row[f"{ratios}_voxel_share"], {}, **kw,
              description=f"share of the supervised patch voxels that are esophagus ({ratios} crop ratios)")
    others = [r["inverse_frequency_voxel_share"] for r in doc["rows"] if r["class"] != "esophagus"]
    b.add("openkbp.esophagus.voxel_share.next_smallest_organ", min(others), {}, **kw,
          description="the smallest voxel share of any other organ (inverse-frequency crop ratios)")
    src = "openkbp/class_bias.json"
    doc = _load(src)
    for ck, res in doc["checkpoints"].items():
        head = ck.split(":")[0]
        b.add(f"openkbp.esophagus.mean_prob_inside_gt_val.{head}",
              res["classes"]["esophagus"]["val_inside_gt"]["mean_prob"], {}, config=f"{head} head, 1500 steps, seed 0",
              command=doc["command"].replace("--out benchmarks/openkbp", "--out reports/data/openkbp"), source=src,
              description="mean softmax probability of the esophagus inside its own contour, validation cases")


def speed(b: Builder) -> None:
    src = "speed/inference.json"
    doc = _load(src)
    cmd = "python benchmarks/inference.py --reps 15 --threads 1 --out reports/data/speed/inference"
    conf = ("cfseg.segmentation.segment with the folded prototype head vs a plain MONAI pipeline "
            "(SoftmaxSegmenter, sliding_window_inference, Invertd), same UNet 8-128 weights, one OpenKBP CT "
            "128^3, one torch thread, 15 interleaved pairs")
    for row, key in zip(doc["rows"], ("all_classes", "two_classes"), strict=True):
        kw = {"config": conf, "command": cmd, "source": src}
        for field, name, what in (("ratio_of_medians", "time_ratio_medians", "median wall time, cfseg / MONAI"),
                                  ("median_pair_ratio", "time_ratio_pairs", "median of the per-pair wall-time "
                                   "ratios"),
                                  ("ratio_of_minima", "time_ratio_minima", "fastest run, cfseg / MONAI"),
                                  ("cpu_ratio_of_medians", "cpu_ratio", "median CPU time, cfseg / MONAI"),
                                  ("memory_ratio", "memory_ratio", "peak RSS growth, cfseg / MONAI")):
            b.add(f"speed.inference.{key}.{name}", row[field], {}, **kw, description=f"{row['classes']}: {what}")
        for side in ("cfseg", "monai"):
            b.add(f"speed.inference.{key}.{side}_median_s", row["median_s"][side], {}, **kw,
                  description=f"{row['classes']}: median wall time of one segmentation, {side}")
            b.add(f"speed.inference.{key}.{side}_peak_mib", row["memory"][side]["growth_mib"], {}, **kw,
                  description=f"{row['classes']}: peak RSS growth of one segmentation, {side}")
    ckpt = "--ckpt results/heads/prototype_s0/logs/version_0/checkpoints/joint.ckpt --max-cases 10"
    for name, variant, what in (("folded_labels", "--variant folded ", "the folded head (R folded into the "
                                 "backbone's last convolution)"),
                                ("unnormalised_labels", "", "the cosine logits without the per-voxel norm "
                                 "(rejected)")):
            src = f"speed/{name}.json"
            doc = _load(src)
            kw = {"config": f"{what} against the unfolded cosine head, 10 OpenKBP test cases, prototype head 600 "
                            f"steps seed 0",
                  "command": f"python benchmarks/unnormalised_labels.py {variant}{ckpt} --out reports/data/{src}",
                  "source": src}
            b.add(f"speed.{name}.voxel_disagreement", doc["voxel_disagreement"], {}, **kw,
                  description="fraction of voxels whose label differs from the unfolded cosine head's")
            b.add(f"speed.{name}.max_abs_dice_change", doc["max_abs_dice_change"], {}, **kw,
                  description="largest per-class Dice change against the unfolded cosine head")
    src = "speed/train_throughput.json"
    doc = _load(src)
    row = next(r for r in doc["rows"] if r["precision"] == "32-true")
    rule = (f"a pair discarded when either side's CPU/wall < {row['min_cpu_fraction']} x "
            + ("the run's median share" if row["expected_share"] == "median" else f"{row['expected_share']} core")
            + (f" or load1 > {row['max_load']}" if row["max_load"] is not None else ""))
    kw = {"config": f"configs/openkbp/base.yaml + joint.yaml, 2 volumes x 2 patches of 64^3 per step, fp32, one "
                    f"thread; {row['warmup']} warm-up + {row['pairs_run']} cfseg/plain pairs interleaved in one "
                    f"process, {rule}; {doc['cores']} cores shared with other benchmark processes",
          "command": "OMP_NUM_THREADS=1 .venv/bin/python benchmarks/train_throughput.py " + " ".join(doc["argv"]),
          "source": src}
    b.add("speed.training.step_ratio", row["ratio_wall"]["median"], {}, **kw,
          description="median over the kept pairs of the wall-time ratio cfseg fit step / plain MONAI step")
    b.add("speed.training.step_ratio_cpu", row["ratio_cpu"]["median"], {}, **kw,
          description="median over the kept pairs of the CPU-time ratio cfseg fit step / plain MONAI step")
    for kind, what in (("wall", "wall-time"), ("cpu", "CPU-time")):
        for stat, name in (("min", "smallest"), ("q1", "first quartile of the"), ("q3", "third quartile of the"),
                           ("max", "largest")):
            b.add(f"speed.training.ratio_{kind}.{stat}", row[f"ratio_{kind}"][stat], {}, **kw,
                  description=f"{name} per-pair {what} ratio cfseg / plain over the kept pairs")
    for side in ("cfseg", "plain"):
        b.add(f"speed.training.{side}_step_s", row[f"{side}_step_s"], {}, **kw,
              description=f"median wall time of one {side} training step over the kept pairs (s)")
        b.add(f"speed.training.{side}_step_cpu_s", row[f"{side}_step_cpu_s"], {}, **kw,
              description=f"median main-thread CPU time of one {side} training step over the kept pairs (s)")
    for name, value, what in (
            ("pairs_kept", row["kept"], "pairs kept"), ("pairs_discarded", row["discarded"], "pairs discarded"),
            ("pairs_at_full_core", row["kept_at_full_core"], "pairs whose two sides both had CPU/wall >= "
             f"{row['min_cpu_fraction']}"),
            ("median_share", row["median_share"], "median CPU/wall over both sides of every pair (core share)"),
            ("load1_before", doc["load_before"][0], "1-minute load average before the run"),
            ("load1_during_min", row["load1_during"]["min"], "smallest 1-minute load average at a pair's start"),
            ("load1_during_max", row["load1_during"]["max"], "largest 1-minute load average at a pair's start"),
            ("load1_after", doc["load_after"][0], "1-minute load average after the run")):
        b.add(f"speed.training.{name}", value, {}, **kw, description=what)
    for prefix, name, layout in (("speed.experts", "experts_cost", "LoRA rank 4 on the decoder"),
                                 ("speed.experts.every_r16", "experts_cost_every_r16",
                                  "LoRA rank 16 on every convolution (the experts default)")):
        src = f"speed/{name}.json"
        doc = _load(src)
        kw = {"config": f"OpenKBP UNet 16-256 + prototype head, {layout}, 96x96x80 volume, one thread",
              "command": doc["command"].replace("--out benchmarks/experts_cost",
                                                "--out reports/data/speed/experts_cost"), "source": src}
        b.add(f"{prefix}.expert_percent_without_projection", doc["expert_percent"], {}, **kw,
              description="one expert's LoRA parameters in % of the network (the projection copy adds more)")
        for row in doc["rows"]:
            n = row["experts"]
            case = {"plain": None, "all": "all_classes", "all_nocache": "all_classes_no_prefix_cache",
                    "one": "one_class"}.get(row["case"], row["case"])
            if case is None:
                continue
            b.add(f"{prefix}.n{n}.{case}.cpu_ratio", row["paired_cpu_ratio_to_plain"], {}, **kw,
                  description=f"{n} experts, {row['case']}: CPU time over the plain network's (paired, median)")
            b.add(f"{prefix}.n{n}.{case}.peak_mib", row["peak_rss_growth_mib"], {}, **kw,
                  description=f"{n} experts, {row['case']}: peak RSS growth, MiB")


def online(b: Builder) -> None:
    src = "online/summary.json"
    doc = _load(src)["settings"]
    conf = {"weak": "300-step base model, the chosen defaults (residual, 4 steps, lr 5e-3), feedback on every case",
            "weak_auxol": "300-step base model, AuxOL's constants (from scratch, 1 step, lr 5e-4)",
            "weak_every2": "300-step base model, feedback on every second case",
            "weak_shift": "300-step base model, test cases through the simulated scanner B",
            "strong": "1500-step base model, feedback on every case",
            "strong_shift": "1500-step base model, scanner B"}
    for name, config in conf.items():
        r = doc[name]
        kw = {"config": config, "source": src,
              "command": "bash benchmarks/online/run.sh   # streams into results/online/streams, then "
                         "benchmarks/online/report.py --out reports/data/online"}
        for field, key, what in (("frozen_second_half", "frozen_second_half", "frozen model, cases 21-40"),
                                 ("online_second_half", "fused_second_half", "fused output, cases 21-40"),
                                 ("frozen_mean_dice", "frozen", "frozen model, all 40 cases"),
                                 ("online_mean_dice", "fused", "fused output, all 40 cases"),
                                 ("worst_case_gain", "worst_case_gain", "lowest fused - frozen of one case")):
            b.add(f"online.{name}.{key}", r[field], {}, **kw, description=f"mean Dice, {what}")
        b.add(f"online.{name}.second_half_gain", r["online_second_half"] - r["frozen_second_half"], {}, **kw,
              description="fused - frozen mean Dice over cases 21-40 of the stream")
    src = "online/timing.json"
    doc = _load(src)
    kw = {"config": "128^3 case, 7 classes all corrected, buffer full (32 crops), 2 threads, idle machine",
          "command": "OMP_NUM_THREADS=2 python benchmarks/online/timing.py --ckpt <1500-step model> --threads 2 "
                     "--out reports/data/online/timing.json", "source": src}
    for field, what in (("mean", "mean over 5 cases"), ("max", "slowest of 5 cases")):
        b.add(f"online.timing.seconds_per_update.{field}", doc["seconds_per_update"][field], {}, **kw,
              description=f"seconds per correction (one update), {what}")
    b.add("online.timing.seconds_per_fused_segmentation.mean", doc["seconds_per_fused_segmentation"]["mean"], {},
          **kw, description="seconds of one fused segmentation on top of the frozen model's pass")


def routers(b: Builder) -> None:
    src = "router_ablation.json"
    doc = _load(src)
    cmd = doc["meta"]["command"].replace("--out benchmarks/router_ablation", "--out reports/data/router_ablation")
    for scen, sc in doc["scenarios"].items():
        for variant in sc["variants"]:
            layer0_windows = variant["layer_name"] == "model.0.conv" and variant["statistics"] == "windows"
            if not (variant.get("main") or layer0_windows):
                continue
            rows = variant["rows"]
            default, chosen = rows[variant["protocol_default"]], rows[variant["selected"]]
            kw = {"config": f"{sc['protocol']}, layer {variant['layer_name']}, statistics from training "
                            f"{variant['statistics']}", "command": cmd, "source": src}
            key = "main" if variant.get("main") else "layer0_windows"
            b.add(f"router.expert.{scen}.{key}.default_test_accuracy", default["test"]["acc"], {}, **kw,
                  description="test volumes routed to their own domain's expert, random features 0, gamma 1 "
                              "(the defaults)")
            b.add(f"router.expert.{scen}.{key}.selected_test_accuracy", chosen["test"]["acc"], {}, **kw,
                  description=f"the same for the setting validation picks (random features "
                              f"{chosen['random_features']}, gamma {chosen['gamma']})")
    src = "synthetic/modality_router.json"
    doc = _load(src)
    kw = {"config": "modality router on the synthetic protocol v1's experts checkpoint after the MRI stage (seed 0)",
          "command": f".venv/bin/python benchmarks/modality_router.py --config {SYNTH_V1} --checkpoint "
                     "results/synth_mod/seed0/runs/experts_stage2/final.ckpt --out "
                     "reports/data/synthetic/modality_router", "source": src}
    for answer in ("router_1", "router_0.1", "router_0.01", "router_0.001", "rule"):
        for variant, vname in (("stored", "test"), ("ct_no_hu_offset", "test_ct_without_hu_offset")):
            rows = [r for r in doc["rows"] if r["split"] == "test" and r["variant"] == variant]
            acc = sum(r[answer] == r["truth"] for r in rows) / len(rows)
            name = answer.replace("router_", "gamma_").replace(".", "p")
            b.add(f"router.modality.{name}.{vname}_accuracy", acc, {}, **kw,
                  description=f"fraction of {len(rows)} test volumes ({variant}) whose modality "
                              f"{'the intensity rule' if answer == 'rule' else 'the router'} names correctly")


OOD_RUNS = {
    "demo": ("the make demo checkpoint (configs/demo.yaml, seed 0); statistics from 16 training cases per site, "
             "threshold 3 x the largest validation-case score",
             ".venv/bin/python benchmarks/ood.py --ckpt results/demo/cfseg-demo.ckpt "
             "--config configs/demo.yaml --datasets data/synthetic/Dataset001_site_a_ct "
             "data/synthetic/Dataset002_site_b_ct --group "
             "in_domain_test='data/synthetic/Dataset003_test_ct/imagesTr/*.nii.gz' --group "
             "synthetic_mri='data/synthetic/Dataset013_stage2_mri/imagesTr/*.nii.gz' --group "
             "real_ct_openkbp='../shared/data/openkbp_oar/imagesTr/*.nii.gz' --group "
             "real_ct_totalseg='../shared/data/totalseg_ct/imagesTr/*.nii.gz' --group "
             "real_mr_totalseg='../shared/data/totalseg_mr/imagesTr/*.nii.gz' --max-files 8 "
             "--out reports/data/ood/demo.json"),
    "openkbp": ("an OpenKBP joint model (configs/openkbp/base.yaml + joint.yaml, 1500 steps, seed 0); statistics "
                "from 16 of its 153 training cases, threshold 3 x the largest of its 10 validation cases' scores",
                ".venv/bin/cfseg fit --config configs/openkbp/base.yaml --config configs/openkbp/joint.yaml "
                "--trainer.max_steps=1500 --trainer.default_root_dir=results/ood_openkbp "
                "--trainer.callbacks.init_args.dirpath=results/ood_openkbp && .venv/bin/python benchmarks/ood.py "
                "--ckpt results/ood_openkbp/joint.ckpt --config configs/openkbp/base.yaml --datasets "
                "../shared/data/openkbp_oar --split-file configs/openkbp/split_joint.json --max-files 40 --group "
                "in_domain_test=split:test --group totalseg_ct='../shared/data/totalseg_ct/imagesTr/*.nii.gz' "
                "--group totalseg_mr='../shared/data/totalseg_mr/imagesTr/*.nii.gz' --group "
                "synthetic_ct='data/synthetic/Dataset003_test_ct/imagesTr/*.nii.gz' "
                "--out reports/data/ood/openkbp.json"),
}


def ood(b: Builder) -> None:
    for model, (config, command) in OOD_RUNS.items():
        src = f"ood/{model}.json"
        doc = _load(src)
        kw = {"config": config, "command": command, "source": src}
        b.add(f"ood.{model}.threshold", doc["threshold"], {}, **kw,
              description=f"out-of-domain threshold of the {model} model")
        for group, g in doc["groups"].items():
            b.add(f"ood.{model}.{group}.warned_fraction", g["warned_fraction"], {}, **kw,
                  description=f"fraction of {len(g['scores'])} {group} inputs warned as out of domain")
            in_domain = group == "in_domain_test"
            b.add(f"ood.{model}.{group}.max_score" if in_domain else f"ood.{model}.{group}.min_score",
                  max(g["scores"]) if in_domain else min(g["scores"]), {}, **kw,
                  description=f"{'highest' if in_domain else 'lowest'} out-of-domain score of the {group} inputs")


CURVE_FIT = ("OMP_NUM_THREADS=1 cfseg fit --config configs/openkbp/base.yaml --config configs/openkbp/joint.yaml "
             "--config configs/openkbp/budget_curve.yaml --trainer.max_steps=1500 --model.head={head} "
             "--seed_everything=S --data.seed=0 --trainer.logger.init_args.save_dir=results/curve/{head}_sS")
LONG_FIT = ("OMP_NUM_THREADS=1 .venv/bin/python benchmarks/openkbp/ingredients.py --rows baseline_5250 --heads {head} "
            "--seeds S --test --summary reports/data/openkbp/ingredients/summary.json")
VS_NNUNET_ROWS = {
    "cfseg_prototype": ("cfseg, prototype head (configs/openkbp/base.yaml + joint.yaml + budget_curve.yaml)",
                        CURVE_FIT.format(head="prototype")),
    "cfseg_softmax": ("cfseg, softmax head (the same with --model.head=softmax)", CURVE_FIT.format(head="softmax")),
    "cfseg_prototype_5250": ("cfseg, prototype head, the same recipe for 5250 steps (its cosine schedule spans "
                             "them)", LONG_FIT.format(head="prototype")),
    "cfseg_softmax_5250": ("cfseg, softmax head, the same recipe for 5250 steps (its cosine schedule spans them)",
                           LONG_FIT.format(head="softmax")),
    "nnunet_equal": ("nnU-Net v2.8.1 at cfseg's spacing, patch, batch and iterations (nnUNetPlans_cfsegEqual, "
                     "nnUNetTrainer_cfsegEqual_sS), its own network, optimiser, loss and augmentation",
                     "bash benchmarks/nnunet/setup.sh; bash benchmarks/nnunet/run_equal_terms.sh S [375|750|final]"),
}


def vs_nnunet(b: Builder) -> None:
    """Section 14: cfseg's joint runs and nnU-Net at equal terms, test Dice against training CPU seconds."""
    src = "nnunet/comparison.json"
    doc = _load(src)
    for row, r in doc["rows"].items():
        config, train = VS_NNUNET_ROWS[row]
        for steps, seeds in r["points"].items():
            kw = {"config": f"{config}; {steps} training steps",
                  "command": f"{train}, then {r.get('command', doc['command'])}",
                  "source": src}
            stem = f"openkbp.vs_nnunet.{row}.{steps}"
            for key, field, what in (("mean_dice", "mean_dice", "mean Dice over 7 organs on the 40 test cases"),
                                     ("surface_dice", "mean_surface_dice", "mean surface Dice at 2 mm"),
                                     ("hd95_mm", "mean_hd95_mm", "mean HD95 in mm (pairs with an empty mask left out)"),
                                     ("cpu_seconds", "cpu_seconds", "training CPU seconds (process CPU time)")):
                vals = {s: v[field] for s, v in seeds.items() if v[field] is not None}
                if vals:
                    b.add(f"{stem}.{key}", _fmean(list(vals.values())), vals, **kw,
                          description=f"{what}, after {steps} steps")
            for c in next(iter(seeds.values()))["per_class"]:
                vals = {s: v["per_class"][c] for s, v in seeds.items()}
                b.add(f"{stem}.dice.{c}", _fmean(list(vals.values())), vals, **kw,
                      description=f"{c} Dice on the test cases after {steps} steps")
            vals = {s: _fmean([v["per_class"]["esophagus"], v["per_class"]["larynx"]]) for s, v in seeds.items()}
            b.add(f"{stem}.dice_esophagus_larynx", _fmean(list(vals.values())), vals, **kw,
                  description=f"mean of the esophagus and larynx Dice (the organs the class-incremental protocol "
                              f"adds last) after {steps} steps")
    own = doc["nnunet_own_step"]
    kw = {"config": "nnU-Net v2.8.1's own 3d_fullres plan (patch 128^3, batch 2, 31.2 M parameters), one thread",
          "command": json.loads((DATA / own["source"].removeprefix("reports/data/")).read_text())["command"],
          "source": own["source"].removeprefix("reports/data/")}
    b.add("openkbp.vs_nnunet.nnunet_own.cpu_seconds_per_iteration", own["cpu_seconds_per_iteration"], {}, **kw,
          description="CPU seconds of one training iteration (data + augmentation + step), median of 3")
    b.add("openkbp.vs_nnunet.nnunet_own.iterations_in_cfseg_budget", own["iterations_in_cfseg_budget"], {}, **kw,
          description="iterations that cfseg's 1500-step CPU time buys (an epoch is 250)")


INGREDIENTS_CMD = ("OMP_NUM_THREADS=1 .venv/bin/python benchmarks/openkbp/ingredients.py --rows {row} --heads {head} "
                   "--seeds {seeds} --reuse-baseline results/curve{test} --summary "
                   "reports/data/openkbp/ingredients/summary.json")


def ingredients(b: Builder) -> None:
    """Section 14b: nnU-Net's ingredients one at a time in cfseg's OpenKBP joint recipe (validation cases; the test
    cases for the rows that were scored on them)."""
    src = "openkbp/ingredients/summary.json"
    doc = _load(src)
    for row, r in doc["rows"].items():
        for head in ("prototype", "softmax"):
            seeds = r.get(head)
            if not seeds:
                continue
            tested = all("test" in v for v in seeds.values())
            steps = sorted({v["steps"] for v in seeds.values()})
            kw = {"config": f"{r['change']}; {head} head, {'/'.join(map(str, steps))} steps",
                  "command": INGREDIENTS_CMD.format(row=row, head=head, seeds=" ".join(sorted(seeds)),
                                                    test=" --test" if tested else ""), "source": src}
            stem = f"openkbp.ingredients.{row}.{head}"
            for part in ("val", "test") if tested else ("val",):
                vals = {s: v[part]["mean_dice"] for s, v in seeds.items()}
                what = "10 validation" if part == "val" else "40 test"
                b.add(f"{stem}.{part}_dice", _fmean(list(vals.values())), vals, **kw,
                      description=f"mean Dice over 7 organs on the {what} cases")
                for organ in ("esophagus", "larynx"):
                    vals = {s: v[part]["per_class"][organ] for s, v in seeds.items()}
                    b.add(f"{stem}.{part}_dice.{organ}", _fmean(list(vals.values())), vals, **kw,
                          description=f"{organ} Dice on the {what} cases")
            vals = {s: v["cpu_seconds"] for s, v in seeds.items()}
            b.add(f"{stem}.cpu_seconds", _fmean(list(vals.values())), vals, **kw,
                  description="training CPU seconds of the run (one thread)")
    timing = doc.get("step_time")
    if timing:
        kw = {"config": f"one training step, batch 4 x 64^3, {timing['head']} head, {timing['threads']} thread, rows "
                        "interleaved", "command": f"OMP_NUM_THREADS=1 .venv/bin/{timing['command']}", "source": src}
        for row, t in timing["rows"].items():
            b.add(f"openkbp.ingredients.{row}.cpu_seconds_per_step", t["cpu_seconds_per_step"], {}, **kw,
                  description=f"CPU seconds of one training step with this row's network (median of {t['reps']})")
            b.add(f"openkbp.ingredients.{row}.parameters_m", t["parameters"] / 1e6, {}, **kw,
                  description="parameters of the network (backbone + head), millions")


def joint_bound(b: Builder) -> None:
    """The OpenKBP protocol's joint at 4x the sequential strategies' compute, and the rows' ratios to it."""
    src = "openkbp/joint_diagnostic.json"
    doc = _load(src)
    runs = doc["runs"]["joint_lt_4x"]
    cmd = " ; ".join(doc["commands"]["joint_lt_4x"][s] for s in sorted(runs))
    kw = {"config": "joint_lt after stage 2 with 4 x 1600 = 6400 steps (all three stages' data, learnt temperature)",
          "command": cmd, "source": src}
    stem = "openkbp.incremental.joint_lt_4x"
    stages = ("brainstem_cord_mandible", "parotids", "esophagus_larynx")
    for split, suffix in (("test", ""), ("val", "_val")):
        vals = {s: r[split]["average_dice"] for s, r in runs.items()}
        b.add(f"{stem}.average_dice{suffix}", _fmean(list(vals.values())), vals, **kw,
              description=f"mean Dice over the three stages' {split} cases")
    for j, label in enumerate(stages):
        vals = {s: r["test"]["row"][j] for s, r in runs.items()}
        b.add(f"{stem}.final.{label}", _fmean(list(vals.values())), vals, **kw,
              description=f"mean Dice on stage {j}'s test cases ({label})")
    organs = [c for per in next(iter(runs.values()))["test"]["per_class"].values() for c in per]
    for c in organs:
        vals = {s: next(per[c] for per in r["test"]["per_class"].values() if c in per) for s, r in runs.items()}
        b.add(f"{stem}.dice.{c}", _fmean(list(vals.values())), vals, **kw, description=f"{c} Dice on the test cases")
    bound = {s: r["test"]["average_dice"] for s, r in runs.items()}
    proto = _load("openkbp/incremental_v2_rerun/summary.json")["strategies"]
    for key, row in (("distill", "distill_plop_sep01_kd10_ramp0"), ("experts_all", "experts_all"),
                     ("joint_lt", "joint_lt"), ("replay", "replay"), ("ewc_1e5", "ewc_1e5"), ("experts", "experts")):
        dice = {s: v["average_dice"] for s, v in proto[row]["per_seed"].items()}
        b.add(f"openkbp.incremental.{key}.ratio_to_joint_lt_4x", *_ratio_of_means(dice, bound),
            config=f"row {row} over joint_lt_4x", command=cmd + " ; " + protocol_command(
                OKBP_V2, "openkbp/incremental_v2_rerun/summary.json", "0 1")(row),
            source="openkbp/incremental_v2_rerun/summary.json",
            description="average Dice over the 4x joint's (ratio of the means over the seeds both have)")


MEMORY_RUNS = {
    "after": ("large_volume.json", "a tiny checkpoint at 4 x 4 x 3 mm (tests/configs/tiny.yaml, 2 steps), "
              "cfseg-segment --multilabel",
              "CFSEG_CACHE_DIR=/tmp/cfseg-cache .venv/bin/python benchmarks/large_volume_memory.py --sizes 512x512x256 "
              "512x512x512 512x512x1024"),
    "before": ("large_volume_before_30c64dc.json", "the same, cfseg at commit 30c64dc (before slab and block "
               "resampling)",
               "git archive 30c64dc cfseg | tar -x -C /tmp/cfseg-old && .venv/bin/python "
               "benchmarks/large_volume_memory.py --sizes 512x512x256 512x512x512 --src /tmp/cfseg-old "
               "--out reports/data/memory/large_volume_before_30c64dc.json"),
    "fine_checkpoint": ("large_volume_ckpt_1.5mm.json", "a tiny checkpoint trained at 1.5 mm (network grid "
                        "273 x 273 x 342), cfseg-segment --multilabel",
                        ".venv/bin/python benchmarks/large_volume_memory.py --sizes 512x512x1024 --ckpt <a tiny "
                        "checkpoint trained with --data.spacing=[1.5,1.5,1.5]> "
                        "--out reports/data/memory/large_volume_ckpt_1.5mm.json"),
}


def memory(b: Builder) -> None:
    for run, (name, config, command) in MEMORY_RUNS.items():
        src = f"memory/{name}"
        for r in _load(src)["results"]:
            size = "x".join(str(n) for n in r["shape"])
            kw = {"config": config, "command": command, "source": src}
            b.add(f"memory.segment.{run}.{size}.peak_rss_gb", r["peak_rss_gb"], {}, **kw,
                  description=f"peak resident memory of cfseg-segment on a {size} int16 CT (GB)")
            b.add(f"memory.segment.{run}.{size}.wall_s", r["wall_s"], {}, **kw,
                  description=f"wall time of cfseg-segment on a {size} int16 CT (s)")


def build() -> Entries:
    b = Builder()
    demo(b)
    synthetic(b)
    openkbp_incremental(b)
    openkbp_domain(b)
    openkbp_contrast(b)
    experts_choice(b)
    heads(b)
    prototypes(b)
    esophagus(b)
    speed(b)
    online(b)
    routers(b)
    ood(b)
    memory(b)
    vs_nnunet(b)
    ingredients(b)
    joint_bound(b)
    return dict(sorted(b.entries.items()))


# ---------------------------------------------------------------------------------------------------------- figures
def _bars(ax: Any, entries: Entries, keys: Sequence[tuple[str, str]], metric: str, title: str) -> None:
    for i, (_, key) in enumerate(keys):
        e = entries[f"{key}.{metric}"]
        ax.barh(-i, e["mean"], color="#4c72b0" if "distill" in key else "#999999")
        ax.plot(list(e["per_seed"].values()), [-i] * len(e["per_seed"]), "k.", ms=6)
    ax.set_yticks([-i for i in range(len(keys))], [k for k, _ in keys])
    ax.set_title(title)
    ax.axvline(0, color="k", lw=0.5)


def figures(entries: Entries) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    FIGURES.mkdir(parents=True, exist_ok=True)
    meta = {"Software": None}
    out = []

    protocols = {
        "openkbp_incremental.png": ("OpenKBP class-incremental, protocol v2 (seeds 0-1)", [
            ("distill (defaults)", "openkbp.incremental.distill"),
            ("distill, KD 2.5 flat", "openkbp.incremental.distill_plop_sep01_kd25"),
            ("experts_all", "openkbp.incremental.experts_all"), ("experts", "openkbp.incremental.experts"),
            ("replay (keeps data)", "openkbp.incremental.replay"), ("ewc 1e5", "openkbp.incremental.ewc_1e5"),
            ("joint_lt (1600 steps)", "openkbp.incremental.joint_lt")]),
        "synthetic_protocol.png": ("Synthetic protocol v2 (seeds 0-2)", [
            ("distill (defaults)", "synthetic.protocol.distill"),
            ("distill, per-stage KD", "synthetic.protocol.distill_ci_kd0_mri_kd10_ramp"),
            ("distill, KD 2.5 flat", "synthetic.protocol.distill_kd25"),
            ("experts", "synthetic.protocol.experts"), ("replay (keeps data)", "synthetic.protocol.replay"),
            ("ewc 1e5", "synthetic.protocol.ewc_1e5"), ("finetune", "synthetic.protocol.finetune"),
            ("joint", "synthetic.protocol.joint")]),
    }
    for name, (title, keys) in protocols.items():
        fig, axes = plt.subplots(1, 2, figsize=(10, 0.45 * len(keys) + 1.2), sharey=True)
        _bars(axes[0], entries, keys, "average_dice", "average Dice after the last stage (test)")
        _bars(axes[1], entries, keys, "bwt", "BWT (test)")
        fig.suptitle(title + "; dots: seeds")
        fig.tight_layout()
        fig.savefig(FIGURES / name, dpi=100, metadata=meta)
        plt.close(fig)
        out.append(FIGURES / name)

    fig, ax = plt.subplots(figsize=(7, 3.2))
    heads_ = ["prototype", "softmax", "versatile", "universal", "dodnet"]
    for k, steps in enumerate((600, 1500)):
        for i, h in enumerate(heads_):
            e = entries[f"openkbp.heads_{steps}.{h}.mean_dice"]
            ax.bar(i + 0.4 * k, e["mean"], 0.38, color=("#dd8452", "#4c72b0")[k],
                   label=f"{steps} steps" if i == 0 else None)
            ax.plot([i + 0.4 * k] * len(e["per_seed"]), list(e["per_seed"].values()), "k.", ms=6)
    ax.set_xticks([i + 0.2 for i in range(len(heads_))], heads_)
    ax.set_ylabel("mean Dice, 40 test cases")
    ax.set_title("OpenKBP joint training: heads on one backbone; dots: seeds")
    ax.legend()
    fig.tight_layout()
    fig.savefig(FIGURES / "heads.png", dpi=100, metadata=meta)
    plt.close(fig)
    out.append(FIGURES / "heads.png")

    classes = [k.rsplit(".", 1)[1] for k in entries if k.startswith("demo.heldout.dice.")]
    fig, ax = plt.subplots(figsize=(8, 3))
    for k, (label, prefix) in enumerate((("make demo", "demo"), ("oracle (ideal labels)", "demo.oracle"))):
        vals = [entries[f"{prefix}.heldout.dice.{c}"]["mean"] for c in classes]
        ax.bar([i + 0.4 * k for i in range(len(classes))], vals, 0.38, label=label)
    ax.set_xticks([i + 0.2 for i in range(len(classes))], classes, rotation=30)
    ax.set_ylabel("Dice, held-out scanner")
    ax.set_title("Synthetic demo: per-organ Dice (mean of seeds 0, 1)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(FIGURES / "demo_per_class.png", dpi=100, metadata=meta)
    plt.close(fig)
    out.append(FIGURES / "demo_per_class.png")

    fig, ax = plt.subplots(figsize=(7.5, 4))
    for row, label, color, style in (("cfseg_prototype", "cfseg, prototype head", "#4c72b0", "o-"),
                                     ("cfseg_softmax", "cfseg, softmax head", "#dd8452", "o-"),
                                     ("cfseg_prototype_5250", "cfseg, prototype head, 5250-step schedule", "#4c72b0",
                                      "s--"),
                                     ("cfseg_softmax_5250", "cfseg, softmax head, 5250-step schedule", "#dd8452",
                                      "s--"),
                                     ("nnunet_equal", "nnU-Net v2 at cfseg's terms", "#55a868", "o-")):
        prefix = f"openkbp.vs_nnunet.{row}."
        steps = sorted({int(k[len(prefix):].split(".")[0]) for k in entries if k.startswith(prefix)})
        if not steps:
            continue
        points = [(entries[f"{prefix}{n}.cpu_seconds"], entries[f"{prefix}{n}.mean_dice"]) for n in steps]
        ax.plot([c["mean"] for c, _ in points], [d["mean"] for _, d in points], style, color=color,
                label=f"{label} ({', '.join(str(n) for n in steps)} steps)")
        for c, d in points:
            seeds = [s for s in d["per_seed"] if s in c["per_seed"]]
            ax.plot([c["per_seed"][s] for s in seeds], [d["per_seed"][s] for s in seeds], ".", color=color, ms=5)
    epoch = 250 * entries["openkbp.vs_nnunet.nnunet_own.cpu_seconds_per_iteration"]["mean"]
    ax.axvline(epoch, color="#55a868", ls=":", label="nnU-Net's own recipe: its first epoch ends")
    ax.set_xscale("log")
    ax.set_xlabel("training CPU seconds (process CPU time)")
    ax.set_ylabel("mean Dice, 7 organs, 40 test cases")
    ax.set_title("OpenKBP joint training: Dice against training compute; small dots: seeds")
    ax.legend(fontsize=8, loc="center right")
    fig.tight_layout()
    fig.savefig(FIGURES / "nnunet_budget.png", dpi=100, metadata=meta)
    plt.close(fig)
    out.append(FIGURES / "nnunet_budget.png")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="compare with current.json instead of writing it")
    p.add_argument("--no-figures", action="store_true", help="write current.json only")
    a = p.parse_args(argv)
    entries = build()
    text = json.dumps(entries, indent=1, ensure_ascii=False) + "\n"
    if a.check:
        same = CURRENT.exists() and CURRENT.read_text() == text
        print("current.json is up to date" if same else "current.json differs from the result files: rebuild it")
        return 0 if same else 1
    CURRENT.write_text(text)
    print(f"wrote {CURRENT.relative_to(ROOT)} ({len(entries)} entries)")
    if not a.no_figures:
        for f in figures(entries):
            print(f"wrote {f.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
