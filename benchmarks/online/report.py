"""Tables, summary.json and the running-Dice plot of the online-corrector streams (benchmarks/online/stream.py).

    python benchmarks/online/report.py --streams results/online/streams --settings weak shift strong \\
        weak_every2 weak_below0.8 --out benchmarks/online

Mean Dice of a stream (or of its second half): per class, the mean over the cases that annotate it; then the mean
over classes (as ``cfseg evaluate`` averages). Writes ``<out>/summary.json``, ``<out>/report.md`` and
``<out>/running_dice.png``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def class_mean(cases: list[dict], key: str) -> tuple[float, dict[str, float]]:
    names = sorted({n for c in cases for n in c[key]})
    per = {n: float(np.mean([c[key][n] for c in cases if n in c[key]])) for n in names}
    return (float(np.mean(list(per.values()))) if per else float("nan")), per


def summarise(stream: dict) -> dict:
    cases = stream["cases"]
    half = cases[len(cases) // 2:]
    frozen, frozen_pc = class_mean(cases, "frozen")
    online, online_pc = class_mean(cases, "fused")
    updates = [c["seconds_update"] for c in cases if "seconds_update" in c]
    names = sorted(frozen_pc)
    return {
        "frozen_mean_dice": frozen,
        "online_mean_dice": online,
        "frozen_second_half": class_mean(half, "frozen")[0],
        "online_second_half": class_mean(half, "fused")[0],
        "seconds_per_update": float(np.mean(updates)) if updates else None,
        "seconds_per_fused_segmentation": float(np.mean([c["seconds_fuse"] for c in cases])),
        "n_cases": len(cases),
        "n_feedback": sum(bool(c["feedback"]) for c in cases),
        "feedback": stream["feedback"],
        "per_class": {n: {"frozen": frozen_pc[n], "online": online_pc[n]} for n in names},
        "per_class_second_half": {n: {"frozen": class_mean(half, "frozen")[1].get(n),
                                      "online": class_mean(half, "fused")[1].get(n)} for n in names},
        "alpha": {n: [c["alpha"].get(n, 1.0) for c in cases] for n in names},
        "worst_case_gain": float(min(np.mean(list(c["fused"].values())) - np.mean(list(c["frozen"].values()))
                                     for c in cases if c["frozen"])),
        "worst_class_case_gain": float(min(c["fused"][n] - c["frozen"][n] for c in cases for n in c["frozen"])),
        "min_running_gain": float(np.min(running(cases, "fused") - running(cases, "frozen"))),
        "ckpt": stream["ckpt"], "dataset": stream["dataset"], "splits": stream["splits"],
        "config": stream["config"], "aux_parameters": stream["aux_parameters"], "threads": stream["threads"],
    }


def running(cases: list[dict], key: str) -> np.ndarray:
    per_case = [np.mean(list(c[key].values())) for c in cases]
    return np.cumsum(per_case) / np.arange(1, len(per_case) + 1)


def plot(streams: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(streams)
    cols = min(4, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.0 * rows), squeeze=False, sharey=True)
    for ax in axes.flat[n:]:
        ax.axis("off")
    for ax, (name, s) in zip(axes.flat, streams.items(), strict=False):  # spare panels are off
        x = np.arange(1, len(s["cases"]) + 1)
        ax.plot(x, running(s["cases"], "frozen"), label="frozen", color="0.4")
        ax.plot(x, running(s["cases"], "fused"), label="fused (online)", color="C0")
        fb = [i + 1 for i, c in enumerate(s["cases"]) if c["feedback"]]
        ax.plot(fb, np.full(len(fb), 0.02), "|", color="C1", label="corrected")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("case in stream")
        ax.grid(alpha=0.3)
    for row in axes:
        row[0].set_ylabel("running mean Dice")
    axes[0][0].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def table(summary: dict[str, dict]) -> str:
    lines = ["| setting | feedback | cases corrected | frozen | fused | gain | frozen 2nd half | fused 2nd half | "
             "gain 2nd half | worst case gain | lowest running gain | s / update | s / fused segmentation |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, s in summary.items():
        upd = "-" if s["seconds_per_update"] is None else f"{s['seconds_per_update']:.2f}"
        lines.append(
            f"| {name} | {s['feedback']} | {s['n_feedback']}/{s['n_cases']} | {s['frozen_mean_dice']:.3f} | "
            f"{s['online_mean_dice']:.3f} | {s['online_mean_dice'] - s['frozen_mean_dice']:+.3f} | "
            f"{s['frozen_second_half']:.3f} | {s['online_second_half']:.3f} | "
            f"{s['online_second_half'] - s['frozen_second_half']:+.3f} | {s['worst_case_gain']:+.3f} | "
            f"{s['min_running_gain']:+.3f} | {upd} | "
            f"{s['seconds_per_fused_segmentation']:.2f} |")
    return "\n".join(lines)


def class_table(summary: dict[str, dict], key: str = "per_class") -> str:
    names = sorted({n for s in summary.values() for n in s[key]})
    lines = ["| class | " + " | ".join(summary) + " |", "|---|" + "---:|" * len(summary)]
    for n in names:
        cells = []
        for s in summary.values():
            v = s[key].get(n)
            cells.append("-" if v is None or v["frozen"] is None else f"{v['frozen']:.3f} -> {v['online']:.3f}")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def alpha_table(summary: dict[str, dict]) -> str:
    lines = ["| setting | class | weight of the frozen model at cases 1, 10, 20, 30, 40 |", "|---|---|---|"]
    for name, s in summary.items():
        for n, a in s["alpha"].items():
            marks = [a[i] for i in (0, 9, 19, 29, 39) if i < len(a)]
            lines.append(f"| {name} | {n} | {' / '.join(f'{v:.2f}' for v in marks)} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--streams", default="results/online/streams")
    p.add_argument("--settings", nargs="+", required=True)
    p.add_argument("--out", default="benchmarks/online")
    a = p.parse_args(argv)
    streams = {n: json.loads((Path(a.streams) / f"{n}.json").read_text()) for n in a.settings}
    summary = {n: summarise(s) for n, s in streams.items()}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps({"settings": summary}, indent=1))
    plot(streams, out / "running_dice.png")
    md = ["# Online corrector on OpenKBP streams (generated by benchmarks/online/report.py)", "",
          "Mean Dice: per class over the cases annotating it, then over classes. Gain: fused - frozen. Worst case "
          "gain: the lowest (fused - frozen) of one case's mean Dice; lowest running gain: the lowest difference of "
          "the running means along the stream (the plot). Seconds: one thread, measured while other jobs shared "
          "the 2 cores (see README.md for the timing on idle cores).", "",
          table(summary), "", "## Per class (whole stream): frozen -> fused", "", class_table(summary), "",
          "## Per class (second half)", "", class_table(summary, "per_class_second_half"), "",
          "## Fusion weight along the stream (1: the frozen model alone)", "", alpha_table(summary), "",
          "![running mean Dice](running_dice.png)", ""]
    (out / "report.md").write_text("\n".join(md))
    print(table(summary))


if __name__ == "__main__":
    main()
