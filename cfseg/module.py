"""The LightningModule: a segmenter, a prototype bank, the partial-label loss, whole-volume validation.

The class list comes from the data module (linked by the CLI). The backbone is injected as a
``{"class_path": ..., "init_args": {...}}`` spec (any MONAI 3D network mapping an image to F full-resolution
feature channels), kept as plain data so that a checkpoint rebuilds the network without pickled code.

Checkpoints are self-describing: besides the weights (the bank's prototypes, names, prompts and encoder id
travel in the state dict), ``checkpoint["cfseg"]`` holds the vocabulary, the preprocessing per modality and
the stage history; ``hyper_parameters`` holds the network spec.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import lightning as L
import numpy as np
import torch
from monai.inferers import sliding_window_inference
from torch import nn

from cfseg.builder import UntrustedSpecError, build_network, check_spec
from cfseg.continual import distill
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
from cfseg.losses import partial_label_loss
from cfseg.metrics import PerClassDice, dice_per_class
from cfseg.nets import PrototypeSegmenter, SoftmaxSegmenter
from cfseg.prototypes import PrototypeBank, build_encoder
from cfseg.vocab import Vocabulary

CHECKPOINT_FORMAT = "cfseg-checkpoint-v1"

DEFAULT_BACKBONE: dict[str, Any] = {
    "class_path": "monai.networks.nets.UNet",
    "init_args": {
        "spatial_dims": 3, "in_channels": 1, "out_channels": 32, "channels": [16, 32, 64, 128],
        "strides": [2, 2, 2], "num_res_units": 1,
    },
}
HEADS = ("prototype", "softmax")
STRATEGIES = ("distill", "finetune", "joint")
PSEUDO_IGNORE = -1  # label of uncertain voxels under pseudo-labelling (excluded from the partial-label loss)
ENTROPY_BINS = 100  # histogram bins of the pseudo-label thresholds (PLOP's find_median)


class CFSegModule(L.LightningModule):
    """Classifier-free (or softmax-baseline) 3D segmentation with partial labels.

    Args:
        class_names: foreground classes in global order (linked from ``data.class_names`` by the CLI).
        backbone: network spec ``{"class_path", "init_args"}``; its output channels are the features F.
        feature_channels: F; must equal the backbone's output channels.
        head: ``"prototype"`` (cosine logits against text prototypes, cfseg's method) or ``"softmax"`` (a
            1x1x1 conv with K+1 outputs, the conventional baseline on the same backbone).
        encoder: text encoder spec for the prototypes (see :func:`cfseg.prototypes.build_encoder`):
            ``"minilm"`` (offline default), ``"open_clip:ViT-B-32:/path/weights.bin"``, ``"bank:/path.json"``.
        prompt_modality: prompt template set (``"ct"``, ``"mri"``, ``"generic"``).
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
        roi_size: sliding-window size for validation/inference (defaults to the training patch).
        sw_batch_size: windows per forward pass.
        sw_overlap: window overlap.
        preprocessing: per-modality preprocessing (linked from the data module); stored in checkpoints.
        previous_checkpoint: the previous stage's checkpoint (an incremental stage). The student starts from
            its weights, its prototypes are kept bit-identical and new classes are appended; with
            ``strategy="distill"`` it is also the frozen teacher.
        strategy: ``"distill"`` (cfseg's method), ``"finetune"`` (no distillation: the lower bound) or
            ``"joint"`` (no previous checkpoint; all stages' data in one training: the upper bound).
            ``distill``'s defaults (MiB output distillation ``kd_weight=1`` + similarity maps ``sim_weight=1``,
            full learning rate ``incremental_lr_factor=1``, no PLOP pseudo-labels, no POD) are the combination
            the OpenKBP ablation chose on validation cases (benchmarks/openkbp/README.md, "Distillation
            ablation"); pseudo-labels and POD kept the old organs better but stopped the new ones being learnt.
        new_classes: the classes this stage adds (checked against the previous checkpoint; inferred from
            ``class_names`` when None).
        kd_weight: weight of the output distillation (teacher distribution over old classes, student's
            new-class mass folded into background: MiB). Units: cfseg's term is the mean over voxels of the
            per-voxel *sum* over the n_old+1 teacher classes; MiB's ``UnbiasedKnowledgeDistillationLoss`` divides
            that sum by n_old+1. So ``kd_weight = w`` equals MiB's ``loss_kd = w * (n_old + 1)``, and MiB's
            default ``loss_kd=10`` is ``kd_weight = 10 / (n_old + 1)`` (2.5 with 3 old organs, 1.67 with 5).
        kd_temperature: distillation temperature.
        sim_weight: weight of the similarity-map distillation over old classes (MSE of cosine maps).
        feat_weight: weight of the feature distillation (MSE of normalised voxel features).
        pseudo_label: PLOP pseudo-labels: on the new stage's images, voxels labelled 0 where the teacher predicts
            an old class k (argmax) with normalised entropy below k's threshold become label k, and k becomes
            annotated for that case (never where k is already annotated); see
            :func:`cfseg.continual.distill.pseudo_label`.
        pseudo_entropy_floor: lowest per-class threshold, in units of entropy / log(n_old + 1) (PLOP: 0.001).
        pseudo_entropy_cap: highest per-class threshold (1.0: no cap).
        pseudo_threshold_batches: the per-class threshold is the median normalised entropy of the label-0 voxels
            the teacher assigns to the class, estimated from the first N training batches of the stage (a running
            histogram, updated before each of those batches is labelled, then frozen; restarted by a resume).
            PLOP computes it over the whole training set before the stage.
        pseudo_ignore_uncertain: in a case that gained a pseudo-labelled class, exclude the label-0 voxels where
            the teacher is not confident from the loss (PLOP's label 255); otherwise they say "none of the
            annotated classes".
        pod_weight: weight of Local POD (PLOP) on intermediate backbone activations (0: off).
        pod_layers: regular expressions (full match) of the backbone's module names whose outputs POD compares;
            default: MONAI UNet's encoder and decoder blocks at every resolution
            (:data:`cfseg.continual.distill.DEFAULT_POD_LAYERS`). Other backbones must name their layers.
        pod_scales: windows per axis of Local POD (1, 2, 4: the whole patch, halves, quarters).
        optimizer: optional callable ``params -> Optimizer`` (LightningCLI injection).
        bank_state: a saved bank (:meth:`PrototypeBank.state`) to restore instead of encoding names; used when
            loading checkpoints, never written to hyper-parameters.
        trusted_modules: packages besides MONAI's networks and ``cfseg.nets`` that ``backbone`` may name (your own
            network code; see :mod:`cfseg.builder`). Never read back from a checkpoint: pass it again (or set
            ``CFSEG_TRUSTED_MODULES``) when loading one.
    """

    def __init__(
        self,
        class_names: list[str] | None = None,
        backbone: dict[str, Any] | None = None,
        feature_channels: int = 32,
        head: str = "prototype",
        encoder: str = "minilm",
        prompt_modality: str = "ct",
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
        roi_size: tuple[int, int, int] = (64, 64, 64),
        sw_batch_size: int = 2,
        sw_overlap: float = 0.25,
        preprocessing: dict[str, Any] | None = None,
        previous_checkpoint: str | None = None,
        strategy: str = "distill",
        new_classes: list[str] | None = None,
        kd_weight: float = 1.0,
        kd_temperature: float = 1.0,
        sim_weight: float = 1.0,
        feat_weight: float = 0.0,
        pseudo_label: bool = False,
        pseudo_entropy_floor: float = 0.001,
        pseudo_entropy_cap: float = 1.0,
        pseudo_threshold_batches: int = 10,
        pseudo_ignore_uncertain: bool = True,
        pod_weight: float = 0.0,
        pod_layers: list[str] | None = None,
        pod_scales: tuple[int, ...] = (1, 2, 4),
        optimizer: Callable[[Iterable], torch.optim.Optimizer] | None = None,
        bank_state: dict[str, Any] | None = None,
        trusted_modules: list[str] | None = None,
    ):
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {head!r}")
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        if strategy == "joint" and previous_checkpoint:
            raise ValueError("strategy 'joint' trains from scratch on all stages' data: drop previous_checkpoint")
        if not (isinstance(incremental_lr_factor, (int, float)) and math.isfinite(incremental_lr_factor)
                and incremental_lr_factor > 0):
            raise ValueError(f"incremental_lr_factor must be a finite number > 0, got {incremental_lr_factor!r}")
        if not 0 <= pseudo_entropy_floor <= pseudo_entropy_cap <= 1:
            raise ValueError(f"need 0 <= pseudo_entropy_floor <= pseudo_entropy_cap <= 1 (normalised entropy), got "
                             f"{pseudo_entropy_floor} and {pseudo_entropy_cap}")
        if pseudo_threshold_batches < 1:
            raise ValueError(f"pseudo_threshold_batches must be >= 1, got {pseudo_threshold_batches}")
        if pod_weight < 0 or not pod_scales or any(int(s) != s or s < 1 for s in pod_scales):
            raise ValueError(f"need pod_weight >= 0 and positive integer pod_scales, got {pod_weight}, {pod_scales}")
        if bank_state is None and not class_names and not previous_checkpoint:
            raise ValueError("class_names is empty: give model.class_names or link it from the data module")
        self.save_hyperparameters(ignore=["optimizer", "bank_state"])
        self.hparams["backbone"] = backbone = backbone or DEFAULT_BACKBONE
        teacher = load_checkpoint(previous_checkpoint, trusted_modules=trusted_modules) if previous_checkpoint else None
        if teacher is not None:
            self.bank = self._extend_teacher_bank(teacher, class_names, new_classes, encoder, backbone, head)
        elif bank_state is not None:
            self.bank = PrototypeBank.from_state(bank_state)
        else:
            self.bank = PrototypeBank.build(Vocabulary(class_names).classes, build_encoder(encoder),
                                            modality=prompt_modality)
        if class_names and self.bank.classes != Vocabulary(class_names).classes:
            raise ValueError(  # indices must follow names: the data indexes labels in class_names' order
                f"class order mismatch: the model's classes are {self.bank.classes} but the data indexes labels "
                f"as {Vocabulary(class_names).classes}"
            )
        self.hparams["class_names"] = self.bank.classes
        net_backbone = build_network(backbone, trusted_modules)
        if head == "prototype":
            self.net: nn.Module = PrototypeSegmenter(
                net_backbone, feature_channels, self.bank.dim, temperature, learnable_temperature, hidden_channels
            )
        else:
            self.net = SoftmaxSegmenter(net_backbone, feature_channels, len(self.bank.names), hidden_channels)
        self._optimizer_fn = optimizer
        # Local POD layers, checked now so that a bad pattern fails before any training
        self._pod_names = (resolve_layers(net_backbone, pod_layers or DEFAULT_POD_LAYERS) if pod_weight > 0 else [])
        self.register_buffer("_entropy_hist", torch.zeros(0, ENTROPY_BINS, dtype=torch.long), persistent=False)
        self._hist_batches = 0
        self.preprocessing = preprocessing or {}
        self.stage_history: list[dict[str, Any]] = []
        self._n_earlier_stages = 0  # stage entries of earlier stages; this stage's entry comes after them
        self.n_old = 0
        self._teacher: list[CFSegModule] = []  # a list keeps the teacher out of state_dict and parameters()
        if teacher is not None:
            self.net.load_state_dict(teacher.net.state_dict())
            self.preprocessing = merge_preprocessing(teacher.preprocessing, self.preprocessing, previous_checkpoint)
            self.stage_history = list(teacher.stage_history)
            self._n_earlier_stages = len(self.stage_history)
            self.n_old = len(teacher.bank.names) - 1
            if strategy == "distill":
                teacher.freeze()  # eval mode, requires_grad False
                self._teacher.append(teacher)
        self.val_dice = PerClassDice(len(self.bank.names))

    @staticmethod
    def _extend_teacher_bank(teacher: CFSegModule, class_names: list[str] | None, new_classes: list[str] | None,
                             encoder: str, backbone: dict[str, Any], head: str) -> PrototypeBank:
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
        if added and head == "softmax":
            raise ValueError("a softmax head cannot add classes; use head: prototype for class-incremental stages")
        bank = PrototypeBank.from_state(teacher.bank.state())
        if added:
            bank.extend(added, build_encoder(encoder))
        return bank

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
        """Logits [B, K'+1, *S] over background plus ``class_indices`` (all classes when None)."""
        P = self.prototypes
        if class_indices is not None:
            idx = [0, *[int(i) for i in class_indices if int(i) != 0]]
            if isinstance(self.net, SoftmaxSegmenter):
                return self.net(x)[:, idx]
            P = P[idx]
        return self.net(x, P)

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
        return sliding_window_inference(
            image, roi_size=tuple(h.roi_size), sw_batch_size=h.sw_batch_size,
            predictor=lambda x: self(x, class_indices), overlap=h.sw_overlap, mode="gaussian",
            sw_device=sw_device, device=device if device is not None else image.device,
        )

    # ---- training ------------------------------------------------------------------------------------
    def loss(self, logits: torch.Tensor, batch: dict[str, Any], target: torch.Tensor | None = None,
             annotated: torch.Tensor | None = None, ignore_index: int | None = None) -> torch.Tensor:
        """Partial-label loss of ``logits`` [B, K+1, *S]; ``target`` [B, *S] / ``annotated`` [B, K+1] replace the
        batch's (pseudo-labels)."""
        target = batch["label"][:, 0].long() if target is None else target
        annotated = batch["annotated"].bool() if annotated is None else annotated
        h = self.hparams
        return partial_label_loss(logits, target, annotated, h.ce_weight, h.dice_weight, ignore_index=ignore_index,
                                  batch_dice=h.get("batch_dice", True))

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
            ``feats`` [B, F, *S], ``logits`` [B, n_old+1, *S] and ``acts`` (the Local POD layers' outputs, or None).
        """
        teacher = self.teacher
        if teacher is None:
            raise ValueError("no teacher: teacher_outputs needs strategy='distill' and a previous_checkpoint")
        teacher.to(x.device)
        x = x.to(next(teacher.parameters()).dtype)  # a bf16-true student hands bf16 images to a float32 teacher
        with torch.no_grad():
            if self._pod_active:
                with capture_activations(teacher.net.backbone, self._pod_names) as acts:
                    feats = teacher.net.features(x)
            else:
                acts, feats = None, teacher.net.features(x)
            logits = teacher.net.logits_from_features(feats, teacher.prototypes)
        return {"feats": feats, "logits": logits, "acts": acts}

    def distillation_terms(self, x: torch.Tensor, student_logits: torch.Tensor,
                           student_feats: torch.Tensor | None = None, teacher_out: dict[str, Any] | None = None,
                           student_acts: list[torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Weighted distillation terms of the teacher on images ``x`` [B, C, *S] ({} without a teacher).

        Keys: ``kd`` (MiB), ``sim``, ``feat``, ``pod`` (those with a positive weight and their inputs given).
        ``teacher_out`` reuses :meth:`teacher_outputs`; ``student_acts`` are the student's POD layer outputs.
        """
        if self.teacher is None:
            return {}
        h = self.hparams
        t = teacher_out if teacher_out is not None else self.teacher_outputs(x)
        terms = {"kd": h.kd_weight * mib_distillation(student_logits, t["logits"], self.n_old, h.kd_temperature)}
        if h.sim_weight > 0 and isinstance(self.net, PrototypeSegmenter):
            s_sim = student_logits[:, : self.n_old + 1] * self.net.temperature
            terms["sim"] = h.sim_weight * similarity_distillation(s_sim, t["logits"] * self.teacher.net.temperature)
        if h.feat_weight > 0 and student_feats is not None:
            terms["feat"] = h.feat_weight * feature_distillation(student_feats, t["feats"], normalize=True)
        if h.pod_weight > 0 and student_acts is not None and t["acts"] is not None:
            terms["pod"] = h.pod_weight * local_pod(student_acts, t["acts"], scales=tuple(h.pod_scales))
        return terms

    def _student_features(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        """Student features [B, F, *S] and, when Local POD is on, its POD layers' outputs."""
        if not self._pod_active:
            return self.net.features(x), None
        with capture_activations(self.net.backbone, self._pod_names) as acts:
            feats = self.net.features(x)
        return feats, acts

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

    def on_train_start(self) -> None:
        self._entropy_hist = self._entropy_hist.new_zeros(0, ENTROPY_BINS)  # thresholds are estimated per stage
        self._hist_batches = 0

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        unlabeled = None
        if "labeled" in batch:  # CombinedLoader with image-only entries
            batch, unlabeled = batch["labeled"], batch.get("unlabeled")
        h = self.hparams
        x = batch["image"]
        bs = len(x)
        teacher_out = self.teacher_outputs(x) if self.teacher is not None else None
        target, annotated, ignore = batch["label"][:, 0].long(), batch["annotated"].bool(), None
        if teacher_out is not None and h.pseudo_label and self.n_old > 0:
            old_target = target
            target, annotated, ignore = self.pseudo_labels(target, annotated, teacher_out["logits"])
            self.log("train/pseudo_voxels", ((target != old_target) & (target > 0)).float().mean(), on_step=True,
                     on_epoch=True, batch_size=bs)
            if ignore is not None:
                self.log("train/pseudo_ignored", (target == ignore).float().mean(), on_step=True, on_epoch=True,
                         batch_size=bs)
        feats, acts = self._student_features(x)
        logits = self._logits(feats)
        loss = self.loss(logits, batch, target, annotated, ignore)
        if teacher_out is not None:
            terms = self.distillation_terms(x, logits, feats, teacher_out, acts)
            if unlabeled is not None:
                u_feats, u_acts = self._student_features(unlabeled["image"])
                for k, v in self.distillation_terms(unlabeled["image"], self._logits(u_feats), u_feats,
                                                    student_acts=u_acts).items():
                    terms[k] = terms.get(k, 0) + v
            kd = sum(terms.values(), logits.new_zeros(()).float())
            self.log("train/distill", kd, on_step=True, on_epoch=True, batch_size=bs)
            if "pod" in terms:
                self.log("train/pod", terms["pod"], on_step=True, on_epoch=True, batch_size=bs)
            loss = loss + kd
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=bs)
        return loss

    def _logits(self, feats: torch.Tensor) -> torch.Tensor:
        if isinstance(self.net, PrototypeSegmenter):
            return self.net.logits_from_features(feats, self.prototypes)
        return self.net.logits_from_features(feats)

    def _evaluate_volume(self, batch: dict[str, Any]) -> None:
        logits = self.sliding_window_logits(batch["image"])
        pred = logits.argmax(1)
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
        probs = self.sliding_window_logits(image, device="cpu").softmax(1)
        labels = probs.argmax(1).to(torch.uint8)
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

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["cfseg"] = {
            "format": CHECKPOINT_FORMAT,
            "class_names": self.bank.classes,
            "vocabulary": self.bank.names,
            "encoder_id": self.bank.encoder_id,
            "prompts": self.bank.prompts,
            "prototype_bank": self.bank.state(),
            "preprocessing": self.preprocessing,
            "head": self.hparams.head,
            "stage_history": list(self.stage_history),
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
        if meta.get("head", self.hparams.head) != self.hparams.head:
            raise ValueError(f"the checkpoint has a {meta.get('head')!r} head, this run a {self.hparams.head!r} head")
        self.preprocessing = merge_preprocessing(meta.get("preprocessing") or {}, self.preprocessing, "this run")
        self.stage_history = list(meta.get("stage_history", []))


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
            "bank_state", "optimizer"}
    allowed = set(inspect.signature(CFSegModule.__init__).parameters) - skip
    hp = {k: v for k, v in ckpt.get("hyper_parameters", {}).items() if k in allowed}
    hp["backbone"] = hp.get("backbone") or DEFAULT_BACKBONE
    check_spec(hp["backbone"], trusted_modules)  # refuse before anything else is built or imported
    try:
        module = CFSegModule(bank_state=meta["prototype_bank"], preprocessing=meta.get("preprocessing"),
                             trusted_modules=trusted_modules, **hp)
        module.load_state_dict(ckpt["state_dict"])
        module.on_load_checkpoint(ckpt)
    except UntrustedSpecError as e:
        raise UntrustedSpecError(f"{p}: {e}") from None
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"{p}: damaged cfseg checkpoint ({type(e).__name__}: {str(e)[:300]})") from None
    return module.eval()
