"""The LightningModule: a segmenter, a prototype bank, the partial-label loss, whole-volume validation.

The class list comes from the data module (linked by the CLI). The backbone is injected as a
``{"class_path": ..., "init_args": {...}}`` spec (any MONAI 3D network mapping an image to F full-resolution
feature channels), kept as plain data so that a checkpoint rebuilds the network without pickled code.

Checkpoints are self-describing: besides the weights (the bank's prototypes, names, prompts and encoder id
travel in the state dict), ``checkpoint["cfseg"]`` holds the vocabulary, the preprocessing per modality and
the stage history; ``hyper_parameters`` holds the network spec.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from monai import transforms as mt
from monai.inferers import sliding_window_inference
from torch import nn

from cfseg.bank import PROTOTYPE_METHODS, PrototypeBank
from cfseg.builder import UntrustedSpecError, build_network, check_spec, resolve_class
from cfseg.continual import distill, experts
from cfseg.continual.distill import (
    DEFAULT_POD_LAYERS,
    capture_activations,
    entropy_histogram,
    feature_distillation,
    local_pod,
    median_thresholds,
    mib_distillation,
    resolve_layers,
    similarity_distillation,
)
from cfseg.continual.ewc import diagonal_fisher, ewc_penalty, merge_fisher
from cfseg.continual.router import ModalityRouter, RidgeRouter, pooled_features
from cfseg.folding import folded_predictor
from cfseg.heads import DEFAULT_BOTTLENECK_LAYER, HEAD_SHORTHANDS, Head, bottleneck_channels, deepest_layer, head_spec
from cfseg.losses import ambiguous_entropy, exclusion_loss
from cfseg.metrics import PerClassDice, dice_per_class
from cfseg.nets import Segmenter, segmenter
from cfseg.text.encoders import build_encoder
from cfseg.vocab import Vocabulary

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "cfseg-checkpoint-v1"

DEFAULT_BACKBONE: dict[str, Any] = {
    "class_path": "monai.networks.nets.UNet",
    "init_args": {
        "spatial_dims": 3, "in_channels": 1, "out_channels": 32, "channels": [16, 32, 64, 128],
        "strides": [2, 2, 2], "num_res_units": 1,
    },
}
HEADS = tuple(HEAD_SHORTHANDS)  # the head shorthands; any cfseg.heads class (or a trusted one) by class_path
STRATEGIES = ("distill", "finetune", "joint", "experts", "ewc")
EXPERT_INITS = ("previous", "zero")
#: MONAI UNet's bottleneck convolution *before* its instance normalisation (the deepest match): after the norm, the
#: per-channel mean and spread of a block's output are normalised away and cannot tell one scanner from another
DEFAULT_ROUTER_LAYER = DEFAULT_BOTTLENECK_LAYER  # r"model(\.1\.submodule)*\.conv" (dynamic heads: DEFAULT_POOLED_LAYER)
DEFAULT_PSEUDO_DICE_WEIGHT = 0.1  # pseudo_dice_weight's default (OpenKBP v2, chosen on validation)
PSEUDO_IGNORE = -1  # label of uncertain voxels under pseudo-labelling (excluded from the partial-label loss)
ENTROPY_BINS = 100  # histogram bins of the pseudo-label thresholds (PLOP's find_median)

#: hyper-parameters that act only in an incremental stage (one with a previous checkpoint) of the named strategy
STRATEGY_SETTINGS: dict[str, frozenset[str]] = {
    "distill": frozenset({"kd_weight", "kd_ramp_steps", "kd_ramp_fraction", "kd_ramp_start", "kd_temperature",
                          "sim_weight", "feat_weight", "pseudo_label", "pseudo_entropy_floor", "pseudo_entropy_cap",
                          "pseudo_threshold_batches", "pseudo_ignore_uncertain", "pseudo_label_dice",
                          "pseudo_dice_weight", "distill_labeled", "distill_new_voxels", "pod_weight", "pod_layers",
                          "pod_scales"}),
    "experts": frozenset({"expert_layers", "expert_rank", "expert_alpha", "expert_init", "expert_projection"}),
    "ewc": frozenset({"ewc_lambda"}),
}


def settings_without_effect(strategy: str, incremental: bool) -> frozenset[str]:
    """Hyper-parameters that cannot change a run of ``strategy``: the other strategies' :data:`STRATEGY_SETTINGS`,
    and in a first stage (``incremental`` False: no previous checkpoint) every strategy's and
    ``incremental_lr_factor``. (Router and Fisher settings act in every stage: stage 0 stores both.)"""
    unused = [names for name, names in STRATEGY_SETTINGS.items() if name != strategy or not incremental]
    return frozenset().union(*unused, () if incremental else ("incremental_lr_factor",))


def resolve_defaults(hparams: dict[str, Any]) -> dict[str, Any]:
    """``hparams`` with the defaults :class:`CFSegModule` resolves when built (``backbone``, ``pseudo_dice_weight``)
    filled in as a checkpoint records them."""
    out = dict(hparams)
    out["backbone"] = out.get("backbone") or DEFAULT_BACKBONE
    if out.get("pseudo_dice_weight") is None:
        out["pseudo_dice_weight"] = 0.0 if out.get("pseudo_label_dice") else DEFAULT_PSEUDO_DICE_WEIGHT
    return out


class CFSegModule(L.LightningModule):
    """Classifier-free (or another injected head's) 3D segmentation with partial labels.

    The head (:mod:`cfseg.heads`) decides what the logits mean: the loss, the label rule and the probabilities are
    asked of it (:meth:`cfseg.heads.Head.loss`, ``labels``, ``probabilities``), never chosen by its type.

    Args:
        class_names: foreground classes in global order (linked from ``data.class_names`` by the CLI).
        backbone: network spec ``{"class_path", "init_args"}``; its output channels are the features F.
        feature_channels: F; must equal the backbone's output channels.
        head: the head on the backbone's features (:mod:`cfseg.heads`): a spec ``{"class_path", "init_args"}``
            (e.g. ``cfseg.heads.DoDNetHead``, ``cfseg.heads.UniversalHead``; allow-listed as the backbone) or a
            shorthand: ``"prototype"`` (cosine logits against text prototypes, cfseg's method) or ``"softmax"`` (a
            1x1x1 conv with K+1 outputs, the conventional baseline on the same backbone). Constructor arguments the
            spec leaves out are filled where the head takes them: ``feature_channels``, ``num_classes`` (K+1),
            ``embed_dim`` (prototype width), ``text_dim`` (text-embedding width), ``bottleneck_channels`` (from the
            backbone layer the head names), ``temperature``, ``learnable_temperature``, ``hidden_channels``.
        encoder: text encoder spec for the prototypes (see :func:`cfseg.text.encoders.build_encoder`):
            ``"minilm"`` (offline default), ``"open_clip:ViT-B-32:/path/weights.bin"``, ``"bank:/path.json"``.
        prompt_modality: prompt template set (``"ct"``, ``"mri"``, ``"generic"``).
        prototypes: how class prototypes are made (:meth:`cfseg.bank.PrototypeBank.build`): ``"text"``
            (default: Gram-Schmidt on the class text embeddings), ``"random"`` (seeded random orthonormal vectors:
            what the text contributes, by ablation) or ``"text_no_gs"`` (the normalised text embeddings, not
            orthogonal). The prototypes are stored in the checkpoint, so it reloads bit-identically. Only
            ``"text"`` banks take new classes in a class-incremental stage; an incremental stage keeps its previous
            checkpoint's bank and must name the same method.
        prototype_order: Gram-Schmidt order of ``prototypes: text``: a list of class names (every class once;
            background first unless listed) or ``"reversed"``; default: the class order. The class order (label
            indices) is unchanged. Unused in an incremental stage (new classes always come after the earlier ones,
            whose prototypes stay bit-identical).
        prototype_seed: seed of ``prototypes: random``.
        temperature: cosine-logit temperature tau.
        learnable_temperature: learn tau.
        hidden_channels: optional per-voxel hidden layer before the projection.
        lr: AdamW learning rate (used when ``optimizer`` is not given).
        incremental_lr_factor: multiplies ``lr`` in an incremental stage (``previous_checkpoint`` given), e.g. 0.1
            to fine-tune gently from the teacher. Only the built-in AdamW: an injected ``optimizer`` is unaffected.
        weight_decay: AdamW weight decay.
        warmup_fraction: fraction of steps with linear warm-up before cosine decay.
        ce_weight: weight of the partial-label cross-entropy.
        dice_weight: weight of the partial soft Dice.
        batch_dice: Dice pooled over the batch per class (see :func:`cfseg.losses.partial_dice_loss`).
            With a softmax-output head the CE + Dice is the marginal loss of Shi et al. (MedIA 2021): background
            and the classes a case does not annotate are merged (:func:`cfseg.losses.partial_label_loss`).
        exclusion_weight: weight of the exclusion loss of Shi et al. (MedIA 2021,
            :func:`cfseg.losses.exclusion_loss`): the predicted probability of a class where the labels rule it
            out (another organ's voxels; background voxels of a case that annotates it). Softmax-output heads
            only; 0 (default): off.
        entropy_weight: weight of the entropy minimisation on the voxels labelled "background or an unannotated
            class" (:func:`cfseg.losses.ambiguous_entropy`; Versatile's self-disambiguation, Chen et al., CVPR
            2024). Softmax-output heads only; 0 (default): off.
        roi_size: sliding-window size for validation/inference (defaults to the training patch).
        sw_batch_size: windows per forward pass.
        sw_overlap: window overlap.
        preprocessing: per-modality preprocessing (linked from the data module); stored in checkpoints.
        previous_checkpoint: the previous stage's checkpoint (an incremental stage). The student starts from
            its weights, its prototypes are kept bit-identical and new classes are appended; with
            ``strategy="distill"`` it is also the frozen teacher.
        strategy: ``"distill"`` (cfseg's method), ``"finetune"`` (no distillation: the lower bound) or
            ``"joint"`` (no previous checkpoint; all stages' data in one training: the upper bound).
            ``distill``'s defaults (MiB output distillation rising from 0 to ``kd_weight=10`` over each stage's first
            half, ``kd_ramp_fraction=0.5``, + similarity maps ``sim_weight=1``,
            full learning rate ``incremental_lr_factor=1``, PLOP pseudo-labels where the teacher knows the
            stage's domain (``pseudo_label="auto"``) in the cross-entropy and, at weight 0.1, in a Dice of their
            own (``pseudo_dice_weight``), no distillation on a domain step's labelled images
            (``distill_labeled="auto"``), no POD) follow the OpenKBP v2 runs and the synthetic protocol on
            validation cases (benchmarks/openkbp/README.md, "Distillation ablation, protocol v2" and after;
            benchmarks/README.md): pseudo-labels in the Dice at full weight kept the old organs whole but left the
            new ones at Dice 0, in the cross-entropy only they let the stage-0 organs go.
        new_classes: the classes this stage adds (checked against the previous checkpoint; inferred from
            ``class_names`` when None).
        kd_weight: weight of the output distillation (teacher distribution over old classes, student's
            new-class mass folded into background: MiB). Units: cfseg's term is the mean over voxels of the
            per-voxel *sum* over the n_old+1 teacher classes; MiB's ``UnbiasedKnowledgeDistillationLoss`` divides
            that sum by n_old+1. So ``kd_weight = w`` equals MiB's ``loss_kd = w * (n_old + 1)``, and MiB's
            default ``loss_kd=10`` is ``kd_weight = 10 / (n_old + 1)`` (2.5 with 3 old organs, 1.67 with 5).
            Default 10, reached by a ramp from 0 over the stage's first half (``kd_ramp_fraction``,
            ``kd_ramp_start``; since 2026-11-27). Chosen on validation cases: OpenKBP v2 (two seeds) 0.474 against
            0.472 or less for every other setting (KD 2.5 flat, the default before: 0.440), test 0.489 = 1.12 x
            joint with BWT -0.043 (KD 2.5: 0.468, -0.065), the esophagus 0.33 / 0.09 (KD 2.5: 0.26 / 0.08); a
            flat KD 5 or a ramp from 1 lost the seed-1 esophagus (0.02-0.04): the first steps of a stage without a
            tie to the teacher are what lets the thinnest new organ start. On the synthetic protocol the same
            ramp holds the old organs (BWT -0.014 vs -0.047; validation 0.603 vs 0.590) at 0.93 x joint
            (benchmarks/openkbp/README.md, benchmarks/README.md). Until 2026-11-27 the default was 2.5 flat, until
            2026-11-26 1 flat.
        kd_ramp_steps: N > 0: the output distillation's weight rises linearly from ``kd_ramp_start`` at the stage's
            step 0 to ``kd_weight`` at step N and stays there (logged as ``train/kd_weight``): the new classes start
            under a loose tie to the teacher, and the full weight later pulls the old classes' outputs back
            towards it. Takes precedence over ``kd_ramp_fraction``. 0 (default): the ramp's length comes from
            ``kd_ramp_fraction``.
        kd_ramp_fraction: the ramp over a fraction of the stage's training steps (0 < f <= 1; the trainer's
            ``estimated_stepping_batches``), so one setting fits stages of any length. Default 0.5 (each stage's
            first half); 0: no ramp, ``kd_weight`` from the first step. Outside a fit (no trainer, no stage length)
            there is no ramp: ``kd_weight``.
        kd_ramp_start: the output distillation's weight at the stage's first step when a ramp is on. Default 0:
            from 1 instead, the OpenKBP esophagus was lost on one seed of two (test 0.017, validation 0.010; from
            0: 0.092 / 0.089).
        kd_temperature: distillation temperature.
        sim_weight: weight of the similarity-map distillation over old classes (MSE of cosine maps).
        feat_weight: weight of the feature distillation (MSE of normalised voxel features).
        pseudo_label: PLOP pseudo-labels: on the new stage's images, voxels labelled 0 where the teacher predicts
            an old class k (argmax) with normalised entropy below k's threshold become label k, and k becomes
            annotated for that case (never where k is already annotated); see
            :func:`cfseg.continual.distill.pseudo_label`. ``"auto"`` (default): on when every labelled training
            dataset of the stage is of a domain the teacher was trained on (a class-incremental stage), off in a
            domain step, where the teacher's confident predictions on an unseen modality or site are no labels
            (synthetic protocol: on in its MRI stage they cost 0.08 Dice on validation).
        pseudo_entropy_floor: lowest per-class threshold, in units of entropy / log(n_old + 1) (PLOP: 0.001).
        pseudo_entropy_cap: highest per-class threshold (1.0: no cap).
        pseudo_threshold_batches: the per-class threshold is the median normalised entropy of the label-0 voxels
            the teacher assigns to the class, estimated from the first N training batches of the stage (a running
            histogram, updated before each of those batches is labelled, then frozen; restarted by a resume).
            PLOP computes it over the whole training set before the stage.
        pseudo_ignore_uncertain: in a case that gained a pseudo-labelled class, exclude the label-0 voxels where
            the teacher is not confident from the loss (PLOP's label 255); otherwise they say "none of the
            annotated classes".
        pseudo_label_dice: let pseudo-labelled classes enter the Dice term too. Default False: they enter the
            cross-entropy only (PLOP's loss is a cross-entropy) and the Dice keeps the stage's own annotation. With
            them in the Dice (here or through ``pseudo_dice_weight``) the OpenKBP v2 stage-2 organs (esophagus,
            larynx) stayed at Dice 0 on both seeds while the old organs were kept far better than with the
            cross-entropy alone (benchmarks/openkbp/README.md). True reproduces the pseudo-label runs made before
            2026-11-26.
        pseudo_dice_weight: with ``pseudo_label_dice=False``, weight of a Dice term of its own over the
            pseudo-labelled classes (the mean over the (case, old class) pairs the teacher labelled, on the
            pseudo-labels, uncertain voxels ignored; :func:`cfseg.continual.distill.pseudo_dice_labels`), beside the
            Dice of the stage's own classes, whose weight it leaves unchanged. 0: off. None (default): 0.1, or 0
            with ``pseudo_label_dice=True``. Chosen on the OpenKBP v2 validation cases (two seeds): 0.1 gives
            0.436 (test 0.458, BWT -0.100, every organ learnt), 0.3 0.427 (esophagus at 0), 1.0 0.378 (the stage-2
            organs at 0), 0 0.304 (the stage-0 brainstem and spinal cord at 0).
        distill_labeled: whether the distillation terms (output, similarity maps, features, POD) also run on the
            stage's labelled images, or only on its image-only (``unlabeled``) datasets. True: always (MiB, PLOP:
            class-incremental stages distil on the new stage's images). ``"auto"``: as ``pseudo_label="auto"``, on
            when every labelled training dataset of the stage is of a domain the teacher trained on, off in a
            domain step, where the labels supervise the old classes on images the teacher never saw and its
            outputs there are what the stage must change; the stage then distils only on its image-only datasets
            (list the earlier domains' images there; with none it warns that nothing is distilled). Default.
            False: never on labelled images. On the synthetic protocol's MRI stage (seeds 0-1) ``"auto"`` lets
            the stage learn the MRI organs about as far as joint training does (0.59 vs 0.50 with True; joint
            0.61) and loses more of the CT organs at ``kd_weight`` 1 (BWT -0.095 vs -0.057), which a KD weight of
            2.5 on the CT images wins back (seeds 0-2: BWT -0.052, average 0.556 vs 0.530; benchmarks/README.md).
        distill_new_voxels: whether the voxel-wise distillation terms (output, similarity maps, features) also run
            on the voxels the stage labels with one of its new classes. True (MiB, PLOP): every voxel. False: those
            voxels are left out of the terms' means, since there the teacher (which calls them background or an
            old class) is known to be wrong; the pooled Local POD term is unchanged. Image-only batches have no
            labels and are distilled everywhere. Measured with ``kd_weight`` 5 (OpenKBP v2, two seeds): False holds
            the old organs a little better (test BWT -0.043 vs -0.053) but loses the esophagus (0.00 / 0.01 vs
            0.20 / 0.04) and scores lower on validation (0.436 vs 0.458); on the synthetic protocol (three seeds)
            it changes nothing (validation 0.588 vs 0.590 at ``kd_weight`` 2.5). So the default stays True.
        pod_weight: weight of Local POD (PLOP) on intermediate backbone activations (0: off).
        pod_layers: regular expressions (full match) of the backbone's module names whose outputs POD compares;
            default: MONAI UNet's encoder and decoder blocks at every resolution
            (:data:`cfseg.continual.distill.DEFAULT_POD_LAYERS`). Other backbones must name their layers.
        pod_scales: windows per axis of Local POD (1, 2, 4: the whole patch, halves, quarters).
        expert_layers: ``strategy="experts"``: regular expressions (full match) of the segmenter's convolutions
            that carry LoRA experts (default :data:`cfseg.continual.experts.DEFAULT_EXPERT_LAYERS`: MONAI UNet's
            decoder, so the encoder runs once per window for all experts at inference).
        expert_rank: rank ``r`` of each expert's weight update.
        expert_alpha: LoRA scale numerator (the update is ``alpha / r * U D``).
        expert_projection: every expert also owns a copy of the prototype projection ``W`` (D x F parameters; see
            :class:`cfseg.continual.experts.ExpertProjection` for why new classes need it).
        expert_init: ``"previous"`` (a new expert starts as a copy of the previous stage's expert, as EvoSAM) or
            ``"zero"`` (it starts as no change of the shared weights).
        router_layer: regular expression of the backbone module whose output, pooled (mean and standard
            deviation per channel), is the analytic router's feature; the deepest match is used (default: MONAI
            UNet's bottleneck convolution before its normalisation, :data:`DEFAULT_ROUTER_LAYER`).
        router_gamma: ridge regularisation ``gamma`` of the router.
        router_random_features: width of the router's fixed random ReLU feature expansion (0: none).
        router_batches: training batches whose (frozen shared network) features feed the router's statistics at
            the end of stage 0 and of every ``experts`` stage (0: no router). The same stages fit the modality
            router (:class:`cfseg.continual.router.ModalityRouter`) on up to this many training cases per dataset,
            each in the modality-neutral view; with two or more modalities it answers ``cfseg-segment`` without
            ``--modality``.
        router_modality_gamma: ridge ``gamma`` of the modality router. Its rows are whole-volume windows, far
            fewer than the expert router's crops; with the test suite's tiny phantoms (two training cases per
            modality) gamma 1 left CT and MRI scores close together and 0.01 separated them; on the synthetic
            protocol every gamma from 1 to 0.001 answers every volume (benchmarks/README.md).
        ewc_lambda: ``strategy="ewc"`` (reference baseline, Kirkpatrick et al. 2017): the penalty
            ``lambda / 2 * sum_i F_i (theta_i - theta*_i)^2`` towards the previous checkpoint's weights ``theta*``
            with its accumulated diagonal Fisher ``F`` (see :mod:`cfseg.continual.ewc` for the units).
        ewc_fisher_batches: training batches whose squared loss gradients give the diagonal Fisher at the end of
            stage 0 and of every ``ewc`` stage (stored in the checkpoint; 0: none, and no later ``ewc`` stage).
        optimizer: optional callable ``params -> Optimizer`` (LightningCLI injection).
        bank_state: a saved bank (:meth:`PrototypeBank.state`) to restore instead of encoding names; used when
            loading checkpoints, never written to hyper-parameters.
        experts_state: the saved experts metadata (:meth:`experts_state`) of a checkpoint; used when loading.
        trusted_modules: packages besides MONAI's networks, ``cfseg.nets`` and ``cfseg.heads`` that ``backbone`` and
            ``head`` may name (your own network code; see :mod:`cfseg.builder`). Never read back from a checkpoint:
            pass it again (or set ``CFSEG_TRUSTED_MODULES``) when loading one.
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
        ce_weight: float = 1.0,
        dice_weight: float = 1.0,
        batch_dice: bool = True,
        exclusion_weight: float = 0.0,
        entropy_weight: float = 0.0,
        roi_size: tuple[int, int, int] = (64, 64, 64),
        sw_batch_size: int = 2,
        sw_overlap: float = 0.25,
        preprocessing: dict[str, Any] | None = None,
        previous_checkpoint: str | None = None,
        strategy: str = "distill",
        new_classes: list[str] | None = None,
        kd_weight: float = 10.0,
        kd_ramp_steps: int = 0,
        kd_ramp_fraction: float = 0.5,
        kd_ramp_start: float = 0.0,
        kd_temperature: float = 1.0,
        sim_weight: float = 1.0,
        feat_weight: float = 0.0,
        pseudo_label: bool | str = "auto",
        pseudo_entropy_floor: float = 0.001,
        pseudo_entropy_cap: float = 1.0,
        pseudo_threshold_batches: int = 10,
        pseudo_ignore_uncertain: bool = True,
        pseudo_label_dice: bool = False,
        pseudo_dice_weight: float | None = None,
        distill_labeled: bool | str = "auto",
        distill_new_voxels: bool = True,
        pod_weight: float = 0.0,
        pod_layers: list[str] | None = None,
        pod_scales: tuple[int, ...] = (1, 2, 4),
        expert_layers: list[str] | None = None,
        expert_rank: int = 4,
        expert_alpha: float = 4.0,
        expert_init: str = "previous",
        expert_projection: bool = True,
        router_layer: str = DEFAULT_ROUTER_LAYER,
        router_gamma: float = 1.0,
        router_random_features: int = 0,
        router_batches: int = 16,
        router_modality_gamma: float = 0.01,
        ewc_lambda: float = 100.0,
        ewc_fisher_batches: int = 8,
        optimizer: Callable[[Iterable], torch.optim.Optimizer] | None = None,
        bank_state: dict[str, Any] | None = None,
        experts_state: dict[str, Any] | None = None,
        trusted_modules: list[str] | None = None,
    ):
        super().__init__()
        head_cls = resolve_class(head_spec(head), trusted_modules)  # the allow-list first: nothing else is built
        if not issubclass(head_cls, Head):
            raise UntrustedSpecError(f"refusing {head_spec(head)['class_path']!r} as a head: not a cfseg.heads.Head")
        if head_cls.output != "softmax" and strategy in ("distill", "experts") and previous_checkpoint:
            raise ValueError(f"strategy {strategy!r} merges or distils softmax distributions; the {head_cls.__name__} "
                             f"has one sigmoid per class: use strategy 'finetune' (or 'ewc')")
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        if not (isinstance(kd_ramp_steps, int) and kd_ramp_steps >= 0 and math.isfinite(kd_ramp_start)
                and kd_ramp_start >= 0):
            raise ValueError(f"need an integer kd_ramp_steps >= 0 and kd_ramp_start >= 0, got {kd_ramp_steps!r}, "
                             f"{kd_ramp_start!r}")
        if not (isinstance(kd_ramp_fraction, (int, float)) and 0 <= kd_ramp_fraction <= 1):
            raise ValueError(f"kd_ramp_fraction is a fraction of the stage's steps in [0, 1], got {kd_ramp_fraction!r}")
        for name, w in (("exclusion_weight", exclusion_weight), ("entropy_weight", entropy_weight)):
            if not (isinstance(w, (int, float)) and math.isfinite(w) and w >= 0):
                raise ValueError(f"{name} must be a finite number >= 0 (0: off), got {w!r}")
            if w > 0 and head_cls.output != "softmax":
                raise ValueError(f"{name} regularises one softmax distribution over the classes; the "
                                 f"{head_cls.__name__} has one sigmoid per class: set {name}: 0 or use a softmax "
                                 "head (softmax, prototype)")
        if strategy in ("experts", "ewc") and not previous_checkpoint:
            raise ValueError(f"strategy {strategy!r} starts from a trained stage: give model.previous_checkpoint "
                             "(stage 0 trains the whole network with any other strategy)")
        if expert_init not in EXPERT_INITS:
            raise ValueError(f"expert_init must be one of {EXPERT_INITS}, got {expert_init!r}")
        if strategy == "joint" and previous_checkpoint:
            raise ValueError("strategy 'joint' trains from scratch on all stages' data: drop previous_checkpoint")
        if not (isinstance(incremental_lr_factor, (int, float)) and math.isfinite(incremental_lr_factor)
                and incremental_lr_factor > 0):
            raise ValueError(f"incremental_lr_factor must be a finite number > 0, got {incremental_lr_factor!r}")
        if not 0 <= pseudo_entropy_floor <= pseudo_entropy_cap <= 1:
            raise ValueError(f"need 0 <= pseudo_entropy_floor <= pseudo_entropy_cap <= 1 (normalised entropy), got "
                             f"{pseudo_entropy_floor} and {pseudo_entropy_cap}")
        if pseudo_label not in (True, False, "auto"):
            raise ValueError(f"pseudo_label must be true, false or 'auto', got {pseudo_label!r}")
        if pseudo_dice_weight is not None and not (isinstance(pseudo_dice_weight, (int, float))
                                                   and math.isfinite(pseudo_dice_weight) and pseudo_dice_weight >= 0):
            raise ValueError(f"pseudo_dice_weight must be a finite number >= 0 (0: off), got {pseudo_dice_weight!r}")
        if pseudo_dice_weight is not None and pseudo_dice_weight > 0 and pseudo_label_dice:
            raise ValueError("pseudo_dice_weight > 0 is a separate Dice over the pseudo-labelled classes; "
                             "pseudo_label_dice=true already puts them in the stage's Dice: set one of the two")
        if pseudo_threshold_batches < 1:
            raise ValueError(f"pseudo_threshold_batches must be >= 1, got {pseudo_threshold_batches}")
        if pod_weight < 0 or not pod_scales or any(int(s) != s or s < 1 for s in pod_scales):
            raise ValueError(f"need pod_weight >= 0 and positive integer pod_scales, got {pod_weight}, {pod_scales}")
        if bank_state is None and not class_names and not previous_checkpoint:
            raise ValueError("class_names is empty: give model.class_names or link it from the data module")
        self.save_hyperparameters(ignore=["optimizer", "bank_state", "experts_state"])
        resolved = resolve_defaults({"backbone": backbone, "pseudo_dice_weight": pseudo_dice_weight,
                                     "pseudo_label_dice": pseudo_label_dice})  # a checkpoint records what ran
        self.hparams["backbone"] = backbone = resolved["backbone"]
        self.hparams["pseudo_dice_weight"] = resolved["pseudo_dice_weight"]
        teacher = load_checkpoint(previous_checkpoint, trusted_modules=trusted_modules) if previous_checkpoint else None
        if prototypes not in PROTOTYPE_METHODS:
            raise ValueError(f"prototypes must be one of {PROTOTYPE_METHODS}, got {prototypes!r}")
        if teacher is not None:
            if teacher.bank.method != prototypes:
                raise ValueError(f"the previous checkpoint's prototypes are {teacher.bank.method!r}, this stage asks "
                                 f"for {prototypes!r}: an incremental stage keeps the previous bank (set "
                                 f"model.prototypes: {teacher.bank.method})")
            if prototype_order is not None:
                log.warning("model.prototype_order is not used in an incremental stage: the previous checkpoint's "
                            "prototypes stay bit-identical and new classes are orthogonalised after them")
            self.bank = self._extend_teacher_bank(teacher, class_names, new_classes, encoder, backbone, head_cls)
        elif bank_state is not None:
            self.bank = PrototypeBank.from_state(bank_state)
        else:
            self.bank = PrototypeBank.build(Vocabulary(class_names).classes, build_encoder(encoder),
                                            modality=prompt_modality, method=prototypes, order=prototype_order,
                                            seed=prototype_seed)
        if class_names and self.bank.classes != Vocabulary(class_names).classes:
            raise ValueError(  # indices must follow names: the data indexes labels in class_names' order
                f"class order mismatch: the model's classes are {self.bank.classes} but the data indexes labels "
                f"as {Vocabulary(class_names).classes}"
            )
        self.hparams["class_names"] = self.bank.classes
        net_backbone = build_network(backbone, trusted_modules)
        self.net: Segmenter = segmenter(net_backbone, self._build_head(head, net_backbone, trusted_modules),
                                        feature_channels)
        self._optimizer_fn = optimizer
        # Local POD layers, checked now so that a bad pattern fails before any training
        self._pod_names = (resolve_layers(net_backbone, pod_layers or DEFAULT_POD_LAYERS) if pod_weight > 0 else [])
        self.register_buffer("_entropy_hist", torch.zeros(0, ENTROPY_BINS, dtype=torch.long), persistent=False)
        self._hist_batches = 0
        self._pseudo_on = pseudo_label is True  # "auto" is resolved when training starts
        if not (isinstance(distill_labeled, bool) or distill_labeled == "auto"):
            raise ValueError(f"distill_labeled must be true, false or 'auto', got {distill_labeled!r}")
        self._distill_labeled_on = distill_labeled is not False  # "auto" is resolved when training starts
        self.preprocessing = preprocessing or {}
        self.stage_history: list[dict[str, Any]] = []
        self._n_earlier_stages = 0  # stage entries of earlier stages; this stage's entry comes after them
        self.n_old = 0
        self._teacher: list[CFSegModule] = []  # a list keeps the teacher out of state_dict and parameters()
        # experts: one record per expert (0: the shared network), the LoRA layout, the router (statistics only)
        self.expert_records: list[dict[str, Any]] = []
        self.expert_layout: dict[str, Any] | None = None
        self.router: RidgeRouter | None = None
        self.modality_router: ModalityRouter | None = None  # which modality an image is (neutral view)
        self.route_override: int | None = None  # force one expert for every class (cfseg-segment --expert)
        self.last_route: dict[str, Any] | None = None
        self._expert_stage = False
        self.ewc_fisher: dict[str, torch.Tensor] | None = None  # accumulated importance, saved in the checkpoint
        self._ewc_anchor: list[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]] = []  # (theta*, F)
        if experts_state is not None:
            self._restore_experts(experts_state)
        if teacher is not None:
            self._start_from_teacher(teacher, strategy)
            self.preprocessing = merge_preprocessing(teacher.preprocessing, self.preprocessing, previous_checkpoint)
            self.stage_history = list(teacher.stage_history)
            self._n_earlier_stages = len(self.stage_history)
            self.n_old = len(teacher.bank.names) - 1
            if strategy == "distill":
                teacher.freeze()  # eval mode, requires_grad False
                self._teacher.append(teacher)
            if strategy == "ewc":
                if not teacher.ewc_fisher:
                    raise ValueError(f"{previous_checkpoint} carries no Fisher information: train the previous stage "
                                     "with model.ewc_fisher_batches > 0 (stage 0 and ewc stages store it)")
                anchors = {n: p.detach().clone() for n, p in teacher.net.named_parameters()}
                self._ewc_anchor.append((anchors, dict(teacher.ewc_fisher)))
        self.val_dice = PerClassDice(len(self.bank.names))

    def _build_head(self, head: str | dict[str, Any], backbone: nn.Module, trusted_modules: list[str] | None) -> Head:
        """The head ``head`` names, its missing constructor arguments filled from this module and the backbone."""
        import inspect

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

    @staticmethod
    def _extend_teacher_bank(teacher: CFSegModule, class_names: list[str] | None, new_classes: list[str] | None,
                             encoder: str, backbone: dict[str, Any], head_cls: type[Head]) -> PrototypeBank:
        """The teacher's bank with this stage's new classes appended (old rows bit-identical)."""
        if json.loads(json.dumps(teacher.hparams.backbone)) != json.loads(json.dumps(backbone)):
            raise ValueError(
                f"the previous checkpoint has another backbone:\n  previous: {teacher.hparams.backbone}\n"
                f"  this stage: {backbone}\nan incremental stage must keep the teacher's network"
            )
        old = teacher.bank.classes
        # the data's order decides (it indexes the labels); new_classes only declares which classes are new
        from_data = [c for c in Vocabulary(class_names or []).classes if c not in old]
        if new_classes is not None:
            declared = Vocabulary(new_classes).classes
            again = [c for c in new_classes if c in teacher.bank._index or Vocabulary([c]).classes[0] in old]
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

    # ---- experts (strategy "experts") ----------------------------------------------------------------
    def _layout_from_hparams(self) -> dict[str, Any]:
        h = self.hparams
        return {"layers": list(h.expert_layers or experts.DEFAULT_EXPERT_LAYERS), "rank": int(h.expert_rank),
                "alpha": float(h.expert_alpha),
                "projection": bool(h.expert_projection) and isinstance(getattr(self.head, "weight", None),
                                                                      nn.Parameter)}

    def _attach(self, layout: dict[str, Any], n_total: int) -> None:
        """LoRA layers of ``layout`` on ``self.net`` with experts 1..n_total-1 (zero-initialised)."""
        experts.attach_lora(self.net, layout["layers"], int(layout["rank"]), float(layout["alpha"]),
                            bool(layout.get("projection", False)))
        while experts.n_experts(self.net) < n_total:
            experts.add_expert(self.net)
        self.expert_layout = dict(layout)

    def _restore_experts(self, state: dict[str, Any]) -> None:
        """Rebuild the experts of a saved checkpoint (:meth:`experts_state`) before its weights are loaded."""
        self.expert_records = [dict(r) for r in state.get("records", [])]
        if state.get("layout") and len(self.expert_records) > 1:
            self._attach(state["layout"], len(self.expert_records))
        if state.get("router"):
            self.router = RidgeRouter.from_state(state["router"])
        if state.get("modality_router"):
            self.modality_router = ModalityRouter.from_state(state["modality_router"])

    def experts_state(self) -> dict[str, Any]:
        """Experts metadata saved in the checkpoint: records, LoRA layout and router statistics (data only)."""
        return {"records": [dict(r) for r in self.expert_records], "layout": self.expert_layout,
                "router": self.router.state() if self.router is not None else None,
                "router_layer": self.hparams.router_layer,
                "modality_router": self.modality_router.state() if self.modality_router is not None else None}

    def _start_from_teacher(self, teacher: CFSegModule, strategy: str) -> None:
        """Copy the previous stage's network (and its experts); ``experts``: freeze it and add a new expert."""
        self.expert_records = [dict(r) for r in teacher.expert_records]
        if not self.expert_records:  # a checkpoint trained before experts existed: expert 0 serves all it knows
            self.expert_records = [_record(0, teacher.bank.classes, sorted({
                d.get("domain") or "" for st in teacher.stage_history for d in st.get("datasets", [])} - {""}))]
        self.router = RidgeRouter.from_state(teacher.router.state()) if teacher.router is not None else None
        self.modality_router = (ModalityRouter.from_state(teacher.modality_router.state())
                                if teacher.modality_router is not None else None)
        if teacher.expert_layout is not None:
            if strategy == "experts" and teacher.expert_layout != self._layout_from_hparams():
                raise ValueError(f"the previous checkpoint's experts sit on {teacher.expert_layout}, this stage asks "
                                 f"for {self._layout_from_hparams()}; keep expert_layers/rank/alpha across stages")
            self._attach(teacher.expert_layout, experts.n_experts(teacher.net))
        self.net.load_state_dict(teacher.net.state_dict())
        if strategy != "experts":
            if teacher.expert_layout is not None:
                raise ValueError("the previous checkpoint carries LoRA experts: continue it with strategy 'experts'")
            return
        if self.expert_layout is None:
            self._attach(self._layout_from_hparams(), 1)
        previous = experts.n_experts(self.net) - 1
        new = experts.add_expert(self.net, previous if self.hparams.expert_init == "previous" else None)
        for p in self.net.parameters():
            p.requires_grad_(False)
        for p in experts.expert_parameters(self.net, new):
            p.requires_grad_(True)
        experts.set_active_expert(self.net, new)
        self._expert_stage = True
        if self.router is None and self.hparams.router_batches > 0:
            warnings.warn("the previous checkpoint has no router statistics for its expert(s): volumes cannot be "
                          "routed between domains (class-incremental experts still serve their classes); train "
                          "stage 0 with model.router_batches > 0 for domain routing", stacklevel=3)

    @property
    def n_experts(self) -> int:
        """Experts of the network including expert 0 (the shared weights); 1 without LoRA experts."""
        if self.expert_layout is None:  # no LoRA attached (the forward path asks this per window batch)
            return 1
        return experts.n_experts(self.net)

    def train(self, mode: bool = True) -> CFSegModule:
        """As ``nn.Module.train``; in an ``experts`` stage normalisation statistics of the frozen network stay fixed."""
        super().train(mode)
        if mode and getattr(self, "_expert_stage", False):
            for m in self.net.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def _routing_domains(self) -> list[str]:
        return sorted({d for r in self.expert_records for d in r.get("domains", [])})

    @property
    def can_route(self) -> bool:
        """Whether the router can pick a domain: experts of two or more domains and statistics for every expert."""
        return (self.router is not None and self.n_experts > 1 and len(self._routing_domains()) > 1
                and self.router.n_experts == len(self.expert_records))

    def expert_plan(self, class_indices: Sequence[int], domain: str | None = None) -> dict[int, list[int]]:
        """Which expert segments which class: ``{expert: [global class indices]}``.

        A class is served by the experts of the stages that trained it (annotated it); among those, the latest of
        the routed ``domain`` if there is one, else the latest. ``route_override`` sends every class to one expert.
        """
        if self.route_override is not None:
            return {int(self.route_override): [int(k) for k in class_indices]}
        plan: dict[int, list[int]] = {}
        names = self.bank.names
        for k in class_indices:
            serving = [e for e, r in enumerate(self.expert_records) if names[int(k)] in r["classes"]] or [0]
            in_domain = [e for e in serving if domain is not None and domain in self.expert_records[e]["domains"]]
            plan.setdefault((in_domain or serving)[-1], []).append(int(k))
        return plan

    def _router_features(self, x: torch.Tensor) -> torch.Tensor:
        """Router features [B, 2C] of images ``x`` [B, C, *S]: the pooled ``router_layer`` output of the shared
        network (expert 0); the rest of the network is not run."""
        name = self._router_layer_name()
        layer = self.net.backbone.get_submodule(name)
        store: list[torch.Tensor] = []

        class _Stop(Exception):
            pass

        def hook(_m: nn.Module, _i: Any, out: Any) -> None:
            store.append(out[0] if isinstance(out, (tuple, list)) else out)
            raise _Stop

        handle = layer.register_forward_hook(hook)
        try:
            with torch.no_grad(), experts.active_expert(self.net, 0):
                self.net.backbone(x)
        except _Stop:
            pass
        finally:
            handle.remove()
        if not store:
            raise ValueError(f"router layer {name!r} did not run in the backbone's forward pass")
        return pooled_features(store[0].float()).as_subclass(torch.Tensor)  # plain data, never a MetaTensor

    def _router_layer_name(self) -> str:
        return deepest_layer(self.net.backbone, self.hparams.router_layer, "model.router_layer")

    def route(self, image: torch.Tensor) -> dict[str, Any]:
        """Top-1 expert and its domain for one preprocessed volume ``image`` [1, C, *S] (see :meth:`route_scores`)."""
        e = int(self.route_scores(image).argmax())
        return {"expert": e, "domains": list(self.expert_records[e]["domains"]), "stage": e}

    def route_scores(self, image: torch.Tensor) -> torch.Tensor:
        """Mean router score per expert [n_experts] for one preprocessed volume ``image`` [1, C, *S].

        The volume is covered by ``roi_size`` windows without overlap except at the far borders (the last window
        ends at the border; zero padding only where the volume is smaller than a window), the router scores each
        window's features and the mean score picks the expert (as :meth:`RidgeRouter.predict_volume`).
        """
        if self.router is None:
            raise ValueError("this checkpoint has no router statistics")
        return self.router.scores(self._window_features(image)).mean(0)

    def _window_features(self, image: torch.Tensor) -> torch.Tensor:
        """Router features [N_windows, 2C] of one volume [1, C, *S] covered by ``roi_size`` windows (see
        :meth:`route_scores`)."""
        from monai.data.utils import dense_patch_slices

        roi = [int(r) for r in self.hparams.roi_size]
        x = image[:1].as_subclass(torch.Tensor) if isinstance(image, torch.Tensor) else image
        pad = [max(0, r - n) for n, r in zip(x.shape[2:], roi, strict=True)]
        x = torch.nn.functional.pad(x, [p for q in reversed(pad) for p in (0, q)])
        p0 = next(self.parameters())
        feats = [self._router_features(x[(slice(None), slice(None), *sl)].to(p0.device, p0.dtype)).cpu()
                 for sl in dense_patch_slices(tuple(x.shape[2:]), roi, roi)]
        return torch.cat(feats)

    def modality_scores(self, view: torch.Tensor) -> dict[str, float]:
        """Mean modality-router score per modality for one volume in the modality-neutral view [1, C, *S]
        (:func:`cfseg.segmentation.modality_view`); the highest names the modality."""
        if self.modality_router is None:
            raise ValueError("this checkpoint has no modality router statistics")
        return self.modality_router.scores(self._window_features(view))

    def _collect_modality_statistics(self) -> None:
        """Modality-router statistics from up to ``router_batches`` training cases of each dataset of this stage,
        each loaded in the modality-neutral view and covered by windows (as at inference)."""
        from cfseg.data.transforms import Preprocessing, deterministic_transforms, neutral_view

        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        datasets = [(d, items) for d in getattr(dm, "datasets", []) if (items := dm.items(d, "train"))]
        if not datasets:
            return
        if self.modality_router is not None:
            view = Preprocessing.from_dict(self.modality_router.view)
        else:
            first = dm.preprocessing(datasets[0][0].info.modality)
            view = neutral_view(first.spacing, first.orientation)
        load = mt.Compose(deterministic_transforms(view, labeled=False))
        for d, items in datasets:
            k = min(self.hparams.router_batches, len(items))  # k cases spread evenly over the training cases
            for i in sorted({round(j * (len(items) - 1) / max(1, k - 1)) for j in range(k)}):
                feats = self._window_features(load({"image": items[i]["image"]})["image"][None])
                if self.modality_router is None:  # the feature width comes from the first case
                    self.modality_router = ModalityRouter(feats.shape[1], view.to_dict(),
                                                          gamma=self.hparams.router_modality_gamma)
                self.modality_router.update(feats, d.info.modality)

    def _collect_router_statistics(self, expert: int) -> None:
        """Router statistics of this stage's training images for ``expert`` (``router_batches`` batches)."""
        h = self.hparams
        loader = self.trainer.train_dataloader if self._trainer is not None else None
        if loader is None or h.router_batches <= 0:
            return
        if self.router is None and expert != 0:
            return  # no statistics for the earlier experts: routing would be wrong, so none is kept
        for batch in itertools.islice(_training_batches(loader), h.router_batches):
            feats = self._router_features(batch["image"].to(self.device, next(self.parameters()).dtype)).cpu()
            if self.router is None:  # the feature width comes from the first batch
                self.router = RidgeRouter(feats.shape[1], gamma=h.router_gamma,
                                          random_features=h.router_random_features,
                                          seed=int(torch.initial_seed()) % 2**31)
            self.router.update(feats, expert)

    def configure_callbacks(self) -> list[L.Callback]:
        """The router's statistics are taken when training ends, before the last checkpoint is written."""
        return [_EndOfStage()]

    def on_train_start(self) -> None:
        self._entropy_hist = self._entropy_hist.new_zeros(0, ENTROPY_BINS)  # thresholds are estimated per stage
        self._hist_batches = 0
        self._router_done = self._fisher_done = False
        self._pseudo_on = self._resolve_pseudo_label()
        self._distill_labeled_on = self._resolve_distill_labeled()

    def _resolve_pseudo_label(self) -> bool:
        """Whether this stage pseudo-labels old classes: ``pseudo_label`` itself, or for ``"auto"``: a teacher
        with old classes, and every labelled training dataset of the stage in a domain the teacher trained on."""
        h = self.hparams
        if h.pseudo_label != "auto":
            return bool(h.pseudo_label)
        if self.teacher is None or self.n_old == 0:
            return False
        return self._teacher_knows_stage_domains("pseudo_label")

    def _resolve_distill_labeled(self) -> bool:
        """Whether this stage distils on its labelled images: ``distill_labeled`` itself, or for ``"auto"``: every
        labelled training dataset of the stage in a domain the teacher trained on."""
        h = self.hparams
        setting = h.get("distill_labeled", "auto")
        if setting != "auto" or self.teacher is None:
            return bool(setting)
        on = self._teacher_knows_stage_domains("distill_labeled")
        dm = getattr(self.trainer, "datamodule", None)
        if not on and not any(not d.config.labeled for d in getattr(dm, "datasets", [])):
            warnings.warn("distill_labeled='auto' is off in this domain step and the stage has no image-only "
                          "(unlabeled) dataset: nothing is distilled, the stage fine-tunes; list the earlier stages' "
                          "images under the stage's `unlabeled` (or set model.distill_labeled: true)", stacklevel=2)
        return on

    def _teacher_knows_stage_domains(self, setting: str) -> bool:
        """Whether every labelled training dataset of this stage is of a domain the teacher trained on (logged)."""
        known = {d.get("domain") for st in self.teacher.stage_history for d in st.get("datasets", [])} - {None}
        dm = getattr(self.trainer, "datamodule", None)
        stage = {d.domain for d in getattr(dm, "datasets", []) if d.config.labeled and not d.config.val_only}
        if not known or not stage:  # a teacher without stage records, or no cfseg data module: by modality
            known = set(self.teacher.preprocessing)
            stage = set(getattr(dm, "preprocessing_by_modality", None) or self.preprocessing)
        on = stage <= known
        rank_zero_info(f"{setting}='auto': {'on' if on else 'off'} (this stage's domains {sorted(stage)}, "
                       f"the teacher's {sorted(known)})")
        return on

    def on_train_end(self) -> None:
        self.end_of_stage()  # training stopped early (no last epoch end): still before the final save

    def end_of_stage(self) -> None:
        """What a stage leaves for later stages, computed once per fit before the last checkpoint: the router's
        statistics and the EWC Fisher."""
        self.router_statistics()
        self.fisher_information()

    def fisher_information(self) -> None:
        """Stage 0 and ``ewc`` stages: the diagonal Fisher of this stage's loss (``ewc_fisher_batches`` training
        batches) at the final weights, added to the previous stages' (EWC's accumulated importance)."""
        h = self.hparams
        if getattr(self, "_fisher_done", True) or h.ewc_fisher_batches <= 0 or h.strategy == "joint" \
                or (h.previous_checkpoint and h.strategy != "ewc"):
            return
        self._fisher_done = True
        loader = self.trainer.train_dataloader if self._trainer is not None else None
        if loader is None:
            return

        def loss_fn(net: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
            x = batch["image"].to(self.device).as_subclass(torch.Tensor)
            batch = {k: (v.to(self.device).as_subclass(torch.Tensor) if isinstance(v, torch.Tensor) else v)
                     for k, v in batch.items()}
            return self.loss(self._logits(*net.encode(x)), batch).float()

        with torch.enable_grad():
            new = diagonal_fisher(self.net, _training_batches(loader), loss_fn, h.ewc_fisher_batches)
        old = self._ewc_anchor[0][1] if self._ewc_anchor else None
        self.ewc_fisher = merge_fisher({n: f.cpu() for n, f in old.items()} if old else None, new)

    def router_statistics(self) -> None:
        """Stage 0 (no previous checkpoint) and ``experts`` stages: the router's statistics of this stage's images,
        once per fit, from the shared network as it will stay frozen."""
        h = self.hparams
        if getattr(self, "_router_done", True) or h.router_batches <= 0 or h.strategy == "joint" \
                or (h.previous_checkpoint and not self._expert_stage):
            return
        self._router_done = True
        was_training = self.training
        self.eval()
        try:
            self._collect_router_statistics(self.n_experts - 1 if self._expert_stage else 0)
            self._collect_modality_statistics()
        finally:
            self.train(was_training)

    # ---- properties ----------------------------------------------------------------------------------
    @property
    def class_names(self) -> list[str]:
        return self.bank.classes

    @property
    def prototypes(self) -> torch.Tensor:
        """[K+1, D] orthonormal prototypes (background first)."""
        return self.bank.prototypes

    # ---- forward -------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, class_indices: Sequence[int] | None = None) -> torch.Tensor:
        """Logits [B, K'+1, *S] over background plus ``class_indices`` (all classes when None).

        With LoRA experts outside training, each class comes from the expert that serves it
        (:meth:`expert_plan`, in the domain of :attr:`last_route`); several experts' outputs merge as log-odds:
        expert e's softmax covers background and every class known when it was trained, and its class c scores
        ``log p_e(c) - log p_e(not one of e's classes)`` (background and the other classes, as the partial-label
        loss it was trained with pools them); background scores 0. A voxel is background unless some expert
        prefers one of its classes to everything else, and an expert's decision stands wherever no other expert
        claims the voxel.
        """
        if self.n_experts > 1 and not self.training:
            return self._experts_forward(x, class_indices)
        return self._forward_active(x, class_indices)

    def _experts_forward(self, x: torch.Tensor, class_indices: Sequence[int] | None) -> torch.Tensor:
        ks = list(range(1, len(self.bank.names))) if class_indices is None else \
            [int(i) for i in class_indices if int(i) != 0]
        domains = (self.last_route or {}).get("domains") or [None]
        plan = self.expert_plan(ks, domains[0])
        if len(plan) == 1:
            (e, _), = plan.items()
            with experts.active_expert(self.net, e):
                return self._forward_active(x, ks)
        position = {k: i + 1 for i, k in enumerate(ks)}
        out = None
        with experts.shared_prefix_cache(self.net.backbone):
            for e, mine in plan.items():
                others = [k for k in self._known_classes(e) if k not in mine]
                with experts.active_expert(self.net, e):
                    lp = self._forward_active(x, mine + others).float().log_softmax(1)
                rest = torch.logsumexp(lp[:, [0, *range(len(mine) + 1, lp.shape[1])]], dim=1)
                if out is None:
                    out = lp.new_zeros((lp.shape[0], len(ks) + 1, *lp.shape[2:]))
                for j, k in enumerate(mine):
                    torch.sub(lp[:, j + 1], rest, out=out[:, position[k]])
        return out

    def _known_classes(self, expert: int) -> list[int]:
        """Bank indices of the classes known when ``expert`` was trained (its and the earlier experts' stages)."""
        known = {c for r in self.expert_records[: expert + 1] for c in r["classes"]}
        return [k for k, name in enumerate(self.bank.names) if k > 0 and name in known]

    def _forward_active(self, x: torch.Tensor, class_indices: Sequence[int] | None = None) -> torch.Tensor:
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

    # ---- training ------------------------------------------------------------------------------------
    def loss(self, logits: torch.Tensor, batch: dict[str, Any], target: torch.Tensor | None = None,
             annotated: torch.Tensor | None = None, ignore_index: int | None = None) -> torch.Tensor:
        """The sum of :meth:`loss_terms`."""
        terms = self.loss_terms(logits, batch, target, annotated, ignore_index)
        return sum(terms.values(), torch.zeros((), dtype=terms["partial"].dtype, device=terms["partial"].device))

    def loss_terms(self, logits: torch.Tensor, batch: dict[str, Any], target: torch.Tensor | None = None,
                   annotated: torch.Tensor | None = None, ignore_index: int | None = None,
                   dice_labels: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
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
        h = self.hparams
        batch_dice = h.get("batch_dice", True)
        if dice_labels is None:
            partial = self.head.loss(logits, target, annotated, ce_weight=h.ce_weight, dice_weight=h.dice_weight,
                                     ignore_index=ignore_index, batch_dice=batch_dice)
        else:
            partial = self.head.loss(logits, target, annotated, ce_weight=h.ce_weight, dice_weight=0.0,
                                     ignore_index=ignore_index, batch_dice=batch_dice) \
                + self.head.loss(logits, *dice_labels, ce_weight=0.0, dice_weight=h.dice_weight, batch_dice=batch_dice)
        terms = {"partial": partial}
        if dice_labels is not None and h.get("pseudo_dice_weight", 0.0) > 0:
            t_p, ann_p = distill.pseudo_dice_labels(target, annotated, dice_labels[1], ignore_index)
            terms["pseudo_dice"] = self.head.loss(logits, t_p, ann_p, ce_weight=0.0, dice_weight=h.pseudo_dice_weight,
                                                  ignore_index=ignore_index, batch_dice=batch_dice)
        if h.get("exclusion_weight", 0.0) > 0:
            terms["exclusion"] = h.exclusion_weight * exclusion_loss(logits, target, annotated, ignore_index)
        if h.get("entropy_weight", 0.0) > 0:
            terms["entropy"] = h.entropy_weight * ambiguous_entropy(logits, target, annotated, ignore_index)
        return terms

    @property
    def teacher(self) -> CFSegModule | None:
        """The frozen previous-stage model (``strategy="distill"``), or None."""
        return self._teacher[0] if self._teacher else None

    @property
    def _pod_active(self) -> bool:
        return self.teacher is not None and self.hparams.pod_weight > 0 and bool(self._pod_names)

    def teacher_outputs(self, x: torch.Tensor) -> dict[str, Any]:
        """The frozen teacher on images ``x`` [B, C, *S], without gradients, under the caller's autocast.

        Returns:
            ``feats`` [B, F, *S], ``logits`` [B, n_old+1, *S], ``acts`` (the Local POD layers' outputs, or None) and
            ``context`` (what the teacher's head read from its backbone).
        """
        teacher = self.teacher
        if teacher is None:
            raise ValueError("no teacher: teacher_outputs needs strategy='distill' and a previous_checkpoint")
        teacher.to(x.device)
        x = x.to(next(teacher.parameters()).dtype)  # a bf16-true student hands bf16 images to a float32 teacher
        with torch.no_grad():
            if self._pod_active:
                with capture_activations(teacher.net.backbone, self._pod_names) as acts:
                    feats, ctx = teacher.net.encode(x)
            else:
                acts, (feats, ctx) = None, teacher.net.encode(x)
            logits = teacher.net.logits(feats, None, **teacher.head_context(), **ctx)
        return {"feats": feats, "logits": logits, "acts": acts, "context": ctx}

    def distillation_terms(self, x: torch.Tensor, student_logits: torch.Tensor,
                           student_feats: torch.Tensor | None = None, teacher_out: dict[str, Any] | None = None,
                           student_acts: list[torch.Tensor] | None = None,
                           keep: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Weighted distillation terms of the teacher on images ``x`` [B, C, *S] ({} without a teacher).

        Keys: ``kd`` (MiB), ``sim``, ``feat``, ``pod`` (those with a positive weight and their inputs given).
        ``teacher_out`` reuses :meth:`teacher_outputs`; ``student_acts`` are the student's POD layer outputs.
        ``keep`` [B, *S] bool: the voxels the voxel-wise terms (kd, sim, feat) average over (None: all).
        """
        if self.teacher is None:
            return {}
        h = self.hparams
        t = teacher_out if teacher_out is not None else self.teacher_outputs(x)
        terms = {"kd": self.kd_weight_now() * mib_distillation(student_logits, t["logits"], self.n_old,
                                                               h.kd_temperature, mask=keep)}
        if h.sim_weight > 0 and self.head.has_similarity:
            s_sim = self.head.similarity(student_logits[:, : self.n_old + 1])
            terms["sim"] = h.sim_weight * similarity_distillation(s_sim, self.teacher.head.similarity(t["logits"]),
                                                                  mask=keep)
        if h.feat_weight > 0 and student_feats is not None:
            terms["feat"] = h.feat_weight * feature_distillation(student_feats, t["feats"], mask=keep, normalize=True)
        if h.pod_weight > 0 and student_acts is not None and t["acts"] is not None:
            terms["pod"] = h.pod_weight * local_pod(student_acts, t["acts"], scales=tuple(h.pod_scales))
        return terms

    def kd_ramp_length(self) -> int:
        """Steps of the KD ramp in this stage: ``kd_ramp_steps``, or ``kd_ramp_fraction`` of the stage's training
        steps (the trainer's estimate); 0: no ramp."""
        h = self.hparams
        if h.get("kd_ramp_steps", 0) > 0:
            return int(h.kd_ramp_steps)
        fraction = h.get("kd_ramp_fraction", 0.0)
        if fraction <= 0 or self._trainer is None:
            return 0
        total = self.trainer.estimated_stepping_batches
        if not math.isfinite(total):
            raise ValueError("kd_ramp_fraction needs a stage of known length (trainer.max_steps or max_epochs); "
                             "give kd_ramp_steps instead")
        return max(1, round(fraction * total))

    def kd_weight_now(self) -> float:
        """The output distillation's weight at this step of the stage: ``kd_weight``, or on its linear ramp from
        ``kd_ramp_start`` over the stage's first :meth:`kd_ramp_length` steps."""
        h = self.hparams
        ramp = self.kd_ramp_length()
        if ramp <= 0:
            return h.kd_weight
        f = min(1.0, self.global_step / ramp)
        return h.kd_ramp_start + f * (h.kd_weight - h.kd_ramp_start)

    def _student_features(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor],
                                                          list[torch.Tensor] | None]:
        """Student features [B, F, *S], its head's context from the backbone and, when Local POD is on, its POD
        layers' outputs."""
        if not self._pod_active:
            return *self.net.encode(x), None
        with capture_activations(self.net.backbone, self._pod_names) as acts:
            feats, ctx = self.net.encode(x)
        return feats, ctx, acts

    def pseudo_labels(self, target: torch.Tensor, annotated: torch.Tensor,
                      teacher_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int | None]:
        """PLOP pseudo-labels for a batch: ``(target [B, *S], annotated [B, K+1], ignore_index)``.

        The thresholds come from a running histogram over the stage's first ``pseudo_threshold_batches`` batches
        (this batch included, before it is labelled).
        """
        h = self.hparams
        c = teacher_logits.shape[1]
        if self._entropy_hist.shape[0] != c or self._entropy_hist.device != teacher_logits.device:
            self._entropy_hist = torch.zeros(c, ENTROPY_BINS, dtype=torch.long, device=teacher_logits.device)
            self._hist_batches = 0
        if self._hist_batches < h.pseudo_threshold_batches:
            self._entropy_hist += entropy_histogram(teacher_logits, target, ENTROPY_BINS)
            self._hist_batches += 1
        thresholds = median_thresholds(self._entropy_hist, h.pseudo_entropy_floor, h.pseudo_entropy_cap)
        ignore = PSEUDO_IGNORE if h.pseudo_ignore_uncertain else None
        new_target, new_annotated = distill.pseudo_label(target, annotated, teacher_logits, thresholds, ignore)
        return new_target, new_annotated, ignore

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        unlabeled = None
        if "labeled" in batch:  # CombinedLoader with image-only entries
            batch, unlabeled = batch["labeled"], batch.get("unlabeled")
        h = self.hparams
        x = batch["image"]
        bs = len(x)
        teacher_on_x = self.teacher is not None and (self._distill_labeled_on or (self.n_old > 0 and self._pseudo_on))
        teacher_out = self.teacher_outputs(x) if teacher_on_x else None
        target, annotated, ignore = batch["label"][:, 0].long(), batch["annotated"].bool(), None
        # voxels labelled with a new class are left out of the distillation (distill_new_voxels=False)
        keep = None if h.get("distill_new_voxels", True) else target <= self.n_old
        dice_labels = None
        if teacher_out is not None and self.n_old > 0 and self._pseudo_on:
            old_target = target
            if not h.get("pseudo_label_dice", False):
                dice_labels = (target, annotated)
            target, annotated, ignore = self.pseudo_labels(target, annotated, teacher_out["logits"])
            self.log("train/pseudo_voxels", ((target != old_target) & (target > 0)).float().mean(), on_step=True,
                     on_epoch=True, batch_size=bs)
            if ignore is not None:
                self.log("train/pseudo_ignored", (target == ignore).float().mean(), on_step=True, on_epoch=True,
                         batch_size=bs)
        feats, ctx, acts = self._student_features(x)
        logits = self._logits(feats, ctx)
        supervised = self.loss_terms(logits, batch, target, annotated, ignore, dice_labels)
        loss = sum(supervised.values(), logits.new_zeros(()).float())
        for name in ("exclusion", "entropy", "pseudo_dice"):
            if name in supervised:
                self.log(f"train/{name}", supervised[name], on_step=True, on_epoch=True, batch_size=bs)
        if self.teacher is not None:
            terms = (self.distillation_terms(x, logits, feats, teacher_out, acts, keep) if self._distill_labeled_on
                     else {})
            if unlabeled is not None:
                u_feats, u_ctx, u_acts = self._student_features(unlabeled["image"])
                for k, v in self.distillation_terms(unlabeled["image"], self._logits(u_feats, u_ctx), u_feats,
                                                    student_acts=u_acts).items():
                    terms[k] = terms.get(k, 0) + v
            kd = sum(terms.values(), logits.new_zeros(()).float())
            self.log("train/distill", kd, on_step=True, on_epoch=True, batch_size=bs)
            if self.kd_ramp_length() > 0:
                self.log("train/kd_weight", self.kd_weight_now(), on_step=True, on_epoch=False, batch_size=bs)
            if "pod" in terms:
                self.log("train/pod", terms["pod"], on_step=True, on_epoch=True, batch_size=bs)
            loss = loss + kd
        if self._ewc_anchor:
            anchors, fisher = self._ewc_anchor[0]
            if next(iter(anchors.values())).device != x.device:
                self._ewc_anchor[0] = anchors, fisher = ({n: t.to(x.device) for n, t in anchors.items()},
                                                         {n: t.to(x.device) for n, t in fisher.items()})
            penalty = 0.5 * h.ewc_lambda * ewc_penalty(self.net.named_parameters(), anchors, fisher)
            self.log("train/ewc", penalty, on_step=True, on_epoch=True, batch_size=bs)
            loss = loss + penalty
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=bs)
        return loss

    def _logits(self, feats: torch.Tensor, context: dict[str, torch.Tensor]) -> torch.Tensor:
        """Logits [B, K+1, *S] over every class from features [B, F, *S] and the backbone's ``context``."""
        return self.net.logits(feats, None, **self.head_context(), **context)

    def _evaluate_volume(self, batch: dict[str, Any]) -> None:
        logits = self.sliding_window_logits(batch["image"])
        pred = self.head.labels(logits)
        target = batch["label"][:, 0].long()
        for b in range(pred.shape[0]):
            ks = [k for k in torch.nonzero(batch["annotated"][b]).flatten().tolist() if k > 0]
            self.val_dice.update(ks, dice_per_class(pred[b].cpu(), target[b].cpu(), ks))

    def _log_dice(self, prefix: str) -> None:
        per_class = self.val_dice.compute()  # every rank calls this once (DDP-safe)
        self.val_dice.reset()
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
        """Label maps on each input's own voxel grid (written by :class:`cfseg.writers.NiftiPredictionWriter`).

        The collated ``image`` MetaTensor [B, C, *S] carries the network grid's affine and, from loading, each
        input's ``original_affine`` and ``spatial_shape``; :func:`cfseg.geometry.labels_to_input_grid` maps the
        prediction back (the same path as ``cfseg-segment``).

        Returns:
            one dict per case: ``case_id``, ``dataset``, ``labels`` uint8 [*S_input] (global class values),
            ``affine`` [4, 4] (the input's), ``source`` (the input file).
        """
        from cfseg.geometry import labels_to_input_grid

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
                "affine": dst_affine,
                "labels": labels_to_input_grid(labels[b].numpy(), probs[b].numpy(), values, net_affine, dst_shape,
                                               dst_affine),
            })
        return out

    def configure_optimizers(self):
        h = self.hparams
        params = [p for p in self.parameters() if p.requires_grad]
        if self._optimizer_fn is not None:
            return self._optimizer_fn(params)
        lr = h.lr * (h.incremental_lr_factor if h.previous_checkpoint else 1.0)  # the stage's learning rate
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=h.weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches)) if self._trainer is not None else 1000
        warm = max(1, int(h.warmup_fraction * total))

        def schedule(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ---- checkpoints ---------------------------------------------------------------------------------
    def on_fit_start(self) -> None:
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
        classes_in_order = [c for c in self.bank.classes if c in classes]
        domains = sorted({str(d.domain) for d in trained})
        modalities = sorted({str(d.info.modality) for d in trained})
        if self._expert_stage:  # this stage's expert serves the classes it was trained on, in its domains
            new = self.n_experts - 1
            self.expert_records = [*self.expert_records[:new], _record(new, classes_in_order, domains, modalities)]
        elif self.hparams.strategy != "experts":  # the whole network changed: expert 0 serves all it learnt
            old = self.expert_records[0] if self.expert_records else {"classes": [], "domains": []}
            self.expert_records = [_record(0, [c for c in self.bank.classes if c in classes or c in old["classes"]],
                                           sorted(set(domains) | set(old["domains"])),
                                           sorted(set(modalities) | set(old.get("modalities", []))))]

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
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore cfseg's metadata; refuse a checkpoint whose classes (names or order) differ from this model's.

        Called by Lightning before the weights are loaded (``fit/validate/test --ckpt_path``), so a checkpoint of
        another vocabulary never replaces the bank: adding classes is an incremental stage
        (``model.previous_checkpoint``), not a resume.
        """
        meta = checkpoint.get("cfseg")
        if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"not a cfseg checkpoint (no 'cfseg' metadata of format {CHECKPOINT_FORMAT})")
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
        fisher = meta.get("ewc_fisher")
        if fisher is not None and not (isinstance(fisher, dict)
                                       and all(isinstance(v, torch.Tensor) for v in fisher.values())):
            raise ValueError("damaged cfseg checkpoint: 'ewc_fisher' is not a dict of tensors")
        self.ewc_fisher = fisher


def _training_batches(loader: Iterable[Any]) -> Iterator[dict[str, Any]]:
    """The labelled part of ``loader``'s batches, pass after pass (a short loader repeats; an empty one ends)."""
    while True:
        n = 0
        for batch in loader:
            n += 1
            yield batch["labeled"] if isinstance(batch, dict) and "labeled" in batch else batch
        if n == 0:
            return


class _EndOfStage(L.Callback):
    """Calls :meth:`CFSegModule.end_of_stage` (router statistics, EWC Fisher) at the end of the last training epoch
    (Lightning runs model callbacks before checkpoint callbacks, so the checkpoint of that epoch carries them)."""

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        last_step = 0 < trainer.max_steps <= trainer.global_step
        last_epoch = trainer.max_epochs not in (None, -1) and trainer.current_epoch + 1 >= trainer.max_epochs
        if (last_step or last_epoch) and isinstance(pl_module, CFSegModule):
            pl_module.end_of_stage()


def _record(expert: int, classes: list[str], domains: list[str], modalities: list[str] | None = None) -> dict[str, Any]:
    """What one expert serves: the classes its stage trained, the domains and modalities of its training images."""
    return {"expert": int(expert), "classes": list(classes), "domains": list(domains),
            "modalities": list(modalities if modalities is not None else domains)}


def _canonical_preprocessing(p: Any) -> Any:
    return json.loads(json.dumps(p))  # tuples and lists compare equal


def merge_preprocessing(known: dict[str, Any], new: dict[str, Any], where: str | None = None) -> dict[str, Any]:
    """Preprocessing per modality of every domain seen so far: ``known`` plus ``new``'s modalities.

    A model that learnt CT in one stage and MRI in the next must still read CT, so nothing is dropped; one
    modality preprocessed two ways (another spacing, window, orientation) is an error, because the weights
    learnt on one cannot serve both.

    Raises:
        ValueError: a modality present in both with different settings.
    """
    out = dict(known or {})
    for modality, pre in (new or {}).items():
        if modality in out and _canonical_preprocessing(out[modality]) != _canonical_preprocessing(pre):
            raise ValueError(
                f"two preprocessings for {modality!r}: {_canonical_preprocessing(out[modality])} (learnt earlier) "
                f"vs {_canonical_preprocessing(pre)} ({where or 'new'}); keep the earlier spacing, orientation and "
                "intensity settings for this modality"
            )
        out.setdefault(modality, pre)
    return out


def load_checkpoint(path: str, map_location: str | torch.device = "cpu",
                    trusted_modules: list[str] | None = None) -> CFSegModule:
    """Load a cfseg checkpoint as data: no pickled code (``torch.load(weights_only=True)``) and a network built
    only from the allow-list of :mod:`cfseg.builder` (``trusted_modules`` extends it; the file cannot).

    Raises:
        FileNotFoundError: no such file.
        UntrustedSpecError: the checkpoint names a network outside the allow-list (nothing was imported or called).
        ValueError: the file is not a cfseg checkpoint or is damaged.
    """
    from pathlib import Path

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: checkpoint not found")
    try:
        ckpt = torch.load(p, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises several types for non-checkpoints
        raise ValueError(f"{p}: not a loadable cfseg checkpoint ({type(e).__name__}: {str(e)[:200]})") from e
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("cfseg"), dict) \
            or ckpt["cfseg"].get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{p}: not a cfseg checkpoint (no 'cfseg' metadata of format {CHECKPOINT_FORMAT})")
    meta = ckpt["cfseg"]
    import inspect

    skip = {"self", "class_names", "preprocessing", "previous_checkpoint", "new_classes", "trusted_modules",
            "bank_state", "optimizer", "experts_state"}
    allowed = set(inspect.signature(CFSegModule.__init__).parameters) - skip
    hp = {k: v for k, v in ckpt.get("hyper_parameters", {}).items() if k in allowed}
    hp["backbone"] = hp.get("backbone") or DEFAULT_BACKBONE
    check_spec(hp["backbone"], trusted_modules)  # refuse before anything else is built or imported
    if isinstance(hp.get("head"), dict):
        check_spec(hp["head"], trusted_modules)
    try:
        if hp.get("strategy") in ("experts", "ewc"):  # the stage is over: its experts come from the saved metadata
            hp["strategy"] = "finetune"
        module = CFSegModule(bank_state=meta["prototype_bank"], preprocessing=meta.get("preprocessing"),
                             trusted_modules=trusted_modules, experts_state=meta.get("experts"), **hp)
        module.load_state_dict(ckpt["state_dict"])
        module.on_load_checkpoint(ckpt)
    except UntrustedSpecError as e:
        raise UntrustedSpecError(f"{p}: {e}") from None
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"{p}: damaged cfseg checkpoint ({type(e).__name__}: {str(e)[:300]})") from None
    return module.eval()
