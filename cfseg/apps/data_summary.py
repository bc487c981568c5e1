"""``cfseg-data-summary``: what the data layer reads from one or more dataset folders.

Without ``--check`` it reads ``dataset.json``, ``partial_labels.json`` and the NIfTI headers only, and prints
cases per split and classes. With ``--check`` it reads every voxel of every case, like nnU-Net's dataset
integrity check, and reports every problem it finds, one line each naming the file (exit status 2), or one OK
line (exit status 0):

- every image and label file exists and loads completely (no truncated, corrupt or empty file);
- images are 3D (one file per channel), affines are finite and non-singular;
- the channels and the label of a case agree in shape and affine (spacing, origin, direction);
- images have no NaN/infinite intensities; label values are integers declared in ``dataset.json``;
- ``partial_labels.json`` names only cases of the dataset and classes declared in ``dataset.json``.
"""

from __future__ import annotations

import argparse
import sys

from cfseg.data.formats import DatasetError
from cfseg.data.summary import check_datasets, one_line


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="cfseg-data-summary", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("datasets", nargs="+", help="dataset folders (nnU-Net v2 raw or MSD)")
    p.add_argument("--check", action="store_true",
                   help="read every voxel of every case and report every problem (exit 2 if any)")
    p.add_argument("--jobs", type=int, default=None, help="threads for --check (default: up to 4)")
    p.add_argument("--classes", nargs="*", default=None, help="global class list (default: union)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--test-fraction", type=float, default=0.2)
    a = p.parse_args(argv)
    if a.check:
        report = check_datasets(a.datasets, a.jobs)
        for line in report.problems:
            print(line)
        if not report.ok:
            print(f"cfseg-data-summary: error: {len(report.problems)} problem(s) in {report.datasets} dataset(s)",
                  file=sys.stderr)
            return 2
        print(f"OK: {report.datasets} dataset(s), {report.cases} cases, {report.files} files, "
              f"{report.voxels:,} voxels read; no problems found")
        return 0
    # function-local: the data module imports lightning (seconds at start-up), which --check does without
    from cfseg.data.datamodule import DatasetConfig, SegDataModule

    try:
        dm = SegDataModule(
            [DatasetConfig(d, val_fraction=a.val_fraction, test_fraction=a.test_fraction) for d in a.datasets],
            classes=a.classes, seed=a.seed,
        )
    except (DatasetError, ValueError) as e:
        print(f"cfseg-data-summary: error: {one_line(str(e))}", file=sys.stderr)
        return 2
    print(dm.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
