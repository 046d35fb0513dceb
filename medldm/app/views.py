"""What the app shows: three orthogonal planes of a volume as one RGB image, with a shared window/level.

Pure numpy (and matplotlib's colour maps), so it is tested without a browser. Arrays are (X, Y, Z) moved to
RAS+ axes (``display_arrays``) and planes are drawn as the evaluation figures draw them (superior and anterior
up, no radiological left-right flip), so the app and the model cards look alike. Planes are resampled to 1 mm
pixels, so thick slices look thick.
"""

from __future__ import annotations

import numpy as np
from matplotlib import colormaps

from medldm.io.volume import RAS, reorient

GAP = 4  # pixels between planes
DISPLAY_MM = 1.0  # pixel size of the drawn planes (nearest neighbour)


def display_arrays(arrays: dict[str, np.ndarray | None], affine: np.ndarray) -> tuple[dict[str, np.ndarray], tuple]:
    """Each (X, Y, Z) or (1, X, Y, Z) array, on the grid of ``affine``, moved to RAS+ axes (nothing resampled);
    also the voxel spacing there (mm)."""
    out = {}
    ras_affine = affine
    for name, a in arrays.items():
        if a is None:
            continue
        a = np.asarray(a, dtype=np.float32)
        a = a[0] if a.ndim == 4 else a
        out[name], ras_affine = reorient(a, affine, RAS)
    return out, tuple(float(s) for s in np.linalg.norm(ras_affine[:3, :3], axis=0))


def default_window(volume: np.ndarray) -> tuple[float, float]:
    """(level, width) covering the 0.5th to 99.5th percentile."""
    lo, hi = (float(v) for v in np.percentile(volume, [0.5, 99.5]))
    hi = hi if hi > lo else lo + 1.0
    return (lo + hi) / 2, hi - lo


def _planes(vol: np.ndarray, index: tuple[int, int, int], spacing: tuple) -> list[np.ndarray]:
    """Axial (XY at z), coronal (XZ at y), sagittal (YZ at x) planes, rows = second axis, flipped so up is up,
    resampled to ``DISPLAY_MM`` pixels."""
    x, y, z = (int(np.clip(i, 0, s - 1)) for i, s in zip(index, vol.shape))
    sx, sy, sz = spacing
    cuts = [(vol[:, :, z], sx, sy), (vol[:, y, :], sx, sz), (vol[x, :, :], sy, sz)]
    return [_resample(p.T[::-1], s_rows, s_cols) for p, s_cols, s_rows in cuts]


def _resample(plane: np.ndarray, row_mm: float, col_mm: float) -> np.ndarray:
    rows = max(1, round(plane.shape[0] * row_mm / DISPLAY_MM))
    cols = max(1, round(plane.shape[1] * col_mm / DISPLAY_MM))
    ri = np.minimum((np.arange(rows) * plane.shape[0] / rows).astype(int), plane.shape[0] - 1)
    ci = np.minimum((np.arange(cols) * plane.shape[1] / cols).astype(int), plane.shape[1] - 1)
    return plane[np.ix_(ri, ci)]


def _colour(plane: np.ndarray, lo: float, hi: float, cmap: str) -> np.ndarray:
    scaled = np.clip((plane - lo) / max(hi - lo, 1e-12), 0, 1)
    if cmap == "gray":
        return np.repeat((scaled * 255).astype(np.uint8)[..., None], 3, axis=-1)
    return (colormaps[cmap](scaled)[..., :3] * 255).astype(np.uint8)


def three_planes(vol: np.ndarray, index: tuple[int, int, int], spacing: tuple, lo: float, hi: float,
                 cmap: str = "gray") -> np.ndarray:
    """One RGB uint8 image: the three planes side by side (bottom-aligned), intensities lo..hi."""
    planes = [_colour(p, lo, hi, cmap) for p in _planes(vol, index, spacing)]
    height = max(p.shape[0] for p in planes)
    width = sum(p.shape[1] for p in planes) + GAP * (len(planes) - 1)
    canvas = np.zeros((height, width, 3), np.uint8)
    col = 0
    for p in planes:
        canvas[height - p.shape[0]:, col:col + p.shape[1]] = p
        col += p.shape[1] + GAP
    return canvas


def panels(arrays: dict[str, np.ndarray], spacing: tuple, index: tuple[int, int, int], level: float,
           width: float) -> dict[str, np.ndarray]:
    """The app's images. Input and output share the window (level, width); |output - input|, uncertainty (std)
    and |error| are shown in a heat map from 0 to the window's width / 4 (a quarter of the window: differences
    that small are what one looks for)."""
    lo, hi = level - width / 2, level + width / 2
    out = {}
    for name, vol in arrays.items():
        heat = name not in ("input", "output", "truth")
        out[name] = three_planes(vol, index, spacing, 0.0 if heat else lo, width / 4 if heat else hi,
                                 "magma" if heat else "gray")
    return out

