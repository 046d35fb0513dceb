"""Reconstruction metrics with the fastMRI conventions, written down once:

- PSNR and NMSE over the whole volume, ``data_range = max(ground truth volume)``.
- SSIM per 2D slice along the last index axis (Z), same data_range, averaged over slices
  (fastMRI's ``ssim``); ``ssim3d`` is torchmetrics' 3D SSIM with the same data_range.
- With a foreground ``mask``, PSNR/NMSE use only masked voxels (reported as separate keys).
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.stats import spearmanr
from skimage.metrics import peak_signal_noise_ratio, structural_similarity
from torchmetrics.functional.image import structural_similarity_index_measure


def _vol(a) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    while a.ndim > 3:
        a = a[0]
    return a


def psnr(gt, pred) -> float:
    gt, pred = _vol(gt), _vol(pred)
    return float(peak_signal_noise_ratio(gt, pred, data_range=gt.max()))


def nmse(gt, pred) -> float:
    gt, pred = _vol(gt), _vol(pred)
    return float(np.linalg.norm(gt - pred) ** 2 / np.linalg.norm(gt) ** 2)


def ssim(gt, pred) -> float:
    gt, pred = _vol(gt), _vol(pred)
    rng = gt.max()
    return float(np.mean([structural_similarity(gt[..., z], pred[..., z], data_range=rng) for z in range(gt.shape[-1])]))


def ssim3d(gt, pred) -> float:
    gt, pred = _vol(gt), _vol(pred)
    if min(gt.shape) < 11:  # torchmetrics' 11-voxel Gaussian window needs at least that many voxels per axis
        return float("nan")
    t = lambda a: torch.as_tensor(a, dtype=torch.float32)[None, None]  # noqa: E731
    return float(structural_similarity_index_measure(t(pred), t(gt), data_range=float(gt.max())))


def foreground_mask(gt, fraction: float = 0.05) -> np.ndarray:
    gt = _vol(gt)
    return gt > fraction * gt.max()


def all_metrics(gt, pred, mask: np.ndarray | None = None) -> dict[str, float]:
    out = {"psnr": psnr(gt, pred), "ssim": ssim(gt, pred), "nmse": nmse(gt, pred), "ssim3d": ssim3d(gt, pred)}
    if mask is not None:
        g, p = _vol(gt)[mask], _vol(pred)[mask]
        out["psnr_fg"] = float(10 * np.log10(_vol(gt).max() ** 2 / np.mean((g - p) ** 2)))
        out["nmse_fg"] = float(np.sum((g - p) ** 2) / np.sum(g**2))
    return out


def uncertainty_calibration(std, error, mask: np.ndarray | None = None) -> float:
    """Spearman rank correlation between the per-voxel std map and |error| (within ``mask`` if given)."""
    s, e = _vol(std), np.abs(_vol(error))
    if mask is not None:
        s, e = s[mask], e[mask]
    if s.size < 3 or np.all(s == s.flat[0]):
        return float("nan")
    return float(spearmanr(s.ravel(), e.ravel()).statistic)
