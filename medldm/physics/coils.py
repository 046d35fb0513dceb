"""Coil sensitivity maps: simulated (birdcage) for training and evaluation, estimated from measured data.

Both follow one convention: maps are normalised so that sum_c |S_c|^2 = 1 wherever the object has signal,
and they carry the object's phase. Then the image medldm's networks see is a *real* magnitude x, the
measurement is y_c = M F(S_c x), and the root-sum-of-squares of fully sampled coil images equals x: the
fastMRI multi-coil target (``reconstruction_rss``) and medldm's output agree.

Estimation starts with direct calibration (BART's ``caldir``): the coil images of the fully sampled centre lines
alone, divided by their root sum of squares. Their phase is the coil's times the object's, which is smooth, so both
are folded in at once, and it works with the few centre lines of an 8x fastMRI mask (5 of 128), where ESPIRiT's
calibration (sigpy, 6x6 kernels, default thresholds) returned all-zero maps on the held-out slab. But its ratio
of blurred coil images is biased wherever the object's edges are blurred, and with noise in the data the real-image
constraint suffered badly (training volumes, 8 coils, noise 0.5% of the 99.5th percentile: TV-POCS's SSIM 0.38-0.40
at 4x on the MNI152 part and a synthetic subject; 0.89 on the MNI152 part without noise). So the maps are then fitted
(``refine_maps``, JSENSE's map step): given a TV-POCS image, each coil's smooth map is the least-squares fit to
every measured line, which divides by the image itself rather than by a blurred copy.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from medldm.errors import InputError
from medldm.physics.fft import fftnc, ifftnc

MIN_CALIB_LINES = 3  # a low-resolution image needs a few lines; fastMRI masks keep 4-8% of them
BACKGROUND = 0.02  # below this fraction of the brightest low-resolution RSS, maps fade out (only noise there)
# The fitted maps: a basis x basis block of centred k-space coefficients per coil and slice (maps vary over the field
# of view, so a count, not a width in pixels), CG iterations, a Tikhonov damping towards direct calibration (relative
# to an image scaled to its 99.5th percentile; towards zero the fit took a poor 8x image's errors into the maps), the
# central frequencies compared, the rounds and the TV-POCS image's iterations. All set on training volumes only; the
# alternatives and their figures are in docs/results.md, 2026-12-08 (j).
MAP_FIT_BASIS = 16
MAP_FIT_ITERS = 30
MAP_FIT_DAMPING = 0.1
MAP_FIT_CENTRE = 128
MAP_FIT_ROUNDS = 1
MAP_FIT_TV_ITERATIONS = 30
MAP_FIT_SLICES = 8  # slices fitted at a time: a few coil-sized temporaries of that many slices, not of the volume


def birdcage_maps(coils: int, shape: tuple[int, int], radius: float = 1.5, seed: int = 0) -> np.ndarray:
    """(coils, X, Y) complex64 maps of a birdcage array (sigpy's Biot-Savart-style model), with a random
    constant phase per coil (receive chains differ) and the RSS normalisation above."""
    import sigpy.mri

    if coils < 1:
        raise InputError(None, f"coil count must be >= 1, got {coils}")
    if coils == 1:
        return np.ones((1, *shape), dtype=np.complex64)
    maps = sigpy.mri.birdcage_maps((int(coils), *(int(s) for s in shape)), r=float(radius))
    offsets = np.exp(1j * np.random.default_rng(int(seed)).uniform(-np.pi, np.pi, size=coils))
    maps = maps * offsets[:, None, None]
    return (maps / np.sqrt((np.abs(maps) ** 2).sum(0, keepdims=True))).astype(np.complex64)


def calibration_lines(mask: np.ndarray) -> slice:
    """The contiguous block of sampled phase-encode lines around the k-space centre (index W // 2, where the
    centred FFT puts DC): the auto-calibration signal (ACS) of a fastMRI-style mask."""
    mask = np.asarray(mask, dtype=bool).reshape(-1)
    c = mask.size // 2
    if not mask[c]:
        return slice(c, c)
    lo, hi = c, c + 1
    while lo > 0 and mask[lo - 1]:
        lo -= 1
    while hi < mask.size and mask[hi]:
        hi += 1
    return slice(lo, hi)


def _lowres_images(kspace: np.ndarray, acs: slice) -> np.ndarray:
    """Coil images (C, X, Y) from the calibration lines alone, Hann-windowed along Y (no ringing in the phase)."""
    import sigpy

    low = np.zeros_like(kspace)
    low[..., acs] = kspace[..., acs] * np.hanning(acs.stop - acs.start + 2)[1:-1]
    return sigpy.ifft(low, axes=(-2, -1))


def estimate_maps(kspace: np.ndarray, mask: np.ndarray, source=None) -> np.ndarray:
    """Maps (C, X, Y) for one slice of k-space (C, X, Y) (readout X, phase encode Y, ``mask`` over Y), with the
    object's phase folded in and sum_c |S_c|^2 = 1 where there is signal. One coil: the phase alone (|S| = 1)."""
    acs = calibration_lines(mask)
    width = acs.stop - acs.start
    need = MIN_CALIB_LINES if kspace.shape[0] > 1 else 1  # one coil: only the (smooth) image phase
    if width < need:
        raise InputError(source, f"the k-space centre has {width} fully sampled line(s); coil sensitivities and the "
                                 f"image phase are calibrated from at least {need} (fastMRI masks keep 4-8% of the "
                                 "lines there)")
    low = _lowres_images(kspace, acs)
    norm = rss(low)
    floor = BACKGROUND * float(norm.max()) or 1.0
    if kspace.shape[0] == 1:  # one coil: |S| = 1, the phase alone
        return np.exp(1j * np.angle(low)).astype(np.complex64)
    return (low / np.maximum(norm, floor)[None]).astype(np.complex64)


def estimate_volume_maps(kspace: np.ndarray, mask: np.ndarray, source=None) -> np.ndarray:
    """Maps (C, X, Y, Z) of multi-slice k-space (C, X, Y, Z), slice by slice (2D acquisitions)."""
    out = np.empty(kspace.shape, dtype=np.complex64)
    for z in range(kspace.shape[-1]):
        out[..., z] = estimate_maps(kspace[..., z], mask, source)
    return out


def _centre(n: int, width: int) -> slice:
    """The ``width`` indices around a centred spectrum's DC (index n // 2), as the centred FFT places it."""
    return slice(n // 2 - width // 2, n // 2 - width // 2 + width)


def fit_maps(kspace: torch.Tensor, mask: np.ndarray, image: torch.Tensor, start: torch.Tensor,
             basis: int = MAP_FIT_BASIS, iters: int = MAP_FIT_ITERS,
             centre: int | None = MAP_FIT_CENTRE) -> torch.Tensor:
    """Maps (C, X, Y, Z) that best explain the measured lines of ``kspace`` (C, X, Y, Z) given a real ``image``
    (X, Y, Z): for every coil and slice, S_c = the inverse FFT of a ``basis`` x ``basis`` block of centred
    coefficients minimising ||M F(S_c x) - y_c||^2 + damping ||coefficients - start's||^2 over the measured samples
    of the central ``centre`` x ``centre`` frequencies (None: all), by CG from ``start``'s (maps of the same shape);
    then normalised to a root sum of squares of 1 as the estimated maps are. The image's scale does not matter (the
    normalisation removes it); the object's phase stays in the maps.

    A frequency k of S_c x needs the image's spectrum within basis / 2 of k only (S_c's spectrum is the small
    block), so the fit runs on a grid of centre + basis frequencies, where the circular convolution of the FFTs
    equals the true one on the central ``centre``: exact there, and as many times cheaper as the grid is smaller."""
    from medldm.physics._common import cg

    C, X, Y, Z = kspace.shape
    grid = [n if centre is None or centre + basis >= n else centre + basis for n in (X, Y)]
    block = [min(basis, g) for g in grid]
    crop = (slice(None), _centre(X, grid[0]), _centre(Y, grid[1]))
    box = (slice(None), _centre(grid[0], block[0]), _centre(grid[1], block[1]))  # the coefficients, on the grid
    box_full = (slice(None), _centre(X, block[0]), _centre(Y, block[1]))  # the same, on the whole plane
    to_grid = float(np.sqrt(grid[0] * grid[1] / (X * Y)))  # orthonormal FFTs: one map, coefficients of two sizes
    # the samples compared: measured, and (on a cropped axis) away from the grid's wrapped-around edge band
    keep = [torch.ones(g) for g in grid]
    for axis, (g, n) in enumerate(zip(grid, (X, Y))):
        if g < n:
            keep[axis][:basis // 2] = keep[axis][g - basis // 2:] = 0
    keep[1] = keep[1] * torch.as_tensor(np.asarray(mask, dtype=bool).reshape(-1)[crop[2]], dtype=torch.float32)
    weight = (keep[0][:, None] * keep[1][None, :])[..., None]
    x = image.detach().float().cpu()
    x = x / (float(np.percentile(x.numpy(), 99.5)) or 1.0)  # the scale tv_pocs's weight is relative to
    out = torch.empty((C, X, Y, Z), dtype=torch.complex64)
    for a in range(0, Z, MAP_FIT_SLICES):
        zs = slice(a, min(Z, a + MAP_FIT_SLICES))
        xz = ifftnc(fftnc(x[:, :, zs].to(torch.complex64), (0, 1))[crop[1:]], (0, 1))  # the image's central band

        def expand(coeffs, shape=(C, *grid, zs.stop - zs.start), where=box):
            full = torch.zeros(shape, dtype=torch.complex64)
            full[where] = coeffs
            return ifftnc(full, (1, 2))

        def normal(coeffs):  # the coefficients' normal operator on the grid, plus the damping
            k = fftnc(expand(coeffs) * xz, (1, 2)) * weight
            return fftnc(ifftnc(k, (1, 2)) * xz.conj(), (1, 2))[box] + MAP_FIT_DAMPING * coeffs

        y = kspace[..., zs][crop].to(torch.complex64) * weight
        rhs = fftnc(ifftnc(y, (1, 2)) * xz.conj(), (1, 2))[box]
        first = fftnc(start[..., zs].to(torch.complex64), (1, 2))[box_full] * to_grid
        coeffs = cg(normal, rhs + MAP_FIT_DAMPING * first, first, iters=iters)  # damped towards the start
        maps = expand(coeffs, (C, X, Y, zs.stop - zs.start), box_full)
        norm = maps.abs().pow(2).sum(0).sqrt()
        out[..., zs] = maps / torch.maximum(norm, 1e-3 * norm.amax(dim=(0, 1), keepdim=True).clamp(min=1e-30))[None]
    return out


def refine_maps(kspace: torch.Tensor, mask: np.ndarray, maps: torch.Tensor, operator: Callable[[torch.Tensor], object],
                rounds: int = MAP_FIT_ROUNDS) -> torch.Tensor:
    """``rounds`` of JSENSE's alternation from estimated ``maps``: the TV-POCS image of the measurement ``kspace``
    (1, C, X, Y, Z) under the current maps (``operator(maps)`` builds the measurement's operator, with its data
    consistency), then :func:`fit_maps` to it."""
    from medldm.physics.classical import tv_pocs

    for _ in range(rounds):
        op = operator(maps)
        x = tv_pocs(op.naive_inverse(kspace).float(), lambda v: op.data_consistency(v, kspace), image_axes=(2, 3),
                    iterations=MAP_FIT_TV_ITERATIONS)
        maps = fit_maps(kspace[0], mask, x[0, 0].clamp(min=0), maps)
    return maps


def rss(coil_images: np.ndarray, axis: int = 0) -> np.ndarray:
    """Root sum of squares over the coil axis: fastMRI's multi-coil combination."""
    return np.sqrt((np.abs(coil_images) ** 2).sum(axis))
