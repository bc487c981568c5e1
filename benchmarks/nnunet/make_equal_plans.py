"""Write nnU-Net plans at cfseg's terms: ``nnUNetPlans_cfsegEqual.json`` from nnU-Net's own ``nnUNetPlans.json``.

Run with the nnU-Net environment, after ``nnUNetv2_plan_experiment`` (``run_equal_terms.sh`` does both)::

    nnUNet_preprocessed=results/nnunet/nnUNet_preprocessed .venv-nnunet/bin/python benchmarks/nnunet/make_equal_plans.py

The one configuration ``3d_fullres`` of the new plans is nnU-Net's planned ``3d_fullres`` with

* ``spacing``: cfseg's 4 x 4 x 3 mm (``configs/openkbp/base.yaml``, x, y, z), put into nnU-Net's axis order (the
  image reader's array order z, y, x, then the plans' ``transpose_forward``);
* ``patch_size``: 64 x 64 x 64 and ``batch_size``: 4 (cfseg's 2 volumes x 2 samples);
* the network topology recomputed for that patch and spacing the way nnU-Net's planner does it
  (``get_pool_and_conv_props``, stages down to a 4-voxel edge, features 32 * 2^i capped at 320, two convolutions per
  stage); everything else (normalisation, resampling, network class) is nnU-Net's plan unchanged.

The ``data_identifier`` is new, so ``nnUNetv2_preprocess -plans_name nnUNetPlans_cfsegEqual`` writes its own
preprocessed data beside nnU-Net's.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
from pathlib import Path

import numpy as np

CFSEG_SPACING_XYZ = (4.0, 4.0, 3.0)
PATCH = (64, 64, 64)
BATCH = 4
PLANS_NAME = "nnUNetPlans_cfsegEqual"
CONFIG = "3d_fullres"


def equal_terms_plans(plans: dict, spacing_xyz=CFSEG_SPACING_XYZ, patch=PATCH, batch=BATCH,
                      plans_name: str = PLANS_NAME) -> dict:
    """nnU-Net plans whose ``3d_fullres`` uses ``spacing_xyz``, ``patch`` and ``batch`` (see the module doc)."""
    from nnunetv2.experiment_planning.experiment_planners.network_topology import get_pool_and_conv_props

    out = copy.deepcopy(plans)
    out["plans_name"] = plans_name
    base = copy.deepcopy(plans["configurations"][CONFIG])
    array_order = list(reversed(spacing_xyz))  # SimpleITK arrays are z, y, x
    spacing = [float(array_order[i]) for i in plans["transpose_forward"]]
    num_pool, strides, kernels, patch_size, _ = get_pool_and_conv_props(spacing, list(patch), 4, 999999)
    if [int(p) for p in patch_size] != list(patch):
        raise ValueError(f"nnU-Net's topology changes the patch {patch} to {patch_size} at spacing {spacing}")
    n = len(strides)
    arch = base["architecture"]["arch_kwargs"]
    arch.update({
        "n_stages": n,
        "features_per_stage": [min(320, 32 * 2 ** i) for i in range(n)],
        "kernel_sizes": [list(k) for k in kernels],
        "strides": [list(s) for s in strides],
        "n_conv_per_stage": [2] * n,
        "n_conv_per_stage_decoder": [2] * (n - 1),
    })
    old_spacing = np.asarray(base["spacing"], dtype=float)
    median = np.asarray(base["median_image_size_in_voxels"], dtype=float) * old_spacing / np.asarray(spacing)
    base.update({
        "data_identifier": f"{plans_name}_{CONFIG}",
        "spacing": spacing,
        "patch_size": [int(p) for p in patch_size],
        "batch_size": int(batch),
        "median_image_size_in_voxels": [float(round(m, 1)) for m in median],
    })
    out["configurations"] = {CONFIG: base}
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preprocessed", type=Path,
                   default=Path(os.environ.get("nnUNet_preprocessed", "results/nnunet/nnUNet_preprocessed")))
    p.add_argument("--dataset", default="Dataset501_OpenKBP")
    args = p.parse_args(argv)
    folder = args.preprocessed / args.dataset
    plans = json.loads((folder / "nnUNetPlans.json").read_text())
    out = equal_terms_plans(plans)
    (folder / f"{PLANS_NAME}.json").write_text(json.dumps(out, indent=1))
    c = out["configurations"][CONFIG]
    print(json.dumps({"plans": str(folder / f"{PLANS_NAME}.json"), "spacing": c["spacing"],
                      "transpose_forward": out["transpose_forward"], "patch_size": c["patch_size"],
                      "batch_size": c["batch_size"], "features_per_stage": c["architecture"]["arch_kwargs"]
                      ["features_per_stage"], "strides": c["architecture"]["arch_kwargs"]["strides"]}))


if __name__ == "__main__":
    main()
