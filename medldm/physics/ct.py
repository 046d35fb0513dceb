"""Parallel-beam CT per axial slice: low-dose (Poisson) and sparse-view simulation.

Projector (``ct_projector``). A torch radon: each ray sums bilinear samples of the slice at unit (pixel)
spacing, as a sparse system matrix for small slices and ``grid_sample`` for large ones. We do not use
skimage's radon/iradon pair because its unfiltered iradon is not the transpose of its radon; here the
adjoint is the exact transpose (the matrix's, or autograd through grid_sample), so <A x, y> = <x, A^T y>
to rounding. circle=False: the detector spans the slice diagonal, ceil(sqrt(X^2 + Y^2)) bins, so nothing
outside the inscribed circle (arms, table, patch corners) is truncated; the price is a sinogram ~1.4x wider.

Units. Images are HU. The measurement is the line integral of mu minus that of a field of view filled
with water: y = R(mu(x)) - R(mu_water) = c R(x) with c = mu_water * pixel_mm / 1000, so A is *linear* in
HU (an affine map would break the adjoint contract). Noise: counts ~ Poisson(I0 exp(-R(mu))), floored at
1 photon so the log stays finite, then y = -log(counts / I0) - R(mu_water).

Sinograms are (B, C, D, V) for 2D images and (B, C, D, V, Z) for volumes: detector, view, then the slice
axis left last as in the image.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from medldm.errors import ConfigError, InputError
from medldm.physics._common import check_image, noise_generator
from medldm.physics.base import Operator, RandomOperator
from medldm.physics.ct_projector import Projector, n_detectors, projector

MU_WATER_PER_MM = 0.0192  # linear attenuation of water at ~70 keV effective energy, 1/mm


def hu_to_mu(hu, mu_water: float = MU_WATER_PER_MM):
    return mu_water * (1.0 + hu / 1000.0)


def mu_to_hu(mu, mu_water: float = MU_WATER_PER_MM):
    return 1000.0 * (mu / mu_water - 1.0)


def ramp_filter(sino: torch.Tensor, dim: int = -2) -> torch.Tensor:
    """Ram-Lak filtering along the detector axis, built in the spatial domain as skimage does.

    Sampling the spatial ramp kernel (rather than |w| directly) avoids the DC offset of the naive filter.
    """
    d = sino.shape[dim]
    size = max(64, 2 ** int(math.ceil(math.log2(2 * d))))
    n = np.concatenate((np.arange(1, size // 2 + 1, 2), np.arange(size // 2 - 1, 0, -2)))
    f = np.zeros(size)
    f[0] = 0.25
    f[1::2] = -1.0 / (np.pi * n) ** 2
    filt = torch.as_tensor(2 * np.real(np.fft.fft(f)), dtype=sino.dtype, device=sino.device)
    s = sino.movedim(dim, -1)
    out = torch.fft.ifft(torch.fft.fft(s, n=size, dim=-1) * filt, dim=-1).real[..., :d]
    return out.movedim(-1, dim).contiguous()


class LowDoseCT(Operator):
    """Low-dose CT: Poisson noise on transmitted counts, FBP back to HU. Task "denoise".

    I0: incident photons per ray (``math.inf``: noiseless). views: angles evenly over 180 degrees.
    pixel_mm: in-plane pixel size (sets how much attenuation a ray crosses, hence the noise level).
    image_shape: (X, Y) of the slices; only needed to take a sinogram back when X != Y.
    dc_steps: gradient steps taken by ``data_consistency``.
    angles: explicit view angles in degrees (measured sinograms); ``views`` is then their number. Angle 0
    integrates along the Y index axis, the detector running along X. FBP weights assume even spacing.
    """

    task = "denoise"
    name = "LowDoseCT"

    def __init__(self, I0: float = 1e4, views: int = 180, pixel_mm: float = 1.0,
                 mu_water: float = MU_WATER_PER_MM, image_shape: Sequence[int] | None = None, noise_seed: int = 0,
                 dc_steps: int = 5, angles: Sequence[float] | None = None):
        if angles is not None:
            angles = [float(a) for a in angles]
            if not angles or not all(math.isfinite(a) for a in angles):
                raise ConfigError("angles must be a non-empty list of finite degrees")
            views = len(angles)
        self.angles = angles
        if I0 is None:
            I0 = math.inf
        if not I0 > 0:
            raise ConfigError(f"I0 must be > 0 (math.inf for noiseless), got {I0}")
        if int(views) < 1:
            raise ConfigError(f"views must be >= 1, got {views}")
        if not pixel_mm > 0 or not mu_water > 0:
            raise ConfigError("pixel_mm and mu_water must be > 0")
        self.I0, self.views, self.pixel_mm, self.mu_water = float(I0), int(views), float(pixel_mm), float(mu_water)
        self.image_shape = None if not image_shape else tuple(int(s) for s in image_shape)
        self.noise_seed, self.dc_steps = int(noise_seed), int(dc_steps)
        self._cache: dict = {}

    @property
    def noise_level(self) -> float:
        """Relative std of the unattenuated counts, 1/sqrt(I0) (0 when noiseless)."""
        return 0.0 if math.isinf(self.I0) else 1.0 / math.sqrt(self.I0)

    @property
    def scale(self) -> float:
        """c in A = c R: line integral (dimensionless) per HU per pixel crossed."""
        return self.mu_water * self.pixel_mm / 1000.0

    # -- slice bookkeeping -------------------------------------------------------------------------------
    @staticmethod
    def _to_slices(x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 4:
            return x.reshape(-1, 1, *x.shape[2:])
        return x.permute(0, 1, 4, 2, 3).reshape(-1, 1, *x.shape[2:4])

    def slice_shape_for(self, d: int) -> tuple[int, int]:
        if self.image_shape is not None:
            if n_detectors(self.image_shape) != d:
                raise InputError(None, f"sinogram has {d} detector bins but image_shape {self.image_shape} needs "
                                       f"{n_detectors(self.image_shape)}")
            return self.image_shape
        n = int(d / math.sqrt(2))
        for cand in (n - 1, n, n + 1, n + 2):
            if cand > 0 and n_detectors((cand, cand)) == d:
                return cand, cand
        raise InputError(None, f"cannot infer the slice size from {d} detector bins; pass image_shape")

    @property
    def _angles(self) -> tuple[float, ...] | int:
        """The geometry's views: the listed angles, or their number when evenly spread."""
        return tuple(self.angles) if self.angles is not None else self.views

    def projector(self, shape: Sequence[int], dtype=torch.float32, device=None) -> Projector:
        """The projector of this geometry (slices of ``shape``, these views). Sparse ones are shared by every
        operator of the geometry; a large grid_sample one is kept here and freed with this operator."""
        shape, dev = tuple(int(v) for v in shape), str(torch.device("cpu" if device is None else device))
        key = ("projector", shape, dtype, dev)
        if key in self._cache:
            return self._cache[key]
        proj = projector(shape, self._angles, dtype, dev)
        if not proj.sparse:
            self._cache[key] = proj
        return proj

    def _radon(self, x: torch.Tensor) -> torch.Tensor:
        check_image(x)
        r = self.projector(x.shape[2:4], x.dtype, x.device).radon(self._to_slices(x))  # (B*C*Z, D, V)
        b, c = x.shape[:2]
        if x.ndim == 4:
            return r.reshape(b, c, *r.shape[1:])
        return r.reshape(b, c, x.shape[4], *r.shape[1:]).permute(0, 1, 3, 4, 2)

    def _backproject(self, y: torch.Tensor) -> torch.Tensor:
        if y.ndim not in (4, 5) or y.shape[3] != self.views:
            raise InputError(None, f"sinogram must be (B, C, D, {self.views}[, Z]), got {tuple(y.shape)}")
        shape = self.slice_shape_for(y.shape[2])
        proj = self.projector(shape, y.dtype, y.device)
        b, c = y.shape[:2]
        if y.ndim == 4:
            return proj.backproject(y.reshape(-1, *y.shape[2:])).reshape(b, c, *shape)
        z = y.shape[4]
        s = proj.backproject(y.permute(0, 1, 4, 2, 3).reshape(-1, *y.shape[2:4]))
        return s.reshape(b, c, z, *shape).permute(0, 1, 3, 4, 2)

    # -- operator contract -------------------------------------------------------------------------------
    def A(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * self._radon(x)

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        return self.scale * self._backproject(y)

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        y = self.A(x)
        if math.isinf(self.I0):
            return y
        water = self.water_line_integrals(tuple(x.shape[2:4]), x.dtype, x.device)
        water = water if x.ndim == 4 else water[..., None]
        p = y + water
        g = noise_generator(generator, self.noise_seed)
        rate = (self.I0 * torch.exp(-p.double())).to(g.device)
        counts = torch.poisson(rate, generator=g).to(p.device).clamp_min(1.0)
        return (-torch.log(counts / self.I0)).to(y.dtype) - water

    def water_line_integrals(self, shape: Sequence[int], dtype=torch.float32, device=None) -> torch.Tensor:
        """(1, 1, D, V) line integrals through a water-filled (X, Y) slice, cached: post-log data minus these is
        the operator's y (A is linear in HU)."""
        key = ("water", tuple(int(s) for s in shape), dtype, str(device))
        if key not in self._cache:
            ones = torch.ones((1, 1, *key[1]), dtype=dtype, device=device)
            self._cache[key] = self.mu_water * self.pixel_mm * self._radon(ones)
        return self._cache[key]

    def naive_inverse(self, y: torch.Tensor) -> torch.Tensor:
        """Filtered back-projection (Ram-Lak), in HU: R^T(ramp(y)) * pi / (2 V) / c."""
        return self._backproject(ramp_filter(y, dim=2)) * (math.pi / (2 * self.views)) / self.scale

    def lipschitz(self, shape: Sequence[int], dtype=torch.float32, device=None) -> float:
        """||A||^2 for (X, Y) slices (power iterations, shared by every operator of this geometry), 1% high."""
        return self.scale**2 * self.projector(shape, dtype, device).norm_squared

    def data_consistency(self, x: torch.Tensor, y: torch.Tensor, weight: float | None = None) -> torch.Tensor:
        """``dc_steps`` gradient steps, step size 1 / Lipschitz constant (monotone decrease, no tuning).

        Hard (None): on ||A z - y||^2 / 2, step 1/L (L = ||A||^2). Not an exact projection (that would need
        many iterations on an ill-conditioned system): a few steps mostly restore low frequencies.
        Soft (weight w): on ||z - x||^2 / 2 + w ||A z - y||^2 / 2, step 1/(1 + w L); w = 0 returns x. A
        noise-weighted w is the inverse variance of y, about I0 exp(-p) for line integral p.
        """
        check_image(x)
        lip = self.lipschitz(x.shape[2:4], x.dtype, x.device)
        z = x.clone()
        if weight is None:
            for _ in range(self.dc_steps):
                z = z - (1.0 / lip) * self.adjoint(self.A(z) - y)
            return z
        w = float(weight)
        if w < 0:
            raise ConfigError(f"data-consistency weight must be >= 0, got {w}")
        if w == 0:
            return z
        tau = 1.0 / (1.0 + w * lip)
        for _ in range(self.dc_steps):
            z = z - tau * ((z - x) + w * self.adjoint(self.A(z) - y))
        return z

    def dc_group(self) -> tuple:
        # hard and soft data consistency depend on the geometry and the step count, not on the dose or its noise
        return ("parallel-beam", self._angles, self.pixel_mm, self.mu_water, self.dc_steps, self.image_shape)

    def params(self) -> dict[str, Any]:
        p: dict[str, Any] = {"operator": self.name, "views": self.views, "pixel_mm": self.pixel_mm,
                             "mu_water": self.mu_water, "noise_seed": self.noise_seed, "dc_steps": self.dc_steps}
        if not math.isinf(self.I0):  # absent means noiseless: keeps params strict-JSON and collatable
            p["I0"] = self.I0
        if self.image_shape is not None:
            p["image_shape"] = list(self.image_shape)
        if self.angles is not None:
            p["angles"] = list(self.angles)
        return p


class SparseViewCT(LowDoseCT):
    """The same physics with few views (60/90/120...): streak removal is a reconstruction task."""

    task = "recon"
    name = "SparseViewCT"

    def __init__(self, views: int = 60, I0: float = math.inf, **kwargs):
        super().__init__(I0=I0, views=views, **kwargs)


def _log_uniform(rng: np.random.Generator, value) -> float:
    if value is None or np.isscalar(value):
        return math.inf if value is None else float(value)
    lo, hi = (float(v) for v in value)
    if not 0 < lo <= hi:
        raise ConfigError(f"I0 range must satisfy 0 < low <= high, got {value!r}")
    return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))


class RandomLowDoseCT(RandomOperator):
    """I0 drawn log-uniformly from ``I0_range`` (dose spans decades).

    ``sample(seed, image)``: ``image`` is the (B, C, X, Y[, Z]) tensor to be degraded; its slice shape is
    recorded so that non-square sinograms can be taken back.
    """

    operator_cls = LowDoseCT

    def __init__(self, I0_range=(1e3, 1e5), views: int = 180, pixel_mm: float = 1.0,
                 mu_water: float = MU_WATER_PER_MM, dc_steps: int = 5):
        self.I0_range, self.views_choices = I0_range, [int(views)]
        self.kw = dict(pixel_mm=float(pixel_mm), mu_water=float(mu_water), dc_steps=int(dc_steps))
        _log_uniform(np.random.default_rng(0), I0_range)  # validate now, not at the first sample

    def sample(self, seed: int, image=None) -> LowDoseCT:
        rng = np.random.default_rng(int(seed))
        views = self.views_choices[int(rng.integers(len(self.views_choices)))]
        i0 = _log_uniform(rng, self.I0_range)
        noise_seed = int(rng.integers(0, 2**31 - 1))
        shape = None if image is None else tuple(int(s) for s in image.shape[2:4])  # (B, C, X, Y[, Z])
        return self.operator_cls(I0=i0, views=views, image_shape=shape, noise_seed=noise_seed, **self.kw)


class RandomSparseViewCT(RandomLowDoseCT):
    """views drawn uniformly from ``views`` (e.g. 60/90/120); I0 noiseless (None) or a number or a range."""

    operator_cls = SparseViewCT

    def __init__(self, views: Sequence[int] = (60, 90, 120), I0_range=None, pixel_mm: float = 1.0,
                 mu_water: float = MU_WATER_PER_MM, dc_steps: int = 5):
        super().__init__(I0_range=I0_range, views=1, pixel_mm=pixel_mm, mu_water=mu_water, dc_steps=dc_steps)
        if not views or any(int(v) < 1 for v in views):
            raise ConfigError(f"views must be a non-empty list of positive ints, got {views!r}")
        self.views_choices = [int(v) for v in views]
