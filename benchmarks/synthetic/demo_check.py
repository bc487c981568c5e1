"""What limits ``make demo``'s held-out Dice: its configuration, or the phantoms themselves?

``make demo`` trains on two partially annotated CT sites and reports Dice on the 8 fully annotated cases of a third
site (``test_ct``). Two more sites of that third scanner make the question answerable without touching those cases:

* ``sites`` writes the **validation site** (the held-out scanner's settings at run seed 1: 8 other fully
  annotated cases; demo settings are chosen on it, never on the test cases) and the **oracle site** (the same
  scanner, fully annotated, 40 cases at run seed 2). A model trained on the oracle site with the demo's network and
  budget is an upper reference: ideal labels from the very scanner it is scored on.
* ``score`` scores checkpoints on the validation site and the held-out test site and writes a table
  (``<out>.md`` / ``<out>.json``).

Commands (the results: reports/README.md, section 1):

    python benchmarks/synthetic/demo_check.py sites --out data/demo_check [--train-cases 40]
    python benchmarks/synthetic/demo_check.py score --run demo=results/demo/cfseg-demo.ckpt \
        --val data/demo_check/Dataset061_val_ct --test data/synthetic/Dataset003_test_ct \
        --out reports/data/synthetic/demo_check
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from cfseg.data.synthetic import PRESET_FIRST_ID, PRESETS, site_for_run, write_nnunet_dataset

#: dataset ids of the two sites (outside every preset's range)
VAL_ID, ORACLE_ID = 61, 62


def held_out_site():
    """The ``demo`` preset's fully annotated held-out site (``test_ct``, its last site: ``cfseg-demo`` tests on it)."""
    return PRESETS["demo"][-1]


def write_sites(out: Path, n_oracle: int = 40, shape: tuple[int, int, int] | None = None) -> tuple[Path, Path]:
    """Write the validation site (run seed 1) and the oracle site (run seed 2) of the held-out scanner.

    The held-out test cases are the same site at run seed 0 (``make demo``), so neither site shares a case with them.
    Returns (validation folder, oracle folder).
    """
    site = held_out_site()
    val = site_for_run(replace(site, name="val_ct"), seed=1, shape=shape)
    oracle = site_for_run(replace(site, name="oracle_ct", n_cases=n_oracle), seed=2, shape=shape)
    return (write_nnunet_dataset(out, val, VAL_ID, overwrite=True),
            write_nnunet_dataset(out, oracle, ORACLE_ID, overwrite=True))


def write_more_training_cases(out: Path, n_cases: int, shape: tuple[int, int, int] | None = None) -> list[Path]:
    """The ``demo`` preset (run seed 0) with ``n_cases`` per training site; ``cfseg-demo --data <out>`` trains on it.

    A site's case ``i`` depends only on the site's seed and ``i``, so the first 20 cases are ``make demo``'s own and
    the held-out site is unchanged. Returns the three dataset folders in preset order.
    """
    sites = PRESETS["demo"]
    wider = [replace(s, n_cases=n_cases) for s in sites[:-1]] + [sites[-1]]
    first = PRESET_FIRST_ID["demo"]  # make_datasets' ids, so the folder names are make demo's
    return [write_nnunet_dataset(out, site_for_run(s, 0, shape), first + k, overwrite=True)
            for k, s in enumerate(wider)]


def score(runs: dict[str, Path], val: Path, test: Path) -> dict[str, dict]:
    """Per-class and mean Dice of each checkpoint on every case of the validation and the test site."""
    import torch

    from cfseg.data.datamodule import DatasetConfig
    from cfseg.evaluation import evaluate_datasets
    from cfseg.module import load_checkpoint

    out = {}
    for name, ckpt in runs.items():
        module = load_checkpoint(str(ckpt))
        steps = torch.load(ckpt, map_location="cpu", weights_only=True).get("global_step")
        out[name] = {"checkpoint": str(ckpt), "steps": steps}
        for split, root in (("val", val), ("test", test)):
            r = evaluate_datasets(module, [DatasetConfig(str(root))], split="all")
            out[name][split] = {"mean_dice": r["mean_dice"], "per_class_dice": r["per_class_dice"],
                                "n_cases": r["n_cases"]}
    return out


def table(results: dict[str, dict]) -> str:
    """Markdown: one row per run, validation and test mean Dice, then test Dice per class."""
    classes = list(next(iter(results.values()))["test"]["per_class_dice"])
    head = "| run | steps | val | test | " + " | ".join(classes) + " |"
    rows = [head, "|---|" + "---:|" * (len(classes) + 3)]
    for name, r in results.items():
        cells = [str(r["steps"]), f"{r['val']['mean_dice']:.3f}", f"{r['test']['mean_dice']:.3f}",
                 *(f"{r['test']['per_class_dice'].get(c, float('nan')):.2f}" for c in classes)]
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> dict | tuple[Path, Path]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("sites", help="write the validation and oracle sites")
    s.add_argument("--out", type=Path, default=Path("data/demo_check"))
    s.add_argument("--n-oracle", type=int, default=40)
    s.add_argument("--shape", type=int, nargs=3, default=None, help="volume shape (default the preset's 64^3)")
    s.add_argument("--train-cases", type=int, default=None,
                   help="also write the demo's sites with this many cases per training site under <out>/train<N>")
    c = sub.add_parser("score", help="score checkpoints on the validation and test sites")
    c.add_argument("--run", nargs="+", required=True, metavar="NAME=CKPT")
    c.add_argument("--val", type=Path, required=True)
    c.add_argument("--test", type=Path, required=True)
    c.add_argument("--out", type=Path, required=True, help="output prefix (.md and .json are written)")
    a = p.parse_args(argv)
    if a.command == "sites":
        shape = tuple(a.shape) if a.shape else None
        paths = write_sites(a.out, a.n_oracle, shape)
        more = write_more_training_cases(a.out / f"train{a.train_cases}", a.train_cases, shape) if a.train_cases else []
        print("\n".join(f"wrote {x}" for x in (*paths, *more)))
        return paths
    runs = {}
    for spec in a.run:
        name, sep, ckpt = spec.partition("=")
        if not sep or not Path(ckpt).is_file():
            raise SystemExit(f"--run wants NAME=CHECKPOINT with an existing file, got {spec!r}")
        runs[name] = Path(ckpt)
    results = score(runs, a.val, a.test)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.with_suffix(".json").write_text(json.dumps(results, indent=2))
    a.out.with_suffix(".md").write_text(table(results))
    print(table(results))
    return results


if __name__ == "__main__":
    main()
