"""Write the OpenKBP "scanner B" domain: the stage-1 cases with their CT passed through a simulated scanner.

    python benchmarks/openkbp/make_scanner_shift.py [--data ../shared/data/openkbp_oar] \\
        [--out results/openkbp/scanner_b]

Takes the train + val + test cases of configs/openkbp/split_stage1.json, writes them to --out with
cfseg.data.scanner_shift.SCANNER_B applied to every image (labels unchanged; see that module for the shift and
why), and writes configs/openkbp/split_scanner_b.json with the same train/val/test lists, the split that
configs/openkbp/domain.yaml trains and tests stage 1 on. Cases already written with the same shift are skipped;
an --out made with another shift is refused. Everything is deterministic (the noise is seeded per case).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SPLITS = ("train", "val", "test")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "openkbp_oar")
    p.add_argument("--out", type=Path, default=ROOT / "results" / "openkbp" / "scanner_b")
    p.add_argument("--split", type=Path, default=ROOT / "configs" / "openkbp" / "split_stage1.json",
                   help="whose train/val/test cases to shift")
    p.add_argument("--split-out", type=Path, default=ROOT / "configs" / "openkbp" / "split_scanner_b.json")
    a = p.parse_args()
    from cfseg.data.scanner_shift import SCANNER_B, write_shifted_dataset

    spec = json.loads(a.split.read_text())
    lists = {s: list(spec.get(s, [])) for s in SPLITS}
    ids = [c for s in SPLITS for c in lists[s]]
    t0 = time.time()
    res = write_shifted_dataset(a.data, a.out, ids, SCANNER_B)
    dt = time.time() - t0
    a.split_out.parent.mkdir(parents=True, exist_ok=True)
    a.split_out.write_text(json.dumps(lists, indent=1))
    print(f"scanner B ({SCANNER_B.describe()}): {len(res['written'])} case(s) written, "
          f"{len(res['skipped'])} already there, to {a.out} in {dt:.1f} s")
    print(f"split {a.split_out}: " + ", ".join(f"{s} {len(lists[s])}" for s in SPLITS))


if __name__ == "__main__":
    main()
