"""What passes from one stage to the next: the teacher's bank extended by new classes, the statistics a stage
leaves for later ones, and the end-of-stage callback.

An incremental stage starts from the previous stage's checkpoint (``model.previous_checkpoint``): the student takes
its network, bank (old prototypes bit-identical, new classes appended), preprocessing, stage history and experts,
and the strategy decides the rest (:meth:`cfseg.continual.strategy.Strategy.setup`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import lightning as L

from cfseg.bank import PrototypeBank
from cfseg.heads import DEFAULT_BOTTLENECK_LAYER, Head
from cfseg.text.encoders import build_encoder
from cfseg.vocab import Vocabulary

if TYPE_CHECKING:  # annotations only: the module imports this file
    from cfseg.module import CFSegModule

#: MONAI UNet's bottleneck convolution *before* its instance normalisation (the deepest match): after the norm, the
#: per-channel mean and spread of a block's output are normalised away and cannot tell one scanner from another
DEFAULT_ROUTER_LAYER = DEFAULT_BOTTLENECK_LAYER


@dataclass
class StageStatistics:
    """Statistics a stage leaves for later stages, stored in its checkpoint: collected at the end of a first stage
    and of the stages whose strategy asks (router statistics: ``Experts``; Fisher: ``EWC``).

    Args:
        router_layer: regular expression of the backbone module whose output, pooled (mean and standard deviation
            per channel), is the analytic router's feature; the deepest match is used.
        router_gamma: ridge regularisation ``gamma`` of the expert router.
        router_random_features: width of the router's fixed random ReLU feature expansion (0: none).
        router_batches: training batches whose (frozen shared network) features feed the router's statistics;
            the modality router takes up to this many training cases per dataset (0: no routers).
        router_modality_gamma: ridge ``gamma`` of the modality router (its rows are whole-volume windows, far
            fewer than the expert router's crops).
        fisher_batches: training batches whose squared loss gradients give the diagonal Fisher (0: none, and no
            later ``EWC`` stage).
    """

    router_layer: str = DEFAULT_ROUTER_LAYER
    router_gamma: float = 1.0
    router_random_features: int = 0
    router_batches: int = 16
    router_modality_gamma: float = 0.01
    fisher_batches: int = 8

    @classmethod
    def build(cls, value: StageStatistics | dict[str, Any] | None) -> StageStatistics:
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"model.statistics must be a mapping of {list(asdict(cls()))}, got {value!r}")
        unknown = sorted(set(value) - set(asdict(cls())))
        if unknown:
            raise ValueError(f"unknown model.statistics settings {unknown}; known: {list(asdict(cls()))}")
        return cls(**value)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def training_batches(loader: Iterable[Any]) -> Iterator[dict[str, Any]]:
    """The labelled part of ``loader``'s batches, pass after pass (a short loader repeats; an empty one ends)."""
    while True:
        n = 0
        for batch in loader:
            n += 1
            yield batch["labeled"] if isinstance(batch, dict) and "labeled" in batch else batch
        if n == 0:
            return


class EndOfStage(L.Callback):
    """Calls :meth:`CFSegModule.end_of_stage` (router statistics, Fisher) at the end of the last training epoch
    (Lightning runs model callbacks before checkpoint callbacks, so the checkpoint of that epoch carries them)."""

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        last_step = 0 < trainer.max_steps <= trainer.global_step
        last_epoch = trainer.max_epochs not in (None, -1) and trainer.current_epoch + 1 >= trainer.max_epochs
        if (last_step or last_epoch) and hasattr(pl_module, "end_of_stage"):
            pl_module.end_of_stage()


def same_backbone(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return json.loads(json.dumps(a)) == json.loads(json.dumps(b))


def extend_teacher_bank(teacher: CFSegModule, class_names: list[str] | None, new_classes: list[str] | None,
                        encoder: str, backbone: dict[str, Any], head_cls: type[Head]) -> PrototypeBank:
    """The teacher's bank with this stage's new classes appended (old rows bit-identical)."""
    if not same_backbone(teacher.hparams.backbone, backbone):
        raise ValueError(
            f"the previous checkpoint has another backbone:\n  previous: {teacher.hparams.backbone}\n"
            f"  this stage: {backbone}\nan incremental stage must keep the teacher's network"
        )
    old = teacher.bank.classes
    # the data's order decides (it indexes the labels); new_classes only declares which classes are new
    from_data = [c for c in Vocabulary(class_names or []).classes if c not in old]
    if new_classes is not None:
        declared = Vocabulary(new_classes).classes
        again = [c for c in new_classes if c in teacher.bank.names or Vocabulary([c]).classes[0] in old]
        if again:
            raise ValueError(
                f"new_classes repeats classes the previous checkpoint already knows: {again} "
                f"(known: {old}); a stage adds only new class names"
            )
        if class_names and set(declared) != set(from_data):
            raise ValueError(
                f"new_classes {declared} differ from the classes the data adds to the previous checkpoint's "
                f"{old}: {from_data}; list the same classes (their order follows the data)"
            )
        added = from_data if class_names else declared
    else:
        added = from_data
    if type(teacher.head) is not head_cls:
        raise ValueError(f"the previous checkpoint has a {type(teacher.head).__name__}, this stage a "
                         f"{head_cls.__name__}; an incremental stage must keep the teacher's head")
    if added and not head_cls.open_vocabulary:
        raise ValueError(f"a {head_cls.__name__} cannot add classes (its layers fix the class count); use head: "
                         "prototype (or cfseg.heads.UniversalHead) for class-incremental stages")
    bank = PrototypeBank.from_state(teacher.bank.state())
    if added:
        bank.extend(added, build_encoder(encoder))
    return bank

