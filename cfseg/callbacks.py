"""Checkpoints that follow the run's folder; a fit never overwrites a checkpoint it did not start from.

* :class:`Checkpoint` (``class_path: cfseg.callbacks.Checkpoint`` in a config) is Lightning's ``ModelCheckpoint``
  whose folder, when ``dirpath`` is not given, is ``<trainer.default_root_dir>/checkpoints``: a stable folder (so
  ``--ckpt_path last`` finds it in a later process) that moves with ``--trainer.default_root_dir``. Lightning's own
  ``ModelCheckpoint`` without ``dirpath`` keeps writing under the logger's versioned folder, as before.
* :func:`overwrite_problem`: ``cfseg fit`` refuses to start when a checkpoint file it would write (the fixed
  ``filename`` of a callback without the version counter, and ``last.ckpt``) already exists and the fit does not
  resume from that folder (``--ckpt_path``). Set ``CFSEG_OVERWRITE_CHECKPOINTS=1`` to replace such files anyway.
* :class:`TrainingClock` (``class_path: cfseg.callbacks.TrainingClock``) keeps the training's CPU and wall seconds
  in every checkpoint, so a checkpoint says what compute went into it (``training_clock`` below reads it back).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import Callback, ModelCheckpoint

#: environment variable that lets a fit replace checkpoint files it did not start from
OVERWRITE_ENV = "CFSEG_OVERWRITE_CHECKPOINTS"


class Checkpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose folder defaults to ``<trainer.default_root_dir>/checkpoints`` (all other arguments
    are Lightning's)."""

    def follow(self, trainer: Any) -> None:
        """Set the folder from the trainer's ``default_root_dir`` unless ``dirpath`` was given."""
        if self.dirpath is None:
            self.dirpath = os.path.realpath(os.path.expanduser(str(Path(trainer.default_root_dir) / "checkpoints")))

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:  # noqa: D102 - a Trainer built in Python
        self.follow(trainer)
        super().setup(trainer, pl_module, stage)


class TrainingClock(Callback):
    """Process CPU seconds (all threads, ``time.process_time``) and wall seconds spent in training batches and
    the steps done, saved in every checkpoint under ``callbacks["TrainingClock"]`` and carried over on resume.
    Validation and checkpoint writing are excluded: the clock runs from each training batch's start to its end."""

    def __init__(self) -> None:
        self.cpu_seconds = 0.0
        self.wall_seconds = 0.0
        self.steps = 0
        self._start: tuple[float, float] | None = None

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:  # noqa: D102
        self._start = (time.process_time(), time.perf_counter())

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any,  # noqa: D102
                           batch_idx: int) -> None:
        if self._start is not None:
            self.cpu_seconds += time.process_time() - self._start[0]
            self.wall_seconds += time.perf_counter() - self._start[1]
            self.steps += 1
            self._start = None

    def state_dict(self) -> dict[str, float]:  # noqa: D102
        return {"cpu_seconds": self.cpu_seconds, "wall_seconds": self.wall_seconds, "steps": self.steps}

    def load_state_dict(self, state_dict: dict[str, float]) -> None:  # noqa: D102
        self.cpu_seconds = float(state_dict["cpu_seconds"])
        self.wall_seconds = float(state_dict["wall_seconds"])
        self.steps = int(state_dict["steps"])


def training_clock(checkpoint: dict[str, Any]) -> dict[str, float] | None:
    """The :class:`TrainingClock` state of a loaded checkpoint dict, or None when the run had no clock."""
    return (checkpoint.get("callbacks") or {}).get("TrainingClock")


def target_files(callback: ModelCheckpoint) -> list[Path]:
    """The checkpoint files ``callback`` would overwrite: its fixed ``filename`` and ``last.ckpt``, when its folder
    is known and it does not add a version suffix to existing names (``enable_version_counter: false``)."""
    if callback.dirpath is None or getattr(callback, "_enable_version_counter", True):
        return []
    folder = Path(str(callback.dirpath))
    out = []
    if callback.filename and "{" not in callback.filename:
        out.append(folder / f"{callback.filename}{callback.FILE_EXTENSION}")
    if callback.save_last:
        out.append(folder / f"{callback.CHECKPOINT_NAME_LAST}{callback.FILE_EXTENSION}")
    return out


def overwrite_problem(callbacks: list[Any], ckpt_path: str | None) -> str | None:
    """Why this fit must not start (a checkpoint file it would overwrite exists), or None.

    A fit may replace files in the folder it resumes from (``ckpt_path`` is ``last``/``hpc``/``registry`` or a file
    in that folder); ``CFSEG_OVERWRITE_CHECKPOINTS=1`` allows any.
    """
    if os.environ.get(OVERWRITE_ENV, "") not in ("", "0"):
        return None
    resume_dir = None
    if ckpt_path is not None:
        if str(ckpt_path) in ("last", "hpc", "best") or str(ckpt_path).startswith("registry"):
            return None
        resume_dir = Path(str(ckpt_path)).expanduser().resolve().parent
    for cb in callbacks:
        if not isinstance(cb, ModelCheckpoint):
            continue
        for f in target_files(cb):
            if f.exists() and f.parent.resolve() != resume_dir:
                return (f"{f} exists and this fit would overwrite it (it does not resume from it); write elsewhere "
                        f"(--trainer.default_root_dir=<new folder>, or --trainer.callbacks.init_args.dirpath=<new "
                        f"folder>), resume it (--ckpt_path={f}), or set {OVERWRITE_ENV}=1 to replace it")
    return None
