"""The LightningModule: a segmenter, a prototype bank, the partial-label loss, a continual strategy, whole-volume
validation.

The class list comes from the data module (linked by the CLI). The backbone is injected as a
``{"class_path": ..., "init_args": {...}}`` spec (any MONAI 3D network mapping an image to F full-resolution
feature channels), kept as plain data so that a checkpoint rebuilds the network without pickled code. The
continual strategy is an object (:mod:`cfseg.continual`) whose hooks the module calls; the module never asks which
strategy it holds. Checkpoints are self-describing (:mod:`cfseg.checkpoint`).
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Callable, Iterable, Sequence
from functools import partial
from typing import Any

import lightning as L
import numpy as np
import torch
from monai import transforms as mt
from monai.inferers import sliding_window_inference
from torch import nn

from cfseg.bank import PROTOTYPE_METHODS, PrototypeBank
from cfseg.builder import UntrustedSpecError, build_network, check_spec, resolve_class
from cfseg.checkpoint import (
    CHECKPOINT_FORMAT,
    check_fisher,
    check_format,
    merge_preprocessing,
    module_settings,
    read_checkpoint,
)
from cfseg.continual import experts
from cfseg.continual.distill import pseudo_dice_labels
from cfseg.continual.ewc import stage_fisher
from cfseg.continual.routing import RoutedExperts
from cfseg.continual.stages import EndOfStage, StageStatistics, extend_teacher_bank, training_batches
from cfseg.continual.strategy import StepContext, build_strategy
from cfseg.data.transforms import Preprocessing, deterministic_transforms, neutral_view
from cfseg.distributed import check_identical, gather_objects
from cfseg.folding import folded_predictor
from cfseg.geometry import labels_to_input_grid
from cfseg.heads import DEFAULT_BOTTLENECK_LAYER, HEAD_SHORTHANDS, Head, bottleneck_channels, head_spec
from cfseg.losses import LossWeights, ambiguous_entropy, exclusion_loss
from cfseg.metrics import PerClassDice, dice_per_class
from cfseg.nets import Segmenter, deep_supervision_weights, segmenter
from cfseg.ood import DomainStatistics, fit_domain_statistics
from cfseg.text.encoders import build_encoder
from cfseg.vocab import Vocabulary

log = logging.getLogger(__name__)

DEFAULT_BACKBONE: dict[str, Any] = {
    "class_path": "monai.networks.nets.UNet",
    "init_args": {
        "spatial_dims": 3, "in_channels": 1, "out_channels": 32, "channels": [16, 32, 64, 128],
        "strides": [2, 2, 2], "num_res_units": 1,
    },
}
OPTIMIZERS = ("adamw", "sgd")  # model.optimizer_name
LR_SCHEDULES = ("cosine", "poly")  # model.lr_schedule


def lr_factor(step: int, total: int, warmup: int, kind: str = "cosine") -> float:
    """Multiplier of the base lr at optimizer step ``step`` of ``total``: linear warm-up over ``warmup`` steps, then
    cosine decay to 0 (``"cosine"``) or nnU-Net's polynomial ``(1 - t) ** 0.9`` (``"poly"``), ``t`` the fraction of
    the post-warm-up steps done (clipped to 1)."""
    if step < warmup:
        return (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return (1.0 - t) ** 0.9 if kind == "poly" else 0.5 * (1 + math.cos(math.pi * t))


HEADS = tuple(HEAD_SHORTHANDS)  # the head shorthands; any cfseg.heads class (or a trusted one) by class_path
#: constructor arguments a checkpoint's hyper-parameters never set (they come from the checkpoint's metadata)
LOAD_SKIP = frozenset({"self", "class_names", "preprocessing", "previous_checkpoint", "new_classes", "trusted_modules",
                       "bank_state", "optimizer", "experts_state", "strategy"})


class CFSegModule(RoutedExperts, L.LightningModule):
    """Classifier-free (or another injected head's) 3D segmentation with partial labels and a continual strategy.

    The head (:mod:`cfseg.heads`) decides what the logits mean: the loss, the label rule and the probabilities are
    asked of it (:meth:`cfseg.heads.Head.loss`, ``labels``, ``probabilities``), never chosen by its type. The
    strategy (:mod:`cfseg.continual`) decides what an incremental stage keeps of the previous one.

    Args:
        class_names: foreground classes in global order (linked from ``data.class_names`` by the CLI).
        backbone: network spec ``{"class_path", "init_args"}``; its output channels are the features F.
        feature_channels: F; must equal the backbone's output channels.
        head: a spec ``{"class_path", "init_args"}`` of a :class:`cfseg.heads.Head` (allow-listed as the backbone)
            or a shorthand: ``"prototype"`` (cosine logits against text prototypes, cfseg's method) or
            ``"softmax"`` (a 1x1x1 conv with K+1 outputs). Constructor arguments the spec leaves out are filled
            where the head takes them: ``feature_channels``, ``num_classes`` (K+1), ``embed_dim``, ``text_dim``,
            ``bottleneck_channels``, ``temperature``, ``learnable_temperature``, ``hidden_channels``.
        encoder: text encoder spec for the prototypes (:func:`cfseg.text.encoders.build_encoder`): ``"minilm"``
            (offline default), ``"open_clip:ViT-B-32:/path/weights.bin"``, ``"bank:/path.json"``.
        prompt_modality: prompt template set (``"ct"``, ``"mri"``, ``"generic"``).
        prototypes: how prototypes are made (:meth:`cfseg.bank.PrototypeBank.build`): ``"text"`` (Gram-Schmidt on
            the class text embeddings), ``"random"`` (seeded random orthonormal vectors) or ``"text_no_gs"``. Only
            ``"text"`` banks take new classes; an incremental stage must name its previous bank's method.
        prototype_order: Gram-Schmidt order of ``prototypes: text`` (class names, or ``"reversed"``); default: the
            class order. Unused in an incremental stage (new classes come after the earlier ones).
        prototype_seed: seed of ``prototypes: random``.
        temperature: cosine-logit temperature tau.
        learnable_temperature: learn tau.
        hidden_channels: optional per-voxel hidden layer before the projection.
        lr: learning rate of the built-in optimizer (used when ``optimizer`` is not given).
        incremental_lr_factor: multiplies ``lr`` in an incremental stage (built-in optimizer only).
        weight_decay: weight decay of the built-in optimizer.
        warmup_fraction: fraction of steps with linear warm-up before the decay.
        optimizer_name: the built-in optimizer: ``"adamw"`` or ``"sgd"`` (Nesterov momentum 0.99, as nnU-Net).
        lr_schedule: ``"cosine"`` (warm-up, then cosine decay to 0) or ``"poly"`` (warm-up, then nnU-Net's
            ``(1 - t / T) ** 0.9``), per step over the run's ``max_steps``.
        loss_weights: weights of the supervised loss (:class:`cfseg.losses.LossWeights`: ``ce_weight``,
            ``dice_weight``, ``batch_dice``, ``exclusion_weight``, ``entropy_weight``).
        roi_size: sliding-window size for validation/inference (linked to the training patch).
        sw_batch_size: windows per forward pass.
        sw_overlap: window overlap.
        preprocessing: per-modality preprocessing (linked from the data module); stored in checkpoints.
        previous_checkpoint: the previous stage's checkpoint (an incremental stage): the student starts from its
            network, its prototypes stay bit-identical and new classes are appended; the strategy decides the rest.
        strategy: the continual strategy: its spec ``{"class_path": "cfseg.continual.Distill", "init_args": {...}}``,
            a short name (``"distill"``, ``"finetune"``, ``"experts"``, ``"ewc"``, ``"replay"``, ``"joint"``) or, from
            Python, a :class:`cfseg.continual.Strategy` object. Specs go through the strategies' allow-list
            (:func:`cfseg.continual.build_strategy`): a config naming anything else is refused before it is imported.
        new_classes: the classes this stage adds (checked against the previous checkpoint; inferred from
            ``class_names`` when None).
        statistics: what a stage stores for later stages (:class:`cfseg.continual.StageStatistics`: router and
            Fisher settings).
        optimizer: optional callable ``params -> Optimizer`` (LightningCLI injection).
        bank_state: a saved bank (:meth:`PrototypeBank.state`) to restore instead of encoding names (loading).
        experts_state: the saved experts metadata (:meth:`experts_state`) of a checkpoint (loading).
        trusted_modules: packages besides MONAI's networks, ``cfseg.nets`` and ``cfseg.heads`` that ``backbone`` and
            ``head`` may name (:mod:`cfseg.builder`). Never read back from a checkpoint.
    """

    def __init__(
        self,
        class_names: list[str] | None = None,
        backbone: dict[str, Any] | None = None,
        feature_channels: int = 32,
        head: str | dict[str, Any] = "prototype",
        encoder: str = "minilm",
        prompt_modality: str = "ct",
        prototypes: str = "text",
        prototype_order: list[str] | str | None = None,
        prototype_seed: int = 0,
        temperature: float = 0.07,
        learnable_temperature: bool = False,
        hidden_channels: int | None = None,
        lr: float = 2e-3,
        incremental_lr_factor: float = 1.0,
        weight_decay: float = 1e-5,
        warmup_fraction: float = 0.05,
        optimizer_name: str = "adamw",
        lr_schedule: str = "cosine",
        loss_weights: LossWeights | dict[str, Any] | None = None,
        roi_size: tuple[int, int, int] = (64, 64, 64),
        sw_batch_size: int = 2,
        sw_overlap: float = 0.25,
        preprocessing: dict[str, Any] | None = None,
        previous_checkpoint: str | None = None,
        strategy: str | dict[str, Any] | None = "distill",
        new_classes: list[str] | None = None,
        statistics: StageStatistics | dict[str, Any] | None = None,
        optimizer: Callable[[Iterable], torch.optim.Optimizer] | None = None,
        bank_state: dict[str, Any] | None = None,
        experts_state: dict[str, Any] | None = None,
        trusted_modules: list[str] | None = None,
    ):
        super().__init__()
        head_cls = resolve_class(head_spec(head), trusted_modules)  # the allow-list first: nothing else is built
        if not issubclass(head_cls, Head):
            raise UntrustedSpecError(f"refusing {head_spec(head)['class_path']!r} as a head: not a cfseg.heads.Head")
        self.strategy = build_strategy(strategy)
        self.strategy.check(head_cls.output, head_cls.__name__, bool(previous_checkpoint))
        self.statistics = StageStatistics.build(statistics)
        self.loss_weights = LossWeights.build(loss_weights)
        for name in ("exclusion_weight", "entropy_weight"):
            if getattr(self.loss_weights, name) > 0 and head_cls.output != "softmax":
                raise ValueError(f"{name} regularises one softmax distribution over the classes; the "
                                 f"{head_cls.__name__} has one sigmoid per class: set {name}: 0 or use a softmax "
                                 "head (softmax, prototype)")
        if not (isinstance(incremental_lr_factor, (int, float)) and math.isfinite(incremental_lr_factor)
                and incremental_lr_factor > 0):
            raise ValueError(f"incremental_lr_factor must be a finite number > 0, got {incremental_lr_factor!r}")
        if optimizer_name not in OPTIMIZERS:
            raise ValueError(f"optimizer_name must be one of {OPTIMIZERS}, got {optimizer_name!r}")
        if lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {lr_schedule!r}")
        if bank_state is None and not class_names and not previous_checkpoint:
            raise ValueError("class_names is empty: give model.class_names or link it from the data module")
        self.save_hyperparameters(ignore=["optimizer", "bank_state", "experts_state", "strategy", "statistics",
                                          "loss_weights"])
        self.hparams["strategy"] = self.strategy.spec()  # plain data: a checkpoint never holds code
        self.hparams["statistics"] = self.statistics.to_dict()
        self.hparams["loss_weights"] = self.loss_weights.to_dict()
        self.hparams["backbone"] = backbone = backbone or DEFAULT_BACKBONE
        teacher = load_checkpoint(previous_checkpoint, trusted_modules=trusted_modules) if previous_checkpoint else None
        self.bank = self._make_bank(teacher, class_names, new_classes, backbone, head_cls, bank_state)
        self.hparams["class_names"] = self.bank.classes
        net_backbone = build_network(backbone, trusted_modules)
        self.net: Segmenter = segmenter(net_backbone, self._build_head(head, net_backbone, trusted_modules),
                                        feature_channels)
        self._optimizer_fn = optimizer
        self.preprocessing = preprocessing or {}
        self.stage_history: list[dict[str, Any]] = []
        self._n_earlier_stages = 0  # stage entries of earlier stages; this stage's entry comes after them
        self.n_old = 0  # classes of the previous stage (background excluded)
        self._stage_done = True  # end-of-stage statistics are collected once per fit (reset when training starts)
        self.ewc_fisher: dict[str, torch.Tensor] | None = None  # accumulated importance, saved in the checkpoint
        self.domain_statistics: DomainStatistics | None = None  # what training images looked like (cfseg.ood)
        self.init_experts()
        if experts_state is not None:
            self.restore_experts(experts_state)
        if teacher is not None:
            self.start_experts_from(teacher)
            self.net.load_state_dict(teacher.net.state_dict())
            self.preprocessing = merge_preprocessing(teacher.preprocessing, self.preprocessing, previous_checkpoint)
            self.stage_history = list(teacher.stage_history)
            self._n_earlier_stages = len(self.stage_history)
            self.n_old = len(teacher.bank.names) - 1
            self.strategy.setup(self, teacher)
        self.val_dice = PerClassDice(len(self.bank.names))
        self._cases: list[dict[str, Any]] = []  # this process's scored cases of the running evaluation
        self.case_scores: list[dict[str, Any]] = []  # the last evaluation's cases, every process's

    def _make_bank(self, teacher: CFSegModule | None, class_names: list[str] | None, new_classes: list[str] | None,
                   backbone: dict[str, Any], head_cls: type[Head],
                   bank_state: dict[str, Any] | None) -> PrototypeBank:
        """The previous stage's bank extended by the new classes, a saved bank, or a new one from the names."""
        h = self.hparams
        if h.prototypes not in PROTOTYPE_METHODS:
            raise ValueError(f"prototypes must be one of {PROTOTYPE_METHODS}, got {h.prototypes!r}")
        if teacher is not None:
            if teacher.bank.method != h.prototypes:
                raise ValueError(f"the previous checkpoint's prototypes are {teacher.bank.method!r}, this stage asks "
                                 f"for {h.prototypes!r}: an incremental stage keeps the previous bank (set "
                                 f"model.prototypes: {teacher.bank.method})")
            if h.prototype_order is not None:
                log.warning("model.prototype_order is not used in an incremental stage: the previous checkpoint's "
                            "prototypes stay bit-identical and new classes are orthogonalised after them")
            bank = extend_teacher_bank(teacher, class_names, new_classes, h.encoder, backbone, head_cls)
        elif bank_state is not None:
            bank = PrototypeBank.from_state(bank_state)
        else:
            bank = PrototypeBank.build(Vocabulary(class_names).classes, build_encoder(h.encoder),
                                       modality=h.prompt_modality, method=h.prototypes, order=h.prototype_order,
                                       seed=h.prototype_seed)
        if class_names and bank.classes != Vocabulary(class_names).classes:
            raise ValueError(  # indices must follow names: the data indexes labels in class_names' order
                f"class order mismatch: the model's classes are {bank.classes} but the data indexes labels "
                f"as {Vocabulary(class_names).classes}"
            )
        return bank


    @property
    def first_stage(self) -> bool:
        """Whether this stage starts from scratch (no previous checkpoint)."""
        return not self.hparams.previous_checkpoint

    @property
    def teacher(self) -> CFSegModule | None:
        """The strategy's frozen previous-stage model, if it keeps one."""
        return getattr(self.strategy, "teacher", None)

    @property
    def class_names(self) -> list[str]:
        return self.bank.classes

    @property
    def prototypes(self) -> torch.Tensor:
        """[K+1, D] orthonormal prototypes (background first)."""
        return self.bank.prototypes

    @property
    def n_experts(self) -> int:
        """Experts of the network including expert 0 (the shared weights); 1 without LoRA experts."""
        if self.expert_layout is None:  # no LoRA attached (the forward path asks this per window batch)
            return 1
        return experts.n_experts(self.net)

    def train(self, mode: bool = True) -> CFSegModule:
        """As ``nn.Module.train``, then the strategy's :meth:`~cfseg.continual.Strategy.after_train_mode`."""
        super().train(mode)
        if mode and hasattr(self, "strategy"):
            self.strategy.after_train_mode(self)
        return self

    # ---- forward -------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, class_indices: Sequence[int] | None = None) -> torch.Tensor:
        """Logits [B, K'+1, *S] over background plus ``class_indices`` (all classes when None).

        With LoRA experts outside training, each class comes from the expert that serves it
        (:meth:`~cfseg.continual.routing.RoutedExperts.experts_forward`).
        """
        if self.n_experts > 1 and not self.training:
            return self.experts_forward(x, class_indices)
        return self.forward_active(x, class_indices)

    def logits_from_features(self, feats: torch.Tensor, context: dict[str, torch.Tensor]) -> torch.Tensor:
        """Logits [B, K+1, *S] over every class from features [B, F, *S] and the backbone's ``context``."""
        return self.net.logits(feats, None, **self.head_context(), **context)

    def _build_head(self, head: str | dict[str, Any], backbone: nn.Module, trusted_modules: list[str] | None) -> Head:
        """The head ``head`` names, its missing constructor arguments filled from this module and the backbone."""
        spec = head_spec(head)
        h = self.hparams
        defaults: dict[str, Any] = {
            "feature_channels": h.feature_channels, "num_classes": len(self.bank.names), "embed_dim": self.bank.dim,
            "text_dim": int(self.bank.embeddings.shape[1]), "temperature": h.temperature,
            "learnable_temperature": h.learnable_temperature, "hidden_channels": h.hidden_channels,
        }
        params = inspect.signature(resolve_class(spec, trusted_modules).__init__).parameters
        if "bottleneck_channels" in params and "bottleneck_channels" not in spec["init_args"]:
            layer = spec["init_args"].get("bottleneck_layer", params["bottleneck_layer"].default
                                          if "bottleneck_layer" in params else DEFAULT_BOTTLENECK_LAYER)
            defaults["bottleneck_channels"] = bottleneck_channels(backbone, layer)
        return build_network(spec, trusted_modules, defaults)

    @property
    def head(self) -> Head:
        """The segmenter's head (:mod:`cfseg.heads`): what the output means, its loss and its label rule."""
        return self.net.head

    def head_context(self) -> dict[str, torch.Tensor]:
        """What the bank gives every head (each reads what it needs): ``prototypes`` [K+1, D] and
        ``text_embeddings`` [K+1, E] (the raw class embeddings before Gram-Schmidt)."""
        return {"prototypes": self.bank.prototypes, "text_embeddings": self.bank.embeddings}

    def forward_active(self, x: torch.Tensor, class_indices: Sequence[int] | None = None) -> torch.Tensor:
        """Logits of the active expert (the plain network without experts). x [B, C, *S] -> [B, K'+1, *S]."""
        return self.net.segment(x, class_indices, **self.head_context())

    def sliding_window_logits(self, image: torch.Tensor, class_indices: Sequence[int] | None = None,
                              sw_device: torch.device | str | None = None,
                              device: torch.device | str | None = None) -> torch.Tensor:
        """Whole-volume logits by Gaussian-weighted sliding windows. image [B, C, *S] -> [B, K'+1, *S].

        Args:
            sw_device: where the windows run; default the module's own device (so CUDA windows stay on the GPU).
            device: where the stitched output lives; default ``image``'s device (``"cpu"`` bounds GPU memory).
        """
        h = self.hparams
        if sw_device is None:
            sw_device = next(self.parameters()).device
        if self.n_experts > 1 and not self.training:
            if image.shape[0] > 1:  # one route per volume
                return torch.cat([self.sliding_window_logits(image[b:b + 1], class_indices, sw_device, device)
                                  for b in range(image.shape[0])])
            self.last_route = None
            if self.route_override is None and self.can_route:
                with torch.no_grad():
                    self.last_route = self.route(image)
        predictor = None
        if self.n_experts <= 1:  # the prototype head's normalisation folded into the backbone (cfseg.folding)
            predictor = folded_predictor(self.net, class_indices, self.head_context())
        return sliding_window_inference(
            image, roi_size=tuple(h.roi_size), sw_batch_size=h.sw_batch_size,
            predictor=predictor or (lambda x: self(x, class_indices)), overlap=h.sw_overlap, mode="gaussian",
            sw_device=sw_device, device=device if device is not None else image.device,
        )


    def loss(self, logits: torch.Tensor, batch: dict[str, Any], target: torch.Tensor | None = None,
             annotated: torch.Tensor | None = None, ignore_index: int | None = None) -> torch.Tensor:
        """The sum of :meth:`loss_terms`."""
        terms = self.loss_terms(logits, batch, target, annotated, ignore_index)
        return sum(terms.values(), torch.zeros((), dtype=terms["partial"].dtype, device=terms["partial"].device))

    def loss_terms(self, logits: torch.Tensor, batch: dict[str, Any], target: torch.Tensor | None = None,
                   annotated: torch.Tensor | None = None, ignore_index: int | None = None,
                   dice_labels: tuple[torch.Tensor, torch.Tensor] | None = None,
                   pseudo_dice_weight: float = 0.0) -> dict[str, torch.Tensor]:
        """Weighted supervised loss terms of ``logits`` [B, K+1, *S]; ``target`` [B, *S] / ``annotated`` [B, K+1]
        replace the batch's (pseudo-labels). ``dice_labels`` (target, annotated): the Dice term's labels where they
        differ from the cross-entropy's (pseudo-labels in the cross-entropy only; no ignored voxels).

        Keys: ``partial`` (the head's partial-label loss, :meth:`cfseg.heads.Head.loss`), and with a positive
        weight ``exclusion`` (:func:`cfseg.losses.exclusion_loss`), ``entropy``
        (:func:`cfseg.losses.ambiguous_entropy`) and, when ``dice_labels`` are given, ``pseudo_dice`` (the Dice
        of the classes ``target`` pseudo-labelled, ``pseudo_dice_weight``).
        """
        target = batch["label"][:, 0].long() if target is None else target
        annotated = batch["annotated"].bool() if annotated is None else annotated
        h = self.loss_weights
        batch_dice = h.batch_dice
        if dice_labels is None:
            partial = self.head.loss(logits, target, annotated, ce_weight=h.ce_weight, dice_weight=h.dice_weight,
                                     ignore_index=ignore_index, batch_dice=batch_dice)
        else:
            partial = self.head.loss(logits, target, annotated, ce_weight=h.ce_weight, dice_weight=0.0,
                                     ignore_index=ignore_index, batch_dice=batch_dice) \
                + self.head.loss(logits, *dice_labels, ce_weight=0.0, dice_weight=h.dice_weight, batch_dice=batch_dice)
        terms = {"partial": partial}
        if dice_labels is not None and pseudo_dice_weight > 0:
            t_p, ann_p = pseudo_dice_labels(target, annotated, dice_labels[1], ignore_index)
            terms["pseudo_dice"] = self.head.loss(logits, t_p, ann_p, ce_weight=0.0, dice_weight=pseudo_dice_weight,
                                                  ignore_index=ignore_index, batch_dice=batch_dice)
        if h.exclusion_weight > 0:
            terms["exclusion"] = h.exclusion_weight * exclusion_loss(logits, target, annotated, ignore_index)
        if h.entropy_weight > 0:
            terms["entropy"] = h.entropy_weight * ambiguous_entropy(logits, target, annotated, ignore_index)
        return terms


    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        """The supervised loss on the strategy's targets plus the strategy's penalty terms."""
        unlabeled = None
        if "labeled" in batch:  # CombinedLoader with image-only entries
            batch, unlabeled = batch["labeled"], batch.get("unlabeled")
        x = batch["image"]
        bs = len(x)
        step = StepContext(batch, unlabeled, batch["label"][:, 0].long(), batch["annotated"].bool())
        self.strategy.targets(self, step)
        step.feats, step.context, step.acts = self.strategy.encode(self, x)
        deep = step.context.pop("deep_features", ())  # a deep-supervised backbone's extra outputs' features
        step.logits = self.logits_from_features(step.feats, step.context)
        supervised = self.loss_terms(step.logits, batch, step.target, step.annotated, step.ignore_index,
                                     step.dice_labels, step.pseudo_dice_weight)
        if deep:  # nnU-Net's deep supervision: the same targets on every output, weights 1, 1/2, 1/4, ... (sum 1)
            weights = deep_supervision_weights(1 + len(deep))
            supervised = {name: weights[0] * term for name, term in supervised.items()}
            for w, feats in zip(weights[1:], deep, strict=True):
                extra = self.loss_terms(self.logits_from_features(feats, step.context), batch, step.target,
                                        step.annotated, step.ignore_index, step.dice_labels, step.pseudo_dice_weight)
                supervised = {name: term + w * extra[name] for name, term in supervised.items()}
        loss = sum(supervised.values(), step.logits.new_zeros(()).float())
        for name in ("exclusion", "entropy", "pseudo_dice"):
            if name in supervised:
                self.log(f"train/{name}", supervised[name], on_step=True, on_epoch=True, batch_size=bs)
        for name, term in self.strategy.penalty(self, step).items():
            self.log(f"train/{name}", term, on_step=True, on_epoch=True, batch_size=bs)
            loss = loss + term
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=bs)
        return loss

    def _evaluate_volume(self, batch: dict[str, Any]) -> None:
        logits = self.sliding_window_logits(batch["image"])
        pred = self.head.labels(logits)
        target = batch["label"][:, 0].long()
        for b in range(pred.shape[0]):
            ks = [k for k in torch.nonzero(batch["annotated"][b]).flatten().tolist() if k > 0]
            dice = dice_per_class(pred[b].cpu(), target[b].cpu(), ks)
            self.val_dice.update(ks, dice)
            self._cases.append({"dataset": str(batch.get("dataset", ["?"] * len(pred))[b]),
                                "case_id": str(batch.get("case_id", ["?"] * len(pred))[b]),
                                "dice": {self.bank.names[k]: float(d) for k, d in zip(ks, dice.tolist(), strict=True)}})

    def _log_dice(self, prefix: str) -> None:
        """Log the mean Dice per class and over classes, and keep :attr:`case_scores`: every process's cases
        (gathered, so under DDP too), sorted by dataset and case."""
        per_class = self.val_dice.compute()  # every rank calls this once (DDP-safe)
        self.val_dice.reset()
        self.case_scores = sorted((c for part in gather_objects(self._cases) for c in part),
                                  key=lambda c: (c["dataset"], c["case_id"]))
        self._cases = []
        self.log(f"{prefix}/n_cases", float(len(self.case_scores)), rank_zero_only=True)
        scored = [(n, per_class[k]) for k, n in enumerate(self.bank.names) if k > 0 and not per_class[k].isnan()]
        for name, v in scored:  # classes never annotated in these cases are not scored
            self.log(f"{prefix}/dice_{name}", v.float(), rank_zero_only=True)
        if scored:
            self.log(f"{prefix}/mean_dice", torch.stack([v for _, v in scored]).mean().float(), prog_bar=True,
                     rank_zero_only=True)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate_volume(batch)

    def on_validation_epoch_end(self) -> None:
        self._log_dice("val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate_volume(batch)

    def on_test_epoch_end(self) -> None:
        self._log_dice("test")

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        """Label maps on each input's own voxel grid (written by the CLI's prediction writer).

        The collated ``image`` MetaTensor [B, C, *S] carries the network grid's affine and, from loading, each
        input's ``original_affine`` and ``spatial_shape``; :func:`cfseg.geometry.labels_to_input_grid` maps the
        prediction back (the same path as ``cfseg-segment``).

        Returns:
            one dict per case: ``case_id``, ``dataset``, ``labels`` uint8 [*S_input] (global class values),
            ``affine`` [4, 4] (the input's), ``source`` (the input file), ``checks``: the out-of-domain verdict
            (:meth:`ood_check_file`).
        """
        image = batch["image"]
        logits = self.sliding_window_logits(image, device="cpu")
        probs, labels = self.head.probabilities(logits), self.head.labels(logits).to(torch.uint8)
        meta = image.meta
        values = list(range(probs.shape[1]))
        out = []
        for b in range(len(labels)):
            dst_affine = np.asarray(meta["original_affine"][b], dtype=np.float64)
            dst_shape = [int(n) for n in meta["spatial_shape"][b]]
            net_affine = np.asarray(image.affine[b], dtype=np.float64)
            out.append({
                "case_id": batch["case_id"][b], "dataset": batch["dataset"][b], "source": meta["filename_or_obj"][b],
                "affine": dst_affine, "checks": self.ood_check_file(meta["filename_or_obj"][b]),
                "labels": labels_to_input_grid(labels[b].numpy(), probs[b].numpy(), values, net_affine, dst_shape,
                                               dst_affine),
            })
        return out

    def configure_optimizers(self):
        h = self.hparams
        params = [p for p in self.parameters() if p.requires_grad]
        if self._optimizer_fn is not None:
            return self._optimizer_fn(params)
        # the stage's learning rate
        lr = h.lr * (h.incremental_lr_factor * self.strategy.lr_factor if h.previous_checkpoint else 1.0)
        if h.get("optimizer_name", "adamw") == "sgd":
            opt = torch.optim.SGD(params, lr=lr, momentum=0.99, nesterov=True, weight_decay=h.weight_decay)
        else:
            opt = torch.optim.AdamW(params, lr=lr, weight_decay=h.weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches)) if self._trainer is not None else 1000
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, partial(lr_factor, total=total, warmup=max(1, int(h.warmup_fraction * total)),
                         kind=h.get("lr_schedule", "cosine")))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ---- stages --------------------------------------------------------------------------------------
    def configure_callbacks(self) -> list[L.Callback]:
        """End-of-stage statistics are taken when training ends, before the last checkpoint is written."""
        return [EndOfStage()]

    def on_train_start(self) -> None:
        self._stage_done = False
        self.strategy.on_train_start(self)

    def on_train_end(self) -> None:
        self.end_of_stage()  # training stopped early (no last epoch end): still before the final save

    def end_of_stage(self) -> None:
        """What a stage leaves for later stages (the strategy's :meth:`~cfseg.continual.Strategy.end_of_stage`:
        router statistics, Fisher), once per fit, before the last checkpoint."""
        if self._stage_done:
            return
        self._stage_done = True
        self.strategy.end_of_stage(self)
        self.collect_domain_statistics()
        check_identical(self.global_statistics(), "end of stage")

    def global_statistics(self) -> dict[str, Any]:
        """Everything a stage accumulated over batches and keeps (router and modality-router statistics, Fisher,
        out-of-domain statistics, the strategy's :meth:`~cfseg.continual.Strategy.statistics` and state): under DDP
        each is reduced across processes and so the same on every rank (:func:`cfseg.distributed.check_identical`).
        """
        return {"router": self.router.state() if self.router is not None else None,
                "modality_router": self.modality_router.state() if self.modality_router is not None else None,
                "ewc_fisher": self.ewc_fisher,
                "ood": self.domain_statistics.state() if self.domain_statistics is not None else None,
                "strategy": self.strategy.statistics(), "strategy_state": self.strategy.state_dict()}

    def collect_domain_statistics(self) -> None:
        """This stage's out-of-domain statistics (:mod:`cfseg.ood`) from up to ``statistics.router_batches``
        training cases per dataset, calibrated on the validation cases, with the network as it ends the stage."""
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if self.statistics.router_batches <= 0 or not getattr(dm, "datasets", None):
            return
        if self.modality_router is not None:
            view = Preprocessing.from_dict(self.modality_router.view)
        else:
            first = dm.preprocessing(dm.datasets[0].info.modality)
            view = neutral_view(first.spacing, first.orientation)
        was_training = self.training
        self.eval()
        try:
            self.domain_statistics = fit_domain_statistics(self, dm, view, self.statistics.router_batches)
        finally:
            self.train(was_training)

    def ood_score(self, view: torch.Tensor) -> tuple[float, float] | None:
        """``(score, threshold)`` of one volume in the modality-neutral view [1, C, *S] (:mod:`cfseg.ood`); None
        when the checkpoint has no domain statistics."""
        if self.domain_statistics is None or self.domain_statistics.threshold is None:
            return None
        return self.domain_statistics.score(self.window_features(view)), self.domain_statistics.threshold

    def ood_check_file(self, source: str | list[str]) -> dict[str, Any]:
        """The out-of-domain verdict of one input file (or its channel files), loaded in the statistics' neutral
        view as the statistics were fitted: ``{"ood_score", "ood_threshold", "out_of_domain"}``, all None when the
        checkpoint has no domain statistics."""
        stats = self.domain_statistics
        if stats is None or stats.threshold is None or stats.view is None:
            return {"ood_score": None, "ood_threshold": None, "out_of_domain": None}
        load = mt.Compose(deterministic_transforms(Preprocessing.from_dict(stats.view), labeled=False))
        score, threshold = self.ood_score(load({"image": source})["image"][None])
        return {"ood_score": round(score, 4), "ood_threshold": round(threshold, 4), "out_of_domain": score > threshold}

    def collect_fisher(self, previous: dict[str, torch.Tensor] | None = None) -> None:
        """The diagonal Fisher of this stage's loss (``statistics.fisher_batches`` training batches) at the final
        weights, added to ``previous`` (EWC's accumulated importance)."""
        loader = self.trainer.train_dataloader if self._trainer is not None else None
        if self.statistics.fisher_batches <= 0 or loader is None:
            return
        self.ewc_fisher = stage_fisher(self, training_batches(loader), self.statistics.fisher_batches, previous)

    def on_fit_start(self) -> None:
        """This stage's entry in the stage history and the experts' records, from the data module's datasets."""
        dm = getattr(self.trainer, "datamodule", None)
        if dm is not None and hasattr(dm, "preprocessing_by_modality"):
            self.preprocessing = merge_preprocessing(self.preprocessing, dm.preprocessing_by_modality, "the data")
        datasets = [{"name": d.name, "path": str(d.info.root), "domain": d.domain,
                     "classes": [c for c in d.info.classes if d.config.classes is None or c in d.config.classes]}
                    for d in getattr(dm, "datasets", [])]
        stage = {
            "stage": self._n_earlier_stages,
            "strategy": self.hparams.strategy,
            "new_classes": self.bank.classes[self.n_old:],
            "classes": self.bank.classes,
            "datasets": datasets,
            "previous_checkpoint": self.hparams.previous_checkpoint,
        }
        # one entry per stage: a resumed fit (``--ckpt_path``) replaces this stage's entry, never appends another
        self.stage_history = [*self.stage_history[: self._n_earlier_stages], stage]
        trained = [d for d in getattr(dm, "datasets", []) if d.config.labeled and not d.config.val_only]
        classes = {c for d in trained for c in d.info.classes if d.config.classes is None or c in d.config.classes}
        self.record_stage_experts(self.strategy.records_expert(self), [c for c in self.bank.classes if c in classes],
                                  sorted({str(d.domain) for d in trained}),
                                  sorted({str(d.info.modality) for d in trained}))

    # ---- checkpoints ---------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["cfseg"] = {
            "format": CHECKPOINT_FORMAT,
            "class_names": self.bank.classes,
            "vocabulary": self.bank.names,
            "encoder_id": self.bank.encoder_id,
            "prompts": self.bank.prompts,
            "prototype_bank": self.bank.state(),
            "preprocessing": self.preprocessing,
            "head": self.hparams.head,  # a shorthand or the spec, as given
            "stage_history": list(self.stage_history),
            "experts": self.experts_state(),
            "ewc_fisher": self.ewc_fisher,
            "strategy_state": self.strategy.state_dict(),
            "ood": self.domain_statistics.state() if self.domain_statistics is not None else None,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore cfseg's metadata; refuse a checkpoint whose classes (names or order) differ from this model's.

        Called by Lightning before the weights are loaded (``fit/validate/test --ckpt_path``), so a checkpoint of
        another vocabulary never replaces the bank: adding classes is an incremental stage
        (``model.previous_checkpoint``), not a resume.
        """
        meta = check_format(checkpoint)
        theirs = [str(n) for n in meta.get("vocabulary", [])]
        if theirs != self.bank.names:
            hint = ("the same classes in another order" if sorted(theirs) == sorted(self.bank.names)
                    else "another vocabulary")
            raise ValueError(
                f"the checkpoint has {hint}: {theirs[1:]} vs this run's {self.bank.classes}; to add classes start "
                "an incremental stage (model.previous_checkpoint=...), to evaluate let the data follow the "
                "checkpoint's class order (data.classes)"
            )
        theirs_head = head_spec(meta.get("head", self.hparams.head))["class_path"]
        if theirs_head != head_spec(self.hparams.head)["class_path"]:
            raise ValueError(f"the checkpoint has a {meta.get('head')!r} head, this run a {self.hparams.head!r} head")
        self.preprocessing = merge_preprocessing(meta.get("preprocessing") or {}, self.preprocessing, "this run")
        self.stage_history = list(meta.get("stage_history", []))
        self.ewc_fisher = check_fisher(meta.get("ewc_fisher"))
        ood = meta.get("ood")
        self.domain_statistics = DomainStatistics.from_state(ood) if ood is not None else None


def load_checkpoint(path: str, map_location: str | torch.device = "cpu",
                    trusted_modules: list[str] | None = None) -> CFSegModule:
    """Load a cfseg checkpoint as data: no pickled code (``torch.load(weights_only=True)``) and a network built
    only from the allow-list of :mod:`cfseg.builder` (``trusted_modules`` extends it; the file cannot).

    The stage is over: the model is built with :class:`cfseg.continual.Finetune` (its LoRA experts and routers come
    from the saved metadata); ``hparams.strategy`` keeps what the stage was trained with.

    Raises:
        FileNotFoundError: no such file.
        UntrustedSpecError: the checkpoint names a network outside the allow-list (nothing was imported or called).
        ValueError: the file is not a cfseg checkpoint or is damaged.
    """
    ckpt = read_checkpoint(path, map_location)
    meta = ckpt["cfseg"]
    stored = ckpt.get("hyper_parameters", {})
    hp = module_settings(stored, set(inspect.signature(CFSegModule.__init__).parameters) - LOAD_SKIP)
    hp["backbone"] = hp.get("backbone") or DEFAULT_BACKBONE
    check_spec(hp["backbone"], trusted_modules)  # refuse before anything else is built or imported
    if isinstance(hp.get("head"), dict):
        check_spec(hp["head"], trusted_modules)
    try:
        module = CFSegModule(bank_state=meta["prototype_bank"], preprocessing=meta.get("preprocessing"),
                             trusted_modules=trusted_modules, experts_state=meta.get("experts"), strategy="finetune",
                             **hp)
        module.hparams["strategy"] = stored.get("strategy", module.hparams["strategy"])
        module.load_state_dict(ckpt["state_dict"])
        module.on_load_checkpoint(ckpt)
    except UntrustedSpecError as e:
        raise UntrustedSpecError(f"{path}: {e}") from None
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"{path}: damaged cfseg checkpoint ({type(e).__name__}: {str(e)[:300]})") from None
    return module.eval()
