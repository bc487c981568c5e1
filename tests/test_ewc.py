import pytest
import torch
from torch import nn

from cfseg.continual.ewc import EWCState, diagonal_fisher, ewc_penalty, merge_fisher


def tiny(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.ReLU(), nn.Linear(4, 2))


def mse(model, batch):
    x, y = batch
    return ((model(x) - y) ** 2).mean()


def batches(n: int = 2, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(5, 3, generator=g), torch.randn(5, 2, generator=g)) for _ in range(n)]


def test_penalty_zero_at_anchors_and_by_hand():
    lin = nn.Linear(2, 2)
    anchors = {n: p.detach().clone() for n, p in lin.named_parameters()}
    fisher = {"weight": torch.tensor([[1.0, 2.0], [3.0, 4.0]]), "bias": torch.tensor([0.5, 0.0])}
    assert ewc_penalty(lin.named_parameters(), anchors, fisher).item() == 0.0
    with torch.no_grad():
        lin.weight.copy_(anchors["weight"] + torch.tensor([[1.0, 0.0], [0.0, -2.0]]))
        lin.bias.copy_(anchors["bias"] + torch.tensor([2.0, 5.0]))
    pen = ewc_penalty(lin.named_parameters(), anchors, fisher)
    assert pen.dim() == 0
    assert pen.item() == pytest.approx(1 * 1 + 4 * 4 + 0.5 * 4 + 0 * 25)  # sum F (theta - theta*)^2, no 1/2


def test_penalty_gradient_is_2F_delta():
    torch.manual_seed(0)
    lin = nn.Linear(3, 2)
    anchors = {n: p.detach() + torch.randn_like(p) for n, p in lin.named_parameters()}
    fisher = {n: torch.rand_like(p) for n, p in lin.named_parameters()}
    ewc_penalty(lin.named_parameters(), anchors, fisher).backward()
    for n, p in lin.named_parameters():
        torch.testing.assert_close(p.grad, 2 * fisher[n] * (p.detach() - anchors[n]))
        assert anchors[n].grad is None  # anchors are constants


def test_penalty_skips_unknown_names_and_checks_shapes():
    lin = nn.Linear(2, 2)
    anchors = {"weight": lin.weight.detach().clone() - 1}
    fisher = {"weight": torch.ones(2, 2), "bias": torch.ones(2)}  # bias has no anchor: skipped
    assert ewc_penalty(lin.named_parameters(), anchors, fisher).item() == pytest.approx(4.0)
    assert ewc_penalty(lin.named_parameters(), {}, {}).item() == 0.0
    with pytest.raises(ValueError, match="'weight'.*\\(3, 2\\)"):
        ewc_penalty(lin.named_parameters(), {"weight": torch.zeros(3, 2)}, fisher)
    with pytest.raises(ValueError, match="Fisher of parameter 'weight'"):
        ewc_penalty(lin.named_parameters(), anchors, {"weight": torch.ones(4)})


def test_fisher_is_mean_squared_grad():
    model = tiny()
    model.train()
    data = batches(3)
    fisher = diagonal_fisher(model, iter(data), mse, max_batches=2)  # third batch not read
    names = [n for n, _ in model.named_parameters()]
    assert list(fisher) == names
    model.eval()  # the reference: eval mode (dropout off), as diagonal_fisher uses
    params = list(model.parameters())
    ref = [torch.zeros_like(p) for p in params]
    for b in data[:2]:
        for r, g in zip(ref, torch.autograd.grad(mse(model, b), params), strict=True):
            r += g ** 2
    for n, r in zip(names, ref, strict=True):
        f = fisher[n]
        assert f.dtype == torch.float32 and f.device.type == "cpu" and not f.requires_grad
        torch.testing.assert_close(f, r / 2)


def test_fisher_restores_mode_and_leaves_no_grads():
    model = tiny()
    model.train()
    diagonal_fisher(model, batches(), mse, max_batches=5)
    assert model.training and all(m.training for m in model.modules())
    assert all(p.grad is None for p in model.parameters())
    model.eval()
    diagonal_fisher(model, batches(), mse, max_batches=5)
    assert not any(m.training for m in model.modules())
    # existing grads are left as they were
    mse(model, batches()[0]).backward()
    before = [p.grad.clone() for p in model.parameters()]
    diagonal_fisher(model, batches(), mse, max_batches=1)
    assert all(torch.equal(p.grad, b) for p, b in zip(model.parameters(), before, strict=True))


def test_fisher_frozen_unused_and_errors():
    model = tiny()
    model[0].bias.requires_grad_(False)
    extra = nn.Parameter(torch.ones(3))
    model.register_parameter("unused", extra)
    fisher = diagonal_fisher(model, batches(), mse, max_batches=2)
    assert "0.bias" not in fisher and torch.equal(fisher["unused"], torch.zeros(3))
    with pytest.raises(ValueError, match="no batch"):
        diagonal_fisher(model, [], mse, max_batches=2)
    with pytest.raises(ValueError, match="max_batches"):
        diagonal_fisher(model, batches(), mse, max_batches=0)
    model.train()
    with pytest.raises(ValueError, match="0-dim"):
        diagonal_fisher(model, batches(), lambda m, b: m(b[0]), max_batches=1)
    assert model.training  # restored after an error too


def test_merge_fisher():
    old = {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([3.0])}
    new = {"a": torch.tensor([10.0, 20.0]), "c": torch.tensor([5.0])}
    m = merge_fisher(old, new)
    assert set(m) == {"a", "b", "c"}
    assert m["a"].tolist() == [11.0, 22.0] and m["b"].tolist() == [3.0] and m["c"].tolist() == [5.0]
    m = merge_fisher(old, new, old_weight=0.5)
    assert m["a"].tolist() == [10.5, 21.0] and m["b"].tolist() == [1.5]
    assert old["a"].tolist() == [1.0, 2.0] and new["a"].tolist() == [10.0, 20.0]  # inputs untouched
    m = merge_fisher(None, new)
    assert m.keys() == new.keys() and m["a"] is not new["a"] and torch.equal(m["a"], new["a"])
    with pytest.raises(ValueError, match="'a'"):
        merge_fisher({"a": torch.ones(3)}, new)
    with pytest.raises(ValueError, match="old_weight"):
        merge_fisher(old, new, old_weight=-1)


def test_state_consolidate_and_penalty():
    model = tiny()
    f1 = diagonal_fisher(model, batches(), mse, max_batches=2)
    s1 = EWCState.consolidate(model, f1)
    assert s1.penalty(model).item() == 0.0
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)
    expected = sum((f1[n] * 0.01).sum() for n in f1)
    assert s1.penalty(model).item() == pytest.approx(expected.item(), rel=1e-5)
    f2 = diagonal_fisher(model, batches(seed=2), mse, max_batches=2)
    s2 = EWCState.consolidate(model, f2, previous=s1)
    torch.testing.assert_close(s2.fisher["0.weight"], f1["0.weight"] + f2["0.weight"])
    assert s2.penalty(model).item() == 0.0  # anchored at the latest parameters
