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
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cfseg.losses import _as_compute_dtype, _check_class_tensor, _check_mask, _masked_mean

__all__ = [
    "DEFAULT_POD_LAYERS",
    "capture_activations",
    "entropy_histogram",
    "feature_distillation",
    "local_pod",
    "median_thresholds",
    "mib_distillation",
    "normalized_entropy",
    "pseudo_label",
    "resolve_layers",
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
    _check_class_tensor(logits, "logits")
    if logits.shape[1] < 2:
        raise ValueError(f"logits need at least 2 channels for an entropy, got shape {tuple(logits.shape)}.")
    x = _as_compute_dtype(logits, "logits").detach()
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
    _check_class_tensor(teacher_logits, "teacher_logits")
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

#: Encoder and decoder blocks at each resolution of ``monai.networks.nets.UNet`` (``model.0``, ``model.2``,
#: ``model.1.submodule.0``, ``model.1.submodule.2``, ...); the bottleneck feeds the deepest decoder block.
DEFAULT_POD_LAYERS: tuple[str, ...] = (r"model(\.1\.submodule)*\.[02]",)


def resolve_layers(module: nn.Module, patterns: Sequence[str], setting: str = "pod_layers",
                   names: Sequence[str] | None = None, what: str = "module") -> list[str]:
    """Names of ``module``'s submodules (or of ``names``) that fully match any regular expression in ``patterns``.

    Args:
        setting: the option the patterns come from, named in errors (``pod_layers``, ``expert_layers``).
        names: the candidate names (default: every named submodule).
        what: what the candidates are, named in errors.

    Raises:
        ValueError: a pattern that is not a valid regex or matches nothing (some module names are listed).
    """
    names = [n for n, _ in module.named_modules() if n] if names is None else list(names)
    out: list[str] = []
    for p in patterns:
        try:
            rx = re.compile(p)
        except re.error as e:
            raise ValueError(f"{setting} pattern {p!r} is not a regular expression: {e}") from None
        hits = [n for n in names if rx.fullmatch(n)]
        if not hits:
            raise ValueError(
                f"{setting} pattern {p!r} matches no {what} of {type(module).__name__}; "
                f"names look like {names[:8]} (set model.{setting} to regexes of module names)"
            )
        out += [n for n in hits if n not in out]
    return out


@contextmanager
def capture_activations(module: nn.Module, names: Sequence[str]) -> Iterator[list[Tensor]]:
    """Collect the outputs of ``module``'s submodules ``names`` during the forward passes in the block.

    The yielded list is filled, in the order of ``names``, when the block exits; the hooks are removed.
    """
    mods = dict(module.named_modules())
    store: dict[str, Tensor] = {}

    def hook(name: str):
        def fn(_m: nn.Module, _i: Any, out: Any) -> None:
            store[name] = out[0] if isinstance(out, (tuple, list)) else out
        return fn

    handles = [mods[n].register_forward_hook(hook(n)) for n in names]
    acts: list[Tensor] = []
    try:
        yield acts
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in names if n not in store]
    if missing:
        raise ValueError(f"modules {missing} did not run in the forward pass; choose other pod_layers")
    acts.extend(store[n] for n in names)


def _pod_embedding(x: Tensor, scale: int, normalize: bool, eps: float) -> Tensor | None:
    """[B, C, *S] -> [B, scale^d, L] window embeddings (None when a side is shorter than ``scale``)."""
    b, c, *sizes = x.shape
    d = len(sizes)
    ks = [n // scale for n in sizes]
    if min(ks) == 0:
        return None
    if any(scale * k != n for k, n in zip(ks, sizes, strict=True)):
        x = x[(..., *[slice(0, scale * k) for k in ks])]
    view = [b, c]
    for k in ks:
        view += [scale, k]
    x = x.reshape(view)  # [B, C, s, k1, .., s, kd]: a view of a contiguous map, windows interleaved
    win_dims = [2 + 2 * i for i in range(d)]
    k_dims = [3 + 2 * i for i in range(d)]
    profiles = []
    for i in range(d):  # pool along every other spatial axis: one 1D profile per axis and window
        others = [k_dims[j] for j in range(d) if j != i]
        p = x.mean(dim=others, keepdim=True) if others else x
        profiles.append(p.permute(0, *win_dims, 1, *k_dims).reshape(b, scale**d, -1))  # small: [B, W, C*k_i]
    emb = torch.cat(profiles, dim=-1)
    return F.normalize(emb, dim=-1, eps=eps) if normalize else emb


def _pod_embeddings_nested(x: Tensor, scales: Sequence[int], normalize: bool, eps: float) -> list[Tensor]:
    """Fast path of :func:`_pod_embedding` for every scale at once when all scales divide ``m = max(scales)``
    and ``m`` divides every side: one reduction of the full map per axis (block means on the m-grid), the
    coarser windows averaged from those small profiles."""
    b, c, *sizes = x.shape
    d = len(sizes)
    m = max(scales)
    view = [b, c]
    for n in sizes:
        view += [m, n // m]
    xv = x.reshape(view)
    k_dims = [3 + 2 * i for i in range(d)]
    grids = [xv.mean(dim=[k_dims[j] for j in range(d) if j != i], keepdim=True) if d > 1 else xv
             for i in range(d)]  # grids[i]: [B, C, m, 1|k_i, ...], k kept on axis i only
    out = []
    for s in scales:
        profiles = []
        for i, g in enumerate(grids):
            shape = [b, c]
            for j, n in enumerate(sizes):
                shape += [s, m // s, n // m if j == i else 1]
            g = g.reshape(shape)  # [B, C, (s, m/s, k|1) per axis]
            others = [2 + 3 * j + 1 for j in range(d) if j != i]
            g = g.mean(dim=others, keepdim=True) if others else g
            win = [2 + 3 * j for j in range(d)]
            rest = [dim for j in range(d) for dim in (3 + 3 * j, 4 + 3 * j)]
            profiles.append(g.permute(0, *win, 1, *rest).reshape(b, s**d, -1))  # [B, W, C * n_i / s]
        emb = torch.cat(profiles, dim=-1)
        out.append(F.normalize(emb, dim=-1, eps=eps) if normalize else emb)
    return out


def _pod_all_scales(x: Tensor, scales: Sequence[int], normalize: bool, eps: float) -> list[Tensor]:
    """Window embeddings [B, s^d, L] of every scale that fits ``x`` [B, C, *S]."""
    m = max(scales)
    if all(m % s == 0 for s in scales) and all(n % m == 0 for n in x.shape[2:]):
        return _pod_embeddings_nested(x, scales, normalize, eps)
    return [e for s in scales if (e := _pod_embedding(x, s, normalize, eps)) is not None]


def local_pod(
    student_feats: Sequence[Tensor],
    teacher_feats: Sequence[Tensor],
    scales: Sequence[int] = (1, 2, 4),
    *,
    square: bool = True,
    normalize: bool = True,
    eps: float = 1e-8,
) -> Tensor:
    """Local POD distillation (PLOP, Douillard et al., CVPR 2021), in 3D (any number of spatial axes).

    For every feature map and scale ``s`` the volume is split into ``s^d`` windows (sides ``n // s``, the
    remainder dropped as in the reference code; a scale larger than a side is skipped for that map). In each
    window the (squared, as PLOP's ``pow``) activations are averaged over all spatial axes but one, giving one
    1D profile per axis; the profiles are concatenated and L2-normalised per window. Per sample the distance is
    ``sqrt(mean_scales mean_windows ||e_student - e_teacher||^2)`` (in [0, 2] when normalised); the loss is its
    mean over the batch and the maps.

    Args:
        student_feats: feature maps [B, C_l, *S_l], one per layer.
        teacher_feats: the teacher's maps of the same shapes; treated as constants (detached).
        scales: window counts per axis (1: whole volume, 2: halves, 4: quarters).
        square: square the activations first (PLOP's default ``pod_prepro="pow"``).
        normalize: L2-normalise each window's embedding (scale-free; the reference leaves it unnormalised).

    Returns:
        Scalar tensor (float32 for half inputs), 0 for identical maps, with finite gradients there.

    Raises:
        ValueError: different numbers of maps, a shape mismatch (both named), no maps or a bad scale.
    """
    if len(student_feats) != len(teacher_feats) or not student_feats:
        raise ValueError(f"need the same non-zero number of student and teacher maps, got {len(student_feats)} "
                         f"and {len(teacher_feats)}.")
    if not scales or any(int(s) != s or s < 1 for s in scales):
        raise ValueError(f"scales must be positive integers, got {tuple(scales)}; e.g. (1, 2, 4).")
    total = None
    for i, (s, t) in enumerate(zip(student_feats, teacher_feats, strict=True)):
        _check_class_tensor(s, f"student_feats[{i}]")
        if s.shape != t.shape:
            raise ValueError(f"student_feats[{i}] has shape {tuple(s.shape)} but teacher_feats[{i}] has shape "
                             f"{tuple(t.shape)}; the maps must match layer by layer.")
        sx = _as_compute_dtype(s, f"student_feats[{i}]")
        tx = _as_compute_dtype(t, f"teacher_feats[{i}]").detach().to(sx.dtype)
        if square:
            sx, tx = sx * sx, tx * tx
        sc = [int(v) for v in scales]
        diffs = [(es - et).flatten(1) / math.sqrt(es.shape[1])
                 for es, et in zip(_pod_all_scales(sx, sc, normalize, eps), _pod_all_scales(tx, sc, normalize, eps),
                                   strict=True)]
        d = torch.cat(diffs, dim=1) / math.sqrt(len(diffs))  # scale 1 always fits
        layer = torch.linalg.vector_norm(d, dim=1).mean()
        total = layer if total is None else total + layer
    return total / len(student_feats)
