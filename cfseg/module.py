"""The LightningModule: a segmenter, a prototype bank, the partial-label loss, whole-volume validation.

The class list comes from the data module (linked by the CLI). The backbone is injected as a
``{"class_path": ..., "init_args": {...}}`` spec (any MONAI 3D network mapping an image to F full-resolution
feature channels), kept as plain data so that a checkpoint rebuilds the network without pickled code.

Checkpoints are self-describing: besides the weights (the bank's prototypes, names, prompts and encoder id
travel in the state dict), ``checkpoint["cfseg"]`` holds the vocabulary, the preprocessing per modality and
the stage history; ``hyper_parameters`` holds the network spec.
"""

from __future__ import annotations

import importlib
import json
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import lightning as L
import torch
from monai.inferers import sliding_window_inference
from torch import nn

from cfseg.losses import feature_distillation, mib_distillation, partial_label_loss, similarity_distillation
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


def instantiate(spec: dict[str, Any]) -> Any:
    """Build an object from ``{"class_path": "pkg.mod.Class", "init_args": {...}}``."""
    if not isinstance(spec, dict) or "class_path" not in spec:
        raise ValueError(f"expected {{'class_path': ..., 'init_args': {{...}}}}, got {spec!r}")
    module_name, _, cls_name = spec["class_path"].rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), cls_name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"cannot import {spec['class_path']!r}: {e}") from e
    return cls(**spec.get("init_args", {}))


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
        teacher = load_checkpoint(previous_checkpoint) if previous_checkpoint else None
        if teacher is not None:
            self.bank = self._extend_teacher_bank(teacher, class_names, new_classes, encoder, backbone, head)
        elif bank_state is not None:
            self.bank = PrototypeBank.from_state(bank_state)
            if class_names and Vocabulary(class_names).names != self.bank.names:
                raise ValueError(
                    f"class_names {class_names} do not match the checkpoint's vocabulary {self.bank.classes}"
                )
        else:
            self.bank = PrototypeBank.build(Vocabulary(class_names).classes, build_encoder(encoder),
                                            modality=prompt_modality)
        self.hparams["class_names"] = self.bank.classes
        net_backbone = instantiate(backbone)
        if head == "prototype":
            self.net: nn.Module = PrototypeSegmenter(
                net_backbone, feature_channels, self.bank.dim, temperature, learnable_temperature, hidden_channels
            )
        else:
            self.net = SoftmaxSegmenter(net_backbone, feature_channels, len(self.bank.names), hidden_channels)
        self._optimizer_fn = optimizer
        self.preprocessing = preprocessing or {}
        self.stage_history: list[dict[str, Any]] = []
        self.n_old = 0
        self._teacher: list[CFSegModule] = []  # a list keeps the teacher out of state_dict and parameters()
        if teacher is not None:
            self.net.load_state_dict(teacher.net.state_dict())
            self.preprocessing = preprocessing or teacher.preprocessing
            self.stage_history = list(teacher.stage_history)
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
        if new_classes is not None:
            again = [c for c in new_classes if c in teacher.bank._index or Vocabulary([c]).classes[0] in old]
            if again:
                raise ValueError(
                    f"new_classes repeats classes the previous checkpoint already knows: {again} "
                    f"(known: {old}); a stage adds only new class names"
                )
            added = Vocabulary(new_classes).classes
        else:
            added = [c for c in Vocabulary(class_names or []).classes if c not in old]
        if class_names:
            unknown = [c for c in Vocabulary(class_names).classes if c not in old and c not in added]
            if unknown:
                raise ValueError(f"the data annotates {unknown}, which are neither old classes nor new_classes")
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
                              device: torch.device | str | None = None) -> torch.Tensor:
        """Whole-volume logits by Gaussian-weighted sliding windows. image [B, C, *S] -> [B, K'+1, *S]."""
        h = self.hparams
        return sliding_window_inference(
            image, roi_size=tuple(h.roi_size), sw_batch_size=h.sw_batch_size,
            predictor=lambda x: self(x, class_indices), overlap=h.sw_overlap, mode="gaussian",
            sw_device=device, device=device,
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

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        logits = self.sliding_window_logits(batch["image"])
        return {"case_id": batch.get("case_id"), "pred": logits.argmax(1).to(torch.uint8).cpu()}

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
            self.preprocessing = {**dm.preprocessing_by_modality, **self.preprocessing}
        datasets = [{"name": d.name, "path": str(d.info.root), "domain": d.domain,
                     "classes": [c for c in d.info.classes if d.config.classes is None or c in d.config.classes]}
                    for d in getattr(dm, "datasets", [])]
        stage = {
            "stage": len(self.stage_history),
            "strategy": self.hparams.strategy,
            "new_classes": self.bank.classes[self.n_old:],
            "classes": self.bank.classes,
            "datasets": datasets,
            "previous_checkpoint": self.hparams.previous_checkpoint,
        }
        if not self.stage_history or self.stage_history[-1].get("_open") is not True:
            self.stage_history.append({**stage, "_open": True})
        else:
            self.stage_history[-1] = {**stage, "_open": True}

    def on_fit_end(self) -> None:
        if self.stage_history:
            self.stage_history[-1].pop("_open", None)

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
            "stage_history": [{k: v for k, v in st.items() if k != "_open"} for st in self.stage_history],
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        meta = checkpoint.get("cfseg", {})
        self.preprocessing = meta.get("preprocessing", self.preprocessing)
        self.stage_history = list(meta.get("stage_history", []))


def load_checkpoint(path: str, map_location: str | torch.device = "cpu") -> CFSegModule:
    """Load a cfseg checkpoint without executing pickled code (``torch.load(weights_only=True)``).

    Raises:
        ValueError: if the file is not a cfseg checkpoint.
    """
    from pathlib import Path

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: checkpoint not found")
    try:
        ckpt = torch.load(p, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises several types for non-checkpoints
        raise ValueError(f"{p}: not a loadable cfseg checkpoint ({type(e).__name__}: {str(e)[:200]})") from e
    if not isinstance(ckpt, dict) or ckpt.get("cfseg", {}).get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{p}: not a cfseg checkpoint (no 'cfseg' metadata of format {CHECKPOINT_FORMAT})")
    meta = ckpt["cfseg"]
    import inspect

    skip = {"self", "class_names", "preprocessing", "previous_checkpoint", "new_classes"}
    allowed = set(inspect.signature(CFSegModule.__init__).parameters) - skip
    hp = {k: v for k, v in ckpt.get("hyper_parameters", {}).items() if k in allowed}
    module = CFSegModule(bank_state=meta["prototype_bank"], preprocessing=meta.get("preprocessing"), **hp)
    module.load_state_dict(ckpt["state_dict"])
    module.on_load_checkpoint(ckpt)
    return module.eval()
