"""Tests for cfseg.continual.distill (output (MiB), similarity, feature, pseudo-label (PLOP)) and
cfseg.continual.pod (Local POD)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cfseg.continual.distill import (
    entropy_histogram,
    feature_distillation,
    median_thresholds,
    mib_distillation,
    normalized_entropy,
    pseudo_dice_labels,
    pseudo_label,
    similarity_distillation,
)
from cfseg.continual.pod import DEFAULT_POD_LAYERS, capture_activations, local_pod, resolve_layers


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


# ----------------------------------------------------------------------------------------------------------
# pseudo-labels (PLOP)
# ----------------------------------------------------------------------------------------------------------


def teacher_logits_for(classes: torch.Tensor, n_classes: int, confidence: torch.Tensor) -> torch.Tensor:
    """Logits [B, C, *S] whose argmax is ``classes`` [B, *S], sharper where ``confidence`` is larger."""
    onehot = F.one_hot(classes, n_classes).movedim(-1, 1).double()
    return onehot * confidence.unsqueeze(1).double()


def test_normalized_entropy_range():
    assert normalized_entropy(torch.zeros(1, 4, 3)).allclose(torch.ones(1, 3))
    assert normalized_entropy(torch.tensor([[[100.0], [0.0]]])).item() < 1e-6
    with pytest.raises(ValueError, match="at least 2 channels"):
        normalized_entropy(torch.zeros(1, 1, 3))


def test_pseudo_label_hand_made_case():
    # 1 case, 6 voxels; student knows bg + 2 old + 1 new class (3); teacher knows bg + 2 old
    target = torch.tensor([[0, 0, 0, 3, 0, 0]])
    annotated = torch.tensor([[True, False, False, True]])
    t_cls = torch.tensor([[1, 2, 1, 1, 0, 2]])
    conf = torch.tensor([[20.0, 20.0, 0.5, 20.0, 20.0, 0.5]])  # voxels 2 and 5 uncertain
    logits = teacher_logits_for(t_cls, 3, conf)
    thresholds = torch.tensor([0.5, 0.5, 0.5])
    before = (target.clone(), annotated.clone())
    new_t, new_a = pseudo_label(target, annotated, logits, thresholds)
    assert new_t.tolist() == [[1, 2, 0, 3, 0, 0]]  # confident old classes on label-0 voxels only
    assert new_a.tolist() == [[True, True, True, True]]
    assert torch.equal(target, before[0]) and torch.equal(annotated, before[1])  # inputs untouched
    # PLOP's ignore of uncertain label-0 voxels in a case that gained classes
    ign_t, _ = pseudo_label(target, annotated, logits, thresholds, ignore_index=-1)
    assert ign_t.tolist() == [[1, 2, -1, 3, 0, -1]]
    # the new-class voxel is never changed, even where the teacher is sure of an old class
    assert (new_t[target == 3] == 3).all() and (ign_t[target == 3] == 3).all()


def test_pseudo_label_respects_thresholds():
    target = torch.zeros(1, 4, dtype=torch.long)
    annotated = torch.tensor([[True, False, False]])
    t_cls = torch.tensor([[1, 1, 2, 2]])
    logits = teacher_logits_for(t_cls, 3, torch.tensor([[2.0, 8.0, 2.0, 8.0]]))
    ent = normalized_entropy(logits)[0]
    # class 1's threshold between the two entropies, class 2's below both
    thr = torch.tensor([1.0, float(ent[:2].mean()), float(ent[3]) / 2])
    new_t, new_a = pseudo_label(target, annotated, logits, thr)
    assert new_t.tolist() == [[0, 1, 0, 0]]
    assert new_a.tolist() == [[True, True, False]]  # class 2 gained nothing: stays unannotated
    # thresholds of 0 label nothing, and then nothing is ignored either
    t0, a0 = pseudo_label(target, annotated, logits, torch.zeros(3), ignore_index=-1)
    assert torch.equal(t0, target) and torch.equal(a0, annotated)


def test_pseudo_label_keeps_background_of_an_annotated_old_class():
    """Where old class 1 is annotated in a case, its label-0 voxels are true background for it: never relabelled."""
    target = torch.zeros(2, 3, dtype=torch.long)
    annotated = torch.tensor([[True, True, False], [True, False, False]])
    logits = teacher_logits_for(torch.ones(2, 3, dtype=torch.long), 3, torch.full((2, 3), 30.0))
    new_t, new_a = pseudo_label(target, annotated, logits, torch.full((3,), 0.5), ignore_index=-1)
    assert new_t[0].tolist() == [0, 0, 0] and new_t[1].tolist() == [1, 1, 1]
    assert new_a.tolist() == [[True, True, False], [True, True, False]]
    assert not new_a[:, 0].logical_not().any()  # background column stays as it was (True), never "gained"


def test_pseudo_dice_labels_keep_only_the_pseudo_labelled_classes():
    """The separate Dice sees the classes the teacher added to a case, with every other label as 0."""
    target = torch.tensor([[0, 0, 0, 3, 0, 0]])
    annotated = torch.tensor([[True, False, False, True]])
    logits = teacher_logits_for(torch.tensor([[1, 2, 1, 1, 0, 2]]), 3,
                                torch.tensor([[20.0, 20.0, 0.5, 20.0, 20.0, 0.5]]))
    pt, pa = pseudo_label(target, annotated, logits, torch.full((3,), 0.5), ignore_index=-1)
    t, a = pseudo_dice_labels(pt, pa, annotated, ignore_index=-1)
    assert pt.tolist() == [[1, 2, -1, 3, 0, -1]]
    assert a.tolist() == [[True, True, True, False]]  # classes 1 and 2 were pseudo-labelled; the stage's 3 is not
    assert t.tolist() == [[1, 2, -1, 0, 0, -1]]  # the new class's voxel is "not 1, not 2"; ignored stays ignored
    # a case that gained nothing has no pair in the term; no ignore_index: nothing is ignored
    t2, a2 = pseudo_dice_labels(target, annotated, annotated)
    assert a2.tolist() == [[True, False, False, False]] and t2.tolist() == [[0] * 6]
    with pytest.raises(ValueError, match="one shape"):
        pseudo_dice_labels(pt, pa, annotated[:, :3])


def test_pseudo_label_errors():
    target = torch.zeros(1, 4, dtype=torch.long)
    ann = torch.tensor([[True, False, False]])
    logits = torch.randn(1, 3, 4)
    with pytest.raises(ValueError, match=r"thresholds must have shape \[3\]"):
        pseudo_label(target, ann, logits, torch.zeros(2))
    with pytest.raises(ValueError, match=r"target has shape \(1, 5\)"):
        pseudo_label(torch.zeros(1, 5, dtype=torch.long), ann, logits, torch.zeros(3))
    with pytest.raises(ValueError, match="annotated must be bool"):
        pseudo_label(target, ann[:, :2], logits, torch.zeros(3))
    with pytest.raises(ValueError, match="integer"):
        pseudo_label(target.float(), ann, logits, torch.zeros(3))


def test_entropy_histogram_and_median_thresholds():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 40, 50, generator=g, dtype=torch.float64) * 3
    target = torch.zeros(2, 40, 50, dtype=torch.long)
    target[:, :10] = 4  # labelled voxels do not count
    hist = entropy_histogram(logits, target, bins=1000)
    assert hist.shape == (3, 1000) and hist.sum() == (target == 0).sum()
    thr = median_thresholds(hist, floor=0.0)
    ent, cls = normalized_entropy(logits), logits.argmax(1)
    keep = target == 0
    for c in range(3):
        values = ent[keep & (cls == c)].numpy()
        assert thr[c].item() == pytest.approx(float(np.median(values)), abs=2e-3)
    assert torch.equal(median_thresholds(hist, floor=0.9), torch.full((3,), 0.9))  # floor
    assert (median_thresholds(hist, floor=0.0, cap=0.01) == 0.01).all()  # cap
    empty = hist.clone()
    empty[1] = 0
    assert median_thresholds(empty, floor=0.001)[1].item() == pytest.approx(0.001)  # never predicted -> floor
    with pytest.raises(ValueError, match="floor <= cap"):
        median_thresholds(hist, floor=0.5, cap=0.1)


# ----------------------------------------------------------------------------------------------------------
# Local POD
# ----------------------------------------------------------------------------------------------------------


def pod_maps(seed: int, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 4, 8, 8, 8, generator=g, dtype=dtype), torch.randn(2, 6, 4, 4, 4, generator=g, dtype=dtype)]


def test_local_pod_zero_for_identical_features_with_finite_gradients():
    feats = [f.requires_grad_(True) for f in pod_maps(0)]
    loss = local_pod(feats, [f.detach().clone() for f in feats])
    loss.backward()
    assert loss.item() == 0.0
    assert all(torch.isfinite(f.grad).all() for f in feats)  # the first step of a stage: student == teacher


def test_local_pod_positive_and_differentiable():
    s, t = pod_maps(1), pod_maps(2)
    assert local_pod(s, t).item() > 0.1
    small = [x[:1, :2, :4, :4, :4].clone().requires_grad_(True) for x in s]
    target = [x[:1, :2, :4, :4, :4] for x in t]
    assert torch.autograd.gradcheck(lambda a, b: local_pod([a, b], target), tuple(small))
    for square, normalize in [(False, False), (True, False), (False, True)]:
        assert local_pod(s, t, square=square, normalize=normalize).item() > 0
    assert local_pod(s, t).item() <= 2.0  # normalised window embeddings: distance <= 2


def test_local_pod_is_not_fooled():
    t = pod_maps(3)
    scaled = [1.5 * x for x in t]
    permuted = [x[:, torch.randperm(x.shape[1], generator=torch.Generator().manual_seed(0))] for x in t]
    flipped = [x.flip(2) for x in t]
    noisy = [x + 0.1 * torch.randn_like(x) for x in t]
    scaled_loss = local_pod(scaled, t).item()
    assert scaled_loss < 1e-6  # per-window normalisation: a global rescale is not a change of what is seen
    assert local_pod(noisy, t).item() < local_pod(permuted, t).item()
    assert local_pod(flipped, t).item() > 0.05  # spatial layout matters (per-axis profiles, local windows)
    # without normalisation a scaled copy costs something, still less than a permutation of the channels
    raw = {k: local_pod(v, t, normalize=False).item() for k, v in {"scaled": [1.1 * x for x in t],
                                                                    "permuted": permuted}.items()}
    assert 0 < raw["scaled"] < raw["permuted"]


def test_local_pod_scales_larger_than_a_side_are_skipped_and_half_inputs_work():
    s = [torch.randn(1, 3, 2, 2, 2)]
    t = [torch.randn(1, 3, 2, 2, 2)]
    assert local_pod(s, t, scales=(1, 2, 4)).item() == pytest.approx(local_pod(s, t, scales=(1, 2)).item())
    bf = local_pod([x.bfloat16() for x in s], [x.bfloat16() for x in t])
    assert bf.dtype == torch.float32 and torch.isfinite(bf)


def test_local_pod_errors():
    a = pod_maps(4)
    with pytest.raises(ValueError, match="same non-zero number"):
        local_pod(a, a[:1])
    with pytest.raises(ValueError, match=r"student_feats\[1\] has shape \(2, 6, 4, 4, 4\)"):
        local_pod(a, [a[0], a[1][:, :5]])
    with pytest.raises(ValueError, match="scales"):
        local_pod(a, a, scales=(0,))


def test_default_pod_layers_on_monai_unet_and_capture():
    from monai.networks.nets import UNet

    net = UNet(spatial_dims=3, in_channels=1, out_channels=8, channels=(8, 16, 32), strides=(2, 2), num_res_units=1)
    names = resolve_layers(net, DEFAULT_POD_LAYERS)
    assert names == ["model.0", "model.1.submodule.0", "model.1.submodule.2", "model.2"]  # 1/2, 1/4, 1/2, 1
    with capture_activations(net, names) as acts:
        out = net(torch.randn(1, 1, 16, 16, 16))
    assert [tuple(a.shape[1:]) for a in acts] == [(8, 8, 8, 8), (16, 4, 4, 4), (8, 8, 8, 8), (8, 16, 16, 16)]
    assert torch.equal(acts[-1], out)  # the last decoder block is the network's output
    assert not any(m._forward_hooks for m in net.modules())  # hooks removed
    with pytest.raises(ValueError, match="matches no module"):
        resolve_layers(net, ["encoder.*"])
    with pytest.raises(ValueError, match="not a regular expression"):
        resolve_layers(net, ["model.(0"])


@pytest.mark.parametrize("shape", [(2, 3, 8, 8, 8), (2, 3, 16, 8, 4), (1, 2, 8, 12)])
def test_local_pod_fast_path_equals_per_scale_windows(shape):
    from cfseg.continual import pod

    x = torch.randn(*shape, dtype=torch.float64)
    fast = pod._pod_embeddings_nested(x, (1, 2, 4), True, 1e-8)
    slow = [pod._pod_embedding(x, s, True, 1e-8) for s in (1, 2, 4)]
    assert all(torch.allclose(a, b) for a, b in zip(fast, slow, strict=True))
    # a side not divisible by 4 takes the per-scale path (remainders dropped)
    odd = torch.randn(1, 2, 9, 8, 8, dtype=torch.float64)
    assert pod._pod_all_scales(odd, (1, 2, 4), True, 1e-8)[2].shape == (1, 64, 2 * (2 + 2 + 2))
