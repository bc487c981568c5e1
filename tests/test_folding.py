"""The prototype head's normalisation folded into the backbone's output layer (cfseg.folding): same logits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

import cfseg.folding as folding
from cfseg.cosine import cosine_logits
from cfseg.folding import fold, folded_predictor, normalised_logits, output_layer
from cfseg.module import CFSegModule

TINY_BACKBONE = yaml.safe_load((Path(__file__).parent / "configs" / "tiny.yaml").read_text())["model"]["backbone"]
CLASSES = ["liver", "spleen", "kidney_left"]


def _module(backbone=TINY_BACKBONE, **kw) -> CFSegModule:
    torch.manual_seed(0)
    m = CFSegModule(class_names=CLASSES, backbone=backbone, feature_channels=8, roi_size=(16, 16, 16),
                    sw_batch_size=2, **kw)
    with torch.no_grad():  # a trained-looking, non-orthogonal projection (G != I)
        m.net.head.weight.mul_(1 + 0.5 * torch.rand(1, m.net.head.weight.shape[1]))
    return m.eval()


def _unfolded(m: CFSegModule, x: torch.Tensor, idx=None) -> torch.Tensor:
    with torch.no_grad(), pytest.MonkeyPatch.context() as mp:
        mp.setattr("cfseg.module.folded_predictor", lambda *a, **k: None)
        return m.sliding_window_logits(x, idx, "cpu", "cpu")


@pytest.mark.parametrize("idx", [None, [2], [3, 1]])
def test_folded_sliding_windows_give_the_unfolded_logits(idx):
    m = _module()
    x = torch.rand(1, 1, 40, 36, 24, generator=torch.Generator().manual_seed(1))  # 8+ overlapping windows
    want = _unfolded(m, x, idx)
    calls: list[str] = []
    real = folding.FoldedHead.logits
    with torch.no_grad(), pytest.MonkeyPatch.context() as mp:
        mp.setattr(folding.FoldedHead, "logits", lambda self, *a: calls.append("folded") or real(self, *a))
        first = m.sliding_window_logits(x, idx, "cpu", "cpu")  # first window finds the output layer
        again = m.sliding_window_logits(x, idx, "cpu", "cpu")
    assert getattr(m.net.backbone, folding._ATTR) == "model.2.conv"  # the UNet's top ConvTranspose3d
    assert len(calls) > 4, "the folded head did not run"
    for got in (first, again):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        assert torch.equal(got.argmax(1), want.argmax(1))


def test_fold_of_a_conv_layer_is_exact_in_float64():
    g = torch.Generator().manual_seed(2)
    net = nn.Sequential(nn.Conv3d(2, 5, 3, padding=1), nn.ReLU(), nn.Conv3d(5, 4, 1)).double()
    x = torch.randn(2, 2, 6, 5, 4, generator=g, dtype=torch.float64)
    layer, z = output_layer(net, x)
    assert layer == "2"
    before = net[2].weight.detach().clone()
    w = torch.randn(16, 4, generator=g, dtype=torch.float64)
    p = torch.linalg.qr(torch.randn(16, 3, generator=g, dtype=torch.float64))[0].T
    folded = fold(net, layer, w, p @ w / 0.1, 1e-6)
    assert folded is not None
    with torch.no_grad():
        torch.testing.assert_close(folded.logits(net, x), cosine_logits(z, w, p, 0.1), rtol=1e-10, atol=1e-10)
    assert torch.equal(net[2].weight, before)  # the module itself is untouched


def test_no_fold_where_the_output_is_not_a_convolution_or_w_is_ill_conditioned():
    net = nn.Sequential(nn.Conv3d(1, 4, 1), nn.ReLU())
    assert output_layer(net, torch.rand(1, 1, 4, 4, 4))[0] == ""  # an activation after the last convolution
    grouped = nn.Conv3d(4, 4, 1, groups=2)
    assert output_layer(grouped, torch.rand(1, 4, 2, 2, 2))[0] == ""
    conv = nn.Sequential(nn.Conv3d(1, 3, 1))
    w = torch.eye(3)
    w[2, 2] = 1e-3  # cond(W) = 1000 > MAX_CONDITION
    assert fold(conv, "0", w, torch.ones(2, 3), 1e-6) is None
    assert fold(conv, "0", torch.zeros(4, 3), torch.ones(2, 3), 1e-6) is None  # G singular


def test_a_backbone_ending_in_an_activation_runs_unfolded_with_the_same_logits():
    spec = {**TINY_BACKBONE, "init_args": {**TINY_BACKBONE["init_args"], "num_res_units": 1}}  # residual top layer
    m = _module(spec)
    x = torch.rand(1, 1, 24, 20, 16, generator=torch.Generator().manual_seed(3))
    want = _unfolded(m, x)
    with torch.no_grad():
        got = [m.sliding_window_logits(x, None, "cpu", "cpu") for _ in range(2)]
    assert getattr(m.net.backbone, folding._ATTR) == ""
    for g in got:
        torch.testing.assert_close(g, want, rtol=0, atol=0)


def test_training_and_gradients_never_fold():
    m = _module()
    ctx = m.head_context()
    assert folded_predictor(m.net, None, ctx) is None  # gradients enabled
    with torch.no_grad():
        assert folded_predictor(m.net, None, ctx) is not None
        m.train()
        assert folded_predictor(m.net, None, ctx) is None


def test_normalised_logits_chunks_and_clamps(monkeypatch):
    monkeypatch.setattr("cfseg.cosine._CHUNK_BYTES", 1)  # 1024-voxel chunks, the last one partial
    g = torch.Generator().manual_seed(4)
    y = torch.randn(2, 5, 3000, generator=g)
    y[1, :, -1] = 0
    b = torch.randn(3, 5, generator=g)
    want = (b @ y) / y.norm(dim=1, keepdim=True).clamp_min(1e-6)
    got = normalised_logits(y, b, 1e-6)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(got[1, :, -1], torch.zeros(3))
