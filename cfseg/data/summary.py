"""``cfseg-data-summary``: what the data layer reads from one or more dataset folders."""

from __future__ import annotations

import argparse
import sys

from cfseg.data.datamodule import DatasetConfig, SegDataModule
from cfseg.data.formats import DatasetError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="cfseg-data-summary", description=__doc__)
    p.add_argument("datasets", nargs="+", help="dataset folders (nnU-Net v2 raw or MSD)")
    p.add_argument("--classes", nargs="*", default=None, help="global class list (default: union)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--test-fraction", type=float, default=0.2)
    a = p.parse_args(argv)
    try:
        dm = SegDataModule(
            [DatasetConfig(d, val_fraction=a.val_fraction, test_fraction=a.test_fraction) for d in a.datasets],
            classes=a.classes, seed=a.seed,
        )
    except (DatasetError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(dm.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
