"""Losses for partially labelled segmentation (functional core).

Every function here is pure and differentiable: tensors in, a scalar tensor out, no state. Shapes use
``B`` for the batch, ``K + 1`` for the classes known to the model (channel 0 is background, channel ``k``
is the ``k``-th class in the vocabulary's global order) and ``*S`` for one or more spatial dimensions.

Partial labels (one dataset annotates the liver, another the kidneys):

* :func:`partial_label_ce` -- a voxel labelled with an annotated class ``k > 0`` gets ``-log p_k``; a voxel
  labelled 0 gets ``-log(p_0 + sum_{j unannotated} p_j)``, i.e. "background or something nobody labelled
  in this case" (the marginal loss of Shi et al., MedIA 2021, and of the DESIGN notes).
* :func:`partial_dice_loss` -- soft Dice over the annotated foreground classes of each sample only.
* :func:`partial_label_loss` -- weighted sum of the two, sharing one validation and one softmax; the
  training loss, computed by a fused function with a hand-written backward (:class:`_PartialLabelLoss`: one
  full-size buffer, no one-hot target) that matches the composed :func:`_partial_label_loss_reference`.
* :func:`masked_sigmoid_loss` -- for heads with one sigmoid per class (DoDNet, the CLIP-driven Universal Model):
  BCE + soft Dice over the classes annotated in each sample only.

Optional regularisers of a softmax head trained on partial labels (``model.exclusion_weight``,
``model.entropy_weight``; with the marginal loss above and hierarchical sampling, ``data.sampling:
hierarchical``, they make up the Versatile-style recipe of ``configs/openkbp/heads/versatile.yaml``):

* :func:`exclusion_loss` -- the exclusion (Dice) loss of Shi et al. (MedIA 2021): organs do not overlap, so the
  predicted probability of class ``k`` should vanish wherever the labels say "not k".
* :func:`ambiguous_entropy` -- entropy minimisation on the voxels whose label is "background or a class not
  annotated here" (the self-disambiguation of Versatile: Chen et al., CVPR 2024, "Versatile medical image
  segmentation learned from multi-source datasets via model self-disambiguation").

The distillation terms of continual stages live in :mod:`cfseg.continual.distill`.

Numerics: logits in half precision are upcast to float32 (float64 stays float64); everything is computed in
log space with ``log_softmax`` / ``logsumexp``, so logits of magnitude 1e4 give finite losses and gradients.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "LossWeights",
    "ambiguous_entropy",
    "exclusion_loss",
    "masked_sigmoid_loss",
    "merged_background_log_probs",
    "partial_dice_loss",
    "partial_label_ce",
    "partial_label_loss",
]


@dataclass
class LossWeights:
    """Weights of the supervised loss (the module's ``model.loss_weights``).

    Args:
        ce_weight: weight of the partial-label cross-entropy.
        dice_weight: weight of the partial soft Dice.
        batch_dice: Dice pooled over the batch per class (:func:`partial_dice_loss`).
        exclusion_weight: weight of the exclusion loss (:func:`exclusion_loss`; softmax-output heads; 0: off).
        entropy_weight: weight of the entropy minimisation on ambiguous voxels (:func:`ambiguous_entropy`;
            softmax-output heads; 0: off).
    """

    ce_weight: float = 1.0
    dice_weight: float = 1.0
    batch_dice: bool = True
    exclusion_weight: float = 0.0
    entropy_weight: float = 0.0

    def __post_init__(self) -> None:
        for name in ("ce_weight", "dice_weight", "exclusion_weight", "entropy_weight"):
            w = getattr(self, name)
            if not (isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) and w >= 0):
                raise ValueError(f"{name} must be a finite number >= 0 (0: off), got {w!r}")

    @classmethod
    def build(cls, value: LossWeights | dict[str, Any] | None) -> LossWeights:
        """From an instance, a mapping of its fields or None (the defaults)."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"model.loss_weights must be a mapping of {list(asdict(cls()))}, got {value!r}")
        unknown = sorted(set(value) - set(asdict(cls())))
        if unknown:
            raise ValueError(f"unknown model.loss_weights settings {unknown}; known: {list(asdict(cls()))}")
        return cls(**value)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ----------------------------------------------------------------------------------------------------------
# validation helpers
# ----------------------------------------------------------------------------------------------------------


def as_compute_dtype(x: Tensor, name: str) -> Tensor:
    """Return ``x`` as float32/float64 (half precision is upcast); reject non-floating tensors."""
    if not torch.is_floating_point(x):
        raise ValueError(
            f"{name} must be a floating-point tensor, got dtype {x.dtype}; pass raw logits/features."
        )
    if x.dtype in (torch.float32, torch.float64):
        return x
    return x.float()


def check_class_tensor(x: Tensor, name: str) -> None:
    if x.ndim < 3:
        raise ValueError(
            f"{name} must have shape [B, C, *S] with at least one spatial dimension, got shape "
            f"{tuple(x.shape)}; add a singleton spatial axis (x[..., None]) for per-sample vectors."
        )


def _check_annotated(annotated: Tensor, logits: Tensor) -> Tensor:
    """Validate ``annotated`` [B, K+1] bool against ``logits`` and return a copy with column 0 set True."""
    if not isinstance(annotated, Tensor) or annotated.dtype != torch.bool:
        dtype = annotated.dtype if isinstance(annotated, Tensor) else type(annotated).__name__
        raise ValueError(
            f"annotated must be a bool tensor [B, K+1], got {dtype}; build it with e.g. "
            f"torch.zeros(B, K + 1, dtype=torch.bool) and set the annotated classes True."
        )
    expected = (logits.shape[0], logits.shape[1])
    if tuple(annotated.shape) != expected:
        raise ValueError(
            f"annotated has shape {tuple(annotated.shape)} but logits of shape {tuple(logits.shape)} need "
            f"[B, K+1] = {expected}; one row per sample, one column per class including background."
        )
    ann = annotated.to(logits.device).clone()
    ann[:, 0] = True
    return ann


def check_mask(
    mask: Tensor | None, shape: tuple[int, ...], ref_name: str, ref_shape: tuple[int, ...]
) -> None:
    if mask is None:
        return
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        dtype = mask.dtype if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(f"mask must be a bool tensor [B, *S], got {dtype}.")
    if tuple(mask.shape) != shape:
        raise ValueError(
            f"mask has shape {tuple(mask.shape)} but {ref_name} of shape {ref_shape} need mask shape {shape} "
            f"([B, *S], no channel axis)."
        )


def _check_logits_and_target(logits: Tensor, target: Tensor) -> Tensor:
    """Check the shapes and dtypes of ``logits`` [B, K+1, *S] and ``target`` [B, *S]; logits in a compute dtype."""
    check_class_tensor(logits, "logits")
    x = as_compute_dtype(logits, "logits")
    expected = (logits.shape[0], *logits.shape[2:])
    if tuple(target.shape) != expected:
        raise ValueError(
            f"target has shape {tuple(target.shape)} but logits have shape {tuple(logits.shape)}; target "
            f"must be [B, *S] = {expected} (no channel axis; squeeze a [B, 1, *S] map with target[:, 0])."
        )
    if torch.is_floating_point(target) or target.dtype == torch.bool or torch.is_complex(target):
        raise ValueError(f"target must be an integer tensor of class indices, got dtype {target.dtype}.")
    return x


def _prepare_partial(
    logits: Tensor, target: Tensor, annotated: Tensor, ignore_index: int | None
) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
    """Validate the partial-label inputs.

    Returns:
        ``(x, t_safe, valid, ann)``: logits in a compute dtype [B, K+1, *S]; target [B, *S] int64 with ignored
        voxels replaced by 0; ``valid`` [B, *S] bool (None when nothing can be ignored); ``ann`` [B, K+1] bool
        with column 0 True.
    """
    x = _check_logits_and_target(logits, target)
    ann = _check_annotated(annotated, logits)
    t = target.to(device=logits.device, dtype=torch.long)
    n_classes = logits.shape[1]

    valid: Tensor | None = None
    if ignore_index is not None:
        valid = t != ignore_index
        t = torch.where(valid, t, torch.zeros_like(t))

    out_of_range = (t < 0) | (t >= n_classes)
    if bool(out_of_range.any()):
        bad = int(t[out_of_range][0])
        hint = "" if ignore_index is not None else " (pass ignore_index for a label that marks 'ignore')"
        raise ValueError(
            f"target contains class index {bad}, but logits have {n_classes} channels "
            f"(valid 0..{n_classes - 1}){hint}."
        )

    # Per-voxel check that the label is annotated in its sample: one gather on [B, N].
    b = t.shape[0]
    ok = ann.gather(1, t.reshape(b, -1)).reshape(t.shape)
    if valid is not None:
        ok = ok | ~valid
    if not bool(ok.all()):
        first = (~ok).nonzero()[0]
        sample = int(first[0])
        cls = int(t[tuple(first.tolist())])
        present = sorted(int(c) for c in torch.unique(t[sample][~ok[sample]]))
        annotated_list = [int(c) for c in ann[sample].nonzero().flatten()]
        raise ValueError(
            f"target of sample {sample} contains class index {cls}, which is not annotated for that sample "
            f"(unannotated labels present: {present}; annotated classes: {annotated_list}). Mark the class "
            f"annotated for that sample or remap the label."
        )
    return x, t, valid, ann


def masked_mean(values: Tensor, valid: Tensor | None) -> Tensor:
    """Mean of ``values`` [B, *S] over ``valid`` voxels; 0 (graph kept) when no voxel is valid."""
    if valid is None:
        return values.mean()
    zeros = torch.zeros((), dtype=values.dtype, device=values.device)
    total = torch.where(valid, values, zeros).sum()
    return total / valid.sum().clamp_min(1).to(values.dtype)


def _merge_log_probs(logp: Tensor, ann: Tensor) -> Tensor:
    """Core of :func:`merged_background_log_probs` on already-normalised log-probabilities."""
    view = (*ann.shape, *([1] * (logp.ndim - 2)))
    unann = (~ann).reshape(view)
    merge = unann.clone()
    merge[:, 0] = True
    neg_inf = torch.tensor(float("-inf"), dtype=logp.dtype, device=logp.device)
    log_bg = torch.logsumexp(torch.where(merge, logp, neg_inf), dim=1, keepdim=True)
    fg = torch.where(unann[:, 1:], neg_inf, logp[:, 1:])
    return torch.cat([log_bg, fg], dim=1)


def _ce_from_log_probs(logp: Tensor, t: Tensor, valid: Tensor | None, ann: Tensor) -> Tensor:
    # a voxel labelled k > 0 (annotated, checked) reads log p_k; a voxel labelled 0 reads the merged background
    # log(p_0 + sum of unannotated p_j): only that one channel is built, not the whole merged tensor
    view = (*ann.shape, *([1] * (logp.ndim - 2)))
    merge = (~ann).reshape(view).clone()
    merge[:, 0] = True
    if bool(merge[:, 1:].any()):
        neg_inf = torch.tensor(float("-inf"), dtype=logp.dtype, device=logp.device)
        log_bg = torch.logsumexp(torch.where(merge, logp, neg_inf), dim=1)
    else:  # every class annotated: plain cross-entropy
        log_bg = logp[:, 0]
    picked = logp.gather(1, t.unsqueeze(1)).squeeze(1)
    nll = -torch.where(t == 0, log_bg, picked)
    return masked_mean(nll, valid)


def _dice_from_probs(probs: Tensor, t: Tensor, valid: Tensor | None, ann: Tensor, smooth: float,
                     batch_dice: bool = False) -> Tensor:
    n_classes = probs.shape[1]
    onehot = F.one_hot(t, n_classes).movedim(-1, 1).to(probs.dtype)
    if valid is not None:
        v = valid.unsqueeze(1).to(probs.dtype)
        probs = probs * v
        onehot = onehot * v
    dims = tuple(range(2, probs.ndim))
    return _dice_from_sums((probs * onehot).sum(dims), probs.sum(dims), onehot.sum(dims), ann, smooth, batch_dice)


def _dice_from_sums(inter: Tensor, psum: Tensor, gsum: Tensor, ann: Tensor, smooth: float,
                    batch_dice: bool = False) -> Tensor:
    """Partial soft Dice loss from per-(sample, class) sums [B, K+1]: ``sum p g``, ``sum p`` and ``sum g``."""
    denom = psum + gsum
    pairs = ann.clone()
    pairs[:, 0] = False
    if batch_dice:  # one Dice per class over the samples that annotate it (nnU-Net's batch Dice)
        w = pairs.to(inter.dtype)
        inter, denom = (inter * w).sum(0, keepdim=True), (denom * w).sum(0, keepdim=True)
        pairs = pairs.any(0, keepdim=True)
    dice = (2.0 * inter + smooth) / (denom + smooth)  # [B, K+1] (or [1, K+1] for batch Dice)
    zeros = torch.zeros((), dtype=dice.dtype, device=dice.device)
    total = torch.where(pairs, 1.0 - dice, zeros).sum()
    return total / pairs.sum().clamp_min(1).to(dice.dtype)


def _check_smooth(smooth: float) -> None:
    if not smooth > 0:
        raise ValueError(f"smooth must be > 0 (it makes empty classes well defined), got {smooth}.")


# ----------------------------------------------------------------------------------------------------------
# fused partial-label loss (forward and hand-written backward)
# ----------------------------------------------------------------------------------------------------------


def _prepare_counts(
    logits: Tensor, target: Tensor, annotated: Tensor, ignore_index: int | None
) -> tuple[Tensor, Tensor, Tensor | None, Tensor, Tensor, Tensor]:
    """:func:`_prepare_partial` for the fused loss: the same checks and errors, fewer passes over the voxels.

    Range and annotation are checked on ``aminmax`` and on the label counts per (sample, class), which the Dice
    term needs anyway; only when a check fails does :func:`_prepare_partial` run, to raise its error.

    Returns:
        ``(x, t, valid, ann, idx, counts)`` as :func:`_prepare_partial`, plus ``idx`` [B, N] int64, the flat bin
        ``b * (K+1) + t`` of each voxel (``B * (K+1)`` for ignored voxels), and ``counts`` [B, K+1] int64, the
        number of non-ignored voxels of each label per sample.
    """
    x = _check_logits_and_target(logits, target)
    ann = _check_annotated(annotated, logits)
    # plain tensors: a subclass (MONAI's MetaTensor labels) would run its metadata handling on every op
    t = target.as_subclass(Tensor).to(device=logits.device, dtype=torch.long)
    b, c = logits.shape[:2]
    valid: Tensor | None = None
    if ignore_index is not None:
        valid = t != ignore_index
        t = t.masked_fill(~valid, 0)
    if t.numel() == 0:
        return _prepare_partial(logits, target, annotated, ignore_index) + (  # nothing to count
            t.reshape(b, 0), torch.zeros(b, c, dtype=torch.long, device=t.device))
    lo, hi = t.aminmax()
    if bool(lo < 0) or bool(hi >= c):
        _prepare_partial(logits, target, annotated, ignore_index)  # raises, naming the label
    idx = t.reshape(b, -1) + torch.arange(0, b * c, c, device=t.device).unsqueeze(1)
    if valid is not None:
        idx = idx.masked_fill_(~valid.reshape(b, -1), b * c)
    counts = torch.bincount(idx.reshape(-1), minlength=b * c + 1)[: b * c].reshape(b, c)
    if bool(((counts > 0) & ~ann).any()):
        _prepare_partial(logits, target, annotated, ignore_index)  # raises, naming the sample and class
    return x, t, valid, ann, idx, counts


class _PartialLabelLoss(torch.autograd.Function):
    """``ce_weight * partial CE + dice_weight * partial Dice`` of logits ``x`` [B, K+1, N]; hand-written backward.

    The composed version (:func:`_partial_label_loss_reference`) runs about a dozen full-size passes and
    allocates as many ``[B, K+1, N]`` temporaries (one-hot target, products, ``where`` results and their
    gradients) -- on CPU each costs page faults besides bandwidth. Here one ``[B, K+1, N]`` buffer holds
    ``log p``, then ``p`` (saved for backward), then ``dL/dx`` (backward works in it in place):

    * CE reads ``log p_t`` by ``gather``; the merged background ``log(p_0 + sum of unannotated p_j)`` is a
      ``logsumexp`` over those few channels, per sample that has unannotated classes;
    * Dice needs ``sum p`` (one reduction), ``sum p g`` (``p_t`` gathered, then binned per (sample, class)
      in float64) and ``sum g`` (label counts): no one-hot tensor;
    * backward: ``dL/dx = p (dL/dp - <p, dL/dp>)`` with ``dL/dp = beta + alpha [t = k]`` for Dice (``alpha``,
      ``beta`` [B, K+1] from autograd on the sums) and ``p - q`` for CE (``q`` one-hot at the label, or the
      softmax over the merged channels at a background voxel of a sample with unannotated classes): one
      dense in-place pass plus a ``scatter_add`` at the labels.

    Ignored voxels get ``p = 0`` after the CE term has been read, which removes them from the Dice sums and
    from every gradient term.
    """

    @staticmethod
    def forward(ctx, x: Tensor, t: Tensor, valid: Tensor | None, ann: Tensor, idx: Tensor, counts: Tensor,  # noqa: D102
                ce_weight: float, dice_weight: float, smooth: float, batch_dice: bool) -> Tensor:
        x = x.as_subclass(Tensor)  # a MetaTensor would run its metadata handling on every op
        b, c = x.shape[:2]
        n = math.prod(x.shape[2:])
        t = t.reshape(b, 1, n)
        v = None if valid is None else valid.reshape(b, n)
        buf = torch.log_softmax(x.reshape(b, c, n), dim=1)  # log p; becomes p, then dL/dx
        nv = torch.tensor(b * n, dtype=x.dtype, device=x.device) if v is None else v.sum().clamp_min(1).to(x.dtype)
        loss = x.new_zeros(())
        merged = [(i, [0, *(~ann[i]).nonzero().flatten().tolist()]) for i in range(b) if not bool(ann[i].all())]
        qs = []  # per merged sample: softmax over its merged channels at its label-0 (non-ignored) voxels
        if ce_weight:
            nll = buf.gather(1, t).reshape(b, n).neg_()  # -log p_t
            for i, m in merged:
                lm = buf[i, m]  # [|M|, N] copy
                log_bg = torch.logsumexp(lm, dim=0)
                zero = t[i, 0] == 0
                nll[i] = torch.where(zero, -log_bg, nll[i])
                if v is not None:
                    zero &= v[i]
                qs.append(lm.sub_(log_bg).exp_().mul_(zero))
            loss = loss + ce_weight * (nll.sum() if v is None else torch.where(v, nll, 0.0).sum()) / nv
        p = buf.exp_()
        if v is not None:
            p.masked_fill_(~v.unsqueeze(1), 0.0)
        pt = p.gather(1, t).reshape(b, n)  # p at the label (0 where ignored)
        inter = psum = gsum = None
        if dice_weight:
            psum = p.sum(2)
            # float64 bins: a serial float32 sum over 10^5 voxels would lose digits; 1-D scatter_add_ (not a weighted
            # bincount) has a deterministic CUDA implementation
            inter = torch.zeros(b * c + 1, dtype=torch.float64, device=pt.device)
            inter.scatter_add_(0, idx.reshape(-1), pt.reshape(-1).double())
            inter, gsum = inter[: b * c].reshape(b, c).to(x.dtype), counts.to(x.dtype)
            loss = loss + dice_weight * _dice_from_sums(inter, psum, gsum, ann, smooth, batch_dice)
        # p is kept as an attribute, not a saved tensor, because backward turns it into dL/dx in place; a second
        # backward through the same graph (retain_graph, gradcheck) recomputes it from the saved logits
        ctx.save_for_backward(x, t, v, pt, ann, nv, inter, psum, gsum)
        ctx.p = p
        ctx.merged, ctx.qs = merged, qs
        ctx.weights, ctx.x_shape = (ce_weight, dice_weight, smooth, batch_dice), x.shape
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):  # noqa: D102
        x, t, v, pt, ann, nv, inter, psum, gsum = ctx.saved_tensors
        p, ctx.p = ctx.p, None
        if p is None:  # backward again: rebuild p
            p = torch.log_softmax(x.reshape(t.shape[0], x.shape[1], -1), dim=1).exp_()  # as forward, bit for bit
            if v is not None:
                p.masked_fill_(~v.unsqueeze(1), 0.0)
        ce_weight, dice_weight, smooth, batch_dice = ctx.weights
        b, c, n = p.shape
        ce_c = grad * ce_weight / nv  # dCE/dx = ce_c (p - q)
        gx = p  # dL/dx is built in p's buffer
        if dice_weight:
            with torch.enable_grad():
                sums = inter.detach().requires_grad_(), psum.detach().requires_grad_()
                dice = _dice_from_sums(*sums, gsum, ann, smooth, batch_dice)
                alpha, beta = torch.autograd.grad(dice, sums, grad * dice_weight, allow_unused=True)
            alpha = torch.zeros_like(inter) if alpha is None else alpha  # dL/d(sum p g)
            beta = torch.zeros_like(psum) if beta is None else beta  # dL/d(sum p)
            a_t = alpha.gather(1, t.reshape(b, n)).mul_(pt)  # alpha_t p_t
            # dL/dx_k = p_k (beta_k - beta.p - alpha_t p_t) + [k = t] alpha_t p_t, plus CE's ce_c (p_k - q_k)
            u = torch.bmm(beta.unsqueeze(1), p).reshape(b, n).add_(a_t).neg_().add_(ce_c)
            if p.device.type == "cpu":  # row by row: no [B, K+1, N] temporary for the broadcast sum
                row = torch.empty_like(u[0])
                for i in range(b):
                    for k in range(c):
                        gx[i, k].mul_(torch.add(u[i], beta[i, k], out=row))
            else:
                gx.mul_(u.unsqueeze(1) + beta.unsqueeze(2))
            at_label = a_t.sub_(ce_c if v is None else ce_c * v)  # alpha_t p_t - ce_c (q = one-hot at t)
        else:
            gx.mul_(ce_c)
            at_label = (-ce_c).expand(b, n).clone() if v is None else v.to(p.dtype).mul_(-ce_c)
        for (i, m), q in zip(ctx.merged if ce_weight else [], ctx.qs, strict=True):
            # a label-0 voxel of a sample with unannotated classes: q is the softmax over the merged channels
            # (and alpha_0 = 0: background never enters the Dice)
            at_label[i].masked_fill_(t[i, 0] == 0, 0.0)
            for j, k in enumerate(m):
                gx[i, k].addcmul_(q[j], ce_c, value=-1.0)
        gx.scatter_add_(1, t, at_label.unsqueeze(1))
        return gx.reshape(ctx.x_shape), None, None, None, None, None, None, None, None, None


# ----------------------------------------------------------------------------------------------------------
# partial-label losses
# ----------------------------------------------------------------------------------------------------------


def merged_background_log_probs(logits: Tensor, annotated: Tensor) -> Tensor:
    """Log-probabilities with every unannotated class merged into background.

    Args:
        logits: [B, K+1, *S] raw scores, channel 0 background.
        annotated: [B, K+1] bool, which classes are annotated in each sample (column 0 is treated as True).

    Returns:
        [B, K+1, *S] log-probabilities of the softmax over all channels, except that channel 0 holds
        ``log(p_0 + sum_{j unannotated} p_j)`` and unannotated foreground channels hold ``-inf``. The result
        exponentiates to a distribution over {merged background} U {annotated classes} per voxel.

    Raises:
        ValueError: on non-floating logits, a non-bool ``annotated`` or one whose shape is not [B, K+1].
    """
    check_class_tensor(logits, "logits")
    x = as_compute_dtype(logits, "logits")
    ann = _check_annotated(annotated, logits)
    return _merge_log_probs(F.log_softmax(x, dim=1), ann)


def partial_label_ce(
    logits: Tensor, target: Tensor, annotated: Tensor, ignore_index: int | None = None
) -> Tensor:
    """Cross-entropy for partially annotated labels (marginal background).

    A voxel labelled ``k > 0`` contributes ``-log p_k`` (softmax over all K+1 channels). A voxel labelled 0
    contributes ``-log(p_0 + sum_{j not annotated in its sample} p_j)``: in a case where only the liver was
    drawn, an unlabelled voxel may be background or any organ nobody drew there. Computed as a
    ``logsumexp`` of log-probabilities over the merged set, so it is stable for extreme logits. When every
    class is annotated this equals ``F.cross_entropy(logits, target)``.

    Args:
        logits: [B, K+1, *S] raw scores, channel 0 background, channel k the global class k.
        target: [B, *S] integer labels in 0..K (global class indices), or ``ignore_index``.
        annotated: [B, K+1] bool, which classes were annotated for each sample; column 0 is always treated
            as True.
        ignore_index: label value whose voxels are excluded (may lie outside 0..K, e.g. 255 or -1).

    Returns:
        Scalar tensor: mean over non-ignored voxels of the whole batch (0, still attached to the graph, when
        every voxel is ignored). float32 for half-precision logits, else the logits' dtype.

    Raises:
        ValueError: shape or dtype mismatch (both shapes named), a label outside 0..K, or a voxel labelled
            with a class that is not annotated for its sample (the class index and sample are named).
    """
    x, t, valid, ann = _prepare_partial(logits, target, annotated, ignore_index)
    return _ce_from_log_probs(F.log_softmax(x, dim=1), t, valid, ann)


def partial_dice_loss(
    logits: Tensor,
    target: Tensor,
    annotated: Tensor,
    smooth: float = 1e-5,
    ignore_index: int | None = None,
    batch_dice: bool = False,
) -> Tensor:
    """Soft Dice loss over the annotated foreground classes of each sample.

    For every pair (sample b, class k >= 1) with ``annotated[b, k]`` the soft Dice over the non-ignored voxels
    of that sample is ``(2 sum p_k g_k + smooth) / (sum p_k + sum g_k + smooth)`` with ``p`` the softmax over
    all K+1 channels and ``g`` the one-hot target. The loss is ``1 - mean`` of these Dice values; pairs that
    are not annotated (and background) never enter, so an unannotated class only acts through the softmax
    normalisation of the annotated ones. With no annotated foreground pair in the batch the loss is 0.

    Empty classes: a class annotated in a sample but absent from its target gets Dice
    ``smooth / (sum p_k + smooth)``, which is 1 only when the predicted soft mass is far below ``smooth``;
    with the default 1e-5 it therefore acts as a push of ``p_k`` towards zero in that sample ("annotated and
    absent" is real information). Absent in both target and prediction gives Dice 1 (loss 0), matching the
    metric convention in DESIGN.md. This is the same formula as MONAI's
    ``DiceLoss(include_background=False, smooth_nr=smooth, smooth_dr=smooth)`` per sample and class (checked
    in the tests); MONAI has no per-(sample, class) mask, hence plain torch here.

    Args:
        logits: [B, K+1, *S] raw scores, channel 0 background.
        target: [B, *S] integer labels in 0..K, or ``ignore_index``.
        annotated: [B, K+1] bool, annotated classes per sample (column 0 ignored here).
        smooth: > 0, added to numerator and denominator.
        ignore_index: label value whose voxels are excluded from both prediction and target sums.
        batch_dice: pool each class's sums over the samples of the batch that annotate it (one Dice per
            class, as nnU-Net's batch Dice). A small organ absent from most patches then no longer gets a
            loss of 1 from every patch that happens to miss it, which otherwise suppresses small organs.

    Returns:
        Scalar tensor in [0, 1].

    Raises:
        ValueError: as :func:`partial_label_ce`, or ``smooth <= 0``.
    """
    _check_smooth(smooth)
    x, t, valid, ann = _prepare_partial(logits, target, annotated, ignore_index)
    return _dice_from_probs(torch.softmax(x, dim=1), t, valid, ann, smooth, batch_dice)


def partial_label_loss(
    logits: Tensor,
    target: Tensor,
    annotated: Tensor,
    ce_weight: float = 1.0,
    dice_weight: float = 1.0,
    ignore_index: int | None = None,
    smooth: float = 1e-5,
    batch_dice: bool = False,
) -> Tensor:
    """``ce_weight * partial_label_ce + dice_weight * partial_dice_loss`` with one validation and softmax.

    Args:
        logits: [B, K+1, *S] raw scores, channel 0 background.
        target: [B, *S] integer labels in 0..K, or ``ignore_index``.
        annotated: [B, K+1] bool, annotated classes per sample.
        ce_weight: weight of the partial cross-entropy (>= 0).
        dice_weight: weight of the partial soft Dice (>= 0).
        ignore_index: label value whose voxels are excluded from both terms.
        smooth: Dice smoothing term, see :func:`partial_dice_loss`.
        batch_dice: see :func:`partial_dice_loss`.

    Returns:
        Scalar tensor.

    Raises:
        ValueError: as the two terms, or a negative weight.
    """
    if ce_weight < 0 or dice_weight < 0:
        raise ValueError(f"loss weights must be >= 0, got ce_weight={ce_weight}, dice_weight={dice_weight}.")
    _check_smooth(smooth)
    x, t, valid, ann, idx, counts = _prepare_counts(logits, target, annotated, ignore_index)
    with torch.autocast(device_type=x.device.type, enabled=False):
        return _PartialLabelLoss.apply(x.contiguous(), t, valid, ann, idx, counts, float(ce_weight),
                                       float(dice_weight), float(smooth), bool(batch_dice))


def _partial_label_loss_reference(
    logits: Tensor,
    target: Tensor,
    annotated: Tensor,
    ce_weight: float = 1.0,
    dice_weight: float = 1.0,
    ignore_index: int | None = None,
    smooth: float = 1e-5,
    batch_dice: bool = False,
) -> Tensor:
    """:func:`partial_label_loss` composed of autograd ops (reference for tests and benchmarks)."""
    _check_smooth(smooth)
    x, t, valid, ann = _prepare_partial(logits, target, annotated, ignore_index)
    logp = F.log_softmax(x, dim=1)
    loss = logp.new_zeros(())
    if ce_weight:
        loss = loss + ce_weight * _ce_from_log_probs(logp, t, valid, ann)
    if dice_weight:
        loss = loss + dice_weight * _dice_from_probs(logp.exp(), t, valid, ann, smooth, batch_dice)
    return loss


# ----------------------------------------------------------------------------------------------------------
# one sigmoid per class (DoDNet, CLIP-driven Universal Model)
# ----------------------------------------------------------------------------------------------------------


def masked_sigmoid_loss(
    logits: Tensor,
    target: Tensor,
    annotated: Tensor,
    bce_weight: float = 1.0,
    dice_weight: float = 1.0,
    ignore_index: int | None = None,
    smooth: float = 1.0,
    batch_dice: bool = False,
) -> Tensor:
    """BCE + soft Dice of independent per-class sigmoids, on the classes annotated in each sample only.

    Channel ``k >= 1`` is the logit of "voxel belongs to class k"; channel 0 (background) is not used. For every
    pair (sample b, class k >= 1) with ``annotated[b, k]`` the BCE of ``sigmoid(logits[b, k])`` against
    ``target[b] == k`` is averaged over the sample's non-ignored voxels, and the BCE term is the mean over those
    pairs; the Dice term is :func:`partial_dice_loss`'s with per-class sigmoids in place of the softmax. A class
    not annotated in a sample contributes nothing for that sample (its logits there do not change the loss): the
    masked loss of DoDNet and the Universal Model. With no annotated foreground pair the loss is 0.

    Args:
        logits: [B, K+1, *S] raw scores, channel k the global class k (channel 0 ignored).
        target: [B, *S] integer labels in 0..K, or ``ignore_index``.
        annotated: [B, K+1] bool, annotated classes per sample.
        bce_weight: weight of the BCE (>= 0).
        dice_weight: weight of the Dice (>= 0).
        ignore_index: label value whose voxels are excluded from both terms.
        smooth: Dice smoothing term, see :func:`partial_dice_loss`. 1 as DoDNet's and the Universal Model's
            ``BinaryDiceLoss(smooth=1)``: for a class annotated in a case but absent from its patch the Dice is
            ``smooth / (sum p + smooth)``, whose gradient ``smooth / (sum p + smooth)^2`` is 1 / smooth at
            ``sum p = 0``; with 1e-5 it drove every sigmoid of a shared dynamic head to ``sum p ~ 1e-5`` (deeply
            negative logits on OpenKBP), where no gradient reaches the classes that are present.
        batch_dice: see :func:`partial_dice_loss`.

    Returns:
        Scalar tensor.

    Raises:
        ValueError: as :func:`partial_label_ce`, a negative weight or ``smooth <= 0``.
    """
    if bce_weight < 0 or dice_weight < 0:
        raise ValueError(f"loss weights must be >= 0, got bce_weight={bce_weight}, dice_weight={dice_weight}.")
    _check_smooth(smooth)
    x, t, valid, ann = _prepare_partial(logits, target, annotated, ignore_index)
    onehot = F.one_hot(t, x.shape[1]).movedim(-1, 1)[:, 1:].to(x.dtype)  # [B, K, *S]
    fg = x[:, 1:]
    dims = tuple(range(2, x.ndim))
    bce = F.binary_cross_entropy_with_logits(fg, onehot, reduction="none")
    if valid is None:
        per_pair = bce.mean(dims)  # [B, K]
    else:
        v = valid.unsqueeze(1).to(x.dtype)
        per_pair = (bce * v).sum(dims) / v.sum(dims).clamp_min(1)
    pairs = ann[:, 1:]
    zeros = torch.zeros((), dtype=x.dtype, device=x.device)
    loss = bce_weight * torch.where(pairs, per_pair, zeros).sum() / pairs.sum().clamp_min(1).to(x.dtype)
    if dice_weight:
        probs = torch.cat([torch.zeros_like(x[:, :1]), torch.sigmoid(fg)], dim=1)  # channel 0 never enters
        loss = loss + dice_weight * _dice_from_probs(probs, t, valid, ann, smooth, batch_dice)
    return loss


# ----------------------------------------------------------------------------------------------------------
# regularisers for partial labels (exclusion, entropy on ambiguous voxels)
# ----------------------------------------------------------------------------------------------------------


def exclusion_masks(target: Tensor, annotated: Tensor, valid: Tensor | None = None) -> Tensor:
    """Where each class is known to be absent: ``e`` [B, K+1, *S] bool (channel 0 all False).

    ``e[b, k]`` is True at the voxels of sample ``b`` whose label rules class ``k >= 1`` out:

    * voxels labelled with an annotated foreground class ``c != k`` (organs do not overlap), for every ``k``
      (annotated or not: a voxel drawn as the liver is not the spleen, whether or not the spleen was drawn);
    * voxels labelled 0 when ``k`` is annotated in the sample (then 0 means "not k"); when ``k`` is not
      annotated a 0 may be ``k``, so those voxels never exclude it.

    Args:
        target: [B, *S] int64 labels in 0..K (already checked against ``annotated``).
        annotated: [B, K+1] bool.
        valid: [B, *S] bool, or None (every voxel counts).
    """
    n = annotated.shape[1]
    view = (*annotated.shape, *([1] * (target.ndim - 1)))
    k = torch.arange(n, device=target.device).reshape(1, n, *([1] * (target.ndim - 1)))
    t = target.unsqueeze(1)
    ann_k = annotated.reshape(view)
    e = (t != k) & ((t > 0) | ann_k)  # another label; a 0 only excludes an annotated class
    e[:, 0] = False
    if valid is not None:
        e &= valid.unsqueeze(1)
    return e


def exclusion_loss(
    logits: Tensor,
    target: Tensor,
    annotated: Tensor,
    ignore_index: int | None = None,
    smooth: float = 1e-5,
) -> Tensor:
    """Exclusion Dice loss (Shi et al., MedIA 2021): overlap of each class's probability with where it cannot be.

    Modelled on the exclusion loss of Shi, Xiao, Chen & Zhou, "Marginal loss and exclusion loss for partially
    supervised multi-organ segmentation" (MedIA 70, 2021): organs are mutually exclusive, so for every pair
    (sample b, class k >= 1) the exclusion label ``e_k`` (:func:`exclusion_masks`: the voxels labelled with another
    annotated organ, and, when ``k`` itself is annotated, the voxels labelled background) should not overlap the
    predicted ``p_k`` (softmax over all K+1 channels). The loss is the mean over the pairs with a non-empty
    ``e_k`` of the soft Dice overlap ``2 sum(p_k e_k) / (sum p_k + sum e_k + smooth)``.

    It is 0 exactly when no probability sits where the labels exclude it (a perfect prediction; an unannotated
    class may take any share of the voxels labelled 0, which may be it), and positive otherwise. ``smooth`` is
    added to the denominator only, so a perfect prediction gives exactly 0.

    Args:
        logits: [B, K+1, *S] raw scores, channel 0 background.
        target: [B, *S] integer labels in 0..K, or ``ignore_index``.
        annotated: [B, K+1] bool, annotated classes per sample.
        ignore_index: label value whose voxels are excluded.
        smooth: > 0, added to the denominator.

    Returns:
        Scalar tensor in [0, 1) (0, attached to the graph, when no pair has an exclusion label).

    Raises:
        ValueError: as :func:`partial_label_ce`, or ``smooth <= 0``.
    """
    _check_smooth(smooth)
    x, t, valid, ann = _prepare_partial(logits, target, annotated, ignore_index)
    p = torch.softmax(x, dim=1)
    e = exclusion_masks(t, ann, valid)
    dims = tuple(range(2, x.ndim))
    ef = e.to(p.dtype)
    inter = (p * ef).sum(dims)  # [B, K+1]
    psum = (p if valid is None else p * valid.unsqueeze(1).to(p.dtype)).sum(dims)
    esum = ef.sum(dims)
    pairs = esum > 0
    overlap = 2.0 * inter / (psum + esum + smooth)
    zeros = torch.zeros((), dtype=p.dtype, device=p.device)
    return torch.where(pairs, overlap, zeros).sum() / pairs.sum().clamp_min(1).to(p.dtype)


def ambiguous_voxels(target: Tensor, annotated: Tensor, valid: Tensor | None = None) -> Tensor:
    """[B, *S] bool: voxels labelled 0 in samples that leave some foreground class unannotated.

    There the label means "background or one of the classes nobody drew here": the voxels Versatile's
    self-disambiguation acts on. In a sample that annotates every class a 0 is plain background.
    """
    partial = ~annotated[:, 1:].all(1)  # [B]
    amb = (target == 0) & partial.reshape(-1, *([1] * (target.ndim - 1)))
    return amb if valid is None else amb & valid


def ambiguous_entropy(
    logits: Tensor,
    target: Tensor,
    annotated: Tensor,
    ignore_index: int | None = None,
) -> Tensor:
    """Mean softmax entropy (nats) over the ambiguous voxels (:func:`ambiguous_voxels`).

    Modelled on the self-disambiguation of Versatile (Chen et al., CVPR 2024, "Versatile medical image
    segmentation learned from multi-source datasets via model self-disambiguation"): the marginal loss only asks
    that background and the unannotated classes together take a label-0 voxel; minimising the entropy of the
    prediction there ``-sum_k p_k log p_k`` (all K+1 channels) makes the model commit to one of them (background
    or an organ it learnt from another dataset) instead of spreading the mass. Voxels labelled with an annotated
    class, and label-0 voxels of samples that annotate every class, do not enter.

    Args:
        logits: [B, K+1, *S] raw scores, channel 0 background.
        target: [B, *S] integer labels in 0..K, or ``ignore_index``.
        annotated: [B, K+1] bool, annotated classes per sample.
        ignore_index: label value whose voxels are excluded.

    Returns:
        Scalar tensor >= 0: 0 when every ambiguous voxel is predicted one-hot (or there is none; graph kept).

    Raises:
        ValueError: as :func:`partial_label_ce`.
    """
    x, t, valid, ann = _prepare_partial(logits, target, annotated, ignore_index)
    logp = F.log_softmax(x, dim=1)
    # p log p with 0 log 0 = 0 (exp(-inf) * -inf would be nan)
    plogp = torch.where(logp > -math.inf, logp.exp() * logp, torch.zeros((), dtype=logp.dtype, device=logp.device))
    entropy = -plogp.sum(1)  # [B, *S]
    return masked_mean(entropy, ambiguous_voxels(t, ann, valid))
