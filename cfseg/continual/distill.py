"""Distillation terms of continual stages (functional core): teacher -> student.

Shapes: ``B`` batch, ``K + 1`` classes of the student (channel 0 background), ``n_old + 1`` classes of the
teacher (the same first channels), ``*S`` one or more spatial dimensions.

Output distillation (MiB, Cermelli et al., CVPR 2020):

* :func:`mib_distillation` -- teacher distribution over background + old classes against the student's,
  with the student's new-class probability mass folded into background.
* :func:`similarity_distillation` -- MSE between student and teacher similarity (cosine-logit) maps.
* :func:`feature_distillation` -- MSE between (optionally L2-normalised) feature maps.

PLOP (Douillard et al., CVPR 2021):

* :func:`pseudo_label` -- confident teacher predictions of old classes become labels (and annotations) on
  voxels labelled 0; thresholds per class from :func:`entropy_histogram` + :func:`median_thresholds`.
* :func:`local_pod` -- multi-scale pooled distillation of intermediate feature maps, collected with
  :func:`capture_activations` on modules named by :func:`resolve_layers`.

Numerics: half-precision inputs are upcast to float32 (float64 stays float64). Teacher tensors are treated
as constants (detached) in all distillation terms.
"""

from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from cfseg.continual.pod import DEFAULT_POD_LAYERS, capture_activations, local_pod, resolve_layers
from cfseg.continual.strategy import StepContext, Strategy
from cfseg.distributed import global_sum, per_rank
from cfseg.losses import as_compute_dtype, check_class_tensor, check_mask, masked_mean

if TYPE_CHECKING:  # the module holds the strategy; annotations only
    from cfseg.module import CFSegModule

__all__ = [
    "Distill",
    "entropy_histogram",
    "feature_distillation",
    "median_thresholds",
    "mib_distillation",
    "normalized_entropy",
    "pseudo_label",
    "similarity_distillation",
]


# ----------------------------------------------------------------------------------------------------------
# distillation
# ----------------------------------------------------------------------------------------------------------


def _check_student_teacher(student: Tensor, teacher: Tensor, s_name: str, t_name: str) -> None:
    check_class_tensor(student, s_name)
    check_class_tensor(teacher, t_name)
    if student.shape[0] != teacher.shape[0] or student.shape[2:] != teacher.shape[2:]:
        raise ValueError(
            f"{s_name} has shape {tuple(student.shape)} and {t_name} has shape {tuple(teacher.shape)}; batch "
            f"and spatial sizes must match (only the channel axis may differ)."
        )
    if student.shape[1] < teacher.shape[1]:
        raise ValueError(
            f"{s_name} has shape {tuple(student.shape)} with fewer channels than {t_name} of shape "
            f"{tuple(teacher.shape)}; the student must keep all of the teacher's channels first."
        )


def mib_distillation(
    student_logits: Tensor,
    teacher_logits: Tensor,
    n_old: int,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    *,
    scale_by_t2: bool = False,
) -> Tensor:
    """MiB unbiased knowledge distillation with the background shift folded in (Cermelli et al., CVPR 2020).

    The teacher knows background + ``n_old`` classes; the student knows those (same order, first) plus new
    ones. In the teacher's eyes a new class is background, so the student's new-class mass is folded into
    its background before comparing::

        q          = softmax(teacher / T)                                   over the n_old+1 channels
        log p~_0   = logsumexp_{j in {0} U new}(student_j / T) - logsumexp_all(student / T)
        log p~_k   = student_k / T - logsumexp_all(student / T)              for old k = 1..n_old
        loss       = -mean_voxels sum_k q_k log p~_k

    This is the cross-entropy form of ``KL(q || p~)``: the two differ by the teacher entropy ``H(q)``, a
    constant for the student, so the gradients are identical; the loss equals ``H(q)`` when ``p~ = q``.
    Unlike the reference MiB code the sum over channels is not divided by ``n_old + 1`` (a constant factor).

    Args:
        student_logits: [B, K_new+1, *S] with K_new >= n_old; channels 0..n_old match the teacher's.
        teacher_logits: [B, n_old+1, *S]; treated as a constant (detached).
        n_old: number of old foreground classes (>= 0).
        temperature: T > 0, divides both student and teacher logits.
        mask: optional [B, *S] bool of voxels to include; the mean runs over those voxels only (0 if none).
        scale_by_t2: multiply the loss by ``T**2`` (Hinton et al.) to keep gradient magnitudes comparable
            across temperatures. Off by default.

    Returns:
        Scalar tensor.

    Raises:
        ValueError: on channel counts that do not match ``n_old``, mismatched batch/spatial shapes (both
            shapes named), a bad mask or a non-positive temperature.
    """
    if not isinstance(n_old, int) or isinstance(n_old, bool) or n_old < 0:
        raise ValueError(f"n_old must be a non-negative int, got {n_old!r}.")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")
    _check_student_teacher(student_logits, teacher_logits, "student_logits", "teacher_logits")
    if teacher_logits.shape[1] != n_old + 1:
        raise ValueError(
            f"teacher_logits has shape {tuple(teacher_logits.shape)} but n_old={n_old} needs {n_old + 1} "
            f"channels (background + old classes)."
        )
    expected_mask = (student_logits.shape[0], *student_logits.shape[2:])
    check_mask(mask, expected_mask, "student_logits", tuple(student_logits.shape))

    s = as_compute_dtype(student_logits, "student_logits") / temperature
    t = as_compute_dtype(teacher_logits, "teacher_logits").detach().to(s.dtype) / temperature
    q = torch.softmax(t, dim=1)
    log_norm = torch.logsumexp(s, dim=1)  # [B, *S]
    bg_and_new = torch.cat([s[:, :1], s[:, n_old + 1 :]], dim=1)
    log_bg = torch.logsumexp(bg_and_new, dim=1) - log_norm
    log_old = s[:, 1 : n_old + 1] - log_norm.unsqueeze(1)
    per_voxel = -(q[:, 0] * log_bg + (q[:, 1:] * log_old).sum(dim=1))
    loss = masked_mean(per_voxel, None if mask is None else mask.to(per_voxel.device))
    if scale_by_t2:
        loss = loss * temperature**2
    return loss


def similarity_distillation(student_sim: Tensor, teacher_sim: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean squared error between student and teacher similarity maps over the teacher's classes.

    Args:
        student_sim: [B, C_s, *S] similarity (e.g. cosine or cosine/tau) maps; only the first ``C_t``
            channels (background + old classes) are compared.
        teacher_sim: [B, C_t, *S] with C_t <= C_s; treated as a constant (detached).
        mask: optional [B, *S] bool of voxels to include.

    Returns:
        Scalar tensor: mean over included voxels and the C_t channels of the squared difference.

    Raises:
        ValueError: mismatched batch/spatial shapes or a student narrower than the teacher (both shapes
            named), or a bad mask.
    """
    _check_student_teacher(student_sim, teacher_sim, "student_sim", "teacher_sim")
    check_mask(mask, (student_sim.shape[0], *student_sim.shape[2:]), "student_sim", tuple(student_sim.shape))
    s = as_compute_dtype(student_sim, "student_sim")[:, : teacher_sim.shape[1]]
    t = as_compute_dtype(teacher_sim, "teacher_sim").detach().to(s.dtype)
    per_voxel = (s - t).pow(2).mean(dim=1)
    return masked_mean(per_voxel, None if mask is None else mask.to(per_voxel.device))


def feature_distillation(
    student_feat: Tensor,
    teacher_feat: Tensor,
    mask: Tensor | None = None,
    *,
    normalize: bool = False,
    eps: float = 1e-8,
) -> Tensor:
    """Mean squared error between student and teacher feature maps.

    Args:
        student_feat: [B, F, *S] features.
        teacher_feat: [B, F, *S] features of the same shape; treated as a constant (detached).
        mask: optional [B, *S] bool of voxels to include.
        normalize: L2-normalise each voxel's feature vector (over F) first, making the term scale-free
            (then per voxel ``||a - b||^2 / F = (2 - 2 cos(a, b)) / F``).
        eps: floor on the norm when normalising.

    Returns:
        Scalar tensor: mean over included voxels and the F channels of the squared difference.

    Raises:
        ValueError: on differing shapes (both named) or a bad mask.
    """
    check_class_tensor(student_feat, "student_feat")
    if student_feat.shape != teacher_feat.shape:
        raise ValueError(
            f"student_feat has shape {tuple(student_feat.shape)} but teacher_feat has shape "
            f"{tuple(teacher_feat.shape)}; they must be equal (project the student's features first if "
            f"widths differ)."
        )
    check_mask(
        mask, (student_feat.shape[0], *student_feat.shape[2:]), "student_feat", tuple(student_feat.shape)
    )
    s = as_compute_dtype(student_feat, "student_feat")
    t = as_compute_dtype(teacher_feat, "teacher_feat").detach().to(s.dtype)
    if normalize:
        s = F.normalize(s, dim=1, eps=eps)
        t = F.normalize(t, dim=1, eps=eps)
    per_voxel = (s - t).pow(2).mean(dim=1)
    return masked_mean(per_voxel, None if mask is None else mask.to(per_voxel.device))


# ----------------------------------------------------------------------------------------------------------
# pseudo-labels of old classes (PLOP)
# ----------------------------------------------------------------------------------------------------------


def normalized_entropy(logits: Tensor) -> Tensor:
    """Entropy of ``softmax(logits)`` over channels divided by ``log(C)``: [B, C, *S] -> [B, *S] in [0, 1].

    PLOP's reference code divides the *mean* over channels by ``log(C)`` and then by ``log`` of the class count
    again; that is a constant factor of this value, so medians agree and only fixed thresholds differ.

    Raises:
        ValueError: on non-floating logits or fewer than 2 channels.
    """
    check_class_tensor(logits, "logits")
    if logits.shape[1] < 2:
        raise ValueError(f"logits need at least 2 channels for an entropy, got shape {tuple(logits.shape)}.")
    x = as_compute_dtype(logits, "logits").detach()
    logp = F.log_softmax(x, dim=1)
    return -(logp.exp() * logp).sum(dim=1) / math.log(logits.shape[1])


def entropy_histogram(teacher_logits: Tensor, target: Tensor, bins: int = 100) -> Tensor:
    """Counts of the teacher's normalised entropy per predicted class, over voxels labelled 0.

    Args:
        teacher_logits: [B, C, *S] teacher logits (C = n_old + 1).
        target: [B, *S] integer labels; only voxels labelled 0 (background or unannotated) count.
        bins: equal bins on [0, 1].

    Returns:
        [C, bins] int64 histogram (row c: voxels whose teacher argmax is c), as PLOP's ``find_median``.
    """
    ent = normalized_entropy(teacher_logits)
    if tuple(target.shape) != tuple(ent.shape):
        raise ValueError(f"target has shape {tuple(target.shape)} but teacher_logits {tuple(teacher_logits.shape)} "
                         f"need [B, *S] = {tuple(ent.shape)}.")
    keep = target.to(ent.device) == 0
    cls = teacher_logits.detach().argmax(1)[keep]
    b = (ent[keep] * bins).long().clamp_(0, bins - 1)
    c = teacher_logits.shape[1]
    return torch.bincount(cls * bins + b, minlength=c * bins).reshape(c, bins)


def median_thresholds(hist: Tensor, floor: float = 0.001, cap: float = 1.0) -> Tensor:
    """Per-class entropy thresholds: the median of each histogram row, clamped to ``[floor, cap]``.

    The median is interpolated linearly inside its bin. A class with no voxels gets ``floor`` (PLOP: such a
    class is almost never pseudo-labelled).

    Args:
        hist: [C, bins] counts from :func:`entropy_histogram` (summed over batches).
        floor: lowest threshold, in :func:`normalized_entropy` units. PLOP's ``--threshold 0.001`` is also a
            minimum in its code, but in its units (entropy / (C log C log C_cur), C the teacher's classes, C_cur
            the stage's): 0.001 there is ``0.001 * C * log(C_cur)`` here (0.007 for 3 old + 2 new organs).
        cap: highest threshold (1.0: no cap).

    Returns:
        [C] float32 thresholds in normalised-entropy units.
    """
    if hist.ndim != 2:
        raise ValueError(f"hist must be [C, bins], got shape {tuple(hist.shape)}.")
    if not 0 <= floor <= cap:
        raise ValueError(f"need 0 <= floor <= cap, got floor={floor}, cap={cap}.")
    h = hist.double()
    bins = h.shape[1]
    total = h.sum(1, keepdim=True)
    cum = h.cumsum(1)
    half = total / 2
    idx = (cum < half).sum(1, keepdim=True).clamp(max=bins - 1)  # first bin where cum >= half
    before = cum.gather(1, idx) - h.gather(1, idx)
    count = h.gather(1, idx).clamp_min(1)
    med = ((idx + (half - before) / count) / bins).squeeze(1)
    med = torch.where(total.squeeze(1) > 0, med, torch.zeros_like(med))
    return med.clamp(floor, cap).float()


def pseudo_label(
    target: Tensor,
    annotated: Tensor,
    teacher_logits: Tensor,
    thresholds: Tensor,
    ignore_index: int | None = None,
) -> tuple[Tensor, Tensor]:
    """PLOP pseudo-labels (Douillard et al., CVPR 2021) for the partial-label loss.

    A voxel labelled 0 (background or unannotated) becomes old class ``k > 0`` where the teacher's argmax is
    ``k``, its normalised entropy (:func:`normalized_entropy`) is below ``thresholds[k]`` and ``k`` is not
    annotated in the voxel's case (where ``k`` is annotated, label 0 is true "not k" and stays). Such a class
    becomes annotated for the case, so the partial-label loss supervises it. Voxels labelled ``> 0`` (new
    classes) never change; background is never added to ``annotated`` (it is always column 0).

    With ``ignore_index`` (PLOP's handling of uncertain pixels): in a case that gained a class, the voxels
    labelled 0 where the teacher is *not* confident (entropy >= threshold of its argmax, background included)
    get ``ignore_index``, because once ``k`` is annotated a label 0 would say "not k" where the teacher cannot
    tell. Cases that gained nothing keep their labels (the partial-label loss already allows every old class).

    Args:
        target: [B, *S] integer labels in 0..K.
        annotated: [B, K+1] bool annotated classes per case.
        teacher_logits: [B, n_old+1, *S] (n_old <= K; channels are the student's first classes).
        thresholds: [n_old+1] normalised-entropy thresholds (:func:`median_thresholds`).
        ignore_index: label for uncertain voxels of cases that gained a class (None: keep them 0).

    Returns:
        ``(target, annotated)``: new tensors (int64 [B, *S], bool [B, K+1]); the inputs are not modified.
    """
    check_class_tensor(teacher_logits, "teacher_logits")
    c = teacher_logits.shape[1]
    expected = (teacher_logits.shape[0], *teacher_logits.shape[2:])
    if tuple(target.shape) != expected:
        raise ValueError(f"target has shape {tuple(target.shape)} but teacher_logits "
                         f"{tuple(teacher_logits.shape)} need [B, *S] = {expected}.")
    if torch.is_floating_point(target) or target.dtype == torch.bool:
        raise ValueError(f"target must be an integer tensor of class indices, got dtype {target.dtype}.")
    if annotated.dtype != torch.bool or annotated.ndim != 2 or annotated.shape[0] != target.shape[0] \
            or annotated.shape[1] < c:
        raise ValueError(f"annotated must be bool [B, K+1] with B={target.shape[0]} and K+1 >= {c} (the teacher's "
                         f"classes), got {annotated.dtype} {tuple(annotated.shape)}.")
    if tuple(thresholds.shape) != (c,):
        raise ValueError(f"thresholds must have shape [{c}] (one per teacher class), got {tuple(thresholds.shape)}.")
    t = target.long()
    ann = annotated.clone()
    if c < 2:  # a teacher that knows only background has nothing to give
        return t.clone(), ann
    dev = teacher_logits.device
    t, ann = t.to(dev), ann.to(dev)
    ent = normalized_entropy(teacher_logits)
    cls = teacher_logits.detach().argmax(1)
    confident = ent < thresholds.to(dev, ent.dtype)[cls]
    b = t.shape[0]
    cls_annotated = ann.gather(1, cls.reshape(b, -1)).reshape(cls.shape)
    zero = t == 0
    take = zero & confident & (cls > 0) & ~cls_annotated
    out = torch.where(take, cls, t)
    gained = torch.zeros_like(ann)
    gained.scatter_(1, torch.where(take, cls, 0).reshape(b, -1), True)
    gained[:, 0] = False
    ann |= gained
    if ignore_index is not None:
        case_gained = gained.any(1).reshape(b, *([1] * (t.ndim - 1)))
        out = torch.where(zero & ~confident & case_gained, torch.full_like(out, ignore_index), out)
    return out, ann


def pseudo_dice_labels(pseudo_target: Tensor, pseudo_annotated: Tensor, stage_annotated: Tensor,
                       ignore_index: int | None = None) -> tuple[Tensor, Tensor]:
    """Labels of a Dice term over the pseudo-labelled classes alone.

    The classes :func:`pseudo_label` added to a case (annotated now, not in the stage's own annotation) stay
    annotated; every other class is dropped from ``annotated`` and its voxels become 0, which for a Dice over the
    remaining classes is the same "not this class". Ignored voxels stay ignored.

    Args:
        pseudo_target: [B, *S] labels from :func:`pseudo_label` (``ignore_index`` where uncertain).
        pseudo_annotated: [B, K+1] bool, annotated classes after pseudo-labelling.
        stage_annotated: [B, K+1] bool, the stage's own annotation (before pseudo-labelling).
        ignore_index: the label of uncertain voxels, or None.

    Returns:
        ``(target [B, *S] int64, annotated [B, K+1] bool)`` with annotated = pseudo-labelled classes only.
    """
    if pseudo_annotated.shape != stage_annotated.shape or pseudo_annotated.dtype != torch.bool \
            or stage_annotated.dtype != torch.bool:
        raise ValueError(f"pseudo_annotated and stage_annotated must be bool [B, K+1] of one shape, got "
                         f"{pseudo_annotated.dtype} {tuple(pseudo_annotated.shape)} and {stage_annotated.dtype} "
                         f"{tuple(stage_annotated.shape)}")
    ann = pseudo_annotated & ~stage_annotated.to(pseudo_annotated.device)
    ann[:, 0] = True  # background is always column 0
    t = pseudo_target.long()
    ignored = t == ignore_index if ignore_index is not None else torch.zeros_like(t, dtype=torch.bool)
    b = t.shape[0]
    own = ann.gather(1, t.clamp_min(0).reshape(b, -1)).reshape(t.shape)
    return torch.where(own | ignored, t, torch.zeros_like(t)), ann


# ----------------------------------------------------------------------------------------------------------
# Local POD (PLOP): multi-scale pooled feature distillation


# ----------------------------------------------------------------------------------------------------------
# the strategy
# ----------------------------------------------------------------------------------------------------------

PSEUDO_IGNORE = -1  # label of uncertain voxels under pseudo-labelling (excluded from the partial-label loss)
ENTROPY_BINS = 100  # histogram bins of the pseudo-label thresholds (PLOP's find_median)
DEFAULT_PSEUDO_DICE_WEIGHT = 0.1  # pseudo_dice_weight when pseudo-labels stay out of the stage's Dice


class Distill(Strategy):
    """The previous stage's model is a frozen teacher; the student learns the new data and keeps the teacher's
    outputs on the old classes (cfseg's method). The reasons for each default: docs/decisions.md.

    Args:
        kd_weight: weight of the output distillation (:func:`mib_distillation`: teacher distribution over
            background + old classes, the student's new-class mass folded into background). Units: the mean over
            voxels of the per-voxel *sum* over the n_old + 1 teacher classes, so ``kd_weight = w`` is MiB's
            ``loss_kd = w * (n_old + 1)``.
        kd_ramp_steps: N > 0: the weight rises linearly from ``kd_ramp_start`` at the stage's step 0 to
            ``kd_weight`` at step N (logged as ``train/kd_weight``); takes precedence over ``kd_ramp_fraction``.
        kd_ramp_fraction: the ramp over a fraction of the stage's training steps (0 < f <= 1, from the trainer's
            ``estimated_stepping_batches``); 0: ``kd_weight`` from the first step. Outside a fit: no ramp.
        kd_ramp_start: the weight at the stage's first step when a ramp is on.
        kd_temperature: distillation temperature.
        sim_weight: weight of the similarity-map distillation over the old classes (heads with similarity maps).
        feat_weight: weight of the feature distillation (MSE of L2-normalised voxel features).
        pseudo_label: PLOP pseudo-labels (:func:`pseudo_label`): on the stage's images, voxels labelled 0 where the
            teacher predicts an old class with normalised entropy below that class's threshold take the class.
            ``"auto"``: on when every labelled training dataset of the stage is of a domain the teacher trained
            on (a class-incremental stage), off in a domain step.
        pseudo_entropy_floor: lowest per-class threshold (entropy / log(n_old + 1)).
        pseudo_entropy_cap: highest per-class threshold (1: no cap).
        pseudo_threshold_batches: the thresholds are the per-class median entropies of the stage's first N
            training batches (a running histogram, then frozen; under DDP the N batches are shared out over the
            processes and their histograms summed).
        pseudo_ignore_uncertain: in a case that gained a pseudo-labelled class, leave the label-0 voxels where the
            teacher is not confident out of the loss (PLOP's label 255).
        pseudo_label_dice: pseudo-labelled classes enter the stage's Dice term too (otherwise the cross-entropy
            only, plus ``pseudo_dice_weight``).
        pseudo_dice_weight: weight of a Dice of its own over the pseudo-labelled classes
            (:func:`pseudo_dice_labels`); None: 0.1, or 0 with ``pseudo_label_dice``.
        distill_labeled: whether the distillation terms run on the stage's labelled images too (True), only on its
            image-only datasets (False), or ``"auto"``: as ``pseudo_label="auto"``.
        distill_new_voxels: whether the voxel-wise terms also run on voxels labelled with a new class.
        pod_weight: weight of Local POD on intermediate backbone activations (0: off).
        pod_layers: regular expressions (full match) of the backbone modules POD compares (default
            :data:`cfseg.continual.pod.DEFAULT_POD_LAYERS`, MONAI UNet's blocks).
        pod_scales: windows per axis of Local POD.
    """

    short_name = "distill"
    softmax_only = True
    uses_unlabeled = True

    def __init__(self, kd_weight: float = 10.0, kd_ramp_steps: int = 0, kd_ramp_fraction: float = 0.5,
                 kd_ramp_start: float = 0.0, kd_temperature: float = 1.0, sim_weight: float = 1.0,
                 feat_weight: float = 0.0, pseudo_label: bool | str = "auto", pseudo_entropy_floor: float = 0.001,
                 pseudo_entropy_cap: float = 1.0, pseudo_threshold_batches: int = 10,
                 pseudo_ignore_uncertain: bool = True, pseudo_label_dice: bool = False,
                 pseudo_dice_weight: float | None = None, distill_labeled: bool | str = "auto",
                 distill_new_voxels: bool = True, pod_weight: float = 0.0, pod_layers: list[str] | None = None,
                 pod_scales: tuple[int, ...] = (1, 2, 4)):
        if not (isinstance(kd_ramp_steps, int) and kd_ramp_steps >= 0 and math.isfinite(kd_ramp_start)
                and kd_ramp_start >= 0):
            raise ValueError(f"need an integer kd_ramp_steps >= 0 and kd_ramp_start >= 0, got {kd_ramp_steps!r}, "
                             f"{kd_ramp_start!r}")
        if not (isinstance(kd_ramp_fraction, (int, float)) and 0 <= kd_ramp_fraction <= 1):
            raise ValueError(f"kd_ramp_fraction is a fraction of the stage's steps in [0, 1], got {kd_ramp_fraction!r}")
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
        if not (isinstance(distill_labeled, bool) or distill_labeled == "auto"):
            raise ValueError(f"distill_labeled must be true, false or 'auto', got {distill_labeled!r}")
        self.kd_weight, self.kd_ramp_steps, self.kd_ramp_fraction = kd_weight, kd_ramp_steps, kd_ramp_fraction
        self.kd_ramp_start, self.kd_temperature = kd_ramp_start, kd_temperature
        self.sim_weight, self.feat_weight = sim_weight, feat_weight
        self.pseudo_label, self.pseudo_entropy_floor, self.pseudo_entropy_cap = (pseudo_label, pseudo_entropy_floor,
                                                                                  pseudo_entropy_cap)
        self.pseudo_threshold_batches, self.pseudo_ignore_uncertain = pseudo_threshold_batches, pseudo_ignore_uncertain
        self.pseudo_label_dice = pseudo_label_dice
        self.pseudo_dice_weight = (pseudo_dice_weight if pseudo_dice_weight is not None
                                   else 0.0 if pseudo_label_dice else DEFAULT_PSEUDO_DICE_WEIGHT)
        self.distill_labeled, self.distill_new_voxels = distill_labeled, distill_new_voxels
        self.pod_weight, self.pod_layers, self.pod_scales = pod_weight, pod_layers, tuple(pod_scales)
        self._teacher: list[CFSegModule] = []
        self.pod_names: list[str] = []
        self.pseudo_on = pseudo_label is True  # "auto" is resolved when training starts
        self.distill_labeled_on = distill_labeled is not False
        self.entropy_hist = torch.zeros(0, ENTROPY_BINS, dtype=torch.long)
        self.hist_batches = 0

    # ---- set-up ----------------------------------------------------------------------------------------
    def setup(self, module: CFSegModule, teacher: CFSegModule) -> None:
        super().setup(module, teacher)
        teacher.freeze()  # eval mode, requires_grad False
        self._teacher = [teacher]
        if self.pod_weight > 0:  # checked now, so that a bad pattern fails before any training
            self.pod_names = resolve_layers(module.net.backbone, self.pod_layers or DEFAULT_POD_LAYERS)

    @property
    def teacher(self) -> CFSegModule | None:
        """The frozen previous-stage model (None before :meth:`setup`)."""
        return self._teacher[0] if self._teacher else None

    def on_train_start(self, module: CFSegModule) -> None:
        self.entropy_hist = self.entropy_hist.new_zeros(0, ENTROPY_BINS)  # thresholds are estimated per stage
        self.hist_batches = 0
        self.pseudo_on = self._resolve_pseudo_label(module)
        self.distill_labeled_on = self._resolve_distill_labeled(module)

    def _resolve_pseudo_label(self, module: CFSegModule) -> bool:
        if self.pseudo_label != "auto":
            return bool(self.pseudo_label)
        if self.teacher is None or module.n_old == 0:
            return False
        return self._teacher_knows_stage_domains(module, "pseudo_label")

    def _resolve_distill_labeled(self, module: CFSegModule) -> bool:
        if self.distill_labeled != "auto" or self.teacher is None:
            return bool(self.distill_labeled)
        on = self._teacher_knows_stage_domains(module, "distill_labeled")
        dm = getattr(module.trainer, "datamodule", None)
        if not on and not any(not d.config.labeled for d in getattr(dm, "datasets", [])):
            warnings.warn("distill_labeled='auto' is off in this domain step and the stage has no image-only "
                          "(unlabeled) dataset: nothing is distilled, the stage fine-tunes; list the earlier stages' "
                          "images under the stage's `unlabeled` (or set distill_labeled: true)", stacklevel=2)
        return on

    def _teacher_knows_stage_domains(self, module: CFSegModule, setting: str) -> bool:
        """Whether every labelled training dataset of this stage is of a domain the teacher trained on (logged)."""
        known = {d.get("domain") for st in self.teacher.stage_history for d in st.get("datasets", [])} - {None}
        dm = getattr(module.trainer, "datamodule", None)
        stage = {d.domain for d in getattr(dm, "datasets", []) if d.config.labeled and not d.config.val_only}
        if not known or not stage:  # a teacher without stage records, or no cfseg data module: by modality
            known = set(self.teacher.preprocessing)
            stage = set(getattr(dm, "preprocessing_by_modality", None) or module.preprocessing)
        on = stage <= known
        rank_zero_info(f"{setting}='auto': {'on' if on else 'off'} (this stage's domains {sorted(stage)}, "
                       f"the teacher's {sorted(known)})")
        return on

    # ---- per step --------------------------------------------------------------------------------------
    @property
    def pod_active(self) -> bool:
        return self.teacher is not None and self.pod_weight > 0 and bool(self.pod_names)

    def teacher_outputs(self, x: Tensor) -> dict[str, Any]:
        """The frozen teacher on images ``x`` [B, C, *S], without gradients, under the caller's autocast.

        Returns:
            ``feats`` [B, F, *S], ``logits`` [B, n_old+1, *S], ``acts`` (the Local POD layers' outputs, or None) and
            ``context`` (what the teacher's head read from its backbone).
        """
        teacher = self.teacher
        if teacher is None:
            raise ValueError("no teacher: teacher_outputs needs an incremental stage (a previous_checkpoint)")
        teacher.to(x.device)
        x = x.to(next(teacher.parameters()).dtype)  # a bf16-true student hands bf16 images to a float32 teacher
        with torch.no_grad():
            if self.pod_active:
                with capture_activations(teacher.net.backbone, self.pod_names) as acts:
                    feats, ctx = teacher.net.encode(x)
            else:
                acts, (feats, ctx) = None, teacher.net.encode(x)
            logits = teacher.net.logits(feats, None, **teacher.head_context(), **ctx)
        return {"feats": feats, "logits": logits, "acts": acts, "context": ctx}

    def pseudo_labels(self, target: Tensor, annotated: Tensor,
                      teacher_logits: Tensor) -> tuple[Tensor, Tensor, int | None]:
        """PLOP pseudo-labels for a batch: ``(target [B, *S], annotated [B, K+1], ignore_index)``; the thresholds
        come from a running histogram over the stage's first ``pseudo_threshold_batches`` batches (this one
        included, before it is labelled)."""
        c = teacher_logits.shape[1]
        if self.entropy_hist.shape[0] != c or self.entropy_hist.device != teacher_logits.device:
            self.entropy_hist = torch.zeros(c, ENTROPY_BINS, dtype=torch.long, device=teacher_logits.device)
            self.hist_batches = 0
        if self.hist_batches < per_rank(self.pseudo_threshold_batches):  # the batches of every process count
            counts = entropy_histogram(teacher_logits, target, ENTROPY_BINS).as_subclass(Tensor)  # plain data
            self.entropy_hist += global_sum(counts)
            self.hist_batches += 1
        thresholds = self.pseudo_thresholds()
        ignore = PSEUDO_IGNORE if self.pseudo_ignore_uncertain else None
        new_target, new_annotated = pseudo_label(target, annotated, teacher_logits, thresholds, ignore)
        return new_target, new_annotated, ignore

    def pseudo_thresholds(self) -> Tensor:
        """[n_old + 1] per-class entropy thresholds from the histogram so far (:func:`median_thresholds`)."""
        return median_thresholds(self.entropy_hist, self.pseudo_entropy_floor, self.pseudo_entropy_cap)

    def statistics(self) -> dict[str, Tensor]:
        """The pseudo-label entropy histogram (summed over processes at every batch), once it has counts."""
        return {"entropy_hist": self.entropy_hist} if self.hist_batches else {}

    def state_dict(self) -> dict[str, Any]:
        """The pseudo-label histogram, its batch count per process and the thresholds it gives (when used)."""
        if not self.hist_batches:
            return {}
        return {"entropy_hist": self.entropy_hist.cpu().clone(), "hist_batches": self.hist_batches,
                "pseudo_thresholds": self.pseudo_thresholds().cpu()}

    def targets(self, module: CFSegModule, step: StepContext) -> None:
        """The teacher's outputs on the batch (when a term needs them) and PLOP pseudo-labels."""
        if self.teacher is None:
            return
        x, bs = step.batch["image"], len(step.batch["image"])
        teacher_on_x = self.distill_labeled_on or (module.n_old > 0 and self.pseudo_on)
        step.extras = {"teacher": self.teacher_outputs(x) if teacher_on_x else None}
        # voxels labelled with a new class are left out of the distillation (distill_new_voxels=False)
        step.keep = None if self.distill_new_voxels else step.target <= module.n_old
        if teacher_on_x and module.n_old > 0 and self.pseudo_on:
            old_target = step.target
            if not self.pseudo_label_dice:
                step.dice_labels = (step.target, step.annotated)
                step.pseudo_dice_weight = self.pseudo_dice_weight
            step.target, step.annotated, step.ignore_index = self.pseudo_labels(
                step.target, step.annotated, step.extras["teacher"]["logits"])
            module.log("train/pseudo_voxels", ((step.target != old_target) & (step.target > 0)).float().mean(),
                       on_step=True, on_epoch=True, batch_size=bs)
            if step.ignore_index is not None:
                module.log("train/pseudo_ignored", (step.target == step.ignore_index).float().mean(), on_step=True,
                           on_epoch=True, batch_size=bs)

    def encode(self, module: CFSegModule, x: Tensor) -> tuple[Tensor, dict[str, Tensor], list[Tensor] | None]:
        """Student features; with Local POD on, its POD layers' outputs too."""
        if not self.pod_active:
            return *module.net.encode(x), None
        with capture_activations(module.net.backbone, self.pod_names) as acts:
            feats, ctx = module.net.encode(x)
        return feats, ctx, acts

    def kd_ramp_length(self, module: CFSegModule) -> int:
        """Steps of the KD ramp in this stage: ``kd_ramp_steps``, or ``kd_ramp_fraction`` of the stage's training
        steps (the trainer's estimate); 0: no ramp."""
        if self.kd_ramp_steps > 0:
            return int(self.kd_ramp_steps)
        if self.kd_ramp_fraction <= 0 or module._trainer is None:
            return 0
        total = module.trainer.estimated_stepping_batches
        if not math.isfinite(total):
            raise ValueError("kd_ramp_fraction needs a stage of known length (trainer.max_steps or max_epochs); "
                             "give kd_ramp_steps instead")
        return max(1, round(self.kd_ramp_fraction * total))

    def kd_weight_now(self, module: CFSegModule) -> float:
        """The output distillation's weight at this step: ``kd_weight``, or on its linear ramp."""
        ramp = self.kd_ramp_length(module)
        if ramp <= 0:
            return self.kd_weight
        f = min(1.0, module.global_step / ramp)
        return self.kd_ramp_start + f * (self.kd_weight - self.kd_ramp_start)

    def distillation_terms(self, module: CFSegModule, x: Tensor, student_logits: Tensor,
                           student_feats: Tensor | None = None, teacher_out: dict[str, Any] | None = None,
                           student_acts: list[Tensor] | None = None,
                           keep: Tensor | None = None) -> dict[str, Tensor]:
        """Weighted distillation terms of the teacher on images ``x`` [B, C, *S] ({} without a teacher).

        Keys: ``kd`` (MiB), ``sim``, ``feat``, ``pod`` (those with a positive weight and their inputs given).
        ``teacher_out`` reuses :meth:`teacher_outputs`; ``keep`` [B, *S] bool: the voxels the voxel-wise terms
        average over (None: all).
        """
        if self.teacher is None:
            return {}
        t = teacher_out if teacher_out is not None else self.teacher_outputs(x)
        n_old = module.n_old
        terms = {"kd": self.kd_weight_now(module) * mib_distillation(student_logits, t["logits"], n_old,
                                                                     self.kd_temperature, mask=keep)}
        if self.sim_weight > 0 and module.head.has_similarity:
            s_sim = module.head.similarity(student_logits[:, : n_old + 1])
            terms["sim"] = self.sim_weight * similarity_distillation(
                s_sim, self.teacher.head.similarity(t["logits"]), mask=keep)
        if self.feat_weight > 0 and student_feats is not None:
            terms["feat"] = self.feat_weight * feature_distillation(student_feats, t["feats"], mask=keep,
                                                                    normalize=True)
        if self.pod_weight > 0 and student_acts is not None and t["acts"] is not None:
            terms["pod"] = self.pod_weight * local_pod(student_acts, t["acts"], scales=tuple(self.pod_scales))
        return terms

    def penalty(self, module: CFSegModule, step: StepContext) -> dict[str, Tensor]:
        """``distill``: the sum of the distillation terms on the labelled batch (when on) and the image-only one."""
        if self.teacher is None:
            return {}
        bs = len(step.batch["image"])
        teacher_out = (step.extras or {}).get("teacher")
        terms = (self.distillation_terms(module, step.batch["image"], step.logits, step.feats, teacher_out,
                                         step.acts, step.keep) if self.distill_labeled_on else {})
        if step.unlabeled is not None:
            u = step.unlabeled["image"]
            u_feats, u_ctx, u_acts = self.encode(module, u)
            for k, v in self.distillation_terms(module, u, module.logits_from_features(u_feats, u_ctx), u_feats,
                                                student_acts=u_acts).items():
                terms[k] = terms.get(k, 0) + v
        kd = sum(terms.values(), step.logits.new_zeros(()).float())
        if self.kd_ramp_length(module) > 0:
            module.log("train/kd_weight", self.kd_weight_now(module), on_step=True, on_epoch=False, batch_size=bs)
        if "pod" in terms:
            module.log("train/pod", terms["pod"], on_step=True, on_epoch=True, batch_size=bs)
        return {"distill": kd}
