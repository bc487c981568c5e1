"""What a continual-learning strategy is to the module: an object with hooks, owning its own settings.

:class:`cfseg.module.CFSegModule` holds one strategy (``model.strategy``) and calls its hooks; it never asks for a
strategy's name. A strategy (as Lightning's callbacks or Avalanche's plugins) can:

* :meth:`Strategy.setup`: start an incremental stage from the previous stage's model (keep it as a teacher, freeze
  parts, add an expert, take its Fisher);
* :meth:`Strategy.on_train_start`: resolve settings that depend on the stage's data;
* :meth:`Strategy.targets`: change a batch's labels (pseudo-labels) and say which voxels later terms use;
* :meth:`Strategy.encode`: run the student (e.g. capturing intermediate activations);
* :meth:`Strategy.penalty`: extra loss terms (distillation, EWC);
* :meth:`Strategy.end_of_stage`: statistics later stages read (router statistics, Fisher);
* :meth:`Strategy.statistics`: what it accumulated over batches, each reduced across processes (DDP);
* :meth:`Strategy.state_dict`: what it keeps in the checkpoint.

Under DDP each process sees its own share of the batches: whatever a strategy accumulates over batches must be
reduced across processes (:mod:`cfseg.distributed`) as it is accumulated. A strategy declares those statistics in
:meth:`Strategy.statistics`; at the end of the stage the module checks that each of them, and every tensor of
:meth:`Strategy.state_dict`, is the same on every process, and refuses to go on when one is not.

YAML picks one by class path (``model.strategy: {class_path: cfseg.continual.Distill, init_args: {kd_weight: 5}}``)
or by short name (``model.strategy: distill``); :func:`build_strategy` resolves both through an allow-list.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

if TYPE_CHECKING:  # the module holds the strategy; annotations only
    from cfseg.module import CFSegModule

#: packages whose :class:`Strategy` subclasses a config or a checkpoint may name
TRUSTED_STRATEGY_MODULES = ("cfseg.continual",)
_REGISTRY: dict[str, type[Strategy]] = {}


@dataclass
class StepContext:
    """One training step as the hooks see it.

    ``target`` [B, *S] (label values), ``annotated`` [B, K+1] bool and ``ignore_index`` are the labels the
    supervised loss uses (a strategy may replace them); ``dice_labels`` (target, annotated): the Dice term's labels
    where they differ from the cross-entropy's, and ``pseudo_dice_weight`` the weight of a Dice of their own over
    the classes ``target`` pseudo-labelled; ``keep`` [B, *S] bool: the voxels voxel-wise penalty terms average
    over (None: all). ``feats`` [B, F, *S], ``context``, ``acts`` and ``logits`` [B, K+1, *S] are the student's,
    filled by the module after :meth:`Strategy.targets`. ``extras`` holds a strategy's own per-step data.
    """

    batch: dict[str, Any]
    unlabeled: dict[str, Any] | None
    target: torch.Tensor
    annotated: torch.Tensor
    ignore_index: int | None = None
    dice_labels: tuple[torch.Tensor, torch.Tensor] | None = None
    pseudo_dice_weight: float = 0.0
    keep: torch.Tensor | None = None
    feats: torch.Tensor | None = None
    context: dict[str, torch.Tensor] | None = None
    acts: list[torch.Tensor] | None = None
    logits: torch.Tensor | None = None
    extras: dict[str, Any] | None = None


class Strategy:
    """A continual-learning strategy; this base class trains the whole network on the stage's data (fine-tuning).

    Class attributes describe what the strategy needs: ``requires_previous`` (it starts from a trained stage),
    ``allows_previous`` (False: it trains from scratch), ``softmax_only`` (it merges or distils softmax
    distributions, so sigmoid heads cannot use it in an incremental stage), ``keeps_first_stage_statistics``
    (a first stage trained with it stores the router statistics and the Fisher that later ``Experts``/``EWC``
    stages read), ``uses_unlabeled`` (a protocol gives it the stage's image-only datasets). ``lr_factor``
    multiplies the learning rate of an incremental stage (on top of ``model.incremental_lr_factor``).
    """

    lr_factor: float = 1.0

    short_name: ClassVar[str] = ""
    requires_previous: ClassVar[bool] = False
    allows_previous: ClassVar[bool] = True
    softmax_only: ClassVar[bool] = False
    keeps_first_stage_statistics: ClassVar[bool] = True
    uses_unlabeled: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("short_name"):
            _REGISTRY[cls.short_name] = cls

    # ---- description ---------------------------------------------------------------------------------
    def spec(self) -> dict[str, Any]:
        """``{"class_path", "init_args"}``: plain data that :func:`build_strategy` turns back into this strategy."""
        kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        params = [name for name, p in inspect.signature(type(self).__init__).parameters.items()
                  if name != "self" and p.kind in kinds]
        cls = type(self)
        public = cls.__module__.startswith("cfseg.continual.")  # every built-in strategy is exported there
        path = f"cfseg.continual.{cls.__qualname__}" if public else f"{cls.__module__}.{cls.__qualname__}"
        return {"class_path": path,
                "init_args": {p: _plain(getattr(self, p)) for p in params}}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.spec()["init_args"].items())
        return f"{type(self).__name__}({args})"

    def check(self, head_output: str, head_name: str, incremental: bool) -> None:
        """Refuse a stage this strategy cannot train (before anything is built).

        Args:
            head_output: the head's output kind (``"softmax"`` or ``"sigmoid"``).
            head_name: the head's class name (for the message).
            incremental: whether the stage starts from a previous checkpoint.
        """
        name = self.short_name or type(self).__name__
        if self.requires_previous and not incremental:
            raise ValueError(f"strategy {name!r} starts from a trained stage: give model.previous_checkpoint "
                             "(stage 0 trains the whole network with any other strategy)")
        if not self.allows_previous and incremental:
            raise ValueError(f"strategy {name!r} trains from scratch on all stages' data: drop previous_checkpoint")
        if self.softmax_only and incremental and head_output != "softmax":
            raise ValueError(f"strategy {name!r} merges or distils softmax distributions; the {head_name} has one "
                             "sigmoid per class: use strategy 'finetune' (or 'ewc')")

    # ---- hooks ---------------------------------------------------------------------------------------
    def setup(self, module: CFSegModule, teacher: CFSegModule) -> None:
        """An incremental stage: ``module`` already holds ``teacher``'s network, bank and experts."""
        if teacher.expert_layout is not None:
            raise ValueError("the previous checkpoint carries LoRA experts: continue it with strategy 'experts'")

    def on_train_start(self, module: CFSegModule) -> None:
        """The stage's training starts (its data module is known)."""

    def after_train_mode(self, module: CFSegModule) -> None:
        """``module.train()`` ran; e.g. keep frozen normalisation statistics fixed."""

    def targets(self, module: CFSegModule, step: StepContext) -> None:
        """Change ``step``'s labels before the student runs (default: the batch's own)."""

    def encode(self, module: CFSegModule, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor],
                                                                     list[torch.Tensor] | None]:
        """The student's features [B, F, *S], its head's context and captured activations (None)."""
        feats, context = module.net.encode(x)
        return feats, context, None

    def penalty(self, module: CFSegModule, step: StepContext) -> dict[str, torch.Tensor]:
        """Extra loss terms, each logged as ``train/<name>`` and added to the loss in order (default: none)."""
        return {}

    def records_expert(self, module: CFSegModule) -> int | None:
        """Which expert this stage trains (its record is replaced), or None: the whole network (expert 0) changed."""
        return None

    def end_of_stage(self, module: CFSegModule) -> None:
        """Once per fit, before the last checkpoint: a first stage stores router statistics and the Fisher."""
        if module.first_stage and self.keeps_first_stage_statistics:
            module.collect_router_statistics(expert=0)
            module.collect_fisher()

    def statistics(self) -> dict[str, torch.Tensor]:
        """The statistics this strategy accumulated over the stage's batches, by name (default: none).

        Each must be global: reduced across processes as it is accumulated (a sum over ranks of each rank's part,
        :func:`cfseg.distributed.global_sum`; rows gathered, :func:`cfseg.distributed.gather_rows`), and counts of
        batches global too (:func:`cfseg.distributed.per_rank`), so that two processes give what one process gives
        over the same cases. :meth:`cfseg.module.CFSegModule.end_of_stage` checks that every one is identical on
        every process.
        """
        return {}

    def state_dict(self) -> dict[str, Any]:
        """What the strategy keeps in the checkpoint (plain data; default: nothing)."""
        return {}


class Finetune(Strategy):
    """Start from the previous stage's weights and train everything on the new data: the lower bound."""

    short_name = "finetune"


class Joint(Strategy):
    """Train from scratch on every stage's data at once (the protocol gives it the cumulative budget)."""

    short_name = "joint"
    allows_previous = False
    keeps_first_stage_statistics = False


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def strategy_classes() -> dict[str, type[Strategy]]:
    """The strategies with a short name (every one :mod:`cfseg.continual` defines registers itself)."""
    return dict(_REGISTRY)


def build_strategy(value: Strategy | str | dict[str, Any] | None) -> Strategy:
    """A strategy from an object, a short name (``"distill"``) or a spec ``{"class_path", "init_args"}``.

    Specs may name :class:`Strategy` subclasses of :data:`TRUSTED_STRATEGY_MODULES` only; anything else is refused
    before it is imported.

    Raises:
        ValueError: an unknown short name, a malformed spec or a class outside the allow-list.
    """
    if value is None:
        value = "distill"
    if isinstance(value, Strategy):
        return value
    known = strategy_classes()
    if isinstance(value, str):
        if value not in known:
            raise ValueError(f"strategy must be one of {sorted(known)} or a class_path spec, got {value!r}")
        return known[value]()
    if not isinstance(value, dict) or not isinstance(value.get("class_path"), str):
        raise ValueError(f"a strategy spec is {{class_path: ..., init_args: {{...}}}}, got {value!r}")
    path = value["class_path"]
    if "." not in path and path in known:
        cls: type = known[path]
    else:
        mod, _, name = path.rpartition(".")
        if not any(mod == m or mod.startswith(m + ".") for m in TRUSTED_STRATEGY_MODULES):
            raise ValueError(f"refusing strategy {path!r}: only strategies of {TRUSTED_STRATEGY_MODULES} are allowed")
        cls = getattr(importlib.import_module(mod), name, None)
        if not (isinstance(cls, type) and issubclass(cls, Strategy)):
            raise ValueError(f"{path!r} is not a cfseg strategy (a cfseg.continual.strategy.Strategy subclass)")
    init_args = value.get("init_args") or {}
    if not isinstance(init_args, dict):
        raise ValueError(f"{path}: init_args must be a mapping, got {init_args!r}")
    return cls(**init_args)
