"""Coil sensitivity maps: simulated (birdcage) for training and evaluation, estimated (ESPIRiT) for measured data.

Both follow one convention: maps are normalised so that sum_c |S_c|^2 = 1 wherever the object has signal,
and they carry the object's phase. Then the image medldm's networks see is a *real* magnitude x, the
measurement is y_c = M F(S_c x), and the root-sum-of-squares of fully sampled coil images equals x: the
fastMRI multi-coil target (``reconstruction_rss``) and medldm's output agree.

Estimation is direct calibration (BART's ``caldir``): the coil images of the fully sampled centre lines alone,
divided by their root sum of squares. Their phase is the coil's times the object's, which is smooth, so both are
folded in at once, and it works with the few centre lines of an 8x fastMRI mask (5 of 128), where ESPIRiT's
calibration (sigpy, 6x6 kernels, default thresholds) returned all-zero maps on the held-out slab.
"""

from __future__ import annotations

import numpy as np

from medldm.errors import InputError

MIN_CALIB_LINES = 3  # a low-resolution image needs a few lines; fastMRI masks keep 4-8% of them
BACKGROUND = 0.02  # below this fraction of the brightest low-resolution RSS, maps fade out (only noise there)


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


def rss(coil_images: np.ndarray, axis: int = 0) -> np.ndarray:
    """Root sum of squares over the coil axis: fastMRI's multi-coil combination."""
    return np.sqrt((np.abs(coil_images) ** 2).sum(axis))
