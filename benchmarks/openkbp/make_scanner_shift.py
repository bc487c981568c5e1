"""Write an OpenKBP domain of the stage-1 cases: CT through a simulated scanner, or rendered in an MR-like contrast.

    python benchmarks/openkbp/make_scanner_shift.py [--shift scanner_b|mr_like] \\
        [--data ../shared/data/openkbp_oar] [--out results/openkbp/<shift>]

Takes the train + val + test cases of configs/openkbp/split_stage1.json and writes them to --out with every image
passed through the shift (labels unchanged):

* ``scanner_b``: cfseg.data.scanner_shift.SCANNER_B (kernel, noise, HU offset; configs/openkbp/domain*.yaml);
* ``mr_like``: cfseg.data.mr_contrast.MR_LIKE (non-monotonic T1-like tissue mapping, bias field, Rician noise;
  the images are written as MRI; configs/openkbp/contrast.yaml).

It also writes configs/openkbp/split_<shift>.json with the same train/val/test lists. Cases already written with
the same shift are skipped; an --out made with another shift is refused. Everything is deterministic (the random
parts are seeded per case).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SPLITS = ("train", "val", "test")


def _shift(name: str):
    if name == "scanner_b":
        from cfseg.data.scanner_shift import SCANNER_B

        return SCANNER_B
    from cfseg.data.mr_contrast import MR_LIKE

    return MR_LIKE


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shift", choices=("scanner_b", "mr_like"), default="scanner_b")
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "openkbp_oar")
    p.add_argument("--out", type=Path, help="default results/openkbp/<shift>")
    p.add_argument("--split", type=Path, default=ROOT / "configs" / "openkbp" / "split_stage1.json",
                   help="whose train/val/test cases to shift")
    p.add_argument("--split-out", type=Path, help="default configs/openkbp/split_<shift>.json")
    a = p.parse_args()
    from cfseg.data.scanner_shift import write_shifted_dataset

    shift = _shift(a.shift)
    out = a.out or ROOT / "results" / "openkbp" / a.shift
    split_out = a.split_out or ROOT / "configs" / "openkbp" / f"split_{a.shift}.json"
    spec = json.loads(a.split.read_text())
    lists = {s: list(spec.get(s, [])) for s in SPLITS}
    ids = [c for s in SPLITS for c in lists[s]]
    t0 = time.time()
    res = write_shifted_dataset(a.data, out, ids, shift)
    dt = time.time() - t0
    split_out.parent.mkdir(parents=True, exist_ok=True)
    split_out.write_text(json.dumps(lists, indent=1))
    print(f"{a.shift} ({shift.describe()}): {len(res['written'])} case(s) written, "
          f"{len(res['skipped'])} already there, to {out} in {dt:.1f} s")
    print(f"split {split_out}: " + ", ".join(f"{s} {len(lists[s])}" for s in SPLITS))


if __name__ == "__main__":
    main()
