"""Reconstruction metrics with the fastMRI conventions, written down once:

- PSNR and NMSE over the whole volume, ``data_range = max(ground truth volume)``.
- SSIM, the one convention medldm reports everywhere (cards, evaluation, training validation): scikit-image's
  ``structural_similarity`` (7x7 uniform window, K1 = 0.01, K2 = 0.03) on each 2D slice along the last index
  axis (Z), same data_range, averaged over slices (fastMRI's ``ssim``); a 2D image is one slice.
- With a foreground ``mask``, PSNR/NMSE use only masked voxels (reported as separate keys).
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.stats import spearmanr
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

SSIM_WINDOW = 7  # scikit-image's default; an image needs at least this many pixels along each in-plane axis


def _vol(a) -> np.ndarray:
    a = np.asarray(a.detach().float().cpu() if isinstance(a, torch.Tensor) else a, dtype=np.float64)
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
    """Mean SSIM over the (X, Y) slices of a volume, or of one 2D image; data_range = max(gt).
    NaN when a slice is smaller than the window (not reported rather than wrong)."""
    gt, pred = _image(gt), _image(pred)
    if gt.ndim == 2:
        gt, pred = gt[..., None], pred[..., None]
    if min(gt.shape[:2]) < SSIM_WINDOW:
        return float("nan")
    rng = gt.max()
    return float(np.mean([structural_similarity(gt[..., z], pred[..., z], data_range=rng) for z in range(gt.shape[-1])]))


def _image(a) -> np.ndarray:
    """A volume (X, Y, Z) or a 2D image (X, Y), with leading batch / channel dims of size 1 dropped."""
    a = _vol(a)
    while a.ndim > 2 and a.shape[0] == 1:
        a = a[0]
    return a


def foreground_mask(gt, fraction: float = 0.05) -> np.ndarray:
    gt = _vol(gt)
    return gt > fraction * gt.max()


def all_metrics(gt, pred, mask: np.ndarray | None = None) -> dict[str, float]:
    out = {"psnr": psnr(gt, pred), "ssim": ssim(gt, pred), "nmse": nmse(gt, pred)}
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
