"""Classical baselines, computed on the same measurement as medldm.

Each baseline is a function ``(measurement) -> volume (X, Y, Z) in physical units``; which ones apply
to a task is listed in ``BASELINES``. They are honest classical methods with fixed, documented
parameters (not tuned on the validation data).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from skimage.restoration import denoise_nl_means

from medldm.physics import classical
from medldm.sampling.measurement import Measurement


def _np(m: Measurement, t: torch.Tensor) -> np.ndarray:
    """A (1, 1, X, Y, Z) result on the measurement's grid -> (X, Y, Z) in the input's orientation, as medldm's."""
    return m.to_input_orientation(t.detach().cpu().float().numpy()[0, 0])[0]


def naive(m: Measurement) -> np.ndarray:
    """Zero-filled (recon), cubic upsampling (SR), FBP (CT dose) or the noisy input (denoise)."""
    return _np(m, m.naive_inverse())


def tv_pocs(m: Measurement, iterations: int = classical.TV_ITERATIONS, weight: float = classical.TV_WEIGHT) -> np.ndarray:
    """Compressed sensing by alternating 2D TV denoising of each slice (Chambolle, weight relative to the
    99.5th percentile) with the operator's hard data consistency: a k-space projection for MR (POCS),
    a few 1/L gradient steps on ||A x - y||^2 in the sinogram domain for sparse-view CT. MR ends as medldm's
    MR output does (``Operator.consistent_nonnegative``): equal data consistency, magnitudes >= 0."""
    x = classical.tv_pocs(m.naive_inverse().float(), lambda x: m.operator.data_consistency(x, m.y),
                          image_axes=(2, 3), iterations=iterations, weight=weight)
    return _np(m, m.operator.consistent_nonnegative(x, m.y) if m.modality == "MR" else x)


def nlm(m: Measurement) -> np.ndarray:
    """3D non-local means (skimage) with the Rician sigma the operator carries (given or estimated), its Rician
    bias removed (classical.rician_unbias)."""
    a = naive(m)
    sigma = float(getattr(m.operator, "sigma", 0.0)) or 1e-6
    return classical.rician_unbias(denoise_nl_means(a, **classical.nlm_settings(sigma)), sigma)


def bm4d_baseline(m: Measurement) -> np.ndarray:
    """BM4D (optional package ``bm4d``); raises ImportError when not installed."""
    import bm4d

    return np.asarray(bm4d.bm4d(naive(m), sigma_psd=float(getattr(m.operator, "sigma", 0.0))))


def _available(fn: Callable) -> bool:
    if fn is bm4d_baseline:
        try:
            import bm4d  # noqa: F401
        except ImportError:
            return False
    return True


BASELINES: dict[tuple[str, str], dict[str, Callable[[Measurement], np.ndarray]]] = {
    ("recon", "MR"): {"zero-filled": naive, "TV-POCS": tv_pocs},
    ("sr", "MR"): {"cubic": naive},
    ("recon", "CT"): {"FBP": naive, "TV-iterative": tv_pocs},
    ("sr", "CT"): {"cubic": naive},
    ("denoise", "MR"): {"noisy input": naive, "NLM": nlm, "BM4D": bm4d_baseline},
    ("denoise", "CT"): {"FBP": naive},
}


def baselines_for(task: str, modality: str) -> dict[str, Callable[[Measurement], np.ndarray]]:
    return {k: f for k, f in BASELINES.get((task, modality), {}).items() if _available(f)}
