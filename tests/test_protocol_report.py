"""benchmarks/openkbp/protocol_report.py: report tables, plots and JSON from a protocol summary.json."""

import importlib.util
import json
import statistics
from pathlib import Path

import pytest

from cfseg.experiments.report import nan_to_none, write_summary
from cfseg.metrics import DICE_CONVENTION, average_after_last, backward_transfer

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "openkbp" / "protocol_report.py"
STAGES = ["s0", "s1", "s2"]
NAN = float("nan")


def load_script():
    spec = importlib.util.spec_from_file_location("protocol_report", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# last matrix rows per (strategy, seed): test and validation; distill_plop is best on validation, distill on test
LAST = {
    "distill": {0: ([0.30, 0.40, 0.50], [0.30, 0.40, 0.50]), 1: ([0.34, 0.40, 0.50], [0.30, 0.40, 0.46])},
    "finetune": {0: ([0.05, 0.05, 0.55], [0.05, 0.05, 0.50]), 1: ([0.05, 0.06, 0.55], [0.04, 0.05, 0.50])},
    "joint": {0: ([0.35, 0.30, 0.20], [0.30, 0.30, 0.20]), 1: ([0.35, 0.30, 0.24], [0.30, 0.30, 0.20])},
    "distill_plop": {0: ([0.25, 0.35, 0.45], [0.40, 0.45, 0.55]), 1: ([0.25, 0.35, 0.46], [0.40, 0.45, 0.54])},
    "distill_pod": {0: ([0.20, 0.30, 0.40], [0.10, 0.20, 0.30])},  # seed 0 only
}


def fake_result(name: str, seed: int) -> dict:
    """One ``seed<N>/<name>_matrix.json`` as cfseg.apps.protocol.run_seed writes it (score_val: true)."""
    last, last_val = LAST[name][seed]
    R = [[0.6 + 0.01 * seed], [0.4, 0.7], last]
    R_val = [[0.55], [0.35, 0.65], last_val]
    per_class = {"s0": {"a": last[0] - 0.05, "b": last[0] + 0.05}, "s1": {"c": last[1]},
                 "s2": {"d": last[2], "e": NAN if name == "finetune" else last[2]}}  # finetune: e never scored
    base = "joint" if name == "joint" else ("finetune" if name == "finetune" else "distill")
    steps = [40, 60, 80] if name == "joint" else [40, 20, 20]
    return {"strategy": name, "base_strategy": base, "seed": seed, "stages": STAGES, "R": R,
            "average_dice": average_after_last(R), "bwt": backward_transfer(R), "per_class_dice": per_class,
            "stage_steps": steps, "stage_lr": [2e-3, 1e-3, 1e-3], "fit_args": [],
            "wall_time_s": 600.0 + 60 * seed + 10 * len(name), "eval_time_s": 5.0, "dice_convention": DICE_CONVENTION,
            "R_val": R_val, "average_dice_val": average_after_last(R_val), "bwt_val": backward_transfer(R_val),
            "per_class_dice_val": {"s0": {"a": last_val[0], "b": last_val[0]}, "s1": {"c": last_val[1]},
                                   "s2": {"d": last_val[2], "e": NAN}}}


@pytest.fixture(scope="module")
def summary_path(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("protocol_out")
    for name, seeds in LAST.items():
        for seed in seeds:
            d = out / f"seed{seed}"
            d.mkdir(exist_ok=True)
            (d / f"{name}_matrix.json").write_text(json.dumps(nan_to_none(fake_result(name, seed)), indent=2))
    write_summary(out)
    return out / "summary.json"


def md_table_row(md: str, first_cell: str) -> list[str]:
    return next([c.strip() for c in line.strip("|").split("|")] for line in md.splitlines()
                if line.startswith(f"| {first_cell} |"))


def test_report_numbers_plots_and_validation_choice(summary_path, tmp_path):
    mod = load_script()
    out = tmp_path / "report"
    compared = ["distill", "finetune", "joint", "distill_plop"]
    assert mod.main(["--summary", str(summary_path), "--out", str(out), "--title", "fake",
                     "--strategies", *compared, "--ablation", "distill", "distill_plop", "--json"]) == 0
    rep = json.loads((out / "report.json").read_text())
    md = (out / "report.md").read_text()
    summary = json.loads(summary_path.read_text())

    main = rep["main"]
    assert main["seeds"] == [0, 1] and list(main["rows"]) == compared  # distill_pod (seed 0 only) not compared
    for name in compared:
        for key in ("average_dice", "bwt"):
            st = main["rows"][name][key]
            own = [fake_result(name, s)[key] for s in (0, 1)]
            assert list(st["per_seed"].values()) == pytest.approx(own)
            assert st["mean"] == pytest.approx(statistics.fmean(own))
            assert st["mean"] == pytest.approx(summary["strategies"][name][key])
            assert st["sd"] == pytest.approx(statistics.stdev(own))
        wall = [fake_result(name, s)["wall_time_s"] / 60 for s in (0, 1)]
        assert main["rows"][name]["wall_time_min"]["mean"] == pytest.approx(statistics.fmean(wall))
    joint = statistics.fmean(fake_result("joint", s)["average_dice"] for s in (0, 1))
    distill = statistics.fmean(fake_result("distill", s)["average_dice"] for s in (0, 1))
    assert main["rows"]["distill"]["ratio_to_baseline"] == pytest.approx(distill / joint)
    assert main["rows"]["joint"]["ratio_to_baseline"] == pytest.approx(1.0)
    row = md_table_row(md, "distill")
    assert row[1] == f"{distill:.3f} ± {main['rows']['distill']['average_dice']['sd']:.3f}"
    assert row[5] == f"{distill / joint:.2f}" and row[7] == "40/20/20" and row[8] == "0, 1"
    assert md_table_row(md, "joint")[7] == "40/60/80"

    # mean matrices: lower-triangular, element-wise mean over the strategy's seeds
    R = rep["matrices"]["distill"]["mean"]
    assert [len(r) for r in R] == [1, 2, 3]
    assert R[0][0] == pytest.approx(0.605) and R[2][0] == pytest.approx(0.32)
    assert rep["matrices"]["distill_pod"]["seeds"] == [0]
    assert "0.605 | 0.400, 0.700 | 0.320, 0.400, 0.500" in md

    # per class: finetune's class e has no value -> "-" and its mean is over the other 4 classes
    header = md_table_row(md, "class")
    e_row = md_table_row(md, "e")
    assert e_row[header.index("finetune")] == "-" and e_row[header.index("distill")] == "0.500"
    assert rep["per_class"]["rows"][-1]["mean"]["finetune"] is None
    assert rep["per_class"]["mean"]["finetune"]["n_classes"] == 4
    assert "(4 of 5)" in md_table_row(md, "**mean**")[header.index("finetune")]

    # ablation: chosen on validation (distill_plop), although distill is higher on the test cases
    abl = rep["ablation"]
    assert abl["seeds"] == [0, 1]
    assert abl["rows"]["distill"]["average_dice"]["mean"] > abl["rows"]["distill_plop"]["average_dice"]["mean"]
    assert abl["rows"]["distill_plop"]["average_dice_val"]["mean"] > abl["rows"]["distill"]["average_dice_val"]["mean"]
    assert abl["best_on_val"] == "distill_plop"
    marked = [line for line in md.splitlines() if mod.BEST_MARK in line and line.startswith("|")]
    assert len(marked) == 1 and "distill_plop" in marked[0] and "| mean |" in marked[0]
    val = statistics.fmean(fake_result("distill_plop", s)["average_dice_val"] for s in (0, 1))
    assert abl["rows"]["distill_plop"]["average_dice_val"]["mean"] == pytest.approx(val)

    # seeds note and plots
    assert "different seed sets" in md and "distill_pod: 0" in md
    for name in LAST:
        assert (out / f"mean_matrix_{name}.png").stat().st_size > 5000
    assert (out / "per_class_final.png").stat().st_size > 5000
    assert "NaN" not in (out / "report.json").read_text()  # strict JSON: missing values are null


def test_report_lists_the_ablation_rows_per_class_validation_dice_per_seed(summary_path, tmp_path):
    """What the esophagus-on-validation figures in the READMEs are read from: one row per setting, seeds joined."""
    mod = load_script()
    out = tmp_path / "report"
    assert mod.main(["--summary", str(summary_path), "--out", str(out), "--ablation", "distill", "distill_plop",
                     "--json"]) == 0
    pcv = json.loads((out / "report.json").read_text())["ablation"]["per_class_val"]
    assert pcv["columns"] == ["a", "b", "c", "d"]  # e has no validation value in any row: no column
    assert pcv["rows"]["distill"][3] == [LAST["distill"][s][1][2] for s in (0, 1)]
    md = (out / "report.md").read_text().split("on the validation cases, seeds 0 / 1:")[1]
    assert md_table_row(md, "distill_plop")[1:] == ["0.400 / 0.400", "0.400 / 0.400", "0.450 / 0.450",
                                                    "0.550 / 0.540"]


def test_report_compares_on_common_seeds_only(summary_path, tmp_path):
    """With a strategy run on seed 0 only, the comparison uses seed 0; seed 1 goes to the extra-seeds table."""
    mod = load_script()
    out = tmp_path / "report"
    mod.main(["--summary", str(summary_path.parent), "--out", str(out), "--ablation", "distill", "distill_pod",
              "not_run", "--json"])
    rep = json.loads((out / "report.json").read_text())
    md = (out / "report.md").read_text()
    assert rep["main"]["seeds"] == [0] and list(rep["main"]["rows"])[:3] == ["distill", "finetune", "joint"]
    assert rep["main"]["rows"]["distill"]["average_dice"]["mean"] == pytest.approx(fake_result("distill", 0)
                                                                                    ["average_dice"])
    assert rep["main"]["extra_seeds"]["distill"]["seeds"] == [1] and "distill_pod" not in rep["main"]["extra_seeds"]
    assert "Extra seeds" in md and "compare on seeds 0," in md
    assert rep["ablation"]["seeds"] == [0] and rep["ablation"]["missing"] == ["not_run"]
    assert rep["ablation"]["rows"]["distill"]["extra_seeds"].keys() == {"1"}
    assert rep["ablation"]["best_on_val"] == "distill"  # seed 0: distill 0.400 on val, distill_pod 0.200


def test_merge_summaries_missing_values_and_repeated_classes(summary_path, tmp_path):
    """Two summaries of one protocol merge by seed; a missing value is left out (and said so), never mixed into a
    ratio over other seeds; the same class in two stages (domain-incremental) gets one row per stage."""
    mod = load_script()
    doc = json.loads(summary_path.read_text())
    first, second = json.loads(json.dumps(doc)), json.loads(json.dumps(doc))
    for name in doc["strategies"]:
        first["strategies"][name]["per_seed"].pop("1", None)
        second["strategies"][name]["per_seed"] = {k: v for k, v in doc["strategies"][name]["per_seed"].items()
                                                  if k == "1"}
        for r in first["strategies"][name]["per_seed"].values():
            r["per_class_dice"]["s1"]["a"] = 0.5  # class a scored in stage s0 and in stage s1
    second["strategies"] = {k: v for k, v in second["strategies"].items() if v["per_seed"]}
    second["strategies"]["distill"]["per_seed"]["1"]["average_dice"] = None
    second["strategies"]["distill"]["per_seed"]["1"]["matrix"][2][0] = None
    paths = [tmp_path / "a.json", tmp_path / "b.json"]
    for p, d in zip(paths, (first, second), strict=True):
        p.write_text(json.dumps(d))
    merged = mod.load_summaries(paths)
    assert merged["strategies"]["distill"]["seeds"] == [0, 1] and merged["strategies"]["distill_pod"]["seeds"] == [0]
    with pytest.raises(ValueError, match="more than one summary"):
        mod.load_summaries([paths[0], paths[0]])
    rep = mod.build_report(merged, "joint", ["distill", "joint"])
    md = mod.render_markdown(rep, "merged", "cmd")
    row = rep["main"]["rows"]["distill"]
    assert row["average_dice"]["n"] == 1 and row["ratio_seeds"] == [0]
    assert row["ratio_to_baseline"] == pytest.approx(fake_result("distill", 0)["average_dice"]
                                                     / fake_result("joint", 0)["average_dice"])
    assert md_table_row(md, "distill")[1] == "0.400 (n=1)" and md_table_row(md, "distill")[2] == "0.400, -"
    assert rep["matrices"]["distill"]["mean"][2][0] == pytest.approx(0.30)  # seed 0's value only, marked
    assert "0.300*, 0.400, 0.500" in md and "| -, 0.400, 0.500 |" in md
    assert [r["label"] for r in rep["per_class"]["rows"]][:4] == ["a (s0)", "b (s0)", "c (s1)", "a (s1)"]
    assert md_table_row(md, "a (s1)")[1] == "0.500*"  # seed 1 has no class a in s1
