"""The SENSE algebra in hybrid space, where the solvers of :class:`~medldm.physics.sense.MultiCoilCartesian` run.

The readout axis X is fully sampled and the mask depends on the phase-encode index alone, so the centred FFT along
X is a unitary factor shared by every coil: ||M F_XY(S x) - y|| = ||M F_Y(S x) - F_X^H y||. The measurement is
taken to hybrid space (x, ky) once, and every iteration then needs 1D FFTs along Y only, half the transforms.
The centring shifts are folded into the maps, the mask and the measurement once (F_c = shift F ishift, and a
shift commutes with products), so no coil-sized array is shifted per iteration; the layout is (B, Z, X, C, Y), so
each readout line's coils are contiguous and the problem, which decouples line by line, runs in blocks of lines
that fit the CPU's cache. The solutions are those of the generic CG / CGLS on ``A`` and ``adjoint`` to float rounding
(tests compare; the soft step stops earlier, at ``SOFT_STEP_TOL``): on a fastMRI-sized volume (16 slices, 16 coils,
320 x 320) this is where nearly all of multi-coil reconstruction's time went (``benchmarks/multicoil_speed.py``).
"""

from __future__ import annotations

import torch

from medldm.errors import InputError
from medldm.physics._common import KeptForLastMeasurement, cg, cgls
from medldm.physics.fft import ifftnc

# coil-sized complex temporaries per block of lines (2 MiB in complex64). On a fastMRI-sized volume (16 coils, 320^2)
# the normal operator took 0.22 s at this size, 0.26 s with blocks of 2 slices, 0.52 s with 10, 0.57 s with 3 lines
CHUNK_ELEMENTS = 1 << 18
# the soft step's CG stops at this relative residual, not at float rounding: on a 181 x 217 x 181 single-coil file
# (80 soft steps in TV-POCS, the refiner's cascade and the final non-negative rounds) mr-recon ran 18% faster, its
# output moved by 9e-4 (rms, relative) and PSNR / SSIM against the truth by < 0.001 dB / 0.0001. It holds in float64
# and in training's soft steps too
SOFT_STEP_TOL = 1e-5


def to_hybrid(t: torch.Tensor) -> torch.Tensor:
    """(B, C, X, Y[, Z]) -> (B, Z, X, C, Y) contiguous, ifftshifted along Y (image or k-space alike): every
    readout line's coils and phase-encode samples together."""
    t = t.permute(0, 4, 2, 1, 3) if t.ndim == 5 else t.permute(0, 2, 1, 3).unsqueeze(1)
    return torch.fft.ifftshift(t, dim=-1).contiguous()


def from_hybrid(t: torch.Tensor, ndim: int) -> torch.Tensor:
    """The inverse of :func:`to_hybrid` for a tensor that had ``ndim`` dims."""
    t = torch.fft.fftshift(t, dim=-1)
    return (t.permute(0, 3, 2, 4, 1) if ndim == 5 else t.squeeze(1).permute(0, 2, 1, 3)).contiguous()


class HybridSense:
    """A = M F_Y S on (B, Z, X, 1, Y) images in hybrid layout, for one maps tensor, mask and dtype.

    ``maps``: (1, C, X, Y[, Z or 1]) as ``MultiCoilCartesian.maps_for`` gives them; ``mask``: (Y,) real 0/1.
    """

    def __init__(self, maps: torch.Tensor, mask: torch.Tensor):
        self.maps = to_hybrid(maps)  # (1, Z or 1, X, C, Y)
        self.mask = torch.fft.ifftshift(mask, dim=-1)
        _, _, x, c, y = self.maps.shape
        self.z_block = max(1, CHUNK_ELEMENTS // (x * c * y))  # whole slices at a time, or
        self.x_block = x if self.z_block > 1 else max(1, CHUNK_ELEMENTS // (c * y))  # lines of one slice
        self._measured = KeptForLastMeasurement()
        self._adjoint: tuple | None = None  # (the hybrid measurement, Re(A^H y)) of the last call

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_adjoint": None}  # a cache of two volumes: workers rebuild it

    def _blocks(self, z: int):
        """(index into the slices and lines, maps there) for blocks of about CHUNK_ELEMENTS coil samples."""
        nx = self.maps.shape[2]
        for a in range(0, z, self.z_block):
            zs = slice(a, min(z, a + self.z_block))
            for b in range(0, nx, self.x_block):
                xs = slice(b, min(nx, b + self.x_block))
                yield (slice(None), zs, xs), self.maps[:, zs if self.maps.shape[1] > 1 else slice(None), xs]

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        """A (B, Z, X, 1, Y) image -> its masked hybrid k-space (B, Z, X, C, Y)."""
        out = torch.empty((*v.shape[:3], self.maps.shape[3], v.shape[4]), dtype=self.maps.dtype, device=v.device)
        for at, maps in self._blocks(v.shape[1]):
            out[at] = torch.fft.fft(v[at] * maps, dim=-1, norm="ortho") * self.mask
        return out

    def adjoint(self, k: torch.Tensor) -> torch.Tensor:
        """Masked hybrid k-space (B, Z, X, C, Y) -> sum_c conj(S_c) F_Y^H M k_c, complex (B, Z, X, 1, Y)."""
        out = torch.empty((*k.shape[:3], 1, k.shape[4]), dtype=k.dtype, device=k.device)
        for at, maps in self._blocks(k.shape[1]):
            out[at] = (torch.fft.ifft(k[at] * self.mask, dim=-1, norm="ortho") * maps.conj()).sum(3, keepdim=True)
        return out

    def gram(self, v: torch.Tensor) -> torch.Tensor:
        """A^H A v for a (B, Z, X, 1, Y) image, block by block (no full coil-sized temporary); for a real image
        its real part, the normal operator among real images."""
        out = torch.empty_like(v)
        for at, maps in self._blocks(v.shape[1]):
            k = torch.fft.fft(v[at] * maps, dim=-1, norm="ortho") * self.mask
            g = (torch.fft.ifft(k, dim=-1, norm="ortho") * maps.conj()).sum(3, keepdim=True)
            out[at] = g if v.is_complex() else g.real
        return out

    def measurement(self, y: torch.Tensor) -> torch.Tensor:
        """y (B, C, X, Y[, Z]) in hybrid space, masked; kept for the last ``y`` (``KeptForLastMeasurement``)."""
        if y.ndim not in (4, 5) or y.shape[1] != self.maps.shape[3]:
            raise InputError(None, f"k-space of shape {tuple(y.shape)} does not fit {self.maps.shape[3]} coil maps "
                                   "(B, coils, X, Y[, Z])")
        return self._measured.get(y, (tuple(y.shape), y.dtype), lambda: to_hybrid(
            ifftnc(y.to(device=self.maps.device, dtype=self.maps.dtype), (2,))) * self.mask)

    def measured_adjoint(self, y: torch.Tensor) -> torch.Tensor:
        """Re(A^H y), hybrid layout: every soft step's right-hand side needs it; kept for the last measurement."""
        yh = self.measurement(y)
        if self._adjoint is None or self._adjoint[0] is not yh:
            self._adjoint = (yh, self.adjoint(yh).real.contiguous())  # not a view keeping the complex alive
        return self._adjoint[1]

    def soft_step(self, x: torch.Tensor, y: torch.Tensor, w: float, iters: int) -> torch.Tensor:
        """argmin_z ||z - x||^2 + w ||A z - y||^2 among real images, by CG from x (``x`` in the caller's layout)."""
        return from_hybrid(self._soft_step(to_hybrid(x), self.measured_adjoint(y), w, iters), x.ndim)

    def soft_steps_nonnegative(self, x: torch.Tensor, y: torch.Tensor, w: float, iters: int,
                               rounds: int) -> torch.Tensor:
        """``rounds`` of (x >= 0, soft step), then x >= 0: ``Operator.consistent_nonnegative`` with every round in
        hybrid layout (the clamp is elementwise, so layout and shifts commute with it)."""
        xh, b = to_hybrid(x), self.measured_adjoint(y)
        for _ in range(rounds):
            xh = self._soft_step(xh.clamp(min=0), b, w, iters)
        return from_hybrid(xh.clamp(min=0), x.ndim)

    def _soft_step(self, xh: torch.Tensor, b: torch.Tensor, w: float, iters: int) -> torch.Tensor:
        return cg(lambda v: v + w * self.gram(v), xh + w * b, xh, iters=iters, tol=SOFT_STEP_TOL)

    def projection(self, x: torch.Tensor, y: torch.Tensor, iters: int) -> torch.Tensor:
        """x + A^+(y - A x) among real images, by CGLS (at most ``iters``). CGLS rather than CG on the normal
        equations: this system is ill-conditioned (the real constraint), and in float32 the normal equations lost
        up to 20x more accuracy at 50 iterations."""
        xh = to_hybrid(x)
        d = cgls(self.forward, lambda k: self.adjoint(k).real, self.measurement(y) - self.forward(xh), like=xh,
                 iters=iters)
        return from_hybrid(xh + d, x.ndim)

    def sense(self, y: torch.Tensor, iters: int) -> torch.Tensor:
        """CG-SENSE: the complex image minimising ||A z - y||, CG on the normal equations from zero (CGLS's
        iterates), ``iters`` iterations at most."""
        b = self.adjoint(self.measurement(y))
        return from_hybrid(cg(self.gram, b, torch.zeros_like(b), iters=iters), y.ndim)
