import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity

from medldm.evaluation import metrics as M
from medldm.evaluation.baselines import baselines_for, tv_pocs
from medldm.evaluation.cases import make_cases
from medldm.io.volume import Volume
from medldm.evaluation.card import verdict
from tests.conftest import phantom


def test_fastmri_conventions():
    gt = phantom((24, 20, 5)) * 10
    pred = gt + np.random.default_rng(0).normal(0, 0.5, gt.shape)
    mse = np.mean((gt - pred) ** 2)
    assert M.psnr(gt, pred) == pytest.approx(10 * np.log10(gt.max() ** 2 / mse))  # data_range = volume max
    assert M.nmse(gt, pred) == pytest.approx(np.sum((gt - pred) ** 2) / np.sum(gt**2))
    per_slice = [structural_similarity(gt[..., z], pred[..., z], data_range=gt.max()) for z in range(5)]
    assert M.ssim(gt, pred) == pytest.approx(np.mean(per_slice))  # slice-wise along Z, averaged
    # a 2D image (with batch / channel dims, as training validates) is one slice, same convention
    one = structural_similarity(gt[..., 2], pred[..., 2], data_range=gt[..., 2].max())
    assert M.ssim(torch.as_tensor(gt[None, None, ..., 2]), pred[None, None, ..., 2]) == pytest.approx(one)
    assert np.isnan(M.ssim(gt[:6], pred[:6]))  # 6 voxels < the 7-pixel window: not reported rather than wrong
    assert M.psnr(gt, gt + 1e-3) > M.psnr(gt, pred)


def test_uncertainty_calibration_is_a_rank_correlation():
    err = np.random.default_rng(1).random((8, 8, 4))
    assert M.uncertainty_calibration(err * 3 + 1, err) == pytest.approx(1.0)
    assert M.uncertainty_calibration(-err, err) == pytest.approx(-1.0)
    assert np.isnan(M.uncertainty_calibration(np.ones_like(err), err))  # a constant map says nothing


def test_tv_pocs_beats_zero_filled_and_stays_data_consistent():
    vol = Volume((phantom((48, 48, 3)) * 100)[None].astype(np.float32), np.eye(4), "MR")
    case = make_cases("recon", "MR", {"p": vol})[0]
    gt, m = vol.array[0], case.measurement
    zf = baselines_for("recon", "MR")["zero-filled"](m)
    tv = tv_pocs(m)
    assert M.psnr(gt, tv) > M.psnr(gt, zf)
    assert m.operator.residual(torch.as_tensor(tv)[None, None], m.y) < 1e-3


def test_card_verdict_names_the_best_baseline_and_whether_medldm_beats_it():
    rows = [{"case": "c", "method": "zero-filled", "psnr": 20.0, "ssim": 0.5},
            {"case": "c", "method": "TV-POCS", "psnr": 25.0, "ssim": 0.7},
            {"case": "c", "method": "VAE(truth)", "psnr": 30.0, "ssim": 0.9},
            {"case": "c", "method": "medldm (default)", "psnr": 24.0, "ssim": 0.8}]
    line = verdict(rows)
    assert "does NOT beat" in line and "TV-POCS" in line and "30.00" in line
    rows[-1]["psnr"] = 26.0
    assert "beats the best" in verdict(rows)


@pytest.mark.slow  # 8-coil CG-SENSE and TV-SENSE solves (~2.5 s)
def test_parallel_imaging_baselines_beat_zero_filled_rss():
    from medldm.evaluation import baselines as B
    from medldm.sampling.measurement import as_measured, simulate

    vol = Volume((phantom((48, 48, 3)) * 100)[None].astype(np.float32), np.eye(4), "MR")
    m = as_measured(simulate(vol, "recon", 0, operator="MultiCoilCartesian", coils=6, accelerations=[3],
                             center_fractions=[0.2], mask_type="equispaced", phase=True))
    assert set(B.baselines_for("recon", "MR", coils=6)) == {"zero-filled RSS", "CG-SENSE", "TV-SENSE", "TV-POCS",
                                                          "TV-POCS (warm)"}
    truth = vol.array[0]
    zf = M.psnr(truth, B.zero_filled_rss(m))
    assert M.psnr(truth, B.cg_sense(m)) > zf + 3 and M.psnr(truth, B.tv_sense(m)) > zf + 3
