"""Training throughput: ``cfseg fit`` against a plain MONAI + PyTorch loop on the same network, patch and batch.

Both run in this one process, one after the other, with the same thread count and precision:

* **plain**: the config's MONAI backbone + a ``1x1x1`` softmax conv, ``monai.losses.DiceCELoss``, AdamW, on a
  fixed in-memory batch (``batch_size x samples_per_volume`` patches): the network's own step cost, nothing
  else.
* **cfseg**: the real ``cfseg fit`` pipeline from the YAML configs (data module with cached volumes and random
  class-balanced crops, prototype head, partial-label loss, Lightning loop and logging), with validation and
  checkpointing off. The step time is the interval between consecutive ``on_train_batch_start`` calls, so it
  includes data loading.

Both report the median step time after ``--warmup`` steps; the ratio cfseg / plain is the overhead (aim: at
most 1.05). Besides wall time, each step's CPU time of the main thread (``time.thread_time``: user + system, page
faults included, descheduled time excluded; the training loop, data loading with ``num_workers: 0`` and the
plain loop all run there) gives a second ratio that moves less when other processes share the machine, since
the two runs are sequential. ``--precision bf16-mixed`` runs both under bfloat16 autocast.

Example (OpenKBP joint config, one thread)::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/train_throughput.py --threads 1 --steps 40 \\
        --config configs/openkbp/base.yaml configs/openkbp/joint.yaml --max-cases 24 --out benchmarks
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml


def _merged_config(paths: list[str]) -> dict[str, Any]:
    cfg: dict[str, Any] = {}
    for p in paths:
        for k, v in (yaml.safe_load(Path(p).read_text()) or {}).items():
            cfg[k] = {**cfg.get(k, {}), **v} if isinstance(v, dict) and isinstance(cfg.get(k), dict) else v
    return cfg


def plain_loop(cfg: dict[str, Any], num_classes: int, steps: int, warmup: int,
               precision: str) -> tuple[list[float], list[float]]:
    """Step wall and CPU times (s) of backbone + softmax conv + DiceCE + AdamW on a fixed batch."""
    import torch
    from monai.losses import DiceCELoss

    from cfseg.builder import build_network

    torch.manual_seed(0)
    model = torch.nn.Sequential(build_network(cfg["model"]["backbone"]),
                                torch.nn.Conv3d(cfg["model"]["feature_channels"], num_classes, 1))
    data = cfg["data"]
    n = data["batch_size"] * data["samples_per_volume"]
    x = torch.rand(n, 1, *data["patch_size"])
    y = torch.randint(0, num_classes, (n, 1, *data["patch_size"]))
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    times, cpu = [], []
    for i in range(warmup + steps):
        t, c = time.perf_counter(), time.thread_time()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
            loss = loss_fn(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i >= warmup:
            times.append(time.perf_counter() - t)
            cpu.append(time.thread_time() - c)
    return times, cpu


def cfseg_fit(configs: list[str], steps: int, warmup: int, precision: str, max_cases: int | None,
              workdir: Path) -> tuple[list[float], list[float], int]:
    """Step wall and CPU times (s) of ``cfseg fit`` (data loading included) and the number of classes."""
    from lightning.pytorch.callbacks import Callback

    from cfseg.apps.cli import CFSegCLI
    from cfseg.data.datamodule import SegDataModule
    from cfseg.module import CFSegModule

    class StepTimer(Callback):
        def __init__(self):
            self.starts: list[tuple[float, float]] = []

        def on_train_batch_start(self, *args, **kwargs):
            self.starts.append((time.perf_counter(), time.thread_time()))

    args = [a for c in configs for a in ("--config", c)]
    args += [f"--trainer.max_steps={warmup + steps + 1}", f"--trainer.precision={precision}",
             "--trainer.limit_val_batches=0", "--trainer.enable_checkpointing=false",
             "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={workdir}",
             f"--trainer.logger.init_args.save_dir={workdir}", "--trainer.callbacks=[]"]
    if max_cases:
        path = _merged_config(configs)["data"]["datasets"][0]["path"]
        subset = [{"path": path, "split_file": None, "val_fraction": 0.0, "test_fraction": 0.0, "max_cases": max_cases}]
        args.append(f"--data.datasets={json.dumps(subset)}")
    cli = CFSegCLI(CFSegModule, SegDataModule, args=args, run=False)
    timer = StepTimer()
    cli.trainer.callbacks.append(timer)
    cli.trainer.fit(cli.model, cli.datamodule)
    wall = [b[0] - a[0] for a, b in zip(timer.starts, timer.starts[1:], strict=False)]
    cpu = [b[1] - a[1] for a, b in zip(timer.starts, timer.starts[1:], strict=False)]
    return wall[warmup:warmup + steps], cpu[warmup:warmup + steps], len(cli.model.bank.names)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", nargs="+", default=["configs/openkbp/base.yaml", "configs/openkbp/joint.yaml"])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--precision", nargs="+", default=["32-true", "bf16-mixed"])
    p.add_argument("--max-cases", type=int, default=24, help="cases cached for the cfseg run (0 = all)")
    p.add_argument("--out", type=Path, default=Path("benchmarks"))
    a = p.parse_args(argv)
    import torch

    torch.set_num_threads(a.threads)
    a.out.mkdir(parents=True, exist_ok=True)
    cfg = _merged_config(a.config)
    rows = []
    for precision in a.precision:
        with tempfile.TemporaryDirectory() as logs:
            fit_times, fit_cpu, k = cfseg_fit(a.config, a.steps, a.warmup, precision, a.max_cases or None,
                                              Path(logs))
        plain_times, plain_cpu = plain_loop(cfg, k, a.steps, a.warmup, precision)
        row = {"precision": precision, "threads": a.threads, "steps": a.steps,
               "cfseg_step_s": statistics.median(fit_times), "plain_step_s": statistics.median(plain_times),
               "cfseg_step_cpu_s": statistics.median(fit_cpu), "plain_step_cpu_s": statistics.median(plain_cpu)}
        row["ratio"] = row["cfseg_step_s"] / row["plain_step_s"]
        row["ratio_cpu"] = row["cfseg_step_cpu_s"] / row["plain_step_cpu_s"]
        rows.append(row)
        print(f"{precision:>10}: cfseg fit {row['cfseg_step_s']:.3f} s/step, plain loop {row['plain_step_s']:.3f} "
              f"s/step, ratio {row['ratio']:.3f}; CPU {row['cfseg_step_cpu_s']:.3f} vs "
              f"{row['plain_step_cpu_s']:.3f} s/step, ratio {row['ratio_cpu']:.3f}", flush=True)
    doc = {"config": a.config, "patch": cfg["data"]["patch_size"],
           "patches_per_step": cfg["data"]["batch_size"] * cfg["data"]["samples_per_volume"],
           "cpu": platform.processor() or platform.machine(), "torch": torch.__version__, "rows": rows}
    (a.out / "train_throughput.json").write_text(json.dumps(doc, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
