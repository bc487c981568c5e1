"""Large inputs segment in bounded memory: the prediction comes back onto the input grid slab by slab (argmax per
slab, never all class probabilities on the input grid), inputs above ``BLOCK_RESAMPLE_VOXELS`` are kept as stored
and resampled onto the network grid block by block, equal to MONAI's Orientation + Spacing path within float32
rounding. Small thresholds and budgets force the large-input paths on small arrays; the memory itself is measured
by benchmarks/large_volume_memory.py, not here."""

import nibabel as nib
import numpy as np
import pytest
import torch

from cfseg import geometry, segmentation
from cfseg.data.transforms import Preprocessing, neutral_view
from cfseg.geometry import _resample_to, labels_to_input_grid, network_grid, resample_in_blocks
from cfseg.inference import intensity_sample
from cfseg.segmentation import _count_slabs, load_input, preprocess


def _rotated(theta: float, zooms, shift) -> np.ndarray:
    c, s = np.cos(theta), np.sin(theta)
    a = np.eye(4)
    a[:3, :3] = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ np.diag(zooms)
    a[:3, 3] = shift
    return a


def _affines():
    yield "RAS", np.diag([0.8, 0.8, 0.5, 1.0])
    a = np.diag([-0.9, -0.9, 1.3, 1.0])
    a[:3, 3] = [100, 80, -50]
    yield "LPS", a
    yield "oblique", _rotated(0.2, [0.7, 0.8, 1.1], [5, -3, 2])
    a = np.zeros((4, 4))
    a[0, 2], a[1, 0], a[2, 1], a[3, 3] = 1.2, -0.8, 0.9, 1
    yield "permuted", a


def _ct(shape=(40, 44, 30), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = (rng.normal(0, 60, shape).cumsum(0) / 6).astype(np.int16)  # smooth along x, noisy across
    x[: shape[0] // 4] = -1000  # air, so the CT window clips somewhere
    return x


def test_slab_argmax_equals_full_argmax(monkeypatch):
    rng = np.random.default_rng(1)
    probs = rng.random((4, 13, 11, 9)).astype(np.float32)
    probs /= probs.sum(0, keepdims=True)
    net_affine = _rotated(0.3, [2.0, 2.5, 3.0], [-4.0, 3.0, 1.0])
    dst_affine = _rotated(-0.1, [0.9, 0.7, 1.1], [-6.0, -2.0, -3.0])
    dst_shape = (31, 37, 29)
    values = [0, 3, 5, 9]
    assert not geometry.grids_align(net_affine, dst_affine)
    cval = [1.0, 0.0, 0.0, 0.0]
    full = _resample_to(probs, net_affine, dst_shape, dst_affine, order=1, cval=cval, slab=dst_shape[0])
    expected = np.asarray(values, np.uint8)[full.argmax(0)]
    assert len(np.unique(expected)) == 4  # every class and the background outside the network grid
    for budget in (geometry.SLAB_VOXELS, 4 * 37 * 29, 1):  # one slab, several, one slice each
        monkeypatch.setattr(geometry, "SLAB_VOXELS", budget)
        got = labels_to_input_grid(probs.argmax(0).astype(np.uint8), probs, values, net_affine, dst_shape,
                                   dst_affine)
        assert got.dtype == np.uint8 and got.shape == dst_shape
        np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("name,affine", list(_affines()), ids=[n for n, _ in _affines()])
def test_block_resampling_equals_monai(name, affine):
    from monai.data import MetaTensor
    from monai.transforms import Orientationd, Spacingd

    arr = _ct()
    spacing = (2.0, 2.5, 1.5)
    d = {"image": MetaTensor(torch.as_tensor(arr.astype(np.float32))[None], affine=torch.as_tensor(affine))}
    d = Orientationd(["image"], axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S")))(d)
    d = Spacingd(["image"], pixdim=spacing, mode=["bilinear"])(d)
    ref = d["image"][0].numpy()
    shape, grid_affine = network_grid(arr.shape, affine, spacing)
    assert shape == ref.shape
    np.testing.assert_array_equal(grid_affine, d["image"].affine.numpy())
    for budget in (geometry.SLAB_VOXELS, 500):  # one block; many blocks (each from its own part of the input)
        out = resample_in_blocks(np.asfortranarray(arr), affine, shape, grid_affine, budget=budget)
        assert out.dtype == np.float32
        np.testing.assert_allclose(out, ref, rtol=0, atol=1e-5 * np.abs(ref).max())  # borders included
    M = geometry._dst_to_src(affine, grid_affine)
    n_src = np.asarray(arr.shape)
    budget = 20_000
    step = geometry._block_width(M, shape, n_src, budget)
    assert 1 < step < shape[0]
    for x0 in range(0, shape[0], step):  # each block read from the input is bounded too
        lo, hi = geometry._source_box(M, x0, min(x0 + step, shape[0]), *shape[1:], n_src)
        assert np.prod(hi - lo) <= budget


@pytest.mark.parametrize("modality", ["ct", "mri", "neutral"])
def test_forced_block_preprocessing_equals_the_monai_path(modality):
    name, affine = list(_affines())[2]  # oblique: interpolation everywhere
    arr = _ct() if modality != "mri" else (np.abs(_ct()) + 5).astype(np.int16)
    img = nib.Nifti1Image(arr, affine)
    pre = (neutral_view((2.0, 2.5, 1.5)) if modality == "neutral"
           else Preprocessing(modality=modality, spacing=(2.0, 2.5, 1.5)))
    ref = preprocess(img, pre)["image"]
    got = preprocess(img, pre, block_voxels=0)["image"]
    assert got.shape == ref.shape and got.dtype == ref.dtype == torch.float32
    np.testing.assert_array_equal(got.affine.numpy(), ref.affine.numpy())
    scale = float(ref.abs().max())
    assert float((got - ref).abs().max()) <= 1e-4 * scale, modality


def test_large_integer_input_is_kept_as_stored(tmp_path, monkeypatch):
    arr = _ct((20, 18, 16))
    path = tmp_path / "ct.nii.gz"
    img = nib.Nifti1Image(arr, np.diag([0.8, 0.8, 0.5, 1.0]))
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    nib.save(img, str(path))
    small, _ = load_input(path)
    assert np.asarray(small.dataobj).dtype == np.float32
    monkeypatch.setattr(segmentation, "BLOCK_RESAMPLE_VOXELS", 100)
    large, _ = load_input(path)
    kept = np.asarray(large.dataobj)
    assert kept.dtype == np.int16
    np.testing.assert_array_equal(kept.astype(np.float32), np.asarray(small.dataobj))
    np.testing.assert_array_equal(large.affine, small.affine)
    scaled = nib.Nifti1Image(arr, img.affine)
    scaled.header.set_slope_inter(2.0, 1.0)
    nib.save(scaled, str(tmp_path / "scaled.nii.gz"))
    assert np.asarray(load_input(tmp_path / "scaled.nii.gz")[0].dataobj).dtype == np.float32  # scaled: floats


def test_modality_sample_and_slab_counts_equal_the_full_array_versions(monkeypatch):
    rng = np.random.default_rng(2)
    a = np.asfortranarray(rng.integers(-1000, 1000, (160, 130, 110), dtype=np.int16))  # > 2M voxels
    k = -(-a.size // 2_000_000)
    np.testing.assert_array_equal(intensity_sample(a, 2_000_000), a.ravel()[::k])
    c = np.ascontiguousarray(a)
    np.testing.assert_array_equal(intensity_sample(c, 2_000_000), a.ravel()[::k])
    monkeypatch.setattr(segmentation, "SLAB_VOXELS", 130 * 110 * 7)  # slabs of 7 slices
    assert _count_slabs(a, lambda x: x > 0) == int(np.count_nonzero(a > 0))
    f = a.astype(np.float32)
    f[3, 4, 5], f[150, 1, 2] = np.nan, np.inf
    assert _count_slabs(f, lambda x: ~np.isfinite(x)) == 2


def test_resampling_reads_unfilled_channels_in_place_bit_identically():
    """Channels with fill 0 are not copied; the values equal one grid_sample of every channel shifted by its fill."""
    import torch.nn.functional as F

    rng = np.random.default_rng(3)
    probs = rng.random((5, 12, 10, 9)).astype(np.float32)
    net_affine = _rotated(0.4, [2.0, 2.5, 3.0], [-4.0, 3.0, 1.0])
    dst_affine = _rotated(-0.2, [0.9, 0.7, 1.1], [-6.0, -2.0, -3.0])
    dst_shape = (27, 33, 25)
    for cval in ([1.0, 0.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 2.0, 0.0], -1.0, 0.0):
        fill = np.broadcast_to(np.asarray(cval, np.float32), (5,)).reshape(5, 1, 1, 1)
        M = geometry._dst_to_src(net_affine, dst_affine)
        grid = geometry._slab_grid(M, 0, dst_shape[0], *dst_shape[1:], probs.shape[1:])
        ref = F.grid_sample(torch.from_numpy(probs - fill)[None], grid, mode="bilinear", padding_mode="zeros",
                            align_corners=False)[0].numpy() + fill
        got = _resample_to(probs, net_affine, dst_shape, dst_affine, order=1, cval=cval, slab=7)
        np.testing.assert_array_equal(got, ref)
