"""Backbone + projection head -> cosine logits against a prototype bank.

The classifier-free head scores a voxel feature ``z`` (``F`` channels) against fixed unit-norm class
prototypes ``P`` (``K+1`` rows of width ``D``, background first) through a linear projection ``W``
(``D x F``)::

    s_k = cos(W z, p_k) / tau = (P W z)_k / (||W z|| * tau)

``D`` is the text-embedding width (512 for CLIP ViT-B/32) and much larger than ``F`` (tens of channels), so
the ``D``-channel embedding map ``W z`` is never built at full resolution. Instead

* the numerator uses ``A = P W`` (``[K+1, F]``, a tiny matrix), and
* the norm uses ``||W z||^2 = z^T G z`` with ``G = W^T W`` (``[F, F]``),

so the per-voxel cost is ``F * (K + 1 + F)`` multiply-adds. A hand-written backward (``_CosineHead``) keeps
only the head's input ``z`` and ``||W z||^2`` (one channel) for backward and works in place where it can, so
the head costs about what a conventional ``1x1x1`` convolution ``F -> K+1`` costs in time and memory (see
``benchmarks/README.md``). ``_cosine_head_autograd`` is the same maths through plain autograd, kept as a
reference for tests and benchmarks.

Both segmenters take their backbone as an injected ``nn.Module`` (YAML picks it by ``class_path``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

__all__ = [
    "cosine_logits",
    "cosine_similarity_maps",
    "ProjectionHead",
    "PrototypeSegmenter",
    "SoftmaxSegmenter",
    "default_backbone",
]

# CLIP-style bounds on the learnable logit scale 1/tau: tau in [0.01, 1].
_MIN_LOGIT_SCALE = 1.0
_MAX_LOGIT_SCALE = 100.0

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


# ----------------------------------------------------------------------------------------------------
# Functional core
# ----------------------------------------------------------------------------------------------------
def _check_shapes(features: Tensor, weight: Tensor, prototypes: Tensor) -> None:
    if features.dim() < 2:
        raise ValueError(
            f"features must have shape [B, F, *S], got {tuple(features.shape)}; add a batch dimension."
        )
    if weight.dim() != 2:
        raise ValueError(f"weight must have shape [D, F], got {tuple(weight.shape)}.")
    if prototypes.dim() != 2:
        raise ValueError(f"prototypes must have shape [K+1, D], got {tuple(prototypes.shape)}.")
    if weight.shape[1] != features.shape[1]:
        raise ValueError(
            f"weight has {weight.shape[1]} input channels but features have {features.shape[1]} channels "
            f"(weight {tuple(weight.shape)}, features {tuple(features.shape)}); weight must be [D, F]."
        )
    if prototypes.shape[1] != weight.shape[0]:
        raise ValueError(
            f"prototypes have width {prototypes.shape[1]} but the projection maps to D={weight.shape[0]} "
            f"(prototypes {tuple(prototypes.shape)}, weight {tuple(weight.shape)}); the embedding width of "
            "the text encoder and the head's embed_dim must agree."
        )


_HALF = (torch.float16, torch.bfloat16)


def _left_matmul(m: Tensor, x: Tensor, out: Tensor | None = None) -> Tensor:
    """``m @ x[b]`` for every ``b``: ``m`` ``[P, Q]``, ``x`` ``[B, Q, N]`` -> ``[B, P, N]``.

    ``torch.matmul(m, x)`` folds the batch into one ``[B*N, Q] @ [Q, P]`` product and then copies the
    transposed ``[B, P, N]`` result into place; on CPU that copy costs more than the product itself.
    """
    return torch.bmm(m.expand(x.shape[0], *m.shape), x, out=out)


class _CosineHead(torch.autograd.Function):
    """``out = A (z / max(sqrt(z^T G z), eps))`` for features ``z`` ``[B, F, N]``; hand-written backward.

    Saves only ``z`` (the head's input, which any head keeps) and ``||W z||^2`` (one channel). Plain autograd
    would also keep ``G z`` and ``z / ||W z||`` (two more ``F``-channel full-resolution tensors) and allocate
    about six ``F``-channel temporaries in backward. Here the full-resolution allocations are the output, in
    backward the input gradient, and one scratch buffer of a single sample's ``F`` channels (``[F, N]``): the
    quadratic form, the per-voxel dot products and the weight gradients run sample by sample through it, and
    every other step works in place. On CPU this matters beyond memory: glibc serves blocks above 32 MiB with
    fresh pages, so each full-resolution temporary costs page faults (about 40 ms for 32 MiB on a loaded
    2-core VM) as well as bandwidth. Half-precision ``z`` (autocast) gets its quadratic form in float32 so
    that it cannot overflow.
    """

    @staticmethod
    def forward(ctx, z: Tensor, a: Tensor, gram: Tensor, eps: float) -> Tensor:  # noqa: D102
        z = z.as_subclass(Tensor)  # backbone features may be MONAI MetaTensors: skip their per-op metadata handling
        cd = torch.float32 if z.dtype in _HALF else z.dtype  # dtype of the quadratic form
        sym = (0.5 * (gram + gram.transpose(0, 1))).to(cd)  # z^T G z = z^T sym(G) z
        a_z = a.to(z.dtype)
        bsz, f, n = z.shape
        k = a.shape[0]
        out = torch.empty(bsz, k, n, dtype=z.dtype, device=z.device)
        sq = torch.empty(bsz, 1, n, dtype=cd, device=z.device)  # ||W z||^2
        buf = torch.empty(f, n, dtype=cd, device=z.device)  # one sample's scratch
        for i in range(bsz):
            zi = z[i].to(cd)
            torch.sum(torch.mm(sym, zi, out=buf).mul_(zi), dim=0, keepdim=True, out=sq[i])
            ri = sq[i].clamp_min(eps * eps).rsqrt_().to(z.dtype)  # 1 / max(||W z||, eps)
            if k <= f:  # scale whichever side has fewer channels
                torch.mm(a_z, z[i], out=out[i]).mul_(ri)
            else:
                torch.mm(a_z, torch.mul(z[i], ri, out=buf) if buf.dtype == z.dtype else z[i] * ri, out=out[i])
        del buf
        ctx.save_for_backward(z, a, gram, sq)
        ctx.eps = eps
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):  # noqa: D102
        z, a, gram, sq = ctx.saved_tensors
        need_z, need_a, need_gram = ctx.needs_input_grad[:3]
        grad_z = grad_a = grad_gram = None
        with torch.autocast(device_type=z.device.type, enabled=False):
            cd = sq.dtype
            bsz, f, n = z.shape
            k = a.shape[0]
            eps2 = ctx.eps * ctx.eps
            r = sq.clamp_min(eps2).rsqrt_()  # [B, 1, N]
            buf = torch.empty(f, n, dtype=cd, device=z.device)  # one sample's scratch
            if need_a:  # dL/dA = sum_{b,n} g r z^T, scaling whichever side has fewer channels
                grad_a = torch.zeros(k, f, dtype=cd, device=z.device)
            if need_gram:  # d(z^T G z)/dG = z z^T
                grad_gram = torch.zeros(f, f, dtype=cd, device=z.device)
            if need_z or need_gram:
                h = torch.empty(bsz, f, n, dtype=cd, device=z.device)  # r dL/dzhat; becomes dL/dz
                a_t = a.to(cd).transpose(0, 1)
                sym = (0.5 * (gram + gram.transpose(0, 1))).to(cd)
            for i in range(bsz):
                zi, ri, gi = z[i].to(cd), r[i], grad_out[i].to(cd)
                gr = None
                if k <= f:
                    gr = torch.mul(gi, ri, out=buf[:k])  # g r
                    if need_a:
                        grad_a.addmm_(gr, zi.transpose(0, 1))
                elif need_a:
                    grad_a.addmm_(gi, torch.mul(zi, ri, out=buf).transpose(0, 1))
                if need_z or need_gram:
                    hi = torch.mm(a_t, gi, out=h[i]).mul_(ri) if gr is None else torch.mm(a_t, gr, out=h[i])
                    # dL/dsq = <dL/dzhat, z> (-r^3 / 2) = <r dL/dzhat, z> (-r^2 / 2) where the clamp is inactive
                    dsq = torch.mul(hi, zi, out=buf).sum(dim=0, keepdim=True)
                    dsq.mul_(ri.square()).mul_(-0.5).mul_(sq[i] >= eps2)
                    zd = torch.mul(zi, dsq, out=buf)  # dsq z
                    if need_gram:
                        grad_gram.addmm_(zd, zi.transpose(0, 1))
                    if need_z:  # dL/dz = r dL/dzhat + 2 sym(G) (dsq z), one fused multiply-add
                        hi.addmm_(sym, zd, alpha=2.0)
            if need_a:
                grad_a = grad_a.to(a.dtype)
            if need_gram:
                grad_gram = grad_gram.to(gram.dtype)
            if need_z:
                grad_z = h.to(z.dtype)
        return grad_z, grad_a, grad_gram, None


def _cosine_head_fused(z: Tensor, a: Tensor, gram: Tensor, eps: float) -> Tensor:
    with torch.autocast(device_type=z.device.type, enabled=False):
        return _CosineHead.apply(z, a, gram, eps)


def _cosine_head_autograd(z: Tensor, a: Tensor, gram: Tensor, eps: float) -> Tensor:
    """Same maths as :class:`_CosineHead` with plain autograd (reference for tests and benchmarks)."""
    with torch.autocast(device_type=z.device.type, enabled=False):
        zf = z.float() if z.dtype in _HALF else z
        sq = (zf * _left_matmul(gram.to(zf.dtype), zf)).sum(dim=1, keepdim=True)
        inv_norm = sq.clamp_min(eps * eps).rsqrt()
        return _left_matmul(a.to(z.dtype), z * inv_norm.to(z.dtype))


# The implementation used by cosine_logits / cosine_similarity_maps (benchmarks may swap in the reference).
_cosine_head = _cosine_head_fused


def _factorised(features: Tensor, weight: Tensor, prototypes: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``A = P W`` ``[K+1, F]``, ``G = W^T W`` ``[F, F]`` and the features flattened to ``[B, F, N]``."""
    b, f = features.shape[:2]
    z = features.reshape(b, f, -1)  # [B, F, N], a view for channels-first contiguous input
    a = prototypes.to(device=weight.device, dtype=weight.dtype) @ weight  # [K+1, F]
    gram = weight.transpose(0, 1) @ weight  # [F, F]
    return a, gram, z


def cosine_similarity_maps(features: Tensor, weight: Tensor, prototypes: Tensor, eps: float = 1e-6) -> Tensor:
    """Cosine similarity between projected voxel features and each prototype.

    Args:
        features: voxel features ``z`` of shape ``[B, F, *S]``.
        weight: linear projection ``W`` of shape ``[D, F]`` (no bias).
        prototypes: class prototypes ``P`` of shape ``[K+1, D]`` with unit-norm rows (background first).
        eps: lower bound on ``||W z||`` (a zero feature gets similarity 0 instead of NaN).

    Returns:
        ``cos(W z, p_k)`` of shape ``[B, K+1, *S]``, in ``[-1, 1]`` for unit-norm prototypes.
    """
    _check_shapes(features, weight, prototypes)
    a, gram, z = _factorised(features, weight, prototypes)
    out = _cosine_head(z, a, gram, eps)  # [B, K+1, N]
    return out.reshape(features.shape[0], a.shape[0], *features.shape[2:])


def cosine_logits(
    features: Tensor, weight: Tensor, prototypes: Tensor, temperature: Tensor | float, eps: float = 1e-6
) -> Tensor:
    """Temperature-scaled cosine logits ``s = (P W z) / (||W z|| * tau)``, never forming ``W z``.

    Computes ``A = P W / tau`` (``[K+1, F]``) and ``G = W^T W`` (``[F, F]``) once, rescales each voxel feature
    by ``1 / ||W z||`` with ``||W z||^2 = z^T G z``, then applies ``A``. Per voxel this is ``F * (K+1+F)``
    multiply-adds instead of ``D * (K+1+F)`` for the naive version, and besides ``z`` only one channel
    (``||W z||^2``) is kept for backward.

    Args:
        features: voxel features ``z`` of shape ``[B, F, *S]``.
        weight: linear projection ``W`` of shape ``[D, F]`` (no bias).
        prototypes: class prototypes ``P`` of shape ``[K+1, D]`` with unit-norm rows (background first).
        temperature: ``tau > 0``, a float or a scalar tensor (gradients flow through a tensor).
        eps: lower bound on ``||W z||``.

    Returns:
        Logits of shape ``[B, K+1, *S]``.

    Raises:
        ValueError: on mismatched shapes or a non-positive / non-scalar temperature.
    """
    _check_shapes(features, weight, prototypes)
    if isinstance(temperature, Tensor):
        if temperature.numel() != 1:
            raise ValueError(
                f"temperature must be a scalar, got a tensor of shape {tuple(temperature.shape)}."
            )
        temperature = temperature.reshape(())
    elif not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}; e.g. 0.07.")
    a, gram, z = _factorised(features, weight, prototypes)
    out = _cosine_head(z, a / temperature, gram, eps)  # tau folded into A: [K+1, F]
    return out.reshape(features.shape[0], a.shape[0], *features.shape[2:])


# ----------------------------------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------------------------------
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


class ProjectionHead(nn.Module):
    """Optional per-voxel nonlinearity followed by a bias-free linear map ``W`` to the embedding width.

    The projection itself is not applied as a layer: :func:`cosine_logits` consumes ``W`` in factorised form.

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


class PrototypeSegmenter(nn.Module):
    """Classifier-free segmenter: backbone -> projection head -> cosine logits against given prototypes.

    Adding a class means passing a longer prototype matrix; no layer changes. The prototype bank is owned by
    the caller (the LightningModule) and passed to :meth:`forward`.

    Args:
        backbone: any module mapping ``[B, C, *S]`` to full-resolution features ``[B, F, *S]``.
        feature_channels: ``F``, channels of the backbone output.
        embed_dim: ``D``, width of the prototypes.
        temperature: ``tau`` (initial value when learnable); logits are cosines divided by ``tau``.
        learnable_temperature: learn ``log(1 / tau)`` (CLIP-style), clamped so that ``tau`` stays in
            ``[0.01, 1]``; otherwise ``tau`` is a fixed buffer.
        hidden_channels: optional per-voxel hidden layer width (see :class:`ProjectionHead`).
        eps: lower bound on ``||W z||``.
    """

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
        super().__init__()
        if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}; e.g. 0.07.")
        self.backbone = backbone
        self.head = ProjectionHead(feature_channels, embed_dim, hidden_channels)
        self.expert_projection: nn.Module | None = None  # per-expert projections (cfseg.continual.experts)
        self.feature_channels = feature_channels
        self.embed_dim = embed_dim
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

    @property
    def weight(self) -> Tensor:
        """The projection ``W`` of shape ``[D, F']`` (the active expert's when experts carry their own)."""
        if self.expert_projection is not None:  # LoRA experts: each expert has its own projection
            return self.expert_projection.weight()
        return self.head.weight

    def features(self, x: Tensor) -> Tensor:
        """Pre-projection voxel features ``[B, F', *S]`` for an image batch ``x`` of shape ``[B, C, *S]``."""
        return self.head.features(self.backbone(x))

    def logits_from_features(self, feats: Tensor, prototypes: Tensor) -> Tensor:
        """Cosine logits ``[B, K+1, *S]`` from features ``[B, F', *S]`` and prototypes ``[K+1, D]``."""
        self._check_prototypes(prototypes)
        return cosine_logits(feats, self.weight, prototypes, self.temperature, self.eps)

    def forward(self, x: Tensor, prototypes: Tensor) -> Tensor:
        """Logits ``[B, K+1, *S]`` for images ``x`` ``[B, C, *S]`` against prototypes ``[K+1, D]``."""
        return self.logits_from_features(self.features(x), prototypes)

    def similarity(self, x: Tensor, prototypes: Tensor) -> Tensor:
        """Cosine similarity maps ``[B, K+1, *S]`` in ``[-1, 1]`` (no temperature)."""
        self._check_prototypes(prototypes)
        return cosine_similarity_maps(self.features(x), self.weight, prototypes, self.eps)

    def _check_prototypes(self, prototypes: Tensor) -> None:
        if prototypes.dim() != 2 or prototypes.shape[1] != self.embed_dim:
            raise ValueError(
                f"prototypes must have shape [K+1, {self.embed_dim}] (embed_dim={self.embed_dim}), got "
                f"{tuple(prototypes.shape)}; was the bank built with a text encoder of another width?"
            )


class SoftmaxSegmenter(nn.Module):
    """Conventional baseline on the same backbone: optional hidden layer, then a ``1x1x1`` conv ``F -> K+1``.

    Args:
        backbone: any module mapping ``[B, C, *S]`` to full-resolution features ``[B, F, *S]``.
        feature_channels: ``F``, channels of the backbone output.
        num_classes: number of output channels (``K+1``, background included).
        hidden_channels: optional per-voxel hidden layer width, as in :class:`ProjectionHead`.
        spatial_dims: 3 for volumes.
    """

    def __init__(
        self,
        backbone: nn.Module,
        feature_channels: int,
        num_classes: int,
        hidden_channels: int | None = None,
        spatial_dims: int = 3,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1 (background included), got {num_classes!r}.")
        self.backbone = backbone
        self.hidden, channels = _hidden_layer(feature_channels, hidden_channels, spatial_dims, nn.GELU)
        self.classifier = _CONV[spatial_dims](channels, num_classes, kernel_size=1, bias=True)
        self.feature_channels = feature_channels
        self.num_classes = num_classes

    def features(self, x: Tensor) -> Tensor:
        """Voxel features ``[B, F', *S]`` (after the optional hidden layer)."""
        return self.hidden(self.backbone(x))

    def logits_from_features(self, feats: Tensor, prototypes: Tensor | None = None) -> Tensor:
        """Logits ``[B, num_classes, *S]``; ``prototypes`` is only checked for its class count."""
        if prototypes is not None and prototypes.shape[0] != self.num_classes:
            raise ValueError(
                f"SoftmaxSegmenter has a fixed classifier for {self.num_classes} classes but got prototypes "
                f"for {prototypes.shape[0]} classes (shape {tuple(prototypes.shape)}); a softmax head cannot "
                "take new classes without a new layer."
            )
        return self.classifier(feats)

    def forward(self, x: Tensor, prototypes: Tensor | None = None) -> Tensor:
        """Logits ``[B, num_classes, *S]``; ``prototypes`` is accepted for a common call signature."""
        return self.logits_from_features(self.features(x), prototypes)


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
