"""``cfseg-demo`` (what ``make demo`` runs): the main job end to end on built-in synthetic data."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cfseg.data.datamodule import DatasetConfig, SegDataModule
from cfseg.data.synthetic import PRESETS, make_datasets


def ensure_datasets(out: Path, preset: str, seed: int = 0) -> list[Path]:
    """Write the preset's synthetic datasets under ``out`` unless they are already there."""
    existing = sorted(p for p in out.glob("Dataset*") if (p / "dataset.json").is_file())
    names = [s.name for s in PRESETS[preset]]
    found = [next((p for p in existing if p.name.endswith("_" + n)), None) for n in names]
    if all(found):
        print(f"using synthetic datasets in {out}")
        return found  # type: ignore[return-value]
    paths = make_datasets(out, preset, seed=seed, overwrite=True)
    for p in paths:
        print(f"wrote {p}")
    return paths


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="cfseg-demo", description=__doc__)
    p.add_argument("--data", type=Path, default=Path("data/synthetic"))
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    paths = ensure_datasets(a.data, "demo", a.seed)
    dm = SegDataModule([DatasetConfig(str(x)) for x in paths], spacing=(5.5, 5.5, 5.5), cache="none")
    print("\nWhat the data layer reads:\n")
    print(dm.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
