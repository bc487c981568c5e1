"""``cfseg fit | validate | test | predict --config configs/<x>.yaml`` (a LightningCLI).

The class list and the preprocessing flow from the data module to the model by argument linking, and the
training patch size is the sliding-window size, so a config names each of them once.

Class indices follow names wherever a checkpoint meets a data module: with ``--ckpt_path <file>`` the data module
indexes labels in the checkpoint's class order (``data.classes`` defaults to it), and the module refuses a
checkpoint of another vocabulary (:meth:`cfseg.module.CFSegModule.on_load_checkpoint`).

User errors (bad data, a checkpoint of another vocabulary, an untrusted network spec) end in one line
``cfseg: error: ...`` and exit status 2; set ``CFSEG_DEBUG=1`` for the traceback.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import BasePredictionWriter, Callback
from lightning.pytorch.cli import LightningCLI

from cfseg.apps.writers import NiftiPredictionWriter
from cfseg.builder import UntrustedSpecError, check_spec
from cfseg.callbacks import Checkpoint, overwrite_problem
from cfseg.checkpoint import load_error_message
from cfseg.data.datamodule import SegDataModule, checkpoint_classes
from cfseg.data.formats import DatasetError
from cfseg.data.summary import one_line
from cfseg.module import CFSegModule
from cfseg.vocab import canonical_name

#: Hyper-parameters of a ``--ckpt_path`` checkpoint never merged into the run's config: a file must not decide
#: what code is trusted or runs (the continual strategy: a resumed stage takes it from the run's config), which other
#: files are read (a teacher), or the class list (that follows the data).
IGNORED_CHECKPOINT_HPARAMS = ("trusted_modules", "previous_checkpoint", "new_classes", "class_names", "preprocessing",
                              "bank_state", "optimizer", "strategy")


class CFSegCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.class_names", "model.class_names", apply_on="instantiate")
        parser.link_arguments("data.preprocessing_by_modality", "model.preprocessing", apply_on="instantiate")
        parser.link_arguments("data.patch_size", "model.roi_size")
        parser.link_arguments("model.previous_checkpoint", "data.previous_checkpoint")

    def _parse_ckpt_path(self) -> None:
        """Lightning merges a ``--ckpt_path`` checkpoint's hyper-parameters into the config (so ``validate`` rebuilds
        the network it was trained with); cfseg drops :data:`IGNORED_CHECKPOINT_HPARAMS` first and reports a file
        that is not a checkpoint in one line."""
        sub = self.config.get("subcommand")
        ckpt_path = self.config[sub].get("ckpt_path") if sub else None
        if not ckpt_path or not Path(ckpt_path).is_file():
            return
        try:
            ckpt = torch.load(ckpt_path, weights_only=True, map_location="cpu")
        except Exception as e:  # torch raises several types for files that are not checkpoints
            raise ValueError(load_error_message(ckpt_path, e)) from None
        self._ckpt_path_read = (str(ckpt_path), ckpt)  # read once: the class checks below reuse it
        hparams = ckpt.get("hyper_parameters") if isinstance(ckpt, dict) else None
        if not isinstance(hparams, dict):
            return
        hparams = {k: v for k, v in hparams.items() if k not in IGNORED_CHECKPOINT_HPARAMS and not k.startswith("_")}
        # jsonargparse imports any class_path it meets while parsing: check them against the allow-list first
        trusted = self.config[sub].model.get("trusted_modules")
        for spec in _class_path_specs(hparams):
            try:
                check_spec(spec, trusted)
            except UntrustedSpecError as e:
                raise UntrustedSpecError(f"{ckpt_path}: {e}") from None
        if hparams:
            self.config = self.parser.parse_object({sub: {"model": hparams}}, self.config)

    def before_instantiate_classes(self) -> None:
        """With ``--ckpt_path <file>``, the data's class order is the checkpoint's (indices follow names)."""
        cfg = self.config.get(self.subcommand) if self.subcommand else self.config
        ckpt = cfg.get("ckpt_path") if cfg is not None else None
        if not ckpt or not Path(str(ckpt)).is_file() or cfg.model.get("previous_checkpoint"):
            return  # "last"/"best" resolve later; the module's own check still refuses another vocabulary
        if cfg.data.get("classes") is None:
            cfg.data.classes = self._ckpt_path_classes(ckpt)

    def _ckpt_path_classes(self, path: str) -> list[str]:
        """Class names of the ``--ckpt_path`` checkpoint, from the copy :meth:`_parse_ckpt_path` already read."""
        read_path, ckpt = getattr(self, "_ckpt_path_read", (None, None))
        return checkpoint_classes(path, ckpt if read_path == str(path) else None)

    def _before_run(self) -> None:
        """Before fit/validate/test/predict: ``--ckpt_path`` loads with ``torch.load(weights_only=True)`` unless the
        user says otherwise; warn when bf16 autocast would run emulated on this CPU."""
        warn_slow_bf16(str(self.trainer.precision), type(self.trainer.accelerator).__name__)
        for cb in self.trainer.callbacks:  # before --ckpt_path last is looked up
            if isinstance(cb, Checkpoint):
                cb.follow(self.trainer)
        cfg = self.config_init[self.subcommand]
        if "weights_only" in cfg and cfg.get("weights_only") is None:
            cfg["weights_only"] = True

    def before_validate(self) -> None:
        self._before_run()

    def before_test(self) -> None:
        self._before_run()

    def after_test(self) -> None:
        """``cfseg test`` also writes the Dice of every test case (every process's, each case once) as
        ``<log dir>/test_cases.csv``."""
        if self.trainer.is_global_zero and self.model.case_scores:
            folder = Path(self.trainer.log_dir or self.trainer.default_root_dir)
            path = write_case_scores(self.model.case_scores, self.model.class_names, folder / "test_cases.csv")
            print(f"cfseg test: per-case Dice of {len(self.model.case_scores)} cases in {path}")

    def before_predict(self) -> None:
        """``cfseg predict`` writes NIfTI label maps (a :class:`NiftiPredictionWriter` under the run's folder unless
        the config names one) and does not also keep every prediction in memory."""
        self._before_run()
        if not any(isinstance(cb, BasePredictionWriter) for cb in self.trainer.callbacks):
            out = Path(self.trainer.default_root_dir) / "predictions"
            self.trainer.callbacks.append(NiftiPredictionWriter(str(out)))
        cfg = self.config_init[self.subcommand]
        if cfg.get("return_predictions") is None:
            cfg["return_predictions"] = False

    def before_fit(self) -> None:
        """A fit never overwrites a checkpoint file it does not resume from (:func:`cfseg.callbacks.overwrite_problem`);
        ``fit --ckpt_path`` resumes one stage: data annotating classes the checkpoint lacks are refused."""
        self._before_run()
        ckpt = self.config.fit.get("ckpt_path")
        problem = overwrite_problem(self.trainer.callbacks, ckpt)
        if problem:
            raise FileExistsError(problem)
        if not ckpt or not Path(str(ckpt)).is_file() or self.model.hparams.get("previous_checkpoint"):
            return
        known = set(self._ckpt_path_classes(ckpt))
        extra = sorted({c for d in self.datamodule.datasets if d.config.labeled for c in d.info.classes
                        if (d.config.classes is None or c in {canonical_name(x) for x in d.config.classes})
                        and c not in known})
        if extra:
            raise ValueError(
                f"{ckpt}: the data annotate {extra}, which this checkpoint does not know; resuming cannot add "
                "classes: start an incremental stage (model.previous_checkpoint=...) instead"
            )


def write_case_scores(cases: list[dict[str, Any]], classes: list[str], path: Path) -> Path:
    """A CSV of per-case Dice: ``dataset, case_id`` and one column per class (empty where a case does not annotate
    the class), written under a temporary name and renamed."""
    import csv

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["dataset", "case_id", *classes])
        for c in cases:
            dice = c["dice"]
            w.writerow([c["dataset"], c["case_id"], *(f"{dice[k]:.6f}" if k in dice else "" for k in classes)])
    os.replace(tmp, path)
    return path


def native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (oneDNN's check: AVX512-BF16 or AMX)."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def warn_slow_bf16(precision: str, accelerator: str) -> bool:
    """Warn (and return True) when bf16 autocast is asked for on a CPU without native bf16 (AVX512-BF16/AMX).

    Measured on an AVX2-only AMD EPYC: one MONAI UNet step (16-256 channels, 4 x 64^3) takes 1.0 s in float32
    and 24-27 s under bf16 autocast, where the conversions are emulated.
    """
    if "bf16" not in precision or "CPU" not in accelerator or native_bf16():
        return False
    warnings.warn(f"precision {precision!r} on a CPU without native bfloat16 (capability "
                  f"{torch.backends.cpu.get_cpu_capability()}): bf16 runs emulated, about 25x slower than float32 "
                  "here; use --trainer.precision=32-true", stacklevel=2)
    return True


def _class_path_specs(value: Any) -> list[dict]:
    """Every ``{"class_path": ...}`` mapping nested anywhere in ``value``."""
    if isinstance(value, dict):
        found = [value] if "class_path" in value else []
        return found + [s for v in value.values() for s in _class_path_specs(v)]
    if isinstance(value, (list, tuple)):
        return [s for v in value for s in _class_path_specs(v)]
    return []


def keep_freed_memory() -> bool:
    """Let glibc keep freed large blocks in the heap instead of unmapping them (``mallopt``).

    A training step allocates full-resolution temporaries of tens of MiB (features, logits, gradients); glibc hands
    every block of 32 MiB or more back to the kernel on ``free``, so each step pays the page faults of touching
    them afresh (``benchmarks/step_breakdown.py --malloc-keep`` measures it). Raising the mmap and trim
    thresholds makes such blocks reusable; the price is a process that keeps its peak heap. Linux/glibc only;
    ``CFSEG_MALLOC_KEEP=0`` turns it off.

    Returns:
        True when the thresholds were set.
    """
    if os.environ.get("CFSEG_MALLOC_KEEP", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_mmap_threshold, 2**30)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))
    except (OSError, AttributeError):  # not glibc: nothing to tune
        return False


def main(args: list[str] | None = None, callbacks: list[Callback] | None = None) -> CFSegCLI:
    """Run the CLI (``args`` default to ``sys.argv[1:]``); ``callbacks`` are added to the config's (Python callers:
    objects no config file can describe, e.g. one that watches a process)."""
    keep_freed_memory()
    _quiet_args_warning()
    return CFSegCLI(
        CFSegModule,
        SegDataModule,
        args=args,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={"callbacks": list(callbacks)} if callbacks else None,
    )


def _quiet_args_warning() -> None:
    """cfseg passes its own arguments (run(): sys.argv[1:]; the protocol and the demo: their configs), so Lightning's
    warning about ``args`` beside a command line only repeats the whole command line: silence it."""
    warnings.filterwarnings("ignore", message=r"LightningCLI's args parameter is intended to run from within Python")


class _ParseOnlyCLI(CFSegCLI):
    """Parses a ``cfseg fit`` command line (defaults, config files, links) and instantiates nothing."""

    def _set_seed(self) -> None:
        pass

    def instantiate_classes(self) -> None:
        pass

    def after_instantiate_classes(self) -> None:
        pass


def resolve_fit_config(args: list[str] | dict[str, Any]) -> dict[str, Any]:
    """The configuration ``cfseg fit <args>`` would train with, as plain data; nothing is built or read beyond
    the config files.

    Args:
        args: ``cfseg fit`` arguments without the ``fit`` subcommand (``--config``, ``--model.x=y``, ...), or the
            configuration as a mapping (``{"model": {...}, "data": {...}, "trainer": {...}}``).

    Returns:
        ``{"model": {...}, "data": {...}, "trainer": {...}, "seed_everything": ...}`` with every default filled in
        (class specs as ``{"class_path", "init_args"}`` dicts).
    """
    import json

    _quiet_args_warning()
    cli = _ParseOnlyCLI(CFSegModule, SegDataModule, args=args if isinstance(args, dict) else list(args), run=False,
                        save_config_callback=None)
    cfg = cli.config.clone()
    cfg.pop("config", None)
    return json.loads(json.dumps(cfg.as_dict(), default=str))


#: errors a user can cause (a bad path, config, dataset or checkpoint): one line, exit 2
USER_ERRORS = (DatasetError, FileNotFoundError, FileExistsError, ValueError)


def reporting_user_errors(prog: str, fn: Callable[[], Any]) -> int:
    """Run ``fn``: its exit status (0 when it returns no int), or 2 after one line ``<prog>: error: ...`` on stderr
    for a :data:`USER_ERRORS` error (``CFSEG_DEBUG=1``: the traceback instead)."""
    try:
        rc = fn()
    except USER_ERRORS as e:
        if os.environ.get("CFSEG_DEBUG"):
            raise
        print(f"{prog}: error: {one_line(str(e)) or type(e).__name__}", file=sys.stderr)
        return 2
    return rc if isinstance(rc, int) else 0


def run(args: list[str] | None = None) -> int:
    """Console entry point (``cfseg ...``): 0 on success, 2 with one line on a user error."""
    return reporting_user_errors("cfseg", lambda: main(sys.argv[1:] if args is None else args))


if __name__ == "__main__":
    sys.exit(run())
