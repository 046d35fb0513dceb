"""Multi-coil Cartesian MRI (SENSE): y_c = M F(S_c x) + complex Gaussian noise, for every coil c.

x is the real magnitude image the networks see; the coil maps S_c carry the coil sensitivities *and* the
object's phase (``medldm.physics.coils``), so the algebra stays the one of ``CartesianUndersampling``:
a real-to-complex linear operator with the adjoint A^H y = Re(sum_c conj(S_c) F^H M y_c) under Re<a, b>,
hard data consistency by CGLS (exact projection onto {A x = y} among real images), soft by CG, both in hybrid
space (``medldm.physics.sense_hybrid``).
One coil with |S| = 1 is single-coil k-space whose image phase is a map, not a polynomial.

Maps are either explicit (estimated from a measurement, (C, X, Y) or per slice (C, X, Y, Z)), or simulated
for whatever image size the operator meets from (coils, coil_seed, coil_radius, phase_coeffs), like the
masks, so a simulated operator's ``params()`` rebuild it exactly. Mode "2d" only: multi-slice 2D acquisitions.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from medldm.errors import ConfigError, InputError
from medldm.physics._common import check_image, noise_generator, randn
from medldm.physics.base import NONNEGATIVE_ROUNDS
from medldm.physics.coils import birdcage_maps
from medldm.physics.fft import fftnc, ifftnc
from medldm.physics.kspace import CartesianUndersampling, RandomCartesianUndersampling, phase_map
from medldm.physics.sense_hybrid import HybridSense


class MultiCoilCartesian(CartesianUndersampling):
    """SENSE model of multi-coil Cartesian k-space; measurements are (B, C, X, Y[, Z]) complex, C = coils.

    ``maps``: explicit complex maps (C, X, Y[, Z]) (then ``maps_recipe`` says how they were made, for
    provenance), or None to simulate ``coils`` birdcage maps (radius ``coil_radius`` of the field of view,
    ``coil_seed`` for the per-coil phase) times e^{i phi} of ``phase_coeffs``. Other arguments: the mask and
    noise of :class:`CartesianUndersampling` (mode "2d").
    """

    def __init__(self, maps=None, coils: int = 8, coil_seed: int = 0, coil_radius: float = 1.5,
                 maps_recipe: dict | None = None, projection_weight: float | None = None, **kwargs):
        super().__init__(**kwargs)
        # Estimated maps and phase leave the model inexact (the truth's residual: 2.5% at 4x, 6.7% at 8x on the
        # held-out MNI slab), and exact projections fit that error, the more the more often they are repeated.
        # ``projection_weight`` w replaces the projection by the soft step argmin ||z - x||^2 + w ||A z - y||^2
        # everywhere one is asked for (guide, refiner cascade, final DC). Set on two slices of a training volume
        # (8 coils, CG-SENSE start): TV-POCS 35.8 / 14.3 dB (4x / 8x) with projections, 37.1 / 20.7 with w = 1,
        # 37.9 / 19.2 with w = 4; that guide and 32 rounds of w = 1 and x >= 0 at the end: 38.5 / 21.5.
        if projection_weight is not None and not projection_weight > 0:
            raise ConfigError(f"projection_weight must be > 0, got {projection_weight}")
        self.projection_weight = None if projection_weight is None else float(projection_weight)
        if self.mode != "2d":
            raise ConfigError("multi-coil k-space is implemented for 2D (multi-slice) acquisitions only")
        self.coil_seed, self.coil_radius, self.maps_recipe = int(coil_seed), float(coil_radius), maps_recipe
        self._maps = None
        if maps is not None:
            maps = torch.as_tensor(maps)
            if not maps.is_complex() or maps.ndim not in (3, 4) or maps.shape[0] < 1:
                raise ConfigError(f"maps must be complex (C, X, Y[, Z]) with C >= 1, got {maps.dtype} {tuple(maps.shape)}")
            if not torch.isfinite(torch.view_as_real(maps)).all():
                raise ConfigError("maps contain NaN/Inf")
            self._maps = maps.to(torch.complex64)
            coils = maps.shape[0]
        if int(coils) < 1:
            raise ConfigError(f"coils must be >= 1, got {coils}")
        self.coils = int(coils)

    def maps_for(self, spatial: Sequence[int], dtype, device) -> torch.Tensor:
        """Maps shaped to broadcast over a (B, C, X, Y[, Z]) tensor with those spatial sizes: (1, C, X, Y[, 1|Z])."""
        spatial = tuple(int(s) for s in spatial)
        if self._maps is not None:
            m = self._maps
            if tuple(m.shape[1:3]) != spatial[:2] or (m.ndim == 4 and (len(spatial) < 3 or m.shape[3] != spatial[2])):
                raise InputError(None, f"coil maps of shape {tuple(m.shape[1:])} do not fit an image of shape {spatial}")
        else:
            key = ("maps", spatial[:2], str(device))
            if key not in self._cache:
                m = torch.from_numpy(birdcage_maps(self.coils, spatial[:2], self.coil_radius, self.coil_seed))
                if self.phase_coeffs is not None:
                    phi = phase_map(self.phase_coeffs, spatial[:2], dtype=torch.float64)
                    m = m * torch.polar(torch.ones_like(phi), phi).to(m.dtype)
                self._cache[key] = m.to(device)
            m = self._cache[key]
        m = m.to(device=device, dtype=dtype)[None]
        return m if m.ndim == len(spatial) + 2 else m.reshape(*m.shape, *([1] * (len(spatial) + 2 - m.ndim)))

    def _parts(self, t: torch.Tensor):
        dims, m, _ = self._geometry(t)
        cdtype = torch.complex128 if t.dtype in (torch.float64, torch.complex128) else torch.complex64
        return dims, m, self.maps_for(t.shape[2:], cdtype, t.device)

    def A(self, x: torch.Tensor) -> torch.Tensor:
        check_image(x)
        if x.shape[1] != 1:
            raise InputError(None, f"a multi-coil measurement needs one image channel, got {x.shape[1]}")
        dims, m, maps = self._parts(x)
        return fftnc(x.to(maps.dtype) * maps, dims) * m

    def coil_combined(self, y: torch.Tensor) -> torch.Tensor:
        """sum_c conj(S_c) F^H M y_c: the complex SENSE combination of the zero-filled coil images (B, 1, ...)."""
        if not y.is_complex():
            raise InputError(None, f"k-space must be complex, got {y.dtype}")
        if y.shape[1] != self.coils:
            raise InputError(None, f"k-space has {y.shape[1]} coils, the operator {self.coils}")
        dims, m, maps = self._parts(y)
        return (ifftnc(y * m, dims) * maps.conj()).sum(1, keepdim=True)

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        return self.coil_combined(y).real.contiguous()

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        y = self.A(x)
        if self.sigma > 0:
            g = noise_generator(generator, self.noise_seed)
            _, m, _ = self._geometry(x)
            y = y + self.sigma * torch.complex(randn(y.shape, g, y), randn(y.shape, g, y)) * m
        return y

    SENSE_ITERATIONS = 30

    def sense(self, y: torch.Tensor, iters: int = SENSE_ITERATIONS) -> torch.Tensor:
        """CG-SENSE: the complex image z (B, 1, ...) minimising ||M F(S z) - y|| by CG on the normal equations from
        zero (CGLS's iterates), stopped after ``iters`` (early stopping is its regularisation). The phase it finds
        is the part the maps do not carry."""
        if not y.is_complex():
            raise InputError(None, f"k-space must be complex, got {y.dtype}")
        return self._hybrid(y).sense(y, iters)

    def _hybrid(self, t: torch.Tensor) -> HybridSense:
        """The solvers' algebra (``medldm.physics.sense_hybrid``) for tensors shaped and typed like ``t``."""
        double = t.dtype in (torch.float64, torch.complex128)
        key = ("hybrid", tuple(t.shape[2:]), double, str(t.device))
        if key not in self._cache:  # the maps are fetched (a copy to the device and dtype) only when it is new
            _, _, maps = self._parts(t)
            mask = torch.as_tensor(self.mask_for((t.shape[3],)), device=t.device).to(maps.real.dtype)
            self._cache[key] = HybridSense(maps, mask)
        return self._cache[key]

    def naive_inverse(self, y: torch.Tensor) -> torch.Tensor:
        """|CG-SENSE| (``sense``): with coils, the zero-filled combination keeps the aliasing that the coils can
        undo, so the models start from the parallel-imaging estimate (not linear, unlike the single-coil adjoint)."""
        return self.sense(y).abs()

    def _diagonal_in_kspace(self) -> bool:
        return False  # the coil maps (and phase) couple frequencies: CG / CGLS

    def data_consistency(self, x: torch.Tensor, y: torch.Tensor, weight: float | None = None) -> torch.Tensor:
        """As :class:`CartesianUndersampling`'s; a hard request is the soft step ``projection_weight`` when set."""
        return super().data_consistency(x, y, self.projection_weight if weight is None else weight)

    def _iterative_dc(self, x: torch.Tensor, y: torch.Tensor, w: float | None) -> torch.Tensor:
        """The same solvers as :class:`CartesianUndersampling`'s, run in hybrid space."""
        given = x.dtype
        x = x if given in (torch.float32, torch.float64) else x.float()  # no half-precision FFTs on the CPU
        hybrid = self._hybrid(x)
        out = hybrid.projection(x, y, self.dc_iters) if w is None else hybrid.soft_step(x, y, w, self.dc_iters)
        return out.to(given)

    def consistent_nonnegative(self, x: torch.Tensor, y: torch.Tensor, weight: float | None = None,
                               rounds: int = NONNEGATIVE_ROUNDS) -> torch.Tensor:
        """As :class:`Operator`'s; with soft steps every round stays in hybrid layout (the same iterates)."""
        w = self.projection_weight if weight is None else float(weight)
        if w is None or not w > 0 or x.dtype not in (torch.float32, torch.float64):
            return super().consistent_nonnegative(x, y, weight=weight, rounds=rounds)
        check_image(x)
        return self._hybrid(x).soft_steps_nonnegative(x, y, w, self.dc_iters, rounds)

    def zero_filled_magnitude(self, y: torch.Tensor) -> torch.Tensor:
        """|SENSE combination|: the zero-filled image of measured k-space, robust to a wrong phase estimate."""
        return self.coil_combined(y).abs()

    def zero_filled_rss(self, y: torch.Tensor) -> torch.Tensor:
        """Root sum of squares of the zero-filled coil images (B, 1, ...): the usual multi-coil baseline."""
        dims, m, _ = self._geometry(y)
        return ifftnc(y * m, dims).abs().pow(2).sum(1, keepdim=True).sqrt()

    def select(self, axis: int, index: torch.Tensor) -> "MultiCoilCartesian":
        if self._maps is None or self._maps.ndim == 3 or axis != 2:
            return self
        return MultiCoilCartesian(maps=self._maps.index_select(3, index.cpu()), maps_recipe=self.maps_recipe,
                                  projection_weight=self.projection_weight, **self._mask_params())

    def _mask_params(self) -> dict[str, Any]:
        p = super().params()
        for k in ("operator", "phase_coeffs"):
            p.pop(k, None)
        return p

    def params(self) -> dict[str, Any]:
        p = {**super().params(), "operator": "MultiCoilCartesian", "coils": self.coils}
        if self.projection_weight is not None:
            p["projection_weight"] = self.projection_weight
        if self._maps is None:
            p.update(coil_seed=self.coil_seed, coil_radius=self.coil_radius)
        else:  # estimated maps are rebuilt from the measurement by their recipe, not stored in the provenance
            p.pop("phase_coeffs", None)
            digest = hashlib.sha256(torch.view_as_real(self._maps).numpy().tobytes()).hexdigest()
            p.update(maps_recipe=self.maps_recipe or {"source": "explicit"}, maps_sha256=digest)
        return p


class RandomMultiCoilUndersampling(RandomCartesianUndersampling):
    """fastMRI-style masks as the single-coil ones, plus ``coils`` birdcage maps (radius drawn from
    ``coil_radius``, a number or a range) and, with ``phase``, a smooth random image phase folded into them."""

    def __init__(self, coils: int = 8, coil_radius=(1.2, 2.0), projection_weight: float | None = None, **kwargs):
        super().__init__(**kwargs)
        # the sampled operators' soft data-consistency step (None: the hard projection). Measured k-space runs
        # with 1.0 (``from_kspace``); training with it costs a few well-conditioned CG steps per projection instead
        # of up to ``dc_iters`` ill-conditioned ones (a real image under complex maps)
        if projection_weight is not None and not projection_weight > 0:
            raise ConfigError(f"projection_weight must be > 0, got {projection_weight}")
        self.projection_weight = None if projection_weight is None else float(projection_weight)
        if self.mode != "2d":
            raise ConfigError("multi-coil k-space is implemented for 2D (multi-slice) acquisitions only")
        if int(coils) < 1:
            raise ConfigError(f"coils must be >= 1, got {coils}")
        lo, hi = (coil_radius, coil_radius) if np.isscalar(coil_radius) else tuple(coil_radius)
        if not 0 < lo <= hi:
            raise ConfigError(f"coil_radius must be > 0 or a (low, high) range, got {coil_radius!r}")
        self.coils, self.coil_radius = int(coils), (float(lo), float(hi))

    def sample(self, seed: int, image: torch.Tensor | None = None) -> MultiCoilCartesian:
        single = super().sample(seed, image)
        rng = np.random.default_rng([int(seed), 1])  # its own stream: the masks of a seed stay the single-coil ones
        radius = float(rng.uniform(*self.coil_radius))
        kw = {k: v for k, v in single.params().items() if k != "operator"}
        return MultiCoilCartesian(coils=self.coils, coil_seed=int(rng.integers(2**31 - 1)), coil_radius=radius,
                                  projection_weight=self.projection_weight, **kw)
