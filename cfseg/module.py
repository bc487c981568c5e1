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
from cfseg.continual.distill import feature_distillation, mib_distillation, similarity_distillation
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
        new_classes: the classes this stage adds (checked against the previous checkpoint; inferred from
            ``class_names`` when None).
        kd_weight: weight of the output distillation (teacher distribution over old classes, student's
            new-class mass folded into background: MiB).
        kd_temperature: distillation temperature.
        sim_weight: weight of the similarity-map distillation over old classes (MSE of cosine maps).
        feat_weight: weight of the feature distillation (MSE of normalised voxel features).
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
        sim_weight: float = 0.0,
        feat_weight: float = 0.0,
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
    def loss(self, logits: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        target = batch["label"][:, 0].long()
        h = self.hparams
        return partial_label_loss(logits, target, batch["annotated"].bool(), h.ce_weight, h.dice_weight,
                                  batch_dice=h.get("batch_dice", True))

    @property
    def teacher(self) -> CFSegModule | None:
        """The frozen previous-stage model (``strategy="distill"``), or None."""
        return self._teacher[0] if self._teacher else None

    def distillation_loss(self, x: torch.Tensor, student_logits: torch.Tensor,
                          student_feats: torch.Tensor | None = None) -> torch.Tensor:
        """Distillation terms of the teacher on images ``x`` [B, C, *S] (0 without a teacher)."""
        teacher = self.teacher
        h = self.hparams
        if teacher is None:
            return student_logits.new_zeros(())
        teacher.to(x.device)
        with torch.no_grad():
            t_feats = teacher.net.features(x)
            t_logits = teacher.net.logits_from_features(t_feats, teacher.prototypes)
        loss = h.kd_weight * mib_distillation(student_logits, t_logits, self.n_old, h.kd_temperature)
        if h.sim_weight > 0 and isinstance(self.net, PrototypeSegmenter):
            s_sim = student_logits[:, : self.n_old + 1] * self.net.temperature
            loss = loss + h.sim_weight * similarity_distillation(s_sim, t_logits * teacher.net.temperature)
        if h.feat_weight > 0 and student_feats is not None:
            loss = loss + h.feat_weight * feature_distillation(student_feats, t_feats, normalize=True)
        return loss

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        unlabeled = None
        if "labeled" in batch:  # CombinedLoader with image-only entries
            batch, unlabeled = batch["labeled"], batch.get("unlabeled")
        feats = self.net.features(batch["image"])
        logits = self._logits(feats)
        loss = self.loss(logits, batch)
        bs = len(batch["image"])
        if self.teacher is not None:
            kd = self.distillation_loss(batch["image"], logits, feats)
            if unlabeled is not None:
                u_feats = self.net.features(unlabeled["image"])
                kd = kd + self.distillation_loss(unlabeled["image"], self._logits(u_feats), u_feats)
            self.log("train/distill", kd, on_step=True, on_epoch=True, batch_size=bs)
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
        opt = torch.optim.AdamW(params, lr=h.lr, weight_decay=h.weight_decay)
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
