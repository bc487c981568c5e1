"""Segmentation heads: one interface, injected by ``class_path``.

A head turns the backbone's full-resolution voxel features ``[B, F, *S]`` into logits ``[B, K'+1, *S]`` over
background and the requested classes, in that order::

    head.logits(features, class_indices, **context)

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
from torch import Tensor, nn

from cfseg.cosine import cosine_logits
from cfseg.losses import masked_sigmoid_loss, partial_label_loss

__all__ = [
    "DEFAULT_BOTTLENECK_LAYER",
    "HEAD_SHORTHANDS",
    "Head",
    "ProjectionHead",
    "PrototypeHead",
    "SigmoidOutputHead",
    "SoftmaxHead",
    "SoftmaxOutputHead",
    "bottleneck_channels",
    "deepest_layer",
    "head_spec",
]

#: The YAML strings of the heads that existed before heads were injected (old configs and checkpoints).
HEAD_SHORTHANDS: dict[str, str] = {"prototype": "cfseg.heads.PrototypeHead", "softmax": "cfseg.heads.SoftmaxHead"}
#: MONAI UNet's bottleneck convolution (the deepest match; the same layer as the router's,
#: :data:`cfseg.module.DEFAULT_ROUTER_LAYER`): taken *before* the block's instance normalisation, whose output has
#: zero mean per channel and so pools to almost nothing.
DEFAULT_BOTTLENECK_LAYER = r"model(\.1\.submodule)*\.conv"

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


def _foreground(class_indices: Sequence[int] | None, n_classes: int, what: str) -> list[int]:
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
            prototypes = prototypes[[0, *_foreground(class_indices, prototypes.shape[0], "the prototype bank")]]
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
        return out[:, [0, *_foreground(class_indices, self.num_classes, "the softmax classifier")]]
