"""``cfseg-synth``: write the synthetic abdomen phantoms of a preset (:mod:`cfseg.data.synthetic`) as nnU-Net v2
(or MSD) raw datasets.

    cfseg-synth --out data/synthetic --preset demo --seed 0 --format nnunet
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cfseg.data.synthetic import FORMATS, PRESETS, make_datasets


def main(argv: list[str] | None = None) -> int:
    """Command line: write the synthetic datasets of a preset.

    Args:
        argv: Arguments (without the program name); None reads ``sys.argv``.

    Returns:
        0 on success, 2 on a user error (message on stderr).
    """
    parser = argparse.ArgumentParser(
        prog="cfseg-synth",
        description="Write deterministic synthetic abdomen phantoms as nnU-Net v2 (or MSD) raw datasets.",
    )
    parser.add_argument("--out", type=Path, default=Path("data/synthetic"), help="output root folder")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="demo", help="which sites to write")
    parser.add_argument("--seed", type=int, default=0, help="run seed (same seed: same data)")
    parser.add_argument("--shape", type=int, nargs=3, metavar=("X", "Y", "Z"), default=None,
                        help="volume shape (default: the preset's); the field of view is kept")
    parser.add_argument("--format", dest="fmt", choices=FORMATS, default="nnunet", help="dataset layout")
    parser.add_argument("--first-id", type=int, default=None, help="dataset/task id of the first site")
    parser.add_argument("--overwrite", action="store_true", help="replace existing dataset folders")
    args = parser.parse_args(argv)
    try:
        paths = make_datasets(args.out, args.preset, seed=args.seed, shape=args.shape, fmt=args.fmt,
                              overwrite=args.overwrite, first_id=args.first_id)
    except ValueError as err:
        print(f"cfseg-synth: error: {err}", file=sys.stderr)
        return 2
    for path, site in zip(paths, PRESETS[args.preset], strict=True):
        kind = "partial labels from" if site.partial else "labels"
        print(f"wrote {path} ({site.n_cases} cases, {site.modality.upper()}, {site.orientation}, {kind}: "
              f"{', '.join(site.classes)})")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
