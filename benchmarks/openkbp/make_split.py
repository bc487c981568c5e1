"""Write the committed OpenKBP split: 40 test cases, the rest in three disjoint training groups (one per stage).

    python benchmarks/openkbp/make_split.py [--data ../shared/data/openkbp_oar] [--seed 0]

Writes configs/openkbp/split_joint.json (train: all training cases, val: 10 of them, test: 40) and
configs/openkbp/split_stage{0,1,2}.json (each stage's own group: its first --n-val-per-stage cases in shuffled
order are that stage's validation cases, where the protocol's settings are chosen, the rest train; the same 40
test cases). Cases are
shuffled with numpy's default_rng(seed) over the sorted case ids, so the split depends only on the seed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "openkbp_oar")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-test", type=int, default=40)
    p.add_argument("--n-val", type=int, default=10)
    p.add_argument("--n-val-per-stage", type=int, default=4)
    a = p.parse_args()
    ids = sorted(f.name[: -len("_0000.nii.gz")] for f in (a.data / "imagesTr").glob("*_0000.nii.gz"))
    order = [ids[i] for i in np.random.default_rng(a.seed).permutation(len(ids))]
    test, rest = sorted(order[: a.n_test]), order[a.n_test:]
    out = ROOT / "configs" / "openkbp"
    out.mkdir(parents=True, exist_ok=True)
    val = sorted(rest[: a.n_val])
    (out / "split_joint.json").write_text(json.dumps({"train": sorted(rest[a.n_val:]), "val": val, "test": test},
                                                     indent=1))
    groups = np.array_split(np.array(rest), 3)
    for i, g in enumerate(groups):
        g = g.tolist()
        k = a.n_val_per_stage
        (out / f"split_stage{i}.json").write_text(json.dumps({"train": sorted(g[k:]), "val": sorted(g[:k]),
                                                              "test": test}, indent=1))
    print(f"{len(ids)} cases: test {len(test)}, stage groups {[len(g) for g in groups]} "
          f"({a.n_val_per_stage} of each for validation), joint val {len(val)}")


if __name__ == "__main__":
    main()
