"""``cfseg-demo`` (what ``make demo`` runs): the main job end to end on built-in synthetic data.

1. write the synthetic phantoms (two partially annotated CT sites + a fully annotated held-out CT site);
2. train the classifier-free model jointly on both sites through the CLI (``cfseg fit --config
   configs/demo.yaml``);
3. segment the held-out cases, print a per-class Dice table, write ``results/demo/metrics.json`` and
   ``results/demo/demo.png`` (image, ground truth, prediction, one class's similarity map);
4. run the synthetic continual-learning protocol (``configs/incremental/synthetic_v2.yaml``: distill / finetune /
   joint on the cumulative budget) and write ``results/demo/incremental/summary.json``.

Both jobs share the machine: the protocol starts in a background process as soon as the data is written
(stage 0, then its strategies in ``--workers`` single-thread processes; log in
``results/demo/incremental/protocol.log``) while the joint model trains on one thread in this process.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import time
from pathlib import Path

import torch
from lightning.pytorch import Callback

from cfseg.apps.cli import main as cli
from cfseg.apps.protocol import run_protocol, single_thread_logging_to
from cfseg.data.datamodule import DatasetConfig, SegDataModule
from cfseg.data.synthetic import PRESETS, make_datasets
from cfseg.evaluation import evaluate_datasets
from cfseg.experiments.protocol import load_protocol
from cfseg.experiments.report import print_results
from cfseg.metrics import DICE_CONVENTION, dice_table
from cfseg.module import load_checkpoint

REPO = Path(__file__).resolve().parents[2]  # the checkout: cfseg/apps/demo.py -> .
CONFIG = REPO / "configs" / "demo.yaml"
PROTOCOL = REPO / "configs" / "incremental" / "synthetic_v2.yaml"


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


def evaluate(ckpt: Path, test_root: Path, out_dir: Path, png_class: str = "kidney_left") -> dict:
    """Segment every case of ``test_root`` with ``ckpt``; Dice per class (only annotated classes count)."""
    module = load_checkpoint(str(ckpt))
    metrics = evaluate_datasets(module, [DatasetConfig(str(test_root))], split="all", keep_first=True)
    vol, out = metrics.pop("first")
    metrics["checkpoint"] = str(ckpt)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    plot_case(vol, out, module.bank.names, png_class, out_dir / "demo.png")
    return metrics


def plot_case(vol: dict, out: dict, names: list[str], cls: str, path: Path) -> None:
    """Axial slice through ``cls``: image, ground truth, prediction, similarity map of ``cls``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = names.index(cls)
    lab = vol["label"][0]
    zs = torch.nonzero(lab == k)[:, 2]
    z = int(zs.float().median()) if len(zs) else lab.shape[2] // 2
    panels = [
        ("image", vol["image"][0, :, :, z], "gray", None),
        ("ground truth", lab[:, :, z], "tab10", (0, 9)),
        ("prediction", out["labels"][:, :, z], "tab10", (0, 9)),
        (f"similarity to '{cls}'", out["similarity"][k, :, :, z], "magma", (-1, 1)),
    ]
    fig, axes = plt.subplots(1, 4, figsize=(16, 4.4))
    for ax, (title, arr, cmap, lim) in zip(axes, panels, strict=True):
        im = ax.imshow(arr.float().numpy().T, cmap=cmap, origin="lower", interpolation="nearest",
                       **({"vmin": lim[0], "vmax": lim[1]} if lim else {}))
        ax.set_title(title)
        ax.axis("off")
    fig.colorbar(im, ax=axes[-1], fraction=0.046)
    fig.suptitle(f"{vol['case_id']}, axial slice z={z} (RAS; patient left on the left of the image)")
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)


class ThreadsAfterProcess(Callback):
    """Train on ``threads`` threads from the first step after ``process`` has ended.

    The demo trains on one thread while the background protocol uses the other core; once the protocol is done,
    the training takes the whole machine (``make demo`` on 2 cores: its last 4 minutes; 10.6 instead of 12.8 in all).
    """

    def __init__(self, process: multiprocessing.process.BaseProcess, threads: int) -> None:
        self.process, self.threads = process, int(threads)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: D102
        if self.process is not None and not self.process.is_alive():
            torch.set_num_threads(self.threads)
            self.process = None


#: the protocol rows ``make demo`` runs (the synthetic protocol's other rows run with
#: ``cfseg-protocol --config configs/incremental/synthetic_v2.yaml``; their numbers: reports/README.md)
DEMO_STRATEGIES = ("joint", "distill", "finetune", "experts")  # the longest (joint) starts first


def _protocol_job(spec: dict, seed: int, workers: int, log: str) -> None:
    """Background process: the protocol's demo strategies, output to ``log``."""
    single_thread_logging_to(log)
    run_protocol(spec, [e["name"] for e in spec["strategies"]], seeds=[seed], workers=workers)


def start_protocol(a: argparse.Namespace):
    """Write the protocol's datasets and start it in a background process; returns (process, spec, seed, t_start)."""
    ensure_datasets(a.data, "incremental", a.seed)
    spec = load_protocol(a.protocol)
    spec["strategies"] = [e for e in spec["strategies"] if e["name"] in a.strategies]
    if not spec["strategies"]:
        raise ValueError(f"none of the strategies {a.strategies} is in {a.protocol}")
    spec["output"] = str(a.out / "incremental")
    Path(spec["output"]).mkdir(parents=True, exist_ok=True)
    log = Path(spec["output"]) / "protocol.log"
    proc = multiprocessing.get_context("spawn").Process(target=_protocol_job, args=(spec, a.seed, a.workers, str(log)))
    proc.start()
    print(f"\nContinual-learning protocol {a.protocol} started in the background (process {proc.pid}, log {log}): "
          f"{' / '.join(e['name'] for e in spec['strategies'])}, steps per stage {spec['stage_steps']}, joint on "
          "the cumulative budget")
    return proc, spec, a.seed, time.time()


def finish_protocol(proc, spec: dict, seed: int, t1: float) -> None:
    """Wait for the background protocol; print its matrices and summary."""
    out = Path(spec["output"])
    print(f"\nwaiting for the continual-learning protocol (log: {out / 'protocol.log'}) ...", flush=True)
    proc.join()
    if proc.exitcode != 0:
        raise RuntimeError(f"the continual-learning protocol failed (exit code {proc.exitcode}); see "
                           f"{out / 'protocol.log'}")
    results = {seed: {e["name"]: json.loads((out / f"seed{seed}" / f"{e['name']}_matrix.json").read_text())
                      for e in spec["strategies"]}}
    print_results(results, json.loads((out / "summary.json").read_text()))
    print(f"\nwrote {out / 'summary.json'} and accuracy matrices (JSON, CSV, PNG) under {out}/seed{seed} "
          f"(protocol: {time.time() - t1:.0f} s, side by side with the joint training)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="cfseg-demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=Path("data/synthetic"))
    p.add_argument("--out", type=Path, default=Path("results/demo"))
    p.add_argument("--config", type=Path, default=CONFIG)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-epochs", type=int, default=None, help="override the config's training budget")
    p.add_argument("--skip-protocol", action="store_true", help="only the joint-training part")
    p.add_argument("--protocol", type=Path, default=PROTOCOL)
    p.add_argument("--strategies", nargs="+", default=list(DEMO_STRATEGIES),
                   help="protocol strategies to run (default: %(default)s)")
    p.add_argument("--workers", type=int, default=3,
                   help="protocol strategies trained side by side (single-thread processes) after its stage 0")
    a = p.parse_args(argv)
    t0 = time.time()
    paths = ensure_datasets(a.data, "demo", a.seed)
    protocol = None if a.skip_protocol else start_protocol(a)
    try:
        return _joint_then_protocol(a, paths, protocol, t0)
    finally:
        if protocol is not None and protocol[0].is_alive():
            protocol[0].terminate()  # only reached when the joint part failed


def last_callback_is_checkpoint(config: Path) -> bool:
    """Whether the config's last trainer callback is a ModelCheckpoint (the one a command-line override reaches)."""
    import yaml

    callbacks = ((yaml.safe_load(config.read_text()) or {}).get("trainer") or {}).get("callbacks") or []
    last = callbacks[-1] if isinstance(callbacks, list) and callbacks else {}
    return isinstance(last, dict) and str(last.get("class_path", "")).endswith(("ModelCheckpoint", ".Checkpoint"))


def _joint_then_protocol(a: argparse.Namespace, paths: list[Path], protocol, t0: float) -> int:
    train_paths, test_path = paths[:2], paths[2]
    print("\nWhat the data layer reads:\n")
    dm = SegDataModule([DatasetConfig(str(x)) for x in paths], spacing=(5.5, 5.5, 5.5), cache="none")
    print(dm.summary())
    datasets = [{"path": str(x), "val_fraction": 0.1, "test_fraction": 0.0} for x in train_paths]
    args = ["fit", "--config", str(a.config), f"--trainer.default_root_dir={a.out}",
            f"--data.datasets={json.dumps(datasets)}", f"--trainer.logger.init_args.save_dir={a.out}",
            f"--seed_everything={a.seed}"]
    if last_callback_is_checkpoint(a.config):  # its folder follows --out (two demos side by side do not collide)
        args.append(f"--trainer.callbacks.init_args.dirpath={a.out / 'checkpoints'}")
    if a.max_epochs is not None:
        args.append(f"--trainer.max_epochs={a.max_epochs}")
    previous = sorted((a.out / "checkpoints").glob("*.ckpt"))  # a re-run retrains: its own earlier checkpoints go
    for f in previous:  # (cfseg fit refuses to overwrite a checkpoint it does not resume from)
        f.unlink()
    if previous:
        print(f"\nremoved the previous demo run's checkpoints: {', '.join(str(f) for f in previous)}")
    print(f"\nTraining: cfseg {' '.join(args)}\n")
    callbacks = []
    if protocol is not None:
        callbacks.append(ThreadsAfterProcess(protocol[0], torch.get_num_threads()))
        torch.set_num_threads(1)  # the protocol's processes use the other core
    run = cli(args, callbacks)
    ckpt = a.out / "cfseg-demo.ckpt"  # a fixed path for the README's segmentation example
    run.trainer.save_checkpoint(ckpt)
    print(f"\ncheckpoint: {ckpt}\nSegmenting the held-out cases of {test_path.name} ...")
    metrics = evaluate(ckpt, test_path, a.out)
    print(f"\nHeld-out Dice ({metrics['n_cases']} cases; {DICE_CONVENTION}):\n")
    print(dice_table(metrics["per_class_dice"]))
    print(f"\nwrote {a.out / 'metrics.json'} and {a.out / 'demo.png'} ({time.time() - t0:.0f} s so far)")
    if protocol is not None:
        finish_protocol(*protocol)
    print(f"\ndemo finished in {time.time() - t0:.0f} s")
    print(f"segment your own NIfTI file: .venv/bin/cfseg-segment -i image.nii.gz -o masks/ --ckpt {ckpt}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
