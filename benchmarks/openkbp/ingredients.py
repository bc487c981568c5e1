"""nnU-Net's ingredients in cfseg's OpenKBP joint recipe, one at a time, judged on the validation cases (issue 34).

Every row is the joint run of reports section 14 (``configs/openkbp/base.yaml`` + ``joint.yaml`` +
``budget_curve.yaml``: UNet 16-256, 4 x 4 x 3 mm, 64^3 patches, batch 4, 1500 steps, AdamW 2e-3 with cosine decay,
class-balanced crops, light intensity augmentation, Dice + CE with batch Dice) with one change (:data:`ROWS`), same
seed (``--seed_everything``; the crop sequence's ``data.seed`` is 0 for every seed, as in section 14), data and
step count; each is scored on the split's 10 validation cases (``--test`` adds the 40 test cases,
for the rows chosen on validation) with ``benchmarks/openkbp/heads.py``'s scorer, and its training CPU seconds
come from the :class:`cfseg.callbacks.TrainingClock` in its checkpoint::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/openkbp/ingredients.py --rows baseline augment_strong sgd_poly \\
        --seeds 0 --summary reports/data/openkbp/ingredients/summary.json

``--step-time`` instead times one training step of each row's network (``training_step`` + backward + optimiser
step on a random batch of 4 x 64^3 with every organ annotated, one thread, the rows interleaved, median of
``--reps``), for the rows whose cost differs (another backbone): what the network ingredients cost per step.

A row whose last checkpoint (``step1500.ckpt``; :data:`ROW_STEPS` for longer rows) exists is only scored (scores
are cached beside the checkpoint); a row stopped before its last step is trained again from the start.
``baseline`` runs exactly the command of section 14's curve, so ``--reuse-baseline results/curve`` scores that
run's checkpoint instead of training it again.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT.parent / "shared" / "data" / "openkbp_oar"
SPLIT = ROOT / "configs" / "openkbp" / "split_joint.json"
CONFIGS = ["configs/openkbp/base.yaml", "configs/openkbp/joint.yaml", "configs/openkbp/budget_curve.yaml"]
STEPS = 1500
#: rows trained for another number of steps than :data:`STEPS` (a multiple of budget_curve.yaml's 375)
ROW_STEPS = {"baseline_5250": 5250}

#: row -> the backbone config file it adds (rows not listed train base.yaml's UNet)
BACKBONES = {row: f"configs/openkbp/backbones/{row}.yaml" for row in ("unet_fullres", "dynunet", "dynunet_ds")}

#: row -> (what changes against the baseline, the ``cfseg fit`` arguments that change it)
ROWS: dict[str, tuple[str, list[str]]] = {
    "baseline": ("cfseg's OpenKBP recipe (section 14's joint run)", []),
    "baseline_5250": ("cfseg's recipe for 5250 steps, about the training CPU time of unet_fullres's 1500 "
                      "(3.5x the baseline's)", []),
    "augment_strong": ("nnU-Net-style augmentation: rotation and scaling, noise, blur, low resolution, gamma "
                       "(data.augment: strong)", ["--data.augment=strong"]),
    "sampling_nnunet": ("nnU-Net's sampling: 2 of 3 crop centres on background (anywhere), 1 of 3 on the organs "
                        "(data.class_ratios: [14, 1 x 7])", ["--data.class_ratios=[14,1,1,1,1,1,1,1]"]),
    "sgd_poly": ("nnU-Net's optimiser: SGD, Nesterov momentum 0.99, lr 0.01, weight decay 3e-5, poly decay, no "
                 "warm-up", ["--model.optimizer_name=sgd", "--model.lr=0.01", "--model.weight_decay=3e-5",
                             "--model.lr_schedule=poly", "--model.warmup_fraction=0"]),
    "unet_fullres": ("nnU-Net's full-resolution first stage in cfseg's UNet: a 16-channel stage at stride 1 before "
                     "the strided ones (UNet 16-16-256)", ["--config", BACKBONES["unet_fullres"]]),
    "dynunet": ("nnU-Net's network at cfseg's widths: MONAI DynUNet, two 3^3 convolutions + instance norm + leaky "
                "ReLU per stage, 16-256 filters, no deep supervision", ["--config", BACKBONES["dynunet"]]),
    "dynunet_ds": ("the DynUNet with nnU-Net's deep supervision (two coarser outputs, loss weights 4/7, 2/7, 1/7)",
                   ["--config", BACKBONES["dynunet_ds"]]),
}


def _heads_module() -> Any:
    spec = importlib.util.spec_from_file_location("cfseg_openkbp_heads", ROOT / "benchmarks" / "openkbp" / "heads.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def run_dir(results: Path, row: str, head: str, seed: int) -> Path:
    return results / f"{row}_{head}_s{seed}"


def fit_command(row: str, head: str, seed: int, out: Path) -> list[str]:
    """The ``cfseg fit`` command of one row (relative paths: run from the repository root)."""
    cfseg = shutil.which("cfseg", path=str(Path(sys.executable).parent)) or "cfseg"
    args = [cfseg, "fit"] + [a for c in CONFIGS for a in ("--config", c)]
    return args + [f"--trainer.max_steps={ROW_STEPS.get(row, STEPS)}", f"--model.head={head}",
                   f"--seed_everything={seed}", "--data.seed=0",
                   f"--trainer.logger.init_args.save_dir={os.path.relpath(out, ROOT)}",
                   *ROWS[row][1]]


def train(row: str, head: str, seed: int, out: Path) -> Path:
    """Train one row (unless its last checkpoint exists); its last checkpoint (``step<steps>.ckpt``)."""
    ckpt = out / "logs" / "version_0" / "checkpoints" / f"step{ROW_STEPS.get(row, STEPS)}.ckpt"
    if ckpt.is_file():
        return ckpt
    if out.exists():
        shutil.rmtree(out)  # stopped before its last step: train again from the start (the same crops)
    out.mkdir(parents=True)
    cmd = fit_command(row, head, seed, out)
    print(f"[{row} {head} s{seed}] {shlex.join(cmd)}", flush=True)
    with open(out.with_suffix(".log"), "w") as log:
        subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, check=True)
    if not ckpt.is_file():
        raise SystemExit(f"{row}: training ended without {ckpt}")
    return ckpt


def score(heads: Any, ckpt: Path, part: str, threads: int, label: str) -> dict[str, Any]:
    """Mean and per-organ Dice / HD95 / surface Dice of one checkpoint on the ``part`` cases."""
    from cfseg.module import load_checkpoint

    scored = heads.score_checkpoint({"ckpt": str(ckpt), "data": str(DATA), "split": str(SPLIT), "part": part,
                                     "classes": None, "tolerance_mm": 2.0, "max_cases": None, "cache_dir": None,
                                     "threads": threads, "label": label})
    summary = heads.summarise_seed(scored["cases"], list(load_checkpoint(str(ckpt)).class_names))
    return heads._clean({k: summary[k] for k in ("mean_dice", "per_class", "mean_hd95_mm", "mean_surface_dice",
                                                 "n_cases")})


def step_times(rows: list[str], head: str, reps: int, warmup: int = 1) -> dict[str, Any]:
    """Median CPU seconds of one training step per row (rows interleaved, order reversed every repetition)."""
    import statistics
    import time

    import yaml

    from cfseg.module import CFSegModule

    base = yaml.safe_load((ROOT / CONFIGS[0]).read_text())["model"]
    organs = ["brainstem", "spinal_cord", "parotid_gland_right", "parotid_gland_left", "esophagus", "larynx",
              "mandible"]
    modules, opts = {}, {}
    for row in rows:
        backbone = (yaml.safe_load((ROOT / BACKBONES[row]).read_text())["model"]["backbone"] if row in BACKBONES
                    else base["backbone"])
        torch.manual_seed(0)
        m = CFSegModule(class_names=organs, backbone=backbone, feature_channels=base["feature_channels"], head=head,
                        encoder=base["encoder"], prompt_modality=base["prompt_modality"]).train()
        m.log = lambda *a, **k: None
        modules[row], opts[row] = m, m.configure_optimizers()["optimizer"]
    g = torch.Generator().manual_seed(0)
    label = torch.randint(0, len(organs) + 1, (4, 1, 64, 64, 64), generator=g)
    batch = {"image": torch.randn(4, 1, 64, 64, 64, generator=g), "label": label,
             "annotated": torch.ones(4, len(organs) + 1, dtype=torch.bool)}
    times: dict[str, list[float]] = {r: [] for r in rows}
    for rep in range(warmup + reps):
        for row in rows if rep % 2 == 0 else rows[::-1]:
            t0 = time.process_time()
            opts[row].zero_grad(set_to_none=True)
            modules[row].training_step(batch, 0).backward()
            opts[row].step()
            if rep >= warmup:
                times[row].append(time.process_time() - t0)
    return {row: {"cpu_seconds_per_step": statistics.median(t), "reps": len(t),
                  "parameters": sum(p.numel() for p in modules[row].net.parameters())} for row, t in times.items()}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    p.add_argument("--heads", nargs="+", default=["prototype"], choices=["prototype", "softmax"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--results", type=Path, default=ROOT / "results" / "ingredients")
    p.add_argument("--reuse-baseline", type=Path, default=None,
                   help="section 14's curve folder (<dir>/<head>_s<seed>): its run is the baseline row")
    p.add_argument("--test", action="store_true", help="also score the 40 test cases")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--summary", type=Path, default=None, help="JSON file the rows are merged into")
    p.add_argument("--step-time", action="store_true", help="time one training step per row instead (see above)")
    p.add_argument("--reps", type=int, default=5, help="--step-time repetitions per row")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    doc = json.loads(a.summary.read_text()) if a.summary and a.summary.is_file() else {}
    doc.setdefault("rows", {})
    if a.step_time:
        command = ["python", "benchmarks/openkbp/ingredients.py", *(argv if argv is not None else sys.argv[1:])]
        doc["step_time"] = {"rows": step_times(a.rows, a.heads[0], a.reps), "head": a.heads[0],
                            "threads": a.threads, "load_average": list(os.getloadavg()), "command": shlex.join(command)}
        if a.summary:
            a.summary.write_text(json.dumps(doc, indent=1, allow_nan=False) + "\n")
        print(json.dumps(doc["step_time"], indent=1))
        return doc
    heads = _heads_module()
    for seed in a.seeds:
        for head in a.heads:
            for row in a.rows:
                out = run_dir(a.results, row, head, seed)
                if row == "baseline" and a.reuse_baseline is not None:
                    out = a.reuse_baseline / f"{head}_s{seed}"
                ckpt = train(row, head, seed, out)
                clock = torch.load(ckpt, map_location="cpu", weights_only=True)["callbacks"]["TrainingClock"]
                entry = {"steps": clock["steps"], "cpu_seconds": round(clock["cpu_seconds"], 1),
                         "checkpoint": os.path.relpath(ckpt, ROOT),
                         "command": shlex.join(["cfseg", *fit_command(row, head, seed, out)[1:]])}
                for part in ("val", "test") if a.test else ("val",):
                    entry[part] = score(heads, ckpt, part, a.threads, f"{row}:{head}:{seed}:{part}")
                    print(f"[{row} {head} s{seed}] {part} mean Dice {entry[part]['mean_dice']:.3f}", flush=True)
                row_doc = doc["rows"].setdefault(row, {"change": ROWS[row][0], "args": ROWS[row][1]})
                old = row_doc.setdefault(head, {}).get(str(seed), {})
                row_doc[head][str(seed)] = {**old, **entry}
                if a.summary:
                    a.summary.parent.mkdir(parents=True, exist_ok=True)
                    a.summary.write_text(json.dumps(doc, indent=1, allow_nan=False) + "\n")
    return doc


if __name__ == "__main__":
    main()
