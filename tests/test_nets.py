"""Tests for cfseg.nets: factorised cosine logits, the two segmenters, and the memory claim."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from cfseg.cosine import cosine_head_autograd, cosine_head_fused  # checked against each other
from cfseg.nets import (
    ProjectionHead,
    PrototypeSegmenter,
    SoftmaxSegmenter,
    cosine_logits,
    cosine_similarity_maps,
    default_backbone,
)


def _orthonormal_rows(n: int, d: int, generator: torch.Generator, dtype=torch.float64) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, n, generator=generator, dtype=dtype))
    return q.T.contiguous()  # [n, d], orthonormal rows


def _naive_logits_numpy(z: np.ndarray, w: np.ndarray, p: np.ndarray, tau: float) -> np.ndarray:
    """Plain reference: materialise W z per voxel, normalise it, dot with each prototype, divide by tau."""
    b, f = z.shape[:2]
    spatial = z.shape[2:]
    zf = z.reshape(b, f, -1)
    e = np.einsum("df,bfn->bdn", w, zf)  # [B, D, N], the full-resolution embedding map
    e = e / np.linalg.norm(e, axis=1, keepdims=True)
    s = np.einsum("kd,bdn->bkn", p, e) / tau
    return s.reshape(b, p.shape[0], *spatial)


def _tiny_backbone(feature_channels: int = 8) -> nn.Module:
    return default_backbone(feature_channels=feature_channels, channels=(4, 8), strides=(2,), num_res_units=1)


# ----------------------------------------------------------------------------------------------------
# Functional core
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spatial", [(6, 5, 4), (7, 3), (9,)])
@pytest.mark.parametrize("orthogonal_w", [True, False])
def test_cosine_logits_matches_naive_reference_float64(spatial, orthogonal_w):
    g = torch.Generator().manual_seed(0)
    b, f, d, k1, tau = 2, 6, 40, 5, 0.07
    z = torch.randn(b, f, *spatial, generator=g, dtype=torch.float64)
    if orthogonal_w:
        w = _orthonormal_rows(f, d, g).T.contiguous()  # [D, F] with orthonormal columns
    else:
        w = torch.randn(d, f, generator=g, dtype=torch.float64) * 0.3 + 0.1
    p = _orthonormal_rows(k1, d, g)
    got = cosine_logits(z, w, p, tau)
    want = _naive_logits_numpy(z.numpy(), w.numpy(), p.numpy(), tau)
    assert got.shape == (b, k1, *spatial)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-5)


def test_cosine_logits_tensor_temperature_equals_similarity_over_tau():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(1, 4, 5, 5, 5, generator=g, dtype=torch.float64)
    w = torch.randn(16, 4, generator=g, dtype=torch.float64)
    p = _orthonormal_rows(3, 16, g)
    tau = torch.tensor(0.2, dtype=torch.float64)
    torch.testing.assert_close(cosine_logits(z, w, p, tau), cosine_similarity_maps(z, w, p) / 0.2)


def test_similarity_maps_bounded_and_reach_one_on_aligned_feature():
    g = torch.Generator().manual_seed(2)
    f, d = 5, 32
    z = torch.randn(2, f, 4, 4, 4, generator=g, dtype=torch.float64) * 10.0
    w = torch.randn(d, f, generator=g, dtype=torch.float64)
    p = _orthonormal_rows(4, d, g)
    # Replace prototype 2 by the direction of W z at one voxel: its cosine must be exactly 1 there.
    e = w @ z[1, :, 3, 0, 2]
    p[2] = e / e.norm()
    s = cosine_similarity_maps(z, w, p)
    assert s.shape == (2, 4, 4, 4, 4)
    assert float(s.abs().max()) <= 1.0 + 1e-12
    assert float(s[1, 2, 3, 0, 2]) == pytest.approx(1.0, abs=1e-12)
    assert float(s[0, 2].max()) < 1.0 - 1e-6  # other voxels are random, not aligned


def test_zero_feature_gives_finite_zero_logits():
    z = torch.zeros(1, 3, 2, 2, 2)
    z[0, :, 1, 1, 1] = torch.tensor([1.0, -2.0, 0.5])
    w = torch.randn(10, 3)
    p = torch.nn.functional.normalize(torch.randn(4, 10), dim=1)
    s = cosine_logits(z, w, p, 0.1)
    assert torch.isfinite(s).all()
    assert torch.all(s[0, :, 0, 0, 0] == 0)
    assert s[0, :, 1, 1, 1].abs().sum() > 0


def test_appending_a_prototype_leaves_old_logits_unchanged():
    g = torch.Generator().manual_seed(3)
    z = torch.randn(1, 6, 4, 4, 4, generator=g)
    w = torch.randn(24, 6, generator=g)
    p = _orthonormal_rows(5, 24, g, dtype=torch.float32)
    old = cosine_logits(z, w, p[:3], 0.07)
    new = cosine_logits(z, w, p, 0.07)
    torch.testing.assert_close(new[:, :3], old)


def test_cosine_logits_rejects_bad_inputs():
    z = torch.randn(1, 4, 3, 3, 3)
    w = torch.randn(8, 4)
    p = torch.randn(3, 8)
    with pytest.raises(ValueError, match="temperature"):
        cosine_logits(z, w, p, 0.0)
    with pytest.raises(ValueError, match="scalar"):
        cosine_logits(z, w, p, torch.ones(3))
    with pytest.raises(ValueError, match="input channels"):
        cosine_logits(z, torch.randn(8, 5), p, 0.1)
    with pytest.raises(ValueError, match="embed_dim"):
        cosine_logits(z, w, torch.randn(3, 9), 0.1)


def test_bfloat16_autocast_keeps_norm_finite_for_large_features():
    g = torch.Generator().manual_seed(4)
    z = torch.randn(1, 16, 4, 4, 4, generator=g) * 1e3  # ||W z||^2 ~ 1e7: fine in fp32
    w = torch.randn(64, 16, generator=g)
    p = _orthonormal_rows(3, 64, g, dtype=torch.float32)
    up = torch.randn(1, 3, 4, 4, 4, generator=g)
    z32, w32 = z.clone().requires_grad_(True), w.clone().requires_grad_(True)
    ref = cosine_similarity_maps(z32, w32, p)
    (ref * up).sum().backward()
    zb, wb = z.bfloat16().requires_grad_(True), w.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = cosine_similarity_maps(zb, wb, p)
    (got.float() * up).sum().backward()
    assert got.dtype == torch.bfloat16 and torch.isfinite(got).all()
    torch.testing.assert_close(got.float(), ref, atol=3e-2, rtol=0)
    assert zb.grad.dtype == torch.bfloat16 and torch.isfinite(zb.grad).all() and torch.isfinite(wb.grad).all()
    rel = (wb.grad - w32.grad).norm() / w32.grad.norm()
    assert rel < 0.05, f"bf16 weight gradient off by {rel:.3f} (relative)"


# ----------------------------------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------------------------------
def _proto_model(learnable: bool, hidden: int | None = None, embed_dim: int = 32) -> PrototypeSegmenter:
    torch.manual_seed(0)
    return PrototypeSegmenter(
        _tiny_backbone(8), 8, embed_dim, temperature=0.1, learnable_temperature=learnable,
        hidden_channels=hidden,
    )


def test_gradients_reach_weight_backbone_and_learnable_temperature():
    model = _proto_model(learnable=True)
    p = _orthonormal_rows(4, 32, torch.Generator().manual_seed(5), dtype=torch.float32)
    x = torch.randn(1, 1, 8, 8, 8)
    target = torch.randint(0, 4, (1, 8, 8, 8))
    loss = nn.functional.cross_entropy(model(x, p), target)
    loss.backward()
    assert isinstance(model.log_logit_scale, nn.Parameter)
    assert model.log_logit_scale.grad is not None and model.log_logit_scale.grad.abs() > 0
    assert model.weight.grad is not None and model.weight.grad.abs().sum() > 0
    backbone_grads = [q.grad for q in model.backbone.parameters()]
    assert all(gr is not None for gr in backbone_grads)
    assert sum(float(gr.abs().sum()) for gr in backbone_grads) > 0
    assert float(model.temperature.detach()) == pytest.approx(0.1, rel=1e-6)


def test_fixed_temperature_is_a_buffer_without_gradient():
    model = _proto_model(learnable=False)
    names = {n for n, _ in model.named_parameters()}
    assert "log_logit_scale" not in names
    assert "log_logit_scale" in dict(model.named_buffers())
    assert "log_logit_scale" in model.state_dict()
    p = _orthonormal_rows(4, 32, torch.Generator().manual_seed(6), dtype=torch.float32)
    model(torch.randn(1, 1, 8, 8, 8), p).sum().backward()
    assert not model.log_logit_scale.requires_grad and model.log_logit_scale.grad is None
    assert model.weight.grad is not None


def test_learnable_temperature_is_clamped():
    model = _proto_model(learnable=True)
    with torch.no_grad():
        model.log_logit_scale.fill_(math.log(1e4))
    assert float(model.temperature.detach()) == pytest.approx(0.01, rel=1e-5)
    with torch.no_grad():
        model.log_logit_scale.fill_(-3.0)
    assert float(model.temperature.detach()) == pytest.approx(1.0, rel=1e-5)
    with pytest.raises(ValueError, match="temperature"):
        PrototypeSegmenter(_tiny_backbone(), 8, 32, temperature=-1.0)


def test_prototype_segmenter_consistency_and_hidden_layer():
    model = _proto_model(learnable=False, hidden=12)
    assert model.weight.shape == (32, 12)
    p = _orthonormal_rows(3, 32, torch.Generator().manual_seed(7), dtype=torch.float32)
    x = torch.randn(2, 1, 8, 8, 8)
    feats = model.features(x)
    assert feats.shape == (2, 12, 8, 8, 8)
    logits = model(x, p)
    torch.testing.assert_close(logits, model.logits_from_features(feats, p))
    sim = model.similarity(x, p)
    assert sim.abs().max() <= 1.0 + 1e-5
    torch.testing.assert_close(logits, sim / 0.1)
    with pytest.raises(ValueError, match="embed_dim=32"):
        model(x, torch.randn(3, 16))


def test_projection_head_identity_and_orthogonal_init():
    head = ProjectionHead(6, 20)
    z = torch.randn(1, 6, 2, 2, 2)
    assert head.features(z) is z
    torch.testing.assert_close(head.weight.T @ head.weight, torch.eye(6), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="hidden_channels"):
        ProjectionHead(6, 20, hidden_channels=0)


@pytest.mark.parametrize("side", [16, 32])
def test_default_backbone_keeps_spatial_shape(side):
    torch.manual_seed(0)
    model = PrototypeSegmenter(default_backbone(feature_channels=8, channels=(4, 8, 8, 8)), 8, 64)
    p = _orthonormal_rows(5, 64, torch.Generator().manual_seed(8), dtype=torch.float32)
    with torch.no_grad():
        out = model(torch.randn(1, 1, side, side, side), p)
    assert out.shape == (1, 5, side, side, side)
    assert torch.isfinite(out).all()


def test_default_backbone_defaults_emit_32_full_resolution_channels():
    with torch.no_grad():
        out = default_backbone()(torch.randn(1, 1, 16, 16, 16))
    assert out.shape == (1, 32, 16, 16, 16)


def test_softmax_segmenter_shape_and_class_count_error():
    torch.manual_seed(0)
    model = SoftmaxSegmenter(_tiny_backbone(8), 8, num_classes=4)
    x = torch.randn(2, 1, 8, 8, 8)
    out = model(x)
    assert out.shape == (2, 4, 8, 8, 8)
    torch.testing.assert_close(model(x, torch.randn(4, 32)), out)
    torch.testing.assert_close(model.logits_from_features(model.features(x)), out)
    with pytest.raises(ValueError, match="4 classes but got prototypes for 5"):
        model(x, torch.randn(5, 32))
    hidden = SoftmaxSegmenter(_tiny_backbone(8), 8, num_classes=3, hidden_channels=5)
    assert hidden.features(x).shape == (2, 5, 8, 8, 8)
    assert hidden(x).shape == (2, 3, 8, 8, 8)


# ----------------------------------------------------------------------------------------------------
# Memory: no D-channel (nor K+1-channel) full-resolution tensor is kept for backward
# ----------------------------------------------------------------------------------------------------
def _saved_channel_counts(fn, n_voxels: int) -> list[float]:
    """Run ``fn``; for each saved tensor with at least ``n_voxels`` elements, return ``numel / n_voxels``.

    Every full-resolution tensor qualifies whatever its layout (autograd may save reshaped views); parameters
    and coarse activations in these tests are smaller than a few channels' worth.
    """
    counts: list[float] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.numel() >= n_voxels:
            counts.append(t.numel() / n_voxels)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return counts


def _naive_logits_torch(z, w, p, tau):
    e = torch.einsum("df,bf...->bd...", w, z)
    return torch.einsum("kd,bd...->bk...", p, nn.functional.normalize(e, dim=1)) / tau


def test_prototype_segmenter_saves_no_d_channel_full_resolution_tensor():
    embed_dim, side = 256, 16  # D far above any backbone width (<= 16 at full resolution here)
    torch.manual_seed(0)
    backbone = default_backbone(feature_channels=8, channels=(4, 8, 16, 16))
    model = PrototypeSegmenter(backbone, 8, embed_dim, learnable_temperature=True)
    p = _orthonormal_rows(6, embed_dim, torch.Generator().manual_seed(9), dtype=torch.float32)
    x = torch.randn(1, 1, side, side, side)
    counts = _saved_channel_counts(lambda: model(x, p), side**3)
    assert len(counts) >= 5  # the hook saw the backbone's full-resolution activations
    assert max(counts) < embed_dim / 4, f"a saved tensor holds {max(counts):.0f} full-resolution channels"

    # The check can fail: the naive head (materialising W z) is caught by the same hook.
    feats = model.features(x)
    naive = _saved_channel_counts(lambda: _naive_logits_torch(feats, model.weight, p, 0.07), side**3)
    assert max(naive) >= embed_dim


def test_cosine_head_keeps_only_its_input_and_one_channel_for_backward():
    """With K+1 > F, the head saves its input ``z`` plus at most one more channel per voxel (1 / ||W z||)."""
    f, d, k1, side = 4, 64, 24, 16  # n = 4096 voxels, more elements than W (256) or P (1536)
    g = torch.Generator().manual_seed(10)
    z = torch.randn(1, f, side, side, side, generator=g, requires_grad=True)
    w = torch.randn(d, f, generator=g, requires_grad=True)
    p = _orthonormal_rows(k1, d, g, dtype=torch.float32)
    tau = torch.tensor(0.07, requires_grad=True)
    n = side**3
    extra: list[float] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.numel() >= n and t.untyped_storage().data_ptr() != z.untyped_storage().data_ptr():
            extra.append(t.numel() / n)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        cosine_logits(z, w, p, tau)
    assert sum(extra) <= 1, f"the head keeps {extra} extra full-resolution channels"
    # The check discriminates: plain autograd on the same factorisation keeps G z and z / ||W z|| as well.
    extra.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        cosine_head_autograd(z.reshape(1, f, -1), p @ w, w.T @ w, 1e-6)
    assert sum(extra) >= 2 * f
    # ... and a head computing (P W z) before dividing by the norm keeps K+1 channels.
    def num_then_divide():
        num = torch.einsum("kf,bf...->bk...", p @ w, z)
        return num / torch.einsum("df,bf...->bd...", w, z).norm(dim=1, keepdim=True)

    assert max(_saved_channel_counts(num_then_divide, n)) >= k1


# ----------------------------------------------------------------------------------------------------
# Hand-written backward
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("f, k1", [(5, 7), (7, 3)])  # both orders of the K+1 vs F shortcut
def test_fused_backward_matches_autograd_of_naive_computation_float64(f, k1):
    g = torch.Generator().manual_seed(11)
    b, d = 2, 24
    z = torch.randn(b, f, 3, 4, 5, generator=g, dtype=torch.float64)
    z[1, :, 2, 3, 4] = 0.0  # one clamped voxel (||W z|| < eps): no NaN, its norm path gets no gradient
    w = torch.randn(d, f, generator=g, dtype=torch.float64)
    p = _orthonormal_rows(k1, d, g)
    tau = torch.tensor(0.1, dtype=torch.float64)
    upstream = torch.randn(b, k1, 3, 4, 5, generator=g, dtype=torch.float64)

    def grads(fn):
        leaves = [t.clone().requires_grad_(True) for t in (z, w, p, tau)]
        (fn(*leaves) * upstream).sum().backward()
        return [t.grad for t in leaves]

    def naive(zz, ww, pp, tt):
        e = torch.einsum("df,bf...->bd...", ww, zz)
        e = e / e.norm(dim=1, keepdim=True).clamp_min(1e-6)
        return torch.einsum("kd,bd...->bk...", pp, e) / tt

    got, want = grads(cosine_logits), grads(naive)
    for name, a_, b_ in zip(("z", "W", "P", "tau"), got, want, strict=True):
        assert torch.isfinite(a_).all(), name
        torch.testing.assert_close(a_, b_, rtol=1e-7, atol=1e-9, msg=f"gradient w.r.t. {name}")


@pytest.mark.parametrize("k1", [2, 4])
def test_fused_head_passes_gradcheck_including_non_symmetric_gram(k1):
    g = torch.Generator().manual_seed(12)
    z = torch.randn(2, 3, 6, generator=g, dtype=torch.float64, requires_grad=True)
    a = torch.randn(k1, 3, generator=g, dtype=torch.float64, requires_grad=True)
    m = torch.randn(3, 3, generator=g, dtype=torch.float64)
    gram = (m @ m.T + 0.3 * torch.randn(3, 3, generator=g, dtype=torch.float64)).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda zz, aa, gg: cosine_head_fused(zz, aa, gg, 1e-6), (z, a, gram))
    torch.testing.assert_close(
        cosine_head_fused(z, a, gram, 1e-6), cosine_head_autograd(z, a, 0.5 * (gram + gram.T), 1e-6)
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_forward_in_voxel_chunks_matches_reference(monkeypatch, dtype):
    """The forward's cache-sized voxel chunks (here 1024 voxels, the last one partial) change nothing."""
    import cfseg.cosine as cosine

    monkeypatch.setattr(cosine, "_CHUNK_BYTES", 1)  # the 1024-voxel minimum chunk
    g = torch.Generator().manual_seed(13)
    b, f, k1, n = 2, 6, 5, 2 * 1024 + 300
    assert cosine.chunk_voxels(k1 + f, n) == 1024
    z = torch.randn(b, f, n, generator=g)
    z[1, :, n - 1] = 0.0  # a clamped voxel in the partial last chunk: similarity 0, not NaN
    a = torch.randn(k1, f, generator=g)
    m = torch.randn(f, f, generator=g)
    gram = m @ m.T
    want = cosine_head_autograd(z, a, gram, 1e-6)
    got = cosine_head_fused(z.to(dtype), a, gram, 1e-6)
    assert got.dtype == dtype and got.shape == (b, k1, n)
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(got.float(), want, **tol)
    assert torch.equal(got[1, :, n - 1].float(), torch.zeros(k1))
    # one whole-sample chunk gives the same numbers as the 1024-voxel chunks
    monkeypatch.setattr(cosine, "_CHUNK_BYTES", 1 << 30)
    same = {"rtol": 1e-6, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 8e-3, "atol": 1e-3}  # bf16: 1 ulp
    torch.testing.assert_close(cosine_head_fused(z.to(dtype), a, gram, 1e-6), got, **same)
