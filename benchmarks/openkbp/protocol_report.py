"""Markdown tables and plots of the OpenKBP report from protocol outputs (``summary.json`` of cfseg-protocol).

    python benchmarks/openkbp/protocol_report.py --summary results/openkbp/incremental/summary.json \\
        --out benchmarks/openkbp/incremental --title "class-incremental" [--baseline joint] \\
        [--ablation distill distill_lr1 distill_plop distill_pod] [--strategies ...] [--json]

``--summary`` takes one or more ``summary.json`` files (or protocol output folders holding one) of the same
protocol (same stages); strategies and seeds from several are merged (a seed of a strategy may appear in one only).
Writes into ``--out``:

* ``report.md``: the main table (average Dice after the last stage and BWT, mean +- SD and per seed, the ratio
  to the ``--baseline``'s average Dice, training wall time, steps per stage), computed on the seeds common to the
  compared strategies (extra seeds in their own table); the accuracy matrices (mean over each strategy's seeds,
  and per seed); per-class Dice after the last stage; with ``--ablation``, the ablation table with the
  validation numbers (what settings are chosen on) beside the test numbers, the best on validation marked, and
  the ablation rows' per-class Dice on the validation cases after the last stage, per seed; which
  seeds each strategy ran on;
* ``mean_matrix_<strategy>.png`` (heatmap of the mean matrix) and ``per_class_final.png`` (per-class Dice after
  the last stage, one bar per strategy);
* with ``--json``, ``report.json``: the same numbers.

``--strategies`` picks the strategies of the main and per-class tables (default: all; the baseline always joins
the seed intersection): a strategy run on fewer seeds narrows the common seeds of every row, so leave it out there
and report it in the ablation table. Missing values (None / NaN in summary.json) print as "-" and are left out of
means, which then say so ("(n=k)", "*"); the ratio to the baseline uses only seeds where both have a value.
Needs only matplotlib and numpy (no torch), so the report regenerates in seconds.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shlex
import statistics
import sys
from pathlib import Path
from typing import Any

ORDER = ("distill", "finetune", "joint")  # first in every table, then the others in the summary's order
BEST_MARK = "(best on val)"


# ---------------------------------------------------------------------------------------------------- numbers
def _num(x: Any) -> float | None:
    """A finite float, or None (None, NaN, inf, non-numbers)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    return float(x) if math.isfinite(x) else None


def _mean(values: list[Any]) -> float | None:
    vals = [v for v in map(_num, values) if v is not None]
    return float(statistics.fmean(vals)) if vals else None


def _sd(values: list[Any]) -> float | None:
    vals = [v for v in map(_num, values) if v is not None]
    return float(statistics.stdev(vals)) if len(vals) > 1 else None


def _stat(per_seed: dict[str, Any]) -> dict[str, Any]:
    """``{"mean", "sd", "n" (values present), "per_seed"}`` of ``{seed: value}``."""
    per = {k: _num(v) for k, v in per_seed.items()}
    return {"mean": _mean(list(per.values())), "sd": _sd(list(per.values())),
            "n": sum(v is not None for v in per.values()), "per_seed": per}


def _fmt(x: Any, spec: str = ".3f") -> str:
    x = _num(x)
    return "-" if x is None else format(x, spec)


def _fmt_stat(st: dict[str, Any], spec: str = ".3f") -> str:
    """``mean ± SD`` (SD when more than one value), ``(n=k)`` when some seeds have no value."""
    if st["mean"] is None:
        return "-"
    s = _fmt(st["mean"], spec) + (f" ± {st['sd']:.3f}" if st["sd"] is not None else "")
    return s + (f" (n={st['n']})" if st["n"] < len(st["per_seed"]) else "")


def _fmt_seeds(seeds: list[int]) -> str:
    return ", ".join(map(str, seeds)) if seeds else "none"


# ---------------------------------------------------------------------------------------------------- input
def load_summaries(paths: list[str | Path]) -> dict[str, Any]:
    """Read and merge ``summary.json`` files (write_summary's format) of one protocol.

    Returns:
        ``{"stages", "dice_convention", "sources", "strategies": {name: summary entry}}``; every entry's
        ``seeds`` is rebuilt from its ``per_seed`` (ints, sorted).
    """
    merged: dict[str, Any] = {"stages": None, "dice_convention": None, "sources": [], "strategies": {}}
    for p in paths:
        f = Path(p) / "summary.json" if Path(p).is_dir() else Path(p)
        if not f.is_file():
            raise FileNotFoundError(f"{f}: summary.json not found")
        doc = json.loads(f.read_text())
        strategies = doc.get("strategies") or {}
        if not doc.get("stages") or any("per_seed" not in s for s in strategies.values()):
            raise ValueError(f"{f}: not a summary.json of cfseg.experiments.report.write_summary (no 'stages' or no "
                             "'per_seed'); rebuild it from the seed<N>/<strategy>_matrix.json files with "
                             "write_summary(Path(<protocol output>))")
        if merged["stages"] is None:
            merged["stages"] = list(doc["stages"])
        elif list(doc["stages"]) != merged["stages"]:
            raise ValueError(f"{f}: stages {doc['stages']} differ from {merged['stages']}: one report per protocol")
        merged["dice_convention"] = merged["dice_convention"] or doc.get("dice_convention")
        merged["sources"].append(str(f))
        for name, s in strategies.items():
            if name not in merged["strategies"]:
                merged["strategies"][name] = copy.deepcopy(s)
                continue
            prev = merged["strategies"][name]
            clash = sorted(set(prev["per_seed"]) & set(s["per_seed"]), key=int)
            if clash:
                raise ValueError(f"{f}: {name} seed(s) {clash} appear in more than one summary")
            if prev.get("stage_steps") != s.get("stage_steps"):
                raise ValueError(f"{f}: {name} was run with steps per stage {s.get('stage_steps')} here and "
                                 f"{prev.get('stage_steps')} in another summary")
            prev["per_seed"].update(copy.deepcopy(s["per_seed"]))
    for s in merged["strategies"].values():
        s["per_seed"] = {str(k): s["per_seed"][k] for k in sorted(s["per_seed"], key=int)}
        s["seeds"] = [int(k) for k in s["per_seed"]]
    if not merged["strategies"]:
        raise ValueError(f"{', '.join(map(str, paths))}: no strategies in the summary")
    return merged


def order_names(names: list[str]) -> list[str]:
    """distill, finetune, joint first, then the others in their given order."""
    return [n for n in ORDER if n in names] + [n for n in names if n not in ORDER]


def common_seeds(strategies: dict[str, Any], names: list[str]) -> list[int]:
    sets = [set(strategies[n]["seeds"]) for n in names]
    return sorted(set.intersection(*sets)) if sets else []


# ---------------------------------------------------------------------------------------------------- tables
def _per_seed(s: dict[str, Any], key: str, seeds: list[int]) -> dict[str, Any]:
    return {str(k): s["per_seed"][str(k)].get(key) for k in seeds}


def mean_matrix(matrices: list[list[list[Any]]], n_stages: int) -> tuple[list[list[float | None]], list[list[int]]]:
    """Element-wise mean (missing values left out) of accuracy matrices; row i keeps the longest row i given
    (i + 1 entries for the protocol's lower-triangular matrices).

    Returns:
        (mean matrix, number of values each entry is the mean of).
    """
    n_rows = max((len(R) for R in matrices), default=0)
    means, counts = [], []
    for i in range(min(n_rows, n_stages)):
        width = max(len(R[i]) for R in matrices if len(R) > i)
        cells = [[R[i][j] for R in matrices if len(R) > i and len(R[i]) > j] for j in range(width)]
        means.append([_mean(c) for c in cells])
        counts.append([sum(_num(v) is not None for v in c) for c in cells])
    return means, counts


def _avg_bwt(R: list[list[Any]]) -> tuple[float | None, float | None]:
    """Average of the last row and BWT of a (mean) matrix; None where an entry is missing."""
    if not R:
        return None, None
    last = [_num(v) for v in R[-1]]
    avg = None if not last or None in last else statistics.fmean(last)
    T = len(R) - 1
    if T < 1 or len(last) < T:
        return avg, None
    diffs = [None if last[j] is None or len(R[j]) <= j or _num(R[j][j]) is None else last[j] - R[j][j]
             for j in range(T)]
    return avg, (None if None in diffs else statistics.fmean(diffs))


def _class_rows(strategies: dict[str, Any], names: list[str], stages: list[str]) -> list[tuple[str, str]]:
    """(stage, class) pairs of the last stage's per-class Dice, in stage order then first-seen class order."""
    seen: dict[str, list[str]] = {}
    for n in names:
        for r in strategies[n]["per_seed"].values():
            for st, classes in (r.get("per_class_dice") or {}).items():
                seen.setdefault(st, [])
                seen[st] += [c for c in classes if c not in seen[st]]
    order = [st for st in stages if st in seen] + [st for st in seen if st not in stages]
    return [(st, c) for st in order for c in seen[st]]


def build_report(summary: dict[str, Any], baseline: str = "joint", main: list[str] | None = None,
                 ablation: list[str] | None = None) -> dict[str, Any]:
    """Every number of the report (see the module docstring) as one JSON-ready dict."""
    strategies, stages = summary["strategies"], summary["stages"]
    names = order_names(list(strategies))
    unknown = [n for n in main or [] if n not in strategies]
    if unknown:
        raise ValueError(f"--strategies {unknown} are not in the summary; choose from {names}")
    main_names = order_names(list(main)) if main else names
    compared = main_names + ([baseline] if baseline in strategies and baseline not in main_names else [])
    seeds = common_seeds(strategies, compared)
    T = len(stages) - 1

    rows: dict[str, Any] = {}
    for n in main_names:
        s = strategies[n]
        rows[n] = {"average_dice": _stat(_per_seed(s, "average_dice", seeds)),
                   "bwt": _stat(_per_seed(s, "bwt", seeds)),
                   "wall_time_min": _stat({k: (None if _num(v) is None else v / 60)
                                           for k, v in _per_seed(s, "wall_time_s", seeds).items()}),
                   "stage_steps": s.get("stage_steps"), "stage_lr": s.get("stage_lr"),
                   "base_strategy": s.get("base_strategy"), "seeds": seeds,
                   "ratio_to_baseline": None, "ratio_to_baseline_per_seed": {str(k): None for k in seeds},
                   "ratio_seeds": []}
    if baseline in strategies:
        base = _per_seed(strategies[baseline], "average_dice", seeds)
        for r in rows.values():
            # mean over mean, on the seeds where both have a value (never two different seed sets)
            both = [k for k, v in r["average_dice"]["per_seed"].items() if v is not None and _num(base[k]) is not None]
            m, b = _mean([r["average_dice"]["per_seed"][k] for k in both]), _mean([base[k] for k in both])
            r["ratio_to_baseline"] = m / b if m is not None and b else None
            r["ratio_seeds"] = [int(k) for k in both]
            r["ratio_to_baseline_per_seed"] = {
                k: (v / base[k] if k in both and base[k] else None) for k, v in r["average_dice"]["per_seed"].items()}
    extra = {}
    for n in main_names:
        s = strategies[n]
        more = [k for k in s["seeds"] if k not in seeds]
        if more:
            extra[n] = {"seeds": more, "average_dice": _per_seed(s, "average_dice", more),
                        "bwt": _per_seed(s, "bwt", more), "all_seeds": s["seeds"],
                        "average_dice_all_seeds": _stat(_per_seed(s, "average_dice", s["seeds"])),
                        "bwt_all_seeds": _stat(_per_seed(s, "bwt", s["seeds"]))}

    matrices = {}
    for n in names:
        s = strategies[n]
        per = {str(k): s["per_seed"][str(k)].get("matrix") or [] for k in s["seeds"]}
        R, counts = mean_matrix(list(per.values()), len(stages))
        avg, bwt = _avg_bwt(R)
        matrices[n] = {"seeds": s["seeds"], "mean": R, "mean_counts": counts, "per_seed": per,
                       "average_dice": _stat(_per_seed(s, "average_dice", s["seeds"])),
                       "bwt": _stat(_per_seed(s, "bwt", s["seeds"])),
                       "mean_matrix_average_dice": avg, "mean_matrix_bwt": bwt}

    class_rows = _class_rows(strategies, main_names, stages)
    unique = len({c for _, c in class_rows}) == len(class_rows)
    per_class: dict[str, Any] = {"seeds": seeds, "rows": [], "mean": {}}
    for st, c in class_rows:
        vals, sds, ns = {}, {}, {}
        for n in main_names:
            v = [((strategies[n]["per_seed"][str(k)].get("per_class_dice") or {}).get(st) or {}).get(c)
                 for k in seeds]
            vals[n], sds[n], ns[n] = _mean(v), _sd(v), sum(_num(x) is not None for x in v)
        per_class["rows"].append({"stage": st, "class": c, "label": c if unique else f"{c} ({st})",
                                  "mean": vals, "sd": sds, "n": ns})
    for n in main_names:
        v = [r["mean"][n] for r in per_class["rows"]]
        per_class["mean"][n] = {"mean": _mean(v), "n_classes": sum(x is not None for x in v), "of": len(v)}

    abl = None
    if ablation:
        present = [n for n in ablation if n in strategies]
        a_seeds = common_seeds(strategies, present)
        a_rows = {}
        for n in present:
            s = strategies[n]
            a_rows[n] = {k: _stat(_per_seed(s, k, a_seeds))
                         for k in ("average_dice_val", "bwt_val", "average_dice", "bwt")}
            more = [k for k in s["seeds"] if k not in a_seeds]
            a_rows[n]["extra_seeds"] = {str(k): {key: _num(s["per_seed"][str(k)].get(key)) for key in
                                                 ("average_dice_val", "bwt_val", "average_dice", "bwt")}
                                        for k in more}
        # chosen on validation only: the highest mean average Dice on the validation cases, all common seeds scored
        scored = [n for n in present if a_rows[n]["average_dice_val"]["mean"] is not None
                  and a_rows[n]["average_dice_val"]["n"] == len(a_seeds)]
        best = max(scored, key=lambda n: a_rows[n]["average_dice_val"]["mean"]) if scored else None
        abl = {"names": present, "missing": [n for n in ablation if n not in strategies], "seeds": a_seeds,
               "rows": a_rows, "best_on_val": best,
               "not_chosen_from": [n for n in present if n not in scored],
               "per_class_val": _per_class_val(strategies, present, a_seeds)}

    return {"stages": stages, "last_stage": T, "dice_convention": summary.get("dice_convention"),
            "sources": summary.get("sources", []), "baseline": baseline if baseline in strategies else None,
            "baseline_requested": baseline, "strategy_seeds": {n: strategies[n]["seeds"] for n in names},
            "main": {"strategies": main_names, "seeds": seeds, "rows": rows, "extra_seeds": extra},
            "matrices": matrices, "per_class": per_class, "ablation": abl}


def _per_class_val(strategies: dict[str, Any], names: list[str], seeds: list[int]) -> dict[str, Any] | None:
    """Per-class Dice on the validation cases after the last stage, per seed, of the ablation rows (from the
    summaries' ``per_class_dice_val``; None where no row has it)."""
    cols: list[tuple[str, str]] = []
    for n in names:
        for k in seeds:
            for st, classes in (strategies[n]["per_seed"][str(k)].get("per_class_dice_val") or {}).items():
                cols += [(st, c) for c, v in classes.items() if v is not None and (st, c) not in cols]
    if not cols:
        return None
    unique = len({c for _, c in cols}) == len(cols)
    rows = {n: [[_num(((strategies[n]["per_seed"][str(k)].get("per_class_dice_val") or {}).get(st) or {}).get(c))
                 for k in seeds] for st, c in cols] for n in names}
    return {"columns": [c if unique else f"{c} ({st})" for st, c in cols], "seeds": seeds, "rows": rows}


# ---------------------------------------------------------------------------------------------------- markdown
def _table(header: list[str], align: list[str], lines: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    return out + ["| " + " | ".join(cells) + " |" for cells in lines]


def _row_cells(row: list[Any], bwt: bool = False) -> str:
    return ", ".join(_fmt(v, "+.3f" if bwt else ".3f") for v in row)


def render_markdown(rep: dict[str, Any], title: str, command: str) -> str:
    stages, T, main = rep["stages"], rep["last_stage"], rep["main"]
    seeds, base = main["seeds"], rep["baseline"]
    classes_of: dict[str, list[str]] = {}
    for r in rep["per_class"]["rows"]:
        classes_of.setdefault(r["stage"], []).append(r["class"])
    md = [f"# Protocol report: {title}", "",
          f"Generated by `{command}` from {', '.join(f'`{s}`' for s in rep['sources'])}; every number below "
          "comes from that summary (the matrices' and summary's per-seed values).", "",
          "Stages: " + "; ".join(f"{i} `{st}`" + (f" ({', '.join(classes_of[st])})" if st in classes_of else "")
                                 for i, st in enumerate(stages)) + ".", ""]
    if rep.get("dice_convention"):
        md += [f"Dice: {rep['dice_convention']}.", ""]

    # seeds note
    sets = {tuple(v) for v in rep["strategy_seeds"].values()}
    md += ["## Seeds", ""]
    if len(sets) == 1:
        md.append(f"Every strategy ran on seeds {_fmt_seeds(list(next(iter(sets))))}.")
    else:
        md.append("**Strategies ran on different seed sets**: "
                  + "; ".join(f"{n}: {_fmt_seeds(s)}" for n, s in rep["strategy_seeds"].items()) + ".")
    md += ["", f"The main and per-class tables compare on seeds {_fmt_seeds(seeds)}, the seeds common to the "
           f"strategies compared there ({', '.join(main['strategies'])}"
           + (f" and the baseline {base}" if base and base not in main["strategies"] else "") + "); "
           + ("other seeds are listed under *Extra seeds*, never averaged into the comparison. "
              if main["extra_seeds"] else "")
           + "The mean matrices average each strategy over all the seeds it ran (their seeds column).", ""]

    # main table
    per = f"per seed ({_fmt_seeds(seeds)})"
    ratio_h = f"/ {base}" if base else f"/ {rep['baseline_requested']}"
    md += [f"## Average Dice after stage {T} and backward transfer", ""]
    lines = []
    for n, r in main["rows"].items():
        lines.append([n, _fmt_stat(r["average_dice"]), _row_cells(list(r["average_dice"]["per_seed"].values())),
                      _fmt_stat(r["bwt"], "+.3f"), _row_cells(list(r["bwt"]["per_seed"].values()), bwt=True),
                      _fmt(r["ratio_to_baseline"], ".2f") + (f" (seeds {_fmt_seeds(r['ratio_seeds'])})" if
                                                             len(r["ratio_seeds"]) < len(seeds) else ""),
                      _fmt(r["wall_time_min"]["mean"], ".1f"),
                      "/".join(map(str, r["stage_steps"] or [])) or "-", _fmt_seeds(r["seeds"])])
    md += _table(["strategy", f"avg Dice after stage {T}", per, "BWT", per, ratio_h, "train wall (min)",
                  "steps per stage", "seeds"], ["---", "---:", "---", "---:", "---", "---:", "---:", "---", "---"],
                 lines)
    md += ["", f"Average Dice: mean of the last matrix row (every stage's test cases after stage {T}); "
           "BWT = mean over j < T of (R[T][j] - R[j][j]); mean ± SD over the seeds (SD with more than one). "
           + (f"{ratio_h}: the strategy's mean average Dice over the baseline's ({base}), same seeds. " if base else
              f"No ratio: the baseline {rep['baseline_requested']} is not in the summary. ")
           + "Train wall: training time incl. stage 0, mean over the seeds, in minutes.", ""]
    if main["extra_seeds"]:
        md += ["### Extra seeds (not in the comparison above)", ""]
        lines = [[n, _fmt_seeds(e["seeds"]), _row_cells(list(e["average_dice"].values())),
                  _row_cells(list(e["bwt"].values()), bwt=True),
                  f"{_fmt_stat(e['average_dice_all_seeds'])} (seeds {_fmt_seeds(e['all_seeds'])})",
                  _fmt_stat(e["bwt_all_seeds"], "+.3f")]
                 for n, e in main["extra_seeds"].items()]
        md += _table(["strategy", "extra seeds", "avg Dice", "BWT", "avg Dice, all its seeds", "BWT, all its seeds"],
                     ["---", "---", "---", "---", "---:", "---:"], lines) + [""]

    # matrices
    after = [f"after stage {i}" for i in range(len(stages))]
    md += ["## Accuracy matrices", "",
           "R[i][j] = mean Dice on stage j's test cases after stage i (cell of column *after stage i*: "
           "R[i][0], ..., R[i][i]).", "", "Mean over the seeds each strategy ran:", ""]
    lines, fewer = [], False
    for n, m in rep["matrices"].items():
        cells = []
        for i in range(len(stages)):
            if i >= len(m["mean"]):
                cells.append("-")
                continue
            short = [m["mean"][i][j] is not None and m["mean_counts"][i][j] < len(m["seeds"])
                     for j in range(len(m["mean"][i]))]
            fewer = fewer or any(short)
            cells.append(", ".join(_fmt(v) + ("*" if sh else "") for v, sh in zip(m["mean"][i], short, strict=True)))
        lines.append([n, _fmt_seeds(m["seeds"]), *cells, _fmt_stat(m["average_dice"]), _fmt_stat(m["bwt"], "+.3f")])
    md += _table(["strategy", "seeds", *after, f"avg Dice after stage {T}", "BWT"],
                 ["---", "---", *["---"] * len(stages), "---:", "---:"], lines) + [""]
    if fewer:
        md += ["\\* mean over fewer seeds than the row's (the others have no value there).", ""]
    md += [" ".join(f"![{n}](mean_matrix_{n}.png)" for n in rep["matrices"]), ""]
    all_seeds = sorted({k for m in rep["matrices"].values() for k in m["seeds"]})
    for k in all_seeds:
        md += [f"Seed {k}:", ""]
        lines = []
        for n, m in rep["matrices"].items():
            if str(k) not in m["per_seed"]:
                continue
            R = m["per_seed"][str(k)]
            cells = [_row_cells(R[i]) if i < len(R) else "-" for i in range(len(stages))]
            lines.append([n, *cells, _fmt(m["average_dice"]["per_seed"][str(k)]),
                          _fmt(m["bwt"]["per_seed"][str(k)], "+.3f")])
        md += _table(["strategy", *after, f"avg Dice after stage {T}", "BWT"],
                     ["---", *["---"] * len(stages), "---:", "---:"], lines) + [""]

    # per class
    pc = rep["per_class"]
    names = main["strategies"]
    md += [f"## Per-class Dice after stage {T}", "",
           f"Mean over seeds {_fmt_seeds(pc['seeds'])}, test cases, each class scored on the cases annotating it.", ""]
    lines = [[r["label"], *[_fmt(r["mean"][n]) + ("*" if r["mean"][n] is not None and r["n"][n] < len(pc["seeds"])
                                                 else "") for n in names]] for r in pc["rows"]]
    fewer = any(r["mean"][n] is not None and r["n"][n] < len(pc["seeds"]) for r in pc["rows"] for n in names)
    mean_cells = []
    for n in names:
        m = pc["mean"][n]
        cell = f"**{_fmt(m['mean'])}**"
        mean_cells.append(cell + (f" ({m['n_classes']} of {m['of']})" if m["n_classes"] < m["of"] else ""))
    lines.append(["**mean**", *mean_cells])
    md += _table(["class", *names], ["---", *["---:"] * len(names)], lines)
    md += ["\\* mean over fewer seeds (the others have no value there)."] if fewer else []
    md += ["", "(The class mean weights every class alike; the matrix average weights every stage alike. "
           "A class without a value is left out of its column's mean, which then says over how many.)", "",
           f"![per-class Dice after stage {T}](per_class_final.png)", ""]

    # ablation
    abl = rep["ablation"]
    if abl:
        md += ["## Ablation (settings chosen on the validation cases)", "",
               f"Seeds {_fmt_seeds(abl['seeds'])} (common to the rows). *val*: the stages' validation cases "
               "(R_val: average Dice after the last stage, BWT), the numbers a setting is chosen on; *test*: the "
               f"test cases, reported, never used for the choice. {BEST_MARK}: the highest mean average Dice on "
               "validation.", ""]
        lines = []
        for n in abl["names"]:
            r = abl["rows"][n]
            for k in abl["seeds"]:
                lines.append([n, str(k), *[_fmt(r[key]["per_seed"][str(k)], "+.3f" if "bwt" in key else ".3f")
                                           for key in ("average_dice_val", "bwt_val", "average_dice", "bwt")]])
            label = f"**{n}** {BEST_MARK}" if n == abl["best_on_val"] else f"**{n}**"
            lines.append([label, "mean", *[_fmt_stat(r[key], "+.3f" if "bwt" in key else ".3f")
                                           for key in ("average_dice_val", "bwt_val", "average_dice", "bwt")]])
            for k, v in r["extra_seeds"].items():
                lines.append([n, f"{k} (extra, not in the mean)",
                              *[_fmt(v[key], "+.3f" if "bwt" in key else ".3f")
                                for key in ("average_dice_val", "bwt_val", "average_dice", "bwt")]])
        md += _table(["setting", "seed", "avg Dice (val)", "BWT (val)", "avg Dice (test)", "BWT (test)"],
                     ["---", "---", "---:", "---:", "---:", "---:"], lines) + [""]
        if abl["best_on_val"]:
            b = abl["rows"][abl["best_on_val"]]
            md.append(f"Chosen on validation: {abl['best_on_val']} (validation {_fmt(b['average_dice_val']['mean'])}"
                      f", test {_fmt(b['average_dice']['mean'])}).")
        else:
            md.append("No setting chosen: no row has validation numbers for every seed.")
        if abl["not_chosen_from"]:
            md.append("Without validation numbers for every seed (not candidates): "
                      f"{', '.join(abl['not_chosen_from'])}.")
        if abl["missing"]:
            md.append(f"Not in the summary (not run yet): {', '.join(abl['missing'])}.")
        md.append("")
        pcv = abl["per_class_val"]
        if pcv:
            seeds_txt = " / ".join(map(str, pcv["seeds"]))
            md += [f"Per-class Dice after stage {T} on the validation cases, seeds {seeds_txt}:", ""]
            md += _table(["setting", *pcv["columns"]], ["---", *["---:"] * len(pcv["columns"])],
                         [[n, *[" / ".join(_fmt(v) for v in cell) for cell in pcv["rows"][n]]] for n in abl["names"]])
            md.append("")
    return "\n".join(md)


# ---------------------------------------------------------------------------------------------------- plots
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_mean_matrices(rep: dict[str, Any], out: Path, title: str) -> list[Path]:
    """``mean_matrix_<strategy>.png``: heatmap of the mean matrix, cells annotated with mean (and SD over seeds).

    Matplotlib only (no cfseg/torch import), so the report regenerates in seconds.
    """
    import numpy as np

    plt = _pyplot()
    names, paths = rep["stages"], []
    n = len(names)
    for strategy, m in rep["matrices"].items():
        M = np.full((n, n), np.nan)
        for i, row in enumerate(m["mean"][:n]):
            M[i, : len(row)] = [np.nan if v is None else v for v in row[:n]]
        fig, ax = plt.subplots(figsize=(1.6 * n + 1.5, 1.4 * n + 1))
        im = ax.imshow(M, vmin=0, vmax=1, cmap="viridis")
        for i in range(n):
            for j in range(n):
                if np.isnan(M[i, j]):
                    continue
                sd = _sd([R[i][j] for R in m["per_seed"].values() if len(R) > i and len(R[i]) > j])
                ax.text(j, i, f"{M[i, j]:.2f}" + (f"\n±{sd:.2f}" if sd is not None else ""), ha="center",
                        va="center", color="w" if M[i, j] < 0.6 else "k", fontsize=9)
        ax.set_xticks(range(n), [f"test {x}" for x in names], rotation=20, ha="right")
        ax.set_yticks(range(n), [f"after {x}" for x in names])
        ax.set_title(f"{title}: {strategy}, mean over seeds {_fmt_seeds(m['seeds'])}\navg Dice "
                     f"{_fmt(m['average_dice']['mean'])}, BWT {_fmt(m['bwt']['mean'], '+.3f')}", fontsize=10)
        fig.colorbar(im, ax=ax, fraction=0.046, label="Dice")
        path = out / f"mean_matrix_{strategy}.png"
        fig.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(fig)
        paths.append(path)
    return paths


def plot_per_class(rep: dict[str, Any], out: Path, title: str) -> Path:
    import numpy as np

    plt = _pyplot()
    pc, names = rep["per_class"], rep["main"]["strategies"]
    labels = [r["label"] for r in pc["rows"]]
    x = np.arange(len(labels))
    w = 0.8 / max(len(names), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(labels) + 2), 4))
    for i, n in enumerate(names):
        vals = [math.nan if r["mean"][n] is None else r["mean"][n] for r in pc["rows"]]
        err = [0.0 if r["sd"][n] is None else r["sd"][n] for r in pc["rows"]] if len(pc["seeds"]) > 1 else None
        ax.bar(x + i * w, vals, w, yerr=err, capsize=2, label=n)
    ax.set_xticks(x + w * (len(names) - 1) / 2, labels, rotation=20, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("Dice (test, annotated cases)")
    ax.legend(fontsize=8)
    ax.set_title(f"{title}: per-class Dice after stage {rep['last_stage']}, mean over seeds "
                 f"{_fmt_seeds(pc['seeds'])}" + (" (error bars: SD)" if len(pc["seeds"]) > 1 else ""))
    path = out / "per_class_final.png"
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--summary", nargs="+", required=True,
                   help="summary.json file(s) of cfseg-protocol, or protocol output folder(s) holding one")
    p.add_argument("--out", type=Path, required=True, help="folder for report.md, the PNGs and report.json")
    p.add_argument("--title", default="protocol", help="report heading and plot titles")
    p.add_argument("--baseline", default="joint", help="strategy the average Dice ratio is taken to")
    p.add_argument("--strategies", nargs="+", default=None,
                   help="strategies of the main and per-class tables (default: all); their common seeds are used")
    p.add_argument("--ablation", nargs="+", default=None, help="strategies of the ablation table")
    p.add_argument("--json", action="store_true", help="also write report.json")
    a = p.parse_args(argv)
    summary = load_summaries(a.summary)
    rep = build_report(summary, a.baseline, a.strategies, a.ablation)
    command = shlex.join(["python", "benchmarks/openkbp/protocol_report.py", *argv])
    rep["command"] = command
    a.out.mkdir(parents=True, exist_ok=True)
    written = [a.out / "report.md"]
    (a.out / "report.md").write_text(render_markdown(rep, a.title, command))
    written += plot_mean_matrices(rep, a.out, a.title)
    written.append(plot_per_class(rep, a.out, a.title))
    if a.json:
        (a.out / "report.json").write_text(json.dumps(rep, indent=2, allow_nan=False))
        written.append(a.out / "report.json")
    union = sorted({k for n in rep["main"]["strategies"] for k in rep["strategy_seeds"][n]})
    if rep["main"]["seeds"] != union:
        print(f"note: the main table compares on seeds {rep['main']['seeds']} (common to {rep['main']['strategies']});"
              f" seeds {[k for k in union if k not in rep['main']['seeds']]} are in the extra-seeds table. "
              "--strategies picks the strategies compared", file=sys.stderr)
    if rep["ablation"] and rep["ablation"]["missing"]:
        print(f"warning: --ablation {rep['ablation']['missing']} not in the summary", file=sys.stderr)
    print("wrote " + ", ".join(map(str, written)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
