"""``cfseg fit | validate | test | predict --config configs/<x>.yaml`` (a LightningCLI).

The class list and the preprocessing flow from the data module to the model by argument linking, and the
training patch size is the sliding-window size, so a config names each of them once.
"""

from __future__ import annotations

import sys

from lightning.pytorch.cli import LightningCLI

from cfseg.data.datamodule import SegDataModule
from cfseg.module import CFSegModule


class CFSegCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.class_names", "model.class_names", apply_on="instantiate")
        parser.link_arguments("data.preprocessing_by_modality", "model.preprocessing", apply_on="instantiate")
        parser.link_arguments("data.patch_size", "model.roi_size")
        parser.link_arguments("model.previous_checkpoint", "data.previous_checkpoint")


def main(args: list[str] | None = None) -> CFSegCLI:
    """Run the CLI (``args`` default to ``sys.argv[1:]``)."""
    return CFSegCLI(
        CFSegModule,
        SegDataModule,
        args=args,
        save_config_kwargs={"overwrite": True},
    )


def run(args: list[str] | None = None) -> int:
    """Console entry point (``cfseg ...``): exit status 0 on success (errors raise)."""
    main(sys.argv[1:] if args is None else args)
    return 0


if __name__ == "__main__":
    sys.exit(run())
