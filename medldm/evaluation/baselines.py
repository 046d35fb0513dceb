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
from medldm.slice_filters import nlm_settings, rician_unbias


def _np(m: Measurement, t: torch.Tensor) -> np.ndarray:
    """A (1, 1, X, Y, Z) result on the measurement's grid -> (X, Y, Z) in the input's orientation, as medldm's."""
    return m.to_input_orientation(t.detach().cpu().float().numpy()[0, 0])[0]


def naive(m: Measurement) -> np.ndarray:
    """Zero-filled (recon), cubic upsampling (SR), FBP (CT dose) or the noisy input (denoise)."""
    return _np(m, m.naive_inverse())


def tv_pocs(m: Measurement, iterations: int = classical.TV_ITERATIONS, weight: float = classical.TV_WEIGHT,
            solver=classical.tv_pocs) -> np.ndarray:
    """Compressed sensing by alternating 2D TV denoising of each slice (Chambolle, weight relative to the
    99.5th percentile) with the operator's hard data consistency: a k-space projection for MR (POCS),
    a few 1/L gradient steps on ||A x - y||^2 in the sinogram domain for sparse-view CT. MR ends as medldm's
    MR output does (``Operator.consistent_nonnegative``): equal data consistency, magnitudes >= 0.
    ``solver``: skimage's TV each round (``classical.tv_pocs``) or the dual carried over (``tv_pocs_warm``)."""
    x = solver(m.naive_inverse().float(), lambda x: m.operator.data_consistency(x, m.y),
               image_axes=(2, 3), iterations=iterations, weight=weight)
    return _np(m, m.operator.consistent_nonnegative(x, m.y) if m.modality == "MR" else x)


def tv_pocs_warm(m: Measurement) -> np.ndarray:
    """:func:`tv_pocs` with Chambolle's dual carried from round to round (the guide kind "tv-pocs-warm")."""
    return tv_pocs(m, solver=classical.tv_pocs_warm)


def _per_slice(m: Measurement, solve) -> np.ndarray:
    """``solve(y, maps, z)`` (a sigpy app) of each slice z of a multi-coil measurement -> |volume| (1, 1, X, Y, Z)."""
    op, y = m.operator, m.y[0].numpy()
    maps = op.maps_for(m.y.shape[2:], m.y.dtype, "cpu")[0].numpy()  # (C, X, Y, Z or 1)
    out = [np.abs(solve(y[..., z], maps[..., min(z, maps.shape[-1] - 1)], z)) for z in range(y.shape[-1])]
    return torch.from_numpy(np.stack(out, -1).astype(np.float32))[None, None]


def zero_filled_rss(m: Measurement) -> np.ndarray:
    """Root sum of squares of the zero-filled coil images (fastMRI's multi-coil baseline)."""
    return _np(m, m.operator.zero_filled_rss(m.y))


# Set on two slices of a *training* volume (MNI part 0, 8 coils, equispaced 4x / 8x): PSNR rose with iterations
# (cold start, weight 0.02: 100 -> 300 -> 600 iterations gave 29.9 -> 33.8 -> 34.7 dB at 4x), a warm start from
# CG-SENSE reaches it sooner (200: 34.1 dB), and 8x wants more smoothing (0.02 / 0.035 / 0.05: 22.5 / 23.2 / 23.5 dB).
TV_SENSE_WEIGHT_PER_ACCELERATION = 0.005  # of the zero-filled combined image's 99.5th percentile: 4x -> 0.02
TV_SENSE_ITERATIONS = 300


def cg_sense(m: Measurement) -> np.ndarray:
    """CG-SENSE (sigpy ``SenseRecon``: conjugate gradients on the normal equations, complex image, the coil maps
    medldm estimated, 30 iterations, no regulariser), magnitude. medldm's own (``MultiCoilCartesian.sense``,
    its naive inverse) is tested to agree with it."""
    from sigpy.mri.app import SenseRecon

    iters = m.operator.SENSE_ITERATIONS
    return _np(m, _per_slice(m, lambda y, s, z: SenseRecon(y, s, lamda=0.0, max_iter=iters, show_pbar=False).run()))


def tv_sense(m: Measurement) -> np.ndarray:
    """Parallel imaging with total-variation regularisation (sigpy ``TotalVariationRecon``, primal-dual, complex
    image, the same coil maps, started from CG-SENSE), weight fixed relative to the image's intensity and
    proportional to the acceleration (settings above), magnitude."""
    from sigpy.mri.app import TotalVariationRecon

    op, y = m.operator, m.y
    lam = TV_SENSE_WEIGHT_PER_ACCELERATION * float(op.measured_acceleration((y.shape[3],))) \
        * float(np.percentile(op.zero_filled_magnitude(y).numpy(), 99.5))
    start = op.sense(y)[0, 0].numpy()
    return _np(m, _per_slice(m, lambda ys, s, z: TotalVariationRecon(ys, s, lam, max_iter=TV_SENSE_ITERATIONS,
                                                                     show_pbar=False, x=start[..., z].copy()).run()))


def nlm(m: Measurement) -> np.ndarray:
    """3D non-local means (skimage) with the Rician sigma the operator carries (given or estimated), its Rician
    bias removed (slice_filters.rician_unbias)."""
    a = naive(m)
    sigma = float(getattr(m.operator, "sigma", 0.0)) or 1e-6
    return rician_unbias(denoise_nl_means(a, **nlm_settings(sigma)), sigma)


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
    ("recon", "MR"): {"zero-filled": naive, "TV-POCS": tv_pocs, "TV-POCS (warm)": tv_pocs_warm},
    ("recon-multicoil", "MR"): {"zero-filled RSS": zero_filled_rss, "CG-SENSE": cg_sense, "TV-SENSE": tv_sense,
                                "TV-POCS": tv_pocs, "TV-POCS (warm)": tv_pocs_warm},
    ("sr", "MR"): {"cubic": naive},
    ("recon", "CT"): {"FBP": naive, "TV-iterative": tv_pocs},
    ("sr", "CT"): {"cubic": naive},
    ("denoise", "MR"): {"noisy input": naive, "NLM": nlm, "BM4D": bm4d_baseline},
    ("denoise", "CT"): {"FBP": naive},
}


def baselines_for(task: str, modality: str, coils: int = 1) -> dict[str, Callable[[Measurement], np.ndarray]]:
    """The baselines of a (task, modality); multi-coil k-space (``coils`` > 1) has its parallel-imaging ones."""
    key = ("recon-multicoil", modality) if task == "recon" and coils > 1 else (task, modality)
    return {k: f for k, f in BASELINES.get(key, {}).items() if _available(f)}
