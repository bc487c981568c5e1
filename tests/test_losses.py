"""Tests for cfseg.losses against plain NumPy (float64) references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cfseg.losses import (
    merged_background_log_probs,
    partial_dice_loss,
    partial_label_ce,
    partial_label_loss,
)

# ----------------------------------------------------------------------------------------------------------
# NumPy references (loops over voxels / pairs; float64)
# ----------------------------------------------------------------------------------------------------------


def np_log_softmax(x: np.ndarray, axis: int) -> np.ndarray:
    m = x.max(axis=axis, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=axis, keepdims=True))


def np_logsumexp(v: np.ndarray) -> float:
    m = v.max()
    return float(m + np.log(np.exp(v - m).sum()))


def ref_partial_ce(logits, target, annotated, ignore_index=None) -> float:
    logits = np.asarray(logits, dtype=np.float64)
    b_size, n_cls = logits.shape[:2]
    logp = np_log_softmax(logits, axis=1).reshape(b_size, n_cls, -1)
    tgt = np.asarray(target).reshape(b_size, -1)
    losses = []
    for b in range(b_size):
        merge = [0] + [j for j in range(1, n_cls) if not annotated[b][j]]
        for v in range(tgt.shape[1]):
            k = int(tgt[b, v])
            if ignore_index is not None and k == ignore_index:
                continue
            if k > 0:
                losses.append(-logp[b, k, v])
            else:
                losses.append(-np_logsumexp(logp[b, merge, v]))
    return float(np.mean(losses)) if losses else 0.0


def ref_partial_dice(logits, target, annotated, smooth=1e-5, ignore_index=None) -> float:
    logits = np.asarray(logits, dtype=np.float64)
    b_size, n_cls = logits.shape[:2]
    probs = np.exp(np_log_softmax(logits, axis=1)).reshape(b_size, n_cls, -1)
    tgt = np.asarray(target).reshape(b_size, -1)
    dices = []
    for b in range(b_size):
        keep = np.ones(tgt.shape[1], bool) if ignore_index is None else tgt[b] != ignore_index
        for k in range(1, n_cls):
            if not annotated[b][k]:
                continue
            p = probs[b, k][keep]
            g = (tgt[b][keep] == k).astype(np.float64)
            dices.append((2 * (p * g).sum() + smooth) / (p.sum() + g.sum() + smooth))
    return 1.0 - float(np.mean(dices)) if dices else 0.0


# ----------------------------------------------------------------------------------------------------------
# fixtures
# ----------------------------------------------------------------------------------------------------------


def make_case(seed: int, b: int = 2, k: int = 4, spatial=(3, 4, 5), scale: float = 2.0, dtype=torch.float64):
    """Random logits, a random partial annotation per sample and labels consistent with it."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, k + 1, *spatial, generator=g, dtype=dtype) * scale
    annotated = torch.rand(b, k + 1, generator=g) < 0.5
    annotated[:, 0] = True
    annotated[0, 1] = True  # at least one annotated foreground class in sample 0 ...
    annotated[1, 1] = False  # ... and at least one unannotated class in sample 1
    target = torch.zeros(b, *spatial, dtype=torch.long)
    for i in range(b):
        classes = annotated[i].nonzero().flatten()
        idx = torch.randint(len(classes), spatial, generator=g)
        target[i] = classes[idx]
    return logits, target, annotated


# ----------------------------------------------------------------------------------------------------------
# partial cross-entropy
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_partial_ce_matches_numpy_reference(seed):
    logits, target, annotated = make_case(seed)
    got = partial_label_ce(logits, target, annotated)
    want = ref_partial_ce(logits.numpy(), target.numpy(), annotated.numpy())
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(want, rel=1e-10, abs=1e-12)


def test_marginal_term_changes_the_result_vs_plain_ce():
    logits, target, annotated = make_case(3)
    annotated[:] = False
    annotated[:, 0] = True
    annotated[:, 2] = True  # only class 2 annotated: classes 1, 3, 4 merge into background
    target = torch.where(torch.rand(target.shape, generator=torch.Generator().manual_seed(0)) < 0.3, 2, 0)
    assert (target == 0).any()
    partial = partial_label_ce(logits, target, annotated).item()
    plain = F.cross_entropy(logits, target).item()
    want = ref_partial_ce(logits.numpy(), target.numpy(), annotated.numpy())
    assert partial == pytest.approx(want, rel=1e-10)
    # merging adds probability mass to the background term, so the partial loss is strictly smaller
    assert partial < plain - 0.1


def test_all_annotated_equals_torch_cross_entropy():
    logits, target, annotated = make_case(4, k=3)
    annotated[:] = True
    g = torch.Generator().manual_seed(1)
    target = torch.randint(0, 4, target.shape, generator=g)
    got = partial_label_ce(logits, target, annotated)
    assert torch.allclose(got, F.cross_entropy(logits, target), rtol=1e-12, atol=1e-12)
    # also with an ignore label in float32
    target[0, 0] = 255
    target[1, :, 1] = 255
    got = partial_label_ce(logits.float(), target, annotated, ignore_index=255)
    want = F.cross_entropy(logits.float(), target, ignore_index=255)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)


def test_swapping_unannotated_channels_changes_nothing_but_swapping_annotated_does():
    logits, target, annotated = make_case(5, k=4)
    annotated[:] = torch.tensor([True, True, True, False, False])  # classes 3 and 4 unannotated everywhere
    target = target.clamp(max=2)
    swapped = logits.clone()
    swapped[:, [3, 4]] = logits[:, [4, 3]]
    ce, ce_sw = partial_label_ce(logits, target, annotated), partial_label_ce(swapped, target, annotated)
    dice, dice_sw = (
        partial_dice_loss(logits, target, annotated),
        partial_dice_loss(swapped, target, annotated),
    )
    assert ce.item() == pytest.approx(ce_sw.item(), rel=1e-12)
    assert dice.item() == pytest.approx(dice_sw.item(), rel=1e-12)
    # controls, so the checks above can fail: with class 3 annotated, the swap moves mass between the merged
    # background (p_0 + p_4) and class 3 and so changes the CE; once classes 3 and 4 are annotated and
    # present, their Dice enters and changes with the swap
    ann_3 = annotated.clone()
    ann_3[:, 3] = True
    assert abs(partial_label_ce(logits, target, ann_3) - partial_label_ce(swapped, target, ann_3)) > 1e-3
    ann_all = torch.ones_like(annotated)
    target_all = target.clone()
    target_all[:, 0] = 3
    target_all[:, 1] = 4
    dice_all = partial_dice_loss(logits, target_all, ann_all)
    assert abs(dice_all - partial_dice_loss(swapped, target_all, ann_all)) > 1e-3


def test_merged_background_log_probs():
    logits, _, annotated = make_case(6)
    out = merged_background_log_probs(logits, annotated)
    assert out.shape == logits.shape
    # a distribution over {merged background} U annotated classes
    assert torch.allclose(out.exp().sum(1), torch.ones(()).double(), atol=1e-12)
    unann = ~annotated
    unann[:, 0] = False
    for b in range(logits.shape[0]):
        for k in range(1, logits.shape[1]):
            if unann[b, k]:
                assert torch.isneginf(out[b, k]).all()
            else:
                assert torch.allclose(out[b, k], F.log_softmax(logits, 1)[b, k])


def test_partial_ce_ignore_index():
    logits, target, annotated = make_case(7)
    g = torch.Generator().manual_seed(2)
    ignore = torch.rand(target.shape, generator=g) < 0.3
    target = torch.where(ignore, -1, target)
    got = partial_label_ce(logits, target, annotated, ignore_index=-1)
    want = ref_partial_ce(logits.numpy(), target.numpy(), annotated.numpy(), ignore_index=-1)
    assert got.item() == pytest.approx(want, rel=1e-10)
    # logits at ignored voxels do not matter
    perturbed = logits.clone()
    perturbed[ignore.unsqueeze(1).expand_as(logits)] += 100.0
    assert partial_label_ce(perturbed, target, annotated, ignore_index=-1).item() == pytest.approx(
        got.item(), rel=1e-12
    )
    # everything ignored: zero loss, gradient still defined
    x = logits.clone().requires_grad_(True)
    loss = partial_label_loss(x, torch.full_like(target, -1), annotated, ignore_index=-1)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.isfinite(x.grad).all()


def test_gradcheck_partial_ce_and_loss():
    logits, target, annotated = make_case(8, b=2, k=3, spatial=(2, 2))
    x = logits.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda z: partial_label_ce(z, target, annotated), (x,))
    assert torch.autograd.gradcheck(lambda z: partial_label_loss(z, target, annotated), (x,))


def test_extreme_logits_are_finite():
    logits, target, annotated = make_case(9, scale=1.0, dtype=torch.float32)
    logits = torch.sign(logits) * 1e4
    x = logits.clone().requires_grad_(True)
    loss = partial_label_loss(x, target, annotated)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(x.grad).all()
    # a confidently wrong voxel costs about 2e4, not inf
    assert 0 < partial_label_ce(x, target, annotated).item() < 1e5


# ----------------------------------------------------------------------------------------------------------
# partial Dice
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [10, 11])
def test_partial_dice_matches_numpy_reference(seed):
    logits, target, annotated = make_case(seed)
    got = partial_dice_loss(logits, target, annotated)
    want = ref_partial_dice(logits.numpy(), target.numpy(), annotated.numpy())
    assert got.item() == pytest.approx(want, rel=1e-10)
    # with an ignore label and a larger smooth term
    target[:, 0] = 99
    got = partial_dice_loss(logits, target, annotated, smooth=0.5, ignore_index=99)
    want = ref_partial_dice(logits.numpy(), target.numpy(), annotated.numpy(), smooth=0.5, ignore_index=99)
    assert got.item() == pytest.approx(want, rel=1e-10)


def test_partial_dice_leaves_out_unannotated_classes():
    logits, target, annotated = make_case(12, k=3)
    annotated[:] = torch.tensor([True, True, True, False])
    target = target.clamp(max=2)
    logits += 4.0 * F.one_hot(target, 4).movedim(-1, 1)  # annotated classes predicted fairly well
    logits[:, 3] += 3.0  # unannotated class 3 predicted with large soft mass (its Dice would be ~0)
    got = partial_dice_loss(logits, target, annotated).item()
    want = ref_partial_dice(logits.numpy(), target.numpy(), annotated.numpy())
    counting_3 = ref_partial_dice(logits.numpy(), target.numpy(), np.ones_like(annotated.numpy()))
    assert got == pytest.approx(want, rel=1e-10)
    assert counting_3 > got + 0.1


def test_partial_dice_no_annotated_pair_is_zero():
    logits, target, annotated = make_case(13)
    annotated[:] = False
    x = logits.clone().requires_grad_(True)
    loss = partial_dice_loss(x, torch.zeros_like(target), annotated)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.isfinite(x.grad).all()


def test_partial_dice_perfect_prediction_and_empty_class():
    target = torch.zeros(1, 4, 4, dtype=torch.long)
    target[0, :2] = 1  # class 1 present, class 2 annotated but absent
    logits = F.one_hot(target, 3).movedim(-1, 1).double() * 60.0
    annotated = torch.ones(1, 3, dtype=torch.bool)
    # class 1 overlaps perfectly; absent class 2 has predicted mass ~1e-25 << smooth, so its Dice is ~1
    assert partial_dice_loss(logits, target, annotated, smooth=1e-5).item() < 1e-6
    # an annotated-but-absent class with visible predicted mass is penalised (Dice ~ smooth / mass ~ 0)
    logits[:, 2, 3] = 60.0
    assert partial_dice_loss(logits, target, annotated, smooth=1e-5).item() > 0.45


def test_all_annotated_dice_equals_monai_diceloss():
    from monai.losses import DiceLoss

    logits, _, annotated = make_case(14, k=3, dtype=torch.float32)
    annotated[:] = True
    target = torch.randint(0, 4, (2, 3, 4, 5), generator=torch.Generator().manual_seed(3))
    monai_loss = DiceLoss(
        include_background=False, to_onehot_y=True, softmax=True, smooth_nr=1e-5, smooth_dr=1e-5
    )
    want = monai_loss(logits, target.unsqueeze(1))
    assert torch.allclose(partial_dice_loss(logits, target, annotated), want, rtol=1e-5, atol=1e-6)


def test_partial_label_loss_is_weighted_sum():
    logits, target, annotated = make_case(15)
    ce = partial_label_ce(logits, target, annotated)
    dice = partial_dice_loss(logits, target, annotated)
    got = partial_label_loss(logits, target, annotated, ce_weight=0.3, dice_weight=2.0)
    assert got.item() == pytest.approx(0.3 * ce.item() + 2.0 * dice.item(), rel=1e-12)
    with pytest.raises(ValueError, match="ce_weight=-1"):
        partial_label_loss(logits, target, annotated, ce_weight=-1)


# ----------------------------------------------------------------------------------------------------------
# validation and error messages
# ----------------------------------------------------------------------------------------------------------


def test_unannotated_label_is_an_error_naming_the_class():
    logits, target, annotated = make_case(50)
    annotated[1] = torch.tensor([True, False, True, False, False])
    target[1] = 0
    target[1, 0, 0, 0] = 3
    with pytest.raises(ValueError, match=r"sample 1 contains class index 3, which is not annotated"):
        partial_label_ce(logits, target, annotated)
    with pytest.raises(ValueError, match="class index 3"):
        partial_dice_loss(logits, target, annotated)
    # the same voxel is fine once ignored
    target[1, 0, 0, 0] = 255
    assert torch.isfinite(partial_label_loss(logits, target, annotated, ignore_index=255))


def test_label_out_of_range_is_an_error():
    logits, target, annotated = make_case(51)
    target[0, 0, 0, 0] = 7
    with pytest.raises(ValueError, match=r"class index 7.*valid 0\.\.4"):
        partial_label_ce(logits, target, annotated)
    target[0, 0, 0, 0] = -1
    with pytest.raises(ValueError, match="class index -1"):
        partial_label_ce(logits, target, annotated)


def test_shape_and_dtype_errors():
    logits, target, annotated = make_case(52)
    with pytest.raises(ValueError, match=r"\(2, 3, 4\).*\(2, 5, 3, 4, 5\)"):
        partial_label_ce(logits, target[..., 0], annotated)
    with pytest.raises(ValueError, match="bool"):
        partial_label_ce(logits, target, annotated.long())
    with pytest.raises(ValueError, match=r"\(2, 4\).*\(2, 5\)"):
        partial_label_ce(logits, target, annotated[:, :4])
    with pytest.raises(ValueError, match="integer"):
        partial_label_ce(logits, target.double(), annotated)
    with pytest.raises(ValueError, match="smooth"):
        partial_dice_loss(logits, target, annotated, smooth=0.0)
    with pytest.raises(ValueError, match="spatial"):
        partial_label_ce(logits[:, :, 0, 0, 0], target[:, 0, 0, 0], annotated)


def test_batch_dice_matches_numpy_and_pools_samples():
    """Batch Dice: one Dice per class, summed over the samples that annotate it."""
    from cfseg.losses import partial_dice_loss

    g = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 4, 5, 6, generator=g, dtype=torch.float64)
    target = torch.randint(0, 4, (3, 5, 6), generator=g)
    target[0][target[0] == 3] = 0  # class 3 absent from sample 0 (annotated there) ...
    annotated = torch.tensor([[1, 1, 0, 1], [1, 1, 1, 1], [1, 0, 1, 1]], dtype=torch.bool)
    target[0][target[0] == 2] = 0
    target[2][target[2] == 1] = 0
    p = torch.softmax(logits, 1).numpy()
    t = target.numpy()
    dices = []
    for k in (1, 2, 3):
        rows = [b for b in range(3) if annotated[b, k]]
        inter = sum((p[b, k] * (t[b] == k)).sum() for b in rows)
        den = sum(p[b, k].sum() + (t[b] == k).sum() for b in rows)
        dices.append((2 * inter + 1e-5) / (den + 1e-5))
    ref = 1 - np.mean(dices)
    got = partial_dice_loss(logits, target, annotated, batch_dice=True)
    assert got.item() == pytest.approx(ref, rel=1e-10)
    # ... and pooled, the absent-in-one-sample class is not forced to Dice ~0 there
    assert got.item() < partial_dice_loss(logits, target, annotated, batch_dice=False).item()


# ----------------------------------------------------------------------------------------------------------
# fused partial_label_loss (hand-written backward) against the composed reference
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("ignore_index", [None, 255, -1])
@pytest.mark.parametrize("batch_dice", [False, True])
def test_fused_loss_matches_reference_value_and_gradient(dtype, ignore_index, batch_dice):
    from cfseg.losses import _partial_label_loss_reference

    tol = {"rtol": 1e-10, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-7}
    for seed, (ce_w, dice_w) in enumerate([(1.0, 1.0), (0.3, 2.0), (1.0, 0.0), (0.0, 1.0)]):
        logits, target, annotated = make_case(60 + seed, b=3, k=5, spatial=(4, 5, 6), scale=3.0, dtype=dtype)
        if seed == 0:
            annotated[:] = True  # every class annotated: the plain CE path
            target = torch.randint(0, 6, target.shape, generator=torch.Generator().manual_seed(5))
        if ignore_index is not None:
            target[torch.rand(target.shape, generator=torch.Generator().manual_seed(seed)) < 0.2] = ignore_index
        kw = {"ce_weight": ce_w, "dice_weight": dice_w, "ignore_index": ignore_index, "batch_dice": batch_dice}
        x, xr = logits.clone().requires_grad_(True), logits.clone().requires_grad_(True)
        got = partial_label_loss(x, target, annotated, **kw)
        want = _partial_label_loss_reference(xr, target, annotated, **kw)
        (1.7 * got).backward()
        (1.7 * want).backward()
        torch.testing.assert_close(got, want, **tol)
        torch.testing.assert_close(x.grad, xr.grad, **tol)


def test_fused_loss_backward_twice_and_every_voxel_ignored():
    logits, target, annotated = make_case(70)
    x = logits.clone().requires_grad_(True)
    loss = partial_label_loss(x, target, annotated)
    first = torch.autograd.grad(loss, x, retain_graph=True)[0]
    torch.testing.assert_close(torch.autograd.grad(loss, x)[0], first, rtol=0, atol=0)
    x.grad = None
    loss = partial_label_loss(x, torch.full_like(target, 255), annotated, ignore_index=255)
    loss.backward()
    assert loss.item() == 0.0 and (x.grad == 0).all()
