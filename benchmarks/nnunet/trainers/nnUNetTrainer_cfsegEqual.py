"""nnU-Net v2 trainers for the equal-terms comparison with cfseg's joint OpenKBP run (issue 34).

Found by nnU-Net through ``nnUNet_extTrainer=benchmarks/nnunet/trainers`` (set by ``run_equal_terms.sh``).

What is equal to ``cfseg fit --config configs/openkbp/base.yaml --config configs/openkbp/joint.yaml
--trainer.max_steps=1500``:

* 1500 training iterations: 20 epochs x 75 iterations (nnU-Net's default is 1000 x 250);
* the batch (4 patches, cfseg's 2 volumes x 2 samples), the patch (64^3) and the target spacing (4 x 4 x 3 mm)
  come from the plans ``nnUNetPlans_cfsegEqual`` written by ``make_equal_plans.py``;
* one CPU thread when ``OMP_NUM_THREADS=1``: ``nnUNetv2_train -device cpu`` sets torch to every core; this trainer
  sets it back to ``OMP_NUM_THREADS``. With ``nnUNet_n_proc_DA=0`` the data loading and augmentation run in the
  training process, as cfseg's ``num_workers: 0``.

What stays nnU-Net's own: its network for that patch (PlainConvUNet, 32-320 features, deep supervision), SGD
(lr 1e-2, Nesterov momentum 0.99, poly decay over the 20 epochs), Dice + CE loss, foreground oversampling (33 %),
its augmentation and its CT normalisation.

Validation during training: 2 batches per epoch (nnU-Net's pseudo Dice; cfseg validates none during its 1500
steps); after the last epoch nnU-Net predicts its fold-0 validation cases (cfseg's 10 val cases) as usual.

Seeds: ``nnUNetTrainer_cfsegEqual_s<k>`` (k = 0..4) seeds python, numpy and torch with k before the network is
built; each seed has its own results folder (the trainer's name is part of it). nnU-Net has no seed option of its
own; a run resumed with ``--c`` is reseeded at the restart, so it is not the same sequence as one uninterrupted run.

Checkpoints for the Dice-vs-CPU-time curve: ``checkpoint_it375.pth`` and ``checkpoint_it750.pth`` (25 and 50 % of
the iterations) beside nnU-Net's ``checkpoint_final.pth``; ``checkpoint_latest.pth`` every epoch, so ``--c`` loses
at most one epoch. Each epoch's training wall time per iteration (data loading + augmentation + forward/backward/
step, validation excluded) is written to the log as ``cfseg-equal: train seconds/iteration``, and its process CPU
time as ``cfseg-equal: train CPU seconds/iteration``.

``CFSEG_EQUAL_STOP_AT=<iterations>`` ends the process after the epoch that reaches that many iterations (its
checkpoints saved), so a CPU session can stop at a curve point and resume later with ``--c``; the learning-rate
schedule stays the one of the full 1500 iterations.
"""

from __future__ import annotations

import os
import random
import time
from os.path import join

import numpy as np
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

TOTAL_ITERATIONS = 1500
ITERATIONS_PER_EPOCH = 75
CURVE_ITERATIONS = (375, 750)  # 25 %, 50 % of the budget (100 % is checkpoint_final.pth)
_CUDA = torch.device("cuda")  # nnU-Net's default device argument


class nnUNetTrainer_cfsegEqual(nnUNetTrainer):  # noqa: N801 - nnU-Net finds trainers by this naming
    seed = 0

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = _CUDA):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_iterations_per_epoch = ITERATIONS_PER_EPOCH
        self.num_epochs = TOTAL_ITERATIONS // ITERATIONS_PER_EPOCH
        self.num_val_iterations_per_epoch = 2
        self.save_every = 1
        threads = int(os.environ.get("OMP_NUM_THREADS", "0") or 0)
        if self.device.type == "cpu" and threads > 0:
            torch.set_num_threads(threads)
        random.seed(self.seed)
        np.random.seed(self.seed)
        torch.manual_seed(self.seed)
        self._epoch_t0 = None
        self.print_to_log_file(f"cfseg-equal: seed {self.seed}, {self.num_epochs} epochs x "
                               f"{self.num_iterations_per_epoch} iterations, torch threads {torch.get_num_threads()}")

    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        self._epoch_t0 = time.perf_counter()
        self._epoch_cpu0 = time.process_time()

    def on_train_epoch_end(self, train_outputs):
        seconds = time.perf_counter() - self._epoch_t0
        cpu = time.process_time() - self._epoch_cpu0
        super().on_train_epoch_end(train_outputs)
        self.print_to_log_file(f"cfseg-equal: train seconds/iteration {seconds / self.num_iterations_per_epoch:.3f} "
                               f"(epoch {self.current_epoch}, {self.num_iterations_per_epoch} iterations, "
                               f"load average {os.getloadavg()[0]:.2f})")
        self.print_to_log_file(f"cfseg-equal: train CPU seconds/iteration {cpu / self.num_iterations_per_epoch:.3f} "
                               f"(epoch {self.current_epoch}, process CPU time, all threads)")

    def on_epoch_end(self):
        done = (self.current_epoch + 1) * self.num_iterations_per_epoch
        if done in CURVE_ITERATIONS:
            self.save_checkpoint(join(self.output_folder, f"checkpoint_it{done}.pth"))
        super().on_epoch_end()
        stop_at = int(os.environ.get("CFSEG_EQUAL_STOP_AT", "0") or 0)
        if 0 < stop_at <= done < TOTAL_ITERATIONS:
            self.print_to_log_file(f"cfseg-equal: stopping after {done} iterations (CFSEG_EQUAL_STOP_AT={stop_at})")
            raise SystemExit(0)


def _seeded(k: int) -> type:
    return type(f"nnUNetTrainer_cfsegEqual_s{k}", (nnUNetTrainer_cfsegEqual,), {"seed": k, "__module__": __name__})


for _k in range(5):
    globals()[f"nnUNetTrainer_cfsegEqual_s{_k}"] = _seeded(_k)
