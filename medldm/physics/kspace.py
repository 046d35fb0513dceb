"""Cartesian MRI undersampling: y = M F(x e^{i phi}) + complex Gaussian noise on the sampled entries.

Geometry. Mode "2d": a 1D mask over the phase-encode axis Y, readout X fully sampled, 2D FFT over (X, Y);
a (B, C, X, Y, Z) volume is a stack of Z slices sharing that mask (multi-slice 2D acquisition). Mode "3d":
a 2D mask over (Y, Z), two phase-encode directions, 3D FFT over (X, Y, Z).

Real images, exact algebra. A maps real x to complex k-space, so its adjoint is taken under the real inner
product Re<a, b>: A^H y = Re(e^{-i phi} F^H M y). Because of the real part, "paste the measured lines into
k-space" is *not* a projection when the mask is not point-symmetric (a real image's k-space is Hermitian,
so each measured line also fixes its mirror line). Hard data consistency is therefore the exact
real-constrained projection x + A^+ (y - A x): without phase in closed form (paste y and its Hermitian mirror,
averaged where both were measured: two FFTs), with phase by CGLS.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from medldm.errors import ConfigError, InputError
from medldm.physics._common import KeptForLastMeasurement, cg, cgls, check_image, noise_generator, randn
from medldm.physics.base import Operator, RandomOperator
from medldm.physics.fft import fftnc, hermitian_part, ifftnc, mirror_frequencies, uncentre

MASK_TYPES = ("random", "equispaced")
MODES = ("2d", "3d")


def _centre_slice(n: int, fraction: float) -> slice:
    # Same placement as fastMRI/MONAI: the block straddles index n // 2, where the centred FFT puts DC.
    c = int(round(n * fraction))
    if fraction > 0:
        c = max(c, 1)
    pad = (n - c + 1) // 2
    return slice(pad, pad + c)


def draw_mask_1d(width: int, acceleration: float, center_fraction: float, mask_type: str = "random",
                 seed: int = 0) -> np.ndarray:
    """fastMRI-style 1D phase-encode mask, drawn by MONAI's k-space mask transforms with their own RandomState.

    Random masks keep each outer line with a fixed probability, so the measured acceleration scatters
    around the nominal one (a few percent at W=256); equispaced masks hit it almost exactly.
    """
    if mask_type not in MASK_TYPES:
        raise ConfigError(f"mask_type must be one of {MASK_TYPES}, got {mask_type!r}")
    if acceleration <= 1:
        # MONAI's equispaced arange stops at width - 2, so "fully sampled" would miss the last line.
        return np.ones(width, dtype=bool)
    from monai.apps.reconstruction.transforms.array import EquispacedKspaceMask, RandomKspaceMask

    cls = RandomKspaceMask if mask_type == "random" else EquispacedKspaceMask
    t = cls(center_fractions=[float(center_fraction)], accelerations=[float(acceleration)], spatial_dims=1,
            is_complex=False)
    t.set_random_state(seed=int(seed))
    t(np.zeros((1, width), dtype=np.float32))
    return t.mask.reshape(-1).detach().cpu().numpy() > 0


def draw_mask_2d(shape: Sequence[int], acceleration: float, center_fraction: float, mask_type: str = "random",
                 seed: int = 0) -> np.ndarray:
    """2D phase-encode mask over (Y, Z) for 3D acquisitions (no MONAI equivalent, so drawn here).

    A centre block of ``center_fraction`` of each axis is always sampled. "random": the rest is a uniform
    draw without replacement of exactly round(Y*Z/acceleration) points in total. "equispaced": a regular
    lattice with integer steps ry * rz = round(acceleration) (ry <= rz) at random offsets, plus the block,
    so the measured acceleration is slightly below nominal.
    """
    if mask_type not in MASK_TYPES:
        raise ConfigError(f"mask_type must be one of {MASK_TYPES}, got {mask_type!r}")
    ny, nz = (int(s) for s in shape)
    if acceleration <= 1:
        return np.ones((ny, nz), dtype=bool)
    rng = np.random.default_rng(int(seed))
    mask = np.zeros((ny, nz), dtype=bool)
    mask[_centre_slice(ny, center_fraction), _centre_slice(nz, center_fraction)] = True
    if mask_type == "random":
        target = int(round(ny * nz / acceleration))
        others = np.flatnonzero(~mask.ravel())
        k = int(np.clip(target - mask.sum(), 0, others.size))
        mask.ravel()[rng.choice(others, size=k, replace=False)] = True
    else:
        r = max(1, int(round(acceleration)))
        ry = max(d for d in range(1, r + 1) if r % d == 0 and d * d <= r)
        rz = r // ry
        mask[int(rng.integers(ry))::ry, int(rng.integers(rz))::rz] = True
    return mask


def n_phase_terms(ndim: int) -> int:
    """Number of coefficients of the order-2 polynomial phase over ``ndim`` axes (6 in 2D, 10 in 3D)."""
    return 1 + ndim + ndim * (ndim + 1) // 2


def phase_map(coeffs: Sequence[float], shape: Sequence[int], dtype=torch.float32, device=None) -> torch.Tensor:
    """phi = c0 + sum c_i u_i + sum_{i<=j} c_ij u_i u_j on voxel-centre coordinates u in (-1, 1).

    Order 2 keeps the phase smooth (B0/coil-like), so it spreads k-space by only a few samples.
    """
    shape = tuple(int(s) for s in shape)
    if len(coeffs) != n_phase_terms(len(shape)):
        raise ConfigError(f"phase_coeffs needs {n_phase_terms(len(shape))} entries for {len(shape)} axes, "
                          f"got {len(coeffs)}")
    axes = [(2 * torch.arange(n, dtype=torch.float64) + 1) / n - 1 for n in shape]
    u = torch.meshgrid(*axes, indexing="ij")
    terms = [torch.ones(shape, dtype=torch.float64), *u]
    terms += [u[i] * u[j] for i in range(len(u)) for j in range(i, len(u))]
    phi = sum(float(c) * t for c, t in zip(coeffs, terms))
    return phi.to(dtype=dtype, device=device)


def _encode_mask(mask: np.ndarray) -> str:
    # A '0'/'1' string: readable, JSON-compact, and collates as one string in a DataLoader batch.
    return "".join("1" if v else "0" for v in np.asarray(mask, dtype=bool).ravel())


class CartesianUndersampling(Operator):
    """Single-coil Cartesian undersampling with optional smooth phase and complex Gaussian noise.

    Either an explicit ``mask`` (1D over Y in mode "2d", 2D over (Y, Z) in mode "3d"; array, nested list or
    '0'/'1' string with ``mask_shape``), or a mask generated for whatever size the image has from
    (``acceleration``, ``center_fraction``, ``mask_type``, ``mask_seed``): deterministic, so params stay small.

    ``sigma`` is the std of the real and of the imaginary part of the k-space noise; with the orthonormal
    FFT it is also the per-component image-domain noise std of a fully sampled reconstruction.
    """

    task = "recon"

    def __init__(self, mask=None, mode: str = "2d", acceleration: float = 1.0, center_fraction: float = 0.0,
                 mask_type: str = "random", mask_seed: int = 0, sigma: float = 0.0,
                 phase_coeffs: Sequence[float] | None = None, noise_seed: int = 0, mask_shape=None,
                 dc_iters: int = 50):
        if mode not in MODES:
            raise ConfigError(f"mode must be one of {MODES}, got {mode!r}")
        if mask_type not in MASK_TYPES:
            raise ConfigError(f"mask_type must be one of {MASK_TYPES}, got {mask_type!r}")
        if not acceleration >= 1:
            raise ConfigError(f"acceleration must be >= 1, got {acceleration}")
        if not sigma >= 0:
            raise ConfigError(f"sigma must be >= 0, got {sigma}")
        self.mode = mode
        self.mask_ndim = 1 if mode == "2d" else 2
        self.acceleration, self.center_fraction = float(acceleration), float(center_fraction)
        self.mask_type, self.mask_seed = mask_type, int(mask_seed)
        self.sigma, self.noise_seed, self.dc_iters = float(sigma), int(noise_seed), int(dc_iters)
        self.phase_coeffs = None if phase_coeffs is None or len(phase_coeffs) == 0 else [float(c) for c in phase_coeffs]
        if self.phase_coeffs is not None and len(self.phase_coeffs) != n_phase_terms(2 if mode == "2d" else 3):
            raise ConfigError(f"phase_coeffs needs {n_phase_terms(2 if mode == '2d' else 3)} entries in mode "
                              f"{mode!r}, got {len(self.phase_coeffs)}")
        self._mask = None
        if mask is not None:
            if isinstance(mask, str):
                if mask_shape is None:
                    mask_shape = [len(mask)]
                arr = np.frombuffer(mask.encode(), dtype=np.uint8) == ord("1")
                arr = arr.reshape([int(s) for s in mask_shape])
            else:
                arr = np.asarray(mask.detach().cpu() if isinstance(mask, torch.Tensor) else mask).astype(bool)
            if arr.ndim != self.mask_ndim:
                raise ConfigError(f"mode {mode!r} needs a {self.mask_ndim}D mask, got shape {arr.shape}")
            if not arr.any():
                raise ConfigError("mask samples nothing")
            self._mask = arr
        self._cache: dict = {}

    @property
    def noise_level(self) -> float:
        return self.sigma

    def mask_for(self, shape: Sequence[int]) -> np.ndarray:
        """The boolean mask for phase-encode size ``shape`` ((Y,) in mode "2d", (Y, Z) in mode "3d")."""
        shape = tuple(int(s) for s in shape)
        if self._mask is not None:
            if self._mask.shape != shape:
                raise InputError(None, f"mask has shape {self._mask.shape} but the image's phase-encode "
                                       f"size is {shape}")
            return self._mask
        key = ("mask", shape)
        if key not in self._cache:
            if self.mode == "2d":
                m = draw_mask_1d(shape[0], self.acceleration, self.center_fraction, self.mask_type, self.mask_seed)
            else:
                m = draw_mask_2d(shape, self.acceleration, self.center_fraction, self.mask_type, self.mask_seed)
            self._cache[key] = m
        return self._cache[key]

    def measured_acceleration(self, shape: Sequence[int]) -> float:
        m = self.mask_for(shape)
        return m.size / float(m.sum())

    def _geometry(self, t: torch.Tensor):
        """FFT dims, broadcastable mask and phase factor e^{i phi} (or None) for a tensor of t's shape."""
        if self.mode == "2d":
            if t.ndim not in (4, 5):
                raise InputError(None, f"mode '2d' expects (B, C, X, Y[, Z]), got {tuple(t.shape)}")
            dims, pe, ph_shape = (2, 3), (t.shape[3],), tuple(t.shape[2:4])
            mview = [1, 1, 1, t.shape[3]] + [1] * (t.ndim - 4)
            pview = [1, 1, *ph_shape] + [1] * (t.ndim - 4)
        else:
            if t.ndim != 5:
                raise InputError(None, f"mode '3d' expects (B, C, X, Y, Z), got {tuple(t.shape)}")
            dims, pe, ph_shape = (2, 3, 4), tuple(t.shape[3:5]), tuple(t.shape[2:5])
            mview = [1, 1, 1, *pe]
            pview = [1, 1, *ph_shape]
        real = t.real.dtype if t.is_complex() else t.dtype
        m = torch.as_tensor(self.mask_for(pe), device=t.device).to(real).reshape(mview)
        ph = None
        if self.phase_coeffs is not None:
            key = ("phase", ph_shape, real, str(t.device))
            if key not in self._cache:
                phi = phase_map(self.phase_coeffs, ph_shape, dtype=real, device=t.device)
                self._cache[key] = torch.polar(torch.ones_like(phi), phi).reshape(pview)
            ph = self._cache[key]
        return dims, m, ph

    def A(self, x: torch.Tensor) -> torch.Tensor:
        check_image(x)
        dims, m, ph = self._geometry(x)
        z = x.to(torch.complex128 if x.dtype == torch.float64 else torch.complex64)
        if ph is not None:
            z = z * ph
        return fftnc(z, dims) * m

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        if not y.is_complex():
            raise InputError(None, f"k-space must be complex, got {y.dtype}")
        dims, m, ph = self._geometry(y)
        z = ifftnc(y * m, dims)
        if ph is not None:
            z = z * ph.conj()
        return z.real.contiguous()

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        y = self.A(x)
        if self.sigma > 0:
            g = noise_generator(generator, self.noise_seed)
            noise = torch.complex(randn(y.shape, g, y), randn(y.shape, g, y))
            _, m, _ = self._geometry(x)
            y = y + self.sigma * noise * m
        return y

    def naive_inverse(self, y: torch.Tensor) -> torch.Tensor:
        """Zero-filled reconstruction as the real part of e^{-i phi} F^H y (= the adjoint).

        The real part, not the magnitude: it stays linear, removes the known phase instead of rectifying
        it, and keeps noise zero-mean. Lines measured on one side only enter at half weight (their Hermitian
        mirror is zero); ``data_consistency(zeros, y)`` gives the pseudo-inverse if that matters.
        """
        return self.adjoint(y)

    def zero_filled_magnitude(self, y: torch.Tensor) -> torch.Tensor:
        """|e^{-i phi} F^H y|: the usual zero-filled image for *measured* k-space, whose object is complex
        with an unknown phase (the real part would discard signal there). Nonlinear; not the adjoint."""
        dims, m, ph = self._geometry(y)
        z = ifftnc(y * m, dims)
        return (z * ph.conj() if ph is not None else z).abs()

    def data_consistency(self, x: torch.Tensor, y: torch.Tensor, weight: float | None = None) -> torch.Tensor:
        """Hard (None): real-constrained projection x + A^+(y - A x), idempotent; by CGLS (at most ``dc_iters``) with
        phase, in closed form without (``_dc_without_phase``). With phase
        the real constraint ties each line to a phase-blurred mirror: the system is ill-conditioned and may
        need hundreds of iterations (and float32 amplifies rounding); raise ``dc_iters`` or prefer the soft
        step, whose system is well conditioned (eigenvalues in [1, 1 + w]).

        Soft (weight w >= 0): the MAP blend argmin_z ||z - x||^2 + w ||A z - y||^2, i.e.
        (I + w A^H A)^{-1}(x + w A^H y), solved by CG. For complex images this is exactly the per-sample
        k-space blend k = (1-m) kx + m (kx + w y)/(1 + w); take w = lambda / sigma^2 to weight by the noise.
        w = 0 returns x; w -> inf tends to the hard projection.
        """
        check_image(x)
        w = None if weight is None else float(weight)
        if w is not None and w < 0:
            raise ConfigError(f"data-consistency weight must be >= 0, got {w}")
        if w == 0:
            return x.clone()
        if self._diagonal_in_kspace():
            return self._dc_without_phase(x, y, w)
        return self._iterative_dc(x, y, w)

    def _iterative_dc(self, x: torch.Tensor, y: torch.Tensor, w: float | None) -> torch.Tensor:
        """The hard projection (``w`` None) by CGLS or the soft step (``w`` > 0) by CG, on ``A`` and ``adjoint``."""
        if w is None:
            return x + cgls(self.A, self.adjoint, y - self.A(x), like=x, iters=self.dc_iters)
        rhs = x + w * self.adjoint(y)
        return cg(lambda v: v + w * self.adjoint(self.A(v)), rhs, x, iters=self.dc_iters)

    def _diagonal_in_kspace(self) -> bool:
        """Whether A^H A is diagonal in a real image's spectrum: one coil and no phase (coil maps say no)."""
        return self.phase_coeffs is None

    def _dc_without_phase(self, x: torch.Tensor, y: torch.Tensor, w: float | None) -> torch.Tensor:
        """Both data consistencies in closed form when there is no phase, on the half spectrum of the real image.

        On real images A^H A = F^H D F with D = (M + mirror(M)) / 2 in {0, 1/2, 1}, and F Re(F^H v) = hermitian(v),
        so the hard projection sets every frequency measured directly or through its Hermitian mirror to the
        average of those measurements (``_measured_half_spectrum``) and keeps the others, and the soft step blends
        k = (k_x + w D y_avg) / (1 + w D). The readout axis is fully sampled, so only the phase-encode axes need
        transforming, and a real image's spectrum along them is Hermitian: one rfft and one irfft per call (the
        same projection as CGLS to float rounding: a test compares; 4x faster on a whole volume)."""
        given = x.dtype
        x = x if given in (torch.float32, torch.float64) else x.float()  # no half-precision FFTs on the CPU
        dims, m, _ = self._geometry(x)
        encode = dims[1:]  # the readout X (dims[0]) is fully sampled
        target, d = self._measured_half_spectrum(x, y, dims, m)
        k = torch.fft.rfftn(x, dim=encode, norm="ortho")
        k = torch.where(d > 0, target, k) if w is None else (k + (w * d) * target) / (1 + w * d)
        return torch.fft.irfftn(k, s=[x.shape[i] for i in encode], dim=encode, norm="ortho").to(given)

    def _measured_half_spectrum(self, x: torch.Tensor, y: torch.Tensor, dims, m) -> tuple[torch.Tensor, torch.Tensor]:
        """(y averaged over each frequency and its Hermitian mirror where measured, D) on the phase-encode axes'
        half spectrum in torch's rfftn layout (uncentred: the centring becomes a phase ramp), readout in image
        space; kept for the last ``y`` (``KeptForLastMeasurement``)."""
        return self._cache.setdefault("measured", KeptForLastMeasurement()).get(
            y, (tuple(x.shape), x.dtype, x.device), lambda: self._half_spectrum(x, y, dims, m))

    def _half_spectrum(self, x: torch.Tensor, y: torch.Tensor, dims, m) -> tuple[torch.Tensor, torch.Tensor]:
        encode = dims[1:]
        complex_dtype = torch.complex128 if x.dtype == torch.float64 else torch.complex64
        y_h = ifftnc(y.to(complex_dtype), dims[:1])
        d = (m + mirror_frequencies(m, encode)) / 2
        avg = hermitian_part(m * y_h, encode) / torch.where(d > 0, d, 1) * (d > 0)
        avg, d = uncentre(avg, encode), torch.fft.ifftshift(d, dim=encode).to(x.dtype)  # D is real and symmetric
        half = [slice(None)] * x.ndim
        half[encode[-1]] = slice(0, x.shape[encode[-1]] // 2 + 1)
        return avg[tuple(half)].contiguous(), d[tuple(half)].contiguous()

    def params(self) -> dict[str, Any]:
        p: dict[str, Any] = {"operator": "CartesianUndersampling", "mode": self.mode, "sigma": self.sigma,
                             "noise_seed": self.noise_seed, "dc_iters": self.dc_iters}
        if self._mask is not None:
            p["mask"] = _encode_mask(self._mask)
            p["mask_shape"] = list(self._mask.shape)
        else:
            p.update(acceleration=self.acceleration, center_fraction=self.center_fraction,
                     mask_type=self.mask_type, mask_seed=self.mask_seed)
        if self.phase_coeffs is not None:
            p["phase_coeffs"] = list(self.phase_coeffs)
        return p


def _range(value, name: str) -> tuple[float, float]:
    lo, hi = (value, value) if np.isscalar(value) else tuple(value)
    if not 0 <= lo <= hi:
        raise ConfigError(f"{name} must be a number >= 0 or a (low, high) range, got {value!r}")
    return float(lo), float(hi)


class RandomCartesianUndersampling(RandomOperator):
    """fastMRI-style random masks: one (center_fraction, acceleration) pair chosen uniformly per volume.

    ``sigma``: a number or a (low, high) range drawn uniformly. ``phase``: draw a smooth phase with a
    uniform constant in (-pi, pi) and the other order-1/2 coefficients uniform in (-phase_max, phase_max).
    """

    def __init__(self, mask_type: str = "random", center_fractions: Sequence[float] = (0.08, 0.04),
                 accelerations: Sequence[float] = (4.0, 8.0), mode: str = "2d", phase: bool = False,
                 phase_max: float = math.pi / 2, sigma=0.0, dc_iters: int = 50):
        if len(center_fractions) != len(accelerations) or not accelerations:
            raise ConfigError("center_fractions and accelerations must be non-empty and the same length")
        if mask_type not in MASK_TYPES:
            raise ConfigError(f"mask_type must be one of {MASK_TYPES}, got {mask_type!r}")
        if mode not in MODES:
            raise ConfigError(f"mode must be one of {MODES}, got {mode!r}")
        self.mask_type, self.mode, self.phase, self.phase_max = mask_type, mode, bool(phase), float(phase_max)
        self.center_fractions = [float(c) for c in center_fractions]
        self.accelerations = [float(a) for a in accelerations]
        self.sigma = _range(sigma, "sigma")
        self.dc_iters = int(dc_iters)

    def sample(self, seed: int, image: torch.Tensor | None = None) -> CartesianUndersampling:
        rng = np.random.default_rng(int(seed))
        # Fixed draw order, so switching phase or sigma on does not change the masks of a seed.
        i = int(rng.integers(len(self.accelerations)))
        mask_seed, noise_seed = (int(v) for v in rng.integers(0, 2**31 - 1, size=2))
        sigma = float(rng.uniform(*self.sigma)) if self.sigma[1] > self.sigma[0] else self.sigma[0]
        raw = rng.uniform(-1.0, 1.0, size=n_phase_terms(3))
        coeffs = None
        if self.phase:
            n = n_phase_terms(2 if self.mode == "2d" else 3)
            coeffs = [float(raw[0] * math.pi)] + [float(c * self.phase_max) for c in raw[1:n]]
        return CartesianUndersampling(mode=self.mode, acceleration=self.accelerations[i],
                                      center_fraction=self.center_fractions[i], mask_type=self.mask_type,
                                      mask_seed=mask_seed, sigma=sigma, phase_coeffs=coeffs,
                                      noise_seed=noise_seed, dc_iters=self.dc_iters)
