"""Centred orthonormal FFTs (fastMRI convention): ifftshift -> fft(norm="ortho") -> fftshift.

Centred so that the DC sample sits at index N // 2, which is where the fastMRI/MONAI masks put their
fully sampled centre; orthonormal so that image-domain and k-space norms (and noise std) agree and the
inverse transform is exactly the adjoint.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def fftnc(x: torch.Tensor, dims: Sequence[int]) -> torch.Tensor:
    """Centred orthonormal n-D FFT over ``dims`` (real input is promoted to complex)."""
    dims = tuple(dims)
    x = torch.fft.ifftshift(x, dim=dims)
    x = torch.fft.fftn(x, dim=dims, norm="ortho")
    return torch.fft.fftshift(x, dim=dims)


def ifftnc(x: torch.Tensor, dims: Sequence[int]) -> torch.Tensor:
    """Centred orthonormal n-D inverse FFT over ``dims``; the exact adjoint (and inverse) of ``fftnc``."""
    dims = tuple(dims)
    x = torch.fft.ifftshift(x, dim=dims)
    x = torch.fft.ifftn(x, dim=dims, norm="ortho")
    return torch.fft.fftshift(x, dim=dims)


def fft2c(x: torch.Tensor) -> torch.Tensor:
    """Centred orthonormal 2D FFT over the last two dims."""
    return fftnc(x, (-2, -1))


def ifft2c(x: torch.Tensor) -> torch.Tensor:
    """Centred orthonormal 2D inverse FFT over the last two dims."""
    return ifftnc(x, (-2, -1))


def mirror_frequencies(k: torch.Tensor, dims: Sequence[int]) -> torch.Tensor:
    """A centred spectrum at the negated frequencies along ``dims`` (frequency j - n // 2 sits at index j; for
    even n the lone Nyquist index 0 is its own mirror). Size-1 (broadcast) dims stay as they are."""
    for dim in dims:
        n = k.shape[dim]
        k = k.index_select(dim, (2 * (n // 2) - torch.arange(n, device=k.device)) % n)
    return k


def hermitian_part(v: torch.Tensor, dims: Sequence[int]) -> torch.Tensor:
    """(v + conj(mirror(v))) / 2 = F Re(F^H v) for a centred spectrum v: the spectrum of its image's real part."""
    return (v + mirror_frequencies(v, dims).conj()) / 2


def uncentre(v: torch.Tensor, dims: Sequence[int]) -> torch.Tensor:
    """A centred spectrum (``fftnc``'s layout) in ``torch.fft``'s uncentred layout without the centring shift:
    ``uncentre(fftnc(x, dims), dims) == torch.fft.fftn(x, dim=dims, norm="ortho")``. The image-domain shift of the
    centred transform is a phase ramp exp(2 pi i f (n // 2) / n) on frequency f, removed here."""
    v = torch.fft.ifftshift(v, dim=tuple(dims))
    for dim in dims:
        n = v.shape[dim]
        f = torch.arange(n, device=v.device, dtype=torch.float64)
        ramp = torch.polar(torch.ones_like(f), -2 * math.pi * f * (n // 2) / n).to(v.dtype)
        v = v * ramp.reshape([n if i == dim % v.ndim else 1 for i in range(v.ndim)])
    return v
