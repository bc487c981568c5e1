"""Distillation terms of continual stages (functional core): teacher -> student.

Shapes: ``B`` batch, ``K + 1`` classes of the student (channel 0 background), ``n_old + 1`` classes of the
teacher (the same first channels), ``*S`` one or more spatial dimensions.

Output distillation (MiB, Cermelli et al., CVPR 2020):

* :func:`mib_distillation` -- teacher distribution over background + old classes against the student's,
  with the student's new-class probability mass folded into background.
* :func:`similarity_distillation` -- MSE between student and teacher similarity (cosine-logit) maps.
* :func:`feature_distillation` -- MSE between (optionally L2-normalised) feature maps.

Numerics: half-precision inputs are upcast to float32 (float64 stays float64). Teacher tensors are treated
as constants (detached) in all distillation terms.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from cfseg.losses import _as_compute_dtype, _check_class_tensor, _check_mask, _masked_mean

__all__ = [
    "feature_distillation",
    "mib_distillation",
    "similarity_distillation",
]


# ----------------------------------------------------------------------------------------------------------
# distillation
# ----------------------------------------------------------------------------------------------------------


def _check_student_teacher(student: Tensor, teacher: Tensor, s_name: str, t_name: str) -> None:
    _check_class_tensor(student, s_name)
    _check_class_tensor(teacher, t_name)
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
    _check_mask(mask, expected_mask, "student_logits", tuple(student_logits.shape))

    s = _as_compute_dtype(student_logits, "student_logits") / temperature
    t = _as_compute_dtype(teacher_logits, "teacher_logits").detach().to(s.dtype) / temperature
    q = torch.softmax(t, dim=1)
    log_norm = torch.logsumexp(s, dim=1)  # [B, *S]
    bg_and_new = torch.cat([s[:, :1], s[:, n_old + 1 :]], dim=1)
    log_bg = torch.logsumexp(bg_and_new, dim=1) - log_norm
    log_old = s[:, 1 : n_old + 1] - log_norm.unsqueeze(1)
    per_voxel = -(q[:, 0] * log_bg + (q[:, 1:] * log_old).sum(dim=1))
    loss = _masked_mean(per_voxel, None if mask is None else mask.to(per_voxel.device))
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
    _check_mask(mask, (student_sim.shape[0], *student_sim.shape[2:]), "student_sim", tuple(student_sim.shape))
    s = _as_compute_dtype(student_sim, "student_sim")[:, : teacher_sim.shape[1]]
    t = _as_compute_dtype(teacher_sim, "teacher_sim").detach().to(s.dtype)
    per_voxel = (s - t).pow(2).mean(dim=1)
    return _masked_mean(per_voxel, None if mask is None else mask.to(per_voxel.device))


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
    _check_class_tensor(student_feat, "student_feat")
    if student_feat.shape != teacher_feat.shape:
        raise ValueError(
            f"student_feat has shape {tuple(student_feat.shape)} but teacher_feat has shape "
            f"{tuple(teacher_feat.shape)}; they must be equal (project the student's features first if "
            f"widths differ)."
        )
    _check_mask(
        mask, (student_feat.shape[0], *student_feat.shape[2:]), "student_feat", tuple(student_feat.shape)
    )
    s = _as_compute_dtype(student_feat, "student_feat")
    t = _as_compute_dtype(teacher_feat, "teacher_feat").detach().to(s.dtype)
    if normalize:
        s = F.normalize(s, dim=1, eps=eps)
        t = F.normalize(t, dim=1, eps=eps)
    per_voxel = (s - t).pow(2).mean(dim=1)
    return _masked_mean(per_voxel, None if mask is None else mask.to(per_voxel.device))
