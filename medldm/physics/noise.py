"""Rician noise, the magnitude-MR noise model: y = |x + n1 + i n2|, n1, n2 ~ N(0, sigma^2) independent.

High-SNR tissue sees nearly Gaussian noise of std sigma; background (x = 0) becomes Rayleigh with mean
sigma * sqrt(pi / 2): a positive bias that a denoiser has to learn to remove, which is why we simulate it
rather than add Gaussian noise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from medldm.errors import ConfigError, InputError
from medldm.physics._common import check_image, noise_generator, randn
from medldm.physics.base import Operator, RandomOperator

REFERENCES = ("max", "p99.5", "none")


class RicianNoise(Operator):
    """A = identity; the measurement is the Rician-corrupted magnitude image. ``sigma`` in image units.

    ``sigma_relative`` and ``reference`` are provenance only (how a random draw arrived at ``sigma``).
    """

    task = "denoise"

    def __init__(self, sigma: float, noise_seed: int = 0, sigma_relative: float | None = None,
                 reference: float | None = None):
        if not sigma >= 0 or not math.isfinite(sigma):
            raise ConfigError(f"sigma must be a finite number >= 0, got {sigma}")
        self.sigma, self.noise_seed = float(sigma), int(noise_seed)
        self.sigma_relative = None if sigma_relative is None else float(sigma_relative)
        self.reference = None if reference is None else float(reference)

    @classmethod
    def from_relative(cls, sigma_relative: float, intensity_range, noise_seed: int = 0) -> "RicianNoise":
        """sigma = sigma_relative * span, span a number or the width of a (low, high) intensity range."""
        if np.isscalar(intensity_range):
            span = float(intensity_range)
        else:
            span = float(intensity_range[1] - intensity_range[0])
        return cls(sigma_relative * span, noise_seed, sigma_relative=sigma_relative, reference=span)

    @classmethod
    def from_snr(cls, snr: float, signal: float, noise_seed: int = 0) -> "RicianNoise":
        """sigma = signal / snr, ``signal`` the mean intensity of the tissue the SNR refers to."""
        if not snr > 0:
            raise ConfigError(f"snr must be > 0, got {snr}")
        return cls(float(signal) / float(snr), noise_seed, sigma_relative=1.0 / float(snr), reference=float(signal))

    @property
    def noise_level(self) -> float:
        return self.sigma

    def A(self, x: torch.Tensor) -> torch.Tensor:
        return check_image(x)

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        return y

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        check_image(x)
        if self.sigma == 0:
            return x.clone()  # not |x|: zero strength is the identity, even for negative inputs
        g = noise_generator(generator, self.noise_seed)
        n1, n2 = randn(x.shape, g, x), randn(x.shape, g, x)
        return torch.sqrt((x + self.sigma * n1) ** 2 + (self.sigma * n2) ** 2)

    def naive_inverse(self, y: torch.Tensor) -> torch.Tensor:
        return y.clone()

    def data_consistency(self, x: torch.Tensor, y: torch.Tensor, weight: float | None = None) -> torch.Tensor:
        """Hard (None): y. Soft: the proximal step argmin_z ||z - x||^2 + w ||z - y||^2 = (x + w y) / (1 + w).

        w = 0 returns x exactly; w = lambda / sigma^2 weights the measurement by its noise. The Rician bias
        is ignored here: this is a pull towards y, not a likelihood.
        """
        if weight is None:
            return y.clone()
        w = float(weight)
        if w < 0:
            raise ConfigError(f"data-consistency weight must be >= 0, got {w}")
        return x.clone() if w == 0 else (x + w * y) / (1 + w)

    def params(self) -> dict[str, Any]:
        p: dict[str, Any] = {"operator": "RicianNoise", "sigma": self.sigma, "noise_seed": self.noise_seed}
        if self.sigma_relative is not None:
            p["sigma_relative"] = self.sigma_relative
        if self.reference is not None:
            p["reference"] = self.reference
        return p


def reference_intensity(image, reference: str) -> float:
    """The intensity a relative sigma refers to: the volume's max or 99.5th percentile (1.0 for "none")."""
    if reference not in REFERENCES:
        raise ConfigError(f"reference must be one of {REFERENCES}, got {reference!r}")
    if reference == "none":
        return 1.0
    a = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    value = float(np.max(a)) if reference == "max" else float(np.percentile(a, 99.5))
    if not value > 0:
        value = float(np.max(np.abs(a))) or 1.0
    return value


class RandomRicianNoise(RandomOperator):
    """sigma = u * reference, u uniform in ``sigma_range``; reference the image's max or 99.5th percentile.

    Without an image (``sample(seed)``), the reference is 1.0: the image is assumed normalised.
    """


    def __init__(self, sigma_range: Sequence[float] = (0.01, 0.1), reference: str = "p99.5"):
        lo, hi = (float(v) for v in sigma_range)
        if not 0 <= lo <= hi:
            raise ConfigError(f"sigma_range must be (low, high) with 0 <= low <= high, got {sigma_range!r}")
        if reference not in REFERENCES:
            raise ConfigError(f"reference must be one of {REFERENCES}, got {reference!r}")
        self.sigma_range, self.reference = (lo, hi), reference

    def sample(self, seed: int, image=None) -> RicianNoise:
        rng = np.random.default_rng(int(seed))
        rel = float(rng.uniform(*self.sigma_range))
        noise_seed = int(rng.integers(0, 2**31 - 1))
        ref = 1.0 if image is None else reference_intensity(image, self.reference)
        return RicianNoise(rel * ref, noise_seed, sigma_relative=rel, reference=ref)


def _highpass(a: np.ndarray) -> np.ndarray:
    # Product of [1, -2, 1] along every axis, unit L2 norm: removes anything locally linear along any one
    # axis, and maps white noise of std s to std s.
    k1 = np.array([1.0, -2.0, 1.0]) / math.sqrt(6.0)
    out = a
    for axis in range(a.ndim):
        out = ndimage.correlate1d(out, k1, axis=axis, mode="reflect")
    return out


RAYLEIGH_CUT = 1.5  # the background fit uses voxels up to 1.5 sigma: little tissue reaches that low


def background_rician_sigma(a: np.ndarray) -> float | None:
    fit = _air_fit(a)
    return None if fit is None else fit[0]


def _air_fit(a: np.ndarray) -> tuple[float, int, float] | None:
    """Sigma from the image's air: where the signal is 0 a magnitude is Rayleigh(sigma). Maximum likelihood of a
    Rayleigh truncated at ``RAYLEIGH_CUT`` sigma, over the non-zero voxels below the cut, iterated; None when
    the voxels there do not follow that law (Kolmogorov-Smirnov distance > max(0.005, 2 / sqrt(n))): masked
    (zeroed) air, an image cropped to tissue, or too few voxels. Selection by intensity is what the truncated
    likelihood accounts for, so the estimate is unbiased where the air is real."""
    x = np.sort(a[a > 0].astype(np.float64))
    if x.size < 1000:
        return None
    k = RAYLEIGH_CUT ** 2 / 2
    shrink = 1 - k * math.exp(-k) / (1 - math.exp(-k))  # E[x^2 / 2 | x < cut] / sigma^2
    s = x[int(0.05 * x.size)] / math.sqrt(2 * math.log(1 / 0.95))  # the 5th percentile, if it were all air
    for _ in range(100):
        v = x[: np.searchsorted(x, RAYLEIGH_CUT * s, side="right")]
        if v.size < 1000:
            return None
        s_new = math.sqrt(float(np.mean(v**2)) / 2 / shrink)
        done = abs(s_new - s) <= 1e-6 * s
        s = s_new
        if done:
            break
    v = x[: np.searchsorted(x, RAYLEIGH_CUT * s, side="right")]
    model = -np.expm1(-(v**2) / (2 * s * s)) / -math.expm1(-k)
    distance = float(np.max(np.abs(np.arange(1, v.size + 1) / v.size - model)))
    return (s, int(v.size), distance) if v.size >= 1000 and distance <= max(0.005, 2 / math.sqrt(v.size)) else None


def estimate_rician_sigma(image, snr_threshold: float = 4.0) -> float:
    """``rician_sigma_estimate(image)["sigma"]``."""
    return rician_sigma_estimate(image, snr_threshold)["sigma"]


def rician_sigma_estimate(image, snr_threshold: float = 4.0) -> dict:
    """Robust estimate of the Rician sigma of a magnitude image (numpy/torch, 2D/3D, optional channel dims).

    From the air first (``background_rician_sigma``: within 2% on the held-out T1 subjects for sigma 1-15% of
    the max, 5% on a head with skull at 15%; ``benchmarks/noise_estimate.py``). Where the air is missing or
    masked: the MAD of a high-pass residual over the high-SNR foreground (local mean > ``snr_threshold`` sigma,
    where Rician noise is Gaussian with std sigma to within a few percent), away from edges (the range of a
    median-filtered image over a 5-voxel window > 4 sigma), iterated from a global start; it reads 5-8% low
    (selecting flat voxels selects small noise) and up to 25% low on an image cropped to tissue. With no usable
    foreground the image is taken as pure background: the residual there mixes Rayleigh samples, whose std is
    sigma * sqrt(2 - pi/2), and that factor is divided out. Voxels next to an exact zero (masked air) are left out.

    Returns ``sigma`` with how it was found (``method`` "air" | "foreground" | "background-only", the ``voxels``
    used, the air fit's Kolmogorov-Smirnov ``fit_distance``), for provenance; the accuracy each method reached on
    held-out volumes is measured by ``benchmarks/noise_estimate.py`` and shown in the mr-denoise card.
    """
    a = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    a = np.squeeze(a.astype(np.float64))
    if a.ndim < 2:
        raise InputError(None, f"estimate_rician_sigma needs a 2D or 3D image, got shape {a.shape}")
    fit = _air_fit(a)
    if fit is not None:
        return {"sigma": fit[0], "method": "air", "voxels": fit[1], "fit_distance": round(fit[2], 5)}
    stack = a.reshape((-1,) + a.shape[-3:]) if a.ndim > 3 else a[None]
    resid = np.concatenate([_highpass(s).ravel() for s in stack])
    local = np.concatenate([ndimage.uniform_filter(s, size=3, mode="reflect").ravel() for s in stack])
    med = [ndimage.median_filter(s, size=3, mode="reflect") for s in stack]
    spread = np.concatenate([(ndimage.maximum_filter(m, size=5) - ndimage.minimum_filter(m, size=5)).ravel()
                             for m in med])
    # air zeroed by a masked export has no noise to measure: a zero residual there would read as sigma 0
    measured = np.concatenate([(ndimage.minimum_filter(s, size=3, mode="reflect") > 0).ravel() for s in stack])
    if measured.sum() >= 64:
        resid, local, spread = resid[measured], local[measured], spread[measured]
    mad = 1.4826
    sigma = mad * float(np.median(np.abs(resid)))
    foreground = {"method": "foreground"}
    if sigma == 0:
        return {**foreground, "sigma": 0.0, "voxels": int(resid.size)}
    for _ in range(4):
        use = (local > snr_threshold * sigma) & (spread < 4 * sigma)
        if use.sum() < max(64, 0.01 * use.size):
            flat = spread < 4 * sigma
            pool = resid[flat] if flat.sum() >= 64 else resid
            return {"sigma": mad * float(np.median(np.abs(pool))) / math.sqrt(2 - math.pi / 2),
                    "method": "background-only", "voxels": int(pool.size)}
        sigma = mad * float(np.median(np.abs(resid[use])))
    return {**foreground, "sigma": sigma, "voxels": int(use.sum())}


class ReconstructedImageNoise(RicianNoise):
    """Image-domain input whose noise came from an earlier reconstruction (e.g. a low-dose CT image read
    from DICOM: the sinogram is gone). A = identity; forward adds Gaussian noise of std ``sigma`` (the
    CT noise of an FBP image is close to Gaussian locally); naive inverse and data consistency as Rician.
    """

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        check_image(x)
        if self.sigma == 0:
            return x.clone()
        return x + self.sigma * randn(x.shape, noise_generator(generator, self.noise_seed), x)

    def params(self) -> dict[str, Any]:
        return {**super().params(), "operator": "ReconstructedImageNoise"}
