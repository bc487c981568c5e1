"""Tests for cfseg.continual.router: analytic ridge router equals the joint solution, routes, round-trips."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cfseg.continual.router import RidgeRouter, pooled_features, ridge_solution


def stage_data(seed: int = 0, in_features: int = 6) -> list[tuple[torch.Tensor, int]]:
    """Several update calls per expert (3 experts), random data of different sizes and dtypes."""
    g = torch.Generator().manual_seed(seed)
    sizes = [(0, 5), (0, 11), (1, 3), (1, 17), (1, 8), (2, 9), (2, 1)]
    return [(torch.randn(n, in_features, generator=g) * (1 + e), e) for e, n in sizes]


@pytest.mark.parametrize("random_features", [0, 32])
def test_staged_updates_equal_joint_ridge_solution(random_features):
    router = RidgeRouter(6, gamma=0.5, random_features=random_features, seed=3)
    data = stage_data()
    for x, e in data:
        router.update(x, e)
    x_all = torch.cat([x for x, _ in data]).double()
    y_all = F.one_hot(torch.tensor([e for x, e in data for _ in range(len(x))]), 3).double()
    phi = torch.relu(x_all @ router.projection) if random_features else x_all
    phi = torch.cat([phi, torch.ones(len(phi), 1, dtype=torch.float64)], dim=1)
    ref = ridge_solution(phi, y_all, 0.5)
    w = router.solve()
    assert w.shape == (router.feature_dim, 3) == ((random_features or 6) + 1, 3)
    assert w.dtype == torch.float64
    assert (w - ref).abs().max().item() <= 1e-8
    assert router.n_experts == 3 and router.n_samples == [16, 28, 10]
    # ridge_solution against a NumPy closed form
    p, y = phi.numpy(), y_all.numpy()
    ref_np = np.linalg.solve(p.T @ p + 0.5 * np.eye(p.shape[1]), p.T @ y)
    assert np.abs(ref.numpy() - ref_np).max() <= 1e-8


def test_update_order_irrelevant_and_state_round_trip(tmp_path):
    data = stage_data(seed=1)
    a = RidgeRouter(6, gamma=2.0, random_features=16, seed=7)
    for x, e in data:
        a.update(x, e)
    b = RidgeRouter(6, gamma=2.0, random_features=16, seed=7)
    # experts must be introduced in index order; within that, reverse each expert's batches and interleave
    for idx in [1, 0, 4, 3, 2, 6, 5]:
        b.update(*data[idx])
    assert (a.solve() - b.solve()).abs().max().item() <= 1e-10

    path = tmp_path / "router.pt"
    torch.save(a.state(), path)
    torch.manual_seed(123)  # the projection is stored, not regenerated from the global RNG
    c = RidgeRouter.from_state(torch.load(path, weights_only=True))
    probe = torch.randn(40, 6)
    assert torch.equal(c.projection, a.projection)
    assert torch.equal(c.scores(probe), a.scores(probe))
    assert torch.equal(c.predict(probe), a.predict(probe))
    assert (c.n_samples, c.gamma, c.n_experts) == (a.n_samples, a.gamma, a.n_experts)
    # a restored router keeps learning exactly like the original
    a.update(probe[:5], 3)
    c.update(probe[:5], 3)
    assert torch.equal(a.solve(), c.solve())


@pytest.mark.parametrize("random_features", [0, 64])
def test_routes_two_separated_gaussians(random_features):
    g = torch.Generator().manual_seed(0)
    mu = torch.zeros(2, 8)
    mu[0, :4], mu[1, 4:] = 3.0, 3.0

    def draw(e: int, n: int) -> torch.Tensor:
        return mu[e] + torch.randn(n, 8, generator=g)

    router = RidgeRouter(8, gamma=1.0, random_features=random_features)
    router.update(draw(0, 100), 0)
    router.update(draw(1, 100), 1)
    x = torch.cat([draw(0, 200), draw(1, 200)])
    y = torch.cat([torch.zeros(200), torch.ones(200)]).long()
    pred = router.predict(x)
    assert pred.dtype == torch.long and pred.shape == (400,)
    assert (pred == y).float().mean().item() >= 0.98
    assert router.predict_volume(draw(0, 12)) == 0
    assert router.predict_volume(draw(1, 12)) == 1


def test_errors():
    router = RidgeRouter(4)
    with pytest.raises(ValueError, match="no expert yet"):
        router.scores(torch.randn(2, 4))
    with pytest.raises(ValueError, match=r"\[0, 0\].*got 1"):
        router.update(torch.randn(3, 4), 1)
    router.update(torch.randn(3, 4), 0)
    with pytest.raises(ValueError, match=r"\[0, 1\].*got 2"):
        router.update(torch.randn(3, 4), 2)
    with pytest.raises(ValueError, match=r"\[N, 4\], got \(3, 5\)"):
        router.update(torch.randn(3, 5), 0)
    bad = torch.randn(3, 4)
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="1 non-finite"):
        router.update(bad, 0)
    assert router.n_samples == [3]  # nothing half-applied
    with pytest.raises(ValueError, match="gamma"):
        RidgeRouter(4, gamma=0.0)

    state = router.state()
    state["G"] = torch.zeros(4, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"G should be float64 \(5, 5\), got torch.float64 \(4, 4\)"):
        RidgeRouter.from_state(state)
    state = router.state()
    state["n_samples"] = [3, 1]  # two experts claimed, Q has one column
    with pytest.raises(ValueError, match=r"Q should be float64 \(5, 2\)"):
        RidgeRouter.from_state(state)
    with pytest.raises(ValueError, match="needs keys"):
        RidgeRouter.from_state({"G": router.G})


def test_pooled_features_matches_numpy():
    acts = torch.randn(3, 5, 4, 6, 7, dtype=torch.float64) * 2 + 1
    out = pooled_features(acts)
    a = acts.numpy().reshape(3, 5, -1)
    ref = np.concatenate([a.mean(axis=2), a.std(axis=2)], axis=1)  # NumPy std is the population std
    assert out.dtype == torch.float32 and out.shape == (3, 10)
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"\[B, C, \*S\].*\(3, 5\)"):
        pooled_features(torch.randn(3, 5))


def test_modality_router_names_its_columns_and_round_trips():
    from cfseg.continual.router import ModalityRouter
    from cfseg.data.transforms import neutral_view

    g = torch.Generator().manual_seed(0)
    ct, mri = torch.randn(20, 6, generator=g) + 2.0, torch.randn(20, 6, generator=g) - 2.0
    r = ModalityRouter(6, neutral_view((2.0, 2.0, 2.0)).to_dict(), gamma=0.01)
    r.update(ct[:10], "ct")
    r.update(mri[:10], "mri")
    r.update(ct[10:], "ct")  # a known name accumulates into its own column
    assert r.names == ["ct", "mri"] and r.ridge.n_samples == [20, 10]
    assert max(r.scores(ct[:3]).items(), key=lambda kv: kv[1])[0] == "ct"
    assert max(r.scores(mri[10:]).items(), key=lambda kv: kv[1])[0] == "mri"
    back = ModalityRouter.from_state(r.state())
    assert back.names == r.names and back.view == r.view and back.scores(mri) == r.scores(mri)
    bad = r.state()
    bad["names"] = ["ct"]
    with pytest.raises(ValueError, match="2 statistics columns"):
        ModalityRouter.from_state(bad)
    with pytest.raises(ValueError, match="modality 'neutral'"):
        ModalityRouter(6, {"modality": "ct"})
