"""nnU-Net's training step at cfseg's terms, timed in parts (nnU-Net environment, after run_equal_terms.sh has
preprocessed the data).

Builds ``nnUNetTrainer_cfsegEqual_s0`` on the ``nnUNetPlans_cfsegEqual`` plans exactly as ``nnUNetv2_train`` does
(its results go to a temporary folder, not the real run's), then times ``--steps`` iterations after ``--warmup``:

* **data**: ``next(dataloader_train)``: loading, foreground-oversampled cropping and nnU-Net's augmentation, in the
  training process (``nnUNet_n_proc_DA=0``, as cfseg's ``num_workers: 0``);
* **step**: ``train_step``: forward (deep supervision), Dice + CE loss, backward, SGD step.

Wall time (``time.perf_counter``) and the main thread's CPU time (``time.thread_time``, which moves less when other
processes share the machine) for each; median over the timed iterations; load average before and after.

    OMP_NUM_THREADS=1 nnUNet_n_proc_DA=0 nnUNet_preprocessed=results/nnunet/nnUNet_preprocessed \\
    nnUNet_raw=results/nnunet/nnUNet_raw nnUNet_extTrainer=benchmarks/nnunet/trainers \\
        .venv-nnunet/bin/python benchmarks/nnunet/step_time.py --steps 8 --out reports/data/nnunet/step_time.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--trainer", default="nnUNetTrainer_cfsegEqual_s0")
    p.add_argument("--plans", default="nnUNetPlans_cfsegEqual")
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    os.environ.setdefault("nnUNet_n_proc_DA", "0")
    os.environ.setdefault("nnUNet_compile", "false")
    os.environ["nnUNet_results"] = tempfile.mkdtemp(prefix="nnunet_step_time_")  # before nnunetv2.paths is read
    import torch
    from nnunetv2.run.run_training import get_trainer_from_args

    threads = int(os.environ.get("OMP_NUM_THREADS", "1") or 1)
    torch.set_num_threads(threads)
    load_before = os.getloadavg()
    trainer = get_trainer_from_args("501", "3d_fullres", 0, a.trainer, a.plans, device=torch.device("cpu"))
    trainer.on_train_start()
    trainer.on_train_epoch_start()
    rows = []
    for i in range(a.warmup + a.steps):
        w0, c0 = time.perf_counter(), time.thread_time()
        batch = next(trainer.dataloader_train)
        w1, c1 = time.perf_counter(), time.thread_time()
        trainer.train_step(batch)
        w2, c2 = time.perf_counter(), time.thread_time()
        if i >= a.warmup:
            rows.append({"data_s": w1 - w0, "step_s": w2 - w1, "data_cpu_s": c1 - c0, "step_cpu_s": c2 - c1})
    load_after = os.getloadavg()
    med = {k: round(statistics.median(r[k] for r in rows), 3) for k in rows[0]}
    cm = trainer.configuration_manager
    result = {
        "what": "nnU-Net v2 training iteration (data + augmentation, then train_step), median",
        "trainer": a.trainer, "plans": a.plans, "threads": torch.get_num_threads(),
        "n_proc_DA": os.environ["nnUNet_n_proc_DA"], "batch_size": cm.batch_size, "patch_size": cm.patch_size,
        "spacing": cm.spacing, "features_per_stage": cm.network_arch_init_kwargs["features_per_stage"],
        "parameters": sum(x.numel() for x in trainer.network.parameters()),
        "steps": a.steps, "warmup": a.warmup, **med,
        "iteration_s": round(med["data_s"] + med["step_s"], 3),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in load_after],
        "torch": torch.__version__,
    }
    print(json.dumps(result))
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
