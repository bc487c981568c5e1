"""Inference with the prototype head's normalisation folded into the backbone's output layer.

The prototype head scores backbone features ``z`` (``F`` channels) as ``s = A z / (||W z|| tau)`` with ``A = P W``
(:mod:`cfseg.cosine`). Its per-voxel ``F x F`` quadratic form ``||W z||^2 = z^T G z`` (``G = W^T W``) is what makes
it cost more than a softmax head's ``1x1x1`` convolution. Write ``G = R^T R`` (Cholesky, ``R`` upper triangular,
``F x F``). When the backbone ends in a linear convolution, ``z = conv(x; w, b)``, then ``R z = conv(x; R w, R b)``
is the same layer with its output channels mixed, and

    s = (A R^-1) (R z) / (||R z|| tau),

so a backbone whose last layer carries ``R w, R b`` (:func:`torch.func.functional_call`, the module is not
changed) feeds a head that only normalises its input (``F`` squares per voxel) and applies ``B = A R^-1``
(``[K'+1, F]``): what a softmax head costs plus one norm. Same maths as the unfolded head; only the rounding
differs (``R`` is kept well conditioned: :data:`MAX_CONDITION`).

Used by :meth:`cfseg.module.CFSegModule.sliding_window_logits` outside training and without gradients, for the
plain prototype head (no hidden layer, no LoRA experts) on a backbone whose output is the output of a
``ConvNd`` / ``ConvTransposeNd`` (groups 1): the MONAI UNet's top layer with ``num_res_units=0``, for example.
The output layer is found once per backbone by forward hooks on the first window (which runs unfolded);
anything else runs the unfolded head.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from cfseg import cosine
from cfseg.continual.experts import lora_layers
from cfseg.heads import PrototypeHead, foreground_indices
from cfseg.nets import CONV_TYPES

__all__ = ["MAX_CONDITION", "FoldedHead", "fold", "folded_predictor", "output_layer"]

MAX_CONDITION = 100.0  # largest cond(R) = cond(W) folded (rounding grows with it); beyond, the head runs unfolded
_ATTR = "_cfseg_output_layer"  # cached on the backbone: the output layer's name, or "" when there is none


def output_layer(backbone: nn.Module, x: Tensor) -> tuple[str, Tensor]:
    """Run ``backbone(x)`` once; return the name of the convolution whose output *is* the backbone's output
    (``""`` if none: another module, or an operation after the last module) and that output."""
    last: list[Any] = ["", None]  # the convolution that ran last and its output (held, so identity is meaningful)
    handles = []
    for name, m in backbone.named_modules():
        if isinstance(m, CONV_TYPES):
            handles.append(m.register_forward_hook(
                lambda _m, _i, out, name=name: last.__setitem__(slice(None), [name, out])))
    try:
        out = backbone(x)
    finally:
        for h in handles:
            h.remove()
    name = last[0] if last[1] is out else ""
    if name and backbone.get_submodule(name).groups != 1:
        name = ""
    return name, out


class FoldedHead:
    """The folded layer's parameters and the head's ``B = A R^-1 / tau`` (``[K'+1, F]``) for one call."""

    def __init__(self, params: dict[str, Tensor], b: Tensor, eps: float) -> None:
        self.params, self.b, self.eps = params, b, eps

    def logits(self, backbone: nn.Module, x: Tensor) -> Tensor:
        """Cosine logits ``[B, K'+1, *S]`` of images ``x`` ``[B, C, *S]`` (under ``torch.no_grad``)."""
        y = functional_call(backbone, self.params, (x,), strict=False)  # R z: [B, F, *S]
        return normalised_logits(y, self.b, self.eps)


def normalised_logits(y: Tensor, b: Tensor, eps: float) -> Tensor:
    """``B y / max(||y||, eps)`` per voxel: ``y`` ``[B, F, *S]``, ``b`` ``[K, F]`` -> ``[B, K, *S]``.

    Runs in voxel chunks whose scratch stays in cache; half-precision ``y`` is normalised in float32."""
    y = y.as_subclass(Tensor)
    bsz, f = y.shape[:2]
    flat = y.reshape(bsz, f, -1)
    n, k = flat.shape[2], b.shape[0]
    cd = torch.float32 if y.dtype in (torch.float16, torch.bfloat16) else y.dtype
    bc = b.to(device=y.device, dtype=cd)
    out = torch.empty(bsz, k, n, dtype=y.dtype, device=y.device)
    step = cosine.chunk_voxels(k + f, n)  # the cosine head's chunking: about 1 MiB of scratch
    sq = torch.empty(f, step, dtype=cd, device=y.device)
    num = torch.empty(k, step, dtype=cd, device=y.device)
    for i in range(bsz):
        for s in range(0, n, step):
            e = min(n, s + step)
            yc = flat[i, :, s:e].to(cd)
            torch.mm(bc, yc, out=num[:, : e - s])
            r = torch.mul(yc, yc, out=sq[:, : e - s]).sum(dim=0, keepdim=True).clamp_min_(eps * eps).rsqrt_()
            torch.mul(num[:, : e - s], r, out=out[i, :, s:e])
    return out.reshape(bsz, k, *y.shape[2:])


def fold(backbone: nn.Module, layer: str, weight: Tensor, a: Tensor, eps: float) -> FoldedHead | None:
    """Fold ``G = W^T W = R^T R`` into ``layer`` (its output channels are the head's ``F`` input channels).

    Args:
        backbone: the backbone whose ``layer`` (a convolution, groups 1) produces the head's features ``z``.
        weight: the head's projection ``W`` ``[D, F]``.
        a: ``P W / tau`` ``[K'+1, F]`` (the rows of the requested classes, background first).
        eps: the head's lower bound on ``||W z||``.

    Returns:
        the folded head, or None where ``G`` is singular or ``cond(R) > MAX_CONDITION``.
    """
    conv = backbone.get_submodule(layer)
    w64 = weight.detach().cpu().double()  # float64 on the CPU (some accelerators have no float64)
    g = w64.T @ w64  # [F, F]
    low, info = torch.linalg.cholesky_ex(g)
    if int(info) != 0:
        return None
    r = low.T  # upper triangular, G = R^T R
    sv = torch.linalg.svdvals(r)
    if float(sv[0]) > MAX_CONDITION * float(sv[-1]):
        return None
    w = conv.weight.detach().cpu().double()
    axis = 1 if conv.transposed else 0  # out-channel axis: dim 1 of a transposed convolution's weight, else dim 0
    mixed = torch.tensordot(r, w.movedim(axis, 0), dims=1).movedim(0, axis)
    params = {f"{layer}.weight": mixed.to(device=conv.weight.device, dtype=conv.weight.dtype)}
    if conv.bias is not None:
        params[f"{layer}.bias"] = (r @ conv.bias.detach().cpu().double()).to(device=conv.bias.device,
                                                                               dtype=conv.bias.dtype)
    b = torch.linalg.solve_triangular(r, a.detach().cpu().double(), upper=True, left=False)  # B R = A
    return FoldedHead(params, b.to(device=a.device, dtype=a.dtype), eps)


def folded_predictor(net: nn.Module, class_indices: Sequence[int] | None,
                     context: dict[str, Any]) -> Callable[[Tensor], Tensor] | None:
    """A sliding-window predictor ``x [B, C, *S] -> logits [B, K'+1, *S]`` with the head folded, or None.

    ``net`` is a :class:`cfseg.nets.Segmenter`; ``context`` its head context (``prototypes``). None unless the
    head is the plain prototype head (no hidden layer, no LoRA expert projections) and the backbone has not
    been found to end elsewhere than in a convolution. The first call of a backbone whose output layer is not
    known yet runs unfolded and finds it (:func:`output_layer`).
    """
    head = net.head
    if torch.is_grad_enabled() or net.training:  # inference only: the folded head has no backward
        return None
    if (type(head) is not PrototypeHead or not isinstance(head.hidden, nn.Identity)
            or net.expert_projection is not None or getattr(net, "_bottleneck", None) is not None
            or lora_layers(net)):
        return None
    backbone = net.backbone
    known = getattr(backbone, _ATTR, None)
    if known == "":
        return None
    if known is not None and not isinstance(backbone.get_submodule(known), CONV_TYPES):  # the layer was replaced
        delattr(backbone, _ATTR)
    prototypes = context["prototypes"]
    if class_indices is not None:
        prototypes = prototypes[[0, *foreground_indices(class_indices, prototypes.shape[0], "the prototype bank")]]
    tau = head.temperature.detach()
    a = prototypes.to(device=head.weight.device, dtype=head.weight.dtype) @ head.weight.detach() / tau
    state: dict[str, FoldedHead | None] = {}

    def predict(x: Tensor) -> Tensor:
        layer = getattr(backbone, _ATTR, None)
        if layer is None:  # first window: unfolded, finding the output layer on the way
            layer, z = output_layer(backbone, x)
            setattr(backbone, _ATTR, layer)
            return head.logits(head.features(z), class_indices, **context)
        if "head" not in state:
            state["head"] = fold(backbone, layer, head.weight, a, head.eps) if layer else None
        folded = state["head"]
        if folded is None:
            return net.segment(x, class_indices, **context)
        return folded.logits(backbone, x)

    return predict
