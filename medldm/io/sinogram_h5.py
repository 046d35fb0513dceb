"""Parallel-beam CT sinograms in HDF5: the input of sparse-view CT reconstruction.

Layout (medldm's own; written by ``write_sinogram_h5``, read by ``read_sinogram_h5``):

- dataset ``sinogram`` float32 ``[slices, views, detectors]``: post-log line integrals
  ``-log(I / I0)`` of the linear attenuation (dimensionless: mu in 1/mm times path length in mm);
- dataset ``angles`` float ``[views]``: view angles in degrees. Angle 0 integrates along the image's
  second index axis (Y), the detector running along the first (X);
- attribute ``pixel_spacing`` ``[dx, dy]`` mm (in-plane, must be equal; the detector pitch is the pixel
  size), optional, default 1 mm; ``slice_spacing`` mm, optional, default 1 mm;
- attribute ``image_size`` ``[X, Y]``, optional: the slice grid. Without it the slices are square and
  the detector row must span their diagonal, ``detectors = ceil(sqrt(2) * X)``; with it a narrower row
  (odd difference excluded, so the centres align) is padded with air;
- attribute ``I0`` photons per ray, optional (the dose; it sets the soft data-consistency weight).

The reconstruction grid is ``(X, Y, slices)`` with a diagonal RAS affine from the spacings.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from medldm.errors import InputError
from medldm.io._hdf5 import checked_hdf5_path, python_value


MAX_LINE_INTEGRAL = 1e3  # mu * path: 10 for 50 cm of water; a sinogram beyond this is not post-log data
SPACING_MM = (1e-3, 1e3)  # plausible voxel sizes: a micron to a metre
MAX_IMAGE_SIZE = 8192  # pixels per side: more than any CT grid, and a bound on what a file can make us allocate


def is_sinogram_h5(path: str | os.PathLike) -> bool:
    """True when the file is HDF5 with a ``sinogram`` dataset (cheap: reads no data)."""
    try:
        with h5py.File(path, "r") as f:
            return "sinogram" in f
    except (OSError, ValueError, RuntimeError):  # h5py raises RuntimeError on a corrupt file's internals
        return False


def read_sinogram_h5(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Return ``(sinogram float32 [slices, views, detectors], angles float64 [views] degrees, attrs)``."""
    path = checked_hdf5_path(path)
    try:
        with h5py.File(path, "r") as f:
            if "sinogram" not in f or "angles" not in f:
                raise InputError(path, "a sinogram file needs the datasets 'sinogram' [slices, views, detectors] "
                                       "and 'angles' [views] (degrees)")
            sino = np.asarray(f["sinogram"][()])
            angles = np.asarray(f["angles"][()], dtype=np.float64).reshape(-1)
            attrs = {k: python_value(v) for k, v in f.attrs.items()}
    except InputError:
        raise
    except (OSError, KeyError, TypeError, ValueError, RuntimeError) as err:
        raise InputError(path, f"unreadable sinogram HDF5: {err}") from None
    if sino.ndim != 3 or not np.issubdtype(sino.dtype, np.number) or np.iscomplexobj(sino):
        raise InputError(path, f"'sinogram' must be a real [slices, views, detectors] array, got {sino.dtype} {sino.shape}")
    if angles.size != sino.shape[1]:
        raise InputError(path, f"'angles' has {angles.size} entries but the sinogram has {sino.shape[1]} views")
    if min(sino.shape) < 1:  # an empty array would reach the FFT of the ramp filter
        raise InputError(path, f"'sinogram' is empty: shape {sino.shape}")
    if not (np.all(np.isfinite(sino)) and np.all(np.isfinite(angles))):
        raise InputError(path, "sinogram or angles contain NaN/Inf values")
    if np.abs(sino).max() > MAX_LINE_INTEGRAL:
        raise InputError(path, f"'sinogram' holds {np.abs(sino).max():.3g}: post-log line integrals -log(I / I0) stay "
                               f"within +-{MAX_LINE_INTEGRAL:g} (counts or raw intensities are not a sinogram)")
    return sino.astype(np.float32), angles, attrs


def write_sinogram_h5(path: str | os.PathLike, sinogram: np.ndarray, angles, *, pixel_spacing=(1.0, 1.0),
                      slice_spacing: float = 1.0, image_size=None, I0: float | None = None) -> Path:
    """Write the documented layout (research: simulated sinograms; tests)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.create_dataset("sinogram", data=np.asarray(sinogram, dtype=np.float32))
        f.create_dataset("angles", data=np.asarray(angles, dtype=np.float64))
        f.attrs["pixel_spacing"] = np.asarray(pixel_spacing, dtype=np.float64)
        f.attrs["slice_spacing"] = float(slice_spacing)
        if image_size is not None:
            f.attrs["image_size"] = np.asarray(image_size, dtype=np.int64)
        if I0 is not None:
            f.attrs["I0"] = float(I0)
    return path


def sinogram_geometry(attrs: dict, path=None) -> dict[str, Any]:
    """Validated spacing, grid size and dose from the file attributes."""
    def number_list(key, n, default):
        v = attrs.get(key, default)
        arr = np.atleast_1d(np.asarray(v, dtype=np.float64)) if v is not None else None
        if arr is None or arr.size != n or not np.all(np.isfinite(arr)) or np.any(arr <= 0):
            raise InputError(path, f"attribute {key!r} must be {n} positive number(s), got {v!r}")
        return arr

    dx, dy = number_list("pixel_spacing", 2, [1.0, 1.0])
    (dz,) = number_list("slice_spacing", 1, 1.0)
    if not all(SPACING_MM[0] <= v <= SPACING_MM[1] for v in (dx, dy, dz)):  # a denormal spacing overflows the FBP
        raise InputError(path, f"spacing {dx:g}, {dy:g}, {dz:g} mm is outside {SPACING_MM[0]:g}-{SPACING_MM[1]:g} mm")
    if abs(dx - dy) > 1e-6 * max(dx, dy):
        raise InputError(path, f"pixel_spacing {dx}, {dy}: the projector needs square pixels")
    size = attrs.get("image_size")
    if size is not None:
        size = tuple(int(s) for s in number_list("image_size", 2, None))
        if not all(2 <= s <= MAX_IMAGE_SIZE for s in size):
            raise InputError(path, f"attribute 'image_size' {list(size)}: each side must be 2-{MAX_IMAGE_SIZE} pixels")
    i0 = attrs.get("I0")
    if i0 is not None:
        (i0,) = number_list("I0", 1, None)
    return {"pixel_mm": float(dx), "slice_mm": float(dz), "image_size": size, "I0": None if i0 is None else float(i0)}
