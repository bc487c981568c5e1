"""Out-of-domain statistics (cfseg.ood): the maths against a direct computation, calibration, state round trip, and
a fit that stores them in its checkpoint."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import pytest
import torch
from conftest import box_dataset

from cfseg.apps.cli import main as cli
from cfseg.data.transforms import Preprocessing
from cfseg.module import load_checkpoint
from cfseg.ood import DomainStatistics
from cfseg.segmentation import preprocess


def _features(n: int, mean: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g, dtype=torch.float64) * torch.tensor([1.0, 2.0, 0.5, 1.0]) + mean


def test_score_is_the_mean_squared_mahalanobis_distance_to_the_nearest_modality():
    stats = DomainStatistics(4)
    a, b = _features(500, 0.0, 0), _features(500, 10.0, 1)
    stats.update(a, "ct")
    stats.update(b, "mri")
    means = torch.stack([a.mean(0), b.mean(0)])
    centred = torch.cat([a - means[0], b - means[1]])
    cov = centred.T @ centred / 1000
    prec = torch.linalg.inv(cov + 1e-3 * torch.linalg.eigvalsh(cov).max() * torch.eye(4, dtype=torch.float64))
    x = _features(7, 9.0, 2)
    d = torch.stack([((x - m) @ prec * (x - m)).sum(1) for m in means]).min(0).values / 4
    assert stats.score(x) == pytest.approx(float(d.mean()), rel=1e-9)
    assert stats.score(_features(50, 0.0, 3)) < 1.5 < stats.score(_features(50, 5.0, 4))  # in vs out of domain


def test_calibration_and_state_round_trip():
    stats = DomainStatistics(4)
    stats.update(_features(100, 0.0, 0), "ct")
    stats.calibrate([0.5, 1.0, 0.8])
    assert stats.threshold == pytest.approx(3.0) and stats.calibration == [0.5, 1.0, 0.8]
    back = DomainStatistics.from_state(stats.state())
    x = _features(5, 1.0, 1)
    assert back.score(x) == stats.score(x) and back.threshold == stats.threshold and back.names == ["ct"]
    with pytest.raises(ValueError, match="finite calibration scores"):
        stats.calibrate([])
    with pytest.raises(ValueError, match="damaged domain statistics"):
        DomainStatistics.from_state({**stats.state(), "sums": torch.zeros(2, 4)})
    with pytest.raises(ValueError, match="no domain statistics"):
        DomainStatistics(4).score(x)


@pytest.fixture(scope="module")
def fitted(boxes, tmp_path_factory) -> tuple[Path, str]:
    """A 2-step fit on the boxes (a third of the cases validate): its checkpoint and one validation case."""
    tmp = tmp_path_factory.mktemp("ood_fit")
    data = json.dumps([{**box_dataset(boxes), "val_fraction": 0.34}])
    run = cli(["fit", "--config", str(Path(__file__).parent / "configs" / "tiny.yaml"), f"--data.datasets={data}",
               "--data.spacing=[4.0, 4.0, 4.0]", "--trainer.max_steps=2", "--trainer.max_epochs=-1",
               f"--trainer.default_root_dir={tmp}", f"--trainer.logger.init_args.save_dir={tmp}"])
    run.trainer.save_checkpoint(tmp / "stage.ckpt")
    return tmp / "stage.ckpt", run.datamodule.items(run.datamodule.datasets[0], "val")[0]["image"]


def test_a_fit_stores_calibrated_statistics_that_tell_noise_from_its_images(fitted):
    ckpt, case = fitted
    model = load_checkpoint(str(ckpt))
    stats = model.domain_statistics
    assert stats is not None and stats.names == ["ct"] and stats.threshold == pytest.approx(3 * max(stats.calibration))
    view = Preprocessing.from_dict(model.modality_router.view)  # the neutral view the statistics were taken in
    view_image = preprocess(nib.load(case), view)["image"][None]
    score, threshold = model.ood_score(view_image)
    assert score < threshold
    noise = torch.rand_like(view_image) * 50 - 25
    assert model.ood_score(noise)[0] > score


def test_segment_warns_refuses_with_strict_and_records_the_score(boxes, fitted, tmp_path):
    """cfseg-segment scores every input against the checkpoint's statistics: an in-domain case passes with its score
    in the manifest; an input above the threshold is warned about (exit 0, recorded) and refused with --strict.

    A 2-step model on four tiny cases cannot place its threshold well (its calibration cases are few windows in a
    wide feature space; benchmarks/ood.py measures a trained model), so the checkpoint's threshold is set between
    the case's score and the noise's: this test checks what segment does with a score, not where it lies."""
    from cfseg.apps.segment import main as segment_cli
    from cfseg.segmentation import segment

    ckpt = tmp_path / "stage.ckpt"
    shutil.copy(fitted[0], ckpt)  # its threshold is changed below
    case = sorted((boxes / "imagesTr").glob("*.nii.gz"))[0]
    ref = nib.load(str(case))
    noise = tmp_path / "noise.nii.gz"
    rng = torch.Generator().manual_seed(0)
    nib.save(nib.Nifti1Image((torch.rand(ref.shape, generator=rng) * 2000 - 1000).numpy(), ref.affine), str(noise))
    model = load_checkpoint(str(ckpt))
    view = Preprocessing.from_dict(model.domain_statistics.view)
    s_case, s_noise = (model.ood_score(preprocess(nib.load(str(f)), view)["image"][None])[0] for f in (case, noise))
    assert s_case < s_noise
    stored = torch.load(ckpt, weights_only=True)
    stored["cfseg"]["ood"]["threshold"] = (s_case + s_noise) / 2
    torch.save(stored, ckpt)

    assert segment_cli(["-i", str(case), "-o", str(tmp_path / "ok"), "--ckpt", str(ckpt), "--modality", "ct"]) == 0
    checks = json.loads((tmp_path / "ok" / ".cfseg-segment.json").read_text())["checks"]
    assert checks["out_of_domain"] is False and checks["ood_score"] == pytest.approx(s_case, abs=1e-4)
    with pytest.warns(UserWarning, match="unlike the images this checkpoint was trained on"):
        segment(noise, str(ckpt), modality="ct")
    assert segment_cli(["-i", str(noise), "-o", str(tmp_path / "noise"), "--ckpt", str(ckpt),
                        "--modality", "ct"]) == 0
    checks = json.loads((tmp_path / "noise" / ".cfseg-segment.json").read_text())["checks"]
    assert checks["out_of_domain"] is True and checks["ood_score"] > checks["ood_threshold"]
    assert segment_cli(["-i", str(noise), "-o", str(tmp_path / "strict"), "--ckpt", str(ckpt), "--modality", "ct",
                        "--strict"]) == 2
    assert not list((tmp_path / "strict").glob("*.nii.gz"))
