"""Segmentation heads: one interface, injected by ``class_path``.

A head turns the backbone's full-resolution voxel features ``z`` ``[B, F, *S]`` into logits ``[B, K'+1, *S]`` over
background and the requested classes, in that order, in two steps (:class:`cfseg.nets.Segmenter` runs both)::

    head.logits(head.features(z), class_indices, **context)

``features`` is the head's own per-voxel layer (identity, an optional hidden layer, or the dynamic heads'
GroupNorm + ReLU + ``1x1x1`` pre-classification block).

``class_indices`` are global class indices (``1..K`` in the vocabulary's order; 0 is dropped, background always
comes first; ``None``: every class). ``context`` carries what a head may need besides the features; a head reads
the keys it knows and ignores the others:

* ``prototypes`` ``[K+1, D]``: the bank's orthonormal prototypes (:class:`PrototypeHead`);
* ``text_embeddings`` ``[K+1, E]``: the bank's raw class text embeddings, before Gram-Schmidt (:class:`UniversalHead`);
* ``pooled`` ``[B, C_b]``: the globally pooled bottleneck feature of the same images, captured by the segmenter
  from the backbone layer the head names in :attr:`Head.bottleneck_layer` (:class:`DoDNetHead`, :class:`UniversalHead`);
* ``weight`` ``[D, F']``: a projection replacing the prototype head's own (LoRA experts' per-expert ``W``).

Every head declares its output kind (:attr:`Head.output`), and losses, inference and evaluation ask the head
(:meth:`Head.loss`, :meth:`Head.probabilities`, :meth:`Head.labels`) instead of testing its type:

* ``"softmax"`` (:class:`SoftmaxOutputHead`): one distribution over background and the classes; loss
  :func:`cfseg.losses.partial_label_loss`; label = argmax.
* ``"sigmoid"`` (:class:`SigmoidOutputHead`): an independent probability per class; channel 0 holds the constant
  logit of the decision threshold; loss :func:`cfseg.losses.masked_sigmoid_loss` (BCE + Dice on the annotated
  classes only); label = background where no class exceeds the threshold, else the most probable class.

YAML picks a head by ``class_path`` (``model.head: {class_path: cfseg.heads.DoDNetHead, init_args: {...}}``), or by
the shorthands of :data:`HEAD_SHORTHANDS` (``prototype``, ``softmax``). :class:`cfseg.module.CFSegModule` fills the
constructor arguments it knows (``feature_channels``, ``num_classes``, ``embed_dim``, ``text_dim``,
``bottleneck_channels``, and ``temperature`` / ``learnable_temperature`` / ``hidden_channels`` from its own
arguments) where the spec does not set them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cfseg.cosine import cosine_logits
from cfseg.losses import masked_sigmoid_loss, partial_label_loss

__all__ = [
    "DEFAULT_BOTTLENECK_LAYER",
    "DEFAULT_POOLED_LAYER",
    "DynamicHead",
    "HEAD_SHORTHANDS",
    "DoDNetHead",
    "Head",
    "ProjectionHead",
    "PrototypeHead",
    "SigmoidOutputHead",
    "SoftmaxHead",
    "SoftmaxOutputHead",
    "UniversalHead",
    "bottleneck_channels",
    "deepest_layer",
    "dynamic_convs",
    "head_spec",
]

#: The YAML strings of the heads that existed before heads were injected (old configs and checkpoints).
HEAD_SHORTHANDS: dict[str, str] = {"prototype": "cfseg.heads.PrototypeHead", "softmax": "cfseg.heads.SoftmaxHead"}
#: MONAI UNet's bottleneck convolution (the deepest match; the router's layer,
#: :data:`cfseg.module.DEFAULT_ROUTER_LAYER`): taken *before* the block's instance normalisation, whose output has
#: zero mean per channel and so pools to almost nothing.
DEFAULT_BOTTLENECK_LAYER = r"model(\.1\.submodule)*\.conv"
#: MONAI UNet's whole bottleneck block (convolution, normalisation, activation; the deepest match): the layer the
#: dynamic heads pool, as DoDNet and the Universal Model pool their encoder's last feature after GroupNorm + ReLU.
#: Its output is bounded by the normalisation; the pre-norm convolution's is not, and a controller fed with it
#: generates ever larger weights (on OpenKBP the pooled pre-norm feature kept growing from the first steps).
DEFAULT_POOLED_LAYER = r"model(\.1\.submodule)+"

# CLIP-style bounds on the learnable logit scale 1/tau: tau in [0.01, 1].
_MIN_LOGIT_SCALE = 1.0
_MAX_LOGIT_SCALE = 100.0

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def head_spec(head: str | dict[str, Any]) -> dict[str, Any]:
    """A head given as a shorthand (``"prototype"``, ``"softmax"``) or a spec -> ``{"class_path", "init_args"}``.

    Raises:
        ValueError: an unknown shorthand or something that is neither a string nor a mapping.
    """
    if isinstance(head, str):
        if head not in HEAD_SHORTHANDS:
            raise ValueError(f"head must be one of {tuple(HEAD_SHORTHANDS)} or a {{class_path, init_args}} spec "
                             f"(e.g. cfseg.heads.DoDNetHead), got {head!r}")
        return {"class_path": HEAD_SHORTHANDS[head], "init_args": {}}
    if isinstance(head, dict) and isinstance(head.get("class_path"), str):
        return {"class_path": head["class_path"], "init_args": dict(head.get("init_args") or {})}
    raise ValueError(f"head must be a shorthand {tuple(HEAD_SHORTHANDS)} or a {{class_path, init_args}} mapping, "
                     f"got {head!r}")


def deepest_layer(module: nn.Module, pattern: str, what: str = "bottleneck_layer") -> str:
    """Name of the deepest submodule of ``module`` whose name fully matches ``pattern`` (ties: the longest name).

    Raises:
        ValueError: no submodule matches (``what`` names the setting in the message).
    """
    names = [n for n, _ in module.named_modules() if n and re.fullmatch(pattern, n)]
    if not names:
        raise ValueError(f"{what} {pattern!r} matches no module of the backbone; set it to a regular expression of a "
                         "module name (e.g. its bottleneck)")
    return max(names, key=lambda n: (n.count("."), len(n)))


def bottleneck_channels(backbone: nn.Module, pattern: str = DEFAULT_BOTTLENECK_LAYER) -> int:
    """Output channels of the backbone layer ``pattern`` picks (:func:`deepest_layer`): its last convolution's.

    Raises:
        ValueError: no layer matches, or the layer holds no convolution (then give ``bottleneck_channels``).
    """
    name = deepest_layer(backbone, pattern)
    convs = [m for m in backbone.get_submodule(name).modules() if isinstance(getattr(m, "out_channels", None), int)]
    if not convs:
        raise ValueError(f"cannot tell the output channels of the backbone's {name!r}: give the head's "
                         "bottleneck_channels explicitly")
    return int(convs[-1].out_channels)


def foreground_indices(class_indices: Sequence[int] | None, n_classes: int, what: str) -> list[int]:
    """Global foreground indices (0 dropped; all of ``1..n_classes-1`` when None), checked against ``n_classes``."""
    if class_indices is None:
        return list(range(1, n_classes))
    ks = [int(i) for i in class_indices if int(i) != 0]
    bad = [k for k in ks if not 0 < k < n_classes]
    if bad:
        raise ValueError(f"class indices {bad} are outside 1..{n_classes - 1}: {what} knows {n_classes - 1} classes")
    return ks


def _hidden_layer(
    in_channels: int, hidden_channels: int | None, spatial_dims: int, activation: Callable[[], nn.Module]
) -> tuple[nn.Module, int]:
    if spatial_dims not in _CONV:
        raise ValueError(f"spatial_dims must be 1, 2 or 3, got {spatial_dims!r}.")
    if in_channels < 1:
        raise ValueError(f"feature_channels must be >= 1, got {in_channels!r}.")
    if hidden_channels is None:
        return nn.Identity(), in_channels
    if hidden_channels < 1:
        raise ValueError(f"hidden_channels must be >= 1 or None (no hidden layer), got {hidden_channels!r}.")
    conv = _CONV[spatial_dims](in_channels, hidden_channels, kernel_size=1)
    return nn.Sequential(conv, activation()), hidden_channels


# ----------------------------------------------------------------------------------------------------
# The interface
# ----------------------------------------------------------------------------------------------------
class Head(nn.Module):
    """A segmentation head: voxel features ``[B, F, *S]`` -> logits ``[B, K'+1, *S]`` (background first).

    Class attributes a head declares:
        output: ``"softmax"`` or ``"sigmoid"`` (see the module docstring; set by the two output-kind bases).
        open_vocabulary: a new class needs no new layer (only a new prototype / text embedding).
        has_similarity: :meth:`similarity` returns cosine maps.
        legacy_keys: state-dict entries that lived on the segmenter before heads were modules (moved into
            ``head.`` when an old checkpoint loads).

    Instance attribute:
        bottleneck_layer: regular expression (deepest full match) of the backbone module whose globally pooled
            output the head reads as ``context["pooled"]``; ``None`` when it needs none.
    """

    output: ClassVar[str] = ""
    open_vocabulary: ClassVar[bool] = False
    has_similarity: ClassVar[bool] = False
    legacy_keys: ClassVar[tuple[str, ...]] = ()
    bottleneck_layer: str | None = None

    def features(self, z: Tensor) -> Tensor:
        """Per-voxel features the head scores, from the backbone output ``[B, F, *S]`` (identity by default)."""
        return z

    def logits(self, features: Tensor, class_indices: Sequence[int] | None = None, **context: Any) -> Tensor:
        """Logits ``[B, K'+1, *S]`` over background and ``class_indices`` (all classes when None)."""
        raise NotImplementedError

    def forward(self, features: Tensor, class_indices: Sequence[int] | None = None, **context: Any) -> Tensor:
        """Alias of :meth:`logits`."""
        return self.logits(features, class_indices, **context)

    def probabilities(self, logits: Tensor) -> Tensor:
        """Probabilities ``[B, K'+1, *S]`` whose argmax over channels is :meth:`labels` (up to exact ties)."""
        raise NotImplementedError

    def labels(self, logits: Tensor) -> Tensor:
        """Label channel per voxel ``[B, *S]`` (int64, 0 = background, ``j`` = the ``j``-th requested class)."""
        raise NotImplementedError

    def loss(self, logits: Tensor, target: Tensor, annotated: Tensor, *, ce_weight: float = 1.0,
             dice_weight: float = 1.0, ignore_index: int | None = None, batch_dice: bool = False) -> Tensor:
        """Partial-label training loss of logits ``[B, K+1, *S]`` (every class), target ``[B, *S]`` and
        ``annotated`` ``[B, K+1]`` bool; a class not annotated in a case contributes nothing for that case."""
        raise NotImplementedError

    def similarity(self, logits: Tensor) -> Tensor | None:
        """Cosine similarity maps ``[B, K'+1, *S]`` in ``[-1, 1]`` from this head's logits, or None (no cosine)."""
        return None


class SoftmaxOutputHead(Head):
    """Base of heads whose logits are one softmax distribution over background and the classes."""

    output: ClassVar[str] = "softmax"

    def probabilities(self, logits: Tensor) -> Tensor:
        """``softmax`` over channels."""
        return logits.softmax(1)

    def labels(self, logits: Tensor) -> Tensor:
        """``argmax`` over channels."""
        return logits.argmax(1)

    def loss(self, logits: Tensor, target: Tensor, annotated: Tensor, *, ce_weight: float = 1.0,
             dice_weight: float = 1.0, ignore_index: int | None = None, batch_dice: bool = False) -> Tensor:
        """:func:`cfseg.losses.partial_label_loss` (merged-background CE + Dice over annotated classes)."""
        return partial_label_loss(logits, target, annotated, ce_weight, dice_weight, ignore_index=ignore_index,
                                  batch_dice=batch_dice)


class SigmoidOutputHead(Head):
    """Base of heads with one independent sigmoid per class.

    Channel 0 of the logits is the constant ``logit(threshold)`` (0 for 0.5), so that averaging windows and
    ``argmax`` over logits agree with the label rule: background where no class's probability exceeds
    ``threshold``, else the most probable class.

    Args:
        threshold: probability a class must exceed to label a voxel, in ``(0, 1)``.
    """

    output: ClassVar[str] = "sigmoid"

    def __init__(self, threshold: float = 0.5) -> None:
        super().__init__()
        if not 0 < threshold < 1:
            raise ValueError(f"threshold must lie in (0, 1), got {threshold!r}; e.g. 0.5")
        self.threshold = float(threshold)

    @property
    def background_logit(self) -> float:
        """``logit(threshold)``: the value of channel 0."""
        return math.log(self.threshold / (1.0 - self.threshold))

    def _with_background(self, fg: Tensor) -> Tensor:
        """``[B, K', *S]`` class logits -> ``[B, K'+1, *S]`` with the constant background channel first."""
        bg = fg.new_full((fg.shape[0], 1, *fg.shape[2:]), self.background_logit)
        return torch.cat([bg, fg], dim=1)

    def probabilities(self, logits: Tensor) -> Tensor:
        """Per-class sigmoids; channel 0 is ``1 - max_k p_k`` (at least ``1 - threshold`` where no class wins)."""
        fg = logits[:, 1:]
        p = torch.sigmoid(fg.float() if fg.dtype in (torch.float16, torch.bfloat16) else fg)
        bg = 1.0 - p.amax(1, keepdim=True) if p.shape[1] else torch.ones_like(logits[:, :1], dtype=p.dtype)
        return torch.cat([bg, p], dim=1)

    def labels(self, logits: Tensor) -> Tensor:
        """0 where no class's probability exceeds :attr:`threshold`, else the channel of the most probable class."""
        if logits.shape[1] < 2:
            return torch.zeros((logits.shape[0], *logits.shape[2:]), dtype=torch.long, device=logits.device)
        best, arg = logits[:, 1:].max(1)
        return torch.where(best > self.background_logit, arg + 1, torch.zeros_like(arg))

    def loss(self, logits: Tensor, target: Tensor, annotated: Tensor, *, ce_weight: float = 1.0,
             dice_weight: float = 1.0, ignore_index: int | None = None, batch_dice: bool = False) -> Tensor:
        """:func:`cfseg.losses.masked_sigmoid_loss`: ``ce_weight`` weighs the BCE, ``dice_weight`` the Dice."""
        return masked_sigmoid_loss(logits, target, annotated, ce_weight, dice_weight, ignore_index=ignore_index,
                                   batch_dice=batch_dice)


# ----------------------------------------------------------------------------------------------------
# cfseg's classifier-free head and the softmax baseline
# ----------------------------------------------------------------------------------------------------
class ProjectionHead(nn.Module):
    """Optional per-voxel nonlinearity followed by a bias-free linear map ``W`` to the embedding width.

    The projection itself is not applied as a layer: :func:`cfseg.cosine.cosine_logits` consumes ``W`` in
    factorised form.

    Args:
        feature_channels: ``F``, channels of the backbone output.
        embed_dim: ``D``, width of the prototypes (text embeddings).
        hidden_channels: if given, a ``1x1x1`` convolution ``F -> H`` plus ``activation`` runs first and ``W``
            is ``[D, H]``; ``None`` means no hidden layer (``W`` is ``[D, F]``).
        spatial_dims: 3 for volumes (2 for slices).
        activation: factory for the hidden layer's activation.
    """

    def __init__(
        self,
        feature_channels: int,
        embed_dim: int,
        hidden_channels: int | None = None,
        spatial_dims: int = 3,
        activation: Callable[[], nn.Module] = nn.GELU,
    ) -> None:
        super().__init__()
        if embed_dim < 1:
            raise ValueError(f"embed_dim must be >= 1, got {embed_dim!r}; e.g. 512 for CLIP ViT-B/32.")
        self.hidden, self.out_channels = _hidden_layer(
            feature_channels, hidden_channels, spatial_dims, activation
        )
        self.embed_dim = embed_dim
        # Orthogonal init: when D >= F, W^T W = I at the start, so ||W z|| = ||z||.
        self.weight = nn.Parameter(nn.init.orthogonal_(torch.empty(embed_dim, self.out_channels)))

    def features(self, z: Tensor) -> Tensor:
        """Pre-projection features ``[B, F', *S]`` (after the optional hidden layer; ``F' = H`` or ``F``)."""
        return self.hidden(z)

    def forward(self, z: Tensor) -> Tensor:
        """Alias of :meth:`features`; the projection ``W`` is applied inside :func:`cosine_logits`."""
        return self.features(z)


class PrototypeHead(ProjectionHead, SoftmaxOutputHead):
    """cfseg's classifier-free head: ``s_k = cos(W z, p_k) / tau`` against the bank's prototypes (``context``).

    A new class is a new prototype row, never a new layer (``open_vocabulary``). State: ``hidden``, ``weight``
    (``W`` ``[D, F']``) and ``log_logit_scale`` (``log 1/tau``).

    Args:
        feature_channels: ``F``, channels of the backbone output.
        embed_dim: ``D``, width of the prototypes.
        temperature: ``tau`` (initial value when learnable); logits are cosines divided by ``tau``.
        learnable_temperature: learn ``log(1 / tau)`` (CLIP-style), clamped so that ``tau`` stays in
            ``[0.01, 1]``; otherwise ``tau`` is a fixed buffer.
        hidden_channels: optional per-voxel hidden layer width (see :class:`ProjectionHead`).
        eps: lower bound on ``||W z||``.
        spatial_dims: 3 for volumes.
    """

    open_vocabulary: ClassVar[bool] = True
    has_similarity: ClassVar[bool] = True
    legacy_keys: ClassVar[tuple[str, ...]] = ("log_logit_scale",)

    def __init__(
        self,
        feature_channels: int,
        embed_dim: int,
        temperature: float = 0.07,
        learnable_temperature: bool = False,
        hidden_channels: int | None = None,
        eps: float = 1e-6,
        spatial_dims: int = 3,
    ) -> None:
        if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}; e.g. 0.07.")
        super().__init__(feature_channels, embed_dim, hidden_channels, spatial_dims)
        self.eps = eps
        self.learnable_temperature = learnable_temperature
        log_scale = torch.tensor(math.log(1.0 / temperature), dtype=torch.float32)
        if learnable_temperature:
            if not _MIN_LOGIT_SCALE <= 1.0 / temperature <= _MAX_LOGIT_SCALE:
                raise ValueError(
                    f"a learnable temperature must start in [{1 / _MAX_LOGIT_SCALE}, "
                    f"{1 / _MIN_LOGIT_SCALE}], got {temperature!r}."
                )
            self.log_logit_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("log_logit_scale", log_scale)

    @property
    def temperature(self) -> Tensor:
        """Current ``tau`` as a scalar tensor (clamped to ``[0.01, 1]`` when learnable)."""
        log_scale = self.log_logit_scale
        if self.learnable_temperature:
            log_scale = log_scale.clamp(math.log(_MIN_LOGIT_SCALE), math.log(_MAX_LOGIT_SCALE))
        return torch.exp(-log_scale)

    def logits(self, features: Tensor, class_indices: Sequence[int] | None = None, *,
               prototypes: Tensor | None = None, weight: Tensor | None = None, **_: Any) -> Tensor:
        """Cosine logits ``[B, K'+1, *S]`` from features ``[B, F', *S]`` and ``prototypes`` ``[K+1, D]`` (rows
        ``[0, *class_indices]`` are used); ``weight`` replaces ``W`` (an expert's projection)."""
        if prototypes is None:
            raise ValueError("the prototype head needs the bank's prototypes (context prototypes=[K+1, D])")
        self.check_prototypes(prototypes)
        if class_indices is not None:
            prototypes = prototypes[[0, *foreground_indices(class_indices, prototypes.shape[0], "the prototype bank")]]
        return cosine_logits(features, self.weight if weight is None else weight, prototypes, self.temperature,
                             self.eps)

    def forward(self, features: Tensor, class_indices: Sequence[int] | None = None, **context: Any) -> Tensor:
        """Alias of :meth:`logits` (unlike :class:`ProjectionHead`, whose forward is its features)."""
        return self.logits(features, class_indices, **context)

    def similarity(self, logits: Tensor) -> Tensor:
        """``cos = logit * tau`` ``[B, K'+1, *S]`` (differentiable in ``tau`` when it is learnt)."""
        return logits * self.temperature.to(logits.device)

    def check_prototypes(self, prototypes: Tensor) -> None:
        """Raise a ValueError unless ``prototypes`` is ``[K+1, embed_dim]``."""
        if prototypes.dim() != 2 or prototypes.shape[1] != self.embed_dim:
            raise ValueError(
                f"prototypes must have shape [K+1, {self.embed_dim}] (embed_dim={self.embed_dim}), got "
                f"{tuple(prototypes.shape)}; was the bank built with a text encoder of another width?"
            )


class SoftmaxHead(SoftmaxOutputHead):
    """Conventional baseline: optional hidden layer, then a ``1x1x1`` convolution ``F -> K+1`` (with bias).

    A fixed classifier: a new class needs a new layer (not ``open_vocabulary``).

    Args:
        feature_channels: ``F``, channels of the backbone output.
        num_classes: number of output channels (``K+1``, background included).
        hidden_channels: optional per-voxel hidden layer width, as in :class:`ProjectionHead`.
        spatial_dims: 3 for volumes.
    """

    legacy_keys: ClassVar[tuple[str, ...]] = ("hidden", "classifier")

    def __init__(self, feature_channels: int, num_classes: int, hidden_channels: int | None = None,
                 spatial_dims: int = 3) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1 (background included), got {num_classes!r}.")
        self.hidden, channels = _hidden_layer(feature_channels, hidden_channels, spatial_dims, nn.GELU)
        self.classifier = _CONV[spatial_dims](channels, num_classes, kernel_size=1, bias=True)
        self.num_classes = num_classes

    def features(self, z: Tensor) -> Tensor:
        """Voxel features ``[B, F', *S]`` (after the optional hidden layer)."""
        return self.hidden(z)

    def logits(self, features: Tensor, class_indices: Sequence[int] | None = None, **_: Any) -> Tensor:
        """Logits ``[B, K'+1, *S]``: the classifier's channels ``[0, *class_indices]``."""
        out = self.classifier(features)
        if class_indices is None:
            return out
        return out[:, [0, *foreground_indices(class_indices, self.num_classes, "the softmax classifier")]]


# ----------------------------------------------------------------------------------------------------
# Dynamic heads (DoDNet, CLIP-driven Universal Model)
# ----------------------------------------------------------------------------------------------------
def dynamic_convs(features: Tensor, params: Tensor, widths: Sequence[int]) -> Tensor:
    """Per-sample, per-class stacks of ``1x1x1`` convolutions with generated weights, ReLU between them.

    Args:
        features: ``[B, C_0, *S]`` voxel features (``C_0 = widths[0]``).
        params: ``[B, K, P]`` generated parameters of each (sample, class): for every layer ``i`` the weight
            ``[widths[i+1], widths[i]]`` then the bias ``[widths[i+1]]``, layer after layer.
        widths: channel widths ``[C_0, C_1, ..., 1]``.

    Returns:
        ``[B, K, *S]``: the last layer's single output channel per class.

    Raises:
        ValueError: ``params`` does not hold exactly the parameters ``widths`` describe.
    """
    b, c0 = features.shape[:2]
    k, n_params = params.shape[1], params.shape[2]
    need = sum(o * i + o for i, o in zip(widths[:-1], widths[1:], strict=True))
    if c0 != widths[0] or n_params != need or widths[-1] != 1:
        raise ValueError(f"dynamic head: features {tuple(features.shape)} and params {tuple(params.shape)} do not "
                         f"fit widths {list(widths)} ({need} parameters per class, one output)")
    z = features.reshape(b, c0, -1)  # [B, C0, N]
    x = None
    offset = 0
    for layer, (i, o) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        w = params[:, :, offset: offset + o * i].reshape(b, k, o, i)
        bias = params[:, :, offset + o * i: offset + o * i + o]  # [B, K, O]
        offset += o * i + o
        if layer == 0:  # one product for all classes of a sample: [B, K*O, C0] @ [B, C0, N]
            x = torch.bmm(w.reshape(b, k * o, i), z).reshape(b * k, o, -1) + bias.reshape(b * k, o, 1)
        else:
            x = torch.baddbmm(bias.reshape(b * k, o, 1), w.reshape(b * k, o, i), x)
        if layer < len(widths) - 2:
            x = F.relu(x)
    return x.reshape(b, k, *features.shape[2:])


def _norm_groups(channels: int) -> int:
    """GroupNorm groups for ``channels``: two channels per group as DoDNet's ``GroupNorm(16, 32)``, at most 16."""
    return max(g for g in range(1, min(16, max(1, channels // 2)) + 1) if channels % g == 0)


class DynamicHead(SigmoidOutputHead):
    """Base of the heads whose per-class ``1x1x1`` convolutions are generated by a controller (DoDNet, Universal).

    Both reference models first map the decoder output through a pre-classification block, GroupNorm + ReLU +
    ``1x1x1`` convolution to ``head_channels`` (DoDNet's and the Universal Model's ``precls_conv``), so the
    generated head sees normalised ``head_channels``-wide features; the generated stack is then
    ``head_channels -> ... -> head_channels -> 1`` (``layers`` convolutions, ReLU between them). Without that
    block the decoder's last convolution (MONAI UNet's has no normalisation) is free to scale up, and the
    product of three generated layers saturates every sigmoid (on OpenKBP within the first tens of steps, after
    which training stopped).

    Args:
        feature_channels: ``F``, channels of the backbone output.
        head_channels: width of the pre-classification block and of the generated convolutions (8).
        layers: generated ``1x1x1`` convolutions (3).
        bottleneck_channels: ``C_b``, channels of the pooled bottleneck feature.
        bottleneck_layer: backbone module whose output is pooled (deepest full match of the expression).
        spatial_dims: 3 for volumes.
        threshold: see :class:`SigmoidOutputHead`.
    """

    def __init__(self, feature_channels: int, head_channels: int, layers: int, bottleneck_channels: int,
                 bottleneck_layer: str, spatial_dims: int = 3, threshold: float = 0.5) -> None:
        super().__init__(threshold)
        if feature_channels < 1 or head_channels < 1 or layers < 1:
            raise ValueError(f"need feature_channels, head_channels and layers >= 1, got {feature_channels}, "
                             f"{head_channels}, {layers}")
        if bottleneck_channels < 1:
            raise ValueError(f"bottleneck_channels must be >= 1, got {bottleneck_channels!r}")
        if spatial_dims not in _CONV:
            raise ValueError(f"spatial_dims must be 1, 2 or 3, got {spatial_dims!r}.")
        self.precls = nn.Sequential(nn.GroupNorm(_norm_groups(feature_channels), feature_channels), nn.ReLU(),
                                    _CONV[spatial_dims](feature_channels, head_channels, kernel_size=1))
        self.widths = [*([head_channels] * layers), 1]
        self.n_params = sum(o * i + o for i, o in zip(self.widths[:-1], self.widths[1:], strict=True))
        self.bottleneck_channels = bottleneck_channels
        self.bottleneck_layer = bottleneck_layer

    def features(self, z: Tensor) -> Tensor:
        """The pre-classification block: ``[B, F, *S]`` -> ``[B, head_channels, *S]``."""
        return self.precls(z)

    def pooled(self, context: dict[str, Any], batch: int, dtype: torch.dtype) -> Tensor:
        """``context["pooled"]`` ``[B, C_b]``, checked."""
        head, channels, pooled = type(self).__name__, self.bottleneck_channels, context.get("pooled")
        if pooled is None:
            raise ValueError(f"{head} needs the pooled bottleneck feature (context pooled=[B, C_b]); run it inside a "
                             "cfseg.nets.Segmenter, which captures it from the backbone")
        if pooled.dim() != 2 or pooled.shape[0] != batch or pooled.shape[1] != channels:
            raise ValueError(f"{head}: pooled bottleneck feature must be [B={batch}, {channels}], got "
                             f"{tuple(pooled.shape)}; does bottleneck_channels match the backbone's bottleneck?")
        return pooled.to(dtype)


class DoDNetHead(DynamicHead):
    """DoDNet's dynamic head (Zhang et al., CVPR 2021): a class code conditions a generated per-class head.

    For each sample and requested class, the one-hot code of the class (``K`` entries) concatenated with the
    globally pooled bottleneck feature (``context["pooled"]`` ``[B, C_b]``) feeds a controller (a linear layer,
    i.e. a ``1x1x1`` convolution on the pooled vector) that outputs the weights and biases of ``layers``
    ``1x1x1`` convolutions run on the pre-classification features (:class:`DynamicHead`): one logit per class
    per voxel, sigmoid per class (:class:`SigmoidOutputHead`). Trained with BCE + Dice on the classes annotated
    in each case.

    The one-hot code fixes the class count: a class added later has no code, so this head cannot take new
    classes without growing its controller's input (not ``open_vocabulary``; :class:`UniversalHead` can).

    Args:
        feature_channels: ``F``, channels of the backbone output.
        num_classes: ``K+1`` (background included); the code has ``K`` entries.
        bottleneck_channels: ``C_b``, channels of the pooled bottleneck feature (filled from the backbone by
            :class:`cfseg.module.CFSegModule`).
        head_channels: width of the pre-classification block and the generated convolutions (8 in DoDNet).
        layers: generated ``1x1x1`` convolutions (3 in DoDNet).
        bottleneck_layer: backbone module whose output is pooled (:data:`DEFAULT_POOLED_LAYER`).
        spatial_dims: 3 for volumes.
        threshold: see :class:`SigmoidOutputHead`.
    """

    def __init__(self, feature_channels: int, num_classes: int, bottleneck_channels: int, head_channels: int = 8,
                 layers: int = 3, bottleneck_layer: str = DEFAULT_POOLED_LAYER, spatial_dims: int = 3,
                 threshold: float = 0.5) -> None:
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2 (background and one class), got {num_classes!r}")
        super().__init__(feature_channels, head_channels, layers, bottleneck_channels, bottleneck_layer,
                         spatial_dims, threshold)
        self.num_classes = num_classes
        self.controller = nn.Linear(bottleneck_channels + num_classes - 1, self.n_params)

    def generate(self, pooled: Tensor, class_indices: Sequence[int]) -> Tensor:
        """Generated parameters ``[B, K', P]`` of the dynamic heads of ``class_indices`` (global, ``>= 1``)."""
        ks = torch.as_tensor([int(k) - 1 for k in class_indices], dtype=torch.long, device=pooled.device)
        code = F.one_hot(ks, self.num_classes - 1).to(pooled.dtype)  # [K', K]
        b, k = pooled.shape[0], len(ks)
        inp = torch.cat([pooled[:, None].expand(b, k, -1), code[None].expand(b, k, -1)], dim=2)
        return self.controller(inp)

    def logits(self, features: Tensor, class_indices: Sequence[int] | None = None, **context: Any) -> Tensor:
        """Logits ``[B, K'+1, *S]`` from pre-classification features ``[B, head_channels, *S]``: the constant
        background channel, then one dynamic head per class."""
        ks = foreground_indices(class_indices, self.num_classes,
                         "DoDNet's one-hot code (it cannot take new classes without growing it)")
        pooled = self.pooled(context, features.shape[0], features.dtype)
        return self._with_background(dynamic_convs(features, self.generate(pooled, ks), self.widths))


class UniversalHead(DynamicHead):
    """The CLIP-driven Universal Model's head (Liu et al., ICCV 2023): a class's text embedding conditions its head.

    For each sample and requested class, the class's text embedding (``context["text_embeddings"]``: the bank's
    raw averaged prompt embeddings, before Gram-Schmidt) and the globally pooled bottleneck feature
    (``context["pooled"]``) are each mapped to ``controller_channels`` (linear + ReLU); their concatenation feeds
    the controller, a linear layer emitting the weights and biases of ``layers`` ``1x1x1`` convolutions run on
    the pre-classification features (:class:`DynamicHead`). Sigmoid per class; BCE + Dice on the annotated
    classes; label: background where no class exceeds ``threshold``, else the most probable class
    (:class:`SigmoidOutputHead`).

    A class is a text embedding, so a class added later is one more embedding row: no new layer
    (``open_vocabulary``, like :class:`PrototypeHead`).

    Args:
        feature_channels: ``F``, channels of the backbone output.
        text_dim: ``E``, width of the text embeddings.
        bottleneck_channels: ``C_b``, channels of the pooled bottleneck feature.
        controller_channels: width each of the text and image features is mapped to before the controller
            (256 in the Universal Model).
        head_channels: width of the pre-classification block and the generated convolutions (8).
        layers: generated ``1x1x1`` convolutions (3).
        bottleneck_layer: backbone module whose output is pooled (:data:`DEFAULT_POOLED_LAYER`).
        spatial_dims: 3 for volumes.
        threshold: see :class:`SigmoidOutputHead`.
    """

    open_vocabulary: ClassVar[bool] = True

    def __init__(self, feature_channels: int, text_dim: int, bottleneck_channels: int, controller_channels: int = 256,
                 head_channels: int = 8, layers: int = 3, bottleneck_layer: str = DEFAULT_POOLED_LAYER,
                 spatial_dims: int = 3, threshold: float = 0.5) -> None:
        if min(text_dim, controller_channels) < 1:
            raise ValueError(f"need text_dim and controller_channels >= 1, got {text_dim}, {controller_channels}")
        super().__init__(feature_channels, head_channels, layers, bottleneck_channels, bottleneck_layer,
                         spatial_dims, threshold)
        self.text_dim = text_dim
        self.text_to_vision = nn.Sequential(nn.Linear(text_dim, controller_channels), nn.ReLU())
        self.image_to_controller = nn.Sequential(nn.Linear(bottleneck_channels, controller_channels), nn.ReLU())
        self.controller = nn.Linear(2 * controller_channels, self.n_params)

    def generate(self, pooled: Tensor, text: Tensor) -> Tensor:
        """Generated parameters ``[B, K', P]`` from pooled features ``[B, C_b]`` and class embeddings ``[K', E]``."""
        t = self.text_to_vision(text.to(pooled.dtype))  # [K', C]
        v = self.image_to_controller(pooled)  # [B, C]
        b, k = v.shape[0], t.shape[0]
        return self.controller(torch.cat([v[:, None].expand(b, k, -1), t[None].expand(b, k, -1)], dim=2))

    def logits(self, features: Tensor, class_indices: Sequence[int] | None = None, *,
               text_embeddings: Tensor | None = None, **context: Any) -> Tensor:
        """Logits ``[B, K'+1, *S]`` for the classes ``class_indices`` (rows of ``text_embeddings`` ``[K+1, E]``)
        from pre-classification features ``[B, head_channels, *S]``."""
        if text_embeddings is None:
            raise ValueError("the Universal head needs the bank's text embeddings (context text_embeddings=[K+1, E])")
        if text_embeddings.dim() != 2 or text_embeddings.shape[1] != self.text_dim:
            raise ValueError(f"text embeddings must be [K+1, {self.text_dim}], got {tuple(text_embeddings.shape)}; "
                             "was the bank built with another text encoder?")
        ks = foreground_indices(class_indices, text_embeddings.shape[0], "the bank")
        pooled = self.pooled(context, features.shape[0], features.dtype)
        params = self.generate(pooled, text_embeddings[ks].to(features.device))
        return self._with_background(dynamic_convs(features, params, self.widths))
