"""Tests for cfseg.continual.distill: output (MiB), similarity and feature distillation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cfseg.continual.distill import feature_distillation, mib_distillation, similarity_distillation


def np_logsumexp(v: np.ndarray) -> float:
    m = v.max()
    return float(m + np.log(np.exp(v - m).sum()))


def ref_mib(student, teacher, n_old, temperature=1.0, mask=None) -> float:
    s = np.asarray(student, dtype=np.float64) / temperature
    t = np.asarray(teacher, dtype=np.float64) / temperature
    b_size = s.shape[0]
    s = s.reshape(b_size, s.shape[1], -1)
    t = t.reshape(b_size, t.shape[1], -1)
    m = np.ones((b_size, s.shape[2]), bool) if mask is None else np.asarray(mask).reshape(b_size, -1)
    new = list(range(n_old + 1, s.shape[1]))
    losses = []
    for b in range(b_size):
        for v in range(s.shape[2]):
            if not m[b, v]:
                continue
            q = np.exp(t[b, :, v] - np_logsumexp(t[b, :, v]))
            den = np_logsumexp(s[b, :, v])
            total = q[0] * (np_logsumexp(s[b, [0] + new, v]) - den)
            for k in range(1, n_old + 1):
                total += q[k] * (s[b, k, v] - den)
            losses.append(-total)
    return float(np.mean(losses)) if losses else 0.0


# ----------------------------------------------------------------------------------------------------------
# distillation
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("n_old", "k_new", "temperature"), [(2, 4, 1.0), (3, 3, 1.0), (1, 3, 2.5)])
def test_mib_matches_numpy_reference(n_old, k_new, temperature):
    g = torch.Generator().manual_seed(20 + n_old)
    student = torch.randn(2, k_new + 1, 3, 4, generator=g, dtype=torch.float64) * 2
    teacher = torch.randn(2, n_old + 1, 3, 4, generator=g, dtype=torch.float64) * 2
    got = mib_distillation(student, teacher, n_old, temperature=temperature)
    want = ref_mib(student.numpy(), teacher.numpy(), n_old, temperature)
    assert got.item() == pytest.approx(want, rel=1e-10)
    scaled = mib_distillation(student, teacher, n_old, temperature=temperature, scale_by_t2=True)
    assert scaled.item() == pytest.approx(want * temperature**2, rel=1e-10)


def test_mib_mask_matches_reference_and_folding_matters():
    g = torch.Generator().manual_seed(30)
    student = torch.randn(2, 5, 4, 4, generator=g, dtype=torch.float64)
    teacher = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    mask = torch.rand(2, 4, 4, generator=g) < 0.5
    got = mib_distillation(student, teacher, 2, mask=mask)
    want = ref_mib(student.numpy(), teacher.numpy(), 2, mask=mask.numpy())
    assert got.item() == pytest.approx(want, rel=1e-10)
    # plain distillation that drops the new channels instead of folding them into background differs
    plain = -(torch.softmax(teacher, 1) * F.log_softmax(student, 1)[:, :3]).sum(1)[mask].mean()
    assert abs(got.item() - plain.item()) > 1e-2
    assert mib_distillation(student, teacher, 2, mask=torch.zeros_like(mask)).item() == 0.0


def test_mib_identity_case_equals_teacher_entropy():
    g = torch.Generator().manual_seed(31)
    teacher = torch.randn(2, 3, 5, 5, generator=g, dtype=torch.float64) * 3
    student = torch.cat([teacher, torch.full((2, 2, 5, 5), -1e4, dtype=torch.float64)], dim=1)
    q = torch.softmax(teacher, 1)
    entropy = -(q * F.log_softmax(teacher, 1)).sum(1).mean()
    assert mib_distillation(student, teacher, 2).item() == pytest.approx(entropy.item(), rel=1e-10)
    # a student that differs pays more (KL >= 0)
    assert mib_distillation(student + torch.randn(student.shape, generator=g).double(), teacher, 2) > entropy


def test_mib_gradcheck_and_teacher_is_constant():
    g = torch.Generator().manual_seed(32)
    student = torch.randn(1, 4, 2, 2, generator=g, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(1, 2, 2, 2, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda s: mib_distillation(s, teacher, 1, temperature=2.0), (student,))
    mib_distillation(student, teacher, 1).backward()
    assert teacher.grad is None
    assert torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0


def test_similarity_distillation():
    g = torch.Generator().manual_seed(40)
    student = torch.randn(2, 5, 3, 3, generator=g, dtype=torch.float64)
    teacher = torch.randn(2, 3, 3, 3, generator=g, dtype=torch.float64)
    mask = torch.rand(2, 3, 3, generator=g) < 0.6
    s, t, m = student.numpy(), teacher.numpy(), mask.numpy()
    want = np.mean([(s[b, :3, i, j] - t[b, :, i, j]) ** 2 for b, i, j in zip(*np.nonzero(m), strict=True)])
    got = similarity_distillation(student, teacher, mask=mask)
    assert got.item() == pytest.approx(float(want), rel=1e-10)
    assert similarity_distillation(student, teacher).item() == pytest.approx(
        float(((s[:, :3] - t) ** 2).mean()), rel=1e-10
    )
    assert similarity_distillation(teacher, teacher).item() == 0.0


@pytest.mark.parametrize("normalize", [False, True])
def test_feature_distillation(normalize):
    g = torch.Generator().manual_seed(41)
    student = torch.randn(2, 6, 3, 2, generator=g, dtype=torch.float64)
    teacher = torch.randn(2, 6, 3, 2, generator=g, dtype=torch.float64)
    s, t = student.numpy(), teacher.numpy()
    if normalize:
        s = s / np.linalg.norm(s, axis=1, keepdims=True)
        t = t / np.linalg.norm(t, axis=1, keepdims=True)
    got = feature_distillation(student, teacher, normalize=normalize)
    assert got.item() == pytest.approx(float(((s - t) ** 2).mean()), rel=1e-10)
    # normalisation makes the term invariant to per-voxel scale of the student
    scaled = feature_distillation(student * 3.0, teacher, normalize=normalize)
    assert (scaled.item() == pytest.approx(got.item(), rel=1e-10)) is normalize


def test_mib_extreme_logits_are_finite():
    g = torch.Generator().manual_seed(9)
    logits = torch.sign(torch.randn(2, 5, 3, 4, 5, generator=g)) * 1e4
    s = logits.clone().requires_grad_(True)
    mib = mib_distillation(s, -logits[:, :3], n_old=2)
    mib.backward()
    assert torch.isfinite(mib) and torch.isfinite(s.grad).all()


def test_distillation_shape_errors():
    student = torch.randn(2, 5, 3, 3)
    with pytest.raises(ValueError, match=r"n_old=2 needs 3 channels"):
        mib_distillation(student, torch.randn(2, 4, 3, 3), n_old=2)
    with pytest.raises(ValueError, match=r"\(2, 5, 3, 3\).*\(2, 3, 3, 4\)"):
        mib_distillation(student, torch.randn(2, 3, 3, 4), n_old=2)
    with pytest.raises(ValueError, match=r"fewer channels"):
        mib_distillation(torch.randn(2, 2, 3, 3), torch.randn(2, 3, 3, 3), n_old=2)
    with pytest.raises(ValueError, match=r"mask has shape \(2, 3\)"):
        mib_distillation(student, torch.randn(2, 3, 3, 3), n_old=2, mask=torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="temperature"):
        mib_distillation(student, torch.randn(2, 3, 3, 3), n_old=2, temperature=0.0)
    with pytest.raises(ValueError, match=r"\(2, 2, 3, 3\).*\(2, 3, 3, 3\)"):
        similarity_distillation(torch.randn(2, 2, 3, 3), torch.randn(2, 3, 3, 3))
    with pytest.raises(ValueError, match=r"\(2, 4, 3, 3\).*\(2, 5, 3, 3\)"):
        feature_distillation(torch.randn(2, 4, 3, 3), torch.randn(2, 5, 3, 3))
