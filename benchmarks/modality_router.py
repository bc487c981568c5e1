"""Which modality is this image? The modality router of an ``experts`` checkpoint against the intensity rule.

``cfseg-segment`` without ``--modality`` asks the checkpoint's modality router
(:class:`cfseg.continual.router.ModalityRouter`) when it knows two or more modalities: the frozen shared network's
pooled bottleneck features of the image in the modality-neutral view (raw intensities' 0.5th-99.5th percentiles
to [0, 1], one spacing), a ridge classifier fitted from statistics at the end of stage 0 and of every experts stage.
This script scores that answer on the validation and test cases of every stage of a protocol YAML, beside:

* the intensity rule (:func:`cfseg.inference.detect_modality`: air at -1000 HU is CT, non-negative units MRI);
* both on the CT cases stored without their HU offset (+1024, as some scanners export): the rule then reads MRI;
* the router's ridge ``gamma`` recomputed from the stored statistics (``G``, ``Q``) for ``--gammas``: the setting
  is chosen on the validation cases (highest accuracy, then the larger mean margin), never on the test cases;
* ``--extra``: every case of other dataset folders (e.g. real CT and MR from other sites), scored as examples
  the protocol never saw (split ``extra``, true modality from their ``dataset.json``).

Usage (after the synthetic protocol's experts run, e.g. ``cfseg-protocol --config
configs/incremental/synthetic.yaml --output results/synth_mod --seeds 0 --strategies experts``)::

    .venv/bin/python benchmarks/modality_router.py --config configs/incremental/synthetic.yaml \\
        --checkpoint results/synth_mod/seed0/runs/experts_stage2/final.ckpt --out benchmarks/synthetic/modality_router
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import yaml

from cfseg.continual.router import RidgeRouter
from cfseg.data.datamodule import DatasetConfig, SegDataModule
from cfseg.inference import ModalityError, detect_modality
from cfseg.module import load_checkpoint
from cfseg.segmentation import modality_view

HU_OFFSET = 1024.0


def _cases(spec: dict, module) -> list[tuple[str, str, str]]:
    """(split, image path, true modality) of every stage's validation and test cases, each case once."""
    pre = next(iter(module.preprocessing.values()))
    seen, out = set(), []
    for st in spec["stages"]:
        configs = [DatasetConfig(**{k: v for k, v in d.items() if k != "name"})
                   for d in st.get("datasets", []) + st.get("unlabeled", [])]
        dm = SegDataModule(configs, classes=module.class_names, spacing=tuple(pre["spacing"]), cache="none",
                           seed=spec.get("split_seed", 0))
        for ds in dm.datasets:
            for split in ("val", "test"):
                for case in ds.split.get(split, []):
                    path = str(case.images[0])
                    if path not in seen:
                        seen.add(path)
                        out.append((split, path, ds.info.modality))
    return out


def _extra_cases(folders: list[str]) -> list[tuple[str, str, str]]:
    """("extra", image path, modality) of every case of the dataset folders ``folders``."""
    from cfseg.data.formats import read_dataset

    out = []
    for folder in folders:
        info = read_dataset(Path(folder), require_labels=False, check_headers=False)
        out += [("extra", str(c.images[0]), info.modality) for c in info.cases]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, help="protocol YAML (its stages' datasets and split seed)")
    p.add_argument("--checkpoint", required=True, help="a checkpoint with a modality router over 2+ modalities")
    p.add_argument("--gammas", type=float, nargs="+", default=[1.0, 0.1, 0.01, 0.001])
    p.add_argument("--extra", nargs="*", default=[], help="dataset folders whose every case is also scored")
    p.add_argument("--out", required=True, help="output prefix: <out>.json and <out>.md")
    a = p.parse_args(argv)
    spec = yaml.safe_load(Path(a.config).read_text())
    module = load_checkpoint(a.checkpoint).eval()
    router = module.modality_router
    if router is None or len(router.names) < 2:
        raise SystemExit(f"{a.checkpoint}: no modality router over two or more modalities (names: "
                         f"{router.names if router else None}); train stage 0 and an experts stage of another "
                         "modality with this version of cfseg")
    state = router.ridge.state()
    ridges = {g: RidgeRouter.from_state({**state, "gamma": g}) for g in a.gammas}
    rows = []
    for split, path, truth in _cases(spec, module) + _extra_cases(a.extra):
        img = nib.load(path)
        arr = np.asarray(img.dataobj, dtype=np.float32)
        variants = [("stored", img, arr)]
        if truth == "ct":
            shifted = arr + HU_OFFSET
            variants.append(("ct_no_hu_offset", nib.Nifti1Image(shifted, img.affine), shifted))
        for variant, im, values in variants:
            with torch.no_grad():
                feats = module.window_features(modality_view(module, im))
            row = {"split": split, "case": Path(path).name, "truth": truth, "variant": variant}
            for g, ridge in ridges.items():
                s = ridge.scores(feats).mean(0)
                best = int(s.argmax())
                own = router.names.index(truth)
                other = max(float(v) for i, v in enumerate(s) if i != own)
                row[f"router_{g:g}"] = router.names[best]
                row[f"margin_{g:g}"] = float(s[own]) - other
            try:
                row["rule"] = detect_modality(values)[0]
            except ModalityError:
                row["rule"] = "unclear"
            rows.append(row)

    def acc(split: str, variant: str, key: str) -> tuple[float, int]:
        sel = [r for r in rows if r["split"] == split and r["variant"] == variant]
        return (sum(r[key] == r["truth"] for r in sel) / len(sel) if sel else float("nan")), len(sel)

    val = {g: (acc("val", "stored", f"router_{g:g}")[0],
               float(np.mean([r[f"margin_{g:g}"] for r in rows if r["split"] == "val" and r["variant"] == "stored"])))
           for g in a.gammas}
    chosen = max(a.gammas, key=lambda g: val[g])
    table = []
    for g in a.gammas:
        cells = []
        for split in ("val", "test"):
            for variant in ("stored", "ct_no_hu_offset"):
                v, n = acc(split, variant, f"router_{g:g}")
                cells.append(f"{v:.3f} ({n})")
        margins = [r[f"margin_{g:g}"] for r in rows if r["split"] == "test" and r["variant"] == "stored"]
        cells.append(f"{np.mean(margins):.2f} / {np.min(margins):.2f}")
        if a.extra:
            v, n = acc("extra", "stored", f"router_{g:g}")
            cells.append(f"{v:.3f} ({n})")
        mark = " (chosen on val)" if g == chosen else ""
        stored_gamma = " (the checkpoint's)" if g == router.ridge.gamma else ""
        table.append(f"| router, gamma {g:g}{stored_gamma}{mark} | " + " | ".join(cells) + " |")
    cells = []
    for split in ("val", "test"):
        for variant in ("stored", "ct_no_hu_offset"):
            v, n = acc(split, variant, "rule")
            cells.append(f"{v:.3f} ({n})")
    if a.extra:
        v, n = acc("extra", "stored", "rule")
        cells += ["-", f"{v:.3f} ({n})"]
    else:
        cells.append("-")
    table.append("| intensity rule (`detect_modality`) | " + " | ".join(cells) + " |")
    extra_head = (" | extra cases" if a.extra else "", "|---:" if a.extra else "")
    md = [f"# Modality routing: `{a.checkpoint}`", "",
          f"Modalities {router.names}; statistics rows (windows) per modality {router.ridge.n_samples}; neutral "
          f"view spacing {router.view['spacing']}. Accuracy (cases) of the answer to \"which modality is this?\" on "
          "every stage's validation and test cases; `ct_no_hu_offset`: the CT cases with +1024 added (stored "
          "without the HU offset). gamma chosen on the validation cases (accuracy, then mean margin).", "",
          "| answer | val | val, CT without HU offset | test | test, CT without HU offset | test margin mean / min"
          f"{extra_head[0]} |", "|---|---:|---:|---:|---:|---:" + extra_head[1] + "|", *table, "",
          *([f"Extra cases (every case of {', '.join(a.extra)}): "
             + ", ".join(f"{r['case']} ({r['truth']})" for r in rows
                        if r["split"] == "extra" and r["variant"] == "stored"), ""]
            if a.extra else []),
          "Margin: score of the true modality minus the other's (mean over the volume's windows).", "",
          f"Regenerate: `.venv/bin/python benchmarks/modality_router.py --config {a.config} --checkpoint "
          f"{a.checkpoint}" + (" --extra " + " ".join(a.extra) if a.extra else "") + f" --out {a.out}`", ""]
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"checkpoint": a.checkpoint, "names": router.names,
                                                    "chosen_gamma": chosen, "rows": rows}, indent=1))
    out.with_suffix(".md").write_text("\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
