"""Factorised cosine logits: the functional core of the prototype head (:class:`cfseg.heads.PrototypeHead`).

The head scores a voxel feature ``z`` (``F`` channels) against fixed unit-norm class prototypes ``P`` (``K+1``
rows of width ``D``, background first) through a linear projection ``W`` (``D x F``)::

    s_k = cos(W z, p_k) / tau = (P W z)_k / (||W z|| * tau)

``D`` is the text-embedding width (512 for CLIP ViT-B/32) and much larger than ``F`` (tens of channels), so
the ``D``-channel embedding map ``W z`` is never built at full resolution. Instead

* the numerator uses ``A = P W`` (``[K+1, F]``, a tiny matrix), and
* the norm uses ``||W z||^2 = z^T G z`` with ``G = W^T W`` (``[F, F]``),

so the per-voxel cost is ``F * (K + 1 + F)`` multiply-adds. A hand-written backward (``_CosineHead``) keeps
only the head's input ``z`` and ``||W z||^2`` (one channel) for backward and works in place where it can, so
the head costs about what a conventional ``1x1x1`` convolution ``F -> K+1`` costs in time and memory
(``benchmarks/head_cost.py`` measures it). ``cosine_head_autograd`` is the same maths through plain autograd, kept as a
reference for tests and benchmarks (swap ``cfseg.cosine._cosine_head`` to use it).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["cosine_logits", "cosine_similarity_maps"]


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


_CHUNK_BYTES = 1 << 20  # the forward's per-chunk scratch: small enough to stay in a core's cache


def chunk_voxels(rows: int, n: int) -> int:
    """Voxels per forward chunk: ``rows`` float32 rows of scratch in about ``_CHUNK_BYTES`` (at least 1024)."""
    return max(1024, min(n, _CHUNK_BYTES // (4 * rows)))


class _CosineHead(torch.autograd.Function):
    """``out = A (z / max(sqrt(z^T G z), eps))`` for features ``z`` ``[B, F, N]``; hand-written backward.

    Saves only ``z`` (the head's input, which any head keeps) and ``||W z||^2`` (one channel). Plain autograd
    would also keep ``G z`` and ``z / ||W z||`` (two more ``F``-channel full-resolution tensors) and allocate
    about six ``F``-channel temporaries in backward. Here the full-resolution allocations are the output (and
    ``||W z||^2``), in backward the input gradient, and one scratch buffer of a single sample's ``F`` channels
    (``[F, N]``): the per-voxel dot products and the weight gradients run sample by sample through it, and
    every other step works in place. On CPU this matters beyond memory: glibc serves blocks above 32 MiB with
    fresh pages, so each full-resolution temporary costs page faults (about 40 ms for 32 MiB on a loaded
    2-core VM) as well as bandwidth. For the same reason the forward runs in chunks of voxels whose scratch
    (about 1 MiB) stays in cache: one product ``[A; sym(G)] z`` gives the numerator and ``G z``, ``z`` is read
    from memory once, and nothing ``F``-channel wide is written at full resolution. (Inference without
    gradients can skip the quadratic form altogether: :mod:`cfseg.folding`.) Half-precision ``z`` (autocast)
    gets its quadratic form in float32 so that it cannot overflow.
    """

    @staticmethod
    def forward(ctx, z: Tensor, a: Tensor, gram: Tensor, eps: float) -> Tensor:  # noqa: D102
        z = z.as_subclass(Tensor)  # backbone features may be MONAI MetaTensors: skip their per-op metadata handling
        cd = torch.float32 if z.dtype in _HALF else z.dtype  # dtype of the quadratic form
        sym = (0.5 * (gram + gram.transpose(0, 1))).to(cd)  # z^T G z = z^T sym(G) z
        stacked = torch.cat([a.to(cd), sym], dim=0)  # [K+1+F, F]: A z and G z from one product
        bsz, f, n = z.shape
        k = a.shape[0]
        out = torch.empty(bsz, k, n, dtype=z.dtype, device=z.device)
        sq = torch.empty(bsz, 1, n, dtype=cd, device=z.device)  # ||W z||^2
        step = chunk_voxels(k + f, n)
        buf = torch.empty(k + f, step, dtype=cd, device=z.device)  # one chunk's [A z; G z]
        for i in range(bsz):
            for s in range(0, n, step):
                e = min(n, s + step)
                zc = z[i, :, s:e].to(cd)  # [F, m], a view unless z is half precision
                y = torch.mm(stacked, zc, out=buf[:, : e - s])
                gz = y[k:].mul_(zc)  # G z * z
                sqc = torch.sum(gz, dim=0, keepdim=True, out=sq[i, :, s:e])
                r = gz[:1].copy_(sqc).clamp_min_(eps * eps).rsqrt_()  # 1 / max(||W z||, eps), in the scratch
                torch.mul(y[:k], r, out=out[i, :, s:e])
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


def cosine_head_fused(z: Tensor, a: Tensor, gram: Tensor, eps: float) -> Tensor:
    """``A @ (z / ||z||_G)`` through :class:`_CosineHead` (its own backward), autocast off."""
    with torch.autocast(device_type=z.device.type, enabled=False):
        return _CosineHead.apply(z, a, gram, eps)


def cosine_head_autograd(z: Tensor, a: Tensor, gram: Tensor, eps: float) -> Tensor:
    """Same maths as :class:`_CosineHead` with plain autograd (reference for tests and benchmarks)."""
    with torch.autocast(device_type=z.device.type, enabled=False):
        zf = z.float() if z.dtype in _HALF else z
        sq = (zf * _left_matmul(gram.to(zf.dtype), zf)).sum(dim=1, keepdim=True)
        inv_norm = sq.clamp_min(eps * eps).rsqrt()
        return _left_matmul(a.to(z.dtype), z * inv_norm.to(z.dtype))


# The implementation used by cosine_logits / cosine_similarity_maps (benchmarks may swap in the reference).
_cosine_head = cosine_head_fused


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
