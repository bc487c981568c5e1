"""Backbone + head = segmenter.

A :class:`Segmenter` runs an injected backbone (any module mapping ``[B, C, *S]`` to full-resolution features
``[B, F, *S]``; YAML picks it by ``class_path``) and an injected head (:mod:`cfseg.heads`): features -> logits over
background and the requested classes. Heads that read the pooled bottleneck feature (DoDNet, Universal) name a
backbone layer; the segmenter captures that layer's output with a forward hook and hands its global average to the
head as ``context["pooled"]``. A ``expert_projection`` slot holds LoRA experts' per-expert projections of a
prototype head (:mod:`cfseg.continual.experts`), handed to the head as ``context["weight"]``. A backbone with deep
supervision (MONAI's ``DynUNet(deep_supervision=True)`` stacks ``[B, 1 + L, F, *S]`` in training) has its extra
outputs' head features in ``context["deep_features"]``; the training loss weighs them
(:func:`deep_supervision_weights`).

:class:`PrototypeSegmenter` (cosine logits against given prototypes, cfseg's method) and :class:`SoftmaxSegmenter`
(a ``1x1x1`` conv to ``K+1`` logits, the baseline) are the two segmenters that predate injected heads; they keep
their constructors and call signatures, and their old state-dict keys load (:attr:`cfseg.heads.Head.legacy_keys`).

The factorised cosine logits live in :mod:`cfseg.cosine` (re-exported here).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from cfseg.cosine import cosine_logits, cosine_similarity_maps
from cfseg.heads import Head, ProjectionHead, PrototypeHead, SoftmaxHead, deepest_layer

__all__ = [
    "CONV_TYPES",
    "cosine_logits",
    "cosine_similarity_maps",
    "ProjectionHead",
    "PrototypeSegmenter",
    "Segmenter",
    "SoftmaxSegmenter",
    "deep_supervision_weights",
    "default_backbone",
    "segmenter",
]

#: every torch convolution: the layers LoRA experts wrap and a folded output layer may be
CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def deep_supervision_weights(n: int) -> list[float]:
    """nnU-Net's loss weights of ``n`` outputs, the full-resolution one first: ``1 / 2**i``, normalised to sum 1."""
    w = [0.5 ** i for i in range(n)]
    return [v / sum(w) for v in w]


def split_deep_supervision(z: Tensor, x: Tensor) -> tuple[Tensor, tuple[Tensor, ...]]:
    """The backbone's output ``[B, F, *S]`` and its deep-supervision outputs (none unless ``z`` has one dimension more
    than the input ``x``: ``[B, 1 + L, F, *S]``, the main output first)."""
    if z.dim() != x.dim() + 1:
        return z, ()
    main, *deep = z.unbind(1)
    return main, tuple(deep)


class Segmenter(nn.Module):
    """An injected backbone and an injected head (:class:`cfseg.heads.Head`).

    Args:
        backbone: any module mapping ``[B, C, *S]`` to full-resolution features ``[B, F, *S]``.
        head: the head scoring those features.

    Raises:
        ValueError: the head names a bottleneck layer the backbone does not have.
    """

    def __init__(self, backbone: nn.Module, head: Head) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.expert_projection: nn.Module | None = None  # per-expert projections (cfseg.continual.experts)
        pattern = getattr(head, "bottleneck_layer", None)
        self._bottleneck = deepest_layer(backbone, pattern) if pattern else None
        self.feature_channels: int | None = None  # F, where the builder knows it
        self.register_load_state_dict_pre_hook(_move_legacy_keys)

    def _adopt_head(self) -> None:
        """Expose head state under the names the segmenter had before heads were modules (subclasses)."""

    def encode(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Head features ``[B, F', *S]`` of images ``x`` ``[B, C, *S]`` and the head's context from the backbone
        (``pooled`` ``[B, C_b]`` when the head names a bottleneck layer, else nothing)."""
        if self._bottleneck is None:
            return self._features(self.backbone(x), x, {})
        store: list[Tensor] = []

        def hook(_m: nn.Module, _i: Any, out: Any) -> None:
            store.append(out[0] if isinstance(out, (tuple, list)) else out)

        handle = self.backbone.get_submodule(self._bottleneck).register_forward_hook(hook)
        try:
            z = self.backbone(x)
        finally:
            handle.remove()
        if not store:
            raise ValueError(f"the bottleneck layer {self._bottleneck!r} did not run in the backbone's forward pass")
        pooled = store[-1].as_subclass(Tensor).flatten(2).mean(-1)  # [B, C_b], plain data (never a MetaTensor)
        return self._features(z, x, {"pooled": pooled})

    def _features(self, z: Tensor, x: Tensor, context: dict[str, Any]) -> tuple[Tensor, dict[str, Any]]:
        """Head features of the backbone's output ``z`` and the context, deep-supervision features included."""
        main, deep = split_deep_supervision(z, x)
        if deep:
            context = {**context, "deep_features": tuple(self.head.features(d) for d in deep)}
        return self.head.features(main), context

    def features(self, x: Tensor) -> Tensor:
        """Head features ``[B, F', *S]`` for an image batch ``x`` of shape ``[B, C, *S]``."""
        return self.encode(x)[0]

    def logits(self, feats: Tensor, class_indices: Sequence[int] | None = None, **context: Any) -> Tensor:
        """The head's logits ``[B, K'+1, *S]`` from features ``[B, F', *S]`` (see :meth:`Head.logits`)."""
        if self.expert_projection is not None:  # LoRA experts: each expert has its own projection
            context = {**context, "weight": self.expert_projection.weight()}
        return self.head.logits(feats, class_indices, **context)

    def segment(self, x: Tensor, class_indices: Sequence[int] | None = None, **context: Any) -> Tensor:
        """Logits ``[B, K'+1, *S]`` for images ``x`` ``[B, C, *S]``; ``context`` as :meth:`Head.logits`."""
        feats, own = self.encode(x)
        return self.logits(feats, class_indices, **context, **own)

    def forward(self, x: Tensor, class_indices: Sequence[int] | None = None, **context: Any) -> Tensor:
        """Alias of :meth:`segment`."""
        return self.segment(x, class_indices, **context)


def _move_legacy_keys(module: Segmenter, state_dict: dict[str, Any], prefix: str, *_: Any) -> None:
    """Entries that lived on the segmenter before heads were modules (``classifier.*``, ``log_logit_scale``, ...)
    are copied under ``head.``; moved, unless the segmenter still exposes that name (old checkpoints load)."""
    own = {*module._parameters, *module._buffers}
    for name in type(module.head).legacy_keys:
        old = prefix + name
        for key in [k for k in state_dict if k == old or k.startswith(old + ".")]:
            new = prefix + "head." + key[len(prefix):]
            if new not in state_dict:
                state_dict[new] = state_dict[key] if name in own else state_dict.pop(key)


def _expose_temperature(net: Segmenter) -> None:
    """Register the prototype head's ``log_logit_scale`` on the segmenter too, under its pre-head name (the same
    tensor: ``parameters()`` lists it once; the state dict holds ``log_logit_scale`` and ``head.log_logit_scale``)."""
    scale = net.head.log_logit_scale
    if isinstance(scale, nn.Parameter):
        net.register_parameter("log_logit_scale", scale)
    else:
        net.register_buffer("log_logit_scale", scale)


class PrototypeSegmenter(Segmenter):
    """Classifier-free segmenter: backbone -> :class:`cfseg.heads.PrototypeHead` (cosine logits, given prototypes).

    Adding a class means passing a longer prototype matrix; no layer changes. The prototype bank is owned by
    the caller (the LightningModule) and passed to :meth:`forward`.

    Args:
        backbone: any module mapping ``[B, C, *S]`` to full-resolution features ``[B, F, *S]``.
        feature_channels, embed_dim, temperature, learnable_temperature, hidden_channels, eps: as
            :class:`cfseg.heads.PrototypeHead`.
    """

    head: PrototypeHead

    def __init__(
        self,
        backbone: nn.Module,
        feature_channels: int,
        embed_dim: int,
        temperature: float = 0.07,
        learnable_temperature: bool = False,
        hidden_channels: int | None = None,
        eps: float = 1e-6,
    ) -> None:
        super().__init__(backbone, PrototypeHead(feature_channels, embed_dim, temperature, learnable_temperature,
                                                 hidden_channels, eps))
        self.feature_channels = feature_channels
        self._adopt_head()

    def _adopt_head(self) -> None:
        _expose_temperature(self)

    @property
    def embed_dim(self) -> int:
        """``D``, width of the prototypes."""
        return self.head.embed_dim

    @property
    def eps(self) -> float:
        """Lower bound on ``||W z||``."""
        return self.head.eps

    @property
    def learnable_temperature(self) -> bool:
        """Whether ``tau`` is learnt."""
        return self.head.learnable_temperature

    @property
    def temperature(self) -> Tensor:
        """Current ``tau`` as a scalar tensor (clamped to ``[0.01, 1]`` when learnable)."""
        return self.head.temperature

    @property
    def weight(self) -> Tensor:
        """The projection ``W`` of shape ``[D, F']`` (the active expert's when experts carry their own)."""
        if self.expert_projection is not None:
            return self.expert_projection.weight()
        return self.head.weight

    def logits_from_features(self, feats: Tensor, prototypes: Tensor) -> Tensor:
        """Cosine logits ``[B, K+1, *S]`` from features ``[B, F', *S]`` and prototypes ``[K+1, D]``."""
        return self.logits(feats, None, prototypes=prototypes)

    def forward(self, x: Tensor, prototypes: Tensor) -> Tensor:
        """Logits ``[B, K+1, *S]`` for images ``x`` ``[B, C, *S]`` against prototypes ``[K+1, D]``."""
        return self.logits_from_features(self.features(x), prototypes)

    def similarity(self, x: Tensor, prototypes: Tensor) -> Tensor:
        """Cosine similarity maps ``[B, K+1, *S]`` in ``[-1, 1]`` (no temperature)."""
        self.head.check_prototypes(prototypes)
        return cosine_similarity_maps(self.features(x), self.weight, prototypes, self.eps)


class SoftmaxSegmenter(Segmenter):
    """Conventional baseline on the same backbone: :class:`cfseg.heads.SoftmaxHead` (a ``1x1x1`` conv ``F -> K+1``).

    Args:
        backbone: any module mapping ``[B, C, *S]`` to full-resolution features ``[B, F, *S]``.
        feature_channels: ``F``, channels of the backbone output.
        num_classes: number of output channels (``K+1``, background included).
        hidden_channels: optional per-voxel hidden layer width, as in :class:`ProjectionHead`.
        spatial_dims: 3 for volumes.
    """

    head: SoftmaxHead

    def __init__(
        self,
        backbone: nn.Module,
        feature_channels: int,
        num_classes: int,
        hidden_channels: int | None = None,
        spatial_dims: int = 3,
    ) -> None:
        super().__init__(backbone, SoftmaxHead(feature_channels, num_classes, hidden_channels, spatial_dims))
        self.feature_channels = feature_channels

    @property
    def num_classes(self) -> int:
        """``K+1``, the classifier's outputs."""
        return self.head.num_classes

    @property
    def hidden(self) -> nn.Module:
        """The optional hidden layer (the head's)."""
        return self.head.hidden

    @property
    def classifier(self) -> nn.Module:
        """The ``1x1x1`` classifier (the head's)."""
        return self.head.classifier

    def logits_from_features(self, feats: Tensor, prototypes: Tensor | None = None) -> Tensor:
        """Logits ``[B, num_classes, *S]``; ``prototypes`` is only checked for its class count."""
        if prototypes is not None and prototypes.shape[0] != self.num_classes:
            raise ValueError(
                f"SoftmaxSegmenter has a fixed classifier for {self.num_classes} classes but got prototypes "
                f"for {prototypes.shape[0]} classes (shape {tuple(prototypes.shape)}); a softmax head cannot "
                "take new classes without a new layer."
            )
        return self.logits(feats)

    def forward(self, x: Tensor, prototypes: Tensor | None = None) -> Tensor:
        """Logits ``[B, num_classes, *S]``; ``prototypes`` is accepted for a common call signature."""
        return self.logits_from_features(self.features(x), prototypes)


#: The segmenter class that keeps the pre-head API for a head class (exact type); other heads get :class:`Segmenter`.
_LEGACY_SEGMENTERS: dict[type[Head], type[Segmenter]] = {
    PrototypeHead: PrototypeSegmenter,
    SoftmaxHead: SoftmaxSegmenter,
}


def segmenter(backbone: nn.Module, head: Head, feature_channels: int) -> Segmenter:
    """``backbone`` + ``head``: a :class:`Segmenter`, or for the prototype / softmax heads the
    :class:`PrototypeSegmenter` / :class:`SoftmaxSegmenter` with the same modules (their API and state-dict keys)."""
    cls = _LEGACY_SEGMENTERS.get(type(head), Segmenter)
    net = cls.__new__(cls)
    Segmenter.__init__(net, backbone, head)
    net.feature_channels = feature_channels
    net._adopt_head()
    return net


def default_backbone(
    in_channels: int = 1,
    feature_channels: int = 32,
    channels: Sequence[int] = (16, 32, 64, 128),
    strides: Sequence[int] = (2, 2, 2),
    num_res_units: int = 1,
) -> nn.Module:
    """A MONAI 3D UNet emitting ``feature_channels`` full-resolution feature maps.

    Input sides must be divisible by the product of ``strides`` (8 by default).

    Returns:
        ``monai.networks.nets.UNet`` mapping ``[B, in_channels, X, Y, Z]`` to
        ``[B, feature_channels, X, Y, Z]``.
    """
    from monai.networks.nets import UNet

    if len(strides) != len(channels) - 1:
        raise ValueError(
            f"strides needs one entry fewer than channels, got channels={tuple(channels)}, "
            f"strides={tuple(strides)}."
        )
    return UNet(
        spatial_dims=3,
        in_channels=in_channels,
        out_channels=feature_channels,
        channels=tuple(channels),
        strides=tuple(strides),
        num_res_units=num_res_units,
    )
